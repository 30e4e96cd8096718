/* Binding a connector's layers to checkpoint tensors by name, each checked for presence, dtype and
 * shape (errors name the file and the tensor). */
#include "io/io.h"

#include <stdio.h>
#include <stdlib.h>

mmb_status mmb__ckpt_floats(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int ndim, const int64_t *shape,
                            float **out) {
    const mmb_tensor *t;
    mmb_status s = mmb__ckpt_bind(ctx, c, name, ndim, shape, &t);
    if (s != MMB_OK) return s;
    size_t n = (size_t)mmb_tensor_numel(t);
    float *v = malloc(n * sizeof(float) + 1);
    if (!v) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: tensor '%s': out of memory", c->dir, name);
    mmb_to_f32(v, t->data, t->dtype, n);
    *out = v;
    return MMB_OK;
}

mmb_status mmb__ckpt_dwconv(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t C,
                            bool bias, float **w9, float **b) {
    char wn[512], bn[512];
    snprintf(wn, sizeof wn, "%s%s.weight", prefix, name);
    snprintf(bn, sizeof bn, "%s%s.bias", prefix, name);
    int64_t shape[4] = {C, 1, 3, 3};
    float *w = NULL;
    mmb_status s = mmb__ckpt_floats(ctx, c, wn, 4, shape, &w);
    if (s == MMB_OK && !(*w9 = malloc((size_t)(9 * C) * sizeof(float))))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: tensor '%s': out of memory", c->dir, wn);
    if (s == MMB_OK) mmb__dwconv3x3_pack(*w9, w, C);
    free(w);
    if (s == MMB_OK && bias) s = mmb__ckpt_vec(ctx, c, bn, C, b);
    return s;
}

void mmb__linear_cost(const mmb_linear *l, int64_t rows, int64_t *params, int64_t *flops) {
    *params += l->n_out * l->n_in + (l->bias ? l->n_out : 0);
    *flops += 2 * rows * l->n_out * l->n_in;
}
