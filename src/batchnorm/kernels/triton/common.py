"""Device functions shared by the batch-norm kernels, and the launch heuristics.

Addressing: every tensor is seen as ``(N, C, L)`` with its own strides; the ``M = N·L`` values of
a channel are indexed by a flat row ``m = n·L + l``. A tile is ``[BLOCK_M rows, BLOCK_C
channels]``, so the same code serves NCHW-like strides (rows contiguous) and channels_last
(channels contiguous) without copying. Triton specializes integer arguments equal to 1, so the
contiguous axis is known to the compiler.

Activations (``ACTIVATION`` constexpr): 0 none, 1 ReLU, 2 leaky ReLU (``slope``), 3 SiLU
``u·σ(u)``, 4 GELU (exact, ``u·Φ(u)``), applied to ``u = γ·x̂ + β (+ z)``.

References:
    T. F. Chan, G. H. Golub, R. J. LeVeque, "Updating formulae and a pairwise algorithm for
    computing sample variances", 1979 (the merge of partial (count, mean, M2) triples).
    B. P. Welford, "Note on a method for calculating corrected sums of squares and products",
    Technometrics 4(3), 1962.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import triton
import triton.language as tl

#: Activation codes shared with the host side (the ``ACTIVATION`` constexpr of the kernels).
ACTIVATIONS = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4}

#: Elements of one tile: 4096 fp32 values are 32 registers per thread with 4 warps.
TILE_ELEMENTS = 4096


@triton.jit
def row_offsets(rows, L, stride_n, stride_l):
    """Element offsets ``n·stride_n + l·stride_l`` of flat rows ``m = n·L + l`` (int64)."""
    n = rows // L  # [BLOCK_M]
    l_index = rows - n * L  # [BLOCK_M]
    return n.to(tl.int64) * stride_n + l_index.to(tl.int64) * stride_l


@triton.jit
def tile_offsets(rows, cols, L, stride_n, stride_c, stride_l):
    """Offsets of the ``[BLOCK_M, BLOCK_C]`` tile of rows × channels in an ``(N, C, L)`` view."""
    return (
        row_offsets(rows, L, stride_n, stride_l)[:, None] + (cols.to(tl.int64) * stride_c)[None, :]
    )


@triton.jit
def scale_shift(
    weight_ptr, bias_ptr, mean, invstd, cols, C, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """Per-channel ``scale = γ·r`` and ``shift = β − μ·scale`` (fp32), so ``u = x·scale + shift``.

    Forward and backward both call this, so the backward recomputes ``u`` bit for bit.
    """
    scale = invstd  # [BLOCK_C]
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=cols < C, other=1.0).to(tl.float32)
    shift = -mean * scale  # [BLOCK_C]
    if HAS_BIAS:
        shift = shift + tl.load(bias_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def activate(u, slope, ACTIVATION: tl.constexpr):
    """``act(u)`` elementwise (fp32); NaN stays NaN for ReLU as in ``torch.relu``."""
    out = u
    if ACTIVATION == 1:
        out = tl.where(u < 0.0, 0.0, u)
    elif ACTIVATION == 2:
        out = tl.where(u < 0.0, u * slope, u)
    elif ACTIVATION == 3:
        out = u * tl.sigmoid(u)
    elif ACTIVATION == 4:
        out = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return out


@triton.jit
def activation_derivative(u, positive, slope, ACTIVATION: tl.constexpr, FROM_MASK: tl.constexpr):
    """``act'(u)`` elementwise (fp32), or from the saved ``u > 0`` mask for (leaky) ReLU.

    Conventions of PyTorch: ReLU' = [u > 0], leaky ReLU' = 1 if u > 0 else slope,
    SiLU' = σ(u)·(1 + u·(1 − σ(u))), GELU' = Φ(u) + u·φ(u).
    """
    if FROM_MASK:  # noqa: SIM108 (constexpr branch, resolved at compile time)
        is_positive = positive != 0
    else:
        is_positive = u > 0.0
    derivative = tl.full(u.shape, 1.0, tl.float32)
    if ACTIVATION == 1:
        derivative = tl.where(is_positive, 1.0, 0.0)
    elif ACTIVATION == 2:
        derivative = tl.where(is_positive, 1.0, slope)
    elif ACTIVATION == 3:
        sig = tl.sigmoid(u)
        derivative = sig * (1.0 + u * (1.0 - sig))
    elif ACTIVATION == 4:
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * u * u)
        derivative = cdf + u * pdf
    return derivative


@triton.jit
def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s merge of two (count, mean, M2) summaries; empty summaries are neutral."""
    count = count_a + count_b
    delta = mean_b - mean_a
    fraction = count_b / tl.maximum(count, 1.0)  # n_b / n, 0 when both are empty
    mean = mean_a + delta * fraction
    m2 = m2_a + m2_b + delta * delta * count_a * fraction  # + δ²·n_a·n_b / n
    return count, mean, m2


@triton.jit
def tile_moments(values, valid):
    """(count, mean, M2) per channel of a ``[BLOCK_M, BLOCK_C]`` fp32 tile (two-pass in tile)."""
    count = tl.sum(valid.to(tl.float32), 0)  # [BLOCK_C]
    mean = tl.sum(values, 0) / tl.maximum(count, 1.0)  # [BLOCK_C]  values are 0 where invalid
    centered = tl.where(valid, values - mean[None, :], 0.0)  # [BLOCK_M, BLOCK_C]
    return count, mean, tl.sum(centered * centered, 0)


@triton.jit
def grid_barrier(counter_ptr, expected):
    """Waits until ``expected`` programs have arrived at ``counter_ptr`` (all must be resident).

    The block-level barrier first makes every thread's stores part of what the release on
    arrival publishes; acquire on every poll, then a second block-level barrier, make the other
    programs' stores visible to all threads afterwards (the pattern of Inductor's cooperative
    reductions). Deadlocks if the programs are not all resident, hence only for
    occupancy-sized grids and never under the (sequential) interpreter with more than one
    program.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="release") + 1  # programs here so far
    while arrived < expected:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire")
    tl.debug_barrier()


def cdiv(numerator: int, denominator: int) -> int:
    """``ceil(numerator / denominator)`` for positive ints, on the host.

    ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions in recent Triton,
    with a wrapper that costs microseconds per host call; launch heuristics use these instead.
    """
    return -(-numerator // denominator)


def next_power_of_2(value: int) -> int:
    """The smallest power of two ``>= value`` (1 for ``value <= 1``), on the host."""
    return 1 << max(value - 1, 0).bit_length()


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``): sequentially."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class TileConfig:
    """How a ``(M rows, C channels)`` problem is cut into programs.

    Attributes:
        block_m: rows per tile.
        block_c: channels per tile (and per program).
        channel_blocks: programs along the channels, ``ceil(C / block_c)``.
        row_programs: programs along the rows (``P``, the partial summaries per channel).
        rows_per_program: rows each program walks, a multiple of ``block_m``.
        num_warps: warps per program.
    """

    block_m: int
    block_c: int
    channel_blocks: int
    row_programs: int
    rows_per_program: int
    num_warps: int

    @property
    def grid(self) -> tuple[int, int]:
        """The launch grid ``(channel_blocks, row_programs)``."""
        return (self.channel_blocks, self.row_programs)


@functools.lru_cache(maxsize=1024)
def tile_config(
    rows: int,
    channels: int,
    channels_contiguous: bool,
    target_programs: int,
    block_m: int | None = None,
    block_c: int | None = None,
) -> TileConfig:
    """Chooses tiles and the split of the rows for one launch.

    Channels-contiguous input (channels_last) takes wide channel tiles (up to 64 channels, so a
    warp reads whole 128-byte lines); NCHW-like input takes narrow ones (rows contiguous). Rows
    are split over enough programs that about ``target_programs`` run in all.

    Args:
        rows: ``M = N·L``.
        channels: ``C``.
        channels_contiguous: the input's channel stride is 1 (and ``C > 1``).
        target_programs: programs to aim for (a few per SM on a GPU; few in the interpreter).
        block_m, block_c: explicit tile sizes (powers of two), for tests.

    Returns:
        A :class:`TileConfig` (cached: the same problem gets the same object back).
    """
    if block_c is None:
        block_c = min(next_power_of_2(channels), 64 if channels_contiguous else 4)
    if block_m is None:
        block_m = max(16, min(TILE_ELEMENTS // block_c, next_power_of_2(max(rows, 1))))
    channel_blocks = cdiv(channels, block_c)
    row_tiles = max(1, cdiv(rows, block_m))
    wanted = max(1, target_programs // channel_blocks)
    tiles_per_program = cdiv(row_tiles, min(row_tiles, wanted))
    row_programs = cdiv(row_tiles, tiles_per_program)
    num_warps = 4 if block_m * block_c >= 1024 else 1
    return TileConfig(
        block_m, block_c, channel_blocks, row_programs, tiles_per_program * block_m, num_warps
    )
