/* The LLaVA projector family: a chain of Linear layers with an activation between them.
 *   "linear"       original LLaVA: Linear(mm_hidden -> H); keys {prefix}weight, {prefix}bias
 *   "mlpNx_gelu"   original LLaVA builder: Linear(mm_hidden -> H), then (N-1) x [GELU(erf), Linear(H -> H)];
 *                  nn.Sequential keys {prefix}{0,2,4,...}.weight/.bias
 *   "llava"        transformers' LlavaMultiModalProjector: linear_1, ACT2FN[projector_hidden_act],
 *                  linear_2, both with bias iff multimodal_projector_bias
 * They are one network with different key names, so they share this file rather than repeat it. */
#include "connectors/connectors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64

typedef struct {
    int depth;               /* number of Linear layers */
    mmb_act act;             /* between layers; MMB_ACT_NONE after the last */
    mmb_linear lin[MAX_DEPTH];
} mlp_state;

/* Depth of "mlpNx_gelu", or 0 if `type` is not of that form. */
static int mlp_depth(const char *type) {
    if (strncmp(type, "mlp", 3) != 0) return 0;
    char *end = NULL;
    long n = strtol(type + 3, &end, 10);
    if (end == type + 3 || type[3] < '1' || type[3] > '9' || strcmp(end, "x_gelu") != 0) return 0;
    return n >= 1 && n <= MAX_DEPTH ? (int)n : 0;
}

static bool mlp_accepts(const char *type) {
    return strcmp(type, "linear") == 0 || strcmp(type, "llava") == 0 || mlp_depth(type) > 0;
}

/* One Linear ("linear", "mlp1x_gelu") applies none; deeper ones apply theirs between layers. */
static const char *mlp_activation(const void *st) {
    const mlp_state *s = st;
    return s->depth > 1 ? mmb__act_name(s->act) : "";
}

static void mlp_free(void *st) {
    mlp_state *s = st;
    if (!s) return;
    for (int i = 0; i < s->depth; i++) mmb__linear_free(&s->lin[i]);
    free(s);
}

/* Binds layer i: weight `wname` [n_out, n_in] and, if bias, `bname` [n_out]. */
static mmb_status bind_layer(mmb_ctx *ctx, const mmb_ckpt *c, mmb_linear *l, const char *wname,
                             const char *bname, int64_t n_out, int64_t n_in) {
    const mmb_tensor *w = NULL, *b = NULL;
    int64_t ws[2] = {n_out, n_in};
    mmb_status s = mmb__ckpt_bind(ctx, c, wname, 2, ws, &w);
    if (s == MMB_OK && bname) s = mmb__ckpt_bind(ctx, c, bname, 1, &n_out, &b);
    return s == MMB_OK ? mmb__linear_bind(ctx, l, w, b) : s;
}

static mmb_status mlp_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    mlp_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    bool hf = strcmp(cfg->type, "llava") == 0, lin = strcmp(cfg->type, "linear") == 0;
    int depth = hf ? 2 : lin ? 1 : mlp_depth(cfg->type);
    s->act = hf ? cfg->act : MMB_ACT_GELU;
    bool bias = hf ? cfg->bias : true;
    mmb_status st = MMB_OK;
    for (int i = 0; i < depth && st == MMB_OK; i++) {
        char w[512], b[512];
        if (hf) {
            snprintf(w, sizeof w, "%slinear_%d.weight", cfg->prefix, i + 1);
            snprintf(b, sizeof b, "%slinear_%d.bias", cfg->prefix, i + 1);
        } else if (lin) {
            snprintf(w, sizeof w, "%sweight", cfg->prefix);
            snprintf(b, sizeof b, "%sbias", cfg->prefix);
        } else {
            snprintf(w, sizeof w, "%s%d.weight", cfg->prefix, 2 * i);
            snprintf(b, sizeof b, "%s%d.bias", cfg->prefix, 2 * i);
        }
        st = bind_layer(ctx, c, &s->lin[i], w, bias ? b : NULL, cfg->out_width, i ? cfg->out_width : cfg->in_width);
        if (st == MMB_OK) s->depth = i + 1;
    }
    if (st != MMB_OK) { mlp_free(s); return st; }
    *out = s;
    return MMB_OK;
}

static int64_t mlp_out_tokens(const void *st, int64_t tokens) { (void)st; return tokens; }

static int64_t mlp_out_width(const void *st) {
    const mlp_state *s = st;
    return s->lin[s->depth - 1].n_out;
}

static void mlp_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const mlp_state *s = st;
    *params = *flops = 0;
    for (int i = 0; i < s->depth; i++) {
        const mmb_linear *l = &s->lin[i];
        *params += l->n_out * l->n_in + (l->bias ? l->n_out : 0);
        *flops += 2 * tokens * l->n_out * l->n_in;
    }
}

static size_t mlp_scratch(const void *st, int64_t rows) {
    const mlp_state *s = st;
    int bufs = s->depth > 2 ? 2 : s->depth - 1;
    return (size_t)bufs * mmb__arena_piece((size_t)rows * (size_t)mlp_out_width(st) * sizeof(float)) / sizeof(float);
}

/* x (batch*tokens, in) -> out (batch*tokens, d): Linear, then [act, Linear] x (depth-1). */
static mmb_status mlp_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                              int64_t tokens) {
    const mlp_state *s = st;
    int64_t rows = batch * tokens, d = mlp_out_width(st);
    float *buf[2] = {NULL, NULL};
    for (int i = 0; i < 2 && i < s->depth - 1; i++) {
        buf[i] = mmb__arena_alloc(&ctx->arena, (size_t)(rows * d) * sizeof(float));
        if (!buf[i]) return mmb__err(ctx, MMB_ERR_NOMEM, "mlp: scratch arena too small");
    }
    const float *in = x;
    for (int i = 0; i < s->depth; i++) {
        float *y = i == s->depth - 1 ? out : buf[i % 2];
        mmb__linear_forward_act(ctx, y, in, rows, &s->lin[i], i < s->depth - 1 ? s->act : MMB_ACT_NONE);
        in = y;
    }
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_mlp = {
    .name = "mlp",
    .names = (const char *const[]){"linear", "mlpNx_gelu", "llava", NULL},
    .accepts = mlp_accepts,
    .activation = mlp_activation,
    .load = mlp_load,
    .out_tokens = mlp_out_tokens,
    .out_width = mlp_out_width,
    .cost = mlp_cost,
    .scratch = mlp_scratch,
    .forward = mlp_forward,
    .free = mlp_free,
};
