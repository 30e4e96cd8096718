/* Fusion type A: gated cross-attention layers between the decoder's layers, attending from the text to the
 * visual tokens, run through the decoder's before_layer hooks (lm.h, mmb_lm_hook). Two variants, one network:
 *
 *   IDEFICS      IdeficsGatedCrossAttentionLayer (transformers models/idefics/modeling_idefics.py), before
 *                decoder layer l when l % cross_layer_interval == 0, weights
 *                model.gated_cross_attn_layers.{l / interval}.*:
 *                  h = RMSNorm(x); q = h Wq (qk_layer_norms: RMSNorm over each head's channels, k likewise)
 *                  a = Wo softmax(q k^T / sqrt(hd)) v over the images the position sees; 0 where it sees none
 *                      (cross_attention_gate)
 *                  x += tanh(alpha_cross_attn) a;  x += tanh(alpha_dense) down(silu(gate(h2)) * up(h2)),
 *                  h2 = RMSNorm(x)                  (alpha_type "float": one gate, "vector": one per channel)
 *   OpenFlamingo GatedCrossAttentionBlock + MaskedCrossAttention (open_flamingo/src/helpers.py), before
 *                decoder layer l when (l + 1) % cross_attn_every_n_layers == 0, weights
 *                lang_encoder.gated_cross_attn_layers.{l}.*:
 *                  q = LN(x) Wq; [k | v] = media Wkv; heads xattn_heads x xattn_dim_head
 *                  a = Wout softmax(q k^T / sqrt(dh)) v over the images the position sees
 *                  x += tanh(attn_gate) a;  x += tanh(ff_gate) W3 gelu(W1 LN2(x))     (LN eps 1e-5, exact GELU)
 *   Mllama       MllamaCrossAttentionDecoderLayer (transformers models/mllama/modeling_mllama.py): it REPLACES
 *                the decoder layers at text_config.cross_attention_layers (the decoder skips their steps),
 *                weights {prefix}layers.{l}.*: IDEFICS' shape with GQA (num_key_value_heads), q_norm / k_norm
 *                RMSNorms over head_dim, scalar gates cross_attn_attn_gate / cross_attn_mlp_gate; K/V read the
 *                projector's output (text width). An image's visual tokens are its max_num_tiles tiles, of
 *                which text attends the real ones only (cross_attention_mask); a position that sees no image
 *                (full_text_row_masked_out_mask) attends every visual token of every image unmasked (the
 *                reference multiplies its mask by that row mask) and skips the MLP; with no image at all the
 *                layer is skipped (MllamaTextModel's `continue`).
 *
 * Which images a position sees follows the reference's masks: text_time = the image tokens up to and
 * including the position. IDEFICS' processor: the latest image only, none before the first and none after
 * the end-of-document token until the next image. OpenFlamingo: the latest image (only_attend_immediate_media;
 * none before the first: attention zeroed) or every image so far; a position before the first image in the
 * second mode has every score masked to the same -max, so its softmax is uniform over all the media, which
 * it then reads (kept: that is the reference). The cross-attention has no RoPE and no causal mask.
 * The visual keys and values are computed once, when the images are added, and kept in head-major
 * layout (heads, tokens, head_dim) per layer, so each query row reads contiguous keys (mmb__lm_attend).
 * The MLP half applies to every position, images or not: a position that sees no image is the plain LLM
 * only when the MLP gate is 0 as well. */
#include "lm/lm.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { XA_IDEFICS, XA_FLAMINGO, XA_MLLAMA };

typedef struct xa_block {
    int layer;                  /* the decoder layer it runs before */
    mmb_wmat q, k, v, o;        /* (inner, d), (inner, vis) x 2, (d, inner); OpenFlamingo's to_kv is k and v */
    mmb_wmat f1, f2, f3;        /* IDEFICS: gate (ff, d), down (d, ff), up (ff, d); OpenFlamingo: ff.1, ff.3, - */
    float *n1w, *n1b, *n2w, *n2b; /* the two norms (d): RMSNorm weights (IDEFICS) or LayerNorm weight, bias */
    float *qn, *kn;             /* IDEFICS' qk_layer_norms (hd), or NULL */
    float *ga, *gf;             /* tanh of the attention and MLP gates, (d) each */
    float *K, *V;               /* the media's keys and values, (KVH, ntok, hd) */
} xa_block;

struct mmb__xattn {
    mmb_lm *lm;
    int kind;
    int64_t d, H, KVH, hd, inner, kvin, ff, vis, T; /* T: the nominal tokens per image (costs) */
    float eps;                  /* the norms' eps: rms_norm_eps, or LayerNorm's 1e-5 */
    bool qk_norm, immediate, vector_gates;
    int32_t image_token, eod_token;
    int nb;
    xa_block *b;
    int64_t n_img, img_cap;
    int64_t *off, *vis_tok;     /* image k: tokens [off[k], off[k + 1]) of the media, the first vis_tok[k] attended */
    /* per position: the images it sees, [lo, hi) (lo == hi: none), the images seen so far (text_time) and flags:
     * 1 = an eod has been seen since the last image, 2 = the position is an image token */
    int32_t *lo, *hi, *cnt;
    unsigned char *flag;
    int64_t fed, pos_cap;
    float *buf;                 /* the hook's activations */
    size_t buf_cap;
};

/* ---- loading ------------------------------------------------------------------------------------ */

static mmb_status bind_vec(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n,
                           float **out) {
    char nm[512];
    snprintf(nm, sizeof nm, "%s%s", prefix, name);
    return mmb__ckpt_vec(ctx, c, nm, n, out);
}

/* A gate: shape [1] (a float) or [1, 1, d] (a vector), as tanh into a (d) array. */
static mmb_status bind_gate(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t d,
                            bool vector, float **out) {
    char nm[512];
    snprintf(nm, sizeof nm, "%s%s", prefix, name);
    const mmb_tensor *t;
    int64_t shape[3] = {1, 1, d}, one[1] = {1};
    mmb_status s = vector ? mmb__ckpt_bind(ctx, c, nm, 3, shape, &t) : mmb__ckpt_bind(ctx, c, nm, 1, one, &t);
    if (s != MMB_OK) {
        char why[MMB_ERRMSG_LEN];
        snprintf(why, sizeof why, "%s", mmb_ctx_error(ctx));
        return mmb__err(ctx, s, "%s (a gate of alpha_type '%s' is [%s])", why, vector ? "vector" : "float",
                        vector ? "1, 1, hidden_size" : "1");
    }
    float *g = malloc(sizeof(float) * (size_t)d), v;
    if (!g) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t i = 0; i < d; i++) {
        mmb_to_f32(&v, (const unsigned char *)t->data + (vector ? (size_t)i * mmb_dtype_size(t->dtype) : 0), t->dtype,
                   1);
        g[i] = tanhf(v);
    }
    *out = g;
    return MMB_OK;
}

/* {prefix}{name}.weight [n, k], with the message a K/V width other than the vision side's deserves. */
static mmb_status bind_mat(mmb_ctx *ctx, mmb__xattn *x, const char *prefix, const char *name, int64_t n, int64_t k,
                           bool visual, mmb_wmat *w) {
    char nm[512];
    snprintf(nm, sizeof nm, "%s%s.weight", prefix, name);
    const mmb_ckpt *c = mmb__lm_ckpt(x->lm);
    const mmb_tensor *t = mmb__ckpt_find(c, nm, NULL);
    if (visual && t && t->ndim == 2 && t->shape[1] != k)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%s' reads %lld-wide visual tokens, but the vision side "
                        "makes %lld-wide ones", c->dir, nm, (long long)t->shape[1], (long long)k);
    return mmb__lm_bind(ctx, x->lm, nm, n, k, w);
}

static mmb_status load_block(mmb_ctx *ctx, mmb__xattn *x, xa_block *b, const char *prefix) {
    const mmb_ckpt *c = mmb__lm_ckpt(x->lm);
    const int64_t d = x->d, in = x->inner, kin = x->kvin, vis = x->vis;
    const bool ml = x->kind == XA_MLLAMA;
    mmb_status s;
    if (x->kind != XA_FLAMINGO) {
        char p[256];
        snprintf(p, sizeof p, "%scross_attn.", prefix);
        s = bind_mat(ctx, x, p, "q_proj", in, d, false, &b->q);
        if (s == MMB_OK) s = bind_mat(ctx, x, p, "k_proj", kin, vis, true, &b->k);
        if (s == MMB_OK) s = bind_mat(ctx, x, p, "v_proj", kin, vis, true, &b->v);
        if (s == MMB_OK) s = bind_mat(ctx, x, p, "o_proj", d, in, false, &b->o);
        if (s == MMB_OK && x->qk_norm) s = bind_vec(ctx, c, p, ml ? "q_norm.weight" : "q_layer_norm.weight", x->hd,
                                                    &b->qn);
        if (s == MMB_OK && x->qk_norm) s = bind_vec(ctx, c, p, ml ? "k_norm.weight" : "k_layer_norm.weight", x->hd,
                                                    &b->kn);
        snprintf(p, sizeof p, "%smlp.", prefix);
        if (s == MMB_OK) s = bind_mat(ctx, x, p, "gate_proj", x->ff, d, false, &b->f1);
        if (s == MMB_OK) s = bind_mat(ctx, x, p, "down_proj", d, x->ff, false, &b->f2);
        if (s == MMB_OK) s = bind_mat(ctx, x, p, "up_proj", x->ff, d, false, &b->f3);
        if (s == MMB_OK) s = bind_vec(ctx, c, prefix, "input_layernorm.weight", d, &b->n1w);
        if (s == MMB_OK) s = bind_vec(ctx, c, prefix, "post_attention_layernorm.weight", d, &b->n2w);
        if (s == MMB_OK)
            s = bind_gate(ctx, c, prefix, ml ? "cross_attn_attn_gate" : "alpha_cross_attn", d, x->vector_gates, &b->ga);
        if (s == MMB_OK)
            s = bind_gate(ctx, c, prefix, ml ? "cross_attn_mlp_gate" : "alpha_dense", d, x->vector_gates, &b->gf);
        return s;
    }
    char p[256];
    snprintf(p, sizeof p, "%sattn.", prefix);
    mmb_wmat kv;
    s = bind_mat(ctx, x, p, "to_q", in, d, false, &b->q);
    if (s == MMB_OK) s = bind_mat(ctx, x, p, "to_kv", 2 * in, vis, true, &kv);
    if (s == MMB_OK) s = bind_mat(ctx, x, p, "to_out", d, in, false, &b->o);
    if (s == MMB_OK) s = bind_vec(ctx, c, p, "norm.weight", d, &b->n1w);
    if (s == MMB_OK) s = bind_vec(ctx, c, p, "norm.bias", d, &b->n1b);
    if (s == MMB_OK) s = bind_vec(ctx, c, prefix, "ff.0.weight", d, &b->n2w);
    if (s == MMB_OK) s = bind_vec(ctx, c, prefix, "ff.0.bias", d, &b->n2b);
    snprintf(p, sizeof p, "%sff.", prefix);
    if (s == MMB_OK) s = bind_mat(ctx, x, p, "1", x->ff, d, false, &b->f1);
    if (s == MMB_OK) s = bind_mat(ctx, x, p, "3", d, x->ff, false, &b->f2);
    if (s == MMB_OK) s = bind_gate(ctx, c, prefix, "attn_gate", d, false, &b->ga);
    if (s == MMB_OK) s = bind_gate(ctx, c, prefix, "ff_gate", d, false, &b->gf);
    if (s == MMB_OK) { /* to_kv's rows: the keys' inner, then the values' */
        b->k = b->v = (mmb_wmat){kv.data, kv.dtype, in, vis};
        b->v.data = (const unsigned char *)kv.data + (size_t)(in * vis) * mmb_dtype_size(kv.dtype);
    }
    return s;
}

/* The settings of `kind` from the checkpoint's config. */
static mmb_status read_config(mmb_ctx *ctx, mmb__xattn *x, int *every) {
    const mmb_ckpt *c = mmb__lm_ckpt(x->lm);
    mmb_lm_info li;
    mmb_lm_get_info(x->lm, &li);
    mmb_status s = MMB_OK;
    int64_t ev = 1;
    x->d = li.d_model;
    x->KVH = 0;
    if (x->kind == XA_MLLAMA) { /* the text config's shapes; the layers are the decoder's replaced ones */
        x->qk_norm = true;
        x->eps = (float)li.rms_eps;
        x->H = li.heads;
        x->KVH = li.kv_heads;
        x->hd = li.head_dim;
        x->inner = x->H * x->hd;
        x->ff = li.intermediate;
        if (li.n_replaced < 1)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: an Mllama text model without cross_attention_layers",
                            c->dir);
        x->kvin = x->KVH * x->hd;
        *every = 0;
        return MMB_OK;
    }
    if (x->kind == XA_IDEFICS) {
        const char *alpha = "float", *act = "silu";
        double eps = 1e-6;
        bool qk = false;
        mmb__cfg_int(ctx, c, "cross_layer_interval", &ev, &s);
        if (s == MMB_OK) mmb__cfg_bool(ctx, c, "qk_layer_norms", &qk, &s);
        if (s == MMB_OK) mmb__cfg_str(ctx, c, "alpha_type", &alpha, &s);
        if (s == MMB_OK) mmb__cfg_str(ctx, c, "hidden_act", &act, &s);
        if (s == MMB_OK) mmb__cfg_num(ctx, c, "rms_norm_eps", &eps, &s);
        if (s != MMB_OK) return s;
        if (strcmp(alpha, "float") != 0 && strcmp(alpha, "vector") != 0)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: alpha_type '%s' is neither 'float' nor 'vector'",
                            c->dir, alpha);
        if (strcmp(act, "silu") != 0)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: hidden_act '%s': the gated MLP is SwiGLU (silu)",
                            c->dir, act);
        x->qk_norm = qk;
        x->vector_gates = strcmp(alpha, "vector") == 0;
        x->eps = (float)eps;
        x->H = li.heads;
        x->hd = li.d_model / li.heads;
        x->inner = x->H * x->hd;
        x->ff = li.intermediate;
        if (x->inner != li.d_model)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: hidden_size %lld is not a multiple of "
                            "num_attention_heads %lld", c->dir, (long long)li.d_model, (long long)li.heads);
    } else {
        int64_t heads = 8, dh = 64;
        double mult = 4;
        bool imm = true;
        mmb__cfg_int(ctx, c, "cross_attn_every_n_layers", &ev, &s);
        if (s == MMB_OK) mmb__cfg_bool(ctx, c, "only_attend_immediate_media", &imm, &s);
        if (s == MMB_OK) mmb__cfg_int(ctx, c, "xattn_heads", &heads, &s);
        if (s == MMB_OK) mmb__cfg_int(ctx, c, "xattn_dim_head", &dh, &s);
        if (s == MMB_OK) mmb__cfg_num(ctx, c, "xattn_ff_mult", &mult, &s);
        if (s != MMB_OK) return s;
        if (heads < 1 || dh < 1 || heads * dh > (1 << 20) || !(mult > 0) || mult * (double)x->d > (1 << 22))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: bad cross-attention shape: xattn_heads %lld, "
                            "xattn_dim_head %lld, xattn_ff_mult %g", c->dir, (long long)heads, (long long)dh, mult);
        x->immediate = imm;
        x->eps = 1e-5f;
        x->H = heads;
        x->hd = dh;
        x->inner = heads * dh;
        x->ff = (int64_t)((double)x->d * mult); /* int(dim * mult), as FeedForward does */
    }
    if (ev < 1 || ev > li.layers)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %s %lld: must be in [1, %lld] (the decoder's layers)",
                        c->dir, x->kind == XA_IDEFICS ? "cross_layer_interval" : "cross_attn_every_n_layers",
                        (long long)ev, (long long)li.layers);
    x->KVH = x->H;
    x->kvin = x->inner;
    *every = (int)ev;
    return MMB_OK;
}

static mmb_status hook(mmb_ctx *ctx, void *user, int layer, float *xs, int64_t n, int64_t pos0);

void mmb__xattn_free(mmb_ctx *ctx, mmb__xattn *x) {
    if (!x) return;
    if (x->lm) mmb__lm_set_hooks(ctx, x->lm, NULL);
    for (int i = 0; x->b && i < x->nb; i++) {
        xa_block *b = &x->b[i];
        float *f[] = {b->n1w, b->n1b, b->n2w, b->n2b, b->qn, b->kn, b->ga, b->gf, b->K, b->V};
        for (size_t k = 0; k < sizeof f / sizeof f[0]; k++) free(f[k]);
    }
    free(x->b);
    free(x->off);
    free(x->vis_tok);
    free(x->lo);
    free(x->hi);
    free(x->cnt);
    free(x->flag);
    free(x->buf);
    free(x);
}

mmb_status mmb__xattn_open(mmb_ctx *ctx, mmb_lm *lm, const char *kind, int64_t vis_dim, int64_t tokens_per_image,
                           int32_t image_token, int32_t eod_token, mmb__xattn **out) {
    if (!ctx || !lm || !kind || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb__xattn_open: NULL argument");
    int k = strcmp(kind, "idefics") == 0 ? XA_IDEFICS : strcmp(kind, "open_flamingo") == 0 ? XA_FLAMINGO
          : strcmp(kind, "mllama") == 0 ? XA_MLLAMA : -1;
    if (k < 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "gated cross-attention of kind '%s' (idefics, open_flamingo, mllama)",
                        kind);
    if (vis_dim < 1 || vis_dim > (1 << 20) || tokens_per_image < 1 || tokens_per_image > (1 << 20))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__xattn_open: visual width %lld, %lld tokens per image",
                        (long long)vis_dim, (long long)tokens_per_image);
    mmb__xattn *x = calloc(1, sizeof *x);
    if (!x) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    x->lm = lm;
    x->kind = k;
    x->vis = vis_dim;
    x->T = tokens_per_image;
    x->image_token = image_token;
    x->eod_token = k == XA_IDEFICS ? eod_token : -1;
    mmb_lm_info li;
    mmb_lm_get_info(lm, &li);
    int every = 1;
    mmb_status s = read_config(ctx, x, &every);
    mmb_lm_hook *hooks = NULL;
    if (s == MMB_OK) {
        x->b = calloc((size_t)li.layers, sizeof *x->b);
        hooks = calloc((size_t)li.layers, sizeof *hooks);
        if (!x->b || !hooks) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    }
    for (int l = 0; s == MMB_OK && l < li.layers; l++) {
        bool here = k == XA_MLLAMA ? mmb__lm_replaced(lm, l) : k == XA_IDEFICS ? l % every == 0 : (l + 1) % every == 0;
        if (!here) continue;
        char prefix[160];
        if (k == XA_IDEFICS) snprintf(prefix, sizeof prefix, "model.gated_cross_attn_layers.%d.", l / every);
        else if (k == XA_FLAMINGO) snprintf(prefix, sizeof prefix, "lang_encoder.gated_cross_attn_layers.%d.", l);
        else snprintf(prefix, sizeof prefix, "%slayers.%d.", li.prefix, l);
        xa_block *b = &x->b[x->nb++];
        b->layer = l;
        s = load_block(ctx, x, b, prefix);
        hooks[l] = (mmb_lm_hook){.before_layer = hook, .user = x};
    }
    if (s == MMB_OK) s = mmb__lm_set_hooks(ctx, lm, hooks);
    free(hooks);
    if (s != MMB_OK) {
        x->lm = NULL; /* the hooks were not installed */
        mmb__xattn_free(ctx, x);
        return s;
    }
    *out = x;
    return MMB_OK;
}

/* ---- media and positions ------------------------------------------------------------------------- */

void mmb__xattn_clear(mmb__xattn *x) {
    if (!x) return;
    x->n_img = 0;
    x->fed = 0;
}

int64_t mmb__xattn_images(const mmb__xattn *x) { return x ? x->n_img : 0; }

/* The visual tokens of every image added. */
static int64_t media_tokens(const mmb__xattn *x) { return x->n_img ? x->off[x->n_img] : 0; }

/* The K/V job: keys and values of M rows of the media, one layer, then the key norm (IDEFICS' qk_layer_norms,
 * Mllama's k_norm), into the layer's head-major arrays at token dst. */
typedef struct kv_job {
    const mmb__xattn *x;
    mmb_pool *pool;
    const xa_block *b;
    const float *media;         /* the piece's first row */
    int64_t M, dst, ntok;       /* rows of this piece, where they land, tokens of the arrays */
    float *tmp;                 /* (M, 2 * kvin): [k | v] rows */
    mmb_barrier bar;
} kv_job;

static void kv_worker(void *arg, int tid, int nth) {
    kv_job *j = arg;
    const mmb__xattn *x = j->x;
    const xa_block *b = j->b;
    const int64_t kin = x->kvin, hd = x->hd, KVH = x->KVH;
    float *scr = mmb__pool_scratch(j->pool, tid, sizeof(float) * mmb__wmat_scratch(j->M, x->vis));
    mmb_wmat_out o[2] = {{&b->k, NULL, j->tmp, 2 * kin}, {&b->v, NULL, j->tmp + kin, 2 * kin}};
    if (scr) mmb__wmat_share(tid, nth, j->media, x->vis, j->M, o, 2, 0, scr);
    mmb__barrier_wait(&j->bar);
    int64_t lo, hi;
    mmb__split(j->M * KVH, tid, nth, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) {
        int64_t r = it / KVH, h = it % KVH, at = (h * j->ntok + j->dst + r) * hd;
        const float *ks = j->tmp + r * 2 * kin + h * hd;
        if (b->kn) mmb__rmsnorm_forward(b->K + at, ks, b->kn, 1, hd, x->eps);
        else memcpy(b->K + at, ks, sizeof(float) * (size_t)hd);
        memcpy(b->V + at, ks + kin, sizeof(float) * (size_t)hd);
    }
}

/* Every thread's pool scratch of `floats`: false when one cannot be had (checked before a job relies on it). */
static bool scratch_ok(mmb_pool *pool, size_t floats) {
    for (int t = 0; t < mmb__pool_size(pool); t++)
        if (!mmb__pool_scratch(pool, t, sizeof(float) * floats)) return false;
    return true;
}

mmb_status mmb__xattn_add_media(mmb_ctx *ctx, mmb__xattn *x, const float *media, int64_t tokens, int64_t attended) {
    if (!ctx || !x || !media || tokens < 1 || attended < 1 || attended > tokens)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__xattn_add_media: NULL media, or %lld tokens of which %lld attended",
                        (long long)tokens, (long long)attended);
    const int64_t old = media_tokens(x), ntok = old + tokens, KVH = x->KVH, hd = x->hd, piece = 256;
    if (ntok > (1 << 24)) return mmb__err(ctx, MMB_ERR_NOMEM, "%lld visual tokens are too many", (long long)ntok);
    if (x->n_img + 2 > x->img_cap) {
        int64_t cap = 2 * x->img_cap + 8;
        int64_t *o = realloc(x->off, sizeof *o * (size_t)cap);
        if (o) x->off = o;
        int64_t *v = o ? realloc(x->vis_tok, sizeof *v * (size_t)cap) : NULL;
        if (!v) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        x->vis_tok = v;
        x->img_cap = cap;
    }
    /* the new arrays first (nothing changes when one cannot be had), then the old tokens moved in */
    float **nk = calloc((size_t)x->nb * 2 + 1, sizeof *nk);
    bool ok = nk != NULL;
    for (int i = 0; ok && i < 2 * x->nb; i++) ok = (nk[i] = malloc(sizeof(float) * (size_t)(KVH * ntok * hd))) != NULL;
    float *tmp = ok ? malloc(sizeof(float) * (size_t)(piece * 2 * x->kvin)) : NULL;
    if (!tmp || !scratch_ok(ctx->pool, mmb__wmat_scratch(piece, x->vis))) {
        for (int i = 0; nk && i < 2 * x->nb; i++) free(nk[i]);
        free(nk);
        free(tmp);
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for the keys and values of %lld visual tokens",
                        (long long)ntok);
    }
    for (int i = 0; i < x->nb; i++) {
        xa_block *b = &x->b[i];
        for (int64_t h = 0; old && h < KVH; h++) {
            memcpy(nk[2 * i] + h * ntok * hd, b->K + h * old * hd, sizeof(float) * (size_t)(old * hd));
            memcpy(nk[2 * i + 1] + h * ntok * hd, b->V + h * old * hd, sizeof(float) * (size_t)(old * hd));
        }
        free(b->K);
        free(b->V);
        b->K = nk[2 * i];
        b->V = nk[2 * i + 1];
        for (int64_t r = 0; r < tokens; r += piece) {
            kv_job j = {.x = x, .pool = ctx->pool, .b = b, .media = media + r * x->vis,
                        .M = tokens - r < piece ? tokens - r : piece, .dst = old + r, .ntok = ntok, .tmp = tmp,
                        .bar = {.n = mmb__pool_size(ctx->pool)}};
            mmb__pool_run(ctx->pool, kv_worker, &j);
        }
    }
    free(nk);
    free(tmp);
    x->off[0] = 0;
    x->vis_tok[x->n_img] = attended;
    x->off[++x->n_img] = ntok;
    return MMB_OK;
}

mmb_status mmb__xattn_feed(mmb_ctx *ctx, mmb__xattn *x, int64_t pos, const int32_t *ids, int64_t n, bool carry) {
    if (!x || pos < 0 || n < 0 || pos > x->fed || (carry && pos == 0))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__xattn_feed: position %lld (%lld recorded)%s", (long long)pos,
                        x ? (long long)x->fed : 0LL, carry && pos == 0 ? ", carried from nothing" : "");
    if (pos + n > x->pos_cap) {
        int64_t cap = (pos + n) * 2 > 64 ? (pos + n) * 2 : 64;
        int32_t **arr[3] = {&x->lo, &x->hi, &x->cnt};
        for (int k = 0; k < 3; k++) {
            int32_t *c = realloc(*arr[k], sizeof *c * (size_t)cap);
            if (!c) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %lld positions", (long long)cap);
            *arr[k] = c;
        }
        unsigned char *f = realloc(x->flag, (size_t)cap);
        if (!f) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %lld positions", (long long)cap);
        x->flag = f;
        x->pos_cap = cap;
    }
    for (int64_t i = pos; i < pos + n; i++) {
        int32_t cnt = i ? x->cnt[i - 1] : 0, lo = i ? x->lo[i - 1] : 0, hi = i ? x->hi[i - 1] : 0;
        unsigned char prev = i ? x->flag[i - 1] : 0, f = prev;
        int32_t t = carry || !ids ? -1 : ids[i - pos];
        if (!carry) {
            bool img = t >= 0 && t == x->image_token, seen = prev & 1;
            if (img) cnt++, seen = false;
            switch (x->kind) {
            case XA_IDEFICS: /* image_attention_mask_for_packed_input_ids: the latest, none after eod */
                lo = cnt - 1, hi = cnt;
                if (seen || cnt == 0) lo = hi = 0;
                break;
            case XA_FLAMINGO: /* text_time = the cumsum of media_locations; eq or ge against media_time */
                lo = x->immediate ? cnt - 1 : 0, hi = cnt;
                if (cnt == 0) lo = hi = 0;
                break;
            default: /* Mllama's get_cross_attention_token_mask: a run of adjacent image tokens, until the next */
                if (img && (prev & 2)) hi = cnt;
                else if (img) lo = cnt - 1, hi = cnt;
                break;
            }
            if (t >= 0 && t == x->eod_token) seen = true;
            f = (unsigned char)((seen ? 1 : 0) | (img ? 2 : 0));
        }
        x->cnt[i] = cnt;
        x->lo[i] = lo;
        x->hi[i] = hi;
        x->flag[i] = f;
    }
    x->fed = pos + n;
    return MMB_OK;
}

void mmb__xattn_get_cost(const mmb__xattn *x, mmb__xattn_cost *out) {
    mmb__xattn_cost c = {0};
    if (x) {
        const int64_t d = x->d, in = x->inner, kin = x->kvin, ff = x->ff, nmlp = x->kind == XA_FLAMINGO ? 2 : 3;
        /* q, o; k, v from the vision width; the MLP's matrices; two RMSNorm weights or (OpenFlamingo) two
         * LayerNorms' weight and bias; two gates, 1 or d each; the two head_dim norms */
        const int64_t norms = x->kind == XA_FLAMINGO ? 4 * d : 2 * d, gates = x->vector_gates ? 2 * d : 2;
        int64_t per = in * d * 2 + 2 * kin * x->vis + nmlp * ff * d + norms + gates + (x->qk_norm ? 2 * x->hd : 0);
        c.layers = x->nb;
        c.params = per * x->nb;
        c.flops_per_token = x->nb * (2 * (2 * in * d + nmlp * ff * d) + 4 * x->T * in);
        c.kv_bytes_per_image = x->nb * 2 * x->T * kin * (int64_t)sizeof(float);
        c.kv_flops_per_image = x->nb * 2 * x->T * x->vis * 2 * kin;
    }
    *out = c;
}

/* ---- the layer ------------------------------------------------------------------------------------ */

/* The hook's job: one gated layer over the n rows of the decoder's block, positions pos0 on. */
typedef struct xa_job {
    const mmb__xattn *x;
    mmb_pool *pool;
    const xa_block *b;
    float *xs;                  /* (n, d): the residual stream, changed in place */
    int64_t n, pos0;
    float *xn, *q, *att, *ob, *h; /* (n, d), (n, inner), (n, inner), (n, d), (n, 2 ff) */
    size_t wscr;                /* per-thread floats of the products; attention scores after them */
    mmb_barrier bar;
} xa_job;

/* What position p reads: the images [*lo, *hi) (their attended tokens), or, with *all, every token of every
 * image (OpenFlamingo's all-media mode and Mllama before any image: every score masked alike, or unmasked);
 * nothing when *lo == *hi and !*all (its attention output is 0). *mlp: whether Mllama's MLP half applies
 * (full_text_row_masked_out_mask). */
static void visible(const mmb__xattn *x, int64_t p, int64_t *lo, int64_t *hi, bool *all, bool *mlp) {
    if (p >= x->fed) p = x->fed - 1; /* (positions are recorded before they run) */
    int64_t l = p >= 0 ? x->lo[p] : 0, h = p >= 0 ? x->hi[p] : 0;
    if (h > x->n_img) h = x->n_img; /* an image token without its image (the pipeline refuses those) */
    if (l > h) l = h;
    *lo = l;
    *hi = h;
    *all = l == h && x->n_img > 0 && (x->kind == XA_MLLAMA || (x->kind == XA_FLAMINGO && !x->immediate));
    *mlp = x->kind != XA_MLLAMA || l < h;
}

static void norm_rows(const xa_job *j, int tid, int nth, const float *w, const float *b) {
    int64_t lo, hi, d = j->x->d;
    mmb__split(j->n, tid, nth, &lo, &hi);
    if (hi <= lo) return;
    if (j->x->kind != XA_FLAMINGO) mmb__rmsnorm_forward(j->xn + lo * d, j->xs + lo * d, w, hi - lo, d, j->x->eps);
    else mmb__layernorm_forward(j->xn + lo * d, j->xs + lo * d, w, b, hi - lo, d, j->x->eps);
}

/* xs += g * ob, g per channel, rows split over the threads; rows whose MLP is masked out skip the MLP's. */
static void gated_add(const xa_job *j, int tid, int nth, const float *g, bool is_mlp) {
    int64_t lo, hi, d = j->x->d, l, h;
    bool all, mlp;
    mmb__split(j->n, tid, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        if (is_mlp && (visible(j->x, j->pos0 + r, &l, &h, &all, &mlp), !mlp)) continue;
        for (int64_t c = 0; c < d; c++) j->xs[r * d + c] += g[c] * j->ob[r * d + c];
    }
}

/* One query row of one head against the tokens of images [lo, hi) (each its attended tokens; with all, every
 * token of every image): out (hd) = softmax(q k^T * scale) v; OpenFlamingo's all-media rows (every score
 * masked to the same value) take the mean of the values. sc: the scores' scratch. */
static void attend_images(const mmb__xattn *x, float *out, const float *q, const float *K, const float *V,
                          int64_t lo, int64_t hi, bool all, float scale, float *sc) {
    const int64_t hd = x->hd, ntok = media_tokens(x);
    if (all) lo = 0, hi = x->n_img;
    if (all && x->kind == XA_FLAMINGO) {
        for (int64_t e = 0; e < hd; e++) out[e] = 0;
        for (int64_t t = 0; t < ntok; t++)
            for (int64_t e = 0; e < hd; e++) out[e] += V[t * hd + e];
        for (int64_t e = 0; e < hd; e++) out[e] /= (float)ntok;
        return;
    }
    int64_t t0 = x->off[lo], t1 = all ? x->off[hi] : x->off[lo] + x->vis_tok[lo];
    bool one = all || hi - lo == 1 || x->vis_tok[lo] == x->off[lo + 1] - x->off[lo];
    for (int64_t k = lo + 1; one && !all && k < hi; k++) one = x->vis_tok[k] == x->off[k + 1] - x->off[k];
    if (one) { /* one run of tokens */
        if (!all) t1 = x->off[hi - 1] + x->vis_tok[hi - 1];
        mmb__lm_attend(out, NULL, q, K, V, hd, t0, t1, hd, scale, sc);
        return;
    }
    /* Mllama's real tiles of several images: the scores of each image's attended tokens, one softmax */
    float mx = -INFINITY, sum = 0;
    int64_t m = 0;
    for (int64_t k = lo; k < hi; k++)
        for (int64_t t = x->off[k]; t < x->off[k] + x->vis_tok[k]; t++, m++) {
            float s = 0;
            for (int64_t e = 0; e < hd; e++) s += q[e] * K[t * hd + e];
            sc[m] = s * scale;
            mx = sc[m] > mx ? sc[m] : mx;
        }
    for (int64_t i = 0; i < m; i++) sum += sc[i] = expf(sc[i] - mx);
    for (int64_t e = 0; e < hd; e++) out[e] = 0;
    m = 0;
    for (int64_t k = lo; k < hi; k++)
        for (int64_t t = x->off[k]; t < x->off[k] + x->vis_tok[k]; t++, m++) {
            float p = sc[m] / sum;
            for (int64_t e = 0; e < hd; e++) out[e] += p * V[t * hd + e];
        }
}

static void xa_worker(void *arg, int tid, int nth) {
    xa_job *j = arg;
    const mmb__xattn *x = j->x;
    const xa_block *b = j->b;
    const int64_t n = j->n, d = x->d, in = x->inner, hd = x->hd, H = x->H, ff = x->ff, ntok = media_tokens(x);
    float *scr = mmb__pool_scratch(j->pool, tid, 0), *sc = scr + j->wscr;
    int64_t lo, hi;
    norm_rows(j, tid, nth, b->n1w, b->n1b);
    mmb__barrier_wait(&j->bar);
    mmb_wmat_out oq = {&b->q, NULL, j->q, in};
    mmb__wmat_share(tid, nth, j->xn, d, n, &oq, 1, 0, scr);
    mmb__barrier_wait(&j->bar);
    const float scale = (float)(1.0 / sqrt((double)hd));
    mmb__split(n * H, tid, nth, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) {
        int64_t r = it / H, h = it % H, kh = h / (H / x->KVH), ilo, ihi;
        bool all, mlp;
        visible(x, j->pos0 + r, &ilo, &ihi, &all, &mlp);
        float *out = j->att + r * in + h * hd, *q = j->q + r * in + h * hd;
        if (ilo == ihi && !all) {
            memset(out, 0, sizeof(float) * (size_t)hd);
            continue;
        }
        if (b->qn) mmb__rmsnorm_forward(q, q, b->qn, 1, hd, x->eps);
        attend_images(x, out, q, b->K + kh * ntok * hd, b->V + kh * ntok * hd, ilo, ihi, all, scale, sc);
    }
    mmb__barrier_wait(&j->bar);
    mmb_wmat_out oo = {&b->o, NULL, j->ob, d};
    mmb__wmat_share(tid, nth, j->att, in, n, &oo, 1, 0, scr);
    mmb__barrier_wait(&j->bar);
    gated_add(j, tid, nth, b->ga, false);
    mmb__barrier_wait(&j->bar);
    norm_rows(j, tid, nth, b->n2w, b->n2b);
    mmb__barrier_wait(&j->bar);
    if (x->kind != XA_FLAMINGO) {
        mmb_wmat_out og[2] = {{&b->f1, NULL, j->h, 2 * ff}, {&b->f3, NULL, j->h + ff, 2 * ff}};
        mmb__wmat_share(tid, nth, j->xn, d, n, og, 2, 0, scr);
    } else {
        mmb_wmat_out o1 = {&b->f1, NULL, j->h, 2 * ff};
        mmb__wmat_share(tid, nth, j->xn, d, n, &o1, 1, 0, scr);
    }
    mmb__barrier_wait(&j->bar);
    mmb__split(n, tid, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        float *g = j->h + r * 2 * ff;
        if (x->kind != XA_FLAMINGO)
            for (int64_t c = 0; c < ff; c++) g[c] = g[c] / (1.0f + expf(-g[c])) * g[ff + c];
        else mmb__act_forward(g, ff, MMB_ACT_GELU);
    }
    mmb__barrier_wait(&j->bar);
    mmb_wmat_out od = {&b->f2, NULL, j->ob, d};
    mmb__wmat_share(tid, nth, j->h, 2 * ff, n, &od, 1, 0, scr);
    mmb__barrier_wait(&j->bar);
    gated_add(j, tid, nth, b->gf, true);
}

static mmb_status hook(mmb_ctx *ctx, void *user, int layer, float *xs, int64_t n, int64_t pos0) {
    mmb__xattn *x = user;
    const xa_block *b = NULL;
    for (int i = 0; i < x->nb && !b; i++)
        if (x->b[i].layer == layer) b = &x->b[i];
    if (!b || (x->kind == XA_MLLAMA && x->n_img == 0)) return MMB_OK; /* Mllama without images: skipped */
    const int64_t d = x->d, in = x->inner, ff = x->ff;
    size_t need = (size_t)(n * (2 * d + 2 * in + 2 * ff));
    if (need > x->buf_cap) {
        float *nb = realloc(x->buf, sizeof(float) * need);
        if (!nb) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for the cross-attention of %lld rows", (long long)n);
        x->buf = nb;
        x->buf_cap = need;
    }
    int64_t K = d > in ? d : in;
    K = K > ff ? K : ff;
    size_t wscr = (mmb__wmat_scratch(n, K) + 15) / 16 * 16;
    if (!scratch_ok(ctx->pool, wscr + (size_t)media_tokens(x) + 16))
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for the cross-attention's scratch");
    xa_job j = {.x = x, .pool = ctx->pool, .b = b, .xs = xs, .n = n, .pos0 = pos0, .xn = x->buf,
                .q = x->buf + n * d, .att = x->buf + n * (d + in), .ob = x->buf + n * (d + 2 * in),
                .h = x->buf + n * (2 * d + 2 * in), .wscr = wscr, .bar = {.n = mmb__pool_size(ctx->pool)}};
    mmb__pool_run(ctx->pool, xa_worker, &j);
    return MMB_OK;
}
