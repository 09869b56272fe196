"""How stable a routing measurement is: the same lazy measurement repeated in one process.

``batchnorm.backends.calibration.time_passes`` (what a lazy decision and ``batchnorm calibrate``
time) runs ``--repeats`` times on one case, our kernels everywhere against ATen behind the same
checks, and each result is printed; then the benchmark harness's interleaved loop
(``harness.time_interleaved``, as ``benchmarks/cpu.py`` times) on the same scratch tensors. When
the repeats disagree on which side wins, a lazy decision for that case is close to a coin flip.

Usage::

    python benchmarks/calibration_stability.py [--shape 32 128 28 28] [--layout ncl]
        [--dtype float32] [--pass inference] [--repeats 3] [--threads 1] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from batchnorm.backends import calibration
from batchnorm.backends.base import Call
from batchnorm.backends.cpu_backend import ALL_KERNEL_CASES, CpuBackend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    """Runs the repeats and the harness loop; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 128, 28, 28])
    parser.add_argument("--layout", choices=calibration.LAYOUTS, default="ncl")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--pass", dest="pass_name", choices=["inference"], default="inference")
    parser.add_argument("--repeats", type=int, default=3, help="time_passes calls")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="smoke test: a tiny case, 2 rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (2, 4, 3, 3) if args.tiny else tuple(args.shape)
    rounds = 2 if args.tiny else 11
    dtype = DTYPES[args.dtype]
    kernels, aten = CpuBackend(ALL_KERNEL_CASES), CpuBackend({})
    print(f"{shape} {args.layout} {args.dtype} {args.pass_name}, {args.threads} thread(s)")
    for index in range(args.repeats):
        timing = calibration.time_passes(
            kernels, aten, [args.pass_name], shape, args.layout, dtype, rounds=rounds
        )[args.pass_name]
        print(
            f"time_passes {index + 1}: ours {timing.kernels_ms:.3f} ms, ATen {timing.aten_ms:.3f}"
            f" ms (ATen/ours x{timing.ratio:.2f})"
        )
    generator = torch.Generator().manual_seed(0)
    x = calibration.scratch_input(shape, args.layout, dtype, generator)
    channels = shape[1]
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    call = Call(
        x, torch.zeros(channels), torch.ones(channels), weight, bias, 0.1, 1e-5, None, False
    )

    def evaluate(backend: CpuBackend) -> Any:
        def run(_: Any) -> None:
            with torch.no_grad():
                backend.evaluate(call)

        return harness.untimed_setup, run

    times = harness.time_interleaved(
        {"ours": evaluate(kernels), "aten": evaluate(aten)}, rounds, 2, 0.0 if args.tiny else 20.0
    )
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["aten"])
    print(
        f"harness loop: ours {ours:.3f} ms, ATen {theirs:.3f} ms (ATen/ours x{theirs / ours:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
