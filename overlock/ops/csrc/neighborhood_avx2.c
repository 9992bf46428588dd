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
 *
 * Training uses the same forward and the hand-written backward at the end of this file (the gradients of q, keys,
 * bias and v), which rebuilds each pixel's softmax weights instead of keeping them: in PyTorch the logits, the
 * softmax and a dense (H*W x H*W) weight matrix per head each went through memory in both passes.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

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

/* The sum of a vector's 8 lanes. */
INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

/* One pixel's window: w[0 .. kk) = exp(logit - max logit), padding lanes up to a multiple of 8 = 0; returns their
 * sum (the softmax weights are w / sum). */
INLINE float window_exp(const float *qp, const float *keys, const float *bp, int c, int kk, float *w) {
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
    return hsum(sum);
}

/* One pixel: logits into w[0 .. kk), softmax, weighted sum of the window's values into o (C channels). */
INLINE void pixel(const float *qp, const float *keys, const float *bp, const float *vg, long vpix, float *o,
                  int c, int kk, int k, int W, int sy, int sx, int C, float *w) {
    const float inv = 1.0f / window_exp(qp, keys, bp, c, kk, w);
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

/* go . v over NV vectors of 8 channels, as 8 partial sums */
INLINE __m256 tap_dot(const float *vn, const __m256 *gv, const int NV) {
    __m256 s = _mm256_mul_ps(gv[0], _mm256_loadu_ps(vn));
    for (int h = 1; h < NV; h++) s = _mm256_fmadd_ps(gv[h], _mm256_loadu_ps(vn + 8 * h), s);
    return s;
}

/* Gradients of the forward above for one (sample, head), every pixel: with p the softmax weights of a pixel's
 * window (rebuilt) and go its output gradient, dp[t] = go . v[t], the logit gradient dl[t] = p[t] * (dp[t] -
 * sum_s p[s] dp[s]) (written to dlogit: the query, keys and bias gradients are products and sums of it, left to
 * BLAS), and dv[t] += p[t] go. dv is this item's own (zeroed here): the items run in parallel without atomics.
 * NV (channels / 8) is a constant so that the go vectors and the eight partial dot products stay in registers. */
INLINE void backward_item(const float *q, const float *keys, const float *bias, const float *vg, long vpix,
                          const float *gg, long gpix, float *dl, float *dvg, long dpix, int H, int W, int c, int k,
                          float *w, const int NV) {
    const int kk = k * k, nvec = kk / 8 * 8;
    for (long p = 0; p < (long)H * W; p++)
        for (int h = 0; h < NV; h++) _mm256_storeu_ps(dvg + p * dpix + 8 * h, _mm256_setzero_ps());
    for (int y = 0; y < H; y++) {
        const int sy = window_start(y, k, H);
        for (int x = 0; x < W; x++) {
            const long p = (long)y * W + x;
            const int sx = window_start(x, k, W);
            float *dlp = dl + p * kk;
            const float inv = 1.0f / window_exp(q + p * c, keys, bias + p * kk, c, kk, w);
            __m256 gv[4];
            for (int h = 0; h < NV; h++) gv[h] = _mm256_loadu_ps(gg + p * gpix + 8 * h);
            /* dp[a] = go . v[window pixel a] into dlp, eight taps at a time (their dot products reduced together) */
            long off[8];
            int a = 0, dy = 0, dx = 0;  /* tap a is window pixel (dy, dx) */
            for (; a + 8 <= nvec; a += 8) {
                for (int t = 0; t < 8; t++) {
                    off[t] = ((long)(sy + dy) * W + sx + dx) * vpix;
                    if (++dx == k) dx = 0, dy++;
                }
                const __m256 h01 = _mm256_hadd_ps(tap_dot(vg + off[0], gv, NV), tap_dot(vg + off[1], gv, NV));
                const __m256 h23 = _mm256_hadd_ps(tap_dot(vg + off[2], gv, NV), tap_dot(vg + off[3], gv, NV));
                const __m256 h45 = _mm256_hadd_ps(tap_dot(vg + off[4], gv, NV), tap_dot(vg + off[5], gv, NV));
                const __m256 h67 = _mm256_hadd_ps(tap_dot(vg + off[6], gv, NV), tap_dot(vg + off[7], gv, NV));
                const __m256 u0 = _mm256_hadd_ps(h01, h23), u1 = _mm256_hadd_ps(h45, h67);
                _mm256_storeu_ps(dlp + a, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                                        _mm256_permute2f128_ps(u0, u1, 0x31)));
            }
            for (; a < kk; a++) {
                dlp[a] = hsum(tap_dot(vg + ((long)(sy + dy) * W + sx + dx) * vpix, gv, NV));
                if (++dx == k) dx = 0, dy++;
            }
            /* p = w / sum (the padding lanes of w are 0), dot = p . dp, then dl = p * (dp - dot) */
            const __m256 sc = _mm256_set1_ps(inv);
            __m256 dotv = _mm256_setzero_ps();
            for (a = 0; a < nvec; a += 8) {
                const __m256 pa = _mm256_mul_ps(_mm256_loadu_ps(w + a), sc);
                _mm256_storeu_ps(w + a, pa);
                dotv = _mm256_fmadd_ps(pa, _mm256_loadu_ps(dlp + a), dotv);
            }
            float dot = hsum(dotv);
            for (; a < kk; a++) {
                w[a] *= inv;
                dot = fmaf(w[a], dlp[a], dot);
            }
            const __m256 dotb = _mm256_set1_ps(dot);
            for (a = 0; a < nvec; a += 8)
                _mm256_storeu_ps(dlp + a, _mm256_mul_ps(_mm256_loadu_ps(w + a),
                                                        _mm256_sub_ps(_mm256_loadu_ps(dlp + a), dotb)));
            for (; a < kk; a++) dlp[a] = w[a] * (dlp[a] - dot);
            /* dv[window pixel a] += p[a] * go */
            for (int wy = 0, t = 0; wy < k; wy++) {
                float *drow = dvg + ((long)(sy + wy) * W + sx) * dpix;
                for (int wx = 0; wx < k; wx++, t++) {
                    const __m256 pv = _mm256_set1_ps(w[t]);
                    float *dn = drow + (long)wx * dpix;
                    for (int h = 0; h < NV; h++)
                        _mm256_storeu_ps(dn + 8 * h, _mm256_fmadd_ps(pv, gv[h], _mm256_loadu_ps(dn + 8 * h)));
                }
            }
        }
    }
}

/* Backward of overlock_na2d_softmax_av_avx2 from the output gradient go (strided like v): the logit gradient
 * dlogit (B, G, H*W, k*k) contiguous and dv (strided). Returns -1 where the forward does, or for more than 32
 * channels. One work item per (sample, head). */
TARGET int overlock_na2d_softmax_av_backward_avx2(const float *q, const float *keys, const float *bias,
                                                  const float *v, const float *go, float *dlogit, float *dv, int B,
                                                  int G, int H, int W, int c, int C, int k, long vs_b, long vs_g,
                                                  long vs_p, long gs_b, long gs_g, long gs_p, long ds_b, long ds_g,
                                                  long ds_p) {
    const int kk = k * k;
    if (C % 8 || C > 32 || kk > MAX_TAPS || H < k || W < k) return -1;
    const long HW = (long)H * W;
    #pragma omp parallel
    {
        float w[MAX_TAPS + 8] __attribute__((aligned(32)));
        #pragma omp for schedule(static)
        for (long item = 0; item < (long)B * G; item++) {
            const int g = item % G;
            const long b = item / G;
#define ITEM(NV) backward_item(q + item * HW * c, keys + item * (long)c * kk, bias + (long)g * HW * kk,          \
                              v + b * vs_b + g * vs_g, vs_p, go + b * gs_b + g * gs_g, gs_p, dlogit + item * HW * kk, \
                              dv + b * ds_b + g * ds_g, ds_p, H, W, c, k, w, NV)
            switch (C / 8) { case 1: ITEM(1); break; case 2: ITEM(2); break; case 3: ITEM(3); break; default: ITEM(4); }
#undef ITEM
        }
    }
    return 0;
}
