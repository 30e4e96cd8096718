/* The multimodal model (mmb_mllm): one checkpoint directory opened as a whole, its vision path (image
 * processor, tower, taps, connector: mmb_model, or a vision tower alone), its language model and tokenizer;
 * and images encoded through it. Chunk lists are chunks.c; evaluation and generation, eval.c. */
#include "pipeline.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *mmb_fusion_name(mmb_fusion f) {
    switch (f) {
    case MMB_FUSION_A: return "A";
    case MMB_FUSION_B: return "B";
    case MMB_FUSION_C: return "C";
    case MMB_FUSION_D: return "D";
    case MMB_FUSION_NONE: break;
    }
    return "none";
}

mmb_mllm_params mmb_mllm_default_params(void) { return (mmb_mllm_params){0}; }

static bool dense_set(const mmb_dense_params *d) {
    return d->type || d->use_final || d->n_layers || d->n_groups || d->pool || d->tokens;
}

/* The caller's Dense Connector settings over the checkpoint's own (mmb_mllm_params.dense). */
static mmb_status apply_dense(mmb_ctx *ctx, mmb_mllm *m, const mmb_dense_params *q) {
    if (!dense_set(q)) return MMB_OK;
    mmb_dense_params d = mmb_model_dense(m->model);
    if (q->type) d.type = q->type;
    if (!d.type)
        return mmb__err(ctx, MMB_ERR_ARG, "%s has no Dense Connector: dense layers, groups, pool and tokens need a "
                        "dense type (sti, sci or dci)", m->dir);
    if (q->n_layers || q->use_final) {
        d.use_final = q->use_final;
        d.final_layer = q->final_layer;
    }
    if (q->n_layers) {
        d.n_layers = q->n_layers;
        memcpy(d.layers, q->layers, sizeof d.layers);
    }
    if (q->n_groups) {
        d.n_groups = q->n_groups;
        memcpy(d.group_first, q->group_first, sizeof d.group_first);
        memcpy(d.group_last, q->group_last, sizeof d.group_last);
    }
    if (q->pool) d.pool = q->pool;
    if (q->tokens) d.tokens = q->tokens;
    return mmb_model_set_dense(ctx, m->model, &d);
}

/* The image processor: the directory's, else the vision tower directory's (the one given, or the family's
 * own: mmb__model_processor_dir), else the family's built-in one (mmb__model_processor); none (the reason kept for encode's
 * message) when neither has one. LLaVA's "pad" aspect mode pads to a square first. */
static mmb_status load_processor(mmb_ctx *ctx, mmb_mllm *m, const char *tower_dir, bool pad) {
    mmb_status s = mmb_preprocess_load(ctx, m->dir, &m->proc);
    if (s == MMB_ERR_IO && tower_dir) s = mmb_preprocess_load(ctx, tower_dir, &m->proc);
    if (s == MMB_ERR_IO && m->model && mmb__model_processor(ctx, m->model, &m->proc) == MMB_OK) s = MMB_OK;
    if (s == MMB_ERR_IO) {
        snprintf(m->no_proc, sizeof m->no_proc, "%s", mmb_ctx_error(ctx));
        return MMB_OK;
    }
    if (s != MMB_OK) return s;
    if (pad) m->proc.do_pad = 1;
    m->info.has_processor = 1;
    m->info.processor = m->proc.type;
    return MMB_OK;
}

/* The language model's tokenizer (none without tokenizer.json: the reason is kept) and the stop ids: the
 * LLM's eos ids, then the tokenizer's (mmb_tokenizer_stop_ids), each once. The image marker: the config's
 * image token, else the row's marker as the tokenizer has it. */
static mmb_status load_tokenizer(mmb_ctx *ctx, mmb_mllm *m, const mmb__family *row) {
    mmb_lm_info li;
    mmb_lm_get_info(m->lm, &li);
    mmb_status s = mmb_tokenizer_open(ctx, m->dir, &m->tok);
    if (s == MMB_ERR_IO) snprintf(m->no_tok, sizeof m->no_tok, "%s", mmb_ctx_error(ctx));
    else if (s != MMB_OK) return s;
    int32_t ids[8 + 8];
    int n = li.n_eos < 8 ? li.n_eos : 8;
    memcpy(ids, li.eos, sizeof(int32_t) * (size_t)n);
    int nt = mmb_tokenizer_stop_ids(m->tok, ids + n, 8);
    n += nt < 8 ? nt : 8;
    for (int i = 0; i < n; i++) {
        bool dup = false;
        for (int k = 0; k < m->n_eos; k++) dup |= m->eos[k] == ids[i];
        if (!dup) m->eos[m->n_eos++] = ids[i];
    }
    int32_t img = li.image_token;
    if (img < 0 && row->image_marker && m->tok) img = mmb_tokenizer_token_id(m->tok, row->image_marker);
    /* a marker the tokenizer has no token for stays text: the prompt is cut there (tokenizer_image_token) */
    const char *marker = img >= 0 ? mmb_tokenizer_token_text(m->tok, img) : m->tok && !row->xattn ? row->image_marker
                                                                                                  : NULL;
    m->info.image_marker = marker ? marker : "";
    m->info.image_token = img;
    m->info.has_tokenizer = m->tok != NULL;
    m->info.has_chat_template = mmb__tokenizer_chat_template(m->tok, NULL) != NULL;
    return MMB_OK;
}

/* The info that follows from the parts and the row that opened them. */
static void fill_info(mmb_mllm *m, const mmb__family *row) {
    mmb_mllm_info *in = &m->info;
    mmb_model_info mi = {0};
    if (m->model) mmb_model_get_info(m->model, &mi);
    bool family = m->model && strcmp(mi.family, "llava") != 0;
    in->has_vision = m->vit || family;
    in->has_connector = m->model != NULL;
    in->has_lm = m->lm != NULL;
    in->fusion = m->lm && m->model ? row->fusion : MMB_FUSION_NONE;
    if (m->vit) {
        mmb_vit_info vi;
        mmb_vit_get_info(m->vit, &vi);
        in->vision_layers = vi.layers;
        in->vision_width = vi.width;
        in->vision_tokens = vi.tokens;
        in->image_size = vi.image_size;
        in->out_width = vi.width;
        in->tokens_per_image = vi.tokens;
    }
    if (m->model) {
        if (!m->vit) {
            in->vision_layers = mi.vision_layers;
            in->vision_width = mi.vision_width;
            in->image_size = mi.image_size;
        }
        in->out_width = mi.out_width;
        in->tokens_per_image = mi.tokens_per_image;
    }
    if (m->lm) {
        mmb_lm_info li;
        mmb_lm_get_info(m->lm, &li);
        in->context = li.max_positions;
    }
    const mmb_vq *vq = mmb_mllm_vq(m);
    mmb_vq_info vi;
    if (vq && mmb_vq_get_info(vq, &vi) == MMB_OK) {
        in->vq_codebook = vi.codebook_size;
        in->vq_downsample = vi.downsample;
        const void *st = NULL;
        const mmb_family_ops *fo = mmb__model_fam_ops(m->model, &st);
        in->vq_encodes = fo->encode_ids != NULL;
        in->vq_decodes = fo->gen_info != NULL && vi.has_decoder;
    }
}

const mmb_vq *mmb_mllm_vq(const mmb_mllm *m) {
    const void *st = NULL;
    const mmb_family_ops *fo = m ? mmb__model_fam_ops(m->model, &st) : NULL;
    return fo && fo->vq ? fo->vq(st) : NULL;
}

/* Opens what the family table's row for m->dir says the directory holds: a tower alone, a language model
 * alone, or a model whose vision path mmb_model_open builds (with its LLM when the row runs it). */
static mmb_status build(mmb_ctx *ctx, mmb_mllm *m, const cJSON *cfg, const char *where, const mmb_mllm_params *p) {
    const cJSON *archs = cJSON_GetObjectItemCaseSensitive(cfg, "architectures");
    const cJSON *mtj = cJSON_GetObjectItemCaseSensitive(cfg, "model_type");
    const char *arch = cJSON_IsArray(archs) && cJSON_IsString(archs->child) ? archs->child->valuestring : "";
    const char *mt = cJSON_IsString(mtj) ? mtj->valuestring : "";
    snprintf(m->arch, sizeof m->arch, "%s", arch[0] ? arch : mt);
    mmb_mllm_info *in = &m->info;
    in->dir = m->dir;
    in->architecture = m->arch;
    in->image_marker = in->processor = "";
    in->image_token = -1;
    const mmb__family *row;
    mmb_status s = mmb__family_match_config(ctx, cfg, where, &row);
    if (s != MMB_OK) return s;
    in->family = row->name;
    bool tuned = p->vision_tower || dense_set(&p->dense);
    if ((row->vision_only || row->text_only) && tuned)
        return mmb__err(ctx, MMB_ERR_ARG, "%s: a %s alone takes no vision_tower or dense parameters (they apply to "
                        "LLaVA models)", m->dir, row->vision_only ? "vision tower" : "language model");
    if (row->vision_only) {
        if ((s = mmb_vit_open(ctx, m->dir, &m->vit_only)) != MMB_OK) return s;
        m->vit = m->vit_only;
    } else if (!row->text_only) {
        if ((s = mmb_model_open(ctx, m->dir, &m->model)) != MMB_OK) return s;
        if (row->ops && tuned)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a %s model brings its own tower and connector; "
                            "vision_tower and dense apply to LLaVA models", m->dir, row->name);
        if ((s = apply_dense(ctx, m, &p->dense)) != MMB_OK) return s;
        if (p->vision_tower) {
            mmb_vit *v = NULL;
            if ((s = mmb_vit_open(ctx, p->vision_tower, &v)) != MMB_OK) return s;
            if ((s = mmb_model_attach_vit(ctx, m->model, v)) != MMB_OK) {
                mmb_vit_free(v);
                return s;
            }
        }
        m->vit = mmb_model_vit(m->model);
        mmb_model_info mi;
        mmb_model_get_info(m->model, &mi);
        const char *tower_dir = p->vision_tower ? p->vision_tower : mmb__model_processor_dir(m->model);
        if ((s = load_processor(ctx, m, tower_dir, mi.pad_to_square)) != MMB_OK) return s;
        if (m->info.has_processor && (s = mmb__model_check_processor(ctx, m->model, &m->proc, m->dir)) != MMB_OK)
            return s;
    }
    if (row->vision_only && (s = load_processor(ctx, m, NULL, false)) != MMB_OK) return s;
    bool lm = row->text_only || (row->lm_runs && mmb__lm_present(mmb__model_ckpt(m->model)));
    if (lm && !p->vision_only) {
        if ((s = mmb_lm_open(ctx, m->dir, &m->lm)) != MMB_OK) return s;
        mmb_lm_info li;
        mmb_model_info mi = {0};
        mmb_lm_get_info(m->lm, &li);
        if (m->model && mmb_model_get_info(m->model, &mi) == MMB_OK && !row->xattn && mi.out_width != li.d_model)
            return mmb__err(ctx, MMB_ERR_SHAPE, "%s: the connector makes %d-wide embeddings, the LLM takes %lld",
                            m->dir, mi.out_width, (long long)li.d_model);
        if ((s = load_tokenizer(ctx, m, row)) != MMB_OK) return s;
        if (row->image_first) { /* CogVLM: _history_to_prompt's templates */
            const char *tv = "chat";
            mmb__cfg_str(ctx, mmb__model_ckpt(m->model), "template_version", &tv, &s);
            if (s != MMB_OK) return s;
            if (strcmp(tv, "chat") == 0) m->query_fmt = "Question: %s Answer:";
            else if (strcmp(tv, "vqa") == 0) m->query_fmt = "Question: %s Short answer:";
            else if (strcmp(tv, "base") == 0) m->query_fmt = "%s";
            else
                return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s/config.json: template_version '%s' (base, chat and vqa "
                                "are known)", m->dir, tv);
        }
        if (row->xattn && m->model) { /* fusion A: the visual tokens reach the LLM through its gated layers */
            int64_t per = mmb__model_xattn_tokens(m->model) ? mmb__model_xattn_tokens(m->model) : mi.tokens_per_image;
            s = mmb__xattn_open(ctx, m->lm, row->xattn, mi.out_width, per > 0 ? per : 1,
                                m->info.image_token,
                                mmb_tokenizer_eos_id(m->tok), &m->xattn);
            if (s != MMB_OK) return s;
            m->image_wrap = row->image_wrap && m->tok && mmb_tokenizer_token_id(m->tok, row->image_wrap) >= 0
                          ? row->image_wrap : NULL;
            m->raw_bos = row->raw_bos;
            mmb__xattn_cost xc;
            mmb__xattn_get_cost(m->xattn, &xc);
            in->xattn_layers = xc.layers;
            in->xattn_params = xc.params;
            in->xattn_flops_per_token = xc.flops_per_token;
            in->xattn_kv_bytes_per_image = xc.kv_bytes_per_image;
            in->xattn_kv_flops_per_image = xc.kv_flops_per_image;
        }
        /* fusion D: the processor's text around each image, the logits the model suppresses */
        const void *fst = NULL;
        const mmb_family_ops *fo = mmb__model_fam_ops(m->model, &fst);
        if (fo && fo->logit_mask) m->logit_mask = fo->logit_mask(fst, &m->n_logit_mask);
        m->image_before = m->model ? row->image_before : NULL;
        m->image_after = m->model ? row->image_after : NULL;
        /* fusion B: the LLM's own layers changed */
        m->image_expert = row->image_expert && m->model;
        m->image_one_position = row->image_one_position && m->model;
        m->image_last_text = row->image_last_text && m->image_expert;
        if (m->image_expert && mmb__lm_experts(m->lm) < 2)
            return mmb__err(ctx, MMB_ERR_MISSING, "%s: a %s model's LLM has a second weight set per layer for its "
                            "image rows, but the layers have none (layer 0's expert tensors are missing)", m->dir,
                            row->name);
        if (row->adapter && p->adapter)
            return mmb__err(ctx, MMB_ERR_ARG, "%s: the model has its own adapter; another cannot be added", m->dir);
        if (row->adapter && m->model) s = mmb__adapter_open(ctx, m->lm, row->adapter, &m->adapter);
        else if (p->adapter) s = mmb__adapter_open_peft(ctx, m->lm, p->adapter, &m->adapter);
        if (s != MMB_OK) return s;
        if (mmb__adapter_rows(m->adapter) && mi.tokens_per_image != mmb__adapter_rows(m->adapter))
            return mmb__err(ctx, MMB_ERR_SHAPE, "%s: the vision side makes %lld rows an image, the adapter's prompts "
                            "have %lld", m->dir, (long long)mi.tokens_per_image,
                            (long long)mmb__adapter_rows(m->adapter));
        mmb__adapter_cost ac;
        mmb__adapter_get_cost(m->adapter, &ac);
        in->expert_sets = mmb__lm_experts(m->lm);
        in->adapter_layers = ac.layers;
        in->adapter_len = ac.prompt_len;
        in->added_params = mmb__lm_expert_params(m->lm) + ac.params;
        in->added_flops_per_token = ac.flops_per_token;
        in->adapter_flops_per_image = ac.flops_per_prompt;
    } else if (p->adapter) {
        return mmb__err(ctx, MMB_ERR_ARG, "%s: an adapter needs the model's LLM, which is not opened here", m->dir);
    }
    fill_info(m, row);
    return MMB_OK;
}

mmb_status mmb_mllm_open(mmb_ctx *ctx, const char *dir, const mmb_mllm_params *p, mmb_mllm **out) {
    if (!ctx || !dir || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_open: NULL argument");
    mmb_mllm_params dp = mmb_mllm_default_params();
    mmb_mllm *m = calloc(1, sizeof *m);
    char *path = malloc(strlen(dir) + sizeof "/config.json");
    if (!m || !path || !(m->dir = strdup(dir))) {
        free(path);
        mmb_mllm_free(m);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", dir);
    }
    sprintf(path, "%s/config.json", dir);
    cJSON *cfg = NULL;
    mmb_status s = mmb__json_read(ctx, path, &cfg);
    if (s == MMB_OK) s = build(ctx, m, cfg, path, p ? p : &dp);
    free(path);
    cJSON_Delete(cfg);
    if (s != MMB_OK) {
        mmb_mllm_free(m);
        return s;
    }
    *out = m;
    return MMB_OK;
}

void mmb_mllm_free(mmb_mllm *m) {
    if (!m) return;
    mmb_tokenizer_free(m->tok);
    mmb__xattn_free(NULL, m->xattn);
    mmb__adapter_free(NULL, m->adapter);
    mmb_lm_free(m->lm);
    mmb_model_free(m->model);
    mmb_vit_free(m->vit_only);
    free(m->dir);
    free(m);
}

mmb_status mmb_mllm_get_info(const mmb_mllm *m, mmb_mllm_info *out) {
    if (!m || !out) return MMB_ERR_ARG;
    *out = m->info;
    return MMB_OK;
}

const mmb_model *mmb_mllm_model(const mmb_mllm *m) { return m ? m->model : NULL; }
const mmb_vit *mmb_mllm_vit(const mmb_mllm *m) { return m ? m->vit : NULL; }
const mmb_lm *mmb_mllm_lm(const mmb_mllm *m) { return m ? m->lm : NULL; }
const mmb_tokenizer *mmb_mllm_tokenizer(const mmb_mllm *m) { return m ? m->tok : NULL; }
const mmb_preprocess *mmb_mllm_processor(const mmb_mllm *m) { return m && m->info.has_processor ? &m->proc : NULL; }

/* ---- encoding ------------------------------------------------------------------------------------- */

static mmb_status no_vision(mmb_ctx *ctx, const mmb_mllm *m) {
    if (m->model)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: the checkpoint has no vision tower (an original-layout LLaVA "
                        "config only names it: give its directory, mmb_mllm_params.vision_tower or the CLI's "
                        "--vision-tower)", m->dir);
    return mmb__err(ctx, MMB_ERR_MISSING, "%s: a language model alone has no vision path", m->dir);
}

/* Embeddings m makes of pixels of h x w, or -1 with a message. */
static int64_t tokens_for(mmb_ctx *ctx, const mmb_mllm *m, int h, int w) {
    if (m->model) return mmb_model_encode_tokens(ctx, m->model, h, w);
    mmb_vit_info vi;
    mmb_vit_get_info(m->vit, &vi);
    if (h != vi.image_size || w != vi.image_size)
        return mmb__err(ctx, MMB_ERR_SHAPE, "%s: pixels of %dx%d, but the vision tower takes %dx%d", m->dir, w, h,
                        vi.image_size, vi.image_size), -1;
    return vi.tokens;
}

/* The AnyRes family ops (their images travel with their own size, models.h), or NULL. */
static const mmb_family_ops *anyres_ops(const mmb_mllm *m, const void **st) {
    const mmb_family_ops *fo = m->model ? mmb__model_fam_ops(m->model, st) : NULL;
    return fo && fo->image_tokens ? fo : NULL;
}

/* The floats of one preprocessed image of h x w (an AnyRes model's: the image's own size). */
static size_t pixel_floats(const mmb_mllm *m, int h, int w) {
    const void *st;
    int oh = h, ow = w;
    if (anyres_ops(m, &st) && mmb_preprocess_output_size(NULL, &m->proc, h, w, &oh, &ow) != MMB_OK) return 0;
    return (size_t)3 * (size_t)oh * (size_t)ow;
}

/* The size m's processor makes of img and the embeddings that gives. */
static mmb_status image_plan(mmb_ctx *ctx, const mmb_mllm *m, const mmb_image *img, int *h, int *w, int64_t *tokens) {
    if (!m->info.has_vision) return no_vision(ctx, m);
    if (!m->info.has_processor) return mmb__err(ctx, MMB_ERR_MISSING, "%s: no image processor: %s", m->dir, m->no_proc);
    const void *st;
    const mmb_family_ops *ar = anyres_ops(m, &st);
    mmb_status s = mmb_preprocess_output_size(ctx, &m->proc, img->height, img->width, h, w);
    if (s == MMB_OK && ar) { /* the image's own size: its rows depend on it */
        *h = img->height;
        *w = img->width;
        *tokens = ar->image_tokens(ctx, st, *h, *w, NULL);
        return *tokens < 0 ? MMB_ERR_SHAPE : MMB_OK;
    }
    if (s != MMB_OK) return s;
    *tokens = tokens_for(ctx, m, *h, *w);
    return *tokens < 0 ? MMB_ERR_SHAPE : MMB_OK;
}

mmb_status mmb__mllm_preprocess(mmb_ctx *ctx, const mmb_mllm *m, const mmb_image *img, float **pixels, int *h,
                                int *w, int64_t *tokens) {
    int ih, iw;
    int64_t t;
    mmb_status s = image_plan(ctx, m, img, &ih, &iw, &t);
    if (s != MMB_OK) return s;
    size_t n = pixel_floats(m, ih, iw);
    float *px = n ? malloc(n * sizeof(float)) : NULL;
    if (!px) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory for %dx%d pixels", m->dir, iw, ih);
    if ((s = mmb_preprocess_run(ctx, &m->proc, img, px, n)) != MMB_OK) {
        free(px);
        return s;
    }
    *pixels = px;
    *h = ih;
    *w = iw;
    *tokens = t;
    return MMB_OK;
}

mmb_status mmb__mllm_encode_pixels(mmb_ctx *ctx, const mmb_mllm *m, const float *pixels, int64_t batch, int h, int w,
                                   float *emb, size_t emb_count, const int *taps, int n_taps, float *const *hidden) {
    const void *fst = NULL;
    const mmb_family_ops *fo = mmb__model_fam_ops(m->model, &fst);
    if (fo && fo->image_tokens) { /* AnyRes: h x w is the image's own size; pixels its tiles */
        if (n_taps)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a %s model's hidden states are not exposed", m->dir,
                            m->info.family);
        const int64_t t = fo->image_tokens(ctx, fst, h, w, NULL);
        if (t < 0) return MMB_ERR_SHAPE;
        const size_t one = pixel_floats(m, h, w), rows = (size_t)t * (size_t)m->info.out_width;
        if (!one || emb_count / (size_t)batch < rows)
            return mmb__err(ctx, MMB_ERR_SHAPE, "output holds %zu floats, %lld images of %zu needed", emb_count,
                            (long long)batch, rows);
        mmb_status vs = mmb__ckpt_verify(ctx, mmb__model_ckpt(m->model));
        for (int64_t b = 0; b < batch && vs == MMB_OK; b++)
            vs = fo->encode_image(ctx, fst, pixels + (size_t)b * one, h, w, emb + (size_t)b * rows);
        return vs;
    }
    if (fo && fo->encode_ids) { /* fusion D: the image's ids through the LLM's own embedding */
        if (n_taps)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a fusion-D model's VQ tokenizer exposes no hidden states",
                            m->dir);
        if (!m->lm)
            return mmb__err(ctx, MMB_ERR_MISSING, "%s: a fusion-D model's image rows are its LLM's embeddings of the "
                            "image's ids, and the LLM is not loaded (`mmbridge encode --vq` writes the image's codes)",
                            m->dir);
        int64_t t = mmb_model_encode_tokens(ctx, m->model, h, w);
        if (t < 0) return MMB_ERR_SHAPE;
        mmb_lm_info li;
        mmb_lm_get_info(m->lm, &li);
        if (emb_count < (size_t)(batch * t * li.d_model))
            return mmb__err(ctx, MMB_ERR_SHAPE, "output holds %zu floats, %lld needed", emb_count,
                            (long long)(batch * t * li.d_model));
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)(batch * t));
        if (!ids) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %lld ids", (long long)(batch * t));
        mmb_status s = mmb__model_encode_ids(ctx, m->model, pixels, batch, h, w, ids, (size_t)(batch * t));
        if (s == MMB_OK) s = mmb_lm_embed(ctx, m->lm, ids, batch * t, emb);
        free(ids);
        return s;
    }
    if (m->model)
        return mmb__model_encode_taps(ctx, m->model, pixels, batch, h, w, emb, emb_count, taps, n_taps, hidden);
    if (!m->vit) return no_vision(ctx, m);
    /* A tower alone: its last_hidden_state, and the taps, from one forward. */
    if (tokens_for(ctx, m, h, w) < 0) return MMB_ERR_SHAPE;
    if (n_taps + 1 > MMB_MAX_TAPS)
        return mmb__err(ctx, MMB_ERR_ARG, "%d hidden states asked besides last_hidden_state: at most %d", n_taps,
                        MMB_MAX_TAPS - 1);
    int all[MMB_MAX_TAPS] = {MMB_TAP_LAST};
    float *outs[MMB_MAX_TAPS] = {emb};
    for (int i = 0; i < n_taps; i++) {
        all[i + 1] = taps[i];
        outs[i + 1] = hidden[i];
    }
    return mmb_vit_forward(ctx, m->vit, pixels, batch, all, n_taps + 1, outs);
}

int64_t mmb_mllm_encode_size(mmb_ctx *ctx, const mmb_mllm *m, const mmb_image *imgs, int n, int64_t *tokens) {
    if (!ctx || !m || !imgs || n < 1) return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_encode_size: NULL or n < 1"), -1;
    int64_t sum = 0;
    for (int pass = 0; pass < 1 + !!tokens; pass++) /* tokens written once every image has passed */
        for (int i = 0; i < n; i++) {
            int h = 0, w = 0;
            int64_t t = 0;
            if (image_plan(ctx, m, &imgs[i], &h, &w, &t) != MMB_OK) return -1;
            if (pass) tokens[i] = t;
            else sum += t;
        }
    return sum;
}

/* The checks every encode makes of *out before anything runs. */
static mmb_status check_out(mmb_ctx *ctx, const mmb_mllm *m, const char *call, int n, const mmb_encode_out *out) {
    if (!ctx || !m || !out || n < 1 || out->n_taps < 0 || out->n_taps > MMB_MAX_TAPS)
        return mmb__err(ctx, MMB_ERR_ARG, "%s: NULL argument, n < 1 or n_taps outside 0..%d", call, MMB_MAX_TAPS);
    if (!out->embeddings && !out->n_taps)
        return mmb__err(ctx, MMB_ERR_ARG, "%s: nothing asked (no embeddings buffer, no taps)", call);
    for (int i = 0; i < out->n_taps; i++)
        if (!out->hidden[i]) return mmb__err(ctx, MMB_ERR_ARG, "%s: hidden[%d] is NULL", call, i);
    if (out->n_taps && !m->vit) {
        if (m->info.has_vision)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a %s model runs its tower and connector as one; its hidden "
                            "states are not exposed", m->dir, m->info.family);
        return no_vision(ctx, m);
    }
    return MMB_OK;
}

/* n images' pixels px (one after another, image i hw[2i] x hw[2i + 1], tok[i] embeddings; `same`: one size,
 * so one batch) through m into temporaries, then copied to *out: outputs untouched on failure. */
static mmb_status encode_out(mmb_ctx *ctx, const mmb_mllm *m, const float *px, int n, const int *hw,
                             const int64_t *tok, bool same, mmb_encode_out *out) {
    const int nt = out->n_taps;
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += tok[i];
    const int64_t d = m->info.out_width, vt = m->info.vision_tokens, vw = m->info.vision_width;
    const size_t ne = (size_t)(total * d), nh = (size_t)(n * vt * vw);
    mmb_status s = MMB_OK;
    if (nt && !same)
        s = mmb__err(ctx, MMB_ERR_SHAPE, "hidden states need one image size: the processor makes image 0 %dx%d and "
                     "another a different size", hw[1], hw[0]);
    if (s == MMB_OK && out->embeddings && out->embeddings_count < ne)
        s = mmb__err(ctx, MMB_ERR_SHAPE, "embeddings holds %zu floats, %zu needed (%lld x %lld)",
                     out->embeddings_count, ne, (long long)total, (long long)d);
    if (s == MMB_OK && nt && out->hidden_count < nh)
        s = mmb__err(ctx, MMB_ERR_SHAPE, "each hidden state buffer holds %zu floats, %zu needed (%d x %lld x %lld)",
                     out->hidden_count, nh, n, (long long)vt, (long long)vw);
    float *emb = NULL, *hid[MMB_MAX_TAPS] = {0};
    if (s == MMB_OK && !(emb = malloc(ne * sizeof(float) + 1)))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %d image(s)", n);
    for (int i = 0; i < nt && s == MMB_OK; i++)
        if (!(hid[i] = malloc(nh * sizeof(float) + 1))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK && same) s = mmb__mllm_encode_pixels(ctx, m, px, n, hw[0], hw[1], emb, ne, out->taps, nt, hid);
    size_t off = 0;
    for (int64_t i = 0, row = 0; i < n && s == MMB_OK && !same; row += tok[i], i++) {
        s = mmb__mllm_encode_pixels(ctx, m, px + off, 1, hw[2 * i], hw[2 * i + 1], emb + (size_t)row * (size_t)d,
                                    (size_t)(tok[i] * d), NULL, 0, NULL);
        off += pixel_floats(m, hw[2 * i], hw[2 * i + 1]);
    }
    if (s == MMB_OK) {
        if (out->embeddings) memcpy(out->embeddings, emb, ne * sizeof(float));
        for (int i = 0; i < nt; i++) memcpy(out->hidden[i], hid[i], nh * sizeof(float));
        if (out->tokens) memcpy(out->tokens, tok, sizeof(int64_t) * (size_t)n);
    }
    for (int i = 0; i < nt; i++) free(hid[i]);
    free(emb);
    return s;
}

mmb_status mmb_mllm_encode(mmb_ctx *ctx, mmb_mllm *m, const mmb_image *imgs, int n, mmb_encode_out *out) {
    mmb_status s = check_out(ctx, m, "mmb_mllm_encode", n, out);
    if (s == MMB_OK && !imgs) s = mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_encode: NULL images");
    if (s != MMB_OK) return s;
    /* Plan every image, then preprocess them one after another into one buffer: a batch when they are the same
     * size, else slots encoded one by one. */
    int *hw = malloc(sizeof(int) * 2 * (size_t)n);
    int64_t *tok = malloc(sizeof(int64_t) * (size_t)n);
    float *px = NULL;
    size_t npx = 0;
    s = hw && tok ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    bool same = true;
    for (int i = 0; i < n && s == MMB_OK; i++) {
        if ((s = image_plan(ctx, m, &imgs[i], &hw[2 * i], &hw[2 * i + 1], &tok[i])) != MMB_OK) break;
        npx += pixel_floats(m, hw[2 * i], hw[2 * i + 1]);
        same &= hw[2 * i] == hw[0] && hw[2 * i + 1] == hw[1];
    }
    if (s == MMB_OK && !(px = malloc(npx * sizeof(float))))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %d image(s)", n);
    size_t off = 0;
    for (int i = 0; i < n && s == MMB_OK; i++) {
        size_t one = pixel_floats(m, hw[2 * i], hw[2 * i + 1]);
        s = mmb_preprocess_run(ctx, &m->proc, &imgs[i], px + off, one);
        off += one;
    }
    if (s == MMB_OK) s = encode_out(ctx, m, px, n, hw, tok, same, out);
    free(px);
    free(tok);
    free(hw);
    return s;
}

int64_t mmb_mllm_pixel_tokens(mmb_ctx *ctx, const mmb_mllm *m, int height, int width) {
    if (!ctx || !m) return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_pixel_tokens: NULL argument"), -1;
    if (!m->info.has_vision) return no_vision(ctx, m), -1;
    return tokens_for(ctx, m, height, width);
}

mmb_status mmb_mllm_encode_pixels(mmb_ctx *ctx, mmb_mllm *m, const float *pixels, int n, int height, int width,
                                  mmb_encode_out *out) {
    mmb_status s = check_out(ctx, m, "mmb_mllm_encode_pixels", n, out);
    if (s == MMB_OK && (!pixels || height < 1 || width < 1))
        s = mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_encode_pixels: NULL pixels or a side < 1");
    if (s != MMB_OK) return s;
    int64_t t = mmb_mllm_pixel_tokens(ctx, m, height, width);
    if (t < 0) return MMB_ERR_SHAPE;
    int *hw = malloc(sizeof(int) * 2 * (size_t)n);
    int64_t *tok = malloc(sizeof(int64_t) * (size_t)n);
    s = hw && tok ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int i = 0; i < n && s == MMB_OK; i++) {
        hw[2 * i] = height;
        hw[2 * i + 1] = width;
        tok[i] = t;
    }
    if (s == MMB_OK) s = encode_out(ctx, m, pixels, n, hw, tok, true, out);
    free(tok);
    free(hw);
    return s;
}

mmb_status mmb_mllm_encode_file(mmb_ctx *ctx, mmb_mllm *m, const char *path, mmb_encode_out *out) {
    mmb_image img = {0};
    mmb_status s = mmb_image_load(ctx, path, 0, &img);
    if (s == MMB_OK) s = mmb_mllm_encode(ctx, m, &img, 1, out);
    mmb_image_free(&img);
    return s;
}

mmb_status mmb_mllm_encode_bytes(mmb_ctx *ctx, mmb_mllm *m, const void *bytes, size_t n, mmb_encode_out *out) {
    mmb_image img = {0};
    mmb_status s = mmb_image_decode(ctx, bytes, n, NULL, 0, &img);
    if (s == MMB_OK) s = mmb_mllm_encode(ctx, m, &img, 1, out);
    mmb_image_free(&img);
    return s;
}

/* ---- attention maps ------------------------------------------------------------------------------ */

mmb_status mmb_mllm_attention(mmb_ctx *ctx, const mmb_mllm *m, const mmb_image *imgs, int n, float *out,
                              size_t count, float *pixels, size_t pixel_count) {
    if (!ctx || !m || !imgs || !out || n < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_attention: NULL argument or n < 1");
    if (!m->vit) {
        if (m->info.has_vision && m->model)
            return mmb__err(ctx, MMB_ERR_MISSING, "%s: a %s model runs its tower inside its own encode: its "
                            "attention maps are not exposed (a CLIP/SigLIP tower, alone or a LLaVA's, is)", m->dir,
                            m->info.family);
        return no_vision(ctx, m);
    }
    if (!m->info.has_processor) return mmb__err(ctx, MMB_ERR_MISSING, "%s: no image processor: %s", m->dir, m->no_proc);
    mmb_vit_info vi;
    mmb_vit_get_info(m->vit, &vi);
    size_t one = (size_t)3 * (size_t)vi.image_size * (size_t)vi.image_size;
    if (pixels && pixel_count < one * (size_t)n)
        return mmb__err(ctx, MMB_ERR_SHAPE, "mmb_mllm_attention: the pixels output holds %zu floats, %zu needed",
                        pixel_count, one * (size_t)n);
    float *px = malloc(sizeof(float) * one * (size_t)n);
    mmb_status s = px ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %d image(s)", n);
    for (int i = 0; i < n && s == MMB_OK; i++) {
        int h, w;
        if ((s = mmb_preprocess_output_size(ctx, &m->proc, imgs[i].height, imgs[i].width, &h, &w)) != MMB_OK) break;
        if (h != vi.image_size || w != vi.image_size) {
            s = mmb__err(ctx, MMB_ERR_SHAPE, "%s: the image processor makes %dx%d pixels of image %d, but the vision "
                         "tower takes %dx%d", m->dir, w, h, i, vi.image_size, vi.image_size);
            break;
        }
        s = mmb_preprocess_run(ctx, &m->proc, &imgs[i], px + one * (size_t)i, one);
    }
    /* out is written only once the forward runs, which cannot fail then */
    if (s == MMB_OK) s = mmb_vit_attention(ctx, m->vit, px, n, vi.image_size, vi.image_size, out, count);
    if (s == MMB_OK && pixels) memcpy(pixels, px, sizeof(float) * one * (size_t)n);
    free(px);
    return s;
}
