"""CUDA backend for ``auto``: Triton where it measured faster than PyTorch, ATen elsewhere.

On a GPU the Triton kernels move close to 0.6 of copy bandwidth, but the host's work per
training step (Python around six launches) is about 0.95 ms on an H200, where
``F.batch_norm`` costs 0.12–0.17 ms (``benchmarks/gpu_overhead.py``). So Triton only pays where
ATen's CUDA kernels are slow *and* the problem is large enough to hide that work. In the
H200 run of ``benchmarks/gpu.py`` (``benchmarks/results/nvidia-h200-2026-11-26.log``, training
forward+backward against eager) Triton won on:

* plain batch norm, ``(N, C, L)`` inputs with rows contiguous (NCHW), ``L ≥ 2048`` and at least
  ``2²⁵`` values: 256×64×112×112 (3.9× eager in float32, 7.9× in bfloat16), 256×256×56×56
  (1.4×, 2.2×), 256×64×56×56 (1.6×, 2.3×). Shorter rows or fewer values lost (0.12–0.94×:
  256×512×28×28, 256×128×28×28, 256×1024×14×14, 32×64×56×56, 8192×1024, ...), because ATen's
  NCHW kernels are fast there;
* plain, channels_last, from ``2²⁷`` values with ``L ≥ 2048``: 256×64×112×112 (1.5×),
  256×256×56×56 (1.2×); 256×64×56×56 lost (0.49×);
* with a residual and ReLU (against eager's three operations; the rule is applied to every call
  with an activation or a residual, the others unmeasured), NCHW from ``2²⁵`` values with
  ``L ≥ 512``: the three above and 256×512×28×28 (1.44× float32, 1.03× bfloat16);
  256×128×28×28 and 256×1024×14×14 lost (0.54–0.77×);
* the same, channels_last, from ``2²⁶`` values with ``L ≥ 512``: 256×64×112×112 (1.49×),
  256×256×56×56 (1.16×), 256×512×28×28 (1.18×); 256×64×56×56 and 256×1024×14×14 lost (0.55×,
  0.58×).

:data:`TRITON_CASES` holds these four rules; every other call runs on the
:class:`~batchnorm.backends.aten_backend.AtenBackend` (cuDNN or ATen's native CUDA kernels,
with our validation, running-statistics rules and the fused add/activation in torch
operations). ``backend="triton"`` still runs the Triton kernels everywhere. The ATen route
differentiates twice (ATen's autograd) where the Triton kernels do not, and rounds ``bn(x)``
to float16/bfloat16 before a residual where Triton keeps it in float32, so these details of a
call can change with its size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from batchnorm.backends.aten_backend import AtenBackend
from batchnorm.backends.base import FusedForwardResult
from batchnorm.backends.triton_backend import TritonBackend

__all__ = ["TRITON_CASES", "CudaBackend", "TritonCase"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonCase(NamedTuple):
    """Where the Triton kernels take a layout: both bounds must hold."""

    min_values: int  # numel of the input
    min_row: int  # L, the values per (sample, channel) row


#: ``(fused, channels_innermost)`` → where Triton measured faster (see module doc); ``fused``:
#: the call has an activation or a residual; channels innermost: channel stride 1.
TRITON_CASES: dict[tuple[bool, bool], TritonCase] = {
    (False, False): TritonCase(min_values=1 << 25, min_row=2048),
    (False, True): TritonCase(min_values=1 << 27, min_row=2048),
    (True, False): TritonCase(min_values=1 << 25, min_row=512),
    (True, True): TritonCase(min_values=1 << 26, min_row=512),
}


def _row_length(x: torch.Tensor) -> int:
    """``L``: the values per (sample, channel) of an ``(N, C, *)`` tensor."""
    channels_and_batch = x.shape[0] * x.shape[1]
    return x.numel() // channels_and_batch if channels_and_batch else 0


class CudaBackend(AtenBackend):
    """``auto`` on CUDA: :class:`TritonBackend` where it measured faster, :class:`AtenBackend` else.

    The ATen backend itself (the plain contract, the whole-call ``forward_update`` and
    ``inference``), plus the fused contract: :meth:`supports_fusion` is True exactly where
    Triton takes the call, plain or fused, and :meth:`forward_act`/:meth:`inference_act` then
    run Triton's kernels.
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

    def supports_fusion(self, x: torch.Tensor, fused: bool = False) -> bool:
        """Whether Triton takes the call on ``x`` ``(N, C, *)``: dtype, layout, size, and
        whether it has an activation or residual (``fused``); see the module doc."""
        if x.dtype not in _TRITON_DTYPES or x.dim() < 3:
            return False
        case = self.triton_cases[(fused, x.stride(1) == 1 and x.shape[1] > 1)]
        return x.numel() >= case.min_values and _row_length(x) >= case.min_row

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
    ) -> FusedForwardResult:
        """Triton's fused training forward (called only where :meth:`supports_fusion`)."""
        return self._triton.forward_act(
            x, weight, bias, residual, eps, activation, negative_slope, running_mean,
            running_var, momentum,
        )  # fmt: skip

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
        """Triton's fused evaluation forward where :meth:`supports_fusion`; plain ones on ATen.

        Plain evaluation (no activation, no residual) is one elementwise kernel at bandwidth in
        ATen too, without Triton's host work, so it always goes there.
        """
        if activation is None and residual is None:
            return self.inference(x, weight, bias, running_mean, running_var, eps)
        return self._triton.inference_act(
            x, running_mean, running_var, weight, bias, residual, eps, activation, negative_slope
        )
