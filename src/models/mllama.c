/* The mllama family (Llama 3.2 Vision, MllamaForConditionalGeneration's vision path): its tower
 * (vision/mllama.c), then multi_modal_projector, one Linear(vision_output_dim -> text_config.hidden_size) with
 * bias, as MllamaModel.forward computes cross_attention_states. An image's pixels are its processor's real
 * tiles ([rows cols, 3, t, t], the size rows t x cols t: mmb_preprocess_run's MMB_SIZE_TILES layout); its
 * output is rows * cols * P rows of text hidden size, tile-major (row-major over the canvas), then patch (CLS
 * first), P = (image_size / patch_size)^2 + 1: transformers' cross_attention_states of the real tiles, whose
 * padded tiles the cross_attention_mask hides from the text. Weights: multi_modal_projector.* (what
 * save_pretrained writes, the hub files) or model.multi_modal_projector.* (the module names). */
#include "models/models.h"

#include <stdio.h>
#include <stdlib.h>

typedef struct {
    mmb_mlvit *vit;
    mmb_mlvit_info vi;
    mmb_linear proj;   /* (text hidden, vision_output_dim) */
} ml_state;

static void ml_free(void *st) {
    ml_state *m = st;
    if (!m) return;
    mmb__linear_free(&m->proj);
    mmb__mlvit_free(m->vit);
    free(m);
}

static mmb_status ml_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state, mmb_model_info *info) {
    (void)fam;
    ml_state *m = calloc(1, sizeof *m);
    if (!m) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    mmb_status s = mmb__mlvit_load(ctx, c, &m->vit);
    int64_t d = 4096;  /* MllamaTextConfig's hidden_size */
    const char *prefix = mmb__ckpt_find(c, "model.multi_modal_projector.weight", NULL) ? "model." : "";
    const mmb_tensor *w = NULL;
    if (s == MMB_OK) {
        m->vi = mmb__mlvit_info(m->vit);
        mmb__cfg_int(ctx, c, "text_config.hidden_size", &d, &s);
    }
    if (s == MMB_OK && (d < 1 || d > (1 << 20)))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: text_config.hidden_size %lld is out of range", c->dir,
                     (long long)d);
    char pp[32];
    snprintf(pp, sizeof pp, "%smulti_modal_projector", prefix);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, "", pp, d, m->vi.out_width, true, &m->proj);
    if (s == MMB_OK) {
        char name[64];
        snprintf(name, sizeof name, "%s.weight", pp);
        w = mmb__ckpt_find(c, name, NULL);
    }
    if (s != MMB_OK) {
        ml_free(m);
        return s;
    }
    info->connector = "multi_modal_projector";
    info->activation = "";
    info->vision_layers = m->vi.layers + m->vi.global_layers;
    info->vision_width = m->vi.width;
    info->in_width = m->vi.out_width;
    info->out_width = (int)d;
    info->image_size = m->vi.image_size;  /* the tile */
    info->patch_size = m->vi.patch;
    info->tokens_per_image = 0;            /* rows * cols * P: it varies with the image's canvas */
    info->params = m->vi.params;
    info->flops_per_image = m->vi.flops_per_image;
    mmb__linear_cost(&m->proj, 0, &info->params, &info->flops_per_image);
    info->weight_dtype = w ? w->dtype : MMB_F32;
    *state = m;
    return MMB_OK;
}

static int64_t ml_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    const ml_state *m = st;
    return mmb__mlvit_tokens(ctx, m->vit, height, width);
}

/* The tower's output in ctx's feature buffer, then the projector straight into out: the real tiles' rows, or
 * (all) every one of max_num_tiles tiles'. */
static mmb_status encode_rows(mmb_ctx *ctx, const ml_state *m, const float *pixels, int64_t B, int height, int width,
                              bool all, float *out) {
    int64_t T = mmb__mlvit_tokens(ctx, m->vit, height, width);
    if (T < 0) return MMB_ERR_SHAPE;
    if (all) T = m->vi.max_tiles * m->vi.patches;
    uint64_t rows, n;
    if (!mmb__mul_ok((uint64_t)B, (uint64_t)T, &rows) || !mmb__mul_ok(rows, (uint64_t)m->vi.out_width, &n) ||
        n > SIZE_MAX / 64)
        return mmb__err(ctx, MMB_ERR_NOMEM, "mllama: %lld images of %dx%d: sizes overflow", (long long)B, width,
                        height);
    const size_t bytes = sizeof(float) * (size_t)n;
    mmb_status s = mmb__arena_reserve(ctx, &ctx->feats, mmb__arena_piece(bytes));
    float *x = s == MMB_OK ? mmb__arena_alloc(&ctx->feats, bytes) : NULL;
    if (s == MMB_OK) s = mmb__mlvit_forward(ctx, m->vit, pixels, B, height, width, all, x);
    if (s == MMB_OK) mmb__linear_forward(ctx, out, x, (int64_t)rows, &m->proj);
    mmb__arena_reset(&ctx->feats);
    return s;
}

static mmb_status ml_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t B, int height, int width,
                            float *out) {
    return encode_rows(ctx, st, pixels, B, height, width, false, out);
}

/* What the text side's cross-attention reads: max_num_tiles P rows an image, the real tiles first, then the
 * padding tiles' (a zero tile's states, which still carry the tile and position embeddings), as
 * cross_attention_states[image * max_num_tiles + tile] holds them. */
static int64_t ml_xattn_tokens(const void *st) {
    const ml_state *m = st;
    return m->vi.max_tiles * m->vi.patches;
}

static mmb_status ml_encode_xattn(mmb_ctx *ctx, const void *st, const float *pixels, int64_t B, int height, int width,
                                  float *out) {
    return encode_rows(ctx, st, pixels, B, height, width, true, out);
}

/* The processor must cut the tower's tiles: MllamaImageProcessor's tiles of image_size, as many at most as
 * max_num_tiles (its aspect_ratio_ids count the arrangements of its own max_image_tiles, and transformers'
 * model reshapes pixel_values by max_num_tiles: the two must agree). */
static mmb_status ml_check_processor(mmb_ctx *ctx, const void *st, const mmb_preprocess *p, const char *dir) {
    const ml_state *m = st;
    if (p->size_mode != MMB_SIZE_TILES)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: the image processor is %s; an mllama model takes "
                        "MllamaImageProcessor's tiles", dir, p->type);
    if (p->tile_size != m->vi.image_size || p->max_image_tiles != m->vi.max_tiles)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: the image processor makes tiles of %d, at most %d an image; the "
                        "vision model takes tiles of %d (vision_config.image_size), %d an image (max_num_tiles)",
                        dir, p->tile_size, p->max_image_tiles, m->vi.image_size, m->vi.max_tiles);
    return MMB_OK;
}

const mmb_family_ops mmb__family_mllama = {
    .load = ml_load,
    .tokens = ml_tokens,
    .encode = ml_encode,
    .free = ml_free,
    .check_processor = ml_check_processor,
    .xattn_tokens = ml_xattn_tokens,
    .encode_xattn = ml_encode_xattn,
};
