/* The vision layer: towers (vision/vit.c, vision/qwen2vl.c) and image preprocessing (vision/preprocess.c). Uses the io layer and below. */
#ifndef MMB_VISION_H
#define MMB_VISION_H

#include "io/io.h"

/* ---- vision/vit.c ------------------------------------------------------------------------------ */

/* Reads a CLIP/SigLIP vision config under cfg_prefix ("vision_config." or "" for a standalone
 * vision model), filling class defaults for absent keys. */
mmb_status mmb__vision_cfg(mmb_ctx *ctx, const mmb_ckpt *c, const char *cfg_prefix, mmb_vit_info *out);
/* True when c holds vision-encoder weights under a known prefix. */
bool mmb__vit_present(const mmb_ckpt *c);
/* Loads the vision encoder whose weights are in c (c must outlive it). */
mmb_status mmb__vit_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_vit **out);
/* The last hidden state (floats = batch x tokens x width) into *out, taken from ctx->feats (empty on
 * entry; kept from call to call, so a warm forward allocates nothing); the caller resets ctx->feats
 * when done reading it, on failure too. */
mmb_status mmb__vit_last_feats(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t batch, int64_t floats,
                               float **out);
/* The tower's post_layernorm on `rows` rows of its width in x, in place: for features that apply it to
 * tokens other than the pooled CLS (OpenFlamingo's "patch_ln_post"; transformers' CLIPVisionModel applies
 * it to pooler_output alone). */
void mmb__vit_post_norm(mmb_ctx *ctx, const mmb_vit *v, float *x, int64_t rows);

/* ---- vision/qwen2vl.c: Qwen2-VL's tower, without its PatchMerger --------------------------------- */

typedef struct mmb_q2vit mmb_q2vit;

typedef struct mmb_q2vit_info {
    int depth, width, patch, merge;  /* blocks, embed_dim D, patch_size, spatial_merge_size m */
    int out;                         /* vision_config.hidden_size: the merger's output width */
    float eps;                       /* the LayerNorms' (1e-6, fixed by the class), the merger's ln_q too */
    const char *prefix;              /* "visual." or "model.visual.": the merger is {prefix}merger. */
} mmb_q2vit_info;

/* Loads the tower under vision_config.* and visual.* / model.visual.* (c must outlive it), checking every
 * weight. Free with mmb__q2vit_free (NULL is a no-op). */
mmb_status mmb__q2vit_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_q2vit **out);
void mmb__q2vit_free(mmb_q2vit *q);
mmb_q2vit_info mmb__q2vit_info(const mmb_q2vit *q);
/* Patches of an image of height x width (multiples of patch * merge), or -1 with a message. */
int64_t mmb__q2vit_tokens(mmb_ctx *ctx, const mmb_q2vit *q, int height, int width);
/* pixels (B, 3, height, width) -> x (B * mmb__q2vit_tokens, D): the last block's output, each m^2
 * consecutive rows one merge window. Scratch from ctx's arena (reserved here, reset before returning). */
mmb_status mmb__q2vit_forward(mmb_ctx *ctx, const mmb_q2vit *q, const float *pixels, int64_t B, int height, int width,
                              float *x);

/* ---- vision/preprocess.c ---------------------------------------------------------------------- */

/* Pad, resize and crop (the steps before rescale/normalize): the uint8 image, HWC, malloc'd in
 * *out (the caller frees it), of size *h x *w. The oracle tests check this stage on its own. */
mmb_status mmb__preprocess_u8(mmb_ctx *ctx, const mmb_preprocess *p, const mmb_image *img, unsigned char **out,
                              int *h, int *w);

#endif
