/* Image decoding: JPEG (libjpeg-turbo), PNG (libpng) and WebP (libwebp) to 8-bit RGB, the way the
 * pixels reach a transformers image processor: Pillow's Image.open, then transformers'
 * convert_to_rgb, which composites anything with transparency onto white and otherwise calls
 * Pillow's convert("RGB").
 *
 * The format comes from the magic bytes, never the file name. The pixel count is checked against
 * the limit from the header, before any pixel buffer is allocated. libjpeg's and libpng's fatal
 * errors longjmp back here (their defaults print and exit/abort); a JPEG that ends early (libjpeg
 * only warns and pads with grey) is an error, as it is for Pillow. EXIF orientation is ignored, as
 * transformers ignores it.
 *
 * Pillow's conversions reproduced here (checked against Pillow 13 in tests/oracle):
 *   L, 1-bit, 2/4-bit grey   grey replicated; low bit depths scaled by bit replication (x255, x85, x17)
 *   I;16 (16-bit grey)       clipped: min(v, 255), not scaled
 *   16-bit RGB / RGBA / LA   the high byte of each sample
 *   P (palette)              looked up; tRNS gives per-entry alpha
 *   tRNS on grey / RGB       a pixel is transparent when its 8-bit value equals the tRNS value & 0xff
 *                            (for 1-bit images the value is scaled to 0/255 first, as Pillow does)
 *   alpha                    Pillow's alpha_composite onto opaque white, in its 7-bit fixed point */
#include "io/io.h"

#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>
#include <webp/decode.h>

void mmb_image_free(mmb_image *img) {
    if (!img) return;
    free(img->rgb);
    img->rgb = NULL;
    img->width = img->height = 0;
}

/* Checks the header's dimensions against the limit, as Pillow's _decompression_bomb_check counts
 * them (max(1, w) * max(1, h)), and that the RGB buffer's size fits. */
static mmb_status check_dims(mmb_ctx *ctx, const char *name, const char *fmt, uint64_t w, uint64_t h,
                             int64_t max_pixels) {
    if (w == 0 || h == 0)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: %s image has zero size (%llux%llu)", name, fmt,
                        (unsigned long long)w, (unsigned long long)h);
    uint64_t px, bytes;
    if (w > INT32_MAX || h > INT32_MAX || !mmb__mul_ok(w, h, &px) || px > (uint64_t)max_pixels ||
        !mmb__mul_ok(px, 3, &bytes) || bytes > SIZE_MAX)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED,
                        "%s: %s image of %llux%llu pixels exceeds the limit of %lld pixels "
                        "(possible decompression bomb)",
                        name, fmt, (unsigned long long)w, (unsigned long long)h, (long long)max_pixels);
    return MMB_OK;
}

/* Pillow's alpha_composite of (v, a) over opaque white (255, 255): its AlphaComposite.c with
 * PRECISION_BITS 7, specialised to a destination alpha of 255. Exact for every (v, a). */
static inline unsigned char over_white(unsigned v, unsigned a) {
    if (a == 255) return (unsigned char)v;
    if (a == 0) return 255;
    const unsigned blend = 255u * (255u - a);
    const unsigned outa255 = a * 255u + blend;
    const unsigned coef1 = a * 255u * 255u * 128u / outa255;
    const unsigned coef2 = 255u * 128u - coef1;
    unsigned tmp = v * coef1 + 255u * coef2 + (0x80u << 7);
    tmp = (((tmp >> 8) + tmp) >> 8) >> 7;
    return (unsigned char)tmp;
}

/* ---- JPEG ------------------------------------------------------------------------------------ */

typedef struct jpg_state {
    struct jpeg_decompress_struct cinfo;
    struct jpeg_error_mgr mgr;
    jmp_buf jb;
    char msg[JMSG_LENGTH_MAX];
    int created, eof;
    unsigned char *rgb;
    mmb_status st;
} jpg_state;

static void jpg_error_exit(j_common_ptr c) {
    jpg_state *s = (jpg_state *)c->client_data;
    (*c->err->format_message)(c, s->msg);
    longjmp(s->jb, 1);
}

static void jpg_emit_message(j_common_ptr c, int level) {
    jpg_state *s = (jpg_state *)c->client_data;
    if (level < 0) {
        c->err->num_warnings++;
        /* jpeg_mem_src warns and inserts a fake EOI when the data runs out. */
        if (c->err->msg_code == JWRN_JPEG_EOF) s->eof = 1;
    }
}

static void jpg_output_message(j_common_ptr c) { (void)c; }

/* Everything that changes after setjmp lives in *s (heap), so nothing is clobbered by longjmp. */
static void jpg_run(mmb_ctx *ctx, jpg_state *s, const unsigned char *buf, size_t n, const char *name,
                    int64_t max_pixels, mmb_image *out) {
    struct jpeg_decompress_struct *ci = &s->cinfo;
    if (setjmp(s->jb)) {
        if (s->eof)
            s->st = mmb__err(ctx, MMB_ERR_FORMAT, "%s: truncated JPEG (premature end of data): %s", name, s->msg);
        else
            s->st = mmb__err(ctx, MMB_ERR_FORMAT, "%s: corrupt JPEG: %s", name, s->msg);
        return;
    }
    jpeg_create_decompress(ci);
    s->created = 1;
    ci->client_data = s;
    jpeg_mem_src(ci, buf, (unsigned long)n);
    jpeg_read_header(ci, TRUE);
    if (s->eof) {
        s->st = mmb__err(ctx, MMB_ERR_FORMAT, "%s: truncated JPEG (the data ends inside the header)", name);
        return;
    }
    if (ci->jpeg_color_space == JCS_CMYK || ci->jpeg_color_space == JCS_YCCK) {
        s->st = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: CMYK JPEG is not supported%s", name,
                         ci->jpeg_color_space == JCS_YCCK ? " (YCCK)" : "");
        return;
    }
    if (ci->num_components != 1 && ci->num_components != 3) {
        s->st = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: JPEG with %d components is not supported", name,
                         ci->num_components);
        return;
    }
    if ((s->st = check_dims(ctx, name, "JPEG", ci->image_width, ci->image_height, max_pixels)) != MMB_OK) return;
    ci->out_color_space = JCS_RGB;
    jpeg_start_decompress(ci);
    if (ci->output_components != 3 || ci->output_width != ci->image_width ||
        ci->output_height != ci->image_height) {
        s->st = mmb__err(ctx, MMB_ERR_FORMAT, "%s: JPEG decoder gave an unexpected output layout", name);
        return;
    }
    const size_t w = ci->output_width, h = ci->output_height;
    s->rgb = malloc(w * h * 3);
    if (!s->rgb) {
        s->st = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory for a %zux%zu image", name, w, h);
        return;
    }
    while (ci->output_scanline < ci->output_height) {
        JSAMPROW row = s->rgb + (size_t)ci->output_scanline * w * 3;
        if (jpeg_read_scanlines(ci, &row, 1) != 1) break;
        if (s->eof) break;
    }
    if (!s->eof && ci->output_scanline == ci->output_height) jpeg_finish_decompress(ci);
    if (s->eof || ci->output_scanline != ci->output_height) {
        s->st = mmb__err(ctx, MMB_ERR_FORMAT, "%s: truncated JPEG (premature end of data at row %u of %u)",
                         name, ci->output_scanline, ci->output_height);
        return;
    }
    out->width = (int)w;
    out->height = (int)h;
    out->rgb = s->rgb;
    s->rgb = NULL;
    s->st = MMB_OK;
}

static mmb_status decode_jpeg(mmb_ctx *ctx, const unsigned char *buf, size_t n, const char *name,
                              int64_t max_pixels, mmb_image *out) {
    if (n > (size_t)(unsigned long)-1) return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: JPEG file too large", name);
    jpg_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", name);
    s->cinfo.err = jpeg_std_error(&s->mgr);
    s->mgr.error_exit = jpg_error_exit;
    s->mgr.emit_message = jpg_emit_message;
    s->mgr.output_message = jpg_output_message;
    s->st = MMB_ERR_FORMAT;
    jpg_run(ctx, s, buf, n, name, max_pixels, out);
    mmb_status st = s->st;
    if (s->created) jpeg_destroy_decompress(&s->cinfo);
    free(s->rgb);
    free(s);
    return st;
}

/* ---- PNG ------------------------------------------------------------------------------------- */

typedef struct png_state {
    png_structp png;
    png_infop info;
    const unsigned char *buf;
    size_t n, pos;
    char msg[256];
    unsigned char *raw;   /* decoded rows (a whole image when interlaced, else one row) */
    unsigned char *rgb;
    mmb_status st;
} png_state;

static void png_err_fn(png_structp png, png_const_charp msg) {
    png_state *s = (png_state *)png_get_error_ptr(png);
    snprintf(s->msg, sizeof s->msg, "%s", msg ? msg : "unknown error");
    png_longjmp(png, 1);
}

static void png_warn_fn(png_structp png, png_const_charp msg) { (void)png; (void)msg; }

static void png_read_mem(png_structp png, png_bytep dst, size_t len) {
    png_state *s = (png_state *)png_get_io_ptr(png);
    if (len > s->n - s->pos) png_error(png, "unexpected end of data (truncated file)");
    memcpy(dst, s->buf + s->pos, len);
    s->pos += len;
}

/* Converts one decoded row (after libpng's palette / low-bit-depth expansion) to RGB. */
typedef struct png_fmt {
    int color_type, bit_depth, channels; /* after the transforms: channels 1-4, depth 8 or 16 */
    int orig_depth;
    int has_trns;                        /* grey / RGB tRNS handled here, Pillow's way */
    unsigned tr, tg, tb;                 /* tRNS values & 0xff (grey in tr) */
} png_fmt;

static void png_row_to_rgb(const png_fmt *f, const unsigned char *src, unsigned char *dst, size_t w) {
    const int c = f->channels;
    const int d16 = f->bit_depth == 16;
    for (size_t x = 0; x < w; x++) {
        const unsigned char *p = src + x * (size_t)c * (d16 ? 2 : 1);
        unsigned v[4] = {0, 0, 0, 0};
        for (int k = 0; k < c; k++) v[k] = d16 ? p[2 * k] : p[k]; /* high byte of 16-bit samples */
        unsigned r, g, b, a = 255;
        if (c == 1) {
            unsigned grey = v[0];
            if (d16) {  /* I;16: clipped, not scaled */
                unsigned full = ((unsigned)p[0] << 8) | p[1];
                grey = full > 255 ? 255 : full;
            }
            r = g = b = grey;
            if (f->has_trns && grey == f->tr) a = 0;
        } else if (c == 2) {
            r = g = b = v[0];
            a = v[1];
        } else {
            r = v[0]; g = v[1]; b = v[2];
            if (c == 4) a = v[3];
            else if (f->has_trns && r == f->tr && g == f->tg && b == f->tb) a = 0;
        }
        dst[3 * x + 0] = over_white(r, a);
        dst[3 * x + 1] = over_white(g, a);
        dst[3 * x + 2] = over_white(b, a);
    }
}

static void png_run(mmb_ctx *ctx, png_state *s, const char *name, int64_t max_pixels, mmb_image *out) {
    if (setjmp(png_jmpbuf(s->png))) {
        s->st = mmb__err(ctx, MMB_ERR_FORMAT, "%s: corrupt PNG: %s", name, s->msg);
        return;
    }
    png_set_read_fn(s->png, s, png_read_mem);
    png_read_info(s->png, s->info);
    png_uint_32 w, h;
    int depth, ctype, interlace;
    png_get_IHDR(s->png, s->info, &w, &h, &depth, &ctype, &interlace, NULL, NULL);
    if ((s->st = check_dims(ctx, name, "PNG", w, h, max_pixels)) != MMB_OK) return;

    png_fmt f = {0};
    f.orig_depth = depth;
    const int has_trns = png_get_valid(s->png, s->info, PNG_INFO_tRNS) != 0;
    if (ctype == PNG_COLOR_TYPE_PALETTE) {
        png_set_palette_to_rgb(s->png);
        if (has_trns) png_set_tRNS_to_alpha(s->png);
    } else if (has_trns && (ctype == PNG_COLOR_TYPE_GRAY || ctype == PNG_COLOR_TYPE_RGB)) {
        png_color_16p tc = NULL;
        if (png_get_tRNS(s->png, s->info, NULL, NULL, &tc) && tc) {
            f.has_trns = 1;
            if (ctype == PNG_COLOR_TYPE_GRAY) {
                /* Pillow scales the value of 1-bit images to 0/255, no other depth. */
                f.tr = depth == 1 ? (tc->gray ? 255u : 0u) : (tc->gray & 0xffu);
            } else {
                f.tr = tc->red & 0xffu;
                f.tg = tc->green & 0xffu;
                f.tb = tc->blue & 0xffu;
            }
        }
    }
    if (ctype == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(s->png);
    const int passes = png_set_interlace_handling(s->png);
    png_read_update_info(s->png, s->info);
    f.channels = png_get_channels(s->png, s->info);
    f.bit_depth = png_get_bit_depth(s->png, s->info);
    f.color_type = png_get_color_type(s->png, s->info);
    const size_t rowbytes = png_get_rowbytes(s->png, s->info);
    if (f.channels < 1 || f.channels > 4 || (f.bit_depth != 8 && f.bit_depth != 16) ||
        rowbytes != (size_t)w * (size_t)f.channels * (size_t)(f.bit_depth / 8)) {
        s->st = mmb__err(ctx, MMB_ERR_FORMAT, "%s: PNG decoder gave an unexpected row layout", name);
        return;
    }
    s->rgb = malloc((size_t)w * h * 3);
    size_t raw_rows = passes > 1 ? h : 1;
    uint64_t raw_bytes;
    if (!s->rgb || !mmb__mul_ok(rowbytes, raw_rows, &raw_bytes) || raw_bytes > SIZE_MAX ||
        !(s->raw = malloc((size_t)raw_bytes))) {
        s->st = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory for a %ux%u image", name, (unsigned)w, (unsigned)h);
        return;
    }
    if (passes > 1) {
        for (int pass = 0; pass < passes; pass++)
            for (png_uint_32 y = 0; y < h; y++) png_read_row(s->png, s->raw + (size_t)y * rowbytes, NULL);
        for (png_uint_32 y = 0; y < h; y++)
            png_row_to_rgb(&f, s->raw + (size_t)y * rowbytes, s->rgb + (size_t)y * w * 3, w);
    } else {
        for (png_uint_32 y = 0; y < h; y++) {
            png_read_row(s->png, s->raw, NULL);
            png_row_to_rgb(&f, s->raw, s->rgb + (size_t)y * w * 3, w);
        }
    }
    out->width = (int)w;
    out->height = (int)h;
    out->rgb = s->rgb;
    s->rgb = NULL;
    s->st = MMB_OK;
}

/* Writing: libpng's simplified API into memory, then the file written as every output is (mmb__out_write_all). */
mmb_status mmb__png_write(mmb_ctx *ctx, const char *path, const unsigned char *rgb, int width, int height) {
    if (!path || !rgb || width < 1 || height < 1) return mmb__err(ctx, MMB_ERR_ARG, "mmb__png_write: bad argument");
    png_image im;
    memset(&im, 0, sizeof im);
    im.version = PNG_IMAGE_VERSION;
    im.width = (png_uint_32)width;
    im.height = (png_uint_32)height;
    im.format = PNG_FORMAT_RGB;
    png_alloc_size_t n = 0;
    if (!png_image_write_to_memory(&im, NULL, &n, 0, rgb, 0, NULL))
        return mmb__err(ctx, MMB_ERR_IO, "%s: cannot encode the PNG: %s", path, im.message);
    unsigned char *buf = malloc(n);
    if (!buf) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
    mmb_status st = MMB_OK;
    if (!png_image_write_to_memory(&im, buf, &n, 0, rgb, 0, NULL))
        st = mmb__err(ctx, MMB_ERR_IO, "%s: cannot encode the PNG: %s", path, im.message);
    if (st == MMB_OK) st = mmb__out_write_all(ctx, path, buf, n);
    free(buf);
    return st;
}

static mmb_status decode_png(mmb_ctx *ctx, const unsigned char *buf, size_t n, const char *name,
                             int64_t max_pixels, mmb_image *out) {
    png_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", name);
    s->buf = buf;
    s->n = n;
    s->st = MMB_ERR_FORMAT;
    s->png = png_create_read_struct(PNG_LIBPNG_VER_STRING, s, png_err_fn, png_warn_fn);
    if (s->png) s->info = png_create_info_struct(s->png);
    if (!s->png || !s->info) {
        png_destroy_read_struct(s->png ? &s->png : NULL, NULL, NULL);
        free(s);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", name);
    }
    png_run(ctx, s, name, max_pixels, out);
    mmb_status st = s->st;
    png_destroy_read_struct(&s->png, &s->info, NULL);
    free(s->raw);
    free(s->rgb);
    free(s);
    return st;
}

/* ---- WebP ------------------------------------------------------------------------------------ */

static const char *webp_status(VP8StatusCode c) {
    switch (c) {
    case VP8_STATUS_OUT_OF_MEMORY: return "out of memory";
    case VP8_STATUS_INVALID_PARAM: return "invalid parameter";
    case VP8_STATUS_BITSTREAM_ERROR: return "bitstream error";
    case VP8_STATUS_UNSUPPORTED_FEATURE: return "unsupported feature";
    case VP8_STATUS_SUSPENDED: return "suspended";
    case VP8_STATUS_USER_ABORT: return "aborted";
    case VP8_STATUS_NOT_ENOUGH_DATA: return "truncated data";
    default: return "error";
    }
}

static mmb_status decode_webp(mmb_ctx *ctx, const unsigned char *buf, size_t n, const char *name,
                              int64_t max_pixels, mmb_image *out) {
    WebPBitstreamFeatures feat;
    VP8StatusCode vs = WebPGetFeatures(buf, n, &feat);
    if (vs != VP8_STATUS_OK)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: corrupt WebP: %s", name, webp_status(vs));
    if (feat.has_animation)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: animated WebP is not supported", name);
    mmb_status st = check_dims(ctx, name, "WebP", (uint64_t)(feat.width > 0 ? feat.width : 0),
                               (uint64_t)(feat.height > 0 ? feat.height : 0), max_pixels);
    if (st != MMB_OK) return st;
    const size_t w = (size_t)feat.width, h = (size_t)feat.height;
    unsigned char *rgb = malloc(w * h * 3);
    if (!rgb) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory for a %zux%zu image", name, w, h);
    if (feat.has_alpha) {
        uint64_t bytes;
        unsigned char *rgba = NULL;
        if (mmb__mul_ok(w * h, 4, &bytes) && bytes <= SIZE_MAX && (int)(w * 4) > 0) rgba = malloc((size_t)bytes);
        if (!rgba) {
            free(rgb);
            return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory for a %zux%zu image", name, w, h);
        }
        if (!WebPDecodeRGBAInto(buf, n, rgba, (size_t)bytes, (int)(w * 4))) {
            free(rgba);
            free(rgb);
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: corrupt or truncated WebP data", name);
        }
        for (size_t i = 0; i < w * h; i++) {
            const unsigned a = rgba[4 * i + 3];
            for (int k = 0; k < 3; k++) rgb[3 * i + k] = over_white(rgba[4 * i + k], a);
        }
        free(rgba);
    } else if (!WebPDecodeRGBInto(buf, n, rgb, w * h * 3, (int)(w * 3))) {
        free(rgb);
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: corrupt or truncated WebP data", name);
    }
    out->width = (int)w;
    out->height = (int)h;
    out->rgb = rgb;
    return MMB_OK;
}

/* ---- dispatch -------------------------------------------------------------------------------- */

/* Names a format we recognise but do not decode, or returns NULL. */
static const char *other_format(const unsigned char *b, size_t n) {
    if (n >= 6 && (!memcmp(b, "GIF87a", 6) || !memcmp(b, "GIF89a", 6))) return "GIF";
    if (n >= 2 && !memcmp(b, "BM", 2)) return "BMP";
    if (n >= 4 && (!memcmp(b, "II*\0", 4) || !memcmp(b, "MM\0*", 4))) return "TIFF";
    if (n >= 12 && !memcmp(b + 4, "ftyp", 4)) {
        if (!memcmp(b + 8, "avif", 4) || !memcmp(b + 8, "avis", 4)) return "AVIF";
        if (!memcmp(b + 8, "heic", 4) || !memcmp(b + 8, "heix", 4) || !memcmp(b + 8, "mif1", 4) ||
            !memcmp(b + 8, "msf1", 4))
            return "HEIF";
    }
    if (n >= 4 && !memcmp(b, "8BPS", 4)) return "PSD";
    if (n >= 4 && !memcmp(b, "\0\0\1\0", 4)) return "ICO";
    if (n >= 4 && !memcmp(b, "qoif", 4)) return "QOI";
    if (n >= 12 && !memcmp(b, "\0\0\0\x0cjP  ", 8)) return "JPEG 2000";
    if (n >= 4 && !memcmp(b, "\xff\x4f\xff\x51", 4)) return "JPEG 2000";
    if (n >= 12 && !memcmp(b, "\0\0\0\x0cJXL ", 8)) return "JPEG XL";
    if (n >= 2 && !memcmp(b, "\xff\x0a", 2)) return "JPEG XL";
    return NULL;
}

mmb_status mmb_image_decode(mmb_ctx *ctx, const void *bytes, size_t n, const char *name, int64_t max_pixels,
                            mmb_image *out) {
    if (!name) name = "<memory>";
    if (!out || (!bytes && n))
        return mmb__err(ctx, MMB_ERR_ARG, "%s: mmb_image_decode: NULL %s", name, out ? "bytes" : "output");
    if (max_pixels < 0) return mmb__err(ctx, MMB_ERR_ARG, "%s: negative pixel limit %lld", name, (long long)max_pixels);
    if (max_pixels == 0) max_pixels = MMB_IMAGE_DEFAULT_MAX_PIXELS;
    const unsigned char *b = bytes;
    if (n == 0) return mmb__err(ctx, MMB_ERR_FORMAT, "%s: empty file (0 bytes), not an image", name);
    mmb_image img = {0, 0, NULL};
    mmb_status st;
    if (n >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF)
        st = decode_jpeg(ctx, b, n, name, max_pixels, &img);
    else if (n >= 8 && !memcmp(b, "\x89PNG\r\n\x1a\n", 8))
        st = decode_png(ctx, b, n, name, max_pixels, &img);
    else if (n >= 12 && !memcmp(b, "RIFF", 4) && !memcmp(b + 8, "WEBP", 4))
        st = decode_webp(ctx, b, n, name, max_pixels, &img);
    else {
        const char *other = other_format(b, n);
        if (other)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED,
                            "%s: unsupported image format (%s); JPEG, PNG and WebP are supported", name, other);
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: not an image (no JPEG, PNG or WebP signature)", name);
    }
    if (st == MMB_OK) *out = img;
    return st;
}

mmb_status mmb_image_load(mmb_ctx *ctx, const char *path, int64_t max_pixels, mmb_image *out) {
    if (!path || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_image_load: NULL %s", path ? "output" : "path");
    int fd = -1;
    size_t n = 0;
    mmb_status so = mmb__open_input(ctx, path, &fd, &n);  /* a FIFO, device or socket: refused at once */
    if (so != MMB_OK) return so;
    if (n > SIZE_MAX / 2) {
        close(fd);
        return mmb__err(ctx, MMB_ERR_IO, "%s: file too large (%zu bytes)", path, n);
    }
    unsigned char *buf = malloc(n ? n : 1);
    if (!buf) {
        close(fd);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory reading %zu bytes", path, n);
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            int e = errno;
            free(buf);
            close(fd);
            if (r == 0) return mmb__err(ctx, MMB_ERR_IO, "%s: file shrank while reading", path);
            return mmb__err(ctx, MMB_ERR_IO, "%s: read failed: %s", path, strerror(e));
        }
        got += (size_t)r;
    }
    close(fd);
    mmb_status st = mmb_image_decode(ctx, buf, n, path, max_pixels, out);
    free(buf);
    return st;
}

mmb_status mmb_image_write_png(mmb_ctx *ctx, const char *path, const mmb_image *img) {
    if (!path || !img || !img->rgb || img->width < 1 || img->height < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_image_write_png: NULL argument or an empty image");
    return mmb__png_write(ctx, path, img->rgb, img->width, img->height);
}
