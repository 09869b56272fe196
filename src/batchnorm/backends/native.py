"""A whole training forward in one backend call, differentiated by that backend's backward.

For backends whose forward kernel also moves the running buffers, ``aten::native_batch_norm``'s
contract (the ``cpu`` backend where its kernels run): :func:`native_forward_train` costs what
``F.batch_norm``'s forward does, where the generic path (:func:`batchnorm.autograd.train`) adds
views, scratch statistics and a separate update. Also the two helpers every autograd function
over a backend's primitives shares: what is saved for backward, and the backward itself (with
the ``create_graph`` recomputation of :func:`batchnorm._math.differentiable_grads`).
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm._math import differentiable_grads
from batchnorm.backends.base import Backend, Saved, channel_view

__all__ = ["backend_grads", "native_forward_train", "save_for_backend"]


def save_for_backend(
    ctx: Any,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    backend: Backend,
    eps: float,
) -> None:
    """Saves what :func:`backend_grads` needs: ``x``, ``γ``, ``β``, ``μ``, ``r``, the backend
    and ``ε`` (for a ``create_graph`` backward)."""
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.backend = backend
    ctx.eps = eps


def backend_grads(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dγ, dβ)`` from ``backend.backward``, ``None`` where autograd needs none."""
    x, weight, bias, mean, invstd = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = needs = tuple(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():  # create_graph: a differentiable graph, not the kernels
        return differentiable_grads(dy, (x, weight, bias), needs, ctx.eps)
    if x.dim() == 3:
        dx, dweight, dbias = ctx.backend.backward(dy, Saved(x, weight, mean, invstd))
    else:  # the input as the caller had it: the backend takes its (N, C, L) view
        x3, dy3 = channel_view(x), channel_view(dy)  # (N, C, L) each
        dx, dweight, dbias = ctx.backend.backward(dy3, Saved(x3, weight, mean, invstd))
        dx = dx.reshape(x.shape)  # (N, C, *), a view for the dense layouts
    return (
        dx if needs_x else None,
        dweight.to(weight.dtype) if needs_weight else None,
        dbias.to(bias.dtype) if needs_bias else None,
    )


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
        save_for_backend(ctx, x, weight, bias, mean, invstd, backend, eps)
        return y  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Returns ``(dx, dweight, dbias)`` from ``backend.backward``, None for the rest."""
        return (*backend_grads(ctx, dy), None, None, None, None, None)


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
    (:meth:`batchnorm.backends.cpu_backend.CpuBackend.native_forward` says when): the
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
