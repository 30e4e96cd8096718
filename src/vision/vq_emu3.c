/* Emu3's VQVAE (transformers' Emu3VQVAE, models/emu3/modeling_emu3.py), encoder and decoder, for images.
 *
 * Maps are channels-last (H, W, C), one image at a time. A sequence of T frames is T such maps back to back.
 *   encode: the image is T = temporal_downsample_factor identical frames; the 2-D encoder (conv_in, down blocks,
 *     middle block, norm_out, conv_out) is per frame, so it runs once and its output is copied T times; then
 *     the temporal part (time_conv: Conv3d (4,3,3) stride (2,1,1) + SiLU; time_res_stack: BatchNorm3d (eval) +
 *     SiLU + Conv3d (3,3,3), twice, + residual), quant_conv (Conv3d (3,1,1)), then the nearest code.
 *   decode: embedding rows, post_quant_conv; the temporal stack (time_res_stack, then time_conv: nearest 2x in
 *     time + Conv3d (3,3,3) + SiLU) runs on both post_quant and quant (torch concatenates them on the batch);
 *     then the 2-D decoder with SpatialNorm on frame 0 only (the output is video[:, 0], and the 2-D decoder
 *     is per frame: frames 1.. are never computed).
 * Every Emu3VQVAEConv3d pads time causally (2 before, 0 after), so output frame o reads input frames
 * o*st - 2 .. o*st + kt - 3 (zeros outside). It runs as one Conv2d per output frame: the kt input frames are
 * interleaved into one map of cin*kt channels (channel ci*kt + k = frame k's channel ci), whose Conv2d weight
 * (cout, cin*kt, kh, kw) is torch's (cout, cin, kt, kh, kw) as stored, used in place (docs/decisions.md,
 * "Emu3 VQVAE: Conv3d as a Conv2d over interleaved frames"). The temporal layers act on the latent grid
 * (H/f x W/f, latent_channels), so this costs little.
 * SpatialNorm(x, zq) = GroupNorm(x) * conv_y(zq') + conv_b(zq'), zq' = zq nearest-resized to x's size: conv_y
 * and conv_b are 1x1, so they commute with the nearest resize; they run on the latent grid and are read through
 * the nearest index. */
#include "vision/vision.h"
#include "tensor/tensor.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define E3_MAX_LEVELS 8
#define E3_MAX_TIME 4 /* temporal_downsample_factor up to 16 */
#define E3_GROUPS 32
#define E3_GN_EPS 1e-6f
#define E3_BN_EPS 1e-5f /* nn.BatchNorm3d's default */

typedef struct e3_cfg {
    int64_t codebook, embed, latent, base, hidden, heads;
    int nlev, nres, tdf, ntime, factor;
    int mult[E3_MAX_LEVELS];
    bool attn_lv[E3_MAX_LEVELS];
} e3_cfg;

typedef struct e3_norm { /* GroupNorm(32, C, eps 1e-6), or a SpatialNorm: its norm_layer and conv_y, conv_b */
    int64_t C;
    float *w, *b;
    bool spatial;
    mmb_linear cy, cb;
} e3_norm;

typedef struct e3_res {
    int64_t cin, cout;
    e3_norm n1, n2;
    mmb_linear conv1, conv2, nin;
    bool has_nin;
} e3_res;

typedef struct e3_attn {
    int64_t C;
    e3_norm norm;
    mmb_linear qkv, out;
    float *qkv_w, *qkv_b;
} e3_attn;

typedef struct e3_conv3 { /* Emu3VQVAEConv3d: causal time padding (2, 0), spatial padding per side */
    mmb_linear l;
    int64_t cin, cout;
    int kt, st;
    mmb_conv2d g; /* the per-frame Conv2d over cin*kt interleaved channels */
} e3_conv3;

typedef struct e3_bn {
    float *w, *b, *mean, *var;
} e3_bn;

typedef struct e3_tres {
    e3_bn n1, n2;
    e3_conv3 c1, c2;
} e3_tres;

typedef struct e3_level {
    int nblk, nattn;
    e3_res *blk;
    e3_attn *attn;
    bool resample; /* the encoder's downsample (pad (0,1,0,1), 3x3 stride 2) / the decoder's upsample conv */
    mmb_linear rs;
} e3_level;

typedef struct e3_mid {
    e3_res b1, b2;
    e3_attn attn;
} e3_mid;

typedef struct e3_vq {
    e3_cfg cf;
    mmb_linear enc_in, enc_out;
    e3_level enc[E3_MAX_LEVELS];
    e3_mid enc_mid;
    e3_norm enc_nout;
    e3_conv3 enc_time[E3_MAX_TIME];
    e3_tres *enc_tres;
    e3_conv3 quant, post;
    float *code;    /* (codebook, embed) */
    double *code_sq; /* |e|^2 per code */
    e3_tres *dec_tres;
    e3_conv3 dec_time[E3_MAX_TIME];
    mmb_linear dec_in, dec_out;
    e3_mid dec_mid;
    e3_level dec[E3_MAX_LEVELS];
    e3_norm dec_nout;
} e3_vq;

/* ---- config --------------------------------------------------------------------------------------- */

static mmb_status cfg_int(mmb_ctx *ctx, const char *dir, const cJSON *cfg, const char *key, int64_t def, int64_t lo,
                          int64_t hi, int64_t *out) {
    const cJSON *v = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, key) : NULL;
    if (!v || cJSON_IsNull(v)) {
        *out = def;
        return MMB_OK;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: emu3 vq config: %s is not an integer", dir, key);
    if (v->valuedouble < (double)lo || v->valuedouble > (double)hi)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: emu3 vq config: %s = %.0f outside [%lld, %lld]", dir, key,
                        v->valuedouble, (long long)lo, (long long)hi);
    *out = (int64_t)v->valuedouble;
    return MMB_OK;
}

/* A list of small ints (channel_multiplier, attn_resolutions); absent: def. */
static mmb_status cfg_ints(mmb_ctx *ctx, const char *dir, const cJSON *cfg, const char *key, const int *def, int ndef,
                           int *out, int cap, int *n) {
    const cJSON *v = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, key) : NULL;
    if (!v || cJSON_IsNull(v)) {
        memcpy(out, def, sizeof(int) * (size_t)ndef);
        *n = ndef;
        return MMB_OK;
    }
    if (!cJSON_IsArray(v)) return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: emu3 vq config: %s is not a list", dir, key);
    int k = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
        if (!cJSON_IsNumber(e) || e->valuedouble != floor(e->valuedouble) || e->valuedouble < 0 ||
            e->valuedouble > 1024)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: emu3 vq config: %s holds a value that is not a small "
                            "non-negative integer", dir, key);
        if (k == cap)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: emu3 vq config: %s has more than %d entries", dir, key,
                            cap);
        out[k++] = (int)e->valuedouble;
    }
    *n = k;
    return MMB_OK;
}

static mmb_status read_cfg(mmb_ctx *ctx, const char *dir, const cJSON *cfg, e3_cfg *cf) {
    memset(cf, 0, sizeof *cf);
    int64_t in_ch, out_ch, nres, tdf;
    mmb_status s;
    if ((s = cfg_int(ctx, dir, cfg, "codebook_size", 32768, 1, INT32_MAX, &cf->codebook)) ||
        (s = cfg_int(ctx, dir, cfg, "embed_dim", 4, 1, 65536, &cf->embed)) ||
        (s = cfg_int(ctx, dir, cfg, "latent_channels", 4, 1, 65536, &cf->latent)) ||
        (s = cfg_int(ctx, dir, cfg, "in_channels", 3, 3, 3, &in_ch)) ||
        (s = cfg_int(ctx, dir, cfg, "out_channels", 3, 3, 3, &out_ch)) ||
        (s = cfg_int(ctx, dir, cfg, "temporal_downsample_factor", 4, 1, 1 << E3_MAX_TIME, &tdf)) ||
        (s = cfg_int(ctx, dir, cfg, "base_channels", 256, 1, 65536, &cf->base)) ||
        (s = cfg_int(ctx, dir, cfg, "num_res_blocks", 2, 1, 64, &nres)) ||
        (s = cfg_int(ctx, dir, cfg, "hidden_size", 1024, 1, 65536, &cf->hidden)) ||
        (s = cfg_int(ctx, dir, cfg, "num_attention_heads", 1, 1, 65536, &cf->heads)))
        return s;
    const cJSON *dl = cfg ? cJSON_GetObjectItemCaseSensitive(cfg, "double_latent") : NULL;
    if (cJSON_IsTrue(dl))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: emu3 vq config: double_latent = true (transformers' "
                        "quant_conv then takes latent_channels of 2 latent_channels)", dir);
    cf->nres = (int)nres;
    cf->tdf = (int)tdf;
    while ((1 << cf->ntime) < cf->tdf) cf->ntime++;
    if ((1 << cf->ntime) != cf->tdf)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: emu3 vq config: temporal_downsample_factor %d is not a power "
                        "of two", dir, cf->tdf);
    static const int def_mult[] = {1, 2, 2, 4}, def_attn[] = {3};
    int attn[E3_MAX_LEVELS * 2], nattn = 0;
    if ((s = cfg_ints(ctx, dir, cfg, "channel_multiplier", def_mult, 4, cf->mult, E3_MAX_LEVELS, &cf->nlev)) ||
        (s = cfg_ints(ctx, dir, cfg, "attn_resolutions", def_attn, 1, attn, E3_MAX_LEVELS * 2, &nattn)))
        return s;
    if (cf->nlev < 1) return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: emu3 vq config: channel_multiplier is empty", dir);
    for (int i = 0; i < nattn; i++)
        if (attn[i] < cf->nlev) cf->attn_lv[attn[i]] = true;
    cf->factor = 1 << (cf->nlev - 1);
    for (int i = 0; i < cf->nlev; i++) {
        int64_t C = cf->base * cf->mult[i];
        if (cf->mult[i] < 1 || !mmb__groupnorm_ok(C, E3_GROUPS))
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: emu3 vq config: level %d has %lld channels (base_channels "
                            "x channel_multiplier): GroupNorm needs a multiple of %d, at most 4096", dir, i,
                            (long long)C, E3_GROUPS);
        if (cf->attn_lv[i] && C != cf->hidden)
            return mmb__err(ctx, MMB_ERR_SHAPE, "%s/config.json: emu3 vq config: attention at level %d over %lld channels, but "
                            "hidden_size is %lld", dir, i, (long long)C, (long long)cf->hidden);
    }
    if (!mmb__groupnorm_ok(cf->base, E3_GROUPS))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: emu3 vq config: base_channels %lld is not a multiple of %d",
                        dir, (long long)cf->base, E3_GROUPS);
    if (cf->base * cf->mult[cf->nlev - 1] != cf->hidden)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s/config.json: emu3 vq config: the middle block's attention is over %lld channels "
                        "(base_channels x channel_multiplier[-1]), but hidden_size is %lld", dir,
                        (long long)(cf->base * cf->mult[cf->nlev - 1]), (long long)cf->hidden);
    if (cf->hidden % cf->heads)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s/config.json: emu3 vq config: hidden_size %lld is not a multiple of "
                        "num_attention_heads %lld", dir, (long long)cf->hidden, (long long)cf->heads);
    if (cf->embed != cf->latent)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: emu3 vq config: embed_dim %lld != latent_channels %lld (the "
                        "decoder runs its temporal stack on post_quant and quant together)", dir,
                        (long long)cf->embed, (long long)cf->latent);
    return MMB_OK;
}

/* ---- loading -------------------------------------------------------------------------------------- */

static void norm_free(e3_norm *n) {
    free(n->w);
    free(n->b);
    if (n->spatial) {
        mmb__linear_free(&n->cy);
        mmb__linear_free(&n->cb);
    }
}

static void res_free(e3_res *r) {
    norm_free(&r->n1);
    norm_free(&r->n2);
    mmb__linear_free(&r->conv1);
    mmb__linear_free(&r->conv2);
    if (r->has_nin) mmb__linear_free(&r->nin);
}

static void attn_free(e3_attn *a) {
    norm_free(&a->norm);
    mmb__linear_free(&a->qkv);
    mmb__linear_free(&a->out);
    free(a->qkv_w);
    free(a->qkv_b);
}

static void bn_free(e3_bn *b) {
    free(b->w);
    free(b->b);
    free(b->mean);
    free(b->var);
}

static void tres_free(e3_tres *t) {
    bn_free(&t->n1);
    bn_free(&t->n2);
    mmb__linear_free(&t->c1.l);
    mmb__linear_free(&t->c2.l);
}

static void level_free(e3_level *l) {
    for (int j = 0; j < l->nblk; j++) res_free(&l->blk[j]);
    for (int j = 0; j < l->nattn; j++) attn_free(&l->attn[j]);
    free(l->blk);
    free(l->attn);
    if (l->resample) mmb__linear_free(&l->rs);
}

static void mid_free(e3_mid *m) {
    res_free(&m->b1);
    res_free(&m->b2);
    attn_free(&m->attn);
}

static void e3_free(void *state) {
    e3_vq *v = state;
    if (!v) return;
    const e3_cfg *cf = &v->cf;
    mmb__linear_free(&v->enc_in);
    mmb__linear_free(&v->enc_out);
    for (int i = 0; i < cf->nlev; i++) level_free(&v->enc[i]);
    mid_free(&v->enc_mid);
    norm_free(&v->enc_nout);
    for (int i = 0; i < cf->ntime; i++) {
        mmb__linear_free(&v->enc_time[i].l);
        mmb__linear_free(&v->dec_time[i].l);
    }
    if (v->enc_tres)
        for (int i = 0; i < cf->nres; i++) tres_free(&v->enc_tres[i]);
    if (v->dec_tres)
        for (int i = 0; i < cf->nres; i++) tres_free(&v->dec_tres[i]);
    free(v->enc_tres);
    free(v->dec_tres);
    mmb__linear_free(&v->quant.l);
    mmb__linear_free(&v->post.l);
    free(v->code);
    free(v->code_sq);
    mmb__linear_free(&v->dec_in);
    mmb__linear_free(&v->dec_out);
    mid_free(&v->dec_mid);
    for (int i = 0; i < cf->nlev; i++) level_free(&v->dec[i]);
    norm_free(&v->dec_nout);
    free(v);
}

/* A 3x3 stride-1 padding-1 Conv2d {p}{name}. */
static mmb_status load_conv3x3(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, const char *name, int64_t cout,
                               int64_t cin, mmb_linear *l) {
    return mmb__ckpt_conv(ctx, c, p, name, cout, cin, 3, true, l);
}

/* GroupNorm {p}{name} (spatial false) or SpatialNorm {p}{name}.{norm_layer, conv_y, conv_b} over E channels. */
static mmb_status load_norm(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, const char *name, int64_t C, int64_t E,
                            bool spatial, e3_norm *n) {
    n->C = C;
    if (!spatial) return mmb__ckpt_norm(ctx, c, p, name, C, &n->w, &n->b);
    char q[512];
    snprintf(q, sizeof q, "%s%s.", p, name);
    mmb_status s = mmb__ckpt_norm(ctx, c, q, "norm_layer", C, &n->w, &n->b);
    if (s != MMB_OK) return s;
    if ((s = mmb__ckpt_conv1x1(ctx, c, q, "conv_y", C, E, true, &n->cy)) != MMB_OK) return s;
    n->spatial = true; /* from here norm_free frees cy */
    return mmb__ckpt_conv1x1(ctx, c, q, "conv_b", C, E, true, &n->cb);
}

static mmb_status load_res(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, int64_t cin, int64_t cout, int64_t E,
                           bool spatial, e3_res *r) {
    r->cin = cin;
    r->cout = cout;
    mmb_status s;
    if ((s = load_norm(ctx, c, p, "norm1", cin, E, spatial, &r->n1)) ||
        (s = load_norm(ctx, c, p, "norm2", cout, E, spatial, &r->n2)) ||
        (s = load_conv3x3(ctx, c, p, "conv1", cout, cin, &r->conv1)) ||
        (s = load_conv3x3(ctx, c, p, "conv2", cout, cout, &r->conv2)))
        return s;
    if (cin != cout) {
        r->has_nin = true;
        s = mmb__ckpt_conv1x1(ctx, c, p, "nin_shortcut", cout, cin, true, &r->nin);
    }
    return s;
}

/* An Emu3VQVAEAttentionBlock {pa} (q_proj, k_proj, v_proj fused, out_proj) and its norm {pn}{nname}. */
static mmb_status load_attn(mmb_ctx *ctx, const mmb_ckpt *c, const char *pa, const char *pn, const char *nname,
                            int64_t C, int64_t E, bool spatial, e3_attn *a) {
    static const char *const qkv[3] = {"q_proj", "k_proj", "v_proj"};
    a->C = C;
    mmb_status s = load_norm(ctx, c, pn, nname, C, E, spatial, &a->norm);
    if (s == MMB_OK) s = mmb__ckpt_linear_fused(ctx, c, pa, qkv, 3, C, C, &a->qkv, &a->qkv_w, &a->qkv_b);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, pa, "out_proj", C, C, true, &a->out);
    return s;
}

static mmb_status load_mid(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, int64_t C, int64_t E, bool spatial,
                           e3_mid *m) {
    char q[512], qa[512];
    snprintf(q, sizeof q, "%sblock_1.", p);
    mmb_status s = load_res(ctx, c, q, C, C, E, spatial, &m->b1);
    if (s != MMB_OK) return s;
    snprintf(q, sizeof q, "%sblock_2.", p);
    if ((s = load_res(ctx, c, q, C, C, E, spatial, &m->b2)) != MMB_OK) return s;
    snprintf(qa, sizeof qa, "%sattn_1.", p);
    return load_attn(ctx, c, qa, p, "attn_norm", C, E, spatial, &m->attn);
}

/* Emu3VQVAEConv3d {p}{name}.conv (torch nn.Conv3d weight (cout, cin, kt, k, k)), stride (st, 1, 1). */
static mmb_status load_conv3(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, const char *name, int64_t cout,
                             int64_t cin, int kt, int k, int st, e3_conv3 *o) {
    char wn[512], bn[512];
    snprintf(wn, sizeof wn, "%s%s.conv.weight", p, name);
    snprintf(bn, sizeof bn, "%s%s.conv.bias", p, name);
    const int64_t ws[5] = {cout, cin, kt, k, k};
    const mmb_tensor *w = NULL, *b = NULL;
    mmb_status s = mmb__ckpt_bind(ctx, c, wn, 5, ws, &w);
    if (s == MMB_OK) s = mmb__ckpt_bind(ctx, c, bn, 1, &cout, &b);
    if (s != MMB_OK) return s;
    mmb_tensor w2 = *w;
    w2.ndim = 2;
    w2.shape[1] = cin * kt * k * k;
    o->cin = cin;
    o->cout = cout;
    o->kt = kt;
    o->st = st;
    /* Emu3VQVAEConv3d's spatial padding: pad = k - 1 (stride 1), (pad/2 + pad%2) before, pad/2 after */
    const int pad = k - 1, lo = pad / 2 + pad % 2, hi = pad / 2;
    o->g = (mmb_conv2d){.cin = cin * kt, .cout = cout, .kh = k, .kw = k, .stride = 1, .pad = {lo, lo, hi, hi}};
    return mmb__linear_bind(ctx, &o->l, &w2, b);
}

static mmb_status load_bn(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, const char *name, int64_t C, e3_bn *b) {
    char n[512];
    mmb_status s = MMB_OK;
    float **dst[4] = {&b->w, &b->b, &b->mean, &b->var};
    static const char *const sfx[4] = {"weight", "bias", "running_mean", "running_var"};
    for (int i = 0; i < 4 && s == MMB_OK; i++) {
        snprintf(n, sizeof n, "%s%s.%s", p, name, sfx[i]);
        s = mmb__ckpt_vec(ctx, c, n, C, dst[i]);
    }
    return s;
}

static mmb_status load_tres(mmb_ctx *ctx, const mmb_ckpt *c, const char *p, int64_t C, e3_tres *t) {
    mmb_status s;
    if ((s = load_bn(ctx, c, p, "norm1", C, &t->n1)) || (s = load_bn(ctx, c, p, "norm2", C, &t->n2)) ||
        (s = load_conv3(ctx, c, p, "conv1", C, C, 3, 3, 1, &t->c1)) ||
        (s = load_conv3(ctx, c, p, "conv2", C, C, 3, 3, 1, &t->c2)))
        return s;
    return MMB_OK;
}

static mmb_status alloc_level(mmb_ctx *ctx, e3_level *l, int nblk, int nattn) {
    l->blk = calloc((size_t)nblk, sizeof *l->blk);
    l->attn = nattn ? calloc((size_t)nattn, sizeof *l->attn) : NULL;
    if (!l->blk || (nattn && !l->attn)) return mmb__err(ctx, MMB_ERR_NOMEM, "emu3 vq: out of memory");
    l->nblk = nblk;
    l->nattn = nattn;
    return MMB_OK;
}

static mmb_status load_encoder(mmb_ctx *ctx, const mmb_ckpt *c, const char *pre, e3_vq *v) {
    const e3_cfg *cf = &v->cf;
    char p[256], q[512];
    snprintf(p, sizeof p, "%sencoder.", pre);
    mmb_status s = load_conv3x3(ctx, c, p, "conv_in", cf->base, 3, &v->enc_in);
    int64_t cin = cf->base;
    for (int i = 0; i < cf->nlev && s == MMB_OK; i++) {
        e3_level *l = &v->enc[i];
        const int64_t cout = cf->base * cf->mult[i];
        if ((s = alloc_level(ctx, l, cf->nres, cf->attn_lv[i] ? cf->nres : 0)) != MMB_OK) break;
        for (int j = 0; j < cf->nres && s == MMB_OK; j++) {
            snprintf(q, sizeof q, "%sdown_block.down.%d.block.%d.", p, i, j);
            s = load_res(ctx, c, q, cin, cout, cf->embed, false, &l->blk[j]);
            cin = cout;
            if (s == MMB_OK && l->nattn) {
                char qa[512], qn[512], nn[32];
                snprintf(qa, sizeof qa, "%sdown_block.down.%d.attn.%d.", p, i, j);
                snprintf(qn, sizeof qn, "%sdown_block.down.%d.", p, i);
                snprintf(nn, sizeof nn, "attn_norms.%d", j);
                s = load_attn(ctx, c, qa, qn, nn, cout, cf->embed, false, &l->attn[j]);
            }
        }
        if (s == MMB_OK && i != cf->nlev - 1) {
            snprintf(q, sizeof q, "%sdown_block.down.%d.downsample.", p, i);
            l->resample = true;
            s = mmb__ckpt_conv(ctx, c, q, "conv", cout, cout, 3, true, &l->rs);
        }
    }
    if (s == MMB_OK) {
        snprintf(q, sizeof q, "%smiddle_block.", p);
        s = load_mid(ctx, c, q, cin, cf->embed, false, &v->enc_mid);
    }
    if (s == MMB_OK) s = load_norm(ctx, c, p, "norm_out", cin, cf->embed, false, &v->enc_nout);
    if (s == MMB_OK) s = load_conv3x3(ctx, c, p, "conv_out", cf->latent, cin, &v->enc_out);
    for (int i = 0; i < cf->ntime && s == MMB_OK; i++) {
        char nn[32];
        snprintf(nn, sizeof nn, "time_conv.%d.conv", i);
        s = load_conv3(ctx, c, p, nn, cf->latent, cf->latent, 4, 3, 2, &v->enc_time[i]);
    }
    if (s == MMB_OK && !(v->enc_tres = calloc((size_t)cf->nres, sizeof *v->enc_tres)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "emu3 vq: out of memory");
    for (int i = 0; i < cf->nres && s == MMB_OK; i++) {
        snprintf(q, sizeof q, "%stime_res_stack.%d.", p, i);
        s = load_tres(ctx, c, q, cf->latent, &v->enc_tres[i]);
    }
    return s;
}

static mmb_status load_decoder(mmb_ctx *ctx, const mmb_ckpt *c, const char *pre, e3_vq *v) {
    const e3_cfg *cf = &v->cf;
    const int64_t E = cf->embed;
    char p[256], q[512];
    snprintf(p, sizeof p, "%sdecoder.", pre);
    mmb_status s = MMB_OK;
    if (!(v->dec_tres = calloc((size_t)cf->nres, sizeof *v->dec_tres)))
        return mmb__err(ctx, MMB_ERR_NOMEM, "emu3 vq: out of memory");
    for (int i = 0; i < cf->nres && s == MMB_OK; i++) {
        snprintf(q, sizeof q, "%stime_res_stack.%d.", p, i);
        s = load_tres(ctx, c, q, cf->latent, &v->dec_tres[i]);
    }
    for (int i = 0; i < cf->ntime && s == MMB_OK; i++) {
        char nn[32];
        snprintf(nn, sizeof nn, "time_conv.%d.conv", i);
        s = load_conv3(ctx, c, p, nn, cf->latent, cf->latent, 3, 3, 1, &v->dec_time[i]);
    }
    int64_t cin = cf->base * cf->mult[cf->nlev - 1];
    if (s == MMB_OK) s = load_conv3x3(ctx, c, p, "conv_in", cin, cf->latent, &v->dec_in);
    if (s == MMB_OK) {
        snprintf(q, sizeof q, "%smiddle_block.", p);
        s = load_mid(ctx, c, q, cin, E, true, &v->dec_mid);
    }
    for (int i = cf->nlev - 1; i >= 0 && s == MMB_OK; i--) {
        e3_level *l = &v->dec[i];
        const int64_t cout = cf->base * cf->mult[i];
        if ((s = alloc_level(ctx, l, cf->nres + 1, cf->attn_lv[i] ? cf->nres + 1 : 0)) != MMB_OK) break;
        for (int j = 0; j < cf->nres + 1 && s == MMB_OK; j++) {
            snprintf(q, sizeof q, "%sup_block.up.%d.block.%d.", p, i, j);
            s = load_res(ctx, c, q, cin, cout, E, true, &l->blk[j]);
            cin = cout;
            if (s == MMB_OK && l->nattn) {
                char qa[512], qn[512], nn[32];
                snprintf(qa, sizeof qa, "%sup_block.up.%d.attn.%d.", p, i, j);
                snprintf(qn, sizeof qn, "%sup_block.up.%d.", p, i);
                snprintf(nn, sizeof nn, "attn_norms.%d", j);
                s = load_attn(ctx, c, qa, qn, nn, cout, E, true, &l->attn[j]);
            }
        }
        if (s == MMB_OK && i != 0) {
            snprintf(q, sizeof q, "%sup_block.up.%d.upsample.", p, i);
            l->resample = true;
            s = load_conv3x3(ctx, c, q, "conv", cout, cout, &l->rs);
        }
    }
    if (s == MMB_OK) s = load_norm(ctx, c, p, "norm_out", cin, E, true, &v->dec_nout);
    if (s == MMB_OK) s = load_conv3x3(ctx, c, p, "conv_out", 3, cin, &v->dec_out);
    return s;
}

/* cp: "vq_config." (a whole model's config) or "" (the VQ model's own). */
static mmb_status e3_load(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *cp, void **state,
                          mmb_vq_info *info) {
    *state = NULL;
    const cJSON *cfg = c->config;
    if (*cp) {
        char key[64];
        snprintf(key, sizeof key, "%.*s", (int)strcspn(cp, "."), cp);
        cfg = cJSON_GetObjectItemCaseSensitive(c->config, key);
        if (!cJSON_IsObject(cfg))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %s is not an object", c->dir, key);
    }
    if (strlen(prefix) > 128) return mmb__err(ctx, MMB_ERR_ARG, "emu3 vq: weight prefix '%.32s...' too long", prefix);
    e3_vq *v = calloc(1, sizeof *v);
    if (!v) return mmb__err(ctx, MMB_ERR_NOMEM, "emu3 vq: out of memory");
    mmb_status s = read_cfg(ctx, c->dir, cfg, &v->cf);
    if (s != MMB_OK) {
        free(v);
        return s;
    }
    const e3_cfg *cf = &v->cf;
    char q[512];
    s = load_encoder(ctx, c, prefix, v);
    if (s == MMB_OK) s = load_decoder(ctx, c, prefix, v);
    if (s == MMB_OK) s = load_conv3(ctx, c, prefix, "quant_conv", cf->embed, cf->latent, 3, 1, 1, &v->quant);
    if (s == MMB_OK) s = load_conv3(ctx, c, prefix, "post_quant_conv", cf->latent, cf->embed, 3, 1, 1, &v->post);
    if (s == MMB_OK) {
        snprintf(q, sizeof q, "%squantize.embedding.weight", prefix);
        const int64_t shape[2] = {cf->codebook, cf->embed};
        s = mmb__ckpt_floats(ctx, c, q, 2, shape, &v->code);
    }
    if (s == MMB_OK && !(v->code_sq = malloc(sizeof(double) * (size_t)cf->codebook)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "emu3 vq: out of memory");
    if (s != MMB_OK) {
        e3_free(v);
        return s;
    }
    for (int64_t k = 0; k < cf->codebook; k++) {
        double a = 0;
        for (int64_t d = 0; d < cf->embed; d++) a += (double)v->code[k * cf->embed + d] * v->code[k * cf->embed + d];
        v->code_sq[k] = a;
    }
    *info = (mmb_vq_info){.codebook_size = cf->codebook, .embed_dim = cf->embed, .latent_channels = cf->latent,
                          .downsample = cf->factor, .temporal = cf->tdf, .has_encoder = 1, .has_decoder = 1,
                          .in_channels = 3, .out_channels = 3};
    *state = v;
    return MMB_OK;
}

/* ---- workspace ------------------------------------------------------------------------------------ */

typedef struct e3_ws {
    float *x, *t1, *t2; /* maps of any level (rotated) */
    float *qkv, *cs, *as, *zy, *zb, *zq;
    double *gs;
    float *s0, *s1, *s2, *pack, *hid; /* time sequences on the latent grid; the interleaved frames */
    int64_t gh, gw;                   /* the latent grid */
} e3_ws;

static size_t max_sz(size_t a, size_t b) {
    return a > b ? a : b;
}

/* Sizes (floats) of the workspace pieces for one H x W image; false when they overflow. */
typedef struct e3_sizes {
    size_t map, qkv, cs, as, z, seq, pack, gs_bytes;
} e3_sizes;

static bool ws_sizes(mmb_ctx *ctx, const e3_cfg *cf, int64_t H, int64_t W, e3_sizes *z) {
    memset(z, 0, sizeof *z);
    const int64_t gh = H / cf->factor, gw = W / cf->factor, hw = gh * gw, Cl = cf->latent;
    if (H > (1 << 16) || W > (1 << 16)) return false;
    for (int r = 0; r < cf->nlev; r++) {
        const int64_t h = H >> r, w = W >> r;
        int64_t C = cf->base * cf->mult[r];
        if (r > 0 && cf->base * cf->mult[r - 1] > C) C = cf->base * cf->mult[r - 1];
        if (r + 1 < cf->nlev && cf->base * cf->mult[r + 1] > C) C = cf->base * cf->mult[r + 1];
        if (C < cf->base) C = cf->base;
        uint64_t n;
        if (!mmb__mul_ok((uint64_t)(h * w), (uint64_t)C, &n) || n > SIZE_MAX / 64) return false;
        z->map = max_sz(z->map, (size_t)n);
        if (cf->attn_lv[r] || r == cf->nlev - 1) z->qkv = max_sz(z->qkv, (size_t)(3 * h * w * cf->hidden));
        mmb_conv2d g = {.cin = C, .cout = C, .kh = 3, .kw = 3, .stride = 1, .pad = {1, 1, 1, 1}};
        z->cs = max_sz(z->cs, mmb__conv2d_scratch(&g, 1, h, w));
    }
    mmb_conv2d g3 = {.cin = Cl * 4, .cout = Cl, .kh = 3, .kw = 3, .stride = 1, .pad = {1, 1, 1, 1}};
    z->cs = max_sz(z->cs, mmb__conv2d_scratch(&g3, 1, gh, gw));
    z->map = max_sz(z->map, (size_t)(hw * Cl));
    z->as = mmb__attention_scratch(mmb__pool_size(ctx->pool), cf->hidden / cf->heads);
    int64_t cmax = 0;
    for (int r = 0; r < cf->nlev; r++) cmax = cf->base * cf->mult[r] > cmax ? cf->base * cf->mult[r] : cmax;
    z->z = (size_t)(hw * (cmax > cf->embed ? cmax : cf->embed));
    z->seq = (size_t)(hw * Cl * cf->tdf);
    z->pack = (size_t)(hw * Cl * 4);
    z->gs_bytes = mmb__groupnorm_scratch(mmb__pool_size(ctx->pool), E3_GROUPS);
    return true;
}

static mmb_status ws_take(mmb_ctx *ctx, const e3_cfg *cf, int64_t H, int64_t W, e3_ws *ws) {
    e3_sizes z;
    if (!ws_sizes(ctx, cf, H, W, &z))
        return mmb__err(ctx, MMB_ERR_NOMEM, "emu3 vq: an image of %lldx%lld: sizes overflow", (long long)W,
                        (long long)H);
    const size_t f = sizeof(float);
    size_t need = 3 * mmb__arena_piece(f * z.map) + mmb__arena_piece(f * z.qkv) + mmb__arena_piece(f * z.cs) +
                  mmb__arena_piece(f * z.as) + 3 * mmb__arena_piece(f * z.z) + 3 * mmb__arena_piece(f * z.seq) +
                  mmb__arena_piece(f * z.pack) + mmb__arena_piece(f * z.seq) + mmb__arena_piece(z.gs_bytes);
    mmb_status s = mmb__arena_reserve(ctx, &ctx->arena, need);
    if (s != MMB_OK) return s;
    mmb_arena *a = &ctx->arena;
    ws->x = mmb__arena_alloc(a, f * z.map);
    ws->t1 = mmb__arena_alloc(a, f * z.map);
    ws->t2 = mmb__arena_alloc(a, f * z.map);
    ws->qkv = mmb__arena_alloc(a, f * z.qkv);
    ws->cs = mmb__arena_alloc(a, f * z.cs);
    ws->as = mmb__arena_alloc(a, f * z.as);
    ws->zy = mmb__arena_alloc(a, f * z.z);
    ws->zb = mmb__arena_alloc(a, f * z.z);
    ws->zq = mmb__arena_alloc(a, f * z.z);
    ws->s0 = mmb__arena_alloc(a, f * z.seq);
    ws->s1 = mmb__arena_alloc(a, f * z.seq);
    ws->s2 = mmb__arena_alloc(a, f * z.seq);
    ws->hid = mmb__arena_alloc(a, f * z.seq);
    ws->pack = mmb__arena_alloc(a, f * z.pack);
    ws->gs = mmb__arena_alloc(a, z.gs_bytes);
    ws->gh = H / cf->factor;
    ws->gw = W / cf->factor;
    return MMB_OK;
}

/* ---- layers --------------------------------------------------------------------------------------- */

static void swap(float **a, float **b) {
    float *t = *a;
    *a = *b;
    *b = t;
}

static void conv(mmb_ctx *ctx, e3_ws *ws, float *out, const float *x, const mmb_linear *l, int64_t cin, int64_t cout,
                 int stride, int pt, int pl, int pb, int pr, int64_t H, int64_t W) {
    mmb_conv2d g = {.cin = cin, .cout = cout, .kh = 3, .kw = 3, .stride = stride, .pad = {pt, pl, pb, pr}};
    mmb__conv2d_forward(ctx, out, x, l, &g, 1, H, W, ws->cs);
}

static void conv3x3(mmb_ctx *ctx, e3_ws *ws, float *out, const float *x, const mmb_linear *l, int64_t cin,
                    int64_t cout, int64_t H, int64_t W) {
    conv(ctx, ws, out, x, l, cin, cout, 1, 1, 1, 1, 1, H, W);
}

/* torch's nearest source index for F.interpolate(size=out) from in */
static int64_t nearest_src(int64_t dst, int64_t in, int64_t out) {
    if (in == out) return dst;
    if (out == 2 * in) return dst >> 1;
    int64_t s = (int64_t)floorf((float)dst * ((float)in / (float)out));
    return s < in - 1 ? s : in - 1;
}

typedef struct {
    float *x;
    const float *y, *b;
    int64_t H, W, gh, gw, C;
    bool silu;
} modulate_job;

static void modulate_task(void *arg, int tid, int nth) {
    modulate_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->H * j->W, tid, nth, &lo, &hi);
    for (int64_t p = lo; p < hi; p++) {
        const int64_t q = nearest_src(p / j->W, j->gh, j->H) * j->gw + nearest_src(p % j->W, j->gw, j->W);
        float *x = j->x + p * j->C;
        const float *y = j->y + q * j->C, *b = j->b + q * j->C;
        for (int64_t c = 0; c < j->C; c++) {
            float v = x[c] * y[c] + b[c];
            x[c] = j->silu ? v / (1.0f + expf(-v)) : v;
        }
    }
}

/* out = norm(x) (out may alias x), then SiLU when silu. zq: the latent grid (gh, gw, E) for a SpatialNorm. */
static void norm_fwd(mmb_ctx *ctx, e3_ws *ws, const e3_norm *n, float *out, const float *x, int64_t H, int64_t W,
                     bool silu) {
    if (!n->spatial) {
        mmb__groupnorm_forward_mt(ctx, out, x, n->w, n->b, 1, H * W, n->C, E3_GROUPS, E3_GN_EPS, silu, ws->gs);
        return;
    }
    mmb__groupnorm_forward_mt(ctx, out, x, n->w, n->b, 1, H * W, n->C, E3_GROUPS, E3_GN_EPS, false, ws->gs);
    mmb__linear_forward(ctx, ws->zy, ws->zq, ws->gh * ws->gw, &n->cy);
    mmb__linear_forward(ctx, ws->zb, ws->zq, ws->gh * ws->gw, &n->cb);
    modulate_job j = {out, ws->zy, ws->zb, H, W, ws->gh, ws->gw, n->C, silu};
    mmb__pool_run(ctx->pool, modulate_task, &j);
}

/* Emu3VQVAEResnetBlock on ws->x (H, W, cin) -> ws->x (H, W, cout). */
static void res_fwd(mmb_ctx *ctx, e3_ws *ws, const e3_res *r, int64_t H, int64_t W) {
    const int64_t n = H * W * r->cout;
    norm_fwd(ctx, ws, &r->n1, ws->t1, ws->x, H, W, true);
    conv3x3(ctx, ws, ws->t2, ws->t1, &r->conv1, r->cin, r->cout, H, W);
    norm_fwd(ctx, ws, &r->n2, ws->t2, ws->t2, H, W, true);
    conv3x3(ctx, ws, ws->t1, ws->t2, &r->conv2, r->cout, r->cout, H, W);
    if (r->has_nin) {
        mmb__linear_forward(ctx, ws->t2, ws->x, H * W, &r->nin);
        mmb__add_forward_mt(ctx, ws->x, ws->t2, ws->t1, n);
    } else {
        mmb__add_forward_mt(ctx, ws->x, ws->x, ws->t1, n);
    }
}

/* x + attn(norm(x)) on ws->x (H W, C). */
static void attn_fwd(mmb_ctx *ctx, e3_ws *ws, const e3_cfg *cf, const e3_attn *a, int64_t H, int64_t W) {
    const int64_t HW = H * W;
    norm_fwd(ctx, ws, &a->norm, ws->t1, ws->x, H, W, false);
    mmb__linear_forward(ctx, ws->qkv, ws->t1, HW, &a->qkv);
    mmb__attention_forward(ctx, ws->t2, ws->qkv, 1, HW, cf->heads, a->C / cf->heads, ws->as);
    mmb__linear_forward(ctx, ws->t1, ws->t2, HW, &a->out);
    mmb__add_forward_mt(ctx, ws->x, ws->x, ws->t1, HW * a->C);
}

static void mid_fwd(mmb_ctx *ctx, e3_ws *ws, const e3_cfg *cf, const e3_mid *m, int64_t H, int64_t W) {
    res_fwd(ctx, ws, &m->b1, H, W);
    attn_fwd(ctx, ws, cf, &m->attn, H, W);
    res_fwd(ctx, ws, &m->b2, H, W);
}

/* Emu3VQVAEConv3d over a sequence in (T frames of (gh, gw, cin)) -> out (To frames of (gh, gw, cout)); returns
 * To. Output frame o reads input frames o st - 2 + k, k < kt (causal padding (2, 0); zeros outside). */
static int conv3_fwd(mmb_ctx *ctx, e3_ws *ws, const e3_conv3 *c, float *out, const float *in, int T) {
    const int64_t hw = ws->gh * ws->gw, ci = c->cin, kt = c->kt;
    const int To = (T + 2 - c->kt) / c->st + 1;
    for (int o = 0; o < To; o++) {
        for (int64_t k = 0; k < kt; k++) {
            const int64_t t = (int64_t)o * c->st - 2 + k;
            const float *src = t >= 0 && t < T ? in + t * hw * ci : NULL;
            for (int64_t p = 0; p < hw; p++) {
                float *dst = ws->pack + p * ci * kt + k;
                if (src)
                    for (int64_t i = 0; i < ci; i++) dst[i * kt] = src[p * ci + i];
                else
                    for (int64_t i = 0; i < ci; i++) dst[i * kt] = 0.0f;
            }
        }
        mmb__conv2d_forward(ctx, out + o * hw * c->cout, ws->pack, &c->l, &c->g, 1, ws->gh, ws->gw, ws->cs);
    }
    return To;
}

/* BatchNorm3d (eval: running statistics) then SiLU: x (n rows of C) -> out. */
static void bn_silu(const e3_bn *b, float *out, const float *x, int64_t rows, int64_t C) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < C; c++) {
            float v = (x[r * C + c] - b->mean[c]) / sqrtf(b->var[c] + E3_BN_EPS) * b->w[c] + b->b[c];
            out[r * C + c] = v / (1.0f + expf(-v));
        }
}

/* Emu3VQVAETemporalResnetBlock on ws->s0 (T frames), with ws->s1, ws->s2. */
static void tres_fwd(mmb_ctx *ctx, e3_ws *ws, const e3_tres *t, int T, int64_t C) {
    const int64_t rows = (int64_t)T * ws->gh * ws->gw;
    bn_silu(&t->n1, ws->s1, ws->s0, rows, C);
    conv3_fwd(ctx, ws, &t->c1, ws->s2, ws->s1, T);
    bn_silu(&t->n2, ws->s2, ws->s2, rows, C);
    conv3_fwd(ctx, ws, &t->c2, ws->s1, ws->s2, T);
    mmb__add_forward_mt(ctx, ws->s0, ws->s0, ws->s1, rows * C);
}

/* ---- encode --------------------------------------------------------------------------------------- */

typedef struct {
    const e3_vq *v;
    const float *z; /* (n, E) */
    int32_t *codes;
    int64_t n;
} quant_job;

static void quant_task(void *arg, int tid, int nth) {
    quant_job *j = arg;
    const int64_t E = j->v->cf.embed, K = j->v->cf.codebook;
    int64_t lo, hi;
    mmb__split(j->n, tid, nth, &lo, &hi);
    for (int64_t p = lo; p < hi; p++) {
        const float *z = j->z + p * E;
        double zs = 0;
        for (int64_t d = 0; d < E; d++) zs += (double)z[d] * z[d];
        double best = INFINITY;
        int64_t bi = 0;
        for (int64_t k = 0; k < K; k++) {
            const float *e = j->v->code + k * E;
            double dot = 0;
            for (int64_t d = 0; d < E; d++) dot += (double)z[d] * e[d];
            double dist = zs + j->v->code_sq[k] - 2 * dot;
            if (dist < best) { /* the first minimum, as torch.argmin */
                best = dist;
                bi = k;
            }
        }
        j->codes[p] = (int32_t)bi;
    }
}

static mmb_status e3_encode(mmb_ctx *ctx, const void *state, const float *pixels, int64_t batch, int height,
                            int width, int32_t *codes, float *latents) {
    const e3_vq *v = state;
    const e3_cfg *cf = &v->cf;
    if (batch < 1 || height < 1 || width < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "emu3 vq: %lld images of %dx%d", (long long)batch, width, height);
    if (height % cf->factor || width % cf->factor)
        return mmb__err(ctx, MMB_ERR_SHAPE, "emu3 vq: an image of %dx%d: height and width must be multiples of the "
                        "spatial downsampling %d (2^(len(channel_multiplier) - 1))", width, height, cf->factor);
    e3_ws ws;
    mmb_status s = ws_take(ctx, cf, height, width, &ws);
    if (s != MMB_OK) return s;
    const int64_t H = height, W = width, hw = ws.gh * ws.gw, Cl = cf->latent, E = cf->embed;
    for (int64_t b = 0; b < batch; b++) {
        /* planar (3, H, W) -> (H, W, 3) */
        const float *px = pixels + b * 3 * H * W;
        for (int64_t p = 0; p < H * W; p++)
            for (int c = 0; c < 3; c++) ws.t2[p * 3 + c] = px[c * H * W + p];
        conv3x3(ctx, &ws, ws.x, ws.t2, &v->enc_in, 3, cf->base, H, W);
        int64_t h = H, w = W, C = cf->base;
        for (int i = 0; i < cf->nlev; i++) {
            const e3_level *l = &v->enc[i];
            for (int j = 0; j < l->nblk; j++) {
                res_fwd(ctx, &ws, &l->blk[j], h, w);
                C = l->blk[j].cout;
                if (l->nattn) attn_fwd(ctx, &ws, cf, &l->attn[j], h, w);
            }
            if (l->resample) { /* F.pad (0, 1, 0, 1), then 3x3 stride 2 */
                conv(ctx, &ws, ws.t1, ws.x, &l->rs, C, C, 2, 0, 0, 1, 1, h, w);
                swap(&ws.x, &ws.t1);
                h /= 2;
                w /= 2;
            }
        }
        mid_fwd(ctx, &ws, cf, &v->enc_mid, h, w);
        norm_fwd(ctx, &ws, &v->enc_nout, ws.x, ws.x, h, w, true);
        conv3x3(ctx, &ws, ws.s0, ws.x, &v->enc_out, C, Cl, h, w);
        /* the T = temporal_downsample_factor identical frames */
        int T = cf->tdf;
        for (int t = 1; t < T; t++) memcpy(ws.s0 + t * hw * Cl, ws.s0, sizeof(float) * (size_t)(hw * Cl));
        for (int i = 0; i < cf->ntime; i++) {
            T = conv3_fwd(ctx, &ws, &v->enc_time[i], ws.s1, ws.s0, T);
            mmb__act_forward_mt(ctx, ws.s1, T * hw * Cl, MMB_ACT_SILU);
            swap(&ws.s0, &ws.s1);
        }
        for (int i = 0; i < cf->nres; i++) tres_fwd(ctx, &ws, &v->enc_tres[i], T, Cl);
        T = conv3_fwd(ctx, &ws, &v->quant, ws.s1, ws.s0, T);
        if (T != 1) { /* cannot happen for a power-of-two factor */
            mmb__arena_reset(&ctx->arena);
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "emu3 vq: %d latent frames for one image", T);
        }
        quant_job qj = {v, ws.s1, codes + b * hw, hw};
        mmb__pool_run(ctx->pool, quant_task, &qj);
        if (latents) {
            float *lt = latents + b * E * hw;
            for (int64_t p = 0; p < hw; p++)
                for (int64_t d = 0; d < E; d++) lt[d * hw + p] = ws.s1[p * E + d];
        }
    }
    mmb__arena_reset(&ctx->arena);
    return MMB_OK;
}

/* ---- decode --------------------------------------------------------------------------------------- */

/* The decoder's temporal stack on ws->s0 (one frame of (gh, gw, Cl)) -> frame 0 of its output into dst. */
static void dec_time(mmb_ctx *ctx, e3_ws *ws, const e3_vq *v, float *dst) {
    const e3_cfg *cf = &v->cf;
    const int64_t hw = ws->gh * ws->gw, Cl = cf->latent, fr = hw * Cl;
    int T = 1;
    for (int i = 0; i < cf->nres; i++) tres_fwd(ctx, ws, &v->dec_tres[i], T, Cl);
    for (int i = 0; i < cf->ntime; i++) { /* nearest 2x in time, Conv3d, SiLU */
        for (int t = 0; t < 2 * T; t++) memcpy(ws->s1 + t * fr, ws->s0 + (t / 2) * fr, sizeof(float) * (size_t)fr);
        T = conv3_fwd(ctx, ws, &v->dec_time[i], ws->s0, ws->s1, 2 * T);
        mmb__act_forward_mt(ctx, ws->s0, T * fr, MMB_ACT_SILU);
    }
    memcpy(dst, ws->s0, sizeof(float) * (size_t)fr);
}

static mmb_status e3_decode(mmb_ctx *ctx, const void *state, const int32_t *codes, int64_t batch, int gh, int gw,
                            float *pixels) {
    const e3_vq *v = state;
    const e3_cfg *cf = &v->cf;
    if (batch < 1 || gh < 1 || gw < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "emu3 vq: decode of %lld grids of %dx%d", (long long)batch, gw, gh);
    const int64_t hw = (int64_t)gh * gw, E = cf->embed, Cl = cf->latent;
    for (int64_t i = 0; i < batch * hw; i++)
        if (codes[i] < 0 || codes[i] >= cf->codebook)
            return mmb__err(ctx, MMB_ERR_ARG, "emu3 vq: code %d at position %lld is outside the codebook "
                            "(quantize.embedding.weight has %lld codes)", (int)codes[i], (long long)i,
                            (long long)cf->codebook);
    if (gh > (1 << 16) / cf->factor || gw > (1 << 16) / cf->factor)
        return mmb__err(ctx, MMB_ERR_SHAPE, "emu3 vq: a grid of %dx%d is too large", gw, gh);
    const int64_t H = (int64_t)gh * cf->factor, W = (int64_t)gw * cf->factor;
    e3_ws ws;
    mmb_status s = ws_take(ctx, cf, H, W, &ws);
    if (s != MMB_OK) return s;
    for (int64_t b = 0; b < batch; b++) {
        /* quant = embedding rows; post_quant_conv; both through the temporal stack */
        float *quant = ws.s2;
        for (int64_t p = 0; p < hw; p++) memcpy(quant + p * E, v->code + (int64_t)codes[b * hw + p] * E, sizeof(float) * (size_t)E);
        conv3_fwd(ctx, &ws, &v->post, ws.s0, quant, 1);
        memcpy(ws.zq, quant, sizeof(float) * (size_t)(hw * E));
        dec_time(ctx, &ws, v, ws.hid);
        memcpy(ws.s0, ws.zq, sizeof(float) * (size_t)(hw * E));
        dec_time(ctx, &ws, v, ws.zq);
        /* the 2-D decoder on frame 0 */
        int64_t C = cf->base * cf->mult[cf->nlev - 1], h = gh, w = gw;
        conv3x3(ctx, &ws, ws.x, ws.hid, &v->dec_in, Cl, C, h, w);
        mid_fwd(ctx, &ws, cf, &v->dec_mid, h, w);
        for (int i = cf->nlev - 1; i >= 0; i--) {
            const e3_level *l = &v->dec[i];
            for (int j = 0; j < l->nblk; j++) {
                res_fwd(ctx, &ws, &l->blk[j], h, w);
                C = l->blk[j].cout;
                if (l->nattn) attn_fwd(ctx, &ws, cf, &l->attn[j], h, w);
            }
            if (l->resample) {
                mmb__upsample2x_nearest_mt(ctx, ws.t1, ws.x, 1, h, w, C);
                h *= 2;
                w *= 2;
                conv3x3(ctx, &ws, ws.x, ws.t1, &l->rs, C, C, h, w);
            }
        }
        norm_fwd(ctx, &ws, &v->dec_nout, ws.x, ws.x, h, w, true);
        conv3x3(ctx, &ws, ws.t1, ws.x, &v->dec_out, C, 3, h, w);
        float *px = pixels + b * 3 * H * W;
        for (int64_t p = 0; p < H * W; p++)
            for (int c = 0; c < 3; c++) px[c * H * W + p] = ws.t1[p * 3 + c];
    }
    mmb__arena_reset(&ctx->arena);
    return MMB_OK;
}

/* ---- costs ---------------------------------------------------------------------------------------- */

static void norm_cost(const e3_norm *n, int64_t gh, int64_t gw, int64_t H, int64_t W, int64_t *p, int64_t *f) {
    *p += 2 * n->C;
    *f += 8 * H * W * n->C; /* statistics, normalisation, affine */
    if (n->spatial) {
        mmb__linear_cost(&n->cy, gh * gw, p, f);
        mmb__linear_cost(&n->cb, gh * gw, p, f);
        *f += 2 * H * W * n->C;
    }
}

static void res_cost(const e3_res *r, int64_t gh, int64_t gw, int64_t H, int64_t W, int64_t *p, int64_t *f) {
    mmb_conv2d g1 = {r->cin, r->cout, 3, 3, 1, {1, 1, 1, 1}}, g2 = {r->cout, r->cout, 3, 3, 1, {1, 1, 1, 1}};
    norm_cost(&r->n1, gh, gw, H, W, p, f);
    norm_cost(&r->n2, gh, gw, H, W, p, f);
    mmb__conv2d_cost(&r->conv1, &g1, H, W, p, f);
    mmb__conv2d_cost(&r->conv2, &g2, H, W, p, f);
    if (r->has_nin) mmb__linear_cost(&r->nin, H * W, p, f);
}

static void attn_cost(const e3_attn *a, int64_t gh, int64_t gw, int64_t H, int64_t W, int64_t *p, int64_t *f) {
    norm_cost(&a->norm, gh, gw, H, W, p, f);
    mmb__linear_cost(&a->qkv, H * W, p, f);
    mmb__linear_cost(&a->out, H * W, p, f);
    *f += 4 * H * W * H * W * a->C; /* q k^T and the weighted sum of v */
}

static void mid_cost(const e3_mid *m, int64_t gh, int64_t gw, int64_t H, int64_t W, int64_t *p, int64_t *f) {
    res_cost(&m->b1, gh, gw, H, W, p, f);
    attn_cost(&m->attn, gh, gw, H, W, p, f);
    res_cost(&m->b2, gh, gw, H, W, p, f);
}

/* A Conv3d's parameters once, its FLOPs for `frames` output frames. */
static void conv3_cost(const e3_conv3 *c, int frames, int64_t gh, int64_t gw, int64_t *p, int64_t *f) {
    int64_t q = 0;
    mmb__conv2d_cost(&c->l, &c->g, gh, gw, p, f);
    for (int i = 1; i < frames; i++) mmb__conv2d_cost(&c->l, &c->g, gh, gw, &q, f);
}

static void tres_cost(const e3_tres *t, int frames, int64_t gh, int64_t gw, int64_t *p, int64_t *f) {
    *p += 8 * t->c1.cin;
    conv3_cost(&t->c1, frames, gh, gw, p, f);
    conv3_cost(&t->c2, frames, gh, gw, p, f);
}

/* The work as this file does it: the 2-D encoder once per image, the 2-D decoder on frame 0 only. */
static int64_t e3_cost(const void *state, int height, int width, int decode, int64_t *params) {
    const e3_vq *v = state;
    const e3_cfg *cf = &v->cf;
    const int64_t gh = height / cf->factor, gw = width / cf->factor;
    int64_t p = 0, f = 0;
    if (!decode) {
        int64_t h = height, w = width;
        mmb_conv2d gi = {3, cf->base, 3, 3, 1, {1, 1, 1, 1}};
        mmb__conv2d_cost(&v->enc_in, &gi, h, w, &p, &f);
        for (int i = 0; i < cf->nlev; i++) {
            const e3_level *l = &v->enc[i];
            for (int j = 0; j < l->nblk; j++) {
                res_cost(&l->blk[j], gh, gw, h, w, &p, &f);
                if (l->nattn) attn_cost(&l->attn[j], gh, gw, h, w, &p, &f);
            }
            if (l->resample) {
                const int64_t C = l->blk[l->nblk - 1].cout;
                mmb_conv2d gd = {C, C, 3, 3, 2, {0, 0, 1, 1}};
                mmb__conv2d_cost(&l->rs, &gd, h, w, &p, &f);
                h /= 2;
                w /= 2;
            }
        }
        mid_cost(&v->enc_mid, gh, gw, h, w, &p, &f);
        norm_cost(&v->enc_nout, gh, gw, h, w, &p, &f);
        mmb_conv2d go = {v->enc_mid.b2.cout, cf->latent, 3, 3, 1, {1, 1, 1, 1}};
        mmb__conv2d_cost(&v->enc_out, &go, h, w, &p, &f);
        int T = cf->tdf;
        for (int i = 0; i < cf->ntime; i++) {
            T = (T + 2 - 4) / 2 + 1;
            conv3_cost(&v->enc_time[i], T, gh, gw, &p, &f);
        }
        for (int i = 0; i < cf->nres; i++) tres_cost(&v->enc_tres[i], T, gh, gw, &p, &f);
        conv3_cost(&v->quant, 1, gh, gw, &p, &f);
        f += 2 * gh * gw * cf->codebook * cf->embed;
        p += cf->codebook * cf->embed;
    } else {
        conv3_cost(&v->post, 1, gh, gw, &p, &f);
        for (int i = 0; i < cf->nres; i++) tres_cost(&v->dec_tres[i], 2, gh, gw, &p, &f); /* post and quant */
        for (int i = 0, T = 1; i < cf->ntime; i++, T *= 2) conv3_cost(&v->dec_time[i], 2 * 2 * T, gh, gw, &p, &f);
        int64_t h = gh, w = gw, C = cf->base * cf->mult[cf->nlev - 1];
        mmb_conv2d gi = {cf->latent, C, 3, 3, 1, {1, 1, 1, 1}};
        mmb__conv2d_cost(&v->dec_in, &gi, h, w, &p, &f);
        mid_cost(&v->dec_mid, gh, gw, h, w, &p, &f);
        for (int i = cf->nlev - 1; i >= 0; i--) {
            const e3_level *l = &v->dec[i];
            for (int j = 0; j < l->nblk; j++) {
                res_cost(&l->blk[j], gh, gw, h, w, &p, &f);
                if (l->nattn) attn_cost(&l->attn[j], gh, gw, h, w, &p, &f);
            }
            C = l->blk[l->nblk - 1].cout;
            if (l->resample) {
                h *= 2;
                w *= 2;
                mmb_conv2d gu = {C, C, 3, 3, 1, {1, 1, 1, 1}};
                mmb__conv2d_cost(&l->rs, &gu, h, w, &p, &f);
            }
        }
        norm_cost(&v->dec_nout, gh, gw, h, w, &p, &f);
        mmb_conv2d go = {C, 3, 3, 3, 1, {1, 1, 1, 1}};
        mmb__conv2d_cost(&v->dec_out, &go, h, w, &p, &f);
    }
    if (params) *params = p;
    return f;
}

const mmb__vq_kind mmb__vq_emu3 = {
    .model_type = "emu3_vqgan",
    .load = e3_load,
    .encode = e3_encode,
    .decode = e3_decode,
    .cost = e3_cost,
    .free = e3_free,
};
