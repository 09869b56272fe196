"""The contract every batch-norm backend implements, so tests and benchmarks loop over backends.

The contract: ``forward``/``backward`` on the ``(N, C, L)`` view of the input (``L`` = product
of the spatial sizes), whatever its strides, never touching running statistics (their update is
a separate, pure step: :func:`batchnorm.functional.running_update`).

Optional extras a backend may add, taken by the functional when present: ``inference`` (one
evaluation pass on the input as the caller has it, ``(N, C, *)``), ``forward_update`` (a whole
training call on ``(N, C, *)`` that autograd differentiates and that returns the new running
statistics, or ``None`` to decline; see ``AtenBackend.forward_update``) and
:class:`FusedBackend`.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from batchnorm._math import ACTIVATIONS

__all__ = [
    "ACTIVATIONS",
    "Backend",
    "ForwardResult",
    "FusedBackend",
    "FusedForwardResult",
    "channel_view",
    "compute_dtype",
    "normalize_with_running_stats",
]


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


class FusedForwardResult(NamedTuple):
    """Output of a fused training forward (:meth:`FusedBackend.forward_act`).

    Attributes:
        y: ``act(γ·x̂ + β + z)``, shape ``(N, C, L)``, dtype of the input.
        mean, invstd, var: the batch statistics, as in :class:`ForwardResult`.
        running_mean, running_var: the updated running statistics (new tensors, dtype of the
            buffers), or ``None`` when the backend leaves the update to the caller (no buffers
            given, or a backend that does not compute it).
    """

    y: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    var: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None


@runtime_checkable
class FusedBackend(Backend, Protocol):
    """A backend that also fuses activation and residual add: ``y = act(γ·x̂ + β + z)``.

    Optional extension of :class:`Backend` (backwards compatible: the functional layer checks
    for it and composes ``backend.forward`` + residual + activation in one autograd function
    for backends that lack it). Backward, through autograd::

        du = dy·act'(u),   dz = du,   (dx, dγ, dβ) = Backend.backward(du, …)

    ``activation`` is ``None`` or one of :data:`ACTIVATIONS`; ``negative_slope`` is leaky
    ReLU's slope.
    """

    def supports_fusion(self, x: torch.Tensor, fused: bool = False) -> bool:
        """Whether :meth:`forward_act`/:meth:`inference_act` take ``x`` (e.g. its dtype).

        ``fused`` says whether the call has an activation or a residual: a backend may take
        those where it leaves plain calls to :meth:`forward` (the ``cuda`` backend does).
        """
        ...

    def forward_act(
        self,
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
    ) -> FusedForwardResult:
        """Differentiable training forward on ``(N, C, L)`` views (``residual`` like ``x``)."""
        ...

    def inference_act(
        self,
        x: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        activation: str | None,
        negative_slope: float,
    ) -> torch.Tensor:
        """Evaluation forward from the running statistics on ``(N, C, L)`` views."""
        ...


def channel_view(input: torch.Tensor) -> torch.Tensor:
    """``input`` of shape ``(N, C, *)`` as ``(N, C, L)``, ``L`` the product of ``*`` (1 if none).

    A view whenever the strides allow (contiguous and channels-last inputs); ``L`` is computed
    explicitly so that empty batches (``N = 0``) reshape too.
    """
    spatial = math.prod(input.shape[2:])  # L
    return input.reshape(input.shape[0], input.shape[1], spatial)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and reductions use for an input dtype: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_with_running_stats(
    x3: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """Evaluation mode in torch ops: ``γ·(x − μ_run)·r + β``, ``r = 1 / sqrt(σ²_run + ε)``.

    Args:
        x3: the ``(N, C, L)`` view of the input.
        running_mean, running_var: the population estimates, ``(C,)``.
        weight, bias: ``γ``, ``β`` of shape ``(C,)``, or ``None``.
        eps: added to the variance inside the square root.

    Returns:
        ``(N, C, L)`` in the compute dtype (float32, or float64 for float64 input); the caller
        casts. Differentiable in every argument by autograd.
    """
    dtype = compute_dtype(x3.dtype)
    scale = torch.rsqrt(running_var.to(dtype) + eps)  # (C,)  r from population estimates
    if weight is not None:
        scale = scale * weight.to(dtype)  # (C,)  γ·r
    y3 = (x3.to(dtype) - running_mean.to(dtype)[None, :, None]) * scale[None, :, None]
    if bias is not None:
        y3 = y3 + bias.to(dtype)[None, :, None]  # (N, C, L)
    return y3
