/* "simple_res": LLaVA's SimpleResBlock, the residual MLP.
 *   x = pre_norm(x)            LayerNorm(C), eps from the config (torch default 1e-5)
 *   out = x + proj(x)          proj = Sequential(Linear(C, C), GELU(erf), Linear(C, C))
 * Note the residual adds the *normalised* x, as the reference code does. Keys:
 * {prefix}pre_norm.weight/.bias [C], {prefix}proj.0.weight [C, C], .0.bias, {prefix}proj.2.weight, .2.bias.
 * LLaVA defines but never builds it, so no released checkpoint names it; "simple_res" is our
 * mm_projector_type for it. */
#include "connectors/connectors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t width;
    float eps;
    float *ln_w, *ln_b;         /* (C), f32 copies */
    mmb_linear fc1, fc2;        /* (C, C) each */
} resmlp_state;

static const char *resmlp_activation(const void *st) { (void)st; return "gelu"; }

static void resmlp_free(void *st) {
    resmlp_state *s = st;
    if (!s) return;
    mmb__linear_free(&s->fc1);
    mmb__linear_free(&s->fc2);
    free(s->ln_w);
    free(s->ln_b);
    free(s);
}

static mmb_status resmlp_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    resmlp_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    int64_t C = cfg->in_width, wshape[2] = {C, C};
    s->width = C;
    s->eps = cfg->eps;
    char n1[512], n2[512];
    snprintf(n1, sizeof n1, "%spre_norm.weight", cfg->prefix);
    snprintf(n2, sizeof n2, "%spre_norm.bias", cfg->prefix);
    mmb_status st = mmb__ckpt_vec(ctx, c, n1, C, &s->ln_w);
    if (st == MMB_OK) st = mmb__ckpt_vec(ctx, c, n2, C, &s->ln_b);
    for (int i = 0; i < 2 && st == MMB_OK; i++) {
        const mmb_tensor *w, *b;
        snprintf(n1, sizeof n1, "%sproj.%d.weight", cfg->prefix, 2 * i);
        snprintf(n2, sizeof n2, "%sproj.%d.bias", cfg->prefix, 2 * i);
        st = mmb__ckpt_bind(ctx, c, n1, 2, wshape, &w);
        if (st == MMB_OK) st = mmb__ckpt_bind(ctx, c, n2, 1, &C, &b);
        if (st == MMB_OK) st = mmb__linear_bind(ctx, i ? &s->fc2 : &s->fc1, w, b);
    }
    if (st != MMB_OK) { resmlp_free(s); return st; }
    *out = s;
    return MMB_OK;
}

static int64_t resmlp_out_tokens(const void *st, int64_t tokens) { (void)st; return tokens; }
static int64_t resmlp_out_width(const void *st) { return ((const resmlp_state *)st)->width; }

static void resmlp_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const resmlp_state *s = st;
    int64_t C = s->width;
    *params = 2 * (C * C + C) + 2 * C;
    *flops = 4 * tokens * C * C;
}

static size_t resmlp_scratch(const void *st, int64_t rows) {
    return 2 * mmb__arena_piece((size_t)(rows * resmlp_out_width(st)) * sizeof(float)) / sizeof(float);
}

/* x (rows, C) -> out (rows, C) = LN(x) + fc2(gelu(fc1(LN(x)))). */
static mmb_status resmlp_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                                 int64_t tokens) {
    const resmlp_state *s = st;
    int64_t rows = batch * tokens, C = s->width;
    float *xn = mmb__arena_alloc(&ctx->arena, (size_t)(rows * C) * sizeof(float));
    float *h = mmb__arena_alloc(&ctx->arena, (size_t)(rows * C) * sizeof(float));
    if (!xn || !h) return mmb__err(ctx, MMB_ERR_NOMEM, "simple_res: scratch arena too small");
    mmb__layernorm_forward_mt(ctx, xn, x, s->ln_w, s->ln_b, rows, C, s->eps);
    mmb__linear_forward_act(ctx, h, xn, rows, &s->fc1, MMB_ACT_GELU);
    mmb__linear_forward(ctx, out, h, rows, &s->fc2);
    mmb__add_forward(out, out, xn, rows * C);
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_resmlp = {
    .name = "simple_res",
    .names = (const char *const[]){"simple_res", NULL},
    .activation = resmlp_activation,
    .load = resmlp_load,
    .out_tokens = resmlp_out_tokens,
    .out_width = resmlp_out_width,
    .cost = resmlp_cost,
    .scratch = resmlp_scratch,
    .forward = resmlp_forward,
    .free = resmlp_free,
};
