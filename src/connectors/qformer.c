/* BLIP-2's Q-Former and the blip2 family: Blip2ForConditionalGeneration's image path as
 * get_image_features runs it (transformers models/blip_2/modeling_blip_2.py), pixels -> the
 * image features handed to the language model.
 *
 *   vision_model (vit.c, family blip2): pixels (B, 3, S, S) -> last_hidden_state img (B, T, E),
 *       post_layernorm on every token, CLS included
 *   x = dropout(layernorm(query_tokens))                          (Nq, H), the same for every image
 *   layer i, BERT-style post-LN (eps qformer_config.layer_norm_eps):
 *       x = LN(x + dense(selfattn(query(x), key(x), value(x))))
 *       if i % cross_attention_frequency == 0:
 *       x = LN(x + dense(crossattn(query(x), key(img), value(img))))   K/V from the image only
 *       x = LN(x + output_query(act(intermediate_query(x))))
 *   language_projection: (B, Nq, H) -> (B, Nq, D_t)
 * Dropout is the identity at inference; no attention mask (the image mask is all ones). */
#include "models/models.h"

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
    mmb_vit *vit;
    mmb_vit_info vi;
    int64_t nq, H, E, I, heads, layers, freq, Dt;
    float eps;
    mmb_act act;
    float *queries;                    /* (Nq, H): layernorm(query_tokens), computed at load */
    mmb_linear proj;                   /* language_projection (D_t, H) */
    qf_layer *layer;
} blip2_state;

static bool blip2_detect(const mmb_ckpt *c, const char *arch, const char *model_type) {
    (void)c;
    return strcmp(model_type, "blip-2") == 0 || strcmp(arch, "Blip2ForConditionalGeneration") == 0 ||
           strcmp(arch, "Blip2Model") == 0;
}

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
    mmb_vit_free(s->vit);
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
    s->E = s->vi.width;  /* Blip2Config sets qformer_config.encoder_hidden_size to the vision width */
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
static void qformer_cost(const blip2_state *s, int64_t *params, int64_t *flops) {
    int64_t H = s->H, E = s->E, I = s->I, N = s->nq, T = s->vi.tokens, p = N * H + 2 * H + H * s->Dt + s->Dt, f = 0;
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

static mmb_status blip2_load(mmb_ctx *ctx, const mmb_ckpt *c, void **state, mmb_model_info *info) {
    const char *arch = "";
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(c->config, "architectures");
    if (cJSON_IsArray(archs) && cJSON_IsString(archs->child)) arch = archs->child->valuestring;
    if (arch[0] && strcmp(arch, "Blip2ForConditionalGeneration") != 0 && strcmp(arch, "Blip2Model") != 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: architecture '%s': mmbridge reads BLIP-2's "
                        "Blip2ForConditionalGeneration and Blip2Model (the language_projection path)", c->dir, arch);
    blip2_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    const char *root = mmb__ckpt_find(c, "model.query_tokens", NULL) ? "model." : "";
    mmb_status st = mmb__vit_load(ctx, c, &s->vit);
    if (st == MMB_OK) {
        mmb_vit_get_info(s->vit, &s->vi);
        if (strcmp(s->vi.family, "blip2") != 0)
            st = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.model_type is not 'blip_2_vision_model' "
                          "(the tower reads as %s)", c->dir, s->vi.family);
        else if (strncmp(s->vi.prefix, root, strlen(root)) != 0)
            st = mmb__err(ctx, MMB_ERR_FORMAT, "%s: the vision tower is under '%s' but query_tokens under '%s'",
                          c->dir, s->vi.prefix, root);
    }
    if (st == MMB_OK) st = load_qformer(ctx, c, root, s);
    if (st != MMB_OK) { blip2_free(s); return st; }
    char name[64];
    snprintf(name, sizeof name, "%slanguage_projection.weight", root);
    info->connector = "qformer";
    info->activation = mmb__act_name(s->act);
    info->n_taps = 0;
    info->vision_layers = s->vi.layers;
    info->vision_width = s->vi.width;
    info->in_width = s->vi.width;
    info->out_width = (int)s->Dt;
    info->image_size = s->vi.image_size;
    info->patch_size = s->vi.patch_size;
    info->tokens_per_image = s->nq;
    qformer_cost(s, &info->params, &info->flops_per_image);
    info->weight_dtype = mmb__ckpt_find(c, name, NULL)->dtype;
    *state = s;
    return MMB_OK;
}

static int64_t blip2_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    const blip2_state *s = st;
    if (height != s->vi.image_size || width != s->vi.image_size) {
        mmb__err(ctx, MMB_ERR_SHAPE, "pixels of %dx%d, but BLIP-2's vision tower takes %dx%d", width, height,
                 s->vi.image_size, s->vi.image_size);
        return -1;
    }
    return s->nq;
}

/* x (rows, H) <- LN(x + y), y's contents lost. */
static void residual_norm(mmb_ctx *ctx, float *x, float *y, const float *w, const float *b, int64_t rows,
                          const blip2_state *s) {
    mmb__add_forward(y, y, x, rows * s->H);
    mmb__layernorm_forward_mt(ctx, x, y, w, b, rows, s->H, s->eps);
}

/* One Q-Former layer on x (B * Nq, H), in place; img (B * T, E). Buffers: y, att (rows, H),
 * big (rows, max(3H, I)), kv (B * T, 2H), asc the attention scratch. */
static void layer_forward(mmb_ctx *ctx, const blip2_state *s, const qf_layer *l, float *x, const float *img,
                          int64_t B, float *y, float *att, float *big, float *kv, float *asc) {
    int64_t rows = B * s->nq, hd = s->H / s->heads, T = s->vi.tokens;
    mmb__linear_forward(ctx, big, x, rows, &l->qkv);
    mmb__attention_forward(ctx, att, big, B, s->nq, s->heads, hd, asc);
    mmb__linear_forward(ctx, y, att, rows, &l->self_out);
    residual_norm(ctx, x, y, l->self_ln_w, l->self_ln_b, rows, s);
    if (l->cross) {
        mmb__linear_forward(ctx, big, x, rows, &l->cq);
        mmb__linear_forward(ctx, kv, img, B * T, &l->ckv);
        mmb__cross_attention_forward(ctx, att, big, kv, kv + s->H, s->H, 2 * s->H, B, s->nq, T, s->heads, s->heads, hd, asc);
        mmb__linear_forward(ctx, y, att, rows, &l->cross_out);
        residual_norm(ctx, x, y, l->cross_ln_w, l->cross_ln_b, rows, s);
    }
    mmb__linear_forward(ctx, big, x, rows, &l->fc1);
    mmb__act_forward_mt(ctx, big, rows * s->I, s->act);
    mmb__linear_forward(ctx, y, big, rows, &l->fc2);
    residual_norm(ctx, x, y, l->ffn_ln_w, l->ffn_ln_b, rows, s);
}

static mmb_status blip2_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t batch, int height,
                               int width, float *out) {
    const blip2_state *s = st;
    if (blip2_tokens(ctx, s, height, width) < 0) return MMB_ERR_SHAPE;
    int64_t T = s->vi.tokens, E = s->E, H = s->H, rows = batch * s->nq, big_w = 3 * H > s->I ? 3 * H : s->I;
    float *img;
    mmb_status r = mmb__vit_last_feats(ctx, s->vit, pixels, batch, batch * T * E, &img);
    size_t f = sizeof(float), asz = f * mmb__attention_scratch(mmb__pool_size(ctx->pool), H / s->heads);
    size_t need = mmb__arena_piece(f * (size_t)(rows * H)) * 3 + mmb__arena_piece(f * (size_t)(rows * big_w)) +
                  mmb__arena_piece(f * (size_t)(batch * T * 2 * H)) + mmb__arena_piece(asz);
    if (r == MMB_OK) r = mmb__arena_reserve(ctx, &ctx->arena, need);
    if (r == MMB_OK) {
        mmb_arena *a = &ctx->arena;
        float *x = mmb__arena_alloc(a, f * (size_t)(rows * H)), *y = mmb__arena_alloc(a, f * (size_t)(rows * H));
        float *att = mmb__arena_alloc(a, f * (size_t)(rows * H)), *big = mmb__arena_alloc(a, f * (size_t)(rows * big_w));
        float *kv = mmb__arena_alloc(a, f * (size_t)(batch * T * 2 * H)), *asc = mmb__arena_alloc(a, asz);
        for (int64_t b = 0; b < batch; b++) memcpy(x + b * s->nq * H, s->queries, f * (size_t)(s->nq * H));
        for (int64_t i = 0; i < s->layers; i++) layer_forward(ctx, s, &s->layer[i], x, img, batch, y, att, big, kv, asc);
        mmb__linear_forward(ctx, out, x, rows, &s->proj);
        mmb__arena_reset(a);
    }
    mmb__arena_reset(&ctx->feats);
    return r;
}

const mmb_family_ops mmb__family_blip2 = {
    .name = "blip2",
    .detect = blip2_detect,
    .load = blip2_load,
    .tokens = blip2_tokens,
    .encode = blip2_encode,
    .free = blip2_free,
};
