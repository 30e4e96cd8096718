/* Memory promises of the forward pass (issue 6, item 5), on checkpoints written here:
 *
 *  - peak RSS: loading a CLIP-like LLaVA (577 tokens, 4 blocks of width 512, mlp2x_gelu; about 57 MB of
 *    f32 weights) and encoding one image raises the process's peak RSS (VmHWM, reset through
 *    /proc/self/clear_refs) by at most the checkpoint's bytes + 1.25 x the planned activations. The
 *    planned activations are what the library reserves from the shapes before computing: ctx's arena
 *    (the largest of the tower's and the connector's reservations) plus ctx's feature buffer (the tapped
 *    hidden states). Packing the weights must not leave their mapped pages resident too: the weights
 *    counted twice exceed this bound by tens of MB.
 *  - no allocation inside a warm forward: malloc, calloc, realloc, aligned_alloc, posix_memalign and
 *    memalign are interposed here and counted around the second mmb_model_encode on the same context,
 *    at 1 and 2 threads, for LLaVA, the Dense Connector's STI and DCI, and (with --alloc DIR H W ...)
 *    any checkpoint directory, e.g. the families tests/oracle/test_memory.py builds.
 *
 * ASan replaces malloc and inflates RSS: under a sanitizer build this only prints "skipped". */
#include "internal.h"
#include "mmbridge.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif

#ifndef SANITIZED
#include "check.h"

/* The interposers: glibc's documented allocator entry points underneath (no dlsym, which itself
 * allocates), and a counter switched on around the forward (atomic: the pool's workers count too). */
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static atomic_int counting;
static atomic_long n_allocs;

static void count(void) {
    if (atomic_load_explicit(&counting, memory_order_relaxed)) atomic_fetch_add(&n_allocs, 1);
}
void *malloc(size_t n) { count(); return __libc_malloc(n); }
void *calloc(size_t k, size_t n) { count(); return __libc_calloc(k, n); }
void *realloc(void *p, size_t n) { count(); return __libc_realloc(p, n); }
void *aligned_alloc(size_t a, size_t n) { count(); return __libc_memalign(a, n); }
void *memalign(size_t a, size_t n) { count(); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    count();
    if (a < sizeof(void *) || (a & (a - 1))) return EINVAL;
    void *p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}

/* ---- checkpoints -------------------------------------------------------------------------------- */

typedef struct {
    int width, layers, heads, inter, image, patch, text;
} shape;

static uint64_t rng = 0x9e3779b97f4a7c15u;
static float uniform(float scale) {  /* xorshift64*: fast, deterministic */
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return scale * ((float)((rng * 0x2545F4914F6CDD1Du) >> 40) / 16777216.0f * 2.0f - 1.0f);
}

/* Appends tensor `name` of dims (up to 4) filled with uniform(scale) + offset. */
static void add(mmb_tensor *t, int *n, const char *name, int nd, const int64_t *dims, float scale, float offset) {
    int64_t numel = 1;
    for (int i = 0; i < nd; i++) numel *= dims[i];
    float *d = malloc(sizeof(float) * (size_t)numel);
    for (int64_t i = 0; i < numel; i++) d[i] = uniform(scale) + offset;
    mmb_tensor *x = &t[(*n)++];
    *x = (mmb_tensor){.name = strdup(name), .dtype = MMB_F32, .ndim = nd, .data = d};
    memcpy(x->shape, dims, sizeof(int64_t) * (size_t)nd);
}

/* A transformers-5 LLaVA (vision_tower.*, multi_modal_projector.*) with a CLIP tower of shape s, and
 * when dci_dir is set an original-layout Dense Connector DCI projector there (model.mm_projector.*,
 * reading 3 hidden states) for that tower. Written by a child process, so that the test process's
 * heap never held the weights. */
static void write_llava(const char *dir, const char *dci_dir, const shape *s) {
    pid_t pid = fork();
    if (pid == 0) {
        mkdir(dir, 0755);
        char path[512], cfg[1024];
        snprintf(path, sizeof path, "%s/config.json", dir);
        snprintf(cfg, sizeof cfg,
                 "{\"architectures\":[\"LlavaForConditionalGeneration\"],\"model_type\":\"llava\","
                 "\"projector_hidden_act\":\"gelu\",\"vision_feature_layer\":-2,"
                 "\"vision_feature_select_strategy\":\"default\",\"vision_config\":{\"model_type\":"
                 "\"clip_vision_model\",\"hidden_size\":%d,\"intermediate_size\":%d,\"num_hidden_layers\":%d,"
                 "\"num_attention_heads\":%d,\"image_size\":%d,\"patch_size\":%d,\"hidden_act\":\"quick_gelu\"},"
                 "\"text_config\":{\"model_type\":\"llama\",\"hidden_size\":%d}}",
                 s->width, s->inter, s->layers, s->heads, s->image, s->patch, s->text);
        FILE *f = fopen(path, "w");
        if (!f) _exit(1);
        fputs(cfg, f);
        fclose(f);
        int64_t D = s->width, I = s->inter, g = s->image / s->patch, T = g * g + 1, Tx = s->text;
        int n = 0, cap = 16 + 16 * s->layers;
        mmb_tensor *t = calloc((size_t)cap, sizeof *t);
        char nm[160];
        float wd = 0.5f / 16.0f;  /* keeps activations moderate through random layers */
        add(t, &n, "vision_tower.embeddings.class_embedding", 1, &D, 0.1f, 0.0f);
        add(t, &n, "vision_tower.embeddings.patch_embedding.weight", 4, (int64_t[]){D, 3, s->patch, s->patch}, wd, 0);
        add(t, &n, "vision_tower.embeddings.position_embedding.weight", 2, (int64_t[]){T, D}, 0.1f, 0.0f);
        add(t, &n, "vision_tower.pre_layrnorm.weight", 1, &D, 0.2f, 1.0f);
        add(t, &n, "vision_tower.pre_layrnorm.bias", 1, &D, 0.1f, 0.0f);
        add(t, &n, "vision_tower.post_layernorm.weight", 1, &D, 0.2f, 1.0f);
        add(t, &n, "vision_tower.post_layernorm.bias", 1, &D, 0.1f, 0.0f);
        static const char *const lin[6] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
        for (int l = 0; l < s->layers; l++) {
            for (int k = 0; k < 6; k++) {
                int64_t o = k == 4 ? I : D, in = k == 5 ? I : D;
                snprintf(nm, sizeof nm, "vision_tower.encoder.layers.%d.%s.weight", l, lin[k]);
                add(t, &n, nm, 2, (int64_t[]){o, in}, wd, 0.0f);
                snprintf(nm, sizeof nm, "vision_tower.encoder.layers.%d.%s.bias", l, lin[k]);
                add(t, &n, nm, 1, &o, 0.05f, 0.0f);
            }
            for (int k = 1; k <= 2; k++) {
                snprintf(nm, sizeof nm, "vision_tower.encoder.layers.%d.layer_norm%d.weight", l, k);
                add(t, &n, nm, 1, &D, 0.2f, 1.0f);
                snprintf(nm, sizeof nm, "vision_tower.encoder.layers.%d.layer_norm%d.bias", l, k);
                add(t, &n, nm, 1, &D, 0.1f, 0.0f);
            }
        }
        add(t, &n, "multi_modal_projector.linear_1.weight", 2, (int64_t[]){Tx, D}, wd, 0.0f);
        add(t, &n, "multi_modal_projector.linear_1.bias", 1, &Tx, 0.05f, 0.0f);
        add(t, &n, "multi_modal_projector.linear_2.weight", 2, (int64_t[]){Tx, Tx}, wd, 0.0f);
        add(t, &n, "multi_modal_projector.linear_2.bias", 1, &Tx, 0.05f, 0.0f);
        mmb_ctx *ctx = NULL;
        mmb_ctx_params cp = mmb_ctx_default_params();
        cp.n_threads = 1;
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        int ok = mmb_ctx_new(&cp, &ctx) == MMB_OK && mmb_st_write(ctx, path, t, n) == MMB_OK;
        if (ok && dci_dir) {
            mkdir(dci_dir, 0755);
            snprintf(path, sizeof path, "%s/config.json", dci_dir);
            snprintf(cfg, sizeof cfg, "{\"architectures\":[\"LlavaLlamaForCausalLM\"],\"model_type\":\"llava\","
                     "\"hidden_size\":%d,\"mm_hidden_size\":%d,\"mm_projector_type\":\"mlp2x_gelu\","
                     "\"mm_vision_select_layer\":-2,\"mm_vision_select_feature\":\"patch\","
                     "\"mm_dense_connector_type\":\"dci\"}", s->text, 3 * s->width);
            ok = (f = fopen(path, "w")) != NULL;
            if (ok) { fputs(cfg, f); fclose(f); }
            n = 0;
            add(t, &n, "model.mm_projector.0.weight", 2, (int64_t[]){Tx, 3 * D}, wd, 0.0f);
            add(t, &n, "model.mm_projector.0.bias", 1, &Tx, 0.05f, 0.0f);
            add(t, &n, "model.mm_projector.2.weight", 2, (int64_t[]){Tx, Tx}, wd, 0.0f);
            add(t, &n, "model.mm_projector.2.bias", 1, &Tx, 0.05f, 0.0f);
            snprintf(path, sizeof path, "%s/model.safetensors", dci_dir);
            ok = ok && mmb_st_write(ctx, path, t, n) == MMB_OK;
        }
        _exit(ok ? 0 : 1);
    }
    int st = 0;
    CHECK(pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0, "write %s", dir);
}

static void remove_llava(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/config.json", dir);
    unlink(path);
    rmdir(dir);
}

/* ---- measurements ---------------------------------------------------------------------------------- */

/* A field of /proc/self/status in bytes ("VmRSS", "VmHWM"), or -1. */
static long long status_bytes(const char *key) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long long kb = -1;
    size_t n = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, n) == 0 && line[n] == ':') kb = atoll(line + n + 1);
    if (f) fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

/* Resets VmHWM to the current RSS (Linux >= 4.0). Returns false where that is not possible. */
static bool reset_peak(void) {
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (!f) return false;
    bool ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok;
}

static float *pixels_for(int64_t batch, int h, int w) {
    size_t n = (size_t)(batch * 3 * h * w);
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) p[i] = uniform(1.0f);
    return p;
}

/* Encodes twice with ctx (n_threads) and returns the allocations of the second call, or -1 on failure. */
static long allocs_of_warm_encode(mmb_ctx *ctx, const mmb_model *m, int h, int w) {
    int64_t t = mmb_model_encode_tokens(ctx, m, h, w);
    mmb_model_info info;
    mmb_model_get_info(m, &info);
    if (t < 1) return -1;
    size_t n = (size_t)(2 * t) * (size_t)info.out_width;
    float *px = pixels_for(2, h, w), *out = malloc(n * sizeof(float));
    long got = -1;
    atomic_store(&n_allocs, 0);
    atomic_store(&counting, 1);
    mmb_status cold = mmb_model_encode(ctx, m, px, 2, h, w, out, n);
    atomic_store(&counting, 0);
    /* The first call reserves the activations: seen here, the library's allocations are counted. */
    CHECK(cold != MMB_OK || atomic_load(&n_allocs) > 0, "a cold encode counted no allocation");
    if (cold == MMB_OK) {
        atomic_store(&n_allocs, 0);
        atomic_store(&counting, 1);
        mmb_status s = mmb_model_encode(ctx, m, px, 2, h, w, out, n);
        atomic_store(&counting, 0);
        got = s == MMB_OK ? atomic_load(&n_allocs) : -1;
    }
    if (got < 0) fprintf(stderr, "encode: %s\n", mmb_ctx_error(ctx));
    free(px);
    free(out);
    return got;
}

/* Opens dir at 1 and 2 threads (optionally with the vision tower of `tower` attached and a Dense Connector
 * set) and checks that a warm encode allocates nothing. */
static void check_no_alloc(const char *dir, const char *tower, int h, int w, const mmb_dense_params *dense,
                           const char *what) {
    for (int nth = 1; nth <= 2; nth++) {
        mmb_ctx *ctx = NULL;
        mmb_model *m = NULL;
        mmb_ctx_params cp = mmb_ctx_default_params();
        cp.n_threads = nth;
        CHECK(mmb_ctx_new(&cp, &ctx) == MMB_OK, "ctx");
        CHECK(mmb_model_open(ctx, dir, &m) == MMB_OK, "open %s: %s", dir, mmb_ctx_error(ctx));
        if (m && dense) CHECK(mmb_model_set_dense(ctx, m, dense) == MMB_OK, "%s: %s", what, mmb_ctx_error(ctx));
        mmb_vit *v = NULL;
        if (m && tower) {
            CHECK(mmb_vit_open(ctx, tower, &v) == MMB_OK, "tower %s: %s", tower, mmb_ctx_error(ctx));
            CHECK(v && mmb_model_attach_vit(ctx, m, v) == MMB_OK, "attach: %s", mmb_ctx_error(ctx));
        }
        long a = m ? allocs_of_warm_encode(ctx, m, h, w) : -1;
        printf("  %-28s %d thread(s): %ld allocations in a warm mmb_model_encode\n", what, nth, a);
        CHECK(a == 0, "%s at %d threads: %ld allocations in the forward", what, nth, a);
        mmb_model_free(m);
        mmb_ctx_free(ctx);
    }
}

/* Peak RSS of load + one encode against the bound. */
static void check_peak_rss(const char *dir) {
    char path[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct stat st;
    CHECK(stat(path, &st) == 0, "stat %s", path);
    long long weights = (long long)st.st_size;
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    CHECK(mmb_ctx_new(&cp, &ctx) == MMB_OK, "ctx");
    const int S = 336;
    float *px = pixels_for(1, S, S);
    size_t cap = (size_t)1 << 22;  /* the output, touched before the baseline as the caller's own memory */
    float *out = malloc(cap * sizeof(float));
    memset(out, 0, cap * sizeof(float));
    if (!reset_peak()) {
        printf("  peak RSS: skipped (/proc/self/clear_refs cannot reset VmHWM here)\n");
        free(px); free(out); mmb_ctx_free(ctx);
        return;
    }
    long long base = status_bytes("VmRSS");
    mmb_model *m = NULL;
    CHECK(mmb_model_open(ctx, dir, &m) == MMB_OK, "open: %s", mmb_ctx_error(ctx));
    long long loaded = status_bytes("VmRSS");
    int64_t t = m ? mmb_model_encode_tokens(ctx, m, S, S) : -1;
    mmb_model_info info;
    if (m) mmb_model_get_info(m, &info);
    CHECK(m && t > 0 && (size_t)t * (size_t)info.out_width <= cap, "tokens %lld", (long long)t);
    if (!m || t <= 0) { free(px); free(out); mmb_ctx_free(ctx); return; }
    CHECK(mmb_model_encode(ctx, m, px, 1, S, S, out, cap) == MMB_OK, "encode: %s", mmb_ctx_error(ctx));
    long long peak = status_bytes("VmHWM");
    long long planned = (long long)(ctx->arena.cap + ctx->feats.cap);
    long long bound = base + weights + planned * 5 / 4;
    printf("  peak RSS: baseline %.1f MB, after load +%.1f MB, peak +%.1f MB; bound +%.1f MB = weights %.1f MB "
           "+ 1.25 x planned activations %.1f MB (arena %.1f + features %.1f)\n",
           base / 1e6, (loaded - base) / 1e6, (peak - base) / 1e6, (bound - base) / 1e6, weights / 1e6,
           planned / 1e6, ctx->arena.cap / 1e6, ctx->feats.cap / 1e6);
    CHECK(base > 0 && peak > 0, "VmRSS / VmHWM readable");
    CHECK(peak <= bound, "peak RSS %lld > bound %lld (baseline %lld + weights %lld + 1.25 x %lld)", peak, bound, base,
          weights, planned);
    /* The loaded model holds its weights once: within a few pages per tensor of the file's size. */
    CHECK(loaded - base <= weights + weights / 20, "after load +%lld bytes for %lld bytes of weights", loaded - base,
          weights);
    mmb_model_free(m);
    mmb_ctx_free(ctx);
    free(px);
    free(out);
}

/* --alloc DIR H W [DIR H W ...]: the no-allocation check on given checkpoints (a family's own encode). */
static int alloc_dirs(int argc, char **argv) {
    for (int i = 2; i + 2 < argc; i += 3)
        check_no_alloc(argv[i], NULL, atoi(argv[i + 1]), atoi(argv[i + 2]), NULL, argv[i]);
    CHECK(argc >= 5 && (argc - 2) % 3 == 0, "usage: test_memory --alloc DIR H W [DIR H W ...]");
    return DONE("memory");
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--alloc") == 0) return alloc_dirs(argc, argv);
    const char *big = "test_memory_big", *small = "test_memory_small", *dci = "test_memory_dci";
    /* CLIP-like: 577 tokens of width 512, 4 blocks, + mlp2x_gelu to 1024 */
    const shape sb = {.width = 512, .layers = 4, .heads = 8, .inter = 2048, .image = 336, .patch = 14, .text = 1024};
    /* tiny, for the Dense Connector's DCI (the original layout, its tower attached) */
    const shape ss = {.width = 64, .layers = 4, .heads = 4, .inter = 128, .image = 56, .patch = 14, .text = 96};
    write_llava(big, NULL, &sb);
    write_llava(small, dci, &ss);
    if (n_fail) return DONE("memory");
    check_peak_rss(big);
    check_no_alloc(big, NULL, 336, 336, NULL, "llava mlp2x_gelu");
    mmb_dense_params sti = {.type = MMB_DENSE_STI, .n_layers = 1, .layers = {1}};
    check_no_alloc(big, NULL, 336, 336, &sti, "llava + dense STI");
    check_no_alloc(dci, small, 56, 56, NULL, "llava-original + dense DCI");
    remove_llava(big);
    remove_llava(small);
    remove_llava(dci);
    return DONE("memory");
}
#else
int main(void) {
    printf("test_memory: skipped (sanitizer build: ASan replaces malloc and inflates RSS; run the Release build)\n");
    return 0;
}
#endif
