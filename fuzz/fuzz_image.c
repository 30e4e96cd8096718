/* libFuzzer target: image decoding (io/image.c: JPEG, PNG, WebP through libjpeg-turbo, libpng, libwebp) under a
 * pixel cap, then, when it decodes, the preprocessor (vision/preprocess.c) of a CLIP processor at a small size and of
 * a Qwen2-VL smart resize, so every decoded shape reaches the resampling code. */
#include "internal.h"

#include <stdlib.h>

static mmb_ctx *g_ctx;

static void cleanup(void) { mmb_ctx_free(g_ctx); }

static void preprocess(const char *type, const mmb_image *img) {
    mmb_preprocess p;
    if (mmb_preprocess_init(g_ctx, type, &p) != MMB_OK) abort();
    if (p.size_mode == MMB_SIZE_SHORTEST_EDGE) p.shortest_edge = p.crop_height = p.crop_width = 32;
    else p.max_pixels = 64 * 64, p.min_pixels = 28 * 28;
    int h = 0, w = 0;
    if (mmb_preprocess_output_size(g_ctx, &p, img->height, img->width, &h, &w) != MMB_OK) return;
    size_t n = (size_t)3 * (size_t)h * (size_t)w;
    float *out = malloc(n * sizeof(float) + 1);
    if (out && mmb_preprocess_run(g_ctx, &p, img, out, n) == MMB_OK) {
        volatile float sink = out[0]; /* the result is read */
        (void)sink;
    }
    free(out);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    if (!g_ctx) {
        mmb_ctx_params p = mmb_ctx_default_params();
        p.n_threads = 1;
        if (mmb_ctx_new(&p, &g_ctx) != MMB_OK) abort();
        atexit(cleanup);
    }
    mmb_image img = {0};
    if (mmb_image_decode(g_ctx, data, size, "fuzz", 1 << 20, &img) == MMB_OK) { /* at most 1 Mpixel */
        preprocess("CLIPImageProcessor", &img);
        preprocess("Qwen2VLImageProcessor", &img);
        mmb_image_free(&img);
    }
    return 0;
}
