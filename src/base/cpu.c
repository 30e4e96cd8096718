/* The CPU's vector instruction set, probed once: what every kernel dispatches on (base/base.h). */
#include "base/base.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define MMB_X86 1
#include <cpuid.h>
#else
#define MMB_X86 0
#endif

/* -1: not yet resolved. Resolved once; a racing first call resolves to the same value. */
static int g_isa = -1;
static int g_hw_isa = -1;

#if MMB_X86
/* F16C (CPUID.1:ECX bit 29), asked of CPUID directly: clang's __builtin_cpu_supports has no "f16c". */
static bool has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
}
#endif

/* What the CPU offers (and the OS enables: __builtin_cpu_supports checks XCR0 too). Level 1 also needs
 * F16C, which every AVX2 CPU has, so the f16-weight paths can assume it. */
static int hw_isa(void) {
    int v = __atomic_load_n(&g_hw_isa, __ATOMIC_RELAXED);
    if (v < 0) {
        v = 0;
#if MMB_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c()) v = 1;
        if (v == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
            v = 2;
#endif
        __atomic_store_n(&g_hw_isa, v, __ATOMIC_RELAXED);
    }
    return v;
}

/* The CPU's best, lowered by MMB_GEMM_ISA=avx2|avx512|scalar (the name the GEMM benchmarks set) (it can never raise it). */
static int detect_isa(void) {
    int v = hw_isa();
    const char *e = getenv("MMB_GEMM_ISA");
    if (e) {
        int want = v;
        if (!strcmp(e, "scalar")) want = 0;
        else if (!strcmp(e, "avx2")) want = 1;
        else if (!strcmp(e, "avx512")) want = 2;
        if (want < v) v = want;
    }
    return v;
}

int mmb__cpu_isa(void) {
    int v = __atomic_load_n(&g_isa, __ATOMIC_RELAXED);
    if (v < 0) {
        v = detect_isa();
        __atomic_store_n(&g_isa, v, __ATOMIC_RELAXED);
    }
    return v;
}

void mmb__cpu_force_isa(int isa) {
    int v = isa < 0 ? detect_isa() : (isa < hw_isa() ? isa : hw_isa());
    __atomic_store_n(&g_isa, v, __ATOMIC_RELAXED);
}

