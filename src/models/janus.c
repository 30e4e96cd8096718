/* The janus family (Janus, Janus-Pro: transformers' JanusForConditionalGeneration): its image generation, fusion D
 * written by the LLM. The LLM (model.language_model.*, Llama) reads the prompt; at each of the
 * vision_config.num_image_tokens steps its last final-normed hidden state goes through generation_head, not
 * lm_head:
 *   generation_head      proj_out Linear(image_token_embed_dim -> projection_dim), hidden_act, vision_head
 *                        Linear(projection_dim -> num_embeddings): scores over the VQ codebook
 * and the chosen code is read back as the next input through
 *   generation_embeddings  Embedding(num_embeddings, embed_dim)
 *   generation_aligner     fc1 Linear(embed_dim -> projection_dim), then for each hidden_layers.i: hidden_act,
 *                          Linear(projection_dim -> projection_dim)   (JanusVQVAEAlignerMLP)
 * (the vq_config's sizes and hidden_act); the codes, a square grid, then go through JanusVQVAE.decode
 * (vision/vq.c). Classifier-free guidance and the steps are pipeline/imagegen.c's. Image understanding (the
 * SigLIP tower and the aligner) is not read here: the family encodes no images. */
#include "models/models.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_ALIGNER 16

typedef struct {
    mmb_vq *vq;
    mmb_vq_info vi;
    int64_t d, proj, embed_dim, K, n_tokens;
    int grid;
    mmb_act act;
    float *gen_embed;               /* (K, embed_dim) */
    mmb_linear fc1, hidden[MAX_ALIGNER], proj_out, vision_head;
    int n_hidden;
    mmb__gen_info gi;
} janus_state;

static void janus_free(void *st) {
    janus_state *j = st;
    if (!j) return;
    mmb_vq_free(j->vq);
    free(j->gen_embed);
    mmb__linear_free(&j->fc1);
    for (int i = 0; i < j->n_hidden; i++) mmb__linear_free(&j->hidden[i]);
    mmb__linear_free(&j->proj_out);
    mmb__linear_free(&j->vision_head);
    free(j);
}

/* An id of generation_config.json (g: its object) at path a.b, or -1. */
static int32_t gen_id(const cJSON *g, const char *a, const char *b) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(g, a);
    if (b) v = cJSON_GetObjectItemCaseSensitive(v, b);
    if (cJSON_IsArray(v)) v = cJSON_GetArrayItem(v, 0);
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < INT32_MAX ? (int32_t)v->valuedouble : -1;
}

/* generation_config.json's special ids and guidance_scale (an absent file: none). */
static mmb_status read_generation(mmb_ctx *ctx, const mmb_ckpt *c, mmb__gen_info *gi) {
    gi->bos = gi->pad = gi->boi = -1;
    gi->guidance = 0;
    char path[4096];
    snprintf(path, sizeof path, "%s/generation_config.json", c->dir);
    if (access(path, F_OK) != 0) return MMB_OK;
    cJSON *g = NULL;
    mmb_status s = mmb__json_read(ctx, path, &g);
    if (s != MMB_OK) return s;
    gi->bos = gen_id(g, "bos_token_id", NULL);
    gi->pad = gen_id(g, "pad_token_id", NULL);
    gi->boi = gen_id(g, "generation_kwargs", "boi_token_id");
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(g, "guidance_scale");
    if (cJSON_IsNumber(v) && v->valuedouble > 0 && v->valuedouble < 1e6) gi->guidance = v->valuedouble;
    cJSON_Delete(g);
    return MMB_OK;
}

static mmb_status janus_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state,
                             mmb_model_info *info) {
    (void)fam;
    janus_state *j = calloc(1, sizeof *j);
    if (!j) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb_status s = MMB_OK;
    int64_t layers = 2, tie = 2048, tokens = 576;
    j->proj = 2048;
    const char *act = "gelu";
    bool got = mmb__cfg_int(ctx, c, "text_config.hidden_size", &j->d, &s);
    if (s == MMB_OK && !got) s = mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: no 'text_config.hidden_size'", c->dir);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "vq_config.projection_dim", &j->proj, &s);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "vq_config.num_hidden_layers", &layers, &s);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "vq_config.image_token_embed_dim", &tie, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "vq_config.hidden_act", &act, &s);
    if (s == MMB_OK) mmb__cfg_int(ctx, c, "vision_config.num_image_tokens", &tokens, &s);
    if (s == MMB_OK && !mmb__act_parse(act, &j->act))
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vq_config.hidden_act '%s' is not supported", c->dir,
                     act);
    if (s == MMB_OK && (j->d < 1 || j->d > (1 << 20) || j->proj < 1 || j->proj > (1 << 20) || layers < 1 ||
                        layers > MAX_ALIGNER + 1 || tie != j->d || j->proj != j->d || tokens < 1 ||
                        tokens > (1 << 20)))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vq_config projection_dim %lld, image_token_embed_dim %lld, "
                     "num_hidden_layers %lld (1..%d) or vision_config.num_image_tokens %lld do not fit the LLM's "
                     "hidden_size %lld", c->dir, (long long)j->proj, (long long)tie, (long long)layers,
                     MAX_ALIGNER + 1, (long long)tokens, (long long)j->d);
    j->grid = (int)sqrt((double)tokens);
    if (s == MMB_OK && (int64_t)j->grid * j->grid != tokens)
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vision_config.num_image_tokens %lld is not a square grid",
                     c->dir, (long long)tokens);
    j->n_tokens = tokens;
    if (s == MMB_OK) s = mmb__vq_open(ctx, c, &j->vq);
    if (s == MMB_OK) s = mmb_vq_get_info(j->vq, &j->vi);
    if (s == MMB_OK && !j->vi.has_decoder)
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: the VQ model (%s) has no decoder", c->dir, j->vi.kind);
    j->K = j->vi.codebook_size;
    j->embed_dim = j->vi.embed_dim;
    const int64_t es[2] = {j->K, j->embed_dim};
    if (s == MMB_OK) s = mmb__ckpt_floats(ctx, c, "model.generation_embeddings.weight", 2, es, &j->gen_embed);
    if (s == MMB_OK)
        s = mmb__ckpt_linear(ctx, c, "model.generation_aligner.", "fc1", j->proj, j->embed_dim, true, &j->fc1);
    for (int i = 0; s == MMB_OK && i < layers - 1; i++) {
        char nm[64];
        snprintf(nm, sizeof nm, "hidden_layers.%d", i);
        s = mmb__ckpt_linear(ctx, c, "model.generation_aligner.", nm, j->proj, j->proj, true, &j->hidden[i]);
        if (s == MMB_OK) j->n_hidden++;
    }
    if (s == MMB_OK) s = mmb__ckpt_linear(ctx, c, "model.generation_head.", "proj_out", j->proj, j->d, true, &j->proj_out);
    if (s == MMB_OK)
        s = mmb__ckpt_linear(ctx, c, "model.generation_head.", "vision_head", j->K, j->proj, true, &j->vision_head);
    if (s == MMB_OK) s = read_generation(ctx, c, &j->gi);
    if (s != MMB_OK) {
        janus_free(j);
        return s;
    }
    j->gi.n_ids = j->n_tokens;
    j->gi.codebook = j->K;
    j->gi.grid_h = j->gi.grid_w = j->grid;
    info->connector = "vq";
    info->activation = mmb__act_name(j->act);
    info->vision_width = (int)j->embed_dim;
    info->in_width = (int)j->embed_dim;
    info->out_width = (int)j->d;
    info->patch_size = j->vi.downsample;
    info->image_size = j->grid * j->vi.downsample;
    info->params = j->vi.decoder_params + j->K * j->embed_dim + j->proj * (j->embed_dim + 1) +
                   j->n_hidden * j->proj * (j->proj + 1) + j->proj * (j->d + 1) + j->K * (j->proj + 1);
    info->weight_dtype = MMB_F32;
    *state = j;
    return MMB_OK;
}

static int64_t janus_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    (void)st;
    mmb__err(ctx, MMB_ERR_UNSUPPORTED, "an image of %dx%d: Janus' image understanding (its SigLIP tower and aligner) "
             "is not read; the family generates images (mmb_mllm_generate_image)", height, width);
    return -1;
}

static void janus_gen_info(const void *st, mmb__gen_info *out) { *out = ((const janus_state *)st)->gi; }

static mmb_status janus_gen_head(mmb_ctx *ctx, const void *st, const float *hidden, int64_t rows, float *scores) {
    const janus_state *j = st;
    float *t = malloc(sizeof(float) * (size_t)(rows * j->proj));
    if (!t) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb__linear_forward_act(ctx, t, hidden, rows, &j->proj_out, j->act);
    mmb__linear_forward(ctx, scores, t, rows, &j->vision_head);
    free(t);
    return MMB_OK;
}

static mmb_status janus_gen_embed(mmb_ctx *ctx, const void *st, const int32_t *ids, int64_t n, float *rows) {
    const janus_state *j = st;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= j->K)
            return mmb__err(ctx, MMB_ERR_ARG, "image id %d at %lld is outside the codebook [0, %lld)", (int)ids[i],
                            (long long)i, (long long)j->K);
    float *e = malloc(sizeof(float) * (size_t)(n * j->embed_dim)), *t = malloc(sizeof(float) * (size_t)(n * j->proj));
    if (!e || !t) {
        free(e);
        free(t);
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    }
    for (int64_t i = 0; i < n; i++)
        memcpy(e + i * j->embed_dim, j->gen_embed + ids[i] * j->embed_dim, sizeof(float) * (size_t)j->embed_dim);
    /* fc1, then (act, hidden_layers.i) for each, between rows and t so that the last lands in rows */
    float *x = j->n_hidden % 2 ? t : rows;
    mmb__linear_forward(ctx, x, e, n, &j->fc1);
    for (int i = 0; i < j->n_hidden; i++) {
        float *y = x == t ? rows : t;
        mmb__act_forward_mt(ctx, x, n * j->proj, j->act);
        mmb__linear_forward(ctx, y, x, n, &j->hidden[i]);
        x = y;
    }
    free(e);
    free(t);
    return MMB_OK;
}

static const mmb_vq *janus_vq(const void *st) { return ((const janus_state *)st)->vq; }

const mmb_family_ops mmb__family_janus = {.load = janus_load, .tokens = janus_tokens, .free = janus_free,
                                          .vq = janus_vq, .gen_info = janus_gen_info, .gen_head = janus_gen_head,
                                          .gen_embed = janus_gen_embed};
