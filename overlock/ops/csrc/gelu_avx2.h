/* Exact (erf) GELU and its gradient on 8 float32 lanes, AVX2 + FMA: the math of gelu_avx2.c (see there), in a
 * header so that other kernels can apply GELU to values they have just computed (depthwise_avx2.c's epilogue) with
 * the very same bits. */
#ifndef OVERLOCK_GELU_AVX2_H
#define OVERLOCK_GELU_AVX2_H
#include <immintrin.h>
#include <math.h>

#include "gelu_math.h" /* the constants, shared with gelu_avx512.c */


#include "exp_neg_avx2.h" /* exp_neg: e^x for x <= 0 */

/* q = erfc(|x| / sqrt(2)) / 2 (so Phi(x) = x >= 0 ? 1 - q : q) and e = exp(-x^2 / 2). */
__attribute__((target("avx2,fma")))
static inline __m256 half_erfc(__m256 x, __m256 *e) {
    const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                                   _mm256_fmadd_ps(_mm256_set1_ps(AS_P * INV_SQRT_2), ax,
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

/* erf(u) for |u| <= 4 as u P(u^2) / Q(u^2) (the rational approximation of Eigen and XLA, a few float32 ulp), u
 * clamped to [-4, 4] (erf there is 1 to float32 precision). No exp: about half the instructions of half_erfc. */
__attribute__((target("avx2,fma")))
static inline __m256 erf_rational(__m256 u) {
    u = _mm256_max_ps(_mm256_min_ps(u, _mm256_set1_ps(4.0f)), _mm256_set1_ps(-4.0f));
    const __m256 u2 = _mm256_mul_ps(u, u);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(ERF_P0), u2, _mm256_set1_ps(ERF_P1));
    p = _mm256_fmadd_ps(p, u2, _mm256_set1_ps(ERF_P2));
    p = _mm256_fmadd_ps(p, u2, _mm256_set1_ps(ERF_P3));
    p = _mm256_fmadd_ps(p, u2, _mm256_set1_ps(ERF_P4));
    p = _mm256_fmadd_ps(p, u2, _mm256_set1_ps(ERF_P5));
    p = _mm256_fmadd_ps(p, u2, _mm256_set1_ps(ERF_P6));
    __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(ERF_Q0), u2, _mm256_set1_ps(ERF_Q1));
    q = _mm256_fmadd_ps(q, u2, _mm256_set1_ps(ERF_Q2));
    q = _mm256_fmadd_ps(q, u2, _mm256_set1_ps(ERF_Q3));
    q = _mm256_fmadd_ps(q, u2, _mm256_set1_ps(ERF_Q4));
    return _mm256_div_ps(_mm256_mul_ps(u, p), q);
}

/* GELU of 8 lanes. Where every lane is >= -3 (nearly every vector of a network's activations): x/2 (1 + erf) with
 * the rational erf, whose cancellation in 1 + erf costs at most 4e-5 relative error there (absolute < 5e-7).
 * Otherwise the exp-based erfc above, accurate relative to the result deep into the negative tail. */
__attribute__((target("avx2,fma")))
static inline __m256 gelu8_fast(__m256 x) {  /* every lane >= -3 */
    const __m256 hx = _mm256_mul_ps(x, _mm256_set1_ps(0.5f));
    return _mm256_fmadd_ps(hx, erf_rational(_mm256_mul_ps(x, _mm256_set1_ps(INV_SQRT_2))), hx);
}

__attribute__((target("avx2,fma")))
static inline __m256 gelu8(__m256 x) {
    if (_mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-3.0f), _CMP_LT_OQ)) == 0)
        return gelu8_fast(x);
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

#endif
