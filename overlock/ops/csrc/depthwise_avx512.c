/* The large-kernel loop of depthwise_avx2.c's forward, and its weight gradient, with 512-bit vectors, for CPUs with
 * AVX-512F.
 *
 * Why: on an AVX-512 Xeon (2 cores) the 256-bit loop ran 13x13-17x17 kernels at about 80 G taps/s, below oneDNN's
 * 512-bit kernels (17x17 on 8x64x56x56: 5.7 against 3.4 ms), while every other hand-written kernel (weight
 * gradients, ContMix, GRN) beat PyTorch's there. One vector per block of 16 channels, two output rows (yy and
 * yy + dilation) per work item, so each input vector loaded serves both (17x17: 3.4 ms, 15x15 on 8x128x28x28 1.3,
 * level with oneDNN; 13x13, the dilated kernels and the 5x5-7x7 of the 14x14 maps up to 2.7x faster than it).
 * Every output still starts from its bias and adds one fused multiply-add per tap in row-major tap order, as the
 * 256-bit loop does: the same bits, so a model gives one answer on both kinds of CPU.
 */
#include <immintrin.h>
#include <string.h>

#include "depthwise_common.h" /* first_tap, wgrad_passes: the cuts of depthwise_avx2.c */

#define INLINE512 static inline __attribute__((always_inline, target("avx512f")))
#define TILE512 12

/* NT pixels from x0 of an output row, channels c0 .. c0 + 15 (as tile() in depthwise_avx2.c). */
INLINE512 void tile16(const float *img, int y0, long rstride, const float *w, const float *bias, float *out, int C,
                      int W, int kw, int pw, int d, int ky0, int ky1, int kx0, int kx1, int x0, int c0, const int NT,
                      const int CHECK, int add) {
    __m512 acc[TILE512];
    const __m512 b = bias ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
    for (int i = 0; i < NT; i++)
        acc[i] = add ? (bias ? _mm512_add_ps(_mm512_loadu_ps(out + (long)i * C + c0), b)
                             : _mm512_loadu_ps(out + (long)i * C + c0)) : b;
    for (int ky = ky0; ky < ky1; ky++) {
        const float *row = img + (long)(y0 + ky * d) * rstride + c0;
        const float *wrow = w + (long)ky * kw * C + c0;
        for (int kx = kx0; kx < kx1; kx++) {
            const __m512 wv = _mm512_loadu_ps(wrow + (long)kx * C);
            const int col = x0 + kx * d - pw;
            for (int i = 0; i < NT; i++) {
                if (CHECK && (unsigned)(col + i) >= (unsigned)W) continue;
                acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(row + (long)(col + i) * C), wv, acc[i]);
            }
        }
    }
    for (int i = 0; i < NT; i++) _mm512_storeu_ps(out + (long)i * C + c0, acc[i]);
}

#define T16(NT, CHECK) tile16(img, y0, rstride, w, bias, out + (long)x0 * C, C, W, kw, pw, d, ky0, ky1, kx0, kx1, \
                              x0, c0, NT, CHECK, add)
#define T16S(CHECK) switch (nt) {                                                                      \
    case 12: T16(12, CHECK); break; case 11: T16(11, CHECK); break; case 10: T16(10, CHECK); break;    \
    case 9: T16(9, CHECK); break; case 8: T16(8, CHECK); break; case 7: T16(7, CHECK); break;          \
    case 6: T16(6, CHECK); break; case 5: T16(5, CHECK); break; case 4: T16(4, CHECK); break;          \
    case 3: T16(3, CHECK); break; case 2: T16(2, CHECK); break; default: T16(1, CHECK); }

/* 0: the 256-bit loop everywhere (tests compare the two); set through overlock_depthwise_avx512_set. */
static int use_avx512 = 1;

/* Turns the 512-bit loop on (1) or off (0); returns the previous setting. */
int overlock_depthwise_avx512_set(int on) {
    const int was = use_avx512;
    use_avx512 = on;
    return was;
}

INLINE512 void row_block16(const float *img, int y0, long rstride, const float *w, const float *bias, float *out,
                           int C, int W, int kw, int pw, int d, int ky0, int ky1, int c0, int add) {
    for (int x0 = 0; x0 < W; x0 += TILE512) {
        const int nt = W - x0 < TILE512 ? W - x0 : TILE512;
        const int kx0 = first_tap(pw - x0 - nt + 1, d), hi = first_tap(W + pw - x0, d);
        const int kx1 = hi < kw ? hi : kw;
        if (x0 - pw < 0 || x0 + nt - 1 + (kw - 1) * d - pw >= W) {
            T16S(1)
        } else {
            T16S(0)
        }
    }
}

/* Two output rows at once: out rows yy (a) and yy + d (b) read the same input rows, row t of the window of a being
 * row t - 1 of b's, so each input vector loaded serves two multiply-adds. Each output still takes
 * its taps in row-major order: the same bits as tile16. Tap rows [ta0, ta1) of a and [tb0, tb1) of b, numbered in
 * a's window. */
#define PAIR512 6

INLINE512 void tile16x2(const float *img, int ya, long rstride, const float *w, const float *bias, float *outa,
                        float *outb, int C, int W, int kw, int pw, int d, int ta0, int ta1, int tb0, int tb1, int kx0,
                        int kx1, int x0, int c0, const int NT, const int CHECK, int add) {
    __m512 a[PAIR512], b[PAIR512];
    const __m512 bv = bias ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
    for (int i = 0; i < NT; i++) {
        a[i] = add ? (bias ? _mm512_add_ps(_mm512_loadu_ps(outa + (long)i * C + c0), bv)
                           : _mm512_loadu_ps(outa + (long)i * C + c0)) : bv;
        b[i] = add ? (bias ? _mm512_add_ps(_mm512_loadu_ps(outb + (long)i * C + c0), bv)
                           : _mm512_loadu_ps(outb + (long)i * C + c0)) : bv;
    }
    const int t0 = ta0 < tb0 ? ta0 : tb0, t1 = ta1 > tb1 ? ta1 : tb1;
    for (int t = t0; t < t1; t++) {
        const int ina = t >= ta0 && t < ta1, inb = t >= tb0 && t < tb1;
        const float *row = img + (long)(ya + t * d) * rstride + c0;
        const float *wa = w + (long)t * kw * C + c0, *wb = w + (long)(t - 1) * kw * C + c0;
        if (ina && inb) {
            for (int kx = kx0; kx < kx1; kx++) {
                const __m512 va = _mm512_loadu_ps(wa + (long)kx * C), vb = _mm512_loadu_ps(wb + (long)kx * C);
                const int col = x0 + kx * d - pw;
                for (int i = 0; i < NT; i++) {
                    if (CHECK && (unsigned)(col + i) >= (unsigned)W) continue;
                    const __m512 v = _mm512_loadu_ps(row + (long)(col + i) * C);
                    a[i] = _mm512_fmadd_ps(v, va, a[i]);
                    b[i] = _mm512_fmadd_ps(v, vb, b[i]);
                }
            }
        } else {
            const float *wt = ina ? wa : wb;
            for (int kx = kx0; kx < kx1; kx++) {
                const __m512 vw = _mm512_loadu_ps(wt + (long)kx * C);
                const int col = x0 + kx * d - pw;
                for (int i = 0; i < NT; i++) {
                    if (CHECK && (unsigned)(col + i) >= (unsigned)W) continue;
                    const __m512 v = _mm512_loadu_ps(row + (long)(col + i) * C);
                    if (ina) a[i] = _mm512_fmadd_ps(v, vw, a[i]);
                    else b[i] = _mm512_fmadd_ps(v, vw, b[i]);
                }
            }
        }
    }
    for (int i = 0; i < NT; i++) {
        _mm512_storeu_ps(outa + (long)i * C + c0, a[i]);
        _mm512_storeu_ps(outb + (long)i * C + c0, b[i]);
    }
}

#define P16(NT, CHECK) tile16x2(img, ya, rstride, w, bias, outa + (long)x0 * C, outb + (long)x0 * C, C, W, kw, pw, \
                                d, ta0, ta1, tb0, tb1, kx0, kx1, x0, c0, NT, CHECK, add)
#define P16S(CHECK) switch (nt) {                                                                      \
    case 12: P16(12, CHECK); break; case 11: P16(11, CHECK); break; case 10: P16(10, CHECK); break;    \
    case 9: P16(9, CHECK); break; case 8: P16(8, CHECK); break; case 7: P16(7, CHECK); break;          \
    case 6: P16(6, CHECK); break; case 5: P16(5, CHECK); break; case 4: P16(4, CHECK); break;          \
    case 3: P16(3, CHECK); break; case 2: P16(2, CHECK); break; default: P16(1, CHECK); }

INLINE512 void row_pair16(const float *img, int ya, long rstride, const float *w, const float *bias, float *outa,
                          float *outb, int C, int W, int kw, int pw, int d, int ta0, int ta1, int tb0, int tb1, int c0,
                          int add) {
    for (int x0 = 0; x0 < W; x0 += PAIR512) {
        const int nt = W - x0 < PAIR512 ? W - x0 : PAIR512;
        const int kx0 = first_tap(pw - x0 - nt + 1, d), hi = first_tap(W + pw - x0, d);
        const int kx1 = hi < kw ? hi : kw;
        if (x0 - pw < 0 || x0 + nt - 1 + (kw - 1) * d - pw >= W) {
            P16S(1)
        } else {
            P16S(0)
        }
    }
}

/* Whether the 512-bit loops run here: switched on, and a CPU with AVX-512F. */
int overlock_avx512_usable(void) {
    return use_avx512 && __builtin_cpu_supports("avx512f");
}

/* overlock_depthwise_add_avx2's large-kernel case (same arguments, same bits) where C is a multiple of 16 and the
 * CPU has AVX-512F; returns -1 otherwise (the caller then runs the 256-bit loop). */
__attribute__((target("avx512f")))
int overlock_depthwise_rows_avx512(const float *x, const float *w, const float *bias, float *y, int N, int H, int W,
                                   int C, int kh, int kw, int d, int add) {
    if (C % 16 || !overlock_avx512_usable()) return -1;
    const int ph = d * (kh / 2), pw = d * (kw / 2), nblocks = C / 16;
    const long rstride = (long)W * C;
    /* rows yy and yy + d in pairs (tile16x2): blocks of 2d rows, the first d of each paired with the next d */
    const int blocks = (H + 2 * d - 1) / (2 * d), per_image = blocks * d;
    #pragma omp parallel for schedule(static)
    for (long item = 0; item < (long)N * per_image * nblocks; item++) {
        const int cb = item % nblocks, q = (item / nblocks) % per_image;
        const long n = item / nblocks / per_image;
        const int yy = q / d * 2 * d + q % d;
        if (yy >= H) continue;
        const float *img = x + n * H * rstride;
        float *out = y + (n * H + yy) * rstride;
        const int ta0 = first_tap(ph - yy, d), ta_end = first_tap(H - yy + ph, d);
        const int ta1 = ta_end < kh ? ta_end : kh;
        if (yy + d >= H) {
            row_block16(img, yy - ph, rstride, w, bias, out, C, W, kw, pw, d, ta0, ta1, cb * 16, add);
            continue;
        }
        /* row yy + d's taps [kb0, kb1) are taps kb0 + 1 .. kb1 of row yy's window */
        const int kb0 = first_tap(ph - yy - d, d), kb_end = first_tap(H - yy - d + ph, d);
        const int kb1 = kb_end < kh ? kb_end : kh;
        row_pair16(img, yy - ph, rstride, w, bias, out, out + d * rstride, C, W, kw, pw, d, ta0, ta1, kb0 + 1, kb1 + 1,
                   cb * 16, add);
    }
    return 0;
}

/* The weight gradient's loop of depthwise_avx2.c (wgrad_row, wgrad_rows) for a block of 16 channels, one vector per
 * tap and up to 17 taps of a row per pass instead of 6: each output-gradient load serves more taps. Each tap's
 * products are added in the same order (increasing output pixel), so the sums have the same bits. */
#define WTILE512 17

INLINE512 void wgrad_row16(const float *xr, const float *gr, float *acc, int C, int W, int pw, int d, int kx0, int c0,
                           const int NT) {
    __m512 a[WTILE512];
    for (int t = 0; t < NT; t++) a[t] = _mm512_loadu_ps(acc + t * 16);
    const int first = kx0 * d, last = (kx0 + NT - 1) * d;
    int from[3], to[3];
    wgrad_passes(W, pw, first, last, from, to);
    for (int pass = 0; pass < 3; pass++) {
        for (int xx = from[pass]; xx < to[pass]; xx++) {
            const __m512 gv = _mm512_loadu_ps(gr + (long)xx * C + c0);
            const int col = xx + first - pw;
            for (int t = 0; t < NT; t++) {
                if (pass != 1 && (unsigned)(col + t * d) >= (unsigned)W) continue;
                a[t] = _mm512_fmadd_ps(_mm512_loadu_ps(xr + (long)(col + t * d) * C + c0), gv, a[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) _mm512_storeu_ps(acc + t * 16, a[t]);
}

#define W16(NT) wgrad_row16(xr, gr, arow + kx0 * 16, C, W, pw, d, kx0, c0, NT)

/* wgrad_row16 for two output-gradient rows that meet the same input row (dilation 1): taps of tap row A from g
 * row ga, of tap row B from gb, the input vector loaded once for both. */
#define WPAIR512 8

INLINE512 void wgrad_row16x2(const float *xr, const float *ga, const float *gb, float *acca, float *accb, int C,
                             int W, int pw, int kx0, int c0, const int NT) {
    __m512 a[WPAIR512], b[WPAIR512];
    for (int t = 0; t < NT; t++) {
        a[t] = _mm512_loadu_ps(acca + t * 16);
        b[t] = _mm512_loadu_ps(accb + t * 16);
    }
    const int first = kx0, last = kx0 + NT - 1;
    int from[3], to[3];
    wgrad_passes(W, pw, first, last, from, to);
    for (int pass = 0; pass < 3; pass++) {
        for (int xx = from[pass]; xx < to[pass]; xx++) {
            const __m512 gva = _mm512_loadu_ps(ga + (long)xx * C + c0), gvb = _mm512_loadu_ps(gb + (long)xx * C + c0);
            const int col = xx + first - pw;
            for (int t = 0; t < NT; t++) {
                if (pass != 1 && (unsigned)(col + t) >= (unsigned)W) continue;
                const __m512 v = _mm512_loadu_ps(xr + (long)(col + t) * C + c0);
                a[t] = _mm512_fmadd_ps(v, gva, a[t]);
                b[t] = _mm512_fmadd_ps(v, gvb, b[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) {
        _mm512_storeu_ps(acca + t * 16, a[t]);
        _mm512_storeu_ps(accb + t * 16, b[t]);
    }
}

#define WP16(NT) wgrad_row16x2(xr, ga, gb, arow + kx0 * 16, brow + kx0 * 16, C, W, pw, kx0, c0, NT)

/* All tap tiles of one input row xr: tap row arow's from g row ga and, if brow, tap row brow's from gb. */
INLINE512 void wgrad_input_row(const float *xr, const float *ga, const float *gb, float *arow, float *brow, int C,
                               int W, int kw, int pw, int d, int c0) {
    if (brow) {
        for (int kx0 = 0; kx0 < kw; kx0 += WPAIR512) {
            switch (kw - kx0 < WPAIR512 ? kw - kx0 : WPAIR512) {
            case 8: WP16(8); break; case 7: WP16(7); break; case 6: WP16(6); break; case 5: WP16(5); break;
            case 4: WP16(4); break; case 3: WP16(3); break; case 2: WP16(2); break; default: WP16(1);
            }
        }
        return;
    }
    const float *gr = ga;
    for (int kx0 = 0; kx0 < kw; kx0 += WTILE512) {
        switch (kw - kx0 < WTILE512 ? kw - kx0 : WTILE512) {
        case 17: W16(17); break; case 16: W16(16); break; case 15: W16(15); break; case 14: W16(14); break;
        case 13: W16(13); break; case 12: W16(12); break; case 11: W16(11); break; case 10: W16(10); break;
        case 9: W16(9); break; case 8: W16(8); break; case 7: W16(7); break; case 6: W16(6); break;
        case 5: W16(5); break; case 4: W16(4); break; case 3: W16(3); break; case 2: W16(2); break;
        default: W16(1);
        }
    }
}

/* Every tap of the block of channels c0 .. c0 + 15 over rows [y0, y1) of image n, into acc (kh * kw * 16 floats,
 * zeroed here): the work item of overlock_depthwise_wgrad_avx2. Undilated kernels take the output-gradient rows in
 * pairs: an input row that meets both serves tap row ky of the first and ky - 1 of the second in one pass. Each tap
 * still adds its products row by row, pixel by pixel, in the order of the 256-bit loop: the same bits. */
__attribute__((target("avx512f")))
void overlock_wgrad_rows_avx512(const float *x, const float *g, float *acc, long n, int y0, int y1, int H, int W,
                                int C, int kh, int kw, int d, int c0) {
    const int ph = d * (kh / 2), pw = d * (kw / 2);
    const long rs = (long)W * C;
    memset(acc, 0, sizeof(float) * kh * kw * 16);
    int y = y0;
    if (d == 1)
        for (; y + 1 < y1; y += 2) {
            const float *ga = g + (n * H + y) * rs, *gb = ga + rs;
            const int r0 = y - ph > 0 ? y - ph : 0, r1 = y + 1 + ph < H - 1 ? y + 1 + ph : H - 1;
            for (int r = r0; r <= r1; r++) {
                const int ka = r - y + ph, kb = ka - 1;
                const float *xr = x + (n * H + r) * rs;
                if (ka < kh && kb >= 0)
                    wgrad_input_row(xr, ga, gb, acc + (long)ka * kw * 16, acc + (long)kb * kw * 16, C, W, kw, pw, 1,
                                    c0);
                else if (ka < kh)
                    wgrad_input_row(xr, ga, NULL, acc + (long)ka * kw * 16, NULL, C, W, kw, pw, 1, c0);
                else
                    wgrad_input_row(xr, gb, NULL, acc + (long)kb * kw * 16, NULL, C, W, kw, pw, 1, c0);
            }
        }
    for (; y < y1; y++) {
        const float *gr = g + (n * H + y) * rs;
        for (int ky = first_tap(ph - y, d); ky < kh; ky++) {
            const int yin = y + ky * d - ph;
            if (yin >= H) break;
            wgrad_input_row(x + (n * H + yin) * rs, gr, NULL, acc + (long)ky * kw * 16, NULL, C, W, kw, pw, d, c0);
        }
    }
}
