/* The mplug_owl2 family (MAGAer13/mplug-owl2-llama2-7b, the original repository's MPLUGOwl2LlamaForCausalLM): its
 * tower (vision/mplug_owl2.c), then the visual abstractor (MplugOwlVisualAbstractorModel, visual_encoder.py):
 * Q learned queries read the image's tokens through num_hidden_layers cross-attention layers, visual_fc takes them
 * to the LLM's width and vit_eos is appended, so an image is Q + 1 rows. Those rows run through the decoder's
 * second weight set (the modality-adaptive module's multiway.1 K/V and norms, lm/decoder.c): the family row's
 * image_expert.
 *
 * One abstractor layer (crossattention.*), x the queries (Q, H), v the image's tokens (N, H):
 *   xn = norm1(x)                                  (nn.LayerNorm default eps 1e-5, as norm2 and normk)
 *   kv = [xn ; normk(v)]                           (Q + N rows)
 *   K  = attention.key(kv + [q_pos ; k_pos]);  V = attention.value(kv);  q = attention.query(xn + q_pos)
 *   y  = xn + output.out_proj(softmax(q K^T / sqrt(hd)) V)      (the residual is the normed queries)
 *   y += output.mlp.w2(ffn_ln(silu(w1(norm2(y))) * w3(norm2(y))))  (ffn_ln: layer_norm_eps)
 * No mask (the module's masks are all ones). q_pos is the 1-D sin-cos table of Q positions, k_pos the 2-D one of
 * grid_size^2 patches after a zero row for CLS (MAE's get_2d_sincos_pos_embed: the first half of the width
 * encodes the column, the second the row); both are registered buffers, so the checkpoint has them
 * (attention.q_pos_embed / k_pos_embed), and they are computed here when it does not.
 * Config: visual_config.visual_abstractor (MplugOwlVisualAbstractorConfig's defaults); weights under
 * model.visual_abstractor.*. */
#include "models/models.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LN_DEFAULT_EPS 1e-5f  /* norm1, normk, norm2: nn.LayerNorm(hidden_size) */

typedef struct {
    float *n1_w, *n1_b, *nk_w, *nk_b, *n2_w, *n2_b, *ffn_w, *ffn_b;
    float *qpos, *kpos;          /* (Q, H), (Q + N, H): [q_pos ; k_pos] as the keys add it */
    mmb_linear q, k, v, o, w1, w2, w3;
} ab_layer;

typedef struct {
    mmb_owlvit *vit;
    mmb_owlvit_info vi;
    int Q, H, heads, inter, layers, grid;
    int64_t d_model, N;          /* the LLM's width; the image's tokens (the tower's) */
    float eps;                   /* layer_norm_eps: ffn_ln */
    float *query;                /* (Q, H) */
    float *eos;                  /* (d_model) */
    mmb_linear fc;               /* (d_model, H) */
    ab_layer *ly;
} owl_state;

static void owl_free(void *st) {
    owl_state *m = st;
    if (!m) return;
    for (int i = 0; m->ly && i < m->layers; i++) {
        ab_layer *l = &m->ly[i];
        float *f[] = {l->n1_w, l->n1_b, l->nk_w, l->nk_b, l->n2_w, l->n2_b, l->ffn_w, l->ffn_b, l->qpos, l->kpos};
        for (size_t k = 0; k < sizeof f / sizeof f[0]; k++) free(f[k]);
        mmb_linear *ls[] = {&l->q, &l->k, &l->v, &l->o, &l->w1, &l->w2, &l->w3};
        for (size_t k = 0; k < sizeof ls / sizeof ls[0]; k++) mmb__linear_free(ls[k]);
    }
    free(m->ly);
    free(m->query);
    free(m->eos);
    mmb__linear_free(&m->fc);
    mmb__owlvit_free(m->vit);
    free(m);
}

/* MAE's get_1d_sincos_pos_embed_from_grid: row (E) of position p = [sin(p w_i) | cos(p w_i)], w_i = 10000^(-i/(E/2)). */
static void sincos_row(float *row, int64_t E, double p) {
    const int64_t h = E / 2;
    for (int64_t i = 0; i < h; i++) {
        const double w = 1.0 / pow(10000.0, (double)i / (double)h);
        row[i] = (float)sin(p * w);
        row[h + i] = (float)cos(p * w);
    }
}

/* [q_pos ; k_pos] (Q + 1 + G^2, H) into kp, its first Q rows q_pos. */
static void pos_tables(float *kp, int64_t Q, int64_t H, int64_t G) {
    for (int64_t q = 0; q < Q; q++) sincos_row(kp + q * H, H, (double)q);
    memset(kp + Q * H, 0, sizeof(float) * (size_t)H);  /* CLS */
    for (int64_t r = 0; r < G; r++)
        for (int64_t c = 0; c < G; c++) {
            float *row = kp + (Q + 1 + r * G + c) * H;
            sincos_row(row, H / 2, (double)c);
            sincos_row(row + H / 2, H / 2, (double)r);
        }
}

static mmb_status load_layer(mmb_ctx *ctx, const mmb_ckpt *c, owl_state *m, int i, ab_layer *l) {
    const int64_t H = m->H, I = m->inter, Q = m->Q, N = m->N;
    char lp[160], name[224];
    snprintf(lp, sizeof lp, "model.visual_abstractor.encoder.layers.%d.crossattention.", i);
    mmb_status s = mmb__ckpt_norm(ctx, c, lp, "norm1", H, &l->n1_w, &l->n1_b);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, "normk", H, &l->nk_w, &l->nk_b);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, "output.norm2", H, &l->n2_w, &l->n2_b);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, "output.mlp.ffn_ln", I, &l->ffn_w, &l->ffn_b);
    const struct { const char *n; int64_t o, in; mmb_linear *l; } lin[] = {
        {"attention.query", H, H, &l->q}, {"attention.key", H, H, &l->k}, {"attention.value", H, H, &l->v},
        {"output.out_proj", H, H, &l->o}, {"output.mlp.w1", I, H, &l->w1}, {"output.mlp.w2", H, I, &l->w2},
        {"output.mlp.w3", I, H, &l->w3},
    };
    for (size_t k = 0; k < sizeof lin / sizeof lin[0] && s == MMB_OK; k++)
        s = mmb__ckpt_linear(ctx, c, lp, lin[k].n, lin[k].o, lin[k].in, true, lin[k].l);
    if (s != MMB_OK) return s;
    if (!(l->kpos = malloc(sizeof(float) * (size_t)((Q + N) * H))) || !(l->qpos = malloc(sizeof(float) *
                                                                                          (size_t)(Q * H))))
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    snprintf(name, sizeof name, "%sattention.q_pos_embed", lp);
    const bool have_q = mmb__ckpt_find(c, name, NULL) != NULL;
    snprintf(name, sizeof name, "%sattention.k_pos_embed", lp);
    const bool have_k = mmb__ckpt_find(c, name, NULL) != NULL;
    pos_tables(l->kpos, Q, H, m->grid);
    float *t = NULL;
    if (have_q) {  /* the checkpoint's buffers, when it has them */
        const int64_t qs[2] = {Q, H};
        snprintf(name, sizeof name, "%sattention.q_pos_embed", lp);
        if ((s = mmb__ckpt_floats(ctx, c, name, 2, qs, &t)) == MMB_OK) memcpy(l->kpos, t, sizeof(float) * (size_t)(Q * H));
        free(t);
        t = NULL;
    }
    if (s == MMB_OK && have_k) {
        const int64_t ks[2] = {N, H};
        snprintf(name, sizeof name, "%sattention.k_pos_embed", lp);
        if ((s = mmb__ckpt_floats(ctx, c, name, 2, ks, &t)) == MMB_OK)
            memcpy(l->kpos + Q * H, t, sizeof(float) * (size_t)(N * H));
        free(t);
    }
    if (s == MMB_OK) memcpy(l->qpos, l->kpos, sizeof(float) * (size_t)(Q * H));
    return s;
}

static mmb_status read_config(mmb_ctx *ctx, const mmb_ckpt *c, owl_state *m) {
    const char *cp = "visual_config.visual_abstractor.";
    int enc = 0;
    struct { const char *key; int def, lo, hi, *dst; } ints[] = {
        {"num_learnable_queries", 64, 1, 1 << 16, &m->Q},   {"hidden_size", 1024, 1, 1 << 16, &m->H},
        {"num_hidden_layers", 6, 0, 4096, &m->layers},      {"num_attention_heads", 16, 1, 4096, &m->heads},
        {"intermediate_size", 2816, 1, 1 << 20, &m->inter}, {"encoder_hidden_size", 1024, 1, 1 << 16, &enc},
        {"grid_size", 32, 1, 1 << 10, &m->grid},
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
    snprintf(key, sizeof key, "%slayer_norm_eps", cp);
    if (s == MMB_OK) mmb__cfg_num(ctx, c, key, &eps, &s);
    int64_t d = 4096;
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "hidden_size", &d, &s);
    if (s != MMB_OK) return s;
    if (!(eps > 0 && eps < 1))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %slayer_norm_eps %g is out of range", c->dir, cp, eps);
    if (d < 1 || d > (1 << 20))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: hidden_size %lld is out of range", c->dir, (long long)d);
    if (m->H % m->heads || m->H % 4)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %shidden_size %d must be a multiple of "
                        "num_attention_heads %d and of 4 (its 2-D sin-cos table)", c->dir, cp, m->H, m->heads);
    /* the keys read [queries ; image tokens], so the image's width, the encoder's and the queries' agree */
    if (enc != m->H || m->vi.width != m->H)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %sencoder_hidden_size %d and the vision model's "
                        "hidden_size %d must equal the abstractor's hidden_size %d", c->dir, cp, enc, m->vi.width,
                        m->H);
    if ((int64_t)m->grid * m->grid + 1 != m->vi.tokens)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %sgrid_size %d makes a key position table of %lld "
                        "rows, but the vision model gives %lld tokens an image ((image_size / patch_size)^2 + 1)",
                        c->dir, cp, m->grid, (long long)m->grid * m->grid + 1, (long long)m->vi.tokens);
    m->eps = (float)eps;
    m->d_model = d;
    m->N = m->vi.tokens;
    return MMB_OK;
}

static mmb_status owl_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state, mmb_model_info *info) {
    (void)fam;
    owl_state *m = calloc(1, sizeof *m);
    if (!m) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    mmb_status s = mmb__owlvit_load(ctx, c, "visual_config.visual_model.", "model.vision_model.", &m->vit);
    if (s == MMB_OK) {
        m->vi = mmb__owlvit_info(m->vit);
        s = read_config(ctx, c, m);
    }
    const int64_t qs[3] = {1, m->Q, m->H}, es[3] = {1, 1, m->d_model};
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, "model.visual_abstractor.query_embeds", 3, qs, &m->query);
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, "model.visual_abstractor.vit_eos", 3, es, &m->eos);
    if (s == MMB_OK)
        s = mmb__ckpt_linear(ctx, c, "model.visual_abstractor.", "visual_fc", m->d_model, m->H, true, &m->fc);
    if (s == MMB_OK && !(m->ly = calloc((size_t)(m->layers ? m->layers : 1), sizeof *m->ly)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    for (int i = 0; i < m->layers && s == MMB_OK; i++) s = load_layer(ctx, c, m, i, &m->ly[i]);
    const char *aspect = "pad";  /* the original CLI's --image-aspect-ratio default */
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "image_aspect_ratio", &aspect, &s);
    if (s != MMB_OK) {
        owl_free(m);
        return s;
    }
    const int64_t Q = m->Q, H = m->H, K = Q + m->N;
    info->connector = "visual_abstractor";
    info->activation = "silu";
    info->vision_layers = m->vi.layers;
    info->vision_width = m->vi.width;
    info->in_width = m->H;
    info->out_width = (int)m->d_model;
    info->image_size = m->vi.image_size;
    info->patch_size = m->vi.patch;
    info->tokens_per_image = Q + 1;
    info->pad_to_square = strcmp(aspect, "pad") == 0;
    info->params = m->vi.params + Q * H + m->d_model;
    info->flops_per_image = m->vi.flops_per_image;
    mmb__linear_cost(&m->fc, Q, &info->params, &info->flops_per_image);
    for (int i = 0; i < m->layers; i++) {
        const ab_layer *l = &m->ly[i];
        mmb__linear_cost(&l->q, Q, &info->params, &info->flops_per_image);
        mmb__linear_cost(&l->k, K, &info->params, &info->flops_per_image);
        mmb__linear_cost(&l->v, K, &info->params, &info->flops_per_image);
        mmb__linear_cost(&l->o, Q, &info->params, &info->flops_per_image);
        mmb__linear_cost(&l->w1, Q, &info->params, &info->flops_per_image);
        mmb__linear_cost(&l->w3, Q, &info->params, &info->flops_per_image);
        mmb__linear_cost(&l->w2, Q, &info->params, &info->flops_per_image);
        info->params += 6 * H + 2 * m->inter;
        info->flops_per_image += 4 * Q * K * H;
    }
    const mmb_tensor *w = mmb__ckpt_find(c, "model.visual_abstractor.visual_fc.weight", NULL);
    info->weight_dtype = w ? w->dtype : MMB_F32;
    *state = m;
    return MMB_OK;
}

static int64_t owl_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    const owl_state *m = st;
    if (height != m->vi.image_size || width != m->vi.image_size) {
        mmb__err(ctx, MMB_ERR_SHAPE, "pixels of %dx%d: the mPLUG-Owl2 vision model takes %dx%d", width, height,
                 m->vi.image_size, m->vi.image_size);
        return -1;
    }
    return m->Q + 1;
}

/* The abstractor on the tower's output img (B, N, H) -> out (B, Q + 1, d_model). */
static mmb_status abstract(mmb_ctx *ctx, const owl_state *m, const float *img, int64_t B, float *out) {
    const int64_t Q = m->Q, H = m->H, N = m->N, K = Q + N, I = m->inter, D = m->d_model, hd = H / m->heads;
    const size_t f = sizeof(float), sq = f * (size_t)(B * Q * H), sk = f * (size_t)(B * K * H);
    const size_t si = f * (size_t)(B * Q * I), so = f * (size_t)(B * Q * D);
    const size_t asc_n = mmb__attention_scratch(mmb__pool_size(ctx->pool), hd);
    const size_t need = 4 * mmb__arena_piece(sq) + 3 * mmb__arena_piece(sk) + 2 * mmb__arena_piece(si) +
                        mmb__arena_piece(so) + mmb__arena_piece(f * asc_n);
    mmb_status s = mmb__arena_reserve(ctx, &ctx->arena, need);
    if (s != MMB_OK) return s;
    mmb_arena *a = &ctx->arena;
    float *x = mmb__arena_alloc(a, sq), *xn = mmb__arena_alloc(a, sq), *qv = mmb__arena_alloc(a, sq);
    float *att = mmb__arena_alloc(a, sq), *kin = mmb__arena_alloc(a, sk), *kk = mmb__arena_alloc(a, sk);
    float *vv = mmb__arena_alloc(a, sk), *h1 = mmb__arena_alloc(a, si), *h3 = mmb__arena_alloc(a, si);
    float *y = mmb__arena_alloc(a, so), *asc = mmb__arena_alloc(a, f * asc_n);
    for (int64_t b = 0; b < B; b++) memcpy(x + b * Q * H, m->query, f * (size_t)(Q * H));
    for (int i = 0; i < m->layers; i++) {
        const ab_layer *l = &m->ly[i];
        mmb__layernorm_forward_mt(ctx, xn, x, l->n1_w, l->n1_b, B * Q, H, LN_DEFAULT_EPS);
        for (int64_t b = 0; b < B; b++) {
            memcpy(kin + b * K * H, xn + b * Q * H, f * (size_t)(Q * H));
            mmb__layernorm_forward_mt(ctx, kin + (b * K + Q) * H, img + b * N * H, l->nk_w, l->nk_b, N, H,
                                      LN_DEFAULT_EPS);
        }
        mmb__linear_forward(ctx, vv, kin, B * K, &l->v);
        for (int64_t b = 0; b < B; b++) {  /* the keys read the positions, the values not */
            mmb__add_forward_mt(ctx, kin + b * K * H, kin + b * K * H, l->kpos, K * H);
            mmb__add_forward_mt(ctx, att + b * Q * H, xn + b * Q * H, l->qpos, Q * H);
        }
        mmb__linear_forward(ctx, kk, kin, B * K, &l->k);
        mmb__linear_forward(ctx, qv, att, B * Q, &l->q);
        mmb__cross_attention_forward(ctx, att, qv, kk, vv, H, H, B, Q, K, m->heads, m->heads, hd, asc);
        mmb__linear_forward(ctx, x, att, B * Q, &l->o);
        mmb__add_forward_mt(ctx, x, x, xn, B * Q * H);  /* y = xn + out_proj(...) */
        mmb__layernorm_forward_mt(ctx, xn, x, l->n2_w, l->n2_b, B * Q, H, LN_DEFAULT_EPS);
        mmb__linear_forward_act(ctx, h1, xn, B * Q, &l->w1, MMB_ACT_SILU);
        mmb__linear_forward(ctx, h3, xn, B * Q, &l->w3);
        mmb__mul_forward(h1, h1, h3, B * Q * I);
        mmb__layernorm_forward_mt(ctx, h3, h1, l->ffn_w, l->ffn_b, B * Q, I, m->eps);
        mmb__linear_forward(ctx, xn, h3, B * Q, &l->w2);
        mmb__add_forward_mt(ctx, x, x, xn, B * Q * H);
    }
    mmb__linear_forward(ctx, y, x, B * Q, &m->fc);
    for (int64_t b = 0; b < B; b++) {
        memcpy(out + b * (Q + 1) * D, y + b * Q * D, f * (size_t)(Q * D));
        memcpy(out + (b * (Q + 1) + Q) * D, m->eos, f * (size_t)D);
    }
    mmb__arena_reset(a);
    return MMB_OK;
}

static mmb_status owl_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t B, int height, int width,
                             float *out) {
    const owl_state *m = st;
    if (owl_tokens(ctx, st, height, width) < 0) return MMB_ERR_SHAPE;
    uint64_t rows, n;
    if (!mmb__mul_ok((uint64_t)B, (uint64_t)m->N, &rows) || !mmb__mul_ok(rows, (uint64_t)m->H, &n) ||
        n > SIZE_MAX / 64)
        return mmb__err(ctx, MMB_ERR_NOMEM, "mplug_owl2: %lld images: sizes overflow", (long long)B);
    const size_t bytes = sizeof(float) * (size_t)n;
    mmb_status s = mmb__arena_reserve(ctx, &ctx->feats, mmb__arena_piece(bytes));
    float *img = s == MMB_OK ? mmb__arena_alloc(&ctx->feats, bytes) : NULL;
    if (s == MMB_OK) s = mmb__owlvit_forward(ctx, m->vit, pixels, B, height, width, img);
    if (s == MMB_OK) s = abstract(ctx, m, img, B, out);
    mmb__arena_reset(&ctx->feats);
    return s;
}

const mmb_family_ops mmb__family_mplug_owl2 = {
    .load = owl_load,
    .tokens = owl_tokens,
    .encode = owl_encode,
    .free = owl_free,
};
