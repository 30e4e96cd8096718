/* MobileVLM's lightweight downsample projectors (Chu et al. 2023/2024; Meituan-AutoML/MobileVLM
 * mobilevlm/model/vision_projector.py @eb0039aa), original-LLaVA checkpoints, keys under model.mm_projector.:
 *   "ldpnet"    LDPNetProjector: model.mlp = Sequential(Identity, Linear(D -> C), GELU, Linear(C -> C)), then
 *               model.mb_block = Sequential(Identity, InvertedResidual(stride 1), InvertedResidual(stride 2)):
 *               torchvision MobileNetV3 blocks with expanded = in = out = C, each
 *                 block.0 depthwise 3x3 conv (no bias) + norm + Hardswish
 *                 block.1 SqueezeExcitation: fc1 (C -> make_divisible(C / 4, 8)), ReLU, fc2, Hardsigmoid
 *                 block.2 1x1 conv (no bias) + norm
 *               plus the input in the stride-1 block only. The norm is timm LayerNormAct2d(act None): a
 *               LayerNorm over channels, eps 1e-5. g x g tokens -> ((g - 1) / 2 + 1)^2 (24 x 24 -> 144).
 *   "ldpnetv2"  LDPNetV2Projector: mlp.mlp = Sequential(Linear(D -> C), GELU, Linear(C -> C)),
 *               AdaptiveAvgPool2d((12, 12)), then peg.peg.0 = Conv2d(C, C, 3, 1, 1, groups=C, bias) + its input.
 *               Always 144 tokens.
 * GELU is exact (nn.GELU()); C is the LM width (hidden_size). */
#include "connectors/connectors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define V2_SIDE 12
#define LN_EPS 1e-5f

typedef struct {
    int stride;
    float *dw, *n0w, *n0b, *n2w, *n2b;  /* dw: packed depthwise weight */
    mmb_linear fc1, fc2, proj;
} ir_block;

typedef struct {
    bool v2;
    int64_t in_w, C;
    mmb_linear lin[2];
    ir_block blk[2];      /* v1 */
    float *peg_w, *peg_b; /* v2: packed depthwise weight, bias */
} ldp_state;

/* v1's inverted-residual blocks add hardswish to the MLP's GELU. */
static const char *ldp_activation(const void *st) { return ((const ldp_state *)st)->v2 ? "gelu" : "gelu, hardswish"; }

static void ldp_free(void *st) {
    ldp_state *s = st;
    if (!s) return;
    for (int i = 0; i < 2; i++) {
        ir_block *b = &s->blk[i];
        mmb__linear_free(&s->lin[i]);
        mmb__linear_free(&b->fc1);
        mmb__linear_free(&b->fc2);
        mmb__linear_free(&b->proj);
        free(b->dw);
        free(b->n0w);
        free(b->n0b);
        free(b->n2w);
        free(b->n2b);
    }
    free(s->peg_w);
    free(s->peg_b);
    free(s);
}

/* torchvision's _make_divisible(v, 8). */
static int64_t make_divisible8(int64_t v) {
    int64_t n = (v + 4) / 8 * 8;
    if (n < 8) n = 8;
    if ((double)n < 0.9 * (double)v) n += 8;
    return n;
}

/* InvertedResidual p ("...mb_block.1.block."): C -> C. */
static mmb_status block_load(mmb_ctx *ctx, const mmb_ckpt *c, ir_block *b, const char *p, int64_t C, int stride) {
    int64_t sq = make_divisible8(C / 4);
    b->stride = stride;
    mmb_status s = mmb__ckpt_dwconv(ctx, c, p, "0.0", C, false, &b->dw, NULL);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "0.1", C, &b->n0w, &b->n0b);
    if (s == MMB_OK) s = mmb__ckpt_conv1x1(ctx, c, p, "1.fc1", sq, C, true, &b->fc1);
    if (s == MMB_OK) s = mmb__ckpt_conv1x1(ctx, c, p, "1.fc2", C, sq, true, &b->fc2);
    if (s == MMB_OK) s = mmb__ckpt_conv1x1(ctx, c, p, "2.0", C, C, false, &b->proj);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "2.1", C, &b->n2w, &b->n2b);
    return s;
}

static mmb_status ldp_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    ldp_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    s->v2 = strcmp(cfg->type, "ldpnetv2") == 0;
    s->in_w = cfg->in_width;
    s->C = cfg->out_width;
    char p[512];
    mmb_status st = MMB_OK;
    for (int i = 0; i < 2 && st == MMB_OK; i++) {
        snprintf(p, sizeof p, "%s%s", cfg->prefix, s->v2 ? "mlp.mlp." : "model.mlp.");
        st = mmb__ckpt_linear(ctx, c, p, s->v2 ? (i ? "2" : "0") : (i ? "3" : "1"), s->C, i ? s->C : s->in_w, true, &s->lin[i]);
    }
    if (s->v2) {
        snprintf(p, sizeof p, "%speg.peg.", cfg->prefix);
        if (st == MMB_OK) st = mmb__ckpt_dwconv(ctx, c, p, "0", s->C, true, &s->peg_w, &s->peg_b);
    }
    for (int i = 0; i < 2 && !s->v2 && st == MMB_OK; i++) {
        snprintf(p, sizeof p, "%smodel.mb_block.%d.block.", cfg->prefix, i + 1);
        st = block_load(ctx, c, &s->blk[i], p, s->C, i + 1);
    }
    if (st != MMB_OK) { ldp_free(s); return st; }
    *out = s;
    return MMB_OK;
}

/* Side of the output grid for g x g tokens in. */
static int64_t out_side(const ldp_state *s, int64_t g) { return s->v2 ? V2_SIDE : (g - 1) / 2 + 1; }

static int64_t ldp_out_tokens(const void *st, int64_t tokens) {
    int64_t g = mmb__grid_side(tokens), o = out_side(st, g);
    return g > 0 ? o * o : -1;
}

static int64_t ldp_out_width(const void *st) { return ((const ldp_state *)st)->C; }

static void ldp_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const ldp_state *s = st;
    int64_t g = mmb__grid_side(tokens), n = g > 0 ? tokens : 0, o = g > 0 ? out_side(s, g) : 0, C = s->C;
    *params = *flops = 0;
    mmb__linear_cost(&s->lin[0], n, params, flops);
    mmb__linear_cost(&s->lin[1], n, params, flops);
    if (s->v2) {
        *params += 10 * C;
        *flops += 2 * 9 * o * o * C;
        return;
    }
    for (int i = 0; i < 2; i++) {
        const ir_block *b = &s->blk[i];
        int64_t m = i ? o * o : n;  /* positions after the block's depthwise conv */
        *params += 9 * C + 4 * C;  /* depthwise conv, norms */
        *flops += 2 * m * 9 * C;
        mmb__linear_cost(&b->fc1, 1, params, flops);
        mmb__linear_cost(&b->fc2, 1, params, flops);
        mmb__linear_cost(&b->proj, m, params, flops);
    }
}

/* Three maps of max(one image's tokens, 144) positions (rows bounds an image's tokens), and the SE's. */
static size_t ldp_scratch(const void *st, int64_t rows) {
    const ldp_state *s = st;
    int64_t n = rows > V2_SIDE * V2_SIDE ? rows : V2_SIDE * V2_SIDE;
    return (3 * mmb__arena_piece((size_t)(n * s->C) * sizeof(float)) +
            mmb__arena_piece((size_t)(3 * s->C) * sizeof(float))) / sizeof(float);
}

static void hardswish(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] *= fminf(fmaxf(x[i] + 3.0f, 0.0f), 6.0f) / 6.0f;
}

/* x (g*g, C) -> y (o*o, C), o = (g - 1) / stride + 1, y != x: norm(proj(SE(HS(norm(dwconv(x)))))), plus x when
 * the stride is 1. t: scratch (o*o, C); se: the SE's. */
static void block_forward(mmb_ctx *ctx, const ir_block *b, float *y, const float *x, int64_t g, int64_t C, float *t,
                          float *se) {
    int64_t o = (g - 1) / b->stride + 1, n = o * o;
    mmb__dwconv3x3_forward_mt(ctx, t, x, b->dw, NULL, 1, g, g, C, b->stride);
    mmb__layernorm_forward_mt(ctx, t, t, b->n0w, b->n0b, n, C, LN_EPS);
    hardswish(t, n * C);
    mmb__se_forward(ctx, t, 1, n, &b->fc1, &b->fc2, MMB_SE_RELU_HARDSIGMOID, se);
    mmb__linear_forward(ctx, y, t, n, &b->proj);
    mmb__layernorm_forward_mt(ctx, y, y, b->n2w, b->n2b, n, C, LN_EPS);
    if (b->stride == 1) mmb__add_forward(y, y, x, n * C);
}

/* x (batch, g*g, D) -> out (batch, o*o, C), one image at a time. */
static mmb_status ldp_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                              int64_t tokens) {
    const ldp_state *s = st;
    int64_t g = mmb__grid_side(tokens), C = s->C;
    if (g < 1)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: %lld tokens per image are not a square patch grid",
                        s->v2 ? "ldpnetv2" : "ldpnet", (long long)tokens);
    int64_t o = out_side(s, g), n = tokens > V2_SIDE * V2_SIDE ? tokens : V2_SIDE * V2_SIDE;
    size_t map = (size_t)(n * C) * sizeof(float);
    float *a = mmb__arena_alloc(&ctx->arena, map), *t1 = mmb__arena_alloc(&ctx->arena, map),
          *t2 = mmb__arena_alloc(&ctx->arena, map),
          *se = mmb__arena_alloc(&ctx->arena, (size_t)(3 * C) * sizeof(float));
    if (!a || !t1 || !t2 || !se) return mmb__err(ctx, MMB_ERR_NOMEM, "ldp: scratch arena too small");
    for (int64_t b = 0; b < batch; b++) {
        float *y = out + b * o * o * C;
        mmb__linear_forward(ctx, t1, x + b * tokens * s->in_w, tokens, &s->lin[0]);
        mmb__act_forward_mt(ctx, t1, tokens * C, MMB_ACT_GELU);
        mmb__linear_forward(ctx, a, t1, tokens, &s->lin[1]);
        if (s->v2) {
            mmb__adaptive_avgpool2d_forward_mt(ctx, t1, a, 1, g, g, C, o, o);
            mmb__dwconv3x3_forward_mt(ctx, y, t1, s->peg_w, s->peg_b, 1, o, o, C, 1);
            mmb__add_forward(y, y, t1, o * o * C);
            continue;
        }
        block_forward(ctx, &s->blk[0], t2, a, g, C, t1, se);
        block_forward(ctx, &s->blk[1], y, t2, g, C, t1, se);
    }
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_ldp = {
    .name = "ldpnet",
    .names = (const char *const[]){"ldpnet", "ldpnetv2", NULL},
    .activation = ldp_activation,
    .load = ldp_load,
    .out_tokens = ldp_out_tokens,
    .out_width = ldp_out_width,
    .cost = ldp_cost,
    .scratch = ldp_scratch,
    .forward = ldp_forward,
    .free = ldp_free,
};
