/* mmbridge generate: a prompt with its images, as chunks (mmb_mllm_tokenize), through mmb_mllm_generate:
 * the images' embeddings spliced into the prompt, the LLM's prefill, decoding, streamed. */
#include "cli.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Ctrl-C: the handler raises the flag, the generation stops between two steps and prints its timings. */
static volatile sig_atomic_t interrupted;  /* an int, as mmb_gen_params.abort wants (a compile error elsewhere) */

static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

/* --embeds: tensor 'embeds' [n, d] (or [1, n, d]). */
static float *read_embeds(mmb_ctx *ctx, const char *path, int64_t d, int64_t *n) {
    mmb_st_file *f = NULL;
    if (mmb_st_open(ctx, path, &f) != MMB_OK) { cli_fail(ctx, NULL); return NULL; }
    const mmb_tensor *t = mmb_st_find(f, "embeds");
    float *e = NULL;
    int ok = t && (t->ndim == 2 || (t->ndim == 3 && t->shape[0] == 1)) && t->shape[t->ndim - 1] == d &&
             t->shape[t->ndim - 2] > 0 && (t->dtype == MMB_F32 || t->dtype == MMB_F16 || t->dtype == MMB_BF16);
    if (!ok) fprintf(stderr, "mmbridge: error: %s: tensor 'embeds': expected [n, %lld] F32/F16/BF16\n", path, (long long)d);
    else if (!(e = malloc(sizeof(float) * (size_t)mmb_tensor_numel(t)))) fprintf(stderr, "mmbridge: error: out of memory\n");
    else {
        mmb_to_f32(e, t->data, t->dtype, (size_t)mmb_tensor_numel(t));
        *n = t->shape[t->ndim - 2];
    }
    mmb_st_close(f);
    return e;
}

/* Appends rows to the logits kept for --logits. */
static int keep_logits(float **all, int64_t *rows, int64_t *cap, const float *lg, int64_t n, int64_t vocab) {
    if (*rows + n > *cap) {
        int64_t nc = (*rows + n) * 2;
        float *b = realloc(*all, sizeof(float) * (size_t)(nc * vocab));
        if (!b) { fprintf(stderr, "mmbridge: error: out of memory\n"); return 1; }
        *all = b;
        *cap = nc;
    }
    memcpy(*all + *rows * vocab, lg, sizeof(float) * (size_t)(n * vocab));
    *rows += n;
    return 0;
}


/* What the callbacks share. */
typedef struct gen_state {
    int print_ids;
    int64_t n_out;
    float *all;            /* --logits: the rows so far */
    int64_t rows, cap;
    int oom;
} gen_state;

static int on_token(void *user, int32_t id, const char *piece, size_t len) {
    gen_state *g = user;
    if (g->print_ids) printf("%s%d", g->n_out ? " " : "", (int)id);
    else fwrite(piece, 1, len, stdout);
    g->n_out++;
    fflush(stdout);
    return 0;
}

static void on_logits(void *user, const float *lg, int64_t n, int64_t vocab) {
    gen_state *g = user;
    if (!g->oom) g->oom = keep_logits(&g->all, &g->rows, &g->cap, lg, n, vocab);
}

/* The prompt as chunks: --prompt through the tokenizer (and chat template), --ids, or --embeds. */
static int prompt_chunks(mmb_ctx *ctx, mmb_mllm *m, const cli_gen *o, const mmb_image *imgs, mmb_chunks **c) {
    if (o->prompt)
        return mmb_mllm_tokenize(ctx, m, o->prompt, imgs, o->n_images, o->raw ? MMB_TOKENIZE_RAW : MMB_TOKENIZE_CHAT, c)
               != MMB_OK ? cli_fail(ctx, NULL) : 0;
    int64_t n = 0;
    int r = 0;
    if (o->ids) {
        int64_t *ids64 = cli_int_list("--ids", o->ids, 0, INT32_MAX, &n);
        int32_t *ids = ids64 ? malloc(sizeof *ids * (size_t)n) : NULL;
        for (int64_t i = 0; ids && i < n; i++) ids[i] = (int32_t)ids64[i];
        if (!ids) r = ids64 ? cli_fail(NULL, "out of memory") : 2;
        else if (mmb_mllm_chunks_from_ids(ctx, m, ids, n, imgs, o->n_images, c) != MMB_OK) r = cli_fail(ctx, NULL);
        free(ids64);
        free(ids);
        return r;
    }
    mmb_lm_info li;
    mmb_lm_get_info(mmb_mllm_lm(m), &li);
    float *e = read_embeds(ctx, o->embeds, li.d_model, &n);
    if (!e) return 1;
    if (mmb_chunks_new(ctx, c) != MMB_OK || mmb_chunks_add_embeds(ctx, m, *c, e, n, li.d_model) != MMB_OK)
        r = cli_fail(ctx, NULL);
    free(e);
    return r;
}

/* A progress bar over the image ids, on stderr. */
static void on_image_progress(void *user, const char *phase, int64_t done, int64_t total) {
    (void)user;
    (void)phase;
    int w = 40, f = total > 0 ? (int)(done * w / total) : w;
    fprintf(stderr, "\rimage: [%.*s%*s] %lld/%lld ids", f, "========================================", w - f, "",
            (long long)done, (long long)total);
    if (done == total) fputc('\n', stderr);
}

/* Image generation (fusion D, Janus): the prompt (--prompt through the chat template unless --raw, then the
 * begin-of-image token; or --ids as they are), the ids under guidance with a progress bar, then --image-out (the
 * processor's postprocess of the VQ decoder's pixels, as a PNG) and --image-ids. */
static int generate_image(mmb_ctx *ctx, mmb_mllm *m, const cli_gen *o) {
    int32_t *ids = NULL, *neg = NULL;
    int64_t n = 0, nn = 0;
    int r = 1, gh = 0, gw = 0;
    char tail;
    if (o->grid && (sscanf(o->grid, "%dx%d%c", &gh, &gw, &tail) != 2 || gh < 1 || gw < 1 || gh > 4096 || gw > 4096)) {
        fprintf(stderr, "mmbridge: error: --image-grid '%s': want ROWSxCOLS, each in 1..4096\n", o->grid);
        return 2;
    }
    const int flags = o->raw ? MMB_TOKENIZE_RAW : MMB_TOKENIZE_CHAT;
    if (o->negative && mmb_mllm_tokenize_image_prompt(ctx, m, o->negative, flags, gh, gw, &neg, &nn) != MMB_OK)
        return cli_fail(ctx, NULL);
    if (o->prompt) {
        if (mmb_mllm_tokenize_image_prompt(ctx, m, o->prompt, flags, gh, gw, &ids, &n) != MMB_OK) {
            free(neg);
            return cli_fail(ctx, NULL);
        }
    } else {
        int64_t *ids64 = cli_int_list("--ids", o->ids, 0, INT32_MAX, &n);
        if (!ids64 || !(ids = malloc(sizeof *ids * (size_t)(n ? n : 1)))) {
            free(neg);
            free(ids64);
            return ids64 ? cli_fail(NULL, "out of memory") : 2;
        }
        for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)ids64[i];
        free(ids64);
    }
    mmb_imagegen_params p = mmb_imagegen_default_params();
    p.guidance_scale = (float)o->guidance;
    p.negative_ids = neg;
    p.n_negative = nn;
    p.grid_h = gh;
    p.grid_w = gw;
    p.sampler = o->smp;
    p.on_progress = on_image_progress;
    p.abort = &interrupted;
    mmb_imagegen_result res = {0};
    mmb_image img = {0};
    mmb_status s = mmb_mllm_generate_image(ctx, m, ids, n, &p, &res);
    if (s == MMB_ERR_ABORTED) {
        fprintf(stderr, "\nstopped: interrupted (Ctrl-C)\n");
        r = 130;
        goto done;
    }
    if (s != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    if (o->image_ids) {
        mmb_tensor t = {.name = "ids", .dtype = MMB_I32, .ndim = 2, .shape = {res.grid_h, res.grid_w}, .data = res.ids};
        if (mmb_st_write(ctx, o->image_ids, &t, 1) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    }
    if (o->image_out && !mmb_mllm_processor(m)) {
        cli_fail(NULL, "the model has no image processor (preprocessor_config.json) to postprocess the image with");
        goto done;
    }
    if (o->image_out && (mmb_preprocess_postprocess(ctx, mmb_mllm_processor(m), res.pixels, res.height, res.width,
                                                    &img) != MMB_OK ||
                         mmb_image_write_png(ctx, o->image_out, &img) != MMB_OK)) {
        cli_fail(ctx, NULL);
        goto done;
    }
    fprintf(stderr, "image: %dx%d ids (%dx%d pixels); prompts %.3f s, ids %.3f s (%.1f ids/s), VQ decoder %.3f s; "
            "%d thread(s)\n", res.grid_h, res.grid_w, res.width, res.height, res.prefill_s, res.decode_s,
            (double)res.n_ids / (res.decode_s > 0 ? res.decode_s : 1e-9), res.vq_s, mmb_ctx_threads(ctx));
    r = 0;
done:
    mmb_image_free(&img);
    mmb_imagegen_result_free(&res);
    free(ids);
    free(neg);
    return r;
}

int cli_generate_run(mmb_ctx *ctx, const cli_gen *o) {
    mmb_mllm *m = NULL;
    mmb_chunks *chunks = NULL;
    mmb_kv_cache *kv = NULL;
    mmb_image imgs[CLI_MAX_IMAGES] = {{0}};
    gen_state g = {.print_ids = o->print_ids || !o->prompt};  /* no tokenizer in play: the output is ids */
    int r = 1;
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    interrupted = 0;
    sigaction(SIGINT, &sa, &old);
    if (cli_open(ctx, o->model, o->tower, NULL, 0, o->adapter, &m)) goto done;
    mmb_mllm_info in;
    mmb_mllm_get_info(m, &in);
    if (!in.has_lm) {
        fprintf(stderr, "mmbridge: error: %s: a %s model without a language model this build runs: nothing to "
                "generate with\n", o->model, in.family);
        goto done;
    }
    if (o->image_out || o->image_ids) {
        r = generate_image(ctx, m, o);
        goto done;
    }
    for (int i = 0; i < o->n_images; i++)
        if (mmb_image_load(ctx, o->images[i], 0, &imgs[i]) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    if ((r = prompt_chunks(ctx, m, o, imgs, &chunks))) goto done;
    r = 1;
    int64_t n = mmb_chunks_positions(chunks);
    if (n > in.context) {
        fprintf(stderr, "mmbridge: error: context overflow: the prompt is %lld tokens, the model's limit is %lld\n",
                (long long)n, (long long)in.context);
        goto done;
    }
    if (mmb_mllm_kv_new(ctx, m, n + o->n_new, &kv) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    mmb_gen_params gp = mmb_gen_default_params();
    gp.n_predict = o->n_new;
    gp.sampler = o->smp;
    gp.ignore_eos = o->ignore_eos;
    gp.stops = o->stops;
    gp.n_stops = o->n_stops;
    gp.n_batch = o->n_batch;
    gp.on_token = on_token;
    gp.on_logits = o->logits ? on_logits : NULL;
    gp.user = &g;
    gp.abort = &interrupted;
    mmb_gen_result res = {0};
    mmb_status s = mmb_mllm_generate(ctx, m, kv, chunks, &gp, &res);
    int stopped = s == MMB_ERR_ABORTED || (s == MMB_OK && res.stop == MMB_STOP_ABORT);
    if (s != MMB_OK && !stopped) { cli_fail(ctx, NULL); goto done; }
    printf("\n");
    fflush(stdout);
    if (g.oom) { cli_fail(NULL, "out of memory for --logits"); goto done; }
    if (o->logits && !stopped) {
        mmb_lm_info li;
        mmb_lm_get_info(mmb_mllm_lm(m), &li);
        mmb_tensor t = {.name = "logits", .dtype = MMB_F32, .ndim = 2, .shape = {g.rows, li.vocab}, .data = g.all};
        if (mmb_st_write(ctx, o->logits, &t, 1) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    }
    if (res.stop == MMB_STOP_CONTEXT) fprintf(stderr, "stopped: the context (%lld tokens) is full\n", (long long)in.context);
    if (stopped) fprintf(stderr, "stopped: interrupted (Ctrl-C)%s\n", s == MMB_ERR_ABORTED ? " during the prompt" : "");
    double pre = res.encode_s + res.prefill_s;
    int64_t steps = res.n_generated > 0 ? res.n_generated - 1 : 0;  /* the last token is not fed back */
    fprintf(stderr, "prefill: %lld tokens in %.3f s (%.1f tokens/s; images %.3f s); decode: %lld tokens in %.3f s "
            "(%.1f tokens/s); %d thread(s)\n", (long long)res.n_prompt, pre,
            (double)res.n_prompt / (pre > 0 ? pre : 1e-9), res.encode_s, (long long)steps, res.decode_s,
            steps ? (double)steps / (res.decode_s > 0 ? res.decode_s : 1e-9) : 0.0, mmb_ctx_threads(ctx));
    r = stopped ? 130 : 0;
done:
    sigaction(SIGINT, &old, NULL);
    for (int i = 0; i < o->n_images; i++) mmb_image_free(&imgs[i]);
    free(g.all);
    mmb_chunks_free(chunks);
    mmb_kv_cache_free(kv);
    mmb_mllm_free(m);
    return r;
}

int cmd_generate(int argc, char **argv) {
    static cli_gen o;
    memset(&o, 0, sizeof o);
    const char *pos[1];
    double temp = 0, top_p = 1, seed = 0;
    int64_t top_k = 0;
    o.n_new = 128;
    const cli_opt opts[] = {
        {.name = "--image", .meta = "IMG", .type = CLI_STRS, .dst = o.images,
         .help = "an image; each image marker of the prompt takes the next one", .count = &o.n_images,
         .max = CLI_MAX_IMAGES},
        {.name = "--vision-tower", .meta = "DIR", .type = CLI_STR, .dst = &o.tower,
         .help = "the CLIP/SigLIP checkpoint directory of an original-layout LLaVA model"},
        {.name = "--adapter", .meta = "DIR", .type = CLI_STR, .dst = &o.adapter,
         .help = "a PEFT LLaMA-Adapter directory (adapter_config.json, adapter_model.safetensors)\n"
         "put on the model's Llama or Mistral LLM"},
        {.name = "--prompt", .meta = "TEXT", .type = CLI_STR, .dst = &o.prompt,
         .help = "through the chat template of tokenizer_config.json / chat_template.json,\n"
         "then tokenized (--raw: tokenized verbatim, with the tokenizer's BOS); without an image\n"
         "marker (<image>) in TEXT, one per --image is put in front"},
        {.name = "--raw", .meta = NULL, .type = CLI_FLAG, .dst = &o.raw, .help = "no chat template"},
        {.name = "--ids", .meta = "LIST", .type = CLI_STR, .dst = &o.ids,
         .help = "the prompt as token ids, comma-separated (no tokenizer needed)"},
        {.name = "--embeds", .meta = "FILE", .type = CLI_STR, .dst = &o.embeds,
         .help = "the prompt as input embeddings: tensor 'embeds' [n, d_model]"},
        {.name = "-n", .meta = "N", .type = CLI_INT, .dst = &o.n_new,
         .help = "tokens to generate (default 128; 0: prefill only)", .lo = 0, .hi = 1e9},
        {.name = "--temp", .meta = "T", .type = CLI_NUM, .dst = &temp,
         .help = "sampling temperature (default 0: greedy)", .lo = 0, .hi = 100},
        {.name = "--top-k", .meta = "K", .type = CLI_INT, .dst = &top_k,
         .help = "sample from the K most likely tokens (0: off)", .lo = 0, .hi = 1e9},
        {.name = "--top-p", .meta = "P", .type = CLI_NUM, .dst = &top_p,
         .help = "nucleus sampling (1: off)", .lo = 0, .hi = 1},
        {.name = "--seed", .meta = "S", .type = CLI_NUM, .dst = &seed,
         .help = "the sampler's seed (the same seed, the same tokens)", .lo = 0, .hi = 1.8e19},
        {.name = "--stop", .meta = "STR", .type = CLI_STRS, .dst = o.stops,
         .help = "also stop when the text holds STR", .count = &o.n_stops, .max = CLI_MAX_STOPS},
        {.name = "--ignore-eos", .meta = NULL, .type = CLI_FLAG, .dst = &o.ignore_eos,
         .help = "do not stop at the end-of-sequence ids"},
        {.name = "--print-ids", .meta = NULL, .type = CLI_FLAG, .dst = &o.print_ids,
         .help = "print the generated ids, space-separated, instead of text (the\n"
         "output of --ids and --embeds)"},
        {.name = "--logits", .meta = "OUT", .type = CLI_STR, .dst = &o.logits,
         .help = "write 'logits' [positions, vocab] f32: every prompt position, then\n"
         "every decode step"},
        {.name = "--n-batch", .meta = "N", .type = CLI_INT, .dst = &o.n_batch, .lo = 0, .hi = 1 << 30,
         .help = "prompt positions per decoder call (default 0: each chunk in one call)"},
        {.name = "--image-out", .meta = "PNG", .type = CLI_STR, .dst = &o.image_out,
         .help = "generate an image instead of text (Janus, Emu3): the prompt, then the\n"
         "model's image codes under classifier-free guidance, decoded by its VQ model\n"
         "into PNG. With random weights the picture is noise"},
        {.name = "--image-ids", .meta = "OUT", .type = CLI_STR, .dst = &o.image_ids,
         .help = "with image generation: write 'ids' [grid_h, grid_w] I32, the image's codes"},
        {.name = "--negative-prompt", .meta = "TEXT", .type = CLI_STR, .dst = &o.negative,
         .help = "Emu3 image generation: the unconditional prompt of the guidance (default:\n"
         "the prompt's last id alone, as transformers does without one)"},
        {.name = "--image-grid", .meta = "HxW", .type = CLI_STR, .dst = &o.grid,
         .help = "Emu3 image generation: rows and columns of codes (default 90x90, its\n"
         "720x720 pixels)"},
        {.name = "--guidance", .meta = "G", .type = CLI_NUM, .dst = &o.guidance, .lo = 0, .hi = 1e6,
         .help = "classifier-free guidance scale of image generation (default: the model's\n"
         "generation_config.json, else 5; 1: none)"},
        CLI_OPT_THREADS(&o.co.threads),
    };
    const cli_spec spec = {"generate", "MODEL [--image IMG]... (--prompt TEXT | --ids LIST | --embeds FILE)",
        "MODEL: a LlavaForConditionalGeneration checkpoint (or original-layout LLaVA), or a plain\n"
        "LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM directory (no --image then).\n"
        "Each image marker of the prompt (the config's image_token_index) becomes the connector's\n"
        "embeddings of the next --image, in order; their counts must agree. Generated text (or ids\n"
        "with --print-ids) streams to stdout; prefill and decode speeds go to stderr at the end.\n"
        "Generation stops at an end-of-sequence id, after -n tokens, at a --stop string, or when the\n"
        "model's context is full (said on stderr: \"stopped: the context (N tokens) is full\"); all of\n"
        "these exit 0. Ctrl-C stops it between two steps: the text so far and the timings are printed,\n"
        "--logits is not written, and the exit status is 130.\n",
        opts, CLI_N(opts), pos, 1, 1, NULL};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r == 1 ? 0 : r;
    o.model = pos[0];
    o.smp = mmb_sampler_default();
    o.smp.temperature = (float)temp;
    o.smp.top_k = (int)top_k;
    o.smp.top_p = (float)top_p;
    o.smp.seed = (uint64_t)seed;
    if ((!!o.prompt + !!o.ids + !!o.embeds) != 1) {
        fprintf(stderr, "mmbridge generate: needs one of --prompt, --ids, --embeds\n");
        return 2;
    }
    if ((o.negative || o.grid) && !o.image_out && !o.image_ids) {
        fprintf(stderr, "mmbridge generate: --negative-prompt and --image-grid go with --image-out or --image-ids\n");
        return 2;
    }
    if ((o.image_out || o.image_ids) && (o.embeds || o.n_images || o.logits)) {
        fprintf(stderr, "mmbridge generate: image generation (--image-out, --image-ids) takes --prompt or --ids, no "
                "--image, --embeds or --logits\n");
        return 2;
    }
    if (o.embeds && o.n_images) {
        fprintf(stderr, "mmbridge generate: --embeds is the whole input; it takes no --image\n");
        return 2;
    }
    mmb_ctx *ctx = cli_ctx(&o.co);
    if (!ctx) return 1;
    r = cli_generate_run(ctx, &o);
    mmb_ctx_free(ctx);
    return r;
}
