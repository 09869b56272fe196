"""The ``cpu`` backend: cache-aware CPU kernels, ATen's where those are faster.

Two sets of kernels cover the two dense layouts of the ``(N, C, L)`` view, contiguous
``(N, C, L)`` and channels innermost (``channels_last``, ``(N, C)``: an ``(M, C)`` matrix), for
training forward, backward and evaluation:

* the streaming kernels (:mod:`batchnorm.kernels.cpu.cpu_stream`, C with AVX-512 or AVX2 + FMA,
  built with the package where a compiler is present) for float32 and bfloat16: each pass reads its
  input in memory order (statistics of each run of ``L`` values, or of each block of rows, while it
  is in cache, merged per channel by Chan's rule), writes its output with streaming stores and is
  one C call, the training forward moving the running buffers itself; on several threads the call
  splits the rows over a team of torch's own OpenMP runtime (:data:`cpu_stream.THREADED`);
* Numba's fused kernels (:mod:`batchnorm.kernels.cpu.cpu_numba`), parallel over ``torch``'s thread
  count, for float64 and where the streaming kernels do not run (not built, neither AVX-512 nor
  AVX2, or several threads without torch's OpenMP runtime).

By default (``CpuBackend()``, what ``auto`` runs) they run only where they measured faster
than ATen *on this machine, at this thread count* (:mod:`batchnorm.backends.calibration`): a
table stored by ``batchnorm calibrate`` (for the run length it swept), else a measurement on the
first call of each case and shape class (size and run length; about 0.1–0.6 s once, stored for
later calls and processes), else, and for inputs
under 64 KiB, the committed tables of :mod:`batchnorm.backends.measured` (``MEASURED_KERNEL_CASES``
on one thread, ``MEASURED_THREADED_CASES`` on several, ``MEASURED_NUMBA_CASES`` for Numba's
kernels alone, each with the machine and command it was measured with; two threads at most).
:func:`explain` says which kernel an input takes and why. ``BATCHNORM_CALIBRATE=0`` measures
nothing (a stored table still routes; the committed ones otherwise): which kernel runs changes the
rounding of the result (within the dtype's tolerance), so bitwise-reproducible runs should set
it. An explicit table (``CpuBackend(ALL_KERNEL_CASES)``, ``CpuBackend({})``) is used as given,
nothing measured. Outputs land on huge pages (:mod:`batchnorm.backends.memory`); every other
case goes to the ATen backend (float16 and other strides always do), and tensors under
``torch.func`` transforms (whose storage the kernels cannot see) to the pure-torch backend, which
those transforms differentiate and batch.

A training call the kernels take in either direction runs through
:meth:`CpuBackend.native_batch_norm` (:func:`batchnorm.autograd.native_forward_train`): one
forward on the input as given, running update included, like ``F.batch_norm``'s, and this
backend's backward.

Every call decides from sizes and strides alone (:func:`kernel_layout`) and makes views or
arrays only when a kernel runs: once a large tensor has flushed the caches, each torch or NumPy
operation costs microseconds, which is what a call that ATen runs pays on top of ATen.

The first call for each dtype and layout of the Numba kernels compiles them (a few seconds;
``cache=True`` keeps the machine code in ``__pycache__`` for later processes); the C extension is
compiled when the package is installed (about 7 s).

Without Numba the C kernels run alone (float32, bfloat16); without either the backend is
unavailable (``auto`` takes ATen's).

Why this file is long: the routing of every (pass, layout, dtype) case (and its explanation)
and the NumPy/C calls of the three passes in both layouts belong to the one class that owns the
CPU's whole call.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from batchnorm import _compat
from batchnorm.backends import calibration
from batchnorm.backends.aten_backend import (
    AtenBackend,
    any_requires_grad,
    channel_rows,
    kernel_buffers,
    native_operand,
    rows_as_input,
    statistics_weight,
    torch_inference,
)
from batchnorm.backends.base import (
    Backend,
    BatchNormOutput,
    Call,
    ForwardResult,
    Gradients,
    Saved,
    channel_view,
    compute_dtype,
    plain_evaluation,
)
from batchnorm.backends.calibration import RoutingTable, Timing
from batchnorm.backends.measured import (
    ALL_KERNEL_CASES,
    CPU_KERNELS_ONE_THREAD,
    CPU_KERNELS_THREADED,
    CPU_NUMBA_ONLY,
    MEASURED_KERNEL_CASES,
    MEASURED_NUMBA_CASES,
    MEASURED_THREADED_CASES,
    KernelCase,
    Measured,
)
from batchnorm.backends.memory import empty_like
from batchnorm.backends.native import native_forward_train
from batchnorm.backends.torch_backend import TorchBackend
from batchnorm.kernels.cpu import cpu_stream


def _optional(name: str) -> Any:
    """The module ``name``, or ``None`` where it (or Numba, which it needs) is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# Optional (the ``cpu`` extra): float64, and float32 where the C kernels do not run.
numba = _optional("numba")
cpu_numba: Any = _optional("batchnorm.kernels.cpu.cpu_numba") if numba is not None else None

__all__ = ["CpuBackend", "Explanation", "explain"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
#: Dtypes ``Tensor.numpy()`` does not take.
_NUMPY_LESS = (torch.bfloat16,)
#: Fewest elements worth a thread of their own (ATen's ``at::internal::GRAIN_SIZE``).
_GRAIN = 32768
#: Running-buffer dtypes the kernels' training forward moves in place (through NumPy).
_BUFFER_DTYPES = (torch.float32, torch.float64)
#: Dtypes whose output passes the streaming-store extension writes (where it runs).
_STREAM_DTYPES = (torch.float32, torch.bfloat16)


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


#: :meth:`CpuBackend._kernel_layout`'s memo has no entry (None is an entry: ATen).
_UNROUTED = object()
#: Entries the memo holds before it starts again (a few hundred bytes each).
_MAX_ROUTES = 4096


def _settled(table: RoutingTable, pass_name: str, x: torch.Tensor) -> bool:
    """Whether ``x``'s route in ``pass_name`` stays what ``table`` says until it changes: no
    kernel of ours takes the size, or a measurement (stored or lazy) decided its shape class.
    Otherwise (the committed cold start, a measurement still to come, the
    ``BATCHNORM_CALIBRATE`` switch) the route is worked out again on every call."""
    nbytes = x.numel() * x.element_size()
    smallest = table.smallest.get((pass_name, x.dtype))
    if smallest is None or not 0 < nbytes >= smallest:
        return True
    layout = kernel_layout(x)
    if layout is None:
        return True
    case = (pass_name, layout, x.dtype)
    return table.choice(case, nbytes, calibration.run_length(x.shape, layout)) is not None


def _is_transformed(*tensors: torch.Tensor) -> bool:
    """Whether a ``torch.func`` transform (vmap/grad) is active or a tensor is one's wrapper.

    The kernels cannot read a wrapper's storage (a parameter under ``grad``, a batched one under
    ``vmap``), and they do not tell a transform what they computed. Inside our autograd
    functions' forward and backward the transform they run under is no longer active, and the
    tensors are plain, so the kernels still run there.
    """
    if _compat.functorch_active():
        return True
    for tensor in tensors:  # noqa: SIM110  (a loop: any() over a generator costs a frame)
        if _compat.functorch_wrapped(tensor):
            return True
    return False


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


def _float32_address(values: torch.Tensor | None, keep: list[torch.Tensor]) -> int:
    """The address of ``values`` ``(C,)`` as a dense float32 array (0 for None).

    A converted copy is appended to ``keep``, which the caller holds until the C call returns.
    """
    if values is None:
        return 0
    if values.dtype != torch.float32 or not values.is_contiguous():
        values = values.detach().float().contiguous()  # (C,)
        keep.append(values)
    return values.data_ptr()


def _float32_or_none(running_mean: torch.Tensor | None, running_var: torch.Tensor | None) -> bool:
    """Whether the running buffers are dense float32 (what the C calls move) or not given."""
    if running_mean is None or running_var is None:
        return running_mean is None and running_var is None
    return (
        running_mean.dtype == running_var.dtype == torch.float32
        and running_mean.is_contiguous()
        and running_var.is_contiguous()
    )


def _kernel_rows_and_run(x: torch.Tensor, is_rows: bool) -> tuple[int, int]:
    """``(rows, run)`` of the C calls: ``(M, 0)`` for an ``(M, C)`` matrix, ``(N, L)`` else."""
    channels = x.shape[1]
    if is_rows:
        return x.numel() // channels, 0
    return x.shape[0], x.numel() // (x.shape[0] * channels)


def _move_in_place(buffer: torch.Tensor, batch_stat: np.ndarray, momentum: float) -> None:
    """``buffer ← (1 − momentum)·buffer + momentum·batch_stat`` in place (float64 math).

    Args:
        buffer: a float32/float64 CPU buffer ``(C,)`` that does not require grad.
        batch_stat: the batch's float64 statistic ``(C,)``.
        momentum: the running-average factor.
    """
    values = buffer.numpy()  # (C,), shares the buffer's memory
    values[...] = (1.0 - momentum) * values + momentum * batch_stat


def _smallest_inputs(cases: Mapping[KernelCase, int]) -> dict[tuple[str, torch.dtype], int]:
    """(pass, dtype) → the smallest input of any layout a table's cases take."""
    smallest: dict[tuple[str, torch.dtype], int] = {}
    for (pass_name, _layout, dtype), size in cases.items():
        smallest[(pass_name, dtype)] = min(size, smallest.get((pass_name, dtype), size))
    return smallest


def _stream_cases(cases: Mapping[KernelCase, int]) -> dict[KernelCase, int]:
    """The cases of ``cases`` the C kernels run (their dtypes), for a machine without Numba."""
    return {case: size for case, size in cases.items() if case[2] in _STREAM_DTYPES}


def _stream_threads(x: torch.Tensor) -> int:
    """Threads for a streaming pass over ``x``: torch's count, each with :data:`_GRAIN` values."""
    return max(1, min(torch.get_num_threads(), x.numel() // _GRAIN))


def _warn_unmeasured(table: RoutingTable) -> None:
    """Says once per table that a thread count the committed tables were not measured at is
    routed by them, nothing being measured."""
    table.warned_unmeasured = True
    warnings.warn(
        f"batchnorm: nothing is measured (BATCHNORM_CALIBRATE=0 or deterministic algorithms) "
        f"and nothing measured on this machine at {table.threads} threads routes this call: "
        f"the committed table does ({table.committed_source}); run `batchnorm calibrate "
        f"--threads {table.threads}` to measure the kernels here",
        calibration.CalibrationWarning,
        stacklevel=6,
    )


def _launch(kernel: Callable[..., None], work: int, *args: Any) -> None:
    """Runs ``kernel(*args)`` on up to ``torch.get_num_threads()`` threads.

    Each thread gets at least :data:`_GRAIN` elements of ``work``, like ATen's grain size: a
    small tensor runs on the calling thread, without waking (or waiting for) the pool. Numba's
    OpenMP layer shares the OpenMP runtime with torch, and starting its pool resets the
    runtime's thread count; torch's setting is restored if that happened.
    """
    threads = torch.get_num_threads()
    pool_size = numba.config.NUMBA_NUM_THREADS
    wanted = max(1, min(threads, pool_size, work // _GRAIN))
    # Numba's count is per calling thread; set it only when it changes (the call is slow).
    if getattr(_NUMBA_THREADS, "count", None) != wanted:
        numba.set_num_threads(wanted)
        _NUMBA_THREADS.count = wanted
    kernel(*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class CpuBackend(Backend):
    """Batch normalization on our CPU kernels (C, Numba), ATen or pure torch otherwise (see above).

    Named ``cpu`` (``numba`` is an alias, for ``backend="numba"`` and ``BATCHNORM_BACKEND``); it
    runs without Numba installed: then the C kernels take float32 and bfloat16 and ATen the rest.

    Whole calls: plain training runs :meth:`native_batch_norm` with this backward where the
    kernels take the forward or the backward (:meth:`native_forward`), else ATen's one-call
    path (:meth:`forward_update`); plain evaluation :meth:`inference`; the rest (fused calls,
    inputs nobody takes as they are) goes to the generic path over :meth:`forward` and
    :meth:`backward`.
    """

    name = "cpu"

    def train(self, call: Call) -> BatchNormOutput | None:
        """Plain training on the kernels or in one ATen call; see :class:`Backend`."""
        if call.fusion is not None:
            if not self._fixed:  # the generic path's primitives measure nothing
                self._measure_training(call.input, call.weight, call.bias)
            return None
        input, weight, bias = call.input, call.weight, call.bias
        running_mean, running_var = call.running_mean, call.running_var
        if not self._may_run("forward", input) and not self._may_run("backward", input):
            # No kernel of ours takes this size (most small calls): ATen's one call, without
            # asking the routing again for each pass.
            return self._aten.forward_update(call)
        if self.native_forward(input, weight, bias, running_mean, running_var):
            new_mean, new_var = kernel_buffers(running_mean, running_var, call.update_in_place)
            weight = statistics_weight(input, weight, bias, running_mean, running_var)
            y = native_forward_train(
                input, weight, bias, new_mean, new_var, call.momentum, call.eps, self
            )
            return BatchNormOutput(y, new_mean, new_var)
        return self.forward_update(call)

    def evaluate(self, call: Call) -> torch.Tensor | None:
        """Plain evaluation on the kernels or ATen's; see :class:`Backend`."""
        return plain_evaluation(self.inference, call)

    def __init__(
        self, kernel_cases: Mapping[KernelCase, int] | None = None, streaming: bool | None = None
    ):
        """Chooses where the kernels run.

        Args:
            kernel_cases: ``(pass, layout, dtype)`` → the smallest input (bytes) the kernels
                take in that case, the rest going to ATen, on any number of threads, used as
                given (nothing measured). Default: routed by what was measured on this machine
                at the call's thread count (:mod:`batchnorm.backends.calibration`: a table
                stored by ``batchnorm calibrate``, else a measurement on first use), with
                :data:`MEASURED_KERNEL_CASES` on one thread and :data:`MEASURED_THREADED_CASES`
                on several (:data:`MEASURED_NUMBA_CASES` where Numba's kernels run instead of
                the streaming ones) as the cold start (:attr:`kernel_cases`,
                :attr:`threaded_kernel_cases`). ``BATCHNORM_CALIBRATE=0`` measures nothing:
                the chosen kernel changes the rounding of the result (within the dtype's
                tolerance), so bitwise-reproducible runs should set it.
                :data:`ALL_KERNEL_CASES` runs them wherever they can (the tests do, to check
                every kernel); ``{}`` nowhere (ATen behind the same checks).
            streaming: use the streaming-store kernels (:mod:`batchnorm.kernels.cpu.cpu_stream`)
                for float32/bfloat16: ``None`` where this machine runs them, ``False`` never
                (Numba's kernels alone).

        Raises:
            ValueError: if ``streaming`` is True and this build or CPU cannot run them, or
                False without Numba (then no kernel would be left).
            ImportError: when neither the C kernels nor Numba can run here (the registry then
                reports the backend as unavailable, with this reason; ``auto`` takes ATen).
        """
        if cpu_numba is None and not cpu_stream.SUPPORTED:
            raise ImportError(
                "the cpu backend needs its C kernels (built by pip install where a compiler is "
                "found, on a CPU with AVX-512 F/BW/VL or AVX2 with FMA) or numba "
                "(pip install 'batchnorm[cpu]')"
            )
        if cpu_numba is None and streaming is False:
            raise ValueError("streaming: False needs numba's kernels, and numba is not installed")
        if streaming and not cpu_stream.SUPPORTED:
            raise ValueError(
                "streaming: the streaming kernels are not built or this CPU has neither AVX-512 "
                "F/BW/VL nor AVX2 with FMA"
            )
        self.streaming = cpu_stream.SUPPORTED if streaming is None else streaming
        # Cases on one thread and on several (the streaming kernels' on torch's OpenMP team, or
        # Numba's).
        self.kernel_cases = (
            kernel_cases
            if kernel_cases is not None
            else MEASURED_KERNEL_CASES
            if self.streaming
            else MEASURED_NUMBA_CASES
        )
        self.threaded_kernel_cases = (
            kernel_cases
            if kernel_cases is not None
            else MEASURED_THREADED_CASES
            if self.streaming and cpu_stream.THREADED
            else MEASURED_NUMBA_CASES
        )
        if cpu_numba is None:  # without Numba only the C kernels' cases remain
            self.kernel_cases = _stream_cases(self.kernel_cases)
            self.threaded_kernel_cases = _stream_cases(
                self.threaded_kernel_cases if cpu_stream.THREADED else {}
            )
        # (pass, dtype) → smallest input of any layout, per table: one dict lookup turns most
        # calls away.
        self._smallest = {
            False: _smallest_inputs(self.kernel_cases),
            True: _smallest_inputs(self.threaded_kernel_cases),
        }
        # Tables given: used as they are. None: routed by what was measured on this machine,
        # one table per thread count (calibration.RoutingTable, shared by instances of a key).
        self._fixed = kernel_cases is not None
        self._tables: dict[int, RoutingTable] = {}
        self._measuring: tuple[CpuBackend, CpuBackend] | None = None
        self._aten = AtenBackend()
        self._torch = TorchBackend()

    def _may_run(self, pass_name: str, x: torch.Tensor) -> bool:
        """Whether the kernels may take ``x`` in this pass by its dtype and size (layout aside)."""
        threads = torch.get_num_threads()
        if self._fixed:
            smallest = self._smallest[threads > 1].get((pass_name, x.dtype))
            return smallest is not None and 0 < x.numel() * x.element_size() >= smallest
        table = self._tables.get(threads)
        if table is None:
            table = self.routing_table(threads)
        key = (pass_name, x.dtype)
        smallest = table.smallest.get(key)
        nbytes = x.numel() * x.element_size()
        if smallest is None or not 0 < nbytes >= smallest:
            return False
        if nbytes >= table.smallest_unmeasured.get(key, nbytes + 1):
            return True
        # Only a size a measurement could still give the kernels reads the switch.
        if calibration.calibrating():
            return True
        if table.threads > 2 and not table.warned_unmeasured:
            _warn_unmeasured(table)
        return False

    def _kernel_layout(self, pass_name: str, x: torch.Tensor, measure: bool = False) -> str | None:
        """:func:`kernel_layout` of ``x`` ``(N, C, *)`` if the kernels run this case, else None.

        ``measure``: a whole call's entry (:meth:`train`, :meth:`inference`), where a case
        nothing decided yet may be measured; the primitives (which the generic path calls
        inside our autograd functions, where a ``torch.func`` transform no longer shows) pass
        False and route such a case by the committed table.
        """
        if self._fixed:  # explicit tables: nothing measured, nothing memoized
            return self._route(pass_name, x, measure)
        threads = torch.get_num_threads()
        table = self._tables.get(threads)
        # One lookup for an input routed before (the shape and strides decide the layout, the
        # size and run length the route); see RoutingTable.routes for what is kept.
        key = (pass_name, x.dtype, x.shape, x.stride(), x.is_cpu)
        if table is not None:
            route = table.routes.get(key, _UNROUTED)
            if route is not _UNROUTED:
                return route  # type: ignore[return-value]
        layout = self._route(pass_name, x, measure)
        table = self._tables.get(threads)  # made by the first call
        if table is not None and _settled(table, pass_name, x):
            if len(table.routes) >= _MAX_ROUTES:  # e.g. a new sequence length each call
                table.routes.clear()
            table.routes[key] = layout
        return layout

    def _route(self, pass_name: str, x: torch.Tensor, measure: bool) -> str | None:
        """:meth:`_kernel_layout` worked out without the memo."""
        if not self._may_run(pass_name, x):  # one dict lookup: most calls end here
            return None
        layout = kernel_layout(x)
        if layout is None or not self._takes(pass_name, layout, x, measure):
            return None
        return layout

    def _measure_training(
        self, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> None:
        """Decides the training passes of ``input`` now (measuring where nothing did), for a
        call the generic path runs on the primitives."""
        if _is_transformed(input):
            return
        self._kernel_layout("forward", input, measure=True)
        if _needs_grad(input, weight, bias):
            self._kernel_layout("backward", input, measure=True)

    def _takes(self, pass_name: str, layout: str, x: torch.Tensor, measure: bool = False) -> bool:
        """Whether the kernels run ``pass_name`` on ``x`` read in ``layout`` (by size).

        Given tables decide alone; the default routing asks this thread count's
        :class:`~batchnorm.backends.calibration.RoutingTable` (stored threshold, lazy decision)
        and, with ``measure``, measures on first use where neither answers (:meth:`_decide`).
        """
        threads = torch.get_num_threads()
        nbytes = x.numel() * x.element_size()
        case = (pass_name, layout, x.dtype)
        if self._fixed:
            table = self.threaded_kernel_cases if threads > 1 else self.kernel_cases
            smallest = table.get(case)
            return smallest is not None and nbytes >= smallest
        routing = self._tables.get(threads)
        if routing is None:
            routing = self.routing_table(threads)
        run = calibration.run_length(x.shape, layout)
        choice = routing.choice(case, nbytes, run)
        if choice is not None:
            return choice
        return (
            self._decide(routing, case, nbytes, x)
            if measure
            else routing.unmeasured_choice(case, nbytes)
        )

    def _decide(
        self, routing: RoutingTable, case: KernelCase, nbytes: int, x: torch.Tensor
    ) -> bool:
        """The route of a case nothing measured here decides at this size: a lazy measurement
        where one may run (the training passes of a layout and dtype together), else the
        committed table.

        Nothing is measured below :data:`calibration.LAZY_MIN_BYTES`, for a case the kernels
        cannot run here, after a failed measurement of it, or where
        :func:`calibration.may_measure` says no (``BATCHNORM_CALIBRATE=0``, tracing,
        ``torch.func``, an OpenMP region, inside a measurement). With measuring switched off
        on more than two threads, where the committed tables were not measured, a
        :class:`calibration.CalibrationWarning` says once what routes instead.
        """
        if nbytes < calibration.LAZY_MIN_BYTES or case not in routing.measurable:
            return routing.unmeasured_choice(case, nbytes)
        if not calibration.calibrating():  # first: the one refusal that lasts (µs a call)
            if routing.threads > 2 and not routing.warned_unmeasured:
                _warn_unmeasured(routing)
            return routing.unmeasured_choice(case, nbytes)
        run = calibration.run_length(x.shape, case[1])
        failed = (case, calibration.shape_class(nbytes, run)) in routing.failed
        if failed or not calibration.may_measure(x):
            return routing.unmeasured_choice(case, nbytes)
        cases = [case]
        pass_name, layout, dtype = case
        if pass_name != "inference":  # forward and backward: one measurement
            other = ("backward" if pass_name == "forward" else "forward", layout, dtype)
            if other in routing.measurable and routing.choice(other, nbytes, run) is None:
                cases.append(other)
        measured = calibration.measure_lazily(
            routing, cases, nbytes, x.shape, self._measuring_backends
        )
        return routing.unmeasured_choice(case, nbytes) if measured is None else measured

    def _measuring_backends(self) -> tuple[CpuBackend, CpuBackend]:
        """``(our kernels everywhere, ATen behind the same checks)`` for measurements."""
        if self._measuring is None:
            self._measuring = (
                CpuBackend(ALL_KERNEL_CASES, streaming=self.streaming),
                CpuBackend({}),
            )
        return self._measuring

    def kernel_set(self) -> str:
        """Which kernels run, with versions, for the routing key: ``"c-avx512+numba-0.61.0"``
        (the C kernels' instruction set: each is measured on its own)."""
        parts = [f"c-{cpu_stream.isa()}"] if self.streaming else []
        if cpu_numba is not None:
            parts.append(f"numba-{numba.__version__}")
        return "+".join(parts)

    def measurable_cases(self, threads: int) -> Mapping[KernelCase, int]:
        """The cases the kernels can run at ``threads`` (what a measurement may choose)."""
        if cpu_numba is not None:
            return ALL_KERNEL_CASES
        return _stream_cases(ALL_KERNEL_CASES) if threads == 1 or cpu_stream.THREADED else {}

    def committed_record(self, threads: int) -> tuple[str, Measured]:
        """The committed table that routes ``threads`` cold, by name, and where it was
        measured."""
        if not self.streaming or (threads > 1 and not cpu_stream.THREADED):
            return "MEASURED_NUMBA_CASES", CPU_NUMBA_ONLY
        if threads == 1:
            return "MEASURED_KERNEL_CASES", CPU_KERNELS_ONE_THREAD
        return "MEASURED_THREADED_CASES", CPU_KERNELS_THREADED

    def routing_table(self, threads: int | None = None) -> RoutingTable:
        """The default routing at ``threads`` (default: torch's count): what was measured on
        this machine and stored in the cache directory of the first call, over the committed
        table; shared by the instances of one key.

        Raises:
            ValueError: for a backend made with explicit tables (nothing measured for those).
        """
        threads = torch.get_num_threads() if threads is None else threads
        table = self._tables.get(threads)
        if table is None:
            if self._fixed:
                raise ValueError("routing_table: this backend's tables were given explicitly")
            name, record = self.committed_record(threads)
            source = (
                f"{name}, {record.machine}, {record.threads} thread(s), {record.date}, "
                f"`{record.command}`"
            )
            if record.threads != threads:
                source += f"; measured at {record.threads} thread(s), not at {threads}"
            table = calibration.table_for(
                calibration.routing_key(threads, self.kernel_set()),
                self.kernel_cases if threads == 1 else self.threaded_kernel_cases,
                source,
                self.measurable_cases(threads),
            )
            self._tables[threads] = table
        return table

    def calibrate(
        self,
        threads: int | None = None,
        *,
        sizes: Sequence[int],
        rounds: int,
        dtypes: Collection[torch.dtype] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> RoutingTable:
        """Measures the thresholds at ``threads`` on a ladder of sizes and stores them.

        Each case the kernels can run here (of ``dtypes``, default all) is timed at each of
        ``sizes`` (:func:`calibration.sweep`: ``CpuBackend(ALL_KERNEL_CASES)`` against
        ``CpuBackend({})``, median of ``rounds`` interleaved rounds, caches cold; a loss that
        would decide the threshold is timed twice); its threshold is the smallest size from
        which the kernels win at every larger one (:func:`calibration.threshold_from`).
        torch's thread count is set to ``threads`` for the sweep and restored; no lazy
        measurement runs meanwhile.

        Returns:
            The updated table (stored in the cache directory).
        """
        saved = torch.get_num_threads()
        threads = saved if threads is None else threads
        table = self.routing_table(threads)
        cases = [case for case in table.measurable if dtypes is None or case[2] in dtypes]
        kernels, aten = self._measuring_backends()
        torch.set_num_threads(threads)
        try:
            with calibration.LOCK:
                start = time.perf_counter()
                points = calibration.sweep(kernels, aten, cases, sizes, rounds, progress)
                date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                info = {
                    "date": date,
                    "rounds": rounds,
                    "sizes": list(sizes),
                    "seconds": round(time.perf_counter() - start, 3),
                }
                table.record_sweep(points, info)
        finally:
            torch.set_num_threads(saved)
        return table

    def explain(
        self, x: torch.Tensor, pass_name: str = "forward", threads: int | None = None
    ) -> Explanation:
        """Which kernel a call on ``x`` takes in ``pass_name``, and why (nothing is measured).

        Args:
            x: the input ``(N, C, *)`` as the call would get it.
            pass_name: ``"forward"`` (training), ``"backward"`` or ``"inference"``.
            threads: the thread count to explain (default: torch's).

        Returns:
            An :class:`Explanation`; ``str()`` of it is one readable paragraph.
        """
        if pass_name not in calibration.PASSES:
            raise ValueError(
                f"pass_name: expected one of {', '.join(calibration.PASSES)}, got {pass_name!r}"
            )
        threads = torch.get_num_threads() if threads is None else threads
        nbytes = x.numel() * x.element_size()
        base = Explanation(
            pass_name, None, x.dtype, nbytes, threads, "ATen", "none", None, None, ""
        )
        if _is_transformed(x):
            return base._replace(
                kernel="pure torch", note="a torch.func transform: torch operations run"
            )
        layout = kernel_layout(x)
        if layout is None or nbytes == 0:
            return base._replace(note="no kernel of ours takes this device, dtype or strides")
        base = base._replace(layout=layout)
        if pass_name == "inference" and _needs_grad(x):
            return base._replace(note="autograd records the call: ATen's differentiable kernel")
        case = (pass_name, layout, x.dtype)
        if self._fixed:
            table = self.threaded_kernel_cases if threads > 1 else self.kernel_cases
            threshold = table.get(case)
            ours = threshold is not None and nbytes >= threshold
            return base._replace(
                kernel=self._kernel_name(ours, x.dtype, threads), source="explicit",
                threshold=threshold, note="the tables this backend was made with",
            )  # fmt: skip
        routing = self.routing_table(threads)
        cls = calibration.shape_class(nbytes, calibration.run_length(x.shape, case[1]))
        if case in routing.thresholds and cls[1] == calibration.SWEEP_RUN[case[1]]:
            threshold = routing.thresholds[case]
            ours = threshold is not None and nbytes >= threshold
            points = routing.sweeps.get(case, [])
            below = [point for point in points if point.nbytes <= nbytes] or points[:1]
            timing = below[-1].timing if below else None
            swept = routing.swept or {}
            return base._replace(
                kernel=self._kernel_name(ours, x.dtype, threads), source="stored",
                threshold=threshold, timing=timing,
                note=f"`batchnorm calibrate` of {swept.get('date', '?')} in {routing.path}"
                + (f" (times at {calibration.format_bytes(below[-1].nbytes)})" if below else ""),
            )  # fmt: skip
        decision = routing.decisions.get((case, cls))
        if decision is not None:
            return base._replace(
                kernel=self._kernel_name(decision.kernels, x.dtype, threads), source="lazy",
                timing=decision.timing,
                note=f"measured on first use for {calibration.class_range(cls)} at "
                f"{calibration.format_bytes(decision.nbytes)} ({decision.date}, "
                f"{decision.seconds * 1e3:.0f} ms once), stored in {routing.path}",
            )  # fmt: skip
        threshold = routing.committed.get(case)
        ours = threshold is not None and nbytes >= threshold
        note = routing.committed_source
        if nbytes < calibration.LAZY_MIN_BYTES:
            note += "; inputs under 64 KiB are not measured"
        elif case not in routing.measurable:
            note += "; no kernel of ours runs this case here"
        elif calibration.calibrating():
            note += "; not measured yet: the next call of this case and shape class measures it"
        else:
            note += "; BATCHNORM_CALIBRATE=0: nothing is measured"
        return base._replace(
            kernel=self._kernel_name(ours, x.dtype, threads), source="committed",
            threshold=threshold, note=note,
        )  # fmt: skip

    def _kernel_name(self, ours: bool, dtype: torch.dtype, threads: int) -> str:
        """Ours, "C" or "Numba", where they run, else "ATen"."""
        if not ours:
            return "ATen"
        streams = self.streaming and dtype in _STREAM_DTYPES
        return "C" if streams and (cpu_stream.THREADED or threads == 1) else "Numba"

    def _streams(self, x: torch.Tensor) -> bool:
        """Whether the streaming kernels run the pass on ``x``: one C call.

        On several threads they need torch's OpenMP runtime (:data:`cpu_stream.THREADED`), whose
        workers ATen's kernels leave spinning: on threads of their own (a pool of Python
        threads) the passes measured 0.45–0.8× ATen's threaded kernels on two threads
        (``benchmarks/results/cpu-2026-11-27-threads2-pool.log``, at 0d35e58). Without that
        runtime, Numba's kernels run on several threads.
        """
        return (
            self.streaming
            and x.dtype in _STREAM_DTYPES
            and (cpu_stream.THREADED or torch.get_num_threads() == 1)
        )

    def _runs_kernels(
        self, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> bool:
        """Whether a training call on ``input`` ``(N, C, *)`` runs a Numba kernel.

        True when the forward kernel takes ``input``, or the backward kernel does and autograd
        will differentiate the call; False under ``torch.func`` transforms (pure torch there).
        """
        if _is_transformed(input):
            return False
        if self._kernel_layout("forward", input, measure=True) is not None:
            return True
        return (
            _needs_grad(input, weight, bias)
            and self._kernel_layout("backward", input, measure=True) is not None
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
        y, stats = self._train_kernels(x, layout, weight, bias, eps)
        mean_t, var_t, invstd_t = _stats_tensors(stats, compute_dtype(x.dtype))  # (C,) each
        return ForwardResult(y, mean_t, invstd_t, var_t)

    def _train_kernels(
        self,
        x: torch.Tensor,
        layout: str,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """Numba's training forward on ``x`` ``(N, C, *)`` read in ``layout``.

        Returns:
            ``y`` like ``x`` (same shape and strides) and the float64 statistics ``(3, C)``:
            rows ``μ``, biased ``σ²``, ``r``.
        """
        is_rows = layout == "rows"
        x3 = channel_view(x)  # (N, C, L), a view (dense layouts only)
        channels = x.shape[1]
        y = empty_like(x)  # like x (dense), huge pages
        stats = np.empty((3, channels))  # rows: mean, var, invstd, (C,) each
        mean, var, invstd = stats
        weight64, bias64 = _per_channel_float64(channels, (weight, 1.0), (bias, 0.0))
        kernel = cpu_numba.forward_mc if is_rows else cpu_numba.forward_ncl
        y3 = channel_view(y)  # (N, C, L), a view
        array = _kernel_array(x3, layout)  # (N, C, L) or (M, C)
        y_array = _as_array(channel_rows(y3) if is_rows else y3)  # type: ignore[arg-type]
        _launch(kernel, x.numel(), array, weight64, bias64, float(eps), y_array, mean, var, invstd)
        return y, stats

    def forward_update(self, call: Call) -> BatchNormOutput | None:
        """:meth:`AtenBackend.forward_update` where ATen runs the whole call, else ``None``.

        Where a kernel of ours runs the forward, or the backward of a call autograd will
        differentiate, ``None`` sends the call to the generic path (our autograd function,
        :meth:`forward`, :meth:`backward`).
        """
        if self._runs_kernels(call.input, call.weight, call.bias):
            return None
        return self._aten.forward_update(call)

    def native_forward(
        self,
        input: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
    ) -> bool:
        """Whether a training call should run :meth:`native_batch_norm` and this backward.

        That is where the kernels run the forward, or run the backward of a call autograd will
        differentiate (ATen's forward kernel then runs the forward). The caller runs
        :func:`batchnorm.autograd.native_forward_train`: one forward that also moves the
        running buffers, on the input as given, instead of the generic path's views, scratch
        statistics and separate update (about 0.3 ms a call when caches are cold).

        Args:
            input: the checked input ``(N, C, *)``.
            weight, bias, running_mean, running_var: the checked per-channel tensors or None.

        Returns:
            False where the call goes elsewhere: no kernel takes it, only one buffer is given,
            the buffers are not float32/float64 (the kernels move them in NumPy), or ATen's
            kernel would run the forward and does not take the tensors as they are.
        """
        # Cheapest refusal first: this runs before every training call.
        if not self._may_run("forward", input) and not self._may_run("backward", input):
            return False
        if (running_mean is None) != (running_var is None) or _is_transformed(input):
            return False
        if self._kernel_layout("forward", input, measure=True) is not None:
            return running_mean is None or (
                running_mean.dtype in _BUFFER_DTYPES and running_var.dtype in _BUFFER_DTYPES  # type: ignore[union-attr]
            )
        if not _needs_grad(input, weight, bias):
            return False
        if self._kernel_layout("backward", input, measure=True) is None:
            return False
        return native_operand(input, weight, bias, running_mean, running_var) is not None

    def native_batch_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``aten::native_batch_norm`` in training mode, on the kernels where they take ``x``.

        For calls :meth:`native_forward` accepted: normalizes ``x`` with its batch statistics
        and moves the given buffers in place, ``running ← (1 − momentum)·running +
        momentum·batch`` (the unbiased variance), as ATen's kernel does.

        Args:
            x: the input ``(N, C, *)`` as the caller has it.
            weight, bias: ``γ``, ``β`` ``(C,)`` or None.
            running_mean, running_var: buffers ``(C,)`` not requiring grad, or None (both).
            momentum: the running-average factor.
            eps: added to the variance inside the square root.

        Returns:
            ``(y, mean, invstd)``: ``y`` like ``x``, the statistics ``(C,)`` in the compute
            dtype.
        """
        layout = self._kernel_layout("forward", x)
        if layout is None:  # ATen's forward kernel (native_forward checked that it takes x)
            operand, is_rows = native_operand(x, weight, bias, running_mean, running_var)  # type: ignore[misc]
            y, mean, invstd = torch.ops.aten.native_batch_norm(
                operand, weight, bias, running_mean, running_var, True, momentum, eps
            )
            return (rows_as_input(y, x) if is_rows else y), mean, invstd
        if self._streams(x) and _float32_or_none(running_mean, running_var):
            return self._train_single_call(
                x, layout, weight, bias, running_mean, running_var, momentum, eps
            )
        y, stats = self._train_kernels(x, layout, weight, bias, eps)
        mean, var, invstd = stats  # (C,) float64 each
        if running_mean is not None and running_var is not None:
            count = x.numel() // x.shape[1]  # M, at least 2 in training
            _move_in_place(running_mean, mean, momentum)
            _move_in_place(running_var, var * (count / (count - 1)), momentum)
        dtype = compute_dtype(x.dtype)
        mean_t, invstd_t = _stats_tensors(stats[::2], dtype)  # (C,) each
        return y, mean_t, invstd_t

    def _train_single_call(
        self,
        x: torch.Tensor,
        layout: str,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`native_batch_norm` in one C call (float32 buffers or none)."""
        keep: list[torch.Tensor] = []
        y = empty_like(x)  # like x (dense), huge pages
        channels = x.shape[1]
        mean = torch.empty(channels, dtype=torch.float32)  # (C,)
        invstd = torch.empty(channels, dtype=torch.float32)  # (C,)
        rows, run = _kernel_rows_and_run(x, layout == "rows")
        running = (0, 0)
        if running_mean is not None and running_var is not None:
            running = (running_mean.data_ptr(), running_var.data_ptr())
        cpu_stream.train_forward(
            x.data_ptr(),
            y.data_ptr(),
            rows,
            x.shape[1],
            run,
            x.dtype == torch.bfloat16,
            _float32_address(weight, keep),
            _float32_address(bias, keep),
            float(eps),
            float(momentum),
            running,
            (mean.data_ptr(), invstd.data_ptr()),
            _stream_threads(x),
        )
        return y, mean, invstd

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
        if _needs_grad(x, weight, bias):
            return self._aten.inference(x, weight, bias, running_mean, running_var, eps)
        layout = self._kernel_layout("inference", x, measure=True)
        if layout is None:
            return self._aten.inference(x, weight, bias, running_mean, running_var, eps)
        if self._streams(x):
            keep: list[torch.Tensor] = []
            y = empty_like(x)  # like x (dense), huge pages
            rows, run = _kernel_rows_and_run(x, layout == "rows")
            cpu_stream.inference(
                x.data_ptr(),
                y.data_ptr(),
                rows,
                x.shape[1],
                run,
                x.dtype == torch.bfloat16,
                _float32_address(weight, keep),
                _float32_address(bias, keep),
                (_float32_address(running_mean, keep), _float32_address(running_var, keep)),
                float(eps),
                _stream_threads(x),
            )
            return y
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

    def backward(self, dy: torch.Tensor, saved: Saved) -> Gradients:
        """Backward of :meth:`forward`; see :class:`Backend`."""
        x, weight, mean, invstd = saved
        if _is_transformed(x, dy):
            return self._torch.backward(dy, saved)
        layout = self._kernel_layout("backward", x)
        if layout is None:
            return self._aten.backward(dy, saved)
        is_rows = layout == "rows"
        channels = x.shape[1]
        dx = empty_like(x)  # (N, C, L), strides of x (dense), huge pages
        dy = dy.to(x.dtype)  # autograd hands dy in y's dtype, which is x's
        if self._streams(x):
            # dy in x's layout (no copy when autograd hands it over that way)
            dy = dy.transpose(1, 2).contiguous().transpose(1, 2) if is_rows else dy.contiguous()
            keep: list[torch.Tensor] = []
            dweight_out = torch.empty(channels, dtype=torch.float32)  # (C,)
            dbias_out = torch.empty(channels, dtype=torch.float32)  # (C,)
            rows, run = _kernel_rows_and_run(x, is_rows)
            cpu_stream.train_backward(
                dy.data_ptr(),
                x.data_ptr(),
                dx.data_ptr(),
                rows,
                channels,
                run,
                x.dtype == torch.bfloat16,
                _float32_address(weight, keep),
                (_float32_address(mean, keep), _float32_address(invstd, keep)),
                (dweight_out.data_ptr(), dbias_out.data_ptr()),
                _stream_threads(x),
            )
            return Gradients(dx, dweight_out, dbias_out)
        array = _kernel_array(x, layout)  # (N, C, L) or (M, C)
        if is_rows:
            dy_array = _as_array(dy.transpose(1, 2).contiguous().view(array.shape))  # (M, C)
        else:
            dy_array = _as_array(dy.contiguous())  # (N, C, L)
        grads = np.empty((2, channels))  # rows: dweight, dbias, (C,) each
        dweight, dbias = grads
        per_channel = _per_channel_float64(channels, (weight, 1.0), (mean, 0.0), (invstd, 1.0))
        kernel = cpu_numba.backward_mc if is_rows else cpu_numba.backward_ncl
        dx_array = _as_array(channel_rows(dx) if is_rows else dx)  # type: ignore[arg-type]
        _launch(kernel, x.numel(), dy_array, array, *per_channel, dx_array, dweight, dbias)
        dweight_t, dbias_t = _stats_tensors(grads, compute_dtype(x.dtype))  # (C,) each
        return Gradients(dx, dweight_t, dbias_t)


class Explanation(NamedTuple):
    """Which kernel a call takes and why (:func:`explain`).

    Attributes:
        pass_name: ``"forward"``, ``"backward"`` or ``"inference"``.
        layout: ``"ncl"`` or ``"rows"`` as the kernels would read the input, None if they cannot.
        dtype, nbytes, threads: the input's dtype and size, the thread count explained.
        kernel: ``"C"`` or ``"Numba"`` (ours), ``"ATen"``, ``"pure torch"``.
        source: what decided: ``"stored"`` (``batchnorm calibrate``), ``"lazy"`` (measured on
            first use), ``"committed"`` (:mod:`batchnorm.backends.measured`), ``"explicit"``
            (tables given to the backend), ``"none"`` (no kernel of ours applies).
        threshold: the smallest input (bytes) the deciding table gives the kernels (None: none
            or not a threshold).
        timing: the measured times behind the choice, where known.
        note: the details, in words.
    """

    pass_name: str
    layout: str | None
    dtype: torch.dtype
    nbytes: int
    threads: int
    kernel: str
    source: str
    threshold: int | None
    timing: Timing | None
    note: str

    @property
    def ours(self) -> bool:
        """Whether one of our kernels runs (else ATen's or torch operations)."""
        return self.kernel in ("C", "Numba")

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        text = (
            f"{self.pass_name} of {dtype} {self.layout or 'input'} "
            f"({calibration.format_bytes(self.nbytes)}) on {self.threads} thread(s): "
            f"{'ours (' + self.kernel + ')' if self.ours else self.kernel}, from the "
            f"{self.source} routing"
        )
        if self.threshold is not None:
            text += f" (ours from {calibration.format_bytes(self.threshold)})"
        if self.timing is not None:
            text += (
                f"; measured ours {self.timing.kernels_ms:.3f} ms, ATen "
                f"{self.timing.aten_ms:.3f} ms (x{self.timing.ratio:.2f})"
            )
        return f"{text}; {self.note}" if self.note else text


def explain(x: torch.Tensor, pass_name: str = "forward", threads: int | None = None) -> Explanation:
    """Which kernel the ``cpu`` backend (``auto``'s on CPU) runs for ``x`` in ``pass_name``.

    Says ours (C or Numba) or ATen's, which routing decided (stored by ``batchnorm calibrate``,
    measured lazily on first use, the committed defaults, or tables given explicitly), the
    threshold and the measured times where known. Measures nothing.

    Args:
        x: the input ``(N, C, *)``.
        pass_name: ``"forward"`` (training), ``"backward"`` or ``"inference"``.
        threads: the thread count to explain (default: ``torch.get_num_threads()``).
    """
    from batchnorm import backends

    note = ""
    chosen = os.environ.get(backends.BACKEND_ENV_VAR) or "auto"
    if chosen not in ("auto", "cpu", "numba"):
        note = f"BATCHNORM_BACKEND={chosen} sends calls to another backend"
    try:
        backend = backends.resolve_backend("cpu", torch.device("cpu"))
    except ImportError as error:
        nbytes = x.numel() * x.element_size()
        threads = torch.get_num_threads() if threads is None else threads
        return Explanation(
            pass_name, None, x.dtype, nbytes, threads, "ATen", "none", None, None,
            "; ".join(filter(None, (f"the cpu backend cannot run here ({error})", note))),
        )  # fmt: skip
    if not isinstance(backend, CpuBackend):  # another class installed under the name
        backend = CpuBackend()
    result = backend.explain(x, pass_name, threads)
    return result._replace(note="; ".join(filter(None, (result.note, note)))) if note else result


#: The class's name before it ran C kernels too (``backend="numba"`` is an alias of ``cpu``).
NumbaBackend = CpuBackend
