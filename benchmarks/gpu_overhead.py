"""Host cost of one training step on a GPU: our Triton path through the ops and directly.

A tiny input makes the step host-bound, so the time per step is the host's work per call:
argument checks, routing, allocations, autograd and the kernel launches. Three providers:
``F.batch_norm`` (eager), ours launching directly (the default outside ``torch.compile``) and
ours through the ``torch.library`` custom ops (what ``torch.compile`` traces).

Run on a GPU machine: ``PYTHONPATH=src python benchmarks/gpu_overhead.py``; ``--profile``
adds the 30 most expensive functions of our direct path (cProfile, own time).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from batchnorm.backends import triton_backend
from batchnorm.functional import batch_norm

STEPS = 2000


def _per_step_us(step) -> float:
    """Mean µs per call of ``step`` over :data:`STEPS` calls, after a warm-up."""
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / STEPS * 1e6


def main(argv: list[str] | None = None) -> int:
    """Prints µs per forward+backward step (and forward alone) for each provider; exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", action="store_true", help="cProfile our direct path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu_overhead.py: needs a CUDA device")
        return 2
    x = torch.randn(8, 32, 7, 7, device="cuda", requires_grad=True)
    weight = torch.ones(32, device="cuda", requires_grad=True)
    bias = torch.zeros(32, device="cuda", requires_grad=True)
    running = (torch.zeros(32, device="cuda"), torch.ones(32, device="cuda"))
    dy = torch.randn_like(x)
    leaves = (x, weight, bias)

    def eager() -> None:
        torch.autograd.grad(F.batch_norm(x, *running, weight, bias, training=True), leaves, dy)

    def ours() -> None:
        y = batch_norm(x, *running, weight, bias, training=True, backend="triton")
        torch.autograd.grad(y, leaves, dy)

    def ours_forward() -> None:
        with torch.no_grad():
            batch_norm(x, *running, weight, bias, training=True, backend="triton")

    results = {"eager F.batch_norm": _per_step_us(eager)}
    direct = triton_backend.runs_eagerly
    for label, route in (("direct", direct), ("custom ops", lambda *tensors: False)):
        triton_backend.runs_eagerly = route
        results[f"ours, {label}"] = _per_step_us(ours)
        results[f"ours, {label}, forward only"] = _per_step_us(ours_forward)
    triton_backend.runs_eagerly = direct
    print(f"host µs per call, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for label, us in results.items():
        print(f"  {label:<32} {us:8.1f}")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(lambda: [ours() for _ in range(500)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
