/* The Focus-Net block's input in one pass, AVX2 + FMA: out = [x, b + ctx * w1 + prior * w2] over the channels of
 * float32 channels_last maps (one pixel's channels contiguous).
 *
 * Why: at batch 1 the fused block built it with three PyTorch ops (the two multiply-adds, then the concatenation),
 * each a pass over maps another op had just written on the other core; removing the concatenation alone gave 1% of
 * an overlock_t forward. The multiply-adds are fused (one rounding each, in that order), as PyTorch's addcmul on
 * the CPU computes them: the same bits.
 *
 * Layout: pixel p of x at x + p * xs (Cx channels), of ctx at ctx + p * cs and of prior at prior + p * ps (Cc
 * channels); out (P, Cx + Cc) contiguous; Cx and Cc multiples of 8.
 */
#include <immintrin.h>

#define MIN_PARALLEL 32768 /* floats written: below this one thread is faster */

/* Returns 0, or -1 for channel counts that are not multiples of 8. */
__attribute__((target("avx2,fma")))
int overlock_context_concat_avx2(const float *x, long xs, int Cx, const float *ctx, long cs, const float *prior,
                                 long ps, int Cc, const float *w1, const float *w2, const float *b, float *out,
                                 long P) {
    if (Cx % 8 || Cc % 8) return -1;
    const long C = (long)Cx + Cc;
#pragma omp parallel for schedule(static) if (P * C >= MIN_PARALLEL)
    for (long p = 0; p < P; p++) {
        const float *xp = x + p * xs, *cp = ctx + p * cs, *pp = prior + p * ps;
        float *o = out + p * C;
        for (int c = 0; c < Cx; c += 8) _mm256_storeu_ps(o + c, _mm256_loadu_ps(xp + c));
        for (int c = 0; c < Cc; c += 8) {
            const __m256 t = _mm256_fmadd_ps(_mm256_loadu_ps(cp + c), _mm256_loadu_ps(w1 + c), _mm256_loadu_ps(b + c));
            _mm256_storeu_ps(o + Cx + c, _mm256_fmadd_ps(_mm256_loadu_ps(pp + c), _mm256_loadu_ps(w2 + c), t));
        }
    }
    return 0;
}
