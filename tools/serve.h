/* mmbridge serve: the HTTP server's shared declarations. tools/serve_util.c holds the text builder, base64 and the
 * JSON writers (built into every CLI: `tokenize --decode-batch` writes its JSON with them too); tools/serve_api.c
 * the endpoints' work (requests parsed into jobs, jobs run on a slot's context, results written as JSON or raw
 * f32); tools/cmd_serve.c the HTTP side on libmicrohttpd, the queue and the slots; tools/serve_page.c the page. */
#ifndef MMB_SERVE_H
#define MMB_SERVE_H

#include "mmbridge.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

/* ---- tools/serve_util.c ------------------------------------------------------------------------ */

/* A growing byte string; after an allocation failure `oom` is set and further appends do nothing. */
typedef struct sv_buf {
    char *p;
    size_t n, cap;
    int oom;
} sv_buf;

void sv_put(sv_buf *b, const void *s, size_t n);
void sv_puts(sv_buf *b, const char *s);
void sv_printf(sv_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sv_free(sv_buf *b);
/* s[0, n) as a JSON string literal, quotes included (control characters escaped; the bytes are UTF-8). */
void sv_json_str(sv_buf *b, const char *s, size_t n);
/* A finite f32 as at most 16 bytes of JSON number, 9 significant digits, that read back as the same f32; returns the
 * bytes written (no NUL). */
int sv_fmt_f32(char *p, float f);
/* x[0, n) as a JSON array of numbers that read back as the same f32 (sv_fmt_f32; non-finite values as null). */
void sv_json_floats(sv_buf *b, const float *x, size_t n);
/* base64 (RFC 4648, padded) of p[0, n). */
void sv_b64_encode(sv_buf *b, const void *p, size_t n);
/* Decodes base64 s[0, n) (padding optional, no whitespace) into *out (malloc'd), *len bytes. Returns 0, or -1 for
 * a character outside the alphabet or a bad length (*out untouched), -2 out of memory. */
int sv_b64_decode(const char *s, size_t n, unsigned char **out, size_t *len);
/* Whether a and b (NUL-terminated) are equal, in time that depends on their lengths only. */
int sv_secret_eq(const char *a, const char *b);

/* ---- tools/serve_api.c ---------------------------------------------------------------------- */

typedef struct sv_config {
    const char *host;          /* the address bound (127.0.0.1 unless told otherwise) */
    int port;
    int slots;                 /* requests computed at once, each on its own context */
    int threads;               /* compute threads in all; each slot gets threads / slots (at least 1) */
    int queue;                 /* requests waiting beyond the idle slots at most; more get 503 */
    int64_t max_body;          /* bytes of a request body */
    int64_t max_pixels;        /* pixels of one decoded image */
    int64_t max_tokens;        /* tokens one chat request generates at most (a request asking more gets this) */
    int max_images;            /* images in one request */
    const char *api_key;       /* NULL: none; else "Authorization: Bearer KEY" on every route but / and /health */
    char *allow_dir;           /* realpath of the folder file paths may name, NULL: no paths */
    const char *name;          /* the model's name in responses */
} sv_config;

/* What a finished or failed job hands back to the HTTP side. */
typedef enum sv_kind { SV_EMBED = 0, SV_CHAT = 1 } sv_kind;

typedef struct sv_job sv_job;

/* The server state the endpoints read. */
typedef struct sv_server {
    sv_config cfg;
    mmb_mllm *m;
    mmb_mllm_info info;
    int64_t created;           /* unix time the server started: the models list's "created" */
} sv_server;

/* A job: parsed from a request's JSON on the connection's thread, run on a slot, its output read by the connection.
 * Shared by the two threads under `mu`: `state`, `out`, `status` and `err` change only under it. */
typedef enum sv_state { SV_QUEUED = 0, SV_STARTED = 1, SV_DONE = 2 } sv_state;

struct sv_job {
    sv_kind kind;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;                  /* the connection and the queue/slot; freed at 0 */
    sv_state state;
    int abort;                 /* raised (atomically) when the client went away or the server stops */
    int http;                  /* the HTTP status of a failure (0: none yet) */
    sv_buf err;                /* its JSON error body */
    sv_buf out;                /* SV_CHAT with stream: server-sent events as they come; otherwise the body */
    sv_job *next;              /* the queue */
    void (*on_done)(void *);   /* called once, just before the job is marked done (the slot frees itself first, so
                                  a client that sends its next request at once finds the slot idle) */
    void *on_done_user;
    /* the request */
    char **urls;               /* image references: data URLs or paths */
    int n_urls;
    /* SV_EMBED */
    int taps[MMB_MAX_TAPS], n_taps;
    int raw;                   /* little-endian f32 body, shape in headers */
    int b64;                   /* encoding_format "base64" */
    char shape_hdr[512], rows_hdr[1024];
    /* SV_CHAT */
    mmb_chat_msg *msgs;
    int n_msgs;
    int stream, usage_in_stream, ignore_eos;
    int64_t max_tokens;
    mmb_sampler smp;
    char **stops;
    int n_stops;
    char id[40];
};

/* Parses a POST body into a new job (refs 1) of `kind`, or fills `err` with a JSON error and returns NULL with
 * *http its status (400, 413, 500). */
sv_job *sv_job_parse(const sv_server *sv, sv_kind kind, const char *body, size_t n, int want_raw, int *http,
                     sv_buf *err);
/* Drops a reference; the last one frees the job. */
void sv_job_unref(sv_job *j);
/* Runs the job on ctx (a slot's). Under j->mu sets state SV_STARTED once the inputs are checked (a chat's stream
 * then begins), and SV_DONE at the end with j->out holding the body (or j->http / j->err a failure). */
void sv_job_run(const sv_server *sv, mmb_ctx *ctx, sv_job *j);
/* A JSON error body as OpenAI writes one: {"error": {"message", "type", "code"}}. */
void sv_error_json(sv_buf *b, int http, const char *msg);
/* GET /health's, /v1/models' and /info's bodies. */
void sv_models_json(const sv_server *sv, sv_buf *b);
void sv_info_json(const sv_server *sv, sv_buf *b);

/* ---- tools/serve_page.c ------------------------------------------------------------------------ */

extern const char sv_page_html[];

#endif
