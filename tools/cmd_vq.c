/* Fusion D's VQ tokenizer on its own, for research: `encode --vq` (images or pixels -> codes, and the latents the
 * codes are the nearest entries of) and `decode-vq` (codes -> the decoder -> the processor's postprocess -> PNG).
 * Both open the VQ of a whole model's directory or a VQ model's own (mmb_vq_open) and print their forward time
 * and FLOPs on stderr ("vq encode: S s, F GFLOP"). */
#include "cli.h"

#include <stdlib.h>
#include <string.h>

int cli_vq_encode(mmb_ctx *ctx, const cli_enc *e) {
    mmb_vq *vq = NULL;
    mmb_vq_info vi;
    mmb_preprocess proc;
    char **paths = NULL;
    int n_paths = 0, r = 1, h = 0, w = 0;
    float *px = NULL, *lat = NULL;
    int32_t *codes = NULL;
    int64_t n = 0;
    if (mmb_vq_open(ctx, e->model, &vq) != MMB_OK) return cli_fail(ctx, NULL);
    mmb_vq_get_info(vq, &vi);
    if (e->pixels) {
        if (cli_read_pixels(ctx, e->pixels, 3, 0, &px, &n, &h, &w)) goto done;
    } else {
        if (mmb_preprocess_load(ctx, e->model, &proc) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        if (cli_expand_inputs(e->inputs, e->n_inputs, 0, &paths, &n_paths)) goto done;
        n = n_paths;
        for (int i = 0; i < n_paths; i++) { /* every image must come out of the processor at one size */
            mmb_image img = {0};
            int ih = 0, iw = 0;
            if (mmb_image_load(ctx, paths[i], 0, &img) != MMB_OK ||
                mmb_preprocess_output_size(ctx, &proc, img.height, img.width, &ih, &iw) != MMB_OK) {
                mmb_image_free(&img);
                cli_fail(ctx, NULL);
                goto done;
            }
            if (i && (ih != h || iw != w)) {
                fprintf(stderr, "mmbridge: error: %s: processed to %dx%d, the first image to %dx%d: --vq encodes "
                        "images of one processed size together (run it per size)\n", paths[i], iw, ih, w, h);
                mmb_image_free(&img);
                goto done;
            }
            h = ih, w = iw;
            size_t per = (size_t)3 * (size_t)h * (size_t)w;
            float *grown = realloc(px, sizeof(float) * per * (size_t)(i + 1));
            if (!grown) { mmb_image_free(&img); cli_fail(NULL, "out of memory"); goto done; }
            px = grown;
            mmb_status s = mmb_preprocess_run(ctx, &proc, &img, px + per * (size_t)i, per);
            mmb_image_free(&img);
            if (s != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        }
    }
    const int f = vi.downsample > 0 ? vi.downsample : 1;
    const int64_t gh = h / f, gw = w / f;
    codes = malloc(sizeof(int32_t) * (size_t)(n * (gh > 0 ? gh : 1) * (gw > 0 ? gw : 1)));
    lat = e->latents ? malloc(sizeof(float) * (size_t)(n * vi.embed_dim * (gh > 0 ? gh : 1) * (gw > 0 ? gw : 1))) : NULL;
    if (!codes || (e->latents && !lat)) { cli_fail(NULL, "out of memory"); goto done; }
    double t0 = cli_now();
    if (mmb_vq_encode(ctx, vq, px, n, h, w, codes, lat) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    double dt = cli_now() - t0;
    mmb_tensor t[2] = {{.name = "codes", .dtype = MMB_I32, .ndim = 3, .shape = {n, gh, gw}, .data = codes},
                       {.name = "latents", .dtype = MMB_F32, .ndim = 4, .shape = {n, vi.embed_dim, gh, gw}, .data = lat}};
    if (mmb_st_write(ctx, e->output, t, lat ? 2 : 1) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    fprintf(stderr, "vq encode: %.6f s, %.3f GFLOP (%lld image(s) of %dx%d -> %lldx%lld codes of %lld, %s); %d "
            "thread(s)\n", dt, (double)mmb_vq_flops(vq, h, w, 0) * (double)n * 1e-9, (long long)n, w, h,
            (long long)gh, (long long)gw, (long long)vi.codebook_size, vi.kind, mmb_ctx_threads(ctx));
    r = 0;
done:
    free(px);
    free(lat);
    free(codes);
    cli_free_list(paths, n_paths);
    mmb_vq_free(vq);
    return r;
}

int cmd_decode_vq(int argc, char **argv) {
    const char *pos[2], *output = NULL, *raw = NULL;
    cli_ctx_opts co = {0};
    const cli_opt opts[] = {
        {.name = "-o", .meta = "OUT", .type = CLI_STR, .dst = &output,
         .help = "the PNG to write (required); with several images, OUT's name gets -0, -1, ..."},
        {.name = "--pixels-out", .meta = "F", .type = CLI_STR, .dst = &raw,
         .help = "also write the decoder's raw output 'pixels' [n, 3, H, W] F32 (before the postprocess)"},
        CLI_OPTS_CTX(&co),
    };
    const cli_spec spec = {"decode-vq", "MODEL CODES.safetensors -o OUT.png",
        "CODES holds tensor 'codes' [n, rows, cols] (or [rows, cols]) I32/I64, as encode --vq writes it. MODEL's\n"
        "VQ decoder (JanusVQVAE, Emu3VQVAE; Chameleon's has none) turns them into pixels, and the model's\n"
        "image processor's postprocess (its preprocessor_config.json) into 8-bit RGB, written as PNG.\n",
        opts, CLI_N(opts), pos, 2, 2, NULL};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r == 1 ? 0 : r;
    if (!output) {
        fprintf(stderr, "mmbridge decode-vq: needs -o\n");
        return 2;
    }
    mmb_ctx *ctx = cli_ctx(&co);
    if (!ctx) return 1;
    mmb_vq *vq = NULL;
    mmb_st_file *f = NULL;
    mmb_preprocess proc;
    int32_t *codes = NULL;
    float *px = NULL;
    r = 1;
    if (mmb_vq_open(ctx, pos[0], &vq) != MMB_OK || mmb_st_open(ctx, pos[1], &f) != MMB_OK) {
        cli_fail(ctx, NULL);
        goto done;
    }
    mmb_vq_info vi;
    mmb_vq_get_info(vq, &vi);
    mmb_status ps = mmb_preprocess_load(ctx, pos[0], &proc);
    if (ps == MMB_ERR_IO) { /* a VQ model's own directory has no processor: its family's class defaults */
        const char *cls = !strcmp(vi.kind, "emu3_vqgan") ? "Emu3ImageProcessor" : "JanusImageProcessor";
        fprintf(stderr, "mmbridge: note: %s has no preprocessor_config.json: postprocessing as %s's defaults\n",
                pos[0], cls);
        ps = mmb_preprocess_init(ctx, cls, &proc);
    }
    if (ps != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    const mmb_tensor *t = mmb_st_find(f, "codes");
    if (!t || (t->ndim != 2 && t->ndim != 3) || (t->dtype != MMB_I32 && t->dtype != MMB_I64)) {
        fprintf(stderr, "mmbridge: error: %s: tensor 'codes' [n, rows, cols] (or [rows, cols]) I32/I64 is %s\n",
                pos[1], t ? "of another shape or dtype" : "missing");
        goto done;
    }
    const int64_t n = t->ndim == 3 ? t->shape[0] : 1, gh = t->shape[t->ndim - 2], gw = t->shape[t->ndim - 1];
    if (n < 1 || n > 4096 || gh < 1 || gw < 1 || gh > 4096 || gw > 4096) {
        fprintf(stderr, "mmbridge: error: %s: 'codes' of %lld x %lld x %lld: each side must be in [1, 4096]\n", pos[1],
                (long long)n, (long long)gh, (long long)gw);
        goto done;
    }
    const int64_t H = gh * vi.downsample, W = gw * vi.downsample, count = n * gh * gw;
    codes = malloc(sizeof(int32_t) * (size_t)count);
    px = malloc(sizeof(float) * (size_t)(n * 3 * H * W));
    if (!codes || !px) { cli_fail(NULL, "out of memory"); goto done; }
    for (int64_t i = 0; i < count; i++) {
        int64_t v = t->dtype == MMB_I32 ? ((const int32_t *)t->data)[i] : ((const int64_t *)t->data)[i];
        codes[i] = v < INT32_MIN || v > INT32_MAX ? -1 : (int32_t)v; /* out of range: the library names it */
    }
    double t0 = cli_now();
    if (mmb_vq_decode(ctx, vq, codes, n, (int)gh, (int)gw, px) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    double dt = cli_now() - t0;
    mmb_tensor rt = {.name = "pixels", .dtype = MMB_F32, .ndim = 4, .shape = {n, 3, H, W}, .data = px};
    if (raw && mmb_st_write(ctx, raw, &rt, 1) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    for (int64_t i = 0; i < n; i++) {
        char path[4096];
        const char *dot = strrchr(output, '.');
        if (n == 1) snprintf(path, sizeof path, "%s", output);
        else if (dot && !strchr(dot, '/')) snprintf(path, sizeof path, "%.*s-%lld%s", (int)(dot - output), output,
                                                     (long long)i, dot);
        else snprintf(path, sizeof path, "%s-%lld", output, (long long)i);
        mmb_image img = {0};
        mmb_status s = mmb_preprocess_postprocess(ctx, &proc, px + i * 3 * H * W, (int)H, (int)W, &img);
        if (s == MMB_OK) s = mmb_image_write_png(ctx, path, &img);
        mmb_image_free(&img);
        if (s != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    }
    fprintf(stderr, "vq decode: %.6f s, %.3f GFLOP (%lld x %lldx%lld codes -> %lldx%lld pixels, %s); %d thread(s)\n",
            dt, (double)mmb_vq_flops(vq, (int)H, (int)W, 1) * (double)n * 1e-9, (long long)n, (long long)gh,
            (long long)gw, (long long)W, (long long)H, vi.kind, mmb_ctx_threads(ctx));
    r = 0;
done:
    free(codes);
    free(px);
    mmb_st_close(f);
    mmb_vq_free(vq);
    mmb_ctx_free(ctx);
    return r;
}
