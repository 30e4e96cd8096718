/* GEMM benchmark: mmbridge's own kernel against OpenBLAS, BLIS and oneDNN, all in one run.
 *
 *   bench_gemm [--threads 1,2] [--reps N] [--quick] [--dtypes]
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
 * Every peer's result is compared with ours: max |c - c_own| / max |c_own| above 1e-4 marks it
 * incorrect ("!"). Ours is checked against the double-precision oracle on a sample of rows. */
#include "bench_common.h"
#include "bench_peers.h"
#include "internal.h"

#include <dlfcn.h>
#include <errno.h>
#include <immintrin.h>
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

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
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

/* GFLOP/s of the median of n timings. */
static double median_gflops(const prob *p, double *ts, int n) {
    qsort(ts, (size_t)n, sizeof ts[0], cmp_d);
    double med = n % 2 ? ts[n / 2] : 0.5 * (ts[n / 2 - 1] + ts[n / 2]);
    return 2.0 * (double)p->M * (double)p->N * (double)p->K / med * 1e-9;
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
 * thread count: median of rounds x reps after a warm-up, against the peak at that count. */
static void bench_attention(const int *thr, int nt, int reps, int rounds, const double *peak) {
    const int64_t T = 577, H = 16, hd = 64, D = H * hd;
    double flops = 4.0 * (double)T * (double)T * (double)D;
    float *qkv = malloc(sizeof(float) * (size_t)(T * 3 * D)), *out = malloc(sizeof(float) * (size_t)(T * D));
    if (!qkv || !out) { free(qkv); free(out); return; }
    for (int64_t i = 0; i < T * 3 * D; i++) qkv[i] = frand();
    printf("\nattention (blocked, online softmax, on the GEMM micro-kernel): %lld tokens x %lld heads x %lld\n",
           (long long)T, (long long)H, (long long)hd);
    for (int t = 0; t < nt; t++) {
        mmb_ctx_params cp = mmb_ctx_default_params();
        cp.n_threads = thr[t];
        mmb_ctx *ctx = NULL;
        float *sc = malloc(sizeof(float) * mmb__attention_scratch(thr[t], hd));
        if (!sc || mmb_ctx_new(&cp, &ctx) != MMB_OK) { free(sc); break; }
        double ts[512];
        int n = 0;
        mmb__attention_forward(ctx, out, qkv, 1, T, H, hd, sc);
        for (int r = 0; r < rounds * reps && n < 512; r++) {
            double t0 = now();
            mmb__attention_forward(ctx, out, qkv, 1, T, H, hd, sc);
            ts[n++] = now() - t0;
        }
        qsort(ts, (size_t)n, sizeof ts[0], cmp_d);
        double gf = flops / ts[n / 2] * 1e-9;
        printf("  %d thread%s: %8.2f ms %7.1f GFLOP/s (%4.1f%% of peak)\n", thr[t], thr[t] > 1 ? "s" : " ",
               ts[n / 2] * 1e3, gf, 100.0 * gf / peak[t]);
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

static void int8_dot_probe(void) {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return;
    double f = measure_peak(body_f32, 12.0 * 16.0, 1, 0.25);
    double u = measure_peak(body_i8_u7, 12.0 * 64.0, 1, 0.25);
    double g = measure_peak(body_i8_s8, 12.0 * 64.0, 1, 0.25);
    printf("\nint8 dot products on AVX2 (not used by any kernel yet; 1 thread, 6x16 micro-kernel body):\n"
           "  fp32 FMA %.1f GFLOP/s; vpmaddubsw+vpmaddwd+vpaddd %.1f (%.2fx; activations < 128 unsigned);\n"
           "  with vpabsb+vpsignb for signed 8-bit activations %.1f (%.2fx)\n", f * 1e-9, u * 1e-9, u / f,
           g * 1e-9, g / f);
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
                    qsort(ts[d], (size_t)n[d], sizeof ts[d][0], cmp_d);
                    double med = n[d] % 2 ? ts[d][n[d] / 2] : 0.5 * (ts[d][n[d] / 2 - 1] + ts[d][n[d] / 2]);
                    double gf = flops / med * 1e-9;
                    if (d == 0) gf32 = gf;
                    mmb__gemm_own_dt(pools[t], d ? C : C32, A, packed[d], scales, dts[d], NULL, M, N, K,
                                     MMB_ACT_NONE);
                    double bytes = (double)mmb__gemm_own_packed_bytes(N, K, dts[d]) +
                                   (dts[d] == MMB_I8 ? 4.0 * (double)mmb__gemm_own_scales_size(N) : 0.0);
                    char sh[48], g[32];
                    snprintf(sh, sizeof sh, "%lldx%lldx%lld", (long long)M, (long long)N, (long long)K);
                    snprintf(g, sizeof g, "%.1f (%2.0f%%)", gf, 100.0 * gf / peak[t]);
                    printf("%-16s %3d  %-6s %14s %7.2fx %12.2f %10.2g\n", d ? "" : sh, thr[t], dtn[d], g,
                           gf / gf32, bytes / 1048576.0, d ? rel_err(C, C32, M * N) : 0.0);
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
#define MAXS 8
#define MAXR 8

typedef struct {
    double gf[NB_];
    double err[NB_];
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

/* Child mode: OpenBLAS only, one line per (shape, threads): "OB <s> <t> <gflops> <relerr>". */
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
            double gf = n ? median_gflops(&p, ts, n) : -1.0;
            double e = n ? rel_err(p.C, p.Cown, p.M * p.N) : 0.0;
            printf("OB %d %d %.6f %.6g\n", s, t, gf, e);
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
        double gf, e;
        char core[128];
        if (sscanf(line, "OB %d %d %lf %lf", &s, &t, &gf, &e) == 4 && s >= 0 && s < MAXS &&
            t >= 0 && t < MAXT) {
            cells[s][t].gf[col] = gf;
            cells[s][t].err[col] = e;
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
    bool quick = false, child = false, dtypes_only = false;
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
        } else {
            fprintf(stderr, "usage: %s [--threads 1,2] [--reps N] [--rounds R] [--quick] [--dtypes]\n", argv[0]);
            return 2;
        }
    }
    /* The projector's two GEMMs, then the ViT-L/14-336 block's: qkv, out_proj, fc1, fc2. */
    static const shape full[] = {{576, 4096, 1024}, {576, 4096, 4096}, {577, 3072, 1024},
                                 {577, 1024, 1024}, {577, 4096, 1024}, {577, 1024, 4096}};
    static const shape small[] = {{64, 256, 128}, {37, 100, 65}};
    const shape *shapes = quick ? small : full;
    int ns = quick ? 2 : 6;
    if (quick) {
        warm = 1;
        if (reps == 7) reps = 3;
    }
    if (child) return child_main(shapes, ns, thr, nt, reps, warm, rounds);

    const char *isa_name[3] = {"scalar", "avx2+fma", "avx512f"};
    printf("bench_gemm: own kernel isa %s; threads", isa_name[mmb__gemm_own_isa()]);
    for (int t = 0; t < nt; t++) printf(" %d", thr[t]);
    printf("; median of %d rounds x %d runs (each after %d warm-ups)\n", rounds, reps, warm);

    /* ---- peaks ---- */
    bool has512 = __builtin_cpu_supports("avx512f");
    bool has256 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    bool hasbf16 = has512 && __builtin_cpu_supports("avx512bf16");
    double psec = quick ? 0.05 : 0.25;
    printf("\nFMA peak (12 independent chains; fp32 2 flops/lane; bf16 dpbf16 4 flops/lane):\n");
    printf("  %-8s %14s %14s %14s\n", "threads", "fp32 zmm", "fp32 ymm", "bf16 zmm");
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
            for (int b = 0; b < NB_; b++) cells[s][t].gf[b] = -1.0, cells[s][t].err[b] = 0.0;

    double own_check[MAXS];
    mmb_pool *pools[MAXT] = {0};
    for (int t = 0; t < nt; t++)
        if (mmb__pool_new(thr[t], &pools[t]) != MMB_OK) { fprintf(stderr, "pool\n"); return 1; }
    static prob probs[MAXS];
    for (int s = 0; s < ns; s++) {
        if (!setup_prob(&probs[s], shapes[s])) { fprintf(stderr, "out of memory\n"); return 1; }
        own_check[s] = check_own_sample(&probs[s]);
    }
    /* rounds: every backend in turn, so that a noisy spell on the machine is shared out */
    static double samples[MAXS][MAXT][B_DNNL + 1][MAXR * 64];
    static int nsamp[MAXS][MAXT][B_DNNL + 1];
    static bool unavailable[B_DNNL + 1];
    for (int r = 0; r < rounds; r++) {
        for (int s = 0; s < ns; s++) {
            prob *p = &probs[s];
            for (int b = B_OWN; b <= B_DNNL; b++) {
                if (unavailable[b]) continue;
                for (int t = 0; t < nt; t++) {
                    p->pool = pools[t];
                    set_threads(b, thr[t]);
                    if (!time_backend(b, p, reps, warm, p->C, samples[s][t][b], &nsamp[s][t][b])) {
                        unavailable[b] = true;
                        break;
                    }
                    int col = b == B_OB ? main_ob_col : b;
                    double e = rel_err(p->C, p->Cown, p->M * p->N);
                    if (!(e <= cells[s][t].err[col])) cells[s][t].err[col] = e;
                    nap(0.3); /* let spinning worker threads (OpenBLAS, OpenMP) go to sleep */
                }
            }
        }
    }
    for (int s = 0; s < ns; s++) {
        for (int t = 0; t < nt; t++)
            for (int b = B_OWN; b <= B_DNNL; b++) {
                int col = b == B_OB ? main_ob_col : b;
                if (!unavailable[b] && nsamp[s][t][b])
                    cells[s][t].gf[col] = median_gflops(&probs[s], samples[s][t][b], nsamp[s][t][b]);
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
    for (int t = 0; t < nt; t++) {
        printf("  %-8d %9.1f GF/s %9.1f GF/s ", thr[t], pk[t][0] * 1e-9, pk[t][1] * 1e-9);
        if (hasbf16) printf("%9.1f GF/s\n", pk[t][2] * 1e-9);
        else printf("%14s\n", "n/a");
        peak[t] = (pk[t][0] > pk[t][1] ? pk[t][0] : pk[t][1]) * 1e-9;
        if (peak[t] <= 0.0) peak[t] = 1.0; /* no vector FMA: percentages are not meaningful */
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
    printf(" %-14s %-14s %-14s %-14s\n", "OB-Haswell", "OB-unpinned", "BLIS", "oneDNN");
    static const int order[] = {B_OWN, B_OB, B_OB_HSW, B_OB_UNP, B_BLIS, B_DNNL};
    static const char *names[NB_] = {"own", "OB-env", "BLIS", "oneDNN", "OB-Haswell",
                                     "OB-unpinned"};
    for (int s = 0; s < ns; s++) {
        for (int t = 0; t < nt; t++) {
            char sh[48];
            snprintf(sh, sizeof sh, "%lldx%lldx%lld", (long long)shapes[s].M,
                     (long long)shapes[s].N, (long long)shapes[s].K);
            printf("%-16s %3d ", sh, thr[t]);
            int best = -1;
            for (int o = 0; o < 6; o++) {
                int b = order[o];
                if (b == B_OB && !show_env) continue;
                char c[48];
                fmt_cell(c, sizeof c, cells[s][t].gf[b], cells[s][t].err[b], peak[t]);
                printf(" %-14s", c);
                if (cells[s][t].gf[b] > 0 && cells[s][t].err[b] <= 1e-4 &&
                    (best < 0 || cells[s][t].gf[b] > cells[s][t].gf[best]))
                    best = b;
            }
            printf("  fastest: %s\n", best >= 0 ? names[best] : "-");
        }
    }
    bench_attention(thr, nt, quick ? 1 : reps, quick ? 1 : rounds, peak);
    bench_dtypes(dt_shapes, dt_ns, thr, nt, reps, rounds, peak);
    int8_dot_probe();
    printf("\nown vs double-precision oracle on sampled rows (max rel err):");
    for (int s = 0; s < ns; s++) printf(" %.2g", own_check[s]);
    printf("\n");
    for (int s = 0; s < ns; s++)
        for (int t = 0; t < nt; t++)
            for (int b = 0; b < NB_; b++)
                if (cells[s][t].gf[b] > 0 && cells[s][t].err[b] > 1e-4)
                    printf("INCORRECT: %s on shape %d threads %d: max rel err %.3g\n", names[b],
                           s, thr[t], cells[s][t].err[b]);
    return 0;
}
