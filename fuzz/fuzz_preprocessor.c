/* libFuzzer target: preprocessor_config.json (vision/preprocess.c's parser). Each input becomes the file in a
 * temporary directory and is loaded with mmb_preprocess_load; when it loads, the output size of a few image sizes is
 * asked and, when it is small, a fixed 40x24 image is preprocessed with it (sizes past a cap are skipped: a config
 * may ask for a huge output, which the library refuses or sizes honestly). */
#include "fuzz_util.h"

static unsigned char g_rgb[40 * 24 * 3];

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    const char *dir = fuzz_dir("pp", "preprocessor_config.json");
    mmb_ctx *ctx = fuzz_ctx();
    if (!g_rgb[1])
        for (size_t i = 0; i < sizeof g_rgb; i++) g_rgb[i] = (unsigned char)(i * 37 + 11);
    if (size > 1 << 16) return 0;
    fuzz_write(data, size);
    mmb_preprocess p;
    if (mmb_preprocess_load(ctx, dir, &p) != MMB_OK) return 0;
    static const int sizes[][2] = {{24, 40}, {1, 1}, {480, 640}, {3000, 7}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        int h = 0, w = 0;
        mmb_preprocess_output_size(ctx, &p, sizes[i][0], sizes[i][1], &h, &w);
    }
    int h = 0, w = 0;
    mmb_image img = {.width = 40, .height = 24, .rgb = g_rgb};
    if (mmb_preprocess_output_size(ctx, &p, 24, 40, &h, &w) == MMB_OK && (int64_t)h * w <= 256 * 256) {
        size_t n = (size_t)3 * (size_t)h * (size_t)w;
        float *out = malloc(n * sizeof(float) + 1);
        if (out) mmb_preprocess_run(ctx, &p, &img, out, n);
        free(out);
    }
    return 0;
}
