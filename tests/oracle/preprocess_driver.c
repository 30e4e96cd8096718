/* Oracle driver for tests/oracle/test_preprocess.py: decodes one image and runs it through each
 * given processor directory, writing everything to a safetensors file:
 *   rgb          [H, W, 3] U8   the decoded image
 *   u8.{i}       [h, w, 3] U8   after pad / resize / crop for the i-th directory
 *   pixels.{i}   [3, h, w] F32  pixel_values for the i-th directory
 *
 *   preprocess_driver [--max-pixels N] OUT.safetensors IMAGE [MODEL_DIR ...]
 *
 * Exit 0 on success; 2 with "status: message" on stderr when the library refuses; 1 on misuse. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>


#define MAX_DIRS 16

static int fail(mmb_ctx *ctx, mmb_status s) {
    fprintf(stderr, "%s: %s\n", mmb_status_str(s), mmb_ctx_error(ctx));
    return 2;
}

int main(int argc, char **argv) {
    int64_t max_pixels = 0;
    int a = 1;
    if (a + 1 < argc && !strcmp(argv[a], "--max-pixels")) {
        max_pixels = strtoll(argv[a + 1], NULL, 10);
        a += 2;
    }
    if (argc - a < 2 || argc - a - 2 > MAX_DIRS) {
        fprintf(stderr, "usage: %s [--max-pixels N] OUT.safetensors IMAGE [MODEL_DIR ...]\n", argv[0]);
        return 1;
    }
    const char *out_path = argv[a], *image = argv[a + 1];
    const int n_dirs = argc - a - 2;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    mmb_ctx *ctx = NULL;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 1;
    mmb_image img = {0, 0, NULL};
    mmb_status s = mmb_image_load(ctx, image, max_pixels, &img);
    if (s != MMB_OK) {
        int rc = fail(ctx, s);
        mmb_ctx_free(ctx);
        return rc;
    }
    mmb_tensor t[1 + 2 * MAX_DIRS];
    char names[2 * MAX_DIRS][32];
    void *bufs[2 * MAX_DIRS] = {0};
    int nt = 0, rc = 0;
    t[nt++] = (mmb_tensor){"rgb", MMB_U8, 3, {img.height, img.width, 3}, img.rgb};
    for (int i = 0; i < n_dirs && rc == 0; i++) {
        mmb_preprocess p;
        int h, w;
        unsigned char *u8 = NULL;
        if ((s = mmb_preprocess_load(ctx, argv[a + 2 + i], &p)) != MMB_OK ||
            (s = mmb_preprocess_output_size(ctx, &p, img.height, img.width, &h, &w)) != MMB_OK ||
            (p.size_mode != MMB_SIZE_ANYRES && (s = mmb__preprocess_u8(ctx, &p, &img, &u8, &h, &w)) != MMB_OK)) {
            rc = fail(ctx, s);
            break;
        }
        bufs[2 * i] = u8;
        snprintf(names[2 * i], sizeof names[0], "u8.%d", i);
        if (u8) t[nt++] = (mmb_tensor){names[2 * i], MMB_U8, 3, {h, w, 3}, u8}; /* AnyRes: its tiles are floats */
        size_t n = (size_t)3 * h * w;
        float *px = malloc(n * sizeof(float));
        bufs[2 * i + 1] = px;
        if (!px) { rc = 1; break; }
        /* one float short must be refused, and leave the buffer alone */
        px[0] = 12345.0f;
        if (mmb_preprocess_run(ctx, &p, &img, px, n - 1) != MMB_ERR_SHAPE || px[0] != 12345.0f) {
            fprintf(stderr, "short output buffer not refused\n");
            rc = 1;
            break;
        }
        if ((s = mmb_preprocess_run(ctx, &p, &img, px, n)) != MMB_OK) {
            rc = fail(ctx, s);
            break;
        }
        snprintf(names[2 * i + 1], sizeof names[0], "pixels.%d", i);
        t[nt++] = (mmb_tensor){names[2 * i + 1], MMB_F32, 3, {3, h, w}, px};
    }
    if (rc == 0 && (s = mmb_st_write(ctx, out_path, t, nt)) != MMB_OK) rc = fail(ctx, s);
    for (int i = 0; i < 2 * MAX_DIRS; i++) free(bufs[i]);
    mmb_image_free(&img);
    mmb_ctx_free(ctx);
    return rc;
}
