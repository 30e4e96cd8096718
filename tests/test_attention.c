/* The blocked, threaded attention against the naive full-score oracle, over token counts that
 * straddle the tile sizes, several head sizes and thread counts, and large logits (the online
 * softmax must rescale correctly); and cross-attention (separate Q, K, V with row strides wider than
 * the heads, fewer or more queries than keys) against its oracle. */
#include "check.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((float)(*s >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

int main(void) {
    const int64_t tokens[] = {1, 5, 31, 32, 33, 64, 65, 197, 577};
    const int64_t hds[] = {8, 64, 72};
    for (int threads = 1; threads <= 3; threads += 2) {
        mmb_ctx *ctx;
        mmb_ctx_params p = {.n_threads = threads, .gemm = MMB_GEMM_NAIVE};
        if (mmb_ctx_new(&p, &ctx) != MMB_OK) return 1;
        for (size_t ti = 0; ti < sizeof tokens / sizeof tokens[0]; ti++)
            for (size_t hi = 0; hi < sizeof hds / sizeof hds[0]; hi++) {
                int64_t T = tokens[ti], hd = hds[hi], H = 3, B = 2, D = H * hd;
                if (T == 577 && hd != 64) continue;
                float amp = ti % 2 ? 6.0f : 1.0f; /* large scores make exp overflow without max-subtraction */
                size_t n = (size_t)(B * T * 3 * D);
                float *qkv = malloc(n * sizeof(float)), *o = malloc((size_t)(B * T * D) * sizeof(float));
                float *r = malloc((size_t)(B * T * D) * sizeof(float));
                float *sc = malloc(mmb__attention_scratch(threads, hd) * sizeof(float));
                unsigned s = (unsigned)(T * 131 + hd);
                for (size_t i = 0; i < n; i++) qkv[i] = amp * frand(&s);
                mmb__attention_forward(ctx, o, qkv, B, T, H, hd, sc);
                CHECK(mmb__attention_forward_ref(r, qkv, B, T, H, hd), "ref alloc");
                double worst = 0;
                for (int64_t i = 0; i < B * T * D; i++) worst = fmax(worst, fabs((double)o[i] - r[i]));
                CHECK(worst <= 1e-5 * amp, "T=%lld hd=%lld threads=%d amp=%g: max diff %g", (long long)T,
                      (long long)hd, threads, amp, worst);
                free(qkv); free(o); free(r); free(sc);
            }
        /* Cross-attention: q (B, tq, ldq), k and v interleaved in one (B, tk, 2 * D + 3) buffer. */
        const int64_t pairs[][2] = {{1, 1}, {4, 69}, {33, 7}, {64, 321}};
        for (size_t pi = 0; pi < sizeof pairs / sizeof pairs[0]; pi++) {
            int64_t tq = pairs[pi][0], tk = pairs[pi][1], H = 2, hd = 24, B = 2, D = H * hd;
            int64_t ldq = D + 5, ldkv = 2 * D + 3;
            size_t nq = (size_t)(B * tq * ldq), nkv = (size_t)(B * tk * ldkv), no = (size_t)(B * tq * D);
            float *q = malloc(nq * sizeof(float)), *kv = malloc(nkv * sizeof(float));
            float *o = malloc(no * sizeof(float)), *r = malloc(no * sizeof(float));
            float *sc = malloc(mmb__attention_scratch(threads, hd) * sizeof(float));
            unsigned s = (unsigned)(tq * 7 + tk);
            for (size_t i = 0; i < nq; i++) q[i] = 4.0f * frand(&s);
            for (size_t i = 0; i < nkv; i++) kv[i] = 4.0f * frand(&s);
            mmb__cross_attention_forward(ctx, o, q, kv, kv + D, ldq, ldkv, B, tq, tk, H, hd, sc);
            CHECK(mmb__cross_attention_forward_ref(r, q, kv, kv + D, ldq, ldkv, B, tq, tk, H, hd), "ref alloc");
            double worst = 0;
            for (size_t i = 0; i < no; i++) worst = fmax(worst, fabs((double)o[i] - r[i]));
            CHECK(worst <= 4e-5, "cross tq=%lld tk=%lld threads=%d: max diff %g", (long long)tq, (long long)tk,
                  threads, worst);
            free(q); free(kv); free(o); free(r); free(sc);
        }
        mmb_ctx_free(ctx);
    }
    return DONE("attention");
}
