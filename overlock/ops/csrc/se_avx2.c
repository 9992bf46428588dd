/* The squeeze-and-excitation gate of a float32 channels_last map in one call, AVX2 + FMA:
 * gate[b, :] = sigmoid(W2 GELU(W1 mean_hw(x[b]) + b1) + b2).
 *
 * Why: at batch 1 the fused blocks' SE ran as five PyTorch ops (mean, linear, GELU, linear, sigmoid) plus views,
 * each costing several times its arithmetic (a 256-channel gate about 40-60 us alone, 100-150 us inside the
 * model); its arithmetic is one read of the map and two tiny matrix-vector products. Exact GELU (gelu_avx2.h, the
 * bits of the GELU kernel); sums as grn_avx2.c's (float over 16 rows, double across them); the products in float
 * with 8 partial sums; sigmoid from exp_neg. PyTorch's values to float rounding.
 *
 * Layout: x (B, HW, C) in memory, w1 (R, C) and w2 (C, R) row-major, b1 (R), b2 (C), gate (B, C); C a multiple of 8.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#include "gelu_avx2.h" /* gelu8 (and exp_neg) */

#define ROWS 16
#define MAX_CHANNELS 4096

__attribute__((target("avx2,fma")))
static float dot(const float *a, const float *b, int n) {
    __m256 s = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    float r = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
    for (; i < n; i++) r = fmaf(a[i], b[i], r);
    return r;
}

/* Returns 0, or -1 for an unsupported shape (C not a multiple of 8, or more than MAX_CHANNELS). */
__attribute__((target("avx2,fma")))
int overlock_se_gate_avx2(const float *x, int B, long HW, int C, const float *w1, const float *b1, int R,
                          const float *w2, const float *b2, float *gate) {
    if (C % 8 || C > MAX_CHANNELS || R > MAX_CHANNELS || HW <= 0) return -1;
    float *mean = (float *)malloc(sizeof(float) * (size_t)B * C);
    if (!mean) return -1;
    const int nblocks = C / 8;
    #pragma omp parallel for schedule(static) if ((long)B * HW * C >= 32768)
    for (long item = 0; item < (long)B * nblocks; item++) {
        const long b = item / nblocks;
        const int c0 = (int)(item % nblocks) * 8;
        const float *xb = x + b * HW * C + c0;
        __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
        for (long p0 = 0; p0 < HW; p0 += ROWS) {
            const long p1 = p0 + ROWS < HW ? p0 + ROWS : HW;
            __m256 part = _mm256_setzero_ps();
            for (long p = p0; p < p1; p++) part = _mm256_add_ps(part, _mm256_loadu_ps(xb + p * C));
            lo = _mm256_add_pd(lo, _mm256_cvtps_pd(_mm256_castps256_ps128(part)));
            hi = _mm256_add_pd(hi, _mm256_cvtps_pd(_mm256_extractf128_ps(part, 1)));
        }
        const __m256d inv = _mm256_set1_pd(1.0 / (double)HW);
        const __m128 l = _mm256_cvtpd_ps(_mm256_mul_pd(lo, inv)), h = _mm256_cvtpd_ps(_mm256_mul_pd(hi, inv));
        _mm256_storeu_ps(mean + b * C + c0, _mm256_insertf128_ps(_mm256_castps128_ps256(l), h, 1));
    }
    float hidden[MAX_CHANNELS + 8];
    for (long b = 0; b < B; b++) {
        for (int j = 0; j < R; j++) hidden[j] = b1[j] + dot(w1 + (long)j * C, mean + b * C, C);
        int j = 0;
        for (; j + 8 <= R; j += 8) _mm256_storeu_ps(hidden + j, gelu8(_mm256_loadu_ps(hidden + j)));
        if (j < R) {  /* tail lanes through one padded vector */
            float buf[8] = {0};
            for (int t = j; t < R; t++) buf[t - j] = hidden[t];
            _mm256_storeu_ps(buf, gelu8(_mm256_loadu_ps(buf)));
            for (int t = j; t < R; t++) hidden[t] = buf[t - j];
        }
        float *g = gate + b * C;
        for (int c = 0; c < C; c++) g[c] = b2[c] + dot(w2 + (long)c * R, hidden, R);
        for (int c = 0; c < C; c += 8) {  /* sigmoid(s) = 1 / (1 + e^-s), e^-|s| from exp_neg for either sign */
            const __m256 s = _mm256_loadu_ps(g + c);
            const __m256 e = exp_neg(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), s)));
            const __m256 one = _mm256_set1_ps(1.0f);
            const __m256 pos = _mm256_div_ps(one, _mm256_add_ps(one, e));            /* s >= 0 */
            const __m256 neg = _mm256_div_ps(e, _mm256_add_ps(one, e));              /* s < 0 */
            _mm256_storeu_ps(g + c, _mm256_blendv_ps(neg, pos, _mm256_cmp_ps(s, _mm256_setzero_ps(), _CMP_GE_OQ)));
        }
    }
    free(mean);
    return 0;
}
