/* The pixel pairs of neighborhood_avx2.c's fused ContMix aggregation with 512-bit vectors, for CPUs with AVX-512F.
 *
 * Why: on an AVX-512 Xeon the 256-bit kernel ran at about 40 G multiply-adds/s (2 cores) with 16 query and 16 value
 * channels per head: a third of its time went to the logits, a third to the softmax's exponentials (one per tap,
 * as many as the multiply-adds of a 16-channel head) and a third to the weighted sums, all bound by arithmetic.
 * Here a vector holds 16 taps (logits, exponentials) or 16 channels (sums). Every lane goes through the very
 * operations of the 256-bit code: each logit the same chain of fused multiply-adds from its bias, the exponentials
 * summed 8 lanes at a time in the same order, each channel's sum the same two column-parity chains: the same bits.
 */
#include <immintrin.h>
#include <math.h>

#include "exp_neg_avx2.h"        /* exp_neg: the odd 8-lane vector */
#include "exp_neg_avx512.h"      /* exp_neg16 */
#include "neighborhood_common.h" /* window_start, hsum, MAX_TAPS */

#define INLINE512 static inline __attribute__((always_inline, target("avx512f,avx2,fma")))

int overlock_avx512_usable(void);

/* The logits of NP pixels (queries q[i], bias rows b[i]) into w[i] (padding lanes up to a multiple of 8: -inf), as
 * logits_pair of neighborhood_avx2.c computes each: a chain of fused multiply-adds from its bias over j = 0 .. c-1.
 * Here 48 taps of NP pixels per step, so that each keys vector loaded serves NP multiply-adds. */
INLINE512 void logits16(const float *const *q, const float *keys, long kst, const float *const *b, int c, int kk,
                        float *const *w, const int NP) {
    const int full = kk / 8 * 8;
    int a = 0;
    for (; a + 48 <= full; a += 48) {
        __m512 s[4][3];
        for (int i = 0; i < NP; i++)
            for (int u = 0; u < 3; u++) s[i][u] = _mm512_loadu_ps(b[i] + a + 16 * u);
        const float *kp = keys + a;
        for (int j = 0; j < c; j++, kp += kst) {
            const __m512 k0 = _mm512_loadu_ps(kp), k1 = _mm512_loadu_ps(kp + 16), k2 = _mm512_loadu_ps(kp + 32);
            for (int i = 0; i < NP; i++) {
                const __m512 x = _mm512_set1_ps(q[i][j]);
                s[i][0] = _mm512_fmadd_ps(x, k0, s[i][0]);
                s[i][1] = _mm512_fmadd_ps(x, k1, s[i][1]);
                s[i][2] = _mm512_fmadd_ps(x, k2, s[i][2]);
            }
        }
        for (int i = 0; i < NP; i++)
            for (int u = 0; u < 3; u++) _mm512_storeu_ps(w[i] + a + 16 * u, s[i][u]);
    }
    for (; a + 16 <= full; a += 16) {
        __m512 s[4];
        for (int i = 0; i < NP; i++) s[i] = _mm512_loadu_ps(b[i] + a);
        for (int j = 0; j < c; j++) {
            const __m512 kv = _mm512_loadu_ps(keys + j * kst + a);
            for (int i = 0; i < NP; i++) s[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i][j]), kv, s[i]);
        }
        for (int i = 0; i < NP; i++) _mm512_storeu_ps(w[i] + a, s[i]);
    }
    if (a < full) {  /* one vector of 8 */
        __m256 s[4];
        for (int i = 0; i < NP; i++) s[i] = _mm256_loadu_ps(b[i] + a);
        for (int j = 0; j < c; j++) {
            const __m256 kv = _mm256_loadu_ps(keys + j * kst + a);
            for (int i = 0; i < NP; i++) s[i] = _mm256_fmadd_ps(_mm256_set1_ps(q[i][j]), kv, s[i]);
        }
        for (int i = 0; i < NP; i++) _mm256_storeu_ps(w[i] + a, s[i]);
    }
    for (int e = 0; e < (kk % 8 ? 8 : 0); e++)  /* tail vector: padding lanes -inf (weight 0) */
        for (int i = 0; i < NP; i++) {
            float s = -INFINITY;
            if (full + e < kk) {
                s = b[i][full + e];
                for (int j = 0; j < c; j++) s = fmaf(q[i][j], keys[j * kst + full + e], s);
            }
            w[i][full + e] = s;
        }
}

/* softmax_exp of neighborhood_avx2.c: w[0 .. nv vectors of 8) = exp(w - max w) in place; returns their sum, added
 * 8 lanes at a time in vector order and reduced by hsum. */
INLINE512 float softmax_exp16(float *w, int kk) {
    const int nv = (kk + 7) / 8;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int a = 0;
    for (; a + 2 <= nv; a += 2) mx = _mm512_max_ps(mx, _mm512_loadu_ps(w + a * 8));
    float m = _mm512_reduce_max_ps(mx);
    if (a < nv) {
        const __m256 t = _mm256_loadu_ps(w + a * 8);
        for (int e = 0; e < 8; e++) m = fmaxf(m, t[e]);
    }
    const __m512 m16 = _mm512_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (a = 0; a + 2 <= nv; a += 2) {
        const __m512 e = exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(w + a * 8), m16));
        _mm512_storeu_ps(w + a * 8, e);
        sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
        sum = _mm256_add_ps(sum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    }
    if (a < nv) {
        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(w + a * 8), _mm256_set1_ps(m)));
        _mm256_storeu_ps(w + a * 8, e);
        sum = _mm256_add_ps(sum, e);
    }
    return hsum(sum);
}

/* window_sum_pair of neighborhood_avx2.c for NP = 2 or 4 pixels, 16 channels at c0: pair A (pixels 0, 1; the
 * second's window SA columns right of the first's) and with NP = 4 pair B (pixels 2, 3: D and D + SB columns right).
 * Each value vector is loaded once for all of them; each pixel's taps go to the chains the pair code gives them (the
 * parity of the column within its pair's span), in the same order: the same bits, with four independent chains per
 * pair (one pair alone is bound by the multiply-adds' latency). */
INLINE512 void window_sums16(const float *vg, long vpix, float *const *w, int k, int W, int sy, int sx, int c0,
                             __m512 acc[4][2], const int NP, const int SA, const int SB, const int D) {
    __m512 a[2] = {acc[0][0], acc[0][1]}, b[2] = {acc[1][0], acc[1][1]};
    __m512 e[2] = {acc[2][0], acc[2][1]}, f[2] = {acc[3][0], acc[3][1]};
    const int n = NP == 4 ? D + k + SB : k + SA;
    for (int dy = 0; dy < k; dy++) {
        const float *row = vg + ((long)(sy + dy) * W + sx) * vpix + c0;
        const float *r0 = w[0] + dy * k, *r1 = w[1] + dy * k - SA;
        const float *r2 = NP == 4 ? w[2] + dy * k - D : NULL, *r3 = NP == 4 ? w[3] + dy * k - D - SB : NULL;
#define OVERLOCK_COLUMN(u, PA)                                                                                      \
        {                                                                                                           \
            const __m512 v = _mm512_loadu_ps(row + (long)(u) * vpix);                                               \
            const int pb = ((PA) + D) & 1;                                                                          \
            if ((u) < k) a[PA] = _mm512_fmadd_ps(_mm512_set1_ps(r0[u]), v, a[PA]);                                  \
            if ((u) >= SA && (u) < k + SA) b[PA] = _mm512_fmadd_ps(_mm512_set1_ps(r1[u]), v, b[PA]);                \
            if (NP == 4 && (u) >= D && (u) < D + k) e[pb] = _mm512_fmadd_ps(_mm512_set1_ps(r2[u]), v, e[pb]);       \
            if (NP == 4 && (u) >= D + SB) f[pb] = _mm512_fmadd_ps(_mm512_set1_ps(r3[u]), v, f[pb]);                 \
        }
        int u = 0;
        for (; u + 2 <= n; u += 2) {
            OVERLOCK_COLUMN(u, 0)
            OVERLOCK_COLUMN(u + 1, 1)
        }
        if (u < n) OVERLOCK_COLUMN(u, 0)
#undef OVERLOCK_COLUMN
    }
    acc[0][0] = a[0], acc[0][1] = a[1], acc[1][0] = b[0], acc[1][1] = b[1];
    acc[2][0] = e[0], acc[2][1] = e[1], acc[3][0] = f[0], acc[3][1] = f[1];
}

/* NP = 2 or 4 pixels from x of row y: logits, softmax, and the weighted sums of their windows into o[i]. */
INLINE512 void pixels16(const float *q, long qs_p, const float *keys, long kst, const float *brow, const float *vg,
                        long vs_p, float *orow, long os_p, int x, int sy, int W, int c, int C, int k, float *const *w,
                        const int NP) {
    const int kk = k * k;
    const float *qs[4], *bs[4];
    float *o[4];
    int sx[4];
    __m512 sc[4];
    for (int i = 0; i < NP; i++) {
        qs[i] = q + (x + i) * qs_p;
        bs[i] = brow + (long)(x + i) * kk;
        o[i] = orow + (x + i) * os_p;
        sx[i] = window_start(x + i, k, W);
    }
    logits16(qs, keys, kst, bs, c, kk, w, NP);
    for (int i = 0; i < NP; i++) sc[i] = _mm512_set1_ps(1.0f / softmax_exp16(w[i], kk));
    const int sa = sx[1] - sx[0], sb = NP == 4 ? sx[3] - sx[2] : 0, d = NP == 4 ? sx[2] - sx[0] : 0;
    for (int c0 = 0; c0 < C; c0 += 16) {
        __m512 acc[4][2];
        for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
        if (NP == 2) {
            if (sa) window_sums16(vg, vs_p, w, k, W, sy, sx[0], c0, acc, 2, 1, 0, 0);
            else window_sums16(vg, vs_p, w, k, W, sy, sx[0], c0, acc, 2, 0, 0, 0);
        } else {  /* window starts rise by at most one column per pixel: sa, sb in {0, 1}, d in {sa .. sa + 1} */
#define QUAD(SA, SB, D) window_sums16(vg, vs_p, w, k, W, sy, sx[0], c0, acc, 4, SA, SB, D)
            switch (sa * 100 + sb * 10 + d) {
                case 0: QUAD(0, 0, 0); break;
                case 1: QUAD(0, 0, 1); break;
                case 10: QUAD(0, 1, 0); break;
                case 11: QUAD(0, 1, 1); break;
                case 101: QUAD(1, 0, 1); break;
                case 102: QUAD(1, 0, 2); break;
                case 111: QUAD(1, 1, 1); break;
                default: QUAD(1, 1, 2); break;
            }
#undef QUAD
        }
        for (int i = 0; i < NP; i++)
            _mm512_storeu_ps(o[i] + c0, _mm512_mul_ps(_mm512_add_ps(acc[i][0], acc[i][1]), sc[i]));
    }
}

/* The pixel pairs of one row (softmax_av_row of neighborhood_avx2.c, same arguments) where C is a multiple of 16
 * and the CPU has AVX-512F, two pairs at a time: returns the number of pixels done (the caller does the rest, or
 * all of them: 0). */
__attribute__((target("avx512f,avx2,fma")))
int overlock_softmax_av_pairs_avx512(const float *q, long qs_p, const float *keys, long kst, const float *brow,
                                     const float *vg, long vs_p, float *orow, long os_p, int y, int H, int W, int c,
                                     int C, int k, float *w0, float *w1) {
    if (C % 16 || !overlock_avx512_usable()) return 0;
    float w2[MAX_TAPS + 8] __attribute__((aligned(64))), w3[MAX_TAPS + 8] __attribute__((aligned(64)));
    float *const w[4] = {w0, w1, w2, w3};
    const int sy = window_start(y, k, H);
    int x = 0;
    for (; x + 4 <= W; x += 4) pixels16(q, qs_p, keys, kst, brow, vg, vs_p, orow, os_p, x, sy, W, c, C, k, w, 4);
    if (x + 2 <= W) {
        pixels16(q, qs_p, keys, kst, brow, vg, vs_p, orow, os_p, x, sy, W, c, C, k, w, 2);
        x += 2;
    }
    return x;
}
