/* Matrix products with weights in their storage dtype (F32, F16, BF16), row-major (n, k) as checkpoints
 * store nn.Linear weights, read in place from the mapped file and converted to f32 on the fly, so a 7B
 * model in bf16 takes 13.5 GB, not 27. Products and sums are f32 (bf16 -> f32 is exact).
 *
 * mmb__wmat_part computes one thread's share of the output columns; the caller splits (the decoder runs
 * its whole layer in one pool job and splits every product itself).
 *   GEMV (M <= MMB_WMAT_GEMV_MAX rows of x): each weight row is streamed once from memory and converted
 *   in registers; the x rows stay in L1. The decode path: memory-bound by design.
 *   GEMM (more rows): for each K block, the x rows are packed once into the own kernel's A micro-panels,
 *   then each panel of 32 weight rows is converted into the own kernel's packed layout (32 x KC floats,
 *   in L1/L2) and the own micro-kernel runs it against every micro-panel.
 */
#include "tensor/tensor.h"

#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define WG_X86 1
#include <immintrin.h>
#else
#define WG_X86 0
#endif

#define NR MMB_GEMM_OWN_NR
#define KC MMB_GEMM_OWN_KC

static inline float cvt1(const void *w, mmb_dtype t, int64_t i) {
    switch (t) {
    case MMB_BF16: return mmb__bf16_to_f32(((const uint16_t *)w)[i]);
    case MMB_F16: return mmb__f16_to_f32(((const uint16_t *)w)[i]);
    default: return ((const float *)w)[i];
    }
}

void mmb__wmat_ref(float *y, const float *x, int64_t M, const mmb_wmat *w, const float *bias) {
    size_t es = mmb_dtype_size(w->dtype);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < w->n; n++) {
            const unsigned char *row = (const unsigned char *)w->data + (size_t)(n * w->k) * es;
            double acc = bias ? bias[n] : 0.0;
            for (int64_t k = 0; k < w->k; k++) acc += (double)x[m * w->k + k] * cvt1(row, w->dtype, k);
            y[m * w->n + n] = (float)acc;
        }
}

/* ---- dot products: x (K) f32 . one weight row (K) ------------------------------------------------- */

static float dot_scalar(const float *x, const void *w, mmb_dtype t, int64_t K) {
    float a[4] = {0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 4 <= K; k += 4)
        for (int j = 0; j < 4; j++) a[j] += x[k + j] * cvt1(w, t, k + j);
    for (; k < K; k++) a[0] += x[k] * cvt1(w, t, k);
    return (a[0] + a[1]) + (a[2] + a[3]);
}

#if WG_X86
/* Software prefetch this many elements ahead in a weight row (rows follow each other in memory, so it
 * runs into the next row): measured +5-10 % GEMV bandwidth on one core over the hardware prefetcher alone. */
#define PF_ELEMS 512
#define TAVX2 __attribute__((target("avx2,fma,f16c")))
#define TAVX512 __attribute__((target("avx512f,avx512vl,fma")))

TAVX2 __attribute__((always_inline)) static inline __m256 ld8(const void *w, mmb_dtype t, int64_t k) {
    if (t == MMB_F32) return _mm256_loadu_ps((const float *)w + k);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
    if (t == MMB_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

TAVX2 static float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

TAVX2 __attribute__((always_inline)) static inline float dot_avx2(const float *x, const void *w, mmb_dtype t, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t es = t == MMB_F32 ? 4 : 2;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char *)w + (k + PF_ELEMS) * es, _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), ld8(w, t, k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), ld8(w, t, k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), ld8(w, t, k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), ld8(w, t, k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), ld8(w, t, k), a0);
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += x[k] * cvt1(w, t, k);
    return s;
}

TAVX512 __attribute__((always_inline)) static inline __m512 ld16(const void *w, mmb_dtype t, int64_t k) {
    if (t == MMB_F32) return _mm512_loadu_ps((const float *)w + k);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k));
    if (t == MMB_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

TAVX512 __attribute__((always_inline)) static inline float dot_avx512(const float *x, const void *w, mmb_dtype t, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t es = t == MMB_F32 ? 4 : 2;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)w + (k + PF_ELEMS) * es, _MM_HINT_T0);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), ld16(w, t, k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), ld16(w, t, k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), ld16(w, t, k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), ld16(w, t, k + 48), a3);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), ld16(w, t, k), a0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; k < K; k++) s += x[k] * cvt1(w, t, k);
    return s;
}

/* One function per dtype, so the conversion is resolved at compile time inside the loop. */
#define DOT_INST(isa, T, dt)                                                                                   \
    T static float dot_##isa##_##dt(const float *x, const void *w, mmb_dtype t, int64_t K) {                   \
        (void)t;                                                                                               \
        return dot_##isa(x, w, MMB_##dt, K);                                                                   \
    }
DOT_INST(avx2, TAVX2, F32) DOT_INST(avx2, TAVX2, F16) DOT_INST(avx2, TAVX2, BF16)
DOT_INST(avx512, TAVX512, F32) DOT_INST(avx512, TAVX512, F16) DOT_INST(avx512, TAVX512, BF16)

/* pan[k * NR + j] = W[n0 + j][k0 + k] for j < nc8, k < kc8 (multiples of 8): 8 x 8 tiles widened and
 * transposed in registers (the scalar transposing copy costs as much as the GEMM at 128 rows). */
TAVX2 static void pack_tiles_avx2(float *pan, const void *w, mmb_dtype t, int64_t ldw, int64_t n0, int nc8,
                                  int64_t k0, int64_t kc8) {
    const int64_t es = t == MMB_F32 ? 4 : 2;
    for (int j = 0; j < nc8; j += 8)
        for (int64_t k = 0; k < kc8; k += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = ld8((const unsigned char *)w + ((n0 + j + i) * ldw + k0) * es, t, k);
            __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
            __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
            __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
            __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
            __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *o = pan + k * NR + j;
            _mm256_store_ps(o + 0 * NR, _mm256_permute2f128_ps(s0, s4, 0x20));
            _mm256_store_ps(o + 1 * NR, _mm256_permute2f128_ps(s1, s5, 0x20));
            _mm256_store_ps(o + 2 * NR, _mm256_permute2f128_ps(s2, s6, 0x20));
            _mm256_store_ps(o + 3 * NR, _mm256_permute2f128_ps(s3, s7, 0x20));
            _mm256_store_ps(o + 4 * NR, _mm256_permute2f128_ps(s0, s4, 0x31));
            _mm256_store_ps(o + 5 * NR, _mm256_permute2f128_ps(s1, s5, 0x31));
            _mm256_store_ps(o + 6 * NR, _mm256_permute2f128_ps(s2, s6, 0x31));
            _mm256_store_ps(o + 7 * NR, _mm256_permute2f128_ps(s3, s7, 0x31));
        }
}
#endif

typedef float (*dot_fn)(const float *x, const void *w, mmb_dtype t, int64_t K);

static dot_fn pick_dot(mmb_dtype t) {
#if WG_X86
    int isa = mmb__cpu_isa();
    if (isa == 2) return t == MMB_BF16 ? dot_avx512_BF16 : t == MMB_F16 ? dot_avx512_F16 : dot_avx512_F32;
    if (isa == 1)  /* level 1 includes F16C */
        return t == MMB_BF16 ? dot_avx2_BF16 : t == MMB_F16 ? dot_avx2_F16 : dot_avx2_F32;
#else
    (void)t;
#endif
    return dot_scalar;
}

/* ---- the panel conversion for the GEMM path -------------------------------------------------------- */

/* Rows [n0, n0 + nc) and columns [k0, k0 + kc) of W -> pan (kc x NR, k-major), columns nc..NR-1 zero. */
static void pack_panel(float *pan, const mmb_wmat *w, int64_t n0, int nc, int64_t k0, int64_t kc) {
    size_t es = mmb_dtype_size(w->dtype);
    int nc8 = 0;
    int64_t kc8 = 0;
#if WG_X86
    int isa = mmb__cpu_isa();
    if (isa >= 1) {
        nc8 = nc / 8 * 8;
        kc8 = kc / 8 * 8;
        pack_tiles_avx2(pan, w->data, w->dtype, w->k, n0, nc8, k0, kc8);
    }
#endif
    for (int j = 0; j < nc; j++) {
        int64_t kfrom = j < nc8 ? kc8 : 0; /* the tiles did [0, kc8) of rows [0, nc8) */
        if (kfrom == kc) continue;
        const unsigned char *row = (const unsigned char *)w->data + (size_t)((n0 + j) * w->k + k0) * es;
        if (w->dtype == MMB_BF16) {
            const uint16_t *r = (const uint16_t *)row;
            for (int64_t k = kfrom; k < kc; k++) {
                uint32_t u = (uint32_t)r[k] << 16;
                memcpy(&pan[k * NR + j], &u, 4);
            }
        } else if (w->dtype == MMB_F32) {
            const float *r = (const float *)row;
            for (int64_t k = kfrom; k < kc; k++) pan[k * NR + j] = r[k];
        } else {
            for (int64_t k = kfrom; k < kc; k++) pan[k * NR + j] = cvt1(row, w->dtype, k);
        }
    }
    for (int j = nc; j < NR; j++)
        for (int64_t k = 0; k < kc; k++) pan[k * NR + j] = 0.0f;
}

size_t mmb__wmat_scratch(int64_t M, int64_t K) {
    if (M <= MMB_WMAT_GEMV_MAX) return 16;
    int64_t mr = mmb__gemm_own_mr(mmb__cpu_isa()), kc = K < KC ? K : KC;
    int64_t mp = (M + mr - 1) / mr * mr;
    return (size_t)(mp * kc + (int64_t)NR * kc + 16);
}

void mmb__wmat_part(float *y0, int64_t ldy, const float *x, int64_t ldx, int64_t M, const mmb_wmat *w,
                    const float *bias, int64_t n0, int64_t n1, int accumulate, float *scratch) {
    const int64_t K = w->k;
    if (M < 1 || n1 <= n0) return;
    size_t es = mmb_dtype_size(w->dtype);
    if (M <= MMB_WMAT_GEMV_MAX) {
        dot_fn dot = pick_dot(w->dtype);
        for (int64_t n = n0; n < n1; n++) {
            const void *row = (const unsigned char *)w->data + (size_t)(n * K) * es;
            float b = bias ? bias[n] : 0.0f;
            for (int64_t m = 0; m < M; m++) {
                float v = dot(x + m * ldx, row, w->dtype, K) + b;
                float *o = y0 + m * ldy + (n - n0);
                *o = accumulate ? *o + v : v;
            }
        }
        return;
    }
    const int isa = mmb__cpu_isa(), MR = mmb__gemm_own_mr(isa);
    const int64_t npan = (M + MR - 1) / MR;
    float *apack = scratch, *pan = scratch + npan * MR * (K < KC ? K : KC);
    pan = (float *)(((uintptr_t)pan + 63) & ~(uintptr_t)63);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        int64_t kc = K - k0 < KC ? K - k0 : KC;
        int load = accumulate || k0 > 0;
        int last = k0 + kc == K;
        for (int64_t q = 0; q < npan; q++) {
            int mr = (int)(M - q * MR < MR ? M - q * MR : MR);
            mmb__gemm_own_pack_a(apack + q * kc * MR, x + q * MR * ldx + k0, ldx, mr, kc);
        }
        for (int64_t p = n0; p < n1; p += NR) {
            int nc = (int)(n1 - p < NR ? n1 - p : NR);
            pack_panel(pan, w, p, nc, k0, kc);
            const float *bi = last && bias ? bias + p : NULL;
            for (int64_t q = 0; q < npan; q++) {
                int mr = (int)(M - q * MR < MR ? M - q * MR : MR);
                mmb__gemm_own_tile(isa, mr, kc, apack + q * kc * MR, pan, y0 + q * MR * ldy + (p - n0), ldy, nc,
                                   load, bi);
            }
        }
    }
}

void mmb__wmat_share(int tid, int nth, const float *x, int64_t ldx, int64_t M, const mmb_wmat_out *o, int n,
                     int accumulate, float *scratch) {
    int64_t g = M <= MMB_WMAT_GEMV_MAX ? 8 : MMB_GEMM_OWN_NR, total = 0, lo, hi;
    for (int i = 0; i < n; i++) total += (o[i].w->n + g - 1) / g;
    mmb__split(total, tid, nth, &lo, &hi);
    for (int i = 0, base = 0; i < n; base += (int)((o[i].w->n + g - 1) / g), i++) {
        int64_t u = (o[i].w->n + g - 1) / g, a = lo - base, b = hi - base;
        if (a < 0) a = 0;
        if (b > u) b = u;
        if (a >= b) continue;
        int64_t n0 = a * g, n1 = b * g < o[i].w->n ? b * g : o[i].w->n;
        mmb__wmat_part(o[i].y + n0, o[i].ldy, x, ldx, M, o[i].w, o[i].bias, n0, n1, accumulate, scratch);
    }
}

/* ---- the transposed product dx = dy W (the backward of y = x W^T) ---------------------------------- */

/* pan[k * NR + j] = W[n0 + k][c0 + j] for k < kc, j < nc (widened to f32), columns nc..NR-1 zero: a
 * panel of the transposed product is a block of W's rows as they lie, so no transposition is needed. */
static void pack_rows_scalar(float *pan, const mmb_wmat *w, int64_t n0, int64_t kc, int64_t c0, int nc) {
    size_t es = mmb_dtype_size(w->dtype);
    for (int64_t k = 0; k < kc; k++) {
        const unsigned char *row = (const unsigned char *)w->data + (size_t)((n0 + k) * w->k + c0) * es;
        float *o = pan + k * NR;
        if (w->dtype == MMB_F32) memcpy(o, row, sizeof(float) * (size_t)nc);
        else if (w->dtype == MMB_BF16)
            for (int j = 0; j < nc; j++) {
                uint32_t u = (uint32_t)((const uint16_t *)row)[j] << 16;
                memcpy(&o[j], &u, 4);
            }
        else
            for (int j = 0; j < nc; j++) o[j] = cvt1(row, w->dtype, j);
        for (int j = nc; j < NR; j++) o[j] = 0.0f;
    }
}

#if WG_X86
/* The same for full panels (nc == NR), 8 columns per load. */
TAVX2 static void pack_rows_avx2(float *pan, const mmb_wmat *w, int64_t n0, int64_t kc, int64_t c0) {
    const int64_t es = w->dtype == MMB_F32 ? 4 : 2;
    for (int64_t k = 0; k < kc; k++) {
        const unsigned char *row = (const unsigned char *)w->data + ((n0 + k) * w->k + c0) * es;
        float *o = pan + k * NR;
        if (k + 8 < kc) _mm_prefetch((const char *)row + 8 * w->k * es, _MM_HINT_T0); /* strided rows */
        _mm256_store_ps(o, ld8(row, w->dtype, 0));
        _mm256_store_ps(o + 8, ld8(row, w->dtype, 8));
        _mm256_store_ps(o + 16, ld8(row, w->dtype, 16));
        _mm256_store_ps(o + 24, ld8(row, w->dtype, 24));
    }
}
#endif

static void pack_rows(float *pan, const mmb_wmat *w, int64_t n0, int64_t kc, int64_t c0, int nc) {
#if WG_X86
    if (nc == NR && mmb__cpu_isa() >= 1) {
        pack_rows_avx2(pan, w, n0, kc, c0);
        return;
    }
#endif
    pack_rows_scalar(pan, w, n0, kc, c0, nc);
}

/* Panels packed together: each W row then gives TG * NR contiguous elements at once (one 64-byte line per
 * panel of bf16 read alone made the strided rows of a wide W, down_proj's, 25 % slower than the forward). */
#define TG 4

size_t mmb__wmat_t_scratch(int64_t M, int64_t N) {
    int64_t mr = mmb__gemm_own_mr(mmb__cpu_isa()), kc = N < KC ? N : KC;
    int64_t mp = (M + mr - 1) / mr * mr;
    return (size_t)(mp * kc + (int64_t)TG * NR * kc + 16);
}

void mmb__wmat_part_t(float *dx0, int64_t lddx, const float *dy, int64_t lddy, int64_t M, const mmb_wmat *w,
                      int64_t c0, int64_t c1, int accumulate, float *scratch) {
    const int64_t N = w->n;
    if (M < 1 || c1 <= c0) return;
    const int isa = mmb__cpu_isa(), MR = mmb__gemm_own_mr(isa);
    const int64_t npan = (M + MR - 1) / MR;
    float *apack = scratch, *pan = scratch + npan * MR * (N < KC ? N : KC);
    pan = (float *)(((uintptr_t)pan + 63) & ~(uintptr_t)63);
    for (int64_t n0 = 0; n0 < N; n0 += KC) {
        int64_t kc = N - n0 < KC ? N - n0 : KC;
        int load = accumulate || n0 > 0;
        for (int64_t q = 0; q < npan; q++) {
            int mr = (int)(M - q * MR < MR ? M - q * MR : MR);
            mmb__gemm_own_pack_a(apack + q * kc * MR, dy + q * MR * lddy + n0, lddy, mr, kc);
        }
        for (int64_t g = c0; g < c1; g += TG * NR) {
            int np = 0;
            for (int64_t p = g; p < c1 && np < TG; p += NR, np++) /* TG panels from the same rows */
                pack_rows(pan + np * NR * kc, w, n0, kc, p, (int)(c1 - p < NR ? c1 - p : NR));
            for (int i = 0; i < np; i++) {
                int64_t p = g + i * NR;
                int nc = (int)(c1 - p < NR ? c1 - p : NR);
                for (int64_t q = 0; q < npan; q++) {
                    int mr = (int)(M - q * MR < MR ? M - q * MR : MR);
                    mmb__gemm_own_tile(isa, mr, kc, apack + q * kc * MR, pan + i * NR * kc,
                                       dx0 + q * MR * lddx + (p - c0), lddx, nc, load, NULL);
                }
            }
        }
    }
}

void mmb__wmat_ref_t(float *dx, const float *dy, int64_t M, const mmb_wmat *w) {
    size_t es = mmb_dtype_size(w->dtype);
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < w->k; c++) {
            double acc = 0.0;
            for (int64_t n = 0; n < w->n; n++)
                acc += (double)dy[m * w->n + n] * cvt1((const unsigned char *)w->data + (size_t)(n * w->k) * es,
                                                       w->dtype, c);
            dx[m * w->k + c] = (float)acc;
        }
}
