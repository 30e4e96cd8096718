/* A checkpoint directory: config.json through cJSON, and its safetensors (single file, several
 * files, or the shards named by model.safetensors.index.json). */
#include "io/io.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_JSON (64u << 20)

/* Reads and parses a whole JSON file. */
static mmb_status read_json(mmb_ctx *ctx, const char *path, cJSON **out) {
    FILE *fp = NULL;
    mmb_status so = mmb__fopen_input(ctx, path, &fp);  /* a FIFO, device or socket: refused at once */
    if (so != MMB_OK) return so;
    char *buf = NULL;
    size_t len = 0, cap = 0;
    mmb_status s = MMB_OK;
    for (;;) {
        if (len == cap) {
            cap = cap ? cap * 2 : 65536;
            char *nb = cap <= MAX_JSON ? realloc(buf, cap) : NULL;
            if (!nb) { s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: larger than %u bytes or out of memory", path, MAX_JSON); break; }
            buf = nb;
        }
        size_t r = fread(buf + len, 1, cap - len, fp);
        len += r;
        if (r == 0) {
            if (ferror(fp)) s = mmb__err(ctx, MMB_ERR_IO, "%s: read error", path);
            break;
        }
    }
    fclose(fp);
    if (s == MMB_OK) {
        const char *end = NULL;
        *out = cJSON_ParseWithLengthOpts(buf, len, &end, 0);
        if (!*out) {
            size_t at = end ? (size_t)(end - buf) : 0;
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: malformed JSON near byte %zu", path, at);
        } else if (!cJSON_IsObject(*out)) {
            cJSON_Delete(*out);
            *out = NULL;
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: top level is not a JSON object", path);
        }
    }
    free(buf);
    return s;
}

mmb_status mmb__json_read(mmb_ctx *ctx, const char *path, cJSON **out) { return read_json(ctx, path, out); }

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* Opens dir/name as the next file of c (the caller opens each name once); sets *file (may be NULL) to it. */
static mmb_status add_file(mmb_ctx *ctx, mmb_ckpt *c, const char *name, const mmb_st_file **file) {
    mmb_st_file **nf = realloc(c->files, sizeof *nf * (size_t)(c->n_files + 1));
    char *path = join(c->dir, name);
    if (!nf || !path) { free(path); if (nf) c->files = nf; return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir); }
    c->files = nf;
    mmb_status s = mmb_st_open(ctx, path, &c->files[c->n_files]);
    free(path);
    if (s == MMB_OK && file) *file = c->files[c->n_files];
    if (s == MMB_OK) c->n_files++;
    return s;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Every *.safetensors in the directory, in name order. */
static mmb_status scan_dir(mmb_ctx *ctx, mmb_ckpt *c) {
    DIR *d = opendir(c->dir);
    if (!d) return mmb__err(ctx, MMB_ERR_IO, "%s: cannot open directory: %s", c->dir, strerror(errno));
    char **names = NULL;
    int n = 0;
    mmb_status s = MMB_OK;
    for (struct dirent *e; (e = readdir(d)) && s == MMB_OK;) {
        size_t l = strlen(e->d_name);
        if (l <= 12 || strcmp(e->d_name + l - 12, ".safetensors") != 0) continue;
        char **nn = realloc(names, sizeof *nn * (size_t)(n + 1));
        if (!nn || !(nn[n] = strdup(e->d_name))) { s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir); if (nn) names = nn; break; }
        names = nn;
        n++;
    }
    closedir(d);
    if (names) qsort(names, (size_t)n, sizeof *names, cmp_str);
    for (int i = 0; i < n && s == MMB_OK; i++) s = add_file(ctx, c, names[i], NULL);
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    if (s == MMB_OK && c->n_files == 0)
        s = mmb__err(ctx, MMB_ERR_MISSING, "%s: no *.safetensors file (pytorch_model.bin is not read; convert it "
                     "with safetensors first)", c->dir);
    return s;
}

static mmb_status read_index(mmb_ctx *ctx, mmb_ckpt *c, const char *ipath) {
    cJSON *idx = NULL;
    mmb_status s = read_json(ctx, ipath, &idx);
    if (s != MMB_OK) return s;
    mmb__strmap shards = {0};
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(idx, "weight_map");
    if (!cJSON_IsObject(wm)) s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: no weight_map object", ipath);
    for (const cJSON *e = wm ? wm->child : NULL; e && s == MMB_OK; e = e->next) {
        if (!cJSON_IsString(e)) { s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: weight_map['%s'] is not a file name", ipath, e->string); break; }
        const char *name = e->valuestring;
        if (strchr(name, '/') || strcmp(name, "..") == 0 || strcmp(name, ".") == 0 || !name[0]) {
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: weight_map['%s'] names a file outside the directory: '%s'", ipath,
                         e->string, name);
            break;
        }
        /* Each shard is opened once: a map from its name (borrowed from idx) to its index in c->files. */
        const mmb_st_file *f = NULL;
        int64_t at;
        if (mmb__strmap_get(&shards, name, &at)) f = c->files[at];
        else if ((s = add_file(ctx, c, name, &f)) == MMB_OK &&
                 mmb__strmap_put(&shards, name, c->n_files - 1, NULL) < 0)
            s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", ipath);
        if (s == MMB_OK && !mmb_st_find(f, e->string))
            s = mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' is listed in %s but not in that file", ipath,
                         e->string, e->valuestring);
    }
    mmb__strmap_free(&shards);
    cJSON_Delete(idx);
    return s;
}

/* A tensor present in two files is ambiguous: refuse it. One hash set over every file's names (each
 * file's own names are already unique), so n tensors in all take O(n). */
static mmb_status check_unique(mmb_ctx *ctx, const mmb_ckpt *c) {
    if (c->n_files < 2) return MMB_OK;
    mmb__strmap all = {0};
    mmb_status s = MMB_OK;
    for (int i = 0; i < c->n_files && s == MMB_OK; i++)
        for (int k = 0; k < mmb_st_count(c->files[i]) && s == MMB_OK; k++) {
            const char *name = mmb_st_at(c->files[i], k)->name;
            int64_t j;
            int r = mmb__strmap_put(&all, name, i, &j);
            if (r < 0) s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
            else if (r == 0)
                s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s' is in both %s and %s", c->dir, name,
                             mmb__st_path(c->files[j]), mmb__st_path(c->files[i]));
        }
    mmb__strmap_free(&all);
    return s;
}

mmb_status mmb__ckpt_verify(mmb_ctx *ctx, const mmb_ckpt *c) {
    mmb_status s = MMB_OK;
    for (int i = 0; c && i < c->n_files && s == MMB_OK; i++) s = mmb__st_verify(ctx, c->files[i]);
    return s;
}

mmb_status mmb__ckpt_open(mmb_ctx *ctx, const char *dir, mmb_ckpt *out) {
    mmb_ckpt c = {0};
    if (!(c.dir = strdup(dir))) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", dir);
    char *cfg = join(dir, "config.json"), *idx = join(dir, "model.safetensors.index.json");
    mmb_status s = (cfg && idx) ? read_json(ctx, cfg, &c.config) : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK) {
        struct stat st;  /* present in any form: read_index refuses what is not a regular file */
        if (stat(idx, &st) == 0 || errno != ENOENT) s = read_index(ctx, &c, idx);
        else s = scan_dir(ctx, &c);
    }
    if (s == MMB_OK) s = check_unique(ctx, &c);
    free(cfg);
    free(idx);
    if (s != MMB_OK) { mmb__ckpt_close(&c); return s; }
    *out = c;
    return MMB_OK;
}

/* The tensors a synthetic checkpoint made, in a list. */
typedef struct synth_tensor {
    struct synth_tensor *next;
    mmb_tensor t;
    char name[];
} synth_tensor;

struct mmb_synth {
    synth_tensor *head;
    uint64_t state;
    float scale;
};

mmb_status mmb__ckpt_synth(mmb_ctx *ctx, const char *name, cJSON *config, float scale, mmb_ckpt *out) {
    mmb_ckpt c = {.config = config, .dir = strdup(name), .synth = calloc(1, sizeof(mmb_synth))};
    if (!c.dir || !c.synth) {
        mmb__ckpt_close(&c);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", name);
    }
    c.synth->state = 0x9e3779b97f4a7c15ull;
    c.synth->scale = scale;
    *out = c;
    return MMB_OK;
}

static mmb_status synth_bind(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int ndim, const int64_t *shape,
                             const mmb_tensor **out) {
    uint64_t n = 1;
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0 || !mmb__mul_ok(n, (uint64_t)shape[i], &n) || n > ((uint64_t)1 << 34))
            return mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%s': shape too large", c->dir, name);
    synth_tensor *t = calloc(1, sizeof *t + strlen(name) + 1);
    float *v = t ? malloc(n ? n * sizeof(float) : 1) : NULL;
    if (!v) {
        free(t);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: tensor '%s': out of memory", c->dir, name);
    }
    mmb_synth *sy = c->synth;
    for (uint64_t i = 0; i < n; i++) {
        sy->state ^= sy->state << 13; sy->state ^= sy->state >> 7; sy->state ^= sy->state << 17;
        v[i] = sy->scale * ((float)(sy->state >> 40) / 8388608.0f - 1.0f);
    }
    strcpy(t->name, name);
    t->t = (mmb_tensor){.name = t->name, .dtype = MMB_F32, .ndim = ndim, .data = v};
    memcpy(t->t.shape, shape, (size_t)ndim * sizeof *shape);
    t->next = sy->head;
    sy->head = t;
    *out = &t->t;
    return MMB_OK;
}

void mmb__ckpt_close(mmb_ckpt *c) {
    for (synth_tensor *t = c->synth ? c->synth->head : NULL, *next; t; t = next) {
        next = t->next;
        free((void *)t->t.data);
        free(t);
    }
    free(c->synth);
    for (int i = 0; i < c->n_files; i++) mmb_st_close(c->files[i]);
    free(c->files);
    cJSON_Delete(c->config);
    free(c->dir);
    memset(c, 0, sizeof *c);
}

const mmb_tensor *mmb__ckpt_find(const mmb_ckpt *c, const char *name, const mmb_st_file **file) {
    for (int i = 0; i < c->n_files; i++) {
        const mmb_tensor *t = mmb_st_find(c->files[i], name);
        if (t) { if (file) *file = c->files[i]; return t; }
    }
    return NULL;
}

static void fmt_shape(char *buf, size_t n, int ndim, const int64_t *shape) {
    size_t o = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && o < n; i++) o += (size_t)snprintf(buf + o, n - o, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (o < n) snprintf(buf + o, n - o, "]");
}

mmb_status mmb__ckpt_bind(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int ndim,
                          const int64_t *shape, const mmb_tensor **out) {
    if (c->synth) return synth_bind(ctx, c, name, ndim, shape, out);
    const mmb_st_file *f = NULL;
    const mmb_tensor *t = mmb__ckpt_find(c, name, &f);
    if (!t) return mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' is missing", c->dir, name);
    if (!mmb__dtype_is_float(t->dtype))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: tensor '%s': dtype %s, expected F32, F16 or BF16",
                        mmb__st_path(f), name, mmb_dtype_name(t->dtype));
    bool same = t->ndim == ndim;
    for (int i = 0; i < ndim && same; i++) same = t->shape[i] == shape[i];
    if (!same) {
        char got[160], want[160];
        fmt_shape(got, sizeof got, t->ndim, t->shape);
        fmt_shape(want, sizeof want, ndim, shape);
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%s': shape %s, expected %s", mmb__st_path(f), name, got, want);
    }
    *out = t;
    return MMB_OK;
}

/* ---- config access ---- */

/* The value at dotted `path`, or NULL when absent or null. A parent on the way that is present
 * but not an object ("vision_config": 5) is an MMB_ERR_FORMAT through *s, and NULL. */
static const cJSON *cfg_get(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, mmb_status *s) {
    const cJSON *j = c->config;
    const char *p = path;
    char key[128];
    while (j && *p) {
        if (!cJSON_IsObject(j)) {
            *s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%.*s' is not an object", c->dir,
                          (int)(p - path - 1), path);
            return NULL;
        }
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        if (n >= sizeof key) return NULL;
        memcpy(key, p, n);
        key[n] = 0;
        j = cJSON_GetObjectItemCaseSensitive(j, key);
        p += n + (dot ? 1 : 0);
        if (cJSON_IsNull(j)) return NULL;
    }
    return j;
}

static bool bad_type(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, const char *want, mmb_status *s) {
    *s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' is not %s", c->dir, path, want);
    return false;
}

bool mmb__cfg_num(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, double *out, mmb_status *s) {
    const cJSON *j = cfg_get(ctx, c, path, s);
    if (!j) return false;
    if (!cJSON_IsNumber(j)) return bad_type(ctx, c, path, "a number", s);
    *out = j->valuedouble;
    return true;
}

bool mmb__cfg_int(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, int64_t *out, mmb_status *s) {
    const cJSON *j = cfg_get(ctx, c, path, s);
    if (!j) return false;
    if (!cJSON_IsNumber(j) || !(j->valuedouble <= 1e15 && j->valuedouble >= -1e15) ||
        j->valuedouble != (double)(int64_t)j->valuedouble)
        return bad_type(ctx, c, path, "an integer", s);
    *out = (int64_t)j->valuedouble;
    return true;
}

bool mmb__cfg_str(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, const char **out, mmb_status *s) {
    const cJSON *j = cfg_get(ctx, c, path, s);
    if (!j) return false;
    if (!cJSON_IsString(j)) return bad_type(ctx, c, path, "a string", s);
    *out = j->valuestring;
    return true;
}

bool mmb__cfg_bool(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, bool *out, mmb_status *s) {
    const cJSON *j = cfg_get(ctx, c, path, s);
    if (!j) return false;
    if (!cJSON_IsBool(j)) return bad_type(ctx, c, path, "true or false", s);
    *out = cJSON_IsTrue(j);
    return true;
}

bool mmb__cfg_ints(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, int *out, int cap, int *n, mmb_status *s) {
    const cJSON *j = cfg_get(ctx, c, path, s);
    if (!j) return false;
    const cJSON *one = cJSON_IsArray(j) ? j->child : j;
    int k = 0;
    for (; one; one = cJSON_IsArray(j) ? one->next : NULL) {
        if (k == cap) {
            char want[64];
            snprintf(want, sizeof want, cap == 1 ? "a single integer" : "a list of at most %d integers", cap);
            return bad_type(ctx, c, path, want, s);
        }
        if (!cJSON_IsNumber(one) || !(one->valuedouble > -1e6 && one->valuedouble < 1e6) ||
            one->valuedouble != (double)(int)one->valuedouble)
            return bad_type(ctx, c, path, "an integer or a list of integers", s);
        out[k++] = (int)one->valuedouble;
    }
    if (k == 0) return bad_type(ctx, c, path, "a non-empty list", s);
    *n = k;
    return true;
}

mmb_status mmb__ckpt_vec(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int64_t n, float **out) {
    const mmb_tensor *t;
    mmb_status s = mmb__ckpt_bind(ctx, c, name, 1, &n, &t);
    if (s != MMB_OK) return s;
    float *v = malloc((size_t)n * sizeof(float) + 1);
    if (!v) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: tensor '%s': out of memory", c->dir, name);
    mmb_to_f32(v, t->data, t->dtype, (size_t)n);
    mmb__release_mapped(t->data, (size_t)n * mmb_dtype_size(t->dtype));  /* the copy is what is read */
    *out = v;
    return MMB_OK;
}

/* ---- layers bound by name ---- */

mmb_status mmb__linear_bind(mmb_ctx *ctx, mmb_linear *l, const mmb_tensor *w, const mmb_tensor *b) {
    mmb_status s = mmb__linear_init(ctx, l, w, b);
    /* a no-op for a weight that is not in a file's mapping */
    if (s == MMB_OK && l->w != w->data)
        mmb__release_mapped(w->data, (size_t)mmb_tensor_numel(w) * mmb_dtype_size(w->dtype));
    return s;
}

/* {prefix}{name}.weight, [n_out, n_in] (ndim 2) or a Conv2d's [n_out, n_in, k, k] (ndim 4), bound as an
 * (n_out, n_in k k) linear layer (the kernel flattened in (c, ky, kx) order, as im2col rows are), and its
 * .bias [n_out] when bias. */
static mmb_status bind_linear(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                              int64_t n_in, int64_t k, bool bias, int ndim, mmb_linear *l) {
    char wn[512], bn[512];
    snprintf(wn, sizeof wn, "%s%s.weight", prefix, name);
    snprintf(bn, sizeof bn, "%s%s.bias", prefix, name);
    const mmb_tensor *w = NULL, *b = NULL;
    const int64_t ws[4] = {n_out, n_in, k, k};
    mmb_status s = mmb__ckpt_bind(ctx, c, wn, ndim, ws, &w);
    if (s == MMB_OK && bias) s = mmb__ckpt_bind(ctx, c, bn, 1, &n_out, &b);
    if (s != MMB_OK) return s;
    mmb_tensor w2 = *w;
    w2.ndim = 2;
    w2.shape[1] = n_in * k * k;
    return mmb__linear_bind(ctx, l, &w2, b);
}

mmb_status mmb__ckpt_linear(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                            int64_t n_in, bool bias, mmb_linear *l) {
    return bind_linear(ctx, c, prefix, name, n_out, n_in, 1, bias, 2, l);
}

mmb_status mmb__ckpt_conv1x1(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                             int64_t n_in, bool bias, mmb_linear *l) {
    return bind_linear(ctx, c, prefix, name, n_out, n_in, 1, bias, 4, l);
}

mmb_status mmb__ckpt_conv(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                          int64_t n_in, int64_t k, bool bias, mmb_linear *l) {
    if (k < 1 || k > 64) return mmb__err(ctx, MMB_ERR_ARG, "%s%s: kernel size %lld", prefix, name, (long long)k);
    return bind_linear(ctx, c, prefix, name, n_out, n_in, k, bias, 4, l);
}

mmb_status mmb__ckpt_norm(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n, float **w,
                          float **b) {
    char wn[512], bn[512];
    snprintf(wn, sizeof wn, "%s%s.weight", prefix, name);
    snprintf(bn, sizeof bn, "%s%s.bias", prefix, name);
    mmb_status s = mmb__ckpt_vec(ctx, c, wn, n, w);
    return s == MMB_OK ? mmb__ckpt_vec(ctx, c, bn, n, b) : s;
}

mmb_status mmb__ckpt_linear_fused(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *const *names,
                                  int n, int64_t n_out, int64_t n_in, mmb_linear *l, float **wout, float **bout) {
    /* The own backend reads only its packed copy: the stack is then a transient in pages of its own,
     * which leave RSS when freed; the other backends keep reading it (*wout). */
    bool transient = ctx->gemm == MMB_GEMM_OWN;
    size_t wbytes = sizeof(float) * (size_t)(n * n_out * n_in);
    float *wf = transient ? mmb__pages_alloc(wbytes) : malloc(wbytes);
    float *bf = bout ? malloc(sizeof(float) * (size_t)(n * n_out)) : NULL;
    if (bout) *bout = bf;
    *wout = transient ? NULL : wf;
    mmb_status s = wf && (bf || !bout) ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    for (int i = 0; i < n && s == MMB_OK; i++) {
        char wn[256], bn[256];
        snprintf(wn, sizeof wn, "%s%s.weight", prefix, names[i]);
        snprintf(bn, sizeof bn, "%s%s.bias", prefix, names[i]);
        const mmb_tensor *w, *b;
        int64_t ws[2] = {n_out, n_in};
        s = mmb__ckpt_bind(ctx, c, wn, 2, ws, &w);
        if (s == MMB_OK && bf) s = mmb__ckpt_bind(ctx, c, bn, 1, &n_out, &b);
        if (s != MMB_OK) break;
        mmb_to_f32(wf + i * n_out * n_in, w->data, w->dtype, (size_t)(n_out * n_in));
        if (bf) mmb_to_f32(bf + i * n_out, b->data, b->dtype, (size_t)n_out);
        mmb__release_mapped(w->data, (size_t)(n_out * n_in) * mmb_dtype_size(w->dtype));  /* read once */
    }
    mmb_tensor w = {.name = names[0], .dtype = MMB_F32, .ndim = 2, .shape = {n * n_out, n_in}, .data = wf};
    mmb_tensor b = {.name = names[0], .dtype = MMB_F32, .ndim = 1, .shape = {n * n_out}, .data = bf};
    if (s == MMB_OK) s = mmb__linear_bind(ctx, l, &w, bf ? &b : NULL);
    if (transient) mmb__pages_free(wf, wbytes);
    else if (s == MMB_OK && l->w != wf) {  /* converted to the weight dtype: the stack is no longer read */
        free(wf);
        *wout = NULL;
    }
    return s;
}
