"""Swap batch-norm layers between ``torch.nn.BatchNorm*d`` and ``batchnorm.BatchNorm*d``.

The new layer takes over the very ``Parameter`` and buffer objects of the old one (so an
optimizer built on the model keeps working, and values are bit-identical), its train/eval flag,
device and dtype. A layer whose behaviour the target class cannot express is refused with an
error rather than silently simplified: a subclass (renormalization, ghost, frozen, recurrent,
synchronized, fused-activation layers), ``freeze_stats``, a non-default ``nonfinite`` policy,
registered hooks, or ``bias=False`` where the installed torch lacks it.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from torch import nn

from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from batchnorm.tools.common import is_batchnorm

__all__ = ["convert"]

_TO_OURS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}
_TO_TORCH: dict[type[nn.Module], type[nn.Module]] = {
    BatchNorm1d: nn.BatchNorm1d,
    BatchNorm2d: nn.BatchNorm2d,
    BatchNorm3d: nn.BatchNorm3d,
}
_TARGETS = ("batchnorm", "torch")


def _torch_has_bias_option() -> bool:
    """Whether this torch's ``nn.BatchNorm*`` accepts ``bias=`` (added after torch 2.3)."""
    return "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def _refusal(name: str, module: nn.Module, to: str) -> str | None:
    """Why ``module`` cannot be converted to ``to`` without losing behaviour, or ``None``."""
    kind = type(module).__name__
    target_library = BatchNormBase if to == "batchnorm" else nn.modules.batchnorm._BatchNorm
    if isinstance(module, target_library):
        return None  # already of the target library: left alone
    table = _TO_OURS if to == "batchnorm" else _TO_TORCH
    if type(module) not in table:
        return (
            f"{name} ({kind}) adds behaviour that {to!r} batch norm cannot express; "
            "leave it as it is or replace it by hand"
        )
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return f"{name} ({kind}) has hooks registered, which the new layer would not have"
    if to == "torch":
        if getattr(module, "freeze_stats", False):
            return f"{name} ({kind}) has freeze_stats=True, which torch.nn batch norm lacks"
        if getattr(module, "nonfinite", "propagate") != "propagate":
            return (
                f"{name} ({kind}) has nonfinite={module.nonfinite!r}, which "
                "torch.nn batch norm lacks"
            )
        has_weight = getattr(module, "weight", None) is not None
        if has_weight and module.bias is None and not _torch_has_bias_option():
            return f"{name} ({kind}) has bias=False, which this torch version lacks"
    return None


def _swap(module: nn.Module, to: str) -> nn.Module:
    """A layer of the target kind that owns ``module``'s parameters and buffers."""
    target = (_TO_OURS if to == "batchnorm" else _TO_TORCH).get(type(module))
    if target is None:
        return module  # not of the source library: left alone (checked by _refusal)
    old: Any = module  # torch's and our batch norms share these attributes
    options = {"bias": old.bias is not None} if old.weight is not None else {}
    new = target(
        int(old.num_features),
        eps=float(old.eps),
        momentum=old.momentum,
        affine=bool(old.affine),
        track_running_stats=bool(old.track_running_stats),
        device="meta",
        **options,
    )
    for name, parameter in module.named_parameters(recurse=False):
        setattr(new, name, parameter)
    for name, buffer in module.named_buffers(recurse=False):
        setattr(new, name, buffer)
    new.train(module.training)
    return new


def convert(model: nn.Module, to: str = "batchnorm", *, inplace: bool = False) -> nn.Module:
    """Replaces every batch-norm layer of ``model`` by its equivalent of the other library.

    ``to="batchnorm"``: ``torch.nn.BatchNorm1d/2d/3d`` → :class:`batchnorm.BatchNorm1d/2d/3d`;
    ``to="torch"``: the reverse. Layers already of the target kind are left alone. Every layer
    is checked before any is swapped, so a refused call changes nothing.

    Args:
        model: the model (or a single batch-norm layer).
        to: ``"batchnorm"`` or ``"torch"``.
        inplace: swap inside ``model`` itself (the same parameter objects); otherwise a deep
            copy is converted and ``model`` is left untouched. Default: False.

    Returns:
        The converted model: ``model`` itself when ``inplace`` unless ``model`` is a batch-norm
        layer (then its replacement).

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, or a layer would lose behaviour
            (a subclass, ``freeze_stats``, ``nonfinite``, hooks, an unsupported option); the
            message names the layer.
        ValueError: if ``to`` is not ``"batchnorm"`` or ``"torch"``.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> type(convert(net)[1]).__name__
        'BatchNorm2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if to not in _TARGETS:
        raise ValueError(f"to: expected one of {_TARGETS}, got {to!r}")
    problems = [
        problem
        for name, module in model.named_modules()
        if is_batchnorm(module) and (problem := _refusal(name or "model", module, to)) is not None
    ]
    if problems:
        raise TypeError("convert: refusing to drop behaviour: " + "; ".join(problems))
    if not inplace:
        model = copy.deepcopy(model)
    if is_batchnorm(model):
        return _swap(model, to)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            swapped = _swap(child, to)
            if swapped is not child:
                setattr(parent, child_name, swapped)
    return model
