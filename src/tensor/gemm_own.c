/* mmbridge's own fp32 GEMM: C (M, N) = A (M, K) W^T + bias, W pre-packed once at load.
 *
 * Packed weight layout (the same for every instruction set, so a packing is valid whatever
 * kernel runs later):
 *   N is padded to Np = ceil(N / NR) * NR columns (NR = 32) and K is cut into blocks of KC.
 *   The block that starts at k0 (length kc = min(KC, K - k0)) occupies Np * kc floats from
 *   offset k0 * Np; inside it, panel p (columns p*NR .. p*NR+NR-1) occupies kc * NR floats from
 *   p * kc * NR as two half panels of NH = 16 columns, each stored k-major: element (k, j) at
 *   (j / NH) * kc * NH + k * NH + j % NH. Padding columns are zero. A half panel is what one AVX2
 *   micro-kernel call reads, so it walks contiguous memory (whole cache lines, one stream).
 *
 * The micro-kernels also take other B panels (mmb__gemm_own_tile: attention's and wgemm's, packed
 * on the fly as rows of NR floats): they read row k of the half panel h at b + h * bh + k * ldb, with
 * (ldb, bh) = (NH, kc * NH) for packed weights and (NR, NH) for those.
 *
 * The driver (per thread, over its rows [m0, m1) and panels [p0, p1)):
 *   for each K block (kc)                      - C accumulates block by block, same order always
 *     for each block of MB rows                - A rows packed MR at a time into per-thread scratch
 *       for each group of panels               - weight block of MMB_GEMM_NB_BYTES stays in L2
 *         for each MR-row micro-panel of A     - kc x MR stays in L1
 *           for each panel: micro-kernel       - weights stream from L2
 * With the AVX2 and scalar kernels A is not packed: the micro-kernel reads it in place, row i of
 * the micro-panel at a + i * K (the kernels take A's row and k strides). Packing cost as much as
 * the products at narrow N (577x16x1024: 27 GFLOP/s packed, 70-77 in place) and was repeated by
 * every thread (2 threads, 577x1024x4096: 172 packed, 181 in place); on the wide shapes at 1 thread
 * the two are level (docs/decisions.md). AVX-512 keeps packing: its 14 rows, 4 KiB apart when K is
 * a multiple of 1024, would share one L1 set beyond its 12 ways (not measurable on this machine).
 * Every output element is computed by one thread, with the same K order and the same kernel
 * arithmetic whatever the thread count or the split, so results do not depend on threads. The
 * bias is added in the epilogue of the last K block: C = ((C_prev + acc) + bias).
 *
 * Reduced-precision weights (mmb__gemm_own_pack_dt): the same layout with 16-bit (bf16, f16) or
 * 8-bit (int8) elements. The micro-kernels widen each B vector to f32 as they load it (bf16: shift
 * or mask, columns interleaved in pairs, see bf16_pos; f16: F16C vcvtph2ps; int8: sign extend and
 * convert) and do the same f32 FMAs; A and C stay f32. int8 weights carry one scale per output
 * column (absmax / 127, symmetric): the epilogue computes C = (C_prev + scale * acc) + bias.
 */
#include "tensor/tensor.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define MMB_GEMM_X86 1
#include <immintrin.h>
#else
#define MMB_GEMM_X86 0
#endif

#define NR 32            /* panel width of the packed weights */
#define NH 16            /* half panel: stored contiguously */
#ifndef MMB_GEMM_KC
#define MMB_GEMM_KC 256  /* K block */
#endif
#define KC MMB_GEMM_KC
#ifndef MMB_GEMM_MB
#define MMB_GEMM_MB 16   /* A micro-panels packed at once (rows = MB * MR) */
#endif
#ifndef MMB_GEMM_NB_BYTES
#define MMB_GEMM_NB_BYTES (128 * 1024) /* weight bytes per L2 block: a quarter of a 512 KiB L2 */
#endif

#ifndef PF_AHEAD
#define PF_AHEAD 24      /* k iterations before the end of a micro-kernel at which C is prefetched */
#endif

#define MR512 14
#define MR256 6
#define MRSC 4
#define MR_MAX 14

/* -1: A packed or read in place by the rule (see the header); 0 / 1: forced (tests). */
static int g_pack_a = -1;

void mmb__gemm_own_force_pack_a(int mode) { __atomic_store_n(&g_pack_a, mode < 0 ? -1 : mode > 0, __ATOMIC_RELAXED); }

/* ---- packing ------------------------------------------------------------------------------------ */

static int64_t npad_of(int64_t N) { return (N + NR - 1) / NR * NR; }

size_t mmb__gemm_own_packed_size(int64_t N, int64_t K) {
    if (N < 1 || K < 1) return 0;
    return (size_t)npad_of(N) * (size_t)K;
}

/* Element codes of the packed weights: index into the kernel tables. */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_I8 = 3, N_DT = 4 };

/* bf16 half panels interleave their rows: 32-bit word i holds column i in its low half and column
 * i + 8 in its high half, so one 256-bit load gives columns 0-7 by a shift left of 16 and 8-15 by
 * masking the low half off (2 operations per 16 weights, no lane crossing). Position of column j
 * (0..NH-1) in a bf16 half-panel row: */
static inline int bf16_pos(int j) { return 2 * (j & 7) + ((j >> 3) & 1); }

static int dt_code(mmb_dtype dt) {
    return dt == MMB_BF16 ? DT_BF16 : dt == MMB_F16 ? DT_F16 : dt == MMB_I8 ? DT_I8 : DT_F32;
}

static size_t dt_size(int code) { return code == DT_F32 ? 4 : code == DT_I8 ? 1 : 2; }

bool mmb__gemm_own_dtype_ok(mmb_dtype dt) {
    return dt == MMB_F32 || dt == MMB_BF16 || dt == MMB_F16 || dt == MMB_I8;
}

size_t mmb__gemm_own_packed_bytes(int64_t N, int64_t K, mmb_dtype dt) {
    return mmb__gemm_own_packed_size(N, K) * dt_size(dt_code(dt));
}

int64_t mmb__gemm_own_scales_size(int64_t N) { return N < 1 ? 0 : npad_of(N); }

/* Per-column int8 scale: absmax / 127 (0 for an all-zero column). */
static float i8_scale(const float *w, int64_t K) {
    float m = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        float a = w[k] < 0 ? -w[k] : w[k];
        if (a > m) m = a;
    }
    return m / 127.0f;
}

static int8_t i8_of(float w, float scale) {
    if (!(scale > 0.0f)) return 0;
    float q = __builtin_nearbyintf(w / scale);
    return (int8_t)(q > 127.0f ? 127 : q < -127.0f ? -127 : q);
}

void mmb__gemm_own_dequant(float *dst, const float *W, int64_t N, int64_t K, mmb_dtype dt) {
    int code = dt_code(dt);
    for (int64_t n = 0; n < N; n++) {
        const float *w = W + n * K;
        float *d = dst + n * K;
        float sc = code == DT_I8 ? i8_scale(w, K) : 0.0f;
        for (int64_t k = 0; k < K; k++) {
            switch (code) {
            case DT_BF16: d[k] = mmb__bf16_to_f32(mmb__f32_to_bf16(w[k])); break;
            case DT_F16: d[k] = mmb__f16_to_f32(mmb__f32_to_f16(w[k])); break;
            case DT_I8: d[k] = (float)i8_of(w[k], sc) * sc; break;
            default: d[k] = w[k]; break;
            }
        }
    }
}

void mmb__gemm_own_pack_dt(void *dst, float *scales, const float *W, int64_t N, int64_t K, mmb_dtype dt) {
    if (N < 1 || K < 1) return;
    const int code = dt_code(dt);
    const size_t es = dt_size(code);
    int64_t Np = npad_of(N), P = Np / NR;
    if (code == DT_I8)
        for (int64_t n = 0; n < Np; n++) scales[n] = n < N ? i8_scale(W + n * K, K) : 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        int64_t kc = K - k0 < KC ? K - k0 : KC;
        char *blk = (char *)dst + (size_t)(k0 * Np) * es;
        for (int64_t p = 0; p < P; p++) {
            char *pan = blk + (size_t)(p * kc * NR) * es;
            for (int64_t j = 0; j < NR; j++) {
                int64_t n = p * NR + j;
                const float *w = n < N ? W + n * K + k0 : NULL;
                for (int64_t k = 0; k < kc; k++) {
                    float v = w ? w[k] : 0.0f;
                    size_t row = (size_t)((j / NH) * kc * NH + k * NH), at = row + (size_t)(j % NH);
                    switch (code) {
                    case DT_BF16: ((uint16_t *)pan)[row + (size_t)bf16_pos((int)(j % NH))] = mmb__f32_to_bf16(v); break;
                    case DT_F16: ((uint16_t *)pan)[at] = mmb__f32_to_f16(v); break;
                    case DT_I8: ((int8_t *)pan)[at] = i8_of(v, scales[n]); break;
                    default: ((float *)pan)[at] = v; break;
                    }
                }
            }
        }
    }
}

void mmb__gemm_own_pack(float *dst, const float *W, int64_t N, int64_t K) {
    mmb__gemm_own_pack_dt(dst, NULL, W, N, K, MMB_F32);
}

/* A rows [0, mr) (row stride lda, kc columns) -> dst[k * MR + i], rows mr..MR-1 zero. */
static void pack_a(float *dst, const float *A, int64_t lda, int mr, int MR, int64_t kc) {
    for (int i = 0; i < mr; i++) {
        const float *a = A + i * lda;
        for (int64_t k = 0; k < kc; k++) dst[k * MR + i] = a[k];
    }
    for (int i = mr; i < MR; i++)
        for (int64_t k = 0; k < kc; k++) dst[k * MR + i] = 0.0f;
}

/* ---- micro-kernels ------------------------------------------------------------------------------
 * kern(kc, a, ais, aks, b, ldb, bh, c, ldc, nc, load, bias, scale): for i < mr, j < nc:
 *   c[i*ldc + j] = ((load ? c[i*ldc + j] : 0) + s_j * sum_k a[i*ais + k*aks] * B(k, j)) + bias[j],
 *   (A packed: ais = 1, aks = MR; A in place: ais = its row stride, aks = 1)
 *   B(k, j) = b[(j / NH) * bh + k * ldb + j % NH] (elements of the kernel's type; bf16: bf16_pos)
 * (the bias term only when bias != NULL; s_j = scale[j] for int8 weights, else 1). nc <= the
 * kernel's width: NR for AVX-512 and scalar, NH for AVX2 (tile() calls it per half). */

#if MMB_GEMM_X86

#define T512 __attribute__((target("avx512f,avx512vl,fma"), always_inline)) static inline
#define T512F __attribute__((target("avx512f,avx512vl,fma"), noinline)) static

/* 16 packed weights of type DT (not bf16: see ldb2_512) from element offset off of b, widened to f32. */
T512 __m512 ldb512(const int DT, const void *b, int off) {
    switch (DT) {
    case DT_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)b + off)));
    case DT_I8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)b + off))));
    default:
        return _mm512_load_ps((const float *)b + off);
    }
}

/* The 32 weights of one panel row (columns 0-15 in *b0 from b, 16-31 in *b1 from b1p), widened to f32. */
T512 void ldb2_512(const int DT, const void *b, const void *b1p, __m512 *b0, __m512 *b1) {
    if (DT == DT_BF16) {
        const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
        __m256i v0 = _mm256_loadu_si256((const __m256i *)b), v1 = _mm256_loadu_si256((const __m256i *)b1p);
        *b0 = _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_slli_epi32(v0, 16)),
                                                     _mm256_and_si256(v0, hi), 1));
        *b1 = _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_slli_epi32(v1, 16)),
                                                     _mm256_and_si256(v1, hi), 1));
    } else {
        *b0 = ldb512(DT, b, 0);
        *b1 = ldb512(DT, b1p, 0);
    }
}

/* Two zmm accumulators per row: 32 columns. */
#define D512(i) __m512 c##i##a = _mm512_setzero_ps(), c##i##b = _mm512_setzero_ps();
#define F512(i)                                                                 \
    if (MR_ > i) {                                                              \
        __m512 ai = _mm512_set1_ps(a[i * ais]);                                 \
        c##i##a = _mm512_fmadd_ps(ai, b0, c##i##a);                             \
        c##i##b = _mm512_fmadd_ps(ai, b1, c##i##b);                             \
    }
#define S512(i)                                                                 \
    if (MR_ > i) {                                                              \
        float *ci = c + (int64_t)i * ldc;                                       \
        if (DT == DT_I8) {                                                      \
            c##i##a = _mm512_mul_ps(c##i##a, sa);                               \
            c##i##b = _mm512_mul_ps(c##i##b, sb);                               \
        }                                                                       \
        if (load) {                                                             \
            c##i##a = _mm512_add_ps(_mm512_maskz_loadu_ps(ma, ci), c##i##a);    \
            c##i##b = _mm512_add_ps(_mm512_maskz_loadu_ps(mb, ci + 16), c##i##b);\
        }                                                                       \
        if (bias) {                                                             \
            c##i##a = _mm512_add_ps(c##i##a, ba);                               \
            c##i##b = _mm512_add_ps(c##i##b, bb);                               \
        }                                                                       \
        _mm512_mask_storeu_ps(ci, ma, c##i##a);                                 \
        _mm512_mask_storeu_ps(ci + 16, mb, c##i##b);                            \
    }
#define P512(i)                                                                 \
    if (MR_ > i) {                                                              \
        _mm_prefetch((const char *)(c + (int64_t)i * ldc), _MM_HINT_T0);        \
        _mm_prefetch((const char *)(c + (int64_t)i * ldc + 16), _MM_HINT_T0);   \
    }
#define ALL14(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13)

T512 void k512_body(const int MR_, const int DT, int64_t kc, const float *a, int64_t ais, int64_t aks,
                    const void *bv, int64_t ldb,
                    int64_t bh, float *c, int64_t ldc, int nc, int load, const float *bias, const float *scale) {
    const size_t es = DT == DT_F32 ? 4 : DT == DT_I8 ? 1 : 2, bstep = (size_t)ldb * es;
    const char *b = bv, *bb1 = b + (size_t)bh * es;
    ALL14(D512)
    /* C is touched after the loop: prefetch it near the end, so the weights streaming through
     * L1 don't evict it first. */
    int64_t kpf = kc > PF_AHEAD ? kc - PF_AHEAD : 0;
    for (int64_t k = 0; k < kpf; k++) {
        __m512 b0, b1;
        ldb2_512(DT, b, bb1, &b0, &b1);
        ALL14(F512)
        a += aks;
        b += bstep;
        bb1 += bstep;
    }
    if (load) { ALL14(P512) }
    for (int64_t k = kpf; k < kc; k++) {
        __m512 b0, b1;
        ldb2_512(DT, b, bb1, &b0, &b1);
        ALL14(F512)
        a += aks;
        b += bstep;
        bb1 += bstep;
    }
    __mmask16 ma = nc >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nc) - 1u);
    __mmask16 mb = nc >= 32 ? (__mmask16)0xFFFF
                 : nc <= 16 ? (__mmask16)0 : (__mmask16)((1u << (nc - 16)) - 1u);
    __m512 ba = _mm512_setzero_ps(), bb = _mm512_setzero_ps();
    if (bias) { ba = _mm512_maskz_loadu_ps(ma, bias); bb = _mm512_maskz_loadu_ps(mb, bias + 16); }
    __m512 sa = _mm512_setzero_ps(), sb = _mm512_setzero_ps();
    if (DT == DT_I8) { sa = _mm512_maskz_loadu_ps(ma, scale); sb = _mm512_maskz_loadu_ps(mb, scale + 16); }
    ALL14(S512)
}

#define K512_INST(m, dt, DT)                                                                        \
    T512F void k512_##dt##_##m(int64_t kc, const float *a, int64_t ais, int64_t aks, const void *b,  \
                               int64_t ldb, int64_t bh,                                             \
                               float *c, int64_t ldc, int nc, int load, const float *bias,          \
                               const float *scale) {                                                \
        k512_body(m, DT, kc, a, ais, aks, b, ldb, bh, c, ldc, nc, load, bias, scale);               \
    }
#define K512_ALL(dt, DT)                                                                            \
    K512_INST(1, dt, DT) K512_INST(2, dt, DT) K512_INST(3, dt, DT) K512_INST(4, dt, DT)            \
    K512_INST(5, dt, DT) K512_INST(6, dt, DT) K512_INST(7, dt, DT) K512_INST(8, dt, DT)            \
    K512_INST(9, dt, DT) K512_INST(10, dt, DT) K512_INST(11, dt, DT) K512_INST(12, dt, DT)         \
    K512_INST(13, dt, DT) K512_INST(14, dt, DT)
K512_ALL(f32, DT_F32)
K512_ALL(bf16, DT_BF16)
K512_ALL(f16, DT_F16)
K512_ALL(i8, DT_I8)

#define T256 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline
#define T256F __attribute__((target("avx2,fma,f16c"), noinline)) static

/* 8 packed weights of type DT (not bf16: see ldb2_256) from element offset off of b, widened to f32. */
T256 __m256 ldb256(const int DT, const void *b, int off) {
    switch (DT) {
    case DT_F16:
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)b + off)));
    case DT_I8:
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)b + off))));
    default:
        return _mm256_load_ps((const float *)b + off);
    }
}

/* 16 weights of one half-panel row (columns 0-7 in *b0, 8-15 in *b1), widened. */
T256 void ldb2_256(const int DT, const void *b, __m256 *b0, __m256 *b1) {
    if (DT == DT_BF16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)b);
        *b0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *b1 = _mm256_and_ps(_mm256_castsi256_ps(v), _mm256_castsi256_ps(_mm256_set1_epi32((int)0xFFFF0000u)));
    } else {
        *b0 = ldb256(DT, b, 0);
        *b1 = ldb256(DT, b, 8);
    }
}

/* Two ymm accumulators per row: 16 columns (half a panel; b advances by ldb per k). */
#define D256(i) __m256 c##i##a = _mm256_setzero_ps(), c##i##b = _mm256_setzero_ps();
#define F256(i)                                                                 \
    if (MR_ > i) {                                                              \
        __m256 ai = _mm256_broadcast_ss(a + i * ais);                           \
        c##i##a = _mm256_fmadd_ps(ai, b0, c##i##a);                             \
        c##i##b = _mm256_fmadd_ps(ai, b1, c##i##b);                             \
    }
#define S256(i)                                                                 \
    if (MR_ > i) {                                                              \
        float *ci = c + (int64_t)i * ldc;                                       \
        if (DT == DT_I8) {                                                      \
            c##i##a = _mm256_mul_ps(c##i##a, sa);                               \
            c##i##b = _mm256_mul_ps(c##i##b, sb);                               \
        }                                                                       \
        if (full) {                                                             \
            if (load) {                                                         \
                c##i##a = _mm256_add_ps(_mm256_loadu_ps(ci), c##i##a);          \
                c##i##b = _mm256_add_ps(_mm256_loadu_ps(ci + 8), c##i##b);      \
            }                                                                   \
            if (bias) {                                                         \
                c##i##a = _mm256_add_ps(c##i##a, ba);                           \
                c##i##b = _mm256_add_ps(c##i##b, bb);                           \
            }                                                                   \
            _mm256_storeu_ps(ci, c##i##a);                                      \
            _mm256_storeu_ps(ci + 8, c##i##b);                                  \
        } else {                                                                \
            if (load) {                                                         \
                c##i##a = _mm256_add_ps(_mm256_maskload_ps(ci, ma), c##i##a);   \
                c##i##b = _mm256_add_ps(_mm256_maskload_ps(ci + 8, mb), c##i##b);\
            }                                                                   \
            if (bias) {                                                         \
                c##i##a = _mm256_add_ps(c##i##a, ba);                           \
                c##i##b = _mm256_add_ps(c##i##b, bb);                           \
            }                                                                   \
            _mm256_maskstore_ps(ci, ma, c##i##a);                               \
            _mm256_maskstore_ps(ci + 8, mb, c##i##b);                           \
        }                                                                       \
    }
#define P256(i)                                                                 \
    if (MR_ > i) _mm_prefetch((const char *)(c + (int64_t)i * ldc), _MM_HINT_T0);
#define ALL6(X) X(0) X(1) X(2) X(3) X(4) X(5)

T256 void k256_body(const int MR_, const int DT, int64_t kc, const float *a, int64_t ais, int64_t aks,
                    const void *bv, int64_t ldb,
                    float *c, int64_t ldc, int nc, int load, const float *bias, const float *scale) {
    const char *b = bv;
    const size_t bstep = (size_t)ldb * (DT == DT_F32 ? 4 : DT == DT_I8 ? 1 : 2);
    ALL6(D256)
    int64_t kpf = kc > PF_AHEAD ? kc - PF_AHEAD : 0;
    for (int64_t k = 0; k < kpf; k++) {
        __m256 b0, b1;
        ldb2_256(DT, b, &b0, &b1);
        ALL6(F256)
        a += aks;
        b += bstep;
    }
    if (load) { ALL6(P256) }
    for (int64_t k = kpf; k < kc; k++) {
        __m256 b0, b1;
        ldb2_256(DT, b, &b0, &b1);
        ALL6(F256)
        a += aks;
        b += bstep;
    }
    const int full = nc >= 16;
    int32_t mk[16];
    for (int j = 0; j < 16; j++) mk[j] = j < nc ? -1 : 0;
    __m256i ma = _mm256_loadu_si256((const __m256i *)mk);
    __m256i mb = _mm256_loadu_si256((const __m256i *)(mk + 8));
    __m256 ba = _mm256_setzero_ps(), bb = _mm256_setzero_ps();
    if (bias) {
        if (full) { ba = _mm256_loadu_ps(bias); bb = _mm256_loadu_ps(bias + 8); }
        else { ba = _mm256_maskload_ps(bias, ma); bb = _mm256_maskload_ps(bias + 8, mb); }
    }
    __m256 sa = _mm256_setzero_ps(), sb = _mm256_setzero_ps();
    if (DT == DT_I8) { sa = _mm256_maskload_ps(scale, ma); sb = _mm256_maskload_ps(scale + 8, mb); }
    ALL6(S256)
}

#define K256_INST(m, dt, DT)                                                                        \
    T256F void k256_##dt##_##m(int64_t kc, const float *a, int64_t ais, int64_t aks, const void *b,  \
                               int64_t ldb, int64_t bh,                                             \
                               float *c, int64_t ldc, int nc, int load, const float *bias,          \
                               const float *scale) {                                                \
        (void)bh; /* one half panel per call */                                                     \
        k256_body(m, DT, kc, a, ais, aks, b, ldb, c, ldc, nc, load, bias, scale);                   \
    }
#define K256_ALL(dt, DT)                                                                            \
    K256_INST(1, dt, DT) K256_INST(2, dt, DT) K256_INST(3, dt, DT) K256_INST(4, dt, DT)            \
    K256_INST(5, dt, DT) K256_INST(6, dt, DT)
K256_ALL(f32, DT_F32)
K256_ALL(bf16, DT_BF16)
K256_ALL(f16, DT_F16)
K256_ALL(i8, DT_I8)

#endif /* MMB_GEMM_X86 */

/* Row k of a panel of type dt (layout: see the kernels' contract), widened to f32 (the scalar kernel's
 * B load). */
static void ldb_row(float *dst, int dt, const void *b, int64_t ldb, int64_t bh, int64_t k) {
    for (int j = 0; j < NR; j++) {
        size_t row = (size_t)((j / NH) * bh + k * ldb), at = row + (size_t)(j % NH);
        switch (dt) {
        case DT_BF16: dst[j] = mmb__bf16_to_f32(((const uint16_t *)b)[row + (size_t)bf16_pos(j % NH)]); break;
        case DT_F16: dst[j] = mmb__f16_to_f32(((const uint16_t *)b)[at]); break;
        case DT_I8: dst[j] = (float)((const int8_t *)b)[at]; break;
        default: dst[j] = ((const float *)b)[at]; break;
        }
    }
}

/* Portable fallback: MRSC rows x NR columns, plain C. */
static void ksc(int mr, int dt, int64_t kc, const float *a, int64_t ais, int64_t aks, const void *b, int64_t ldb,
                int64_t bh, float *c, int64_t ldc, int nc, int load, const float *bias, const float *scale) {
    float acc[MRSC][NR], bk[NR];
    memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < kc; k++) {
        const float *ak = a + k * aks;
        ldb_row(bk, dt, b, ldb, bh, k);
        for (int i = 0; i < mr; i++) {
            float ai = ak[i * ais];
            for (int j = 0; j < NR; j++) acc[i][j] += ai * bk[j];
        }
    }
    for (int i = 0; i < mr; i++) {
        float *ci = c + (int64_t)i * ldc;
        for (int j = 0; j < nc; j++) {
            float s = dt == DT_I8 ? acc[i][j] * scale[j] : acc[i][j];
            float v = load ? ci[j] + s : s;
            if (bias) v += bias[j];
            ci[j] = v;
        }
    }
}

typedef void (*kern_fn)(int64_t kc, const float *a, int64_t ais, int64_t aks, const void *b, int64_t ldb,
                        int64_t bh, float *c, int64_t ldc, int nc, int load, const float *bias,
                        const float *scale);

#if MMB_GEMM_X86
#define TAB512(dt) {NULL, k512_##dt##_1, k512_##dt##_2, k512_##dt##_3, k512_##dt##_4, k512_##dt##_5,    \
                    k512_##dt##_6, k512_##dt##_7, k512_##dt##_8, k512_##dt##_9, k512_##dt##_10,        \
                    k512_##dt##_11, k512_##dt##_12, k512_##dt##_13, k512_##dt##_14}
#define TAB256(dt) {NULL, k256_##dt##_1, k256_##dt##_2, k256_##dt##_3, k256_##dt##_4, k256_##dt##_5,    \
                    k256_##dt##_6}
static const kern_fn k512_tab[N_DT][MR512 + 1] = {TAB512(f32), TAB512(bf16), TAB512(f16), TAB512(i8)};
static const kern_fn k256_tab[N_DT][MR256 + 1] = {TAB256(f32), TAB256(bf16), TAB256(f16), TAB256(i8)};
#endif

/* One micro-tile with the kernel of instruction set isa: rows mr <= MR of a packed A micro-panel
 * a (row stride MR of that isa) times one panel b of element type dt, rows ldb apart and its second
 * half bh elements in (nc <= NR columns; scale: the panel's int8 column scales). */
static inline void tile(int isa, int dt, int mr, int64_t kc, const float *a, int64_t ais, int64_t aks,
                        const void *b, int64_t ldb, int64_t bh, float *c, int64_t ldc, int nc, int load,
                        const float *bias, const float *scale) {
    switch (isa) {
#if MMB_GEMM_X86
    case 2:
        k512_tab[dt][mr](kc, a, ais, aks, b, ldb, bh, c, ldc, nc, load, bias, scale);
        return;
    case 1:
        k256_tab[dt][mr](kc, a, ais, aks, b, ldb, bh, c, ldc, nc < NH ? nc : NH, load, bias, scale);
        if (nc > NH)
            k256_tab[dt][mr](kc, a, ais, aks, (const char *)b + (size_t)bh * dt_size(dt), ldb, bh, c + NH, ldc,
                             nc - NH, load, bias ? bias + NH : NULL, scale ? scale + NH : NULL);
        return;
#endif
    default:
        ksc(mr, dt, kc, a, ais, aks, b, ldb, bh, c, ldc, nc, load, bias, scale);
        return;
    }
}

int mmb__gemm_own_mr(int isa) { return isa == 2 ? MR512 : isa == 1 ? MR256 : MRSC; }

/* b: rows of NR floats (attention's and wgemm's panels), not the packed-weight layout. */
void mmb__gemm_own_tile(int isa, int mr, int64_t kc, const float *a, const float *b, float *c, int64_t ldc,
                        int nc, int load, const float *bias) {
    tile(isa, DT_F32, mr, kc, a, 1, mmb__gemm_own_mr(isa), b, NR, NH, c, ldc, nc, load, bias, NULL);
}

/* ---- the driver --------------------------------------------------------------------------------- */

typedef struct {
    float *C;
    const float *A, *bias;
    const void *packed;    /* weights of element type dt */
    const float *scales;   /* int8: per-column scales (Np), else NULL */
    int64_t M, N, K, Np, P;
    int isa, MR, dt;
    bool direct;           /* A read in place (else packed MR rows at a time) */
    size_t es;             /* bytes per packed weight */
    bool split_n;    /* split panels over threads (else rows) */
    mmb_act act;     /* applied to C at the end */
    mmb_pool *pool;  /* keeps the threads' packing buffers (NULL: allocate per call) */
} job;

/* Scratch for one micro-panel: used when no buffer for MB of them can be had (pool or heap). */
#define SCRATCH_MIN (MR_MAX * KC)

static void run_range(const job *j, float *buf, int64_t mbrows, int64_t m0, int64_t m1,
                      int64_t p0, int64_t p1) {
    const int MR = j->MR;
    const int64_t K = j->K, N = j->N, Np = j->Np;
    const bool direct = j->direct;
    const int64_t ais = direct ? K : 1, aks = direct ? 1 : MR;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        int64_t kc = K - k0 < KC ? K - k0 : KC;
        /* Panels per L2 block: the same bytes whatever the weight type (4 f32 panels at kc = 256). */
        int64_t nb = MMB_GEMM_NB_BYTES / (kc * NR * (int64_t)j->es);
        if (nb < 1) nb = 1;
        const char *wblk = (const char *)j->packed + (size_t)(k0 * Np) * j->es;
        int load = k0 > 0;
        const float *bias = (k0 + kc == K) ? j->bias : NULL;
        for (int64_t mb = m0; mb < m1; mb += mbrows) {
            int64_t mbn = m1 - mb < mbrows ? m1 - mb : mbrows;
            int64_t npan = (mbn + MR - 1) / MR;
            for (int64_t q = 0; q < npan && !direct; q++) {
                int64_t r = mb + q * MR;
                int mr = (int)(m1 - r < MR ? m1 - r : MR);
                pack_a(buf + q * kc * MR, j->A + r * K + k0, K, mr, MR, kc);
            }
            for (int64_t pb = p0; pb < p1; pb += nb) {
                int64_t pe = p1 - pb < nb ? p1 : pb + nb;
                for (int64_t q = 0; q < npan; q++) {
                    int64_t r = mb + q * MR;
                    int mr = (int)(m1 - r < MR ? m1 - r : MR);
                    const float *ap = direct ? j->A + r * K + k0 : buf + q * kc * MR;
                    float *crow = j->C + r * N;
                    for (int64_t p = pb; p < pe; p++) {
                        int64_t n0 = p * NR;
                        int nc = (int)(N - n0 < NR ? N - n0 : NR);
                        const char *bp = wblk + (size_t)(p * kc * NR) * j->es;
                        tile(j->isa, j->dt, mr, kc, ap, ais, aks, bp, NH, kc * NH, crow + n0, N, nc, load,
                             bias ? bias + n0 : NULL, j->scales ? j->scales + n0 : NULL);
                    }
                }
                /* The block is final after the last K block: the activation runs while it is in cache. */
                if (j->act != MMB_ACT_NONE && k0 + kc == K) {
                    int64_t c0 = pb * NR, c1 = pe * NR < N ? pe * NR : N;
                    for (int64_t r = mb; r < mb + mbn; r++) mmb__act_forward(j->C + r * N + c0, c1 - c0, j->act);
                }
            }
        }
    }
}

static void worker(void *arg, int tid, int nth) {
    const job *j = arg;
    int64_t m0 = 0, m1 = j->M, p0 = 0, p1 = j->P;
    if (j->split_n) {
        mmb__split(j->P, tid, nth, &p0, &p1);
    } else {
        int64_t nb = (j->M + j->MR - 1) / j->MR;
        mmb__split(nb, tid, nth, &m0, &m1);
        m0 *= j->MR;
        m1 = m1 * j->MR < j->M ? m1 * j->MR : j->M;
    }
    if (m0 >= m1 || p0 >= p1) return;
    int64_t kcmax = j->K < KC ? j->K : KC;
    int64_t rows = m1 - m0;
    int64_t mbrows = (int64_t)MMB_GEMM_MB * j->MR;
    if (rows < mbrows) mbrows = (rows + j->MR - 1) / j->MR * j->MR;
    float stackbuf[SCRATCH_MIN] __attribute__((aligned(64)));
    float *heap = NULL, *buf = stackbuf;
    if (mbrows > j->MR && !j->direct) {
        size_t bytes = (size_t)mbrows * (size_t)kcmax * sizeof(float);
        bytes = (bytes + 63) / 64 * 64;
        /* The pool keeps each thread's buffer from call to call: no allocation per GEMM. */
        float *kept = j->pool ? mmb__pool_scratch(j->pool, tid, bytes) : NULL;
        if (!kept && !j->pool) kept = heap = aligned_alloc(64, bytes);
        if (kept) buf = kept;
        else mbrows = j->MR; /* no memory: one micro-panel at a time from the stack */
    }
    run_range(j, buf, mbrows, m0, m1, p0, p1);
    free(heap);
}

void mmb__gemm_own(mmb_pool *pool, float *C, const float *A, const float *packed,
                   const float *bias, int64_t M, int64_t N, int64_t K) {
    mmb__gemm_own_act(pool, C, A, packed, bias, M, N, K, MMB_ACT_NONE);
}

void mmb__gemm_own_act(mmb_pool *pool, float *C, const float *A, const float *packed, const float *bias,
                       int64_t M, int64_t N, int64_t K, mmb_act act) {
    mmb__gemm_own_dt(pool, C, A, packed, NULL, MMB_F32, bias, M, N, K, act);
}

void mmb__gemm_own_dt(mmb_pool *pool, float *C, const float *A, const void *packed, const float *scales,
                      mmb_dtype dt, const float *bias, int64_t M, int64_t N, int64_t K, mmb_act act) {
    if (M < 1 || N < 1 || K < 1) return;
    job j;
    j.act = act;
    j.pool = pool;
    j.dt = dt_code(dt);
    j.es = dt_size(j.dt);
    j.scales = j.dt == DT_I8 ? scales : NULL;
    j.C = C; j.A = A; j.packed = packed; j.bias = bias;
    j.M = M; j.N = N; j.K = K;
    j.Np = npad_of(N); j.P = j.Np / NR;
    j.isa = mmb__cpu_isa();
    j.MR = mmb__gemm_own_mr(j.isa);
    int force = __atomic_load_n(&g_pack_a, __ATOMIC_RELAXED);
    j.direct = force < 0 ? j.MR <= 8 : !force; /* within every AVX2-era L1's 8 ways (see the header) */
    int nth = mmb__pool_size(pool);
    int64_t mpan = (M + j.MR - 1) / j.MR;
    /* Panels when there are enough of them for an even split, else rows (if those are more). */
    j.split_n = j.P >= 4 * (int64_t)nth || j.P >= mpan;
    int64_t units = j.split_n ? j.P : mpan;
    /* Tiny problems: no point waking threads that would get nothing or next to nothing. */
    if (nth == 1 || units < 2 || (double)M * (double)N * (double)K < 262144.0) {
        worker(&j, 0, 1);
        return;
    }
    mmb__pool_run(pool, worker, &j);
}

/* ---- for drivers that pack their own panels (tensor/wgemm.c) ------------------------------------ */

_Static_assert(NR == MMB_GEMM_OWN_NR && KC == MMB_GEMM_OWN_KC, "internal.h's panel constants");

void mmb__gemm_own_pack_a(float *dst, const float *A, int64_t lda, int mr, int64_t kc) {
    pack_a(dst, A, lda, mr, mmb__gemm_own_mr(mmb__cpu_isa()), kc);
}
