"""Pure-torch backend: vectorized, readable, and differentiable under ``torch.func`` transforms.

Statistics come from :func:`torch.var_mean`, which reduces with Welford's algorithm on the CPU,
so the variance stays accurate when ``|μ| ≫ σ``. Low-precision inputs (float16, bfloat16) are
upcast to float32 for every reduction and normalized in float32; the output is cast back.
"""

from __future__ import annotations

import torch

from batchnorm.backends.base import Backend, ForwardResult, Gradients, Saved, compute_dtype

__all__ = ["TorchBackend"]


def _per_channel(values: torch.Tensor) -> torch.Tensor:
    """Reshapes a ``(C,)`` tensor to ``(1, C, 1)`` so it broadcasts against ``(N, C, L)``."""
    return values[None, :, None]


class TorchBackend(Backend):
    """Batch normalization written with ordinary torch operations (see :class:`Backend`)."""

    name = "torch"

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> ForwardResult:
        """Training-mode forward on the ``(N, C, L)`` view; see :class:`Backend`."""
        dtype = compute_dtype(x.dtype)
        xf = x.to(dtype)  # (N, C, L), no copy when x already has the compute dtype
        count = x.shape[0] * x.shape[2]  # M = N·L
        if count == 0:
            # Empty batch: nothing to normalize, statistics undefined (never used: no update).
            zeros = xf.new_zeros(x.shape[1])  # (C,)
            return ForwardResult(torch.empty_like(x), zeros, torch.rsqrt(zeros + eps), zeros)
        var, mean = torch.var_mean(xf, dim=(0, 2), correction=0)  # (C,), (C,)  biased
        invstd = torch.rsqrt(var + eps)  # (C,)
        scale = invstd if weight is None else invstd * weight.to(dtype)  # (C,)  γ·r
        y = (xf - _per_channel(mean)) * _per_channel(scale)  # (N, C, L)
        if bias is not None:
            y = y + _per_channel(bias.to(dtype))  # (N, C, L)
        return ForwardResult(y.to(x.dtype), mean, invstd, var)

    def backward(self, dy: torch.Tensor, saved: Saved) -> Gradients:
        """Backward of :meth:`forward`; see :class:`Backend` for the three-term formula."""
        x, weight, mean, invstd = saved
        dtype = compute_dtype(x.dtype)
        dyf = dy.to(dtype)  # (N, C, L)
        count = x.shape[0] * x.shape[2]  # M = N·L
        x_hat = (x.to(dtype) - _per_channel(mean)) * _per_channel(invstd)  # (N, C, L)
        dbias = dyf.sum(dim=(0, 2))  # (C,)  dβ = Σ dy
        dweight = (dyf * x_hat).sum(dim=(0, 2))  # (C,)  dγ = Σ dy·x̂
        gain = invstd if weight is None else invstd * weight.to(dtype)  # (C,)  γ·r
        # dx = γ·r·(dy − dβ/M − x̂·dγ/M): the direct, mean and variance terms.
        mean_term = _per_channel(dbias / max(count, 1))  # (1, C, 1)
        variance_term = x_hat * _per_channel(dweight / max(count, 1))  # (N, C, L)
        dx = _per_channel(gain) * (dyf - mean_term - variance_term)  # (N, C, L)
        return Gradients(dx.to(x.dtype), dweight, dbias)
