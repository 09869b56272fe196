"""A lab session: runs the chosen experiments, draws their plots and writes the reports.

The session first hands the runner every training run the chosen experiments will ask for
(:data:`batchnorm.lab.catalog.PLANS`), so that with worker processes the pool stays busy across
experiments, then runs the experiments in report order, each waiting only for its own runs.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from batchnorm.lab.catalog import EXPERIMENTS, PLANS
from batchnorm.lab.experiments import BUDGETS, ExperimentResult, LabContext
from batchnorm.lab.plots import plot_experiment
from batchnorm.lab.report import write_html, write_json, write_markdown
from batchnorm.lab.training import Runner

__all__ = ["LabOutput", "default_jobs", "run_lab"]


@dataclass
class LabOutput:
    """What a session produced.

    Attributes:
        results: one per experiment, in report order.
        folder: the output folder.
        report: path of ``report.html``.
        seconds: wall time of the session.
    """

    results: list[ExperimentResult]
    folder: Path
    report: Path
    seconds: float


def default_jobs() -> int:
    """Worker processes by default: the CPUs this process may use, at most 2."""
    return max(
        1,
        min(
            2,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
        ),
    )


def run_lab(
    experiments: Sequence[str] = (),
    *,
    data: str = "digits",
    data_dir: str | Path | None = None,
    seeds: int | None = None,
    budget: str = "default",
    out: str | Path = "lab-output",
    jobs: int = 1,
    progress: bool = True,
) -> LabOutput:
    """Runs experiments and writes one PNG each, ``results.json``, ``report.md``, ``report.html``.

    Args:
        experiments: names from :data:`batchnorm.lab.catalog.EXPERIMENTS`; empty for all.
        data: ``digits``, ``mnist1d`` or ``mnist``.
        data_dir: folder of the MNIST IDX files.
        seeds: number of seeds (0, 1, …); ``None`` for the budget's default.
        budget: ``quick``, ``default`` or ``full``.
        out: output folder (created).
        jobs: worker processes for the training runs.
        progress: show progress bars (on stderr): one over the experiments, one over the
            training steps of the current experiment.

    Returns:
        A :class:`LabOutput`.

    Raises:
        ValueError: on an unknown experiment or budget, or ``seeds < 1``.
    """
    unknown = [name for name in experiments if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(
            f"experiments: unknown {', '.join(map(repr, unknown))}; "
            f"expected some of {', '.join(EXPERIMENTS)}"
        )
    if budget not in BUDGETS:
        raise ValueError(f"budget: expected one of {', '.join(BUDGETS)}, got {budget!r}")
    schedule = BUDGETS[budget]
    count = schedule.seeds if seeds is None else seeds
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"seeds: expected a positive int, got {seeds!r}")
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    runner = Runner(data, data_dir, jobs=jobs, progress=progress)
    context = LabContext(runner, tuple(range(count)), schedule)
    names = [name for name in EXPERIMENTS if not experiments or name in experiments]
    results = []
    try:
        runner.prefetch([spec for name in names for spec in PLANS[name](context)])
        with tqdm(
            names, desc="batchnorm lab", unit="experiment", disable=not progress, leave=True
        ) as bar:
            for name in bar:
                bar.set_postfix_str(name)
                result = EXPERIMENTS[name](context)
                plot_experiment(result, folder)
                results.append(result)
    finally:
        runner.close()
    seconds = time.perf_counter() - start
    meta = {
        "data": data,
        "seeds": count,
        "budget": budget,
        "experiments": ", ".join(names),
        "wall seconds (experiments and plots)": round(seconds, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "CPUs": os.cpu_count(),
        "worker processes": jobs,
        "load average at start (1 min)": load_at_start,
    }
    write_json(folder / "results.json", results, meta)
    write_markdown(folder / "report.md", results, meta)
    write_html(folder / "report.html", results, meta)
    return LabOutput(results, folder, folder / "report.html", seconds)
