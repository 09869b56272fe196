"""Ghost Batch Normalization (Hoffer et al., 2017): statistics per virtual batch.

In training the batch of ``N`` samples is split along dim 0 into virtual batches of
``virtual_batch_size`` samples (the last one may be smaller); each is normalized with its own
mean and biased variance, as batch normalization would normalize it alone. The running
statistics then take one step per call towards the average over virtual batches, weighted by
their sizes ``n_k``, of what batch normalization would use for each of them::

    μ̄ = Σ_k n_k·μ_k / N,   v̄ = Σ_k n_k·σ²_k·M_k/(M_k − 1) / N       (M_k = n_k·L)
    running ← (1 − momentum)·running + momentum·(μ̄, v̄)

so with one virtual batch (``virtual_batch_size ≥ N``) this is exactly batch normalization.
Evaluation is plain batch normalization with the running statistics.

Reference:
    E. Hoffer, I. Hubara and D. Soudry, "Train longer, generalize better: closing the
    generalization gap in large batch training of neural networks", NeurIPS 2017.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from batchnorm._math import compute_dtype
from batchnorm.functional import BatchNormOutput, batch_norm_pure, running_update
from batchnorm.modules import BatchNormBase

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "GhostBatchNormBase"]


class GhostBatchNormBase(BatchNormBase):
    """Ghost batch normalization over dim 1 (see the module docstring for the math).

    Args:
        num_features: ``C``, the number of channels.
        virtual_batch_size: samples per virtual batch (keyword only, ≥ 1). Default: 32.
        eps, momentum, affine, track_running_stats, device, dtype: as :class:`BatchNormBase`.
        **kwargs: keyword-only options of :class:`BatchNormBase` (``bias``, ``backend``,
            ``freeze_stats``, ``nonfinite``).

    Raises:
        ValueError: if ``virtual_batch_size`` is not a positive int.

    References:
        E. Hoffer, I. Hubara and D. Soudry, "Train longer, generalize better", NeurIPS 2017.
    """

    _scriptable = False  # the per-virtual-batch loop has no TorchScript form

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        virtual_batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        if (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size < 1
        ):
            raise ValueError(
                f"virtual_batch_size: expected a positive int, got {virtual_batch_size!r}"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs
        )
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        """The base arguments plus ``virtual_batch_size``."""
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _normalize(
        self, input: torch.Tensor, use_batch_stats: bool, momentum: float
    ) -> BatchNormOutput:
        """Normalizes each virtual batch with its own statistics in training."""
        if not use_batch_stats:
            return super()._normalize(input, use_batch_stats, momentum)
        batch, channels = input.shape[0], input.shape[1]
        length = math.prod(input.shape[2:])  # L, values per sample and channel
        last = batch % self.virtual_batch_size or self.virtual_batch_size
        if batch > 0 and min(last, self.virtual_batch_size) * length == 1:
            raise ValueError(
                "Expected more than 1 value per channel in every virtual batch when training, "
                f"got a virtual batch of 1 sample of shape {tuple(input.shape[1:])} "
                f"(batch of {batch}, virtual_batch_size={self.virtual_batch_size})"
            )
        if batch <= self.virtual_batch_size:  # one virtual batch: plain batch norm, same path
            return super()._normalize(input, use_batch_stats, momentum)
        stats_dtype = compute_dtype(input.dtype)
        zeros = torch.zeros(channels, dtype=stats_dtype, device=input.device)  # (C,)
        ones = torch.ones(channels, dtype=stats_dtype, device=input.device)  # (C,)
        x3 = input.reshape(batch, channels, length)  # (N, C, L)
        outputs, means, variances, sizes = [], [], [], []
        for chunk in torch.split(x3, self.virtual_batch_size):  # (n_k, C, L) each
            # With momentum 1 the "new running statistics" are the chunk's own mean and
            # unbiased variance: (1 − 1)·running + 1·batch.
            result = batch_norm_pure(
                chunk, zeros, ones, self.weight, self.bias, True, 1.0, self.eps,
                backend=self.backend,
            )  # fmt: skip
            assert result.running_mean is not None
            assert result.running_var is not None
            outputs.append(result.output)
            means.append(result.running_mean)
            variances.append(result.running_var)
            sizes.append(chunk.shape[0])
        output = torch.cat(outputs).reshape(input.shape)  # (N, C, *)
        weights = torch.tensor(sizes, dtype=means[0].dtype, device=input.device) / batch  # (K,)
        mean = (weights[:, None] * torch.stack(means)).sum(0)  # (C,)  μ̄
        var = (weights[:, None] * torch.stack(variances)).sum(0)  # (C,)  v̄
        new_mean, new_var = self.running_mean, self.running_var
        if self.running_mean is not None and self.running_var is not None:
            new_mean = running_update(self.running_mean, mean, momentum)
            new_var = running_update(self.running_var, var, momentum)
        return BatchNormOutput(output, new_mean, new_var)


class GhostBatchNorm1d(GhostBatchNormBase, nn.BatchNorm1d):  # type: ignore[misc]
    """Ghost batch normalization of ``(N, C)`` or ``(N, C, L)`` input.

    Examples:
        >>> bn = GhostBatchNorm1d(100, virtual_batch_size=8)
        >>> bn(torch.randn(20, 100)).shape
        torch.Size([20, 100])
    """

    _allowed_dims = (2, 3)
    _shape_text = "(N, C) or (N, C, L)"


class GhostBatchNorm2d(GhostBatchNormBase, nn.BatchNorm2d):  # type: ignore[misc]
    """Ghost batch normalization of ``(N, C, H, W)`` input (see :class:`GhostBatchNormBase`)."""

    _allowed_dims = (4,)
    _shape_text = "(N, C, H, W)"


class GhostBatchNorm3d(GhostBatchNormBase, nn.BatchNorm3d):  # type: ignore[misc]
    """Ghost batch normalization of ``(N, C, D, H, W)`` input (see :class:`GhostBatchNormBase`)."""

    _allowed_dims = (5,)
    _shape_text = "(N, C, D, H, W)"
