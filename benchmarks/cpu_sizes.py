"""Where the CPU kernels start to pay: our kernels against ATen's, behind the same checks, by size.

``benchmarks/cpu.py`` compares whole calls with ``F.batch_norm`` on five large shapes; this script
sets the thresholds of :data:`batchnorm.backends.measured.MEASURED_KERNEL_CASES`. For each
dtype and layout (contiguous ``(N, 64, 14, 14)`` and its channels_last copy) and a range of batch
sizes it times our :func:`batchnorm.functional.batch_norm` twice: with the ``numba`` backend
running its kernels everywhere (``CpuBackend(ALL_KERNEL_CASES)``) and with it running them
nowhere (``CpuBackend({})``: ATen's kernels behind the same checks, autograd and running
update). Passes: training forward (running buffers, autograd graph), backward alone and
evaluation. Rounds alternate the two in a shuffled order after an untimed 32 MB copy (caches
cold, as in a network); the ratio printed is ATen's median time over the kernels' (above 1: the
kernels are faster), on ``--threads`` torch threads (default one).

Usage::

    python benchmarks/cpu_sizes.py [--rounds 25] [--batches 2 8 32 128] [--dtypes float32 bfloat16]
                                   [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import batchnorm.backends as backends
from batchnorm.backends import cpu_backend, measured
from batchnorm.functional import batch_norm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
FLUSH_ELEMENTS = 4 << 20  # 16 MB read + 16 MB written before each timed call
CHANNELS, SPATIAL = 64, (14, 14)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25, help="timed rounds per entry")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32, 128], help="N")
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser.parse_args(argv)


def _median_ms(
    variants: dict[str, cpu_backend.CpuBackend],
    run: Callable[[Any], Any],
    setup: Callable[[], Any],
    rounds: int,
) -> dict[str, float]:
    """Median ms of ``run(setup())`` with each backend installed as ``numba``, interleaved."""
    source, target = torch.randn(FLUSH_ELEMENTS), torch.empty(FLUSH_ELEMENTS)
    order = random.Random(0)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds + 2):  # the first two rounds warm up (compilation, allocator)
        order.shuffle(names)
        for name in names:
            with backends.override("cpu", variants[name]):
                state = setup()
                target.copy_(source)
                start = time.perf_counter()
                run(state)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values[2:]) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Runs the sweep and prints one line per (dtype, layout, size); returns the exit status."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {
        "kernels": cpu_backend.CpuBackend(measured.ALL_KERNEL_CASES),
        "aten": cpu_backend.CpuBackend({}),
    }
    print(
        f"ATen time / kernels' time (above 1: kernels faster), {args.threads} thread(s), "
        f"(N, {CHANNELS}, "
        f"{SPATIAL[0]}, {SPATIAL[1]}), streaming kernels: {variants['kernels'].streaming}"
    )
    for dtype_name in args.dtypes:
        for layout in ("ncl", "rows"):
            for n_batch in args.batches:
                _sweep_line(variants, DTYPES[dtype_name], layout, n_batch, args.rounds)
    return 0


def _sweep_line(
    variants: dict[str, cpu_backend.CpuBackend],
    dtype: torch.dtype,
    layout: str,
    n_batch: int,
    rounds: int,
) -> None:
    """Times the three passes of one (dtype, layout, N) and prints their ratios."""
    x = torch.randn(n_batch, CHANNELS, *SPATIAL).to(dtype)  # (N, C, H, W)
    if layout == "rows":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.ones(CHANNELS, requires_grad=True)
    bias = torch.zeros(CHANNELS, requires_grad=True)
    mean, var = torch.zeros(CHANNELS), torch.ones(CHANNELS)
    dy = torch.randn_like(x)

    def forward(_: Any = None) -> torch.Tensor:
        return batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5, backend="cpu")

    def inference(_: Any) -> None:
        with torch.no_grad():
            batch_norm(x, mean, var, weight, bias, False, 0.1, 1e-5, backend="cpu")

    passes = {
        "forward": (forward, lambda: None),
        "backward": (lambda y: torch.autograd.grad(y, (x, weight, bias), dy), forward),
        "inference": (inference, lambda: None),
    }
    cells = []
    for name, (run, setup) in passes.items():
        medians = _median_ms(variants, run, setup, rounds)
        cells.append(f"{name} ×{medians['aten'] / medians['kernels']:.2f}")
    size_kib = x.numel() * x.element_size() // 1024
    print(
        f"{str(dtype).removeprefix('torch.'):9} {layout:5} {size_kib:7d} KiB  " + "  ".join(cells)
    )


if __name__ == "__main__":
    raise SystemExit(main())
