/* "simple_res": LLaVA's SimpleResBlock, the residual MLP.
 *   x = pre_norm(x)            LayerNorm(C), eps from the config (torch default 1e-5)
 *   out = x + proj(x)          proj = Sequential(Linear(C, C), GELU(erf), Linear(C, C))
 * Note the residual adds the *normalised* x, as the reference code does. Keys:
 * {prefix}pre_norm.weight/.bias [C], {prefix}proj.0.weight [C, C], .0.bias, {prefix}proj.2.weight, .2.bias.
 * LLaVA defines but never builds it, so no released checkpoint names it; "simple_res" is our
 * mm_projector_type for it. */
#include "connectors/connectors.h"

#include <math.h>
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

/* ---- training: the same block on f32 masters ------------------------------------------------------------ */

enum { LN_W, LN_B, FC1_W, FC1_B, FC2_W, FC2_B, N_PARAMS };

typedef struct resmlp_train {
    int64_t C;
    float eps;
    mmb__tparam p[N_PARAMS];
    float *xhat, *rstd, *xn, *z, *a;  /* the forward's: normalised x (rows, C), 1 / sigma (rows), LN(x), fc1's
                                         pre-activation and its GELU (rows, C each) */
    int64_t rows, cap;
} resmlp_train;

static bool resmlp_accepts(const char *type) { return strcmp(type, "simple_res") == 0; }

static void rt_free(void *st) {
    resmlp_train *t = st;
    if (!t) return;
    for (int i = 0; i < N_PARAMS; i++) mmb__tparam_free(&t->p[i]);
    free(t->xhat), free(t->rstd), free(t->xn), free(t->z), free(t->a);
    free(t);
}

static mmb_status rt_open(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, uint64_t seed, void **out) {
    resmlp_train *t = calloc(1, sizeof *t);
    if (!t) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    const int64_t C = t->C = cfg->in_width;
    t->eps = cfg->eps;
    static const char *const names[N_PARAMS] = {"pre_norm.weight", "pre_norm.bias", "proj.0.weight", "proj.0.bias",
                                                "proj.2.weight", "proj.2.bias"};
    mmb_status s = MMB_OK;
    uint64_t st = seed * 0x100000001B3ull;
    for (int i = 0; i < N_PARAMS && s == MMB_OK; i++) {
        char nm[512];
        snprintf(nm, sizeof nm, "%s%s", cfg->prefix, names[i]);
        s = mmb__tparam_new(ctx, &t->p[i], nm, C, i == FC1_W || i == FC2_W ? C : 0);
        if (s != MMB_OK) break;
        if (c) s = mmb__tparam_load(ctx, c, &t->p[i]);
        else if (i == LN_W)
            for (int64_t e = 0; e < C; e++) t->p[i].w[e] = 1; /* nn.LayerNorm: weight 1, bias 0 */
        else if (i != LN_B) mmb__tparam_uniform(&t->p[i], (float)(1.0 / sqrt((double)C)), &st);
    }
    if (s != MMB_OK) {
        rt_free(t);
        return s;
    }
    *out = t;
    return MMB_OK;
}

static int rt_params(void *st, mmb__tparam **p) {
    *p = ((resmlp_train *)st)->p;
    return N_PARAMS;
}

static int64_t rt_out_width(const void *st) { return ((const resmlp_train *)st)->C; }

/* out = LN(x) + fc2(gelu(fc1(LN(x)))), LayerNorm in double per row as the backward reads its statistics. */
static mmb_status rt_forward(mmb_ctx *ctx, void *st, const float *x, int64_t rows, float *out) {
    resmlp_train *t = st;
    const int64_t C = t->C, n = rows * C;
    if (n > t->cap) {
        float **b[] = {&t->xhat, &t->xn, &t->z, &t->a};
        for (int i = 0; i < 4; i++) free(*b[i]), *b[i] = malloc(sizeof(float) * (size_t)n);
        free(t->rstd);
        t->rstd = malloc(sizeof(float) * (size_t)rows + 1);
        t->cap = t->xhat && t->xn && t->z && t->a && t->rstd ? n : 0;
        if (!t->cap) return mmb__err(ctx, MMB_ERR_NOMEM, "simple_res: out of memory for %lld rows", (long long)rows);
    }
    t->rows = rows;
    const float *w = t->p[LN_W].w, *b = t->p[LN_B].w;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * C;
        double mu = 0, var = 0;
        for (int64_t e = 0; e < C; e++) mu += xr[e];
        mu /= (double)C;
        for (int64_t e = 0; e < C; e++) var += (xr[e] - mu) * (xr[e] - mu);
        float rs = (float)(1.0 / sqrt(var / (double)C + t->eps));
        t->rstd[r] = rs;
        for (int64_t e = 0; e < C; e++) {
            float h = (float)(xr[e] - mu) * rs;
            t->xhat[r * C + e] = h;
            t->xn[r * C + e] = h * w[e] + b[e];
        }
    }
    mmb_status s = mmb__train_linear_forward(ctx, t->z, t->xn, rows, t->p[FC1_W].w, t->p[FC1_B].w, C, C);
    if (s == MMB_OK) {
        memcpy(t->a, t->z, sizeof(float) * (size_t)n);
        mmb__act_forward(t->a, n, MMB_ACT_GELU);
        s = mmb__train_linear_forward(ctx, out, t->a, rows, t->p[FC2_W].w, t->p[FC2_B].w, C, C);
    }
    for (int64_t e = 0; s == MMB_OK && e < n; e++) out[e] += t->xn[e];
    return s;
}

/* The input is frozen: only the parameters' gradients. d LN(x) = dout (the residual) + the MLP's input
 * gradient; then the norm's weight and bias: sum over rows of d LN(x) * xhat, and of d LN(x). */
static mmb_status rt_backward(mmb_ctx *ctx, void *st, const float *dout, float scale) {
    resmlp_train *t = st;
    const int64_t C = t->C, rows = t->rows, n = rows * C;
    float *d = malloc(sizeof(float) * (size_t)n), *dn = malloc(sizeof(float) * (size_t)n);
    mmb_status s = d && dn ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "simple_res backward: out of memory");
    for (int64_t e = 0; s == MMB_OK && e < n; e++) d[e] = dout[e] * scale;
    if (s == MMB_OK)
        s = mmb__train_linear_backward(ctx, t->a, d, rows, t->p[FC2_W].w, C, C, t->p[FC2_W].g, t->p[FC2_B].g, dn);
    if (s == MMB_OK) {
        mmb__act_backward(dn, t->z, n, MMB_ACT_GELU);
        float *dxn = malloc(sizeof(float) * (size_t)n);
        if (!dxn) s = mmb__err(ctx, MMB_ERR_NOMEM, "simple_res backward: out of memory");
        if (s == MMB_OK)
            s = mmb__train_linear_backward(ctx, t->xn, dn, rows, t->p[FC1_W].w, C, C, t->p[FC1_W].g, t->p[FC1_B].g,
                                           dxn);
        for (int64_t r = 0; s == MMB_OK && r < rows; r++)
            for (int64_t e = 0; e < C; e++) {
                float g = dxn[r * C + e] + d[r * C + e];
                t->p[LN_W].g[e] += g * t->xhat[r * C + e];
                t->p[LN_B].g[e] += g;
            }
        free(dxn);
    }
    free(d);
    free(dn);
    return s;
}

const mmb__trainable_ops mmb__train_resmlp = {
    .name = "simple_res", .accepts = resmlp_accepts, .open = rt_open, .free = rt_free, .params = rt_params,
    .out_width = rt_out_width, .forward = rt_forward, .backward = rt_backward,
};
