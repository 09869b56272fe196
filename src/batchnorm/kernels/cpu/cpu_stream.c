/*
 * batchnorm.kernels.cpu._cpu_stream: CPU batch-norm kernels in memory order, with streaming stores.
 *
 * Every batch-norm pass reads the input once or twice and writes one tensor of its size:
 *
 *   statistics:   per channel μ and M2 = Σ (x − μ)²               (training forward)
 *                 per channel Σ dy and Σ dy·(x − μ)                 (training backward)
 *   affine:       y  = (x − shift)·scale + offset                   (evaluation; forward)
 *   grad:         dx = gain·((dy − mean_term) − (x − mean)·slope)   (backward)
 *
 * with per-channel parameters (design.md §2: shift = μ, scale = γ·r, offset = β; gain = γ·r,
 * mean_term = dβ/M, slope = r·dγ/M).
 *
 * Statistics read the input in memory order, so the hardware prefetcher streams it: for
 * (N, C, L), each run of L values is summed twice while it is in L1 (its mean, then M2 about
 * it; four runs at once, so that the dependency chains of short runs overlap) and merged into
 * its channel's (mean, M2) by Chan's rule in float64; for an (M, C) matrix, each block of rows
 * (at most 1024, about 256 KiB) is summed twice while it is in L2, one float32 accumulator per
 * channel, and the blocks are merged the same way. Sums within a run or block are float32
 * (chunks of at most 16384 values), across them float64 (Chan, Golub & LeVeque, "Algorithms for
 * computing the sample variance", 1983).
 *
 * Outputs: a plain store first reads each cache line it writes (a read for ownership), so an
 * output pass moves 3S bytes for S written; streaming (non-temporal) stores write whole lines
 * without reading them, 2S. The output is a flat run of values [start, end) of a dense
 * (N, C, L) array (`run` = L: value i belongs to channel (i / L) mod C) or of an (M, C) matrix
 * (`run` = 0: channel i mod C), walked in vectors of 16 values that track the channel without
 * divisions; a vector that spans two channels blends their parameters. The values before the
 * first 64-byte-aligned output address and after the last whole vector use plain stores.
 *
 * The module's functions (train_forward, train_backward, inference) each run a whole pass:
 * statistics, parameters, output and, in training, the running buffers (float32, in place), on
 * a team of up to `threads` threads of torch's own OpenMP runtime (see "Threads" below; on the
 * calling thread alone until use_openmp has found it).
 *
 * Element types: float32, or bfloat16 (`is_bf16`) widened exactly to float32 (bits << 16) and
 * rounded back to nearest even on store, NaN as the quiet NaN 0x7FC0, exactly as
 * batchnorm.kernels.cpu.cpu_numba does. Arithmetic is float32 (AVX-512 fused multiply-adds), the
 * per-channel combinations float64.
 *
 * The vector code needs AVX-512 F, BW and VL (checked at import: SUPPORTED); elsewhere, and on
 * other architectures, SUPPORTED is False and the module's functions raise RuntimeError.
 * Pointers come as integers from the caller (batchnorm.backends.numba_backend), which checks
 * dtypes, sizes and density; the functions release the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: its pyconfig.h defines _GNU_SOURCE (RTLD_NOLOAD) */
#if defined(__linux__)
#include <dlfcn.h>
#define HAVE_OPENMP_LOOKUP 1
#else
#define HAVE_OPENMP_LOOKUP 0
#endif
#include <stdint.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX512_BUILD 1
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#else
#define HAVE_AVX512_BUILD 0
#endif

/* Scalar element access: float32, or bfloat16 as its bit pattern. */
static inline float load_one(const char *base, int is_bf16, ptrdiff_t i) {
    if (!is_bf16) return ((const float *)base)[i];
    union { uint32_t bits; float value; } widened;
    widened.bits = (uint32_t)((const uint16_t *)base)[i] << 16;
    return widened.value;
}

static inline void store_one(char *base, int is_bf16, ptrdiff_t i, float value) {
    if (!is_bf16) {
        ((float *)base)[i] = value;
        return;
    }
    union { uint32_t bits; float value; } source;
    source.value = value;
    uint32_t rounded = (source.bits + 0x7FFFu + ((source.bits >> 16) & 1u)) >> 16; /* to even */
    if ((source.bits & 0x7FFFFFFFu) > 0x7F800000u) rounded = 0x7FC0u; /* NaN */
    ((uint16_t *)base)[i] = (uint16_t)rounded;
}

/* The channel of flat value i: (i / run) mod C for (N, C, L), i mod C for (M, C) (run = 0). */
static inline ptrdiff_t channel_of(ptrdiff_t i, ptrdiff_t run, ptrdiff_t channels) {
    return run ? (i / run) % channels : i % channels;
}

/* ---- Threads ----
 *
 * Each pass runs in phases over the team of threads the caller asks for: per-thread partial
 * statistics over a share of the rows (samples of (N, C, L), rows of (M, C)), merged on the
 * calling thread, then the output over the same shares (each thread writes what it read, so a
 * share that fits in cache is still there; with fewer rows than threads, equal shares of the
 * values instead, so that batch-1 inputs use every thread). The team comes from the OpenMP
 * runtime that torch
 * runs its own kernels on (use_openmp: GOMP_parallel of the libgomp torch's library loaded), so
 * that ATen's workers, still spinning after their last kernel, take our work instead of
 * competing with our threads for the cores. Without that runtime, or for one thread, each phase
 * runs on the calling thread: as thread 0 of 1 even inside somebody else's parallel region. */

/* More threads than this are refused (scratch is threads × C values). */
#define MAX_THREADS 1024

typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_query_t)(void);
static gomp_parallel_t gomp_parallel;
static omp_query_t omp_thread_num, omp_team_size;

/* One pass's arguments and its threads' partial results. */
typedef struct {
    const char *x, *dy;
    char *out;
    ptrdiff_t rows, channels, run; /* (N, C, L): N, C, L; (M, C): M, C, 0 */
    int is_bf16;
    const float *params[4]; /* per-channel parameters of the output phase */
    double *part_a, *part_b; /* threads × C: mean and M2, or Σ dy and Σ dy·(x − μ) */
    double *part_count;      /* threads: values per channel in each thread's share */
    float *work;             /* threads × 3C: (M, C) block sums */
    int team;                /* threads that ran the statistics phase (thread 0 writes it) */
    int in_team;             /* the current phase runs on an OpenMP team of ours */
} pass_t;

/* Runs body(pass) on a team of up to `threads` threads (one: the calling thread alone). */
static void run_team(void (*body)(void *), pass_t *pass, int threads) {
    pass->in_team = threads > 1 && gomp_parallel != NULL;
    if (pass->in_team)
        gomp_parallel(body, pass, (unsigned)threads, 0);
    else
        body(pass);
}

/* This thread's place in the pass's team; thread 0 of 1 when the pass runs on the calling
 * thread alone, even inside an enclosing parallel region (whose numbers the runtime would give). */
static void team_place(const pass_t *pass, int *thread, int *team) {
    *thread = pass->in_team ? omp_thread_num() : 0;
    *team = pass->in_team ? omp_team_size() : 1;
}

/* Thread `thread` of `team`'s share of the rows: [first, last). */
static void share(const pass_t *pass, int thread, int team, ptrdiff_t *first, ptrdiff_t *last) {
    *first = pass->rows * thread / team;
    *last = pass->rows * (thread + 1) / team;
}

static size_t item_size(const pass_t *pass) { return pass->is_bf16 ? 2 : 4; }

/* Values per row: C·L for (N, C, L), C for (M, C). */
static ptrdiff_t row_values(const pass_t *pass) {
    return pass->run ? pass->channels * pass->run : pass->channels;
}

/* The calling thread's rows [first, last) in a statistics phase; returns its place in the
 * team. Thread 0 records the team's size for the merge. */
static int statistics_share(pass_t *pass, ptrdiff_t *first, ptrdiff_t *last) {
    int thread, team;
    team_place(pass, &thread, &team);
    if (thread == 0) pass->team = team;
    share(pass, thread, team, first, last);
    return thread;
}

/* The calling thread's share of the output, flat values [start, end): its rows' values, or
 * with fewer rows than threads an equal share of all values (multiples of 64 values apart, so
 * that shares meet at whole cache lines). */
static void output_share(const pass_t *pass, ptrdiff_t *start, ptrdiff_t *end) {
    int thread, team;
    ptrdiff_t first, last, per_row = row_values(pass), total = pass->rows * per_row;
    team_place(pass, &thread, &team);
    if (pass->rows >= team) {
        share(pass, thread, team, &first, &last);
        *start = first * per_row;
        *end = last * per_row;
        return;
    }
    *start = thread == 0 ? 0 : (total * thread / team) & ~(ptrdiff_t)63;
    *end = thread + 1 == team ? total : (total * (thread + 1) / team) & ~(ptrdiff_t)63;
}

/* Scratch for a pass on up to `threads` threads: 4C floats of parameters (params[0..3]), and,
 * with `partials`, the threads' partial sums and (M, C) block sums. Returns 0, or −1 when out
 * of memory (nothing to free then). */
static int pass_scratch(pass_t *pass, int threads, int partials) {
    size_t channels = (size_t)pass->channels, parts = (size_t)threads * channels;
    float *params = malloc(sizeof(float) * 4 * channels);
    double *doubles = partials ? malloc(sizeof(double) * (2 * parts + (size_t)threads)) : NULL;
    float *work = partials ? malloc(sizeof(float) * 3 * parts) : NULL;
    if (params == NULL || (partials && (doubles == NULL || work == NULL))) {
        free(params);
        free(doubles);
        free(work);
        return -1;
    }
    for (int p = 0; p < 4; p++) pass->params[p] = params + p * channels;
    pass->part_a = doubles;
    pass->part_b = doubles ? doubles + parts : NULL;
    pass->part_count = doubles ? doubles + 2 * parts : NULL;
    pass->work = work;
    return 0;
}

static void free_scratch(pass_t *pass) {
    free((void *)pass->params[0]);
    free(pass->part_a);
    free(pass->work);
}

#if HAVE_AVX512_BUILD

AVX512 static inline __m512 load16(const char *address, int is_bf16) {
    if (!is_bf16) return _mm512_loadu_ps((const float *)address);
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)address));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* 16 float32 → 16 bfloat16 bit patterns, as store_one rounds them. */
AVX512 static inline __m256i to_bf16(__m512 values) {
    __m512i bits = _mm512_castps_si512(values);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(rounded);
}

/* A streaming store of 16 values at an address aligned to 16 elements. */
AVX512 static inline void stream16(char *address, __m512 values, int is_bf16) {
    if (!is_bf16)
        _mm512_stream_ps((float *)address, values);
    else
        _mm256_stream_si256((__m256i *)address, to_bf16(values));
}

/* Where a walk over flat values stands: the current channel and, for (N, C, L), where its run
 * of L values ends. */
typedef struct {
    ptrdiff_t run, channels, run_end, channel;
} walk_t;

static inline walk_t walk_from(ptrdiff_t i, ptrdiff_t run, ptrdiff_t channels) {
    walk_t walk = {run, channels, 0, 0};
    if (run) {
        ptrdiff_t row = i / run;
        walk.run_end = (row + 1) * run;
        walk.channel = row % channels;
    } else {
        walk.channel = i % channels;
    }
    return walk;
}

#define MAX_PARAMS 4

/* The per-lane values of `count` per-channel arrays for the 16 values from flat index i, into
 * `lanes`; moves the walk 16 values on. Returns 1 when the next vector lies in the same run
 * (its parameters are these broadcasts, and `lanes` need not be reloaded: `keep`). */
AVX512 static inline int vector_params(walk_t *walk, ptrdiff_t i, int count,
                                       const float *const *params, __m512 *lanes, int keep) {
    ptrdiff_t channels = walk->channels;
    if (walk->run) {
        if (i + 16 <= walk->run_end) { /* one channel */
            if (!keep)
                for (int p = 0; p < count; p++) lanes[p] = _mm512_set1_ps(params[p][walk->channel]);
            if (i + 16 < walk->run_end) return 1;
            walk->run_end += walk->run;
            walk->channel = walk->channel + 1 == channels ? 0 : walk->channel + 1;
            return 0;
        }
        if (walk->run >= 16) { /* two channels: lanes from run_end on take the next one */
            ptrdiff_t next = walk->channel + 1 == channels ? 0 : walk->channel + 1;
            __mmask16 later = (__mmask16)(0xFFFFu << (walk->run_end - i));
            for (int p = 0; p < count; p++)
                lanes[p] = _mm512_mask_blend_ps(later, _mm512_set1_ps(params[p][walk->channel]),
                                                _mm512_set1_ps(params[p][next]));
            walk->run_end += walk->run;
            walk->channel = next;
            return 0;
        }
    } else if (walk->channel + 16 <= channels) { /* (M, C): 16 consecutive channels */
        for (int p = 0; p < count; p++) lanes[p] = _mm512_loadu_ps(params[p] + walk->channel);
        walk->channel += 16;
        if (walk->channel == channels) walk->channel = 0;
        return 0;
    }
    /* Short runs (L < 16) or a wrap past channel C − 1: lane by lane. */
    float gathered[MAX_PARAMS][16];
    for (int lane = 0; lane < 16; lane++) {
        if (walk->run && i + lane == walk->run_end) {
            walk->run_end += walk->run;
            walk->channel = walk->channel + 1 == channels ? 0 : walk->channel + 1;
        }
        for (int p = 0; p < count; p++) gathered[p][lane] = params[p][walk->channel];
        if (!walk->run) walk->channel = walk->channel + 1 == channels ? 0 : walk->channel + 1;
    }
    if (walk->run && i + 16 == walk->run_end) {
        walk->run_end += walk->run;
        walk->channel = walk->channel + 1 == channels ? 0 : walk->channel + 1;
    }
    for (int p = 0; p < count; p++) lanes[p] = _mm512_loadu_ps(gathered[p]);
    return 0;
}

/* Values before the first output address aligned to 64 bytes, at most `end`. */
static inline ptrdiff_t aligned_start(const char *out, ptrdiff_t start, ptrdiff_t end, size_t item) {
    ptrdiff_t i = start;
    while (i < end && ((uintptr_t)(out + i * item) & 63u) != 0) i++;
    return i;
}

AVX512 static void affine_avx512(const char *x, char *y, ptrdiff_t start, ptrdiff_t end,
                                 ptrdiff_t run, ptrdiff_t channels, int is_bf16,
                                 const float *shift, const float *scale, const float *offset) {
    const float *params[3] = {shift, scale, offset};
    size_t item = is_bf16 ? 2 : 4;
    ptrdiff_t body = aligned_start(y, start, end, item), i;
    for (i = start; i < body; i++) {
        ptrdiff_t c = channel_of(i, run, channels);
        store_one(y, is_bf16, i, (load_one(x, is_bf16, i) - shift[c]) * scale[c] + offset[c]);
    }
    __m512 lanes[3];
    walk_t walk = walk_from(i, run, channels);
    int keep = 0;
    for (; i + 16 <= end; i += 16) {
        keep = vector_params(&walk, i, 3, params, lanes, keep);
        __m512 centered = _mm512_sub_ps(load16(x + i * item, is_bf16), lanes[0]); /* x − μ */
        stream16(y + i * item, _mm512_fmadd_ps(centered, lanes[1], lanes[2]), is_bf16);
    }
    for (; i < end; i++) {
        ptrdiff_t c = channel_of(i, run, channels);
        store_one(y, is_bf16, i, (load_one(x, is_bf16, i) - shift[c]) * scale[c] + offset[c]);
    }
    _mm_sfence(); /* streaming stores are visible to other threads once the call returns */
}

AVX512 static void grad_avx512(const char *dy, const char *x, char *dx, ptrdiff_t start,
                               ptrdiff_t end, ptrdiff_t run, ptrdiff_t channels, int is_bf16,
                               const float *mean, const float *gain, const float *mean_term,
                               const float *slope) {
    const float *params[4] = {mean, gain, mean_term, slope};
    size_t item = is_bf16 ? 2 : 4;
    ptrdiff_t body = aligned_start(dx, start, end, item), i;
#define GRAD_ONE(j)                                                                            \
    do {                                                                                       \
        ptrdiff_t c = channel_of(j, run, channels);                                            \
        float centered = load_one(x, is_bf16, j) - mean[c];                                    \
        store_one(dx, is_bf16, j,                                                              \
                  gain[c] * ((load_one(dy, is_bf16, j) - mean_term[c]) - centered * slope[c])); \
    } while (0)
    for (i = start; i < body; i++) GRAD_ONE(i);
    __m512 lanes[4];
    walk_t walk = walk_from(i, run, channels);
    int keep = 0;
    for (; i + 16 <= end; i += 16) {
        keep = vector_params(&walk, i, 4, params, lanes, keep);
        __m512 centered = _mm512_sub_ps(load16(x + i * item, is_bf16), lanes[0]); /* x − μ */
        __m512 shifted = _mm512_sub_ps(load16(dy + i * item, is_bf16), lanes[2]); /* dy − dβ/M */
        __m512 inner = _mm512_fnmadd_ps(centered, lanes[3], shifted);
        stream16(dx + i * item, _mm512_mul_ps(lanes[1], inner), is_bf16);
    }
    for (; i < end; i++) GRAD_ONE(i);
#undef GRAD_ONE
    _mm_sfence();
}

/* Up to 16 values from address, lanes outside `mask` zero. */
AVX512 static inline __m512 load16_masked(const char *address, int is_bf16, __mmask16 mask) {
    if (!is_bf16) return _mm512_maskz_loadu_ps(mask, (const float *)address);
    __m256i bits = _mm256_maskz_loadu_epi16(mask, (const __m256i *)address);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

static inline __mmask16 lanes_below(ptrdiff_t count) {
    return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
}

/* The mean of values summed about `center` to Σ (v − center) / n = shift_mean. With an infinity
 * among them the center is ±inf and the shift NaN: the mean is the center, as a plain sum gives. */
static inline double corrected_mean(float center, double shift_mean) {
    return isfinite(center) ? (double)center + shift_mean : (double)center;
}

/* Chan's merge of a part (mean_b, m2_b) holding a fraction `weight` of the merged count into
 * (mean, m2); `between` = count_a·count_b / (count_a + count_b). A non-finite mean (an infinity
 * in the data) is combined directly, as a plain sum would carry it, instead of through
 * δ = mean_b − mean, which would turn inf into NaN. */
static inline void chan_merge(double *mean, double *m2, double mean_b, double m2_b, double weight,
                              double between) {
    double delta = mean_b - *mean;
    if (isfinite(delta)) {
        *mean += delta * weight;
        *m2 += m2_b + delta * delta * between;
    } else {
        *mean = *mean * (1.0 - weight) + mean_b * weight;
        *m2 += m2_b + delta * delta * between;
    }
}

/* Run sums: float32 lanes, four independent accumulators (the add latency, not memory, bounds
 * one accumulator on runs of a few hundred values), chunks of at most CHUNK_VALUES values
 * added in float64. */
#define CHUNK_VALUES (64 * 256)

/* Σ v over a run of n values. */
AVX512 static double run_sum(const char *row, ptrdiff_t n, int is_bf16) {
    size_t item = is_bf16 ? 2 : 4;
    double total = 0.0;
    ptrdiff_t i = 0;
    do {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + 64 <= stop; i += 64) {
            a0 = _mm512_add_ps(a0, load16(row + i * item, is_bf16));
            a1 = _mm512_add_ps(a1, load16(row + (i + 16) * item, is_bf16));
            a2 = _mm512_add_ps(a2, load16(row + (i + 32) * item, is_bf16));
            a3 = _mm512_add_ps(a3, load16(row + (i + 48) * item, is_bf16));
        }
        for (; i + 16 <= stop; i += 16) a0 = _mm512_add_ps(a0, load16(row + i * item, is_bf16));
        if (i < stop) { /* the last few values, as one masked vector */
            a1 = _mm512_add_ps(a1, load16_masked(row + i * item, is_bf16, lanes_below(stop - i)));
            i = stop;
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    } while (i < n);
    return total;
}

/* The corrected second pass over a run of n values (Chan, Golub & LeVeque 1983): with
 * d = v − center, M2 = Σ d² − (Σ d)²/n about the run's mean center + Σ d / n, which *mean_out
 * receives. The center (the first pass's float32 mean) may be off by the first pass's rounding;
 * Σ d corrects that, so large offsets (|μ| ≫ σ) keep the variance's precision. */
AVX512 static double run_sum_squares(const char *row, ptrdiff_t n, int is_bf16, float center,
                                     double *mean_out) {
    size_t item = is_bf16 ? 2 : 4;
    __m512 shift = _mm512_set1_ps(center);
    double total = 0.0, total_d = 0.0;
    ptrdiff_t i = 0;
#define SQUARE_INTO(acc, acc_d, at)                                            \
    do {                                                                       \
        __m512 d = _mm512_sub_ps(load16(row + (at) * item, is_bf16), shift);   \
        acc = _mm512_fmadd_ps(d, d, acc);                                      \
        acc_d = _mm512_add_ps(acc_d, d);                                       \
    } while (0)
    do {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0;
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + 64 <= stop; i += 64) {
            SQUARE_INTO(a0, b0, i);
            SQUARE_INTO(a1, b1, i + 16);
            SQUARE_INTO(a2, b0, i + 32);
            SQUARE_INTO(a3, b1, i + 48);
        }
        for (; i + 16 <= stop; i += 16) SQUARE_INTO(a0, b0, i);
        if (i < stop) {
            __mmask16 mask = lanes_below(stop - i);
            __m512 d = _mm512_maskz_sub_ps(mask, load16_masked(row + i * item, is_bf16, mask), shift);
            a1 = _mm512_fmadd_ps(d, d, a1);
            b1 = _mm512_add_ps(b1, d);
            i = stop;
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        total_d += _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
    } while (i < n);
#undef SQUARE_INTO
    double shift_mean = n > 0 ? total_d / (double)n : 0.0;
    *mean_out = corrected_mean(center, shift_mean);
    return total - total_d * shift_mean;
}

/* (Σ dy, Σ dy·(x − center)) over runs of n values, added to *sum_dy, *sum_dy_xmu. */
AVX512 static void run_grad_sums(const char *dy, const char *x, ptrdiff_t n, int is_bf16,
                                 float center, double *sum_dy, double *sum_dy_xmu) {
    size_t item = is_bf16 ? 2 : 4;
    __m512 shift = _mm512_set1_ps(center);
    double total = 0.0, total_xmu = 0.0;
    ptrdiff_t i = 0;
    /* dy is zero in lanes outside `mask`, so those lanes add nothing to either sum. */
#define GRAD_INTO(acc, acc_xmu, at, mask)                                                        \
    do {                                                                                         \
        __m512 g = load16_masked(dy + (at) * item, is_bf16, mask);                               \
        acc = _mm512_add_ps(acc, g);                                                             \
        __m512 centered = _mm512_sub_ps(load16_masked(x + (at) * item, is_bf16, mask), shift);  \
        acc_xmu = _mm512_fmadd_ps(g, centered, acc_xmu);                                         \
    } while (0)
    do {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + 32 <= stop; i += 32) {
            GRAD_INTO(a0, b0, i, 0xFFFF);
            GRAD_INTO(a1, b1, i + 16, 0xFFFF);
        }
        for (; i + 16 <= stop; i += 16) GRAD_INTO(a0, b0, i, 0xFFFF);
        if (i < stop) {
            GRAD_INTO(a1, b1, i, lanes_below(stop - i));
            i = stop;
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        total_xmu += _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
    } while (i < n);
#undef GRAD_INTO
    *sum_dy += total;
    *sum_dy_xmu += total_xmu;
}

/* Four runs at once (consecutive channels of one sample, `stride` bytes apart): the same sums
 * as run_sum / run_sum_squares / run_grad_sums, one accumulator per run, so that the four
 * dependency chains of short runs overlap. */
#define GROUP 4

AVX512 static void group_sums(const char *first, ptrdiff_t stride, ptrdiff_t n, int is_bf16,
                              double *out) {
    size_t item = is_bf16 ? 2 : 4;
    for (int g = 0; g < GROUP; g++) out[g] = 0.0;
    ptrdiff_t i = 0;
    do {
        __m512 acc[GROUP];
        for (int g = 0; g < GROUP; g++) acc[g] = _mm512_setzero_ps();
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + 16 <= stop; i += 16)
            for (int g = 0; g < GROUP; g++)
                acc[g] = _mm512_add_ps(acc[g], load16(first + g * stride + i * item, is_bf16));
        if (i < stop) {
            __mmask16 mask = lanes_below(stop - i);
            for (int g = 0; g < GROUP; g++)
                acc[g] = _mm512_add_ps(acc[g], load16_masked(first + g * stride + i * item, is_bf16, mask));
            i = stop;
        }
        for (int g = 0; g < GROUP; g++) out[g] += _mm512_reduce_add_ps(acc[g]);
    } while (i < n);
}

/* run_sum_squares for GROUP runs: M2 about each run's corrected mean, which means[] receives. */
AVX512 static void group_sum_squares(const char *first, ptrdiff_t stride, ptrdiff_t n, int is_bf16,
                                     const float *centers, double *out, double *means) {
    size_t item = is_bf16 ? 2 : 4;
    __m512 shift[GROUP];
    double total_d[GROUP];
    for (int g = 0; g < GROUP; g++) {
        shift[g] = _mm512_set1_ps(centers[g]);
        out[g] = total_d[g] = 0.0;
    }
    ptrdiff_t i = 0;
    do {
        __m512 acc[GROUP], acc_d[GROUP];
        for (int g = 0; g < GROUP; g++) acc[g] = acc_d[g] = _mm512_setzero_ps();
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + 16 <= stop; i += 16)
            for (int g = 0; g < GROUP; g++) {
                __m512 d = _mm512_sub_ps(load16(first + g * stride + i * item, is_bf16), shift[g]);
                acc[g] = _mm512_fmadd_ps(d, d, acc[g]);
                acc_d[g] = _mm512_add_ps(acc_d[g], d);
            }
        if (i < stop) {
            __mmask16 mask = lanes_below(stop - i);
            for (int g = 0; g < GROUP; g++) {
                __m512 v = load16_masked(first + g * stride + i * item, is_bf16, mask);
                __m512 d = _mm512_maskz_sub_ps(mask, v, shift[g]);
                acc[g] = _mm512_fmadd_ps(d, d, acc[g]);
                acc_d[g] = _mm512_add_ps(acc_d[g], d);
            }
            i = stop;
        }
        for (int g = 0; g < GROUP; g++) {
            out[g] += _mm512_reduce_add_ps(acc[g]);
            total_d[g] += _mm512_reduce_add_ps(acc_d[g]);
        }
    } while (i < n);
    for (int g = 0; g < GROUP; g++) {
        double shift_mean = n > 0 ? total_d[g] / (double)n : 0.0;
        means[g] = corrected_mean(centers[g], shift_mean);
        out[g] -= total_d[g] * shift_mean;
    }
}

AVX512 static void group_grad_sums(const char *dy, const char *x, ptrdiff_t stride, ptrdiff_t n,
                                   int is_bf16, const float *centers, double *sum_dy,
                                   double *sum_dy_xmu) {
    size_t item = is_bf16 ? 2 : 4;
    __m512 shift[GROUP];
    for (int g = 0; g < GROUP; g++) shift[g] = _mm512_set1_ps(centers[g]);
    ptrdiff_t i = 0;
    do {
        __m512 acc[GROUP], acc_xmu[GROUP];
        for (int g = 0; g < GROUP; g++) acc[g] = acc_xmu[g] = _mm512_setzero_ps();
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        while (i < stop) {
            __mmask16 mask = lanes_below(stop - i);
            for (int g = 0; g < GROUP; g++) {
                ptrdiff_t at = g * stride + i * (ptrdiff_t)item;
                __m512 grad = load16_masked(dy + at, is_bf16, mask); /* zero outside mask */
                acc[g] = _mm512_add_ps(acc[g], grad);
                __m512 centered = _mm512_sub_ps(load16_masked(x + at, is_bf16, mask), shift[g]);
                acc_xmu[g] = _mm512_fmadd_ps(grad, centered, acc_xmu[g]);
            }
            i += 16;
        }
        i = stop;
        for (int g = 0; g < GROUP; g++) {
            sum_dy[g] += _mm512_reduce_add_ps(acc[g]);
            sum_dy_xmu[g] += _mm512_reduce_add_ps(acc_xmu[g]);
        }
    } while (i < n);
}

/* Samples [n0, n1) of x (N, C, L) in memory order: per channel, the mean and M2 = Σ (x − mean)²
 * of those samples' values. Each run of L values is summed twice while it is in L1 (its mean,
 * then M2 about it) and merged into the channel's running (mean, M2) by Chan's rule. */
AVX512 static void moments_ncl_avx512(const char *x, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t channels,
                                      ptrdiff_t run, int is_bf16, double *mean, double *m2) {
    size_t item = is_bf16 ? 2 : 4;
    ptrdiff_t stride = run * (ptrdiff_t)item; /* bytes from one channel's run to the next */
    double inverse_run = 1.0 / (double)run;
    for (ptrdiff_t c = 0; c < channels; c++) mean[c] = m2[c] = 0.0;
    for (ptrdiff_t n = n0; n < n1; n++) {
        double runs_before = (double)(n - n0);     /* k: runs of L values merged so far */
        double weight = 1.0 / (runs_before + 1.0); /* L / (k·L + L) */
        double between = runs_before * (double)run * weight; /* k·L·L / (k·L + L) */
        const char *sample = x + n * channels * stride;
        for (ptrdiff_t c = 0; c < channels;) {
            double run_mean[GROUP], run_m2[GROUP];
            float centers[GROUP];
            int count = channels - c >= GROUP ? GROUP : 1;
            if (count == GROUP) {
                group_sums(sample + c * stride, stride, run, is_bf16, run_mean);
                for (int g = 0; g < GROUP; g++) centers[g] = (float)(run_mean[g] * inverse_run);
                group_sum_squares(sample + c * stride, stride, run, is_bf16, centers, run_m2,
                                  run_mean);
            } else {
                float center = (float)(run_sum(sample + c * stride, run, is_bf16) * inverse_run);
                run_m2[0] = run_sum_squares(sample + c * stride, run, is_bf16, center, run_mean);
            }
            for (int g = 0; g < count; g++, c++)
                chan_merge(mean + c, m2 + c, run_mean[g], run_m2[g], weight, between);
        }
    }
}

/* Samples [n0, n1) of dy and x (N, C, L): per channel, Σ dy and Σ dy·(x − mean) added to
 * sum_dy, sum_dy_xmu (float64). */
AVX512 static void grad_sums_ncl_avx512(const char *dy, const char *x, ptrdiff_t n0, ptrdiff_t n1,
                                        ptrdiff_t channels, ptrdiff_t run, int is_bf16,
                                        const float *mean, double *sum_dy, double *sum_dy_xmu) {
    ptrdiff_t stride = run * (is_bf16 ? 2 : 4); /* bytes from one channel's run to the next */
    for (ptrdiff_t n = n0; n < n1; n++) {
        ptrdiff_t c = 0;
        for (; c + GROUP <= channels; c += GROUP) {
            ptrdiff_t offset = (n * channels + c) * stride;
            group_grad_sums(dy + offset, x + offset, stride, run, is_bf16, mean + c, sum_dy + c,
                            sum_dy_xmu + c);
        }
        for (; c < channels; c++) {
            ptrdiff_t offset = (n * channels + c) * stride;
            run_grad_sums(dy + offset, x + offset, run, is_bf16, mean[c], sum_dy + c, sum_dy_xmu + c);
        }
    }
}

/* Rows per block of an (M, C) matrix: about 256 KiB, at most 1024 rows (float32 sums). */
static ptrdiff_t block_rows(ptrdiff_t channels, size_t item) {
    ptrdiff_t rows = (ptrdiff_t)((256 * 1024) / ((size_t)channels * item));
    return rows < 1 ? 1 : rows > 1024 ? 1024 : rows;
}

/* Rows of an (M, C) matrix added into per-channel float32 accumulators (in L1) four at a time:
 * each accumulator is loaded and stored once per four rows, so the chains through memory (a
 * store, then the next row's load of it) are a quarter as long. */
#define ROWS_AT_ONCE 4

/* Values of channels [c, c + 16) (lanes outside `mask` zero) of four consecutive rows from
 * `row`, `row_bytes` apart. */
AVX512 static inline void load_rows4(const char *row, ptrdiff_t row_bytes, int is_bf16,
                                     __mmask16 mask, __m512 *values) {
    for (int k = 0; k < ROWS_AT_ONCE; k++) values[k] = load16_masked(row + k * row_bytes, is_bf16, mask);
}

/* v[0] + v[1] + v[2] + v[3], as two independent adds and one more. */
AVX512 static inline __m512 sum_rows4(const __m512 *v) {
    return _mm512_add_ps(_mm512_add_ps(v[0], v[1]), _mm512_add_ps(v[2], v[3]));
}

/* Σ a[k]·b[k] over four rows, in fused multiply-adds. */
AVX512 static inline __m512 dot_rows4(const __m512 *a, const __m512 *b) {
    __m512 partial = _mm512_fmadd_ps(a[1], b[1], _mm512_mul_ps(a[2], b[2]));
    return _mm512_fmadd_ps(a[3], b[3], _mm512_fmadd_ps(a[0], b[0], partial));
}

/* Per channel mean and M2 of an (M, C) matrix, in memory order: each block of rows (in L2 after
 * the first pass) is summed twice in float32, one accumulator per channel (in L1): its mean,
 * then M2 about it (corrected by Σ (x − mean), see run_sum_squares); blocks merge by Chan's rule
 * in float64. `work` holds 3·C floats. */
AVX512 static void moments_mc_avx512(const char *x, ptrdiff_t rows, ptrdiff_t channels, int is_bf16,
                                     double *mean, double *m2, float *work) {
    size_t item = is_bf16 ? 2 : 4;
    ptrdiff_t step = block_rows(channels, item), row_bytes = channels * (ptrdiff_t)item;
    float *sums = work, *centers = work + channels, *shifts = work + 2 * channels;
    double count = 0.0;
    for (ptrdiff_t c = 0; c < channels; c++) mean[c] = m2[c] = 0.0;
    for (ptrdiff_t r0 = 0; r0 < rows; r0 += step) {
        ptrdiff_t r1 = r0 + step < rows ? r0 + step : rows, r;
        for (ptrdiff_t c = 0; c < channels; c++) sums[c] = 0.0f;
        for (r = r0; r < r1; r += ROWS_AT_ONCE) {
            int four = r + ROWS_AT_ONCE <= r1;
            const char *row = x + r * row_bytes;
            for (ptrdiff_t c = 0; c < channels; c += 16) {
                __mmask16 mask = lanes_below(channels - c);
                __m512 acc = _mm512_maskz_loadu_ps(mask, sums + c);
                if (four) {
                    __m512 v[ROWS_AT_ONCE];
                    load_rows4(row + c * item, row_bytes, is_bf16, mask, v);
                    acc = _mm512_add_ps(acc, sum_rows4(v));
                } else {
                    for (ptrdiff_t k = 0; k < r1 - r; k++)
                        acc = _mm512_add_ps(acc, load16_masked(row + k * row_bytes + c * item,
                                                               is_bf16, mask));
                }
                _mm512_mask_storeu_ps(sums + c, mask, acc);
            }
        }
        float inverse = 1.0f / (float)(r1 - r0);
        for (ptrdiff_t c = 0; c < channels; c++) {
            centers[c] = sums[c] * inverse;
            sums[c] = shifts[c] = 0.0f;
        }
        for (r = r0; r < r1; r += ROWS_AT_ONCE) {
            ptrdiff_t count_rows = r1 - r < ROWS_AT_ONCE ? r1 - r : ROWS_AT_ONCE;
            const char *row = x + r * row_bytes;
            for (ptrdiff_t c = 0; c < channels; c += 16) {
                __mmask16 mask = lanes_below(channels - c);
                __m512 center = _mm512_maskz_loadu_ps(mask, centers + c);
                __m512 acc = _mm512_maskz_loadu_ps(mask, sums + c);
                __m512 acc_d = _mm512_maskz_loadu_ps(mask, shifts + c);
                if (count_rows == ROWS_AT_ONCE) {
                    __m512 v[ROWS_AT_ONCE];
                    load_rows4(row + c * item, row_bytes, is_bf16, mask, v);
                    for (int k = 0; k < ROWS_AT_ONCE; k++) v[k] = _mm512_maskz_sub_ps(mask, v[k], center);
                    acc = _mm512_add_ps(acc, dot_rows4(v, v));     /* Σ d² */
                    acc_d = _mm512_add_ps(acc_d, sum_rows4(v)); /* Σ d */
                } else {
                    for (ptrdiff_t k = 0; k < count_rows; k++) {
                        __m512 d = _mm512_maskz_sub_ps(
                            mask, load16_masked(row + k * row_bytes + c * item, is_bf16, mask),
                            center);
                        acc = _mm512_fmadd_ps(d, d, acc);
                        acc_d = _mm512_add_ps(acc_d, d);
                    }
                }
                _mm512_mask_storeu_ps(sums + c, mask, acc);
                _mm512_mask_storeu_ps(shifts + c, mask, acc_d);
            }
        }
        double block = (double)(r1 - r0), weight = block / (count + block);
        for (ptrdiff_t c = 0; c < channels; c++) {
            /* corrected two-pass: Σ d about the float32 block mean corrects it (see
             * run_sum_squares) */
            double shift_mean = (double)shifts[c] / block;
            double block_m2 = (double)sums[c] - (double)shifts[c] * shift_mean;
            chan_merge(mean + c, m2 + c, corrected_mean(centers[c], shift_mean), block_m2, weight,
                       count * weight);
        }
        count += block;
    }
}

/* Per channel Σ dy and Σ dy·(x − mean) of (M, C) matrices in memory order: float32 sums per
 * block of rows (four rows per accumulator update), added in float64 into sum_dy, sum_dy_xmu
 * (zeroed here). `work` holds 2·C floats. */
AVX512 static void grad_sums_mc_avx512(const char *dy, const char *x, ptrdiff_t rows,
                                       ptrdiff_t channels, int is_bf16, const float *mean,
                                       double *sum_dy, double *sum_dy_xmu, float *work) {
    size_t item = is_bf16 ? 2 : 4;
    ptrdiff_t step = block_rows(channels, item), row_bytes = channels * (ptrdiff_t)item;
    float *block_dy = work, *block_xmu = work + channels;
    for (ptrdiff_t c = 0; c < channels; c++) sum_dy[c] = sum_dy_xmu[c] = 0.0;
    for (ptrdiff_t r0 = 0; r0 < rows; r0 += step) {
        ptrdiff_t r1 = r0 + step < rows ? r0 + step : rows;
        for (ptrdiff_t c = 0; c < channels; c++) block_dy[c] = block_xmu[c] = 0.0f;
        for (ptrdiff_t r = r0; r < r1; r += ROWS_AT_ONCE) {
            ptrdiff_t count_rows = r1 - r < ROWS_AT_ONCE ? r1 - r : ROWS_AT_ONCE;
            ptrdiff_t at = r * row_bytes;
            for (ptrdiff_t c = 0; c < channels; c += 16) {
                __mmask16 mask = lanes_below(channels - c);
                __m512 center = _mm512_maskz_loadu_ps(mask, mean + c);
                __m512 acc = _mm512_maskz_loadu_ps(mask, block_dy + c);
                __m512 acc_xmu = _mm512_maskz_loadu_ps(mask, block_xmu + c);
                if (count_rows == ROWS_AT_ONCE) {
                    __m512 g[ROWS_AT_ONCE], v[ROWS_AT_ONCE];
                    load_rows4(dy + at + c * item, row_bytes, is_bf16, mask, g);
                    load_rows4(x + at + c * item, row_bytes, is_bf16, mask, v);
                    for (int k = 0; k < ROWS_AT_ONCE; k++) v[k] = _mm512_sub_ps(v[k], center);
                    acc_xmu = _mm512_add_ps(acc_xmu, dot_rows4(g, v)); /* Σ dy·(x − μ) */
                    acc = _mm512_add_ps(acc, sum_rows4(g));            /* Σ dy */
                } else {
                    for (ptrdiff_t k = 0; k < count_rows; k++) {
                        ptrdiff_t offset = at + k * row_bytes + c * (ptrdiff_t)item;
                        __m512 grad = load16_masked(dy + offset, is_bf16, mask); /* 0 outside */
                        __m512 centered = _mm512_sub_ps(load16_masked(x + offset, is_bf16, mask),
                                                        center);
                        acc = _mm512_add_ps(acc, grad);
                        acc_xmu = _mm512_fmadd_ps(grad, centered, acc_xmu);
                    }
                }
                _mm512_mask_storeu_ps(block_dy + c, mask, acc);
                _mm512_mask_storeu_ps(block_xmu + c, mask, acc_xmu);
            }
        }
        for (ptrdiff_t c = 0; c < channels; c++) {
            sum_dy[c] += block_dy[c];
            sum_dy_xmu[c] += block_xmu[c];
        }
    }
}

AVX512 static void moments_share(void *arg) {
    pass_t *pass = arg;
    ptrdiff_t first, last, channels = pass->channels;
    int thread = statistics_share(pass, &first, &last);
    double *mean = pass->part_a + thread * channels, *m2 = pass->part_b + thread * channels;
    if (pass->run)
        moments_ncl_avx512(pass->x, first, last, channels, pass->run, pass->is_bf16, mean, m2);
    else
        moments_mc_avx512(pass->x + first * channels * (ptrdiff_t)item_size(pass), last - first,
                          channels, pass->is_bf16, mean, m2, pass->work + 3 * thread * channels);
    pass->part_count[thread] = (double)((last - first) * (pass->run ? pass->run : 1));
}

AVX512 static void grad_sums_share(void *arg) {
    pass_t *pass = arg;
    ptrdiff_t first, last, channels = pass->channels;
    int thread = statistics_share(pass, &first, &last);
    double *sum_dy = pass->part_a + thread * channels;
    double *sum_dy_xmu = pass->part_b + thread * channels;
    const float *mean = pass->params[0];
    if (pass->run) {
        for (ptrdiff_t c = 0; c < channels; c++) sum_dy[c] = sum_dy_xmu[c] = 0.0;
        grad_sums_ncl_avx512(pass->dy, pass->x, first, last, channels, pass->run, pass->is_bf16,
                             mean, sum_dy, sum_dy_xmu);
    } else {
        ptrdiff_t offset = first * channels * (ptrdiff_t)item_size(pass);
        grad_sums_mc_avx512(pass->dy + offset, pass->x + offset, last - first, channels,
                            pass->is_bf16, mean, sum_dy, sum_dy_xmu,
                            pass->work + 3 * thread * channels);
    }
}

AVX512 static void affine_share(void *arg) {
    pass_t *pass = arg;
    ptrdiff_t start, end;
    output_share(pass, &start, &end);
    affine_avx512(pass->x, pass->out, start, end, pass->run, pass->channels, pass->is_bf16,
                  pass->params[0], pass->params[1], pass->params[2]);
}

AVX512 static void grad_share(void *arg) {
    pass_t *pass = arg;
    ptrdiff_t start, end;
    output_share(pass, &start, &end);
    grad_avx512(pass->dy, pass->x, pass->out, start, end, pass->run, pass->channels,
                pass->is_bf16, pass->params[0], pass->params[1], pass->params[2],
                pass->params[3]);
}

/* The whole training forward: statistics in memory order (float64 per channel, the threads'
 * shares merged by Chan's rule), y = (x − μ)·γr + β streamed, μ and r out (float32), the
 * running buffers moved (float32, in place, unbiased variance) when given. Returns 0, or −1
 * when out of memory. */
AVX512 static int train_forward_avx512(pass_t *pass, int threads, const float *weight,
                                       const float *bias, double eps, double momentum,
                                       float *running_mean, float *running_var, float *mean_out,
                                       float *invstd_out) {
    if (pass_scratch(pass, threads, 1) != 0) return -1;
    ptrdiff_t channels = pass->channels;
    run_team(moments_share, pass, threads);
    /* Merge the shares into thread 0's slots: mean, m2 (C,) each. */
    double *mean = pass->part_a, *m2 = pass->part_b, count = 0.0;
    for (int t = 0; t < pass->team; t++) {
        double part = pass->part_count[t];
        const double *mean_b = pass->part_a + t * channels, *m2_b = pass->part_b + t * channels;
        if (part == 0.0) continue; /* no rows (fewer rows than threads) */
        if (count == 0.0) {        /* the first share with rows: taken as it is */
            for (ptrdiff_t c = 0; c < channels && t > 0; c++) {
                mean[c] = mean_b[c];
                m2[c] = m2_b[c];
            }
        } else {
            double weight_b = part / (count + part);
            for (ptrdiff_t c = 0; c < channels; c++)
                chan_merge(mean + c, m2 + c, mean_b[c], m2_b[c], weight_b, count * weight_b);
        }
        count += part;
    }
    float *shift = (float *)pass->params[0], *scale = (float *)pass->params[1];
    float *offset = (float *)pass->params[2];
    for (ptrdiff_t c = 0; c < channels; c++) {
        double var = m2[c] / count;
        if (var < 0.0) var = 0.0; /* rounding of equal values (NaN stays NaN) */
        double r = 1.0 / sqrt(var + eps);
        shift[c] = (float)mean[c];
        scale[c] = (float)((weight ? (double)weight[c] : 1.0) * r);
        offset[c] = bias ? bias[c] : 0.0f;
        mean_out[c] = (float)mean[c];
        invstd_out[c] = (float)r;
        if (running_mean != NULL) {
            running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean[c]);
            running_var[c] = (float)((1.0 - momentum) * running_var[c] +
                                     momentum * var * (count / (count - 1.0)));
        }
    }
    run_team(affine_share, pass, threads);
    free_scratch(pass);
    return 0;
}

/* The whole backward: sums in memory order (the threads' shares added in float64), dx
 * streamed, dγ and dβ out (float32). Returns 0, or −1 when out of memory. */
AVX512 static int train_backward_avx512(pass_t *pass, int threads, const float *weight,
                                        const float *mean, const float *invstd,
                                        float *dweight_out, float *dbias_out) {
    if (pass_scratch(pass, threads, 1) != 0) return -1;
    ptrdiff_t channels = pass->channels;
    float *centers = (float *)pass->params[0], *gain = (float *)pass->params[1];
    float *mean_term = (float *)pass->params[2], *slope = (float *)pass->params[3];
    for (ptrdiff_t c = 0; c < channels; c++) centers[c] = mean[c];
    run_team(grad_sums_share, pass, threads);
    double *sum_dy = pass->part_a, *sum_dy_xmu = pass->part_b; /* thread 0's: the totals */
    for (int t = 1; t < pass->team; t++)
        for (ptrdiff_t c = 0; c < channels; c++) {
            sum_dy[c] += pass->part_a[t * channels + c];
            sum_dy_xmu[c] += pass->part_b[t * channels + c];
        }
    double count = (double)(pass->rows * (pass->run ? pass->run : 1)); /* M */
    for (ptrdiff_t c = 0; c < channels; c++) {
        double r = invstd[c];
        gain[c] = (float)((weight ? (double)weight[c] : 1.0) * r);
        mean_term[c] = (float)(sum_dy[c] / count);
        slope[c] = (float)(sum_dy_xmu[c] * r * r / count);
        dweight_out[c] = (float)(sum_dy_xmu[c] * r);
        dbias_out[c] = (float)sum_dy[c];
    }
    run_team(grad_share, pass, threads);
    free_scratch(pass);
    return 0;
}

/* Evaluation: y = (x − μ)·γ/sqrt(var + ε) + β from float32 per-channel values. Returns 0, or
 * −1 when out of memory. */
AVX512 static int inference_avx512(pass_t *pass, int threads, const float *weight,
                                   const float *bias, const float *running_mean,
                                   const float *running_var, double eps) {
    if (pass_scratch(pass, threads, 0) != 0) return -1;
    float *shift = (float *)pass->params[0], *scale = (float *)pass->params[1];
    float *offset = (float *)pass->params[2];
    for (ptrdiff_t c = 0; c < pass->channels; c++) {
        shift[c] = running_mean[c];
        scale[c] = (float)((weight ? (double)weight[c] : 1.0) / sqrt((double)running_var[c] + eps));
        offset[c] = bias ? bias[c] : 0.0f;
    }
    run_team(affine_share, pass, threads);
    free_scratch(pass);
    return 0;
}

static int cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

#else

static int cpu_supported(void) { return 0; }

#endif

static int supported;

static PyObject *require_support(void) {
    PyErr_SetString(PyExc_RuntimeError,
                    "batchnorm.kernels.cpu._cpu_stream: this CPU or build has no AVX-512 F/BW/VL");
    return NULL;
}

#define PTR(type, value) ((type)(uintptr_t)(value))

static PyObject *out_of_memory_or_none(int status) {
    if (status != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The pass over a dense (N, C, L) (run = L) or (M, C) (run = 0; rows = M) tensor. */
static pass_t pass_of(unsigned long long x, unsigned long long dy, unsigned long long out,
                      Py_ssize_t rows, Py_ssize_t channels, Py_ssize_t run, int is_bf16) {
    pass_t pass = {0};
    pass.x = PTR(const char *, x);
    pass.dy = PTR(const char *, dy);
    pass.out = PTR(char *, out);
    pass.rows = rows;
    pass.channels = channels;
    pass.run = run;
    pass.is_bf16 = is_bf16;
    pass.team = 1;
    return pass;
}

static int threads_or_error(int threads) {
    if (threads >= 1 && threads <= MAX_THREADS) return 0;
    PyErr_Format(PyExc_ValueError, "threads: expected 1 to %d, got %d", MAX_THREADS, threads);
    return -1;
}

static PyObject *train_forward(PyObject *self, PyObject *args) {
    unsigned long long x, y, weight, bias, running_mean, running_var, mean_out, invstd_out;
    Py_ssize_t rows, channels, run;
    int is_bf16, threads, status = 0;
    double eps, momentum;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnnpKKddKKKKi", &x, &y, &rows, &channels, &run, &is_bf16,
                          &weight, &bias, &eps, &momentum, &running_mean, &running_var,
                          &mean_out, &invstd_out, &threads))
        return NULL;
    if (!supported) return require_support();
    if (threads_or_error(threads) != 0) return NULL;
#if HAVE_AVX512_BUILD
    pass_t pass = pass_of(x, 0, y, rows, channels, run, is_bf16);
    Py_BEGIN_ALLOW_THREADS
    status = train_forward_avx512(&pass, threads, PTR(const float *, weight),
                                  PTR(const float *, bias), eps, momentum,
                                  PTR(float *, running_mean), PTR(float *, running_var),
                                  PTR(float *, mean_out), PTR(float *, invstd_out));
    Py_END_ALLOW_THREADS
#endif
    return out_of_memory_or_none(status);
}

static PyObject *train_backward(PyObject *self, PyObject *args) {
    unsigned long long dy, x, dx, weight, mean, invstd, dweight_out, dbias_out;
    Py_ssize_t rows, channels, run;
    int is_bf16, threads, status = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKnnnpKKKKKi", &dy, &x, &dx, &rows, &channels, &run, &is_bf16,
                          &weight, &mean, &invstd, &dweight_out, &dbias_out, &threads))
        return NULL;
    if (!supported) return require_support();
    if (threads_or_error(threads) != 0) return NULL;
#if HAVE_AVX512_BUILD
    pass_t pass = pass_of(x, dy, dx, rows, channels, run, is_bf16);
    Py_BEGIN_ALLOW_THREADS
    status = train_backward_avx512(&pass, threads, PTR(const float *, weight),
                                   PTR(const float *, mean), PTR(const float *, invstd),
                                   PTR(float *, dweight_out), PTR(float *, dbias_out));
    Py_END_ALLOW_THREADS
#endif
    return out_of_memory_or_none(status);
}

static PyObject *inference(PyObject *self, PyObject *args) {
    unsigned long long x, y, weight, bias, running_mean, running_var;
    Py_ssize_t rows, run, channels;
    int is_bf16, threads, status = 0;
    double eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnnpKKKKdi", &x, &y, &rows, &channels, &run, &is_bf16,
                          &weight, &bias, &running_mean, &running_var, &eps, &threads))
        return NULL;
    if (!supported) return require_support();
    if (threads_or_error(threads) != 0) return NULL;
#if HAVE_AVX512_BUILD
    pass_t pass = pass_of(x, 0, y, rows, channels, run, is_bf16);
    Py_BEGIN_ALLOW_THREADS
    status = inference_avx512(&pass, threads, PTR(const float *, weight), PTR(const float *, bias),
                              PTR(const float *, running_mean), PTR(const float *, running_var),
                              eps);
    Py_END_ALLOW_THREADS
#endif
    return out_of_memory_or_none(status);
}

/* use_openmp(library): takes the OpenMP runtime that `library` (a shared library already
 * loaded, torch's libtorch_cpu) is linked with: GOMP_parallel, omp_get_thread_num and
 * omp_get_num_threads as the library's dependencies resolve them. Returns whether they were
 * found; passes on more than one thread need them (else they run on the calling thread). */
static PyObject *use_openmp(PyObject *self, PyObject *args) {
    const char *library;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &library)) return NULL;
#if HAVE_OPENMP_LOOKUP
    void *handle = dlopen(library, RTLD_NOW | RTLD_NOLOAD); /* only if already loaded */
    if (handle != NULL) {
        gomp_parallel_t parallel = (gomp_parallel_t)dlsym(handle, "GOMP_parallel");
        omp_query_t thread_num = (omp_query_t)dlsym(handle, "omp_get_thread_num");
        omp_query_t team_size = (omp_query_t)dlsym(handle, "omp_get_num_threads");
        if (parallel != NULL && thread_num != NULL && team_size != NULL) {
            /* the handle stays open: the runtime is used from now on */
            omp_thread_num = thread_num;
            omp_team_size = team_size;
            gomp_parallel = parallel;
            Py_RETURN_TRUE;
        }
        dlclose(handle);
    }
#else
    (void)library;
#endif
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"train_forward", train_forward, METH_VARARGS,
     "train_forward(x, y, rows, channels, run, is_bf16, weight, bias, eps, momentum, "
     "running_mean, running_var, mean_out, invstd_out, threads): the whole training forward "
     "(float32 per-channel arrays, 0 for none; running buffers moved in place)."},
    {"train_backward", train_backward, METH_VARARGS,
     "train_backward(dy, x, dx, rows, channels, run, is_bf16, weight, mean, invstd, "
     "dweight_out, dbias_out, threads): the whole backward (float32 per-channel arrays)."},
    {"inference", inference, METH_VARARGS,
     "inference(x, y, rows, channels, run, is_bf16, weight, bias, running_mean, running_var, "
     "eps, threads): evaluation (float32 per-channel arrays, 0 for no weight/bias)."},
    {"use_openmp", use_openmp, METH_VARARGS,
     "use_openmp(library): run passes on several threads with the OpenMP runtime `library` "
     "(already loaded) is linked with; returns whether it was found."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpu_stream",
    "Output passes of the CPU batch-norm kernels with streaming stores (see cpu_stream.c).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cpu_stream(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    supported = cpu_supported();
    if (PyModule_AddObject(m, "SUPPORTED", PyBool_FromLong(supported)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
