/* The blocked, threaded attention (self and cross) against the naive full-score oracle, over token
 * counts that straddle the tile sizes (key blocks of 126 rounded up to the kernel's rows, query blocks
 * of up to 640 in panels of 32), head sizes that are and are not multiples of the micro-kernels' rows
 * (4, 6, 14), thread counts, large logits (the online softmax must rescale correctly), and every
 * micro-kernel the CPU has. */
#include "check.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((float)(*s >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

/* Cross-attention with grouped K/V heads (Idefics2's perceiver): q (B, tq, ldq) over k, v (B, tk, ldkv)
 * with kv_heads < heads, against the oracle, and the oracle against itself on K/V expanded to every
 * head (transformers' repeat_kv). */
static void test_cross_gqa(void) {
    const int64_t tqs[] = {1, 4, 33}, tks[] = {5, 70}, kvs[] = {1, 2, 4};
    const int64_t B = 2, H = 4, hd = 8, D = H * hd, ldq = D + 3;
    mmb_ctx *ctx;
    mmb_ctx_params p = {.n_threads = 3, .gemm = MMB_GEMM_NAIVE};
    if (mmb_ctx_new(&p, &ctx) != MMB_OK) { CHECK(0, "ctx"); return; }
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < 2; b++)
            for (size_t c = 0; c < 3; c++) {
                int64_t tq = tqs[a], tk = tks[b], KV = kvs[c], ldkv = 2 * KV * hd + 1;
                float *q = malloc(sizeof(float) * (size_t)(B * tq * ldq)), *kv = malloc(sizeof(float) * (size_t)(B * tk * ldkv));
                float *kx = malloc(sizeof(float) * (size_t)(B * tk * 2 * D));
                float *o = malloc(sizeof(float) * (size_t)(B * tq * D)), *r = malloc(sizeof(float) * (size_t)(B * tq * D));
                float *rx = malloc(sizeof(float) * (size_t)(B * tq * D));
                float *sc = malloc(mmb__attention_scratch(3, hd) * sizeof(float));
                unsigned s = (unsigned)(tq * 7 + tk * 3 + KV);
                for (int64_t i = 0; i < B * tq * ldq; i++) q[i] = 3.0f * frand(&s);
                for (int64_t i = 0; i < B * tk * ldkv; i++) kv[i] = 3.0f * frand(&s);
                for (int64_t i = 0; i < B * tk; i++)  /* repeat_kv: head h gets K/V head h / (H / KV) */
                    for (int64_t h = 0; h < H; h++)
                        for (int64_t d = 0; d < hd; d++) {
                            kx[i * 2 * D + h * hd + d] = kv[i * ldkv + h / (H / KV) * hd + d];
                            kx[i * 2 * D + D + h * hd + d] = kv[i * ldkv + KV * hd + h / (H / KV) * hd + d];
                        }
                mmb__cross_attention_forward(ctx, o, q, kv, kv + KV * hd, ldq, ldkv, B, tq, tk, H, KV, hd, sc);
                CHECK(mmb__cross_attention_forward_ref(r, q, kv, kv + KV * hd, ldq, ldkv, B, tq, tk, H, KV, hd), "ref");
                CHECK(mmb__cross_attention_forward_ref(rx, q, kx, kx + D, ldq, 2 * D, B, tq, tk, H, H, hd), "ref");
                double worst = 0, wx = 0;
                for (int64_t i = 0; i < B * tq * D; i++) {
                    worst = fmax(worst, fabs((double)o[i] - r[i]));
                    wx = fmax(wx, fabs((double)rx[i] - r[i]));
                }
                CHECK(worst <= 3e-5 && wx <= 1e-6, "cross tq=%lld tk=%lld kv=%lld: %g (repeat_kv %g)", (long long)tq,
                      (long long)tk, (long long)KV, worst, wx);
                free(q); free(kv); free(kx); free(o); free(r); free(rx); free(sc);
            }
    mmb_ctx_free(ctx);
}

int main(void) {
    test_cross_gqa();
    const int64_t tokens[] = {1, 5, 31, 32, 33, 64, 65, 126, 127, 197, 321, 577, 641};
    const int64_t hds[] = {7, 8, 64, 72};
    mmb_ctx *ctxs[2];
    for (int c = 0; c < 2; c++) {
        mmb_ctx_params p = {.n_threads = c ? 3 : 1, .gemm = MMB_GEMM_NAIVE};
        if (mmb_ctx_new(&p, &ctxs[c]) != MMB_OK) return 1;
    }
    for (size_t ti = 0; ti < sizeof tokens / sizeof tokens[0]; ti++)
        for (size_t hi = 0; hi < sizeof hds / sizeof hds[0]; hi++) {
            int64_t T = tokens[ti], hd = hds[hi], big = T >= 321, H = big ? 2 : 3, B = big ? 1 : 2, D = H * hd;
            if (big && hd != 64) continue; /* the oracle is slow (minutes under ASan otherwise) */
            float amp = ti % 2 ? 6.0f : 1.0f; /* large scores make exp overflow without max-subtraction */
            size_t n = (size_t)(B * T * 3 * D);
            float *qkv = malloc(n * sizeof(float)), *o = malloc((size_t)(B * T * D) * sizeof(float));
            float *r = malloc((size_t)(B * T * D) * sizeof(float));
            float *sc = malloc(mmb__attention_scratch(3, hd) * sizeof(float));
            unsigned s = (unsigned)(T * 131 + hd);
            for (size_t i = 0; i < n; i++) qkv[i] = amp * frand(&s);
            CHECK(mmb__attention_forward_ref(r, qkv, B, T, H, hd), "ref alloc");
            for (int run = 0; run < 6; run++) {
                int isa = run / 2, threads = run % 2 ? 3 : 1;  /* scalar, AVX2, AVX-512 micro-kernels */
                mmb__cpu_force_isa(isa);
                if (isa > 0 && mmb__cpu_isa() < isa) continue; /* the CPU lacks it */
                mmb__attention_forward(ctxs[run % 2], o, qkv, B, T, H, hd, sc);
                double worst = 0;
                for (int64_t i = 0; i < B * T * D; i++) worst = fmax(worst, fabs((double)o[i] - r[i]));
                CHECK(worst <= 1e-5 * amp, "T=%lld hd=%lld threads=%d isa=%d amp=%g: max diff %g", (long long)T,
                      (long long)hd, threads, isa, amp, worst);
            }
            free(qkv); free(o); free(r); free(sc);
        }
    /* cross-attention with a fused [k | v] buffer: query counts against key counts on both sides of the
     * tiles, on every micro-kernel and both thread counts */
    const int64_t nqs[] = {1, 8, 32, 33}, nks[] = {1, 5, 64, 65, 257};
    for (size_t qi = 0; qi < sizeof nqs / sizeof nqs[0]; qi++)
        for (size_t ki = 0; ki < sizeof nks / sizeof nks[0]; ki++) {
            int64_t NQ = nqs[qi], NK = nks[ki], hd = 8 + 24 * (int64_t)(ki % 2), H = 3, B = 2, D = H * hd;
            float amp = qi % 2 ? 6.0f : 1.0f;
            float *q = malloc((size_t)(B * NQ * D) * sizeof(float)), *kv = malloc((size_t)(B * NK * 2 * D) * sizeof(float));
            float *o = malloc((size_t)(B * NQ * D) * sizeof(float)), *r = malloc((size_t)(B * NQ * D) * sizeof(float));
            float *sc = malloc(mmb__attention_scratch(3, hd) * sizeof(float));
            unsigned s = (unsigned)(NQ * 977 + NK);
            for (int64_t i = 0; i < B * NQ * D; i++) q[i] = amp * frand(&s);
            for (int64_t i = 0; i < B * NK * 2 * D; i++) kv[i] = amp * frand(&s);
            CHECK(mmb__cross_attention_forward_ref(r, q, kv, kv + D, D, 2 * D, B, NQ, NK, H, H, hd), "ref alloc");
            for (int run = 0; run < 6; run++) {
                int isa = run / 2, threads = run % 2 ? 3 : 1;
                mmb__cpu_force_isa(isa);
                if (isa > 0 && mmb__cpu_isa() < isa) continue;
                mmb__cross_attention_forward(ctxs[run % 2], o, q, kv, kv + D, D, 2 * D, B, NQ, NK, H, H, hd, sc);
                double worst = 0;
                for (int64_t i = 0; i < B * NQ * D; i++) worst = fmax(worst, fabs((double)o[i] - r[i]));
                CHECK(worst <= 1e-5 * amp, "cross nq=%lld nk=%lld hd=%lld isa=%d threads=%d: max diff %g",
                      (long long)NQ, (long long)NK, (long long)hd, isa, threads, worst);
            }
            free(q); free(kv); free(o); free(r); free(sc);
        }
    for (int c = 0; c < 2; c++) mmb_ctx_free(ctxs[c]);
    mmb__cpu_force_isa(-1);
    return DONE("attention");
}
