"""Training backward: split ``Σdu``/``Σdu·x̂`` reduction whose last program merges → ``dx`` (and
``dz``) pass.

With ``y = act(u)``, ``u = γ·x̂ + β + z`` and ``du = dy·act'(u)`` (``du = dy`` without activation),
per channel over the ``M`` rows (design.md §2)::

    dβ = Σ du,   dγ = Σ du·x̂,   dx = γ·r·(du − dβ/M − x̂·dγ/M),   dz = du

``u`` is recomputed from ``x`` (and ``z``) with the forward's own ``scale``/``shift``, or, for
(leaky) ReLU with a residual, read from the uint8 ``u > 0`` mask the forward saved, so ``z``
need not be read again. Arrangements as in :mod:`.batchnorm_fwd`: two split launches everywhere
(the reduction's last program per channel block writes ``dγ``, ``dβ``), one persistent launch
with a per-channel-block barrier on the GPU. Arguments: pointers, integers, floats, constexprs.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.triton.batchnorm_fwd import _tile_range
from batchnorm.kernels.triton.common import (
    activation_derivative,
    arrive_last,
    grid_barrier,
    scale_shift,
    tile_offsets,
    tile_rows,
)


@triton.jit
def _grad_tile(
    dy_ptr, x_ptr, z_ptr, positive_ptr, n, l_index, rows_ok, cols, C, mean, invstd, scale,
    shift, slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr,
):  # fmt: skip
    """``(du, x̂, valid)`` on a ``[BLOCK_N·BLOCK_L, BLOCK_C]`` tile; ``du``, ``x̂`` 0 off the tile."""
    valid = rows_ok[:, None] & (cols < C)[None, :]  # [BLOCK_N·BLOCK_L, BLOCK_C]
    x_offsets = tile_offsets(n, l_index, cols, sx_n, sx_c, sx_l)
    x = tl.load(x_ptr + x_offsets, mask=valid, other=0.0).to(tl.float32)
    dy_offsets = tile_offsets(n, l_index, cols, sd_n, sd_c, sd_l)
    du = tl.load(dy_ptr + dy_offsets, mask=valid, other=0.0).to(tl.float32)
    if ACTIVATION != 0:
        if FROM_MASK:
            p_offsets = tile_offsets(n, l_index, cols, sp_n, sp_c, sp_l)
            positive = tl.load(positive_ptr + p_offsets, mask=valid, other=0)
            du = du * activation_derivative(du, positive, slope, ACTIVATION, True)
        else:
            u = x * scale[None, :] + shift[None, :]  # as in the forward
            if HAS_RESIDUAL:
                z_offsets = tile_offsets(n, l_index, cols, sz_n, sz_c, sz_l)
                u = u + tl.load(z_ptr + z_offsets, mask=valid, other=0.0).to(tl.float32)
            du = du * activation_derivative(u, u, slope, ACTIVATION, False)
    x_hat = tl.where(valid, (x - mean[None, :]) * invstd[None, :], 0.0)
    du = tl.where(valid, du, 0.0)
    return du, x_hat, valid


@triton.jit
def _accumulate_grads(
    dy_ptr, x_ptr, z_ptr, positive_ptr, tile_begin, tile_end, l_blocks, N, L, C, cols, mean,
    invstd, scale, shift, slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l,
    sp_n, sp_c, sp_l,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``(Σdu, Σdu·x̂)`` per channel over tiles ``[tile_begin, tile_end)`` (fp32)."""
    sum_du = tl.zeros([BLOCK_C], tl.float32)
    sum_du_xhat = tl.zeros([BLOCK_C], tl.float32)
    for tile in range(tile_begin, tile_end):
        n, l_index, rows_ok = tile_rows(tile, l_blocks, N, L, BLOCK_N, BLOCK_L)
        du, x_hat, _valid = _grad_tile(
            dy_ptr, x_ptr, z_ptr, positive_ptr, n, l_index, rows_ok, cols, C, mean, invstd,
            scale, shift, slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l,
            sp_n, sp_c, sp_l, HAS_RESIDUAL, ACTIVATION, FROM_MASK,
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
    dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr, tile_begin, tile_end, l_blocks, N, L,
    C, cols, mean, invstd, scale, shift, slope, gain, mean_term, variance_term,
    sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr,
    WRITE_DZ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """``dx = gain·(du − dβ/M − x̂·dγ/M)`` and ``dz = du`` over tiles ``[tile_begin, tile_end)``."""
    for tile in range(tile_begin, tile_end):
        n, l_index, rows_ok = tile_rows(tile, l_blocks, N, L, BLOCK_N, BLOCK_L)
        du, x_hat, valid = _grad_tile(
            dy_ptr, x_ptr, z_ptr, positive_ptr, n, l_index, rows_ok, cols, C, mean, invstd,
            scale, shift, slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l,
            sp_n, sp_c, sp_l, HAS_RESIDUAL, ACTIVATION, FROM_MASK,
        )  # fmt: skip
        dx = gain[None, :] * (du - mean_term[None, :] - x_hat * variance_term[None, :])
        dx_offsets = tile_offsets(n, l_index, cols, sdx_n, sdx_c, sdx_l)
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=valid)
        if WRITE_DZ:
            dz_offsets = tile_offsets(n, l_index, cols, sdz_n, sdz_c, sdz_l)
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
def reduce_grads_kernel(
    dy_ptr, x_ptr, z_ptr, positive_ptr,  # (N, C, L) upstream grad, input, residual, mask
    weight_ptr, bias_ptr, mean_ptr, invstd_ptr,  # (C,) γ, β, saved μ, r
    partial_ptr,  # (2, P, C) fp32 scratch: Σdu, Σdu·x̂ per row program and channel
    counter_ptr,  # (2·channel_blocks,) int32 arrivals (even words), 0 between launches
    dweight_ptr, dbias_ptr,  # (C,) fp32 out: dγ, dβ (written by the last program of a block)
    N, l_groups, C, P, tiles_per_program,
    sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    slope,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr, L_VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Split reduction of ``Σdu`` and ``Σdu·x̂``; the last program of a channel block sums the
    partials into ``dβ``, ``dγ`` (see :func:`~.common.arrive_last`)."""
    channel_block = tl.program_id(0)
    program = tl.program_id(1)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    sd_n, sd_c = sd_n * L_VEC, sd_c * L_VEC  # passed in units of L_VEC
    sx_n, sx_c = sx_n * L_VEC, sx_c * L_VEC  # passed in units of L_VEC
    sz_n, sz_c = sz_n * L_VEC, sz_c * L_VEC  # passed in units of L_VEC
    sp_n, sp_c = sp_n * L_VEC, sp_c * L_VEC  # passed in units of L_VEC
    L = l_groups * L_VEC
    l_blocks = tl.cdiv(L, BLOCK_L)
    tile_begin, tile_end = _tile_range(program, tiles_per_program, N, l_blocks, BLOCK_N)
    mean, invstd, scale, shift, _gain = _per_channel_terms(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, cols, C, HAS_WEIGHT, HAS_BIAS
    )
    sum_du, sum_du_xhat = _accumulate_grads(
        dy_ptr, x_ptr, z_ptr, positive_ptr, tile_begin, tile_end, l_blocks, N, L, C, cols,
        mean, invstd, scale, shift, slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c,
        sz_l, sp_n, sp_c, sp_l, HAS_RESIDUAL, ACTIVATION, FROM_MASK, BLOCK_N, BLOCK_L, BLOCK_C,
    )  # fmt: skip
    tl.store(partial_ptr + program * C + cols, sum_du, mask=cols < C)
    tl.store(partial_ptr + P * C + program * C + cols, sum_du_xhat, mask=cols < C)
    if arrive_last(counter_ptr + 2 * channel_block, P):
        dbias, dweight = _sum_partials(partial_ptr, P, C, cols, BLOCK_P, BLOCK_C)
        tl.store(dbias_ptr + cols, dbias, mask=cols < C)
        tl.store(dweight_ptr + cols, dweight, mask=cols < C)


@triton.jit
def input_grad_kernel(
    dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr,  # (N, C, L) tensors
    weight_ptr, bias_ptr, mean_ptr, invstd_ptr, dweight_ptr, dbias_ptr,  # (C,) tensors
    N, l_groups, C, tiles_per_program,
    sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l,
    slope,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr, WRITE_DZ: tl.constexpr,
    L_VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Elementwise ``dx`` (and ``dz``) pass over the ``(channel block, row block)`` grid."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    sd_n, sd_c = sd_n * L_VEC, sd_c * L_VEC  # passed in units of L_VEC
    sx_n, sx_c = sx_n * L_VEC, sx_c * L_VEC  # passed in units of L_VEC
    sz_n, sz_c = sz_n * L_VEC, sz_c * L_VEC  # passed in units of L_VEC
    sp_n, sp_c = sp_n * L_VEC, sp_c * L_VEC  # passed in units of L_VEC
    sdx_n, sdx_c = sdx_n * L_VEC, sdx_c * L_VEC  # passed in units of L_VEC
    sdz_n, sdz_c = sdz_n * L_VEC, sdz_c * L_VEC  # passed in units of L_VEC
    L = l_groups * L_VEC
    l_blocks = tl.cdiv(L, BLOCK_L)
    tile_begin, tile_end = _tile_range(tl.program_id(1), tiles_per_program, N, l_blocks, BLOCK_N)
    mean, invstd, scale, shift, gain = _per_channel_terms(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, cols, C, HAS_WEIGHT, HAS_BIAS
    )
    rows = (N * L).to(tl.float32)  # M
    mean_term = tl.load(dbias_ptr + cols, mask=cols < C, other=0.0) / rows  # [BLOCK_C]  dβ/M
    variance_term = tl.load(dweight_ptr + cols, mask=cols < C, other=0.0) / rows  # dγ/M
    _input_grad_rows(
        dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr, tile_begin, tile_end, l_blocks, N,
        L, C, cols, mean, invstd, scale, shift, slope, gain, mean_term, variance_term,
        sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
        sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l,
        HAS_RESIDUAL, ACTIVATION, FROM_MASK, WRITE_DZ, BLOCK_N, BLOCK_L,
    )  # fmt: skip


@triton.jit
def persistent_backward_kernel(
    dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr,  # (N, C, L) tensors
    weight_ptr, bias_ptr, mean_ptr, invstd_ptr,  # (C,) γ, β, μ, r
    partial_ptr,  # (2, P, C) fp32 scratch
    counter_ptr,  # (2·channel_blocks,) int32: arrivals (0 between uses) and generation
    dweight_ptr, dbias_ptr,  # (C,) fp32 out
    N, l_groups, C, P, tiles_per_program,
    sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l,
    slope,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr, WRITE_DZ: tl.constexpr,
    L_VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """The whole backward in one launch (occupancy-sized grid; see the forward's twin)."""
    channel_block = tl.program_id(0)
    program = tl.program_id(1)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    sd_n, sd_c = sd_n * L_VEC, sd_c * L_VEC  # passed in units of L_VEC
    sx_n, sx_c = sx_n * L_VEC, sx_c * L_VEC  # passed in units of L_VEC
    sz_n, sz_c = sz_n * L_VEC, sz_c * L_VEC  # passed in units of L_VEC
    sp_n, sp_c = sp_n * L_VEC, sp_c * L_VEC  # passed in units of L_VEC
    sdx_n, sdx_c = sdx_n * L_VEC, sdx_c * L_VEC  # passed in units of L_VEC
    sdz_n, sdz_c = sdz_n * L_VEC, sdz_c * L_VEC  # passed in units of L_VEC
    L = l_groups * L_VEC
    l_blocks = tl.cdiv(L, BLOCK_L)
    tile_begin, tile_end = _tile_range(program, tiles_per_program, N, l_blocks, BLOCK_N)
    mean, invstd, scale, shift, gain = _per_channel_terms(
        weight_ptr, bias_ptr, mean_ptr, invstd_ptr, cols, C, HAS_WEIGHT, HAS_BIAS
    )
    sum_du, sum_du_xhat = _accumulate_grads(
        dy_ptr, x_ptr, z_ptr, positive_ptr, tile_begin, tile_end, l_blocks, N, L, C, cols,
        mean, invstd, scale, shift, slope, sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c,
        sz_l, sp_n, sp_c, sp_l, HAS_RESIDUAL, ACTIVATION, FROM_MASK, BLOCK_N, BLOCK_L, BLOCK_C,
    )  # fmt: skip
    tl.store(partial_ptr + program * C + cols, sum_du, mask=cols < C)
    tl.store(partial_ptr + P * C + program * C + cols, sum_du_xhat, mask=cols < C)
    grid_barrier(counter_ptr + 2 * channel_block, P)
    dbias, dweight = _sum_partials(partial_ptr, P, C, cols, BLOCK_P, BLOCK_C)
    if program == 0:
        tl.store(dbias_ptr + cols, dbias, mask=cols < C)
        tl.store(dweight_ptr + cols, dweight, mask=cols < C)
    rows = (N * L).to(tl.float32)  # M
    _input_grad_rows(
        dy_ptr, x_ptr, z_ptr, positive_ptr, dx_ptr, dz_ptr, tile_begin, tile_end, l_blocks, N,
        L, C, cols, mean, invstd, scale, shift, slope, gain, dbias / rows, dweight / rows,
        sd_n, sd_c, sd_l, sx_n, sx_c, sx_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
        sdx_n, sdx_c, sdx_l, sdz_n, sdz_c, sdz_l,
        HAS_RESIDUAL, ACTIVATION, FROM_MASK, WRITE_DZ, BLOCK_N, BLOCK_L,
    )  # fmt: skip
