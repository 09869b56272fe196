"""The CPU shortcuts of issue 8: ATen's whole-call path, kernel-size thresholds, huge pages.

Each shortcut is checked against something independent of it: the generic path of the same
backend (our autograd function and running update), ``torch.nn.functional.batch_norm``,
finite differences (double backward), and the memory map the allocation advice must cover.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from batchnorm._math import new_running_stats
from batchnorm.autograd import batch_norm_train
from batchnorm.backends import measured, memory
from batchnorm.backends.aten_backend import AtenBackend, native_operand, rows_as_input
from batchnorm.backends.base import Call, Saved
from batchnorm.functional import batch_norm, batch_norm_pure, channel_view

HAS_NUMBA = importlib.util.find_spec("numba") is not None
NEEDS_NUMBA = pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
EPS = 1e-5


def _channels_innermost(shape):
    """A tensor of ``shape`` whose channels (dim 1) are innermost in memory, any rank."""
    moved = torch.randn(shape[0], *shape[2:], shape[1])  # (N, *, C) contiguous
    return moved.movedim(-1, 1)  # (N, C, *)


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7), (3, 4, 5, 6), (2, 4, 3, 2, 5)])
def test_native_operand_views(shape) -> None:
    """Contiguous input goes as it is; channels-innermost input as its (M, C) view, no copy."""
    x = torch.randn(shape)
    operand, is_rows = native_operand(x)
    assert operand is x
    assert not is_rows
    if len(shape) == 2:
        return
    x_last = _channels_innermost(shape)
    if len(shape) in (4, 5):  # float32 channels_last: ATen's own kernels for that format
        operand, is_rows = native_operand(x_last)
        assert operand is x_last
        assert not is_rows
        x_last = x_last.bfloat16()  # reduced precision: the (M, C) view (fp32 gradient sums)
        operand, is_rows = native_operand(x_last, torch.ones(shape[1]), gradients=False)
        assert operand is x_last  # no gradients: ATen's channels-last kernel as it is
        assert not is_rows
    operand, is_rows = native_operand(x_last, torch.ones(shape[1]))
    assert is_rows
    assert operand.shape == (x_last.numel() // shape[1], shape[1])
    assert operand.data_ptr() == x_last.data_ptr()  # a view
    back = rows_as_input(operand, x_last)
    assert back.shape == x_last.shape
    assert back.stride() == x_last.stride()
    assert torch.equal(back, x_last)


def test_native_operand_rejects() -> None:
    """None for what ATen's fast kernels cannot take as it is."""
    x = torch.randn(4, 3, 5)
    f32, f64, bf16 = (
        torch.ones(3, dtype=t) for t in (torch.float32, torch.float64, torch.bfloat16)
    )
    assert native_operand(torch.randn(4, 3, 10)[..., ::2]) is None  # strided
    assert native_operand(torch.randn(0, 3, 5)) is None  # empty: ATen's CPU kernels divide by 0
    assert native_operand(x, f64) is None  # float64 weight with float32 input
    assert native_operand(x.bfloat16(), bf16) is None  # bfloat16 parameters: generic path
    assert native_operand(x.bfloat16(), f32, f32) is not None  # mixed precision: ATen's own
    assert native_operand(x.double(), f64) is not None
    seen = []
    torch.func.vmap(lambda row: seen.append(native_operand(row[None])) or row)(x)
    assert seen == [None]  # under a torch.func transform


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows-3d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_forward_update_matches_generic_path(layout, dtype) -> None:
    """ATen's whole call = the generic path of the same backend: output, grads, statistics."""
    shape = (5, 4, 3, 6) if layout != "rows-3d" else (5, 4, 7)
    base = 1.5 + torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    elif layout == "rows-3d":
        base = base.transpose(1, 2).contiguous().transpose(1, 2)  # (N, C, L), C innermost
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    weight = torch.linspace(0.5, 1.5, 4, dtype=stats_dtype)
    bias = torch.linspace(-1.0, 1.0, 4, dtype=stats_dtype)
    running_mean = torch.linspace(-0.2, 0.2, 4, dtype=stats_dtype)
    running_var = torch.linspace(0.5, 2.0, 4, dtype=stats_dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    backend = AtenBackend()

    leaves_fast = [base.to(dtype).requires_grad_(), weight.clone().requires_grad_()]
    before = (running_mean.clone(), running_var.clone())
    done = backend.forward_update(
        Call(leaves_fast[0], running_mean, running_var, leaves_fast[1], bias, 0.3, EPS, None, False)
    )
    assert done is not None
    y_fast, mean_fast, var_fast = done
    assert torch.equal(running_mean, before[0])
    assert torch.equal(running_var, before[1])
    grads_fast = torch.autograd.grad(y_fast, leaves_fast, dy)

    leaves_generic = [base.to(dtype).requires_grad_(), weight.clone().requires_grad_()]
    x3 = channel_view(leaves_generic[0])
    result = batch_norm_train(x3, leaves_generic[1], bias, EPS, backend)
    mean_generic, var_generic = new_running_stats(
        running_mean, running_var, result.mean, result.var, x3.shape[0] * x3.shape[2], 0.3
    )
    y_generic = result.y.reshape(shape)
    grads_generic = torch.autograd.grad(y_generic, leaves_generic, dy)

    assert y_fast.dtype == dtype
    assert y_fast.stride() == leaves_fast[0].stride()
    tolerance = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {}
    if dtype == torch.bfloat16:
        tolerance = {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(y_fast, y_generic, **tolerance)
    for fast, generic in zip(grads_fast, grads_generic, strict=True):
        torch.testing.assert_close(fast, generic, **tolerance)
    stats_tolerance = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {}
    torch.testing.assert_close(mean_fast, mean_generic, **stats_tolerance)
    torch.testing.assert_close(var_fast, var_generic, **stats_tolerance)


def test_forward_update_declines() -> None:
    """None where the generic path must run: one buffer only, or no fast layout."""
    backend = AtenBackend()
    x, ones = torch.randn(4, 3, 5), torch.ones(3)
    assert backend.forward_update(Call(x, ones, None, None, None, 0.1, EPS, None, False)) is None
    strided = Call(x[..., ::2], ones, ones, None, None, 0.1, EPS, None, False)
    assert backend.forward_update(strided) is None


@pytest.mark.parametrize("backend", ["aten", pytest.param("numba", marks=NEEDS_NUMBA)])
def test_double_backward_through_fast_path(backend) -> None:
    """Second derivatives by finite differences (float64): the fast path keeps ATen's."""
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def normalized(xx, ww, bb):
        return batch_norm(xx, None, None, ww, bb, training=True, backend=backend)

    assert torch.autograd.gradgradcheck(normalized, (x, weight, bias))


@pytest.mark.parametrize("backend", ["aten", pytest.param("numba", marks=NEEDS_NUMBA)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fast_path_equals_torch_bitwise(backend, training) -> None:
    """Float32 contiguous and channels-last: the same ATen kernels, so the same bits."""
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(4, 3, 5, 6).contiguous(memory_format=memory_format)
        ours_stats = (torch.zeros(3), torch.ones(3))
        torch_stats = (torch.zeros(3), torch.ones(3))
        y_ours = batch_norm(x, *ours_stats, training=training, backend=backend)
        y_torch = TF.batch_norm(x, *torch_stats, training=training)
        assert torch.equal(y_ours, y_torch)
        assert y_ours.stride() == y_torch.stride()
        assert torch.equal(ours_stats[0], torch_stats[0])
        assert torch.equal(ours_stats[1], torch_stats[1])


@NEEDS_NUMBA
@pytest.mark.parametrize("threads", [1, 2])
def test_numba_kernel_thresholds(threads) -> None:
    """By default the kernels take exactly the cases and sizes of the measured table for the
    thread count: each case from its smallest size on, not one element below it, and no other
    case."""
    from batchnorm.backends.cpu_backend import CpuBackend, cpu_stream
    from batchnorm.backends.measured import (
        ALL_KERNEL_CASES,
        MEASURED_KERNEL_CASES,
        MEASURED_NUMBA_CASES,
        MEASURED_THREADED_CASES,
    )

    default, everywhere = CpuBackend(), CpuBackend(ALL_KERNEL_CASES)
    if not default.streaming:
        expected_table = MEASURED_NUMBA_CASES
    elif threads == 1:
        expected_table = MEASURED_KERNEL_CASES
    else:
        expected_table = MEASURED_THREADED_CASES if cpu_stream.THREADED else MEASURED_NUMBA_CASES
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_thresholds(default, everywhere, expected_table, ALL_KERNEL_CASES)
    finally:
        torch.set_num_threads(saved)


def _check_thresholds(default, everywhere, expected_table, all_cases) -> None:
    """``default`` takes the cases of ``expected_table`` from their sizes on, ``everywhere``
    every case of ``all_cases``."""
    small = torch.randn(4, 3, 5)
    assert default._kernel_layout("forward", small) is None
    assert everywhere._kernel_layout("forward", small) == "ncl"
    for (pass_name, layout, dtype), smallest in all_cases.items():
        threshold = expected_table.get((pass_name, layout, dtype))
        itemsize = torch.empty((), dtype=dtype).element_size()
        values = max(threshold or 0, 64 * itemsize) // itemsize  # at the threshold (or tiny)
        x = _dense(torch.empty(2, 4, values // 8, dtype=dtype), layout)  # `values` elements
        expected = layout if threshold is not None and x.numel() * itemsize >= threshold else None
        assert default._kernel_layout(pass_name, x) == expected, (pass_name, layout, dtype)
        if threshold is not None and threshold > smallest:  # one sample's run shorter
            below = _dense(x[..., 1:], layout)
            assert default._kernel_layout(pass_name, below) is None, (pass_name, layout, dtype)


def _dense(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` ``(N, C, L)`` copied dense: contiguous (``"ncl"``) or channels innermost."""
    if layout == "ncl":
        return x.contiguous()
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@NEEDS_NUMBA
@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=5),
    order_seed=st.randoms(use_true_random=False),
    sliced=st.booleans(),
)
def test_kernel_layout_matches_views(shape, order_seed, sliced) -> None:
    """``kernel_layout`` (strides only) agrees with the views the kernels read: "ncl" iff the
    tensor is contiguous with L > 1, "rows" iff its channels-innermost view is contiguous."""
    from batchnorm.backends.cpu_backend import kernel_layout

    order = list(range(len(shape)))
    order_seed.shuffle(order)
    base = torch.randn([shape[d] * (2 if sliced and d == order[0] else 1) for d in order])
    x = base.permute([order.index(d) for d in range(len(shape))])  # (N, C, *), any strides
    if sliced:
        x = x.narrow(order[0], 0, shape[order[0]])
    length = x[0, 0].numel()
    if x.is_contiguous() and length > 1:
        expected = "ncl"
    elif x.movedim(1, -1).is_contiguous():
        expected = "rows"
    else:
        expected = None
    assert kernel_layout(x) == expected
    if expected is not None:  # the array the kernels read is the view, without a copy
        from batchnorm.backends.cpu_backend import _kernel_array

        array = _kernel_array(channel_view(x), expected)
        assert array.ctypes.data == x.data_ptr()
    assert kernel_layout(x.half()) is None  # float16: ATen's
    assert kernel_layout(x.to(torch.int32)) is None


def _count_backward_kernels(monkeypatch) -> list[int]:
    """A list that gets an item each time the Numba backend's (N, C, L) backward kernel runs:
    Numba's fused one, or the streaming one where this machine runs it (one thread)."""
    from batchnorm.backends import cpu_backend

    calls: list[int] = []
    entries = (
        (cpu_backend.cpu_numba, "backward_ncl"),
        (cpu_backend.cpu_stream, "train_backward"),
    )
    for module, name in entries:
        kernel = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *args, kernel=kernel: calls.append(1) or kernel(*args)
        )
    return calls


@NEEDS_NUMBA
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no-grad"])
def test_numba_routes_bfloat16_backward_to_its_kernel(monkeypatch, requires_grad) -> None:
    """bfloat16 (N, C, L) from 2 MiB: the generic path when autograd will differentiate it (so
    the Numba backward runs), ATen's whole call otherwise; both give torch's gradients."""
    calls = _count_backward_kernels(monkeypatch)
    x = torch.randn(16, 8, 1 << 13).bfloat16().requires_grad_(requires_grad)  # 2 MiB
    y = batch_norm(x, None, None, training=True, backend="numba")
    expected = TF.batch_norm(x.detach().float(), None, None, training=True)
    torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=2e-2)
    if requires_grad:
        dy = torch.randn_like(x)
        (dx,) = torch.autograd.grad(y, x, dy)
        x_ref = x.detach().float().requires_grad_()
        (dx_ref,) = torch.autograd.grad(
            TF.batch_norm(x_ref, None, None, training=True), x_ref, dy.float()
        )
        torch.testing.assert_close(dx.float(), dx_ref, atol=3e-2, rtol=3e-2)
    assert calls == ([1] if requires_grad else [])


@NEEDS_NUMBA
@pytest.mark.parametrize("pure", [False, True], ids=["in-place", "pure"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("buffers", ["plain", "grad", "none"])
def test_native_forward_path_matches_torch(use_backend, monkeypatch, pure, affine, buffers) -> None:
    """ATen's forward with the running update inside, Numba's backward: F.batch_norm's output
    and statistics bit for bit (same kernel), its gradients to bfloat16 accuracy; the given
    buffers move only in the in-place form, and never when they require grad."""
    from batchnorm.backends import cpu_backend

    backend = cpu_backend.CpuBackend({("backward", "ncl", torch.bfloat16): 1})
    use_backend("cpu", backend)
    calls = _count_backward_kernels(monkeypatch)
    channels = 5
    x = (3.0 + 2.0 * torch.randn(6, channels, 7, 3)).bfloat16().requires_grad_()
    weight = torch.linspace(0.5, 1.5, channels).requires_grad_() if affine else None
    bias = torch.linspace(-1.0, 1.0, channels).requires_grad_() if affine else None
    mean, var = torch.rand(channels), torch.rand(channels) + 0.5
    if buffers == "none":
        mean = var = None
    if buffers == "grad":
        mean.requires_grad_()
        var.requires_grad_()
    assert backend.native_forward(x, weight, bias, mean, var)
    ref_mean = None if mean is None else mean.detach().clone()
    ref_var = None if var is None else var.detach().clone()
    given = None if mean is None else (mean.detach().clone(), var.detach().clone())
    # With no per-channel tensor at all ATen keeps bfloat16 statistics; ours hands it a float32
    # weight of ones (statistics_weight) so that they stay float32.
    ref_weight = torch.ones(channels) if weight is None and mean is None else weight
    expected = TF.batch_norm(x, ref_mean, ref_var, ref_weight, bias, True, 0.3, EPS)
    if pure:
        out = batch_norm_pure(x, mean, var, weight, bias, True, 0.3, EPS, backend="numba")
        y, new_mean, new_var = out
    else:
        y = batch_norm(x, mean, var, weight, bias, True, 0.3, EPS, backend="numba")
        new_mean, new_var = mean, var
    assert torch.equal(y, expected)
    if mean is not None:
        assert torch.equal(new_mean.detach(), ref_mean)
        assert torch.equal(new_var.detach(), ref_var)
        moved = not pure  # buffers requiring grad: moved as copies, copied back
        assert torch.equal(mean.detach(), ref_mean if moved else given[0])
        assert torch.equal(var.detach(), ref_var if moved else given[1])
    leaves = [x] + ([weight, bias] if affine else [])
    dy = torch.randn_like(x)
    grads = torch.autograd.grad(y, leaves, dy)
    assert calls == [1]
    leaves_ref = [t.detach().double().requires_grad_() for t in leaves]
    weight_ref, bias_ref = leaves_ref[1:] if affine else (None, None)
    y_ref = TF.batch_norm(leaves_ref[0], None, None, weight_ref, bias_ref, True, 0.3, EPS)
    grads_ref = torch.autograd.grad(y_ref, leaves_ref, dy.double())
    for grad, leaf, grad_ref in zip(grads, leaves, grads_ref, strict=True):
        assert grad.dtype == leaf.dtype
        torch.testing.assert_close(grad.double(), grad_ref, atol=3e-2, rtol=3e-2)


@NEEDS_NUMBA
def test_native_forward_declines() -> None:
    """Only bfloat16 (N, C, L) the backward kernel takes, with ATen's dtypes, under autograd."""
    from batchnorm.backends.cpu_backend import CpuBackend

    backend = CpuBackend({("backward", "ncl", torch.bfloat16): 1})
    x = torch.randn(4, 3, 5).bfloat16().requires_grad_()
    f32, bf16 = torch.ones(3), torch.ones(3, dtype=torch.bfloat16)
    assert backend.native_forward(x, f32, f32, None, None)
    assert not backend.native_forward(x.detach(), f32, f32, None, None)  # no backward to run
    assert not backend.native_forward(x, bf16, bf16, None, None)  # dtypes ATen does not mix
    assert not backend.native_forward(x, None, None, f32, None)  # one buffer only
    assert not backend.native_forward(x.float(), None, None, None, None)  # no fp32 kernel case
    rows = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not backend.native_forward(rows, None, None, None, None)  # (M, C): not this kernel
    with torch.no_grad():
        assert not backend.native_forward(x, None, None, None, None)


def test_pure_fast_path_returns_new_statistics() -> None:
    """batch_norm_pure on the fast path: buffers untouched, new statistics returned."""
    x = 2.0 + torch.randn(8, 3, 4, 4)
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    out = batch_norm_pure(x, running_mean, running_var, None, None, True, 0.5, EPS, backend="aten")
    assert torch.equal(running_mean, torch.zeros(3))
    assert torch.equal(running_var, torch.ones(3))
    expected_mean = 0.5 * x.mean(dim=(0, 2, 3))
    expected_var = 0.5 + 0.5 * x.var(dim=(0, 2, 3))
    torch.testing.assert_close(out.running_mean, expected_mean)
    torch.testing.assert_close(out.running_var, expected_var)


# --- huge-page outputs -----------------------------------------------------------------------


def test_empty_like_is_empty_like(monkeypatch) -> None:
    """Same shape, dtype, strides and device as torch.empty_like, any memory format."""
    for x in (
        torch.randn(3, 4, 5, 6),
        torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last),
    ):
        out = memory.empty_like(x)
        assert (out.shape, out.dtype, out.stride(), out.device) == (
            x.shape,
            x.dtype,
            x.stride(),
            x.device,
        )
        assert out.data_ptr() != x.data_ptr()


def test_empty_like_advises_whole_huge_pages(monkeypatch) -> None:
    """The advice covers exactly the 2 MiB-aligned pages inside the tensor's memory."""
    calls = []
    monkeypatch.setattr(
        memory, "_MADVISE", lambda start, length, advice: calls.append((start, length, advice))
    )
    page = memory.HUGE_PAGE_BYTES
    nbytes = memory.ADVISE_FROM_BYTES + page // 2  # not a whole number of huge pages
    out = memory.empty_like(torch.empty(nbytes // 4))
    start, stop = out.data_ptr(), out.data_ptr() + nbytes
    assert len(calls) == 1
    first, length, advice = calls[0]
    assert advice == 14  # MADV_HUGEPAGE
    assert first % page == 0
    assert length % page == 0
    assert length > 0
    assert start <= first
    assert first + length <= stop
    assert first - start < page
    assert stop - (first + length) < page
    calls.clear()
    memory.empty_like(torch.empty(memory.ADVISE_FROM_BYTES // 4 - 1))  # recycled heap memory
    assert calls == []


def test_empty_like_without_huge_pages(monkeypatch) -> None:
    """Where the system has no huge pages, plain torch.empty_like (nothing advised)."""
    monkeypatch.setattr(memory, "_MADVISE", None)
    assert not memory.huge_pages_advisable()
    assert memory.empty_like(torch.empty(1 << 20)).shape == (1 << 20,)


def test_load_madvise_respects_the_system(monkeypatch, tmp_path) -> None:
    """No advice on other systems or with huge pages 'never'; libc's madvise otherwise."""
    mode = tmp_path / "enabled"
    monkeypatch.setattr(memory, "_THP_MODE_FILE", mode)
    mode.write_text("always madvise [never]\n")
    assert memory._load_madvise() is None
    mode.write_text("always [madvise] never\n")
    if memory.sys.platform.startswith("linux"):
        assert memory._load_madvise() is not None
    monkeypatch.setattr(memory, "_THP_MODE_FILE", tmp_path / "missing")
    assert memory._load_madvise() is None
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory._load_madvise() is None


@pytest.mark.parametrize("backend", ["aten", pytest.param("numba", marks=NEEDS_NUMBA)])
def test_in_place_update_of_strided_buffers(backend) -> None:
    """batch_norm moves strided buffer views in place, as F.batch_norm does, other values kept."""
    x = 1.0 + torch.randn(6, 3, 4, 4)
    ours = torch.arange(12.0).reshape(2, 6)  # running_mean = row 0 cols 0, 2, 4
    theirs = ours.clone()
    batch_norm(x, ours[0, ::2], ours[1, ::2], training=True, momentum=0.3, backend=backend)
    TF.batch_norm(x, theirs[0, ::2], theirs[1, ::2], training=True, momentum=0.3)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[:, 1::2], torch.arange(12.0).reshape(2, 6)[:, 1::2])


@pytest.mark.parametrize("backend", ["aten", pytest.param("numba", marks=NEEDS_NUMBA)])
def test_in_place_with_buffers_that_require_grad(backend) -> None:
    """Buffers that require grad are moved through copies (ATen refuses them in place)."""
    x = torch.randn(6, 3, 5)
    running_mean = torch.zeros(3, requires_grad=True)
    running_var = torch.ones(3, requires_grad=True)
    batch_norm(x, running_mean, running_var, training=True, momentum=0.5, backend=backend)
    torch.testing.assert_close(running_mean.detach(), 0.5 * x.mean(dim=(0, 2)))
    torch.testing.assert_close(running_var.detach(), 0.5 + 0.5 * x.var(dim=(0, 2)))


@NEEDS_NUMBA
def test_numba_variance_precision_with_long_rows() -> None:
    """One long row per channel (L = 2^22): the variance within 1e-6 of float64's."""
    from batchnorm.backends.cpu_backend import CpuBackend
    from batchnorm.backends.measured import ALL_KERNEL_CASES

    x = 5.0 + 2.0 * torch.randn(1, 2, 1 << 22, dtype=torch.float64)
    result = CpuBackend(ALL_KERNEL_CASES).forward(x.float(), None, None, EPS)
    expected = x.float().double().var(dim=(0, 2), correction=0)
    torch.testing.assert_close(result.var.double(), expected, rtol=1e-6, atol=0.0)


@NEEDS_NUMBA
def test_numba_gradient_sums_precision_with_long_rows() -> None:
    """One long row per channel (L = 2^22): dβ = Σdy within 2e-7 relative of float64's, and
    dγ within 1e-7 of its scale Σ|dy·(x − μ)|·r (whole-row float32 sums drift to ~1e-6)."""
    from batchnorm.backends.cpu_backend import CpuBackend
    from batchnorm.backends.measured import ALL_KERNEL_CASES

    gen = torch.Generator().manual_seed(0)
    x = (5.0 + 2.0 * torch.randn(1, 2, 1 << 22, generator=gen)).float()
    dy = (0.3 + torch.randn(1, 2, 1 << 22, generator=gen)).float()
    backend = CpuBackend(ALL_KERNEL_CASES)
    stats = backend.forward(x, None, None, EPS)
    _dx, dweight, dbias = backend.backward(dy, Saved(x, None, stats.mean, stats.invstd))
    x64, dy64 = x.double(), dy.double()
    centered = x64 - stats.mean.double()[None, :, None]  # (1, 2, L)
    dbias64 = dy64.sum(dim=(0, 2))
    terms = dy64 * centered * stats.invstd.double()[None, :, None]  # (1, 2, L)
    torch.testing.assert_close(dbias.double(), dbias64, rtol=2e-7, atol=0.0)
    scale = terms.abs().sum(dim=(0, 2))
    assert ((dweight.double() - terms.sum(dim=(0, 2))).abs() / scale).max() < 1e-7


@pytest.mark.parametrize("backend", ["aten", pytest.param("numba", marks=NEEDS_NUMBA)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_channels_last_inference_is_torchs(backend, dtype) -> None:
    """Evaluation of channels_last input without autograd: F.batch_norm's kernel, bit for bit,
    output channels_last; with autograd, the same values and float64-close gradients."""
    x = (1.0 + torch.randn(4, 6, 5, 3)).to(dtype).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.linspace(0.5, 1.5, 6), torch.linspace(-1.0, 1.0, 6)
    mean, var = torch.rand(6), torch.rand(6) + 0.5
    with torch.no_grad():
        y = batch_norm(x, mean, var, weight, bias, False, backend=backend)
        expected = TF.batch_norm(x, mean, var, weight, bias, False)
    assert torch.equal(y, expected)
    assert y.is_contiguous(memory_format=torch.channels_last)
    weight.requires_grad_()
    y = batch_norm(x, mean, var, weight, bias, False, backend=backend)
    assert torch.equal(y.detach(), expected)
    dy = torch.randn_like(x)
    (dweight,) = torch.autograd.grad(y, weight, dy)
    scale = (var.double() + EPS).rsqrt()  # (C,)
    xhat = (x.double() - mean.double()[None, :, None, None]) * scale[None, :, None, None]
    torch.testing.assert_close(
        dweight.double(), (dy.double() * xhat).sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5
    )


@NEEDS_NUMBA
def test_numba_bfloat16_rounding_matches_torch() -> None:
    """The kernels' float32 → bfloat16 store rounds to nearest even exactly as torch does on
    every non-NaN pattern tried (ties, overflow to inf, subnormals); NaN stays NaN."""
    import numba
    import numpy as np

    from batchnorm.kernels.cpu.cpu_numba import store

    @numba.njit
    def round_all(values, out):
        for i in range(values.shape[0]):
            out[i] = store(out, values[i])

    gen = np.random.default_rng(0)
    high = np.arange(1 << 16, dtype=np.uint32) << 16  # every bfloat16 value as float32 bits
    bits = np.concatenate(
        [
            high,
            high | 0x8000,  # exact ties: round to even
            high | 0x7FFF,  # just below a tie
            high | 0x8001,  # just above
            gen.integers(0, 1 << 32, 100_000, dtype=np.uint64).astype(np.uint32),
        ]
    )
    values = bits.view(np.float32)
    out = np.empty(values.shape, np.uint16)
    round_all(values, out)
    ours = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16)
    nan = torch.from_numpy(np.isnan(values))
    assert torch.equal(ours[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    assert bool(ours[nan].isnan().all())


@NEEDS_NUMBA
def test_numba_bfloat16_nan_stays_in_its_channel() -> None:
    """A NaN in one channel's input makes that channel's output and statistics NaN through the
    bfloat16 kernels; the other channels match the float64 reference."""
    from batchnorm.backends.cpu_backend import CpuBackend
    from batchnorm.backends.measured import ALL_KERNEL_CASES

    x = torch.randn(4, 3, 50).bfloat16()
    x[2, 1, 7] = float("nan")
    result = CpuBackend(ALL_KERNEL_CASES).forward(x, None, None, EPS)
    assert bool(result.y[:, 1].isnan().all())
    assert bool(result.mean[1].isnan())
    x64 = x.double()[:, [0, 2]]
    expected = (x64 - x64.mean(dim=(0, 2), keepdim=True)) / (
        x64.var(dim=(0, 2), correction=0, keepdim=True) + EPS
    ).sqrt()
    torch.testing.assert_close(result.y[:, [0, 2]].double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["aten", pytest.param("numba", marks=NEEDS_NUMBA)])
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2, 4, 3, 1).permute(0, 2, 3, 1),  # (2, 3, 1, 4), strides (12,1,1,3)
        lambda: torch.randn(2, 2, 4, 3, 1).permute(0, 3, 4, 1, 2),  # (2,3,1,2,4), D stride 1
    ],
    ids=["4d", "5d"],
)
def test_channels_last_with_odd_size1_strides_has_right_gradients(backend, make) -> None:
    """channels_last by torch's test but with other strides on a size-1 dim: ATen's
    channels-last backward gets these wrong (torch.nn too), so they take the (M, C) view;
    gradients match float64."""
    x = make().requires_grad_()
    assert x.is_contiguous(memory_format=_CHANNELS_LAST_OF[x.dim()])
    standard = torch.empty(x.shape).contiguous(memory_format=_CHANNELS_LAST_OF[x.dim()])
    assert x.stride() != standard.stride()  # the odd strides this test is about
    channels = x.shape[1]
    weight = torch.linspace(0.5, 1.5, channels).requires_grad_()
    dy = torch.randn(x.shape)
    y = batch_norm(x, None, None, weight, None, True, backend=backend)
    dx, dweight = torch.autograd.grad(y, (x, weight), dy)
    x64 = x.detach().double().contiguous().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y64 = TF.batch_norm(x64, None, None, w64, None, True)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    torch.testing.assert_close(dx.double(), dx64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dweight.double(), dw64, atol=1e-5, rtol=1e-5)


_CHANNELS_LAST_OF = {4: torch.channels_last, 5: torch.channels_last_3d}


@pytest.mark.parametrize(
    "backend_cases",
    ["aten", pytest.param("native-forward", marks=NEEDS_NUMBA)],
)
def test_bfloat16_without_per_channel_tensors_keeps_float32_statistics(
    use_backend, monkeypatch, backend_cases
) -> None:
    """bfloat16, no weight/bias/buffers, mean ≫ σ: the statistics stay float32 (ATen would
    round μ to bfloat16 with no float32 tensor beside the input), so dx matches float64."""
    if backend_cases == "native-forward":
        from batchnorm.backends import cpu_backend

        backend = cpu_backend.CpuBackend({("backward", "ncl", torch.bfloat16): 1})
        use_backend("cpu", backend)
        name = "numba"
        assert backend.native_forward(torch.ones(2, 2, 2).bfloat16().requires_grad_(), *[None] * 4)
    else:
        name = "aten"
    gen = torch.Generator().manual_seed(0)
    x = (100.0 + torch.randn(8, 4, 256, generator=gen, dtype=torch.float64)).bfloat16()
    dy = (1.0 + 0.1 * torch.randn(8, 4, 256, generator=gen, dtype=torch.float64)).bfloat16()
    x.requires_grad_()
    y = batch_norm(x, None, None, training=True, backend=name)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(TF.batch_norm(x64, None, None, training=True), x64, dy.double())
    assert float((dx.double() - dx64).abs().max() / dx64.abs().max()) < 0.02


@NEEDS_NUMBA
@pytest.mark.parametrize("buffers", ["bfloat16", "mean-only"])
def test_kernel_calls_with_unusual_buffers_take_the_generic_path(
    use_backend, monkeypatch, buffers
) -> None:
    """Running buffers the kernels' forward does not move itself (bfloat16 ones, or a mean
    without a variance): the generic path runs the kernels and moves them as torch does."""
    from batchnorm.backends import cpu_backend

    backend = cpu_backend.CpuBackend(measured.ALL_KERNEL_CASES)
    use_backend("cpu", backend)
    x = (2.0 * torch.randn(6, 4, 9, 5) + 1.0).requires_grad_()
    if buffers == "bfloat16":
        mean, var = torch.zeros(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16)
    else:
        mean, var = torch.zeros(4), None
    assert not backend.native_forward(x, None, None, mean, var)
    x64 = x.detach().double()
    batch_mean, batch_var = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    expected_mean = 0.5 * mean.double() + 0.5 * batch_mean
    expected_var = None if var is None else 0.5 * var.double() + 0.5 * x64.var((0, 2, 3))
    y = batch_norm(x, mean, var, training=True, momentum=0.5, backend="numba")
    expected = (x64 - batch_mean[:, None, None]) / torch.sqrt(batch_var[:, None, None] + EPS)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.abs().max() < 1e-4  # a channel's sum of normalized values has no gradient
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if buffers == "bfloat16" else {}
    torch.testing.assert_close(mean.double(), expected_mean, **tolerance)
    if var is not None:
        torch.testing.assert_close(var.double(), expected_var, **tolerance)
