/* mmbridge generate: image(s) -> the model's vision encoder and connector -> embeddings spliced into the
 * prompt's text embeddings at the image placeholders -> the LLM's prefill -> decoding, streamed. */
#include "cli.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *usage_generate =
    "usage: mmbridge generate MODEL [--image IMG]... (--prompt TEXT | --ids LIST | --embeds FILE)\n"
    "                         [-n N] [--temp T] [--top-k K] [--top-p P] [--seed S] [--raw]\n"
    "                         [--stop STR] [--ignore-eos] [--print-ids] [--logits OUT] [--chunks LIST]\n"
    "                         [--threads N]\n"
    "\n"
    "MODEL: a LlavaForConditionalGeneration checkpoint (or original-layout LLaVA), or a plain\n"
    "LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM directory (no --image then).\n"
    "Each image placeholder of the prompt (the config's image_token_index) becomes the connector's\n"
    "embeddings of the next --image, in order; their counts must agree. Generated text (or ids with\n"
    "--print-ids) streams to stdout; prefill and decode speeds go to stderr at the end.\n"
    "\n"
    "  --prompt TEXT   through the chat template of tokenizer_config.json / chat_template.json, then\n"
    "                  tokenized (--raw: tokenized verbatim, with the tokenizer's BOS); without an\n"
    "                  image placeholder (<image>) in TEXT, one per --image is put in front\n"
    "  --ids LIST      the prompt as token ids, comma-separated (no tokenizer needed)\n"
    "  --embeds FILE   the prompt as input embeddings: tensor 'embeds' [n, d_model] of a safetensors file\n"
    "  -n N            tokens to generate (default 128; 0: prefill only)\n"
    "  --temp T        sampling temperature (default 0: greedy); --top-k K, --top-p P, --seed S\n"
    "  --stop STR      also stop when the text ends with STR (repeatable)\n"
    "  --ignore-eos    do not stop at the end-of-sequence ids\n"
    "  --print-ids     print the generated ids, space-separated, instead of text (the output of\n"
    "                  --ids and --embeds)\n"
    "  --logits OUT    write 'logits' [positions, vocab] f32: every prompt position, then every decode step\n"
    "  --chunks LIST   feed the prompt in pieces of these sizes (e.g. 3,2,1), the rest in one (tests)\n"
    "  --threads N     worker threads (default: online CPUs)\n";

#define MAX_IMAGES 64
#define MAX_STOPS 8

typedef struct gen_opts {
    const char *model, *prompt, *ids, *embeds, *logits, *chunks;
    const char *images[MAX_IMAGES];
    const char *stops[MAX_STOPS];
    int n_images, n_stops, raw, ignore_eos, print_ids, threads;
    long n_new;
    mmb_sampler smp;
} gen_opts;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int parse_num(const char *opt, const char *v, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double x = v ? strtod(v, &end) : 0;
    if (!v || *end || errno || !(x >= lo && x <= hi)) {
        fprintf(stderr, "mmbridge: %s wants a number in [%g, %g]\n", opt, lo, hi);
        return 2;
    }
    *out = x;
    return 0;
}

static int parse_gen(int argc, char **argv, gen_opts *o) {
    o->n_new = 128;
    o->smp = mmb_sampler_default();
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        double x;
        int takes = 1;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage_generate, stdout);
            return 1;
        } else if (!strcmp(a, "--raw")) { o->raw = 1; takes = 0; }
        else if (!strcmp(a, "--ignore-eos")) { o->ignore_eos = 1; takes = 0; }
        else if (!strcmp(a, "--print-ids")) { o->print_ids = 1; takes = 0; }
        else if (!v && a[0] == '-') {
            fprintf(stderr, "mmbridge: %s wants a value\n%s", a, usage_generate);
            return 2;
        } else if (!strcmp(a, "--image")) {
            if (o->n_images == MAX_IMAGES) { fprintf(stderr, "mmbridge: at most %d images\n", MAX_IMAGES); return 2; }
            o->images[o->n_images++] = v;
        } else if (!strcmp(a, "--stop")) {
            if (o->n_stops == MAX_STOPS) { fprintf(stderr, "mmbridge: at most %d --stop\n", MAX_STOPS); return 2; }
            o->stops[o->n_stops++] = v;
        } else if (!strcmp(a, "--prompt")) o->prompt = v;
        else if (!strcmp(a, "--ids")) o->ids = v;
        else if (!strcmp(a, "--embeds")) o->embeds = v;
        else if (!strcmp(a, "--logits")) o->logits = v;
        else if (!strcmp(a, "--chunks")) o->chunks = v;
        else if (!strcmp(a, "-n")) {
            if (parse_num(a, v, 0, 1e9, &x)) return 2;
            o->n_new = (long)x;
        } else if (!strcmp(a, "--temp")) {
            if (parse_num(a, v, 0, 100, &x)) return 2;
            o->smp.temperature = (float)x;
        } else if (!strcmp(a, "--top-k")) {
            if (parse_num(a, v, 0, 1e9, &x)) return 2;
            o->smp.top_k = (int)x;
        } else if (!strcmp(a, "--top-p")) {
            if (parse_num(a, v, 0, 1, &x)) return 2;
            o->smp.top_p = (float)x;
        } else if (!strcmp(a, "--seed")) {
            if (parse_num(a, v, 0, 1.8e19, &x)) return 2;
            o->smp.seed = (uint64_t)x;
        } else if (!strcmp(a, "--threads")) {
            if (parse_num(a, v, 1, 1024, &x)) return 2;
            o->threads = (int)x;
        } else if (a[0] == '-' || o->model) {
            fprintf(stderr, "mmbridge: unexpected argument '%s'\n%s", a, usage_generate);
            return 2;
        } else {
            o->model = a;
            takes = 0;
        }
        i += takes;
    }
    if (!o->model || (!!o->prompt + !!o->ids + !!o->embeds) != 1) {
        fprintf(stderr, "mmbridge: generate needs MODEL and one of --prompt, --ids, --embeds\n%s", usage_generate);
        return 2;
    }
    if (!o->prompt) o->print_ids = 1; /* no tokenizer in play: the output is ids */
    if (o->embeds && o->n_images) {
        fprintf(stderr, "mmbridge: --embeds is the whole input; it takes no --image\n");
        return 2;
    }
    return 0;
}

/* "1,2,3" -> a malloc'd array; *n its length. NULL (message printed) on a bad list. */
static int64_t *parse_list(const char *opt, const char *v, int64_t lo, int64_t hi, int64_t *n) {
    int64_t cap = 16, *a = malloc(sizeof *a * (size_t)cap);
    *n = 0;
    const char *q = v;
    while (a && *q) {
        char *end;
        errno = 0;
        long long x = strtoll(q, &end, 10);
        if (end == q || errno || x < lo || x > hi || (*end && *end != ',')) {
            fprintf(stderr, "mmbridge: %s wants comma-separated integers in [%lld, %lld]\n", opt, (long long)lo,
                    (long long)hi);
            free(a);
            return NULL;
        }
        if (*n == cap) {
            int64_t *b = realloc(a, sizeof *a * (size_t)(cap *= 2));
            if (!b) break;
            a = b;
        }
        a[(*n)++] = x;
        q = *end ? end + 1 : end;
    }
    if (!a || *n == 0) {
        fprintf(stderr, a ? "mmbridge: %s is empty\n" : "mmbridge: %s: out of memory\n", opt);
        free(a);
        return NULL;
    }
    return a;
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
static float *assemble(mmb_ctx *ctx, const gen_opts *o, const mmb_lm *lm, const int32_t *ids, int64_t n_ids,
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
    float *img[MAX_IMAGES] = {0}, *out = NULL;
    int64_t t[MAX_IMAGES] = {0}, total = n_ids - placeholders;
    mmb_model *m = NULL;
    if (o->n_images) {
        if (mmb_model_open(ctx, o->model, &m) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
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
    for (int k = 0; k < MAX_IMAGES; k++) free(img[k]);
    mmb_model_free(m);
    return out;
}

/* --prompt: the text (with one placeholder per image put in front when it has none), through the chat
 * template unless --raw, tokenized as transformers does (apply_chat_template adds no special tokens; a raw
 * prompt gets the post-processor's, e.g. BOS). Returns 0, or 1 after printing the error. */
static int prompt_ids(mmb_ctx *ctx, const gen_opts *o, const mmb_tokenizer *tok, int32_t image_token, int32_t **ids,
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
static int stream_text(mmb_ctx *ctx, const gen_opts *o, const mmb_tokenizer *tok, const int32_t *gen, int64_t n,
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

int cli_generate(int argc, char **argv) {
    gen_opts o = {0};
    int r = parse_gen(argc, argv, &o);
    if (r) return r == 1 ? 0 : r;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = o.threads;
    mmb_ctx *ctx = NULL;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return cli_fail(NULL, "cannot create a context");
    mmb_lm *lm = NULL;
    mmb_kv_cache *kv = NULL;
    mmb_tokenizer *tok = NULL;
    int32_t *gen = NULL;
    char *text = NULL;
    size_t emitted = 0, text_len = 0;
    int64_t *ids64 = NULL, n_ids = 0, n = 0, *chunks = NULL, n_chunks = 0, rows = 0, cap = 0;
    int32_t *ids = NULL;
    float *emb = NULL, *lg = NULL, *all = NULL, *e1 = NULL;
    r = 1;
    if (mmb_lm_open(ctx, o.model, &lm) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    mmb_lm_info li;
    mmb_lm_get_info(lm, &li);
    if (o.chunks && !(chunks = parse_list("--chunks", o.chunks, 1, INT32_MAX, &n_chunks))) { r = 2; goto done; }
    if (o.prompt) {
        if (mmb_tokenizer_open(ctx, o.model, &tok) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        if (prompt_ids(ctx, &o, tok, li.image_token, &ids, &n_ids)) goto done;
        if (!(emb = assemble(ctx, &o, lm, ids, n_ids, &n))) goto done;
        int32_t stop[8];
        int ns = mmb_tokenizer_stop_ids(tok, stop, 8);
        for (int k = 0; k < ns && k < 8 && li.n_eos < 8; k++) {
            int dup = 0;
            for (int e = 0; e < li.n_eos; e++) dup |= li.eos[e] == stop[k];
            if (!dup) li.eos[li.n_eos++] = stop[k];
        }
    } else if (o.ids) {
        if (!(ids64 = parse_list("--ids", o.ids, 0, INT32_MAX, &n_ids))) { r = 2; goto done; }
        if (!(ids = malloc(sizeof *ids * (size_t)n_ids))) goto done;
        for (int64_t i = 0; i < n_ids; i++) ids[i] = (int32_t)ids64[i];
        if (!(emb = assemble(ctx, &o, lm, ids, n_ids, &n))) goto done;
    } else if (!(emb = read_embeds(ctx, o.embeds, li.d_model, &n)))
        goto done;
    if (n > li.max_positions) {
        fprintf(stderr, "mmbridge: error: context overflow: the prompt is %lld tokens, the model's limit is %lld\n",
                (long long)n, (long long)li.max_positions);
        goto done;
    }
    int64_t kvcap = n + o.n_new < li.max_positions ? n + o.n_new : li.max_positions;
    if (mmb_kv_cache_new(ctx, lm, kvcap, &kv) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    if (!(lg = malloc(sizeof(float) * (size_t)(n * li.vocab))) || !(e1 = malloc(sizeof(float) * (size_t)li.d_model))) {
        fprintf(stderr, "mmbridge: error: out of memory\n");
        goto done;
    }
    /* prefill, in the --chunks pieces if given */
    double t0 = now_s();
    for (int64_t off = 0, c = 0; off < n; c++) {
        int64_t m = c < n_chunks && chunks[c] < n - off ? chunks[c] : n - off;
        if (mmb_lm_forward(ctx, lm, kv, emb + off * li.d_model, m, o.logits ? lg + off * li.vocab : lg, !o.logits) !=
            MMB_OK) {
            cli_fail(ctx, NULL);
            goto done;
        }
        off += m;
    }
    double t1 = now_s();
    const float *last = o.logits ? lg + (n - 1) * li.vocab : lg;
    if (o.logits && keep_logits(&all, &rows, &cap, lg, n, li.vocab)) goto done;
    long steps = 0;
    if (o.n_new > 0 && !(gen = malloc(sizeof *gen * (size_t)o.n_new))) goto done;
    for (long g = 0; g < o.n_new; g++) {
        int32_t t;
        if (mmb_sample(ctx, &o.smp, last, li.vocab, &t) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        gen[g] = t;
        int eos = 0, stop = 0;
        for (int k = 0; k < li.n_eos && !o.ignore_eos; k++) eos |= t == li.eos[k];
        if (o.print_ids) printf("%s%d", g ? " " : "", (int)t);
        else stop = stream_text(ctx, &o, tok, gen, g + 1, 0, &emitted, &text, &text_len);
        fflush(stdout);
        if (eos || stop || g + 1 == o.n_new || mmb_kv_cache_len(kv) >= kvcap) {
            if (!o.print_ids) stream_text(ctx, &o, tok, gen, g + 1, 1, &emitted, &text, &text_len);
            break;
        }
        if (mmb_lm_embed(ctx, lm, &t, 1, e1) != MMB_OK || mmb_lm_forward(ctx, lm, kv, e1, 1, lg, 1) != MMB_OK) {
            cli_fail(ctx, NULL);
            goto done;
        }
        steps++;
        last = lg;
        if (o.logits && keep_logits(&all, &rows, &cap, lg, 1, li.vocab)) goto done;
    }
    double t2 = now_s();
    printf("\n");
    fflush(stdout);
    if (o.logits) {
        mmb_tensor t = {.name = "logits", .dtype = MMB_F32, .ndim = 2, .shape = {rows, li.vocab}, .data = all};
        if (mmb_st_write(ctx, o.logits, &t, 1) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    }
    fprintf(stderr, "prefill: %lld tokens in %.3f s (%.1f tokens/s); decode: %ld tokens in %.3f s (%.1f tokens/s); "
            "%d thread(s)\n", (long long)n, t1 - t0, (double)n / (t1 - t0 > 0 ? t1 - t0 : 1e-9), steps, t2 - t1,
            steps ? (double)steps / (t2 - t1 > 0 ? t2 - t1 : 1e-9) : 0.0, mmb_ctx_threads(ctx));
    r = 0;
done:
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
    mmb_ctx_free(ctx);
    return r;
}
