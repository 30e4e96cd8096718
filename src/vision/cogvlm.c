/* CogVLM's vision tower: the EVA2-CLIP transformer of the remote code's visual.py (EVA2CLIPModel's
 * patch_embedding and transformer; its GLU adapter and boi/eoi are the cogvlm family's, models/cogvlm.c).
 *
 *   patch_embedding.proj          Conv2d(in_channels -> D, kernel = stride = patch, with bias) as a GEMM on
 *                                 im2col rows
 *   patch_embedding.cls_embedding [1, D], token 0
 *   position_embedding.weight     [num_positions = g^2 + 1, D], added to every token (CLS included)
 *   transformer.layers.{i}        x = x + input_layernorm(attention(x)); x = x + post_attention_layernorm(mlp(x)):
 *                                 the norms on the sub-layers' outputs, not their inputs (EVA2-CLIP's
 *                                 sandwich without the pre-norm); attention.query_key_value [3D, D] + bias,
 *                                 [q | k | v] each head-major, softmax(q k^T / sqrt(hd)) over every token,
 *                                 attention.dense with bias; mlp.fc1 / fc2 with bias, hidden_act between;
 *                                 LayerNorms with layer_norm_eps
 *   output                        the last layer's tokens without the CLS: (B, g^2, D), row-major over the grid
 *
 * Config (vision_config of the CogVLM checkpoint): hidden_size, intermediate_size, num_hidden_layers, num_heads
 * (or num_attention_heads), patch_size, image_size, in_channels (or num_channels), num_positions,
 * layer_norm_eps, hidden_act. Weights under model.vision. (CogVLMModel.vision). */
#include "vision/vision.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    mmb_linear qkv, dense, fc1, fc2;
} cv_layer;

struct mmb_cogvit {
    mmb_cogvit_info info;
    mmb_act act;
    mmb_linear patch;   /* (D, 3 p p) + bias */
    float *cls, *pos;   /* (D), (P, D) */
    cv_layer *layers;
};

void mmb__cogvit_free(mmb_cogvit *v) {
    if (!v) return;
    for (int i = 0; v->layers && i < v->info.layers; i++) {
        cv_layer *l = &v->layers[i];
        free(l->ln1_w); free(l->ln1_b); free(l->ln2_w); free(l->ln2_b);
        mmb__linear_free(&l->qkv);
        mmb__linear_free(&l->dense);
        mmb__linear_free(&l->fc1);
        mmb__linear_free(&l->fc2);
    }
    free(v->layers);
    mmb__linear_free(&v->patch);
    free(v->cls);
    free(v->pos);
    free(v);
}

mmb_cogvit_info mmb__cogvit_info(const mmb_cogvit *v) { return v->info; }

/* An int of vision_config under the first of two names present (name2 NULL: one), else def; range-checked. */
static int64_t vint(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, const char *name2, int64_t def, int64_t lo,
                    int64_t hi, mmb_status *s) {
    char key[96];
    int64_t x = def;
    if (*s != MMB_OK) return def;
    snprintf(key, sizeof key, "vision_config.%s", name);
    bool got = mmb__cfg_int(ctx, c, key, &x, s);
    if (!got && name2 && *s == MMB_OK) {
        snprintf(key, sizeof key, "vision_config.%s", name2);
        mmb__cfg_int(ctx, c, key, &x, s);
    }
    if (*s == MMB_OK && (x < lo || x > hi))
        *s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld is out of range (%lld..%lld)", c->dir, key,
                      (long long)x, (long long)lo, (long long)hi);
    return x;
}

static mmb_status read_config(mmb_ctx *ctx, const mmb_ckpt *c, mmb_cogvit *v) {
    mmb_cogvit_info *in = &v->info;
    if (!cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(c->config, "vision_config")))
        return mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: no 'vision_config' object (CogVLM's EVA2-CLIP tower)",
                        c->dir);
    mmb_status s = MMB_OK;
    /* the defaults are cogvlm-chat-hf's */
    in->width = (int)vint(ctx, c, "hidden_size", NULL, 1792, 1, 1 << 16, &s);
    in->inter = (int)vint(ctx, c, "intermediate_size", NULL, 15360, 1, 1 << 20, &s);
    in->layers = (int)vint(ctx, c, "num_hidden_layers", NULL, 63, 1, 4096, &s);
    in->heads = (int)vint(ctx, c, "num_heads", "num_attention_heads", 16, 1, 4096, &s);
    in->patch = (int)vint(ctx, c, "patch_size", NULL, 14, 1, 1 << 12, &s);
    in->image_size = (int)vint(ctx, c, "image_size", NULL, 490, 1, 1 << 14, &s);
    int64_t ch = vint(ctx, c, "in_channels", "num_channels", 3, 1, 64, &s);
    int64_t np = vint(ctx, c, "num_positions", NULL, -1, -1, (int64_t)1 << 28, &s);
    double eps = 1e-6;
    const char *act = "gelu";
    if (s == MMB_OK) mmb__cfg_num(ctx, c, "vision_config.layer_norm_eps", &eps, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "vision_config.hidden_act", &act, &s);
    if (s != MMB_OK) return s;
    if (ch != 3)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_config.in_channels %lld (RGB, 3, is "
                        "supported)", c->dir, (long long)ch);
    if (in->width % in->heads)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.hidden_size %d is not a multiple of "
                        "num_heads %d", c->dir, in->width, in->heads);
    if (in->image_size % in->patch)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.image_size %d is not a multiple of "
                        "patch_size %d", c->dir, in->image_size, in->patch);
    if (!(eps > 0 && eps < 1))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.layer_norm_eps %g is out of range", c->dir,
                        eps);
    if (!mmb__act_parse(act, &v->act))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_config.hidden_act '%s' is not supported",
                        c->dir, act);
    in->grid = in->image_size / in->patch;
    in->tokens = (int64_t)in->grid * in->grid;
    if (in->tokens + 1 > (1 << 20))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config: %lld patches is too many", c->dir,
                        (long long)in->tokens);
    /* PatchEmbedding adds position_embedding.weight whole to the CLS + patches: the two counts must agree */
    if (np >= 0 && np != in->tokens + 1)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.num_positions %lld, but image_size %d / "
                        "patch_size %d makes %lld patches + CLS", c->dir, (long long)np, in->image_size, in->patch,
                        (long long)in->tokens + 1);
    in->eps = (float)eps;
    return MMB_OK;
}

static mmb_status load_layer(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_cogvit *v, int i, cv_layer *l) {
    const int64_t D = v->info.width, I = v->info.inter;
    char lp[96];
    snprintf(lp, sizeof lp, "%stransformer.layers.%d.", v->info.prefix, i);
    mmb_status s = mmb__ckpt_norm(ctx, c, lp, "input_layernorm", D, &l->ln1_w, &l->ln1_b);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, "post_attention_layernorm", D, &l->ln2_w, &l->ln2_b);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "attention.query_key_value", 3 * D, D, true, &l->qkv);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "attention.dense", D, D, true, &l->dense);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc1", I, D, true, &l->fc1);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc2", D, I, true, &l->fc2);
    return s;
}

mmb_status mmb__cogvit_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_cogvit **out) {
    *out = NULL;
    mmb_cogvit *v = calloc(1, sizeof *v);
    if (!v) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    v->info.prefix = "model.vision.";
    mmb_status s = read_config(ctx, c, v);
    const int64_t D = v->info.width, p = v->info.patch, P = v->info.tokens + 1;
    char name[160];
    const mmb_tensor *pw = NULL, *pb = NULL;
    const int64_t pshape[4] = {D, 3, p, p}, bshape[1] = {D};
    snprintf(name, sizeof name, "%spatch_embedding.proj.weight", v->info.prefix);
    if (s == MMB_OK) s = mmb__ckpt_bind(ctx, c, name, 4, pshape, &pw);
    snprintf(name, sizeof name, "%spatch_embedding.proj.bias", v->info.prefix);
    if (s == MMB_OK) s = mmb__ckpt_bind(ctx, c, name, 1, bshape, &pb);
    if (s == MMB_OK) {
        mmb_tensor w2 = *pw;  /* the conv kernel as a (D, 3 p p) matrix in im2col order */
        w2.ndim = 2;
        w2.shape[1] = 3 * p * p;
        s = mmb__linear_bind(ctx, &v->patch, &w2, pb);
    }
    const int64_t cs[2] = {1, D}, ps[2] = {P, D};
    snprintf(name, sizeof name, "%spatch_embedding.cls_embedding", v->info.prefix);
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, name, 2, cs, &v->cls);
    snprintf(name, sizeof name, "%spatch_embedding.position_embedding.weight", v->info.prefix);
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, name, 2, ps, &v->pos);
    if (s == MMB_OK && !(v->layers = calloc((size_t)v->info.layers, sizeof *v->layers)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    for (int i = 0; s == MMB_OK && i < v->info.layers; i++) s = load_layer(ctx, c, v, i, &v->layers[i]);
    if (s != MMB_OK) {
        mmb__cogvit_free(v);
        return s;
    }
    /* costs: the patch GEMM, then per layer qkv, dense, fc1, fc2 and the attention's two products */
    mmb_cogvit_info *in = &v->info;
    const int64_t I = in->inter;
    in->params = D * 3 * p * p + D + D + P * D + (int64_t)in->layers * (4 * D + 3 * D * D + 3 * D + D * D + D +
                                                                        I * D + I + D * I + D);
    in->flops_per_image = 2 * in->tokens * D * 3 * p * p +
                          (int64_t)in->layers * (2 * P * (4 * D * D + 2 * D * I) + 4 * P * P * D);
    *out = v;
    return MMB_OK;
}

/* pixels (B, 3, S, S) -> rows (B g g, 3 p p): each patch's pixels in (c, ky, kx) order. */
static void im2col(float *rows, const float *px, int64_t B, int S, int p) {
    const int g = S / p;
    const int64_t P = 3 * (int64_t)p * p;
    for (int64_t b = 0; b < B; b++)
        for (int gy = 0; gy < g; gy++)
            for (int gx = 0; gx < g; gx++) {
                float *r = rows + ((b * g + gy) * g + gx) * P;
                for (int c = 0; c < 3; c++)
                    for (int ky = 0; ky < p; ky++)
                        memcpy(r + (c * p + ky) * p, px + ((b * 3 + c) * S + gy * p + ky) * (int64_t)S + gx * p,
                               sizeof(float) * (size_t)p);
            }
}

mmb_status mmb__cogvit_forward(mmb_ctx *ctx, const mmb_cogvit *v, const float *pixels, int64_t B, int height,
                               int width, float *out) {
    const mmb_cogvit_info *in = &v->info;
    if (height != in->image_size || width != in->image_size)
        return mmb__err(ctx, MMB_ERR_SHAPE, "cogvlm: pixels of %dx%d; the vision model takes %dx%d "
                        "(vision_config.image_size)", width, height, in->image_size, in->image_size);
    const int64_t D = in->width, I = in->inter, G = in->tokens, T = G + 1, hd = D / in->heads;
    const int64_t P = 3 * (int64_t)in->patch * in->patch;
    const size_t asc_n = mmb__attention_scratch(mmb__pool_size(ctx->pool), hd);
    uint64_t rows, n_cols, n_x, n_qkv, n_h;
    if (B < 1 || !mmb__mul_ok((uint64_t)B, (uint64_t)T, &rows) || !mmb__mul_ok(rows, (uint64_t)P, &n_cols) ||
        !mmb__mul_ok(rows, (uint64_t)D, &n_x) || !mmb__mul_ok(rows, 3 * (uint64_t)D, &n_qkv) ||
        !mmb__mul_ok(rows, (uint64_t)I, &n_h) || n_cols > SIZE_MAX / 64 || n_qkv > SIZE_MAX / 64 ||
        n_h > SIZE_MAX / 64)
        return mmb__err(ctx, MMB_ERR_NOMEM, "cogvlm: %lld images of %dx%d: sizes overflow", (long long)B, width,
                        height);
    const size_t f = sizeof(float);
    const size_t need = mmb__arena_piece(f * n_cols) + 3 * mmb__arena_piece(f * n_x) + mmb__arena_piece(f * n_qkv) +
                        mmb__arena_piece(f * n_h) + mmb__arena_piece(f * asc_n);
    mmb_status s = mmb__arena_reserve(ctx, &ctx->arena, need);
    if (s != MMB_OK) return s;
    mmb_arena *a = &ctx->arena;
    float *cols = mmb__arena_alloc(a, f * n_cols), *x = mmb__arena_alloc(a, f * n_x);
    float *att = mmb__arena_alloc(a, f * n_x), *y = mmb__arena_alloc(a, f * n_x);
    float *qkv = mmb__arena_alloc(a, f * n_qkv), *h = mmb__arena_alloc(a, f * n_h);
    float *asc = mmb__arena_alloc(a, f * asc_n);
    /* patches (B G, D) into y, then x = [CLS, patches] + position_embedding */
    im2col(cols, pixels, B, in->image_size, in->patch);
    mmb__linear_forward(ctx, y, cols, B * G, &v->patch);
    for (int64_t b = 0; b < B; b++) {
        float *xb = x + b * T * D;
        for (int64_t d = 0; d < D; d++) xb[d] = v->cls[d] + v->pos[d];
        for (int64_t t = 0; t < G; t++) {
            const float *src = y + (b * G + t) * D, *pe = v->pos + (t + 1) * D;
            float *dst = xb + (t + 1) * D;
            for (int64_t d = 0; d < D; d++) dst[d] = src[d] + pe[d];
        }
    }
    const int64_t R = (int64_t)rows;
    for (int i = 0; i < in->layers; i++) {
        const cv_layer *l = &v->layers[i];
        mmb__linear_forward(ctx, qkv, x, R, &l->qkv);
        mmb__attention_forward(ctx, att, qkv, B, T, in->heads, hd, asc);
        mmb__linear_forward(ctx, y, att, R, &l->dense);
        mmb__layernorm_forward_mt(ctx, att, y, l->ln1_w, l->ln1_b, R, D, in->eps);
        mmb__add_forward_mt(ctx, x, x, att, R * D);
        mmb__linear_forward_act(ctx, h, x, R, &l->fc1, v->act);
        mmb__linear_forward(ctx, y, h, R, &l->fc2);
        mmb__layernorm_forward_mt(ctx, att, y, l->ln2_w, l->ln2_b, R, D, in->eps);
        mmb__add_forward_mt(ctx, x, x, att, R * D);
    }
    for (int64_t b = 0; b < B; b++) memcpy(out + b * G * D, x + (b * T + 1) * D, f * (size_t)(G * D));
    mmb__arena_reset(a);
    return MMB_OK;
}
