"""One figure per experiment, drawn from the numbers in its :class:`ExperimentResult`.

Uses matplotlib's object-oriented API on the Agg canvas (no display, no global backend state):
``Figure`` → ``savefig``. Every figure has a title, axis labels and a legend, and repeats the
experiment's key numbers in its title so that it reads on its own.

Why this file is long: one self-contained drawing function per experiment (ten), plus the
cube diagram of the normalization axes; none is on a hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Polygon

from batchnorm.lab.experiments import SMALL_BATCH_CONFIGS, ExperimentResult
from batchnorm.lab.experiments_gradients import GRADIENT_ACTIVATIONS, GRADIENT_DEPTH, GRADIENT_LR

__all__ = ["PLOTTERS", "plot_experiment"]

#: Colours: no BN and BN throughout, then the variants.
COLORS = {"no BN": "tab:red", "BN": "tab:blue"}


#: How a figure's panels are laid out: a number of columns in one row, or a mosaic (rows of
#: panel names; a name repeated spans cells), the panels then passed in order of first appearance.
Layout = int | list[list[str]]


def _figure(layout: Layout = 1) -> tuple[Figure, list[Axes]]:
    if isinstance(layout, int):
        figure = Figure(figsize=(6.0 * layout, 4.4), dpi=110, layout="constrained")
        return figure, [figure.add_subplot(1, layout, i + 1) for i in range(layout)]
    rows, columns = len(layout), len(layout[0])
    figure = Figure(figsize=(4.0 * columns, 3.6 * rows), dpi=110, layout="constrained")
    panels = figure.subplot_mosaic(layout)  # type: ignore[arg-type]
    names = list(dict.fromkeys(name for row in layout for name in row))
    return figure, [panels[name] for name in names]


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


def _gradient_flow(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    """Per activation: ‖∂L/∂W_l‖ per layer, at init and after training, no BN vs BN."""
    last = GRADIENT_DEPTH
    for ax, activation in zip(axes, GRADIENT_ACTIVATIONS, strict=True):
        ratios = []
        for arm in ("no BN", "BN"):
            curve = result.curves.get(f"{activation}, {arm}")
            if curve is None:
                continue
            color = COLORS[arm]
            ax.plot(
                curve["layers"],
                curve["init"],
                "-o",
                color=color,
                markersize=3,
                label=f"{arm}, at init",
            )
            ax.plot(
                curve["layers"],
                curve["trained"],
                "--",
                color=color,
                label=f"{arm}, after step {curve['steps'][-1]}",
            )
            ratio = result.summary.get(
                f"layer 1 / layer {last} gradient at init, {activation}, {arm}"
            )
            if isinstance(ratio, float):
                ratios.append(f"{arm} {ratio:.2g}")
        ax.set(
            xlabel=f"linear layer (1 = input side, {last + 1} = output)",
            ylabel="‖∂L/∂W‖ (batch of 60)",
            yscale="log",
            title=f"{activation}: layer 1 / layer {last} at init: " + ", ".join(ratios),
        )
        ax.title.set_fontsize(9)
        ax.legend(loc="best", fontsize=8)
    rescue = result.summary.get("observed: BN keeps the sigmoid network from vanishing")
    exploding = result.summary.get("observed: BN networks exploding at init")
    figure.suptitle(
        f"7. Gradient flow through {last} hidden layers of 100 (fan-in scaled init, "
        f"SGD lr {GRADIENT_LR:g})\n"
        f"observed: BN keeps sigmoid from vanishing: {rescue}; BN nets exploding at init: "
        f"{exploding}",
        fontsize=10,
    )


#: The cube of each normalization: N (batch) across, C (channels) in depth, H·W up.
_CUBE = (5, 6, 4)


def _cube(ax: Axes, shaded: Callable[[int, int, int], bool], title: str) -> None:
    """Draws an N × C × (H·W) cube of cells, those normalized together by one μ, σ² in blue
    (as in Wu & He 2018, Fig. 2)."""
    count, channels, space = _CUBE
    depth_x, depth_y = 0.55, 0.45

    def point(n: float, c: float, s: float) -> tuple[float, float]:
        return n + depth_x * c, s + depth_y * c

    faces = []
    for n in range(count):
        for s in range(space):  # front face, c = 0
            corners = [(n, 0, s), (n + 1, 0, s), (n + 1, 0, s + 1), (n, 0, s + 1)]
            faces.append((corners, shaded(n, 0, s), 1.0))
        for c in range(channels):  # top face, s = space
            corners = [(n, c, space), (n + 1, c, space), (n + 1, c + 1, space), (n, c + 1, space)]
            faces.append((corners, shaded(n, c, space - 1), 0.8))
    for c in range(channels):  # right face, n = count
        for s in range(space):
            corners = [(count, c, s), (count, c + 1, s), (count, c + 1, s + 1), (count, c, s + 1)]
            faces.append((corners, shaded(count - 1, c, s), 0.6))
    for corners, on, light in faces:
        color = (0.25 * light, 0.45 * light, 0.95 * light) if on else (light, light, light)
        ax.add_patch(
            Polygon(
                [point(*corner) for corner in corners],
                closed=True,
                facecolor=color,
                edgecolor="0.3",
                linewidth=0.6,
            )
        )
    ax.annotate("N (batch)", point(count / 2, 0, -0.15), ha="center", va="top", fontsize=8)
    ax.annotate(
        "C (channels)",
        point(count + 0.15, channels / 2, 0),
        ha="left",
        va="top",
        fontsize=8,
        rotation=39,
    )
    ax.annotate(
        "H, W", point(-0.15, 0, space / 2), ha="right", va="center", fontsize=8, rotation=90
    )
    ax.set_xlim(-1.0, count + depth_x * channels + 1.4)
    ax.set_ylim(-1.0, space + depth_y * channels + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=9)


def _which_axes(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    """The four normalizations' axes as cubes, then BN vs LN over the batch size."""
    half = _CUBE[1] // 2
    cubes: list[tuple[str, Callable[[int, int, int], bool]]] = [
        ("Batch norm: per channel,\nover N and H, W", lambda n, c, s: c == 0),
        ("Layer norm: per sample,\nover C and H, W", lambda n, c, s: n == 0),
        ("Instance norm: per sample and channel,\nover H, W", lambda n, c, s: n == 0 and c == 0),
        ("Group norm: per sample and group\nof channels, over the group and H, W",
         lambda n, c, s: n == 0 and c < half),
    ]  # fmt: skip
    for ax, (title, shaded) in zip(axes[:4], cubes, strict=True):
        _cube(ax, shaded, title)
    accuracy_ax, gradient_ax = axes[4:]
    colors = {"BN": "tab:blue", "LN": "tab:green"}
    for arm, curve in result.curves.items():
        accuracy_ax.plot(
            curve["batch_sizes"],
            curve["final"],
            "-o",
            color=colors.get(arm),
            label=f"{arm} (test accuracy, eval mode)",
        )
        gradient_ax.plot(
            curve["batch_sizes"], curve["gradient"], "-o", color=colors.get(arm), label=arm
        )
    summary = result.summary
    hurts, helps = (
        summary.get("batch sizes where BN hurts"),
        summary.get("batch sizes where BN helps"),
    )
    steps, lr = summary.get("steps per run"), summary.get("learning rate")
    accuracy_ax.set(
        xscale="log",
        xlabel="batch size",
        ylabel="final test accuracy",
        ylim=(0, 1.02),
        title=f"after {steps} steps (lr {lr}): BN hurts at {hurts}, helps at {helps}",
    )
    gradient_ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="‖∂L/∂W₁‖ at init",
        title="layer-1 gradient at init, on one batch of that size",
    )
    for ax in (accuracy_ax, gradient_ax):
        ax.title.set_fontsize(9)
        ax.legend(loc="best", fontsize=8)
        if "BN" in result.curves:
            sizes = result.curves["BN"]["batch_sizes"]
            ax.set_xticks(sizes, [str(size) for size in sizes])
            ax.minorticks_off()
    figure.suptitle(
        "8. Which axes: each normalization averages over the blue cells; "
        "the lab's MLP with BN or layer norm (LN) over batch sizes",
        fontsize=10,
    )


def _biased_variance(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def _worked_example(result: ExperimentResult, figure: Figure, axes: list[Axes]) -> None:
    """The worked example's batch, x̂, y and the evaluation output, as annotated tables."""
    panels = (
        ("x", "the batch x"),
        ("x_hat", "x̂ = (x − μ)/√(σ² + ε)\neach column: mean 0, variance 1"),
        ("y", "y = γ·x̂ + β (training)"),
        ("y_eval", "evaluation mode\n(running estimates after 1 step)"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        per_channel = result.curves[key]  # (C, N)
        table = [list(row) for row in zip(*per_channel, strict=True)]  # (N, C)
        limit = max(abs(v) for row in table for v in row) or 1.0
        ax.imshow(table, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto")
        for n, row in enumerate(table):
            for c, value in enumerate(row):
                ax.text(c, n, f"{value:.3g}", ha="center", va="center", fontsize=9)
        if key == "x":  # each column's statistics under the batch
            labels = [
                f"f{c}\nμ = {sum(v) / len(v):.3g}\nσ² = {_biased_variance(v):.3g}"
                for c, v in enumerate(per_channel)
            ]
        else:
            labels = [
                f"f{c}\nmean {sum(v) / len(v) + 0.0:.2g}\nvar {_biased_variance(v):.4g}"
                for c, v in enumerate(per_channel)
            ]
        ax.set_xticks(range(len(per_channel)), labels, fontsize=8)
        ax.set_yticks(range(len(table)), [f"x{n}" for n in range(len(table))])
        ax.set_title(title, fontsize=9)
    figure.suptitle(
        "9. Worked example: batch norm by hand, checked against batchnorm.BatchNorm1d\n"
        + result.effect,
        fontsize=10,
    )


#: Experiment key → (layout of the panels, drawing function).
PLOTTERS: dict[str, tuple[Layout, Callable[[ExperimentResult, Figure, list[Axes]], None]]] = {
    "convergence": (1, _convergence),
    "distributions": (2, _distributions),
    "learning-rates": (2, _learning_rates),
    "regularization": (1, _regularization),
    "cnn-rnn": (1, _cnn_rnn),
    "small-batches": (1, _small_batches),
    "landscape": (2, _landscape),
    "gradient-flow": (len(GRADIENT_ACTIVATIONS), _gradient_flow),
    "which-axes": ([["bn", "ln", "in", "gn"], ["acc", "acc", "grad", "grad"]], _which_axes),
    "worked-example": ([["x", "x_hat", "y", "y_eval"]], _worked_example),
}


def plot_experiment(result: ExperimentResult, folder: Path) -> Path:
    """Draws the figure of ``result`` into ``folder/<key>.png`` and records its name.

    Args:
        result: the experiment's outcome; ``result.figure`` is set to the file name.
        folder: the output folder (must exist).

    Returns:
        The path of the PNG.
    """
    layout, draw = PLOTTERS[result.key]
    figure, axes = _figure(layout)
    draw(result, figure, axes)
    path = folder / f"{result.key}.png"
    figure.savefig(path)
    result.figure = path.name
    return path
