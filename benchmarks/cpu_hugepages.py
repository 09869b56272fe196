"""What the huge-page advice on large outputs does: ours with and without it, against ATen.

``batchnorm.backends.memory.empty_like`` advises ``MADV_HUGEPAGE`` for outputs of 32 MiB or more
(2 MiB pages: 512 times fewer page faults). This script runs, for each setting, a fresh process
that alternates forward+backward steps of ``batchnorm.functional.batch_norm`` and of
``F.batch_norm`` on one large input, and prints the first three steps of ours (where the kernel
finds or assembles the huge pages) and the medians of the rest. "off" replaces the advising
allocator by ``torch.empty_like`` in that process only.

Usage::

    python benchmarks/cpu_hugepages.py [--threads 1 2] [--steps 12] [--processes 2] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPE = (64, 64, 56, 56)  # float32: 51 MB, above the advice's 32 MiB
TINY_SHAPE = (2, 8, 4, 4)


def _child(mode: str, threads: int, steps: int, shape: tuple[int, ...]) -> None:
    """One process: ``steps`` alternating steps; prints a JSON line of per-step ms."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from batchnorm.backends import cpu_backend, memory

    if mode == "off":
        memory.empty_like = torch.empty_like  # type: ignore[assignment]
        cpu_backend.empty_like = torch.empty_like  # type: ignore[assignment]
    from batchnorm.functional import batch_norm

    channels = shape[1]
    x = (torch.randn(shape) * 2 + 1).requires_grad_()
    dy = torch.randn_like(x)
    weight = torch.linspace(0.5, 1.5, channels).requires_grad_()
    bias = torch.linspace(-1.0, 1.0, channels).requires_grad_()
    mean, var = torch.zeros(channels), torch.ones(channels)
    ours, aten = [], []
    for _ in range(steps):
        for function, times in ((batch_norm, ours), (F.batch_norm, aten)):
            start = time.perf_counter()
            y = function(x, mean, var, weight, bias, True, 0.1, 1e-5)
            torch.autograd.grad(y, (x, weight, bias), dy)
            times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({"ours": ours, "aten": aten}))


def main(argv: list[str] | None = None) -> int:
    """Runs the processes and prints the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=12, help="steps of each per process")
    parser.add_argument("--processes", type=int, default=2, help="fresh processes per setting")
    parser.add_argument("--tiny", action="store_true", help="smoke test: a tiny input")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "THREADS", "STEPS"), help="internal")
    args = parser.parse_args(argv)
    shape = TINY_SHAPE if args.tiny else SHAPE
    if args.child:
        _child(args.child[0], int(args.child[1]), int(args.child[2]), shape)
        return 0
    env = {**os.environ, "BATCHNORM_CALIBRATE": "0"}
    print(f"forward+backward of {shape} float32, ms; ours first 3 steps | median of the rest")
    for threads in args.threads:
        for mode in ("on", "off"):
            for _ in range(args.processes):
                command = [sys.executable, __file__, "--child", mode, str(threads), str(args.steps)]
                if args.tiny:
                    command.append("--tiny")
                out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                ours, aten = result["ours"], result["aten"]
                rest = slice(3, None) if len(ours) > 3 else slice(None)
                first = ", ".join(f"{t:.0f}" for t in ours[:3])
                ours_ms, aten_ms = statistics.median(ours[rest]), statistics.median(aten[rest])
                print(
                    f"advice {mode:3} {threads} thread(s): ours first {first} | ours "
                    f"{ours_ms:.1f} | ATen {aten_ms:.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
