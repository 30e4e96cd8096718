/* The frozen decoder's backward for stage-1 connector training (issue 17): the next-token cross-entropy of one
 * sequence and its gradient with respect to the input embeddings, so a caption's loss reaches the visual
 * tokens spliced into them. Activation gradients only: no weight of the LLM gets a gradient.
 *
 * One call = a forward over the n positions from position 0 that keeps what the backward needs, the LM head
 * on the positions with a target, then the layers in reverse:
 *   forward, layer l:  xm = x + o_proj(attn(rope(q), rope(k), v)) of rmsnorm1(x)   (causal, GQA, windows)
 *                      x' = xm + down(silu(g) * u), [g | u] = [gate | up](rmsnorm2(xm))
 *   head:              z = head(rmsnorm_f(x_L)) only at rows i with a target t = labels[i + 1];
 *                      loss_i = logsumexp(z) - z_t, dz = softmax(z) - onehot(t)   (max-subtracted)
 *   backward, layer l: dh = dx' Wd; dg = dh u silu'(g), du = dh silu(g); dxm = dx' + rmsnorm2'(dg Wg + du Wu)
 *                      dO = dxm Wo; the softmax's backward (below) gives dq, dk, dv; RoPE's inverse rotation
 *                      on dq, dk; dx = dxm + rmsnorm1'(dq Wq + dk Wk + dv Wv)
 * with rmsnorm'(dy) at row x (weight w, r = (mean x^2 + eps)^-1/2): r w dy - x r^3 / d * sum(dy w x).
 *
 * Kept per position per layer (floats): the residual input x and the post-attention residual xm (2 d), q, k, v
 * after RoPE ((H + 2 KVH) hd), the attention output before o_proj (H hd, for the softmax backward's row sums
 * D = dO . O), the softmax's log-sum-exp per head (H) and the MLP's gate and up (2 I); plus x_L (d) once.
 * The normed inputs and the SwiGLU product are not kept: with no weight gradients nothing reads them (the norm
 * backward recomputes r from x). Qwen2-0.5B: 13582 floats (54 KB) per position per layer, 1.3 MB per position
 * over its 24 layers (Vicuna-7B: 6.0 MB). Sequences whose kept activations would pass MMB_LM_BWD_MAX_BYTES are refused. Besides:
 * per position d + 3 I + H hd + (H + 2 KVH) hd + H + hd floats of working rows, the head's logits for 64 rows
 * at a time (64 vocab floats), and each thread's product scratch.
 *
 * The attention's backward recomputes the probabilities from q, k and the log-sum-exp (no n x n matrix is
 * kept): p = exp(scale q.k - lse), ds = p (dO.v - D); dq = scale sum_t ds k_t per (query, head), then dk =
 * scale sum ds q and dv = sum p dO per (key, kv head) over the queries that see the key (the group's heads,
 * the causal mask, the window), so no two threads write the same row.
 *
 * The whole call is one pool job, every thread walking the same steps with a spin barrier between dependent
 * ones (as the decoder's forward). Products as the forward: x W^T by mmb__wmat_part / mmb__wmat_share, and the
 * transposed dx = dy W by mmb__wmat_part_t, both reading the weights in their storage dtype, in row blocks of
 * RB so the packed rows stay in cache.
 */
#include "lm/lm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define RB 256 /* rows per product call */
#define CH 64  /* head rows per logits chunk */
#define NR MMB_GEMM_OWN_NR

typedef struct bwd_job {
    mmb__lm_view v;
    const mmb__lm_layer_view *ly;   /* (L) */
    int64_t n, d, I, H, KVH, hd, half, qd, kd, ldq, V;
    float scale;
    /* kept (per layer l: X + l n d, ...) */
    float *X;                       /* (L + 1, n, d): each layer's residual input, then x_L */
    float *XM;                      /* (L, n, d) */
    float *QKV;                     /* (L, n, ldq) after RoPE */
    float *O;                       /* (L, n, qd) */
    float *LSE;                     /* (L, n, H) */
    float *GU;                      /* (L, n, 2 I) */
    /* working rows */
    float *xn;                      /* (n, d): normed rows (forward), their gradient (backward) */
    float *h;                       /* (n, I): silu(g) u (forward), dh (backward) */
    float *dgu;                     /* (n, 2 I) */
    float *dO;                      /* (n, qd) */
    float *dqkv;                    /* (n, ldq) */
    float *Dd;                      /* (n, H) */
    float *cosb, *sinb;             /* (n, half) */
    float *dx;                      /* (n, d): the running gradient of the residual stream = d_embeds */
    /* the head */
    int64_t T;
    int64_t *rows;                  /* (T) the rows with a target */
    int64_t *tix;                   /* (n) row -> its index in rows, or -1 */
    const int32_t *labels;
    float *xf, *dxf;                /* (T, d) */
    float *logits;                  /* (CH, V) */
    double *tloss;                  /* (nth * 8): each thread's loss partial (own cache line) */
    float *scratch;
    size_t per;                     /* scratch floats per thread */
    int64_t wscr;                   /* of which the products' */
    mmb_barrier bar;
} bwd_job;

/* Thread tid's scratch: j->per floats, the products' first j->wscr, then the attention's. */
static float *scr_of(const bwd_job *j, int tid) { return j->scratch + j->per * (size_t)tid; }

/* y = x W^T + b for the outputs o[0 .. no) (y pointers at row 0), all n rows in blocks of RB; this thread's
 * columns. */
static void prod(const bwd_job *j, int tid, int nth, const float *x, int64_t ldx, const mmb_wmat_out *o, int no,
                 int acc) {
    for (int64_t r0 = 0; r0 < j->n; r0 += RB) {
        int64_t m = j->n - r0 < RB ? j->n - r0 : RB;
        mmb_wmat_out ob[4];
        for (int i = 0; i < no; i++) ob[i] = (mmb_wmat_out){o[i].w, o[i].bias, o[i].y + r0 * o[i].ldy, o[i].ldy};
        mmb__wmat_share(tid, nth, x + r0 * ldx, ldx, m, ob, no, acc, scr_of(j, tid));
    }
}

/* This thread's columns [c0, c1) of K (in units of NR). */
static void tcols(int64_t K, int tid, int nth, int64_t *c0, int64_t *c1) {
    int64_t lo, hi;
    mmb__split((K + NR - 1) / NR, tid, nth, &lo, &hi);
    *c0 = lo * NR;
    *c1 = hi * NR < K ? hi * NR : K;
}

/* dx (M, K) (=, or += with acc) sum_i dy_i W_i for nw matrices W_i (n_i, K) sharing K, columns [c0, c1) on
 * this thread, rows in blocks of RB. */
static void tprod(const bwd_job *j, int tid, float *dx, int64_t lddx, int64_t M, const mmb_wmat *const *w,
                  const float *const *dy, const int64_t *lddy, int nw, int acc, int64_t c0, int64_t c1) {
    for (int64_t r0 = 0; r0 < M; r0 += RB) {
        int64_t m = M - r0 < RB ? M - r0 : RB;
        for (int i = 0; i < nw; i++)
            mmb__wmat_part_t(dx + r0 * lddx + c0, lddx, dy[i] + r0 * lddy[i], lddy[i], m, w[i], c0, c1, acc || i,
                             scr_of(j, tid));
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t e = 0;
    for (; e + 8 <= n; e += 8)
        for (int u = 0; u < 8; u++) s[u] += a[e + u] * b[e + u];
    float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; e < n; e++) t += a[e] * b[e];
    return t;
}

/* dx (C) += rmsnorm'(dy) at row x with weight w (see the header). */
MMB_SIMD_CLONES static void rms_bwd_row(float *dx, const float *x, const float *w, const float *dy, int64_t C,
                                        float eps) {
    float ss = 0;
    for (int64_t c = 0; c < C; c++) ss += x[c] * x[c];
    float r = 1.0f / sqrtf(ss / (float)C + eps);
    double sd = 0;
    for (int64_t c = 0; c < C; c++) sd += (double)dy[c] * w[c] * x[c];
    float k = (float)(sd * (double)r * r * r / (double)C);
    for (int64_t c = 0; c < C; c++) dx[c] += r * w[c] * dy[c] - x[c] * k;
}

/* x rotated by +angle (forward, sign 1) or by -angle (the transpose, sign -1: the gradient's way back). */
static void rope_rot(float *x, const float *c, const float *s, int64_t half, float sign) {
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half], si = sign * s[i];
        x[i] = a * c[i] - b * si;
        x[i + half] = b * c[i] + a * si;
    }
}

/* First key query i sees in a layer with window w (0: none), as the decoder's forward. */
static int64_t key0(int64_t i, int64_t w) { return w && i + 1 > w ? i + 1 - w : 0; }

/* dq (hd) = scale sum_t ds_t k_t over keys [k0, k1) of one query row (q, its dO, D = dO . O, lse). */
MMB_SIMD_CLONES static void dq_row(float *dq, const float *q, const float *dO, float D, float lse, const float *K,
                                   const float *Vv, int64_t ld, int64_t k0, int64_t k1, int64_t hd, float scale) {
    for (int64_t e = 0; e < hd; e++) dq[e] = 0;
    for (int64_t t = k0; t < k1; t++) {
        const float *kr = K + t * ld;
        float p = expf(dot(q, kr, hd) * scale - lse);
        float ds = p * (dot(dO, Vv + t * ld, hd) - D) * scale;
        for (int64_t e = 0; e < hd; e++) dq[e] += ds * kr[e];
    }
}

/* dk, dv (hd) of key row t of kv head kh: over the group's query heads and the queries [t, i1) that see it. */
MMB_SIMD_CLONES static void dkv_row(const bwd_job *j, const float *QKV, const float *LSE, int64_t t, int64_t kh,
                                    int64_t i1, float *dk, float *dv) {
    const int64_t hd = j->hd, ldq = j->ldq, g = j->H / j->KVH;
    const float *kr = QKV + t * ldq + j->qd + kh * hd, *vr = kr + j->kd;
    for (int64_t e = 0; e < hd; e++) dk[e] = dv[e] = 0;
    for (int64_t h = kh * g; h < (kh + 1) * g; h++)
        for (int64_t i = t; i < i1; i++) {
            const float *q = QKV + i * ldq + h * hd, *dO = j->dO + i * j->qd + h * hd;
            float p = expf(dot(q, kr, hd) * j->scale - LSE[i * j->H + h]);
            float ds = p * (dot(dO, vr, hd) - j->Dd[i * j->H + h]) * j->scale;
            for (int64_t e = 0; e < hd; e++) {
                dv[e] += p * dO[e];
                dk[e] += ds * q[e];
            }
        }
}

/* Layer l's forward over the n rows from its input X_l: keeps XM_l, QKV_l, O_l, LSE_l, GU_l and writes X_{l+1}. */
static void fwd_layer(bwd_job *j, int tid, int nth, int l) {
    const mmb__lm_layer_view *y = &j->ly[l];
    const int64_t n = j->n, d = j->d, I = j->I, H = j->H, KVH = j->KVH, hd = j->hd, ldq = j->ldq;
    float *X = j->X + (size_t)l * n * d, *XM = j->XM + (size_t)l * n * d, *Xn = j->X + (size_t)(l + 1) * n * d;
    float *QKV = j->QKV + (size_t)l * n * ldq, *O = j->O + (size_t)l * n * j->qd, *LSE = j->LSE + (size_t)l * n * H;
    float *GU = j->GU + (size_t)l * n * 2 * I;
    int64_t lo, hi;
    mmb__split(n, tid, nth, &lo, &hi);
    mmb__rmsnorm_forward(j->xn + lo * d, X + lo * d, y->ln1, hi - lo, d, j->v.eps);
    memcpy(XM + lo * d, X + lo * d, sizeof(float) * (size_t)((hi - lo) * d));
    mmb__barrier_wait(&j->bar);
    mmb_wmat_out o[3] = {{y->q, y->bq, QKV, ldq}, {y->k, y->bk, QKV + j->qd, ldq}, {y->v, y->bv, QKV + j->qd + j->kd, ldq}};
    prod(j, tid, nth, j->xn, d, o, 3, 0);
    mmb__barrier_wait(&j->bar);
    mmb__split(n * (H + KVH), tid, nth, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) {
        int64_t i = it / (H + KVH), hh = it % (H + KVH);
        rope_rot(QKV + i * ldq + hh * hd, j->cosb + i * j->half, j->sinb + i * j->half, j->half, 1.0f);
    }
    mmb__barrier_wait(&j->bar);
    float *sc = scr_of(j, tid) + j->wscr;
    for (int64_t it = tid; it < n * H; it += nth) { /* cyclic: the causal rows grow with i */
        int64_t i = it / H, h = it % H, kh = h / (H / KVH);
        const float *K = QKV + j->qd + kh * hd;
        mmb__lm_attend(O + i * j->qd + h * hd, LSE + i * H + h, QKV + i * ldq + h * hd, K, K + j->kd, ldq,
                   key0(i, y->window), i + 1, hd, j->scale, sc);
    }
    mmb__barrier_wait(&j->bar);
    mmb_wmat_out oo = {y->o, y->bo, XM, d};
    prod(j, tid, nth, O, j->qd, &oo, 1, 1);
    mmb__barrier_wait(&j->bar);
    mmb__split(n, tid, nth, &lo, &hi);
    mmb__rmsnorm_forward(j->xn + lo * d, XM + lo * d, y->ln2, hi - lo, d, j->v.eps);
    memcpy(Xn + lo * d, XM + lo * d, sizeof(float) * (size_t)((hi - lo) * d));
    mmb__barrier_wait(&j->bar);
    int64_t c0, c1; /* gate and up over the same columns on one thread, so SwiGLU needs no barrier */
    tcols(I, tid, nth, &c0, &c1);
    for (int64_t r0 = 0; r0 < n && c1 > c0; r0 += RB) {
        int64_t m = n - r0 < RB ? n - r0 : RB;
        float *gu = GU + r0 * 2 * I;
        mmb__wmat_part(gu + c0, 2 * I, j->xn + r0 * d, d, m, y->gate, y->bgate, c0, c1, 0, scr_of(j, tid));
        mmb__wmat_part(gu + I + c0, 2 * I, j->xn + r0 * d, d, m, y->up, y->bup, c0, c1, 0, scr_of(j, tid));
        for (int64_t r = 0; r < m; r++) {
            const float *gr = gu + r * 2 * I, *ur = gr + I;
            float *hr = j->h + (r0 + r) * I;
            for (int64_t c = c0; c < c1; c++) hr[c] = gr[c] / (1.0f + expf(-gr[c])) * ur[c];
        }
    }
    mmb__barrier_wait(&j->bar);
    mmb_wmat_out od = {y->down, y->bdown, Xn, d};
    prod(j, tid, nth, j->h, I, &od, 1, 1);
    mmb__barrier_wait(&j->bar);
}

/* j->dx holds the gradient of layer l's output; leaves that of its input. */
static void bwd_layer(bwd_job *j, int tid, int nth, int l) {
    const mmb__lm_layer_view *y = &j->ly[l];
    const int64_t n = j->n, d = j->d, I = j->I, H = j->H, KVH = j->KVH, hd = j->hd, ldq = j->ldq, qd = j->qd;
    const float *X = j->X + (size_t)l * n * d, *XM = j->XM + (size_t)l * n * d;
    const float *QKV = j->QKV + (size_t)l * n * ldq, *O = j->O + (size_t)l * n * qd, *LSE = j->LSE + (size_t)l * n * H;
    const float *GU = j->GU + (size_t)l * n * 2 * I;
    int64_t c0, c1, lo, hi;
    /* dh = dx Wd, then SwiGLU's backward on the same columns */
    tcols(I, tid, nth, &c0, &c1);
    if (c1 > c0) {
        const mmb_wmat *w[1] = {y->down};
        const float *dy[1] = {j->dx};
        const int64_t ld[1] = {d};
        tprod(j, tid, j->h, I, n, w, dy, ld, 1, 0, c0, c1);
        for (int64_t r = 0; r < n; r++) {
            const float *gr = GU + r * 2 * I, *ur = gr + I, *dh = j->h + r * I;
            float *dg = j->dgu + r * 2 * I, *du = dg + I;
            for (int64_t c = c0; c < c1; c++) {
                float sg = 1.0f / (1.0f + expf(-gr[c]));
                du[c] = dh[c] * gr[c] * sg;
                dg[c] = dh[c] * ur[c] * sg * (1.0f + gr[c] * (1.0f - sg));
            }
        }
    }
    mmb__barrier_wait(&j->bar);
    tcols(d, tid, nth, &c0, &c1);
    if (c1 > c0) {
        const mmb_wmat *w[2] = {y->gate, y->up};
        const float *dy[2] = {j->dgu, j->dgu + I};
        const int64_t ld[2] = {2 * I, 2 * I};
        tprod(j, tid, j->xn, d, n, w, dy, ld, 2, 0, c0, c1);
    }
    mmb__barrier_wait(&j->bar);
    mmb__split(n, tid, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) rms_bwd_row(j->dx + i * d, XM + i * d, y->ln2, j->xn + i * d, d, j->v.eps);
    mmb__barrier_wait(&j->bar);
    tcols(qd, tid, nth, &c0, &c1);
    if (c1 > c0) {
        const mmb_wmat *w[1] = {y->o};
        const float *dy[1] = {j->dx};
        const int64_t ld[1] = {d};
        tprod(j, tid, j->dO, qd, n, w, dy, ld, 1, 0, c0, c1);
    }
    mmb__barrier_wait(&j->bar);
    mmb__split(n * H, tid, nth, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) j->Dd[it] = dot(j->dO + it * hd, O + it * hd, hd); /* (n, H, hd) rows */
    mmb__barrier_wait(&j->bar);
    float *acc = scr_of(j, tid) + j->wscr;
    for (int64_t it = tid; it < n * (H + KVH); it += nth) { /* queries' dq, then keys' dk and dv; cyclic */
        if (it < n * H) {
            int64_t i = it / H, h = it % H, kh = h / (H / KVH);
            const float *K = QKV + qd + kh * hd;
            dq_row(j->dqkv + i * ldq + h * hd, QKV + i * ldq + h * hd, j->dO + i * qd + h * hd, j->Dd[i * H + h],
                   LSE[i * H + h], K, K + j->kd, ldq, key0(i, y->window), i + 1, hd, j->scale);
        } else {
            int64_t t = (it - n * H) / KVH, kh = (it - n * H) % KVH;
            int64_t i1 = y->window && t + y->window < n ? t + y->window : n;
            dkv_row(j, QKV, LSE, t, kh, i1, acc, acc + hd);
            memcpy(j->dqkv + t * ldq + qd + kh * hd, acc, sizeof(float) * (size_t)hd);
            memcpy(j->dqkv + t * ldq + qd + j->kd + kh * hd, acc + hd, sizeof(float) * (size_t)hd);
        }
    }
    mmb__barrier_wait(&j->bar);
    mmb__split(n * (H + KVH), tid, nth, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) {
        int64_t i = it / (H + KVH), hh = it % (H + KVH);
        rope_rot(j->dqkv + i * ldq + hh * hd, j->cosb + i * j->half, j->sinb + i * j->half, j->half, -1.0f);
    }
    mmb__barrier_wait(&j->bar);
    tcols(d, tid, nth, &c0, &c1);
    if (c1 > c0) {
        const mmb_wmat *w[3] = {y->q, y->k, y->v};
        const float *dy[3] = {j->dqkv, j->dqkv + qd, j->dqkv + qd + j->kd};
        const int64_t ld[3] = {ldq, ldq, ldq};
        tprod(j, tid, j->xn, d, n, w, dy, ld, 3, 0, c0, c1);
    }
    mmb__barrier_wait(&j->bar);
    mmb__split(n, tid, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) rms_bwd_row(j->dx + i * d, X + i * d, y->ln1, j->xn + i * d, d, j->v.eps);
    mmb__barrier_wait(&j->bar);
}

/* The head on the target rows, chunk by chunk: loss partials, dxf = dz Head; then dx = the final norm's
 * backward on those rows (0 on the others). */
static void head_step(bwd_job *j, int tid, int nth) {
    const int64_t n = j->n, d = j->d, V = j->V, T = j->T;
    const float *XL = j->X + (size_t)j->v.L * n * d;
    int64_t lo, hi;
    mmb__split(T, tid, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) mmb__rmsnorm_forward(j->xf + r * d, XL + j->rows[r] * d, j->v.norm, 1, d, j->v.eps);
    mmb__barrier_wait(&j->bar);
    double loss = 0;
    for (int64_t r0 = 0; r0 < T; r0 += CH) {
        int64_t m = T - r0 < CH ? T - r0 : CH;
        mmb_wmat_out o = {j->v.head, NULL, j->logits, V};
        mmb__wmat_share(tid, nth, j->xf + r0 * d, d, m, &o, 1, 0, scr_of(j, tid));
        mmb__barrier_wait(&j->bar);
        mmb__split(m, tid, nth, &lo, &hi);
        for (int64_t r = lo; r < hi; r++) { /* loss = logsumexp - z_t; dz = softmax - onehot */
            float *z = j->logits + r * V;
            int32_t t = j->labels[j->rows[r0 + r] + 1];
            float mx = -INFINITY;
            for (int64_t c = 0; c < V; c++) mx = z[c] > mx ? z[c] : mx;
            double sum = 0;
            for (int64_t c = 0; c < V; c++) sum += (double)expf(z[c] - mx);
            double lse = (double)mx + log(sum);
            loss += lse - (double)z[t];
            float ls = (float)lse;
            for (int64_t c = 0; c < V; c++) z[c] = expf(z[c] - ls);
            z[t] -= 1.0f;
        }
        mmb__barrier_wait(&j->bar);
        int64_t c0, c1;
        tcols(d, tid, nth, &c0, &c1);
        if (c1 > c0) {
            const mmb_wmat *w[1] = {j->v.head};
            const float *dy[1] = {j->logits};
            const int64_t ld[1] = {V};
            tprod(j, tid, j->dxf + r0 * d, d, m, w, dy, ld, 1, 0, c0, c1);
        }
        mmb__barrier_wait(&j->bar);
    }
    j->tloss[tid * 8] = loss;
    mmb__split(n, tid, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        float *dx = j->dx + i * d;
        memset(dx, 0, sizeof(float) * (size_t)d);
        if (j->tix[i] >= 0) rms_bwd_row(dx, XL + i * d, j->v.norm, j->dxf + j->tix[i] * d, d, j->v.eps);
    }
    mmb__barrier_wait(&j->bar);
}

/* The pool job: the forward, the head and the backward; j->dx (= d_embeds) ends as the gradient of the loss
 * sum with respect to the embeddings, j->tloss[8 tid] as each thread's share of the loss. */
static void worker(void *arg, int tid, int nth) {
    bwd_job *j = arg;
    for (int l = 0; l < j->v.L; l++) fwd_layer(j, tid, nth, l);
    head_step(j, tid, nth);
    for (int l = (int)j->v.L - 1; l >= 0; l--) bwd_layer(j, tid, nth, l);
}

int64_t mmb__lm_bwd_floats_per_pos(const mmb_lm *lm) {
    mmb__lm_view v;
    mmb__lm_get_view(lm, &v);
    int64_t ldq = (v.H + 2 * v.KVH) * v.hd;
    return v.L * (2 * v.d + ldq + v.H * v.hd + v.H + 2 * v.I) + v.d;
}

/* What the backward does not cover, as an MMB_ERR_UNSUPPORTED message; MMB_OK when it covers lm. */
static mmb_status check_model(mmb_ctx *ctx, const mmb_lm *lm, const mmb__lm_view *v) {
    const char *what = NULL;
    if (v->hooks) what = "fusion-A or type-B hooks are installed (gated cross-attention layers)";
    else if (v->n_replaced) what = "layers are replaced by cross-attention layers (Mllama)";
    else if (v->experts > 1) what = "the layers have a second expert weight set (CogVLM, mPLUG-Owl2)";
    else if (v->qk_norm_or_swin) what = "the layers have Chameleon's q/k LayerNorms or swin_norm, or Gemma 3's norms";
    else if (v->extra) what = "the model has an additional vocabulary (IDEFICS' decoupled head)";
    for (int l = 0; !what && l < v->L; l++) {
        mmb__lm_layer_view y;
        mmb__lm_get_layer(lm, l, &y);
        if (y.prompt) what = "LLaMA-Adapter prompts are set";
    }
    if (what)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "the LLM backward (mmb__lm_loss_backward) covers the plain "
                        "Llama/Mistral/Qwen2 decoder only: %s", what);
    return MMB_OK;
}

mmb_status mmb__lm_loss_backward(mmb_ctx *ctx, const mmb_lm *lm, const float *embeds, const int32_t *labels,
                                 int64_t n, double *loss_sum, int64_t *count, float *d_embeds) {
    if (!ctx || !lm || !embeds || !labels || !loss_sum || !count || !d_embeds)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__lm_loss_backward: NULL argument");
    if (n < 2)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__lm_loss_backward: %lld positions; the next-token loss needs at "
                        "least 2", (long long)n);
    bwd_job j = {.n = n, .labels = labels};
    mmb__lm_get_view(lm, &j.v);
    mmb_status s = check_model(ctx, lm, &j.v);
    if (s != MMB_OK) return s;
    if (n > j.v.max_positions)
        return mmb__err(ctx, MMB_ERR_SHAPE, "mmb__lm_loss_backward: a sequence of %lld positions; the model has %lld "
                        "(max_position_embeddings)", (long long)n, (long long)j.v.max_positions);
    const int64_t fpp = mmb__lm_bwd_floats_per_pos(lm);
    if ((double)n * (double)fpp * 4.0 > (double)MMB_LM_BWD_MAX_BYTES)
        return mmb__err(ctx, MMB_ERR_SHAPE, "mmb__lm_loss_backward: a sequence of %lld positions would keep %.2f GB "
                        "of activations (%lld floats per position), over the limit of %.2f GB "
                        "(MMB_LM_BWD_MAX_BYTES): at most %lld positions for this model", (long long)n,
                        (double)n * (double)fpp * 4.0 / 1e9, (long long)fpp, (double)MMB_LM_BWD_MAX_BYTES / 1e9,
                        (long long)(MMB_LM_BWD_MAX_BYTES / 4 / fpp));
    const int64_t V = j.v.vocab;
    int64_t T = 0;
    for (int64_t i = 1; i < n; i++) {
        if (labels[i] == MMB_IGNORE_INDEX) continue;
        if (labels[i] < 0 || labels[i] >= V)
            return mmb__err(ctx, MMB_ERR_ARG, "mmb__lm_loss_backward: label %d at position %lld is outside the "
                            "vocabulary [0, %lld) and not %d (ignored)", (int)labels[i], (long long)i, (long long)V,
                            MMB_IGNORE_INDEX);
        T++;
    }
    const int64_t d = j.v.d, I = j.v.I, H = j.v.H, KVH = j.v.KVH, hd = j.v.hd, L = j.v.L;
    if (T == 0) { /* no target: a zero loss of no tokens, a zero gradient */
        memset(d_embeds, 0, sizeof(float) * (size_t)(n * d));
        return MMB_OK;
    }
    j.d = d, j.I = I, j.H = H, j.KVH = KVH, j.hd = hd, j.half = hd / 2, j.qd = H * hd, j.kd = KVH * hd;
    j.ldq = j.qd + 2 * j.kd, j.V = V, j.T = T;
    j.scale = (float)(1.0 / sqrt((double)hd));
    const int nth = mmb__pool_size(ctx->pool);
    const int64_t Mr = n < RB ? n : RB, Mh = T < CH ? T : CH;
    int64_t wscr = 0;
    const int64_t fk[] = {d, j.qd, I}, tn[] = {d, j.qd, j.kd, I, V};
    for (int i = 0; i < 3; i++) {
        int64_t a = (int64_t)mmb__wmat_scratch(Mr, fk[i]);
        wscr = a > wscr ? a : wscr;
    }
    for (int i = 0; i < 5; i++) {
        int64_t a = (int64_t)mmb__wmat_t_scratch(Mr, tn[i]);
        wscr = a > wscr ? a : wscr;
    }
    int64_t a = (int64_t)mmb__wmat_scratch(Mh, d);
    wscr = ((a > wscr ? a : wscr) + 15) / 16 * 16;
    j.wscr = wscr;
    j.per = (size_t)(wscr + (n > 2 * hd ? n : 2 * hd) + 16) / 16 * 16;
    /* one allocation, cut into 64-byte aligned pieces */
    const size_t sizes[] = {
        (size_t)((L + 1) * n * d), (size_t)(L * n * d), (size_t)(L * n * j.ldq), (size_t)(L * n * j.qd),
        (size_t)(L * n * H), (size_t)(L * n * 2 * I), (size_t)(n * d), (size_t)(n * I), (size_t)(n * 2 * I),
        (size_t)(n * j.qd), (size_t)(n * j.ldq), (size_t)(n * H), (size_t)(n * j.half), (size_t)(n * j.half),
        (size_t)(2 * T * d), (size_t)(Mh * V), (size_t)(16 * nth) /* 8 doubles each */, j.per * (size_t)nth,
        (size_t)(2 * T + n + j.half) /* rows, tix (int64 as 2 floats each), inv_freq */ * 2};
    enum { NB = sizeof sizes / sizeof sizes[0] };
    size_t total = 0;
    for (int i = 0; i < NB; i++) total += (sizes[i] * sizeof(float) + 63) / 64 * 64;
    unsigned char *mem = aligned_alloc(64, total);
    if (!mem)
        return mmb__err(ctx, MMB_ERR_NOMEM, "mmb__lm_loss_backward: %lld positions: cannot allocate %.1f MB of "
                        "activations", (long long)n, (double)total / 1e6);
    float *buf[NB];
    for (size_t i = 0, off = 0; i < NB; off += (sizes[i] * sizeof(float) + 63) / 64 * 64, i++)
        buf[i] = (float *)(mem + off);
    j.X = buf[0], j.XM = buf[1], j.QKV = buf[2], j.O = buf[3], j.LSE = buf[4], j.GU = buf[5], j.xn = buf[6];
    j.h = buf[7], j.dgu = buf[8], j.dO = buf[9], j.dqkv = buf[10], j.Dd = buf[11], j.cosb = buf[12];
    j.sinb = buf[13], j.xf = buf[14], j.dxf = buf[14] + T * d, j.logits = buf[15], j.tloss = (double *)buf[16];
    j.scratch = buf[17];
    j.rows = (int64_t *)buf[18], j.tix = j.rows + T;
    float *inv = (float *)(j.tix + n);
    j.dx = d_embeds;
    mmb__lm_layer_view *ly = malloc(sizeof *ly * (size_t)L);
    if (!ly) {
        free(mem);
        return mmb__err(ctx, MMB_ERR_NOMEM, "mmb__lm_loss_backward: out of memory");
    }
    for (int l = 0; l < L; l++) mmb__lm_get_layer(lm, l, &ly[l]);
    j.ly = ly;
    for (int64_t i = 0, r = 0; i < n; i++) {
        j.tix[i] = -1;
        if (i + 1 < n && labels[i + 1] != MMB_IGNORE_INDEX) j.rows[r] = i, j.tix[i] = r++;
    }
    mmb__lm_rope_freqs(lm, n, inv);
    for (int64_t i = 0; i < n; i++)
        for (int64_t f = 0; f < j.half; f++) {
            float ang = (float)i * inv[f];
            j.cosb[i * j.half + f] = cosf(ang);
            j.sinb[i * j.half + f] = sinf(ang);
        }
    memcpy(j.X, embeds, sizeof(float) * (size_t)(n * d));
    j.bar.n = nth;
    mmb__pool_run(ctx->pool, worker, &j);
    double loss = 0;
    for (int t = 0; t < nth; t++) loss += j.tloss[t * 8];
    *loss_sum += loss;
    *count += T;
    free(ly);
    free(mem);
    return MMB_OK;
}
