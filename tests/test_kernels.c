/* Every elementwise/norm kernel against its naive reference, plus half/bfloat16 conversions and the
 * channels-last convolution kernels. */
#include "check.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((float)(*s >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

static double max_diff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

static void test_acts(void) {
    enum { N = 4099 };
    static float x[N], a[N], b[N];
    unsigned s = 1;
    for (int i = 0; i < N; i++) x[i] = 12.0f * frand(&s); /* covers the saturated tails */
    const mmb_act acts[] = {MMB_ACT_GELU, MMB_ACT_GELU_TANH, MMB_ACT_QUICK_GELU, MMB_ACT_SILU, MMB_ACT_RELU};
    /* Every implementation (libm, AVX2, AVX-512 where the CPU has them): within a few ulp of the
     * double reference: relative, plus 1e-7 absolute for the tails where 1 + erf or 1 + tanh cancels. */
    for (int isa = 0; isa <= 2; isa++) {
        mmb__cpu_force_isa(isa);
        if (isa > 0 && mmb__cpu_isa() < isa) continue;
        for (size_t k = 0; k < sizeof acts / sizeof acts[0]; k++) {
            memcpy(a, x, sizeof x);
            memcpy(b, x, sizeof x);
            mmb__act_forward(a, N, acts[k]);
            mmb__act_forward_ref(b, N, acts[k]);
            double worst = 0;
            for (int i = 0; i < N; i++)
                worst = fmax(worst, fabs((double)a[i] - b[i]) / (4e-6 * fabs((double)b[i]) + 1e-7));
            CHECK(worst <= 1.0, "%s isa %d: error %g of the bound", mmb__act_name(acts[k]), isa, worst);
        }
    }
    mmb__cpu_force_isa(-1);
    /* Known points of the definitions: gelu(0) = 0, silu(x) -> x for large x. */
    float z[2] = {0.0f, 30.0f};
    mmb__act_forward_ref(z, 2, MMB_ACT_SILU);
    CHECK(z[0] == 0.0f && fabsf(z[1] - 30.0f) < 1e-5f, "silu ref %g %g", z[0], z[1]);
    mmb_act parsed;
    CHECK(mmb__act_parse("gelu_pytorch_tanh", &parsed) && parsed == MMB_ACT_GELU_TANH, "parse tanh");
    CHECK(!mmb__act_parse("relu6", &parsed), "relu6 is not supported");
}

static void test_layernorm_and_add(void) {
    enum { M = 7, C = 333 };
    static float x[M * C], w[C], bb[C], a[M * C], r[M * C];
    unsigned s = 2;
    for (int i = 0; i < M * C; i++) x[i] = 3.0f + 5.0f * frand(&s); /* an offset mean stresses the variance */
    for (int i = 0; i < C; i++) { w[i] = frand(&s); bb[i] = frand(&s); }
    mmb__layernorm_forward(a, x, w, bb, M, C, 1e-5f);
    mmb__layernorm_forward_ref(r, x, w, bb, M, C, 1e-5f);
    CHECK(max_diff(a, r, M * C) <= 1e-5, "layernorm: %g", max_diff(a, r, M * C));
    mmb__layernorm_forward(a, x, w, NULL, M, C, 1e-6f);
    mmb__layernorm_forward_ref(r, x, w, NULL, M, C, 1e-6f);
    CHECK(max_diff(a, r, M * C) <= 1e-5, "layernorm no bias: %g", max_diff(a, r, M * C));

    mmb_ctx *ctx;
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = 3;
    CHECK(mmb_ctx_new(&p, &ctx) == MMB_OK, "ctx");
    mmb__layernorm_forward_mt(ctx, a, x, w, bb, M, C, 1e-5f);
    mmb__layernorm_forward_ref(r, x, w, bb, M, C, 1e-5f);
    CHECK(max_diff(a, r, M * C) <= 1e-5, "layernorm mt: %g", max_diff(a, r, M * C));
    memcpy(a, x, sizeof x);
    memcpy(r, x, sizeof x);
    mmb__act_forward_mt(ctx, a, M * C, MMB_ACT_GELU);
    mmb__act_forward_ref(r, M * C, MMB_ACT_GELU);
    CHECK(max_diff(a, r, M * C) <= 1e-4, "gelu mt: %g", max_diff(a, r, M * C));
    for (int64_t n = 1; n < M * C; n += n < 40 ? 13 : M * C / 3) {  /* short and odd lengths too */
        memcpy(a, x, sizeof x);
        mmb__add_forward_mt(ctx, a, a, x + 1, n);  /* in place, as the residual adds run */
        mmb__add_forward_ref(r, x, x + 1, n);
        CHECK(max_diff(a, r, n) == 0 && a[n] == x[n], "add mt n=%lld", (long long)n);
    }
    mmb_ctx_free(ctx);

    mmb__add_forward(a, x, w, C);
    mmb__add_forward_ref(r, x, w, C);
    CHECK(max_diff(a, r, C) == 0, "add");
}

static void test_rmsnorm_and_mul(void) {
    enum { M = 7, C = 333 };
    static float x[M * C], w[C], a[M * C], r[M * C];
    unsigned s = 5;
    for (int i = 0; i < M * C; i++) x[i] = 3.0f + 5.0f * frand(&s);
    for (int i = 0; i < C; i++) w[i] = frand(&s);
    mmb__rmsnorm_forward(a, x, w, M, C, 1e-5f);
    mmb__rmsnorm_forward_ref(r, x, w, M, C, 1e-5f);
    CHECK(max_diff(a, r, M * C) <= 1e-5, "rmsnorm: %g", max_diff(a, r, M * C));
    /* A row of zeros: eps alone keeps it finite (0 out). */
    float z[4] = {0}, wz[4] = {1, 1, 1, 1}, oz[4];
    mmb__rmsnorm_forward(oz, z, wz, 1, 4, 1e-6f);
    CHECK(oz[0] == 0.0f && oz[3] == 0.0f, "rmsnorm of zeros");
    mmb_ctx *ctx;
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = 3;
    CHECK(mmb_ctx_new(&p, &ctx) == MMB_OK, "ctx");
    mmb__rmsnorm_forward_mt(ctx, a, x, w, M, C, 1e-6f);
    mmb__rmsnorm_forward_ref(r, x, w, M, C, 1e-6f);
    CHECK(max_diff(a, r, M * C) <= 1e-5, "rmsnorm mt: %g", max_diff(a, r, M * C));
    mmb_ctx_free(ctx);
    mmb__mul_forward(a, x, x + C, C);
    mmb__mul_forward_ref(r, x, x + C, C);
    CHECK(max_diff(a, r, C) == 0, "mul");
}

static void test_gemm_naive_backend(void) {
    /* The threaded naive path of mmb__linear_forward against the single-threaded oracle. */
    enum { M = 13, N = 17, K = 19 };
    static float A[M * K], W[N * K], b[N], y[M * N], r[M * N];
    unsigned s = 3;
    for (int i = 0; i < M * K; i++) A[i] = frand(&s);
    for (int i = 0; i < N * K; i++) W[i] = frand(&s);
    for (int i = 0; i < N; i++) b[i] = frand(&s);
    mmb_tensor wt = {.name = "w", .dtype = MMB_F32, .ndim = 2, .shape = {N, K}, .data = W};
    mmb_tensor bt = {.name = "b", .dtype = MMB_F32, .ndim = 1, .shape = {N}, .data = b};
    for (int backend = MMB_GEMM_NAIVE; backend <= MMB_GEMM_OPENBLAS; backend++) {
        mmb_ctx *ctx;
        mmb_ctx_params p = {.n_threads = 2, .gemm = (mmb_gemm_backend)backend};
        if (mmb_ctx_new(&p, &ctx) != MMB_OK) continue; /* a backend this build lacks */
        mmb_linear l;
        CHECK(mmb__linear_init(ctx, &l, &wt, &bt) == MMB_OK, "linear init");
        mmb__linear_forward(ctx, y, A, M, &l);
        mmb__gemm_ref(r, A, W, b, M, N, K);
        CHECK(max_diff(y, r, M * N) <= 1e-5, "backend %d: %g", backend, max_diff(y, r, M * N));
        mmb__linear_free(&l);
        mmb_ctx_free(ctx);
    }
}

static void test_half(void) {
    /* Every f16 bit pattern survives f16 -> f32 -> f16 (NaNs stay NaN). */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = mmb__f16_to_f32((uint16_t)h);
        uint16_t back = mmb__f32_to_f16(f);
        if (isnan(f) ? !isnan(mmb__f16_to_f32(back)) : back != h) bad++;
    }
    CHECK(bad == 0, "%d f16 patterns do not round-trip", bad);
    bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = mmb__bf16_to_f32((uint16_t)h);
        if (!isnan(f) && mmb__f32_to_bf16(f) != h) bad++;
    }
    CHECK(bad == 0, "%d bf16 patterns do not round-trip", bad);
    CHECK(mmb__f16_to_f32(0x3c00) == 1.0f && mmb__f16_to_f32(0xc000) == -2.0f, "f16 constants");
    CHECK(mmb__f16_to_f32(0x0001) == ldexpf(1.0f, -24), "smallest f16 subnormal");
    CHECK(mmb__f32_to_f16(65520.0f) == 0x7c00, "65520 rounds to f16 inf");
    CHECK(mmb__f32_to_bf16(1.00390625f) == 0x3f80, "bf16 ties to even");
}

static void test_pool_split(void) {
    int64_t covered = 0, prev = 0;
    for (int t = 0; t < 5; t++) {
        int64_t lo, hi;
        mmb__split(23, t, 5, &lo, &hi);
        CHECK(lo == prev && hi - lo >= 4 && hi - lo <= 5, "split %d: [%lld,%lld)", t, (long long)lo, (long long)hi);
        covered += hi - lo;
        prev = hi;
    }
    CHECK(covered == 23, "split covers %lld", (long long)covered);
}

/* ---- tensor/conv.c: depthwise 3x3 at stride 1 and 2 (odd and even sizes, with and without bias), adaptive
 * average pooling down (overlapping bins), to the same size and up; threaded = single-threaded. */

static mmb_ctx *conv_ctx(int threads) {
    mmb_ctx *ctx = NULL;
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = threads;
    CHECK(mmb_ctx_new(&p, &ctx) == MMB_OK, "ctx");
    return ctx;
}

static void test_dwconv(mmb_ctx *ctx) {
    const int64_t sizes[][3] = {{2, 5, 7}, {1, 4, 4}, {3, 1, 1}, {1, 24, 24}};
    unsigned s = 3;
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++)
        for (int stride = 1; stride <= 2; stride++)
            for (int bias = 0; bias < 2; bias++) {
                int64_t B = sizes[k][0], H = sizes[k][1], W = sizes[k][2], C = 13;
                int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1, n = B * H * W * C, m = B * Ho * Wo * C;
                float *x = malloc((size_t)n * sizeof(float)), *w = malloc(9 * C * sizeof(float));
                float *w9 = malloc(9 * C * sizeof(float)), *b = malloc(C * sizeof(float));
                float *got = malloc((size_t)m * sizeof(float)), *mt = malloc((size_t)m * sizeof(float));
                float *ref = malloc((size_t)m * sizeof(float));
                for (int64_t i = 0; i < n; i++) x[i] = frand(&s);
                for (int64_t i = 0; i < 9 * C; i++) w[i] = frand(&s);
                for (int64_t i = 0; i < C; i++) b[i] = frand(&s);
                mmb__dwconv3x3_pack(w9, w, C);
                mmb__dwconv3x3_forward(got, x, w9, bias ? b : NULL, B, H, W, C, stride);
                mmb__dwconv3x3_forward_mt(ctx, mt, x, w9, bias ? b : NULL, B, H, W, C, stride);
                mmb__dwconv3x3_forward_ref(ref, x, w, bias ? b : NULL, B, H, W, C, stride);
                CHECK(max_diff(got, ref, m) <= 1e-5, "dwconv %lldx%lldx%lld stride %d bias %d: %g", (long long)B,
                      (long long)H, (long long)W, stride, bias, max_diff(got, ref, m));
                CHECK(max_diff(mt, got, m) == 0, "dwconv threaded differs: %g", max_diff(mt, got, m));
                free(x); free(w); free(w9); free(b); free(got); free(mt); free(ref);
            }
    /* A known case: all-ones 3x3 kernel on a ones map sums the in-bounds neighbours (4 at a corner). */
    float x[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, w[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, o[9];
    mmb__dwconv3x3_forward_ref(o, x, w, NULL, 1, 3, 3, 1, 1);
    CHECK(o[0] == 4 && o[1] == 6 && o[4] == 9, "dwconv ref corners %g %g %g", o[0], o[1], o[4]);
}

static void test_pool(mmb_ctx *ctx) {
    const int64_t cases[][4] = {{5, 5, 3, 3}, {24, 24, 12, 12}, {4, 4, 4, 4}, {2, 3, 3, 5}, {7, 4, 2, 3}, {4, 4, 12, 12}};
    unsigned s = 5;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int64_t B = 2, H = cases[k][0], W = cases[k][1], Ho = cases[k][2], Wo = cases[k][3], C = 9;
        int64_t n = B * H * W * C, m = B * Ho * Wo * C;
        float *x = malloc((size_t)n * sizeof(float)), *got = malloc((size_t)m * sizeof(float));
        float *mt = malloc((size_t)m * sizeof(float)), *ref = malloc((size_t)m * sizeof(float));
        for (int64_t i = 0; i < n; i++) x[i] = frand(&s);
        mmb__adaptive_avgpool2d_forward(got, x, B, H, W, C, Ho, Wo);
        mmb__adaptive_avgpool2d_forward_mt(ctx, mt, x, B, H, W, C, Ho, Wo);
        mmb__adaptive_avgpool2d_forward_ref(ref, x, B, H, W, C, Ho, Wo);
        CHECK(max_diff(got, ref, m) <= 1e-6, "pool %lldx%lld -> %lldx%lld: %g", (long long)H, (long long)W,
              (long long)Ho, (long long)Wo, max_diff(got, ref, m));
        CHECK(max_diff(mt, got, m) == 0, "pool threaded differs");
        if (H == Ho && W == Wo) CHECK(max_diff(got, x, m) <= 1e-7, "pool to the same size is the identity");
        free(x); free(got); free(mt); free(ref);
    }
    /* 5 -> 3 bins are [0,2), [1,4), [3,5): the middle one overlaps both. */
    float x[5] = {1, 2, 4, 8, 16}, o[3];
    mmb__adaptive_avgpool2d_forward_ref(o, x, 1, 1, 5, 1, 1, 3);
    CHECK(o[0] == 1.5f && fabsf(o[1] - 14.0f / 3.0f) < 1e-6f && o[2] == 12.0f, "pool bins %g %g %g", o[0], o[1], o[2]);
}


/* ---- tensor/conv2d.c: Conv2d through the GEMM (3x3 pad 1, Chameleon's pad (0,1,0,1) stride 2, 1x1, a
 * rectangular kernel, several tiles), GroupNorm (+SiLU), nearest resize; threaded against the oracles. */

static float *frands(unsigned *s, int64_t n) {
    float *p = malloc((size_t)(n ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) p[i] = frand(s);
    return p;
}

static double max_abs(const float *a, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i]));
    return m;
}

static void test_conv2d(mmb_ctx *ctx) {
    const struct { int64_t B, H, W, cin, cout; int kh, kw, stride, pad[4]; } cases[] = {
        {2, 7, 5, 3, 32, 3, 3, 1, {1, 1, 1, 1}},    /* conv_in */
        {1, 8, 8, 32, 32, 3, 3, 2, {0, 0, 1, 1}},   /* Chameleon/Janus downsample */
        {1, 9, 6, 16, 8, 3, 3, 2, {0, 0, 1, 1}},    /* odd sides */
        {2, 6, 6, 32, 64, 1, 1, 1, {0, 0, 0, 0}},   /* nin_shortcut: a plain GEMM */
        {1, 5, 7, 4, 6, 2, 3, 1, {1, 0, 0, 2}},     /* rectangular kernel, uneven padding */
        {1, 48, 48, 64, 16, 3, 3, 1, {1, 1, 1, 1}}, /* 2304 pixels, K = 576: more than one im2col tile */
    };
    unsigned s = 11;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        mmb_conv2d g = {.cin = cases[k].cin, .cout = cases[k].cout, .kh = cases[k].kh, .kw = cases[k].kw,
                        .stride = cases[k].stride};
        memcpy(g.pad, cases[k].pad, sizeof g.pad);
        int64_t B = cases[k].B, H = cases[k].H, W = cases[k].W, K = g.cin * g.kh * g.kw;
        int64_t Ho = mmb__conv2d_out_h(&g, H), Wo = mmb__conv2d_out_w(&g, W), m = B * Ho * Wo * g.cout;
        float *x = frands(&s, B * H * W * g.cin), *w = frands(&s, g.cout * K), *b = frands(&s, g.cout);
        float *got = malloc((size_t)m * sizeof(float)), *ref = malloc((size_t)m * sizeof(float));
        float *scratch = malloc((mmb__conv2d_scratch(&g, B, H, W) + 1) * sizeof(float));
        mmb_tensor wt = {.name = "w", .dtype = MMB_F32, .ndim = 2, .shape = {g.cout, K}, .data = w};
        mmb_tensor bt = {.name = "b", .dtype = MMB_F32, .ndim = 1, .shape = {g.cout}, .data = b};
        mmb_linear l;
        CHECK(mmb__linear_init(ctx, &l, &wt, &bt) == MMB_OK, "conv2d linear");
        mmb__conv2d_forward(ctx, got, x, &l, &g, B, H, W, scratch);
        mmb__conv2d_forward_ref(ref, x, w, b, &g, B, H, W);
        double d = max_diff(got, ref, m), mag = max_abs(ref, m);
        CHECK(d <= 1e-5 * (1 + mag), "conv2d case %zu (%lldx%lld -> %lldx%lld): %g", k, (long long)H, (long long)W,
              (long long)Ho, (long long)Wo, d);
        if (k == 1) {  /* symmetric padding 1 instead of (0, 1, 0, 1): same output size, far off */
            mmb_conv2d sym = g;
            sym.pad[0] = sym.pad[1] = sym.pad[2] = sym.pad[3] = 1;
            CHECK(mmb__conv2d_out_h(&sym, H) == Ho, "same size");
            mmb__conv2d_forward_ref(got, x, w, b, &sym, B, H, W);
            CHECK(max_diff(got, ref, m) > 0.1 * mag, "symmetric padding should differ: %g", max_diff(got, ref, m));
        }
        mmb__linear_free(&l);
        free(x); free(w); free(b); free(got); free(ref); free(scratch);
    }
    mmb_conv2d g = {.cin = 1, .cout = 1, .kh = 3, .kw = 3, .stride = 2, .pad = {0, 0, 1, 1}};
    CHECK(mmb__conv2d_out_h(&g, 8) == 4 && mmb__conv2d_out_w(&g, 9) == 4, "stride-2 output size");
}

static void test_groupnorm(mmb_ctx *ctx) {
    const int64_t cases[][4] = {{2, 35, 64, 32}, {1, 1, 32, 32}, {1, 4096, 128, 32}, {3, 7, 24, 8}};
    unsigned s = 13;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++)
        for (int silu = 0; silu < 2; silu++) {
            int64_t B = cases[k][0], HW = cases[k][1], C = cases[k][2], n = B * HW * C;
            int G = (int)cases[k][3];
            CHECK(mmb__groupnorm_ok(C, G), "groupnorm ok");
            float *x = frands(&s, n), *w = frands(&s, C), *b = frands(&s, C);
            for (int64_t i = 0; i < n; i++) x[i] = 3.0f + 2.0f * x[i];  /* an offset mean, as activations have */
            float *got = malloc((size_t)n * sizeof(float)), *ref = malloc((size_t)n * sizeof(float));
            double *scr = malloc(mmb__groupnorm_scratch(mmb__pool_size(ctx->pool), G));
            mmb__groupnorm_forward_mt(ctx, got, x, w, b, B, HW, C, G, 1e-6f, silu, scr);
            mmb__groupnorm_forward_ref(ref, x, w, b, B, HW, C, G, 1e-6f, silu);
            CHECK(max_diff(got, ref, n) <= 1e-5, "groupnorm %lldx%lldx%lld G %d silu %d: %g", (long long)B,
                  (long long)HW, (long long)C, G, silu, max_diff(got, ref, n));
            memcpy(got, x, (size_t)n * sizeof(float));  /* in place */
            mmb__groupnorm_forward_mt(ctx, got, got, w, b, B, HW, C, G, 1e-6f, silu, scr);
            CHECK(max_diff(got, ref, n) <= 1e-5, "groupnorm in place: %g", max_diff(got, ref, n));
            if (G > 1 && HW > 1) {  /* LayerNorm over each pixel's channels (G = 1 per row) is far off */
                mmb__layernorm_forward_ref(got, x, w, b, B * HW, C, 1e-6f);
                if (silu) mmb__act_forward_ref(got, n, MMB_ACT_SILU);
                CHECK(max_diff(got, ref, n) > 0.05, "per-pixel norm should differ: %g", max_diff(got, ref, n));
            }
            free(x); free(w); free(b); free(got); free(ref); free(scr);
        }
    CHECK(!mmb__groupnorm_ok(48, 32) && !mmb__groupnorm_ok(16, 32), "groupnorm refuses C not a multiple of G");
}

static void test_resize_nearest(mmb_ctx *ctx) {
    const int64_t cases[][4] = {{4, 5, 8, 10}, {3, 3, 3, 3}, {5, 7, 3, 4}, {3, 4, 7, 9}, {2, 2, 5, 1}};
    unsigned s = 17;
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int64_t B = 2, H = cases[k][0], W = cases[k][1], Ho = cases[k][2], Wo = cases[k][3], C = 5;
        int64_t m = B * Ho * Wo * C;
        float *x = frands(&s, B * H * W * C), *got = malloc((size_t)m * sizeof(float));
        float *ref = malloc((size_t)m * sizeof(float));
        mmb__resize_nearest_mt(ctx, got, x, B, H, W, C, Ho, Wo);
        mmb__resize_nearest_ref(ref, x, B, H, W, C, Ho, Wo);
        CHECK(max_diff(got, ref, m) == 0, "resize %lldx%lld -> %lldx%lld", (long long)H, (long long)W,
              (long long)Ho, (long long)Wo);
        if (Ho == 2 * H && Wo == 2 * W) {
            mmb__upsample2x_nearest_mt(ctx, got, x, B, H, W, C);
            CHECK(max_diff(got, ref, m) == 0, "upsample 2x");
            /* pixel (1, 1) of the output is input (0, 0), (2, 3) is (1, 1) */
            CHECK(got[(1 * Wo + 1) * C] == x[0] && got[(2 * Wo + 3) * C + 4] == x[(1 * W + 1) * C + 4], "2x rule");
        }
        free(x); free(got); free(ref);
    }
    /* 3 -> 7: floor(dst * 3/7) = 0 0 0 1 1 2 2 */
    float x[3] = {10, 20, 30}, o[7];
    mmb__resize_nearest_ref(o, x, 1, 1, 3, 1, 1, 7);
    CHECK(o[2] == 10 && o[3] == 20 && o[4] == 20 && o[5] == 30 && o[6] == 30, "3 -> 7 indices");
}

/* The channels-last convolution kernels (tensor/conv.c) on 1 and 3 threads. */
static void test_conv(void) {
    for (int threads = 1; threads <= 3; threads += 2) {
        mmb_ctx *ctx = conv_ctx(threads);
        if (!ctx) break;
        test_dwconv(ctx);
        test_pool(ctx);
        test_conv2d(ctx);
        test_groupnorm(ctx);
        test_resize_nearest(ctx);
        mmb_ctx_free(ctx);
    }
}

int main(void) {
    test_acts();
    test_layernorm_and_add();
    test_rmsnorm_and_mul();
    test_gemm_naive_backend();
    test_half();
    test_pool_split();
    test_conv();
    return DONE("kernels");
}
