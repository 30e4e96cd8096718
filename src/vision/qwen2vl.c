/* Qwen2-VL's vision tower (transformers' Qwen2VisionTransformerPretrainedModel) up to its PatchMerger,
 * which the qwen2_vl family (src/models/qwen2vl.c) runs after it. Pixels [B, 3, H, W] (H, W multiples
 * of patch * merge = 28, as Qwen2VLImageProcessor's smart resize makes them) -> the last block's output
 * [B, (H/14) (W/14), embed_dim] in the merge-window order. Single images only: a video's frames
 * (grid_t > 1) are not taken.
 *
 *   patchify     the processor's order: tokens [H/p/m, W/p/m, m, m], so each m x m window of patches
 *                is m^2 consecutive tokens; a token's row is its patch's pixels (C, p, p)
 *   patch_embed  Conv3d(C -> D, kernel = stride = (temporal_patch_size, p, p), no bias) on the image
 *                repeated temporal_patch_size times: the same as a (D, C p p) GEMM whose kernel is the
 *                Conv3d's summed over its temporal taps (done once at load)
 *   rope         2-D rotary embedding (Qwen2VLVisionRotaryEmbedding + apply_rotary_pos_emb_vision): for a
 *                head of hd dims, inv_freq[i] = 1 / theta^(2i / (hd/2)), i < hd/4; the hd/2 angles are
 *                row * inv_freq then column * inv_freq (the patch's position in the full grid), and
 *                rotate_half pairs dim j with dim j + hd/2: q' = q cos + rotate_half(q) sin, same for k
 *   block i      x += proj(attn(rope(qkv(LN1 x))));  x += fc2(act(fc1(LN2 x)));  LayerNorm eps 1e-6,
 *                qkv one Linear(D -> 3D) laid out [q | k | v], heads inside; attention over the patches
 *                of one image (cu_seqlens: one sequence per image), scale 1/sqrt(hd)
 *   merger       ln_q, 2x2 windows concatenated, mlp: src/connectors/patch_merger.c
 * Weights: visual.* (save_pretrained, the hub files) or model.visual.* (transformers' module names). */
#include "vision/vision.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define Q2_EPS 1e-6f   /* Qwen2VLVisionBlock's and PatchMerger's LayerNorm(eps=1e-6), not configurable */

typedef struct {
    float *n1_w, *n1_b, *n2_w, *n2_b;  /* (D) */
    mmb_linear qkv, proj, fc1, fc2;    /* (3D, D), (D, D), (I, D), (D, I) */
} q2_block;

struct mmb_q2vit {
    int depth, width, heads, inter, patch, merge, tpatch, out;
    double theta;
    mmb_act act;
    char prefix[16];
    float *patch_w;          /* (D, 3 p p): the Conv3d kernel summed over its temporal taps */
    mmb_linear patch_embed;
    float *inv_freq;         /* (hd / 4) */
    q2_block *blocks;
};

void mmb__q2vit_free(mmb_q2vit *q) {
    if (!q) return;
    for (int i = 0; q->blocks && i < q->depth; i++) {
        q2_block *b = &q->blocks[i];
        free(b->n1_w); free(b->n1_b); free(b->n2_w); free(b->n2_b);
        mmb__linear_free(&b->qkv);
        mmb__linear_free(&b->proj);
        mmb__linear_free(&b->fc1);
        mmb__linear_free(&b->fc2);
    }
    free(q->blocks);
    mmb__linear_free(&q->patch_embed);
    free(q->patch_w);
    free(q->inv_freq);
    free(q);
}

/* Qwen2VLVisionConfig under "vision_config.", with the class's defaults for absent keys. */
static mmb_status read_config(mmb_ctx *ctx, const mmb_ckpt *c, mmb_q2vit *q) {
    struct { const char *key; int def, *dst; } ints[] = {
        {"depth", 32, &q->depth},          {"embed_dim", 1280, &q->width},   {"hidden_size", 3584, &q->out},
        {"num_heads", 16, &q->heads},      {"patch_size", 14, &q->patch},    {"spatial_merge_size", 2, &q->merge},
        {"temporal_patch_size", 2, &q->tpatch},
    };
    mmb_status s = MMB_OK;
    char key[96];
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && s == MMB_OK; i++) {
        int64_t v = ints[i].def;
        snprintf(key, sizeof key, "vision_config.%s", ints[i].key);
        mmb__cfg_int(ctx, c, key, &v, &s);
        if (s == MMB_OK && (v < 1 || v > (1 << 20)))
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld is out of range", c->dir, key, (long long)v);
        *ints[i].dst = (int)v;
    }
    double ratio = 4, theta = 10000, channels = 3;
    const char *act = "quick_gelu";
    if (s == MMB_OK) mmb__cfg_num(ctx, c, "vision_config.mlp_ratio", &ratio, &s);
    if (s == MMB_OK) mmb__cfg_num(ctx, c, "vision_config.in_channels", &channels, &s);
    if (s == MMB_OK) mmb__cfg_num(ctx, c, "vision_config.rope_parameters.rope_theta", &theta, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "vision_config.hidden_act", &act, &s);
    if (s != MMB_OK) return s;
    if (!(ratio > 0 && ratio * q->width <= (1 << 24)) || !(theta > 0) || q->depth > 4096)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config: mlp_ratio %g, rope_theta %g or depth %d "
                        "is out of range", c->dir, ratio, theta, q->depth);
    if (channels != 3)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_config.in_channels %g (RGB, 3, is "
                        "supported)", c->dir, channels);
    if (q->width % q->heads || (q->width / q->heads) % 4)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config: embed_dim %d / num_heads %d must be a "
                        "head size divisible by 4 (its rotary embedding splits it in four)", c->dir, q->width,
                        q->heads);
    if (!mmb__act_parse(act, &q->act))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_config.hidden_act '%s' is not supported",
                        c->dir, act);
    q->inter = (int)(q->width * ratio);  /* int(embed_dim * mlp_ratio) */
    q->theta = theta;
    return MMB_OK;
}

/* patch_embed.proj.weight [D, 3, T, p, p] -> patch_w (D, 3 p p), summed over T, as a linear layer. */
static mmb_status load_patch_embed(mmb_ctx *ctx, const mmb_ckpt *c, mmb_q2vit *q) {
    const int64_t D = q->width, T = q->tpatch, pp = (int64_t)q->patch * q->patch, K = 3 * pp;
    char name[96];
    snprintf(name, sizeof name, "%spatch_embed.proj.weight", q->prefix);
    const int64_t shape[5] = {D, 3, T, q->patch, q->patch};
    const mmb_tensor *w;
    mmb_status s = mmb__ckpt_bind(ctx, c, name, 5, shape, &w);
    if (s != MMB_OK) return s;
    float *all = malloc(sizeof(float) * (size_t)(D * K * T));
    q->patch_w = calloc((size_t)(D * K), sizeof(float));
    if (!all || !q->patch_w) { free(all); return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir); }
    mmb_to_f32(all, w->data, w->dtype, (size_t)(D * K * T));
    for (int64_t d = 0; d < D; d++)
        for (int64_t ch = 0; ch < 3; ch++)
            for (int64_t t = 0; t < T; t++)
                for (int64_t k = 0; k < pp; k++)
                    q->patch_w[(d * 3 + ch) * pp + k] += all[((d * 3 + ch) * T + t) * pp + k];
    free(all);
    mmb_tensor w2 = {.name = "patch_embed", .dtype = MMB_F32, .ndim = 2, .shape = {D, K}, .data = q->patch_w};
    return mmb__linear_bind(ctx, &q->patch_embed, &w2, NULL);
}

static mmb_status load_weights(mmb_ctx *ctx, const mmb_ckpt *c, mmb_q2vit *q) {
    const int64_t D = q->width, I = q->inter, hd = D / q->heads;
    mmb_status s = load_patch_embed(ctx, c, q);
    if (s == MMB_OK && !(q->blocks = calloc((size_t)q->depth, sizeof *q->blocks)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    for (int i = 0; i < q->depth && s == MMB_OK; i++) {
        q2_block *b = &q->blocks[i];
        char lp[64];
        snprintf(lp, sizeof lp, "%sblocks.%d.", q->prefix, i);
        s = mmb__ckpt_norm(ctx, c, lp, "norm1", D, &b->n1_w, &b->n1_b);
        if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, lp, "norm2", D, &b->n2_w, &b->n2_b);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "attn.qkv", 3 * D, D, true, &b->qkv);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "attn.proj", D, D, true, &b->proj);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc1", I, D, true, &b->fc1);
        if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, lp, "mlp.fc2", D, I, true, &b->fc2);
    }
    if (s == MMB_OK && !(q->inv_freq = malloc(sizeof(float) * (size_t)(hd / 4))))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    /* 1 / theta^(arange(0, hd/2, 2) / (hd/2)), in float32 as torch computes it */
    for (int64_t i = 0; i < hd / 4 && s == MMB_OK; i++)
        q->inv_freq[i] = 1.0f / powf((float)q->theta, (float)(2 * i) / (float)(hd / 2));
    return s;
}

mmb_status mmb__q2vit_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_q2vit **out) {
    mmb_q2vit *q = calloc(1, sizeof *q);
    if (!q) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    static const char *const prefixes[] = {"visual.", "model.visual."};
    snprintf(q->prefix, sizeof q->prefix, "%s", prefixes[0]);
    for (int i = 1; i >= 0; i--) {
        char name[96];
        snprintf(name, sizeof name, "%spatch_embed.proj.weight", prefixes[i]);
        if (mmb__ckpt_find(c, name, NULL)) snprintf(q->prefix, sizeof q->prefix, "%s", prefixes[i]);
    }
    mmb_status s = read_config(ctx, c, q);
    if (s == MMB_OK) s = load_weights(ctx, c, q);
    if (s != MMB_OK) { mmb__q2vit_free(q); return s; }
    *out = q;
    return MMB_OK;
}

mmb_q2vit_info mmb__q2vit_info(const mmb_q2vit *q) {
    return (mmb_q2vit_info){.depth = q->depth, .width = q->width, .patch = q->patch, .merge = q->merge,
                            .out = q->out, .eps = Q2_EPS, .prefix = q->prefix};
}

int64_t mmb__q2vit_tokens(mmb_ctx *ctx, const mmb_q2vit *q, int height, int width) {
    const int f = q->patch * q->merge;
    if (height < f || width < f || height % f || width % f) {
        mmb__err(ctx, MMB_ERR_SHAPE, "pixels of %dx%d: Qwen2-VL takes a height and width that are multiples of %d "
                 "(patch_size %d x spatial_merge_size %d), as its image processor's smart resize makes them", width,
                 height, f, q->patch, q->merge);
        return -1;
    }
    return (int64_t)(height / q->patch) * (width / q->patch);
}

/* Row and column, in the grid of gw patches per row, of token t in the merge-window order. */
static void window_pos(int64_t t, int64_t gw, int m, int64_t *gy, int64_t *gx) {
    const int64_t win = t / (m * m), in = t % (m * m), wpr = gw / m;
    *gy = win / wpr * m + in / m;
    *gx = win % wpr * m + in % m;
}

/* pixels (B, 3, H, W) -> rows (B * T, 3 p p): token t of image b is the patch at window_pos(t), its
 * pixels in (c, ky, kx) order, as the processor's flattening [gh/m, gw/m, m, m, C, (T,) p, p]. */
static void patchify(float *rows, const float *px, int64_t B, int H, int W, int p, int m) {
    const int64_t gw = W / p, T = (int64_t)(H / p) * gw, P = 3 * (int64_t)p * p;
    for (int64_t r = 0; r < B * T; r++) {
        int64_t b = r / T, gy, gx;
        window_pos(r % T, gw, m, &gy, &gx);
        for (int c = 0; c < 3; c++)
            for (int ky = 0; ky < p; ky++)
                memcpy(rows + r * P + (c * p + ky) * p, px + ((b * 3 + c) * H + gy * p + ky) * W + gx * p,
                       sizeof(float) * (size_t)p);
    }
}

/* The rotary tables of one image, (T, hd) as [cos (hd/2) | sin (hd/2)] per token: angle j is
 * row * inv_freq[j] for j < hd/4, column * inv_freq[j - hd/4] after (float32, as torch). */
static void rope_tables(float *cs, const mmb_q2vit *q, int64_t T, int64_t gw) {
    const int64_t hd = q->width / q->heads, quarter = hd / 4;
    for (int64_t t = 0; t < T; t++) {
        int64_t gy, gx;
        window_pos(t, gw, q->merge, &gy, &gx);
        float *c = cs + t * hd, *s = c + hd / 2;
        for (int64_t j = 0; j < hd / 2; j++) {
            const float a = (float)(j < quarter ? gy : gx) * q->inv_freq[j % quarter];
            c[j] = cosf(a);
            s[j] = sinf(a);
        }
    }
}

typedef struct {
    float *qkv;              /* (rows, 3D) */
    const float *cs;         /* (T, hd) */
    int64_t rows, T, heads, hd;
} rope_job;

/* q and k of every head of every row, in place: v[j] = v[j] cos - v[j + hd/2] sin,
 * v[j + hd/2] = v[j + hd/2] cos + v[j] sin (apply_rotary_pos_emb_vision). */
static void rope_fn(void *arg, int tid, int nth) {
    const rope_job *j = arg;
    const int64_t D = j->heads * j->hd, half = j->hd / 2;
    int64_t lo, hi;
    mmb__split(j->rows, tid, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        const float *c = j->cs + (r % j->T) * j->hd, *s = c + half;
        for (int64_t h = 0; h < 2 * j->heads; h++) {  /* q's heads, then k's */
            float *v = j->qkv + r * 3 * D + h * j->hd;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i] + a * s[i];
            }
        }
    }
}

/* One block on x (B*T, D), in place. Buffers: xn, att (B*T, D), qkv (B*T, 3D), h (B*T, I). */
static void block_forward(mmb_ctx *ctx, const mmb_q2vit *q, const q2_block *l, float *x, float *xn, float *qkv,
                          float *att, float *h, float *asc, const float *cs, int64_t B, int64_t T) {
    const int64_t D = q->width, rows = B * T, hd = D / q->heads;
    mmb__layernorm_forward_mt(ctx, xn, x, l->n1_w, l->n1_b, rows, D, Q2_EPS);
    mmb__linear_forward(ctx, qkv, xn, rows, &l->qkv);
    rope_job rj = {qkv, cs, rows, T, q->heads, hd};
    mmb__pool_run(ctx->pool, rope_fn, &rj);
    mmb__attention_forward(ctx, att, qkv, B, T, q->heads, hd, asc);
    mmb__linear_forward(ctx, xn, att, rows, &l->proj);
    mmb__add_forward(x, x, xn, rows * D);
    mmb__layernorm_forward_mt(ctx, xn, x, l->n2_w, l->n2_b, rows, D, Q2_EPS);
    mmb__linear_forward(ctx, h, xn, rows, &l->fc1);
    mmb__act_forward_mt(ctx, h, rows * q->inter, q->act);
    mmb__linear_forward(ctx, xn, h, rows, &l->fc2);
    mmb__add_forward(x, x, xn, rows * D);
}

mmb_status mmb__q2vit_forward(mmb_ctx *ctx, const mmb_q2vit *q, const float *pixels, int64_t B, int height, int width,
                              float *x) {
    const int64_t T = mmb__q2vit_tokens(ctx, q, height, width);
    if (T < 0) return MMB_ERR_SHAPE;
    const int64_t D = q->width, hd = D / q->heads, P = 3 * (int64_t)q->patch * q->patch, gw = width / q->patch;
    const int64_t wide = P > q->inter ? P : q->inter;  /* the patch rows, then the MLP's hidden layer */
    const size_t asc_n = mmb__attention_scratch(mmb__pool_size(ctx->pool), hd);
    uint64_t rows, n[6] = {0};
    if (!mmb__mul_ok((uint64_t)B, (uint64_t)T, &rows) || !mmb__mul_ok(rows, (uint64_t)wide, &n[0]) ||
        !mmb__mul_ok(rows, 3 * (uint64_t)D, &n[1]) || !mmb__mul_ok(rows, (uint64_t)D, &n[2]) ||
        !mmb__mul_ok((uint64_t)T, (uint64_t)hd, &n[3]) || n[0] > SIZE_MAX / 64 || n[1] > SIZE_MAX / 64)
        return mmb__err(ctx, MMB_ERR_NOMEM, "qwen2_vl: %lld images of %dx%d: sizes overflow", (long long)B, width,
                        height);
    const size_t f = sizeof(float);
    size_t need = mmb__arena_piece(f * n[0]) + mmb__arena_piece(f * n[1]) + 2 * mmb__arena_piece(f * n[2]) +
                  mmb__arena_piece(f * n[3]) + mmb__arena_piece(f * asc_n);
    mmb_status s = mmb__arena_reserve(ctx, &ctx->arena, need);
    if (s != MMB_OK) return s;
    mmb_arena *a = &ctx->arena;
    float *wbuf = mmb__arena_alloc(a, f * n[0]), *qkv = mmb__arena_alloc(a, f * n[1]);
    float *xn = mmb__arena_alloc(a, f * n[2]), *att = mmb__arena_alloc(a, f * n[2]);
    float *cs = mmb__arena_alloc(a, f * n[3]), *asc = mmb__arena_alloc(a, f * asc_n);
    patchify(wbuf, pixels, B, height, width, q->patch, q->merge);
    mmb__linear_forward(ctx, x, wbuf, (int64_t)rows, &q->patch_embed);
    rope_tables(cs, q, T, gw);
    for (int i = 0; i < q->depth; i++)
        block_forward(ctx, q, &q->blocks[i], x, xn, qkv, att, wbuf, asc, cs, B, T);
    mmb__arena_reset(a);
    return MMB_OK;
}
