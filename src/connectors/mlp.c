/* The LLaVA projector family: a chain of Linear layers with an activation between them.
 *   "linear"       original LLaVA: Linear(mm_hidden -> H); keys {prefix}weight, {prefix}bias
 *   "mlpNx_gelu"   original LLaVA builder: Linear(mm_hidden -> H), then (N-1) x [GELU(erf), Linear(H -> H)];
 *                  nn.Sequential keys {prefix}{0,2,4,...}.weight/.bias
 *   "llava"        transformers' LlavaMultiModalProjector: linear_1, ACT2FN[projector_hidden_act],
 *                  linear_2, both with bias iff multimodal_projector_bias
 * They are one network with different key names, so they share this file rather than repeat it. */
#include "connectors/connectors.h"

#include <math.h>
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

/* Layer i's weight and bias keys, as the three layouts name them (the file's header). */
static void layer_keys(const mmb_conn_cfg *cfg, int i, char *w, char *b, size_t n) {
    if (strcmp(cfg->type, "llava") == 0) {
        snprintf(w, n, "%slinear_%d.weight", cfg->prefix, i + 1);
        snprintf(b, n, "%slinear_%d.bias", cfg->prefix, i + 1);
    } else if (strcmp(cfg->type, "linear") == 0) {
        snprintf(w, n, "%sweight", cfg->prefix);
        snprintf(b, n, "%sbias", cfg->prefix);
    } else {
        snprintf(w, n, "%s%d.weight", cfg->prefix, 2 * i);
        snprintf(b, n, "%s%d.bias", cfg->prefix, 2 * i);
    }
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
        layer_keys(cfg, i, w, b, sizeof w);
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

/* ---- training (stage 1): the same network on mutable f32 master weights ---------------------------------- */

typedef struct mlp_train {
    int depth;
    mmb_act act;
    int64_t dim[MAX_DEPTH + 1];  /* dim[0] in, dim[i + 1] layer i's out */
    mmb__tparam p[2 * MAX_DEPTH];
    int np;
    float *w[MAX_DEPTH], *b[MAX_DEPTH], *gw[MAX_DEPTH], *gb[MAX_DEPTH];
    float *saved;                /* the forward's layer inputs and pre-activations: rows x sum of widths */
    int64_t rows, cap;           /* rows of the last forward, and what saved holds */
} mlp_train;


static void train_free(void *st) {
    mlp_train *t = st;
    if (!t) return;
    for (int i = 0; i < t->np; i++) mmb__tparam_free(&t->p[i]);
    free(t->saved);
    free(t);
}

static mmb_status train_open(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, uint64_t seed, void **out) {
    if (!mlp_accepts(cfg->type))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "connector '%s' cannot be trained (linear, mlpNx_gelu, llava can)",
                        cfg->type);
    mlp_train *t = calloc(1, sizeof *t);
    if (!t) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    bool hf = strcmp(cfg->type, "llava") == 0, lin = strcmp(cfg->type, "linear") == 0;
    t->depth = hf ? 2 : lin ? 1 : mlp_depth(cfg->type);
    t->act = hf ? cfg->act : MMB_ACT_GELU;
    bool bias = hf ? cfg->bias : true;
    t->dim[0] = cfg->in_width;
    mmb_status s = MMB_OK;
    for (int i = 0; i < t->depth && s == MMB_OK; i++) {
        char wn[512], bn[512];
        layer_keys(cfg, i, wn, bn, sizeof wn);
        int64_t n = cfg->out_width, k = t->dim[i];
        t->dim[i + 1] = n;
        mmb__tparam *pw = &t->p[t->np], *pb = bias ? &t->p[t->np + 1] : NULL;
        s = mmb__tparam_new(ctx, pw, wn, n, k);
        t->np++;
        if (s == MMB_OK && pb) s = mmb__tparam_new(ctx, pb, bn, n, 0), t->np++;
        if (s != MMB_OK) break;
        t->w[i] = pw->w, t->gw[i] = pw->g;
        if (pb) t->b[i] = pb->w, t->gb[i] = pb->g;
        uint64_t st = seed * 0x100000001B3ull + (uint64_t)i;
        float bound = (float)(1.0 / sqrt((double)k)); /* nn.Linear's reset_parameters: U(-1/sqrt(in), 1/sqrt(in)) */
        if (c) s = mmb__tparam_load(ctx, c, pw);
        else mmb__tparam_uniform(pw, bound, &st);
        if (s == MMB_OK && pb) {
            if (c) s = mmb__tparam_load(ctx, c, pb);
            else mmb__tparam_uniform(pb, bound, &st);
        }
    }
    if (s != MMB_OK) {
        train_free(t);
        return s;
    }
    *out = t;
    return MMB_OK;
}

static int train_params(void *st, mmb__tparam **p) {
    mlp_train *t = st;
    *p = t->p;
    return t->np;
}

static int64_t train_out_width(const void *st) {
    const mlp_train *t = st;
    return t->dim[t->depth];
}

/* The forward keeps, for `rows` rows: A_i, layer i's input (rows, dim[i]), for every layer, and Z_i, layer i's
 * pre-activation output (rows, dim[i + 1]), for every layer but the last (A_{i+1} = act(Z_i)). */
static int64_t saved_floats(const mlp_train *t, int64_t rows) {
    int64_t n = 0;
    for (int i = 0; i < t->depth; i++) n += t->dim[i] + (i < t->depth - 1 ? t->dim[i + 1] : 0);
    return n * rows;
}

static float *saved_a(const mlp_train *t, int i) {
    int64_t off = 0;
    for (int k = 0; k < i; k++) off += t->dim[k] + t->dim[k + 1];
    return t->saved + off * t->rows;
}

static float *saved_z(const mlp_train *t, int i) { return saved_a(t, i) + t->dim[i] * t->rows; }

static mmb_status train_forward(mmb_ctx *ctx, void *st, const float *x, int64_t rows, float *out) {
    mlp_train *t = st;
    int64_t need = saved_floats(t, rows);
    if (need > t->cap) {
        free(t->saved);
        if (!(t->saved = malloc(sizeof(float) * (size_t)need))) {
            t->cap = 0;
            return mmb__err(ctx, MMB_ERR_NOMEM, "projector: out of memory for the activations of %lld rows",
                            (long long)rows);
        }
        t->cap = need;
    }
    t->rows = rows;
    memcpy(saved_a(t, 0), x, sizeof(float) * (size_t)(rows * t->dim[0]));
    mmb_status s = MMB_OK;
    for (int i = 0; i < t->depth && s == MMB_OK; i++) {
        bool last = i == t->depth - 1;
        float *z = last ? out : saved_z(t, i);
        s = mmb__train_linear_forward(ctx, z, saved_a(t, i), rows, t->w[i], t->b[i], t->dim[i + 1], t->dim[i]);
        if (s == MMB_OK && !last) {
            float *a = saved_a(t, i + 1);
            memcpy(a, z, sizeof(float) * (size_t)(rows * t->dim[i + 1]));
            mmb__act_forward(a, rows * t->dim[i + 1], t->act);
        }
    }
    return s;
}

static mmb_status train_backward(mmb_ctx *ctx, void *st, const float *dout, float scale) {
    mlp_train *t = st;
    int64_t wide = 0, rows = t->rows;
    for (int i = 0; i <= t->depth; i++) wide = t->dim[i] > wide ? t->dim[i] : wide;
    float *d = malloc(sizeof(float) * (size_t)(rows * wide)), *dn = malloc(sizeof(float) * (size_t)(rows * wide));
    mmb_status s = MMB_OK;
    if (!d || !dn) s = mmb__err(ctx, MMB_ERR_NOMEM, "projector backward: out of memory for %lld rows", (long long)rows);
    const int64_t no = rows * t->dim[t->depth];
    for (int64_t e = 0; s == MMB_OK && e < no; e++) d[e] = dout[e] * scale;
    for (int i = t->depth - 1; i >= 0 && s == MMB_OK; i--) { /* d holds dZ_i */
        s = mmb__train_linear_backward(ctx, saved_a(t, i), d, rows, t->w[i], t->dim[i + 1], t->dim[i], t->gw[i],
                                       t->gb[i], i ? dn : NULL);
        if (s != MMB_OK || !i) break;
        mmb__act_backward(dn, saved_z(t, i - 1), rows * t->dim[i], t->act); /* dA_i -> dZ_{i-1} */
        float *sw = d;
        d = dn;
        dn = sw;
    }
    free(d);
    free(dn);
    return s;
}

const mmb__trainable_ops mmb__train_mlp = {
    .name = "mlp", .accepts = mlp_accepts, .open = train_open, .free = train_free, .params = train_params,
    .out_width = train_out_width, .forward = train_forward, .backward = train_backward,
};
