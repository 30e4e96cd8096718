/* mmbridge generate: image(s) -> the model's vision encoder and connector -> embeddings spliced into the
 * prompt's text embeddings at the image placeholders -> the LLM's prefill -> decoding, streamed. */
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>

/* Ctrl-C: the handler raises the flag, the generation stops between two steps and prints its timings. */
static volatile sig_atomic_t interrupted;

static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
}

/* One image through the model's processor, encoder and connector: emb (*t, d) malloc'd. */
static float *encode_image(mmb_ctx *ctx, const mmb_model *m, const char *dir, const char *path, int64_t *t) {
    mmb_model_info mi;
    mmb_model_get_info(m, &mi);
    mmb_preprocess pp;
    mmb_image img = {0};
    int h = 0, w = 0;
    float *px = NULL, *emb = NULL;
    if (mmb_preprocess_load(ctx, dir, &pp) != MMB_OK) goto fail;
    if (mi.pad_to_square) pp.do_pad = 1;
    if (mmb_image_load(ctx, path, 0, &img) != MMB_OK ||
        mmb_preprocess_output_size(ctx, &pp, img.height, img.width, &h, &w) != MMB_OK)
        goto fail;
    size_t np = (size_t)3 * (size_t)h * (size_t)w;
    if (!(px = malloc(np * sizeof(float)))) goto oom;
    if (mmb_preprocess_run(ctx, &pp, &img, px, np) != MMB_OK) goto fail;
    *t = mmb_model_encode_tokens(ctx, m, h, w);
    if (*t < 0) goto fail;
    size_t ne = (size_t)(*t * mi.out_width);
    if (!(emb = malloc(ne * sizeof(float) + 1))) goto oom;
    if (mmb_model_encode(ctx, m, px, 1, h, w, emb, ne) != MMB_OK) goto fail;
    free(px);
    mmb_image_free(&img);
    return emb;
oom:
    fprintf(stderr, "mmbridge: error: out of memory\n");
    goto out;
fail:
    cli_fail(ctx, NULL);
out:
    free(px);
    free(emb);
    mmb_image_free(&img);
    return NULL;
}

/* The prompt's input embeddings: ids with each placeholder replaced by the next image's embeddings.
 * Returns a malloc'd (*n, d) array, or NULL after printing the error. */
static float *assemble(mmb_ctx *ctx, const cli_gen *o, const mmb_lm *lm, const int32_t *ids, int64_t n_ids,
                       int64_t *n) {
    mmb_lm_info li;
    mmb_lm_get_info(lm, &li);
    int64_t d = li.d_model, placeholders = 0;
    for (int64_t i = 0; i < n_ids; i++) placeholders += li.image_token >= 0 && ids[i] == li.image_token;
    if (placeholders != o->n_images) {
        fprintf(stderr, "mmbridge: error: the prompt has %lld image placeholder(s) (token %d) but %d image(s) "
                "were given\n", (long long)placeholders, (int)li.image_token, o->n_images);
        return NULL;
    }
    float *img[CLI_MAX_IMAGES] = {0}, *out = NULL;
    int64_t t[CLI_MAX_IMAGES] = {0}, total = n_ids - placeholders;
    cli_model cm = {0};
    const mmb_model *m = NULL;
    if (o->n_images) {
        if (cli_open(ctx, o->model, NULL, NULL, &cm)) goto done;
        if (!(m = cm.model)) {
            fprintf(stderr, "mmbridge: error: %s: a vision tower alone has no LLM\n", o->model);
            goto done;
        }
        mmb_model_info mi;
        mmb_model_get_info(m, &mi);
        if (mi.out_width != d) {
            fprintf(stderr, "mmbridge: error: %s: the connector makes %d-wide embeddings, the LLM takes %lld\n",
                    o->model, mi.out_width, (long long)d);
            goto done;
        }
        for (int k = 0; k < o->n_images; k++) {
            if (!(img[k] = encode_image(ctx, m, o->model, o->images[k], &t[k]))) goto done;
            total += t[k];
        }
    }
    if (!(out = malloc(sizeof(float) * (size_t)(total * d) + 1))) {
        fprintf(stderr, "mmbridge: error: out of memory\n");
        goto done;
    }
    int64_t row = 0;
    for (int64_t i = 0, k = 0; i < n_ids; i++) {
        if (li.image_token >= 0 && ids[i] == li.image_token) {
            memcpy(out + row * d, img[k], sizeof(float) * (size_t)(t[k] * d));
            row += t[k++];
        } else {
            if (mmb_lm_embed(ctx, lm, ids + i, 1, out + row * d) != MMB_OK) {
                cli_fail(ctx, NULL);
                free(out);
                out = NULL;
                goto done;
            }
            row++;
        }
    }
    *n = total;
done:
    for (int k = 0; k < CLI_MAX_IMAGES; k++) free(img[k]);
    cli_close(&cm);
    return out;
}

/* --prompt: the text (with one placeholder per image put in front when it has none), through the chat
 * template unless --raw, tokenized as transformers does (apply_chat_template adds no special tokens; a raw
 * prompt gets the post-processor's, e.g. BOS). Returns 0, or 1 after printing the error. */
static int prompt_ids(mmb_ctx *ctx, const cli_gen *o, const mmb_tokenizer *tok, int32_t image_token, int32_t **ids,
                      int64_t *n) {
    const char *ph = image_token >= 0 ? mmb_tokenizer_token_text(tok, image_token) : NULL;
    size_t extra = ph && o->n_images && !strstr(o->prompt, ph) ? (strlen(ph) + 1) * (size_t)o->n_images : 0;
    char *text = malloc(strlen(o->prompt) + extra + 1), *rendered = NULL;
    if (!text) { fprintf(stderr, "mmbridge: error: out of memory\n"); return 1; }
    text[0] = 0;
    for (int k = 0; extra && k < o->n_images; k++) { strcat(text, ph); strcat(text, "\n"); }
    strcat(text, o->prompt);
    int r = 0;
    if (!o->raw) {
        mmb_chat_msg m = {"user", text};
        if (mmb_chat_render(ctx, tok, &m, 1, 1, &rendered) != MMB_OK) r = cli_fail(ctx, NULL);
    }
    const char *in = o->raw ? text : rendered;
    if (!r && mmb_tokenizer_encode(ctx, tok, in, strlen(in), o->raw, ids, n) != MMB_OK) r = cli_fail(ctx, NULL);
    free(text);
    free(rendered);
    return r;
}

/* Text mode: prints the decoded text of gen[0, n) not printed yet and appends it to *all; returns 1 when a
 * --stop string has appeared. */
static int stream_text(mmb_ctx *ctx, const cli_gen *o, const mmb_tokenizer *tok, const int32_t *gen, int64_t n,
                       int flush, size_t *emitted, char **all, size_t *all_len) {
    char *piece = NULL;
    size_t len = 0;
    if (mmb_tokenizer_decode_stream(ctx, tok, gen, n, 1, flush, emitted, &piece, &len) != MMB_OK) return 0;
    fwrite(piece, 1, len, stdout);
    fflush(stdout);
    char *b = realloc(*all, *all_len + len + 1);
    if (b) {
        memcpy(b + *all_len, piece, len);
        *all_len += len;
        b[*all_len] = 0;
        *all = b;
    }
    free(piece);
    for (int k = 0; b && k < o->n_stops; k++)
        if (strstr(*all, o->stops[k])) return 1;
    return 0;
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


/* Why the decode loop ended. */
enum { END_EOS, END_LENGTH, END_CONTEXT, END_STOP, END_INTERRUPT };

int cli_generate_run(mmb_ctx *ctx, const cli_gen *o) {
    mmb_lm *lm = NULL;
    mmb_kv_cache *kv = NULL;
    mmb_tokenizer *tok = NULL;
    int32_t *gen = NULL;
    char *text = NULL;
    size_t emitted = 0, text_len = 0;
    int64_t *ids64 = NULL, n_ids = 0, n = 0, *chunks = NULL, n_chunks = 0, rows = 0, cap = 0;
    int32_t *ids = NULL;
    float *emb = NULL, *lg = NULL, *all = NULL, *e1 = NULL;
    int r = 1, print_ids = o->print_ids || !o->prompt; /* no tokenizer in play: the output is ids */
    mmb_sampler smp = o->smp;
    struct sigaction sa = {0}, old;
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    interrupted = 0;
    sigaction(SIGINT, &sa, &old);
    if (mmb_lm_open(ctx, o->model, &lm) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    mmb_lm_info li;
    mmb_lm_get_info(lm, &li);
    if (o->chunks && !(chunks = cli_int_list("--chunks", o->chunks, 1, INT32_MAX, &n_chunks))) { r = 2; goto done; }
    if (o->prompt) {
        if (mmb_tokenizer_open(ctx, o->model, &tok) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        if (prompt_ids(ctx, o, tok, li.image_token, &ids, &n_ids)) goto done;
        if (!(emb = assemble(ctx, o, lm, ids, n_ids, &n))) goto done;
        int32_t stop[8];
        int ns = mmb_tokenizer_stop_ids(tok, stop, 8);
        for (int k = 0; k < ns && k < 8 && li.n_eos < 8; k++) {
            int dup = 0;
            for (int e = 0; e < li.n_eos; e++) dup |= li.eos[e] == stop[k];
            if (!dup) li.eos[li.n_eos++] = stop[k];
        }
    } else if (o->ids) {
        if (!(ids64 = cli_int_list("--ids", o->ids, 0, INT32_MAX, &n_ids))) { r = 2; goto done; }
        if (!(ids = malloc(sizeof *ids * (size_t)n_ids))) goto done;
        for (int64_t i = 0; i < n_ids; i++) ids[i] = (int32_t)ids64[i];
        if (!(emb = assemble(ctx, o, lm, ids, n_ids, &n))) goto done;
    } else if (!(emb = read_embeds(ctx, o->embeds, li.d_model, &n)))
        goto done;
    if (n > li.max_positions) {
        fprintf(stderr, "mmbridge: error: context overflow: the prompt is %lld tokens, the model's limit is %lld\n",
                (long long)n, (long long)li.max_positions);
        goto done;
    }
    int64_t kvcap = n + o->n_new < li.max_positions ? n + o->n_new : li.max_positions;
    if (mmb_kv_cache_new(ctx, lm, kvcap, &kv) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    if (!(lg = malloc(sizeof(float) * (size_t)(n * li.vocab))) || !(e1 = malloc(sizeof(float) * (size_t)li.d_model))) {
        fprintf(stderr, "mmbridge: error: out of memory\n");
        goto done;
    }
    /* prefill, in the --chunks pieces if given; Ctrl-C stops between two pieces */
    double t0 = cli_now();
    int64_t off = 0;
    for (int64_t c = 0; off < n && !interrupted; c++) {
        int64_t m = c < n_chunks && chunks[c] < n - off ? chunks[c] : n - off;
        if (mmb_lm_forward(ctx, lm, kv, emb + off * li.d_model, m, o->logits ? lg + off * li.vocab : lg, !o->logits) !=
            MMB_OK) {
            cli_fail(ctx, NULL);
            goto done;
        }
        off += m;
    }
    double t1 = cli_now();
    const float *last = o->logits ? lg + (n - 1) * li.vocab : lg;
    if (o->logits && off == n && keep_logits(&all, &rows, &cap, lg, n, li.vocab)) goto done;
    long steps = 0;
    int end = interrupted ? END_INTERRUPT : END_LENGTH;
    if (o->n_new > 0 && !(gen = malloc(sizeof *gen * (size_t)o->n_new))) goto done;
    for (long g = 0; g < o->n_new && end != END_INTERRUPT; g++) {
        int32_t t;
        if (mmb_sample(ctx, &smp, last, li.vocab, &t) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        gen[g] = t;
        int eos = 0, stop = 0;
        for (int k = 0; k < li.n_eos && !o->ignore_eos; k++) eos |= t == li.eos[k];
        if (print_ids) printf("%s%d", g ? " " : "", (int)t);
        else stop = stream_text(ctx, o, tok, gen, g + 1, 0, &emitted, &text, &text_len);
        fflush(stdout);
        end = eos ? END_EOS : stop ? END_STOP : g + 1 == o->n_new ? END_LENGTH
            : mmb_kv_cache_len(kv) >= kvcap ? END_CONTEXT : interrupted ? END_INTERRUPT : -1;
        if (end >= 0) {
            if (!print_ids) stream_text(ctx, o, tok, gen, g + 1, 1, &emitted, &text, &text_len);
            break;
        }
        if (mmb_lm_embed(ctx, lm, &t, 1, e1) != MMB_OK || mmb_lm_forward(ctx, lm, kv, e1, 1, lg, 1) != MMB_OK) {
            cli_fail(ctx, NULL);
            goto done;
        }
        steps++;
        last = lg;
        if (o->logits && keep_logits(&all, &rows, &cap, lg, 1, li.vocab)) goto done;
    }
    double t2 = cli_now();
    printf("\n");
    fflush(stdout);
    if (o->logits && end != END_INTERRUPT) {
        mmb_tensor t = {.name = "logits", .dtype = MMB_F32, .ndim = 2, .shape = {rows, li.vocab}, .data = all};
        if (mmb_st_write(ctx, o->logits, &t, 1) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    }
    if (end == END_CONTEXT) fprintf(stderr, "stopped: the context (%lld tokens) is full\n", (long long)li.max_positions);
    if (end == END_INTERRUPT) fprintf(stderr, "stopped: interrupted (Ctrl-C)%s\n", off < n ? " during the prefill" : "");
    fprintf(stderr, "prefill: %lld tokens in %.3f s (%.1f tokens/s); decode: %ld tokens in %.3f s (%.1f tokens/s); "
            "%d thread(s)\n", (long long)off, t1 - t0, (double)off / (t1 - t0 > 0 ? t1 - t0 : 1e-9), steps, t2 - t1,
            steps ? (double)steps / (t2 - t1 > 0 ? t2 - t1 : 1e-9) : 0.0, mmb_ctx_threads(ctx));
    r = end == END_INTERRUPT ? 130 : 0;
done:
    sigaction(SIGINT, &old, NULL);
    free(ids64);
    free(ids);
    free(chunks);
    free(emb);
    free(lg);
    free(all);
    free(e1);
    free(gen);
    free(text);
    mmb_tokenizer_free(tok);
    mmb_kv_cache_free(kv);
    mmb_lm_free(lm);
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
        {.name = "--chunks", .meta = "LIST", .type = CLI_STR, .dst = &o.chunks,
         .help = "feed the prompt in pieces of these sizes (e.g. 3,2,1), the rest in one"},
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
