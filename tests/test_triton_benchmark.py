"""CPU-side logic of ``benchmarks/gpu.py``: byte counts, fractions, ratios, table, file name,
and its correctness step on CPU tensors under the interpreter (``--device cpu --check-only``)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import datetime as dt
import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_gpu", _PATH)
assert _SPEC is not None
assert _SPEC.loader is not None
gpu = importlib.util.module_from_spec(_SPEC)
sys.modules["benchmark_gpu"] = gpu
_SPEC.loader.exec_module(gpu)


def test_minimal_bytes_follow_design() -> None:
    """2S forward, 3S backward, 5S together; fused 3S + 4S; S from shape and dtype."""
    shape = (256, 64, 112, 112)
    s_bf16 = 256 * 64 * 112 * 112 * 2
    assert gpu.tensor_bytes(shape, "bfloat16") == s_bf16
    assert gpu.tensor_bytes(shape, "float32") == 2 * s_bf16
    assert gpu.minimal_bytes(shape, "bfloat16", "plain", "fwd") == 2 * s_bf16
    assert gpu.minimal_bytes(shape, "bfloat16", "plain", "bwd") == 3 * s_bf16
    assert gpu.minimal_bytes(shape, "bfloat16", "plain", "fwd+bwd") == 5 * s_bf16
    assert gpu.minimal_bytes(shape, "float32", "fused", "fwd+bwd") == 7 * 2 * s_bf16
    for kind in ("plain", "fused"):
        total = gpu.MINIMAL_S[(kind, "fwd")] + gpu.MINIMAL_S[(kind, "bwd")]
        assert gpu.MINIMAL_S[(kind, "fwd+bwd")] == total


def test_fraction_of_copy_and_speedups() -> None:
    """3 GB in 1 ms at 3000 GB/s is the whole bandwidth; ratios are other / ours."""
    assert gpu.fraction_of_copy(3 * 10**9, 1.0, 3000.0) == pytest.approx(1.0)
    assert gpu.fraction_of_copy(3 * 10**9, 2.0, 3000.0) == pytest.approx(0.5)
    rows = [
        gpu.Row((2, 3), "fp32", "plain", "fwd+bwd", "ours", 1.0, 0.8),
        gpu.Row((2, 3), "fp32", "plain", "fwd+bwd", "eager", 3.0, 0.27),
        gpu.Row((2, 3), "fp32", "plain", "fwd+bwd", "compile", 1.5, 0.53),
        gpu.Row((2, 3), "fp32", "plain", "fwd+bwd", "auto", 2.0, 0.4),
        gpu.Row((2, 3), "fp32", "plain", "fwd", "eager", 3.0, 0.27),
    ]
    ratios = gpu.speedups(rows)
    assert ratios[((2, 3), "fp32", "plain", "fwd+bwd")] == {
        "vs_eager": 3.0, "vs_compile": 1.5, "vs_auto": 2.0
    }  # fmt: skip
    assert ((2, 3), "fp32", "plain", "fwd") not in ratios  # no "ours" row to compare with
    table = gpu.format_table(rows)
    assert table.splitlines()[1].split() == [
        "2x3", "fp32", "plain", "1.000", "0.80", "–", "0.27", "0.53", "3.00", "1.50", "1.50"
    ]  # fmt: skip


def test_results_path_and_slug() -> None:
    """``<card>-<date>.json`` with a file-name-safe card name."""
    path = gpu.results_path(Path("out"), "NVIDIA H100 80GB HBM3", dt.date(2026, 11, 26))
    assert path == Path("out/nvidia-h100-80gb-hbm3-2026-11-26.json")


def test_cpu_check_only_runs_the_correctness_step(capsys: pytest.CaptureFixture[str]) -> None:
    """The correctness step (both arrangements, plain and fused) passes in the interpreter."""
    assert gpu.main(["--device", "cpu", "--check-only"]) == 0
    assert "correctness check passed" in capsys.readouterr().out
    assert gpu.parse_args(["--tiny"]).tiny


def _load_script(name: str):
    """Imports ``benchmarks/<name>.py`` as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_shard_runs_in_the_interpreter(monkeypatch, capsys) -> None:
    """One shard of the sweep on CPU tensors (Triton interpreter): kinks counted, no failure."""
    check = _load_script("gpu_check")
    monkeypatch.setattr(check, "DEVICE", "cpu")
    monkeypatch.setattr(check, "CASES", [((6, 3, 4), "contiguous")])
    monkeypatch.setattr(check, "ACTIVATIONS", (None, "leaky_relu"))
    monkeypatch.setattr(check, "KINK", 1e5)  # every value counts as near the kink
    assert check.main(["--arrangement", "split", "--dtype", "float32", "--no-family"]) == 0
    out = capsys.readouterr().out
    assert "values within 10 of the kink" in out
    assert "modules split torch.float32: 0 failures" in out
    assert "persistent" not in out


def test_gpu_check_reports_a_wrong_gradient(monkeypatch, capsys) -> None:
    """A perturbed backward is caught: the sweep can fail."""
    check = _load_script("gpu_check")
    monkeypatch.setattr(check, "DEVICE", "cpu")
    monkeypatch.setattr(check, "CASES", [((6, 3, 4), "contiguous")])
    monkeypatch.setattr(check, "ACTIVATIONS", (None,))
    from batchnorm.backends import triton_backend as tb
    from batchnorm.backends import triton_ops as ops

    real = ops.train_backward

    def wrong(*args, **kwargs):
        dx, dweight, dbias, dz = real(*args, **kwargs)
        return dx * 1.01, dweight, dbias, dz

    monkeypatch.setattr(ops, "train_backward", wrong)  # the eager twin's backward
    monkeypatch.setattr(tb, "train_backward", wrong)  # the plain backward primitive
    assert check.main(["--arrangement", "split", "--dtype", "float32", "--no-family"]) == 1
    assert (
        "FAIL split (6, 3, 4) contiguous torch.float32 None z=True step0 dx"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize("name", ["gpu_overhead", "sync_gpu"])
def test_cuda_only_scripts_say_so_without_a_gpu(name: str, monkeypatch, capsys) -> None:
    """Without CUDA the device scripts print why and exit with status 2."""
    import torch

    script = _load_script(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out
