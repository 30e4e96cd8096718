/* Elementwise and normalisation kernels. Each has a plain `_ref` twin kept as the test oracle;
 * the fast versions are written so the compiler vectorises them (one pass, no branches inside). */
#include "tensor/tensor.h"

#include <math.h>
#include <string.h>

static const struct { const char *name; mmb_act act; } act_names[] = {
    {"gelu", MMB_ACT_GELU},           {"gelu_pytorch_tanh", MMB_ACT_GELU_TANH},
    {"gelu_new", MMB_ACT_GELU_TANH},  {"gelu_fast", MMB_ACT_GELU_TANH},
    {"quick_gelu", MMB_ACT_QUICK_GELU}, {"silu", MMB_ACT_SILU},
    {"swish", MMB_ACT_SILU},          {"relu", MMB_ACT_RELU},
};

bool mmb__act_parse(const char *name, mmb_act *out) {
    for (size_t i = 0; i < sizeof act_names / sizeof act_names[0]; i++)
        if (strcmp(name, act_names[i].name) == 0) { *out = act_names[i].act; return true; }
    return false;
}

const char *mmb__act_name(mmb_act a) {
    switch (a) {
    case MMB_ACT_NONE: return "";
    case MMB_ACT_GELU: return "gelu";
    case MMB_ACT_GELU_TANH: return "gelu_pytorch_tanh";
    case MMB_ACT_QUICK_GELU: return "quick_gelu";
    case MMB_ACT_SILU: return "silu";
    case MMB_ACT_RELU: return "relu";
    }
    return "";
}

/* ---- references: double precision, straight from the definitions ---- */

static double act_ref1(double x, mmb_act a) {
    switch (a) {
    case MMB_ACT_NONE: return x;
    case MMB_ACT_GELU: return 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
    case MMB_ACT_GELU_TANH: return 0.5 * x * (1.0 + tanh(sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    case MMB_ACT_QUICK_GELU: return x / (1.0 + exp(-1.702 * x));
    case MMB_ACT_SILU: return x / (1.0 + exp(-x));
    case MMB_ACT_RELU: return x > 0 ? x : 0.0;
    }
    return x;
}

void mmb__act_forward_ref(float *x, int64_t n, mmb_act a) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)act_ref1(x[i], a);
}

void mmb__layernorm_forward_ref(float *out, const float *x, const float *w, const float *b,
                                int64_t M, int64_t C, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * C;
        double mean = 0, var = 0;
        for (int64_t c = 0; c < C; c++) mean += r[c];
        mean /= (double)C;
        for (int64_t c = 0; c < C; c++) var += (r[c] - mean) * (r[c] - mean);
        var /= (double)C;
        double rs = 1.0 / sqrt(var + eps);
        for (int64_t c = 0; c < C; c++)
            out[m * C + c] = (float)((r[c] - mean) * rs * w[c] + (b ? b[c] : 0.0));
    }
}

void mmb__add_forward_ref(float *out, const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void mmb__rmsnorm_forward_ref(float *out, const float *x, const float *w, int64_t M, int64_t C, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * C;
        double ss = 0;
        for (int64_t c = 0; c < C; c++) ss += (double)r[c] * r[c];
        double rs = 1.0 / sqrt(ss / (double)C + eps);
        for (int64_t c = 0; c < C; c++) out[m * C + c] = (float)(r[c] * rs * w[c]);
    }
}

void mmb__mul_forward_ref(float *out, const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = a[i] * b[i];
}

/* ---- fast versions ---- */

/* The libm versions: the tail the vector code leaves, and CPUs without AVX2. */
MMB_SIMD_CLONES static void act_libm(float *x, int64_t n, mmb_act a) {
    switch (a) {
    case MMB_ACT_NONE: break;
    case MMB_ACT_GELU:
        for (int64_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
        break;
    case MMB_ACT_GELU_TANH:
        for (int64_t i = 0; i < n; i++) {
            float v = x[i];
            x[i] = 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        }
        break;
    case MMB_ACT_QUICK_GELU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + expf(-1.702f * x[i]));
        break;
    case MMB_ACT_SILU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
        break;
    case MMB_ACT_RELU:
        for (int64_t i = 0; i < n; i++) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
        break;
    }
}

void mmb__act_forward(float *x, int64_t n, mmb_act a) {
    int64_t done = mmb__vec_act(mmb__cpu_isa(), x, n, a);
    act_libm(x + done, n - done, a);
}

MMB_SIMD_CLONES void mmb__layernorm_forward(float *out, const float *x, const float *w, const float *b,
                            int64_t M, int64_t C, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * C;
        float *o = out + m * C;
        float sum = 0;
        for (int64_t c = 0; c < C; c++) sum += r[c];
        float mean = sum / (float)C, ss = 0;
        for (int64_t c = 0; c < C; c++) ss += (r[c] - mean) * (r[c] - mean);
        float rs = 1.0f / sqrtf(ss / (float)C + eps);
        for (int64_t c = 0; c < C; c++) o[c] = (r[c] - mean) * rs * w[c] + (b ? b[c] : 0.0f);
    }
}

MMB_SIMD_CLONES void mmb__add_forward(float *out, const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

MMB_SIMD_CLONES void mmb__rmsnorm_forward(float *out, const float *x, const float *w, int64_t M, int64_t C,
                                          float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * C;
        float *o = out + m * C;
        float ss = 0;
        for (int64_t c = 0; c < C; c++) ss += r[c] * r[c];
        float rs = 1.0f / sqrtf(ss / (float)C + eps);
        for (int64_t c = 0; c < C; c++) o[c] = r[c] * rs * w[c];
    }
}

MMB_SIMD_CLONES void mmb__mul_forward(float *out, const float *a, const float *b, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = a[i] * b[i];
}

/* ---- threaded wrappers ---- */

typedef struct {
    float *out;
    const float *x, *w, *b;
    int64_t rows, cols;
    float eps;
    mmb_act act;
} row_job;

static void act_task(void *arg, int tid, int nth) {
    row_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->rows, tid, nth, &lo, &hi);
    mmb__act_forward(j->out + lo, hi - lo, j->act);
}

void mmb__act_forward_mt(mmb_ctx *ctx, float *x, int64_t n, mmb_act a) {
    if (a == MMB_ACT_NONE) return;
    row_job j = {.out = x, .rows = n, .act = a};
    mmb__pool_run(ctx->pool, act_task, &j);
}

static void ln_task(void *arg, int tid, int nth) {
    row_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->rows, tid, nth, &lo, &hi);
    mmb__layernorm_forward(j->out + lo * j->cols, j->x + lo * j->cols, j->w, j->b, hi - lo, j->cols, j->eps);
}

void mmb__layernorm_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w,
                               const float *b, int64_t M, int64_t C, float eps) {
    row_job j = {out, x, w, b, M, C, eps, MMB_ACT_NONE};
    mmb__pool_run(ctx->pool, ln_task, &j);
}

static void rms_task(void *arg, int tid, int nth) {
    row_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->rows, tid, nth, &lo, &hi);
    mmb__rmsnorm_forward(j->out + lo * j->cols, j->x + lo * j->cols, j->w, hi - lo, j->cols, j->eps);
}

void mmb__rmsnorm_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w, int64_t M, int64_t C,
                             float eps) {
    row_job j = {out, x, w, NULL, M, C, eps, MMB_ACT_NONE};
    mmb__pool_run(ctx->pool, rms_task, &j);
}

typedef struct { float *out; const float *a, *b; int64_t n; } add_job;

static void add_task(void *arg, int tid, int nth) {
    add_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->n / 16, tid, nth, &lo, &hi);  /* 64-byte pieces: no cache line written by two threads */
    lo *= 16;
    hi = tid == nth - 1 ? j->n : hi * 16;
    mmb__add_forward(j->out + lo, j->a + lo, j->b + lo, hi - lo);
}

void mmb__add_forward_mt(mmb_ctx *ctx, float *out, const float *a, const float *b, int64_t n) {
    add_job j = {out, a, b, n};
    mmb__pool_run(ctx->pool, add_task, &j);
}
