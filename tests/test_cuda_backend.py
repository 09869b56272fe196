"""The ``cuda`` backend (``auto`` on CUDA): where it hands a call to Triton or to ATen, and that
both routes give ``F.batch_norm``'s results (CPU tensors, Triton in its interpreter)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from batchnorm import backends
from batchnorm.backends import cuda_backend as cb
from batchnorm.backends.triton_backend import TritonBackend
from batchnorm.functional import batch_norm

#: Triton everywhere (every tensor passes both bounds).
EVERYWHERE = {False: cb.TritonCase(0, 0), True: cb.TritonCase(0, 0)}


def _meta(shape: tuple[int, ...], channels_last: bool = False, dtype=torch.float32):
    x = torch.empty(shape, device="meta", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize(
    ("shape", "channels_last", "dtype", "takes"),
    [
        ((256, 64, 112, 112), False, torch.float32, True),
        ((256, 256, 56, 56), False, torch.bfloat16, True),
        ((256, 64, 56, 56), False, torch.float32, True),
        ((256, 512, 28, 28), False, torch.float32, False),  # rows of 784: ATen is faster
        ((32, 64, 56, 56), False, torch.float32, False),  # 6.4 M values: host work dominates
        ((8192, 1024), False, torch.float32, False),
        ((256, 64, 112, 112), True, torch.bfloat16, True),
        ((256, 256, 56, 56), True, torch.bfloat16, True),
        ((256, 64, 56, 56), True, torch.bfloat16, False),  # channels_last needs 2^27 values
        ((256, 64, 112, 112), False, torch.float64, False),  # Triton has no float64 path
    ],
)
def test_triton_takes_the_measured_winners_only(shape, channels_last, dtype, takes) -> None:
    """The rules of ``TRITON_CASES`` on the H200 benchmark's shapes."""
    backend = cb.CudaBackend()
    assert backend.supports_fusion(_meta(shape, channels_last, dtype)) is takes


def test_bounds_are_inclusive_and_both_needed() -> None:
    """``numel ≥ min_values`` and ``L ≥ min_row``, for the layout's own case."""
    backend = cb.CudaBackend({False: cb.TritonCase(100, 10), True: cb.TritonCase(1000, 10)})
    assert backend.supports_fusion(_meta((1, 10, 10)))  # exactly both bounds
    assert not backend.supports_fusion(_meta((1, 10, 9)))  # L too short
    assert not backend.supports_fusion(_meta((1, 5, 10)))  # too few values
    assert backend.supports_fusion(_meta((10, 10, 5, 2), channels_last=True))  # 1000, L = 10
    assert not backend.supports_fusion(_meta((4, 10, 5, 2), channels_last=True))  # 400 < 1000
    assert backend.supports_fusion(_meta((4, 10, 5, 2)))  # the same sizes in NCHW: 400 ≥ 100


@pytest.mark.parametrize("importable", [True, False])
def test_auto_on_cuda_is_this_backend_or_aten(monkeypatch, importable) -> None:
    """``auto`` on CUDA: the ``cuda`` backend when Triton runs here, else ATen's kernels."""
    monkeypatch.setattr(backends, "_INSTANCES", {})
    if not importable:
        monkeypatch.setitem(backends._REGISTRY, "cuda", ("batchnorm_no_such_module", "X"))
    choice = backends.resolve_backend("auto", torch.device("cuda"))
    assert choice.name == ("cuda" if importable else "aten")


@pytest.fixture
def routed(monkeypatch):
    """Installs a ``cuda`` backend with the given cases; counts the calls Triton receives."""
    calls: list[str] = []
    for method in ("forward_act", "inference_act"):
        real = getattr(TritonBackend, method)

        def spy(self, *args, _real=real, _name=method, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(TritonBackend, method, spy)

    def install(cases):
        monkeypatch.setitem(backends._INSTANCES, "cuda", cb.CudaBackend(cases))
        return calls

    return install


@pytest.mark.parametrize("cases", [None, EVERYWHERE], ids=["aten", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_both_routes_match_torch(routed, cases, channels_last) -> None:
    """Training (output, gradients, buffers) and evaluation against ``F.batch_norm``."""
    calls = routed(cases)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=gen) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen)
    dy = torch.randn(x.shape, generator=gen)
    ours_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    torch_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ours_buffers = [torch.zeros(3), torch.ones(3)]
    torch_buffers = [torch.zeros(3), torch.ones(3)]
    y = batch_norm(ours_leaves[0], *ours_buffers, *ours_leaves[1:], True, 0.1, 1e-5, backend="cuda")
    expected = F.batch_norm(torch_leaves[0], *torch_buffers, *torch_leaves[1:], True, 0.1, 1e-5)
    torch.testing.assert_close(y, expected)
    grads = torch.autograd.grad(y, ours_leaves, dy)
    for got, want in zip(grads, torch.autograd.grad(expected, torch_leaves, dy), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(ours_buffers, torch_buffers, strict=True):
        torch.testing.assert_close(got, want)
    evaluated = batch_norm(x, *ours_buffers, weight, bias, False, backend="cuda")
    torch.testing.assert_close(evaluated, F.batch_norm(x, *torch_buffers, weight, bias, False))
    fused = batch_norm(
        x, *ours_buffers, weight, bias, False, backend="cuda", activation="relu", residual=x
    )
    torch.testing.assert_close(fused, torch.relu(evaluated + x))
    # Triton saw the training call and the fused evaluation; plain evaluation stays on ATen.
    assert calls == ([] if cases is None else ["forward_act", "inference_act"])


@pytest.mark.parametrize("channels_last", [False, True])
def test_aten_backward_gives_dy_in_the_input_dtype_off_the_cpu(monkeypatch, channels_last) -> None:
    """ATen's CUDA backward refuses a float32 ``dy`` for bfloat16 ``x`` (found on an H200): off
    the CPU, the fused composition's float32 ``du`` reaches it in ``x``'s dtype."""
    from batchnorm.backends.aten_backend import AtenBackend

    seen: list[tuple[torch.dtype, torch.dtype]] = []

    def spy(dy, x, weight, *rest):
        seen.append((dy.dtype, x.dtype))
        channels = x.shape[1]
        return torch.empty_like(x), weight.new_empty(channels), weight.new_empty(channels)

    monkeypatch.setattr(torch.ops.aten, "native_batch_norm_backward", spy)
    x = torch.empty((2, 3, 4), device="meta", dtype=torch.bfloat16)  # (N, C, L)
    if channels_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels innermost: (M, C) rows
    dy = torch.empty(x.shape, device="meta", dtype=torch.float32)
    stats = torch.empty(3, device="meta")
    AtenBackend().backward(dy, x, torch.empty(3, device="meta"), stats, stats)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    seen.clear()
    cpu_x = torch.randn(2, 3, 4).bfloat16()
    AtenBackend().backward(
        torch.randn(2, 3, 4), cpu_x, torch.ones(3), torch.zeros(3), torch.ones(3)
    )
    assert seen == [(torch.float32, torch.bfloat16)]  # the CPU keeps float32 du
