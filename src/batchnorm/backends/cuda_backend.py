"""CUDA backend for ``auto``: Triton where it measured faster than PyTorch, ATen elsewhere.

Triton's kernels pay only where ATen's CUDA kernels are slow *and* the problem is large enough to
hide the host's work around Triton's launches; :data:`batchnorm.backends.measured.TRITON_CASES`
holds the four measured rules (plain or fused, NCHW or channels_last: the smallest input and row
length), with the run they come from. Every other call runs on the
:class:`~batchnorm.backends.aten_backend.AtenBackend` (cuDNN or ATen's native CUDA kernels, with
our validation, running-statistics rules and the fused add/activation in torch operations).
``backend="triton"`` still runs the Triton kernels everywhere. The ATen route differentiates
twice (ATen's autograd) where the Triton kernels do not, and rounds ``bn(x)`` to
float16/bfloat16 before a residual where Triton keeps it in float32, so these details of a call
can change with its size.
"""

from __future__ import annotations

import torch

from batchnorm.backends.aten_backend import AtenBackend
from batchnorm.backends.base import (
    Backend,
    BatchNormOutput,
    Call,
    ForwardResult,
    Gradients,
    Saved,
    channel_view,
)
from batchnorm.backends.measured import TRITON_CASES, TritonCase
from batchnorm.backends.triton_backend import TritonBackend

__all__ = ["TRITON_CASES", "CudaBackend", "TritonCase"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _row_length(x: torch.Tensor) -> int:
    """``L``: the values per (sample, channel) of an ``(N, C, *)`` tensor."""
    channels_and_batch = x.shape[0] * x.shape[1]
    return x.numel() // channels_and_batch if channels_and_batch else 0


class CudaBackend(Backend):
    """``auto`` on CUDA: :class:`TritonBackend` where it measured faster, :class:`AtenBackend` else.

    Each whole call goes to one of the two: Triton's where :meth:`supports_fusion` says so (by
    dtype, layout, size, and whether the call is fused), ATen's otherwise (its one-call training and
    inference; fused calls it leaves to the generic path over ATen's primitives). Plain
    evaluation always goes to ATen: one elementwise kernel at bandwidth there too, without
    Triton's host work.
    """

    name = "cuda"

    def __init__(self, triton_cases: dict[tuple[bool, bool], TritonCase] | None = None) -> None:
        """Builds both backends.

        Args:
            triton_cases: where Triton runs (tests widen it); default :data:`TRITON_CASES`.

        Raises:
            ImportError: when the Triton backend cannot run here (``auto`` then takes ATen).
        """
        self.triton_cases = TRITON_CASES if triton_cases is None else triton_cases
        self._triton = TritonBackend()
        self._aten = AtenBackend()

    def supports_fusion(self, x: torch.Tensor, fused: bool = False) -> bool:
        """Whether Triton takes the call on ``x`` ``(N, C, *)``: dtype, layout, size, and
        whether it has an activation or residual (``fused``); see the module doc."""
        if x.dtype not in _TRITON_DTYPES or x.dim() < 3:
            return False
        case = self.triton_cases[(fused, x.stride(1) == 1 and x.shape[1] > 1)]
        return x.numel() >= case.min_values and _row_length(x) >= case.min_row

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> ForwardResult:
        """ATen's forward primitive (what the generic path composes)."""
        return self._aten.forward(x, weight, bias, eps)

    def backward(self, dy: torch.Tensor, saved: Saved) -> Gradients:
        """ATen's backward primitive."""
        return self._aten.backward(dy, saved)

    def train(self, call: Call) -> BatchNormOutput | None:
        """Triton's whole call where it takes it, else ATen's; see :class:`Backend`."""
        fused = call.fusion is not None
        # A plain call is judged on the input as given, a fused one on its (N, C, L) view.
        probe = channel_view(call.input) if fused else call.input
        if self.supports_fusion(probe, fused):
            return self._triton.train(call)
        return self._aten.train(call)

    def evaluate(self, call: Call) -> torch.Tensor | None:
        """Fused evaluation on Triton where it takes it; plain evaluation on ATen."""
        if call.fusion is None:
            return self._aten.evaluate(call)
        if self.supports_fusion(channel_view(call.input), True):
            return self._triton.evaluate(call)
        return None
