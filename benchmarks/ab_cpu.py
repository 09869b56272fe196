"""A/B in one run: this tree's batch norm against an earlier commit's, timed in the same rounds.

Two runs of ``benchmarks/cpu.py`` compared afterwards (``compare_cpu.py``) add the drift of the
machine between the runs to every quotient. Here the earlier commit's package is imported beside
ours in the same process, so both are timed round-robin in the same rounds (``harness.py``), and
the paired ratio ``base_i / ours_i`` (median over rounds; above 1: this tree is faster) has only
the noise the A/A control (ATen against itself, same rounds) shows.

How the baseline is imported: ``git archive REV src/batchnorm`` is unpacked into a cache folder,
renamed ``batchnorm_base`` (every ``batchnorm`` module name in its sources rewritten), and its C
extension compiled there with the flags its ``pyproject.toml`` names; nothing of this tree or of
the installed package changes.

Run: ``python benchmarks/ab_cpu.py --base 6736f7c --threads 1`` (``--tiny`` for a smoke test).
"""

from __future__ import annotations

import argparse
import importlib
import io
import math
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import tomllib
import torch

import batchnorm
import cpu
import harness

ROOT = Path(__file__).resolve().parent.parent
BASE_NAME = "batchnorm_base"
#: This tree's provider → the baseline's, for the paired ratios.
PAIRS = {"ours": "base", "ours-module": "base-module"}


def build_base(rev: str, cache: Path) -> Path:
    """Unpacks commit ``rev``'s package as ``batchnorm_base`` under ``cache``; returns the folder.

    Raises:
        subprocess.CalledProcessError: if ``rev`` is not a commit of this repository or its C
            extension does not compile.
    """
    commit = subprocess.run(
        ["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    folder = cache / commit
    if (folder / BASE_NAME / "__init__.py").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit, "src/batchnorm", "pyproject.toml"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / BASE_NAME
    (folder / "src" / "batchnorm").rename(package)
    # Our module names (not torch.nn.modules.batchnorm; BATCHNORM_* variables stay as they are).
    word = re.compile(r"(?<![.\w])batchnorm\b")
    for source in package.rglob("*.py"):
        source.write_text(word.sub(BASE_NAME, source.read_text()))
    pyproject = tomllib.loads((folder / "pyproject.toml").read_text())
    for ext in pyproject.get("tool", {}).get("setuptools", {}).get("ext-modules", []):
        target = folder / (
            ext["name"].replace("batchnorm", BASE_NAME, 1).replace(".", "/")
            + sysconfig.get_config_var("EXT_SUFFIX")
        )
        sources = [str(folder / s.replace("src/batchnorm", BASE_NAME, 1)) for s in ext["sources"]]
        subprocess.run(
            [
                sysconfig.get_config_var("CC").split()[0],
                *ext.get("extra-compile-args", []),
                "-shared",
                "-fPIC",
                f"-I{sysconfig.get_paths()['include']}",
                *sources,
                "-o",
                str(target),
            ],
            check=True,
        )
    return folder


def import_base(folder: Path) -> ModuleType:
    """Imports the baseline package from ``folder`` (see :func:`build_base`)."""
    sys.path.insert(0, str(folder))
    module = importlib.import_module(BASE_NAME)
    importlib.import_module(BASE_NAME + ".functional")
    return module


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="see cpu.py --sample-ms")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny shapes")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(cpu.DTYPES), default=None)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "batchnorm-ab")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    return parser.parse_args(argv)


def _paired(times: dict[str, list[float]], top: str, bottom: str) -> float:
    """Median over rounds of ``top_i / bottom_i``."""
    return float(statistics.median(a / b for a, b in zip(times[top], times[bottom], strict=True)))


def main(argv: list[str] | None = None) -> int:
    """Runs the A/B; returns the exit status."""
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    base = import_base(build_base(args.base, args.cache))
    cpu_args = cpu._parse_args(
        ["--no-compile", "--out", "/dev/null"]
        + (["--tiny"] if args.tiny else [])
        + (["--dtypes", *args.dtypes] if args.dtypes else [])
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ours = this tree, "
        f"base = {args.base}; median of {args.repeats} rounds, samples of ~{args.sample_ms:g} "
        "ms; paired ratio base/ours (above 1: this tree faster), A/A = aten-control/aten",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for shape, layout, dtype in cpu._cases(cpu_args):
        case = cpu.Case(shape, layout, dtype, compile=False)
        channels = shape[1]
        case.providers["base"] = case._functional(base.functional.batch_norm, channels)
        module_name = "BatchNorm2d" if len(shape) == 4 else "BatchNorm1d"
        for name, package in (("ours-module", batchnorm), ("base-module", base)):
            module = getattr(package, module_name)(channels, momentum=cpu.MOMENTUM, eps=cpu.EPS)
            with torch.no_grad():
                module.weight.copy_(torch.linspace(0.5, 1.5, channels))
                module.bias.copy_(torch.linspace(-1.0, 1.0, channels))
            case.providers[name] = (case._module_forward(module), (module.weight, module.bias))
        del case.providers["torch-module"]
        case.check()
        for pass_name in cpu.MIN_BYTES:
            times = harness.time_interleaved(
                case.steps(pass_name), args.repeats, args.warmup, args.sample_ms
            )
            row = {
                "case": [list(shape), layout, str(dtype).removeprefix("torch."), pass_name],
                "functional": _paired(times, "base", "ours"),
                "module": _paired(times, "base-module", "ours-module"),
                "control": _paired(times, "aten-control", "aten"),
                "median_ms": {name: harness.median_ms(t) for name, t in times.items()},
            }
            rows.append(row)
            print(
                f"{'x'.join(map(str, shape)):>13} {layout[:6]:6} {row['case'][2]:8} "
                f"{pass_name:16} ours {row['median_ms']['ours']:8.3f} ms | base/ours "
                f"functional ×{row['functional']:.3f} module ×{row['module']:.3f} | "
                f"A/A ×{row['control']:.3f}",
                flush=True,
            )
    for key in ("functional", "module", "control"):
        values = [row[key] for row in rows]
        geomean = math.exp(statistics.fmean(math.log(v) for v in values))
        inside = sum(0.95 <= v <= 1.05 for v in values)
        print(
            f"{key:10}: min ×{min(values):.3f} max ×{max(values):.3f} geomean ×{geomean:.3f}; "
            f"{inside}/{len(values)} within 0.95–1.05"
        )
    if args.out is not None:
        payload = {
            "environment": harness.environment(torch.get_num_threads()),
            "base": args.base,
            "repeats": args.repeats,
            "sample_ms": args.sample_ms,
            "command": " ".join(["python", "benchmarks/ab_cpu.py", *(argv or sys.argv[1:])]),
            "rows": rows,
        }
        harness.write_results(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
