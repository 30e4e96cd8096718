/* Backward passes of the tensor layer's pieces, for training (stage 1: a connector through a frozen LLM):
 * a linear layer's products with its weights held as mutable f32 masters, the activations' derivatives, and
 * AdamW. The products run on the own packed kernel (tensor/gemm_own.c), which computes C = A W^T: the
 * transposed operands are laid out first (O(M N) copies against the O(M N K) products). */
#include "tensor/tensor.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* dst (c, r) = src (r, c) transposed. */
static void transpose(float *dst, const float *src, int64_t r, int64_t c) {
    const int64_t B = 32;
    for (int64_t i0 = 0; i0 < r; i0 += B)
        for (int64_t j0 = 0; j0 < c; j0 += B)
            for (int64_t i = i0; i < i0 + B && i < r; i++)
                for (int64_t j = j0; j < j0 + B && j < c; j++) dst[j * r + i] = src[i * c + j];
}

/* C (M, N) = A (M, K) B^T + bias for B (N, K), bias (N) or NULL, through the packed kernel (a packed copy of B
 * made here). */
static mmb_status gemm_nt(mmb_ctx *ctx, float *C, const float *A, const float *B, const float *bias, int64_t M,
                          int64_t N, int64_t K) {
    float *pk = aligned_alloc(64, (mmb__gemm_own_packed_size(N, K) * sizeof(float) + 63) & ~(size_t)63);
    if (!pk) return mmb__err(ctx, MMB_ERR_NOMEM, "linear: out of memory for a %lld x %lld panel copy", (long long)N,
                             (long long)K);
    mmb__gemm_own_pack(pk, B, N, K);
    mmb__gemm_own(ctx->pool, C, A, pk, bias, M, N, K);
    free(pk);
    return MMB_OK;
}

mmb_status mmb__train_linear_forward(mmb_ctx *ctx, float *y, const float *x, int64_t M, const float *w,
                                     const float *b, int64_t n_out, int64_t n_in) {
    return gemm_nt(ctx, y, x, w, b, M, n_out, n_in);
}

mmb_status mmb__train_linear_backward(mmb_ctx *ctx, const float *x, const float *dy, int64_t M, const float *w,
                                      int64_t n_out, int64_t n_in, float *dw, float *db, float *dx) {
    float *t1 = malloc(sizeof(float) * (size_t)(M * n_out)),
          *t2 = malloc(sizeof(float) * (size_t)(n_in * (M > n_out ? M : n_out))),
          *g = malloc(sizeof(float) * (size_t)(n_out * n_in));
    mmb_status s = MMB_OK;
    if (!t1 || !t2 || !g) s = mmb__err(ctx, MMB_ERR_NOMEM, "linear backward: out of memory (%lld rows, %lld x %lld)",
                                       (long long)M, (long long)n_out, (long long)n_in);
    if (s == MMB_OK && dw) { /* dW (n_out, n_in) += dY^T (n_out, M) X; the kernel's B is X^T (n_in, M) */
        transpose(t1, dy, M, n_out);
        transpose(t2, x, M, n_in);
        s = gemm_nt(ctx, g, t1, t2, NULL, n_out, n_in, M);
        for (int64_t i = 0; s == MMB_OK && i < n_out * n_in; i++) dw[i] += g[i];
    }
    if (s == MMB_OK && db)
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < n_out; j++) db[j] += dy[m * n_out + j];
    if (s == MMB_OK && dx) { /* dX (M, n_in) = dY W; the kernel's B is W^T (n_in, n_out) */
        transpose(t2, w, n_out, n_in);
        s = gemm_nt(ctx, dx, dy, t2, NULL, M, n_in, n_out);
    }
    free(t1);
    free(t2);
    free(g);
    return s;
}

void mmb__act_backward(float *dx, const float *x, int64_t n, mmb_act a) {
    for (int64_t i = 0; i < n; i++) {
        double v = x[i], d = 1;
        switch (a) {
        case MMB_ACT_GELU: d = 0.5 * (1 + erf(v * M_SQRT1_2)) + v * exp(-0.5 * v * v) / sqrt(2 * M_PI); break;
        case MMB_ACT_GELU_TANH: {
            double k = sqrt(2 / M_PI), u = k * (v + 0.044715 * v * v * v), t = tanh(u);
            d = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * k * (1 + 3 * 0.044715 * v * v);
            break;
        }
        case MMB_ACT_QUICK_GELU: {
            double sg = 1 / (1 + exp(-1.702 * v));
            d = sg + 1.702 * v * sg * (1 - sg);
            break;
        }
        case MMB_ACT_SILU: {
            double sg = 1 / (1 + exp(-v));
            d = sg * (1 + v * (1 - sg));
            break;
        }
        case MMB_ACT_RELU: d = v > 0; break;
        case MMB_ACT_NONE: break;
        }
        dx[i] = (float)(dx[i] * d);
    }
}

void mmb__adamw_step(float *w, const float *g, float *m, float *v, int64_t n, const mmb_adamw *o, int64_t t) {
    const double bc1 = 1 - pow(o->beta1, (double)t), bc2 = 1 - pow(o->beta2, (double)t);
    const float step = (float)(o->lr / bc1), sbc2 = (float)sqrt(bc2), b1 = (float)o->beta1, b2 = (float)o->beta2;
    const float decay = (float)(1 - o->lr * o->weight_decay), eps = (float)o->eps;
    for (int64_t i = 0; i < n; i++) { /* torch.optim.AdamW's single-tensor step, in its order */
        w[i] *= decay;
        m[i] += (1 - b1) * (g[i] - m[i]); /* lerp */
        v[i] = v[i] * b2 + (1 - b2) * g[i] * g[i];
        w[i] -= step * m[i] / (sqrtf(v[i]) / sbc2 + eps);
    }
}
