/* mmbridge encode --manifest: sharded, resumable extraction, alone or as one rank of an MPI job.
 *
 * The library gives the manifest (mmb_manifest_*: path lists, JSON lines, webdataset tars), the split
 * (mmb_shard_*), the pooling (mmb_pool_tokens) and the writers (mmb_st_write_meta, mmb_npy_write, mmb_file_write:
 * each file atomic). Here: the shard loop, the sidecars and index.json, --resume, --skip-bad, the progress line and
 * the MPI work queue (docs/decisions.md "Sharded extraction").
 *
 * A shard is finished when its sidecar OUT/shard-K.json exists and every file it names exists: the data files are
 * renamed into place first, the sidecar last, so a process killed at any point leaves the shard unfinished (a
 * temporary `.mmb-*` file at most, which the next writer in that directory removes). --resume redoes unfinished
 * shards from their first image and skips finished ones. */
#include "cli.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef MMB_HAVE_MPI
#include <mpi.h>
#endif

typedef struct job job;

typedef struct rowbuf {
    float *v;
    size_t n, cap;  /* floats */
} rowbuf;

/* One shard being encoded. */
typedef struct shard_out {
    int64_t k, begin, end, rows, n_failed, tokens0;  /* tokens0: the first image's token count (pool none) */
    int64_t *idx, *tok;                              /* per row: manifest index, tokens before pooling */
    rowbuf emb, hid[MMB_MAX_TAPS];
    cJSON *errors;
} shard_out;

struct job {
    mmb_ctx *ctx;
    mmb_mllm *m;
    mmb_manifest *man;
    const cli_enc *e;
    mmb_mllm_info in;
    const char *src;      /* what the embeddings are: the connector's name or last_hidden_state */
    int64_t n, S, n_shards, batch;
    mmb_pooling pool;
    const char *pool_name, *format_name;
    int tap_idx[MMB_MAX_TAPS];
    int rank, size;
    int64_t exit_after, images_done;  /* the test hook (MMB_TEST_EXIT_AFTER) */
    double t0, last_print;
    int64_t prog_total, prog_done, prog_failed, printed;
    void (*service)(job *);   /* rank 0 of an MPI job: answers the queue between batches */
    void (*report)(job *, int64_t done, int64_t failed);  /* a worker rank: sends its progress to rank 0 */
    void *mpi;
};

static int push_rows(rowbuf *b, const float *x, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->n + n) cap *= 2;
        float *nv = realloc(b->v, cap * sizeof(float));
        if (!nv) return cli_fail(NULL, "out of memory");
        b->v = nv;
        b->cap = cap;
    }
    memcpy(b->v + b->n, x, n * sizeof(float));
    b->n += n;
    return 0;
}

static void shard_free(shard_out *s) {
    free(s->idx);
    free(s->tok);
    free(s->emb.v);
    for (int i = 0; i < MMB_MAX_TAPS; i++) free(s->hid[i].v);
    cJSON_Delete(s->errors);
    memset(s, 0, sizeof *s);
}

static void path_of(char *buf, size_t n, const job *j, const char *fmt, int64_t k) {
    int w = snprintf(buf, n, "%s/", j->e->output);
    snprintf(buf + w, n - (size_t)w, fmt, (long long)k);
}

static int mkdirs(const char *path) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1;; p++) {
        if (*p == '/' || !*p) {
            char c = *p;
            *p = 0;
            if (mkdir(tmp, 0777) != 0 && errno != EEXIST) {
                fprintf(stderr, "mmbridge: error: %s: %s\n", tmp, strerror(errno));
                return 1;
            }
            *p = c;
            if (!c) break;
        }
    }
    return 0;
}

/* ---- progress ------------------------------------------------------------------------------------------------ */

static void progress(job *j, int final) {
    double now = cli_now();
    /* at most once a second, and while nothing moves (a rank on a long shard) every 10 s */
    if (!final && (now - j->last_print < 1.0 || (j->prog_done == j->printed && now - j->last_print < 10.0))) return;
    j->last_print = now;
    j->printed = j->prog_done;
    double el = now - j->t0, rate = el > 0 ? (double)j->prog_done / el : 0;
    double eta = rate > 0 ? (double)(j->prog_total - j->prog_done) / rate : 0;
    fprintf(stderr, "progress: %lld/%lld images, %.2f images/s, ETA %.0f s, %lld failed, %d rank(s)%s\n",
            (long long)j->prog_done, (long long)j->prog_total, rate, eta, (long long)j->prog_failed, j->size,
            final ? ", done" : "");
}

static void count(job *j, int64_t done, int64_t failed) {
    if (j->report) j->report(j, done, failed);
    else {
        j->prog_done += done;
        j->prog_failed += failed;
        progress(j, 0);
    }
}

/* ---- encoding a shard ------------------------------------------------------------------------------------------ */

static int record_bad(job *j, shard_out *so, int64_t i, const char *msg) {
    mmb_input in;
    mmb_manifest_get(j->man, i, &in);
    cJSON *o = cJSON_CreateObject();
    if (!o || !cJSON_AddStringToObject(o, "input", in.name) || !cJSON_AddNumberToObject(o, "index", (double)i) ||
        !cJSON_AddStringToObject(o, "message", msg)) {
        cJSON_Delete(o);
        return cli_fail(NULL, "out of memory");
    }
    cJSON_AddItemToArray(so->errors, o);
    so->n_failed++;
    fprintf(stderr, "mmbridge: skipped %s: %s\n", in.name, msg);
    return 0;
}

/* Encodes imgs[0, ng) (manifest indices idx) in one mmb_mllm_encode and appends their pooled rows. Returns 0, 1 with
 * the library's message in ctx (not printed), or 2 after printing a fatal problem. */
static int encode_group(job *j, shard_out *so, const mmb_image *imgs, const int64_t *idx, int ng) {
    int64_t *tok = calloc((size_t)ng, sizeof *tok);
    float *emb = NULL, *hid[MMB_MAX_TAPS] = {0};
    int r = 1, W = j->in.out_width;
    size_t per_h = (size_t)j->in.vision_tokens * (size_t)j->in.vision_width;
    if (!tok) { r = 2; cli_fail(NULL, "out of memory"); goto done; }
    int64_t total = mmb_mllm_encode_size(j->ctx, j->m, imgs, ng, tok);
    if (total < 0) goto done;
    if (!(emb = malloc(sizeof(float) * (size_t)total * (size_t)W + 1))) { r = 2; cli_fail(NULL, "out of memory"); goto done; }
    mmb_encode_out eo = {.embeddings = emb, .embeddings_count = (size_t)total * (size_t)W, .tokens = tok,
                         .n_taps = j->e->n_taps, .hidden_count = per_h * (size_t)ng};
    for (int i = 0; i < j->e->n_taps; i++) {
        eo.taps[i] = j->e->taps[i];
        if (!(eo.hidden[i] = hid[i] = malloc(sizeof(float) * per_h * (size_t)ng + 1))) {
            r = 2;
            cli_fail(NULL, "out of memory");
            goto done;
        }
    }
    if (mmb_mllm_encode(j->ctx, j->m, imgs, ng, &eo) != MMB_OK) goto done;
    int64_t off = 0;
    for (int i = 0; i < ng; i++) {
        if (j->pool == MMB_POOL_NONE) {
            if (so->rows == 0) so->tokens0 = tok[i];
            if (tok[i] != so->tokens0) {
                mmb_input in;
                mmb_manifest_get(j->man, idx[i], &in);
                fprintf(stderr, "mmbridge: error: %s makes %lld embeddings, the shard's first image %lld: --pool none "
                        "stores one count per shard (use --pool mean or cls)\n", in.name, (long long)tok[i],
                        (long long)so->tokens0);
                r = 2;
                goto done;
            }
        }
        float *x = emb + (size_t)off * (size_t)W;
        size_t keep = j->pool == MMB_POOL_NONE ? (size_t)tok[i] * (size_t)W : (size_t)W;
        if (mmb_pool_tokens(j->ctx, j->pool, x, 1, tok[i], W, x, keep) != MMB_OK || push_rows(&so->emb, x, keep)) {
            r = 2;
            cli_fail(j->ctx, NULL);
            goto done;
        }
        for (int t = 0; t < j->e->n_taps; t++) {
            float *h = hid[t] + per_h * (size_t)i;
            size_t kh = j->pool == MMB_POOL_NONE ? per_h : (size_t)j->in.vision_width;
            if (mmb_pool_tokens(j->ctx, j->pool, h, 1, j->in.vision_tokens, j->in.vision_width, h, kh) != MMB_OK ||
                push_rows(&so->hid[t], h, kh)) {
                r = 2;
                cli_fail(j->ctx, NULL);
                goto done;
            }
        }
        so->idx[so->rows] = idx[i];
        so->tok[so->rows] = tok[i];
        so->rows++;
        off += tok[i];
    }
    r = 0;
done:
    free(tok);
    free(emb);
    for (int i = 0; i < MMB_MAX_TAPS; i++) free(hid[i]);
    return r;
}

/* The test hook: MMB_TEST_EXIT_AFTER=k (and, when set, MMB_TEST_EXIT_RANK=r) makes the process _exit(3) once it has
 * encoded k images, mid-shard, as a killed rank would stop. */
static void test_hook(job *j, int64_t n) {
    j->images_done += n;
    if (j->exit_after > 0 && j->images_done >= j->exit_after) {
        fprintf(stderr, "mmbridge: MMB_TEST_EXIT_AFTER: rank %d exits after %lld images\n", j->rank,
                (long long)j->images_done);
        fflush(NULL);
        _exit(3);
    }
}

/* Inputs [i0, i1) of the shard: read, decoded, encoded as one batch. */
static int encode_batch(job *j, shard_out *so, int64_t i0, int64_t i1) {
    int nb = (int)(i1 - i0), ng = 0, r = 0;
    mmb_image *imgs = calloc((size_t)nb, sizeof *imgs);
    int64_t *idx = calloc((size_t)nb, sizeof *idx), failed0 = so->n_failed;
    if (!imgs || !idx) { free(imgs); free(idx); return cli_fail(NULL, "out of memory"); }
    for (int64_t i = i0; i < i1 && !r; i++) {
        void *bytes = NULL;
        size_t n = 0;
        mmb_input in;
        mmb_manifest_get(j->man, i, &in);
        mmb_status s = mmb_manifest_read(j->ctx, j->man, i, &bytes, &n);
        if (s == MMB_OK) s = mmb_image_decode(j->ctx, bytes, n, in.name, 0, &imgs[ng]);
        free(bytes);
        if (s == MMB_OK) idx[ng++] = i;
        else if (j->e->skip_bad) r = record_bad(j, so, i, mmb_ctx_error(j->ctx));
        else r = cli_fail(j->ctx, NULL);
    }
    if (!r && ng) {
        r = encode_group(j, so, imgs, idx, ng);
        if (r == 1 && j->e->skip_bad) {  /* one image the tower refuses: the others one by one */
            r = 0;
            for (int g = 0; g < ng && !r; g++) {
                r = encode_group(j, so, &imgs[g], &idx[g], 1);
                if (r == 1) r = record_bad(j, so, idx[g], mmb_ctx_error(j->ctx));
            }
        } else if (r == 1)
            cli_fail(j->ctx, NULL);
        if (r) r = 1;
    }
    for (int g = 0; g < ng; g++) mmb_image_free(&imgs[g]);
    free(imgs);
    free(idx);
    if (!r) count(j, nb, so->n_failed - failed0);
    return r;
}

static const char *input_name(const job *j, int64_t i) {
    mmb_input in;
    return mmb_manifest_get(j->man, i, &in) == MMB_OK ? in.name : "?";
}

/* Writes the shard's data files, then its sidecar. */
static int write_shard(job *j, shard_out *so) {
    char path[4608], rel[256];
    int r = 1, W = j->in.out_width, nt = j->e->n_taps;
    cJSON *side = cJSON_CreateObject(), *files = cJSON_CreateArray(), *inputs = cJSON_CreateArray();
    char **keys = NULL, **vals = NULL;
    int n_meta = 0;
    char *text = NULL;
    if (!side || !files || !inputs) { cli_fail(NULL, "out of memory"); goto done; }
    int64_t T = j->pool == MMB_POOL_NONE ? (so->rows ? so->tokens0 : 0) : 1;
    int64_t Th = j->pool == MMB_POOL_NONE ? j->in.vision_tokens : 1;
    static float empty[1];
    if (j->e->format == 0) {
        mmb_tensor t[MMB_MAX_TAPS + 1];
        char names[MMB_MAX_TAPS][32];
        int n_t = 0;
        t[n_t++] = (mmb_tensor){.name = "embeddings", .dtype = MMB_F32, .ndim = j->pool == MMB_POOL_NONE ? 3 : 2,
                                .shape = {so->rows, T, W}, .data = so->emb.v ? so->emb.v : empty};
        if (j->pool != MMB_POOL_NONE) t[0].shape[1] = W;
        for (int i = 0; i < nt; i++) {
            snprintf(names[i], sizeof names[i], j->tap_idx[i] < 0 ? "last_hidden_state" : "hidden_states.%d",
                     j->tap_idx[i]);
            t[n_t] = (mmb_tensor){.name = names[i], .dtype = MMB_F32, .ndim = j->pool == MMB_POOL_NONE ? 3 : 2,
                                  .shape = {so->rows, Th, j->in.vision_width}, .data = so->hid[i].v ? so->hid[i].v : empty};
            if (j->pool != MMB_POOL_NONE) t[n_t].shape[1] = j->in.vision_width;
            int dup = 0;
            for (int q = 0; q < n_t; q++) dup |= strcmp(t[q].name, names[i]) == 0;
            n_t += !dup;
        }
        n_meta = 2 * (int)so->rows + 6;
        if (!(keys = calloc((size_t)n_meta, sizeof *keys)) || !(vals = calloc((size_t)n_meta, sizeof *vals))) {
            cli_fail(NULL, "out of memory");
            goto done;
        }
        for (int i = 0; i < n_meta; i++)
            if (!(keys[i] = malloc(48)) || !(vals[i] = malloc(i < 2 * so->rows ? 24 : 64))) {
                cli_fail(NULL, "out of memory");
                goto done;
            }
        for (int64_t q = 0; q < so->rows; q++) {
            snprintf(keys[2 * q], 48, "input.%lld", (long long)q);
            free(vals[2 * q]);
            if (!(vals[2 * q] = strdup(input_name(j, so->idx[q])))) { cli_fail(NULL, "out of memory"); goto done; }
            snprintf(keys[2 * q + 1], 48, "index.%lld", (long long)q);
            snprintf(vals[2 * q + 1], 24, "%lld", (long long)so->idx[q]);
        }
        int b = 2 * (int)so->rows;
        snprintf(keys[b], 48, "n_inputs"), snprintf(vals[b], 64, "%lld", (long long)so->rows);
        snprintf(keys[b + 1], 48, "shard"), snprintf(vals[b + 1], 64, "%lld", (long long)so->k);
        snprintf(keys[b + 2], 48, "pool"), snprintf(vals[b + 2], 64, "%s", j->pool_name);
        snprintf(keys[b + 3], 48, "first"), snprintf(vals[b + 3], 64, "%lld", (long long)so->begin);
        snprintf(keys[b + 4], 48, "end"), snprintf(vals[b + 4], 64, "%lld", (long long)so->end);
        snprintf(keys[b + 5], 48, "source"), snprintf(vals[b + 5], 64, "%s", j->src);
        snprintf(rel, sizeof rel, "shard-%06lld.safetensors", (long long)so->k);
        snprintf(path, sizeof path, "%s/%s", j->e->output, rel);
        if (mmb_st_write_meta(j->ctx, path, t, n_t, (const char *const *)keys, (const char *const *)vals, n_meta) !=
            MMB_OK) { cli_fail(j->ctx, NULL); goto done; }
        cJSON_AddItemToArray(files, cJSON_CreateString(rel));
    } else {
        int64_t sh[3] = {so->rows, T, W};
        if (j->pool != MMB_POOL_NONE) sh[1] = W;
        snprintf(rel, sizeof rel, "img_emb/img_emb_%lld.npy", (long long)so->k);
        snprintf(path, sizeof path, "%s/%s", j->e->output, rel);
        if (mmb_npy_write(j->ctx, path, so->emb.v ? so->emb.v : empty, j->pool == MMB_POOL_NONE ? 3 : 2, sh) != MMB_OK)
            { cli_fail(j->ctx, NULL); goto done; }
        cJSON_AddItemToArray(files, cJSON_CreateString(rel));
        for (int i = 0; i < nt; i++) {
            int64_t hs[3] = {so->rows, Th, j->in.vision_width};
            if (j->pool != MMB_POOL_NONE) hs[1] = j->in.vision_width;
            char dir[64];
            snprintf(dir, sizeof dir, j->tap_idx[i] < 0 ? "last_hidden_state" : "hidden_states_%d", j->tap_idx[i]);
            snprintf(path, sizeof path, "%s/%s", j->e->output, dir);
            if (mkdirs(path)) goto done;
            snprintf(rel, sizeof rel, "%s/img_emb_%lld.npy", dir, (long long)so->k);
            snprintf(path, sizeof path, "%s/%s", j->e->output, rel);
            if (mmb_npy_write(j->ctx, path, so->hid[i].v ? so->hid[i].v : empty, j->pool == MMB_POOL_NONE ? 3 : 2, hs)
                != MMB_OK) { cli_fail(j->ctx, NULL); goto done; }
            cJSON_AddItemToArray(files, cJSON_CreateString(rel));
        }
        /* metadata/metadata_K.jsonl: row q of img_emb_K.npy is line q */
        size_t cap = 4096, len = 0;
        char *meta = malloc(cap);
        for (int64_t q = 0; meta && q < so->rows; q++) {
            mmb_input in;
            mmb_manifest_get(j->man, so->idx[q], &in);
            cJSON *o = cJSON_CreateObject();
            if (o) {
                cJSON_AddStringToObject(o, "image_path", in.name);
                cJSON_AddNumberToObject(o, "manifest_index", (double)so->idx[q]);
                cJSON_AddNumberToObject(o, "tokens", (double)so->tok[q]);
                if (in.url) cJSON_AddStringToObject(o, "url", in.url);
            }
            char *line = o ? cJSON_PrintUnformatted(o) : NULL;
            cJSON_Delete(o);
            if (!line) { free(meta); meta = NULL; break; }
            size_t ln = strlen(line);
            if (len + ln + 2 > cap) {
                while (len + ln + 2 > cap) cap *= 2;
                char *nm = realloc(meta, cap);
                if (!nm) { free(meta); meta = NULL; free(line); break; }
                meta = nm;
            }
            memcpy(meta + len, line, ln);
            len += ln;
            meta[len++] = '\n';
            free(line);
        }
        if (!meta) { cli_fail(NULL, "out of memory"); goto done; }
        meta[len] = 0;
        snprintf(rel, sizeof rel, "metadata/metadata_%lld.jsonl", (long long)so->k);
        snprintf(path, sizeof path, "%s/%s", j->e->output, rel);
        int w = cli_write_text(path, meta);
        free(meta);
        if (w) goto done;
        cJSON_AddItemToArray(files, cJSON_CreateString(rel));
    }
    /* the sidecar, last: its presence is what makes the shard finished */
    for (int64_t q = 0; q < so->rows; q++) {
        cJSON *o = cJSON_CreateObject();
        if (!o) { cli_fail(NULL, "out of memory"); goto done; }
        cJSON_AddStringToObject(o, "name", input_name(j, so->idx[q]));
        cJSON_AddNumberToObject(o, "index", (double)so->idx[q]);
        cJSON_AddNumberToObject(o, "tokens", (double)so->tok[q]);
        cJSON_AddItemToArray(inputs, o);
    }
    cJSON_AddNumberToObject(side, "shard", (double)so->k);
    cJSON_AddStringToObject(side, "format", j->format_name);
    cJSON_AddStringToObject(side, "pool", j->pool_name);
    cJSON_AddStringToObject(side, "source", j->src);
    cJSON_AddNumberToObject(side, "shard_size", (double)j->S);
    cJSON_AddNumberToObject(side, "n_inputs", (double)j->n);
    cJSON_AddNumberToObject(side, "first", (double)so->begin);
    cJSON_AddNumberToObject(side, "end", (double)so->end);
    cJSON_AddNumberToObject(side, "rows", (double)so->rows);
    cJSON_AddItemToObject(side, "files", files);
    files = NULL;
    cJSON_AddItemToObject(side, "inputs", inputs);
    inputs = NULL;
    cJSON_AddItemToObject(side, "errors", so->errors);
    so->errors = NULL;
    if (!(text = cJSON_Print(side))) { cli_fail(NULL, "out of memory"); goto done; }
    path_of(path, sizeof path, j, "shard-%06lld.json", so->k);
    if (cli_write_text(path, text)) goto done;
    r = 0;
done:
    free(text);
    cJSON_Delete(side);
    cJSON_Delete(files);
    cJSON_Delete(inputs);
    if (keys) cli_free_list(keys, n_meta);
    if (vals) cli_free_list(vals, n_meta);
    return r;
}

/* ---- partial shards: each batch also goes to OUT/.partial/shard-K/batch-B.safetensors (atomically), so --resume
 * finishes a shard from its last whole batch instead of its first image; the pieces go once the shard is finished. */

static void partial_dir(char *buf, size_t n, const job *j, int64_t k) {
    snprintf(buf, n, "%s/.partial/shard-%06lld", j->e->output, (long long)k);
}

static void partial_remove(const job *j, int64_t k) {
    char d[4608];
    partial_dir(d, sizeof d, j, k);
    DIR *dp = opendir(d);
    if (!dp) return;
    for (struct dirent *de; (de = readdir(dp));) {
        if (strncmp(de->d_name, "batch-", 6) && strncmp(de->d_name, ".mmb-", 5)) continue;
        char f[4864];
        snprintf(f, sizeof f, "%s/%s", d, de->d_name);
        unlink(f);
    }
    closedir(dp);
    rmdir(d);
}

static size_t per_row(const job *j, const shard_out *so, int tap) {
    if (tap < 0) return j->pool == MMB_POOL_NONE ? (size_t)so->tokens0 * (size_t)j->in.out_width : (size_t)j->in.out_width;
    return j->pool == MMB_POOL_NONE ? (size_t)j->in.vision_tokens * (size_t)j->in.vision_width : (size_t)j->in.vision_width;
}

static void settings(const job *j, char *buf, size_t n) {
    snprintf(buf, n, "%lld/%lld/%s/%s/%d", (long long)j->S, (long long)j->n, j->pool_name, j->format_name, j->e->n_taps);
}

/* Batch b (inputs [i0, i1), rows from row0, errors from err0) as a piece. */
static int write_piece(job *j, shard_out *so, int64_t b, int64_t i0, int64_t i1, int64_t row0, int err0) {
    char dir[4608], path[4700], set[128];
    partial_dir(dir, sizeof dir, j, so->k);
    if (mkdirs(dir)) return 1;
    snprintf(path, sizeof path, "%s/batch-%06lld.safetensors", dir, (long long)b);
    int64_t nr = so->rows - row0;
    int n_meta = 2 * (int)nr + 5, r = 1, n_t = 0;
    char **keys = calloc((size_t)n_meta, sizeof *keys), **vals = calloc((size_t)n_meta, sizeof *vals);
    cJSON *errs = cJSON_CreateArray();
    char *etext = NULL, names[MMB_MAX_TAPS][32];
    mmb_tensor t[MMB_MAX_TAPS + 1];
    if (!keys || !vals || !errs) { cli_fail(NULL, "out of memory"); goto done; }
    for (int i = err0; i < cJSON_GetArraySize(so->errors); i++)
        cJSON_AddItemToArray(errs, cJSON_Duplicate(cJSON_GetArrayItem(so->errors, i), 1));
    if (!(etext = cJSON_PrintUnformatted(errs))) { cli_fail(NULL, "out of memory"); goto done; }
    for (int i = 0; i < n_meta; i++)
        if (!(keys[i] = malloc(32)) || !(vals[i] = malloc(128))) { cli_fail(NULL, "out of memory"); goto done; }
    for (int64_t q = 0; q < nr; q++) {
        snprintf(keys[2 * q], 32, "index.%lld", (long long)q);
        snprintf(vals[2 * q], 128, "%lld", (long long)so->idx[row0 + q]);
        snprintf(keys[2 * q + 1], 32, "tokens.%lld", (long long)q);
        snprintf(vals[2 * q + 1], 128, "%lld", (long long)so->tok[row0 + q]);
    }
    int m = 2 * (int)nr;
    settings(j, set, sizeof set);
    snprintf(keys[m], 32, "first"), snprintf(vals[m], 128, "%lld", (long long)i0);
    snprintf(keys[m + 1], 32, "end"), snprintf(vals[m + 1], 128, "%lld", (long long)i1);
    snprintf(keys[m + 2], 32, "rows"), snprintf(vals[m + 2], 128, "%lld", (long long)nr);
    snprintf(keys[m + 3], 32, "settings"), snprintf(vals[m + 3], 128, "%s", set);
    snprintf(keys[m + 4], 32, "errors");
    free(vals[m + 4]);
    vals[m + 4] = etext;
    etext = NULL;
    if (nr > 0) {
        size_t pe = per_row(j, so, -1);
        t[n_t++] = (mmb_tensor){.name = "embeddings", .dtype = MMB_F32, .ndim = 1, .shape = {(int64_t)(pe * (size_t)nr)},
                                .data = so->emb.v + pe * (size_t)row0};
        for (int i = 0; i < j->e->n_taps; i++) {
            size_t ph = per_row(j, so, i);
            snprintf(names[i], sizeof names[i], "hidden.%d", i);
            t[n_t++] = (mmb_tensor){.name = names[i], .dtype = MMB_F32, .ndim = 1, .shape = {(int64_t)(ph * (size_t)nr)},
                                    .data = so->hid[i].v + ph * (size_t)row0};
        }
    }
    if (mmb_st_write_meta(j->ctx, path, t, n_t, (const char *const *)keys, (const char *const *)vals, n_meta) != MMB_OK)
        { cli_fail(j->ctx, NULL); goto done; }
    r = 0;
done:
    free(etext);
    cJSON_Delete(errs);
    if (keys) cli_free_list(keys, n_meta);
    if (vals) cli_free_list(vals, n_meta);
    return r;
}

/* Reads the shard's pieces in order while each starts where the last ended: returns the input to go on from
 * (so->begin when there is none); *b the next piece's number. Returns -1 after printing a fatal error. */
static int64_t read_pieces(job *j, shard_out *so, int64_t *b) {
    char dir[4608], path[4700], set[128];
    partial_dir(dir, sizeof dir, j, so->k);
    settings(j, set, sizeof set);
    int64_t i0 = so->begin;
    for (*b = 0;; (*b)++) {
        snprintf(path, sizeof path, "%s/batch-%06lld.safetensors", dir, (long long)*b);
        if (access(path, F_OK) != 0) break;
        mmb_st_file *f = NULL;
        if (mmb_st_open(j->ctx, path, &f) != MMB_OK) break;  /* unreadable: encoded again from here */
        const char *first = mmb_st_meta(f, "first"), *end = mmb_st_meta(f, "end"), *rows = mmb_st_meta(f, "rows"),
                   *st = mmb_st_meta(f, "settings"), *et = mmb_st_meta(f, "errors");
        int64_t nr = rows ? atoll(rows) : -1, e = end ? atoll(end) : -1;
        cJSON *errs = et ? cJSON_Parse(et) : NULL;
        int ok = first && atoll(first) == i0 && e > i0 && e <= so->end && st && !strcmp(st, set) && nr >= 0 &&
                 nr <= e - i0 && cJSON_IsArray(errs) && so->rows + nr <= so->end - so->begin;
        int64_t idx[4096], tok[4096];
        for (int64_t q = 0; ok && q < nr; q++) {
            char key[32];
            snprintf(key, sizeof key, "index.%lld", (long long)q);
            const char *v = mmb_st_meta(f, key);
            snprintf(key, sizeof key, "tokens.%lld", (long long)q);
            const char *w = mmb_st_meta(f, key);
            ok = v && w && q < 4096;
            if (ok) idx[q] = atoll(v), tok[q] = atoll(w);
        }
        if (ok && nr > 0 && j->pool == MMB_POOL_NONE && so->rows == 0) so->tokens0 = tok[0];
        const mmb_tensor *te = ok && nr > 0 ? mmb_st_find(f, "embeddings") : NULL;
        ok = ok && (nr == 0 || (te && te->dtype == MMB_F32 && (size_t)mmb_tensor_numel(te) == per_row(j, so, -1) * (size_t)nr));
        for (int i = 0; ok && nr > 0 && i < j->e->n_taps; i++) {
            char nm[32];
            snprintf(nm, sizeof nm, "hidden.%d", i);
            const mmb_tensor *th = mmb_st_find(f, nm);
            ok = th && th->dtype == MMB_F32 && (size_t)mmb_tensor_numel(th) == per_row(j, so, i) * (size_t)nr;
        }
        if (ok && nr > 0) {
            if (push_rows(&so->emb, te->data, per_row(j, so, -1) * (size_t)nr)) ok = 0;
            for (int i = 0; ok && i < j->e->n_taps; i++) {
                char nm[32];
                snprintf(nm, sizeof nm, "hidden.%d", i);
                if (push_rows(&so->hid[i], mmb_st_find(f, nm)->data, per_row(j, so, i) * (size_t)nr)) ok = 0;
            }
        }
        if (!ok) {
            cJSON_Delete(errs);
            mmb_st_close(f);
            if (so->emb.n != (size_t)so->rows * per_row(j, so, -1)) return -1;  /* out of memory mid-way: printed */
            break;
        }
        for (int64_t q = 0; q < nr; q++) so->idx[so->rows + q] = idx[q], so->tok[so->rows + q] = tok[q];
        so->rows += nr;
        int64_t nf = cJSON_GetArraySize(errs);
        while (cJSON_GetArraySize(errs) > 0) cJSON_AddItemToArray(so->errors, cJSON_DetachItemFromArray(errs, 0));
        so->n_failed += nf;
        cJSON_Delete(errs);
        mmb_st_close(f);
        count(j, e - i0, nf);
        i0 = e;
    }
    return i0;
}

static int do_shard(job *j, int64_t k) {
    shard_out so = {.k = k};
    double t0 = cli_now();
    mmb_shard_range(j->n, j->S, k, &so.begin, &so.end);
    int64_t n = so.end - so.begin;
    int r = 1;
    if (!(so.idx = calloc((size_t)n, sizeof *so.idx)) || !(so.tok = calloc((size_t)n, sizeof *so.tok)) ||
        !(so.errors = cJSON_CreateArray())) {
        cli_fail(NULL, "out of memory");
        goto done;
    }
    int64_t i0 = so.begin, b = 0;
    if (j->e->resume) {
        if ((i0 = read_pieces(j, &so, &b)) < 0) goto done;
        if (i0 > so.begin)
            printf("shard %lld: resumed at input %lld (%lld batch(es) read back)\n", (long long)k, (long long)i0,
                   (long long)b);
    } else
        partial_remove(j, k);
    for (; i0 < so.end; i0 += j->batch, b++) {
        int64_t i1 = so.end - i0 < j->batch ? so.end : i0 + j->batch, row0 = so.rows;
        int err0 = cJSON_GetArraySize(so.errors);
        if (encode_batch(j, &so, i0, i1)) goto done;
        if (i1 < so.end && !j->e->no_partial && write_piece(j, &so, b, i0, i1, row0, err0)) goto done;
        if (j->service) j->service(j);
        test_hook(j, i1 - i0);
    }
    if (write_shard(j, &so)) goto done;
    partial_remove(j, k);
    printf("shard %lld: inputs %lld..%lld, %lld encoded, %lld failed, rank %d, %.0f ms\n", (long long)k,
           (long long)so.begin, (long long)so.end - 1, (long long)so.rows, (long long)so.n_failed, j->rank,
           (cli_now() - t0) * 1e3);
    fflush(stdout);
    r = 0;
done:
    shard_free(&so);
    return r;
}

/* ---- finished shards, the index ---------------------------------------------------------------------------------- */

static cJSON *read_json(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            cap = cap ? 2 * cap : 8192;
            char *nb = realloc(buf, cap);
            if (!nb) { free(buf); fclose(f); return NULL; }
            buf = nb;
        }
        size_t k = fread(buf + n, 1, 4096, f);
        n += k;
        if (k < 4096) break;
    }
    fclose(f);
    if (!buf) return NULL;
    buf[n] = 0;
    cJSON *o = cJSON_Parse(buf);
    free(buf);
    return o;
}

static double num(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

static const char *str(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : "";
}

/* Shard k's sidecar when the shard is finished (the caller frees it), else NULL; *bad = 1 after printing why when
 * it is finished with other settings than this run's. */
static cJSON *finished(const job *j, int64_t k, int *bad) {
    char path[4608];
    path_of(path, sizeof path, j, "shard-%06lld.json", k);
    cJSON *o = read_json(path);
    if (!o) return NULL;
    int64_t b = 0, e = 0;
    mmb_shard_range(j->n, j->S, k, &b, &e);
    if (num(o, "shard") != (double)k || num(o, "shard_size") != (double)j->S || num(o, "n_inputs") != (double)j->n ||
        num(o, "first") != (double)b || num(o, "end") != (double)e || strcmp(str(o, "format"), j->format_name) ||
        strcmp(str(o, "pool"), j->pool_name)) {
        fprintf(stderr, "mmbridge: error: %s: made with other settings (shard size, manifest length, format or pool) "
                "than this run's (%lld inputs, --shard-size %lld, %s, --pool %s): use another -o directory\n", path,
                (long long)j->n, (long long)j->S, j->format_name, j->pool_name);
        *bad = 1;
        cJSON_Delete(o);
        return NULL;
    }
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(o, "files"), *f;
    cJSON_ArrayForEach(f, files) {
        struct stat st;
        char fp[4608];
        snprintf(fp, sizeof fp, "%s/%s", j->e->output, cJSON_IsString(f) ? f->valuestring : "");
        if (!cJSON_IsString(f) || stat(fp, &st) != 0) {
            cJSON_Delete(o);
            return NULL;
        }
    }
    return o;
}

/* index.json (every finished shard; "complete" when all are) and, with --skip-bad or failures, errors.jsonl. */
static int write_index(job *j) {
    cJSON *idx = cJSON_CreateObject(), *shards = cJSON_CreateArray();
    size_t cap = 4096, len = 0;
    char *errs = malloc(cap), *text = NULL;
    int64_t done = 0, rows = 0, n_err = 0, r = 1;
    if (!idx || !shards || !errs) { cli_fail(NULL, "out of memory"); goto done; }
    errs[0] = 0;
    for (int64_t k = 0; k < j->n_shards; k++) {
        int bad = 0;
        cJSON *o = finished(j, k, &bad);
        if (bad) goto done;
        if (!o) continue;
        done++;
        rows += (int64_t)num(o, "rows");
        cJSON *s = cJSON_CreateObject();
        char side[64];
        snprintf(side, sizeof side, "shard-%06lld.json", (long long)k);
        cJSON_AddNumberToObject(s, "shard", (double)k);
        cJSON_AddStringToObject(s, "sidecar", side);
        cJSON_AddItemToObject(s, "files", cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(o, "files"), 1));
        cJSON_AddNumberToObject(s, "first", num(o, "first"));
        cJSON_AddNumberToObject(s, "end", num(o, "end"));
        cJSON_AddNumberToObject(s, "rows", num(o, "rows"));
        const cJSON *ea = cJSON_GetObjectItemCaseSensitive(o, "errors"), *er;
        cJSON_AddNumberToObject(s, "errors", cJSON_GetArraySize(ea));
        cJSON_AddItemToArray(shards, s);
        cJSON_ArrayForEach(er, ea) {
            cJSON *line = cJSON_CreateObject();
            cJSON_AddStringToObject(line, "input", str(er, "input"));
            cJSON_AddNumberToObject(line, "index", num(er, "index"));
            cJSON_AddStringToObject(line, "message", str(er, "message"));
            char *l = cJSON_PrintUnformatted(line);
            cJSON_Delete(line);
            if (!l) continue;
            size_t ln = strlen(l);
            while (len + ln + 2 > cap) {
                char *ne = realloc(errs, cap *= 2);
                if (!ne) { free(l); cJSON_Delete(o); cli_fail(NULL, "out of memory"); goto done; }
                errs = ne;
            }
            memcpy(errs + len, l, ln);
            len += ln;
            errs[len++] = '\n';
            errs[len] = 0;
            free(l);
            n_err++;
        }
        cJSON_Delete(o);
    }
    cJSON_AddNumberToObject(idx, "n_inputs", (double)j->n);
    cJSON_AddNumberToObject(idx, "shard_size", (double)j->S);
    cJSON_AddNumberToObject(idx, "n_shards", (double)j->n_shards);
    cJSON_AddNumberToObject(idx, "finished", (double)done);
    cJSON_AddBoolToObject(idx, "complete", done == j->n_shards);
    cJSON_AddNumberToObject(idx, "rows", (double)rows);
    cJSON_AddNumberToObject(idx, "errors", (double)n_err);
    cJSON_AddStringToObject(idx, "format", j->format_name);
    cJSON_AddStringToObject(idx, "pool", j->pool_name);
    cJSON_AddStringToObject(idx, "source", j->src);
    cJSON_AddStringToObject(idx, "manifest", j->e->manifest);
    cJSON_AddItemToObject(idx, "shards", shards);
    shards = NULL;
    if (!(text = cJSON_Print(idx))) { cli_fail(NULL, "out of memory"); goto done; }
    char path[4608];
    if (j->e->skip_bad || n_err) {
        snprintf(path, sizeof path, "%s/errors.jsonl", j->e->output);
        if (cli_write_text(path, errs)) goto done;
    }
    snprintf(path, sizeof path, "%s/index.json", j->e->output);
    if (cli_write_text(path, text)) goto done;
    if (done == j->n_shards) {
        char pd[4608];
        snprintf(pd, sizeof pd, "%s/.partial", j->e->output);
        rmdir(pd);  /* empty once every shard is finished */
    }
    printf("index: %lld/%lld shards finished, %lld rows, %lld errors -> %s\n", (long long)done, (long long)j->n_shards,
           (long long)rows, (long long)n_err, path);
    r = 0;
done:
    free(text);
    free(errs);
    cJSON_Delete(idx);
    cJSON_Delete(shards);
    return (int)r;
}

/* This process's shards (--shard K/N), unfinished ones only with --resume, into *todo; the images they hold in
 * *images. Returns 0, or 1 after printing why (finished shards without --resume, other settings). */
static int plan(job *j, int64_t **todo, int64_t *n_todo, int64_t *images) {
    *todo = calloc((size_t)j->n_shards + 1, sizeof **todo);
    *n_todo = *images = 0;
    if (!*todo) return cli_fail(NULL, "out of memory");
    int64_t skipped = 0;
    for (int64_t k = 0; k < j->n_shards; k++) {
        if (!mmb_shard_mine(k, j->e->shard_k, j->e->shard_n)) continue;
        int bad = 0;
        cJSON *o = finished(j, k, &bad);
        if (bad) return 1;
        if (o) {
            cJSON_Delete(o);
            partial_remove(j, k);  /* pieces of a shard finished just before a kill */
            if (!j->e->resume) {
                fprintf(stderr, "mmbridge: error: %s/shard-%06lld.json: shard %lld is already finished; pass --resume "
                        "to finish the job, or another -o directory\n", j->e->output, (long long)k, (long long)k);
                return 1;
            }
            skipped++;
            continue;
        }
        int64_t b, e;
        mmb_shard_range(j->n, j->S, k, &b, &e);
        (*todo)[(*n_todo)++] = k;
        *images += e - b;
    }
    printf("manifest %s: %lld inputs, %lld shards of %lld; this run: %lld shard(s), %lld images", j->e->manifest,
           (long long)j->n, (long long)j->n_shards, (long long)j->S, (long long)*n_todo, (long long)*images);
    if (j->e->resume) printf(", %lld finished shard(s) skipped", (long long)skipped);
    printf("\n");
    fflush(stdout);
    return 0;
}

/* ---- MPI: rank 0 hands out shards as the ranks ask for them ----------------------------------------------------- */

#ifdef MMB_HAVE_MPI
enum { TAG_REQ = 1, TAG_ASSIGN = 2, TAG_PROG = 3 };
#define DEPTH 2  /* requests a worker keeps outstanding: it starts its next shard without waiting on rank 0 */

typedef struct mpi_q {
    int64_t *queue, nq, qi;
    int64_t *held;   /* [size][DEPTH]: shards assigned and not yet reported done (-1: none) */
    int *stops, *dead;
    int failed;
} mpi_q;

static void sleep_ms(void) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
}

static void mark_dead(job *j, mpi_q *q, int r) {
    if (q->dead[r]) return;
    q->dead[r] = 1;
    for (int d = 0; d < DEPTH; d++)
        if (q->held[r * DEPTH + d] >= 0) {  /* its pending shards are unfinished: back in the queue */
            fprintf(stderr, "mmbridge: rank %d is gone; its shard %lld goes back in the queue\n", r,
                    (long long)q->held[r * DEPTH + d]);
            q->queue[q->nq++] = q->held[r * DEPTH + d];
            q->held[r * DEPTH + d] = -1;
        }
    (void)j;
}

/* Rank 0: answers every message waiting (progress reports, requests). */
static void mpi_service(job *j) {
    mpi_q *q = j->mpi;
    for (;;) {
        int flag = 0;
        MPI_Status st;
        if (MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, MPI_COMM_WORLD, &flag, &st) != MPI_SUCCESS || !flag) break;
        int src = st.MPI_SOURCE;
        int64_t msg[3] = {0};
        if (MPI_Recv(msg, 3, MPI_INT64_T, src, st.MPI_TAG, MPI_COMM_WORLD, MPI_STATUS_IGNORE) != MPI_SUCCESS) {
            mark_dead(j, q, src);
            continue;
        }
        if (st.MPI_TAG == TAG_PROG) {
            j->prog_done += msg[0];
            j->prog_failed += msg[1];
            continue;
        }
        if (st.MPI_TAG != TAG_REQ) continue;
        if (msg[0] >= 0) {  /* shard msg[0] done (msg[1]: ok) */
            for (int d = 0; d < DEPTH; d++)
                if (q->held[src * DEPTH + d] == msg[0]) q->held[src * DEPTH + d] = -1;
            if (!msg[1]) q->failed = 1;
        } else if (msg[1] == 0)
            q->failed = 1;  /* the rank could not start (its message is on its stderr) */
        int64_t k = !q->failed && q->qi < q->nq ? q->queue[q->qi++] : -1;
        if (k >= 0) {
            for (int d = 0; d < DEPTH; d++)
                if (q->held[src * DEPTH + d] < 0) { q->held[src * DEPTH + d] = k; break; }
        } else
            q->stops[src]++;
        if (MPI_Send(&k, 1, MPI_INT64_T, src, TAG_ASSIGN, MPI_COMM_WORLD) != MPI_SUCCESS) mark_dead(j, q, src);
    }
    progress(j, 0);
}

static void mpi_report(job *j, int64_t done, int64_t failed) {
    (void)j;
    int64_t msg[3] = {done, failed, 0};
    MPI_Send(msg, 3, MPI_INT64_T, 0, TAG_PROG, MPI_COMM_WORLD);
}

static int run_rank0(job *j, int64_t *todo, int64_t n_todo, int setup_failed) {
    mpi_q q = {0};
    q.queue = calloc((size_t)(n_todo + (int64_t)j->size * DEPTH + 1), sizeof *q.queue);
    q.held = malloc(sizeof *q.held * (size_t)j->size * DEPTH);
    q.stops = calloc((size_t)j->size, sizeof *q.stops);
    q.dead = calloc((size_t)j->size, sizeof *q.dead);
    if (!q.queue || !q.held || !q.stops || !q.dead) {
        cli_fail(NULL, "out of memory");
        q.failed = 1;
    } else {
        memcpy(q.queue, todo, sizeof *todo * (size_t)n_todo);
        q.nq = n_todo;
        for (int i = 0; i < j->size * DEPTH; i++) q.held[i] = -1;
    }
    if (setup_failed) q.failed = 1;
    j->mpi = &q;
    j->service = mpi_service;
    for (;;) {
        mpi_service(j);
        if (!q.failed && q.qi < q.nq) {
            if (do_shard(j, q.queue[q.qi++])) q.failed = 1;
            continue;
        }
        int all = 1;
        for (int r = 1; r < j->size; r++) all &= q.dead[r] || q.stops[r] >= DEPTH;
        if (all) break;
        sleep_ms();
    }
    j->service = NULL;
    progress(j, 1);
    int r = q.failed;
    if (!q.failed && write_index(j)) r = 1;
    free(q.queue);
    free(q.held);
    free(q.stops);
    free(q.dead);
    return r;
}

static int run_worker(job *j, int setup_failed) {
    int pending = 0, r = setup_failed;
    j->report = mpi_report;
    for (int d = 0; d < DEPTH; d++) {
        int64_t req[3] = {-1, !setup_failed, 0};
        if (MPI_Send(req, 3, MPI_INT64_T, 0, TAG_REQ, MPI_COMM_WORLD) != MPI_SUCCESS) return 1;
        pending++;
    }
    while (pending > 0) {
        int64_t k = -1;
        MPI_Request rq;
        int flag = 0;
        if (MPI_Irecv(&k, 1, MPI_INT64_T, 0, TAG_ASSIGN, MPI_COMM_WORLD, &rq) != MPI_SUCCESS) return 1;
        while (MPI_Test(&rq, &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && !flag) sleep_ms();  /* no busy polling */
        if (!flag) return 1;
        pending--;
        if (k < 0) continue;
        int ok = !r && do_shard(j, k) == 0;
        if (!ok) r = 1;
        int64_t req[3] = {k, ok, 0};
        if (MPI_Send(req, 3, MPI_INT64_T, 0, TAG_REQ, MPI_COMM_WORLD) != MPI_SUCCESS) return 1;
        pending++;
    }
    return r;
}
#endif

/* ---- the command ------------------------------------------------------------------------------------------------- */

int cli_extract_run(mmb_ctx *ctx, const cli_enc *e) {
    job j = {.ctx = ctx, .e = e, .S = e->shard_size, .batch = e->batch ? e->batch : 8, .size = 1};
    int r = 1, setup_failed = 0;
    int64_t *todo = NULL, n_todo = 0;
    if (e->mpi) {
#ifdef MMB_HAVE_MPI
        int inited = 0;
        MPI_Initialized(&inited);
        if (!inited && MPI_Init(NULL, NULL) != MPI_SUCCESS) return cli_fail(NULL, "MPI_Init failed");
        /* errors come back as return codes: a dead peer's send or receive fails here instead of aborting us */
        MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
        MPI_Comm_rank(MPI_COMM_WORLD, &j.rank);
        MPI_Comm_size(MPI_COMM_WORLD, &j.size);
#else
        fprintf(stderr, "mmbridge: error: --mpi: this mmbridge was built without MPI (CMake found none: install "
                "libopenmpi-dev, scripts/deps.sh, and rebuild); without it, run one process per --shard K/N\n");
        return 2;
#endif
    }
    const char *hook = getenv("MMB_TEST_EXIT_AFTER"), *hook_rank = getenv("MMB_TEST_EXIT_RANK");
    if (hook && (!hook_rank || atoi(hook_rank) == j.rank)) j.exit_after = atoll(hook);
    j.format_name = e->format ? "clip-retrieval" : "safetensors";
    j.pool_name = e->pool ? e->pool : e->format ? "mean" : "none";
    j.pool = !strcmp(j.pool_name, "mean") ? MMB_POOL_MEAN : !strcmp(j.pool_name, "cls") ? MMB_POOL_CLS : MMB_POOL_NONE;
    j.t0 = j.last_print = cli_now();
    if (cli_open(ctx, e->model, e->tower, &e->dense, 1, NULL, &j.m)) { setup_failed = 1; goto run; }
    mmb_mllm_get_info(j.m, &j.in);
    const mmb_model *model = mmb_mllm_model(j.m);
    mmb_model_info mi = {0};
    if (model) mmb_model_get_info(model, &mi);
    j.src = model ? mi.connector : "last_hidden_state";
    if (!j.in.has_vision) {
        fprintf(stderr, "mmbridge: error: %s: no vision path to encode with\n", e->model);
        setup_failed = 1;
        goto run;
    }
    if (e->n_taps && !mmb_mllm_vit(j.m)) {
        fprintf(stderr, "mmbridge: error: --layers: a %s model runs its tower and connector as one; its hidden states "
                "are not exposed\n", j.in.family);
        setup_failed = 1;
        goto run;
    }
    for (int i = 0; i < e->n_taps; i++)
        j.tap_idx[i] = e->taps[i] == MMB_TAP_LAST ? -1 : e->taps[i] < 0 ? e->taps[i] + j.in.vision_layers + 1 : e->taps[i];
    if (mmb_manifest_open(ctx, e->manifest, e->skip_bad ? MMB_MANIFEST_SKIP_BAD : 0, &j.man) != MMB_OK) {
        cli_fail(ctx, NULL);
        setup_failed = 1;
        goto run;
    }
    for (int i = 0; i < mmb_manifest_warnings(j.man) && j.rank == 0; i++)
        fprintf(stderr, "mmbridge: warning: %s (the members before it are read)\n", mmb_manifest_warning(j.man, i));
    j.n = mmb_manifest_count(j.man);
    j.n_shards = mmb_shard_count(j.n, j.S);
    char sub[4608];
    if (mkdirs(e->output)) { setup_failed = 1; goto run; }
    if (e->format) {
        snprintf(sub, sizeof sub, "%s/img_emb", e->output);
        if (mkdirs(sub)) { setup_failed = 1; goto run; }
        snprintf(sub, sizeof sub, "%s/metadata", e->output);
        if (mkdirs(sub)) { setup_failed = 1; goto run; }
    }
    if (j.rank == 0) {
        int64_t images = 0;
        if (plan(&j, &todo, &n_todo, &images)) { setup_failed = 1; goto run; }
        j.prog_total = images;
    }
    j.t0 = j.last_print = cli_now();  /* the rate counts encoding, not the model's load */
run:
#ifdef MMB_HAVE_MPI
    if (e->mpi) {
        r = j.rank == 0 ? run_rank0(&j, todo, n_todo, setup_failed) : run_worker(&j, setup_failed);
        MPI_Finalize();
        goto done;
    }
#endif
    if (setup_failed) goto done;
    for (int64_t t = 0; t < n_todo; t++)
        if (do_shard(&j, todo[t])) goto done;
    progress(&j, 1);
    r = write_index(&j);
done:
    free(todo);
    mmb_manifest_free(j.man);
    mmb_mllm_free(j.m);
    return r;
}
