"""A worked example for learners: batch normalization by hand on a tiny batch, line by line.

The three steps of Ioffe & Szegedy (2015), Algorithm 1, with real numbers: the batch mean of
each feature, its **biased** variance (divide by ``M``), the normalized values (mean 0,
variance ``σ²/(σ² + ε)`` ≈ 1), then ``γ`` and ``β``; after them the running estimates after one
step (which store the **unbiased** variance, ``M/(M − 1)`` times the biased one), and the
evaluation-mode output, which uses the running estimates instead of the batch's. Every value is
computed here in plain Python floats, the way one would on paper, and then compared with the
library's own module (:class:`batchnorm.BatchNorm1d`, or :class:`batchnorm.BatchNorm2d` for an
image batch) in float64. A last line contrasts layer normalization, which averages each
example over its features instead of each feature over the batch.

``batchnorm explain`` prints it (see :mod:`batchnorm.cli`); the lab's ``worked-example``
section shows the same text and a figure.

Why this file is long: the example is meant to be read, so every step is spelled out three
times, as plain arithmetic, as a check against the library, and as the printed line.

References:
    S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", ICML 2015, Algorithm 1 and Sec. 3.1.
    J. L. Ba, J. R. Kiros, G. E. Hinton, "Layer Normalization", 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from batchnorm.lab.experiments import ExperimentResult, LabContext
from batchnorm.modules import BatchNorm1d, BatchNorm2d

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "DEFAULT_IMAGE",
    "TOLERANCE",
    "Check",
    "WorkedExample",
    "parse_batch",
    "parse_values",
    "worked_example",
    "worked_example_experiment",
]

#: The default batch: 4 examples (rows) × 3 features (columns), numbers easy to follow by hand.
DEFAULT_BATCH: tuple[tuple[float, ...], ...] = (
    (1.0, 2.0, 10.0),
    (3.0, 2.0, 11.0),
    (5.0, 4.0, 12.0),
    (7.0, 8.0, 13.0),
)
#: The default scale γ and shift β (a fresh layer has γ = 1, β = 0; these show their effect).
DEFAULT_GAMMA: tuple[float, ...] = (1.0, 2.0, 0.5)
DEFAULT_BETA: tuple[float, ...] = (0.0, 1.0, -1.0)
#: The default image batch, ``(N, C, H, W) = (2, 2, 2, 2)``: per channel, 8 values over N·H·W.
DEFAULT_IMAGE: tuple[Any, ...] = (
    (((0.0, 1.0), (2.0, 3.0)), ((2.0, 2.0), (4.0, 8.0))),
    (((4.0, 5.0), (6.0, 7.0)), ((5.0, 3.0), (5.0, 7.0))),
)
#: Largest difference between the hand computation and the library (both float64).
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Check:
    """One step computed by hand, next to what the library computed.

    Attributes:
        name: the step (``"batch mean"``, …).
        expected: the values computed by hand, flattened.
        measured: the same values from the library, flattened.
        source: which call of the library produced ``measured``.
    """

    name: str
    expected: tuple[float, ...]
    measured: tuple[float, ...]
    source: str

    @property
    def error(self) -> float:
        """Largest absolute difference (``inf`` if the lengths differ)."""
        if len(self.expected) != len(self.measured):
            return math.inf
        return max(
            (abs(a - b) for a, b in zip(self.expected, self.measured, strict=True)), default=0.0
        )

    @property
    def ok(self) -> bool:
        """Whether the difference is within :data:`TOLERANCE`."""
        return self.error <= TOLERANCE

    def line(self) -> str:
        """``✓ equals <source> (max |Δ| …)``, or ``✗ differs from …``."""
        mark, verb = ("✓", "equals") if self.ok else ("✗", "DIFFERS FROM")
        return f"  {mark} {verb} {self.source} (max |Δ| = {self.error:.1e})"


@dataclass
class WorkedExample:
    """The worked example's numbers, its checks and its printed lines.

    Per-channel lists hold, for each channel (feature), its ``M`` values in the order
    ``(n, h, w)``: the batch, and for an image also the space.

    Attributes:
        shape: shape of the input, ``(N, C)`` or ``(N, C, H, W)``.
        x: per channel, the input values.
        gamma: γ per channel.
        beta: β per channel.
        eps: ε.
        momentum: the running estimates' momentum.
        mean: μ per channel.
        var: biased variance per channel.
        var_unbiased: ``var · M / (M − 1)`` per channel.
        x_hat: per channel, the normalized values.
        y: per channel, the training-mode output.
        running_mean: after one step from 0.
        running_var: after one step from 1.
        y_eval: per channel, the evaluation-mode output on the same batch.
        layer_norm_mean: for a 2-D batch, the mean of each example over its features.
        checks: each step against the library.
        lines: the printed explanation.
    """

    shape: tuple[int, ...]
    x: list[list[float]]
    gamma: list[float]
    beta: list[float]
    eps: float
    momentum: float
    mean: list[float] = field(default_factory=list)
    var: list[float] = field(default_factory=list)
    var_unbiased: list[float] = field(default_factory=list)
    x_hat: list[list[float]] = field(default_factory=list)
    y: list[list[float]] = field(default_factory=list)
    running_mean: list[float] = field(default_factory=list)
    running_var: list[float] = field(default_factory=list)
    y_eval: list[list[float]] = field(default_factory=list)
    layer_norm_mean: list[float] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every check agrees with the library."""
        return all(check.ok for check in self.checks)

    @property
    def largest_error(self) -> float:
        """The largest difference over all checks."""
        return max((check.error for check in self.checks), default=0.0)

    def text(self) -> str:
        """The explanation, one string."""
        return "\n".join(self.lines)


def parse_values(text: str, name: str) -> list[float]:
    """Numbers separated by commas and/or spaces: ``"1, 2 3"`` → ``[1.0, 2.0, 3.0]``.

    Raises:
        ValueError: naming ``name`` if a value is not a number or there is none.
    """
    parts = text.replace(",", " ").split()
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise ValueError(
            f"{name}: expected numbers separated by commas or spaces, got {text!r}"
        ) from None
    if not values:
        raise ValueError(f"{name}: expected at least one number, got {text!r}")
    return values


def parse_batch(text: str) -> list[list[float]]:
    """A 2-D batch written as rows separated by ``;``: ``"1 2; 3 4; 5 6"`` (3 examples × 2).

    Raises:
        ValueError: on a value that is not a number, or rows of different lengths.
    """
    rows = [parse_values(row, "--batch") for row in text.split(";") if row.strip()]
    if not rows:
        raise ValueError(f"--batch: expected rows separated by ';', got {text!r}")
    if len({len(row) for row in rows}) > 1:
        lengths = ", ".join(str(len(row)) for row in rows)
        raise ValueError(f"--batch: every row needs the same number of features, got {lengths}")
    return rows


def _number(value: float) -> str:
    """A value as a learner writes it: ``4``, ``6.667``, ``-1.342``."""
    if value == round(value) and abs(value) < 1e12:
        return str(round(value))
    return f"{value:.4g}"


def _vector(values: Sequence[float]) -> str:
    return "(" + ", ".join(_number(v) for v in values) + ")"


def _table(
    shape: tuple[int, ...], per_channel: Sequence[Sequence[float]], indent: str = "  "
) -> list[str]:
    """A 2-D batch as rows = examples, columns = features; an image batch as one row per channel."""
    channels = len(per_channel)
    if len(shape) == 2:
        header = indent + "      " + "".join(f"{'f' + str(c):>10}" for c in range(channels))
        rows = [
            indent
            + f"{'x' + str(n):<6}"
            + "".join(f"{per_channel[c][n]:10.4f}" for c in range(channels))
            for n in range(shape[0])
        ]
        return [header, *rows]
    return [
        indent + f"{'c' + str(c):<6}" + " ".join(f"{v:8.4f}" for v in per_channel[c])
        for c in range(channels)
    ]


def _per_channel(tensor: torch.Tensor) -> list[list[float]]:
    """``(N, C, …)`` → per channel the ``N·L`` values in ``(n, spatial)`` order."""
    channels = tensor.shape[1]
    flat = tensor.detach().transpose(0, 1).reshape(channels, -1)  # (C, M)
    return [[float(v) for v in row] for row in flat]


def _flat(per_channel: Sequence[Sequence[float]]) -> tuple[float, ...]:
    return tuple(v for row in per_channel for v in row)


def _shape_of(batch: Any) -> tuple[int, ...]:
    """Shape of a nested sequence, checked to be rectangular and 2-D or 4-D."""
    try:
        tensor = torch.tensor(batch, dtype=torch.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"batch: expected a rectangular nested list of numbers ({error})"
        ) from error
    if tensor.dim() not in (2, 4):
        raise ValueError(f"batch: expected shape (N, C) or (N, C, H, W), got {tuple(tensor.shape)}")
    return tuple(tensor.shape)


def worked_example(
    batch: Any = DEFAULT_BATCH,
    gamma: Sequence[float] | None = None,
    beta: Sequence[float] | None = None,
    *,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> WorkedExample:
    """Batch normalization by hand on ``batch``, each step checked against the library.

    For each channel ``c`` over its ``M`` values (``M = N`` for an ``(N, C)`` batch,
    ``M = N·H·W`` for ``(N, C, H, W)``)::

        μ        = Σ x / M
        σ²       = Σ (x − μ)² / M                       (biased)
        x̂        = (x − μ) / √(σ² + ε)                  (mean 0, variance σ²/(σ² + ε))
        y        = γ·x̂ + β
        running_mean ← (1 − momentum)·0 + momentum·μ
        running_var  ← (1 − momentum)·1 + momentum·σ²·M/(M − 1)   (unbiased)
        y_eval   = γ·(x − running_mean) / √(running_var + ε) + β

    Args:
        batch: nested lists, ``(N, C)`` or ``(N, C, H, W)``, at least 2 values per channel.
        gamma: γ per channel (default :data:`DEFAULT_GAMMA` for the default batch, else 1).
        beta: β per channel (default :data:`DEFAULT_BETA` for the default batch, else 0).
        momentum: the momentum of the running estimates (as ``torch.nn.BatchNorm1d``), in (0, 1].
        eps: ε, added to the variance inside the square root.

    Returns:
        A :class:`WorkedExample`; ``.ok`` says whether every step agrees with the library.

    Raises:
        ValueError: on a batch that is not 2-D or 4-D, with fewer than 2 values per channel,
            γ or β of the wrong length, a momentum outside (0, 1] or ``eps < 0``.
    """
    shape = _shape_of(batch)
    channels = shape[1]
    default = batch is DEFAULT_BATCH
    gamma = (
        list(gamma) if gamma is not None else list(DEFAULT_GAMMA if default else [1.0] * channels)
    )
    beta = list(beta) if beta is not None else list(DEFAULT_BETA if default else [0.0] * channels)
    for name, values in (("gamma", gamma), ("beta", beta)):
        if len(values) != channels:
            raise ValueError(
                f"{name}: expected {channels} values (one per channel), got {len(values)}"
            )
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"momentum: expected a number in (0, 1], got {momentum}")
    if not eps >= 0 or math.isinf(eps):  # also rejects NaN
        raise ValueError(f"eps: expected a finite number ≥ 0, got {eps}")
    tensor = torch.tensor(batch, dtype=torch.float64)  # (N, C) or (N, C, H, W)
    for name, values in (("batch", tensor.flatten().tolist()), ("gamma", gamma), ("beta", beta)):
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name}: expected finite numbers, got {values}")
    x = _per_channel(tensor)
    count = len(x[0])  # M
    if count < 2:
        raise ValueError(
            f"batch: expected more than 1 value per channel when training, got shape {shape}"
        )
    example = WorkedExample(shape, x, gamma, beta, eps, momentum)
    layer = BatchNorm1d if len(shape) == 2 else BatchNorm2d
    name = layer.__name__
    _compute(example, count)
    _check(example, tensor, layer, name)
    _write(example, count, name)
    return example


def _compute(example: WorkedExample, count: int) -> None:
    """Every number of the example, in plain Python floats."""
    e = example
    e.mean = [sum(values) / count for values in e.x]
    e.var = [
        sum((v - mu) ** 2 for v in values) / count for values, mu in zip(e.x, e.mean, strict=True)
    ]
    e.var_unbiased = [var * count / (count - 1) for var in e.var]
    e.x_hat = [
        [(v - mu) / math.sqrt(var + e.eps) for v in values]
        for values, mu, var in zip(e.x, e.mean, e.var, strict=True)
    ]
    e.y = [[g * v + b for v in row] for row, g, b in zip(e.x_hat, e.gamma, e.beta, strict=True)]
    m = e.momentum
    e.running_mean = [(1 - m) * 0.0 + m * mu for mu in e.mean]
    e.running_var = [(1 - m) * 1.0 + m * var for var in e.var_unbiased]
    e.y_eval = [
        [g * (v - rm) / math.sqrt(rv + e.eps) + b for v in values]
        for values, g, b, rm, rv in zip(
            e.x, e.gamma, e.beta, e.running_mean, e.running_var, strict=True
        )
    ]
    if len(e.shape) == 2:
        examples = e.shape[0]
        e.layer_norm_mean = [sum(row[n] for row in e.x) / len(e.x) for n in range(examples)]


def _check(
    example: WorkedExample,
    tensor: torch.Tensor,
    layer: type[BatchNorm1d] | type[BatchNorm2d],
    name: str,
) -> None:
    """Runs the library's module on the same batch and records one :class:`Check` per step."""
    e = example
    channels = len(e.x)
    options: dict[str, Any] = {"eps": e.eps, "dtype": torch.float64}
    with torch.no_grad():
        cumulative = layer(channels, momentum=None, **options).train()
        cumulative(tensor)
        plain = layer(channels, affine=False, **options).train()
        x_hat = plain(tensor)
        full = layer(channels, momentum=e.momentum, **options).train()
        assert full.weight is not None
        assert full.bias is not None
        full.weight.copy_(torch.tensor(e.gamma, dtype=torch.float64))
        full.bias.copy_(torch.tensor(e.beta, dtype=torch.float64))
        y = full(tensor)
        y_eval = full.eval()(tensor)
    assert cumulative.running_mean is not None
    assert cumulative.running_var is not None
    assert full.running_mean is not None
    assert full.running_var is not None
    assert full.num_batches_tracked is not None
    biased = cumulative.running_var * (len(e.x[0]) - 1) / len(e.x[0])
    e.checks = [
        Check("batch mean", tuple(e.mean), tuple(cumulative.running_mean.tolist()),
              f"{name}({channels}, momentum=None).running_mean after one step"),
        Check("biased variance", tuple(e.var), tuple(biased.tolist()),
              f"{name}({channels}, momentum=None).running_var · (M − 1)/M after one step"),
        Check("normalized values", _flat(e.x_hat), _flat(_per_channel(x_hat)),
              f"{name}({channels}, affine=False) in training mode"),
        Check("γ·x̂ + β", _flat(e.y), _flat(_per_channel(y)),
              f"{name}({channels}) with weight = γ, bias = β, in training mode"),
        Check("running mean", tuple(e.running_mean), tuple(full.running_mean.tolist()),
              f"its running_mean (num_batches_tracked = {int(full.num_batches_tracked)})"),
        Check("running variance", tuple(e.running_var), tuple(full.running_var.tolist()),
              "its running_var"),
        Check("evaluation output", _flat(e.y_eval), _flat(_per_channel(y_eval)),
              f"the same {name}.eval() on the same batch"),
    ]  # fmt: skip
    if e.layer_norm_mean:
        normalized = torch.nn.functional.layer_norm(tensor, (channels,), eps=e.eps)  # (N, C)
        by_hand = [
            [(row[n] - e.layer_norm_mean[n]) / math.sqrt(
                sum((r[n] - e.layer_norm_mean[n]) ** 2 for r in e.x) / channels + e.eps)
             for row in e.x]
            for n in range(e.shape[0])
        ]  # fmt: skip
        e.checks.append(
            Check("layer norm", _flat(by_hand), tuple(normalized.flatten().tolist()),
                  "torch.nn.functional.layer_norm(x, (C,))")
        )  # fmt: skip


def _write(example: WorkedExample, count: int, name: str) -> None:
    """The printed explanation: each step with its numbers, then its check."""
    e = example
    checks = {check.name: check for check in e.checks}
    image = len(e.shape) == 4
    unit = "channel" if image else "feature"
    label = [f"{'c' if image else 'f'}{c}" for c in range(len(e.x))]
    over = (
        f"its M = N·H·W = {e.shape[0]}·{e.shape[2]}·{e.shape[3]} = {count} values (batch and space)"
        if image
        else f"the M = N = {count} values in its column (the whole batch)"
    )
    lines = [
        f"Batch normalization by hand on a batch of shape {tuple(e.shape)} "
        f"(Ioffe & Szegedy 2015, Algorithm 1),",
        f"each step checked against batchnorm.{name} in float64.",
        "",
        "The batch x "
        + ("(one row per channel: its values over N, H, W):" if image else "(rows: examples, "
           "columns: features):"),
        *_table(e.shape, e.x),
        "",
        f"Step 1. The batch mean of each {unit}, μ = Σ x / M,",
        f"over {over}:",
    ]  # fmt: skip
    for c, values in enumerate(e.x):
        terms = " + ".join(_number(v) for v in values)
        lines.append(f"  {label[c]}: μ = ({terms}) / {count} = {_number(e.mean[c])}")
    lines += [checks["batch mean"].line(), ""]
    lines.append(
        f"Step 2. The biased variance, σ² = Σ (x − μ)² / M (divided by M = {count}, not M − 1):"
    )
    for c, values in enumerate(e.x):
        mu = _number(e.mean[c])
        terms = " + ".join(f"({_number(v)} − {mu})²" for v in values)
        if len(values) > 4:
            terms = " + ".join(f"{_number((v - e.mean[c]) ** 2)}" for v in values)
        total = sum((v - e.mean[c]) ** 2 for v in values)
        lines.append(
            f"  {label[c]}: σ² = ({terms}) / {count} = {_number(total)} / {count} "
            f"= {_number(e.var[c])}"
        )
    lines += [checks["biased variance"].line(), ""]
    lines.append(f"Step 3. Normalize: x̂ = (x − μ) / √(σ² + ε), with ε = {e.eps:g}:")
    lines += _table(e.shape, e.x_hat)
    for c, row in enumerate(e.x_hat):
        mean = sum(row) / count
        var = sum((v - mean) ** 2 for v in row) / count
        lines.append(
            f"  {label[c]}: mean of x̂ = {abs(mean):.6f}, variance of x̂ = {var:.6f} "
            f"(= σ²/(σ² + ε), 1 up to ε)"
        )
    lines += [checks["normalized values"].line(), ""]
    lines.append(
        f"Then scale and shift: y = γ·x̂ + β, with γ = {_vector(e.gamma)}, β = {_vector(e.beta)}:"
    )
    lines += _table(e.shape, e.y)
    lines += [checks["γ·x̂ + β"].line(), ""]
    m = e.momentum
    lines += [
        f"The running estimates after this one step (momentum {m:g}; a new layer starts at "
        "mean 0, variance 1):",
        f"  running_mean = (1 − {m:g})·0 + {m:g}·μ = {_vector(e.running_mean)}",
        f"  the running variance stores the UNBIASED variance σ²·M/(M − 1) "
        f"= σ²·{count}/{count - 1} = {_vector(e.var_unbiased)}:",
        f"  running_var = (1 − {m:g})·1 + {m:g}·σ²·M/(M − 1) = {_vector(e.running_var)}",
        checks["running mean"].line(),
        checks["running variance"].line(),
        "",
        "Evaluation mode (model.eval()): the running estimates replace the batch's statistics,",
        "  y = γ·(x − running_mean) / √(running_var + ε) + β, on the same batch:",
        *_table(e.shape, e.y_eval),
        checks["evaluation output"].line(),
        "  After a single step the running estimates are still near their start (0 and 1), so this",
        f"  differs from the training output; with momentum {m:g} they approach the population's",
        f"  statistics over many steps (a batch k steps back weighs {m:g}·{1 - m:g}^k).",
    ]  # fmt: skip
    if e.layer_norm_mean:
        lines += [
            "",
            "Not layer normalization: batch norm averages each COLUMN (a feature over the batch);",
            "layer norm averages each ROW (one example over its features), whatever the batch:",
            f"  row means {_vector(e.layer_norm_mean)} instead of column means "
            f"{_vector(e.mean)}",
            checks["layer norm"].line(),
        ]  # fmt: skip
    verdict = "every step agrees" if e.ok else "SOME STEPS DISAGREE"
    lines += [
        "",
        f"{verdict} with the library (largest |Δ| = {e.largest_error:.1e}, "
        f"tolerance {TOLERANCE:g}).",
    ]
    e.lines = lines


def worked_example_experiment(context: LabContext) -> ExperimentResult:
    """The lab's worked example: :func:`worked_example` on :data:`DEFAULT_BATCH`.

    Trains nothing (``context`` is not used); the report shows the text and the numbers.
    """
    del context
    example = worked_example()
    result = ExperimentResult(
        "worked-example",
        "Worked example",
        "In training, BN normalizes each feature (channel) with the mean and the biased variance "
        "of the mini-batch, over the batch (and space), not over each sample's features; the "
        "running estimates store the unbiased variance; evaluation uses the running estimates.",
        "Ioffe & Szegedy 2015, Algorithm 1 and Sec. 3.1; torch.nn.BatchNorm1d",
    )
    result.text = example.text()
    for c in range(len(example.x)):
        result.summary[f"batch mean, f{c}"] = example.mean[c]
        result.summary[f"biased variance, f{c}"] = example.var[c]
        result.summary[f"unbiased variance (running update), f{c}"] = example.var_unbiased[c]
        result.summary[f"running mean after one step, f{c}"] = example.running_mean[c]
        result.summary[f"running variance after one step, f{c}"] = example.running_var[c]
    result.summary["steps checked against the library"] = len(example.checks)
    result.summary["steps that agree"] = sum(check.ok for check in example.checks)
    result.summary["largest difference to batchnorm.BatchNorm1d (float64)"] = example.largest_error
    result.curves = {
        "x": example.x,
        "x_hat": example.x_hat,
        "y": example.y,
        "y_eval": example.y_eval,
        "gamma": example.gamma,
        "beta": example.beta,
    }
    agree = sum(check.ok for check in example.checks)
    result.effect = (
        f"{agree} of {len(example.checks)} steps agree with batchnorm.BatchNorm1d "
        f"(largest difference {example.largest_error:.1e}); x̂ has mean 0 and variance "
        "σ²/(σ² + ε) per feature"
    )
    if not example.ok:
        result.notes.append("Some steps disagree with the library: see the text.")
    return result
