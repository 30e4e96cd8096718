/* mmbridge attention: each block's attention maps of a CLIP/SigLIP tower (mmb_vit_attention: the CLS query's
 * attention to the patches, or for a tower without a CLS the mean over queries, averaged over heads) drawn as
 * heat maps over the preprocessed image, one tile per layer, as the Dense Connector paper's Figure 1; --raw
 * writes the numbers. */
#include "cli.h"
#include "plot.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The picture's geometry (the help states it, the tests check it). */
#define MARGIN 8
#define LABEL 12  /* a label row above each tile: 8 pixels of text, 4 of space */
#define TITLE 14

/* The picture the maps lie over, [3, S, S] pixels -> 8-bit RGB: the processor's postprocess (un-normalize,
 * un-rescale), or without a processor each channel stretched over its own range. */
static int background(mmb_ctx *ctx, const mmb_preprocess *proc, const float *px, int S, mmb_image *out) {
    if (proc) return mmb_preprocess_postprocess(ctx, proc, px, S, S, out) != MMB_OK ? cli_fail(ctx, NULL) : 0;
    size_t hw = (size_t)S * (size_t)S;
    if (!(out->rgb = malloc(hw * 3))) return cli_fail(NULL, "out of memory");
    out->width = out->height = S;
    for (int c = 0; c < 3; c++) {
        float lo = INFINITY, hi = -INFINITY;
        for (size_t i = 0; i < hw; i++) {
            lo = px[c * hw + i] < lo ? px[c * hw + i] : lo;
            hi = px[c * hw + i] > hi ? px[c * hw + i] : hi;
        }
        for (size_t i = 0; i < hw; i++)
            out->rgb[3 * i + (size_t)c] = (unsigned char)(hi > lo ? lrintf(255.0f * (px[c * hw + i] - lo) / (hi - lo)) : 128);
    }
    return 0;
}

/* The map of g x g values at the tile's pixel (x, y) of a tile of side T, bilinear between patch centres. */
static float sample(const float *m, int g, int T, int x, int y) {
    float fx = ((float)x + 0.5f) * (float)g / (float)T - 0.5f, fy = ((float)y + 0.5f) * (float)g / (float)T - 0.5f;
    fx = fx < 0 ? 0 : fx > g - 1 ? (float)(g - 1) : fx;
    fy = fy < 0 ? 0 : fy > g - 1 ? (float)(g - 1) : fy;
    int x0 = (int)fx, y0 = (int)fy, x1 = x0 + 1 < g ? x0 + 1 : x0, y1 = y0 + 1 < g ? y0 + 1 : y0;
    float ax = fx - (float)x0, ay = fy - (float)y0;
    float top = m[y0 * g + x0] * (1 - ax) + m[y0 * g + x1] * ax, bot = m[y1 * g + x0] * (1 - ax) + m[y1 * g + x1] * ax;
    return top * (1 - ay) + bot * ay;
}

/* The grid: tile 0 the image, tile 1 + l block l's map (labelled "layer l+1", as hidden_states[l+1] is its
 * output), each map stretched over its own [min, max] and blended over the image. */
static int draw(const mmb_image *bg, const float *maps, int L, int g, int T, int cols, const char *title,
                mmb_image *c) {
    static const unsigned char white[3] = {255, 255, 255}, black[3] = {0, 0, 0}, grey[3] = {90, 90, 90};
    int tiles = L + 1, rows = (tiles + cols - 1) / cols;
    if (plot_new(c, MARGIN + cols * (T + MARGIN), MARGIN + TITLE + rows * (LABEL + T + MARGIN), white))
        return cli_fail(NULL, "out of memory");
    plot_text(c, MARGIN, MARGIN, title, 1, black);
    for (int t = 0; t < tiles; t++) {
        int x0 = MARGIN + t % cols * (T + MARGIN), y0 = MARGIN + TITLE + t / cols * (LABEL + T + MARGIN);
        const float *m = t ? maps + (size_t)(t - 1) * (size_t)g * (size_t)g : NULL;
        float lo = INFINITY, hi = -INFINITY;
        for (int i = 0; m && i < g * g; i++) {
            lo = m[i] < lo ? m[i] : lo;
            hi = m[i] > hi ? m[i] : hi;
        }
        char label[64];
        if (t) snprintf(label, sizeof label, "layer %d  max %.3g", t, hi);
        else snprintf(label, sizeof label, "input");
        while (plot_text_width(label, 1) > T && strlen(label) > 1) label[strlen(label) - 1] = 0;
        plot_text(c, x0, y0, label, 1, t ? black : grey);
        for (int y = 0; y < T; y++)
            for (int x = 0; x < T; x++) {
                int sx = (int)((int64_t)x * bg->width / T), sy = (int)((int64_t)y * bg->height / T);
                unsigned char *dst = c->rgb + 3 * ((size_t)(y0 + LABEL + y) * (size_t)c->width + (size_t)(x0 + x));
                memcpy(dst, bg->rgb + 3 * ((size_t)sy * (size_t)bg->width + (size_t)sx), 3);
                if (!m) continue;
                unsigned char col[3];
                plot_heat(hi > lo ? (sample(m, g, T, x, y) - lo) / (hi - lo) : 0.0f, col);
                plot_blend(c, x0 + x, y0 + LABEL + y, col, 0.55f);
            }
    }
    return 0;
}

int cmd_attention(int argc, char **argv) {
    const char *pos[2] = {0}, *output = NULL, *raw = NULL, *pixels = NULL, *tower = NULL;
    int64_t tile = 160, cols = 0;
    int n_pos = 0;
    cli_ctx_opts co = {0};
    const cli_opt opts[] = {
        {.name = "-o", .meta = "OUT.png", .type = CLI_STR, .dst = &output,
         .help = "the picture: one tile per layer in a grid (the image first)"},
        {.name = "--raw", .meta = "F", .type = CLI_STR, .dst = &raw,
         .help = "also write the numbers: 'attention' [n, layers, patches] F32 (safetensors)"},
        {.name = "--pixels", .meta = "F", .type = CLI_STR, .dst = &pixels,
         .help = "read preprocessed 'pixel_values' [n, channels, size, size] from F instead\n"
         "of IMAGE (the picture shows image 0; --raw holds all n)"},
        {.name = "--vision-tower", .meta = "DIR", .type = CLI_STR, .dst = &tower,
         .help = "the CLIP/SigLIP checkpoint directory of an original-layout LLaVA model"},
        {.name = "--tile", .meta = "N", .type = CLI_INT, .dst = &tile,
         .help = "a tile's side in pixels (default 160)", .lo = 16, .hi = 2048},
        {.name = "--cols", .meta = "N", .type = CLI_INT, .dst = &cols,
         .help = "tiles per row (default: ceil(sqrt(layers + 1)))", .lo = 1, .hi = 4096},
        CLI_OPTS_CTX(&co),
    };
    const cli_spec spec = {"attention", "MODEL IMAGE -o OUT.png",
        "For each block l of MODEL's vision tower (a CLIP or SigLIP tower, alone or a LLaVA's), the\n"
        "attention softmax(q k^T / sqrt(head_dim)) averaged over heads (mmb_vit_attention): for a tower\n"
        "with a CLS token, the CLS query's row over the patches (transformers' output_attentions\n"
        "attn[:, :, 0, 1:].mean(heads)); without one (SigLIP), each patch's attention averaged over\n"
        "every query (attn.mean(heads).mean(queries)). IMAGE goes through the model's image processor.\n"
        "The picture is a grid of --cols columns of tiles of --tile pixels: the processed image, then\n"
        "'layer 1' .. 'layer L' (block l-1, whose output is hidden_states[l]), each map stretched over\n"
        "its own range (the label gives its max) as a heat map (blue low, red high) blended over the\n"
        "image. Its size: width 8 + cols (tile + 8), height 22 + rows (tile + 20), rows = ceil((L + 1)\n"
        "/ cols). Outputs are written to a temporary file and renamed: a failure leaves none.\n",
        opts, CLI_N(opts), pos, 1, 2, &n_pos};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r == 1 ? 0 : r;
    if (!output && !raw) {
        fprintf(stderr, "mmbridge attention: needs -o OUT.png or --raw F\n");
        return 2;
    }
    if ((n_pos == 2) == !!pixels) {
        fprintf(stderr, "mmbridge attention: needs IMAGE or --pixels F (one of them)\n");
        return 2;
    }
    mmb_ctx *ctx = cli_ctx(&co);
    if (!ctx) return 1;
    mmb_mllm *m = NULL;
    mmb_image img = {0}, bg = {0}, pic = {0};
    float *px = NULL, *maps = NULL;
    int64_t n = 1;
    r = 1;
    if (cli_open(ctx, pos[0], tower, NULL, 1, NULL, &m)) goto done;
    const mmb_vit *v = mmb_mllm_vit(m);
    mmb_mllm_info mi;
    mmb_mllm_get_info(m, &mi);
    if (!v) {
        fprintf(stderr, "mmbridge: error: %s: %s\n", pos[0], mi.has_vision
                ? "this family runs its tower inside its own encode: only a CLIP/SigLIP tower's attention (alone or "
                  "a LLaVA's) is exposed" : "no vision tower");
        goto done;
    }
    mmb_vit_info vi;
    mmb_vit_get_info(v, &vi);
    const int S = vi.image_size, g = vi.image_size / vi.patch_size, L = vi.layers;
    const int64_t patches = (int64_t)g * g;
    if (pixels) {
        int h, w;
        if (cli_read_pixels(ctx, pixels, vi.channels, S, &px, &n, &h, &w)) goto done;
    } else {
        if (mmb_image_load(ctx, pos[1], 0, &img) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        if (!(px = malloc(sizeof(float) * 3 * (size_t)S * (size_t)S))) { cli_fail(NULL, "out of memory"); goto done; }
    }
    size_t count = (size_t)n * (size_t)L * (size_t)patches;
    if (!(maps = malloc(sizeof(float) * (count ? count : 1)))) { cli_fail(NULL, "out of memory"); goto done; }
    double t0 = cli_now();
    mmb_status s = pixels ? mmb_vit_attention(ctx, v, px, n, S, S, maps, count)
                          : mmb_mllm_attention(ctx, m, &img, 1, maps, count, px, 3 * (size_t)S * (size_t)S);
    if (s != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    double dt = cli_now() - t0;
    const char *kind = vi.has_cls ? "CLS query -> patches" : "mean over queries";
    if (output) {
        if (background(ctx, pixels ? NULL : mmb_mllm_processor(m), px, S, &bg)) goto done;
        int c = cols ? (int)cols : (int)ceil(sqrt((double)L + 1.0));
        c = c > L + 1 ? L + 1 : c;
        char title[256];
        const char *base = strrchr(pos[0], '/');
        snprintf(title, sizeof title, "%s: %s, %d layers, %dx%d patches, heads averaged", base && base[1] ? base + 1
                 : pos[0], kind, L, g, g);
        if (draw(&bg, maps, L, g, (int)tile, c, title, &pic)) goto done;
    }
    if (raw) {
        mmb_tensor t = {.name = "attention", .dtype = MMB_F32, .ndim = 3, .shape = {n, L, patches}, .data = maps};
        char grid[32];
        snprintf(grid, sizeof grid, "%d,%d", g, g);
        const char *keys[3] = {"kind", "grid", "family"}, *vals[3] = {vi.has_cls ? "cls" : "mean_query", grid,
                                                                     vi.family};
        if (mmb_st_write_meta(ctx, raw, &t, 1, keys, vals, 3) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    }
    if (output && mmb_image_write_png(ctx, output, &pic) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    fprintf(stderr, "attention: %s, %d layers x %lld patches (%dx%d), %lld image(s), %.3f s; %d thread(s)", kind, L,
            (long long)patches, g, g, (long long)n, dt, mmb_ctx_threads(ctx));
    if (output) fprintf(stderr, "; %s: %dx%d", output, pic.width, pic.height);
    fprintf(stderr, "\n");
    r = 0;
done:
    mmb_image_free(&img);
    mmb_image_free(&bg);
    mmb_image_free(&pic);
    free(px);
    free(maps);
    mmb_mllm_free(m);
    mmb_ctx_free(ctx);
    return r;
}
