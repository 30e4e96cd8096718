/* mmbridge serve: an HTTP server on libmicrohttpd (docs/decisions.md "The HTTP server") for one model opened once:
 * POST /v1/embeddings, POST /v1/chat/completions (OpenAI's shapes, streamed as server-sent events), GET /health,
 * /v1/models, /info, and a web page at /. A connection has its own thread (libmicrohttpd's); it parses the request
 * and puts a job on a bounded queue, which `--parallel` slots take in order, each with its own context (its own
 * threads and scratch) over the one shared model. SIGTERM or SIGINT stops it cleanly: no new requests, the queued
 * ones refused with 503, the running ones aborted between two steps, every thread joined, everything freed. */
#include "cli.h"
#include "serve.h"

#include <arpa/inet.h>
#include <limits.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct slot {
    struct server *h;
    mmb_ctx *ctx;
    pthread_t t;
    int started;
} slot;

typedef struct server {
    sv_server sv;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    sv_job *head, *tail;
    int queued, busy, stopping;
    int inflight;              /* requests begun and not completed: a stop waits for them (bounded) */
    int64_t served;
    slot *slots;
    sv_job **running;          /* per slot, for the abort at shutdown */
} server;

/* A connection's request: the body as it arrives, then its job. */
typedef struct req {
    sv_buf body;
    int too_big;
    double t0;
    sv_job *job;
} req;

/* ---- the queue and the slots ---------------------------------------------------------------------- */

static int enqueue(server *h, sv_job *j, const char **why) {
    pthread_mutex_lock(&h->mu);
    int r = 0;
    if (h->stopping) *why = "the server is shutting down", r = 1;
    else if (h->queued >= h->sv.cfg.queue + h->sv.cfg.slots - h->busy) *why = "the queue is full; retry later", r = 1;
    else {
        pthread_mutex_lock(&j->mu);
        j->refs++;
        pthread_mutex_unlock(&j->mu);
        j->next = NULL;
        if (h->tail) h->tail->next = j;
        else h->head = j;
        h->tail = j;
        h->queued++;
        pthread_cond_signal(&h->cv);
    }
    pthread_mutex_unlock(&h->mu);
    return r;
}

/* A slot's job is done: the slot is idle from now on (before the client hears of it). */
static void slot_free(void *arg) {
    slot *s = arg;
    pthread_mutex_lock(&s->h->mu);
    s->h->busy--;
    s->h->served++;
    pthread_mutex_unlock(&s->h->mu);
}

static void *slot_main(void *arg) {
    slot *s = arg;
    server *h = s->h;
    int k = (int)(s - h->slots);
    for (;;) {
        pthread_mutex_lock(&h->mu);
        while (!h->head && !h->stopping) pthread_cond_wait(&h->cv, &h->mu);
        sv_job *j = h->head;
        if (!j) {
            pthread_mutex_unlock(&h->mu);
            break;
        }
        if (!(h->head = j->next)) h->tail = NULL;
        h->queued--;
        h->busy++;
        h->running[k] = j;
        j->on_done = slot_free;
        j->on_done_user = s;
        pthread_mutex_unlock(&h->mu);
        sv_job_run(&h->sv, s->ctx, j);
        pthread_mutex_lock(&h->mu);
        h->running[k] = NULL;
        pthread_mutex_unlock(&h->mu);
        sv_job_unref(j);
    }
    return NULL;
}

static void wait_state(sv_job *j, sv_state st) {
    pthread_mutex_lock(&j->mu);
    while (j->state < st) pthread_cond_wait(&j->cv, &j->mu);
    pthread_mutex_unlock(&j->mu);
}

/* ---- responses ---------------------------------------------------------------------------------- */

static enum MHD_Result send_body(struct MHD_Connection *c, int http, const char *type, char *body, size_t n, int own) {
    struct MHD_Response *r = MHD_create_response_from_buffer(n, body, own ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_MUST_COPY);
    if (!r) {
        if (own) free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)http, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result send_error(struct MHD_Connection *c, int http, const char *msg) {
    sv_buf b = {0};
    sv_error_json(&b, http, msg);
    if (b.oom) return MHD_NO;
    return send_body(c, http, "application/json", b.p, b.n, 1);
}

static enum MHD_Result send_buf(struct MHD_Connection *c, int http, const char *type, sv_buf *b) {
    if (b->oom) {
        sv_free(b);
        return send_error(c, 500, "out of memory");
    }
    char *p = b->p ? b->p : calloc(1, 1);
    size_t n = b->n;
    *b = (sv_buf){0};
    return p ? send_body(c, http, type, p, n, 1) : MHD_NO;
}

/* A stream's body: the job's events as the slot writes them; the reader waits for more until the job is done. */
static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    sv_job *j = cls;
    pthread_mutex_lock(&j->mu);
    while ((size_t)pos >= j->out.n && j->state != SV_DONE) pthread_cond_wait(&j->cv, &j->mu);
    ssize_t k;
    if ((size_t)pos >= j->out.n) k = MHD_CONTENT_READER_END_OF_STREAM;
    else {
        size_t n = j->out.n - (size_t)pos < max ? j->out.n - (size_t)pos : max;
        memcpy(buf, j->out.p + pos, n);
        k = (ssize_t)n;
    }
    pthread_mutex_unlock(&j->mu);
    return k;
}

static void stream_free(void *cls) { sv_job_unref(cls); }

static enum MHD_Result send_job(server *h, struct MHD_Connection *c, sv_job *j) {
    (void)h;
    wait_state(j, j->kind == SV_CHAT && j->stream ? SV_STARTED : SV_DONE);
    if (j->http) {
        pthread_mutex_lock(&j->mu);
        sv_buf e = j->err;
        j->err = (sv_buf){0};
        int http = j->http;
        pthread_mutex_unlock(&j->mu);
        return send_buf(c, http, "application/json", &e);
    }
    if (j->kind == SV_CHAT && j->stream) {
        pthread_mutex_lock(&j->mu);
        j->refs++;
        pthread_mutex_unlock(&j->mu);
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, j, stream_free);
        if (!r) {
            sv_job_unref(j);
            return MHD_NO;
        }
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        enum MHD_Result ok = MHD_queue_response(c, 200, r);
        MHD_destroy_response(r);
        return ok;
    }
    if (!j->raw) return send_buf(c, 200, "application/json", &j->out);
    struct MHD_Response *r = MHD_create_response_from_buffer(j->out.n, j->out.p, MHD_RESPMEM_MUST_FREE);
    if (!r) return MHD_NO;
    j->out = (sv_buf){0};
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
    MHD_add_response_header(r, "X-Mmb-Dtype", "float32-le");
    MHD_add_response_header(r, "X-Mmb-Shape", j->shape_hdr);
    if (*j->rows_hdr) MHD_add_response_header(r, "X-Mmb-Rows", j->rows_hdr);
    enum MHD_Result ok = MHD_queue_response(c, 200, r);
    MHD_destroy_response(r);
    return ok;
}

/* ---- routing ------------------------------------------------------------------------------------- */

static int authorized(const server *h, struct MHD_Connection *c) {
    if (!h->sv.cfg.api_key) return 1;
    const char *a = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    return a && !strncmp(a, "Bearer ", 7) && sv_secret_eq(a + 7, h->sv.cfg.api_key);
}

static enum MHD_Result route(server *h, struct MHD_Connection *c, const char *url, const char *method, req *r) {
    int get = !strcmp(method, "GET") || !strcmp(method, "HEAD"), post = !strcmp(method, "POST");
    if (!strcmp(url, "/") || !strcmp(url, "/index.html")) {
        if (!get) return send_error(c, 405, "GET only");
        return send_body(c, 200, "text/html; charset=utf-8", (char *)sv_page_html, strlen(sv_page_html), 0);
    }
    if (!strcmp(url, "/health")) {
        if (!get) return send_error(c, 405, "GET only");
        sv_buf b = {0};
        pthread_mutex_lock(&h->mu);
        sv_printf(&b, "{\"status\":\"ok\",\"slots\":%d,\"slots_busy\":%d,\"queued\":%d,\"served\":%lld}", h->sv.cfg.slots,
                  h->busy, h->queued, (long long)h->served);
        pthread_mutex_unlock(&h->mu);
        return send_buf(c, 200, "application/json", &b);
    }
    int models = !strcmp(url, "/v1/models") || !strcmp(url, "/models"), info = !strcmp(url, "/info") || !strcmp(url, "/v1/info");
    int emb = !strcmp(url, "/v1/embeddings") || !strcmp(url, "/embeddings");
    int chat = !strcmp(url, "/v1/chat/completions") || !strcmp(url, "/chat/completions");
    if (!models && !info && !emb && !chat) return send_error(c, 404, "no such route");
    if (!authorized(h, c)) return send_error(c, 401, "a valid API key is needed: Authorization: Bearer KEY");
    if (models || info) {
        if (!get) return send_error(c, 405, "GET only");
        sv_buf b = {0};
        if (models) sv_models_json(&h->sv, &b);
        else sv_info_json(&h->sv, &b);
        return send_buf(c, 200, "application/json", &b);
    }
    if (!post) return send_error(c, 405, "POST only");
    if (r->too_big) {
        char msg[128];
        snprintf(msg, sizeof msg, "the body is above the limit of %lld bytes (--max-body)", (long long)h->sv.cfg.max_body);
        return send_error(c, 413, msg);
    }
    const char *acc = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_ACCEPT);
    int http = 0;
    sv_buf err = {0};
    sv_job *j = sv_job_parse(&h->sv, emb ? SV_EMBED : SV_CHAT, r->body.p ? r->body.p : "", r->body.n,
                             acc && strstr(acc, "application/octet-stream"), &http, &err);
    sv_free(&r->body);
    if (!j) return send_buf(c, http, "application/json", &err);
    r->job = j;
    const char *why = NULL;
    if (enqueue(h, j, &why)) return send_error(c, 503, why);
    return send_job(h, c, j);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    (void)version;
    server *h = cls;
    req *r = *con_cls;
    if (!r) {
        if (!(r = calloc(1, sizeof *r))) return MHD_NO;
        r->t0 = cli_now();
        *con_cls = r;
        pthread_mutex_lock(&h->mu);
        h->inflight++;
        pthread_mutex_unlock(&h->mu);
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoll(cl, NULL, 10) > h->sv.cfg.max_body) r->too_big = 1;
        return MHD_YES;
    }
    if (*upload_size) {
        if (!r->too_big && r->body.n + *upload_size > (size_t)h->sv.cfg.max_body) {
            r->too_big = 1;
            sv_free(&r->body);
        }
        if (!r->too_big) sv_put(&r->body, upload, *upload_size);
        *upload_size = 0;
        return MHD_YES;
    }
    if (r->body.oom) return send_error(c, 503, "out of memory for the body");
    return route(h, c, url, method, r);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode code) {
    (void)c;
    server *h = cls;
    req *r = *con_cls;
    if (!r) return;
    pthread_mutex_lock(&h->mu);
    h->inflight--;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    if (r->job) {
        if (code != MHD_REQUEST_TERMINATED_COMPLETED_OK) __atomic_store_n(&r->job->abort, 1, __ATOMIC_RELAXED);
        sv_job_unref(r->job);
    }
    sv_free(&r->body);
    free(r);
    *con_cls = NULL;
}

/* ---- the command --------------------------------------------------------------------------------- */

static int read_key_file(const char *path, char *key, size_t cap) {
    FILE *f = fopen(path, "r");
    if (!f || !fgets(key, (int)cap, f)) {
        if (f) fclose(f);
        fprintf(stderr, "mmbridge: error: --api-key-file %s: cannot read a line\n", path);
        return 1;
    }
    fclose(f);
    key[strcspn(key, "\r\n")] = 0;
    if (!*key) {
        fprintf(stderr, "mmbridge: error: --api-key-file %s: the key is empty\n", path);
        return 1;
    }
    return 0;
}

int cmd_serve(int argc, char **argv) {
    const char *model = NULL, *tower = NULL, *adapter = NULL, *host = "127.0.0.1", *key = NULL, *key_file = NULL;
    const char *allow = NULL, *name = NULL;
    int64_t port = 8080, parallel = 1, queue = 64, max_body = 32 << 20, max_pixels = 4096 * 4096, max_tokens = 1024;
    int64_t max_images = 16, conns = 64, timeout = 60;
    cli_ctx_opts co = {0};
    const cli_opt opts[] = {
        {.name = "--host", .meta = "ADDR", .type = CLI_STR, .dst = &host, .help = "address to bind (default 127.0.0.1)"},
        {.name = "--port", .meta = "N", .type = CLI_INT, .dst = &port, .lo = 0, .hi = 65535,
         .help = "port (default 8080; 0: a free one, printed at start)"},
        {.name = "--parallel", .meta = "N", .type = CLI_INT, .dst = &parallel, .lo = 1, .hi = 256,
         .help = "requests computed at once (slots), each with --threads / N threads (default 1)"},
        {.name = "--queue", .meta = "N", .type = CLI_INT, .dst = &queue, .lo = 0, .hi = 1 << 20,
         .help = "requests waiting for a busy slot at most; more are refused with 503 (default 64)"},
        {.name = "--max-body", .meta = "BYTES", .type = CLI_INT, .dst = &max_body, .lo = 1024, .hi = (double)INT64_MAX / 2,
         .help = "largest request body, and largest image file read (default 32 MiB); above: 413"},
        {.name = "--max-pixels", .meta = "N", .type = CLI_INT, .dst = &max_pixels, .lo = 1, .hi = 178956970,
         .help = "pixels of one image at most, checked before decoding (default 4096 x 4096)"},
        {.name = "--max-tokens", .meta = "N", .type = CLI_INT, .dst = &max_tokens, .lo = 1, .hi = 1 << 24,
         .help = "tokens one chat request generates at most (default 1024; a request asking more gets this)"},
        {.name = "--max-images", .meta = "N", .type = CLI_INT, .dst = &max_images, .lo = 1, .hi = 1024,
         .help = "images in one request at most (default 16)"},
        {.name = "--connections", .meta = "N", .type = CLI_INT, .dst = &conns, .lo = 1, .hi = 4096,
         .help = "open connections at most (default 64)"},
        {.name = "--timeout", .meta = "S", .type = CLI_INT, .dst = &timeout, .lo = 1, .hi = 86400,
         .help = "seconds an idle connection is kept (default 60)"},
        {.name = "--api-key", .meta = "KEY", .type = CLI_STR, .dst = &key,
         .help = "require Authorization: Bearer KEY on all but / and /health (also $MMB_API_KEY)"},
        {.name = "--api-key-file", .meta = "F", .type = CLI_STR, .dst = &key_file,
         .help = "read the key from F's first line (not shown by ps)"},
        {.name = "--allow-path", .meta = "DIR", .type = CLI_STR, .dst = &allow,
         .help = "let requests name image files under DIR (default: data URLs only)"},
        {.name = "--name", .meta = "NAME", .type = CLI_STR, .dst = &name, .help = "the model's name in responses (default: the directory's)"},
        {.name = "--tower", .meta = "DIR", .type = CLI_STR, .dst = &tower, .help = "the vision tower of an original-layout LLaVA"},
        {.name = "--adapter", .meta = "DIR", .type = CLI_STR, .dst = &adapter, .help = "a PEFT adaption-prompt adapter on the LLM"},
        CLI_OPTS_CTX(&co),
    };
    const cli_spec spec = {.cmd = "serve", .args = "MODEL",
                           .about = "Serves MODEL over HTTP: POST /v1/embeddings (images as data URLs or, with --allow-path,\n"
                                    "file paths: the connector's embeddings, or the hidden states of \"layers\", as JSON or\n"
                                    "raw f32), POST /v1/chat/completions (OpenAI's, with image_url parts; \"stream\": true\n"
                                    "for server-sent events), GET /health, /v1/models, /info, and a web page at /.\n",
                           .opts = opts, .n_opts = CLI_N(opts), .pos = &model, .min_pos = 1, .max_pos = 1};
    int pr = cli_parse(&spec, argc, argv);
    if (pr) return pr == 1 ? 0 : 2;
    char keybuf[512];
    if (key_file && read_key_file(key_file, keybuf, sizeof keybuf)) return 2;
    if (key_file) key = keybuf;
    if (!key && getenv("MMB_API_KEY") && *getenv("MMB_API_KEY")) key = getenv("MMB_API_KEY");
    struct sockaddr_storage ss = {0};
    struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
    int v6 = strchr(host, ':') != NULL;
    if (v6 ? inet_pton(AF_INET6, host, &a6->sin6_addr) != 1 : inet_pton(AF_INET, host, &a4->sin_addr) != 1) {
        fprintf(stderr, "mmbridge: error: --host '%s' is not an IPv4 or IPv6 address\n", host);
        return 2;
    }
    if (v6) a6->sin6_family = AF_INET6, a6->sin6_port = htons((uint16_t)port);
    else a4->sin_family = AF_INET, a4->sin_port = htons((uint16_t)port);
    server h = {0};
    char *allow_real = NULL;
    if (allow && !(allow_real = realpath(allow, NULL))) {
        fprintf(stderr, "mmbridge: error: --allow-path %s: no such folder\n", allow);
        return 2;
    }
    /* SIGTERM and SIGINT go to sigwait below: blocked before any thread starts, so every thread inherits it. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    const char *base = strrchr(model, '/');
    while (base && !base[1] && base > model) { /* "dir/": the name before the slash */
        const char *p = base - 1;
        while (p > model && *p != '/') p--;
        base = p;
    }
    char dirname[256];
    snprintf(dirname, sizeof dirname, "%s", base && *base == '/' ? base + 1 : model);
    dirname[strcspn(dirname, "/")] = 0;
    int per = (int)(co.threads ? co.threads : 0);
    cli_ctx_opts so = co;
    h.sv.cfg = (sv_config){.host = host, .port = (int)port, .slots = (int)parallel, .queue = (int)queue,
                           .max_body = max_body, .max_pixels = max_pixels, .max_tokens = max_tokens,
                           .max_images = (int)max_images, .api_key = key, .allow_dir = allow_real,
                           .name = name ? name : dirname};
    h.slots = calloc((size_t)parallel, sizeof *h.slots);
    h.running = calloc((size_t)parallel, sizeof *h.running);
    pthread_mutex_init(&h.mu, NULL);
    pthread_cond_init(&h.cv, NULL);
    int rc = h.slots && h.running ? 0 : cli_fail(NULL, "out of memory");
    for (int i = 0; !rc && i < parallel; i++) {
        if (!i) {
            mmb_ctx *probe = cli_ctx(&co);
            if (!probe) { rc = 1; break; }
            int total = mmb_ctx_threads(probe);
            mmb_ctx_free(probe);
            per = total / (int)parallel > 0 ? total / (int)parallel : 1;
            so.threads = per;
        }
        h.slots[i].h = &h;
        if (!(h.slots[i].ctx = cli_ctx(&so))) rc = 1;
    }
    if (!rc && cli_open(h.slots[0].ctx, model, tower, NULL, 0, adapter, &h.sv.m)) rc = 1;
    if (!rc) {
        mmb_mllm_get_info(h.sv.m, &h.sv.info);
        h.sv.created = (int64_t)time(NULL);
    }
    for (int i = 0; !rc && i < parallel; i++) {
        if (pthread_create(&h.slots[i].t, NULL, slot_main, &h.slots[i])) rc = cli_fail(NULL, "cannot start a slot's thread");
        else h.slots[i].started = 1;
    }
    struct MHD_Daemon *d = NULL;
    if (!rc) {
        unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG | MHD_USE_ITC |
                         (v6 ? MHD_USE_IPv6 : 0);
        d = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, on_request, &h, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                             MHD_OPTION_CONNECTION_LIMIT, (unsigned)conns, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)timeout,
                             MHD_OPTION_NOTIFY_COMPLETED, on_completed, &h, MHD_OPTION_END);
        if (!d) {
            fprintf(stderr, "mmbridge: error: cannot listen on %s:%lld (in use, or not an address of this machine)\n", host,
                    (long long)port);
            rc = 1;
        }
    }
    if (!rc) {
        const union MHD_DaemonInfo *di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
        fprintf(stderr, "mmbridge serve: listening on http://%s%s%s:%u/ (model %s, %s, %lld slot(s) x %d thread(s)%s)\n",
                v6 ? "[" : "", host, v6 ? "]" : "", di ? (unsigned)di->port : (unsigned)port, h.sv.cfg.name,
                h.sv.info.family, (long long)parallel, per, key ? ", API key required" : "");
        int sig = 0;
        sigwait(&sigs, &sig);
        fprintf(stderr, "mmbridge serve: %s: stopping\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    }
    /* stop: refuse what waits, abort what runs, join the slots, then the connections */
    pthread_mutex_lock(&h.mu);
    h.stopping = 1;
    while (h.head) {
        sv_job *j = h.head;
        h.head = j->next;
        h.queued--;
        pthread_mutex_lock(&j->mu);
        j->http = 503;
        sv_error_json(&j->err, 503, "the server is shutting down");
        j->state = SV_DONE;
        pthread_cond_broadcast(&j->cv);
        pthread_mutex_unlock(&j->mu);
        sv_job_unref(j);
    }
    h.tail = NULL;
    for (int i = 0; h.running && i < parallel; i++)
        if (h.running[i]) __atomic_store_n(&h.running[i]->abort, 1, __ATOMIC_RELAXED);
    pthread_cond_broadcast(&h.cv);
    pthread_mutex_unlock(&h.mu);
    for (int i = 0; h.slots && i < parallel; i++)
        if (h.slots[i].started) pthread_join(h.slots[i].t, NULL);
    if (d) { /* every job is done: let the connections send what they hold (10 s at most), then close them */
        MHD_socket ls = MHD_quiesce_daemon(d);
        if (ls != MHD_INVALID_SOCKET) close(ls);
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += 10;
        pthread_mutex_lock(&h.mu);
        while (h.inflight > 0 && pthread_cond_timedwait(&h.cv, &h.mu, &until) == 0) {
        }
        pthread_mutex_unlock(&h.mu);
        MHD_stop_daemon(d);
    }
    if (!rc) fprintf(stderr, "mmbridge serve: stopped after %lld request(s)\n", (long long)h.served);
    mmb_mllm_free(h.sv.m);
    for (int i = 0; h.slots && i < parallel; i++) mmb_ctx_free(h.slots[i].ctx);
    free(h.slots);
    free(h.running);
    free(allow_real);
    pthread_cond_destroy(&h.cv);
    pthread_mutex_destroy(&h.mu);
    return rc;
}
