"""Fold inference-mode batch norm into the convolution or linear layer before it.

In evaluation a batch-norm layer is the per-channel affine map ``y = s·(z − μ) + β`` with
``s = γ / sqrt(σ² + ε)`` (running ``μ``, ``σ²``). After a layer ``z = W ⋆ x + b`` whose output
channel ``o`` is that batch norm's channel, the pair is one layer::

    W' = s[o]·W[o],   b' = s·(b − μ) + β

so the batch norm disappears from the inference graph (fewer parameters, one pass less). Pairs
are found by tracing the model with ``torch.fx`` (batch norm fed only by a ``Conv1d/2d/3d``,
``ConvTranspose1d/2d/3d`` or ``Linear`` whose output goes nowhere else); a model that cannot be
traced is folded inside its ``nn.Sequential`` containers, by module order.

``Linear`` followed by ``BatchNorm1d`` is folded when the batch norm has ``out_features``
channels, which is right for ``(N, features)`` activations, the case where the two layers'
channel axes coincide.

Reference:
    B. Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018, §3.2 (batch-norm folding).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from typing import Any

import torch
from torch import fx, nn

from batchnorm.tools.common import has_channel_statistics, is_batchnorm

__all__ = ["fold", "fold_into"]

_FOLDABLE_TARGETS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def _output_channels(layer: nn.Module) -> int:
    """Number of output channels of a convolution or linear layer."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return int(layer.out_channels)  # type: ignore[arg-type]


def _can_fold(layer: nn.Module, norm: nn.Module) -> bool:
    """Whether ``norm`` (evaluation mode) can be folded into ``layer``."""
    return (
        isinstance(layer, _FOLDABLE_TARGETS)
        and has_channel_statistics(norm)
        and _channels_of(norm) == _output_channels(layer)
    )


def _channels_of(norm: nn.Module) -> int:
    """Number of channels of a batch-norm layer's running statistics."""
    running_mean: torch.Tensor = norm.running_mean  # type: ignore[assignment]
    return running_mean.shape[0]


def fold_into(layer: nn.Module, norm: nn.Module) -> None:
    """Folds the evaluation-mode batch norm ``norm`` into ``layer`` in place.

    Args:
        layer: a ``Conv*d``, ``ConvTranspose*d`` or ``Linear`` layer; its weight and bias are
            replaced (a bias is added if it had none).
        norm: a batch-norm layer with running statistics of ``layer``'s output channels.

    Raises:
        ValueError: if the pair cannot be folded.
    """
    if not _can_fold(layer, norm):
        raise ValueError(
            f"cannot fold {type(norm).__name__} into {type(layer).__name__}: expected a "
            "Conv/ConvTranspose/Linear layer followed by a batch norm with running "
            "statistics of its output channels"
        )
    weight: torch.Tensor = layer.weight  # type: ignore[assignment]
    bn: Any = norm  # torch's and our batch norms share these attributes
    dtype = torch.promote_types(weight.dtype, torch.float64)  # fold in float64, round once
    with torch.no_grad():
        mean = bn.running_mean.to(dtype)  # (C,)
        var = bn.running_var.to(dtype)  # (C,)
        gamma, beta = getattr(bn, "weight", None), getattr(bn, "bias", None)  # (C,) or None
        scale = torch.rsqrt(var + float(bn.eps))  # (C,)  1/σ
        if gamma is not None:
            scale = scale * gamma.to(dtype)  # (C,)  s = γ/σ
        shift = -mean * scale  # (C,)
        if beta is not None:
            shift = shift + beta.to(dtype)  # (C,)  β − s·μ
        w = weight.to(dtype)
        if isinstance(layer, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            # weight (C_in, C_out / groups, *k): output channel g·(C_out/groups) + j
            groups = layer.groups
            grouped = w.reshape(
                groups, w.shape[0] // groups, w.shape[1], -1
            )  # (G, Cin/G, Cout/G, K)
            scaled = grouped * scale.reshape(groups, 1, w.shape[1], 1)
            new_weight = scaled.reshape(w.shape)
        else:  # Conv: (C_out, C_in / groups, *k); Linear: (C_out, C_in)
            new_weight = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        old_bias: torch.Tensor | None = layer.bias  # type: ignore[assignment]
        new_bias = shift if old_bias is None else shift + scale * old_bias.to(dtype)  # (C,)
        layer.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=weight.requires_grad)
        layer.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)


class _LeafTracer(fx.Tracer):
    """An ``fx`` tracer that keeps every batch-norm layer whole (a single ``call_module``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """Batch-norm layers are leaves, as are ``torch.nn`` layers."""
        return is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)


def _fold_traced(model: nn.Module) -> fx.GraphModule:
    """Traces ``model`` and folds every foldable (layer, batch norm) pair in the graph."""
    graph = _LeafTracer().trace(model)
    traced = fx.GraphModule(model, graph, type(model).__name__)
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not is_batchnorm(modules[node.target]):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        if len(source.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue  # the layer's output is used elsewhere, or the norm gets extra arguments
        layer, norm = modules[source.target], modules[node.target]
        if not _can_fold(layer, norm):
            continue
        fold_into(layer, norm)
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def _fold_sequential(model: nn.Module) -> nn.Module:
    """Folds each (layer, batch norm) pair of neighbours inside every ``nn.Sequential``."""
    for container in model.modules():
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for previous, current in itertools.pairwise(names):
            layer, norm = container._modules[previous], container._modules[current]
            if layer is not None and norm is not None and _can_fold(layer, norm):
                fold_into(layer, norm)
                container._modules[current] = nn.Identity()
    return model


def fold(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` with batch norm folded into the layers before it.

    Args:
        model: a model in evaluation mode (every submodule), left untouched.

    Returns:
        A new model (an ``fx.GraphModule`` when tracing works, else a copy of ``model`` with
        the folded batch norms of its ``nn.Sequential`` containers replaced by
        ``nn.Identity``) whose outputs equal ``model``'s up to rounding; batch norms that
        follow no foldable layer stay as they are.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if any submodule is in training mode (folding uses running statistics,
            which are what evaluation mode uses).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        >>> folded = fold(net)
        >>> sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in net.parameters())
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            "model: expected evaluation mode, call model.eval() first; in training mode: "
            + ", ".join(training[:5])
            + (" …" if len(training) > 5 else "")
        )
    copied = copy.deepcopy(model)
    try:
        return _fold_traced(copied)
    except Exception as error:  # any tracing failure: fall back to module order
        warnings.warn(
            f"fold: torch.fx could not trace {type(model).__name__} ({error}); folding "
            "inside nn.Sequential containers by module order instead",
            stacklevel=2,
        )
        return _fold_sequential(copy.deepcopy(model))
