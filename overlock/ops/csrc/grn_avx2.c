/* GRN for float32 channels_last maps, AVX2 + FMA: the fused model's per-sample channel scale (first), training's
 * statistics and backward (at the end).
 *
 * Why: in the fused inference model GRN (ConvNeXt-V2's global response normalization) is folded into the next
 * 1x1 as a per-sample scale, scale[b, c] = 1 + gamma[c] * gx[b, c] / (mean_c gx[b, :] + 1e-6) with gx the
 * spatial L2 norm of channel c. PyTorch computes it in about ten small ops and a squared copy of the map (69-70 us
 * on 1x768x14x14 against 26-28 us here, 2 threads). This is one read of the map and one call.
 *
 * Layout: x is (B, HW, C) in memory (channels_last), gamma (C), scale (B, C). Sums of squares are taken in float
 * over 16 rows at a time and those partial sums added in double (a map has thousands of rows), so the result is
 * PyTorch's to float rounding.
 */
#include <immintrin.h>
#include <math.h>

#define BLOCK 32 /* channels per work item: 8 double accumulators */

#define ROWS 16 /* rows summed in float before the partial sum joins the double total */

/* With a bias, x[p, c] += bias[c] first (written back) and the sums are of the biased values. */
__attribute__((target("avx2,fma")))
static void sum_squares(float *x, const float *bias, long HW, int C, int c0, int nv, double *out) {
    __m256d lo[BLOCK / 8], hi[BLOCK / 8];
    for (int v = 0; v < nv; v++) lo[v] = hi[v] = _mm256_setzero_pd();
    for (long p0 = 0; p0 < HW; p0 += ROWS) {
        __m256 part[BLOCK / 8];
        for (int v = 0; v < nv; v++) part[v] = _mm256_setzero_ps();
        const long p1 = p0 + ROWS < HW ? p0 + ROWS : HW;
        for (long p = p0; p < p1; p++) {
            float *row = x + p * C + c0;
            if (bias) {
                for (int v = 0; v < nv; v++) {
                    const __m256 f = _mm256_add_ps(_mm256_loadu_ps(row + 8 * v), _mm256_loadu_ps(bias + c0 + 8 * v));
                    _mm256_storeu_ps(row + 8 * v, f);
                    part[v] = _mm256_fmadd_ps(f, f, part[v]);
                }
                continue;
            }
            for (int v = 0; v < nv; v++) {
                const __m256 f = _mm256_loadu_ps(row + 8 * v);
                part[v] = _mm256_fmadd_ps(f, f, part[v]);
            }
        }
        for (int v = 0; v < nv; v++) {
            lo[v] = _mm256_add_pd(lo[v], _mm256_cvtps_pd(_mm256_castps256_ps128(part[v])));
            hi[v] = _mm256_add_pd(hi[v], _mm256_cvtps_pd(_mm256_extractf128_ps(part[v], 1)));
        }
    }
    for (int v = 0; v < nv; v++) {
        _mm256_storeu_pd(out + 8 * v, lo[v]);
        _mm256_storeu_pd(out + 8 * v + 4, hi[v]);
    }
}

/* out[b, c] = sum_hw x^2 of each sample and channel, or its square root if `root` (taken in double); with a bias,
 * of x + bias, written over x. */
static void channel_sums_of_squares(float *x, const float *bias, float *out, int B, long HW, int C, int root) {
    const int nblocks = (C + BLOCK - 1) / BLOCK;
    #pragma omp parallel for schedule(static)
    for (long item = 0; item < (long)B * nblocks; item++) {
        const long b = item / nblocks;
        const int c0 = (int)(item % nblocks) * BLOCK, nv = (C - c0 < BLOCK ? C - c0 : BLOCK) / 8;
        double sums[BLOCK];
        sum_squares(x + b * HW * C, bias, HW, C, c0, nv, sums);
        for (int i = 0; i < nv * 8; i++) out[b * C + c0 + i] = (float)(root ? sqrt(sums[i]) : sums[i]);
    }
}

/* Returns 0, or -1 for an unsupported shape (C not a multiple of 8). */
int overlock_grn_scale_bias_avx2(float *x, const float *bias, const float *gamma, float *scale, int B, long HW,
                                 int C);

int overlock_grn_scale_avx2(const float *x, const float *gamma, float *scale, int B, long HW, int C) {
    return overlock_grn_scale_bias_avx2((float *)x, NULL, gamma, scale, B, HW, C);
}

/* The same scale of x + bias, x + bias written over x first (in the same pass): a 1x1's output and the bias it was
 * computed without (the Focus-Net block's fusion layer), so its GEMM need not copy the bias into its output. x is
 * only written where bias is not NULL. */
int overlock_grn_scale_bias_avx2(float *x, const float *bias, const float *gamma, float *scale, int B, long HW,
                                 int C) {
    if (C % 8) return -1;
    channel_sums_of_squares(x, bias, scale, B, HW, C, 1);
    for (long b = 0; b < B; b++) {
        float *s = scale + b * C;
        double total = 0;
        for (int c = 0; c < C; c++) total += s[c];
        const float denom = (float)(total / C) + 1e-6f;
        for (int c = 0; c < C; c++) s[c] = 1.0f + gamma[c] * (s[c] / denom);
    }
    return 0;
}

/* sumsq[b, c] = sum_hw x^2 (GRN's statistics in training: one read of the map, no squared copy). */
int overlock_grn_sumsq_avx2(const float *x, float *sumsq, int B, long HW, int C) {
    if (C % 8) return -1;
    channel_sums_of_squares((float *)x, NULL, sumsq, B, HW, C, 0);
    return 0;
}

/* GRN's backward for training (ops/grn.py), two passes over float32 channels_last maps instead of about six.
 *
 * Pass 1: per (sample, channel) ds = sum_hw g * x and gs = sum_hw g (the gradients of GRN's scale and shift), one
 * read of g and x, summed as above (16 rows in float, then double). Pass 2: g <- g * s + x * t (the input gradient,
 * written over g) and, if beta is given, x <- x * s + beta (GRN's output, rebuilt for the next layer's weight
 * gradient) in the same read of the two maps. */

__attribute__((target("avx2,fma")))
static void sum_products(const float *g, const float *x, long HW, int C, int c0, int nv, double *dot, double *sum) {
    __m256d dlo[BLOCK / 8], dhi[BLOCK / 8], slo[BLOCK / 8], shi[BLOCK / 8];
    for (int v = 0; v < nv; v++) dlo[v] = dhi[v] = slo[v] = shi[v] = _mm256_setzero_pd();
    for (long p0 = 0; p0 < HW; p0 += ROWS) {
        __m256 pd[BLOCK / 8], ps[BLOCK / 8];
        for (int v = 0; v < nv; v++) pd[v] = ps[v] = _mm256_setzero_ps();
        const long p1 = p0 + ROWS < HW ? p0 + ROWS : HW;
        for (long p = p0; p < p1; p++) {
            const float *gr = g + p * C + c0, *xr = x + p * C + c0;
            for (int v = 0; v < nv; v++) {
                const __m256 gv = _mm256_loadu_ps(gr + 8 * v);
                pd[v] = _mm256_fmadd_ps(gv, _mm256_loadu_ps(xr + 8 * v), pd[v]);
                ps[v] = _mm256_add_ps(gv, ps[v]);
            }
        }
        for (int v = 0; v < nv; v++) {
            dlo[v] = _mm256_add_pd(dlo[v], _mm256_cvtps_pd(_mm256_castps256_ps128(pd[v])));
            dhi[v] = _mm256_add_pd(dhi[v], _mm256_cvtps_pd(_mm256_extractf128_ps(pd[v], 1)));
            slo[v] = _mm256_add_pd(slo[v], _mm256_cvtps_pd(_mm256_castps256_ps128(ps[v])));
            shi[v] = _mm256_add_pd(shi[v], _mm256_cvtps_pd(_mm256_extractf128_ps(ps[v], 1)));
        }
    }
    for (int v = 0; v < nv; v++) {
        _mm256_storeu_pd(dot + 8 * v, dlo[v]);
        _mm256_storeu_pd(dot + 8 * v + 4, dhi[v]);
        _mm256_storeu_pd(sum + 8 * v, slo[v]);
        _mm256_storeu_pd(sum + 8 * v + 4, shi[v]);
    }
}

/* ds[b, c] = sum_hw g * x, gs[b, c] = sum_hw g; g and x (B, HW, C). Returns 0, or -1 if C is not a multiple of 8. */
int overlock_grn_backward_sums_avx2(const float *g, const float *x, float *ds, float *gs, int B, long HW, int C) {
    if (C % 8) return -1;
    const int nblocks = (C + BLOCK - 1) / BLOCK;
    #pragma omp parallel for schedule(static)
    for (long item = 0; item < (long)B * nblocks; item++) {
        const long b = item / nblocks;
        const int c0 = (int)(item % nblocks) * BLOCK, nv = (C - c0 < BLOCK ? C - c0 : BLOCK) / 8;
        double dot[BLOCK], sum[BLOCK];
        sum_products(g + b * HW * C, x + b * HW * C, HW, C, c0, nv, dot, sum);
        for (int i = 0; i < nv * 8; i++) {
            ds[b * C + c0 + i] = (float)dot[i];
            gs[b * C + c0 + i] = (float)sum[i];
        }
    }
    return 0;
}

#define APPLY_PIXELS 64 /* pixels per work item of the second pass */

/* g <- g * s + x * t; then, if beta, x <- x * s + beta. s and t (B, C); beta (C) or NULL. */
__attribute__((target("avx2,fma")))
int overlock_grn_backward_apply_avx2(float *g, float *x, const float *s, const float *t, const float *beta, int B,
                                     long HW, int C) {
    if (C % 8) return -1;
    const long chunks = (HW + APPLY_PIXELS - 1) / APPLY_PIXELS;
    #pragma omp parallel for schedule(static)
    for (long item = 0; item < B * chunks; item++) {
        const long b = item / chunks, p0 = (item % chunks) * APPLY_PIXELS;
        const long p1 = p0 + APPLY_PIXELS < HW ? p0 + APPLY_PIXELS : HW;
        const float *sb = s + b * C, *tb = t + b * C;
        for (long p = p0; p < p1; p++) {
            float *gp = g + (b * HW + p) * C, *xp = x + (b * HW + p) * C;
            for (int c = 0; c < C; c += 8) {
                const __m256 gv = _mm256_loadu_ps(gp + c), xv = _mm256_loadu_ps(xp + c), sv = _mm256_loadu_ps(sb + c);
                _mm256_storeu_ps(gp + c, _mm256_fmadd_ps(xv, _mm256_loadu_ps(tb + c), _mm256_mul_ps(gv, sv)));
                if (beta) _mm256_storeu_ps(xp + c, _mm256_fmadd_ps(xv, sv, _mm256_loadu_ps(beta + c)));
            }
        }
    }
    return 0;
}
