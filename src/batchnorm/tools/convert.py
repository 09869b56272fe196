"""Swap batch-norm layers between ``torch.nn.BatchNorm*d`` and ``batchnorm.BatchNorm*d``.

The new layer takes over the very ``Parameter`` and buffer objects of the old one (so an
optimizer built on the model keeps working, and values are bit-identical), its train/eval flag,
device and dtype. A layer whose behaviour the target class cannot express is refused with an
error rather than silently simplified: a subclass (renormalization, ghost, frozen, recurrent,
synchronized, fused-activation layers), ``freeze_stats``, a non-default ``nonfinite`` policy,
registered hooks, or ``bias=False`` where the installed torch lacks it.

timm's ``BatchNormAct2d`` (``act(drop(bn(x)))``) becomes our :class:`BatchNormAct2d` when its
``drop`` is the identity and its ``act`` is the identity, ReLU, leaky ReLU, SiLU or exact GELU,
and ours goes back to timm's with ``to="torch"`` (torch.nn has no batch norm with an
activation); timm is imported only when such a layer is met.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
from typing import Any, cast

from torch import nn

from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct2d, BatchNormBase
from batchnorm.tools.common import is_batchnorm
from batchnorm.tools.names import name_layers

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
#: Where timm keeps ``BatchNormAct2d`` (timm ≥ 0.9; ``timm.layers`` re-exports it).
_TIMM_NORM_ACT = "timm.layers.norm_act"
#: Our activation name → the torch.nn module timm's layer holds as ``act``.
_ACTIVATION_MODULES: dict[str | None, type[nn.Module]] = {
    None: nn.Identity,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


def _timm_batchnorm_act() -> type[nn.Module] | None:
    """timm's ``BatchNormAct2d`` class if timm is already imported (a model of it exists)."""
    module = sys.modules.get(_TIMM_NORM_ACT)
    return getattr(module, "BatchNormAct2d", None)


def _activation_of(module: nn.Module) -> tuple[str | None, float] | str:
    """``(activation, negative_slope)`` of a timm ``BatchNormAct2d``, or why there is none."""
    drop = getattr(module, "drop", None)
    if drop is not None and type(drop) is not nn.Identity:
        return f"its drop layer {type(drop).__name__} has no counterpart in ours"
    act: Any = getattr(module, "act", None)
    for name, kind in _ACTIVATION_MODULES.items():
        if type(act) is kind:
            if kind is nn.GELU and getattr(act, "approximate", "none") != "none":
                break  # tanh-approximated GELU: ours is the exact one
            slope = float(cast(nn.LeakyReLU, act).negative_slope) if kind is nn.LeakyReLU else 0.01
            return name, slope
    return f"its activation {act!r} is not one of ours (identity, relu, leaky_relu, silu, gelu)"


def _torch_has_bias_option() -> bool:
    """Whether this torch's ``nn.BatchNorm*`` accepts ``bias=`` (added after torch 2.3)."""
    return "bias" in inspect.signature(nn.BatchNorm2d.__init__).parameters


def _refusal(name: str, module: nn.Module, to: str) -> str | None:
    """Why ``module`` cannot be converted to ``to`` without losing behaviour, or ``None``."""
    kind = type(module).__name__
    timm_class = _timm_batchnorm_act()
    if to == "batchnorm" and timm_class is not None and type(module) is timm_class:
        found = _activation_of(module)
        if isinstance(found, str):
            return f"{name} (timm {kind}) cannot be expressed: {found}"
        return _hook_refusal(name, module)
    if to == "torch" and type(module) is BatchNormAct2d:
        if _import_timm_batchnorm_act() is None:
            return f"{name} ({kind}) needs timm's BatchNormAct2d as its counterpart; install timm"
        return _hook_refusal(name, module) or _option_refusal(name, module)
    target_library = BatchNormBase if to == "batchnorm" else nn.modules.batchnorm._BatchNorm
    if isinstance(module, target_library) and not (
        to == "torch" and isinstance(module, BatchNormBase)
    ):
        return None  # already of the target library (and not ours): left alone
    table = _TO_OURS if to == "batchnorm" else _TO_TORCH
    if type(module) not in table:
        return (
            f"{name} ({kind}) adds behaviour that {to!r} batch norm cannot express; "
            "leave it as it is or replace it by hand"
        )
    refusal = _hook_refusal(name, module)
    if refusal is None and to == "torch":
        refusal = _option_refusal(name, module)
    return refusal


def _hook_refusal(name: str, module: nn.Module) -> str | None:
    """Why ``module``'s hooks forbid a swap, or ``None``."""
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        kind = type(module).__name__
        return f"{name} ({kind}) has hooks registered, which the new layer would not have"
    return None


def _option_refusal(name: str, module: nn.Module) -> str | None:
    """Why one of our options has no torch counterpart, or ``None``."""
    kind = type(module).__name__
    if getattr(module, "freeze_stats", False):
        return f"{name} ({kind}) has freeze_stats=True, which torch.nn batch norm lacks"
    if getattr(module, "nonfinite", "propagate") != "propagate":
        return (
            f"{name} ({kind}) has nonfinite={module.nonfinite!r}, which torch.nn batch norm lacks"
        )
    has_weight = getattr(module, "weight", None) is not None
    if has_weight and module.bias is None:
        if isinstance(module, BatchNormAct2d):
            return f"{name} ({kind}) has bias=False, which timm's BatchNormAct2d lacks"
        if not _torch_has_bias_option():
            return f"{name} ({kind}) has bias=False, which this torch version lacks"
    return None


def _import_timm_batchnorm_act() -> type[nn.Module] | None:
    """timm's ``BatchNormAct2d``, importing timm if needed; ``None`` where it is not installed."""
    try:
        return getattr(importlib.import_module(_TIMM_NORM_ACT), "BatchNormAct2d", None)
    except ImportError:
        return None


def _swap(module: nn.Module, to: str) -> nn.Module:
    """A layer of the target kind that owns ``module``'s parameters and buffers."""
    old: Any = module  # torch's, timm's and our batch norms share these attributes
    target: Any = (_TO_OURS if to == "batchnorm" else _TO_TORCH).get(type(module))
    timm_class = _timm_batchnorm_act()
    from_timm = to == "batchnorm" and timm_class is not None and type(module) is timm_class
    to_timm = to == "torch" and type(module) is BatchNormAct2d
    if target is None and not (from_timm or to_timm):
        return module  # not of the source library: left alone (checked by _refusal)
    options: dict[str, Any] = {"bias": old.bias is not None} if old.weight is not None else {}
    if from_timm:
        found = _activation_of(module)
        assert not isinstance(found, str)  # checked by _refusal
        activation, slope = found
        target = BatchNormAct2d
        options.update(activation=activation, negative_slope=slope)
    elif to_timm:
        target = _import_timm_batchnorm_act()
        act = _ACTIVATION_MODULES[old.activation]
        act_kwargs = {"negative_slope": old.negative_slope} if act is nn.LeakyReLU else None
        options = {"act_layer": act, "act_kwargs": act_kwargs}
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
    return new  # type: ignore[no-any-return]


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
    return name_layers(model) if to == "batchnorm" else model
