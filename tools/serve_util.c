/* The server's text helpers: a growing byte string, JSON strings and number arrays, base64, a constant-time
 * comparison. Written here because each is a few lines and Debian has no small library for them (the JSON
 * writer is not cJSON's: an embedding of 576 x 4096 floats as cJSON nodes would take ~150 MB). */
#include "serve.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int grow(sv_buf *b, size_t more) {
    if (b->oom) return 1;
    if (b->n + more + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + more + 1) {
        if (cap > SIZE_MAX / 2) { b->oom = 1; return 1; }
        cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (!p) { b->oom = 1; return 1; }
    b->p = p;
    b->cap = cap;
    return 0;
}

void sv_put(sv_buf *b, const void *s, size_t n) {
    if (grow(b, n)) return;
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

void sv_puts(sv_buf *b, const char *s) { sv_put(b, s, strlen(s)); }

void sv_printf(sv_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char small[256];
    int k = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (k < 0) { b->oom = 1; return; }
    if ((size_t)k < sizeof small) { sv_put(b, small, (size_t)k); return; }
    if (grow(b, (size_t)k)) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->n, (size_t)k + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)k;
}

void sv_free(sv_buf *b) {
    free(b->p);
    *b = (sv_buf){0};
}

void sv_json_str(sv_buf *b, const char *s, size_t n) {
    sv_put(b, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') continue;
        sv_put(b, s + run, i - run);
        run = i + 1;
        if (c == '"') sv_puts(b, "\\\"");
        else if (c == '\\') sv_puts(b, "\\\\");
        else if (c == '\n') sv_puts(b, "\\n");
        else if (c == '\r') sv_puts(b, "\\r");
        else if (c == '\t') sv_puts(b, "\\t");
        else sv_printf(b, "\\u%04x", c);
    }
    sv_put(b, s + run, n - run);
    sv_put(b, "\"", 1);
}

/* A finite f32 as 9 significant decimal digits (what "%.9g" prints, trailing zeros dropped, always with an exponent
 * but 0), which reads back as the same f32: the 9-digit decimal is within 1e-8 relative of x, a sixth of an f32 ulp.
 * 5x faster than snprintf's "%.9g" (23 against 126 ns here), which matters at 2.4 M floats a LLaVA image; every
 * one of the 2^32 bit patterns was checked to read back (strtof) as itself, and fuzz_serve checks it too. */
int sv_fmt_f32(char *p, float f) {
    static double p10[120];  /* p10[i] = 10^(i - 54): the scales 10^(8 - e) for f32's decimal exponents e */
    static int init;
    if (!__atomic_load_n(&init, __ATOMIC_ACQUIRE)) {
        double v = 1;
        for (int i = 54; i < 120; i++, v *= 10) p10[i] = v;
        v = 1;
        for (int i = 53; i >= 0; i--) p10[i] = (v /= 10);
        __atomic_store_n(&init, 1, __ATOMIC_RELEASE);
    }
    char *s = p;
    double x = f;
    if (signbit(x)) *p++ = '-', x = -x;
    if (x == 0) { *p++ = '0'; return (int)(p - s); }
    int be;
    frexp(x, &be);                                  /* x in [2^(be-1), 2^be) */
    int e = (int)floor((be - 1) * 0.30102999566398120); /* the decimal exponent, or one less */
    uint64_t m = (uint64_t)(x * p10[54 + 8 - e] + 0.5);
    if (m >= 1000000000u) m = (uint64_t)(x * p10[54 + 8 - ++e] + 0.5); /* one less, or the rounding carried */
    if (m >= 1000000000u) m = (uint64_t)(x * p10[54 + 8 - ++e] + 0.5);
    char d[9];
    for (int i = 8; i >= 0; i--) d[i] = (char)('0' + m % 10), m /= 10;
    int last = 8;
    while (last > 0 && d[last] == '0') last--;
    *p++ = d[0];
    if (last) {
        *p++ = '.';
        memcpy(p, d + 1, (size_t)last);
        p += last;
    }
    if (e) {
        *p++ = 'e';
        if (e < 0) *p++ = '-', e = -e;
        if (e >= 10) *p++ = (char)('0' + e / 10);
        *p++ = (char)('0' + e % 10);
    }
    return (int)(p - s);
}

void sv_json_floats(sv_buf *b, const float *x, size_t n) {
    if (grow(b, n * 17 + 2)) return;
    char *p = b->p + b->n;
    *p++ = '[';
    for (size_t i = 0; i < n; i++) {
        if (i) *p++ = ',';
        if (isfinite(x[i])) p += sv_fmt_f32(p, x[i]);
        else { memcpy(p, "null", 4); p += 4; }
    }
    *p++ = ']';
    *p = 0;
    b->n = (size_t)(p - b->p);
}

static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

void sv_b64_encode(sv_buf *b, const void *in, size_t n) {
    if (n > (SIZE_MAX / 4) * 3 - 3 || grow(b, (n + 2) / 3 * 4)) { b->oom = 1; return; }
    const unsigned char *s = in;
    char *p = b->p + b->n;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        *p++ = b64[v >> 18];
        *p++ = b64[(v >> 12) & 63];
        *p++ = b64[(v >> 6) & 63];
        *p++ = b64[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0);
        *p++ = b64[v >> 18];
        *p++ = b64[(v >> 12) & 63];
        *p++ = i + 1 < n ? b64[(v >> 6) & 63] : '=';
        *p++ = '=';
    }
    *p = 0;
    b->n = (size_t)(p - b->p);
}

int sv_b64_decode(const char *s, size_t n, unsigned char **out, size_t *len) {
    while (n && s[n - 1] == '=') n--;
    if (n % 4 == 1) return -1;
    unsigned char *o = malloc(n / 4 * 3 + 3);
    if (!o) return -2;
    size_t k = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int v = c >= 'A' && c <= 'Z' ? c - 'A' : c >= 'a' && c <= 'z' ? c - 'a' + 26 : c >= '0' && c <= '9' ? c - '0' + 52
              : c == '+' || c == '-' ? 62 : c == '/' || c == '_' ? 63 : -1;
        if (v < 0) { free(o); return -1; }
        acc = acc << 6 | (uint32_t)v;
        if ((bits += 6) >= 8) {
            bits -= 8;
            o[k++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    *out = o;
    *len = k;
    return 0;
}

int sv_secret_eq(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    unsigned d = na != nb;
    for (size_t i = 0; i < na; i++) d |= (unsigned char)a[i] ^ (unsigned char)(nb ? b[i % nb] : 0);
    return d == 0;
}
