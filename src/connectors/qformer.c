/* BLIP-2's Q-Former with its language projection, the "qformer" connector of the blip2 family:
 * Blip2ForConditionalGeneration's image path after the tower, as get_image_features runs it
 * (transformers models/blip_2/modeling_blip_2.py), the tower's output -> the image features handed to
 * the language model.
 *
 *   img (B, T, E): the vision model's last_hidden_state (vit.c, family blip2: post_layernorm on every
 *       token, CLS included)
 *   x = dropout(layernorm(query_tokens))                          (Nq, H), the same for every image
 *   layer i, BERT-style post-LN (eps qformer_config.layer_norm_eps):
 *       x = LN(x + dense(selfattn(query(x), key(x), value(x))))
 *       if i % cross_attention_frequency == 0:
 *       x = LN(x + dense(crossattn(query(x), key(img), value(img))))   K/V from the image only
 *       x = LN(x + output_query(act(intermediate_query(x))))
 *   language_projection: (B, Nq, H) -> (B, Nq, D_t)
 * Dropout is the identity at inference; no attention mask (the image mask is all ones). */
#include "connectors/connectors.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    mmb_linear qkv, self_out;          /* (3H, H) query | key | value fused, (H, H) */
    float *qkv_w, *qkv_b;              /* the fused copies */
    float *self_ln_w, *self_ln_b;      /* (H) */
    bool cross;
    mmb_linear cq, ckv, cross_out;     /* (H, H); (2H, E) key | value fused; (H, H) */
    float *ckv_w, *ckv_b;
    float *cross_ln_w, *cross_ln_b;
    mmb_linear fc1, fc2;               /* intermediate_query.dense (I, H), output_query.dense (H, I) */
    float *ffn_ln_w, *ffn_ln_b;
} qf_layer;

typedef struct {
    int64_t T;                         /* the tower's tokens per image (vision_config) */
    int64_t nq, H, E, I, heads, layers, freq, Dt;
    float eps;
    mmb_act act;
    float *queries;                    /* (Nq, H): layernorm(query_tokens), computed at load */
    mmb_linear proj;                   /* language_projection (D_t, H) */
    qf_layer *layer;
} blip2_state;

static void blip2_free(void *st) {
    blip2_state *s = st;
    if (!s) return;
    for (int64_t i = 0; s->layer && i < s->layers; i++) {
        qf_layer *l = &s->layer[i];
        mmb_linear *lins[] = {&l->qkv, &l->self_out, &l->cq, &l->ckv, &l->cross_out, &l->fc1, &l->fc2};
        for (size_t k = 0; k < sizeof lins / sizeof lins[0]; k++) mmb__linear_free(lins[k]);
        float *vecs[] = {l->qkv_w, l->qkv_b, l->self_ln_w, l->self_ln_b, l->ckv_w, l->ckv_b, l->cross_ln_w,
                         l->cross_ln_b, l->ffn_ln_w, l->ffn_ln_b};
        for (size_t k = 0; k < sizeof vecs / sizeof vecs[0]; k++) free(vecs[k]);
    }
    free(s->layer);
    free(s->queries);
    mmb__linear_free(&s->proj);
    free(s);
}

/* An integer config key in [lo, hi], or def when absent. */
static mmb_status cfg_range(mmb_ctx *ctx, const mmb_ckpt *c, const char *key, int64_t def, int64_t lo, int64_t hi,
                            int64_t *out) {
    mmb_status s = MMB_OK;
    if (!mmb__cfg_int(ctx, c, key, out, &s)) *out = def;
    if (s == MMB_OK && (*out < lo || *out > hi))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld is out of range (%lld..%lld)", c->dir, key,
                     (long long)*out, (long long)lo, (long long)hi);
    return s;
}

/* The language model's width: text_config.hidden_size (OPT, Llama...) or d_model (T5); without a
 * text_config, Blip2Config's default OPTConfig (768). */
static mmb_status text_width(mmb_ctx *ctx, const mmb_ckpt *c, int64_t *out) {
    mmb_status s = MMB_OK;
    const char *mt = "opt";
    *out = 768;
    if (!cJSON_GetObjectItemCaseSensitive(c->config, "text_config")) return MMB_OK;
    mmb__cfg_str(ctx, c, "text_config.model_type", &mt, &s);
    if (s != MMB_OK) return s;
    if (strcmp(mt, "t5") == 0) *out = 512;
    const char *key = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(c->config, "text_config"),
                                                       "hidden_size") ? "text_config.hidden_size" : "text_config.d_model";
    bool have = mmb__cfg_int(ctx, c, key, out, &s);
    if (s == MMB_OK && !have && strcmp(mt, "opt") != 0 && strcmp(mt, "t5") != 0)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: text_config has neither 'hidden_size' nor 'd_model'",
                        c->dir);
    return s == MMB_OK ? cfg_range(ctx, c, key, *out, 1, 1 << 20, out) : s;
}

/* Q-Former layer i's weights under lp ("qformer.encoder.layer.{i}."). */
static mmb_status load_layer(mmb_ctx *ctx, const mmb_ckpt *c, const blip2_state *s, const char *lp, qf_layer *l) {
    static const char *const self_names[3] = {"attention.attention.query", "attention.attention.key",
                                              "attention.attention.value"};
    static const char *const cross_names[2] = {"crossattention.attention.key", "crossattention.attention.value"};
    int64_t H = s->H;
    mmb_status st = mmb__ckpt_linear_fused(ctx, c, lp, self_names, 3, H, H, &l->qkv, &l->qkv_w, &l->qkv_b);
    if (st == MMB_OK) st = mmb__ckpt_linear(ctx, c, lp, "attention.output.dense", H, H, true, &l->self_out);
    if (st == MMB_OK) st = mmb__ckpt_norm(ctx, c, lp, "attention.output.LayerNorm", H, &l->self_ln_w, &l->self_ln_b);
    if (st == MMB_OK && l->cross) {
        st = mmb__ckpt_linear(ctx, c, lp, "crossattention.attention.query", H, H, true, &l->cq);
        if (st == MMB_OK)
            st = mmb__ckpt_linear_fused(ctx, c, lp, cross_names, 2, H, s->E, &l->ckv, &l->ckv_w, &l->ckv_b);
        if (st == MMB_OK) st = mmb__ckpt_linear(ctx, c, lp, "crossattention.output.dense", H, H, true, &l->cross_out);
        if (st == MMB_OK)
            st = mmb__ckpt_norm(ctx, c, lp, "crossattention.output.LayerNorm", H, &l->cross_ln_w, &l->cross_ln_b);
    }
    if (st == MMB_OK) st = mmb__ckpt_linear(ctx, c, lp, "intermediate_query.dense", s->I, H, true, &l->fc1);
    if (st == MMB_OK) st = mmb__ckpt_linear(ctx, c, lp, "output_query.dense", H, s->I, true, &l->fc2);
    if (st == MMB_OK) st = mmb__ckpt_norm(ctx, c, lp, "output_query.LayerNorm", H, &l->ffn_ln_w, &l->ffn_ln_b);
    return st;
}

/* Reads the config (Blip2QFormerConfig's defaults for absent keys) and binds the weights under root
 * ("" as save_pretrained writes them, or "model."). */
static mmb_status load_qformer(mmb_ctx *ctx, const mmb_ckpt *c, const char *root, blip2_state *s) {
    const char *act = "gelu";
    double eps = 1e-12;
    mmb_status st = cfg_range(ctx, c, "num_query_tokens", 32, 1, 1 << 16, &s->nq);
    if (st == MMB_OK) st = cfg_range(ctx, c, "qformer_config.hidden_size", 768, 1, 1 << 16, &s->H);
    if (st == MMB_OK) st = cfg_range(ctx, c, "qformer_config.num_hidden_layers", 12, 0, 4096, &s->layers);
    if (st == MMB_OK) st = cfg_range(ctx, c, "qformer_config.num_attention_heads", 12, 1, 1 << 16, &s->heads);
    if (st == MMB_OK) st = cfg_range(ctx, c, "qformer_config.intermediate_size", 3072, 1, 1 << 20, &s->I);
    if (st == MMB_OK) st = cfg_range(ctx, c, "qformer_config.cross_attention_frequency", 2, 1, 4096, &s->freq);
    if (st == MMB_OK) mmb__cfg_num(ctx, c, "qformer_config.layer_norm_eps", &eps, &st);
    if (st == MMB_OK) mmb__cfg_str(ctx, c, "qformer_config.hidden_act", &act, &st);
    if (st == MMB_OK) st = text_width(ctx, c, &s->Dt);
    if (st != MMB_OK) return st;
    if (s->H % s->heads)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: qformer_config.hidden_size %lld is not a multiple of "
                        "num_attention_heads %lld", c->dir, (long long)s->H, (long long)s->heads);
    if (!(eps > 0 && eps < 1))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: qformer_config.layer_norm_eps %g is out of range",
                        c->dir, eps);
    if (!mmb__act_parse(act, &s->act))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: qformer_config.hidden_act '%s' is not supported",
                        c->dir, act);
    s->eps = (float)eps;
    char name[256], lp[160];
    const mmb_tensor *q;
    int64_t qs[3] = {1, s->nq, s->H};
    snprintf(name, sizeof name, "%squery_tokens", root);
    st = mmb__ckpt_bind(ctx, c, name, 3, qs, &q);
    float *ln_w = NULL, *ln_b = NULL;
    snprintf(lp, sizeof lp, "%sqformer.", root);
    if (st == MMB_OK) st = mmb__ckpt_norm(ctx, c, lp, "layernorm", s->H, &ln_w, &ln_b);
    if (st == MMB_OK && !(s->queries = malloc(sizeof(float) * (size_t)(s->nq * s->H))))
        st = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (st == MMB_OK) {
        mmb_to_f32(s->queries, q->data, q->dtype, (size_t)(s->nq * s->H));
        mmb__layernorm_forward(s->queries, s->queries, ln_w, ln_b, s->nq, s->H, s->eps);
    }
    free(ln_w);
    free(ln_b);
    if (st == MMB_OK && !(s->layer = calloc((size_t)s->layers + 1, sizeof *s->layer)))
        st = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < s->layers && st == MMB_OK; i++) {
        snprintf(lp, sizeof lp, "%sqformer.encoder.layer.%lld.", root, (long long)i);
        s->layer[i].cross = i % s->freq == 0;
        st = load_layer(ctx, c, s, lp, &s->layer[i]);
    }
    snprintf(lp, sizeof lp, "%s", root);
    if (st == MMB_OK) st = mmb__ckpt_linear(ctx, c, lp, "language_projection", s->Dt, s->H, true, &s->proj);
    return st;
}

/* Parameters and FLOPs per image (2 per multiply-add) of the Q-Former and the projection, for T image tokens. */
static void qformer_cost(const void *st, int64_t T, int64_t *params, int64_t *flops) {
    const blip2_state *s = st;
    int64_t H = s->H, E = s->E, I = s->I, N = s->nq, p = N * H + 2 * H + H * s->Dt + s->Dt, f = 0;
    for (int64_t i = 0; i < s->layers; i++) {
        p += 4 * H * H + 4 * H + 2 * H + 2 * H * I + I + H + 2 * H;
        f += 2 * N * 4 * H * H + 4 * N * N * H + 4 * N * H * I;
        if (s->layer[i].cross) {
            p += 2 * H * H + 2 * H * E + 4 * H + 2 * H;
            f += 2 * N * 2 * H * H + 2 * T * 2 * E * H + 4 * N * T * H;
        }
    }
    *params = p;
    *flops = f + 2 * N * H * s->Dt;
}

/* cfg: prefix = where query_tokens, qformer.* and language_projection.* are ("" as save_pretrained writes
 * them, or "model."), in_width = the vision width E (Blip2Config sets qformer_config.encoder_hidden_size to
 * it). The rest from the config: num_query_tokens, qformer_config, the text model's width. */
static mmb_status qformer_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **state) {
    mmb_vit_info vi;
    mmb_status st = mmb__vision_cfg(ctx, c, "vision_config.", &vi);
    if (st != MMB_OK) return st;
    blip2_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    s->E = cfg->in_width;
    s->T = vi.tokens;
    st = load_qformer(ctx, c, cfg->prefix, s);
    if (st != MMB_OK) { blip2_free(s); return st; }
    *state = s;
    return MMB_OK;
}

/* Nq queries for any number of image tokens. */
static int64_t qformer_out_tokens(const void *st, int64_t tokens) {
    (void)tokens;
    return ((const blip2_state *)st)->nq;
}
static int64_t qformer_out_width(const void *st) { return ((const blip2_state *)st)->Dt; }
static const char *qformer_activation(const void *st) { return mmb__act_name(((const blip2_state *)st)->act); }

/* x (rows, H) <- LN(x + y), y's contents lost. */
static void residual_norm(mmb_ctx *ctx, float *x, float *y, const float *w, const float *b, int64_t rows,
                          const blip2_state *s) {
    mmb__add_forward(y, y, x, rows * s->H);
    mmb__layernorm_forward_mt(ctx, x, y, w, b, rows, s->H, s->eps);
}

/* One Q-Former layer on x (B * Nq, H), in place; img (B * T, E). Buffers: y, att (rows, H),
 * big (rows, max(3H, I)), kv (B * T, 2H), asc the attention scratch. */
static void layer_forward(mmb_ctx *ctx, const blip2_state *s, const qf_layer *l, float *x, const float *img,
                          int64_t B, int64_t T, float *y, float *att, float *big, float *kv, float *asc) {
    int64_t rows = B * s->nq, hd = s->H / s->heads;
    mmb__linear_forward(ctx, big, x, rows, &l->qkv);
    mmb__attention_forward(ctx, att, big, B, s->nq, s->heads, hd, asc);
    mmb__linear_forward(ctx, y, att, rows, &l->self_out);
    residual_norm(ctx, x, y, l->self_ln_w, l->self_ln_b, rows, s);
    if (l->cross) {
        mmb__linear_forward(ctx, big, x, rows, &l->cq);
        mmb__linear_forward(ctx, kv, img, B * T, &l->ckv);
        mmb__cross_attention_forward(ctx, att, big, kv, kv + s->H, s->H, 2 * s->H, B, s->nq, T, s->heads, s->heads, hd,
                                     asc);
        mmb__linear_forward(ctx, y, att, rows, &l->cross_out);
        residual_norm(ctx, x, y, l->cross_ln_w, l->cross_ln_b, rows, s);
    }
    mmb__linear_forward(ctx, big, x, rows, &l->fc1);
    mmb__act_forward_mt(ctx, big, rows * s->I, s->act);
    mmb__linear_forward(ctx, y, big, rows, &l->fc2);
    residual_norm(ctx, x, y, l->ffn_ln_w, l->ffn_ln_b, rows, s);
}

/* Floats of the arena pieces of one forward over `rows` = B T image rows (B images of the tower's T tokens):
 * x, y, att (B Nq, H), big (B Nq, max(3H, I)), kv (B T, 2H), the attention scratch of up to 256 threads. */
static size_t qformer_scratch(const void *st, int64_t rows) {
    const blip2_state *s = st;
    int64_t B = (rows + s->T - 1) / s->T, q = B * s->nq, big_w = 3 * s->H > s->I ? 3 * s->H : s->I;
    size_t f = sizeof(float);
    size_t bytes = 3 * mmb__arena_piece(f * (size_t)(q * s->H)) + mmb__arena_piece(f * (size_t)(q * big_w)) +
                   mmb__arena_piece(f * (size_t)(rows * 2 * s->H)) +
                   mmb__arena_piece(f * mmb__attention_scratch(256, s->H / s->heads));
    return bytes / f + 1;
}

/* img (batch, T, E) -> out (batch, Nq, D_t); scratch from ctx's arena (qformer_scratch reserved). */
static mmb_status qformer_forward(mmb_ctx *ctx, const void *st, float *out, const float *img, int64_t batch,
                                  int64_t T) {
    const blip2_state *s = st;
    int64_t H = s->H, rows = batch * s->nq, big_w = 3 * H > s->I ? 3 * H : s->I;
    size_t f = sizeof(float);
    mmb_arena *a = &ctx->arena;
    float *x = mmb__arena_alloc(a, f * (size_t)(rows * H)), *y = mmb__arena_alloc(a, f * (size_t)(rows * H));
    float *att = mmb__arena_alloc(a, f * (size_t)(rows * H)), *big = mmb__arena_alloc(a, f * (size_t)(rows * big_w));
    float *kv = mmb__arena_alloc(a, f * (size_t)(batch * T * 2 * H));
    float *asc = mmb__arena_alloc(a, f * mmb__attention_scratch(mmb__pool_size(ctx->pool), H / s->heads));
    if (!x || !y || !att || !big || !kv || !asc) return mmb__err(ctx, MMB_ERR_NOMEM, "qformer: scratch arena too small");
    for (int64_t b = 0; b < batch; b++) memcpy(x + b * s->nq * H, s->queries, f * (size_t)(s->nq * H));
    for (int64_t i = 0; i < s->layers; i++) layer_forward(ctx, s, &s->layer[i], x, img, batch, T, y, att, big, kv, asc);
    mmb__linear_forward(ctx, out, x, rows, &s->proj);
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_qformer = {
    .name = "qformer",
    .names = (const char *const[]){"qformer", NULL},
    .activation = qformer_activation,
    .load = qformer_load,
    .out_tokens = qformer_out_tokens,
    .out_width = qformer_out_width,
    .cost = qformer_cost,
    .scratch = qformer_scratch,
    .forward = qformer_forward,
    .free = blip2_free,
};
