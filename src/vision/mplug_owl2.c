/* mPLUG-Owl2's vision tower (MplugOwlVisionModel, the original repository's visual_encoder.py), as
 * MPLUGOwl2MetaForCausalLM.encode_images runs it before the visual abstractor (models/mplug_owl2.c).
 *
 *   embeddings.patch_embed        Conv2d(3 -> D, kernel = stride = patch, no bias) as a GEMM on im2col rows
 *   embeddings.cls_token          prepended: token 0
 *   embeddings.position_embedding [1, g^2 + 1, D] added
 *   embeddings.pre_layernorm      (layer_norm_eps)
 *   encoder.layers.i              x += dense(attn(input_layernorm(x))); x += fc2(act(fc1(post_attention_layernorm(x))))
 *                                 query_key_value's 3D output rows are per head [q | k | v] (the module reshapes
 *                                 them to (heads, 3, head_dim)); regrouped at load as [q | k | v] head-major
 *   post_layernorm                on every token: last_hidden_state, what the abstractor reads
 *
 * Config: visual_config.visual_model (MplugOwlVisionConfig's defaults for absent keys: 1024 wide, 24 layers,
 * 16 heads, 4096, 448 px, patch 14, eps 1e-6, quick_gelu). Weights under model.vision_model.*. */
#include "vision/vision.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float *qkv_w, *qkv_b;                  /* the regrouped copies the qkv layer reads (or NULL once packed) */
    mmb_linear qkv, dense, fc1, fc2;
} ow_layer;

struct mmb_owlvit {
    mmb_owlvit_info info;
    mmb_act act;
    mmb_linear patch;    /* (D, 3 p p) */
    float *cls, *pos;    /* (D), (T, D) */
    float *pre_w, *pre_b, *post_w, *post_b;
    ow_layer *layers;
};

void mmb__owlvit_free(mmb_owlvit *v) {
    if (!v) return;
    for (int i = 0; v->layers && i < v->info.layers; i++) {
        ow_layer *l = &v->layers[i];
        mmb__linear_free(&l->qkv);
        mmb__linear_free(&l->dense);
        mmb__linear_free(&l->fc1);
        mmb__linear_free(&l->fc2);
        free(l->qkv_w); free(l->qkv_b);
        free(l->ln1_w); free(l->ln1_b); free(l->ln2_w); free(l->ln2_b);
    }
    free(v->layers);
    mmb__linear_free(&v->patch);
    free(v->cls); free(v->pos);
    free(v->pre_w); free(v->pre_b); free(v->post_w); free(v->post_b);
    free(v);
}

mmb_owlvit_info mmb__owlvit_info(const mmb_owlvit *v) { return v->info; }

static mmb_status read_config(mmb_ctx *ctx, const mmb_ckpt *c, const char *cp, mmb_owlvit *v) {
    mmb_owlvit_info *in = &v->info;
    struct { const char *key; int def, lo, hi, *dst; } ints[] = {
        {"hidden_size", 1024, 1, 1 << 16, &in->width},       {"num_hidden_layers", 24, 1, 4096, &in->layers},
        {"num_attention_heads", 16, 1, 4096, &in->heads},    {"intermediate_size", 4096, 1, 1 << 20, &in->inter},
        {"image_size", 448, 1, 1 << 14, &in->image_size},   {"patch_size", 14, 1, 1 << 14, &in->patch},
    };
    mmb_status s = MMB_OK;
    char key[160];
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && s == MMB_OK; i++) {
        int64_t x = ints[i].def;
        snprintf(key, sizeof key, "%s%s", cp, ints[i].key);
        mmb__cfg_int(ctx, c, key, &x, &s);
        if (s == MMB_OK && (x < ints[i].lo || x > ints[i].hi))
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld is out of range (%d..%d)", c->dir, key,
                         (long long)x, ints[i].lo, ints[i].hi);
        *ints[i].dst = (int)x;
    }
    double eps = 1e-6;
    const char *act = "quick_gelu";
    snprintf(key, sizeof key, "%slayer_norm_eps", cp);
    if (s == MMB_OK) mmb__cfg_num(ctx, c, key, &eps, &s);
    snprintf(key, sizeof key, "%shidden_act", cp);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, key, &act, &s);
    if (s != MMB_OK) return s;
    if (in->width % in->heads)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %shidden_size %d is not a multiple of "
                        "num_attention_heads %d", c->dir, cp, in->width, in->heads);
    if (in->image_size % in->patch)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %simage_size %d is not a multiple of patch_size %d",
                        c->dir, cp, in->image_size, in->patch);
    if (!(eps > 0 && eps < 1))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %slayer_norm_eps %g is out of range", c->dir, cp, eps);
    if (!mmb__act_parse(act, &v->act))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: %shidden_act '%s' is not supported", c->dir, cp,
                        act);
    const int64_t g = in->image_size / in->patch;
    in->tokens = g * g + 1;
    if (in->tokens > (1 << 20))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %s%lld patches an image is too many", c->dir, cp,
                        (long long)in->tokens);
    in->eps = (float)eps;
    return MMB_OK;
}

/* query_key_value's weight rows (and bias) regrouped from (heads, 3, hd) to (3, heads, hd). */
static void regroup(float *dst, const float *src, int64_t heads, int64_t hd, int64_t cols) {
    for (int64_t h = 0; h < heads; h++)
        for (int64_t j = 0; j < 3; j++)
            memcpy(dst + (j * heads + h) * hd * cols, src + (h * 3 + j) * hd * cols, sizeof(float) * (size_t)(hd * cols));
}

static mmb_status load_layer(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_owlvit *v, const char *lp, ow_layer *l) {
    const int64_t D = v->info.width, I = v->info.inter, H = v->info.heads, hd = D / H;
    char name[256];
    float *w = NULL, *b = NULL;
    mmb_status s = mmb__ckpt_norm(ctx, c, lp, "input_layernorm", D, &l->ln1_w, &l->ln1_b);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, "post_attention_layernorm", D, &l->ln2_w, &l->ln2_b);
    const int64_t ws[2] = {3 * D, D}, bs[1] = {3 * D};
    snprintf(name, sizeof name, "%sself_attn.query_key_value.weight", lp);
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, name, 2, ws, &w);
    snprintf(name, sizeof name, "%sself_attn.query_key_value.bias", lp);
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, name, 1, bs, &b);
    if (s == MMB_OK && (!(l->qkv_w = malloc(sizeof(float) * (size_t)(3 * D * D))) ||
                        !(l->qkv_b = malloc(sizeof(float) * (size_t)(3 * D)))))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    if (s == MMB_OK) {
        regroup(l->qkv_w, w, H, hd, D);
        regroup(l->qkv_b, b, H, hd, 1);
        const mmb_tensor tw = {.name = "query_key_value.weight", .dtype = MMB_F32, .ndim = 2, .shape = {3 * D, D},
                               .data = l->qkv_w};
        const mmb_tensor tb = {.name = "query_key_value.bias", .dtype = MMB_F32, .ndim = 1, .shape = {3 * D},
                               .data = l->qkv_b};
        s = mmb__linear_init(ctx, &l->qkv, &tw, &tb);
    }
    free(w);
    free(b);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "self_attn.dense", D, D, true, &l->dense);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc1", I, D, true, &l->fc1);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc2", D, I, true, &l->fc2);
    return s;
}

mmb_status mmb__owlvit_load(mmb_ctx *ctx, const mmb_ckpt *c, const char *cfg_prefix, const char *prefix,
                            mmb_owlvit **out) {
    mmb_owlvit *v = calloc(1, sizeof *v);
    if (!v) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    mmb_status s = read_config(ctx, c, cfg_prefix, v);
    mmb_owlvit_info *in = &v->info;
    const int64_t D = in->width, p = in->patch, T = in->tokens;
    char name[256];
    const mmb_tensor *pw = NULL;
    const int64_t pshape[4] = {D, 3, p, p}, one[3] = {1, 1, D}, ps[3] = {1, T, D};
    snprintf(name, sizeof name, "%sembeddings.patch_embed.weight", prefix);
    if (s == MMB_OK) s = mmb__ckpt_bind(ctx, c, name, 4, pshape, &pw);
    if (s == MMB_OK) {
        mmb_tensor w2 = *pw;  /* the conv kernel as a (D, 3 p p) matrix in im2col order */
        w2.ndim = 2;
        w2.shape[1] = 3 * p * p;
        s = mmb__linear_bind(ctx, &v->patch, &w2, NULL);
    }
    snprintf(name, sizeof name, "%sembeddings.cls_token", prefix);
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, name, 3, one, &v->cls);
    snprintf(name, sizeof name, "%sembeddings.position_embedding", prefix);
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, name, 3, ps, &v->pos);
    snprintf(name, sizeof name, "%sembeddings.", prefix);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, name, "pre_layernorm", D, &v->pre_w, &v->pre_b);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, prefix, "post_layernorm", D, &v->post_w, &v->post_b);
    if (s == MMB_OK && !(v->layers = calloc((size_t)in->layers, sizeof *v->layers)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    for (int i = 0; i < in->layers && s == MMB_OK; i++) {
        char lp[224];
        snprintf(lp, sizeof lp, "%sencoder.layers.%d.", prefix, i);
        s = load_layer(ctx, c, v, lp, &v->layers[i]);
    }
    if (s != MMB_OK) {
        mmb__owlvit_free(v);
        return s;
    }
    const int64_t g = in->image_size / p;
    in->params = 0;
    in->flops_per_image = 0;
    mmb__linear_cost(&v->patch, g * g, &in->params, &in->flops_per_image);
    in->params += D + T * D + 4 * D;
    for (int i = 0; i < in->layers; i++) {
        const ow_layer *l = &v->layers[i];
        mmb__linear_cost(&l->qkv, T, &in->params, &in->flops_per_image);
        mmb__linear_cost(&l->dense, T, &in->params, &in->flops_per_image);
        mmb__linear_cost(&l->fc1, T, &in->params, &in->flops_per_image);
        mmb__linear_cost(&l->fc2, T, &in->params, &in->flops_per_image);
        in->params += 4 * D;
        in->flops_per_image += 4 * T * T * D;
    }
    *out = v;
    return MMB_OK;
}

/* pixels (B, 3, t, t) -> rows (B g g, 3 p p): each patch's pixels in (c, ky, kx) order. */
static void im2col(float *rows, const float *px, int64_t B, int t, int p) {
    const int g = t / p;
    const int64_t P = 3 * (int64_t)p * p;
    for (int64_t k = 0; k < B; k++)
        for (int gy = 0; gy < g; gy++)
            for (int gx = 0; gx < g; gx++) {
                float *r = rows + ((k * g + gy) * g + gx) * P;
                for (int c = 0; c < 3; c++)
                    for (int ky = 0; ky < p; ky++)
                        memcpy(r + (c * p + ky) * p, px + ((k * 3 + c) * t + gy * p + ky) * (int64_t)t + gx * p,
                               sizeof(float) * (size_t)p);
            }
}

mmb_status mmb__owlvit_forward(mmb_ctx *ctx, const mmb_owlvit *v, const float *pixels, int64_t B, int height,
                               int width, float *out) {
    const mmb_owlvit_info *in = &v->info;
    if (height != in->image_size || width != in->image_size)
        return mmb__err(ctx, MMB_ERR_SHAPE, "pixels of %dx%d: the mPLUG-Owl2 vision model takes %dx%d "
                        "(visual_config.visual_model.image_size)", width, height, in->image_size, in->image_size);
    const int64_t D = in->width, I = in->inter, T = in->tokens, H = in->heads, hd = D / H;
    const int64_t g = in->image_size / in->patch, PP = 3 * (int64_t)in->patch * in->patch, np = B * g * g;
    uint64_t rows, big;
    const int64_t wide = I > 3 * D ? (I > PP ? I : PP) : (3 * D > PP ? 3 * D : PP);
    if (!mmb__mul_ok((uint64_t)B, (uint64_t)T, &rows) || !mmb__mul_ok(rows, (uint64_t)wide, &big) ||
        big > SIZE_MAX / 64)
        return mmb__err(ctx, MMB_ERR_NOMEM, "mplug_owl2: %lld images: sizes overflow", (long long)B);
    const size_t f = sizeof(float), sz_x = f * (size_t)rows * (size_t)D;
    const size_t sz_cols = f * (size_t)np * (size_t)PP, sz_pe = f * (size_t)np * (size_t)D;
    const size_t asc_n = mmb__attention_scratch(mmb__pool_size(ctx->pool), hd);
    const size_t need = mmb__arena_piece(sz_cols) + mmb__arena_piece(sz_pe) + 2 * mmb__arena_piece(sz_x) +
                        mmb__arena_piece(f * (size_t)rows * (size_t)(3 * D)) +
                        mmb__arena_piece(f * (size_t)rows * (size_t)I) + mmb__arena_piece(f * asc_n);
    mmb_status s = mmb__arena_reserve(ctx, &ctx->arena, need);
    if (s != MMB_OK) return s;
    mmb_arena *a = &ctx->arena;
    float *cols = mmb__arena_alloc(a, sz_cols), *pe = mmb__arena_alloc(a, sz_pe);
    float *xn = mmb__arena_alloc(a, sz_x), *att = mmb__arena_alloc(a, sz_x);
    float *qkv = mmb__arena_alloc(a, f * (size_t)rows * (size_t)(3 * D));
    float *h = mmb__arena_alloc(a, f * (size_t)rows * (size_t)I), *asc = mmb__arena_alloc(a, f * asc_n);
    float *x = out;  /* the residual stream lives in out: (B T, D) */

    im2col(cols, pixels, B, in->image_size, in->patch);
    mmb__linear_forward(ctx, pe, cols, np, &v->patch);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < T; i++) {
            float *r = x + (b * T + i) * D;
            const float *e = i ? pe + (b * g * g + i - 1) * D : v->cls, *pp = v->pos + i * D;
            for (int64_t d = 0; d < D; d++) r[d] = e[d] + pp[d];
        }
    mmb__layernorm_forward_mt(ctx, xn, x, v->pre_w, v->pre_b, (int64_t)rows, D, in->eps);
    memcpy(x, xn, sz_x);
    for (int li = 0; li < in->layers; li++) {
        const ow_layer *l = &v->layers[li];
        mmb__layernorm_forward_mt(ctx, xn, x, l->ln1_w, l->ln1_b, (int64_t)rows, D, in->eps);
        mmb__linear_forward(ctx, qkv, xn, (int64_t)rows, &l->qkv);
        mmb__attention_forward(ctx, att, qkv, B, T, H, hd, asc);
        mmb__linear_forward(ctx, xn, att, (int64_t)rows, &l->dense);
        mmb__add_forward_mt(ctx, x, x, xn, (int64_t)rows * D);
        mmb__layernorm_forward_mt(ctx, xn, x, l->ln2_w, l->ln2_b, (int64_t)rows, D, in->eps);
        mmb__linear_forward_act(ctx, h, xn, (int64_t)rows, &l->fc1, v->act);
        mmb__linear_forward(ctx, xn, h, (int64_t)rows, &l->fc2);
        mmb__add_forward_mt(ctx, x, x, xn, (int64_t)rows * D);
    }
    mmb__layernorm_forward_mt(ctx, xn, x, v->post_w, v->post_b, (int64_t)rows, D, in->eps);
    memcpy(x, xn, sz_x);
    mmb__arena_reset(a);
    return MMB_OK;
}
