/* Tiny checkpoints written from C for the tests (tests/test_mllm.c, tests/test_faults.c): a transformers-layout
 * LLaVA (CLIP tower, projector, Llama, a byte-level tokenizer with a ChatML template) in mllm_llava/, a CLIP tower
 * alone in mllm_clip/, a Llama alone in mllm_text/, all under the working directory (write_models). */
#ifndef MMB_TESTS_MLLM_FIXTURE_H
#define MMB_TESTS_MLLM_FIXTURE_H

#include "check.h"
#include "mmbridge.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* ---- writing checkpoints ---- */

enum { VD = 16, VI = 32, VL = 2, VH = 2, IMG = 28, PATCH = 14, VT = 5 };        /* tower: 4 patches + CLS */
enum { D = 32, FF = 48, L = 2, H = 4, KVH = 2, V = 260, CTX = 64, IMG_TOK = 258 }; /* Llama */

typedef struct tset {
    mmb_tensor t[96];
    char names[96][112];
    float *bufs[96];
    int n;
} tset;

/* A tensor of the given shape, values base + scale * uniform[-1, 1). */
static void add(tset *s, float base, float scale, int ndim, int64_t d0, int64_t d1, const char *fmt, const char *a,
                int l) {
    snprintf(s->names[s->n], sizeof s->names[0], fmt, a, l);
    int64_t n = ndim == 1 ? d0 : ndim == 2 ? d0 * d1 : d0 * 3 * PATCH * PATCH;
    float *b = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) b[i] = base + scale * frand();
    s->t[s->n] = (mmb_tensor){.name = s->names[s->n], .dtype = MMB_F32, .ndim = ndim, .shape = {d0, d1}, .data = b};
    if (ndim == 4) {
        s->t[s->n].shape[1] = 3;
        s->t[s->n].shape[2] = s->t[s->n].shape[3] = PATCH;
    }
    s->bufs[s->n++] = b;
}

static void add_tower(tset *s, const char *p) {
    add(s, 0, 0.5f, 1, VD, 0, "%sembeddings.class_embedding", p, 0);
    add(s, 0, 0.1f, 4, VD, 0, "%sembeddings.patch_embedding.weight", p, 0);
    add(s, 0, 0.5f, 2, VT, VD, "%sembeddings.position_embedding.weight", p, 0);
    add(s, 1, 0.1f, 1, VD, 0, "%spre_layrnorm.weight", p, 0);
    add(s, 0, 0.1f, 1, VD, 0, "%spre_layrnorm.bias", p, 0);
    add(s, 1, 0.1f, 1, VD, 0, "%spost_layernorm.weight", p, 0);
    add(s, 0, 0.1f, 1, VD, 0, "%spost_layernorm.bias", p, 0);
    static const char *const lin[6] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
    char f[112];
    for (int l = 0; l < VL; l++) {
        for (int k = 0; k < 6; k++) {
            int64_t o = k == 4 ? VI : VD, in = k == 5 ? VI : VD;
            snprintf(f, sizeof f, "%%sencoder.layers.%%d.%s.weight", lin[k]);
            add(s, 0, 0.3f, 2, o, in, f, p, l);
            snprintf(f, sizeof f, "%%sencoder.layers.%%d.%s.bias", lin[k]);
            add(s, 0, 0.05f, 1, o, 0, f, p, l);
        }
        for (int k = 1; k <= 2; k++) {
            snprintf(f, sizeof f, "%%sencoder.layers.%%d.layer_norm%d.weight", k);
            add(s, 1, 0.1f, 1, VD, 0, f, p, l);
            snprintf(f, sizeof f, "%%sencoder.layers.%%d.layer_norm%d.bias", k);
            add(s, 0, 0.1f, 1, VD, 0, f, p, l);
        }
    }
}

static void add_llama(tset *s, const char *p, const char *head) {
    add(s, 0, 0.5f, 2, V, D, "%sembed_tokens.weight", p, 0);
    add(s, 1, 0.2f, 1, D, 0, "%snorm.weight", p, 0);
    add(s, 0, 0.3f, 2, V, D, "%s", head, 0);
    static const char *const lin[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
    const int64_t rows[7] = {D, KVH * (D / H), KVH * (D / H), D, FF, FF, D}, cols[7] = {D, D, D, D, D, D, FF};
    char f[112];
    for (int l = 0; l < L; l++) {
        for (int k = 0; k < 7; k++) {
            snprintf(f, sizeof f, "%%slayers.%%d.%s.weight", lin[k]);
            add(s, 0, 0.25f, 2, rows[k], cols[k], f, p, l);
        }
        add(s, 1, 0.2f, 1, D, 0, "%slayers.%d.input_layernorm.weight", p, l);
        add(s, 1, 0.2f, 1, D, 0, "%slayers.%d.post_attention_layernorm.weight", p, l);
    }
}

static void write_text(const char *dir, const char *name, const char *text) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    fputs(text, f);
    fclose(f);
}

static void write_tensors(mmb_ctx *ctx, const char *dir, tset *s) {
    char p[512];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    CHECK(mmb_st_write(ctx, p, s->t, s->n) == MMB_OK, "write %s: %s", p, mmb_ctx_error(ctx));
    for (int i = 0; i < s->n; i++) free(s->bufs[i]);
    s->n = 0;
}

/* One UTF-8 code point into q; returns its length. */
static int utf8(char *q, int c) {
    if (c < 0x80) { q[0] = (char)c; return 1; }
    q[0] = (char)(0xc0 | (c >> 6));
    q[1] = (char)(0x80 | (c & 0x3f));
    return 2;
}

/* A byte-level BPE without merges: ids 0..255 the bytes (GPT-2's printable map), 256 <|im_start|>, 257
 * <|im_end|> (the EOS), 258 <image>; tokenizer_config.json with a ChatML template. */
static void write_tokenizer(const char *dir) {
    static char json[16384];
    int n = sprintf(json, "{\"version\": \"1.0\", \"added_tokens\": [");
    static const char *const sp[3] = {"<|im_start|>", "<|im_end|>", "<image>"};
    for (int i = 0; i < 3; i++)
        n += sprintf(json + n, "%s{\"id\": %d, \"content\": \"%s\", \"single_word\": false, \"lstrip\": false, "
                     "\"rstrip\": false, \"normalized\": false, \"special\": true}", i ? ", " : "", 256 + i, sp[i]);
    n += sprintf(json + n, "], \"normalizer\": null, \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": "
                 "false, \"trim_offsets\": true, \"use_regex\": true}, \"post_processor\": null, \"decoder\": "
                 "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true}, "
                 "\"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, \"fuse_unk\": false, "
                 "\"byte_fallback\": false, \"vocab\": {");
    for (int b = 0, extra = 0; b < 256; b++) {
        int c = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174 ? b : 256 + extra++;
        char ch[4];
        int k = utf8(ch, c);
        json[n++] = b ? ',' : ' ';
        json[n++] = '"';
        if (c == '"' || c == '\\') json[n++] = '\\';
        memcpy(json + n, ch, (size_t)k);
        n += k;
        n += sprintf(json + n, "\": %d", b);
    }
    sprintf(json + n, "}, \"merges\": []}}");
    write_text(dir, "tokenizer.json", json);
    write_text(dir, "tokenizer_config.json",
               "{\"tokenizer_class\": \"PreTrainedTokenizerFast\", \"eos_token\": \"<|im_end|>\", \"chat_template\": "
               "\"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\\\n' + message['content'] + "
               "'<|im_end|>' + '\\\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\\\n' }}"
               "{% endif %}\"}");
}

static const char *const LLAVA = "mllm_llava", *const CLIP = "mllm_clip", *const TEXT = "mllm_text";

static void write_models(mmb_ctx *ctx) {
    static tset s;
    char cfg[2048];
    const char *vcfg = "{\"model_type\": \"clip_vision_model\", \"hidden_size\": 16, \"intermediate_size\": 32, "
                       "\"num_hidden_layers\": 2, \"num_attention_heads\": 2, \"image_size\": 28, \"patch_size\": 14, "
                       "\"hidden_act\": \"quick_gelu\"}";
    const char *tcfg = "\"model_type\": \"llama\", \"hidden_size\": 32, \"intermediate_size\": 48, "
                       "\"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2, "
                       "\"vocab_size\": 260, \"max_position_embeddings\": 64, \"rms_norm_eps\": 1e-5";
    const char *proc = "{\"image_processor_type\": \"CLIPImageProcessor\", \"size\": {\"shortest_edge\": 28}, "
                       "\"crop_size\": {\"height\": 28, \"width\": 28}}";
    mkdir(LLAVA, 0755);
    snprintf(cfg, sizeof cfg, "{\"architectures\": [\"LlavaForConditionalGeneration\"], \"model_type\": \"llava\", "
             "\"image_token_index\": %d, \"projector_hidden_act\": \"gelu\", \"vision_feature_layer\": -2, "
             "\"vision_feature_select_strategy\": \"default\", \"vision_config\": %s, \"text_config\": {%s}}",
             IMG_TOK, vcfg, tcfg);
    write_text(LLAVA, "config.json", cfg);
    write_text(LLAVA, "preprocessor_config.json", proc);
    write_tokenizer(LLAVA);
    add_tower(&s, "model.vision_tower.vision_model.");
    add(&s, 0, 0.4f, 2, D, VD, "model.multi_modal_projector.linear_1.weight%s", "", 0);
    add(&s, 0, 0.1f, 1, D, 0, "model.multi_modal_projector.linear_1.bias%s", "", 0);
    add(&s, 0, 0.3f, 2, D, D, "model.multi_modal_projector.linear_2.weight%s", "", 0);
    add(&s, 0, 0.1f, 1, D, 0, "model.multi_modal_projector.linear_2.bias%s", "", 0);
    add_llama(&s, "model.language_model.", "lm_head.weight");
    write_tensors(ctx, LLAVA, &s);

    mkdir(CLIP, 0755);
    snprintf(cfg, sizeof cfg, "%.*s, \"architectures\": [\"CLIPVisionModel\"]}", (int)strlen(vcfg) - 1, vcfg);
    write_text(CLIP, "config.json", cfg);
    write_text(CLIP, "preprocessor_config.json", proc);
    add_tower(&s, "vision_model.");
    write_tensors(ctx, CLIP, &s);

    mkdir(TEXT, 0755);
    snprintf(cfg, sizeof cfg, "{\"architectures\": [\"LlamaForCausalLM\"], %s, \"eos_token_id\": 7}", tcfg);
    write_text(TEXT, "config.json", cfg);
    add_llama(&s, "model.", "lm_head.weight");
    write_tensors(ctx, TEXT, &s);
}

/* A 40x33 image of random pixels (the caller frees it with mmb_image_free). */
static mmb_image test_image(uint64_t seed) {
    mmb_image img = {.width = 33, .height = 40, .rgb = malloc(33 * 40 * 3)};
    rng = seed;
    for (int i = 0; i < 33 * 40 * 3; i++) img.rgb[i] = (unsigned char)(frand() * 127.5f + 128);
    return img;
}

#endif
