"""What one training step on the Triton path runs on the host, counted with the launches stubbed.

Structural, not timed (``benchmarks/gpu_host.py`` prints the same counts with µs next to eager):
the split arrangement launches two kernels per direction (the reduction's last program merges),
with the runtime arguments and allocations pinned below; nothing is zero-filled per step (the
six statistics outputs get no materialized gradients, the arrival counters reset themselves),
and the in-place functional and the modules let the reduction kernel move the running buffers
(no copy afterwards).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import batchnorm

if "triton" not in batchnorm.available_backends():
    pytest.skip("the triton backend does not run here", allow_module_level=True)

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_host.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_gpu_host", _PATH)
assert _SPEC is not None
assert _SPEC.loader is not None
host = importlib.util.module_from_spec(_SPEC)
sys.modules["benchmark_gpu_host"] = host
_SPEC.loader.exec_module(host)


#: What one step may run per direction (split arrangement): kernels in launch order, runtime
#: arguments over all launches, allocations (``aten::new_empty`` counts with the
#: ``aten::empty`` it calls). Lower them when the code needs less; never raise them silently.
PINNED = {
    "forward": (["reduce_stats_kernel", "normalize_kernel"], 45, 10),
    "backward": (["reduce_grads_kernel", "input_grad_kernel"], 65, 8),
}


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "relu+residual"])
def test_launches_per_direction_and_no_zero_fills(fused: bool) -> None:
    """Two launches each way (reduce with its merge, elementwise), no more arguments and
    allocations than pinned; nothing is filled with zeros in either direction."""
    counts = host.host_counts((4, 6, 5, 5), fused)
    for direction, (kernels, runtime_args, allocations) in PINNED.items():
        row = counts[direction]
        assert row["kernels"] == kernels, direction
        assert len(row["kernels"]) <= 2, direction  # the design's limit (issue 19)
        assert row["runtime_args"] <= runtime_args, (direction, row["runtime_args"])
        assert row["allocations"] <= allocations, (direction, row["ops"])
        assert row["zero_fills"] == 0, (direction, row["ops"])


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "relu+residual"])
def test_running_statistics_are_not_copied(fused: bool) -> None:
    """The in-place functional hands the buffers to the reduction: no ``copy_`` after it."""
    counts = host.host_counts((4, 6, 5, 5), fused)
    assert counts["forward"]["copies"] == 0, counts["forward"]["ops"]


def test_in_place_update_moves_the_buffers_like_torch() -> None:
    """The kernel-written buffers are the given tensors, their version moved, values as ATen's."""
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    mean, var = torch.zeros(3), torch.ones(3)
    address, version = mean.data_ptr(), mean._version
    batchnorm.functional.batch_norm(x, mean, var, training=True, momentum=0.3, backend="triton")
    ref_mean, ref_var = torch.zeros(3), torch.ones(3)
    torch.nn.functional.batch_norm(x.detach(), ref_mean, ref_var, training=True, momentum=0.3)
    assert mean.data_ptr() == address
    assert mean._version > version  # autograd sees the change, as after ATen's update
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)


def test_pure_form_leaves_the_buffers_alone() -> None:
    """``batch_norm_pure`` gets new statistics; the given buffers stay bit-identical."""
    x = torch.randn(4, 3, 5, 5)
    mean, var = torch.zeros(3), torch.ones(3)
    result = batchnorm.functional.batch_norm_pure(x, mean, var, training=True, backend="triton")
    assert torch.equal(mean, torch.zeros(3))
    assert torch.equal(var, torch.ones(3))
    assert result.running_mean is not mean
    assert not torch.equal(result.running_var, var)


def test_the_stub_records_every_launch() -> None:
    """The counting harness itself: a stubbed kernel records and runs nothing."""
    with host.stubbed_launches() as launches:
        from batchnorm.kernels.triton import batchnorm_fwd

        batchnorm_fwd.normalize_kernel[(1,)](1, 2, True, BLOCK=4)
    assert launches == [("normalize_kernel", 2)]


def test_the_counts_see_a_third_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pinned counts would catch an extra launch: one more kernel run per forward shows."""
    from batchnorm.kernels.triton import launch

    normalize = launch._NORMALIZE

    def twice(*args: object) -> None:
        normalize(*args)  # type: ignore[arg-type]
        normalize(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(launch, "_NORMALIZE", twice)
    forward = host.host_counts((4, 6, 5, 5))["forward"]
    assert forward["kernels"] != PINNED["forward"][0]
    assert forward["runtime_args"] > PINNED["forward"][1]
