/* GEMM benchmark: mmbridge's own kernel against OpenBLAS, BLIS and oneDNN, all in one run.
 *
 *   bench_gemm [--threads 1,2] [--reps N] [--rounds R] [--quick] [--dtypes] [--torch] [--dir D] [--json FILE]
 *
 * 1. Measures the machine's FMA peak: 12 independent accumulator chains of 512-bit
 *    (_mm512_fmadd_ps) and of 256-bit (_mm256_fmadd_ps) FMAs, 2 flops per lane, on 1 and on T
 *    threads; and the bf16 dot-product peak (_mm512_dpbf16_ps) where avx512_bf16 exists, counted
 *    as 4 flops per fp32 lane per instruction (2 bf16 products + 2 adds = 64 flops/instruction).
 * 2. For each shape (M, N, K) and thread count times C (M, N) = A (M, K) W^T with W (N, K)
 *    row-major (the nn.Linear layout), 2*M*N*K flops, median of --reps runs after 2 warm-ups:
 *    own (weights packed once, before timing), OpenBLAS cblas_sgemm, BLIS bli_sgemm and oneDNN
 *    dnnl_sgemm, each dlopen'ed RTLD_LOCAL so that their symbols can't collide. A library that
 *    cannot be opened is reported as n/a.
 * 3. OpenBLAS reads OPENBLAS_CORETYPE when it is loaded, so the other OpenBLAS configuration is
 *    measured by re-running this binary (--openblas-child) with a changed environment: if the
 *    environment pins OPENBLAS_CORETYPE=Haswell, the child has OPENBLAS_CORETYPE and
 *    OPENBLAS_L2_SIZE unset ("unpinned"); if neither is set, the child gets
 *    OPENBLAS_CORETYPE=Haswell ("pinned"); for any other setting both children run.
 * 4. Our kernel with f32, bf16, f16 and int8 weights (bench_dtypes), interleaved; --dtypes runs only
 *    the peak probe and this table.
 * 5. --torch: PyTorch as a peer too, kept running (bench/peer_torch.py --serve) and timed in the same
 *    rounds: torch.nn.functional.linear eager and under torch.compile, and for the attention
 *    scaled_dot_product_attention eager, compiled and in onnxruntime (an ONNX export). The operands
 *    are handed over as raw float32 files in --dir (default build/bench-cache).
 * --json FILE writes every figure as one JSON object per line (bench/results.py reads it), with the
 * median and the range of the samples; the tables on stdout are the same with or without it.
 * Every peer's result is compared with ours: max |c - c_own| / max |c_own| above 1e-4 marks it
 * incorrect ("!"). Ours is checked against the double-precision oracle on a sample of rows. */
#include "bench_common.h"
#include "bench_peers.h"
#include "internal.h"

#include <dlfcn.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* ---- PyTorch, kept running (--torch) -------------------------------------------------------- */

enum { B_TORCH = NB_, B_TORCH_C, NB_ALL };
static const char *torch_mode[NB_ALL] = {[B_TORCH] = "eager", [B_TORCH_C] = "compile"};
static peer_proc torch_peer;
static char torch_name[64] = "pytorch", na_reason[NB_ALL][256];
static const char *data_dir = "build/bench-cache";

/* Starts the PyTorch peer; false (with the reason in why) if it does not answer. */
static bool torch_start(char *why, size_t cap) {
    char cmd[1200], line[1024];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && exec python3 bench/peer_torch.py --serve 2>/dev/null", data_dir);
    if (!peer_start(&torch_peer, cmd) || !peer_hello(&torch_peer, line, sizeof line) ||
        !json_str(line, "peer", torch_name, sizeof torch_name)) {
        if (!json_str(line, "error", why, cap)) snprintf(why, cap, "bench/peer_torch.py --serve did not start");
        peer_stop(&torch_peer);
        return false;
    }
    return true;
}

/* Writes the raw float32 arrays a[0..n) one after another to path. */
static bool write_f32(const char *path, const float *const *a, const int64_t *n, int k) {
    FILE *f = fopen(path, "wb");
    bool ok = f != NULL;
    for (int i = 0; ok && i < k; i++) ok = fwrite(a[i], sizeof(float), (size_t)n[i], f) == (size_t)n[i];
    if (f && fclose(f) != 0) ok = false;
    return ok;
}

/* Asks the peer for `req` (its timings and its error against ours); appends the timings to
 * ts[*n]. False (the reason in why) when it answers with an error. */
static bool torch_time(const char *req, double *ts, int *n, int cap, double *err, char *why, size_t wcap) {
    char line[8192];
    if (!peer_ask(&torch_peer, line, sizeof line, "%s", req)) {
        snprintf(why, wcap, "the PyTorch peer exited");
        return false;
    }
    if (json_str(line, "error", why, wcap)) return false;
    int k = json_nums(line, "times", ts + *n, cap - *n);
    if (k < 0) { snprintf(why, wcap, "bad answer from the PyTorch peer"); return false; }
    *n += k;
    double e = json_num(line, "err");
    if (err && e >= 0 && !(e <= *err)) *err = e;
    return true;
}

/* Appends reps timings (seconds, after warm runs) of backend b to ts[*n]. False if unavailable. */
static bool time_backend(int b, prob *p, int reps, int warm, float *C, double *ts, int *n) {
    for (int i = 0; i < warm; i++)
        if (!run_backend(b, p, C)) return false;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        run_backend(b, p, C);
        ts[(*n)++] = now() - t0;
    }
    return true;
}

/* GFLOP/s of the median of n timings; *lo and *hi those of the slowest and the fastest. */
static double median_gflops(const prob *p, double *ts, int n, double *lo, double *hi) {
    spread sp = spread_of(ts, n);
    double f = 2.0 * (double)p->M * (double)p->N * (double)p->K * 1e-9;
    *lo = f / sp.hi;
    *hi = f / sp.lo;
    return f / sp.med;
}

/* max |c - ref| / max |ref| */
static double rel_err(const float *c, const float *ref, int64_t n) {
    double md = 0.0, mr = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)c[i] - (double)ref[i]);
        if (!(d <= md)) md = d; /* NaN propagates */
        if (fabs((double)ref[i]) > mr) mr = fabs((double)ref[i]);
    }
    return md / (mr > 0.0 ? mr : 1.0);
}

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static float frand(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 40) / (double)(1ull << 23) - 1.0);
}

/* The fused attention of CLIP ViT-L/14-336 (577 tokens, 16 heads of 64; 4 T^2 D flops), at each
 * thread count: median of rounds x reps after a warm-up, against the peak at that count. With the
 * PyTorch peer running, its eager, compiled and onnxruntime attention take turns with ours, one
 * timed run each per repetition, on the same q, k, v. */
static void bench_attention(const int *thr, int nt, int reps, int rounds, const double *peak) {
    const int64_t T = 577, H = 16, hd = 64, D = H * hd;
    enum { NA = 4 };
    static const char *mode[NA] = {"own", "eager", "compile", "onnxruntime"};
    int na = torch_peer.pid > 0 ? NA : 1;
    double flops = 4.0 * (double)T * (double)T * (double)D;
    float *qkv = malloc(sizeof(float) * (size_t)(T * 3 * D)), *out = malloc(sizeof(float) * (size_t)(T * D));
    if (!qkv || !out) { free(qkv); free(out); return; }
    for (int64_t i = 0; i < T * 3 * D; i++) qkv[i] = frand();
    char path[1200], req[1400];
    snprintf(path, sizeof path, "%s/attn-%lldx%lldx%lld.f32", data_dir, (long long)T, (long long)H, (long long)hd);
    if (na > 1) { /* the operands and our result, for the peer */
        mmb_ctx *c0 = NULL;
        mmb_ctx_params cp = mmb_ctx_default_params();
        cp.n_threads = 1;
        float *sc = malloc(sizeof(float) * mmb__attention_scratch(1, hd));
        if (sc && mmb_ctx_new(&cp, &c0) == MMB_OK) mmb__attention_forward(c0, out, qkv, 1, T, H, hd, sc);
        const float *arr[2] = {qkv, out};
        const int64_t len[2] = {T * 3 * D, T * D};
        if (!sc || !c0 || !write_f32(path, arr, len, 2)) na = 1;
        mmb_ctx_free(c0);
        free(sc);
    }
    printf("\nattention (blocked, online softmax, on the GEMM micro-kernel): %lld tokens x %lld heads x %lld\n",
           (long long)T, (long long)H, (long long)hd);
    for (int t = 0; t < nt; t++) {
        mmb_ctx_params cp = mmb_ctx_default_params();
        cp.n_threads = thr[t];
        mmb_ctx *ctx = NULL;
        float *sc = malloc(sizeof(float) * mmb__attention_scratch(thr[t], hd));
        if (!sc || mmb_ctx_new(&cp, &ctx) != MMB_OK) { free(sc); break; }
        static double ts[NA][512];
        int n[NA] = {0};
        double err[NA] = {0};
        char why[NA][256] = {{0}};
        bool ok[NA] = {true, true, true, true};
        for (int r = -1; r < rounds * reps && n[0] < 512; r++) /* r = -1: the warm-up */
            for (int m = 0; m < na; m++) {
                if (!ok[m]) continue;
                if (m == 0) {
                    double t0 = now();
                    mmb__attention_forward(ctx, out, qkv, 1, T, H, hd, sc);
                    if (r >= 0) ts[0][n[0]++] = now() - t0;
                    continue;
                }
                nap(0.05); /* the peer's and our worker threads never spin at the same time */
                snprintf(req, sizeof req, "attn %s %s %lld %lld %lld %d %d %d", mode[m], path, (long long)T,
                         (long long)H, (long long)hd, thr[t], r >= 0, r < 0);
                ok[m] = torch_time(req, ts[m], &n[m], 512, &err[m], why[m], sizeof why[m]);
                nap(0.05);
            }
        for (int m = 0; m < na; m++) {
            if (!ok[m] || !n[m]) {
                printf("  %d thread%s: %-19s n/a (%s)\n", thr[t], thr[t] > 1 ? "s" : " ", mode[m], why[m]);
                json_line("\"bench\": \"attention\", \"impl\": \"%s\", \"threads\": %d, \"error\": \"%s\"",
                          mode[m], thr[t], why[m]);
                continue;
            }
            spread sp = spread_of(ts[m], n[m]);
            double gf = flops / sp.med * 1e-9;
            if (na == 1)
                printf("  %d thread%s: %8.2f ms %7.1f GFLOP/s (%4.1f%% of peak)\n", thr[t], thr[t] > 1 ? "s" : " ",
                       sp.med * 1e3, gf, 100.0 * gf / peak[t]);
            else
                printf("  %d thread%s: %-19s %8.2f ms %7.1f GFLOP/s (%4.1f%% of peak)%s\n", thr[t],
                       thr[t] > 1 ? "s" : " ", m ? mode[m] : "own", sp.med * 1e3, gf, 100.0 * gf / peak[t],
                       err[m] > 1e-4 ? " ! differs from ours" : "");
            json_line("\"bench\": \"attention\", \"impl\": \"%s\", \"peer\": \"%s\", \"threads\": %d, \"tokens\": %lld, "
                      "\"heads\": %lld, \"head_dim\": %lld, \"flops\": %.0f, \"s\": %.6g, \"s_min\": %.6g, "
                      "\"s_max\": %.6g, \"n\": %d, \"err\": %.3g",
                      mode[m], m ? torch_name : "mmbridge", thr[t], (long long)T, (long long)H, (long long)hd, flops,
                      sp.med, sp.lo, sp.hi, n[m], err[m]);
        }
        mmb_ctx_free(ctx);
        free(sc);
    }
    free(qkv);
    free(out);
}

/* What int8 dot products could give on AVX2 without VNNI (no kernel uses them yet): the 6-row x
 * 16-column micro-kernel body of the fp32 kernel (broadcast A, 2 B vectors, 12 accumulators) against
 * the same body on u8 x s8 with vpmaddubsw (pairs -> s16) + vpmaddwd by ones (-> s32) + vpaddd, 32
 * multiply-adds per accumulator step instead of 8; and with vpabsb / vpsignb added, which signed
 * 8-bit activations need (vpmaddubsw takes one operand unsigned, and its s16 pair sums saturate
 * unless the unsigned operand stays below 128). Returned per loop iteration: 12 x 64 "flops". */
#if BENCH_X86
static const float i8_af[8] = {1e-3f, 2e-3f, 3e-3f, 4e-3f, 5e-3f, 6e-3f};
static const int8_t i8_ai[32] = {1, -2, 3, 4, 5, -6, 7, 8, 9, 10, 11, 12, 13, 14, -15, 16,
                                 17, 18, 19, 20, 21, 22, 23, 24};
#define R6_(X) X(0) X(1) X(2) X(3) X(4) X(5)
__attribute__((target("avx2,fma"), noinline)) static double body_f32(long n) {
#define DF_(r) __m256 c##r##a = _mm256_setzero_ps(), c##r##b = _mm256_setzero_ps();
#define FF_(r) { __m256 ar = _mm256_broadcast_ss(i8_af + r); c##r##a = _mm256_fmadd_ps(ar, b0, c##r##a); \
                 c##r##b = _mm256_fmadd_ps(ar, b1, c##r##b); }
#define SF_(r) s += c##r##a[0] + c##r##b[0];
    R6_(DF_)
    __m256 b0 = _mm256_set1_ps(1.0001f), b1 = _mm256_set1_ps(0.9999f);
    for (long it = 0; it < n; it++) {
        __asm__ volatile("" : "+x"(b0), "+x"(b1));
        R6_(FF_)
    }
    float s = 0;
    R6_(SF_)
    return s;
}
__attribute__((target("avx2,fma"), always_inline)) static inline double body_i8(long n, const int sign) {
#define DI_(r) __m256i c##r##a = _mm256_setzero_si256(), c##r##b = _mm256_setzero_si256();
#define FI_(r) { __m256i ar = _mm256_set1_epi32(*(const int32_t *)(i8_ai + 4 * r)), w0 = b0, w1 = b1, au = ar; \
                 if (sign) { au = _mm256_abs_epi8(ar); w0 = _mm256_sign_epi8(b0, ar); w1 = _mm256_sign_epi8(b1, ar); } \
                 c##r##a = _mm256_add_epi32(c##r##a, _mm256_madd_epi16(_mm256_maddubs_epi16(au, w0), ones)); \
                 c##r##b = _mm256_add_epi32(c##r##b, _mm256_madd_epi16(_mm256_maddubs_epi16(au, w1), ones)); }
#define SI_(r) s += (uint32_t)_mm256_extract_epi32(c##r##a, 0) + (uint32_t)_mm256_extract_epi32(c##r##b, 0);
    R6_(DI_)
    __m256i b0 = _mm256_set1_epi8(3), b1 = _mm256_set1_epi8(-5), ones = _mm256_set1_epi16(1);
    for (long it = 0; it < n; it++) {
        __asm__ volatile("" : "+x"(b0), "+x"(b1));
        R6_(FI_)
    }
    uint32_t s = 0; /* the accumulators wrap (vpaddd): only kept alive, never read as a result */
    R6_(SI_)
    return s;
}
__attribute__((target("avx2,fma"), noinline)) static double body_i8_u7(long n) { return body_i8(n, 0); }
__attribute__((target("avx2,fma"), noinline)) static double body_i8_s8(long n) { return body_i8(n, 1); }

#endif /* BENCH_X86 */

static void int8_dot_probe(void) {
#if BENCH_X86
    if (!has_avx2_fma()) return;
    double f = measure_peak(body_f32, 12.0 * 16.0, 1, 0.25);
    double u = measure_peak(body_i8_u7, 12.0 * 64.0, 1, 0.25);
    double g = measure_peak(body_i8_s8, 12.0 * 64.0, 1, 0.25);
    printf("\nint8 dot products on AVX2 (not used by any kernel yet; 1 thread, 6x16 micro-kernel body):\n"
           "  fp32 FMA %.1f GFLOP/s; vpmaddubsw+vpmaddwd+vpaddd %.1f (%.2fx; activations < 128 unsigned);\n"
           "  with vpabsb+vpsignb for signed 8-bit activations %.1f (%.2fx)\n", f * 1e-9, u * 1e-9, u / f,
           g * 1e-9, g / f);
#endif
}

/* Our kernel with reduced-precision weights (mmb__gemm_own_pack_dt): for each shape and thread count,
 * f32, bf16, f16 and int8 weights timed in turn within each round (A/B interleaved), median of
 * rounds x reps after a warm-up; GFLOP/s against the fp32 peak, the ratio to f32, the packed weight
 * bytes, and each result's max |c - c_f32| / max |c_f32| (the weights' rounding, not an error of
 * the kernel: test_gemm checks that). */
static void bench_dtypes(const shape *shapes, int ns, const int *thr, int nt, int reps, int rounds,
                         const double *peak) {
    static const mmb_dtype dts[4] = {MMB_F32, MMB_BF16, MMB_F16, MMB_I8};
    static const char *dtn[4] = {"f32", "bf16", "f16", "int8"};
    mmb_pool *pools[8] = {0};
    for (int t = 0; t < nt && t < 8; t++)
        if (mmb__pool_new(thr[t], &pools[t]) != MMB_OK) return;
    printf("\nown kernel by weight dtype (weights widened to f32 in the micro-kernel; %% of the fp32 peak;\n"
           "x f32 = speed relative to f32 weights; median of %d rounds x %d, dtypes interleaved)\n\n",
           rounds, reps);
    printf("%-16s %3s  %-6s %14s %8s %12s %10s\n", "M x N x K", "thr", "dtype", "GFLOP/s", "x f32",
           "packed MiB", "vs f32");
    for (int s = 0; s < ns; s++) {
        int64_t M = shapes[s].M, N = shapes[s].N, K = shapes[s].K;
        float *A = malloc(sizeof(float) * (size_t)(M * K)), *W = malloc(sizeof(float) * (size_t)(N * K));
        float *C = malloc(sizeof(float) * (size_t)(M * N)), *C32 = malloc(sizeof(float) * (size_t)(M * N));
        float *scales = malloc(sizeof(float) * (size_t)mmb__gemm_own_scales_size(N));
        void *packed[4] = {0};
        bool ok = A && W && C && C32 && scales;
        for (int d = 0; d < 4 && ok; d++) {
            size_t bytes = mmb__gemm_own_packed_bytes(N, K, dts[d]);
            ok = (packed[d] = aligned_alloc(64, (bytes + 63) / 64 * 64)) != NULL;
        }
        if (!ok) {
            fprintf(stderr, "out of memory\n");
        } else {
            for (int64_t i = 0; i < M * K; i++) A[i] = frand();
            for (int64_t i = 0; i < N * K; i++) W[i] = frand();
            /* one scale array serves int8: it is the only dtype that reads it */
            for (int d = 0; d < 4; d++) mmb__gemm_own_pack_dt(packed[d], scales, W, N, K, dts[d]);
            double flops = 2.0 * (double)M * (double)N * (double)K;
            for (int t = 0; t < nt; t++) {
                static double ts[4][512];
                int n[4] = {0};
                for (int r = 0; r < rounds; r++)
                    for (int d = 0; d < 4; d++) {
                        mmb__gemm_own_dt(pools[t], C, A, packed[d], scales, dts[d], NULL, M, N, K, MMB_ACT_NONE);
                        for (int i = 0; i < reps && n[d] < 512; i++) {
                            double t0 = now();
                            mmb__gemm_own_dt(pools[t], C, A, packed[d], scales, dts[d], NULL, M, N, K,
                                             MMB_ACT_NONE);
                            ts[d][n[d]++] = now() - t0;
                        }
                    }
                double gf32 = 0.0;
                for (int d = 0; d < 4; d++) {
                    spread sp = spread_of(ts[d], n[d]);
                    double gf = flops / sp.med * 1e-9;
                    if (d == 0) gf32 = gf;
                    mmb__gemm_own_dt(pools[t], d ? C : C32, A, packed[d], scales, dts[d], NULL, M, N, K,
                                     MMB_ACT_NONE);
                    double bytes = (double)mmb__gemm_own_packed_bytes(N, K, dts[d]) +
                                   (dts[d] == MMB_I8 ? 4.0 * (double)mmb__gemm_own_scales_size(N) : 0.0);
                    char sh[48], g[32];
                    snprintf(sh, sizeof sh, "%lldx%lldx%lld", (long long)M, (long long)N, (long long)K);
                    snprintf(g, sizeof g, "%.1f (%2.0f%%)", gf, 100.0 * gf / peak[t]);
                    double e = d ? rel_err(C, C32, M * N) : 0.0;
                    printf("%-16s %3d  %-6s %14s %7.2fx %12.2f %10.2g\n", d ? "" : sh, thr[t], dtn[d], g,
                           gf / gf32, bytes / 1048576.0, e);
                    json_line("\"bench\": \"dtype\", \"M\": %lld, \"N\": %lld, \"K\": %lld, \"threads\": %d, "
                              "\"dtype\": \"%s\", \"gflops\": %.6g, \"gflops_min\": %.6g, \"gflops_max\": %.6g, "
                              "\"x_f32\": %.4g, \"packed_mib\": %.4g, \"rel_err_vs_f32\": %.3g",
                              (long long)M, (long long)N, (long long)K, thr[t], dtn[d], gf, flops / sp.hi * 1e-9,
                              flops / sp.lo * 1e-9, gf / gf32, bytes / 1048576.0, e);
                }
            }
        }
        free(A); free(W); free(C); free(C32); free(scales);
        for (int d = 0; d < 4; d++) free(packed[d]);
    }
    for (int t = 0; t < nt && t < 8; t++) mmb__pool_free(pools[t]);
}

/* ---- the run -------------------------------------------------------------------------------- */

#define MAXT 8
#define MAXS 12
#define MAXR 8

typedef struct {
    double gf[NB_ALL], lo[NB_ALL], hi[NB_ALL]; /* GFLOP/s: the median, the slowest and fastest sample */
    double err[NB_ALL];
} cell;

static int parse_threads(const char *s, int *out) {
    int n = 0;
    while (*s && n < MAXT) {
        char *e;
        long v = strtol(s, &e, 10);
        if (e == s || v < 1 || v > 64) return 0;
        out[n++] = (int)v;
        s = *e == ',' ? e + 1 : e;
        if (*e && *e != ',') return 0;
    }
    return n;
}

static bool setup_prob(prob *p, shape s) {
    memset(p, 0, sizeof *p);
    p->M = s.M; p->N = s.N; p->K = s.K;
    size_t mk = (size_t)(s.M * s.K), nk = (size_t)(s.N * s.K), mn = (size_t)(s.M * s.N);
    size_t psz = mmb__gemm_own_packed_size(s.N, s.K);
    p->A = malloc(mk * sizeof(float));
    p->W = malloc(nk * sizeof(float));
    p->C = malloc(mn * sizeof(float));
    p->Cown = malloc(mn * sizeof(float));
    p->packed = aligned_alloc(64, (psz * sizeof(float) + 63) / 64 * 64);
    if (!p->A || !p->W || !p->C || !p->Cown || !p->packed) return false;
    for (size_t i = 0; i < mk; i++) p->A[i] = frand();
    for (size_t i = 0; i < nk; i++) p->W[i] = frand();
    memset(p->C, 0, mn * sizeof(float));
    mmb__gemm_own_pack(p->packed, p->W, s.N, s.K);
    mmb__gemm_own(NULL, p->Cown, p->A, p->packed, NULL, s.M, s.N, s.K);
    return true;
}

static void free_prob(prob *p) {
    free(p->A); free(p->W); free(p->C); free(p->Cown); free(p->packed);
}

/* Our kernel against the double-precision oracle on a few rows: max |c - ref| / max |ref|. */
static double check_own_sample(prob *p) {
    float *row = malloc((size_t)p->N * sizeof(float));
    if (!row) return NAN;
    double worst = 0.0;
    int64_t rows[4] = {0, p->M / 3, (2 * p->M) / 3, p->M - 1};
    for (int i = 0; i < 4; i++) {
        mmb__gemm_ref(row, p->A + rows[i] * p->K, p->W, NULL, 1, p->N, p->K);
        double e = rel_err(p->Cown + rows[i] * p->N, row, p->N);
        if (!(e <= worst)) worst = e;
    }
    free(row);
    return worst;
}

/* Child mode: OpenBLAS only, one line per (shape, threads): "OB <s> <t> <gflops> <relerr> <lo> <hi>". */
static int child_main(const shape *shapes, int ns, const int *thr, int nt, int reps, int warm,
                      int rounds) {
    open_openblas();
    printf("CORE %s\n", P.ob_core ? P.ob_core() : "?");
    for (int s = 0; s < ns; s++) {
        prob p;
        if (!setup_prob(&p, shapes[s])) { free_prob(&p); return 1; }
        for (int t = 0; t < nt; t++) {
            set_threads(B_OB, thr[t]);
            double ts[512];
            int n = 0;
            for (int r = 0; r < rounds; r++) {
                if (!time_backend(B_OB, &p, reps, warm, p.C, ts, &n)) break;
                nap(0.3);
            }
            double lo = 0, hi = 0, gf = n ? median_gflops(&p, ts, n, &lo, &hi) : -1.0;
            double e = n ? rel_err(p.C, p.Cown, p.M * p.N) : 0.0;
            printf("OB %d %d %.6f %.6g %.6f %.6f\n", s, t, gf, e, lo, hi);
            fflush(stdout);
        }
        free_prob(&p);
    }
    return 0;
}

/* Runs this binary with --openblas-child and the given OpenBLAS environment (coretype NULL:
 * OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed), filling column col. */
static void run_child(const char *self, char **argv_child, const char *coretype, int col,
                      cell cells[MAXS][MAXT], char *core_out, size_t core_len) {
    size_t ne = 0;
    while (environ[ne]) ne++;
    char **envp = calloc(ne + 2, sizeof *envp);
    if (!envp) return;
    size_t k = 0;
    for (size_t i = 0; i < ne; i++) {
        if (!strncmp(environ[i], "OPENBLAS_CORETYPE=", 18)) continue;
        if (!strncmp(environ[i], "OPENBLAS_L2_SIZE=", 17)) continue;
        envp[k++] = environ[i];
    }
    static char ct[128];
    if (coretype) {
        snprintf(ct, sizeof ct, "OPENBLAS_CORETYPE=%s", coretype);
        envp[k++] = ct;
    }
    envp[k] = NULL;
    int fd[2];
    if (pipe(fd) != 0) { free(envp); return; }
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fd[1], 1);
        close(fd[0]);
        close(fd[1]);
        execve(self, argv_child, envp);
        _exit(127);
    }
    close(fd[1]);
    free(envp);
    if (pid < 0) { close(fd[0]); return; }
    FILE *f = fdopen(fd[0], "r");
    char line[512];
    while (f && fgets(line, sizeof line, f)) {
        int s, t;
        double gf, e, lo, hi;
        char core[128];
        if (sscanf(line, "OB %d %d %lf %lf %lf %lf", &s, &t, &gf, &e, &lo, &hi) == 6 && s >= 0 && s < MAXS &&
            t >= 0 && t < MAXT) {
            cells[s][t].gf[col] = gf;
            cells[s][t].err[col] = e;
            cells[s][t].lo[col] = lo;
            cells[s][t].hi[col] = hi;
        } else if (sscanf(line, "CORE %127s", core) == 1) {
            snprintf(core_out, core_len, "%s", core);
        }
    }
    if (f) fclose(f);
    else close(fd[0]);
    int st;
    waitpid(pid, &st, 0);
}

static void fmt_cell(char *buf, size_t n, double gf, double err, double peak) {
    if (gf < 0) snprintf(buf, n, "n/a");
    else snprintf(buf, n, "%.1f (%2.0f%%)%s", gf, 100.0 * gf / peak, err > 1e-4 ? "!" : "");
}

int main(int argc, char **argv) {
    int thr[MAXT] = {1, 2}, nt = 2, reps = 7, warm = 2, rounds = 1;
    bool quick = false, child = false, dtypes_only = false, with_torch = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            nt = parse_threads(argv[++i], thr);
            if (!nt) { fprintf(stderr, "bad --threads\n"); return 2; }
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
            if (reps < 1 || reps > 64) { fprintf(stderr, "--reps: 1..64\n"); return 2; }
        } else if (!strcmp(argv[i], "--rounds") && i + 1 < argc) {
            rounds = atoi(argv[++i]);
            if (rounds < 1 || rounds > MAXR) { fprintf(stderr, "--rounds: 1..8\n"); return 2; }
        } else if (!strcmp(argv[i], "--quick")) {
            quick = true;
        } else if (!strcmp(argv[i], "--dtypes")) {
            dtypes_only = true;
        } else if (!strcmp(argv[i], "--openblas-child")) {
            child = true;
        } else if (!strcmp(argv[i], "--torch")) {
            with_torch = true;
        } else if (!strcmp(argv[i], "--dir") && i + 1 < argc) {
            data_dir = argv[++i];
        } else if (!strcmp(argv[i], "--json") && i + 1 < argc) {
            if (!json_open(argv[++i])) return 2;
        } else {
            fprintf(stderr, "usage: %s [--threads 1,2] [--reps N] [--rounds R] [--quick] [--dtypes] [--torch] "
                            "[--dir D] [--json FILE]\n", argv[0]);
            return 2;
        }
    }
    /* The projector's two GEMMs, then the ViT-L/14-336 block's: qkv, out_proj, fc1, fc2; then the
     * narrow and short ones of the other connectors: a low-rank projector's 1024 -> 64 factor, a
     * resampler's 64 latents through a 1024 -> 4096 projection, and 16 rows through a 4096 x 4096
     * layer (a few visual tokens, or a decode step's batch: bandwidth-bound). */
    static const shape full[] = {{576, 4096, 1024}, {576, 4096, 4096}, {577, 3072, 1024},
                                 {577, 1024, 1024}, {577, 4096, 1024}, {577, 1024, 4096},
                                 {577, 64, 1024},   {64, 4096, 1024},  {16, 4096, 4096}};
    static const shape small[] = {{64, 256, 128}, {37, 100, 65}};
    const shape *shapes = quick ? small : full;
    int ns = quick ? 2 : 9;
    if (quick) {
        warm = 1;
        if (reps == 7) reps = 3;
    }
    if (child) return child_main(shapes, ns, thr, nt, reps, warm, rounds);

    const char *isa_name[3] = {"scalar", "avx2+fma", "avx512f"};
    printf("bench_gemm: own kernel isa %s; threads", isa_name[mmb__cpu_isa()]);
    for (int t = 0; t < nt; t++) printf(" %d", thr[t]);
    printf("; median of %d rounds x %d runs (each after %d warm-ups)\n", rounds, reps, warm);

    /* ---- peaks ---- */
    bool has512 = has_avx512f(), has256 = has_avx2_fma(), hasbf16 = has_avx512bf16();
    double psec = quick ? 0.05 : 0.25;
    printf("\nFMA peak (12 independent chains; fp32 2 flops/lane; bf16 dpbf16 4 flops/lane):\n");
    printf("  %-8s %14s %14s %14s\n", "threads", "fp32 zmm", "fp32 ymm", "bf16 zmm");
    if (!has512 && !has256) printf("  (no AVX2+FMA or AVX-512 here: fp32 ymm is the portable 4-float probe)\n");
    double pk[MAXT][3] = {{0}};
    measure_peaks(thr, nt, has512, has256, hasbf16, psec, pk);
    for (int t = 0; t < nt; t++) {
        printf("  %-8d %9.1f GF/s %9.1f GF/s ", thr[t], pk[t][0] * 1e-9, pk[t][1] * 1e-9);
        if (hasbf16) printf("%9.1f GF/s\n", pk[t][2] * 1e-9);
        else printf("%14s\n", "n/a");
    }

    /* The dtype table's shapes: the projector's and the ViT's, and a small-M projector call (16
     * tokens), where the weights' bandwidth rather than the FMAs bounds the time. */
    static const shape dt_full[] = {{576, 4096, 1024}, {576, 4096, 4096}, {577, 3072, 1024},
                                    {577, 4096, 1024}, {577, 1024, 4096}, {16, 4096, 4096}};
    const shape *dt_shapes = quick ? small : dt_full;
    int dt_ns = quick ? 2 : 6;
    if (dtypes_only) {
        double pk1[MAXT];
        for (int t = 0; t < nt; t++) pk1[t] = (pk[t][0] > pk[t][1] ? pk[t][0] : pk[t][1]) * 1e-9;
        bench_dtypes(dt_shapes, dt_ns, thr, nt, reps, rounds, pk1);
        int8_dot_probe();
        return 0;
    }

    /* ---- GEMMs ---- */
    open_peers();
    const char *env_ct = getenv("OPENBLAS_CORETYPE");
    const char *env_l2 = getenv("OPENBLAS_L2_SIZE");
    bool env_hsw = env_ct && !strcasecmp(env_ct, "haswell");
    bool env_unp = !env_ct && !env_l2;
    int main_ob_col = env_hsw ? B_OB_HSW : env_unp ? B_OB_UNP : B_OB;
    char main_core[128] = "n/a";
    if (P.ob_core) snprintf(main_core, sizeof main_core, "%s", P.ob_core());

    static cell cells[MAXS][MAXT];
    for (int s = 0; s < MAXS; s++)
        for (int t = 0; t < MAXT; t++)
            for (int b = 0; b < NB_ALL; b++) cells[s][t].gf[b] = -1.0, cells[s][t].err[b] = 0.0;
    static bool unavailable[NB_ALL];
    unavailable[B_TORCH] = unavailable[B_TORCH_C] = true;
    if (with_torch && torch_start(na_reason[B_TORCH], sizeof na_reason[B_TORCH]))
        unavailable[B_TORCH] = unavailable[B_TORCH_C] = false;
    else if (with_torch)
        snprintf(na_reason[B_TORCH_C], sizeof na_reason[B_TORCH_C], "%s", na_reason[B_TORCH]);

    double own_check[MAXS];
    mmb_pool *pools[MAXT] = {0};
    for (int t = 0; t < nt; t++)
        if (mmb__pool_new(thr[t], &pools[t]) != MMB_OK) { fprintf(stderr, "pool\n"); return 1; }
    static prob probs[MAXS];
    static char opnd[MAXS][1200]; /* the operands and our result, for the PyTorch peer */
    for (int s = 0; s < ns; s++) {
        if (!setup_prob(&probs[s], shapes[s])) { fprintf(stderr, "out of memory\n"); return 1; }
        own_check[s] = check_own_sample(&probs[s]);
        prob *p = &probs[s];
        snprintf(opnd[s], sizeof opnd[s], "%s/gemm-%lldx%lldx%lld.f32", data_dir, (long long)p->M, (long long)p->N,
                 (long long)p->K);
        const float *arr[3] = {p->A, p->W, p->Cown};
        const int64_t len[3] = {p->M * p->K, p->N * p->K, p->M * p->N};
        if (!unavailable[B_TORCH] && !write_f32(opnd[s], arr, len, 3)) {
            snprintf(na_reason[B_TORCH], sizeof na_reason[B_TORCH], "cannot write %.200s", opnd[s]);
            snprintf(na_reason[B_TORCH_C], sizeof na_reason[B_TORCH_C], "cannot write %.200s", opnd[s]);
            unavailable[B_TORCH] = unavailable[B_TORCH_C] = true;
        }
    }
    /* rounds: every backend in turn, so that a noisy spell on the machine is shared out */
    static const int timed[] = {B_OWN, B_OB, B_BLIS, B_DNNL, B_TORCH, B_TORCH_C};
    static double samples[MAXS][MAXT][NB_ALL][MAXR * 64];
    static int nsamp[MAXS][MAXT][NB_ALL];
    for (int r = 0; r < rounds; r++) {
        for (int s = 0; s < ns; s++) {
            prob *p = &probs[s];
            for (int i = 0; i < (int)(sizeof timed / sizeof timed[0]); i++) {
                int b = timed[i];
                if (unavailable[b]) continue;
                for (int t = 0; t < nt; t++) {
                    int col = b == B_OB ? main_ob_col : b;
                    if (b >= B_TORCH) {
                        char req[1400];
                        snprintf(req, sizeof req, "gemm %s %.1100s %lld %lld %lld %d %d %d", torch_mode[b], opnd[s],
                                 (long long)p->M, (long long)p->N, (long long)p->K, thr[t], reps, warm);
                        if (!torch_time(req, samples[s][t][b], &nsamp[s][t][b], MAXR * 64, &cells[s][t].err[b],
                                        na_reason[b], sizeof na_reason[b])) {
                            unavailable[b] = true;
                            break;
                        }
                        nap(0.3);
                        continue;
                    }
                    p->pool = pools[t];
                    set_threads(b, thr[t]);
                    if (!time_backend(b, p, reps, warm, p->C, samples[s][t][b], &nsamp[s][t][b])) {
                        unavailable[b] = true;
                        snprintf(na_reason[col], sizeof na_reason[col], "library not found");
                        break;
                    }
                    double e = rel_err(p->C, p->Cown, p->M * p->N);
                    if (!(e <= cells[s][t].err[col])) cells[s][t].err[col] = e;
                    nap(0.3); /* let spinning worker threads (OpenBLAS, OpenMP) go to sleep */
                }
            }
        }
    }
    for (int s = 0; s < ns; s++) {
        for (int t = 0; t < nt; t++)
            for (int i = 0; i < (int)(sizeof timed / sizeof timed[0]); i++) {
                int b = timed[i], col = b == B_OB ? main_ob_col : b;
                if (!unavailable[b] && nsamp[s][t][b])
                    cells[s][t].gf[col] = median_gflops(&probs[s], samples[s][t][b], nsamp[s][t][b],
                                                        &cells[s][t].lo[col], &cells[s][t].hi[col]);
            }
        free_prob(&probs[s]);
    }
    for (int t = 0; t < nt; t++) mmb__pool_free(pools[t]);

    /* ---- the other OpenBLAS configuration(s), in children ---- */
    char self[4096];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof self - 1);
    char hsw_core[128] = "n/a", unp_core[128] = "n/a";
    if (main_ob_col == B_OB_HSW) snprintf(hsw_core, sizeof hsw_core, "%s", main_core);
    if (main_ob_col == B_OB_UNP) snprintf(unp_core, sizeof unp_core, "%s", main_core);
    if (sl > 0 && P.ob_gemm) {
        self[sl] = '\0';
        char **av = calloc((size_t)argc + 2, sizeof *av);
        if (av) {
            for (int i = 0; i < argc; i++) av[i] = argv[i];
            av[argc] = "--openblas-child";
            av[argc + 1] = NULL;
            if (main_ob_col != B_OB_HSW)
                run_child(self, av, "Haswell", B_OB_HSW, cells, hsw_core, sizeof hsw_core);
            if (main_ob_col != B_OB_UNP)
                run_child(self, av, NULL, B_OB_UNP, cells, unp_core, sizeof unp_core);
            free(av);
        }
    }

    /* ---- peaks again (the machine may have been busy the first time); keep the best ---- */
    measure_peaks(thr, nt, has512, has256, hasbf16, psec, pk);
    double peak[MAXT];
    printf("\nFMA peak, best of the measurements before and after the GEMMs:\n");
    printf("  %-8s %14s %14s %14s\n", "threads", "fp32 zmm", "fp32 ymm", "bf16 zmm");
    if (!has512 && !has256) printf("  (no AVX2+FMA or AVX-512 here: fp32 ymm is the portable 4-float probe)\n");
    for (int t = 0; t < nt; t++) {
        printf("  %-8d %9.1f GF/s %9.1f GF/s ", thr[t], pk[t][0] * 1e-9, pk[t][1] * 1e-9);
        if (hasbf16) printf("%9.1f GF/s\n", pk[t][2] * 1e-9);
        else printf("%14s\n", "n/a");
        peak[t] = (pk[t][0] > pk[t][1] ? pk[t][0] : pk[t][1]) * 1e-9;
        if (peak[t] <= 0.0) peak[t] = 1.0; /* no vector FMA: percentages are not meaningful */
        json_line("\"bench\": \"peak\", \"threads\": %d, \"fp32_zmm\": %.6g, \"fp32_ymm\": %.6g, \"bf16_zmm\": %.6g, "
                  "\"fp32\": %.6g, \"avx512f\": %s, \"avx512_bf16\": %s", thr[t], pk[t][0] * 1e-9, pk[t][1] * 1e-9,
                  pk[t][2] * 1e-9, peak[t], has512 ? "true" : "false", hasbf16 ? "true" : "false");
    }

    /* ---- the table ---- */
    printf("\nOpenBLAS: environment OPENBLAS_CORETYPE=%s OPENBLAS_L2_SIZE=%s (core %s)\n",
           env_ct ? env_ct : "(unset)", env_l2 ? env_l2 : "(unset)", main_core);
    printf("  OB-Haswell = OPENBLAS_CORETYPE=Haswell (core %s); OB-unpinned = both unset (core %s)\n",
           hsw_core, unp_core);
    printf("GFLOP/s (%% of the measured fp32 peak at that thread count); ! = result disagrees "
           "with ours (max rel err > 1e-4)\n\n");
    bool show_env = main_ob_col == B_OB;
    printf("%-16s %3s  %-14s", "M x N x K", "thr", "own");
    if (show_env) printf(" %-14s", "OB-env");
    printf(" %-14s %-14s %-14s %-14s", "OB-Haswell", "OB-unpinned", "BLIS", "oneDNN");
    if (with_torch) printf(" %-14s %-14s", "torch", "torch.compile");
    printf("\n");
    static const int order[] = {B_OWN, B_OB, B_OB_HSW, B_OB_UNP, B_BLIS, B_DNNL, B_TORCH, B_TORCH_C};
    static const char *names[NB_ALL] = {"own", "OB-env", "BLIS", "oneDNN", "OB-Haswell",
                                        "OB-unpinned", "torch", "torch.compile"};
    const char *core_of[NB_ALL] = {[B_OB] = main_core, [B_OB_HSW] = hsw_core, [B_OB_UNP] = unp_core};
    for (int s = 0; s < ns; s++) {
        for (int t = 0; t < nt; t++) {
            char sh[48];
            snprintf(sh, sizeof sh, "%lldx%lldx%lld", (long long)shapes[s].M,
                     (long long)shapes[s].N, (long long)shapes[s].K);
            printf("%-16s %3d ", sh, thr[t]);
            int best = -1;
            for (int o = 0; o < (with_torch ? 8 : 6); o++) {
                int b = order[o];
                if (b == B_OB && !show_env) continue;
                char c[48];
                fmt_cell(c, sizeof c, cells[s][t].gf[b], cells[s][t].err[b], peak[t]);
                printf(" %-14s", c);
                cell *ce = &cells[s][t];
                if (ce->gf[b] < 0)
                    json_line("\"bench\": \"gemm\", \"M\": %lld, \"N\": %lld, \"K\": %lld, \"threads\": %d, "
                              "\"impl\": \"%s\", \"error\": \"%s\"", (long long)shapes[s].M, (long long)shapes[s].N,
                              (long long)shapes[s].K, thr[t], names[b], na_reason[b][0] ? na_reason[b] : "not measured");
                else
                    json_line("\"bench\": \"gemm\", \"M\": %lld, \"N\": %lld, \"K\": %lld, \"threads\": %d, "
                              "\"impl\": \"%s\", \"peer\": \"%s\", \"core\": \"%s\", \"gflops\": %.6g, "
                              "\"gflops_min\": %.6g, \"gflops_max\": %.6g, \"err\": %.3g",
                              (long long)shapes[s].M, (long long)shapes[s].N, (long long)shapes[s].K, thr[t], names[b],
                              b >= B_TORCH ? torch_name : "", core_of[b] ? core_of[b] : "", ce->gf[b], ce->lo[b],
                              ce->hi[b], ce->err[b]);
                if (cells[s][t].gf[b] > 0 && cells[s][t].err[b] <= 1e-4 &&
                    (best < 0 || cells[s][t].gf[b] > cells[s][t].gf[best]))
                    best = b;
            }
            printf("  fastest: %s\n", best >= 0 ? names[best] : "-");
        }
    }
    bench_attention(thr, nt, quick ? 1 : reps, quick ? 1 : rounds, peak);
    peer_stop(&torch_peer);
    bench_dtypes(dt_shapes, dt_ns, thr, nt, reps, rounds, peak);
    int8_dot_probe();
    printf("\nown vs double-precision oracle on sampled rows (max rel err):");
    for (int s = 0; s < ns; s++) {
        printf(" %.2g", own_check[s]);
        json_line("\"bench\": \"own_check\", \"M\": %lld, \"N\": %lld, \"K\": %lld, \"rel_err_vs_f64\": %.3g",
                  (long long)shapes[s].M, (long long)shapes[s].N, (long long)shapes[s].K, own_check[s]);
    }
    printf("\n");
    for (int s = 0; s < ns; s++)
        for (int t = 0; t < nt; t++)
            for (int b = 0; b < NB_ALL; b++)
                if (cells[s][t].gf[b] > 0 && cells[s][t].err[b] > 1e-4)
                    printf("INCORRECT: %s on shape %d threads %d: max rel err %.3g\n", names[b],
                           s, thr[t], cells[s][t].err[b]);
    return 0;
}
