"""NumPy reference of batch normalization: the math, written to be read.

This module is the independent yardstick every other backend is tested against. It favours
clarity over speed and is meant to be read in one sitting next to ``docs/derivation.md``.

The three steps of Ioffe & Szegedy (2015), Algorithm 1, per channel ``c`` over the ``M = N·L``
values of a mini-batch (``L`` is the product of the spatial sizes, 1 for ``(N, C)`` input)::

    1. statistics   μ = Σ x / M                 σ² = Σ (x − μ)² / M        (biased variance)
    2. normalize    x̂ = (x − μ) / sqrt(σ² + ε)
    3. scale/shift  y = γ·x̂ + β

Backward, with ``r = 1 / sqrt(σ² + ε)`` ("invstd")::

    dβ = Σ dy
    dγ = Σ dy·x̂
    dx = (γ·r / M)·(M·dy − dβ − x̂·dγ)

The variance is computed in two passes (mean first, then the mean of squared deviations), never as
``E[x²] − E[x]²``, which cancels catastrophically when ``|μ| ≫ σ``.

References:
    S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift", ICML 2015, arXiv:1502.03167.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["Cache", "backward", "forward", "update_running"]

FloatArray = NDArray[np.floating]


@dataclass(frozen=True)
class Cache:
    """What the forward pass keeps for the backward pass.

    Attributes:
        x_hat: normalized input, shape ``(N, C, *)``.
        invstd: ``1 / sqrt(σ² + ε)`` per channel, shape ``(C,)``.
        weight: ``γ`` per channel, shape ``(C,)``.
        mean: batch mean ``μ`` per channel, shape ``(C,)``.
        var: biased batch variance ``σ²`` per channel, shape ``(C,)``.
    """

    x_hat: FloatArray
    invstd: FloatArray
    weight: FloatArray
    mean: FloatArray
    var: FloatArray


def _channel_view(x: FloatArray) -> FloatArray:
    """Returns ``x`` of shape ``(N, C, *)`` as ``(N, C, L)`` with ``L`` the product of ``*``."""
    if x.ndim < 2:
        raise ValueError(f"x: expected an array of shape (N, C, *), got shape {x.shape}")
    return x.reshape(x.shape[0], x.shape[1], -1)


def forward(
    x: FloatArray, weight: FloatArray, bias: FloatArray, eps: float = 1e-5
) -> tuple[FloatArray, Cache]:
    """Training-mode forward pass: normalize with the statistics of this batch.

    Args:
        x: input of shape ``(N, C, *)``, float32 or float64.
        weight: ``γ``, shape ``(C,)``.
        bias: ``β``, shape ``(C,)``.
        eps: added to the variance inside the square root.

    Returns:
        ``(y, cache)``: ``y`` has the shape and dtype of ``x``; ``cache`` holds what
        :func:`backward` needs plus the batch mean and biased variance for
        :func:`update_running`.

    Raises:
        ValueError: if ``x`` has fewer than two dimensions or ``weight``/``bias`` do not have
            one value per channel.
    """
    x3 = _channel_view(x)  # (N, C, L)
    n_channels = x3.shape[1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param.shape != (n_channels,):
            raise ValueError(f"{name}: expected shape ({n_channels},), got {param.shape}")
    # Step 1: statistics over the batch and spatial axes.
    mean = x3.mean(axis=(0, 2))  # (C,)
    centered = x3 - mean[None, :, None]  # (N, C, L)
    var = (centered**2).mean(axis=(0, 2))  # (C,)  biased: divides by M
    # Step 2: normalize.
    invstd = 1.0 / np.sqrt(var + eps)  # (C,)
    x_hat = centered * invstd[None, :, None]  # (N, C, L)
    # Step 3: scale and shift.
    y = weight[None, :, None] * x_hat + bias[None, :, None]  # (N, C, L)
    cache = Cache(x_hat=x_hat.reshape(x.shape), invstd=invstd, weight=weight, mean=mean, var=var)
    return y.reshape(x.shape).astype(x.dtype, copy=False), cache


def backward(dy: FloatArray, cache: Cache) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Backward pass of :func:`forward` (derivation in ``docs/derivation.md``).

    Args:
        dy: gradient of the loss with respect to ``y``, shape ``(N, C, *)``.
        cache: the cache returned by :func:`forward` for the same batch.

    Returns:
        ``(dx, dweight, dbias)`` with the shapes of ``x``, ``weight`` and ``bias``.

    Raises:
        ValueError: if ``dy`` does not have the shape of the forward input.
    """
    if dy.shape != cache.x_hat.shape:
        raise ValueError(f"dy: expected shape {cache.x_hat.shape}, got {dy.shape}")
    dy3 = _channel_view(dy)  # (N, C, L)
    x_hat = _channel_view(cache.x_hat)  # (N, C, L)
    count = dy3.shape[0] * dy3.shape[2]  # M = N·L
    dbias = dy3.sum(axis=(0, 2))  # (C,)  dβ = Σ dy
    dweight = (dy3 * x_hat).sum(axis=(0, 2))  # (C,)  dγ = Σ dy·x̂
    # dx = (γ·r / M)·(M·dy − dβ − x̂·dγ): the direct term, the mean term, the variance term.
    direct_term = count * dy3  # (N, C, L)
    mean_term = dbias[None, :, None]  # (1, C, 1)
    variance_term = x_hat * dweight[None, :, None]  # (N, C, L)
    scale = (cache.weight * cache.invstd / count)[None, :, None]  # (1, C, 1)
    dx = scale * (direct_term - mean_term - variance_term)  # (N, C, L)
    return dx.reshape(dy.shape).astype(dy.dtype, copy=False), dweight, dbias


def update_running(
    running_mean: FloatArray,
    running_var: FloatArray,
    mean: FloatArray,
    var_biased: FloatArray,
    count: int,
    momentum: float | None,
    num_batches_tracked: int,
) -> tuple[FloatArray, FloatArray, int]:
    """Moves the population estimates towards this batch's statistics; pure (returns new arrays).

    ``running ← (1 − m)·running + m·batch`` with the *unbiased* batch variance
    ``σ²·M / (M − 1)`` (Bessel's correction). With ``momentum=None`` the factor is
    ``m = 1 / num_batches_tracked`` after counting this batch, i.e. the cumulative average of
    all batches seen, as in ``torch.nn.BatchNorm*``.

    Args:
        running_mean: current running mean, shape ``(C,)``.
        running_var: current running (unbiased) variance, shape ``(C,)``.
        mean: batch mean, shape ``(C,)``.
        var_biased: biased batch variance, shape ``(C,)``.
        count: ``M``, the number of values per channel in the batch (must be > 1).
        momentum: exponential-average factor, or ``None`` for the cumulative average.
        num_batches_tracked: batches counted before this one.

    Returns:
        ``(new_running_mean, new_running_var, new_num_batches_tracked)``.

    Raises:
        ValueError: if ``count < 2`` (the unbiased variance is undefined).
    """
    if count < 2:
        raise ValueError(f"count: expected more than 1 value per channel, got {count}")
    batches = num_batches_tracked + 1
    factor = 1.0 / batches if momentum is None else momentum
    var_unbiased = var_biased * count / (count - 1)  # (C,)
    new_mean = (1.0 - factor) * running_mean + factor * mean  # (C,)
    new_var = (1.0 - factor) * running_var + factor * var_unbiased  # (C,)
    return (
        new_mean.astype(running_mean.dtype, copy=False),
        new_var.astype(running_var.dtype, copy=False),
        batches,
    )
