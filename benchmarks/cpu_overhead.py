"""Per-call cost on the CPU: our functional and module against ``F.batch_norm`` and ``torch.nn``.

A tiny input ``(2, 8, 3, 3)`` makes the kernel's own time negligible, so what is timed is the
work around it (argument checks, backend choice, autograd bookkeeping). Two regimes:

* ``warm``: back-to-back calls, everything in cache;
* ``cold``: a 32 MB copy between calls flushes the caches first (untimed), as the large tensors of
  a real network, or of ``benchmarks/cpu.py``, do.

Prints microseconds per call (median of ``--rounds``), one thread.

Usage::

    python benchmarks/cpu_overhead.py [--rounds 300]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import batchnorm
from batchnorm.functional import batch_norm

FLUSH_ELEMENTS = 4 << 20  # 4 Mi float32 = 16 MB read + 16 MB written per flush


def _median_us(
    call: Callable[[], object], rounds: int, flush: Callable[[], object] | None
) -> float:
    """Median wall time of ``call`` in µs; ``flush()`` (untimed) runs before each call if given."""
    for _ in range(5):
        call()
    times = []
    for _ in range(rounds):
        if flush is not None:
            flush()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    """Runs the measurement and prints the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="timed calls per entry")
    parser.add_argument(
        "--parts",
        action="store_true",
        help="also time the per-call questions whose faster spelling _compat keeps",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    source, target = torch.randn(FLUSH_ELEMENTS), torch.empty(FLUSH_ELEMENTS)
    if args.parts:
        _print_parts(args.rounds, lambda: target.copy_(source))
    x = torch.randn(2, 8, 3, 3)  # (N, C, H, W)
    x_grad = x.clone().requires_grad_()
    weight, bias = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    mean, var = torch.zeros(8), torch.ones(8)
    torch_module, our_module = torch.nn.BatchNorm2d(8), batchnorm.BatchNorm2d(8)
    pairs = {
        "inference": (
            lambda: F.batch_norm(x, mean, var, weight, bias, False),
            lambda: batch_norm(x, mean, var, weight, bias, False),
        ),
        "training": (
            lambda: F.batch_norm(x_grad, mean, var, weight, bias, True),
            lambda: batch_norm(x_grad, mean, var, weight, bias, True),
        ),
        "module (training)": (lambda: torch_module(x_grad), lambda: our_module(x_grad)),
    }
    print("µs per call, 1 thread, input (2, 8, 3, 3); torch = F.batch_norm / torch.nn.BatchNorm2d")
    print(f"{'':18} {'warm torch':>10} {'warm ours':>10} {'cold torch':>10} {'cold ours':>10}")
    for name, (theirs, ours) in pairs.items():
        cells = []
        for flush in (None, lambda: target.copy_(source)):
            for call in (theirs, ours):
                with torch.no_grad() if name == "inference" else torch.enable_grad():
                    cells.append(_median_us(call, args.rounds, flush))
        print(f"{name:18} " + " ".join(f"{cell:10.1f}" for cell in cells), flush=True)
    return 0


def _print_parts(rounds: int, flush: Callable[[], object]) -> None:
    """Times the plain and the faster spelling of two per-call questions, interleaved, cold.

    The environment read of ``BATCHNORM_BACKEND`` (unset: the common case, where
    ``os.environ.get`` raises and catches a ``KeyError``), and the three questions about
    tracing against the one :func:`batchnorm._compat.call_kind`.
    """
    import os

    from batchnorm import _compat

    x = torch.randn(2, 8, 3, 3)
    name = "BATCHNORM_BACKEND"
    encoded = os.fsencode(name)
    parts = {
        "os.environ.get": lambda: os.environ.get(name),
        "_compat.environ_get": lambda: _compat.environ_get(name, encoded),
        "is_fx_proxy+jit_tracing+traced": lambda: (
            _compat.is_fx_proxy(x) or _compat.jit_tracing() or _compat.traced(x)
        ),
        "_compat.call_kind": lambda: _compat.call_kind(x),
    }
    times: dict[str, list[float]] = {part: [] for part in parts}
    for call in parts.values():
        for _ in range(5):
            call()
    for _ in range(rounds):  # interleaved: each part sees the same machine state
        for part, call in parts.items():
            flush()
            start = time.perf_counter()
            call()
            times[part].append(time.perf_counter() - start)
    print(f"µs per question, cold (median of {rounds}, interleaved)")
    for part, values in times.items():
        print(f"{part:32} {statistics.median(values) * 1e6:8.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
