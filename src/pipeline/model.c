/* Opening a checkpoint: detect its layout, read the feature selection, build the connector; and
 * running feature selection + connector on hidden states. */
#include "internal.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mmb_model {
    mmb_ckpt ck;
    const mmb_connector_ops *ops;
    void *conn;
    bool drop_first;          /* strategy "default"/"patch": hidden_states[i][:, 1:] */
    mmb_model_info info;
    char arch[128], type[64], strategy[16];
    mmb_vit *vit;             /* the checkpoint's own tower, or one attached; NULL if neither */
};

static mmb_status get_int(mmb_ctx *ctx, const mmb_ckpt *c, const char *key, int64_t def, int64_t *out) {
    mmb_status s = MMB_OK;
    if (!mmb__cfg_int(ctx, c, key, out, &s)) *out = def;
    return s;
}

static mmb_status require_int(mmb_ctx *ctx, const mmb_ckpt *c, const char *key, int64_t *out) {
    mmb_status s = MMB_OK;
    if (!mmb__cfg_int(ctx, c, key, out, &s) && s == MMB_OK)
        s = mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: '%s' is missing", c->dir, key);
    if (s == MMB_OK && (*out <= 0 || *out > (1 << 24)))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s' = %lld is out of range", c->dir, key, (long long)*out);
    return s;
}

/* Original LLaVA layout: mm_projector_type, mm_hidden_size, model.mm_projector.* */
static mmb_status detect_original(mmb_ctx *ctx, mmb_model *m, mmb_conn_cfg *cc) {
    const mmb_ckpt *c = &m->ck;
    mmb_status s = MMB_OK;
    const char *type = "linear", *feat = "patch", *aspect = "";
    int64_t in, out;
    mmb__cfg_str(ctx, c, "mm_projector_type", &type, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "image_aspect_ratio", &aspect, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "mm_vision_select_feature", &feat, &s);
    if (s == MMB_OK) s = require_int(ctx, c, "mm_hidden_size", &in);
    if (s == MMB_OK) s = require_int(ctx, c, "hidden_size", &out);
    if (s == MMB_OK && !mmb__cfg_ints(ctx, c, "mm_vision_select_layer", m->info.taps, 1, &m->info.n_taps, &s) &&
        s == MMB_OK)
        s = mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: 'mm_vision_select_layer' is missing", c->dir);
    if (s != MMB_OK) return s;
    if (strcmp(feat, "patch") != 0 && strcmp(feat, "cls_patch") != 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: mm_vision_select_feature '%s' (expected "
                        "'patch' or 'cls_patch')", c->dir, feat);
    snprintf(m->type, sizeof m->type, "%s", type);
    snprintf(m->strategy, sizeof m->strategy, "%s", feat);
    m->drop_first = strcmp(feat, "patch") == 0;
    m->info.layout = "llava-original";
    m->info.pad_to_square = strcmp(aspect, "pad") == 0;
    m->info.vision_width = (int)in;
    *cc = (mmb_conn_cfg){.type = m->type, .prefix = "model.mm_projector.", .in_width = in, .out_width = out,
                         .act = MMB_ACT_GELU, .bias = true, .eps = 1e-5f};
    return MMB_OK;
}

/* transformers' LlavaForConditionalGeneration, older (multi_modal_projector.*) or newer
 * (model.multi_modal_projector.*) key layout. */
static mmb_status detect_transformers(mmb_ctx *ctx, mmb_model *m, mmb_conn_cfg *cc) {
    const mmb_ckpt *c = &m->ck;
    mmb_status s = MMB_OK;
    const char *act = "gelu", *strategy = "default";
    bool bias = true;
    /* LlavaConfig without a vision_config uses CLIP ViT-L/14-336. */
    mmb_vit_info vi = {.width = 1024, .layers = 24, .image_size = 336, .patch_size = 14, .has_cls = 1};
    if (cJSON_GetObjectItemCaseSensitive(c->config, "vision_config")) s = mmb__vision_cfg(ctx, c, "vision_config.", &vi);
    int64_t width = vi.width, layers = vi.layers, image = vi.image_size, patch = vi.patch_size, d_model = 0;
    if (s == MMB_OK) s = get_int(ctx, c, "text_config.hidden_size", 4096, &d_model);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "projector_hidden_act", &act, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "vision_feature_select_strategy", &strategy, &s);
    if (s == MMB_OK) mmb__cfg_bool(ctx, c, "multimodal_projector_bias", &bias, &s);
    if (s == MMB_OK &&
        !mmb__cfg_ints(ctx, c, "vision_feature_layer", m->info.taps, MMB_MAX_TAPS, &m->info.n_taps, &s)) {
        m->info.taps[0] = -2;
        m->info.n_taps = 1;
    }
    if (s != MMB_OK) return s;
    if (d_model <= 0 || d_model > (1 << 20))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: text_config.hidden_size %lld is out of range", c->dir,
                        (long long)d_model);
    if (strcmp(strategy, "default") != 0 && strcmp(strategy, "full") != 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: vision_feature_select_strategy '%s' (expected "
                        "'default' or 'full')", c->dir, strategy);
    if (!mmb__act_parse(act, &cc->act))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: projector_hidden_act '%s' is not supported "
                        "(gelu, gelu_pytorch_tanh, gelu_new, gelu_fast, quick_gelu, silu)", c->dir, act);
    const char *prefix = mmb__ckpt_find(c, "model.multi_modal_projector.linear_1.weight", NULL)
                             ? "model.multi_modal_projector."
                         : mmb__ckpt_find(c, "multi_modal_projector.linear_1.weight", NULL) ? "multi_modal_projector."
                                                                                              : NULL;
    if (!prefix)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor 'model.multi_modal_projector.linear_1.weight' (or "
                        "'multi_modal_projector.linear_1.weight') is missing", c->dir);
    snprintf(m->type, sizeof m->type, "llava");
    snprintf(m->strategy, sizeof m->strategy, "%s", strategy);
    m->drop_first = strcmp(strategy, "default") == 0;
    m->info.layout = prefix[0] == 'm' && prefix[1] == 'o' ? "transformers" : "transformers-legacy";
    m->info.vision_width = (int)width;
    m->info.vision_layers = (int)layers;
    m->info.image_size = (int)image;
    m->info.patch_size = (int)patch;
    int64_t grid = image / patch;
    m->info.tokens_per_image = grid * grid + vi.has_cls - (m->drop_first ? 1 : 0);
    *cc = (mmb_conn_cfg){.type = m->type, .prefix = prefix, .in_width = width * m->info.n_taps,
                         .out_width = d_model, .act = cc->act, .bias = bias, .eps = 1e-5f};
    return MMB_OK;
}

/* Attaches v (or, when NULL, the checkpoint's own tower) after checking it feeds the connector. */
static mmb_status attach(mmb_ctx *ctx, mmb_model *m, mmb_vit *given) {
    mmb_vit *v = given;
    mmb_status s = v ? MMB_OK : mmb__vit_load(ctx, &m->ck, &v);
    if (s != MMB_OK) return s;
    mmb_vit_info vi;
    mmb_vit_get_info(v, &vi);
    if (vi.width * m->info.n_taps != m->info.in_width) {
        s = mmb__err(ctx, MMB_ERR_SHAPE, "%s: the vision tower is %d wide; the connector reads %d taps into %d "
                     "channels", m->ck.dir, vi.width, m->info.n_taps, m->info.in_width);
        if (!given) mmb_vit_free(v);
        return s;
    }
    mmb_vit_free(m->vit);
    m->vit = v;
    mmb_model_info *in = &m->info;
    in->vision_width = vi.width;
    in->vision_layers = vi.layers;
    in->image_size = vi.image_size;
    in->patch_size = vi.patch_size;
    int64_t t = vi.tokens - (m->drop_first ? 1 : 0), params = 0, flops = 0;
    in->tokens_per_image = m->ops->out_tokens(m->conn, t);
    m->ops->cost(m->conn, t, &params, &flops);
    in->flops_per_image = flops;
    return MMB_OK;
}

mmb_status mmb_model_attach_vit(mmb_ctx *ctx, mmb_model *m, mmb_vit *v) {
    if (!ctx || !m || !v) return mmb__err(ctx, MMB_ERR_ARG, "mmb_model_attach_vit: NULL argument");
    return attach(ctx, m, v);
}

const mmb_vit *mmb_model_vit(const mmb_model *m) { return m ? m->vit : NULL; }

static mmb_status build(mmb_ctx *ctx, mmb_model *m) {
    const mmb_ckpt *c = &m->ck;
    mmb_status s = MMB_OK;
    const char *arch = NULL, *mt = "";
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(c->config, "architectures");
    if (cJSON_IsArray(archs) && cJSON_IsString(archs->child)) arch = archs->child->valuestring;
    mmb__cfg_str(ctx, c, "model_type", &mt, &s);
    if (s != MMB_OK) return s;
    snprintf(m->arch, sizeof m->arch, "%s", arch ? arch : mt);
    mmb_conn_cfg cc;
    if (cJSON_GetObjectItemCaseSensitive(c->config, "mm_projector_type") ||
        cJSON_GetObjectItemCaseSensitive(c->config, "mm_hidden_size"))
        s = detect_original(ctx, m, &cc);
    else if (strcmp(mt, "llava") == 0 || (arch && strcmp(arch, "LlavaForConditionalGeneration") == 0))
        s = detect_transformers(ctx, m, &cc);
    else
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: unknown architecture '%s' (model_type '%s'); "
                        "mmbridge reads LLaVA checkpoints (transformers or original layout)", c->dir, m->arch, mt);
    if (s != MMB_OK) return s;
    if (m->info.n_taps > 1 && !m->info.vision_width)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: several taps need the vision width", c->dir);
    m->ops = mmb__connector_find(cc.type);
    if (!m->ops) {
        const char *const *names;
        int n = mmb_connector_names(&names);
        char known[256] = "";
        for (int i = 0; i < n; i++) {
            strncat(known, names[i], sizeof known - strlen(known) - 3);
            if (i + 1 < n) strncat(known, ", ", sizeof known - strlen(known) - 1);
        }
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: unknown projector type '%s' (known: %s)",
                        c->dir, cc.type, known);
    }
    s = m->ops->load(ctx, c, &cc, &m->conn);
    if (s != MMB_OK) return s;
    mmb_model_info *in = &m->info;
    in->architecture = m->arch;
    in->connector = m->type;
    in->activation = strcmp(m->type, "identity") == 0 || strcmp(m->type, "linear") == 0 ? "" :
                     strcmp(m->type, "llava") == 0 ? mmb__act_name(cc.act) : "gelu";
    in->select_strategy = m->strategy;
    in->in_width = (int)cc.in_width;
    in->out_width = (int)m->ops->out_width(m->conn);
    int64_t flops = 0;
    m->ops->cost(m->conn, in->tokens_per_image, &in->params, &flops);
    in->flops_per_image = in->tokens_per_image ? flops : 0;
    if (in->tokens_per_image) in->tokens_per_image = m->ops->out_tokens(m->conn, in->tokens_per_image);
    const mmb_tensor *w = NULL;
    for (int i = 0; i < c->n_files && !w; i++)
        for (int k = 0; k < mmb_st_count(c->files[i]) && !w; k++) {
            const mmb_tensor *t = mmb_st_at(c->files[i], k);
            if (strstr(t->name, "projector") && mmb__dtype_is_float(t->dtype)) w = t;
        }
    in->weight_dtype = w ? w->dtype : MMB_F32;
    return mmb__vit_present(c) ? attach(ctx, m, NULL) : MMB_OK;
}

mmb_status mmb_model_open(mmb_ctx *ctx, const char *dir, mmb_model **out) {
    if (!ctx || !dir || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_model_open: NULL argument");
    mmb_model *m = calloc(1, sizeof *m);
    if (!m) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", dir);
    mmb_status s = mmb__ckpt_open(ctx, dir, &m->ck);
    if (s == MMB_OK) s = build(ctx, m);
    if (s != MMB_OK) {
        mmb_model_free(m);
        return s;
    }
    *out = m;
    return MMB_OK;
}

void mmb_model_free(mmb_model *m) {
    if (!m) return;
    if (m->ops && m->conn) m->ops->free(m->conn);
    mmb_vit_free(m->vit);
    mmb__ckpt_close(&m->ck);
    free(m);
}

mmb_status mmb_model_get_info(const mmb_model *m, mmb_model_info *out) {
    if (!m || !out) return MMB_ERR_ARG;
    *out = m->info;
    return MMB_OK;
}

int64_t mmb_model_tokens_out(mmb_ctx *ctx, const mmb_model *m, int64_t tokens) {
    int64_t t = tokens - (m->drop_first ? 1 : 0);
    if (t < 1) {
        mmb__err(ctx, MMB_ERR_SHAPE, "%lld tokens per image: nothing left after the '%s' strategy drops CLS",
                 (long long)tokens, m->strategy);
        return -1;
    }
    return m->ops->out_tokens(m->conn, t);
}

/* Resolves the model's taps against the features: buffer index per tap, or an error. */
static mmb_status find_taps(mmb_ctx *ctx, const mmb_model *m, const mmb_features *in, const float **bufs) {
    for (int i = 0; i < m->info.n_taps; i++) {
        int want = m->info.taps[i];
        if (want < 0) {
            if (in->n_hidden <= 0)
                return mmb__err(ctx, MMB_ERR_MISSING, "features: the model reads hidden_states[%d], a negative "
                                "index, but the number of hidden states is unknown", want);
            want += in->n_hidden;
        }
        bufs[i] = NULL;
        for (int k = 0; k < in->n_taps; k++)
            if (in->taps[k] == want) bufs[i] = in->data[k];
        if (!bufs[i] || want < 0)
            return mmb__err(ctx, MMB_ERR_MISSING, "features: tensor 'hidden_states.%d' is missing (the model "
                            "reads hidden_states[%d])", want, m->info.taps[i]);
    }
    return MMB_OK;
}

/* Feature selection: x (batch, T', width * n_taps) from the taps, dropping token 0 if asked. */
static void gather(float *x, const float *const *bufs, int n_taps, int64_t batch, int64_t tokens,
                   int64_t width, int64_t skip) {
    int64_t T = tokens - skip, W = width * n_taps;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t t = 0; t < T; t++)
            for (int k = 0; k < n_taps; k++)
                memcpy(x + (b * T + t) * W + k * width, bufs[k] + (b * tokens + t + skip) * width,
                       (size_t)width * sizeof(float));
}

mmb_status mmb_model_connect(mmb_ctx *ctx, const mmb_model *m, const mmb_features *in, float *out,
                             size_t out_count) {
    if (!ctx || !m || !in || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_model_connect: NULL argument");
    if (in->n_taps < 0 || in->n_taps > MMB_MAX_TAPS || in->batch < 1 || in->tokens < 1 || in->width < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "features: bad counts (batch %lld, tokens %lld, width %lld, taps %d)",
                        (long long)in->batch, (long long)in->tokens, (long long)in->width, in->n_taps);
    const float *bufs[MMB_MAX_TAPS];
    mmb_status s = find_taps(ctx, m, in, bufs);
    if (s != MMB_OK) return s;
    int n = m->info.n_taps;
    if (in->width * n != m->info.in_width)
        return mmb__err(ctx, MMB_ERR_SHAPE, "features: hidden states are %lld wide; the connector reads %d taps "
                        "into %d channels, so it needs width %d", (long long)in->width, n, m->info.in_width,
                        m->info.in_width / n);
    int64_t T_out = mmb_model_tokens_out(ctx, m, in->tokens);
    if (T_out < 0) return MMB_ERR_SHAPE;
    int64_t skip = m->drop_first ? 1 : 0, rows = in->batch * (in->tokens - skip);
    size_t need = (size_t)(in->batch * T_out) * (size_t)m->info.out_width;
    if (out_count < need)
        return mmb__err(ctx, MMB_ERR_SHAPE, "output holds %zu floats, %zu needed", out_count, need);
    bool copy = n > 1 || skip;
    size_t scratch = m->ops->scratch(m->conn, rows) * sizeof(float) +
                     (copy ? mmb__arena_piece((size_t)rows * (size_t)m->info.in_width * sizeof(float)) : 0);
    s = mmb__arena_reserve(ctx, &ctx->arena, scratch);
    if (s != MMB_OK) return s;
    const float *x = bufs[0];
    if (copy) {
        float *g = mmb__arena_alloc(&ctx->arena, (size_t)rows * (size_t)m->info.in_width * sizeof(float));
        gather(g, bufs, n, in->batch, in->tokens, in->width, skip);
        x = g;
    }
    s = m->ops->forward(ctx, m->conn, out, x, in->batch, in->tokens - skip);
    mmb__arena_reset(&ctx->arena);
    return s;
}
