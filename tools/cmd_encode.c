/* mmbridge encode: images (files, directories, lists), preprocessed pixels or a video's frames through
 * the checkpoint's vision path (mmb_mllm_encode: processor, tower, taps, connector in one pass), written as
 * 'embeddings' (and hidden states) to a safetensors file. */
#include "cli.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_INPUTS 65536

/* "0,8,-2" -> taps. */
static int parse_taps(const char *v, cli_enc *o) {
    int64_t n = 0, *t = cli_int_list("--taps", v, -100000, 100000, &n);
    int ok = t && n <= MMB_MAX_TAPS;
    if (t && !ok) fprintf(stderr, "mmbridge encode: --taps: at most %d layers\n", MMB_MAX_TAPS);
    for (int64_t i = 0; ok && i < n; i++) o->taps[o->n_taps++] = (int)t[i];
    free(t);
    return ok ? 0 : 2;
}

/* Writes the tensors to o->output, or with "-" to standard output (through a temporary file, as a
 * safetensors file needs its header's offsets before the data). */
static int write_output(mmb_ctx *ctx, const char *output, const mmb_tensor *t, int n, const char *const *keys,
                        const char *const *vals, int n_meta) {
    if (strcmp(output, "-") != 0)
        return mmb_st_write_meta(ctx, output, t, n, keys, vals, n_meta) != MMB_OK ? cli_fail(ctx, NULL) : 0;
    const char *dir = getenv("TMPDIR");
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s/mmbridge-encode-XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(tmp);
    if (fd < 0) { fprintf(stderr, "mmbridge: error: %s: %s\n", tmp, strerror(errno)); return 1; }
    close(fd);
    int r = mmb_st_write_meta(ctx, tmp, t, n, keys, vals, n_meta) != MMB_OK ? cli_fail(ctx, NULL) : 0;
    FILE *f = r ? NULL : fopen(tmp, "rb");
    if (!r && !f) r = cli_fail(NULL, strerror(errno));
    char buf[1 << 16];
    size_t k;
    while (f && (k = fread(buf, 1, sizeof buf, f)) > 0)
        if (fwrite(buf, 1, k, stdout) != k) { r = 1; break; }
    if (f) fclose(f);
    if (fflush(stdout) != 0) r = 1;
    if (r && f) fprintf(stderr, "mmbridge: error: writing to standard output: %s\n", strerror(errno));
    unlink(tmp);
    return r;
}

static int parse_encode(int argc, char **argv, cli_enc *o, const char **pos) {
    const char *taps = NULL, *layers = NULL;
    int np = 0;
    const cli_opt opts[] = {
        {.name = "-o", .meta = "OUT", .type = CLI_STR, .dst = &o->output,
         .help = "the output safetensors file (required); '-' writes it to standard output\n"
         "(the messages then go to standard error)"},
        {.name = "--batch", .meta = "N", .type = CLI_INT, .dst = &o->batch,
         .help = "images per forward pass (default 8); a progress line per batch", .lo = 1, .hi = 4096},
        {.name = "--vq", .meta = NULL, .type = CLI_FLAG, .dst = &o->vq,
         .help = "fusion D: write the VQ tokenizer's 'codes' [n, rows, cols] I32 instead of\n"
         "embeddings (Chameleon, Emu3, Janus checkpoints or a VQ model's own directory)"},
        {.name = "--latents", .meta = NULL, .type = CLI_FLAG, .dst = &o->latents,
         .help = "with --vq: also 'latents' [n, embed_dim, rows, cols] F32, the quant_conv output"},
        {.name = "--pixels", .meta = "F", .type = CLI_STR, .dst = &o->pixels,
         .help = "read preprocessed 'pixel_values' [n, channels, size, size] from F instead\n"
         "of decoding images"},
        {.name = "--taps", .meta = "LIST", .type = CLI_STR, .dst = &taps,
         .help = "also write these hidden_states.{i} (HF indices: 0 = embeddings,\n"
         "i = block i, negative from the end; written under their non-negative index)"},
        {.name = "--vision-tower", .meta = "DIR", .type = CLI_STR, .dst = &o->tower,
         .help = "the CLIP/SigLIP checkpoint directory of an original-layout LLaVA model"},
        {.name = "--video", .meta = "FRAMES", .type = CLI_STR, .dst = &o->video,
         .help = "a video as image files: a directory (its files in name order, hidden\n"
         "ones skipped) or a text file listing one frame path per line (relative to it).\n"
         "--frames N of them are taken, the midpoint of each of N equal segments (FreeVA /\n"
         "Dense Connector); each goes through tower and connector like an image, then\n"
         "MaxPool1d(2, 2) over each frame's tokens (--no-pool keeps them all), frames\n"
         "concatenated in order: 'embeddings' [1, frames * tokens / 2, d_model]\n"
         "(8 CLIP-L/336 frames: 2304 tokens)"},
        {.name = "--frames", .meta = "N", .type = CLI_INT, .dst = &o->frames,
         .help = "--video: frames to take (default 8)", .lo = 1, .hi = 256},
        {.name = "--no-pool", .meta = NULL, .type = CLI_FLAG, .dst = &o->no_pool,
         .help = "--video: keep every frame's tokens"},
        {.name = "--manifest", .meta = "FILE", .type = CLI_STR, .dst = &o->manifest,
         .help = "sharded extraction: the inputs are FILE's (a list of paths, one a line; JSON lines\n"
         "with \"path\" or \"url\"; a webdataset .tar, or a list naming .tar shards), -o a directory\n"
         "of shards of --shard-size images, each with a JSON sidecar, and index.json"},
        {.name = "--shard-size", .meta = "N", .type = CLI_INT, .dst = &o->shard_size,
         .help = "--manifest: images per shard (default 1000)", .lo = 1, .hi = 1 << 24},
        {.name = "--shard", .meta = "K/N", .type = CLI_STR, .dst = &o->shard,
         .help = "--manifest: only the shards whose index % N == K"},
        {.name = "--resume", .meta = NULL, .type = CLI_FLAG, .dst = &o->resume,
         .help = "--manifest: skip finished shards (file and sidecar in place), redo the rest"},
        {.name = "--skip-bad", .meta = NULL, .type = CLI_FLAG, .dst = &o->skip_bad,
         .help = "--manifest: record undecodable images (the sidecars, OUT/errors.jsonl) instead of\n"
         "stopping; a garbled tar is cut at its bad header"},
        {.name = "--no-partial", .meta = NULL, .type = CLI_FLAG, .dst = &o->no_partial,
         .help = "--manifest: do not keep each finished batch of an unfinished shard in\n"
         "OUT/.partial/ (--resume then redoes a shard from its first image; half the writes)"},
        {.name = "--format", .meta = "F", .type = CLI_CHOICE, .dst = &o->format, .choices = "safetensors|clip-retrieval",
         .help = "--manifest: shard-K.safetensors, or clip-retrieval's img_emb/img_emb_K.npy +\n"
         "metadata/metadata_K.jsonl"},
        {.name = "--pool", .meta = "P", .type = CLI_STR, .dst = &o->pool,
         .help = "--manifest: what is stored per image: none (all tokens), mean, cls (the first\n"
         "token); default none for safetensors, mean for clip-retrieval"},
        {.name = "--layers", .meta = "LIST", .type = CLI_STR, .dst = &layers,
         .help = "--taps by another name (hidden states stored beside the embeddings, pooled alike)"},
        {.name = "--mpi", .meta = NULL, .type = CLI_FLAG, .dst = &o->mpi,
         .help = "--manifest under mpirun: rank 0 hands out shards as ranks ask (a work queue),\n"
         "every rank encodes, rank 0 prints the progress and writes index.json"},
        CLI_OPTS_CTX(&o->co),
        CLI_OPTS_DENSE(&o->dense),
    };
    const cli_spec spec = {"encode", "MODEL (INPUT... | --pixels F | --video FRAMES | --manifest FILE) -o OUT",
        "Runs the checkpoint's vision path (the library's mmb_mllm_encode): image -> processor -> vision\n"
        "tower -> feature selection -> connector (a family model: its own tower and connector), and writes\n"
        "'embeddings' [n_images, tokens, d_model] f32, with --taps' hidden states from the same tower\n"
        "pass, and each input's file name in the file's __metadata__ ('input.0', ...; 'n_inputs').\n"
        "\n"
        "  MODEL   a LLaVA checkpoint with its vision tower (transformers layout), an original-layout\n"
        "          LLaVA checkpoint with --vision-tower, a family model (BLIP-2, IDEFICS, Qwen2-VL, ...),\n"
        "          or a CLIP/SigLIP vision checkpoint alone (then its 'last_hidden_state' is written)\n"
        "  INPUT   an image file (JPEG, PNG, WebP), a directory (its files in name order, hidden ones\n"
        "          skipped) or a list file (.txt or .lst: one path per line, relative to the list)\n"
        "\n"
        "--pixels skips the processor: the model's encode runs on the given pixels, and --taps (or a tower\n"
        "alone's last_hidden_state) come from a forward of its tower. Mllama's pixels are an image's tiles\n"
        "one after another (row-major over its canvas), stored as [n, 3, rows * tile, cols * tile].\n"
        "\n"
        "Each image prints its original and processed sizes, e.g.\n"
        "  image 0: cat.jpg 640x480 -> 336x336 -> clip 577 tokens x 1024 -> mlp2x_gelu -> 576 x 4096\n",
        opts, CLI_N(opts), pos, 1, 1 + MAX_INPUTS, &np};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r;
    o->model = pos[0];
    o->inputs = pos + 1;
    o->n_inputs = np - 1;
    if (taps && layers) {
        fprintf(stderr, "mmbridge encode: --taps and --layers are one option: give one\n");
        return 2;
    }
    if ((taps || layers) && parse_taps(taps ? taps : layers, o)) return 2;
    if (!o->output || (!!o->pixels + !!o->n_inputs + !!o->video + !!o->manifest) != 1) {
        fprintf(stderr, "mmbridge encode: needs -o and one of: images, --pixels, --video, --manifest\n");
        return 2;
    }
    if (!o->manifest && (o->shard_size || o->shard || o->resume || o->skip_bad || o->format || o->pool || o->mpi || o->no_partial)) {
        fprintf(stderr, "mmbridge encode: --shard-size, --shard, --resume, --skip-bad, --no-partial, --format, --pool and --mpi "
                "go with --manifest\n");
        return 2;
    }
    if (o->manifest && (o->vq || strcmp(o->output, "-") == 0)) {
        fprintf(stderr, "mmbridge encode: --manifest writes a directory (-o DIR), of embeddings (no --vq)\n");
        return 2;
    }
    o->shard_n = 1;
    if (o->shard) {
        long long k = -1, nn = 0;
        char tail = 0;
        if (sscanf(o->shard, "%lld/%lld%c", &k, &nn, &tail) != 2 || nn < 1 || k < 0 || k >= nn || nn > (1 << 24)) {
            fprintf(stderr, "mmbridge encode: --shard: expected K/N with 0 <= K < N, got '%s'\n", o->shard);
            return 2;
        }
        o->shard_k = k;
        o->shard_n = nn;
    }
    if (o->pool && strcmp(o->pool, "none") && strcmp(o->pool, "mean") && strcmp(o->pool, "cls")) {
        fprintf(stderr, "mmbridge encode: --pool: one of none, mean, cls; got '%s'\n", o->pool);
        return 2;
    }
    if (!o->shard_size) o->shard_size = 1000;
    if (o->latents && !o->vq) {
        fprintf(stderr, "mmbridge encode: --latents goes with --vq\n");
        return 2;
    }
    if (o->vq && (o->video || o->n_taps)) {
        fprintf(stderr, "mmbridge encode: --vq takes images or --pixels, no --video or --taps\n");
        return 2;
    }
    if ((o->frames || o->no_pool) && !o->video) {
        fprintf(stderr, "mmbridge encode: --frames and --no-pool go with --video\n");
        return 2;
    }
    if (!o->batch) o->batch = 8;
    return 0;
}

/* Reads pixel_values [n, C, H, W] (any float dtype) as f32 into *px; `size` > 0 requires H = W = size (a
 * tower's fixed input). Returns 0 or 1 (printed). */
int cli_read_pixels(mmb_ctx *ctx, const char *path, int channels, int size, float **px, int64_t *n, int *h, int *w) {
    mmb_st_file *f = NULL;
    if (mmb_st_open(ctx, path, &f) != MMB_OK) return cli_fail(ctx, NULL);
    const mmb_tensor *t = mmb_st_find(f, "pixel_values");
    int r = 1;
    if (!t)
        fprintf(stderr, "mmbridge: error: %s: tensor 'pixel_values' is missing\n", path);
    else if (t->ndim != 4 || t->shape[1] != channels || t->shape[0] < 1 || t->shape[2] < 1 || t->shape[3] < 1 ||
             t->shape[2] > (1 << 20) || t->shape[3] > (1 << 20) ||
             (size > 0 && (t->shape[2] != size || t->shape[3] != size)) ||
             (t->dtype != MMB_F32 && t->dtype != MMB_F16 && t->dtype != MMB_BF16)) {
        if (size > 0)
            fprintf(stderr, "mmbridge: error: %s: tensor 'pixel_values': expected [n, %d, %d, %d] F32/F16/BF16\n",
                    path, channels, size, size);
        else
            fprintf(stderr, "mmbridge: error: %s: tensor 'pixel_values': expected [n, %d, height, width] "
                    "F32/F16/BF16\n", path, channels);
    } else if (!(*px = malloc(sizeof(float) * (size_t)mmb_tensor_numel(t))))
        fprintf(stderr, "mmbridge: error: out of memory\n");
    else {
        mmb_to_f32(*px, t->data, t->dtype, (size_t)mmb_tensor_numel(t));
        *n = t->shape[0];
        *h = (int)t->shape[2];
        *w = (int)t->shape[3];
        r = 0;
    }
    mmb_st_close(f);
    return r;
}

/* --video: the sampled frames become the images. Returns 0, or 1 after printing the error. */
static int pick_frames(mmb_ctx *ctx, const cli_enc *o, FILE *msg, char ***paths, int64_t *n) {
    char **all = NULL;
    int n_all = 0;
    const char *in[1] = {o->video};
    if (cli_expand_inputs(in, 1, 1, &all, &n_all)) return 1;
    int f = o->frames ? (int)o->frames : 8;
    int64_t idx[256];
    if (mmb_video_sample(ctx, n_all, f, idx) != MMB_OK) { cli_free_list(all, n_all); return cli_fail(ctx, NULL); }
    *paths = calloc((size_t)f, sizeof **paths);
    for (int i = 0; *paths && i < f; i++)
        if (!((*paths)[i] = strdup(all[idx[i]]))) { cli_free_list(*paths, i); *paths = NULL; }
    cli_free_list(all, n_all);
    if (!*paths) return cli_fail(NULL, "out of memory");
    *n = f;
    fprintf(msg, "video: %s, %d frame(s), taking %d:", o->video, n_all, f);
    for (int i = 0; i < f; i++) fprintf(msg, " %lld", (long long)idx[i]);
    fprintf(msg, "\n");
    return 0;
}

/* What one encode fills: embeddings [n, t, width] and each tap's [n, vision_tokens, vision_width]. */
typedef struct outputs {
    int64_t n, t;
    int width;
    size_t per_h;
    float *emb, *hidden[MMB_MAX_TAPS];
} outputs;

static int alloc_outputs(outputs *o, int n_taps) {
    if (!(o->emb = malloc(sizeof(float) * (size_t)(o->n * o->t) * (size_t)o->width + 1)))
        return cli_fail(NULL, "out of memory");
    for (int i = 0; i < n_taps; i++)
        if (!(o->hidden[i] = malloc(sizeof(float) * o->per_h * (size_t)o->n + 1)))
            return cli_fail(NULL, "out of memory");
    return 0;
}

/* Where inputs [i0, i0 + nb) go in *out (allocated at the first batch, once out->t is known): *eo. */
static int batch_out(outputs *out, const cli_enc *e, int64_t i0, int64_t nb, mmb_encode_out *eo) {
    if (!out->emb && alloc_outputs(out, e->n_taps)) return 1;
    *eo = (mmb_encode_out){.embeddings = out->emb + (size_t)(i0 * out->t) * (size_t)out->width,
                           .embeddings_count = (size_t)(nb * out->t) * (size_t)out->width, .n_taps = e->n_taps,
                           .hidden_count = out->per_h * (size_t)nb};
    for (int i = 0; i < e->n_taps; i++) {
        eo->taps[i] = e->taps[i];
        eo->hidden[i] = out->hidden[i] + out->per_h * (size_t)i0;
    }
    return 0;
}

/* Images [i0, i0 + nb) of paths: decoded (their sizes kept in orig), then mmb_mllm_encode. */
static int encode_images(mmb_ctx *ctx, mmb_mllm *m, const cli_enc *e, char **paths, int64_t i0, int64_t nb, int *orig,
                         outputs *out) {
    mmb_image *imgs = calloc((size_t)nb, sizeof *imgs);
    int64_t *tok = calloc((size_t)nb, sizeof *tok);
    int r = 1;
    if (!imgs || !tok) { cli_fail(NULL, "out of memory"); goto done; }
    for (int64_t i = 0; i < nb; i++) {
        if (mmb_image_load(ctx, paths[i0 + i], 0, &imgs[i]) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        orig[4 * (i0 + i)] = imgs[i].width;
        orig[4 * (i0 + i) + 1] = imgs[i].height;
        mmb_preprocess_output_size(ctx, mmb_mllm_processor(m), imgs[i].height, imgs[i].width,
                                   &orig[4 * (i0 + i) + 3], &orig[4 * (i0 + i) + 2]);
    }
    if (mmb_mllm_encode_size(ctx, m, imgs, (int)nb, tok) < 0) { cli_fail(ctx, NULL); goto done; }
    for (int64_t i = 0; i < nb; i++) {
        if (!out->t) out->t = tok[i];
        if (tok[i] != out->t) {
            fprintf(stderr, "mmbridge: error: %s makes %lld embeddings, %s %lld: one output tensor needs one count "
                    "(encode them separately)\n", paths[i0 + i], (long long)tok[i], paths[0], (long long)out->t);
            goto done;
        }
    }
    mmb_encode_out eo;
    if (batch_out(out, e, i0, nb, &eo)) goto done;
    r = mmb_mllm_encode(ctx, m, imgs, (int)nb, &eo) != MMB_OK ? cli_fail(ctx, NULL) : 0;
done:
    for (int64_t i = 0; imgs && i < nb; i++) mmb_image_free(&imgs[i]);
    free(imgs);
    free(tok);
    return r;
}

/* --pixels [i0, i0 + nb): mmb_mllm_encode_pixels, the taps from the same tower pass. */
static int encode_pixels(mmb_ctx *ctx, mmb_mllm *m, const cli_enc *e, const float *px, int h, int w, int64_t i0,
                         int64_t nb, outputs *out) {
    mmb_encode_out eo;
    const float *p = px + (size_t)3 * (size_t)h * (size_t)w * (size_t)i0;
    if (!out->t && (out->t = mmb_mllm_pixel_tokens(ctx, m, h, w)) <= 0) return cli_fail(ctx, NULL);
    if (batch_out(out, e, i0, nb, &eo)) return 1;
    return mmb_mllm_encode_pixels(ctx, m, p, (int)nb, h, w, &eo) != MMB_OK ? cli_fail(ctx, NULL) : 0;
}

int cli_encode_run(mmb_ctx *ctx, const cli_enc *e) {
    if (e->manifest) return cli_extract_run(ctx, e);
    if (e->vq) return cli_vq_encode(ctx, e);
    FILE *msg = strcmp(e->output, "-") ? stdout : stderr;
    mmb_mllm *m = NULL;
    char **paths = NULL, names[MMB_MAX_TAPS][32], **keys = NULL;
    const char **vals = NULL;
    int *orig = NULL, n_paths = 0, h = 0, w = 0, r = 1, n_meta = 0;
    float *px = NULL;
    outputs out = {0};
    int64_t n = 0;
    if (cli_open(ctx, e->model, e->tower, &e->dense, 1, NULL, &m)) goto done;
    mmb_mllm_info in;
    mmb_mllm_get_info(m, &in);
    const mmb_model *model = mmb_mllm_model(m);
    mmb_model_info mi = {0};
    mmb_vit_info vi = {0};
    if (model) mmb_model_get_info(model, &mi);
    if (mmb_mllm_vit(m)) mmb_vit_get_info(mmb_mllm_vit(m), &vi);
    const char *vit_family = vi.family ? vi.family : in.family;
    if (!in.has_vision) {
        fprintf(stderr, "mmbridge: error: %s: %s\n", e->model, model ? "the checkpoint has no vision tower (an "
                "original-layout LLaVA config only names it); pass --vision-tower DIR" : "a language model alone has "
                "no vision path");
        goto done;
    }
    if (e->n_taps && !mmb_mllm_vit(m)) {
        fprintf(stderr, "mmbridge: error: --taps: a %s model runs its tower and connector as one; its hidden states "
                "are not exposed\n", in.family);
        r = 2;
        goto done;
    }
    if (e->video && (!strcmp(in.family, "llava_next") || !strcmp(in.family, "llava_onevision"))) {
        /* --video is the Dense Connector's (frames as images, max-pooled over time); theirs differs */
        fprintf(stderr, "mmbridge: error: %s: --video on a %s model is not implemented (its video path pools each "
                "frame 2x2 with one image_newline, not AnyRes tiles per frame)\n", e->model, in.family);
        goto done;
    }
    if (e->video && !model) {
        fprintf(stderr, "mmbridge: error: %s: --video needs a model with a connector\n", e->model);
        goto done;
    }
    if (e->pixels) {
        if (cli_read_pixels(ctx, e->pixels, vi.channels ? vi.channels : 3, vi.image_size, &px, &n, &h, &w)) goto done;
    } else {
        if (e->video ? pick_frames(ctx, e, msg, &paths, &n)
                     : cli_expand_inputs(e->inputs, e->n_inputs, 0, &paths, &n_paths))
            goto done;
        if (!e->video) n = n_paths;
        if (!(orig = calloc((size_t)n * 4, sizeof *orig))) { cli_fail(NULL, "out of memory"); goto done; }
    }
    out.n = n;
    out.width = in.out_width;
    out.per_h = (size_t)in.vision_tokens * (size_t)in.vision_width;
    int64_t bmax = e->batch < n ? e->batch : n, n_batches = (n + bmax - 1) / bmax;
    double t_all = 0;
    for (int64_t b = 0, i0 = 0; i0 < n; b++, i0 += bmax) {
        int64_t nb = n - i0 < bmax ? n - i0 : bmax;
        double t0 = cli_now();
        if ((r = px ? encode_pixels(ctx, m, e, px, h, w, i0, nb, &out)
                    : encode_images(ctx, m, e, paths, i0, nb, orig, &out)))
            goto done;
        r = 1;
        double t1 = cli_now();
        t_all += t1 - t0;
        fprintf(msg, "batch %lld/%lld: inputs %lld..%lld, %.1f ms\n", (long long)b + 1, (long long)n_batches,
                (long long)i0, (long long)(i0 + nb - 1), (t1 - t0) * 1e3);
    }
    /* the tensors: embeddings (a tower alone: its last_hidden_state), --video pooled over time, the taps */
    mmb_tensor outs[MMB_MAX_TAPS + 1];
    int n_out = 0;
    outs[n_out++] = (mmb_tensor){.name = model ? "embeddings" : "last_hidden_state", .dtype = MMB_F32, .ndim = 3,
                                 .shape = {n, out.t, out.width}, .data = out.emb};
    if (e->video) {
        outs[0].shape[0] = 1;
        outs[0].shape[1] = n * out.t;
        if (!e->no_pool) {
            if (mmb_temporal_pool(ctx, out.emb, n, out.t, out.width, out.emb) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
            outs[0].shape[1] = mmb_temporal_pool_tokens(n, out.t);
        }
    }
    for (int i = 0; i < e->n_taps; i++) {
        int idx = e->taps[i] == MMB_TAP_LAST ? -1 : e->taps[i] < 0 ? e->taps[i] + in.vision_layers + 1 : e->taps[i];
        snprintf(names[i], sizeof names[i], idx < 0 ? "last_hidden_state" : "hidden_states.%d", idx);
        int dup = 0;
        for (int k = 0; k < n_out; k++) dup |= strcmp(outs[k].name, names[i]) == 0;
        if (!dup)
            outs[n_out++] = (mmb_tensor){.name = names[i], .dtype = MMB_F32, .ndim = 3,
                                         .shape = {n, in.vision_tokens, in.vision_width}, .data = out.hidden[i]};
    }
    /* __metadata__: input.{i} = each input's file name (pixels = the --pixels file), n_inputs */
    n_meta = e->pixels ? 2 : (int)n + 1;
    char count[24];
    snprintf(count, sizeof count, "%lld", (long long)n);
    if (!(keys = calloc((size_t)n_meta, sizeof *keys)) || !(vals = calloc((size_t)n_meta, sizeof *vals))) {
        cli_fail(NULL, "out of memory");
        goto done;
    }
    for (int i = 0; i < n_meta; i++) {
        if (!(keys[i] = malloc(32))) { cli_fail(NULL, "out of memory"); goto done; }
        snprintf(keys[i], 32, i + 1 == n_meta ? "n_inputs" : e->pixels ? "pixels" : "input.%d", i);
        vals[i] = i + 1 == n_meta ? count : e->pixels ? e->pixels : paths[i];
    }
    if (write_output(ctx, e->output, outs, n_out, (const char *const *)keys, vals, n_meta)) goto done;
    for (int64_t i = 0; i < n; i++) {
        fprintf(msg, "image %lld: %s ", (long long)i, e->pixels ? e->pixels : paths[i]);
        if (orig) fprintf(msg, "%dx%d -> %dx%d -> ", orig[4 * i], orig[4 * i + 1], orig[4 * i + 2], orig[4 * i + 3]);
        else fprintf(msg, "%dx%d -> ", w, h);
        if (in.vision_tokens)
            fprintf(msg, "%s %lld tokens x %d -> ", vit_family, (long long)in.vision_tokens, in.vision_width);
        else fprintf(msg, "%s ", in.family);
        fprintf(msg, "%s -> %lld x %d\n", model ? mi.connector : "last_hidden_state", (long long)out.t, out.width);
    }
    fprintf(msg, "encode %.1f ms, %d thread(s), %d tensor(s) -> %s\n", t_all * 1e3, mmb_ctx_threads(ctx), n_out,
            strcmp(e->output, "-") ? e->output : "standard output");
    if (msg == stdout) cli_print_routing(model);
    r = 0;
done:
    cli_free_list(keys, n_meta);
    free(vals);
    cli_free_list(paths, (int)n);
    free(orig);
    free(px);
    free(out.emb);
    for (int i = 0; i < MMB_MAX_TAPS; i++) free(out.hidden[i]);
    mmb_mllm_free(m);
    return r;
}

int cmd_encode(int argc, char **argv) {
    static const char *pos[1 + MAX_INPUTS];  /* MODEL and the inputs */
    cli_enc o = {0};
    int r = parse_encode(argc, argv, &o, pos);
    if (r) return r == 1 ? 0 : r;
    mmb_ctx *ctx = cli_ctx(&o.co);
    if (!ctx) return 1;
    r = cli_encode_run(ctx, &o);
    mmb_ctx_free(ctx);
    return r;
}
