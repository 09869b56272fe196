"""What one training step on the Triton path runs on the host, counted with the launches stubbed.

Structural, not timed (``benchmarks/gpu_host.py`` prints the same counts with µs next to eager):
the split arrangement launches three kernels per direction, backward zero-fills nothing (the six
statistics outputs get no materialized gradients), and the in-place functional and the modules
let the merge kernel move the running buffers (no copy afterwards).
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


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "relu+residual"])
def test_launches_per_direction_and_no_zero_fills(fused: bool) -> None:
    """Three launches each way (reduce, merge, elementwise); backward fills no zeros."""
    counts = host.host_counts((4, 6, 5, 5), fused)
    forward, backward = counts["forward"], counts["backward"]
    assert forward["kernels"] == ["partial_stats_kernel", "merge_stats_kernel", "normalize_kernel"]
    assert backward["kernels"] == [
        "partial_grads_kernel",
        "merge_grads_kernel",
        "input_grad_kernel",
    ]
    assert backward["zero_fills"] == 0, backward["ops"]
    assert forward["zero_fills"] == 0, forward["ops"]


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "relu+residual"])
def test_running_statistics_are_not_copied(fused: bool) -> None:
    """The in-place functional hands the buffers to the merge kernel: no ``copy_`` after it."""
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
