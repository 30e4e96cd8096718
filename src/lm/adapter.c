/* Fusion type B's adapters: LLaMA-Adapter's learned prompts in the top layers of the decoder, each attended in a
 * softmax of its own and gated (the decoder's mmb__lm_set_prompt runs them). Two sources:
 *
 *   PEFT         AdaptionPromptConfig (peft/tuners/adaption_prompt: AdaptedAttention), a directory with
 *                adapter_config.json (peft_type ADAPTION_PROMPT, adapter_len, adapter_layers, target_modules
 *                self_attn) and adapter_model.safetensors: base_model.model.model.layers.{l}.self_attn.
 *                adaption_prompt [1, adapter_len, d] and .adaption_gate [1] for the top adapter_layers layers of a
 *                Llama or Mistral base. The gate scales the softmax as it is (zero-initialised, no tanh), and
 *                PEFT runs o_proj on the adapter's output separately, so o_proj's bias counts twice.
 *   V2           LLaMA-Adapter V2 multimodal (OpenGVLab/LLaMA-Adapter, llama_adapter_v2_multimodal7b:
 *                forward_inference), converted to one directory (scripts/convert_llama_adapter_v2.py): the
 *                prompt of the i-th of the top query_layer layers is adapter_query[i] (query_len rows of
 *                adapter_query.weight) + the image's visual query (the family's encode output, query_len
 *                rows), gated per head by tanh(model.layers.{l}.self_attn.adapter_gate) [heads]; o_proj's
 *                bias once. Without an image the prompt is adapter_query[i] alone (the original always has
 *                an image; this is its adapter with a zero visual query).
 */
#include "lm/lm.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mmb__adapter {
    mmb_lm *lm;
    bool v2;
    int first, layers;         /* the adapted layers: [first, first + layers) */
    int64_t len, d, H;
    float *prompt;             /* (layers, len, d): PEFT's prompts, or V2's adapter_query */
    float *gate;               /* (layers, H): as the decoder applies them */
    mmb_wmat *kw;              /* V2: (layers, 2) the prompts' own k / v weights where the file has them
                                  (adapter_k_proj / adapter_v_proj: wk, wv without the LoRA merged), or NULL */
};

void mmb__adapter_free(mmb_ctx *ctx, mmb__adapter *a) {
    if (!a) return;
    for (int i = 0; i < a->layers; i++) mmb__lm_set_prompt(ctx, a->lm, a->first + i, NULL, 0, NULL, false, NULL, NULL);
    free(a->kw);
    free(a->prompt);
    free(a->gate);
    free(a);
}

/* Installs every layer's prompt: a->prompt's rows, plus visual (len, d) when not NULL. */
static mmb_status install(mmb_ctx *ctx, mmb__adapter *a, const float *visual) {
    const size_t per = (size_t)(a->len * a->d);
    float *p = visual ? malloc(sizeof(float) * per) : NULL;
    if (visual && !p) return mmb__err(ctx, MMB_ERR_NOMEM, "adapter prompts: out of memory");
    mmb_status s = MMB_OK;
    for (int i = 0; i < a->layers && s == MMB_OK; i++) {
        const float *src = a->prompt + (size_t)i * per;
        if (visual)
            for (size_t e = 0; e < per; e++) p[e] = src[e] + visual[e];
        const mmb_wmat *k = a->kw && a->kw[2 * i].data ? &a->kw[2 * i] : NULL, *v = k ? &a->kw[2 * i + 1] : NULL;
        s = mmb__lm_set_prompt(ctx, a->lm, a->first + i, visual ? p : src, a->len, a->gate + (size_t)i * (size_t)a->H,
                               !a->v2, k, v);
    }
    free(p);
    return s;
}

static mmb__adapter *adapter_new(mmb_lm *lm, int first, int layers, int64_t len) {
    mmb_lm_info li;
    mmb_lm_get_info(lm, &li);
    mmb__adapter *a = calloc(1, sizeof *a);
    if (!a) return NULL;
    *a = (mmb__adapter){.lm = lm, .first = first, .layers = layers, .len = len, .d = li.d_model, .H = li.heads};
    a->prompt = malloc(sizeof(float) * (size_t)(layers * len * li.d_model));
    a->gate = malloc(sizeof(float) * (size_t)(layers * li.heads));
    if (!a->prompt || !a->gate) {
        free(a->prompt);
        free(a->gate);
        free(a);
        return NULL;
    }
    return a;
}

/* A float tensor `name` of file f (path) with `numel` elements whose shape is the given one, into out. */
static mmb_status read_floats(mmb_ctx *ctx, const mmb_st_file *f, const char *path, const char *name, int ndim,
                              const int64_t *shape, float *out) {
    const mmb_tensor *t = mmb_st_find(f, name);
    if (!t) return mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' is missing", path, name);
    bool same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = t->shape[i] == shape[i];
    if (!same) {
        char got[128] = "", want[128] = "";
        for (int i = 0; i < t->ndim; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", i ? ", " : "", (long long)t->shape[i]);
        for (int i = 0; i < ndim; i++)
            snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", i ? ", " : "", (long long)shape[i]);
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%s' has shape [%s], the base model needs [%s] (an adapter "
                        "for another model?)", path, name, got, want);
    }
    if (mmb_to_f32(out, t->data, t->dtype, (size_t)mmb_tensor_numel(t)) != MMB_OK)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: tensor '%s' is %s; adapters are read in F32, F16 or BF16", path,
                        name, mmb_dtype_name(t->dtype));
    return MMB_OK;
}

/* An integer key of the adapter's config, >= 1. */
static mmb_status cfg_count(mmb_ctx *ctx, const cJSON *cfg, const char *path, const char *key, int64_t max,
                            int64_t *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (!cJSON_IsNumber(v) || v->valuedouble < 1 || v->valuedouble > (double)max || v->valuedouble != (double)(int64_t)v->valuedouble)
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: '%s' must be an integer in [1, %lld]", path, key, (long long)max);
    *out = (int64_t)v->valuedouble;
    return MMB_OK;
}

mmb_status mmb__adapter_open_peft(mmb_ctx *ctx, mmb_lm *lm, const char *dir, mmb__adapter **out) {
    if (!ctx || !lm || !dir || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb__adapter_open_peft: NULL argument");
    mmb_lm_info li;
    mmb_lm_get_info(lm, &li);
    char path[4096], wpath[4096];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    snprintf(wpath, sizeof wpath, "%s/adapter_model.safetensors", dir);
    cJSON *cfg = NULL;
    mmb_status s = mmb__json_read(ctx, path, &cfg);
    if (s != MMB_OK) return s;
    const cJSON *pt = cJSON_GetObjectItemCaseSensitive(cfg, "peft_type");
    const cJSON *tm = cJSON_GetObjectItemCaseSensitive(cfg, "target_modules");
    int64_t len = 0, layers = 0;
    if (!cJSON_IsString(pt) || strcmp(pt->valuestring, "ADAPTION_PROMPT") != 0)
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: peft_type '%s': the adapters read are ADAPTION_PROMPT "
                     "(LLaMA-Adapter)", path, cJSON_IsString(pt) ? pt->valuestring : "?");
    else if (tm && !cJSON_IsNull(tm) && !(cJSON_IsString(tm) && strcmp(tm->valuestring, "self_attn") == 0))
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: target_modules must be 'self_attn' (the Llama and Mistral "
                     "attention)", path);
    else if (strcmp(li.arch, "llama") != 0 && strcmp(li.arch, "mistral") != 0)
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: PEFT's adaption prompts are for Llama and Mistral models; the "
                     "base is '%s'", path, li.arch);
    if (s == MMB_OK) s = cfg_count(ctx, cfg, path, "adapter_len", 65536, &len);
    if (s == MMB_OK) s = cfg_count(ctx, cfg, path, "adapter_layers", 100000, &layers);
    cJSON_Delete(cfg);
    if (s != MMB_OK) return s;
    if (layers > li.layers)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: adapter_layers %lld, but the base model has %lld layers", path,
                        (long long)layers, (long long)li.layers);
    mmb_st_file *f = NULL;
    if ((s = mmb_st_open(ctx, wpath, &f)) != MMB_OK) return s;
    mmb__adapter *a = adapter_new(lm, (int)(li.layers - layers), (int)layers, len);
    if (!a) s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", wpath);
    for (int i = 0; a && i < a->layers && s == MMB_OK; i++) {
        char nm[256];
        int64_t ps[3] = {1, len, li.d_model}, gs[1] = {1};
        snprintf(nm, sizeof nm, "base_model.model.model.layers.%d.self_attn.adaption_prompt", a->first + i);
        s = read_floats(ctx, f, wpath, nm, 3, ps, a->prompt + (size_t)i * (size_t)(len * li.d_model));
        float g = 0;
        snprintf(nm, sizeof nm, "base_model.model.model.layers.%d.self_attn.adaption_gate", a->first + i);
        if (s == MMB_OK) s = read_floats(ctx, f, wpath, nm, 1, gs, &g);
        for (int64_t h = 0; h < li.heads; h++) a->gate[(size_t)i * (size_t)li.heads + (size_t)h] = g;
    }
    mmb_st_close(f);
    if (s == MMB_OK) s = install(ctx, a, NULL);
    if (s != MMB_OK) {
        mmb__adapter_free(ctx, a);
        return s;
    }
    *out = a;
    return MMB_OK;
}

mmb_status mmb__adapter_open(mmb_ctx *ctx, mmb_lm *lm, const char *kind, mmb__adapter **out) {
    if (!ctx || !lm || !kind || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb__adapter_open: NULL argument");
    if (strcmp(kind, "llama_adapter_v2") != 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "adapter kind '%s' is not known (llama_adapter_v2)", kind);
    const mmb_ckpt *c = mmb__lm_ckpt(lm);
    mmb_lm_info li;
    mmb_lm_get_info(lm, &li);
    int64_t len = 0, layers = 0;
    mmb_status s = MMB_OK;
    if (!mmb__cfg_int(ctx, c, "query_len", &len, &s) || !mmb__cfg_int(ctx, c, "query_layer", &layers, &s) ||
        len < 1 || len > 65536 || layers < 1 || layers > li.layers)
        return s != MMB_OK ? s : mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: query_len (1 to 65536) and "
                                          "query_layer (1 to the %lld layers) are needed", c->dir,
                                          (long long)li.layers);
    mmb__adapter *a = adapter_new(lm, (int)(li.layers - layers), (int)layers, len);
    if (!a) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    a->v2 = true;
    float *q = NULL, *g = NULL;
    if (!(a->kw = calloc((size_t)(2 * layers), sizeof *a->kw))) {
        mmb__adapter_free(ctx, a);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", c->dir);
    }
    int64_t qs[2] = {layers * len, li.d_model};
    s = mmb__ckpt_floats(ctx, c, "adapter_query.weight", 2, qs, &q);
    if (s == MMB_OK) memcpy(a->prompt, q, sizeof(float) * (size_t)(layers * len * li.d_model));
    for (int i = 0; i < a->layers && s == MMB_OK; i++) {
        char nm[256];
        snprintf(nm, sizeof nm, "%slayers.%d.self_attn.adapter_gate", li.prefix, a->first + i);
        if ((s = mmb__ckpt_vec(ctx, c, nm, li.heads, &g)) != MMB_OK) break;
        for (int64_t h = 0; h < li.heads; h++) a->gate[(size_t)i * (size_t)li.heads + (size_t)h] = tanhf(g[h]);
        free(g);
        g = NULL;
        /* the prompts' k / v without LoRA, when the converter wrote them (both or neither) */
        char kn[256], vn[256];
        snprintf(kn, sizeof kn, "%slayers.%d.self_attn.adapter_k_proj.weight", li.prefix, a->first + i);
        snprintf(vn, sizeof vn, "%slayers.%d.self_attn.adapter_v_proj.weight", li.prefix, a->first + i);
        bool hk = mmb__ckpt_find(c, kn, NULL) != NULL, hv = mmb__ckpt_find(c, vn, NULL) != NULL;
        int64_t kd = li.kv_heads * li.head_dim;
        if (hk != hv) s = mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' is missing (its pair is there)", c->dir,
                                   hk ? vn : kn);
        if (s == MMB_OK && hk) s = mmb__lm_bind(ctx, lm, kn, kd, li.d_model, &a->kw[2 * i]);
        if (s == MMB_OK && hk) s = mmb__lm_bind(ctx, lm, vn, kd, li.d_model, &a->kw[2 * i + 1]);
    }
    free(q);
    free(g);
    if (s == MMB_OK) s = install(ctx, a, NULL);
    if (s != MMB_OK) {
        mmb__adapter_free(ctx, a);
        return s;
    }
    *out = a;
    return MMB_OK;
}

int64_t mmb__adapter_rows(const mmb__adapter *a) { return a && a->v2 ? a->len : 0; }

mmb_status mmb__adapter_image(mmb_ctx *ctx, mmb__adapter *a, const float *visual, int64_t rows) {
    if (!a || (visual && rows != a->len))
        return mmb__err(ctx, MMB_ERR_ARG, "adapter: an image of %lld rows, the adapter's prompts have %lld",
                        (long long)rows, (long long)(a ? a->len : 0));
    if (!a->v2 && visual) return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "a PEFT adaption prompt takes no image");
    return install(ctx, a, visual);
}

void mmb__adapter_get_cost(const mmb__adapter *a, mmb__adapter_cost *out) {
    memset(out, 0, sizeof *out);
    if (!a) return;
    mmb_lm_info li;
    mmb_lm_get_info(a->lm, &li);
    out->layers = a->layers;
    out->prompt_len = a->len;
    out->params = (int64_t)a->layers * (a->len * a->d + (a->v2 ? a->H : 1));
    /* per text position and adapted layer: scores and weighted sum over the prompt's keys, every head */
    out->flops_per_token = (int64_t)a->layers * 4 * li.heads * li.head_dim * a->len;
    /* per image (V2) or once (PEFT): the prompts through k_proj and v_proj */
    out->flops_per_prompt = (int64_t)a->layers * 2 * 2 * a->len * a->d * li.kv_heads * li.head_dim;
}
