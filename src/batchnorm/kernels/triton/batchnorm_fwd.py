"""Training forward: split Welford reduction (its last program merges, updates running) → normalize.

Math per channel over the ``M = N·L`` rows (design.md §2)::

    μ = Σx / M,  σ² = Σ(x − μ)² / M,  r = 1 / sqrt(σ² + ε)
    (moments of x − K per channel, K = x[0, c, 0]: shifted data keep fp32 exact when |μ| ≫ σ)
    y = act(x·scale + shift + z),  scale = γ·r,  shift = β − μ·scale
    running ← (1 − momentum)·running + momentum·(μ, σ²·M / (M − 1))

Two arrangements:

* split (always available, the only one under the interpreter), two launches:
  ``reduce_stats_kernel`` over the ``(channel block, row block)`` grid writes one (count, mean,
  M2) per program and channel, and the last program of each channel block to arrive
  (:func:`~.common.arrive_last`) merges them with Chan's formula and writes ``μ``, ``r``, ``σ²``
  and the new running statistics; ``normalize_kernel`` writes ``y`` (and the ReLU mask).
* persistent (GPU only, grid sized from occupancy so every program is resident):
  ``persistent_forward_kernel`` does both with a barrier per channel block in between, so a
  program's second read of its rows comes from L2 rather than HBM.

Kernel arguments come in one order everywhere: pointers, integers, floats, then constexprs
(the direct launcher of :mod:`.launcher` relies on the constexprs coming last).
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.triton.common import (
    activate,
    arrive_last,
    chan_merge,
    grid_barrier,
    next_power_of_2,
    scale_shift,
    tile_moments,
    tile_offsets,
    tile_rows,
)


@triton.jit
def _pivot(x_ptr, C, stride_c, cols):
    """The shift ``K = x[0, c, 0]`` per channel (0 for an empty batch or a padding column).

    Every program of a channel uses the same ``K``, so partial means of ``x − K`` merge as they
    are; ``x − K`` is exact in fp32 for values within a factor 2 of ``K`` (Sterbenz), so a large
    common offset (``|μ| ≫ σ``) no longer costs the partial means and Chan's deltas their digits.
    """
    return tl.load(x_ptr + cols * stride_c, mask=cols < C, other=0.0).to(tl.float32)


@triton.jit
def _accumulate_stats(
    x_ptr, pivot, tile_begin, tile_end, l_blocks, N, L, C, stride_n, stride_c, stride_l, cols,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """(count, mean, M2) of ``x − pivot`` per channel over tiles ``[tile_begin, tile_end)``."""
    count = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for tile in range(tile_begin, tile_end):
        n, l_index, rows_ok = tile_rows(tile, l_blocks, N, L, BLOCK_N, BLOCK_L)
        valid = rows_ok[:, None] & (cols < C)[None, :]  # [BLOCK_N·BLOCK_L, BLOCK_C]
        offsets = tile_offsets(n, l_index, cols, stride_n, stride_c, stride_l)
        values = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        values = tl.where(valid, values - pivot[None, :], 0.0)  # x − K
        tile_count, tile_mean, tile_m2 = tile_moments(values, valid)
        count, mean, m2 = chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    return count, mean, m2


@triton.jit
def _store_partial(partial_ptr, program, P, C, cols, count, mean, m2):
    """Stores one program's summary into ``partial`` of shape ``(3, P, C)`` (count, mean, M2)."""
    offsets = program * C + cols  # [BLOCK_C]
    ok = cols < C
    tl.store(partial_ptr + offsets, count, mask=ok)
    tl.store(partial_ptr + P * C + offsets, mean, mask=ok)
    tl.store(partial_ptr + 2 * P * C + offsets, m2, mask=ok)


@triton.jit
def _merge_partials(partial_ptr, P, C, cols, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges the ``P`` partial summaries of channels ``cols``: ``BLOCK_P`` at a time, exactly.

    Within a block: ``n = Σnᵢ``, ``μ = Σnᵢμᵢ / n``, ``M2 = Σ(M2ᵢ + nᵢ(μᵢ − μ)²)``; blocks are
    then combined with Chan's formula. Loads bypass L1 (``.cg``): in the persistent kernel the
    partials were written by other programs.
    """
    count = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for p_start in range(0, P, BLOCK_P):
        programs = p_start + tl.arange(0, BLOCK_P)  # [BLOCK_P]
        valid = (programs < P)[:, None] & (cols < C)[None, :]  # [BLOCK_P, BLOCK_C]
        offsets = programs[:, None] * C + cols[None, :]  # [BLOCK_P, BLOCK_C]
        counts = tl.load(partial_ptr + offsets, mask=valid, other=0.0, cache_modifier=".cg")
        means = tl.load(partial_ptr + P * C + offsets, mask=valid, other=0.0, cache_modifier=".cg")
        m2s = tl.load(
            partial_ptr + 2 * P * C + offsets, mask=valid, other=0.0, cache_modifier=".cg"
        )
        block_count = tl.sum(counts, 0)  # [BLOCK_C]
        block_mean = tl.sum(counts * means, 0) / tl.maximum(block_count, 1.0)  # [BLOCK_C]
        deviation = means - block_mean[None, :]  # [BLOCK_P, BLOCK_C]
        block_m2 = tl.sum(m2s + counts * deviation * deviation, 0)  # [BLOCK_C]
        count, mean, m2 = chan_merge(count, mean, m2, block_count, block_mean, block_m2)
    return count, mean, m2


@triton.jit
def _finish_stats(
    count, mean, m2, cols, C, eps, mean_ptr, invstd_ptr, var_ptr,
    running_mean_ptr, running_var_ptr, new_running_mean_ptr, new_running_var_ptr, momentum,
    UPDATE_RUNNING: tl.constexpr,
):  # fmt: skip
    """Writes ``μ``, ``r``, ``σ²`` (fp32) and the new running statistics; returns ``r``."""
    ok = cols < C
    var = m2 / tl.maximum(count, 1.0)  # [BLOCK_C]  biased σ²
    invstd = 1.0 / tl.sqrt(var + eps)  # [BLOCK_C]
    tl.store(mean_ptr + cols, mean, mask=ok)
    tl.store(invstd_ptr + cols, invstd, mask=ok)
    tl.store(var_ptr + cols, var, mask=ok)
    if UPDATE_RUNNING:
        old_mean = tl.load(running_mean_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        old_var = tl.load(running_var_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        unbiased = m2 / tl.maximum(count - 1.0, 1.0)  # [BLOCK_C]  σ²·M / (M − 1)
        new_mean = (1.0 - momentum) * old_mean + momentum * mean
        new_var = (1.0 - momentum) * old_var + momentum * unbiased
        tl.store(
            new_running_mean_ptr + cols,
            new_mean.to(new_running_mean_ptr.dtype.element_ty),
            mask=ok,
        )
        tl.store(
            new_running_var_ptr + cols, new_var.to(new_running_var_ptr.dtype.element_ty), mask=ok
        )
    return invstd


@triton.jit
def _normalize_rows(
    x_ptr, y_ptr, z_ptr, positive_ptr, tile_begin, tile_end, l_blocks, N, L, C, cols, scale,
    shift, slope, sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """``y = act(x·scale + shift + z)`` over tiles ``[tile_begin, tile_end)``; optionally the
    ``u > 0`` mask."""
    for tile in range(tile_begin, tile_end):
        n, l_index, rows_ok = tile_rows(tile, l_blocks, N, L, BLOCK_N, BLOCK_L)
        valid = rows_ok[:, None] & (cols < C)[None, :]  # [BLOCK_N·BLOCK_L, BLOCK_C]
        x_offsets = tile_offsets(n, l_index, cols, sx_n, sx_c, sx_l)
        x = tl.load(x_ptr + x_offsets, mask=valid, other=0.0)
        u = x.to(tl.float32) * scale[None, :] + shift[None, :]  # [BLOCK_N·BLOCK_L, BLOCK_C]
        if HAS_RESIDUAL:
            z_offsets = tile_offsets(n, l_index, cols, sz_n, sz_c, sz_l)
            u = u + tl.load(z_ptr + z_offsets, mask=valid, other=0.0).to(tl.float32)
        y = activate(u, slope, ACTIVATION)
        y_offsets = tile_offsets(n, l_index, cols, sy_n, sy_c, sy_l)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=valid)
        if SAVE_MASK:
            p_offsets = tile_offsets(n, l_index, cols, sp_n, sp_c, sp_l)
            tl.store(positive_ptr + p_offsets, (u > 0.0).to(tl.uint8), mask=valid)


@triton.jit
def _tile_range(program, tiles_per_program, N, l_blocks, BLOCK_N: tl.constexpr):
    """Tiles ``[begin, end)`` of row program ``program``."""
    tiles = tl.cdiv(N, BLOCK_N) * l_blocks
    begin = program * tiles_per_program
    return begin, tl.minimum(begin + tiles_per_program, tiles)


@triton.jit
def reduce_stats_kernel(
    x_ptr,  # (N, C, L) input, any strides
    partial_ptr,  # (3, P, C) fp32 scratch: count, mean of x − K, M2 per row program and channel
    counter_ptr,  # (2·channel_blocks,) int32 arrivals (even words), 0 between launches
    mean_ptr, invstd_ptr, var_ptr,  # (C,) fp32 outputs
    running_mean_ptr, running_var_ptr,  # (C,) running buffers (read)
    new_running_mean_ptr, new_running_var_ptr,  # (C,) updated running statistics (may alias)
    N, l_groups, C, P, tiles_per_program,  # batch, L / L_VEC, channels, row programs, tiles each
    sx_n, sx_c, sx_l,  # strides of x (n and c in units of L_VEC)
    eps, momentum,
    UPDATE_RUNNING: tl.constexpr, L_VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Split reduction, one (count, mean, M2) per program; the last program of a channel block
    merges them and writes the statistics (see :func:`~.common.arrive_last`)."""
    channel_block = tl.program_id(0)
    program = tl.program_id(1)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    sx_n, sx_c = sx_n * L_VEC, sx_c * L_VEC  # passed in units of L_VEC
    L = l_groups * L_VEC
    l_blocks = tl.cdiv(L, BLOCK_L)
    tile_begin, tile_end = _tile_range(program, tiles_per_program, N, l_blocks, BLOCK_N)
    pivot = _pivot(x_ptr, C, sx_c, cols)  # [BLOCK_C]
    count, mean, m2 = _accumulate_stats(
        x_ptr, pivot, tile_begin, tile_end, l_blocks, N, L, C, sx_n, sx_c, sx_l,
        cols, BLOCK_N, BLOCK_L, BLOCK_C,
    )  # fmt: skip
    _store_partial(partial_ptr, program, P, C, cols, count, mean, m2)
    if arrive_last(counter_ptr + 2 * channel_block, P):
        count, mean, m2 = _merge_partials(partial_ptr, P, C, cols, BLOCK_P, BLOCK_C)
        _finish_stats(
            count, mean + pivot, m2, cols, C, eps, mean_ptr, invstd_ptr, var_ptr,
            running_mean_ptr, running_var_ptr, new_running_mean_ptr, new_running_var_ptr,
            momentum, UPDATE_RUNNING,
        )  # fmt: skip


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr, z_ptr, positive_ptr,  # (N, C, L) input, output, residual, uint8 mask
    weight_ptr, bias_ptr, mean_ptr, invstd_ptr,  # (C,) γ, β, μ, r
    N, l_groups, C, tiles_per_program,
    sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    slope,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, SAVE_MASK: tl.constexpr, L_VEC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Elementwise pass ``y = act(γ·x̂ + β + z)`` over the ``(channel block, row block)`` grid."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    sx_n, sx_c = sx_n * L_VEC, sx_c * L_VEC  # passed in units of L_VEC
    sy_n, sy_c = sy_n * L_VEC, sy_c * L_VEC  # passed in units of L_VEC
    sz_n, sz_c = sz_n * L_VEC, sz_c * L_VEC  # passed in units of L_VEC
    sp_n, sp_c = sp_n * L_VEC, sp_c * L_VEC  # passed in units of L_VEC
    L = l_groups * L_VEC
    l_blocks = tl.cdiv(L, BLOCK_L)
    tile_begin, tile_end = _tile_range(tl.program_id(1), tiles_per_program, N, l_blocks, BLOCK_N)
    mean = tl.load(mean_ptr + cols, mask=cols < C, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cols < C, other=0.0)
    scale, shift = scale_shift(weight_ptr, bias_ptr, mean, invstd, cols, C, HAS_WEIGHT, HAS_BIAS)
    _normalize_rows(
        x_ptr, y_ptr, z_ptr, positive_ptr, tile_begin, tile_end, l_blocks, N, L, C, cols,
        scale, shift, slope, sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l,
        sp_n, sp_c, sp_l, HAS_RESIDUAL, ACTIVATION, SAVE_MASK, BLOCK_N, BLOCK_L,
    )  # fmt: skip


@triton.jit
def persistent_forward_kernel(
    x_ptr, y_ptr, z_ptr, positive_ptr,  # (N, C, L) input, output, residual, uint8 mask
    weight_ptr, bias_ptr,  # (C,) γ, β
    partial_ptr,  # (3, P, C) fp32 scratch
    counter_ptr,  # (2·channel_blocks,) int32: arrivals (0 between uses) and generation
    mean_ptr, invstd_ptr, var_ptr,  # (C,) fp32 outputs
    running_mean_ptr, running_var_ptr, new_running_mean_ptr, new_running_var_ptr,
    N, l_groups, C, P, tiles_per_program,
    sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    eps, momentum, slope,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, SAVE_MASK: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    L_VEC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """The whole forward in one launch; every program must be resident (occupancy-sized grid).

    Reduce own rows → publish partial → barrier with the ``P`` programs of the channel block →
    merge (each program redundantly; program 0 of the block writes the statistics) → normalize
    own rows, whose second read mostly hits L2.
    """
    channel_block = tl.program_id(0)
    program = tl.program_id(1)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    sx_n, sx_c = sx_n * L_VEC, sx_c * L_VEC  # passed in units of L_VEC
    sy_n, sy_c = sy_n * L_VEC, sy_c * L_VEC  # passed in units of L_VEC
    sz_n, sz_c = sz_n * L_VEC, sz_c * L_VEC  # passed in units of L_VEC
    sp_n, sp_c = sp_n * L_VEC, sp_c * L_VEC  # passed in units of L_VEC
    L = l_groups * L_VEC
    l_blocks = tl.cdiv(L, BLOCK_L)
    tile_begin, tile_end = _tile_range(program, tiles_per_program, N, l_blocks, BLOCK_N)
    pivot = _pivot(x_ptr, C, sx_c, cols)  # [BLOCK_C]
    count, mean, m2 = _accumulate_stats(
        x_ptr, pivot, tile_begin, tile_end, l_blocks, N, L, C, sx_n, sx_c, sx_l, cols,
        BLOCK_N, BLOCK_L, BLOCK_C,
    )  # fmt: skip
    _store_partial(partial_ptr, program, P, C, cols, count, mean, m2)
    grid_barrier(counter_ptr + 2 * channel_block, P)
    count, mean, m2 = _merge_partials(partial_ptr, P, C, cols, BLOCK_P, BLOCK_C)
    mean = mean + pivot  # [BLOCK_C]  μ = K + mean of x − K
    var = m2 / tl.maximum(count, 1.0)  # [BLOCK_C]
    invstd = 1.0 / tl.sqrt(var + eps)  # [BLOCK_C]  same formula as _finish_stats
    if program == 0:
        _finish_stats(
            count, mean, m2, cols, C, eps, mean_ptr, invstd_ptr, var_ptr, running_mean_ptr,
            running_var_ptr, new_running_mean_ptr, new_running_var_ptr, momentum, UPDATE_RUNNING,
        )  # fmt: skip
    scale, shift = scale_shift(weight_ptr, bias_ptr, mean, invstd, cols, C, HAS_WEIGHT, HAS_BIAS)
    _normalize_rows(
        x_ptr, y_ptr, z_ptr, positive_ptr, tile_begin, tile_end, l_blocks, N, L, C, cols,
        scale, shift, slope, sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l,
        sp_n, sp_c, sp_l, HAS_RESIDUAL, ACTIVATION, SAVE_MASK, BLOCK_N, BLOCK_L,
    )  # fmt: skip


def merge_block_p(row_programs: int) -> int:
    """Partials merged per step of the merge loop: all of them up to 64, else 64 at a time."""
    return min(64, next_power_of_2(max(row_programs, 1)))
