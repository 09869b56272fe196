"""Smoke test of ``benchmarks/cpu.py``: it runs at tiny sizes and writes a well-formed results file.

No timing is asserted (CI machines are shared); the script itself checks every provider's outputs
and gradients against ATen's before timing, so a wrong result fails this test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_script(
    name: str, *args: str, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess[str]:
    """Runs ``benchmarks/<name>`` with this tree's ``src`` first on the path (and ``env`` added);
    fails the test, showing the end of stderr, unless it exits 0."""
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.mark.slow
def test_cpu_benchmark_tiny_run(tmp_path) -> None:
    """``cpu.py --tiny`` exits 0 and records every (case, pass) with ATen and our providers."""
    out = tmp_path / "cpu.json"
    completed = _run_script(
        "cpu.py", "--tiny", "--threads", "1", "--repeats", "1", "--warmup", "0",
        "--out", str(out),
        BATCHNORM_BENCHMARK_COMMIT="abc123-from-env",  # a copy without .git names its commit
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert results["environment"]["torch_num_threads"] == 1
    assert results["environment"]["git_commit"] == "abc123-from-env"
    records = results["records"]
    passes = {record["pass"] for record in records}
    assert passes == {"forward", "backward", "forward+backward", "inference"}
    # 3 tiny shapes: one 4D in two layouts, a 2D and a 3D one; two dtypes; four passes each.
    assert len(records) == 4 * 2 * 4
    for record in records:
        providers = record["providers"]
        assert {"aten", "ours", "torch-module", "ours-module"} <= set(providers)
        assert providers["ours"]["ratio_vs_aten"] > 0
        assert record["copy_ms"] > 0
    assert "ours/aten" in completed.stdout


def test_cpu_overhead_runs() -> None:
    """``cpu_overhead.py`` exits 0 and prints a row per measured call."""
    completed = _run_script("cpu_overhead.py", "--rounds", "3")
    rows = [line.split()[0] for line in completed.stdout.splitlines()[2:]]
    assert rows == ["inference", "training", "module"]


def test_cpu_sizes_runs() -> None:
    """``cpu_sizes.py`` exits 0 and prints the three passes' ratios for every size asked."""
    pytest.importorskip("numba")
    completed = _run_script(
        "cpu_sizes.py", "--rounds", "1", "--batches", "2", "--dtypes", "float32", "bfloat16"
    )
    lines = completed.stdout.splitlines()[1:]
    assert [line.split()[:2] for line in lines] == [
        ["float32", "ncl"], ["float32", "rows"], ["bfloat16", "ncl"], ["bfloat16", "rows"]
    ]  # fmt: skip
    assert all("forward ×" in line and "inference ×" in line for line in lines)


def _load_harness():
    """``benchmarks/harness.py`` as a module (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location("harness", ROOT / "benchmarks" / "harness.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_interleaved_shuffles_each_round() -> None:
    """Every provider runs once per round, the order changes between rounds (so no provider
    always inherits the same one's allocator state), and the sequence is the same every run."""
    harness = _load_harness()

    def record(repeats):
        calls: list[str] = []
        steps = {
            name: (harness.untimed_setup, lambda _, name=name: calls.append(name))
            for name in "abcde"
        }
        times = harness.time_interleaved(steps, repeats=repeats, warmup=1)
        counts = {name: len(values) for name, values in times.items()}
        assert counts == dict.fromkeys("abcde", repeats)
        timed = calls[5:]  # after the warmup round, which runs in the given order
        assert calls[:5] == list("abcde")
        return [tuple(timed[i : i + 5]) for i in range(0, len(timed), 5)]

    rounds = record(12)
    assert all(sorted(r) == list("abcde") for r in rounds)
    assert len(set(rounds)) > 6  # not one fixed order
    assert len({r[0] for r in rounds}) > 2  # the first slot changes hands
    assert record(12) == rounds  # seeded: the same sequence every run


def test_time_interleaved_samples_average_back_to_back_calls() -> None:
    """With ``min_sample_ms`` a fast step is called several times per sample (its setup before
    each call, untimed) and the sample is the time per call; a slow step is called once."""
    harness = _load_harness()
    calls = {"fast": 0, "slow": 0, "setups": 0}

    def setup():
        calls["setups"] += 1

    def fast(_):
        calls["fast"] += 1

    def slow(_):
        calls["slow"] += 1
        time.sleep(0.004)

    steps = {"fast": (setup, fast), "slow": (harness.untimed_setup, slow)}
    times = harness.time_interleaved(steps, repeats=3, warmup=1, min_sample_ms=2.0)
    assert calls["slow"] == 1 + 3  # one warmup call, then one call per sample
    assert calls["fast"] == 1 + 3 * harness.MAX_CALLS_PER_SAMPLE  # capped
    assert calls["setups"] == calls["fast"]
    assert all(t >= 4.0 for t in times["slow"])  # per call, not per sample
    assert all(t < 1.0 for t in times["fast"])


@pytest.mark.slow
def test_ab_benchmark_against_this_commit(tmp_path: Path) -> None:
    """``ab_cpu.py --tiny --base HEAD`` imports HEAD's package renamed beside ours and reports
    both paired ratios and the A/A control for every (case, pass)."""
    out = tmp_path / "ab.json"
    completed = _run_script(
        "ab_cpu.py", "--base", "HEAD", "--tiny", "--dtypes", "float32", "--repeats", "1",
        "--warmup", "0", "--sample-ms", "0", "--cache", str(tmp_path / "cache"),
        "--out", str(out), timeout=600,
    )  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 * 4  # 4 tiny cases (one 4D in two layouts) × 4 passes, one dtype
    for row in rows:
        assert min(row["functional"], row["module"], row["control"]) > 0
        assert {"ours", "base", "ours-module", "base-module"} <= set(row["median_ms"])
    assert (tmp_path / "cache").is_dir()
    assert "within 0.95–1.05" in completed.stdout


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")
def test_cpu_kernels_tiny_run() -> None:
    """``cpu_kernels.py --tiny`` checks both kernels against ATen's and prints a row per dtype."""
    completed = _run_script("cpu_kernels.py", "--tiny", "--rounds", "1")
    rows = [line for line in completed.stdout.splitlines() if "forward numba" in line]
    assert len(rows) == 2  # float32 and bfloat16


def test_cpu_stream_kernels_tiny_run() -> None:
    """``cpu_stream_kernels.py --tiny`` checks the three C passes against ATen's (the script fails
    on a mismatch) and prints a row per ISA, shape and dtype."""
    from batchnorm.kernels.cpu import cpu_stream

    completed = _run_script("cpu_stream_kernels.py", "--tiny", "--rounds", "1")
    rows = [line for line in completed.stdout.splitlines() if "inference ours" in line]
    assert len(rows) == 2 * 2 * len(cpu_stream.ISAS)  # two shapes, two dtypes per ISA
    assert {row.split()[0] for row in rows} == set(cpu_stream.ISAS)


def test_device_script_is_valid_bash_and_names_existing_scripts() -> None:
    """The prepared device run parses, and every benchmark it calls exists."""
    import re

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "device_run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    called = set(re.findall(r'(?:python|"\$PY") "?(benchmarks/\w+\.py)', text))
    assert {"benchmarks/gpu.py", "benchmarks/gpu_check.py", "benchmarks/gpu_host.py"} <= called
    for relative in called:
        assert (script.parents[1] / relative).is_file(), relative


def test_compare_cpu_pairs_the_rounds(tmp_path: Path) -> None:
    """compare_cpu: the paired ratio is the median of per-round ratios; unchanged runs give 1."""
    spec = importlib.util.spec_from_file_location(
        "compare_cpu", Path(__file__).resolve().parents[1] / "benchmarks" / "compare_cpu.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def run(scale: float) -> dict:
        times = {"aten": [2.0, 4.0, 6.0], "aten-control": [2.0, 4.0, 6.0], "ours": [1.0, 1.0, 3.0]}
        providers = {
            name: {"times_ms": [t * (scale if name == "ours" else 1.0) for t in values]}
            for name, values in times.items()
        }
        record = {"shape": [2, 3], "layout": "contiguous", "dtype": "float32", "pass": "forward"}
        return {"records": [{**record, "providers": providers}]}

    (row,) = module.compare(run(1.0), run(1.0))
    assert row["before"] == 2.0  # median of 2/1, 4/1, 6/3
    assert row["after/before"] == 1.0
    assert row["control_before"] == 1.0
    (slower,) = module.compare(run(1.0), run(2.0))
    assert slower["after/before"] == 0.5


def test_cpu_hugepages_tiny_run() -> None:
    """``cpu_hugepages.py --tiny`` runs a fresh process per setting and prints both."""
    completed = _run_script(
        "cpu_hugepages.py", "--tiny", "--steps", "4", "--processes", "1", "--threads", "1"
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("advice")]
    assert [line.split()[1] for line in lines] == ["on", "off"]
    assert all("| ATen " in line for line in lines)


def test_calibration_stability_tiny_run() -> None:
    """``calibration_stability.py --tiny`` prints each repeated measurement and the loop's."""
    completed = _run_script("calibration_stability.py", "--tiny", "--repeats", "2")
    lines = completed.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == [
        "time_passes 1", "time_passes 2", "harness loop"
    ]  # fmt: skip
    assert all("ATen/ours x" in line for line in lines[1:])
