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
def tile_rows(tile, l_blocks, N, L, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """``(n, l, valid)`` of the ``BLOCK_N·BLOCK_L`` rows of tile number ``tile`` (flattened).

    Tile ``t`` covers ``n`` in ``[⌊t / l_blocks⌋·BLOCK_N, +BLOCK_N)`` and ``l`` in
    ``[(t mod l_blocks)·BLOCK_L, +BLOCK_L)``: one scalar division per tile, and within the tile
    only shifts and masks by the power of two ``BLOCK_L``, so no per-element ``m // L``. Row
    ``r`` of the tile is ``(n, l) = (r >> log2 BLOCK_L, r & (BLOCK_L − 1))``: ``l`` runs
    contiguously over ``BLOCK_L`` rows, which Triton's alignment analysis sees (vector loads
    where ``stride_l == 1``, ``stride_n`` and ``L`` divisible by the vector width).
    """
    n_block = tile // l_blocks
    l_block = tile - n_block * l_blocks
    r = tl.arange(0, BLOCK_N * BLOCK_L)  # [BLOCK_N·BLOCK_L]
    n = n_block * BLOCK_N + r // BLOCK_L  # [BLOCK_N·BLOCK_L]  constant over BLOCK_L rows
    l_index = l_block * BLOCK_L + r % BLOCK_L  # [BLOCK_N·BLOCK_L]  contiguous over BLOCK_L
    return n, l_index, (n < N) & (l_index < L)


@triton.jit
def tile_offsets(n, l_index, cols, stride_n, stride_c, stride_l):
    """Offsets (int64) of the ``[rows, BLOCK_C]`` tile of rows ``(n, l)`` × channels ``cols``."""
    rows = n.to(tl.int64) * stride_n + l_index.to(tl.int64) * stride_l  # [rows]
    return rows[:, None] + (cols.to(tl.int64) * stride_c)[None, :]


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
def arrive_last(counter_ptr, expected):
    """Whether this program is the last of ``expected`` to arrive at ``counter_ptr``.

    The "last program finishes" pattern (CUDA's threadFenceReduction sample, Inductor's split
    reductions): every program stores its partial, then arrives; the one that sees
    ``expected − 1`` arrivals before its own merges all partials, and sets the counter back to
    0, so the counter never needs zeroing before a launch (it is zeroed once when allocated).

    Memory ordering on a GPU (PTX memory model):

    * ``tl.debug_barrier()`` (``bar.sync``) first: every thread of this program has issued its
      partial stores before the one thread that performs the scalar atomic arrives;
    * the arrival is ``atom.acq_rel.gpu``: its release half, cumulative over what the program's
      threads wrote before the barrier, publishes the partial; its acquire half, in the last
      program, synchronizes with every earlier arrival (the atomics on one address form a
      release sequence), so all partials happen-before the merge;
    * a second ``tl.debug_barrier()`` orders the acquire before the merge loads of every thread
      of the last program; those loads also bypass L1 (``.cg``), which is not coherent.

    The reset (``atomic_xchg`` to 0, by the last program, after every program has arrived) is
    seen by the next launch on the stream, which starts only after this one ends; launches on
    other streams get counters of their own (the launch code caches them per stream). Under
    the interpreter programs run one after another, so the last program is the last one run.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")  # arrivals before this one
    last = arrived == expected - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")  # ready for the next launch
    tl.debug_barrier()
    return last


@triton.jit
def grid_barrier(counter_ptr, expected):
    """Waits until ``expected`` programs have arrived (all must be resident); never needs zeroing.

    A sense-reversing barrier on two int32 words, ``counter_ptr[0]`` (arrivals, back to 0 after
    every use) and ``counter_ptr[1]`` (generation, only ever incremented): each program reads
    the generation, then arrives (``acq_rel``); the last arrival resets the count and bumps the
    generation (``release``); the others poll the generation (``acquire``) until it moves. The
    generation is read before arriving (the release of the arrival orders that read before
    it), and it moves only after every program has arrived, so no program can miss it.
    ``tl.debug_barrier()`` around the scalar atomics puts every thread's stores before the
    arrival and the acquire before every thread's later loads. Deadlocks if the programs are
    not all resident, hence only for occupancy-sized grids (and one program in the
    interpreter).
    """
    generation_ptr = counter_ptr + 1
    tl.debug_barrier()
    generation = tl.atomic_add(generation_ptr, 0, sem="relaxed")
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == expected - 1:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")
        tl.atomic_add(generation_ptr, 1, sem="release")
    else:
        while tl.atomic_add(generation_ptr, 0, sem="acquire") == generation:
            pass
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


#: Largest rows-per-tile waste (masked lanes) accepted before a shorter ``BLOCK_L`` is tried.
_WASTE = 1 / 16


def vector_width(alignment: int) -> int:
    """``L_VEC``: the largest power of two up to 8 that divides ``alignment`` (the gcd of ``L``
    and every ``n`` and ``c`` stride of a launch).

    ``L`` and those strides are passed divided by ``L_VEC`` and multiplied back in the kernel,
    so Triton's alignment analysis (which knows only "divisible by 16" of an integer argument)
    sees that each ``(n, c)`` row starts ``L_VEC``-aligned and that the ``l < L`` mask is
    constant over ``L_VEC`` lanes: 16-byte loads for 14×14 in fp32 (``L_VEC`` 4), for 56×56 in
    fp32 and bf16 (8); 7×7 (49) stays at one element.
    """
    return min(8, alignment & -alignment) if alignment > 0 else 1


def block_length(length: int, cap: int) -> int:
    """``BLOCK_L`` for a spatial size ``length``: the largest power of two in ``[32, cap]`` whose
    tiles waste at most 1/16 of the rows, else ``next_power_of_2(length)`` (capped).

    E.g. 3136 (56²) → 256 (13 tiles, 6% masked), 784 (28²) → 64, 12544 (112²) → 1024; 196
    (14²) → 256 and 49 (7²) → 64 (no power of two cuts them finely; 23% masked lanes, rows
    packed ``BLOCK_N`` to a tile).
    """
    full = min(next_power_of_2(length), cap)
    block = full
    while block >= 32:
        if cdiv(length, block) * block - length <= _WASTE * length:
            return block
        block //= 2
    return full


@dataclass(frozen=True)
class TileConfig:
    """How an ``(N, C, L)`` problem is cut into programs.

    A tile is ``[BLOCK_N·BLOCK_L rows, BLOCK_C channels]`` (rows ``(n, l)``, see
    :func:`tile_rows`); the tiles of a channel block are numbered ``n_block·l_blocks + l_block``
    and each program takes ``tiles_per_program`` consecutive ones.

    Attributes:
        block_n: batch rows per tile.
        block_l: spatial positions per tile.
        block_c: channels per tile (and per program).
        l_vec: ``L_VEC``, the power of two dividing ``L`` that the kernels are told about.
        channel_blocks: programs along the channels, ``ceil(C / block_c)``.
        row_programs: programs along the rows (``P``, the partial summaries per channel).
        tiles_per_program: tiles each program walks.
        num_warps: warps per program.
    """

    block_n: int
    block_l: int
    block_c: int
    l_vec: int
    channel_blocks: int
    row_programs: int
    tiles_per_program: int
    num_warps: int

    @property
    def block_m(self) -> int:
        """Rows per tile, ``BLOCK_N·BLOCK_L``."""
        return self.block_n * self.block_l

    @property
    def grid(self) -> tuple[int, int]:
        """The launch grid ``(channel_blocks, row_programs)``."""
        return (self.channel_blocks, self.row_programs)


@functools.lru_cache(maxsize=1024)
def tile_config(
    batch: int,
    length: int,
    channels: int,
    channels_contiguous: bool,
    target_programs: int,
    block_l: int | None = None,
    block_c: int | None = None,
    block_n: int | None = None,
    vec: int = 1,
) -> TileConfig:
    """Chooses tiles and the split of the rows for one launch.

    Channels-contiguous input (channels_last, ``(M, C)``; the launch code passes it with
    ``N = 1, L = M``) takes wide channel tiles (up to 64 channels, so a warp reads whole
    128-byte lines); NCHW-like input takes narrow ones (4 channels) and 2-D ``(n, l)`` tiles:
    ``BLOCK_L`` from :func:`block_length`, ``BLOCK_N`` filling the tile to about
    :data:`TILE_ELEMENTS`. Rows are split over enough programs that about ``target_programs``
    run in all.

    Args:
        batch: ``N`` as the kernels see it (1 when ``n`` and ``l`` were merged).
        length: ``L`` as the kernels see it.
        channels: ``C``.
        channels_contiguous: the input's channel stride is 1 (and ``C > 1``).
        target_programs: programs to aim for (a few per SM on a GPU; few in the interpreter).
        block_l, block_c, block_n: explicit tile sizes (powers of two), for tests.
        vec: ``L_VEC`` (:func:`vector_width` of the launch's ``L`` and strides; 1 when the
            channels are contiguous).

    Returns:
        A :class:`TileConfig` (cached: the same problem gets the same object back).
    """
    if block_c is None:
        block_c = min(next_power_of_2(channels), 64 if channels_contiguous else 4)
    per_tile = max(16, TILE_ELEMENTS // block_c)  # rows per tile
    if block_l is None:
        block_l = max(block_length(max(length, 1), per_tile), 1)
    if block_n is None:
        block_n = max(1, min(per_tile // block_l, next_power_of_2(max(batch, 1))))
    if block_n * block_l < 16:  # Triton needs 16+ lanes along a dot-free axis to lay out well
        block_l = max(block_l, 16 // block_n)
    channel_blocks = cdiv(channels, block_c)
    tiles = max(1, cdiv(batch, block_n) * cdiv(length, block_l))
    wanted = max(1, target_programs // channel_blocks)
    tiles_per_program = cdiv(tiles, min(tiles, wanted))
    row_programs = cdiv(tiles, tiles_per_program)
    num_warps = 4 if block_n * block_l * block_c >= 1024 else 1
    return TileConfig(
        block_n, block_l, block_c, 1 if channels_contiguous else vec, channel_blocks, row_programs,
        tiles_per_program, num_warps,
    )  # fmt: skip
