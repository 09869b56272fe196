"""Networks of the lab, with the library's own normalization layers or without any.

* :func:`mlp`: the network of Ioffe & Szegedy (2015), Sec. 4.1: three hidden layers of 100
  sigmoid units, weights drawn from a Gaussian of std 0.1, normalization before each sigmoid
  (the linear layer before it then has no bias, since β takes its place). Deeper versions, other
  activations (tanh, ReLU), fan-in scaled initial weights and layer normalization
  (``torch.nn.LayerNorm``, for the comparison of the axes) serve the gradient-flow and
  which-axes experiments.
* :class:`SmallCNN`: three 3×3 convolutions with :class:`batchnorm.BatchNorm2d` and ReLU.
* :class:`SequenceClassifier`: an LSTM (or BN-LSTM, Cooijmans et al. 2017) reading a row as a
  sequence.

The batch-normalization variants (Batch Renorm, Ghost BN, BN-LSTM) live in
:mod:`batchnorm.variants`; they are imported on first use through :data:`VARIANT_LAYERS`, and a
missing one raises :class:`VariantUnavailable` so that the experiment needing it is skipped.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from torch import nn

from batchnorm.modules import BatchNorm1d, BatchNorm2d

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "VARIANT_LAYERS",
    "SequenceClassifier",
    "SmallCNN",
    "VariantUnavailable",
    "load_variant",
    "mlp",
    "norm_1d",
    "variant_kwargs",
]

#: Normalizations :func:`mlp` accepts (``None`` is the plain network; ``"ln"`` is
#: ``torch.nn.LayerNorm``, statistics per example over the features, for comparison).
NORMS = (None, "bn", "ln", "renorm", "ghost")

#: Activations :func:`mlp` accepts → (module class, gain of the fan-in scaled initialization).
ACTIVATIONS: dict[str, tuple[type[nn.Module], float]] = {
    "sigmoid": (nn.Sigmoid, 1.0),
    "tanh": (nn.Tanh, 1.0),
    "relu": (nn.ReLU, math.sqrt(2.0)),
}

#: Variant name → (module, class). The only place that names the variants' classes.
VARIANT_LAYERS: dict[str, tuple[str, str]] = {
    "renorm": ("batchnorm.variants", "BatchRenorm1d"),
    "ghost": ("batchnorm.variants", "GhostBatchNorm1d"),
    "bnlstm": ("batchnorm.variants", "BNLSTM"),
}


class VariantUnavailable(RuntimeError):
    """A batch-normalization variant the experiment needs cannot be imported."""


def load_variant(name: str) -> type[nn.Module]:
    """The class of variant ``name`` (see :data:`VARIANT_LAYERS`), imported now.

    Args:
        name: ``renorm``, ``ghost`` or ``bnlstm``.

    Returns:
        The ``nn.Module`` subclass.

    Raises:
        VariantUnavailable: if the module or the class does not exist (yet).
    """
    module_name, class_name = VARIANT_LAYERS[name]
    try:
        layer = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise VariantUnavailable(
            f"{module_name}.{class_name} is not available ({error})"
        ) from error
    return layer  # type: ignore[no-any-return]


def variant_kwargs(name: str, total_steps: int) -> dict[str, Any]:
    """Constructor keyword arguments of variant ``name`` in a run of ``total_steps`` steps.

    Batch Renorm follows the schedule of Ioffe (2017), Sec. 4 (plain BN first, then ``r_max``
    grows from 1 to 3 and ``d_max`` from 0 to 5), compressed to the run: plain BN for the first
    5% of the steps, ``d_max`` reached at 25% and ``r_max`` at 40%. Ghost BN uses virtual
    batches of 2 (half of the lab's small batches).

    Args:
        name: ``renorm`` or ``ghost``.
        total_steps: training steps of the run.

    Returns:
        The keyword arguments.
    """
    if name == "renorm":
        return {
            "warmup_steps": max(1, total_steps // 20),
            "d_max_steps": max(2, total_steps // 4),
            "r_max_steps": max(2, 2 * total_steps // 5),
        }
    if name == "ghost":
        return {"virtual_batch_size": 2}
    return {}


def norm_1d(norm: str | None, num_features: int, total_steps: int = 1) -> nn.Module:
    """The normalization layer ``norm`` over ``num_features`` features (``Identity`` for None).

    ``total_steps`` (the run's length) sets the schedule of Batch Renorm (see
    :func:`variant_kwargs`).

    Raises:
        ValueError: on an unknown ``norm``.
        VariantUnavailable: if a variant cannot be imported.
    """
    if norm is None:
        return nn.Identity()
    if norm == "bn":
        return BatchNorm1d(num_features)
    if norm == "ln":
        return nn.LayerNorm(num_features)
    if norm in ("renorm", "ghost"):
        return load_variant(norm)(num_features, **variant_kwargs(norm, total_steps))
    raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")


def mlp(
    in_features: int,
    num_classes: int,
    norm: str | None = None,
    hidden: int = 100,
    depth: int = 3,
    init_std: float | None = 0.1,
    total_steps: int = 1,
    activation: str = "sigmoid",
) -> nn.Sequential:
    """The sigmoid network of Ioffe & Szegedy (2015), Sec. 4.1 (Fig. 1), and its deeper kin.

    Layout: ``[Linear → norm → activation] × depth → Linear``; every bias 0, and the linear
    layers before a normalization have no bias. Initial weights ~ N(0, init_std²), or with
    ``init_std=None`` scaled by the fan-in: std = gain / √fan_in, gain √2 for ReLU (He et al.
    2015) and 1 for sigmoid and tanh (LeCun et al. 1998), which keeps a plain network's forward
    signal at a constant scale through depth.

    Args:
        in_features: input size ``D``.
        num_classes: output size.
        norm: ``None`` (no normalization), ``"bn"`` (:class:`batchnorm.BatchNorm1d`), ``"ln"``
            (``torch.nn.LayerNorm``), ``"renorm"`` or ``"ghost"`` (from
            :mod:`batchnorm.variants`).
        hidden: units per hidden layer.
        depth: number of hidden layers.
        init_std: standard deviation of the Gaussian initial weights; ``None`` for fan-in scaled.
        total_steps: training steps of the run (for Batch Renorm's schedule).
        activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.

    Returns:
        The network; ``model[-2]`` is the last hidden layer's activation.

    Raises:
        ValueError: on an unknown ``norm`` or ``activation``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}"
        )
    make_activation, gain = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        linear = nn.Linear(width, hidden, bias=norm is None)
        layers += [linear, norm_1d(norm, hidden, total_steps), make_activation()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            fan_in = layer.in_features
            last = layer is layers[-1]
            std = init_std if init_std is not None else (1.0 if last else gain) / math.sqrt(fan_in)
            nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """Three 3×3 convolutions of 16 channels, each ``conv → BatchNorm2d → ReLU``.

    A 2×2 max-pool follows the first block and a global average pool the third, then a linear
    classifier. Without ``batch_norm`` the convolutions get biases and the BN layers are left out.

    Args:
        image_shape: ``(H, W)`` of the input images (rows of the input are flattened images).
        num_classes: output size.
        batch_norm: insert :class:`batchnorm.BatchNorm2d` after each convolution.
    """

    def __init__(self, image_shape: tuple[int, int], num_classes: int, batch_norm: bool) -> None:
        super().__init__()
        self.image_shape = image_shape
        blocks: list[nn.Module] = []
        channels_in = 1
        for index, channels in enumerate((16, 16, 16)):
            blocks.append(nn.Conv2d(channels_in, channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                blocks.append(BatchNorm2d(channels))
            blocks.append(nn.ReLU())
            if index == 0:
                blocks.append(nn.MaxPool2d(2))
            channels_in = channels
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(channels_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, H·W)`` flattened images → ``(N, num_classes)`` logits."""
        images = x.view(len(x), 1, *self.image_shape)  # (N, 1, H, W)
        features = self.features(images)  # (N, 16, H/2, W/2)
        logits: torch.Tensor = self.classifier(features.mean(dim=(2, 3)))  # (N, num_classes)
        return logits


class SequenceClassifier(nn.Module):
    """An LSTM or a BN-LSTM reading each row as ``T`` steps of ``F`` features.

    The last hidden state goes to a linear classifier. The BN-LSTM (Cooijmans et al., "Recurrent
    Batch Normalization", ICLR 2017) comes from :mod:`batchnorm.variants` and is called like
    ``torch.nn.LSTM``: a ``(T, N, F)`` input, an ``(output, state)`` result with output
    ``(T, N, hidden)``; it is built as ``BNLSTM(F, hidden, max_steps=T)`` (statistics per step).

    Args:
        sequence_shape: ``(T, F)``.
        num_classes: output size.
        hidden: size of the hidden state.
        cell: ``"lstm"`` (``torch.nn.LSTM``) or ``"bnlstm"``.

    Raises:
        ValueError: on an unknown ``cell``.
        VariantUnavailable: if ``cell="bnlstm"`` and the BN-LSTM cannot be imported.
    """

    def __init__(
        self, sequence_shape: tuple[int, int], num_classes: int, hidden: int, cell: str
    ) -> None:
        super().__init__()
        self.sequence_shape = sequence_shape
        features = sequence_shape[1]
        if cell == "lstm":
            self.rnn: nn.Module = nn.LSTM(features, hidden)
        elif cell == "bnlstm":
            steps = sequence_shape[0]
            self.rnn = load_variant("bnlstm")(features, hidden, max_steps=steps)
        else:
            raise ValueError(f"cell: expected 'lstm' or 'bnlstm', got {cell!r}")
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, T·F)`` rows → ``(N, num_classes)`` logits."""
        sequence = x.view(len(x), *self.sequence_shape).transpose(0, 1)  # (T, N, F)
        output = self.rnn(sequence)
        if isinstance(output, tuple):  # (output (T, N, hidden), state) like nn.LSTM
            output = output[0]
        logits: torch.Tensor = self.classifier(output[-1])  # (N, hidden) → (N, num_classes)
        return logits
