/* Every elementwise/norm kernel against its naive reference, plus half/bfloat16 conversions. */
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
    const mmb_act acts[] = {MMB_ACT_GELU, MMB_ACT_GELU_TANH, MMB_ACT_QUICK_GELU, MMB_ACT_SILU};
    /* Every implementation (libm, AVX2, AVX-512 where the CPU has them): within a few ulp of the
     * double reference: relative, plus 1e-7 absolute for the tails where 1 + erf or 1 + tanh cancels. */
    for (int isa = 0; isa <= 2; isa++) {
        mmb__gemm_own_force_isa(isa);
        if (isa > 0 && mmb__gemm_own_isa() < isa) continue;
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
    mmb__gemm_own_force_isa(-1);
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

int main(void) {
    test_acts();
    test_layernorm_and_add();
    test_gemm_naive_backend();
    test_half();
    test_pool_split();
    return DONE("kernels");
}
