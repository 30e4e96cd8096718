/* Evaluating chunk lists into a KV cache and generating from them: sampling, streamed text, the stop reasons,
 * timings. Fusion C: each image's embeddings are spliced in at its positions. Fusion A: an image is its marker
 * token's one position; the visual tokens of every image of the prompt go to the gated cross-attention layers
 * (lm/xattn.c) first, whose keys and values are computed then, once, and every position is recorded with its token so
 * the layers know which images it sees (generated tokens see what the prompt's last position saw). */
#include "pipeline.h"

#include <float.h>
#include <stdlib.h>
#include <string.h>

mmb_status mmb_mllm_kv_new(mmb_ctx *ctx, const mmb_mllm *m, int64_t max_tokens, mmb_kv_cache **out) {
    if (!ctx || !m || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_kv_new: NULL argument");
    if (!m->lm) return mmb__err(ctx, MMB_ERR_MISSING, "%s: the model has no language model", m->dir);
    if (max_tokens < 1 || max_tokens > m->info.context) max_tokens = m->info.context;
    return mmb_kv_cache_new(ctx, m->lm, max_tokens, out);
}

/* A relaxed atomic load: the flag is raised from another thread (a server's, a signal handler's). */
static bool aborted(const volatile int *flag) { return flag && __atomic_load_n(flag, __ATOMIC_RELAXED); }

/* An evaluation: the caller's parameters, plus where the time goes. */
typedef struct eval_job {
    mmb_eval_params p;
    double encode_s, prefill_s;  /* out: added to */
} eval_job;

/* MMB_ERR_ABORTED with a message once the caller's flag is raised, else MMB_OK. */
static mmb_status check_abort(mmb_ctx *ctx, const eval_job *j, int64_t done, int64_t total) {
    if (!aborted(j->p.abort)) return MMB_OK;
    return mmb__err(ctx, MMB_ERR_ABORTED, "aborted: %lld of the %lld positions evaluated", (long long)done,
                    (long long)total);
}

/* mmb_mllm_eval: the checks first (nothing evaluated when one fails), then chunk after chunk, each image
 * encoded just before its positions, in decoder calls of up to n_batch positions. */
/* Fusion D: the logits the model suppresses at every position (Chameleon's image tokens) set to the lowest float,
 * as its forward does; rows of vocab. */
static void mask_logits(const mmb_mllm *m, float *lg, int64_t rows, int64_t vocab) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < m->n_logit_mask; k++)
            if (m->logit_mask[k] < vocab) lg[r * vocab + m->logit_mask[k]] = -FLT_MAX;
}

static mmb_status eval_run(mmb_ctx *ctx, mmb_mllm *m, mmb_kv_cache *kv, const mmb_chunks *c, eval_job *j) {
    if (!m->lm) return mmb__err(ctx, MMB_ERR_MISSING, "%s: the model has no language model", m->dir);
    if (j->p.n_batch < 0) return mmb__err(ctx, MMB_ERR_ARG, "n_batch %lld is negative", (long long)j->p.n_batch);
    mmb_lm_info li;
    mmb_lm_get_info(m->lm, &li);
    const int64_t d = li.d_model, vocab = li.vocab, cached = mmb_kv_cache_len(kv), cap = mmb__kv_cache_cap(kv);
    if (c->positions > cap - cached)
        return mmb__err(ctx, MMB_ERR_SHAPE, "context overflow: %lld positions cached + %lld asked = %lld, the limit "
                        "is %lld (KV cache size; the model's context is %lld)", (long long)cached,
                        (long long)c->positions, (long long)(cached + c->positions), (long long)cap,
                        (long long)m->info.context);
    int64_t rows = 0; /* the buffer one decoder call (text) or one image's embeddings need */
    for (int i = 0; i < c->n; i++) {
        const mmb_chunk *ch = &c->c[i];
        int64_t r = ch->type == MMB_CHUNK_IMAGE ? ch->n : ch->type == MMB_CHUNK_TEXT ? ch->n : 0;
        if (ch->type == MMB_CHUNK_TEXT && j->p.n_batch && r > j->p.n_batch) r = j->p.n_batch;
        rows = r > rows ? r : rows;
        if (ch->type == MMB_CHUNK_EMBED && ch->width != d)
            return mmb__err(ctx, MMB_ERR_ARG, "chunk %d: rows of width %lld, the LLM takes %lld", i,
                            (long long)ch->width, (long long)d);
        if (ch->type == MMB_CHUNK_IMAGE && mmb__adapter_rows(m->adapter) && (cached || i))
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: chunk %d is an image; LLaMA-Adapter V2's one image comes "
                            "first in a conversation", m->dir, i);
        if (ch->type == MMB_CHUNK_IMAGE && m->info.fusion != MMB_FUSION_C && m->info.fusion != MMB_FUSION_D &&
            !m->xattn && !m->image_expert &&
            !mmb__adapter_rows(m->adapter))
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: chunk %d is an image, but the model splices no images into "
                            "its LLM (fusion %s)", m->dir, i, mmb_fusion_name(m->info.fusion));
        for (int64_t k = 0; ch->type == MMB_CHUNK_TEXT && k < ch->n; k++)
            if (ch->ids[k] < 0 || ch->ids[k] >= li.embed_rows)
                return mmb__err(ctx, MMB_ERR_ARG, "chunk %d: token id %d is outside the vocabulary [0, %lld)", i,
                                (int)ch->ids[k], (long long)li.embed_rows);
    }
    /* fusion A: the rows each image's keys and values come from (Mllama: every max_num_tiles tile,
     * mmb__model_xattn_tokens), of which text attends encode's (the real tiles) */
    int64_t most = 0;
    for (int i = 0; m->xattn && i < c->n; i++)
        if (c->c[i].type == MMB_CHUNK_IMAGE) {
            int64_t t = mmb_model_encode_tokens(ctx, m->model, c->c[i].h, c->c[i].w), x = mmb__model_xattn_tokens(m->model);
            if (t < 0) return MMB_ERR_SHAPE;
            t = x > t ? x : t;
            most = t > most ? t : most;
        }
    const size_t nmedia = (size_t)(most * m->info.out_width);
    float *buf = malloc(sizeof(float) * (size_t)(rows * d) + 1), *media = nmedia ? malloc(sizeof(float) * nmedia) : NULL;
    if (!buf || (nmedia && !media)) {
        free(buf);
        free(media);
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %lld embeddings", (long long)rows);
    }
    mmb_status s = MMB_OK;
    int images = 0;
    if (m->xattn && cached == 0) mmb__xattn_clear(m->xattn);
    /* Fusion A: every image of the prompt first (OpenFlamingo's text before the first image, attending all the
     * media, reads the later images too) */
    for (int i = 0; m->xattn && i < c->n && s == MMB_OK; i++) {
        const mmb_chunk *ch = &c->c[i];
        if (ch->type != MMB_CHUNK_IMAGE) continue;
        if ((s = check_abort(ctx, j, 0, c->positions)) != MMB_OK) break;
        double t0 = mmb__now_s();
        int64_t a = mmb_model_encode_tokens(ctx, m->model, ch->h, ch->w), t = mmb__model_xattn_tokens(m->model);
        s = a < 0 ? MMB_ERR_SHAPE : mmb__model_encode_xattn(ctx, m->model, ch->data, 1, ch->h, ch->w, media, nmedia);
        if (s == MMB_OK) s = mmb__xattn_add_media(ctx, m->xattn, media, t ? t : a, a);
        j->encode_s += mmb__now_s() - t0;
        if (s == MMB_OK && j->p.on_progress) j->p.on_progress(j->p.user, "encode", ++images, c->n_images);
    }
    /* LLaMA-Adapter V2: the image (or none) becomes every adapted layer's prompt before the text */
    if (mmb__adapter_rows(m->adapter) && cached == 0 && s == MMB_OK) {
        const mmb_chunk *ch = c->n && c->c[0].type == MMB_CHUNK_IMAGE ? &c->c[0] : NULL;
        int64_t r = mmb__adapter_rows(m->adapter);
        float *vq = ch ? malloc(sizeof(float) * (size_t)(r * d)) : NULL;
        double t0 = mmb__now_s();
        if (ch && !vq) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for the visual query");
        if (ch && s == MMB_OK) s = mmb__mllm_encode_pixels(ctx, m, ch->data, 1, ch->h, ch->w, vq, (size_t)(r * d), NULL, 0, NULL);
        if (s == MMB_OK) s = mmb__adapter_image(ctx, m->adapter, vq, r);
        free(vq);
        j->encode_s += mmb__now_s() - t0;
        if (ch && s == MMB_OK && j->p.on_progress) j->p.on_progress(j->p.user, "encode", ++images, c->n_images);
    }
    /* fusion B: an image's rows through the LLM's second weight set, and CogVLM's positions for them */
    int64_t nb = j->p.n_batch ? j->p.n_batch : rows;
    uint8_t *experts = m->image_expert ? malloc((size_t)nb + 1) : NULL;
    int64_t *rope = m->image_one_position ? malloc(sizeof(int64_t) * (size_t)(nb + 1)) : NULL;
    if ((m->image_expert && !experts) || (m->image_one_position && !rope))
        s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (experts) memset(experts, 1, (size_t)nb + 1);
    int64_t done = 0;
    for (int i = 0; i < c->n && s == MMB_OK; i++) {
        const mmb_chunk *ch = &c->c[i];
        const int64_t rope0 = mmb__kv_cache_rope_next(kv); /* the position of an image's first row */
        if (ch->type == MMB_CHUNK_IMAGE && !m->xattn && mmb__adapter_rows(m->adapter)) continue;
        if (ch->type == MMB_CHUNK_IMAGE && !m->xattn) {
            if ((s = check_abort(ctx, j, done, c->positions)) != MMB_OK) break;
            double t0 = mmb__now_s();
            s = mmb__mllm_encode_pixels(ctx, m, ch->data, 1, ch->h, ch->w, buf, (size_t)(ch->n * d), NULL, 0, NULL);
            j->encode_s += mmb__now_s() - t0;
            if (s == MMB_OK && j->p.on_progress) j->p.on_progress(j->p.user, "encode", ++images, c->n_images);
        }
        for (int64_t off = 0; off < ch->n && s == MMB_OK;) {
            if ((s = check_abort(ctx, j, done, c->positions)) != MMB_OK) break;
            int64_t piece = j->p.n_batch && j->p.n_batch < ch->n - off ? j->p.n_batch : ch->n - off;
            bool last = i == c->n - 1 && off + piece == ch->n;
            const bool ids = ch->type == MMB_CHUNK_TEXT || (ch->type == MMB_CHUNK_IMAGE && m->xattn);
            const float *x = ids ? buf : ch->type == MMB_CHUNK_IMAGE ? buf + off * d : ch->data + off * d;
            float *lg = j->p.logits && j->p.all_logits ? j->p.logits + done * vocab : j->p.logits && last ? j->p.logits : NULL;
            double t0 = mmb__now_s();
            if (ids) s = mmb_lm_embed(ctx, m->lm, ch->ids + off, piece, buf);
            if (s == MMB_OK && m->xattn)
                s = mmb__xattn_feed(ctx, m->xattn, mmb_kv_cache_len(kv), ids ? ch->ids + off : NULL, piece, false);
            const bool image = ch->type == MMB_CHUNK_IMAGE && !m->xattn;
            mmb__lm_rows rw = {image ? experts : NULL, image ? rope : NULL, NULL};
            for (int64_t k = 0; rw.expert && k < piece; k++) /* CogVLM: the last (eoi) is a text row's */
                experts[k] = !(m->image_last_text && off + k == ch->n - 1);
            for (int64_t k = 0; rw.rope_pos && k < piece; k++) { /* first p, inner p + 1, last p + 2 */
                int64_t at = off + k;
                rope[k] = rope0 + (at == 0 ? 0 : at < ch->n - 1 ? 1 : ch->n > 2 ? 2 : 1);
            }
            if (s == MMB_OK) s = mmb__lm_forward_rows(ctx, m->lm, kv, x, piece, lg, !j->p.all_logits, &rw);
            if (s == MMB_OK && lg) mask_logits(m, lg, j->p.all_logits ? piece : 1, vocab);
            j->prefill_s += mmb__now_s() - t0;
            off += piece;
            done += piece;
            if (s == MMB_OK && j->p.on_progress) j->p.on_progress(j->p.user, "prefill", done, c->positions);
        }
    }
    free(buf);
    free(media);
    free(experts);
    free(rope);
    return s;
}

mmb_status mmb_mllm_eval(mmb_ctx *ctx, mmb_mllm *m, mmb_kv_cache *kv, const mmb_chunks *chunks,
                         const mmb_eval_params *p) {
    if (!ctx || !m || !kv || !chunks) return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_eval: NULL argument");
    mmb_eval_params dp = {0};
    if (!p) p = &dp;
    eval_job j = {.p = *p};
    return eval_run(ctx, m, kv, chunks, &j);
}

/* ---- generation ----------------------------------------------------------------------------------- */

mmb_gen_params mmb_gen_default_params(void) {
    mmb_gen_params p = {0};
    p.n_predict = 128;
    p.sampler = mmb_sampler_default();
    return p;
}

/* The text generated so far (for stop strings) and the piece handed to on_token. */
typedef struct text_buf {
    char *all;
    size_t len, cap;
} text_buf;

static bool text_add(text_buf *t, const char *s, size_t n) {
    if (t->len + n + 1 > t->cap) {
        size_t cap = (t->len + n + 1) * 2;
        char *b = realloc(t->all, cap);
        if (!b) return false;
        t->all = b;
        t->cap = cap;
    }
    memcpy(t->all + t->len, s, n);
    t->len += n;
    t->all[t->len] = 0;
    return true;
}

/* Whether a stop string lies in all[0, len), looking only where the bytes from `from` on can complete one. */
static bool stop_hit(const mmb_gen_params *p, const char *all, size_t len, size_t from) {
    for (int k = 0; k < p->n_stops; k++) {
        size_t sl = strlen(p->stops[k]), start = from >= sl ? from - sl + 1 : 0;
        if (len >= sl && memmem(all + start, len - start, p->stops[k], sl)) return true;
    }
    return false;
}

mmb_status mmb_mllm_generate(mmb_ctx *ctx, mmb_mllm *m, mmb_kv_cache *kv, const mmb_chunks *prompt,
                             const mmb_gen_params *p, mmb_gen_result *res) {
    if (!ctx || !m || !kv || !prompt) return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_generate: NULL argument");
    mmb_gen_params gp = p ? *p : mmb_gen_default_params();
    if (gp.n_predict < 0 || gp.n_stops < 0 || (gp.n_stops && !gp.stops))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_gen_params: negative n_predict or n_stops, or stops NULL");
    for (int k = 0; k < gp.n_stops; k++)
        if (!gp.stops[k] || !gp.stops[k][0]) return mmb__err(ctx, MMB_ERR_ARG, "stop string %d is NULL or empty", k);
    if (!m->lm) return mmb__err(ctx, MMB_ERR_MISSING, "%s: the model has no language model", m->dir);
    if (gp.n_stops && !m->tok)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: stop strings need the model's tokenizer (tokenizer.json)", m->dir);
    if (prompt->positions < 1) return mmb__err(ctx, MMB_ERR_ARG, "the prompt is empty: nothing to sample from");
    mmb_lm_info li;
    mmb_lm_get_info(m->lm, &li);
    const int64_t vocab = li.vocab, n_prompt = prompt->positions, cap = mmb__kv_cache_cap(kv);
    /* at most one token more than the cache has room for after the prompt (the last is not fed back) */
    const int64_t room = cap - mmb_kv_cache_len(kv) - n_prompt + 1, n_gen = gp.n_predict < room ? gp.n_predict : room;
    const size_t lg_rows = gp.on_logits ? (size_t)n_prompt : 1;
    float *lg = malloc(sizeof(float) * lg_rows * (size_t)vocab);
    float *e1 = malloc(sizeof(float) * (size_t)li.d_model);
    int32_t *gen = malloc(sizeof(int32_t) * (size_t)(n_gen > 0 ? n_gen : 1));
    if (!lg || !e1 || !gen) {
        free(lg); free(e1); free(gen);
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for the logits of %lld positions", (long long)lg_rows);
    }
    eval_job j = {.p = {.n_batch = gp.n_batch, .logits = lg, .all_logits = gp.on_logits != NULL,
                        .on_progress = gp.on_progress, .user = gp.user, .abort = gp.abort}};
    mmb_gen_result r = {.n_prompt = n_prompt};
    mmb_status s = eval_run(ctx, m, kv, prompt, &j);
    r.encode_s = j.encode_s;
    r.prefill_s = j.prefill_s;
    r.stop = MMB_STOP_LENGTH;
    if (s == MMB_ERR_ABORTED) r.stop = MMB_STOP_ABORT;
    if (s == MMB_OK && gp.on_logits) gp.on_logits(gp.user, lg, n_prompt, vocab);
    const float *last = lg + (lg_rows - 1) * (size_t)vocab;
    text_buf text = {0}, piece = {0};
    size_t emitted = 0;
    double t0 = mmb__now_s();
    for (int64_t g = 0; s == MMB_OK && g < gp.n_predict; g++) {
        if (aborted(gp.abort)) { r.stop = MMB_STOP_ABORT; break; }
        int32_t t;
        if ((s = mmb_sample(ctx, &gp.sampler, last, vocab, &t)) != MMB_OK) break;
        gen[g] = t;
        r.n_generated = g + 1;
        bool eos = false;
        for (int k = 0; k < m->n_eos && !gp.ignore_eos; k++) eos |= t == m->eos[k];
        const bool last_tok = g + 1 == gp.n_predict || mmb_kv_cache_len(kv) >= cap;
        int reason = eos ? MMB_STOP_EOS : -1;
        /* The text this token completes: held-back bytes are flushed with the last token, and with a token
         * that completes a stop string (it becomes the last). */
        piece.len = 0;
        for (int flush = eos || last_tok; m->tok; flush = 1) {
            char *bytes = NULL;
            size_t n = 0, from = text.len;
            if ((s = mmb_tokenizer_decode_stream(ctx, m->tok, gen, g + 1, 1, flush, &emitted, &bytes, &n)) != MMB_OK)
                break;
            bool ok = text_add(&piece, bytes, n) && (!gp.n_stops || text_add(&text, bytes, n));
            free(bytes);
            if (!ok) { s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for the generated text"); break; }
            if (reason < 0 && stop_hit(&gp, text.all, text.len, from)) reason = MMB_STOP_STRING;
            if (flush || reason < 0) break;
        }
        if (s != MMB_OK) break;
        if (gp.on_token && gp.on_token(gp.user, t, piece.len ? piece.all : "", piece.len) && reason < 0)
            reason = MMB_STOP_CALLBACK;
        if (reason < 0 && last_tok) reason = g + 1 == gp.n_predict ? MMB_STOP_LENGTH : MMB_STOP_CONTEXT;
        if (reason >= 0) { r.stop = (mmb_stop)reason; break; }
        if ((s = mmb_lm_embed(ctx, m->lm, &t, 1, e1)) != MMB_OK ||
            (m->xattn && (s = mmb__xattn_feed(ctx, m->xattn, mmb_kv_cache_len(kv), &t, 1, true)) != MMB_OK) ||
            (s = mmb_lm_forward(ctx, m->lm, kv, e1, 1, lg, 1)) != MMB_OK)
            break;
        mask_logits(m, lg, 1, vocab);
        last = lg;
        if (gp.on_logits) gp.on_logits(gp.user, lg, 1, vocab);
        if (gp.on_progress) gp.on_progress(gp.user, "decode", g + 1, gp.n_predict);
    }
    r.decode_s = mmb__now_s() - t0;
    free(text.all);
    free(piece.all);
    free(gen);
    free(e1);
    free(lg);
    if ((s == MMB_OK || s == MMB_ERR_ABORTED) && res) *res = r;
    return s;
}
