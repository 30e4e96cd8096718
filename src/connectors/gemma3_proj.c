/* Gemma3MultiModalProjector (transformers' models/gemma3): the tower's last_hidden_state (B, g*g, D) as a
 * (D, g, g) map, AvgPool2d(k, stride k) with k = g / sqrt(mm_tokens_per_image), flattened row-major to
 * (B, (g/k)^2, D); Gemma's RMSNorm mm_soft_emb_norm (x * rsqrt(mean x^2 + eps) * (1 + w), eps the vision
 * config's layer_norm_eps); then x @ mm_input_projection_weight [D, d_model] (no bias).
 *
 * Weights: {prefix}mm_soft_emb_norm.weight [D], {prefix}mm_input_projection_weight [D, d_model]. The grid is
 * vision_config image_size / patch_size; mm_tokens_per_image (default 256) must be a square whose side divides
 * it (refused at load otherwise). */
#include "connectors/connectors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    int64_t D, g, side, k, out;
    float eps;
    float *norm;  /* (D): 1 + w */
    float *proj;  /* (D, out) */
} g3_state;

static void g3_free(void *st) {
    g3_state *s = st;
    if (!s) return;
    free(s->norm);
    free(s->proj);
    free(s);
}

static mmb_status g3_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    mmb_vit_info vi;
    mmb_status st = mmb__vision_cfg(ctx, c, "vision_config.", &vi);
    int64_t mm = 256;
    if (st == MMB_OK && !mmb__cfg_int(ctx, c, "mm_tokens_per_image", &mm, &st) && st == MMB_OK) mm = 256;
    if (st != MMB_OK) return st;
    int64_t g = vi.image_size / vi.patch_size, side = 0;
    while (side < 65536 && (side + 1) * (side + 1) <= mm) side++;
    if (mm < 1 || side * side != mm || g < 1 || g % side != 0)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'mm_tokens_per_image' = %lld is not a square whose side "
                        "divides the %lldx%lld patch grid (image_size %d / patch_size %d)", c->dir, (long long)mm,
                        (long long)g, (long long)g, vi.image_size, vi.patch_size);
    if (cfg->in_width != vi.width)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision width %d, connector input %lld", c->dir, vi.width,
                        (long long)cfg->in_width);
    g3_state *s = calloc(1, sizeof *s);
    if (!s) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    *s = (g3_state){.D = vi.width, .g = g, .side = side, .k = g / side, .out = cfg->out_width, .eps = vi.eps};
    char name[256];
    snprintf(name, sizeof name, "%smm_soft_emb_norm.weight", cfg->prefix);
    st = mmb__ckpt_vec(ctx, c, name, s->D, &s->norm);
    snprintf(name, sizeof name, "%smm_input_projection_weight", cfg->prefix);
    const int64_t shape[2] = {s->D, s->out};
    if (st == MMB_OK) st = mmb__ckpt_floats(ctx, c, name, 2, shape, &s->proj);
    if (st != MMB_OK) { g3_free(s); return st; }
    for (int64_t e = 0; e < s->D; e++) s->norm[e] = 1.0f + s->norm[e];
    *out = s;
    return MMB_OK;
}

static int64_t g3_out_tokens(const void *st, int64_t tokens) {
    const g3_state *s = st;
    return tokens == s->g * s->g ? s->side * s->side : -1;
}

static int64_t g3_out_width(const void *st) { return ((const g3_state *)st)->out; }

static void g3_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const g3_state *s = st;
    int64_t t = g3_out_tokens(st, tokens);
    *params = s->D * s->out + s->D;
    *flops = t > 0 ? 2 * t * s->D * s->out + tokens * s->D : 0;
}

static size_t g3_scratch(const void *st, int64_t rows) {
    (void)rows;
    return mmb__arena_piece(sizeof(float) * (size_t)((const g3_state *)st)->D) / sizeof(float);
}

static mmb_status g3_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                             int64_t tokens) {
    const g3_state *s = st;
    if (g3_out_tokens(st, tokens) < 0)
        return mmb__err(ctx, MMB_ERR_SHAPE, "Gemma 3 projector: %lld tokens per image, expected the %lldx%lld grid",
                        (long long)tokens, (long long)s->g, (long long)s->g);
    float *p = mmb__arena_alloc(&ctx->arena, sizeof(float) * (size_t)s->D);
    if (!p) return mmb__err(ctx, MMB_ERR_NOMEM, "Gemma 3 projector: scratch not reserved");
    const int64_t D = s->D, g = s->g, k = s->k, S = s->side;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t i = 0; i < S; i++)
            for (int64_t j = 0; j < S; j++) {
                for (int64_t e = 0; e < D; e++) p[e] = 0;
                for (int64_t di = 0; di < k; di++) /* AvgPool2d: the k x k window's sum / k^2 */
                    for (int64_t dj = 0; dj < k; dj++) {
                        const float *r = x + (b * g * g + (i * k + di) * g + j * k + dj) * D;
                        for (int64_t e = 0; e < D; e++) p[e] += r[e];
                    }
                for (int64_t e = 0; e < D; e++) p[e] /= (float)(k * k);
                mmb__rmsnorm_forward(p, p, s->norm, 1, D, s->eps);
                float *o = out + ((b * S + i) * S + j) * s->out;
                for (int64_t c = 0; c < s->out; c++) o[c] = 0;
                for (int64_t e = 0; e < D; e++) {
                    const float *w = s->proj + e * s->out;
                    for (int64_t c = 0; c < s->out; c++) o[c] += p[e] * w[c];
                }
            }
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_gemma3_proj = {
    .name = "gemma3_projector",
    .names = (const char *const[]){"gemma3_projector", NULL},
    .load = g3_load,
    .out_tokens = g3_out_tokens,
    .out_width = g3_out_width,
    .cost = g3_cost,
    .scratch = g3_scratch,
    .forward = g3_forward,
    .free = g3_free,
};
