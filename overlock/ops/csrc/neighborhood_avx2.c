/* ContMix's aggregation at inference, fused: for every pixel p of every head, the logits of its k x k window
 * (query . keys + bias), their softmax, and the softmax-weighted sum of the window's values, AVX2 + FMA.
 *
 * Why: in PyTorch these are three passes and, for maps that fit one tile, a dense (H*W x H*W) product that
 * spends 8x the needed multiply-adds on a 5x5 window of a 14x14 map; on a 2-core AVX2 CPU ContMix took about a
 * tenth of an overlock_t forward at batch 16. Here each pixel's logits stay in L1 and only its k*k neighbours
 * are read. Same function as ops/neighborhood.na2d_av(softmax(q @ keys + bias)) (NATTEN's window rule: the
 * window is centred on the pixel and shifted to stay inside the map near a border, never padded).
 *
 * Layout (float32): q (B, G, H*W, c), keys (B, G, c, k*k), v and out (B, G, H, W, C) addressed by element
 * strides (the last dimension contiguous); bias (G, H*W, k*k) contiguous, or at inference the position-bias
 * table and the projection's biases it is summed from. The backward takes q and keys contiguous.
 *
 * Training uses the same forward and the hand-written backward at the end of this file (the gradients of q, keys,
 * bias and v), which rebuilds each pixel's softmax weights instead of keeping them: in PyTorch the logits, the
 * softmax and a dense (H*W x H*W) weight matrix per head each went through memory in both passes.
 */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define TARGET __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline, target("avx2,fma")))

#include "exp_neg_avx2.h"         /* exp_neg: e^x for the softmax's shifted logits (x <= 0) */
#include "neighborhood_common.h" /* window_start, hsum, MAX_TAPS */

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

/* w[0 .. 8 nv) = exp(w - max), the max being that of the lanes of mx; returns the sum of the exponentials. */
INLINE float exp_shifted(float *w, int nv, __m256 mx) {
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

/* One pixel's window: w[0 .. kk) = exp(logit - max logit), padding lanes up to a multiple of 8 = 0; returns their
 * sum (the softmax weights are w / sum). */
INLINE float window_exp(const float *qp, const float *keys, long kst, const float *bp, int c, int kk, float *w) {
    const int nv = (kk + 7) / 8, full = kk / 8;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    int a = 0;
    for (; a + 4 <= full; a += 4) {  /* four logit vectors at a time: one broadcast of q[j] serves four FMAs */
        const float *kp = keys + a * 8;
        __m256 s0 = _mm256_loadu_ps(bp + a * 8), s1 = _mm256_loadu_ps(bp + a * 8 + 8);
        __m256 s2 = _mm256_loadu_ps(bp + a * 8 + 16), s3 = _mm256_loadu_ps(bp + a * 8 + 24);
        for (int j = 0; j < c; j++, kp += kst) {
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
                acc = _mm256_fmadd_ps(_mm256_set1_ps(qp[j]), _mm256_loadu_ps(keys + j * kst + a0), acc);
        } else {  /* tail: padding lanes get -inf (weight 0) */
            float tmp[8];
            for (int t = 0; t < 8; t++) {
                float s = -INFINITY;
                if (a0 + t < kk) {
                    s = bp[a0 + t];
                    for (int j = 0; j < c; j++) s = fmaf(qp[j], keys[j * kst + a0 + t], s);
                }
                tmp[t] = s;
            }
            acc = _mm256_loadu_ps(tmp);
        }
        _mm256_storeu_ps(w + a0, acc);
        mx = _mm256_max_ps(mx, acc);
    }
    return exp_shifted(w, nv, mx);
}

/* One pixel: logits into w[0 .. kk), softmax, weighted sum of the window's values into o (C channels). */
INLINE void pixel(const float *qp, const float *keys, long kst, const float *bp, const float *vg, long vpix, float *o,
                  int c, int kk, int k, int W, int sy, int sx, int C, float *w) {
    const float inv = 1.0f / window_exp(qp, keys, kst, bp, c, kk, w);
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

/* The logits of two pixels (queries q0, q1; bias rows b0, b1) into w0, w1 (padding lanes -inf): each logit the
 * same chain of FMAs as window_exp's, but every keys vector loaded once for both pixels. */
INLINE void logits_pair(const float *q0, const float *q1, const float *keys, long kst, const float *b0,
                        const float *b1, int c, int kk, float *w0, float *w1) {
    const int full = kk / 8;
    int a = 0;
    for (; a + 4 <= full; a += 4) {
        const float *kp = keys + a * 8;
        __m256 s[4], t[4];
        for (int u = 0; u < 4; u++) {
            s[u] = _mm256_loadu_ps(b0 + a * 8 + 8 * u);
            t[u] = _mm256_loadu_ps(b1 + a * 8 + 8 * u);
        }
        for (int j = 0; j < c; j++, kp += kst) {
            const __m256 x0 = _mm256_set1_ps(q0[j]), x1 = _mm256_set1_ps(q1[j]);
            for (int u = 0; u < 4; u++) {
                const __m256 kv = _mm256_loadu_ps(kp + 8 * u);
                s[u] = _mm256_fmadd_ps(x0, kv, s[u]);
                t[u] = _mm256_fmadd_ps(x1, kv, t[u]);
            }
        }
        for (int u = 0; u < 4; u++) {
            _mm256_storeu_ps(w0 + a * 8 + 8 * u, s[u]);
            _mm256_storeu_ps(w1 + a * 8 + 8 * u, t[u]);
        }
    }
    for (; a < full; a++) {
        __m256 s = _mm256_loadu_ps(b0 + a * 8), t = _mm256_loadu_ps(b1 + a * 8);
        for (int j = 0; j < c; j++) {
            const __m256 kv = _mm256_loadu_ps(keys + j * kst + a * 8);
            s = _mm256_fmadd_ps(_mm256_set1_ps(q0[j]), kv, s);
            t = _mm256_fmadd_ps(_mm256_set1_ps(q1[j]), kv, t);
        }
        _mm256_storeu_ps(w0 + a * 8, s);
        _mm256_storeu_ps(w1 + a * 8, t);
    }
    if (kk % 8) {  /* tail vector: padding lanes -inf (weight 0) */
        for (int e = 0; e < 8; e++) {
            float s = -INFINITY, t = -INFINITY;
            if (full * 8 + e < kk) {
                const int i = full * 8 + e;
                s = b0[i];
                t = b1[i];
                for (int j = 0; j < c; j++) {
                    s = fmaf(q0[j], keys[j * kst + i], s);
                    t = fmaf(q1[j], keys[j * kst + i], t);
                }
            }
            w0[full * 8 + e] = s;
            w1[full * 8 + e] = t;
        }
    }
}

/* w[0 .. kk) (padded to a multiple of 8) = exp(logit - max logit) in place; returns their sum (as window_exp). */
INLINE float softmax_exp(float *w, int kk) {
    const int nv = (kk + 7) / 8;
    __m256 mx = _mm256_loadu_ps(w);
    for (int a = 1; a < nv; a++) mx = _mm256_max_ps(mx, _mm256_loadu_ps(w + a * 8));
    return exp_shifted(w, nv, mx);
}

/* The weighted window sums of two horizontally adjacent pixels whose windows start SHIFT (0 or 1) columns apart:
 * each value vector is loaded once for both (column j is tap j of the first pixel's row and tap j - SHIFT of the
 * second's). CV vectors of 8 channels at c0; two accumulators per pixel and vector (column parity). */
INLINE void window_sum_pair(const float *vg, long vpix, const float *w0, const float *w1, int k, int W, int sy,
                            int sx, int c0, __m256 acc0[2][2], __m256 acc1[2][2], const int CV, const int SHIFT) {
    __m256 e0 = acc0[0][0], e1 = acc0[0][1], f0 = acc0[1][0], f1 = acc0[1][1];  /* first pixel: even, odd columns */
    __m256 g0 = acc1[0][0], g1 = acc1[0][1], h0 = acc1[1][0], h1 = acc1[1][1];  /* second pixel */
    const int n = k + SHIFT;
    for (int dy = 0; dy < k; dy++) {
        const float *row = vg + ((long)(sy + dy) * W + sx) * vpix + c0;
        const float *r0 = w0 + dy * k, *r1 = w1 + dy * k - SHIFT;
        /* column j: tap j of the first pixel (j < k), tap j - SHIFT of the second (j >= SHIFT) */
#define OVERLOCK_COLUMN(j, A0, A1, B0, B1)                                                          \
        {                                                                                       \
            const __m256 v0 = _mm256_loadu_ps(row + (long)(j) * vpix);                          \
            const __m256 v1 = CV == 2 ? _mm256_loadu_ps(row + (long)(j) * vpix + 8) : v0;       \
            if ((j) < k) {                                                                      \
                const __m256 a = _mm256_set1_ps(r0[j]);                                          \
                A0 = _mm256_fmadd_ps(a, v0, A0);                                                 \
                if (CV == 2) A1 = _mm256_fmadd_ps(a, v1, A1);                                    \
            }                                                                                   \
            if ((j) >= SHIFT) {                                                                 \
                const __m256 a = _mm256_set1_ps(r1[j]);                                          \
                B0 = _mm256_fmadd_ps(a, v0, B0);                                                 \
                if (CV == 2) B1 = _mm256_fmadd_ps(a, v1, B1);                                    \
            }                                                                                   \
        }
        int j = 0;
        for (; j + 2 <= n; j += 2) {
            OVERLOCK_COLUMN(j, e0, e1, g0, g1)
            OVERLOCK_COLUMN(j + 1, f0, f1, h0, h1)
        }
        if (j < n) OVERLOCK_COLUMN(j, e0, e1, g0, g1)
#undef OVERLOCK_COLUMN
    }
    acc0[0][0] = e0, acc0[0][1] = e1, acc0[1][0] = f0, acc0[1][1] = f1;
    acc1[0][0] = g0, acc1[0][1] = g1, acc1[1][0] = h0, acc1[1][1] = h1;
}

/* Two horizontally adjacent pixels (windows at sx and sx + shift, shift 0 or 1) into o0, o1. */
INLINE void pixel_pair(const float *q0, const float *q1, const float *keys, long kst, const float *b0,
                       const float *b1, const float *vg, long vpix, float *o0, float *o1, int c, int kk, int k, int W,
                       int sy, int sx, int shift, int C, float *w0, float *w1) {
    logits_pair(q0, q1, keys, kst, b0, b1, c, kk, w0, w1);
    const __m256 sc0 = _mm256_set1_ps(1.0f / softmax_exp(w0, kk)), sc1 = _mm256_set1_ps(1.0f / softmax_exp(w1, kk));
    for (int c0 = 0; c0 < C; c0 += 16) {
        const int cv = c0 + 16 <= C ? 2 : 1;
        __m256 acc0[2][2], acc1[2][2];
        for (int t = 0; t < 2; t++)
            for (int h = 0; h < 2; h++) acc0[t][h] = acc1[t][h] = _mm256_setzero_ps();
        if (cv == 2 && shift) window_sum_pair(vg, vpix, w0, w1, k, W, sy, sx, c0, acc0, acc1, 2, 1);
        else if (cv == 2) window_sum_pair(vg, vpix, w0, w1, k, W, sy, sx, c0, acc0, acc1, 2, 0);
        else if (shift) window_sum_pair(vg, vpix, w0, w1, k, W, sy, sx, c0, acc0, acc1, 1, 1);
        else window_sum_pair(vg, vpix, w0, w1, k, W, sy, sx, c0, acc0, acc1, 1, 0);
        for (int h = 0; h < cv; h++) {
            _mm256_storeu_ps(o0 + c0 + 8 * h, _mm256_mul_ps(_mm256_add_ps(acc0[0][h], acc0[1][h]), sc0));
            _mm256_storeu_ps(o1 + c0 + 8 * h, _mm256_mul_ps(_mm256_add_ps(acc1[0][h], acc1[1][h]), sc1));
        }
    }
}

/* neighborhood_avx512.c: the pixel pairs of softmax_av_row with 512-bit vectors (same bits), where C is a multiple
 * of 16 and the CPU has AVX-512F; returns the number of pixels done (0: none). */
int overlock_softmax_av_pairs_avx512(const float *q, long qs_p, const float *keys, long kst, const float *brow,
                                     const float *vg, long vs_p, float *orow, long os_p, int y, int H, int W, int c,
                                     int C, int k, float *w0, float *w1);

/* One row y of one (sample, head) with a k x k window: queries q (pixel stride qs_p), keys (row stride kst), the
 * row's biases brow (k*k per pixel), values vg and outputs orow (pixel strides vs_p, os_p). */
INLINE void softmax_av_row(const float *q, long qs_p, const float *keys, long kst, const float *brow,
                           const float *vg, long vs_p, float *orow, long os_p, int y, int H, int W, int c, int C,
                           int k, float *w, float *w1) {
    const int kk = k * k, sy = window_start(y, k, H);
    int x = overlock_softmax_av_pairs_avx512(q, qs_p, keys, kst, brow, vg, vs_p, orow, os_p, y, H, W, c, C, k, w, w1);
    for (; x + 2 <= W; x += 2) {  /* pixel pairs: the keys and the window's values read once for both */
        const int sx = window_start(x, k, W);
        pixel_pair(q + x * qs_p, q + (x + 1) * qs_p, keys, kst, brow + (long)x * kk, brow + (long)(x + 1) * kk, vg,
                   vs_p, orow + x * os_p, orow + (x + 1) * os_p, c, kk, k, W, sy, sx,
                   window_start(x + 1, k, W) - sx, C, w, w1);
    }
    if (x < W)
        pixel(q + x * qs_p, keys, kst, brow + (long)x * kk, vg, vs_p, orow + x * os_p, c, kk, k, W, sy,
              window_start(x, k, W), C, w);
}

/* Table mode: the k*k logit biases of every pixel of row y of one head, the relative position bias of each window
 * offset plus the projection's bias, table[sy + dy - y + k - 1][sx + dx - x + k - 1] + pb[dy * k + dx] (the sum
 * contmix.window_biases keeps per pixel: same bits), into out (W * k * k). */
TARGET static void row_biases(const float *table, const float *pb, float *out, int y, int H, int W, int k) {
    const int span = 2 * k - 1, kk = k * k, sy = window_start(y, k, H);
    const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(k % 8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int x = 0; x < W; x++) {
        const int sx = window_start(x, k, W);
        for (int dy = 0; dy < k; dy++) {
            const float *t = table + (long)(sy + dy - y + k - 1) * span + (sx - x + k - 1), *p = pb + dy * k;
            float *o = out + (long)x * kk + dy * k;
            int dx = 0;
            for (; dx + 8 <= k; dx += 8)
                _mm256_storeu_ps(o + dx, _mm256_add_ps(_mm256_loadu_ps(t + dx), _mm256_loadu_ps(p + dx)));
            if (dx < k)
                _mm256_maskstore_ps(o + dx, tail, _mm256_add_ps(_mm256_maskload_ps(t + dx, tail),
                                                                _mm256_maskload_ps(p + dx, tail)));
        }
    }
}

/* Both halves of ContMix's aggregation in one parallel pass (k1 = 0: the first only): half h aggregates values
 * v + h * vs_h with kernel k_h, keys keys_h and biases bias_h (G, H*W, k_h^2, contiguous) into out + h * os_h.
 * Table mode (pb0 not NULL): bias_h is the position-bias table (G, 2 k_h - 1, 2 k_h - 1) and pb_h the projection's
 * k_h^2 biases; each row's biases are summed here (row_biases) instead of read from a per-pixel array that is
 * k_h^2 floats per pixel and head (1.2 MB per overlock_t block at 224, most of the bytes the kernel read).
 * q (B, G, H*W, c), keys_h (B, G, c, k_h^2), v and out (B, G, H, W, C) are addressed by element strides (the
 * last dimension contiguous), so the NHWC views of the query GEMM's output and of the keys product need no copy.
 * A work item is one row of one head, both halves: the threads get equal shares of the small and large windows.
 * Returns 0, or -1 for an unsupported shape (C not a multiple of 8, more than MAX_TAPS taps, map < k). */
TARGET int overlock_na2d_softmax_av_avx2(const float *q, long qs_b, long qs_g, long qs_p, const float *keys0,
                                         const float *keys1, long ks_b, long ks_g, long ks_j, const float *bias0,
                                         const float *bias1, const float *pb0, const float *pb1, const float *v,
                                         long vs_h, long vs_b, long vs_g, long vs_p, float *out, long os_h, long os_b,
                                         long os_g, long os_p, int B, int G, int H, int W, int c, int C, int k0,
                                         int k1) {
    const int km = k0 > k1 ? k0 : k1;
    if (C % 8 || k0 < 1 || km * km > MAX_TAPS || H < km || W < km) return -1;
    const long HW = (long)H * W;
    int failed = 0;
    #pragma omp parallel
    {
        float w[MAX_TAPS + 8] __attribute__((aligned(32))), w1[MAX_TAPS + 8] __attribute__((aligned(32)));
        float *rb = pb0 ? malloc(sizeof(float) * W * km * km) : NULL;  /* table mode: one row's biases */
        if (pb0 && !rb) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (long item = 0; item < (long)B * G * H; item++) {
            if (pb0 && !rb) continue;
            const int y = item % H, g = (item / H) % G;
            const long b = item / H / G;
            const float *qrow = q + b * qs_b + g * qs_g + (long)y * W * qs_p;
            const long vo = b * vs_b + g * vs_g, oo = b * os_b + g * os_g + (long)y * W * os_p;
            for (int h = 0; h < (k1 ? 2 : 1); h++) {
                const int k = h ? k1 : k0, span = 2 * k - 1;
                const float *bias = h ? bias1 : bias0, *brow = bias + ((long)g * HW + (long)y * W) * k * k;
                if (pb0) {
                    row_biases(bias + (long)g * span * span, h ? pb1 : pb0, rb, y, H, W, k);
                    brow = rb;
                }
                softmax_av_row(qrow, qs_p, (h ? keys1 : keys0) + b * ks_b + g * ks_g, ks_j, brow, v + h * vs_h + vo,
                               vs_p, out + h * os_h + oo, os_p, y, H, W, c, C, k, w, w1);
            }
        }
        free(rb);
    }
    return failed ? -2 : 0;
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
                          float *w, long *rel, const int NV) {
    const int kk = k * k, nvec = kk / 8 * 8;
    for (long p = 0; p < (long)H * W; p++)
        for (int h = 0; h < NV; h++) _mm256_storeu_ps(dvg + p * dpix + 8 * h, _mm256_setzero_ps());
    for (int dy = 0, t = 0; dy < k; dy++)  /* tap t's value, relative to the window's first pixel */
        for (int dx = 0; dx < k; dx++, t++) rel[t] = ((long)dy * W + dx) * vpix;
    for (int y = 0; y < H; y++) {
        const int sy = window_start(y, k, H);
        for (int x = 0; x < W; x++) {
            const long p = (long)y * W + x;
            const int sx = window_start(x, k, W);
            float *dlp = dl + p * kk;
            const float inv = 1.0f / window_exp(q + p * c, keys, kk, bias + p * kk, c, kk, w);
            __m256 gv[4];
            for (int h = 0; h < NV; h++) gv[h] = _mm256_loadu_ps(gg + p * gpix + 8 * h);
            /* dp[a] = go . v[window pixel a] into dlp, eight taps at a time (their dot products reduced together) */
            const float *v0 = vg + ((long)sy * W + sx) * vpix;
            int a = 0;
            for (; a + 8 <= nvec; a += 8) {
                const long *o = rel + a;
                const __m256 h01 = _mm256_hadd_ps(tap_dot(v0 + o[0], gv, NV), tap_dot(v0 + o[1], gv, NV));
                const __m256 h23 = _mm256_hadd_ps(tap_dot(v0 + o[2], gv, NV), tap_dot(v0 + o[3], gv, NV));
                const __m256 h45 = _mm256_hadd_ps(tap_dot(v0 + o[4], gv, NV), tap_dot(v0 + o[5], gv, NV));
                const __m256 h67 = _mm256_hadd_ps(tap_dot(v0 + o[6], gv, NV), tap_dot(v0 + o[7], gv, NV));
                const __m256 u0 = _mm256_hadd_ps(h01, h23), u1 = _mm256_hadd_ps(h45, h67);
                _mm256_storeu_ps(dlp + a, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                                        _mm256_permute2f128_ps(u0, u1, 0x31)));
            }
            for (; a < kk; a++) dlp[a] = hsum(tap_dot(v0 + rel[a], gv, NV));
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
        long rel[MAX_TAPS];
        #pragma omp for schedule(static)
        for (long item = 0; item < (long)B * G; item++) {
            const int g = item % G;
            const long b = item / G;
#define ITEM(NV) backward_item(q + item * HW * c, keys + item * (long)c * kk, bias + (long)g * HW * kk,          \
                              v + b * vs_b + g * vs_g, vs_p, go + b * gs_b + g * gs_g, gs_p, dlogit + item * HW * kk, \
                              dv + b * ds_b + g * ds_g, ds_p, H, W, c, k, w, rel, NV)
            switch (C / 8) { case 1: ITEM(1); break; case 2: ITEM(2); break; case 3: ITEM(3); break; default: ITEM(4); }
#undef ITEM
        }
    }
    return 0;
}
