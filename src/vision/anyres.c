/* LLaVA-NeXT's AnyRes, as transformers has it: the arithmetic the image processor, the processor's token count
 * and the model's feature packing share (select_best_resolution, get_patch_output_size, unpad_image), and the
 * image processor itself (LlavaNextImageProcessorPil.get_image_patches, which LlavaOnevisionImageProcessorPil
 * repeats):
 *   1. the base image: the whole image resized to tile x tile (not keeping its aspect);
 *   2. the best resolution of image_grid_pinpoints; the image resized into it keeping its aspect (sides
 *      min(ceil(side * scale), target)), zeros padded around it (left / top: half the slack, floored), cut into
 *      tiles of tile x tile, row-major;
 *   3. each of these 1 + tiles images rescaled and normalized (the per-patch resize and crop are to the tile's
 *      own size: the processor's load refuses a config where they are not, so they are the identity here).
 * Resizing is Pillow's 8-bit resampling (preprocess.c's), with the processor's filter (bicubic by default). */
#include "vision/vision.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void mmb__anyres_best(int h, int w, const int (*pins)[2], int n, int *bh, int *bw) {
    int64_t best_eff = 0;
    double best_waste = INFINITY;
    *bh = pins[0][0];
    *bw = pins[0][1];
    for (int i = 0; i < n; i++) {
        const int ph = pins[i][0], pw = pins[i][1];
        const double sw = (double)pw / w, sh = (double)ph / h, scale = sw < sh ? sw : sh;
        const int64_t dw = (int64_t)(w * scale), dh = (int64_t)(h * scale), orig = (int64_t)w * h;
        const int64_t eff = dw * dh < orig ? dw * dh : orig;
        const double waste = (double)((int64_t)pw * ph - eff);
        if (eff > best_eff || (eff == best_eff && waste < best_waste)) {
            best_eff = eff;
            best_waste = waste;
            *bh = ph;
            *bw = pw;
        }
    }
}

void mmb__anyres_fit(int h, int w, int th, int tw, int *nh, int *nw) {
    const double sw = (double)tw / w, sh = (double)th / h;
    if (sw < sh) {
        *nw = tw;
        double v = ceil(h * sw);
        *nh = v < th ? (int)v : th;
    } else {
        *nh = th;
        double v = ceil(w * sh);
        *nw = v < tw ? (int)v : tw;
    }
}

/* Python's int(round(x, 7)) for the non-negative x here: rounded to 7 decimals (half to even), truncated. */
static int64_t int_round7(double x) {
    double r = nearbyint(x * 1e7) / 1e7;
    return (int64_t)r;
}

void mmb__anyres_unpad(int oh, int ow, int ch, int cw, int *top, int *rows, int *left, int *cols) {
    *top = *left = 0;
    *rows = ch;
    *cols = cw;
    if ((double)ow / oh > (double)cw / ch) {
        const int64_t nh = int_round7(oh * ((double)cw / ow));
        const int64_t pad = (ch - nh) >= 0 ? (ch - nh) / 2 : -((nh - ch + 1) / 2); /* Python's floor division */
        *top = (int)pad;
        *rows = (int)(ch - 2 * pad);
    } else {
        const int64_t nw = int_round7(ow * ((double)ch / oh));
        const int64_t pad = (cw - nw) >= 0 ? (cw - nw) / 2 : -((nw - cw + 1) / 2);
        *left = (int)pad;
        *cols = (int)(cw - 2 * pad);
    }
}

mmb_status mmb__anyres_grid(mmb_ctx *ctx, const mmb_preprocess *p, int h, int w, int *bh, int *bw) {
    if (p->size_mode != MMB_SIZE_ANYRES || p->n_pinpoints < 1 || p->n_pinpoints > MMB_MAX_PINPOINTS ||
        p->tile_size < 1 || p->tile_size > 65536)
        return mmb__err(ctx, MMB_ERR_ARG, "preprocess: an AnyRes processor needs 1..%d image_grid_pinpoints and a "
                        "tile_size in 1..65536 (got %d and %d)", MMB_MAX_PINPOINTS, p->n_pinpoints, p->tile_size);
    for (int i = 0; i < p->n_pinpoints; i++)
        if (p->pinpoints[i][0] < p->tile_size || p->pinpoints[i][1] < p->tile_size || p->pinpoints[i][0] > 65536 ||
            p->pinpoints[i][1] > 65536 || p->pinpoints[i][0] % p->tile_size || p->pinpoints[i][1] % p->tile_size)
            return mmb__err(ctx, MMB_ERR_ARG, "preprocess: image_grid_pinpoints[%d] = [%d, %d] does not divide into "
                            "tiles of %d (at most 65536 a side)", i, p->pinpoints[i][0], p->pinpoints[i][1],
                            p->tile_size);
    mmb__anyres_best(h, w, p->pinpoints, p->n_pinpoints, bh, bw);
    return MMB_OK;
}

/* The float planes of one u8 image (t x t, HWC) into out [3, t, t]. */
static void normalize_tile(const mmb_preprocess *p, const unsigned char *u8, int t, float *out) {
    const size_t plane = (size_t)t * t;
    for (int c = 0; c < 3; c++) {
        const float mean = (float)p->image_mean[c], std = (float)p->image_std[c];
        float lut[256];
        for (int v = 0; v < 256; v++) {
            float x = p->do_rescale ? (float)((double)v * p->rescale_factor) : (float)v;
            if (p->do_normalize) x = (x - mean) / std;
            lut[v] = x;
        }
        for (size_t i = 0; i < plane; i++) out[(size_t)c * plane + i] = lut[u8[3 * i + c]];
    }
}

mmb_status mmb__anyres_run(mmb_ctx *ctx, const mmb_preprocess *p, const mmb_image *img, float *out, size_t count) {
    const int t = p->tile_size, h = img->height, w = img->width;
    int bh = 0, bw = 0, nh = 0, nw = 0;
    mmb_status s = mmb__anyres_grid(ctx, p, h, w, &bh, &bw);
    if (s != MMB_OK) return s;
    const int gh = bh / t, gw = bw / t;
    const size_t per = (size_t)3 * t * t, need = per * (size_t)(1 + gh * gw);
    if (count < need)
        return mmb__err(ctx, MMB_ERR_SHAPE, "mmb_preprocess_run: output holds %zu floats, %d AnyRes tiles of %dx%d "
                        "need %zu", count, 1 + gh * gw, t, t, need);
    mmb__anyres_fit(h, w, bh, bw, &nh, &nw);
    unsigned char *base = mmb__resize_u8(ctx, img->rgb, h, w, t, t, p->resample);
    unsigned char *fit = base ? mmb__resize_u8(ctx, img->rgb, h, w, nh, nw, p->resample) : NULL;
    unsigned char *canvas = fit ? calloc((size_t)bh * bw, 3) : NULL;
    unsigned char *tile = canvas ? malloc((size_t)t * t * 3) : NULL;
    if (!tile) {
        free(base);
        free(fit);
        free(canvas);
        return mmb__err(ctx, MMB_ERR_NOMEM, "preprocess: out of memory (AnyRes canvas %dx%d)", bh, bw);
    }
    const int top = (bh - nh) / 2, left = (bw - nw) / 2;
    for (int y = 0; y < nh; y++)
        memcpy(canvas + ((size_t)(y + top) * bw + left) * 3, fit + (size_t)y * nw * 3, (size_t)nw * 3);
    normalize_tile(p, base, t, out);
    for (int r = 0; r < gh; r++)
        for (int c = 0; c < gw; c++) {
            for (int y = 0; y < t; y++)
                memcpy(tile + (size_t)y * t * 3, canvas + ((size_t)(r * t + y) * bw + (size_t)c * t) * 3, (size_t)t * 3);
            normalize_tile(p, tile, t, out + per * (size_t)(1 + r * gw + c));
        }
    free(base);
    free(fit);
    free(canvas);
    free(tile);
    return MMB_OK;
}
