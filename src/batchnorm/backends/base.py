"""The contract every batch-norm backend implements, so tests and benchmarks loop over backends.

A backend works on the ``(N, C, L)`` view of the input (``L`` = product of the spatial sizes),
whatever its strides, and never updates running statistics itself: that is a separate, pure step
(:func:`batchnorm.functional.running_update`).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

__all__ = ["Backend", "ForwardResult", "compute_dtype"]


class ForwardResult(NamedTuple):
    """Output of a training-mode forward pass.

    Attributes:
        y: normalized, scaled and shifted output, shape ``(N, C, L)``, dtype of the input.
        mean: batch mean per channel, shape ``(C,)``, float32 (float64 for float64 input).
        invstd: ``1 / sqrt(σ² + ε)`` per channel, same shape and dtype as ``mean``; saved for
            backward together with ``mean``.
        var: biased batch variance ``σ²`` per channel, same shape and dtype as ``mean``; used
            only by the running-statistics update (recovering it from ``invstd`` would lose
            precision when ``σ² ≪ ε``).
    """

    y: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    var: torch.Tensor


class Backend(Protocol):
    """Training-mode batch normalization on the ``(N, C, L)`` view.

    Math (design.md §2), per channel over the ``M = N·L`` values::

        μ = Σ x / M,  σ² = Σ (x − μ)² / M,  r = 1 / sqrt(σ² + ε),  x̂ = (x − μ)·r,  y = γ·x̂ + β
        dβ = Σ dy,  dγ = Σ dy·x̂,  dx = (γ·r / M)·(M·dy − dβ − x̂·dγ)

    ``weight`` (γ) and ``bias`` (β) may be ``None``, meaning 1 and 0.
    """

    name: str

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> ForwardResult:
        """Normalizes ``x`` of shape ``(N, C, L)`` with its own batch statistics."""
        ...

    def backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(dx, dweight, dbias)``: ``dx`` like ``x``, the others ``(C,)`` float32/64."""
        ...


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and reductions use for an input dtype: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
