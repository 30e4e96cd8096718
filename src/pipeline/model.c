/* Opening a checkpoint through the family table (models/families.c): a family's own model, or the LLaVA
 * path (read the feature selection in the row's layout, build the registered connector); and running
 * feature selection + connector on hidden states. */
#include "pipeline.h"

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
    mmb_conn_cfg cc;          /* the projector as the checkpoint configures it */
    mmb_dense_params dense;   /* the Dense Connector in front of it; type MMB_DENSE_NONE: none */
    int has_cls;              /* the encoder's: 1, 0, or -1 while unknown */
    bool width_known;         /* vision_width comes from a vision config or tower, not from in_width */
    int n_sel, sel[MMB_MAX_TAPS];/* the checkpoint's select layer(s) */
    const mmb__family *fam;   /* a row with its own model (fam->ops, fam_state) instead of tower + selection + ops */
    void *fam_state;
};

/* Vision towers named by original-layout configs (mm_vision_tower), for shapes without the tower. */
static const struct {
    const char *name;
    int layers, width, image, patch, has_cls;
} known_towers[] = {
    {"clip-vit-large-patch14-336", 24, 1024, 336, 14, 1},
    {"clip-vit-large-patch14", 24, 1024, 224, 14, 1},
    {"siglip-so400m-patch14-384", 27, 1152, 384, 14, 0},
};

/* Dense Connector variants as configs name them (mm_dense_connector_type). */
static mmb_dense_type dense_type(const char *name) {
    return strcmp(name, "sti") == 0 ? MMB_DENSE_STI : strcmp(name, "sci") == 0 ? MMB_DENSE_SCI
         : strcmp(name, "dci") == 0 ? MMB_DENSE_DCI : MMB_DENSE_NONE;
}

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
    const char *type = "linear", *feat = "patch", *aspect = "", *dense = "", *tower = "";
    int64_t in, out;
    mmb__cfg_str(ctx, c, "mm_projector_type", &type, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "mm_dense_connector_type", &dense, &s);
    if (s == MMB_OK) mmb__cfg_str(ctx, c, "mm_vision_tower", &tower, &s);
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
    /* Other values of mm_dense_connector_type take the plain LLaVA path, as in the reference. */
    m->dense.type = dense_type(dense);
    int mult = m->dense.type ? mmb__dense_mult(&m->dense) : 1;
    m->info.vision_width = in % mult ? 0 : (int)(in / mult);
    const char *base = strrchr(tower, '/') ? strrchr(tower, '/') + 1 : tower;
    for (size_t i = 0; i < sizeof known_towers / sizeof known_towers[0]; i++)
        if (strcmp(base, known_towers[i].name) == 0 && known_towers[i].width * mult == in) {
            m->info.vision_layers = known_towers[i].layers;
            m->info.image_size = known_towers[i].image;
            m->info.patch_size = known_towers[i].patch;
            m->has_cls = known_towers[i].has_cls;
            m->width_known = true;
        }
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
    m->has_cls = vi.has_cls;
    m->width_known = true;
    *cc = (mmb_conn_cfg){.type = m->type, .prefix = prefix, .in_width = width * m->info.n_taps,
                         .out_width = d_model, .act = cc->act, .bias = bias, .eps = 1e-5f};
    return MMB_OK;
}

/* Fills the info that depends on the connector and the encoder: taps (a Dense Connector's once the
 * encoder's depth is known), widths, tokens, costs. */
static mmb_status refresh(mmb_ctx *ctx, mmb_model *m) {
    mmb_model_info *in = &m->info;
    in->connector = m->dense.type ? mmb__dense_name(m->dense.type) : m->type;
    in->projector = m->type;
    in->dense = m->dense.type == MMB_DENSE_STI ? "sti" : m->dense.type == MMB_DENSE_SCI ? "sci"
              : m->dense.type == MMB_DENSE_DCI ? "dci" : "";
    in->in_width = (int)m->cc.in_width;
    in->out_width = (int)m->ops->out_width(m->conn);
    memset(in->tap_spans, 0, sizeof in->tap_spans);
    in->n_taps = m->n_sel;
    memcpy(in->taps, m->sel, sizeof in->taps);
    int64_t tokens = 0, flops = 0;
    if (in->image_size && in->patch_size && m->has_cls >= 0) {
        int64_t g = in->image_size / in->patch_size;
        tokens = g * g + m->has_cls - (m->drop_first && !m->dense.type ? 1 : 0);
    }
    if (m->dense.type) {
        in->n_taps = 0;
        if (in->vision_layers && m->has_cls >= 0) {
            int n = m->ops->needs(ctx, m->conn, in->vision_layers + 1, m->has_cls, in->taps, in->tap_spans);
            if (n < 0) return MMB_ERR_ARG;
            in->n_taps = n;
        }
    }
    m->ops->cost(m->conn, tokens, &in->params, &flops);
    in->flops_per_image = tokens ? flops : 0;
    in->tokens_per_image = tokens ? m->ops->out_tokens(m->conn, tokens) : 0;
    if (in->tokens_per_image < 0) in->tokens_per_image = 0;
    return MMB_OK;
}

/* Builds m's connector: the projector m->cc, behind Dense Connector p unless p->type is NONE. */
static mmb_status load_conn(mmb_ctx *ctx, mmb_model *m, const mmb_dense_params *p, const mmb_connector_ops **ops,
                            void **state) {
    mmb_conn_cfg cc = m->cc;
    if (!mmb__connector_find(cc.type) || mmb__connector_find(cc.type)->needs) {
        const char *const *names;
        int n = mmb_connector_names(&names);
        char known[256] = "";
        for (int i = 0; i < n; i++) {
            strncat(known, names[i], sizeof known - strlen(known) - 3);
            if (i + 1 < n) strncat(known, ", ", sizeof known - strlen(known) - 1);
        }
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: unknown projector type '%s' (known: %s)",
                        m->ck.dir, cc.type, known);
    }
    if (p->type) {
        cc.type = mmb__dense_name(p->type);
        cc.proj_type = m->type;
        cc.dense = *p;
    }
    *ops = mmb__connector_find(cc.type);
    return (*ops)->load(ctx, &m->ck, &cc, state);
}

/* Attaches v (or, when NULL, the checkpoint's own tower) after checking it feeds the connector. */
static mmb_status attach(mmb_ctx *ctx, mmb_model *m, mmb_vit *given) {
    mmb_vit *v = given;
    mmb_status s = v ? MMB_OK : mmb__vit_load(ctx, &m->ck, &v);
    if (s != MMB_OK) return s;
    mmb_vit_info vi;
    mmb_vit_get_info(v, &vi);
    int mult = m->dense.type ? mmb__dense_mult(&m->dense) : m->n_sel;
    if (vi.width * mult != m->info.in_width) {
        s = mmb__err(ctx, MMB_ERR_SHAPE, "%s: the vision tower is %d wide; the connector%s%s concatenates %d hidden "
                     "state(s) into %d channels, but the projector's input is %d wide", m->ck.dir, vi.width,
                     m->dense.type ? " " : "", mmb__dense_name(m->dense.type), mult, vi.width * mult,
                     m->info.in_width);
        if (!given) mmb_vit_free(v);
        return s;
    }
    mmb_model_info *in = &m->info, keep = *in;
    int keep_cls = m->has_cls;
    in->vision_width = vi.width;
    in->vision_layers = vi.layers;
    in->image_size = vi.image_size;
    in->patch_size = vi.patch_size;
    m->has_cls = vi.has_cls;
    if ((s = refresh(ctx, m)) != MMB_OK) {
        *in = keep;
        m->has_cls = keep_cls;
        if (!given) mmb_vit_free(v);
        return s;
    }
    mmb_vit_free(m->vit);
    m->vit = v;
    m->width_known = true;
    return MMB_OK;
}

/* The calls that assume a LLaVA-shaped model refuse a family's. */
static mmb_status not_family(mmb_ctx *ctx, const mmb_model *m, const char *call) {
    return m->fam ? mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: %s is a %s model, whose tower and connector run as "
                             "one (use mmb_model_encode)", m->ck.dir, call, m->fam->name) : MMB_OK;
}

mmb_status mmb_model_attach_vit(mmb_ctx *ctx, mmb_model *m, mmb_vit *v) {
    if (!ctx || !m || !v) return mmb__err(ctx, MMB_ERR_ARG, "mmb_model_attach_vit: NULL argument");
    if (not_family(ctx, m, "mmb_model_attach_vit")) return MMB_ERR_UNSUPPORTED;
    return attach(ctx, m, v);
}

const mmb_vit *mmb_model_vit(const mmb_model *m) { return m ? m->vit : NULL; }

/* Opens c as the row of the family table that claims it: a family's own model (row->ops), or the LLaVA path
 * in the row's layout. A tower alone is refused: it has no connector (mmb_vit_open opens it). */
static mmb_status build(mmb_ctx *ctx, mmb_model *m) {
    const mmb_ckpt *c = &m->ck;
    const mmb__family *row;
    mmb_status s = mmb__family_match(ctx, c, &row);
    if (s != MMB_OK) return s;
    const char *mt = "";
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(c->config, "architectures");
    mmb__cfg_str(ctx, c, "model_type", &mt, &s);
    snprintf(m->arch, sizeof m->arch, "%s", cJSON_IsArray(archs) && archs->child ? archs->child->valuestring : mt);
    m->info.architecture = m->arch;
    m->info.family = row->name;
    if (row->vision_only)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: architecture '%s' (model_type '%s') is a %s vision "
                        "tower alone, with no connector (open it with mmb_vit_open or mmb_mllm_open)", c->dir, m->arch, mt,
                        row->name);
    if (row->text_only)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: architecture '%s' (model_type '%s') is a language "
                        "model alone, with no vision path (open it with mmb_lm_open or mmb_mllm_open)", c->dir,
                        m->arch, mt);
    if (row->ops) {
        m->fam = row;
        m->info.layout = row->layouts;
        m->info.select_strategy = m->info.activation = m->info.projector = m->info.dense = "";
        return row->ops->load(ctx, c, row, &m->fam_state, &m->info);
    }
    mmb_conn_cfg cc;
    s = row->layout == MMB__LAYOUT_ORIGINAL ? detect_original(ctx, m, &cc) : detect_transformers(ctx, m, &cc);
    if (s != MMB_OK) return s;
    if (m->info.n_taps > 1 && !m->info.vision_width)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: several taps need the vision width", c->dir);
    m->n_sel = m->info.n_taps;
    memcpy(m->sel, m->info.taps, sizeof m->sel);
    cc.select_layer = m->sel[0];
    m->cc = cc;
    s = load_conn(ctx, m, &m->dense, &m->ops, &m->conn);
    if (s == MMB_OK) s = refresh(ctx, m);
    if (s != MMB_OK) return s;
    mmb_model_info *in = &m->info;
    in->activation = mmb__connector_activation(m->ops, m->conn);
    in->select_strategy = m->strategy;
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
    m->has_cls = -1;
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
    if (m->fam && m->fam_state) m->fam->ops->free(m->fam_state);
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
    if (not_family(ctx, m, "mmb_model_tokens_out")) return -1;
    if (m->dense.type) {
        int64_t t = m->ops->out_tokens(m->conn, tokens);
        if (t < 1)
            mmb__err(ctx, MMB_ERR_SHAPE, "%lld tokens per image: the Dense Connector (%s) needs a square patch grid, "
                     "plus CLS for CLIP, and at least one token per pool window", (long long)tokens,
                     mmb__dense_name(m->dense.type));
        return t < 1 ? -1 : t;
    }
    int64_t t = tokens - (m->drop_first ? 1 : 0);
    if (t < 1) {
        mmb__err(ctx, MMB_ERR_SHAPE, "%lld tokens per image: nothing left after the '%s' strategy drops CLS",
                 (long long)tokens, m->strategy);
        return -1;
    }
    int64_t r = m->ops->out_tokens(m->conn, t);
    if (r < 1)
        mmb__err(ctx, MMB_ERR_SHAPE, "%lld tokens per image (strategy '%s'): the %s connector needs a square patch "
                 "grid", (long long)t, m->strategy, m->type);
    return r < 1 ? -1 : r;
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

/* A connector that declares its needs: each is a buffer of `in` (same tap and span), or a mean the
 * features' single hidden states make, computed here into the arena (reserved for `scratch` bytes more; the
 * caller resets it). */
static mmb_status needs_bufs(mmb_ctx *ctx, const mmb_model *m, const mmb_features *in, size_t scratch,
                             const float **bufs) {
    bool cls = false;
    int taps[MMB_MAX_TAPS], spans[MMB_MAX_TAPS];
    if (mmb__patch_grid(in->tokens, &cls) < 0)
        return mmb__err(ctx, MMB_ERR_SHAPE, "features: %lld tokens per image: the Dense Connector needs a square "
                        "patch grid, plus CLS for CLIP", (long long)in->tokens);
    int n = m->ops->needs(ctx, m->conn, in->n_hidden, cls, taps, spans);
    if (n < 0) return MMB_ERR_MISSING;
    int mult = mmb__dense_mult(&m->dense);
    if (in->width * mult != m->info.in_width)
        return mmb__err(ctx, MMB_ERR_SHAPE, "features: hidden states are %lld wide; %s concatenates %d of them into "
                        "the projector's %d channels, so it needs width %d", (long long)in->width,
                        m->info.connector, mult, m->info.in_width, m->info.in_width / mult);
    size_t one = (size_t)(in->batch * in->tokens * in->width);
    int n_means = 0;
    for (int i = 0; i < n; i++) {
        bufs[i] = NULL;
        bool all = true;
        for (int k = 0; k < in->n_taps; k++)
            if (in->taps[k] == taps[i] && (in->spans[k] > 1 ? in->spans[k] : 1) == spans[i]) bufs[i] = in->data[k];
        for (int l = taps[i]; l < taps[i] + spans[i] && spans[i] > 1; l++) {
            bool have = false;
            for (int k = 0; k < in->n_taps; k++) have |= in->taps[k] == l && in->spans[k] <= 1;
            all &= have;
        }
        if (!bufs[i] && !(spans[i] > 1 && all))
            return mmb__err(ctx, MMB_ERR_MISSING, "features: tensor 'hidden_states.%d' is missing (%s reads "
                            "hidden_states[%d..%d])", taps[i], m->info.connector, taps[i], taps[i] + spans[i] - 1);
        n_means += !bufs[i];
    }
    mmb_status s = mmb__arena_reserve(ctx, &ctx->arena, scratch + n_means * mmb__arena_piece(one * sizeof(float)));
    for (int i = 0; i < n && s == MMB_OK; i++) {
        if (bufs[i]) continue;
        float *g = mmb__arena_alloc(&ctx->arena, one * sizeof(float));
        for (int l = 0; l < spans[i]; l++)
            for (int k = 0; k < in->n_taps; k++)
                if (in->taps[k] == taps[i] + l && in->spans[k] <= 1) {
                    if (l) mmb__add_forward(g, g, in->data[k], (int64_t)one);
                    else memcpy(g, in->data[k], one * sizeof(float));
                }
        for (size_t j = 0; j < one; j++) g[j] /= (float)spans[i];
        bufs[i] = g;
    }
    return s;
}

static mmb_status connect_needs(mmb_ctx *ctx, const mmb_model *m, const mmb_features *in, float *out,
                                size_t out_count) {
    int64_t T_out = mmb_model_tokens_out(ctx, m, in->tokens);
    if (T_out < 0) return MMB_ERR_SHAPE;
    size_t need = (size_t)(in->batch * T_out) * (size_t)m->info.out_width;
    if (out_count < need) return mmb__err(ctx, MMB_ERR_SHAPE, "output holds %zu floats, %zu needed", out_count, need);
    const float *bufs[MMB_MAX_TAPS];
    mmb_status s = needs_bufs(ctx, m, in, m->ops->scratch(m->conn, in->batch * in->tokens) * sizeof(float), bufs);
    if (s == MMB_OK) s = m->ops->forward_taps(ctx, m->conn, out, bufs, in->batch, in->tokens, in->width);
    mmb__arena_reset(&ctx->arena);
    return s;
}

mmb_status mmb_model_connect(mmb_ctx *ctx, const mmb_model *m, const mmb_features *in, float *out,
                             size_t out_count) {
    if (!ctx || !m || !in || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_model_connect: NULL argument");
    if (in->n_taps < 0 || in->n_taps > MMB_MAX_TAPS || in->batch < 1 || in->tokens < 1 || in->width < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "features: bad counts (batch %lld, tokens %lld, width %lld, taps %d)",
                        (long long)in->batch, (long long)in->tokens, (long long)in->width, in->n_taps);
    if (not_family(ctx, m, "mmb_model_connect")) return MMB_ERR_UNSUPPORTED;
    mmb_status vs = mmb__ckpt_verify(ctx, &m->ck);  /* truncated since open: MMB_ERR_IO, not SIGBUS */
    if (vs != MMB_OK) return vs;
    if (m->ops->needs) return connect_needs(ctx, m, in, out, out_count);
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

mmb_dense_params mmb_model_dense(const mmb_model *m) {
    return m ? m->dense : (mmb_dense_params){0};
}

mmb_status mmb_model_set_dense(mmb_ctx *ctx, mmb_model *m, const mmb_dense_params *p) {
    if (!ctx || !m || !p) return mmb__err(ctx, MMB_ERR_ARG, "mmb_model_set_dense: NULL argument");
    if (not_family(ctx, m, "mmb_model_set_dense")) return MMB_ERR_UNSUPPORTED;
    if (p->type && m->n_sel != 1)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: the Dense Connector needs one select layer; the checkpoint "
                        "concatenates %d", m->ck.dir, m->n_sel);
    int mult = p->type ? mmb__dense_mult(p) : m->n_sel;
    if (m->width_known && m->info.vision_width * mult != m->cc.in_width)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: %s concatenates %d hidden state(s) of width %d on channels (%d), "
                        "but the projector's input is %lld wide", m->ck.dir, p->type ? mmb__dense_name(p->type) :
                        "the projector", mult, m->info.vision_width, m->info.vision_width * mult,
                        (long long)m->cc.in_width);
    const mmb_connector_ops *ops;
    void *conn = NULL;
    mmb_status s = load_conn(ctx, m, p, &ops, &conn);
    if (s != MMB_OK) return s;
    mmb_model keep = *m;
    m->ops = ops;
    m->conn = conn;
    m->dense = *p;
    if (!m->width_known) m->info.vision_width = m->cc.in_width % mult ? 0 : (int)(m->cc.in_width / mult);
    if ((s = refresh(ctx, m)) != MMB_OK) {
        ops->free(conn);
        *m = keep;
        return s;
    }
    keep.ops->free(keep.conn);
    return MMB_OK;
}

int64_t mmb_model_encode_tokens(mmb_ctx *ctx, const mmb_model *m, int height, int width) {
    if (!ctx || !m) return mmb__err(ctx, MMB_ERR_ARG, "mmb_model_encode_tokens: NULL argument"), -1;
    if (m->fam) return m->fam->ops->tokens(ctx, m->fam_state, height, width);
    if (!m->vit)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: the model has no vision tower (attach one)", m->ck.dir), -1;
    mmb_vit_info vi;
    mmb_vit_get_info(m->vit, &vi);
    if (height != vi.image_size || width != vi.image_size)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: pixels of %dx%d, but the vision tower takes %dx%d", m->ck.dir, width,
                        height, vi.image_size, vi.image_size), -1;
    return mmb_model_tokens_out(ctx, m, vi.tokens);
}

mmb_status mmb_model_encode(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, int height,
                            int width, float *out, size_t out_count) {
    return mmb__model_encode_taps(ctx, m, pixels, batch, height, width, out, out_count, NULL, 0, NULL);
}

int mmb_model_routing_stats(const mmb_model *m, int64_t *counts, int cap) {
    if (!m || m->fam || !m->ops || !m->ops->routing) return 0;
    return m->ops->routing(m->conn, counts, counts ? cap : 0);
}

/* ---- for the multimodal model (pipeline.h) ------------------------------------------------------- */

const mmb_ckpt *mmb__model_ckpt(const mmb_model *m) { return &m->ck; }

const char *mmb__model_processor_dir(const mmb_model *m) {
    return m->fam && m->fam->ops->processor_dir ? m->fam->ops->processor_dir(m->fam_state) : NULL;
}

mmb_status mmb__model_check_processor(mmb_ctx *ctx, const mmb_model *m, const mmb_preprocess *p, const char *dir) {
    if (!m->fam || !m->fam->ops->check_processor) return MMB_OK;
    return m->fam->ops->check_processor(ctx, m->fam_state, p, dir);
}

mmb_status mmb__model_processor(mmb_ctx *ctx, const mmb_model *m, mmb_preprocess *p) {
    if (!m || !m->fam || !m->fam->ops->processor) return MMB_ERR_IO;
    return m->fam->ops->processor(ctx, m->fam_state, p);
}

int64_t mmb__model_xattn_tokens(const mmb_model *m) {
    return m && m->fam && m->fam->ops->xattn_tokens ? m->fam->ops->xattn_tokens(m->fam_state) : 0;
}

mmb_status mmb__model_encode_xattn(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, int height,
                                   int width, float *out, size_t out_count) {
    const int64_t t = mmb__model_xattn_tokens(m);
    if (!t) return mmb_model_encode(ctx, m, pixels, batch, height, width, out, out_count);
    if (!ctx || !pixels || !out || batch < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__model_encode_xattn: NULL argument or batch < 1");
    if (mmb_model_encode_tokens(ctx, m, height, width) < 0) return MMB_ERR_SHAPE;
    const size_t need = (size_t)(batch * t) * (size_t)m->info.out_width;
    if (out_count < need) return mmb__err(ctx, MMB_ERR_SHAPE, "output holds %zu floats, %zu needed", out_count, need);
    return m->fam->ops->encode_xattn(ctx, m->fam_state, pixels, batch, height, width, out);
}

static mmb_status tower_taps(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, const int *taps,
                             int n_taps, float *const *hidden, mmb_features *out);

const mmb_family_ops *mmb__model_fam_ops(const mmb_model *m, const void **state) {
    if (!m || !m->fam) return NULL;
    if (state) *state = m->fam_state;
    return m->fam->ops;
}

mmb_status mmb__model_encode_ids(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, int height,
                                 int width, int32_t *ids, size_t count) {
    if (!ctx || !m || !pixels || !ids || batch < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__model_encode_ids: NULL argument or batch < 1");
    if (!m->fam || !m->fam->ops->encode_ids)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: the model's images are no vocabulary ids (fusion D)", m->ck.dir);
    mmb_status vs = mmb__ckpt_verify(ctx, &m->ck);
    if (vs != MMB_OK) return vs;
    int64_t t = mmb_model_encode_tokens(ctx, m, height, width);
    if (t < 0) return MMB_ERR_SHAPE;
    if (count < (size_t)(batch * t))
        return mmb__err(ctx, MMB_ERR_SHAPE, "output holds %zu ids, %lld needed", count, (long long)(batch * t));
    return m->fam->ops->encode_ids(ctx, m->fam_state, pixels, batch, height, width, ids);
}

mmb_status mmb__model_encode_taps(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, int height,
                                  int width, float *out, size_t out_count, const int *taps, int n_taps,
                                  float *const *hidden) {
    if (!ctx || !m || !pixels || !out || batch < 1 || n_taps < 0 || n_taps > MMB_MAX_TAPS ||
        (n_taps && (!taps || !hidden)))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_model_encode: NULL argument, batch < 1 or bad taps");
    mmb_status vs = mmb__ckpt_verify(ctx, &m->ck);  /* truncated since open: MMB_ERR_IO, not SIGBUS */
    if (vs != MMB_OK) return vs;
    if (m->fam && n_taps)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a %s model runs its tower and connector as one; its hidden "
                        "states are not exposed", m->ck.dir, m->fam->name);
    int64_t t = mmb_model_encode_tokens(ctx, m, height, width);
    if (t < 0) return m->fam || m->vit ? MMB_ERR_SHAPE : MMB_ERR_MISSING;
    size_t need = (size_t)(batch * t) * (size_t)m->info.out_width;
    if (out_count < need) return mmb__err(ctx, MMB_ERR_SHAPE, "output holds %zu floats, %zu needed", out_count, need);
    if (m->fam && !m->fam->ops->encode)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a %s model's image becomes ids of its LLM's vocabulary (fusion "
                        "D), not embeddings of its own: the multimodal model embeds them (mmb_mllm_encode), and "
                        "mmb_vq_encode gives the codes", m->ck.dir, m->fam->name);
    if (m->fam) return m->fam->ops->encode(ctx, m->fam_state, pixels, batch, height, width, out);
    mmb_features ft;
    mmb_status s = tower_taps(ctx, m, pixels, batch, taps, n_taps, hidden, &ft);
    if (s == MMB_OK) s = mmb_model_connect(ctx, m, &ft, out, out_count);
    mmb__arena_reset(&ctx->feats);
    return s;
}

/* The tower's hidden states for the model's taps (a DCI group's mean summed as the blocks run) into *ft, in
 * ctx's feature buffer (the caller resets it), then the caller's taps into hidden, in one forward pass. */
static mmb_status tower_taps(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, const int *taps,
                             int n_taps, float *const *hidden, mmb_features *out) {
    mmb_vit_info vi;
    mmb_vit_get_info(m->vit, &vi);
    const int nm = m->info.n_taps;
    if (nm + n_taps > MMB_MAX_TAPS)
        return mmb__err(ctx, MMB_ERR_ARG, "%d hidden states asked besides the model's %d: at most %d in all", n_taps,
                        nm, MMB_MAX_TAPS);
    mmb_features ft = {.batch = batch, .tokens = vi.tokens, .width = vi.width, .n_hidden = vi.layers + 1,
                       .n_taps = nm};
    int all[MMB_MAX_TAPS], spans[MMB_MAX_TAPS] = {0};
    float *bufs[MMB_MAX_TAPS] = {0};
    size_t per = (size_t)(batch * vi.tokens * vi.width) * sizeof(float);
    /* In ctx's feature buffer, kept from call to call: the forward allocates nothing once warm. */
    mmb_status s = mmb__arena_reserve(ctx, &ctx->feats, (size_t)nm * mmb__arena_piece(per));
    for (int i = 0; i < nm && s == MMB_OK; i++) {
        all[i] = ft.taps[i] = m->info.taps[i] < 0 ? m->info.taps[i] + vi.layers + 1 : m->info.taps[i];
        spans[i] = ft.spans[i] = m->info.tap_spans[i];
        ft.data[i] = bufs[i] = mmb__arena_alloc(&ctx->feats, per);
    }
    for (int i = 0; i < n_taps; i++) {
        all[nm + i] = taps[i];
        bufs[nm + i] = hidden[i];
    }
    if (s == MMB_OK) s = mmb_vit_forward_groups(ctx, m->vit, pixels, batch, all, spans, nm + n_taps, bufs);
    *out = ft;
    return s;
}

const mmb_conn_cfg *mmb__model_conn_cfg(const mmb_model *m) { return &m->cc; }

mmb_status mmb__model_projector_input(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, int height,
                                      int width, float **x, int64_t *rows, mmb_conn_cfg *cc) {
    if (!ctx || !m || !pixels || !x || !rows || !cc || batch < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__model_projector_input: NULL argument or batch < 1");
    if (m->fam || (m->ops->needs && !m->ops->projector_input))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: training reads a LLaVA projector's input; a %s model's "
                        "connector is not one", m->ck.dir, m->fam ? m->fam->name : m->info.connector);
    if (!m->vit) return mmb__err(ctx, MMB_ERR_MISSING, "%s: no vision tower", m->ck.dir);
    if (mmb_model_encode_tokens(ctx, m, height, width) < 0) return MMB_ERR_SHAPE;
    mmb_features ft;
    mmb_status s = tower_taps(ctx, m, pixels, batch, NULL, 0, NULL, &ft);
    if (m->ops->needs) { /* a Dense Connector: its combined features */
        const float *nb[MMB_MAX_TAPS];
        if (s == MMB_OK) s = needs_bufs(ctx, m, &ft, 0, nb);
        if (s == MMB_OK) s = m->ops->projector_input(ctx, m->conn, nb, batch, ft.tokens, ft.width, x, rows);
        mmb__arena_reset(&ctx->arena);
        mmb__arena_reset(&ctx->feats);
        if (s == MMB_OK) *cc = m->cc;
        return s;
    }
    int64_t skip = m->drop_first ? 1 : 0, T = ft.tokens - skip, W = ft.width * m->info.n_taps;
    float *g = s == MMB_OK ? malloc(sizeof(float) * (size_t)(batch * T * W)) : NULL;
    if (s == MMB_OK && !g) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %lld rows", (long long)(batch * T));
    const float *bufs[MMB_MAX_TAPS];
    if (s == MMB_OK) s = find_taps(ctx, m, &ft, bufs);
    if (s == MMB_OK && W != m->info.in_width)
        s = mmb__err(ctx, MMB_ERR_SHAPE, "%s: the taps give %lld channels, the projector reads %d", m->ck.dir,
                     (long long)W, m->info.in_width);
    if (s == MMB_OK) gather(g, bufs, m->info.n_taps, batch, ft.tokens, ft.width, skip);
    mmb__arena_reset(&ctx->feats);
    if (s != MMB_OK) {
        free(g);
        return s;
    }
    *x = g;
    *rows = T;
    *cc = m->cc;
    return MMB_OK;
}
