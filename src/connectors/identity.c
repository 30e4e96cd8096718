/* "identity": LLaVA's IdentityMap, forward returns its input (in width = out width). */
#include "connectors/connectors.h"

#include <stdlib.h>
#include <string.h>

typedef struct { int64_t width; } identity_state;

static mmb_status identity_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    (void)c;
    identity_state *s = malloc(sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    s->width = cfg->in_width;
    *out = s;
    return MMB_OK;
}

static int64_t identity_out_tokens(const void *st, int64_t tokens) { (void)st; return tokens; }
static int64_t identity_out_width(const void *st) { return ((const identity_state *)st)->width; }

static void identity_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    (void)st; (void)tokens;
    *params = *flops = 0;
}

static size_t identity_scratch(const void *st, int64_t rows) { (void)st; (void)rows; return 0; }

/* x (batch, tokens, w) -> out (batch, tokens, w): a copy. */
static mmb_status identity_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                                   int64_t tokens) {
    (void)ctx;
    memcpy(out, x, (size_t)(batch * tokens * identity_out_width(st)) * sizeof(float));
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_identity = {
    .name = "identity",
    .names = (const char *const[]){"identity", NULL},
    .load = identity_load,
    .out_tokens = identity_out_tokens,
    .out_width = identity_out_width,
    .cost = identity_cost,
    .scratch = identity_scratch,
    .forward = identity_forward,
    .free = free,
};
