"""Triton backend: the kernels of :mod:`batchnorm.kernels.triton` behind the backend contract.

The whole call, plain or fused (``y = act(γ·x̂ + β + z)``), runs in the Triton kernels for
float16, bfloat16 and float32 (statistics, γ, β and reductions in float32), on any strides of the
``(N, C, L)`` view, channels_last included, without copying; float64 goes to the pure-torch
backend (Triton's fp64 path has no use here). Eager calls launch through plain autograd
functions; traced calls (``torch.compile``, fake tensors, ``torch.func``) through the
``torch.library`` ops of :mod:`batchnorm.backends.triton_ops`, whose fakes serve tracing, or,
under ``torch.compile`` with ``BATCHNORM_TRITON_COMPILED``, their ``triton_op`` twins of
:mod:`batchnorm.backends.triton_compiled` (kernels visible to Inductor). Launch code and
arrangements: :mod:`batchnorm.kernels.triton.launch`.
"""

from __future__ import annotations

import torch

from batchnorm._math import new_running_stats
from batchnorm.backends import triton_compiled
from batchnorm.backends.base import (
    Backend,
    BatchNormOutput,
    Call,
    ForwardResult,
    FusedForwardResult,
    Gradients,
    Saved,
    channel_view,
)
from batchnorm.backends.torch_backend import TorchBackend
from batchnorm.backends.triton_ops import (
    InferenceFunction,
    TrainFunction,
    inference_op,
    runs_eagerly,
    train_backward_op,
    train_op,
)
from batchnorm.kernels.triton.common import interpreting
from batchnorm.kernels.triton.launch import (
    ARRANGEMENT_ENV_VAR,
    placeholder,
    train_backward,
    train_forward,
)

__all__ = ["ARRANGEMENT_ENV_VAR", "TritonBackend", "inference_op", "train_backward_op", "train_op"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether a running buffer requires grad (it then must not be modified in place)."""
    return any(t is not None and t.requires_grad for t in tensors)


_TORCH_BACKEND = TorchBackend()


class TritonBackend(Backend):
    """Batch normalization on Triton kernels (see :class:`Backend` and the module docstring).

    Whole calls, plain and fused (``y = act(γ·x̂ + β + z)``), for the dtypes the kernels take
    (:meth:`supports_fusion`): :meth:`train` runs :meth:`forward_act` (differentiable, with the
    running update in the reduction kernel), :meth:`evaluate` runs :meth:`inference_act`. Backward,
    through autograd: ``du = dy·act'(u)``, ``dz = du``, ``(dx, dγ, dβ)`` from the saved ``μ``,
    ``r`` (nothing input-sized but a 1-byte mask where the activation needs one).
    """

    name = "triton"

    def train(self, call: Call) -> BatchNormOutput | None:
        """The whole training call in the Triton kernels; see :class:`Backend`."""
        x3 = channel_view(call.input)  # (N, C, L), a view when possible
        if not self.supports_fusion(x3, call.fusion is not None):
            return None
        activation, slope, residual = call.fusion or (None, 0.01, None)
        z3 = None if residual is None else channel_view(residual)  # (N, C, L)
        in_place = call.update_in_place and not _needs_grad(call.running_mean, call.running_var)
        result = self.forward_act(
            x3, call.weight, call.bias, z3, call.eps, activation, slope, call.running_mean,
            call.running_var, call.momentum, in_place,
        )  # fmt: skip
        new_mean, new_var = new_running_stats(
            call.running_mean, call.running_var, result.mean, result.var,
            x3.shape[0] * x3.shape[2], call.momentum,
            computed=(result.running_mean, result.running_var),
        )  # fmt: skip
        return BatchNormOutput(result.y.reshape(call.input.shape), new_mean, new_var)

    def evaluate(self, call: Call) -> torch.Tensor | None:
        """The whole evaluation call in one Triton kernel; see :class:`Backend`."""
        x3 = channel_view(call.input)  # (N, C, L), a view when possible
        if not self.supports_fusion(x3, call.fusion is not None):
            return None
        assert call.running_mean is not None  # checked by check_batch_norm_args
        assert call.running_var is not None
        activation, slope, residual = call.fusion or (None, 0.01, None)
        z3 = None if residual is None else channel_view(residual)  # (N, C, L)
        y3 = self.inference_act(
            x3, call.running_mean, call.running_var, call.weight, call.bias, z3, call.eps,
            activation, slope,
        )  # fmt: skip
        return y3.reshape(call.input.shape)

    def __init__(self) -> None:
        """Checks that the kernels can run here at all.

        Raises:
            ImportError: without a CUDA device and outside the interpreter (so the registry
                reports the backend as unavailable, with this reason).
        """
        if not torch.cuda.is_available() and not interpreting():
            raise ImportError(
                "Triton kernels need a CUDA device, or TRITON_INTERPRET=1 (set before importing "
                "batchnorm) to run them on CPU tensors in the interpreter"
            )

    def supports_fusion(self, x: torch.Tensor, fused: bool = False) -> bool:
        """Whether the fused ops take ``x``: float16, bfloat16 and float32 (not float64)."""
        return x.dtype in _SUPPORTED_DTYPES

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> ForwardResult:
        """Training-mode forward on the ``(N, C, L)`` view; see :class:`Backend`."""
        if not self.supports_fusion(x):
            return _TORCH_BACKEND.forward(x, weight, bias, eps)
        if runs_eagerly(x, weight, bias):
            forward = train_forward
        else:
            compiled = triton_compiled.use_triton_op(x)
            forward = triton_compiled.train_compiled_op if compiled else train_op
        y, mean, invstd, var, *_ = forward(x, weight, bias, None, None, None, 0.0, eps, "none", 0.0)
        return ForwardResult(y, mean, invstd, var)

    def backward(self, dy: torch.Tensor, saved: Saved) -> Gradients:
        """Backward of :meth:`forward`; see :class:`Backend`."""
        x, weight, mean, invstd = saved
        if not self.supports_fusion(x):
            return _TORCH_BACKEND.backward(dy, saved)
        if runs_eagerly(x, dy, weight):
            backward = train_backward
        else:
            compiled = triton_compiled.use_triton_op(x)
            backward = triton_compiled.train_backward_compiled_op if compiled else train_backward_op
        dx, dweight, dbias, _dz = backward(
            dy, x, weight, None, None, placeholder(x), mean, invstd, "none", 0.0, False
        )
        return Gradients(dx, dweight, dbias)

    def forward_act(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        activation: str | None,
        negative_slope: float,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        momentum: float,
        in_place: bool = False,
    ) -> FusedForwardResult:
        """Differentiable ``act(γ·x̂ + β + z)`` with batch statistics.

        With ``in_place`` (and an eager call) the kernel moves the given buffers themselves and
        returns them as the new running statistics; otherwise they are new tensors.
        """
        direct = runs_eagerly(x, weight, bias, residual, running_mean, running_var)
        args = (
            x, weight, bias, residual, running_mean, running_var, float(momentum), float(eps),
            activation or "none", float(negative_slope),
        )  # fmt: skip
        outputs = (
            TrainFunction.apply(*args, in_place)  # type: ignore[no-untyped-call]
            if direct
            else (
                triton_compiled.train_compiled_op if triton_compiled.use_triton_op(x) else train_op
            )(*args)
        )
        y, mean, invstd, var, _mask, new_mean, new_var = outputs
        has_running = new_mean.numel() > 0
        return FusedForwardResult(
            y,
            mean,
            invstd,
            var,
            new_mean if has_running else None,
            new_var if has_running else None,
        )

    def inference_act(
        self,
        x: torch.Tensor,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        eps: float,
        activation: str | None,
        negative_slope: float,
    ) -> torch.Tensor:
        """``act(γ·(x − μ̄)/sqrt(σ̄² + ε) + β + z)`` from the running statistics."""
        direct = runs_eagerly(x, running_mean, running_var, weight, bias, residual)
        if direct:
            run = InferenceFunction.apply
        else:
            compiled = triton_compiled.use_triton_op(x)
            run = triton_compiled.inference_compiled_op if compiled else inference_op
        y: torch.Tensor = run(  # type: ignore[no-untyped-call]
            x, running_mean, running_var, weight, bias, residual, float(eps),
            activation or "none", float(negative_slope),
        )  # fmt: skip
        return y
