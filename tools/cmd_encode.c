/* mmbridge encode: images (files, directories, lists), preprocessed pixels or a video's frames through
 * the checkpoint's vision path, written as 'embeddings' (and hidden states) to a safetensors file. */
#include "cli.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_INPUTS 65536

/* The images to encode, decoded and preprocessed a batch at a time, or --pixels' tensor. */
typedef struct source {
    char **paths;             /* the image files, n of them (NULL with --pixels) */
    int64_t n;
    mmb_preprocess pp;
    int fixed;                /* the tower's side every image must come out at, 0: any (the first one's) */
    int h, w;                 /* the processed size */
    int *orig;                /* each image's decoded width and height (2 per image) */
    float *pixels;            /* --pixels: all of them */
} source;

/* "0,8,-2" -> taps. */
static int parse_taps(const char *v, cli_enc *o) {
    int64_t n = 0, *t = cli_int_list("--taps", v, -100000, 100000, &n);
    int ok = t && n <= MMB_MAX_TAPS;
    if (t && !ok) fprintf(stderr, "mmbridge encode: --taps: at most %d layers\n", MMB_MAX_TAPS);
    for (int64_t i = 0; ok && i < n; i++) o->taps[o->n_taps++] = (int)t[i];
    free(t);
    return ok ? 0 : 2;
}

/* Reads pixel_values [n, C, H, W] (any float dtype) as f32; `size` > 0 requires H = W = size. */
static int read_pixels(mmb_ctx *ctx, const char *path, int channels, int size, source *s) {
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
    } else if (!(s->pixels = malloc(sizeof(float) * (size_t)mmb_tensor_numel(t))))
        fprintf(stderr, "mmbridge: error: out of memory\n");
    else {
        mmb_to_f32(s->pixels, t->data, t->dtype, (size_t)mmb_tensor_numel(t));
        s->n = t->shape[0];
        s->h = (int)t->shape[2];
        s->w = (int)t->shape[3];
        r = 0;
    }
    mmb_st_close(f);
    return r;
}

/* The image processor: MODEL's preprocessor_config.json, else the --vision-tower directory's; LLaVA's
 * "pad" aspect mode turns on padding to a square. */
static int load_processor(mmb_ctx *ctx, const cli_enc *o, int pad, mmb_preprocess *p) {
    char path[4096];
    snprintf(path, sizeof path, "%s/preprocessor_config.json", o->model);
    const char *dir = access(path, F_OK) == 0 || !o->tower ? o->model : o->tower;
    if (mmb_preprocess_load(ctx, dir, p) != MMB_OK) return cli_fail(ctx, NULL);
    if (pad) p->do_pad = 1;
    return 0;
}

/* Decodes and preprocesses images [i0, i0 + nb) into px; every one must come out at the source's size
 * (the first image sets it when the tower takes any). Returns 0 or 1 (printed). */
static int read_batch(mmb_ctx *ctx, source *s, int64_t i0, int64_t nb, float *px) {
    size_t per = (size_t)3 * (size_t)s->h * (size_t)s->w;
    if (s->pixels) {
        memcpy(px, s->pixels + per * (size_t)i0, per * (size_t)nb * sizeof(float));
        return 0;
    }
    for (int64_t i = i0; i < i0 + nb; i++) {
        mmb_image img = {0};
        int ih = 0, iw = 0;
        if (mmb_image_load(ctx, s->paths[i], 0, &img) != MMB_OK ||
            mmb_preprocess_output_size(ctx, &s->pp, img.height, img.width, &ih, &iw) != MMB_OK) {
            mmb_image_free(&img);
            return cli_fail(ctx, NULL);
        }
        s->orig[2 * i] = img.width;
        s->orig[2 * i + 1] = img.height;
        if (ih != s->h || iw != s->w) {
            fprintf(stderr, "mmbridge: error: %s: the image processor makes %dx%d pixels but the %s takes %dx%d\n",
                    s->paths[i], iw, ih, s->fixed ? "vision tower" : "batch (the first image's size)", s->w, s->h);
            mmb_image_free(&img);
            return 1;
        }
        mmb_status st = mmb_preprocess_run(ctx, &s->pp, &img, px + per * (size_t)(i - i0), per);
        mmb_image_free(&img);
        if (st != MMB_OK) return cli_fail(ctx, NULL);
    }
    return 0;
}

/* The processed size of the first image (or the tower's fixed side). */
static int first_size(mmb_ctx *ctx, source *s) {
    if (s->pixels) return 0;
    if (s->fixed) { s->h = s->w = s->fixed; return 0; }
    mmb_image img = {0};
    mmb_status st = mmb_image_load(ctx, s->paths[0], 0, &img);
    if (st == MMB_OK) st = mmb_preprocess_output_size(ctx, &s->pp, img.height, img.width, &s->h, &s->w);
    mmb_image_free(&img);
    return st != MMB_OK ? cli_fail(ctx, NULL) : 0;
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
    const char *taps = NULL;
    int np = 0;
    const cli_opt opts[] = {
        {.name = "-o", .meta = "OUT", .type = CLI_STR, .dst = &o->output,
         .help = "the output safetensors file (required); '-' writes it to standard output\n"
         "(the messages then go to standard error)"},
        {.name = "--batch", .meta = "N", .type = CLI_INT, .dst = &o->batch,
         .help = "images per forward pass (default 8); a progress line per batch", .lo = 1, .hi = 4096},
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
        CLI_OPTS_CTX(&o->co),
        CLI_OPTS_DENSE(&o->dense),
    };
    const cli_spec spec = {"encode", "MODEL (INPUT... | --pixels F | --video FRAMES) -o OUT",
        "Runs the checkpoint's vision path: image -> processor -> vision tower -> feature selection ->\n"
        "connector (a family model: its own tower and connector), and writes 'embeddings'\n"
        "[n_images, tokens, d_model] f32, with each input's file name in the file's __metadata__\n"
        "('input.0', 'input.1', ...; 'n_inputs').\n"
        "\n"
        "  MODEL   a LLaVA checkpoint with its vision tower (transformers layout), an original-layout\n"
        "          LLaVA checkpoint with --vision-tower, a family model (BLIP-2, IDEFICS, Qwen2-VL, ...),\n"
        "          or a CLIP/SigLIP vision checkpoint alone (then its 'last_hidden_state' is written)\n"
        "  INPUT   an image file (JPEG, PNG, WebP), a directory (its files in name order, hidden ones\n"
        "          skipped) or a list file (.txt or .lst: one path per line, relative to the list)\n"
        "\n"
        "Each image prints its original and processed sizes, e.g.\n"
        "  image 0: cat.jpg 640x480 -> 336x336 -> clip 577 tokens x 1024 -> mlp2x_gelu -> 576 x 4096\n",
        opts, CLI_N(opts), pos, 1, 1 + MAX_INPUTS, &np};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r;
    o->model = pos[0];
    o->inputs = pos + 1;
    o->n_inputs = np - 1;
    if (taps && parse_taps(taps, o)) return 2;
    if (!o->output || (!!o->pixels + !!o->n_inputs + !!o->video) != 1) {
        fprintf(stderr, "mmbridge encode: needs -o and one of: images, --pixels, --video\n");
        return 2;
    }
    if ((o->frames || o->no_pool) && !o->video) {
        fprintf(stderr, "mmbridge encode: --frames and --no-pool go with --video\n");
        return 2;
    }
    if (!o->batch) o->batch = 8;
    return 0;
}

int cli_encode_run(mmb_ctx *ctx, const cli_enc *e) {
    const cli_enc o = *e;
    FILE *msg = strcmp(o.output, "-") ? stdout : stderr;
    cli_model cm = {0};
    int r;
    source src = {0};
    float *px = NULL, *emb = NULL, *bufs[MMB_MAX_TAPS + 1] = {0};
    char names[MMB_MAX_TAPS + 1][32], **meta_keys = NULL;
    mmb_tensor outs[MMB_MAX_TAPS + 2];
    int n_out = 0, n_paths = 0;
    r = 1;
    if (cli_open(ctx, o.model, o.tower, &o.dense, &cm)) goto done;
    mmb_model_info mi = {0};
    if (cm.model) mmb_model_get_info(cm.model, &mi);
    int family = cm.model && strcmp(mi.family, "llava") != 0;
    if (!family && !cm.vit) {
        fprintf(stderr, "mmbridge: error: %s: the checkpoint has no vision tower; pass --vision-tower DIR\n", o.model);
        goto done;
    }
    if (o.video && !cm.model) {
        fprintf(stderr, "mmbridge: error: %s: --video needs a model with a connector\n", o.model);
        goto done;
    }
    if (family && o.n_taps) {
        fprintf(stderr, "mmbridge: error: --taps: a %s model's hidden states are not exposed\n", mi.family);
        r = 2;
        goto done;
    }
    mmb_vit_info vi = {0};
    if (cm.vit) mmb_vit_get_info(cm.vit, &vi);
    src.fixed = family ? 0 : vi.image_size;
    if (o.pixels) {
        if (read_pixels(ctx, o.pixels, family ? 3 : vi.channels, src.fixed, &src)) goto done;
    } else {
        if (o.video ? pick_frames(ctx, &o, msg, &src.paths, &src.n)
                    : cli_expand_inputs(o.inputs, o.n_inputs, 0, &src.paths, &n_paths))
            goto done;
        if (!o.video) src.n = n_paths;
        if (!(src.orig = calloc((size_t)src.n * 2, sizeof *src.orig))) { cli_fail(NULL, "out of memory"); goto done; }
        if (load_processor(ctx, &o, mi.pad_to_square, &src.pp) || first_size(ctx, &src)) goto done;
    }
    int64_t n = src.n, bmax = o.batch < n ? o.batch : n;
    /* the sizes: embeddings per image, and the hidden states --taps asks for (a tower alone: its last) */
    int64_t t_out = 0;
    if (cm.model && (t_out = mmb_model_encode_tokens(ctx, cm.model, src.h, src.w)) < 0) { cli_fail(ctx, NULL); goto done; }
    int taps[MMB_MAX_TAPS + 1], nt = 0;
    for (int i = 0; i < o.n_taps && nt < MMB_MAX_TAPS; i++) taps[nt++] = o.taps[i];
    if (!cm.model) taps[nt++] = MMB_TAP_LAST;
    size_t per_px = (size_t)3 * (size_t)src.h * (size_t)src.w, per_e = (size_t)t_out * (size_t)mi.out_width;
    size_t per_h = (size_t)vi.tokens * (size_t)vi.width;
    if (!(px = malloc(per_px * (size_t)bmax * sizeof(float))) || (cm.model && !(emb = malloc(per_e * (size_t)n * sizeof(float) + 1)))) {
        cli_fail(NULL, "out of memory");
        goto done;
    }
    for (int i = 0; i < nt; i++)
        if (!(bufs[i] = malloc(per_h * (size_t)n * sizeof(float)))) { cli_fail(NULL, "out of memory"); goto done; }
    double t_enc = 0, t_hid = 0;
    int64_t n_batches = (n + bmax - 1) / bmax;
    for (int64_t b = 0, i0 = 0; i0 < n; b++, i0 += bmax) {
        int64_t nb = n - i0 < bmax ? n - i0 : bmax;
        if (read_batch(ctx, &src, i0, nb, px)) goto done;
        double t0 = cli_now();
        if (cm.model && mmb_model_encode(ctx, cm.model, px, nb, src.h, src.w, emb + per_e * (size_t)i0, per_e * (size_t)nb)
                            != MMB_OK) {
            cli_fail(ctx, NULL);
            goto done;
        }
        double t1 = cli_now();
        float *hb[MMB_MAX_TAPS + 1];
        for (int i = 0; i < nt; i++) hb[i] = bufs[i] + per_h * (size_t)i0;
        if (nt && mmb_vit_forward(ctx, cm.vit, px, nb, taps, nt, hb) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        double t2 = cli_now();
        t_enc += t1 - t0;
        t_hid += t2 - t1;
        fprintf(msg, "batch %lld/%lld: inputs %lld..%lld, %.1f ms\n", (long long)b + 1, (long long)n_batches,
                (long long)i0, (long long)(i0 + nb - 1), (t2 - t0) * 1e3);
    }
    if (cm.model) {
        outs[n_out++] = (mmb_tensor){.name = "embeddings", .dtype = MMB_F32, .ndim = 3,
                                     .shape = {n, t_out, mi.out_width}, .data = emb};
        if (o.video) {
            outs[0].shape[0] = 1;
            outs[0].shape[1] = n * t_out;
            if (!o.no_pool) {
                if (mmb_temporal_pool(ctx, emb, n, t_out, mi.out_width, emb) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
                outs[0].shape[1] = mmb_temporal_pool_tokens(n, t_out);
            }
        }
    }
    for (int i = 0; i < nt; i++) {
        int idx = taps[i] == MMB_TAP_LAST ? -1 : taps[i] < 0 ? taps[i] + vi.layers + 1 : taps[i];
        if (idx < 0) snprintf(names[i], sizeof names[i], "last_hidden_state");
        else snprintf(names[i], sizeof names[i], "hidden_states.%d", idx);
        int dup = 0;
        for (int k = 0; k < n_out; k++) dup |= strcmp(outs[k].name, names[i]) == 0;
        if (!dup)
            outs[n_out++] = (mmb_tensor){.name = names[i], .dtype = MMB_F32, .ndim = 3,
                                         .shape = {n, vi.tokens, vi.width}, .data = bufs[i]};
    }
    /* __metadata__: input.{i} = each input's file name, n_inputs */
    int64_t n_meta = o.pixels ? 2 : n + 1;
    const char **vals = NULL;
    if (!(meta_keys = calloc((size_t)n_meta, sizeof *meta_keys)) || !(vals = calloc((size_t)n_meta, sizeof *vals))) {
        free(vals);
        cli_fail(NULL, "out of memory");
        goto done;
    }
    char count[24];
    snprintf(count, sizeof count, "%lld", (long long)n);
    for (int64_t i = 0; i + 1 < n_meta; i++) {
        if (!(meta_keys[i] = malloc(32))) { free(vals); cli_fail(NULL, "out of memory"); goto done; }
        snprintf(meta_keys[i], 32, o.pixels ? "pixels" : "input.%lld", (long long)i);
        vals[i] = o.pixels ? o.pixels : src.paths[i];
    }
    if (!(meta_keys[n_meta - 1] = strdup("n_inputs"))) { free(vals); cli_fail(NULL, "out of memory"); goto done; }
    vals[n_meta - 1] = count;
    r = write_output(ctx, o.output, outs, n_out, (const char *const *)meta_keys, vals, (int)n_meta);
    free(vals);
    if (r) goto done;
    for (int64_t i = 0; i < n; i++) {
        fprintf(msg, "image %lld: %s ", (long long)i, o.pixels ? o.pixels : src.paths[i]);
        if (!o.pixels) fprintf(msg, "%dx%d -> ", src.orig[2 * i], src.orig[2 * i + 1]);
        fprintf(msg, "%dx%d -> ", src.w, src.h);
        if (family) fprintf(msg, "%s (%s) -> %lld x %d\n", mi.family, mi.connector, (long long)t_out, mi.out_width);
        else if (cm.model)
            fprintf(msg, "%s %lld tokens x %d -> %s -> %lld x %d\n", vi.family, (long long)vi.tokens, vi.width,
                    mi.connector, (long long)t_out, mi.out_width);
        else fprintf(msg, "%s %lld tokens x %d\n", vi.family, (long long)vi.tokens, vi.width);
    }
    fprintf(msg, "encoder + connector %.1f ms, hidden states %.1f ms, %d thread(s), %d tensor(s) -> %s\n", t_enc * 1e3,
            t_hid * 1e3, mmb_ctx_threads(ctx), n_out, strcmp(o.output, "-") ? o.output : "standard output");
    if (msg == stdout) cli_print_routing(cm.model);
    r = 0;
done:
    cli_free_list(meta_keys, meta_keys ? (int)(o.pixels ? 2 : src.n + 1) : 0);
    cli_free_list(src.paths, (int)src.n);
    free(src.orig);
    free(src.pixels);
    for (int i = 0; i <= MMB_MAX_TAPS; i++) free(bufs[i]);
    free(px);
    free(emb);
    cli_close(&cm);
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
