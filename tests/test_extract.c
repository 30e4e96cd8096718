/* The extraction API: the shard split, pooling, .npy headers, and the tar reader on hand-made hostile headers
 * (base-256 sizes, sizes past the end, overflowing fields, bad checksums, PAX records that lie about their length). */
#include "mmbridge.h"
#include "check.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void set_checksum(unsigned char *h) {
    memset(h + 148, ' ', 8);
    unsigned s = 0;
    for (int i = 0; i < 512; i++) s += h[i];
    snprintf((char *)h + 148, 8, "%06o", s);
    h[155] = ' ';
}

/* A header for `name` of `size` bytes (octal) and type `type`, checksummed. */
static void header(unsigned char *h, const char *name, size_t size, char type) {
    memset(h, 0, 512);
    snprintf((char *)h, 100, "%s", name);
    memcpy(h + 100, "0000644", 7);
    snprintf((char *)h + 124, 12, "%011o", (unsigned)size);
    h[156] = (unsigned char)type;
    memcpy(h + 257, "ustar\0" "00", 8);
    set_checksum(h);
}

static int count_of(mmb_ctx *ctx, const unsigned char *buf, size_t n, int flags, mmb_status *st) {
    mmb_manifest *m = NULL;
    *st = mmb_manifest_from_tar(ctx, buf, n, "t.tar", flags, &m);
    int c = *st == MMB_OK ? (int)mmb_manifest_count(m) : -1;
    mmb_manifest_free(m);
    return c;
}

static void test_tar(mmb_ctx *ctx) {
    unsigned char buf[512 * 12];
    mmb_status st;
    memset(buf, 0, sizeof buf);
    header(buf, "a/001.png", 3, '0');
    memcpy(buf + 512, "png", 3);
    header(buf + 1024, "a/001.txt", 2, '0');
    header(buf + 2048, "a/002.JPG", 1, 0);
    CHECK(count_of(ctx, buf, 512 * 6, 0, &st) == 2, "%s", mmb_ctx_error(ctx));
    mmb_manifest *m = NULL;
    CHECK(mmb_manifest_from_tar(ctx, buf, 512 * 6, "t.tar", 0, &m) == MMB_OK, "%s", mmb_ctx_error(ctx));
    mmb_input in;
    CHECK(m && mmb_manifest_get(m, 0, &in) == MMB_OK && in.offset == 512 && in.size == 3 &&
          !strcmp(in.name, "t.tar#a/001.png"), "first member");
    CHECK(m && mmb_manifest_get(m, 1, &in) == MMB_OK && in.offset == 2560 && in.index == 1, "second member");
    CHECK(m && mmb_manifest_get(m, 2, &in) == MMB_ERR_ARG, "out of range");
    mmb_manifest_free(m);
    /* no image at all */
    CHECK(count_of(ctx, buf + 1024, 1024, 0, &st) < 0 && st == MMB_ERR_MISSING, "no image");
    /* a size past the end of the buffer */
    unsigned char b2[512 * 6];
    memcpy(b2, buf, sizeof b2);
    snprintf((char *)b2 + 124, 12, "%011o", 1u << 20);
    set_checksum(b2);
    CHECK(count_of(ctx, b2, sizeof b2, 0, &st) < 0 && st == MMB_ERR_FORMAT && strstr(mmb_ctx_error(ctx), "past the end"),
          "%s", mmb_ctx_error(ctx));
    /* GNU base-256: 3 bytes, and a negative / huge one */
    memcpy(b2, buf, sizeof b2);
    memset(b2 + 124, 0, 12);
    b2[124] = 0x80, b2[135] = 3;
    set_checksum(b2);
    CHECK(count_of(ctx, b2, sizeof b2, 0, &st) == 2, "base-256 size: %s", mmb_ctx_error(ctx));
    b2[124] = 0xff;
    set_checksum(b2);
    CHECK(count_of(ctx, b2, sizeof b2, 0, &st) < 0 && st == MMB_ERR_FORMAT, "negative base-256 size");
    memset(b2 + 124, 0x80, 1), memset(b2 + 125, 0xff, 11);
    set_checksum(b2);
    CHECK(count_of(ctx, b2, sizeof b2, 0, &st) < 0 && st == MMB_ERR_FORMAT, "2^88 base-256 size");
    /* octal with garbage, an octal field that overflows 2^62 (seeded 12 digits of 7 in 12 bytes) */
    memcpy(b2, buf, sizeof b2);
    memcpy(b2 + 124, "0000000x003\0", 12);
    set_checksum(b2);
    CHECK(count_of(ctx, b2, sizeof b2, 0, &st) < 0 && st == MMB_ERR_FORMAT, "garbage in the size");
    memcpy(b2 + 124, "777777777777", 12);
    set_checksum(b2);
    CHECK(count_of(ctx, b2, sizeof b2, 0, &st) < 0 && st == MMB_ERR_FORMAT, "huge octal size");
    /* a bad checksum; strict fails, SKIP_BAD keeps what came before */
    memcpy(b2, buf, sizeof b2);
    unsigned char b3[512 * 6];
    memcpy(b3, buf, sizeof b3);
    b3[2048 + 5] ^= 0x40;
    CHECK(count_of(ctx, b3, sizeof b3, 0, &st) < 0 && strstr(mmb_ctx_error(ctx), "byte 2048"), "%s", mmb_ctx_error(ctx));
    mmb_manifest *m2 = NULL;
    CHECK(mmb_manifest_from_tar(ctx, b3, sizeof b3, "t.tar", MMB_MANIFEST_SKIP_BAD, &m2) == MMB_OK &&
          mmb_manifest_count(m2) == 1 && mmb_manifest_warnings(m2) == 1 && strstr(mmb_manifest_warning(m2, 0), "checksum"),
          "skip bad");
    mmb_manifest_free(m2);
    /* truncated: a header cut short */
    CHECK(count_of(ctx, buf, 2048 + 100, 0, &st) < 0 && strstr(mmb_ctx_error(ctx), "truncated"), "%s",
          mmb_ctx_error(ctx));
    /* PAX records: a path, then lies (length past the data, no '=') */
    unsigned char p[512 * 5];
    memset(p, 0, sizeof p);
    const char *rec = "30 path=x/long-name-here.webp\n";
    header(p, "PaxHeader", strlen(rec), 'x');
    memcpy(p + 512, rec, strlen(rec));
    header(p + 1024, "short", 1, '0');
    mmb_manifest *m3 = NULL;
    CHECK(mmb_manifest_from_tar(ctx, p, sizeof p, NULL, 0, &m3) == MMB_OK && mmb_manifest_get(m3, 0, &in) == MMB_OK &&
          strstr(in.name, "#x/long-name-here.webp"), "%s", mmb_ctx_error(ctx));
    mmb_manifest_free(m3);
    memcpy(p + 512, "99 path=x.png\n", 14);
    header(p, "PaxHeader", 14, 'x');
    CHECK(count_of(ctx, p, sizeof p, 0, &st) < 0 && strstr(mmb_ctx_error(ctx), "PAX"), "%s", mmb_ctx_error(ctx));
    memcpy(p + 512, "14 pathxxpng\n\n", 14);
    CHECK(count_of(ctx, p, sizeof p, 0, &st) < 0 && strstr(mmb_ctx_error(ctx), "PAX"), "%s", mmb_ctx_error(ctx));
    CHECK(count_of(ctx, NULL, 0, 0, &st) < 0 && st == MMB_ERR_MISSING, "empty");
}

static void test_shards(void) {
    int64_t b = -1, e = -1;
    CHECK(mmb_shard_count(23, 5) == 5 && mmb_shard_count(0, 5) == 0 && mmb_shard_count(5, 0) == -1, "count");
    CHECK(mmb_shard_range(23, 5, 4, &b, &e) == MMB_OK && b == 20 && e == 23, "last shard");
    CHECK(mmb_shard_range(23, 5, 5, &b, &e) == MMB_ERR_ARG, "past the end");
    CHECK(mmb_shard_mine(7, 1, 3) && !mmb_shard_mine(7, 0, 3) && !mmb_shard_mine(7, 3, 3), "mine");
}

static void test_pool(mmb_ctx *ctx) {
    float x[2 * 3 * 2] = {1, 2, 3, 4, 5, 6, 10, 20, 30, 40, 50, 60}, o[12];
    CHECK(mmb_pool_tokens(ctx, MMB_POOL_MEAN, x, 2, 3, 2, o, 4) == MMB_OK && o[0] == 3 && o[1] == 4 && o[2] == 30 &&
          o[3] == 40, "mean");
    CHECK(mmb_pool_tokens(ctx, MMB_POOL_CLS, x, 2, 3, 2, o, 4) == MMB_OK && o[0] == 1 && o[2] == 10, "cls");
    CHECK(mmb_pool_tokens(ctx, MMB_POOL_NONE, x, 2, 3, 2, o, 11) == MMB_ERR_SHAPE, "too small");
    CHECK(mmb_pool_tokens(ctx, MMB_POOL_MEAN, x, 2, 3, 2, x, 12) == MMB_OK && x[0] == 3 && x[3] == 40, "in place");
    CHECK(mmb_pool_tokens(ctx, (mmb_pooling)7, x, 2, 3, 2, o, 12) == MMB_ERR_ARG, "bad mode");
}

static void test_npy(mmb_ctx *ctx) {
    char dir[] = "/tmp/mmb_npy_XXXXXX", path[64];
    if (!mkdtemp(dir)) return;
    snprintf(path, sizeof path, "%s/a.npy", dir);
    float d[6] = {1, 2, 3, 4, 5, 6};
    int64_t sh[2] = {2, 3};
    CHECK(mmb_npy_write(ctx, path, d, 2, sh) == MMB_OK, "%s", mmb_ctx_error(ctx));
    FILE *f = fopen(path, "rb");
    unsigned char h[128 + 24];
    size_t n = f ? fread(h, 1, sizeof h, f) : 0;
    if (f) fclose(f);
    CHECK(n == 128 + 24 && !memcmp(h, "\x93NUMPY\x01\x00", 8) && h[8] + 256 * h[9] == 118 && h[127] == '\n' &&
          strstr((char *)h + 10, "'shape': (2, 3)") && !memcmp(h + 128, d, 24), "npy header");
    CHECK(mmb_npy_write(ctx, path, d, 0, sh) == MMB_ERR_ARG, "ndim 0");
    unlink(path);
    rmdir(dir);
}

int main(void) {
    mmb_ctx *ctx = NULL;
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = 1;
    if (mmb_ctx_new(&p, &ctx) != MMB_OK) return 1;
    test_tar(ctx);
    test_shards();
    test_pool(ctx);
    test_npy(ctx);
    mmb_ctx_free(ctx);
    return DONE("test_extract");
}
