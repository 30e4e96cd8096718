/* The blocked, threaded attention (self and cross) against the naive full-score oracle, over token
 * counts that straddle the tile sizes, several head sizes and thread counts, and large logits (the
 * online softmax must rescale correctly). */
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
        /* cross-attention: query counts against key counts on both sides of the tiles */
        const int64_t nqs[] = {1, 8, 32, 33}, nks[] = {1, 5, 64, 65, 257};
        for (size_t qi = 0; qi < sizeof nqs / sizeof nqs[0]; qi++)
            for (size_t ki = 0; ki < sizeof nks / sizeof nks[0]; ki++) {
                int64_t NQ = nqs[qi], NK = nks[ki], hd = 8 + 24 * (int64_t)(ki % 2), H = 3, B = 2, D = H * hd;
                float amp = qi % 2 ? 6.0f : 1.0f;
                float *q = malloc((size_t)(B * NQ * D) * sizeof(float)), *kv = malloc((size_t)(B * NK * 2 * D) * sizeof(float));
                float *o = malloc((size_t)(B * NQ * D) * sizeof(float)), *r = malloc((size_t)(B * NQ * D) * sizeof(float));
                float *sc = malloc(mmb__attention_scratch(threads, hd) * sizeof(float));
                unsigned s = (unsigned)(NQ * 977 + NK);
                for (int64_t i = 0; i < B * NQ * D; i++) q[i] = amp * frand(&s);
                for (int64_t i = 0; i < B * NK * 2 * D; i++) kv[i] = amp * frand(&s);
                mmb__attention_cross_forward(ctx, o, q, kv, B, NQ, NK, H, hd, sc);
                CHECK(mmb__attention_cross_forward_ref(r, q, kv, B, NQ, NK, H, hd), "ref alloc");
                double worst = 0;
                for (int64_t i = 0; i < B * NQ * D; i++) worst = fmax(worst, fabs((double)o[i] - r[i]));
                CHECK(worst <= 1e-5 * amp, "cross nq=%lld nk=%lld hd=%lld threads=%d: max diff %g", (long long)NQ,
                      (long long)NK, (long long)hd, threads, worst);
                free(q); free(kv); free(o); free(r); free(sc);
            }
        mmb_ctx_free(ctx);
    }
    return DONE("attention");
}
