"""Calling the streaming CPU kernels (``cpu_stream.c``) on tensors' memory.

The C extension ``batchnorm.kernels.cpu._cpu_stream`` reads each pass's input in memory order and
writes its output with streaming (non-temporal) stores, which skip the read for ownership a
plain store makes of every line it writes (see the C file). It is built with the package where a
C compiler is present and runs where the CPU has AVX-512 F/BW/VL or AVX2 with FMA
(:data:`SUPPORTED`; the same C compiled for both, the widest the CPU has chosen at import:
:func:`isa`, :data:`ISAS`); elsewhere the Numba kernels (:mod:`batchnorm.kernels.cpu.cpu_numba`)
and ATen run every pass.

Each function here is one whole pass in one C call: :func:`train_forward`,
:func:`train_backward`, :func:`inference`. Tensors come as addresses (the caller checks that
they are dense, float32 or bfloat16, of one layout: ``(N, C, L)`` or ``(M, C)`` with channels
innermost); the per-channel values as addresses of float32 arrays (0 where absent).

``threads`` > 1 splits a pass's rows (samples of ``(N, C, L)``, rows of ``(M, C)``) over a team
of the OpenMP runtime torch's own CPU kernels run on (:data:`THREADED`): ATen leaves that
runtime's workers spinning after each kernel, and threads of our own would compete with them
for the cores. Without it a pass runs on the calling thread whatever ``threads`` says.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch


def _load_extension() -> ModuleType | None:
    """The compiled ``_cpu_stream`` module, or ``None`` where it was not built."""
    try:
        return importlib.import_module("batchnorm.kernels.cpu._cpu_stream")
    except ImportError:  # not built (no compiler at install, or another platform)
        return None


_extension = _load_extension()

__all__ = [
    "ISAS",
    "SUPPORTED",
    "THREADED",
    "inference",
    "isa",
    "train_backward",
    "train_forward",
    "use_isa",
]

#: Whether the extension is built and this CPU runs it.
SUPPORTED: bool = _extension is not None and bool(_extension.SUPPORTED)

#: The instruction sets the extension runs on this CPU, widest first (``"avx512"``, ``"avx2"``).
ISAS: tuple[str, ...] = tuple(_extension.ISAS) if SUPPORTED else ()  # type: ignore[union-attr]


def isa() -> str | None:
    """The instruction set the passes run with: the first of :data:`ISAS` unless
    :func:`use_isa` chose another; ``None`` where the kernels do not run."""
    return _extension.isa() if SUPPORTED else None  # type: ignore[union-attr]


def use_isa(name: str) -> None:
    """Runs the passes with instruction set ``name`` from now on (tests and comparisons: each ISA
    rounds the float32 sums in its own order).

    Args:
        name: one of :data:`ISAS`.

    Raises:
        ValueError: if ``name`` is not one of :data:`ISAS`.
    """
    if name not in ISAS:
        raise ValueError(f"name: expected one of {ISAS} (this CPU's), got {name!r}")
    _extension.use_isa(name)  # type: ignore[union-attr]


def _use_torch_openmp() -> bool:
    """Hands the extension the OpenMP runtime ``libtorch_cpu`` is linked with, if torch uses one.

    Returns:
        Whether passes may run on several threads: ATen's parallel backend is OpenMP and the
        runtime's entry points were found (Linux; elsewhere False).
    """
    if not SUPPORTED or "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    return library.exists() and bool(_extension.use_openmp(str(library)))  # type: ignore[union-attr]


#: Whether passes run on several threads (torch's OpenMP runtime found); else on one.
THREADED: bool = _use_torch_openmp()


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
    threads: int = 1,
) -> None:
    """The whole training forward in one C call.

    Statistics in memory order (each run of ``L`` values, or each block of rows of ``(M, C)``,
    summed while in cache, merged per channel by Chan's rule),
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
        threads: the most threads to run on (see the module's docstring).

    Raises:
        MemoryError: if the C code's scratch memory (a few values per channel and thread) cannot
            be had.
        ValueError: if ``threads`` is below 1.
    """
    _extension.train_forward(  # type: ignore[union-attr]
        x,
        y,
        rows,
        channels,
        run,
        is_bf16,
        weight,
        bias,
        eps,
        momentum,
        *running,
        *stats_out,
        threads,
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
    threads: int = 1,
) -> None:
    """The whole backward in one C call: sums, then ``dx`` streamed.

    Args:
        dy, x, dx: addresses of the incoming gradient, the input and the output (dense, of one
            layout and dtype).
        rows, channels, run, is_bf16, weight, threads: as in :func:`train_forward`.
        stats: addresses of the float32 ``μ`` and ``r`` ``(C,)`` of the forward.
        grads_out: addresses of float32 ``(C,)`` arrays that receive ``dγ`` and ``dβ``.

    Raises:
        MemoryError, ValueError: as :func:`train_forward`.
    """
    _extension.train_backward(  # type: ignore[union-attr]
        dy, x, dx, rows, channels, run, is_bf16, weight, *stats, *grads_out, threads
    )


def inference(
    x: int,
    y: int,
    rows: int,
    channels: int,
    run: int,
    is_bf16: bool,
    weight: int,
    bias: int,
    running: tuple[int, int],
    eps: float,
    threads: int = 1,
) -> None:
    """Evaluation in one C call: ``y = (x − μ)·γ/sqrt(var + ε) + β``.

    Args:
        x, y: addresses of the input and the output (dense, of one layout and dtype).
        rows, channels, run, is_bf16, weight, bias, eps, threads: as in :func:`train_forward`.
        running: addresses of the float32 running mean and variance ``(C,)``.

    Raises:
        MemoryError, ValueError: as :func:`train_forward`.
    """
    _extension.inference(  # type: ignore[union-attr]
        x, y, rows, channels, run, is_bf16, weight, bias, *running, eps, threads
    )
