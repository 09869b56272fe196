"""The generic path: every backend's primitives made into whole, differentiable calls.

:func:`train` and :func:`evaluate` are what :mod:`batchnorm.functional` calls: a backend's own
whole-call method (:meth:`~batchnorm.backends.base.Backend.train`) where it has one, else the
composition below of its ``forward``/``backward`` primitives, the running update and, for
a fused call, the residual add and the activation.

The autograd function takes the ``(N, C, L)`` view and a backend (see :mod:`batchnorm.backends`),
saves only ``x`` (kept by autograd anyway), ``weight``, ``mean`` and ``invstd`` for backward,
and never touches running statistics. It follows the ``setup_context`` form with
``generate_vmap_rule = True``, so ``torch.func.vmap``/``grad`` work with the pure-torch backend.

Fused activation and residual add, ``y = act(γ·x̂ + β + z)``: a backend that fuses them in its
kernels (Triton) does so in its own ``train``; for the others :class:`BatchNormActFunction`
composes ``backend.forward``, the residual add and the activation in one autograd node whose
backward is one pass: ``du = dy·act'(u)``, ``dz = du``, ``(dx, dγ, dβ) = backend.backward(du, …)``.

Higher derivatives: a backward with ``create_graph`` (double backward, gradient penalties) does not
call the backend's kernels, whose results carry no graph through the saved statistics; it
recomputes the forward in torch operations and differentiates that
(:func:`batchnorm._math.differentiable_grads`).
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm import _compat
from batchnorm._math import (
    BatchNormOutput,
    activation_derivative,
    add_and_activate,
    compute_dtype,
    differentiable_grads,
    new_running_stats,
)
from batchnorm.backends import Backend, ForwardResult
from batchnorm.backends.base import Call, Saved, channel_view, normalize_with_running_stats
from batchnorm.backends.native import backend_grads, save_for_backend

__all__ = [
    "BatchNormActFunction",
    "BatchNormTrainFunction",
    "batch_norm_train",
    "evaluate",
    "train",
]


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
        save_for_backend(ctx, x, weight, bias, mean, invstd, backend, eps)
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
        return (*backend_grads(ctx, dy), None, None)


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
        BatchNormTrainFunction if _compat.functorch_active() else _BatchNormTrainEagerFunction
    )
    outputs = function.apply(x, weight, bias, eps, backend)  # type: ignore[no-untyped-call]
    return ForwardResult(*outputs)


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
        backend: Backend,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Runs the backend's forward, adds ``residual`` and applies ``activation``."""
        result = backend.forward(x, weight, bias, eps)
        y = add_and_activate(result.y, residual, activation, negative_slope)  # (N, C, L)
        return y, result.mean, result.invstd, result.var

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        """Saves ``x``, ``γ``, ``β``, ``z``, ``μ`` and ``r`` for :meth:`backward`."""
        x, weight, bias, residual, eps, activation, negative_slope, backend = inputs
        _y, mean, invstd, var = output
        ctx.save_for_backward(x, weight, bias, residual, mean, invstd)
        ctx.eps = eps
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        ctx.backend = backend
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
            grads = differentiable_grads(
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
        dx, dweight, dbias = ctx.backend.backward(du, Saved(x, weight, mean, invstd))
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


def train(backend: Backend, call: Call) -> BatchNormOutput:
    """The whole training call on ``backend``: its own :meth:`~Backend.train`, else ours.

    The generic path, for the calls a backend leaves to it: our autograd function over the
    backend's ``forward``/``backward`` on the ``(N, C, L)`` view (:func:`batch_norm_train`), or
    for a fused call one node that adds the residual and applies the activation after
    ``backend.forward`` (:class:`BatchNormActFunction`); then the running update
    (:func:`batchnorm._math.new_running_stats`), as new tensors.

    Args:
        backend: the resolved backend.
        call: the checked call.

    Returns:
        The output like ``call.input`` and the new running statistics.
    """
    result = backend.train(call)
    if result is not None:
        return result
    x3 = channel_view(call.input)  # (N, C, L), a view when possible
    if call.fusion is None:
        forward = batch_norm_train(x3, call.weight, call.bias, call.eps, backend)
        y3, mean, var = forward.y, forward.mean, forward.var
    else:
        fusion = call.fusion
        z3 = None if fusion.residual is None else channel_view(fusion.residual)  # (N, C, L)
        function = (
            BatchNormActFunction if _compat.functorch_active() else _BatchNormActEagerFunction
        )
        y3, mean, _invstd, var = function.apply(  # type: ignore[no-untyped-call]
            x3, call.weight, call.bias, z3, call.eps, fusion.activation, fusion.negative_slope,
            backend,
        )  # fmt: skip
    count = x3.shape[0] * x3.shape[2]  # M = N·L
    new_mean, new_var = new_running_stats(
        call.running_mean, call.running_var, mean, var, count, call.momentum
    )
    return BatchNormOutput(y3.reshape(call.input.shape), new_mean, new_var)


def evaluate(backend: Backend, call: Call) -> torch.Tensor:
    """The whole evaluation call on ``backend``: its own :meth:`~Backend.evaluate`, else ours.

    The generic path: ``γ·(x − μ̄)/sqrt(σ̄² + ε) + β`` from the running statistics in torch
    operations (differentiable by autograd and ``torch.func``), rounded to the input's dtype,
    then ``+ residual`` and the activation for a fused call.

    Args:
        backend: the resolved backend.
        call: the checked call (running statistics given).

    Returns:
        The output like ``call.input``.
    """
    y = backend.evaluate(call)
    if y is not None:
        return y
    assert call.running_mean is not None  # checked by check_batch_norm_args
    assert call.running_var is not None
    x3 = channel_view(call.input)  # (N, C, L), a view when possible
    u3 = normalize_with_running_stats(
        x3, call.running_mean, call.running_var, call.weight, call.bias, call.eps
    )  # (N, C, L) in the compute dtype
    if call.fusion is None:
        return u3.to(call.input.dtype).reshape(call.input.shape)
    fusion = call.fusion
    z3 = None if fusion.residual is None else channel_view(fusion.residual)  # (N, C, L)
    y3 = add_and_activate(u3.to(call.input.dtype), z3, fusion.activation, fusion.negative_slope)
    return y3.reshape(call.input.shape)
