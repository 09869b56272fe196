"""The ``cuda`` backend (``auto`` on CUDA): where it hands a call to Triton or to ATen, and that
both routes give ``F.batch_norm``'s results (CPU tensors, Triton in its interpreter)."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from batchnorm import backends
from batchnorm.backends import cuda_backend as cb
from batchnorm.backends.base import Saved
from batchnorm.backends.triton_backend import TritonBackend
from batchnorm.functional import batch_norm

#: Triton everywhere (every tensor passes both bounds).
EVERYWHERE = {
    (fused, inner): cb.TritonCase(0, 0) for fused in (False, True) for inner in (False, True)
}


def _meta(shape: tuple[int, ...], channels_last: bool = False, dtype=torch.float32):
    x = torch.empty(shape, device="meta", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


#: The H200 run's training forward+backward, Triton's time against eager's (×eager > 1: Triton
#: faster): (shape, channels_last) → (plain, fused with residual + ReLU), bfloat16 for
#: channels_last and float32 otherwise (benchmarks/results/nvidia-h200-2026-11-26.log).
H200_SPEEDUPS = {
    ((256, 64, 112, 112), False): (3.87, 3.45),
    ((256, 256, 56, 56), False): (1.40, 1.65),
    ((256, 64, 56, 56), False): (1.62, 1.60),
    ((256, 512, 28, 28), False): (0.74, 1.44),
    ((256, 128, 28, 28), False): (0.63, 0.54),
    ((256, 1024, 14, 14), False): (0.47, 0.64),
    ((256, 256, 14, 14), False): (0.12, 0.21),
    ((256, 2048, 7, 7), False): (0.38, 0.39),
    ((256, 512, 7, 7), False): (0.37, 0.30),
    ((32, 64, 56, 56), False): (0.21, 0.41),
    ((8192, 1024), False): (0.20, 0.27),
    ((256, 64, 112, 112), True): (1.51, 1.49),
    ((256, 256, 56, 56), True): (1.21, 1.16),
    ((256, 64, 56, 56), True): (0.49, 0.55),
    ((256, 512, 28, 28), True): (0.71, 1.18),
    ((256, 128, 28, 28), True): (0.20, 0.30),
    ((256, 1024, 14, 14), True): (0.43, 0.58),
}


@pytest.mark.parametrize(("case", "speedups"), H200_SPEEDUPS.items(), ids=str)
def test_triton_takes_exactly_the_measured_winners(case, speedups) -> None:
    """Every case of the H200 run goes where it measured faster, plain and fused."""
    shape, channels_last = case
    dtype = torch.bfloat16 if channels_last else torch.float32
    backend = cb.CudaBackend()
    for fused, speedup in zip((False, True), speedups, strict=True):
        assert backend.supports_fusion(_meta(shape, channels_last, dtype), fused) is (speedup > 1)


def test_float64_and_two_dimensional_inputs_stay_on_aten() -> None:
    """Triton has no float64 path; (N, C) inputs have rows of one value."""
    backend = cb.CudaBackend(EVERYWHERE)
    assert not backend.supports_fusion(_meta((256, 64, 112, 112), dtype=torch.float64))
    assert not backend.supports_fusion(_meta((64, 32)), fused=True)


def test_bounds_are_inclusive_and_both_needed() -> None:
    """``numel ≥ min_values`` and ``L ≥ min_row``, for the layout's own case."""
    cases = {(False, False): cb.TritonCase(100, 10), (False, True): cb.TritonCase(1000, 10)}
    backend = cb.CudaBackend(
        cases | {(True, inner): cb.TritonCase(0, 0) for inner in (False, True)}
    )
    assert backend.supports_fusion(_meta((1, 10, 10)))  # exactly both bounds
    assert not backend.supports_fusion(_meta((1, 10, 9)))  # L too short
    assert not backend.supports_fusion(_meta((1, 5, 10)))  # too few values
    assert backend.supports_fusion(_meta((10, 10, 5, 2), channels_last=True))  # 1000, L = 10
    assert not backend.supports_fusion(_meta((4, 10, 5, 2), channels_last=True))  # 400 < 1000
    assert backend.supports_fusion(_meta((4, 10, 5, 2)))  # the same sizes in NCHW: 400 ≥ 100


@pytest.mark.parametrize("importable", [True, False])
def test_auto_on_cuda_is_this_backend_or_aten(monkeypatch, importable) -> None:
    """``auto`` on CUDA: the ``cuda`` backend when Triton runs here, else ATen's kernels."""
    if not importable:
        monkeypatch.setitem(backends._REGISTRY, "cuda", ("batchnorm_no_such_module", "X"))
    with backends.fresh():
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

    with contextlib.ExitStack() as stack:

        def install(cases):
            stack.enter_context(backends.override("cuda", cb.CudaBackend(cases)))
            return calls

        yield install


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
def test_aten_backward_takes_dy_in_the_statistics_dtype(channels_last) -> None:
    """ATen's kernels refuse a float32 ``dy`` for bfloat16 ``x`` (found on an H200, and true on
    the CPU too): the fused composition's float32 ``du`` is rounded to ``x``'s dtype first."""
    from batchnorm.backends.aten_backend import AtenBackend

    x = torch.randn(2, 3, 4).bfloat16()  # (N, C, L)
    if channels_last:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels innermost: (M, C) rows
    dy = torch.randn(2, 3, 4)  # float32
    mean = x.float().mean((0, 2))
    invstd = torch.rsqrt(x.float().var((0, 2), correction=0) + 1e-5)
    got = AtenBackend().backward(dy, Saved(x, torch.ones(3), mean, invstd))
    expected = AtenBackend().backward(dy.bfloat16(), Saved(x, torch.ones(3), mean, invstd))
    for actual, want in zip(got, expected, strict=True):
        assert torch.equal(actual, want)


def test_aten_backward_without_weight_hands_aten_a_weight_of_ones(monkeypatch) -> None:
    """ATen's CUDA backward needs a defined weight to return (C,) gradients: ones go in."""
    from batchnorm.backends.aten_backend import AtenBackend

    seen = []
    real = torch.ops.aten.native_batch_norm_backward

    def spy(dy, x, weight, *rest):
        seen.append(weight)
        return real(dy, x, weight, *rest)

    monkeypatch.setattr(torch.ops.aten, "native_batch_norm_backward", spy)
    x, dy = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    mean, invstd = x.mean((0, 2)), torch.rsqrt(x.var((0, 2), correction=0) + 1e-5)
    dx, dweight, dbias = AtenBackend().backward(dy, Saved(x, None, mean, invstd))
    assert torch.equal(seen[0], torch.ones(3))
    expected = AtenBackend().backward(dy, Saved(x, torch.ones(3), mean, invstd))
    for got, want in zip((dx, dweight, dbias), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["aten", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_reduced_precision_training_on_the_aten_route(backend, dtype, affine) -> None:
    """``act(bn(x) + z)`` in training, float16/bfloat16, through ATen's kernels (the route
    ``auto`` takes on CUDA below the thresholds): outputs and gradients against float64."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 3, 5, 6, generator=gen) * 2 + 1).to(dtype)
    z, dy = (torch.randn(4, 3, 5, 6, generator=gen).to(dtype) for _ in range(2))
    weight, bias = (torch.rand(3, generator=gen) + 0.5, torch.randn(3, generator=gen))
    leaves = [t.clone().requires_grad_() for t in (x, z, weight, bias)]
    params = leaves[2:] if affine else [None, None]
    y = batch_norm(
        leaves[0], None, None, *params, True, backend=backend, activation="silu", residual=leaves[1]
    )
    wrt = leaves if affine else leaves[:2]
    grads = torch.autograd.grad(y, wrt, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, z, weight, bias)]
    params64 = leaves64[2:] if affine else [None, None]
    y64 = F.silu(F.batch_norm(leaves64[0], None, None, *params64, True) + leaves64[1])
    expected = torch.autograd.grad(y64, leaves64 if affine else leaves64[:2], dy.double())
    tolerance = 3e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(y.double(), y64, atol=tolerance, rtol=tolerance)
    for got, want in zip(grads, expected, strict=True):
        scale = float(1 + want.abs().max())
        torch.testing.assert_close(got.double(), want, atol=tolerance * scale, rtol=tolerance)


@pytest.mark.parametrize("plain_on_triton", [False, True])
def test_plain_and_fused_calls_follow_their_own_rules(routed, plain_on_triton) -> None:
    """The functional tells the backend whether a call is fused: each kind goes its own way."""
    never, always = cb.TritonCase(1 << 62, 1 << 62), cb.TritonCase(0, 0)
    calls = routed(
        {
            (fused, inner): (always if fused != plain_on_triton else never)
            for fused in (False, True)
            for inner in (False, True)
        }
    )
    x = torch.randn(4, 3, 5, 6, requires_grad=True)
    batch_norm(x, None, None, training=True, backend="cuda")
    assert calls == (["forward_act"] if plain_on_triton else [])
    calls.clear()
    batch_norm(x, None, None, training=True, backend="cuda", activation="relu", residual=x)
    assert calls == ([] if plain_on_triton else ["forward_act"])
