/* Oracle driver for tests/oracle/test_lm_backward.py: the frozen decoder's loss and its gradient with respect to
 * the input embeddings (mmb__lm_loss_backward).
 *
 *   lm_backward_driver MODEL_DIR IN.safetensors OUT.safetensors [THREADS]
 *       IN:  embeds [n, d] F32, labels [n] I64 or I32 (-100: ignored)
 *       OUT: loss_sum [1] F64, count [1] I64, d_embeds [n, d] F32
 *   lm_backward_driver --claim MODEL_DIR N
 *       calls it with n = N on zero (untouched, calloc'd) embeddings and labels: for the length refusals
 *   lm_backward_driver --time MODEL_DIR N REPS [THREADS [TARGETS]]
 *       random embeddings, the last TARGETS positions (default N / 8) as targets; prints the median seconds of
 *       a plain forward
 *       (mmb_lm_forward over the N positions from a fresh cache, last logits only) and of the backward
 *   lm_backward_driver --kernels M N K REPS
 *       one thread: GFLOP/s of y (M, N) = x W^T (mmb__wmat_part, the forward's product) and of dx (M, K) = dy W
 *       (mmb__wmat_part_t, the backward's) for a random W (N, K) in f32 and bf16, medians of REPS
 * Exit 0; 2 with "status: message" when the library refuses; 1 on misuse. */
#include "lm/lm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(mmb_ctx *ctx, mmb_status s) {
    fprintf(stderr, "%s: %s\n", mmb_status_str(s), mmb_ctx_error(ctx));
    return 2;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int open_model(const char *dir, int threads, mmb_ctx **ctx, mmb_lm **lm) {
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = threads;
    if (mmb_ctx_new(&cp, ctx) != MMB_OK) return 1;
    mmb_status s = mmb_lm_open(*ctx, dir, lm);
    return s == MMB_OK ? 0 : fail(*ctx, s);
}

static int claim(const char *dir, int64_t n) {
    mmb_ctx *ctx = NULL;
    mmb_lm *lm = NULL;
    int rc = open_model(dir, 2, &ctx, &lm);
    if (rc) return rc;
    mmb_lm_info in;
    mmb_lm_get_info(lm, &in);
    float *e = calloc((size_t)(n * in.d_model), sizeof(float)), *g = calloc((size_t)(n * in.d_model), sizeof(float));
    int32_t *lab = calloc((size_t)n, sizeof(int32_t));
    double loss = 0;
    int64_t cnt = 0;
    if (!e || !g || !lab) rc = 1;
    else {
        mmb_status s = mmb__lm_loss_backward(ctx, lm, e, lab, n, &loss, &cnt, g);
        rc = s == MMB_OK ? 0 : fail(ctx, s);
    }
    free(e), free(g), free(lab);
    mmb_lm_free(lm);
    mmb_ctx_free(ctx);
    return rc;
}

static int timing(const char *dir, int64_t n, int reps, int threads, int64_t targets) {
    mmb_ctx *ctx = NULL;
    mmb_lm *lm = NULL;
    int rc = open_model(dir, threads, &ctx, &lm);
    if (rc) return rc;
    mmb_lm_info in;
    mmb_lm_get_info(lm, &in);
    const int64_t d = in.d_model;
    float *e = malloc(sizeof(float) * (size_t)(n * d)), *g = malloc(sizeof(float) * (size_t)(n * d));
    float *logits = malloc(sizeof(float) * (size_t)in.vocab);
    int32_t *lab = malloc(sizeof(int32_t) * (size_t)n);
    double *tf = malloc(sizeof(double) * (size_t)reps), *tb = malloc(sizeof(double) * (size_t)reps);
    mmb_kv_cache *kv = NULL;
    if (!e || !g || !logits || !lab || !tf || !tb || mmb_kv_cache_new(ctx, lm, n, &kv) != MMB_OK) {
        rc = 1;
        goto done;
    }
    uint64_t r = 88172645463325252ull;
    for (int64_t i = 0; i < n * d; i++) {
        r ^= r << 13, r ^= r >> 7, r ^= r << 17;
        e[i] = (float)((double)(r >> 11) / 9007199254740992.0 - 0.5);
    }
    for (int64_t i = 0; i < n; i++) lab[i] = i >= n - targets ? (int32_t)(i * 7919 % in.vocab) : MMB_IGNORE_INDEX;
    double loss = 0;
    int64_t cnt = 0;
    for (int k = 0; k < reps + 1; k++) { /* the first of each: warm-up */
        mmb_kv_cache_reset(kv);
        double t0 = mmb__now_s();
        mmb_status s = mmb_lm_forward(ctx, lm, kv, e, n, logits, 1);
        double t1 = mmb__now_s();
        if (s == MMB_OK) s = mmb__lm_loss_backward(ctx, lm, e, lab, n, &loss, &cnt, g);
        double t2 = mmb__now_s();
        if (s != MMB_OK) {
            rc = fail(ctx, s);
            goto done;
        }
        if (k) tf[k - 1] = t1 - t0, tb[k - 1] = t2 - t1;
    }
    qsort(tf, (size_t)reps, sizeof(double), cmp_d);
    qsort(tb, (size_t)reps, sizeof(double), cmp_d);
    printf("n %lld threads %d: forward %.4f s, loss+backward %.4f s (ratio %.2f), loss/token %.4f\n", (long long)n,
           threads, tf[reps / 2], tb[reps / 2], tb[reps / 2] / tf[reps / 2], loss / (double)cnt);
done:
    mmb_kv_cache_free(kv);
    free(e), free(g), free(logits), free(lab), free(tf), free(tb);
    mmb_lm_free(lm);
    mmb_ctx_free(ctx);
    return rc;
}

static int kernels(int64_t M, int64_t N, int64_t K, int reps) {
    float *w = malloc(sizeof(float) * (size_t)(N * K)), *x = malloc(sizeof(float) * (size_t)(M * (N > K ? N : K)));
    float *y = malloc(sizeof(float) * (size_t)(M * (N > K ? N : K)));
    uint16_t *wb = malloc(sizeof(uint16_t) * (size_t)(N * K));
    size_t ns = mmb__wmat_scratch(M, K) > mmb__wmat_t_scratch(M, N) ? mmb__wmat_scratch(M, K) : mmb__wmat_t_scratch(M, N);
    float *scr = aligned_alloc(64, (ns * sizeof(float) + 63) / 64 * 64);
    double *t = malloc(sizeof(double) * (size_t)reps);
    if (!w || !x || !y || !wb || !scr || !t) return 1;
    for (int64_t i = 0; i < N * K; i++) w[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f, wb[i] = mmb__f32_to_bf16(w[i]);
    for (int64_t i = 0; i < M * (N > K ? N : K); i++) x[i] = (float)((i * 104729) % 1000) / 1000.0f - 0.5f;
    for (int dt = 0; dt < 2; dt++)
        for (int tr = 0; tr < 2; tr++) {
            mmb_wmat wm = {dt ? (const void *)wb : (const void *)w, dt ? MMB_BF16 : MMB_F32, N, K};
            for (int r = 0; r < reps; r++) {
                double t0 = mmb__now_s();
                if (tr) mmb__wmat_part_t(y, K, x, N, M, &wm, 0, K, 0, scr);
                else mmb__wmat_part(y, N, x, K, M, &wm, NULL, 0, N, 0, scr);
                t[r] = mmb__now_s() - t0;
            }
            qsort(t, (size_t)reps, sizeof(double), cmp_d);
            printf("%s %-22s M %lld N %lld K %lld: %.1f GFLOP/s\n", dt ? "bf16" : "f32 ", tr ? "dx = dy W (part_t)" : "y = x W^T (part)",
                   (long long)M, (long long)N, (long long)K, 2.0 * (double)(M * N * K) / t[reps / 2] / 1e9);
        }
    free(w), free(x), free(y), free(wb), free(scr), free(t);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 6 && strcmp(argv[1], "--kernels") == 0)
        return kernels(atoll(argv[2]), atoll(argv[3]), atoll(argv[4]), atoi(argv[5]));
    if (argc == 4 && strcmp(argv[1], "--claim") == 0) return claim(argv[2], atoll(argv[3]));
    if (argc >= 5 && argc <= 7 && strcmp(argv[1], "--time") == 0)
        return timing(argv[2], atoll(argv[3]), atoi(argv[4]), argc >= 6 ? atoi(argv[5]) : 2,
                      argc == 7 ? atoll(argv[6]) : atoll(argv[3]) / 8);
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s MODEL_DIR IN.safetensors OUT.safetensors [THREADS]\n"
                "       %s --claim MODEL_DIR N\n       %s --time MODEL_DIR N REPS [THREADS [TARGETS]]\n", argv[0], argv[0],
                argv[0]);
        return 1;
    }
    mmb_ctx *ctx = NULL;
    mmb_lm *lm = NULL;
    int rc = open_model(argv[1], argc == 5 ? atoi(argv[4]) : 2, &ctx, &lm);
    if (rc) return rc;
    mmb_st_file *f = NULL;
    float *g = NULL;
    int32_t *lab = NULL;
    mmb_status s = mmb_st_open(ctx, argv[2], &f);
    if (s != MMB_OK) {
        rc = fail(ctx, s);
        goto done;
    }
    const mmb_tensor *te = mmb_st_find(f, "embeds"), *tl = mmb_st_find(f, "labels");
    mmb_lm_info in;
    mmb_lm_get_info(lm, &in);
    if (!te || !tl || te->dtype != MMB_F32 || te->ndim != 2 || te->shape[1] != in.d_model || tl->ndim != 1 ||
        tl->shape[0] != te->shape[0] || (tl->dtype != MMB_I64 && tl->dtype != MMB_I32)) {
        fprintf(stderr, "%s: needs embeds [n, %lld] F32 and labels [n] I64/I32\n", argv[2], (long long)in.d_model);
        rc = 1;
        goto done;
    }
    const int64_t n = te->shape[0];
    g = malloc(sizeof(float) * (size_t)(n * in.d_model + 1));
    lab = malloc(sizeof(int32_t) * (size_t)(n + 1));
    if (!g || !lab) {
        rc = 1;
        goto done;
    }
    for (int64_t i = 0; i < n; i++)
        lab[i] = tl->dtype == MMB_I64 ? (int32_t)((const int64_t *)tl->data)[i] : ((const int32_t *)tl->data)[i];
    double loss = 0;
    int64_t cnt = 0;
    s = mmb__lm_loss_backward(ctx, lm, te->data, lab, n, &loss, &cnt, g);
    if (s != MMB_OK) {
        rc = fail(ctx, s);
        goto done;
    }
    mmb_tensor out[3] = {{"loss_sum", MMB_F64, 1, {1}, &loss}, {"count", MMB_I64, 1, {1}, &cnt},
                         {"d_embeds", MMB_F32, 2, {n, in.d_model}, g}};
    if ((s = mmb_st_write(ctx, argv[3], out, 3)) != MMB_OK) rc = fail(ctx, s);
    printf("loss_sum %.9g count %lld\n", loss, (long long)cnt);
done:
    free(g);
    free(lab);
    mmb_st_close(f);
    mmb_lm_free(lm);
    mmb_ctx_free(ctx);
    return rc;
}
