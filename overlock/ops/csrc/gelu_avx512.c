/* gelu_avx2.h's GELU and GELU gradient on 16 lanes, for CPUs with AVX-512F.
 *
 * Why: on an AVX-512 Xeon the 8-lane kernels are bound by arithmetic where PyTorch's 16-lane GELU is not (forward on
 * 8x256x56x56: 1.76 against 0.93 ms), and GELU's gradient is most of the time of the conv-then-GELU-gradient pass of
 * the GRN-MLP backward. Every lane goes through the very operations of gelu8 / gelu_grad8 (IEEE divisions, fused
 * multiply-adds, the same rounding and exponent steps), and the forward's cheap path is still chosen per group of 8
 * lanes, so the results have the same bits as the 8-lane code. The entry points handle a prefix of 16-lane vectors
 * and return its length; the 8-lane code does the rest (and everything, where the CPU lacks AVX-512F).
 */
#include <immintrin.h>

#define T512 __attribute__((target("avx512f")))
#define INLINE16 static inline __attribute__((always_inline, target("avx512f")))
#define MIN_PARALLEL 32768 /* as gelu_avx2.c */

#include "gelu_math.h"      /* the constants of gelu_avx2.h */
#include "exp_neg_avx512.h" /* exp_neg16 */

int overlock_avx512_usable(void);

/* gelu_avx2.h's half_erfc */
INLINE16 __m512 half_erfc16(__m512 x, __m512 *e) {
    const __m512 ax = _mm512_abs_ps(x);
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                                   _mm512_fmadd_ps(_mm512_set1_ps(AS_P * INV_SQRT_2), ax,
                                                   _mm512_set1_ps(1.0f)));
    __m512 poly = _mm512_fmadd_ps(_mm512_set1_ps(AS_A5), t, _mm512_set1_ps(AS_A4));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(AS_A3));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(AS_A2));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(AS_A1));
    *e = exp_neg16(_mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-0.5f)));
    return _mm512_mul_ps(_mm512_mul_ps(poly, t), _mm512_mul_ps(*e, _mm512_set1_ps(0.5f)));
}

INLINE16 __m512 phi_of16(__m512 x, __m512 q) {
    const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
    return _mm512_mask_blend_ps(pos, q, _mm512_sub_ps(_mm512_set1_ps(1.0f), q));
}

/* gelu_avx2.h's erf_rational */
INLINE16 __m512 erf_rational16(__m512 u) {
    u = _mm512_max_ps(_mm512_min_ps(u, _mm512_set1_ps(4.0f)), _mm512_set1_ps(-4.0f));
    const __m512 u2 = _mm512_mul_ps(u, u);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(ERF_P0), u2, _mm512_set1_ps(ERF_P1));
    p = _mm512_fmadd_ps(p, u2, _mm512_set1_ps(ERF_P2));
    p = _mm512_fmadd_ps(p, u2, _mm512_set1_ps(ERF_P3));
    p = _mm512_fmadd_ps(p, u2, _mm512_set1_ps(ERF_P4));
    p = _mm512_fmadd_ps(p, u2, _mm512_set1_ps(ERF_P5));
    p = _mm512_fmadd_ps(p, u2, _mm512_set1_ps(ERF_P6));
    __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(ERF_Q0), u2, _mm512_set1_ps(ERF_Q1));
    q = _mm512_fmadd_ps(q, u2, _mm512_set1_ps(ERF_Q2));
    q = _mm512_fmadd_ps(q, u2, _mm512_set1_ps(ERF_Q3));
    q = _mm512_fmadd_ps(q, u2, _mm512_set1_ps(ERF_Q4));
    return _mm512_div_ps(_mm512_mul_ps(u, p), q);
}

INLINE16 __m512 gelu16_fast(__m512 x) {
    const __m512 hx = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
    return _mm512_fmadd_ps(hx, erf_rational16(_mm512_mul_ps(x, _mm512_set1_ps(INV_SQRT_2))), hx);
}

/* gelu8 on each half: the cheap form for a group of 8 lanes all >= -3, the exp-based one for the others. */
INLINE16 __m512 gelu16(__m512 x) {
    const __mmask16 low = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-3.0f), _CMP_LT_OQ);
    if (low == 0) return gelu16_fast(x);
    __m512 e;
    const __m512 slow = _mm512_mul_ps(x, phi_of16(x, half_erfc16(x, &e)));
    if ((low & 0xFF) && (low & 0xFF00)) return slow;
    return _mm512_mask_blend_ps((low & 0xFF) ? 0x00FF : 0xFF00, gelu16_fast(x), slow);
}

INLINE16 __m512 gelu_grad16(__m512 g, __m512 x) {
    __m512 e;
    const __m512 q = half_erfc16(x, &e);
    const __m512 d = _mm512_fmadd_ps(_mm512_mul_ps(x, e), _mm512_set1_ps(INV_SQRT_2PI), phi_of16(x, q));
    return _mm512_mul_ps(g, d);
}

/* out[i] = GELU(x[i]) for i < the returned length (a multiple of 16; 0 where the 512-bit code does not run). Within
 * a parallel region or for a tile, pass parallel = 0: then no OpenMP region is entered at all (an `if (0)` clause
 * still opens a one-thread team, ~0.35 us a call: the tile epilogues of a training step made ~29 000 of them). */
T512 long overlock_gelu_span_avx512(const float *x, float *out, long n, int parallel) {
    if (!overlock_avx512_usable()) return 0;
    const long nv = n / 16;
    if (parallel && n >= MIN_PARALLEL) {
#pragma omp parallel for schedule(static)
        for (long i = 0; i < nv; i++) _mm512_storeu_ps(out + 16 * i, gelu16(_mm512_loadu_ps(x + 16 * i)));
    } else {
        for (long i = 0; i < nv; i++) _mm512_storeu_ps(out + 16 * i, gelu16(_mm512_loadu_ps(x + 16 * i)));
    }
    return 16 * nv;
}

/* out[i] = g[i] * GELU'(x[i]) for i < the returned length (as above). */
T512 long overlock_gelu_grad_span_avx512(const float *g, const float *x, float *out, long n, int parallel) {
    if (!overlock_avx512_usable()) return 0;
    const long nv = n / 16;
    if (parallel && n >= MIN_PARALLEL) {
#pragma omp parallel for schedule(static)
        for (long i = 0; i < nv; i++)
            _mm512_storeu_ps(out + 16 * i, gelu_grad16(_mm512_loadu_ps(g + 16 * i), _mm512_loadu_ps(x + 16 * i)));
    } else {
        for (long i = 0; i < nv; i++)
            _mm512_storeu_ps(out + 16 * i, gelu_grad16(_mm512_loadu_ps(g + 16 * i), _mm512_loadu_ps(x + 16 * i)));
    }
    return 16 * nv;
}

/* x[r, c] = GELU(x[r, c] + bias[c]) for the columns c below the returned length (a multiple of 16; 0 where the
 * 512-bit code does not run) of every row; rows are ld floats apart. Called by one thread per block of rows. */
T512 long overlock_bias_gelu_rows_avx512(float *x, const float *bias, long rows, long cols, long ld) {
    if (!overlock_avx512_usable()) return 0;
    const long nv = cols / 16;
    for (long r = 0; r < rows; r++) {
        float *xr = x + r * ld;
        for (long i = 0; i < nv; i++)
            _mm512_storeu_ps(xr + 16 * i, gelu16(_mm512_add_ps(_mm512_loadu_ps(xr + 16 * i),
                                                               _mm512_loadu_ps(bias + 16 * i))));
    }
    return 16 * nv;
}
