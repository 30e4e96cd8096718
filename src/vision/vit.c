/* CLIP, SigLIP and BLIP-2 (EVA) vision transformers, as transformers' CLIPVisionModel /
 * SiglipVisionModel / Blip2VisionModel run them, with hidden-state taps.
 *
 *   embeddings: Conv2d(C -> D, kernel = stride = patch; bias for SigLIP and BLIP-2) as a GEMM over
 *               im2col rows; CLIP and BLIP-2 prepend class_embedding; + position_embedding
 *   CLIP only:  pre_layrnorm                                   -> hidden_states[0]
 *   block i:    x += out_proj(attn(LN1(x)));  x += fc2(act(fc1(LN2(x))))   -> hidden_states[i]
 *               (BLIP-2: one qkv Linear, its bias q_bias | 0 | v_bias; out_proj is `projection`)
 *   SigLIP, BLIP-2: last_hidden_state = post_layernorm(hidden_states[L]); CLIP: = hidden_states[L]
 *
 * Idefics2 / Idefics3 / SmolVLM towers (Idefics2VisionTransformer, ...) are SigLIP with
 * position ids from bucketised fractional patch coordinates (bucket_ids); mmbridge runs them on full,
 * unpadded images of image_size only (patch attention mask all ones), where those ids are fixed and
 * the position table is permuted once at load.
 *
 * Attention maps (mmb_vit_attention): the same forward with a map pointer; each block, right after its qkv
 * GEMM, computes the softmax rows it needs from that buffer (the CLS row, or every row summed) and averages
 * them over heads (amap_layer). The plain forward passes NULL.
 */
#include "vision/vision.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  /* (D) */
    float *qkv_w, *qkv_b;                  /* (3D, D), (3D): q, k, v fused at load */
    mmb_linear qkv, out, fc1, fc2;         /* (3D, D), (D, D), (I, D), (D, I) */
} vit_layer;

struct mmb_vit {
    mmb_ckpt ck;             /* only when opened standalone */
    bool owns_ck;
    mmb_vit_info info;
    char prefix[96];
    mmb_act act;
    mmb_linear patch;        /* (D, C * p * p) */
    float *cls;              /* (D), CLIP only */
    float *pos;              /* (tokens, D) */
    float *pre_w, *pre_b;    /* (D), CLIP only */
    float *post_w, *post_b;  /* (D) */
    vit_layer *layers;
    bool blip2;              /* Blip2VisionModel: patch bias, no pre_layrnorm, fused qkv, post_layernorm on all */
    bool qkv_bias;           /* BLIP-2's vision_config.qkv_bias */
};

/* The defaults of each config class, for keys save_pretrained left out. */
static const struct {
    const char *model_type, *family, *act;
    int width, inter, layers, heads, image, patch;
    float eps;
    bool cls;
    bool bucket;  /* Idefics2/3: position ids by bucketize (bucket_ids) */
    const char *width_key;  /* NULL: "hidden_size" */
} families[] = {
    {"clip_vision_model", "clip", "quick_gelu", 768, 3072, 12, 12, 224, 32, 1e-5f, true, false, NULL},
    {"siglip_vision_model", "siglip", "gelu_pytorch_tanh", 768, 3072, 12, 12, 224, 16, 1e-6f, false, false, NULL},
    {"blip_2_vision_model", "blip2", "gelu", 1408, 6144, 39, 16, 224, 14, 1e-6f, true, false, NULL},
    {"idefics2_vision", "idefics2", "gelu_pytorch_tanh", 768, 3072, 12, 12, 224, 32, 1e-6f, false, true, NULL},
    {"idefics3_vision", "idefics3", "gelu_pytorch_tanh", 1152, 3072, 12, 16, 224, 32, 1e-6f, false, true, NULL},
    {"smolvlm_vision", "smolvlm", "gelu_pytorch_tanh", 1152, 3072, 12, 16, 224, 32, 1e-6f, false, true, NULL},
    /* IDEFICS (v1): CLIP's network under another config class (vision.py) */
    {"idefics_vision", "idefics", "gelu", 768, 5120, 32, 16, 224, 14, 1e-5f, true, false, "embed_dim"},
};

/* A vision_config without model_type takes its parent model's vision class (else CLIP's). */
static const struct { const char *parent, *vision; } parents[] = {{"idefics", "idefics_vision"}};

mmb_status mmb__vision_cfg(mmb_ctx *ctx, const mmb_ckpt *c, const char *cfg_prefix, mmb_vit_info *out) {
    char key[128];
    const char *mt = NULL;
    mmb_status s = MMB_OK;
    snprintf(key, sizeof key, "%smodel_type", cfg_prefix);
    if (!mmb__cfg_str(ctx, c, key, &mt, &s)) {
        if (s != MMB_OK) return s;
        const char *top = "";
        if (cfg_prefix[0]) mmb__cfg_str(ctx, c, "model_type", &top, &s);
        mt = "clip_vision_model";
        for (size_t i = 0; i < sizeof parents / sizeof parents[0]; i++)
            if (strcmp(top, parents[i].parent) == 0) mt = parents[i].vision;
    }
    int f = -1;
    for (int i = 0; i < (int)(sizeof families / sizeof families[0]); i++)
        if (strcmp(mt, families[i].model_type) == 0) f = i;
    if (f < 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision model_type '%s' (expected "
                        "clip_vision_model, siglip_vision_model, blip_2_vision_model, idefics_vision, idefics2_vision, "
                        "idefics3_vision or smolvlm_vision)", c->dir, mt);
    mmb_vit_info in = {.family = families[f].family, .act = families[f].act, .eps = families[f].eps,
                       .has_cls = families[f].cls};
    struct { const char *k; int def; int *dst; } ints[] = {
        {families[f].width_key ? families[f].width_key : "hidden_size", families[f].width, &in.width},
        {"intermediate_size", families[f].inter, &in.intermediate},
        {"num_hidden_layers", families[f].layers, &in.layers}, {"num_attention_heads", families[f].heads, &in.heads},
        {"image_size", families[f].image, &in.image_size}, {"patch_size", families[f].patch, &in.patch_size},
        {"num_channels", 3, &in.channels},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && s == MMB_OK; i++) {
        int64_t v;
        snprintf(key, sizeof key, "%s%s", cfg_prefix, ints[i].k);
        if (!mmb__cfg_int(ctx, c, key, &v, &s)) v = ints[i].def;
        if (s == MMB_OK && (v < (i == 2 ? 0 : 1) || v > (1 << 20)))
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld is out of range", c->dir, key, (long long)v);
        *ints[i].dst = (int)v;
    }
    double eps = in.eps;
    snprintf(key, sizeof key, "%slayer_norm_eps", cfg_prefix);
    if (s == MMB_OK) mmb__cfg_num(ctx, c, key, &eps, &s);
    snprintf(key, sizeof key, "%shidden_act", cfg_prefix);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, key, &in.act, &s);
    if (s != MMB_OK) return s;
    in.eps = (float)eps;
    if (in.patch_size > in.image_size || in.width % in.heads != 0 || in.layers > 4096)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: inconsistent vision sizes (image %d, patch %d, width %d, "
                        "heads %d)", c->dir, in.image_size, in.patch_size, in.width, in.heads);
    int64_t g = in.image_size / in.patch_size, T = g * g + in.has_cls, D = in.width, I = in.intermediate;
    int64_t P = (int64_t)in.channels * in.patch_size * in.patch_size;
    in.tokens = T;
    /* The estimates in double first: sizes a config may give (each up to 2^20) can overflow int64. */
    double Td = (double)T, Dd = (double)D, flops = 2.0 * (double)g * (double)g * Dd * (double)P +
        in.layers * (2.0 * Td * (4.0 * Dd * Dd + 2.0 * Dd * I) + 4.0 * Td * Td * Dd);
    double params = Dd * (double)P + Td * Dd + 4.0 * Dd + in.layers * (4.0 * Dd * Dd + 10.0 * Dd + 2.0 * Dd * I + I);
    if (!(flops < 0x1p62) || !(params < 0x1p62))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision sizes beyond any model (image %d, patch %d, "
                        "width %d, %d layers, intermediate %d give %.3g FLOPs per image)", c->dir, in.image_size,
                        in.patch_size, in.width, in.layers, in.intermediate, flops);
    in.flops_per_image = 2 * g * g * D * P + in.layers * (2 * T * (4 * D * D + 2 * D * I) + 4 * T * T * D);
    bool blip2 = strcmp(in.family, "blip2") == 0;  /* patch bias and CLS, no pre_layrnorm; no CLS: patch bias */
    in.params = D * P + (!in.has_cls || blip2 ? D : 0) + T * D + (in.has_cls ? (blip2 ? 1 : 3) * D : 0) + 2 * D +
                in.layers * (4 * D * D + 4 * D + 2 * D * I + I + D + 4 * D);
    *out = in;
    return MMB_OK;
}

static void free_layer(vit_layer *l) {
    free(l->ln1_w); free(l->ln1_b); free(l->ln2_w); free(l->ln2_b);
    free(l->qkv_w); free(l->qkv_b);
    mmb__linear_free(&l->qkv);
    mmb__linear_free(&l->out);
    mmb__linear_free(&l->fc1);
    mmb__linear_free(&l->fc2);
}

void mmb_vit_free(mmb_vit *v) {
    if (!v) return;
    for (int i = 0; v->layers && i < v->info.layers; i++) free_layer(&v->layers[i]);
    free(v->layers);
    mmb__linear_free(&v->patch);
    free(v->cls); free(v->pos); free(v->pre_w); free(v->pre_b); free(v->post_w); free(v->post_b);
    if (v->owns_ck) mmb__ckpt_close(&v->ck);
    free(v);
}

/* transformers' Idefics2VisionEmbeddings position ids along a side of nb patches, for a tower of n
 * patches per side, in its float32 arithmetic on the CPU:
 *   boundaries = torch.arange(1/n, 1.0, 1/n)   (float32; ceil((1 - 1/n) / (1/n)) values)
 *   frac[i] = clamp(i * (1.0f / nb), max = 1 - 1e-6)   (float32)
 *   ids[i] = bucketize(frac[i], boundaries, right=True) = #{boundaries <= frac[i]}
 * torch's CPU arange computes start + step * j in double and rounds to float, except that whole
 * blocks of 16 go through Vectorized<float>::arange (8 lanes on AVX2 and NEON), whose lane l is
 * float(double(float(start + step * j0)) + l * step) for the lane-0 index j0. That rounding moves some
 * boundaries by one ulp, so for some n (19, 25, 29, ...) the ids of a full image (nb = n) are not
 * 0..n-1 (for 16, 24, 26, 27, 32, 70: they are). AVX-512 builds of torch (16 lanes) and CUDA differ
 * for a few n again: docs/decisions.md. */
static void bucket_ids(int nb, int n, int *ids) {
    double start = 1.0 / n, step = 1.0 / n;
    int64_t nbnd = (int64_t)ceil((1.0 - start) / step), nvec = nbnd / 16 * 16;
    float fstep = 1.0f / (float)nb, fmax = (float)(1.0 - 1e-6);
    for (int i = 0; i < nb; i++) {
        float frac = (float)i * fstep;
        frac = frac > fmax ? fmax : frac;
        int id = 0;
        for (int64_t j = 0; j < nbnd; j++) {
            volatile double t;  /* no fused multiply-add: torch rounds the product */
            float b;
            if (j < nvec) {
                t = step * (double)(j / 8 * 8);
                float base = (float)(start + t);
                t = (double)(j % 8) * step;
                b = (float)((double)base + t);
            } else {
                t = step * (double)j;
                b = (float)(start + t);
            }
            id += b <= frac;
        }
        ids[i] = id;
    }
}

/* q, k, v projections fused into one (3D, D) layer so a block runs one GEMM for them. */
static mmb_status bind_qkv(mmb_ctx *ctx, const mmb_ckpt *c, const char *lp, int64_t D, vit_layer *l) {
    static const char *const names[3] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"};
    return mmb__ckpt_linear_fused(ctx, c, lp, names, 3, D, D, &l->qkv, &l->qkv_w, &l->qkv_b);
}

/* BLIP-2's qkv: one Linear (3D, D) without a bias of its own; the bias is qkv.bias (3D), as
 * transformers 5 saves it, or q_bias and v_bias (D each; older transformers and the hub files),
 * which the model fuses as q_bias | 0 | v_bias (k has none). No bias when vision_config.qkv_bias is false. */
static mmb_status bind_qkv_blip2(mmb_ctx *ctx, const mmb_ckpt *c, const char *lp, int64_t D, bool bias, vit_layer *l) {
    char wn[256], bn[256], qn[256], vn[256];
    snprintf(wn, sizeof wn, "%sself_attn.qkv.weight", lp);
    snprintf(bn, sizeof bn, "%sself_attn.qkv.bias", lp);
    snprintf(qn, sizeof qn, "%sself_attn.q_bias", lp);
    snprintf(vn, sizeof vn, "%sself_attn.v_bias", lp);
    const mmb_tensor *w, *b = NULL;
    int64_t ws[2] = {3 * D, D}, n3 = 3 * D;
    mmb_status s = mmb__ckpt_bind(ctx, c, wn, 2, ws, &w);
    if (s != MMB_OK || !bias) return s == MMB_OK ? mmb__linear_bind(ctx, &l->qkv, w, NULL) : s;
    if (mmb__ckpt_find(c, bn, NULL) || !mmb__ckpt_find(c, qn, NULL)) {
        if (!mmb__ckpt_find(c, bn, NULL))
            return mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' (or '%s' and '%s') is missing", c->dir, bn, qn, vn);
        s = mmb__ckpt_bind(ctx, c, bn, 1, &n3, &b);
        return s == MMB_OK ? mmb__linear_bind(ctx, &l->qkv, w, b) : s;
    }
    float *q = NULL, *vb = NULL;
    s = mmb__ckpt_vec(ctx, c, qn, D, &q);
    if (s == MMB_OK) s = mmb__ckpt_vec(ctx, c, vn, D, &vb);
    if (s == MMB_OK && !(l->qkv_b = calloc((size_t)(3 * D), sizeof(float))))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    if (s == MMB_OK) {
        memcpy(l->qkv_b, q, sizeof(float) * (size_t)D);
        memcpy(l->qkv_b + 2 * D, vb, sizeof(float) * (size_t)D);
        mmb_tensor bt = {.name = "qkv.bias", .dtype = MMB_F32, .ndim = 1, .shape = {3 * D}, .data = l->qkv_b};
        s = mmb__linear_bind(ctx, &l->qkv, w, &bt);
    }
    free(q);
    free(vb);
    return s;
}

/* Binds `name` of exactly shape[ndim] (n elements) and returns an f32 copy in *out. */
static mmb_status bind_copy(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int ndim, const int64_t *shape,
                            int64_t n, float **out) {
    const mmb_tensor *t;
    mmb_status s = mmb__ckpt_bind(ctx, c, name, ndim, shape, &t);
    if (s == MMB_OK && !(*out = malloc(sizeof(float) * (size_t)n))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK) mmb_to_f32(*out, t->data, t->dtype, (size_t)n);
    if (s == MMB_OK) mmb__release_mapped(t->data, (size_t)n * mmb_dtype_size(t->dtype));  /* read once */
    return s;
}

static mmb_status load_weights(mmb_ctx *ctx, mmb_vit *v, const mmb_ckpt *c) {
    const mmb_vit_info *in = &v->info;
    const char *p = v->prefix;
    int64_t D = in->width, I = in->intermediate, T = in->tokens, P = (int64_t)in->channels * in->patch_size * in->patch_size;
    char name[256];
    const mmb_tensor *pw, *pb = NULL;
    int64_t pshape[4] = {D, in->channels, in->patch_size, in->patch_size};
    snprintf(name, sizeof name, "%sembeddings.patch_embedding.weight", p);
    mmb_status s = mmb__ckpt_bind(ctx, c, name, 4, pshape, &pw);
    if (s == MMB_OK && (!in->has_cls || v->blip2)) {
        snprintf(name, sizeof name, "%sembeddings.patch_embedding.bias", p);
        s = mmb__ckpt_bind(ctx, c, name, 1, &D, &pb);
    }
    if (s == MMB_OK) {
        mmb_tensor w2 = *pw;  /* the conv kernel is a (D, C*p*p) matrix in im2col order */
        w2.ndim = 2;
        w2.shape[1] = P;
        s = mmb__linear_bind(ctx, &v->patch, &w2, pb);
    }
    if (s == MMB_OK && v->blip2) {  /* Parameters (1, T, D) and (1, 1, D), not an nn.Embedding */
        int64_t ps[3] = {1, T, D}, cs[3] = {1, 1, D};
        snprintf(name, sizeof name, "%sembeddings.position_embedding", p);
        s = bind_copy(ctx, c, name, 3, ps, T * D, &v->pos);
        snprintf(name, sizeof name, "%sembeddings.class_embedding", p);
        if (s == MMB_OK) s = bind_copy(ctx, c, name, 3, cs, D, &v->cls);
    } else if (s == MMB_OK) {
        int64_t ps[2] = {T, D};
        snprintf(name, sizeof name, "%sembeddings.position_embedding.weight", p);
        s = bind_copy(ctx, c, name, 2, ps, T * D, &v->pos);
        bool bucket = false;
        for (size_t i = 0; i < sizeof families / sizeof families[0]; i++)
            bucket |= families[i].bucket && strcmp(in->family, families[i].family) == 0;
        int g = in->image_size / in->patch_size, *ids = bucket ? malloc(sizeof(int) * (size_t)g) : NULL;
        float *perm = bucket ? malloc(sizeof(float) * (size_t)(T * D)) : NULL;
        if (bucket && (!ids || !perm)) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        if (bucket && s == MMB_OK) {  /* token (r, c) of a full image adds row ids[r] * g + ids[c] */
            bucket_ids(g, g, ids);
            for (int r = 0; r < g; r++)
                for (int cc = 0; cc < g; cc++)
                    memcpy(perm + ((int64_t)r * g + cc) * D, v->pos + ((int64_t)ids[r] * g + ids[cc]) * D,
                           sizeof(float) * (size_t)D);
            memcpy(v->pos, perm, sizeof(float) * (size_t)(T * D));
        }
        free(ids);
        free(perm);
    }
    if (s == MMB_OK && in->has_cls && !v->blip2) {
        snprintf(name, sizeof name, "%sembeddings.class_embedding", p);
        s = mmb__ckpt_vec(ctx, c, name, D, &v->cls);
        if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "pre_layrnorm", D, &v->pre_w, &v->pre_b);
    }
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "post_layernorm", D, &v->post_w, &v->post_b);
    if (s == MMB_OK && !(v->layers = calloc((size_t)in->layers + 1, sizeof *v->layers)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int i = 0; i < in->layers && s == MMB_OK; i++) {
        vit_layer *l = &v->layers[i];
        char lp[160];
        snprintf(lp, sizeof lp, "%sencoder.layers.%d.", p, i);
        s = mmb__ckpt_norm(ctx, c, lp, "layer_norm1", D, &l->ln1_w, &l->ln1_b);
        if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, "layer_norm2", D, &l->ln2_w, &l->ln2_b);
        if (s == MMB_OK) s = v->blip2 ? bind_qkv_blip2(ctx, c, lp, D, v->qkv_bias, l) : bind_qkv(ctx, c, lp, D, l);
        if (s == MMB_OK)
            s = mmb__ckpt_linear(ctx, c, lp, v->blip2 ? "self_attn.projection" : "self_attn.out_proj", D, D, true, &l->out);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc1", I, D, true, &l->fc1);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc2", D, I, true, &l->fc2);
    }
    return s;
}

/* The prefix under which the checkpoint keeps its vision weights, or NULL. */
static const char *find_prefix(const mmb_ckpt *c) {
    /* LLaVA's tower: transformers 4.5x in-memory names, transformers 5 in-memory names, the older hub
     * files, transformers 5 save_pretrained; then a full CLIPModel/SiglipModel (or a 4.x standalone
     * save); then a standalone vision model as transformers 5 saves it, without a prefix. */
    static const char *const prefixes[] = {"model.vision_tower.vision_model.", "model.vision_tower.",
                                           "vision_tower.vision_model.", "vision_tower.", "model.vision_model.",
                                           "vision_model.", ""};
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
        char name[160];
        snprintf(name, sizeof name, "%sembeddings.patch_embedding.weight", prefixes[i]);
        if (mmb__ckpt_find(c, name, NULL)) return prefixes[i];
    }
    return NULL;
}

bool mmb__vit_present(const mmb_ckpt *c) { return find_prefix(c) != NULL; }

mmb_status mmb__vit_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_vit **out) {
    const char *prefix = find_prefix(c);
    if (!prefix)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: no vision encoder: tensor 'embeddings.patch_embedding.weight' is "
                        "missing (looked under model.vision_tower., vision_tower., model.vision_model., vision_model. and no prefix)", c->dir);
    mmb_vit *v = calloc(1, sizeof *v);
    if (!v) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    snprintf(v->prefix, sizeof v->prefix, "%s", prefix);
    const char *cfgp = cJSON_GetObjectItemCaseSensitive(c->config, "vision_config") ? "vision_config." : "";
    mmb_status s = mmb__vision_cfg(ctx, c, cfgp, &v->info);
    if (s == MMB_OK && !mmb__act_parse(v->info.act, &v->act))
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision hidden_act '%s' is not supported", c->dir,
                     v->info.act);
    if (s == MMB_OK && (v->blip2 = strcmp(v->info.family, "blip2") == 0)) {
        char key[64];
        v->qkv_bias = true;
        snprintf(key, sizeof key, "%sqkv_bias", cfgp);
        mmb__cfg_bool(ctx, c, key, &v->qkv_bias, &s);
    }
    if (s == MMB_OK) {
        v->info.act = mmb__act_name(v->act);
        v->info.prefix = v->prefix;
        s = load_weights(ctx, v, c);
    }
    if (s != MMB_OK) { mmb_vit_free(v); return s; }
    *out = v;
    return MMB_OK;
}

mmb_status mmb_vit_open(mmb_ctx *ctx, const char *dir, mmb_vit **out) {
    if (!ctx || !dir || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_vit_open: NULL argument");
    mmb_ckpt c;
    mmb_status s = mmb__ckpt_open(ctx, dir, &c);
    if (s != MMB_OK) return s;
    mmb_vit *v = NULL;
    s = mmb__vit_load(ctx, &c, &v);
    if (s != MMB_OK) { mmb__ckpt_close(&c); return s; }
    v->ck = c;
    v->owns_ck = true;
    *out = v;
    return MMB_OK;
}

mmb_status mmb_vit_get_info(const mmb_vit *v, mmb_vit_info *out) {
    if (!v || !out) return MMB_ERR_ARG;
    *out = v->info;
    return MMB_OK;
}

/* pixels (B, C, H, W) -> rows (B * g * g, C * p * p): each patch's pixels in (c, ky, kx) order. */
static void im2col(float *rows, const float *px, int64_t B, int C, int H, int p) {
    int g = H / p;
    int64_t P = (int64_t)C * p * p;
    for (int64_t b = 0; b < B; b++)
        for (int gy = 0; gy < g; gy++)
            for (int gx = 0; gx < g; gx++) {
                float *r = rows + ((b * g + gy) * g + gx) * P;
                for (int c = 0; c < C; c++)
                    for (int ky = 0; ky < p; ky++)
                        memcpy(r + (c * p + ky) * p, px + ((b * C + c) * H + gy * p + ky) * (int64_t)H + gx * p,
                               sizeof(float) * (size_t)p);
            }
}

/* The attention maps' pass (mmb_vit_attention): where block l's maps go, and its scratch. The forward
 * computes them from the block's own q, k (its qkv buffer, after layer_norm1 and the projections' biases),
 * so the pass runs the tower once; the plain forward passes NULL and does none of this. */
typedef struct {
    float *out;       /* (B, L, patches): block l's map of image b at out + (b L + l) patches */
    float *part;      /* (units, T): each unit's sum of probability rows */
    float *rows;      /* (nth, T): one score row per thread */
    int64_t qb, nqb;  /* queries per unit, units per (image, head) */
} amap;

typedef struct {
    const float *qkv;
    const amap *am;
    int64_t B, T, H, hd, D;
    int cls;
    float scale;
} amap_job;

/* Units (b, h, block of queries): each softmax row of its queries summed into part[u]. */
static void amap_rows(void *arg, int tid, int nth) {
    const amap_job *j = arg;
    const amap *am = j->am;
    int64_t T = j->T, D = j->D, hd = j->hd, units = j->B * j->H * am->nqb, lo, hi;
    float *s = am->rows + (int64_t)tid * T;
    mmb__split(units, tid, nth, &lo, &hi);
    for (int64_t u = lo; u < hi; u++) {
        int64_t b = u / (j->H * am->nqb), h = u / am->nqb % j->H, q0 = u % am->nqb * am->qb;
        int64_t q1 = j->cls ? 1 : (q0 + am->qb < T ? q0 + am->qb : T);
        float *acc = am->part + u * T;
        memset(acc, 0, sizeof(float) * (size_t)T);
        const float *base = j->qkv + b * T * 3 * D + h * hd;
        for (int64_t i = q0; i < q1; i++) {
            const float *q = base + i * 3 * D;
            float mx = -INFINITY;
            for (int64_t k = 0; k < T; k++) {
                const float *kk = base + k * 3 * D + D;
                float d = 0.0f;
                for (int64_t c = 0; c < hd; c++) d += q[c] * kk[c];
                s[k] = d * j->scale;
                mx = s[k] > mx ? s[k] : mx;
            }
            double sum = 0.0;
            for (int64_t k = 0; k < T; k++) sum += (s[k] = expf(s[k] - mx));
            float inv = (float)(1.0 / sum);
            for (int64_t k = 0; k < T; k++) acc[k] += s[k] * inv;
        }
    }
}

/* Block `layer`'s maps from its qkv (B*T, 3D): the units' rows, then their mean over heads (and queries). */
static void amap_layer(mmb_ctx *ctx, const mmb_vit *v, const amap *am, const float *qkv, int64_t B, int layer) {
    const mmb_vit_info *in = &v->info;
    int64_t T = in->tokens, H = in->heads, P = T - in->has_cls, L = in->layers;
    amap_job j = {.qkv = qkv, .am = am, .B = B, .T = T, .H = H, .hd = in->width / H, .D = in->width,
                  .cls = in->has_cls, .scale = 1.0f / sqrtf((float)(in->width / H))};
    mmb__pool_run(ctx->pool, amap_rows, &j);
    double per = 1.0 / ((double)H * (in->has_cls ? 1.0 : (double)T));
    for (int64_t b = 0; b < B; b++) {
        float *o = am->out + (b * L + layer) * P;
        for (int64_t p = 0; p < P; p++) {
            double sum = 0.0;
            for (int64_t u = b * H * am->nqb; u < (b + 1) * H * am->nqb; u++) sum += am->part[u * T + in->has_cls + p];
            o[p] = (float)(sum * per);
        }
    }
}

/* One encoder block on x (B*T, D), in place. Buffers: xn, att (B*T, D), qkv (B*T, 3D), h (B*T, I).
 * am (NULL in a plain forward): also the block's attention maps. */
static void block_forward(mmb_ctx *ctx, const mmb_vit *v, const vit_layer *l, float *x, float *xn, float *qkv,
                          float *att, float *h, float *asc, int64_t B, const amap *am, int layer) {
    const mmb_vit_info *in = &v->info;
    int64_t T = in->tokens, D = in->width, rows = B * T;
    mmb__layernorm_forward_mt(ctx, xn, x, l->ln1_w, l->ln1_b, rows, D, in->eps);
    mmb__linear_forward(ctx, qkv, xn, rows, &l->qkv);
    if (am) amap_layer(ctx, v, am, qkv, B, layer);
    mmb__attention_forward(ctx, att, qkv, B, T, in->heads, D / in->heads, asc);
    mmb__linear_forward(ctx, xn, att, rows, &l->out);
    mmb__add_forward_mt(ctx, x, x, xn, rows * D);
    mmb__ffn_residual_forward(ctx, x, xn, h, rows, l->ln2_w, l->ln2_b, in->eps, &l->fc1, v->act, &l->fc2);
}

static mmb_status vit_run(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t batch, const int *taps,
                          const int *spans, int n_taps, float *const *outs, float *maps);

mmb_status mmb_vit_forward(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t batch, const int *taps,
                           int n_taps, float *const *outs) {
    return mmb_vit_forward_groups(ctx, v, pixels, batch, taps, NULL, n_taps, outs);
}

mmb_status mmb__vit_last_feats(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t batch, int64_t floats,
                               float **out) {
    size_t bytes = sizeof(float) * (size_t)floats;
    mmb_status s = mmb__arena_reserve(ctx, &ctx->feats, bytes);
    if (s != MMB_OK) return s;
    *out = mmb__arena_alloc(&ctx->feats, bytes);
    const int last = MMB_TAP_LAST;
    return mmb_vit_forward(ctx, v, pixels, batch, &last, 1, out);
}

void mmb__vit_post_norm(mmb_ctx *ctx, const mmb_vit *v, float *x, int64_t rows) {
    mmb__layernorm_forward_mt(ctx, x, x, v->post_w, v->post_b, rows, v->info.width, v->info.eps);
}

mmb_status mmb_vit_forward_groups(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t batch,
                                  const int *taps, const int *spans, int n_taps, float *const *outs) {
    if (!ctx || !v || !pixels || !taps || !outs || batch < 1 || n_taps < 1 || n_taps > MMB_MAX_TAPS)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_vit_forward: bad arguments");
    return vit_run(ctx, v, pixels, batch, taps, spans, n_taps, outs, NULL);
}

mmb_status mmb_vit_attention(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t n, int height, int width,
                             float *out, size_t count) {
    if (!ctx || !v || !pixels || !out || n < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_vit_attention: NULL argument or n < 1");
    const mmb_vit_info *in = &v->info;
    if (height != in->image_size || width != in->image_size)
        return mmb__err(ctx, MMB_ERR_SHAPE, "mmb_vit_attention: pixels of %dx%d, but the vision tower takes %dx%d",
                        width, height, in->image_size, in->image_size);
    int64_t patches = in->tokens - in->has_cls;
    uint64_t need = 0;
    if (!mmb__mul_ok((uint64_t)n, (uint64_t)in->layers * (uint64_t)patches, &need) || count < need)
        return mmb__err(ctx, MMB_ERR_SHAPE, "mmb_vit_attention: the output holds %zu floats; %lld image(s) x %d "
                        "layers x %lld patches are needed", count, (long long)n, in->layers, (long long)patches);
    if (in->layers < 1) return MMB_OK;
    return vit_run(ctx, v, pixels, n, NULL, NULL, 0, NULL, out);
}

static mmb_status vit_run(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t batch, const int *taps,
                          const int *spans, int n_taps, float *const *outs, float *maps) {
    if (v->owns_ck) {  /* a file truncated since open would raise SIGBUS in the reads below */
        mmb_status vs = mmb__ckpt_verify(ctx, &v->ck);
        if (vs != MMB_OK) return vs;
    }
    const mmb_vit_info *in = &v->info;
    int L = in->layers, deepest = 0, idx[MMB_MAX_TAPS], span[MMB_MAX_TAPS];
    for (int i = 0; i < n_taps; i++) {
        int t = taps[i] == MMB_TAP_LAST ? L : taps[i] < 0 ? taps[i] + L + 1 : taps[i];
        span[i] = spans && spans[i] > 1 ? spans[i] : 1;
        if (t < 0 || t > L || span[i] > L + 1 - t || (span[i] > 1 && taps[i] == MMB_TAP_LAST))
            return mmb__err(ctx, MMB_ERR_ARG, "hidden_states[%d] (mean of %d) is out of range: the encoder has %d "
                            "hidden states (indices %d..%d)", taps[i], span[i], L + 1, -(L + 1), L);
        idx[i] = t;
        deepest = t + span[i] - 1 > deepest ? t + span[i] - 1 : deepest;
    }
    if (maps) deepest = L;  /* every block's maps */
    int64_t T = in->tokens, D = in->width, I = in->intermediate, rows = batch * T, g = in->image_size / in->patch_size;
    int64_t P = (int64_t)in->channels * in->patch_size * in->patch_size, npatch = batch * g * g;
    size_t f = sizeof(float);
    size_t need = mmb__arena_piece(f * (size_t)(npatch * (P > D ? P : D))) * 2 +  /* im2col rows, patch out */
                  mmb__arena_piece(f * (size_t)(rows * D)) * 3 +                  /* x, xn, att */
                  mmb__arena_piece(f * (size_t)(rows * 3 * D)) + mmb__arena_piece(f * (size_t)(rows * I)) +
                  mmb__arena_piece(f * mmb__attention_scratch(mmb__pool_size(ctx->pool), D / in->heads));
    amap am = {.out = maps, .qb = in->has_cls ? 1 : 32};
    am.nqb = in->has_cls ? 1 : (T + am.qb - 1) / am.qb;
    size_t part_n = (size_t)(batch * in->heads * am.nqb * T), rows_n = (size_t)(mmb__pool_size(ctx->pool) * T);
    if (maps) need += mmb__arena_piece(f * part_n) + mmb__arena_piece(f * rows_n);
    mmb_status s = mmb__arena_reserve(ctx, &ctx->arena, need);
    if (s != MMB_OK) return s;
    mmb_arena *a = &ctx->arena;
    float *cols = mmb__arena_alloc(a, f * (size_t)(npatch * (P > D ? P : D)));
    float *emb = mmb__arena_alloc(a, f * (size_t)(npatch * (P > D ? P : D)));
    float *x = mmb__arena_alloc(a, f * (size_t)(rows * D)), *xn = mmb__arena_alloc(a, f * (size_t)(rows * D));
    float *att = mmb__arena_alloc(a, f * (size_t)(rows * D)), *qkv = mmb__arena_alloc(a, f * (size_t)(rows * 3 * D));
    float *h = mmb__arena_alloc(a, f * (size_t)(rows * I));
    float *asc = mmb__arena_alloc(a, f * mmb__attention_scratch(mmb__pool_size(ctx->pool), D / in->heads));
    if (maps) {
        am.part = mmb__arena_alloc(a, f * part_n);
        am.rows = mmb__arena_alloc(a, f * rows_n);
    }

    im2col(cols, pixels, batch, in->channels, in->image_size, in->patch_size);
    mmb__linear_forward(ctx, emb, cols, npatch, &v->patch);
    for (int64_t b = 0; b < batch; b++) {
        float *xb = x + b * T * D;
        if (in->has_cls) memcpy(xb, v->cls, f * (size_t)D);
        memcpy(xb + in->has_cls * D, emb + b * g * g * D, f * (size_t)(g * g * D));
        mmb__add_forward(xb, xb, v->pos, T * D);
    }
    if (v->pre_w) {
        mmb__layernorm_forward_mt(ctx, xn, x, v->pre_w, v->pre_b, rows, D, in->eps);
        memcpy(x, xn, f * (size_t)(rows * D));
    }
    for (int layer = 0;; layer++) {
        for (int i = 0; i < n_taps; i++) {
            if (layer < idx[i] || layer >= idx[i] + span[i]) continue;
            if (taps[i] == MMB_TAP_LAST && (!in->has_cls || v->blip2))
                mmb__layernorm_forward_mt(ctx, outs[i], x, v->post_w, v->post_b, rows, D, in->eps);
            else if (layer == idx[i])
                memcpy(outs[i], x, f * (size_t)(rows * D));
            else
                mmb__add_forward(outs[i], outs[i], x, rows * D);  /* a group's running sum */
            if (span[i] > 1 && layer == idx[i] + span[i] - 1)
                for (int64_t k = 0; k < rows * D; k++) outs[i][k] /= (float)span[i];
        }
        if (layer == deepest) break;
        block_forward(ctx, v, &v->layers[layer], x, xn, qkv, att, h, asc, batch, maps ? &am : NULL, layer);
    }
    mmb__arena_reset(a);
    return MMB_OK;
}
