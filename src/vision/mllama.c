/* Llama 3.2 Vision's tower (transformers' MllamaVisionModel), as MllamaModel runs it before its
 * multi_modal_projector (the mllama family, src/models/mllama.c, runs that after it).
 *
 * Input: one image's real tiles as MllamaImageProcessor makes them and mmb_preprocess_run writes them,
 * [rows * cols, 3, t, t] with t = image_size, the pixels' size rows t x cols t telling the canvas. The model
 * always computes max_num_tiles (T) tiles: the processor pads pixel_values with zero tiles, which are added
 * here. P = (t / patch)^2 + 1 tokens a tile (CLS first), padded to L = P + pad, a multiple of 8.
 *
 *   patch_embedding   Conv2d(3 -> D, kernel = stride = patch, no bias) as a GEMM on im2col rows (a zero tile
 *                     gives zeros)
 *   pre_tile          + tanh(gate) * embedding(aspect_ratio_id)[tile] on the patches (not the CLS, which is
 *                     prepended after it)
 *   class_embedding   token 0 of every tile
 *   gated_positional  + (1 - tanh(gate)) * embedding[patch]; + tanh(gate) * tile_embedding(aspect_ratio_id)
 *                     [tile, patch]
 *   layernorm_pre     (nn.LayerNorm default eps 1e-5); then the pad patches are zeros (F.pad)
 *   transformer       num_hidden_layers pre-norm blocks over all T L tokens of the image at once (one sequence:
 *                     tiles attend to each other), norm_eps; q/k/v/o without bias, MLP with; its layers'
 *                     outputs hidden_states[i] (i = 0: the first layer's output) kept for
 *                     intermediate_layers_indices
 *   layernorm_post    (eps 1e-5), then + tanh(gate) * post_tile embedding(aspect_ratio_id)[tile] on every token
 *   global_transformer  num_global_layers blocks, attention and MLP each scaled by tanh(gate_attn / gate_ffn)
 *   output            the real tiles' P tokens: [final (D) | intermediates interleaved: element d of index k at
 *                     D + d K + k] (torch.stack(dim=-1) then reshape), vision_output_dim = D (1 + K) wide
 *
 * The attention mask (_prepare_aspect_ratio_attention_mask): a token is valid when its tile is real and its
 * patch is not padding; the mask is the outer product of the invalid indicators, times finfo.min, so a
 * score is masked only when both the query and the key are invalid. Valid queries see every key (the padded
 * tiles and patches included); invalid queries see the valid keys only. With no positional term inside the
 * attention the tokens can be reordered: each image keeps its valid tokens first (tile-major, then patch:
 * the output order), then its real tiles' pad patches, then the padded tiles, so the mask is two prefix
 * ranges, run as two calls of the blocked attention without any score being masked:
 *   queries [0, Nv) on keys [0, N);  queries [Nv, N) on keys [0, Nv).
 * Weights: vision_model.* (what save_pretrained writes, the hub files) or model.vision_model.* (the module
 * names). The tile embeddings stay in the checkpoint's mapping: the rows of the image's aspect ratio are
 * converted when it runs. */
#include "vision/vision.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LN_OUTER_EPS 1e-5f  /* layernorm_pre / layernorm_post: nn.LayerNorm(hidden_size), the default eps */

typedef struct {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  /* (D) */
    float *qkv_w;                          /* the stacked copy, while the layer reads it */
    mmb_linear qkv, o, fc1, fc2;           /* (3D, D) no bias, (D, D) no bias, (I, D), (D, I) */
    float gate_attn, gate_ffn;             /* tanh of the gates; 1 for the local layers */
} ml_layer;

struct mmb_mlvit {
    mmb_mlvit_info info;
    char prefix[32];
    mmb_act act;
    mmb_linear patch;              /* (D, 3 p p), no bias */
    float *cls;                    /* (D) */
    float *pos;                    /* (P, D): (1 - tanh(gate)) * gated_positional_embedding.embedding */
    float g_pos, g_pre, g_post;    /* tanh of the gated positional and the two tile embeddings' gates */
    const mmb_tensor *tile_pos;    /* (R + 1, T P D), mapped */
    const mmb_tensor *pre_tile, *post_tile;  /* (R + 1, T D), mapped */
    float *pre_w, *pre_b, *post_w, *post_b;  /* layernorm_pre, layernorm_post (D) */
    ml_layer *layers;              /* local, then global */
};

int mmb__mllama_aspect_id(int max_tiles, int rows, int cols) {
    int id = 0;
    for (int r = 1; r <= max_tiles; r++)
        for (int c = 1; r * c <= max_tiles; c++) {
            id++;
            if (r == rows && c == cols) return id;
        }
    return 0;
}

static int n_ratios(int max_tiles) {
    int n = 0;
    for (int r = 1; r <= max_tiles; r++) n += max_tiles / r;
    return n;
}

void mmb__mlvit_free(mmb_mlvit *v) {
    if (!v) return;
    const int n = v->info.layers + v->info.global_layers;
    for (int i = 0; v->layers && i < n; i++) {
        ml_layer *l = &v->layers[i];
        free(l->ln1_w); free(l->ln1_b); free(l->ln2_w); free(l->ln2_b);
        mmb__linear_free(&l->qkv);
        free(l->qkv_w);
        mmb__linear_free(&l->o);
        mmb__linear_free(&l->fc1);
        mmb__linear_free(&l->fc2);
    }
    free(v->layers);
    mmb__linear_free(&v->patch);
    free(v->cls); free(v->pos);
    free(v->pre_w); free(v->pre_b); free(v->post_w); free(v->post_b);
    free(v);
}

/* MllamaVisionConfig under "vision_config.", with the class's defaults for absent keys. */
static mmb_status read_config(mmb_ctx *ctx, const mmb_ckpt *c, mmb_mlvit *v) {
    mmb_mlvit_info *in = &v->info;
    int out_dim = 0;
    struct { const char *key; int def, lo, hi, *dst; } ints[] = {
        {"hidden_size", 1280, 1, 1 << 16, &in->width},        {"num_hidden_layers", 32, 1, 4096, &in->layers},
        {"num_global_layers", 8, 0, 4096, &in->global_layers}, {"attention_heads", 16, 1, 4096, &in->heads},
        {"intermediate_size", 5120, 1, 1 << 20, &in->inter},  {"image_size", 448, 1, 1 << 14, &in->image_size},
        {"patch_size", 14, 1, 1 << 14, &in->patch},           {"max_num_tiles", 4, 1, 256, &in->max_tiles},
        {"vision_output_dim", 7680, 1, 1 << 24, &out_dim},   {"num_channels", 3, 1, 64, &in->channels},
    };
    mmb_status s = MMB_OK;
    char key[96];
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && s == MMB_OK; i++) {
        int64_t x = ints[i].def;
        snprintf(key, sizeof key, "vision_config.%s", ints[i].key);
        mmb__cfg_int(ctx, c, key, &x, &s);
        if (s == MMB_OK && (x < ints[i].lo || x > ints[i].hi))
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld is out of range (%d..%d)", c->dir, key,
                         (long long)x, ints[i].lo, ints[i].hi);
        *ints[i].dst = (int)x;
    }
    double eps = 1e-5;
    const char *act = "gelu";
    if (s == MMB_OK) mmb__cfg_num(ctx, c, "vision_config.norm_eps", &eps, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "vision_config.hidden_act", &act, &s);
    int idx[MMB_MAX_TAPS] = {3, 7, 15, 23, 30}, n = 5;
    if (s == MMB_OK) mmb__cfg_ints(ctx, c, "vision_config.intermediate_layers_indices", idx, MMB_MAX_TAPS, &n, &s);
    if (s != MMB_OK) return s;
    const cJSON *vc = cJSON_GetObjectItemCaseSensitive(c->config, "vision_config");
    const cJSON *sar = vc ? cJSON_GetObjectItemCaseSensitive(vc, "supported_aspect_ratios") : NULL;
    if (sar && !cJSON_IsNull(sar) && !cJSON_IsArray(sar))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'vision_config.supported_aspect_ratios' is not a list",
                        c->dir);
    in->n_ratios = sar && cJSON_IsArray(sar) ? cJSON_GetArraySize(sar) : 8;  /* max_aspect_ratio_id */
    if (in->channels != 3)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_config.num_channels %d (RGB, 3, is "
                        "supported)", c->dir, in->channels);
    if (in->width % in->heads)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.hidden_size %d is not a multiple of "
                        "attention_heads %d", c->dir, in->width, in->heads);
    if (in->image_size % in->patch)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.image_size %d is not a multiple of "
                        "patch_size %d", c->dir, in->image_size, in->patch);
    if (!(eps > 0 && eps < 1))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.norm_eps %g is out of range", c->dir, eps);
    if (!mmb__act_parse(act, &v->act))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_config.hidden_act '%s' is not supported",
                        c->dir, act);
    const int64_t g = in->image_size / in->patch;
    in->patches = g * g + 1;
    if (in->patches > (1 << 20))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config: %lld patches a tile is too many", c->dir,
                        (long long)in->patches);
    /* g^2 + 1 is 1, 2 or 5 mod 8 (a square is 0, 1 or 4), so there is always padding, and transformers' mask
     * slice attention_mask[:, :, -pad:] never meets pad = 0 (which would mark every token invalid) */
    in->pad = (int)((8 - in->patches % 8) % 8);
    if (n_ratios(in->max_tiles) > in->n_ratios)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config: max_num_tiles %d makes %d aspect ratios "
                        "(the processor's ids), but supported_aspect_ratios has %d", c->dir, in->max_tiles,
                        n_ratios(in->max_tiles), in->n_ratios);
    const int L = in->layers;
    for (int i = 0; i < n; i++) {
        if (idx[i] < -L || idx[i] >= L)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.intermediate_layers_indices[%d] = %d "
                            "is out of range: the transformer has %d layers (its hidden_states %d..%d)", c->dir, i,
                            idx[i], L, -L, L - 1);
        in->inter_idx[i] = idx[i] < 0 ? idx[i] + L : idx[i];
    }
    in->n_inter = n;
    in->out_width = in->width * (1 + n);
    if (out_dim != in->out_width)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.vision_output_dim %d, but hidden_size %d "
                        "times 1 + %d intermediate layers makes %d", c->dir, out_dim, in->width, n, in->out_width);
    in->eps = (float)eps;
    return MMB_OK;
}

/* A [1] gate parameter's tanh. */
static mmb_status gate(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, float *out) {
    float *g = NULL;
    mmb_status s = mmb__ckpt_vec(ctx, c, name, 1, &g);
    if (s == MMB_OK) *out = tanhf(g[0]);
    free(g);
    return s;
}

static mmb_status load_layer(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_mlvit *v, const char *lp, bool gated,
                             ml_layer *l) {
    const int64_t D = v->info.width, I = v->info.inter;
    static const char *const qkv[3] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"};
    char name[160];
    mmb_status s = mmb__ckpt_norm(ctx, c, lp, "input_layernorm", D, &l->ln1_w, &l->ln1_b);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, "post_attention_layernorm", D, &l->ln2_w, &l->ln2_b);
    if (s == MMB_OK) s = mmb__ckpt_linear_fused(ctx, c, lp, qkv, 3, D, D, &l->qkv, &l->qkv_w, NULL);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "self_attn.o_proj", D, D, false, &l->o);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc1", I, D, true, &l->fc1);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc2", D, I, true, &l->fc2);
    l->gate_attn = l->gate_ffn = 1;
    if (gated && s == MMB_OK) {
        snprintf(name, sizeof name, "%sgate_attn", lp);
        s = gate(ctx, c, name, &l->gate_attn);
        snprintf(name, sizeof name, "%sgate_ffn", lp);
        if (s == MMB_OK) s = gate(ctx, c, name, &l->gate_ffn);
    }
    return s;
}

static mmb_status load_weights(mmb_ctx *ctx, const mmb_ckpt *c, mmb_mlvit *v) {
    const mmb_mlvit_info *in = &v->info;
    const int64_t D = in->width, P = in->patches, T = in->max_tiles, R = in->n_ratios + 1;
    const char *p = v->prefix;
    char name[160];
    const mmb_tensor *pw;
    const int64_t pshape[4] = {D, 3, in->patch, in->patch};
    snprintf(name, sizeof name, "%spatch_embedding.weight", p);
    mmb_status s = mmb__ckpt_bind(ctx, c, name, 4, pshape, &pw);
    if (s == MMB_OK) {
        mmb_tensor w2 = *pw;  /* the conv kernel is a (D, 3 p p) matrix in im2col order */
        w2.ndim = 2;
        w2.shape[1] = 3 * (int64_t)in->patch * in->patch;
        s = mmb__linear_bind(ctx, &v->patch, &w2, NULL);
    }
    snprintf(name, sizeof name, "%sclass_embedding", p);
    if (s == MMB_OK) s = mmb__ckpt_vec(ctx, c, name, D, &v->cls);
    const int64_t ps[2] = {P, D}, tps[2] = {R, T * P * D}, ats[2] = {R, T * D};
    snprintf(name, sizeof name, "%sgated_positional_embedding.embedding", p);
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, name, 2, ps, &v->pos);
    snprintf(name, sizeof name, "%sgated_positional_embedding.gate", p);
    if (s == MMB_OK) s = gate(ctx, c, name, &v->g_pos);
    snprintf(name, sizeof name, "%sgated_positional_embedding.tile_embedding.weight", p);
    if (s == MMB_OK) s = mmb__ckpt_bind(ctx, c, name, 2, tps, &v->tile_pos);
    snprintf(name, sizeof name, "%spre_tile_positional_embedding.embedding.weight", p);
    if (s == MMB_OK) s = mmb__ckpt_bind(ctx, c, name, 2, ats, &v->pre_tile);
    snprintf(name, sizeof name, "%spre_tile_positional_embedding.gate", p);
    if (s == MMB_OK) s = gate(ctx, c, name, &v->g_pre);
    snprintf(name, sizeof name, "%spost_tile_positional_embedding.embedding.weight", p);
    if (s == MMB_OK) s = mmb__ckpt_bind(ctx, c, name, 2, ats, &v->post_tile);
    snprintf(name, sizeof name, "%spost_tile_positional_embedding.gate", p);
    if (s == MMB_OK) s = gate(ctx, c, name, &v->g_post);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "layernorm_pre", D, &v->pre_w, &v->pre_b);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "layernorm_post", D, &v->post_w, &v->post_b);
    if (s == MMB_OK) {  /* the gated positional embedding's constant half, once */
        const float k = 1 - v->g_pos;
        for (int64_t i = 0; i < P * D; i++) v->pos[i] *= k;
    }
    const int nl = in->layers + in->global_layers;
    if (s == MMB_OK && !(v->layers = calloc((size_t)nl, sizeof *v->layers)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    for (int i = 0; i < nl && s == MMB_OK; i++) {
        const bool global = i >= in->layers;
        char lp[96];
        snprintf(lp, sizeof lp, "%s%s.layers.%d.", p, global ? "global_transformer" : "transformer",
                 global ? i - in->layers : i);
        s = load_layer(ctx, c, v, lp, global, &v->layers[i]);
    }
    return s;
}

mmb_status mmb__mlvit_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_mlvit **out) {
    mmb_mlvit *v = calloc(1, sizeof *v);
    if (!v) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    static const char *const prefixes[] = {"vision_model.", "model.vision_model."};
    snprintf(v->prefix, sizeof v->prefix, "%s", prefixes[0]);
    for (int i = 1; i >= 0; i--) {
        char name[96];
        snprintf(name, sizeof name, "%spatch_embedding.weight", prefixes[i]);
        if (mmb__ckpt_find(c, name, NULL)) snprintf(v->prefix, sizeof v->prefix, "%s", prefixes[i]);
    }
    v->info.prefix = v->prefix;
    mmb_status s = read_config(ctx, c, v);
    if (s == MMB_OK) s = load_weights(ctx, c, v);
    if (s != MMB_OK) {
        mmb__mlvit_free(v);
        return s;
    }
    /* costs: the patch GEMM of T tiles, then every layer on all T L tokens (the padded tiles are computed too) */
    mmb_mlvit_info *in = &v->info;
    const int64_t D = in->width, I = in->inter, T = in->max_tiles, N = T * (in->patches + in->pad);
    const int64_t g = in->image_size / in->patch;
    in->params = 0;
    in->flops_per_image = 0;
    mmb__linear_cost(&v->patch, T * g * g, &in->params, &in->flops_per_image);
    in->params += D + in->patches * D + v->tile_pos->shape[0] * v->tile_pos->shape[1] +
                  2 * v->pre_tile->shape[0] * v->pre_tile->shape[1] + 4 * D + 3;
    for (int i = 0; i < in->layers + in->global_layers; i++) {
        const ml_layer *l = &v->layers[i];
        mmb__linear_cost(&l->qkv, N, &in->params, &in->flops_per_image);
        mmb__linear_cost(&l->o, N, &in->params, &in->flops_per_image);
        mmb__linear_cost(&l->fc1, N, &in->params, &in->flops_per_image);
        mmb__linear_cost(&l->fc2, N, &in->params, &in->flops_per_image);
        in->params += 4 * D + 2 * (i >= in->layers);
        in->flops_per_image += 4 * N * N * D;  /* q k^T and p v */
    }
    (void)I;
    *out = v;
    return MMB_OK;
}

mmb_mlvit_info mmb__mlvit_info(const mmb_mlvit *v) { return v->info; }

mmb_status mmb__mlvit_canvas(mmb_ctx *ctx, const mmb_mlvit *v, int height, int width, int *rows, int *cols,
                             int *aspect_id) {
    const int t = v->info.image_size, mt = v->info.max_tiles;
    if (height < t || width < t || height % t || width % t)
        return mmb__err(ctx, MMB_ERR_SHAPE, "pixels of %dx%d: Mllama takes its image processor's tiles of %dx%d "
                        "(vision_config.image_size), so a height and width that are multiples of %d", width, height,
                        t, t, t);
    const int r = height / t, c = width / t;
    if ((int64_t)r * c > mt)
        return mmb__err(ctx, MMB_ERR_SHAPE, "pixels of %dx%d are %d rows x %d columns = %lld tiles of %d, more than "
                        "the checkpoint's max_num_tiles %d", width, height, r, c, (long long)r * c, t, mt);
    *rows = r;
    *cols = c;
    *aspect_id = mmb__mllama_aspect_id(mt, r, c);
    return MMB_OK;
}

int64_t mmb__mlvit_tokens(mmb_ctx *ctx, const mmb_mlvit *v, int height, int width) {
    int r = 0, c = 0, id = 0;
    if (mmb__mlvit_canvas(ctx, v, height, width, &r, &c, &id) != MMB_OK) return -1;
    return (int64_t)r * c * v->info.patches;
}

/* ---- forward --------------------------------------------------------------------------------------- */

/* The tile and patch of token i of an image in our order: nv = nt P valid tokens (tile-major), then the nt
 * real tiles' pad patches, then the T - nt padded tiles' L tokens each. */
static void token_pos(int64_t i, int64_t nt, int64_t P, int64_t pad, int64_t *tile, int64_t *patch) {
    const int64_t nv = nt * P, L = P + pad;
    if (i < nv) {
        *tile = i / P;
        *patch = i % P;
    } else if (i < nv + nt * pad) {
        *tile = (i - nv) / pad;
        *patch = P + (i - nv) % pad;
    } else {
        *tile = nt + (i - nv - nt * pad) / L;
        *patch = (i - nv - nt * pad) % L;
    }
}

/* pixels of nt tiles (nt, 3, t, t) -> rows (nt g g, 3 p p): each patch's pixels in (c, ky, kx) order. */
static void im2col(float *rows, const float *px, int64_t nt, int t, int p) {
    const int g = t / p;
    const int64_t P = 3 * (int64_t)p * p;
    for (int64_t k = 0; k < nt; k++)
        for (int gy = 0; gy < g; gy++)
            for (int gx = 0; gx < g; gx++) {
                float *r = rows + ((k * g + gy) * g + gx) * P;
                for (int c = 0; c < 3; c++)
                    for (int ky = 0; ky < p; ky++)
                        memcpy(r + (c * p + ky) * p, px + ((k * 3 + c) * t + gy * p + ky) * (int64_t)t + gx * p,
                               sizeof(float) * (size_t)p);
            }
}

typedef struct {
    float *x;
    const float *y;
    float g;
    int64_t n;
} gadd_job;

static void gadd_fn(void *arg, int tid, int nth) {
    const gadd_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->n, tid, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) j->x[i] += j->g * j->y[i];
}

/* x += g y (g == 1: a plain residual add, as the local layers do it). */
static void gated_add(mmb_ctx *ctx, float *x, const float *y, float g, int64_t n) {
    if (g == 1) {
        mmb__add_forward_mt(ctx, x, x, y, n);
        return;
    }
    gadd_job j = {x, y, g, n};
    mmb__pool_run(ctx->pool, gadd_fn, &j);
}

typedef struct {
    int64_t B, N, nv;     /* images, tokens an image, valid tokens an image */
    float *xn, *qkv, *att, *h, *asc;
} ml_bufs;

/* One encoder layer on x (B N, D), in place. */
static void layer_forward(mmb_ctx *ctx, const mmb_mlvit *v, const ml_layer *l, float *x, const ml_bufs *b) {
    const mmb_mlvit_info *in = &v->info;
    const int64_t D = in->width, rows = b->B * b->N, hd = D / in->heads, N = b->N, nv = b->nv;
    mmb__layernorm_forward_mt(ctx, b->xn, x, l->ln1_w, l->ln1_b, rows, D, in->eps);
    mmb__linear_forward(ctx, b->qkv, b->xn, rows, &l->qkv);
    for (int64_t i = 0; i < b->B; i++) {
        const float *q = b->qkv + i * N * 3 * D, *k = q + D, *val = q + 2 * D;
        float *o = b->att + i * N * D;
        /* valid queries on every key; the others on the valid keys */
        mmb__cross_attention_forward(ctx, o, q, k, val, 3 * D, 3 * D, 1, nv, N, in->heads, in->heads, hd, b->asc);
        if (N > nv)
            mmb__cross_attention_forward(ctx, o + nv * D, q + nv * 3 * D, k, val, 3 * D, 3 * D, 1, N - nv, nv,
                                         in->heads, in->heads, hd, b->asc);
    }
    mmb__linear_forward(ctx, b->xn, b->att, rows, &l->o);
    gated_add(ctx, x, b->xn, l->gate_attn, rows * D);
    mmb__layernorm_forward_mt(ctx, b->xn, x, l->ln2_w, l->ln2_b, rows, D, in->eps);
    mmb__linear_forward_act(ctx, b->h, b->xn, rows, &l->fc1, v->act);
    mmb__linear_forward(ctx, b->xn, b->h, rows, &l->fc2);
    gated_add(ctx, x, b->xn, l->gate_ffn, rows * D);
}

/* Row `id` of an embedding table (R, n) kept in the mapping, in f32, times g. */
static void table_row(float *dst, const mmb_tensor *t, int id, float g) {
    const int64_t n = t->shape[1];
    mmb_to_f32(dst, (const char *)t->data + (size_t)id * (size_t)n * mmb_dtype_size(t->dtype), t->dtype, (size_t)n);
    for (int64_t i = 0; i < n; i++) dst[i] *= g;
}

mmb_status mmb__mlvit_forward(mmb_ctx *ctx, const mmb_mlvit *v, const float *pixels, int64_t B, int height, int width,
                              bool all_tiles, float *out) {
    int rows_c = 0, cols_c = 0, aid = 0;
    mmb_status s = mmb__mlvit_canvas(ctx, v, height, width, &rows_c, &cols_c, &aid);
    if (s != MMB_OK) return s;
    const mmb_mlvit_info *in = &v->info;
    const int64_t D = in->width, I = in->inter, P = in->patches, pad = in->pad, L = P + pad, T = in->max_tiles;
    const int64_t nt = (int64_t)rows_c * cols_c, N = T * L, nv = nt * P, K = in->n_inter, W = in->out_width;
    const int64_t g = in->image_size / in->patch, PP = 3 * (int64_t)in->patch * in->patch, npatch = B * nt * g * g;
    const int64_t hd = D / in->heads;
    /* every buffer is at most rows x wide floats (the intermediates: K D < W; the tables: T P D) */
    int64_t wide = I > 3 * D ? I : 3 * D;
    wide = wide > W ? wide : W;
    wide = wide > PP ? wide : PP;
    uint64_t rows, n_big;
    if (!mmb__mul_ok((uint64_t)B, (uint64_t)N, &rows) || !mmb__mul_ok(rows, (uint64_t)wide, &n_big) ||
        n_big > SIZE_MAX / 64)
        return mmb__err(ctx, MMB_ERR_NOMEM, "mllama: %lld images of %dx%d: sizes overflow", (long long)B, width,
                        height);
    const size_t f = sizeof(float);
    const size_t sz_cols = f * (size_t)(npatch * (PP > D ? PP : D)), sz_x = f * (size_t)rows * (size_t)D;
    const int64_t np = all_tiles ? (T - nt) * P : 0;  /* the padding tiles' tokens an image, when asked */
    const size_t sz_inter = f * (size_t)(B * nv * D) * (size_t)K, sz_tab = f * (size_t)(T * P * D + 2 * T * D);
    const size_t sz_interp = f * (size_t)(B * np * D) * (size_t)K;
    const size_t asc_n = mmb__attention_scratch(mmb__pool_size(ctx->pool), hd);
    size_t need = 2 * mmb__arena_piece(sz_cols) + 3 * mmb__arena_piece(sz_x) +
                  mmb__arena_piece(f * (size_t)rows * (size_t)(3 * D)) +
                  mmb__arena_piece(f * (size_t)rows * (size_t)I) + mmb__arena_piece(sz_inter) +
                  mmb__arena_piece(sz_interp) + mmb__arena_piece(sz_tab) + mmb__arena_piece(f * asc_n);
    if ((s = mmb__arena_reserve(ctx, &ctx->arena, need)) != MMB_OK) return s;
    mmb_arena *a = &ctx->arena;
    float *cols = mmb__arena_alloc(a, sz_cols), *pe = mmb__arena_alloc(a, sz_cols);
    float *x = mmb__arena_alloc(a, sz_x);
    ml_bufs bf = {.B = B, .N = N, .nv = nv, .xn = mmb__arena_alloc(a, sz_x), .att = mmb__arena_alloc(a, sz_x),
                  .qkv = mmb__arena_alloc(a, f * (size_t)rows * (size_t)(3 * D)),
                  .h = mmb__arena_alloc(a, f * (size_t)rows * (size_t)I)};
    float *inter = mmb__arena_alloc(a, sz_inter), *interp = mmb__arena_alloc(a, sz_interp);
    float *tab = mmb__arena_alloc(a, sz_tab);
    bf.asc = mmb__arena_alloc(a, f * asc_n);
    float *tile_pos = tab, *pre = tab + T * P * D, *post = pre + T * D;
    table_row(tile_pos, v->tile_pos, aid, v->g_pos);
    table_row(pre, v->pre_tile, aid, v->g_pre);
    table_row(post, v->post_tile, aid, v->g_post);

    /* the patches of the real tiles; the padded tiles' are zeros */
    im2col(cols, pixels, B * nt, in->image_size, in->patch);
    mmb__linear_forward(ctx, pe, cols, npatch, &v->patch);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < N; i++) {
            int64_t tile, patch;
            token_pos(i, nt, P, pad, &tile, &patch);
            float *r = x + (b * N + i) * D;
            if (patch >= P) continue;  /* a pad patch: zeros after layernorm_pre */
            if (patch == 0) {
                memcpy(r, v->cls, f * (size_t)D);
            } else {
                const float *e = tile < nt ? pe + ((b * nt + tile) * g * g + patch - 1) * D : NULL;
                const float *pt = pre + tile * D;
                for (int64_t d = 0; d < D; d++) r[d] = (e ? e[d] : 0.0f) + pt[d];
            }
            const float *pp = v->pos + patch * D, *tp = tile_pos + (tile * P + patch) * D;
            for (int64_t d = 0; d < D; d++) r[d] += pp[d];
            for (int64_t d = 0; d < D; d++) r[d] += tp[d];
        }
    mmb__layernorm_forward_mt(ctx, bf.xn, x, v->pre_w, v->pre_b, (int64_t)rows, D, LN_OUTER_EPS);
    memcpy(x, bf.xn, sz_x);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = nv; i < N; i++) {
            int64_t tile, patch;
            token_pos(i, nt, P, pad, &tile, &patch);
            if (patch >= P) memset(x + (b * N + i) * D, 0, f * (size_t)D);
        }

    for (int l = 0; l < in->layers; l++) {
        layer_forward(ctx, v, &v->layers[l], x, &bf);
        for (int64_t k = 0; k < K; k++)  /* hidden_states[l] for the intermediate indices: the valid rows */
            if (in->inter_idx[k] == l)
                for (int64_t b = 0; b < B; b++) {
                    memcpy(inter + (k * B + b) * nv * D, x + b * N * D, f * (size_t)(nv * D));
                    for (int64_t j = 0; j < np; j++) {  /* and the padding tiles' first P tokens */
                        const float *src = x + (b * N + nv + nt * pad + j / P * L + j % P) * D;
                        memcpy(interp + ((k * B + b) * np + j) * D, src, f * (size_t)D);
                    }
                }
    }
    mmb__layernorm_forward_mt(ctx, bf.xn, x, v->post_w, v->post_b, (int64_t)rows, D, LN_OUTER_EPS);
    memcpy(x, bf.xn, sz_x);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < N; i++) {
            int64_t tile, patch;
            token_pos(i, nt, P, pad, &tile, &patch);
            mmb__add_forward(x + (b * N + i) * D, x + (b * N + i) * D, post + tile * D, D);
        }
    for (int l = in->layers; l < in->layers + in->global_layers; l++) layer_forward(ctx, v, &v->layers[l], x, &bf);

    /* out (B nv, W): [final | intermediate k's element d at D + d K + k]; all_tiles: (B T P, W), the padding
     * tiles' P tokens after the real ones */
    const int64_t per = all_tiles ? T * P : nv;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < per; i++) {
            float *o = out + (b * per + i) * W;
            /* token i of the output: a valid one, or patch (i - nv) % P of padding tile nt + (i - nv) / P */
            const int64_t src_i = i < nv ? i : nv + nt * pad + (i - nv) / P * L + (i - nv) % P;
            memcpy(o, x + (b * N + src_i) * D, f * (size_t)D);
            for (int64_t k = 0; k < K; k++) {
                const float *src = i < nv ? inter + ((k * B + b) * nv + i) * D
                                          : interp + ((k * B + b) * (per - nv) + (i - nv)) * D;
                for (int64_t d = 0; d < D; d++) o[D + d * K + k] = src[d];
            }
        }
    mmb__arena_reset(a);
    return MMB_OK;
}
