/* PaliGemmaMultiModalProjector (transformers' models/paligemma): one Linear(vision width -> projection_dim, bias)
 * over every token of the tower's last_hidden_state; {prefix}linear.weight [d_model, D], {prefix}linear.bias.
 * transformers 5.23 divides the result by nothing (older versions scaled by 1/sqrt(d) in the model's forward). */
#include "connectors/connectors.h"

#include <stdio.h>
#include <stdlib.h>

typedef struct {
    mmb_linear lin;
} pg_state;

static void pg_free(void *st) {
    pg_state *s = st;
    if (!s) return;
    mmb__linear_free(&s->lin);
    free(s);
}

static mmb_status pg_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    pg_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    char wn[256], bn[256];
    snprintf(wn, sizeof wn, "%slinear.weight", cfg->prefix);
    snprintf(bn, sizeof bn, "%slinear.bias", cfg->prefix);
    const mmb_tensor *w = NULL, *b = NULL;
    int64_t ws[2] = {cfg->out_width, cfg->in_width}, n = cfg->out_width;
    mmb_status st = mmb__ckpt_bind(ctx, c, wn, 2, ws, &w);
    if (st == MMB_OK) st = mmb__ckpt_bind(ctx, c, bn, 1, &n, &b);
    if (st == MMB_OK) st = mmb__linear_bind(ctx, &s->lin, w, b);
    if (st != MMB_OK) { pg_free(s); return st; }
    *out = s;
    return MMB_OK;
}

static int64_t pg_out_tokens(const void *st, int64_t tokens) { (void)st; return tokens; }

static int64_t pg_out_width(const void *st) { return ((const pg_state *)st)->lin.n_out; }

static void pg_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const mmb_linear *l = &((const pg_state *)st)->lin;
    *params = l->n_out * l->n_in + l->n_out;
    *flops = 2 * tokens * l->n_out * l->n_in;
}

static size_t pg_scratch(const void *st, int64_t rows) { (void)st; (void)rows; return 0; }

static mmb_status pg_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                             int64_t tokens) {
    mmb__linear_forward(ctx, out, x, batch * tokens, &((const pg_state *)st)->lin);
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_paligemma_proj = {
    .name = "paligemma_projector",
    .names = (const char *const[]){"paligemma_projector", NULL},
    .load = pg_load,
    .out_tokens = pg_out_tokens,
    .out_width = pg_out_width,
    .cost = pg_cost,
    .scratch = pg_scratch,
    .forward = pg_forward,
    .free = pg_free,
};
