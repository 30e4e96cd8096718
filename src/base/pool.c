/* A fixed thread pool: the caller is thread 0, workers 1..n-1 wait on a generation counter.
 *
 * Waiting spins for a short while (SPIN_NS) before it sleeps on the condition variable, on both
 * sides: workers for the next job, the caller for the workers to finish. A run is a few microseconds
 * to a few milliseconds (one GEMM, one LayerNorm, one decode-step product), and a condition-variable
 * wake-up costs tens of microseconds each way: at 2 threads a 577x64x1024 GEMM (0.5 ms) ran at 139
 * GFLOP/s with sleeping waits, below its 1-thread rate x 2 (docs/decisions.md). The counters are
 * read with atomics while spinning and changed under the mutex, so a sleeper never misses a
 * change. */
#include "base/base.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

#define SPIN_NS 200000 /* 0.2 ms */

struct mmb_pool {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    uint64_t generation;   /* bumped by each run */
    uint64_t pending;      /* workers still running the current job */
    bool quit;
    mmb_pool_fn fn;
    void *arg;
    void **scratch;        /* per thread, kept from run to run (mmb__pool_scratch) */
    size_t *scratch_cap;
};

typedef struct { mmb_pool *p; int tid; } worker_arg;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Spins until (*v == x) == equal (returns true) or SPIN_NS pass (false). */
static bool spin_until(const uint64_t *v, uint64_t x, bool equal) {
    int64_t end = now_ns() + SPIN_NS;
    for (int i = 0;; i++) {
        if ((__atomic_load_n(v, __ATOMIC_ACQUIRE) == x) == equal) return true;
        if ((i & 63) == 63 && now_ns() > end) return false;
        cpu_relax();
    }
}

static void *worker(void *va) {
    worker_arg *w = va;
    mmb_pool *p = w->p;
    int tid = w->tid;
    free(w);
    uint64_t seen = 0;
    for (;;) {
        spin_until(&p->generation, seen, false);
        pthread_mutex_lock(&p->mu);
        while (__atomic_load_n(&p->generation, __ATOMIC_RELAXED) == seen && !p->quit)
            pthread_cond_wait(&p->go, &p->mu);
        if (p->quit) { pthread_mutex_unlock(&p->mu); return NULL; }
        seen = p->generation;
        mmb_pool_fn fn = p->fn;
        void *arg = p->arg;
        pthread_mutex_unlock(&p->mu);
        fn(arg, tid, p->n);
        pthread_mutex_lock(&p->mu);
        if (__atomic_sub_fetch(&p->pending, 1, __ATOMIC_RELEASE) == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->mu);
    }
}

mmb_status mmb__pool_new(int n, mmb_pool **out) {
    if (n < 1) n = 1;
    mmb_pool *p = calloc(1, sizeof *p);
    if (!p) return MMB_ERR_NOMEM;
    p->n = n;
    p->threads = calloc((size_t)n, sizeof *p->threads);
    p->scratch = calloc((size_t)n, sizeof *p->scratch);
    p->scratch_cap = calloc((size_t)n, sizeof *p->scratch_cap);
    if (!p->threads || !p->scratch || !p->scratch_cap) {
        free(p->threads); free(p->scratch); free(p->scratch_cap); free(p);
        return MMB_ERR_NOMEM;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int i = 1; i < n; i++) {
        worker_arg *w = malloc(sizeof *w);
        if (w) *w = (worker_arg){p, i};
        if (!w || pthread_create(&p->threads[i], NULL, worker, w) != 0) {
            free(w);
            p->n = i; /* only workers 1..i-1 exist */
            mmb__pool_free(p);
            return MMB_ERR_NOMEM;
        }
    }
    *out = p;
    return MMB_OK;
}

void mmb__pool_free(mmb_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->quit = true;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
    free(p->threads);
    for (int i = 0; i < p->n; i++) free(p->scratch[i]);
    free(p->scratch);
    free(p->scratch_cap);
    free(p);
}

void *mmb__pool_scratch(mmb_pool *p, int tid, size_t bytes) {
    if (!p || tid < 0 || tid >= p->n) return NULL;
    bytes = (bytes + 63) & ~(size_t)63;
    if (bytes > p->scratch_cap[tid]) {
        free(p->scratch[tid]);
        p->scratch[tid] = aligned_alloc(64, bytes);
        p->scratch_cap[tid] = p->scratch[tid] ? bytes : 0;
    }
    return p->scratch[tid];
}

int mmb__pool_size(const mmb_pool *p) { return p ? p->n : 1; }

void mmb__pool_run(mmb_pool *p, mmb_pool_fn fn, void *arg) {
    if (!p || p->n == 1) { fn(arg, 0, 1); return; }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->pending = (uint64_t)(p->n - 1);
    __atomic_add_fetch(&p->generation, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    fn(arg, 0, p->n);
    if (spin_until(&p->pending, 0, true)) {
        /* The last worker may still hold the mutex to signal: take it, so that it is done with p. */
        pthread_mutex_lock(&p->mu);
        pthread_mutex_unlock(&p->mu);
        return;
    }
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

void mmb__barrier_wait(mmb_barrier *b) {
    if (b->n == 1) return;
    int gen = __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == b->n) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->gen, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    for (int spins = 0; __atomic_load_n(&b->gen, __ATOMIC_ACQUIRE) == gen; spins++) {
        if (spins > 4000) sched_yield();
#if defined(__x86_64__)
        else __builtin_ia32_pause();
#endif
    }
}

void mmb__split(int64_t n, int tid, int nth, int64_t *lo, int64_t *hi) {
    int64_t q = n / nth, r = n % nth;
    *lo = tid * q + (tid < r ? tid : r);
    *hi = *lo + q + (tid < r ? 1 : 0);
}
