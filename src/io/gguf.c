/* GGUF (llama.cpp's file format, versions 2 and 3): a read-only mmap with the whole header validated before the
 * file is handed out, as the safetensors reader does. Every length, count, type and offset is checked against the
 * bytes that remain with overflow-safe arithmetic before anything is allocated for it; tensors must lie inside the
 * data section, aligned, without overlapping; keys and tensor names must be unique. Dequantization to f32 of the
 * block formats llama.cpp's files hold (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q4_K, Q5_K, Q6_K) follows ggml's
 * reference dequantize_row_* (ggml-quants.c), in f32 as it does. */
#include "io/io.h"
#include "tensor/tensor.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define GGUF_MAX_DIMS 4          /* GGML_MAX_DIMS */
#define GGUF_MAX_NAME 1024       /* a tensor name's bytes at most (ggml's own limit is 64) */
#define GGUF_MAX_DEPTH 8         /* nested arrays */

typedef struct kv {
    char *key;
    mmb_gguf_type type, elem;    /* elem: an array's element type */
    uint64_t n;                  /* an array's length */
    const unsigned char *at;     /* the value's bytes in the map (a string: its bytes; an array: its first element) */
    uint64_t len;                /* a string's length */
    uint64_t *str_off;           /* an array of strings: each element's offset from `at` (its 8-byte length first) */
} kv;

struct mmb_gguf {
    char *path;
    unsigned char *map;
    size_t size;
    int version;
    uint64_t n_kv, n_t;
    kv *kv;
    mmb_gguf_tensor *t;
    uint64_t *t_off;             /* each tensor's offset in the data section */
    uint32_t alignment;
    size_t data_start;
    mmb__strmap keys, names;     /* key -> index, tensor name -> index */
};

/* ---- types -------------------------------------------------------------------------------------------- */

typedef struct qtype {
    const char *name;
    int blck;                    /* elements per block */
    int size;                    /* bytes per block */
} qtype;

static const qtype qtypes[] = {
    [0] = {"F32", 1, 4},      [1] = {"F16", 1, 2},       [2] = {"Q4_0", 32, 18},   [3] = {"Q4_1", 32, 20},
    [6] = {"Q5_0", 32, 22},   [7] = {"Q5_1", 32, 24},    [8] = {"Q8_0", 32, 34},   [9] = {"Q8_1", 32, 36},
    [10] = {"Q2_K", 256, 84}, [11] = {"Q3_K", 256, 110}, [12] = {"Q4_K", 256, 144}, [13] = {"Q5_K", 256, 176},
    [14] = {"Q6_K", 256, 210}, [15] = {"Q8_K", 256, 292}, [24] = {"I8", 1, 1},      [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},     [27] = {"I64", 1, 8},      [28] = {"F64", 1, 8},     [30] = {"BF16", 1, 2},
};
#define N_QTYPES ((int)(sizeof qtypes / sizeof qtypes[0]))

static const qtype *qtype_of(int t) { return t >= 0 && t < N_QTYPES && qtypes[t].name ? &qtypes[t] : NULL; }

const char *mmb_ggml_type_name(int t) {
    const qtype *q = qtype_of(t);
    return q ? q->name : "?";
}

static const int scalar_size[] = {[MMB_GGUF_UINT8] = 1, [MMB_GGUF_INT8] = 1, [MMB_GGUF_UINT16] = 2,
                                  [MMB_GGUF_INT16] = 2, [MMB_GGUF_UINT32] = 4, [MMB_GGUF_INT32] = 4,
                                  [MMB_GGUF_FLOAT32] = 4, [MMB_GGUF_BOOL] = 1, [MMB_GGUF_STRING] = 0,
                                  [MMB_GGUF_ARRAY] = 0, [MMB_GGUF_UINT64] = 8, [MMB_GGUF_INT64] = 8,
                                  [MMB_GGUF_FLOAT64] = 8};

/* ---- the cursor ---------------------------------------------------------------------------------------- */

typedef struct cur {
    mmb_ctx *ctx;
    const char *path;
    const unsigned char *p;
    size_t left;
    size_t base;                 /* bytes before p, for messages */
} cur;

static size_t pos(const cur *c, const unsigned char *map) { return (size_t)(c->p - map); }

static mmb_status need(cur *c, uint64_t n, const char *what) {
    if (n > c->left)
        return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: %s needs %llu bytes, %zu remain (truncated or corrupt)", c->path,
                        what, (unsigned long long)n, c->left);
    return MMB_OK;
}

static void skip(cur *c, size_t n) {
    c->p += n;
    c->left -= n;
}

static uint64_t le(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static mmb_status rd(cur *c, int n, uint64_t *v, const char *what) {
    mmb_status s = need(c, (uint64_t)n, what);
    if (s != MMB_OK) return s;
    *v = le(c->p, n);
    skip(c, (size_t)n);
    return MMB_OK;
}

/* A string: u64 length, then its bytes (no NUL in the file). */
static mmb_status rd_str(cur *c, const unsigned char **s, uint64_t *len, const char *what) {
    mmb_status st = rd(c, 8, len, what);
    if (st == MMB_OK) st = need(c, *len, what);
    if (st != MMB_OK) return st;
    *s = c->p;
    skip(c, (size_t)*len);
    return MMB_OK;
}

static double as_float(mmb_gguf_type t, const unsigned char *p) {
    if (t == MMB_GGUF_FLOAT32) {
        uint32_t u = (uint32_t)le(p, 4);
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    uint64_t u = le(p, 8);
    double d;
    memcpy(&d, &u, 8);
    return d;
}

static int64_t as_int(mmb_gguf_type t, const unsigned char *p) {
    uint64_t u = le(p, scalar_size[t]);
    switch (t) {
    case MMB_GGUF_INT8: return (int8_t)u;
    case MMB_GGUF_INT16: return (int16_t)u;
    case MMB_GGUF_INT32: return (int32_t)u;
    case MMB_GGUF_INT64: return (int64_t)u;
    default: return (int64_t)u; /* unsigned up to 32 bits, bool; UINT64 above INT64_MAX is refused by the getter */
    }
}

/* Skips an array's elements (nested arrays too, depth-limited): the checks, no storage. */
static mmb_status skip_array(cur *c, uint32_t elem, uint64_t n, int depth, const char *key) {
    if (depth > GGUF_MAX_DEPTH) return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: key '%s': arrays nested deeper than %d", c->path, key, GGUF_MAX_DEPTH);
    if (elem > MMB_GGUF_FLOAT64) return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: key '%s': array of unknown type %u", c->path, key, elem);
    if (elem != MMB_GGUF_STRING && elem != MMB_GGUF_ARRAY) {
        if (n > c->left / (uint64_t)scalar_size[elem]) return need(c, UINT64_MAX, key);
        skip(c, (size_t)(n * (uint64_t)scalar_size[elem]));
        return MMB_OK;
    }
    for (uint64_t i = 0; i < n; i++) {
        mmb_status s;
        if (elem == MMB_GGUF_STRING) {
            const unsigned char *p;
            uint64_t l;
            s = rd_str(c, &p, &l, key);
        } else {
            uint64_t t, m;
            if ((s = rd(c, 4, &t, key)) == MMB_OK && (s = rd(c, 8, &m, key)) == MMB_OK)
                s = skip_array(c, (uint32_t)t, m, depth + 1, key);
        }
        if (s != MMB_OK) return s;
    }
    return MMB_OK;
}

static mmb_status parse_kv(cur *c, mmb_gguf *g, kv *e) {
    const unsigned char *k;
    uint64_t kl, t;
    mmb_status s = rd_str(c, &k, &kl, "a key");
    if (s != MMB_OK) return s;
    if (!kl || kl > 65535 || memchr(k, 0, (size_t)kl))
        return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: a key of %llu bytes (empty, too long or holding a NUL)", g->path,
                        (unsigned long long)kl);
    if (!(e->key = malloc((size_t)kl + 1))) return mmb__err(c->ctx, MMB_ERR_NOMEM, "out of memory");
    memcpy(e->key, k, (size_t)kl);
    e->key[kl] = 0;
    if ((s = rd(c, 4, &t, e->key)) != MMB_OK) return s;
    if (t > MMB_GGUF_FLOAT64)
        return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: key '%s': unknown value type %llu", g->path, e->key, (unsigned long long)t);
    e->type = (mmb_gguf_type)t;
    if (e->type == MMB_GGUF_STRING) return rd_str(c, &e->at, &e->len, e->key);
    if (e->type != MMB_GGUF_ARRAY) {
        if ((s = need(c, (uint64_t)scalar_size[e->type], e->key)) != MMB_OK) return s;
        e->at = c->p;
        skip(c, (size_t)scalar_size[e->type]);
        return MMB_OK;
    }
    uint64_t et, n;
    if ((s = rd(c, 4, &et, e->key)) != MMB_OK || (s = rd(c, 8, &n, e->key)) != MMB_OK) return s;
    if (et > MMB_GGUF_FLOAT64)
        return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: key '%s': array of unknown type %llu", g->path, e->key, (unsigned long long)et);
    e->elem = (mmb_gguf_type)et;
    e->n = n;
    e->at = c->p;
    if (e->elem == MMB_GGUF_STRING) {
        /* each element is at least its 8-byte length: a count the bytes cannot hold is refused before the
         * offsets are allocated */
        if (n > c->left / 8) return need(c, UINT64_MAX, e->key);
        if (!(e->str_off = malloc(sizeof *e->str_off * (size_t)(n ? n : 1)))) return mmb__err(c->ctx, MMB_ERR_NOMEM, "out of memory");
        for (uint64_t i = 0; i < n; i++) {
            const unsigned char *p;
            uint64_t l;
            e->str_off[i] = (uint64_t)(c->p - e->at);
            if ((s = rd_str(c, &p, &l, e->key)) != MMB_OK) return s;
        }
        return MMB_OK;
    }
    return skip_array(c, (uint32_t)et, n, 1, e->key);
}

static int cmp_off(const void *a, const void *b) {
    const uint64_t *x = *(const uint64_t *const *)a, *y = *(const uint64_t *const *)b;
    return x[0] < y[0] ? -1 : x[0] > y[0];
}

static mmb_status parse_tensor(cur *c, mmb_gguf *g, uint64_t i) {
    mmb_gguf_tensor *t = &g->t[i];
    const unsigned char *nm;
    uint64_t nl, nd, ty, off;
    mmb_status s = rd_str(c, &nm, &nl, "a tensor name");
    if (s != MMB_OK) return s;
    if (!nl || nl > GGUF_MAX_NAME || memchr(nm, 0, (size_t)nl))
        return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: tensor %llu: a name of %llu bytes (empty, too long or holding a NUL)",
                        g->path, (unsigned long long)i, (unsigned long long)nl);
    char *name = malloc((size_t)nl + 1);
    if (!name) return mmb__err(c->ctx, MMB_ERR_NOMEM, "out of memory");
    memcpy(name, nm, (size_t)nl);
    name[nl] = 0;
    t->name = name;
    if ((s = rd(c, 4, &nd, name)) != MMB_OK) return s;
    if (nd < 1 || nd > GGUF_MAX_DIMS)
        return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: tensor '%s': %llu dimensions (1 to %d)", g->path, name,
                        (unsigned long long)nd, GGUF_MAX_DIMS);
    t->ndim = (int)nd;
    uint64_t numel = 1, ne0 = 0;
    for (int d = 0; d < t->ndim; d++) {
        uint64_t ne;
        if ((s = rd(c, 8, &ne, name)) != MMB_OK) return s;
        if (ne > (uint64_t)INT64_MAX || (ne && numel > (uint64_t)INT64_MAX / ne))
            return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: tensor '%s': its element count overflows", g->path, name);
        numel *= ne;
        if (!d) ne0 = ne;
        t->shape[t->ndim - 1 - d] = (int64_t)ne; /* GGUF's ne[0] is the innermost: row-major shape reversed */
    }
    if ((s = rd(c, 4, &ty, name)) != MMB_OK || (s = rd(c, 8, &off, name)) != MMB_OK) return s;
    const qtype *q = qtype_of((int)(ty < 1024 ? ty : 1023));
    if (!q) return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: tensor '%s': unknown ggml type %llu", g->path, name, (unsigned long long)ty);
    t->ggml_type = (int)ty;
    if (ne0 % (uint64_t)q->blck)
        return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: tensor '%s': %s rows of %llu elements (a multiple of %d)", g->path, name,
                        q->name, (unsigned long long)ne0, q->blck);
    uint64_t blocks = numel / (uint64_t)q->blck;
    if (blocks > SIZE_MAX / (uint64_t)q->size) return mmb__err(c->ctx, MMB_ERR_FORMAT, "%s: tensor '%s': too large", g->path, name);
    t->nbytes = (size_t)(blocks * (uint64_t)q->size);
    g->t_off[i] = off;
    return MMB_OK;
}

static mmb_status parse(mmb_ctx *ctx, mmb_gguf *g) {
    cur c = {.ctx = ctx, .path = g->path, .p = g->map, .left = g->size};
    uint64_t magic, ver;
    mmb_status s = rd(&c, 4, &magic, "the magic");
    if (s != MMB_OK || magic != 0x46554747u)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: not a GGUF file (no 'GGUF' magic)", g->path);
    if ((s = rd(&c, 4, &ver, "the version")) != MMB_OK) return s;
    if (ver != 2 && ver != 3)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: GGUF version %llu (2 and 3 are read)", g->path, (unsigned long long)ver);
    g->version = (int)ver;
    if ((s = rd(&c, 8, &g->n_t, "the tensor count")) != MMB_OK || (s = rd(&c, 8, &g->n_kv, "the key count")) != MMB_OK) return s;
    /* a key takes 12 bytes at least, a tensor 28: counts the file cannot hold are refused before allocating */
    if (g->n_kv > c.left / 12 || g->n_t > c.left / 28)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: %llu keys and %llu tensors cannot fit in %zu bytes", g->path,
                        (unsigned long long)g->n_kv, (unsigned long long)g->n_t, g->size);
    g->kv = calloc((size_t)g->n_kv + 1, sizeof *g->kv);
    g->t = calloc((size_t)g->n_t + 1, sizeof *g->t);
    g->t_off = calloc((size_t)g->n_t + 1, sizeof *g->t_off);
    if (!g->kv || !g->t || !g->t_off) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", g->path);
    for (uint64_t i = 0; i < g->n_kv && s == MMB_OK; i++) {
        if ((s = parse_kv(&c, g, &g->kv[i])) != MMB_OK) break;
        int r = mmb__strmap_put(&g->keys, g->kv[i].key, (int64_t)i, NULL);
        if (r < 0) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        else if (!r) s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: key '%s' appears twice", g->path, g->kv[i].key);
    }
    if (s != MMB_OK) return s;
    g->alignment = 32;
    int64_t ai = mmb_gguf_find_key(g, "general.alignment");
    if (ai >= 0) {
        int64_t a = 0;
        if (g->kv[ai].type != MMB_GGUF_UINT32 || !mmb_gguf_get_int(g, ai, 0, &a) || !a || (a & (a - 1)) || a > (1 << 20))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: general.alignment must be a UINT32 power of two", g->path);
        g->alignment = (uint32_t)a;
    }
    for (uint64_t i = 0; i < g->n_t && s == MMB_OK; i++) {
        if ((s = parse_tensor(&c, g, i)) != MMB_OK) break;
        int r = mmb__strmap_put(&g->names, g->t[i].name, (int64_t)i, NULL);
        if (r < 0) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        else if (!r) s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s' appears twice", g->path, g->t[i].name);
    }
    if (s != MMB_OK) return s;
    size_t hdr = pos(&c, g->map), pad = (g->alignment - hdr % g->alignment) % g->alignment;
    g->data_start = hdr + pad;
    if (g->n_t && g->data_start > g->size)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: the data section starts past the end of the file", g->path);
    uint64_t data_len = g->n_t ? g->size - g->data_start : 0;
    /* each tensor inside the data section, aligned, and (sorted by offset) not overlapping the next */
    uint64_t **by = malloc(sizeof *by * (size_t)(g->n_t + 1));
    uint64_t *ends = malloc(sizeof *ends * (size_t)(g->n_t + 1));
    if (!by || !ends) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (uint64_t i = 0; i < g->n_t && s == MMB_OK; i++) {
        mmb_gguf_tensor *t = &g->t[i];
        uint64_t off = g->t_off[i];
        if (off % g->alignment)
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': offset %llu is not a multiple of the alignment %u", g->path,
                         t->name, (unsigned long long)off, g->alignment);
        else if (off > data_len || t->nbytes > data_len - off)
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': bytes %llu..%llu lie past the data section's %llu",
                         g->path, t->name, (unsigned long long)off, (unsigned long long)(off + t->nbytes),
                         (unsigned long long)data_len);
        else {
            t->data = g->map + g->data_start + off;
            ends[i] = off + t->nbytes;
            by[i] = &g->t_off[i];
        }
    }
    if (s == MMB_OK && g->n_t > 1) {
        qsort(by, (size_t)g->n_t, sizeof *by, cmp_off);
        for (uint64_t k = 1; k < g->n_t && s == MMB_OK; k++) {
            uint64_t a = (uint64_t)(by[k - 1] - g->t_off), b = (uint64_t)(by[k] - g->t_off);
            if (g->t[a].nbytes && g->t[b].nbytes && ends[a] > g->t_off[b])
                s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap", g->path, g->t[a].name, g->t[b].name);
        }
    }
    free(by);
    free(ends);
    return s;
}

/* ---- the public calls --------------------------------------------------------------------------------- */

mmb_status mmb_gguf_open(mmb_ctx *ctx, const char *path, mmb_gguf **out) {
    if (!path || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_gguf_open: NULL argument");
    mmb_gguf *g = calloc(1, sizeof *g);
    if (!g || !(g->path = strdup(path))) {
        free(g);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
    }
    int fd = -1;
    mmb_status s = mmb__open_input(ctx, path, &fd, &g->size);
    if (s == MMB_OK && g->size) {
        void *m = mmap(NULL, g->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) s = mmb__err(ctx, MMB_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
        else g->map = m;
    }
    if (fd >= 0) close(fd);
    if (s == MMB_OK) s = parse(ctx, g);
    if (s != MMB_OK) {
        mmb_gguf_close(g);
        return s;
    }
    *out = g;
    return MMB_OK;
}

void mmb_gguf_close(mmb_gguf *g) {
    if (!g) return;
    for (uint64_t i = 0; g->kv && i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].str_off);
    }
    for (uint64_t i = 0; g->t && i < g->n_t; i++) free((char *)g->t[i].name);
    mmb__strmap_free(&g->keys);
    mmb__strmap_free(&g->names);
    free(g->kv);
    free(g->t);
    free(g->t_off);
    if (g->map) munmap(g->map, g->size);
    free(g->path);
    free(g);
}

int mmb_gguf_version(const mmb_gguf *g) { return g ? g->version : 0; }
int64_t mmb_gguf_kv_count(const mmb_gguf *g) { return g ? (int64_t)g->n_kv : 0; }
int64_t mmb_gguf_tensor_count(const mmb_gguf *g) { return g ? (int64_t)g->n_t : 0; }

const char *mmb_gguf_key(const mmb_gguf *g, int64_t i) {
    return g && i >= 0 && (uint64_t)i < g->n_kv ? g->kv[i].key : NULL;
}

int64_t mmb_gguf_find_key(const mmb_gguf *g, const char *key) {
    int64_t i;
    return g && key && mmb__strmap_get(&g->keys, key, &i) ? i : -1;
}

mmb_gguf_type mmb_gguf_kv_type(const mmb_gguf *g, int64_t i, mmb_gguf_type *elem, int64_t *n) {
    if (!g || i < 0 || (uint64_t)i >= g->n_kv) return (mmb_gguf_type)-1;
    const kv *e = &g->kv[i];
    if (elem) *elem = e->type == MMB_GGUF_ARRAY ? e->elem : e->type;
    if (n) *n = e->type == MMB_GGUF_ARRAY ? (int64_t)e->n : 1;
    return e->type;
}

/* The element k of key i (k 0 for a scalar): its bytes, or NULL (out of range, or a nested array). */
static const unsigned char *elem_at(const mmb_gguf *g, int64_t i, int64_t k, mmb_gguf_type *t) {
    if (!g || i < 0 || (uint64_t)i >= g->n_kv || k < 0) return NULL;
    const kv *e = &g->kv[i];
    if (e->type != MMB_GGUF_ARRAY) {
        *t = e->type;
        return k == 0 ? e->at : NULL;
    }
    if ((uint64_t)k >= e->n || e->elem == MMB_GGUF_ARRAY) return NULL;
    *t = e->elem;
    return e->elem == MMB_GGUF_STRING ? e->at + e->str_off[k] : e->at + (uint64_t)k * (uint64_t)scalar_size[e->elem];
}

int mmb_gguf_get_int(const mmb_gguf *g, int64_t i, int64_t k, int64_t *out) {
    mmb_gguf_type t;
    const unsigned char *p = elem_at(g, i, k, &t);
    if (!p || !out || t == MMB_GGUF_STRING || t == MMB_GGUF_FLOAT32 || t == MMB_GGUF_FLOAT64) return 0;
    if (t == MMB_GGUF_UINT64 && le(p, 8) > (uint64_t)INT64_MAX) return 0;
    *out = as_int(t, p);
    return 1;
}

int mmb_gguf_get_float(const mmb_gguf *g, int64_t i, int64_t k, double *out) {
    mmb_gguf_type t;
    const unsigned char *p = elem_at(g, i, k, &t);
    if (!p || !out || t == MMB_GGUF_STRING) return 0;
    if (t == MMB_GGUF_FLOAT32 || t == MMB_GGUF_FLOAT64) *out = as_float(t, p);
    else if (t == MMB_GGUF_UINT64) *out = (double)le(p, 8);
    else *out = (double)as_int(t, p);
    return 1;
}

const char *mmb_gguf_get_str(const mmb_gguf *g, int64_t i, int64_t k, size_t *len) {
    mmb_gguf_type t;
    const unsigned char *p = elem_at(g, i, k, &t);
    if (!p || t != MMB_GGUF_STRING) return NULL;
    if (g->kv[i].type == MMB_GGUF_STRING) {
        if (len) *len = (size_t)g->kv[i].len;
        return (const char *)p;
    }
    if (len) *len = (size_t)le(p, 8);
    return (const char *)p + 8;
}

const mmb_gguf_tensor *mmb_gguf_tensor_at(const mmb_gguf *g, int64_t i) {
    return g && i >= 0 && (uint64_t)i < g->n_t ? &g->t[i] : NULL;
}

const mmb_gguf_tensor *mmb_gguf_find_tensor(const mmb_gguf *g, const char *name) {
    int64_t i;
    return g && name && mmb__strmap_get(&g->names, name, &i) ? &g->t[i] : NULL;
}

/* ---- dequantization (ggml-quants.c's dequantize_row_*) ---------------------------------------------------- */

static float h2f(const unsigned char *p) { return mmb__f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

static void get_scale_min_k4(int j, const unsigned char *q, unsigned char *d, unsigned char *m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (unsigned char)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (unsigned char)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* One block of type t at b into y (qtypes[t].blck floats). */
static void dequant_block(int t, const unsigned char *b, float *y) {
    switch (t) {
    case 2: { /* Q4_0: d, 16 bytes of two 4-bit values, offset 8 */
        float d = h2f(b);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((b[2 + j] & 0xF) - 8) * d;
            y[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
        }
        break;
    }
    case 3: { /* Q4_1: d, m */
        float d = h2f(b), m = h2f(b + 2);
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(b[4 + j] & 0xF) * d + m;
            y[j + 16] = (float)(b[4 + j] >> 4) * d + m;
        }
        break;
    }
    case 6: case 7: { /* Q5_0 (offset 16) and Q5_1 (d, m): a fifth bit per value in qh */
        int one = t == 7;
        float d = h2f(b), m = one ? h2f(b + 2) : 0;
        const unsigned char *qh = b + 2 + 2 * one, *qs = qh + 4;
        uint32_t h = (uint32_t)le(qh, 4);
        for (int j = 0; j < 16; j++) {
            int x0 = (int)((qs[j] & 0x0F) | (((h >> j) << 4) & 0x10));
            int x1 = (int)((qs[j] >> 4) | ((h >> (j + 12)) & 0x10));
            if (one) {
                y[j] = (float)x0 * d + m;
                y[j + 16] = (float)x1 * d + m;
            } else {
                y[j] = (float)(x0 - 16) * d;
                y[j + 16] = (float)(x1 - 16) * d;
            }
        }
        break;
    }
    case 8: { /* Q8_0 */
        float d = h2f(b);
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)b[2 + j] * d;
        break;
    }
    case 10: { /* Q2_K: scales[16], qs[64], d, dmin */
        const unsigned char *sc = b, *q = b + 16;
        float d = h2f(b + 80), mn = h2f(b + 82);
        int is = 0;
        for (int n = 0; n < 256; n += 128) {
            int shift = 0;
            for (int j = 0; j < 4; j++) {
                int s = sc[is++];
                float dl = d * (float)(s & 0xF), ml = mn * (float)(s >> 4);
                for (int l = 0; l < 16; l++) *y++ = dl * (float)((q[l] >> shift) & 3) - ml;
                s = sc[is++];
                dl = d * (float)(s & 0xF);
                ml = mn * (float)(s >> 4);
                for (int l = 0; l < 16; l++) *y++ = dl * (float)((q[l + 16] >> shift) & 3) - ml;
                shift += 2;
            }
            q += 32;
        }
        break;
    }
    case 12: case 13: { /* Q4_K: d, dmin, scales[12], qs[128]; Q5_K: ... qh[32] before qs */
        int five = t == 13;
        float d = h2f(b), mn = h2f(b + 2);
        const unsigned char *scales = b + 4, *qh = b + 16, *ql = b + 16 + 32 * five;
        unsigned char u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < 256; j += 64, is += 2) {
            unsigned char sc, m;
            get_scale_min_k4(is, scales, &sc, &m);
            float d1 = d * sc, m1 = mn * m;
            get_scale_min_k4(is + 1, scales, &sc, &m);
            float d2 = d * sc, m2 = mn * m;
            for (int l = 0; l < 32; l++) y[l] = d1 * (float)((ql[l] & 0xF) + (five && (qh[l] & u1) ? 16 : 0)) - m1;
            for (int l = 0; l < 32; l++) y[l + 32] = d2 * (float)((ql[l] >> 4) + (five && (qh[l] & u2) ? 16 : 0)) - m2;
            ql += 32;
            y += 64;
            u1 = (unsigned char)(u1 << 2);
            u2 = (unsigned char)(u2 << 2);
        }
        break;
    }
    case 14: { /* Q6_K: ql[128], qh[64], scales[16] (int8), d */
        const unsigned char *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = h2f(b + 208);
        for (int n = 0; n < 256; n += 128) {
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
        break;
    }
    }
}

mmb_status mmb_gguf_dequantize(mmb_ctx *ctx, const mmb_gguf_tensor *t, float *out, size_t count) {
    if (!t || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_gguf_dequantize: NULL argument");
    const qtype *q = qtype_of(t->ggml_type);
    size_t n = q ? t->nbytes / (size_t)q->size * (size_t)q->blck : 0;
    int ok = q && (t->ggml_type <= 3 || t->ggml_type == 6 || t->ggml_type == 7 || t->ggml_type == 8 ||
                   t->ggml_type == 10 || t->ggml_type == 12 || t->ggml_type == 13 || t->ggml_type == 14 ||
                   t->ggml_type == 30);
    if (!ok)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "tensor '%s': ggml type %s is not dequantized (F32, F16, BF16, Q4_0, "
                        "Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q4_K, Q5_K, Q6_K are)", t->name, mmb_ggml_type_name(t->ggml_type));
    if (count < n) return mmb__err(ctx, MMB_ERR_SHAPE, "tensor '%s': %zu floats needed, %zu given", t->name, n, count);
    const unsigned char *b = t->data;
    if (t->ggml_type == 0) memcpy(out, b, n * sizeof(float));
    else if (t->ggml_type == 1) for (size_t i = 0; i < n; i++) out[i] = h2f(b + 2 * i);
    else if (t->ggml_type == 30) for (size_t i = 0; i < n; i++) out[i] = mmb__bf16_to_f32((uint16_t)(b[2 * i] | b[2 * i + 1] << 8));
    else
        for (size_t k = 0; k < n / (size_t)q->blck; k++) dequant_block(t->ggml_type, b + k * (size_t)q->size, out + k * (size_t)q->blck);
    return MMB_OK;
}

int64_t mmb_gguf_numel(const mmb_gguf_tensor *t) {
    const qtype *q = t ? qtype_of(t->ggml_type) : NULL;
    return q ? (int64_t)(t->nbytes / (size_t)q->size * (size_t)q->blck) : 0;
}
