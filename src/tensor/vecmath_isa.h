/* The vector math of vecmath.c, written once and included once per instruction set: with
 * VEC_ISA 1 (AVX2 + FMA, 8 lanes) or 2 (AVX-512F, 16 lanes) defined, it defines
 * act_<isa> and softmax_<isa> (the suffix from VEC_SFX). Not a standalone header. */

#undef VF
#undef VI
#undef VN
#undef V
#undef VCASTF
#undef VABS
#undef VTARGET
#undef VSFX
#if VEC_ISA == 2
#define VF __m512
#define VI __m512i
#define VN 16
#define V(op) _mm512_##op
#define VCASTF _mm512_castsi512_ps
#define VABS _mm512_abs_ps
#define VTARGET __attribute__((target("avx512f")))
#define VSFX(name) name##_avx512
#else
#define VF __m256
#define VI __m256i
#define VN 8
#define V(op) _mm256_##op
#define VCASTF _mm256_castsi256_ps
#define VABS(x) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x)
#define VTARGET __attribute__((target("avx2,fma")))
#define VSFX(name) name##_avx2
#endif

/* c[0] x^(n-1) + c[1] x^(n-2) + ... + c[n-1], by Horner's rule. */
VTARGET static inline VF VSFX(poly)(VF x, const float *c, int n) {
    VF p = V(set1_ps)(c[0]);
    for (int i = 1; i < n; i++) p = V(fmadd_ps)(p, x, V(set1_ps)(c[i]));
    return p;
}

/* 2^n for integral n in [-126, 127], as float bits. */
VTARGET static inline VF VSFX(pow2i)(VI n) {
    return VCASTF(V(slli_epi32)(V(add_epi32)(n, V(set1_epi32)(127)), 23));
}

/* 2^t for t <= 0: n = round(t), f = t - n in [-0.5, 0.5], a degree-6 polynomial for 2^f (relative
 * error about 2e-7); below -126 it gives 2^-126 (the softmax only ever adds that to sums >= 1). */
VTARGET static inline VF VSFX(exp2_neg)(VF t) {
    t = V(max_ps)(t, V(set1_ps)(-126.0f));
    VI n = V(cvtps_epi32)(t);  /* round to nearest */
    VF f = V(sub_ps)(t, V(cvtepi32_ps)(n));
    static const float c[] = {1.5403530393381609e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
                              5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f, 1.0f};
    return V(mul_ps)(VSFX(poly)(f, c, 7), VSFX(pow2i)(n));
}

/* e^x, x clamped to [-87.3, 88] (results 1e-38 .. 1.6e38): n = round(x / ln 2), r = x - n ln 2 in
 * two parts (Cody-Waite), Cephes' expf polynomial for e^r: about 1 ulp. */
VTARGET static inline VF VSFX(exp)(VF x) {
    x = V(min_ps)(V(max_ps)(x, V(set1_ps)(-87.3f)), V(set1_ps)(88.0f));
    VI n = V(cvtps_epi32)(V(mul_ps)(x, V(set1_ps)(1.44269504088896341f)));
    VF nf = V(cvtepi32_ps)(n);
    VF r = V(fnmadd_ps)(nf, V(set1_ps)(0.693359375f), x);
    r = V(fnmadd_ps)(nf, V(set1_ps)(-2.12194440e-4f), r);
    static const float c[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                              1.6666665459e-1f, 5.0000001201e-1f};
    VF p = V(fmadd_ps)(VSFX(poly)(r, c, 6), V(mul_ps)(r, r), V(add_ps)(r, V(set1_ps)(1.0f)));
    return V(mul_ps)(p, VSFX(pow2i)(n));
}

/* x / (1 + e^(-k x')): quick_gelu (x' = x, k = 1.702), silu (k = 1), and the tanh GELU, since
 * 0.5 x (1 + tanh u) = x / (1 + e^(-2u)). */
VTARGET static inline VF VSFX(x_sigmoid)(VF x, VF arg) {
    return V(div_ps)(x, V(add_ps)(V(set1_ps)(1.0f), VSFX(exp)(V(sub_ps)(V(setzero_ps)(), arg))));
}

/* 0.5 x (1 + erf(x / sqrt 2)) = 0.5 x erfc(-x / sqrt 2), with erfc(z), z >= 0, from Numerical
 * Recipes' erfcc (relative error below 1.2e-7 for every z), and erfc(-z) = 2 - erfc(z). */
VTARGET static inline VF VSFX(gelu_erf)(VF x) {
    VF z = V(mul_ps)(VABS(x), V(set1_ps)(0.70710678118654752f));
    VF t = V(div_ps)(V(set1_ps)(1.0f), V(fmadd_ps)(z, V(set1_ps)(0.5f), V(set1_ps)(1.0f)));
    static const float c[] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                              -0.18628806f, 0.09678418f,  0.37409196f, 1.00002368f,  -1.26551223f};
    VF p = VSFX(poly)(t, c, 10);
    VF ec = V(mul_ps)(t, VSFX(exp)(V(fnmadd_ps)(z, z, p)));  /* erfc(|x| / sqrt 2) */
    VF neg = V(sub_ps)(V(set1_ps)(2.0f), ec);                /* erfc(-|x| / sqrt 2) */
#if VEC_ISA == 2
    VF e = V(mask_blend_ps)(V(cmp_ps_mask)(x, V(setzero_ps)(), _CMP_LT_OQ), neg, ec);
#else
    VF e = V(blendv_ps)(neg, ec, V(cmp_ps)(x, V(setzero_ps)(), _CMP_LT_OQ));
#endif
    return V(mul_ps)(V(mul_ps)(x, V(set1_ps)(0.5f)), e);
}

/* x[0, n) in place, whole vectors only: returns how many elements it did. */
VTARGET static int64_t VSFX(act)(float *x, int64_t n, mmb_act a) {
    int64_t i = 0;
    for (; i + VN <= n; i += VN) {
        VF v = V(loadu_ps)(x + i), y;
        switch (a) {
        case MMB_ACT_GELU: y = VSFX(gelu_erf)(v); break;
        case MMB_ACT_GELU_TANH: {
            VF u = V(mul_ps)(V(fmadd_ps)(V(mul_ps)(v, v), V(set1_ps)(0.044715f * 2.0f * 0.79788456080286536f),
                                         V(set1_ps)(2.0f * 0.79788456080286536f)), v);
            y = VSFX(x_sigmoid)(v, u);
            break;
        }
        case MMB_ACT_QUICK_GELU: y = VSFX(x_sigmoid)(v, V(mul_ps)(v, V(set1_ps)(1.702f))); break;
        case MMB_ACT_SILU: y = VSFX(x_sigmoid)(v, v); break;
        default: return i;
        }
        V(storeu_ps)(x + i, y);
    }
    return i;
}

/* The attention's online softmax over one key block: see mmb__vec_softmax_cols. */
VTARGET static void VSFX(softmax)(float *sp, int64_t nk, float *mp, float *lp, float *cp, float scale) {
    enum { NV = 32 / VN };
    VF mx[NV], ms[NV], sum[NV], sc = V(set1_ps)(scale);
    for (int v = 0; v < NV; v++) { mx[v] = V(loadu_ps)(mp + VN * v); sum[v] = V(setzero_ps)(); }
    for (int64_t key = 0; key < nk; key++)
        for (int v = 0; v < NV; v++) mx[v] = V(max_ps)(mx[v], V(load_ps)(sp + key * 32 + VN * v));
    for (int v = 0; v < NV; v++) ms[v] = V(mul_ps)(mx[v], sc);
    for (int64_t key = 0; key < nk; key++)
        for (int v = 0; v < NV; v++) {
            float *x = sp + key * 32 + VN * v;
            VF e = VSFX(exp2_neg)(V(fmsub_ps)(V(load_ps)(x), sc, ms[v]));
            V(store_ps)(x, e);
            sum[v] = V(add_ps)(sum[v], e);
        }
    for (int v = 0; v < NV; v++) {
        VF c = VSFX(exp2_neg)(V(mul_ps)(V(sub_ps)(V(loadu_ps)(mp + VN * v), mx[v]), sc));
        V(storeu_ps)(cp + VN * v, c);
        V(storeu_ps)(mp + VN * v, mx[v]);
        V(storeu_ps)(lp + VN * v, V(fmadd_ps)(V(loadu_ps)(lp + VN * v), c, sum[v]));
    }
}
