"""The contract every batch-norm backend implements, so tests and benchmarks loop over backends.

:class:`Backend`: the primitives ``forward``/``backward`` on the ``(N, C, L)`` view of the input
(``L`` = product of the spatial sizes), whatever its strides, never touching running statistics;
and the whole-call methods ``train``/``evaluate`` on a checked :class:`Call`, which a fast
backend overrides (running update included) and the others leave to the generic path of
:mod:`batchnorm.autograd`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from batchnorm._math import ACTIVATIONS, BatchNormOutput, compute_dtype

__all__ = [
    "ACTIVATIONS",
    "Backend",
    "BatchNormOutput",
    "Call",
    "ForwardResult",
    "FusedForwardResult",
    "Fusion",
    "Gradients",
    "Saved",
    "channel_view",
    "compute_dtype",
    "normalize_with_running_stats",
    "plain_evaluation",
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


class Saved(NamedTuple):
    """What a training forward keeps for its backward (:meth:`Backend.backward`).

    Attributes:
        x: the input's ``(N, C, L)`` view.
        weight: ``γ`` ``(C,)`` or ``None`` (1).
        mean: the batch mean ``μ`` ``(C,)``, float32 (float64 for float64 input).
        invstd: ``r = 1 / sqrt(σ² + ε)`` ``(C,)``, same dtype as ``mean``.
    """

    x: torch.Tensor
    weight: torch.Tensor | None
    mean: torch.Tensor
    invstd: torch.Tensor


class Gradients(NamedTuple):
    """What :meth:`Backend.backward` returns.

    Attributes:
        dx: like ``x``, its dtype.
        dweight: ``dγ = Σ dy·x̂`` ``(C,)``, float32 (float64 for float64 input).
        dbias: ``dβ = Σ dy`` ``(C,)``, same dtype as ``dweight``.
    """

    dx: torch.Tensor
    dweight: torch.Tensor
    dbias: torch.Tensor


class Fusion(NamedTuple):
    """What a fused call adds after the normalization: ``y = act(bn(x) + residual)``.

    Attributes:
        activation: ``None`` or one of :data:`ACTIVATIONS`.
        negative_slope: leaky ReLU's slope for negative inputs.
        residual: ``z``, a tensor like the input, or ``None``.
    """

    activation: str | None
    negative_slope: float
    residual: torch.Tensor | None


class Call(NamedTuple):
    """One checked batch-norm call, as :mod:`batchnorm.functional` hands it to a backend.

    Attributes:
        input: ``(N, C, *)`` as the caller has it (any memory format).
        running_mean, running_var: the buffers ``(C,)`` or ``None``; never modified unless
            ``update_in_place``.
        weight, bias: ``γ``, ``β`` ``(C,)`` or ``None`` (1 and 0).
        momentum: the running-average factor of this step (training).
        eps: added to the variance inside the square root.
        fusion: the activation and residual of a fused call, ``None`` for plain batch norm.
        update_in_place: the caller (``batch_norm``, every argument checked) lets the backend
            move the given buffers themselves instead of returning new ones.
    """

    input: torch.Tensor
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    momentum: float
    eps: float
    fusion: Fusion | None
    update_in_place: bool


class Backend:
    """The contract of a backend: two primitives and one method per mode for the whole call.

    Math (design.md §2), per channel over the ``M = N·L`` values::

        μ = Σ x / M,  σ² = Σ (x − μ)² / M,  r = 1 / sqrt(σ² + ε),  x̂ = (x − μ)·r,  y = γ·x̂ + β
        dβ = Σ dy,  dγ = Σ dy·x̂,  dx = (γ·r / M)·(M·dy − dβ − x̂·dγ)

    ``weight`` (γ) and ``bias`` (β) may be ``None``, meaning 1 and 0.

    Every backend implements the primitives :meth:`forward` and :meth:`backward` on the
    ``(N, C, L)`` view. The whole-call methods :meth:`train` and :meth:`evaluate` take a checked
    :class:`Call` (plain or fused) and return its result; the base class returns ``None``,
    which hands the call to the generic path of :mod:`batchnorm.autograd` (our autograd
    function over the two primitives, the running update, the residual add and activation in
    torch operations). A fast backend overrides them for the calls it runs itself, running
    update included, and returns ``None`` for the rest.
    """

    name: str = "base"

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> ForwardResult:
        """Normalizes ``x`` of shape ``(N, C, L)`` with its own batch statistics."""
        raise NotImplementedError

    def backward(self, dy: torch.Tensor, saved: Saved) -> Gradients:
        """The gradients of :meth:`forward` for ``dy`` ``(N, C, L)``, from what it saved."""
        raise NotImplementedError

    def train(self, call: Call) -> BatchNormOutput | None:
        """The whole training call (batch statistics, new running statistics), or ``None``.

        Returns:
            The output like ``call.input`` (differentiable with respect to the input, weight,
            bias and residual) and the new running statistics (the given buffers themselves
            when moved in place, or when the batch is empty); ``None`` to leave the call to
            the generic path.
        """
        return None

    def evaluate(self, call: Call) -> torch.Tensor | None:
        """The whole evaluation call from the running statistics, or ``None`` (generic path).

        Returns:
            The output like ``call.input``, differentiable with respect to the input, weight,
            bias and residual.
        """
        return None


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


def plain_evaluation(inference: Callable[..., torch.Tensor], call: Call) -> torch.Tensor | None:
    """A plain call's evaluation by a backend's one-pass ``inference(x, γ, β, μ̄, σ̄², ε)``
    (on the input as the caller has it); ``None`` for a fused call (the generic path)."""
    if call.fusion is not None:
        return None
    assert call.running_mean is not None  # checked by check_batch_norm_args
    assert call.running_var is not None
    return inference(
        call.input, call.weight, call.bias, call.running_mean, call.running_var, call.eps
    )


def channel_view(input: torch.Tensor) -> torch.Tensor:
    """``input`` of shape ``(N, C, *)`` as ``(N, C, L)``, ``L`` the product of ``*`` (1 if none).

    A view whenever the strides allow (contiguous and channels-last inputs); ``L`` is computed
    explicitly so that empty batches (``N = 0``) reshape too.
    """
    spatial = math.prod(input.shape[2:])  # L
    return input.reshape(input.shape[0], input.shape[1], spatial)


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
