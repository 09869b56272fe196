"""The streaming CPU kernels (``batchnorm.kernels.cpu.cpu_stream``: C, AVX-512 or AVX2), their use.

Each is called directly on tensors' memory and checked against float64 formulas: every layout
walk (runs shorter than a vector, runs that straddle vectors, channels innermost with fewer or
more channels than a vector and with a wrap), misaligned input and output addresses, odd lengths
(scalar head and tail), teams of threads (more threads than rows too), bfloat16 rounding against
torch's own, and non-finite values.
Every test runs once per instruction set this CPU has (``cpu_stream.ISAS``: the same C compiled
for AVX-512 and for AVX2 + FMA). Skipped where the extension is not built or the CPU has neither.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from pathlib import Path

import pytest
import torch

from batchnorm import backends
from batchnorm.backends import measured
from batchnorm.kernels.cpu import cpu_stream

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
    ((3, 9, 70), "ncl"),  # groups of four runs and one left over, masked tails
    ((2, 5, 20000), "ncl"),  # runs longer than one float32 chunk of sums
    ((1, 3, 5000), "ncl"),  # one sample: output shares of values, not of rows
    ((37, 1), "rows"),
    ((29, 3), "rows"),
    ((11, 16), "rows"),
    ((9, 17), "rows"),
    ((7, 40), "rows"),
    ((3000, 5), "rows"),  # several blocks of rows, merged
]
# Element offsets of the input and output from a 64-byte-aligned allocation.
OFFSETS = [(0, 0), (1, 0), (0, 3), (5, 7)]
# Teams: the calling thread alone, and three threads (more than some layouts' rows).
THREADS = [1, 3]


@pytest.fixture(autouse=True, params=cpu_stream.ISAS or ("none",))
def isa(request):
    """Each test once per instruction set of this CPU; the widest again afterwards."""
    cpu_stream.use_isa(request.param)
    yield request.param
    cpu_stream.use_isa(cpu_stream.ISAS[0])


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs /proc/cpuinfo (Linux)")
def test_isas_are_what_the_cpu_reports(isa) -> None:
    """ISAS, widest first, agrees with the kernel's flags; the default is the widest."""
    flags = _cpu_flags()
    expected = []
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        expected.append("avx512")
    if {"avx2", "fma"} <= flags:
        expected.append("avx2")
    assert tuple(expected) == cpu_stream.ISAS
    assert cpu_stream.isa() == isa


def test_use_isa_refuses_an_isa_this_cpu_lacks() -> None:
    """An unknown or absent instruction set is refused by name, and the current one stays."""
    before = cpu_stream.isa()
    for name in ("sse2", *(n for n in ("avx512", "avx2") if n not in cpu_stream.ISAS)):
        with pytest.raises(ValueError, match=rf"name: expected one of .*got '{name}'"):
            cpu_stream.use_isa(name)
    assert cpu_stream.isa() == before


def _tolerance(dtype):
    """Bounds against a float64 formula: float32 arithmetic, then one rounding to ``dtype``."""
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 2**-8}


def _at_offset(values: torch.Tensor, offset: int) -> torch.Tensor:
    """``values`` copied into memory that starts ``offset`` elements past an aligned address."""
    storage = torch.empty(values.numel() + offset + 64, dtype=values.dtype)
    out = storage[offset : offset + values.numel()].view(values.shape)
    out.copy_(values)
    return out


def _rows_and_run(shape, layout):
    """The C calls' ``(rows, run)``: ``(N, L)`` for ``(N, C, L)``, ``(M, 0)`` for ``(M, C)``."""
    return (shape[0], 0) if layout == "rows" else (shape[0], shape[2])


def _by_channel(values: torch.Tensor, shape, layout) -> torch.Tensor:
    """Per-channel ``values`` ``(C,)`` broadcast against an array of ``shape`` (float64)."""
    values = values.double()
    return values[None, :] if layout == "rows" else values[None, :, None]


def _reduce(values: torch.Tensor, layout) -> torch.Tensor:
    """Per-channel sums of an ``(N, C, L)`` or ``(M, C)`` array."""
    return values.sum(0) if layout == "rows" else values.sum((0, 2))


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), LAYOUTS)
@pytest.mark.parametrize(("x_offset", "y_offset"), OFFSETS)
@pytest.mark.parametrize("threads", THREADS)
def test_inference_matches_float64(dtype, shape, layout, x_offset, y_offset, threads) -> None:
    """y = (x − μ)·γ/sqrt(var + ε) + β through every walk of the output pass."""
    gen = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = _at_offset((torch.randn(shape, generator=gen) * 3 + 1).to(dtype), x_offset)
    y = _at_offset(torch.full(shape, float("nan")).to(dtype), y_offset)
    weight, bias, mean = torch.randn(3, channels, generator=gen)
    var = torch.rand(channels, generator=gen) + 0.5
    rows, run = _rows_and_run(shape, layout)
    cpu_stream.inference(
        x.data_ptr(), y.data_ptr(), rows, channels, run, dtype == torch.bfloat16,
        weight.data_ptr(), bias.data_ptr(), (mean.data_ptr(), var.data_ptr()), 1e-5, threads,
    )  # fmt: skip
    scale = _by_channel(weight / torch.sqrt(var.double() + 1e-5), shape, layout)
    expected = (x.double() - _by_channel(mean, shape, layout)) * scale
    expected = expected + _by_channel(bias, shape, layout)
    torch.testing.assert_close(y.double(), expected, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), LAYOUTS)
@pytest.mark.parametrize(("x_offset", "y_offset"), OFFSETS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("threads", THREADS)
def test_train_forward_matches_float64(
    dtype, shape, layout, x_offset, y_offset, affine, threads
) -> None:
    """Statistics, output and running buffers of a training forward, against float64."""
    gen = torch.Generator().manual_seed(1)
    channels = shape[1]
    x = _at_offset((torch.randn(shape, generator=gen) * 2 + 5).to(dtype), x_offset)
    y = _at_offset(torch.full(shape, float("nan")).to(dtype), y_offset)
    weight = torch.rand(channels, generator=gen) + 0.5 if affine else None
    bias = torch.randn(channels, generator=gen) if affine else None
    running_mean, running_var = torch.randn(channels), torch.rand(channels) + 0.5
    expected_running = (running_mean.double(), running_var.double())
    mean_out, invstd_out = torch.empty(channels), torch.empty(channels)
    rows, run = _rows_and_run(shape, layout)
    cpu_stream.train_forward(
        x.data_ptr(), y.data_ptr(), rows, channels, run, dtype == torch.bfloat16,
        _address(weight), _address(bias), 1e-5, 0.3,
        (running_mean.data_ptr(), running_var.data_ptr()),
        (mean_out.data_ptr(), invstd_out.data_ptr()), threads,
    )  # fmt: skip
    x64 = x.double()
    count = x.numel() // channels
    mean = _reduce(x64, layout) / count
    var = _reduce((x64 - _by_channel(mean, shape, layout)) ** 2, layout) / count
    torch.testing.assert_close(mean_out.double(), mean, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(invstd_out.double(), 1 / torch.sqrt(var + 1e-5), rtol=1e-5, atol=0)
    expected = (x64 - _by_channel(mean, shape, layout)) * _by_channel(
        1 / torch.sqrt(var + 1e-5), shape, layout
    )
    if affine:
        expected = expected * _by_channel(weight, shape, layout) + _by_channel(bias, shape, layout)
    torch.testing.assert_close(y.double(), expected, **_tolerance(dtype))
    new_mean = 0.7 * expected_running[0] + 0.3 * mean
    new_var = 0.7 * expected_running[1] + 0.3 * var * count / (count - 1)
    torch.testing.assert_close(running_mean.double(), new_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(running_var.double(), new_var, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), LAYOUTS)
@pytest.mark.parametrize(("x_offset", "y_offset"), OFFSETS)
@pytest.mark.parametrize("threads", THREADS)
def test_train_backward_matches_float64(dtype, shape, layout, x_offset, y_offset, threads) -> None:
    """dx, dγ, dβ from the saved μ and r, against the float64 formulas."""
    gen = torch.Generator().manual_seed(2)
    channels = shape[1]
    x = _at_offset(torch.randn(shape, generator=gen).to(dtype), x_offset)
    dy = _at_offset(torch.randn(shape, generator=gen).to(dtype), x_offset)
    dx = _at_offset(torch.full(shape, float("nan")).to(dtype), y_offset)
    weight, mean = torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)
    invstd = torch.rand(channels, generator=gen) + 0.5
    dweight, dbias = torch.empty(channels), torch.empty(channels)
    rows, run = _rows_and_run(shape, layout)
    cpu_stream.train_backward(
        dy.data_ptr(), x.data_ptr(), dx.data_ptr(), rows, channels, run,
        dtype == torch.bfloat16, weight.data_ptr(), (mean.data_ptr(), invstd.data_ptr()),
        (dweight.data_ptr(), dbias.data_ptr()), threads,
    )  # fmt: skip
    count = x.numel() // channels
    dy64, centered = dy.double(), x.double() - _by_channel(mean, shape, layout)
    sum_dy, sum_dy_xmu = _reduce(dy64, layout), _reduce(dy64 * centered, layout)
    r = invstd.double()
    # float32 partial sums: a few ulps of the sums of absolute values
    assert torch.all((dbias.double() - sum_dy).abs() <= 1e-6 * _reduce(dy64.abs(), layout))
    bound = 1e-6 * _reduce((dy64 * centered).abs(), layout) * r
    assert torch.all((dweight.double() - sum_dy_xmu * r).abs() <= bound + 1e-12)
    expected = _by_channel(weight.double() * r, shape, layout) * (
        dy64
        - _by_channel(sum_dy / count, shape, layout)
        - centered * _by_channel(sum_dy_xmu * r * r / count, shape, layout)
    )
    torch.testing.assert_close(dx.double(), expected, **_tolerance(dtype))


def test_bfloat16_rounds_like_torch() -> None:
    """Round to nearest even on store, bit for bit as torch's float32 → bfloat16 conversion."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 1000, generator=gen).bfloat16()
    scale = 1.0 + 2.0**-9  # x·scale lands on or near bfloat16 ties
    weight, zeros, ones = torch.full((3,), scale), torch.zeros(3), torch.ones(3)
    y = torch.empty_like(x)
    cpu_stream.inference(
        x.data_ptr(), y.data_ptr(), 4, 3, 1000, True, weight.data_ptr(), 0,
        (zeros.data_ptr(), ones.data_ptr()), 0.0,
    )  # fmt: skip
    expected = (x.float() * scale).bfloat16()
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_values_propagate(dtype) -> None:
    x = torch.randn(2, 3, 40).to(dtype)
    x[0, 1, 5], x[1, 2, 30], x[1, 0, 17] = float("nan"), float("inf"), float("-inf")
    zeros, ones = torch.zeros(3), torch.ones(3)
    y = torch.empty_like(x)
    cpu_stream.inference(
        x.data_ptr(), y.data_ptr(), 2, 3, 40, dtype == torch.bfloat16, 0, 0,
        (zeros.data_ptr(), ones.data_ptr()), 0.0,
    )  # fmt: skip
    assert torch.equal(y.isnan(), x.isnan())
    assert torch.equal(y.isinf(), x.isinf())
    assert torch.equal(y[y.isfinite()], x[x.isfinite()])
    if dtype == torch.bfloat16:
        assert y.view(torch.int16)[0, 1, 5].item() == 0x7FC0  # the quiet NaN, as Numba stores it


@pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info(),
    reason="torch's CPU kernels run on OpenMP here, on Linux",
)
def test_passes_run_on_torchs_openmp_team() -> None:
    """Where torch runs on OpenMP (Linux wheels), the extension found its runtime."""
    assert cpu_stream.THREADED


def test_teams_from_several_python_threads_at_once() -> None:
    """Passes called from several Python threads at once (each with a team of its own) keep
    their results apart: each call's scratch is its own."""
    gen = torch.Generator().manual_seed(6)
    inputs = [torch.randn(8, 4, 3000, generator=gen) * (k + 1) + k for k in range(4)]
    outputs = [torch.empty_like(x) for x in inputs]
    stats = [torch.empty(2, 4) for _ in inputs]  # rows: mean, invstd

    def forward(k: int) -> None:
        for _ in range(20):
            cpu_stream.train_forward(
                inputs[k].data_ptr(), outputs[k].data_ptr(), 8, 4, 3000, False, 0, 0, 1e-5,
                0.1, (0, 0), (stats[k][0].data_ptr(), stats[k][1].data_ptr()), 2,
            )  # fmt: skip

    workers = [threading.Thread(target=forward, args=(k,)) for k in range(len(inputs))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for x, y, (mean, invstd) in zip(inputs, outputs, stats, strict=True):
        var, expected_mean = torch.var_mean(x.double(), (0, 2), correction=0)
        torch.testing.assert_close(mean.double(), expected_mean, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(invstd.double(), (var + 1e-5).rsqrt(), atol=0, rtol=1e-5)
        expected = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_threads_below_one_are_refused() -> None:
    x = torch.randn(2, 3, 40)
    zeros, ones = torch.zeros(3), torch.ones(3)
    for threads in (0, 1025):
        with pytest.raises(ValueError, match=f"threads: expected 1 to 1024, got {threads}"):
            cpu_stream.inference(
                x.data_ptr(), torch.empty_like(x).data_ptr(), 2, 3, 40, False, 0, 0,
                (zeros.data_ptr(), ones.data_ptr()), 0.0, threads,
            )  # fmt: skip


@pytest.mark.skipif(not cpu_stream.THREADED, reason="torch's OpenMP runtime not found")
@pytest.mark.parametrize("threads", [1, 2])
def test_calls_from_inside_an_openmp_region(threads) -> None:
    """Each thread of somebody else's OpenMP team may call a pass: on the calling thread alone
    (thread 0 of 1, not that team's numbers) or on a nested team, with the whole result."""
    runtime = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    body_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    runtime.GOMP_parallel.argtypes = [body_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(64, 40, generator=gen) * 2 + 1  # (M, C)
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def body(_: int) -> None:
        y, stats = torch.full_like(x, float("nan")), torch.empty(2, 40)  # stats: mean, invstd
        cpu_stream.train_forward(
            x.data_ptr(), y.data_ptr(), 64, 40, 0, False, 0, 0, 1e-5, 0.1, (0, 0),
            (stats[0].data_ptr(), stats[1].data_ptr()), threads,
        )  # fmt: skip
        results[runtime.omp_get_thread_num()] = (y, stats)

    runtime.GOMP_parallel(body_type(body), None, 2, 0)
    assert sorted(results) == [0, 1]
    expected = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    for y, (mean, _invstd) in results.values():
        torch.testing.assert_close(mean.double(), x.double().mean(0), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_cpu_backend_refuses_streaming_without_support(monkeypatch) -> None:
    pytest.importorskip("numba")
    from batchnorm.backends import cpu_backend

    monkeypatch.setattr(cpu_backend.cpu_stream, "SUPPORTED", False)
    with pytest.raises(ValueError, match="streaming"):
        cpu_backend.CpuBackend(streaming=True)
    assert cpu_backend.CpuBackend().streaming is False
    assert cpu_backend.CpuBackend().kernel_cases is measured.MEASURED_NUMBA_CASES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("buffers", [torch.float32, torch.float64], ids=str)
def test_backend_paths_agree_across_threads(dtype, memory_format, buffers) -> None:
    """One C call per pass on one thread and on two (torch's OpenMP team), and Numba's kernels
    on two (float64 buffers moved in NumPy), give torch's outputs, gradients and buffers."""
    pytest.importorskip("numba")
    from batchnorm.backends import cpu_backend
    from batchnorm.functional import batch_norm

    backend = cpu_backend.CpuBackend(measured.ALL_KERNEL_CASES)
    numba_only = cpu_backend.CpuBackend(measured.ALL_KERNEL_CASES, streaming=False)
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
        for count, variant in ((1, backend), (2, backend), (2, numba_only)):
            torch.set_num_threads(count)
            # C on one thread, and on two with torch's OpenMP runtime; Numba's kernels else
            streams = variant is backend and (count == 1 or cpu_stream.THREADED)
            assert variant._streams(x) == streams
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            mean, var = torch.zeros(5, dtype=buffers), torch.ones(5, dtype=buffers)
            with backends.override("cpu", variant):
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


@pytest.mark.skipif(not cpu_stream.THREADED, reason="torch's OpenMP runtime not found")
@pytest.mark.parametrize(("threads", "values", "expected"), [(2, 1 << 17, 2), (2, 1 << 15, 1)])
def test_backend_hands_torchs_thread_count_to_the_passes(
    use_backend, monkeypatch, threads, values, expected
) -> None:
    """Each C pass gets torch's thread count, but at least 32768 values (ATen's grain) per
    thread: a smaller input runs on the calling thread."""
    from batchnorm.functional import batch_norm

    _kernels_everywhere(use_backend)
    calls: dict[str, int] = {}
    for name in ("train_forward", "train_backward", "inference"):
        original = getattr(cpu_stream, name)

        def record(*args, _name=name, _original=original):
            calls[_name] = args[-1]  # threads, the last argument
            return _original(*args)

        monkeypatch.setattr(cpu_stream, name, record)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(8, 16, values // 128).requires_grad_()  # `values` values
        y = batch_norm(x, torch.zeros(16), torch.ones(16), None, None, True, 0.1, 1e-5,
                       backend="numba")  # fmt: skip
        y.backward(torch.randn_like(y))
        with torch.no_grad():
            batch_norm(x, torch.zeros(16), torch.ones(16), None, None, False, 0.1, 1e-5,
                       backend="numba")  # fmt: skip
    finally:
        torch.set_num_threads(saved)
    assert calls == {"train_forward": expected, "train_backward": expected, "inference": expected}


def _kernels_everywhere(use_backend):
    """Installs ``CpuBackend(ALL_KERNEL_CASES)`` as the ``cpu`` backend; returns it."""
    pytest.importorskip("numba")
    from batchnorm.backends import cpu_backend

    return use_backend("cpu", cpu_backend.CpuBackend(measured.ALL_KERNEL_CASES))


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Runs a test on one thread and on two (the C kernels on torch's OpenMP team)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


def test_strided_running_buffers_move_like_torchs(use_backend, monkeypatch, threads) -> None:
    """Buffers that are views with a stride (every other element of a longer tensor) move as
    torch moves them, and the elements between them are left alone."""
    from batchnorm.functional import batch_norm

    _kernels_everywhere(use_backend)
    x = torch.randn(32, 6, 8, 8) * 2 + 1
    storage_mean, storage_var = torch.zeros(12), torch.ones(12)
    expected_mean, expected_var = torch.zeros(6), torch.ones(6)
    batch_norm(x, storage_mean[::2], storage_var[::2], None, None, True, 0.3, 1e-5, backend="numba")
    torch.nn.functional.batch_norm(x, expected_mean, expected_var, None, None, True, 0.3, 1e-5)
    torch.testing.assert_close(storage_mean[::2], expected_mean)
    torch.testing.assert_close(storage_var[::2], expected_var)
    assert torch.equal(storage_mean[1::2], torch.zeros(6))
    assert torch.equal(storage_var[1::2], torch.ones(6))


def test_float64_default_dtype_keeps_float32_statistics(use_backend, monkeypatch, threads) -> None:
    """``torch.set_default_dtype(torch.float64)`` changes nothing: the kernels' float32
    statistics and gradients stay float32 and correct."""
    from batchnorm.functional import batch_norm

    _kernels_everywhere(use_backend)
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
def test_large_offsets_keep_the_variance_precise(use_backend, monkeypatch, threads, layout) -> None:
    """|μ|/σ = 1e5 in float32: the running variance within 1e-5 of float64's (the float32 sums
    about a rounded mean are corrected by Σ (x − mean), Chan, Golub & LeVeque's two-pass)."""
    from batchnorm.functional import batch_norm

    _kernels_everywhere(use_backend)
    x = (torch.randn(2, 5, 128, 128, dtype=torch.float64) * 100 + 1e7).float()
    if layout == "rows":
        x = x.contiguous(memory_format=torch.channels_last)
    running_var = torch.ones(5)
    batch_norm(x, torch.zeros(5), running_var, None, None, True, 1.0, 1e-5, backend="numba")
    expected = x.double().var((0, 2, 3))
    torch.testing.assert_close(running_var.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", ["ncl", "rows"])
def test_an_infinity_gives_an_infinite_running_mean(
    use_backend, monkeypatch, threads, layout
) -> None:
    """As torch: +inf in a channel makes its running mean +inf (not NaN), its variance NaN."""
    from batchnorm.functional import batch_norm

    _kernels_everywhere(use_backend)
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
