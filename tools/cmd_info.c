/* mmbridge info: what a checkpoint is and what it costs. */
#include "cli.h"

#include <string.h>

static void print_dense(const mmb_model *m, const mmb_model_info *in) {
    mmb_dense_params dp = mmb_model_dense(m);
    printf("dense connector:  %s -> projector %s", in->dense, in->projector);
    if (dp.type == MMB_DENSE_STI) printf(", AvgPool1d(%d)", dp.pool ? dp.pool : 8);
    if (dp.tokens) printf(", bilinear to %lld tokens", (long long)dp.tokens);
    printf("\n");
    if (!in->n_taps) {
        printf("dense reads:      resolved once the vision tower is known (--vision-tower)\n");
        return;
    }
    printf("dense reads:      final hidden_states[%d]", in->taps[0]);
    for (int i = 1; i < in->n_taps; i++)
        if (in->tap_spans[i] > 1) printf("%s mean of [%d..%d]", i > 1 ? "," : ";", in->taps[i],
                                         in->taps[i] + in->tap_spans[i] - 1);
        else printf("%s hidden_states[%d]", i > 1 ? "," : ";", in->taps[i]);
    printf(" (paper layers: final %d", in->taps[0] + 1);
    for (int i = 1; i < in->n_taps; i++)
        if (in->tap_spans[i] > 1) printf(", %d-%d", in->taps[i] + 1, in->taps[i] + in->tap_spans[i]);
        else printf(", %d", in->taps[i] + 1);
    printf(")\n");
}

static void print_model(const mmb_model *m) {
    mmb_model_info in;
    mmb_model_get_info(m, &in);
    printf("architecture:     %s\n", in.architecture);
    printf("layout:           %s\n", in.layout);
    printf("family:           %s\n", in.family);
    printf("connector:        %s%s%s\n", in.connector, in.activation[0] ? ", activation " : "", in.activation);
    printf("weights:          %s\n", mmb_dtype_name(in.weight_dtype));
    if (in.dense[0]) print_dense(m, &in);
    else if (in.n_taps) {
        printf("hidden layers:    hidden_states[");
        for (int i = 0; i < in.n_taps; i++) printf(i ? ", %d" : "%d", in.taps[i]);
        printf("]%s, strategy %s\n", in.n_taps > 1 ? " concatenated on channels" : "", in.select_strategy);
    }
    if (in.vision_layers) printf("vision encoder:   %d layers, width %d, image %d, patch %d\n", in.vision_layers,
                                 in.vision_width, in.image_size, in.patch_size);
    else printf("vision encoder:   width %d (tower not in this checkpoint)\n", in.vision_width);
    printf("input width:      %d\n", in.in_width);
    printf("output width:     %d\n", in.out_width);
    printf("parameters:       %lld\n", (long long)in.params);
    if (in.tokens_per_image) {
        printf("tokens per image: %lld\n", (long long)in.tokens_per_image);
        printf("FLOPs per image:  %.3f GFLOP (connector)\n", (double)in.flops_per_image * 1e-9);
    } else
        printf("tokens per image: %s\n", in.image_size ? "varies with the image's processed size (tiles, grid)"
                                                      : "unknown (image size not in the config)");
}

/* The language model and tokenizer, where the directory has them. */
static void print_lm(const mmb_mllm *m, const mmb_mllm_info *in) {
    const mmb_lm *lm = mmb_mllm_lm(m);
    const mmb_tokenizer *t = mmb_mllm_tokenizer(m);
    if (lm) {
        mmb_lm_info li;
        mmb_lm_get_info(lm, &li);
        printf("language model:   %s, %lld layers, width %lld, %lld heads (%lld KV), MLP %lld, vocab %lld, "
               "context %lld, %lld parameters (%s)\n", li.arch, (long long)li.layers, (long long)li.d_model,
               (long long)li.heads, (long long)li.kv_heads, (long long)li.intermediate, (long long)li.vocab,
               (long long)li.max_positions, (long long)li.params, mmb_dtype_name(li.weight_dtype));
    } else
        printf("language model:   none\n");
    if (in->image_token >= 0) printf("image marker:     %s (token %d)\n", in->image_marker, (int)in->image_token);
    if (in->fusion == MMB_FUSION_A) /* exact counts: compare's CSV and the tests read the same figures */
        printf("cross-attention:  %d gated layers, %lld parameters; %lld FLOP per text position seeing one image; "
               "per image %lld visual tokens, %lld bytes of keys and values kept, %lld FLOP to compute them "
               "once "
               "(fusion C would spend %lld positions of LLM prefill and KV cache on it)\n", in->xattn_layers,
               (long long)in->xattn_params, (long long)in->xattn_flops_per_token, (long long)in->tokens_per_image,
               (long long)in->xattn_kv_bytes_per_image, (long long)in->xattn_kv_flops_per_image,
               (long long)in->tokens_per_image);
    if (in->vq_codebook) { /* fusion D: ids against type C's continuous tokens at the same size */
        int bits = 0;
        while (((int64_t)1 << bits) < in->vq_codebook) bits++;
        int side = in->image_size;
        printf("VQ tokens:        %lld codes (%d bits an id), %d pixels per code side", (long long)in->vq_codebook,
               bits, in->vq_downsample);
        if (in->vq_encodes && side && in->tokens_per_image) {
            int64_t c = (int64_t)(side / 14) * (side / 14); /* a CLIP ViT/14 at the same size, LLaVA's tower */
            printf("; a %dx%d image is %lld ids (%.1f KiB) and as many LLM positions, where type C's ViT/14 at that "
                   "size gives %lld continuous tokens (%.1f KiB of f32 embeddings of width %d)", side, side,
                   (long long)in->tokens_per_image, (double)in->tokens_per_image * bits / 8192.0, (long long)c,
                   (double)c * in->out_width * 4 / 1024.0, in->out_width);
        }
        if (in->vq_decodes) printf("; it decodes ids into pixels (image generation)");
        printf("\n");
    }
    if (in->expert_sets > 1)
        printf("expert sets:      %d weight sets per layer (image rows run the second), %lld parameters added over the "
               "plain LLM, no FLOPs per position added (each position runs one set)\n", in->expert_sets,
               (long long)in->added_params);
    if (in->adapter_layers)
        printf("adapter:          %d adapted layers x %lld prompt vectors; %lld parameters added; %lld FLOP per text "
               "position added; %lld FLOP for the prompts' keys and values (%s)\n", in->adapter_layers,
               (long long)in->adapter_len, (long long)(in->added_params), (long long)in->added_flops_per_token,
               (long long)in->adapter_flops_per_image, in->has_vision ? "per image" : "once, at load");
    if (t)
        printf("tokenizer:        vocab %lld, BOS %d, EOS %d, chat template %s\n", (long long)mmb_tokenizer_vocab_size(t),
               mmb_tokenizer_bos_id(t), mmb_tokenizer_eos_id(t), in->has_chat_template ? "yes" : "no");
    else if (lm)
        printf("tokenizer:        none (no tokenizer.json)\n");
}

int cli_info_run(mmb_ctx *ctx, const char *dir, const char *tower, const mmb_dense_params *dense, int dtype,
                 const char *adapter) {
    mmb_mllm *m = NULL;
    if (cli_open(ctx, dir, tower, dense, 0, adapter, &m)) return 1;
    mmb_mllm_info in;
    mmb_mllm_get_info(m, &in);
    static const char *const dts[] = {"F32", "BF16", "F16", "int8, per-channel scales"};
    printf("model:            %s\n", dir);
    if (mmb_mllm_model(m)) print_model(mmb_mllm_model(m));
    else printf("architecture:     %s\nfamily:           %s\n", in.architecture, in.family);
    printf("fusion:           %s\n", mmb_fusion_name(in.fusion));
    printf("compute dtype:    %s (linear layers' weights; activations f32)\n", dts[dtype]);
    printf("image processor:  %s\n", in.has_processor ? in.processor : "none");
    const mmb_vit *v = mmb_mllm_vit(m);
    if (v) {
        mmb_vit_info vi;
        mmb_vit_get_info(v, &vi);
        printf("vision tower:     %s, %lld parameters, %.3f GFLOP per image (all %d blocks)%s\n", vi.family,
               (long long)vi.params, (double)vi.flops_per_image * 1e-9, vi.layers,
               mmb_mllm_model(m) ? "" : "; a tower alone: encode writes its last_hidden_state");
    }
    print_lm(m, &in);
    mmb_mllm_free(m);
    return 0;
}

/* A GGUF file (its first four bytes "GGUF"): the version, every key (arrays: their type, length and first
 * values) and every tensor (ggml type, row-major shape, bytes). Returns 0, or 1 after printing why. */
static int gguf_info(mmb_ctx *ctx, const char *path) {
    mmb_gguf *g = NULL;
    if (mmb_gguf_open(ctx, path, &g) != MMB_OK) return cli_fail(ctx, NULL);
    static const char *const tn[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "str", "array", "u64", "i64", "f64"};
    int64_t nk = mmb_gguf_kv_count(g), nt = mmb_gguf_tensor_count(g);
    printf("GGUF v%d: %lld keys, %lld tensors\n", mmb_gguf_version(g), (long long)nk, (long long)nt);
    for (int64_t i = 0; i < nk; i++) {
        mmb_gguf_type elem;
        int64_t n = 0, iv;
        double fv;
        size_t len;
        mmb_gguf_type t = mmb_gguf_kv_type(g, i, &elem, &n);
        printf("  %-40s ", mmb_gguf_key(g, i));
        if (t == MMB_GGUF_ARRAY) printf("[%s x %lld] ", tn[elem], (long long)n);
        for (int64_t k = 0; k < n && k < 6; k++) {
            const char *sv = mmb_gguf_get_str(g, i, k, &len);
            if (k) printf(", ");
            if (sv) printf("\"%.*s\"", (int)(len > 60 ? 60 : len), sv);
            else if (elem != MMB_GGUF_FLOAT32 && elem != MMB_GGUF_FLOAT64 && mmb_gguf_get_int(g, i, k, &iv)) printf("%lld", (long long)iv);
            else if (mmb_gguf_get_float(g, i, k, &fv)) printf("%g", fv);
            else printf("...");
        }
        printf("%s\n", n > 6 ? ", ..." : "");
    }
    for (int64_t i = 0; i < nt; i++) {
        const mmb_gguf_tensor *t = mmb_gguf_tensor_at(g, i);
        printf("  %-40s %-5s [", t->name, mmb_ggml_type_name(t->ggml_type));
        for (int d = 0; d < t->ndim; d++) printf("%s%lld", d ? ", " : "", (long long)t->shape[d]);
        printf("] %zu bytes\n", t->nbytes);
    }
    mmb_gguf_close(g);
    return 0;
}

static int is_gguf(const char *path) {
    FILE *f = fopen(path, "rb");
    char m[4] = {0};
    int yes = f && fread(m, 1, 4, f) == 4 && !memcmp(m, "GGUF", 4);
    if (f) fclose(f);
    return yes;
}

int cmd_info(int argc, char **argv) {
    const char *pos[1];
    cli_ctx_opts co = {0};
    mmb_dense_params dense = {0};
    const char *tower = NULL, *adapter = NULL;
    const cli_opt opts[] = {
        {.name = "--vision-tower", .meta = "DIR", .type = CLI_STR, .dst = &tower,
         .help = "the CLIP/SigLIP directory of an original-layout LLaVA checkpoint"},
        {.name = "--adapter", .meta = "DIR", .type = CLI_STR, .dst = &adapter,
         .help = "a PEFT LLaMA-Adapter directory put on the LLM (its costs are shown)"},
        CLI_OPTS_CTX(&co),
        CLI_OPTS_DENSE(&dense),
    };
    const cli_spec spec = {"info", "MODEL",
        "Prints what MODEL is: its architecture, key layout and family; the connector (hidden layers read,\n"
        "as HF hidden_states indices, input and output widths, parameters, visual tokens and FLOPs per\n"
        "image); the vision tower; the language model and tokenizer where the directory has them.\n"
        "MODEL may also be a GGUF file (llama.cpp's): its keys and tensors are listed.\n",
        opts, CLI_N(opts), pos, 1, 1, NULL};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r == 1 ? 0 : r;
    mmb_ctx *ctx = cli_ctx(&co);
    if (!ctx) return 1;
    r = is_gguf(pos[0]) ? gguf_info(ctx, pos[0]) : cli_info_run(ctx, pos[0], tower, &dense, co.dtype, adapter);
    mmb_ctx_free(ctx);
    return r;
}

