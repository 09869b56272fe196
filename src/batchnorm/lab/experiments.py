"""The experiments of the lab: one function per claim about batch normalization.

Each function takes a :class:`LabContext` (data, seeds, budget, runner) and returns an
:class:`ExperimentResult` holding the claim, every measured number (``summary`` for scalars the
report prints, ``curves`` for what the plots draw), a one-line measured effect, and notes (e.g.
a part skipped because a layer is not available). Runs are shared through the runner's cache:
the convergence runs also serve the distribution, learning-rate and regularization claims.
Each experiment's ``…_runs(context)`` lists the training runs it will ask for, so that a
session can start them all at once (:meth:`batchnorm.lab.training.Runner.prefetch`); the
registry of experiments is :mod:`batchnorm.lab.catalog`. The gradient-flow and which-axes
experiments are in :mod:`batchnorm.lab.experiments_gradients`, the worked example in
:mod:`batchnorm.lab.explain`.

References:
    S. Ioffe and C. Szegedy, "Batch Normalization: Accelerating Deep Network Training by
    Reducing Internal Covariate Shift", ICML 2015.
    S. Ioffe, "Batch Renormalization", NeurIPS 2017.
    E. Hoffer, I. Hubara, D. Soudry, "Train longer, generalize better" (Ghost BN), NeurIPS 2017.
    T. Cooijmans et al., "Recurrent Batch Normalization", ICLR 2017.
    S. Santurkar et al., "How Does Batch Normalization Help Optimization?", NeurIPS 2018.

Why this file is long: one function per claim of the lab (seven), each with its own setup, runs and
verdict; none is on a hot path.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batchnorm.lab.models import VariantUnavailable, load_variant
from batchnorm.lab.training import Runner, RunResult, RunSpec

__all__ = [
    "BUDGETS",
    "MLP_ARMS",
    "Budget",
    "ExperimentResult",
    "LabContext",
    "cnn_rnn",
    "cnn_rnn_runs",
    "convergence",
    "distributions",
    "landscape",
    "landscape_runs",
    "learning_rate_runs",
    "learning_rates",
    "mlp_pair_runs",
    "regularization",
    "small_batch_runs",
    "small_batches",
    "sweep_seeds",
]

#: Learning rate of the sigmoid MLP (×1), with SGD and batches of 60 as in the paper's Fig. 1.
BASE_LR = 0.5
#: Batch size of the MLP and CNN runs (Ioffe & Szegedy 2015, Sec. 4.1).
BATCH_SIZE = 60
#: Batch size of the small, non-iid runs.
SMALL_BATCH = 4


@dataclass(frozen=True)
class Budget:
    """How long each experiment trains.

    Attributes:
        name: ``quick``, ``default`` or ``full``.
        seeds: number of seeds when ``--seeds`` is not given.
        mlp_steps: SGD steps of the MLP runs (convergence, distributions, learning rates,
            regularization).
        eval_every: steps between evaluations.
        sweep_seeds: how many of the seeds the sweeps (learning rates, small batches) use.
        cnn_steps: steps of the CNN runs.
        rnn_steps: steps of the (BN-)LSTM runs.
        small_batch_steps: steps of the small-batch runs.
        probe_steps: steps of the loss-landscape runs.
        probe_every: steps between landscape probes.
        gradient_steps: steps of the deep networks of the gradient-flow experiment.
        axes_steps: steps of each batch size of the batch-norm vs layer-norm sweep.
    """

    name: str
    seeds: int
    mlp_steps: int
    eval_every: int
    sweep_seeds: int
    cnn_steps: int
    rnn_steps: int
    small_batch_steps: int
    probe_steps: int
    probe_every: int
    gradient_steps: int
    axes_steps: int


BUDGETS = {
    "quick": Budget("quick", 1, 60, 20, 1, 20, 10, 40, 40, 20, 20, 40),
    "default": Budget("default", 3, 2000, 50, 1, 300, 120, 800, 1000, 100, 100, 400),
    "full": Budget("full", 5, 10000, 100, 5, 3000, 2000, 6000, 5000, 250, 2000, 3000),
}


@dataclass
class LabContext:
    """What every experiment needs.

    Attributes:
        runner: executes and caches the training runs (holds the dataset).
        seeds: the seeds; results are averaged over them.
        budget: the schedule.
    """

    runner: Runner
    seeds: tuple[int, ...]
    budget: Budget


@dataclass
class ExperimentResult:
    """The outcome of one experiment.

    Attributes:
        key: the experiment's command-line name.
        title: a short title.
        claim: the claim, as the literature states it.
        source: where the claim comes from.
        effect: one line: what was measured.
        summary: scalar numbers shown in the report (``None`` when undefined).
        curves: series the plots draw.
        notes: remarks, e.g. parts skipped and why.
        text: a block of preformatted text the report shows (e.g. the worked example).
        figure: file name of the plot, set when it is drawn.
    """

    key: str
    title: str
    claim: str
    source: str
    effect: str = ""
    summary: dict[str, float | int | str | None] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    text: str = ""
    figure: str | None = None


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _std(values: Sequence[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def _mean_curve(runs: Sequence[RunResult], key: str) -> tuple[list[float], list[float]]:
    """Mean and standard deviation over runs of the series ``key``, per evaluation."""
    length = min(len(run[key]) for run in runs)
    columns = [[run[key][i] for run in runs] for i in range(length)]
    return [_mean(c) for c in columns], [_std(c) for c in columns]


def _first_step_reaching(steps: Sequence[int], curve: Sequence[float], target: float) -> int | None:
    """The first evaluated step whose value is ≥ target, or None."""
    return next((s for s, v in zip(steps, curve, strict=False) if v >= target), None)


def _mlp_spec(context: LabContext, norm: str | None, seed: int, lr_factor: float = 1.0) -> RunSpec:
    budget = context.budget
    return RunSpec(
        "mlp", norm, BASE_LR * lr_factor, budget.mlp_steps, BATCH_SIZE, seed, budget.eval_every
    )


#: The two arms of the MLP experiments: label → normalization.
MLP_ARMS = {"no BN": None, "BN": "bn"}


def mlp_pair_runs(context: LabContext) -> list[RunSpec]:
    """The convergence runs (no BN and BN, every seed), shared by four experiments."""
    return [_mlp_spec(context, norm, seed) for norm in MLP_ARMS.values() for seed in context.seeds]


def _mlp_pairs(context: LabContext, description: str) -> dict[str, list[RunResult]]:
    """The results of :func:`mlp_pair_runs` by arm."""
    runs = context.runner.run(mlp_pair_runs(context), description)
    count = len(context.seeds)
    return {label: runs[i * count : (i + 1) * count] for i, label in enumerate(MLP_ARMS)}


def convergence(context: LabContext) -> ExperimentResult:
    """Claim 1: BN reaches a given accuracy in far fewer steps (Ioffe & Szegedy 2015, Fig. 1a).

    Trains the sigmoid MLP with and without :class:`batchnorm.BatchNorm1d` on every seed and
    compares mean test-accuracy curves: the steps each needs to reach the best mean accuracy
    of the no-BN network, their ratio, and the gap at the middle of training.
    """
    result = ExperimentResult(
        "convergence",
        "Faster convergence",
        "With BN before each sigmoid, the network reaches the accuracy of the plain network in "
        "far fewer steps, and ends higher (MNIST: 3×100 sigmoid units, batch 60).",
        "Ioffe & Szegedy 2015, Fig. 1(a)",
    )
    runs = _mlp_pairs(context, "1 convergence")
    steps = runs["BN"][0]["steps"]
    for label, group in runs.items():
        mean, std = _mean_curve(group, "test_acc")
        result.curves[label] = {"steps": steps, "mean": mean, "std": std}
    target = max(result.curves["no BN"]["mean"])
    reach = {
        label: _first_step_reaching(steps, result.curves[label]["mean"], target) for label in runs
    }
    middle = len(steps) // 2
    bn_mean, plain_mean = result.curves["BN"]["mean"], result.curves["no BN"]["mean"]
    result.summary = {
        "no-BN best test accuracy (target)": target,
        "steps to target, no BN": reach["no BN"],
        "steps to target, BN": reach["BN"],
        "speed-up (steps no BN / steps BN)": (
            reach["no BN"] / reach["BN"] if reach["no BN"] and reach["BN"] else None
        ),
        "mid-training step": steps[middle],
        "test accuracy at mid-training, no BN": result.curves["no BN"]["mean"][middle],
        "test accuracy at mid-training, BN": result.curves["BN"]["mean"][middle],
        "largest gap BN − no BN": max(
            bn - plain for bn, plain in zip(bn_mean, plain_mean, strict=True)
        ),
        "final test accuracy, no BN": result.curves["no BN"]["mean"][-1],
        "final test accuracy, BN": result.curves["BN"]["mean"][-1],
    }
    speedup = result.summary["speed-up (steps no BN / steps BN)"]
    result.effect = (
        f"BN reaches {target:.1%} at step {reach['BN']} vs {reach['no BN']} "
        + (f"({speedup:.0f}× fewer steps)" if isinstance(speedup, float) else "")
        + f"; final {bn_mean[-1]:.1%} vs {plain_mean[-1]:.1%}"
    )
    return result


def distributions(context: LabContext) -> ExperimentResult:
    """Claim 2: BN keeps a sigmoid's input distribution stable (Ioffe & Szegedy 2015, Fig. 1b,c).

    Follows the 15th/50th/85th percentiles over the test set of the input to one sigmoid of the
    last hidden layer. Drift = range over training (after the first evaluation) of each
    percentile, divided by the final 15–85 spread, averaged over the three and over the seeds.
    """
    result = ExperimentResult(
        "distributions",
        "Stable input distributions",
        "Without BN the distribution of a sigmoid's input shifts over training (mean and "
        "variance change); with BN it stays much more stable.",
        "Ioffe & Szegedy 2015, Fig. 1(b, c)",
    )
    runs = _mlp_pairs(context, "2 distributions")
    drifts: dict[str, list[float]] = {}
    for label, group in runs.items():
        first = group[0]
        result.curves[label] = {"steps": first["steps"], "percentiles": first["percentiles"]}
        drifts[label] = [_relative_drift(run["percentiles"]) for run in group]
        medians = [p[1] for run in group for p in run["percentiles"][1:]]
        result.summary[f"median range over training, {label}"] = max(medians) - min(medians)
        result.summary[f"relative drift, {label}"] = _mean(drifts[label])
    no_bn, bn = _mean(drifts["no BN"]), _mean(drifts["BN"])
    result.summary["drift ratio no BN / BN"] = no_bn / bn if bn > 0 else None
    result.effect = f"relative drift of the percentiles: no BN {no_bn:.2f}, BN {bn:.2f}"
    return result


def _relative_drift(percentiles: Sequence[Sequence[float]]) -> float:
    """Mean over the 15/50/85th percentiles of (range over training) / final 15–85 spread."""
    later = percentiles[1:] or percentiles  # the first evaluation is the untrained network
    spread = max(later[-1][2] - later[-1][0], 1e-12)
    ranges = [max(p[i] for p in later) - min(p[i] for p in later) for i in range(3)]
    return _mean(ranges) / spread


#: The learning-rate sweep: (label, normalization, factor × BASE_LR).
LR_SWEEP = (
    ("no BN ×0.1", None, 0.1),
    ("no BN ×1", None, 1.0),
    ("no BN ×5", None, 5.0),
    ("no BN ×30", None, 30.0),
    ("BN ×1", "bn", 1.0),
    ("BN ×5", "bn", 5.0),
    ("BN ×30", "bn", 30.0),
)


def sweep_seeds(context: LabContext) -> tuple[int, ...]:
    """The seeds of the sweeps: the first ``budget.sweep_seeds`` (at least one)."""
    return context.seeds[: max(1, context.budget.sweep_seeds)]


def learning_rate_runs(context: LabContext) -> list[RunSpec]:
    """The runs of :func:`learning_rates`: every rate of :data:`LR_SWEEP` on the sweep seeds."""
    return [
        _mlp_spec(context, norm, seed, factor)
        for _, norm, factor in LR_SWEEP
        for seed in sweep_seeds(context)
    ]


def learning_rates(context: LabContext) -> ExperimentResult:
    """Claim 3: BN allows much larger learning rates (Ioffe & Szegedy 2015, Sec. 3.3, BN-x5/x30).

    Trains the MLP at ×0.1, ×1, ×5 and ×30 the base rate without BN, and ×1, ×5, ×30 with BN,
    and reports the final test accuracy, divergence, and steps to reach the no-BN ×1 network's
    best accuracy.
    """
    result = ExperimentResult(
        "learning-rates",
        "Larger learning rates",
        "BN makes training robust to the scale of the parameters, so much higher learning rates "
        "(×5, ×30) train fast without diverging; without BN a low rate is slow and a high one "
        "fails.",
        "Ioffe & Szegedy 2015, Sec. 3.3 and 4.2.1 (BN-x5, BN-x30)",
    )
    runs = context.runner.run(learning_rate_runs(context), "3 learning rates")
    count = len(sweep_seeds(context))
    grouped = {label: runs[i * count : (i + 1) * count] for i, (label, _, _) in enumerate(LR_SWEEP)}
    target = max(_mean_curve(grouped["no BN ×1"], "test_acc")[0])
    lines = []
    for label, group in grouped.items():
        mean, _ = _mean_curve(group, "test_acc")
        steps = group[0]["steps"][: len(mean)]
        diverged = sum(run["diverged"] for run in group)
        final = _mean([run["final_test_acc"] for run in group])
        reach = _first_step_reaching(steps, mean, target)
        result.curves[label] = {"steps": steps, "mean": mean, "final": final, "diverged": diverged}
        result.summary[f"final test accuracy, {label}"] = final
        result.summary[f"steps to {target:.1%}, {label}"] = reach
        result.summary[f"diverged runs, {label}"] = diverged
        lines.append(f"{label.replace(' ', '')} {final:.0%}")
    result.summary["learning rate ×1"] = BASE_LR
    result.effect = "final accuracy: " + ", ".join(lines)
    return result


def regularization(context: LabContext) -> ExperimentResult:
    """Claim 4: BN regularizes (Ioffe & Szegedy 2015, Sec. 3.4): a smaller train–test gap.

    Compares, over the seeds, the final train and test accuracy and loss of the convergence
    runs, and reports whatever gap they show.
    """
    result = ExperimentResult(
        "regularization",
        "Regularization",
        "BN regularizes the model (each example is normalized with the statistics of a random "
        "batch), reducing the need for dropout: a smaller gap between train and test.",
        "Ioffe & Szegedy 2015, Sec. 3.4",
    )
    runs = _mlp_pairs(context, "4 regularization")
    effect = []
    for label, group in runs.items():
        steps = group[0]["steps"]
        train_mean, _ = _mean_curve(group, "train_acc")
        test_mean, _ = _mean_curve(group, "test_acc")
        result.curves[label] = {"steps": steps, "train": train_mean, "test": test_mean}
        gaps = [run["final_train_acc"] - run["final_test_acc"] for run in group]
        loss_gaps = [run["test_loss"][-1] - run["train_loss"][-1] for run in group]
        result.summary[f"final train accuracy, {label}"] = train_mean[-1]
        result.summary[f"final test accuracy, {label}"] = test_mean[-1]
        result.summary[f"accuracy gap train − test, {label}"] = _mean(gaps)
        result.summary[f"accuracy gap std over seeds, {label}"] = _std(gaps)
        result.summary[f"loss gap test − train, {label}"] = _mean(loss_gaps)
        effect.append(f"{label} gap {_mean(gaps):.1%} (loss gap {_mean(loss_gaps):.3f})")
    result.effect = "; ".join(effect)
    return result


def _cnn_rnn_pairs(
    context: LabContext, notes: list[str]
) -> list[tuple[str, list[tuple[str, RunSpec]]]]:
    """The CNN and RNN pairs (family, [(label, spec), (label, spec)]) that can run here.

    A part that cannot run (data without images, BN-LSTM not available) is left out, with a
    note appended to ``notes``.
    """
    budget, seed = context.budget, context.seeds[0]
    dataset = context.runner.dataset
    pairs: list[tuple[str, list[tuple[str, RunSpec]]]] = []
    if dataset.image_shape is None:
        notes.append(f"CNN part skipped: the {dataset.name} data are not images.")
    else:
        pairs.append(
            (
                "CNN",
                [
                    (
                        label,
                        RunSpec(
                            "cnn",
                            norm,
                            0.1,
                            budget.cnn_steps,
                            BATCH_SIZE,
                            seed,
                            max(1, budget.cnn_steps // 20),
                            momentum=0.9,
                        ),
                    )
                    for label, norm in (("CNN", None), ("CNN + BatchNorm2d", "bn"))
                ],
            )
        )
    try:
        load_variant("bnlstm")
    except VariantUnavailable as error:
        notes.append(f"RNN part skipped: {error}.")
    else:
        pairs.append(
            (
                "RNN",
                [
                    (
                        label,
                        RunSpec(
                            cell,
                            None,
                            3e-3,
                            budget.rnn_steps,
                            BATCH_SIZE,
                            seed,
                            max(1, budget.rnn_steps // 12),
                            optimizer="adam",
                        ),
                    )
                    for label, cell in (("LSTM", "lstm"), ("BN-LSTM", "bnlstm"))
                ],
            )
        )
    return pairs


def cnn_rnn_runs(context: LabContext) -> list[RunSpec]:
    """The runs of :func:`cnn_rnn`."""
    return [spec for _, labelled in _cnn_rnn_pairs(context, []) for _, spec in labelled]


def cnn_rnn(context: LabContext) -> ExperimentResult:
    """Claim 5: BN also speeds up convolutional and recurrent networks.

    A small CNN with :class:`batchnorm.BatchNorm2d` vs the same CNN without it (SGD, momentum
    0.9), and, when :mod:`batchnorm.variants` provides it, a BN-LSTM vs an LSTM (Adam) reading
    each example as a sequence (64 pixels of digits). Runs on the first seed.
    """
    result = ExperimentResult(
        "cnn-rnn",
        "Convolutional and recurrent networks",
        "BN applies to convolutions (per channel, over N·H·W) and, normalizing the recurrent "
        "terms separately at each step, to LSTMs, speeding up both.",
        "Ioffe & Szegedy 2015, Sec. 3.2; Cooijmans et al. 2017 (BN-LSTM)",
    )
    pairs = _cnn_rnn_pairs(context, result.notes)
    specs = [spec for _, labelled in pairs for _, spec in labelled]
    runs = iter(context.runner.run(specs, "5 CNN and RNN"))  # one call: the runs overlap
    effect = []
    for family, labelled in pairs:
        (plain_label, bn_label), (plain, normalized) = zip(
            *((label, next(runs)) for label, _ in labelled), strict=True
        )
        target = max(plain["test_acc"])
        for label, run in ((plain_label, plain), (bn_label, normalized)):
            result.curves[label] = {"steps": run["steps"], "test_acc": run["test_acc"]}
            result.summary[f"final test accuracy, {label}"] = run["final_test_acc"]
            result.summary[f"steps to {target:.1%}, {label}"] = _first_step_reaching(
                run["steps"], run["test_acc"], target
            )
        effect.append(
            f"{family}: {bn_label} {normalized['final_test_acc']:.1%} vs "
            f"{plain_label} {plain['final_test_acc']:.1%}"
        )
    result.effect = "; ".join(effect) if effect else "skipped (see notes)"
    return result


#: The small-batch configurations: (label, normalization, non-iid batches).
SMALL_BATCH_CONFIGS = (
    ("BN, iid", "bn", False),
    ("BN, one class", "bn", True),
    ("Batch Renorm, one class", "renorm", True),
    ("Ghost BN, one class", "ghost", True),
)


def _small_batch_configs(notes: list[str]) -> list[tuple[str, str, bool]]:
    """The configurations of :data:`SMALL_BATCH_CONFIGS` whose layer is available (notes for
    the others)."""
    configs = []
    for label, norm, non_iid in SMALL_BATCH_CONFIGS:
        if norm in ("renorm", "ghost"):
            try:
                load_variant(norm)
            except VariantUnavailable as error:
                notes.append(f"{label} skipped: {error}.")
                continue
        configs.append((label, norm, non_iid))
    return configs


def _small_batch_specs(
    context: LabContext, configs: Sequence[tuple[str, str, bool]]
) -> list[RunSpec]:
    budget = context.budget
    return [
        RunSpec(
            "mlp",
            norm,
            0.1,
            budget.small_batch_steps,
            SMALL_BATCH,
            seed,
            max(1, budget.small_batch_steps // 10),
            non_iid=non_iid,
            test_batch_stats=True,
        )
        for _, norm, non_iid in configs
        for seed in sweep_seeds(context)
    ]


def small_batch_runs(context: LabContext) -> list[RunSpec]:
    """The runs of :func:`small_batches`."""
    return _small_batch_specs(context, _small_batch_configs([]))


def small_batches(context: LabContext) -> ExperimentResult:
    """Claim 6a: with small, non-iid batches BN's batch and population statistics disagree.

    Trains the MLP with batches of 4 (every batch from one class, plus an iid reference), with
    BN, Batch Renorm and Ghost BN (virtual batches of 2) where available, and measures test
    accuracy with the population statistics (evaluation mode) and with the statistics of test
    batches of 4 (one class, or mixed).
    """
    result = ExperimentResult(
        "small-batches",
        "Small and non-iid batches",
        "When batches are small or not iid, the batch statistics used in training differ from "
        "the population statistics used at inference, and BN's accuracy drops; Batch Renorm "
        "(and Ghost BN's smaller virtual batches) address this.",
        "Ioffe 2017 (Batch Renorm); Hoffer et al. 2017 (Ghost BN)",
    )
    configs = _small_batch_configs(result.notes)
    specs = _small_batch_specs(context, configs)
    runs = context.runner.run(specs, "6 small batches")
    count = len(sweep_seeds(context))
    effect = []
    for i, (label, _, _) in enumerate(configs):
        group = runs[i * count : (i + 1) * count]
        row = {}
        for key, name in (
            ("final_test_acc", "population statistics"),
            ("batch_stats_acc_one_class", "batch statistics, one-class test batches"),
            ("batch_stats_acc_mixed", "batch statistics, mixed test batches"),
        ):
            row[name] = _mean([run[key] for run in group])
            result.summary[f"{name}, {label}"] = row[name]
        result.curves[label] = row
        effect.append(
            f"{label} {row['population statistics']:.0%} / "
            f"{row['batch statistics, mixed test batches']:.0%}"
        )
    result.effect = "test accuracy, population / batch statistics: " + ", ".join(effect)
    return result


#: Step sizes of the landscape probe, as multiples of the base learning rate.
PROBE_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def landscape_runs(context: LabContext) -> list[RunSpec]:
    """The runs of :func:`landscape`: no BN and BN on the first seed, with the probe."""
    budget, seed = context.budget, context.seeds[0]
    step_sizes = tuple(BASE_LR * factor for factor in PROBE_FACTORS)
    return [
        RunSpec(
            "mlp",
            norm,
            BASE_LR,
            budget.probe_steps,
            BATCH_SIZE,
            seed,
            budget.probe_steps,
            probe_every=budget.probe_every,
            probe_step_sizes=step_sizes,
        )
        for norm in MLP_ARMS.values()
    ]


def landscape(context: LabContext) -> ExperimentResult:
    """Claim 6b: BN makes the loss landscape smoother (Santurkar et al. 2018, Fig. 4).

    Trains the MLP with and without BN (first seed) and, every ``probe_every`` steps, moves
    along the gradient by η ∈ {0.25, 0.5, 1, 2, 4} × lr to measure the range of the loss, the
    change of the gradient, and the effective β-smoothness (see
    :func:`batchnorm.lab.training.landscape_probe`).
    """
    result = ExperimentResult(
        "landscape",
        "Smoother loss landscape",
        "BN makes the loss and its gradient change less along the gradient direction (smaller "
        "loss variation, more predictive gradients, smaller effective β-smoothness).",
        "Santurkar et al. 2018, Fig. 4",
    )
    runs = context.runner.run(landscape_runs(context), "6 landscape")
    means = {}
    for label, run in zip(MLP_ARMS, runs, strict=True):
        probes = run["probes"]
        result.curves[label] = {
            key: [p[key] for p in probes]
            for key in ("step", "loss", "loss_min", "loss_max", "grad_change", "beta")
        }
        for key, name in (
            ("loss_range", "loss range"),
            ("grad_change", "gradient change"),
            ("beta", "effective β-smoothness"),
        ):
            value = _mean([p[key] for p in probes])
            means[(label, key)] = value
            result.summary[f"mean {name}, {label}"] = value
    ratios = []
    for key, name in (
        ("loss_range", "loss range"),
        ("grad_change", "gradient change"),
        ("beta", "β-smoothness"),
    ):
        bn = means[("BN", key)]
        ratio = means[("no BN", key)] / bn if bn > 0 else math.inf
        result.summary[f"{name} ratio no BN / BN"] = ratio
        ratios.append(f"{name} ×{ratio:.2g}")
    result.summary["step sizes η (× lr)"] = ", ".join(f"{f:g}" for f in PROBE_FACTORS)
    result.effect = "no BN / BN: " + ", ".join(ratios)
    return result
