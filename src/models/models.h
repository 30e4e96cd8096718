/* The models layer: the families, checkpoints whose tower and connector run as one model. Uses the connectors layer and below. */
#ifndef MMB_MODELS_H
#define MMB_MODELS_H

#include "connectors/connectors.h"

/* ---- pipeline/families.c: checkpoints whose tower and connector are one model ---------------- */

/* A family (BLIP-2, IDEFICS, Idefics2/3, Qwen2-VL, ...) reads its own config and weights and maps
 * preprocessed pixels to embeddings itself; model.c tries the families before the LLaVA layouts.
 * One file per family under src/connectors/ (the connector) or src/vision/ (its tower), registered
 * in families.c. */
typedef struct mmb_family_ops {
    const char *name;  /* mmb_model_info.family: "blip2", "idefics", ... */
    /* Is this checkpoint one of the family's? arch: config's architectures[0] (or ""), model_type. */
    bool (*detect)(const mmb_ckpt *c, const char *arch, const char *model_type);
    /* Builds the state from c (which outlives it), checking every weight's presence, dtype and shape,
     * and fills *info: connector, select_strategy ("" if none), vision_layers, vision_width, in_width,
     * out_width, image_size, patch_size, tokens_per_image, params, flops_per_image, weight_dtype.
     * architecture and layout are filled by model.c. */
    mmb_status (*load)(mmb_ctx *ctx, const mmb_ckpt *c, void **state, mmb_model_info *info);
    /* Embeddings per image for pixels of height x width, or -1 with a message when it cannot take them. */
    int64_t (*tokens)(mmb_ctx *ctx, const void *state, int height, int width);
    /* pixels (batch, 3, height, width), as the checkpoint's image processor makes them ->
     * out (batch, tokens(height, width), out_width). Scratch comes from ctx's arena (reserved here,
     * reset before returning). */
    mmb_status (*encode)(mmb_ctx *ctx, const void *state, const float *pixels, int64_t batch, int height, int width,
                         float *out);
    void (*free)(void *state);
} mmb_family_ops;

/* The family that claims c, or NULL (then c is read as a LLaVA checkpoint). */
const mmb_family_ops *mmb__family_find(const mmb_ckpt *c, const char *arch, const char *model_type);

extern const mmb_family_ops mmb__family_blip2;
/* Qwen2VLForConditionalGeneration: its vision tower and merger as the family "qwen2_vl". */
extern const mmb_family_ops mmb__family_qwen2vl;
extern const mmb_family_ops mmb__family_idefics2, mmb__family_idefics3, mmb__family_smolvlm;
extern const mmb_family_ops mmb__family_idefics;

#endif
