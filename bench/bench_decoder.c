/* LLM decoder benchmark: a Qwen2 model at Qwen2-0.5B's shapes (random weights, bf16, written by
 * bench/peer_decoder.py with save_pretrained and cached in --dir) against PyTorch in the same run and
 * thread count: prefill tokens/s (a --prompt token prompt) and decode tokens/s (--decode steps with the
 * KV cache). Decode is memory-bound: each step reads every weight once, so its bound is the machine's
 * read bandwidth (measured here: a streaming read of a 1 GiB buffer on the same threads) divided by the
 * bytes read per token (weights + the KV cache at the mean context). The table gives the share of it.
 *
 *   bench_decoder [--threads 1,2] [--reps N] [--prompt P] [--decode D] [--dir CACHE] [--no-peers] [--quick]
 *                 [--json FILE]   (one JSON object per figure)
 *   bench_decoder --bandwidth [--threads 1,2] [--quick] [--json FILE]
 *                 only the read bandwidth probe at each thread count (bench/bench_fusion_a.py's bound)
 */
#include "bench_common.h"
#include "mmbridge.h"

typedef struct bw_arg {
    const float *p;
    size_t n;
    pthread_barrier_t *bar;
    double t, sink;
} bw_arg;

#if BENCH_X86
__attribute__((target("avx2"), noinline)) static double read_sum(const float *p, size_t n) {
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        a = _mm256_add_ps(a, _mm256_load_ps(p + i));
        b = _mm256_add_ps(b, _mm256_load_ps(p + i + 8));
        c = _mm256_add_ps(c, _mm256_load_ps(p + i + 16));
        d = _mm256_add_ps(d, _mm256_load_ps(p + i + 24));
    }
    float o[8];
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    return (double)(o[0] + o[7]);
}
#else
/* The same streaming read with GCC vector extensions (the buffer is 64-byte aligned). */
typedef float rd_v8f __attribute__((vector_size(32)));
__attribute__((noinline)) static double read_sum(const float *p, size_t n) {
    rd_v8f a = {0}, b = a, c = a, d = a;
    for (size_t i = 0; i + 32 <= n; i += 32) {
        a += *(const rd_v8f *)(p + i);
        b += *(const rd_v8f *)(p + i + 8);
        c += *(const rd_v8f *)(p + i + 16);
        d += *(const rd_v8f *)(p + i + 24);
    }
    rd_v8f o = (a + b) + (c + d);
    return (double)(o[0] + o[7]);
}
#endif

static void *bw_thread(void *va) {
    bw_arg *w = va;
    pthread_barrier_wait(w->bar);
    double t0 = now();
    w->sink = read_sum(w->p, w->n);
    w->t = now() - t0;
    return NULL;
}

/* Read bandwidth (bytes/s) of nth threads each streaming its slice of a `bytes` buffer: best of 5. */
static double measure_bw(int nth, size_t bytes) {
    float *buf = aligned_alloc(64, bytes);
    if (!buf) return 0;
    size_t n = bytes / sizeof(float);
    for (size_t i = 0; i < n; i++) buf[i] = (float)(i & 7);
    double best = 0;
    for (int r = 0; r < 5; r++) {
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, (unsigned)nth);
        bw_arg w[64];
        pthread_t th[64];
        size_t per = n / (size_t)nth / 32 * 32;
        for (int i = 0; i < nth; i++) w[i] = (bw_arg){buf + per * (size_t)i, per, &bar, 0, 0};
        for (int i = 1; i < nth; i++) pthread_create(&th[i], NULL, bw_thread, &w[i]);
        bw_thread(&w[0]);
        double tmax = w[0].t;
        for (int i = 1; i < nth; i++) {
            pthread_join(th[i], NULL);
            if (w[i].t > tmax) tmax = w[i].t;
        }
        pthread_barrier_destroy(&bar);
        double v = (double)(per * (size_t)nth * sizeof(float)) / tmax;
        if (v > best) best = v;
    }
    free(buf);
    return best;
}

int main(int argc, char **argv) {
    int threads[8] = {1, 2}, nt = 2, reps = 3, prompt = 128, decode = 32, peers = 1, quick = 0, bw_only = 0;
    const char *dir = "build/bench-cache";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) nt = parse_list(argv[++i], threads, 8);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--prompt") && i + 1 < argc) prompt = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--decode") && i + 1 < argc) decode = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--no-peers")) peers = 0;
        else if (!strcmp(argv[i], "--peers")) peers = 1;
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) { if (!json_open(argv[++i])) return 2; }
        else if (!strcmp(argv[i], "--bandwidth")) bw_only = 1;
        else if (!strcmp(argv[i], "--quick")) { quick = 1; reps = 1; nt = 1; peers = 0; prompt = 16; decode = 8; }
        else {
            fprintf(stderr, "usage: bench_decoder [--threads 1,2] [--reps N] [--prompt P] [--decode D] [--dir D] "
                    "[--no-peers] [--peers] [--quick] [--json FILE]\n"
                    "       bench_decoder --bandwidth [--threads 1,2] [--quick] [--json FILE]\n");
            return 2;
        }
    }
    if (reps < 1 || reps > 50 || prompt < 1 || decode < 1 || nt < 1) { fprintf(stderr, "bench_decoder: bad option\n"); return 2; }
    if (bw_only) { /* the probe alone, for a benchmark that states its decode against the same bound */
        for (int ti = 0; ti < nt; ti++) {
            double bw = measure_bw(threads[ti], quick ? ((size_t)64 << 20) : ((size_t)1 << 30));
            printf("bandwidth: %d thread(s): %.2f GB/s read\n", threads[ti], bw * 1e-9);
            json_line("\"bench\": \"bandwidth\", \"threads\": %d, \"read_gbps\": %.4g", threads[ti], bw * 1e-9);
        }
        return 0;
    }
    char cmd[2048], ckpt[1024];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && python3 bench/peer_decoder.py --dir '%s' %s --prepare-only 2>/dev/null",
             dir, dir, quick ? "--quick" : "");
    char *prep = run_peer(cmd);
    if (!prep) { fprintf(stderr, "bench_decoder: %s failed (run from the repository root)\n", cmd); return 1; }
    free(prep);
    snprintf(ckpt, sizeof ckpt, "%s/%s", dir, quick ? "qwen2-tiny" : "qwen2-0.5b");
    size_t bw_bytes = quick ? ((size_t)64 << 20) : ((size_t)1 << 30);

    printf("bench_decoder: %s (bf16 weights), prompt %d tokens, %d decode steps, median of %d\n", ckpt, prompt, decode,
           reps);
    printf("%-8s %-16s %12s %12s %10s %10s %10s\n", "threads", "implementation", "prefill t/s", "decode t/s",
           "vs ours", "% bw bound", "peak RSS");
    for (int ti = 0; ti < nt; ti++) {
        int th = threads[ti];
        double bw = measure_bw(th, bw_bytes);
        mmb_ctx *ctx = NULL;
        mmb_ctx_params cp = mmb_ctx_default_params();
        cp.n_threads = th;
        mmb_lm *lm = NULL;
        mmb_kv_cache *kv = NULL;
        if (mmb_ctx_new(&cp, &ctx) != MMB_OK || mmb_lm_open(ctx, ckpt, &lm) != MMB_OK ||
            mmb_kv_cache_new(ctx, lm, prompt + decode, &kv) != MMB_OK) {
            fprintf(stderr, "bench_decoder: %s\n", ctx ? mmb_ctx_error(ctx) : "no context");
            return 1;
        }
        mmb_lm_info li;
        mmb_lm_get_info(lm, &li);
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)prompt);
        float *emb = malloc(sizeof(float) * (size_t)(prompt * li.d_model)), *lg = malloc(sizeof(float) * (size_t)li.vocab);
        uint64_t s = 12345;
        for (int i = 0; i < prompt; i++) { s = s * 6364136223846793005ull + 1442695040888963407ull; ids[i] = (int32_t)((s >> 33) % (uint64_t)li.vocab); }
        mmb_lm_embed(ctx, lm, ids, prompt, emb);
        double tp[64], td[64];
        mmb_sampler smp = mmb_sampler_default();
        for (int r = 0; r <= reps; r++) {
            mmb_kv_cache_reset(kv);
            double t0 = now();
            mmb_status st = mmb_lm_forward(ctx, lm, kv, emb, prompt, lg, 1);
            double t1 = now();
            for (int g = 0; g < decode && st == MMB_OK; g++) {
                int32_t tok;
                mmb_sample(ctx, &smp, lg, li.vocab, &tok);
                st = mmb_lm_embed(ctx, lm, &tok, 1, emb);
                if (st == MMB_OK) st = mmb_lm_forward(ctx, lm, kv, emb, 1, lg, 1);
            }
            double t2 = now();
            if (st != MMB_OK) { fprintf(stderr, "bench_decoder: %s\n", mmb_ctx_error(ctx)); return 1; }
            mmb_lm_embed(ctx, lm, ids, prompt, emb);
            if (r) { tp[r - 1] = t1 - t0; td[r - 1] = t2 - t1; }
        }
        double pre = median(tp, reps), dec = median(td, reps);
        /* bytes per decode step: the weights, and K and V of every layer at the mean context */
        double ctx_mean = prompt + 0.5 * decode;
        double kvb = 2.0 * 4.0 * (double)(li.layers * li.kv_heads * li.head_dim) * ctx_mean;
        double bytes = (double)li.bytes_per_token + kvb, bound = bw / bytes;
        printf("%-8d %-16s %12.1f %12.2f %10s %9.1f%% %8.0f MiB\n", th, "mmbridge", prompt / pre, decode / dec,
               "1.00x", 100.0 * (decode / dec) / bound, peak_rss_mib());
        json_line("\"bench\": \"decoder\", \"impl\": \"mmbridge\", \"threads\": %d, \"checkpoint\": \"%s\", \"prompt\": %d, "
                  "\"decode\": %d, \"prefill_tps\": %.6g, \"decode_tps\": %.6g, \"bound_tps\": %.6g, \"read_gbps\": %.4g, "
                  "\"peak_rss_mib\": %.1f", th, ckpt, prompt, decode, prompt / pre, decode / dec, bound, bw * 1e-9,
                  peak_rss_mib());
        printf("%-8d %-16s %12s %12.2f %10s %10s   (%.2f GB/s read, %.1f MB/token: weights %.1f + KV %.1f)\n", th,
               "bandwidth bound", "", bound, "", "100.0%", bw * 1e-9, bytes * 1e-6, (double)li.bytes_per_token * 1e-6,
               kvb * 1e-6);
        fflush(stdout);
        free(ids);
        free(emb);
        free(lg);
        mmb_kv_cache_free(kv);
        mmb_lm_free(lm);
        mmb_ctx_free(ctx);
        if (peers) {
            snprintf(cmd, sizeof cmd, "python3 bench/peer_decoder.py --dir '%s' %s --threads %d --reps %d --prompt %d "
                     "--decode %d 2>/dev/null", dir, quick ? "--quick" : "", th, reps, prompt, decode);
            char *out = run_peer(cmd);
            for (char *line = out ? strtok(out, "\n") : NULL; line; line = strtok(NULL, "\n")) {
                char name[64] = "?";
                const char *q = strstr(line, "\"peer\": \"");
                if (!q) continue;
                sscanf(q + 9, "%63[^\"]", name);
                double ps = json_num(line, "prefill_s"), ds = json_num(line, "decode_s");
                printf("%-8d %-16s %12.1f %12.2f %9.2fx %9.1f%% %8.0f MiB\n", th, name, prompt / ps, decode / ds,
                       ds / dec, 100.0 * (decode / ds) / bound, json_num(line, "peak_rss_mib"));
                json_line("\"bench\": \"decoder\", \"impl\": \"%s\", \"threads\": %d, \"prefill_tps\": %.6g, "
                          "\"decode_tps\": %.6g, \"bound_tps\": %.6g, \"peak_rss_mib\": %.1f", name, th, prompt / ps,
                          decode / ds, bound, json_num(line, "peak_rss_mib"));
            }
            if (!out) printf("%-8d %-16s %12s\n", th, "peers", "failed");
            free(out);
        }
        fflush(stdout);
    }
    return 0;
}
