"""The streaming-store CPU kernels (``batchnorm.kernels.cpu_stream``, C with AVX-512).

Each is called directly on tensors' memory and checked against float64 formulas: every layout
walk (runs shorter than a vector, runs that straddle vectors, channels innermost with fewer or
more channels than a vector and with a wrap), misaligned input and output addresses, odd lengths
(scalar head and tail), threads, bfloat16 rounding against torch's own, and non-finite values.
Skipped where the extension is not built or the CPU lacks AVX-512 F/BW/VL.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm.kernels import cpu_stream

pytestmark = pytest.mark.skipif(not cpu_stream.SUPPORTED, reason="streaming kernels not built")

DTYPES = [torch.float32, torch.bfloat16]
# (N, C, L) with run = L, or (M, C) with run = 0 (channels innermost).
LAYOUTS = [
    ((3, 5, 1), "ncl"),
    ((2, 3, 7), "ncl"),
    ((4, 2, 16), "ncl"),
    ((3, 4, 17), "ncl"),
    ((2, 3, 100), "ncl"),
    ((2, 2, 196), "ncl"),
    ((37, 1), "rows"),
    ((29, 3), "rows"),
    ((11, 16), "rows"),
    ((9, 17), "rows"),
    ((7, 40), "rows"),
]
# Element offsets of the input and output from a 64-byte-aligned allocation.
OFFSETS = [(0, 0), (1, 0), (0, 3), (5, 7)]


def _tolerance(dtype):
    """Bounds against a float64 formula: float32 arithmetic, then one rounding to ``dtype``."""
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 2**-8}


def _at_offset(values: torch.Tensor, offset: int) -> torch.Tensor:
    """``values`` copied into memory that starts ``offset`` elements past an aligned address."""
    storage = torch.empty(values.numel() + offset + 64, dtype=values.dtype)
    out = storage[offset : offset + values.numel()].view(values.shape)
    out.copy_(values)
    return out


def _run(shape, layout):
    return 0 if layout == "rows" else shape[2]


def _channel_index(shape, layout):
    """The channel of each flat value, as an int64 tensor of ``shape``."""
    channels = shape[1]
    index = torch.arange(int(np.prod(shape)))
    if layout == "rows":
        return (index % channels).view(shape)
    return ((index // shape[2]) % channels).view(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), LAYOUTS)
@pytest.mark.parametrize(("x_offset", "y_offset"), OFFSETS)
def test_affine_matches_float64(dtype, shape, layout, x_offset, y_offset) -> None:
    gen = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = _at_offset((torch.randn(shape, generator=gen) * 3 + 1).to(dtype), x_offset)
    y = _at_offset(torch.full(shape, float("nan")).to(dtype), y_offset)
    params = torch.randn(3, channels, generator=gen).numpy()  # float32 (3, C)
    cpu_stream.affine(
        x.data_ptr(), y.data_ptr(), x.numel(), _run(shape, layout), channels,
        dtype == torch.bfloat16, params, 1,
    )  # fmt: skip
    shift, scale, offset = (
        torch.from_numpy(p).double()[_channel_index(shape, layout)] for p in params
    )
    expected = (x.double() - shift) * scale + offset
    torch.testing.assert_close(y.double(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), LAYOUTS)
@pytest.mark.parametrize(("x_offset", "y_offset"), OFFSETS)
def test_grad_matches_float64(dtype, shape, layout, x_offset, y_offset) -> None:
    gen = torch.Generator().manual_seed(1)
    channels = shape[1]
    x = _at_offset(torch.randn(shape, generator=gen).to(dtype), x_offset)
    dy = _at_offset(torch.randn(shape, generator=gen).to(dtype), x_offset)
    dx = _at_offset(torch.full(shape, float("nan")).to(dtype), y_offset)
    params = torch.randn(4, channels, generator=gen).numpy()  # μ, γ·r, dβ/M, r·dγ/M
    cpu_stream.grad(
        dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), _run(shape, layout), channels,
        dtype == torch.bfloat16, params, 1,
    )  # fmt: skip
    index = _channel_index(shape, layout)
    mean, gain, mean_term, slope = (torch.from_numpy(p).double()[index] for p in params)
    expected = gain * ((dy.double() - mean_term) - (x.double() - mean) * slope)
    torch.testing.assert_close(dx.double(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 1), (4, 3, 7), (5, 2, 33), (2, 3, 300), (70, 4, 250)])
@pytest.mark.parametrize("threads", [1, 2])
def test_moments_ncl_matches_float64(dtype, shape, threads) -> None:
    """Mean and M2 per channel of each sample range, merged: the float64 two-pass values."""
    from batchnorm.kernels.cpu_numba import merge_moments

    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1000).to(dtype)
    part_mean, part_m2, samples = cpu_stream.moments_ncl(
        x.data_ptr(), shape, dtype == torch.bfloat16, threads
    )
    n_batch, channels, length = shape
    assert part_mean.shape == part_m2.shape
    assert part_mean.shape[1] == channels
    assert (part_mean.shape[0] > 1) == (threads > 1 and x.numel() >= 2 * cpu_stream.GRAIN)
    mean, var = np.empty(channels), np.empty(channels)
    merge_moments(part_mean, part_m2, samples * length, n_batch * length, mean, var)
    x64 = x.double()
    torch.testing.assert_close(torch.from_numpy(mean), x64.mean((0, 2)), atol=0, rtol=1e-7)
    expected_var = x64.var((0, 2), unbiased=False)
    torch.testing.assert_close(torch.from_numpy(var), expected_var, atol=0, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 1), (4, 3, 7), (5, 2, 33), (70, 4, 250)])
@pytest.mark.parametrize("threads", [1, 2])
def test_grad_sums_ncl_matches_float64(dtype, shape, threads) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    mean = torch.randn(shape[1], generator=gen).numpy()  # float32 (C,)
    sum_dy, sum_dy_xmu = cpu_stream.grad_sums_ncl(
        dy.data_ptr(), x.data_ptr(), shape, dtype == torch.bfloat16, mean, threads
    )
    dy64, centered = dy.double(), x.double() - torch.from_numpy(mean).double()[None, :, None]
    # Float32 partial sums: errors bounded by a few ulps of the sums of absolute values.
    bound_dy = 1e-6 * dy64.abs().sum((0, 2))
    bound_dy_xmu = 1e-6 * (dy64 * centered).abs().sum((0, 2))
    assert torch.all((torch.from_numpy(sum_dy) - dy64.sum((0, 2))).abs() <= bound_dy)
    error = (torch.from_numpy(sum_dy_xmu) - (dy64 * centered).sum((0, 2))).abs()
    assert torch.all(error <= bound_dy_xmu)


def test_grad_sums_ncl_checks_mean() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="mean"):
        cpu_stream.grad_sums_ncl(x.data_ptr(), x.data_ptr(), (2, 3, 4), False, np.zeros(3), 1)


def test_params_are_checked() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="params"):
        cpu_stream.affine(x.data_ptr(), x.data_ptr(), 24, 4, 3, False, np.zeros((3, 3)), 1)
    with pytest.raises(ValueError, match="params"):
        cpu_stream.grad(
            x.data_ptr(),
            x.data_ptr(),
            x.data_ptr(),
            24,
            4,
            3,
            False,
            np.zeros((3, 3), np.float32),
            1,
        )


@pytest.mark.parametrize("layout", ["ncl", "rows"])
def test_threads_split_the_pass_exactly(layout) -> None:
    """Several threads write the same bits as one (each value is computed alike)."""
    shape = (8, 5, 4099) if layout == "ncl" else (8 * 4099, 5)
    x = torch.randn(shape)
    params = torch.randn(3, 5).numpy()
    outputs = []
    for threads in (1, 3):
        y = torch.empty_like(x)
        cpu_stream.affine(
            x.data_ptr(), y.data_ptr(), x.numel(), _run(shape, layout), 5, False, params, threads
        )
        outputs.append(y)
    assert len(cpu_stream._ranges(x.numel(), 3)) == 3
    assert torch.equal(outputs[0], outputs[1])


def test_bfloat16_rounds_like_torch() -> None:
    """Round to nearest even on store, bit for bit as torch's float32 → bfloat16 conversion."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 1000, generator=gen).bfloat16()
    scale = 1.0 + 2.0**-9  # x·scale lands on or near bfloat16 ties
    params = np.array([[0.0] * 3, [scale] * 3, [0.0] * 3], dtype=np.float32)
    y = torch.empty_like(x)
    cpu_stream.affine(x.data_ptr(), y.data_ptr(), x.numel(), 1000, 3, True, params, 1)
    expected = (x.float() * scale).bfloat16()
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_values_propagate(dtype) -> None:
    x = torch.randn(2, 3, 40).to(dtype)
    x[0, 1, 5], x[1, 2, 30], x[1, 0, 17] = float("nan"), float("inf"), float("-inf")
    params = np.array([[0.0] * 3, [1.0] * 3, [0.0] * 3], dtype=np.float32)
    y = torch.empty_like(x)
    cpu_stream.affine(
        x.data_ptr(), y.data_ptr(), x.numel(), 40, 3, dtype == torch.bfloat16, params, 1
    )
    assert torch.equal(y.isnan(), x.isnan())
    assert torch.equal(y.isinf(), x.isinf())
    assert torch.equal(y[y.isfinite()], x[x.isfinite()])
    if dtype == torch.bfloat16:
        assert y.view(torch.int16)[0, 1, 5].item() == 0x7FC0  # the quiet NaN, as Numba stores it


def test_numba_backend_refuses_streaming_without_support(monkeypatch) -> None:
    pytest.importorskip("numba")
    from batchnorm.backends import numba_backend

    monkeypatch.setattr(numba_backend.cpu_stream, "SUPPORTED", False)
    with pytest.raises(ValueError, match="streaming"):
        numba_backend.NumbaBackend(streaming=True)
    assert numba_backend.NumbaBackend().streaming is False
    assert numba_backend.NumbaBackend().kernel_cases is numba_backend.MEASURED_NUMBA_CASES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("buffers", [torch.float32, torch.float64], ids=str)
def test_backend_paths_agree_across_threads(dtype, memory_format, buffers) -> None:
    """One C call per pass (one thread) and the multi-threaded passes (statistics by parts,
    merged; float64 buffers moved in NumPy) give torch's outputs, gradients and buffers."""
    pytest.importorskip("numba")
    from batchnorm.backends import numba_backend
    from batchnorm.functional import batch_norm

    backend = numba_backend.NumbaBackend(numba_backend.ALL_KERNEL_CASES)
    assert backend.streaming
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 5, 61, 47, generator=gen) * 2 + 3).to(dtype)  # > 2 grains of values
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=gen).to(dtype)
    weight, bias = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert cpu_stream.single_call(x.numel(), count) == (count == 1)
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            mean, var = torch.zeros(5, dtype=buffers), torch.ones(5, dtype=buffers)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr("batchnorm.backends._INSTANCES", {"numba": backend})
                y = batch_norm(
                    *leaves[:1], mean, var, *leaves[1:], True, 0.1, 1e-5, backend="numba"
                )
                grads = torch.autograd.grad(y, leaves, dy)
                with torch.no_grad():
                    y_eval = batch_norm(
                        x, mean, var, weight, bias, False, 0.1, 1e-5, backend="numba"
                    )
            results.append((y, *grads, mean, var, y_eval))
    finally:
        torch.set_num_threads(threads)
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    mean, var = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    y = torch.nn.functional.batch_norm(leaves[0], mean, var, *leaves[1:], True, 0.1, 1e-5)
    grads = torch.autograd.grad(y, leaves, dy.double())
    y_eval = torch.nn.functional.batch_norm(x.double(), mean, var, weight.double(), bias.double())
    expected = (y, *grads, mean, var, y_eval)
    tolerance = (
        {"atol": 2e-5, "rtol": 2e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    )
    names = ("y", "dx", "dweight", "dbias", "running_mean", "running_var", "y (eval)")
    for result in results:
        for name, value, reference in zip(names, result, expected, strict=True):
            torch.testing.assert_close(
                value.double(), reference.detach(), **tolerance, msg=lambda m, n=name: f"{n}: {m}"
            )


def _kernels_everywhere(monkeypatch):
    """Installs ``NumbaBackend(ALL_KERNEL_CASES)`` as the ``numba`` backend; returns it."""
    pytest.importorskip("numba")
    from batchnorm.backends import numba_backend

    backend = numba_backend.NumbaBackend(numba_backend.ALL_KERNEL_CASES)
    monkeypatch.setattr("batchnorm.backends._INSTANCES", {"numba": backend})
    return backend


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Runs a test on one thread (one C call per pass) and on two (the parts)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def test_strided_running_buffers_move_like_torchs(monkeypatch, threads) -> None:
    """Buffers that are views with a stride (every other element of a longer tensor) move as
    torch moves them, and the elements between them are left alone."""
    from batchnorm.functional import batch_norm

    _kernels_everywhere(monkeypatch)
    x = torch.randn(32, 6, 8, 8) * 2 + 1
    storage_mean, storage_var = torch.zeros(12), torch.ones(12)
    expected_mean, expected_var = torch.zeros(6), torch.ones(6)
    batch_norm(x, storage_mean[::2], storage_var[::2], None, None, True, 0.3, 1e-5, backend="numba")
    torch.nn.functional.batch_norm(x, expected_mean, expected_var, None, None, True, 0.3, 1e-5)
    torch.testing.assert_close(storage_mean[::2], expected_mean)
    torch.testing.assert_close(storage_var[::2], expected_var)
    assert torch.equal(storage_mean[1::2], torch.zeros(6))
    assert torch.equal(storage_var[1::2], torch.ones(6))


def test_float64_default_dtype_keeps_float32_statistics(monkeypatch, threads) -> None:
    """``torch.set_default_dtype(torch.float64)`` changes nothing: the kernels' float32
    statistics and gradients stay float32 and correct."""
    from batchnorm.functional import batch_norm

    _kernels_everywhere(monkeypatch)
    x = (torch.randn(16, 8, 9, 9) * 2 + 1).requires_grad_()
    weight = torch.rand(8).add_(0.5).requires_grad_()
    bias = torch.randn(8).requires_grad_()
    dy = torch.randn(x.shape)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        y = batch_norm(
            x, torch.zeros(8), torch.ones(8), weight, bias, True, 0.1, 1e-5, backend="numba"
        )
        grads = torch.autograd.grad(y, (x, weight, bias), dy)
    finally:
        torch.set_default_dtype(saved)
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y64 = torch.nn.functional.batch_norm(leaves[0], None, None, *leaves[1:], True, 0.1, 1e-5)
    expected = torch.autograd.grad(y64, leaves, dy.double())
    torch.testing.assert_close(y.double(), y64.detach(), atol=1e-5, rtol=1e-5)
    for grad, reference in zip(grads, expected, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad.double(), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["ncl", "rows"])
def test_large_offsets_keep_the_variance_precise(monkeypatch, threads, layout) -> None:
    """|μ|/σ = 1e5 in float32: the running variance within 1e-5 of float64's (the float32 sums
    about a rounded mean are corrected by Σ (x − mean), Chan, Golub & LeVeque's two-pass)."""
    from batchnorm.functional import batch_norm

    _kernels_everywhere(monkeypatch)
    x = (torch.randn(2, 5, 128, 128, dtype=torch.float64) * 100 + 1e7).float()
    if layout == "rows":
        x = x.contiguous(memory_format=torch.channels_last)
    running_var = torch.ones(5)
    batch_norm(x, torch.zeros(5), running_var, None, None, True, 1.0, 1e-5, backend="numba")
    expected = x.double().var((0, 2, 3))
    torch.testing.assert_close(running_var.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["ncl", "rows"])
def test_an_infinity_gives_an_infinite_running_mean(monkeypatch, threads, layout) -> None:
    """As torch: +inf in a channel makes its running mean +inf (not NaN), its variance NaN."""
    from batchnorm.functional import batch_norm

    _kernels_everywhere(monkeypatch)
    x = torch.randn(32, 4, 16, 16)
    x[3, 1, 2, 5] = float("inf")
    if layout == "rows":
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = torch.zeros(4), torch.ones(4)
    expected_mean, expected_var = torch.zeros(4), torch.ones(4)
    batch_norm(x, mean, var, None, None, True, 0.1, 1e-5, backend="numba")
    torch.nn.functional.batch_norm(x, expected_mean, expected_var, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(mean, expected_mean, equal_nan=True)
    assert mean[1].item() == float("inf")
    assert torch.equal(var.isnan(), expected_var.isnan())


def test_torch_func_over_parameters_with_a_plain_input() -> None:
    """``grad`` with respect to the weight (input not transformed) and ``vmap`` over weights
    in evaluation: kernel-sized inputs give autograd's and the loop's results."""
    from batchnorm.functional import batch_norm_pure

    x = torch.randn(32, 64, 8, 8)  # 512 KiB: the kernels' sizes
    weight = torch.rand(64) + 0.5

    def loss(w):
        return (batch_norm_pure(x, None, None, w, None, True, 0.1, 1e-5).output ** 3).sum()

    leaf = weight.clone().requires_grad_()
    (expected,) = torch.autograd.grad(
        (torch.nn.functional.batch_norm(x, None, None, leaf, None, True) ** 3).sum(), leaf
    )
    torch.testing.assert_close(torch.func.grad(loss)(weight), expected, atol=1e-3, rtol=1e-4)
    big = torch.randn(64, 64, 8, 8)  # 1 MiB
    mean, var = torch.randn(64), torch.rand(64) + 0.5
    weights = torch.rand(3, 64) + 0.5

    def evaluate(w):
        return batch_norm_pure(big, mean, var, w, None, False, 0.1, 1e-5).output

    batched = torch.func.vmap(evaluate)(weights)
    looped = torch.stack([torch.nn.functional.batch_norm(big, mean, var, w) for w in weights])
    torch.testing.assert_close(batched, looped)


def _run_in_forked_child() -> None:
    """Our threaded passes in a forked child. Only they run on two threads here: torch's and
    Numba's own OpenMP pools are not fork-safe once the parent has used them (a libgomp
    limitation, not ours), so the input comes from NumPy and the check runs in NumPy."""
    from batchnorm.functional import batch_norm

    torch.set_num_threads(2)
    values = np.random.default_rng(0).standard_normal((8, 64, 32, 32)).astype(np.float32)
    y = batch_norm(torch.from_numpy(values), None, None, None, None, True, 0.1, 1e-5)
    assert abs(float(y.numpy().mean())) < 1e-4


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_a_forked_child_runs_the_threaded_passes(threads) -> None:
    """After the parent has started the pool, a forked child's passes still finish."""
    import multiprocessing

    from batchnorm.functional import batch_norm

    torch.set_num_threads(2)
    batch_norm(torch.randn(8, 64, 32, 32), None, None, None, None, True, 0.1, 1e-5)
    child = multiprocessing.get_context("fork").Process(target=_run_in_forked_child)
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung")
    assert child.exitcode == 0


def test_threaded_passes_wait_for_their_workers_when_interrupted(monkeypatch) -> None:
    """An interrupt while the calling thread waits: the workers, which write into the caller's
    tensors, finish before the interrupt propagates."""
    import threading
    import time
    from concurrent.futures import wait as real_wait

    finished = threading.Event()
    interrupts = iter([KeyboardInterrupt()])

    def interrupted_once(futures):
        error = next(interrupts, None)
        if error is not None:
            raise error
        return real_wait(futures)

    def work(seconds):
        time.sleep(seconds)
        if seconds:
            finished.set()

    monkeypatch.setattr(cpu_stream, "wait", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        cpu_stream._run_all(work, [(0,), (0.2,)])
    assert finished.is_set()
