"""ATen backend: PyTorch's own native batch-norm kernels behind our backend contract.

Forward calls ``aten::native_batch_norm`` and backward ``aten::native_batch_norm_backward``, the
kernels ``torch.nn.functional.batch_norm`` runs, so on any device and dtype this backend is as
fast as PyTorch itself while our code keeps validation, the running update and autograd.

Four details keep our semantics and ATen's speed:

* the biased variance ``σ²`` is not among ATen's outputs (it returns ``invstd``, from which
  ``σ²`` cannot be recovered when ``σ² ≪ ε``); it comes from a scratch running variance updated
  with ``momentum = 1``, i.e. the unbiased variance ``σ²·M/(M − 1)`` ATen computes from its
  own two-pass sums, rescaled by ``(M − 1)/M``;
* an input whose channels are innermost (``channels_last``, or a ``(N, C)`` matrix viewed as
  ``(N, C, 1)``) is handed over as its ``(M, C)`` matrix view, the layout ATen's channels-last
  kernels take; the ``(N, C, L)`` view of such a tensor would fall to ATen's slow generic path
  (the whole-call shortcut below hands float32/float64 ``channels_last`` tensors over as they
  are, see :func:`native_operand`);
* ``weight``/``bias`` go in the statistics dtype, so ATen keeps statistics and sums in float32
  for float16/bfloat16 input (its mixed-precision kernels) whatever the parameters' dtype;
* any other strides are made contiguous first: ATen's generic path for strided input is slow and
  sums ``dγ``, ``dβ`` of bfloat16 input in bfloat16.

Besides the contract, :meth:`AtenBackend.forward_update` runs a whole training call the way
``torch.nn.functional.batch_norm`` does: one ``torch.batch_norm`` on the input as given,
differentiated by ATen's own autograd formula (the one :meth:`AtenBackend.backward` calls) and
updating the running buffers in its kernel (copies of them, except for the in-place
:func:`batch_norm`, whose checked buffers ATen moves itself, as ``F.batch_norm`` does). It
skips the per-call work of the generic path (an autograd function in Python, scratch buffers, a
separate running update), about 60 µs a call, which is 5–10% of a 1 ms batch norm. What remains
on top of ``F.batch_norm`` is our argument checks and backend choice, about 10 µs a call with
warm caches and 20–25 µs with cold ones (``benchmarks/cpu_overhead.py``).

Why this file is long: the layout rules ATen's kernels need (row views, channels_last, dtypes)
are small helpers used by the ``cpu`` backend too, kept beside the backend they serve.
"""

from __future__ import annotations

import torch

from batchnorm import _compat
from batchnorm.backends.base import (
    Backend,
    BatchNormOutput,
    Call,
    ForwardResult,
    Gradients,
    Saved,
    channel_view,
    compute_dtype,
    normalize_with_running_stats,
    plain_evaluation,
)

__all__ = [
    "AtenBackend",
    "any_requires_grad",
    "channel_rows",
    "kernel_buffers",
    "native_operand",
    "rows_as_input",
    "statistics_weight",
    "torch_inference",
]

_REDUCED_FLOATS = (torch.float16, torch.bfloat16)
#: Rank → the channels-last memory format ATen's kernels take as it is.
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def channel_rows(x: torch.Tensor) -> torch.Tensor | None:
    """The ``(M, C)`` matrix view of ``x`` ``(N, C, L)`` when channels are innermost, else None.

    Args:
        x: a tensor of shape ``(N, C, L)``.

    Returns:
        ``x`` as ``(N·L, C)`` without a copy if its memory is ordered ``(N, L, C)`` (channels
        innermost, dense); ``None`` otherwise.
    """
    transposed = x.transpose(1, 2)  # (N, L, C)
    if not transposed.is_contiguous():
        return None
    return transposed.view(-1, x.shape[1])  # (M, C)


def _from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`channel_rows`: the ``(M, C)`` tensor back as ``like``'s ``(N, C, L)``."""
    n_batch, channels, length = like.shape
    return rows.view(n_batch, length, channels).transpose(1, 2)  # (N, C, L), strides of like


def _cast(values: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``values`` ``(C,)`` in ``dtype`` (ATen takes per-channel tensors of one dtype), or None."""
    return None if values is None else values.to(dtype)


def _is_standard_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` (4D/5D) has exactly the strides ``channels_last`` allocation gives it.

    ``is_contiguous(memory_format=channels_last)`` also accepts other strides on size-1 dims,
    and ATen's channels-last backward computes wrong gradients for those (so does
    ``torch.nn.BatchNorm2d``); such tensors take the ``(M, C)`` view instead.
    """
    if x.dim() not in _CHANNELS_LAST:
        return False
    sizes = x.shape
    expected = [0] * len(sizes)
    step = 1
    for dim in (1, *range(len(sizes) - 1, 1, -1), 0):  # channels innermost, then W, H(, D), N
        expected[dim] = step
        step *= sizes[dim]
    return x.stride() == tuple(expected)


def statistics_weight(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
) -> torch.Tensor | None:
    """``weight``, or float32 ones where ATen would otherwise keep statistics in low precision.

    ATen's mixed-precision kernels (float32 statistics for float16/bfloat16 input) run only
    when a float32 per-channel tensor comes with the input; with none at all it saves ``μ`` and
    ``r`` in the input's dtype, which its backward (and ours) then uses. A weight of ones (no
    gradient) changes nothing else: ``y = 1·x̂``.

    Args:
        input: the input ``(N, C, *)``.
        weight, bias, running_mean, running_var: the per-channel tensors or None.

    Returns:
        ``weight`` as given, or ``torch.ones(C)`` (float32) for float16/bfloat16 input when all
        four are None.
    """
    if (
        weight is None
        and bias is None
        and running_mean is None
        and running_var is None
        and input.dtype in _REDUCED_FLOATS
    ):
        return torch.ones(input.shape[1], dtype=torch.float32, device=input.device)  # (C,)
    return weight


def native_operand(
    input: torch.Tensor, *per_channel: torch.Tensor | None, gradients: bool = True
) -> tuple[torch.Tensor, bool] | None:
    """What ``torch.batch_norm`` should get for ``input`` to run its fast kernels, if anything.

    Args:
        input: the input ``(N, C, *)``, as the caller has it.
        per_channel: weight, bias and running buffers ``(C,)``, ``None`` where absent.
        gradients: whether autograd may differentiate the call (then float16/bfloat16
            channels-last input goes as its ``(M, C)`` view, see below).

    Returns:
        ``(operand, is_rows)``: ``input`` itself when it is contiguous, or a ``channels_last``
        4D/5D tensor of float32/float64, or of any dtype without ``gradients`` (``is_rows``
        False: ATen's own kernels for that format, 3–4% faster than its 2D ones for
        inference and what ``F.batch_norm`` runs); its ``(M, C)`` matrix view when its
        channels are otherwise innermost (float16/bfloat16 channels-last with ``gradients``,
        or any rank; ``is_rows`` True: ATen's 2D kernels sum the gradients of
        float16/bfloat16 input in float32, its channels-last 4D ones do not); ``None`` when
        the input is empty (ATen's CPU kernels divide by the count), has other strides, a
        ``torch.func`` transform is active, or the dtypes are not ones ATen's kernels take
        together: per-channel tensors all of ``input``'s dtype (float32/float64 input) or all
        float32 (float16/bfloat16 input: the mixed-precision kernels, statistics and sums in
        float32).
    """
    if input.numel() == 0 or _compat.functorch_active():
        return None
    expected = torch.float32 if input.dtype in _REDUCED_FLOATS else input.dtype
    for tensor in per_channel:  # a plain loop: this runs on every call
        if tensor is not None and tensor.dtype != expected:
            return None
    if input.is_contiguous():
        return input, False
    if (not gradients or input.dtype not in _REDUCED_FLOATS) and _is_standard_channels_last(input):
        return input, False  # ATen's channels-last kernels, as F.batch_norm runs them
    innermost = input.movedim(1, -1)  # (N, *, C)
    if not innermost.is_contiguous():
        return None
    return innermost.view(-1, input.shape[1]), True  # (M, C)


def rows_as_input(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`native_operand`'s ``(M, C)`` view: ``rows`` laid out like ``like``."""
    spatial = like.shape[2:]
    return rows.view(like.shape[0], *spatial, like.shape[1]).movedim(-1, 1)  # (N, C, *)


def any_requires_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether any of these tensors (None allowed) requires grad."""
    for tensor in tensors:  # noqa: SIM110  (any() over a generator costs a frame per call)
        if tensor is not None and tensor.requires_grad:
            return True
    return False


def kernel_buffers(
    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, in_place: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The running buffers an ATen training kernel may move: the given ones or copies.

    Args:
        running_mean, running_var: the checked buffers ``(C,)``, both or neither.
        in_place: whether the caller lets the kernel move the given buffers themselves.

    Returns:
        The given buffers with ``in_place``, else (and always for buffers that require grad,
        which ATen refuses to modify) detached copies; ``None`` where none is given.
    """
    if running_mean is None or running_var is None:
        return running_mean, running_var
    if in_place and not any_requires_grad(running_mean, running_var):
        return running_mean, running_var
    return running_mean.detach().clone(), running_var.detach().clone()  # (C,), (C,)


def torch_inference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """The evaluation forward ``(x − μ)·γ/sqrt(var + ε) + β`` in torch operations.

    Differentiable by autograd and by ``torch.func`` transforms; used where a kernel cannot run.
    """
    y = normalize_with_running_stats(x, running_mean, running_var, weight, bias, eps)  # (N, C, L)
    return y.to(x.dtype)


class AtenBackend(Backend):
    """Batch normalization on ATen's native kernels (see :class:`Backend`).

    Whole calls: plain training runs :meth:`forward_update` (one ``torch.batch_norm`` on the
    input as given) and plain evaluation :meth:`inference`; fused calls, and training inputs
    ATen's fast kernels do not take as they are, go to the generic path over :meth:`forward`
    and :meth:`backward`.
    """

    name = "aten"

    def train(self, call: Call) -> BatchNormOutput | None:
        """Plain training in one ATen call where it takes the tensors; see :class:`Backend`."""
        return None if call.fusion is not None else self.forward_update(call)

    def evaluate(self, call: Call) -> torch.Tensor | None:
        """Plain evaluation in one ATen pass; see :class:`Backend`."""
        return plain_evaluation(self.inference, call)

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> ForwardResult:
        """Training-mode forward on the ``(N, C, L)`` view; see :class:`Backend`."""
        channels = x.shape[1]
        count = x.shape[0] * x.shape[2]  # M = N·L
        stats_dtype = compute_dtype(x.dtype)
        # Scratch running buffers in the statistics dtype (also makes ATen keep its statistics
        # in float32 for float16/bfloat16 input); with momentum 1 the variance buffer receives
        # the unbiased batch variance.
        scratch_mean = torch.zeros(channels, dtype=stats_dtype, device=x.device)  # (C,)
        scratch_var = torch.zeros(channels, dtype=stats_dtype, device=x.device)  # (C,)
        if count == 0:
            # Empty batch: nothing to normalize, statistics undefined (never used: no update).
            return ForwardResult(
                torch.empty_like(x), scratch_mean, torch.rsqrt(scratch_var + eps), scratch_var
            )
        rows = channel_rows(x)  # (M, C) or None
        dense = x.contiguous() if rows is None else rows  # (N, C, L) or (M, C)
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            dense,
            _cast(weight, stats_dtype),
            _cast(bias, stats_dtype),
            scratch_mean,
            scratch_var,
            True,
            1.0,
            eps,
        )
        var = scratch_var * ((count - 1) / count)  # (C,)  unbiased → biased σ²
        return ForwardResult(y if rows is None else _from_rows(y, x), mean, invstd, var)

    def forward_update(self, call: Call) -> BatchNormOutput | None:
        """A whole plain training call in one ATen operation, or ``None`` where it cannot run.

        ``y = γ·(x − μ)·r + β`` with the batch statistics, differentiable by autograd
        (ATen's ``native_batch_norm_backward``, double backward included); ATen moves copies
        of the running buffers, so the given ones are left as they are, unless
        ``call.update_in_place`` (the caller has checked every argument, so the kernel cannot
        fail half-way).

        Args:
            call: the checked call (its ``fusion`` is not looked at: the caller's business).

        Returns:
            ``y`` like ``call.input`` and the new running statistics (the given buffers with
            ``update_in_place``; ``None`` where no buffer was given); or ``None`` when
            :func:`native_operand` rejects the tensors or only one buffer is given (the caller
            then runs the generic path).
        """
        input, weight, bias = call.input, call.weight, call.bias
        running_mean, running_var = call.running_mean, call.running_var
        if (running_mean is None) != (running_var is None):
            return None
        native = native_operand(input, weight, bias, running_mean, running_var)
        if native is None:
            return None
        operand, is_rows = native  # input, or its (M, C) view
        new_mean, new_var = kernel_buffers(running_mean, running_var, call.update_in_place)
        weight = statistics_weight(input, weight, bias, running_mean, running_var)
        y = torch.batch_norm(
            operand, weight, bias, new_mean, new_var, True, call.momentum, call.eps, False
        )
        return BatchNormOutput(rows_as_input(y, input) if is_rows else y, new_mean, new_var)

    def inference(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        eps: float,
    ) -> torch.Tensor:
        """Evaluation-mode forward: ``y = (x − μ)·γ/sqrt(var + ε) + β``, one pass.

        Args:
            x: the input, ``(N, C, *)`` (the ``(N, C, L)`` view or the caller's own shape).
            weight, bias: ``γ``, ``β`` ``(C,)`` or None.
            running_mean, running_var: the population estimates ``μ``, ``var`` ``(C,)``.
            eps: added to the variance inside the square root.

        Returns:
            ``y`` like ``x`` (ATen's inference kernel, ``x·a + b`` per channel), differentiable
            by autograd with respect to ``x``, ``weight`` and ``bias``.
        """
        gradients = torch.is_grad_enabled() and any_requires_grad(x, weight, bias)
        native = native_operand(x, weight, bias, running_mean, running_var, gradients=gradients)
        if native is not None:
            operand, is_rows = native  # x, or its (M, C) view
            y = torch.batch_norm(
                operand, weight, bias, running_mean, running_var, False, 0.0, eps, False
            )
            return rows_as_input(y, x) if is_rows else y
        x3 = channel_view(x)  # (N, C, L), a view when the strides allow
        if x.numel() == 0:  # ATen's CPU kernel divides by zero on empty input
            return torch_inference(x3, weight, bias, running_mean, running_var, eps).reshape(
                x.shape
            )
        stats_dtype = compute_dtype(x.dtype)
        rows = channel_rows(x3)  # (M, C) or None
        y3, _, _ = torch.ops.aten.native_batch_norm(
            x3.contiguous() if rows is None else rows,
            _cast(weight, stats_dtype),
            _cast(bias, stats_dtype),
            running_mean.to(stats_dtype),
            running_var.to(stats_dtype),
            False,
            0.0,
            eps,
        )
        return (y3 if rows is None else _from_rows(y3, x3)).reshape(x.shape)

    def backward(self, dy: torch.Tensor, saved: Saved) -> Gradients:
        """Backward of :meth:`forward`; see :class:`Backend`.

        ``dy`` may come in the statistics dtype (float32 for float16/bfloat16 ``x``: the fused
        composition's ``du = dy·act'(u)``); ATen's kernels (CPU and CUDA) need it in ``x``'s
        dtype, so it is rounded to it, as PyTorch's own activation backward would have left
        it. Without ``weight``, a weight of ones goes in (``dx`` is the same): ATen's CUDA
        kernels need one to return ``dγ`` and ``dβ`` of shape ``(C,)``.
        """
        x, weight, mean, invstd = saved
        stats_dtype = compute_dtype(x.dtype)
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)  # (N, C, L)
        if x.shape[0] * x.shape[2] == 0:
            zeros = torch.zeros(x.shape[1], dtype=stats_dtype, device=x.device)  # (C,)
            return Gradients(torch.zeros_like(x), zeros, zeros.clone())
        rows = channel_rows(x)  # (M, C) or None
        if weight is None:
            weight = torch.ones(x.shape[1], dtype=stats_dtype, device=x.device)  # (C,)  γ = 1
        weight = _cast(weight, stats_dtype)
        if rows is not None:
            # dy in x's layout (no copy when autograd hands it over that way), as (M, C).
            dy_rows = dy.transpose(1, 2).contiguous().view(rows.shape)  # (M, C)
            dx_rows, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
                dy_rows, rows, weight, None, None, mean, invstd, True, 0.0, [True, True, True]
            )
            dx = _from_rows(dx_rows, x)  # (N, C, L)
        else:
            dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
                dy.contiguous(),
                x.contiguous(),
                weight,
                None,
                None,
                mean,
                invstd,
                True,
                0.0,
                [True, True, True],
            )
        return Gradients(dx, dweight.to(stats_dtype), dbias.to(stats_dtype))
