/* libFuzzer target: preprocessor_config.json (vision/preprocess.c's parser). Each input becomes the file in a
 * temporary directory and is loaded with mmb_preprocess_load; when it loads, the output size of a few image sizes is
 * asked and, when it is small, a fixed 40x24 image is preprocessed with it (sizes past a cap are skipped: a config
 * may ask for a huge output, which the library refuses or sizes honestly). */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static mmb_ctx *g_ctx;
static char g_dir[64], g_file[112];
static unsigned char g_rgb[40 * 24 * 3];

static void cleanup(void) {
    unlink(g_file);
    rmdir(g_dir);
    mmb_ctx_free(g_ctx);
}

static void setup(void) {
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = 1;
    if (mmb_ctx_new(&p, &g_ctx) != MMB_OK) abort();
    snprintf(g_dir, sizeof g_dir, "/tmp/mmb_fuzz_pp_%ld_XXXXXX", (long)getpid());
    if (!mkdtemp(g_dir)) abort();
    snprintf(g_file, sizeof g_file, "%s/preprocessor_config.json", g_dir);
    for (size_t i = 0; i < sizeof g_rgb; i++) g_rgb[i] = (unsigned char)(i * 37 + 11);
    atexit(cleanup);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    if (!g_ctx) setup();
    if (size > 1 << 16) return 0;
    FILE *f = fopen(g_file, "wb");
    if (!f) abort();
    if (size && fwrite(data, 1, size, f) != size) abort();
    fclose(f);
    mmb_preprocess p;
    if (mmb_preprocess_load(g_ctx, g_dir, &p) != MMB_OK) return 0;
    static const int sizes[][2] = {{24, 40}, {1, 1}, {480, 640}, {3000, 7}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        int h = 0, w = 0;
        mmb_preprocess_output_size(g_ctx, &p, sizes[i][0], sizes[i][1], &h, &w);
    }
    int h = 0, w = 0;
    mmb_image img = {.width = 40, .height = 24, .rgb = g_rgb};
    if (mmb_preprocess_output_size(g_ctx, &p, 24, 40, &h, &w) == MMB_OK && (int64_t)h * w <= 256 * 256) {
        size_t n = (size_t)3 * (size_t)h * (size_t)w;
        float *out = malloc(n * sizeof(float) + 1);
        if (out) mmb_preprocess_run(g_ctx, &p, &img, out, n);
        free(out);
    }
    return 0;
}
