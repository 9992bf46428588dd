/* ContMix's aggregation at inference, fused: for every pixel p of every head, the logits of its k x k window
 * (query . keys + bias), their softmax, and the softmax-weighted sum of the window's values, AVX2 + FMA.
 *
 * Why: in PyTorch these are three passes and, for maps that fit one tile, a dense (H*W x H*W) product that
 * spends 8x the needed multiply-adds on a 5x5 window of a 14x14 map; on a 2-core AVX2 CPU ContMix took about a
 * tenth of an overlock_t forward at batch 16. Here each pixel's logits stay in L1 and only its k*k neighbours
 * are read. Same function as ops/neighborhood.na2d_av(softmax(q @ keys + bias)) (NATTEN's window rule: the
 * window is centred on the pixel and shifted to stay inside the map near a border, never padded).
 *
 * Layout (float32): q (B, G, H*W, c) contiguous; keys (B, G, c, k*k) contiguous; bias (G, H*W, k*k)
 * contiguous; v and out addressed by element strides (sample, head, pixel; channels contiguous, C of them).
 */
#include <immintrin.h>
#include <math.h>

#define TARGET __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline, target("avx2,fma")))
#define MAX_TAPS 1024

#include "exp_neg_avx2.h" /* exp_neg: e^x for the softmax's shifted logits (x <= 0) */

static inline int window_start(int i, int k, int len) {
    int s = i - k / 2;
    if (s < 0) s = 0;
    if (s > len - k) s = len - k;
    return s;
}

/* acc[dx mod 4][h] += w[tap] * v[window pixel, c0 + 8h ..] over the k x k window at (sy, sx), CV halves of 8
 * channels; the columns past the last multiple of 4 go to acc[0]. */
INLINE void window_sum(const float *vg, long vpix, const float *w, int k, int W, int sy, int sx, int c0,
                       __m256 acc[4][2], const int CV) {
    int a = 0;
    for (int dy = 0; dy < k; dy++) {
        const float *row = vg + ((long)(sy + dy) * W + sx) * vpix + c0;
        int dx = 0;
        for (; dx + 4 <= k; dx += 4, a += 4)
            for (int t = 0; t < 4; t++) {
                const __m256 wa = _mm256_set1_ps(w[a + t]);
                for (int h = 0; h < CV; h++)
                    acc[t][h] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(row + (long)(dx + t) * vpix + 8 * h), acc[t][h]);
            }
        for (; dx < k; dx++, a++) {
            const __m256 wa = _mm256_set1_ps(w[a]);
            for (int h = 0; h < CV; h++)
                acc[0][h] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(row + (long)dx * vpix + 8 * h), acc[0][h]);
        }
    }
}

/* One pixel: logits into w[0 .. kk), softmax, weighted sum of the window's values into o (C channels). */
INLINE void pixel(const float *qp, const float *keys, const float *bp, const float *vg, long vpix, float *o,
                  int c, int kk, int k, int W, int sy, int sx, int C, float *w) {
    const int nv = (kk + 7) / 8, full = kk / 8;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int a = 0;
    for (; a + 4 <= full; a += 4) {  /* four logit vectors at a time: one broadcast of q[j] serves four FMAs */
        const float *kp = keys + a * 8;
        __m256 s0 = _mm256_loadu_ps(bp + a * 8), s1 = _mm256_loadu_ps(bp + a * 8 + 8);
        __m256 s2 = _mm256_loadu_ps(bp + a * 8 + 16), s3 = _mm256_loadu_ps(bp + a * 8 + 24);
        for (int j = 0; j < c; j++, kp += kk) {
            const __m256 qj = _mm256_set1_ps(qp[j]);
            s0 = _mm256_fmadd_ps(qj, _mm256_loadu_ps(kp), s0);
            s1 = _mm256_fmadd_ps(qj, _mm256_loadu_ps(kp + 8), s1);
            s2 = _mm256_fmadd_ps(qj, _mm256_loadu_ps(kp + 16), s2);
            s3 = _mm256_fmadd_ps(qj, _mm256_loadu_ps(kp + 24), s3);
        }
        _mm256_storeu_ps(w + a * 8, s0);
        _mm256_storeu_ps(w + a * 8 + 8, s1);
        _mm256_storeu_ps(w + a * 8 + 16, s2);
        _mm256_storeu_ps(w + a * 8 + 24, s3);
        mx = _mm256_max_ps(_mm256_max_ps(mx, _mm256_max_ps(s0, s1)), _mm256_max_ps(s2, s3));
    }
    for (; a < nv; a++) {
        const int a0 = a * 8;
        __m256 acc;
        if (a0 + 8 <= kk) {
            acc = _mm256_loadu_ps(bp + a0);
            for (int j = 0; j < c; j++)
                acc = _mm256_fmadd_ps(_mm256_set1_ps(qp[j]), _mm256_loadu_ps(keys + (long)j * kk + a0), acc);
        } else {  /* tail: padding lanes get -inf (weight 0) */
            float tmp[8];
            for (int t = 0; t < 8; t++) {
                float s = -INFINITY;
                if (a0 + t < kk) {
                    s = bp[a0 + t];
                    for (int j = 0; j < c; j++) s = fmaf(qp[j], keys[(long)j * kk + a0 + t], s);
                }
                tmp[t] = s;
            }
            acc = _mm256_loadu_ps(tmp);
        }
        _mm256_storeu_ps(w + a0, acc);
        mx = _mm256_max_ps(mx, acc);
    }
    /* horizontal max */
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const __m256 m = _mm256_set1_ps(_mm_cvtss_f32(m4));
    __m256 sum = _mm256_setzero_ps();
    for (int a = 0; a < nv; a++) {
        const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(w + a * 8), m));
        _mm256_storeu_ps(w + a * 8, e);
        sum = _mm256_add_ps(sum, e);
    }
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
    const float inv = 1.0f / _mm_cvtss_f32(s4);
    const __m256 sc = _mm256_set1_ps(inv);
    for (int c0 = 0; c0 < C; c0 += 16) {
        /* four accumulator pairs (taps dx mod 4): independent FMA chains instead of one long one */
        __m256 acc[4][2];
        for (int t = 0; t < 4; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        if (c0 + 16 <= C)
            window_sum(vg, vpix, w, k, W, sy, sx, c0, acc, 2);
        else
            window_sum(vg, vpix, w, k, W, sy, sx, c0, acc, 1);
        for (int h = 0; h < (c0 + 16 <= C ? 2 : 1); h++) {
            const __m256 t = _mm256_add_ps(_mm256_add_ps(acc[0][h], acc[1][h]), _mm256_add_ps(acc[2][h], acc[3][h]));
            _mm256_storeu_ps(o + c0 + 8 * h, _mm256_mul_ps(t, sc));
        }
    }
}

/* Returns 0, or -1 for an unsupported shape (C not a multiple of 8, more than MAX_TAPS taps, map < k). */
TARGET int overlock_na2d_softmax_av_avx2(const float *q, const float *keys, const float *bias, const float *v,
                                         float *out, int B, int G, int H, int W, int c, int C, int k,
                                         long vs_b, long vs_g, long vs_p, long os_b, long os_g, long os_p) {
    const int kk = k * k;
    if (C % 8 || kk > MAX_TAPS || H < k || W < k) return -1;
    const long HW = (long)H * W;
    #pragma omp parallel
    {
        float w[MAX_TAPS + 8] __attribute__((aligned(32)));
        #pragma omp for schedule(static)
        for (long item = 0; item < (long)B * G * H; item++) {  /* one row of pixels of one head */
            const int y = item % H, g = (item / H) % G;
            const long b = item / H / G;
            const float *kb = keys + (b * G + g) * (long)c * kk;
            const float *vg = v + b * vs_b + g * vs_g;
            const int sy = window_start(y, k, H);
            for (int x = 0; x < W; x++) {
                const long p = (long)y * W + x;
                pixel(q + ((b * G + g) * HW + p) * c, kb, bias + ((long)g * HW + p) * kk, vg, vs_p,
                      out + b * os_b + g * os_g + p * os_p, c, kk, k, W, sy, window_start(x, k, W), C, w);
            }
        }
    }
    return 0;
}
