/* What neighborhood_avx2.c and neighborhood_avx512.c must share to give the same bits: the window rule and the
 * reduction order of a vector's 8 lanes. */
#ifndef OVERLOCK_NEIGHBORHOOD_COMMON_H
#define OVERLOCK_NEIGHBORHOOD_COMMON_H
#include <immintrin.h>

#define MAX_TAPS 1024

/* First row (column) of the k-long window of pixel i in a map of len: centred, shifted to stay inside (NATTEN). */
static inline int window_start(int i, int k, int len) {
    int s = i - k / 2;
    if (s < 0) s = 0;
    if (s > len - k) s = len - k;
    return s;
}

/* The sum of a vector's 8 lanes. */
static inline __attribute__((always_inline, target("avx2,fma"))) float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

#endif
