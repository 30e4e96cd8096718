/* Idefics2Connector (transformers' models/idefics2/modeling_idefics2.py): the "idefics2" connector, which the
 * idefics2 family runs after its SigLIP-like tower (vision/vit.c).
 *
 *   modality_projection   SwiGLU: down(act(gate x) * up x), D_v -> text intermediate_size -> d_model,
 *                         act = text_config.hidden_act, no biases
 *   perceiver_resampler   latents (n, d) loaded from the checkpoint (torch.ones at init; trained
 *                         values in real checkpoints), the same for every image; `depth` layers of
 *     lq = RMSNorm_lat(lat); ctx_n = RMSNorm_ctx(context)              (context: the projected patches)
 *     lat += o_proj(attn(q_proj(lq), k/v_proj([ctx_n; lq])))           grouped-query: heads query heads,
 *                                                                       num_key_value_heads K/V heads
 *     lat += SwiGLU_4d(RMSNorm_post(lat))                              (perceiver hidden_act)
 *   then norm = RMSNorm(lat) -> (n, d) per image.
 * The attention mask over [patches; latents] is all ones for a full image, so none is applied.
 *
 * Weights under {prefix} = model.connector. (connector. for a bare Idefics2Model save):
 * modality_projection.{gate,up,down}_proj.weight, perceiver_resampler.latents,
 * perceiver_resampler.layers.{i}.{input_latents_norm,input_context_norm,post_attention_layernorm}.weight,
 * ...layers.{i}.self_attn.{q,k,v,o}_proj.weight, ...layers.{i}.mlp.{gate,up,down}_proj.weight,
 * perceiver_resampler.norm.weight. */
#include "connectors/connectors.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A SwiGLU MLP: down(act(gate x) * up x), no biases. */
typedef struct {
    mmb_linear gate, up, down;  /* (I, n_in), (I, n_in), (n_out, I) */
    mmb_act act;
} swiglu;

typedef struct {
    float *lat_w, *ctx_w, *post_w;  /* (d) RMSNorm weights */
    mmb_linear q, k, v, o;          /* (H hd, d), (KV hd, d), (KV hd, d), (d, H hd) */
    swiglu mlp;                     /* d -> 4d -> d */
} perceiver_layer;

typedef struct {
    int64_t Dv, I, d, P;            /* vision width, projection intermediate, d_model, patches per image */
    int64_t n, depth, H, KV, hd;    /* latents, layers, heads, K/V heads, head_dim */
    float eps;
    swiglu proj;                    /* modality_projection: Dv -> I -> d */
    float *latents;                 /* (n, d) */
    perceiver_layer *layers;
    float *norm_w;                  /* (d) */
} i2_state;

#define CHUNK 256  /* rows of the modality projection's intermediate kept at once */

static mmb_status bind_linear(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                              int64_t n_in, mmb_linear *l) {
    char wn[512];
    snprintf(wn, sizeof wn, "%s%s.weight", prefix, name);
    const mmb_tensor *w;
    int64_t shape[2] = {n_out, n_in};
    mmb_status s = mmb__ckpt_bind(ctx, c, wn, 2, shape, &w);
    return s == MMB_OK ? mmb__linear_bind(ctx, l, w, NULL) : s;
}

static mmb_status bind_swiglu(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, int64_t n_in, int64_t I,
                              int64_t n_out, mmb_act act, swiglu *m) {
    m->act = act;
    mmb_status s = bind_linear(ctx, c, prefix, "gate_proj", I, n_in, &m->gate);
    if (s == MMB_OK) s = bind_linear(ctx, c, prefix, "up_proj", I, n_in, &m->up);
    if (s == MMB_OK) s = bind_linear(ctx, c, prefix, "down_proj", n_out, I, &m->down);
    return s;
}

static void free_swiglu(swiglu *m) {
    mmb__linear_free(&m->gate);
    mmb__linear_free(&m->up);
    mmb__linear_free(&m->down);
}

/* x (rows, n_in) -> out (rows, n_out); g, u (rows, I) scratch. */
static void swiglu_forward(mmb_ctx *ctx, const swiglu *m, float *out, const float *x, int64_t rows, float *g,
                           float *u) {
    int64_t I = m->gate.n_out;
    mmb__linear_forward(ctx, g, x, rows, &m->gate);
    mmb__linear_forward(ctx, u, x, rows, &m->up);
    mmb__act_forward_mt(ctx, g, rows * I, m->act);
    mmb__mul_forward(g, g, u, rows * I);
    mmb__linear_forward(ctx, out, g, rows, &m->down);
}

static const char *i2_activation(const void *st) { return mmb__act_name(((const i2_state *)st)->proj.act); }

static void i2_free(void *st) {
    i2_state *s = st;
    if (!s) return;
    free_swiglu(&s->proj);
    for (int64_t i = 0; s->layers && i < s->depth; i++) {
        perceiver_layer *l = &s->layers[i];
        free(l->lat_w); free(l->ctx_w); free(l->post_w);
        mmb__linear_free(&l->q); mmb__linear_free(&l->k); mmb__linear_free(&l->v); mmb__linear_free(&l->o);
        free_swiglu(&l->mlp);
    }
    free(s->layers);
    free(s->latents);
    free(s->norm_w);
    free(s);
}

/* Reads the perceiver's config: perceiver_config with Idefics2PerceiverConfig's defaults, whose hidden_size
 * and rms_norm_eps Idefics2Config replaces by the text model's (d_model) when the hidden sizes differ. */
static mmb_status perceiver_cfg(mmb_ctx *ctx, const mmb_ckpt *c, int64_t d_model, i2_state *s, mmb_act *act) {
    struct { const char *k; int64_t def; int64_t *dst; } ints[] = {
        {"perceiver_config.hidden_size", 4096, &s->d},       {"perceiver_config.resampler_n_latents", 64, &s->n},
        {"perceiver_config.resampler_depth", 3, &s->depth},  {"perceiver_config.resampler_n_heads", 16, &s->H},
        {"perceiver_config.resampler_head_dim", 96, &s->hd}, {"perceiver_config.num_key_value_heads", 4, &s->KV},
    };
    mmb_status st = MMB_OK;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && st == MMB_OK; i++) {
        if (!mmb__cfg_int(ctx, c, ints[i].k, ints[i].dst, &st)) *ints[i].dst = ints[i].def;
        if (st == MMB_OK && (*ints[i].dst < 1 || *ints[i].dst > (1 << 20)))
            st = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld is out of range", c->dir, ints[i].k,
                          (long long)*ints[i].dst);
    }
    double eps = 1e-6, text_eps = 1e-6;
    const char *a = "silu";
    if (st == MMB_OK) mmb__cfg_num(ctx, c, "perceiver_config.rms_norm_eps", &eps, &st);
    if (st == MMB_OK) mmb__cfg_num(ctx, c, "text_config.rms_norm_eps", &text_eps, &st);
    if (st == MMB_OK) mmb__cfg_str(ctx, c, "perceiver_config.hidden_act", &a, &st);
    if (st != MMB_OK) return st;
    if (s->d != d_model) {
        s->d = d_model;
        eps = text_eps;
    }
    s->eps = (float)eps;
    if (s->KV > s->H || s->H % s->KV != 0)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: perceiver_config.num_key_value_heads %lld must divide "
                        "resampler_n_heads %lld", c->dir, (long long)s->KV, (long long)s->H);
    if (s->depth > 4096 || s->H * s->hd > (1 << 20))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: perceiver sizes out of range", c->dir);
    if (!mmb__act_parse(a, act))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: perceiver_config.hidden_act '%s' is not supported",
                        c->dir, a);
    return MMB_OK;
}

/* cfg: prefix, in_width = vision width, out_width = d_model. The modality projection's width and activation
 * are the text model's (text_config.intermediate_size, hidden_act). */
static mmb_status i2_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    mmb_vit_info vi;
    mmb_status st = mmb__vision_cfg(ctx, c, "vision_config.", &vi);
    int64_t I = 14336;
    const char *proj_act = "silu";
    if (st == MMB_OK && !mmb__cfg_int(ctx, c, "text_config.intermediate_size", &I, &st) && st == MMB_OK) I = 14336;
    if (st == MMB_OK) mmb__cfg_str(ctx, c, "text_config.hidden_act", &proj_act, &st);
    if (st != MMB_OK) return st;
    mmb_act pa;
    if (!mmb__act_parse(proj_act, &pa))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: text_config.hidden_act '%s' is not supported", c->dir,
                        proj_act);
    if (I < 1 || I > (1 << 24))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'text_config.intermediate_size' = %lld is out of range",
                        c->dir, (long long)I);
    i2_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    s->Dv = cfg->in_width;
    s->I = I;
    s->P = vi.tokens;
    mmb_act act = MMB_ACT_SILU;
    st = perceiver_cfg(ctx, c, cfg->out_width, s, &act);
    int64_t d = s->d, Hd = s->H * s->hd, KVd = s->KV * s->hd;
    char p[256], lp[320];
    snprintf(p, sizeof p, "%smodality_projection.", cfg->prefix);
    if (st == MMB_OK) st = bind_swiglu(ctx, c, p, s->Dv, I, d, pa, &s->proj);
    if (st == MMB_OK) {
        const mmb_tensor *t;
        int64_t shape[2] = {s->n, d};
        snprintf(p, sizeof p, "%sperceiver_resampler.latents", cfg->prefix);
        st = mmb__ckpt_bind(ctx, c, p, 2, shape, &t);
        if (st == MMB_OK && !(s->latents = malloc(sizeof(float) * (size_t)(s->n * d))))
            st = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        if (st == MMB_OK) mmb_to_f32(s->latents, t->data, t->dtype, (size_t)(s->n * d));
    }
    if (st == MMB_OK) {
        snprintf(p, sizeof p, "%sperceiver_resampler.norm.weight", cfg->prefix);
        st = mmb__ckpt_vec(ctx, c, p, d, &s->norm_w);
    }
    if (st == MMB_OK && !(s->layers = calloc((size_t)s->depth, sizeof *s->layers)))
        st = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < s->depth && st == MMB_OK; i++) {
        perceiver_layer *l = &s->layers[i];
        static const char *const norms[3] = {"input_latents_norm", "input_context_norm", "post_attention_layernorm"};
        float **dst[3] = {&l->lat_w, &l->ctx_w, &l->post_w};
        for (int k = 0; k < 3 && st == MMB_OK; k++) {
            snprintf(lp, sizeof lp, "%sperceiver_resampler.layers.%lld.%s.weight", cfg->prefix, (long long)i, norms[k]);
            st = mmb__ckpt_vec(ctx, c, lp, d, dst[k]);
        }
        snprintf(lp, sizeof lp, "%sperceiver_resampler.layers.%lld.self_attn.", cfg->prefix, (long long)i);
        if (st == MMB_OK) st = bind_linear(ctx, c, lp, "q_proj", Hd, d, &l->q);
        if (st == MMB_OK) st = bind_linear(ctx, c, lp, "k_proj", KVd, d, &l->k);
        if (st == MMB_OK) st = bind_linear(ctx, c, lp, "v_proj", KVd, d, &l->v);
        if (st == MMB_OK) st = bind_linear(ctx, c, lp, "o_proj", d, Hd, &l->o);
        snprintf(lp, sizeof lp, "%sperceiver_resampler.layers.%lld.mlp.", cfg->prefix, (long long)i);
        if (st == MMB_OK) st = bind_swiglu(ctx, c, lp, d, 4 * d, d, act, &l->mlp);
    }
    if (st != MMB_OK) { i2_free(s); return st; }
    *out = s;
    return MMB_OK;
}

/* n latents per image, for the tower's full-image patch count only. */
static int64_t i2_out_tokens(const void *st, int64_t tokens) {
    const i2_state *s = st;
    return tokens == s->P ? s->n : -1;
}

static int64_t i2_out_width(const void *st) { return ((const i2_state *)st)->d; }

static void i2_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const i2_state *s = st;
    int64_t d = s->d, Hd = s->H * s->hd, KVd = s->KV * s->hd, n = s->n, S = tokens + n;
    *params = 2 * s->Dv * s->I + s->I * d + n * d + d +
              s->depth * (3 * d + 2 * d * Hd + 2 * d * KVd + 12 * d * d);
    *flops = 2 * tokens * (2 * s->Dv * s->I + s->I * d) +
             s->depth * (2 * n * d * Hd + 4 * S * d * KVd + 4 * n * S * Hd + 2 * n * Hd * d + 24 * n * d * d);
}

/* The buffers of one forward for B images of P patches, in floats (each an arena piece). */
typedef struct { size_t ctx, g, u, hs, lat, lq, q, k, v, att, o, mg, mu, asc; } i2_sizes;

static i2_sizes sizes(const i2_state *s, int64_t B, int nth) {
    int64_t R = B * s->P, Rl = B * s->n, S = R + Rl, d = s->d, rc = R < CHUNK ? R : CHUNK;
    i2_sizes z = {(size_t)(R * d),       (size_t)(rc * s->I),        (size_t)(rc * s->I),
                  (size_t)(S * d),       (size_t)(Rl * d),           (size_t)(Rl * d),
                  (size_t)(Rl * s->H * s->hd), (size_t)(S * s->KV * s->hd), (size_t)(S * s->KV * s->hd),
                  (size_t)(Rl * s->H * s->hd), (size_t)(Rl * d), (size_t)(Rl * 4 * d), (size_t)(Rl * 4 * d),
                  mmb__attention_scratch(nth, s->hd)};
    return z;
}

/* The arena's pool size is not known here; scratch assumes up to 256 threads for the attention's share. */
static size_t i2_scratch(const void *st, int64_t rows) {
    const i2_state *s = st;
    int64_t B = (rows + s->P - 1) / s->P;
    i2_sizes z = sizes(s, B, 256);
    const size_t *f = &z.ctx;
    size_t total = 0;
    for (size_t i = 0; i < sizeof z / sizeof(size_t); i++) total += mmb__arena_piece(f[i] * sizeof(float));
    return total / sizeof(float);
}

/* x (B, P, Dv) -> out (B, n, d), as described at the top. */
static mmb_status i2_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t B, int64_t tokens) {
    const i2_state *s = st;
    if (tokens != s->P)
        return mmb__err(ctx, MMB_ERR_SHAPE, "Idefics2 connector: %lld patches per image, expected %lld (full images "
                        "only)", (long long)tokens, (long long)s->P);
    i2_sizes z = sizes(s, B, mmb__pool_size(ctx->pool));
    size_t *f = &z.ctx;
    float *buf[sizeof z / sizeof(size_t)];
    for (size_t i = 0; i < sizeof z / sizeof(size_t); i++)
        if (!(buf[i] = mmb__arena_alloc(&ctx->arena, f[i] * sizeof(float))))
            return mmb__err(ctx, MMB_ERR_NOMEM, "Idefics2 connector: scratch arena too small");
    float *cx = buf[0], *g = buf[1], *u = buf[2], *hs = buf[3], *lat = buf[4], *lq = buf[5], *q = buf[6], *k = buf[7];
    float *v = buf[8], *att = buf[9], *o = buf[10], *mg = buf[11], *mu = buf[12], *asc = buf[13];
    int64_t P = s->P, n = s->n, d = s->d, R = B * P, Rl = B * n;
    for (int64_t r0 = 0; r0 < R; r0 += CHUNK) {  /* modality projection, CHUNK rows at a time */
        int64_t rows = R - r0 < CHUNK ? R - r0 : CHUNK;
        swiglu_forward(ctx, &s->proj, cx + r0 * d, x + r0 * s->Dv, rows, g, u);
    }
    for (int64_t b = 0; b < B; b++) memcpy(lat + b * n * d, s->latents, sizeof(float) * (size_t)(n * d));
    for (int64_t i = 0; i < s->depth; i++) {
        const perceiver_layer *l = &s->layers[i];
        mmb__rmsnorm_forward_mt(ctx, lq, lat, l->lat_w, Rl, d, s->eps);
        for (int64_t b = 0; b < B; b++) {  /* hs (B, P + n, d) = [RMSNorm_ctx(context); lq] per image */
            mmb__rmsnorm_forward_mt(ctx, hs + b * (P + n) * d, cx + b * P * d, l->ctx_w, P, d, s->eps);
            memcpy(hs + (b * (P + n) + P) * d, lq + b * n * d, sizeof(float) * (size_t)(n * d));
        }
        mmb__linear_forward(ctx, q, lq, Rl, &l->q);
        mmb__linear_forward(ctx, k, hs, R + Rl, &l->k);
        mmb__linear_forward(ctx, v, hs, R + Rl, &l->v);
        mmb__cross_attention_forward(ctx, att, q, k, v, s->H * s->hd, s->KV * s->hd, B, n, P + n, s->H, s->KV, s->hd,
                                     asc);
        mmb__linear_forward(ctx, o, att, Rl, &l->o);
        mmb__add_forward(lat, lat, o, Rl * d);
        mmb__rmsnorm_forward_mt(ctx, lq, lat, l->post_w, Rl, d, s->eps);
        swiglu_forward(ctx, &l->mlp, o, lq, Rl, mg, mu);
        mmb__add_forward(lat, lat, o, Rl * d);
    }
    mmb__rmsnorm_forward_mt(ctx, out, lat, s->norm_w, Rl, d, s->eps);
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_idefics2 = {
    .name = "idefics2",
    .names = (const char *const[]){"idefics2", NULL},
    .activation = i2_activation,
    .load = i2_load,
    .out_tokens = i2_out_tokens,
    .out_width = i2_out_width,
    .cost = i2_cost,
    .scratch = i2_scratch,
    .forward = i2_forward,
    .free = i2_free,
};
