"""Tells each batch-norm layer of a model its dotted name, for the layers' messages."""

from __future__ import annotations

from torch import nn

from batchnorm.modules import BatchNormBase

__all__ = ["name_layers"]


def name_layers(model: nn.Module) -> nn.Module:
    """Stores in each of our batch-norm layers its dotted name in ``model`` (``layer_name``).

    A layer's errors and warnings (e.g. ``nonfinite="raise"``) then name it as
    ``'layer1.0.bn2 (BatchNorm2d)'`` instead of by its ``repr``. A layer learns its name also
    when a ``state_dict`` is loaded into the model and when :func:`batchnorm.tools.convert`
    creates it; call this after building a model that is neither.

    Args:
        model: any module; ``model`` itself, if one of our layers, keeps its ``repr`` as its
            name (it has no dotted name in itself).

    Returns:
        ``model``, for chaining.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, BatchNormBase) and name:
            module.layer_name = name
    return model
