"""What the tools count as a batch-norm layer, in one place."""

from __future__ import annotations

from torch import nn

from batchnorm.modules import BatchNormActBase, BatchNormBase

__all__ = ["has_channel_statistics", "is_batchnorm"]


def is_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-norm layer: ``torch.nn.BatchNorm*`` or one of ours."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, BatchNormBase))


def _is_plain_affine(module: nn.Module) -> bool:
    """Whether the layer's evaluation is the batch-norm map alone, with nothing after it.

    Not for fused layers: ours with an activation or a residual input (``BatchNormAct*``),
    in-place activated ones (which also use ``|γ| + ε_γ``), timm's ``BatchNormAct2d`` with an
    ``act`` or ``drop`` other than the identity.
    """
    if isinstance(module, BatchNormActBase) or getattr(module, "activation", None) is not None:
        return False
    if getattr(module, "weight_eps", None) is not None:
        return False
    for name in ("act", "drop"):
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and type(child) is not nn.Identity:
            return False
    return True


def has_channel_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a batch-norm layer with running statistics of shape ``(C,)``.

    Those are the layers whose evaluation is the per-channel affine map
    ``γ·(x − running_mean)/sqrt(running_var + ε) + β``; recurrent batch norm (one row of
    statistics per time step) and layers without ``track_running_stats`` are not.
    """
    if not is_batchnorm(module) or not _is_plain_affine(module):
        return False
    running_mean = getattr(module, "running_mean", None)
    running_var = getattr(module, "running_var", None)
    return (
        running_mean is not None
        and running_var is not None
        and running_mean.dim() == 1
        and running_var.dim() == 1
    )
