/* The qwen2_vl family (Qwen2VLForConditionalGeneration's image path, get_image_features): its tower
 * (vision/qwen2vl.c), then its PatchMerger (connectors/patch_merger.c) on each 2x2 window of patches.
 * Pixels [B, 3, H, W] (H, W multiples of 28) -> embeddings [B, (H/28) (W/28), hidden_size]. */
#include "models/models.h"

#include <stdio.h>
#include <stdlib.h>

typedef struct {
    mmb_q2vit *vit;
    mmb_q2vit_info vi;
    void *merger;  /* mmb__conn_patch_merger's state */
} q2_state;

static void q2_free(void *st) {
    q2_state *q = st;
    if (!q) return;
    if (q->merger) mmb__conn_patch_merger.free(q->merger);
    mmb__q2vit_free(q->vit);
    free(q);
}

/* The tower, then the merger under {prefix}merger.: its first Linear must be (m^2 D, m^2 D) for the
 * configured merge size. */
static mmb_status q2_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state,
                          mmb_model_info *info) {
    (void)fam;
    q2_state *q = calloc(1, sizeof *q);
    if (!q) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    mmb_status s = mmb__q2vit_load(ctx, c, &q->vit);
    char name[96];
    const mmb_tensor *t = NULL;
    if (s == MMB_OK) {
        q->vi = mmb__q2vit_info(q->vit);
        const int64_t K = (int64_t)q->vi.width * q->vi.merge * q->vi.merge, ks[2] = {K, K};
        snprintf(name, sizeof name, "%smerger.mlp.0.weight", q->vi.prefix);
        s = mmb__ckpt_bind(ctx, c, name, 2, ks, &t);
    }
    if (s == MMB_OK) {
        char prefix[96];
        snprintf(prefix, sizeof prefix, "%smerger.", q->vi.prefix);
        mmb_conn_cfg cc = {.type = "patch_merger", .prefix = prefix, .in_width = q->vi.width, .out_width = q->vi.out,
                           .eps = q->vi.eps};
        s = mmb__conn_patch_merger.load(ctx, c, &cc, &q->merger);
    }
    if (s != MMB_OK) { q2_free(q); return s; }
    int64_t flops = 0;
    mmb__conn_patch_merger.cost(q->merger, 0, &info->params, &flops);
    info->connector = mmb__conn_patch_merger.name;
    info->activation = mmb__connector_activation(&mmb__conn_patch_merger, q->merger);
    info->vision_layers = q->vi.depth;
    info->vision_width = q->vi.width;
    info->in_width = q->vi.width * q->vi.merge * q->vi.merge;
    info->out_width = q->vi.out;
    info->image_size = 0;      /* any multiple of patch * merge */
    info->patch_size = q->vi.patch;
    info->tokens_per_image = 0;
    info->flops_per_image = 0;
    info->weight_dtype = t->dtype;
    *state = q;
    return MMB_OK;
}

static int64_t q2_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    const q2_state *q = st;
    int64_t t = mmb__q2vit_tokens(ctx, q->vit, height, width);
    return t < 0 ? -1 : t / (q->vi.merge * q->vi.merge);
}

/* The tower's output in ctx's feature buffer, the merger's scratch in its arena. */
static mmb_status q2_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t B, int height, int width,
                            float *out) {
    const q2_state *q = st;
    const int64_t T = mmb__q2vit_tokens(ctx, q->vit, height, width);
    if (T < 0) return MMB_ERR_SHAPE;
    uint64_t rows, n;
    if (!mmb__mul_ok((uint64_t)B, (uint64_t)T, &rows) || !mmb__mul_ok(rows, (uint64_t)q->vi.width, &n) ||
        n > SIZE_MAX / 64)
        return mmb__err(ctx, MMB_ERR_NOMEM, "qwen2_vl: %lld images of %dx%d: sizes overflow", (long long)B, width,
                        height);
    const size_t bytes = sizeof(float) * (size_t)n;
    mmb_status s = mmb__arena_reserve(ctx, &ctx->feats, mmb__arena_piece(bytes));
    float *x = s == MMB_OK ? mmb__arena_alloc(&ctx->feats, bytes) : NULL;
    if (s == MMB_OK) s = mmb__q2vit_forward(ctx, q->vit, pixels, B, height, width, x);
    if (s == MMB_OK)
        s = mmb__arena_reserve(ctx, &ctx->arena,
                               sizeof(float) * mmb__conn_patch_merger.scratch(q->merger, (int64_t)rows));
    if (s == MMB_OK) s = mmb__conn_patch_merger.forward(ctx, q->merger, out, x, B, T);
    mmb__arena_reset(&ctx->arena);
    mmb__arena_reset(&ctx->feats);
    return s;
}

const mmb_family_ops mmb__family_qwen2vl = {
    .load = q2_load,
    .tokens = q2_tokens,
    .encode = q2_encode,
    .free = q2_free,
};
