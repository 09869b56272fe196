"""The fast CPU backends (``aten``: ATen's native kernels; ``numba``: our Numba kernels).

Each is checked against independent computations: the float64 NumPy reference
(:mod:`batchnorm.reference`) for outputs, statistics and gradients, and ``torch.nn.BatchNorm*``
end to end through our modules (outputs, gradients, running statistics), over every dtype,
both layouts, odd shapes, ``weight``/``bias`` of ``None`` and empty batches.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from batchnorm import backends, reference
from batchnorm.backends import compute_dtype, measured, resolve_backend
from batchnorm.backends.base import Saved
from batchnorm.functional import batch_norm, batch_norm_pure
from batchnorm.kernels.cpu import cpu_stream
from batchnorm.modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from tolerances import STATS_TOLERANCES, TOLERANCES

HAS_NUMBA = importlib.util.find_spec("numba") is not None
NEEDS_NUMBA = pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
CPU_BACKENDS = ["aten", pytest.param("numba", marks=NEEDS_NUMBA)]
# Backend objects for direct calls; "numba-all" runs the kernels in every case they cover (the C
# streaming kernels for float32/bfloat16 where this machine runs them), "numba-only" Numba's.
BACKEND_VARIANTS = [
    *CPU_BACKENDS,
    pytest.param("numba-all", marks=NEEDS_NUMBA),
    pytest.param("numba-only", marks=NEEDS_NUMBA),
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


# (shape, memory format): every rank, both layouts, odd sizes (primes, 1×1 spatial, C = 1).
CASES = [
    ((7, 3), "contiguous"),
    ((2, 1), "contiguous"),
    ((5, 4, 9), "contiguous"),
    ((3, 1, 11), "contiguous"),
    ((3, 5, 7, 3), "contiguous"),
    ((3, 5, 7, 3), "channels_last"),
    ((4, 6, 1, 1), "contiguous"),
    ((4, 6, 1, 1), "channels_last"),
    ((2, 3, 3, 2, 5), "contiguous"),
    ((2, 3, 3, 2, 5), "channels_last"),
    ((5, 3, 4, 6), "noncontiguous"),
]


def _make(shape, memory_format, dtype, seed=0, offset=0.0):
    """``offset + randn(shape)`` drawn in float64, cast to ``dtype``, in ``memory_format``."""
    gen = torch.Generator().manual_seed(seed)
    if memory_format == "noncontiguous":  # every other element of a longer last axis
        big = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
        return (offset + big).to(dtype)[..., ::2]
    x = (offset + torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
    if memory_format == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _backend(name):
    """The backend object for a name of :data:`BACKEND_VARIANTS`."""
    if name in ("numba-all", "numba-only"):
        from batchnorm.backends.cpu_backend import CpuBackend
        from batchnorm.backends.measured import ALL_KERNEL_CASES

        return CpuBackend(ALL_KERNEL_CASES, streaming=False if name == "numba-only" else None)
    return resolve_backend(name, torch.device("cpu"))


def _channel_view(x):
    """``(N, C, *)`` → ``(N, C, L)``, the view backends receive."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _close(actual, expected, tolerances, dtype, what):
    """Compares ``actual`` (any dtype) with a float64 ``expected`` at ``dtype``'s tolerance."""
    atol, rtol = tolerances[dtype]
    torch.testing.assert_close(
        actual.to(torch.float64), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def _reference(x, weight, bias, dy):
    """Float64 reference forward and backward from :mod:`batchnorm.reference`."""
    channels = x.shape[1]
    w = np.ones(channels) if weight is None else weight.double().numpy()
    b = np.zeros(channels) if bias is None else bias.double().numpy()
    y, cache = reference.forward(x.double().numpy(), w, b, EPS)
    dx, dw, db = reference.backward(dy.double().numpy(), cache)
    as_torch = torch.from_numpy
    return as_torch(y), cache, as_torch(dx), as_torch(dw), as_torch(db)


@pytest.mark.parametrize("backend_name", BACKEND_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "memory_format"), CASES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_backend_matches_reference(backend_name, dtype, shape, memory_format, affine) -> None:
    """Forward (y, mean, invstd, var) and backward (dx, dγ, dβ) against the float64 reference."""
    backend = _backend(backend_name)
    x = _make(shape, memory_format, dtype, offset=0.5)
    dy = _make(shape, memory_format, dtype, seed=3)
    channels = shape[1]
    weight = torch.rand(channels, dtype=compute_dtype(dtype)) + 0.5 if affine else None
    bias = torch.randn(channels, dtype=compute_dtype(dtype)) if affine else None
    y_ref, cache, dx_ref, dw_ref, db_ref = _reference(x, weight, bias, dy)
    x3, dy3 = _channel_view(x), _channel_view(dy)

    y, mean, invstd, var = backend.forward(x3, weight, bias, EPS)
    dx, dweight, dbias = backend.backward(dy3, Saved(x3, weight, mean, invstd))

    stats_dtype = compute_dtype(dtype)
    assert (y.dtype, dx.dtype) == (dtype, dtype)
    assert {t.dtype for t in (mean, invstd, var, dweight, dbias)} == {stats_dtype}
    assert y.shape == dx.shape == x3.shape
    _close(y.reshape(shape), y_ref, TOLERANCES, dtype, "y")
    _close(mean, torch.from_numpy(cache.mean), STATS_TOLERANCES, stats_dtype, "mean")
    _close(var, torch.from_numpy(cache.var), STATS_TOLERANCES, stats_dtype, "var")
    _close(invstd, torch.from_numpy(cache.invstd), STATS_TOLERANCES, stats_dtype, "invstd")
    _close(dx.reshape(shape), dx_ref, TOLERANCES, dtype, "dx")
    # dγ, dβ sum M products of low-precision values: compare relative to their scale.
    scale = float(np.sqrt(x.numel() / channels))
    low = {stats_dtype: (STATS_TOLERANCES[stats_dtype][0] * scale, 1e-4)}
    _close(dweight, dw_ref, low if dtype != torch.float64 else STATS_TOLERANCES, stats_dtype, "dγ")
    _close(dbias, db_ref, low if dtype != torch.float64 else STATS_TOLERANCES, stats_dtype, "dβ")


@pytest.mark.parametrize("backend_name", BACKEND_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "memory_format"), CASES)
def test_inference_matches_formula(backend_name, dtype, shape, memory_format) -> None:
    """Evaluation forward: (x − μ)·γ/sqrt(var + ε) + β in float64 on the same values."""
    backend = _backend(backend_name)
    channels = shape[1]
    x = _make(shape, memory_format, dtype, offset=3.0)
    gen = torch.Generator().manual_seed(5)
    mean = 3.0 + torch.randn(channels, generator=gen)
    var = 0.5 + torch.rand(channels, generator=gen)
    weight, bias = torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)
    y = backend.inference(_channel_view(x), weight, bias, mean, var, EPS)
    per_channel = [1, channels] + [1] * (len(shape) - 2)
    expected = (x.double() - mean.double().view(per_channel)) / torch.sqrt(
        var.double().view(per_channel) + EPS
    ) * weight.double().view(per_channel) + bias.double().view(per_channel)
    assert y.dtype == dtype
    _close(y.reshape(shape), expected, TOLERANCES, dtype, "y")
    y_plain = backend.inference(_channel_view(x), None, None, mean, var, EPS)
    plain = (x.double() - mean.double().view(per_channel)) / torch.sqrt(
        var.double().view(per_channel) + EPS
    )
    _close(y_plain.reshape(shape), plain, TOLERANCES, dtype, "y without γ, β")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_gradients_in_evaluation_mode(backend_name, memory_format) -> None:
    """Eval mode stays differentiable (frozen statistics): gradients as torch.nn's in float64."""
    ours = BatchNorm2d(4, backend=backend_name).double().eval()
    theirs = torch.nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():
        for module in (ours, theirs):
            module.running_mean.copy_(torch.linspace(-1.0, 1.0, 4))
            module.running_var.copy_(torch.linspace(0.5, 2.0, 4))
            module.weight.copy_(torch.linspace(0.5, 1.5, 4))
    x = _make((3, 4, 5, 5), memory_format, torch.float64)
    dy = _make((3, 4, 5, 5), memory_format, torch.float64, seed=2)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x_ours).backward(dy)
    theirs(x_theirs).backward(dy)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize(
    ("module_class", "shape", "memory_format"),
    [
        (BatchNorm1d, (16, 5), "contiguous"),
        (BatchNorm1d, (6, 5, 7), "contiguous"),
        (BatchNorm2d, (4, 5, 6, 7), "contiguous"),
        (BatchNorm2d, (4, 5, 6, 7), "channels_last"),
        (BatchNorm3d, (2, 5, 3, 4, 3), "channels_last"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_matches_torch_nn(backend_name, module_class, shape, memory_format, dtype) -> None:
    """Two training steps and one eval step against torch.nn in float64 on the same values.

    Outputs, gradients (of x, γ, β) and buffers agree within the tolerance of our dtype
    (torch.nn in bfloat16 keeps its own statistics in bfloat16, so float64 is the yardstick).
    """
    torch_class = getattr(torch.nn, module_class.__name__)
    ours = module_class(shape[1], momentum=None, backend=backend_name).to(dtype)
    theirs = torch_class(shape[1], momentum=None).to(torch.float64)
    with torch.no_grad():
        for module in (ours, theirs):
            module.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            module.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    atol, rtol = TOLERANCES[dtype]

    def check(actual, expected):
        torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol)

    for step in range(2):
        x = _make(shape, memory_format, dtype, seed=step, offset=2.0)
        dy = _make(shape, memory_format, dtype, seed=10 + step)
        x_ours, x_theirs = x.clone().requires_grad_(), x.double().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        y_ours.backward(dy)
        y_theirs.backward(dy.double())
        check(y_ours, y_theirs)
        check(x_ours.grad, x_theirs.grad)
        assert y_ours.stride() == x.stride()
    for name in ("weight", "bias"):
        check(getattr(ours, name).grad, getattr(theirs, name).grad)
    for name in ("running_mean", "running_var"):
        check(getattr(ours, name), getattr(theirs, name))
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 2
    ours.eval()
    theirs.eval()
    x = _make(shape, memory_format, dtype, seed=7)
    check(ours(x), theirs(x.double()))


@pytest.mark.parametrize("backend_name", BACKEND_VARIANTS)
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_large_offset_keeps_variance_precision(backend_name, memory_format) -> None:
    """x = 1e4 + randn in float32: the batch variance within 1e-3 relative of float64's."""
    x = _make((16, 4, 8, 8), memory_format, torch.float32, offset=1e4)
    result = _backend(backend_name).forward(_channel_view(x), None, None, EPS)
    var64 = x.double().var(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(result.var.double(), var64, rtol=1e-3, atol=0.0)
    running_var = torch.ones(4)
    name = backend_name.split("-")[0]  # the registered backend of a variant
    batch_norm(x, torch.zeros(4), running_var, training=True, momentum=1.0, backend=name)
    torch.testing.assert_close(
        running_var.double(), x.double().var(dim=(0, 2, 3)), rtol=1e-3, atol=0
    )


@pytest.mark.parametrize("backend_name", BACKEND_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 3, 4), (4, 3, 0), (0, 3)])
def test_empty_batch(backend_name, dtype, shape) -> None:
    """An empty batch: empty output, zero gradients, running statistics left as they are."""
    backend = _backend(backend_name)
    x3 = torch.zeros(shape[0], 3, 4 if len(shape) == 3 else 1, dtype=dtype)[..., : shape[-1]]
    result = backend.forward(x3, None, None, EPS)  # (N, C, L) with N·L = 0
    dx, dweight, dbias = backend.backward(x3, Saved(x3, None, result.mean, result.invstd))
    assert result.y.shape == dx.shape == x3.shape
    assert torch.equal(dweight, torch.zeros(3, dtype=compute_dtype(dtype)))
    assert torch.equal(dbias, torch.zeros(3, dtype=compute_dtype(dtype)))
    ones = torch.ones(3)
    assert backend.inference(x3, None, None, ones, ones, EPS).shape == x3.shape
    x = torch.zeros(shape, dtype=dtype, requires_grad=True)
    running_mean, running_var = torch.full((3,), 0.25), torch.full((3,), 2.0)
    name = backend_name.split("-")[0]  # the registered backend of a variant
    y = batch_norm(x, running_mean, running_var, training=True, backend=name)
    assert (y.shape, y.dtype) == (x.shape, dtype)
    y.sum().backward()
    assert x.grad is not None
    assert x.grad.shape == x.shape
    assert torch.equal(running_mean, torch.full((3,), 0.25))
    assert torch.equal(running_var, torch.full((3,), 2.0))


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_bad_input_leaves_buffers_unchanged(backend_name) -> None:
    """A rejected call (wrong channel count, one value per channel) changes no buffer."""
    module = BatchNorm2d(3, backend=backend_name)
    module(torch.randn(4, 3, 5, 5))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="channels"):
        module(torch.randn(4, 2, 5, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 3, 1, 1))
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
def test_numba_under_func_transforms_matches_autograd() -> None:
    """Under torch.func.grad the numba backend hands over to pure torch: same gradients."""
    x = _make((6, 3, 5), "contiguous", torch.float64)
    weight = torch.rand(3, dtype=torch.float64) + 0.5
    dy = _make((6, 3, 5), "contiguous", torch.float64, seed=4)

    def loss(xx, ww):
        out = batch_norm_pure(xx, None, None, ww, None, True, 0.1, EPS, backend="numba").output
        return (out * dy).sum()

    dx, dweight = torch.func.grad(loss, argnums=(0, 1))(x, weight)
    _, _, dx_ref, dw_ref, _ = _reference(x, weight, None, dy)
    torch.testing.assert_close(dx, dx_ref)
    torch.testing.assert_close(dweight, dw_ref)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def eval_loss(xx):
        out = batch_norm_pure(xx, mean, var, weight, None, False, 0.1, EPS, backend="numba").output
        return (out * dy).sum()

    expected = dy * (weight / torch.sqrt(var + EPS))[None, :, None]  # d/dx of the affine map
    torch.testing.assert_close(torch.func.grad(eval_loss)(x), expected)


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
def test_numba_uses_torch_thread_count() -> None:
    """The kernels run on torch.get_num_threads() threads (capped by Numba's pool and the work)."""
    import numba

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # Enough work for any number of threads; float64: Numba's kernels (not the streaming ones).
        big = torch.randn(8, 4, 32768, dtype=torch.float64)
        batch_norm(big, None, None, training=True, backend="numba")
        assert numba.get_num_threads() == 1
        assert torch.get_num_threads() == 1  # starting Numba's OpenMP pool does not reset it
        torch.set_num_threads(2)
        batch_norm(big, None, None, training=True, backend="numba")
        assert numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
        # Below the default cases' sizes (the kernels run it only here); float64: Numba's kernels.
        tiny = torch.randn(4, 3, 5, dtype=torch.float64)
        cpu_backend = importlib.import_module("batchnorm.backends.cpu_backend")
        all_cases = cpu_backend.CpuBackend(measured.ALL_KERNEL_CASES)
        all_cases.forward(tiny, None, None, EPS)
        assert numba.get_num_threads() == 1  # a tiny tensor stays on the calling thread
    finally:
        torch.set_num_threads(threads)


def test_auto_picks_fast_cpu_backend(monkeypatch) -> None:
    """auto: the cpu backend when its C kernels or Numba run here, else aten."""
    monkeypatch.delenv(backends.BACKEND_ENV_VAR, raising=False)
    expected = "cpu" if HAS_NUMBA or cpu_stream.SUPPORTED else "aten"
    assert resolve_backend("auto", torch.device("cpu")).name == expected
    monkeypatch.setitem(backends._REGISTRY, "cpu", ("batchnorm.no_such_module", "Missing"))
    with backends.fresh():
        assert resolve_backend("auto", torch.device("cpu")).name == "aten"
