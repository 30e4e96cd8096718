/* Vectorised math for the kernels, AVX2 and AVX-512 from one source (vecmath_isa.h, included once
 * per instruction set): the activations and the attention's online softmax. Exact in form, not
 * bit-exact: each function states its error. */
#include "tensor/tensor.h"

#include <math.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VEC_X86 1
#define VEC_ISA 1
#include "vecmath_isa.h"
#undef VEC_ISA
#define VEC_ISA 2
#include "vecmath_isa.h"
#undef VEC_ISA
#else
#define VEC_X86 0
#endif

int64_t mmb__vec_act(int isa, float *x, int64_t n, mmb_act a) {
#if VEC_X86
    if (isa == 2) return act_avx512(x, n, a);
    if (isa == 1) return act_avx2(x, n, a);
#endif
    (void)isa; (void)x; (void)n; (void)a;
    return 0;
}

void mmb__vec_softmax_cols(int isa, float *sp, int64_t nk, float *mp, float *lp, float *cp, float scale) {
#if VEC_X86
    if (isa == 2) { softmax_avx512(sp, nk, mp, lp, cp, scale); return; }
    if (isa == 1) { softmax_avx2(sp, nk, mp, lp, cp, scale); return; }
#endif
    for (int i = 0; i < 32; i++) {
        float mx = mp[i], sum = 0.0f;
        for (int64_t key = 0; key < nk; key++) mx = sp[key * 32 + i] > mx ? sp[key * 32 + i] : mx;
        for (int64_t key = 0; key < nk; key++) sum += sp[key * 32 + i] = exp2f((sp[key * 32 + i] - mx) * scale);
        cp[i] = exp2f((mp[i] - mx) * scale);
        mp[i] = mx;
        lp[i] = lp[i] * cp[i] + sum;
    }
}
