/* Honeybee's C-Abstractor (Cha et al., CVPR 2024; kakaobrain/honeybee projectors.py, c-abs.yaml), in an
 * original-LLaVA checkpoint: mm_projector_type "c-abs", Honeybee's `abstractor.*` names under
 * model.mm_projector.
 *   x (N = g*g patch tokens, D) + pos_emb  -> net = Sequential(s1, AdaptiveAvgPool2d((q, q)), s2)
 *   -> readout = Linear(hidden -> d), [SiLU, Linear(d -> d)] x (mlp_depth - 1)     -> (q*q, d)
 * s1, s2 = timm RegStage(depth, in, hidden, stride 1, act SiLU, norm LayerNorm2d), blocks b1..b{depth}:
 *   y = SiLU(conv3(SE(conv2(conv1(x)))) + shortcut(x))
 *   conv1 1x1 (in -> hidden) + LN + SiLU; conv2 depthwise 3x3 + LN + SiLU; SE (fc1 hidden -> round(in/4),
 *   SiLU, fc2, sigmoid); conv3 1x1 + LN; shortcut = downsample (1x1 conv + LN) when in != hidden, else x.
 *   Convs have no bias; the norms are timm LayerNormAct2d (a LayerNorm over channels, eps 1e-5).
 * With depth 0 the net is the pooling alone and the readout reads D channels.
 * Config keys (defaults from Honeybee's c-abs.yaml): mm_cabs_depth (3), mm_cabs_mlp_depth (2),
 * mm_cabs_num_queries (144, a square), mm_cabs_pos_emb (true), mm_cabs_num_pos (pos_emb's tokens; else
 * from the tensor), mm_cabs_hidden_size (the rows of
 * net.0.b1.conv1.conv.weight). pos_emb is (1, N, D), or (1, N + 1, D) with an obsolete CLS slot that
 * Honeybee's load hook drops (its first row is skipped). */
#include "connectors/connectors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 16
#define LN_EPS 1e-5f

typedef struct {
    int64_t cin, cout;
    mmb_linear conv1, conv3, down, se1, se2;
    float *w2, *n1w, *n1b, *n2w, *n2b, *n3w, *n3b, *ndw, *ndb;  /* w2: packed depthwise weight */
    bool has_down;
} reg_block;

typedef struct {
    int depth, mlp_depth;
    int64_t side, in_w, hidden, out_w, n_pos;  /* side: of the q x q output grid; n_pos 0: no pos_emb */
    float *pos;
    reg_block blocks[2 * MAX_DEPTH];           /* s1's then s2's */
    mmb_linear readout[MAX_DEPTH];
} cabs_state;

static const char *cabs_activation(const void *st) { (void)st; return "silu"; }

static void block_free(reg_block *b) {
    mmb_linear *l[] = {&b->conv1, &b->conv3, &b->down, &b->se1, &b->se2};
    for (size_t i = 0; i < sizeof l / sizeof l[0]; i++) mmb__linear_free(l[i]);
    float *f[] = {b->w2, b->n1w, b->n1b, b->n2w, b->n2b, b->n3w, b->n3b, b->ndw, b->ndb};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) free(f[i]);
}

static void cabs_free(void *st) {
    cabs_state *s = st;
    if (!s) return;
    for (int i = 0; i < 2 * MAX_DEPTH; i++) block_free(&s->blocks[i]);
    for (int i = 0; i < MAX_DEPTH; i++) mmb__linear_free(&s->readout[i]);
    free(s->pos);
    free(s);
}

/* Block `p` (e.g. "model.mm_projector.net.0.b1."): a timm RegNet Bottleneck, cin -> cout. */
static mmb_status block_load(mmb_ctx *ctx, const mmb_ckpt *c, reg_block *b, const char *p, int64_t cin,
                             int64_t cout) {
    b->cin = cin;
    b->cout = cout;
    b->has_down = cin != cout;
    char name[600];
    snprintf(name, sizeof name, "%sse.fc1.weight", p);
    const mmb_tensor *t = mmb__ckpt_find(c, name, NULL);
    int64_t rd = t && t->ndim == 4 ? t->shape[0] : (int64_t)llround((double)cin * 0.25);
    mmb_status s = mmb__ckpt_conv1x1(ctx, c, p, "conv1.conv", cout, cin, false, &b->conv1);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "conv1.bn", cout, &b->n1w, &b->n1b);
    if (s == MMB_OK) s = mmb__ckpt_dwconv(ctx, c, p, "conv2.conv", cout, false, &b->w2, NULL);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "conv2.bn", cout, &b->n2w, &b->n2b);
    if (s == MMB_OK && rd < 1) s = mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%s': no squeeze channels", c->dir, name);
    if (s == MMB_OK) s = mmb__ckpt_conv1x1(ctx, c, p, "se.fc1", rd, cout, true, &b->se1);
    if (s == MMB_OK) s = mmb__ckpt_conv1x1(ctx, c, p, "se.fc2", cout, rd, true, &b->se2);
    if (s == MMB_OK) s = mmb__ckpt_conv1x1(ctx, c, p, "conv3.conv", cout, cout, false, &b->conv3);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "conv3.bn", cout, &b->n3w, &b->n3b);
    if (s == MMB_OK && b->has_down) s = mmb__ckpt_conv1x1(ctx, c, p, "downsample.conv", cout, cin, false, &b->down);
    if (s == MMB_OK && b->has_down) s = mmb__ckpt_norm(ctx, c, p, "downsample.bn", cout, &b->ndw, &b->ndb);
    return s;
}

/* An integer config key in [lo, hi], or def when absent. */
static mmb_status cfg_range(mmb_ctx *ctx, const mmb_ckpt *c, const char *key, int64_t def, int64_t lo, int64_t hi,
                            int64_t *out) {
    mmb_status s = MMB_OK;
    *out = def;
    mmb__cfg_int(ctx, c, key, out, &s);
    if (s == MMB_OK && (*out < lo || *out > hi))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld is out of range (%lld..%lld)", c->dir, key,
                     (long long)*out, (long long)lo, (long long)hi);
    return s;
}

static mmb_status cabs_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    int64_t depth, mlp_depth, queries, hidden = 0;
    bool pos = true;
    mmb_status s = cfg_range(ctx, c, "mm_cabs_depth", 3, 0, MAX_DEPTH, &depth);
    if (s == MMB_OK) s = cfg_range(ctx, c, "mm_cabs_mlp_depth", 2, 1, MAX_DEPTH, &mlp_depth);
    if (s == MMB_OK) s = cfg_range(ctx, c, "mm_cabs_num_queries", 144, 1, 1 << 20, &queries);
    if (s == MMB_OK) mmb__cfg_bool(ctx, c, "mm_cabs_pos_emb", &pos, &s);
    if (s != MMB_OK) return s;
    int64_t side = (int64_t)llround(sqrt((double)queries));
    if (side * side != queries)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'mm_cabs_num_queries' = %lld is not a square number",
                        c->dir, (long long)queries);
    char name[512];
    snprintf(name, sizeof name, "%snet.0.b1.conv1.conv.weight", cfg->prefix);
    const mmb_tensor *t = mmb__ckpt_find(c, name, NULL);
    if (depth && !mmb__cfg_int(ctx, c, "mm_cabs_hidden_size", &hidden, &s) && s == MMB_OK) {
        if (!t) return mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' is missing", c->dir, name);
        hidden = t->shape[0];
    }
    if (s != MMB_OK) return s;
    if (depth && hidden < 1)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: C-Abstractor hidden size %lld", c->dir, (long long)hidden);
    cabs_state *st = calloc(1, sizeof *st);
    if (!st) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    st->depth = (int)depth;
    st->mlp_depth = (int)mlp_depth;
    st->side = side;
    st->in_w = cfg->in_width;
    st->hidden = depth ? hidden : cfg->in_width;
    st->out_w = cfg->out_width;
    if (pos) {
        snprintf(name, sizeof name, "%spos_emb", cfg->prefix);
        t = mmb__ckpt_find(c, name, NULL);
        int64_t shape[3] = {1, t && t->ndim == 3 ? t->shape[1] : 0, cfg->in_width};
        if (mmb__cfg_int(ctx, c, "mm_cabs_num_pos", &shape[1], &s) || s != MMB_OK) {
            if (s == MMB_OK && (shape[1] < 1 || shape[1] > (1 << 20)))
                s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'mm_cabs_num_pos' = %lld is out of range", c->dir,
                             (long long)shape[1]);
        } else if (!t)
            s = mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' is missing", c->dir, name);
        else if (shape[1] < 1)
            s = mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%s': expected [1, tokens, %lld]", c->dir, name,
                         (long long)cfg->in_width);
        if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, name, 3, shape, &st->pos);
        st->n_pos = shape[1];
    }
    for (int stage = 0; stage < 2 && s == MMB_OK; stage++)
        for (int i = 0; i < depth && s == MMB_OK; i++) {
            snprintf(name, sizeof name, "%snet.%d.b%d.", cfg->prefix, 2 * stage, i + 1);
            s = block_load(ctx, c, &st->blocks[stage * depth + i], name, stage == 0 && i == 0 ? cfg->in_width : hidden,
                           hidden);
        }
    for (int i = 0; i < mlp_depth && s == MMB_OK; i++) {
        snprintf(name, sizeof name, "readout.%d", 2 * i);
        s = mmb__ckpt_linear(ctx, c, cfg->prefix, name, cfg->out_width, i ? cfg->out_width : st->hidden, true, &st->readout[i]);
    }
    if (s != MMB_OK) { cabs_free(st); return s; }
    *out = st;
    return MMB_OK;
}

static int64_t cabs_out_tokens(const void *st, int64_t tokens) {
    const cabs_state *s = st;
    return mmb__grid_side(tokens) > 0 ? s->side * s->side : -1;
}

static int64_t cabs_out_width(const void *st) { return ((const cabs_state *)st)->out_w; }

/* Parameters and FLOPs of one block over `n` positions. */
static void block_cost(const reg_block *b, int64_t n, int64_t *params, int64_t *flops) {
    const mmb_linear *l[] = {&b->conv1, &b->conv3, &b->down, &b->se1, &b->se2};
    for (int i = 0; i < 5; i++) mmb__linear_cost(l[i], i < 3 ? n : 1, params, flops);
    *params += 9 * b->cout + 3 * 2 * b->cout + (b->has_down ? 2 * b->cout : 0);  /* dw conv, norms */
    *flops += 2 * 9 * n * b->cout;
}

static void cabs_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const cabs_state *s = st;
    int64_t n = mmb__grid_side(tokens) > 0 ? tokens : 0, q = n ? s->side * s->side : 0;
    *params = s->n_pos * s->in_w;
    *flops = 0;
    for (int i = 0; i < 2 * s->depth; i++) block_cost(&s->blocks[i], i < s->depth ? n : q, params, flops);
    for (int i = 0; i < s->mlp_depth; i++) mmb__linear_cost(&s->readout[i], q, params, flops);
}

static int64_t widest(const cabs_state *s) {
    int64_t w = s->in_w > s->hidden ? s->in_w : s->hidden;
    return w > s->out_w ? w : s->out_w;
}

/* Five maps of max(one image's tokens, q*q) positions (rows bounds an image's tokens), and the SE's. */
static size_t cabs_scratch(const void *st, int64_t rows) {
    const cabs_state *s = st;
    int64_t n = rows > s->side * s->side ? rows : s->side * s->side;
    return (5 * mmb__arena_piece((size_t)(n * widest(s)) * sizeof(float)) +
            mmb__arena_piece((size_t)(3 * widest(s)) * sizeof(float))) / sizeof(float);
}

typedef struct {
    float *t1, *t2, *sc, *se;
} block_bufs;

/* x (g*g, cin) -> x (g*g, cout) in place (x holds max(cin, cout) channels per position). */
static void block_forward(mmb_ctx *ctx, const reg_block *b, float *x, int64_t g, const block_bufs *w) {
    int64_t n = g * g, C = b->cout;
    mmb__linear_forward(ctx, w->t1, x, n, &b->conv1);
    mmb__layernorm_forward_mt(ctx, w->t1, w->t1, b->n1w, b->n1b, n, C, LN_EPS);
    mmb__act_forward_mt(ctx, w->t1, n * C, MMB_ACT_SILU);
    mmb__dwconv3x3_forward_mt(ctx, w->t2, w->t1, b->w2, NULL, 1, g, g, C, 1);
    mmb__layernorm_forward_mt(ctx, w->t2, w->t2, b->n2w, b->n2b, n, C, LN_EPS);
    mmb__act_forward_mt(ctx, w->t2, n * C, MMB_ACT_SILU);
    mmb__se_forward(ctx, w->t2, 1, n, &b->se1, &b->se2, MMB_SE_SILU_SIGMOID, w->se);
    mmb__linear_forward(ctx, w->t1, w->t2, n, &b->conv3);
    mmb__layernorm_forward_mt(ctx, w->t1, w->t1, b->n3w, b->n3b, n, C, LN_EPS);
    const float *shortcut = x;
    if (b->has_down) {
        mmb__linear_forward(ctx, w->sc, x, n, &b->down);
        mmb__layernorm_forward_mt(ctx, w->sc, w->sc, b->ndw, b->ndb, n, C, LN_EPS);
        shortcut = w->sc;
    }
    mmb__add_forward(x, w->t1, shortcut, n * C);
    mmb__act_forward_mt(ctx, x, n * C, MMB_ACT_SILU);
}

/* x (batch, g*g, D) -> out (batch, q*q, d), one image at a time. */
static mmb_status cabs_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                               int64_t tokens) {
    const cabs_state *s = st;
    int64_t g = mmb__grid_side(tokens), q = s->side, D = s->in_w, skip = s->n_pos - tokens;
    if (g < 1)
        return mmb__err(ctx, MMB_ERR_SHAPE, "c-abs: %lld tokens per image are not a square patch grid", (long long)tokens);
    if (s->n_pos && skip != 0 && skip != 1)
        return mmb__err(ctx, MMB_ERR_SHAPE, "c-abs: pos_emb holds %lld positions, but the image has %lld patch tokens "
                        "(expected %lld, or %lld with the obsolete CLS slot)", (long long)s->n_pos, (long long)tokens,
                        (long long)tokens, (long long)tokens + 1);
    int64_t n = tokens > q * q ? tokens : q * q;
    size_t map = (size_t)(n * widest(s)) * sizeof(float);
    float *a = mmb__arena_alloc(&ctx->arena, map), *p = mmb__arena_alloc(&ctx->arena, map);
    block_bufs w = {mmb__arena_alloc(&ctx->arena, map), mmb__arena_alloc(&ctx->arena, map),
                    mmb__arena_alloc(&ctx->arena, map),
                    mmb__arena_alloc(&ctx->arena, (size_t)(3 * widest(s)) * sizeof(float))};
    if (!a || !p || !w.t1 || !w.t2 || !w.sc || !w.se)
        return mmb__err(ctx, MMB_ERR_NOMEM, "c-abs: scratch arena too small");
    for (int64_t b = 0; b < batch; b++) {
        memcpy(a, x + b * tokens * D, (size_t)(tokens * D) * sizeof(float));
        if (s->n_pos) mmb__add_forward(a, a, s->pos + skip * D, tokens * D);
        for (int i = 0; i < s->depth; i++) block_forward(ctx, &s->blocks[i], a, g, &w);
        mmb__adaptive_avgpool2d_forward_mt(ctx, p, a, 1, g, g, s->hidden, q, q);
        for (int i = 0; i < s->depth; i++) block_forward(ctx, &s->blocks[s->depth + i], p, q, &w);
        const float *in = p;
        for (int i = 0; i < s->mlp_depth; i++) {
            float *y = i == s->mlp_depth - 1 ? out + b * q * q * s->out_w : i % 2 ? w.t2 : w.t1;
            mmb__linear_forward(ctx, y, in, q * q, &s->readout[i]);
            if (i < s->mlp_depth - 1) mmb__act_forward_mt(ctx, y, q * q * s->out_w, MMB_ACT_SILU);
            in = y;
        }
    }
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_cabs = {
    .name = "c-abs",
    .names = (const char *const[]){"c-abs", NULL},
    .activation = cabs_activation,
    .synth_config = "{\"mm_cabs_hidden_size\": %W, \"mm_cabs_num_pos\": %T}",
    .load = cabs_load,
    .out_tokens = cabs_out_tokens,
    .out_width = cabs_out_width,
    .cost = cabs_cost,
    .scratch = cabs_scratch,
    .forward = cabs_forward,
    .free = cabs_free,
};
