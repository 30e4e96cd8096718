/* The raw GEMM libraries as benchmark peers: OpenBLAS, BLIS and oneDNN opened with
 * dlopen(RTLD_LOCAL) so their clashing BLAS symbols never meet, and mmbridge's own kernel, all
 * computing C (M, N) = A (M, K) W^T with W (N, K) row-major (the nn.Linear layout). */
#ifndef MMB_BENCH_PEERS_H
#define MMB_BENCH_PEERS_H

#include "internal.h"

#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>

/* ---- peers ---------------------------------------------------------------------------------- */

typedef void (*cblas_sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                               const float *, int, float, float *, int);
typedef void (*set_threads_fn)(int);
typedef char *(*corename_fn)(void);
typedef void (*bli_sgemm_fn)(int, int, int64_t, int64_t, int64_t, const float *, const float *,
                             int64_t, int64_t, const float *, int64_t, int64_t, const float *,
                             float *, int64_t, int64_t);
typedef void (*bli_set_threads_fn)(int64_t);
typedef int64_t (*bli_int_size_fn)(void);
typedef int (*dnnl_sgemm_fn)(char, char, int64_t, int64_t, int64_t, float, const float *, int64_t,
                             const float *, int64_t, float, float *, int64_t);

static struct {
    cblas_sgemm_fn ob_gemm;
    set_threads_fn ob_threads;
    corename_fn ob_core;
    bli_sgemm_fn bli_gemm;
    bli_set_threads_fn bli_threads;
    dnnl_sgemm_fn dnnl_gemm;
    set_threads_fn omp_threads;
} P;

static inline void *sym(void *h, const char *name) { return h ? dlsym(h, name) : NULL; }

static inline void open_openblas(void) {
    void *h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    P.ob_gemm = (cblas_sgemm_fn)sym(h, "cblas_sgemm");
    P.ob_threads = (set_threads_fn)sym(h, "openblas_set_num_threads");
    P.ob_core = (corename_fn)sym(h, "openblas_get_corename");
    if (!P.ob_threads) P.ob_gemm = NULL;
}

static inline void open_peers(void) {
    open_openblas();
    void *h = dlopen("libblis.so.4", RTLD_NOW | RTLD_LOCAL);
    bli_int_size_fn isz = (bli_int_size_fn)sym(h, "bli_info_get_int_type_size");
    /* the typed API, not BLIS's cblas_sgemm: that one calls sgemm_, which an already loaded
     * OpenBLAS could interpose */
    if (isz && isz() == 64) {
        P.bli_gemm = (bli_sgemm_fn)sym(h, "bli_sgemm");
        P.bli_threads = (bli_set_threads_fn)sym(h, "bli_thread_set_num_threads");
        if (!P.bli_threads) P.bli_gemm = NULL;
    }
    h = dlopen("libdnnl.so.2", RTLD_NOW | RTLD_LOCAL);
    P.dnnl_gemm = (dnnl_sgemm_fn)sym(h, "dnnl_sgemm");
    P.omp_threads = (set_threads_fn)dlsym(RTLD_DEFAULT, "omp_set_num_threads");
    if (!P.omp_threads) P.omp_threads = (set_threads_fn)sym(h, "omp_set_num_threads");
    if (!P.omp_threads)
        P.omp_threads = (set_threads_fn)sym(dlopen("libgomp.so.1", RTLD_NOW | RTLD_LOCAL),
                                            "omp_set_num_threads");
    if (!P.omp_threads) P.dnnl_gemm = NULL; /* could not control its threads */
}

enum { B_OWN, B_OB, B_BLIS, B_DNNL, B_OB_HSW, B_OB_UNP, NB_ };

typedef struct {
    int64_t M, N, K;
} shape;

typedef struct {
    float *A, *W, *packed, *C, *Cown;
    int64_t M, N, K;
    mmb_pool *pool;
} prob;

/* Runs backend b once with nth threads (thread setting done by the caller). Returns false if
 * unavailable or failed. */
static inline bool run_backend(int b, prob *p, float *C) {
    const int64_t M = p->M, N = p->N, K = p->K;
    switch (b) {
    case B_OWN:
        mmb__gemm_own(p->pool, C, p->A, p->packed, NULL, M, N, K);
        return true;
    case B_OB:
        if (!P.ob_gemm) return false;
        P.ob_gemm(101 /* RowMajor */, 111 /* NoTrans */, 112 /* Trans */, (int)M, (int)N, (int)K,
                  1.0f, p->A, (int)K, p->W, (int)K, 0.0f, C, (int)N);
        return true;
    case B_BLIS: {
        if (!P.bli_gemm) return false;
        float one = 1.0f, zero = 0.0f;
        /* B = W^T (K, N): element (k, n) at W[n*K + k]: row stride 1, column stride K */
        P.bli_gemm(0, 0, M, N, K, &one, p->A, K, 1, p->W, 1, K, &zero, C, N, 1);
        return true;
    }
    case B_DNNL:
        if (!P.dnnl_gemm) return false;
        return P.dnnl_gemm('N', 'T', M, N, K, 1.0f, p->A, K, p->W, K, 0.0f, C, N) == 0;
    }
    return false;
}

static inline void set_threads(int b, int nth) {
    if (b == B_OB && P.ob_threads) P.ob_threads(nth);
    if (b == B_BLIS && P.bli_threads) P.bli_threads(nth);
    if ((b == B_DNNL || b == B_BLIS) && P.omp_threads) P.omp_threads(nth);
}

#endif
