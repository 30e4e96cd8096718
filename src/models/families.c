/* The family table: one row per checkpoint kind (what its config says, how its keys are laid out, its tower,
 * taps, connector, processor, fusion type and LLM), the one matcher over the rows, and the public
 * mmb_family_count / mmb_family_get. A new kind of checkpoint is a row here, plus its own parts (a tower in
 * vision/, a connector in connectors/, their composition in models/) only where it has parts no row has. */
#include "models/models.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

static const mmb__vit_part blip2_part = {.towers = "blip2", .conn = &mmb__conn_qformer, .conn_prefix = "",
                                         .dtype_tensor = "language_projection.weight"};
static const mmb__vit_part idefics_part = {.towers = "idefics, clip", .conn = &mmb__conn_idefics_perceiver,
                                           .conn_prefix = "perceiver_resampler.", .conn_switch = "use_resampler",
                                           .dtype_tensor = "latents", .full_last = true};
static const mmb__vit_part idefics2_part = {.towers = "idefics2", .conn = &mmb__conn_idefics2,
                                            .conn_prefix = "connector.",
                                            .dtype_tensor = "modality_projection.gate_proj.weight"};
static const mmb__vit_part idefics3_part = {.towers = "idefics3", .conn = &mmb__conn_pixel_shuffle,
                                            .conn_prefix = "connector.",
                                            .dtype_tensor = "modality_projection.proj.weight"};
static const mmb__vit_part smolvlm_part = {.towers = "smolvlm", .conn = &mmb__conn_pixel_shuffle,
                                           .conn_prefix = "connector.",
                                           .dtype_tensor = "modality_projection.proj.weight"};

static const mmb__vit_part gemma3_part = {.towers = "siglip", .conn = &mmb__conn_gemma3_proj,
                                          .conn_prefix = "multi_modal_projector.",
                                          .dtype_tensor = "mm_input_projection_weight"};

static const mmb__vit_part paligemma_part = {.towers = "siglip", .conn = &mmb__conn_paligemma_proj,
                                             .conn_prefix = "multi_modal_projector.",
                                             .dtype_tensor = "linear.weight"};

static const mmb__vq_part chameleon_part = {.token_prefix = "IMGIMG", .letters = true, .mask = true};
static const mmb__vq_part emu3_part = {.token_prefix = "<|visual token ", .eol = "<|extra_200|>",
                                       .text_config = true, .generates = true};

/* A row for a tower alone: no connector, no LLM; any of its hidden states. */
#define TOWER(family, archs, types, proc)                                                                          \
    {.name = family, .architectures = archs, .model_types = types, .layouts = "transformers", .tower = archs,        \
     .taps = "any hidden_states", .connector = "", .processor = proc, .fusion = MMB_FUSION_NONE, .lm = "",          \
     .vision_only = true}

/* In matching order: the families, then original LLaVA (claimed by its config keys whatever the
 * architecture), then transformers' LLaVA, then the towers alone that mmb_vit_open reads (named by the
 * family of their vit.c config class, mmb_vit_info.family), then the language models alone. */
static const mmb__family rows[] = {
    {.name = "blip2", .architectures = "Blip2ForConditionalGeneration, Blip2Model", .model_types = "blip-2",
     .layouts = "transformers", .tower = "vision_config: Blip2VisionModel",
     .taps = "last_hidden_state (post_layernorm on every token)", .connector = "qformer (+ language_projection)",
     .processor = "BlipImageProcessor", .fusion = MMB_FUSION_C, .lm = "text_config: OPT or T5",
     .ops = &mmb__family_vit, .part = &blip2_part},
    {.name = "idefics", .architectures = "IdeficsForVisionText2Text, IdeficsModel", .model_types = "idefics",
     .layouts = "transformers", .tower = "vision_config: IdeficsVisionTransformer (CLIP's network)",
     .taps = "last_hidden_state (CLS included, no post_layernorm)",
     .connector = "idefics_perceiver when use_resampler, else identity", .processor = "IdeficsImageProcessor",
     .fusion = MMB_FUSION_A, .lm = "this config: Llama with gated cross-attention layers (model.*)", .lm_runs = true,
     .xattn = "idefics", .image_marker = "<image>", .image_wrap = "<fake_token_around_image>",
     .ops = &mmb__family_vit, .part = &idefics_part},
    {.name = "idefics2", .architectures = "Idefics2ForConditionalGeneration, Idefics2Model",
     .model_types = "idefics2", .layouts = "transformers", .tower = "vision_config: Idefics2VisionTransformer",
     .taps = "last_hidden_state (post_layernorm)", .connector = "idefics2 (modality_projection + perceiver_resampler)",
     .processor = "Idefics2ImageProcessor", .fusion = MMB_FUSION_C, .lm = "text_config: Mistral (model.text_model.*)",
     .ops = &mmb__family_vit, .part = &idefics2_part},
    {.name = "idefics3", .architectures = "Idefics3ForConditionalGeneration, Idefics3Model",
     .model_types = "idefics3", .layouts = "transformers", .tower = "vision_config: Idefics3VisionTransformer",
     .taps = "last_hidden_state (post_layernorm)", .connector = "pixel_shuffle (scale_factor + modality_projection)",
     .processor = "Idefics3ImageProcessor", .fusion = MMB_FUSION_C, .lm = "text_config: Llama 3 (model.text_model.*)",
     .ops = &mmb__family_vit, .part = &idefics3_part},
    {.name = "smolvlm", .architectures = "SmolVLMForConditionalGeneration, SmolVLMModel", .model_types = "smolvlm",
     .layouts = "transformers", .tower = "vision_config: SmolVLMVisionTransformer",
     .taps = "last_hidden_state (post_layernorm)", .connector = "pixel_shuffle (scale_factor + modality_projection)",
     .processor = "SmolVLMImageProcessor", .fusion = MMB_FUSION_C, .lm = "text_config: SmolLM2 (model.text_model.*)",
     .ops = &mmb__family_vit, .part = &smolvlm_part},
    {.name = "gemma3", .architectures = "Gemma3ForConditionalGeneration", .model_types = "gemma3",
     .layouts = "transformers", .tower = "vision_config: SiglipVisionModel (896 px)",
     .taps = "last_hidden_state (post_layernorm)", .connector = "gemma3_projector (AvgPool2d, Gemma RMSNorm, "
     "mm_input_projection_weight)", .processor = "Gemma3ImageProcessor", .fusion = MMB_FUSION_C,
     .lm = "text_config: Gemma 3 (model.language_model.*; its bidirectional image mask not built: encode only)",
     .ops = &mmb__family_vit, .part = &gemma3_part},
    {.name = "paligemma", .architectures = "PaliGemmaForConditionalGeneration", .model_types = "paligemma",
     .layouts = "transformers", .tower = "vision_config: SiglipVisionModel", .taps = "last_hidden_state (post_layernorm)",
     .connector = "paligemma_projector (multi_modal_projector.linear)", .processor = "SiglipImageProcessor",
     .fusion = MMB_FUSION_C, .lm = "text_config: Gemma (its prefix-LM mask not built: encode only)",
     .ops = &mmb__family_vit, .part = &paligemma_part},
    {.name = "qwen2_vl", .architectures = "Qwen2VLForConditionalGeneration, Qwen2VLModel", .model_types = "qwen2_vl",
     .layouts = "transformers", .tower = "vision_config: Qwen2VisionTransformer (2-D RoPE, sides multiples of 28)",
     .taps = "the last block's output", .connector = "patch_merger", .processor = "Qwen2VLImageProcessor",
     .fusion = MMB_FUSION_C, .lm = "text_config: Qwen2 with M-RoPE", .ops = &mmb__family_qwen2vl},
    {.name = "llava_next", .architectures = "LlavaNextForConditionalGeneration", .model_types = "llava_next",
     .layouts = "transformers", .tower = "vision_config: CLIP (or SigLIP) on AnyRes tiles: the base image and the "
     "best image_grid_pinpoints resolution's tiles", .taps = "vision_feature_layer, vision_feature_select_strategy",
     .connector = "llava (multi_modal_projector) + unpad_image + image_newline", .processor = "LlavaNextImageProcessor",
     .fusion = MMB_FUSION_C, .lm = "text_config: Llama, Mistral, Qwen2", .lm_runs = true, .ops = &mmb__family_anyres},
    {.name = "llava_onevision", .architectures = "LlavaOnevisionForConditionalGeneration",
     .model_types = "llava_onevision", .layouts = "transformers",
     .tower = "vision_config: SigLIP on AnyRes tiles (image_grid_pinpoints)",
     .taps = "vision_feature_layer, vision_feature_select_strategy",
     .connector = "llava (multi_modal_projector) + unpad_image + anyres_max_N bilinear downscale + image_newline",
     .processor = "LlavaOnevisionImageProcessor", .fusion = MMB_FUSION_C, .lm = "text_config: Qwen2",
     .lm_runs = true, .ops = &mmb__family_anyres},
    {.name = "open_flamingo", .architectures = "OpenFlamingo", .model_types = "open_flamingo",
     .layouts = "open_flamingo", .tower = "vision_tower: a CLIPVisionModel directory beside it",
     .taps = "hidden_states[-1] without CLS (vision_feature: patch, or patch_ln_post)",
     .connector = "flamingo_perceiver (perceiver.*, config perceiver)", .processor = "CLIPImageProcessor (the tower's)",
     .fusion = MMB_FUSION_A, .lm = "text_config: Llama with gated cross-attention blocks (lang_encoder.*)",
     .lm_runs = true, .xattn = "open_flamingo", .ops = &mmb__family_open_flamingo},
    {.name = "llama_adapter_v2", .architectures = "LlamaAdapterV2ForCausalLM", .model_types = "llama_adapter_v2",
     .layouts = "llama_adapter_v2", .tower = "vision_config: CLIP (vision_tower.vision_model.*)",
     .taps = "hidden_states[-1] with CLS, ln_post on every token, CLIP's proj",
     .connector = "clip_proj + visual_query through visual_blocks (timm) + visual_proj: query_len visual queries",
     .processor = "CLIPImageProcessor", .fusion = MMB_FUSION_B,
     .lm = "this config: LLaMA with biases, adapter prompts in the top query_layer layers (model.*)",
     .lm_runs = true, .adapter = "llama_adapter_v2", .ops = &mmb__family_llama_adapter_v2},
    {.name = "mllama", .architectures = "MllamaForConditionalGeneration", .model_types = "mllama",
     .layouts = "transformers", .tower = "vision_config: MllamaVisionModel (tiles by aspect ratio, local + gated "
     "global encoders)", .taps = "last_hidden_state: the final state and intermediate_layers_indices, real tiles only",
     .connector = "multi_modal_projector", .processor = "MllamaImageProcessor", .fusion = MMB_FUSION_A,
     .lm = "text_config: Llama 3.1 with MllamaCrossAttentionDecoderLayers at cross_attention_layers",
     .lm_runs = true, .xattn = "mllama", .raw_bos = true, .ops = &mmb__family_mllama},
    {.name = "mplug_owl2", .architectures = "MPLUGOwl2LlamaForCausalLM", .model_types = "mplug_owl2",
     .layouts = "mplug_owl2", .tower = "visual_config.visual_model: MplugOwlVisionModel (model.vision_model.*)",
     .taps = "last_hidden_state (post_layernorm on every token)",
     .connector = "visual_abstractor (learned queries, visual_fc, vit_eos)",
     .processor = "CLIPImageProcessor (image_aspect_ratio pad, the original CLI's default)", .fusion = MMB_FUSION_B,
     .lm = "this config: Llama 2 with the modality-adaptive module (multiway K/V and norms, model.*)",
     .lm_runs = true, .image_marker = "<|image|>", .image_expert = true, .ops = &mmb__family_mplug_owl2},
    {.name = "cogvlm", .architectures = "CogVLMForCausalLM", .model_types = "cogvlm", .layouts = "cogvlm (remote code)",
     .tower = "vision_config: EVA2-CLIP (model.vision.transformer, norms after each sub-layer)",
     .taps = "the last layer's patch tokens (CLS dropped)", .connector = "glu (model.vision.linear_proj) + boi/eoi; CogVLM2: model.vision.conv (2x2, stride 2) first",
     .processor = "built in: bicubic resize to image_size, CLIP mean/std (the remote code's torchvision transform)",
     .fusion = MMB_FUSION_B, .lm = "this config: Vicuna with the visual expert (model.layers.*: language_expert_* "
     "and vision_expert_* weight sets); CogVLM2 (num_multi_query_heads): Llama 3, grouped K/V, RoPE base 500000", .lm_runs = true, .image_expert = true, .image_one_position = true,
     .image_last_text = true, .image_first = true, .ops = &mmb__family_cogvlm},
    {.name = "chameleon", .architectures = "ChameleonForConditionalGeneration", .model_types = "chameleon",
     .layouts = "transformers", .tower = "vq_config: ChameleonVQVAE's encoder (model.vqmodel.*)",
     .taps = "the VQ codes (nearest entry of quantize.embedding)", .connector = "vocabulary_map (IMGIMG* tokens)",
     .processor = "ChameleonImageProcessor", .fusion = MMB_FUSION_D,
     .lm = "this config: Llama with per-head q/k LayerNorms and swin_norm (model.*)", .lm_runs = true,
     .image_marker = "<image>", .image_before = "<racm3:break>", .image_after = "<eoss>", .ops = &mmb__family_vq,
     .part = &chameleon_part},
    {.name = "emu3", .architectures = "Emu3ForConditionalGeneration", .model_types = "emu3", .layouts = "transformers",
     .tower = "vq_config: Emu3VQVAE's encoder (model.vqmodel.*)", .taps = "the VQ codes, a row end after each row",
     .connector = "vocabulary_map (<|visual token NNNNNN|>, <|extra_200|>)", .processor = "Emu3ImageProcessor",
     .fusion = MMB_FUSION_D, .lm = "text_config: Llama (model.text_model.*)", .lm_runs = true,
     .image_marker = "<image>", .image_before = "<|image start|>%h*%w<|image token|>",
     .image_after = "<|extra_201|><|image end|>", .ops = &mmb__family_vq, .part = &emu3_part},
    {.name = "janus", .architectures = "JanusForConditionalGeneration", .model_types = "janus", .layouts = "transformers",
     .tower = "vq_config: JanusVQVAE's decoder (model.vqmodel.*); the SigLIP tower is not read",
     .taps = "", .connector = "generation_head, generation_embeddings + generation_aligner",
     .processor = "JanusImageProcessor (postprocess)", .fusion = MMB_FUSION_D,
     .lm = "text_config: Llama (model.language_model.*)", .lm_runs = true, .ops = &mmb__family_janus},
    {.name = "llava", .architectures = "LlavaLlamaForCausalLM, LlavaMistralForCausalLM, LlavaQwenForCausalLM",
     .model_types = "llava_llama, llava_mistral, llava_qwen", .keys = "mm_projector_type, mm_hidden_size",
     .layout = MMB__LAYOUT_ORIGINAL, .layouts = "llava-original",
     .tower = "mm_vision_tower: a CLIP or SigLIP directory given apart",
     .taps = "mm_vision_select_layer, mm_vision_select_feature (the Dense Connector's: mm_dense_connector_type)",
     .connector = "mm_projector_type: a registered connector, behind the Dense Connector when mm_dense_connector_type",
     .processor = "CLIPImageProcessor (the tower's; image_aspect_ratio pad)", .fusion = MMB_FUSION_C,
     .lm = "this config: Llama, Mistral, Qwen2 (model.*)", .lm_runs = true,
     .image_marker = "<image>"}, /* DEFAULT_IMAGE_TOKEN: text, cut by tokenizer_image_token */
    {.name = "llava", .architectures = "LlavaForConditionalGeneration", .model_types = "llava",
     .layouts = "transformers, transformers-legacy",
     .tower = "vision_config: CLIP or SigLIP (CLIP ViT-L/14-336 without one)",
     .taps = "vision_feature_layer, vision_feature_select_strategy",
     .connector = "llava (multi_modal_projector, projector_hidden_act)", .processor = "CLIPImageProcessor",
     .fusion = MMB_FUSION_C, .lm = "text_config: Llama, Mistral, Qwen2", .lm_runs = true},
    TOWER("clip", "CLIPVisionModel, CLIPModel", "clip_vision_model, clip", "CLIPImageProcessor"),
    TOWER("siglip", "SiglipVisionModel, SiglipModel", "siglip_vision_model, siglip", "SiglipImageProcessor"),
    TOWER("blip2", "Blip2VisionModel", "blip_2_vision_model", "BlipImageProcessor"),
    TOWER("idefics2", "Idefics2VisionTransformer", "idefics2_vision", "Idefics2ImageProcessor"),
    TOWER("idefics3", "Idefics3VisionTransformer", "idefics3_vision", "Idefics3ImageProcessor"),
    TOWER("smolvlm", "SmolVLMVisionTransformer", "smolvlm_vision", "SmolVLMImageProcessor"),
    {.name = "text",
     .architectures = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM, Gemma3ForCausalLM",
     .model_types = "llama, mistral, qwen2, gemma, gemma3_text", .layouts = "transformers", .tower = "", .taps = "",
     .connector = "", .processor = "", .fusion = MMB_FUSION_NONE,
     .lm = "this config: Llama, Mistral, Qwen2, Gemma, Gemma 3 (model.*)",
     .lm_runs = true, .text_only = true},
};
#define N_ROWS ((int)(sizeof rows / sizeof rows[0]))

/* The next item of the ", "-separated list at *p (NULL: none): *item and its length *len; advances *p. */
static bool next_item(const char **p, const char **item, size_t *len) {
    if (!*p) return false;
    *p += strspn(*p, ", ");
    *item = *p;
    *len = strcspn(*p, ",");
    *p += *len;
    return *len > 0;
}

bool mmb__list_has(const char *list, const char *s) {
    const char *item;
    size_t len;
    while (next_item(&list, &item, &len))
        if (len == strlen(s) && strncmp(item, s, len) == 0) return true;
    return false;
}

/* Does config have any of the ", "-separated keys (NULL: none)? */
static bool has_key(const cJSON *config, const char *keys) {
    const char *item;
    size_t len;
    char k[64];
    while (next_item(&keys, &item, &len)) {
        snprintf(k, sizeof k, "%.*s", (int)len, item);
        if (cJSON_GetObjectItemCaseSensitive(config, k)) return true;
    }
    return false;
}

/* "supported families: llava (A, B), blip2 (C), ..." into buf: each family once, its rows' architectures. */
static void list_families(char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "supported families:");
    for (int i = 0; i < N_ROWS && n < cap; i++) {
        bool seen = false;
        for (int k = 0; k < i; k++) seen |= strcmp(rows[k].name, rows[i].name) == 0;
        if (seen) continue;
        n += (size_t)snprintf(buf + n, cap - n, "%s %s (", i ? "," : "", rows[i].name);
        for (int k = i; k < N_ROWS && n < cap; k++)
            if (strcmp(rows[k].name, rows[i].name) == 0)
                n += (size_t)snprintf(buf + n, cap - n, "%s%s", k > i ? ", " : "", rows[k].architectures);
        if (n < cap) n += (size_t)snprintf(buf + n, cap - n, ")");
    }
}

mmb_status mmb__family_match_config(mmb_ctx *ctx, const cJSON *config, const char *where, const mmb__family **out) {
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(config, "architectures");
    const cJSON *a0 = cJSON_IsArray(archs) ? archs->child : NULL, *mt = cJSON_GetObjectItemCaseSensitive(config,
                                                                                                         "model_type");
    if ((a0 && !cJSON_IsString(a0)) || (mt && !cJSON_IsNull(mt) && !cJSON_IsString(mt)))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: 'architectures' must be a list of strings and 'model_type' a string",
                        where);
    const char *arch = a0 ? a0->valuestring : NULL, *type = cJSON_IsString(mt) ? mt->valuestring : "";
    for (int i = 0; i < N_ROWS; i++)
        if ((arch ? mmb__list_has(rows[i].architectures, arch) : mmb__list_has(rows[i].model_types, type)) ||
            has_key(config, rows[i].keys)) {
            *out = &rows[i];
            return MMB_OK;
        }
    char families[1536];
    list_families(families, sizeof families);
    if (arch)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: architecture '%s' (model_type '%s') is not supported; %s", where,
                        arch, type, families);
    return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: model_type '%s' (no architectures) is not supported; %s", where,
                    type, families);
}

mmb_status mmb__family_match(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family **out) {
    char where[4096];
    snprintf(where, sizeof where, "%s/config.json", c->dir);
    return mmb__family_match_config(ctx, c->config, where, out);
}

int mmb_family_count(void) { return N_ROWS; }

mmb_status mmb_family_get(int i, mmb_family_desc *out) {
    if (i < 0 || i >= N_ROWS || !out) return MMB_ERR_ARG;
    const mmb__family *f = &rows[i];
    *out = (mmb_family_desc){.name = f->name, .architectures = f->architectures, .tower = f->tower,
                             .connector = f->connector, .processor = f->processor, .fusion = f->fusion,
                             .has_lm = f->lm_runs};
    return MMB_OK;
}
