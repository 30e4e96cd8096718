/* Stage-1 training (mmb_train, include/mmbridge.h): a LLaVA projector trained through the frozen tower and LLM.
 *
 *   data       LLaVA's pretraining JSON, each sample preprocess_plain's "<image>" + caption + "\n": ids [BOS]
 *              (when the tokenizer puts one) + the image's rows + the caption's ids, labels IGNORE_INDEX but on
 *              the caption's
 *   cache      what the projector reads for each image (mmb__model_projector_input), computed once, in shards
 *              of SHARD samples: cache_dir/features-NNNNNN.safetensors, tensor "<sample index>" (rows,
 *              in_width) f32, metadata "images" (the shard's image paths, one per line) and "model" (the
 *              checkpoint and the projector's input width): a shard whose metadata differ is recomputed
 *   step       micro-batches of the step's samples, in the data's order: the projector's forward, the LLM's
 *              loss and its gradient at the image rows (mmb__lm_loss_backward), the projector's backward scaled
 *              by 1 / (the micro-batch's target tokens * the step's micro-batches); then the global norm
 *              clipped (torch's clip_grad_norm_: coefficient max / (norm + 1e-6) when below 1) and AdamW
 *   schedule   transformers' get_cosine_schedule_with_warmup over every step of the run
 *   resume     out/checkpoint.safetensors: "w.<key>", "m.<key>", "v.<key>" and the run's settings in its
 *              metadata; a resumed run starts at its step (the data position is the step's first sample)
 */
#include "pipeline.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define SHARD 64
#define IGNORE (-100)

mmb_train_params mmb_train_default_params(void) {
    mmb_train_params p = {0};
    p.lr = 1e-3;
    p.warmup_ratio = 0.03;
    p.beta1 = 0.9;
    p.beta2 = 0.999;
    p.eps = 1e-8;
    p.max_grad_norm = 1.0;
    p.batch = 256;
    p.micro_batch = 16;
    p.epochs = 1;
    p.save_every = 50;
    return p;
}

typedef struct sample {
    char *image;               /* the path as the data gives it */
    int32_t *ids;              /* the caption's ids (caption + "\n", no specials) */
    int64_t n_ids;
    bool bad;                  /* skipped (skip_bad): unreadable image or too long */
} sample;

typedef struct trainer {
    mmb_ctx *ctx;
    const mmb_train_params *p;
    mmb_mllm *m;
    const mmb__trainable_ops *ops;
    void *proj;
    mmb__tparam *tp;
    int np;
    float **mom, **vel;        /* AdamW's moments per parameter */
    sample *s;
    int64_t n, rows, in_w, d;  /* samples, image rows, projector in / out widths */
    int32_t bos;               /* the tokenizer's BOS when it puts one, else -1 */
    char *cache, *out, *dir;   /* cache dir, output dir, the images' directory */
    mmb_st_file *shard;        /* the cache shard last read (samples come in order), or NULL */
    int64_t shard_k;           /* its index */
    int64_t skipped, cached;
    mmb_conn_cfg cc;
} trainer;

/* ---- data ------------------------------------------------------------------------------------------ */

static mmb_status read_text(mmb_ctx *ctx, const char *path, char **out) {
    FILE *f = NULL;
    mmb_status so = mmb__fopen_input(ctx, path, &f);  /* a FIFO, device or socket: refused at once */
    if (so != MMB_OK) return so;
    struct stat st;
    mmb_status s = MMB_OK;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode))
        s = mmb__err(ctx, MMB_ERR_IO, "%s: not a regular file", path);
    else if (st.st_size > ((int64_t)4 << 30))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: %lld bytes: a data file is read whole, at most 4 GiB", path,
                     (long long)st.st_size);
    char *b = s == MMB_OK ? malloc((size_t)st.st_size + 1) : NULL;
    if (s == MMB_OK && !b) s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
    if (s == MMB_OK && fread(b, 1, (size_t)st.st_size, f) != (size_t)st.st_size)
        s = mmb__err(ctx, MMB_ERR_IO, "%s: read failed", path);
    fclose(f);
    if (s != MMB_OK) {
        free(b);
        return s;
    }
    b[st.st_size] = 0;
    *out = b;
    return MMB_OK;
}

/* The string field `key` of object o, or NULL. */
static const char *str_of(const cJSON *o, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static mmb_status load_data(trainer *t) {
    mmb_ctx *ctx = t->ctx;
    char *txt = NULL;
    mmb_status s = read_text(ctx, t->p->data, &txt);
    if (s != MMB_OK) return s;
    cJSON *j = cJSON_Parse(txt);
    free(txt);
    if (!cJSON_IsArray(j)) {
        cJSON_Delete(j);
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: not a JSON list of samples", t->p->data);
    }
    t->n = cJSON_GetArraySize(j);
    if (t->n < 1) s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: no samples", t->p->data);
    if (s == MMB_OK && !(t->s = calloc((size_t)t->n, sizeof *t->s))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    const mmb_tokenizer *tok = mmb_mllm_tokenizer(t->m);
    int64_t i = 0;
    for (const cJSON *e = j->child; e && s == MMB_OK; e = e->next, i++) {
        const cJSON *conv = cJSON_GetObjectItemCaseSensitive(e, "conversations");
        const char *img = str_of(e, "image"), *q = NULL, *cap = NULL;
        if (cJSON_GetArraySize(conv) >= 2) {
            q = str_of(cJSON_GetArrayItem(conv, 0), "value");
            cap = str_of(cJSON_GetArrayItem(conv, 1), "value");
        }
        if (!img || !q || !cap || !strstr(q, "<image>")) {
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: sample %lld: expected {\"image\": path, \"conversations\": "
                         "[{\"value\": \"<image>...\"}, {\"value\": caption}]}", t->p->data, (long long)i);
            break;
        }
        /* preprocess_plain: the human turn becomes "<image>" alone, then caption + conversation sep "\n" */
        size_t cl = strlen(cap);
        char *c2 = malloc(cl + 2);
        if (!(t->s[i].image = strdup(img)) || !c2) {
            free(c2);
            s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
            break;
        }
        memcpy(c2, cap, cl);
        c2[cl] = '\n';
        c2[cl + 1] = 0;
        s = mmb_tokenizer_encode(ctx, tok, c2, cl + 1, 0, &t->s[i].ids, &t->s[i].n_ids);
        free(c2);
        if (s == MMB_OK && t->s[i].n_ids < 1)
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: sample %lld: an empty caption", t->p->data, (long long)i);
    }
    cJSON_Delete(j);
    return s;
}

/* ---- the feature cache ---------------------------------------------------------------------------------- */

static char *shard_path(const trainer *t, int64_t k) {
    char *p = malloc(strlen(t->cache) + 40);
    if (p) sprintf(p, "%s/features-%06lld.safetensors", t->cache, (long long)k);
    return p;
}

/* Newline-joined image paths of shard k's samples (malloc'd). */
static char *shard_images(const trainer *t, int64_t k) {
    size_t len = 1;
    int64_t a = k * SHARD, b = a + SHARD < t->n ? a + SHARD : t->n;
    for (int64_t i = a; i < b; i++) len += strlen(t->s[i].image) + 1;
    char *o = malloc(len), *w = o;
    if (!o) return NULL;
    for (int64_t i = a; i < b; i++) w += sprintf(w, "%s\n", t->s[i].image);
    *w = 0;
    return o;
}

static bool shard_ok(const trainer *t, int64_t k, const char *images, const char *model) {
    char *path = shard_path(t, k);
    mmb_st_file *f = NULL;
    bool ok = path && mmb_st_open(NULL, path, &f) == MMB_OK;
    ok = ok && mmb_st_meta(f, "images") && strcmp(mmb_st_meta(f, "images"), images) == 0 && mmb_st_meta(f, "model") &&
         strcmp(mmb_st_meta(f, "model"), model) == 0;
    mmb_st_close(f);
    free(path);
    return ok;
}

/* Marks sample i bad (skip_bad) or returns the error s as it is. */
static mmb_status bad_sample(trainer *t, int64_t i, mmb_status s) {
    if (!t->p->skip_bad) return s;
    if (!t->s[i].bad) t->skipped++;
    t->s[i].bad = true;
    return MMB_OK;
}

static mmb_status build_shard(trainer *t, int64_t k, const char *images, const char *model, int64_t context) {
    mmb_ctx *ctx = t->ctx;
    int64_t a = k * SHARD, b = a + SHARD < t->n ? a + SHARD : t->n;
    mmb_tensor *ts = calloc((size_t)(b - a), sizeof *ts);
    float **data = calloc((size_t)(b - a), sizeof *data);
    char (*names)[24] = calloc((size_t)(b - a), sizeof *names);
    mmb_status s = ts && data && names ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    int nt = 0;
    for (int64_t i = a; i < b && s == MMB_OK; i++) {
        char *path = malloc(strlen(t->dir) + strlen(t->s[i].image) + 2);
        if (!path) {
            s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
            break;
        }
        if (t->s[i].image[0] == '/') strcpy(path, t->s[i].image);
        else sprintf(path, "%s/%s", t->dir, t->s[i].image);
        mmb_image img = {0};
        float *pix = NULL, *x = NULL;
        int h = 0, w = 0;
        int64_t tokens = 0, rows = 0;
        mmb_conn_cfg cc;
        mmb_status r = mmb_image_load(ctx, path, 0, &img);
        if (r == MMB_OK) r = mmb__mllm_preprocess(ctx, t->m, &img, &pix, &h, &w, &tokens);
        mmb_image_free(&img);
        free(path);
        if (r == MMB_OK) r = mmb__model_projector_input(ctx, mmb_mllm_model(t->m), pix, 1, h, w, &x, &rows, &cc);
        free(pix);
        if (r == MMB_OK && t->rows && rows != t->rows)
            r = mmb__err(ctx, MMB_ERR_SHAPE, "sample %lld: %lld image rows, the others have %lld", (long long)i,
                         (long long)rows, (long long)t->rows);
        if (r == MMB_OK && (t->bos >= 0) + rows + t->s[i].n_ids > context)
            r = mmb__err(ctx, MMB_ERR_SHAPE, "sample %lld: %lld positions (image %lld + caption %lld), the LLM's "
                         "context is %lld", (long long)i, (long long)((t->bos >= 0) + rows + t->s[i].n_ids),
                         (long long)rows, (long long)t->s[i].n_ids, (long long)context);
        if (r != MMB_OK) {
            free(x);
            s = bad_sample(t, i, r);
            continue;
        }
        t->rows = rows;
        data[nt] = x;
        snprintf(names[nt], sizeof names[nt], "%lld", (long long)i);
        ts[nt] = (mmb_tensor){.name = names[nt], .dtype = MMB_F32, .ndim = 2, .shape = {rows, t->in_w}, .data = x};
        nt++;
        t->cached++;
        if (t->p->on_cache) t->p->on_cache(t->p->user, i + 1, t->n);
    }
    const char *keys[] = {"images", "model"}, *vals[] = {images, model};
    char *path = s == MMB_OK ? shard_path(t, k) : NULL;
    if (s == MMB_OK && !path) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK) s = mmb_st_write_meta(ctx, path, ts, nt, keys, vals, 2);
    free(path);
    for (int i = 0; i < nt; i++) free(data[i]);
    free(ts);
    free(data);
    free(names);
    return s;
}

/* Every shard present and current, or computed now; the samples a shard lacks are the skipped ones. */
static mmb_status fill_cache(trainer *t) {
    mmb_ctx *ctx = t->ctx;
    if (mkdir(t->cache, 0777) != 0 && errno != EEXIST) return mmb__err(ctx, MMB_ERR_IO, "%s: %s", t->cache, strerror(errno));
    char model[4200];
    snprintf(model, sizeof model, "%s in_width %lld", t->p->model, (long long)t->in_w);
    mmb_lm_info li;
    mmb_lm_get_info(mmb_mllm_lm(t->m), &li);
    mmb_status s = MMB_OK;
    for (int64_t k = 0; k * SHARD < t->n && s == MMB_OK; k++) {
        char *images = shard_images(t, k);
        if (!images) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        if (!shard_ok(t, k, images, model)) s = build_shard(t, k, images, model, li.max_positions);
        free(images);
        /* which samples the shard holds: the rest were skipped */
        char *path = s == MMB_OK ? shard_path(t, k) : NULL;
        mmb_st_file *f = NULL;
        if (s == MMB_OK && (!path || (s = mmb_st_open(ctx, path, &f)) != MMB_OK)) {
            free(path);
            return path ? s : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        }
        for (int64_t i = k * SHARD; f && i < (k + 1) * SHARD && i < t->n; i++) {
            char nm[24];
            snprintf(nm, sizeof nm, "%lld", (long long)i);
            const mmb_tensor *x = mmb_st_find(f, nm);
            if (!x) {
                if ((s = bad_sample(t, i, mmb__err(ctx, MMB_ERR_FORMAT, "%s: sample %lld is not in the cache (its "
                                                   "image failed when the cache was made)", path, (long long)i))) != MMB_OK)
                    break;
                continue;
            }
            if (x->dtype != MMB_F32 || x->ndim != 2 || x->shape[1] != t->in_w || (t->rows && x->shape[0] != t->rows)) {
                s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s' is not [%lld, %lld] F32", path, nm,
                             (long long)t->rows, (long long)t->in_w);
                break;
            }
            t->rows = x->shape[0];
        }
        mmb_st_close(f);
        free(path);
    }
    if (s == MMB_OK && t->skipped == t->n) s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: every sample was skipped", t->p->data);
    return s;
}

/* ---- one step ------------------------------------------------------------------------------------------- */

/* Sample i's projector input (rows, in_w), in place in its shard's mapping (kept open until the next shard). */
static mmb_status cached_input(trainer *t, int64_t i, const float **x) {
    char nm[24];
    mmb_status s = MMB_OK;
    if (!t->shard || t->shard_k != i / SHARD) {
        mmb_st_close(t->shard);
        t->shard = NULL;
        char *path = shard_path(t, i / SHARD);
        s = path ? mmb_st_open(t->ctx, path, &t->shard) : mmb__err(t->ctx, MMB_ERR_NOMEM, "out of memory");
        t->shard_k = i / SHARD;
        free(path);
    }
    snprintf(nm, sizeof nm, "%lld", (long long)i);
    const mmb_tensor *ten = s == MMB_OK ? mmb_st_find(t->shard, nm) : NULL;
    if (s == MMB_OK && (!ten || ten->dtype != MMB_F32 || mmb_tensor_numel(ten) != t->rows * t->in_w))
        s = mmb__err(t->ctx, MMB_ERR_FORMAT, "%s: tensor '%s' is missing or not [%lld, %lld] F32 (the cache "
                     "changed under the run)", mmb__st_path(t->shard), nm, (long long)t->rows, (long long)t->in_w);
    if (s == MMB_OK) *x = ten->data;
    return s;
}

/* The samples of step `step` (0-based) over the epochs: [*a, *b) as positions in the run's sequence. */
static int64_t steps_of(const trainer *t) {
    int64_t per = (t->n + t->p->batch - 1) / t->p->batch, all = per * t->p->epochs;
    return t->p->max_steps > 0 && t->p->max_steps < all ? t->p->max_steps : all;
}

static double lr_at(const trainer *t, int64_t step, int64_t steps) {
    int64_t warm = (int64_t)ceil((double)steps * t->p->warmup_ratio);
    if (step < warm) return t->p->lr * (double)step / (double)(warm > 1 ? warm : 1);
    double prog = (double)(step - warm) / (double)(steps - warm > 1 ? steps - warm : 1);
    double f = 0.5 * (1.0 + cos(M_PI * prog));
    return t->p->lr * (f > 0 ? f : 0);
}

/* One micro-batch's samples: their loss (sum, tokens) and the projector's gradient, scaled by `scale` / tokens. */
static mmb_status micro_batch(trainer *t, const int64_t *idx, int n, double scale, double *loss, int64_t *tokens,
                              int64_t *positions) {
    mmb_ctx *ctx = t->ctx;
    const mmb_lm *lm = mmb_mllm_lm(t->m);
    int64_t tok = 0, most = 0;
    for (int k = 0; k < n; k++) {
        tok += t->s[idx[k]].n_ids;
        most = t->s[idx[k]].n_ids > most ? t->s[idx[k]].n_ids : most;
    }
    const int64_t R = t->rows, L = (t->bos >= 0) + R + most;
    float *emb = malloc(sizeof(float) * (size_t)(L * t->d)), *g = malloc(sizeof(float) * (size_t)(L * t->d));
    const float *x = NULL;
    int32_t *lab = malloc(sizeof(int32_t) * (size_t)L);
    mmb_status s = emb && g && lab ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for a sample");
    double sum = 0;
    for (int k = 0; k < n && s == MMB_OK; k++) {
        const sample *sm = &t->s[idx[k]];
        int64_t b = t->bos >= 0, n_pos = b + R + sm->n_ids, cnt = 0;
        if (b) s = mmb_lm_embed(ctx, lm, &t->bos, 1, emb);
        if (s == MMB_OK) s = cached_input(t, idx[k], &x);
        if (s == MMB_OK) s = t->ops->forward(ctx, t->proj, x, R, emb + b * t->d);
        if (s == MMB_OK) s = mmb_lm_embed(ctx, lm, sm->ids, sm->n_ids, emb + (b + R) * t->d);
        for (int64_t i = 0; i < n_pos; i++) lab[i] = i < b + R ? IGNORE : sm->ids[i - b - R];
        double ls = 0;
        if (s == MMB_OK) s = mmb__lm_loss_backward(ctx, lm, emb, lab, n_pos, &ls, &cnt, g);
        if (s == MMB_OK) s = t->ops->backward(ctx, t->proj, g + b * t->d, (float)(scale / (double)tok));
        sum += ls;
        *positions += n_pos;
    }
    free(emb);
    free(g);
    free(lab);
    *loss = sum / (double)tok;
    *tokens += tok;
    return s;
}

/* ---- checkpoints and outputs ------------------------------------------------------------------------------ */

static char *out_path(const trainer *t, const char *name) {
    char *p = malloc(strlen(t->out) + strlen(name) + 2);
    if (p) sprintf(p, "%s/%s", t->out, name);
    return p;
}

/* The run's settings a checkpoint must share to be resumed. */
static void settings(const trainer *t, int64_t steps, char *buf, size_t n) {
    snprintf(buf, n, "model %s; data %s (%lld samples); batch %lld micro %lld; steps %lld; lr %.17g wd %.17g warmup "
             "%.17g", t->p->model, t->p->data, (long long)t->n, (long long)t->p->batch, (long long)t->p->micro_batch,
             (long long)steps, t->p->lr, t->p->weight_decay, t->p->warmup_ratio);
}

static mmb_status save_checkpoint(trainer *t, int64_t step, int64_t steps) {
    mmb_ctx *ctx = t->ctx;
    mmb_tensor *ts = calloc((size_t)(3 * t->np), sizeof *ts);
    char (*nm)[200] = calloc((size_t)(3 * t->np), sizeof *nm);
    mmb_status s = ts && nm ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int i = 0; i < t->np && s == MMB_OK; i++) {
        const float *src[3] = {t->tp[i].w, t->mom[i], t->vel[i]};
        for (int k = 0; k < 3; k++) {
            snprintf(nm[3 * i + k], sizeof nm[0], "%c.%s", "wmv"[k], t->tp[i].name);
            ts[3 * i + k] = (mmb_tensor){.name = nm[3 * i + k], .dtype = MMB_F32, .ndim = t->tp[i].ndim,
                                         .shape = {t->tp[i].shape[0], t->tp[i].shape[1]}, .data = src[k]};
        }
    }
    char set[8192], st[32];
    settings(t, steps, set, sizeof set);
    snprintf(st, sizeof st, "%lld", (long long)step);
    const char *keys[] = {"settings", "step"}, *vals[] = {set, st};
    char *path = s == MMB_OK ? out_path(t, "checkpoint.safetensors") : NULL;
    if (s == MMB_OK) s = path ? mmb_st_write_meta(ctx, path, ts, 3 * t->np, keys, vals, 2)
                              : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    free(path);
    free(ts);
    free(nm);
    return s;
}

static mmb_status load_checkpoint(trainer *t, int64_t steps, int64_t *step) {
    mmb_ctx *ctx = t->ctx;
    char *path = out_path(t, "checkpoint.safetensors"), set[8192];
    mmb_st_file *f = NULL;
    mmb_status s = path ? mmb_st_open(ctx, path, &f) : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    settings(t, steps, set, sizeof set);
    const char *ms = s == MMB_OK ? mmb_st_meta(f, "settings") : NULL, *st = s == MMB_OK ? mmb_st_meta(f, "step") : NULL;
    char *end = NULL;
    long long k = st ? strtoll(st, &end, 10) : -1;
    if (s == MMB_OK && (!ms || strcmp(ms, set) != 0 || !st || *end || k < 0 || k > steps))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: not a checkpoint of this run (its settings: %s; this run's: %s)", path,
                     ms ? ms : "none", set);
    for (int i = 0; i < t->np && s == MMB_OK; i++) {
        float *dst[3] = {t->tp[i].w, t->mom[i], t->vel[i]};
        for (int c = 0; c < 3 && s == MMB_OK; c++) {
            char nm[200];
            snprintf(nm, sizeof nm, "%c.%s", "wmv"[c], t->tp[i].name);
            const mmb_tensor *x = mmb_st_find(f, nm);
            if (!x || x->dtype != MMB_F32 || mmb_tensor_numel(x) != t->tp[i].numel)
                s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: tensor '%s' is missing or not %lld F32 values", path, nm,
                             (long long)t->tp[i].numel);
            else memcpy(dst[c], x->data, sizeof(float) * (size_t)t->tp[i].numel);
        }
    }
    mmb_st_close(f);
    free(path);
    if (s == MMB_OK) *step = k;
    return s;
}

/* LLaVA's key for a projector parameter: model.mm_projector.{0,2,...}.weight (transformers' linear_N is
 * Sequential index 2 (N - 1)); "linear" is model.mm_projector.weight. */
static void llava_key(const trainer *t, const char *name, char *out, size_t n) {
    const char *rest = name + strlen(t->cc.prefix);
    int k;
    if (sscanf(rest, "linear_%d.", &k) == 1) snprintf(out, n, "model.mm_projector.%d.%s", 2 * (k - 1), strchr(rest, '.') + 1);
    else snprintf(out, n, "model.mm_projector.%s", rest);
}

static mmb_status write_projector(trainer *t) {
    mmb_tensor ts[128];
    char nm[128][200];
    for (int i = 0; i < t->np && i < 128; i++) {
        llava_key(t, t->tp[i].name, nm[i], sizeof nm[i]);
        ts[i] = (mmb_tensor){.name = nm[i], .dtype = MMB_F32, .ndim = t->tp[i].ndim,
                             .shape = {t->tp[i].shape[0], t->tp[i].shape[1]}, .data = t->tp[i].w};
    }
    char *path = out_path(t, "mm_projector.safetensors");
    mmb_status s = path ? mmb_st_write(t->ctx, path, ts, t->np) : mmb__err(t->ctx, MMB_ERR_NOMEM, "out of memory");
    free(path);
    return s;
}

/* Copies file `name` of src into dst, written as every output is (mmb__out_open / mmb__out_commit). */
static mmb_status copy_file(mmb_ctx *ctx, const char *src, const char *dst, const char *name) {
    char a[4200], b[4200];
    snprintf(a, sizeof a, "%s/%s", src, name);
    snprintf(b, sizeof b, "%s/%s", dst, name);
    FILE *in = NULL;
    mmb_status s = mmb__fopen_input(ctx, a, &in);  /* a FIFO, device or socket: refused at once */
    if (s != MMB_OK) return s;
    mmb__out o;
    s = mmb__out_open(ctx, b, &o);
    char buf[65536];
    size_t n;
    while (s == MMB_OK && (n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, o.f) != n) s = mmb__err(ctx, MMB_ERR_IO, "%s: write failed: %s", b, strerror(errno));
    if (s == MMB_OK && ferror(in)) s = mmb__err(ctx, MMB_ERR_IO, "%s: read failed", a);
    fclose(in);
    if (s == MMB_OK) s = mmb__out_commit(ctx, &o);
    else mmb__out_abort(&o);
    return s;
}

/* out/hf: the transformers checkpoint with its projector replaced: its other files copied, its tensors (every
 * file of the checkpoint) written as one model.safetensors with the trained ones in place of theirs. */
static mmb_status write_hf(trainer *t) {
    mmb_ctx *ctx = t->ctx;
    const mmb_ckpt *c = mmb__model_ckpt(mmb_mllm_model(t->m));
    char *dir = out_path(t, "hf");
    if (!dir) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb_status s = mkdir(dir, 0777) == 0 || errno == EEXIST ? MMB_OK : mmb__err(ctx, MMB_ERR_IO, "%s: %s", dir, strerror(errno));
    static const char *const files[] = {"config.json", "generation_config.json", "tokenizer.json",
                                        "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                                        "processor_config.json", "chat_template.json", "chat_template.jinja",
                                        "tokenizer.model", "added_tokens.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0] && s == MMB_OK; i++) {
        char p[4200];
        snprintf(p, sizeof p, "%s/%s", c->dir, files[i]);
        struct stat st;
        if (stat(p, &st) == 0 && S_ISREG(st.st_mode)) s = copy_file(ctx, c->dir, dir, files[i]);
    }
    int64_t n = 0;
    for (int f = 0; f < c->n_files; f++) n += mmb_st_count(c->files[f]);
    mmb_tensor *ts = s == MMB_OK ? calloc((size_t)(n + 1), sizeof *ts) : NULL;
    if (s == MMB_OK && !ts) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    int64_t k = 0;
    for (int f = 0; f < c->n_files && s == MMB_OK; f++)
        for (int i = 0; i < mmb_st_count(c->files[f]); i++) {
            mmb_tensor x = *mmb_st_at(c->files[f], i);
            for (int q = 0; q < t->np; q++)
                if (strcmp(x.name, t->tp[q].name) == 0) {
                    x.dtype = MMB_F32;
                    x.data = t->tp[q].w;
                }
            ts[k++] = x;
        }
    char *path = s == MMB_OK ? malloc(strlen(dir) + 32) : NULL;
    if (path) sprintf(path, "%s/model.safetensors", dir);
    if (s == MMB_OK) s = path ? mmb_st_write(ctx, path, ts, (int)k) : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    free(path);
    free(ts);
    free(dir);
    return s;
}

/* The steps [1, n] of out/loss.csv, when it has them (a resumed run's curve goes on from it). */
static void read_curve(const trainer *t, double *loss, double *lr, int64_t n) {
    char *path = out_path(t, "loss.csv"), line[128];
    FILE *f = NULL;
    if (path && mmb__fopen_input(NULL, path, &f) != MMB_OK) f = NULL;  /* absent or not a regular file: none */
    long long k;
    double a, b;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "%lld,%lf,%lf", &k, &a, &b) == 3 && k >= 1 && k <= n) loss[k - 1] = a, lr[k - 1] = b;
    if (f) fclose(f);
    free(path);
}

/* loss.csv and loss.png (the curve on a white 640 x 360 canvas, the loss axis from 0 to its maximum). */
static mmb_status write_curve(trainer *t, const double *loss, const double *lr, int64_t n) {
    mmb_ctx *ctx = t->ctx;
    char *path = out_path(t, "loss.csv");
    if (!path) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb__out o;
    mmb_status s = mmb__out_open(ctx, path, &o);
    if (s == MMB_OK) {
        bool ok = fprintf(o.f, "step,loss,lr\n") > 0;
        for (int64_t i = 0; i < n && ok; i++) ok = fprintf(o.f, "%lld,%.9g,%.9g\n", (long long)(i + 1), loss[i], lr[i]) > 0;
        if (ok) s = mmb__out_commit(ctx, &o);
        else {
            s = mmb__err(ctx, MMB_ERR_IO, "%s: write failed: %s", path, strerror(errno));
            mmb__out_abort(&o);
        }
    }
    free(path);
    const int W = 640, H = 360, M = 30;
    unsigned char *img = s == MMB_OK ? malloc((size_t)(W * H * 3)) : NULL;
    if (s == MMB_OK && !img) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s != MMB_OK) return s;
    memset(img, 255, (size_t)(W * H * 3));
    double top = 0;
    for (int64_t i = 0; i < n; i++) top = isfinite(loss[i]) && loss[i] > top ? loss[i] : top;
    top = top > 0 ? top : 1;
    for (int x = M; x < W - M; x++) memset(img + ((H - M) * W + x) * 3, 0, 3);   /* axes */
    for (int y = M; y < H - M; y++) memset(img + (y * W + M) * 3, 0, 3);
    int px = -1, py = -1;
    for (int64_t i = 0; i < n; i++) {
        int x = M + (int)((double)(W - 2 * M - 1) * (n > 1 ? (double)i / (double)(n - 1) : 0.5));
        int y = H - M - (int)((double)(H - 2 * M - 1) * (isfinite(loss[i]) ? loss[i] / top : 0));
        for (int k = 0, steps = px < 0 ? 1 : abs(x - px) + abs(y - py) + 1; k < steps; k++) { /* a line from the last */
            int xx = px < 0 ? x : px + (x - px) * k / (steps > 1 ? steps - 1 : 1);
            int yy = px < 0 ? y : py + (y - py) * k / (steps > 1 ? steps - 1 : 1);
            unsigned char *q = img + (yy * W + xx) * 3;
            q[0] = 31, q[1] = 119, q[2] = 180;
        }
        px = x, py = y;
    }
    path = out_path(t, "loss.png");
    s = path ? mmb__png_write(ctx, path, img, W, H) : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    free(path);
    free(img);
    return s;
}

/* ---- the run ---------------------------------------------------------------------------------------------- */

static void trainer_free(trainer *t) {
    mmb_st_close(t->shard);
    for (int64_t i = 0; t->s && i < t->n; i++) {
        free(t->s[i].image);
        free(t->s[i].ids);
    }
    free(t->s);
    for (int i = 0; i < t->np; i++) {
        if (t->mom) free(t->mom[i]);
        if (t->vel) free(t->vel[i]);
    }
    free(t->mom);
    free(t->vel);
    if (t->ops) t->ops->free(t->proj);
    mmb_mllm_free(t->m);
    free(t->cache);
    free(t->out);
    free(t->dir);
}

static mmb_status check_params(mmb_ctx *ctx, mmb_train_params *p) {
    mmb_train_params d = mmb_train_default_params();
    double *v[] = {&p->lr, &p->beta1, &p->beta2, &p->eps, &p->max_grad_norm}, dv[] = {d.lr, d.beta1, d.beta2, d.eps,
                                                                                      d.max_grad_norm};
    for (int i = 0; i < 5; i++)
        if (*v[i] == 0) *v[i] = dv[i];
    if (p->warmup_ratio == 0 && !(p->warmup_ratio < 0)) p->warmup_ratio = d.warmup_ratio;
    if (p->warmup_ratio < 0) p->warmup_ratio = 0; /* a negative ratio asks for none */
    if (!p->batch) p->batch = d.batch;
    if (!p->micro_batch) p->micro_batch = p->batch < d.micro_batch ? p->batch : d.micro_batch;
    if (!p->epochs) p->epochs = 1;
    if (!p->save_every) p->save_every = d.save_every;
    if (!p->model || !p->data || !p->out)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_train: model, data and out are needed");
    if (p->batch < 1 || p->micro_batch < 1 || p->batch % p->micro_batch || p->epochs < 1 || p->max_steps < 0 ||
        p->save_every < 1 || !(p->lr > 0) || !(p->beta1 >= 0 && p->beta1 < 1) || !(p->beta2 >= 0 && p->beta2 < 1) ||
        !(p->eps > 0) || !(p->max_grad_norm > 0) || !(p->weight_decay >= 0) || !(p->warmup_ratio <= 1))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_train: bad settings (batch %lld must be a multiple of micro_batch "
                        "%lld; lr, eps, max_grad_norm > 0; betas in [0, 1); warmup_ratio in [0, 1])",
                        (long long)p->batch, (long long)p->micro_batch);
    return MMB_OK;
}

static mmb_status setup(trainer *t, mmb_train_params *p) {
    mmb_ctx *ctx = t->ctx;
    mmb_mllm_params mp = mmb_mllm_default_params();
    mp.vision_tower = p->vision_tower;
    mmb_status s = mmb_mllm_open(ctx, p->model, &mp, &t->m);
    if (s != MMB_OK) return s;
    const mmb_model *mo = mmb_mllm_model(t->m);
    if (!mo || !mmb_mllm_lm(t->m) || !mmb_mllm_tokenizer(t->m) || !mmb_mllm_vit(t->m))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: training needs a LLaVA checkpoint with its tower, projector, "
                        "LLM and tokenizer", p->model);
    mmb_model_info mi;
    mmb_model_get_info(mo, &mi);
    if (strcmp(mi.family, "llava") != 0 || !(t->ops = mmb__trainable_find(mmb__model_conn_cfg(mo)->type)))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a %s model with connector '%s': the trainer trains LLaVA "
                        "projectors (linear, mlpNx_gelu, llava, simple_res; behind a Dense Connector too)", p->model,
                        mi.family, mi.connector);
    /* the projector's config, from one encode of a blank image (it also checks the tower runs) */
    t->in_w = mi.in_width;
    t->d = mi.out_width;
    const char *slash = strrchr(p->data, '/');
    t->dir = strdup(p->image_dir ? p->image_dir : slash ? "" : ".");
    if (t->dir && !p->image_dir && slash) {
        free(t->dir);
        t->dir = strndup(p->data, (size_t)(slash - p->data));
    }
    t->out = strdup(p->out);
    if (p->cache_dir) t->cache = strdup(p->cache_dir);
    else if ((t->cache = malloc(strlen(p->out) + 16))) sprintf(t->cache, "%s/features", p->out);
    if (!t->dir || !t->out || !t->cache) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    /* the tokenizer's BOS, when its encoding of "" gives one */
    int32_t *e = NULL;
    int64_t ne = 0;
    if ((s = mmb_tokenizer_encode(ctx, mmb_mllm_tokenizer(t->m), "", 0, 1, &e, &ne)) != MMB_OK) return s;
    t->bos = ne == 1 ? e[0] : -1;
    free(e);
    return MMB_OK;
}

mmb_status mmb_train(mmb_ctx *ctx, const mmb_train_params *pin, mmb_train_result *res) {
    if (!ctx || !pin) return mmb__err(ctx, MMB_ERR_ARG, "mmb_train: NULL argument");
    mmb_train_params p = *pin;
    mmb_status s = check_params(ctx, &p);
    if (s != MMB_OK) return s;
    double t0 = mmb__now_s();
    trainer t = {.ctx = ctx, .p = &p};
    char *ck = NULL;
    struct stat st;
    if (mkdir(p.out, 0777) != 0 && errno != EEXIST) return mmb__err(ctx, MMB_ERR_IO, "%s: %s", p.out, strerror(errno));
    if ((s = setup(&t, &p)) == MMB_OK) s = load_data(&t);
    if (s == MMB_OK && !(ck = out_path(&t, "checkpoint.safetensors"))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK && !p.resume && stat(ck, &st) == 0)
        s = mmb__err(ctx, MMB_ERR_ARG, "%s holds another run's checkpoint: resume it, or choose another directory",
                     p.out);
    if (s == MMB_OK) s = fill_cache(&t);
    /* the projector from the checkpoint's weights (or a fresh init) */
    if (s == MMB_OK) {
        t.cc = *mmb__model_conn_cfg(mmb_mllm_model(t.m));
        s = t.ops->open(ctx, p.random_init ? NULL : mmb__model_ckpt(mmb_mllm_model(t.m)), &t.cc, p.seed, &t.proj);
    }
    if (s == MMB_OK) {
        t.np = t.ops->params(t.proj, &t.tp);
        t.mom = calloc((size_t)t.np, sizeof *t.mom);
        t.vel = calloc((size_t)t.np, sizeof *t.vel);
        for (int i = 0; t.mom && t.vel && i < t.np; i++) {
            t.mom[i] = calloc((size_t)t.tp[i].numel, sizeof(float));
            t.vel[i] = calloc((size_t)t.tp[i].numel, sizeof(float));
            if (!t.mom[i] || !t.vel[i]) break;
        }
        if (!t.mom || !t.vel || !t.mom[t.np - 1] || !t.vel[t.np - 1]) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    }
    const int64_t steps = s == MMB_OK ? steps_of(&t) : 0;
    int64_t step = 0;
    if (s == MMB_OK && p.resume && stat(ck, &st) == 0) s = load_checkpoint(&t, steps, &step);
    double *losses = calloc((size_t)steps + 1, sizeof(double)), *lrs = calloc((size_t)steps + 1, sizeof(double));
    if (s == MMB_OK && (!losses || !lrs)) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK && step) read_curve(&t, losses, lrs, step); /* the resumed steps' part of the curve */
    /* the run's sequence: the samples in order, epoch after epoch, the skipped ones left out */
    int64_t kept = t.n - t.skipped, *order = s == MMB_OK ? malloc(sizeof(int64_t) * (size_t)(kept + 1)) : NULL;
    if (s == MMB_OK && !order) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t i = 0, k = 0; s == MMB_OK && i < t.n; i++)
        if (!t.s[i].bad) order[k++] = i;
    const int64_t per_epoch = (kept + p.batch - 1) / p.batch;
    mmb_adamw opt = {.beta1 = p.beta1, .beta2 = p.beta2, .eps = p.eps, .weight_decay = p.weight_decay};
    int64_t tokens = 0, positions = 0, done0 = step;
    double last = NAN, tstart = mmb__now_s();
    for (; s == MMB_OK && step < steps; step++) {
        int64_t a = (step % per_epoch) * p.batch, b = a + p.batch < kept ? a + p.batch : kept;
        for (int i = 0; i < t.np; i++) memset(t.tp[i].g, 0, sizeof(float) * (size_t)t.tp[i].numel);
        int64_t n_micro = (b - a + p.micro_batch - 1) / p.micro_batch;
        double loss = 0;
        for (int64_t u = a; u < b && s == MMB_OK; u += p.micro_batch) {
            int n = (int)(b - u < p.micro_batch ? b - u : p.micro_batch);
            double l = 0;
            s = micro_batch(&t, order + u, n, 1.0 / (double)n_micro, &l, &tokens, &positions);
            loss += l / (double)n_micro;
        }
        if (s != MMB_OK) break;
        if (!isfinite(loss)) {
            s = mmb__err(ctx, MMB_ERR_NUMERIC, "step %lld: the loss is %g; the step is not applied (the last "
                         "checkpoint is step %lld's)", (long long)(step + 1), loss,
                         (long long)(step / p.save_every * p.save_every));
            break;
        }
        double norm = 0;
        for (int i = 0; i < t.np; i++)
            for (int64_t e = 0; e < t.tp[i].numel; e++) norm += (double)t.tp[i].g[e] * t.tp[i].g[e];
        norm = sqrt(norm);
        double coef = p.max_grad_norm / (norm + 1e-6);
        for (int i = 0; coef < 1 && i < t.np; i++)
            for (int64_t e = 0; e < t.tp[i].numel; e++) t.tp[i].g[e] = (float)(t.tp[i].g[e] * coef);
        opt.lr = lr_at(&t, step, steps);
        for (int i = 0; i < t.np; i++) mmb__adamw_step(t.tp[i].w, t.tp[i].g, t.mom[i], t.vel[i], t.tp[i].numel, &opt, step + 1);
        losses[step] = last = loss;
        lrs[step] = opt.lr;
        double el = mmb__now_s() - tstart, rate = el > 0 ? (double)positions / el : 0;
        double eta = step + 1 > done0 ? el / (double)(step + 1 - done0) * (double)(steps - step - 1) : 0;
        bool stop = p.on_step && p.on_step(p.user, step + 1, steps, loss, opt.lr, rate, eta);
        if ((step + 1) % p.save_every == 0 || step + 1 == steps || stop) s = save_checkpoint(&t, step + 1, steps);
        if (s == MMB_OK && stop) {
            s = mmb__err(ctx, MMB_ERR_ABORTED, "stopped after step %lld of %lld (checkpoint written)",
                         (long long)(step + 1), (long long)steps); /* the loop's increment counts this step */
        }
    }
    if (s == MMB_OK) s = write_projector(&t);
    if (s == MMB_OK) { /* the transformers directory, for a transformers checkpoint */
        mmb_model_info mi;
        mmb_model_get_info(mmb_mllm_model(t.m), &mi);
        if (strncmp(mi.layout, "transformers", 12) == 0) s = write_hf(&t);
    }
    if (s == MMB_OK || s == MMB_ERR_ABORTED) { /* the curve so far, also when stopped */
        mmb_status c = write_curve(&t, losses, lrs, step);
        if (s == MMB_OK) s = c;
    }
    if (res && (s == MMB_OK || s == MMB_ERR_ABORTED))
        *res = (mmb_train_result){.steps = step, .samples = t.n, .skipped = t.skipped, .cached = t.cached,
                                  .last_loss = last, .seconds = mmb__now_s() - t0};
    free(order);
    free(losses);
    free(lrs);
    free(ck);
    trainer_free(&t);
    return s;
}
