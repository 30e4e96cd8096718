/* The decoder's pieces that the oracle tests cannot reach from the CLI: the storage-dtype products on every
 * instruction set, the type A/B hooks of the layer loop, the cache's overflow, and the sampler. */
#include "check.h"
#include "internal.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static uint64_t rng = 88172645463325252ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((double)(rng >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static void test_wmat(void) {
    const int64_t N = 45, K = 300, Ms[] = {1, 3, 5, 17};
    float *w32 = malloc(sizeof(float) * N * K), *x = malloc(sizeof(float) * 17 * K), bias[45];
    uint16_t *w16 = malloc(2 * N * K), *wb = malloc(2 * N * K);
    float *y = malloc(sizeof(float) * 17 * N), *ref = malloc(sizeof(float) * 17 * N), *y0 = malloc(sizeof(float) * 17 * N);
    for (int64_t i = 0; i < N * K; i++) {
        w32[i] = frand();
        w16[i] = mmb__f32_to_f16(w32[i]);
        wb[i] = mmb__f32_to_bf16(w32[i]);
    }
    for (int64_t i = 0; i < 17 * K; i++) x[i] = frand();
    for (int i = 0; i < N; i++) bias[i] = frand();
    const void *data[3] = {w32, w16, wb};
    const mmb_dtype dt[3] = {MMB_F32, MMB_F16, MMB_BF16};
    for (int isa = 0; isa <= 2; isa++) {
        mmb__cpu_force_isa(isa);
        size_t ns = 0;
        for (int mi = 0; mi < 4; mi++) if (mmb__wmat_scratch(Ms[mi], K) > ns) ns = mmb__wmat_scratch(Ms[mi], K);
        float *scr = aligned_alloc(64, (ns * sizeof(float) + 63) / 64 * 64);
        for (int t = 0; t < 3; t++)
            for (int mi = 0; mi < 4; mi++)
                for (int acc = 0; acc < 2; acc++) {
                    int64_t M = Ms[mi];
                    mmb_wmat w = {data[t], dt[t], N, K};
                    const float *b = acc ? NULL : bias;
                    mmb__wmat_ref(ref, x, M, &w, b);
                    for (int64_t i = 0; i < M * N; i++) y[i] = y0[i] = frand();
                    if (acc)
                        for (int64_t i = 0; i < M * N; i++) ref[i] += y0[i];
                    /* two parts, split inside a panel */
                    mmb__wmat_part(y, N, x, K, M, &w, b, 0, 13, acc, scr);
                    mmb__wmat_part(y + 13, N, x, K, M, &w, b, 13, N, acc, scr);
                    double e = 0;
                    for (int64_t i = 0; i < M * N; i++) e = fmax(e, fabs((double)y[i] - ref[i]));
                    CHECK(e < 1e-4, "isa %d dtype %d M %lld acc %d: max err %g", isa, t, (long long)M, acc, e);
                }
        free(scr);
    }
    mmb__cpu_force_isa(-1);
    free(w32); free(w16); free(wb); free(x); free(y); free(ref); free(y0);
}

/* dx = dy W in every storage dtype and instruction set, column ranges split inside a panel, against the
 * double-sum oracle; N past one K block (300 > 256) and M past one micro-panel. */
static void test_wmat_t(void) {
    const int64_t N = 300, K = 45, Ms[] = {1, 5, 17};
    float *w32 = malloc(sizeof(float) * N * K), *dy = malloc(sizeof(float) * 17 * N);
    uint16_t *w16 = malloc(2 * N * K), *wb = malloc(2 * N * K);
    float *dx = malloc(sizeof(float) * 17 * K), *ref = malloc(sizeof(float) * 17 * K), *x0 = malloc(sizeof(float) * 17 * K);
    for (int64_t i = 0; i < N * K; i++) {
        w32[i] = frand();
        w16[i] = mmb__f32_to_f16(w32[i]);
        wb[i] = mmb__f32_to_bf16(w32[i]);
    }
    for (int64_t i = 0; i < 17 * N; i++) dy[i] = frand();
    const void *data[3] = {w32, w16, wb};
    const mmb_dtype dt[3] = {MMB_F32, MMB_F16, MMB_BF16};
    for (int isa = 0; isa <= 2; isa++) {
        mmb__cpu_force_isa(isa);
        size_t ns = mmb__wmat_t_scratch(17, N);
        float *scr = aligned_alloc(64, (ns * sizeof(float) + 63) / 64 * 64);
        for (int t = 0; t < 3; t++)
            for (int mi = 0; mi < 3; mi++)
                for (int acc = 0; acc < 2; acc++) {
                    int64_t M = Ms[mi];
                    mmb_wmat w = {data[t], dt[t], N, K};
                    mmb__wmat_ref_t(ref, dy, M, &w);
                    for (int64_t i = 0; i < M * K; i++) dx[i] = x0[i] = frand();
                    if (acc)
                        for (int64_t i = 0; i < M * K; i++) ref[i] += x0[i];
                    mmb__wmat_part_t(dx, K, dy, N, M, &w, 0, 13, acc, scr);
                    mmb__wmat_part_t(dx + 13, K, dy, N, M, &w, 13, K, acc, scr);
                    double e = 0;
                    for (int64_t i = 0; i < M * K; i++) e = fmax(e, fabs((double)dx[i] - ref[i]));
                    CHECK(e < 1e-4, "transposed: isa %d dtype %d M %lld acc %d: max err %g", isa, t, (long long)M,
                          acc, e);
                }
        free(scr);
    }
    mmb__cpu_force_isa(-1);
    free(w32); free(w16); free(wb); free(dy); free(dx); free(ref); free(x0);
}

/* ---- a tiny random Llama checkpoint ---- */
enum { D = 32, FF = 48, L = 2, H = 4, KVH = 2, V = 50, HD = D / H };

static int write_ckpt(mmb_ctx *ctx, const char *dir) {
    mkdir(dir, 0755);
    char p[512];
    snprintf(p, sizeof p, "%s/config.json", dir);
    FILE *f = fopen(p, "w");
    if (!f) return 1;
    fprintf(f, "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", \"hidden_size\": %d, "
            "\"intermediate_size\": %d, \"num_hidden_layers\": %d, \"num_attention_heads\": %d, "
            "\"num_key_value_heads\": %d, \"vocab_size\": %d, \"max_position_embeddings\": 64, \"rms_norm_eps\": 1e-5}",
            D, FF, L, H, KVH, V);
    fclose(f);
    mmb_tensor t[3 + 9 * L];
    char names[3 + 9 * L][96];
    float *bufs[3 + 9 * L];
    int n = 0;
#define ADD(nm, r, c, base)                                                              \
    do {                                                                                 \
        snprintf(names[n], 96, "%s", nm);                                                \
        bufs[n] = malloc(sizeof(float) * (r) * (c));                                     \
        for (int i = 0; i < (r) * (c); i++) bufs[n][i] = (base) + 0.3f * frand();       \
        t[n] = (mmb_tensor){.name = names[n], .dtype = MMB_F32, .ndim = (c) > 1 ? 2 : 1, \
                            .shape = {(r), (c)}, .data = bufs[n]};                       \
        if ((c) == 1) t[n].shape[0] = (r);                                               \
        n++;                                                                             \
    } while (0)
    ADD("model.embed_tokens.weight", V, D, 0.0f);
    ADD("model.norm.weight", D, 1, 1.0f);
    ADD("lm_head.weight", V, D, 0.0f);
    char nm[96];
    for (int l = 0; l < L; l++) {
        const char *lin[7] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
        int rows[7] = {D, KVH * HD, KVH * HD, D, FF, FF, D}, cols[7] = {D, D, D, D, D, D, FF};
        for (int k = 0; k < 7; k++) {
            snprintf(nm, sizeof nm, "model.layers.%d.%s.weight", l, lin[k]);
            ADD(nm, rows[k], cols[k], 0.0f);
        }
        snprintf(nm, sizeof nm, "model.layers.%d.input_layernorm.weight", l);
        ADD(nm, D, 1, 1.0f);
        snprintf(nm, sizeof nm, "model.layers.%d.post_attention_layernorm.weight", l);
        ADD(nm, D, 1, 1.0f);
    }
#undef ADD
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    mmb_status s = mmb_st_write(ctx, p, t, n);
    for (int i = 0; i < n; i++) free(bufs[i]);
    return s != MMB_OK;
}

typedef struct hook_state {
    int before[L], after[L];
    const float *add;     /* added to x before layer 0, or NULL */
    int fail_at;          /* after_attention of this layer fails, or -1 */
} hook_state;

static mmb_status h_before(mmb_ctx *ctx, void *u, int layer, float *x, int64_t n, int64_t pos0) {
    (void)ctx; (void)pos0;
    hook_state *s = u;
    s->before[layer]++;
    if (s->add && layer == 0)
        for (int64_t i = 0; i < n * D; i++) x[i] += s->add[i % D];
    return MMB_OK;
}

static mmb_status h_after(mmb_ctx *ctx, void *u, int layer, float *x, int64_t n, int64_t pos0) {
    (void)x; (void)n; (void)pos0;
    hook_state *s = u;
    s->after[layer]++;
    return layer == s->fail_at ? mmb__err(ctx, MMB_ERR_UNSUPPORTED, "hook failed on purpose") : MMB_OK;
}

static double maxdiff(const float *a, const float *b, int64_t n) {
    double e = 0;
    for (int64_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i]));
    return e;
}

static void test_hooks_and_cache(void) {
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 3;
    mmb_ctx *ctx = NULL;
    mmb_lm *lm = NULL;
    mmb_kv_cache *kv = NULL;
    CHECK(mmb_ctx_new(&cp, &ctx) == MMB_OK, "ctx");
    CHECK(write_ckpt(ctx, "test_lm_model") == 0, "write");
    CHECK(mmb_lm_open(ctx, "test_lm_model", &lm) == MMB_OK, "%s", mmb_ctx_error(ctx));
    if (!lm) { mmb_ctx_free(ctx); return; }
    enum { T = 7 };
    int32_t ids[T] = {1, 5, 9, 33, 2, 48, 7};
    float emb[T * D], emb2[T * D], add[D], base[T * V], got[T * V];
    for (int i = 0; i < D; i++) add[i] = frand();
    CHECK(mmb_lm_embed(ctx, lm, ids, T, emb) == MMB_OK, "embed");
    CHECK(mmb_kv_cache_new(ctx, lm, 8, &kv) == MMB_OK, "kv");
    CHECK(mmb_lm_forward(ctx, lm, kv, emb, T, base, 0) == MMB_OK, "%s", mmb_ctx_error(ctx));
    /* no-op hooks everywhere: the loop runs in segments, the result is the same bit for bit */
    hook_state hs = {.fail_at = -1};
    mmb_lm_hook hk[L];
    for (int l = 0; l < L; l++) hk[l] = (mmb_lm_hook){h_before, h_after, &hs};
    CHECK(mmb__lm_set_hooks(ctx, lm, hk) == MMB_OK, "set");
    mmb_kv_cache_reset(kv);
    CHECK(mmb_lm_forward(ctx, lm, kv, emb, T, got, 0) == MMB_OK, "%s", mmb_ctx_error(ctx));
    CHECK(maxdiff(got, base, T * V) == 0.0, "segmented loop differs by %g", maxdiff(got, base, T * V));
    for (int l = 0; l < L; l++) CHECK(hs.before[l] == 1 && hs.after[l] == 1, "layer %d hooks called %d, %d", l,
                                      hs.before[l], hs.after[l]);
    /* before_layer(0) adding v == embeddings + v without hooks */
    hs.add = add;
    mmb_kv_cache_reset(kv);
    CHECK(mmb_lm_forward(ctx, lm, kv, emb, T, got, 0) == MMB_OK, "%s", mmb_ctx_error(ctx));
    for (int i = 0; i < T * D; i++) emb2[i] = emb[i] + add[i % D];
    CHECK(mmb__lm_set_hooks(ctx, lm, NULL) == MMB_OK, "unset");
    mmb_kv_cache_reset(kv);
    CHECK(mmb_lm_forward(ctx, lm, kv, emb2, T, base, 0) == MMB_OK, "%s", mmb_ctx_error(ctx));
    CHECK(maxdiff(got, base, T * V) < 1e-5, "hook's addition differs by %g", maxdiff(got, base, T * V));
    CHECK(maxdiff(got, base, T * V) < maxdiff(got, got + V, V) * 1e-3 + 1e-5, "trivial comparison");
    /* a failing hook ends the forward with its status; the cache keeps what it had */
    hs.add = NULL;
    CHECK(mmb__lm_set_hooks(ctx, lm, hk) == MMB_OK, "set");
    mmb_kv_cache_reset(kv);
    CHECK(mmb_lm_forward(ctx, lm, kv, emb, 2, NULL, 0) == MMB_OK, "prefix");
    hs.fail_at = 1;
    mmb_status s = mmb_lm_forward(ctx, lm, kv, emb, 3, got, 1);
    CHECK(s == MMB_ERR_UNSUPPORTED && strstr(mmb_ctx_error(ctx), "on purpose"), "hook error: %d %s", s,
          mmb_ctx_error(ctx));
    CHECK(mmb_kv_cache_len(kv) == 2, "len %lld", (long long)mmb_kv_cache_len(kv));
    mmb__lm_set_hooks(ctx, lm, NULL);
    /* context overflow: 2 cached + 7 > 8; nothing appended */
    s = mmb_lm_forward(ctx, lm, kv, emb, T, got, 1);
    CHECK(s == MMB_ERR_SHAPE && strstr(mmb_ctx_error(ctx), "context overflow") && strstr(mmb_ctx_error(ctx), "= 9") &&
              strstr(mmb_ctx_error(ctx), "limit is 8"), "overflow: %s", mmb_ctx_error(ctx));
    CHECK(mmb_kv_cache_len(kv) == 2, "len after overflow");
    mmb_kv_cache *big = NULL;
    CHECK(mmb_kv_cache_new(ctx, lm, 65, &big) == MMB_ERR_SHAPE && strstr(mmb_ctx_error(ctx), "limit is 64"), "%s",
          mmb_ctx_error(ctx));
    int32_t bad = V;
    CHECK(mmb_lm_embed(ctx, lm, &bad, 1, emb) == MMB_ERR_ARG, "bad id");
    mmb_kv_cache_free(kv);
    mmb_lm_free(lm);
    mmb_ctx_free(ctx);
}

/* ---- two threads, each with its own context and cache, sharing one model ---- */

typedef struct shared_run {
    const mmb_lm *lm;
    const float *emb;
    float *logits;       /* (7, V) */
    mmb_status s;
} shared_run;

static void *run_shared(void *arg) {
    shared_run *r = arg;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    mmb_ctx *ctx = NULL;
    mmb_kv_cache *kv = NULL;
    r->s = mmb_ctx_new(&cp, &ctx);
    if (r->s == MMB_OK) r->s = mmb_kv_cache_new(ctx, r->lm, 16, &kv);
    for (int rep = 0; rep < 4 && r->s == MMB_OK; rep++) { /* prefill, then decode steps, as a server's request */
        mmb_kv_cache_reset(kv);
        r->s = mmb_lm_forward(ctx, r->lm, kv, r->emb, 5, r->logits, 0);
        for (int i = 5; i < 7 && r->s == MMB_OK; i++)
            r->s = mmb_lm_forward(ctx, r->lm, kv, r->emb + i * D, 1, r->logits + i * V, 1);
    }
    mmb_kv_cache_free(kv);
    mmb_ctx_free(ctx);
    return NULL;
}

static void test_shared_model_two_contexts(void) {
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 1;
    mmb_ctx *ctx = NULL;
    mmb_lm *lm = NULL;
    CHECK(mmb_ctx_new(&cp, &ctx) == MMB_OK, "ctx");
    CHECK(write_ckpt(ctx, "test_lm_shared") == 0, "write");
    CHECK(mmb_lm_open(ctx, "test_lm_shared", &lm) == MMB_OK, "%s", mmb_ctx_error(ctx));
    if (!lm) { mmb_ctx_free(ctx); return; }
    enum { T = 7 };
    int32_t ids[T] = {3, 14, 15, 9, 26, 5, 35};
    float emb[T * D], want[T * V], got[2][T * V];
    CHECK(mmb_lm_embed(ctx, lm, ids, T, emb) == MMB_OK, "embed");
    shared_run one = {lm, emb, want, MMB_OK};
    run_shared(&one); /* the reference: the same calls alone */
    CHECK(one.s == MMB_OK, "alone: %d", one.s);
    pthread_t th[2];
    shared_run r[2] = {{lm, emb, got[0], MMB_OK}, {lm, emb, got[1], MMB_OK}};
    for (int i = 0; i < 2; i++) CHECK(pthread_create(&th[i], NULL, run_shared, &r[i]) == 0, "thread %d", i);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++) {
        CHECK(r[i].s == MMB_OK, "thread %d: status %d", i, r[i].s);
        CHECK(maxdiff(got[i], want, T * V) == 0.0, "thread %d's logits differ from a run alone by %g", i,
              maxdiff(got[i], want, T * V));
    }
    CHECK(maxdiff(want, want + V, V) > 0, "trivial logits");
    mmb_lm_free(lm);
    mmb_ctx_free(ctx);
}

static void test_sampler(void) {
    float lg[6] = {0.5f, 2.0f, 1.0f, 2.0f, -1.0f, 0.0f};
    mmb_sampler s = mmb_sampler_default();
    int32_t t = -1;
    CHECK(mmb_sample(NULL, &s, lg, 6, &t) == MMB_OK && t == 1, "greedy, first of ties: %d", t);
    s.temperature = 1.0f;
    s.top_k = 1;
    CHECK(mmb_sample(NULL, &s, lg, 6, &t) == MMB_OK && t == 1, "top-k 1 is greedy: %d", t);
    /* temperature 0.7, top-k 4, top-p 0.8: expected frequencies from the definition */
    s = (mmb_sampler){.temperature = 0.7f, .top_k = 4, .top_p = 0.8f, .seed = 42};
    double p[6] = {0}, sum = 0;
    int order[6] = {1, 3, 2, 0, 5, 4}; /* by probability, lower id first on ties */
    for (int i = 0; i < 4; i++) sum += p[order[i]] = exp(lg[order[i]] / 0.7);
    double acc = 0, kept = 0;
    int n = 0;
    while (n < 4) { acc += p[order[n++]] / sum; if (acc >= 0.8 - 1e-12) break; }
    for (int i = 0; i < n; i++) kept += p[order[i]];
    int cnt[6] = {0}, draws = 40000;
    int32_t first[16];
    for (int i = 0; i < draws; i++) {
        mmb_sample(NULL, &s, lg, 6, &t);
        if (i < 16) first[i] = t;
        cnt[t]++;
    }
    for (int i = 0; i < 6; i++) {
        int in = 0;
        for (int k = 0; k < n; k++) in |= order[k] == i;
        double want = in ? p[i] / kept : 0.0;
        CHECK(fabs(cnt[i] / (double)draws - want) < 0.01, "token %d: frequency %g, expected %g", i,
              cnt[i] / (double)draws, want);
    }
    mmb_sampler s2 = {.temperature = 0.7f, .top_k = 4, .top_p = 0.8f, .seed = 42};
    int same = 1;
    for (int i = 0; i < 16; i++) { mmb_sample(NULL, &s2, lg, 6, &t); same &= t == first[i]; }
    CHECK(same, "the same seed gives the same draws");
}

int main(void) {
    test_wmat();
    test_wmat_t();
    test_hooks_and_cache();
    test_shared_model_two_contexts();
    test_sampler();
    return DONE("test_lm");
}
