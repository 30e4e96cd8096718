/* Shared by the benchmarks: a monotonic clock, medians, the machine's FMA peak measured with a
 * short calibrated loop, peak RSS, and running a Python peer that prints JSON lines.
 * The peak probes use x86 intrinsics where the target is x86 (BENCH_X86); elsewhere a portable
 * probe (GCC vector extensions) stands in, so the benchmarks build and run on any target. */
#ifndef MMB_BENCH_COMMON_H
#define MMB_BENCH_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define BENCH_X86 1
#include <immintrin.h>
#else
#define BENCH_X86 0
#endif

static inline double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static inline void nap(double s) {
    struct timespec t = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {}
}

/* ---- FMA peak ------------------------------------------------------------------------------- */

typedef double (*peak_fn)(long iters); /* returns a value derived from the result (kept alive) */

#define CH12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

/* What the CPU can run of the x86 probes below (all false off x86). */
static inline bool has_avx512f(void) {
#if BENCH_X86
    return __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
}
static inline bool has_avx2_fma(void) {
#if BENCH_X86
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
}
static inline bool has_avx512bf16(void) {
#if BENCH_X86
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
}

/* The portable probe, for a CPU without AVX2+FMA or AVX-512 (any non-x86 target): 12 chains of
 * 4-float vectors; the build's -ffp-contract=fast makes each c * x + y one FMA where the target has
 * one (NEON fmla). 12 x 4 x 2 flops per iteration. */
#define PEAK_PORTABLE_FLOPS (12.0 * 4.0 * 2.0)
typedef float bench_v4f __attribute__((vector_size(16)));
__attribute__((noinline, unused)) static double peak_portable(long n) {
#define IPV(i) bench_v4f c##i = {0.01f * (float)(i + 1), 0.01f * (float)(i + 1), 0.01f * (float)(i + 1), \
                                 0.01f * (float)(i + 1)};
#define UPV(i) c##i = c##i * x + y;
#define RPV(i) s += c##i;
    CH12(IPV)
    bench_v4f x = {0.9999999f, 0.9999999f, 0.9999999f, 0.9999999f}, y = {1e-7f, 1e-7f, 1e-7f, 1e-7f};
    for (long i = 0; i < n; i++) { CH12(UPV) }
    bench_v4f s = {0};
    CH12(RPV)
    return (double)(s[0] + s[3]);
}

#if BENCH_X86
__attribute__((target("avx512f,fma"), noinline, unused)) static double peak512(long n) {
#define I512(i) __m512 c##i = _mm512_set1_ps(0.01f * (float)(i + 1));
#define U512(i) c##i = _mm512_fmadd_ps(c##i, x, y);
#define R512(i) s = _mm512_add_ps(s, c##i);
    CH12(I512)
    __m512 x = _mm512_set1_ps(0.9999999f), y = _mm512_set1_ps(1e-7f);
    for (long i = 0; i < n; i++) { CH12(U512) }
    __m512 s = _mm512_setzero_ps();
    CH12(R512)
    return (double)_mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"), noinline, unused)) static double peak256(long n) {
#define I256(i) __m256 c##i = _mm256_set1_ps(0.01f * (float)(i + 1));
#define U256(i) c##i = _mm256_fmadd_ps(c##i, x, y);
#define R256(i) s = _mm256_add_ps(s, c##i);
    CH12(I256)
    __m256 x = _mm256_set1_ps(0.9999999f), y = _mm256_set1_ps(1e-7f);
    for (long i = 0; i < n; i++) { CH12(U256) }
    __m256 s = _mm256_setzero_ps();
    CH12(R256)
    float o[8];
    _mm256_storeu_ps(o, s);
    return (double)(o[0] + o[7]);
}

__attribute__((target("avx512f,avx512bf16"), noinline, unused)) static double peakbf16(long n) {
#define IBF(i) __m512 c##i = _mm512_set1_ps(0.01f * (float)(i + 1));
#define UBF(i) c##i = _mm512_dpbf16_ps(c##i, a, b);
#define RBF(i) s = _mm512_add_ps(s, c##i);
    CH12(IBF)
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x33d633d6); /* bf16 ~1e-7 pairs */
    __m512bh b = (__m512bh)_mm512_set1_epi32(0x3f803f80); /* bf16 1.0 pairs */
    for (long i = 0; i < n; i++) {
        CH12(UBF)
        __asm__ volatile("" : "+v"(a));
    }
    __m512 s = _mm512_setzero_ps();
    CH12(RBF)
    return (double)_mm512_reduce_add_ps(s);
}
#endif /* BENCH_X86 */

typedef struct {
    peak_fn fn;
    long iters;
    pthread_barrier_t *bar;
    double t, sink;
} peak_arg;

static inline void *peak_thread(void *va) {
    peak_arg *p = va;
    pthread_barrier_wait(p->bar);
    double t0 = now();
    p->sink = p->fn(p->iters);
    p->t = now() - t0;
    return NULL;
}

/* Flops/s of fn on nth threads together: best of 3 runs of ~0.25 s (iteration count calibrated
 * on one thread first). flops_per_iter counts one loop iteration of one thread. */
static inline double measure_peak(peak_fn fn, double flops_per_iter, int nth, double seconds) {
    long n = 1 << 16;
    for (;;) {
        double t0 = now();
        volatile double v = fn(n);
        (void)v;
        double t = now() - t0;
        if (t > 0.02) { n = (long)((double)n * seconds / t) + 1; break; }
        n *= 4;
    }
    double best = 0.0;
    for (int r = 0; r < 3; r++) {
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, (unsigned)nth);
        peak_arg args[64];
        pthread_t th[64];
        for (int i = 0; i < nth; i++) args[i] = (peak_arg){fn, n, &bar, 0.0, 0.0};
        for (int i = 1; i < nth; i++) pthread_create(&th[i], NULL, peak_thread, &args[i]);
        peak_thread(&args[0]);
        double tmax = args[0].t;
        for (int i = 1; i < nth; i++) {
            pthread_join(th[i], NULL);
            if (args[i].t > tmax) tmax = args[i].t;
        }
        pthread_barrier_destroy(&bar);
        double f = flops_per_iter * (double)n * nth / tmax;
        if (f > best) best = f;
    }
    return best;
}

/* Best fp32 zmm, fp32 ymm and bf16 peaks (flop/s) per thread count, kept in pk (max with what is
 * there already, so a second call after the GEMMs can only raise them). Without either fp32 x86
 * probe the ymm slot holds the portable probe's figure instead. */
static inline void measure_peaks(const int *thr, int nt, bool has512, bool has256, bool hasbf16,
                          double psec, double pk[][3]) {
    for (int t = 0; t < nt; t++) {
        double v[3] = {0.0, 0.0, 0.0};
#if BENCH_X86
        if (has512) v[0] = measure_peak(peak512, 12.0 * 32.0, thr[t], psec);
        if (has256) v[1] = measure_peak(peak256, 12.0 * 16.0, thr[t], psec);
        if (hasbf16) v[2] = measure_peak(peakbf16, 12.0 * 64.0, thr[t], psec);
#else
        (void)has512, (void)has256, (void)hasbf16;
#endif
        if (!has512 && !has256) v[1] = measure_peak(peak_portable, PEAK_PORTABLE_FLOPS, thr[t], psec);
        for (int i = 0; i < 3; i++)
            if (v[i] > pk[t][i]) pk[t][i] = v[i];
    }
}

static inline int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of n values (sorts them in place). */
static inline double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Peak resident set of this process so far, MiB. */
static inline double peak_rss_mib(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss / 1024.0;
}

/* The machine's fp32 FMA peak (flop/s) on nth threads: the better of the 512- and 256-bit loops,
 * or the portable probe's where neither runs. */
static inline double fp32_peak(int nth) {
    double pk[1][3] = {{0.0, 0.0, 0.0}};
#if BENCH_X86
    __builtin_cpu_init();
#endif
    measure_peaks(&nth, 1, has_avx512f(), has_avx2_fma(), false, 0.25, pk);
    return pk[0][0] > pk[0][1] ? pk[0][0] : pk[0][1];
}

/* Parses "1,2,4" into out (at most cap values); returns how many. */
static inline int parse_list(const char *s, int *out, int cap) {
    int n = 0;
    for (const char *p = s; *p && n < cap;) {
        out[n++] = atoi(p);
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    return n;
}

/* Whether the comma-separated list names word. */
static inline bool list_has(const char *list, const char *word) {
    size_t n = strlen(word);
    for (const char *p = list; *p;) {
        size_t len = strcspn(p, ",");
        if (len == n && !strncmp(p, word, n)) return true;
        p += len + (p[len] == ',');
    }
    return false;
}

/* Runs `cmd` (a Python peer), returning its stdout (malloc'd, NUL-terminated) or NULL. */
static inline char *run_peer(const char *cmd) {
    FILE *p = popen(cmd, "r");
    if (!p) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    for (size_t r; buf && (r = fread(buf + len, 1, cap - len - 1, p)) > 0;) {
        len += r;
        if (cap - len < 2) { char *nb = realloc(buf, cap *= 2); if (!nb) { free(buf); buf = NULL; } else buf = nb; }
    }
    int rc = pclose(p);
    if (buf) buf[len] = 0;
    if (rc != 0) { free(buf); return NULL; }
    return buf;
}

/* ---- machine-readable output: --json FILE -------------------------------------------------- */

/* Where the benchmarks write one JSON object per line (--json FILE), or NULL: the human tables on
 * stdout are printed either way. */
static FILE *bench_json;

static inline bool json_open(const char *path) {
    bench_json = fopen(path, "w");
    if (!bench_json) fprintf(stderr, "cannot write %s: %s\n", path, strerror(errno));
    return bench_json != NULL;
}

/* One JSON object: fmt gives its members without the braces. */
__attribute__((format(printf, 1, 2))) static inline void json_line(const char *fmt, ...) {
    if (!bench_json) return;
    va_list ap;
    va_start(ap, fmt);
    fputc('{', bench_json);
    vfprintf(bench_json, fmt, ap);
    fputs("}\n", bench_json);
    fflush(bench_json);
    va_end(ap);
}

/* Median, minimum and maximum of n samples (sorts them in place); zeros when n is 0. */
typedef struct {
    double med, lo, hi;
} spread;

static inline spread spread_of(double *v, int n) {
    if (n < 1) return (spread){0, 0, 0};
    double med = median(v, n);
    return (spread){med, v[0], v[n - 1]};
}

/* ---- a peer kept running: one request line in, one JSON line out --------------------------- */

typedef struct {
    FILE *to, *from;
    pid_t pid;
} peer_proc;

/* Starts `sh -c cmd` with pipes on its stdin and stdout; peer_hello then reads its first line. False
 * if it could not start. */
static inline bool peer_start(peer_proc *p, const char *cmd) {
    int in[2], out[2];
    *p = (peer_proc){NULL, NULL, -1};
    signal(SIGPIPE, SIG_IGN); /* a peer that dies makes peer_ask fail, not the benchmark */
    if (pipe(in) != 0) return false;
    if (pipe(out) != 0) { close(in[0]); close(in[1]); return false; }
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(in[0], 0);
        dup2(out[1], 1);
        close(in[0]); close(in[1]); close(out[0]); close(out[1]);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    close(in[0]);
    close(out[1]);
    if (pid < 0) { close(in[1]); close(out[0]); return false; }
    /* our ends must not leak into later peers, or closing them would not end this one */
    fcntl(in[1], F_SETFD, FD_CLOEXEC);
    fcntl(out[0], F_SETFD, FD_CLOEXEC);
    p->pid = pid;
    p->to = fdopen(in[1], "w");
    p->from = fdopen(out[0], "r");
    return p->to && p->from;
}

/* The peer's first line (its name once it is ready, or an error) into first; false if it exited
 * first. Peers started one after another load at the same time, and this waits for each. */
static inline bool peer_hello(peer_proc *p, char *first, size_t cap) {
    if (p->from && fgets(first, (int)cap, p->from)) return true;
    snprintf(first, cap, "{\"error\": \"the peer exited before it was ready (run its command to see why)\"}");
    return false;
}

/* Sends one request line, reads the answer line into buf. False when the peer has gone. */
__attribute__((format(printf, 4, 5))) static inline bool peer_ask(peer_proc *p, char *buf, size_t cap,
                                                                  const char *fmt, ...) {
    if (!p->to || !p->from) return false;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(p->to, fmt, ap);
    va_end(ap);
    fputc('\n', p->to);
    fflush(p->to);
    return fgets(buf, (int)cap, p->from) != NULL;
}

static inline void peer_stop(peer_proc *p) {
    if (p->to) fclose(p->to);
    if (p->from) fclose(p->from);
    if (p->pid > 0) waitpid(p->pid, NULL, 0);
    *p = (peer_proc){NULL, NULL, -1};
}

/* ---- a peer taking turns with mmbridge, one timed run per repetition ------------------------ */

typedef struct {
    peer_proc proc;
    char name[64], why[512]; /* why: the reason it is n/a; empty while it works */
    double ts[64], rss;      /* this batch's timings (seconds per call) and the peer's peak RSS, MiB */
    int n;
} timed_peer;

static inline bool json_str(const char *line, const char *key, char *out, size_t cap);
static inline int json_nums(const char *line, const char *key, double *v, int cap);
static inline double json_num(const char *line, const char *key);

/* Starts `cmd`, a peer answering `run BATCH REPS WARM` (bench/peer_common.py serve); timed_peer_ready
 * waits until it has loaded. */
static inline void timed_peer_start(timed_peer *tp, const char *cmd) {
    memset(tp, 0, sizeof *tp);
    if (!peer_start(&tp->proc, cmd)) snprintf(tp->why, sizeof tp->why, "could not start %.200s", cmd);
}

static inline void timed_peer_ready(timed_peer *tp) {
    char line[1024];
    if (tp->why[0]) return;
    if (!peer_hello(&tp->proc, line, sizeof line) || !json_str(line, "peer", tp->name, sizeof tp->name)) {
        if (!json_str(line, "error", tp->why, sizeof tp->why)) snprintf(tp->why, sizeof tp->why, "did not start");
        peer_stop(&tp->proc);
    }
}

/* One run of the peer on batch images: timed (appended to ts) or a warm-up. It naps 0.3 s first, so
 * that neither side's worker threads are still spinning when the other starts. */
static inline void timed_peer_run(timed_peer *tp, int batch, bool timed) {
    char line[4096];
    if (tp->why[0]) return;
    nap(0.3);
    if (!peer_ask(&tp->proc, line, sizeof line, "run %d %d %d", batch, timed, !timed)) {
        snprintf(tp->why, sizeof tp->why, "the peer exited");
    } else if (!json_str(line, "error", tp->why, sizeof tp->why)) {
        if (timed && tp->n < 64 && json_nums(line, "times", tp->ts + tp->n, 1) == 1) tp->n++;
        tp->rss = json_num(line, "peak_rss_mib");
        return;
    }
    peer_stop(&tp->proc);
}

/* The numbers of the JSON array "key": [...] in line into v (at most cap); returns how many, or -1
 * if the key is absent. */
static inline int json_nums(const char *line, const char *key, double *v, int cap) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": [", key);
    const char *p = strstr(line, pat);
    if (!p) return -1;
    p += strlen(pat);
    int n = 0;
    while (n < cap) {
        char *e;
        double x = strtod(p, &e);
        if (e == p) break;
        v[n++] = x;
        p = e;
        while (*p == ',' || *p == ' ') p++;
    }
    return n;
}

/* The string "key": "..." in line into out (JSON escapes kept as they are); false if absent. */
static inline bool json_str(const char *line, const char *key, char *out, size_t cap) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": \"", key);
    const char *p = strstr(line, pat);
    if (!p || !cap) return false;
    p += strlen(pat);
    size_t n = 0;
    for (; *p && *p != '"' && n + 1 < cap; p++) {
        if (*p == '\\' && p[1]) out[n++] = *p++;
        if (n + 1 < cap) out[n++] = *p;
    }
    out[n] = 0;
    return true;
}

/* The number after "key": in a JSON line, or -1. */
static inline double json_num(const char *line, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(line, pat);
    return p ? strtod(p + strlen(pat), NULL) : -1.0;
}

#endif
