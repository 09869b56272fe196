"""One figure per experiment, drawn from the numbers in its :class:`ExperimentResult`.

Uses matplotlib's object-oriented API on the Agg canvas (no display, no global backend state):
``Figure`` → ``savefig``. Every figure has a title, axis labels and a legend, and repeats the
experiment's key numbers in its title so that it reads on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from batchnorm.lab.experiments import SMALL_BATCH_CONFIGS, ExperimentResult

__all__ = ["PLOTTERS", "plot_experiment"]

#: Colours: no BN and BN throughout, then the variants.
COLORS = {"no BN": "tab:red", "BN": "tab:blue"}


def _figure(columns: int = 1) -> tuple[Figure, list[Axes]]:
    figure = Figure(figsize=(6.0 * columns, 4.4), dpi=110, layout="constrained")
    axes = [figure.add_subplot(1, columns, i + 1) for i in range(columns)]
    return figure, axes


def _convergence(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    (ax,) = axes
    for label, curve in result.curves.items():
        low = [m - s for m, s in zip(curve["mean"], curve["std"], strict=True)]
        high = [m + s for m, s in zip(curve["mean"], curve["std"], strict=True)]
        ax.plot(curve["steps"], curve["mean"], color=COLORS.get(label), label=f"{label} (mean)")
        ax.fill_between(
            curve["steps"],
            low,
            high,
            color=COLORS.get(label),
            alpha=0.2,
            label=f"{label} (± 1 std over seeds)",
        )
    target = result.summary["no-BN best test accuracy (target)"]
    if isinstance(target, float):
        ax.axhline(target, color="gray", linestyle=":", label=f"no-BN best = {target:.1%}")
    ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1.02))
    ax.legend(loc="lower right")
    figure.suptitle(
        "1. Convergence: MLP 3×100 sigmoid, SGD batch 60\n" + result.effect, fontsize=10
    )


def _distributions(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    styles: dict[str, Literal[":", "-", "--"]] = {"15th": ":", "50th": "-", "85th": "--"}
    for ax, (label, curve) in zip(axes, result.curves.items(), strict=True):
        for index, style in enumerate(styles.values()):
            values = [p[index] for p in curve["percentiles"]]  # one percentile over time
            ax.plot(curve["steps"], values, style, color=COLORS.get(label))
        drift = result.summary[f"relative drift, {label}"]
        ax.set(
            xlabel="training step",
            ylabel="input to a last-layer sigmoid",
            title=f"{label} (relative drift {drift:.2f})",
        )
    handles = [Line2D([], [], color="black", linestyle=s) for s in styles.values()]
    figure.legend(
        handles,
        [f"{name} percentile over the test set" for name in styles],
        loc="outside lower center",
        ncols=3,
    )
    figure.suptitle(
        "2. Distribution of one sigmoid's input over training (first seed)", fontsize=11
    )


def _learning_rates(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    curves_ax, bars_ax = axes
    labels = list(result.curves)
    colors = {label: ("tab:blue" if label.startswith("BN") else "tab:red") for label in labels}
    styles = {"×0.1": ":", "×1": "-", "×5": "--", "×30": "-."}
    for label in labels:
        curve = result.curves[label]
        style = styles[label.split()[-1]]
        curves_ax.plot(curve["steps"], curve["mean"], style, color=colors[label], label=label)
    curves_ax.set(
        xlabel="training step",
        ylabel="test accuracy",
        ylim=(0, 1.02),
        title="test accuracy during training",
    )
    curves_ax.legend(loc="lower right", fontsize=8)
    finals = [result.curves[label]["final"] for label in labels]
    bars = bars_ax.bar(range(len(labels)), finals, color=[colors[label] for label in labels])
    for bar, label, final in zip(bars, labels, finals, strict=True):
        text = "diverged" if result.curves[label]["diverged"] else f"{final:.1%}"
        bars_ax.annotate(
            text, (bar.get_x() + bar.get_width() / 2, final), ha="center", va="bottom", fontsize=8
        )
    bars_ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    bars_ax.set(
        ylabel="final test accuracy",
        ylim=(0, 1.1),
        title=f"final accuracy per learning rate (×1 = {result.summary['learning rate ×1']})",
    )
    figure.suptitle("3. Learning rates: the same networks at ×0.1 … ×30 the base rate", fontsize=11)


def _regularization(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    (ax,) = axes
    for label, curve in result.curves.items():
        ax.plot(
            curve["steps"], curve["train"], "--", color=COLORS.get(label), label=f"{label}, train"
        )
        ax.plot(curve["steps"], curve["test"], "-", color=COLORS.get(label), label=f"{label}, test")
    ax.set(xlabel="training step", ylabel="accuracy (mean over seeds)", ylim=(0, 1.02))
    ax.legend(loc="lower right")
    figure.suptitle("4. Regularization: train vs test accuracy\n" + result.effect, fontsize=10)


def _cnn_rnn(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    (ax,) = axes
    for label, curve in result.curves.items():
        normalized = "B" in label.replace("CNN", "")
        ax.plot(
            curve["steps"],
            curve["test_acc"],
            "-" if normalized else "--",
            color="tab:blue" if normalized else "tab:red",
            marker="o" if "LSTM" in label else None,
            markersize=3,
            label=label,
        )
    if not result.curves:
        ax.text(
            0.5,
            0.5,
            "skipped:\n" + "\n".join(result.notes),
            ha="center",
            va="center",
            wrap=True,
            transform=ax.transAxes,
        )
    ax.set(xlabel="training step", ylabel="test accuracy", ylim=(0, 1.02))
    if result.curves:
        ax.legend(loc="lower right")
    figure.suptitle(
        "5. CNN (BatchNorm2d) and RNN (BN-LSTM)\n" + result.effect.replace("; ", "\n"), fontsize=10
    )


def _small_batches(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    (ax,) = axes
    labels = list(result.curves)
    modes = [
        "population statistics",
        "batch statistics, one-class test batches",
        "batch statistics, mixed test batches",
    ]
    width = 0.8 / len(modes)
    for index, (mode, color) in enumerate(
        zip(modes, ("tab:blue", "tab:orange", "tab:green"), strict=True)
    ):
        xs = [
            i + (index - 1) * width
            for i, label in enumerate(labels)
            if mode in result.curves[label]
        ]
        values = [result.curves[label][mode] for label in labels if mode in result.curves[label]]
        bars = ax.bar(xs, values, width, color=color, label=mode)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(
                f"{value:.0%}",
                (bar.get_x() + bar.get_width() / 2, value),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(labels)), [label.replace(", ", "\n") for label in labels])
    ax.set(ylabel="test accuracy", ylim=(0, 1.15), xlabel="training batches of 4")
    ax.legend(loc="upper right", fontsize=8)
    skipped = [label for label, _, _ in SMALL_BATCH_CONFIGS if label not in result.curves]
    if skipped:
        ax.text(
            0.02,
            0.97,
            "not run (layer not available):\n" + "\n".join(skipped),
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            color="tab:gray",
        )
    figure.suptitle(
        "6a. Training with batches of 4: population vs batch statistics at test time",
        fontsize=10,
    )


def _landscape(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    loss_ax, gradient_ax = axes
    for label, curve in result.curves.items():
        color = COLORS.get(label)
        loss_ax.fill_between(
            curve["step"],
            curve["loss_min"],
            curve["loss_max"],
            color=color,
            alpha=0.3,
            label=f"{label}: loss range along −gradient",
        )
        loss_ax.plot(curve["step"], curve["loss"], color=color, label=f"{label}: loss")
        gradient_ax.plot(
            curve["step"],
            curve["grad_change"],
            color=color,
            marker="o",
            markersize=3,
            label=f"{label}: max ‖∇L(w − ηg) − ∇L(w)‖",
        )
    loss_ax.set(
        xlabel="training step",
        ylabel="training loss (batch)",
        yscale="log",
        title="loss variation (Santurkar Fig. 4a)",
    )
    gradient_ax.set(
        xlabel="training step",
        ylabel="gradient change",
        yscale="log",
        title="gradient predictiveness (Fig. 4b)",
    )
    loss_ax.legend(loc="best", fontsize=8)
    gradient_ax.legend(loc="best", fontsize=8)
    figure.suptitle(
        f"6b. Loss landscape along the gradient, η = ({result.summary['step sizes η (× lr)']}) × lr"
        f"\n{result.effect}",
        fontsize=10,
    )


#: Experiment key → (number of panels, drawing function).
PLOTTERS: dict[str, tuple[int, Callable[[ExperimentResult, Figure, list[Axes]], None]]] = {
    "convergence": (1, _convergence),
    "distributions": (2, _distributions),
    "learning-rates": (2, _learning_rates),
    "regularization": (1, _regularization),
    "cnn-rnn": (1, _cnn_rnn),
    "small-batches": (1, _small_batches),
    "landscape": (2, _landscape),
}


def plot_experiment(result: ExperimentResult, folder: Path) -> Path:
    """Draws the figure of ``result`` into ``folder/<key>.png`` and records its name.

    Args:
        result: the experiment's outcome; ``result.figure`` is set to the file name.
        folder: the output folder (must exist).

    Returns:
        The path of the PNG.
    """
    columns, draw = PLOTTERS[result.key]
    figure, axes = _figure(columns)
    draw(result, figure, axes)
    path = folder / f"{result.key}.png"
    figure.savefig(path)
    result.figure = path.name
    return path
