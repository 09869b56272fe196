"""Shared benchmark harness: interleaved timing, copy bandwidth, and a results file.

Timing runs every provider of a case in turn within each repeat, so a burst of load from other
processes hits all of them alike, in a new order each repeat (shuffled with a fixed seed): a
provider's time depends on the allocator state the one before it left (whether its output lands
on memory already mapped or page-faults on a fresh mapping), and shuffling spreads that over
all of them instead of always charging the same provider. The figure reported is the median; a
sample can be the mean of several back-to-back calls (``min_sample_ms``), so that one page fault
or interrupt does not decide it.
Bandwidth is the copy bandwidth of the case's own tensor (``dst.copy_(src)`` moves ``2S`` bytes:
one read, one write), timed in the same rounds, so "fraction of copy bandwidth at ``k·S``" is
``(k·S / t) / (2S / t_copy) = k·t_copy / (2·t)``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "copy_step",
    "environment",
    "fraction_of_copy",
    "median_ms",
    "time_interleaved",
    "untimed_setup",
    "write_results",
]


#: One measured step: ``(setup, run)``; ``setup()`` is untimed and its result is passed to ``run``.
Step = tuple[Callable[[], Any], Callable[[Any], Any]]


def untimed_setup() -> None:
    """The setup of a step that needs none."""


#: Seed of the providers' order in each round (:func:`time_interleaved`).
ORDER_SEED = 0


def time_interleaved(
    steps: dict[str, Step], repeats: int, warmup: int, min_sample_ms: float = 0.0
) -> dict[str, list[float]]:
    """Times each step ``repeats`` times, one round after another, after ``warmup`` rounds.

    With ``min_sample_ms`` a sample is the mean of ``k`` back-to-back calls of the step (its
    setup untimed before each), ``k`` chosen per step from the warmup so that a sample lasts
    about ``min_sample_ms``: a page fault or an interrupt that costs a 1 ms call 30% then costs
    the sample a few percent, while a slow step still takes one call per sample.

    Args:
        steps: provider name → ``(setup, run)``; only ``run(setup())`` is timed.
        repeats: timed rounds.
        warmup: untimed rounds first (compilation, allocator, caches); at least one when
            ``min_sample_ms`` is set, which is what ``k`` is measured on.
        min_sample_ms: the least time one sample should take (0: one call per sample).

    Returns:
        Provider name → its ``repeats`` times in milliseconds, each per call.
    """
    last_ms: dict[str, float] = {}
    for _ in range(max(warmup, 1 if min_sample_ms > 0 else 0)):
        for name, (setup, run) in steps.items():
            state = setup()
            start = time.perf_counter()
            run(state)
            last_ms[name] = (time.perf_counter() - start) * 1e3
    calls = {
        name: max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(min_sample_ms / max(ms, 1e-3))))
        if min_sample_ms > 0
        else 1
        for name, ms in last_ms.items()
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    order = random.Random(ORDER_SEED)
    for _ in range(repeats):
        order.shuffle(names)  # a new order each round, the same sequence every run
        for name in names:
            setup, run = steps[name]
            total = 0.0
            count = calls.get(name, 1)
            for _ in range(count):
                state = setup()
                start = time.perf_counter()
                run(state)
                total += time.perf_counter() - start
            times[name].append(total * 1e3 / count)
    return times


#: The most calls one sample of :func:`time_interleaved` makes (tiny steps would take thousands).
MAX_CALLS_PER_SAMPLE = 64


def median_call_ms(call: Callable[[], object], rounds: int) -> float:
    """Median wall time of ``call`` in milliseconds over ``rounds`` calls, after two untimed ones
    (kernel-only scripts: one call per sample, back to back, warm caches)."""
    for _ in range(2):
        call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def median_ms(times: list[float]) -> float:
    """The median of a list of times (ms)."""
    return float(statistics.median(times))


def copy_step(like: torch.Tensor) -> Step:
    """A step copying a tensor shaped and strided like ``like`` (moves ``2S`` bytes)."""
    src = torch.empty_like(like).normal_()
    dst = torch.empty_like(like)
    return untimed_setup, lambda _: dst.copy_(src)


def fraction_of_copy(
    bytes_moved: float, time_ms: float, copy_bytes: float, copy_ms: float
) -> float:
    """Achieved bandwidth at ``bytes_moved`` as a fraction of the copy bandwidth."""
    return (bytes_moved / time_ms) / (copy_bytes / copy_ms)


#: Set by whoever runs a benchmark from a copy without ``.git`` (the device tool's copy).
COMMIT_ENV_VAR = "BATCHNORM_BENCHMARK_COMMIT"


def git_commit() -> str | None:
    """The commit the benchmark runs from (``+dirty`` with uncommitted changes), if known.

    ``BATCHNORM_BENCHMARK_COMMIT`` wins when set, for copies of the tree that carry no ``.git``.
    """
    if os.environ.get(COMMIT_ENV_VAR):
        return os.environ[COMMIT_ENV_VAR]
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(threads: int) -> dict[str, Any]:
    """Machine, library versions, thread count and commit, for the results file."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for module_name in ("numpy", "numba", "triton"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        versions[module_name] = module.__version__
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        },
        "versions": versions,
        "torch_num_threads": threads,
        "git_commit": git_commit(),
    }


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as indented JSON to ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
