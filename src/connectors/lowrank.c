/* A low-rank projector: LLaVA's first Linear(D -> d) factored through rank r, W ~ U V, in an original-LLaVA
 * checkpoint (keys under model.mm_projector., an nn.Sequential):
 *   "lowrank"             Linear(D -> r, no bias), Linear(r -> d)                     keys 0.weight, 1.*
 *   "lowrank_mlp2x_gelu"  the same, then GELU(erf), Linear(d -> d): a low-rank mlp2x   keys 0.weight, 1.*, 3.*
 * Config key: mm_lowrank_rank (r, required, >= 1; it must match 0.weight's rows). */
#include "connectors/connectors.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    int n;              /* Linear layers: 2 or 3 */
    int64_t rank, out_w;
    mmb_linear lin[3];  /* U (r, D), V (d, r) + bias, then optionally (d, d) + bias */
} lowrank_state;

static const char *lowrank_activation(const void *st) { return ((const lowrank_state *)st)->n == 3 ? "gelu" : ""; }

static void lowrank_free(void *st) {
    lowrank_state *s = st;
    if (!s) return;
    for (int i = 0; i < 3; i++) mmb__linear_free(&s->lin[i]);
    free(s);
}

static mmb_status lowrank_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    int64_t r = 0;
    mmb_status st = MMB_OK;
    if (!mmb__cfg_int(ctx, c, "mm_lowrank_rank", &r, &st) && st == MMB_OK)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: 'mm_lowrank_rank' (the projector's rank) is missing",
                        c->dir);
    if (st == MMB_OK && (r < 1 || r > (1 << 24)))
        st = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'mm_lowrank_rank' = %lld: the rank must be at least 1",
                      c->dir, (long long)r);
    if (st != MMB_OK) return st;
    lowrank_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    s->n = strcmp(cfg->type, "lowrank") == 0 ? 2 : 3;
    s->rank = r;
    s->out_w = cfg->out_width;
    st = mmb__ckpt_linear(ctx, c, cfg->prefix, "0", r, cfg->in_width, false, &s->lin[0]);
    if (st == MMB_OK) st = mmb__ckpt_linear(ctx, c, cfg->prefix, "1", s->out_w, r, true, &s->lin[1]);
    if (st == MMB_OK && s->n == 3)
        st = mmb__ckpt_linear(ctx, c, cfg->prefix, "3", s->out_w, s->out_w, true, &s->lin[2]);
    if (st != MMB_OK) { lowrank_free(s); return st; }
    *out = s;
    return MMB_OK;
}

static int64_t lowrank_out_tokens(const void *st, int64_t tokens) { (void)st; return tokens; }

static int64_t lowrank_out_width(const void *st) { return ((const lowrank_state *)st)->out_w; }

static void lowrank_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const lowrank_state *s = st;
    *params = *flops = 0;
    for (int i = 0; i < s->n; i++) mmb__linear_cost(&s->lin[i], tokens, params, flops);
}

static size_t lowrank_scratch(const void *st, int64_t rows) {
    const lowrank_state *s = st;
    size_t f = sizeof(float);
    return (mmb__arena_piece((size_t)(rows * s->rank) * f) +
            (s->n == 3 ? mmb__arena_piece((size_t)(rows * s->out_w) * f) : 0)) / f;
}

/* x (rows, D) -> out (rows, d): V (U x) + b [-> GELU -> Linear]. */
static mmb_status lowrank_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                                  int64_t tokens) {
    const lowrank_state *s = st;
    int64_t rows = batch * tokens;
    float *u = mmb__arena_alloc(&ctx->arena, (size_t)(rows * s->rank) * sizeof(float));
    float *h = s->n == 3 ? mmb__arena_alloc(&ctx->arena, (size_t)(rows * s->out_w) * sizeof(float)) : out;
    if (!u || !h) return mmb__err(ctx, MMB_ERR_NOMEM, "lowrank: scratch arena too small");
    mmb__linear_forward(ctx, u, x, rows, &s->lin[0]);
    mmb__linear_forward(ctx, h, u, rows, &s->lin[1]);
    if (s->n == 3) {
        mmb__act_forward_mt(ctx, h, rows * s->out_w, MMB_ACT_GELU);
        mmb__linear_forward(ctx, out, h, rows, &s->lin[2]);
    }
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_lowrank = {
    .name = "lowrank",
    .names = (const char *const[]){"lowrank", "lowrank_mlp2x_gelu", NULL},
    .activation = lowrank_activation,
    .synth_config = "{\"mm_lowrank_rank\": 256}",
    .load = lowrank_load,
    .out_tokens = lowrank_out_tokens,
    .out_width = lowrank_out_width,
    .cost = lowrank_cost,
    .scratch = lowrank_scratch,
    .forward = lowrank_forward,
    .free = lowrank_free,
};
