"""Two experiments on how gradients pass through normalization: across depth, and across the
batch size.

* :func:`gradient_flow`: per-layer gradient norms of deep (16 hidden layers) sigmoid, tanh and
  ReLU networks, with and without :class:`batchnorm.BatchNorm1d`, at initialization and after
  training. The literature says two things, and both are measured: BN keeps a deep sigmoid
  network's gradient from vanishing (Ioffe & Szegedy 2015, Sec. 3.3), and a deep plain
  (non-residual) BN network has gradients that *grow* towards the input at initialization, by
  a fixed factor per layer, i.e. they explode with depth (Yang et al. 2019).
* :func:`which_axes`: batch norm averages each channel over the batch (and space); layer norm
  averages each example over its features. The same network with each, trained with batches of
  2 to 256, shows where BN's dependence on the batch hurts and where it helps.

Each function returns an :class:`~batchnorm.lab.experiments.ExperimentResult` whose verdicts
are computed from the numbers (thresholds named below), never written in advance.

References:
    S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", ICML 2015.
    G. Yang, J. Pennington, V. Rao, J. Sohl-Dickstein, S. S. Schoenholz, "A Mean Field Theory
    of Batch Normalization", ICLR 2019.
    J. L. Ba, J. R. Kiros, G. E. Hinton, "Layer Normalization", 2016.
    Y. Wu and K. He, "Group Normalization", ECCV 2018 (Fig. 1: BN's error grows as the batch
    shrinks; Fig. 2: the axes of each normalization).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from batchnorm.lab.experiments import (
    BATCH_SIZE,
    ExperimentResult,
    LabContext,
    sweep_seeds,
)
from batchnorm.lab.training import RunResult, RunSpec

__all__ = [
    "AXES_BATCH_SIZES",
    "AXES_LR",
    "AXES_MARGIN",
    "GRADIENT_ACTIVATIONS",
    "GRADIENT_DEPTH",
    "GRADIENT_LR",
    "VERDICT_FACTOR",
    "gradient_flow",
    "gradient_flow_runs",
    "verdict",
    "which_axes",
    "which_axes_runs",
]

#: Hidden layers of the gradient-flow networks (100 units each).
GRADIENT_DEPTH = 16
#: Activations compared, in plot order.
GRADIENT_ACTIVATIONS = ("sigmoid", "tanh", "relu")
#: SGD learning rate of the gradient-flow training runs (batches of 60).
GRADIENT_LR = 0.1
#: A gradient "vanishes" (or "explodes") when layer 1's norm is this many times smaller (larger)
#: than the last hidden layer's: an order of magnitude across the network.
VERDICT_FACTOR = 10.0
#: The two arms: label → normalization.
ARMS = {"no BN": None, "BN": "bn"}

#: Batch sizes of the batch-norm vs layer-norm sweep.
AXES_BATCH_SIZES = (2, 4, 16, 64, 256)
#: Label → normalization of the sweep's two arms.
AXES_NORMS = {"BN": "bn", "LN": "ln"}
#: SGD learning rate of the sweep (the lab's MLP, the same for every batch size and both arms).
AXES_LR = 0.1
#: BN "helps" (or "hurts") at a batch size when its test accuracy is above (below) layer norm's
#: by more than this.
AXES_MARGIN = 0.01


def _geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean (gradient norms span orders of magnitude); 0 if any value is 0."""
    if any(v <= 0 for v in values):
        return 0.0
    return math.exp(statistics.fmean(math.log(v) for v in values))


def verdict(ratio: float) -> str:
    """``"vanishing"``, ``"exploding"`` or ``"neither"`` for a layer-1 / last-layer ratio.

    Args:
        ratio: ``‖∂L/∂W_1‖ / ‖∂L/∂W_L‖`` between the first and the last hidden layer.

    Returns:
        ``"vanishing"`` below ``1 / VERDICT_FACTOR``, ``"exploding"`` above ``VERDICT_FACTOR``.
    """
    if ratio < 1.0 / VERDICT_FACTOR:
        return "vanishing"
    if ratio > VERDICT_FACTOR:
        return "exploding"
    return "neither"


def _gradient_spec(activation: str, norm: str | None, seed: int, steps: int) -> RunSpec:
    return RunSpec(
        "mlp",
        norm,
        GRADIENT_LR,
        steps,
        BATCH_SIZE,
        seed,
        max(1, steps // 4),
        depth=GRADIENT_DEPTH,
        activation=activation,
        init_std=None,
        gradient_norms=True,
    )


def gradient_flow_runs(context: LabContext) -> list[RunSpec]:
    """The runs of :func:`gradient_flow`: for each activation and arm, an untrained network on
    every seed (the gradient at initialization) and a training run on the sweep seeds."""
    at_init = [
        _gradient_spec(activation, norm, seed, 0)
        for activation in GRADIENT_ACTIVATIONS
        for norm in ARMS.values()
        for seed in context.seeds
    ]
    trained = [
        _gradient_spec(activation, norm, seed, context.budget.gradient_steps)
        for activation in GRADIENT_ACTIVATIONS
        for norm in ARMS.values()
        for seed in sweep_seeds(context)
    ]
    return at_init + trained


def _per_layer(runs: Sequence[RunResult], index: int) -> list[float]:
    """Per layer, the geometric mean over runs of the gradient norms at evaluation ``index``."""
    layers = len(runs[0]["gradient_norms"][index])
    return [
        _geometric_mean([run["gradient_norms"][index][layer] for run in runs])
        for layer in range(layers)
    ]


def gradient_flow(context: LabContext) -> ExperimentResult:
    """Claim 7: BN keeps deep networks' gradients from vanishing; at initialization a deep plain
    BN network's gradients explode (Ioffe & Szegedy 2015, Sec. 3.3; Yang et al. 2019).

    Networks of :data:`GRADIENT_DEPTH` hidden layers of 100 units (fan-in scaled initial
    weights, see :func:`batchnorm.lab.models.mlp`), with and without BN before each activation.
    Measures ``‖∂L/∂W_l‖`` for every linear layer on a fixed batch of 60 training examples
    (:func:`batchnorm.lab.training.gradient_norms`), at initialization (geometric mean over the
    seeds) and during SGD training (lr :data:`GRADIENT_LR`, the sweep seeds). The ratio of layer
    1 to the last hidden layer, ``r``, summarizes the flow: ``r^(1/(L−1))`` is the factor per
    layer, and :func:`verdict` names it with the :data:`VERDICT_FACTOR` threshold.
    """
    result = ExperimentResult(
        "gradient-flow",
        "Gradient flow in deep networks",
        "BN reduces the risk of vanishing or exploding gradients, so deep networks train "
        "(a 16-layer sigmoid network's gradient vanishes without BN); but at initialization a "
        "deep plain BN network has gradients that grow towards the input by a factor per layer, "
        "i.e. explode with depth.",
        "Ioffe & Szegedy 2015, Sec. 3.3; Yang et al. 2019 (mean field theory of BN)",
    )
    runs = context.runner.run(gradient_flow_runs(context), "7 gradient flow")
    count, sweep = len(context.seeds), len(sweep_seeds(context))
    init_runs, trained_runs = runs[: 6 * count], runs[6 * count :]
    last = GRADIENT_DEPTH - 1  # index of the last hidden layer's weight
    observations: dict[tuple[str, str], str] = {}
    ratio_at_init: dict[tuple[str, str], float] = {}
    effect = []
    for a, activation in enumerate(GRADIENT_ACTIVATIONS):
        for b, arm in enumerate(ARMS):
            group = 2 * a + b
            at_init = _per_layer(init_runs[group * count : (group + 1) * count], 0)
            trained = trained_runs[group * sweep : (group + 1) * sweep]
            after = _per_layer(trained, -1)
            ratio = at_init[0] / at_init[last] if at_init[last] > 0 else math.inf
            ratio_after = after[0] / after[last] if after[last] > 0 else math.inf
            final = statistics.fmean(run["final_test_acc"] for run in trained)
            observations[(activation, arm)] = verdict(ratio)
            ratio_at_init[(activation, arm)] = ratio
            label = f"{activation}, {arm}"
            result.curves[label] = {
                "layers": list(range(1, len(at_init) + 1)),
                "init": at_init,
                "trained": after,
                "steps": trained[0]["steps"],
                "test_acc": trained[0]["test_acc"],
            }
            result.summary[f"layer-1 gradient norm at init, {label}"] = at_init[0]
            result.summary[f"layer 1 / layer {last + 1} gradient at init, {label}"] = ratio
            result.summary[f"factor per layer at init, {label}"] = ratio ** (1.0 / last)
            result.summary[f"verdict at init, {label}"] = verdict(ratio)
            result.summary[
                f"layer 1 / layer {last + 1} gradient after {context.budget.gradient_steps} "
                f"steps, {label}"
            ] = ratio_after
            result.summary[f"final test accuracy, {label}"] = final
        plain, normalized = (
            result.summary[f"layer-1 gradient norm at init, {activation}, {arm}"] for arm in ARMS
        )
        assert isinstance(plain, float)
        assert isinstance(normalized, float)
        result.summary[f"layer-1 gradient BN / no BN at init, {activation}"] = (
            normalized / plain if plain > 0 else math.inf
        )
        ratios = {arm: ratio_at_init[(activation, arm)] for arm in ARMS}
        effect.append(
            f"{activation} "
            + " vs ".join(
                f"{arm} {ratios[arm]:.2g} ({observations[(activation, arm)]})" for arm in ARMS
            )
        )
    vanishing_kept = (
        observations[("sigmoid", "no BN")] == "vanishing"
        and observations[("sigmoid", "BN")] != "vanishing"
    )
    exploding = [a for a in GRADIENT_ACTIVATIONS if observations[(a, "BN")] == "exploding"]
    result.summary["observed: BN keeps the sigmoid network from vanishing"] = (
        "yes" if vanishing_kept else "no"
    )
    result.summary["observed: BN networks exploding at init"] = ", ".join(exploding) or "none"
    result.summary["hidden layers"] = GRADIENT_DEPTH
    result.summary["verdict threshold (× between layer 1 and the last)"] = VERDICT_FACTOR
    result.effect = (
        f"layer-1 / layer-{last + 1} gradient at init: "
        + "; ".join(effect)
        + ". Observed: "
        + ("BN keeps the sigmoid net from vanishing" if vanishing_kept else "no rescue of sigmoid")
        + "; "
        + (
            f"BN {', '.join(exploding)} explode{'s' if len(exploding) == 1 else ''} at init"
            if exploding
            else f"no BN net explodes at init (threshold ×{VERDICT_FACTOR:g})"
        )
    )
    return result


def which_axes_runs(context: LabContext) -> list[RunSpec]:
    """The runs of :func:`which_axes`: BN and LN at every batch size, on the sweep seeds."""
    steps = context.budget.axes_steps
    return [
        RunSpec(
            "mlp",
            norm,
            AXES_LR,
            steps,
            batch_size,
            seed,
            max(1, steps // 8),
            gradient_norms=True,
        )
        for batch_size in AXES_BATCH_SIZES
        for norm in AXES_NORMS.values()
        for seed in sweep_seeds(context)
    ]


def which_axes(context: LabContext) -> ExperimentResult:
    """Claim 8: BN's statistics are over the batch, not each sample; that helps with large
    batches and hurts with tiny ones, where layer normalization does not depend on the batch.

    The lab's MLP (3×100 sigmoid, N(0, 0.1²) weights) with :class:`batchnorm.BatchNorm1d` or
    ``torch.nn.LayerNorm`` before each sigmoid, trained for ``budget.axes_steps`` SGD steps at lr
    :data:`AXES_LR` with batches of each size in :data:`AXES_BATCH_SIZES`; test accuracy in
    evaluation mode (BN: running estimates). BN "helps" at a size where its accuracy exceeds
    LN's by more than :data:`AXES_MARGIN`, "hurts" where it is below by more. The layer-1
    gradient norm at initialization, on one batch of that size, shows the mechanism at batch 2:
    each normalized value of a pair is ±1 whatever the inputs (x̂ = ±d/√(d² + 4ε) for the
    difference d of the two), so what reaches the layers below a BN passes only through ε:
    about 0 for most units, and up to 1/(2√ε) ≈ 158 times the incoming gradient for a unit
    whose two values nearly coincide, i.e. erratic.
    """
    result = ExperimentResult(
        "which-axes",
        "Which axes: batch norm vs layer norm",
        "BN computes each feature's statistics over the mini-batch (and space), not over each "
        "sample (that is layer norm); so BN depends on the batch: it is unreliable when batches "
        "are tiny, where layer norm is not, and with larger batches it trains this network faster.",
        "Ioffe & Szegedy 2015, Sec. 3; Ba et al. 2016 (layer norm); Wu & He 2018, Fig. 1, 2",
    )
    runs = context.runner.run(which_axes_runs(context), "8 which axes")
    sweep = len(sweep_seeds(context))
    accuracy: dict[tuple[str, int], float] = {}
    index = 0
    for batch_size in AXES_BATCH_SIZES:
        for arm in AXES_NORMS:
            group = runs[index : index + sweep]
            index += sweep
            accuracy[(arm, batch_size)] = statistics.fmean(run["final_test_acc"] for run in group)
            gradient = _geometric_mean([run["gradient_norms"][0][0] for run in group])
            result.summary[f"final test accuracy, batch {batch_size}, {arm}"] = accuracy[
                (arm, batch_size)
            ]
            result.summary[f"layer-1 gradient norm at init, batch {batch_size}, {arm}"] = gradient
            curve = result.curves.setdefault(
                arm, {"batch_sizes": [], "final": [], "gradient": [], "curves": {}}
            )
            curve["batch_sizes"].append(batch_size)
            curve["final"].append(accuracy[(arm, batch_size)])
            curve["gradient"].append(gradient)
            curve["curves"][str(batch_size)] = {
                "steps": group[0]["steps"],
                "test_acc": group[0]["test_acc"],
            }
    helps = [b for b in AXES_BATCH_SIZES if accuracy[("BN", b)] > accuracy[("LN", b)] + AXES_MARGIN]
    hurts = [b for b in AXES_BATCH_SIZES if accuracy[("BN", b)] < accuracy[("LN", b)] - AXES_MARGIN]
    ties = [b for b in AXES_BATCH_SIZES if b not in helps and b not in hurts]
    for name, sizes in (("helps", helps), ("hurts", hurts), ("ties", ties)):
        result.summary[f"batch sizes where BN {name}"] = ", ".join(map(str, sizes)) or "none"
    result.summary["steps per run"] = context.budget.axes_steps
    result.summary["learning rate"] = AXES_LR
    pairs = ", ".join(
        f"{b}: {accuracy[('BN', b)]:.0%}/{accuracy[('LN', b)]:.0%}" for b in AXES_BATCH_SIZES
    )
    smallest = AXES_BATCH_SIZES[0]
    bn_gradient, ln_gradient = (
        result.summary[f"layer-1 gradient norm at init, batch {smallest}, {arm}"]
        for arm in AXES_NORMS
    )
    result.effect = (
        f"test accuracy BN/LN by batch size: {pairs}; "
        f"BN hurts at {result.summary['batch sizes where BN hurts']}, "
        f"helps at {result.summary['batch sizes where BN helps']}"
        + (f", ties at {result.summary['batch sizes where BN ties']}" if ties else "")
        + f"; layer-1 gradient at batch {smallest}: BN {bn_gradient:.1e} vs LN {ln_gradient:.1e}"
    )
    return result
