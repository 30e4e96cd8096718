/* mmbridge serve's endpoints: a request's JSON parsed into a job (on the connection's thread, so that a bad request
 * is refused before it waits for a slot), the job run on a slot's context through the library (images decoded,
 * mmb_mllm_encode, or mmb_mllm_tokenize_chat + mmb_mllm_generate), and the result written as OpenAI writes it. */
#include "serve.h"

#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

void sv_error_json(sv_buf *b, int http, const char *msg) {
    const char *type = http == 401 ? "authentication_error" : http == 403 ? "permission_error"
                       : http == 404 ? "not_found_error" : http == 413 ? "request_too_large"
                       : http == 503 ? "server_busy" : http >= 500 ? "server_error" : "invalid_request_error";
    b->n = 0;
    sv_puts(b, "{\"error\":{\"message\":");
    sv_json_str(b, msg, strlen(msg));
    sv_printf(b, ",\"type\":\"%s\",\"code\":%d}}", type, http);
}

/* ---- parsing ------------------------------------------------------------------------------------ */

typedef struct parse {
    const sv_server *sv;
    sv_job *j;
    int http;
    char msg[512];
} parse;

static int bad(parse *p, int http, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(parse *p, int http, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->msg, sizeof p->msg, fmt, ap);
    va_end(ap);
    p->http = http;
    return 1;
}

static int add_url(parse *p, const char *url) {
    sv_job *j = p->j;
    if (j->n_urls >= p->sv->cfg.max_images)
        return bad(p, 400, "more than %d images in one request (--max-images)", p->sv->cfg.max_images);
    char **u = realloc(j->urls, sizeof *u * (size_t)(j->n_urls + 1));
    if (!u) return bad(p, 500, "out of memory");
    j->urls = u;
    if (!(u[j->n_urls] = strdup(url))) return bad(p, 500, "out of memory");
    j->n_urls++;
    return 0;
}

/* An image reference: "url" string, {"url": ...}, {"image_url": ...} or {"type": "image_url", "image_url": ...}. */
static int image_ref(parse *p, const cJSON *v, const char *what) {
    if (cJSON_IsString(v)) return add_url(p, v->valuestring);
    if (cJSON_IsObject(v)) {
        const cJSON *u = cJSON_GetObjectItemCaseSensitive(v, "image_url");
        if (!u) u = cJSON_GetObjectItemCaseSensitive(v, "url");
        if (cJSON_IsObject(u)) u = cJSON_GetObjectItemCaseSensitive(u, "url");
        if (cJSON_IsString(u)) return add_url(p, u->valuestring);
    }
    return bad(p, 400, "%s: want an image as a data URL or a path, or {\"image_url\": {\"url\": ...}}", what);
}

static int parse_embed(parse *p, const cJSON *root, int want_raw) {
    sv_job *j = p->j;
    const cJSON *in = cJSON_GetObjectItemCaseSensitive(root, "input");
    if (!in) return bad(p, 400, "'input' is missing: one image or a list of them");
    if (cJSON_IsArray(in)) {
        if (!cJSON_GetArraySize(in)) return bad(p, 400, "'input' is an empty list");
        const cJSON *e;
        cJSON_ArrayForEach(e, in) if (image_ref(p, e, "'input'")) return 1;
    } else if (image_ref(p, in, "'input'")) return 1;
    const cJSON *ly = cJSON_GetObjectItemCaseSensitive(root, "layers");
    if (ly && !cJSON_IsNull(ly)) {
        if (!cJSON_IsArray(ly) || !cJSON_GetArraySize(ly) || cJSON_GetArraySize(ly) > MMB_MAX_TAPS)
            return bad(p, 400, "'layers' must be a list of 1 to %d hidden-state indices", MMB_MAX_TAPS);
        const cJSON *e;
        cJSON_ArrayForEach(e, ly) {
            if (!cJSON_IsNumber(e) || e->valuedouble != (double)(int)e->valuedouble || e->valuedouble < -1000 ||
                e->valuedouble > 1000)
                return bad(p, 400, "'layers': each entry is a whole hidden_states index (negative from the end)");
            j->taps[j->n_taps++] = (int)e->valuedouble;
        }
    }
    const cJSON *ef = cJSON_GetObjectItemCaseSensitive(root, "encoding_format");
    if (ef && !cJSON_IsNull(ef)) {
        const char *f = cJSON_IsString(ef) ? ef->valuestring : "";
        if (!strcmp(f, "base64")) j->b64 = 1;
        else if (!strcmp(f, "raw")) j->raw = 1;
        else if (strcmp(f, "float")) return bad(p, 400, "'encoding_format' is one of float, base64, raw");
    }
    j->raw |= want_raw;
    return 0;
}

/* A message's content into text with the model's image marker where its images are: the images first, each on
 * its own line (as mmb_mllm_tokenize puts them when the prompt holds no marker, and as llava-hf's templates
 * render image parts), then the text parts in order. */
static int parse_content(parse *p, const cJSON *c, const char *role, int k, char **out) {
    sv_buf t = {0};
    const char *marker = p->sv->info.image_marker;
    if (cJSON_IsString(c)) sv_puts(&t, c->valuestring);
    else if (cJSON_IsArray(c)) {
        const cJSON *e;
        cJSON_ArrayForEach(e, c) {
            const cJSON *ty = cJSON_GetObjectItemCaseSensitive(e, "type");
            if (!cJSON_IsString(ty)) { sv_free(&t); return bad(p, 400, "messages[%d]: a content part without 'type'", k); }
            if (strcmp(ty->valuestring, "image_url") && strcmp(ty->valuestring, "image") && strcmp(ty->valuestring, "text")) {
                sv_free(&t);
                return bad(p, 400, "messages[%d]: content part type '%.40s' (text and image_url are served)", k,
                           ty->valuestring);
            }
            if (strcmp(ty->valuestring, "text")) {
                if (strcmp(role, "user")) { sv_free(&t); return bad(p, 400, "messages[%d]: images only in user messages", k); }
                if (!*marker) { sv_free(&t); return bad(p, 400, "this model takes no images"); }
                if (image_ref(p, e, "an image_url part")) { sv_free(&t); return 1; }
                sv_printf(&t, "%s\n", marker);
            }
        }
        cJSON_ArrayForEach(e, c) {
            const cJSON *ty = cJSON_GetObjectItemCaseSensitive(e, "type"), *tx = cJSON_GetObjectItemCaseSensitive(e, "text");
            if (strcmp(ty->valuestring, "text")) continue;
            if (!cJSON_IsString(tx)) { sv_free(&t); return bad(p, 400, "messages[%d]: a text part without 'text'", k); }
            sv_puts(&t, tx->valuestring);
        }
    } else if (!cJSON_IsNull(c)) return bad(p, 400, "messages[%d]: 'content' is a string or a list of parts", k);
    if (t.oom) { sv_free(&t); return bad(p, 500, "out of memory"); }
    *out = t.p ? t.p : strdup("");
    return *out ? 0 : bad(p, 500, "out of memory");
}

static int num_field(parse *p, const cJSON *root, const char *key, double lo, double hi, double *v) {
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!e || cJSON_IsNull(e)) return 0;
    if (!cJSON_IsNumber(e) || !(e->valuedouble >= lo && e->valuedouble <= hi))
        return bad(p, 400, "'%s' must be a number in [%g, %g]", key, lo, hi);
    *v = e->valuedouble;
    return 0;
}

static int parse_chat(parse *p, const cJSON *root) {
    sv_job *j = p->j;
    const cJSON *ms = cJSON_GetObjectItemCaseSensitive(root, "messages");
    int n = cJSON_IsArray(ms) ? cJSON_GetArraySize(ms) : 0;
    if (n < 1 || n > 1024) return bad(p, 400, "'messages' must be a list of 1 to 1024 messages");
    if (!(j->msgs = calloc((size_t)n, sizeof *j->msgs))) return bad(p, 500, "out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, ms) {
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(e, "role");
        if (!cJSON_IsString(r) || (strcmp(r->valuestring, "system") && strcmp(r->valuestring, "user") &&
                                   strcmp(r->valuestring, "assistant") && strcmp(r->valuestring, "developer")))
            return bad(p, 400, "messages[%d]: 'role' is system, user or assistant", j->n_msgs);
        char *role = strdup(strcmp(r->valuestring, "developer") ? r->valuestring : "system"), *text = NULL;
        if (!role) return bad(p, 500, "out of memory");
        j->msgs[j->n_msgs].role = role; /* content: NULL until parsed, then owned */
        if (parse_content(p, cJSON_GetObjectItemCaseSensitive(e, "content"), role, j->n_msgs, &text)) {
            j->n_msgs++;
            return 1;
        }
        j->msgs[j->n_msgs++].content = text;
    }
    double v = -1;
    if (num_field(p, root, "max_tokens", 0, 1e9, &v) || num_field(p, root, "max_completion_tokens", 0, 1e9, &v)) return 1;
    j->max_tokens = v < 0 || v > (double)p->sv->cfg.max_tokens ? p->sv->cfg.max_tokens : (int64_t)v;
    double temp = 1, top_p = 1, top_k = 0, seed = -1, nn = 1, pen = 0;
    if (num_field(p, root, "temperature", 0, 2, &temp) || num_field(p, root, "top_p", 0, 1, &top_p) ||
        num_field(p, root, "top_k", 0, 1e9, &top_k) || num_field(p, root, "seed", -9.2e18, 9.2e18, &seed) ||
        num_field(p, root, "n", 1, 1, &nn))
        return 1;
    if (num_field(p, root, "presence_penalty", -2, 2, &pen) || pen != 0 ||
        num_field(p, root, "frequency_penalty", -2, 2, &pen) || pen != 0)
        return p->http ? 1 : bad(p, 400, "presence_penalty and frequency_penalty are not served (0 only)");
    const cJSON *lp = cJSON_GetObjectItemCaseSensitive(root, "logprobs");
    if (cJSON_IsTrue(lp)) return bad(p, 400, "logprobs are not served");
    j->smp = mmb_sampler_default();
    j->smp.temperature = (float)temp;
    j->smp.top_p = (float)top_p;
    j->smp.top_k = (int)top_k;
    j->smp.seed = seed >= 0 ? (uint64_t)seed : (uint64_t)time(NULL) ^ (uint64_t)(uintptr_t)j;
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(root, "stop");
    if (st && !cJSON_IsNull(st)) {
        int ns = cJSON_IsString(st) ? 1 : cJSON_IsArray(st) ? cJSON_GetArraySize(st) : -1;
        if (ns < 0 || ns > 8) return bad(p, 400, "'stop' is a string or a list of at most 8");
        if (!(j->stops = calloc((size_t)ns + 1, sizeof *j->stops))) return bad(p, 500, "out of memory");
        for (int i = 0; i < ns; i++) {
            const cJSON *s = cJSON_IsString(st) ? st : cJSON_GetArrayItem(st, i);
            if (!cJSON_IsString(s) || !*s->valuestring || strlen(s->valuestring) > 256)
                return bad(p, 400, "'stop': each entry is a non-empty string of at most 256 bytes");
            if (!(j->stops[j->n_stops++] = strdup(s->valuestring))) return bad(p, 500, "out of memory");
        }
    }
    j->stream = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "stream"));
    j->ignore_eos = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "ignore_eos")); /* llama.cpp's server's */
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    j->usage_in_stream = j->stream && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage"));
    return 0;
}

sv_job *sv_job_parse(const sv_server *sv, sv_kind kind, const char *body, size_t n, int want_raw, int *http,
                     sv_buf *err) {
    sv_job *j = calloc(1, sizeof *j);
    parse p = {.sv = sv, .j = j};
    if (!j) {
        *http = 500;
        sv_error_json(err, 500, "out of memory");
        return NULL;
    }
    j->kind = kind;
    j->refs = 1;
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    static unsigned long seq;
    snprintf(j->id, sizeof j->id, "chatcmpl-%lx%lx", (unsigned long)time(NULL), __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED));
    cJSON *root = cJSON_ParseWithLength(body, n);
    if (!root || !cJSON_IsObject(root)) bad(&p, 400, "the body is not a JSON object");
    else if (kind == SV_EMBED) parse_embed(&p, root, want_raw);
    else parse_chat(&p, root);
    cJSON_Delete(root);
    if (!p.http && !sv->info.has_vision && j->n_urls) bad(&p, 400, "this model has no vision path");
    if (!p.http && kind == SV_CHAT && !sv->info.has_lm) bad(&p, 400, "this model has no language model (embeddings only)");
    if (p.http) {
        *http = p.http;
        sv_error_json(err, p.http, p.msg);
        sv_job_unref(j);
        return NULL;
    }
    return j;
}

void sv_job_unref(sv_job *j) {
    if (!j) return;
    pthread_mutex_lock(&j->mu);
    int left = --j->refs;
    pthread_mutex_unlock(&j->mu);
    if (left) return;
    for (int i = 0; i < j->n_urls; i++) free(j->urls[i]);
    free(j->urls);
    for (int i = 0; i < j->n_msgs; i++) {
        free((char *)j->msgs[i].role);
        free((char *)j->msgs[i].content);
    }
    free(j->msgs);
    for (int i = 0; i < j->n_stops; i++) free(j->stops[i]);
    free(j->stops);
    sv_free(&j->out);
    sv_free(&j->err);
    pthread_cond_destroy(&j->cv);
    pthread_mutex_destroy(&j->mu);
    free(j);
}

/* ---- running ------------------------------------------------------------------------------------ */

/* Ends the job with an error (before or after it started: a started stream gets it as an event). */
static void done_hook(sv_job *j) {
    void (*f)(void *) = j->on_done;
    j->on_done = NULL;
    if (f) f(j->on_done_user);
}

static void fail(sv_job *j, int http, const char *msg) {
    done_hook(j);
    pthread_mutex_lock(&j->mu);
    if (j->state == SV_STARTED && j->stream) {
        sv_buf e = {0};
        sv_error_json(&e, http, msg);
        sv_printf(&j->out, "data: %s\n\ndata: [DONE]\n\n", e.p ? e.p : "{}");
        sv_free(&e);
    } else {
        j->http = http;
        sv_error_json(&j->err, http, msg);
    }
    j->state = SV_DONE;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

static void finish(sv_job *j) {
    done_hook(j);
    pthread_mutex_lock(&j->mu);
    if (j->out.oom) {
        j->http = 500;
        sv_error_json(&j->err, 500, "out of memory writing the response");
    }
    j->state = SV_DONE;
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

static int http_of(mmb_status s) {
    return s == MMB_ERR_NOMEM ? 503 : s == MMB_ERR_IO ? 500 : 400;
}

/* A file the request names: only under --allow-path, resolved without symlinks escaping it, a regular file of at
 * most max bytes. Returns 0 with *bytes (malloc'd), or the HTTP status with msg. */
static int read_path(const sv_config *c, const char *url, unsigned char **bytes, size_t *n, char *msg, size_t cap) {
    const char *path = !strncmp(url, "file://", 7) ? url + 7 : url;
    if (!c->allow_dir) return snprintf(msg, cap, "file paths are not served (start the server with --allow-path DIR)"), 403;
    char joined[4096], real[4096];
    if (snprintf(joined, sizeof joined, path[0] == '/' ? "%s" : "%s/%s", path[0] == '/' ? path : c->allow_dir, path) >=
        (int)sizeof joined)
        return snprintf(msg, cap, "the path is too long"), 400;
    if (!realpath(joined, real)) return snprintf(msg, cap, "%.200s: %s", path, strerror(errno)), errno == ENOENT ? 404 : 403;
    size_t dl = strlen(c->allow_dir);
    if (strncmp(real, c->allow_dir, dl) || (real[dl] != '/' && real[dl] != 0))
        return snprintf(msg, cap, "%.200s is outside the folder the server may read", path), 403;
    int fd = open(real, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) || !S_ISREG(st.st_mode)) {
        if (fd >= 0) close(fd);
        return snprintf(msg, cap, "%.200s: not a readable regular file", path), 400;
    }
    if (st.st_size > c->max_body) {
        close(fd);
        return snprintf(msg, cap, "%.200s: %lld bytes, above the limit of %lld", path, (long long)st.st_size,
                        (long long)c->max_body), 413;
    }
    unsigned char *b = malloc((size_t)st.st_size + 1);
    size_t got = 0;
    while (b && got < (size_t)st.st_size) {
        ssize_t r = read(fd, b + got, (size_t)st.st_size - got);
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    if (!b || got != (size_t)st.st_size) {
        free(b);
        return snprintf(msg, cap, "%.200s: cannot read it", path), 500;
    }
    *bytes = b;
    *n = got;
    return 0;
}

/* Decodes the job's images into imgs (n_urls of them). Returns 0, or fails the job and returns 1. */
static int load_images(const sv_server *sv, mmb_ctx *ctx, sv_job *j, mmb_image *imgs) {
    for (int i = 0; i < j->n_urls; i++) {
        const char *u = j->urls[i];
        unsigned char *bytes = NULL;
        size_t n = 0;
        char msg[600], name[32];
        int http = 0;
        snprintf(name, sizeof name, "image %d", i);
        if (!strncmp(u, "data:", 5)) {
            const char *comma = strchr(u, ',');
            if (!comma || comma - u < 12 || strncmp(comma - 7, ";base64", 7))
                http = 400, snprintf(msg, sizeof msg, "image %d: a data URL must be data:<type>;base64,<data>", i);
            else {
                int r = sv_b64_decode(comma + 1, strlen(comma + 1), &bytes, &n);
                if (r) http = r == -2 ? 503 : 400, snprintf(msg, sizeof msg, "image %d: %s", i, r == -2 ? "out of memory"
                                                            : "the data URL's base64 is malformed");
            }
        } else if (!strncmp(u, "http://", 7) || !strncmp(u, "https://", 8))
            http = 400, snprintf(msg, sizeof msg, "image %d: remote URLs are not fetched; send a data URL", i);
        else if ((http = read_path(&sv->cfg, u, &bytes, &n, msg, sizeof msg)) == 0) {
        }
        mmb_status s = MMB_OK;
        if (!http && (s = mmb_image_decode(ctx, bytes, n, name, sv->cfg.max_pixels, &imgs[i])) != MMB_OK)
            http = http_of(s), snprintf(msg, sizeof msg, "%s", mmb_ctx_error(ctx));
        free(bytes);
        if (http) {
            for (int k = 0; k < i; k++) mmb_image_free(&imgs[k]);
            fail(j, http, msg);
            return 1;
        }
    }
    return 0;
}

static void run_embed(const sv_server *sv, mmb_ctx *ctx, sv_job *j, mmb_image *imgs) {
    int n = j->n_urls;
    const mmb_mllm_info *in = &sv->info;
    int64_t *tok = calloc((size_t)n, sizeof *tok);
    float *emb = NULL, *hid[MMB_MAX_TAPS] = {0};
    int64_t rows = tok ? mmb_mllm_encode_size(ctx, sv->m, imgs, n, tok) : -1;
    mmb_encode_out o = {.tokens = tok, .n_taps = j->n_taps};
    size_t per = j->n_taps ? (size_t)n * (size_t)in->vision_tokens * (size_t)in->vision_width : 0;
    mmb_status s = !tok ? MMB_ERR_NOMEM : rows < 0 ? MMB_ERR_ARG : MMB_OK;
    if (s == MMB_OK && j->n_taps && in->vision_tokens <= 0) {
        free(tok);
        fail(j, 400, "this model's hidden states are not exposed ('layers' needs a tower with a fixed token count)");
        return;
    }
    if (s == MMB_OK && !j->n_taps) {
        o.embeddings_count = (size_t)rows * (size_t)in->out_width;
        if (!(emb = o.embeddings = malloc(sizeof(float) * (o.embeddings_count ? o.embeddings_count : 1)))) s = MMB_ERR_NOMEM;
    }
    for (int t = 0; s == MMB_OK && t < j->n_taps; t++) {
        o.taps[t] = j->taps[t];
        o.hidden_count = per;
        if (!(hid[t] = o.hidden[t] = malloc(sizeof(float) * (per ? per : 1)))) s = MMB_ERR_NOMEM;
    }
    if (s == MMB_OK) s = mmb_mllm_encode(ctx, sv->m, imgs, n, &o);
    if (s != MMB_OK) {
        fail(j, http_of(s), s == MMB_ERR_NOMEM && !*mmb_ctx_error(ctx) ? "out of memory" : mmb_ctx_error(ctx));
    } else {
        /* the entries: image-major, then layer; each [tokens, width] */
        int ne = j->n_taps ? n * j->n_taps : n;
        int64_t width = j->n_taps ? in->vision_width : in->out_width;
        int uniform = 1;
        for (int i = 1; i < n; i++) uniform &= tok[i] == tok[0];
        sv_buf *b = &j->out;
        if (j->raw) {
            if (j->n_taps)
                snprintf(j->shape_hdr, sizeof j->shape_hdr, "%d,%d,%lld,%lld", n, j->n_taps, (long long)in->vision_tokens,
                         (long long)width);
            else if (uniform)
                snprintf(j->shape_hdr, sizeof j->shape_hdr, "%d,%lld,%lld", n, (long long)tok[0], (long long)width);
            else {
                snprintf(j->shape_hdr, sizeof j->shape_hdr, "%lld,%lld", (long long)rows, (long long)width);
                size_t at = 0;
                for (int i = 0; i < n && at < sizeof j->rows_hdr; i++)
                    at += (size_t)snprintf(j->rows_hdr + at, sizeof j->rows_hdr - at, "%s%lld", i ? "," : "", (long long)tok[i]);
            }
        } else {
            sv_puts(b, "{\"object\":\"list\",\"model\":");
            sv_json_str(b, sv->cfg.name, strlen(sv->cfg.name));
            sv_puts(b, ",\"data\":[");
        }
        int64_t off = 0;
        for (int e = 0; e < ne; e++) {
            int i = j->n_taps ? e / j->n_taps : e;
            int64_t t = j->n_taps ? in->vision_tokens : tok[i];
            const float *src = j->n_taps ? hid[e % j->n_taps] + (size_t)i * (size_t)(t * width) : emb + (size_t)(off * width);
            if (!j->n_taps) off += t;
            if (j->raw) {
                sv_put(b, src, sizeof(float) * (size_t)(t * width));
                continue;
            }
            sv_printf(b, "%s{\"object\":\"embedding\",\"index\":%d,\"image\":%d,", e ? "," : "", e, i);
            if (j->n_taps) sv_printf(b, "\"layer\":%d,", j->taps[e % j->n_taps]);
            sv_printf(b, "\"shape\":[%lld,%lld],\"embedding\":", (long long)t, (long long)width);
            if (j->b64) {
                sv_puts(b, "\"");
                sv_b64_encode(b, src, sizeof(float) * (size_t)(t * width));
                sv_puts(b, "\"");
            } else sv_json_floats(b, src, (size_t)(t * width));
            sv_puts(b, "}");
        }
        if (!j->raw)
            sv_printf(b, "],\"usage\":{\"prompt_tokens\":%lld,\"total_tokens\":%lld}}", (long long)rows, (long long)rows);
        finish(j);
    }
    free(emb);
    for (int t = 0; t < MMB_MAX_TAPS; t++) free(hid[t]);
    free(tok);
}

/* What the token callback of a chat keeps: the text so far, how much of it went out, the stop strings. */
typedef struct chat_run {
    const sv_server *sv;
    sv_job *j;
    sv_buf text;
    size_t emitted;
    int stopped;
} chat_run;

static void sse(chat_run *c, const char *delta, size_t dn, const char *finish_reason) {
    sv_job *j = c->j;
    sv_buf *b = &j->out;
    pthread_mutex_lock(&j->mu);
    sv_printf(b, "data: {\"id\":\"%s\",\"object\":\"chat.completion.chunk\",\"created\":%lld,\"model\":", j->id,
              (long long)time(NULL));
    sv_json_str(b, c->sv->cfg.name, strlen(c->sv->cfg.name));
    sv_puts(b, ",\"choices\":[{\"index\":0,\"delta\":{");
    if (!finish_reason) {
        sv_puts(b, "\"content\":");
        sv_json_str(b, delta, dn);
    }
    sv_printf(b, "},\"finish_reason\":%s%s%s}]}\n\n", finish_reason ? "\"" : "", finish_reason ? finish_reason : "null",
              finish_reason ? "\"" : "");
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
}

static void emit(chat_run *c, size_t upto) {
    if (upto <= c->emitted) return;
    if (c->j->stream) sse(c, c->text.p + c->emitted, upto - c->emitted, NULL);
    c->emitted = upto;
}

/* Each piece: the text grows; a stop string ends it there (the stop string itself is not returned, as OpenAI
 * does); otherwise all of it goes out but a tail that may be the start of a stop string. */
static int on_piece(void *user, int32_t id, const char *piece, size_t len) {
    (void)id;
    chat_run *c = user;
    sv_job *j = c->j;
    size_t before = c->text.n;
    sv_put(&c->text, piece, len);
    if (c->text.oom) return 1;
    size_t hold = 0;
    for (int s = 0; s < j->n_stops; s++) {
        size_t sl = strlen(j->stops[s]);
        size_t from = before > c->emitted + sl ? before - sl : c->emitted;
        for (size_t k = from; k + sl <= c->text.n; k++)
            if (!memcmp(c->text.p + k, j->stops[s], sl)) {
                c->text.n = k;
                c->text.p[k] = 0;
                emit(c, k);
                c->stopped = 1;
                return 1;
            }
        for (size_t h = sl - 1; h > hold; h--)
            if (h <= c->text.n - c->emitted && !memcmp(c->text.p + c->text.n - h, j->stops[s], h)) { hold = h; break; }
    }
    emit(c, c->text.n - hold);
    return 0;
}

static const char *finish_name(mmb_stop s, int stopped) {
    if (stopped) return "stop";
    return s == MMB_STOP_LENGTH || s == MMB_STOP_CONTEXT ? "length" : "stop";
}

static void run_chat(const sv_server *sv, mmb_ctx *ctx, sv_job *j, mmb_image *imgs) {
    mmb_chunks *prompt = NULL;
    mmb_kv_cache *kv = NULL;
    mmb_status s = mmb_mllm_tokenize_chat(ctx, sv->m, j->msgs, j->n_msgs, imgs, j->n_urls, &prompt);
    if (s != MMB_OK) {
        fail(j, http_of(s), mmb_ctx_error(ctx));
        return;
    }
    int64_t pos = mmb_chunks_positions(prompt), room = sv->info.context - pos;
    if (room < 1) {
        char msg[200];
        snprintf(msg, sizeof msg, "the prompt takes %lld positions; the model's context is %lld", (long long)pos,
                 (long long)sv->info.context);
        mmb_chunks_free(prompt);
        fail(j, 400, msg);
        return;
    }
    int64_t n_predict = j->max_tokens < room ? j->max_tokens : room;
    if ((s = mmb_mllm_kv_new(ctx, sv->m, pos + n_predict, &kv)) != MMB_OK) {
        mmb_chunks_free(prompt);
        fail(j, http_of(s), mmb_ctx_error(ctx));
        return;
    }
    chat_run c = {.sv = sv, .j = j};
    pthread_mutex_lock(&j->mu);
    j->state = SV_STARTED;
    if (j->stream) {
        sv_printf(&j->out, "data: {\"id\":\"%s\",\"object\":\"chat.completion.chunk\",\"created\":%lld,\"model\":", j->id,
                  (long long)time(NULL));
        sv_json_str(&j->out, sv->cfg.name, strlen(sv->cfg.name));
        sv_puts(&j->out, ",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
                         "\"finish_reason\":null}]}\n\n");
    }
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    mmb_gen_params gp = mmb_gen_default_params();
    gp.n_predict = n_predict;
    gp.sampler = j->smp;
    gp.ignore_eos = j->ignore_eos;
    gp.on_token = on_piece;
    gp.user = &c;
    gp.abort = &j->abort;
    mmb_gen_result res = {0};
    s = mmb_mllm_generate(ctx, sv->m, kv, prompt, &gp, &res);
    mmb_kv_cache_free(kv);
    mmb_chunks_free(prompt);
    if (s != MMB_OK || c.text.oom) {
        sv_free(&c.text);
        fail(j, s == MMB_OK ? 503 : http_of(s), s == MMB_OK ? "out of memory" : mmb_ctx_error(ctx));
        return;
    }
    if (!c.stopped) emit(&c, c.text.n);
    const char *fr = finish_name(res.stop, c.stopped);
    if (j->stream) {
        sse(&c, NULL, 0, fr);
        pthread_mutex_lock(&j->mu);
        if (j->usage_in_stream) {
            sv_printf(&j->out, "data: {\"id\":\"%s\",\"object\":\"chat.completion.chunk\",\"created\":%lld,\"model\":",
                      j->id, (long long)time(NULL));
            sv_json_str(&j->out, sv->cfg.name, strlen(sv->cfg.name));
            sv_printf(&j->out, ",\"choices\":[],\"usage\":{\"prompt_tokens\":%lld,\"completion_tokens\":%lld,"
                      "\"total_tokens\":%lld}}\n\n", (long long)res.n_prompt, (long long)res.n_generated,
                      (long long)(res.n_prompt + res.n_generated));
        }
        sv_puts(&j->out, "data: [DONE]\n\n");
        pthread_mutex_unlock(&j->mu);
    } else {
        sv_buf *b = &j->out;
        sv_printf(b, "{\"id\":\"%s\",\"object\":\"chat.completion\",\"created\":%lld,\"model\":", j->id, (long long)time(NULL));
        sv_json_str(b, sv->cfg.name, strlen(sv->cfg.name));
        sv_puts(b, ",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
        sv_json_str(b, c.text.p ? c.text.p : "", c.text.n);
        sv_printf(b, "},\"finish_reason\":\"%s\"}],\"usage\":{\"prompt_tokens\":%lld,\"completion_tokens\":%lld,"
                  "\"total_tokens\":%lld}}", fr, (long long)res.n_prompt, (long long)res.n_generated,
                  (long long)(res.n_prompt + res.n_generated));
    }
    sv_free(&c.text);
    finish(j);
}

void sv_job_run(const sv_server *sv, mmb_ctx *ctx, sv_job *j) {
    if (__atomic_load_n(&j->abort, __ATOMIC_RELAXED)) { /* the client left while it waited */
        fail(j, 499, "the client closed the connection");
        return;
    }
    mmb_image *imgs = calloc((size_t)(j->n_urls ? j->n_urls : 1), sizeof *imgs);
    if (!imgs) {
        fail(j, 503, "out of memory");
        return;
    }
    if (!load_images(sv, ctx, j, imgs)) {
        if (j->kind == SV_EMBED) run_embed(sv, ctx, j, imgs);
        else run_chat(sv, ctx, j, imgs);
        for (int i = 0; i < j->n_urls; i++) mmb_image_free(&imgs[i]);
    }
    free(imgs);
}

/* ---- the model's description ---------------------------------------------------------------------- */

void sv_models_json(const sv_server *sv, sv_buf *b) {
    sv_puts(b, "{\"object\":\"list\",\"data\":[{\"id\":");
    sv_json_str(b, sv->cfg.name, strlen(sv->cfg.name));
    sv_printf(b, ",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"mmbridge\"}]}", (long long)sv->created);
}

void sv_info_json(const sv_server *sv, sv_buf *b) {
    const mmb_mllm_info *i = &sv->info;
#define STR(k, v) (sv_puts(b, ",\"" k "\":"), sv_json_str(b, (v) ? (v) : "", strlen((v) ? (v) : "")))
#define NUM(k, v) sv_printf(b, ",\"" k "\":%lld", (long long)(v))
    sv_puts(b, "{\"name\":");
    sv_json_str(b, sv->cfg.name, strlen(sv->cfg.name));
    STR("family", i->family);
    STR("architecture", i->architecture);
    STR("fusion", mmb_fusion_name(i->fusion));
    STR("processor", i->processor);
    STR("image_marker", i->image_marker);
    NUM("has_vision", i->has_vision); NUM("has_connector", i->has_connector); NUM("has_lm", i->has_lm);
    NUM("has_tokenizer", i->has_tokenizer); NUM("has_chat_template", i->has_chat_template);
    NUM("vision_layers", i->vision_layers); NUM("vision_width", i->vision_width);
    NUM("vision_tokens", i->vision_tokens); NUM("out_width", i->out_width);
    NUM("tokens_per_image", i->tokens_per_image); NUM("image_size", i->image_size);
    NUM("image_token", i->image_token); NUM("context", i->context);
    sv_printf(b, ",\"version\":\"%s\"}", mmb_version());
#undef STR
#undef NUM
}
