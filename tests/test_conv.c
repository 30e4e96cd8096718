/* The channels-last convolution kernels (tensor/conv.c) against their references: depthwise 3x3 at
 * stride 1 and 2 on odd and even sizes, with and without bias, single- and multi-threaded; adaptive
 * average pooling down (bins that overlap), to the same size, and up. */
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

static mmb_ctx *make_ctx(int threads) {
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

int main(void) {
    for (int threads = 1; threads <= 3; threads += 2) {
        mmb_ctx *ctx = make_ctx(threads);
        if (!ctx) break;
        test_dwconv(ctx);
        test_pool(ctx);
        mmb_ctx_free(ctx);
    }
    return DONE("test_conv");
}
