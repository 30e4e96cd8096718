/* The models layer: the family table (models/families.c), one row per checkpoint kind, and the parts that
 * only some families have, reached from their rows: a ViT tower + a connector run as one model
 * (models/vit_family.c: BLIP-2, IDEFICS, Idefics2/3, SmolVLM), Qwen2-VL's tower + PatchMerger
 * (models/qwen2vl.c), OpenFlamingo's CLIP tower + PerceiverResampler (models/open_flamingo.c), Llama 3.2
 * Vision's tiled tower + projector (models/mllama.c), CogVLM's EVA2-CLIP + GLU (models/cogvlm.c), mPLUG-Owl2's
 * tower + visual abstractor (models/mplug_owl2.c), LLaMA-Adapter V2's visual queries (models/llama_adapter_v2.c).
 * Uses the connectors layer and below; pipeline/model.c opens checkpoints through it. */
#ifndef MMB_MODELS_H
#define MMB_MODELS_H

#include "connectors/connectors.h"

typedef struct mmb__family mmb__family;

/* ---- a family's own code: tower and connector run as one model (mmb_model_encode) --------------- */

/* What fusion D's image generation needs of the model. Janus (lm_head false): the ids an image is (grid_h x grid_w
 * of them, from a codebook of `codebook`) through the family's gen_head and gen_embed, and the prompt's special
 * ids generation_config.json gives (-1 where it names none): bos and boi (<begin_of_image>) stay in the
 * unconditional prompt of classifier-free guidance, every other id becomes pad; guidance its guidance_scale (0:
 * none named). Emu3 (lm_head true): the image is the LLM's own tokens, code k being vocabulary id img2bpe[k],
 * each row of grid_w codes followed by eol; the grid is the caller's (n_ids and the grid 0). */
typedef struct mmb__gen_info {
    int64_t n_ids, codebook;
    int grid_h, grid_w;
    int32_t bos, pad, boi;
    double guidance;
    bool lm_head;
    const int32_t *img2bpe;
    int32_t eol;
} mmb__gen_info;

typedef struct mmb_family_ops {
    /* Builds the state of row f's model from c (which outlives it), checking every weight's presence, dtype
     * and shape, and fills *info: connector, activation, select_strategy and taps (when it reports them),
     * vision_layers, vision_width, in_width, out_width, image_size, patch_size, tokens_per_image, params,
     * flops_per_image, weight_dtype. architecture, layout and family are filled by model.c. */
    mmb_status (*load)(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *f, void **state, mmb_model_info *info);
    /* Embeddings per image for pixels of height x width, or -1 with a message when it cannot take them. */
    int64_t (*tokens)(mmb_ctx *ctx, const void *state, int height, int width);
    /* pixels (batch, 3, height, width), as the checkpoint's image processor makes them ->
     * out (batch, tokens(height, width), out_width). Scratch comes from ctx's arena and feature buffer
     * (reserved here, reset before returning). */
    mmb_status (*encode)(mmb_ctx *ctx, const void *state, const float *pixels, int64_t batch, int height, int width,
                         float *out);
    void (*free)(void *state);
    /* Optional: the directory whose preprocessor_config.json is the model's image processor when the
     * checkpoint's own directory has none (a tower kept in a directory of its own), or NULL. */
    const char *(*processor_dir)(const void *state);
    /* Optional: refuses (with a message naming `dir`) an image processor whose pixels the model cannot take
     * (Mllama: its tiles must be the tower's), when the multimodal model opens both; NULL: any. */
    mmb_status (*check_processor)(mmb_ctx *ctx, const void *state, const mmb_preprocess *p, const char *dir);
    /* Optional: the image processor when neither the checkpoint's directory nor processor_dir has a
     * preprocessor_config.json (CogVLM: its remote code's torchvision transform, built into the model, not
     * saved), into *p; NULL: none. */
    mmb_status (*processor)(mmb_ctx *ctx, const void *state, mmb_preprocess *p);
    /* Optional, fusion A: when the LLM's cross-attention reads more rows an image than encode writes (Mllama:
     * transformers' cross_attention_states hold all max_num_tiles tiles, the padding ones included, and the text
     * rows that see no tile attend to them all unmasked), the rows per image (the same for every image) and
     * their encode, as encode otherwise. NULL: the LLM reads encode's rows. */
    int64_t (*xattn_tokens)(const void *state);
    mmb_status (*encode_xattn)(mmb_ctx *ctx, const void *state, const float *pixels, int64_t batch, int height,
                               int width, float *out);
    /* Fusion D (an image becomes ids of the LLM's vocabulary; encode is NULL): pixels (batch, 3, height, width)
     * -> ids (batch, tokens(height, width)), the image's rows as token ids, which the LLM embeds. */
    mmb_status (*encode_ids)(mmb_ctx *ctx, const void *state, const float *pixels, int64_t batch, int height,
                             int width, int32_t *ids);
    /* Optional, fusion D: the ids (*n of them, ascending) whose logits the model sets to the lowest float at every
     * position (Chameleon's image tokens), or NULL. */
    const int32_t *(*logit_mask)(const void *state, int64_t *n);
    /* Optional, fusion D: the model's VQ tokenizer (vision/vq.c), or NULL. */
    const mmb_vq *(*vq)(const void *state);
    /* Optional, fusion D image generation (Janus): the image ids the LLM writes, grid_h x grid_w of them; the head
     * over its final hidden states (rows, d_model) -> scores (rows, codebook); the embedding an id is read back
     * through (ids (n) -> rows (n, d_model)); the VQ decoder (codes (grid_h, grid_w) -> pixels (3, H, W) as
     * the processor's postprocess takes them) and that postprocess's mean and std (3 each). */
    void (*gen_info)(const void *state, mmb__gen_info *out);
    mmb_status (*gen_head)(mmb_ctx *ctx, const void *state, const float *hidden, int64_t rows, float *scores);
    mmb_status (*gen_embed)(mmb_ctx *ctx, const void *state, const int32_t *ids, int64_t n, float *rows);
    /* Optional, AnyRes (LLaVA-NeXT, OneVision): an image's rows depend on its own size, not only on its pixels (the
     * unpadding). image_tokens: the rows an image of height x width makes; encode_image: its pixels as the
     * processor check_processor accepted makes them (mmb_preprocess_output_size's floats for that image) -> out
     * (image_tokens rows, out_width); *tiles (when not NULL): the tower's passes, the base image's included. The pipeline then gives the image's size where it gives the pixels' elsewhere;
     * tokens and encode refuse pixels alone. */
    int64_t (*image_tokens)(mmb_ctx *ctx, const void *state, int height, int width, int64_t *tiles);
    mmb_status (*encode_image)(mmb_ctx *ctx, const void *state, const float *pixels, int height, int width,
                               float *out);
} mmb_family_ops;

/* models/vit_family.c: a ViT tower (vision/vit.c) whose last_hidden_state feeds a connector that reads its
 * own settings from the family's config. */
extern const mmb_family_ops mmb__family_vit;
/* models/qwen2vl.c: Qwen2-VL's tower (vision/qwen2vl.c), then its PatchMerger. */
extern const mmb_family_ops mmb__family_qwen2vl;
/* models/open_flamingo.c: OpenFlamingo's vision side: a CLIP tower in the directory config.vision_tower names,
 * its patch tokens (vision_feature), the PerceiverResampler under perceiver.* (config.perceiver's settings). */
extern const mmb_family_ops mmb__family_open_flamingo;
/* models/llama_adapter_v2.c: LLaMA-Adapter V2 multimodal's vision side: the CLIP tower (vision_tower.vision_model.*),
 * ln_post on every token and CLIP's proj, clip_proj(_norm), visual_query before the tokens through visual_blocks.*
 * (timm Blocks), the first query_len rows through visual_proj(_norm): (query_len, hidden_size) per image, the
 * visual queries added to the adapter prompts. */
extern const mmb_family_ops mmb__family_llama_adapter_v2;
/* models/mllama.c: Llama 3.2 Vision's tower (vision/mllama.c: tiles, local and gated global encoders), then
 * multi_modal_projector; an image's rows are its real tiles' tokens. */
extern const mmb_family_ops mmb__family_mllama;
/* models/mplug_owl2.c: mPLUG-Owl2's tower (vision/mplug_owl2.c), then its visual abstractor (learned queries
 * cross-attending the image, visual_fc, vit_eos appended): num_learnable_queries + 1 rows an image. */
extern const mmb_family_ops mmb__family_mplug_owl2;
/* models/cogvlm.c: CogVLM's EVA2-CLIP tower (vision/cogvlm.c), its GLU adapter and the boi / eoi rows: an
 * image's rows are (boi, grid^2 patches, eoi) of the LLM's width. */
extern const mmb_family_ops mmb__family_cogvlm;

/* models/anyres.c: LLaVA-NeXT and LLaVA-OneVision: the tower on the AnyRes tiles, LlavaMultiModalProjector,
 * pack_image_features (unpad_image, OneVision's anyres_max_N downscale, image_newline). */
extern const mmb_family_ops mmb__family_anyres;

/* models/vq_family.c: fusion D understanding (Chameleon, Emu3): the VQ tokenizer's codes through config.json's
 * vocabulary_map, as the row's mmb__vq_part says. */
extern const mmb_family_ops mmb__family_vq;
/* models/janus.c: Janus / Janus-Pro image generation: generation_head, generation_embeddings + generation_aligner,
 * the VQ decoder. */
extern const mmb_family_ops mmb__family_janus;

/* What mmb__family_vq reads from its row (mmb__family.part). */
typedef struct mmb__vq_part {
    const char *token_prefix;   /* the image tokens' names start so: "IMGIMG", "<|visual token " */
    bool letters;               /* Chameleon: the code spelled in letters A-J after the prefix, one character
                                   after it; else Emu3's six digits at name[-8:-2] */
    const char *eol;            /* the token after each row of codes (Emu3's "<|extra_200|>"), or NULL */
    bool mask;                  /* the image tokens' logits are suppressed (Chameleon) */
    bool text_config;           /* the LLM's sizes are under text_config (Emu3) */
    bool generates;             /* the LLM writes images in these tokens, the VQ decodes them (Emu3) */
} mmb__vq_part;

/* What mmb__family_vit reads from its row (mmb__family.part). */
typedef struct mmb__vit_part {
    const char *towers;         /* the vit.c families its tower may read as (mmb_vit_info.family), ", "-separated */
    const mmb_connector_ops *conn;
    const char *conn_prefix;    /* the connector's weights, beside the tower's: under the tower's "model." (when
                                   its prefix starts so) + this, e.g. "connector." */
    const char *conn_switch;    /* a boolean config key without which the tower's output goes out as it is (the
                                   "identity" connector), or NULL: always the connector */
    const char *dtype_tensor;   /* the connector weight (under its prefix) whose dtype mmb_model_info reports */
    bool full_last;             /* the output is hidden_states[-1] with CLS (no post_layernorm): reported as
                                   taps [-1], strategy "full" */
} mmb__vit_part;

/* ---- models/families.c: the family table -------------------------------------------------------- */

/* How a row's checkpoints lay out their keys. */
typedef enum mmb__layout {
    MMB__LAYOUT_TRANSFORMERS, /* save_pretrained's: model.* or the older unprefixed keys, told by tensor names */
    MMB__LAYOUT_ORIGINAL      /* the original LLaVA repository's: model.mm_projector.*, the tower named in the
                                 config (mm_vision_tower) and given as a separate directory */
} mmb__layout;

/* One checkpoint kind. Matching reads the strings; the rest says what the kind is made of. */
struct mmb__family {
    const char *name;           /* mmb_model_info.family: "llava", "blip2", ..., "clip", "siglip" */
    const char *architectures;  /* config.json architectures[0] values it claims, ", "-separated */
    const char *model_types;    /* model_type values it claims when the config names no architecture */
    const char *keys;           /* config keys any of which claim the checkpoint whatever its architecture, or NULL */
    mmb__layout layout;
    const char *layouts;        /* the layouts as mmb_model_info.layout names them */
    const char *tower;          /* the vision tower and where its config is */
    const char *taps;           /* the config key that selects hidden states, or what the tower hands on */
    const char *connector;      /* the connector and the config key naming it */
    const char *processor;      /* the image processor class */
    mmb_fusion fusion;          /* how the visual side reaches the LLM (NONE: no LLM) */
    const char *lm;             /* the LLM: where its config is, which models */
    bool lm_runs;               /* mmb_lm_open runs that LLM (Llama, Mistral, Qwen2 text models) */
    bool vision_only;           /* a tower alone: no connector, no LLM (mmb_vit_open opens it) */
    bool text_only;             /* a language model alone: no vision path (mmb_lm_open opens it) */
    const char *xattn;          /* fusion A: the gated cross-attention layers' kind (lm/xattn.c), or NULL */
    const char *image_marker;   /* the token that marks an image in the text when the config names none */
    const char *image_before;   /* fusion D: the processor's text before each image's marker, "%h" and "%w" its
                                   code grid's rows and columns (Emu3: "<|image start|>%h*%w<|image token|>"), or
                                   NULL */
    const char *image_after;    /* and after it (Chameleon: "<eoss>"), or NULL */
    const char *image_wrap;     /* the token around each image's marker (IDEFICS' <fake_token_around_image>:
                                   wrap marker wrap, or marker wrap after an image), or NULL */
    bool raw_bos;               /* a raw prompt without the BOS text gets it after its leading image markers, then
                                   the tokenizer's own (MllamaProcessor's build_string_from_input) */
    bool image_expert;          /* fusion B: an image's rows run through the LLM's second weight set (CogVLM's
                                   visual expert, mPLUG-Owl2's modality-adaptive module) */
    bool image_one_position;    /* fusion B: an image's rows but its first and last share one RoPE position (CogVLM's
                                   build_position_ids: first p, the inner rows p + 1, last p + 2) */
    const char *adapter;        /* fusion B: the adapter kind (lm/adapter.c) the image's encode output becomes the
                                   prompts of (LLaMA-Adapter V2); its image takes no positions in the text; or NULL */
    bool image_last_text;       /* with image_expert: the image's last row takes the text set (CogVLM's get_expert_mask
                                   gives a row the vision expert when the next row is VISION too: eoi's next is text) */
    bool image_first;           /* the prompt is BOS, the image's rows, then the text tokenized alone without special
                                   tokens (CogVLM's build_conversation_input_ids; at most one image); chat mode
                                   wraps the text as config.template_version says ('chat': "Question: {q}
                                   Answer:", 'vqa': "Question: {q} Short answer:", 'base': as it is) */
    const mmb_family_ops *ops;  /* the family's own code; NULL: pipeline/model.c's LLaVA path (tower + feature
                                   selection + a registered projector), or a tower alone */
    const void *part;           /* the data ops reads from the row (mmb__vit_part for mmb__family_vit), or NULL */
};

/* The row that claims checkpoint c (its config.json): the first row whose architectures hold the config's
 * architectures[0], or, for a config that names none, whose model_types hold its model_type, or any of whose
 * keys the config has. Returns MMB_OK and sets *out; MMB_ERR_UNSUPPORTED when no row claims it (the message
 * names the architecture and model_type and lists the supported families with their architectures);
 * MMB_ERR_FORMAT for an architectures or model_type that is not a string. */
mmb_status mmb__family_match(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family **out);
/* Is s one of the ", "-separated items of list (NULL: none)? For the rows' lists. */
bool mmb__list_has(const char *list, const char *s);
/* As mmb__family_match for a config.json already parsed (`where` names it in messages). */
mmb_status mmb__family_match_config(mmb_ctx *ctx, const cJSON *config, const char *where,
                                    const mmb__family **out);

#endif
