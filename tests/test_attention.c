/* The blocked, threaded attention against the naive full-score oracle, over token counts that
 * straddle the tile sizes (key blocks of 126 rounded up to the kernel's rows, query blocks of up to
 * 640 in panels of 32),
 * head sizes that are and are not multiples of the micro-kernels' rows (4, 6, 14), thread counts,
 * large logits (the online softmax must rescale correctly), and every micro-kernel the CPU has. */
#include "check.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>

static float frand(unsigned *s) {
    *s = *s * 1664525u + 1013904223u;
    return ((float)(*s >> 8) / 16777216.0f) * 2.0f - 1.0f;
}

int main(void) {
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
                mmb__gemm_own_force_isa(isa);
                if (isa > 0 && mmb__gemm_own_isa() < isa) continue; /* the CPU lacks it */
                mmb__attention_forward(ctxs[run % 2], o, qkv, B, T, H, hd, sc);
                double worst = 0;
                for (int64_t i = 0; i < B * T * D; i++) worst = fmax(worst, fabs((double)o[i] - r[i]));
                CHECK(worst <= 1e-5 * amp, "T=%lld hd=%lld threads=%d isa=%d amp=%g: max diff %g", (long long)T,
                      (long long)hd, threads, isa, amp, worst);
            }
            free(qkv); free(o); free(r); free(sc);
        }
    for (int c = 0; c < 2; c++) mmb_ctx_free(ctxs[c]);
    mmb__gemm_own_force_isa(-1);
    return DONE("attention");
}
