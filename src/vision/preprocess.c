/* Image preprocessing with the semantics of transformers' PIL-backend image processors (CLIP,
 * SigLIP, LLaVA, BLIP), driven by preprocessor_config.json (or the image processor nested in transformers 5's
 * processor_config.json).
 *
 * Order, as PilBackend._preprocess / LlavaImageProcessorPil._preprocess run it:
 *   1. pad to square (LLaVA do_pad): background int(mean * 255) per channel, image at
 *      ((max - h) // 2, (max - w) // 2);
 *   2. resize with Pillow's Image.resize (uint8, antialiased separable filter in two passes, a pass
 *      skipped when that side keeps its size, the order as Pillow 13 picks it (see resize_u8);
 *      coefficients in 22-bit fixed point, rounded and clipped per pass: libImaging/Resample.c's
 *      8bpc path);
 *   3. center crop: top = (h - ch) // 2, zero padding (ceil of half the deficit first) when the
 *      image is smaller than the crop;
 *   4. rescale: float32(float64(v) * rescale_factor);
 *   5. normalize: (x - float32(mean)) / float32(std) in float32.
 * Output: f32 [3, H, W].
 *
 * MllamaImageProcessorPil (MMB_SIZE_TILES) replaces steps 1-3 by its own: the canvas of rows x cols tiles
 * (get_optimal_tiled_canvas), the resize into it keeping the aspect (get_image_size_fit_to_canvas, then
 * Image.resize, bilinear by default), zeros padded at the bottom and right up to the canvas (in uint8, so
 * they normalize to -mean / std); after 4-5 the canvas is split into its tiles, written one after another
 * (row-major over the canvas), each [3, tile, tile]. */
#include "vision/vision.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- class defaults ---------------------------------------------------------------------------- */

static const double CLIP_MEAN[3] = {0.48145466, 0.4578275, 0.40821073};
static const double CLIP_STD[3] = {0.26862954, 0.26130258, 0.27577711};

typedef enum { KIND_CLIP, KIND_SIGLIP, KIND_LLAVA, KIND_BLIP, KIND_QWEN2VL, KIND_IDEFICS, KIND_MLLAMA, KIND_EMU3, KIND_CHAMELEON,
               KIND_JANUS, KIND_LLAVA_NEXT, KIND_LLAVA_ONEVISION } proc_kind;

#define SUPPORTED_CLASSES "CLIPImageProcessor, SiglipImageProcessor, LlavaImageProcessor, BlipImageProcessor, " \
                          "Qwen2VLImageProcessor, IdeficsImageProcessor, MllamaImageProcessor, Emu3ImageProcessor, " \
                          "ChameleonImageProcessor, JanusImageProcessor, LlavaNextImageProcessor and " \
                          "LlavaOnevisionImageProcessor are"
#define MAX_IMAGE_TILES 256  /* far above any checkpoint's (Llama 3.2: 4); bounds the canvas search */

/* Maps a class name (with an optional Fast / Pil suffix) or a processor class to a kind. */
static bool kind_of(const char *type, proc_kind *k) {
    static const struct { const char *name; proc_kind k; } names[] = {
        {"CLIPImageProcessor", KIND_CLIP},   {"CLIPFeatureExtractor", KIND_CLIP}, {"CLIPProcessor", KIND_CLIP},
        {"SiglipImageProcessor", KIND_SIGLIP}, {"SiglipProcessor", KIND_SIGLIP},
        {"LlavaImageProcessor", KIND_LLAVA}, {"LlavaProcessor", KIND_LLAVA},
        {"BlipImageProcessor", KIND_BLIP}, {"BlipProcessor", KIND_BLIP}, {"Blip2Processor", KIND_BLIP},
        {"Qwen2VLImageProcessor", KIND_QWEN2VL}, {"Qwen2VLProcessor", KIND_QWEN2VL},
        {"IdeficsImageProcessor", KIND_IDEFICS}, {"IdeficsProcessor", KIND_IDEFICS},
        {"MllamaImageProcessor", KIND_MLLAMA}, {"MllamaProcessor", KIND_MLLAMA},
        {"Emu3ImageProcessor", KIND_EMU3}, {"Emu3Processor", KIND_EMU3},
        {"ChameleonImageProcessor", KIND_CHAMELEON}, {"ChameleonProcessor", KIND_CHAMELEON},
        {"JanusImageProcessor", KIND_JANUS}, {"JanusProcessor", KIND_JANUS},
        {"LlavaNextImageProcessor", KIND_LLAVA_NEXT}, {"LlavaNextProcessor", KIND_LLAVA_NEXT},
        {"LlavaOnevisionImageProcessor", KIND_LLAVA_ONEVISION}, {"LlavaOnevisionProcessor", KIND_LLAVA_ONEVISION},
    };
    size_t n = strlen(type);
    if (n > 4 && !strcmp(type + n - 4, "Fast")) n -= 4;
    else if (n > 3 && !strcmp(type + n - 3, "Pil")) n -= 3;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strlen(names[i].name) == n && !strncmp(type, names[i].name, n)) {
            *k = names[i].k;
            return true;
        }
    return false;
}

static void pad_color_from_mean(mmb_preprocess *p) {
    /* tuple(int(x * 255) for x in image_mean): truncation toward zero, as Python's int(). */
    for (int c = 0; c < 3; c++) {
        double v = p->image_mean[c] * 255.0;
        long t = (long)v;
        p->pad_color[c] = (unsigned char)(t < 0 ? 0 : t > 255 ? 255 : t);
    }
}

static void defaults(proc_kind k, mmb_preprocess *p) {
    memset(p, 0, sizeof *p);
    static const char *names[] = {"CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor",
                                  "BlipImageProcessor", "Qwen2VLImageProcessor", "IdeficsImageProcessor",
                                  "MllamaImageProcessor", "Emu3ImageProcessor", "ChameleonImageProcessor",
                                  "JanusImageProcessor", "LlavaNextImageProcessor", "LlavaOnevisionImageProcessor"};
    snprintf(p->type, sizeof p->type, "%s", names[k]);
    p->do_convert_rgb = 1;
    p->do_resize = 1;
    p->resample = MMB_RESAMPLE_BICUBIC;
    p->do_rescale = 1;
    p->rescale_factor = 1.0 / 255.0;
    p->do_normalize = 1;
    if (k == KIND_QWEN2VL || k == KIND_EMU3) {
        /* Qwen2-VL: size {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}: pixel counts; factor 14 * 2.
         * Emu3: min_pixels 512 * 512, max_pixels 1024 * 1024, spatial_factor 8 (the same smart_resize) */
        p->size_mode = MMB_SIZE_SMART;
        p->min_pixels = k == KIND_EMU3 ? 512 * 512 : 56 * 56;
        p->max_pixels = k == KIND_EMU3 ? 1024 * 1024 : 28 * 28 * 1280;
        p->resize_factor = k == KIND_EMU3 ? 8 : 28;
        memcpy(p->image_mean, CLIP_MEAN, sizeof CLIP_MEAN);
        memcpy(p->image_std, CLIP_STD, sizeof CLIP_STD);
    } else if (k == KIND_MLLAMA) {
        /* MllamaImageProcessorPil: bilinear, size 224x224 (the tile), max_image_tiles 4, IMAGENET_STANDARD
         * mean and std (0.5); its do_pad is the tiles' padding, not LLaVA's square (p->do_pad stays 0) */
        p->size_mode = MMB_SIZE_TILES;
        p->size_height = p->size_width = p->tile_size = 224;
        p->max_image_tiles = 4;
        p->resample = MMB_RESAMPLE_BILINEAR;
        for (int c = 0; c < 3; c++) p->image_mean[c] = p->image_std[c] = 0.5;
    } else if (k == KIND_JANUS) {
        /* JanusImageProcessor: 384 x 384, CLIP's mean and std. Its resize (the longest side to 384, then a pad to
         * the square with the mean colour) is not this one's: the family reads it for postprocess alone */
        p->size_mode = MMB_SIZE_HEIGHT_WIDTH;
        p->size_height = p->size_width = 384;
        memcpy(p->image_mean, CLIP_MEAN, sizeof CLIP_MEAN);
        memcpy(p->image_std, CLIP_STD, sizeof CLIP_STD);
    } else if (k == KIND_SIGLIP) {
        p->size_mode = MMB_SIZE_HEIGHT_WIDTH;
        p->size_height = p->size_width = 224;
        for (int c = 0; c < 3; c++) p->image_mean[c] = p->image_std[c] = 0.5;
    } else if (k == KIND_BLIP || k == KIND_IDEFICS) {  /* a square (BLIP 384, IDEFICS 224), no crop, CLIP's mean, std */
        p->size_mode = MMB_SIZE_HEIGHT_WIDTH;
        p->size_height = p->size_width = k == KIND_BLIP ? 384 : 224;
        memcpy(p->image_mean, CLIP_MEAN, sizeof CLIP_MEAN);
        memcpy(p->image_std, CLIP_STD, sizeof CLIP_STD);
    } else {
        p->size_mode = MMB_SIZE_SHORTEST_EDGE;
        p->shortest_edge = 224;
        p->do_center_crop = 1;
        p->crop_height = p->crop_width = 224;
        memcpy(p->image_mean, CLIP_MEAN, sizeof CLIP_MEAN);
        memcpy(p->image_std, CLIP_STD, sizeof CLIP_STD);
    }
    if (k == KIND_LLAVA_NEXT) { /* LlavaNextImageProcessorPil: shortest_edge 224, crop 224, its 5 pinpoints */
        static const int pins[5][2] = {{336, 672}, {672, 336}, {672, 672}, {1008, 336}, {336, 1008}};
        p->n_pinpoints = 5;
        memcpy(p->pinpoints, pins, sizeof pins);
        p->tile_size = 224;
    } else if (k == KIND_LLAVA_ONEVISION) { /* 384 x 384, no crop, the 6 x 6 grid of 384 multiples */
        p->size_mode = MMB_SIZE_HEIGHT_WIDTH;
        p->size_height = p->size_width = p->tile_size = 384;
        p->do_center_crop = p->crop_height = p->crop_width = 0;
        p->n_pinpoints = 36;
        for (int i = 0; i < 36; i++) {
            p->pinpoints[i][0] = 384 * (1 + i / 6);
            p->pinpoints[i][1] = 384 * (1 + i % 6);
        }
    }
    if (k == KIND_CHAMELEON) { /* CLIP's steps: shortest edge 512, crop 512, Lanczos, * 0.0078, mean = std = 1 */
        p->shortest_edge = p->crop_height = p->crop_width = 512;
        p->resample = MMB_RESAMPLE_LANCZOS;
        p->rescale_factor = 0.0078;
        for (int c = 0; c < 3; c++) p->image_mean[c] = p->image_std[c] = 1.0;
    }
    pad_color_from_mean(p);
}

mmb_status mmb_preprocess_init(mmb_ctx *ctx, const char *type, mmb_preprocess *out) {
    if (!type || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_preprocess_init: NULL argument");
    proc_kind k;
    if (!kind_of(type, &k))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "image processor '%s' is not supported (" SUPPORTED_CLASSES ")",
                        type);
    defaults(k, out);
    /* AnyRes: the class's tiles (the per-patch resize and crop are to the tile's size in both defaults) */
    if (k == KIND_LLAVA_NEXT || k == KIND_LLAVA_ONEVISION) out->size_mode = MMB_SIZE_ANYRES;
    return MMB_OK;
}

/* ---- preprocessor_config.json ------------------------------------------------------------------ */

static const cJSON *get(const cJSON *o, const char *key) {
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(o, key);
    return (!j || cJSON_IsNull(j)) ? NULL : j;
}

/* A JSON number that is an integer in [lo, hi]. */
static bool as_int(const cJSON *j, long lo, long hi, int *out) {
    if (!cJSON_IsNumber(j)) return false;
    double d = j->valuedouble;
    if (!(d >= (double)lo && d <= (double)hi) || d != floor(d)) return false;
    *out = (int)d;
    return true;
}

static mmb_status get_bool(mmb_ctx *ctx, const char *file, const cJSON *o, const char *key, int *out) {
    const cJSON *j = get(o, key);
    if (!j) return MMB_OK;
    if (cJSON_IsBool(j)) *out = cJSON_IsTrue(j);
    else if (cJSON_IsNumber(j)) *out = j->valuedouble != 0;  /* Python truthiness */
    else return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' is not a boolean", file, key);
    return MMB_OK;
}

/* Reads a size value as get_size_dict does: a dict with one of the valid key sets, an int
 * (square, or shortest_edge when default_to_square is false), or [height, width]. Sets *mode and
 * the fields; *is_hw tells whether it is a height/width pair (what crop_size needs). */
typedef struct size_val {
    int mode; /* mmb_size_mode, or -1 for a valid but unimplemented key set */
    int height, width, shortest, longest;
    char keys[64];
} size_val;

static mmb_status parse_size(mmb_ctx *ctx, const char *file, const char *key, const cJSON *j, bool square,
                             size_val *v) {
    memset(v, 0, sizeof *v);
    int n;
    if (cJSON_IsNumber(j)) {
        if (!as_int(j, 1, INT32_MAX, &n))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' is not a positive integer", file, key);
        if (square) { v->mode = MMB_SIZE_HEIGHT_WIDTH; v->height = v->width = n; }
        else { v->mode = MMB_SIZE_SHORTEST_EDGE; v->shortest = n; }
        return MMB_OK;
    }
    if (cJSON_IsArray(j)) {
        if (cJSON_GetArraySize(j) != 2 || !as_int(cJSON_GetArrayItem(j, 0), 1, INT32_MAX, &v->height) ||
            !as_int(cJSON_GetArrayItem(j, 1), 1, INT32_MAX, &v->width))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' is a list but not [height, width]", file, key);
        v->mode = MMB_SIZE_HEIGHT_WIDTH;
        return MMB_OK;
    }
    if (!cJSON_IsObject(j))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' is not an integer, a list or an object", file, key);
    unsigned have = 0;
    static const char *names[] = {"height", "width", "shortest_edge", "longest_edge", "max_height", "max_width",
                                  "min_pixels", "max_pixels"};
    int vals[8] = {0};
    for (const cJSON *e = j->child; e; e = e->next) {
        int i = 0;
        while (i < 8 && strcmp(e->string, names[i])) i++;
        if (i == 8)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' has an unknown entry '%s'", file, key, e->string);
        if (!as_int(e, 1, INT32_MAX, &vals[i]))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s.%s' is not a positive integer", file, key, e->string);
        have |= 1u << i;
        size_t l = strlen(v->keys);
        snprintf(v->keys + l, sizeof v->keys - l, "%s%s", l ? ", " : "", e->string);
    }
    v->height = vals[0]; v->width = vals[1]; v->shortest = vals[2]; v->longest = vals[3];
    switch (have) {
    case 0x3: v->mode = MMB_SIZE_HEIGHT_WIDTH; break;
    case 0x4: v->mode = MMB_SIZE_SHORTEST_EDGE; break;
    case 0xC: v->mode = MMB_SIZE_SHORTEST_LONGEST; break;
    case 0x30: v->mode = MMB_SIZE_MAX_HEIGHT_WIDTH; v->height = vals[4]; v->width = vals[5]; break;
    case 0x8: case 0xC0: v->mode = -1; break;
    default:
        return mmb__err(ctx, MMB_ERR_FORMAT,
                        "%s: key '%s' has keys {%s}; expected {height, width}, {shortest_edge}, "
                        "{shortest_edge, longest_edge}, {longest_edge}, {max_height, max_width} or "
                        "{min_pixels, max_pixels}", file, key, v->keys);
    }
    return MMB_OK;
}

static mmb_status get_triple(mmb_ctx *ctx, const char *file, const cJSON *o, const char *key, double out[3]) {
    const cJSON *j = get(o, key);
    if (!j) return MMB_OK;
    double v[3];
    if (cJSON_IsNumber(j)) {
        v[0] = v[1] = v[2] = j->valuedouble;
    } else if (cJSON_IsArray(j) && cJSON_GetArraySize(j) == 3) {
        for (int c = 0; c < 3; c++) {
            const cJSON *e = cJSON_GetArrayItem(j, c);
            if (!cJSON_IsNumber(e))
                return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' has a non-number entry", file, key);
            v[c] = e->valuedouble;
        }
    } else {
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' is not a number or a list of 3 numbers", file, key);
    }
    memcpy(out, v, sizeof v);
    return MMB_OK;
}

/* Qwen2VLImageProcessor's size: {shortest_edge: min pixels, longest_edge: max pixels} (the class's when
 * absent), each overridden by a top-level min_pixels / max_pixels key as its __init__ does; its resize
 * needs both. The resize factor is patch_size * merge_size. */
static mmb_status parse_smart(mmb_ctx *ctx, const char *file, const cJSON *o, bool emu3, mmb_preprocess *p) {
    const cJSON *j = emu3 ? NULL : get(o, "size"); /* Emu3's size {min_pixels, max_pixels} repeats its keys */
    if (j && !cJSON_IsObject(j))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key 'size' is not an object {shortest_edge, longest_edge}", file);
    if (j) p->min_pixels = p->max_pixels = 0;
    for (const cJSON *e = j ? j->child : NULL; e; e = e->next) {
        int *dst = !strcmp(e->string, "shortest_edge") ? &p->min_pixels
                 : !strcmp(e->string, "longest_edge") ? &p->max_pixels : NULL;
        if (dst && !cJSON_IsNull(e) && !as_int(e, 1, INT32_MAX, dst))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key 'size.%s' is not a positive integer", file, e->string);
    }
    int patch = emu3 ? p->resize_factor : 14, merge = emu3 ? 1 : 2; /* Emu3: spatial_factor, read as the patch */
    const char *const keys[] = {"min_pixels", "max_pixels", emu3 ? "spatial_factor" : "patch_size", "merge_size"};
    int *dst[] = {&p->min_pixels, &p->max_pixels, &patch, &merge};
    for (int i = 0; i < (emu3 ? 3 : 4); i++)
        if ((j = get(o, keys[i])) && !as_int(j, 1, i < 2 ? INT32_MAX : 4096, dst[i]))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' is not a positive integer%s", file, keys[i],
                            i < 2 ? "" : " up to 4096");
    if (p->do_resize && (!p->min_pixels || !p->max_pixels))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: size must have shortest_edge and longest_edge (or give the "
                        "min_pixels and max_pixels keys)", file);
    p->resize_factor = patch * merge;
    return MMB_OK;
}

/* MllamaImageProcessor, after the common keys: size must be {height, width} with height == width (the tile:
 * _validate_size), max_image_tiles a positive integer, do_pad and do_resize true
 * (_validate_mllama_preprocess_arguments refuses False). */
static mmb_status parse_tiles(mmb_ctx *ctx, const char *file, const cJSON *o, int do_pad, mmb_preprocess *p) {
    if (!do_pad || !p->do_resize)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: MllamaImageProcessor with do_%s false is not supported (its "
                        "class refuses it too)", file, !do_pad ? "pad" : "resize");
    if ((p->size_mode != MMB_SIZE_HEIGHT_WIDTH && p->size_mode != MMB_SIZE_TILES) || p->size_height != p->size_width)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: MllamaImageProcessor's size must be {height, width} with height == "
                        "width (the tile), got %s %dx%d", file,
                        p->size_mode == MMB_SIZE_HEIGHT_WIDTH ? "height x width" : "another kind of size",
                        p->size_height, p->size_width);
    const cJSON *j = get(o, "max_image_tiles");
    if (j && !as_int(j, 1, MAX_IMAGE_TILES, &p->max_image_tiles))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key 'max_image_tiles' is not an integer in 1..%d", file,
                        MAX_IMAGE_TILES);
    p->size_mode = MMB_SIZE_TILES;
    p->tile_size = p->size_height;
    return MMB_OK;
}

/* LlavaNext / LlavaOnevision, after the common keys: the tile (patch_size: crop_size's height, else size's
 * height, else shortest_edge), image_grid_pinpoints ([[height, width], ...], each side a positive multiple of the
 * tile: divide_to_patches would cut partial tiles otherwise), and a per-patch resize and crop that keep a tile as
 * it is (the base image is resized to size's (height, width), or (shortest_edge, shortest_edge)). */
static mmb_status parse_anyres(mmb_ctx *ctx, const char *file, const cJSON *o, mmb_preprocess *p) {
    int t = p->crop_height > 0 ? p->crop_height
          : p->size_mode == MMB_SIZE_HEIGHT_WIDTH ? p->size_height : p->shortest_edge;
    if (p->size_mode != MMB_SIZE_HEIGHT_WIDTH && p->size_mode != MMB_SIZE_SHORTEST_EDGE)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: %s's size must be {height, width} or {shortest_edge}", file,
                        p->type);
    const int bh = p->size_mode == MMB_SIZE_HEIGHT_WIDTH ? p->size_height : p->shortest_edge;
    const int bw = p->size_mode == MMB_SIZE_HEIGHT_WIDTH ? p->size_width : p->shortest_edge;
    if (t < 1 || bh != t || bw != t || !p->do_resize ||
        (p->do_center_crop && (p->crop_height != t || p->crop_width != t)))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: %s with a tile of %d, a base image of %dx%d%s is not "
                        "supported (the tile, size and crop_size must agree, do_resize true)", file, p->type, t, bw,
                        bh, p->do_center_crop ? " and a crop" : "");
    p->tile_size = t;
    const cJSON *g = get(o, "image_grid_pinpoints");
    if (g) {
        int n = cJSON_GetArraySize(g);
        if (!cJSON_IsArray(g) || n < 1 || n > MMB_MAX_PINPOINTS)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key 'image_grid_pinpoints' is not a list of 1..%d "
                            "[height, width] pairs", file, MMB_MAX_PINPOINTS);
        int i = 0;
        for (const cJSON *e = g->child; e; e = e->next, i++) {
            if (!cJSON_IsArray(e) || cJSON_GetArraySize(e) != 2 || !as_int(e->child, 1, 1 << 16, &p->pinpoints[i][0]) ||
                !as_int(e->child->next, 1, 1 << 16, &p->pinpoints[i][1]))
                return mmb__err(ctx, MMB_ERR_FORMAT, "%s: image_grid_pinpoints[%d] is not a [height, width] pair of "
                                "integers in 1..65536", file, i);
        }
        p->n_pinpoints = n;
    }
    for (int i = 0; i < p->n_pinpoints; i++)
        if (p->pinpoints[i][0] % t || p->pinpoints[i][1] % t)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: image_grid_pinpoints[%d] = [%d, %d] does not divide into tiles "
                            "of the patch size %d", file, i, p->pinpoints[i][0], p->pinpoints[i][1], t);
    p->size_mode = MMB_SIZE_ANYRES;
    return MMB_OK;
}

static mmb_status parse_config(mmb_ctx *ctx, const char *file, const cJSON *o, mmb_preprocess *p) {
    if (!cJSON_IsObject(o)) return mmb__err(ctx, MMB_ERR_FORMAT, "%s: not a JSON object", file);
    const char *type = NULL;
    static const char *type_keys[] = {"image_processor_type", "processor_class", "feature_extractor_type"};
    for (int i = 0; i < 3 && !type; i++) {
        const cJSON *t = get(o, type_keys[i]);
        if (t && !cJSON_IsString(t))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' is not a string", file, type_keys[i]);
        if (t) type = t->valuestring;
    }
    if (!type)
        return mmb__err(ctx, MMB_ERR_MISSING,
                        "%s: no image_processor_type, processor_class or feature_extractor_type key", file);
    proc_kind kind;
    if (!kind_of(type, &kind))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: image processor '%s' is not supported (" SUPPORTED_CLASSES ")",
                        file, type);
    defaults(kind, p);
    mmb_status st;
    /* the class's default_to_square: False for CLIP, SigLIP, LLaVA */
    int dts = kind == KIND_BLIP || kind == KIND_IDEFICS || kind == KIND_MLLAMA;
    if ((st = get_bool(ctx, file, o, "default_to_square", &dts)) != MMB_OK) return st;
    if ((st = get_bool(ctx, file, o, "do_convert_rgb", &p->do_convert_rgb)) != MMB_OK) return st;
    if ((st = get_bool(ctx, file, o, "do_resize", &p->do_resize)) != MMB_OK) return st;
    if ((st = get_bool(ctx, file, o, "do_center_crop", &p->do_center_crop)) != MMB_OK) return st;
    if ((st = get_bool(ctx, file, o, "do_rescale", &p->do_rescale)) != MMB_OK) return st;
    if ((st = get_bool(ctx, file, o, "do_normalize", &p->do_normalize)) != MMB_OK) return st;
    if (kind == KIND_QWEN2VL || kind == KIND_MLLAMA || kind == KIND_EMU3)
        p->do_center_crop = 0; /* their _preprocess has no crop step */
    int do_pad = kind == KIND_MLLAMA ? 1 : p->do_pad; /* MllamaImageProcessor: do_pad True (the tiles) */
    if ((st = get_bool(ctx, file, o, "do_pad", &do_pad)) != MMB_OK) return st;
    const cJSON *j;
    if (kind == KIND_EMU3) do_pad = 0; /* its do_pad pads a batch to its largest image, not LLaVA's square */
    if (kind == KIND_QWEN2VL || kind == KIND_EMU3) {
        if ((st = parse_smart(ctx, file, o, kind == KIND_EMU3, p)) != MMB_OK) return st;
    } else if ((j = get(o, "size"))) {
        size_val v;
        if ((st = parse_size(ctx, file, "size", j, dts != 0, &v)) != MMB_OK) return st;
        if (v.mode < 0) {
            if (p->do_resize)
                return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: size {%s} is not supported by the %s's resize",
                                file, v.keys, p->type);
        } else {
            p->size_mode = (mmb_size_mode)v.mode;
            p->size_height = v.height;
            p->size_width = v.width;
            p->shortest_edge = v.shortest;
            p->longest_edge = v.longest;
        }
    }
    if ((j = get(o, "crop_size"))) {
        size_val v;
        if ((st = parse_size(ctx, file, "crop_size", j, true, &v)) != MMB_OK) return st;
        if (v.mode != MMB_SIZE_HEIGHT_WIDTH) {
            if (p->do_center_crop)
                return mmb__err(ctx, MMB_ERR_FORMAT, "%s: crop_size must have height and width, got {%s}", file,
                                v.keys);
        } else {
            p->crop_height = v.height;
            p->crop_width = v.width;
        }
    }
    if (kind == KIND_IDEFICS && (j = get(o, "image_size"))) {  /* IDEFICS' alias, overriding size */
        int n;
        if (!as_int(j, 1, INT32_MAX, &n))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key 'image_size' is not a positive integer", file);
        p->size_mode = MMB_SIZE_HEIGHT_WIDTH;
        p->size_height = p->size_width = n;
    }
    if (p->do_center_crop && (p->crop_height <= 0 || p->crop_width <= 0))
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: do_center_crop is set but crop_size is missing", file);
    if ((j = get(o, "resample"))) {
        int r;
        if (!as_int(j, 0, 5, &r))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key 'resample' is not a PIL filter number (0-5)", file);
        p->resample = (mmb_resample)r;
    }
    if (p->do_resize && p->resample == MMB_RESAMPLE_NEAREST)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: resample 0 (nearest) is not supported", file);
    if ((j = get(o, "rescale_factor"))) {
        if (!cJSON_IsNumber(j))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: key 'rescale_factor' is not a number", file);
        p->rescale_factor = j->valuedouble;
    }
    if ((st = get_triple(ctx, file, o, "image_mean", p->image_mean)) != MMB_OK) return st;
    if ((st = get_triple(ctx, file, o, "image_std", p->image_std)) != MMB_OK) return st;
    pad_color_from_mean(p);
    if (kind == KIND_MLLAMA) {
        if ((st = parse_tiles(ctx, file, o, do_pad, p)) != MMB_OK) return st;
    } else if (kind == KIND_LLAVA_NEXT || kind == KIND_LLAVA_ONEVISION) {
        if ((st = parse_anyres(ctx, file, o, p)) != MMB_OK) return st;
    } else if (kind == KIND_LLAVA) {
        p->do_pad = do_pad;
    } else if (do_pad && get(o, "pad_size")) {
        /* PilBackend pads the normalized batch to pad_size; for one image without pad_size it is a no-op. */
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: do_pad with pad_size is not supported for %s", file, p->type);
    }
    return MMB_OK;
}

mmb_status mmb_preprocess_load(mmb_ctx *ctx, const char *model_dir, mmb_preprocess *out) {
    if (!model_dir || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_preprocess_load: NULL argument");
    char path[4096], where[4160];
    if ((size_t)snprintf(path, sizeof path, "%s/preprocessor_config.json", model_dir) >= sizeof path)
        return mmb__err(ctx, MMB_ERR_ARG, "%s: path too long", model_dir);
    /* Without preprocessor_config.json, the image processor nested in processor_config.json, as transformers
     * 5's ProcessorMixin.save_pretrained writes it (its top level is the processor's: processor_class
     * "LlavaProcessor", patch_size, image_token, ...). */
    const char *nest = NULL;
    if (access(path, F_OK) != 0) {
        int e = errno;
        snprintf(path, sizeof path, "%s/processor_config.json", model_dir);
        if (access(path, F_OK) != 0)
            return mmb__err(ctx, MMB_ERR_IO, "%s/preprocessor_config.json: cannot open: %s (and there is no "
                            "processor_config.json)", model_dir, strerror(e));
        nest = "image_processor";
    }
    cJSON *root = NULL;
    mmb_status st = mmb__json_read(ctx, path, &root);
    if (st != MMB_OK) return st;
    const cJSON *o = nest ? get(root, nest) : root;
    snprintf(where, sizeof where, "%s%s", path, nest ? " (image_processor)" : "");
    mmb_preprocess p;
    if (!o)
        st = mmb__err(ctx, MMB_ERR_MISSING, "%s: no '%s' object (the image processor) and no "
                      "preprocessor_config.json beside it", path, nest);
    else
        st = parse_config(ctx, where, o, &p);
    cJSON_Delete(root);
    if (st == MMB_OK) *out = p;
    return st;
}

/* ---- sizes ----------------------------------------------------------------------------------- */

static mmb_status fits(mmb_ctx *ctx, const char *what, double h, double w, int *oh, int *ow) {
    if (!(h >= 1 && w >= 1 && h <= INT32_MAX && w <= INT32_MAX))
        return mmb__err(ctx, MMB_ERR_SHAPE, "preprocess: %s gives a %gx%g image", what, h, w);
    *oh = (int)h;
    *ow = (int)w;
    return MMB_OK;
}

/* MllamaImageProcessor's canvas for an image of h x w: get_optimal_tiled_canvas over the arrangements
 * (rows, cols) with rows * cols <= max_tiles in get_all_supported_aspect_ratios' order (rows outer, cols
 * inner). Each canvas's scale is min(rows t / h, cols t / w) in float64, as numpy divides; the smallest
 * scale >= 1 if any (upscaling), else the largest; among canvases of exactly that scale the first of the
 * smallest area (np.argmin). */
static void tiles_canvas(int h, int w, int max_tiles, int t, int *rows, int *cols) {
    double best = 0;
    bool up = false, have = false;
    int64_t area = 0;
    for (int r = 1; r <= max_tiles; r++)
        for (int c = 1; r * c <= max_tiles; c++) {
            const double sh = (double)((int64_t)r * t) / h, sw = (double)((int64_t)c * t) / w;
            const double sc = sw > sh ? sh : sw;
            const bool u = sc >= 1;
            const int64_t a = (int64_t)r * t * ((int64_t)c * t);
            /* a better scale: any upscaling beats every downscaling; then the smaller upscale or the larger
             * downscale; an equal scale only for a smaller area */
            bool take = !have || (u && !up) ||
                        (u == up && (u ? sc < best : sc > best)) || (u == up && sc == best && a < area);
            if (take) {
                best = sc;
                up = u;
                area = a;
                have = true;
                *rows = r;
                *cols = c;
            }
        }
}

/* get_image_size_fit_to_canvas: the size the image is resized to inside a ch x cw canvas of tiles of t. */
static void tiles_fit(int h, int w, int ch, int cw, int t, int *oh, int *ow) {
    const int tw = w < t ? t : w > cw ? cw : w, th = h < t ? t : h > ch ? ch : h;  /* np.clip(side, t, canvas) */
    const double sh = (double)th / h, sw = (double)tw / w;
    if (sw < sh) {
        double nh = floor((double)h * sw);
        *ow = tw;
        *oh = nh < 1 ? 1 : nh > th ? th : (int)nh;  /* min(floor(...) or 1, target_height) */
    } else {
        double nw = floor((double)w * sh);
        *oh = th;
        *ow = nw < 1 ? 1 : nw > tw ? tw : (int)nw;
    }
}

static mmb_status check_tiles(mmb_ctx *ctx, const mmb_preprocess *p) {
    if (p->tile_size < 1 || p->max_image_tiles < 1 || p->max_image_tiles > MAX_IMAGE_TILES ||
        (int64_t)p->tile_size * p->max_image_tiles > INT32_MAX)
        return mmb__err(ctx, MMB_ERR_ARG, "preprocess: tiles need tile_size >= 1 and max_image_tiles in 1..%d "
                        "(their product within INT32_MAX), got %d and %d", MAX_IMAGE_TILES, p->tile_size,
                        p->max_image_tiles);
    return MMB_OK;
}

/* The size the resize step produces from h x w (after padding), as PilBackend.resize computes it. */
static mmb_status resize_size(mmb_ctx *ctx, const mmb_preprocess *p, int h, int w, int *oh, int *ow) {
    switch (p->size_mode) {
    case MMB_SIZE_ANYRES: /* plan() sizes it before any resize */
        return mmb__err(ctx, MMB_ERR_ARG, "preprocess: AnyRes is sized by its tiles");
    case MMB_SIZE_HEIGHT_WIDTH:
        return fits(ctx, "size {height, width}", p->size_height, p->size_width, oh, ow);
    case MMB_SIZE_SHORTEST_EDGE: {
        /* get_resize_output_image_size(default_to_square=False): int(S * long / short). */
        const int64_t s = p->shortest_edge, sh = w <= h ? w : h, lo = w <= h ? h : w;
        const double nl = trunc((double)(s * lo) / (double)sh);
        return w <= h ? fits(ctx, "size {shortest_edge}", nl, (double)s, oh, ow)
                      : fits(ctx, "size {shortest_edge}", (double)s, nl, oh, ow);
    }
    case MMB_SIZE_SHORTEST_LONGEST: {
        /* get_size_with_aspect_ratio((h, w), shortest_edge, longest_edge) */
        int64_t size = p->shortest_edge;
        const int64_t mx = p->longest_edge;
        double raw = -1;
        const double mn_o = h < w ? h : w, mx_o = h < w ? w : h;
        if (mx_o / mn_o * (double)size > (double)mx) {
            raw = (double)mx * mn_o / mx_o;
            size = (int64_t)nearbyint(raw); /* Python round(): half to even */
        }
        double rh, rw;
        if ((h <= w && h == size) || (w <= h && w == size)) { rh = h; rw = w; }
        else if (w < h) { rw = (double)size; rh = raw >= 0 ? trunc(raw * h / w) : trunc((double)(size * h) / w); }
        else { rh = (double)size; rw = raw >= 0 ? trunc(raw * w / h) : trunc((double)(size * w) / h); }
        return fits(ctx, "size {shortest_edge, longest_edge}", rh, rw, oh, ow);
    }
    case MMB_SIZE_MAX_HEIGHT_WIDTH: {
        const double hs = (double)p->size_height / h, ws = (double)p->size_width / w;
        const double m = hs < ws ? hs : ws;
        return fits(ctx, "size {max_height, max_width}", trunc(h * m), trunc(w * m), oh, ow);
    }
    case MMB_SIZE_SMART: {
        /* smart_resize(h, w, factor, min_pixels, max_pixels): Python's round() is half to even. */
        const double f = p->resize_factor, hw = (double)h * (double)w;
        if (f < 1 || p->min_pixels < 1 || p->max_pixels < 1)
            return mmb__err(ctx, MMB_ERR_ARG, "preprocess: smart resize needs resize_factor, min_pixels and "
                            "max_pixels >= 1");
        if ((double)(h > w ? h : w) / (double)(h < w ? h : w) > 200)
            return mmb__err(ctx, MMB_ERR_SHAPE, "preprocess: a %dx%d image: Qwen2-VL's smart resize needs an aspect "
                            "ratio of at most 200", w, h);
        double rh = nearbyint(h / f) * f, rw = nearbyint(w / f) * f;
        if (rh * rw > p->max_pixels) {
            const double beta = sqrt(hw / p->max_pixels);
            rh = fmax(f, floor(h / beta / f) * f);
            rw = fmax(f, floor(w / beta / f) * f);
        } else if (rh * rw < p->min_pixels) {
            const double beta = sqrt(p->min_pixels / hw);
            rh = ceil(h * beta / f) * f;
            rw = ceil(w * beta / f) * f;
        }
        return fits(ctx, "smart resize", rh, rw, oh, ow);
    }
    case MMB_SIZE_TILES: {
        mmb_status st = check_tiles(ctx, p);
        if (st != MMB_OK) return st;
        int rows, cols;
        tiles_canvas(h, w, p->max_image_tiles, p->tile_size, &rows, &cols);
        tiles_fit(h, w, rows * p->tile_size, cols * p->tile_size, p->tile_size, oh, ow);
        return MMB_OK;
    }
    }
    return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "preprocess: unknown size mode %d", (int)p->size_mode);
}

/* The resampling filters of libImaging/Resample.c, with their supports. */
typedef struct filter { double (*fn)(double); double support; } filter;

static double f_box(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }
static double f_bilinear(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}
static double f_hamming(double x) {
    if (x < 0.0) x = -x;
    if (x == 0.0) return 1.0;
    if (x >= 1.0) return 0.0;
    x = x * M_PI;
    return sin(x) / x * (0.54f + 0.46f * cos(x));
}
static double f_bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}
static double sinc(double x) {
    if (x == 0.0) return 1.0;
    x = x * M_PI;
    return sin(x) / x;
}
static double f_lanczos(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

static bool filter_of(mmb_resample r, filter *f) {
    switch (r) {
    case MMB_RESAMPLE_BOX: *f = (filter){f_box, 0.5}; return true;
    case MMB_RESAMPLE_BILINEAR: *f = (filter){f_bilinear, 1.0}; return true;
    case MMB_RESAMPLE_HAMMING: *f = (filter){f_hamming, 1.0}; return true;
    case MMB_RESAMPLE_BICUBIC: *f = (filter){f_bicubic, 2.0}; return true;
    case MMB_RESAMPLE_LANCZOS: *f = (filter){f_lanczos, 3.0}; return true;
    default: return false;
    }
}

static mmb_status check_params(mmb_ctx *ctx, const mmb_preprocess *p) {
    filter f;
    if (p->do_resize && !filter_of(p->resample, &f))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "preprocess: resample filter %d is not supported "
                        "(1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming are)", (int)p->resample);
    if (p->do_center_crop && (p->crop_height < 1 || p->crop_width < 1))
        return mmb__err(ctx, MMB_ERR_SHAPE, "preprocess: crop size %dx%d", p->crop_height, p->crop_width);
    return MMB_OK;
}

/* The most pixels any one buffer of the preprocessor may hold (the padded, the resized and the output
 * image): 2^26 = 8192 x 8192, so the f32 output is at most 768 MiB. Far above any processor's real sizes
 * (Qwen2-VL's max_pixels is about 1M, Mllama's canvas 4 tiles of 560^2); a config that asks for more
 * (a size of 2^30) is refused before anything is allocated. */
#define MAX_PIXELS ((int64_t)1 << 26)

static mmb_status check_pixels(mmb_ctx *ctx, const char *what, int64_t h, int64_t w) {
    if (h > MAX_PIXELS || w > MAX_PIXELS || h * w > MAX_PIXELS)
        return mmb__err(ctx, MMB_ERR_SHAPE, "preprocess: the %s image would be %lldx%lld, more than the limit of "
                        "%lld pixels", what, (long long)h, (long long)w, (long long)MAX_PIXELS);
    return MMB_OK;
}

/* Sizes after each step for an image of h x w; each at most MAX_PIXELS pixels, else MMB_ERR_SHAPE. */
static mmb_status plan(mmb_ctx *ctx, const mmb_preprocess *p, int h, int w, int *ph, int *pw, int *rh, int *rw,
                       int *oh, int *ow) {
    mmb_status st = check_params(ctx, p);
    if (st != MMB_OK) return st;
    if (p->size_mode == MMB_SIZE_ANYRES) { /* (1 + tiles) tiles stacked; the canvas within the pixel limit */
        int bh = 0, bw = 0;
        if ((st = mmb__anyres_grid(ctx, p, h, w, &bh, &bw)) != MMB_OK) return st;
        if ((st = check_pixels(ctx, "AnyRes canvas", bh, bw)) != MMB_OK) return st;
        const int64_t n = 1 + (int64_t)(bh / p->tile_size) * (bw / p->tile_size);
        if ((st = check_pixels(ctx, "AnyRes tiles", n * p->tile_size, p->tile_size)) != MMB_OK) return st;
        *ph = *rh = *oh = (int)(n * p->tile_size);
        *pw = *rw = *ow = p->tile_size;
        return MMB_OK;
    }
    *ph = h; *pw = w;
    if (p->do_pad) *ph = *pw = h > w ? h : w;
    if ((st = check_pixels(ctx, "padded", *ph, *pw)) != MMB_OK) return st;
    *rh = *ph; *rw = *pw;
    if (p->do_resize && (st = resize_size(ctx, p, *ph, *pw, rh, rw)) != MMB_OK) return st;
    if ((st = check_pixels(ctx, "resized", *rh, *rw)) != MMB_OK) return st;
    *oh = *rh; *ow = *rw;
    if (p->do_center_crop) { *oh = p->crop_height; *ow = p->crop_width; }
    if ((st = check_pixels(ctx, "output", *oh, *ow)) != MMB_OK) return st;
    if (p->size_mode == MMB_SIZE_TILES) {  /* the canvas the resized image is padded to */
        if (!p->do_resize || p->do_pad || p->do_center_crop)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "preprocess: tiles (MMB_SIZE_TILES) go with do_resize and "
                            "without do_pad (a square) or do_center_crop");
        int rows, cols;
        tiles_canvas(h, w, p->max_image_tiles, p->tile_size, &rows, &cols);
        if ((st = check_pixels(ctx, "tiled", (int64_t)rows * p->tile_size, (int64_t)cols * p->tile_size)) != MMB_OK)
            return st;
        *oh = rows * p->tile_size;
        *ow = cols * p->tile_size;
    }
    return MMB_OK;
}

mmb_status mmb_preprocess_output_size(mmb_ctx *ctx, const mmb_preprocess *p, int in_height, int in_width,
                                      int *out_height, int *out_width) {
    if (!p || !out_height || !out_width) return mmb__err(ctx, MMB_ERR_ARG, "mmb_preprocess_output_size: NULL argument");
    if (in_height < 1 || in_width < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_preprocess_output_size: image size %dx%d", in_height, in_width);
    int ph, pw, rh, rw, oh, ow;
    mmb_status st = plan(ctx, p, in_height, in_width, &ph, &pw, &rh, &rw, &oh, &ow);
    if (st != MMB_OK) return st;
    *out_height = oh;
    *out_width = ow;
    return MMB_OK;
}

/* ---- Pillow's 8-bit resampling ------------------------------------------------------------------ */

#define PRECISION_BITS (32 - 8 - 2)

typedef struct coeffs {
    int ksize;
    int *bounds;   /* per output pixel: first input index, count */
    int32_t *kk;   /* per output pixel: ksize fixed-point weights */
} coeffs;

static void coeffs_free(coeffs *c) { free(c->bounds); free(c->kk); }

/* precompute_coeffs + normalize_coeffs_8bpc for in_size -> out_size over the whole input. */
static bool coeffs_make(int in_size, int out_size, const filter *f, coeffs *c) {
    double scale = (double)in_size / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = f->support * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    c->ksize = ksize;
    c->bounds = malloc((size_t)out_size * 2 * sizeof(int));
    c->kk = malloc((size_t)out_size * (size_t)ksize * sizeof(int32_t));
    double *k = malloc((size_t)ksize * sizeof(double));
    if (!c->bounds || !c->kk || !k) { free(k); coeffs_free(c); return false; }
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        int x;
        for (x = 0; x < xmax; x++) {
            double wgt = f->fn((x + xmin - center + 0.5) * ss);
            k[x] = wgt;
            ww += wgt;
        }
        for (x = 0; x < xmax; x++)
            if (ww != 0.0) k[x] /= ww;
        for (; x < ksize; x++) k[x] = 0;
        int32_t *ki = c->kk + (size_t)xx * ksize;
        for (x = 0; x < ksize; x++)
            ki[x] = k[x] < 0 ? (int32_t)(-0.5 + k[x] * (1 << PRECISION_BITS))
                             : (int32_t)(0.5 + k[x] * (1 << PRECISION_BITS));
        c->bounds[2 * xx] = xmin;
        c->bounds[2 * xx + 1] = xmax;
    }
    free(k);
    return true;
}

static inline unsigned char clip8(int32_t v) {
    if (v >= (1 << PRECISION_BITS << 8)) return 255;
    if (v <= 0) return 0;
    return (unsigned char)(v >> PRECISION_BITS);
}

typedef struct resample_job {
    const unsigned char *in;
    unsigned char *out;
    int in_w, out_w, rows, row_offset;
    const coeffs *c;
} resample_job;

/* out rows [0, rows) of width out_w <- in rows [row_offset, row_offset + rows) of width in_w. */
static void horiz_fn(void *arg, int tid, int nth) {
    const resample_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->rows, tid, nth, &lo, &hi);
    for (int64_t y = lo; y < hi; y++) {
        const unsigned char *src = j->in + (size_t)(y + j->row_offset) * j->in_w * 3;
        unsigned char *dst = j->out + (size_t)y * j->out_w * 3;
        for (int xx = 0; xx < j->out_w; xx++) {
            const int xmin = j->c->bounds[2 * xx], xmax = j->c->bounds[2 * xx + 1];
            const int32_t *k = j->c->kk + (size_t)xx * j->c->ksize;
            int32_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
            const unsigned char *p = src + (size_t)xmin * 3;
            for (int x = 0; x < xmax; x++) {
                s0 += p[3 * x] * k[x];
                s1 += p[3 * x + 1] * k[x];
                s2 += p[3 * x + 2] * k[x];
            }
            dst[3 * xx] = clip8(s0);
            dst[3 * xx + 1] = clip8(s1);
            dst[3 * xx + 2] = clip8(s2);
        }
    }
}

/* out rows [0, rows) <- in rows by the vertical coefficients, bounds shifted by -row_offset. */
static void vert_fn(void *arg, int tid, int nth) {
    const resample_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->rows, tid, nth, &lo, &hi);
    const size_t stride = (size_t)j->in_w * 3;
    /* Row-wise accumulation (contiguous reads); integer sums, so the result is the same as
     * Pillow's per-pixel loop. */
    int32_t *acc = malloc(stride * sizeof(int32_t));
    for (int64_t yy = lo; yy < hi; yy++) {
        const int ymin = j->c->bounds[2 * yy] - j->row_offset, ymax = j->c->bounds[2 * yy + 1];
        const int32_t *k = j->c->kk + (size_t)yy * j->c->ksize;
        unsigned char *dst = j->out + (size_t)yy * stride;
        if (acc) {
            for (size_t x = 0; x < stride; x++) acc[x] = 1 << (PRECISION_BITS - 1);
            for (int y = 0; y < ymax; y++) {
                const unsigned char *row = j->in + (size_t)(ymin + y) * stride;
                const int32_t ky = k[y];
                for (size_t x = 0; x < stride; x++) acc[x] += row[x] * ky;
            }
            for (size_t x = 0; x < stride; x++) dst[x] = clip8(acc[x]);
            continue;
        }
        for (size_t x = 0; x < stride; x++) {
            int32_t s = 1 << (PRECISION_BITS - 1);
            const unsigned char *p = j->in + (size_t)ymin * stride + x;
            for (int y = 0; y < ymax; y++) s += p[(size_t)y * stride] * k[y];
            dst[x] = clip8(s);
        }
    }
    free(acc);
}

static void run_pool(mmb_ctx *ctx, mmb_pool_fn fn, void *arg) {
    if (ctx && ctx->pool) mmb__pool_run(ctx->pool, fn, arg);
    else fn(arg, 0, 1);
}

/* Pillow's 8bpc resize of an RGB image. A pass is skipped when its side keeps its size. The order
 * of the two passes matters (each rounds and clips to uint8); Pillow 13 (measured, not documented:
 * the libImaging source of 12.x always runs horizontal first) runs the vertical pass first exactly
 * when the height shrinks and 2 * out_w + in_h > 2 * in_w + out_h, horizontal first otherwise;
 * tests/oracle/test_preprocess.py checks this rule against Pillow on random sizes.
 * Returns a malloc'd out_h x out_w x 3 image or NULL (out of memory). */
static unsigned char *resize_u8(mmb_ctx *ctx, const unsigned char *in, int in_h, int in_w, int out_h, int out_w,
                                const filter *f) {
    const bool need_h = out_w != in_w, need_v = out_h != in_h;
    const bool vertical_first = need_h && need_v && out_h < in_h &&
                                2 * (int64_t)out_w + in_h > 2 * (int64_t)in_w + out_h;
    coeffs ch = {0}, cv = {0};
    unsigned char *tmp = NULL, *out = NULL;
    if (!coeffs_make(in_w, out_w, f, &ch)) return NULL;
    if (!coeffs_make(in_h, out_h, f, &cv)) { coeffs_free(&ch); return NULL; }
    out = malloc((size_t)out_h * out_w * 3);
    if (!out) goto done;
    if (vertical_first) {
        tmp = malloc((size_t)out_h * in_w * 3);
        if (!tmp) { free(out); out = NULL; goto done; }
        resample_job v = {in, tmp, in_w, in_w, out_h, 0, &cv};
        run_pool(ctx, vert_fn, &v);
        resample_job h = {tmp, out, in_w, out_w, out_h, 0, &ch};
        run_pool(ctx, horiz_fn, &h);
    } else if (need_h && need_v) {
        /* only the source rows the vertical pass reads */
        const int first = cv.bounds[0];
        const int last = cv.bounds[2 * out_h - 2] + cv.bounds[2 * out_h - 1];
        tmp = malloc((size_t)(last - first) * out_w * 3);
        if (!tmp) { free(out); out = NULL; goto done; }
        resample_job h = {in, tmp, in_w, out_w, last - first, first, &ch};
        run_pool(ctx, horiz_fn, &h);
        resample_job v = {tmp, out, out_w, out_w, out_h, first, &cv};
        run_pool(ctx, vert_fn, &v);
    } else if (need_h) {
        resample_job h = {in, out, in_w, out_w, in_h, 0, &ch};
        run_pool(ctx, horiz_fn, &h);
    } else if (need_v) {
        resample_job v = {in, out, in_w, in_w, out_h, 0, &cv};
        run_pool(ctx, vert_fn, &v);
    } else {
        memcpy(out, in, (size_t)out_h * out_w * 3);
    }
done:
    free(tmp);
    coeffs_free(&ch);
    coeffs_free(&cv);
    return out;
}

unsigned char *mmb__resize_u8(mmb_ctx *ctx, const unsigned char *in, int in_h, int in_w, int out_h, int out_w,
                              mmb_resample r) {
    filter f;
    if (!filter_of(r, &f)) return NULL;
    return resize_u8(ctx, in, in_h, in_w, out_h, out_w, &f);
}

/* ---- the pipeline ------------------------------------------------------------------------------ */

mmb_status mmb__preprocess_u8(mmb_ctx *ctx, const mmb_preprocess *p, const mmb_image *img, unsigned char **out,
                              int *h_out, int *w_out) {
    if (!p || !img || !out || !h_out || !w_out) return mmb__err(ctx, MMB_ERR_ARG, "preprocess: NULL argument");
    if (img->width < 1 || img->height < 1 || !img->rgb)
        return mmb__err(ctx, MMB_ERR_ARG, "preprocess: empty image (%dx%d)", img->height, img->width);
    if (p->size_mode == MMB_SIZE_ANYRES)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "preprocess: an AnyRes processor's output is tiles of floats, "
                        "not one 8-bit image");
    int h = img->height, w = img->width, ph, pw, rh, rw, oh, ow;
    mmb_status st = plan(ctx, p, h, w, &ph, &pw, &rh, &rw, &oh, &ow);
    if (st != MMB_OK) return st;
    uint64_t bytes;
    if (!mmb__mul_ok((uint64_t)ph * (uint64_t)pw, 3, &bytes) || !mmb__mul_ok((uint64_t)rh * (uint64_t)rw, 3, &bytes) ||
        !mmb__mul_ok((uint64_t)oh * (uint64_t)ow, 3, &bytes) || bytes > SIZE_MAX)
        return mmb__err(ctx, MMB_ERR_SHAPE, "preprocess: sizes overflow");

    const unsigned char *cur = img->rgb;
    unsigned char *padded = NULL, *resized = NULL, *cropped = NULL;
    if (p->do_pad && h != w) {
        padded = malloc((size_t)ph * pw * 3);
        if (!padded) goto nomem;
        for (size_t i = 0; i < (size_t)ph * pw; i++)
            for (int c = 0; c < 3; c++) padded[3 * i + c] = p->pad_color[c];
        const int top = (ph - h) / 2, left = (pw - w) / 2;
        for (int y = 0; y < h; y++)
            memcpy(padded + ((size_t)(y + top) * pw + left) * 3, img->rgb + (size_t)y * w * 3, (size_t)w * 3);
        cur = padded;
    }
    h = ph;
    w = pw;
    if (p->do_resize && (rh != h || rw != w)) {
        filter f;
        filter_of(p->resample, &f);
        resized = resize_u8(ctx, cur, h, w, rh, rw, &f);
        if (!resized) goto nomem;
        cur = resized;
        h = rh;
        w = rw;
    }
    cropped = malloc((size_t)oh * ow * 3);
    if (!cropped) goto nomem;
    if (oh == h && ow == w) {
        memcpy(cropped, cur, (size_t)oh * ow * 3);
    } else {
        /* center_crop: offset (h - ch) // 2 when the image is big enough; otherwise the image sits
         * ceil((ch - h) / 2) into a zero canvas. */
        int dy = h >= oh ? (h - oh) / 2 : -((oh - h + 1) / 2);
        int dx = w >= ow ? (w - ow) / 2 : -((ow - w + 1) / 2);
        if (p->size_mode == MMB_SIZE_TILES) dy = dx = 0;  /* Mllama's pad: zeros at the bottom and right */
        for (int y = 0; y < oh; y++) {
            unsigned char *dst = cropped + (size_t)y * ow * 3;
            const int sy = y + dy;
            if (sy < 0 || sy >= h) { memset(dst, 0, (size_t)ow * 3); continue; }
            for (int x = 0; x < ow; x++) {
                const int sx = x + dx;
                if (sx < 0 || sx >= w) { dst[3 * x] = dst[3 * x + 1] = dst[3 * x + 2] = 0; continue; }
                memcpy(dst + 3 * x, cur + ((size_t)sy * w + sx) * 3, 3);
            }
        }
    }
    free(padded);
    free(resized);
    *out = cropped;
    *h_out = oh;
    *w_out = ow;
    return MMB_OK;
nomem:
    free(padded);
    free(resized);
    free(cropped);
    return mmb__err(ctx, MMB_ERR_NOMEM, "preprocess: out of memory (image %dx%d)", img->height, img->width);
}

mmb_status mmb_preprocess_run(mmb_ctx *ctx, const mmb_preprocess *p, const mmb_image *img, float *out,
                              size_t out_count) {
    if (!p || !img || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_preprocess_run: NULL argument");
    if (img->width < 1 || img->height < 1 || !img->rgb)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_preprocess_run: empty image (%dx%d)", img->height, img->width);
    int oh, ow;
    mmb_status st = mmb_preprocess_output_size(ctx, p, img->height, img->width, &oh, &ow);
    if (st != MMB_OK) return st;
    const size_t plane = (size_t)oh * ow;
    if (out_count / 3 < plane)
        return mmb__err(ctx, MMB_ERR_SHAPE, "mmb_preprocess_run: output holds %zu floats, [3, %d, %d] needs %zu",
                        out_count, oh, ow, 3 * plane);
    if (p->size_mode == MMB_SIZE_ANYRES) return mmb__anyres_run(ctx, p, img, out, out_count);
    unsigned char *u8;
    int h, w;
    if ((st = mmb__preprocess_u8(ctx, p, img, &u8, &h, &w)) != MMB_OK) return st;
    /* transformers: rescale in float64 then cast to float32; normalize in float32. Tiles: tile (r, c) of the
     * canvas is written as plane-major [3, t, t] at tile r * cols + c (split_to_tiles). */
    const int t = p->size_mode == MMB_SIZE_TILES ? p->tile_size : 0, cols = t ? ow / t : 0;
    for (int c = 0; c < 3; c++) {
        const float mean = (float)p->image_mean[c], std = (float)p->image_std[c];
        float lut[256];
        for (int v = 0; v < 256; v++) {
            float x = p->do_rescale ? (float)((double)v * p->rescale_factor) : (float)v;
            if (p->do_normalize) x = (x - mean) / std;
            lut[v] = x;
        }
        if (t) {
            const size_t tt = (size_t)t * t;
            for (int y = 0; y < oh; y++)
                for (int tc = 0; tc < cols; tc++) {
                    float *dst = out + ((size_t)(y / t * cols + tc) * 3 + c) * tt + (size_t)(y % t) * t;
                    const unsigned char *src = u8 + ((size_t)y * ow + (size_t)tc * t) * 3 + c;
                    for (int x = 0; x < t; x++) dst[x] = lut[src[3 * x]];
                }
            continue;
        }
        float *dst = out + (size_t)c * plane;
        for (size_t i = 0; i < plane; i++) dst[i] = lut[u8[3 * i + c]];
    }
    free(u8);
    return MMB_OK;
}

mmb_status mmb_preprocess_postprocess(mmb_ctx *ctx, const mmb_preprocess *p, const float *pixels, int height,
                                      int width, mmb_image *out) {
    if (!p || !pixels || !out || height < 1 || width < 1 || (int64_t)height * width > MMB_IMAGE_DEFAULT_MAX_PIXELS)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_preprocess_postprocess: NULL argument or a bad size");
    const size_t hw = (size_t)height * (size_t)width;
    unsigned char *rgb = malloc(hw * 3);
    if (!rgb) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for a %dx%d image", width, height);
    /* unnormalize: normalize(mean' = -mean / std, std' = 1 / std) in f32; rescale: * (1 / rescale_factor) in
     * double, then f32; clip to [0, 255]; astype(uint8) truncates */
    const double scale = p->do_rescale ? 1.0 / p->rescale_factor : 1.0;
    for (int c = 0; c < 3; c++) {
        const float m = (float)(-p->image_mean[c] / p->image_std[c]), sd = (float)(1.0 / p->image_std[c]);
        for (size_t i = 0; i < hw; i++) {
            float x = pixels[c * hw + i];
            if (p->do_normalize) x = (x - m) / sd;
            float y = p->do_rescale ? (float)((double)x * scale) : x;
            y = !(y > 0.0f) ? 0.0f : y > 255.0f ? 255.0f : y; /* NaN: 0 */
            rgb[i * 3 + (size_t)c] = (unsigned char)y;
        }
    }
    out->width = width;
    out->height = height;
    out->rgb = rgb;
    return MMB_OK;
}
