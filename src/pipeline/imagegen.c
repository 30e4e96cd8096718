/* Fusion D image generation: the LLM writes an image's codes, the VQ decoder turns them into pixels.
 *
 * Janus, Janus-Pro (JanusForConditionalGeneration.generate with generation_mode="image"):
 *   two sequences, the prompt (conditional) and its copy with every id but bos and boi replaced by pad
 *   (unconditional), each with its own KV cache; for each of the n_ids codes: both sequences' last final-normed
 *   hidden state through generation_head, scores = uncond + guidance_scale * (cond - uncond)
 *   (ClassifierFreeGuidanceLogitsProcessor; a scale <= 1: the conditional scores alone), a code drawn from them
 *   (greedy: argmax), and that code, through generation_embeddings and generation_aligner, the next input of both.
 *
 * Emu3 (Emu3ForConditionalGeneration.generate as its model card runs it: UnbatchedClassifierFreeGuidanceLogitsProcessor
 * with the negative prompt, then PrefixConstrainedLogitsProcessor with the card's prefix_allowed_tokens_fn):
 *   the LLM's own logits; both log-softmaxed, scores = scale * (cond - uncond) + uncond; then only the visual
 *   tokens allowed, but for the last position of each row of grid_w codes, where only the end-of-line token is;
 *   the token drawn, fed to both sequences; after grid_h rows, the codes (bpe2img) through the VQ decoder. (The
 *   card's last three forced tokens, eof, eoi and eos, add nothing to the image and are not generated.) */
#include "pipeline.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EMU3_GRID 90 /* Emu3Processor.calculate_generate_size("1:1", 518400, 8): round(720 / 8) */

mmb_imagegen_params mmb_imagegen_default_params(void) {
    mmb_imagegen_params p = {0};
    p.sampler = mmb_sampler_default();
    return p;
}

void mmb_imagegen_result_free(mmb_imagegen_result *r) {
    if (!r) return;
    free(r->ids);
    free(r->pixels);
    memset(r, 0, sizeof *r);
}

/* The model's image generation: its family's ops and state, and *gi; NULL with a message when it has none. */
static const mmb_family_ops *gen_of(mmb_ctx *ctx, const mmb_mllm *m, const void **st, mmb__gen_info *gi) {
    const mmb_family_ops *fo = m->lm ? mmb__model_fam_ops(m->model, st) : NULL;
    if (fo && fo->gen_info) fo->gen_info(*st, gi);
    if (!fo || !fo->gen_info || gi->codebook < 1 || !fo->vq) {
        mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: the model does not generate images (fusion D with an LLM that writes "
                 "image codes and a VQ decoder: Janus, Emu3)", m->dir);
        return NULL;
    }
    return fo;
}

mmb_status mmb_mllm_tokenize_image_prompt(mmb_ctx *ctx, const mmb_mllm *m, const char *text, int flags, int grid_h,
                                          int grid_w, int32_t **ids, int64_t *n) {
    if (!ctx || !m || !text || !ids || !n || (flags != MMB_TOKENIZE_RAW && flags != MMB_TOKENIZE_CHAT) ||
        grid_h < 0 || grid_w < 0 || grid_h > 4096 || grid_w > 4096)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_tokenize_image_prompt: NULL argument, unknown flags or a grid "
                        "outside [0, 4096]");
    const void *st = NULL;
    mmb__gen_info gi;
    if (!gen_of(ctx, m, &st, &gi)) return MMB_ERR_UNSUPPORTED;
    if (!m->tok) return mmb__err(ctx, MMB_ERR_MISSING, "%s: no tokenizer: %s", m->dir, m->no_tok);
    if (flags == MMB_TOKENIZE_CHAT && !m->info.has_chat_template)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: the tokenizer has no chat template (tokenize with "
                        "MMB_TOKENIZE_RAW)", m->dir);
    char head[64] = "", tail[160];
    if (gi.lm_head) { /* Emu3Processor: bos + text + boi "{h}*{w}" wrapper */
        int32_t bos = mmb_tokenizer_bos_id(m->tok);
        const char *bt = bos >= 0 ? mmb_tokenizer_token_text(m->tok, bos) : NULL;
        if (bt && strlen(bt) < sizeof head) snprintf(head, sizeof head, "%s", bt);
        snprintf(tail, sizeof tail, "<|image start|>%d*%d<|image token|>", grid_h ? grid_h : EMU3_GRID,
                 grid_w ? grid_w : EMU3_GRID);
    } else { /* JanusProcessor: text + begin-of-image */
        int32_t boi = gi.boi >= 0 ? gi.boi : mmb_tokenizer_token_id(m->tok, "<begin_of_image>");
        const char *bt = boi >= 0 ? mmb_tokenizer_token_text(m->tok, boi) : NULL;
        if (!bt || strlen(bt) >= sizeof tail)
            return mmb__err(ctx, MMB_ERR_MISSING, "%s: no begin-of-image token (generation_config.json's "
                            "generation_kwargs.boi_token_id, or <begin_of_image> in the tokenizer)", m->dir);
        snprintf(tail, sizeof tail, "%s", bt);
    }
    char *rendered = NULL;
    mmb_status s = MMB_OK;
    if (flags == MMB_TOKENIZE_CHAT) {
        mmb_chat_msg msg = {"user", text};
        s = mmb_chat_render(ctx, m->tok, &msg, 1, 1, &rendered);
    }
    const char *in = rendered ? rendered : text;
    size_t hl = strlen(head), len = strlen(in), tl = strlen(tail);
    char *full = s == MMB_OK ? malloc(hl + len + tl + 1) : NULL;
    if (s == MMB_OK && !full) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK) {
        memcpy(full, head, hl);
        memcpy(full + hl, in, len);
        memcpy(full + hl + len, tail, tl + 1);
        s = mmb_tokenizer_encode(ctx, m->tok, full, hl + len + tl, flags == MMB_TOKENIZE_RAW, ids, n);
    }
    free(full);
    free(rendered);
    return s;
}

/* log_softmax of x (n) in place, as torch computes it (max subtracted, the sum's log in float). */
static void log_softmax(float *x, int64_t n) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += exp((double)(x[i] - mx));
    float ls = (float)log(sum);
    for (int64_t i = 0; i < n; i++) x[i] = x[i] - mx - ls;
}

/* One generation: both sequences' caches, and what a step reads and writes. */
typedef struct gen_run {
    mmb_ctx *ctx;
    mmb_mllm *m;
    const mmb_family_ops *fo;
    const void *st;
    mmb__gen_info gi;
    int seqs;                   /* 1, or 2 with guidance */
    mmb_kv_cache *kv[2];
    float *hid, *sc;            /* (2, d) hidden states (Janus), (2, V) scores */
    float *e1;                  /* (d) the next input row */
    int64_t d, V;
} gen_run;

/* Feeds n rows of embeddings to sequence c, leaving its last hidden state (Janus) or logits (Emu3). */
static mmb_status feed(gen_run *g, int c, const float *emb, int64_t n) {
    mmb__lm_rows rw = {NULL, NULL, g->gi.lm_head ? NULL : g->hid + c * g->d};
    return mmb__lm_forward_rows(g->ctx, g->m->lm, g->kv[c], emb, n, g->gi.lm_head ? g->sc + c * g->V : NULL, 1, &rw);
}

static mmb_status feed_ids(gen_run *g, int c, const int32_t *ids, int64_t n) {
    float *emb = malloc(sizeof(float) * (size_t)(n * g->d));
    if (!emb) return mmb__err(g->ctx, MMB_ERR_NOMEM, "out of memory for %lld embeddings", (long long)n);
    mmb_status s = mmb_lm_embed(g->ctx, g->m->lm, ids, n, emb);
    if (s == MMB_OK) s = feed(g, c, emb, n);
    free(emb);
    return s;
}

mmb_status mmb_mllm_generate_image(mmb_ctx *ctx, mmb_mllm *m, const int32_t *ids, int64_t n,
                                   const mmb_imagegen_params *p, mmb_imagegen_result *out) {
    if (!ctx || !m || !ids || n < 1 || !out)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_generate_image: NULL argument or an empty prompt");
    mmb_imagegen_params gp = p ? *p : mmb_imagegen_default_params();
    gen_run g = {.ctx = ctx, .m = m};
    if (!(g.fo = gen_of(ctx, m, &g.st, &g.gi))) return MMB_ERR_UNSUPPORTED;
    const mmb__gen_info *gi = &g.gi;
    mmb_lm_info li;
    mmb_lm_get_info(m->lm, &li);
    g.d = li.d_model;
    g.V = gi->lm_head ? li.vocab : gi->codebook;
    const double scale = gp.guidance_scale > 0 ? gp.guidance_scale : gi->guidance > 0 ? gi->guidance
                                                                                    : gi->lm_head ? 3.0 : 5.0;
    g.seqs = scale > 1 ? 2 : 1; /* both generate()s apply guidance only above 1 */
    int gh = gi->lm_head ? (gp.grid_h ? gp.grid_h : EMU3_GRID) : gi->grid_h;
    int gw = gi->lm_head ? (gp.grid_w ? gp.grid_w : EMU3_GRID) : gi->grid_w;
    if (!gi->lm_head && ((gp.grid_h && gp.grid_h != gh) || (gp.grid_w && gp.grid_w != gw)))
        return mmb__err(ctx, MMB_ERR_ARG, "%s: the model generates a %dx%d grid of codes, not %dx%d", m->dir, gh, gw,
                        gp.grid_h, gp.grid_w);
    if (gh < 1 || gw < 1 || gh > 4096 || gw > 4096)
        return mmb__err(ctx, MMB_ERR_ARG, "a grid of %dx%d codes: each side must be in [1, 4096]", gh, gw);
    /* positions generated: Janus one per code; Emu3 a row end after each row */
    const int64_t codes = (int64_t)gh * gw, T = gi->lm_head ? (int64_t)gh * (gw + 1) : codes;
    int32_t bos = gi->bos >= 0 ? gi->bos : mmb_tokenizer_bos_id(m->tok), boi = gi->boi, pad = gi->pad;
    if (!gi->lm_head && boi < 0 && m->tok) boi = mmb_tokenizer_token_id(m->tok, "<begin_of_image>");
    if (g.seqs == 2 && !gi->lm_head && pad < 0)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: classifier-free guidance needs the pad id of the unconditional "
                        "prompt (generation_config.json's pad_token_id)", m->dir);
    if (gi->lm_head && gp.negative_ids && gp.n_negative < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "an empty negative prompt");
    const int32_t *neg = gp.negative_ids ? gp.negative_ids : ids + n - 1; /* transformers: input_ids[:, -1:] */
    const int64_t nn = gp.negative_ids ? gp.n_negative : 1;
    for (int q = 0; q < 2; q++) {
        const int32_t *a = q ? neg : ids;
        for (int64_t i = 0, k = q ? nn : n; i < k; i++)
            if (a[i] < 0 || a[i] >= li.embed_rows)
                return mmb__err(ctx, MMB_ERR_ARG, "%s id %d at %lld is outside the vocabulary [0, %lld)",
                                q ? "negative prompt" : "prompt", (int)a[i], (long long)i, (long long)li.embed_rows);
    }
    if ((n > nn ? n : nn) + T > m->info.context)
        return mmb__err(ctx, MMB_ERR_SHAPE, "a prompt of %lld ids and %lld image positions exceed the model's context "
                        "of %lld", (long long)n, (long long)T, (long long)m->info.context);
    mmb_imagegen_result r = {.grid_h = gh, .grid_w = gw};
    int32_t *gen = malloc(sizeof(int32_t) * (size_t)T), *un = malloc(sizeof(int32_t) * (size_t)n);
    char *allowed = gi->lm_head ? calloc((size_t)g.V, 1) : NULL;
    g.hid = malloc(sizeof(float) * (size_t)(2 * g.d));
    g.sc = malloc(sizeof(float) * (size_t)(2 * g.V));
    g.e1 = malloc(sizeof(float) * (size_t)g.d);
    mmb_status s = MMB_OK;
    if (!gen || !un || !g.hid || !g.sc || !g.e1 || (gi->lm_head && !allowed))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t k = 0; s == MMB_OK && allowed && k < gi->codebook; k++)
        if (gi->img2bpe[k] >= 0 && gi->img2bpe[k] < g.V) allowed[gi->img2bpe[k]] = 1;
    for (int c = 0; c < g.seqs && s == MMB_OK; c++)
        s = mmb_kv_cache_new(ctx, m->lm, (c && gi->lm_head ? nn : n) + T, &g.kv[c]);
    double t0 = mmb__now_s();
    for (int c = 0; c < g.seqs && s == MMB_OK; c++) { /* the prompts */
        if (gi->lm_head) {
            s = feed_ids(&g, c, c ? neg : ids, c ? nn : n);
        } else {
            for (int64_t i = 0; i < n; i++) un[i] = c == 0 || ids[i] == bos || ids[i] == boi ? ids[i] : pad;
            s = feed_ids(&g, c, un, n);
        }
    }
    r.prefill_s = mmb__now_s() - t0;
    t0 = mmb__now_s();
    for (int64_t t = 0; t < T && s == MMB_OK; t++) {
        if (gp.abort && __atomic_load_n(gp.abort, __ATOMIC_RELAXED)) {
            s = mmb__err(ctx, MMB_ERR_ABORTED, "image generation aborted after %lld of %lld positions", (long long)t,
                         (long long)T);
            break;
        }
        float *sc = g.sc, *su = g.sc + g.V;
        if (gi->lm_head && (t + 1) % (gw + 1) == 0) { /* a row's end: the one token allowed */
            gen[t] = gi->eol;
        } else {
            if (!gi->lm_head) s = g.fo->gen_head(ctx, g.st, g.hid, g.seqs, g.sc);
            if (s != MMB_OK) break;
            if (gi->lm_head) { /* UnbatchedCFG on log-softmaxes, then the visual tokens alone */
                log_softmax(sc, g.V);
                if (g.seqs == 2) log_softmax(su, g.V);
                for (int64_t k = 0; k < g.V; k++) {
                    if (g.seqs == 2) sc[k] = (float)scale * (sc[k] - su[k]) + su[k];
                    if (!allowed[k]) sc[k] = -INFINITY;
                }
            } else {
                for (int64_t k = 0; g.seqs == 2 && k < g.V; k++) sc[k] = su[k] + (sc[k] - su[k]) * (float)scale;
            }
            if ((s = mmb_sample(ctx, &gp.sampler, sc, g.V, &gen[t])) != MMB_OK) break;
        }
        if (gp.on_progress) gp.on_progress(gp.user, "image", t + 1, T);
        if (t + 1 == T) break; /* the last is not fed back */
        if (gi->lm_head) s = mmb_lm_embed(ctx, m->lm, &gen[t], 1, g.e1);
        else s = g.fo->gen_embed(ctx, g.st, &gen[t], 1, g.e1);
        for (int c = 0; c < g.seqs && s == MMB_OK; c++) s = feed(&g, c, g.e1, 1);
    }
    r.decode_s = mmb__now_s() - t0;
    int32_t *code = s == MMB_OK ? malloc(sizeof(int32_t) * (size_t)codes) : NULL;
    int32_t *bpe2img = s == MMB_OK && gi->lm_head ? malloc(sizeof(int32_t) * (size_t)g.V) : NULL;
    if (s == MMB_OK && (!code || (gi->lm_head && !bpe2img))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t c = 0; s == MMB_OK && bpe2img && c < gi->codebook; c++) bpe2img[gi->img2bpe[c]] = (int32_t)c;
    for (int64_t y = 0, k = 0; s == MMB_OK && y < gh; y++) /* Emu3: the rows' ids back to codes (bpe2img) */
        for (int64_t x = 0; x < gw; x++, k++)
            code[k] = gi->lm_head ? bpe2img[gen[y * (gw + 1) + x]] : gen[k];
    free(bpe2img);
    const mmb_vq *vq = g.fo->vq(g.st);
    mmb_vq_info vi = {0};
    if (s == MMB_OK) s = mmb_vq_get_info(vq, &vi);
    if (s == MMB_OK) {
        r.height = gh * vi.downsample;
        r.width = gw * vi.downsample;
        if (!(r.pixels = malloc(sizeof(float) * 3 * (size_t)r.height * (size_t)r.width)))
            s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for a %dx%d image", r.width, r.height);
    }
    t0 = mmb__now_s();
    if (s == MMB_OK) s = mmb_vq_decode(ctx, vq, code, 1, gh, gw, r.pixels);
    r.vq_s = mmb__now_s() - t0;
    for (int c = 0; c < 2; c++) mmb_kv_cache_free(g.kv[c]);
    free(g.hid);
    free(g.sc);
    free(g.e1);
    free(un);
    free(allowed);
    free(gen);
    if (s != MMB_OK) {
        free(code);
        free(r.pixels);
        return s;
    }
    r.ids = code;
    r.n_ids = codes;
    *out = r;
    return MMB_OK;
}
