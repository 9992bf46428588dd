/* A whole fused block's batch-1 inference forward in one call: fused_native.py's straight-line forwards of the
 * Re-parameterized block (FusedRepConvBlock) and the Focus-Net block (FusedDynamicConvBlock), step for step.
 *
 * Why: at batch 1 a block's kernels and GEMMs leave the other core waiting while Python prepares the next call;
 * in the model (caches cold from the kernels) that glue was ~0.25 ms a re-parameterized block and ~0.6 ms a
 * Focus-Net block of ~2.6 ms, about a sixth of an overlock_t forward. Here the same kernels run with the same
 * arguments, and the 1x1s call the BLAS sgemm_ PyTorch's own matrix products call (its address handed over by
 * fused_native.py, which checks once per process that both give the same bits), with the operand order,
 * transposes and leading dimensions PyTorch passes for these layouts. Buffers are 64-byte aligned, as PyTorch's
 * (MKL's results may depend on alignment). So the outputs are the bits of the straight-line forwards (tests compare
 * the two).
 *
 * Layout: float32 (pixels, channels) matrices, channels a multiple of 8; batch 1. A 1x1's weight w is its (N, K)
 * matrix, stored row-major (w_t = 0) or as the row-major (K, N) transpose (w_t = 1: fused.gemm_param). Depthwise
 * kernels come as taps (native.py's (kh * kw, C) layout).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);
static sgemm_fn sgemm_call;

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

/* The sgemm_ to call (PyTorch's), or NULL to turn the blocks off. */
void overlock_blocks_set_sgemm(void *fn) { sgemm_call = (sgemm_fn)fn; }

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

/* PyTorch's w * s.reshape(1, K) for a 1x1's (N, K) weight w (the product keeps w's layout). */
static void scale_weight(float *out, const float *w, int w_t, const float *s, int N, int K) {
    if (w_t) {
#pragma omp parallel for schedule(static) if ((long)N * K >= MIN_PARALLEL)
        for (long k = 0; k < K; k++)
            for (long n = 0; n < N; n++) out[k * N + n] = w[k * N + n] * s[k];
    } else {
#pragma omp parallel for schedule(static) if ((long)N * K >= MIN_PARALLEL)
        for (long n = 0; n < N; n++)
            for (long k = 0; k < K; k++) out[n * K + k] = w[n * K + k] * s[k];
    }
}

/* PyTorch's x * s.reshape(1, C) for an (M, C) map. */
static void scale_map(float *out, const float *x, const float *s, long M, int C) {
#pragma omp parallel for schedule(static) if (M * C >= MIN_PARALLEL)
    for (long p = 0; p < M; p++)
        for (long c = 0; c < C; c++) out[p * C + c] = x[p * C + c] * s[c];
}

/* acc (M, N) += (x * scale) @ w^T, x (M, K), scale (K) or NULL: fused_native._scaled_addmm_ at batch 1 (a small map
 * scaled, else the weight). Returns 0, -2 without memory. */
static int scaled_addmm(float *acc, const float *x, const float *w, int w_t, const float *scale, long M, int K,
                        int N) {
    struct arena a = {{0}, 0};
    if (scale && M < N) {
        float *xs = take(&a, M * K);
        if (!xs) return -2;
        scale_map(xs, x, scale, M, K);
        x = xs;
        scale = NULL;
    }
    if (scale) {
        float *ws = take(&a, (long)N * K);
        if (!ws) return -2;
        scale_weight(ws, w, w_t, scale, N, K);
        w = ws;
    }
    linear(acc, N, x, K, 0, w, w_t, (int)M, K, N, 1.0f);
    release(&a);
    return 0;
}

/* A GRN MLP: fc1 (with bias) -> GELU -> residual depthwise conv -> GRN -> fc2 (its bias already in out). */
struct mlp {
    const float *fc1_w, *fc1_b, *dw_taps, *dw_bias, *gamma, *fc2_w;
    int fc1_t, fc2_t, E, kh, kw, in_place;
};

/* out (M, C) += mlp(y * gate): fused_native._grn_mlp_add at batch 1; gate (C) or NULL. Returns 0 or a kernel's code
 * (out untouched then). */
static int grn_mlp_add(const struct mlp *m, const float *y, float *out, const float *gate, int H, int W, int C) {
    const long M = (long)H * W;
    const int E = m->E, apply = M < C;
    struct arena a = {{0}, 0};
    float *hidden = take(&a, M * E), *scale = take(&a, E), *rows = take(&a, (long)H * E);
    float *grn = m->in_place ? hidden : take(&a, M * E);
    int rc = -2;
    if (!hidden || !scale || !rows || !grn) goto done;
    if (gate && M < E) {  /* a small map: scale the map */
        float *xs = take(&a, M * C);
        if (!xs) goto done;
        scale_map(xs, y, gate, M, C);
        linear(hidden, E, xs, C, 0, m->fc1_w, m->fc1_t, (int)M, C, E, 0.0f);
    } else if (gate) {
        float *ws = take(&a, (long)E * C);
        if (!ws) goto done;
        scale_weight(ws, m->fc1_w, m->fc1_t, gate, E, C);
        linear(hidden, E, y, C, 0, ws, m->fc1_t, (int)M, C, E, 0.0f);
    } else {
        linear(hidden, E, y, C, 0, m->fc1_w, m->fc1_t, (int)M, C, E, 0.0f);
    }
    if ((rc = overlock_bias_gelu_avx2(hidden, m->fc1_b, M, E, E))) goto done;
    rc = m->in_place ? overlock_depthwise_grn_inplace_avx2(hidden, m->dw_taps, m->dw_bias, m->gamma, scale, rows,
                                                           apply, 1, H, W, E, m->kh, m->kw)
                     : overlock_depthwise_grn_avx2(hidden, m->dw_taps, m->dw_bias, grn, m->gamma, scale, rows, apply,
                                                   1, H, W, E, m->kh, m->kw);
    if (rc) goto done;
    rc = scaled_addmm(out, grn, m->fc2_w, m->fc2_t, apply ? NULL : scale, M, E, C);
done:
    release(&a);
    return rc;
}

/* FusedRepConvBlock at batch 1 (fused_native.repconv_block): out = identity, where identity = dwconv(x) * ls +
 * fc2's bias, plus the GRN MLP of SE(large_kernel(norm(dwconv(x)))). Returns 0, -2 without memory, -3 without
 * sgemm_, or a kernel's code (then take the Python forward: x is untouched). */
int overlock_repconv_block_avx2(const float *x, float *out, int H, int W, int C, const float *dw_taps,
                                const float *dw_bias, int dkh, int dkw, const float *ln_w, const float *ln_b,
                                float eps, const float *ls_w, const float *lk_taps, const float *lk_bias, int lkh,
                                int lkw, const float *se_w1, const float *se_b1, int R, const float *se_w2,
                                const float *se_b2, const float *fc1_w, int fc1_t, const float *fc1_b, int E,
                                const float *mdw_taps, const float *mdw_bias, int mkh, int mkw, const float *gamma,
                                int in_place, const float *fc2_w, int fc2_t, const float *fc2_b) {
    if (!sgemm_call) return -3;
    const long M = (long)H * W;
    struct arena a = {{0}, 0};
    float *y = take(&a, M * C), *large = take(&a, M * C), *gate = take(&a, C);
    int rc = -2;
    if (!y || !large || !gate) goto done;
    if ((rc = overlock_depthwise_ln_avx2(x, dw_taps, dw_bias, out, y, ln_w, ln_b, eps, ls_w, fc2_b, 1, H, W, C, dkh,
                                         dkw)))
        goto done;
    if ((rc = overlock_depthwise_avx2(y, lk_taps, lk_bias, large, 1, H, W, C, lkh, lkw, 1))) goto done;
    if ((rc = overlock_se_gate_avx2(large, 1, M, C, se_w1, se_b1, R, se_w2, se_b2, gate))) goto done;
    const struct mlp m = {fc1_w, fc1_b, mdw_taps, mdw_bias, gamma, fc2_w, fc1_t, fc2_t, E, mkh, mkw, in_place};
    rc = grn_mlp_add(&m, large, out, gate, H, W, C);
done:
    release(&a);
    return rc;
}

/* h = beta + h * scale per channel, one rounding (PyTorch's addcmul on the CPU is a fused multiply-add). */
__attribute__((target("avx2,fma")))
static void grn_apply(float *h, const float *beta, const float *scale, long M, int D) {
#pragma omp parallel for schedule(static) if (M * D >= MIN_PARALLEL)
    for (long p = 0; p < M; p++)
        for (long c = 0; c < D; c++) h[p * D + c] = fmaf(h[p * D + c], scale[c], beta[c]);
}

/* PyTorch's adaptive_avg_pool2d of a channels_last map (C channels, pixels ps floats apart) to (oh, ow): each
 * window summed in float row by row, then divided by its size. out (oh * ow, C). */
static void adaptive_avg_pool(const float *x, long ps, int H, int W, int C, int oh, int ow, float *out) {
    for (int i = 0; i < oh; i++) {
        const int y0 = i * H / oh, y1 = ((i + 1) * H + oh - 1) / oh;
        for (int j = 0; j < ow; j++) {
            const int x0 = j * W / ow, x1 = ((j + 1) * W + ow - 1) / ow;
            float *o = out + ((long)i * ow + j) * C;
            for (int c = 0; c < C; c++) o[c] = 0.0f;
            for (int yy = y0; yy < y1; yy++)
                for (int xx = x0; xx < x1; xx++) {
                    const float *p = x + ((long)yy * W + xx) * ps;
                    for (int c = 0; c < C; c++) o[c] += p[c];
                }
            const float n = (float)((y1 - y0) * (x1 - x0));
            for (int c = 0; c < C; c++) o[c] = o[c] / n;
        }
    }
}

/* The Focus-Net block's ContMix at batch 1 (fused_native._context_mix): queries from y's first Cx channels, keys
 * pooled from its other Cc, values h (M, D); out (M, D). Returns 0, -2 without memory, or the kernel's code. */
static int context_mix(const float *y, int C, int Cx, const float *h, int D, int H, int W, const float *qw, int q_t,
                       const float *qb, int Cq, int oh, int ow, const float *kw, const float *kb, int Ck,
                       const float *pw, const float *pb, int G, int k, int s, const float *rpb1, const float *rpb2,
                       float *out) {
    const long M = (long)H * W, n_ctx = (long)oh * ow;
    const int Cc = C - Cx, c = Cq / G, ss = s * s, kk = k * k, cv = D / (2 * G);
    struct arena a = {{0}, 0};
    float *query = take(&a, M * Cq), *pooled = take(&a, n_ctx * Cc), *key = take(&a, n_ctx * Ck);
    float *keys = take(&a, (long)Ck * (ss + kk)), *values = take(&a, M * D), *zeros = pb ? NULL : take(&a, ss + kk);
    int rc = -2;
    if (!query || !pooled || !key || !keys || !values || (!pb && !zeros)) goto done;
    for (long p = 0; qb && p < M; p++) memcpy(query + p * Cq, qb, sizeof(float) * Cq);  /* addmm: bias first */
    linear(query, Cq, y, C, 0, qw, q_t, (int)M, Cx, Cq, qb ? 1.0f : 0.0f);
    adaptive_avg_pool(y + Cx, C, H, W, Cc, oh, ow, pooled);
    for (long p = 0; kb && p < n_ctx; p++) memcpy(key + p * Ck, kb, sizeof(float) * Ck);
    linear(key, Ck, pooled, Cc, 0, kw, 0, (int)n_ctx, Cc, Ck, kb ? 1.0f : 0.0f);
    /* (G * c, n_ctx) keys: the pooled key map read column-major, as matmul folds it */
    linear(keys, ss + kk, key, Ck, 1, pw, 0, Ck, (int)n_ctx, ss + kk, 0.0f);
#pragma omp parallel for schedule(static) if (M * D >= MIN_PARALLEL)
    for (long p = 0; p < M; p++)  /* (2, G, H, W, cv): each head's values a compact block */
        for (int head = 0; head < 2 * G; head++)
            memcpy(values + ((long)head * M + p) * cv, h + p * D + (long)head * cv, sizeof(float) * cv);
    if (!pb) {
        memset(zeros, 0, sizeof(float) * (ss + kk));
        pb = zeros;
    }
    rc = overlock_na2d_softmax_av_avx2(query, M * Cq, c, Cq, keys, keys + ss, (long)Ck * (ss + kk),
                                       (long)c * (ss + kk), ss + kk, rpb1, rpb2, pb, pb + ss, values, (long)G * M * cv,
                                       (long)G * M * cv, M * cv, cv, out, (long)G * cv, M * 2 * G * cv, cv,
                                       2L * G * cv, 1, G, H, W, c, cv, s, k);
done:
    release(&a);
    return rc;
}

/* FusedDynamicConvBlock at batch 1 (fused_native.focus_block): out (M, C) = the block's output [x, ctx]. The inputs:
 * x (Cx channels) and ctx (Cc) with pixel strides xs and cs; prior (pixel stride ps) and the context's LayerScales
 * (ctx_w, prior_w, ctx_b), or prior NULL for the first block (x and ctx just concatenated). Returns 0, -2 without
 * memory, -3 without sgemm_, or a kernel's code (then take the Python forward: the inputs are untouched). */
int overlock_focus_block_avx2(const float *x, long xs, int Cx, const float *ctx, long cs, int Cc, const float *prior,
                              long ps, const float *ctx_w, const float *prior_w, const float *ctx_b, float *out,
                              int H, int W,
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
    if (!sgemm_call) return -3;
    const int C = Cx + Cc;
    const long M = (long)H * W;
    struct arena a = {{0}, 0};
    float *z = take(&a, M * C), *identity = take(&a, M * C), *y = take(&a, M * C), *hidden = take(&a, M * C);
    float *h = take(&a, M * D), *scale = take(&a, D), *gate = take(&a, M * D), *mixed = take(&a, M * D);
    float *agg = take(&a, M * D), *se = take(&a, D);
    int rc = -2;
    if (!z || !identity || !y || !hidden || !h || !scale || !gate || !mixed || !agg || !se) goto done;
    /* [x, ctx], the context first updated (except in the first block) */
    if (prior) {
        if ((rc = overlock_context_concat_avx2(x, xs, Cx, ctx, cs, prior, ps, Cc, ctx_w, prior_w, ctx_b, z, M)))
            goto done;
    } else {
        for (long p = 0; p < M; p++) {
            memcpy(z + p * C, x + p * xs, sizeof(float) * Cx);
            memcpy(z + p * C + Cx, ctx + p * cs, sizeof(float) * Cc);
        }
    }
    if ((rc = overlock_depthwise_ln_avx2(z, dw1_taps, dw1_bias, identity, y, n1_w, n1_b, n1_eps, ls1_w, proj_b, 1, H,
                                         W, C, d1h, d1w)))
        goto done;
    /* h = GRN(fusion 1x1(GELU(fusion dw(y))) + its bias) */
    if ((rc = overlock_depthwise_gelu_avx2(y, fdw_taps, fdw_bias, hidden, 1, H, W, C, fh, fw))) goto done;
    linear(h, D, hidden, C, 0, fusion_w, fusion_t, (int)M, C, D, 0.0f);
    if ((rc = overlock_grn_scale_bias_avx2(h, fusion_b, grn_gamma, scale, 1, M, D))) goto done;
    grn_apply(h, grn_beta, scale, M, D);
    linear(gate, D, h, D, 0, gate_w, gate_t, (int)M, D, D, 0.0f);
    /* mixed = dyconv_proj(ContMix(h)) + LePE(h) */
    if ((rc = overlock_depthwise_avx2(h, lepe_taps, lepe_bias, mixed, 1, H, W, D, lh, lw, 1))) goto done;
    if ((rc = context_mix(y, C, Cx, h, D, H, W, qw, q_t, qb, Cq, oh, ow, kw, kb, Ck, pw, pb, G, k, s, rpb1, rpb2,
                          agg)))
        goto done;
    linear(mixed, D, agg, D, 0, dyconv_w, dyconv_t, (int)M, D, D, 1.0f);
    /* identity += proj(SiLU(gate + bias) * mixed * SE(mixed)) */
    if ((rc = overlock_se_gate_avx2(mixed, 1, M, D, se_w1, se_b1, R, se_w2, se_b2, se))) goto done;
    rc = gate_b ? overlock_bias_silu_mul_avx2(gate, gate_b, mixed, M, D) : overlock_silu_mul_avx2(gate, mixed, M * D);
    if (rc || (rc = scaled_addmm(identity, gate, proj_w, proj_t, se, M, D, C))) goto done;
    /* the MLP half: out = identity's dwconv * ls2 + fc2's bias, plus the GRN MLP of its norm */
    if ((rc = overlock_depthwise_ln_avx2(identity, dw2_taps, dw2_bias, out, y, n2_w, n2_b, n2_eps, ls2_w, fc2_b, 1, H,
                                         W, C, d2h, d2w)))
        goto done;
    const struct mlp m = {fc1_w, fc1_b, mdw_taps, mdw_bias, gamma, fc2_w, fc1_t, fc2_t, E, mkh, mkw, in_place};
    rc = grn_mlp_add(&m, y, out, NULL, H, W, C);
done:
    release(&a);
    return rc;
}

/* One 1x1 as the blocks run it (linear above): for the check that sgemm_ gives PyTorch's bits, and for tests. */
int overlock_blocks_linear(float *out, int ldo, const float *a, int lda, int a_cm, const float *w, int w_t, int M,
                           int K, int N, float beta) {
    if (!sgemm_call) return -3;
    linear(out, ldo, a, lda, a_cm, w, w_t, M, K, N, beta);
    return 0;
}
