"""Masked batch normalization for padded batches: statistics over the real positions only.

A batch of padded sequences ``(N, C, L)`` comes with a boolean ``mask`` of shape ``(N, L)``
(``True`` = a real value, ``False`` = padding). Per channel ``c``, over the ``M = Σ mask`` real
positions::

    μ  = Σ_real x / M,   σ² = Σ_real (x − μ)² / M,   y = γ·(x − μ)/sqrt(σ² + ε) + β   (real)
    y  = 0                                                                            (padding)

Padding never reaches the arithmetic (it is replaced by 0 before anything is computed), so
padded positions may hold anything, NaN included, and receive a gradient of exactly 0. The
running update uses the unbiased variance ``σ²·M / (M − 1)``, as the unmasked path does.

Written with ordinary torch operations (autograd supplies the backward), so it runs on every
device; the ``backend`` choice of the unmasked path does not apply here. The functional's
``mask=`` argument (:func:`batchnorm.functional.batch_norm`) and the modules' ``forward(x, mask)``
come here after their checks; ``batchnorm.variants.masked`` re-exports it.
"""

from __future__ import annotations

import math

import torch

from batchnorm._math import BatchNormOutput, compute_dtype, running_update

__all__ = ["check_mask", "masked_batch_norm_pure"]


def check_mask(input: torch.Tensor, mask: torch.Tensor) -> None:
    """Rejects a mask that does not mark the positions of ``input``'s values.

    Args:
        input: the checked input ``(N, C, *)``.
        mask: expected a ``torch.bool`` tensor of shape ``(N, *)`` (``input``'s shape without
            dim 1) on ``input``'s device.

    Raises:
        TypeError: if ``mask`` is not a boolean tensor.
        ValueError: if its shape is not ``input``'s shape without the channel dimension.
        RuntimeError: if it lives on another device than ``input``.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask: expected a torch.bool tensor (True = real value), got {got}")
    expected = (input.shape[0], *input.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask: expected shape {expected} (input shape {tuple(input.shape)} without the "
            f"channel dimension), got {tuple(mask.shape)}"
        )
    if mask.device != input.device:
        raise RuntimeError(
            f"mask: expected a tensor on {input.device} (the device of input), "
            f"got one on {mask.device}"
        )


def masked_batch_norm_pure(
    input: torch.Tensor,
    mask: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> BatchNormOutput:
    """Batch normalization of the real positions of a padded batch; padding gives 0.

    The other arguments must already have passed
    :func:`batchnorm.functional.check_batch_norm_args`; this checks ``mask`` and the number of
    real values, then computes without side effects.

    Args:
        input: tensor ``(N, C, *)``.
        mask: ``torch.bool`` tensor ``(N, *)``; ``True`` marks a real value.
        running_mean, running_var: running buffers ``(C,)`` or ``None`` (required in
            evaluation).
        weight, bias: ``γ`` and ``β`` of shape ``(C,)`` or ``None``.
        training: use the statistics of the real positions (else the running ones).
        momentum: factor of the running-average update.
        eps: added to the variance inside the square root.

    Returns:
        A :class:`~batchnorm.functional.BatchNormOutput`; in training the running statistics
        are new tensors, unless the batch has no real value (then the given ones, unchanged,
        and an all-zero output).

    Raises:
        TypeError, ValueError, RuntimeError: from :func:`check_mask`, or (ValueError) if
            training sees exactly one real value per channel.
    """
    check_mask(input, mask)
    dtype = compute_dtype(input.dtype)
    batch, channels, length = input.shape[0], input.shape[1], math.prod(input.shape[2:])
    x3 = input.reshape(batch, channels, length)  # (N, C, L)
    real = mask.reshape(batch, 1, length)  # (N, 1, L)
    x_real = torch.where(real, x3.to(dtype), 0.0)  # (N, C, L)  padding → 0: NaN cannot leak
    new_mean, new_var = running_mean, running_var
    if training:
        count = int(mask.sum())  # M, real values per channel
        if count == 1:
            raise ValueError(
                "Expected more than 1 real value per channel when training, got 1 "
                f"(mask of shape {tuple(mask.shape)})"
            )
        if count == 0:  # nothing to normalize: all padding, statistics left as they are
            return BatchNormOutput(torch.zeros_like(input), running_mean, running_var)
        mean = x_real.sum(dim=(0, 2)) / count  # (C,)
        centered = torch.where(real, x_real - mean[None, :, None], 0.0)  # (N, C, L)
        var = centered.square().sum(dim=(0, 2)) / count  # (C,)  biased, two-pass
        x_hat = centered * torch.rsqrt(var + eps)[None, :, None]  # (N, C, L)
        with torch.no_grad():
            if running_mean is not None:
                new_mean = running_update(running_mean, mean, momentum)
            if running_var is not None:
                var_unbiased = var * (count / (count - 1))  # (C,)  Bessel's correction
                new_var = running_update(running_var, var_unbiased, momentum)
    else:
        assert running_mean is not None  # checked by check_batch_norm_args
        assert running_var is not None
        invstd = torch.rsqrt(running_var.to(dtype) + eps)  # (C,)
        x_hat = (x_real - running_mean.to(dtype)[None, :, None]) * invstd[None, :, None]
    y = x_hat if weight is None else x_hat * weight.to(dtype)[None, :, None]  # (N, C, L)
    if bias is not None:
        y = y + bias.to(dtype)[None, :, None]  # (N, C, L)
    y = torch.where(real, y, 0.0)  # (N, C, L)  padded outputs are 0, their gradient too
    return BatchNormOutput(y.to(input.dtype).reshape(input.shape), new_mean, new_var)
