/* LLaMA-Adapter V2 multimodal (OpenGVLab/LLaMA-Adapter, llama_adapter_v2_multimodal7b/llama/llama_adapter.py) as
 * scripts/convert_llama_adapter_v2.py writes it (docs/decisions.md "LLaMA-Adapter V2"): the vision side, one
 * mmb_model_encode. What it makes are the visual queries that the LLM side adds to every adapted layer's
 * adapter prompt; they take no positions in the text.
 *
 *   pixels (n, 3, S, S) -> CLIP tower (vision_tower.vision_model.*, vision_config) -> hidden_states[-1] with CLS
 *     -> ln_post (the tower's post_layernorm) on every token -> @ proj (vision_tower.visual_projection.weight)
 *     -> clip_proj, clip_proj_norm                                        (clip_encode_image, forward_visual)
 *   [visual_query (query_len rows) ; those tokens] -> visual_blocks.{i}: timm Blocks (pre-norm LayerNorm eps
 *     1e-5, fused qkv with bias, no mask; GELU (erf) MLP)
 *   -> the first query_len rows -> visual_proj -> visual_proj_norm: out (n, query_len, hidden_size).
 *
 * Settings: query_len and hidden_size (the LLM's width) from config.json, visual_config.{hidden_size,
 * num_hidden_layers, num_attention_heads, intermediate_size, layer_norm_eps, hidden_act, proj_layer_norm_eps};
 * every weight's shape is checked against them. */
#include "models/models.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  /* (V) */
    mmb_linear qkv, proj, fc1, fc2;        /* (3V, V), (V, V), (I, V), (V, I), all with bias */
} lav2_block;

typedef struct {
    mmb_vit *vit;
    mmb_vit_info vi;
    int64_t P;                   /* CLIP's output_dim: proj's columns */
    int64_t Q, V, I, H, depth;   /* query_len, v_embed_dim, the blocks' MLP width, heads, blocks */
    int64_t D;                   /* the LLM's hidden_size */
    float eps, proj_eps;         /* the blocks' LayerNorms; clip_proj_norm and visual_proj_norm */
    mmb_act act;
    mmb_linear clip_out;         /* CLIP's proj as a Linear (P, W), no bias */
    mmb_linear clip_proj;        /* (V, P) */
    float *cpn_w, *cpn_b;        /* clip_proj_norm (V) */
    float *query;                /* visual_query (Q, V) */
    lav2_block *blocks;
    mmb_linear vproj;            /* visual_proj (D, V) */
    float *vpn_w, *vpn_b;        /* visual_proj_norm (D) */
} lav2_state;

static void lav2_free(void *st) {
    lav2_state *m = st;
    if (!m) return;
    for (int64_t i = 0; m->blocks && i < m->depth; i++) {
        lav2_block *b = &m->blocks[i];
        free(b->ln1_w); free(b->ln1_b); free(b->ln2_w); free(b->ln2_b);
        mmb__linear_free(&b->qkv);
        mmb__linear_free(&b->proj);
        mmb__linear_free(&b->fc1);
        mmb__linear_free(&b->fc2);
    }
    free(m->blocks);
    mmb__linear_free(&m->clip_out);
    mmb__linear_free(&m->clip_proj);
    mmb__linear_free(&m->vproj);
    free(m->cpn_w); free(m->cpn_b); free(m->query); free(m->vpn_w); free(m->vpn_b);
    mmb_vit_free(m->vit);
    free(m);
}

/* The settings from config.json (the converter's defaults for absent visual_config keys: load()'s v_depth 8,
 * v_num_heads 16, mlp_ratio 4, timm's LayerNorm eps and GELU). */
static mmb_status read_settings(mmb_ctx *ctx, const mmb_ckpt *c, lav2_state *m) {
    mmb_status s = MMB_OK;
    m->Q = 10;
    m->D = 4096;
    m->V = 768;
    m->depth = 8;
    m->H = 16;
    m->I = -1;
    double eps = 1e-5, peps = 1e-5;
    const char *act = "gelu";
    struct { const char *k; int64_t *v; } ints[] = {
        {"query_len", &m->Q}, {"hidden_size", &m->D}, {"visual_config.hidden_size", &m->V},
        {"visual_config.num_hidden_layers", &m->depth}, {"visual_config.num_attention_heads", &m->H},
        {"visual_config.intermediate_size", &m->I},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && s == MMB_OK; i++) mmb__cfg_int(ctx, c, ints[i].k, ints[i].v, &s);
    if (s == MMB_OK) mmb__cfg_num(ctx, c, "visual_config.layer_norm_eps", &eps, &s);
    if (s == MMB_OK) mmb__cfg_num(ctx, c, "visual_config.proj_layer_norm_eps", &peps, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "visual_config.hidden_act", &act, &s);
    if (s != MMB_OK) return s;
    if (m->I < 0) m->I = 4 * m->V;
    if (m->Q < 1 || m->Q > 65536 || m->D < 1 || m->D > (1 << 20) || m->V < 1 || m->V > (1 << 20) || m->depth < 0 ||
        m->depth > 4096 || m->H < 1 || m->V % m->H != 0 || m->I < 1 || m->I > (1 << 22) || !(eps > 0) || !(peps > 0))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: LLaMA-Adapter V2 settings out of range (query_len %lld, "
                        "hidden_size %lld, visual_config: hidden_size %lld, num_hidden_layers %lld, "
                        "num_attention_heads %lld, intermediate_size %lld)", c->dir, (long long)m->Q, (long long)m->D,
                        (long long)m->V, (long long)m->depth, (long long)m->H, (long long)m->I);
    if (!mmb__act_parse(act, &m->act))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: visual_config.hidden_act '%s' is not supported",
                        c->dir, act);
    m->eps = (float)eps;
    m->proj_eps = (float)peps;
    return MMB_OK;
}

static mmb_status load_block(mmb_ctx *ctx, const mmb_ckpt *c, lav2_state *m, int64_t i) {
    lav2_block *b = &m->blocks[i];
    char p[64];
    snprintf(p, sizeof p, "visual_blocks.%lld.", (long long)i);
    mmb_status s = mmb__ckpt_norm(ctx, c, p, "norm1", m->V, &b->ln1_w, &b->ln1_b);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, p, "attn.qkv", 3 * m->V, m->V, true, &b->qkv);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, p, "attn.proj", m->V, m->V, true, &b->proj);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "norm2", m->V, &b->ln2_w, &b->ln2_b);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, p, "mlp.fc1", m->I, m->V, true, &b->fc1);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, p, "mlp.fc2", m->V, m->I, true, &b->fc2);
    return s;
}

static mmb_status load_weights(mmb_ctx *ctx, const mmb_ckpt *c, lav2_state *m) {
    const mmb_tensor *t = mmb__ckpt_find(c, "vision_tower.visual_projection.weight", NULL);
    if (!t || t->ndim != 2)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor 'vision_tower.visual_projection.weight' (CLIP's proj, "
                        "[output_dim, %d]) is %s", c->dir, m->vi.width, t ? "not 2-D" : "missing");
    m->P = t->shape[0];
    mmb_status s = mmb__ckpt_linear(ctx, c, "vision_tower.", "visual_projection", m->P, m->vi.width, false,
                                    &m->clip_out);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, "", "clip_proj", m->V, m->P, true, &m->clip_proj);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, "", "clip_proj_norm", m->V, &m->cpn_w, &m->cpn_b);
    if (s == MMB_OK) {
        const int64_t shape[2] = {m->Q, m->V};
        s = mmb__ckpt_bind(ctx, c, "visual_query.weight", 2, shape, &t);
    }
    if (s == MMB_OK) {
        if (!(m->query = malloc(sizeof(float) * (size_t)(m->Q * m->V))))
            return mmb__err(ctx, MMB_ERR_NOMEM, "%s: tensor 'visual_query.weight': out of memory", c->dir);
        mmb_to_f32(m->query, t->data, t->dtype, (size_t)(m->Q * m->V));
    }
    if (s == MMB_OK && !(m->blocks = calloc((size_t)(m->depth ? m->depth : 1), sizeof *m->blocks)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < m->depth && s == MMB_OK; i++) s = load_block(ctx, c, m, i);
    if (s == MMB_OK) {
        char name[64];
        snprintf(name, sizeof name, "visual_blocks.%lld.norm1.weight", (long long)m->depth);
        if (mmb__ckpt_find(c, name, NULL))
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': more visual blocks than visual_config.num_hidden_layers "
                         "(%lld)", c->dir, name, (long long)m->depth);
    }
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, "", "visual_proj", m->D, m->V, true, &m->vproj);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, "", "visual_proj_norm", m->D, &m->vpn_w, &m->vpn_b);
    return s;
}

static mmb_status lav2_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state,
                            mmb_model_info *info) {
    (void)fam;
    lav2_state *m = calloc(1, sizeof *m);
    if (!m) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb_status s = read_settings(ctx, c, m);
    if (s == MMB_OK) s = mmb__vit_load(ctx, c, &m->vit);
    if (s == MMB_OK) {
        mmb_vit_get_info(m->vit, &m->vi);
        if (strcmp(m->vi.family, "clip") != 0 || !m->vi.has_cls || strcmp(m->vi.prefix, "vision_tower.vision_model.") != 0)
            s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: the vision tower reads as %s under '%s'; LLaMA-Adapter V2's is "
                         "CLIP's (vision_config clip_vision_model, vision_tower.vision_model.*)", c->dir, m->vi.family,
                         m->vi.prefix);
    }
    if (s == MMB_OK) s = load_weights(ctx, c, m);
    if (s != MMB_OK) {
        lav2_free(m);
        return s;
    }
    int64_t T = m->vi.tokens, R = m->Q + T, params = m->Q * m->V + 2 * m->V + 2 * m->D, flops = 0;
    mmb__linear_cost(&m->clip_out, T, &params, &flops);
    mmb__linear_cost(&m->clip_proj, T, &params, &flops);
    for (int64_t i = 0; i < m->depth; i++) {
        const lav2_block *b = &m->blocks[i];
        params += 4 * m->V;
        mmb__linear_cost(&b->qkv, R, &params, &flops);
        mmb__linear_cost(&b->proj, R, &params, &flops);
        mmb__linear_cost(&b->fc1, R, &params, &flops);
        mmb__linear_cost(&b->fc2, R, &params, &flops);
        flops += 4 * R * R * m->V;  /* q k^T and the weighted sum */
    }
    mmb__linear_cost(&m->vproj, m->Q, &params, &flops);
    info->connector = "llama_adapter_v2";
    info->activation = mmb__act_name(m->act);
    info->select_strategy = "full";
    info->n_taps = 1;
    info->taps[0] = -1;
    info->vision_layers = m->vi.layers;
    info->vision_width = info->in_width = m->vi.width;
    info->out_width = (int)m->D;
    info->image_size = m->vi.image_size;
    info->patch_size = m->vi.patch_size;
    info->tokens_per_image = m->Q;
    info->params = params;
    info->flops_per_image = flops;
    const mmb_tensor *w = mmb__ckpt_find(c, "visual_query.weight", NULL);
    info->weight_dtype = w ? w->dtype : MMB_F32;
    *state = m;
    return MMB_OK;
}

static int64_t lav2_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    const lav2_state *m = st;
    if (height != m->vi.image_size || width != m->vi.image_size)
        return mmb__err(ctx, MMB_ERR_SHAPE, "pixels of %dx%d: the LLaMA-Adapter V2 CLIP tower takes %dx%d", width,
                        height, m->vi.image_size, m->vi.image_size), -1;
    return m->Q;
}

/* One timm Block on x (rows = B R, V), in place: x += proj(attn(norm1(x))); x += fc2(act(fc1(norm2(x)))). */
static void block_forward(mmb_ctx *ctx, const lav2_state *m, const lav2_block *b, float *x, float *xn, float *qkv,
                          float *att, float *h, float *asc, int64_t B, int64_t R) {
    int64_t rows = B * R, V = m->V;
    mmb__layernorm_forward_mt(ctx, xn, x, b->ln1_w, b->ln1_b, rows, V, m->eps);
    mmb__linear_forward(ctx, qkv, xn, rows, &b->qkv);
    mmb__attention_forward(ctx, att, qkv, B, R, m->H, V / m->H, asc);
    mmb__linear_forward(ctx, xn, att, rows, &b->proj);
    mmb__add_forward_mt(ctx, x, x, xn, rows * V);
    mmb__ffn_residual_forward(ctx, x, xn, h, rows, b->ln2_w, b->ln2_b, m->eps, &b->fc1, m->act, &b->fc2);
}

static mmb_status lav2_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t batch, int height, int width,
                              float *out) {
    const lav2_state *m = st;
    if (lav2_tokens(ctx, st, height, width) < 0) return MMB_ERR_SHAPE;
    int64_t T = m->vi.tokens, W = m->vi.width, V = m->V, Q = m->Q, R = Q + T, P = m->P;
    int64_t rows = batch * R, hd = V / m->H;
    size_t f = sizeof(float);
    float *feat;
    mmb_status s = mmb__vit_last_feats(ctx, m->vit, pixels, batch, batch * T * W, &feat);
    if (s == MMB_OK) {
        size_t asc_n = mmb__attention_scratch(mmb__pool_size(ctx->pool), hd);
        size_t need = mmb__arena_piece(f * (size_t)(batch * T * P)) + mmb__arena_piece(f * (size_t)(batch * T * V)) +
                      mmb__arena_piece(f * (size_t)(rows * V)) * 3 + mmb__arena_piece(f * (size_t)(rows * 3 * V)) +
                      mmb__arena_piece(f * (size_t)(rows * m->I)) + mmb__arena_piece(f * asc_n);
        s = mmb__arena_reserve(ctx, &ctx->arena, need);
        if (s == MMB_OK) {
            mmb_arena *a = &ctx->arena;
            float *cf = mmb__arena_alloc(a, f * (size_t)(batch * T * P));
            float *cv = mmb__arena_alloc(a, f * (size_t)(batch * T * V));
            float *x = mmb__arena_alloc(a, f * (size_t)(rows * V)), *xn = mmb__arena_alloc(a, f * (size_t)(rows * V));
            float *att = mmb__arena_alloc(a, f * (size_t)(rows * V));
            float *qkv = mmb__arena_alloc(a, f * (size_t)(rows * 3 * V));
            float *h = mmb__arena_alloc(a, f * (size_t)(rows * m->I)), *asc = mmb__arena_alloc(a, f * asc_n);
            /* clip_encode_image: ln_post on every token, then proj; forward_visual: clip_proj, clip_proj_norm */
            mmb__vit_post_norm(ctx, m->vit, feat, batch * T);
            mmb__linear_forward(ctx, cf, feat, batch * T, &m->clip_out);
            mmb__linear_forward(ctx, cv, cf, batch * T, &m->clip_proj);
            mmb__layernorm_forward_mt(ctx, cv, cv, m->cpn_w, m->cpn_b, batch * T, V, m->proj_eps);
            for (int64_t b = 0; b < batch; b++) { /* [visual_query ; clip tokens] */
                memcpy(x + b * R * V, m->query, f * (size_t)(Q * V));
                memcpy(x + (b * R + Q) * V, cv + b * T * V, f * (size_t)(T * V));
            }
            for (int64_t i = 0; i < m->depth; i++) block_forward(ctx, m, &m->blocks[i], x, xn, qkv, att, h, asc, batch, R);
            for (int64_t b = 0; b < batch; b++) /* the first query_len rows of each image */
                memcpy(xn + b * Q * V, x + b * R * V, f * (size_t)(Q * V));
            mmb__linear_forward(ctx, out, xn, batch * Q, &m->vproj);
            mmb__layernorm_forward_mt(ctx, out, out, m->vpn_w, m->vpn_b, batch * Q, m->D, m->proj_eps);
        }
    }
    mmb__arena_reset(&ctx->arena);
    mmb__arena_reset(&ctx->feats);
    return s;
}

const mmb_family_ops mmb__family_llama_adapter_v2 = {
    .load = lav2_load,
    .tokens = lav2_tokens,
    .encode = lav2_encode,
    .free = lav2_free,
};
