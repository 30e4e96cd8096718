/* Image decoding and preprocessing: the API's promises without Python. A PNG made by Pillow is
 * decoded from memory (alpha composited on white as transformers does), bad bytes are refused
 * with a message and untouched outputs, and the processor sizes follow transformers' rules.
 * tests/oracle/test_preprocess.py compares the numbers against Pillow and transformers. */
#include "check.h"
#include "mmbridge.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* 3x2 RGBA PNG (Pillow): alpha 255, 128, 0 / 255, 64, 255. */
static const unsigned char PNG_RGBA[] = {
    137, 80,  78,  71,  13,  10,  26,  10,  0,   0,   0,   13,  73,  72,  68,  82,  0,   0,   0,   3,   0,   0,   0,
    2,   8,   6,   0,   0,   0,   157, 116, 102, 26,  0,   0,   0,   35,  73,  68,  65,  84,  120, 156, 99,  248, 207,
    192, 240, 159, 225, 63,  67,  3,   3,   195, 127, 6,   6,   46,  17,  185, 255, 39,  82,  140, 28,  216, 217, 217,
    255, 3,   0,   114, 229, 8,   106, 48,  205, 237, 103, 0,   0,   0,   0,   73,  69,  78,  68,  174, 66,  96,  130};
/* transformers.image_transforms.convert_to_rgb of it */
static const unsigned char PNG_RGB[] = {255, 0, 0, 127, 255, 127, 255, 255, 255, 10, 20, 30, 241, 216, 204, 7, 7, 7};

static void test_decode(mmb_ctx *ctx) {
    mmb_image img = {0, 0, NULL};
    CHECK(mmb_image_decode(ctx, PNG_RGBA, sizeof PNG_RGBA, "mem.png", 0, &img) == MMB_OK, "%s", mmb_ctx_error(ctx));
    CHECK(img.width == 3 && img.height == 2 && img.rgb && memcmp(img.rgb, PNG_RGB, sizeof PNG_RGB) == 0,
          "composited RGB");
    mmb_image_free(&img);
    CHECK(img.rgb == NULL && img.width == 0, "free zeroes");
    mmb_image_free(NULL);

    /* failures leave *out alone and name the input */
    mmb_image keep = {7, 9, (unsigned char *)PNG_RGB};
    CHECK(mmb_image_decode(ctx, PNG_RGBA, sizeof PNG_RGBA, "mem.png", 5, &keep) == MMB_ERR_UNSUPPORTED,
          "pixel limit");
    CHECK(strstr(mmb_ctx_error(ctx), "mem.png") && strstr(mmb_ctx_error(ctx), "exceeds the limit"), "%s",
          mmb_ctx_error(ctx));
    CHECK(mmb_image_decode(ctx, PNG_RGBA, 50, "cut.png", 0, &keep) == MMB_ERR_FORMAT, "truncated");
    CHECK(strstr(mmb_ctx_error(ctx), "cut.png") != NULL, "%s", mmb_ctx_error(ctx));
    CHECK(mmb_image_decode(ctx, "hello", 5, "t.txt", 0, &keep) == MMB_ERR_FORMAT, "text");
    CHECK(mmb_image_decode(ctx, "GIF89a\1\0\1\0", 10, "a.gif", 0, &keep) == MMB_ERR_UNSUPPORTED, "gif");
    CHECK(strstr(mmb_ctx_error(ctx), "unsupported image format (GIF)") != NULL, "%s", mmb_ctx_error(ctx));
    CHECK(mmb_image_decode(ctx, "\xff\xd8\xff", 3, "x.jpg", 0, &keep) == MMB_ERR_FORMAT, "jpeg SOI only");
    CHECK(mmb_image_decode(ctx, "", 0, "e.png", 0, &keep) == MMB_ERR_FORMAT, "empty");
    CHECK(mmb_image_decode(ctx, PNG_RGBA, sizeof PNG_RGBA, "m", -1, &keep) == MMB_ERR_ARG, "negative limit");
    CHECK(mmb_image_load(ctx, ".", 0, &keep) == MMB_ERR_IO && strstr(mmb_ctx_error(ctx), "directory"), "dir");
    CHECK(mmb_image_load(ctx, "/nonexistent/x.png", 0, &keep) == MMB_ERR_IO, "missing");
    CHECK(mmb_image_load(ctx, NULL, 0, &keep) == MMB_ERR_ARG, "NULL path");
    CHECK(keep.width == 7 && keep.height == 9 && keep.rgb == PNG_RGB, "output untouched");
}

static void test_sizes(mmb_ctx *ctx) {
    mmb_preprocess p;
    int h = -1, w = -1;
    CHECK(mmb_preprocess_init(ctx, "CLIPImageProcessor", &p) == MMB_OK, "clip");
    CHECK(p.size_mode == MMB_SIZE_SHORTEST_EDGE && p.shortest_edge == 224 && p.do_center_crop && p.crop_height == 224 &&
          p.resample == MMB_RESAMPLE_BICUBIC && fabs(p.rescale_factor - 1.0 / 255) < 1e-15, "clip defaults");
    CHECK(mmb_preprocess_output_size(ctx, &p, 480, 640, &h, &w) == MMB_OK && h == 224 && w == 224, "clip crop");
    p.do_center_crop = 0;
    /* int(224 * 640 / 480) = 298; int(224 * 1000 / 37) = 6054 */
    CHECK(mmb_preprocess_output_size(ctx, &p, 480, 640, &h, &w) == MMB_OK && h == 224 && w == 298, "%dx%d", h, w);
    CHECK(mmb_preprocess_output_size(ctx, &p, 1000, 37, &h, &w) == MMB_OK && h == 6054 && w == 224, "%dx%d", h, w);
    CHECK(mmb_preprocess_init(ctx, "LlavaImageProcessorFast", &p) == MMB_OK && !p.do_pad && p.pad_color[0] == 122 &&
          p.pad_color[1] == 116 && p.pad_color[2] == 104, "llava: int(mean * 255)");
    CHECK(mmb_preprocess_init(ctx, "SiglipImageProcessor", &p) == MMB_OK && p.size_mode == MMB_SIZE_HEIGHT_WIDTH &&
          !p.do_center_crop && p.image_mean[0] == 0.5 && p.image_std[2] == 0.5, "siglip defaults");
    CHECK(mmb_preprocess_output_size(ctx, &p, 5, 1000, &h, &w) == MMB_OK && h == 224 && w == 224, "siglip");
    CHECK(mmb_preprocess_init(ctx, "Qwen2VLImageProcessor", &p) == MMB_OK && p.size_mode == MMB_SIZE_SMART &&
          p.min_pixels == 3136 && p.max_pixels == 1003520 && p.resize_factor == 28 && !p.do_center_crop, "qwen2-vl");
    /* smart_resize: round(100 / 28) * 28, round(150 / 28) * 28; an aspect ratio over 200 is refused */
    CHECK(mmb_preprocess_output_size(ctx, &p, 100, 150, &h, &w) == MMB_OK && h == 112 && w == 140, "%dx%d", h, w);
    CHECK(mmb_preprocess_output_size(ctx, &p, 1, 201, &h, &w) == MMB_ERR_SHAPE, "aspect > 200");
    CHECK(mmb_preprocess_init(ctx, "MllamaImageProcessorPil", &p) == MMB_OK && p.size_mode == MMB_SIZE_TILES &&
          p.tile_size == 224 && p.max_image_tiles == 4 && p.resample == MMB_RESAMPLE_BILINEAR && !p.do_pad &&
          p.image_mean[0] == 0.5, "mllama defaults");
    /* get_optimal_tiled_canvas: 300x500 fits no canvas upscaled, 2x2 is the largest downscale; 100x300 upscales
     * least into 1x2 (scale min(224/100, 448/300)); 10x1000 into 1x4 */
    CHECK(mmb_preprocess_output_size(ctx, &p, 300, 500, &h, &w) == MMB_OK && h == 448 && w == 448, "%dx%d", h, w);
    CHECK(mmb_preprocess_output_size(ctx, &p, 100, 300, &h, &w) == MMB_OK && h == 224 && w == 448, "%dx%d", h, w);
    CHECK(mmb_preprocess_output_size(ctx, &p, 10, 1000, &h, &w) == MMB_OK && h == 224 && w == 896, "%dx%d", h, w);
    p.max_image_tiles = 0;
    CHECK(mmb_preprocess_output_size(ctx, &p, 10, 10, &h, &w) == MMB_ERR_ARG, "no tiles refused");
    CHECK(mmb_preprocess_init(ctx, "ViTImageProcessor", &p) == MMB_ERR_UNSUPPORTED, "unknown class");
    p.resample = MMB_RESAMPLE_NEAREST;
    CHECK(mmb_preprocess_output_size(ctx, &p, 5, 5, &h, &w) == MMB_ERR_UNSUPPORTED, "nearest refused");
    CHECK(mmb_preprocess_load(ctx, "/nonexistent", &p) == MMB_ERR_IO &&
          strstr(mmb_ctx_error(ctx), "preprocessor_config.json"), "%s", mmb_ctx_error(ctx));
}

static void test_run(mmb_ctx *ctx) {
    mmb_image img = {0, 0, NULL};
    CHECK(mmb_image_decode(ctx, PNG_RGBA, sizeof PNG_RGBA, "mem.png", 0, &img) == MMB_OK, "decode");
    mmb_preprocess p;
    mmb_preprocess_init(ctx, "SiglipImageProcessor", &p);
    p.size_height = 4;
    p.size_width = 6;
    float out[3 * 4 * 6], sentinel = 42.0f;
    out[0] = sentinel;
    CHECK(mmb_preprocess_run(ctx, &p, &img, out, 3 * 4 * 6 - 1) == MMB_ERR_SHAPE && out[0] == sentinel, "short out");
    CHECK(mmb_preprocess_run(ctx, &p, &img, out, 3 * 4 * 6) == MMB_OK, "%s", mmb_ctx_error(ctx));
    int in_range = 1;
    for (int i = 0; i < 3 * 4 * 6; i++) in_range &= out[i] >= -1.0f && out[i] <= 1.0f;
    CHECK(in_range, "siglip output in [-1, 1]");
    /* no resize: the exact float of (v / 255 - 0.5) / 0.5, channel-first */
    p.do_resize = 0;
    float id[3 * 2 * 3];
    CHECK(mmb_preprocess_run(ctx, &p, &img, id, 18) == MMB_OK, "identity");
    CHECK(id[0] == (float)((float)(255 * (1.0 / 255)) - 0.5f) / 0.5f && id[6 + 1] == ((float)(255 * (1.0 / 255)) - 0.5f) / 0.5f,
          "channel-first values");
    mmb_image bad = {0, 0, NULL};
    CHECK(mmb_preprocess_run(ctx, &p, &bad, id, 18) == MMB_ERR_ARG, "empty image");
    mmb_image_free(&img);
}

int main(void) {
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 1;
    test_decode(ctx);
    test_sizes(ctx);
    test_run(ctx);
    mmb_ctx_free(ctx);
    return DONE("test_image");
}
