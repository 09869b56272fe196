"""Training backward: split ``Σdu``/``Σdu·x̂`` reduction → merge → ``dx`` (and ``dz``) pass.

With ``y = act(u)``, ``u = γ·x̂ + β + z`` and ``du = dy·act'(u)`` (``du = dy`` without activation),
per channel over the ``M`` rows (design.md §2)::

    dβ = Σ du,   dγ = Σ du·x̂,   dx = γ·r·(du − dβ/M − x̂·dγ/M),   dz = du

``u`` is recomputed from ``x`` (and ``z``) with the forward's own ``scale``/``shift``, or, for
(leaky) ReLU with a residual, read from the uint8 ``u > 0`` mask the forward saved, so ``z``
need not be read again. Arrangements as in :mod:`.batchnorm_fwd`: split launches everywhere,
one persistent launch with a per-channel-block barrier on the GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.triton.common import (
    activation_derivative,
    grid_barrier,
    scale_shift,
    tile_offsets,
)


@triton.jit
def _grad_tile(
    dy_ptr, x_ptr, z_ptr, positive_ptr, rows, cols, M, L, C, mean, invstd, scale, shift, slope,
    sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr,
):  # fmt: skip
    """``(du, x̂, valid)`` on a ``[BLOCK_M, BLOCK_C]`` tile; ``du`` and ``x̂`` are 0 off the tile."""
    valid = (rows < M)[:, None] & (cols < C)[None, :]  # [BLOCK_M, BLOCK_C]
    x = tl.load(x_ptr + tile_offsets(rows, cols, L, sx_n, sx_c, sx_l), mask=valid, other=0.0)
    x = x.to(tl.float32)
    dy = tl.load(dy_ptr + tile_offsets(rows, cols, L, sd_n, sd_c, sd_l), mask=valid, other=0.0)
    du = dy.to(tl.float32)  # [BLOCK_M, BLOCK_C]
    if ACTIVATION != 0:
        if FROM_MASK:
            p_offsets = tile_offsets(rows, cols, L, sp_n, sp_c, sp_l)
            positive = tl.load(positive_ptr + p_offsets, mask=valid, other=0)
            du = du * activation_derivative(du, positive, slope, ACTIVATION, True)
        else:
            u = x * scale[None, :] + shift[None, :]  # [BLOCK_M, BLOCK_C]  as in the forward
            if HAS_RESIDUAL:
                z_offsets = tile_offsets(rows, cols, L, sz_n, sz_c, sz_l)
                u = u + tl.load(z_ptr + z_offsets, mask=valid, other=0.0).to(tl.float32)
            du = du * activation_derivative(u, u, slope, ACTIVATION, False)
    x_hat = tl.where(valid, (x - mean[None, :]) * invstd[None, :], 0.0)  # [BLOCK_M, BLOCK_C]
    du = tl.where(valid, du, 0.0)
    return du, x_hat, valid


@triton.jit
def _accumulate_grads(
    dy_ptr, x_ptr, z_ptr, positive_ptr, row_begin, M, L, C, cols, mean, invstd, scale, shift,
    slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    rows_per_program,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``(Σdu, Σdu·x̂)`` per channel over this program's rows (fp32)."""
    sum_du = tl.zeros([BLOCK_C], tl.float32)
    sum_du_xhat = tl.zeros([BLOCK_C], tl.float32)
    for start in range(row_begin, row_begin + rows_per_program, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        du, x_hat, _valid = _grad_tile(
            dy_ptr, x_ptr, z_ptr, positive_ptr, rows, cols, M, L, C, mean, invstd, scale, shift,
            slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
            HAS_RESIDUAL, ACTIVATION, FROM_MASK,
        )  # fmt: skip
        sum_du += tl.sum(du, 0)
        sum_du_xhat += tl.sum(du * x_hat, 0)
    return sum_du, sum_du_xhat


@triton.jit
def _sum_partials(partial_ptr, P, C, cols, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(dβ, dγ)`` per channel: sums of the ``(2, P, C)`` partials (L1 bypassed)."""
    dbias = tl.zeros([BLOCK_C], tl.float32)
    dweight = tl.zeros([BLOCK_C], tl.float32)
    for p_start in range(0, P, BLOCK_P):
        programs = p_start + tl.arange(0, BLOCK_P)  # [BLOCK_P]
        valid = (programs < P)[:, None] & (cols < C)[None, :]  # [BLOCK_P, BLOCK_C]
        offsets = programs[:, None] * C + cols[None, :]  # [BLOCK_P, BLOCK_C]
        dbias += tl.sum(
            tl.load(partial_ptr + offsets, mask=valid, other=0.0, cache_modifier=".cg"), 0
        )
        dweight += tl.sum(
            tl.load(partial_ptr + P * C + offsets, mask=valid, other=0.0, cache_modifier=".cg"), 0
        )
    return dbias, dweight


@triton.jit
def _input_grad_rows(
    dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr, row_begin, M, L, C, cols, mean, invstd,
    scale, shift, slope, gain, mean_term, variance_term,
    sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l, rows_per_program,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr,
    WRITE_DZ: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``dx = gain·(du − dβ/M − x̂·dγ/M)`` and ``dz = du`` over this program's rows."""
    for start in range(row_begin, row_begin + rows_per_program, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        du, x_hat, valid = _grad_tile(
            dy_ptr, x_ptr, z_ptr, positive_ptr, rows, cols, M, L, C, mean, invstd, scale, shift,
            slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
            HAS_RESIDUAL, ACTIVATION, FROM_MASK,
        )  # fmt: skip
        dx = gain[None, :] * (du - mean_term[None, :] - x_hat * variance_term[None, :])
        dx_offsets = tile_offsets(rows, cols, L, sdx_n, sdx_c, sdx_l)
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)
        if WRITE_DZ:
            dz_offsets = tile_offsets(rows, cols, L, sdz_n, sdz_c, sdz_l)
            tl.store(dz_ptr + dz_offsets, du.to(dz_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _per_channel_terms(
    weight_ptr, bias_ptr, mean_ptr, invstd_ptr, cols, C, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """``(μ, r, scale, shift, γ·r)`` of channels ``cols`` (fp32)."""
    mean = tl.load(mean_ptr + cols, mask=cols < C, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cols < C, other=0.0)
    scale, shift = scale_shift(weight_ptr, bias_ptr, mean, invstd, cols, C, HAS_WEIGHT, HAS_BIAS)
    return mean, invstd, scale, shift, scale  # γ·r is the forward's scale


@triton.jit
def partial_grads_kernel(
    dy_ptr, x_ptr, z_ptr, positive_ptr,  # (N, C, L) upstream grad, input, residual, mask
    weight_ptr, bias_ptr, mean_ptr, invstd_ptr,  # (C,) γ, β, saved μ, r
    partial_ptr,  # (2, P, C) fp32 out: Σdu, Σdu·x̂ per row program and channel
    M, L, C, P, slope,
    sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Split reduction of ``Σdu`` and ``Σdu·x̂`` over the ``(channel block, row block)`` grid."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    program = tl.program_id(1)
    mean, invstd, scale, shift, _gain = _per_channel_terms(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, cols, C, HAS_WEIGHT, HAS_BIAS
    )
    sum_du, sum_du_xhat = _accumulate_grads(
        dy_ptr, x_ptr, z_ptr, positive_ptr, program * rows_per_program, M, L, C, cols, mean,
        invstd, scale, shift, slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l,
        sp_n, sp_c, sp_l, rows_per_program, HAS_RESIDUAL, ACTIVATION, FROM_MASK, BLOCK_M, BLOCK_C,
    )  # fmt: skip
    tl.store(partial_ptr + program * C + cols, sum_du, mask=cols < C)
    tl.store(partial_ptr + P * C + program * C + cols, sum_du_xhat, mask=cols < C)


@triton.jit
def merge_grads_kernel(
    partial_ptr,  # (2, P, C) fp32 partial sums
    dweight_ptr, dbias_ptr,  # (C,) fp32 out: dγ, dβ
    P, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``dβ = Σdu`` and ``dγ = Σdu·x̂`` per channel from the partial sums."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    dbias, dweight = _sum_partials(partial_ptr, P, C, cols, BLOCK_P, BLOCK_C)
    tl.store(dbias_ptr + cols, dbias, mask=cols < C)
    tl.store(dweight_ptr + cols, dweight, mask=cols < C)


@triton.jit
def input_grad_kernel(
    dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr,  # (N, C, L) tensors
    weight_ptr, bias_ptr, mean_ptr, invstd_ptr, dweight_ptr, dbias_ptr,  # (C,) tensors
    M, L, C, slope,
    sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr, WRITE_DZ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Elementwise ``dx`` (and ``dz``) pass over the ``(channel block, row block)`` grid."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mean, invstd, scale, shift, gain = _per_channel_terms(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, cols, C, HAS_WEIGHT, HAS_BIAS
    )
    mean_term = tl.load(dbias_ptr + cols, mask=cols < C, other=0.0) / M  # [BLOCK_C]  dβ/M
    variance_term = tl.load(dweight_ptr + cols, mask=cols < C, other=0.0) / M  # dγ/M
    _input_grad_rows(
        dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr, tl.program_id(1) * rows_per_program,
        M, L, C, cols, mean, invstd, scale, shift, slope, gain, mean_term, variance_term,
        sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
        sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l, rows_per_program,
        HAS_RESIDUAL, ACTIVATION, FROM_MASK, WRITE_DZ, BLOCK_M,
    )  # fmt: skip


@triton.jit
def persistent_backward_kernel(
    dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr,  # (N, C, L) tensors
    weight_ptr, bias_ptr, mean_ptr, invstd_ptr,  # (C,) γ, β, μ, r
    partial_ptr,  # (2, P, C) fp32 scratch
    counter_ptr,  # (channel_blocks,) int32 zeros
    dweight_ptr, dbias_ptr,  # (C,) fp32 out
    M, L, C, P, slope,
    sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr, WRITE_DZ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The whole backward in one launch (occupancy-sized grid; see the forward's twin)."""
    channel_block = tl.program_id(0)
    program = tl.program_id(1)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    row_begin = program * rows_per_program
    mean, invstd, scale, shift, gain = _per_channel_terms(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, cols, C, HAS_WEIGHT, HAS_BIAS
    )
    sum_du, sum_du_xhat = _accumulate_grads(
        dy_ptr, x_ptr, z_ptr, positive_ptr, row_begin, M, L, C, cols, mean, invstd, scale,
        shift, slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
        rows_per_program, HAS_RESIDUAL, ACTIVATION, FROM_MASK, BLOCK_M, BLOCK_C,
    )  # fmt: skip
    tl.store(partial_ptr + program * C + cols, sum_du, mask=cols < C)
    tl.store(partial_ptr + P * C + program * C + cols, sum_du_xhat, mask=cols < C)
    grid_barrier(counter_ptr + channel_block, P)
    dbias, dweight = _sum_partials(partial_ptr, P, C, cols, BLOCK_P, BLOCK_C)
    if program == 0:
        tl.store(dbias_ptr + cols, dbias, mask=cols < C)
        tl.store(dweight_ptr + cols, dweight, mask=cols < C)
    _input_grad_rows(
        dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr, row_begin, M, L, C, cols, mean,
        invstd, scale, shift, slope, gain, dbias / M, dweight / M,
        sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
        sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l, rows_per_program,
        HAS_RESIDUAL, ACTIVATION, FROM_MASK, WRITE_DZ, BLOCK_M,
    )  # fmt: skip
