/* Multi-head attention, self- (one fused QKV buffer) or cross- (separate Q, K, V with their own row
 * strides and lengths, K/V possibly with fewer heads: grouped-query attention), blocked like a GEMM: no score tile larger
 * than KB x 32 ever exists, the softmax is online, and work is threaded over (batch, head, block of
 * queries). The naive version (full score rows, double accumulation) is the oracle.
 *
 * Per work unit (up to QB queries of one head) the two products run on the GEMM's micro-kernel
 * (mmb__gemm_own_tile), in the transposed form, which needs no O(N^2) data movement:
 *   S^T (keys x queries) = K Q^T     A = K block, MR keys per micro-panel (packed per key block)
 *                                    B = Q^T in panels of 32 queries (packed once per unit)
 *   softmax over each column of S^T (one query) in base 2: running max m and sum l per query,
 *   vectorised across the 32 queries of a panel; the exponentials overwrite S^T in place, which is
 *   then exactly the B panel layout of
 *   O^T (head_dim x queries) += V^T P^T  A = V^T block, MR head dims per micro-panel
 *                                        B = P^T (the tile of S^T), C = O^T, rescaled by
 *                                            2^(m_old - m_new) before each key block
 *   out = (O^T)^T / l.
 * For each key block (a multiple of MR keys, at most KB_MAX, packed once per unit) the query panels
 * go one after the other through all three steps, so one S^T tile of at most KB_CAP x 32 is all the score
 * memory there is, and a unit can hold many queries: K and V are packed once per unit, and with
 * up to QB = 640 queries a unit covers a whole head of CLIP ViT-L/14-336 (577 tokens). */
#include "tensor/tensor.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QP 32            /* queries per panel: the micro-kernel's panel width */
#define QB (20 * QP)     /* queries per work unit, at most */
#define KB_MAX 126       /* keys per block, before rounding up to a multiple of the kernel's MR */
#define MR_CAP 16        /* >= every kernel's MR */
#define KB_CAP (KB_MAX + MR_CAP)  /* keys per block, at most */
#define PF_ROWS 12       /* K, V rows prefetched ahead while packing */

/* Floats of one thread's scratch, each piece a multiple of 16 floats (64 bytes). */
static size_t piece(size_t n) { return (n + 15) / 16 * 16; }
static size_t per_thread(int64_t hd) {
    size_t h = (size_t)hd;
    return piece(QB * h) +                           /* qp: Q^T panels */
           piece(KB_CAP * h) +                       /* kp: K micro-panels */
           piece((h + MR_CAP) * KB_CAP) +            /* vp: V^T micro-panels */
           piece(QP * KB_CAP) +                      /* st: one panel of S^T, then P^T */
           piece(h * QB) +                           /* ot: O^T */
           piece(3 * QB) + 16;                       /* m, l, corr; 16: to align the start */
}

size_t mmb__attention_scratch(int nth, int64_t head_dim) { return (size_t)nth * per_thread(head_dim); }

typedef struct {
    float *out;
    const float *q, *k, *v;
    int64_t ldq, ldkv;        /* row strides of q and of k, v */
    int64_t batch, tq, tk, heads, group, hd;  /* query head h reads K/V head h / group */
    float *scratch;
    int isa, mr;              /* micro-kernel */
    int64_t kb, qb;           /* keys per block, queries per unit */
} attn_job;

typedef struct { float *qp, *kp, *vp, *st, *ot, *m, *l, *corr; } attn_bufs;

/* Queries [q0, q0 + nq) of head h in image b: out rows = softmax(q k^T / sqrt(hd)) v. */
MMB_SIMD_CLONES static void attn_unit(const attn_job *j, const attn_bufs *w, int64_t b, int64_t h, int64_t q0,
                                      int64_t nq) {
    const int isa = j->isa, MR = j->mr;
    const int64_t hd = j->hd, tk = j->tk, ldq = j->ldq, ld = j->ldkv, kb = j->kb;
    const int64_t hk = h / j->group * hd;
    const float *Q = j->q + (b * j->tq + q0) * ldq + h * hd, *K = j->k + b * tk * ld + hk;
    const float *V = j->v + b * tk * ld + hk;
    float *qp = w->qp, *kp = w->kp, *vp = w->vp, *st = w->st, *ot = w->ot, *m = w->m, *l = w->l, *corr = w->corr;
    const int npan = (int)((nq + QP - 1) / QP);
    /* Scores are scaled (by 1/sqrt(hd), and log2(e) for base 2) inside the exponent, so Q is packed
     * unrounded. */
    const float scale = 1.4426950408889634f / sqrtf((float)hd);
    /* Q^T panels: element (d, query i) of panel p at (p * hd + d) * QP + i; missing queries are 0. */
    for (int64_t i = 0; i < npan * QP; i++) {
        float *dst = qp + (i / QP) * hd * QP + i % QP;
        if (i + PF_ROWS < nq)
            for (int64_t d = 0; d < hd; d += 16) __builtin_prefetch(Q + (i + PF_ROWS) * ldq + d);
        if (i < nq)
            for (int64_t d = 0; d < hd; d++) dst[d * QP] = Q[i * ldq + d];
        else
            for (int64_t d = 0; d < hd; d++) dst[d * QP] = 0.0f;
    }
    for (int64_t i = 0; i < npan * QP; i++) { m[i] = -INFINITY; l[i] = 0.0f; }
    const int dpan = (int)((hd + MR - 1) / MR);
    for (int64_t k0 = 0; k0 < tk; k0 += kb) {
        const int64_t nk = tk - k0 < kb ? tk - k0 : kb;
        const int kpan = (int)((nk + MR - 1) / MR);
        /* K micro-panels: element (d, key i) of panel r at (r * hd + d) * MR + i; V^T micro-panels:
         * element (key, dim s * MR + i) at (s * kb + key) * MR + i. The rows are far apart (a
         * fused QKV row each): fetch a few ahead. */
        for (int64_t key = 0; key < nk; key++) {
            const float *kr = K + (k0 + key) * ld, *vr = V + (k0 + key) * ld;
            if (k0 + key + PF_ROWS < tk)
                for (int64_t d = 0; d < hd; d += 16) {
                    __builtin_prefetch(kr + PF_ROWS * ld + d);
                    __builtin_prefetch(vr + PF_ROWS * ld + d);
                }
            float *dst = kp + (key / MR) * hd * MR + key % MR;
            for (int64_t d = 0; d < hd; d++) dst[d * MR] = kr[d];
            for (int s = 0; s < dpan; s++) {
                int64_t n = hd - s * MR < MR ? hd - s * MR : MR;
                float *dv = vp + (s * kb + key) * MR;
                for (int64_t i = 0; i < n; i++) dv[i] = vr[s * MR + i];
            }
        }
        for (int p = 0; p < npan; p++) {
            const int nc = (int)(nq - p * QP < QP ? nq - p * QP : QP);
            /* S^T panel: st[key * QP + i]. Columns past nq hold finite leftovers. */
            for (int r = 0; r < kpan; r++)
                mmb__gemm_own_tile(isa, (int)(nk - r * MR < MR ? nk - r * MR : MR), hd, kp + (int64_t)r * hd * MR,
                                   qp + p * hd * QP, st + (int64_t)r * MR * QP, QP, nc, 0, NULL);
            float *mp = m + p * QP, *lp = l + p * QP, *cp = corr + p * QP, *op = ot + p * QP;
            mmb__vec_softmax_cols(isa, st, nk, mp, lp, cp, scale);
            if (k0 > 0)
                for (int64_t d = 0; d < hd; d++)
                    for (int i = 0; i < QP; i++) op[d * QB + i] *= cp[i];
            /* O^T panel (+)= V^T P^T: ot[d * QB + i] */
            for (int s = 0; s < dpan; s++)
                mmb__gemm_own_tile(isa, (int)(hd - s * MR < MR ? hd - s * MR : MR), nk, vp + s * kb * MR, st,
                                   op + (int64_t)s * MR * QB, QB, nc, k0 > 0, NULL);
        }
    }
    const int64_t D = j->heads * hd;
    for (int64_t i = 0; i < nq; i++) l[i] = 1.0f / l[i];
    for (int64_t i0 = 0; i0 < nq; i0 += 8) {  /* 8 rows at a time: ot is read in whole lines */
        int64_t ni = nq - i0 < 8 ? nq - i0 : 8;
        float *o = j->out + (b * j->tq + q0 + i0) * D + h * hd;
        for (int64_t d = 0; d < hd; d++)
            for (int64_t i = 0; i < ni; i++) o[i * D + d] = ot[d * QB + i0 + i] * l[i0 + i];
    }
}

static void attn_task(void *arg, int tid, int nth) {
    const attn_job *j = arg;
    int64_t qblocks = (j->tq + j->qb - 1) / j->qb, n = j->batch * j->heads * qblocks, lo, hi;
    mmb__split(n, tid, nth, &lo, &hi);
    if (lo >= hi) return;
    float *base = j->scratch + (size_t)tid * per_thread(j->hd);
    base += (16 - ((uintptr_t)base / sizeof(float)) % 16) % 16;  /* 64-byte aligned */
    size_t h = (size_t)j->hd;
    attn_bufs w;
    w.qp = base;
    w.kp = w.qp + piece(QB * h);
    w.vp = w.kp + piece(KB_CAP * h);
    w.st = w.vp + piece((h + MR_CAP) * KB_CAP);
    w.ot = w.st + piece(QP * KB_CAP);
    w.m = w.ot + piece(h * QB);
    w.l = w.m + QB;
    w.corr = w.l + QB;
    /* Columns of the last query panel past the last query are computed on leftovers: make them finite. */
    memset(w.st, 0, sizeof(float) * QP * KB_CAP);
    for (int64_t u = lo; u < hi; u++) {
        int64_t qb = u % qblocks, hh = (u / qblocks) % j->heads, b = u / (qblocks * j->heads);
        int64_t q0 = qb * j->qb, nq = j->tq - q0 < j->qb ? j->tq - q0 : j->qb;
        attn_unit(j, &w, b, hh, q0, nq);
    }
}

/* Runs job j (out, q, k, v, strides, sizes and scratch filled in) over ctx's pool; the blocking is
 * chosen here from the token counts, so any entry point (self-attention here, cross-attention with
 * tq != tk and separate q, k, v) only fills the job. */
static void attention_run(mmb_ctx *ctx, attn_job *j) {
    if (j->batch < 1 || j->tq < 1 || j->tk < 1 || j->heads < 1 || j->hd < 1) return;
    j->isa = mmb__cpu_isa();
    j->mr = mmb__gemm_own_mr(j->isa);
    /* Even key blocks, each a whole number of micro-panels. */
    int64_t nkb = (j->tk + KB_MAX - 1) / KB_MAX, per = (j->tk + nkb - 1) / nkb;
    j->kb = (per + j->mr - 1) / j->mr * j->mr;
    /* Even query blocks, each a whole number of panels, as few as give every thread 8 units or more
     * (the split is even to an eighth): each unit packs K and V once. */
    int64_t nth = mmb__pool_size(ctx->pool), bh = j->batch * j->heads;
    int64_t npan = (j->tq + QP - 1) / QP, nqb = (j->tq + QB - 1) / QB, want = (8 * nth + bh - 1) / bh;
    nqb = want > nqb ? want : nqb;
    nqb = nqb < npan ? nqb : npan;
    per = (j->tq + nqb - 1) / nqb;
    j->qb = (per + QP - 1) / QP * QP;
    mmb__pool_run(ctx->pool, attn_task, j);
}

void mmb__cross_attention_forward(mmb_ctx *ctx, float *out, const float *q, const float *k, const float *v,
                                  int64_t ldq, int64_t ldkv, int64_t batch, int64_t tq, int64_t tk, int64_t heads,
                                  int64_t kv_heads, int64_t head_dim, float *scratch) {
    attn_job j = {out, q, k, v, ldq, ldkv, batch, tq, tk, heads, heads / kv_heads, head_dim, scratch, 0, 0, 0, 0};
    attention_run(ctx, &j);
}

void mmb__attention_forward(mmb_ctx *ctx, float *out, const float *qkv, int64_t batch, int64_t tokens,
                            int64_t heads, int64_t head_dim, float *scratch) {
    int64_t D = heads * head_dim;
    mmb__cross_attention_forward(ctx, out, qkv, qkv + D, qkv + 2 * D, 3 * D, 3 * D, batch, tokens, tokens, heads,
                                 heads, head_dim, scratch);
}

bool mmb__cross_attention_forward_ref(float *out, const float *q, const float *k, const float *v, int64_t ldq,
                                      int64_t ldkv, int64_t batch, int64_t tq, int64_t tk, int64_t heads,
                                      int64_t kv_heads, int64_t head_dim) {
    int64_t D = heads * head_dim, group = heads / kv_heads;
    double scale = 1.0 / sqrt((double)head_dim);
    double *p = malloc(sizeof(double) * (size_t)tk);
    if (!p) return false;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++)
            for (int64_t i = 0; i < tq; i++) {
                const float *qr = q + (b * tq + i) * ldq + h * head_dim;
                int64_t hk = h / group * head_dim;
                double mx = -INFINITY, sum = 0;
                for (int64_t j = 0; j < tk; j++) {
                    const float *kr = k + (b * tk + j) * ldkv + hk;
                    double dot = 0;
                    for (int64_t d = 0; d < head_dim; d++) dot += (double)qr[d] * kr[d];
                    p[j] = dot * scale;
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int64_t j = 0; j < tk; j++) sum += (p[j] = exp(p[j] - mx));
                float *o = out + (b * tq + i) * D + h * head_dim;
                for (int64_t d = 0; d < head_dim; d++) {
                    double a = 0;
                    for (int64_t j = 0; j < tk; j++) a += p[j] * v[(b * tk + j) * ldkv + hk + d];
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
                                            heads, heads, head_dim);
}
