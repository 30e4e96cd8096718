/* Flamingo-style perceiver resamplers, one network with the differences as parameters, two connectors:
 *   IDEFICS (v1)  transformers' IdeficsPerceiverResampler (models/idefics/perceiver.py), the
 *                 "idefics_perceiver" connector the idefics family runs after its CLIP-like tower
 *                 (IdeficsVisionTransformer = vit.c) when config.use_resampler;
 *   OpenFlamingo  PerceiverResampler (open_flamingo/src/helpers.py), the "flamingo_perceiver" connector
 *                 of the LLaVA path (original-layout config, model.mm_projector.*), and the open_flamingo
 *                 family's resampler (models/open_flamingo.c: perceiver.*, its config's "perceiver" settings).
 *
 *   x (T, D): one image's features; Flamingo adds frame_embs[0] and media_time_embs[0] when present
 *             (one frame, one media: F = T_media = 1)
 *   lat (N, D) = latents
 *   each layer:  c = LN_ctx(x); l = LN_lat(lat); kv = [c; l] (T + N rows)
 *                q = l Wq^T (N, H*d); k = kv Wk^T, v = kv Wv^T (T + N, H*d)   Flamingo: [k | v] = kv Wkv^T
 *                IDEFICS qk_layer_norms_perceiver: q, k = LN_q, LN_k over each head's d channels
 *                lat += Wo softmax(q k^T / sqrt d) v            (heads merged: (N, H*d) -> (N, D))
 *                lat += W2 act(W1 LN_ff(lat))                   act: IDEFICS ReLU, Flamingo exact GELU
 *   out = LN(lat) (N, D)
 * Linears have no bias; every LayerNorm has a bias and eps 1e-5 (nn.LayerNorm's default). Subtracting the
 * detached row max before the softmax, as both references do, changes nothing but overflow. */
#include "connectors/connectors.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the network ------------------------------------------------------------------------------- */

/* Weight names under the prefix; layer names under "{layers}.{i}.". NULL: not in this variant. */
typedef struct {
    const char *latents, *norm, *layers;
    const char *ln_ctx, *ln_lat, *q, *k, *v, *kv, *o, *ln_q, *ln_k, *ln_ff, *ff1, *ff2;
} perc_names;

static const perc_names idefics_names = {"latents", "layer_norm", "blocks", "0.context_layer_norm",
                                         "0.latents_layer_norm", "0.q_proj", "0.k_proj", "0.v_proj", NULL,
                                         "0.output_proj", "0.q_layer_norm", "0.k_layer_norm", "1.ln", "1.fc",
                                         "1.c_proj"};
static const perc_names flamingo_names = {"latents", "norm", "layers", "0.norm_media", "0.norm_latents", "0.to_q",
                                          NULL, NULL, "0.to_kv", "0.to_out", NULL, NULL, "1.0", "1.1", "1.3"};

typedef struct {
    float *ctx_w, *ctx_b, *lat_w, *lat_b, *ff_w, *ff_b;  /* (D) */
    float *q_w, *q_b, *k_w, *k_b;                        /* (d), qk norms only */
    mmb_linear q, k, v, o, ff1, ff2;  /* q (I, D); k, v (I, D), or k = to_kv (2I, D) and no v; o (D, I);
                                         ff1 (F, D); ff2 (D, F) */
} perc_layer;

typedef struct {
    const perc_names *names;
    char prefix[128];
    int64_t D, N, depth, heads, hd, F; /* width, latents, layers, heads x head dim (= I), MLP width */
    bool qk_norm;
    mmb_act act;
    float eps;
    int nth;                           /* threads of the loading context: sizes the attention scratch */
    float *latents;                    /* (N, D) */
    float *emb;                        /* (D): frame_embs[0] + media_time_embs[0], or NULL */
    float *norm_w, *norm_b;            /* (D) */
    perc_layer *layers;
} perceiver;

static void perc_free(void *st) {
    perceiver *p = st;
    if (!p) return;
    for (int64_t i = 0; p->layers && i < p->depth; i++) {
        perc_layer *l = &p->layers[i];
        free(l->ctx_w); free(l->ctx_b); free(l->lat_w); free(l->lat_b); free(l->ff_w); free(l->ff_b);
        free(l->q_w); free(l->q_b); free(l->k_w); free(l->k_b);
        mmb_linear *lin[] = {&l->q, &l->k, &l->v, &l->o, &l->ff1, &l->ff2};
        for (size_t k = 0; k < sizeof lin / sizeof lin[0]; k++) mmb__linear_free(lin[k]);
    }
    free(p->layers);
    free(p->latents); free(p->emb); free(p->norm_w); free(p->norm_b);
    free(p);
}

/* Adds row 0 of the optional tensor {prefix}{name} [rows, (1,) D] to p->emb. */
static mmb_status add_emb(mmb_ctx *ctx, const mmb_ckpt *c, perceiver *p, const char *name) {
    char n[256];
    snprintf(n, sizeof n, "%s%s", p->prefix, name);
    const mmb_st_file *f;
    const mmb_tensor *t = mmb__ckpt_find(c, n, &f);
    if (!t) return MMB_OK;
    bool three = t->ndim == 3;
    if (!(t->ndim == 2 || (three && t->shape[1] == 1)) || t->shape[0] < 1 || t->shape[t->ndim - 1] != p->D ||
        !mmb__dtype_is_float(t->dtype))
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%s': expected [n, %s%lld] of a float dtype", mmb__st_path(f),
                        n, three ? "1, " : "", (long long)p->D);
    if (!p->emb && !(p->emb = calloc((size_t)p->D, sizeof(float)))) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    float *row = malloc(sizeof(float) * (size_t)p->D);
    if (!row) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb_to_f32(row, t->data, t->dtype, (size_t)p->D);
    mmb__add_forward(p->emb, p->emb, row, p->D);
    free(row);
    return MMB_OK;
}

/* Binds every weight of p (sizes set, prefix and names chosen), checking shapes. */
static mmb_status perc_bind(mmb_ctx *ctx, const mmb_ckpt *c, perceiver *p) {
    const perc_names *nm = p->names;
    int64_t D = p->D, I = p->heads * p->hd, F = p->F;
    const mmb_tensor *lt;
    int64_t ls[2] = {p->N, D};
    char name[256];
    snprintf(name, sizeof name, "%s%s", p->prefix, nm->latents);
    mmb_status s = mmb__ckpt_bind(ctx, c, name, 2, ls, &lt);
    if (s == MMB_OK && !(p->latents = malloc(sizeof(float) * (size_t)(p->N * D))))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK) mmb_to_f32(p->latents, lt->data, lt->dtype, (size_t)(p->N * D));
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p->prefix, nm->norm, D, &p->norm_w, &p->norm_b);
    if (s == MMB_OK && !(p->layers = calloc((size_t)p->depth, sizeof *p->layers)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < p->depth && s == MMB_OK; i++) {
        perc_layer *l = &p->layers[i];
        char lp[192];
        snprintf(lp, sizeof lp, "%s%s.%lld.", p->prefix, nm->layers, (long long)i);
        s = mmb__ckpt_norm(ctx, c, lp, nm->ln_ctx, D, &l->ctx_w, &l->ctx_b);
        if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, nm->ln_lat, D, &l->lat_w, &l->lat_b);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, nm->q, I, D, false, &l->q);
        if (s == MMB_OK && nm->kv) s = mmb__ckpt_linear(ctx, c, lp, nm->kv, 2 * I, D, false, &l->k);
        if (s == MMB_OK && !nm->kv) s = mmb__ckpt_linear(ctx, c, lp, nm->k, I, D, false, &l->k);
        if (s == MMB_OK && !nm->kv) s = mmb__ckpt_linear(ctx, c, lp, nm->v, I, D, false, &l->v);
        if (s == MMB_OK && p->qk_norm) s = mmb__ckpt_norm(ctx, c, lp, nm->ln_q, p->hd, &l->q_w, &l->q_b);
        if (s == MMB_OK && p->qk_norm) s = mmb__ckpt_norm(ctx, c, lp, nm->ln_k, p->hd, &l->k_w, &l->k_b);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, nm->o, D, I, false, &l->o);
        if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, nm->ln_ff, D, &l->ff_w, &l->ff_b);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, nm->ff1, F, D, false, &l->ff1);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, nm->ff2, D, F, false, &l->ff2);
    }
    if (s == MMB_OK && nm == &flamingo_names) s = add_emb(ctx, c, p, "frame_embs");
    if (s == MMB_OK && nm == &flamingo_names) s = add_emb(ctx, c, p, "media_time_embs");
    return s;
}

static mmb_status perc_check(mmb_ctx *ctx, const mmb_ckpt *c, const perceiver *p) {
    int64_t lim = 1 << 20;
    if (p->D < 1 || p->D > lim || p->N < 1 || p->N > lim || p->depth < 1 || p->depth > 4096 || p->heads < 1 ||
        p->heads > lim || p->hd < 1 || p->hd > lim || p->heads * p->hd > lim || p->F < 1 || p->F > lim)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: perceiver sizes out of range (width %lld, %lld latents, "
                        "depth %lld, %lld heads of %lld, MLP %lld)", c->dir, (long long)p->D, (long long)p->N,
                        (long long)p->depth, (long long)p->heads, (long long)p->hd, (long long)p->F);
    return MMB_OK;
}

static int64_t perc_params(const perceiver *p) {
    int64_t D = p->D, I = p->heads * p->hd;
    return p->N * D + 2 * D + (p->emb ? D : 0) +
           p->depth * (6 * D + 4 * D * I + 2 * D * p->F + (p->qk_norm ? 4 * p->hd : 0));
}

/* FLOPs for one image of T tokens: projections, scores and values, MLP. */
static int64_t perc_flops(const perceiver *p, int64_t T) {
    int64_t D = p->D, N = p->N, I = p->heads * p->hd;
    return p->depth * (2 * N * D * I + 4 * (T + N) * D * I + 4 * N * (T + N) * I + 2 * N * I * D + 4 * N * D * p->F);
}

/* Floats of arena scratch for images of up to T tokens, on nth threads. */
static size_t perc_scratch_floats(const perceiver *p, int64_t T, int nth) {
    int64_t D = p->D, N = p->N, I = p->heads * p->hd, R = T + N;
    size_t f = sizeof(float), bytes = mmb__arena_piece(f * (size_t)(T * D)) +  /* x + embeddings */
                                      mmb__arena_piece(f * (size_t)(R * D)) +  /* [c; l] */
                                      mmb__arena_piece(f * (size_t)(R * 2 * I)) + /* k, v */
                                      2 * mmb__arena_piece(f * (size_t)(N * D)) + /* lat, o */
                                      2 * mmb__arena_piece(f * (size_t)(N * I)) + /* q, att */
                                      mmb__arena_piece(f * (size_t)(N * p->F)) +
                                      mmb__arena_piece(f * mmb__attention_scratch(nth, p->hd));
    return bytes / f + 1;
}

/* x (batch, T, D) -> out (batch, N, D), one image at a time; scratch from ctx's arena
 * (perc_scratch_floats(T) reserved by the caller). */
static mmb_status perc_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch, int64_t T) {
    const perceiver *p = st;
    int64_t D = p->D, N = p->N, H = p->heads, hd = p->hd, I = H * hd, R = T + N;
    mmb_arena *a = &ctx->arena;
    size_t f = sizeof(float);
    float *xe = mmb__arena_alloc(a, f * (size_t)(T * D)), *kvin = mmb__arena_alloc(a, f * (size_t)(R * D));
    float *kv = mmb__arena_alloc(a, f * (size_t)(R * 2 * I)), *lat = mmb__arena_alloc(a, f * (size_t)(N * D));
    float *o = mmb__arena_alloc(a, f * (size_t)(N * D)), *q = mmb__arena_alloc(a, f * (size_t)(N * I));
    float *att = mmb__arena_alloc(a, f * (size_t)(N * I)), *h = mmb__arena_alloc(a, f * (size_t)(N * p->F));
    float *asc = mmb__arena_alloc(a, f * mmb__attention_scratch(mmb__pool_size(ctx->pool), hd));
    if (!xe || !kvin || !kv || !lat || !o || !q || !att || !h || !asc)
        return mmb__err(ctx, MMB_ERR_NOMEM, "perceiver: scratch arena too small");
    bool fused = p->names->kv != NULL;
    const float *k = kv, *v = fused ? kv + I : kv + R * I;  /* [k | v] per row, or k then v */
    int64_t ldkv = fused ? 2 * I : I;
    for (int64_t b = 0; b < batch; b++) {
        const float *xb = x + b * T * D;
        if (p->emb) {
            for (int64_t t = 0; t < T; t++) mmb__add_forward(xe + t * D, xb + t * D, p->emb, D);
            xb = xe;
        }
        memcpy(lat, p->latents, f * (size_t)(N * D));
        for (int64_t i = 0; i < p->depth; i++) {
            const perc_layer *l = &p->layers[i];
            mmb__layernorm_forward_mt(ctx, kvin, xb, l->ctx_w, l->ctx_b, T, D, p->eps);
            mmb__layernorm_forward_mt(ctx, kvin + T * D, lat, l->lat_w, l->lat_b, N, D, p->eps);
            mmb__linear_forward(ctx, q, kvin + T * D, N, &l->q);
            mmb__linear_forward(ctx, kv, kvin, R, &l->k);
            if (!fused) mmb__linear_forward(ctx, kv + R * I, kvin, R, &l->v);
            if (p->qk_norm) {  /* k is (R, I) contiguous here: (R * H) rows of hd */
                mmb__layernorm_forward_mt(ctx, q, q, l->q_w, l->q_b, N * H, hd, p->eps);
                mmb__layernorm_forward_mt(ctx, kv, kv, l->k_w, l->k_b, R * H, hd, p->eps);
            }
            mmb__cross_attention_forward(ctx, att, q, k, v, I, ldkv, 1, N, R, H, H, hd, asc);
            mmb__linear_forward(ctx, o, att, N, &l->o);
            mmb__add_forward(lat, lat, o, N * D);
            mmb__ffn_residual_forward(ctx, lat, o, h, N, l->ff_w, l->ff_b, p->eps, &l->ff1, p->act, &l->ff2);
        }
        mmb__layernorm_forward_mt(ctx, out + b * N * D, lat, p->norm_w, p->norm_b, N, D, p->eps);
    }
    return MMB_OK;
}

/* ---- OpenFlamingo's PerceiverResampler as a LLaVA-path connector: "flamingo_perceiver" ----------- */

/* Config keys (original-layout config.json), each optional: mm_perceiver_depth, mm_perceiver_num_latents,
 * mm_perceiver_heads, mm_perceiver_dim_head, mm_perceiver_ff_mult. Absent ones come from the tensors: latents [N, D] gives N,
 * the layers present the depth, to_q [heads * dim_head, D] the inner width (dim_head 64 by default, as
 * OpenFlamingo's), layers.0.1.1 [F, D] the MLP width (ff_mult * D). Weights: {prefix}perceiver.* (the
 * Flamingo module's own names), or {prefix}* when mm_projector is the resampler itself. */
/* dim 0 of {prefix}{name}, or -1 when absent. */
static int64_t dim0(const mmb_ckpt *c, const char *prefix, const char *name) {
    char n[256];
    snprintf(n, sizeof n, "%s%s", prefix, name);
    const mmb_tensor *t = mmb__ckpt_find(c, n, NULL);
    return t && t->ndim >= 1 ? t->shape[0] : -1;
}

/* An OpenFlamingo resampler of width D, sizes not yet set. */
static perceiver *flamingo_new(mmb_ctx *ctx, int64_t D) {
    perceiver *p = calloc(1, sizeof *p);
    if (!p) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory"), NULL;
    p->names = &flamingo_names;
    p->nth = mmb__pool_size(ctx->pool);
    p->act = MMB_ACT_GELU;
    p->eps = 1e-5f;
    p->D = D;
    return p;
}

static mmb_status flamingo_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    perceiver *p = flamingo_new(ctx, cfg->in_width);
    if (!p) return MMB_ERR_NOMEM;
    snprintf(p->prefix, sizeof p->prefix, "%sperceiver.", cfg->prefix);
    if (dim0(c, p->prefix, "latents") < 0 && dim0(c, cfg->prefix, "latents") >= 0)
        snprintf(p->prefix, sizeof p->prefix, "%s", cfg->prefix);
    mmb_status s = MMB_OK;
    int64_t heads = 0, dh = 0;
    if (!mmb__cfg_int(ctx, c, "mm_perceiver_num_latents", &p->N, &s) && s == MMB_OK)
        p->N = dim0(c, p->prefix, "latents");
    if (s == MMB_OK && !mmb__cfg_int(ctx, c, "mm_perceiver_depth", &p->depth, &s) && s == MMB_OK) {
        char n[64];
        do snprintf(n, sizeof n, "layers.%lld.0.to_q.weight", (long long)p->depth);
        while (dim0(c, p->prefix, n) >= 0 && ++p->depth < 4096);
    }
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "mm_perceiver_heads", &heads, &s);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "mm_perceiver_dim_head", &dh, &s);
    int64_t I = dim0(c, p->prefix, "layers.0.0.to_q.weight"), F = dim0(c, p->prefix, "layers.0.1.1.weight"), mult = 0;
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "mm_perceiver_ff_mult", &mult, &s);
    if (I < 0 && heads > 0 && dh > 0 && heads <= 4096 && dh <= 4096) I = heads * dh;
    if (F < 0 && mult > 0 && mult <= 64) F = mult * p->D;
    if (s == MMB_OK && (p->N < 0 || p->depth < 1 || I < 0 || F < 0)) {
        char n[200];
        snprintf(n, sizeof n, "%s%s", p->prefix, p->N < 0 ? "latents" : p->depth < 1 || I < 0 ? "layers.0.0.to_q.weight"
                                                                                           : "layers.0.1.1.weight");
        s = mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' is missing (flamingo_perceiver reads OpenFlamingo's "
                     "PerceiverResampler under '%sperceiver.' or '%s')", c->dir, n, cfg->prefix, cfg->prefix);
    }
    if (s == MMB_OK) {
        dh = dh ? dh : heads && I % heads == 0 ? I / heads : 64;
        heads = heads ? heads : I / dh;
        if (heads < 1 || heads * dh != I)
            s = mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%slayers.0.0.to_q.weight' is %lld wide: not heads x dim_head "
                         "(mm_perceiver_heads %lld, mm_perceiver_dim_head %lld)", c->dir, p->prefix, (long long)I,
                         (long long)heads, (long long)dh);
        p->heads = heads;
        p->hd = dh;
        p->F = F;
    }
    if (s == MMB_OK) s = perc_check(ctx, c, p);
    if (s == MMB_OK) s = perc_bind(ctx, c, p);
    if (s != MMB_OK) { perc_free(p); return s; }
    *out = p;
    return MMB_OK;
}

mmb_status mmb__flamingo_perceiver_load(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix,
                                        const mmb__perceiver_cfg *cfg, void **out) {
    perceiver *p = flamingo_new(ctx, cfg->dim);
    if (!p) return MMB_ERR_NOMEM;
    snprintf(p->prefix, sizeof p->prefix, "%s", prefix);
    p->N = cfg->num_latents;
    p->depth = cfg->depth;
    p->heads = cfg->heads;
    p->hd = cfg->dim_head;
    p->F = cfg->ff_mult >= 1 && cfg->ff_mult <= 64 ? cfg->ff_mult * cfg->dim : 0;  /* else refused by perc_check */
    mmb_status s = perc_check(ctx, c, p);
    if (s == MMB_OK) s = perc_bind(ctx, c, p);
    if (s != MMB_OK) { perc_free(p); return s; }
    *out = p;
    return MMB_OK;
}

/* IdeficsPerceiverConfig under perceiver_config.* (the class's defaults for absent keys), weights under
 * cfg->prefix ("perceiver_resampler." or "model.perceiver_resampler."), width cfg->in_width (the tower's). */
static mmb_status idefics_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    perceiver *p = calloc(1, sizeof *p);
    if (!p) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    int64_t D = cfg->in_width;
    *p = (perceiver){.names = &idefics_names, .D = D, .N = 64, .depth = 6, .heads = 16, .hd = 96, .F = 4 * D,
                     .act = MMB_ACT_RELU, .eps = 1e-5f, .nth = mmb__pool_size(ctx->pool)};
    snprintf(p->prefix, sizeof p->prefix, "%s", cfg->prefix);
    mmb_status s = MMB_OK;
    mmb__cfg_int(ctx, c, "perceiver_config.resampler_n_latents", &p->N, &s);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "perceiver_config.resampler_depth", &p->depth, &s);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "perceiver_config.resampler_n_heads", &p->heads, &s);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "perceiver_config.resampler_head_dim", &p->hd, &s);
    if (s == MMB_OK) mmb__cfg_bool(ctx, c, "perceiver_config.qk_layer_norms_perceiver", &p->qk_norm, &s);
    if (s == MMB_OK) s = perc_check(ctx, c, p);
    if (s == MMB_OK) s = perc_bind(ctx, c, p);
    if (s != MMB_OK) { perc_free(p); return s; }
    *out = p;
    return MMB_OK;
}

static const char *perc_activation(const void *st) { return mmb__act_name(((const perceiver *)st)->act); }

static int64_t perc_out_tokens(const void *st, int64_t tokens) { (void)tokens; return ((const perceiver *)st)->N; }
static int64_t perc_out_width(const void *st) { return ((const perceiver *)st)->D; }

/* tokens_in is per image; cost counts one image. */
static void perc_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    *params = perc_params(st);
    *flops = perc_flops(st, tokens);
}

/* rows = batch * tokens >= one image's tokens: the scratch of one image of `rows` tokens, on the loading
 * context's threads (a context with more threads gets a "scratch arena too small" error, not an overrun). */
static size_t perc_scratch(const void *st, int64_t rows) {
    return perc_scratch_floats(st, rows, ((const perceiver *)st)->nth);
}

const mmb_connector_ops mmb__conn_flamingo_perceiver = {
    .name = "flamingo_perceiver",
    .names = (const char *const[]){"flamingo_perceiver", NULL},
    .activation = perc_activation,
    .synth_config = "{\"mm_perceiver_num_latents\": 64, \"mm_perceiver_depth\": 6, \"mm_perceiver_heads\": 8, "
                    "\"mm_perceiver_dim_head\": 64, \"mm_perceiver_ff_mult\": 4}",
    .load = flamingo_load,
    .out_tokens = perc_out_tokens,
    .out_width = perc_out_width,
    .cost = perc_cost,
    .scratch = perc_scratch,
    .forward = perc_forward,
    .free = perc_free,
};

const mmb_connector_ops mmb__conn_idefics_perceiver = {
    .name = "idefics_perceiver",
    .names = (const char *const[]){"idefics_perceiver", NULL},
    .activation = perc_activation,
    .load = idefics_load,
    .out_tokens = perc_out_tokens,
    .out_width = perc_out_width,
    .cost = perc_cost,
    .scratch = perc_scratch,
    .forward = perc_forward,
    .free = perc_free,
};
