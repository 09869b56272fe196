"""Evaluation forward: ``y = act(x·scale + shift + z)`` from the running statistics, one pass.

Per channel ``scale = γ / sqrt(running_var + ε)`` and ``shift = β − running_mean·scale`` are
computed in the kernel (fp32), so evaluation reads ``x`` (and ``z``) once and writes ``y`` once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.triton.batchnorm_fwd import _normalize_rows
from batchnorm.kernels.triton.common import scale_shift


@triton.jit
def inference_kernel(
    x_ptr, y_ptr, z_ptr,  # (N, C, L) input, output, residual
    weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,  # (C,) γ, β, running μ and σ²
    M, L, C, eps, slope,
    sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Normalizes with the running statistics over the ``(channel block, row block)`` grid."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mean = tl.load(running_mean_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    var = tl.load(running_var_ptr + cols, mask=cols < C, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)  # [BLOCK_C]
    scale, shift = scale_shift(weight_ptr, bias_ptr, mean, invstd, cols, C, HAS_WEIGHT, HAS_BIAS)
    _normalize_rows(
        x_ptr, y_ptr, z_ptr, x_ptr, tl.program_id(1) * rows_per_program, M, L, C, cols, scale,
        shift, slope, sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l, 0, 0, 0,
        rows_per_program, HAS_RESIDUAL, ACTIVATION, False, BLOCK_M,
    )  # fmt: skip
