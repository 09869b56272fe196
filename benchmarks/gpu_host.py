"""Host work per training step of the Triton path, counted on the CPU with the launches stubbed.

Every Triton kernel of :mod:`batchnorm.kernels.triton` is replaced by a stub that records the
launch (its name and how many runtime arguments it gets) and runs nothing, so the real Python
path (checks, routing, autograd, allocations, launch code) runs on CPU tensors with no GPU and
no interpreter. ``torch.profiler`` counts the ATen operations of the forward and of the backward
separately: allocations, zero-fills, copies, others. Python µs per call are timed next to eager
``F.batch_norm`` (whose CPU kernels do real work, so that ratio is an upper bound of ours).

Run: ``python benchmarks/gpu_host.py [--shape 8 32 7 7] [--fused] [--json PATH]``; the tests
(``tests/test_triton_host.py``) pin the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # the backend refuses CPU tensors otherwise

import torch
import torch.nn.functional as F

from batchnorm.functional import batch_norm
from batchnorm.kernels.triton import batchnorm_bwd, batchnorm_fwd, inference
from batchnorm.kernels.triton import launch as _launch  # noqa: F401  (its launchers see the real kernels)

#: ATen ops that allocate, that fill with zeros, that copy.
ALLOCATIONS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty"}
ZERO_FILLS = {"aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_", "aten::new_zeros"}
COPIES = {"aten::copy_"}
#: What ``@triton.jit`` makes: compiled, or run by the interpreter (``TRITON_INTERPRET=1``).
_KERNEL_TYPES = ("JITFunction", "InterpretedFunction")
#: Profiler events that are containers of others, not operations of their own.
_WRAPPERS = ("autograd::", "torch::autograd", "<forward op>", "Optimizer", "ProfilerStep")


class _StubKernel:
    """Stands for one ``@triton.jit`` kernel: records ``kernel[grid](*args)`` and ``warmup``."""

    def __init__(self, name: str, launches: list[tuple[str, int]]) -> None:
        self.name = name
        self.launches = launches

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            runtime = [a for a in args if not isinstance(a, bool)]  # constexprs go by keyword
            self.launches.append((self.name, len(runtime)))

        return launch

    def warmup(self, *args: Any, **kwargs: Any) -> Any:
        """What the persistent arrangement asks of a compiled kernel (never used here)."""
        raise RuntimeError("the persistent arrangement needs real kernels")


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[tuple[str, int]]]:
    """Replaces every Triton kernel by a :class:`_StubKernel`; yields the list of launches."""
    launches: list[tuple[str, int]] = []
    saved = []
    for module in (batchnorm_fwd, batchnorm_bwd, inference):
        for name, value in vars(module).items():
            if type(value).__name__ in _KERNEL_TYPES and name.endswith("_kernel"):
                saved.append((module, name, value))
                setattr(module, name, _StubKernel(name, launches))
    try:
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _aten_ops(run: Callable[[], Any]) -> tuple[Any, Counter[str]]:
    """Runs ``run()`` under the profiler; returns its result and the ATen ops it called."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = run()
    ops = Counter(
        event.name
        for event in prof.events()
        if event.name.startswith("aten::") and not event.name.startswith(_WRAPPERS)
    )
    return result, ops


def _summary(launches: list[tuple[str, int]], ops: Counter[str]) -> dict[str, Any]:
    """The counts of one direction."""
    return {
        "launches": len(launches),
        "kernels": [name for name, _ in launches],
        "runtime_args": sum(count for _, count in launches),
        "allocations": sum(ops[name] for name in ALLOCATIONS),
        "zero_fills": sum(ops[name] for name in ZERO_FILLS),
        "copies": sum(ops[name] for name in COPIES),
        "other_aten_ops": sum(
            n for name, n in ops.items() if name not in ALLOCATIONS | ZERO_FILLS | COPIES
        ),
        "ops": dict(sorted(ops.items())),
    }


def host_counts(
    shape: tuple[int, ...] = (8, 32, 7, 7), fused: bool = False
) -> dict[str, dict[str, Any]]:
    """Launches and ATen ops of one training forward and its backward on the Triton path.

    Args:
        shape: the input's shape ``(N, C, *)``.
        fused: with a residual and ReLU (``act(bn(x) + z)``), else plain batch norm.

    Returns:
        ``{"forward": counts, "backward": counts}`` (see :func:`_summary`).
    """
    channels = shape[1]
    x = torch.randn(shape, requires_grad=True)
    z = torch.randn(shape, requires_grad=True) if fused else None
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    running = (torch.zeros(channels), torch.ones(channels))
    leaves = (x, weight, bias) if z is None else (x, weight, bias, z)
    options: dict[str, Any] = {"activation": "relu", "residual": z} if fused else {}
    with stubbed_launches() as launches:
        # One step first: what a step allocates once (the cached scratch) is not per step.
        warm = batch_norm(x, *running, weight, bias, training=True, backend="triton", **options)
        torch.autograd.grad(warm, leaves, torch.ones_like(warm))
        launches.clear()
        y, forward_ops = _aten_ops(
            lambda: batch_norm(
                x, *running, weight, bias, training=True, backend="triton", **options
            )
        )
        forward = _summary(list(launches), forward_ops)
        launches.clear()
        dy = torch.randn_like(y)
        _, backward_ops = _aten_ops(lambda: torch.autograd.grad(y, leaves, dy))
        backward = _summary(list(launches), backward_ops)
    return {"forward": forward, "backward": backward}


def python_us(shape: tuple[int, ...] = (8, 32, 7, 7), steps: int = 300) -> dict[str, float]:
    """µs per training forward+backward: ours with stubbed launches, eager ``F.batch_norm``."""
    channels = shape[1]
    x = torch.randn(shape, requires_grad=True)
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    running = (torch.zeros(channels), torch.ones(channels))
    dy = torch.randn(shape)
    leaves = (x, weight, bias)

    def ours() -> None:
        y = batch_norm(x, *running, weight, bias, training=True, backend="triton")
        torch.autograd.grad(y, leaves, dy)

    def eager() -> None:
        torch.autograd.grad(F.batch_norm(x, *running, weight, bias, training=True), leaves, dy)

    times = {}
    with stubbed_launches():
        for name, step in (("ours_stubbed", ours), ("eager_cpu", eager)):
            for _ in range(20):
                step()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name] = (time.perf_counter() - start) / steps * 1e6
    return times


def main(argv: list[str] | None = None) -> int:
    """Prints the counts per direction and the µs per step; optionally writes JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 32, 7, 7])
    parser.add_argument("--fused", action="store_true", help="residual + ReLU")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    counts = host_counts(shape, args.fused)
    for direction, row in counts.items():
        print(
            f"{direction:8s} launches {row['launches']} ({', '.join(row['kernels'])}), "
            f"runtime args {row['runtime_args']}, allocations {row['allocations']}, "
            f"zero-fills {row['zero_fills']}, copies {row['copies']}, "
            f"other ATen ops {row['other_aten_ops']}"
        )
    times = python_us(shape, args.steps)
    print(
        f"µs per forward+backward: ours (launches stubbed) {times['ours_stubbed']:.1f}, "
        f"eager F.batch_norm (CPU kernels) {times['eager_cpu']:.1f}"
    )
    if args.json is not None:
        record = {"shape": shape, "fused": args.fused, "counts": counts, "us": times,
                  "torch": torch.__version__}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
