/* The vision layer: towers (vision/vit.c, vision/qwen2vl.c, vision/mllama.c, vision/cogvlm.c) and image preprocessing (vision/preprocess.c). Uses the io layer and below. */
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

/* ---- vision/anyres.c: LLaVA-NeXT's AnyRes arithmetic and image processor -------------------------- */

/* select_best_resolution: the (height, width) of pins[0 .. n) that keeps most of an image of h x w, the least
 * wasted on a tie (the first of equals). */
void mmb__anyres_best(int h, int w, const int (*pins)[2], int n, int *bh, int *bw);
/* get_patch_output_size: the size an image of h x w is resized to inside th x tw, keeping its aspect. */
void mmb__anyres_fit(int h, int w, int th, int tw, int *nh, int *nw);
/* unpad_image on a feature grid of ch x cw for an image of oh x ow: the rows [top, top + rows) and the columns
 * [left, left + cols) it keeps (int(round(side * scale, 7)), padding floor-halved, as transformers). */
void mmb__anyres_unpad(int oh, int ow, int ch, int cw, int *top, int *rows, int *left, int *cols);
/* The best resolution of AnyRes processor p for an image of h x w (MMB_ERR_ARG: p is not one). */
mmb_status mmb__anyres_grid(mmb_ctx *ctx, const mmb_preprocess *p, int h, int w, int *bh, int *bw);
/* mmb_preprocess_run for MMB_SIZE_ANYRES (p checked, img non-empty). */
mmb_status mmb__anyres_run(mmb_ctx *ctx, const mmb_preprocess *p, const mmb_image *img, float *out, size_t count);
/* preprocess.c: Pillow's 8-bit resize of an RGB image with filter r; malloc'd out_h x out_w x 3, or NULL (out of
 * memory, or a filter run refuses). */
unsigned char *mmb__resize_u8(mmb_ctx *ctx, const unsigned char *in, int in_h, int in_w, int out_h, int out_w,
                              mmb_resample r);

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

/* ---- vision/mllama.c: Llama 3.2 Vision's tower (MllamaVisionModel), without its projector ---------- */

typedef struct mmb_mlvit mmb_mlvit;

typedef struct mmb_mlvit_info {
    int width, layers, global_layers, heads, inter;  /* hidden_size D, num_hidden_layers, num_global_layers, ... */
    int image_size, patch, channels;                  /* image_size is the tile's side */
    int max_tiles;                                    /* max_num_tiles: the tiles every image is computed with */
    int n_ratios;                                     /* max_aspect_ratio_id: len(supported_aspect_ratios) */
    int64_t patches;                                  /* P = (image_size / patch)^2 + 1 tokens a tile, CLS first */
    int pad;                                          /* pad patches a tile: (8 - P % 8) % 8, never 0 */
    int n_inter;                                      /* intermediate_layers_indices, resolved (non-negative) */
    int inter_idx[MMB_MAX_TAPS];
    int out_width;                                    /* vision_output_dim = D (1 + n_inter) */
    float eps;                                        /* norm_eps (the layers'; layernorm_pre/post: 1e-5) */
    const char *prefix;                               /* "vision_model." or "model.vision_model." */
    int64_t params, flops_per_image;                  /* the tower's, for max_tiles tiles (always all computed) */
} mmb_mlvit_info;

/* The 1-based index of (rows, cols) in get_all_supported_aspect_ratios(max_tiles) (rows outer, cols inner, rows
 * * cols <= max_tiles): the aspect_ratio_id MllamaImageProcessor gives that canvas; 0 when it has none. */
int mmb__mllama_aspect_id(int max_tiles, int rows, int cols);
/* Loads the tower under vision_config.* and vision_model.* / model.vision_model.* (c must outlive it: the tile
 * embeddings stay in its mapping), checking every weight. Free with mmb__mlvit_free (NULL is a no-op). */
mmb_status mmb__mlvit_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_mlvit **out);
void mmb__mlvit_free(mmb_mlvit *v);
mmb_mlvit_info mmb__mlvit_info(const mmb_mlvit *v);
/* The canvas of pixels of height x width (rows image_size x cols image_size, as mmb_preprocess_run's tiles):
 * rows, cols and the aspect_ratio_id; MMB_ERR_SHAPE with a message for sides that are not multiples of the
 * tile, or more tiles than max_num_tiles. */
mmb_status mmb__mlvit_canvas(mmb_ctx *ctx, const mmb_mlvit *v, int height, int width, int *rows, int *cols,
                             int *aspect_id);
/* Rows of output an image of height x width makes: its rows * cols real tiles' P tokens; -1 with a message. */
int64_t mmb__mlvit_tokens(mmb_ctx *ctx, const mmb_mlvit *v, int height, int width);
/* pixels (B images of rows * cols tiles (3, t, t), one image after another) -> out (B, rows cols P,
 * out_width): the vision model's last_hidden_state of the real tiles, tile-major then patch (CLS first),
 * [final | the intermediate layers interleaved]. all_tiles: out (B, max_tiles P, out_width), every tile as
 * transformers' last_hidden_state[b, 0] holds it, the padding tiles after the real ones. Scratch from ctx's
 * arena (reserved here, reset before returning). */
mmb_status mmb__mlvit_forward(mmb_ctx *ctx, const mmb_mlvit *v, const float *pixels, int64_t B, int height, int width,
                              bool all_tiles, float *out);

/* ---- vision/mplug_owl2.c: mPLUG-Owl2's tower (MplugOwlVisionModel), without its visual abstractor ---- */

typedef struct mmb_owlvit mmb_owlvit;

typedef struct mmb_owlvit_info {
    int width, layers, heads, inter, image_size, patch;  /* hidden_size D, num_hidden_layers, ... */
    int64_t tokens;                                      /* (image_size / patch)^2 + 1, CLS first */
    float eps;                                           /* layer_norm_eps (every LayerNorm of the tower) */
    int64_t params, flops_per_image;
} mmb_owlvit_info;

/* Loads the tower: its config under cfg_prefix ("visual_config.visual_model.", MplugOwlVisionConfig's defaults
 * for absent keys), its weights under prefix ("model.vision_model."), every one checked (c must outlive it).
 * Errors name the file and the tensor. Free with mmb__owlvit_free (NULL is a no-op). */
mmb_status mmb__owlvit_load(mmb_ctx *ctx, const mmb_ckpt *c, const char *cfg_prefix, const char *prefix,
                            mmb_owlvit **out);
void mmb__owlvit_free(mmb_owlvit *v);
mmb_owlvit_info mmb__owlvit_info(const mmb_owlvit *v);
/* pixels (B, 3, image_size, image_size) -> out (B, tokens, D): last_hidden_state (post_layernorm on every
 * token). MMB_ERR_SHAPE with a message for another size. Scratch from ctx's arena (reserved here, reset before
 * returning). */
mmb_status mmb__owlvit_forward(mmb_ctx *ctx, const mmb_owlvit *v, const float *pixels, int64_t B, int height,
                               int width, float *out);

/* ---- vision/cogvlm.c: CogVLM's EVA2-CLIP tower (visual.py's patch_embedding + transformer) ---------- */

typedef struct mmb_cogvit mmb_cogvit;

typedef struct mmb_cogvit_info {
    int width, inter, layers, heads, patch, image_size;  /* vision_config: hidden_size, ..., image_size */
    int grid;                                          /* image_size / patch_size */
    int64_t tokens;                                    /* grid^2: the output rows an image (the CLS dropped) */
    float eps;                                         /* layer_norm_eps */
    const char *prefix;                                /* "model.vision." */
    int64_t params, flops_per_image;
} mmb_cogvit_info;

/* Loads the tower under vision_config.* and model.vision.* (c must outlive it), checking every weight (errors
 * name the file and the tensor). Free with mmb__cogvit_free (NULL is a no-op). */
mmb_status mmb__cogvit_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_cogvit **out);
void mmb__cogvit_free(mmb_cogvit *v);
mmb_cogvit_info mmb__cogvit_info(const mmb_cogvit *v);
/* pixels (B, 3, image_size, image_size) -> out (B, grid^2, width): the last layer's patch tokens (the CLS
 * dropped, as EVA2CLIPModel's x[:, 1:]). MMB_ERR_SHAPE with a message for another size. Scratch from ctx's
 * arena (reserved here, reset before returning). */
mmb_status mmb__cogvit_forward(mmb_ctx *ctx, const mmb_cogvit *v, const float *pixels, int64_t B, int height,
                               int width, float *out);

/* ---- vision/preprocess.c ---------------------------------------------------------------------- */

/* Pad, resize and crop (the steps before rescale/normalize): the uint8 image, HWC, malloc'd in
 * *out (the caller frees it), of size *h x *w. The oracle tests check this stage on its own. */
mmb_status mmb__preprocess_u8(mmb_ctx *ctx, const mmb_preprocess *p, const mmb_image *img, unsigned char **out,
                              int *h, int *w);


/* ---- vision/vq.c: VQ-VAE image tokenizers (fusion type D) -------------------------------------------- */

/* One kind of VQ model, told by its config's model_type. */
typedef struct mmb__vq_kind {
    const char *model_type;     /* "chameleon_vqgan", "janus_vqgan", "emu3_vqgan" */
    /* Binds the weights under prefix (the VQ config's keys under cp: "vq_config." or "") of c (which outlives the
     * state), checking every one; fills info's sizes and has_encoder / has_decoder. */
    mmb_status (*load)(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *cp, void **state,
                       mmb_vq_info *info);
    /* mmb_vq_encode / mmb_vq_decode with their arguments checked; NULL: the kind has no such part. */
    mmb_status (*encode)(mmb_ctx *ctx, const void *state, const float *pixels, int64_t batch, int height, int width,
                         int32_t *codes, float *latents);
    mmb_status (*decode)(mmb_ctx *ctx, const void *state, const int32_t *codes, int64_t batch, int gh, int gw,
                         float *pixels);
    /* FLOPs of one image of height x width (encode) or of its codes (decode 1), and in *params (may be NULL) the
     * part's parameters (any size when only params are wanted). */
    int64_t (*cost)(const void *state, int height, int width, int decode, int64_t *params);
    void (*free)(void *state);
} mmb__vq_kind;
extern const mmb__vq_kind mmb__vq_chameleon, mmb__vq_janus;
/* vision/vq_emu3.c: Emu3VQVAE, encoder and decoder (temporal Conv3d, SpatialNorm) */
extern const mmb__vq_kind mmb__vq_emu3;
/* The VQ model of checkpoint c (borrowed: c outlives *out), as mmb_vq_open finds it. */
mmb_status mmb__vq_open(mmb_ctx *ctx, const mmb_ckpt *c, mmb_vq **out);

#endif
