"""The Triton kernels as ``torch.library.triton_op`` ops: the route of ``torch.compile``.

``batchnorm::triton_train_compiled``, ``batchnorm::triton_train_backward_compiled`` and
``batchnorm::triton_inference_compiled`` have the schemas of the ``custom_op`` ops of
:mod:`batchnorm.backends.triton_ops` and the same autograd formulas, but their bodies launch
the ``@triton.jit`` kernels through ``torch.library.wrap_triton`` with tensors as arguments
(``traceable=True`` of :mod:`batchnorm.kernels.triton.launch`). AOTAutograd decomposes them,
so the graph Inductor receives holds ``triton_kernel_wrapper_functional`` nodes (one per
kernel launch) instead of an opaque op; Inductor then allocates the outputs and the scratch
itself, launches the kernels through its own generated launcher and may reuse buffers.

When they are used (:func:`use_triton_op`), set by ``BATCHNORM_TRITON_COMPILED`` (read once,
at import), always only while ``torch.compile`` traces a call (``torch.compiler.is_compiling()``)
and with torch ≥ 2.6 (``triton_op`` and ``wrap_triton`` present): ``custom_op`` (the default,
until the route is checked on a GPU) never; ``auto`` for CUDA tensors; ``triton_op`` always
(also CPU tensors in the interpreter, as the tests do). Every other traced call keeps the
``custom_op`` ops.

CUDA graphs (``torch.compile(mode="reduce-overhead")``): nothing in a body syncs with the host
or reads a device value (no ``.item()``, no ``.cpu()``, no data-dependent shape); grids, tiles
and strides are computed from static sizes at trace time; the only per-call host work is what
Inductor's launcher does. Outputs and scratch are ``torch.empty``/``torch.zeros`` of the graph
(the arrival counters are zero-filled by a kernel in the graph, so each replay starts from zero;
the kernels also leave them at zero), so they come from the graph's memory pool, never from
the host-side scratch cache of the eager path. The persistent arrangement (whose grid is sized
from the compiled kernel's occupancy on the host) is not used here: always the split one.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from batchnorm import _compat
from batchnorm.backends.triton_ops import (
    _inference_backward_formula,
    _inference_setup_context,
    _train_backward_formula,
    _train_setup_context,
)
from batchnorm.kernels.triton.launch import run_inference, train_backward, train_forward

__all__ = [
    "ROUTE_ENV_VAR",
    "available",
    "inference_compiled_op",
    "train_backward_compiled_op",
    "train_compiled_op",
    "use_triton_op",
]

ROUTE_ENV_VAR = "BATCHNORM_TRITON_COMPILED"
_ROUTES = ("auto", "triton_op", "custom_op")


def _route() -> str:
    """``BATCHNORM_TRITON_COMPILED``: ``custom_op`` (default), ``auto`` or ``triton_op``."""
    name = os.environ.get(ROUTE_ENV_VAR, "custom_op") or "custom_op"
    if name not in _ROUTES:
        raise ValueError(f"{ROUTE_ENV_VAR}: expected one of {', '.join(_ROUTES)}, got {name!r}")
    return name


def available() -> bool:
    """Whether this torch has ``torch.library.triton_op`` and ``wrap_triton`` (torch ≥ 2.6)."""
    library = torch.library
    return hasattr(library, "triton_op") and hasattr(library, "wrap_triton")


_ROUTE = _route()
_AVAILABLE = available()


def use_triton_op(x: torch.Tensor) -> bool:
    """Whether a traced call on ``x`` takes the ``triton_op`` ops (see the module docstring)."""
    if not _AVAILABLE or _ROUTE == "custom_op" or not _compat.is_compiling():
        return False
    return _ROUTE == "triton_op" or x.device.type == "cuda"


# Bodies with the ops' schemas (triton_op infers the schema from the annotations).


def _train(
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor,
]:  # fmt: skip
    """:func:`~batchnorm.kernels.triton.launch.train_forward`, traceable."""
    y, mean, invstd, var, positive, new_mean, new_var = train_forward(
        x3, weight, bias, residual, running_mean, running_var, momentum, eps, activation,
        negative_slope, traceable=True,
    )  # fmt: skip
    return y, mean, invstd, var, positive, new_mean, new_var


def _train_backward(
    dy: torch.Tensor,
    x3: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    positive: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    activation: str,
    negative_slope: float,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~batchnorm.kernels.triton.launch.train_backward`, traceable."""
    dx, dweight, dbias, dz = train_backward(
        dy, x3, weight, bias, residual, positive, mean, invstd, activation, negative_slope,
        residual_grad, traceable=True,
    )  # fmt: skip
    return dx, dweight, dbias, dz


def _inference(
    x3: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    activation: str,
    negative_slope: float,
) -> torch.Tensor:
    """:func:`~batchnorm.kernels.triton.launch.run_inference`, traceable."""
    y: torch.Tensor = run_inference(
        x3, running_mean, running_var, weight, bias, residual, eps, activation, negative_slope,
        traceable=True,
    )  # fmt: skip
    return y


train_compiled_op: Any = None
train_backward_compiled_op: Any = None
inference_compiled_op: Any = None

if _AVAILABLE:
    train_compiled_op = torch.library.triton_op(
        "batchnorm::triton_train_compiled", _train, mutates_args=()
    )
    train_backward_compiled_op = torch.library.triton_op(
        "batchnorm::triton_train_backward_compiled", _train_backward, mutates_args=()
    )
    inference_compiled_op = torch.library.triton_op(
        "batchnorm::triton_inference_compiled", _inference, mutates_args=()
    )

    def _compiled_backward_formula(
        ctx: Any, *grads: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """The ``custom_op``'s formula, its traced backward on the ``triton_op`` twin."""
        return _train_backward_formula(ctx, *grads, backward_op=train_backward_compiled_op)

    train_compiled_op.register_autograd(
        _compiled_backward_formula, setup_context=_train_setup_context
    )
    inference_compiled_op.register_autograd(
        _inference_backward_formula, setup_context=_inference_setup_context
    )
