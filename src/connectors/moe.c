/* A mixture-of-experts projector (in the manner of MoE-LLaVA's sparse MLPs, here as the connector), in an
 * original-LLaVA checkpoint: mm_projector_type "moe_mlpNx_gelu" (N >= 1), keys under model.mm_projector.:
 *   router.weight (E, D) [router.bias (E), optional]    a Linear(D -> E)
 *   experts.{e}.{0,2,...}.weight / .bias                E experts, each LLaVA's mlpNx_gelu:
 *                                                       Linear(D -> d), [GELU(erf), Linear(d -> d)] x (N-1)
 *   (an nn.ModuleList of nn.Sequential, as PyTorch's state_dict names it).
 * Per token: p = softmax(router(x)) over the E experts (fp32); the top k by p, equal p taken in increasing
 * expert index (torch.topk leaves the order of ties unspecified); y = sum over the chosen e of
 * (p_e / sum of the chosen p) * expert_e(x).
 * Config keys: mm_moe_num_experts (E, required, 1..256, = the router's rows), mm_moe_top_k (k, required,
 * 1..E). Routing statistics (tokens each expert received, summed over forwards) through routing(). */
#include "connectors/connectors.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 16
#define MAX_EXPERTS 256

typedef struct {
    int n_exp, top_k, depth;
    int64_t in_w, out_w;
    mmb_linear router;
    mmb_linear *lin;           /* n_exp * depth: expert e's layer i at e * depth + i */
    _Atomic int64_t *counts;   /* n_exp */
} moe_state;

/* N of "moe_mlpNx_gelu", or 0. */
static int moe_depth(const char *type) {
    if (strncmp(type, "moe_mlp", 7) != 0 || type[7] < '1' || type[7] > '9') return 0;
    char *end = NULL;
    long n = strtol(type + 7, &end, 10);
    return strcmp(end, "x_gelu") == 0 && n <= MAX_DEPTH ? (int)n : 0;
}

static bool moe_accepts(const char *type) { return moe_depth(type) > 0; }

static const char *moe_activation(const void *st) { return ((const moe_state *)st)->depth > 1 ? "gelu" : ""; }

static void moe_free(void *st) {
    moe_state *s = st;
    if (!s) return;
    mmb__linear_free(&s->router);
    for (int i = 0; s->lin && i < s->n_exp * s->depth; i++) mmb__linear_free(&s->lin[i]);
    free(s->lin);
    free((void *)s->counts);
    free(s);
}

/* A required integer config key in [lo, hi]. */
static mmb_status cfg_required(mmb_ctx *ctx, const mmb_ckpt *c, const char *key, int64_t lo, int64_t hi,
                               const char *what, int64_t *out) {
    mmb_status s = MMB_OK;
    if (!mmb__cfg_int(ctx, c, key, out, &s) && s == MMB_OK)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: '%s' (%s) is missing", c->dir, key, what);
    if (s == MMB_OK && (*out < lo || *out > hi))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld: %s must be in %lld..%lld", c->dir, key,
                     (long long)*out, what, (long long)lo, (long long)hi);
    return s;
}

static mmb_status moe_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    int64_t E, k;
    mmb_status st = cfg_required(ctx, c, "mm_moe_num_experts", 1, MAX_EXPERTS, "the number of experts", &E);
    if (st == MMB_OK) st = cfg_required(ctx, c, "mm_moe_top_k", 1, E, "top-k (experts per token)", &k);
    if (st != MMB_OK) return st;
    moe_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    s->n_exp = (int)E;
    s->top_k = (int)k;
    s->depth = moe_depth(cfg->type);
    s->in_w = cfg->in_width;
    s->out_w = cfg->out_width;
    s->lin = calloc((size_t)(E * s->depth), sizeof *s->lin);
    s->counts = calloc((size_t)E, sizeof *s->counts);
    if (!s->lin || !s->counts) { moe_free(s); return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory"); }
    char name[512];
    snprintf(name, sizeof name, "%srouter.bias", cfg->prefix);
    bool rbias = mmb__ckpt_find(c, name, NULL) != NULL;
    st = mmb__ckpt_linear(ctx, c, cfg->prefix, "router", E, s->in_w, rbias, &s->router);
    for (int e = 0; e < E && st == MMB_OK; e++)
        for (int i = 0; i < s->depth && st == MMB_OK; i++) {
            snprintf(name, sizeof name, "experts.%d.%d", e, 2 * i);
            st = mmb__ckpt_linear(ctx, c, cfg->prefix, name, s->out_w, i ? s->out_w : s->in_w, true, &s->lin[e * s->depth + i]);
        }
    if (st != MMB_OK) { moe_free(s); return st; }
    *out = s;
    return MMB_OK;
}

static int64_t moe_out_tokens(const void *st, int64_t tokens) { (void)st; return tokens; }

static int64_t moe_out_width(const void *st) { return ((const moe_state *)st)->out_w; }

/* FLOPs count the router and the k experts each token runs. */
static void moe_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const moe_state *s = st;
    *params = *flops = 0;
    mmb__linear_cost(&s->router, tokens, params, flops);
    for (int i = 0; i < s->n_exp * s->depth; i++) {
        int64_t f = 0;
        mmb__linear_cost(&s->lin[i], tokens * s->top_k, params, &f);
        if (i < s->depth) *flops += f;  /* the experts are alike: one expert's layers, run k times per token */
    }
}

/* Bytes of the pieces forward takes for `rows` tokens: probabilities (rows, E); choices and gates (rows, k);
 * one expert's rows and gates (rows); its gathered input (rows, D); two hidden maps (rows, d). */
static size_t pieces(const moe_state *s, int64_t rows, size_t *sz) {
    size_t f = sizeof(float), r = (size_t)rows;
    sz[0] = r * (size_t)s->n_exp * f;
    sz[1] = sz[2] = r * (size_t)s->top_k * f;
    sz[3] = sz[4] = r * f;
    sz[5] = r * (size_t)s->in_w * f;
    sz[6] = sz[7] = r * (size_t)s->out_w * f;
    size_t total = 0;
    for (int i = 0; i < 8; i++) total += mmb__arena_piece(sz[i]);
    return total;
}

static size_t moe_scratch(const void *st, int64_t rows) {
    size_t sz[8];
    return pieces(st, rows, sz) / sizeof(float);
}

/* p (E) -> choice (k) expert indices by decreasing p, ties in increasing index; gate (k) = p / their sum. */
static void route(const float *p, int E, int k, int32_t *choice, float *gate) {
    float sum = 0;
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            bool taken = false;
            for (int i = 0; i < j; i++) taken |= choice[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        choice[j] = best;
        gate[j] = p[best];
        sum += p[best];
    }
    for (int j = 0; j < k; j++) gate[j] /= sum;
}

/* x (batch*tokens, D) -> out (batch*tokens, d). */
static mmb_status moe_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                              int64_t tokens) {
    const moe_state *s = st;
    int64_t rows = batch * tokens, D = s->in_w, d = s->out_w;
    int E = s->n_exp, k = s->top_k;
    size_t sz[8];
    pieces(s, rows, sz);
    void *buf[8];
    for (int i = 0; i < 8; i++)
        if (!(buf[i] = mmb__arena_alloc(&ctx->arena, sz[i])))
            return mmb__err(ctx, MMB_ERR_NOMEM, "moe: scratch arena too small");
    float *prob = buf[0], *gate = buf[2], *wt = buf[4], *xe = buf[5], *h[2] = {buf[6], buf[7]};
    int32_t *choice = buf[1], *idx = buf[3];
    mmb__linear_forward(ctx, prob, x, rows, &s->router);
    for (int64_t r = 0; r < rows; r++) {
        float *p = prob + r * E, m = p[0], sum = 0;
        for (int e = 1; e < E; e++) m = fmaxf(m, p[e]);
        for (int e = 0; e < E; e++) sum += p[e] = expf(p[e] - m);
        for (int e = 0; e < E; e++) p[e] /= sum;
        route(p, E, k, choice + r * k, gate + r * k);
    }
    memset(out, 0, (size_t)(rows * d) * sizeof(float));
    for (int e = 0; e < E; e++) {
        int64_t n = 0;
        for (int64_t r = 0; r < rows; r++)
            for (int j = 0; j < k; j++)
                if (choice[r * k + j] == e) {
                    idx[n] = (int32_t)r;
                    wt[n] = gate[r * k + j];
                    memcpy(xe + n * D, x + r * D, (size_t)D * sizeof(float));
                    n++;
                }
        atomic_fetch_add(&s->counts[e], n);
        if (!n) continue;
        const float *in = xe;
        for (int i = 0; i < s->depth; i++) {
            mmb__linear_forward(ctx, h[i % 2], in, n, &s->lin[e * s->depth + i]);
            if (i < s->depth - 1) mmb__act_forward_mt(ctx, h[i % 2], n * d, MMB_ACT_GELU);
            in = h[i % 2];
        }
        for (int64_t t = 0; t < n; t++) {
            float *o = out + (int64_t)idx[t] * d;
            for (int64_t c = 0; c < d; c++) o[c] += wt[t] * in[t * d + c];
        }
    }
    return MMB_OK;
}

static int moe_routing(const void *st, int64_t *counts, int cap) {
    const moe_state *s = st;
    for (int e = 0; e < s->n_exp && e < cap; e++) counts[e] = atomic_load(&s->counts[e]);
    return s->n_exp;
}

const mmb_connector_ops mmb__conn_moe = {
    .name = "moe_mlpNx_gelu",
    .names = (const char *const[]){"moe_mlpNx_gelu", NULL},
    .accepts = moe_accepts,
    .activation = moe_activation,
    .synth_config = "{\"mm_moe_num_experts\": 8, \"mm_moe_top_k\": 2}",
    .load = moe_load,
    .out_tokens = moe_out_tokens,
    .out_width = moe_out_width,
    .cost = moe_cost,
    .scratch = moe_scratch,
    .forward = moe_forward,
    .free = moe_free,
    .routing = moe_routing,
};
