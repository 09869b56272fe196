"""AOT table for sm_90 without a GPU: per benchmark shape and split kernel, registers, shared
memory, occupancy and the widths of the PTX global loads.

For every shape of ``benchmarks/gpu.py`` in fp32, bf16 and bf16 channels_last, the real launch
code (``batchnorm.kernels.triton.launch``) runs on meta tensors with its launchers recording
instead of launching, so the tiles, grids, arguments and constexprs are exactly those a GPU run
would use (132 SMs, 4 programs per SM aimed for). Each recorded launch is specialized as Triton's
own JIT would (its binder on the same arguments), compiled for ``GPUTarget("cuda", 90, 32)``,
and the binary's resource usage (``cuobjdump --dump-resource-usage``, shipped with Triton)
gives registers, local (spill) memory and stack. Occupancy: programs per SM from registers
(allocated per warp in units of 256), threads (2048 per SM), shared memory (228 KB) and the
32-block limit, as ``launch._resident_programs`` computes it on a GPU.

Run: ``python benchmarks/triton_aot.py [--tiny] [--out benchmarks/results]``; writes
``triton-aot-sm90-<date>.json`` and ``.md`` (compiles take a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (the interpreter makes no PTX)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SMS = 132  # H100 SXM and H200
REGS_PER_SM = 65536
THREADS_PER_SM = 2048
SHARED_PER_SM = 228 * 1024
BLOCKS_PER_SM = 32
_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9:]+)*?(?:\.v(\d))?\.(b|u|s|f)(8|16|32|64)\b")


def _shapes(tiny: bool) -> tuple[tuple[int, ...], ...]:
    import gpu

    return gpu.TINY_SHAPES if tiny else gpu.SHAPES


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[tuple[str, Any, tuple[Any, ...], tuple[Any, ...], int]]]:
    """Every ``DirectLauncher`` call recorded (name, grid, args, constexprs, warps), not run; the
    launch code accepts meta tensors and aims for ``4 × SMS`` programs."""
    from batchnorm.kernels.triton import launch, launcher

    records: list[tuple[str, Any, tuple[Any, ...], tuple[Any, ...], int]] = []

    def record(self: Any, grid: Any, args: Any, constexprs: Any, num_warps: int) -> None:
        records.append((self.name, grid, tuple(args), tuple(constexprs), num_warps))

    saved = (launcher.DirectLauncher.__call__, launch.check_device, launch._target_programs)
    launcher.DirectLauncher.__call__ = record  # type: ignore[method-assign]
    launch.check_device = lambda x3: None  # type: ignore[assignment]
    launch._target_programs = lambda device: 4 * SMS  # type: ignore[assignment]
    try:
        yield records
    finally:
        launcher.DirectLauncher.__call__ = saved[0]  # type: ignore[method-assign]
        launch.check_device, launch._target_programs = saved[1], saved[2]  # type: ignore[assignment]


def launches_for(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool) -> list[Any]:
    """The split launches of one plain training forward and backward of ``shape``."""
    from batchnorm.kernels.triton import launch

    x = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    x3 = x.reshape(shape[0], shape[1], -1)  # (N, C, L) view
    c = shape[1]
    weight = torch.empty(c, device="meta")
    running = (torch.empty(c, device="meta"), torch.empty(c, device="meta"))
    with recorded_launches() as records:
        _y, mean, invstd, *_ = launch.train_forward(
            x3, weight, weight, None, *running, 0.1, 1e-5, "none", 0.0, True
        )
        launch.train_backward(
            torch.empty_like(x3), x3, weight, weight, None, torch.empty(0, device="meta"), mean,
            invstd, "none", 0.0, False,
        )  # fmt: skip
    return records


def compile_launch(name: str, args: tuple[Any, ...], constexprs: tuple[Any, ...], warps: int):
    """Compiles one recorded launch for sm_90 as Triton's JIT would specialize it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = getattr(_launchers()[name].module, name)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    names = [p.name for p in kernel.params]
    kwargs = dict(zip(names[len(args) :], constexprs, strict=True))
    kwargs["num_warps"] = warps
    kwargs["debug"] = False
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexpr_values, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    source = ASTSource(kernel, signature, constexpr_values, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, spill bytes and stack frame of the compiled sm_90 binary (the ``cuobjdump
    --dump-resource-usage`` that Triton ships reads what ``ptxas`` allocated)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        binary = Path(folder) / "kernel.cubin"
        binary.write_bytes(cubin)
        done = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", str(binary)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    report = done.stdout
    registers = re.search(r"REG:(\d+)", report)
    stack = re.search(r"STACK:(\d+)", report)
    local = re.search(r"LOCAL:(\d+)", report)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_bytes": int(local.group(1)) if local else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
    }


def load_widths(ptx: str) -> dict[int, int]:
    """Global loads in the PTX by bytes per thread per instruction (16 = ``ld.global.v4.b32``)."""
    widths: Counter[int] = Counter()
    for match in _LOAD.finditer(ptx):
        lanes = int(match.group(1) or 1)
        widths[lanes * int(match.group(3)) // 8] += 1
    return dict(sorted(widths.items(), reverse=True))


def occupancy(registers: int, warps: int, shared: int) -> int:
    """Programs per SM (the CUDA occupancy calculator's limits)."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = REGS_PER_SM // (regs_per_warp * warps)
    by_threads = THREADS_PER_SM // (warps * 32)
    by_shared = SHARED_PER_SM // shared if shared else by_threads
    return max(0, min(by_registers, by_threads, by_shared, BLOCKS_PER_SM))


def table(tiny: bool) -> list[dict[str, Any]]:
    """One row per (shape, config, kernel)."""
    configs = {
        "fp32": (torch.float32, False),
        "bf16": (torch.bfloat16, False),
        "bf16_cl": (torch.bfloat16, True),
    }
    rows = []
    compiled: dict[Any, Any] = {}
    for shape in _shapes(tiny):
        for config, (dtype, channels_last) in configs.items():
            if channels_last and len(shape) != 4:
                continue
            for name, grid, args, constexprs, warps in launches_for(shape, dtype, channels_last):
                key = (name, str(dtype), constexprs, warps, _arg_classes(args))
                if key not in compiled:
                    kernel = compile_launch(name, args, constexprs, warps)
                    ptx = kernel.asm["ptx"]
                    usage = resource_usage(kernel.asm["cubin"])
                    shared = int(kernel.metadata.shared)
                    compiled[key] = {
                        **usage, "shared_bytes": shared, "num_warps": warps,
                        "programs_per_sm": occupancy(usage["registers"], warps, shared),
                        "load_bytes": load_widths(ptx),
                    }  # fmt: skip
                info = compiled[key]
                names = list(_constexpr_names(name))
                tiles = dict(zip(names, constexprs, strict=True))
                rows.append({
                    "shape": list(shape), "config": config, "kernel": name,
                    "grid": list(grid), "programs": grid[0] * grid[1],
                    "tile": {k: v for k, v in tiles.items() if k.startswith(("BLOCK", "L_VEC"))},
                    **info,
                })  # fmt: skip
            print(f"compiled {shape} {config} ({len(compiled)} variants so far)", flush=True)
    return rows


def _launchers() -> dict[str, Any]:
    """The launch code's launchers by kernel name."""
    from batchnorm.kernels.triton import launch
    from batchnorm.kernels.triton.launcher import DirectLauncher

    return {v.name: v for v in vars(launch).values() if isinstance(v, DirectLauncher)}


def _constexpr_names(name: str) -> tuple[str, ...]:
    return _launchers()[name].constexpr_names  # type: ignore[no-any-return]


def _arg_classes(args: tuple[Any, ...]) -> tuple[Any, ...]:
    from batchnorm.kernels.triton.launcher import int_class

    return tuple(
        int_class(a) if type(a) is int else (a.dtype if isinstance(a, torch.Tensor) else 0)
        for a in args
    )


def markdown(rows: list[dict[str, Any]], date: str) -> str:
    """The table as Markdown."""
    lines = [
        f"# Triton kernels compiled for sm_90 (AOT, no GPU), {date}",
        "",
        "Registers and local (spill) bytes from `cuobjdump --dump-resource-usage`; programs/SM "
        "from registers, threads, shared memory; `loads` = global loads in the PTX by bytes "
        "per thread (16 = `ld.global.v4.b32` or `.v8.b16`). "
        "Produced by `python benchmarks/triton_aot.py`.",
        "",
        "| shape | config | kernel | grid | tile (N×L×C, L_VEC) | warps | regs | spill | smem | "
        "programs/SM | loads (bytes: count) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tile = row["tile"]
        loads = ", ".join(f"{k}: {v}" for k, v in row["load_bytes"].items())
        lines.append(
            f"| {'×'.join(map(str, row['shape']))} | {row['config']} | "
            f"{row['kernel'].removesuffix('_kernel')} | {row['grid'][0]}×{row['grid'][1]} | "
            f"{tile['BLOCK_N']}×{tile['BLOCK_L']}×{tile['BLOCK_C']}, {tile['L_VEC']} | "
            f"{row['num_warps']} | {row['registers']} | {row['spill_bytes']} | "
            f"{row['shared_bytes']} | {row['programs_per_sm']} | {loads} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Builds the table and writes it as JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the small shapes only (tests)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    import triton

    rows = table(args.tiny)
    date = dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"triton-aot-sm90-{date}{'-tiny' if args.tiny else ''}"
    record = {"date": date, "target": "cuda sm_90, warp 32", "triton": triton.__version__,
              "torch": torch.__version__, "sms": SMS, "rows": rows}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, date))
    print(f"wrote {stem}.json and .md ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
