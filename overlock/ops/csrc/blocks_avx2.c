/* A whole fused block's inference forward in one call: fused_native.py's straight-line forwards of the
 * Re-parameterized block (FusedRepConvBlock) and the Focus-Net block (FusedDynamicConvBlock), step for step.
 *
 * Why: a block's kernels and GEMMs leave the other core waiting while Python prepares the next call; in the model
 * (caches cold from the kernels) that glue was ~0.25 ms a re-parameterized block and ~0.6 ms a Focus-Net block at
 * batch 1 (of ~2.6 ms), and at batch 16 ~0.4 and ~1.8 ms (PyTorch's element-wise ops between the kernels). Here the
 * same kernels run with the same arguments, and the 1x1s call the BLAS routines PyTorch's own matrix products call
 * (sgemm_ for mm / addmm, cblas_sgemm_batch for bmm / baddbmm; their addresses handed over by fused_native.py, which
 * checks once per process that both give PyTorch's bits), with the operand order, transposes and leading dimensions
 * PyTorch passes for these layouts. Buffers are 64-byte aligned, as PyTorch's (MKL's results may depend on
 * alignment). So the outputs are the bits of the straight-line forwards (tests compare the two).
 *
 * Layout: float32 (pixels, channels) matrices, channels a multiple of 8, B samples of H * W pixels. A 1x1's weight w
 * is its (N, K) matrix, stored row-major (w_t = 0) or as the row-major (K, N) transpose (w_t = 1: fused.gemm_param).
 * Depthwise kernels come as taps (native.py's (kh * kw, C) layout).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);
/* MKL's cblas_sgemm_batch (CBLAS enums as ints), which PyTorch's bmm / baddbmm call */
typedef void (*sgemm_batch_fn)(int layout, const int *transa, const int *transb, const int *m, const int *n,
                               const int *k, const float *alpha, const float **a, const int *lda, const float **b,
                               const int *ldb, const float *beta, float **c, const int *ldc, int groups,
                               const int *group_size);
static sgemm_fn sgemm_call;
static sgemm_batch_fn sgemm_batch_call;
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* The kernels these blocks run (the other sources of this library). */
int overlock_depthwise_avx2(const float *x, const float *w, const float *bias, float *y, int N, int H, int W, int C,
                            int kh, int kw, int d);
int overlock_depthwise_gelu_avx2(const float *x, const float *w, const float *bias, float *y, int N, int H, int W,
                                 int C, int kh, int kw);
int overlock_depthwise_ln_avx2(const float *x, const float *w, const float *bias, float *y, float *z,
                               const float *ln_weight, const float *ln_bias, float eps, const float *id_scale,
                               const float *id_shift, int N, int H, int W, int C, int kh, int kw);
int overlock_depthwise_grn_avx2(const float *x, const float *w, const float *bias, float *y, const float *gamma,
                                float *scale, float *rows, int apply, int N, int H, int W, int C, int kh, int kw);
int overlock_depthwise_grn_inplace_avx2(float *x, const float *w, const float *bias, const float *gamma,
                                        float *scale, float *rows, int apply, int N, int H, int W, int C, int kh,
                                        int kw);
int overlock_se_gate_avx2(const float *x, int B, long HW, int C, const float *w1, const float *b1, int R,
                          const float *w2, const float *b2, float *gate);
int overlock_bias_gelu_avx2(float *x, const float *bias, long rows, long cols, long ld);
int overlock_grn_scale_bias_avx2(float *x, const float *bias, const float *gamma, float *scale, int B, long HW,
                                 int C);
int overlock_silu_mul_avx2(float *a, const float *b, long n);
int overlock_bias_silu_mul_avx2(float *a, const float *bias, const float *b, long rows, long cols);
int overlock_context_concat_avx2(const float *x, long xs, int Cx, const float *ctx, long cs, const float *prior,
                                 long ps, int Cc, const float *w1, const float *w2, const float *b, float *out,
                                 long P);
int overlock_na2d_softmax_av_avx2(const float *q, long qs_b, long qs_g, long qs_p, const float *keys0,
                                  const float *keys1, long ks_b, long ks_g, long ks_j, const float *bias0,
                                  const float *bias1, const float *pb0, const float *pb1, const float *v, long vs_h,
                                  long vs_b, long vs_g, long vs_p, float *out, long os_h, long os_b, long os_g,
                                  long os_p, int B, int G, int H, int W, int c, int C, int k0, int k1);

/* The sgemm_ and cblas_sgemm_batch to call (PyTorch's), or NULL: without sgemm_ the blocks are off, without the
 * batched one they are off for more than one sample. */
void overlock_blocks_set_sgemm(void *fn, void *batch_fn) {
    sgemm_call = (sgemm_fn)fn;
    sgemm_batch_call = (sgemm_batch_fn)batch_fn;
}

#define MAX_BUFFERS 24
#define MIN_PARALLEL 32768 /* floats: below this one thread is faster */

/* The buffers of one call, freed together. */
struct arena {
    void *p[MAX_BUFFERS];
    int n;
};

static float *take(struct arena *a, long floats) {
    void *p = NULL;
    if (a->n == MAX_BUFFERS || posix_memalign(&p, 64, sizeof(float) * (size_t)(floats > 0 ? floats : 1))) return NULL;
    return (float *)(a->p[a->n++] = p);
}

static void release(struct arena *a) {
    while (a->n) free(a->p[--a->n]);
}

/* out (M, N), rows ldo apart, = beta * out + a @ w^T as PyTorch's mm / addmm hand it to sgemm_ for a row-major
 * result: a (M, K) row-major with rows lda apart, or (a_cm) column-major with columns lda apart; w as above. */
static void linear(float *out, int ldo, const float *a, int lda, int a_cm, const float *w, int w_t, int M, int K,
                   int N, float beta) {
    const char ta = w_t ? 'n' : 't', tb = a_cm ? 't' : 'n';
    const int ldw = w_t ? N : K;
    const float one = 1.0f;
    sgemm_call(&ta, &tb, &N, &M, &K, &one, w, &ldw, a, &lda, &beta, out, &ldo);
}

/* PyTorch's weight.t().unsqueeze(0) * s.reshape(B, K, 1) for a 1x1's (N, K) weight w and per-sample scales s
 * (B, K): B copies, each in w's layout (as the product lays them out). */
static void scale_weight(float *out, const float *w, int w_t, const float *s, int B, int N, int K) {
    const long NK = (long)N * K;
#pragma omp parallel for schedule(static) if (B * NK >= MIN_PARALLEL)
    for (long i = 0; i < B * NK; i++) {
        const long b = i / NK, j = i % NK;
        out[i] = w[j] * s[b * K + (w_t ? j / N : j % K)];
    }
}

/* PyTorch's x * s.reshape(B, 1, C) for a (B * HW, C) map and per-sample scales s (B, C). */
static void scale_map(float *out, const float *x, const float *s, int B, long HW, int C) {
#pragma omp parallel for schedule(static) if (B * HW * C >= MIN_PARALLEL)
    for (long p = 0; p < B * HW; p++) {
        const float *sb = s + p / HW * C;
        for (long c = 0; c < C; c++) out[p * C + c] = x[p * C + c] * sb[c];
    }
}

/* out (B * HW, N) = beta * out + x_b @ ws_b per sample, x (B * HW, K), ws B scaled weights from scale_weight:
 * PyTorch's bmm / baddbmm_ call of cblas_sgemm_batch (row-major; a column-major right operand transposed).
 * Returns 0, -2 without memory. */
static int batch_linear(float *out, const float *x, const float *ws, int w_t, int B, int HW, int K, int N,
                        float beta) {
    const float **ptrs = malloc(sizeof(float *) * 3 * (size_t)B);
    if (!ptrs) return -2;
    const float **a = ptrs, **b = ptrs + B;
    float **c = (float **)(ptrs + 2 * B);
    for (int i = 0; i < B; i++) {
        a[i] = x + (long)i * HW * K;
        b[i] = ws + (long)i * N * K;
        c[i] = out + (long)i * HW * N;
    }
    const int ta = NO_TRANS, tb = w_t ? NO_TRANS : TRANS, ldb = w_t ? N : K;
    const float one = 1.0f;
    sgemm_batch_call(ROW_MAJOR, &ta, &tb, &HW, &N, &K, &one, a, &K, b, &ldb, &beta, c, &N, 1, &B);
    free(ptrs);
    return 0;
}

/* out (B * HW, N) = beta * out + (x * scale) @ w^T, x (B * HW, K), scale (B, K): fused_native's choice of operand to
 * scale (a small map, else the weight: one at batch 1, one per sample above). Returns 0, -2 without memory. */
static int scaled_linear(float *out, const float *x, const float *w, int w_t, const float *scale, int B, long HW,
                         int K, int N, float beta) {
    struct arena a = {{0}, 0};
    int rc = -2;
    const long M = B * HW;
    if (!scale) {
        linear(out, N, x, K, 0, w, w_t, (int)M, K, N, beta);
        rc = 0;
    } else if (HW < N) {
        float *xs = take(&a, M * K);
        if (!xs) goto done;
        scale_map(xs, x, scale, B, HW, K);
        linear(out, N, xs, K, 0, w, w_t, (int)M, K, N, beta);
        rc = 0;
    } else {
        float *ws = take(&a, (long)B * N * K);
        if (!ws) goto done;
        scale_weight(ws, w, w_t, scale, B, N, K);
        if (B == 1) {
            linear(out, N, x, K, 0, ws, w_t, (int)M, K, N, beta);
            rc = 0;
        } else {
            rc = batch_linear(out, x, ws, w_t, B, (int)HW, K, N, beta);
        }
    }
done:
    release(&a);
    return rc;
}

/* A GRN MLP: fc1 (with bias) -> GELU -> residual depthwise conv -> GRN -> fc2 (its bias already in out). */
struct mlp {
    const float *fc1_w, *fc1_b, *dw_taps, *dw_bias, *gamma, *fc2_w;
    int fc1_t, fc2_t, E, kh, kw, in_place;
};

/* out (B * H * W, C) += mlp(y * gate): fused_native._grn_mlp_add; gate (B, C) or NULL. Returns 0 or a kernel's code
 * (out untouched then). */
static int grn_mlp_add(const struct mlp *m, const float *y, float *out, const float *gate, int B, int H, int W,
                       int C) {
    const long HW = (long)H * W, M = B * HW;
    const int E = m->E, apply = HW < C;
    struct arena a = {{0}, 0};
    float *hidden = take(&a, M * E), *scale = take(&a, (long)B * E), *rows = take(&a, (long)B * H * E);
    float *grn = m->in_place ? hidden : take(&a, M * E);
    int rc = -2;
    if (!hidden || !scale || !rows || !grn) goto done;
    if ((rc = scaled_linear(hidden, y, m->fc1_w, m->fc1_t, gate, B, HW, C, E, 0.0f))) goto done;
    if ((rc = overlock_bias_gelu_avx2(hidden, m->fc1_b, M, E, E))) goto done;
    rc = m->in_place ? overlock_depthwise_grn_inplace_avx2(hidden, m->dw_taps, m->dw_bias, m->gamma, scale, rows,
                                                           apply, B, H, W, E, m->kh, m->kw)
                     : overlock_depthwise_grn_avx2(hidden, m->dw_taps, m->dw_bias, grn, m->gamma, scale, rows, apply,
                                                   B, H, W, E, m->kh, m->kw);
    if (rc) goto done;
    rc = scaled_linear(out, grn, m->fc2_w, m->fc2_t, apply ? NULL : scale, B, HW, E, C, 1.0f);
done:
    release(&a);
    return rc;
}

/* FusedRepConvBlock (fused_native.repconv_block): out = identity, where identity = dwconv(x) * ls + fc2's bias,
 * plus the GRN MLP of SE(large_kernel(norm(dwconv(x)))); B samples. Returns 0, -2 without memory, -3 without
 * sgemm_ (or its batched form for B > 1), or a kernel's code (then take the Python forward: x is untouched). */
int overlock_repconv_block_avx2(const float *x, float *out, int B, int H, int W, int C, const float *dw_taps,
                                const float *dw_bias, int dkh, int dkw, const float *ln_w, const float *ln_b,
                                float eps, const float *ls_w, const float *lk_taps, const float *lk_bias, int lkh,
                                int lkw, const float *se_w1, const float *se_b1, int R, const float *se_w2,
                                const float *se_b2, const float *fc1_w, int fc1_t, const float *fc1_b, int E,
                                const float *mdw_taps, const float *mdw_bias, int mkh, int mkw, const float *gamma,
                                int in_place, const float *fc2_w, int fc2_t, const float *fc2_b) {
    if (!sgemm_call || (B > 1 && !sgemm_batch_call)) return -3;
    const long HW = (long)H * W, M = B * HW;
    struct arena a = {{0}, 0};
    float *y = take(&a, M * C), *large = take(&a, M * C), *gate = take(&a, (long)B * C);
    int rc = -2;
    if (!y || !large || !gate) goto done;
    if ((rc = overlock_depthwise_ln_avx2(x, dw_taps, dw_bias, out, y, ln_w, ln_b, eps, ls_w, fc2_b, B, H, W, C, dkh,
                                         dkw)))
        goto done;
    if ((rc = overlock_depthwise_avx2(y, lk_taps, lk_bias, large, B, H, W, C, lkh, lkw, 1))) goto done;
    if ((rc = overlock_se_gate_avx2(large, B, HW, C, se_w1, se_b1, R, se_w2, se_b2, gate))) goto done;
    const struct mlp m = {fc1_w, fc1_b, mdw_taps, mdw_bias, gamma, fc2_w, fc1_t, fc2_t, E, mkh, mkw, in_place};
    rc = grn_mlp_add(&m, large, out, gate, B, H, W, C);
done:
    release(&a);
    return rc;
}

/* h = beta + h * scale per sample and channel, one rounding (PyTorch's addcmul on the CPU is a fused multiply-add);
 * scale (B, D). */
__attribute__((target("avx2,fma")))
static void grn_apply(float *h, const float *beta, const float *scale, int B, long HW, int D) {
#pragma omp parallel for schedule(static) if (B * HW * D >= MIN_PARALLEL)
    for (long p = 0; p < B * HW; p++) {
        const float *s = scale + p / HW * D;
        for (long c = 0; c < D; c++) h[p * D + c] = fmaf(h[p * D + c], s[c], beta[c]);
    }
}

/* PyTorch's adaptive_avg_pool2d of B channels_last maps (C channels, pixels ps floats apart, samples H * W pixels
 * apart) to (oh, ow): each window summed in float row by row, then divided by its size. out (B * oh * ow, C). */
static void adaptive_avg_pool(const float *x, long ps, int B, int H, int W, int C, int oh, int ow, float *out) {
    const long n_out = (long)B * oh * ow;
#pragma omp parallel for schedule(static) if (n_out * C * ((H + oh - 1) / oh) * ((W + ow - 1) / ow) >= MIN_PARALLEL)
    for (long o = 0; o < n_out; o++) {
        const long b = o / ((long)oh * ow);
        const int i = (int)(o / ow % oh), j = (int)(o % ow);
        const int y0 = i * H / oh, y1 = ((i + 1) * H + oh - 1) / oh;
        const int x0 = j * W / ow, x1 = ((j + 1) * W + ow - 1) / ow;
        float *r = out + o * C;
        for (int c = 0; c < C; c++) r[c] = 0.0f;
        for (int yy = y0; yy < y1; yy++)
            for (int xx = x0; xx < x1; xx++) {
                const float *p = x + ((b * H + yy) * W + xx) * ps;
                for (int c = 0; c < C; c++) r[c] += p[c];
            }
        const float n = (float)((y1 - y0) * (x1 - x0));
        for (int c = 0; c < C; c++) r[c] = r[c] / n;
    }
}

/* Each of the rows rows of out (cols wide) = v: a bias copied into a product's output first, as addmm does. */
static void fill_rows(float *out, const float *v, long rows, int cols) {
#pragma omp parallel for schedule(static) if (rows * cols >= MIN_PARALLEL)
    for (long r = 0; r < rows; r++) memcpy(out + r * cols, v, sizeof(float) * cols);
}

/* The Focus-Net block's ContMix (fused_native._context_mix): queries from y's first Cx channels, keys pooled from
 * its other Cc, values h (B * H * W, D); out (B * H * W, D). Returns 0, -2 without memory, or the kernel's code. */
static int context_mix(const float *y, int B, int C, int Cx, const float *h, int D, int H, int W, const float *qw,
                       int q_t, const float *qb, int Cq, int oh, int ow, const float *kw, const float *kb, int Ck,
                       const float *pw, const float *pb, int G, int k, int s, const float *rpb1, const float *rpb2,
                       float *out) {
    const long HW = (long)H * W, M = B * HW, n_ctx = (long)oh * ow;
    const int Cc = C - Cx, c = Cq / G, ss = s * s, kk = k * k, cv = D / (2 * G);
    struct arena a = {{0}, 0};
    float *query = take(&a, M * Cq), *pooled = take(&a, B * n_ctx * Cc), *key = take(&a, B * n_ctx * Ck);
    float *keys = take(&a, (long)B * Ck * (ss + kk)), *values = take(&a, M * D);
    float *key_t = B > 1 ? take(&a, B * n_ctx * Ck) : NULL, *zeros = pb ? NULL : take(&a, ss + kk);
    int rc = -2;
    if (!query || !pooled || !key || !keys || !values || (B > 1 && !key_t) || (!pb && !zeros)) goto done;
    if (qb) fill_rows(query, qb, M, Cq);  /* addmm: the bias first */
    linear(query, Cq, y, C, 0, qw, q_t, (int)M, Cx, Cq, qb ? 1.0f : 0.0f);
    adaptive_avg_pool(y + Cx, C, B, H, W, Cc, oh, ow, pooled);
    if (kb) fill_rows(key, kb, B * n_ctx, Ck);
    linear(key, Ck, pooled, Cc, 0, kw, 0, (int)(B * n_ctx), Cc, Ck, kb ? 1.0f : 0.0f);
    /* keys (B * G * c, ss + kk): matmul folds the (B, G, c, n_ctx) key map, a column-major view at batch 1 and a
     * row-major copy above */
    if (B == 1) {
        linear(keys, ss + kk, key, Ck, 1, pw, 0, Ck, (int)n_ctx, ss + kk, 0.0f);
    } else {
#pragma omp parallel for schedule(static) if (B * n_ctx * Ck >= MIN_PARALLEL)
        for (long r = 0; r < (long)B * Ck; r++) {
            const long b = r / Ck, i = r % Ck;
            for (long j = 0; j < n_ctx; j++) key_t[r * n_ctx + j] = key[(b * n_ctx + j) * Ck + i];
        }
        linear(keys, ss + kk, key_t, (int)n_ctx, 0, pw, 0, B * Ck, (int)n_ctx, ss + kk, 0.0f);
    }
#pragma omp parallel for schedule(static) if (M * D >= MIN_PARALLEL)
    for (long p = 0; p < M; p++) {  /* (2, B, G, H, W, cv): each head's values a compact block */
        const long b = p / HW, q = p % HW;
        for (int half = 0; half < 2; half++)
            for (int g = 0; g < G; g++)
                memcpy(values + (((half * B + b) * G + g) * HW + q) * cv, h + p * D + (long)(half * G + g) * cv,
                       sizeof(float) * cv);
    }
    if (!pb) {
        memset(zeros, 0, sizeof(float) * (ss + kk));
        pb = zeros;
    }
    rc = overlock_na2d_softmax_av_avx2(query, HW * Cq, c, Cq, keys, keys + ss, (long)Ck * (ss + kk),
                                       (long)c * (ss + kk), ss + kk, rpb1, rpb2, pb, pb + ss, values,
                                       (long)B * G * HW * cv, (long)G * HW * cv, HW * cv, cv, out, (long)G * cv,
                                       HW * 2 * G * cv, cv, 2L * G * cv, B, G, H, W, c, cv, s, k);
done:
    release(&a);
    return rc;
}

/* FusedDynamicConvBlock (fused_native.focus_block): out (B * H * W, C) = the block's output [x, ctx]. The inputs: x
 * (Cx channels) and ctx (Cc) with pixel strides xs and cs (samples H * W pixels apart); prior (pixel stride ps) and
 * the context's LayerScales (ctx_w, prior_w, ctx_b), or prior NULL for the first block (x and ctx just
 * concatenated). Returns 0, -2 without memory, -3 without sgemm_ (or its batched form for B > 1), or a kernel's code
 * (then take the Python forward: the inputs are untouched). */
int overlock_focus_block_avx2(const float *x, long xs, int Cx, const float *ctx, long cs, int Cc, const float *prior,
                              long ps, const float *ctx_w, const float *prior_w, const float *ctx_b, float *out,
                              int B, int H, int W,
                              const float *dw1_taps, const float *dw1_bias, int d1h, int d1w, const float *n1_w,
                              const float *n1_b, float n1_eps, const float *ls1_w, const float *proj_b,
                              const float *fdw_taps, const float *fdw_bias, int fh, int fw,
                              const float *fusion_w, int fusion_t, const float *fusion_b, int D, const float *grn_gamma,
                              const float *grn_beta, const float *gate_w, int gate_t, const float *gate_b,
                              const float *lepe_taps, const float *lepe_bias, int lh, int lw,
                              const float *qw, int q_t, const float *qb, int Cq, int oh, int ow, const float *kw,
                              const float *kb, int Ck, const float *pw, const float *pb, int G, int k, int s,
                              const float *rpb1, const float *rpb2, const float *dyconv_w, int dyconv_t,
                              const float *se_w1, const float *se_b1, int R, const float *se_w2, const float *se_b2,
                              const float *proj_w, int proj_t,
                              const float *dw2_taps, const float *dw2_bias, int d2h, int d2w, const float *n2_w,
                              const float *n2_b, float n2_eps, const float *ls2_w, const float *fc1_w, int fc1_t,
                              const float *fc1_b, int E, const float *mdw_taps, const float *mdw_bias, int mkh,
                              int mkw, const float *gamma, int in_place, const float *fc2_w, int fc2_t,
                              const float *fc2_b) {
    if (!sgemm_call || (B > 1 && !sgemm_batch_call)) return -3;
    const int C = Cx + Cc;
    const long HW = (long)H * W, M = B * HW;
    struct arena a = {{0}, 0};
    float *z = take(&a, M * C), *identity = take(&a, M * C), *y = take(&a, M * C), *hidden = take(&a, M * C);
    float *h = take(&a, M * D), *scale = take(&a, (long)B * D), *gate = take(&a, M * D), *mixed = take(&a, M * D);
    float *agg = take(&a, M * D), *se = take(&a, (long)B * D);
    int rc = -2;
    if (!z || !identity || !y || !hidden || !h || !scale || !gate || !mixed || !agg || !se) goto done;
    /* [x, ctx], the context first updated (except in the first block) */
    if (prior) {
        if ((rc = overlock_context_concat_avx2(x, xs, Cx, ctx, cs, prior, ps, Cc, ctx_w, prior_w, ctx_b, z, M)))
            goto done;
    } else {
#pragma omp parallel for schedule(static) if (M * C >= MIN_PARALLEL)
        for (long p = 0; p < M; p++) {
            memcpy(z + p * C, x + p * xs, sizeof(float) * Cx);
            memcpy(z + p * C + Cx, ctx + p * cs, sizeof(float) * Cc);
        }
    }
    if ((rc = overlock_depthwise_ln_avx2(z, dw1_taps, dw1_bias, identity, y, n1_w, n1_b, n1_eps, ls1_w, proj_b, B, H,
                                         W, C, d1h, d1w)))
        goto done;
    /* h = GRN(fusion 1x1(GELU(fusion dw(y))) + its bias) */
    if ((rc = overlock_depthwise_gelu_avx2(y, fdw_taps, fdw_bias, hidden, B, H, W, C, fh, fw))) goto done;
    linear(h, D, hidden, C, 0, fusion_w, fusion_t, (int)M, C, D, 0.0f);
    if ((rc = overlock_grn_scale_bias_avx2(h, fusion_b, grn_gamma, scale, B, HW, D))) goto done;
    grn_apply(h, grn_beta, scale, B, HW, D);
    linear(gate, D, h, D, 0, gate_w, gate_t, (int)M, D, D, 0.0f);
    /* mixed = dyconv_proj(ContMix(h)) + LePE(h) */
    if ((rc = overlock_depthwise_avx2(h, lepe_taps, lepe_bias, mixed, B, H, W, D, lh, lw, 1))) goto done;
    if ((rc = context_mix(y, B, C, Cx, h, D, H, W, qw, q_t, qb, Cq, oh, ow, kw, kb, Ck, pw, pb, G, k, s, rpb1, rpb2,
                          agg)))
        goto done;
    linear(mixed, D, agg, D, 0, dyconv_w, dyconv_t, (int)M, D, D, 1.0f);
    /* identity += proj(SiLU(gate + bias) * mixed * SE(mixed)) */
    if ((rc = overlock_se_gate_avx2(mixed, B, HW, D, se_w1, se_b1, R, se_w2, se_b2, se))) goto done;
    rc = gate_b ? overlock_bias_silu_mul_avx2(gate, gate_b, mixed, M, D) : overlock_silu_mul_avx2(gate, mixed, M * D);
    if (rc || (rc = scaled_linear(identity, gate, proj_w, proj_t, se, B, HW, D, C, 1.0f))) goto done;
    /* the MLP half: out = identity's dwconv * ls2 + fc2's bias, plus the GRN MLP of its norm */
    if ((rc = overlock_depthwise_ln_avx2(identity, dw2_taps, dw2_bias, out, y, n2_w, n2_b, n2_eps, ls2_w, fc2_b, B, H,
                                         W, C, d2h, d2w)))
        goto done;
    const struct mlp m = {fc1_w, fc1_b, mdw_taps, mdw_bias, gamma, fc2_w, fc1_t, fc2_t, E, mkh, mkw, in_place};
    rc = grn_mlp_add(&m, y, out, NULL, B, H, W, C);
done:
    release(&a);
    return rc;
}

/* One 1x1 as the blocks run it (linear above), and one per sample (batch_linear): for the check that the BLAS calls
 * give PyTorch's bits, and for tests. */
int overlock_blocks_linear(float *out, int ldo, const float *a, int lda, int a_cm, const float *w, int w_t, int M,
                           int K, int N, float beta) {
    if (!sgemm_call) return -3;
    linear(out, ldo, a, lda, a_cm, w, w_t, M, K, N, beta);
    return 0;
}

int overlock_blocks_batch_linear(float *out, const float *x, const float *ws, int w_t, int B, int HW, int K, int N,
                                 float beta) {
    if (!sgemm_batch_call) return -3;
    return batch_linear(out, x, ws, w_t, B, HW, K, N, beta);
}
