/* Dense convolution-network kernels on channels-last (NHWC) maps, for the VQ image tokenizers (type D):
 * a map (B, H, W, C) is row-major with C contiguous, so rows = pixels and a 1x1 convolution is a linear layer.
 *   Conv2d through the GEMM: im2col rows in (cin, ky, kx) order, built one tile of output pixels at a time
 *     (never the whole image's im2col), any stride, explicit zero padding per side;
 *   GroupNorm over (B, HW, C), two passes in double per group, optional fused SiLU;
 *   nearest resize (torch F.interpolate mode="nearest"), with the 2x case as torch's scale_factor=2.0.
 * Each has a _ref oracle for tests/test_kernels.c. */
#include "tensor/tensor.h"

#include <math.h>
#include <string.h>

/* ---- Conv2d ------------------------------------------------------------------------------------ */

int64_t mmb__conv2d_out_h(const mmb_conv2d *g, int64_t H) {
    int64_t n = H + g->pad[0] + g->pad[2] - g->kh;
    return n < 0 ? 0 : n / g->stride + 1;
}

int64_t mmb__conv2d_out_w(const mmb_conv2d *g, int64_t W) {
    int64_t n = W + g->pad[1] + g->pad[3] - g->kw;
    return n < 0 ? 0 : n / g->stride + 1;
}

static bool conv_is_linear(const mmb_conv2d *g) {
    return g->kh == 1 && g->kw == 1 && g->stride == 1 && !g->pad[0] && !g->pad[1] && !g->pad[2] && !g->pad[3];
}

/* Output pixels per im2col tile: about MMB_CONV_TILE_FLOATS floats of rows (docs/decisions.md "Conv2d
 * through the GEMM"), at least 64 rows so the GEMM keeps its panels full. */
#define MMB_CONV_TILE_FLOATS (1 << 20)

static int64_t tile_rows(int64_t K, int64_t M) {
    int64_t t = MMB_CONV_TILE_FLOATS / (K > 0 ? K : 1);
    if (t < 64) t = 64;
    return t < M ? t : M;
}

size_t mmb__conv2d_scratch(const mmb_conv2d *g, int64_t B, int64_t H, int64_t W) {
    if (conv_is_linear(g)) return 0;
    int64_t K = g->cin * g->kh * g->kw, M = B * mmb__conv2d_out_h(g, H) * mmb__conv2d_out_w(g, W);
    return (size_t)(tile_rows(K, M) * K);
}

/* im2col row of output pixel p (flat over (B, Ho, Wo)) -> r (cin kh kw), (c, ky, kx) order, zeros where the
 * receptive field leaves the map. */
static void im2col_row(float *r, const float *x, const mmb_conv2d *g, int64_t H, int64_t W, int64_t Ho,
                       int64_t Wo, int64_t p) {
    const int64_t C = g->cin, kk = (int64_t)g->kh * g->kw;
    int64_t b = p / (Ho * Wo), oy = (p / Wo) % Ho, ox = p % Wo;
    for (int ky = 0; ky < g->kh; ky++) {
        int64_t iy = oy * g->stride + ky - g->pad[0];
        for (int kx = 0; kx < g->kw; kx++) {
            int64_t ix = ox * g->stride + kx - g->pad[1], off = (int64_t)ky * g->kw + kx;
            if (iy < 0 || iy >= H || ix < 0 || ix >= W) {
                for (int64_t c = 0; c < C; c++) r[c * kk + off] = 0.0f;
                continue;
            }
            const float *src = x + ((b * H + iy) * W + ix) * C;
            for (int64_t c = 0; c < C; c++) r[c * kk + off] = src[c];
        }
    }
}

typedef struct {
    float *rows;
    const float *x;
    const mmb_conv2d *g;
    int64_t H, W, Ho, Wo, p0, n;
} im2col_job;

static void im2col_task(void *arg, int tid, int nth) {
    im2col_job *j = arg;
    int64_t lo, hi, K = j->g->cin * j->g->kh * j->g->kw;
    mmb__split(j->n, tid, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) im2col_row(j->rows + i * K, j->x, j->g, j->H, j->W, j->Ho, j->Wo, j->p0 + i);
}

void mmb__conv2d_forward(mmb_ctx *ctx, float *out, const float *x, const mmb_linear *l, const mmb_conv2d *g,
                         int64_t B, int64_t H, int64_t W, float *scratch) {
    int64_t Ho = mmb__conv2d_out_h(g, H), Wo = mmb__conv2d_out_w(g, W), M = B * Ho * Wo;
    if (M == 0) return;
    if (conv_is_linear(g)) {
        mmb__linear_forward(ctx, out, x, M, l);
        return;
    }
    int64_t K = g->cin * g->kh * g->kw, T = tile_rows(K, M);
    for (int64_t p0 = 0; p0 < M; p0 += T) {
        int64_t n = M - p0 < T ? M - p0 : T;
        im2col_job j = {.rows = scratch, .x = x, .g = g, .H = H, .W = W, .Ho = Ho, .Wo = Wo, .p0 = p0, .n = n};
        mmb__pool_run(ctx->pool, im2col_task, &j);
        mmb__linear_forward(ctx, out + p0 * g->cout, scratch, n, l);
    }
}

void mmb__conv2d_forward_ref(float *out, const float *x, const float *w, const float *bias, const mmb_conv2d *g,
                             int64_t B, int64_t H, int64_t W) {
    int64_t Ho = mmb__conv2d_out_h(g, H), Wo = mmb__conv2d_out_w(g, W);
    for (int64_t b = 0; b < B; b++)
        for (int64_t oy = 0; oy < Ho; oy++)
            for (int64_t ox = 0; ox < Wo; ox++)
                for (int64_t o = 0; o < g->cout; o++) {
                    double acc = bias ? bias[o] : 0.0;
                    for (int64_t c = 0; c < g->cin; c++)
                        for (int ky = 0; ky < g->kh; ky++)
                            for (int kx = 0; kx < g->kw; kx++) {
                                int64_t iy = oy * g->stride + ky - g->pad[0], ix = ox * g->stride + kx - g->pad[1];
                                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                                acc += (double)x[((b * H + iy) * W + ix) * g->cin + c] *
                                       w[((o * g->cin + c) * g->kh + ky) * g->kw + kx];
                            }
                    out[((b * Ho + oy) * Wo + ox) * g->cout + o] = (float)acc;
                }
}

void mmb__conv2d_cost(const mmb_linear *l, const mmb_conv2d *g, int64_t H, int64_t W, int64_t *params,
                      int64_t *flops) {
    mmb__linear_cost(l, mmb__conv2d_out_h(g, H) * mmb__conv2d_out_w(g, W), params, flops);
}

/* ---- GroupNorm ------------------------------------------------------------------------------------ */


void mmb__groupnorm_forward_ref(float *out, const float *x, const float *w, const float *b, int64_t B, int64_t HW,
                                int64_t C, int G, float eps, bool silu) {
    int64_t cg = C / G;
    for (int64_t n = 0; n < B; n++)
        for (int g = 0; g < G; g++) {
            double s = 0, ss = 0;
            for (int64_t p = 0; p < HW; p++)
                for (int64_t c = g * cg; c < (g + 1) * cg; c++) s += x[(n * HW + p) * C + c];
            double mean = s / (double)(HW * cg);
            for (int64_t p = 0; p < HW; p++)
                for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                    double d = x[(n * HW + p) * C + c] - mean;
                    ss += d * d;
                }
            double rstd = 1.0 / sqrt(ss / (double)(HW * cg) + eps);
            for (int64_t p = 0; p < HW; p++)
                for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                    int64_t i = (n * HW + p) * C + c;
                    double v = (x[i] - mean) * rstd * (w ? w[c] : 1.0) + (b ? b[c] : 0.0);
                    out[i] = silu ? (float)(v / (1.0 + exp(-v))) : (float)v;
                }
        }
}

size_t mmb__groupnorm_scratch(int nth, int G) { return (size_t)nth * (size_t)G * 2 * sizeof(double); }

typedef struct {
    float *out;
    const float *x, *w, *b;
    int64_t B, HW, C;
    int G;
    float eps;
    bool silu;
    double *part;  /* (nth, 2, G): each thread's sums over its rows, then its squared deviations */
    mmb_barrier bar;
} gn_job;

static void gn_task(void *arg, int tid, int nth) {
    gn_job *j = arg;
    const int G = j->G;
    const int64_t C = j->C, cg = C / G, cnt = j->HW * cg;
    double *mine = j->part + (size_t)tid * 2 * G, mean[256], rstd[256];
    float scale[4096], shift[4096], mu[4096];
    int64_t lo, hi;
    mmb__split(j->HW, tid, nth, &lo, &hi);
    for (int64_t n = 0; n < j->B; n++) {
        const float *x = j->x + n * j->HW * C;
        float *out = j->out + n * j->HW * C;
        for (int g = 0; g < G; g++) mine[g] = 0;
        for (int64_t p = lo; p < hi; p++)
            for (int g = 0; g < G; g++) {
                const float *r = x + p * C + g * cg;
                float s = 0;  /* a row's few channels in float, the running sum in double */
                for (int64_t c = 0; c < cg; c++) s += r[c];
                mine[g] += s;
            }
        mmb__barrier_wait(&j->bar);
        for (int g = 0; g < G; g++) {
            double s = 0;
            for (int t = 0; t < nth; t++) s += j->part[(size_t)t * 2 * G + g];
            mean[g] = s / (double)cnt;
        }
        for (int g = 0; g < G; g++) mine[G + g] = 0;
        for (int64_t p = lo; p < hi; p++)
            for (int g = 0; g < G; g++) {
                const float *r = x + p * C + g * cg;
                double s = 0;
                for (int64_t c = 0; c < cg; c++) {
                    double d = r[c] - mean[g];
                    s += d * d;
                }
                mine[G + g] += s;
            }
        mmb__barrier_wait(&j->bar);
        for (int g = 0; g < G; g++) {
            double s = 0;
            for (int t = 0; t < nth; t++) s += j->part[(size_t)t * 2 * G + G + g];
            rstd[g] = 1.0 / sqrt(s / (double)cnt + j->eps);
        }
        /* y = (x - mean) * scale + shift per channel: scale = w rstd, shift = b (x - mean is exact for x near
         * the mean, where a folded x scale + (b - mean scale) would cancel at large rstd) */
        for (int64_t c = 0; c < C; c++) {
            int g = (int)(c / cg);
            mu[c] = (float)mean[g];
            scale[c] = (float)(rstd[g] * (j->w ? j->w[c] : 1.0));
            shift[c] = j->b ? j->b[c] : 0.0f;
        }
        for (int64_t p = lo; p < hi; p++) {
            const float *r = x + p * C;
            float *o = out + p * C;
            for (int64_t c = 0; c < C; c++) o[c] = (r[c] - mu[c]) * scale[c] + shift[c];
            if (j->silu) mmb__act_forward(o, C, MMB_ACT_SILU);
        }
        /* the next image's first pass rewrites mine[0, G) only after every thread has read it (barrier 2) */
    }
}

bool mmb__groupnorm_ok(int64_t C, int G) { return G >= 1 && G <= 256 && C >= G && C % G == 0 && C <= 4096; }

void mmb__groupnorm_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w, const float *b, int64_t B,
                               int64_t HW, int64_t C, int G, float eps, bool silu, double *scratch) {
    gn_job j = {.out = out, .x = x, .w = w, .b = b, .B = B, .HW = HW, .C = C, .G = G, .eps = eps, .silu = silu,
                .part = scratch, .bar = {.n = mmb__pool_size(ctx->pool)}};
    mmb__pool_run(ctx->pool, gn_task, &j);
}

/* ---- nearest resize ------------------------------------------------------------------------------------ */

/* torch's nearest_idx: the same size is the identity, twice the size dst >> 1, else
 * min(floor(dst * (float)in / out), in - 1) in float arithmetic, as upsample_nearest2d computes it. */
static int64_t nearest_src(int64_t dst, int64_t in, int64_t out) {
    if (out == in) return dst;
    if (out == 2 * in) return dst >> 1;
    float scale = (float)in / (float)out;
    int64_t s = (int64_t)floorf((float)dst * scale);
    return s < in - 1 ? s : in - 1;
}

void mmb__resize_nearest_ref(float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t Ho,
                             int64_t Wo) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t oy = 0; oy < Ho; oy++)
            for (int64_t ox = 0; ox < Wo; ox++) {
                /* torch's rule written out: floor(dst * in / out) in float (2x: exact halves) */
                int64_t iy = Ho == H ? oy : (int64_t)floorf((float)oy * ((float)H / (float)Ho));
                int64_t ix = Wo == W ? ox : (int64_t)floorf((float)ox * ((float)W / (float)Wo));
                if (iy > H - 1) iy = H - 1;
                if (ix > W - 1) ix = W - 1;
                for (int64_t c = 0; c < C; c++)
                    out[((b * Ho + oy) * Wo + ox) * C + c] = x[((b * H + iy) * W + ix) * C + c];
            }
}

typedef struct {
    float *out;
    const float *x;
    int64_t B, H, W, C, Ho, Wo;
} rs_job;

static void rs_task(void *arg, int tid, int nth) {
    rs_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->B * j->Ho, tid, nth, &lo, &hi);
    for (int64_t r = lo; r < hi; r++) {
        int64_t b = r / j->Ho, oy = r % j->Ho, iy = nearest_src(oy, j->H, j->Ho);
        const float *src = j->x + (b * j->H + iy) * j->W * j->C;
        float *o = j->out + r * j->Wo * j->C;
        for (int64_t ox = 0; ox < j->Wo; ox++)
            memcpy(o + ox * j->C, src + nearest_src(ox, j->W, j->Wo) * j->C, (size_t)j->C * sizeof(float));
    }
}

void mmb__resize_nearest_mt(mmb_ctx *ctx, float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C,
                            int64_t Ho, int64_t Wo) {
    rs_job j = {.out = out, .x = x, .B = B, .H = H, .W = W, .C = C, .Ho = Ho, .Wo = Wo};
    mmb__pool_run(ctx->pool, rs_task, &j);
}

void mmb__upsample2x_nearest_mt(mmb_ctx *ctx, float *out, const float *x, int64_t B, int64_t H, int64_t W,
                                int64_t C) {
    mmb__resize_nearest_mt(ctx, out, x, B, H, W, C, 2 * H, 2 * W);
}
