/* mmbridge demo: writes a random-weight LlavaForConditionalGeneration checkpoint (a small CLIP tower,
 * LLaVA-1.5-7B's projector, a one-layer LLM and a byte-level BPE tokenizer with a chat template) and
 * runs info, encode and generate on an image through the library. */
#include "cli.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The tower: 224x224, patch 14 (256 patches + CLS), 4 blocks of width 512; the projector: mlp2x_gelu to
 * LLaVA-1.5-7B's 4096; the LLM: one Llama layer of width 4096 with 2 heads of 64 (1 KV head) and an MLP
 * of 64, over a vocabulary of the 256 bytes and 3 added tokens. */
enum { DEMO_D = 512, DEMO_I = 2048, DEMO_L = 4, DEMO_P = 14, DEMO_S = 224, DEMO_T = 257, DEMO_OUT = 4096,
       LM_HEADS = 2, LM_KV = 1, LM_HD = 64, LM_FFN = 64, LM_VOCAB = 259, LM_CTX = 512,
       TOK_BOS = 256, TOK_EOS = 257, TOK_IMAGE = 258 };

/* The head only scores these bytes (their rows random, the others zero), so greedy text is readable. */
static const char head_bytes[] = "abcdefghijklmnopqrstuvwxyz ,.";

static const char *config_json =
    "{\n  \"architectures\": [\"LlavaForConditionalGeneration\"],\n  \"model_type\": \"llava\",\n"
    "  \"image_token_index\": 258,\n  \"image_seq_length\": 256,\n  \"projector_hidden_act\": \"gelu\",\n"
    "  \"vision_feature_layer\": -2,\n  \"vision_feature_select_strategy\": \"default\",\n"
    "  \"vision_config\": {\"model_type\": \"clip_vision_model\", \"hidden_size\": 512,\n"
    "    \"intermediate_size\": 2048, \"num_hidden_layers\": 4, \"num_attention_heads\": 8,\n"
    "    \"image_size\": 224, \"patch_size\": 14, \"hidden_act\": \"quick_gelu\"},\n"
    "  \"text_config\": {\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 64,\n"
    "    \"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"head_dim\": 64,\n"
    "    \"vocab_size\": 259, \"max_position_embeddings\": 512, \"rms_norm_eps\": 1e-05,\n"
    "    \"tie_word_embeddings\": false, \"bos_token_id\": 256, \"eos_token_id\": 257}\n}\n";

static const char *preprocessor_json =
    "{\n  \"image_processor_type\": \"CLIPImageProcessor\",\n  \"size\": {\"shortest_edge\": 224},\n"
    "  \"crop_size\": {\"height\": 224, \"width\": 224}\n}\n";

static const char *tokenizer_config_json =
    "{\n  \"tokenizer_class\": \"PreTrainedTokenizerFast\",\n  \"bos_token\": \"<s>\",\n  \"eos_token\": \"</s>\",\n"
    "  \"chat_template\": \"{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}\"\n}\n";

/* Deterministic uniform numbers in [-scale, scale). */
static float *demo_fill(size_t n, float scale, uint64_t *s) {
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; p && i < n; i++) {
        *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
        p[i] = scale * ((float)(*s >> 40) / 8388608.0f - 1.0f);
    }
    return p;
}

enum { MAXT = 11 + DEMO_L * 16 + 12 };

typedef struct demo_tensors {
    char names[MAXT][96];
    mmb_tensor t[MAXT];
    float *bufs[MAXT];
    int n, oom;
    uint64_t seed;
} demo_tensors;

/* Adds tensor `name` of the given shape: uniform in [-scale, scale), plus offset (norm weights: 1 + noise). */
static float *add(demo_tensors *d, const char *name, float scale, float offset, int ndim, int64_t d0, int64_t d1,
                  int64_t d2, int64_t d3) {
    int n = d->n++;
    snprintf(d->names[n], sizeof d->names[n], "%s", name);
    d->t[n] = (mmb_tensor){.name = d->names[n], .dtype = MMB_F32, .ndim = ndim, .shape = {d0, d1, d2, d3}};
    size_t cnt = (size_t)mmb_tensor_numel(&d->t[n]);
    float *p = d->bufs[n] = demo_fill(cnt, scale, &d->seed);
    if (!p) d->oom = 1;
    for (size_t k = 0; p && k < cnt; k++) p[k] += offset;
    d->t[n].data = p;
    return p;
}

static int demo_write(mmb_ctx *ctx, const char *path) {
    static demo_tensors d;
    memset(&d, 0, sizeof d);
    d.seed = 0x6d6d6272696467ull;
    char nm[96];
    const char *v = "model.vision_tower.", *lm = "model.language_model.";
#define NAME(...) (snprintf(nm, sizeof nm, __VA_ARGS__), nm)
    add(&d, NAME("%sembeddings.class_embedding", v), 0.5f, 0, 1, DEMO_D, 0, 0, 0);
    add(&d, NAME("%sembeddings.patch_embedding.weight", v), 0.05f, 0, 4, DEMO_D, 3, DEMO_P, DEMO_P);
    add(&d, NAME("%sembeddings.position_embedding.weight", v), 0.5f, 0, 2, DEMO_T, DEMO_D, 0, 0);
    for (int k = 0; k < 2; k++) {
        add(&d, NAME("%s%s.weight", v, k ? "post_layernorm" : "pre_layrnorm"), 0.1f, 1, 1, DEMO_D, 0, 0, 0);
        add(&d, NAME("%s%s.bias", v, k ? "post_layernorm" : "pre_layrnorm"), 0.1f, 0, 1, DEMO_D, 0, 0, 0);
    }
    for (int l = 0; l < DEMO_L; l++) {
        static const char *const lin[6] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
        for (int k = 0; k < 6; k++) {
            int64_t o = k == 4 ? DEMO_I : DEMO_D, in = k == 5 ? DEMO_I : DEMO_D;
            add(&d, NAME("%sencoder.layers.%d.%s.weight", v, l, lin[k]), 1.7f / 32, 0, 2, o, in, 0, 0);
            add(&d, NAME("%sencoder.layers.%d.%s.bias", v, l, lin[k]), 0.02f, 0, 1, o, 0, 0, 0);
        }
        for (int k = 1; k <= 2; k++) {
            add(&d, NAME("%sencoder.layers.%d.layer_norm%d.weight", v, l, k), 0.1f, 1, 1, DEMO_D, 0, 0, 0);
            add(&d, NAME("%sencoder.layers.%d.layer_norm%d.bias", v, l, k), 0.1f, 0, 1, DEMO_D, 0, 0, 0);
        }
    }
    add(&d, "model.multi_modal_projector.linear_1.weight", 1.7f / 22, 0, 2, DEMO_OUT, DEMO_D, 0, 0);
    add(&d, "model.multi_modal_projector.linear_1.bias", 0.02f, 0, 1, DEMO_OUT, 0, 0, 0);
    add(&d, "model.multi_modal_projector.linear_2.weight", 1.7f / 64, 0, 2, DEMO_OUT, DEMO_OUT, 0, 0);
    add(&d, "model.multi_modal_projector.linear_2.bias", 0.02f, 0, 1, DEMO_OUT, 0, 0, 0);
    /* the LLM: linear layers ~ U(-a, a) with a = 1.7 / sqrt(fan_in) */
    add(&d, NAME("%sembed_tokens.weight", lm), 1.0f, 0, 2, LM_VOCAB, DEMO_OUT, 0, 0);
    add(&d, NAME("%slayers.0.input_layernorm.weight", lm), 0.1f, 1, 1, DEMO_OUT, 0, 0, 0);
    add(&d, NAME("%slayers.0.self_attn.q_proj.weight", lm), 1.7f / 64, 0, 2, LM_HEADS * LM_HD, DEMO_OUT, 0, 0);
    add(&d, NAME("%slayers.0.self_attn.k_proj.weight", lm), 1.7f / 64, 0, 2, LM_KV * LM_HD, DEMO_OUT, 0, 0);
    add(&d, NAME("%slayers.0.self_attn.v_proj.weight", lm), 1.7f / 64, 0, 2, LM_KV * LM_HD, DEMO_OUT, 0, 0);
    add(&d, NAME("%slayers.0.self_attn.o_proj.weight", lm), 1.7f / 11, 0, 2, DEMO_OUT, LM_HEADS * LM_HD, 0, 0);
    add(&d, NAME("%slayers.0.post_attention_layernorm.weight", lm), 0.1f, 1, 1, DEMO_OUT, 0, 0, 0);
    add(&d, NAME("%slayers.0.mlp.gate_proj.weight", lm), 1.7f / 64, 0, 2, LM_FFN, DEMO_OUT, 0, 0);
    add(&d, NAME("%slayers.0.mlp.up_proj.weight", lm), 1.7f / 64, 0, 2, LM_FFN, DEMO_OUT, 0, 0);
    add(&d, NAME("%slayers.0.mlp.down_proj.weight", lm), 1.7f / 8, 0, 2, DEMO_OUT, LM_FFN, 0, 0);
    add(&d, NAME("%snorm.weight", lm), 0.1f, 1, 1, DEMO_OUT, 0, 0, 0);
    float *head = add(&d, "lm_head.weight", 0.1f, 0, 2, LM_VOCAB, DEMO_OUT, 0, 0);
    for (int id = 0; head && id < LM_VOCAB; id++)
        if (id >= 256 || !memchr(head_bytes, id, sizeof head_bytes - 1))
            memset(head + (size_t)id * DEMO_OUT, 0, sizeof(float) * DEMO_OUT);
#undef NAME
    int r = 0;
    if (d.oom) r = cli_fail(NULL, "out of memory");
    else if (mmb_st_write(ctx, path, d.t, d.n) != MMB_OK) r = cli_fail(ctx, NULL);
    for (int i = 0; i < d.n; i++) free(d.bufs[i]);
    return r;
}

/* A byte-level BPE tokenizer.json: the 256 bytes as GPT-2 spells them (bytes_to_unicode), no merges,
 * and the added tokens <s>, </s> and <image>. */
static int write_tokenizer(const char *path) {
    cJSON *root = cJSON_CreateObject(), *added = cJSON_AddArrayToObject(root, "added_tokens");
    static const char *const special[] = {"<s>", "</s>", "<image>"};
    for (int i = 0; i < 3; i++) {
        cJSON *t = cJSON_CreateObject();
        cJSON_AddNumberToObject(t, "id", 256 + i);
        cJSON_AddStringToObject(t, "content", special[i]);
        cJSON_AddBoolToObject(t, "single_word", 0);
        cJSON_AddBoolToObject(t, "lstrip", 0);
        cJSON_AddBoolToObject(t, "rstrip", 0);
        cJSON_AddBoolToObject(t, "normalized", 0);
        cJSON_AddBoolToObject(t, "special", 1);
        cJSON_AddItemToArray(added, t);
    }
    cJSON_AddNullToObject(root, "normalizer");
    const char *parts[] = {"pre_tokenizer", "decoder"};
    for (int i = 0; i < 2; i++) {
        cJSON *b = cJSON_AddObjectToObject(root, parts[i]);
        cJSON_AddStringToObject(b, "type", "ByteLevel");
        cJSON_AddBoolToObject(b, "add_prefix_space", 0);
        cJSON_AddBoolToObject(b, "trim_offsets", 1);
        cJSON_AddBoolToObject(b, "use_regex", 1);
    }
    cJSON_AddNullToObject(root, "post_processor");
    cJSON *model = cJSON_AddObjectToObject(root, "model"), *vocab;
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddNullToObject(model, "dropout");
    cJSON_AddNullToObject(model, "unk_token");
    cJSON_AddBoolToObject(model, "fuse_unk", 0);
    cJSON_AddBoolToObject(model, "byte_fallback", 0);
    cJSON_AddBoolToObject(model, "ignore_merges", 0);
    vocab = cJSON_AddObjectToObject(model, "vocab");
    for (int b = 0, extra = 0; b < 256; b++) {
        int keep = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
        unsigned cp = keep ? (unsigned)b : 256u + (unsigned)extra++;
        char key[4];  /* cp < 0x800: one or two UTF-8 bytes */
        if (cp < 0x80) { key[0] = (char)cp; key[1] = 0; }
        else { key[0] = (char)(0xc0 | (cp >> 6)); key[1] = (char)(0x80 | (cp & 0x3f)); key[2] = 0; }
        cJSON_AddNumberToObject(vocab, key, b);
    }
    cJSON_AddArrayToObject(model, "merges");
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    int r = text ? cli_write_text(path, text) : cli_fail(NULL, "out of memory");
    cJSON_free(text);
    return r;
}

/* Writes the checkpoint into dir. Returns 0 or 1 (printed). */
static int write_checkpoint(mmb_ctx *ctx, const char *dir) {
    const struct { const char *name, *text; } files[] = {
        {"config.json", config_json}, {"preprocessor_config.json", preprocessor_json},
        {"tokenizer_config.json", tokenizer_config_json}};
    char path[4200];
    for (int i = 0; i < CLI_N(files); i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i].name);
        if (cli_write_text(path, files[i].text)) return 1;
    }
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    if (write_tokenizer(path)) return 1;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    return demo_write(ctx, path);
}

/* The embeddings' first values, mean and RMS: the same seed prints the same line. */
static int print_stats(mmb_ctx *ctx, const char *path) {
    mmb_st_file *f = NULL;
    if (mmb_st_open(ctx, path, &f) != MMB_OK) return cli_fail(ctx, NULL);
    const mmb_tensor *e = mmb_st_find(f, "embeddings");
    const float *x = e->data;
    double sum = 0, sq = 0;
    int64_t cnt = mmb_tensor_numel(e);
    for (int64_t i = 0; i < cnt; i++) { sum += x[i]; sq += (double)x[i] * x[i]; }
    printf("embeddings [%lld, %lld, %lld]: token 0 starts %.4f %.4f %.4f %.4f; mean %.4f, rms %.4f\n",
           (long long)e->shape[0], (long long)e->shape[1], (long long)e->shape[2], x[0], x[1], x[2], x[3],
           sum / (double)cnt, sqrt(sq / (double)cnt));
    mmb_st_close(f);
    return 0;
}

int cmd_demo(int argc, char **argv) {
    const char *pos[2] = {NULL, "data/sample.jpg"};
    int np = 0;
    int64_t n_new = 32;
    cli_ctx_opts co = {0};
    const char *prompt = "What is in this image?";
    const cli_opt opts[] = {
        {.name = "--prompt", .meta = "TEXT", .type = CLI_STR, .dst = &prompt,
         .help = "the question asked about the image (default: What is in this image?)"},
        {.name = "-n", .meta = "N", .type = CLI_INT, .dst = &n_new,
         .help = "tokens to generate (default 32)", .lo = 0, .hi = LM_CTX - 300},
        CLI_OPT_THREADS(&co.threads),
    };
    const cli_spec spec = {"demo", "DIR [IMAGE]",
        "Writes DIR/llava-demo, a transformers-layout LlavaForConditionalGeneration checkpoint with RANDOM\n"
        "weights from a fixed seed: a small CLIP vision tower (224x224, patch 14, 256 patches + CLS,\n"
        "4 blocks of width 512), LLaVA-1.5-7B's projector (mlp2x_gelu to 4096), a one-layer Llama LLM of\n"
        "width 4096 (its text_config; 2 heads of 64, context 512, f32) whose head only scores lowercase\n"
        "letters, space, comma and period, a byte-level BPE tokenizer.json with an <image> token, and a\n"
        "tokenizer_config.json with a chat template; then runs info, encode (to DIR/embeddings.safetensors)\n"
        "and generate on IMAGE (default data/sample.jpg) through the library. The text means nothing;\n"
        "the pipeline, the shapes and the speed are real.\n",
        opts, CLI_N(opts), pos, 1, 2, &np};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r == 1 ? 0 : r;
    const char *dir = pos[0], *image = pos[1];
    if (strlen(dir) > 3000) { fprintf(stderr, "mmbridge: error: DIR is too long\n"); return 2; }
    char model[3100], out[3100];
    snprintf(model, sizeof model, "%s/llava-demo", dir);
    snprintf(out, sizeof out, "%s/embeddings.safetensors", dir);
    if ((mkdir(dir, 0755) && errno != EEXIST) || (mkdir(model, 0755) && errno != EEXIST)) {
        fprintf(stderr, "mmbridge: error: cannot create %s: %s\n", model, strerror(errno));
        return 1;
    }
    mmb_ctx *ctx = cli_ctx(&co);
    if (!ctx) return 1;
    r = write_checkpoint(ctx, model);
    if (!r) {
        printf("wrote %s (random weights)\n\n$ mmbridge info %s\n", model, model);
        fflush(stdout);
        r = cli_info_run(ctx, model, NULL, NULL, 0, NULL);
    }
    if (!r) {
        printf("\n$ mmbridge encode %s %s -o %s\n", model, image, out);
        fflush(stdout);
        const char *inputs[1] = {image};
        cli_enc e = {.model = model, .output = out, .inputs = inputs, .n_inputs = 1, .batch = 1};
        r = cli_encode_run(ctx, &e);
    }
    if (!r) r = print_stats(ctx, out);
    if (!r) {
        printf("\n$ mmbridge generate %s --image %s --prompt '%s' -n %lld\n", model, image, prompt, (long long)n_new);
        fflush(stdout);
        cli_gen g = {.model = model, .prompt = prompt, .images = {image}, .n_images = 1, .n_new = n_new,
                     .smp = mmb_sampler_default()};
        r = cli_generate_run(ctx, &g);
    }
    mmb_ctx_free(ctx);
    return r;
}
