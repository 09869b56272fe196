"""CPU benchmark: our batch norm against ATen (``F.batch_norm``) and ``torch.compile`` of it.

For each shape, layout (contiguous, channels_last for 4D) and dtype (float32, bfloat16), four
passes are timed: training forward, backward alone, forward+backward, and inference forward.
Providers, timed round-robin in the same rounds (see ``harness.py``):

* ``aten``: ``torch.nn.functional.batch_norm`` (PyTorch's native CPU kernels);
* ``aten-control``: the same call timed again, an A/A control: its ratio to ``aten`` shows how
  far the machine's noise alone moves a ratio;
* ``compile``: ``torch.compile`` of that call (Inductor, C++ codegen);
* ``ours``: :func:`batchnorm.functional.batch_norm` end to end (validation, autograd function,
  running update) on the ``auto`` backend;
* ``torch-module`` / ``ours-module``: ``torch.nn.BatchNorm1d/2d`` against ours, the way a model
  calls them.

Training runs update fp32 running buffers; ``weight``/``bias`` are fp32 (bfloat16 input runs in
PyTorch's mixed-precision mode, like autocast). Every provider's output and gradients are first
checked against ATen's. Printed per pass: milliseconds, the fraction of copy bandwidth at the
minimal bytes (forward and inference ``2S``, backward ``3S``, forward+backward ``5S``; ``S`` =
bytes of x), and speed ratios (``aten time / provider time``: above 1 is faster than ATen); the
results file also holds every round's times and the median of the per-round ratios.

Usage::

    python benchmarks/cpu.py                  # full run, writes benchmarks/results/cpu-<date>.json
    python benchmarks/cpu.py --tiny --out x.json   # smoke test: tiny shapes, no torch.compile
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import batchnorm
import harness
from batchnorm.backends import resolve_backend
from batchnorm.functional import batch_norm as ours_batch_norm

SHAPES = [(64, 64, 56, 56), (64, 256, 14, 14), (32, 128, 28, 28), (4096, 512), (256, 64, 100)]
TINY_SHAPES = [(4, 3, 5, 5), (16, 8), (4, 3, 7)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Pass → minimal bytes moved, in units of S (the bytes of x).
MIN_BYTES = {"forward": 2, "backward": 3, "forward+backward": 5, "inference": 2}
#: Relative error (‖a − b‖ / ‖b‖) allowed against ATen before timing.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
MOMENTUM, EPS = 0.1, 1e-5
#: Provider → the provider whose time it is compared with.
#: "aten-control" times ATen a second time: its ratio to "aten" (ideally 1) shows the noise.
BASELINE = {
    "aten-control": "aten",
    "compile": "aten",
    "ours": "aten",
    "ours-module": "torch-module",
}

Forward = Callable[[torch.Tensor, bool], torch.Tensor]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny shapes, no compile")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument(
        "--sample-ms",
        type=float,
        default=20.0,
        help="a sample is the mean of back-to-back calls lasting about this long (0: one call)",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="time torch.compile"
    )
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES))
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    args = parser.parse_args(argv)
    if args.compile is None:
        args.compile = not args.tiny
    if args.tiny:
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
        args.sample_ms = 0.0
    if args.out is None and not args.tiny:
        today = datetime.date.today().isoformat()
        args.out = Path(__file__).resolve().parent / "results" / f"cpu-{today}.json"
    return args


class Case:
    """One input: tensors and, per provider, a forward ``f(x, training) -> y`` and its leaves."""

    def __init__(self, shape: tuple[int, ...], layout: str, dtype: torch.dtype, compile: bool):
        self.shape, self.layout, self.dtype = shape, layout, dtype
        gen = torch.Generator().manual_seed(0)
        memory_format = (
            torch.channels_last if layout == "channels_last" else torch.contiguous_format
        )
        x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
        self.x = x.contiguous(memory_format=memory_format).requires_grad_()  # (N, C, *)
        self.dy = (
            torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=memory_format)
        )
        self.nbytes = x.numel() * x.element_size()  # S
        channels = shape[1]
        self.providers: dict[str, tuple[Forward, tuple[torch.Tensor, ...]]] = {
            "aten": self._functional(F.batch_norm, channels),
            "aten-control": self._functional(F.batch_norm, channels),
            "ours": self._functional(ours_batch_norm, channels),
        }
        if compile:
            # A fresh compiled function per case: dynamo's recompile limit would otherwise send
            # later shapes, dtypes and layouts back to eager mode.
            torch._dynamo.reset()
            self.providers["compile"] = self._functional(
                torch.compile(F.batch_norm, dynamic=False), channels
            )
        module_name = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
        for name, module_class in (
            ("torch-module", getattr(torch.nn, module_name)),
            ("ours-module", getattr(batchnorm, module_name)),
        ):
            module = module_class(channels, momentum=MOMENTUM, eps=EPS)
            with torch.no_grad():
                module.weight.copy_(torch.linspace(0.5, 1.5, channels))
                module.bias.copy_(torch.linspace(-1.0, 1.0, channels))
            self.providers[name] = (self._module_forward(module), (module.weight, module.bias))

    @staticmethod
    def _functional(fn: Callable[..., torch.Tensor], channels: int) -> tuple[Forward, Any]:
        """``fn`` with its own fp32 parameters and running buffers, as ``f(x, training)``."""
        weight = torch.linspace(0.5, 1.5, channels).requires_grad_()
        bias = torch.linspace(-1.0, 1.0, channels).requires_grad_()
        running_mean, running_var = torch.zeros(channels), torch.ones(channels)

        def forward(x: torch.Tensor, training: bool) -> torch.Tensor:
            return fn(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)

        return forward, (weight, bias)

    @staticmethod
    def _module_forward(module: torch.nn.Module) -> Forward:
        def forward(x: torch.Tensor, training: bool) -> torch.Tensor:
            module.train(training)
            return module(x)

        return forward

    def steps(self, pass_name: str) -> dict[str, harness.Step]:
        """Provider → the timed step of ``pass_name``, plus ``copy`` for the bandwidth."""
        steps = {"copy": harness.copy_step(self.x.detach())}
        for name, (forward, params) in self.providers.items():
            steps[name] = self._step(pass_name, forward, (self.x, *params))
        return steps

    def _step(self, pass_name: str, forward: Forward, leaves: tuple[torch.Tensor, ...]) -> Any:
        x, dy = self.x, self.dy
        if pass_name == "forward":
            return harness.untimed_setup, lambda _: forward(x, True)
        if pass_name == "backward":
            return (
                lambda: forward(x, True),
                lambda y: torch.autograd.grad(y, leaves, dy),
            )
        if pass_name == "forward+backward":
            return harness.untimed_setup, lambda _: torch.autograd.grad(
                forward(x, True), leaves, dy
            )
        x_eval = x.detach()

        def inference(_: Any) -> None:
            with torch.no_grad():
                forward(x_eval, False)

        return harness.untimed_setup, inference

    def check(self) -> None:
        """Raises AssertionError if a provider's output or gradients differ from ATen's."""
        results = {}
        for name, (forward, params) in self.providers.items():
            y = forward(self.x, True)
            grads = torch.autograd.grad(y, (self.x, *params), self.dy)
            with torch.no_grad():
                y_eval = forward(self.x.detach(), False)
            results[name] = (y, *grads, y_eval)
        tolerance = CHECK_TOLERANCE[self.dtype]
        labels = ("y", "dx", "dweight", "dbias", "y (inference)")
        for name, values in results.items():
            for label, value, expected in zip(labels, values, results["aten"], strict=True):
                value, expected = value.detach().float(), expected.detach().float()
                error = float((value - expected).norm() / expected.norm())
                assert error <= tolerance, f"{self}: {name} {label} relative error {error:.2e}"

    def __str__(self) -> str:
        return f"{self.shape} {self.layout} {str(self.dtype).removeprefix('torch.')}"


def _cases(args: argparse.Namespace) -> list[tuple[tuple[int, ...], str, torch.dtype]]:
    shapes = TINY_SHAPES if args.tiny else SHAPES
    cases = []
    for shape in shapes:
        layouts = ["contiguous", "channels_last"] if len(shape) == 4 else ["contiguous"]
        for layout in layouts:
            for dtype_name in args.dtypes:
                cases.append((shape, layout, DTYPES[dtype_name]))
    return cases


def _summarize(case: Case, pass_name: str, times: dict[str, list[float]]) -> dict[str, Any]:
    """Medians, fractions of copy bandwidth and ratios of one (case, pass)."""
    medians = {name: harness.median_ms(values) for name, values in times.items()}
    copy_ms = medians["copy"]
    bytes_moved = MIN_BYTES[pass_name] * case.nbytes
    providers = {}
    for name, median in medians.items():
        if name == "copy":
            continue
        entry: dict[str, Any] = {
            "median_ms": median,
            "times_ms": times[name],
            "fraction_of_copy": harness.fraction_of_copy(
                bytes_moved, median, 2 * case.nbytes, copy_ms
            ),
        }
        if name in BASELINE:
            baseline = BASELINE[name]
            entry["ratio_vs_" + baseline] = medians[baseline] / median
            # Median of the per-round ratios: robust to load that drifts between rounds.
            entry["paired_ratio_vs_" + baseline] = float(
                statistics.median(b / t for b, t in zip(times[baseline], times[name], strict=True))
            )
        providers[name] = entry
    return {
        "shape": list(case.shape),
        "layout": case.layout,
        "dtype": str(case.dtype).removeprefix("torch."),
        "pass": pass_name,
        "bytes_x": case.nbytes,
        "copy_ms": copy_ms,
        "copy_gb_per_s": 2 * case.nbytes / copy_ms / 1e6,
        "providers": providers,
    }


def summary(records: list[dict[str, Any]]) -> list[str]:
    """Per ratio (``ours/aten``, ``ours-module/torch-module``, the A/A control): how many cases
    reach 0.95, the smallest, and the geometric mean, of the paired ratios."""
    lines = []
    for name, baseline in BASELINE.items():
        key = "paired_ratio_vs_" + baseline
        values = [r["providers"][name][key] for r in records if name in r["providers"]]
        if not values:
            continue
        geomean = math.exp(statistics.fmean(math.log(v) for v in values))
        lines.append(
            f"{name}/{baseline} (paired): {sum(v >= 0.95 for v in values)}/{len(values)} "
            f"at 0.95 or more, min ×{min(values):.2f}, geomean ×{geomean:.3f}"
        )
    return lines


def _print_row(record: dict[str, Any]) -> None:
    providers = record["providers"]
    cells = [
        f"{name} {p['median_ms']:8.3f} ({p['fraction_of_copy']:.2f})"
        for name, p in providers.items()
    ]
    ratios = [
        f"{name}/{BASELINE[name]} ×{providers[name]['ratio_vs_' + BASELINE[name]]:.2f}"
        for name in BASELINE
        if name in providers
    ]
    shape = "x".join(map(str, record["shape"]))
    print(
        f"{shape:>13} {record['layout'][:6]:6} {record['dtype']:8} {record['pass']:16} "
        f"copy {record['copy_ms']:7.3f} | " + " | ".join(cells) + " | " + " ".join(ratios),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    backend = resolve_backend(None, torch.device("cpu")).name
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(torch.set_num_threads({args.threads})), ours = backend {backend!r}; "
        f"median of {args.repeats} interleaved rounds, samples of ~{args.sample_ms:g} ms; "
        "ms per call (fraction of copy bandwidth)",
        flush=True,
    )
    records = []
    for shape, layout, dtype in _cases(args):
        case = Case(shape, layout, dtype, args.compile)
        case.check()
        for pass_name in MIN_BYTES:
            times = harness.time_interleaved(
                case.steps(pass_name), args.repeats, args.warmup, args.sample_ms
            )
            record = _summarize(case, pass_name, times)
            _print_row(record)
            records.append(record)
    for line in summary(records):
        print(line)
    if args.out is not None:
        payload = {
            "environment": harness.environment(torch.get_num_threads()),
            "ours_backend": backend,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "sample_ms": args.sample_ms,
            "command": " ".join(["python", "benchmarks/cpu.py", *(argv or sys.argv[1:])]),
            "records": records,
        }
        harness.write_results(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
