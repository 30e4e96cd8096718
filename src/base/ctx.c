/* The context: thread pool, GEMM backend, error message. */
#include "base/base.h"

#include <stdlib.h>
#include <time.h>
#include <unistd.h>

mmb_ctx_params mmb_ctx_default_params(void) {
    return (mmb_ctx_params){.n_threads = 0, .gemm = MMB_GEMM_AUTO, .weight_dtype = MMB_F32};
}

mmb_status mmb_ctx_new(const mmb_ctx_params *p, mmb_ctx **out) {
    if (!p || !out) return MMB_ERR_ARG;
    mmb_gemm_backend g = p->gemm;
    if (g == MMB_GEMM_AUTO) g = MMB_GEMM_OWN; /* measured default: docs/decisions.md */
#ifndef MMB_HAVE_OPENBLAS
    if (g == MMB_GEMM_OPENBLAS) return MMB_ERR_ARG;
#endif
    if (g < MMB_GEMM_AUTO || g > MMB_GEMM_OPENBLAS) return MMB_ERR_ARG;
    mmb_dtype wd = (mmb_dtype)p->weight_dtype; /* the weight dtypes the kernels compute with */
    if (wd != MMB_F32 && wd != MMB_BF16 && wd != MMB_F16 && wd != MMB_I8) return MMB_ERR_ARG;
    mmb_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return MMB_ERR_NOMEM;
    int n = p->n_threads;
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    if (mmb__pool_new(n, &ctx->pool) != MMB_OK) { free(ctx); return MMB_ERR_NOMEM; }
    ctx->gemm = g;
    ctx->weight_dtype = (mmb_dtype)p->weight_dtype;
    *out = ctx;
    return MMB_OK;
}

void mmb_ctx_free(mmb_ctx *ctx) {
    if (!ctx) return;
    mmb__pool_free(ctx->pool);
    mmb__arena_free(&ctx->arena);
    mmb__arena_free(&ctx->feats);
    free(ctx);
}

int mmb_ctx_threads(const mmb_ctx *ctx) { return mmb__pool_size(ctx->pool); }

double mmb__now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}
