/* The cogvlm family (CogVLM, the remote code's CogVLMForCausalLM of THUDM/cogvlm-chat-hf): the vision side of
 * EVA2CLIPModel. Its tower (vision/cogvlm.c) gives the grid's patch tokens (the CLS dropped); then the GLU
 * adapter, linear_proj.*:
 *   linear_proj    Linear(vision hidden_size -> hidden_size, no bias)
 *   norm1 + act1   LayerNorm(hidden_size) (nn.LayerNorm's default eps 1e-5), then GELU (erf)
 *   gate_proj, dense_h_to_4h   Linear(hidden_size -> intermediate_size, no bias) each: silu(gate) * h_to_4h
 *   dense_4h_to_h  Linear(intermediate_size -> hidden_size, no bias)
 * and the learned boi / eoi rows ([1, 1, hidden_size]) around each image: encode gives grid^2 + 2 rows of the
 * LLM's width an image, (boi, patches row-major, eoi), the rows build_conversation_input_ids gives
 * token_type_ids VISION and CogVLMModel.forward writes over the input embeddings. hidden_size and
 * intermediate_size are the language model's (the top level of config.json). The LLM (model.*, with the
 * visual expert's two weight sets per layer) is lm/decoder.c's.
 *
 * CogVLM2 (THUDM/cogvlm2-llama3-chat-19B, the same architecture name; told by its config's
 * num_multi_query_heads, a key CogVLM's has not; the decoder reads the same key for its grouped K/V heads) puts
 * EVA2CLIPModel.conv between the tower and the adapter:
 *   conv           Conv2d(vision hidden_size -> vision hidden_size, kernel = stride = 2, with bias) over the
 *                  (grid, grid) map of patch tokens: (grid / 2)^2 tokens, row-major, then the GLU as above
 * so an image is (grid / 2)^2 + 2 rows, as build_conversation_input_ids counts them.
 *
 * The checkpoint ships no preprocessor_config.json: build_conversation_input_ids' torchvision transform is
 * Resize((image_size, image_size), BICUBIC) on the PIL image, ToTensor, Normalize(CLIP's mean and std), which
 * is a CLIPImageProcessor resizing to exactly image_size x image_size, without a center crop (processor()). */
#include "models/models.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GLU_LN_EPS 1e-5f  /* GLU.norm1: nn.LayerNorm(hidden_size), the default eps */

typedef struct {
    mmb_cogvit *vit;
    mmb_cogvit_info vi;
    int64_t d, inter;                         /* the LLM's hidden_size, intermediate_size */
    bool conv_on;                             /* CogVLM2: conv (2x2, stride 2) before the GLU */
    int64_t side, tokens;                     /* the grid the GLU reads: its side and side^2 */
    mmb_linear conv;                          /* (vision width, 4 vision width) + bias, when conv_on */
    mmb_linear proj, gate, up, down;          /* linear_proj, gate_proj, dense_h_to_4h, dense_4h_to_h */
    float *ln_w, *ln_b, *boi, *eoi;           /* (d) each */
} cog_state;

static void cog_free(void *st) {
    cog_state *m = st;
    if (!m) return;
    mmb__linear_free(&m->proj);
    mmb__linear_free(&m->conv);
    mmb__linear_free(&m->gate);
    mmb__linear_free(&m->up);
    mmb__linear_free(&m->down);
    free(m->ln_w); free(m->ln_b); free(m->boi); free(m->eoi);
    mmb__cogvit_free(m->vit);
    free(m);
}

static mmb_status cog_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state,
                           mmb_model_info *info) {
    (void)fam;
    cog_state *m = calloc(1, sizeof *m);
    if (!m) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    mmb_status s = mmb__cogvit_load(ctx, c, &m->vit);
    m->d = 4096;      /* cogvlm-chat-hf's (Vicuna-7B) */
    m->inter = 11008;
    if (s == MMB_OK) {
        m->vi = mmb__cogvit_info(m->vit);
        mmb__cfg_int(ctx, c, "hidden_size", &m->d, &s);
        mmb__cfg_int(ctx, c, "intermediate_size", &m->inter, &s);
    }
    if (s == MMB_OK && (m->d < 1 || m->d > (1 << 20) || m->inter < 1 || m->inter > (1 << 22)))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: hidden_size %lld / intermediate_size %lld is out of range",
                     c->dir, (long long)m->d, (long long)m->inter);
    m->conv_on = cJSON_GetObjectItemCaseSensitive(c->config, "num_multi_query_heads") != NULL;
    m->side = m->vi.grid / (m->conv_on ? 2 : 1);
    m->tokens = m->side * m->side;
    if (s == MMB_OK && m->conv_on && m->side < 1)
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: CogVLM2's 2x2 conv needs a patch grid of 2 or more; "
                     "vision_config.image_size / patch_size is %d", c->dir, m->vi.grid);
    if (s == MMB_OK && m->conv_on)
        s = mmb__ckpt_conv(ctx, c, "model.vision.", "conv", m->vi.width, m->vi.width, 2, true, &m->conv);
    const char *p = "model.vision.linear_proj.";
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, p, "linear_proj", m->d, m->vi.width, false, &m->proj);
    if (s == MMB_OK) s = mmb__ckpt_norm(ctx, c, p, "norm1", m->d, &m->ln_w, &m->ln_b);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, p, "gate_proj", m->inter, m->d, false, &m->gate);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, p, "dense_h_to_4h", m->inter, m->d, false, &m->up);
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, p, "dense_4h_to_h", m->d, m->inter, false, &m->down);
    const int64_t es[3] = {1, 1, m->d};
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, "model.vision.boi", 3, es, &m->boi);
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, "model.vision.eoi", 3, es, &m->eoi);
    const mmb_tensor *w = s == MMB_OK ? mmb__ckpt_find(c, "model.vision.linear_proj.linear_proj.weight", NULL) : NULL;
    if (s != MMB_OK) {
        cog_free(m);
        return s;
    }
    info->connector = "glu (linear_proj: Linear, LayerNorm, GELU, SwiGLU) + boi/eoi";
    info->activation = "silu";
    info->vision_layers = m->vi.layers;
    info->vision_width = m->vi.width;
    info->in_width = m->vi.width;
    info->out_width = (int)m->d;
    info->image_size = m->vi.image_size;
    info->patch_size = m->vi.patch;
    info->tokens_per_image = m->tokens + 2;
    info->params = m->vi.params + 2 * m->d;
    info->flops_per_image = m->vi.flops_per_image;
    if (m->conv_on) mmb__linear_cost(&m->conv, m->tokens, &info->params, &info->flops_per_image);
    mmb__linear_cost(&m->proj, m->tokens, &info->params, &info->flops_per_image);
    mmb__linear_cost(&m->gate, m->tokens, &info->params, &info->flops_per_image);
    mmb__linear_cost(&m->up, m->tokens, &info->params, &info->flops_per_image);
    mmb__linear_cost(&m->down, m->tokens, &info->params, &info->flops_per_image);
    info->params += 2 * m->d;  /* norm1 */
    info->weight_dtype = w ? w->dtype : MMB_F32;
    *state = m;
    return MMB_OK;
}

static int64_t cog_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    const cog_state *m = st;
    if (height != m->vi.image_size || width != m->vi.image_size) {
        mmb__err(ctx, MMB_ERR_SHAPE, "cogvlm: pixels of %dx%d; the vision model takes %dx%d (vision_config."
                 "image_size)", width, height, m->vi.image_size, m->vi.image_size);
        return -1;
    }
    return m->tokens + 2;
}

typedef struct {
    float *g;
    const float *u;
    int64_t n;
} swiglu_job;

static void swiglu_fn(void *arg, int tid, int nth) {
    const swiglu_job *j = arg;
    int64_t lo, hi;
    mmb__split(j->n, tid, nth, &lo, &hi);
    if (hi > lo) mmb__act_forward(j->g + lo, hi - lo, MMB_ACT_SILU);
    for (int64_t i = lo; i < hi; i++) j->g[i] *= j->u[i];
}

/* pixels (B, 3, S, S) -> out (B, tokens + 2, d): the tower's (B, grid^2, vision width), CogVLM2's conv to
 * (B, side^2, vision width), the GLU to d, boi and eoi around each image. Scratch from ctx->feats. */
static mmb_status cog_encode(mmb_ctx *ctx, const void *st, const float *pixels, int64_t B, int height, int width,
                             float *out) {
    const cog_state *m = st;
    if (cog_tokens(ctx, st, height, width) < 0) return MMB_ERR_SHAPE;
    const int64_t G = m->tokens, D = m->vi.width, d = m->d, I = m->inter;
    uint64_t rows, vrows, nv, nc, nd, ni;
    if (!mmb__mul_ok((uint64_t)B, (uint64_t)G, &rows) || !mmb__mul_ok((uint64_t)B, (uint64_t)m->vi.tokens, &vrows) ||
        !mmb__mul_ok(vrows, (uint64_t)D, &nv) || !mmb__mul_ok(rows, 4 * (uint64_t)D, &nc) ||
        !mmb__mul_ok(rows, (uint64_t)d, &nd) || !mmb__mul_ok(rows, (uint64_t)I, &ni) || nv > SIZE_MAX / 64 ||
        nc > SIZE_MAX / 64 || nd > SIZE_MAX / 64 || ni > SIZE_MAX / 64)
        return mmb__err(ctx, MMB_ERR_NOMEM, "cogvlm: %lld images of %dx%d: sizes overflow", (long long)B, width,
                        height);
    const size_t f = sizeof(float);
    size_t need = mmb__arena_piece(f * nv) + 2 * mmb__arena_piece(f * nd) + 2 * mmb__arena_piece(f * ni);
    if (m->conv_on) need += mmb__arena_piece(f * nc) + mmb__arena_piece(f * (size_t)(rows * (uint64_t)D));
    mmb_status s = mmb__arena_reserve(ctx, &ctx->feats, need);
    if (s != MMB_OK) return s;
    mmb_arena *a = &ctx->feats;
    float *v = mmb__arena_alloc(a, f * nv), *x = mmb__arena_alloc(a, f * nd), *xn = mmb__arena_alloc(a, f * nd);
    float *g = mmb__arena_alloc(a, f * ni), *u = mmb__arena_alloc(a, f * ni);
    s = mmb__cogvit_forward(ctx, m->vit, pixels, B, height, width, v);
    const int64_t R = (int64_t)rows;
    if (s == MMB_OK && m->conv_on) { /* the (grid, grid) map through the 2x2 stride-2 conv */
        float *cols = mmb__arena_alloc(a, f * nc), *vc = mmb__arena_alloc(a, f * (size_t)(R * D));
        mmb__conv_rows(cols, v, B, m->vi.grid, m->vi.grid, D, 2);
        mmb__linear_forward(ctx, vc, cols, R, &m->conv);
        v = vc;
    }
    if (s == MMB_OK) {
        mmb__linear_forward(ctx, x, v, R, &m->proj);
        mmb__layernorm_forward_mt(ctx, xn, x, m->ln_w, m->ln_b, R, d, GLU_LN_EPS);
        mmb__act_forward_mt(ctx, xn, R * d, MMB_ACT_GELU);
        mmb__linear_forward(ctx, g, xn, R, &m->gate);
        mmb__linear_forward(ctx, u, xn, R, &m->up);
        swiglu_job j = {g, u, R * I};
        mmb__pool_run(ctx->pool, swiglu_fn, &j);
        mmb__linear_forward(ctx, x, g, R, &m->down);
        for (int64_t b = 0; b < B; b++) {
            float *o = out + b * (G + 2) * d;
            memcpy(o, m->boi, f * (size_t)d);
            memcpy(o + d, x + b * G * d, f * (size_t)(G * d));
            memcpy(o + (G + 1) * d, m->eoi, f * (size_t)d);
        }
    }
    mmb__arena_reset(a);
    return s;
}

/* build_conversation_input_ids' transform: Resize((image_size, image_size), bicubic), ToTensor, Normalize with
 * CLIP's mean and std; no crop. */
static mmb_status cog_processor(mmb_ctx *ctx, const void *st, mmb_preprocess *p) {
    const cog_state *m = st;
    mmb_status s = mmb_preprocess_init(ctx, "CLIPImageProcessor", p);
    if (s != MMB_OK) return s;
    snprintf(p->type, sizeof p->type, "%s", "CogVLM (torchvision: bicubic resize, CLIP mean/std)");
    p->do_resize = 1;
    p->size_mode = MMB_SIZE_HEIGHT_WIDTH;
    p->size_height = p->size_width = m->vi.image_size;
    p->resample = MMB_RESAMPLE_BICUBIC;
    p->do_center_crop = 0;
    p->do_pad = 0;
    p->do_rescale = 1;
    p->rescale_factor = 1.0 / 255.0;
    p->do_normalize = 1;
    static const double mean[3] = {0.48145466, 0.4578275, 0.40821073}, sd[3] = {0.26862954, 0.26130258, 0.27577711};
    memcpy(p->image_mean, mean, sizeof mean);
    memcpy(p->image_std, sd, sizeof sd);
    return MMB_OK;
}

const mmb_family_ops mmb__family_cogvlm = {
    .load = cog_load,
    .tokens = cog_tokens,
    .encode = cog_encode,
    .free = cog_free,
    .processor = cog_processor,
};
