/* The Dense Connector (Yao et al., NeurIPS 2024; HJYao00/DenseConnector, dense_connector.py): several
 * hidden states of the vision encoder combined without parameters, then the LLaVA projector.
 * Indices are HF hidden_states indices (the paper's layer l is hidden_states[l - 1]); the final
 * feature F is the model's select layer (-2). CLS is dropped from every CLIP hidden state; SigLIP has
 * none. Final features come first in every concatenation, as in the code (the paper's equations list
 * them last).
 *   dense_sti  [F ; AvgPool1d(pool)(hidden_states[7]) ; AvgPool1d(pool)(hidden_states[15])] on tokens:
 *              the pooling runs over the raster token sequence, N -> N / pool (floor)
 *   dense_sci  [F | hidden_states[7] | hidden_states[15]] on channels
 *   dense_dci  [F | mean(group 1) | mean(group 2)] on channels; the groups split the hidden states the
 *              reference averages in two halves: CLIP hidden_states[0 .. L-1] (L blocks; [0..11],
 *              [12..23] for ViT-L), SigLIP hidden_states[0 .. L-2] (the repository deletes the last
 *              block; [0..12], [13..25] for so400m's 27)
 * Efficient DC (paper 3.3, no released code): the projected N tokens, a g x g grid, are resized to
 * t x t = `tokens` as torch F.interpolate(mode="bilinear", align_corners=False). */
#include "connectors/connectors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    mmb_dense_params p;           /* layers and groups as given (n = 0: the reference's) */
    int select;                   /* the model's select layer: the final feature unless p.use_final */
    int64_t width;                /* D: one hidden state */
    const mmb_connector_ops *proj;
    void *proj_state;
} dense_state;

static const char *const variants[] = {"dense_sti", "dense_sci", "dense_dci", NULL};

const char *mmb__dense_name(mmb_dense_type t) {
    return t >= MMB_DENSE_STI && t <= MMB_DENSE_DCI ? variants[t - 1] : "";
}

/* The projector's: the Dense Connector itself only selects, pools and concatenates. */
static const char *dense_activation(const void *st) {
    const dense_state *s = st;
    return mmb__connector_activation(s->proj, s->proj_state);
}

static int n_shallow(const mmb_dense_params *p) {
    return p->type == MMB_DENSE_DCI ? (p->n_groups ? p->n_groups : 2) : (p->n_layers ? p->n_layers : 2);
}

int mmb__dense_mult(const mmb_dense_params *p) { return p->type == MMB_DENSE_STI ? 1 : 1 + n_shallow(p); }

static void dense_free(void *st) {
    dense_state *s = st;
    if (!s) return;
    if (s->proj_state) s->proj->free(s->proj_state);
    free(s);
}

static mmb_status dense_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    const mmb_dense_params *p = &cfg->dense;
    const mmb_connector_ops *proj = cfg->proj_type ? mmb__connector_find(cfg->proj_type) : NULL;
    if (!proj || proj->needs)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: the Dense Connector needs a projector after it, not '%s'",
                        c->dir, cfg->proj_type ? cfg->proj_type : "(none)");
    if (p->type < MMB_DENSE_STI || p->type > MMB_DENSE_DCI || p->pool < 0 || p->tokens < 0 || p->n_layers < 0 ||
        p->n_groups < 0 || n_shallow(p) + 1 > MMB_MAX_TAPS)
        return mmb__err(ctx, MMB_ERR_ARG, "Dense Connector: bad parameters (type %d, pool %d, tokens %lld, %d "
                        "layers, %d groups)", (int)p->type, p->pool, (long long)p->tokens, p->n_layers, p->n_groups);
    bool cls = false;
    if (p->tokens && (p->type == MMB_DENSE_STI || mmb__patch_grid(p->tokens, &cls) < 0 || cls))
        return mmb__err(ctx, MMB_ERR_ARG, "Dense Connector: %lld output tokens: the efficient form needs SCI or DCI "
                        "and a square number of tokens (e.g. 144 = 12 x 12)", (long long)p->tokens);
    for (int i = 0; p->type == MMB_DENSE_DCI && i < p->n_groups; i++)
        if (p->group_first[i] < 0 || p->group_last[i] < p->group_first[i])
            return mmb__err(ctx, MMB_ERR_ARG, "Dense Connector: group %d is hidden_states[%d..%d]: expected "
                            "0 <= first <= last", i + 1, p->group_first[i], p->group_last[i]);
    int mult = mmb__dense_mult(p);
    dense_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    s->p = *p;
    if (!s->p.pool) s->p.pool = 8;
    s->select = cfg->select_layer;
    s->width = cfg->in_width % mult ? 0 : cfg->in_width / mult;  /* 0: fits no hidden state (checked later) */
    s->proj = proj;
    mmb_conn_cfg pc = *cfg;
    pc.type = cfg->proj_type;
    mmb_status st = proj->load(ctx, c, &pc, &s->proj_state);
    if (st != MMB_OK) { dense_free(s); return st; }
    *out = s;
    return MMB_OK;
}

/* Tokens into the projector for hidden states of `tokens` tokens, or -1. */
static int64_t proj_tokens(const dense_state *s, int64_t tokens) {
    bool cls = false;
    int64_t g = mmb__patch_grid(tokens, &cls), n = g * g;
    if (g < 1) return -1;
    if (s->p.type != MMB_DENSE_STI) return n;
    return n / s->p.pool < 1 ? -1 : n + n_shallow(&s->p) * (n / s->p.pool);
}

static int64_t dense_out_tokens(const void *st, int64_t tokens) {
    const dense_state *s = st;
    int64_t t = proj_tokens(s, tokens);
    return t > 0 && s->p.tokens ? s->p.tokens : t;
}

static int64_t dense_out_width(const void *st) {
    const dense_state *s = st;
    return s->proj->out_width(s->proj_state);
}

static void dense_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const dense_state *s = st;
    int64_t t = proj_tokens(s, tokens);
    s->proj->cost(s->proj_state, t > 0 ? t : 0, params, flops);
}

/* Floats of the combined features (rows * width * mult bounds STI's N + k N / pool rows too), the
 * projected grid before the efficient resize, and the projector's own scratch. */
static size_t dense_scratch(const void *st, int64_t rows) {
    const dense_state *s = st;
    int64_t k = s->p.type == MMB_DENSE_STI ? 1 + n_shallow(&s->p) : 1, mult = mmb__dense_mult(&s->p);
    size_t f = sizeof(float), x = (size_t)(rows * k) * (size_t)(s->width * mult);
    size_t y = s->p.tokens ? (size_t)rows * (size_t)dense_out_width(st) : 0;
    return (mmb__arena_piece(x * f) + (y ? mmb__arena_piece(y * f) : 0)) / f +
           s->proj->scratch(s->proj_state, rows * k);
}

static int resolve(mmb_ctx *ctx, int idx, int n_hidden, const char *what) {
    int r = idx < 0 && n_hidden > 0 ? idx + n_hidden : idx;
    if (r < 0 || (n_hidden > 0 && r >= n_hidden)) {
        if (n_hidden > 0)
            mmb__err(ctx, MMB_ERR_ARG, "Dense Connector: %s hidden_states[%d] is out of range: the encoder has %d "
                     "hidden states (0..%d)", what, idx, n_hidden, n_hidden - 1);
        else
            mmb__err(ctx, MMB_ERR_MISSING, "Dense Connector: %s hidden_states[%d] is negative and the number of "
                     "hidden states is unknown", what, idx);
        return -1;
    }
    return r;
}

static int dense_needs(mmb_ctx *ctx, const void *st, int n_hidden, bool has_cls, int *taps, int *spans) {
    const dense_state *s = st;
    const mmb_dense_params *p = &s->p;
    if ((taps[0] = resolve(ctx, p->use_final ? p->final_layer : s->select, n_hidden, "final feature")) < 0)
        return -1;
    spans[0] = 1;
    int k = n_shallow(p);
    for (int i = 0; i < k; i++) {
        int first, last;
        if (p->type != MMB_DENSE_DCI) {
            first = last = p->n_layers ? p->layers[i] : 7 + 8 * i;
        } else if (p->n_groups) {
            first = p->group_first[i];
            last = p->group_last[i];
        } else {
            /* The reference averages hidden_states[0 .. E-1] in two halves: E = L for CLIP, L - 1 for
             * SigLIP (its last block deleted). */
            int e = n_hidden - (has_cls ? 1 : 2);
            if (n_hidden <= 0 || e < 2) {
                mmb__err(ctx, MMB_ERR_MISSING, "Dense Connector: DCI's default groups need the encoder's depth "
                         "(%d hidden states known)", n_hidden);
                return -1;
            }
            first = i ? e / 2 : 0;
            last = i ? e - 1 : e / 2 - 1;
        }
        int f = resolve(ctx, first, n_hidden, "shallow"), l = resolve(ctx, last, n_hidden, "shallow");
        if (f < 0 || l < 0) return -1;
        if (l < f) {
            mmb__err(ctx, MMB_ERR_ARG, "Dense Connector: group hidden_states[%d..%d] is empty", first, last);
            return -1;
        }
        taps[1 + i] = f;
        spans[1 + i] = l - f + 1;
    }
    return 1 + k;
}

/* src (rows, width) -> dst, rows `ld` floats apart. */
static void copy_rows(float *dst, int64_t ld, const float *src, int64_t rows, int64_t width) {
    for (int64_t r = 0; r < rows; r++) memcpy(dst + r * ld, src + r * width, (size_t)width * sizeof(float));
}

/* src (g*g, d) -> dst (t*t, d): torch upsample_bilinear2d, align_corners=False, no antialias. */
static void bilinear(float *dst, const float *src, int64_t g, int64_t t, int64_t d) {
    float scale = (float)g / (float)t;  /* as torch: in float, from the sizes */
    for (int64_t oy = 0; oy < t; oy++) {
        float sy = scale * ((float)oy + 0.5f) - 0.5f;
        if (sy < 0) sy = 0;
        int64_t y0 = (int64_t)sy, y1 = y0 + (y0 < g - 1);
        float ly = sy - (float)y0, hy = 1.0f - ly;
        for (int64_t ox = 0; ox < t; ox++) {
            float sx = scale * ((float)ox + 0.5f) - 0.5f;
            if (sx < 0) sx = 0;
            int64_t x0 = (int64_t)sx, x1 = x0 + (x0 < g - 1);
            float lx = sx - (float)x0, hx = 1.0f - lx;
            const float *a = src + (y0 * g + x0) * d, *b = src + (y0 * g + x1) * d;
            const float *c = src + (y1 * g + x0) * d, *e = src + (y1 * g + x1) * d;
            float *o = dst + (oy * t + ox) * d;
            for (int64_t j = 0; j < d; j++) o[j] = hy * (hx * a[j] + lx * b[j]) + ly * (hx * c[j] + lx * e[j]);
        }
    }
}

/* The projector's T rows an image for hidden states of `tokens` tokens, or MMB_ERR_SHAPE. */
static mmb_status check_taps(mmb_ctx *ctx, const dense_state *s, int64_t tokens, int64_t width, int64_t *T) {
    bool has_cls = false;
    int64_t g = mmb__patch_grid(tokens, &has_cls);
    *T = proj_tokens(s, tokens);
    if (g < 1 || *T < 1 || width != s->width)
        return mmb__err(ctx, MMB_ERR_SHAPE, "Dense Connector: hidden states [%lld tokens, %lld wide]: expected a "
                        "square patch grid (plus CLS) %lld wide", (long long)tokens, (long long)width,
                        (long long)s->width);
    return MMB_OK;
}

/* x (batch, T, width * mult): the selected, pooled and concatenated features the projector reads. */
static void combine(const dense_state *s, float *x, const float *const *bufs, int64_t batch, int64_t tokens,
                    int64_t width) {
    const mmb_dense_params *p = &s->p;
    bool has_cls = false;
    int64_t g = mmb__patch_grid(tokens, &has_cls), cls = has_cls, N = g * g, T = proj_tokens(s, tokens);
    int k = n_shallow(p), mult = mmb__dense_mult(p);
    int64_t W = width * mult;
    for (int64_t b = 0; b < batch; b++) {
        float *xb = x + b * T * W;
        copy_rows(xb, W, bufs[0] + (b * tokens + cls) * width, N, width);
        for (int i = 0; i < k; i++) {
            const float *h = bufs[1 + i] + (b * tokens + cls) * width;
            if (p->type != MMB_DENSE_STI) {
                copy_rows(xb + (1 + i) * width, W, h, N, width);
                continue;
            }
            int64_t n = N / p->pool;  /* AvgPool1d(pool, pool) over the token axis */
            float *o = xb + (N + i * n) * W;
            for (int64_t t = 0; t < n; t++)
                for (int64_t j = 0; j < width; j++) {
                    float acc = 0;
                    for (int q = 0; q < p->pool; q++) acc += h[(t * p->pool + q) * width + j];
                    o[t * W + j] = acc / (float)p->pool;
                }
        }
    }
}

static mmb_status dense_forward_taps(mmb_ctx *ctx, const void *st, float *out, const float *const *bufs,
                                     int64_t batch, int64_t tokens, int64_t width) {
    const dense_state *s = st;
    const mmb_dense_params *p = &s->p;
    int64_t T, g = mmb__patch_grid(tokens, &(bool){false}), N = g * g;
    mmb_status r = check_taps(ctx, s, tokens, width, &T);
    if (r != MMB_OK) return r;
    int64_t W = width * mmb__dense_mult(p), d = dense_out_width(st);
    float *x = mmb__arena_alloc(&ctx->arena, (size_t)(batch * T * W) * sizeof(float));
    float *y = p->tokens ? mmb__arena_alloc(&ctx->arena, (size_t)(batch * T * d) * sizeof(float)) : out;
    if (!x || !y) return mmb__err(ctx, MMB_ERR_NOMEM, "Dense Connector: scratch arena too small");
    combine(s, x, bufs, batch, tokens, width);
    r = s->proj->forward(ctx, s->proj_state, y, x, batch, T);
    if (r != MMB_OK || !p->tokens) return r;
    int64_t t = (int64_t)llround(sqrt((double)p->tokens));
    for (int64_t b = 0; b < batch; b++) bilinear(out + b * p->tokens * d, y + b * N * d, g, t, d);
    return MMB_OK;
}

/* Training: the projector's input, the combined features (the efficient form's resize after the projector has
 * no backward here). */
static mmb_status dense_projector_input(mmb_ctx *ctx, const void *st, const float *const *bufs, int64_t batch,
                                        int64_t tokens, int64_t width, float **x, int64_t *rows) {
    const dense_state *s = st;
    if (s->p.tokens)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "Dense Connector: the efficient form (%lld tokens) resizes the "
                        "projector's output; training reads the full grid (no --tokens)", (long long)s->p.tokens);
    int64_t T;
    mmb_status r = check_taps(ctx, s, tokens, width, &T);
    if (r != MMB_OK) return r;
    float *o = malloc(sizeof(float) * (size_t)(batch * T * width * mmb__dense_mult(&s->p)));
    if (!o) return mmb__err(ctx, MMB_ERR_NOMEM, "Dense Connector: out of memory for %lld rows", (long long)(batch * T));
    combine(s, o, bufs, batch, tokens, width);
    *x = o;
    *rows = T;
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_dense = {
    .projector_input = dense_projector_input,
    .name = "dense",
    .names = variants,
    .activation = dense_activation,
    .load = dense_load,
    .out_tokens = dense_out_tokens,
    .out_width = dense_out_width,
    .cost = dense_cost,
    .scratch = dense_scratch,
    .free = dense_free,
    .needs = dense_needs,
    .forward_taps = dense_forward_taps,
};
