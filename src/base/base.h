/* The base layer: error messages, the arena, the thread pool, the context, the CPU probe. Nothing here is public API; no layer below it. */
#ifndef MMB_BASE_H
#define MMB_BASE_H

#include "mmbridge.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdbool.h>

/* Hot elementwise loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load
 * time by the dynamic linker (GCC function multi-versioning); a plain function elsewhere, and under
 * ThreadSanitizer, whose instrumented ifunc resolvers would run before its runtime is up. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_THREAD__)
#define MMB_SIMD_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define MMB_SIMD_CLONES
/* ---- base/ctx.c: time ----------------------------------------------------------------------------- */

/* Seconds on a monotonic clock. */
double mmb__now_s(void);

#endif

/* ---- base/status.c: error messages --------------------------------------------------------- */

#define MMB_ERRMSG_LEN 4096 /* room for a long path and the family table's list */

/* Formats a message into ctx (if not NULL) and returns s, so callers can `return mmb__err(...)`. */
mmb_status mmb__err(mmb_ctx *ctx, mmb_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- base/arena.c: bump allocator ---------------------------------------------------------- */

/* One malloc'd block carved into 64-byte aligned pieces; reset frees them all at once. */
typedef struct mmb_arena {
    unsigned char *base;
    size_t cap, used;
} mmb_arena;

/* Grows the arena to at least `bytes` of capacity (discarding contents). Returns MMB_OK or
 * MMB_ERR_NOMEM. */
mmb_status mmb__arena_reserve(mmb_ctx *ctx, mmb_arena *a, size_t bytes);
/* Returns a 64-byte aligned piece of `bytes`, or NULL when the reservation is exceeded. */
void *mmb__arena_alloc(mmb_arena *a, size_t bytes);
void mmb__arena_reset(mmb_arena *a);
void mmb__arena_free(mmb_arena *a);
/* Bytes arena_alloc would consume for a piece of `bytes` (for sizing a reservation). */
size_t mmb__arena_piece(size_t bytes);
/* Page-backed memory for large load-time transients (freed with the same size): unlike a heap
 * block, its pages leave RSS when freed. NULL when out of memory. */
void *mmb__pages_alloc(size_t bytes);
void mmb__pages_free(void *p, size_t bytes);

/* ---- base/pool.c: thread pool -------------------------------------------------------------- */

typedef struct mmb_pool mmb_pool;

/* Called once per thread by mmb__pool_run: tid in [0, nth). */
typedef void (*mmb_pool_fn)(void *arg, int tid, int nth);

/* Starts n-1 workers (the caller is thread 0). Returns MMB_OK or MMB_ERR_NOMEM. */
mmb_status mmb__pool_new(int n, mmb_pool **out);
void mmb__pool_free(mmb_pool *p);
int mmb__pool_size(const mmb_pool *p);
/* Runs fn(arg, tid, nth) on every thread of the pool, the caller included, and returns when all
 * are done. Not reentrant: fn must not call mmb__pool_run. */
void mmb__pool_run(mmb_pool *p, mmb_pool_fn fn, void *arg);
/* Thread tid's scratch of at least `bytes` (64-byte aligned), kept by the pool from run to run and
 * grown when asked for more (the contents are then lost); NULL if it cannot be allocated. Only
 * thread tid of a run may use it, and only one kernel at a time. */
void *mmb__pool_scratch(mmb_pool *p, int tid, size_t bytes);
/* Splits [0, n) into nth near-equal contiguous ranges; sets [*lo, *hi) for tid. */
void mmb__split(int64_t n, int tid, int nth, int64_t *lo, int64_t *hi);

/* A spin barrier for the nth threads of one pool job ({.n = nth}, the rest zero): mmb__barrier_wait returns
 * once all n have arrived. It spins (the steps between barriers are short), yielding the CPU after a while so
 * an oversubscribed machine still makes progress. */
typedef struct mmb_barrier {
    int n;
    int count, gen;
} mmb_barrier;
void mmb__barrier_wait(mmb_barrier *b);

/* ---- the context ---------------------------------------------------------------------------- */

struct mmb_ctx {
    mmb_pool *pool;
    mmb_gemm_backend gemm;   /* resolved: never MMB_GEMM_AUTO */
    mmb_dtype weight_dtype;  /* linear layers' compute dtype: MMB_F32, MMB_BF16, MMB_F16 or MMB_I8 */
    mmb_arena arena;         /* activations of the current forward pass */
    mmb_arena feats;         /* the tower's hidden states while the connector reads them (mmb_model_encode
                                and the families' encode), kept from call to call like the arena */
    char err[MMB_ERRMSG_LEN];
};

/* ---- overflow-checked sizes ------------------------------------------------------------------ */
static inline bool mmb__mul_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline bool mmb__add_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

/* ---- base/cpu.c: the instruction set ------------------------------------------------------------ */

/* The vector instruction set kernels use: 2 AVX-512F (+VL), 1 AVX2+FMA+F16C, 0 none; the CPU's best,
 * lowered (never raised) by the environment variable MMB_GEMM_ISA=avx2|avx512|scalar. */
int mmb__cpu_isa(void);
/* Forces min(isa, what the CPU has) for later calls (tests cover every path); isa < 0 restores the
 * automatic choice. */
void mmb__cpu_force_isa(int isa);

/* ---- base/ctx.c: time ----------------------------------------------------------------------------- */

/* Seconds on a monotonic clock. */
double mmb__now_s(void);


/* ---- base/strmap.c: string -> index hash map ---------------------------------------------------- */

/* Open addressing, linear probing, FNV-1a; expected O(1) per operation, so n insertions take O(n).
 * Keys are borrowed: each must stay valid, unchanged, while the map holds it. Zero-initialise to
 * start ({0}). `probes` counts the key comparisons that mmb__strmap_put made (for tests that bound the work). */
typedef struct mmb__strmap {
    const char **keys;
    int64_t *vals;
    size_t cap, n;
    uint64_t probes;
} mmb__strmap;
/* Inserts key -> val unless key is present. Returns 1 when inserted, 0 when key was already there
 * (its value in *old if old is not NULL; nothing changes), -1 when out of memory (nothing changes). */
int mmb__strmap_put(mmb__strmap *m, const char *key, int64_t val, int64_t *old);
/* True when key is present; its value in *val (if not NULL). */
bool mmb__strmap_get(const mmb__strmap *m, const char *key, int64_t *val);
/* Frees the table (not the keys) and leaves an empty map. */
void mmb__strmap_free(mmb__strmap *m);


/* ---- base/file.c: opening inputs ------------------------------------------------------------------ */

/* "a FIFO", "a character device", ... for a st_mode that is not a regular file (for messages). */
const char *mmb__file_kind(unsigned mode);
/* Opens path read-only when it is a regular file. The open is non-blocking, so a FIFO without a
 * writer, a terminal, a device or a socket cannot block it, and fstat refuses anything but a regular
 * file at once (MMB_ERR_IO, "PATH: is a FIFO, not a regular file: refused"). Returns MMB_OK with the
 * descriptor (blocking, close-on-exec) in *fd and its size in *size (if not NULL); MMB_ERR_IO
 * otherwise, with errno as the failing call left it (EINVAL for a non-regular file). */
mmb_status mmb__open_input(mmb_ctx *ctx, const char *path, int *fd, size_t *size);
/* As mmb__open_input, as a FILE * for "rb" reads (the caller fcloses it). */
mmb_status mmb__fopen_input(mmb_ctx *ctx, const char *path, FILE **out);

#endif
