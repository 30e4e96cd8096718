/* VQ-VAE image tokenizers (fusion type D), as transformers runs them:
 *   ChameleonVQVAE.encode   encoder, quant_conv, quantize (nearest code); no decoder in transformers
 *   JanusVQVAE.encode       the same network (attention in the last level, not by attn_resolutions)
 *   JanusVQVAE.decode       quantize.get_codebook_entry (embedding rows, L2-normalised), post_quant_conv, decoder
 * The encoder: conv_in (3x3); per level i its ResNet blocks down.i.block.j (GroupNorm(32) + swish, 3x3 conv, twice,
 * plus the input through nin_shortcut (1x1) / conv_shortcut (3x3) when the width changes), each followed by
 * down.i.attn.j when the checkpoint has it (GroupNorm, q, k, v 1x1, single-head softmax(q k^T / sqrt(C)) v over the
 * map's positions, proj_out, residual); down.i.downsample.conv (F.pad(0, 1, 0, 1) then 3x3 stride 2) but after the
 * last level; mid.block_1, mid.attn_1, mid.block_2; norm_out + swish; conv_out (3x3). The decoder mirrors it: conv_in,
 * mid, up.k (num_res_blocks + 1 blocks, attention where present, upsample.conv after nearest 2x but for the last),
 * norm_out + swish, conv_out. Every GroupNorm has 32 groups and eps 1e-6. Maps are NHWC inside (tensor/conv2d.c);
 * pixels, latents and outputs are NCHW at the boundary, as torch's. Which blocks have attention is read from the
 * checkpoint's tensors (Chameleon's attn_resolutions and Janus' last level give the same).
 *
 * Emu3VQVAE (temporal convolutions, SpatialNorm) is vision/vq_emu3.c, one row of the kinds below. */
#include "vision/vision.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GN_GROUPS 32
#define GN_EPS 1e-6f
#define MAX_LEVELS 8
#define MAX_BLOCKS 8

typedef struct conv {
    mmb_linear l;
    mmb_conv2d g;
} conv;

typedef struct gnorm {
    float *w, *b;
    int64_t C;
} gnorm;

typedef struct resblock {
    gnorm n1, n2;
    conv c1, c2, sc;
    bool has_sc;
    int64_t cin, cout;
} resblock;

typedef struct attnblock {
    gnorm n;
    mmb_linear q, k, v, o;
    int64_t C;
} attnblock;

typedef struct level {
    resblock blk[MAX_BLOCKS];
    attnblock att[MAX_BLOCKS];
    bool has_att[MAX_BLOCKS];
    int nb;
    bool resample;              /* encoder: downsample after; decoder: upsample after */
    conv rs;
} level;

/* An encoder (pixels -> latent_channels) or a decoder (latent_channels -> out_channels). */
typedef struct net {
    conv in, out;
    level lv[MAX_LEVELS];
    int nl;
    resblock mid1, mid2;
    attnblock mida;
    bool has_mida;
    gnorm nout;
    int64_t cin, cout;          /* channels in and out */
    int64_t max_c;              /* the widest map's channels */
} net;

typedef struct vq2d {
    net enc, dec;
    bool has_enc, has_dec;
    mmb_linear quant, post;     /* quant_conv, post_quant_conv (1x1) */
    float *emb;                 /* (K, E) */
    mmb_linear cb;              /* the codebook as a (K, E) layer: z.e for every code through the GEMM */
    float *emb_n2;              /* (K) |e|^2 */
    bool l2_decode;             /* Janus: the codebook rows L2-normalised before post_quant_conv */
    int64_t K, E, latent;
    int levels;
} vq2d;

struct mmb_vq {
    mmb_ckpt own;               /* the checkpoint mmb_vq_open opened (owned), unused when borrowed */
    bool owns;
    const mmb__vq_kind *kind;
    void *state;
    mmb_vq_info info;
};

/* ---- loading ------------------------------------------------------------------------------------ */

static void conv_free(conv *c) { mmb__linear_free(&c->l); }
static void gn_free(gnorm *g) { free(g->w); free(g->b); }
static void res_free(resblock *r) {
    gn_free(&r->n1); gn_free(&r->n2);
    conv_free(&r->c1); conv_free(&r->c2); conv_free(&r->sc);
}
static void att_free(attnblock *a) {
    gn_free(&a->n);
    mmb__linear_free(&a->q); mmb__linear_free(&a->k); mmb__linear_free(&a->v); mmb__linear_free(&a->o);
}
static void net_free(net *n) {
    conv_free(&n->in); conv_free(&n->out); gn_free(&n->nout);
    res_free(&n->mid1); res_free(&n->mid2);
    if (n->has_mida) att_free(&n->mida);
    for (int i = 0; i < n->nl; i++) {
        level *l = &n->lv[i];
        for (int j = 0; j < l->nb; j++) {
            res_free(&l->blk[j]);
            if (l->has_att[j]) att_free(&l->att[j]);
        }
        conv_free(&l->rs);
    }
}

static void vq2d_free(void *st) {
    vq2d *v = st;
    if (!v) return;
    if (v->has_enc) net_free(&v->enc);
    if (v->has_dec) net_free(&v->dec);
    mmb__linear_free(&v->quant);
    mmb__linear_free(&v->post);
    mmb__linear_free(&v->cb);
    free(v->emb);
    free(v->emb_n2);
    free(v);
}

static bool present(const mmb_ckpt *c, const char *prefix, const char *name) {
    char nm[512];
    snprintf(nm, sizeof nm, "%.256s%.64s.weight", prefix, name);
    return mmb__ckpt_find(c, nm, NULL) != NULL;
}

/* A k x k conv {prefix}{name} [cout, cin, k, k] with bias, stride and padding {top, left, bottom, right}. */
static mmb_status bind_conv(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t cin,
                            int64_t cout, int k, int stride, const int pad[4], conv *out) {
    out->g = (mmb_conv2d){.cin = cin, .cout = cout, .kh = k, .kw = k, .stride = stride,
                          .pad = {pad[0], pad[1], pad[2], pad[3]}};
    return mmb__ckpt_conv(ctx, c, prefix, name, cout, cin, k, true, &out->l);
}

static const int PAD1[4] = {1, 1, 1, 1}, PAD0[4] = {0, 0, 0, 0}, PAD_DOWN[4] = {0, 0, 1, 1};

static mmb_status bind_gn(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t C, gnorm *g) {
    if (!mmb__groupnorm_ok(C, GN_GROUPS))
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: %s%s: GroupNorm(32) over %lld channels (a multiple of 32, at most "
                        "4096)", c->dir, prefix, name, (long long)C);
    g->C = C;
    return mmb__ckpt_norm(ctx, c, prefix, name, C, &g->w, &g->b);
}

static mmb_status bind_res(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, int64_t cin, int64_t cout, resblock *r) {
    r->cin = cin;
    r->cout = cout;
    mmb_status s = bind_gn(ctx, c, p, "norm1", cin, &r->n1);
    if (s == MMB_OK) s = bind_conv(ctx, c, p, "conv1", cin, cout, 3, 1, PAD1, &r->c1);
    if (s == MMB_OK) s = bind_gn(ctx, c, p, "norm2", cout, &r->n2);
    if (s == MMB_OK) s = bind_conv(ctx, c, p, "conv2", cout, cout, 3, 1, PAD1, &r->c2);
    if (s != MMB_OK || cin == cout) return s;
    r->has_sc = true;
    if (present(c, p, "conv_shortcut")) return bind_conv(ctx, c, p, "conv_shortcut", cin, cout, 3, 1, PAD1, &r->sc);
    return bind_conv(ctx, c, p, "nin_shortcut", cin, cout, 1, 1, PAD0, &r->sc);
}

static mmb_status bind_att(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, int64_t C, attnblock *a) {
    a->C = C;
    mmb_status s = bind_gn(ctx, c, p, "norm", C, &a->n);
    const char *nm[4] = {"q", "k", "v", "proj_out"};
    mmb_linear *l[4] = {&a->q, &a->k, &a->v, &a->o};
    for (int i = 0; i < 4 && s == MMB_OK; i++) s = mmb__ckpt_conv1x1(ctx, c, p, nm[i], C, C, true, l[i]);
    return s;
}

/* The VQ config: channels of level i (base * mult[i]), the levels, the blocks. */
typedef struct vq_cfg {
    int64_t base, latent, embed, K, in_ch, out_ch;
    int mult[MAX_LEVELS], levels, nrb, resolution;
} vq_cfg;

static mmb_status read_cfg(mmb_ctx *ctx, const mmb_ckpt *c, const char *cp, const char *ksize, vq_cfg *v) {
    char k[160];
    mmb_status s = MMB_OK;
    const struct { const char *name; int64_t *dst; int64_t def; } ints[] = {
        {"base_channels", &v->base, 128}, {"latent_channels", &v->latent, 256}, {"embed_dim", &v->embed, 256},
        {ksize, &v->K, 8192}, {"in_channels", &v->in_ch, 3}, {"out_channels", &v->out_ch, 3}};
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && s == MMB_OK; i++) {
        *ints[i].dst = ints[i].def;
        snprintf(k, sizeof k, "%s%s", cp, ints[i].name);
        mmb__cfg_int(ctx, c, k, ints[i].dst, &s);
    }
    int64_t nrb = 2, res = 0;
    snprintf(k, sizeof k, "%snum_res_blocks", cp);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, k, &nrb, &s);
    snprintf(k, sizeof k, "%sresolution", cp);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, k, &res, &s);
    snprintf(k, sizeof k, "%schannel_multiplier", cp);
    int n = 0;
    if (s == MMB_OK && !mmb__cfg_ints(ctx, c, k, v->mult, MAX_LEVELS, &n, &s) && s == MMB_OK) {
        const int def[5] = {1, 1, 2, 2, 4};
        memcpy(v->mult, def, sizeof def);
        n = 5;
    }
    bool dl = false;
    snprintf(k, sizeof k, "%sdouble_latent", cp);
    if (s == MMB_OK) mmb__cfg_bool(ctx, c, k, &dl, &s);
    const char *at = "vanilla";
    snprintf(k, sizeof k, "%sattn_type", cp);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, k, &at, &s);
    if (s != MMB_OK) return s;
    if (dl) return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: %sdouble_latent true is not supported", c->dir, cp);
    if (strcmp(at, "vanilla") != 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: %sattn_type '%s' (vanilla is supported)", c->dir, cp,
                        at);
    bool ok = n >= 1 && n <= MAX_LEVELS && nrb >= 1 && nrb + 1 <= MAX_BLOCKS && v->base >= 1 && v->base <= 4096 &&
              v->latent >= 1 && v->latent <= 65536 && v->embed >= 1 && v->embed <= 65536 && v->K >= 1 &&
              v->K <= (1 << 24) && v->in_ch == 3 && v->out_ch == 3 && res >= 0 && res <= (1 << 16);
    for (int i = 0; ok && i < n; i++) ok = v->mult[i] >= 1 && v->mult[i] <= 64 && v->base * v->mult[i] <= 4096;
    if (!ok)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %s: a VQ config out of range (base_channels %lld, "
                        "channel_multiplier of %d levels, num_res_blocks %lld, latent_channels %lld, embed_dim %lld, "
                        "%s %lld, in/out_channels %lld/%lld (3))", c->dir, cp, (long long)v->base, n, (long long)nrb,
                        (long long)v->latent, (long long)v->embed, ksize, (long long)v->K, (long long)v->in_ch,
                        (long long)v->out_ch);
    v->levels = n;
    v->nrb = (int)nrb;
    v->resolution = (int)res;
    return MMB_OK;
}

/* The middle of a net at width ch: mid.block_1, mid.attn_1 (where the checkpoint has it), mid.block_2. */
static mmb_status bind_mid(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, int64_t ch, net *n) {
    char q[256];
    snprintf(q, sizeof q, "%.96smid.block_1.", p);
    mmb_status s = bind_res(ctx, c, q, ch, ch, &n->mid1);
    snprintf(q, sizeof q, "%.96smid.attn_1.", p);
    if (s == MMB_OK && (n->has_mida = present(c, q, "q"))) s = bind_att(ctx, c, q, ch, &n->mida);
    snprintf(q, sizeof q, "%.96smid.block_2.", p);
    if (s == MMB_OK) s = bind_res(ctx, c, q, ch, ch, &n->mid2);
    return s;
}

/* Level {p}{part}.{i}: nb ResNet blocks from *ch to out channels (each with its attention where the checkpoint has
 * one), then {rs}.conv when resample (3x3, stride and padding as given). *ch becomes out. */
static mmb_status bind_level(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, const char *part, int i, int nb,
                             int64_t *ch, int64_t out, bool resample, const char *rs, int stride, const int pad[4],
                             level *l) {
    char q[256];
    mmb_status s = MMB_OK;
    l->nb = nb;
    for (int j = 0; j < nb && s == MMB_OK; j++) {
        snprintf(q, sizeof q, "%.96s%s.%d.block.%d.", p, part, i, j);
        s = bind_res(ctx, c, q, *ch, out, &l->blk[j]);
        *ch = out;
        snprintf(q, sizeof q, "%.96s%s.%d.attn.%d.", p, part, i, j);
        if (s == MMB_OK && (l->has_att[j] = present(c, q, "q"))) s = bind_att(ctx, c, q, out, &l->att[j]);
    }
    snprintf(q, sizeof q, "%.96s%s.%d.%s.", p, part, i, rs);
    if (s == MMB_OK && (l->resample = resample)) s = bind_conv(ctx, c, q, "conv", out, out, 3, stride, pad, &l->rs);
    return s;
}

static mmb_status bind_encoder(mmb_ctx *ctx, const mmb_ckpt *c, const char *pre, const vq_cfg *v, net *e) {
    char p[96];
    snprintf(p, sizeof p, "%.64sencoder.", pre);
    e->cin = v->in_ch;
    e->cout = v->latent;
    mmb_status s = bind_conv(ctx, c, p, "conv_in", v->in_ch, v->base, 3, 1, PAD1, &e->in);
    int64_t ch = v->base, mx = ch;
    e->nl = v->levels;
    for (int i = 0; i < v->levels && s == MMB_OK; i++) {
        s = bind_level(ctx, c, p, "down", i, v->nrb, &ch, v->base * v->mult[i], i != v->levels - 1, "downsample", 2,
                       PAD_DOWN, &e->lv[i]);
        mx = ch > mx ? ch : mx;
    }
    if (s == MMB_OK) s = bind_mid(ctx, c, p, ch, e);
    if (s == MMB_OK) s = bind_gn(ctx, c, p, "norm_out", ch, &e->nout);
    if (s == MMB_OK) s = bind_conv(ctx, c, p, "conv_out", ch, v->latent, 3, 1, PAD1, &e->out);
    e->max_c = mx > v->latent ? mx : v->latent;
    return s;
}

static mmb_status bind_decoder(mmb_ctx *ctx, const mmb_ckpt *c, const char *pre, const vq_cfg *v, net *d) {
    char p[96];
    snprintf(p, sizeof p, "%.64sdecoder.", pre);
    d->cin = v->latent;
    d->cout = v->out_ch;
    int64_t ch = v->base * v->mult[v->levels - 1], mx = ch;
    mmb_status s = bind_conv(ctx, c, p, "conv_in", v->latent, ch, 3, 1, PAD1, &d->in);
    if (s == MMB_OK) s = bind_mid(ctx, c, p, ch, d);
    d->nl = v->levels;
    for (int k = 0; k < v->levels && s == MMB_OK; k++) { /* up.k is level levels - 1 - k */
        s = bind_level(ctx, c, p, "up", k, v->nrb + 1, &ch, v->base * v->mult[v->levels - 1 - k], k != v->levels - 1,
                       "upsample", 1, PAD1, &d->lv[k]);
        mx = ch > mx ? ch : mx;
    }
    if (s == MMB_OK) s = bind_gn(ctx, c, p, "norm_out", ch, &d->nout);
    if (s == MMB_OK) s = bind_conv(ctx, c, p, "conv_out", ch, v->out_ch, 3, 1, PAD1, &d->out);
    d->max_c = mx;
    return s;
}

/* The 2-D kinds (Chameleon, Janus): encoder (and Janus' decoder), quant_conv, the codebook, post_quant_conv. */
static mmb_status vq2d_load(mmb_ctx *ctx, const mmb_ckpt *c, const char *pre, const char *cp, bool janus,
                            void **state, mmb_vq_info *info) {
    vq2d *v = calloc(1, sizeof *v);
    if (!v) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    vq_cfg g;
    mmb_status s = read_cfg(ctx, c, cp, "num_embeddings", &g);
    char p[512], nm[512];
    v->K = g.K;
    v->E = g.embed;
    v->latent = g.latent;
    v->levels = g.levels;
    v->l2_decode = janus;
    snprintf(p, sizeof p, "%sencoder.", pre);
    v->has_enc = s == MMB_OK && present(c, p, "conv_in");
    snprintf(p, sizeof p, "%sdecoder.", pre);
    v->has_dec = s == MMB_OK && janus && present(c, p, "conv_in");
    if (s == MMB_OK && !v->has_enc && !v->has_dec)
        s = mmb__err(ctx, MMB_ERR_MISSING, "%s: no VQ encoder or decoder: tensor '%sencoder.conv_in.weight' is missing",
                     c->dir, pre);
    if (s == MMB_OK && v->has_enc) s = bind_encoder(ctx, c, pre, &g, &v->enc);
    if (s == MMB_OK && v->has_dec) s = bind_decoder(ctx, c, pre, &g, &v->dec);
    if (s == MMB_OK && v->has_enc) s = mmb__ckpt_conv1x1(ctx, c, pre, "quant_conv", g.embed, g.latent, true, &v->quant);
    if (s == MMB_OK && v->has_dec)
        s = mmb__ckpt_conv1x1(ctx, c, pre, "post_quant_conv", g.latent, g.embed, true, &v->post);
    snprintf(nm, sizeof nm, "%squantize.embedding.weight", pre);
    const int64_t es[2] = {g.K, g.embed};
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, nm, 2, es, &v->emb);
    if (s == MMB_OK && !(v->emb_n2 = malloc(sizeof(float) * (size_t)g.K))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK && v->has_enc) {
        mmb_tensor t = {.name = nm, .dtype = MMB_F32, .ndim = 2, .shape = {g.K, g.embed}, .data = v->emb};
        s = mmb__linear_init(ctx, &v->cb, &t, NULL);
    }
    for (int64_t k = 0; s == MMB_OK && k < g.K; k++) { /* torch.sum(embedding.weight ** 2, dim=1), f32 */
        float a = 0;
        for (int64_t e = 0; e < g.embed; e++) a += v->emb[k * g.embed + e] * v->emb[k * g.embed + e];
        v->emb_n2[k] = a;
    }
    if (s != MMB_OK) {
        vq2d_free(v);
        return s;
    }
    *info = (mmb_vq_info){.codebook_size = g.K, .embed_dim = g.embed, .latent_channels = g.latent,
                          .downsample = 1 << (g.levels - 1), .temporal = 1, .has_encoder = v->has_enc,
                          .has_decoder = v->has_dec, .resolution = g.resolution, .in_channels = 3, .out_channels = 3};
    *state = v;
    return MMB_OK;
}

static mmb_status chameleon_load(mmb_ctx *ctx, const mmb_ckpt *c, const char *pre, const char *cp, void **st,
                                 mmb_vq_info *info) {
    return vq2d_load(ctx, c, pre, cp, false, st, info);
}
static mmb_status janus_load(mmb_ctx *ctx, const mmb_ckpt *c, const char *pre, const char *cp, void **st,
                             mmb_vq_info *info) {
    return vq2d_load(ctx, c, pre, cp, true, st, info);
}

/* ---- running ------------------------------------------------------------------------------------ */

/* Scratch of one pass: three maps of the widest size, the im2col tile, the GroupNorm and attention scratch. */
typedef struct runbuf {
    float *a, *b, *t, *col, *att;
    double *gn;
    size_t map, col_n;
} runbuf;

static void gn_run(mmb_ctx *ctx, runbuf *r, float *out, const float *x, const gnorm *g, int64_t HW, bool silu) {
    mmb__groupnorm_forward_mt(ctx, out, x, g->w, g->b, 1, HW, g->C, GN_GROUPS, GN_EPS, silu, r->gn);
}

static void conv_run(mmb_ctx *ctx, runbuf *r, float *out, const float *x, const conv *c, int64_t H, int64_t W) {
    mmb__conv2d_forward(ctx, out, x, &c->l, &c->g, 1, H, W, r->col);
}

/* x (H, W, cin) -> x (H, W, cout), in place through r's maps (x is r->a on entry and exit). */
static void res_run(mmb_ctx *ctx, runbuf *r, const resblock *b, int64_t H, int64_t W) {
    const int64_t HW = H * W;
    gn_run(ctx, r, r->t, r->a, &b->n1, HW, true);
    conv_run(ctx, r, r->b, r->t, &b->c1, H, W);
    gn_run(ctx, r, r->b, r->b, &b->n2, HW, true);
    conv_run(ctx, r, r->t, r->b, &b->c2, H, W);
    if (b->has_sc) {
        conv_run(ctx, r, r->b, r->a, &b->sc, H, W);
        mmb__add_forward_mt(ctx, r->a, r->t, r->b, HW * b->cout);
    } else {
        mmb__add_forward_mt(ctx, r->a, r->a, r->t, HW * b->cout);
    }
}

static void att_run(mmb_ctx *ctx, runbuf *r, const attnblock *at, int64_t HW) {
    const int64_t C = at->C;
    float *h = r->t, *q = r->b, *k = h + HW * C, *v = q + HW * C; /* t and b hold two maps of C each: see sizing */
    gn_run(ctx, r, h, r->a, &at->n, HW, false);
    mmb__linear_forward(ctx, q, h, HW, &at->q);
    mmb__linear_forward(ctx, k, h, HW, &at->k);
    mmb__linear_forward(ctx, v, h, HW, &at->v);
    mmb__cross_attention_forward(ctx, h, q, k, v, C, C, 1, HW, HW, 1, 1, C, r->att);
    mmb__linear_forward(ctx, q, h, HW, &at->o);
    mmb__add_forward_mt(ctx, r->a, r->a, q, HW * C);
}

static void level_blocks(mmb_ctx *ctx, runbuf *r, const level *l, int64_t H, int64_t W) {
    for (int j = 0; j < l->nb; j++) {
        res_run(ctx, r, &l->blk[j], H, W);
        if (l->has_att[j]) att_run(ctx, r, &l->att[j], H * W);
    }
}

static void mid_run(mmb_ctx *ctx, runbuf *r, const net *n, int64_t H, int64_t W) {
    res_run(ctx, r, &n->mid1, H, W);
    if (n->has_mida) att_run(ctx, r, &n->mida, H * W);
    res_run(ctx, r, &n->mid2, H, W);
}

static void end_run(mmb_ctx *ctx, runbuf *r, const net *n, int64_t H, int64_t W) {
    gn_run(ctx, r, r->t, r->a, &n->nout, H * W, true);
    conv_run(ctx, r, r->a, r->t, &n->out, H, W);
}

/* The largest map (floats) any step of net n writes or reads, at its input of H x W (the encoder's pixels, the
 * decoder's grid), attention's two maps a buffer counted twice; and the widest im2col row (floats). */
static void net_sizes(const net *n, bool dec, int64_t H, int64_t W, size_t *map, size_t *col) {
    int64_t most = H * W * (n->in.g.cin > n->in.g.cout ? n->in.g.cin : n->in.g.cout);
    size_t k = 0;
#define SEE(px, c) do { int64_t m_ = (px) * (c); most = m_ > most ? m_ : most; } while (0)
#define KROW(cv) do { size_t k_ = mmb__conv2d_scratch(&(cv).g, 1, H, W); k = k_ > k ? k_ : k; } while (0)
    KROW(n->in);
    const resblock *mids[2] = {&n->mid1, &n->mid2};
    for (int pass = 0; pass < 2; pass++) {
        if (pass == (dec ? 0 : 1)) { /* the decoder's mid first, the encoder's last */
            for (int i = 0; i < 2; i++) {
                SEE(H * W, mids[i]->cout);
                KROW(mids[i]->c1);
                KROW(mids[i]->c2);
            }
            if (n->has_mida) SEE(2 * H * W, n->mida.C);
            continue;
        }
        for (int i = 0; i < n->nl; i++) {
            const level *l = &n->lv[i];
            for (int j = 0; j < l->nb; j++) {
                const resblock *b = &l->blk[j];
                SEE(H * W, b->cin > b->cout ? b->cin : b->cout);
                KROW(b->c1);
                KROW(b->c2);
                if (b->has_sc) KROW(b->sc);
                if (l->has_att[j]) SEE(2 * H * W, l->att[j].C);
            }
            if (!l->resample) continue;
            if (dec) H *= 2, W *= 2;
            KROW(l->rs);
            if (!dec) H = mmb__conv2d_out_h(&l->rs.g, H), W = mmb__conv2d_out_w(&l->rs.g, W);
            SEE(H * W, l->rs.g.cout);
        }
    }
    SEE(H * W, n->nout.C);
    SEE(H * W, n->out.g.cout);
    KROW(n->out);
#undef SEE
#undef KROW
    *map = (size_t)most;
    *col = k + 1;
}

static mmb_status bufs_alloc(mmb_ctx *ctx, runbuf *r, const net *n, bool dec, int64_t H, int64_t W) {
    int nth = mmb__pool_size(ctx->pool);
    size_t map, col;
    net_sizes(n, dec, H, W, &map, &col);
    int64_t max_c = n->max_c;
    r->map = map;
    r->a = malloc(sizeof(float) * map);
    r->b = malloc(sizeof(float) * map);
    r->t = malloc(sizeof(float) * map);
    r->col = malloc(sizeof(float) * col);
    r->att = malloc(sizeof(float) * mmb__attention_scratch(nth, max_c));
    r->gn = malloc(mmb__groupnorm_scratch(nth, GN_GROUPS));
    if (!r->a || !r->b || !r->t || !r->col || !r->att || !r->gn)
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for the VQ model's activations (%zu MiB)",
                        (3 * map + col) * sizeof(float) >> 20);
    return MMB_OK;
}

static void bufs_free(runbuf *r) {
    free(r->a); free(r->b); free(r->t); free(r->col); free(r->att); free(r->gn);
}

static mmb_status vq2d_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t batch, int height, int width,
                              int32_t *codes, float *latents) {
    const vq2d *v = st;
    const net *e = &v->enc;
    runbuf r = {0};
    mmb_status s = bufs_alloc(ctx, &r, e, false, height, width);
    const int64_t f = (int64_t)1 << (v->levels - 1), gh = height / f, gw = width / f, G = gh * gw;
    float *z = s == MMB_OK ? malloc(sizeof(float) * (size_t)(G * (v->E + v->K))) : NULL;
    if (s == MMB_OK && !z) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t b = 0; b < batch && s == MMB_OK; b++) {
        const float *px = pixels + b * 3 * (int64_t)height * width;
        for (int64_t p = 0; p < (int64_t)height * width; p++) /* NCHW -> NHWC */
            for (int c = 0; c < 3; c++) r.t[p * 3 + c] = px[c * (int64_t)height * width + p];
        int64_t H = height, W = width;
        conv_run(ctx, &r, r.a, r.t, &e->in, H, W);
        for (int i = 0; i < e->nl; i++) {
            level_blocks(ctx, &r, &e->lv[i], H, W);
            if (e->lv[i].resample) {
                conv_run(ctx, &r, r.t, r.a, &e->lv[i].rs, H, W);
                H = mmb__conv2d_out_h(&e->lv[i].rs.g, H);
                W = mmb__conv2d_out_w(&e->lv[i].rs.g, W);
                memcpy(r.a, r.t, sizeof(float) * (size_t)(H * W * e->lv[i].rs.g.cout));
            }
        }
        mid_run(ctx, &r, e, H, W);
        end_run(ctx, &r, e, H, W);
        float *zz = z, *dots = z + G * v->E;
        mmb__linear_forward(ctx, zz, r.a, G, &v->quant); /* quant_conv: (G, E) */
        /* distances |z|^2 + |e|^2 - 2 z.e in f32 as torch's, argmin (lowest index on ties); z.e through the GEMM */
        mmb__linear_forward(ctx, dots, zz, G, &v->cb);
        for (int64_t p = 0; p < G; p++) {
            float zn = 0;
            for (int64_t x = 0; x < v->E; x++) zn += zz[p * v->E + x] * zz[p * v->E + x];
            int32_t best = 0;
            float bd = INFINITY;
            for (int64_t k = 0; k < v->K; k++) {
                float d = zn + v->emb_n2[k] - 2.0f * dots[p * v->K + k];
                if (d < bd) bd = d, best = (int32_t)k;
            }
            codes[b * G + p] = best;
        }
        for (int64_t p = 0; latents && p < G; p++) /* NHWC -> NCHW */
            for (int64_t x = 0; x < v->E; x++) latents[(b * v->E + x) * G + p] = zz[p * v->E + x];
    }
    free(z);
    bufs_free(&r);
    return s;
}

static mmb_status vq2d_decode(mmb_ctx *ctx, const void *st, const int32_t *codes, int64_t batch, int gh, int gw,
                              float *pixels) {
    const vq2d *v = st;
    const net *d = &v->dec;
    runbuf r = {0};
    mmb_status s = bufs_alloc(ctx, &r, d, true, gh, gw);
    const int64_t G = (int64_t)gh * gw;
    for (int64_t b = 0; b < batch && s == MMB_OK; b++) {
        for (int64_t p = 0; p < G; p++) { /* get_codebook_entry: the rows, L2-normalised (F.normalize, eps 1e-12) */
            const float *e = v->emb + codes[b * G + p] * v->E;
            double n2 = 0;
            for (int64_t x = 0; x < v->E; x++) n2 += (double)e[x] * e[x];
            float nrm = (float)sqrt(n2);
            float den = v->l2_decode ? (nrm > 1e-12f ? nrm : 1e-12f) : 1.0f;
            for (int64_t x = 0; x < v->E; x++) r.b[p * v->E + x] = e[x] / den;
        }
        mmb__linear_forward(ctx, r.t, r.b, G, &v->post);
        int64_t H = gh, W = gw;
        conv_run(ctx, &r, r.a, r.t, &d->in, H, W);
        mid_run(ctx, &r, d, H, W);
        for (int k = 0; k < d->nl; k++) {
            level_blocks(ctx, &r, &d->lv[k], H, W);
            if (d->lv[k].resample) {
                int64_t C = d->lv[k].rs.g.cin;
                mmb__upsample2x_nearest_mt(ctx, r.t, r.a, 1, H, W, C);
                H *= 2;
                W *= 2;
                conv_run(ctx, &r, r.a, r.t, &d->lv[k].rs, H, W);
            }
        }
        end_run(ctx, &r, d, H, W);
        float *px = pixels + b * 3 * H * W;
        for (int64_t p = 0; p < H * W; p++) /* NHWC -> NCHW */
            for (int c = 0; c < 3; c++) px[c * H * W + p] = r.a[p * 3 + c];
    }
    bufs_free(&r);
    return s;
}

/* ---- costs --------------------------------------------------------------------------------------- */

static void res_cost(const resblock *b, int64_t H, int64_t W, int64_t *p, int64_t *f) {
    mmb__conv2d_cost(&b->c1.l, &b->c1.g, H, W, p, f);
    mmb__conv2d_cost(&b->c2.l, &b->c2.g, H, W, p, f);
    if (b->has_sc) mmb__conv2d_cost(&b->sc.l, &b->sc.g, H, W, p, f);
    *p += 2 * (b->cin + b->cout);
}

static void att_cost(const attnblock *a, int64_t HW, int64_t *p, int64_t *f) {
    const mmb_linear *l[4] = {&a->q, &a->k, &a->v, &a->o};
    for (int i = 0; i < 4; i++) mmb__linear_cost(l[i], HW, p, f);
    *f += 4 * HW * HW * a->C;
    *p += 2 * a->C;
}

static void net_cost(const net *n, bool dec, int64_t H, int64_t W, int64_t *p, int64_t *f) {
    mmb__conv2d_cost(&n->in.l, &n->in.g, H, W, p, f);
    for (int pass = 0; pass < 2; pass++) { /* the decoder's mid runs first, the encoder's last */
        if (pass == (dec ? 0 : 1)) {
            res_cost(&n->mid1, H, W, p, f);
            if (n->has_mida) att_cost(&n->mida, H * W, p, f);
            res_cost(&n->mid2, H, W, p, f);
            continue;
        }
        for (int i = 0; i < n->nl; i++) {
            const level *l = &n->lv[i];
            for (int j = 0; j < l->nb; j++) {
                res_cost(&l->blk[j], H, W, p, f);
                if (l->has_att[j]) att_cost(&l->att[j], H * W, p, f);
            }
            if (!l->resample) continue;
            if (dec) H *= 2, W *= 2;
            mmb__conv2d_cost(&l->rs.l, &l->rs.g, H, W, p, f);
            if (!dec) H = mmb__conv2d_out_h(&l->rs.g, H), W = mmb__conv2d_out_w(&l->rs.g, W);
        }
    }
    mmb__conv2d_cost(&n->out.l, &n->out.g, H, W, p, f);
    *p += 2 * n->nout.C;
}

static int64_t vq2d_cost(const void *st, int height, int width, int decode, int64_t *params) {
    const vq2d *v = st;
    int64_t p = 0, f = 0, G;
    const int64_t fct = (int64_t)1 << (v->levels - 1);
    if (!decode && v->has_enc) {
        net_cost(&v->enc, false, height, width, &p, &f);
        G = (height / fct) * (width / fct);
        mmb__linear_cost(&v->quant, G, &p, &f);
        f += 2 * G * v->K * v->E;
        p += v->K * v->E;
    } else if (decode && v->has_dec) {
        G = (height / fct) * (width / fct);
        mmb__linear_cost(&v->post, G, &p, &f);
        net_cost(&v->dec, true, height / fct, width / fct, &p, &f);
    }
    if (params) *params = p;
    return f;
}

/* ---- the kinds and the public API ---------------------------------------------------------------- */

const mmb__vq_kind mmb__vq_chameleon = {"chameleon_vqgan", chameleon_load, vq2d_encode, NULL, vq2d_cost, vq2d_free};
const mmb__vq_kind mmb__vq_janus = {"janus_vqgan", janus_load, vq2d_encode, vq2d_decode, vq2d_cost, vq2d_free};

static const mmb__vq_kind *const kinds[] = {&mmb__vq_chameleon, &mmb__vq_janus, &mmb__vq_emu3};

void mmb_vq_free(mmb_vq *vq) {
    if (!vq) return;
    if (vq->state) vq->kind->free(vq->state);
    if (vq->owns) mmb__ckpt_close(&vq->own);
    free(vq);
}

/* Where c's VQ is: config vq_config + tensors under model.vqmodel. or vqmodel., or a VQ model's own config. */
static mmb_status vq_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_vq *vq) {
    const cJSON *vc = cJSON_GetObjectItemCaseSensitive(c->config, "vq_config");
    const char *cp = cJSON_IsObject(vc) ? "vq_config." : "", *mt = NULL, *pre = "";
    char k[64];
    snprintf(k, sizeof k, "%smodel_type", cp);
    mmb_status s = MMB_OK;
    mmb__cfg_str(ctx, c, k, &mt, &s);
    if (s != MMB_OK) return s;
    if (!mt && *cp) mt = NULL;
    for (size_t i = 0; mt && i < sizeof kinds / sizeof kinds[0]; i++)
        if (strcmp(mt, kinds[i]->model_type) == 0) vq->kind = kinds[i];
    if (!vq->kind) {
        const char *top = NULL;
        mmb__cfg_str(ctx, c, "model_type", &top, &s);
        /* a vq_config without model_type: the model's own kind (ChameleonConfig's sub-config) */
        const char *guess = top && !strcmp(top, "chameleon") ? "chameleon_vqgan" : top && !strcmp(top, "janus") ?
                            "janus_vqgan" : top && !strcmp(top, "emu3") ? "emu3_vqgan" : NULL;
        for (size_t i = 0; !mt && guess && i < sizeof kinds / sizeof kinds[0]; i++)
            if (strcmp(guess, kinds[i]->model_type) == 0) vq->kind = kinds[i];
    }
    if (!vq->kind)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: %smodel_type '%s' is no VQ model this build runs "
                        "(chameleon_vqgan, janus_vqgan, emu3_vqgan)", c->dir, cp, mt ? mt : "");
    if (*cp) {
        static const char *const prefixes[] = {"model.vqmodel.", "vqmodel."};
        for (size_t i = 0; i < 2 && !*pre; i++) {
            char nm[128];
            snprintf(nm, sizeof nm, "%squantize.embedding.weight", prefixes[i]);
            if (mmb__ckpt_find(c, nm, NULL)) pre = prefixes[i];
        }
        if (!*pre)
            return mmb__err(ctx, MMB_ERR_MISSING, "%s: no VQ model: tensor 'model.vqmodel.quantize.embedding.weight' "
                            "is missing (also looked under vqmodel.)", c->dir);
    }
    if ((s = vq->kind->load(ctx, c, pre, cp, &vq->state, &vq->info)) != MMB_OK) return s;
    vq->info.kind = vq->kind->model_type;
    int64_t pe = 0, pd = 0;
    if (vq->info.has_encoder) vq->kind->cost(vq->state, 0, 0, 0, &pe);
    if (vq->info.has_decoder) vq->kind->cost(vq->state, 0, 0, 1, &pd);
    vq->info.encoder_params = pe;
    vq->info.decoder_params = pd;
    return MMB_OK;
}

mmb_status mmb__vq_open(mmb_ctx *ctx, const mmb_ckpt *c, mmb_vq **out) {
    mmb_vq *vq = calloc(1, sizeof *vq);
    if (!vq) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb_status s = vq_load(ctx, c, vq);
    if (s != MMB_OK) {
        mmb_vq_free(vq);
        return s;
    }
    *out = vq;
    return MMB_OK;
}

mmb_status mmb_vq_open(mmb_ctx *ctx, const char *dir, mmb_vq **out) {
    if (!ctx || !dir || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_vq_open: NULL argument");
    mmb_vq *vq = calloc(1, sizeof *vq);
    if (!vq) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb_status s = mmb__ckpt_open(ctx, dir, &vq->own);
    vq->owns = s == MMB_OK;
    if (s == MMB_OK) s = vq_load(ctx, &vq->own, vq);
    if (s != MMB_OK) {
        mmb_vq_free(vq);
        return s;
    }
    *out = vq;
    return MMB_OK;
}

mmb_status mmb_vq_get_info(const mmb_vq *vq, mmb_vq_info *out) {
    if (!vq || !out) return MMB_ERR_ARG;
    *out = vq->info;
    return MMB_OK;
}

int64_t mmb_vq_flops(const mmb_vq *vq, int height, int width, int decode) {
    if (!vq || height < 1 || width < 1 || (decode ? !vq->info.has_decoder : !vq->info.has_encoder)) return 0;
    return vq->kind->cost(vq->state, height, width, decode, NULL);
}

mmb_status mmb_vq_encode(mmb_ctx *ctx, const mmb_vq *vq, const float *pixels, int64_t n, int height, int width,
                         int32_t *codes, float *latents) {
    if (!ctx || !vq || !pixels || !codes || n < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_vq_encode: NULL argument or n < 1");
    if (!vq->info.has_encoder || !vq->kind->encode)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "the VQ model (%s) has no encoder", vq->info.kind);
    const int f = vq->info.downsample;
    if (height < f || width < f || height % f || width % f || height > (1 << 14) || width > (1 << 14))
        return mmb__err(ctx, MMB_ERR_SHAPE, "an image of %dx%d pixels: the VQ model (%s) takes sides that are "
                        "multiples of its downsampling %d (at most 16384)", width, height, vq->info.kind, f);
    if (vq->owns) {
        mmb_status vs = mmb__ckpt_verify(ctx, &vq->own);
        if (vs != MMB_OK) return vs;
    }
    return vq->kind->encode(ctx, vq->state, pixels, n, height, width, codes, latents);
}

mmb_status mmb_vq_decode(mmb_ctx *ctx, const mmb_vq *vq, const int32_t *codes, int64_t n, int grid_h, int grid_w,
                         float *pixels) {
    if (!ctx || !vq || !codes || !pixels || n < 1 || grid_h < 1 || grid_w < 1 || grid_h > 4096 || grid_w > 4096)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_vq_decode: NULL argument, n < 1 or a grid side outside [1, 4096]");
    if (!vq->info.has_decoder || !vq->kind->decode)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "the VQ model (%s) has no decoder", vq->info.kind);
    for (int64_t i = 0; i < n * grid_h * grid_w; i++)
        if (codes[i] < 0 || codes[i] >= vq->info.codebook_size)
            return mmb__err(ctx, MMB_ERR_ARG, "code %d at position %lld is outside the codebook [0, %lld)",
                            (int)codes[i], (long long)i, (long long)vq->info.codebook_size);
    if (vq->owns) {
        mmb_status vs = mmb__ckpt_verify(ctx, &vq->own);
        if (vs != MMB_OK) return vs;
    }
    return vq->kind->decode(ctx, vq->state, codes, n, grid_h, grid_w, pixels);
}
