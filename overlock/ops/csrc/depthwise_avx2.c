/* Stride-1 "same" depthwise convolution for float32 channels_last maps, AVX2 + FMA.
 *
 * Why: on AVX2 CPUs oneDNN runs OverLoCK's large depthwise kernels (13x13 to 17x17) at about 22 G taps/s on
 * two cores and its small 3x3 ones on 14x14 maps mostly in overhead; this loop nest runs them about twice as
 * fast (figures: benchmarks/README.md). It is loaded through ctypes by overlock/ops/native.py, which compiles it
 * on first use and links it to the OpenMP runtime PyTorch already loaded (one thread pool, torch's thread count).
 *
 * Layout: x and y are (N, H, W, C) in memory, w is (kh, kw, C), bias is (C) or NULL. Dilation d (taps d pixels
 * apart), zero padding d * (kh/2), d * (kw/2): the dilated branches of the re-parameterizable blocks run here on
 * the map itself instead of as undilated convs on d*d copied sub-maps.
 * Each work item is one output row of one block of 16 (or 8) channels (a row's blocks are neighbours in the
 * work order, so the threads stream through memory); a tile of up to 6 output pixels of it
 * is accumulated in registers over every tap that can land on the map, so each weight vector load serves 6
 * multiply-adds and each output is stored once. Taps that fall on the padding are skipped, never read. Kernels of
 * at most 9 taps (memory-bound) take one output row per item instead, every channel block of each tile in turn.
 */
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gelu_avx2.h" /* gelu8: the GELU epilogue, the bits of the GELU kernel */
#include "depthwise_common.h" /* first_tap, wgrad_passes */

/* gelu_avx512.c: the same GELU and gradient on a prefix of whole 16-lane vectors (same bits) where the CPU has
 * AVX-512F; they return its length (0 elsewhere) */
long overlock_gelu_span_avx512(const float *x, float *out, long n, int parallel);
long overlock_gelu_grad_span_avx512(const float *g, const float *x, float *out, long n, int parallel);

#define INLINE static inline __attribute__((always_inline, target("avx2,fma")))
#define MAX_TILE 6

/* NT pixels from x0 of output row yy, channels c0 .. c0 + 8 * CV; tap row ky reads input row y0 + ky * d of `img`;
 * CHECK: some tap columns of this tile fall outside [0, W) and are skipped one by one. */
INLINE void tile(const float *img, int y0, long rstride, const float *w, const float *bias, float *out, int C, int W,
                 int kw, int pw, int d, int ky0, int ky1, int kx0, int kx1, int x0, int c0, const int NT,
                 const int CV, const int CHECK, int add) {
    __m256 acc[MAX_TILE][2];
    for (int v = 0; v < CV; v++) {
        const __m256 b = bias ? _mm256_loadu_ps(bias + c0 + 8 * v) : _mm256_setzero_ps();
        for (int i = 0; i < NT; i++)  /* add: start from what the output holds (plus the bias, if any) */
            acc[i][v] = add ? (bias ? _mm256_add_ps(_mm256_loadu_ps(out + (long)i * C + c0 + 8 * v), b)
                                    : _mm256_loadu_ps(out + (long)i * C + c0 + 8 * v)) : b;
    }
    for (int ky = ky0; ky < ky1; ky++) {
        const float *row = img + (long)(y0 + ky * d) * rstride + c0;
        const float *wrow = w + (long)ky * kw * C + c0;
        for (int kx = kx0; kx < kx1; kx++) {
            __m256 wv[2];
            for (int v = 0; v < CV; v++) wv[v] = _mm256_loadu_ps(wrow + (long)kx * C + 8 * v);
            const int col = x0 + kx * d - pw;
            for (int i = 0; i < NT; i++) {
                if (CHECK && (unsigned)(col + i) >= (unsigned)W) continue;
                for (int v = 0; v < CV; v++)
                    acc[i][v] = _mm256_fmadd_ps(_mm256_loadu_ps(row + (long)(col + i) * C + 8 * v), wv[v],
                                                acc[i][v]);
            }
        }
    }
    for (int i = 0; i < NT; i++)
        for (int v = 0; v < CV; v++) _mm256_storeu_ps(out + (long)i * C + c0 + 8 * v, acc[i][v]);
}

#define TILE(NT, CHECK) tile(img, y0, rstride, w, bias, out + (long)x0 * C, C, W, kw, pw, d, ky0, ky1, kx0, kx1, \
                             x0, c0, NT, CV, CHECK, add)
#define TILES(CHECK) switch (nt) {                                                        \
    case 6: TILE(6, CHECK); break; case 5: TILE(5, CHECK); break; case 4: TILE(4, CHECK); break; \
    case 3: TILE(3, CHECK); break; case 2: TILE(2, CHECK); break; default: TILE(1, CHECK); }

INLINE void row_block(const float *img, int y0, long rstride, const float *w, const float *bias, float *out, int C,
                      int W, int kw, int pw, int d, int ky0, int ky1, int c0, const int CV, int add) {
    for (int x0 = 0; x0 < W; x0 += MAX_TILE) {
        const int nt = W - x0 < MAX_TILE ? W - x0 : MAX_TILE;
        /* the taps that land inside the map for at least one pixel of the tile: x0 + kx*d - pw in
           [1 - nt, W - 1] */
        const int kx0 = first_tap(pw - x0 - nt + 1, d), hi = first_tap(W + pw - x0, d), kx1 = hi < kw ? hi : kw;
        if (x0 - pw < 0 || x0 + nt - 1 + (kw - 1) * d - pw >= W) {
            TILES(1)
        } else {
            TILES(0)
        }
    }
}

/* A LayerNorm over the channels of the pixels just written (the fused inference blocks' conv-then-norm pairs):
 * out row offset, weight, bias, eps. */
struct norm {
    float *out;  /* NULL: GELU in place instead (gelu_avx2.h's gelu8 on each vector of 8 channels) */
    const float *weight, *bias;
    float eps;
    float *squares;  /* non-NULL: neither; add each channel's sum of squares over the tile here instead */
    const float *gelu_of;  /* non-NULL: none of those; multiply by GELU'(gelu_of) instead (GELU's backward) */
    const float *id_scale, *id_shift;  /* with out: then the conv output y <- y * id_scale + id_shift (either may
                                          be NULL), the residual branch's identity prepared in the same pass */
};

/* LayerNorm of n pixels of C channels (C a multiple of 8) from src (still in L1) into dst: mean, then the mean
 * of squared deviations (two passes, as a float32 LayerNorm), then (x - mean) / sqrt(var + eps) * weight + bias.
 * The two sums run four vectors at a time in independent chains (one chain was bound by the adds' latency:
 * 384 channels, 196 pixels 20 -> 10 us over the conv alone). */
INLINE void layer_norm_pixels(const float *src, float *dst, int n, int C, const struct norm *ln) {
    const int C4 = C & ~31;
    for (int i = 0; i < n; i++) {
        const float *p = src + (long)i * C;
        float *q = dst + (long)i * C;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int c = 0;
        for (; c < C4; c += 32) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(p + c));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(p + c + 8));
            s2 = _mm256_add_ps(s2, _mm256_loadu_ps(p + c + 16));
            s3 = _mm256_add_ps(s3, _mm256_loadu_ps(p + c + 24));
        }
        for (; c < C; c += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(p + c));
        __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        const float mean = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1))) / (float)C;
        const __m256 m = _mm256_set1_ps(mean);
        __m256 v0 = _mm256_setzero_ps(), v1 = v0, v2 = v0, v3 = v0;
        for (c = 0; c < C4; c += 32) {
            const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(p + c), m);
            const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(p + c + 8), m);
            const __m256 d2 = _mm256_sub_ps(_mm256_loadu_ps(p + c + 16), m);
            const __m256 d3 = _mm256_sub_ps(_mm256_loadu_ps(p + c + 24), m);
            v0 = _mm256_fmadd_ps(d0, d0, v0);
            v1 = _mm256_fmadd_ps(d1, d1, v1);
            v2 = _mm256_fmadd_ps(d2, d2, v2);
            v3 = _mm256_fmadd_ps(d3, d3, v3);
        }
        for (; c < C; c += 8) {
            const __m256 dlt = _mm256_sub_ps(_mm256_loadu_ps(p + c), m);
            v0 = _mm256_fmadd_ps(dlt, dlt, v0);
        }
        const __m256 v = _mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3));
        h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        const float var = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1))) / (float)C;
        const __m256 r = _mm256_set1_ps(1.0f / sqrtf(var + ln->eps));
        for (int c = 0; c < C; c += 8) {
            const __m256 xn = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p + c), m), r);
            _mm256_storeu_ps(q + c, _mm256_fmadd_ps(xn, _mm256_loadu_ps(ln->weight + c), _mm256_loadu_ps(ln->bias + c)));
        }
        if (ln->id_scale || ln->id_shift) {  /* as PyTorch's addcmul / mul_ / add_ on the identity: the same bits */
            float *y = (float *)p;
            for (int c = 0; c < C; c += 8) {
                const __m256 v = _mm256_loadu_ps(y + c);
                const __m256 b = ln->id_shift ? _mm256_loadu_ps(ln->id_shift + c) : _mm256_setzero_ps();
                _mm256_storeu_ps(y + c, !ln->id_scale ? _mm256_add_ps(v, b)
                                        : ln->id_shift ? _mm256_fmadd_ps(v, _mm256_loadu_ps(ln->id_scale + c), b)
                                                       : _mm256_mul_ps(v, _mm256_loadu_ps(ln->id_scale + c)));
            }
        }
    }
}

/* Every channel block of one output row, tile by tile: for kernels of few taps, where the conv is bound by memory
 * rather than arithmetic, each tile's pixels are read with all their channels (contiguous memory) instead of one
 * 64-byte block per pixel per pass along the row (3x3 on 16x128x28x28: 2.9 -> 1.0 ms). Same tiles, same sums. */
INLINE void row_all_blocks(const float *img, int y0, long rstride, const float *w, const float *bias, float *out,
                           int C, int W, int kw, int pw, int d, int ky0, int ky1, int block, const struct norm *ln,
                           int add) {
    for (int x0 = 0; x0 < W; x0 += MAX_TILE) {
        const int nt = W - x0 < MAX_TILE ? W - x0 : MAX_TILE;
        const int kx0 = first_tap(pw - x0 - nt + 1, d), hi = first_tap(W + pw - x0, d), kx1 = hi < kw ? hi : kw;
        const int check = x0 - pw < 0 || x0 + nt - 1 + (kw - 1) * d - pw >= W;
        for (int c0 = 0; c0 < C; c0 += block) {
            if (block == 16) {
                const int CV = 2;
                if (check) { TILES(1) } else { TILES(0) }
            } else {
                const int CV = 1;
                if (check) { TILES(1) } else { TILES(0) }
            }
        }
        if (ln && ln->gelu_of) {  /* the tile is a gradient flowing back through GELU(gelu_of) */
            float *t = out + (long)x0 * C;
            const float *u = ln->gelu_of + (long)x0 * C;
            for (long i = overlock_gelu_grad_span_avx512(t, u, t, (long)nt * C, 0); i < (long)nt * C; i += 8)
                _mm256_storeu_ps(t + i, gelu_grad8(_mm256_loadu_ps(t + i), _mm256_loadu_ps(u + i)));
        } else if (ln && ln->squares) {  /* four channel vectors at a time: independent FMA chains */
            const float *t = out + (long)x0 * C;
            int c = 0;
            for (; c + 32 <= C; c += 32) {
                __m256 a0 = _mm256_loadu_ps(ln->squares + c), a1 = _mm256_loadu_ps(ln->squares + c + 8);
                __m256 a2 = _mm256_loadu_ps(ln->squares + c + 16), a3 = _mm256_loadu_ps(ln->squares + c + 24);
                for (int i = 0; i < nt; i++) {
                    const float *ti = t + (long)i * C + c;
                    const __m256 v0 = _mm256_loadu_ps(ti), v1 = _mm256_loadu_ps(ti + 8);
                    const __m256 v2 = _mm256_loadu_ps(ti + 16), v3 = _mm256_loadu_ps(ti + 24);
                    a0 = _mm256_fmadd_ps(v0, v0, a0);
                    a1 = _mm256_fmadd_ps(v1, v1, a1);
                    a2 = _mm256_fmadd_ps(v2, v2, a2);
                    a3 = _mm256_fmadd_ps(v3, v3, a3);
                }
                _mm256_storeu_ps(ln->squares + c, a0);
                _mm256_storeu_ps(ln->squares + c + 8, a1);
                _mm256_storeu_ps(ln->squares + c + 16, a2);
                _mm256_storeu_ps(ln->squares + c + 24, a3);
            }
            for (; c < C; c += 8) {
                __m256 a = _mm256_loadu_ps(ln->squares + c);
                for (int i = 0; i < nt; i++) {
                    const __m256 v = _mm256_loadu_ps(t + (long)i * C + c);
                    a = _mm256_fmadd_ps(v, v, a);
                }
                _mm256_storeu_ps(ln->squares + c, a);
            }
        } else if (ln && ln->out) {
            layer_norm_pixels(out + (long)x0 * C, ln->out + (long)x0 * C, nt, C, ln);
        } else if (ln) {
            float *t = out + (long)x0 * C;
            for (long i = overlock_gelu_span_avx512(t, t, (long)nt * C, 0); i < (long)nt * C; i += 8)
                _mm256_storeu_ps(t + i, gelu8(_mm256_loadu_ps(t + i)));
        }
    }
}

/* The kernel from PyTorch's (C, kh*kw) layout into the (kh*kw, C) one read above (C a multiple of 8); taps in
 * reverse order if `flip` (the kernel turned 180 degrees: the input gradient's conv). 8x8 blocks transposed in
 * registers: PyTorch's strided copy (plus a flip) took 33-60 us for a 256-channel 13x13 kernel, a scalar loop 23,
 * on every call of a training step. */
__attribute__((target("avx2,fma")))
void overlock_depthwise_taps(const float *w, float *out, int C, int taps, int flip) {
    const int full = taps & ~7;
    for (int c0 = 0; c0 < C; c0 += 8) {
        for (int t0 = 0; t0 < full; t0 += 8) {
            __m256 r[8], u[8], v[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(w + (long)(c0 + i) * taps + t0);
            for (int i = 0; i < 8; i += 2) {  /* rows i, i+1 interleaved */
                u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {  /* pairs of pairs */
                v[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
                v[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
                v[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
                v[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
            }
            for (int j = 0; j < 4; j++) {  /* 128-bit halves: taps t0 + j and t0 + j + 4 */
                const __m256 lo = _mm256_permute2f128_ps(v[j], v[j + 4], 0x20);
                const __m256 hi = _mm256_permute2f128_ps(v[j], v[j + 4], 0x31);
                const int ta = t0 + j, tb = t0 + j + 4;
                _mm256_storeu_ps(out + (long)(flip ? taps - 1 - ta : ta) * C + c0, lo);
                _mm256_storeu_ps(out + (long)(flip ? taps - 1 - tb : tb) * C + c0, hi);
            }
        }
        for (int t = full; t < taps; t++) {
            float *dst = out + (long)(flip ? taps - 1 - t : t) * C + c0;
            for (int i = 0; i < 8; i++) dst[i] = w[(long)(c0 + i) * taps + t];
        }
    }
}

/* depthwise_avx512.c: the loop below with 512-bit vectors (same bits), where the CPU has them */
int overlock_depthwise_rows_avx512(const float *x, const float *w, const float *bias, float *y, int N, int H, int W,
                                   int C, int kh, int kw, int d, int add);
int overlock_avx512_usable(void);
void overlock_wgrad_rows_avx512(const float *x, const float *g, float *acc, long n, int y0, int y1, int H, int W,
                                int C, int kh, int kw, int d, int c0);

/* Kernels of at most this many taps take row_all_blocks. */
#define ROW_ALL_BLOCKS_TAPS 9

/* Returns 0, or -1 for an unsupported shape (C not a multiple of 8, an even kernel side). add: the conv (and bias)
 * is added to what y holds instead of overwriting it (the dilated branches' input gradients, summed in place). */
__attribute__((target("avx2,fma")))
int overlock_depthwise_add_avx2(const float *x, const float *w, const float *bias, float *y, int N, int H, int W,
                                int C, int kh, int kw, int d, int add) {
    if (C % 8 || !(kh & 1) || !(kw & 1) || d < 1) return -1;
    const int ph = d * (kh / 2), pw = d * (kw / 2);
    const int block = C % 16 ? 8 : 16, nblocks = C / block;
    const long rstride = (long)W * C;
    if (kh * kw <= ROW_ALL_BLOCKS_TAPS) {
        #pragma omp parallel for schedule(static)
        for (long item = 0; item < (long)N * H; item++) {
            const int yy = item % H;
            const long n = item / H;
            const int ky0 = first_tap(ph - yy, d), ky_end = first_tap(H - yy + ph, d), ky1 = ky_end < kh ? ky_end : kh;
            row_all_blocks(x + n * H * rstride, yy - ph, rstride, w, bias, y + (n * H + yy) * rstride, C, W, kw, pw,
                           d, ky0, ky1, block, NULL, add);
        }
        return 0;
    }
    if (overlock_depthwise_rows_avx512(x, w, bias, y, N, H, W, C, kh, kw, d, add) == 0) return 0;
    #pragma omp parallel for schedule(static)
    for (long item = 0; item < (long)N * H * nblocks; item++) {  /* channel blocks innermost: contiguous memory */
        const int cb = item % nblocks, yy = (item / nblocks) % H;
        const long n = item / nblocks / H;
        const int ky0 = first_tap(ph - yy, d), ky_end = first_tap(H - yy + ph, d), ky1 = ky_end < kh ? ky_end : kh;
        const float *img = x + n * H * rstride;
        float *out = y + (n * H + yy) * rstride;
        if (block == 16)
            row_block(img, yy - ph, rstride, w, bias, out, C, W, kw, pw, d, ky0, ky1, cb * block, 2, add);
        else
            row_block(img, yy - ph, rstride, w, bias, out, C, W, kw, pw, d, ky0, ky1, cb * block, 1, add);
    }
    return 0;
}

__attribute__((target("avx2,fma")))
int overlock_depthwise_avx2(const float *x, const float *w, const float *bias, float *y, int N, int H, int W,
                            int C, int kh, int kw, int d) {
    return overlock_depthwise_add_avx2(x, w, bias, y, N, H, W, C, kh, kw, d, 0);
}

/* The small-kernel conv of overlock_depthwise_avx2 (same bits) with an epilogue on each tile (struct norm): `each`
 * holds the epilogue's base pointers, advanced here to the row of every work item (out: a row of the map; squares:
 * C floats per row, zeroed first). Kernels of at most ROW_ALL_BLOCKS_TAPS taps, dilation 1; -1 for other shapes. */
__attribute__((target("avx2,fma")))
static int conv_rows_then(const float *x, const float *w, const float *bias, float *y, int N, int H, int W, int C,
                          int kh, int kw, const struct norm *each) {
    if (C % 8 || !(kh & 1) || !(kw & 1) || kh * kw > ROW_ALL_BLOCKS_TAPS) return -1;
    const int ph = kh / 2, pw = kw / 2;
    const int block = C % 16 ? 8 : 16;
    const long rstride = (long)W * C;
    #pragma omp parallel for schedule(static)
    for (long item = 0; item < (long)N * H; item++) {
        const int yy = item % H;
        const long n = item / H;
        const int ky0 = first_tap(ph - yy, 1), ky_end = first_tap(H - yy + ph, 1), ky1 = ky_end < kh ? ky_end : kh;
        struct norm ep = *each;
        if (ep.out) ep.out += item * rstride;
        if (ep.gelu_of) ep.gelu_of += item * rstride;
        if (ep.squares) {
            ep.squares += item * C;
            memset(ep.squares, 0, sizeof(float) * C);
        }
        row_all_blocks(x + n * H * rstride, yy - ph, rstride, w, bias, y + item * rstride, C, W, kw, pw, 1, ky0, ky1,
                       block, &ep, 0);
    }
    return 0;
}

/* y = GELU(the same conv as overlock_depthwise_avx2), the very bits of that conv followed by overlock_gelu_avx2. */
__attribute__((target("avx2,fma")))
int overlock_depthwise_gelu_avx2(const float *x, const float *w, const float *bias, float *y, int N, int H, int W,
                                 int C, int kh, int kw) {
    const struct norm act = {NULL, NULL, NULL, 0.0f, NULL, NULL};
    return conv_rows_then(x, w, bias, y, N, H, W, C, kh, kw, &act);
}

/* y = GELU'(u) * conv(g, w): a small-kernel conv's input gradient (w: its kernel turned 180 degrees) carried on
 * through the GELU in front of it (u: GELU's input), one pass instead of the conv then GELU's backward. */
__attribute__((target("avx2,fma")))
int overlock_depthwise_gelu_grad_avx2(const float *g, const float *w, const float *u, float *y, int N, int H, int W,
                                      int C, int kh, int kw) {
    const struct norm back = {NULL, NULL, NULL, 0.0f, NULL, u};
    return conv_rows_then(g, w, NULL, y, N, H, W, C, kh, kw, &back);
}

/* y = the same conv as overlock_depthwise_avx2 (same bits), and z = LayerNorm over the channels of y (weight,
 * bias, eps); then, if id_scale or id_shift is given, y <- y * id_scale + id_shift (a fused block's residual
 * identity: LayerScale and the branch's last bias, one pass less). */
__attribute__((target("avx2,fma")))
int overlock_depthwise_ln_avx2(const float *x, const float *w, const float *bias, float *y, float *z,
                               const float *ln_weight, const float *ln_bias, float eps, const float *id_scale,
                               const float *id_shift, int N, int H, int W, int C, int kh, int kw) {
    const struct norm ln = {z, ln_weight, ln_bias, eps, NULL, NULL, id_scale, id_shift};
    return conv_rows_then(x, w, bias, y, N, H, W, C, kh, kw, &ln);
}

/* GRN's scale from the per-row sums of squares (the conv-then-GRN calls), then y *= scale if apply. */
__attribute__((target("avx2,fma")))
static int grn_scale_from_rows(float *y, const float *gamma, float *scale, const float *rows, int apply, int N,
                               int H, int W, int C) {
    #pragma omp parallel for schedule(static)
    for (long n = 0; n < N; n++) {
        float *s = scale + n * C;
        double total = 0;
        for (int c = 0; c < C; c++) {
            double sum = 0;
            for (int r = 0; r < H; r++) sum += rows[(n * H + r) * C + c];
            s[c] = (float)sqrt(sum);
            total += s[c];
        }
        const float denom = (float)(total / C) + 1e-6f;
        for (int c = 0; c < C; c++) s[c] = 1.0f + gamma[c] * (s[c] / denom);
    }
    if (apply) {  /* rows in the order conv_rows_then gave them to the threads */
        #pragma omp parallel for schedule(static)
        for (long r = 0; r < (long)N * H; r++) {
            const float *s = scale + r / H * C;
            float *yr = y + r * W * C;
            for (int x = 0; x < W; x++)
                for (int c = 0; c < C; c += 8)
                    _mm256_storeu_ps(yr + (long)x * C + c,
                                     _mm256_mul_ps(_mm256_loadu_ps(yr + (long)x * C + c), _mm256_loadu_ps(s + c)));
        }
    }
    return 0;
}

/* y = the same conv as overlock_depthwise_avx2 (same bits), and GRN's per-sample channel scale of y,
 * scale[n, c] = 1 + gamma[c] * gx[n, c] / (mean_c gx[n, :] + 1e-6), gx the spatial L2 norm (grn_avx2.c's formula):
 * the squares are summed per output row while the row is in cache (in float, rows then added in double, so the
 * result does not depend on the thread count or the batch). rows: N * H * C floats of scratch. With apply, y is
 * then multiplied by the scale (as PyTorch's y * scale), while each thread's share is still in its cache. */
__attribute__((target("avx2,fma")))
int overlock_depthwise_grn_avx2(const float *x, const float *w, const float *bias, float *y, const float *gamma,
                                float *scale, float *rows, int apply, int N, int H, int W, int C, int kh, int kw) {
    const struct norm acc = {NULL, NULL, NULL, 0.0f, rows, NULL};
    if (conv_rows_then(x, w, bias, y, N, H, W, C, kh, kw, &acc) != 0) return -1;
    return grn_scale_from_rows(y, gamma, scale, rows, apply, N, H, W, C);
}

/* overlock_depthwise_grn_avx2 with the output written over its input x (kh, kw <= 3): the GRN-MLP's conv at
 * inference, whose input (the first 1x1's GELU'd output) was just written and is still in cache, while a fresh
 * output buffer is not (1x256x56x56: 0.20 ms writing into a hot buffer, 0.58 into a cold one). Each thread takes a
 * band of rows, saves the input rows just outside it (its neighbours overwrite them), computes each output row into
 * a row buffer and writes it over its input row one row later, when no output row still needs that input. Same
 * tiles, same sums: the bits of the out-of-place call. Returns 0, -1 for other shapes, -2 without memory. */
__attribute__((target("avx2,fma")))
int overlock_depthwise_grn_inplace_avx2(float *x, const float *w, const float *bias, const float *gamma,
                                        float *scale, float *rows, int apply, int N, int H, int W, int C, int kh,
                                        int kw) {
    if (C % 8 || !(kh & 1) || !(kw & 1) || kh > 3 || kw > 3) return -1;
    const int ph = kh / 2, pw = kw / 2, block = C % 16 ? 8 : 16;
    const long rstride = (long)W * C, R = (long)N * H;
    int failed = 0;
    #pragma omp parallel
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const long r0 = R * t / T, r1 = R * (t + 1) / T;  /* this thread's rows */
        float *buf = r1 > r0 ? malloc(sizeof(float) * 7 * rstride) : NULL;
        float *above = buf, *below = buf ? buf + rstride : NULL, *out[2] = {NULL, NULL}, *win = NULL;
        if (buf) {
            out[0] = buf + 2 * rstride, out[1] = buf + 3 * rstride, win = buf + 4 * rstride;
            if (ph && r0 % H) memcpy(above, x + (r0 - 1) * rstride, sizeof(float) * rstride);
            if (ph && r1 % H && r1 < R) memcpy(below, x + r1 * rstride, sizeof(float) * rstride);
        } else if (r1 > r0) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        if (buf && !failed) {
            for (long item = r0; item < r1; item++) {
                const int yy = item % H;
                const long n = item / H;
                const int ky0 = first_tap(ph - yy, 1), ky_end = first_tap(H - yy + ph, 1);
                const int ky1 = ky_end < kh ? ky_end : kh;
                const float *img = x + n * H * rstride;
                int y0 = yy - ph;
                if (ph && ((item == r0 && ky0 == 0) || (item == r1 - 1 && ky1 == kh))) {
                    /* a row outside the band: the three input rows from the saved copies into win */
                    memcpy(win + rstride, x + item * rstride, sizeof(float) * rstride);
                    if (ky0 == 0) memcpy(win, item == r0 ? above : x + (item - 1) * rstride, sizeof(float) * rstride);
                    if (ky1 == kh) memcpy(win + 2 * rstride, item == r1 - 1 ? below : x + (item + 1) * rstride,
                                          sizeof(float) * rstride);
                    img = win, y0 = 0;
                }
                struct norm ep = {NULL, NULL, NULL, 0.0f, rows + item * C, NULL, NULL, NULL};
                memset(ep.squares, 0, sizeof(float) * C);
                row_all_blocks(img, y0, rstride, w, bias, out[item & 1], C, W, kw, pw, 1, ky0, ky1, block, &ep, 0);
                if (item > r0)  /* the row above: no output row of this band reads its input any more */
                    memcpy(x + (item - 1) * rstride, out[(item - 1) & 1], sizeof(float) * rstride);
            }
            if (r1 > r0) memcpy(x + (r1 - 1) * rstride, out[(r1 - 1) & 1], sizeof(float) * rstride);
        }
        free(buf);
    }
    if (failed) return -2;
    return grn_scale_from_rows(x, gamma, scale, rows, apply, N, H, W, C);
}

/* Weight gradient: dw[ky, kx, c] = sum over n, y, x of x[n, y + ky*d - ph, x + kx*d - pw, c] * g[n, y, x, c].
 * Adds one input row's products for taps kx0 .. kx0 + NT - 1 of row ky into acc (in memory, NT * CV vectors):
 * the pixels [lo, hi) read inside the map for every tap of the tile run unchecked, the rest tap by tap. */
INLINE void wgrad_row(const float *xr, const float *gr, float *acc, int C, int W, int pw, int d, int kx0, int c0,
                      const int NT, const int CV) {
    __m256 a[MAX_TILE][2];
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < CV; v++) a[t][v] = _mm256_loadu_ps(acc + (t * 2 + v) * 8);
    const int first = kx0 * d, last = (kx0 + NT - 1) * d;
    int from[3], to[3];
    wgrad_passes(W, pw, first, last, from, to);
    for (int pass = 0; pass < 3; pass++) {
        for (int xx = from[pass]; xx < to[pass]; xx++) {
            __m256 gv[2];
            for (int v = 0; v < CV; v++) gv[v] = _mm256_loadu_ps(gr + (long)xx * C + c0 + 8 * v);
            const int col = xx + first - pw;
            for (int t = 0; t < NT; t++) {
                if (pass != 1 && (unsigned)(col + t * d) >= (unsigned)W) continue;
                for (int v = 0; v < CV; v++)
                    a[t][v] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + (long)(col + t * d) * C + c0 + 8 * v), gv[v],
                                              a[t][v]);
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int v = 0; v < CV; v++) _mm256_storeu_ps(acc + (t * 2 + v) * 8, a[t][v]);
}

#define WROW(NT, CV) wgrad_row(xr, gr, arow + kx0 * 16, C, W, pw, d, kx0, c0, NT, CV)
#define WROWS(CV) for (int kx0 = 0; kx0 < kw; kx0 += MAX_TILE) {  /* the row stays in L1 across the tap tiles */ \
        switch (kw - kx0 < MAX_TILE ? kw - kx0 : MAX_TILE) {                                                     \
        case 6: WROW(6, CV); break; case 5: WROW(5, CV); break; case 4: WROW(4, CV); break;                     \
        case 3: WROW(3, CV); break; case 2: WROW(2, CV); break; default: WROW(1, CV);                           \
        } }

/* Every tap of one channel block over rows [y0, y1) of image n, into acc (kh * kw * 16 floats): each g row is read
 * once, with the kh input rows it meets, which stay in the cache for the next output row. (One work item per tap
 * row instead, each reading the block's whole slab of x and g, streamed the slab from memory kh times: 17x17 on
 * 8x64x56x56 took 29 ms against 16 here; on 14x14 maps the two are even.) */
INLINE void wgrad_rows(const float *x, const float *g, float *acc, long n, int y0, int y1, int H, int W, int C,
                       int kh, int kw, int d, int c0, const int CV) {
    const int ph = d * (kh / 2), pw = d * (kw / 2);
    memset(acc, 0, sizeof(float) * kh * kw * 16);
    for (int y = y0; y < y1; y++) {
        const float *gr = g + (n * H + y) * (long)W * C;
        for (int ky = first_tap(ph - y, d); ky < kh; ky++) {
            const int yin = y + ky * d - ph;
            if (yin >= H) break;
            const float *xr = x + (n * H + yin) * (long)W * C;
            float *arow = acc + (long)ky * kw * 16;
            WROWS(CV)
        }
    }
}

/* dw (C, kh, kw), PyTorch's layout of a depthwise conv's weight, of the conv above, from its input x and output
 * gradient g (both N, H, W, C): partial sums per (channel block, image, row chunk), added in a fixed order (the
 * same bits for any thread count). Returns -2 if their buffer cannot be allocated. */
__attribute__((target("avx2,fma")))
int overlock_depthwise_wgrad_avx2(const float *x, const float *g, float *dw, int N, int H, int W, int C, int kh,
                                  int kw, int d) {
    if (C % 8 || !(kh & 1) || !(kw & 1) || kw > 64 || d < 1) return -1;
    const int block = C % 16 ? 8 : 16, nblocks = C / block;
    /* one partial sum per (image, row chunk, channel block); chunks keep at least 32 items for the threads */
    const long taps16 = (long)kh * kw * 16;
    int chunks = 1;
    while ((long)nblocks * N * chunks < 32 && chunks * 2 <= H) chunks *= 2;
    const long items = (long)nblocks * N * chunks;
    float *part = aligned_alloc(32, (size_t)items * taps16 * sizeof(float));
    if (!part) return -2;
    const int wide = block == 16 && overlock_avx512_usable();  /* depthwise_avx512.c: same bits */
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (long item = 0; item < items; item++) {  /* channel blocks innermost: contiguous memory */
            const int cb = item % nblocks, r = (item / nblocks) % chunks;
            const long n = item / nblocks / chunks;
            const int y0 = (int)((long)H * r / chunks), y1 = (int)((long)H * (r + 1) / chunks);
            if (wide)
                overlock_wgrad_rows_avx512(x, g, part + item * taps16, n, y0, y1, H, W, C, kh, kw, d, cb * block);
            else if (block == 16)
                wgrad_rows(x, g, part + item * taps16, n, y0, y1, H, W, C, kh, kw, d, cb * block, 2);
            else wgrad_rows(x, g, part + item * taps16, n, y0, y1, H, W, C, kh, kw, d, cb * block, 1);
        }
        #pragma omp for schedule(static)
        for (long t = 0; t < (long)nblocks * kh * kw; t++) {  /* the partial sums, added in item order */
            const int cb = t % nblocks;
            const long tap = t / nblocks;
            for (int v = 0; v < block / 8; v++) {
                __m256 s = _mm256_setzero_ps();
                for (long i = cb; i < items; i += nblocks)
                    s = _mm256_add_ps(s, _mm256_load_ps(part + i * taps16 + tap * 16 + v * 8));
                float lanes[8];
                _mm256_storeu_ps(lanes, s);
                for (int j = 0; j < 8; j++) dw[(long)(cb * block + v * 8 + j) * kh * kw + tap] = lanes[j];
            }
        }
    }
    free(part);
    return 0;
}
