"""Numba backend: fused, cache-aware CPU kernels (:mod:`batchnorm.kernels.cpu_numba`).

The kernels cover float32, float64 and bfloat16 (as its bit pattern, computed in float32) in the
two dense layouts of the ``(N, C, L)`` view: contiguous ``(N, C, L)`` and channels innermost
(``channels_last``, ``(N, C)``), for training forward, backward and evaluation. By default they
run only where they measured faster than ATen (:data:`MEASURED_KERNEL_CASES`), with outputs on
huge pages (:mod:`batchnorm.backends.memory`); every other case goes to the ATen backend
(float16 and other strides always do), and tensors under ``torch.func`` transforms (whose
storage Numba cannot see) to the pure-torch backend, which those transforms differentiate and
batch.

Every call decides from sizes and strides alone (:func:`kernel_layout`) and makes NumPy views
only when a kernel runs: once a large tensor has flushed the caches, each torch or NumPy
operation costs microseconds, which is what a call that ATen runs pays on top of ATen.

The first call for each dtype and layout compiles its kernels (a few seconds; ``cache=True``
keeps the machine code in ``__pycache__`` for later processes).

Raises:
    ImportError: on import, if Numba is not installed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numba
import numpy as np
import torch

from batchnorm.backends.aten_backend import (
    AtenBackend,
    any_requires_grad,
    channel_rows,
    native_operand,
    torch_inference,
)
from batchnorm.backends.base import ForwardResult, channel_view, compute_dtype
from batchnorm.backends.memory import ADVISE_FROM_BYTES, empty_like
from batchnorm.backends.torch_backend import TorchBackend
from batchnorm.kernels import cpu_numba

__all__ = ["NumbaBackend"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
#: Dtypes ``Tensor.numpy()`` does not take.
_NUMPY_LESS = (torch.bfloat16,)
#: Fewest elements worth a thread of their own (ATen's ``at::internal::GRAIN_SIZE``).
_GRAIN = 32768


def _as_array(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of ``t``'s memory; bfloat16 as its ``uint16`` bit pattern."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def kernel_layout(x: torch.Tensor) -> str | None:
    """The layout the kernels would read ``x`` ``(N, C, *)`` in, from its strides alone.

    No view or array is made (this runs on every call, where a cold ``numpy()`` conversion
    costs more than the decision is worth).

    Returns:
        ``"ncl"`` when ``x`` is contiguous with more than one value per (sample, channel), so its
        ``(N, C, L)`` view is dense; ``"rows"`` when its channels are innermost and the rest is
        dense (channels_last of any rank, ``(N, C)``), so it is an ``(M, C)`` matrix; ``None``
        when the kernels cannot take it (device, dtype or other strides).
    """
    if x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES:
        return None
    sizes, strides = x.shape, x.stride()
    length = 1
    for size in sizes[2:]:
        length *= size
    if x.is_contiguous() and length > 1:
        return "ncl"
    expected = sizes[1]  # channels innermost: the last spatial dim steps over C values
    for dim in (*range(len(sizes) - 1, 1, -1), 0):
        if sizes[dim] != 1 and strides[dim] != expected:
            return None
        expected *= sizes[dim]
    return "rows" if sizes[1] == 1 or strides[1] == 1 else None


def _kernel_array(x: torch.Tensor, layout: str) -> np.ndarray:
    """The NumPy array the kernels read for ``x`` ``(N, C, L)`` in ``layout`` (shared memory).

    Returns:
        ``x`` itself as ``(N, C, L)`` for ``"ncl"``, its ``(M, C)`` matrix for ``"rows"``.
    """
    if layout == "ncl":
        return _as_array(x)  # (N, C, L)
    return _as_array(channel_rows(x))  # type: ignore[arg-type]  # (M, C)


#: A case of the kernels: (pass, layout, dtype), pass "forward", "backward" or "inference",
#: layout "ncl" (contiguous (N, C, L)) or "rows" (channels innermost, (M, C)).
KernelCase = tuple[str, str, torch.dtype]
#: Every case the kernels implement, each from the smallest input (1 byte).
ALL_KERNEL_CASES: Mapping[KernelCase, int] = {
    (pass_name, layout, dtype): 1
    for pass_name in ("forward", "backward", "inference")
    for layout in ("ncl", "rows")
    for dtype in _KERNEL_DTYPES
}
#: Input bytes from which each output is a fresh ``mmap`` for glibc's allocator (its largest
#: dynamic mmap threshold, 32 MiB on 64-bit Linux): ATen then pays a page fault per 4 KiB of
#: output, the kernels' huge-page outputs one per 2 MiB (:mod:`batchnorm.backends.memory`).
FRESH_MAPPING_BYTES = ADVISE_FROM_BYTES
#: Where the kernels measured faster than ATen's, case → smallest input in bytes. Whole calls:
#: ``benchmarks/cpu.py --threads 1`` (2-core Xeon, 2026-11-26, ``benchmarks/results/``); kernels
#: alone: ``benchmarks/cpu_kernels.py``.
#:
#: * contiguous (N, C, L) float32/float64 training forward, whose channel slice is re-read from
#:   L2: 1.5–2.5× ATen from 512 KiB (kernel alone 2.6–4.7×; below 512 KiB Numba's call
#:   overhead is more than it saves);
#: * contiguous float32 backward from 512 KiB (kernel alone 1.05–2.1×, 1.0–1.1× whole calls on
#:   mid-sized inputs) and bfloat16 backward from 2 MiB (1.0–2.0×: ATen's bfloat16 backward of
#:   this layout is slow; :meth:`NumbaBackend.native_forward` keeps ATen's forward for it);
#: * every float32 pass in both layouts once outputs are fresh mappings (64×64×56×56: 1.4–2.5×,
#:   mostly page faults avoided).
#:
#: Elsewhere ATen's kernels were as fast or faster, so they run there: the bfloat16 forward
#: (kernel alone 0.9–1.1×), the (M, C) layout of mid-sized inputs, inference below 32 MiB.
MEASURED_KERNEL_CASES: Mapping[KernelCase, int] = {
    ("forward", "ncl", torch.float32): 1 << 19,
    ("forward", "ncl", torch.float64): 1 << 19,
    ("backward", "ncl", torch.float32): 1 << 19,
    ("backward", "ncl", torch.bfloat16): 2 << 20,
    ("forward", "rows", torch.float32): FRESH_MAPPING_BYTES,
    ("backward", "rows", torch.float32): FRESH_MAPPING_BYTES,
    ("inference", "ncl", torch.float32): FRESH_MAPPING_BYTES,
    ("inference", "rows", torch.float32): FRESH_MAPPING_BYTES,
}


def _is_transformed(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` wrapper (vmap/grad), whose storage Numba cannot read."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an operation on these tensors."""
    return torch.is_grad_enabled() and any_requires_grad(*tensors)


def _per_channel_float64(channels: int, *pairs: tuple[torch.Tensor | None, float]) -> np.ndarray:
    """Each ``(values, fill)`` as a row of float64: ``values`` ``(C,)`` converted, or ``C``
    copies of ``fill`` where ``values`` is None; returns ``(len(pairs), C)``.

    The conversion runs in NumPy on views of the tensors: once a large tensor has flushed the
    caches, each torch operation costs 10–20 µs a call, a NumPy one a few.
    """
    rows = np.empty((len(pairs), channels))  # (k, C) float64
    for row, (values, fill) in enumerate(pairs):
        if values is None:
            rows[row] = fill
        elif values.dtype in _NUMPY_LESS:
            rows[row] = values.detach().float().numpy()
        else:
            rows[row] = values.detach().numpy() if values.requires_grad else values.numpy()
    return rows


def _stats_tensors(stats: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The rows of a float64 ``(k, C)`` array as ``(C,)`` tensors of ``dtype`` (float32/64)."""
    converted = stats if dtype == torch.float64 else stats.astype(np.float32)  # (k, C)
    return torch.from_numpy(converted).unbind(0)  # (not iter(): a Python loop per row)


#: The Numba thread count :func:`_launch` last set, per calling thread.
_NUMBA_THREADS = threading.local()


def _launch(kernel: Callable[..., None], work: int, *args: Any) -> None:
    """Runs ``kernel(*args)`` on up to ``torch.get_num_threads()`` threads.

    Each thread gets at least :data:`_GRAIN` elements of ``work``, like ATen's grain size: a
    small tensor runs on the calling thread, without waking (or waiting for) the pool. Numba's
    OpenMP layer shares the OpenMP runtime with torch, and starting its pool resets the
    runtime's thread count; torch's setting is restored if that happened.
    """
    threads = torch.get_num_threads()
    pool_size = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    wanted = max(1, min(threads, pool_size, work // _GRAIN))
    # Numba's count is per calling thread; set it only when it changes (the call is slow).
    if getattr(_NUMBA_THREADS, "count", None) != wanted:
        numba.set_num_threads(wanted)
        _NUMBA_THREADS.count = wanted
    kernel(*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class NumbaBackend:
    """Batch normalization on Numba CPU kernels, ATen or pure torch otherwise (see above)."""

    name = "numba"

    def __init__(self, kernel_cases: Mapping[KernelCase, int] | None = None):
        """Chooses where the kernels run.

        Args:
            kernel_cases: ``(pass, layout, dtype)`` → the smallest input (bytes) the Numba
                kernels take in that case, the rest going to ATen; default
                :data:`MEASURED_KERNEL_CASES`. :data:`ALL_KERNEL_CASES` runs them wherever
                they can (the tests do, to check every kernel).
        """
        self.kernel_cases = MEASURED_KERNEL_CASES if kernel_cases is None else kernel_cases
        # (pass, dtype) → smallest input of any layout: one dict lookup turns most calls away.
        self._smallest: dict[tuple[str, torch.dtype], int] = {}
        for (pass_name, _layout, dtype), smallest in self.kernel_cases.items():
            key = (pass_name, dtype)
            self._smallest[key] = min(smallest, self._smallest.get(key, smallest))
        self._aten = AtenBackend()
        self._torch = TorchBackend()

    def _may_run(self, pass_name: str, x: torch.Tensor) -> bool:
        """Whether the kernels may take ``x`` in this pass by its dtype and size (layout aside)."""
        smallest = self._smallest.get((pass_name, x.dtype))
        return smallest is not None and 0 < x.numel() * x.element_size() >= smallest

    def _kernel_layout(self, pass_name: str, x: torch.Tensor) -> str | None:
        """:func:`kernel_layout` of ``x`` ``(N, C, *)`` if the kernels run this case, else None."""
        if not self._may_run(pass_name, x):  # one dict lookup: most calls end here
            return None
        layout = kernel_layout(x)
        return layout if layout is not None and self._takes(pass_name, layout, x) else None

    def _takes(self, pass_name: str, layout: str, x: torch.Tensor) -> bool:
        """Whether the kernels run ``pass_name`` on ``x`` read in ``layout`` (by size)."""
        smallest = self.kernel_cases.get((pass_name, layout, x.dtype))
        return smallest is not None and x.numel() * x.element_size() >= smallest

    def _runs_kernels(
        self, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> bool:
        """Whether a training call on ``input`` ``(N, C, *)`` runs a Numba kernel.

        True when the forward kernel takes ``input``, or the backward kernel does and autograd
        will differentiate the call; False under ``torch.func`` transforms (pure torch there).
        """
        if _is_transformed(input):
            return False
        if self._kernel_layout("forward", input) is not None:
            return True
        return self._kernel_layout("backward", input) is not None and _needs_grad(
            input, weight, bias
        )

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> ForwardResult:
        """Training-mode forward on the ``(N, C, L)`` view; see :class:`Backend`."""
        if _is_transformed(x):
            return self._torch.forward(x, weight, bias, eps)
        layout = self._kernel_layout("forward", x)
        if layout is None:
            return self._aten.forward(x, weight, bias, eps)
        is_rows = layout == "rows"
        array = _kernel_array(x, layout)  # (N, C, L) or (M, C)
        channels = x.shape[1]
        y = empty_like(x)  # (N, C, L), strides of x (dense), huge pages
        y_array = _as_array(channel_rows(y) if is_rows else y)  # type: ignore[arg-type]
        stats = np.empty((3, channels))  # rows: mean, var, invstd, (C,) each
        mean, var, invstd = stats
        kernel = cpu_numba.forward_mc if is_rows else cpu_numba.forward_ncl
        _launch(
            kernel,
            x.numel(),
            array,
            *_per_channel_float64(channels, (weight, 1.0), (bias, 0.0)),
            float(eps),
            y_array,
            mean,
            var,
            invstd,
        )
        mean_t, var_t, invstd_t = _stats_tensors(stats, compute_dtype(x.dtype))  # (C,) each
        return ForwardResult(y, mean_t, invstd_t, var_t)

    def forward_update(
        self,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
        in_place: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """:meth:`AtenBackend.forward_update` where ATen runs the whole call, else ``None``.

        Where a Numba kernel runs the forward, or the backward of a call autograd will
        differentiate, ``None`` sends the call to the generic path (our autograd function,
        :meth:`forward`, :meth:`backward`).
        """
        if self._runs_kernels(input, weight, bias):
            return None
        return self._aten.forward_update(
            input, weight, bias, running_mean, running_var, momentum, eps, in_place
        )

    def native_forward(
        self,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
    ) -> bool:
        """Whether a training call should run ATen's forward kernel and this backend's backward.

        That is the case where only the backward kernel takes ``input`` (bfloat16 ``(N, C, L)``
        from 2 MiB: ATen's own backward of that layout is slow, its forward is not) and ATen's
        kernel takes the tensors as they are. The caller then runs
        :func:`batchnorm.autograd.native_forward_train`: one ATen forward that also moves the
        running buffers, instead of the generic path's separate statistics and update.

        Args:
            input: the checked input ``(N, C, *)``.
            weight, bias, running_mean, running_var: the checked per-channel tensors or None.
        """
        # Cheapest refusal first: this runs before every training call.
        layout = self._kernel_layout("backward", input)
        if layout != "ncl" or self._takes("forward", layout, input) or _is_transformed(input):
            return False
        if (running_mean is None) != (running_var is None) or not _needs_grad(input, weight, bias):
            return False
        native = native_operand(input, weight, bias, running_mean, running_var)
        return native is not None and not native[1]

    def inference(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """Evaluation-mode forward on ``(N, C, *)``; see :meth:`AtenBackend.inference`.

        The kernels compute ``(x − μ)·γr + β`` (no cancellation when ``|μ| ≫ σ``) in one pass;
        when autograd needs the graph (gradients in evaluation mode) ATen's kernel runs instead.
        """
        if _is_transformed(x):
            y3 = torch_inference(channel_view(x), weight, bias, running_mean, running_var, eps)
            return y3.reshape(x.shape)
        # ATen's kernel is differentiable (gradients in evaluation mode); ours is not.
        layout = self._kernel_layout("inference", x)
        if layout is None or _needs_grad(x, weight, bias):
            return self._aten.inference(x, weight, bias, running_mean, running_var, eps)
        is_rows = layout == "rows"
        x3 = channel_view(x)  # (N, C, L), a view for the dense layouts the kernels take
        array = _kernel_array(x3, layout)  # (N, C, L) or (M, C)
        channels = x.shape[1]
        y3 = empty_like(x3)  # (N, C, L), strides of x3 (dense), huge pages
        kernel = cpu_numba.inference_mc if is_rows else cpu_numba.inference_ncl
        _launch(
            kernel,
            x.numel(),
            array,
            *_per_channel_float64(
                channels, (weight, 1.0), (bias, 0.0), (running_mean, 0.0), (running_var, 1.0)
            ),
            float(eps),
            _as_array(channel_rows(y3) if is_rows else y3),  # type: ignore[arg-type]
        )
        return y3.reshape(x.shape)

    def backward(
        self,
        dy: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        mean: torch.Tensor,
        invstd: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backward of :meth:`forward`; see :class:`Backend`."""
        if _is_transformed(x) or _is_transformed(dy):
            return self._torch.backward(dy, x, weight, mean, invstd)
        layout = self._kernel_layout("backward", x)
        if layout is None:
            return self._aten.backward(dy, x, weight, mean, invstd)
        is_rows = layout == "rows"
        array = _kernel_array(x, layout)  # (N, C, L) or (M, C)
        channels = x.shape[1]
        dx = empty_like(x)  # (N, C, L), strides of x (dense), huge pages
        dy = dy.to(x.dtype)  # autograd hands dy in y's dtype, which is x's
        if is_rows:
            dy_array = _as_array(dy.transpose(1, 2).contiguous().view(array.shape))  # (M, C)
            dx_array = _as_array(channel_rows(dx))  # type: ignore[arg-type]  # (M, C)
        else:
            dy_array = _as_array(dy.contiguous())  # (N, C, L)
            dx_array = _as_array(dx)  # (N, C, L)
        grads = np.empty((2, channels))  # rows: dweight, dbias, (C,) each
        dweight, dbias = grads
        kernel = cpu_numba.backward_mc if is_rows else cpu_numba.backward_ncl
        _launch(
            kernel,
            x.numel(),
            dy_array,
            array,
            *_per_channel_float64(channels, (weight, 1.0), (mean, 0.0), (invstd, 1.0)),
            dx_array,
            dweight,
            dbias,
        )
        dweight_t, dbias_t = _stats_tensors(grads, compute_dtype(x.dtype))  # (C,) each
        return dx, dweight_t, dbias_t
