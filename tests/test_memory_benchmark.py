"""Smoke test of ``benchmarks/memory.py`` at a tiny size: the JSON it writes and what it claims.

The numbers checked are properties, not timings: the in-place layer's blocks save at most 0.55×
the bytes of ``torch.nn``'s (the counting itself is checked in ``test_variants_inplace.py``),
every in-place block really ran in place, and all variants compute the same loss.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    """``benchmarks/memory.py`` as a module (the benchmarks folder is not a package)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)  # for its `import harness`
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks/memory.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_memory_benchmark_tiny_run(tmp_path, capsys) -> None:
    memory = _load_benchmark()
    out = tmp_path / "memory.json"
    payload = memory.main(
        ["--blocks", "1", "--resolution", "8", "--batch", "4", "--device", "cpu", "--out", str(out)]
    )
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(payload))  # what main returns is what it wrote
    assert written["config"]["blocks"] == [1, 1, 1, 1]
    assert written["config"]["resolution"] == 8
    assert written["environment"]["machine"]["platform"]
    assert written["environment"]["versions"]["torch"]
    assert written["losses_equal"] is True
    assert written["target"]["met"] is True
    results = written["results"]
    assert set(results) == set(memory.VARIANTS)
    reference = results["torch.nn"]
    for name, row in results.items():
        for key in ("saved_bytes_blocks", "saved_bytes_total", "peak_bytes"):
            assert row[key] > 0, (name, key)
        assert row["blocks_run"] == 5  # stem + one block per stage
        assert row["loss_rel_diff"] <= 1e-5, name
        assert row["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert row["loss_after_step"] == pytest.approx(reference["loss_after_step"], rel=1e-3)
    inplace = results["InPlaceBatchNormAct2d"]
    assert inplace["blocks_in_place"] == 5
    assert results["BatchNormAct2d"]["blocks_in_place"] == 0
    assert inplace["saved_bytes_blocks_ratio"] < 0.55
    assert inplace["saved_bytes_total"] < results["BatchNormAct2d"]["saved_bytes_total"]
    assert inplace["saved_bytes_blocks"] <= inplace["saved_bytes_total"]
    printed = capsys.readouterr().out
    assert "InPlaceBatchNormAct2d / torch.nn" in printed
    assert "peak MiB" in printed


def test_blocks_argument() -> None:
    memory = _load_benchmark()
    assert memory.parse_blocks("2") == (2, 2, 2, 2)
    assert memory.parse_blocks("3,4,6,3") == (3, 4, 6, 3)
    with pytest.raises(argparse.ArgumentTypeError, match="--blocks"):
        memory.parse_blocks("1,2")
