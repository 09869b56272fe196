"""Frozen batch normalization: a fixed per-channel affine map taken from trained statistics.

In both modes, with the stored ``running_mean`` ``μ``, ``running_var`` ``σ²``, ``weight`` ``γ``
and ``bias`` ``β``::

    y = γ·(x − μ) / sqrt(σ² + ε) + β

The statistics never change (``train()`` does not make the layer use or update batch
statistics), and ``γ``, ``β`` receive no gradient unless asked for (``requires_grad=True``):
the usual way to fine-tune a detector or segmenter on small per-device batches. ``γ`` and
``β`` are parameters with ``requires_grad=False`` (not buffers), so
:func:`batchnorm.tools.unfreeze` can make them trainable again; the ``state_dict`` keys are
those of ``torch.nn.BatchNorm*``, so checkpoints load both ways.

Deliberately *not* a subclass of ``torch.nn.modules.batchnorm._BatchNorm`` (nor are torchvision's
and timm's frozen layers): libraries that find batch norms that way retrain or reset them
(``torch.optim.swa_utils.update_bn`` resets the statistics, ``convert_sync_batchnorm`` and
``torch.func.replace_all_batch_norm_modules_`` make them batch statistics again), which would
undo the freezing. Those tools leave a frozen layer alone.

Reference:
    The layer of Detectron / torchvision's ``FrozenBatchNorm2d``; see also Y. Wu and K. He,
    "Group Normalization", ECCV 2018, §4 (frozen BN for small batches).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.functional import BatchNormOutput
from batchnorm.modules import BatchNormBase

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenBatchNormBase"]


class FrozenBatchNormBase(BatchNormBase):
    """Batch normalization with fixed statistics and (by default) fixed affine parameters.

    Args:
        num_features: ``C``, the number of channels.
        eps: added to the variance inside the square root. Default: 1e-5.
        device, dtype: of the parameters and buffers.
        requires_grad: let ``weight`` and ``bias`` receive gradients (keyword only).
            Default: False.
        **kwargs: keyword-only options of :class:`BatchNormBase` (``bias``, ``backend``).

    Examples:
        >>> frozen = FrozenBatchNorm2d.from_batchnorm(torch.nn.BatchNorm2d(16).eval())
        >>> frozen(torch.randn(2, 16, 4, 4)).shape
        torch.Size([2, 16, 4, 4])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        requires_grad: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, eps, 0.0, True, True, device, dtype, **kwargs)
        self.freeze_stats = True  # documents the behaviour; commits are disabled below
        for parameter in self.parameters(recurse=False):
            parameter.requires_grad_(requires_grad)

    @classmethod
    def from_batchnorm(
        cls, module: nn.Module, *, requires_grad: bool = False
    ) -> FrozenBatchNormBase:
        """A frozen copy of a ``torch.nn.BatchNorm*`` or :class:`BatchNormBase` module.

        Args:
            module: a batch-norm module with running statistics (``track_running_stats``).
            requires_grad: as in the constructor.

        Returns:
            A new frozen layer on the module's device and dtype, with copies of its
            statistics, ``weight`` (1 if absent) and ``bias`` (0 if absent).

        Raises:
            TypeError: if ``module`` is not a batch-norm module.
            ValueError: if it has no running statistics.
        """
        if not isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNormBase)):
            raise TypeError(f"module: expected a batch-norm module, got {type(module).__name__}")
        running_mean = getattr(module, "running_mean", None)
        running_var = getattr(module, "running_var", None)
        if running_mean is None or running_var is None or running_mean.dim() != 1:
            raise ValueError(
                f"module: expected running statistics of shape (C,) to freeze, "
                f"{type(module).__name__} has none (track_running_stats=False)"
            )
        frozen = cls(
            running_mean.shape[0],
            float(module.eps),
            device=running_mean.device,
            dtype=running_mean.dtype,
            requires_grad=requires_grad,
        )
        # Copies the statistics and whatever of weight/bias exists (else they stay 1 and 0).
        frozen.load_state_dict(module.state_dict(), strict=False)
        return frozen

    def extra_repr(self) -> str:
        """``num_features``, ``eps`` and whether the affine parameters are trainable."""
        requires_grad = self.weight is not None and self.weight.requires_grad
        return f"{self.num_features}, eps={self.eps}, requires_grad={requires_grad}"

    def _normalize(
        self, input: torch.Tensor, use_batch_stats: bool, momentum: float
    ) -> BatchNormOutput:
        """Normalizes with the stored statistics in both modes."""
        return super()._normalize(input, False, momentum)

    def _commit_running_stats(self, result: BatchNormOutput) -> None:
        """Does nothing: the statistics of a frozen layer never change."""

    def _scripted(self, input: torch.Tensor) -> torch.Tensor:
        """The TorchScript form: the stored statistics in both modes."""
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class FrozenBatchNorm1d(FrozenBatchNormBase):
    """Frozen batch normalization of ``(N, C)`` or ``(N, C, L)`` input."""

    _allowed_dims = (2, 3)
    _shape_text = "(N, C) or (N, C, L)"


class FrozenBatchNorm2d(FrozenBatchNormBase):
    """Frozen batch normalization of ``(N, C, H, W)`` input (see :class:`FrozenBatchNormBase`)."""

    _allowed_dims = (4,)
    _shape_text = "(N, C, H, W)"


class FrozenBatchNorm3d(FrozenBatchNormBase):
    """Frozen batch normalization of ``(N, C, D, H, W)`` input."""

    _allowed_dims = (5,)
    _shape_text = "(N, C, D, H, W)"
