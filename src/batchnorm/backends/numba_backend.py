"""Numba backend: fused, cache-aware CPU kernels (:mod:`batchnorm.kernels.cpu_numba`).

The kernels cover float32, float64 and bfloat16 (as its bit pattern, computed in float32) in the
two dense layouts of the ``(N, C, L)`` view: contiguous ``(N, C, L)`` and channels innermost
(``channels_last``, ``(N, C)``), for training forward, backward and evaluation. By default they
run only where they measured faster than ATen (:data:`MEASURED_KERNEL_CASES`); every other case
goes to the ATen backend (float16 and other strides always do), and tensors under ``torch.func``
transforms (whose storage Numba cannot see) to the pure-torch backend, which those transforms
differentiate and batch.

The first call for each dtype and layout compiles its kernels (a few seconds; ``cache=True``
keeps the machine code in ``__pycache__`` for later processes).

Raises:
    ImportError: on import, if Numba is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import torch

from batchnorm.backends.aten_backend import AtenBackend, channel_rows, torch_inference
from batchnorm.backends.base import ForwardResult, compute_dtype
from batchnorm.backends.torch_backend import TorchBackend
from batchnorm.kernels import cpu_numba

__all__ = ["NumbaBackend"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
#: Fewest elements worth a thread of their own (ATen's ``at::internal::GRAIN_SIZE``).
_GRAIN = 32768


def _as_array(t: torch.Tensor) -> np.ndarray:
    """A NumPy view of ``t``'s memory; bfloat16 as its ``uint16`` bit pattern."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _kernel_view(x: torch.Tensor) -> tuple[np.ndarray, bool] | None:
    """The NumPy array the kernels read for ``x`` ``(N, C, L)``, and whether it is ``(M, C)``.

    Returns:
        ``(array, is_rows)``: the contiguous ``(N, C, L)`` array (``is_rows`` False) or the
        ``(M, C)`` channels-innermost array (``is_rows`` True), sharing memory with ``x``; or
        ``None`` when the kernels cannot take ``x`` (device, dtype or strides).
    """
    if x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES:
        return None
    if x.is_contiguous() and x.shape[2] > 1:
        return _as_array(x), False  # (N, C, L)
    rows = channel_rows(x)  # (M, C) or None
    if rows is None:
        return None
    return _as_array(rows), True  # (M, C)


#: Every (pass, layout, dtype) the kernels implement: pass "forward", "backward" or
#: "inference"; layout "ncl" (contiguous (N, C, L)) or "rows" (channels innermost, (M, C)).
ALL_KERNEL_CASES = frozenset(
    (pass_name, layout, dtype)
    for pass_name in ("forward", "backward", "inference")
    for layout in ("ncl", "rows")
    for dtype in _KERNEL_DTYPES
)
#: Where the kernels measured faster than ATen's (benchmarks/cpu.py, 2-core Xeon, 2026-11-26):
#: the training forward on contiguous (N, C, L) float32/float64, whose channel slice is re-read
#: from L2 (1.4–2.0× ATen). Elsewhere ATen's kernels were as fast or faster, so they run there.
MEASURED_KERNEL_CASES = frozenset(
    {("forward", "ncl", torch.float32), ("forward", "ncl", torch.float64)}
)


def _is_transformed(x: torch.Tensor) -> bool:
    """Whether ``x`` is a ``torch.func`` wrapper (vmap/grad), whose storage Numba cannot read."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an operation on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _per_channel_float64(values: torch.Tensor | None, channels: int, fill: float) -> np.ndarray:
    """``values`` ``(C,)`` as a float64 array, or ``C`` copies of ``fill`` when None."""
    if values is None:
        return np.full(channels, fill)
    return values.detach().to(torch.float64).numpy()


def _launch(kernel: Callable[..., None], work: int, *args: Any) -> None:
    """Runs ``kernel(*args)`` on up to ``torch.get_num_threads()`` threads.

    Each thread gets at least :data:`_GRAIN` elements of ``work``, like ATen's grain size: a
    small tensor runs on the calling thread, without waking (or waiting for) the pool. Numba's
    OpenMP layer shares the OpenMP runtime with torch, and starting its pool resets the
    runtime's thread count; torch's setting is restored if that happened.
    """
    threads = torch.get_num_threads()
    pool_size = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(threads, pool_size, work // _GRAIN)))
    kernel(*args)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


class NumbaBackend:
    """Batch normalization on Numba CPU kernels, ATen or pure torch otherwise (see above)."""

    name = "numba"

    def __init__(self, kernel_cases: frozenset[tuple[str, str, torch.dtype]] | None = None):
        """Chooses where the kernels run.

        Args:
            kernel_cases: the ``(pass, layout, dtype)`` cases the Numba kernels run, the rest
                going to ATen; default :data:`MEASURED_KERNEL_CASES`. :data:`ALL_KERNEL_CASES`
                runs them wherever they can (the tests do, to check every kernel).
        """
        self.kernel_cases = MEASURED_KERNEL_CASES if kernel_cases is None else kernel_cases
        self._aten = AtenBackend()
        self._torch = TorchBackend()

    def _kernel_input(self, pass_name: str, x: torch.Tensor) -> tuple[np.ndarray, bool] | None:
        """:func:`_kernel_view` of ``x`` if the kernels run this case, else None."""
        view = _kernel_view(x)
        if view is None or x.numel() == 0:
            return None
        layout = "rows" if view[1] else "ncl"
        return view if (pass_name, layout, x.dtype) in self.kernel_cases else None

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
        view = self._kernel_input("forward", x)
        if view is None:
            return self._aten.forward(x, weight, bias, eps)
        array, is_rows = view
        channels = x.shape[1]
        y = torch.empty_like(x)  # (N, C, L), strides of x (dense)
        y_array = _as_array(channel_rows(y) if is_rows else y)  # type: ignore[arg-type]
        mean, var, invstd = np.empty(channels), np.empty(channels), np.empty(channels)  # (C,)
        kernel = cpu_numba.forward_mc if is_rows else cpu_numba.forward_ncl
        _launch(
            kernel,
            x.numel(),
            array,
            _per_channel_float64(weight, channels, 1.0),
            _per_channel_float64(bias, channels, 0.0),
            float(eps),
            y_array,
            mean,
            var,
            invstd,
        )
        stats_dtype = compute_dtype(x.dtype)
        return ForwardResult(
            y,
            torch.from_numpy(mean).to(stats_dtype),
            torch.from_numpy(invstd).to(stats_dtype),
            torch.from_numpy(var).to(stats_dtype),
        )

    def inference(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """Evaluation-mode forward on ``(N, C, L)``; see :meth:`AtenBackend.inference`.

        The kernels compute ``(x − μ)·γr + β`` (no cancellation when ``|μ| ≫ σ``) in one pass;
        when autograd needs the graph (gradients in evaluation mode) ATen's kernel runs instead.
        """
        if _is_transformed(x):
            return torch_inference(x, weight, bias, running_mean, running_var, eps)
        view = self._kernel_input("inference", x)
        if view is None or _needs_grad(x, weight, bias):
            # ATen's kernel is differentiable (gradients in evaluation mode); ours is not.
            return self._aten.inference(x, weight, bias, running_mean, running_var, eps)
        array, is_rows = view
        channels = x.shape[1]
        y = torch.empty_like(x)  # (N, C, L), strides of x (dense)
        kernel = cpu_numba.inference_mc if is_rows else cpu_numba.inference_ncl
        _launch(
            kernel,
            x.numel(),
            array,
            _per_channel_float64(weight, channels, 1.0),
            _per_channel_float64(bias, channels, 0.0),
            _per_channel_float64(running_mean, channels, 0.0),
            _per_channel_float64(running_var, channels, 1.0),
            float(eps),
            _as_array(channel_rows(y) if is_rows else y),  # type: ignore[arg-type]
        )
        return y

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
        view = self._kernel_input("backward", x)
        if view is None:
            return self._aten.backward(dy, x, weight, mean, invstd)
        array, is_rows = view
        channels = x.shape[1]
        dx = torch.empty_like(x)  # (N, C, L), strides of x (dense)
        dy = dy.to(x.dtype)  # autograd hands dy in y's dtype, which is x's
        if is_rows:
            dy_array = _as_array(dy.transpose(1, 2).contiguous().view(array.shape))  # (M, C)
            dx_array = _as_array(channel_rows(dx))  # type: ignore[arg-type]  # (M, C)
        else:
            dy_array = _as_array(dy.contiguous())  # (N, C, L)
            dx_array = _as_array(dx)  # (N, C, L)
        dweight, dbias = np.empty(channels), np.empty(channels)  # (C,)
        kernel = cpu_numba.backward_mc if is_rows else cpu_numba.backward_ncl
        _launch(
            kernel,
            x.numel(),
            dy_array,
            array,
            _per_channel_float64(weight, channels, 1.0),
            _per_channel_float64(mean, channels, 0.0),
            _per_channel_float64(invstd, channels, 1.0),
            dx_array,
            dweight,
            dbias,
        )
        stats_dtype = compute_dtype(x.dtype)
        return (
            dx,
            torch.from_numpy(dweight).to(stats_dtype),
            torch.from_numpy(dbias).to(stats_dtype),
        )
