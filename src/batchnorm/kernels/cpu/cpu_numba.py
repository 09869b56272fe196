"""CPU kernels for batch normalization, compiled by Numba (``parallel=True`` loops).

Two memory layouts of the ``(N, C, L)`` view, each with a training forward, a backward and an
evaluation forward (one pass with given statistics):

* ``ncl``: ``x`` C-contiguous as ``(N, C, L)``. One channel per parallel iteration; its slice
  (``N`` runs of ``L`` values) is read once from memory and re-read from the core's L2 cache by
  the later passes, so the kernel moves close to the minimal bytes: ``2S`` forward (read ``x``,
  write ``y``), ``3S`` backward (read ``x``, ``dy``, write ``dx``).
* ``mc``: channels innermost, the ``(M, C)`` matrix with ``M = N·L`` (channels_last and
  ``(N, C)`` inputs). Row blocks small enough for L2 run in parallel; each block's mean and
  ``M2 = Σ (x − mean)²`` come from two passes over the cached block and are merged with Chan's
  formula, so the statistics cost one read of ``x`` from memory (``3S`` forward, ``5S``
  backward, against ATen's ``4S`` and ``5S``).

Math (design.md §2), per channel over ``M`` values: ``μ = Σx/M``, ``σ² = Σ(x − μ)²/M`` (two
passes, never ``E[x²] − E[x]²``), ``r = 1/sqrt(σ² + ε)``, ``y = (x − μ)·γr + β``;
backward ``dβ = Σdy``, ``dγ = r·Σdy·(x − μ)``, ``dx = γr·(dy − dβ/M − (x − μ)·r·dγ/M)``.
References: Ioffe & Szegedy, "Batch Normalization" (2015); Chan, Golub & LeVeque, "Algorithms
for computing the sample variance" (1983) for the merge of block statistics.

Element types: float32 and float64 arrays compute in their own type; bfloat16 arrives as its
``uint16`` bit pattern, is widened exactly to float32 (``bits << 16``) and rounded back to nearest
even on store (:func:`load`, :func:`store`), so statistics and sums are float32/float64 for every
input, as design.md §1 asks.

Sums (``ncl`` kernels): every row sum (``Σx``, ``Σ(x − μ)²``, ``Σdy``, ``Σdy·(x − μ)``) adds
chunks of at most :data:`_CHUNK` values in the compute type and the chunks in float64, so the
error is bounded by the chunk, not by ``L`` (about 4e-8 relative at ``L = 2²²``, where whole-row
float32 sums reach 7e-7). The chunks are slices handed to small inlined loops: a loop bounded
by ``min(start + _CHUNK, L)`` measured 2× slower, and the float64 per-element ``Σx`` 1.3×.

Every kernel writes into arrays the caller allocates. ``weight``/``bias`` are float64 arrays of
length ``C`` (ones/zeros when the caller has none); statistics are float64 arrays of length ``C``.
Reductions are compiled with ``reassoc`` only (SIMD partial sums), not full fast-math, so NaN and
infinity propagate as in plain arithmetic.

Why this file is long: the six Numba kernels (three passes in two layouts) share their block
helpers (moments, Chan merge, gradient sums), which a split would scatter.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

#: Input bytes per parallel block of the (M, C) kernels: a block stays in a core's L2 cache.
_BLOCK_BYTES = 1 << 18
#: Values per chunk of a row summed in the compute type before the float64 total (ncl kernels).
_CHUNK = 1024
#: Reassociation lets LLVM vectorize the float64 sums; no other fast-math assumptions.
_REDUCE_MATH = {"reassoc"}


def block_rows(rows: int, channels: int, itemsize: int) -> int:
    """Rows per parallel block of the ``(M, C)`` kernels: about 256 KiB of input, ≥ 1 row."""
    return max(1, min(rows, _BLOCK_BYTES // max(1, channels * itemsize)))


def compute_dtype(array: np.ndarray) -> type:
    """The NumPy type elementwise math runs in for ``array``: float64 stays, else float32."""
    return np.float64 if array.dtype == np.float64 else np.float32


def load(array, value):
    """An element of ``array`` as a float (bfloat16 bits widened to float32); Numba only."""


def store(array, value):
    """``value`` as an element of ``array`` (rounded to bfloat16 bits if needed); Numba only."""


def compute(array, value):
    """``value`` in the type elementwise math on ``array`` runs in; Numba only."""


@overload(load, inline="always")
def _load_impl(array, value):
    if array.dtype == types.uint16:  # bfloat16 bits: the high half of a float32
        return lambda array, value: np.uint32(np.uint32(value) << 16).view(np.float32)
    return lambda array, value: value


@overload(store, inline="always")
def _store_impl(array, value):
    if array.dtype == types.uint16:

        def to_bfloat16(array, value):
            bits = np.float32(value).view(np.uint32)
            rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))  # to even
            rounded = (bits + rounding) >> np.uint32(16)
            # NaN becomes the quiet NaN 0x7FC0 (torch's own conversion gives other NaN bits;
            # only NaN-ness is defined). Selected by a mask, not a branch: the store loops
            # then vectorize (measured 20% faster).
            is_nan = np.uint32((bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000))
            mask = np.uint32(0) - is_nan  # all ones for NaN, else zero
            return np.uint16(rounded ^ ((rounded ^ np.uint32(0x7FC0)) & mask))

        return to_bfloat16
    return lambda array, value: value


@overload(compute, inline="always")
def _compute_impl(array, value):
    if array.dtype == types.float64:
        return lambda array, value: np.float64(value)
    return lambda array, value: np.float32(value)


@njit(fastmath=_REDUCE_MATH, inline="always")
def _sum(values):
    """``Σ v`` over a 1D slice, in the compute type (one chunk of a row)."""
    acc = compute(values, 0.0)
    for i in range(values.shape[0]):
        acc += load(values, values[i])
    return acc


@njit(fastmath=_REDUCE_MATH, inline="always")
def _sum_squares(values, mu_x):
    """``(Σ (v − μ)², Σ (v − μ))`` over a 1D slice, in the compute type (one chunk of a row)."""
    acc = compute(values, 0.0)
    acc_d = compute(values, 0.0)
    for i in range(values.shape[0]):
        d = load(values, values[i]) - mu_x
        acc += d * d
        acc_d += d
    return acc, acc_d


@njit(fastmath=_REDUCE_MATH, inline="always")
def _grad_sums(dy, x, mu_x):
    """``(Σ dy, Σ dy·(x − μ))`` over 1D slices of equal length, in the compute type."""
    acc_dy = compute(x, 0.0)
    acc_dy_xmu = compute(x, 0.0)
    for i in range(x.shape[0]):
        g = load(dy, dy[i])
        acc_dy += g
        acc_dy_xmu += g * (load(x, x[i]) - mu_x)
    return acc_dy, acc_dy_xmu


@njit(parallel=True, fastmath=_REDUCE_MATH, cache=True)
def forward_ncl(x, weight, bias, eps, y, mean, var, invstd):
    """Training forward on ``x`` ``(N, C, L)``: fills ``y`` (like x), mean/var/invstd ``(C,)``."""
    n_batch, channels, length = x.shape
    count = n_batch * length  # M = N·L
    for c in prange(channels):
        total = 0.0  # Σ x: chunks in the compute type, added in float64
        for n in range(n_batch):
            x_row = x[n, c]  # (L,)
            for start in range(0, length, _CHUNK):
                total += _sum(x_row[start : start + _CHUNK])
        mu = total / count  # μ, as rounded by the float32 chunk sums
        mu_x = compute(x, mu)  # μ in the compute type: x − μ is exact near μ (Sterbenz)
        squares = 0.0  # Σ (x − μ)², second read from L2
        shift = 0.0  # Σ (x − μ): corrects μ's rounding (corrected two-pass, Chan et al. 1983)
        for n in range(n_batch):
            x_row = x[n, c]  # (L,)
            # Chunks as slices: a loop bounded by min(start + _CHUNK, L) measured 2× slower.
            for start in range(0, length, _CHUNK):
                chunk_squares, chunk_shift = _sum_squares(x_row[start : start + _CHUNK], mu_x)
                squares += chunk_squares
                shift += chunk_shift
        shift_mean = shift / count
        sigma2 = squares / count - shift_mean * shift_mean  # biased σ² about the corrected μ
        if sigma2 < 0.0:  # rounding of equal values (NaN stays NaN)
            sigma2 = 0.0
        if np.isfinite(mu):  # an infinity keeps μ = ±inf, as a plain sum gives
            mu += shift_mean
        mu_x = compute(x, mu)
        r = 1.0 / np.sqrt(sigma2 + eps)  # invstd
        scale_x = compute(x, weight[c] * r)  # γ·r
        bias_x = compute(x, bias[c])  # β
        for n in range(n_batch):
            x_row, y_row = x[n, c], y[n, c]  # (L,), (L,)
            for i in range(length):
                y_row[i] = store(y, (load(x, x_row[i]) - mu_x) * scale_x + bias_x)
        mean[c] = mu
        var[c] = sigma2
        invstd[c] = r


@njit(parallel=True, fastmath=_REDUCE_MATH, cache=True)
def backward_ncl(dy, x, weight, mean, invstd, dx, dweight, dbias):
    """Backward on ``(N, C, L)`` arrays; fills ``dx`` (like x) and dweight/dbias ``(C,)``."""
    n_batch, channels, length = x.shape
    count = n_batch * length  # M = N·L
    for c in prange(channels):
        mu_x = compute(x, mean[c])
        sum_dy = 0.0  # Σ dy, float64 across rows
        sum_dy_xmu = 0.0  # Σ dy·(x − μ)
        for n in range(n_batch):
            x_row, dy_row = x[n, c], dy[n, c]  # (L,), (L,)
            for start in range(0, length, _CHUNK):
                stop = start + _CHUNK
                chunk_dy, chunk_dy_xmu = _grad_sums(dy_row[start:stop], x_row[start:stop], mu_x)
                sum_dy += chunk_dy
                sum_dy_xmu += chunk_dy_xmu
        r = invstd[c]
        gain_x = compute(x, weight[c] * r)  # γ·r
        mean_term_x = compute(x, sum_dy / count)  # dβ / M
        slope_x = compute(x, sum_dy_xmu * r * r / count)  # r·dγ / M = r²·Σdy(x − μ) / M
        for n in range(n_batch):
            x_row, dy_row, dx_row = x[n, c], dy[n, c], dx[n, c]  # (L,) each
            for i in range(length):
                centered = load(x, x_row[i]) - mu_x  # x − μ
                g = load(dy, dy_row[i])
                dx_row[i] = store(dx, gain_x * (g - mean_term_x - centered * slope_x))
        dbias[c] = sum_dy
        dweight[c] = sum_dy_xmu * r


@njit(parallel=True, cache=True)
def _affine_ncl_by_channel(x, shift, scale, offset, out):
    """:func:`_affine_ncl` parallel over channels, for batches smaller than the thread count."""
    n_batch, channels, length = x.shape
    for c in prange(channels):
        shift_c, scale_c, offset_c = shift[c], scale[c], offset[c]
        for n in range(n_batch):
            x_row, out_row = x[n, c], out[n, c]  # (L,), (L,)
            for i in range(length):
                out_row[i] = store(out, (load(x, x_row[i]) - shift_c) * scale_c + offset_c)


@njit(parallel=True, cache=True)
def _affine_ncl(x, shift, scale, offset, out):
    """``out[n, c, i] = (x[n, c, i] − shift[c])·scale[c] + offset[c]`` on ``(N, C, L)``."""
    n_batch, channels, length = x.shape
    # Memory order, parallel over samples (no reduction ties a channel to one thread): 10–35%
    # faster than channel by channel when L is short, as the prefetcher follows one stream.
    for n in prange(n_batch):
        for c in range(channels):
            shift_c, scale_c, offset_c = shift[c], scale[c], offset[c]
            x_row, out_row = x[n, c], out[n, c]  # (L,), (L,)
            for i in range(length):
                out_row[i] = store(out, (load(x, x_row[i]) - shift_c) * scale_c + offset_c)


def inference_ncl(x, weight, bias, mean, var, eps, y):
    """Evaluation forward on ``(N, C, L)``: ``y = (x − μ)·γ/sqrt(var + ε) + β``, one pass."""
    dtype = compute_dtype(x)
    scale = (weight / np.sqrt(var + eps)).astype(dtype)  # (C,)  γ·r
    # Samples in parallel when there are enough of them, else channels (e.g. batch size 1).
    affine = _affine_ncl if x.shape[0] >= numba.get_num_threads() else _affine_ncl_by_channel
    affine(x, mean.astype(dtype), scale, bias.astype(dtype), y)


@njit(parallel=True, fastmath=_REDUCE_MATH, cache=True)
def _block_moments(x, rows):
    """Per row block of ``x`` ``(M, C)``: its mean and ``M2 = Σ (x − mean)²``, ``(B, C)`` each.

    Within a block (at most :data:`_CHUNK` rows) the sums run in the compute type, one
    accumulator per channel (float64 ones measured 1.6–1.8× slower); the second pass also sums
    ``x − mean``, which corrects the block mean's rounding (large offsets keep the variance's
    precision); blocks merge in float64.
    """
    total_rows, channels = x.shape
    blocks = (total_rows + rows - 1) // rows
    block_mean = np.empty((blocks, channels))
    block_m2 = np.empty((blocks, channels))
    for b in prange(blocks):
        start = b * rows
        stop = min(start + rows, total_rows)
        acc = np.full(channels, compute(x, 0.0))  # (C,) in the compute type
        for i in range(start, stop):
            row = x[i]  # (C,)
            for c in range(channels):
                acc[c] += load(x, row[c])
        count = stop - start
        mean_x = acc / compute(x, count)  # (C,) block mean, compute type
        m2 = np.zeros_like(acc)  # (C,)  second pass reads the block from L2
        shift = np.zeros_like(acc)  # (C,)  Σ (x − mean_x): corrects mean_x's rounding
        for i in range(start, stop):
            row = x[i]  # (C,)
            for c in range(channels):
                d = load(x, row[c]) - mean_x[c]
                m2[c] += d * d
                shift[c] += d
        for c in range(channels):
            shift_mean = float(shift[c]) / count
            # corrected two-pass (Chan, Golub & LeVeque 1983); an infinity keeps the mean ±inf
            finite = np.isfinite(mean_x[c])
            block_mean[b, c] = float(mean_x[c]) + shift_mean if finite else float(mean_x[c])
            block_m2[b, c] = float(m2[c]) - float(shift[c]) * shift_mean
    return block_mean, block_m2


@njit(cache=True)
def merge_moments(block_mean, block_m2, rows, total_rows, mean, var):
    """Chan's merge of the blocks' (count, mean, M2); writes mean and biased var ``(C,)``.

    A non-finite block mean (an infinity in the data) is combined directly, as a plain sum
    would carry it, so the merged mean is ±inf like ATen's, not NaN.
    """
    blocks, channels = block_mean.shape
    count_a = 0.0
    mean[:] = 0.0
    m2 = np.zeros(channels)  # (C,)
    for b in range(blocks):
        count_b = float(min(rows, total_rows - b * rows))
        count = count_a + count_b
        weight = count_b / count
        for c in range(channels):
            delta = block_mean[b, c] - mean[c]
            if np.isfinite(delta):
                mean[c] += delta * weight
            else:  # an infinity in the data: combined directly (δ would turn inf into NaN)
                mean[c] = mean[c] * (1.0 - weight) + block_mean[b, c] * weight
            m2[c] += block_m2[b, c] + delta * delta * (count_a * weight)
        count_a = count
    for c in range(channels):
        var[c] = m2[c] / total_rows if m2[c] >= 0.0 or np.isnan(m2[c]) else 0.0


@njit(parallel=True, cache=True)
def _affine_mc(x, shift, scale, offset, rows, out):
    """``out[i, c] = (x[i, c] − shift[c])·scale[c] + offset[c]`` on ``(M, C)``."""
    total_rows, channels = x.shape
    blocks = (total_rows + rows - 1) // rows
    for b in prange(blocks):
        for i in range(b * rows, min((b + 1) * rows, total_rows)):
            for c in range(channels):
                out[i, c] = store(out, (load(x, x[i, c]) - shift[c]) * scale[c] + offset[c])


def moments_mc(x, eps, mean, var, invstd):
    """Statistics of ``x`` ``(M, C)``: mean/var/invstd ``(C,)`` (blocks merged by Chan's rule)."""
    total_rows, channels = x.shape
    rows = min(block_rows(total_rows, channels, x.itemsize), _CHUNK)
    block_mean, block_m2 = _block_moments(x, rows)  # (B, C), (B, C)
    merge_moments(block_mean, block_m2, rows, total_rows, mean, var)
    invstd[:] = 1.0 / np.sqrt(var + eps)  # (C,)


def forward_mc(x, weight, bias, eps, y, mean, var, invstd):
    """Training forward on ``x`` ``(M, C)`` (channels innermost); same outputs as forward_ncl."""
    moments_mc(x, eps, mean, var, invstd)
    dtype = compute_dtype(x)
    scale = (weight * invstd).astype(dtype)  # (C,)  γ·r
    rows = block_rows(x.shape[0], x.shape[1], x.itemsize)
    _affine_mc(x, mean.astype(dtype), scale, bias.astype(dtype), rows, y)


def inference_mc(x, weight, bias, mean, var, eps, y):
    """Evaluation forward on ``(M, C)``: as :func:`inference_ncl`, one pass."""
    total_rows, channels = x.shape
    dtype = compute_dtype(x)
    scale = (weight / np.sqrt(var + eps)).astype(dtype)  # (C,)  γ·r
    rows = block_rows(total_rows, channels, x.itemsize)
    _affine_mc(x, mean.astype(dtype), scale, bias.astype(dtype), rows, y)


@njit(parallel=True, fastmath=_REDUCE_MATH, cache=True)
def _block_grad_sums(dy, x, mean_x, rows):
    """Per row block: ``Σ dy`` and ``Σ dy·(x − μ)`` per channel, ``(B, C)`` float64 each.

    As in :func:`_block_moments`, a block's sums run in the compute type.
    """
    total_rows, channels = x.shape
    blocks = (total_rows + rows - 1) // rows
    sum_dy = np.empty((blocks, channels))
    sum_dy_xmu = np.empty((blocks, channels))
    for b in prange(blocks):
        acc = np.full(channels, compute(x, 0.0))  # (C,) in the compute type
        acc_xmu = np.zeros_like(acc)  # (C,)
        for i in range(b * rows, min((b + 1) * rows, total_rows)):
            dy_row, x_row = dy[i], x[i]  # (C,), (C,)
            for c in range(channels):
                g = load(dy, dy_row[c])
                acc[c] += g
                acc_xmu[c] += g * (load(x, x_row[c]) - mean_x[c])
        for c in range(channels):
            sum_dy[b, c] = acc[c]
            sum_dy_xmu[b, c] = acc_xmu[c]
    return sum_dy, sum_dy_xmu


@njit(parallel=True, cache=True)
def _grad_input_mc(dy, x, mean_x, gain, mean_term, slope, rows, dx):
    """``dx = gain·(dy − mean_term − (x − μ)·slope)`` on ``(M, C)``."""
    total_rows, channels = x.shape
    blocks = (total_rows + rows - 1) // rows
    for b in prange(blocks):
        for i in range(b * rows, min((b + 1) * rows, total_rows)):
            for c in range(channels):
                centered = load(x, x[i, c]) - mean_x[c]  # x − μ
                g = load(dy, dy[i, c])
                dx[i, c] = store(dx, gain[c] * (g - mean_term[c] - centered * slope[c]))


def grad_sums_mc(dy, x, mean, sum_dy, sum_dy_xmu):
    """``Σ dy`` and ``Σ dy·(x − μ)`` per channel of ``(M, C)`` arrays, into ``(C,)`` float64."""
    total_rows, channels = x.shape
    rows = min(block_rows(total_rows, channels, x.itemsize), _CHUNK)
    block_dy, block_dy_xmu = _block_grad_sums(dy, x, mean.astype(compute_dtype(x)), rows)
    sum_dy[:] = block_dy.sum(axis=0)  # (C,)  dβ
    sum_dy_xmu[:] = block_dy_xmu.sum(axis=0)  # (C,)


def backward_mc(dy, x, weight, mean, invstd, dx, dweight, dbias):
    """Backward on ``(M, C)`` arrays; same outputs as backward_ncl."""
    total_rows, channels = x.shape
    sum_dy_xmu = np.empty(channels)  # (C,)
    grad_sums_mc(dy, x, mean, dbias, sum_dy_xmu)
    dweight[:] = sum_dy_xmu * invstd  # (C,)  dγ
    dtype = compute_dtype(x)
    gain = (weight * invstd).astype(dtype)  # (C,)  γ·r
    mean_term = (dbias / total_rows).astype(dtype)  # (C,)  dβ / M
    slope = (sum_dy_xmu * invstd * invstd / total_rows).astype(dtype)  # (C,)  r·dγ / M
    rows = block_rows(total_rows, channels, x.itemsize)
    _grad_input_mc(dy, x, mean.astype(dtype), gain, mean_term, slope, rows, dx)
