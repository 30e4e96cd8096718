/* The families whose tower is a ViT (vision/vit.c) and whose connector reads its own settings from the
 * family's config: BLIP-2 (Q-Former), IDEFICS (perceiver resampler, or none), Idefics2 (its connector),
 * Idefics3 and SmolVLM (pixel shuffle). One model: pixels -> the tower's last_hidden_state -> the connector
 * the row names (mmb__vit_part), as one mmb_model_encode. */
#include "models/models.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    mmb_vit *vit;
    mmb_vit_info vi;
    const mmb_connector_ops *ops;
    void *conn;
} vf_state;

static void vf_free(void *st) {
    vf_state *f = st;
    if (!f) return;
    if (f->conn) f->ops->free(f->conn);
    mmb_vit_free(f->vit);
    free(f);
}

/* The connector the row names (the identity when its switch is off), with the text model's width
 * (text_config.hidden_size, 4096 when absent: the connectors whose width is another read their own). */
static mmb_status load_conn(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__vit_part *part, vf_state *f,
                            mmb_conn_cfg *cc, char *prefix, size_t cap) {
    int64_t d_model = 4096;
    bool on = true;
    mmb_status s = MMB_OK;
    if (!mmb__cfg_int(ctx, c, "text_config.hidden_size", &d_model, &s) && s == MMB_OK) d_model = 4096;
    if (s == MMB_OK && part->conn_switch && !mmb__cfg_bool(ctx, c, part->conn_switch, &on, &s)) on = false;
    if (s != MMB_OK) return s;
    if (d_model < 1 || d_model > (1 << 20))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'text_config.hidden_size' = %lld is out of range", c->dir,
                        (long long)d_model);
    f->ops = on ? part->conn : mmb__connector_find("identity");
    snprintf(prefix, cap, "%s%s", strncmp(f->vi.prefix, "model.", 6) == 0 ? "model." : "", part->conn_prefix);
    *cc = (mmb_conn_cfg){.type = f->ops->name, .prefix = prefix, .in_width = f->vi.width, .out_width = d_model};
    return f->ops->load(ctx, c, cc, &f->conn);
}

static mmb_status vf_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state, mmb_model_info *info) {
    const mmb__vit_part *part = fam->part;
    vf_state *f = calloc(1, sizeof *f);
    if (!f) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb_status s = mmb__vit_load(ctx, c, &f->vit);
    if (s == MMB_OK) mmb_vit_get_info(f->vit, &f->vi);
    if (s == MMB_OK && !mmb__list_has(part->towers, f->vi.family))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: the vision tower reads as %s (vision_config.model_type); "
                     "a %s model's is %s", c->dir, f->vi.family, fam->name, part->towers);
    mmb_conn_cfg cc;
    char prefix[160];
    if (s == MMB_OK) s = load_conn(ctx, c, part, f, &cc, prefix, sizeof prefix);
    if (s != MMB_OK) { vf_free(f); return s; }
    int64_t T = f->vi.tokens, flops = 0;
    info->connector = f->ops->name;
    info->activation = mmb__connector_activation(f->ops, f->conn);
    if (part->full_last) {
        info->select_strategy = "full";
        info->n_taps = 1;
        info->taps[0] = -1;
    }
    info->vision_layers = f->vi.layers;
    info->vision_width = info->in_width = f->vi.width;
    info->out_width = (int)f->ops->out_width(f->conn);
    info->image_size = f->vi.image_size;
    info->patch_size = f->vi.patch_size;
    info->tokens_per_image = f->ops->out_tokens(f->conn, T);
    f->ops->cost(f->conn, T, &info->params, &flops);
    info->flops_per_image = flops;
    char name[256];
    if (f->ops == part->conn) snprintf(name, sizeof name, "%s%s", prefix, part->dtype_tensor);
    else snprintf(name, sizeof name, "%sembeddings.patch_embedding.weight", f->vi.prefix);
    const mmb_tensor *w = mmb__ckpt_find(c, name, NULL);
    info->weight_dtype = w ? w->dtype : MMB_F32;
    *state = f;
    return MMB_OK;
}

static int64_t vf_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    const vf_state *f = st;
    if (height != f->vi.image_size || width != f->vi.image_size)
        return mmb__err(ctx, MMB_ERR_SHAPE, "pixels of %dx%d: mmbridge runs the %s tower on full, unpadded images of "
                        "its image_size %dx%d only (no patch attention mask); resize or split the image to that size",
                        width, height, f->vi.family, f->vi.image_size, f->vi.image_size), -1;
    return f->ops->out_tokens(f->conn, f->vi.tokens);
}

static mmb_status vf_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t batch, int height, int width,
                            float *out) {
    const vf_state *f = st;
    if (vf_tokens(ctx, st, height, width) < 0) return MMB_ERR_SHAPE;
    int64_t T = f->vi.tokens;
    float *feat;
    mmb_status s = mmb__vit_last_feats(ctx, f->vit, pixels, batch, batch * T * f->vi.width, &feat);
    if (s == MMB_OK) s = mmb__arena_reserve(ctx, &ctx->arena, f->ops->scratch(f->conn, batch * T) * sizeof(float));
    if (s == MMB_OK) s = f->ops->forward(ctx, f->conn, out, feat, batch, T);
    mmb__arena_reset(&ctx->arena);
    mmb__arena_reset(&ctx->feats);
    return s;
}

const mmb_family_ops mmb__family_vit = {
    .load = vf_load,
    .tokens = vf_tokens,
    .encode = vf_encode,
    .free = vf_free,
};
