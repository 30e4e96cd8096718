/* Unit test of the own GEMM kernel (src/tensor/gemm_own.c) against the naive oracle
 * mmb__gemm_ref, for every instruction-set path this CPU has, on 1, 2 and 3 threads, over many
 * shapes (tails in M, N and K, K-block boundaries, the benchmark shapes), with and without bias.
 *
 * Per element the bound is |c - ref| <= 1e-5 * (sum_k |a_ik w_jk| + |bias_j|) + 1e-6 (the fp32
 * rounding of a K-term sum is far below 1e-5 relative to the sum of magnitudes for these K, and
 * the final rounding to fp32 of a result dominated by a large bias is relative to |bias|).
 * It also checks that results do not depend on the thread count (bitwise), that nothing outside
 * C is written, that C's previous contents (NaN here) are ignored, and that the fused activation
 * (mmb__gemm_own_act) gives the activation of the plain result. */
#include "internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((double)(rng >> 40) / (double)(1ull << 23) - 1.0);
}

typedef struct { int64_t M, N, K; } shape;

static const shape shapes[] = {
    {1, 1, 1},     {1, 7, 3},      {1, 32, 1},      {1, 33, 2},      {2, 16, 4},
    {3, 7, 3},     {5, 17, 9},     {6, 31, 16},     {7, 48, 31},     {13, 31, 17},
    {14, 32, 64},  {15, 33, 65},   {16, 64, 100},   {28, 96, 128},   {29, 65, 255},
    {31, 97, 256}, {43, 129, 257}, {57, 40, 513},   {8, 577, 577},   {577, 7, 3},
    {577, 33, 40}, {225, 100, 300}, {300, 300, 70}, {1, 4096, 300},  {2, 1000, 1024},
    {97, 257, 769}, {577, 1024, 1024},
#ifndef __SANITIZE_ADDRESS__ /* minutes in an unoptimised sanitizer build; tails are covered above */
    {576, 4096, 1024},
#endif
};
#define NSHAPES ((int)(sizeof shapes / sizeof shapes[0]))

static int passed, failed;

/* ---- reduced-precision weights (mmb__gemm_own_pack_dt / mmb__gemm_own_dt) ---------------------
 * Each dtype's kernels against the oracle on the weights the kernels compute with (W rounded to
 * the dtype and back, mmb__gemm_own_dequant), with the fp32 bound above; and the rounding itself
 * against its definition: bf16 and f16 within half an ulp of the format (2^-8, 2^-11 relative;
 * f16 subnormals 2^-25 absolute), int8 within half a step (absmax / 254) of W, with |q| <= 127.
 * A sample of shapes (every M, N, K in {1, 7, 17, 577} appears, with tails of MR, NR and KC). */
static const shape dt_shapes[] = {
    {1, 1, 1},     {1, 7, 17},    {7, 17, 1},     {17, 7, 577},   {577, 17, 7},  {13, 33, 257},
    {15, 65, 513}, {29, 577, 17}, {577, 100, 300}, {1, 577, 577}, {7, 577, 577}, {6, 32, 256},
};
#define N_DT_SHAPES ((int)(sizeof dt_shapes / sizeof dt_shapes[0]))

static void check_rounding(const float *W, const float *Wq, int64_t N, int64_t K, mmb_dtype dt, const char *name) {
    int64_t bad = 0;
    for (int64_t n = 0; n < N; n++) {
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(W[n * K + k]));
        for (int64_t k = 0; k < K; k++) {
            double w = W[n * K + k], q = Wq[n * K + k], e = fabs(w - q), lim;
            if (dt == MMB_BF16) lim = fabs(w) * 0x1p-8;
            else if (dt == MMB_F16) lim = fabs(w) * 0x1p-11 + 0x1p-25;
            else lim = amax / 254.0 * (1.0 + 1e-4);
            if (dt == MMB_I8 && amax > 0 && fabs(q / (amax / 127.0)) > 127.0 + 1e-3) bad++;
            else if (!(e <= lim)) bad++;
        }
    }
    if (bad) {
        failed++;
        fprintf(stderr, "FAIL %s rounding N=%lld K=%lld: %lld weights off their bound\n", name, (long long)N,
                (long long)K, (long long)bad);
    } else {
        passed++;
    }
}

static void test_dtypes(mmb_pool **pools, int top) {
    static const mmb_dtype dts[] = {MMB_BF16, MMB_F16, MMB_I8};
    static const char *dt_name[] = {"bf16", "f16", "int8"};
    const char *isa_name[3] = {"scalar", "avx2", "avx512"};
    double worst = 0.0;
    for (int d = 0; d < 3; d++) {
        for (int s = 0; s < N_DT_SHAPES; s++) {
            const int64_t M = dt_shapes[s].M, N = dt_shapes[s].N, K = dt_shapes[s].K;
            const size_t guard = 29;
            float *A = malloc((size_t)(M * K) * sizeof(float)), *W = malloc((size_t)(N * K) * sizeof(float));
            float *Wq = malloc((size_t)(N * K) * sizeof(float)), *bias = malloc((size_t)N * sizeof(float));
            float *ref = malloc((size_t)(M * N) * sizeof(float)), *C1 = malloc((size_t)(M * N) * sizeof(float));
            float *C = malloc(((size_t)(M * N) + guard) * sizeof(float));
            double *tol = malloc((size_t)(M * N) * sizeof(double));
            size_t pb = mmb__gemm_own_packed_bytes(N, K, dts[d]);
            void *packed = aligned_alloc(64, (pb + 63) / 64 * 64);
            float *scales = malloc((size_t)mmb__gemm_own_scales_size(N) * sizeof(float));
            if (!A || !W || !Wq || !bias || !ref || !C1 || !C || !tol || !packed || !scales) {
                fprintf(stderr, "gemm: out of memory\n");
                failed++;
                return;
            }
            for (int64_t i = 0; i < M * K; i++) A[i] = frand();
            /* rows of very different magnitudes (int8 scales per row), and some f16 subnormals */
            for (int64_t n = 0; n < N; n++) {
                float mag = (n % 3 == 0) ? 1e-2f : (n % 3 == 1) ? 1.0f : 30.0f;
                for (int64_t k = 0; k < K; k++) W[n * K + k] = mag * frand();
            }
            if (N * K > 2) W[1] = 3e-6f;
            for (int64_t i = 0; i < N; i++) bias[i] = 4.0f * frand();
            mmb__gemm_own_dequant(Wq, W, N, K, dts[d]);
            check_rounding(W, Wq, N, K, dts[d], dt_name[d]);
            mmb__gemm_own_pack_dt(packed, scales, W, N, K, dts[d]);
            mmb__gemm_ref(ref, A, Wq, bias, M, N, K);
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) {
                    double m = fabs((double)bias[j]);
                    for (int64_t k = 0; k < K; k++) m += fabs((double)A[i * K + k] * Wq[j * K + k]);
                    tol[i * N + j] = 1e-5 * m + 1e-6;
                }
            for (int isa = top; isa >= 0; isa--) {
                mmb__cpu_force_isa(isa);
                for (int t = 1; t <= 2; t++) {
                    for (size_t i = 0; i < (size_t)(M * N); i++) C[i] = NAN;
                    for (size_t i = 0; i < guard; i++) C[(size_t)(M * N) + i] = 12345.0f;
                    mmb__gemm_own_force_pack_a(t == 2); /* and t == 1 in place: bit-identical */
                    mmb__gemm_own_dt(pools[t], C, A, packed, scales, dts[d], bias, M, N, K, MMB_ACT_NONE);
                    int64_t bad = 0, bad_at = -1;
                    double maxratio = 0.0;
                    for (int64_t i = 0; i < M * N; i++) {
                        double e = fabs((double)C[i] - (double)ref[i]);
                        if (!(e <= tol[i]) && bad++ == 0) bad_at = i;
                        if (!(e / tol[i] <= maxratio)) maxratio = isnan(e) ? INFINITY : e / tol[i];
                    }
                    int guard_ok = 1;
                    for (size_t i = 0; i < guard; i++) guard_ok &= C[(size_t)(M * N) + i] == 12345.0f;
                    int det_ok = 1;
                    if (t == 1) memcpy(C1, C, (size_t)(M * N) * sizeof(float));
                    else det_ok = memcmp(C1, C, (size_t)(M * N) * sizeof(float)) == 0;
                    if (maxratio > worst) worst = maxratio;
                    if (bad || !guard_ok || !det_ok) {
                        failed++;
                        fprintf(stderr, "FAIL gemm %s M=%lld N=%lld K=%lld isa=%s threads=%d (A packed at 2): %lld out of bound "
                                "(first at %lld: got %g want %g), max err / bound %.3g%s%s\n", dt_name[d],
                                (long long)M, (long long)N, (long long)K, isa_name[isa], t, (long long)bad,
                                (long long)bad_at, bad_at >= 0 ? (double)C[bad_at] : 0.0,
                                bad_at >= 0 ? (double)ref[bad_at] : 0.0, maxratio,
                                guard_ok ? "" : ", wrote past C", det_ok ? "" : ", differs from 1 thread");
                    } else {
                        passed++;
                    }
                }
            }
            free(A); free(W); free(Wq); free(bias); free(ref); free(C1); free(C); free(tol); free(packed);
            free(scales);
        }
    }
    mmb__cpu_force_isa(-1);
    mmb__gemm_own_force_pack_a(-1);
    printf("gemm bf16/f16/int8: max error / bound %.3g (isa up to %s)\n", worst, isa_name[top]);
}

int main(void) {
    const char *isa_name[3] = {"scalar", "avx2", "avx512"};
    mmb__cpu_force_isa(-1);
    int hw = mmb__cpu_isa();
    /* what the CPU has, whatever MMB_GEMM_ISA says */
    mmb__cpu_force_isa(2);
    int top = mmb__cpu_isa();
    printf("gemm: automatic isa %s, cpu offers up to %s\n", isa_name[hw], isa_name[top]);

    mmb_pool *pools[4] = {0};
    for (int t = 1; t <= 3; t++) {
        if (mmb__pool_new(t, &pools[t]) != MMB_OK) {
            fprintf(stderr, "gemm: cannot create a pool of %d threads\n", t);
            return 1;
        }
    }
    double worst_ratio = 0.0, worst_abs = 0.0;

    for (int s = 0; s < NSHAPES; s++) {
        const int64_t M = shapes[s].M, N = shapes[s].N, K = shapes[s].K;
        const size_t guard = 37;
        float *A = malloc((size_t)(M * K) * sizeof(float));
        float *W = malloc((size_t)(N * K) * sizeof(float));
        float *bias = malloc((size_t)N * sizeof(float));
        float *ref = malloc((size_t)(M * N) * sizeof(float));
        double *tol = malloc((size_t)(M * N) * sizeof(double));
        float *C = malloc(((size_t)(M * N) + guard) * sizeof(float));
        float *C1 = malloc((size_t)(M * N) * sizeof(float));
        float *Cact = malloc((size_t)(M * N) * sizeof(float));
        size_t psz = mmb__gemm_own_packed_size(N, K);
        float *packed = aligned_alloc(64, (psz * sizeof(float) + 63) / 64 * 64);
        if (!A || !W || !bias || !ref || !tol || !C || !C1 || !Cact || !packed) {
            fprintf(stderr, "gemm: out of memory\n");
            return 1;
        }
        for (int64_t i = 0; i < M * K; i++) A[i] = frand();
        for (int64_t i = 0; i < N * K; i++) W[i] = frand();
        for (int64_t i = 0; i < N; i++) bias[i] = 4.0f * frand();
        mmb__gemm_own_pack(packed, W, N, K);

        for (int with_bias = 0; with_bias < 2; with_bias++) {
            const float *b = with_bias ? bias : NULL;
            mmb__gemm_ref(ref, A, W, b, M, N, K);
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) {
                    double m = 0.0;
                    for (int64_t k = 0; k < K; k++) m += fabs((double)A[i * K + k] * W[j * K + k]);
                    if (b) m += fabs((double)b[j]);
                    tol[i * N + j] = 1e-5 * m + 1e-6;
                }
            for (int isa = top; isa >= 0; isa--) {
                mmb__cpu_force_isa(isa);
                if (mmb__cpu_isa() != isa) {
                    fprintf(stderr, "gemm: forcing isa %d gave %d\n", isa, mmb__cpu_isa());
                    failed++;
                    continue;
                }
                for (int t = 1; t <= 3; t++) {
                    for (size_t i = 0; i < (size_t)(M * N); i++) C[i] = NAN;
                    for (size_t i = 0; i < guard; i++) C[(size_t)(M * N) + i] = 12345.0f;
                    mmb__gemm_own_force_pack_a(t == 2); /* and t == 1 in place: bit-identical */
                    mmb__gemm_own(pools[t], C, A, packed, b, M, N, K);
                    double maxerr = 0.0, maxratio = 0.0;
                    int64_t bad = 0, bad_at = -1;
                    for (int64_t i = 0; i < M * N; i++) {
                        double e = fabs((double)C[i] - (double)ref[i]);
                        if (!(e <= tol[i])) { /* catches NaN too */
                            if (bad++ == 0) bad_at = i;
                        }
                        if (e > maxerr || isnan(e)) maxerr = isnan(e) ? INFINITY : e;
                        if (e / tol[i] > maxratio || isnan(e)) maxratio = isnan(e) ? INFINITY : e / tol[i];
                    }
                    int guard_ok = 1;
                    for (size_t i = 0; i < guard; i++)
                        if (C[(size_t)(M * N) + i] != 12345.0f) guard_ok = 0;
                    int det_ok = 1;
                    if (t == 1) memcpy(C1, C, (size_t)(M * N) * sizeof(float));
                    else det_ok = memcmp(C1, C, (size_t)(M * N) * sizeof(float)) == 0;
                    if (maxerr > worst_abs) worst_abs = maxerr;
                    if (maxratio > worst_ratio) worst_ratio = maxratio;
                    if (bad || !guard_ok || !det_ok) {
                        failed++;
                        fprintf(stderr,
                                "FAIL gemm M=%lld N=%lld K=%lld bias=%d isa=%s threads=%d (A packed at 2): "
                                "%lld elements out of bound (first at %lld: got %g want %g tol %g), "
                                "max err %g (%.3g x bound)%s%s\n",
                                (long long)M, (long long)N, (long long)K, with_bias, isa_name[isa],
                                t, (long long)bad, (long long)bad_at,
                                bad_at >= 0 ? (double)C[bad_at] : 0.0,
                                bad_at >= 0 ? (double)ref[bad_at] : 0.0,
                                bad_at >= 0 ? tol[bad_at] : 0.0, maxerr, maxratio,
                                guard_ok ? "" : ", wrote past C", det_ok ? "" : ", differs from 1 thread");
                    } else {
                        passed++;
                    }
                    if (t != 2 || !with_bias) continue;
                    /* With the activation fused: act of the plain result (the vector and libm paths of
                     * mmb__act_forward may split differently, so within its few-ulp bound). */
                    for (size_t i = 0; i < (size_t)(M * N); i++) C[i] = NAN;
                    mmb__gemm_own_act(pools[t], C, A, packed, b, M, N, K, MMB_ACT_QUICK_GELU);
                    memcpy(Cact, C1, (size_t)(M * N) * sizeof(float));
                    mmb__act_forward(Cact, M * N, MMB_ACT_QUICK_GELU);
                    int64_t off = 0;
                    for (int64_t i = 0; i < M * N; i++)
                        if (!(fabs((double)C[i] - Cact[i]) <= 4e-6 * fabs((double)Cact[i]) + 1e-7)) off++;
                    if (off) {
                        failed++;
                        fprintf(stderr, "FAIL gemm+quick_gelu M=%lld N=%lld K=%lld isa=%s threads=%d: %lld elements "
                                "differ from quick_gelu(gemm)\n", (long long)M, (long long)N, (long long)K,
                                isa_name[isa], t, (long long)off);
                    } else {
                        passed++;
                    }
                }
            }
        }
        free(A); free(W); free(bias); free(ref); free(tol); free(C); free(C1); free(Cact); free(packed);
    }
    test_dtypes(pools, top);
    mmb__cpu_force_isa(-1);
    for (int t = 1; t <= 3; t++) mmb__pool_free(pools[t]);
    printf("gemm: max abs error %.3g, max error / bound %.3g\n", worst_abs, worst_ratio);
    printf("gemm: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
