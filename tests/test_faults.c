/* Allocation-failure fault injection (issue 20): along the open and encode path of a tiny LLaVA (mmb_mllm_open,
 * mmb_mllm_encode of one image, mmb_mllm_tokenize + a 2-token mmb_mllm_generate), the k-th allocation fails, for every
 * k from 1 to the path's count. Each run must return a status with a message, no crash, and no leak (the ASan
 * build's LeakSanitizer checks at exit); a run that returns MMB_OK despite the failure must give outputs bit for bit
 * the clean run's (the library then got around it). The allocations are the library's malloc, calloc, realloc and
 * strdup calls, redirected here with the linker's --wrap (tests/CMakeLists: this test only), and cJSON's through
 * cJSON_InitHooks; what libpng, libjpeg or the C library allocate inside themselves, and mmap'd pages, are not
 * counted. */
#include "mllm_fixture.h"

#include <cjson/cJSON.h>
#include <execinfo.h>

void *__real_malloc(size_t n);
void *__real_calloc(size_t a, size_t b);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t a, size_t b);
void *__wrap_realloc(void *p, size_t n);
char *__wrap_strdup(const char *s);

static long g_count, g_fail_at; /* allocations counted while armed; the one to fail (0: none) */
static int g_armed, g_failed;
static const char *g_phase, *g_failed_in; /* the call in progress; the one the failure hit */

static int fail_now(void) {
    if (!g_armed) return 0;
    if (++g_count == g_fail_at) {
        g_failed = 1;
        g_failed_in = g_phase;
        if (getenv("MMB_FAULT_TRACE")) { /* where the k-th allocation is, for a failure to be found */
            void *bt[16];
            backtrace_symbols_fd(bt, backtrace(bt, 16), 2);
        }
        return 1;
    }
    return 0;
}

void *__wrap_malloc(size_t n) { return fail_now() ? NULL : __real_malloc(n); }
void *__wrap_calloc(size_t a, size_t b) { return fail_now() ? NULL : __real_calloc(a, b); }
void *__wrap_realloc(void *p, size_t n) { return fail_now() ? NULL : __real_realloc(p, n); }
char *__wrap_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = __wrap_malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

typedef struct result {
    mmb_status s;
    float emb[4 * 32];
    int32_t gen[2];
    int n_gen;
} result;

static int on_token(void *user, int32_t id, const char *piece, size_t len) {
    result *r = user;
    (void)piece;
    (void)len;
    if (r->n_gen < 2) r->gen[r->n_gen++] = id;
    return 0;
}

/* The path, armed: open, encode, tokenize, generate, free. */
static void run_path(mmb_ctx *ctx, const mmb_image *img, result *r) {
    memset(r, 0, sizeof *r);
    mmb_mllm *m = NULL;
    mmb_chunks *c = NULL;
    mmb_kv_cache *kv = NULL;
    g_armed = 1;
    g_phase = "open";
    mmb_status s = mmb_mllm_open(ctx, "mllm_llava", NULL, &m);
    g_phase = "encode";
    mmb_encode_out o = {.embeddings = r->emb, .embeddings_count = sizeof r->emb / sizeof r->emb[0]};
    if (s == MMB_OK) s = mmb_mllm_encode(ctx, m, img, 1, &o);
    g_phase = "tokenize";
    if (s == MMB_OK) s = mmb_mllm_tokenize(ctx, m, "Describe <image> now.", img, 1, MMB_TOKENIZE_CHAT, &c);
    g_phase = "generate";
    if (s == MMB_OK) s = mmb_mllm_kv_new(ctx, m, 0, &kv);
    mmb_gen_params gp = mmb_gen_default_params();
    gp.n_predict = 2;
    gp.ignore_eos = 1;
    gp.on_token = on_token;
    gp.user = r;
    if (s == MMB_OK) s = mmb_mllm_generate(ctx, m, kv, c, &gp, NULL);
    g_phase = "free";
    mmb_kv_cache_free(kv);
    mmb_chunks_free(c);
    mmb_mllm_free(m);
    g_armed = 0;
    r->s = s;
}

int main(void) {
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    mmb_ctx *ctx = NULL;
    CHECK(mmb_ctx_new(&cp, &ctx) == MMB_OK, "context");
    write_models(ctx);
    cJSON_Hooks hooks = {__wrap_malloc, free};
    cJSON_InitHooks(&hooks);
    mmb_image img = test_image(7);
    static result clean, r;
    g_fail_at = 0;
    g_count = 0;
    run_path(ctx, &img, &clean);
    CHECK(clean.s == MMB_OK && clean.n_gen == 2, "the clean run: %s", mmb_ctx_error(ctx));
    const long total = g_count;
    int counts[16] = {0}, ok_after_failure = 0;
    for (long k = 1; k <= total; k++) {
        g_fail_at = k;
        g_count = 0;
        g_failed = 0;
        run_path(ctx, &img, &r);
        CHECK(g_failed, "allocation %ld of %ld was not reached (the path changed between runs)", k, total);
        if (r.s == MMB_OK) { /* got around it: the outputs must be the clean run's */
            ok_after_failure++;
            CHECK(memcmp(r.emb, clean.emb, sizeof r.emb) == 0 && r.n_gen == 2 && r.gen[0] == clean.gen[0] &&
                  r.gen[1] == clean.gen[1], "allocation %ld failed, MMB_OK returned, but the outputs differ (in %s)", k, g_failed_in);
        } else {
            CHECK(mmb_ctx_error(ctx)[0] != 0, "allocation %ld failed: status %d without a message", k, (int)r.s);
            CHECK(r.s == MMB_ERR_NOMEM || r.s == MMB_ERR_FORMAT || r.s == MMB_ERR_IO,
                  "allocation %ld failed: status %s (%s)", k, mmb_status_str(r.s), mmb_ctx_error(ctx));
        }
        counts[r.s >= 0 && r.s < 16 ? r.s : 15]++;
    }
    printf("fault injection: %ld allocations on the path, each failed once: %d MMB_ERR_NOMEM, %d MMB_ERR_FORMAT "
           "(cJSON's parse failing for memory), %d MMB_ERR_IO, %d MMB_OK with the clean outputs\n", total,
           counts[MMB_ERR_NOMEM], counts[MMB_ERR_FORMAT], counts[MMB_ERR_IO], ok_after_failure);
    cJSON_InitHooks(NULL);
    mmb_image_free(&img);
    mmb_ctx_free(ctx);
    return DONE("test_faults");
}
