/* Linear layers: weight binding, pre-packing at load, and the GEMM backend dispatch. */
#include "tensor/tensor.h"

#include <stdlib.h>
#include <string.h>
#ifdef MMB_HAVE_OPENBLAS
#include <cblas.h>
#endif

void mmb__gemm_ref(float *C, const float *A, const float *W, const float *bias,
                   int64_t M, int64_t N, int64_t K) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double acc = bias ? bias[n] : 0.0;
            for (int64_t k = 0; k < K; k++) acc += (double)A[m * K + k] * W[n * K + k];
            C[m * N + n] = (float)acc;
        }
}

static bool f32_in_place(const mmb_tensor *t) { return t->dtype == MMB_F32 && ((uintptr_t)t->data % 4) == 0; }

/* Returns an f32 view of t: the mapped data itself when t is f32, else a converted copy in *owned. */
static mmb_status f32_view(mmb_ctx *ctx, const mmb_tensor *t, const float **view, float **owned) {
    size_t n = (size_t)mmb_tensor_numel(t);
    if (f32_in_place(t)) {
        *view = t->data;
        return MMB_OK;
    }
    *owned = malloc(n ? n * sizeof(float) : 1);
    if (!*owned) return mmb__err(ctx, MMB_ERR_NOMEM, "tensor '%s': cannot allocate %zu floats", t->name, n);
    mmb_to_f32(*owned, t->data, t->dtype, n);
    *view = *owned;
    return MMB_OK;
}

/* f16 holds magnitudes below 65520 (larger ones round to infinity): refuse the rest by name. */
static mmb_status f16_range(mmb_ctx *ctx, const mmb_tensor *t, const float *w, int64_t N, int64_t K) {
    for (int64_t i = 0; i < N * K; i++)
        if (w[i] >= 65520.0f || w[i] <= -65520.0f)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED,
                            "tensor '%s': weight [%lld, %lld] = %g is outside the f16 range (use bf16 or f32)",
                            t->name, (long long)(i / K), (long long)(i % K), (double)w[i]);
    return MMB_OK;
}

mmb_status mmb__linear_init(mmb_ctx *ctx, mmb_linear *l, const mmb_tensor *w, const mmb_tensor *b) {
    memset(l, 0, sizeof *l);
    l->n_out = w->shape[0];
    l->n_in = w->shape[1];
    l->backend = ctx->gemm;
    l->wdt = ctx->weight_dtype;
    /* For the own backend a converted weight lives only until it is packed: in pages of its own, which
     * leave RSS when freed (a freed heap block of that size could stay resident). */
    size_t tmp_bytes = (size_t)mmb_tensor_numel(w) * sizeof(float);
    float *tmp = l->backend == MMB_GEMM_OWN && !f32_in_place(w) ? mmb__pages_alloc(tmp_bytes) : NULL;
    mmb_status s = MMB_OK;
    if (tmp) {
        mmb_to_f32(tmp, w->data, w->dtype, (size_t)mmb_tensor_numel(w));
        l->w = tmp;
    } else {
        s = f32_view(ctx, w, &l->w, &l->owned_w);
    }
    if (s == MMB_OK && b) s = f32_view(ctx, b, &l->bias, &l->owned_b);
    if (s == MMB_OK && l->wdt == MMB_F16) s = f16_range(ctx, w, l->w, l->n_out, l->n_in);
    if (s == MMB_OK && l->backend == MMB_GEMM_OWN) {
        size_t bytes = mmb__gemm_own_packed_bytes(l->n_out, l->n_in, l->wdt);
        l->packed = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
        if (l->packed && l->wdt == MMB_I8)
            l->scales = malloc((size_t)mmb__gemm_own_scales_size(l->n_out) * sizeof(float));
        if (!l->packed || (l->wdt == MMB_I8 && !l->scales))
            s = mmb__err(ctx, MMB_ERR_NOMEM, "tensor '%s': cannot allocate %zu bytes to pack", w->name, bytes);
        else
            mmb__gemm_own_pack_dt(l->packed, l->scales, l->w, l->n_out, l->n_in, l->wdt);
        /* The packed copy is all the own kernel reads (mmb__linear_forward_act): drop a converted f32
         * copy now, and a view of the mapped file too, so that nothing reads the mapped weight again
         * and the pages released below stay out of RSS (a stray reader crashes on NULL rather than
         * silently faulting the whole weight back in, counting it twice again). */
        if (l->packed) {
            free(l->owned_w);
            l->owned_w = NULL;
            l->w = NULL;
        }
        mmb__pages_free(tmp, tmp_bytes);
        tmp = NULL;
    } else if (s == MMB_OK && l->wdt != MMB_F32) {
        /* The other backends compute in f32 with the weights rounded to wdt: the same values. */
        size_t n = (size_t)(l->n_out * l->n_in);
        float *q = malloc(n ? n * sizeof(float) : 1);
        if (!q) {
            s = mmb__err(ctx, MMB_ERR_NOMEM, "tensor '%s': cannot allocate %zu floats", w->name, n);
        } else {
            mmb__gemm_own_dequant(q, l->w, l->n_out, l->n_in, l->wdt);
            free(l->owned_w);
            l->w = l->owned_w = q;
        }
    }
    if (s != MMB_OK) {
        mmb__pages_free(tmp, tmp_bytes);  /* failed before packing */
        mmb__linear_free(l);
    }
    return s;
}

void mmb__linear_free(mmb_linear *l) {
    free(l->owned_w);
    free(l->owned_b);
    free(l->packed);
    free(l->scales);
    memset(l, 0, sizeof *l);
}

static void linear_plain(mmb_ctx *ctx, float *y, const float *x, int64_t M, const mmb_linear *l);

typedef struct {
    float *y;
    const float *x;
    int64_t M;
    const mmb_linear *l;
} naive_job;

static void naive_task(void *arg, int tid, int nth) {
    naive_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->M, tid, nth, &lo, &hi);
    mmb__gemm_ref(j->y + lo * j->l->n_out, j->x + lo * j->l->n_in, j->l->w, j->l->bias, hi - lo,
                  j->l->n_out, j->l->n_in);
}

void mmb__linear_forward(mmb_ctx *ctx, float *y, const float *x, int64_t M, const mmb_linear *l) {
    mmb__linear_forward_act(ctx, y, x, M, l, MMB_ACT_NONE);
}

void mmb__linear_forward_act(mmb_ctx *ctx, float *y, const float *x, int64_t M, const mmb_linear *l, mmb_act act) {
    if (l->backend == MMB_GEMM_OWN) {
        mmb__gemm_own_dt(ctx->pool, y, x, l->packed, l->scales, l->wdt, l->bias, M, l->n_out, l->n_in, act);
        return;
    }
    linear_plain(ctx, y, x, M, l);
    mmb__act_forward_mt(ctx, y, M * l->n_out, act);
}

/* The backends other than our own kernel. */
static void linear_plain(mmb_ctx *ctx, float *y, const float *x, int64_t M, const mmb_linear *l) {
    switch (l->backend) {
#ifdef MMB_HAVE_OPENBLAS
    case MMB_GEMM_OPENBLAS: {
        int64_t N = l->n_out, K = l->n_in;
        float beta = 0.0f;
        if (l->bias) {
            for (int64_t m = 0; m < M; m++) memcpy(y + m * N, l->bias, (size_t)N * sizeof(float));
            beta = 1.0f;
        }
        openblas_set_num_threads(mmb__pool_size(ctx->pool));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1.0f, x, (int)K,
                    l->w, (int)K, beta, y, (int)N);
        return;
    }
#endif
    default: {
        naive_job j = {y, x, M, l};
        mmb__pool_run(ctx->pool, naive_task, &j);
        return;
    }
    }
}
