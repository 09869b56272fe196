"""Training forward: split Welford reduction → Chan merge (+ running update) → normalize.

Math per channel over the ``M = N·L`` rows (design.md §2)::

    μ = Σx / M,  σ² = Σ(x − μ)² / M,  r = 1 / sqrt(σ² + ε)
    (moments of x − K per channel, K = x[0, c, 0]: shifted data keep fp32 exact when |μ| ≫ σ)
    y = act(x·scale + shift + z),  scale = γ·r,  shift = β − μ·scale
    running ← (1 − momentum)·running + momentum·(μ, σ²·M / (M − 1))

Three device functions, two arrangements:

* split (always available, the only one under the interpreter): ``partial_stats_kernel`` over
  the ``(channel block, row block)`` grid writes one (count, mean, M2) per program and channel;
  ``merge_stats_kernel`` merges them per channel with Chan's formula, writes ``μ``, ``r``,
  ``σ²`` and the new running statistics; ``normalize_kernel`` writes ``y`` (and the ReLU mask).
* persistent (GPU only, grid sized from occupancy so every program is resident):
  ``persistent_forward_kernel`` does all three with a barrier per channel block in between, so
  a program's second read of its rows comes from L2 rather than HBM.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.triton.common import (
    activate,
    chan_merge,
    grid_barrier,
    next_power_of_2,
    scale_shift,
    tile_moments,
    tile_offsets,
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
    x_ptr, pivot, row_begin, M, L, C, stride_n, stride_c, stride_l, rows_per_program, cols,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """(count, mean, M2) of ``x − pivot`` per channel of this program's rows (Welford/Chan)."""
    count = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for start in range(row_begin, row_begin + rows_per_program, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        valid = (rows < M)[:, None] & (cols < C)[None, :]  # [BLOCK_M, BLOCK_C]
        offsets = tile_offsets(rows, cols, L, stride_n, stride_c, stride_l)
        values = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
        values = tl.where(valid, values - pivot[None, :], 0.0)  # [BLOCK_M, BLOCK_C]  x − K
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
    x_ptr, y_ptr, z_ptr, positive_ptr, row_begin, M, L, C, cols, scale, shift, slope,
    sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l, rows_per_program,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``y = act(x·scale + shift + z)`` over this program's rows; optionally the ``u > 0`` mask."""
    for start in range(row_begin, row_begin + rows_per_program, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        valid = (rows < M)[:, None] & (cols < C)[None, :]  # [BLOCK_M, BLOCK_C]
        x = tl.load(x_ptr + tile_offsets(rows, cols, L, sx_n, sx_c, sx_l), mask=valid, other=0.0)
        u = x.to(tl.float32) * scale[None, :] + shift[None, :]  # [BLOCK_M, BLOCK_C]
        if HAS_RESIDUAL:
            z_offsets = tile_offsets(rows, cols, L, sz_n, sz_c, sz_l)
            u = u + tl.load(z_ptr + z_offsets, mask=valid, other=0.0).to(tl.float32)
        y = activate(u, slope, ACTIVATION)
        y_offsets = tile_offsets(rows, cols, L, sy_n, sy_c, sy_l)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=valid)
        if SAVE_MASK:
            p_offsets = tile_offsets(rows, cols, L, sp_n, sp_c, sp_l)
            tl.store(positive_ptr + p_offsets, (u > 0.0).to(tl.uint8), mask=valid)


@triton.jit
def partial_stats_kernel(
    x_ptr,  # (N, C, L) input, any strides
    partial_ptr,  # (3, P, C) fp32 out: count, mean of x − K, M2 per row program and channel
    M, L, C, P,  # rows N·L, spatial size, channels, row programs
    stride_n, stride_c, stride_l,  # strides of x
    rows_per_program,  # rows each program reduces (multiple of BLOCK_M)
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Split reduction: one (count, mean, M2) per (channel block, row block) program."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    program = tl.program_id(1)
    pivot = _pivot(x_ptr, C, stride_c, cols)  # [BLOCK_C]
    count, mean, m2 = _accumulate_stats(
        x_ptr, pivot, program * rows_per_program, M, L, C, stride_n, stride_c, stride_l,
        rows_per_program, cols, BLOCK_M, BLOCK_C,
    )  # fmt: skip
    _store_partial(partial_ptr, program, P, C, cols, count, mean, m2)


@triton.jit
def merge_stats_kernel(
    partial_ptr,  # (3, P, C) fp32 partial summaries (means of x − K)
    x_ptr, stride_c,  # the input, read only for the shift K = x[0, c, 0]
    P, C, eps, momentum,
    mean_ptr, invstd_ptr, var_ptr,  # (C,) fp32 outputs
    running_mean_ptr, running_var_ptr,  # (C,) running buffers (read only)
    new_running_mean_ptr, new_running_var_ptr,  # (C,) updated running statistics (out)
    UPDATE_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Chan merge per channel; writes ``μ``, ``r``, ``σ²`` and the new running statistics."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    count, mean, m2 = _merge_partials(partial_ptr, P, C, cols, BLOCK_P, BLOCK_C)
    mean = mean + _pivot(x_ptr, C, stride_c, cols)  # [BLOCK_C]  μ = K + mean of x − K
    _finish_stats(
        count, mean, m2, cols, C, eps, mean_ptr, invstd_ptr, var_ptr, running_mean_ptr,
        running_var_ptr, new_running_mean_ptr, new_running_var_ptr, momentum, UPDATE_RUNNING,
    )  # fmt: skip


@triton.jit
def normalize_kernel(
    x_ptr, y_ptr, z_ptr, positive_ptr,  # (N, C, L) input, output, residual, uint8 mask
    weight_ptr, bias_ptr, mean_ptr, invstd_ptr,  # (C,) γ, β, μ, r
    M, L, C, slope,
    sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, SAVE_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Elementwise pass ``y = act(γ·x̂ + β + z)`` over the ``(channel block, row block)`` grid."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mean = tl.load(mean_ptr + cols, mask=cols < C, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cols < C, other=0.0)
    scale, shift = scale_shift(weight_ptr, bias_ptr, mean, invstd, cols, C, HAS_WEIGHT, HAS_BIAS)
    _normalize_rows(
        x_ptr, y_ptr, z_ptr, positive_ptr, tl.program_id(1) * rows_per_program, M, L, C, cols,
        scale, shift, slope, sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l,
        sp_n, sp_c, sp_l, rows_per_program, HAS_RESIDUAL, ACTIVATION, SAVE_MASK, BLOCK_M,
    )  # fmt: skip


@triton.jit
def persistent_forward_kernel(
    x_ptr, y_ptr, z_ptr, positive_ptr,  # (N, C, L) input, output, residual, uint8 mask
    weight_ptr, bias_ptr,  # (C,) γ, β
    partial_ptr,  # (3, P, C) fp32 scratch
    counter_ptr,  # (channel_blocks,) int32 zeros: barrier arrivals per channel block
    mean_ptr, invstd_ptr, var_ptr,  # (C,) fp32 outputs
    running_mean_ptr, running_var_ptr, new_running_mean_ptr, new_running_var_ptr,
    M, L, C, P, eps, momentum, slope,
    sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr, SAVE_MASK: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The whole forward in one launch; every program must be resident (occupancy-sized grid).

    Reduce own rows → publish partial → barrier with the ``P`` programs of the channel block →
    merge (each program redundantly; program 0 of the block writes the statistics) → normalize
    own rows, whose second read mostly hits L2.
    """
    channel_block = tl.program_id(0)
    program = tl.program_id(1)
    cols = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    row_begin = program * rows_per_program
    pivot = _pivot(x_ptr, C, sx_c, cols)  # [BLOCK_C]
    count, mean, m2 = _accumulate_stats(
        x_ptr, pivot, row_begin, M, L, C, sx_n, sx_c, sx_l, rows_per_program, cols, BLOCK_M,
        BLOCK_C,
    )  # fmt: skip
    _store_partial(partial_ptr, program, P, C, cols, count, mean, m2)
    grid_barrier(counter_ptr + channel_block, P)
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
        x_ptr, y_ptr, z_ptr, positive_ptr, row_begin, M, L, C, cols, scale, shift, slope,
        sx_n, sx_c, sx_l, sy_n, sy_c, sy_l, sz_n, sz_c, sz_l, sp_n, sp_c, sp_l,
        rows_per_program, HAS_RESIDUAL, ACTIVATION, SAVE_MASK, BLOCK_M,
    )  # fmt: skip


def merge_block_p(row_programs: int) -> int:
    """Partials merged per step of the merge loop: all of them up to 64, else 64 at a time."""
    return min(64, next_power_of_2(max(row_programs, 1)))
