/* LLaVA-NeXT (LlavaNextForConditionalGeneration) and LLaVA-OneVision (LlavaOnevisionForConditionalGeneration):
 * AnyRes. An image is its base tile and the tiles of its best resolution (vision/anyres.c makes them), each run
 * through the tower (CLIP or SigLIP, vision/vit.c) at vision_feature_layer (an int or a list, concatenated on
 * channels), CLS dropped under the "default" strategy, then LlavaMultiModalProjector; then pack_image_features:
 * the tiles' features laid out as their grid (gh g x gw g positions, g = image_size / patch_size), unpad_image for
 * the image's own size, OneVision's anyres_max_N (bilinear downscale, align_corners False, when the kept grid is
 * more than 1.1 x sqrt(N) tiles' worth), image_newline after each row; the base tile's rows first.
 * An image's rows depend on its own size (the unpadding), so the family is driven through image_tokens /
 * encode_image with the image's height and width; pixels alone (tokens / encode) are refused. */
#include "models/models.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    mmb_vit *vit;
    mmb_vit_info vi;
    const mmb_connector_ops *ops;
    void *conn;
    float *newline;        /* image_newline (D) */
    int n_taps, taps[MMB_MAX_TAPS];
    bool drop_cls;         /* "default": hidden_states[:, 1:] */
    int g;                 /* patches a tile's side */
    int64_t per_tile;      /* g * g rows a tile after selection */
    int64_t d;             /* the LLM's width */
    int max_tiles;         /* OneVision: anyres_max_N's N; 0: LLaVA-NeXT (no downscale) */
    int n_pins, pins[MMB_MAX_PINPOINTS][2];
    const char *name;
    const char *dir;
} ar_state;

static void ar_free(void *st) {
    ar_state *a = st;
    if (!a) return;
    if (a->conn) a->ops->free(a->conn);
    mmb_vit_free(a->vit);
    free(a->newline);
    free(a);
}

/* image_grid_pinpoints of config.json: [[h, w], ...], each side a positive multiple of the tower's image_size. */
static mmb_status read_pins(mmb_ctx *ctx, const mmb_ckpt *c, ar_state *a) {
    const cJSON *g = cJSON_GetObjectItemCaseSensitive(c->config, "image_grid_pinpoints");
    const int S = a->vi.image_size;
    if (!g && a->max_tiles) { /* LlavaOnevisionConfig's default: the 6 x 6 grid of 384 multiples */
        a->n_pins = 36;
        for (int i = 0; i < 36; i++) {
            a->pins[i][0] = 384 * (1 + i / 6);
            a->pins[i][1] = 384 * (1 + i % 6);
        }
    } else if (!g) { /* LlavaNextConfig's default */
        static const int def[4][2] = {{336, 672}, {672, 336}, {672, 672}, {1008, 336}};
        a->n_pins = 4;
        memcpy(a->pins, def, sizeof def);
    } else {
        const int n = cJSON_GetArraySize(g);
        if (!cJSON_IsArray(g) || n < 1 || n > MMB_MAX_PINPOINTS)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: image_grid_pinpoints is not a list of 1..%d "
                            "[height, width] pairs", c->dir, MMB_MAX_PINPOINTS);
        int i = 0;
        for (const cJSON *e = g->child; e; e = e->next, i++) {
            const cJSON *h = cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 ? e->child : NULL;
            if (!h || !cJSON_IsNumber(h) || !cJSON_IsNumber(h->next) || h->valuedouble < 1 ||
                h->valuedouble > 65536 || h->next->valuedouble < 1 || h->next->valuedouble > 65536 ||
                h->valuedouble != (int)h->valuedouble || h->next->valuedouble != (int)h->next->valuedouble)
                return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: image_grid_pinpoints[%d] is not a [height, "
                                "width] pair of integers in 1..65536", c->dir, i);
            a->pins[i][0] = (int)h->valuedouble;
            a->pins[i][1] = (int)h->next->valuedouble;
        }
        a->n_pins = n;
    }
    for (int i = 0; i < a->n_pins; i++)
        if (a->pins[i][0] % S || a->pins[i][1] % S)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: image_grid_pinpoints[%d] = [%d, %d] does not divide "
                            "into tiles of the vision tower's image_size %d", c->dir, i, a->pins[i][0], a->pins[i][1],
                            S);
    return MMB_OK;
}

static mmb_status ar_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state, mmb_model_info *info) {
    ar_state *a = calloc(1, sizeof *a);
    if (!a) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    a->name = fam->name;
    a->dir = c->dir;
    a->max_tiles = strcmp(fam->name, "llava_onevision") == 0 ? 9 : 0;
    mmb_status s = mmb__vit_load(ctx, c, &a->vit);
    const char *act = "gelu", *strategy = a->max_tiles ? "full" : "default", *aspect = "anyres_max_9";
    bool bias = true;
    if (s == MMB_OK) {
        mmb_vit_get_info(a->vit, &a->vi);
        mmb__cfg_str(ctx, c, "projector_hidden_act", &act, &s);
    }
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "vision_feature_select_strategy", &strategy, &s);
    if (s == MMB_OK) mmb__cfg_bool(ctx, c, "multimodal_projector_bias", &bias, &s);
    if (s == MMB_OK && a->max_tiles) mmb__cfg_str(ctx, c, "vision_aspect_ratio", &aspect, &s);
    if (s == MMB_OK && !mmb__cfg_ints(ctx, c, "vision_feature_layer", a->taps, MMB_MAX_TAPS, &a->n_taps, &s)) {
        a->taps[0] = a->max_tiles ? -1 : -2;
        a->n_taps = 1;
    }
    int64_t d = 4096;
    if (s == MMB_OK && !mmb__cfg_int(ctx, c, "text_config.hidden_size", &d, &s) && s == MMB_OK) d = 4096;
    if (s != MMB_OK) goto fail;
    const mmb_vit_info *vi = &a->vi;
    if (d < 1 || d > (1 << 20)) {
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: text_config.hidden_size %lld is out of range", c->dir,
                     (long long)d);
        goto fail;
    }
    a->d = d;
    if (strcmp(strategy, "default") != 0 && strcmp(strategy, "full") != 0) {
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_feature_select_strategy '%s' (expected "
                     "'default' or 'full')", c->dir, strategy);
        goto fail;
    }
    a->drop_cls = strcmp(strategy, "default") == 0;
    if (a->max_tiles) {
        char *end = NULL;
        long n = strncmp(aspect, "anyres_max_", 11) == 0 ? strtol(aspect + 11, &end, 10) : 0;
        if (n < 1 || n > 1024 || !end || *end) {
            s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_aspect_ratio '%s' (anyres_max_N is "
                         "supported)", c->dir, aspect);
            goto fail;
        }
        a->max_tiles = (int)n;
    }
    if (vi->patch_size < 1 || vi->image_size % vi->patch_size) {
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config image_size %d is not a multiple of its "
                     "patch_size %d", c->dir, vi->image_size, vi->patch_size);
        goto fail;
    }
    a->g = vi->image_size / vi->patch_size;
    a->per_tile = (int64_t)a->g * a->g;
    if (vi->tokens - (a->drop_cls ? 1 : 0) != a->per_tile) {
        s = mmb__err(ctx, MMB_ERR_SHAPE, "%s: the tower makes %lld tokens a tile; under the '%s' strategy %lld remain, "
                     "but the tile's grid is %dx%d (%s drops the CLS token: a tower %s one)", c->dir,
                     (long long)vi->tokens, strategy, (long long)(vi->tokens - (a->drop_cls ? 1 : 0)), a->g, a->g,
                     "'default'", a->drop_cls ? "without" : "with");
        goto fail;
    }
    for (int i = 0; i < a->n_taps; i++) {
        int t = a->taps[i] < 0 ? a->taps[i] + vi->layers + 1 : a->taps[i];
        if (t < 0 || t > vi->layers) {
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_feature_layer %d is outside the tower's %d "
                         "hidden states", c->dir, a->taps[i], vi->layers + 1);
            goto fail;
        }
    }
    if ((s = read_pins(ctx, c, a)) != MMB_OK) goto fail;
    mmb_conn_cfg cc = {.type = "llava", .in_width = (int64_t)vi->width * a->n_taps, .out_width = d, .bias = bias,
                       .eps = 1e-5f};
    if (!mmb__act_parse(act, &cc.act)) {
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: projector_hidden_act '%s' is not supported", c->dir,
                     act);
        goto fail;
    }
    const bool nested = mmb__ckpt_find(c, "model.multi_modal_projector.linear_1.weight", NULL) != NULL;
    cc.prefix = nested ? "model.multi_modal_projector." : "multi_modal_projector.";
    a->ops = mmb__connector_find("llava");
    if (!a->ops) {
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "the llava connector is not registered");
        goto fail;
    }
    if ((s = a->ops->load(ctx, c, &cc, &a->conn)) != MMB_OK) goto fail;
    if (a->ops->out_width(a->conn) != d) {
        s = mmb__err(ctx, MMB_ERR_SHAPE, "%s: the projector makes %lld-wide rows, text_config.hidden_size is %lld",
                     c->dir, (long long)a->ops->out_width(a->conn), (long long)d);
        goto fail;
    }
    const char *nl = mmb__ckpt_find(c, "model.image_newline", NULL) ? "model.image_newline" : "image_newline";
    s = mmb__ckpt_vec(ctx, c, nl, d, &a->newline);
    if (s != MMB_OK) goto fail;
    int64_t flops = 0;
    info->connector = a->ops->name;
    info->activation = mmb__connector_activation(a->ops, a->conn);
    info->select_strategy = a->drop_cls ? "default" : "full";
    info->n_taps = a->n_taps;
    memcpy(info->taps, a->taps, sizeof a->taps);
    info->vision_layers = vi->layers;
    info->vision_width = vi->width;
    info->in_width = vi->width * a->n_taps;
    info->out_width = (int)d;
    info->image_size = vi->image_size;
    info->patch_size = vi->patch_size;
    info->tokens_per_image = 0; /* it depends on the image's size */
    a->ops->cost(a->conn, a->per_tile, &info->params, &flops);
    info->params += vi->params + d;
    info->flops_per_image = vi->flops_per_image + flops; /* a tile's */
    const mmb_tensor *w = mmb__ckpt_find(c, nested ? "model.multi_modal_projector.linear_1.weight"
                                                   : "multi_modal_projector.linear_1.weight", NULL);
    info->weight_dtype = w ? w->dtype : MMB_F32;
    *state = a;
    return MMB_OK;
fail:
    ar_free(a);
    return s;
}

/* The packing of an image of h x w: its best resolution's grid gh x gw tiles, the unpadded grid's kept window
 * (top, rows, left, cols of the gh g x gw g feature grid) and the size it is downscaled to (oh x ow: rows x cols
 * when it is not). */
typedef struct { int gh, gw, top, rows, left, cols, oh, ow; } ar_plan;

static mmb_status plan(mmb_ctx *ctx, const ar_state *a, int h, int w, ar_plan *p) {
    if (h < 1 || w < 1) return mmb__err(ctx, MMB_ERR_ARG, "%s: an image of %dx%d", a->name, w, h);
    int bh = 0, bw = 0;
    mmb__anyres_best(h, w, a->pins, a->n_pins, &bh, &bw);
    const int S = a->vi.image_size;
    p->gh = bh / S;
    p->gw = bw / S;
    const int ch = p->gh * a->g, cw = p->gw * a->g;
    mmb__anyres_unpad(h, w, ch, cw, &p->top, &p->rows, &p->left, &p->cols);
    if (p->rows < 1 || p->cols < 1 || p->top < 0 || p->left < 0)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: an image of %dx%d unpads to nothing", a->name, w, h);
    p->oh = p->rows;
    p->ow = p->cols;
    if (a->max_tiles) {
        const double ratio = sqrt((double)p->rows * p->cols / ((double)a->max_tiles * a->g * a->g));
        if (ratio > 1.1) {
            p->oh = (int)floor(p->rows / ratio);
            p->ow = (int)floor(p->cols / ratio);
            if (p->oh < 1 || p->ow < 1)
                return mmb__err(ctx, MMB_ERR_SHAPE, "%s: an image of %dx%d downscales to nothing", a->name, w, h);
        }
    }
    return MMB_OK;
}

static int64_t ar_image_tokens(mmb_ctx *ctx, const void *st, int h, int w, int64_t *tiles) {
    const ar_state *a = st;
    ar_plan p;
    if (plan(ctx, a, h, w, &p) != MMB_OK) return -1;
    if (tiles) *tiles = 1 + (int64_t)p.gh * p.gw;
    return a->per_tile + (int64_t)p.oh * (p.ow + 1);
}

static int64_t ar_tokens(mmb_ctx *ctx, const void *st, int h, int w) {
    const ar_state *a = st;
    return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: pixels of %dx%d alone: a %s model's image rows depend on the "
                    "image's own size (AnyRes unpadding); encode the image (a file or RGB pixels), not preprocessed "
                    "pixels", a->dir, w, h, a->name), -1;
}

static mmb_status ar_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t batch, int h, int w,
                            float *out) {
    (void)pixels;
    (void)batch;
    (void)out;
    return ar_tokens(ctx, st, h, w) < 0 ? MMB_ERR_UNSUPPORTED : MMB_OK;
}

/* torch's bilinear interpolate (align_corners False, no antialias) of the grid src (rows x cols positions of d)
 * to oh x ow: source coordinate (i + 0.5) * in / out - 0.5, clamped at 0, in float as its CPU kernel. */
static void bilinear(const float *src, int rows, int cols, int64_t d, float *dst, int oh, int ow) {
    const float sy = (float)rows / (float)oh, sx = (float)cols / (float)ow;
    for (int y = 0; y < oh; y++) {
        float fy = ((float)y + 0.5f) * sy - 0.5f;
        if (fy < 0) fy = 0;
        int y0 = (int)fy, y1 = y0 + 1 < rows ? y0 + 1 : rows - 1;
        float ly = fy - (float)y0, hy = 1.0f - ly;
        for (int x = 0; x < ow; x++) {
            float fx = ((float)x + 0.5f) * sx - 0.5f;
            if (fx < 0) fx = 0;
            int x0 = (int)fx, x1 = x0 + 1 < cols ? x0 + 1 : cols - 1;
            float lx = fx - (float)x0, hx = 1.0f - lx;
            const float *a = src + ((size_t)y0 * cols + x0) * d, *b = src + ((size_t)y0 * cols + x1) * d;
            const float *c = src + ((size_t)y1 * cols + x0) * d, *e = src + ((size_t)y1 * cols + x1) * d;
            float *o = dst + ((size_t)y * ow + x) * d;
            for (int64_t k = 0; k < d; k++) o[k] = hy * (hx * a[k] + lx * b[k]) + ly * (hx * c[k] + lx * e[k]);
        }
    }
}

static mmb_status ar_encode_image(mmb_ctx *ctx, const void *st, const float *pixels, int h, int w, float *out) {
    const ar_state *a = st;
    const mmb_vit_info *vi = &a->vi;
    ar_plan p;
    mmb_status s = plan(ctx, a, h, w, &p);
    if (s != MMB_OK) return s;
    const int64_t n = 1 + (int64_t)p.gh * p.gw, T = vi->tokens, W = vi->width, K = W * a->n_taps, D = a->d;
    const int64_t P = a->per_tile, g = a->g;
    uint64_t hid, rows_in, feat;
    if (!mmb__mul_ok((uint64_t)n, (uint64_t)(T * W), &hid) || !mmb__mul_ok((uint64_t)n, (uint64_t)P, &rows_in) ||
        !mmb__mul_ok(rows_in, (uint64_t)(K > D ? K : D), &feat) || feat > SIZE_MAX / 64 || hid > SIZE_MAX / 64)
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: %lld tiles: sizes overflow", a->name, (long long)n);
    float *hs[MMB_MAX_TAPS] = {0};
    float *x = malloc(sizeof(float) * feat), *y = malloc(sizeof(float) * (size_t)(rows_in * (uint64_t)D));
    float *down = NULL;
    s = x && y ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory for %lld tiles", a->name, (long long)n);
    int taps[MMB_MAX_TAPS];
    for (int i = 0; i < a->n_taps && s == MMB_OK; i++) {
        taps[i] = a->taps[i] < 0 ? a->taps[i] + vi->layers + 1 : a->taps[i];
        if (!(hs[i] = malloc(sizeof(float) * hid))) s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", a->name);
    }
    if (s == MMB_OK) s = mmb_vit_forward(ctx, a->vit, pixels, n, taps, a->n_taps, hs);
    if (s == MMB_OK) { /* the taps concatenated on channels, CLS dropped under "default" */
        const int64_t skip = a->drop_cls ? 1 : 0;
        for (int64_t b = 0; b < n; b++)
            for (int64_t t = 0; t < P; t++)
                for (int i = 0; i < a->n_taps; i++)
                    memcpy(x + ((size_t)(b * P + t) * K + (size_t)i * W), hs[i] + (size_t)((b * T + t + skip) * W),
                           sizeof(float) * (size_t)W);
        s = mmb__arena_reserve(ctx, &ctx->arena, a->ops->scratch(a->conn, (int64_t)rows_in) * sizeof(float));
    }
    if (s == MMB_OK) s = a->ops->forward(ctx, a->conn, y, x, n, P);
    mmb__arena_reset(&ctx->arena);
    if (s == MMB_OK) {
        /* the kept window of the grid, position (r, c) = tile (r / g) gw + c / g's row (r % g) g + c % g, into x */
        float *grid = x;
        for (int r = 0; r < p.rows; r++)
            for (int c = 0; c < p.cols; c++) {
                const int64_t R = p.top + r, C = p.left + c;
                const int64_t tile = 1 + (R / g) * p.gw + C / g, row = (R % g) * g + C % g;
                memcpy(grid + ((size_t)r * p.cols + c) * D, y + (size_t)(tile * P + row) * D, sizeof(float) * D);
            }
        const float *src = grid;
        if (p.oh != p.rows || p.ow != p.cols) {
            if (!(down = malloc(sizeof(float) * (size_t)p.oh * p.ow * D)))
                s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", a->name);
            else
                bilinear(grid, p.rows, p.cols, D, down, p.oh, p.ow);
            src = down;
        }
        if (s == MMB_OK) {
            memcpy(out, y, sizeof(float) * (size_t)(P * D)); /* the base tile */
            float *o = out + P * D;
            for (int r = 0; r < p.oh; r++) {
                memcpy(o, src + (size_t)r * p.ow * D, sizeof(float) * (size_t)(p.ow * D));
                o += p.ow * D;
                memcpy(o, a->newline, sizeof(float) * (size_t)D);
                o += D;
            }
        }
    }
    for (int i = 0; i < a->n_taps; i++) free(hs[i]);
    free(x);
    free(y);
    free(down);
    return s;
}

/* The processor must cut the tiles this model reads: an AnyRes processor whose tile is the tower's image_size and
 * whose pinpoints are the model's. */
static mmb_status ar_check_processor(mmb_ctx *ctx, const void *st, const mmb_preprocess *p, const char *dir) {
    const ar_state *a = st;
    if (p->size_mode != MMB_SIZE_ANYRES)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a %s model takes an AnyRes image processor "
                        "(LlavaNextImageProcessor, LlavaOnevisionImageProcessor), not %s", dir, a->name, p->type);
    if (p->tile_size != a->vi.image_size)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: the image processor cuts tiles of %d, the vision tower takes %d", dir,
                        p->tile_size, a->vi.image_size);
    bool same = p->n_pinpoints == a->n_pins;
    for (int i = 0; same && i < a->n_pins; i++)
        same = p->pinpoints[i][0] == a->pins[i][0] && p->pinpoints[i][1] == a->pins[i][1];
    if (!same)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: the image processor's image_grid_pinpoints are not config.json's "
                        "(the tiles it cuts would not be those the model packs)", dir);
    return MMB_OK;
}

const mmb_family_ops mmb__family_anyres = {
    .load = ar_load,
    .tokens = ar_tokens,
    .encode = ar_encode,
    .free = ar_free,
    .check_processor = ar_check_processor,
    .image_tokens = ar_image_tokens,
    .encode_image = ar_encode_image,
};
