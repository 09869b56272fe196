"""NumPy backend: the float64 reference (:mod:`batchnorm.reference`) behind the backend contract.

Slow and CPU-only; it exists so that every test and benchmark that loops over backends also
checks the reference through the same autograd function and modules.
"""

from __future__ import annotations

import numpy as np
import torch

from batchnorm import reference
from batchnorm.backends.base import Backend, ForwardResult, Gradients, Saved, compute_dtype

__all__ = ["NumpyBackend"]


def _to_float64(t: torch.Tensor | None, size: int, fill: float) -> np.ndarray:
    """A detached float64 NumPy copy of ``t``, or ``size`` copies of ``fill`` if ``t`` is None."""
    if t is None:
        return np.full(size, fill, dtype=np.float64)
    return t.detach().cpu().to(torch.float64).numpy()


def _to_torch(array: np.ndarray, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``array`` as a tensor of ``dtype`` on the device of ``like``."""
    return torch.from_numpy(array).to(device=like.device, dtype=dtype)


class NumpyBackend(Backend):
    """Runs :func:`batchnorm.reference.forward`/``backward`` in float64 (see :class:`Backend`)."""

    name = "numpy"

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> ForwardResult:
        """Training-mode forward on the ``(N, C, L)`` view; see :class:`Backend`."""
        channels = x.shape[1]
        stats_dtype = compute_dtype(x.dtype)
        if x.shape[0] * x.shape[2] == 0:
            zeros = torch.zeros(channels, dtype=stats_dtype, device=x.device)  # (C,)
            return ForwardResult(torch.empty_like(x), zeros, torch.rsqrt(zeros + eps), zeros)
        y, cache = reference.forward(
            _to_float64(x, 0, 0.0),
            _to_float64(weight, channels, 1.0),
            _to_float64(bias, channels, 0.0),
            eps,
        )
        return ForwardResult(
            _to_torch(y, x, x.dtype),
            _to_torch(cache.mean, x, stats_dtype),
            _to_torch(cache.invstd, x, stats_dtype),
            _to_torch(cache.var, x, stats_dtype),
        )

    def backward(self, dy: torch.Tensor, saved: Saved) -> Gradients:
        """Backward of :meth:`forward`; see :class:`Backend`."""
        x, weight, mean, invstd = saved
        channels = x.shape[1]
        stats_dtype = compute_dtype(x.dtype)
        if x.shape[0] * x.shape[2] == 0:
            zeros = torch.zeros(channels, dtype=stats_dtype, device=x.device)  # (C,)
            return Gradients(torch.zeros_like(x), zeros, zeros.clone())
        mean64 = _to_float64(mean, 0, 0.0)  # (C,)
        invstd64 = _to_float64(invstd, 0, 0.0)  # (C,)
        x_hat = (_to_float64(x, 0, 0.0) - mean64[None, :, None]) * invstd64[None, :, None]
        cache = reference.Cache(
            x_hat=x_hat,
            invstd=invstd64,
            weight=_to_float64(weight, channels, 1.0),
            mean=mean64,
            var=1.0 / invstd64**2,  # σ² + ε; backward does not read it
        )
        dx, dweight, dbias = reference.backward(_to_float64(dy, 0, 0.0), cache)
        return Gradients(
            _to_torch(dx, x, x.dtype),
            _to_torch(dweight, x, stats_dtype),
            _to_torch(dbias, x, stats_dtype),
        )
