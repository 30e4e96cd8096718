/* Safetensors: a read-only mmap with the whole header validated up front, and an atomic writer.
 *
 * Format: u64 little-endian header length H, H bytes of JSON, then the data section. The JSON maps
 * each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the
 * data section), plus an optional "__metadata__" object of string values. */
#include "io/io.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_HEADER (100u << 20) /* the format's own limit: 100 MB of JSON */

struct mmb_st_file {
    char *path;
    unsigned char *map;
    size_t size;
    int n;
    mmb_tensor *t;
    uint64_t *begin, *end;  /* byte ranges in the data section, per tensor */
    void **owned;           /* per tensor: an aligned copy when the mapped bytes are misaligned */
    int n_meta;
    char **meta_k, **meta_v;
    mmb_st_file *next_open;  /* the list of open mappings (mmb__release_mapped) */
    mmb__strmap names;       /* tensor name -> index in t: the header's duplicate check and mmb_st_find */
    int fd;                  /* kept open while mapped: mmb__st_verify fstats it (truncation while open) */
};

/* Every open file's mapping, so that mmb__release_mapped can tell a file's pages, which refault
 * from the file, from heap memory, which MADV_DONTNEED would zero. */
static pthread_mutex_t open_lock = PTHREAD_MUTEX_INITIALIZER;
static mmb_st_file *open_files;

static void open_list_add(mmb_st_file *f) {
    pthread_mutex_lock(&open_lock);
    f->next_open = open_files;
    open_files = f;
    pthread_mutex_unlock(&open_lock);
}

static void open_list_remove(mmb_st_file *f) {
    pthread_mutex_lock(&open_lock);
    for (mmb_st_file **p = &open_files; *p; p = &(*p)->next_open)
        if (*p == f) { *p = f->next_open; break; }
    pthread_mutex_unlock(&open_lock);
}

void mmb__release_mapped(const void *p, size_t n) {
    long ps = sysconf(_SC_PAGESIZE);
    uintptr_t page = ps > 0 ? (uintptr_t)ps : 4096, a = (uintptr_t)p;
    uintptr_t lo = (a + page - 1) & ~(page - 1), hi = (a + n) & ~(page - 1);  /* whole pages only */
    if (!p || hi <= lo) return;
    pthread_mutex_lock(&open_lock);
    for (const mmb_st_file *f = open_files; f; f = f->next_open)
        if (a >= (uintptr_t)f->map && a + n <= (uintptr_t)f->map + f->size) {
            /* A private read-only file mapping: the pages are only ever the file's, and a later read
             * faults them in again. Failure only leaves them resident, so it is ignored. */
            (void)madvise((void *)lo, hi - lo, MADV_DONTNEED);
            break;
        }
    pthread_mutex_unlock(&open_lock);
}

void mmb_st_close(mmb_st_file *f) {
    if (!f) return;
    open_list_remove(f);
    if (f->map) munmap(f->map, f->size);
    if (f->fd >= 0) close(f->fd);
    for (int i = 0; i < f->n; i++) free((char *)f->t[i].name);
    for (int i = 0; f->owned && i < f->n; i++) free(f->owned[i]);
    free(f->owned);
    for (int i = 0; i < f->n_meta; i++) { free(f->meta_k[i]); free(f->meta_v[i]); }
    free(f->t);
    free(f->begin);
    free(f->end);
    free(f->meta_k);
    free(f->meta_v);
    mmb__strmap_free(&f->names);
    free(f->path);
    free(f);
}

/* Reads a JSON number that must be a non-negative integer below 2^53 exactly. */
static bool json_u64(const cJSON *j, uint64_t *out) {
    if (!cJSON_IsNumber(j)) return false;
    double d = j->valuedouble;
    if (!(d >= 0 && d <= 9007199254740992.0) || d != (double)(uint64_t)d) return false;
    *out = (uint64_t)d;
    return true;
}

static mmb_status parse_meta(mmb_ctx *ctx, mmb_st_file *f, const cJSON *meta) {
    if (!cJSON_IsObject(meta))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: __metadata__ is not an object", f->path);
    if (f->meta_k)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: __metadata__ appears twice in the header", f->path);
    int n = cJSON_GetArraySize(meta);
    f->meta_k = calloc((size_t)n + 1, sizeof(char *));
    f->meta_v = calloc((size_t)n + 1, sizeof(char *));
    if (!f->meta_k || !f->meta_v) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", f->path);
    for (const cJSON *e = meta->child; e; e = e->next) {
        if (!cJSON_IsString(e))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: __metadata__ value '%s' is not a string", f->path, e->string);
        f->meta_k[f->n_meta] = strdup(e->string);
        f->meta_v[f->n_meta] = strdup(e->valuestring);
        f->n_meta++;
        if (!f->meta_k[f->n_meta - 1] || !f->meta_v[f->n_meta - 1])
            return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", f->path);
    }
    return MMB_OK;
}

/* Validates one header entry and fills tensor i. data_len is the size of the data section. */
static mmb_status parse_entry(mmb_ctx *ctx, mmb_st_file *f, const cJSON *e, uint64_t data_len,
                              const unsigned char *data) {
    const char *name = e->string;
    mmb_tensor *t = &f->t[f->n];
    if (!cJSON_IsObject(e))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': entry is not an object", f->path, name);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *of = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsString(dt))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': missing or non-string dtype", f->path, name);
    if (!mmb__dtype_parse(dt->valuestring, &t->dtype))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': unknown dtype '%s'", f->path, name, dt->valuestring);
    if (!cJSON_IsArray(sh) || cJSON_GetArraySize(sh) > MMB_MAX_DIMS)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': shape is not an array of at most %d dims",
                        f->path, name, MMB_MAX_DIMS);
    uint64_t numel = 1;
    t->ndim = 0;
    for (const cJSON *d = sh->child; d; d = d->next) {
        uint64_t v;
        if (!json_u64(d, &v) || v > INT64_MAX)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': shape entry is not a non-negative integer",
                            f->path, name);
        if (!mmb__mul_ok(numel, v, &numel))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': shape product overflows", f->path, name);
        t->shape[t->ndim++] = (int64_t)v;
    }
    uint64_t b, en, bytes;
    if (!cJSON_IsArray(of) || cJSON_GetArraySize(of) != 2 || !json_u64(of->child, &b) ||
        !json_u64(of->child->next, &en))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': data_offsets is not [begin, end]", f->path, name);
    if (b > en || en > data_len)
        return mmb__err(ctx, MMB_ERR_FORMAT,
                        "%s: tensor '%s': data_offsets [%llu, %llu] outside the %llu-byte data section",
                        f->path, name, (unsigned long long)b, (unsigned long long)en, (unsigned long long)data_len);
    if (!mmb__mul_ok(numel, mmb_dtype_size(t->dtype), &bytes) || bytes != en - b)
        return mmb__err(ctx, MMB_ERR_FORMAT,
                        "%s: tensor '%s': shape and dtype %s need %llu bytes but data_offsets give %llu",
                        f->path, name, dt->valuestring, (unsigned long long)numel * mmb_dtype_size(t->dtype),
                        (unsigned long long)(en - b));
    t->name = strdup(name);
    if (!t->name) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", f->path);
    t->data = data + b;
    /* The format does not promise alignment (odd header lengths occur in published files), but
     * readers cast data to the element type: give a misaligned tensor an aligned (malloc) copy. */
    if (bytes && (uintptr_t)t->data % mmb_dtype_size(t->dtype) != 0) {
        void *copy = malloc((size_t)bytes);
        if (!copy) {
            free((char *)t->name);
            t->name = NULL;
            return mmb__err(ctx, MMB_ERR_NOMEM, "%s: tensor '%s': out of memory", f->path, name);
        }
        memcpy(copy, t->data, (size_t)bytes);
        f->owned[f->n] = copy;
        t->data = copy;
    }
    f->begin[f->n] = b;
    f->end[f->n] = en;
    f->n++;
    return MMB_OK;
}

static int cmp_range(const void *a, const void *b) {
    const uint64_t *x = a, *y = b;
    return x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : (x[1] < y[1] ? -1 : x[1] > y[1]);
}

/* Rejects overlapping ranges (empty tensors overlap nothing). */
static mmb_status check_overlap(mmb_ctx *ctx, mmb_st_file *f) {
    uint64_t(*r)[3] = malloc(sizeof *r * ((size_t)f->n + 1));
    if (!r) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", f->path);
    int m = 0;
    for (int i = 0; i < f->n; i++)
        if (f->end[i] > f->begin[i]) { r[m][0] = f->begin[i]; r[m][1] = f->end[i]; r[m][2] = (uint64_t)i; m++; }
    qsort(r, (size_t)m, sizeof *r, cmp_range);
    mmb_status s = MMB_OK;
    for (int i = 1; i < m && s == MMB_OK; i++)
        if (r[i][0] < r[i - 1][1])
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s': data overlaps tensor '%s'", f->path,
                         f->t[r[i][2]].name, f->t[r[i - 1][2]].name);
    free(r);
    return s;
}

static mmb_status parse_header(mmb_ctx *ctx, mmb_st_file *f) {
    if (f->size < 8)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: truncated: %zu bytes, shorter than the 8-byte header length",
                        f->path, f->size);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | f->map[i];
    if (hlen > MAX_HEADER || hlen > f->size - 8)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: truncated or corrupt: header length %llu, file has %zu bytes",
                        f->path, (unsigned long long)hlen, f->size);
    cJSON *root = cJSON_ParseWithLength((const char *)f->map + 8, (size_t)hlen);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: header is not a JSON object", f->path);
    }
    int n = cJSON_GetArraySize(root);
    f->t = calloc((size_t)n + 1, sizeof *f->t);
    f->begin = calloc((size_t)n + 1, sizeof *f->begin);
    f->end = calloc((size_t)n + 1, sizeof *f->end);
    f->owned = calloc((size_t)n + 1, sizeof *f->owned);
    mmb_status s = (f->t && f->begin && f->end && f->owned) ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", f->path);
    const unsigned char *data = f->map + 8 + hlen;
    uint64_t data_len = f->size - 8 - hlen;
    for (const cJSON *e = root->child; e && s == MMB_OK; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) { s = parse_meta(ctx, f, e); continue; }
        if ((s = parse_entry(ctx, f, e, data_len, data)) != MMB_OK) break;
        /* The name goes in the hash set (expected O(1)), so a header of n entries parses in O(n log n)
         * with the overlap check's sort; the name is the tensor's own copy, which outlives the set. */
        int r = mmb__strmap_put(&f->names, f->t[f->n - 1].name, f->n - 1, NULL);
        if (r < 0) s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", f->path);
        else if (r == 0)
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s' appears twice in the header", f->path, e->string);
    }
    cJSON_Delete(root);
    return s == MMB_OK ? check_overlap(ctx, f) : s;
}

mmb_status mmb_st_open(mmb_ctx *ctx, const char *path, mmb_st_file **out) {
    if (!path || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_st_open: NULL argument");
    mmb_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
    }
    int fd = -1;
    f->fd = -1;
    mmb_status s = mmb__open_input(ctx, path, &fd, &f->size);  /* a FIFO, device or socket: refused at once */
    if (s == MMB_OK) {
        if (f->size > 0) {
            void *m = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
            if (m == MAP_FAILED) s = mmb__err(ctx, MMB_ERR_IO, "%s: cannot map: %s", path, strerror(errno));
            else f->map = m;
        }
    }
    if (fd >= 0 && (s != MMB_OK || !f->map)) close(fd);
    else if (fd >= 0) f->fd = fd;
    if (s == MMB_OK) s = parse_header(ctx, f);
    if (s != MMB_OK) { mmb_st_close(f); return s; }
    if (f->map) open_list_add(f);
    *out = f;
    return MMB_OK;
}

int mmb_st_count(const mmb_st_file *f) { return f->n; }

const mmb_tensor *mmb_st_at(const mmb_st_file *f, int i) { return i >= 0 && i < f->n ? &f->t[i] : NULL; }

const mmb_tensor *mmb_st_find(const mmb_st_file *f, const char *name) {
    int64_t i;
    return name && mmb__strmap_get(&f->names, name, &i) ? &f->t[i] : NULL;
}

uint64_t mmb__st_probes(const mmb_st_file *f) { return f->names.probes; }

mmb_status mmb__st_verify(mmb_ctx *ctx, const mmb_st_file *f) {
    struct stat st;
    if (!f || f->fd < 0) return MMB_OK;
    if (fstat(f->fd, &st) != 0)
        return mmb__err(ctx, MMB_ERR_IO, "%s: cannot stat the open file: %s", f->path, strerror(errno));
    if ((uint64_t)st.st_size < (uint64_t)f->size)
        return mmb__err(ctx, MMB_ERR_IO, "%s: truncated while open (%lld bytes, %zu when opened): its mapped "
                        "weights are gone; reopen the model (replace checkpoints by writing a new file and renaming "
                        "it, never in place)", f->path, (long long)st.st_size, f->size);
    return MMB_OK;
}

const char *mmb_st_meta(const mmb_st_file *f, const char *key) {
    for (int i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_k[i], key) == 0) return f->meta_v[i];
    return NULL;
}

const char *mmb__st_path(const mmb_st_file *f) { return f->path; }

/* ---- writer ---- */

static char *build_header(const mmb_tensor *ts, int n, const char *const *keys, const char *const *values, int n_meta,
                          uint64_t *data_len) {
    cJSON *root = cJSON_CreateObject();
    uint64_t off = 0;
    bool ok = root != NULL;
    cJSON *meta = ok && n_meta > 0 ? cJSON_AddObjectToObject(root, "__metadata__") : NULL;
    ok = ok && (n_meta == 0 || meta);
    for (int i = 0; i < n_meta && ok; i++) ok = cJSON_AddStringToObject(meta, keys[i], values[i]) != NULL;
    for (int i = 0; i < n && ok; i++) {
        cJSON *e = cJSON_AddObjectToObject(root, ts[i].name);
        cJSON *sh = e ? cJSON_AddArrayToObject(e, "shape") : NULL;
        cJSON *of = e ? cJSON_AddArrayToObject(e, "data_offsets") : NULL;
        ok = sh && of && cJSON_AddStringToObject(e, "dtype", mmb_dtype_name(ts[i].dtype));
        for (int d = 0; d < ts[i].ndim && ok; d++)
            ok = cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)ts[i].shape[d]));
        uint64_t bytes = (uint64_t)mmb_tensor_numel(&ts[i]) * mmb_dtype_size(ts[i].dtype);
        ok = ok && cJSON_AddItemToArray(of, cJSON_CreateNumber((double)off)) &&
             cJSON_AddItemToArray(of, cJSON_CreateNumber((double)(off + bytes)));
        off += bytes;
    }
    char *s = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    *data_len = off;
    return s;
}

mmb_status mmb_st_write(mmb_ctx *ctx, const char *path, const mmb_tensor *ts, int n) {
    return mmb_st_write_meta(ctx, path, ts, n, NULL, NULL, 0);
}

mmb_status mmb_st_write_meta(mmb_ctx *ctx, const char *path, const mmb_tensor *ts, int n, const char *const *keys,
                             const char *const *values, int n_meta) {
    if (!path || (!ts && n > 0) || n < 0 || n_meta < 0 || (n_meta > 0 && (!keys || !values)))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_st_write: bad arguments");
    for (int i = 0; i < n_meta; i++) {
        if (!keys[i] || !keys[i][0] || !values[i])
            return mmb__err(ctx, MMB_ERR_ARG, "%s: metadata entry %d has an empty key or a NULL value", path, i);
        for (int j = 0; j < i; j++)
            if (strcmp(keys[i], keys[j]) == 0)
                return mmb__err(ctx, MMB_ERR_ARG, "%s: metadata key '%s' given twice", path, keys[i]);
    }
    for (int i = 0; i < n; i++) {
        if (!ts[i].name || !ts[i].name[0] || strcmp(ts[i].name, "__metadata__") == 0)
            return mmb__err(ctx, MMB_ERR_ARG, "%s: tensor %d has an empty or reserved name", path, i);
        if (mmb_dtype_size(ts[i].dtype) == 0 || ts[i].ndim < 0 || ts[i].ndim > MMB_MAX_DIMS)
            return mmb__err(ctx, MMB_ERR_ARG, "%s: tensor '%s' has a bad dtype or rank", path, ts[i].name);
        for (int j = 0; j < i; j++)
            if (strcmp(ts[i].name, ts[j].name) == 0)
                return mmb__err(ctx, MMB_ERR_ARG, "%s: tensor name '%s' given twice", path, ts[i].name);
    }
    uint64_t data_len;
    char *hdr = build_header(ts, n, keys, values, n_meta, &data_len);
    if (!hdr) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: cannot build the header", path);
    size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7;
    mmb__out o;
    mmb_status s = mmb__out_open(ctx, path, &o);
    if (s != MMB_OK) {
        free(hdr);
        return s;
    }
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    bool ok = fwrite(len8, 1, 8, o.f) == 8 && fwrite(hdr, 1, hl, o.f) == hl;
    for (size_t i = hl; i < padded && ok; i++) ok = fputc(' ', o.f) != EOF;
    for (int i = 0; i < n && ok; i++) {
        size_t bytes = (size_t)mmb_tensor_numel(&ts[i]) * mmb_dtype_size(ts[i].dtype);
        ok = bytes == 0 || fwrite(ts[i].data, 1, bytes, o.f) == bytes;
    }
    if (!ok) {
        s = mmb__err(ctx, MMB_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        mmb__out_abort(&o);
    } else
        s = mmb__out_commit(ctx, &o);
    free(hdr);
    return s;
}
