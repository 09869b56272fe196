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
 * (chunks of 1024 values per vector lane), across them float64 (Chan, Golub & LeVeque, "Algorithms for
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
 * batchnorm.kernels.cpu.cpu_numba does. Arithmetic is float32 (fused multiply-adds), the
 * per-channel combinations float64.
 *
 * Instruction sets: the vector code (cpu_stream_simd.h) is written once for W float32 lanes and
 * compiled twice, for AVX-512 F/BW/VL (W = 16) and for AVX2 + FMA (W = 8); the module picks the
 * widest one the CPU has at import (ISAS lists those it has, best first; use_isa picks another
 * of them, for tests and comparisons). Where neither is there, and on other architectures,
 * SUPPORTED is False and the passes raise RuntimeError.
 * Pointers come as integers from the caller (batchnorm.backends.cpu_backend), which checks
 * dtypes, sizes and density; the functions release the GIL.
 *
 * Why this file is long: one C extension is one translation unit, and it holds each ISA's
 * primitives (loads, bfloat16 rounding, masks: 70-100 lines an ISA), the drivers written once
 * over the kernels_t table (team split, Chan merge of the shares, running update), the OpenMP
 * lookup that lets the passes join torch's thread team, and the Python bindings with their
 * argument checks; the vector code itself is in cpu_stream_simd.h.
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

#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_BUILD 1
#include <immintrin.h>
#else
#define HAVE_X86_BUILD 0
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

/* Values before the first output address aligned to 64 bytes, at most `end`. */
static inline ptrdiff_t aligned_start(const char *out, ptrdiff_t start, ptrdiff_t end, size_t item) {
    ptrdiff_t i = start;
    while (i < end && ((uintptr_t)(out + i * item) & 63u) != 0) i++;
    return i;
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
 * added in float64. A chunk is 1024 values per lane whatever the vector width W (defined where
 * cpu_stream_simd.h is included), so that every ISA's float32 lane sums are as long: at W = 8 a
 * chunk of 16384 values would put 2048 values of ~1e7 into a lane, whose rounding (biased when
 * the values sit at one offset from the grid of the partial sum) moved the variance of
 * test_large_offsets_keep_the_variance_precise by 4e-5. */
#define CHUNK_VALUES (W * 1024)

/* Four runs at once (consecutive channels of one sample, `stride` bytes apart): the same sums
 * as run_sum / run_sum_squares / run_grad_sums, one accumulator per run, so that the four
 * dependency chains of short runs overlap. */
#define GROUP 4

/* Rows per block of an (M, C) matrix: about 256 KiB, at most 1024 rows (float32 sums). */
static ptrdiff_t block_rows(ptrdiff_t channels, size_t item) {
    ptrdiff_t rows = (ptrdiff_t)((256 * 1024) / ((size_t)channels * item));
    return rows < 1 ? 1 : rows > 1024 ? 1024 : rows;
}

/* Rows of an (M, C) matrix added into per-channel float32 accumulators (in L1) four at a time:
 * each accumulator is loaded and stored once per four rows, so the chains through memory (a
 * store, then the next row's load of it) are a quarter as long. */
#define ROWS_AT_ONCE 4


/* One instruction set's kernels: the bodies of the four phases a pass runs on its team. */
typedef struct {
    const char *name;
    void (*moments_share)(void *);   /* per-thread (mean, M2) of the input */
    void (*grad_sums_share)(void *); /* per-thread Σ dy and Σ dy·(x − μ) */
    void (*affine_share)(void *);    /* y = (x − shift)·scale + offset, streamed */
    void (*grad_share)(void *);      /* dx, streamed */
} kernels_t;

#if HAVE_X86_BUILD

/* ---- AVX-512 F/BW/VL: 16 lanes, lane masks in k registers ---- */
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX512_TARGET static inline __m512 load_avx512(const char *address, int is_bf16) {
    if (!is_bf16) return _mm512_loadu_ps((const float *)address);
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)address));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

AVX512_TARGET static inline __m512 load_masked_avx512(const char *address, int is_bf16,
                                                      __mmask16 mask) {
    if (!is_bf16) return _mm512_maskz_loadu_ps(mask, (const float *)address);
    __m256i bits = _mm256_maskz_loadu_epi16(mask, (const __m256i *)address);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/* 16 float32 → 16 bfloat16 bit patterns, as store_one rounds them. */
AVX512_TARGET static inline __m256i to_bf16_avx512(__m512 values) {
    __m512i bits = _mm512_castps_si512(values);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
    rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(rounded);
}

AVX512_TARGET static inline void stream_avx512(char *address, __m512 values, int is_bf16) {
    if (!is_bf16)
        _mm512_stream_ps((float *)address, values);
    else
        _mm256_stream_si256((__m256i *)address, to_bf16_avx512(values));
}

static inline __mmask16 lanes_below_avx512(ptrdiff_t count) {
    return count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1u);
}

AVX512_TARGET static inline __m512 blend_from_avx512(__m512 a, __m512 b, int first) {
    return _mm512_mask_blend_ps((__mmask16)(0xFFFFu << first), a, b);
}

#define TARGET AVX512_TARGET
#define W 16
#define FN(name) name##_avx512
#define ISA_NAME "avx512"
#define vec __m512
#define vmask __mmask16
#define V_ALL ((__mmask16)0xFFFF)
#define v_load load_avx512
#define v_load_masked load_masked_avx512
#define v_stream stream_avx512
#define v_loadu _mm512_loadu_ps
#define v_maskz_loadu _mm512_maskz_loadu_ps
#define v_mask_storeu _mm512_mask_storeu_ps
#define v_lanes_below lanes_below_avx512
#define v_set1 _mm512_set1_ps
#define v_zero _mm512_setzero_ps
#define v_add _mm512_add_ps
#define v_sub _mm512_sub_ps
#define v_mul _mm512_mul_ps
#define v_fmadd _mm512_fmadd_ps
#define v_fnmadd _mm512_fnmadd_ps
#define v_maskz_sub _mm512_maskz_sub_ps
#define v_blend_from blend_from_avx512
#define v_reduce _mm512_reduce_add_ps
#define v_fence _mm_sfence
#include "cpu_stream_simd.h"

/* ---- AVX2 + FMA: 8 lanes; a lane mask is a count of leading lanes (0..8) ---- */
#define AVX2_TARGET __attribute__((target("avx2,fma")))

AVX2_TARGET static inline __m256 load_avx2(const char *address, int is_bf16) {
    if (!is_bf16) return _mm256_loadu_ps((const float *)address);
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)address));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* All-ones in the first `count` of 8 int32 lanes. */
AVX2_TARGET static inline __m256i lane_mask_avx2(int count) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

AVX2_TARGET static inline __m256 maskz_loadu_avx2(int count, const float *address) {
    if (count >= 8) return _mm256_loadu_ps(address);
    return _mm256_maskload_ps(address, lane_mask_avx2(count)); /* lanes outside: not read, 0 */
}

AVX2_TARGET static inline void mask_storeu_avx2(float *address, int count, __m256 values) {
    if (count >= 8)
        _mm256_storeu_ps(address, values);
    else
        _mm256_maskstore_ps(address, lane_mask_avx2(count), values);
}

AVX2_TARGET static inline __m256 load_masked_avx2(const char *address, int is_bf16, int count) {
    if (count >= 8) return load_avx2(address, is_bf16);
    if (!is_bf16) return maskz_loadu_avx2(count, (const float *)address);
    uint16_t tail[8] = {0}; /* AVX2 has no 16-bit masked load: the few values copied */
    memcpy(tail, address, (size_t)count * sizeof(uint16_t));
    return load_avx2((const char *)tail, 1);
}

/* 8 float32 → 8 bfloat16 bit patterns, as store_one rounds them. */
AVX2_TARGET static inline __m128i to_bf16_avx2(__m256 values) {
    __m256i bits = _mm256_castps_si256(values);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    /* |bits| > inf as signed int32: the sign is masked off, so the signed compare is exact */
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7FFFFFFF)),
                                     _mm256_set1_epi32(0x7F800000));
    rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
    /* pack within 128-bit halves (values ≤ 0xFFFF: no saturation), then the halves' low
     * 64 bits together: [r0..r3 | r4..r7] */
    __m256i packed = _mm256_packus_epi32(rounded, rounded);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

AVX2_TARGET static inline void stream_avx2(char *address, __m256 values, int is_bf16) {
    if (!is_bf16)
        _mm256_stream_ps((float *)address, values);
    else
        _mm_stream_si128((__m128i *)address, to_bf16_avx2(values));
}

static inline int lanes_below_avx2(ptrdiff_t count) { return count >= 8 ? 8 : (int)count; }

AVX2_TARGET static inline __m256 maskz_sub_avx2(int count, __m256 a, __m256 b) {
    __m256 d = _mm256_sub_ps(a, b);
    return count >= 8 ? d : _mm256_and_ps(d, _mm256_castsi256_ps(lane_mask_avx2(count)));
}

AVX2_TARGET static inline __m256 blend_from_avx2(__m256 a, __m256 b, int first) {
    return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(lane_mask_avx2(first)));
}

AVX2_TARGET static inline float reduce_avx2(__m256 values) {
    __m128 sum = _mm_add_ps(_mm256_castps256_ps128(values), _mm256_extractf128_ps(values, 1));
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

#define TARGET AVX2_TARGET
#define W 8
#define FN(name) name##_avx2
#define ISA_NAME "avx2"
#define vec __m256
#define vmask int
#define V_ALL 8
#define v_load load_avx2
#define v_load_masked load_masked_avx2
#define v_stream stream_avx2
#define v_loadu _mm256_loadu_ps
#define v_maskz_loadu maskz_loadu_avx2
#define v_mask_storeu mask_storeu_avx2
#define v_lanes_below lanes_below_avx2
#define v_set1 _mm256_set1_ps
#define v_zero _mm256_setzero_ps
#define v_add _mm256_add_ps
#define v_sub _mm256_sub_ps
#define v_mul _mm256_mul_ps
#define v_fmadd _mm256_fmadd_ps
#define v_fnmadd _mm256_fnmadd_ps
#define v_maskz_sub maskz_sub_avx2
#define v_blend_from blend_from_avx2
#define v_reduce reduce_avx2
#define v_fence _mm_sfence
#include "cpu_stream_simd.h"

#endif /* HAVE_X86_BUILD */

/* The whole training forward: statistics in memory order (float64 per channel, the threads'
 * shares merged by Chan's rule), y = (x − μ)·γr + β streamed, μ and r out (float32), the
 * running buffers moved (float32, in place, unbiased variance) when given. Returns 0, or −1
 * when out of memory. */
static int train_forward_pass(const kernels_t *kernels, pass_t *pass, int threads, const float *weight,
                                       const float *bias, double eps, double momentum,
                                       float *running_mean, float *running_var, float *mean_out,
                                       float *invstd_out) {
    if (pass_scratch(pass, threads, 1) != 0) return -1;
    ptrdiff_t channels = pass->channels;
    run_team(kernels->moments_share, pass, threads);
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
    run_team(kernels->affine_share, pass, threads);
    free_scratch(pass);
    return 0;
}

/* The whole backward: sums in memory order (the threads' shares added in float64), dx
 * streamed, dγ and dβ out (float32). Returns 0, or −1 when out of memory. */
static int train_backward_pass(const kernels_t *kernels, pass_t *pass, int threads, const float *weight,
                                        const float *mean, const float *invstd,
                                        float *dweight_out, float *dbias_out) {
    if (pass_scratch(pass, threads, 1) != 0) return -1;
    ptrdiff_t channels = pass->channels;
    float *centers = (float *)pass->params[0], *gain = (float *)pass->params[1];
    float *mean_term = (float *)pass->params[2], *slope = (float *)pass->params[3];
    for (ptrdiff_t c = 0; c < channels; c++) centers[c] = mean[c];
    run_team(kernels->grad_sums_share, pass, threads);
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
    run_team(kernels->grad_share, pass, threads);
    free_scratch(pass);
    return 0;
}

/* Evaluation: y = (x − μ)·γ/sqrt(var + ε) + β from float32 per-channel values. Returns 0, or
 * −1 when out of memory. */
static int inference_pass(const kernels_t *kernels, pass_t *pass, int threads, const float *weight,
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
    run_team(kernels->affine_share, pass, threads);
    free_scratch(pass);
    return 0;
}


/* The instruction sets this CPU and build run, widest first, and the one the passes use. */
static const kernels_t *available[2];
static int available_count;
static const kernels_t *active;

static void find_isas(void) {
#if HAVE_X86_BUILD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        available[available_count++] = &kernels_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        available[available_count++] = &kernels_avx2;
#endif
    active = available_count ? available[0] : NULL;
}

static PyObject *require_support(void) {
    PyErr_SetString(PyExc_RuntimeError,
                    "batchnorm.kernels.cpu._cpu_stream: this CPU or build has neither AVX-512 "
                    "F/BW/VL nor AVX2 with FMA");
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
    if (active == NULL) return require_support();
    if (threads_or_error(threads) != 0) return NULL;
    pass_t pass = pass_of(x, 0, y, rows, channels, run, is_bf16);
    Py_BEGIN_ALLOW_THREADS
    status = train_forward_pass(active, &pass, threads, PTR(const float *, weight),
                                  PTR(const float *, bias), eps, momentum,
                                  PTR(float *, running_mean), PTR(float *, running_var),
                                  PTR(float *, mean_out), PTR(float *, invstd_out));
    Py_END_ALLOW_THREADS
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
    if (active == NULL) return require_support();
    if (threads_or_error(threads) != 0) return NULL;
    pass_t pass = pass_of(x, dy, dx, rows, channels, run, is_bf16);
    Py_BEGIN_ALLOW_THREADS
    status = train_backward_pass(active, &pass, threads, PTR(const float *, weight),
                                   PTR(const float *, mean), PTR(const float *, invstd),
                                   PTR(float *, dweight_out), PTR(float *, dbias_out));
    Py_END_ALLOW_THREADS
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
    if (active == NULL) return require_support();
    if (threads_or_error(threads) != 0) return NULL;
    pass_t pass = pass_of(x, 0, y, rows, channels, run, is_bf16);
    Py_BEGIN_ALLOW_THREADS
    status = inference_pass(active, &pass, threads, PTR(const float *, weight), PTR(const float *, bias),
                              PTR(const float *, running_mean), PTR(const float *, running_var),
                              eps);
    Py_END_ALLOW_THREADS
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

/* isa(): the name of the instruction set the passes use, or None. */
static PyObject *isa(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    if (active == NULL) Py_RETURN_NONE;
    return PyUnicode_FromString(active->name);
}

/* use_isa(name): the passes use instruction set `name`, one of ISAS. */
static PyObject *use_isa(PyObject *self, PyObject *args) {
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    for (int k = 0; k < available_count; k++)
        if (strcmp(available[k]->name, name) == 0) {
            active = available[k];
            Py_RETURN_NONE;
        }
    PyObject *names = PyObject_GetAttrString(self, "ISAS");
    if (names == NULL) return NULL;
    PyErr_Format(PyExc_ValueError, "isa: expected one of %R (this CPU's), got '%s'", names, name);
    Py_DECREF(names);
    return NULL;
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
    {"isa", isa, METH_NOARGS,
     "isa(): the instruction set the passes use (\"avx512\" or \"avx2\"), None without one."},
    {"use_isa", use_isa, METH_VARARGS,
     "use_isa(name): run the passes with instruction set `name`, one of ISAS (this CPU's)."},
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
    find_isas();
    PyObject *names = PyTuple_New(available_count);
    if (names == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    for (int k = 0; k < available_count; k++) {
        PyObject *name = PyUnicode_FromString(available[k]->name);
        if (name == NULL) {
            Py_DECREF(names);
            Py_DECREF(m);
            return NULL;
        }
        PyTuple_SET_ITEM(names, k, name);
    }
    if (PyModule_AddObject(m, "ISAS", names) < 0) {
        Py_DECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "SUPPORTED", PyBool_FromLong(available_count > 0)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
