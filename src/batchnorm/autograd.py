"""The autograd function that makes every backend differentiable with our own backward formula.

The function takes the ``(N, C, L)`` view and a backend (see :mod:`batchnorm.backends`), saves
only ``x`` (kept by autograd anyway), ``weight``, ``mean`` and ``invstd`` for backward, and never
touches running statistics. It follows the ``setup_context`` form with
``generate_vmap_rule = True``, so ``torch.func.vmap``/``grad`` work with the pure-torch backend.
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.backends import Backend, ForwardResult

__all__ = ["BatchNormTrainFunction", "batch_norm_train"]


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
        x, weight, bias, _eps, backend = inputs
        _y, mean, invstd, var = output
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.backend = backend
        ctx.bias_dtype = None if bias is None else bias.dtype
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
        x, weight, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = ctx.backend.backward(dy, x, weight, mean, invstd)
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        return (
            dx if needs_x else None,
            dweight.to(weight.dtype) if needs_weight else None,
            dbias.to(ctx.bias_dtype) if needs_bias else None,
            None,
            None,
        )


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
    outputs = BatchNormTrainFunction.apply(x, weight, bias, eps, backend)  # type: ignore[no-untyped-call]
    return ForwardResult(*outputs)
