"""Smoke test of ``python -m batchnorm.demo`` on a tiny budget (check 7 of the chain)."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")

from batchnorm import demo


def test_demo_runs_and_batch_norm_learns_faster(capsys) -> None:
    curves = demo.main(steps=60, every=30, seed=0)
    assert list(curves) == ["no BN", "BN"]
    for curve in curves.values():
        assert len(curve) == 2
        assert all(0.0 <= accuracy <= 1.0 for accuracy in curve)
    # With BN before each sigmoid the network learns in a few dozen steps; without, it barely
    # leaves chance (0.1) in that time: the paper's Figure 1 in miniature.
    assert curves["BN"][-1] > 0.8
    assert curves["BN"][-1] > curves["no BN"][-1] + 0.3
    out = capsys.readouterr().out
    assert "Test accuracy" in out
    assert "BN" in out
