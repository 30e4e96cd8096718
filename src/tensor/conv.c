/* Convolution-network kernels for the spatial connectors (C-Abstractor, LDP), on channels-last maps:
 * a feature map (B, H, W, C) is the connector's own (batch, tokens, channels) buffer, row-major, so a
 * 1x1 convolution is a linear layer over its rows and a channel LayerNorm is a LayerNorm over rows.
 *   depthwise 3x3 convolution, padding 1, stride 1 or 2 (torch Conv2d(C, C, 3, s, 1, groups=C))
 *   adaptive average pooling (torch AdaptiveAvgPool2d: bin i of n over a side of L is
 *   [floor(i L / n), ceil((i + 1) L / n)))
 *   squeeze-and-excitation (timm SEModule as RegNet builds it; torchvision SqueezeExcitation)
 * The convolution and the pooling have _ref oracles (double accumulation, torch's NCHW weight layout) for
 * tests/test_kernels.c (test_dwconv, test_pool); squeeze-and-excitation is checked through the
 * C-Abstractor and LDP cases of tests/oracle/test_research_connectors.py. */
#include "tensor/tensor.h"

#include <math.h>
#include <string.h>

int64_t mmb__patch_grid(int64_t tokens, bool *has_cls) {
    for (int cls = 0; cls < 2; cls++) {
        int64_t n = tokens - cls, g = (int64_t)llround(sqrt((double)(n > 0 ? n : 0)));
        if (n > 0 && g * g == n) {
            *has_cls = cls;
            return g;
        }
    }
    return -1;
}

int64_t mmb__grid_side(int64_t tokens) {
    bool cls = false;
    int64_t g = mmb__patch_grid(tokens, &cls);
    return cls ? -1 : g;
}

void mmb__dwconv3x3_pack(float *w9, const float *w, int64_t C) {
    for (int64_t c = 0; c < C; c++)
        for (int k = 0; k < 9; k++) w9[k * C + c] = w[c * 9 + k];
}

static int64_t conv_out(int64_t n, int stride) { return (n - 1) / stride + 1; }

/* Output rows [lo, hi) of the (B * Ho) rows of the map. */
static void dwconv_rows(float *out, const float *x, const float *w9, const float *bias, int64_t H, int64_t W,
                        int64_t C, int stride, int64_t lo, int64_t hi) {
    int64_t Ho = conv_out(H, stride), Wo = conv_out(W, stride);
    for (int64_t r = lo; r < hi; r++) {
        int64_t b = r / Ho, oy = r % Ho;
        for (int64_t ox = 0; ox < Wo; ox++) {
            float *o = out + ((b * Ho + oy) * Wo + ox) * C;
            if (bias) memcpy(o, bias, (size_t)C * sizeof(float));
            else memset(o, 0, (size_t)C * sizeof(float));
            for (int ky = 0; ky < 3; ky++) {
                int64_t iy = oy * stride + ky - 1;
                if (iy < 0 || iy >= H) continue;
                for (int kx = 0; kx < 3; kx++) {
                    int64_t ix = ox * stride + kx - 1;
                    if (ix < 0 || ix >= W) continue;
                    const float *in = x + ((b * H + iy) * W + ix) * C, *k = w9 + (ky * 3 + kx) * C;
                    for (int64_t c = 0; c < C; c++) o[c] += in[c] * k[c];
                }
            }
        }
    }
}

void mmb__dwconv3x3_forward(float *out, const float *x, const float *w9, const float *bias, int64_t B, int64_t H,
                            int64_t W, int64_t C, int stride) {
    dwconv_rows(out, x, w9, bias, H, W, C, stride, 0, B * conv_out(H, stride));
}

void mmb__dwconv3x3_forward_ref(float *out, const float *x, const float *w, const float *bias, int64_t B, int64_t H,
                                int64_t W, int64_t C, int stride) {
    int64_t Ho = conv_out(H, stride), Wo = conv_out(W, stride);
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t oy = 0; oy < Ho; oy++)
                for (int64_t ox = 0; ox < Wo; ox++) {
                    double acc = bias ? bias[c] : 0.0;
                    for (int ky = 0; ky < 3; ky++)
                        for (int kx = 0; kx < 3; kx++) {
                            int64_t iy = oy * stride - 1 + ky, ix = ox * stride - 1 + kx;
                            if (iy >= 0 && iy < H && ix >= 0 && ix < W)
                                acc += (double)x[((b * H + iy) * W + ix) * C + c] * w[c * 9 + ky * 3 + kx];
                        }
                    out[((b * Ho + oy) * Wo + ox) * C + c] = (float)acc;
                }
}

typedef struct {
    float *out;
    const float *x, *w, *bias;
    int64_t B, H, W, C, Ho, Wo;
    int stride;
} map_job;

static void dwconv_task(void *arg, int tid, int nth) {
    map_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->B * conv_out(j->H, j->stride), tid, nth, &lo, &hi);
    dwconv_rows(j->out, j->x, j->w, j->bias, j->H, j->W, j->C, j->stride, lo, hi);
}

void mmb__dwconv3x3_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w9, const float *bias,
                               int64_t B, int64_t H, int64_t W, int64_t C, int stride) {
    map_job j = {.out = out, .x = x, .w = w9, .bias = bias, .B = B, .H = H, .W = W, .C = C, .stride = stride};
    mmb__pool_run(ctx->pool, dwconv_task, &j);
}

/* Bin i of n over a side of L: [floor(i L / n), ceil((i + 1) L / n)). */
void mmb__conv_rows(float *rows, const float *x, int64_t B, int64_t H, int64_t W, int64_t C, int k) {
    const int64_t Ho = H / k, Wo = W / k, kk = (int64_t)k * k;
    for (int64_t b = 0; b < B; b++)
        for (int64_t oy = 0; oy < Ho; oy++)
            for (int64_t ox = 0; ox < Wo; ox++) {
                float *r = rows + ((b * Ho + oy) * Wo + ox) * C * kk;
                for (int ky = 0; ky < k; ky++)
                    for (int kx = 0; kx < k; kx++) {
                        const float *src = x + ((b * H + oy * k + ky) * W + ox * k + kx) * C;
                        for (int64_t c = 0; c < C; c++) r[c * kk + ky * k + kx] = src[c];
                    }
            }
}

static int64_t bin_lo(int64_t i, int64_t L, int64_t n) { return i * L / n; }
static int64_t bin_hi(int64_t i, int64_t L, int64_t n) { return ((i + 1) * L + n - 1) / n; }

static void pool_rows(float *out, const float *x, int64_t H, int64_t W, int64_t C, int64_t Ho, int64_t Wo,
                      int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; r++) {
        int64_t b = r / Ho, oy = r % Ho, y0 = bin_lo(oy, H, Ho), y1 = bin_hi(oy, H, Ho);
        for (int64_t ox = 0; ox < Wo; ox++) {
            int64_t x0 = bin_lo(ox, W, Wo), x1 = bin_hi(ox, W, Wo);
            float *o = out + ((b * Ho + oy) * Wo + ox) * C;
            memset(o, 0, (size_t)C * sizeof(float));
            for (int64_t iy = y0; iy < y1; iy++)
                for (int64_t ix = x0; ix < x1; ix++) {
                    const float *in = x + ((b * H + iy) * W + ix) * C;
                    for (int64_t c = 0; c < C; c++) o[c] += in[c];
                }
            float inv = 1.0f / (float)((y1 - y0) * (x1 - x0));
            for (int64_t c = 0; c < C; c++) o[c] *= inv;
        }
    }
}

void mmb__adaptive_avgpool2d_forward(float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C,
                                     int64_t Ho, int64_t Wo) {
    pool_rows(out, x, H, W, C, Ho, Wo, 0, B * Ho);
}

void mmb__adaptive_avgpool2d_forward_ref(float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C,
                                         int64_t Ho, int64_t Wo) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++)
            for (int64_t oy = 0; oy < Ho; oy++)
                for (int64_t ox = 0; ox < Wo; ox++) {
                    int64_t y0 = (int64_t)floor((double)(oy * H) / (double)Ho);
                    int64_t y1 = (int64_t)ceil((double)((oy + 1) * H) / (double)Ho);
                    int64_t x0 = (int64_t)floor((double)(ox * W) / (double)Wo);
                    int64_t x1 = (int64_t)ceil((double)((ox + 1) * W) / (double)Wo);
                    double acc = 0;
                    for (int64_t iy = y0; iy < y1; iy++)
                        for (int64_t ix = x0; ix < x1; ix++) acc += x[((b * H + iy) * W + ix) * C + c];
                    out[((b * Ho + oy) * Wo + ox) * C + c] = (float)(acc / (double)((y1 - y0) * (x1 - x0)));
                }
}

static void pool_task(void *arg, int tid, int nth) {
    map_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->B * j->Ho, tid, nth, &lo, &hi);
    pool_rows(j->out, j->x, j->H, j->W, j->C, j->Ho, j->Wo, lo, hi);
}

void mmb__adaptive_avgpool2d_forward_mt(mmb_ctx *ctx, float *out, const float *x, int64_t B, int64_t H, int64_t W,
                                        int64_t C, int64_t Ho, int64_t Wo) {
    map_job j = {.out = out, .x = x, .B = B, .H = H, .W = W, .C = C, .Ho = Ho, .Wo = Wo};
    mmb__pool_run(ctx->pool, pool_task, &j);
}

void mmb__se_forward(mmb_ctx *ctx, float *x, int64_t B, int64_t HW, const mmb_linear *fc1, const mmb_linear *fc2,
                     mmb_se_kind kind, float *scratch) {
    int64_t C = fc1->n_in, R = fc1->n_out;
    float *mean = scratch, *mid = scratch + B * C, *gate = mid + B * R;
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = 0; c < C; c++) {
            double acc = 0;
            for (int64_t t = 0; t < HW; t++) acc += x[(b * HW + t) * C + c];
            mean[b * C + c] = (float)(acc / (double)HW);
        }
    mmb__linear_forward(ctx, mid, mean, B, fc1);
    if (kind == MMB_SE_SILU_SIGMOID) mmb__act_forward(mid, B * R, MMB_ACT_SILU);
    else
        for (int64_t i = 0; i < B * R; i++) mid[i] = mid[i] > 0 ? mid[i] : 0;
    mmb__linear_forward(ctx, gate, mid, B, fc2);
    for (int64_t i = 0; i < B * C; i++)
        gate[i] = kind == MMB_SE_SILU_SIGMOID ? 1.0f / (1.0f + expf(-gate[i]))
                                              : fminf(fmaxf(gate[i] + 3.0f, 0.0f), 6.0f) / 6.0f;
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < HW; t++) {
            float *row = x + (b * HW + t) * C;
            const float *g = gate + b * C;
            for (int64_t c = 0; c < C; c++) row[c] *= g[c];
        }
}
