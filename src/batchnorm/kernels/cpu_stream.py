"""Launching the streaming CPU kernels (``cpu_stream.c``) over tensors' memory.

The C extension ``batchnorm.kernels._cpu_stream`` reads each pass's input in memory order and
writes its output with streaming (non-temporal) stores, which skip the read for ownership a
plain store makes of every line it writes (see the C file). It is built with the package where a
C compiler is present and runs where the CPU has AVX-512 F/BW/VL (:data:`SUPPORTED`); elsewhere
the Numba kernels (:mod:`batchnorm.kernels.cpu_numba`) and ATen run every pass.

On one thread (:func:`single_call`) a whole pass is one C call: :func:`train_forward`,
:func:`train_backward`, :func:`inference`. On several, the caller combines the parts:
:func:`moments_ncl` and :func:`grad_sums_ncl` split the samples, :func:`affine` and :func:`grad`
the values, into contiguous ranges, one per thread (at least :data:`GRAIN` values each, like
ATen's grain size); the calling thread runs the first range and a pool the rest (the C
functions release the GIL). Output ranges start on multiples of 64 values, so each thread
writes whole cache lines.

Tensors come as addresses (the caller checks that they are dense, float32 or bfloat16, of one
layout: ``(N, C, L)`` or ``(M, C)`` with channels innermost); the per-channel values as float32
arrays (NumPy rows or tensors' memory).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from types import ModuleType

import numpy as np

_extension: ModuleType | None
try:
    from batchnorm.kernels import _cpu_stream as _extension
except ImportError:  # not built (no compiler at install, or another platform)
    _extension = None

__all__ = [
    "GRAIN",
    "SUPPORTED",
    "affine",
    "grad",
    "grad_sums_ncl",
    "inference",
    "moments_ncl",
    "single_call",
    "train_backward",
    "train_forward",
]

#: Whether the extension is built and this CPU runs it.
SUPPORTED: bool = _extension is not None and bool(_extension.SUPPORTED)
#: Fewest values worth a thread of their own (ATen's ``at::internal::GRAIN_SIZE``).
GRAIN = 32768
#: Range boundaries fall on multiples of this many values (whole 64-byte lines).
_ALIGN_VALUES = 64

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    """The shared pool (one thread per core at most, started as calls need them)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="batchnorm-stream"
            )
        return _pool


def _forget_pool_after_fork() -> None:
    """In a forked child the parent's pool has no threads (it would wait forever): start anew."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _ranges(total: int, threads: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges covering ``total`` values, one per thread (≥ :data:`GRAIN` each)."""
    parts = max(1, min(threads, total // GRAIN))
    step = -(-total // parts)  # ceil
    step = -(-step // _ALIGN_VALUES) * _ALIGN_VALUES
    return [(start, min(start + step, total)) for start in range(0, total, step)]


def _run(
    function: Callable[..., None],
    head: tuple[object, ...],
    ranges: list[tuple[int, int]],
    tail: tuple[object, ...],
) -> None:
    """Calls ``function(*head, start, end, *tail)`` for each range, in parallel when several."""
    _run_all(function, [(*head, start, end, *tail) for start, end in ranges])


def affine(
    x: int,
    y: int,
    total: int,
    run: int,
    channels: int,
    is_bf16: bool,
    params: np.ndarray,
    threads: int,
) -> None:
    """``y = (x − shift)·scale + offset`` per channel, with streaming stores.

    Args:
        x, y: addresses of the input and the output (dense, of one layout and dtype).
        total: values in each.
        run: ``L`` for ``(N, C, L)`` arrays, 0 for ``(M, C)`` ones (channels innermost).
        channels: ``C``.
        is_bf16: bfloat16 values (else float32).
        params: float32 ``(3, C)``, C-contiguous: rows ``shift``, ``scale``, ``offset``.
        threads: most threads to use.
    """
    shift, scale, offset = _param_addresses(params, 3)
    tail = (run, channels, is_bf16, shift, scale, offset)
    _run(_extension.affine, (x, y), _ranges(total, threads), tail)  # type: ignore[union-attr]


def grad(
    dy: int,
    x: int,
    dx: int,
    total: int,
    run: int,
    channels: int,
    is_bf16: bool,
    params: np.ndarray,
    threads: int,
) -> None:
    """``dx = gain·((dy − mean_term) − (x − mean)·slope)`` per channel, with streaming stores.

    Args:
        dy, x, dx: addresses of the incoming gradient, the input and the output (dense, of one
            layout and dtype).
        total, run, channels, is_bf16, threads: as in :func:`affine`.
        params: float32 ``(4, C)``, C-contiguous: rows ``mean``, ``gain`` (``γ·r``),
            ``mean_term`` (``dβ/M``), ``slope`` (``r·dγ/M``).
    """
    tail = (run, channels, is_bf16, *_param_addresses(params, 4))
    _run(_extension.grad, (dy, x, dx), _ranges(total, threads), tail)  # type: ignore[union-attr]


def _row_addresses(array: np.ndarray) -> tuple[int, ...]:
    """The addresses of the rows of a C-contiguous 2D array."""
    base, row_bytes = array.ctypes.data, array.strides[0]
    return tuple(base + row * row_bytes for row in range(array.shape[0]))


def _param_addresses(params: np.ndarray, rows: int) -> tuple[int, ...]:
    """The row addresses of float32 ``params`` ``(rows, C)``, checked."""
    if params.dtype != np.float32 or params.shape[0] != rows or not params.flags.c_contiguous:
        raise ValueError(f"params: expected a C-contiguous float32 array of {rows} rows")
    return _row_addresses(params)


def _sample_ranges(n_batch: int, values_per_sample: int, threads: int) -> list[tuple[int, int]]:
    """``[n0, n1)`` sample ranges of equal length (the last shorter), one per thread."""
    parts = max(1, min(threads, n_batch, n_batch * values_per_sample // GRAIN))
    step = -(-n_batch // parts)  # ceil
    return [(start, min(start + step, n_batch)) for start in range(0, n_batch, step)]


def moments_ncl(
    x: int, shape: tuple[int, int, int], is_bf16: bool, threads: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per channel mean and ``M2 = Σ (x − mean)²`` of ``x`` ``(N, C, L)``, by ranges of samples.

    One read of ``x`` in memory order: each run of ``L`` values is summed twice while in L1 (its
    mean, then ``M2`` about it) and merged into its channel's by Chan's rule (float64).

    Args:
        x: address of a dense ``(N, C, L)`` float32 or bfloat16 array.
        shape: ``(N, C, L)``.
        is_bf16: bfloat16 values (else float32).
        threads: most threads to use.

    Returns:
        ``(mean, m2, samples)``: float64 ``(P, C)`` each, part ``p`` covering samples
        ``[p·samples, (p + 1)·samples)`` (the last part may be shorter); merge them with
        :func:`batchnorm.kernels.cpu_numba.merge_moments` (``rows = samples·L``).
    """
    n_batch, channels, length = shape
    ranges = _sample_ranges(n_batch, channels * length, threads)
    mean = np.empty((len(ranges), channels))  # (P, C)
    m2 = np.empty((len(ranges), channels))  # (P, C)
    calls = [
        (x, n0, n1, channels, length, is_bf16, mean[p].ctypes.data, m2[p].ctypes.data)
        for p, (n0, n1) in enumerate(ranges)
    ]
    _run_all(_extension.moments_ncl, calls)  # type: ignore[union-attr]
    return mean, m2, ranges[0][1] - ranges[0][0]


def grad_sums_ncl(
    dy: int, x: int, shape: tuple[int, int, int], is_bf16: bool, mean: np.ndarray, threads: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per channel ``Σ dy`` and ``Σ dy·(x − μ)`` of ``(N, C, L)`` arrays, in memory order.

    Args:
        dy, x: addresses of dense ``(N, C, L)`` arrays of one dtype (float32 or bfloat16).
        shape: ``(N, C, L)``.
        is_bf16: bfloat16 values (else float32).
        mean: float32 ``(C,)``, ``μ``.
        threads: most threads to use.

    Returns:
        ``(sum_dy, sum_dy_xmu)``, float64 ``(C,)`` each.
    """
    n_batch, channels, length = shape
    if mean.dtype != np.float32 or not mean.flags.c_contiguous:
        raise ValueError("mean: expected a C-contiguous float32 array")
    ranges = _sample_ranges(n_batch, channels * length, threads)
    sums = np.zeros((len(ranges), 2, channels))  # (P, 2, C) float64: Σ dy, Σ dy·(x − μ)
    calls = [
        (dy, x, n0, n1, channels, length, is_bf16, mean.ctypes.data, *_row_addresses(sums[p]))
        for p, (n0, n1) in enumerate(ranges)
    ]
    _run_all(_extension.grad_sums_ncl, calls)  # type: ignore[union-attr]
    total = sums.sum(axis=0)  # (2, C)
    return total[0], total[1]


def _run_all(function: Callable[..., None], calls: list[tuple[object, ...]]) -> None:
    """Calls ``function(*args)`` for each argument tuple, in parallel when several.

    Returns only once every call has finished, even when interrupted (``KeyboardInterrupt``):
    the calls hold raw addresses of the caller's tensors, which must outlive them.
    """
    if len(calls) == 1:
        function(*calls[0])
        return
    pool = _executor()
    futures = [pool.submit(function, *args) for args in calls[1:]]
    try:
        function(*calls[0])
    finally:
        _wait_through_interrupts(futures)
    for future in futures:
        future.result()  # re-raises a worker's exception


def _wait_through_interrupts(futures: list[Future[None]]) -> None:
    """Waits for ``futures``; an interrupt during the wait is re-raised once they are done."""
    interrupted: BaseException | None = None
    while True:
        try:
            wait(futures)
            break
        except KeyboardInterrupt as error:  # keep waiting: the workers use the caller's memory
            interrupted = error
    if interrupted is not None:
        raise interrupted


def single_call(total: int, threads: int) -> bool:
    """Whether a pass over ``total`` values runs on one thread (then one C call does it all)."""
    return len(_ranges(total, threads)) == 1


def train_forward(
    x: int,
    y: int,
    rows: int,
    channels: int,
    run: int,
    is_bf16: bool,
    weight: int,
    bias: int,
    eps: float,
    momentum: float,
    running: tuple[int, int],
    stats_out: tuple[int, int],
) -> None:
    """The whole training forward on the calling thread, in one C call.

    Statistics in memory order (as :func:`moments_ncl`, or by blocks of rows for ``(M, C)``),
    ``y = (x − μ)·γr + β`` streamed, ``μ`` and ``r`` written out, the running buffers moved in
    place (``running ← (1 − momentum)·running + momentum·batch``, unbiased variance).

    Args:
        x, y: addresses of the input and the output (dense, of one layout and dtype).
        rows: ``N`` for ``(N, C, L)`` (``run`` = ``L``), ``M`` for ``(M, C)`` (``run`` = 0).
        channels: ``C``.
        run: ``L``, or 0 for channels innermost.
        is_bf16: bfloat16 values (else float32).
        weight, bias: addresses of float32 ``(C,)`` arrays, 0 for none.
        eps: added to the variance inside the square root.
        momentum: the running-average factor.
        running: addresses of the float32 running mean and variance ``(C,)``, ``(0, 0)`` for
            none.
        stats_out: addresses of float32 ``(C,)`` arrays that receive ``μ`` and ``r``.

    Raises:
        MemoryError: if the C code's scratch memory (a few values per channel) cannot be had.
    """
    _extension.train_forward(  # type: ignore[union-attr]
        x, y, rows, channels, run, is_bf16, weight, bias, eps, momentum, *running, *stats_out
    )


def train_backward(
    dy: int,
    x: int,
    dx: int,
    rows: int,
    channels: int,
    run: int,
    is_bf16: bool,
    weight: int,
    stats: tuple[int, int],
    grads_out: tuple[int, int],
) -> None:
    """The whole backward on the calling thread, in one C call: sums, then ``dx`` streamed.

    Args:
        dy, x, dx: addresses of the incoming gradient, the input and the output (dense, of one
            layout and dtype).
        rows, channels, run, is_bf16, weight: as in :func:`train_forward`.
        stats: addresses of the float32 ``μ`` and ``r`` ``(C,)`` of the forward.
        grads_out: addresses of float32 ``(C,)`` arrays that receive ``dγ`` and ``dβ``.

    Raises:
        MemoryError: as :func:`train_forward`.
    """
    _extension.train_backward(  # type: ignore[union-attr]
        dy, x, dx, rows, channels, run, is_bf16, weight, *stats, *grads_out
    )


def inference(
    x: int,
    y: int,
    total: int,
    run: int,
    channels: int,
    is_bf16: bool,
    weight: int,
    bias: int,
    running: tuple[int, int],
    eps: float,
) -> None:
    """Evaluation on the calling thread, in one C call: ``y = (x − μ)·γ/sqrt(var + ε) + β``.

    Args:
        x, y, total, run, channels, is_bf16: as in :func:`affine`.
        weight, bias: addresses of float32 ``(C,)`` arrays, 0 for none.
        running: addresses of the float32 running mean and variance ``(C,)``.
        eps: added to the variance inside the square root.

    Raises:
        MemoryError: as :func:`train_forward`.
    """
    _extension.inference(  # type: ignore[union-attr]
        x, y, total, run, channels, is_bf16, weight, bias, *running, eps
    )
