/* IEEE half and bfloat16 conversions (round to nearest even on the way down). */
#include "tensor/tensor.h"

#include <string.h>

static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

float mmb__bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t mmb__f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float mmb__f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0) return bits_f32(sign);
        float v = (float)man * (1.0f / 16777216.0f); /* man * 2^-24 */
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

uint16_t mmb__f32_to_f16(float f) {
    uint32_t u = f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to inf */
    if (a < 0x38800000u) {                                   /* subnormal or zero in half */
        float v = bits_f32(a) * 16777216.0f;                 /* scale by 2^24, round to int */
        uint32_t m = (uint32_t)__builtin_nearbyintf(v);
        return (uint16_t)(sign | m);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static const struct { const char *name; size_t size; } dtypes[] = {
    [MMB_F32] = {"F32", 4},  [MMB_F16] = {"F16", 2}, [MMB_BF16] = {"BF16", 2},
    [MMB_F64] = {"F64", 8},  [MMB_I64] = {"I64", 8}, [MMB_I32] = {"I32", 4},
    [MMB_I16] = {"I16", 2},  [MMB_I8] = {"I8", 1},   [MMB_U8] = {"U8", 1},
    [MMB_BOOL] = {"BOOL", 1}, [MMB_U16] = {"U16", 2}, [MMB_U32] = {"U32", 4},
    [MMB_U64] = {"U64", 8},  [MMB_F8_E4M3] = {"F8_E4M3", 1}, [MMB_F8_E5M2] = {"F8_E5M2", 1},
};
#define N_DTYPES ((int)(sizeof dtypes / sizeof dtypes[0]))

size_t mmb_dtype_size(mmb_dtype t) { return (int)t >= 0 && (int)t < N_DTYPES ? dtypes[t].size : 0; }

const char *mmb_dtype_name(mmb_dtype t) { return (int)t >= 0 && (int)t < N_DTYPES ? dtypes[t].name : "?"; }

bool mmb__dtype_parse(const char *name, mmb_dtype *out) {
    for (int i = 0; i < N_DTYPES; i++)
        if (strcmp(name, dtypes[i].name) == 0) { *out = (mmb_dtype)i; return true; }
    return false;
}

bool mmb__dtype_is_float(mmb_dtype t) { return t == MMB_F32 || t == MMB_F16 || t == MMB_BF16; }

int64_t mmb_tensor_numel(const mmb_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

/* The i-th 16-bit element of a buffer with no alignment promise. */
static uint16_t load16(const unsigned char *p, size_t i) {
    uint16_t v;
    memcpy(&v, p + 2 * i, 2);
    return v;
}

mmb_status mmb_to_f32(float *dst, const void *src, mmb_dtype t, size_t n) {
    const unsigned char *h = src;
    switch (t) {
    case MMB_F32: memcpy(dst, src, n * 4); return MMB_OK;
    case MMB_F16: for (size_t i = 0; i < n; i++) dst[i] = mmb__f16_to_f32(load16(h, i)); return MMB_OK;
    case MMB_BF16: for (size_t i = 0; i < n; i++) dst[i] = mmb__bf16_to_f32(load16(h, i)); return MMB_OK;
    default: return MMB_ERR_UNSUPPORTED;
    }
}
