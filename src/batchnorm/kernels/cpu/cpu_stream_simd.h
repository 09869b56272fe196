/*
 * cpu_stream_simd.h: the vector code of cpu_stream.c, written once for a vector of W float32
 * lanes and compiled once per instruction set (cpu_stream.c includes it twice: AVX-512 with
 * W = 16, AVX2 + FMA with W = 8). Not a header of its own: it uses cpu_stream.c's types
 * (pass_t, walk_t, kernels_t) and helpers, and the including file defines, for one ISA:
 *
 *   TARGET          the function attribute that enables the ISA
 *   W               float32 lanes per vector
 *   FN(name)        name with the ISA's suffix (name_avx512, name_avx2)
 *   ISA_NAME        the ISA's name as the module reports it ("avx512", "avx2")
 *   vec, vmask      the vector type and the type of a lane mask (a prefix of lanes)
 *   V_ALL           the mask of all W lanes
 *   v_load(p, bf16), v_load_masked(p, bf16, mask), v_stream(p, v, bf16)
 *                   W elements (float32, or bfloat16 widened exactly) from p; lanes outside the
 *                   mask zero (and not read); a streaming store of W elements at an address
 *                   aligned to W elements (bfloat16 rounded to nearest even, NaN 0x7FC0)
 *   v_loadu(f), v_maskz_loadu(mask, f), v_mask_storeu(f, mask, v)   float32 arrays
 *   v_lanes_below(count)        the mask of the first min(count, W) lanes
 *   v_set1, v_zero, v_add, v_sub, v_mul, v_fmadd(a, b, c) = a·b + c, v_fnmadd(a, b, c) = c − a·b,
 *   v_maskz_sub(mask, a, b), v_blend_from(a, b, k) (lanes k.. from b), v_reduce (Σ lanes),
 *   v_fence()       (after streaming stores)
 *
 * At its end it defines FN(kernels), the ISA's kernels_t, and undefines all of the above.
 * The order of float32 additions differs between the two ISAs (W lanes per accumulator, then a
 * reduction over them), so the two round differently; each is within the tolerances of the
 * float32 sums described in cpu_stream.c.
 *
 * Why this file is long: it is every vector loop of the three passes (statistics with the
 * corrected second pass, output, gradient sums and dx), each in both layouts ((N, C, L) runs and
 * (M, C) rows) and with its masked edges; written once for both ISAs, it is half of what two
 * copies would be.
 */

/* The per-lane values of `count` per-channel arrays for the W values from flat index i, into
 * `lanes`; moves the walk W values on. Returns 1 when the next vector lies in the same run
 * (its parameters are these broadcasts, and `lanes` need not be reloaded: `keep`). */
TARGET static inline int FN(vector_params)(walk_t *walk, ptrdiff_t i, int count,
                                       const float *const *params, vec *lanes, int keep) {
    ptrdiff_t channels = walk->channels;
    if (walk->run) {
        if (i + W <= walk->run_end) { /* one channel */
            if (!keep)
                for (int p = 0; p < count; p++) lanes[p] = v_set1(params[p][walk->channel]);
            if (i + W < walk->run_end) return 1;
            walk->run_end += walk->run;
            walk->channel = walk->channel + 1 == channels ? 0 : walk->channel + 1;
            return 0;
        }
        if (walk->run >= W) { /* two channels: lanes from run_end on take the next one */
            ptrdiff_t next = walk->channel + 1 == channels ? 0 : walk->channel + 1;
            int first_later = (int)(walk->run_end - i); /* lanes from here on: channel `next` */
            for (int p = 0; p < count; p++)
                lanes[p] = v_blend_from(v_set1(params[p][walk->channel]), v_set1(params[p][next]),
                                        first_later);
            walk->run_end += walk->run;
            walk->channel = next;
            return 0;
        }
    } else if (walk->channel + W <= channels) { /* (M, C): W consecutive channels */
        for (int p = 0; p < count; p++) lanes[p] = v_loadu(params[p] + walk->channel);
        walk->channel += W;
        if (walk->channel == channels) walk->channel = 0;
        return 0;
    }
    /* Short runs (L < W) or a wrap past channel C − 1: lane by lane. */
    float gathered[MAX_PARAMS][W];
    for (int lane = 0; lane < W; lane++) {
        if (walk->run && i + lane == walk->run_end) {
            walk->run_end += walk->run;
            walk->channel = walk->channel + 1 == channels ? 0 : walk->channel + 1;
        }
        for (int p = 0; p < count; p++) gathered[p][lane] = params[p][walk->channel];
        if (!walk->run) walk->channel = walk->channel + 1 == channels ? 0 : walk->channel + 1;
    }
    if (walk->run && i + W == walk->run_end) {
        walk->run_end += walk->run;
        walk->channel = walk->channel + 1 == channels ? 0 : walk->channel + 1;
    }
    for (int p = 0; p < count; p++) lanes[p] = v_loadu(gathered[p]);
    return 0;
}

/* y = (x − lanes[0])·lanes[1] + lanes[2] for the vectors from i that end before `stop`, with
 * constant lanes (within one run: no walk); returns where it stopped. The dtype is a constant in
 * each loop, so that neither loop tests it per vector. */
TARGET static inline ptrdiff_t FN(affine_within)(const char *x, char *y, ptrdiff_t i,
                                                 ptrdiff_t stop, int is_bf16, const vec *lanes) {
#define AFFINE_LOOP(bf16, item)                                                                 \
    for (; i + W < stop; i += W)                                                                \
        v_stream(y + i * (item), v_fmadd(v_sub(v_load(x + i * (item), bf16), lanes[0]), lanes[1], \
                                         lanes[2]),                                             \
                 bf16)
    if (is_bf16)
        AFFINE_LOOP(1, 2);
    else
        AFFINE_LOOP(0, 4);
#undef AFFINE_LOOP
    return i;
}

TARGET static void FN(affine)(const char *x, char *y, ptrdiff_t start, ptrdiff_t end,
                                 ptrdiff_t run, ptrdiff_t channels, int is_bf16,
                                 const float *shift, const float *scale, const float *offset) {
    const float *params[3] = {shift, scale, offset};
    size_t item = is_bf16 ? 2 : 4;
    ptrdiff_t body = aligned_start(y, start, end, item), i;
    for (i = start; i < body; i++) {
        ptrdiff_t c = channel_of(i, run, channels);
        store_one(y, is_bf16, i, (load_one(x, is_bf16, i) - shift[c]) * scale[c] + offset[c]);
    }
    vec lanes[3];
    walk_t walk = walk_from(i, run, channels);
    int keep = 0;
    while (i + W <= end) {
        keep = FN(vector_params)(&walk, i, 3, params, lanes, keep);
        vec centered = v_sub(v_load(x + i * item, is_bf16), lanes[0]); /* x − μ */
        v_stream(y + i * item, v_fmadd(centered, lanes[1], lanes[2]), is_bf16);
        i += W;
        /* The next vector is in this run too: those before the run's last need no walk. */
        if (keep) i = FN(affine_within)(x, y, i, walk.run_end < end ? walk.run_end : end, is_bf16, lanes);
    }
    for (; i < end; i++) {
        ptrdiff_t c = channel_of(i, run, channels);
        store_one(y, is_bf16, i, (load_one(x, is_bf16, i) - shift[c]) * scale[c] + offset[c]);
    }
    v_fence(); /* streaming stores are visible to other threads once the call returns */
}

/* dx = lanes[1]·((dy − lanes[2]) − (x − lanes[0])·lanes[3]) for the vectors from i that end
 * before `stop`, with constant lanes (as affine_within). */
TARGET static inline ptrdiff_t FN(grad_within)(const char *dy, const char *x, char *dx, ptrdiff_t i,
                                               ptrdiff_t stop, int is_bf16, const vec *lanes) {
#define GRAD_LOOP(bf16, item)                                                                   \
    for (; i + W < stop; i += W) {                                                              \
        vec centered = v_sub(v_load(x + i * (item), bf16), lanes[0]);                           \
        vec shifted = v_sub(v_load(dy + i * (item), bf16), lanes[2]);                           \
        v_stream(dx + i * (item), v_mul(lanes[1], v_fnmadd(centered, lanes[3], shifted)), bf16); \
    }
    if (is_bf16)
        GRAD_LOOP(1, 2)
    else
        GRAD_LOOP(0, 4)
#undef GRAD_LOOP
    return i;
}

TARGET static void FN(grad)(const char *dy, const char *x, char *dx, ptrdiff_t start,
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
    vec lanes[4];
    walk_t walk = walk_from(i, run, channels);
    int keep = 0;
    while (i + W <= end) {
        keep = FN(vector_params)(&walk, i, 4, params, lanes, keep);
        vec centered = v_sub(v_load(x + i * item, is_bf16), lanes[0]); /* x − μ */
        vec shifted = v_sub(v_load(dy + i * item, is_bf16), lanes[2]); /* dy − dβ/M */
        vec inner = v_fnmadd(centered, lanes[3], shifted);
        v_stream(dx + i * item, v_mul(lanes[1], inner), is_bf16);
        i += W;
        if (keep) /* as in affine */
            i = FN(grad_within)(dy, x, dx, i, walk.run_end < end ? walk.run_end : end, is_bf16,
                                lanes);
    }
    for (; i < end; i++) GRAD_ONE(i);
#undef GRAD_ONE
    v_fence();
}

/* Σ v over a run of n values. */
TARGET static double FN(run_sum)(const char *row, ptrdiff_t n, int is_bf16) {
    size_t item = is_bf16 ? 2 : 4;
    double total = 0.0;
    ptrdiff_t i = 0;
    do {
        vec a0 = v_zero(), a1 = a0, a2 = a0, a3 = a0;
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + 4 * W <= stop; i += 4 * W) {
            a0 = v_add(a0, v_load(row + i * item, is_bf16));
            a1 = v_add(a1, v_load(row + (i + W) * item, is_bf16));
            a2 = v_add(a2, v_load(row + (i + 2 * W) * item, is_bf16));
            a3 = v_add(a3, v_load(row + (i + 3 * W) * item, is_bf16));
        }
        for (; i + W <= stop; i += W) a0 = v_add(a0, v_load(row + i * item, is_bf16));
        if (i < stop) { /* the last few values, as one masked vector */
            a1 = v_add(a1, v_load_masked(row + i * item, is_bf16, v_lanes_below(stop - i)));
            i = stop;
        }
        total += v_reduce(v_add(v_add(a0, a1), v_add(a2, a3)));
    } while (i < n);
    return total;
}

/* The corrected second pass over a run of n values (Chan, Golub & LeVeque 1983): with
 * d = v − center, M2 = Σ d² − (Σ d)²/n about the run's mean center + Σ d / n, which *mean_out
 * receives. The center (the first pass's float32 mean) may be off by the first pass's rounding;
 * Σ d corrects that, so large offsets (|μ| ≫ σ) keep the variance's precision. */
TARGET static double FN(run_sum_squares)(const char *row, ptrdiff_t n, int is_bf16, float center,
                                     double *mean_out) {
    size_t item = is_bf16 ? 2 : 4;
    vec shift = v_set1(center);
    double total = 0.0, total_d = 0.0;
    ptrdiff_t i = 0;
#define SQUARE_INTO(acc, acc_d, at)                                            \
    do {                                                                       \
        vec d = v_sub(v_load(row + (at) * item, is_bf16), shift);   \
        acc = v_fmadd(d, d, acc);                                      \
        acc_d = v_add(acc_d, d);                                       \
    } while (0)
    do {
        vec a0 = v_zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0;
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + 4 * W <= stop; i += 4 * W) {
            SQUARE_INTO(a0, b0, i);
            SQUARE_INTO(a1, b1, i + W);
            SQUARE_INTO(a2, b0, i + 2 * W);
            SQUARE_INTO(a3, b1, i + 3 * W);
        }
        for (; i + W <= stop; i += W) SQUARE_INTO(a0, b0, i);
        if (i < stop) {
            vmask mask = v_lanes_below(stop - i);
            vec d = v_maskz_sub(mask, v_load_masked(row + i * item, is_bf16, mask), shift);
            a1 = v_fmadd(d, d, a1);
            b1 = v_add(b1, d);
            i = stop;
        }
        total += v_reduce(v_add(v_add(a0, a1), v_add(a2, a3)));
        total_d += v_reduce(v_add(b0, b1));
    } while (i < n);
#undef SQUARE_INTO
    double shift_mean = n > 0 ? total_d / (double)n : 0.0;
    *mean_out = corrected_mean(center, shift_mean);
    return total - total_d * shift_mean;
}

/* (Σ dy, Σ dy·(x − center)) over runs of n values, added to *sum_dy, *sum_dy_xmu. */
TARGET static void FN(run_grad_sums)(const char *dy, const char *x, ptrdiff_t n, int is_bf16,
                                 float center, double *sum_dy, double *sum_dy_xmu) {
    size_t item = is_bf16 ? 2 : 4;
    vec shift = v_set1(center);
    double total = 0.0, total_xmu = 0.0;
    ptrdiff_t i = 0;
    /* dy is zero in lanes outside `mask`, so those lanes add nothing to either sum. */
#define GRAD_INTO(acc, acc_xmu, at, mask)                                                        \
    do {                                                                                         \
        vec g = v_load_masked(dy + (at) * item, is_bf16, mask);                               \
        acc = v_add(acc, g);                                                             \
        vec centered = v_sub(v_load_masked(x + (at) * item, is_bf16, mask), shift);  \
        acc_xmu = v_fmadd(g, centered, acc_xmu);                                         \
    } while (0)
    do {
        vec a0 = v_zero(), a1 = a0, b0 = a0, b1 = a0;
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + 2 * W <= stop; i += 2 * W) {
            GRAD_INTO(a0, b0, i, V_ALL);
            GRAD_INTO(a1, b1, i + W, V_ALL);
        }
        for (; i + W <= stop; i += W) GRAD_INTO(a0, b0, i, V_ALL);
        if (i < stop) {
            GRAD_INTO(a1, b1, i, v_lanes_below(stop - i));
            i = stop;
        }
        total += v_reduce(v_add(a0, a1));
        total_xmu += v_reduce(v_add(b0, b1));
    } while (i < n);
#undef GRAD_INTO
    *sum_dy += total;
    *sum_dy_xmu += total_xmu;
}


TARGET static void FN(group_sums)(const char *first, ptrdiff_t stride, ptrdiff_t n, int is_bf16,
                              double *out) {
    size_t item = is_bf16 ? 2 : 4;
    for (int g = 0; g < GROUP; g++) out[g] = 0.0;
    ptrdiff_t i = 0;
    do {
        vec acc[GROUP];
        for (int g = 0; g < GROUP; g++) acc[g] = v_zero();
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + W <= stop; i += W)
            for (int g = 0; g < GROUP; g++)
                acc[g] = v_add(acc[g], v_load(first + g * stride + i * item, is_bf16));
        if (i < stop) {
            vmask mask = v_lanes_below(stop - i);
            for (int g = 0; g < GROUP; g++)
                acc[g] = v_add(acc[g], v_load_masked(first + g * stride + i * item, is_bf16, mask));
            i = stop;
        }
        for (int g = 0; g < GROUP; g++) out[g] += v_reduce(acc[g]);
    } while (i < n);
}

/* run_sum_squares for GROUP runs: M2 about each run's corrected mean, which means[] receives. */
TARGET static void FN(group_sum_squares)(const char *first, ptrdiff_t stride, ptrdiff_t n, int is_bf16,
                                     const float *centers, double *out, double *means) {
    size_t item = is_bf16 ? 2 : 4;
    vec shift[GROUP];
    double total_d[GROUP];
    for (int g = 0; g < GROUP; g++) {
        shift[g] = v_set1(centers[g]);
        out[g] = total_d[g] = 0.0;
    }
    ptrdiff_t i = 0;
    do {
        vec acc[GROUP], acc_d[GROUP];
        for (int g = 0; g < GROUP; g++) acc[g] = acc_d[g] = v_zero();
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        for (; i + W <= stop; i += W)
            for (int g = 0; g < GROUP; g++) {
                vec d = v_sub(v_load(first + g * stride + i * item, is_bf16), shift[g]);
                acc[g] = v_fmadd(d, d, acc[g]);
                acc_d[g] = v_add(acc_d[g], d);
            }
        if (i < stop) {
            vmask mask = v_lanes_below(stop - i);
            for (int g = 0; g < GROUP; g++) {
                vec v = v_load_masked(first + g * stride + i * item, is_bf16, mask);
                vec d = v_maskz_sub(mask, v, shift[g]);
                acc[g] = v_fmadd(d, d, acc[g]);
                acc_d[g] = v_add(acc_d[g], d);
            }
            i = stop;
        }
        for (int g = 0; g < GROUP; g++) {
            out[g] += v_reduce(acc[g]);
            total_d[g] += v_reduce(acc_d[g]);
        }
    } while (i < n);
    for (int g = 0; g < GROUP; g++) {
        double shift_mean = n > 0 ? total_d[g] / (double)n : 0.0;
        means[g] = corrected_mean(centers[g], shift_mean);
        out[g] -= total_d[g] * shift_mean;
    }
}

TARGET static void FN(group_grad_sums)(const char *dy, const char *x, ptrdiff_t stride, ptrdiff_t n,
                                   int is_bf16, const float *centers, double *sum_dy,
                                   double *sum_dy_xmu) {
    size_t item = is_bf16 ? 2 : 4;
    vec shift[GROUP];
    for (int g = 0; g < GROUP; g++) shift[g] = v_set1(centers[g]);
    ptrdiff_t i = 0;
    do {
        vec acc[GROUP], acc_xmu[GROUP];
        for (int g = 0; g < GROUP; g++) acc[g] = acc_xmu[g] = v_zero();
        ptrdiff_t stop = i + CHUNK_VALUES < n ? i + CHUNK_VALUES : n;
        while (i < stop) {
            vmask mask = v_lanes_below(stop - i);
            for (int g = 0; g < GROUP; g++) {
                ptrdiff_t at = g * stride + i * (ptrdiff_t)item;
                vec grad = v_load_masked(dy + at, is_bf16, mask); /* zero outside mask */
                acc[g] = v_add(acc[g], grad);
                vec centered = v_sub(v_load_masked(x + at, is_bf16, mask), shift[g]);
                acc_xmu[g] = v_fmadd(grad, centered, acc_xmu[g]);
            }
            i += W;
        }
        i = stop;
        for (int g = 0; g < GROUP; g++) {
            sum_dy[g] += v_reduce(acc[g]);
            sum_dy_xmu[g] += v_reduce(acc_xmu[g]);
        }
    } while (i < n);
}

/* Samples [n0, n1) of x (N, C, L) in memory order: per channel, the mean and M2 = Σ (x − mean)²
 * of those samples' values. Each run of L values is summed twice while it is in L1 (its mean,
 * then M2 about it) and merged into the channel's running (mean, M2) by Chan's rule. */
TARGET static void FN(moments_ncl)(const char *x, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t channels,
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
                FN(group_sums)(sample + c * stride, stride, run, is_bf16, run_mean);
                for (int g = 0; g < GROUP; g++) centers[g] = (float)(run_mean[g] * inverse_run);
                FN(group_sum_squares)(sample + c * stride, stride, run, is_bf16, centers, run_m2,
                                  run_mean);
            } else {
                float center = (float)(FN(run_sum)(sample + c * stride, run, is_bf16) * inverse_run);
                run_m2[0] = FN(run_sum_squares)(sample + c * stride, run, is_bf16, center, run_mean);
            }
            for (int g = 0; g < count; g++, c++)
                chan_merge(mean + c, m2 + c, run_mean[g], run_m2[g], weight, between);
        }
    }
}

/* Samples [n0, n1) of dy and x (N, C, L): per channel, Σ dy and Σ dy·(x − mean) added to
 * sum_dy, sum_dy_xmu (float64). */
TARGET static void FN(grad_sums_ncl)(const char *dy, const char *x, ptrdiff_t n0, ptrdiff_t n1,
                                        ptrdiff_t channels, ptrdiff_t run, int is_bf16,
                                        const float *mean, double *sum_dy, double *sum_dy_xmu) {
    ptrdiff_t stride = run * (is_bf16 ? 2 : 4); /* bytes from one channel's run to the next */
    for (ptrdiff_t n = n0; n < n1; n++) {
        ptrdiff_t c = 0;
        for (; c + GROUP <= channels; c += GROUP) {
            ptrdiff_t offset = (n * channels + c) * stride;
            FN(group_grad_sums)(dy + offset, x + offset, stride, run, is_bf16, mean + c, sum_dy + c,
                            sum_dy_xmu + c);
        }
        for (; c < channels; c++) {
            ptrdiff_t offset = (n * channels + c) * stride;
            FN(run_grad_sums)(dy + offset, x + offset, run, is_bf16, mean[c], sum_dy + c, sum_dy_xmu + c);
        }
    }
}

/* Values of channels [c, c + W) (lanes outside `mask` zero) of four consecutive rows from
 * `row`, `row_bytes` apart. */
TARGET static inline void FN(load_rows4)(const char *row, ptrdiff_t row_bytes, int is_bf16,
                                     vmask mask, vec *values) {
    for (int k = 0; k < ROWS_AT_ONCE; k++) values[k] = v_load_masked(row + k * row_bytes, is_bf16, mask);
}

/* v[0] + v[1] + v[2] + v[3], as two independent adds and one more. */
TARGET static inline vec FN(sum_rows4)(const vec *v) {
    return v_add(v_add(v[0], v[1]), v_add(v[2], v[3]));
}

/* Σ a[k]·b[k] over four rows, in fused multiply-adds. */
TARGET static inline vec FN(dot_rows4)(const vec *a, const vec *b) {
    vec partial = v_fmadd(a[1], b[1], v_mul(a[2], b[2]));
    return v_fmadd(a[3], b[3], v_fmadd(a[0], b[0], partial));
}

/* Per channel mean and M2 of an (M, C) matrix, in memory order: each block of rows (in L2 after
 * the first pass) is summed twice in float32, one accumulator per channel (in L1): its mean,
 * then M2 about it (corrected by Σ (x − mean), see run_sum_squares); blocks merge by Chan's rule
 * in float64. `work` holds 3·C floats. */
TARGET static void FN(moments_mc)(const char *x, ptrdiff_t rows, ptrdiff_t channels, int is_bf16,
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
            for (ptrdiff_t c = 0; c < channels; c += W) {
                vmask mask = v_lanes_below(channels - c);
                vec acc = v_maskz_loadu(mask, sums + c);
                if (four) {
                    vec v[ROWS_AT_ONCE];
                    FN(load_rows4)(row + c * item, row_bytes, is_bf16, mask, v);
                    acc = v_add(acc, FN(sum_rows4)(v));
                } else {
                    for (ptrdiff_t k = 0; k < r1 - r; k++)
                        acc = v_add(acc, v_load_masked(row + k * row_bytes + c * item,
                                                               is_bf16, mask));
                }
                v_mask_storeu(sums + c, mask, acc);
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
            for (ptrdiff_t c = 0; c < channels; c += W) {
                vmask mask = v_lanes_below(channels - c);
                vec center = v_maskz_loadu(mask, centers + c);
                vec acc = v_maskz_loadu(mask, sums + c);
                vec acc_d = v_maskz_loadu(mask, shifts + c);
                if (count_rows == ROWS_AT_ONCE) {
                    vec v[ROWS_AT_ONCE];
                    FN(load_rows4)(row + c * item, row_bytes, is_bf16, mask, v);
                    for (int k = 0; k < ROWS_AT_ONCE; k++) v[k] = v_maskz_sub(mask, v[k], center);
                    acc = v_add(acc, FN(dot_rows4)(v, v));     /* Σ d² */
                    acc_d = v_add(acc_d, FN(sum_rows4)(v)); /* Σ d */
                } else {
                    for (ptrdiff_t k = 0; k < count_rows; k++) {
                        vec d = v_maskz_sub(
                            mask, v_load_masked(row + k * row_bytes + c * item, is_bf16, mask),
                            center);
                        acc = v_fmadd(d, d, acc);
                        acc_d = v_add(acc_d, d);
                    }
                }
                v_mask_storeu(sums + c, mask, acc);
                v_mask_storeu(shifts + c, mask, acc_d);
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
TARGET static void FN(grad_sums_mc)(const char *dy, const char *x, ptrdiff_t rows,
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
            for (ptrdiff_t c = 0; c < channels; c += W) {
                vmask mask = v_lanes_below(channels - c);
                vec center = v_maskz_loadu(mask, mean + c);
                vec acc = v_maskz_loadu(mask, block_dy + c);
                vec acc_xmu = v_maskz_loadu(mask, block_xmu + c);
                if (count_rows == ROWS_AT_ONCE) {
                    vec g[ROWS_AT_ONCE], v[ROWS_AT_ONCE];
                    FN(load_rows4)(dy + at + c * item, row_bytes, is_bf16, mask, g);
                    FN(load_rows4)(x + at + c * item, row_bytes, is_bf16, mask, v);
                    for (int k = 0; k < ROWS_AT_ONCE; k++) v[k] = v_sub(v[k], center);
                    acc_xmu = v_add(acc_xmu, FN(dot_rows4)(g, v)); /* Σ dy·(x − μ) */
                    acc = v_add(acc, FN(sum_rows4)(g));            /* Σ dy */
                } else {
                    for (ptrdiff_t k = 0; k < count_rows; k++) {
                        ptrdiff_t offset = at + k * row_bytes + c * (ptrdiff_t)item;
                        vec grad = v_load_masked(dy + offset, is_bf16, mask); /* 0 outside */
                        vec centered = v_sub(v_load_masked(x + offset, is_bf16, mask),
                                                        center);
                        acc = v_add(acc, grad);
                        acc_xmu = v_fmadd(grad, centered, acc_xmu);
                    }
                }
                v_mask_storeu(block_dy + c, mask, acc);
                v_mask_storeu(block_xmu + c, mask, acc_xmu);
            }
        }
        for (ptrdiff_t c = 0; c < channels; c++) {
            sum_dy[c] += block_dy[c];
            sum_dy_xmu[c] += block_xmu[c];
        }
    }
}

TARGET static void FN(moments_share)(void *arg) {
    pass_t *pass = arg;
    ptrdiff_t first, last, channels = pass->channels;
    int thread = statistics_share(pass, &first, &last);
    double *mean = pass->part_a + thread * channels, *m2 = pass->part_b + thread * channels;
    if (pass->run)
        FN(moments_ncl)(pass->x, first, last, channels, pass->run, pass->is_bf16, mean, m2);
    else
        FN(moments_mc)(pass->x + first * channels * (ptrdiff_t)item_size(pass), last - first,
                          channels, pass->is_bf16, mean, m2, pass->work + 3 * thread * channels);
    pass->part_count[thread] = (double)((last - first) * (pass->run ? pass->run : 1));
}

TARGET static void FN(grad_sums_share)(void *arg) {
    pass_t *pass = arg;
    ptrdiff_t first, last, channels = pass->channels;
    int thread = statistics_share(pass, &first, &last);
    double *sum_dy = pass->part_a + thread * channels;
    double *sum_dy_xmu = pass->part_b + thread * channels;
    const float *mean = pass->params[0];
    if (pass->run) {
        for (ptrdiff_t c = 0; c < channels; c++) sum_dy[c] = sum_dy_xmu[c] = 0.0;
        FN(grad_sums_ncl)(pass->dy, pass->x, first, last, channels, pass->run, pass->is_bf16,
                             mean, sum_dy, sum_dy_xmu);
    } else {
        ptrdiff_t offset = first * channels * (ptrdiff_t)item_size(pass);
        FN(grad_sums_mc)(pass->dy + offset, pass->x + offset, last - first, channels,
                            pass->is_bf16, mean, sum_dy, sum_dy_xmu,
                            pass->work + 3 * thread * channels);
    }
}

TARGET static void FN(affine_share)(void *arg) {
    pass_t *pass = arg;
    ptrdiff_t start, end;
    output_share(pass, &start, &end);
    FN(affine)(pass->x, pass->out, start, end, pass->run, pass->channels, pass->is_bf16,
                  pass->params[0], pass->params[1], pass->params[2]);
}

TARGET static void FN(grad_share)(void *arg) {
    pass_t *pass = arg;
    ptrdiff_t start, end;
    output_share(pass, &start, &end);
    FN(grad)(pass->dy, pass->x, pass->out, start, end, pass->run, pass->channels,
                pass->is_bf16, pass->params[0], pass->params[1], pass->params[2],
                pass->params[3]);
}

static const kernels_t FN(kernels) = {
    ISA_NAME, FN(moments_share), FN(grad_sums_share), FN(affine_share), FN(grad_share),
};

#undef TARGET
#undef W
#undef FN
#undef ISA_NAME
#undef vec
#undef vmask
#undef V_ALL
#undef v_load
#undef v_load_masked
#undef v_stream
#undef v_loadu
#undef v_maskz_loadu
#undef v_mask_storeu
#undef v_lanes_below
#undef v_set1
#undef v_zero
#undef v_add
#undef v_sub
#undef v_mul
#undef v_fmadd
#undef v_fnmadd
#undef v_maskz_sub
#undef v_blend_from
#undef v_reduce
#undef v_fence
