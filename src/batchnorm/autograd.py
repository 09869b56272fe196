"""The autograd functions that make every backend differentiable with our own backward formula.

The function takes the ``(N, C, L)`` view and a backend (see :mod:`batchnorm.backends`), saves
only ``x`` (kept by autograd anyway), ``weight``, ``mean`` and ``invstd`` for backward, and never
touches running statistics. It follows the ``setup_context`` form with
``generate_vmap_rule = True``, so ``torch.func.vmap``/``grad`` work with the pure-torch backend.

Fused activation and residual add, ``y = act(γ·x̂ + β + z)``: backends that implement
:class:`~batchnorm.backends.base.FusedBackend` (Triton) do it in their kernels with their own
autograd registration; for the others :class:`BatchNormActFunction` composes ``backend.forward``,
the residual add and the activation in one autograd node whose backward is one pass:
``du = dy·act'(u)``, ``dz = du``, ``(dx, dγ, dβ) = backend.backward(du, …)``. It takes the backend
by name (a string), so ``torch.compile(fullgraph=True)`` traces it without graph breaks.

Higher derivatives: a backward with ``create_graph`` (double backward, gradient penalties) does not
call the backend's kernels, whose results carry no graph through the saved statistics; it
recomputes the forward in torch operations and differentiates that (:func:`_differentiable_grads`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from batchnorm._math import activate, activation_derivative
from batchnorm.backends import Backend, ForwardResult, compute_dtype, resolve_backend
from batchnorm.backends.base import FusedForwardResult, channel_view

__all__ = [
    "BatchNormActFunction",
    "BatchNormTrainFunction",
    "activate",
    "activation_derivative",
    "batch_norm_act_train",
    "batch_norm_train",
    "fuses",
    "native_forward_train",
]


def _add_and_activate(
    bn: torch.Tensor, residual: torch.Tensor | None, activation: str | None, negative_slope: float
) -> torch.Tensor:
    """``act(bn + z)`` in the compute dtype, returned in ``bn``'s dtype (the input's).

    ``bn`` is ``bn(x)`` already rounded to the input dtype, as the unfused composition has it.
    """
    dtype = compute_dtype(bn.dtype)
    u = bn.to(dtype)  # (N, C, L)
    if residual is not None:
        u = u + residual.to(dtype)
    return activate(u, activation, negative_slope).to(bn.dtype)


def _recomputed(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
) -> torch.Tensor:
    """``act(bn(x) + z)`` again, in differentiable torch operations, rounded as the forward was.

    The statistics ``μ``, ``r`` are functions of ``x`` here, which the saved (non-differentiable)
    ones are not: this is what a ``create_graph`` backward differentiates.
    """
    dtype = compute_dtype(x.dtype)
    gamma = None if weight is None else weight.to(dtype)
    beta = None if bias is None else bias.to(dtype)
    bn = F.batch_norm(x.to(dtype), None, None, gamma, beta, True, 0.0, eps)  # (N, C, L)
    return _add_and_activate(bn.to(x.dtype), residual, activation, negative_slope)


def _differentiable_grads(
    dy: torch.Tensor,
    inputs: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
    eps: float,
    activation: str | None = None,
    negative_slope: float = 0.0,
) -> tuple[torch.Tensor | None, ...]:
    """The gradients of ``(x, γ, β[, z])`` as a graph autograd can differentiate again.

    A backward with ``create_graph`` (double backward, gradient penalties, ``torch.func.grad``
    of a gradient) comes here instead of the backend's kernels, whose results carry no graph
    through the statistics: the forward is recomputed in torch operations and differentiated
    with ``create_graph``. First-order training never takes this path.
    """
    x, weight, bias = inputs[:3]
    residual = inputs[3] if len(inputs) > 3 else None
    wanted = [t for t, need in zip(inputs, needs, strict=False) if need and t is not None]
    y = _recomputed(x, weight, bias, residual, eps, activation, negative_slope)  # type: ignore[arg-type]
    grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(
        next(grads) if need and t is not None else None
        for t, need in zip(inputs, needs, strict=False)
    )


def _save_for_backend(
    ctx: Any,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    backend: Backend,
    eps: float,
) -> None:
    """Saves what :func:`_backend_grads` needs: ``x``, ``γ``, ``β``, ``μ``, ``r``, the backend
    and ``ε`` (for a ``create_graph`` backward)."""
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.backend = backend
    ctx.eps = eps


def _backend_grads(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dγ, dβ)`` from ``backend.backward``, ``None`` where autograd needs none."""
    x, weight, bias, mean, invstd = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = needs = tuple(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():  # create_graph: a differentiable graph, not the kernels
        return _differentiable_grads(dy, (x, weight, bias), needs, ctx.eps)
    if x.dim() == 3:
        dx, dweight, dbias = ctx.backend.backward(dy, x, weight, mean, invstd)
    else:  # the input as the caller had it: the backend takes its (N, C, L) view
        x3, dy3 = channel_view(x), channel_view(dy)  # (N, C, L) each
        dx, dweight, dbias = ctx.backend.backward(dy3, x3, weight, mean, invstd)
        dx = dx.reshape(x.shape)  # (N, C, *), a view for the dense layouts
    return (
        dx if needs_x else None,
        dweight.to(weight.dtype) if needs_weight else None,
        dbias.to(bias.dtype) if needs_bias else None,
    )


class BatchNormTrainFunction(torch.autograd.Function):
    """Training-mode batch normalization; outputs ``(y, mean, invstd, var)``.

    Only ``y`` is differentiable; the statistics are marked non-differentiable (they feed the
    running averages, which are buffers, not parameters).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        backend: Backend,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs ``backend.forward`` on ``x`` of shape ``(N, C, L)``."""
        return tuple(backend.forward(x, weight, bias, eps))  # type: ignore[return-value]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        """Saves ``x``, ``weight``, ``mean`` and ``invstd`` for :meth:`backward`."""
        x, weight, bias, eps, backend = inputs
        _y, mean, invstd, var = output
        _save_for_backend(ctx, x, weight, bias, mean, invstd, backend, eps)
        ctx.mark_non_differentiable(mean, invstd, var)

    @staticmethod
    def backward(
        ctx: Any,
        dy: torch.Tensor,
        _dmean: torch.Tensor | None,
        _dinvstd: torch.Tensor | None,
        _dvar: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        """Returns ``(dx, dweight, dbias, None, None)`` from ``backend.backward``."""
        return (*_backend_grads(ctx, dy), None, None)


class _BatchNormTrainEagerFunction(torch.autograd.Function):
    """:class:`BatchNormTrainFunction` in the classic ``forward(ctx, ...)`` form.

    Same forward, context and backward; used outside ``torch.func`` transforms because
    ``Function.apply`` of the ``setup_context`` form binds its arguments through
    ``inspect.signature`` on every call (~60 µs, more than a small batch norm itself).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        backend: Backend,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs :meth:`BatchNormTrainFunction.forward` and its ``setup_context``."""
        output = BatchNormTrainFunction.forward(x, weight, bias, eps, backend)
        BatchNormTrainFunction.setup_context(ctx, (x, weight, bias, eps, backend), output)
        return output

    backward = BatchNormTrainFunction.backward


def batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    backend: Backend,
) -> ForwardResult:
    """Differentiable training-mode forward on the ``(N, C, L)`` view.

    Args:
        x: input view of shape ``(N, C, L)``.
        weight: ``γ`` of shape ``(C,)`` or ``None``.
        bias: ``β`` of shape ``(C,)`` or ``None``.
        eps: added to the variance inside the square root.
        backend: the backend that computes forward and backward.

    Returns:
        A :class:`ForwardResult`; gradients flow to ``x``, ``weight`` and ``bias`` through ``y``.
    """
    function = (
        BatchNormTrainFunction
        if torch._C._are_functorch_transforms_active()
        else _BatchNormTrainEagerFunction
    )
    outputs = function.apply(x, weight, bias, eps, backend)  # type: ignore[no-untyped-call]
    return ForwardResult(*outputs)


class _NativeForwardFunction(torch.autograd.Function):
    """A backend's ``native_batch_norm`` forward, which also moves the running buffers, and
    its ``backward``.

    Forward is ``backend.native_batch_norm`` (``aten::native_batch_norm``'s contract:
    statistics, output and the running update ``running ← (1 − momentum)·running +
    momentum·batch``, unbiased variance, in one call); backward is ``backend.backward`` from the
    saved ``μ`` and ``r``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        backend: Backend,
    ) -> torch.Tensor:
        """Normalizes ``x`` ``(N, C, *)`` with its batch statistics; moves the buffers."""
        y, mean, invstd = backend.native_batch_norm(  # type: ignore[attr-defined]
            x, weight, bias, running_mean, running_var, momentum, eps
        )  # like x, (C,), (C,)
        _save_for_backend(ctx, x, weight, bias, mean, invstd, backend, eps)
        return y  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Returns ``(dx, dweight, dbias)`` from ``backend.backward``, None for the rest."""
        return (*_backend_grads(ctx, dy), None, None, None, None, None)


def native_forward_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    backend: Backend,
) -> torch.Tensor:
    """Differentiable training forward by ``backend.native_batch_norm`` and its backward.

    For backends that run a whole training forward, running update included, in one call
    (:meth:`batchnorm.backends.numba_backend.NumbaBackend.native_forward` says when): the
    forward costs what ``F.batch_norm``'s does, where the generic path
    (:func:`batch_norm_train`) adds views, scratch statistics and a separate update.

    Args:
        x: the input ``(N, C, *)`` as the caller has it.
        weight, bias: ``γ``, ``β`` ``(C,)`` or ``None``, of the dtypes the backend's forward
            takes (float32 for float16/bfloat16 ``x`` where ATen's kernel runs it).
        running_mean, running_var: buffers ``(C,)`` the forward moves in place (both or
            neither; not requiring grad).
        momentum: the running-average factor.
        eps: added to the variance inside the square root.
        backend: the backend whose ``native_batch_norm`` and ``backward`` run.

    Returns:
        ``y`` like ``x``, differentiable with respect to ``x``, ``weight`` and ``bias``.
    """
    return _NativeForwardFunction.apply(  # type: ignore[no-any-return, no-untyped-call]
        x, weight, bias, running_mean, running_var, momentum, eps, backend
    )


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    """``(C,)`` → ``(1, C, 1)``, to broadcast against ``(N, C, L)``."""
    return values[None, :, None]


class BatchNormActFunction(torch.autograd.Function):
    """``y = act(bn(x) + z)`` on any backend, one autograd node; outputs ``(y, μ, r, σ²)``.

    ``bn(x)`` comes from ``backend.forward`` (in the input dtype, as the unfused composition
    would give), the residual add and the activation run in the compute dtype. Backward
    recomputes ``u = bn(x) + z`` from ``x``, ``μ``, ``r`` (nothing else saved) and returns
    ``dx``, ``dγ``, ``dβ`` and ``dz``.
    """

    @staticmethod
    def forward(
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        activation: str | None,
        negative_slope: float,
        backend_name: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the backend's forward, adds ``residual`` and applies ``activation``."""
        result = resolve_backend(backend_name, x.device).forward(x, weight, bias, eps)
        y = _add_and_activate(result.y, residual, activation, negative_slope)  # (N, C, L)
        return y, result.mean, result.invstd, result.var

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        """Saves ``x``, ``γ``, ``β``, ``z``, ``μ`` and ``r`` for :meth:`backward`."""
        x, weight, bias, residual, eps, activation, negative_slope, backend_name = inputs
        _y, mean, invstd, var = output
        ctx.save_for_backward(x, weight, bias, residual, mean, invstd)
        ctx.eps = eps
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.backend_name = backend_name
        ctx.mark_non_differentiable(mean, invstd, var)

    @staticmethod
    def backward(
        ctx: Any,
        dy: torch.Tensor,
        _dmean: torch.Tensor | None,
        _dinvstd: torch.Tensor | None,
        _dvar: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, ...]:
        """``du = dy·act'(u)``, then ``backend.backward(du)``; ``dz = du``."""
        x, weight, bias, residual, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable graph, not the kernels
            grads = _differentiable_grads(
                dy, (x, weight, bias, residual), tuple(ctx.needs_input_grad[:4]), ctx.eps,
                ctx.activation, ctx.negative_slope,
            )  # fmt: skip
            return (*grads, None, None, None, None)
        dtype = compute_dtype(x.dtype)
        du = dy.to(dtype)  # (N, C, L)
        if ctx.activation is not None:
            scale = invstd if weight is None else invstd * weight.to(dtype)  # (C,)  γ·r
            u = (x.to(dtype) - _per_channel(mean)) * _per_channel(scale)  # (N, C, L)
            if bias is not None:
                u = u + _per_channel(bias.to(dtype))
            u = u.to(x.dtype).to(dtype)  # the forward's bn(x) was rounded to the input dtype
            if residual is not None:
                u = u + residual.to(dtype)
            du = du * activation_derivative(u, ctx.activation, ctx.negative_slope)
        backend = resolve_backend(ctx.backend_name, x.device)
        dx, dweight, dbias = backend.backward(du, x, weight, mean, invstd)
        needs_x, needs_weight, needs_bias, needs_residual = ctx.needs_input_grad[:4]
        return (
            dx if needs_x else None,
            dweight.to(weight.dtype) if needs_weight else None,
            dbias.to(bias.dtype) if needs_bias else None,
            du.to(residual.dtype) if needs_residual else None,
            None,
            None,
            None,
            None,
        )


class _BatchNormActEagerFunction(torch.autograd.Function):
    """:class:`BatchNormActFunction` in the classic ``forward(ctx, ...)`` form (outside
    ``torch.func`` transforms: no ``inspect.signature`` binding on every call)."""

    @staticmethod
    def forward(
        ctx: Any, *inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs :meth:`BatchNormActFunction.forward` and its ``setup_context``."""
        output = BatchNormActFunction.forward(*inputs)
        BatchNormActFunction.setup_context(ctx, inputs, output)
        return output

    backward = BatchNormActFunction.backward


def fuses(backend: Backend, x: torch.Tensor, fused: bool = False) -> bool:
    """Whether ``backend`` runs the call on ``x`` itself (a FusedBackend).

    ``fused``: the call has an activation or a residual (else it is a plain batch norm).
    """
    supports = getattr(backend, "supports_fusion", None)
    return supports is not None and bool(supports(x, fused))


def batch_norm_act_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    activation: str | None,
    negative_slope: float,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    backend: Backend,
) -> FusedForwardResult:
    """Differentiable training-mode ``act(bn(x) + z)`` on ``(N, C, L)`` views.

    Args:
        x: input view ``(N, C, L)``.
        weight, bias: ``γ``, ``β`` of shape ``(C,)`` or ``None``.
        residual: ``z`` like ``x``, or ``None``.
        eps: added to the variance inside the square root.
        activation: ``None`` or one of ``relu``, ``leaky_relu``, ``silu``, ``gelu``.
        negative_slope: leaky ReLU's slope.
        running_mean, running_var, momentum: the running buffers and factor; a fusing backend
            returns the updated statistics, otherwise the result leaves them ``None``.
        backend: the backend.

    Returns:
        A :class:`FusedForwardResult`; gradients flow to ``x``, ``γ``, ``β`` and ``z``.
    """
    if fuses(backend, x, activation is not None or residual is not None):
        return backend.forward_act(  # type: ignore[attr-defined, no-any-return]
            x, weight, bias, residual, eps, activation, negative_slope, running_mean,
            running_var, momentum,
        )  # fmt: skip
    function = (
        BatchNormActFunction
        if torch._C._are_functorch_transforms_active()
        else _BatchNormActEagerFunction
    )
    y, mean, invstd, var = function.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, residual, eps, activation, negative_slope, backend.name
    )
    return FusedForwardResult(y, mean, invstd, var, None, None)
