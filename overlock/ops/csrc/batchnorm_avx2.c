/* The backward of one dilated branch of a re-parameterizable block in training, BatchNorm(conv(x)), in one call:
 * the conv output rebuilt, BatchNorm's backward (batch statistics), the conv's input gradient added into the sum
 * over the branches and its weight gradient. float32 channels_last maps (N, H, W, C), C a multiple of 8.
 *
 * Why: recompute.bn_branch_sum ran this as seven PyTorch and kernel calls per branch, each with its own map-sized
 * buffer (the rebuilt conv, BatchNorm's input gradient, the conv's input gradient, then an add into the sum); here
 * one scratch map holds the conv, then BatchNorm's input gradient over it, and the conv's input gradient is added
 * straight into the sum (depthwise_avx2.c's add mode). The gradients are those of the plain graph up to float
 * rounding (sums in a different order); the forward pass is untouched.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

int overlock_depthwise_add_avx2(const float *x, const float *w, const float *bias, float *y, int N, int H, int W,
                                int C, int kh, int kw, int d, int add);
int overlock_depthwise_wgrad_avx2(const float *x, const float *g, float *dw, int N, int H, int W, int C, int kh,
                                  int kw, int d);

/* dot[c] = sum over the map of g * (z - mean[c]): per row in float, the rows added in double in a fixed order (the
 * same bits for any thread count). rows: N * H * C floats of scratch. */
__attribute__((target("avx2,fma")))
static void centred_dot(const float *g, const float *z, const float *mean, float *rows, float *dot, long R, int W,
                        int C) {
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (long r = 0; r < R; r++) {
            const float *gr = g + r * W * C, *zr = z + r * W * C;
            for (int c = 0; c < C; c += 8) {
                const __m256 m = _mm256_loadu_ps(mean + c);
                __m256 a0 = _mm256_setzero_ps(), a1 = a0;
                int x = 0;
                for (; x + 1 < W; x += 2) {  /* two chains: the adds' latency */
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(gr + (long)x * C + c),
                                         _mm256_sub_ps(_mm256_loadu_ps(zr + (long)x * C + c), m), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(gr + (long)(x + 1) * C + c),
                                         _mm256_sub_ps(_mm256_loadu_ps(zr + (long)(x + 1) * C + c), m), a1);
                }
                if (x < W)
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(gr + (long)x * C + c),
                                         _mm256_sub_ps(_mm256_loadu_ps(zr + (long)x * C + c), m), a0);
                _mm256_storeu_ps(rows + r * C + c, _mm256_add_ps(a0, a1));
            }
        }
        #pragma omp for schedule(static)
        for (int c = 0; c < C; c++) {
            double s = 0;
            for (long r = 0; r < R; r++) s += rows[r * C + c];
            dot[c] = (float)s;
        }
    }
}

/* z <- gamma * invstd * (g - gsum / n - (z - mean) * invstd^2 * dot / n): BatchNorm's input gradient over z. */
__attribute__((target("avx2,fma")))
static int input_grad_over(const float *g, float *z, const float *mean, const float *invstd, const float *gamma,
                           const float *gsum, const float *dot, long R, int W, int C) {
    const float inv_n = 1.0f / (float)(R * W);
    float *coef = malloc(sizeof(float) * 3 * C);
    if (!coef) return -2;
    float *a = coef, *b = coef + C, *k = coef + 2 * C;
    for (int c = 0; c < C; c++) {
        a[c] = (gamma ? gamma[c] : 1.0f) * invstd[c];
        b[c] = gsum[c] * inv_n;
        k[c] = dot[c] * invstd[c] * invstd[c] * inv_n;
    }
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < R; r++) {
        const float *gr = g + r * W * C;
        float *zr = z + r * W * C;
        for (int x = 0; x < W; x++)
            for (int c = 0; c < C; c += 8) {
                const long i = (long)x * C + c;
                const __m256 zc = _mm256_sub_ps(_mm256_loadu_ps(zr + i), _mm256_loadu_ps(mean + c));
                const __m256 t = _mm256_fnmadd_ps(zc, _mm256_loadu_ps(k + c),
                                                  _mm256_sub_ps(_mm256_loadu_ps(gr + i), _mm256_loadu_ps(b + c)));
                _mm256_storeu_ps(zr + i, _mm256_mul_ps(t, _mm256_loadu_ps(a + c)));
            }
    }
    free(coef);
    return 0;
}

/* One branch: z = conv(x, taps) (dilation d, zero padding, no bias) into the scratch map z; dot = the sums
 * BatchNorm's weight gradient needs (dgamma = dot * invstd, dbeta = gsum); BatchNorm's input gradient over z; then
 * dw = the conv's weight gradient (C, kh, kw) and gx += (or =, if !add) conv(z, taps_flip), each if given.
 * taps / taps_flip: the kernel in native.py's (kh*kw, C) layout, straight and turned 180 degrees. gamma may be NULL
 * (no affine weight). rows: N * H * C floats of scratch. Returns 0, or the first failing kernel's code. */
__attribute__((target("avx2,fma")))
int overlock_bn_branch_backward_avx2(const float *x, const float *taps, const float *taps_flip, const float *g,
                                     const float *gsum, const float *mean, const float *invstd, const float *gamma,
                                     float *z, float *rows, float *dot, float *gx, int add, float *dw, int N, int H,
                                     int W, int C, int kh, int kw, int d) {
    if (C % 8) return -1;
    int rc = overlock_depthwise_add_avx2(x, taps, NULL, z, N, H, W, C, kh, kw, d, 0);
    if (rc) return rc;
    centred_dot(g, z, mean, rows, dot, (long)N * H, W, C);
    if ((rc = input_grad_over(g, z, mean, invstd, gamma, gsum, dot, (long)N * H, W, C))) return rc;
    if (dw && (rc = overlock_depthwise_wgrad_avx2(x, z, dw, N, H, W, C, kh, kw, d))) return rc;
    /* last: a failure before it leaves gx untouched (the caller can take another path) */
    if (gx && (rc = overlock_depthwise_add_avx2(z, taps_flip, NULL, gx, N, H, W, C, kh, kw, d, add))) return rc;
    return 0;
}

/* The training forward of the dilated branches (recompute._scratch_forward), one branch at a time through one
 * scratch map: its conv, then these two passes. */

#define MOMENT_BLOCK 64 /* pixels per partial sum: the partials, and so the bits, do not depend on the thread count */

/* sum[c] and sumsq[c] over the P pixels of a (P, C) map, in double (BatchNorm's batch statistics: the variance
 * comes out as sumsq / P - mean^2 without float cancellation). Per block of MOMENT_BLOCK pixels in double, the
 * blocks added in order. Returns 0, -1 for C not a multiple of 8, -2 when out of memory. */
__attribute__((target("avx2,fma")))
int overlock_channel_moments_avx2(const float *y, double *sum, double *sumsq, long P, int C) {
    if (C % 8) return -1;
    const long nb = (P + MOMENT_BLOCK - 1) / MOMENT_BLOCK;
    double *part = malloc(sizeof(double) * 2 * C * (nb > 0 ? nb : 1));
    if (!part) return -2;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (long blk = 0; blk < nb; blk++) {
            const long p0 = blk * MOMENT_BLOCK, p1 = p0 + MOMENT_BLOCK < P ? p0 + MOMENT_BLOCK : P;
            double *ps = part + blk * 2 * C, *pq = ps + C;
            for (int c = 0; c < C; c += 8) {
                __m256d s0 = _mm256_setzero_pd(), s1 = s0, q0 = s0, q1 = s0;
                for (long p = p0; p < p1; p++) {
                    const __m256 v = _mm256_loadu_ps(y + p * C + c);
                    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
                    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
                    s0 = _mm256_add_pd(s0, lo);
                    s1 = _mm256_add_pd(s1, hi);
                    q0 = _mm256_fmadd_pd(lo, lo, q0);
                    q1 = _mm256_fmadd_pd(hi, hi, q1);
                }
                _mm256_storeu_pd(ps + c, s0);
                _mm256_storeu_pd(ps + c + 4, s1);
                _mm256_storeu_pd(pq + c, q0);
                _mm256_storeu_pd(pq + c + 4, q1);
            }
        }
        #pragma omp for schedule(static)
        for (int c = 0; c < C; c++) {
            double s = 0, q = 0;
            for (long blk = 0; blk < nb; blk++) {
                s += part[blk * 2 * C + c];
                q += part[blk * 2 * C + C + c];
            }
            sum[c] = s;
            sumsq[c] = q;
        }
    }
    free(part);
    return 0;
}

/* acc = y * a + b (accumulate == 0) or acc + (y * a + b), per channel a and b, over (P, C) maps: a branch's
 * normalized output added into the sum of the branches in one pass. Returns 0, or -1 for C not a multiple of 8. */
__attribute__((target("avx2,fma")))
int overlock_channel_affine_acc_avx2(float *acc, const float *y, const float *a, const float *b, long P, int C,
                                     int accumulate) {
    if (C % 8) return -1;
    #pragma omp parallel for schedule(static) if (P * C >= 32768)
    for (long p = 0; p < P; p++) {
        float *ar = acc + p * C;
        const float *yr = y + p * C;
        for (int c = 0; c < C; c += 8) {
            const __m256 t = _mm256_fmadd_ps(_mm256_loadu_ps(yr + c), _mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c));
            _mm256_storeu_ps(ar + c, accumulate ? _mm256_add_ps(_mm256_loadu_ps(ar + c), t) : t);
        }
    }
    return 0;
}

/* BatchNorm's batch statistics of a (P, C) map and what its training forward needs of them, per channel c:
 * out[0 .. 4C) = mean, invstd = 1 / sqrt(var + eps), a = gamma * invstd, b = beta - mean * a (float; gamma, beta may
 * be NULL: 1 and 0), moments[0 .. 2C) = mean and the unbiased variance in double (the running averages'). The
 * variance is sumsq / P - mean^2 from float64 sums (overlock_channel_moments_avx2). Returns 0, or that kernel's
 * code; -3 for fewer than 2 pixels. */
__attribute__((target("avx2,fma")))
int overlock_bn_batch_stats_avx2(const float *y, long P, int C, const float *gamma, const float *beta, double eps,
                                 float *out, double *moments) {
    if (P < 2) return -3;
    double *sums = malloc(sizeof(double) * 2 * C);
    if (!sums) return -2;
    const int rc = overlock_channel_moments_avx2(y, sums, sums + C, P, C);
    if (rc) {
        free(sums);
        return rc;
    }
    for (int c = 0; c < C; c++) {
        const double mean = sums[c] / (double)P;
        double var = sums[C + c] / (double)P - mean * mean;
        if (var < 0) var = 0;
        const float m = (float)mean, invstd = (float)(1.0 / sqrt(var + eps));
        const float a = gamma ? gamma[c] * invstd : invstd;
        out[c] = m;
        out[C + c] = invstd;
        out[2 * C + c] = a;
        out[3 * C + c] = (beta ? beta[c] : 0.0f) - m * a;
        moments[c] = mean;
        moments[C + c] = var * (double)P / (double)(P - 1);
    }
    free(sums);
    return 0;
}

/* BatchNorm's running averages after a training forward: r = (1 - factor) * r + factor * batch value, in double as
 * PyTorch's CPU kernel takes them (moments: mean, unbiased variance, as overlock_bn_batch_stats_avx2 gives them). */
void overlock_bn_running_update(float *running_mean, float *running_var, const double *moments, int C,
                                double factor) {
    for (int c = 0; c < C; c++) {
        running_mean[c] = (float)(factor * moments[c] + (1.0 - factor) * (double)running_mean[c]);
        running_var[c] = (float)(factor * moments[C + c] + (1.0 - factor) * (double)running_var[c]);
    }
}
