"""GPU benchmark: our Triton batch norm against PyTorch eager and ``torch.compile``.

What it does, in order (design.md §4):

1. correctness first: ours (both arrangements, fp32/bf16/bf16 channels_last, plain and fused
   BN + add + ReLU) against a float64 reference; any mismatch stops the run (exit status 1);
2. copy bandwidth of this card, measured in the same run (``dst.copy_(src)``, read + write);
3. forward, backward and forward+backward times of ours, eager (``F.batch_norm``) and
   ``torch.compile`` on the shapes of design.md §4, in fp32, bf16 and bf16 channels_last, plus
   fused BN + add + ReLU against eager's three ops;
4. device time apart from host time for every forward+backward: ``fwd+bwd (graph)``, the
   kernels alone by CUDA-graph replay (``triton.testing.do_bench_cudagraph``; the host does
   nothing per step), next to the end-to-end ``fwd+bwd`` (which is max(host, device) per step:
   ``do_bench`` never syncs the host between samples); ``host_us``, the host's µs to issue one
   step (50 steps issued back to back, divided); and the CUDA kernels one step launches
   (``torch.profiler``), per provider;
5. reports ms, fraction of copy bandwidth at the minimal bytes (forward 2S, backward 3S,
   together 5S; fused 3S, 4S, 7S) and speed-ups; writes
   ``benchmarks/results/<gpu>-<date>.json`` with card, versions and commit; prints a short
   table last.

Run it under ``timeout`` (a persistent kernel that cannot be resident would hang)::

    timeout 300 python benchmarks/gpu.py            # full run, < 4 minutes on an H100
    timeout 120 python benchmarks/gpu.py --tiny     # small shapes, smoke test
    timeout 60 python benchmarks/gpu.py --check-only --tiny

``--device cpu`` runs the correctness step on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # the shared benchmark helpers, beside this file

#: (N, C, H, W) of design.md §4; (N, C) is BatchNorm1d.
SHAPES: tuple[tuple[int, ...], ...] = (
    (256, 64, 112, 112),
    (256, 256, 56, 56),
    (256, 64, 56, 56),
    (256, 512, 28, 28),
    (256, 128, 28, 28),
    (256, 1024, 14, 14),
    (256, 256, 14, 14),
    (256, 2048, 7, 7),
    (256, 512, 7, 7),
    (32, 64, 56, 56),
    (8192, 1024),
)
TINY_SHAPES: tuple[tuple[int, ...], ...] = ((8, 16, 14, 14), (4, 24, 7, 7), (64, 32))
#: Shapes timed with torch.compile too (each compile costs seconds; design.md's anchors).
COMPILE_SHAPES: tuple[tuple[int, ...], ...] = ((256, 256, 56, 56), (256, 512, 28, 28))
#: Configurations: name → (dtype name, channels_last).
CONFIGS: dict[str, tuple[str, bool]] = {
    "fp32": ("float32", False),
    "bf16": ("bfloat16", False),
    "bf16_cl": ("bfloat16", True),
}
#: Minimal bytes per direction in units of S (the activation tensor's bytes).
MINIMAL_S = {
    ("plain", "fwd"): 2,  # read x, write y
    ("plain", "bwd"): 3,  # read x, dy; write dx
    ("plain", "fwd+bwd"): 5,
    ("fused", "fwd"): 3,  # read x, z; write y
    ("fused", "bwd"): 4,  # read x, dy; write dx, dz (the 1-byte ReLU mask not counted)
    ("fused", "fwd+bwd"): 7,
    ("plain", "fwd+bwd (graph)"): 5,
    ("fused", "fwd+bwd (graph)"): 7,
}
DIRECTIONS = ("fwd", "bwd", "fwd+bwd", "fwd+bwd (graph)")
#: Steps issued back to back to measure the host's µs per step (few: the launch queue holds them).
HOST_STEPS = 50
#: Tolerances (atol = rtol) of the correctness step, against a float64 reference.
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


@dataclass(frozen=True)
class Row:
    """One timed measurement."""

    shape: tuple[int, ...]
    config: str
    kind: str  # "plain" or "fused"
    direction: str
    provider: str  # "ours", "ours_persistent", "eager", "compile"
    ms: float
    fraction_of_copy: float


def tensor_bytes(shape: Sequence[int], dtype_name: str) -> int:
    """Bytes ``S`` of an activation tensor of ``shape`` and dtype."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype_name]
    numel = 1
    for size in shape:
        numel *= size
    return numel * itemsize


def minimal_bytes(shape: Sequence[int], dtype_name: str, kind: str, direction: str) -> int:
    """The fewest bytes a pass can move (design.md §4): a multiple of ``S``."""
    return MINIMAL_S[(kind, direction)] * tensor_bytes(shape, dtype_name)


def fraction_of_copy(nbytes: int, ms: float, copy_gbps: float) -> float:
    """``(bytes / time) / copy bandwidth``; ``copy_gbps`` in GB/s (1e9 bytes)."""
    return (nbytes / (ms * 1e-3)) / (copy_gbps * 1e9)


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a card name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def results_path(directory: Path, card: str, date: dt.date) -> Path:
    """``<directory>/<card>-<date>.json``."""
    return directory / f"{slug(card)}-{date.isoformat()}.json"


def speedups(rows: Sequence[Row]) -> dict[tuple[tuple[int, ...], str, str, str], dict[str, float]]:
    """Per (shape, config, kind, direction): ours' speed-up over each other provider."""
    table: dict[tuple[tuple[int, ...], str, str, str], dict[str, float]] = {}
    for row in rows:
        table.setdefault((row.shape, row.config, row.kind, row.direction), {})[row.provider] = (
            row.ms
        )
    out: dict[tuple[tuple[int, ...], str, str, str], dict[str, float]] = {}
    for key, times in table.items():
        if "ours" in times:
            out[key] = {
                f"vs_{name}": ms / times["ours"] for name, ms in times.items() if name != "ours"
            }
    return out


def format_table(rows: Sequence[Row]) -> str:
    """The short summary: forward+backward, fraction of copy bandwidth and speed-ups.

    Columns: ``ours`` ms, then fractions of copy bandwidth at minimal bytes for ours (split),
    ours persistent, eager and compile, then ours' speed-ups over eager and compile, then the
    default backend's (``auto``) speed-up over eager.
    """
    ratios = speedups(rows)
    lines = [
        f"{'shape':<20} {'config':<8} {'kind':<6} {'ours ms':>8} {'ours':>5} {'pers.':>5} "
        f"{'eager':>5} {'comp.':>5} {'×eager':>7} {'×comp.':>7} {'auto×e':>7}"
    ]
    by_key: dict[tuple[tuple[int, ...], str, str], dict[str, Row]] = {}
    for row in rows:
        if row.direction == "fwd+bwd":
            by_key.setdefault((row.shape, row.config, row.kind), {})[row.provider] = row
    for (shape, config, kind), providers in by_key.items():
        ours = providers.get("ours")
        if ours is None:
            continue
        ratio = ratios.get((shape, config, kind, "fwd+bwd"), {})

        def frac(name: str, providers: dict[str, Row] = providers) -> str:
            row = providers.get(name)
            return f"{row.fraction_of_copy:5.2f}" if row else f"{'–':>5}"

        def times(name: str, ratio: dict[str, float] = ratio) -> str:
            return f"{ratio[name]:7.2f}" if name in ratio else f"{'–':>7}"

        def auto_vs_eager(providers: dict[str, Row] = providers) -> str:
            if "auto" not in providers or "eager" not in providers:
                return f"{'–':>7}"
            return f"{providers['eager'].ms / providers['auto'].ms:7.2f}"

        lines.append(
            f"{'x'.join(map(str, shape)):<20} {config:<8} {kind:<6} {ours.ms:8.3f} "
            f"{frac('ours')} {frac('ours_persistent')} {frac('eager')} {frac('compile')} "
            f"{times('vs_eager')} "
            f"{times('vs_compile')} {auto_vs_eager()}"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-only", action="store_true", help="correctness step only")
    parser.add_argument("--tiny", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (interpreter)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results", help="JSON dir"
    )
    parser.add_argument("--rep-ms", type=float, default=40.0, help="timing budget per case")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=200.0,
        help="stop timing new shapes after this many seconds (the JSON says it was truncated)",
    )
    return parser.parse_args(argv)


# --- everything below needs torch (and, for timing, a CUDA GPU) ---------------------------------


def _make(shape: Sequence[int], config: str, device: str, seed: int = 0) -> tuple:
    """``(x, weight, bias, residual, dy)`` of a configuration, x in its memory format."""
    import torch

    dtype_name, channels_last = CONFIGS[config]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device).manual_seed(seed)
    channels = shape[1]
    x = torch.randn(shape, generator=gen, device=device).to(dtype)
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(channels, generator=gen, device=device) + 0.5
    bias = torch.randn(channels, generator=gen, device=device)
    residual = torch.randn(shape, generator=gen, device=device).to(dtype)
    residual = (
        residual.contiguous(memory_format=torch.channels_last)
        if x.dim() == 4 and channels_last
        else residual
    )
    dy = torch.randn(shape, generator=gen, device=device).to(dtype)
    dy = dy.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and channels_last else dy
    return x, weight, bias, residual, dy


def check_correctness(shapes: Sequence[Sequence[int]], device: str) -> list[str]:
    """Ours against a float64 reference, every config, arrangement and fused/plain; failures."""
    import torch
    import torch.nn.functional as F

    from batchnorm.backends.triton_backend import ARRANGEMENT_ENV_VAR
    from batchnorm.functional import batch_norm

    failures = []
    arrangements = ("split", "persistent")
    for shape in shapes:
        for config, (dtype_name, _cl) in CONFIGS.items():
            tolerance = CHECK_TOLERANCE[dtype_name]
            for fused in (False, True):
                x, weight, bias, residual, dy = _make(shape, config, device)
                x64 = x.double().requires_grad_()
                w64, b64 = weight.double().requires_grad_(), bias.double().requires_grad_()
                z64 = residual.double().requires_grad_()
                y64 = F.batch_norm(x64, None, None, w64, b64, training=True)
                if fused:
                    y64 = torch.relu(y64 + z64)
                expected = (
                    y64,
                    *torch.autograd.grad(y64, (x64, w64, b64, z64), dy.double(), allow_unused=True),
                )
                for arrangement in arrangements:
                    os.environ[ARRANGEMENT_ENV_VAR] = arrangement
                    leaves = [
                        t.detach().clone().requires_grad_() for t in (x, weight, bias, residual)
                    ]
                    y = batch_norm(
                        leaves[0], None, None, leaves[1], leaves[2], training=True,
                        backend="triton", activation="relu" if fused else None,
                        residual=leaves[3] if fused else None,
                    )  # fmt: skip
                    got = (y, *torch.autograd.grad(y, leaves, dy, allow_unused=True))
                    names = ("y", "dx", "dweight", "dbias", "dresidual")
                    for name, actual, reference in zip(names, got, expected, strict=True):
                        if reference is None or actual is None:
                            continue
                        scale = 1.0 + reference.abs().max().item()
                        error = (actual.double() - reference).abs().max().item()
                        if error > tolerance * scale:
                            failures.append(
                                f"{shape} {config} fused={fused} {arrangement} {name}: "
                                f"max error {error:.3g} > {tolerance * scale:.3g}"
                            )
    os.environ.pop(ARRANGEMENT_ENV_VAR, None)
    return failures


def copy_bandwidth_gbps(rep_ms: float) -> float:
    """Device copy bandwidth (read + write bytes per second, GB/s) on a 1 GiB buffer."""
    import torch
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=rep_ms, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _providers(kind: str, shape: Sequence[int], config: str) -> dict[str, Callable]:
    """The forward functions to time: ``f(x, weight, bias, residual) -> y``.

    ``ours`` is the Triton backend in the default (split) arrangement, ``ours_persistent`` the
    single-launch one, ``auto`` the default backend (``cuda``: Triton where it measured faster,
    ATen's kernels elsewhere); ``compile`` only on :data:`COMPILE_SHAPES` in bf16 (each compile
    costs seconds).
    """
    import torch
    import torch.nn.functional as F

    from batchnorm.backends.triton_backend import ARRANGEMENT_ENV_VAR
    from batchnorm.functional import batch_norm

    def ours(x, w, b, z):
        return batch_norm(
            x, None, None, w, b, training=True, backend="triton",
            activation="relu" if kind == "fused" else None, residual=z if kind == "fused" else None,
        )  # fmt: skip

    def ours_persistent(x, w, b, z):
        os.environ[ARRANGEMENT_ENV_VAR] = "persistent"
        try:
            return ours(x, w, b, z)
        finally:
            os.environ.pop(ARRANGEMENT_ENV_VAR, None)

    def auto(x, w, b, z):
        return batch_norm(
            x, None, None, w, b, training=True, backend="auto",
            activation="relu" if kind == "fused" else None, residual=z if kind == "fused" else None,
        )  # fmt: skip

    def eager(x, w, b, z):
        y = F.batch_norm(x, None, None, w, b, training=True)
        return torch.relu(y + z) if kind == "fused" else y

    providers = {"ours": ours, "ours_persistent": ours_persistent, "auto": auto, "eager": eager}
    if tuple(shape) in COMPILE_SHAPES and kind == "plain" and config != "fp32":
        # The timing loop re-runs backward on one graph (retain_graph): no donated buffers.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        providers["compile"] = torch.compile(eager, fullgraph=True)
    return providers


def time_case(fn: Callable, inputs: tuple, dy, kind: str, rep_ms: float) -> dict[str, float]:
    """Median ms of forward, backward (retained graph), forward+backward, and the latter by
    CUDA-graph replay (``fwd+bwd (graph)``, ``nan`` where the step cannot be captured).

    Backward computes the gradients of x, weight, bias (and of the residual when fused).
    """
    import torch
    import triton.testing

    leaves = [t.detach().requires_grad_(kind == "fused" or i < 3) for i, t in enumerate(inputs)]
    targets = leaves if kind == "fused" else leaves[:3]
    with torch.no_grad():
        fwd = triton.testing.do_bench(lambda: fn(*leaves), rep=rep_ms, return_mode="median")
    y = fn(*leaves)
    bwd = triton.testing.do_bench(
        lambda: torch.autograd.grad(y, targets, dy, retain_graph=True),
        rep=rep_ms,
        return_mode="median",
    )

    def step():
        torch.autograd.grad(fn(*leaves), targets, dy)

    both = triton.testing.do_bench(step, rep=rep_ms, return_mode="median")
    try:
        graph = triton.testing.do_bench_cudagraph(step, rep=rep_ms, return_mode="median")
    except Exception as error:  # a provider whose step cannot be captured: say so, go on
        print(f"  graph replay failed: {type(error).__name__}: {error}"[:200], flush=True)
        graph = float("nan")
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both, "fwd+bwd (graph)": graph}


def host_profile(fn: Callable, inputs: tuple, dy, kind: str) -> dict[str, Any]:
    """The host's µs to issue one forward+backward, and the CUDA kernels one step launches."""
    import torch

    leaves = [t.detach().requires_grad_(kind == "fused" or i < 3) for i, t in enumerate(inputs)]
    targets = leaves if kind == "fused" else leaves[:3]

    def step():
        torch.autograd.grad(fn(*leaves), targets, dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(HOST_STEPS):  # issued back to back: the host's time, unless the GPU is slower
        step()
    issued = (time.perf_counter() - start) / HOST_STEPS * 1e6
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [
        event.name
        for event in prof.events()
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
    ]
    return {"host_us": issued, "kernels": len(kernels), "kernel_names": sorted(set(kernels))}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device; use --device cpu --check-only for a CPU check")
        return 2
    shapes = TINY_SHAPES if args.tiny else SHAPES
    check_shapes = TINY_SHAPES[:2] if args.device == "cpu" else TINY_SHAPES
    failures = check_correctness(
        [(2, 3, 5, 5)] if args.device == "cpu" else check_shapes, args.device
    )
    if failures:
        print("correctness check FAILED:\n" + "\n".join(failures))
        return 1
    print("correctness check passed (float64 reference; split and persistent; plain and fused)")
    if args.check_only:
        return 0

    copy_gbps = copy_bandwidth_gbps(args.rep_ms)
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    rows: list[Row] = []
    host: list[dict[str, Any]] = []
    started = time.monotonic()
    skipped: list[list[int]] = []
    for shape in shapes:
        if time.monotonic() - started > args.max_seconds:
            skipped.append(list(shape))
            continue
        print(f"timing {shape} ({time.monotonic() - started:.0f} s)", flush=True)
        for config, (dtype_name, _cl) in CONFIGS.items():
            if len(shape) != 4 and config == "bf16_cl":
                continue
            for kind in ("plain", "fused"):
                x, w, b, z, dy = _make(shape, config, "cuda")
                for provider, fn in _providers(kind, shape, config).items():
                    times = time_case(fn, (x, w, b, z), dy, kind, args.rep_ms)
                    profile = host_profile(fn, (x, w, b, z), dy, kind)
                    host.append({"shape": list(shape), "config": config, "kind": kind,
                                 "provider": provider, **profile})  # fmt: skip
                    print(
                        f"  {config} {kind} {provider}: fwd+bwd {times['fwd+bwd']:.3f} ms, "
                        f"graph {times['fwd+bwd (graph)']:.3f} ms, host {profile['host_us']:.0f}"
                        f" µs, {profile['kernels']} kernels",
                        flush=True,
                    )
                    for direction, ms in times.items():
                        nbytes = minimal_bytes(shape, dtype_name, kind, direction)
                        rows.append(
                            Row(tuple(shape), config, kind, direction, provider, ms,
                                fraction_of_copy(nbytes, ms, copy_gbps))
                        )  # fmt: skip
                del x, w, b, z, dy
                torch.cuda.empty_cache()

    card = torch.cuda.get_device_name()
    today = dt.date.today()
    record = {
        "card": card,
        "date": today.isoformat(),
        "commit": harness.git_commit() or "unknown",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
        },
        "copy_bandwidth_gbps": copy_gbps,
        "skipped_shapes_time_limit": skipped,
        "minimal_bytes_in_S": {f"{k}/{d}": v for (k, d), v in MINIMAL_S.items()},
        "rows": [asdict(row) for row in rows],
        "host": host,
        "speedups": [
            {"shape": list(k[0]), "config": k[1], "kind": k[2], "direction": k[3], **v}
            for k, v in speedups(rows).items()
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, card, today)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
