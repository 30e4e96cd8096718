/* Idefics3Connector (transformers' models/idefics3, also SmolVLM's): pixel shuffle, then
 * modality_projection.proj = Linear(D * s^2 -> d_model, no bias). No norm, no activation.
 *
 *   pixel_shuffle   x (B, g*g, D) -> (B, (g/s)^2, D s^2): the s x s block at coarse (i, j) becomes one
 *                   token; channel (di * s + dj) * D + d holds x[(i s + di) g + j s + dj][d]. That is
 *                   what transformers' view (B, g, g/s, D s) / permute / reshape (B, g/s, g/s, D s^2) /
 *                   permute / reshape sequence produces, for a square grid with s dividing g.
 *
 * Weights: {prefix}modality_projection.proj.weight [d_model, D s^2]; scale_factor from config.json
 * (default 2). The patch grid is the tower's full-image grid (vision_config image_size / patch_size):
 * a grid s does not divide is refused at load. */
#include "connectors/connectors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int s;              /* scale_factor */
    int64_t D, g, out;  /* vision width, grid side, d_model */
    mmb_linear proj;    /* (out, D s^2) */
} ps_state;

static void ps_free(void *st) {
    ps_state *s = st;
    if (!s) return;
    mmb__linear_free(&s->proj);
    free(s);
}

static mmb_status ps_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **out) {
    mmb_vit_info vi;
    mmb_status st = mmb__vision_cfg(ctx, c, "vision_config.", &vi);
    int64_t s = 2;
    if (st == MMB_OK && !mmb__cfg_int(ctx, c, "scale_factor", &s, &st) && st == MMB_OK) s = 2;
    if (st != MMB_OK) return st;
    int64_t g = vi.image_size / vi.patch_size;
    if (s < 1 || s > 4096)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'scale_factor' = %lld is out of range", c->dir,
                        (long long)s);
    if (g % s != 0)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: 'scale_factor' = %lld does not divide the %lldx%lld patch "
                        "grid (image_size %d / patch_size %d); the pixel shuffle needs s | grid side", c->dir,
                        (long long)s, (long long)g, (long long)g, vi.image_size, vi.patch_size);
    if (cfg->in_width != vi.width)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision width %d, connector input %lld", c->dir, vi.width,
                        (long long)cfg->in_width);
    ps_state *ps = calloc(1, sizeof *ps);
    if (!ps) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    *ps = (ps_state){.s = (int)s, .D = vi.width, .g = g, .out = cfg->out_width};
    char name[256];
    snprintf(name, sizeof name, "%smodality_projection.proj.weight", cfg->prefix);
    const mmb_tensor *w;
    int64_t shape[2] = {cfg->out_width, vi.width * s * s};
    st = mmb__ckpt_bind(ctx, c, name, 2, shape, &w);
    if (st == MMB_OK) st = mmb__linear_bind(ctx, &ps->proj, w, NULL);
    if (st != MMB_OK) { ps_free(ps); return st; }
    *out = ps;
    return MMB_OK;
}

/* Tokens out for `tokens` in: (g/s)^2 for the tower's full grid, -1 otherwise. */
static int64_t ps_out_tokens(const void *st, int64_t tokens) {
    const ps_state *s = st;
    return tokens == s->g * s->g ? tokens / ((int64_t)s->s * s->s) : -1;
}

static int64_t ps_out_width(const void *st) { return ((const ps_state *)st)->out; }

static void ps_cost(const void *st, int64_t tokens, int64_t *params, int64_t *flops) {
    const ps_state *s = st;
    int64_t in = s->D * s->s * s->s, t = ps_out_tokens(st, tokens);
    *params = in * s->out;
    *flops = t > 0 ? 2 * t * in * s->out : 0;
}

static size_t ps_scratch(const void *st, int64_t rows) {
    return mmb__arena_piece(sizeof(float) * (size_t)(rows * ((const ps_state *)st)->D)) / sizeof(float);
}

/* x (B, g*g, D) -> out (B, (g/s)^2, D s^2), as described at the top. */
static void pixel_shuffle(float *out, const float *x, int64_t B, int64_t g, int64_t D, int64_t s) {
    int64_t G = g / s;
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < G; i++)
            for (int64_t j = 0; j < G; j++) {
                float *o = out + ((b * G + i) * G + j) * D * s * s;
                for (int64_t di = 0; di < s; di++)
                    for (int64_t dj = 0; dj < s; dj++)
                        memcpy(o + (di * s + dj) * D, x + (b * g * g + (i * s + di) * g + j * s + dj) * D,
                               sizeof(float) * (size_t)D);
            }
}

static mmb_status ps_forward(mmb_ctx *ctx, const void *st, float *out, const float *x, int64_t batch,
                             int64_t tokens) {
    const ps_state *s = st;
    int64_t t = ps_out_tokens(st, tokens);
    if (t < 0)
        return mmb__err(ctx, MMB_ERR_SHAPE, "pixel shuffle: %lld tokens per image, expected the %lldx%lld grid",
                        (long long)tokens, (long long)s->g, (long long)s->g);
    float *sh = mmb__arena_alloc(&ctx->arena, sizeof(float) * (size_t)(batch * tokens * s->D));
    if (!sh) return mmb__err(ctx, MMB_ERR_NOMEM, "pixel shuffle: scratch not reserved");
    pixel_shuffle(sh, x, batch, s->g, s->D, s->s);
    mmb__linear_forward(ctx, out, sh, batch * t, &s->proj);
    return MMB_OK;
}

const mmb_connector_ops mmb__conn_pixel_shuffle = {
    .name = "pixel_shuffle",
    .names = (const char *const[]){"pixel_shuffle", NULL},
    .load = ps_load,
    .out_tokens = ps_out_tokens,
    .out_width = ps_out_width,
    .cost = ps_cost,
    .scratch = ps_scratch,
    .forward = ps_forward,
    .free = ps_free,
};
