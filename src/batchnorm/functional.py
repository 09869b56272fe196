"""Functional batch normalization with the signature and semantics of ``F.batch_norm``.

Training mode normalizes with the batch mean and **biased** variance and, when running buffers
are given, moves them towards the batch mean and the **unbiased** variance::

    running ← (1 − momentum)·running + momentum·batch,   var_unbiased = σ²·M / (M − 1)

Evaluation mode normalizes with the running estimates instead. Every argument is checked before
anything is computed or updated, so a rejected call leaves the running buffers bit-identical.

Two forms:

* :func:`batch_norm` updates the running buffers in place, exactly like
  ``torch.nn.functional.batch_norm``;
* :func:`batch_norm_pure` returns the new running statistics instead, so it composes with
  ``torch.func.vmap``, ``torch.func.grad`` and ``torch.func.functional_call``.

Why this file is long: the two public entry points keep ``F.batch_norm``'s full signature and
documentation, and every argument check lives here, beside the one dispatch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from batchnorm import _compat, autograd
from batchnorm._math import ACTIVATIONS, BatchNormOutput, activate, running_update
from batchnorm.backends import resolve_backend
from batchnorm.backends.base import Call, Fusion, channel_view
from batchnorm.masked import masked_batch_norm_pure

__all__ = [
    "BatchNormOutput",
    "batch_norm",
    "batch_norm_pure",
    "channel_view",
    "check_batch_norm_args",
    "check_fusion_args",
    "running_update",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: ``negative_slope``'s default, which needs no check when there is nothing to fuse.
_DEFAULT_SLOPE = 0.01


def check_batch_norm_args(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
) -> None:
    """Rejects every argument :func:`batch_norm` cannot use, before anything is changed.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps: as in
            :func:`batch_norm`; ``momentum`` may be ``None`` here (the modules' cumulative
            average) although :func:`batch_norm` itself needs a number.

    Raises:
        TypeError: if ``input`` or a per-channel tensor is not a floating-point tensor, or a
            scalar argument has the wrong type.
        ValueError: if ``input`` has fewer than 2 dimensions, a per-channel tensor does not hold
            one value per channel, training sees one value per channel, or a running buffer
            is missing in evaluation mode.
        RuntimeError: if a tensor is on another device than ``input`` (PyTorch's error type
            for device mismatches).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "input: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}"
        )
    if input.dim() < 2:
        if input.shape == (0,):
            _check_empty_1d_args(running_mean, running_var, weight, bias)
            return
        raise ValueError(
            "input: expected a tensor of shape (N, C, *) with at least 2 dimensions, "
            f"got shape {tuple(input.shape)}"
        )
    channels = input.shape[1]
    per_channel_shape = (channels,)
    device = input.device
    # Plain loop over constant pairs, each attribute read once: this runs on every call.
    for name, tensor in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating-point tensor, got {tensor.dtype}")
        if tensor.shape != per_channel_shape:
            raise ValueError(
                f"{name}: expected shape ({channels},), one value per channel of input "
                f"(dim 1 of shape {tuple(input.shape)}), got shape {tuple(tensor.shape)}"
            )
        if tensor.device != device:
            raise RuntimeError(
                f"{name}: expected a tensor on {device} (the device of input), "
                f"got one on {tensor.device}"
            )
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float))
    ):
        raise TypeError(f"momentum: expected a float, got {type(momentum).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0 or (training and eps == 0):
        expected = "a positive float in training" if training else "a non-negative finite float"
        raise ValueError(f"eps: expected {expected}, got {eps!r}")
    if training:
        values_per_channel = input.numel() // max(channels, 1)
        if values_per_channel == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, "
                f"got input size {input.size()}"
            )
    else:
        for name, tensor in (("running_mean", running_mean), ("running_var", running_var)):
            if tensor is None:
                raise ValueError(
                    f"{name}: must be defined in evaluation mode (training=False); "
                    "pass the running buffer or training=True"
                )


def _check_empty_1d_args(*tensors: torch.Tensor | None) -> None:
    """The per-channel tensors of an empty 1-D input, ``(0,)``, which ``F.batch_norm`` accepts.

    There is no channel axis, so every given running buffer, weight and bias must be empty too.

    Raises:
        ValueError: naming the first tensor that is not empty (or not a tensor).
    """
    names = ("running_mean", "running_var", "weight", "bias")
    for name, tensor in zip(names, tensors, strict=True):
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.numel() != 0):
            shape = (
                tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            )
            raise ValueError(
                f"{name}: expected an empty tensor for the empty 1-D input of shape (0,), "
                f"got {shape}"
            )


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    mask: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    negative_slope: float = 0.01,
) -> torch.Tensor:
    """Batch normalization over dim 1 of ``input``, a drop-in for ``F.batch_norm``.

    ``y = γ·(x − μ) / sqrt(σ² + ε) + β`` per channel, with the batch statistics in training
    (biased variance; running buffers updated in place with the unbiased one) and the running
    estimates in evaluation.

    Args:
        input: tensor of shape ``(N, C, *)``, float16/bfloat16/float32/float64, any memory
            format.
        running_mean: running mean ``(C,)``, updated in place in training; required in
            evaluation.
        running_var: running unbiased variance ``(C,)``, same rules as ``running_mean``.
        weight: ``γ`` of shape ``(C,)``, or ``None`` for 1.
        bias: ``β`` of shape ``(C,)``, or ``None`` for 0.
        training: use batch statistics (and update the running buffers) when ``True``.
        momentum: factor of the running-average update.
        eps: added to the variance inside the square root.
        backend: backend name (``"auto"``, ``"cuda"``, ``"triton"``, ``"aten"``, ``"numba"``,
            ``"torch"``, ``"numpy"``), or ``None`` for the ``BATCHNORM_BACKEND`` environment
            variable, then ``auto``.
        activation: fused activation applied last: ``None``, ``"relu"``, ``"leaky_relu"``,
            ``"silu"`` or ``"gelu"`` (exact); the result is ``act(bn(x) + residual)``.
        residual: tensor of the shape and dtype of ``input`` added before the activation (its
            gradient is returned by autograd), or ``None``.
        negative_slope: slope of ``leaky_relu`` for negative inputs.
        mask: optional ``torch.bool`` tensor of shape ``(N, *)`` (``input``'s shape without
            dim 1), ``True`` = real value: statistics over the real positions only, padded
            outputs and their gradients 0 (see :mod:`batchnorm.variants.masked`; runs on torch
            operations whatever ``backend`` says; not combined with ``activation``/``residual``).

    Returns:
        A tensor of the shape, dtype and memory format of ``input``.

    Raises:
        TypeError, ValueError, RuntimeError: see :func:`check_batch_norm_args`; the running
            buffers are unchanged when any is raised.

    Examples:
        >>> x = torch.randn(8, 3, 4, 4)
        >>> mean, var = torch.zeros(3), torch.ones(3)
        >>> y = batch_norm(x, mean, var, training=True)
        >>> y.shape
        torch.Size([8, 3, 4, 4])
    """
    # Every argument is checked before anything runs, so nothing changes on error; a backend
    # may update the buffers in its kernel (after the checks), else they are copied below.
    result = _checked_normalize(
        input, running_mean, running_var, weight, bias, training, momentum, eps, backend,
        mask, activation, residual, negative_slope, update_in_place=True,
    )  # fmt: skip
    moved_mean = running_mean is not None and result.running_mean is not running_mean
    moved_var = running_var is not None and result.running_var is not running_var
    if moved_mean or moved_var:  # (a no_grad context costs ~20 µs a call when caches are cold)
        with torch.no_grad():
            if moved_mean:
                running_mean.copy_(result.running_mean)  # type: ignore[union-attr, arg-type]
            if moved_var:
                running_var.copy_(result.running_var)  # type: ignore[union-attr, arg-type]
    return result.output


def batch_norm_pure(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
    mask: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    negative_slope: float = 0.01,
) -> BatchNormOutput:
    """:func:`batch_norm` without side effects: returns the new running statistics.

    Nothing is modified in place, so this form works under ``torch.func.vmap`` and
    ``torch.func.grad`` (with the ``torch`` backend) and inside ``functional_call``.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps, backend,
            mask, activation, residual, negative_slope: as in :func:`batch_norm`.

    Returns:
        A :class:`BatchNormOutput` ``(output, running_mean, running_var)``; the statistics are
        new tensors in training (when given and the batch is not empty), else the ones given.

    Raises:
        TypeError, ValueError, RuntimeError: see :func:`check_batch_norm_args`.

    Examples:
        >>> x = torch.randn(8, 3)
        >>> out, mean, var = batch_norm_pure(x, torch.zeros(3), torch.ones(3), training=True)
        >>> mean.shape
        torch.Size([3])
    """
    return _checked_normalize(
        input, running_mean, running_var, weight, bias, training, momentum, eps, backend,
        mask, activation, residual, negative_slope, update_in_place=False,
    )  # fmt: skip


def _checked_normalize(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    backend: str | None,
    mask: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
    negative_slope: float,
    *,
    update_in_place: bool,
) -> BatchNormOutput:
    """Checks every argument, then hands the whole call to the backend: one dispatch.

    With ``update_in_place`` (:func:`batch_norm` only) the backend may move the given running
    buffers itself and return them; otherwise nothing is mutated. What the backend does not
    run itself, the generic path of :mod:`batchnorm.autograd` composes from its primitives.

    A traced call (:func:`batchnorm._compat.call_kind`: ``torch.compile``, ``torch.export``, FX,
    ``torch.jit.trace``, fake tensors, dispatch modes) runs :func:`_normalize_traced`, ATen's
    operations. An FX proxy has no values to check and ``torch.jit.trace`` would record our
    checks as constants, so theirs are left to ATen's op in the recorded graph.
    """
    if momentum is None:
        raise TypeError("momentum: expected a float; None is a module option, not a functional one")
    kind = _compat.call_kind(input)  # EAGER, TRACED or SYMBOLIC (one question, once)
    symbolic = kind == _compat.SYMBOLIC
    if not symbolic:
        check_batch_norm_args(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
    if not symbolic and (
        activation is not None
        or residual is not None
        or type(negative_slope) is not float
        or negative_slope != _DEFAULT_SLOPE
    ):
        check_fusion_args(input, activation, residual, negative_slope)
    if not symbolic and input.dim() == 1:  # F.batch_norm's empty (0,) input (checked): no work
        return BatchNormOutput(torch.empty_like(input), running_mean, running_var)
    if mask is not None:
        if activation is not None or residual is not None:
            raise ValueError(
                "mask: cannot be combined with activation or residual; apply them after the "
                "masked batch norm"
            )
        return masked_batch_norm_pure(
            input, mask, running_mean, running_var, weight, bias, training, momentum, eps
        )
    fusion = (
        None
        if activation is None and residual is None
        else Fusion(activation, float(negative_slope), residual)
    )
    call = Call(
        input, running_mean, running_var, weight, bias, momentum, eps, fusion, update_in_place
    )
    if symbolic or (kind == _compat.TRACED and backend != "triton"):
        return _normalize_traced(call, training)
    # One dispatch: the backend's own whole call, or the generic path over its primitives.
    impl = resolve_backend(backend, input.device)
    if training:
        return autograd.train(impl, call)
    return BatchNormOutput(autograd.evaluate(impl, call), running_mean, running_var)


def _normalize_traced(call: Call, training: bool) -> BatchNormOutput:
    """``act(bn(x) + residual)`` in ATen operations, for tracers and compilers.

    ``torch.nn.functional.batch_norm`` is the op every tracer knows (Inductor generates its own
    kernels for it, ``torch.export`` records it with its buffer mutation, FX and
    ``torch.jit.trace`` record one node); the residual add and the activation follow as torch
    operations, ``bn(x)`` rounded to the input's dtype first as on the eager path. The pure form
    (``update_in_place=False``) hands ATen copies of the running buffers, which it moves.
    """
    running_mean, running_var = call.running_mean, call.running_var
    if training and not call.update_in_place:
        running_mean = None if running_mean is None else running_mean.clone()  # (C,)
        running_var = None if running_var is None else running_var.clone()  # (C,)
    y = F.batch_norm(
        call.input, running_mean, running_var, call.weight, call.bias, training, call.momentum,
        call.eps,
    )  # fmt: skip
    if call.fusion is None:
        return BatchNormOutput(y, running_mean, running_var)
    activation, slope, residual = call.fusion
    if residual is not None:
        y = y + residual
    return BatchNormOutput(activate(y, activation, slope), running_mean, running_var)


# --- fused activation and residual add ---------------------------------------------------------


def check_fusion_args(
    input: torch.Tensor,
    activation: str | None,
    residual: torch.Tensor | None,
    negative_slope: float,
) -> None:
    """Rejects fused-path arguments :func:`batch_norm` cannot use, before anything changes.

    Args:
        input: the (already checked) input.
        activation, residual, negative_slope: as in :func:`batch_norm`.

    Raises:
        ValueError: if ``activation`` is not a known name or ``residual`` has another shape.
        TypeError: if ``residual`` is not a tensor of ``input``'s dtype, or ``negative_slope``
            is not a finite number.
        RuntimeError: if ``residual`` is on another device than ``input``.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: expected None or one of {', '.join(ACTIVATIONS)}, got {activation!r}"
        )
    if (
        isinstance(negative_slope, bool)
        or not isinstance(negative_slope, (int, float))
        or not math.isfinite(negative_slope)
    ):
        raise TypeError(f"negative_slope: expected a finite float, got {negative_slope!r}")
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual: expected a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ValueError(
            f"residual: expected the shape of input {tuple(input.shape)}, "
            f"got {tuple(residual.shape)}"
        )
    if residual.dtype != input.dtype:
        raise TypeError(f"residual: expected dtype {input.dtype} (input's), got {residual.dtype}")
    if residual.device != input.device:
        raise RuntimeError(
            f"residual: expected a tensor on {input.device} (the device of input), "
            f"got one on {residual.device}"
        )
