/* The Llama-family decoder (Llama, Vicuna, Mistral, Qwen2) as transformers runs it:
 *   x = embeds; for each layer: x += o_proj(attn(rope(q), rope(k), v)) of rmsnorm(x)  (causal, GQA)
 *                               x += down(silu(gate(h)) * up(h)), h = rmsnorm(x)
 *   logits = head(rmsnorm(x))
 *
 * Layout of one forward call. The n new positions run in blocks of up to BLOCK rows; for each block the
 * whole stack is one pool job in which every thread walks the same steps and splits each one itself,
 * with a spin barrier between dependent steps (no wake-up of the pool per product: a decode step of a
 * 24-layer model would otherwise pay ~200 condition-variable round trips). Steps are numbered 2l (layer
 * l's attention half), 2l + 1 (its MLP half) and 2L (final norm + head). The hooks of types A and B
 * (internal.h, mmb_lm_hook) sit at step boundaries: the caller runs the job over the steps between two
 * hooks, calls the hook on its own thread, and goes on, so a hook can use the pool like any layer.
 *
 * Weights stay in their storage dtype (tensor/wgemm.c): one row streamed per output in decode (GEMV), a
 * converted 32-row panel per K block in prefill (GEMM on the own micro-kernel). Norm weights and biases
 * are f32 copies. The KV cache is f32: keys after RoPE, (layer, kv_head, position, head_dim).
 */
#include "lm/lm.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 256   /* prefill rows per pool job */

enum { ROPE_DEFAULT, ROPE_LINEAR, ROPE_DYNAMIC, ROPE_LLAMA3 };
static const char *const rope_names[] = {"default", "linear", "dynamic", "llama3"};

typedef struct lm_layer {
    mmb_wmat q, k, v, o, gate, up, down;
    float *bq, *bk, *bv, *bo, *bgate, *bup, *bdown; /* f32 copies, or NULL */
    float *ln1, *ln2;                                /* input_layernorm, post_attention_layernorm (d) */
    float *qn, *qnb, *kn, *knb;                      /* Chameleon's per-head q_norm / k_norm: weight and bias
                                                        (H * hd, KVH * hd), or NULL */
    int64_t window;                                  /* sliding window (keys per query), 0 = none */
    bool replaced;                                   /* Mllama's cross-attention layer: a hook runs it whole */
    int64_t slot;                                    /* its keys and values in the cache: the layers before it
                                                        that are not replaced */
    struct lm_layer *alt;                            /* type B's second weight set (expert 1), or NULL; what it
                                                        shares with this one is the same pointers */
    float *pk, *pv, *pgate;                          /* LLaMA-Adapter's prompt: keys and values (KVH, plen, hd),
                                                        the per-head gate (H); NULL without one */
    int64_t plen;
    bool pbias2;                                     /* o_proj's bias added twice (PEFT) */
    /* Gemma 3: the per-head q/k RMSNorms (hd each, stored 1 + w), the norms after attention and after the MLP
       (d, 1 + w; ln2 is then pre_feedforward_layernorm), and whether the layer is a local (sliding) one, whose
       RoPE is the local base's */
    float *gqn, *gkn, *post_attn, *post_ffn;
    bool local;
} lm_layer;

struct mmb_lm {
    mmb_ckpt ck;
    mmb_lm_info info;
    char *architecture, *prefix;
    const char *infix;         /* between layers.{l}. and a layer's names: "" or OpenFlamingo's "decoder_layer." */
    int64_t d, I, H, KVH, hd, vocab, L, mpe;
    int64_t extra;             /* IDEFICS' additional_vocab_size: ids [vocab, vocab + extra) and their logits */
    int64_t embed_only;        /* Mllama: embedding rows past vocab + extra that have no logits (8) */
    float eps;
    int rope;
    double theta, factor, low_ff, high_ff;
    int64_t orig_mpe;
    float *inv_freq;           /* (hd / 2): the frequencies of every rope type but dynamic beyond mpe */
    mmb_wmat embed, head;
    mmb_wmat embed2, head2;    /* the decoupled embedding's and head's additional rows (extra, d), when extra */
    float *norm;
    lm_layer *layers;
    int experts;               /* weight sets per layer: 1, or 2 (type B: CogVLM, mPLUG-Owl2) */
    bool file_biases;          /* biases where the file has them (arch_defaults.file_biases) */
    int64_t qk_params;         /* the q/k norms' parameters (Chameleon) */
    bool swin;                 /* Chameleon's swin_norm: x += ln1(attn(x)), x += ln2(mlp(x)) (the norms after) */
    int64_t expert_params;     /* the second set's own parameters */
    int gemma;                 /* 1: Gemma (scaled embedding, (1 + w) RMSNorms, GeGLU); 3: Gemma 3, which adds q/k
                                  norms, the sandwich norms and local layers; 0: neither */
    float embed_scale;         /* sqrt(hidden_size) in float32 (Gemma3TextScaledWordEmbedding), 1 otherwise */
    float attn_scale;          /* query_pre_attn_scalar^-0.5 (Gemma 3); 0: head_dim^-0.5 */
    float attn_softcap, final_softcap; /* tanh soft-capping of the scores / logits, 0: none */
    double local_theta;        /* the local layers' RoPE base (rope_local_base_freq) */
    float *inv_local;          /* (hd / 2) its frequencies, or NULL */
    mmb_lm_hook *hooks;        /* (L) or NULL */
    void **owned;              /* realigned copies of weights whose file offset was not aligned */
    int n_owned;
};

struct mmb_kv_cache {
    const mmb_lm *lm;
    int64_t cap, len;
    int64_t shift;             /* a row's RoPE position is its index minus shift (mmb__lm_rows.rope_pos) */
    float *k, *v;              /* (L, KVH, cap, hd) */
};

/* ---- config ------------------------------------------------------------------------------------- */

typedef struct cfgr {
    mmb_ctx *ctx;
    const mmb_ckpt *c;
    const char *tp;            /* "text_config." or "" */
    mmb_status s;
} cfgr;

static const char *key(const cfgr *r, const char *k, char *buf, size_t n) {
    snprintf(buf, n, "%s%s", r->tp, k);
    return buf;
}

static int64_t cint(cfgr *r, const char *k, int64_t def) {
    char b[160];
    int64_t v = def;
    if (r->s == MMB_OK) mmb__cfg_int(r->ctx, r->c, key(r, k, b, sizeof b), &v, &r->s);
    return v;
}

static double cnum(cfgr *r, const char *k, double def) {
    char b[160];
    double v = def;
    if (r->s == MMB_OK) mmb__cfg_num(r->ctx, r->c, key(r, k, b, sizeof b), &v, &r->s);
    return v;
}

static bool cbool(cfgr *r, const char *k, bool def, bool *present) {
    char b[160];
    bool v = def, got = false;
    if (r->s == MMB_OK) got = mmb__cfg_bool(r->ctx, r->c, key(r, k, b, sizeof b), &v, &r->s);
    if (present) *present = got;
    return v;
}

/* The class defaults of transformers' LlamaConfig, MistralConfig and Qwen2Config for absent keys. */
typedef struct arch_defaults {
    const char *name;
    int64_t vocab, hidden, inter, layers, heads, kv_heads, mpe;
    bool file_biases;          /* the config names no biases: a layer has those its file holds */
    double theta;              /* the RoPE base without rope_theta (0: 10000) */
    const char *kv_key;        /* the K/V head count's key (NULL: num_key_value_heads) */
} arch_defaults;
static const arch_defaults archs[] = {
    {"llama", 32000, 4096, 11008, 32, 32, 0, 2048, false, 0, NULL},
    {"mistral", 32000, 4096, 14336, 32, 32, 8, 4096 * 32, false, 0, NULL},
    {"qwen2", 151936, 4096, 22016, 32, 32, 32, 32768, false, 0, NULL},
    {"idefics", 32000, 4096, 11008, 32, 32, 0, 2048, false, 0, NULL},  /* IdeficsConfig: a Llama with its own config class */
    {"mplug_owl2", 32000, 4096, 11008, 32, 32, 0, 2048, false, 0, NULL},  /* MPLUGOwl2Config: its own LlamaConfig (eps 1e-6) */
    {"mllama_text_model", 128256, 4096, 14336, 40, 32, 8, 131072, false, 0, NULL}, /* MllamaTextConfig: Llama 3.1 + cross layers */
    /* LLaMA-Adapter V2 (scripts/convert_llama_adapter_v2.py): Meta's LLaMA with its bias tuning's biases */
    {"llama_adapter_v2", 32000, 4096, 11008, 32, 32, 0, 2048, true, 0, NULL},
    {"cogvlm", 32000, 4096, 11008, 32, 32, 0, 2048, false, 0, NULL}, /* CogVLMConfig (remote code): Vicuna-7B + the visual expert */
    /* CogVLM2 (cogvlm2-llama3-chat-19B's remote code): Llama 3 8B + the visual expert; VisionExpertAttention
     * groups K/V by num_multi_query_heads and builds its rotary embedding with base=500000 in code */
    {"cogvlm2", 128256, 4096, 14336, 32, 32, 8, 8192, false, 500000.0, "num_multi_query_heads"},
    /* ChameleonConfig: Llama with per-head q/k LayerNorms (layers.{l}.self_attn.{q,k}_norm) and swin_norm */
    {"chameleon", 65536, 4096, 11008, 32, 32, 32, 4096, false, 0, NULL},
    {"emu3_text_model", 184622, 4096, 14336, 32, 32, 8, 9216, false, 1000000.0, NULL}, /* Emu3TextConfig: Llama */
    /* Gemma3TextConfig (gemma-3-4b's text model shape defaults to the 2B's class defaults) */
    {"gemma", 256000, 3072, 24576, 28, 16, 16, 8192, false, 0, NULL}, /* GemmaConfig (PaliGemma's text model) */
    {"gemma3_text", 262208, 2304, 9216, 26, 8, 4, 131072, false, 1000000.0, NULL},
};

/* The defaults row for a config of model_type and architecture (either NULL); config: the one they came from. */
static const arch_defaults *find_arch(const char *model_type, const char *architecture, const cJSON *config) {
    /* CogVLM's remote-code config.json may carry no model_type; CogVLM2 has the same architecture name (and
     * model_type, if any) and is told by num_multi_query_heads, which only its code reads (models/cogvlm.c tells
     * its conv by the same key) */
    const bool cog = (architecture && strcmp(architecture, "CogVLMForCausalLM") == 0) ||
                     (model_type && strcmp(model_type, "cogvlm") == 0);
    const bool v2 = cJSON_GetObjectItemCaseSensitive(config, "num_multi_query_heads") != NULL;
    for (size_t i = 0; cog && i < sizeof archs / sizeof archs[0]; i++)
        if (strncmp(archs[i].name, "cogvlm", 6) == 0 && (archs[i].kv_key != NULL) == v2) return &archs[i];
    for (size_t i = 0; i < sizeof archs / sizeof archs[0]; i++)
        if (model_type && strcmp(model_type, archs[i].name) == 0) return &archs[i];
    /* Original LLaVA: model_type llava / llava_llama / llava_mistral / llava_qwen, weights at model.* */
    if (architecture && strncmp(architecture, "Llava", 5) == 0 && strstr(architecture, "ForCausalLM")) {
        if (strstr(architecture, "Mistral")) return &archs[1];
        if (strstr(architecture, "Qwen")) return &archs[2];
        return &archs[0];
    }
    return NULL;
}

/* rope_parameters (transformers 5) or rope_scaling + rope_theta (earlier files); without rope_theta, ad's base. */
static mmb_status read_rope(cfgr *r, const arch_defaults *ad, mmb_lm *lm) {
    mmb_ctx *ctx = r->ctx;
    const cJSON *root = r->c->config;
    if (*r->tp) root = cJSON_GetObjectItemCaseSensitive(root, "text_config");
    const cJSON *rp = cJSON_GetObjectItemCaseSensitive(root, "rope_parameters");
    const char *which = "rope_parameters";
    if (!cJSON_IsObject(rp)) {
        rp = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
        which = "rope_scaling";
    }
    if (rp && !cJSON_IsObject(rp) && !cJSON_IsNull(rp))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: '%s%s' is not an object", r->c->dir, r->tp, which);
    if (lm->gemma == 3) { /* Gemma 3: the local layers' base (rope_local_base_freq, or rope_parameters.sliding_attention) */
        lm->local_theta = cnum(r, "rope_local_base_freq", 10000.0);
        const cJSON *fa = cJSON_GetObjectItemCaseSensitive(rp, "full_attention"),
                    *sa = cJSON_GetObjectItemCaseSensitive(rp, "sliding_attention");
        if (cJSON_IsObject(sa)) {
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(sa, "rope_type"),
                        *th = cJSON_GetObjectItemCaseSensitive(sa, "rope_theta");
            if (cJSON_IsString(t) && strcmp(t->valuestring, "default") != 0)
                return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: %s%s.sliding_attention: rope type '%s' is "
                                "not supported (default only)", r->c->dir, r->tp, which, t->valuestring);
            if (cJSON_IsNumber(th)) lm->local_theta = th->valuedouble;
        }
        if (!(lm->local_theta > 1.0) || !(lm->local_theta < 1e30))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %sthe local RoPE base %g is not > 1", r->c->dir,
                            r->tp, lm->local_theta);
        if (cJSON_IsObject(fa) || cJSON_IsObject(sa)) rp = cJSON_IsObject(fa) ? fa : NULL;
    }
    lm->theta = cnum(r, "rope_theta", ad->theta > 0 ? ad->theta : 10000.0);
    lm->factor = 1.0;
    lm->rope = ROPE_DEFAULT;
    if (r->s != MMB_OK) return r->s;
    if (!cJSON_IsObject(rp)) return MMB_OK;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(rp, "rope_type");
    if (!cJSON_IsString(t)) t = cJSON_GetObjectItemCaseSensitive(rp, "type");
    const char *type = cJSON_IsString(t) ? t->valuestring : "default";
    int k = -1;
    for (int i = 0; i < 4; i++)
        if (strcmp(type, rope_names[i]) == 0) k = i;
    if (k < 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED,
                        "%s/config.json: %s%s: rope type '%s' is not supported (default, linear, dynamic, llama3)",
                        r->c->dir, r->tp, which, type);
    lm->rope = k;
    const char *need[4] = {NULL, "factor", "factor", "factor"};
    const char *names[] = {"rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings", "partial_rotary_factor"};
    double vals[6] = {lm->theta, 1.0, 1.0, 4.0, (double)lm->mpe, 1.0};
    for (int i = 0; i < 6; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(rp, names[i]);
        if (cJSON_IsNumber(v)) vals[i] = v->valuedouble;
        else if (v && !cJSON_IsNull(v))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %s%s.%s is not a number", r->c->dir, r->tp, which,
                            names[i]);
        else if (need[k] && strcmp(need[k], names[i]) == 0)
            return mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: %s%s: rope type '%s' needs '%s'", r->c->dir,
                            r->tp, which, type, names[i]);
    }
    if (vals[5] != 1.0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: partial_rotary_factor %g is not supported (1 only)",
                        r->c->dir, vals[5]);
    if (!(vals[0] > 1.0) || !(vals[1] >= 1.0) || (k == ROPE_LLAMA3 && !(vals[3] > vals[2] && vals[2] > 0)))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %s%s: bad values (rope_theta %g, factor %g, "
                        "low_freq_factor %g, high_freq_factor %g)", r->c->dir, r->tp, which, vals[0], vals[1],
                        vals[2], vals[3]);
    if ((k == ROPE_LINEAR || k == ROPE_DYNAMIC) && !((double)lm->mpe * vals[1] <= 9007199254740992.0))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %s%s: factor %g times max_position_embeddings %lld is "
                        "beyond any context (2^53 positions)", r->c->dir, r->tp, which, vals[1], (long long)lm->mpe);
    lm->theta = vals[0];
    lm->factor = vals[1];
    lm->low_ff = vals[2];
    lm->high_ff = vals[3];
    lm->orig_mpe = (int64_t)vals[4];
    return MMB_OK;
}

/* inv_freq[i], i < hd / 2, in float32 as transformers computes it; seq_len matters for dynamic only. */
static void rope_inv_freq(const mmb_lm *lm, int64_t seq_len, float *inv) {
    const int64_t dim = lm->hd;
    float base = (float)lm->theta;
    if (lm->rope == ROPE_DYNAMIC && seq_len > lm->mpe) {
        float f = (float)lm->factor;
        float t = f * (float)seq_len / (float)lm->mpe - (f - 1.0f);
        base = (float)(lm->theta * (double)powf(t, (float)((double)dim / (double)(dim - 2))));
    }
    for (int64_t i = 0; i < dim / 2; i++) inv[i] = 1.0f / powf(base, (float)(2 * i) / (float)dim);
    if (lm->rope == ROPE_LINEAR)
        for (int64_t i = 0; i < dim / 2; i++) inv[i] /= (float)lm->factor;
    if (lm->rope == ROPE_LLAMA3) {
        float f = (float)lm->factor, lo = (float)lm->low_ff, hi = (float)lm->high_ff, old = (float)lm->orig_mpe;
        float lo_wl = old / lo, hi_wl = old / hi;
        for (int64_t i = 0; i < dim / 2; i++) {
            float wl = 2.0f * 3.14159265358979323846f / inv[i];
            float v = wl > lo_wl ? inv[i] / f : inv[i];
            if (!(wl < hi_wl) && !(wl > lo_wl)) {
                float s = (old / wl - lo) / (hi - lo);
                v = (1.0f - s) * v / f + s * v;
            }
            inv[i] = v;
        }
    }
}

/* Appends the id or ids of j (a number or a list) to eos, without repeats. */
static void add_ids(const cJSON *j, int32_t *eos, int *n) {
    const cJSON *e = cJSON_IsArray(j) ? j->child : j;
    for (; e; e = cJSON_IsArray(j) ? e->next : NULL) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > INT32_MAX) continue;
        int32_t id = (int32_t)e->valuedouble;
        bool dup = false;
        for (int i = 0; i < *n; i++) dup |= eos[i] == id;
        if (!dup && *n < 8) eos[(*n)++] = id;
    }
}

/* The special ids generation needs: <image> and the end-of-sequence ids (OpenFlamingo's end of chunk, then
 * generation_config.json, as transformers' generate reads them, then the text config, then the top level). */
static void read_special(mmb_lm *lm, const cJSON *text) {
    const cJSON *root = lm->ck.config;
    lm->info.image_token = -1;
    const char *names[] = {"image_token_index", "image_token_id"};
    for (int i = 0; i < 2 && lm->info.image_token < 0; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, names[i]);
        if (cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < INT32_MAX)
            lm->info.image_token = (int32_t)v->valuedouble;
    }
    /* OpenFlamingo's Flamingo.generate stops at <|endofchunk|> (its eos_token_id defaults to eoc_token_id) */
    add_ids(cJSON_GetObjectItemCaseSensitive(root, "end_of_chunk_token_id"), lm->info.eos, &lm->info.n_eos);
    char path[4096];
    snprintf(path, sizeof path, "%s/generation_config.json", lm->ck.dir);
    FILE *f = NULL;
    if (mmb__fopen_input(NULL, path, &f) != MMB_OK) f = NULL;  /* optional: absent or not a regular file */
    if (f) {
        char *txt = NULL;
        long n = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
        if (n > 0 && n < (1 << 20) && fseek(f, 0, SEEK_SET) == 0 && (txt = malloc((size_t)n + 1)) &&
            fread(txt, 1, (size_t)n, f) == (size_t)n) {
            txt[n] = 0;
            cJSON *g = cJSON_Parse(txt);
            if (g) add_ids(cJSON_GetObjectItemCaseSensitive(g, "eos_token_id"), lm->info.eos, &lm->info.n_eos);
            cJSON_Delete(g);
        }
        free(txt);
        fclose(f);
    }
    if (lm->info.n_eos == 0 && text) add_ids(cJSON_GetObjectItemCaseSensitive(text, "eos_token_id"), lm->info.eos, &lm->info.n_eos);
    if (lm->info.n_eos == 0) add_ids(cJSON_GetObjectItemCaseSensitive(root, "eos_token_id"), lm->info.eos, &lm->info.n_eos);
}

/* ---- weights ------------------------------------------------------------------------------------ */

mmb_status mmb__lm_bind(mmb_ctx *ctx, mmb_lm *lm, const char *name, int64_t n, int64_t k, mmb_wmat *w) {
    const mmb_tensor *t;
    int64_t shape[2] = {n, k};
    mmb_status s = mmb__ckpt_bind(ctx, &lm->ck, name, 2, shape, &t);
    if (s != MMB_OK) return s;
    *w = (mmb_wmat){t->data, t->dtype, n, k};
    size_t es = mmb_dtype_size(t->dtype);
    if ((uintptr_t)t->data % es) { /* an odd offset in the file: a realigned copy */
        void **no = realloc(lm->owned, sizeof *no * (size_t)(lm->n_owned + 1));
        if (!no) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: tensor '%s': out of memory", lm->ck.dir, name);
        lm->owned = no;
        void *cp = malloc((size_t)(n * k) * es + 1);
        if (!cp) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: tensor '%s': out of memory", lm->ck.dir, name);
        memcpy(cp, t->data, (size_t)(n * k) * es);
        lm->owned[lm->n_owned++] = cp;
        w->data = cp;
    }
    return MMB_OK;
}

/* The names of one layer's weights after {prefix}layers.{l}.{infix}. qkv: one fused [q; k; v] matrix in
 * place of q, k and v. In a second set, NULL is a weight shared with the first. */
typedef struct layer_names {
    const char *qkv, *q, *k, *v, *o, *gate, *up, *down, *ln1, *ln2;
} layer_names;

/* How a checkpoint names its layers: the plain Llama names, or a type-B model's two sets, told by the first
 * set's probe tensor in layer 0. The plain scheme's biases are the config's; a type-B model's config does
 * not say, so there a bias is used where the file has one (CogVLM's vision QKV has, its language QKV not). */
typedef struct layer_scheme {
    const char *probe;
    int sets;
    layer_names set[2];
} layer_scheme;
static const layer_scheme schemes[] = {
    {"self_attn.language_expert_query_key_value", 2,     /* CogVLM's visual expert */
     {{"self_attn.language_expert_query_key_value", NULL, NULL, NULL, "self_attn.language_expert_dense",
       "mlp.language_mlp.gate_proj", "mlp.language_mlp.up_proj", "mlp.language_mlp.down_proj", "input_layernorm",
       "post_attention_layernorm"},
      {"self_attn.vision_expert_query_key_value", NULL, NULL, NULL, "self_attn.vision_expert_dense",
       "mlp.vision_mlp.gate_proj", "mlp.vision_mlp.up_proj", "mlp.vision_mlp.down_proj", NULL, NULL}}},
    {"self_attn.k_proj.multiway.0", 2,                   /* mPLUG-Owl2's modality-adaptive module */
     {{NULL, "self_attn.q_proj", "self_attn.k_proj.multiway.0", "self_attn.v_proj.multiway.0", "self_attn.o_proj",
       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm.multiway.0",
       "post_attention_layernorm.multiway.0"},
      {NULL, NULL, "self_attn.k_proj.multiway.1", "self_attn.v_proj.multiway.1", NULL, NULL, NULL, NULL,
       "input_layernorm.multiway.1", "post_attention_layernorm.multiway.1"}}},
    {NULL, 1,
     {{NULL, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
       "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"}}},
};

enum { BIAS_NO, BIAS_YES, BIAS_IF_PRESENT };

/* {prefix}layers.{l}.{infix}{name}.weight [n, k] and its .bias [n] (bias: BIAS_*; *b stays NULL without). */
static mmb_status bind_lin(mmb_ctx *ctx, mmb_lm *lm, int l, const char *name, int64_t n, int64_t k, int bias,
                           mmb_wmat *w, float **b) {
    char nm[512];
    snprintf(nm, sizeof nm, "%slayers.%d.%s%s.weight", lm->prefix, l, lm->infix, name);
    mmb_status s = mmb__lm_bind(ctx, lm, nm, n, k, w);
    snprintf(nm, sizeof nm, "%slayers.%d.%s%s.bias", lm->prefix, l, lm->infix, name);
    if (s == MMB_OK && (bias == BIAS_YES || (bias == BIAS_IF_PRESENT && mmb__ckpt_find(&lm->ck, nm, NULL))))
        s = mmb__ckpt_vec(ctx, &lm->ck, nm, n, b);
    return s;
}

/* A copy of floats [off, off + n) of v (NULL: NULL), into *out. */
static mmb_status slice_vec(mmb_ctx *ctx, const float *v, int64_t off, int64_t n, float **out) {
    *out = NULL;
    if (!v) return MMB_OK;
    if (!(*out = malloc(sizeof(float) * (size_t)n))) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    memcpy(*out, v + off, sizeof(float) * (size_t)n);
    return MMB_OK;
}

/* Binds the weights set `nm` names into y; base: set 0 (whose weights a NULL name shares), or NULL for
 * set 0 itself. */
static mmb_status bind_set(mmb_ctx *ctx, mmb_lm *lm, int l, const layer_names *nm, const lm_layer *base,
                           int qkv_bias, int o_bias, int mlp_bias, lm_layer *y) {
    int64_t d = lm->d, qd = lm->H * lm->hd, kd = lm->KVH * lm->hd, I = lm->I;
    if (base) { /* what the set shares */
        y->q = base->q, y->k = base->k, y->v = base->v, y->o = base->o;
        y->gate = base->gate, y->up = base->up, y->down = base->down;
        y->bq = base->bq, y->bk = base->bk, y->bv = base->bv, y->bo = base->bo;
        y->bgate = base->bgate, y->bup = base->bup, y->bdown = base->bdown;
        y->ln1 = base->ln1, y->ln2 = base->ln2;
    }
    mmb_status s = MMB_OK;
    if (nm->qkv) { /* one fused matrix: q, k and v are row ranges of it */
        mmb_wmat w;
        float *b = NULL;
        s = bind_lin(ctx, lm, l, nm->qkv, qd + 2 * kd, d, qkv_bias, &w, &b);
        if (s == MMB_OK) {
            size_t row = (size_t)d * mmb_dtype_size(w.dtype);
            y->q = (mmb_wmat){w.data, w.dtype, qd, d};
            y->k = (mmb_wmat){(const char *)w.data + (size_t)qd * row, w.dtype, kd, d};
            y->v = (mmb_wmat){(const char *)w.data + (size_t)(qd + kd) * row, w.dtype, kd, d};
            s = slice_vec(ctx, b, 0, qd, &y->bq);
            if (s == MMB_OK) s = slice_vec(ctx, b, qd, kd, &y->bk);
            if (s == MMB_OK) s = slice_vec(ctx, b, qd + kd, kd, &y->bv);
        }
        free(b);
    }
    const struct { const char *name; int64_t n, k; int bias; mmb_wmat *w; float **b; } lin[] = {
        {nm->q, qd, d, qkv_bias, &y->q, &y->bq},         {nm->k, kd, d, qkv_bias, &y->k, &y->bk},
        {nm->v, kd, d, qkv_bias, &y->v, &y->bv},         {nm->o, d, qd, o_bias, &y->o, &y->bo},
        {nm->gate, I, d, mlp_bias, &y->gate, &y->bgate}, {nm->up, I, d, mlp_bias, &y->up, &y->bup},
        {nm->down, d, I, mlp_bias, &y->down, &y->bdown},
    };
    for (size_t i = 0; i < sizeof lin / sizeof lin[0] && s == MMB_OK; i++) {
        if (!lin[i].name) continue;
        *lin[i].b = NULL;
        s = bind_lin(ctx, lm, l, lin[i].name, lin[i].n, lin[i].k, lin[i].bias, lin[i].w, lin[i].b);
        if (base && s == MMB_OK) lm->expert_params += lin[i].n * lin[i].k + (*lin[i].b ? lin[i].n : 0);
    }
    if (base && nm->qkv && s == MMB_OK) lm->expert_params += (qd + 2 * kd) * d + (y->bq ? qd + 2 * kd : 0);
    const char *norms[2] = {nm->ln1, nm->ln2};
    float **nw[2] = {&y->ln1, &y->ln2};
    for (int i = 0; i < 2 && s == MMB_OK; i++) {
        if (!norms[i]) continue;
        char nmb[512];
        snprintf(nmb, sizeof nmb, "%slayers.%d.%s%s.weight", lm->prefix, l, lm->infix, norms[i]);
        *nw[i] = NULL;
        s = mmb__ckpt_vec(ctx, &lm->ck, nmb, d, nw[i]);
        if (base && s == MMB_OK) lm->expert_params += d;
    }
    return s;
}

/* Chameleon's q_norm and k_norm of layer l: weight and bias (H, hd) and (KVH, hd), f32 copies. */
static mmb_status bind_qk_norm(mmb_ctx *ctx, mmb_lm *lm, int l, lm_layer *y) {
    const struct { const char *name; int64_t heads; float **w, **b; } n[2] = {
        {"q_norm", lm->H, &y->qn, &y->qnb}, {"k_norm", lm->KVH, &y->kn, &y->knb}};
    mmb_status s = MMB_OK;
    for (int i = 0; i < 2 && s == MMB_OK; i++) {
        char nm[512];
        const char *part[2] = {"weight", "bias"};
        float **dst[2] = {n[i].w, n[i].b};
        for (int k = 0; k < 2 && s == MMB_OK; k++) {
            snprintf(nm, sizeof nm, "%slayers.%d.%sself_attn.%s.%s", lm->prefix, l, lm->infix, n[i].name, part[k]);
            const mmb_tensor *t = mmb__ckpt_find(&lm->ck, nm, NULL);
            if (!t)
                return mmb__err(ctx, MMB_ERR_MISSING, "%s: tensor '%s' is missing", lm->ck.dir, nm);
            if (t->ndim != 2 || t->shape[0] != n[i].heads || t->shape[1] != lm->hd)
                return mmb__err(ctx, MMB_ERR_SHAPE, "%s: tensor '%s' is not [%lld, %lld] (heads, head_dim)",
                                lm->ck.dir, nm, (long long)n[i].heads, (long long)lm->hd);
            const int64_t shape[2] = {n[i].heads, lm->hd};
            s = mmb__ckpt_floats(ctx, &lm->ck, nm, 2, shape, dst[k]);
        }
    }
    if (s == MMB_OK) lm->qk_params += 2 * (lm->H + lm->KVH) * lm->hd;
    return s;
}

static mmb_status bind_layer(mmb_ctx *ctx, mmb_lm *lm, int l, const layer_scheme *sc, bool qkv_bias, bool o_bias,
                             bool mlp_bias) {
    lm_layer *y = &lm->layers[l];
    int qb = qkv_bias ? BIAS_YES : BIAS_NO, ob = o_bias ? BIAS_YES : BIAS_NO, mb = mlp_bias ? BIAS_YES : BIAS_NO;
    if (sc->probe || lm->file_biases) qb = ob = mb = BIAS_IF_PRESENT;
    mmb_status s = bind_set(ctx, lm, l, &sc->set[0], NULL, qb, ob, mb, y);
    char nm[512];
    snprintf(nm, sizeof nm, "%slayers.%d.%sself_attn.q_norm.weight", lm->prefix, l, lm->infix);
    if (s == MMB_OK && lm->gemma == 3) { /* Gemma 3: q/k RMSNorms (head_dim) and the sandwich norms, all 1 + w */
        y->post_attn = y->ln2;
        y->ln2 = NULL;
        const struct { const char *name; int64_t n; float **w; } g[] = {
            {"self_attn.q_norm", lm->hd, &y->gqn}, {"self_attn.k_norm", lm->hd, &y->gkn},
            {"pre_feedforward_layernorm", lm->d, &y->ln2}, {"post_feedforward_layernorm", lm->d, &y->post_ffn}};
        for (size_t i = 0; i < sizeof g / sizeof g[0] && s == MMB_OK; i++) {
            snprintf(nm, sizeof nm, "%slayers.%d.%s%s.weight", lm->prefix, l, lm->infix, g[i].name);
            s = mmb__ckpt_vec(ctx, &lm->ck, nm, g[i].n, g[i].w);
        }
        if (s == MMB_OK) {
            float *all[] = {y->ln1, y->ln2, y->post_attn, y->post_ffn, y->gqn, y->gkn};
            int64_t len[] = {lm->d, lm->d, lm->d, lm->d, lm->hd, lm->hd};
            for (int i = 0; i < 6; i++)
                for (int64_t e = 0; e < len[i]; e++) all[i][e] = 1.0f + all[i][e];
            lm->qk_params += 2 * lm->hd + 2 * lm->d;
        }
        return s;
    }
    if (s == MMB_OK && lm->gemma) { /* Gemma: (1 + w) RMSNorms */
        for (int64_t e = 0; e < lm->d; e++) y->ln1[e] += 1.0f, y->ln2[e] += 1.0f;
        return s;
    }
    if (s == MMB_OK && mmb__ckpt_find(&lm->ck, nm, NULL)) /* Chameleon: (heads, head_dim) weight and bias each */
        s = bind_qk_norm(ctx, lm, l, y);
    if (s != MMB_OK || sc->sets < 2) return s;
    if (!(y->alt = calloc(1, sizeof *y->alt))) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    return bind_set(ctx, lm, l, &sc->set[1], y, qb, ob, mb, y->alt);
}

static int64_t wbytes(const mmb_wmat *w) { return w->n * w->k * (int64_t)mmb_dtype_size(w->dtype); }

void mmb_lm_free(mmb_lm *lm) {
    if (!lm) return;
    for (int64_t l = 0; lm->layers && l < lm->L; l++) {
        lm_layer *y = &lm->layers[l], *a = y->alt;
        float *f[] = {y->bq, y->bk, y->bv, y->bo, y->bgate, y->bup, y->bdown, y->ln1, y->ln2};
        for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) free(f[i]);
        if (a) { /* what the second set does not share */
            float *g[] = {a->bq, a->bk, a->bv, a->bo, a->bgate, a->bup, a->bdown, a->ln1, a->ln2};
            for (size_t i = 0; i < sizeof g / sizeof g[0]; i++)
                if (g[i] != f[i]) free(g[i]);
            free(a);
        }
        free(y->pk);
        free(y->pv);
        free(y->pgate);
        free(y->qn);
        free(y->qnb);
        free(y->kn);
        free(y->knb);
        free(y->gqn);
        free(y->gkn);
        free(y->post_attn);
        free(y->post_ffn);
    }
    for (int i = 0; i < lm->n_owned; i++) free(lm->owned[i]);
    free(lm->owned);
    free(lm->layers);
    free(lm->norm);
    free(lm->inv_freq);
    free(lm->inv_local);
    free(lm->hooks);
    free(lm->architecture);
    free(lm->prefix);
    mmb__ckpt_close(&lm->ck);
    free(lm);
}

/* Reads the text config into lm (shapes, eps, RoPE, windows) and says which biases the layers carry. */
static mmb_status read_config(mmb_ctx *ctx, mmb_lm *lm, bool *qkv_bias, bool *o_bias, bool *mlp_bias,
                              bool *tied, int64_t **windows, bool **replaced) {
    mmb_ckpt *c = &lm->ck;
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(c->config, "architectures");
    const cJSON *a0 = cJSON_IsArray(arr) ? cJSON_GetArrayItem(arr, 0) : NULL;
    const char *architecture = cJSON_IsString(a0) ? a0->valuestring : "";
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(c->config, "text_config");
    cfgr r = {ctx, c, cJSON_IsObject(tc) ? "text_config." : "", MMB_OK};
    const char *mt = NULL;
    mmb__cfg_str(ctx, c, *r.tp ? "text_config.model_type" : "model_type", &mt, &r.s);
    if (r.s != MMB_OK) return r.s;
    if (*r.tp && !mt) mt = "llama"; /* LlavaConfig's default text model */
    const arch_defaults *ad = find_arch(mt, architecture, c->config);
    if (!ad)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED,
                        "%s/config.json: unknown architecture '%s' (%smodel_type '%s'): the decoder runs Llama, "
                        "Vicuna, Mistral, Qwen2, Gemma and Gemma 3 text models", c->dir, architecture, r.tp, mt ? mt : "");
    if (!(lm->architecture = strdup(architecture))) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    lm->info.arch = ad->name;
    lm->file_biases = ad->file_biases;
    lm->vocab = cint(&r, "vocab_size", ad->vocab);
    lm->d = cint(&r, "hidden_size", ad->hidden);
    lm->I = cint(&r, "intermediate_size", ad->inter);
    lm->L = cint(&r, "num_hidden_layers", ad->layers);
    lm->H = cint(&r, "num_attention_heads", ad->heads);
    lm->KVH = cint(&r, ad->kv_key ? ad->kv_key : "num_key_value_heads", ad->kv_heads ? ad->kv_heads : lm->H);
    lm->hd = cint(&r, "head_dim", lm->H > 0 ? lm->d / lm->H : 0);
    lm->mpe = cint(&r, "max_position_embeddings", ad->mpe);
    lm->eps = (float)cnum(&r, "rms_norm_eps", 1e-6);
    lm->extra = cint(&r, "additional_vocab_size", 0);
    const char *act = "silu";
    char b[160];
    lm->gemma = strcmp(ad->name, "gemma3_text") == 0 ? 3 : strcmp(ad->name, "gemma") == 0 ? 1 : 0;
    lm->embed_scale = 1.0f;
    if (lm->gemma == 1) { /* Gemma: GeGLU; GemmaConfig turns the legacy "gelu" into the tanh approximation */
        act = "gelu_pytorch_tanh";
        if (r.s == MMB_OK) mmb__cfg_str(ctx, c, key(&r, "hidden_act", b, sizeof b), &act, &r.s);
        if (r.s == MMB_OK && strcmp(act, "gelu_pytorch_tanh") != 0 && strcmp(act, "gelu") != 0)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: %shidden_act '%s': Gemma's MLP is GeGLU "
                            "(gelu_pytorch_tanh)", c->dir, r.tp, act);
        act = "silu";
    } else if (lm->gemma) { /* Gemma 3: GeGLU (hidden_activation), query_pre_attn_scalar, soft-capping where set */
        act = "gelu_pytorch_tanh";
        if (r.s == MMB_OK) mmb__cfg_str(ctx, c, key(&r, "hidden_activation", b, sizeof b), &act, &r.s);
        double qs = cnum(&r, "query_pre_attn_scalar", 256), ac = cnum(&r, "attn_logit_softcapping", 0),
               fc = cnum(&r, "final_logit_softcapping", 0);
        if (r.s != MMB_OK) return r.s;
        if (!(qs > 0 && qs < 1e12) || !(ac >= 0 && ac < 1e12) || !(fc >= 0 && fc < 1e12))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %squery_pre_attn_scalar %g (> 0), "
                            "attn_logit_softcapping %g, final_logit_softcapping %g (>= 0)", c->dir, r.tp, qs, ac, fc);
        if (strcmp(act, "gelu_pytorch_tanh") != 0)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: %shidden_activation '%s': Gemma 3's MLP is GeGLU "
                            "(gelu_pytorch_tanh)", c->dir, r.tp, act);
        lm->attn_scale = (float)pow(qs, -0.5);
        /* Gemma3Attention reads attn_logit_softcapping but passes no softcap to its attention function (5.23):
           the installed code runs uncapped scores, and so does this */
        lm->attn_softcap = 0.0f;
        (void)ac;
        /* only Gemma3ForCausalLM caps its logits; Gemma3ForConditionalGeneration's lm_head does not */
        lm->final_softcap = strcmp(architecture, "Gemma3ForCausalLM") == 0 ? (float)fc : 0.0f;
        act = "silu";
    } else if (r.s == MMB_OK) mmb__cfg_str(ctx, c, key(&r, "hidden_act", b, sizeof b), &act, &r.s);
    bool ab = cbool(&r, "attention_bias", false, NULL), mb = cbool(&r, "mlp_bias", false, NULL);
    lm->swin = cbool(&r, "swin_norm", false, NULL);
    bool tie_present;
    *tied = cbool(&r, "tie_word_embeddings", lm->gemma, &tie_present);
    if (!tie_present && *r.tp && r.s == MMB_OK) mmb__cfg_bool(ctx, c, "tie_word_embeddings", tied, &r.s);
    bool sw_on = strcmp(ad->name, "mistral") == 0 || lm->gemma == 3 || cbool(&r, "use_sliding_window", false, NULL);
    int64_t sw = sw_on ? cint(&r, "sliding_window", strcmp(ad->name, "mistral") == 0 ? 0 : 4096) : 0;
    int64_t swp = lm->gemma == 3 ? cint(&r, "sliding_window_pattern", 6) : 1;
    int64_t mwl = cint(&r, "max_window_layers", 28);
    if (r.s != MMB_OK) return r.s;
    if (strcmp(act, "silu") != 0 && strcmp(act, "swish") != 0)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: %shidden_act '%s': the decoder's MLP is SwiGLU (silu)",
                        c->dir, r.tp, act);
    if (lm->vocab < 1 || lm->d < 1 || lm->I < 1 || lm->L < 1 || lm->H < 1 || lm->KVH < 1 || lm->hd < 2 ||
        lm->hd % 2 || lm->H % lm->KVH || lm->mpe < 1 || lm->L > 100000 || lm->extra < 0 || lm->extra > (1 << 20) ||
        lm->vocab + lm->extra > INT32_MAX ||
        !(lm->eps > 0) || lm->d > (1 << 20) || lm->H * lm->hd > (1 << 20) || lm->I > (1 << 22) || sw < 0 ||
        swp < 1 || (lm->gemma == 3 && sw < 1))
        return mmb__err(ctx, MMB_ERR_FORMAT,
                        "%s/config.json: bad text model shape: vocab_size %lld, hidden_size %lld, intermediate_size "
                        "%lld, num_hidden_layers %lld, num_attention_heads %lld, %s %lld (must "
                        "divide the heads), head_dim %lld (even), max_position_embeddings %lld, rms_norm_eps %g, "
                        "additional_vocab_size %lld, sliding_window %lld, sliding_window_pattern %lld", c->dir, (long long)lm->vocab, (long long)lm->d, (long long)lm->I,
                        (long long)lm->L,
                        (long long)lm->H, ad->kv_key ? ad->kv_key : "num_key_value_heads", (long long)lm->KVH,
                        (long long)lm->hd, (long long)lm->mpe, (double)lm->eps,
                        (long long)lm->extra, (long long)sw, (long long)swp);
    if (lm->gemma) lm->embed_scale = (float)sqrt((double)lm->d);
    lm->orig_mpe = lm->mpe;
    read_special(lm, *r.tp ? tc : NULL);
    mmb_status s = read_rope(&r, ad, lm);
    if (s != MMB_OK) return s;
    bool qwen = strcmp(ad->name, "qwen2") == 0;
    *qkv_bias = qwen || ab;
    *o_bias = !qwen && ab;
    *mlp_bias = !qwen && mb;
    /* Sliding windows: Mistral's on every layer; Qwen2's (use_sliding_window) on the layers layer_types marks
     * "sliding_attention", or from max_window_layers on. */
    if (!(*windows = calloc((size_t)lm->L, sizeof **windows))) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    const cJSON *root = *r.tp ? tc : c->config;
    const cJSON *lt = cJSON_GetObjectItemCaseSensitive(root, "layer_types");
    if (lm->gemma == 3 && lt && (!cJSON_IsArray(lt) || cJSON_GetArraySize(lt) != lm->L))
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %slayer_types is not a list of %lld layer types", c->dir,
                        r.tp, (long long)lm->L);
    for (int64_t l = 0; sw && l < lm->L; l++) {
        const cJSON *e = cJSON_IsArray(lt) ? cJSON_GetArrayItem(lt, (int)l) : NULL;
        if (lm->gemma == 3 && e && (!cJSON_IsString(e) || (strcmp(e->valuestring, "sliding_attention") != 0 &&
                                                      strcmp(e->valuestring, "full_attention") != 0)))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %slayer_types[%lld] is not 'sliding_attention' or "
                            "'full_attention'", c->dir, r.tp, (long long)l);
        bool on = !qwen || (cJSON_IsString(e) ? strcmp(e->valuestring, "sliding_attention") == 0 : l >= mwl);
        /* Gemma 3 without layer_types: every sliding_window_pattern-th layer is global */
        if (lm->gemma == 3) on = e ? strcmp(e->valuestring, "sliding_attention") == 0 : (l + 1) % swp != 0;
        (*windows)[l] = on ? sw : 0;
    }
    /* Mllama: its cross-attention layers sit in the layer list (text_config.cross_attention_layers), and its
     * embedding has 8 rows past the vocabulary (nn.Embedding(vocab_size + 8)) */
    if (strcmp(ad->name, "mllama_text_model") != 0) return MMB_OK;
    lm->embed_only = 8;
    if (!(*replaced = calloc((size_t)lm->L, sizeof **replaced))) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    int xl[256], nx = 0;
    mmb_status s2 = MMB_OK;
    if (!mmb__cfg_ints(ctx, c, *r.tp ? "text_config.cross_attention_layers" : "cross_attention_layers", xl, 256, &nx,
                       &s2))
        return s2 != MMB_OK ? s2 : mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: an Mllama text model without "
                                            "cross_attention_layers", c->dir);
    for (int i = 0; i < nx; i++) {
        if (xl[i] < 0 || xl[i] >= lm->L || (*replaced)[xl[i]])
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: cross_attention_layers[%d] = %d: not a layer index "
                            "in [0, %lld), or repeated", c->dir, i, xl[i], (long long)lm->L);
        (*replaced)[xl[i]] = true;
    }
    return MMB_OK;
}

/* Where the text model's weights are: the prefix of its embed_tokens.weight, or NULL. */
static const char *find_prefix(const mmb_ckpt *c) {
    static const char *const prefixes[] = {"model.language_model.", "language_model.model.", "language_model.",
                                           "lang_encoder.model.", "model.text_model.", "text_model.model.", "model."};
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
        char nm[64];
        snprintf(nm, sizeof nm, "%sembed_tokens.weight", prefixes[i]);
        if (mmb__ckpt_find(c, nm, NULL)) return prefixes[i];
    }
    return NULL;
}

mmb_status mmb_lm_open(mmb_ctx *ctx, const char *dir, mmb_lm **out) {
    if (!ctx || !dir || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_lm_open: NULL argument");
    mmb_lm *lm = calloc(1, sizeof *lm);
    if (!lm) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    int64_t *windows = NULL;
    bool qkv_bias = false, o_bias = false, mlp_bias = false, tied = false, *replaced = NULL;
    mmb_status s = mmb__ckpt_open(ctx, dir, &lm->ck);
    if (s == MMB_OK) s = read_config(ctx, lm, &qkv_bias, &o_bias, &mlp_bias, &tied, &windows, &replaced);
    if (s != MMB_OK) goto fail;
    char nm[512];
    const char *prefix = find_prefix(&lm->ck);
    if (prefix && !(lm->prefix = strdup(prefix))) {
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if (!lm->prefix) {
        s = mmb__err(ctx, MMB_ERR_MISSING, "%s: no text model: tensor 'model.embed_tokens.weight' is missing (also "
                     "looked for it under model.language_model., language_model.model. and language_model.)", dir);
        goto fail;
    }
    /* OpenFlamingo wraps each decoder layer in a FlamingoLayer: layers.{l}.decoder_layer.* */
    snprintf(nm, sizeof nm, "%slayers.0.decoder_layer.input_layernorm.weight", lm->prefix);
    lm->infix = mmb__ckpt_find(&lm->ck, nm, NULL) ? "decoder_layer." : "";
    snprintf(nm, sizeof nm, "%sembed_tokens.weight", lm->prefix);
    if ((s = mmb__lm_bind(ctx, lm, nm, lm->vocab + lm->embed_only, lm->d, &lm->embed)) != MMB_OK) goto fail;
    snprintf(nm, sizeof nm, "%sembed_tokens.additional_embedding.weight", lm->prefix);
    if (lm->extra && (s = mmb__lm_bind(ctx, lm, nm, lm->extra, lm->d, &lm->embed2)) != MMB_OK) goto fail;
    bool top_tied = false; /* Janus: the top level ties (no lm_head in the file), its text_config says not */
    mmb_status ts = MMB_OK;
    if (!tied && !mmb__ckpt_find(&lm->ck, "lm_head.weight", NULL) &&
        !mmb__ckpt_find(&lm->ck, "language_model.lm_head.weight", NULL) &&
        !mmb__ckpt_find(&lm->ck, "text_model.lm_head.weight", NULL) &&
        mmb__cfg_bool(ctx, &lm->ck, "tie_word_embeddings", &top_tied, &ts) && top_tied && !lm->extra)
        tied = true;
    if (tied) {
        lm->head = lm->embed;
        lm->head.n = lm->vocab;
        lm->head2 = lm->embed2;
    } else {
        const char *h = "lm_head.weight", *h2 = "language_model.lm_head.weight";
        if (strcmp(lm->prefix, "language_model.model.") == 0 || strcmp(lm->prefix, "language_model.") == 0) {
            h = h2;
            h2 = "lm_head.weight";
        }
        if (strcmp(lm->prefix, "lang_encoder.model.") == 0) h = "lang_encoder.lm_head.weight";
        if (strcmp(lm->prefix, "text_model.model.") == 0) h = "text_model.lm_head.weight"; /* Emu3's saved layout */
        if (!mmb__ckpt_find(&lm->ck, h, NULL) && mmb__ckpt_find(&lm->ck, h2, NULL)) h = h2;
        if ((s = mmb__lm_bind(ctx, lm, h, lm->vocab, lm->d, &lm->head)) != MMB_OK) goto fail;
        snprintf(nm, sizeof nm, "%.*sadditional_fc.weight", (int)(strlen(h) - strlen("weight")), h);
        if (lm->extra && (s = mmb__lm_bind(ctx, lm, nm, lm->extra, lm->d, &lm->head2)) != MMB_OK) goto fail;
    }
    snprintf(nm, sizeof nm, "%snorm.weight", lm->prefix);
    if ((s = mmb__ckpt_vec(ctx, &lm->ck, nm, lm->d, &lm->norm)) != MMB_OK) goto fail;
    if (!(lm->layers = calloc((size_t)lm->L, sizeof *lm->layers)) ||
        !(lm->inv_freq = malloc(sizeof(float) * (size_t)(lm->hd / 2)))) {
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        goto fail;
    }
    rope_inv_freq(lm, 0, lm->inv_freq);
    if (lm->gemma) { /* Gemma's final norm is 1 + w too; the local layers' RoPE has its own (default) base */
        for (int64_t e = 0; e < lm->d; e++) lm->norm[e] = 1.0f + lm->norm[e];
        if (lm->gemma == 3 && !(lm->inv_local = malloc(sizeof(float) * (size_t)(lm->hd / 2)))) {
            s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
            goto fail;
        }
        for (int64_t i = 0; lm->inv_local && i < lm->hd / 2; i++)
            lm->inv_local[i] = 1.0f / powf((float)lm->local_theta, (float)(2 * i) / (float)lm->hd);
    }
    const layer_scheme *sc = &schemes[sizeof schemes / sizeof schemes[0] - 1];
    for (size_t i = 0; i + 1 < sizeof schemes / sizeof schemes[0]; i++) {
        int l0 = 0;
        while (replaced && l0 < lm->L - 1 && replaced[l0]) l0++;
        snprintf(nm, sizeof nm, "%slayers.%d.%s%s.weight", lm->prefix, l0, lm->infix, schemes[i].probe);
        if (mmb__ckpt_find(&lm->ck, nm, NULL)) sc = &schemes[i];
    }
    lm->experts = sc->sets;
    int64_t bytes = wbytes(&lm->head) + (lm->extra ? wbytes(&lm->head2) : 0) + lm->d * 4,
            params = (lm->vocab + lm->extra) * lm->d * (tied ? 1 : 2) + lm->embed_only * lm->d + lm->d;
    for (int l = 0; l < lm->L; l++) {
        lm_layer *y = &lm->layers[l];
        if (replaced && replaced[l]) { /* its hook binds its weights */
            y->replaced = true;
            lm->info.n_replaced++;
            continue;
        }
        if ((s = bind_layer(ctx, lm, l, sc, qkv_bias, o_bias, mlp_bias)) != MMB_OK) goto fail;
        y->window = windows[l];
        y->local = lm->gemma == 3 && windows[l] > 0;
        y->slot = l - lm->info.n_replaced;
        const mmb_wmat *ws[] = {&y->q, &y->k, &y->v, &y->o, &y->gate, &y->up, &y->down};
        for (int i = 0; i < 7; i++) {
            bytes += wbytes(ws[i]);
            params += ws[i]->n * ws[i]->k;
        }
        params += 2 * lm->d + (y->bq ? (lm->H + 2 * lm->KVH) * lm->hd : 0) + (y->bo ? lm->d : 0) +
                  (y->bgate ? 2 * lm->I + lm->d : 0);
        bytes += 8 * lm->d;
    }
    free(windows);
    free(replaced);
    mmb_lm_info *in = &lm->info; /* image_token, eos and n_replaced: read_special, the layers */
    in->embed_rows = lm->vocab + lm->extra + lm->embed_only;
    in->architecture = lm->architecture;
    in->prefix = lm->prefix;
    in->rope_type = rope_names[lm->rope];
    in->vocab = lm->vocab + lm->extra;
    in->d_model = lm->d;
    in->layers = lm->L;
    in->heads = lm->H;
    in->kv_heads = lm->KVH;
    in->head_dim = lm->hd;
    in->intermediate = lm->I;
    in->max_positions = lm->mpe;
    if (lm->rope == ROPE_LINEAR || lm->rope == ROPE_DYNAMIC) in->max_positions = (int64_t)((double)lm->mpe * lm->factor);
    in->rope_theta = lm->theta;
    in->rms_eps = lm->eps;
    in->tied = tied;
    in->weight_dtype = lm->embed.dtype;
    in->params = params + lm->expert_params + lm->qk_params;
    in->bytes_per_token = bytes;
    *out = lm;
    return MMB_OK;
fail:
    free(windows);
    free(replaced);
    mmb_lm_free(lm);
    return s;
}

mmb_status mmb_lm_get_info(const mmb_lm *lm, mmb_lm_info *out) {
    if (!lm || !out) return MMB_ERR_ARG;
    *out = lm->info;
    return MMB_OK;
}

mmb_status mmb__lm_set_hooks(mmb_ctx *ctx, mmb_lm *lm, const mmb_lm_hook *hooks) {
    if (!lm) return mmb__err(ctx, MMB_ERR_ARG, "mmb__lm_set_hooks: NULL model");
    free(lm->hooks);
    lm->hooks = NULL;
    if (!hooks) return MMB_OK;
    if (!(lm->hooks = malloc(sizeof *hooks * (size_t)lm->L))) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    memcpy(lm->hooks, hooks, sizeof *hooks * (size_t)lm->L);
    return MMB_OK;
}

mmb_status mmb_lm_embed(mmb_ctx *ctx, const mmb_lm *lm, const int32_t *ids, int64_t n, float *out) {
    if (!lm || !ids || !out || n < 1) return mmb__err(ctx, MMB_ERR_ARG, "mmb_lm_embed: NULL argument or n < 1");
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= lm->info.embed_rows)
            return mmb__err(ctx, MMB_ERR_ARG, "token id %d at position %lld is outside the vocabulary [0, %lld)",
                            (int)ids[i], (long long)i, (long long)lm->info.embed_rows);
    for (int64_t i = 0; i < n; i++) { /* IDEFICS' decoupled embedding: ids from vocab on are the additional rows */
        bool second = lm->extra && ids[i] >= lm->vocab;
        const mmb_wmat *e = second ? &lm->embed2 : &lm->embed;
        int64_t row = second ? ids[i] - lm->vocab : ids[i];
        mmb_to_f32(out + i * lm->d, (const unsigned char *)e->data + (size_t)(row * lm->d) * mmb_dtype_size(e->dtype),
                   e->dtype, (size_t)lm->d);
        if (lm->embed_scale != 1.0f) /* Gemma: embed_tokens(ids) * sqrt(hidden_size) */
            for (int64_t c = 0; c < lm->d; c++) out[i * lm->d + c] *= lm->embed_scale;
    }
    return MMB_OK;
}

/* ---- the KV cache ------------------------------------------------------------------------------- */

mmb_status mmb_kv_cache_new(mmb_ctx *ctx, const mmb_lm *lm, int64_t max_tokens, mmb_kv_cache **out) {
    if (!lm || !out || max_tokens < 1) return mmb__err(ctx, MMB_ERR_ARG, "mmb_kv_cache_new: NULL or max_tokens < 1");
    if (max_tokens > lm->info.max_positions)
        return mmb__err(ctx, MMB_ERR_SHAPE, "context overflow: %lld tokens asked, the model's limit is %lld positions",
                        (long long)max_tokens, (long long)lm->info.max_positions);
    uint64_t n;
    /* no entries for the replaced layers (Mllama's cross-attention ones keep their visual keys themselves) */
    const int64_t L = lm->L - lm->info.n_replaced;
    if (!mmb__mul_ok((uint64_t)(L * lm->KVH * lm->hd), (uint64_t)max_tokens, &n) || n > ((uint64_t)1 << 40))
        return mmb__err(ctx, MMB_ERR_NOMEM, "KV cache of %lld tokens is too large", (long long)max_tokens);
    mmb_kv_cache *kv = calloc(1, sizeof *kv);
    if (kv) {
        kv->k = malloc(n * sizeof(float));
        kv->v = malloc(n * sizeof(float));
    }
    if (!kv || !kv->k || !kv->v) {
        mmb_kv_cache_free(kv);
        return mmb__err(ctx, MMB_ERR_NOMEM, "KV cache of %lld tokens: cannot allocate %.1f MB", (long long)max_tokens,
                        2.0 * (double)n * 4 / 1e6);
    }
    kv->lm = lm;
    kv->cap = max_tokens;
    *out = kv;
    return MMB_OK;
}

void mmb_kv_cache_free(mmb_kv_cache *kv) {
    if (!kv) return;
    free(kv->k);
    free(kv->v);
    free(kv);
}

void mmb_kv_cache_reset(mmb_kv_cache *kv) {
    if (kv) kv->len = kv->shift = 0;
}

int64_t mmb_kv_cache_len(const mmb_kv_cache *kv) { return kv ? kv->len : 0; }

/* ---- the forward job ---------------------------------------------------------------------------- */

typedef struct fwd_job {
    const mmb_lm *lm;
    mmb_kv_cache *kv;
    int64_t M, pos0;           /* rows of this block, position of the first */
    float *x, *xn, *qkv, *att, *gu, *h, *cosb, *sinb, *logits;
    float *cosl, *sinl;        /* Gemma 3's local layers' RoPE (their own base), or NULL */
    const uint8_t *expert;     /* (M) each row's weight set, or NULL: set 0 */
    int64_t head_rows;         /* rows of x the head reads: the last head_rows of the block */
    float *hidden;             /* the last row's final-normed hidden state goes here (d), or NULL */
    float *scratch;            /* per thread: per_thread floats */
    size_t per_thread;
    int64_t wscr;              /* of which the products' share; the rest is attention scores */
    int64_t sc_len;            /* of which the scores' share; then hd floats of the adapter prompt's output */
    int s0, s1;                /* steps [s0, s1) */
    mmb_barrier bar;
} fwd_job;

static void mm_units(const fwd_job *j, int tid, int nth, const float *x, int64_t ldx, int64_t M,
                     const mmb_wmat_out *o, int n, int acc) {
    mmb__wmat_share(tid, nth, x, ldx, M, o, n, acc, j->scratch + j->per_thread * (size_t)tid);
}

/* The weight set of row r0 of the block, and in *r1 the end of the run of rows that share it. */
static const lm_layer *set_of(const fwd_job *j, const lm_layer *y, int64_t r0, int64_t r1max, int64_t *r1) {
    int64_t e = r0 + 1;
    if (!j->expert) e = r1max;
    else
        while (e < r1max && j->expert[e] == j->expert[r0]) e++;
    *r1 = e;
    return j->expert && j->expert[r0] ? y->alt : y;
}

/* xn rows [r0, r1) = rmsnorm(x) with the weight of each row's set (which: 0 input, 1 post-attention norm),
 * or with w for all (y NULL: the final norm). */
static void rms_rows(const fwd_job *j, int tid, int nth, const lm_layer *y, int which, const float *w, int64_t r0,
                     int64_t r1) {
    int64_t lo, hi, d = j->lm->d;
    mmb__split(r1 - r0, tid, nth, &lo, &hi);
    for (int64_t a = r0 + lo, b; a < r0 + hi; a = b) {
        const lm_layer *z = y ? set_of(j, y, a, r0 + hi, &b) : NULL;
        if (!y) b = r0 + hi;
        mmb__rmsnorm_forward(j->xn + a * d, j->x + a * d, z ? (which ? z->ln2 : z->ln1) : w, b - a, d, j->lm->eps);
    }
}

MMB_SIMD_CLONES void mmb__lm_attend(float *out, float *lse, const float *q, const float *K, const float *V,
                                    int64_t ld, int64_t k0, int64_t k1, int64_t hd, float scale, float *sc) {
    float mx = -INFINITY;
    for (int64_t t = k0; t < k1; t++) {
        const float *kr = K + t * ld;
        float s = 0;
        for (int64_t e = 0; e < hd; e++) s += q[e] * kr[e];
        s *= scale;
        sc[t - k0] = s;
        if (s > mx) mx = s;
    }
    float sum = 0;
    for (int64_t t = k0; t < k1; t++) sum += sc[t - k0] = expf(sc[t - k0] - mx);
    float inv = 1.0f / sum;
    for (int64_t e = 0; e < hd; e++) out[e] = 0;
    for (int64_t t = k0; t < k1; t++) {
        const float *vr = V + t * ld;
        float p = sc[t - k0] * inv;
        for (int64_t e = 0; e < hd; e++) out[e] += p * vr[e];
    }
    if (lse) *lse = mx + logf(sum);
}

/* F.layer_norm over one head's hd values (eps 1e-5, as ChameleonLayerNorm), then * w + b, in place. */
static void head_norm(float *x, const float *w, const float *b, int64_t hd) {
    double mean = 0, var = 0;
    for (int64_t e = 0; e < hd; e++) mean += x[e];
    mean /= (double)hd;
    for (int64_t e = 0; e < hd; e++) var += (x[e] - mean) * (x[e] - mean);
    float rs = (float)(1.0 / sqrt(var / (double)hd + 1e-5));
    for (int64_t e = 0; e < hd; e++) x[e] = ((float)(x[e] - mean) * rs) * w[e] + b[e];
}

/* x += rmsnorm(xn) for every row with weight w, xn holding the block's attention or MLP output: swin_norm
 * (the layer's input or post-attention RMSNorm) and Gemma 3's post-attention / post-feedforward norms. */
static void norm_add(fwd_job *j, int tid, int nth, const float *w) {
    int64_t lo, hi, d = j->lm->d;
    mmb__split(j->M, tid, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        float *t = j->xn + i * d, *x = j->x + i * d;
        mmb__rmsnorm_forward(t, t, w, 1, d, j->lm->eps);
        for (int64_t e = 0; e < d; e++) x[e] += t[e];
    }
    mmb__barrier_wait(&j->bar);
}

/* Gemma 2/3's attention: softmax(cap * tanh(q K^T * scale / cap)) V over keys [k0, k1) (as mmb__lm_attend). */
static void attend_capped(float *out, const float *q, const float *K, const float *V, int64_t ld, int64_t k0,
                          int64_t k1, int64_t hd, float scale, float cap, float *sc) {
    float mx = -INFINITY;
    for (int64_t t = k0; t < k1; t++) {
        const float *kr = K + t * ld;
        float s = 0;
        for (int64_t e = 0; e < hd; e++) s += q[e] * kr[e];
        s = tanhf(s * scale / cap) * cap;
        sc[t - k0] = s;
        if (s > mx) mx = s;
    }
    float sum = 0;
    for (int64_t t = k0; t < k1; t++) sum += sc[t - k0] = expf(sc[t - k0] - mx);
    float inv = 1.0f / sum;
    for (int64_t e = 0; e < hd; e++) out[e] = 0;
    for (int64_t t = k0; t < k1; t++) {
        const float *vr = V + t * ld;
        float p = sc[t - k0] * inv;
        for (int64_t e = 0; e < hd; e++) out[e] += p * vr[e];
    }
}

/* rotate_half RoPE in place on one head: x[i], x[i + hd/2] by the angle of frequency i. */
static void rope_head(float *x, const float *c, const float *s, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i] + a * s[i];
    }
}

static void attn_half(fwd_job *j, int tid, int nth, int l) {
    const mmb_lm *lm = j->lm;
    const lm_layer *y = &lm->layers[l];
    const int64_t M = j->M, d = lm->d, hd = lm->hd, H = lm->H, KVH = lm->KVH, half = hd / 2;
    const int64_t qd = H * hd, kd = KVH * hd, ldq = qd + 2 * kd, cap = j->kv->cap;
    const size_t at = (size_t)y->slot * (size_t)(KVH * cap * hd);
    float *Kc = j->kv->k + at, *Vc = j->kv->v + at;
    const float *in = lm->swin ? j->x : j->xn; /* swin_norm: the projections read the residual stream itself */
    if (!lm->swin) {
        rms_rows(j, tid, nth, y, 0, NULL, 0, M);
        mmb__barrier_wait(&j->bar);
    }
    for (int64_t r0 = 0, r1; r0 < M; r0 = r1) { /* each run of rows through its set's projections */
        const lm_layer *w = set_of(j, y, r0, M, &r1);
        float *q = j->qkv + r0 * ldq;
        mmb_wmat_out o[3] = {{&w->q, w->bq, q, ldq}, {&w->k, w->bk, q + qd, ldq}, {&w->v, w->bv, q + qd + kd, ldq}};
        mm_units(j, tid, nth, in + r0 * d, d, r1 - r0, o, 3, 0);
    }
    mmb__barrier_wait(&j->bar);
    int64_t lo, hi;
    mmb__split(M * (H + KVH), tid, nth, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) { /* RoPE on q and k heads; k and v into the cache */
        int64_t i = it / (H + KVH), hh = it % (H + KVH), pos = j->pos0 + i;
        float *row = j->qkv + i * ldq;
        if (y->qn) /* Chameleon: each head's LayerNorm before RoPE */
            head_norm(row + hh * hd, hh < H ? y->qn + hh * hd : y->kn + (hh - H) * hd,
                      hh < H ? y->qnb + hh * hd : y->knb + (hh - H) * hd, hd);
        if (y->gqn) /* Gemma 3: each head's RMSNorm (one weight for all heads) before RoPE */
            mmb__rmsnorm_forward(row + hh * hd, row + hh * hd, hh < H ? y->gqn : y->gkn, 1, hd, lm->eps);
        if (y->local) rope_head(row + hh * hd, j->cosl + i * half, j->sinl + i * half, half);
        else rope_head(row + hh * hd, j->cosb + i * half, j->sinb + i * half, half);
        if (hh >= H) {
            int64_t kh = hh - H;
            memcpy(Kc + (kh * cap + pos) * hd, row + qd + kh * hd, sizeof(float) * (size_t)hd);
            memcpy(Vc + (kh * cap + pos) * hd, row + qd + kd + kh * hd, sizeof(float) * (size_t)hd);
        }
    }
    mmb__barrier_wait(&j->bar);
    float *sc = j->scratch + j->per_thread * (size_t)tid + j->wscr, *pa = sc + j->sc_len;
    float scale = lm->attn_scale > 0 ? lm->attn_scale : (float)(1.0 / sqrt((double)hd));
    mmb__split(M * H, tid, nth, &lo, &hi);
    for (int64_t it = lo; it < hi; it++) {
        int64_t i = it / H, h = it % H, kh = h / (H / KVH), pos = j->pos0 + i;
        int64_t k0 = y->window && pos + 1 > y->window ? pos + 1 - y->window : 0;
        float *out = j->att + i * qd + h * hd;
        const float *q = j->qkv + i * ldq + h * hd;
        if (lm->attn_softcap > 0)
            attend_capped(out, q, Kc + kh * cap * hd, Vc + kh * cap * hd, hd, k0, pos + 1, hd, scale, lm->attn_softcap,
                          sc);
        else mmb__lm_attend(out, NULL, q, Kc + kh * cap * hd, Vc + kh * cap * hd, hd, k0, pos + 1, hd, scale, sc);
        if (y->plen) { /* LLaMA-Adapter: the prompt's own softmax, gated, added before o_proj */
            mmb__lm_attend(pa, NULL, q, y->pk + kh * y->plen * hd, y->pv + kh * y->plen * hd, hd, 0, y->plen, hd, scale,
                           sc);
            for (int64_t e = 0; e < hd; e++) out[e] += y->pgate[h] * pa[e];
        }
    }
    mmb__barrier_wait(&j->bar);
    for (int64_t r0 = 0, r1; r0 < M; r0 = r1) {
        const lm_layer *w = set_of(j, y, r0, M, &r1);
        const bool apart = lm->swin || lm->gemma == 3; /* the output normed before it is added */
        mmb_wmat_out oo = {&w->o, w->bo, (apart ? j->xn : j->x) + r0 * d, d};
        mm_units(j, tid, nth, j->att + r0 * qd, qd, r1 - r0, &oo, 1, !apart);
        if (w->bo && y->pbias2) { /* PEFT's o_proj on the adapter's output adds the bias again */
            mmb__barrier_wait(&j->bar); /* the product's columns are split over the threads, these rows are not */
            mmb__split(r1 - r0, tid, nth, &lo, &hi);
            for (int64_t i = r0 + lo; i < r0 + hi; i++)
                for (int64_t e = 0; e < d; e++) j->x[i * d + e] += w->bo[e];
        }
    }
    mmb__barrier_wait(&j->bar);
    if (lm->swin) norm_add(j, tid, nth, y->ln1);
    if (y->post_attn) norm_add(j, tid, nth, y->post_attn);
}

static void mlp_half(fwd_job *j, int tid, int nth, int l) {
    const mmb_lm *lm = j->lm;
    const lm_layer *y = &lm->layers[l];
    const int64_t M = j->M, d = lm->d, I = lm->I;
    if (!lm->swin) {
        rms_rows(j, tid, nth, y, 1, NULL, 0, M);
        mmb__barrier_wait(&j->bar);
    }
    for (int64_t r0 = 0, r1; r0 < M; r0 = r1) {
        const lm_layer *w = set_of(j, y, r0, M, &r1);
        /* gate and up over the same columns on one thread, so SwiGLU needs no barrier */
        int64_t Mr = r1 - r0, g = Mr <= MMB_WMAT_GEMV_MAX ? 8 : MMB_GEMM_OWN_NR, lo, hi;
        mmb__split((I + g - 1) / g, tid, nth, &lo, &hi);
        int64_t n0 = lo * g, n1 = hi * g < I ? hi * g : I;
        if (n1 <= n0) continue;
        float *scr = j->scratch + j->per_thread * (size_t)tid, *gu = j->gu + r0 * 2 * I;
        const float *in = (lm->swin ? j->x : j->xn) + r0 * d;
        mmb__wmat_part(gu + n0, 2 * I, in, d, Mr, &w->gate, w->bgate, n0, n1, 0, scr);
        mmb__wmat_part(gu + I + n0, 2 * I, in, d, Mr, &w->up, w->bup, n0, n1, 0, scr);
        for (int64_t m = 0; m < Mr; m++) {
            const float *gr = gu + m * 2 * I, *ur = gr + I;
            float *hr = j->h + (r0 + m) * I;
            if (lm->gemma) /* GeGLU: gelu_pytorch_tanh(gate) * up */
                for (int64_t c = n0; c < n1; c++) {
                    float g = gr[c];
                    hr[c] = 0.5f * g * (1.0f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g))) * ur[c];
                }
            else
                for (int64_t c = n0; c < n1; c++) hr[c] = gr[c] / (1.0f + expf(-gr[c])) * ur[c];
        }
    }
    mmb__barrier_wait(&j->bar);
    for (int64_t r0 = 0, r1; r0 < M; r0 = r1) {
        const lm_layer *w = set_of(j, y, r0, M, &r1);
        const bool apart = lm->swin || lm->gemma == 3;
        mmb_wmat_out o = {&w->down, w->bdown, (apart ? j->xn : j->x) + r0 * d, d};
        mm_units(j, tid, nth, j->h + r0 * I, I, r1 - r0, &o, 1, !apart);
    }
    mmb__barrier_wait(&j->bar);
    if (lm->swin) norm_add(j, tid, nth, y->ln2);
    if (y->post_ffn) norm_add(j, tid, nth, y->post_ffn);
}

static void head_step(fwd_job *j, int tid, int nth) {
    const mmb_lm *lm = j->lm;
    int64_t r0 = j->M - j->head_rows;
    rms_rows(j, tid, nth, NULL, 0, lm->norm, r0, j->M);
    mmb__barrier_wait(&j->bar);
    if (j->hidden && tid == 0) memcpy(j->hidden, j->xn + (j->M - 1) * lm->d, sizeof(float) * (size_t)lm->d);
    if (!j->logits) return;
    const int64_t V = lm->vocab + lm->extra; /* IDEFICS' decoupled head: the additional logits after the others */
    mmb_wmat_out o[2] = {{&lm->head, NULL, j->logits, V}, {&lm->head2, NULL, j->logits + lm->vocab, V}};
    mm_units(j, tid, nth, j->xn + r0 * lm->d, lm->d, j->head_rows, o, lm->extra ? 2 : 1, 0);
    mmb__barrier_wait(&j->bar);
    if (lm->final_softcap > 0) { /* Gemma3ForCausalLM: cap * tanh(logits / cap) */
        int64_t lo, hi, n = j->head_rows * V;
        mmb__split(n, tid, nth, &lo, &hi);
        for (int64_t i = lo; i < hi; i++) j->logits[i] = tanhf(j->logits[i] / lm->final_softcap) * lm->final_softcap;
        mmb__barrier_wait(&j->bar);
    }
}

static void fwd_worker(void *arg, int tid, int nth) {
    fwd_job *j = arg;
    int L2 = (int)(2 * j->lm->L);
    for (int s = j->s0; s < j->s1; s++) {
        if (s < L2 && j->lm->layers[s / 2].replaced) continue; /* its hook ran it */
        if (s == L2) head_step(j, tid, nth);
        else if (s % 2 == 0) attn_half(j, tid, nth, s / 2);
        else mlp_half(j, tid, nth, s / 2);
    }
}

/* The hook that runs before step s, or NULL. */
typedef mmb_status (*hook_fn)(mmb_ctx *, void *, int, float *, int64_t, int64_t);
static hook_fn hook_at(const mmb_lm *lm, int s) {
    if (!lm->hooks || s >= 2 * lm->L) return NULL;
    const mmb_lm_hook *h = &lm->hooks[s / 2];
    return s % 2 ? h->after_attention : h->before_layer;
}

mmb_status mmb_lm_forward(mmb_ctx *ctx, const mmb_lm *lm, mmb_kv_cache *kv, const float *embeds, int64_t n,
                          float *logits, int last_only) {
    return mmb__lm_forward_rows(ctx, lm, kv, embeds, n, logits, last_only, NULL);
}

mmb_status mmb__lm_forward_rows(mmb_ctx *ctx, const mmb_lm *lm, mmb_kv_cache *kv, const float *embeds, int64_t n,
                                float *logits, int last_only, const mmb__lm_rows *rows) {
    if (!ctx || !lm || !kv || !embeds || n < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_lm_forward: NULL argument or n < 1");
    mmb_status vs = mmb__ckpt_verify(ctx, &lm->ck);  /* truncated since open: MMB_ERR_IO, not SIGBUS */
    if (vs != MMB_OK) return vs;
    const uint8_t *expert = rows ? rows->expert : NULL;
    const int64_t *rope_pos = rows ? rows->rope_pos : NULL;
    for (int64_t i = 0; i < n && (expert || rope_pos); i++) {
        if (expert && expert[i] >= lm->experts)
            return mmb__err(ctx, MMB_ERR_ARG, "row %lld asks for weight set %d; the model has %d", (long long)i,
                            (int)expert[i], lm->experts);
        if (rope_pos && rope_pos[i] < 0)
            return mmb__err(ctx, MMB_ERR_ARG, "row %lld: negative RoPE position %lld", (long long)i,
                            (long long)rope_pos[i]);
    }
    if (kv->lm != lm) return mmb__err(ctx, MMB_ERR_ARG, "mmb_lm_forward: the KV cache was made for another model");
    if (n > kv->cap - kv->len)
        return mmb__err(ctx, MMB_ERR_SHAPE,
                        "context overflow: %lld tokens cached + %lld new = %lld, the limit is %lld (KV cache size; "
                        "the model's max_position_embeddings allows %lld)", (long long)kv->len, (long long)n,
                        (long long)(kv->len + n), (long long)kv->cap, (long long)lm->info.max_positions);
    const int64_t d = lm->d, hd = lm->hd, half = hd / 2, I = lm->I;
    const int64_t Mb = n < BLOCK ? n : BLOCK, ldq = (lm->H + 2 * lm->KVH) * hd;
    int nth = mmb__pool_size(ctx->pool);
    int64_t wscr = 0;
    int64_t Ks[3] = {d, lm->H * hd, I};
    for (int i = 0; i < 3; i++) {
        int64_t a = (int64_t)mmb__wmat_scratch(Mb, Ks[i]);
        if (a > wscr) wscr = a;
    }
    wscr = (wscr + 15) / 16 * 16;
    int64_t sc_len = kv->cap;
    for (int64_t l = 0; l < lm->L; l++)
        if (lm->layers[l].plen > sc_len) sc_len = lm->layers[l].plen;
    sc_len = (sc_len + 15) / 16 * 16;
    size_t per = (size_t)(wscr + sc_len + (hd + 15) / 16 * 16);
    size_t sizes[] = {(size_t)(Mb * d), (size_t)(Mb * d), (size_t)(Mb * ldq), (size_t)(Mb * lm->H * hd),
                      (size_t)(Mb * 2 * I), (size_t)(Mb * I), (size_t)(Mb * half), (size_t)(Mb * half),
                      per * (size_t)nth, (size_t)half, (size_t)(Mb * half), (size_t)(Mb * half)};
    enum { NB = sizeof sizes / sizeof sizes[0] };
    size_t total = 0;
    for (int i = 0; i < NB; i++) total += mmb__arena_piece(sizes[i] * sizeof(float));
    mmb_status s = mmb__arena_reserve(ctx, &ctx->arena, total);
    if (s != MMB_OK) return s;
    float *buf[NB];
    for (int i = 0; i < NB; i++) buf[i] = mmb__arena_alloc(&ctx->arena, sizes[i] * sizeof(float));
    fwd_job j = {.lm = lm, .kv = kv, .x = buf[0], .xn = buf[1], .qkv = buf[2], .att = buf[3], .gu = buf[4],
                 .h = buf[5], .cosb = buf[6], .sinb = buf[7], .scratch = buf[8], .per_thread = per, .wscr = wscr,
                 .sc_len = sc_len};
    j.bar.n = nth;
    float *inv = buf[9];
    if (lm->inv_local) j.cosl = buf[10], j.sinl = buf[11];
    if (lm->rope == ROPE_DYNAMIC) rope_inv_freq(lm, kv->len + n, inv);
    else memcpy(inv, lm->inv_freq, sizeof(float) * (size_t)half);
    const int L2 = (int)(2 * lm->L);
    for (int64_t off = 0; off < n && s == MMB_OK; off += Mb) {
        j.M = n - off < Mb ? n - off : Mb;
        j.pos0 = kv->len;
        j.expert = expert ? expert + off : NULL;
        memcpy(j.x, embeds + off * d, sizeof(float) * (size_t)(j.M * d));
        for (int64_t i = 0; i < j.M; i++)
            for (int64_t f = 0; f < half; f++) {
                int64_t rp = rope_pos ? rope_pos[off + i] : j.pos0 + i - kv->shift;
                float a = (float)rp * inv[f];
                j.cosb[i * half + f] = cosf(a);
                j.sinb[i * half + f] = sinf(a);
                if (j.cosl) {
                    float al = (float)rp * lm->inv_local[f];
                    j.cosl[i * half + f] = cosf(al);
                    j.sinl[i * half + f] = sinf(al);
                }
            }
        const bool final = off + j.M == n, want_hidden = rows && rows->hidden && final;
        bool head = (logits && (!last_only || final)) || want_hidden;
        j.head_rows = last_only || !logits ? 1 : j.M;
        j.logits = logits && head ? (last_only ? logits : logits + off * (lm->vocab + lm->extra)) : NULL;
        j.hidden = want_hidden ? rows->hidden : NULL;
        int end = head ? L2 + 1 : L2;
        for (int st = 0; st < end && s == MMB_OK;) {
            hook_fn hk = hook_at(lm, st);
            if (hk) s = hk(ctx, lm->hooks[st / 2].user, st / 2, j.x, j.M, j.pos0);
            if (s != MMB_OK) break;
            int e = st + 1;
            while (e < end && !hook_at(lm, e)) e++;
            j.s0 = st;
            j.s1 = e;
            mmb__pool_run(ctx->pool, fwd_worker, &j);
            st = e;
        }
        if (s == MMB_OK) kv->len += j.M;
        if (s == MMB_OK && rope_pos) kv->shift = kv->len - 1 - rope_pos[off + j.M - 1];
    }
    mmb__arena_reset(&ctx->arena);
    return s;
}

/* ---- for the multimodal model: declared in pipeline/pipeline.h until this floor has its own header (a floor
 * does not include the one above it) ------------------------------------------------------------------- */

bool mmb__lm_present(const mmb_ckpt *c) { return find_prefix(c) != NULL; }

const mmb_ckpt *mmb__lm_ckpt(const mmb_lm *lm) { return &lm->ck; }

bool mmb__lm_replaced(const mmb_lm *lm, int l) { return lm && l >= 0 && l < lm->L && lm->layers[l].replaced; }

int64_t mmb__kv_cache_cap(const mmb_kv_cache *kv) { return kv ? kv->cap : 0; }

int64_t mmb__kv_cache_rope_next(const mmb_kv_cache *kv) { return kv ? kv->len - kv->shift : 0; }

/* ---- type B: expert sets and adapter prompts ------------------------------------------------------------ */

int mmb__lm_experts(const mmb_lm *lm) { return lm ? lm->experts : 0; }

int64_t mmb__lm_expert_params(const mmb_lm *lm) { return lm ? lm->expert_params : 0; }

int64_t mmb__lm_prompt_len(const mmb_lm *lm, int l) { return lm && l >= 0 && l < lm->L ? lm->layers[l].plen : 0; }

typedef struct prompt_job {
    const float *x;
    int64_t M, d;
    mmb_wmat_out o[2];
    float *scratch;
    size_t per;
} prompt_job;

static void prompt_worker(void *arg, int tid, int nth) {
    prompt_job *p = arg;
    mmb__wmat_share(tid, nth, p->x, p->d, p->M, p->o, 2, 0, p->scratch + p->per * (size_t)tid);
}

mmb_status mmb__lm_set_prompt(mmb_ctx *ctx, mmb_lm *lm, int l, const float *prompt, int64_t len, const float *gate,
                              bool o_bias_twice, const mmb_wmat *pk_w, const mmb_wmat *pv_w) {
    if (!ctx || !lm || l < 0 || l >= lm->L || lm->layers[l].replaced || len < 0 || len > 65536 ||
        (prompt && len && !gate))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__lm_set_prompt: bad layer %d, prompt length %lld or NULL gate", l,
                        (long long)len);
    lm_layer *y = &lm->layers[l];
    if (!prompt || !len) {
        free(y->pk), free(y->pv), free(y->pgate);
        y->pk = y->pv = y->pgate = NULL;
        y->plen = 0;
        return MMB_OK;
    }
    const int64_t kd = lm->KVH * lm->hd, hd = lm->hd;
    int nth = mmb__pool_size(ctx->pool);
    size_t per = (mmb__wmat_scratch(len, lm->d) + 15) / 16 * 16;
    float *kv = malloc(sizeof(float) * (size_t)(2 * len * kd)), *pk = malloc(sizeof(float) * (size_t)(len * kd)),
          *pv = malloc(sizeof(float) * (size_t)(len * kd)), *g = malloc(sizeof(float) * (size_t)lm->H),
          *scr = aligned_alloc(64, sizeof(float) * per * (size_t)nth);
    mmb_status s = MMB_OK;
    if (!kv || !pk || !pv || !g || !scr) {
        s = mmb__err(ctx, MMB_ERR_NOMEM, "adapter prompt of layer %d: out of memory", l);
        free(pk), free(pv), free(g);
    } else {
        prompt_job p = {prompt, len, lm->d, {{pk_w ? pk_w : &y->k, y->bk, kv, 2 * kd}, {pv_w ? pv_w : &y->v, y->bv,
                                                                                          kv + kd, 2 * kd}}, scr, per};
        mmb__pool_run(ctx->pool, prompt_worker, &p);
        for (int64_t t = 0; t < len; t++) /* head-major, as the cache: (KVH, len, hd) */
            for (int64_t h = 0; h < lm->KVH; h++) {
                memcpy(pk + (h * len + t) * hd, kv + t * 2 * kd + h * hd, sizeof(float) * (size_t)hd);
                memcpy(pv + (h * len + t) * hd, kv + t * 2 * kd + kd + h * hd, sizeof(float) * (size_t)hd);
            }
        memcpy(g, gate, sizeof(float) * (size_t)lm->H);
        free(y->pk), free(y->pv), free(y->pgate);
        y->pk = pk, y->pv = pv, y->pgate = g, y->plen = len, y->pbias2 = o_bias_twice;
    }
    free(kv);
    free(scr);
    return s;
}

/* ---- for lm/backward.c: a read-only view of the weights (lm.h, "the frozen decoder's backward") --------- */

void mmb__lm_get_view(const mmb_lm *lm, mmb__lm_view *v) {
    *v = (mmb__lm_view){.d = lm->d, .I = lm->I, .H = lm->H, .KVH = lm->KVH, .hd = lm->hd, .vocab = lm->vocab,
                        .L = lm->L, .extra = lm->extra, .eps = lm->eps, .norm = lm->norm, .head = &lm->head,
                        .hooks = lm->hooks != NULL, .experts = lm->experts,
                        .qk_norm_or_swin = lm->swin || lm->qk_params || lm->gemma,
                        .n_replaced = lm->info.n_replaced, .max_positions = lm->info.max_positions};
}

void mmb__lm_get_layer(const mmb_lm *lm, int l, mmb__lm_layer_view *v) {
    const lm_layer *y = &lm->layers[l];
    *v = (mmb__lm_layer_view){.q = &y->q, .k = &y->k, .v = &y->v, .o = &y->o, .gate = &y->gate, .up = &y->up,
                              .down = &y->down, .bq = y->bq, .bk = y->bk, .bv = y->bv, .bo = y->bo,
                              .bgate = y->bgate, .bup = y->bup, .bdown = y->bdown, .ln1 = y->ln1, .ln2 = y->ln2,
                              .window = y->window, .replaced = y->replaced, .prompt = y->plen};
}

void mmb__lm_rope_freqs(const mmb_lm *lm, int64_t seq_len, float *inv) {
    if (lm->rope == ROPE_DYNAMIC) rope_inv_freq(lm, seq_len, inv);
    else memcpy(inv, lm->inv_freq, sizeof(float) * (size_t)(lm->hd / 2));
}
