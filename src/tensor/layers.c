/* Composite layers that several networks share, built from the kernels. */
#include "tensor/tensor.h"

/* x (rows, D) -> x + fc2(act(fc1(LN(x)))), in place; xn (rows, D) and h (rows, I) are scratch. */
void mmb__ffn_residual_forward(mmb_ctx *ctx, float *x, float *xn, float *h, int64_t rows, const float *ln_w,
                               const float *ln_b, float eps, const mmb_linear *fc1, mmb_act act, const mmb_linear *fc2) {
    int64_t D = fc2->n_out;
    mmb__layernorm_forward_mt(ctx, xn, x, ln_w, ln_b, rows, D, eps);
    mmb__linear_forward_act(ctx, h, xn, rows, fc1, act);  /* the activation on each block of C while in cache */
    mmb__linear_forward(ctx, xn, h, rows, fc2);
    mmb__add_forward_mt(ctx, x, x, xn, rows * D);
}
