"""The Triton kernels as ``torch.library`` custom ops, their fakes, autograd and eager twins.

Three ops in the ``batchnorm`` namespace, each with a fake (meta) implementation, so
``torch.compile(fullgraph=True)`` traces through them without graph breaks:

* ``batchnorm::triton_train`` — training forward ``y = act(γ·x̂ + β + z)`` with the batch
  statistics, the new running statistics (computed by the reduction's merging program, out
  of place) and, for (leaky) ReLU with a residual, a uint8 ``u > 0`` mask; its backward is
  registered with :func:`torch.library.register_autograd` and calls
* ``batchnorm::tritontrain_backward`` — ``(dx, dγ, dβ, dz)`` in one reduction + one
  elementwise pass;
* ``batchnorm::triton_inference`` — evaluation forward from the running statistics.

The ops are opaque to Inductor (``torch.library.custom_op``): they serve every traced call that
is not ``torch.compile`` on a GPU (fake tensors, ``make_fx``, ``torch.func``, the interpreter),
and ``torch.compile`` where the ``torch.library.triton_op`` twins of
:mod:`batchnorm.backends.triton_compiled` (which expose the kernels to Inductor) are not used.
Outside tracing the backend calls the eager twins instead (:func:`runs_eagerly`): the same
launches and formulas as plain autograd functions, without the ops' dispatch.
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm import _compat
from batchnorm._math import activation_derivative
from batchnorm.kernels.triton.launch import (
    placeholder,
    run_inference,
    train_backward,
    train_forward,
    uses_mask,
)

__all__ = [
    "InferenceFunction",
    "TrainFunction",
    "inference_op",
    "runs_eagerly",
    "train_backward_op",
    "train_op",
]

# --- the custom ops ---------------------------------------------------------------

_TRAIN_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor? running_mean, "
    "Tensor? running_var, float momentum, float eps, str activation, float negative_slope) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, Tensor mask, "
    "Tensor mean, Tensor invstd, str activation, float negative_slope, bool residual_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
_INFERENCE_SCHEMA = (
    "(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, "
    "Tensor? residual, float eps, str activation, float negative_slope) -> Tensor"
)

train_op = torch.library.custom_op(
    "batchnorm::triton_train", mutates_args=(), schema=_TRAIN_SCHEMA
)(train_forward)
train_backward_op = torch.library.custom_op(
    "batchnorm::tritontrain_backward", mutates_args=(), schema=_BACKWARD_SCHEMA
)(train_backward)
inference_op = torch.library.custom_op(
    "batchnorm::triton_inference", mutates_args=(), schema=_INFERENCE_SCHEMA
)(run_inference)


@train_op.register_fake
def _train_fake(
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[torch.Tensor, ...]:
    """Shapes, dtypes and strides of :func:`train_forward`'s outputs."""
    c = x3.shape[1]
    stats = [x3.new_empty((c,), dtype=torch.float32) for _ in range(3)]
    save_mask = uses_mask(activation, residual is not None)
    positive = torch.empty_like(x3, dtype=torch.uint8) if save_mask else placeholder(x3)
    update = running_mean is not None and running_var is not None and x3.numel() > 0
    new_mean = torch.empty_like(running_mean) if update else placeholder(x3)  # type: ignore[arg-type]
    new_var = torch.empty_like(running_var) if update else placeholder(x3)  # type: ignore[arg-type]
    return (torch.empty_like(x3), *stats, positive, new_mean, new_var)


@train_backward_op.register_fake
def _train_backward_fake(
    dy: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    positive: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    activation: str,
    negative_slope: float,
    residual_grad: bool,
) -> tuple[torch.Tensor, ...]:
    """Shapes, dtypes and strides of :func:`train_backward`'s outputs."""
    c = x3.shape[1]
    dz = torch.empty_like(x3) if residual_grad else placeholder(x3)
    grads = [x3.new_empty((c,), dtype=torch.float32) for _ in range(2)]
    return (torch.empty_like(x3), *grads, dz)


@inference_op.register_fake
def _inference_fake(
    x3: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
) -> torch.Tensor:
    """Shape, dtype and strides of :func:`_inference`'s output."""
    return torch.empty_like(x3)


def _train_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
    """Saves ``x``, ``γ``, ``β``, the mask, ``μ`` and ``r`` (never ``x̂`` or ``y``).

    The residual is kept only where the backward recomputes ``u`` from it (SiLU, GELU).
    """
    x3, weight, bias, residual, _rm, _rv, _momentum, _eps, activation, negative_slope = inputs
    _y, mean, invstd, _var, positive, _new_mean, _new_var = output
    recompute_from_residual = activation in ("silu", "gelu")
    keep_residual = residual if recompute_from_residual else None
    ctx.save_for_backward(x3, weight, bias, keep_residual, positive, mean, invstd)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.mark_non_differentiable(*output[1:])
    # Six outputs are statistics nobody differentiates: no zero-filled gradients for them.
    ctx.set_materialize_grads(False)


def _train_backward_formula(
    ctx: Any, *grads: torch.Tensor, backward_op: Any = None
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``batchnorm::triton_train`` w.r.t. ``x``, ``γ``, ``β`` and ``z``.

    ``backward_op``: the op a traced backward calls (default ``batchnorm::tritontrain_backward``;
    the ``triton_op`` twin of :mod:`batchnorm.backends.triton_compiled` passes its own).
    """
    x3, weight, bias, residual, positive, mean, invstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grads[0] is None:  # y itself was not used: nothing flows back
        return (None,) * 10
    # With create_graph the op runs, so that differentiating its result fails as it does on
    # the op route (the kernels have no backward of their own) instead of losing gradients.
    direct = not torch.is_grad_enabled() and runs_eagerly(x3, grads[0], weight, bias, residual)
    backward = train_backward if direct else (backward_op or train_backward_op)
    dx, dweight, dbias, dz = backward(
        grads[0], x3, weight, bias, residual, positive, mean, invstd, ctx.activation,
        ctx.negative_slope, needs[3],
    )  # fmt: skip
    return (
        dx if needs[0] else None,
        dweight.to(weight.dtype) if needs[1] else None,
        dbias.to(bias.dtype) if needs[2] else None,
        dz if needs[3] else None,
        None, None, None, None, None, None,
    )  # fmt: skip


train_op.register_autograd(_train_backward_formula, setup_context=_train_setup_context)


# --- eager twins of the ops ------------------------------------------------------------------
# Outside torch.compile a custom op's Python dispatch and its registered autograd cost several
# hundred µs per training step (more than the kernels of a mid-sized batch norm on a GPU); these
# autograd functions run the same launch code and the same formulas with none of that.


def runs_eagerly(x: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a call launches directly instead of through the ``torch.library`` op.

    True when ``x`` and every other given tensor are plain tensors (or parameters) with real
    storage, and nothing records or transforms the call: no ``torch.compile``, ``torch.func``
    transform, ``torch.jit.trace`` or ``TorchDispatchMode`` (``make_fx``, FLOP counters,
    selective checkpointing) is active (:func:`batchnorm._compat.traced`). Everything else goes
    through the ops, whose fake implementations serve tracing, compiling, meta tensors and
    ``opcheck``.
    """
    if _compat.traced(x) or _compat.functorch_active():
        return False
    for tensor in others:  # a plain loop: this runs on every call
        if tensor is not None and type(tensor) not in _compat.PLAIN_TENSOR_TYPES:
            return False
    return True


class TrainFunction(torch.autograd.Function):
    """``batchnorm::triton_train`` with its autograd, as a plain autograd function (eager)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """:func:`train_forward` on the op's arguments and ``in_place``, then the op's
        ``setup_context``.

        (``forward`` takes ``ctx`` itself: a separate ``setup_context`` makes every ``apply``
        bind its arguments through ``inspect.signature``.) With ``in_place`` (the last
        argument) the kernel moves the given running buffers, which are returned and marked
        dirty (their version counter moves, as after ATen's in-place update).
        """
        *op_inputs, in_place = inputs
        outputs: tuple[torch.Tensor, ...] = train_forward(*op_inputs, in_place)
        _train_setup_context(ctx, tuple(op_inputs), outputs)
        if outputs[5] is op_inputs[4]:  # the buffers themselves were updated
            ctx.mark_dirty(outputs[5], outputs[6])
        return outputs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The op's registered formula (double backward fails as on the op route)."""
        return (*_train_backward_formula(ctx, *grads), None)


def _inference_setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    """Saves what the evaluation backward recomputes ``u`` from."""
    x3, running_mean, running_var, weight, bias, residual, eps, activation, slope = inputs
    ctx.save_for_backward(x3, running_mean, running_var, weight, bias, residual)
    ctx.eps = eps
    ctx.activation = activation
    ctx.negative_slope = slope


def _inference_backward_formula(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the evaluation forward (statistics are constants here), in torch ops.

    ``du = dy·act'(u)``, ``dx = du·γ·r̄``, ``dz = du``, ``dγ = Σ du·x̂``, ``dβ = Σ du`` with
    ``x̂ = (x − μ̄)·r̄`` and ``r̄ = 1 / sqrt(σ̄² + ε)``. Rarely on a hot path (fine-tuning with
    frozen statistics, input gradients), so written for clarity.
    """
    x3, running_mean, running_var, weight, bias, residual = ctx.saved_tensors
    dtype = torch.float32
    invstd = torch.rsqrt(running_var.to(dtype) + ctx.eps)[None, :, None]  # (1, C, 1)
    x_hat = (x3.to(dtype) - running_mean.to(dtype)[None, :, None]) * invstd  # (N, C, L)
    gamma = 1.0 if weight is None else weight.to(dtype)[None, :, None]
    du = dy.to(dtype)  # (N, C, L)
    if ctx.activation != "none":
        u = x_hat * gamma + (0.0 if bias is None else bias.to(dtype)[None, :, None])
        if residual is not None:
            u = u + residual.to(dtype)
        du = du * activation_derivative(u, ctx.activation, ctx.negative_slope)
    needs = ctx.needs_input_grad
    return (
        (du * gamma * invstd).to(x3.dtype) if needs[0] else None,
        None,
        None,
        (du * x_hat).sum(dim=(0, 2)).to(weight.dtype) if needs[3] else None,
        du.sum(dim=(0, 2)).to(bias.dtype) if needs[4] else None,
        du.to(residual.dtype) if needs[5] else None,
        None,
        None,
        None,
    )


inference_op.register_autograd(_inference_backward_formula, setup_context=_inference_setup_context)


class InferenceFunction(torch.autograd.Function):
    """``batchnorm::triton_inference`` with its autograd, as a plain autograd function (eager)."""

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> torch.Tensor:
        """:func:`~batchnorm.kernels.triton.launch.run_inference` and ``setup_context``."""
        y: torch.Tensor = run_inference(*inputs)
        _inference_setup_context(ctx, inputs, y)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The op's registered formula."""
        return _inference_backward_formula(ctx, dy)
