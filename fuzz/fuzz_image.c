/* libFuzzer target: image decoding (io/image.c: JPEG, PNG, WebP through libjpeg-turbo, libpng, libwebp) under a
 * pixel cap, then, when it decodes, the preprocessor (vision/preprocess.c) of a CLIP processor at a small size and of
 * a Qwen2-VL smart resize, so every decoded shape reaches the resampling code. */
#include "fuzz_util.h"

static void preprocess(const char *type, const mmb_image *img) {
    mmb_preprocess p;
    if (mmb_preprocess_init(fuzz_ctx(), type, &p) != MMB_OK) abort();
    if (p.size_mode == MMB_SIZE_SHORTEST_EDGE) p.shortest_edge = p.crop_height = p.crop_width = 32;
    else p.max_pixels = 64 * 64, p.min_pixels = 28 * 28;
    int h = 0, w = 0;
    if (mmb_preprocess_output_size(fuzz_ctx(), &p, img->height, img->width, &h, &w) != MMB_OK) return;
    size_t n = (size_t)3 * (size_t)h * (size_t)w;
    float *out = malloc(n * sizeof(float) + 1);
    if (out && mmb_preprocess_run(fuzz_ctx(), &p, img, out, n) == MMB_OK) {
        volatile float sink = out[0]; /* the result is read */
        (void)sink;
    }
    free(out);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    mmb_image img = {0};
    if (mmb_image_decode(fuzz_ctx(), data, size, "fuzz", 1 << 20, &img) == MMB_OK) { /* at most 1 Mpixel */
        preprocess("CLIPImageProcessor", &img);
        preprocess("Qwen2VLImageProcessor", &img);
        mmb_image_free(&img);
    }
    return 0;
}
