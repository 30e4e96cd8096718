/* Multi-head attention, self- (one fused QKV buffer) or cross- (separate Q, K, V with their own
 * row strides and lengths): blocked, with an online softmax, so no score matrix larger than one
 * QB x KB tile ever exists; threaded over (batch, head, query block). The naive version (full score
 * rows, double accumulation) is kept as the oracle. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define QB 32   /* queries per tile */
#define KB 64   /* keys per tile */

/* exp(x) for x <= 0 (arguments of the online softmax), written so the compiler vectorises it:
 * 2^(x log2 e) split into 2^n * 2^f, f in [-0.5, 0.5], with a degree-6 polynomial for 2^f
 * (relative error about 2e-7, on the order of expf's own). */
static inline float exp_neg(float x) {
    float t = x * 1.44269504088896341f;
    t = t < -126.0f ? -126.0f : t;
    int32_t ni = (int32_t)(t - 0.5f);  /* t <= 0: truncation of t - 0.5 rounds to nearest */
    float n = (float)ni, f = t - n;
    float p = 1.5403530393381609e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { float f; int32_t i; } u = {.i = (ni + 127) << 23};
    return p * u.f;
}

size_t mmb__attention_scratch(int nth, int64_t head_dim) {
    return (size_t)nth * (size_t)(QB * KB + QB * head_dim + KB * head_dim + 2 * QB);
}

typedef struct {
    float *out;
    const float *q, *k, *v;
    int64_t ldq, ldkv;        /* row strides of q and of k, v */
    int64_t batch, tq, tk, heads, hd;
    float *scratch;
} attn_job;

/* One tile of queries [q0, q0+nq) of head h in image b: out rows = softmax(q k^T * s) v. */
MMB_SIMD_CLONES static void attn_tile(const attn_job *j, float *sc, int64_t b, int64_t h, int64_t q0, int64_t nq) {
    int64_t Tk = j->tk, hd = j->hd, D = j->heads * hd, ldq = j->ldq, ld = j->ldkv;
    float *s = sc, *acc = s + QB * KB, *kt = acc + QB * hd, *m = kt + KB * hd, *l = m + QB;
    const float *qb = j->q + b * j->tq * ldq, *kb = j->k + b * Tk * ld, *vb = j->v + b * Tk * ld;
    float scale = 1.0f / sqrtf((float)hd);
    for (int64_t i = 0; i < nq; i++) { m[i] = -INFINITY; l[i] = 0.0f; }
    memset(acc, 0, sizeof(float) * (size_t)(nq * hd));
    for (int64_t k0 = 0; k0 < Tk; k0 += KB) {
        int64_t nk = Tk - k0 < KB ? Tk - k0 : KB;
        /* K tile transposed: kt[d][j] so the score loop runs over contiguous keys. */
        for (int64_t jj = 0; jj < nk; jj++) {
            const float *kr = kb + (k0 + jj) * ld + h * hd;
            for (int64_t d = 0; d < hd; d++) kt[d * KB + jj] = kr[d];
        }
        for (int64_t i = 0; i < nq; i++) {
            const float *qr = qb + (q0 + i) * ldq + h * hd;
            float *si = s + i * KB;
            for (int64_t jj = 0; jj < nk; jj++) si[jj] = 0.0f;
            for (int64_t d = 0; d < hd; d++) {
                float qd = qr[d] * scale;
                const float *kd = kt + d * KB;
                for (int64_t jj = 0; jj < nk; jj++) si[jj] += qd * kd[jj];
            }
            float mx = m[i];
            for (int64_t jj = 0; jj < nk; jj++) mx = si[jj] > mx ? si[jj] : mx;
            float corr = exp_neg(m[i] - mx), sum = 0.0f;
            for (int64_t jj = 0; jj < nk; jj++) {
                si[jj] = exp_neg(si[jj] - mx);
                sum += si[jj];
            }
            m[i] = mx;
            l[i] = l[i] * corr + sum;
            float *ai = acc + i * hd;
            for (int64_t d = 0; d < hd; d++) ai[d] *= corr;
            for (int64_t jj = 0; jj < nk; jj++) {
                const float *vr = vb + (k0 + jj) * ld + h * hd;
                float p = si[jj];
                for (int64_t d = 0; d < hd; d++) ai[d] += p * vr[d];
            }
        }
    }
    for (int64_t i = 0; i < nq; i++) {
        float *o = j->out + (b * j->tq + q0 + i) * D + h * hd, inv = 1.0f / l[i];
        for (int64_t d = 0; d < hd; d++) o[d] = acc[i * hd + d] * inv;
    }
}

static void attn_task(void *arg, int tid, int nth) {
    const attn_job *j = arg;
    int64_t qblocks = (j->tq + QB - 1) / QB, n = j->batch * j->heads * qblocks, lo, hi;
    mmb__split(n, tid, nth, &lo, &hi);
    float *sc = j->scratch + (size_t)tid * (size_t)(QB * KB + QB * j->hd + KB * j->hd + 2 * QB);
    for (int64_t w = lo; w < hi; w++) {
        int64_t qb = w % qblocks, h = (w / qblocks) % j->heads, b = w / (qblocks * j->heads);
        int64_t q0 = qb * QB, nq = j->tq - q0 < QB ? j->tq - q0 : QB;
        attn_tile(j, sc, b, h, q0, nq);
    }
}

void mmb__cross_attention_forward(mmb_ctx *ctx, float *out, const float *q, const float *k, const float *v,
                                  int64_t ldq, int64_t ldkv, int64_t batch, int64_t tq, int64_t tk, int64_t heads,
                                  int64_t head_dim, float *scratch) {
    attn_job j = {out, q, k, v, ldq, ldkv, batch, tq, tk, heads, head_dim, scratch};
    mmb__pool_run(ctx->pool, attn_task, &j);
}

void mmb__attention_forward(mmb_ctx *ctx, float *out, const float *qkv, int64_t batch, int64_t tokens,
                            int64_t heads, int64_t head_dim, float *scratch) {
    int64_t D = heads * head_dim;
    mmb__cross_attention_forward(ctx, out, qkv, qkv + D, qkv + 2 * D, 3 * D, 3 * D, batch, tokens, tokens, heads,
                                 head_dim, scratch);
}

bool mmb__cross_attention_forward_ref(float *out, const float *q, const float *k, const float *v, int64_t ldq,
                                      int64_t ldkv, int64_t batch, int64_t tq, int64_t tk, int64_t heads,
                                      int64_t head_dim) {
    int64_t D = heads * head_dim;
    double scale = 1.0 / sqrt((double)head_dim);
    double *p = malloc(sizeof(double) * (size_t)tk);
    if (!p) return false;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t i = 0; i < tq; i++) {
                const float *qr = q + (b * tq + i) * ldq + h * head_dim;
                double mx = -INFINITY, sum = 0;
                for (int64_t j = 0; j < tk; j++) {
                    const float *kr = k + (b * tk + j) * ldkv + h * head_dim;
                    double dot = 0;
                    for (int64_t d = 0; d < head_dim; d++) dot += (double)qr[d] * kr[d];
                    p[j] = dot * scale;
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int64_t j = 0; j < tk; j++) sum += (p[j] = exp(p[j] - mx));
                float *o = out + (b * tq + i) * D + h * head_dim;
                for (int64_t d = 0; d < head_dim; d++) {
                    double a = 0;
                    for (int64_t j = 0; j < tk; j++) a += p[j] * v[(b * tk + j) * ldkv + h * head_dim + d];
                    o[d] = (float)(a / sum);
                }
            }
    free(p);
    return true;
}

bool mmb__attention_forward_ref(float *out, const float *qkv, int64_t batch, int64_t tokens, int64_t heads,
                                int64_t head_dim) {
    int64_t D = heads * head_dim;
    return mmb__cross_attention_forward_ref(out, qkv, qkv + D, qkv + 2 * D, 3 * D, 3 * D, batch, tokens, tokens,
                                            heads, head_dim);
}
