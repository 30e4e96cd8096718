/* Qwen2-VL's PatchMerger (transformers' models/qwen2_vl PatchMerger), the connector at the end of
 * its vision tower:
 *   ln_q   LayerNorm(D, eps) on every patch, before merging;
 *   merge  each m*m consecutive patches concatenated: (tokens, D) read as (tokens / m^2, m^2 D); the
 *          image processor orders patches so that every 2-D m x m window is consecutive;
 *   mlp    Linear(m^2 D -> m^2 D), GELU (exact, nn.GELU()), Linear(m^2 D -> out).
 * Keys: {prefix}ln_q.{weight,bias}, {prefix}mlp.0.{weight,bias}, {prefix}mlp.2.{weight,bias}.
 * cfg->in_width is D (one patch); m^2 is read from mlp.0.weight, whose shape must be [m^2 D, m^2 D].
 * It is not in the registry: its input order is the Qwen2-VL tower's window order, which no LLaVA
 * checkpoint's hidden states have; the qwen2_vl family (src/models/qwen2vl.c) runs it after the tower. */
#include "connectors/connectors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t width, group;      /* D; patches merged into one token (m^2) */
    float eps;
    float *ln_w, *ln_b;        /* (D) */
    mmb_linear fc1, fc2;       /* (m^2 D, m^2 D), (out, m^2 D) */
} merger;

/* The merger's MLP: Linear, GELU, Linear. */
static const char *pm_activation(const void *st) { (void)st; return "gelu"; }

static void pm_free(void *st) {
    merger *s = st;
    if (!s) return;
    free(s->ln_w);
    free(s->ln_b);
    mmb__linear_free(&s->fc1);
    mmb__linear_free(&s->fc2);
    free(s);
}

static mmb_status pm_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    const int64_t D = cfg->in_width;
    char name[512];
    snprintf(name, sizeof name, "%smlp.0.weight", cfg->prefix);
    const mmb_tensor *t = mmb__ckpt_find(c, name, NULL);
    if (!t) return mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' is missing", c->dir, name);
    int64_t K = t->ndim == 2 ? t->shape[1] : 0, m = 1;
    while (D > 0 && m * m * D < K) m++;
    if (D < 1 || m * m * D != K)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%s': expected [m*m*%lld, m*m*%lld] (m*m patches of width "
                        "%lld merged), got %d dims, last %lld", c->dir, name, (long long)D, (long long)D,
                        (long long)D, t->ndim, (long long)K);
    merger *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    s->width = D;
    s->group = m * m;
    s->eps = cfg->eps;
    mmb_status st = mmb__ckpt_norm(ctx, c, cfg->prefix, "ln_q", D, &s->ln_w, &s->ln_b);
    if (st == MMB_OK) st = mmb__ckpt_linear(ctx, c, cfg->prefix, "mlp.0", K, K, true, &s->fc1);
    if (st == MMB_OK) st = mmb__ckpt_linear(ctx, c, cfg->prefix, "mlp.2", cfg->out_width, K, true, &s->fc2);
    if (st != MMB_OK) { pm_free(s); return st; }
    *out = s;
    return MMB_OK;
}

static int64_t pm_out_tokens(const void *st, int64_t tokens) {
    const merger *s = st;
    return tokens % s->group ? -1 : tokens / s->group;
}

static int64_t pm_out_width(const void *st) { return ((const merger *)st)->fc2.n_out; }

static void pm_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const merger *s = st;
    int64_t K = s->fc1.n_in, O = s->fc2.n_out, T = tokens / s->group;
    *params = 2 * s->width + K * K + K + O * K + O;
    *flops = 2 * T * (K * K + O * K);
}

static size_t pm_scratch(const void *st, int64_t rows) {
    const merger *s = st;
    return 2 * mmb__arena_piece((size_t)rows * (size_t)s->width * sizeof(float)) / sizeof(float);
}

/* x (batch, tokens, D), tokens a multiple of m^2, each m^2 consecutive rows one window ->
 * out (batch, tokens / m^2, out): mlp(ln_q(x).view(-1, m^2 D)). */
static mmb_status pm_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                             int64_t tokens) {
    const merger *s = st;
    if (tokens % s->group)
        return mmb__err(ctx, MMB_ERR_SHAPE, "patch_merger: %lld tokens per image is not a multiple of the %lld "
                        "merged into one", (long long)tokens, (long long)s->group);
    const int64_t rows = batch * tokens, merged = rows / s->group;
    float *xn = mmb__arena_alloc(&ctx->arena, (size_t)(rows * s->width) * sizeof(float));
    float *h = mmb__arena_alloc(&ctx->arena, (size_t)(rows * s->width) * sizeof(float));
    if (!xn || !h) return mmb__err(ctx, MMB_ERR_NOMEM, "patch_merger: scratch arena too small");
    mmb__layernorm_forward_mt(ctx, xn, x, s->ln_w, s->ln_b, rows, s->width, s->eps);
    mmb__linear_forward(ctx, h, xn, merged, &s->fc1);
    mmb__act_forward_mt(ctx, h, rows * s->width, MMB_ACT_GELU);
    mmb__linear_forward(ctx, out, h, merged, &s->fc2);
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_patch_merger = {
    .name = "patch_merger",
    .names = (const char *const[]){"patch_merger", NULL},
    .activation = pm_activation,
    .load = pm_load,
    .out_tokens = pm_out_tokens,
    .out_width = pm_out_width,
    .cost = pm_cost,
    .scratch = pm_scratch,
    .forward = pm_forward,
    .free = pm_free,
};
