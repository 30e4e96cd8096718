/* OpenFlamingo (open_flamingo/src/flamingo.py, helpers.py) as mmbridge's checkpoint convention holds it
 * (docs/decisions.md "OpenFlamingo checkpoints"): the vision side, one mmb_model_encode.
 *
 *   config.json       architectures ["OpenFlamingo"], vis_dim, vision_tower (a directory relative to this one:
 *                     an HF CLIPVisionModel save_pretrained, with its preprocessor_config.json), vision_feature,
 *                     perceiver {depth, heads, dim_head, num_latents, ff_mult}; the LLM's keys are lm/'s
 *   model.safetensors perceiver.* (and lang_encoder.*: lm/'s)
 *
 *   pixels (n, 3, S, S) -> CLIP tower -> hidden_states[-1] (n, 1 + g*g, vis_dim) -> drop CLS
 *     vision_feature "patch":          as it is (open_clip < 2.23's visual(x)[1]: tokens before ln_post;
 *                                      what the released OpenFlamingo models were trained with, the default)
 *     vision_feature "patch_ln_post":  through the tower's post_layernorm (open_clip >= 2.23: ln_post on every
 *                                      token before the CLS is split off)
 *   -> PerceiverResampler per image -> (n, num_latents, vis_dim): the media the gated cross-attention reads.
 *
 * Each image goes through the resampler alone (T_img = F = 1 in Flamingo's (b, T, F, v, d)): without
 * media_time_embs (Flamingo builds none; such a checkpoint is refused) the images of one sample do not meet
 * before the cross-attention. */
#include "models/models.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    mmb_vit *vit;
    mmb_vit_info vi;
    void *perc;            /* mmb__conn_flamingo_perceiver's state */
    bool ln_post;          /* vision_feature "patch_ln_post" */
    char tower_dir[4096];  /* the tower's directory: its preprocessor_config.json is the model's processor */
} of_state;

static const mmb_connector_ops *const perc_ops = &mmb__conn_flamingo_perceiver;

static void of_free(void *st) {
    of_state *f = st;
    if (!f) return;
    if (f->perc) perc_ops->free(f->perc);
    mmb_vit_free(f->vit);
    free(f);
}

/* The tower: config vision_tower (default "vision_tower"), relative to the checkpoint unless absolute. */
static mmb_status open_tower(mmb_ctx *ctx, const mmb_ckpt *c, of_state *f) {
    const char *rel = "vision_tower";
    mmb_status s = MMB_OK;
    mmb__cfg_str(ctx, c, "vision_tower", &rel, &s);
    if (s != MMB_OK) return s;
    if (!rel[0]) return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'vision_tower' is empty", c->dir);
    int n = rel[0] == '/' ? snprintf(f->tower_dir, sizeof f->tower_dir, "%s", rel)
                          : snprintf(f->tower_dir, sizeof f->tower_dir, "%s/%s", c->dir, rel);
    if (n < 0 || (size_t)n >= sizeof f->tower_dir)
        return mmb__err(ctx, MMB_ERR_ARG, "%s/config.json: the vision_tower path is too long", c->dir);
    char path[4096 + 16];
    snprintf(path, sizeof path, "%s/config.json", f->tower_dir);
    FILE *fp = NULL;
    if (mmb__fopen_input(NULL, path, &fp) != MMB_OK)
        return mmb__err(ctx, MMB_ERR_IO, "%s/config.json: vision_tower '%s': %s cannot be read (an OpenFlamingo "
                        "checkpoint keeps its CLIP tower as a CLIPVisionModel directory beside model.safetensors: "
                        "config.json, model.safetensors, preprocessor_config.json)", c->dir, rel, path);
    fclose(fp);
    s = mmb_vit_open(ctx, f->tower_dir, &f->vit);
    if (s != MMB_OK) return s;
    mmb_vit_get_info(f->vit, &f->vi);
    if (strcmp(f->vi.family, "clip") != 0 || !f->vi.has_cls)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: the vision tower reads as %s; an OpenFlamingo model's is a "
                        "CLIP vision model (CLIPVisionModel, with a CLS token)", f->tower_dir, f->vi.family);
    return MMB_OK;
}

/* vis_dim (the tower's width when absent), vision_feature, and the perceiver's settings (OpenFlamingo's
 * PerceiverResampler defaults for absent ones: depth 6, heads 8, dim_head 64, num_latents 64, ff_mult 4). */
static mmb_status read_settings(mmb_ctx *ctx, const mmb_ckpt *c, of_state *f, mmb__perceiver_cfg *pc) {
    int64_t vis = f->vi.width;
    const char *feat = "patch";
    mmb_status s = MMB_OK;
    mmb__cfg_int(ctx, c, "vis_dim", &vis, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "vision_feature", &feat, &s);
    *pc = (mmb__perceiver_cfg){.dim = vis, .depth = 6, .heads = 8, .dim_head = 64, .num_latents = 64, .ff_mult = 4};
    struct { const char *k; int64_t *v; } keys[] = {
        {"perceiver.depth", &pc->depth}, {"perceiver.heads", &pc->heads}, {"perceiver.dim_head", &pc->dim_head},
        {"perceiver.num_latents", &pc->num_latents}, {"perceiver.ff_mult", &pc->ff_mult},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0] && s == MMB_OK; i++) mmb__cfg_int(ctx, c, keys[i].k, keys[i].v, &s);
    if (s != MMB_OK) return s;
    if (vis != f->vi.width)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s/config.json: vis_dim is %lld but the vision tower (%s) is %d wide; "
                        "OpenFlamingo's vis_dim is the tower's width (open_clip vision_cfg.width)", c->dir,
                        (long long)vis, f->tower_dir, f->vi.width);
    if (strcmp(feat, "patch") != 0 && strcmp(feat, "patch_ln_post") != 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_feature '%s' (expected 'patch': the tokens "
                        "before ln_post, or 'patch_ln_post': after it)", c->dir, feat);
    f->ln_post = strcmp(feat, "patch_ln_post") == 0;
    if (mmb__ckpt_find(c, "perceiver.media_time_embs", NULL))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: tensor 'perceiver.media_time_embs': a resampler with media time "
                        "embeddings is not supported (OpenFlamingo's Flamingo builds none)", c->dir);
    return MMB_OK;
}

static mmb_status of_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state, mmb_model_info *info) {
    (void)fam;
    of_state *f = calloc(1, sizeof *f);
    if (!f) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb__perceiver_cfg pc;
    mmb_status s = open_tower(ctx, c, f);
    if (s == MMB_OK) s = read_settings(ctx, c, f, &pc);
    if (s == MMB_OK) s = mmb__flamingo_perceiver_load(ctx, c, "perceiver.", &pc, &f->perc);
    if (s != MMB_OK) { of_free(f); return s; }
    int64_t T = f->vi.tokens - 1, flops = 0;
    info->connector = perc_ops->name;
    info->activation = mmb__connector_activation(perc_ops, f->perc);
    info->select_strategy = "patch";
    info->n_taps = 1;
    info->taps[0] = -1;
    info->vision_layers = f->vi.layers;
    info->vision_width = info->in_width = f->vi.width;
    info->out_width = (int)perc_ops->out_width(f->perc);
    info->image_size = f->vi.image_size;
    info->patch_size = f->vi.patch_size;
    info->tokens_per_image = perc_ops->out_tokens(f->perc, T);
    perc_ops->cost(f->perc, T, &info->params, &flops);
    info->flops_per_image = flops;
    const mmb_tensor *w = mmb__ckpt_find(c, "perceiver.latents", NULL);
    info->weight_dtype = w ? w->dtype : MMB_F32;
    *state = f;
    return MMB_OK;
}

static int64_t of_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    const of_state *f = st;
    if (height != f->vi.image_size || width != f->vi.image_size)
        return mmb__err(ctx, MMB_ERR_SHAPE, "pixels of %dx%d: the OpenFlamingo CLIP tower takes %dx%d", width, height,
                        f->vi.image_size, f->vi.image_size), -1;
    return perc_ops->out_tokens(f->perc, f->vi.tokens - 1);
}

static mmb_status of_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t batch, int height, int width,
                            float *out) {
    const of_state *f = st;
    if (of_tokens(ctx, st, height, width) < 0) return MMB_ERR_SHAPE;
    int64_t T = f->vi.tokens, D = f->vi.width;
    float *feat;
    mmb_status s = mmb__vit_last_feats(ctx, f->vit, pixels, batch, batch * T * D, &feat);
    if (s == MMB_OK) {
        /* CLS off, in place: image b's patches move from row b*T + 1 to row b*(T - 1) (never forward). */
        for (int64_t b = 0; b < batch; b++)
            memmove(feat + b * (T - 1) * D, feat + (b * T + 1) * D, sizeof(float) * (size_t)((T - 1) * D));
        if (f->ln_post) mmb__vit_post_norm(ctx, f->vit, feat, batch * (T - 1));
        s = mmb__arena_reserve(ctx, &ctx->arena, perc_ops->scratch(f->perc, batch * (T - 1)) * sizeof(float));
    }
    if (s == MMB_OK) s = perc_ops->forward(ctx, f->perc, out, feat, batch, T - 1);
    mmb__arena_reset(&ctx->arena);
    mmb__arena_reset(&ctx->feats);
    return s;
}

static const char *of_processor_dir(const void *st) { return ((const of_state *)st)->tower_dir; }

const mmb_family_ops mmb__family_open_flamingo = {
    .load = of_load,
    .tokens = of_tokens,
    .encode = of_encode,
    .free = of_free,
    .processor_dir = of_processor_dir,
};
