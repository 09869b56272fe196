"""Evaluation forward: ``y = act(x·scale + shift + z)`` from the running statistics, one pass.

Per channel ``scale = γ / sqrt(running_var + ε)`` and ``shift = β − running_mean·scale`` are
computed in the kernel (fp32), so evaluation reads ``x`` (and ``z``) once and writes ``y`` once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.triton.batchnorm_fwd import _normalize_rows, _tile_range
from batchnorm.kernels.triton.common import scale_shift


@triton.jit
def inference_kernel(
    x_ptr, y_ptr, z_ptr,  # (N, C, L) input, output, residual
    weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr,  # (C,) γ, β, running μ and σ²
    N, l_groups, C, tiles_per_program,
    sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l,
    eps, slope,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, L_VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Normalizes with the running statistics over the ``(channel block, row block)`` grid."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    sx_n, sx_c = sx_n * L_VEC, sx_c * L_VEC  # passed in units of L_VEC
    sy_n, sy_c = sy_n * L_VEC, sy_c * L_VEC  # passed in units of L_VEC
    sz_n, sz_c = sz_n * L_VEC, sz_c * L_VEC  # passed in units of L_VEC
    L = l_groups * L_VEC
    l_blocks = tl.cdiv(L, BLOCK_L)
    tile_begin, tile_end = _tile_range(tl.program_id(1), tiles_per_program, N, l_blocks, BLOCK_N)
    mean = tl.load(running_mean_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    var = tl.load(running_var_ptr + cols, mask=cols < C, other=1.0).to(tl.float32)
    invstd = 1.0 / tl.sqrt(var + eps)  # [BLOCK_C]
    scale, shift = scale_shift(weight_ptr, bias_ptr, mean, invstd, cols, C, HAS_WEIGHT, HAS_BIAS)
    _normalize_rows(
        x_ptr, y_ptr, z_ptr, x_ptr, tile_begin, tile_end, l_blocks, N, L, C, cols, scale,
        shift, slope, sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l, 0, 0, 0,
        HAS_RESIDUAL, ACTIVATION, False, BLOCK_N, BLOCK_L,
    )  # fmt: skip
