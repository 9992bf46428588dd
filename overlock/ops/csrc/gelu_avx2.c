/* Exact (erf) GELU and its gradient for contiguous float32 buffers, AVX2 + FMA.
 *
 * Why: OverLoCK runs GELU on its 4x-wide MLP maps, in training three times per MLP (forward, the rebuild in
 * backward, the gradient). PyTorch's CPU kernel takes 7.1 ms forward and 7.9 ms backward on 8x256x56x56 (2 threads,
 * AVX2 EPYC) where a copy takes 1.4 ms: it evaluates erf and a separate exp per element. Here one exp serves both.
 *
 * Math (as PyTorch's vectorized erf: Abramowitz & Stegun 7.1.26, |error| < 1.5e-7): with u = |x| / sqrt(2),
 * t = 1 / (1 + p u) and e = exp(-x^2 / 2), erfc(u) = t P(t) e. Then Phi(x) = 1 - q for x >= 0 and q for x < 0,
 * q = erfc(u) / 2, so GELU(x) = x Phi(x) is formed without the cancellation 1 + erf(x / sqrt(2)) has for
 * negative x, and GELU'(x) = Phi(x) + x e / sqrt(2 pi).
 */
#include <immintrin.h>
#include <math.h>

#define AS_P 0.3275911f
#define AS_A1 0.254829592f
#define AS_A2 -0.284496736f
#define AS_A3 1.421413741f
#define AS_A4 -1.453152027f
#define AS_A5 1.061405429f
#define INV_SQRT_2PI 0.3989422804014327f
#define MIN_PARALLEL 32768 /* elements below which one thread does the whole buffer */

#include "exp_neg_avx2.h" /* exp_neg: e^x for x <= 0 */

/* q = erfc(|x| / sqrt(2)) / 2 (so Phi(x) = x >= 0 ? 1 - q : q) and e = exp(-x^2 / 2). */
__attribute__((target("avx2,fma")))
static inline __m256 half_erfc(__m256 x, __m256 *e) {
    const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                                   _mm256_fmadd_ps(_mm256_set1_ps(AS_P * 0.70710678118654752f), ax,
                                                   _mm256_set1_ps(1.0f)));
    __m256 poly = _mm256_fmadd_ps(_mm256_set1_ps(AS_A5), t, _mm256_set1_ps(AS_A4));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(AS_A3));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(AS_A2));
    poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(AS_A1));
    *e = exp_neg(_mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(-0.5f)));
    return _mm256_mul_ps(_mm256_mul_ps(poly, t), _mm256_mul_ps(*e, _mm256_set1_ps(0.5f)));
}

__attribute__((target("avx2,fma")))
static inline __m256 phi_of(__m256 x, __m256 q) {
    const __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
    return _mm256_blendv_ps(q, _mm256_sub_ps(_mm256_set1_ps(1.0f), q), pos);
}

__attribute__((target("avx2,fma")))
static inline __m256 gelu8(__m256 x) {
    __m256 e;
    const __m256 q = half_erfc(x, &e);
    return _mm256_mul_ps(x, phi_of(x, q));
}

__attribute__((target("avx2,fma")))
static inline __m256 gelu_grad8(__m256 g, __m256 x) {
    __m256 e;
    const __m256 q = half_erfc(x, &e);
    const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(x, e), _mm256_set1_ps(INV_SQRT_2PI), phi_of(x, q));
    return _mm256_mul_ps(g, d);
}

/* out[i] = GELU(x[i]); out may be x. */
__attribute__((target("avx2,fma")))
int overlock_gelu_avx2(const float *x, float *out, long n) {
    const long nv = n / 8;
#pragma omp parallel for schedule(static) if (n >= MIN_PARALLEL)
    for (long i = 0; i < nv; i++)
        _mm256_storeu_ps(out + 8 * i, gelu8(_mm256_loadu_ps(x + 8 * i)));
    if (n % 8) {
        float buf[8] = {0};
        for (long i = 8 * nv; i < n; i++) buf[i - 8 * nv] = x[i];
        _mm256_storeu_ps(buf, gelu8(_mm256_loadu_ps(buf)));
        for (long i = 8 * nv; i < n; i++) out[i] = buf[i - 8 * nv];
    }
    return 0;
}

/* out[i] = g[i] * GELU'(x[i]); out may be g or x. */
__attribute__((target("avx2,fma")))
int overlock_gelu_backward_avx2(const float *g, const float *x, float *out, long n) {
    const long nv = n / 8;
#pragma omp parallel for schedule(static) if (n >= MIN_PARALLEL)
    for (long i = 0; i < nv; i++)
        _mm256_storeu_ps(out + 8 * i, gelu_grad8(_mm256_loadu_ps(g + 8 * i), _mm256_loadu_ps(x + 8 * i)));
    if (n % 8) {
        float bg[8] = {0}, bx[8] = {0};
        for (long i = 8 * nv; i < n; i++) {
            bg[i - 8 * nv] = g[i];
            bx[i - 8 * nv] = x[i];
        }
        _mm256_storeu_ps(bg, gelu_grad8(_mm256_loadu_ps(bg), _mm256_loadu_ps(bx)));
        for (long i = 8 * nv; i < n; i++) out[i] = bg[i - 8 * nv];
    }
    return 0;
}
