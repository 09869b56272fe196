"""Freeze or unfreeze the statistics and affine parameters of every batch-norm layer of a model.

``freeze(model, stats=True)`` sets ``freeze_stats`` on every :class:`~batchnorm.BatchNormBase`
layer, so its running statistics stop changing whatever ``train()``/``eval()`` say (training
still normalizes with batch statistics); ``affine=True`` also stops the gradients of ``γ`` and
``β`` (``requires_grad=False``). ``unfreeze`` undoes each. ``torch.nn.BatchNorm*`` layers have
no statistics switch: convert them first (:func:`batchnorm.tools.convert`), or replace them by
:class:`~batchnorm.variants.frozen.FrozenBatchNorm2d`, which also normalizes with the stored
statistics in training. Frozen layers' statistics never change, whatever ``unfreeze`` says.
"""

from __future__ import annotations

from torch import nn

from batchnorm.modules import BatchNormBase
from batchnorm.tools.common import is_batchnorm
from batchnorm.variants.frozen import FrozenBatchNormBase

__all__ = ["freeze", "unfreeze"]


def _set(model: nn.Module, frozen: bool, stats: bool, affine: bool) -> nn.Module:
    """Shared body of :func:`freeze` and :func:`unfreeze` (checks every layer first)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = [(name or "model", m) for name, m in model.named_modules() if is_batchnorm(m)]
    if stats:
        foreign = [
            f"{name} ({type(m).__name__})" for name, m in layers if not isinstance(m, BatchNormBase)
        ]
        if foreign:
            raise TypeError(
                "stats: these layers have no freeze_stats switch (torch.nn batch norm): "
                + ", ".join(foreign)
                + "; convert them first with batchnorm.tools.convert(model, to='batchnorm')"
            )
    for _, layer in layers:
        if stats and not isinstance(layer, FrozenBatchNormBase):
            layer.freeze_stats = frozen
        if affine:
            for parameter in layer.parameters(recurse=False):
                parameter.requires_grad_(not frozen)
    return model


def freeze(model: nn.Module, stats: bool = True, affine: bool = False) -> nn.Module:
    """Stops the statistic updates (and optionally the affine gradients) of every batch norm.

    Args:
        model: changed in place.
        stats: set ``freeze_stats=True`` on every batch-norm layer. Default: True.
        affine: set ``requires_grad=False`` on every ``weight`` and ``bias``. Default: False.

    Returns:
        ``model``.

    Raises:
        TypeError: if ``model`` is not a module, or ``stats`` is asked for while a
            ``torch.nn`` batch norm is present (nothing is changed then).

    Examples:
        >>> from batchnorm import BatchNorm1d
        >>> net = freeze(nn.Sequential(nn.Linear(4, 4), BatchNorm1d(4)))
        >>> net[1].freeze_stats
        True
    """
    return _set(model, True, stats, affine)


def unfreeze(model: nn.Module, stats: bool = True, affine: bool = False) -> nn.Module:
    """Undoes :func:`freeze`: statistics update again, and with ``affine`` γ, β train again.

    Args:
        model: changed in place.
        stats: set ``freeze_stats=False`` on every batch-norm layer (frozen batch-norm layers
            stay frozen). Default: True.
        affine: set ``requires_grad=True`` on every ``weight`` and ``bias``. Default: False.

    Returns:
        ``model``.

    Raises:
        TypeError: as :func:`freeze`.
    """
    return _set(model, False, stats, affine)
