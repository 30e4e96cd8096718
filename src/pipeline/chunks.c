/* Prompts as chunk lists (mmb_chunks): runs of token ids, preprocessed images and rows of embeddings, in
 * order, as llama.cpp's mtmd_input_chunks; and a prompt's text with image markers cut into one. */
#include "pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

mmb_status mmb_chunks_new(mmb_ctx *ctx, mmb_chunks **out) {
    if (!out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_chunks_new: NULL argument");
    mmb_chunks *c = calloc(1, sizeof *c);
    if (!c) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    *out = c;
    return MMB_OK;
}

void mmb_chunks_free(mmb_chunks *c) {
    if (!c) return;
    for (int i = 0; i < c->n; i++) {
        free(c->c[i].ids);
        free(c->c[i].data);
    }
    free(c->c);
    free(c);
}

/* Appends ch, taking over its buffers (freed here on failure). */
static mmb_status push(mmb_ctx *ctx, mmb_chunks *c, mmb_chunk ch) {
    if (c->n == c->cap) {
        int cap = c->cap ? 2 * c->cap : 8;
        mmb_chunk *nc = realloc(c->c, sizeof *nc * (size_t)cap);
        if (!nc) {
            free(ch.ids);
            free(ch.data);
            return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        }
        c->c = nc;
        c->cap = cap;
    }
    c->c[c->n++] = ch;
    c->positions += ch.n;
    c->n_images += ch.type == MMB_CHUNK_IMAGE;
    return MMB_OK;
}

static mmb_status need_lm(mmb_ctx *ctx, const mmb_mllm *m) {
    return m->lm ? MMB_OK : mmb__err(ctx, MMB_ERR_MISSING, "%s: the model has no language model", m->dir);
}

/* ids[0, n) inside m's vocabulary; the message gives the first id outside and its position. */
static mmb_status check_ids(mmb_ctx *ctx, const mmb_mllm *m, const int32_t *ids, int64_t n) {
    mmb_lm_info li;
    mmb_lm_get_info(m->lm, &li);
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= li.embed_rows)
            return mmb__err(ctx, MMB_ERR_ARG, "token id %d at position %lld is outside the vocabulary [0, %lld)",
                            (int)ids[i], (long long)i, (long long)li.embed_rows);
    return MMB_OK;
}

mmb_status mmb_chunks_add_text(mmb_ctx *ctx, const mmb_mllm *m, mmb_chunks *c, const int32_t *ids, int64_t n) {
    if (!m || !c || !ids || n < 1) return mmb__err(ctx, MMB_ERR_ARG, "mmb_chunks_add_text: NULL argument or n < 1");
    mmb_status s = need_lm(ctx, m);
    if (s == MMB_OK) s = check_ids(ctx, m, ids, n);
    if (s != MMB_OK) return s;
    mmb_chunk ch = {.type = MMB_CHUNK_TEXT, .n = n, .ids = malloc(sizeof(int32_t) * (size_t)n)};
    if (!ch.ids) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %lld ids", (long long)n);
    memcpy(ch.ids, ids, sizeof(int32_t) * (size_t)n);
    return push(ctx, c, ch);
}

mmb_status mmb_chunks_add_image(mmb_ctx *ctx, const mmb_mllm *m, mmb_chunks *c, const mmb_image *img) {
    if (!m || !c || !img) return mmb__err(ctx, MMB_ERR_ARG, "mmb_chunks_add_image: NULL argument");
    mmb_chunk ch = {.type = MMB_CHUNK_IMAGE};
    mmb_status s = need_lm(ctx, m);
    if (s == MMB_OK && m->xattn && m->info.image_token < 0)
        s = mmb__err(ctx, MMB_ERR_MISSING, "%s: the model's images need their marker token (%s), which the "
                     "tokenizer lacks", m->dir, m->info.image_marker);
    if (s == MMB_OK) s = mmb__mllm_preprocess(ctx, m, img, &ch.data, &ch.h, &ch.w, &ch.n);
    if (s == MMB_OK && mmb__adapter_rows(m->adapter)) ch.n = 0; /* LLaMA-Adapter V2: it becomes the prompts */
    if (s == MMB_OK && m->xattn) { /* fusion A: the image is its marker token's one position in the text */
        ch.n = 1;
        if (!(ch.ids = malloc(sizeof(int32_t)))) {
            free(ch.data);
            return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        }
        ch.ids[0] = m->info.image_token;
    }
    return s == MMB_OK ? push(ctx, c, ch) : s;
}

mmb_status mmb_chunks_add_embeds(mmb_ctx *ctx, const mmb_mllm *m, mmb_chunks *c, const float *rows, int64_t n,
                                 int64_t width) {
    if (!m || !c || !rows || n < 1) return mmb__err(ctx, MMB_ERR_ARG, "mmb_chunks_add_embeds: NULL argument or n < 1");
    mmb_status s = need_lm(ctx, m);
    if (s != MMB_OK) return s;
    mmb_lm_info li;
    mmb_lm_get_info(m->lm, &li);
    if (width != li.d_model)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_chunks_add_embeds: rows of width %lld, the LLM takes %lld",
                        (long long)width, (long long)li.d_model);
    size_t count = (size_t)n * (size_t)width;
    mmb_chunk ch = {.type = MMB_CHUNK_EMBED, .n = n, .width = width, .data = malloc(sizeof(float) * count)};
    if (!ch.data) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %lld rows", (long long)n);
    memcpy(ch.data, rows, sizeof(float) * count);
    return push(ctx, c, ch);
}

int mmb_chunks_count(const mmb_chunks *c) { return c ? c->n : 0; }

mmb_chunk_type mmb_chunks_type(const mmb_chunks *c, int i) {
    return c && i >= 0 && i < c->n ? c->c[i].type : MMB_CHUNK_TEXT;
}

int64_t mmb_chunk_positions(const mmb_chunks *c, int i) { return c && i >= 0 && i < c->n ? c->c[i].n : 0; }

int64_t mmb_chunks_positions(const mmb_chunks *c) { return c ? c->positions : 0; }

const int32_t *mmb_chunks_text(const mmb_chunks *c, int i, int64_t *n) {
    if (!c || i < 0 || i >= c->n || c->c[i].type != MMB_CHUNK_TEXT) return NULL;
    if (n) *n = c->c[i].n;
    return c->c[i].ids;
}

/* ---- from ids, from a prompt ----------------------------------------------------------------------- */

mmb_status mmb_mllm_chunks_from_ids(mmb_ctx *ctx, const mmb_mllm *m, const int32_t *ids, int64_t n,
                                    const mmb_image *imgs, int n_images, mmb_chunks **out) {
    if (!ctx || !m || !out || n < 0 || (n && !ids) || n_images < 0 || (n_images && !imgs))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_chunks_from_ids: NULL argument or a negative count");
    mmb_status s = need_lm(ctx, m);
    if (s == MMB_OK) s = check_ids(ctx, m, ids, n);
    if (s != MMB_OK) return s;
    mmb_chunks *c = NULL;
    if (mmb__adapter_rows(m->adapter)) { /* LLaMA-Adapter V2: its one image is no text, it goes in front */
        if (n_images > 1)
            return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: LLaMA-Adapter V2 takes one image per prompt, %d were "
                            "given", m->dir, n_images);
        if ((s = mmb_chunks_new(ctx, &c)) != MMB_OK) return s;
        if (n_images) s = mmb_chunks_add_image(ctx, m, c, &imgs[0]);
        if (s == MMB_OK && n) s = mmb_chunks_add_text(ctx, m, c, ids, n);
        if (s != MMB_OK) mmb_chunks_free(c);
        else *out = c;
        return s;
    }
    const int32_t img_tok = m->info.image_token;
    int64_t placeholders = 0;
    for (int64_t i = 0; i < n; i++) placeholders += img_tok >= 0 && ids[i] == img_tok;
    if (placeholders != n_images)
        return mmb__err(ctx, MMB_ERR_ARG, "the prompt has %lld image placeholder(s) (token %d) but %d image(s) were "
                        "given", (long long)placeholders, (int)img_tok, n_images);
    if ((s = mmb_chunks_new(ctx, &c)) != MMB_OK) return s;
    for (int64_t i = 0, k = 0; i < n && s == MMB_OK;) {
        int64_t j = i;
        while (j < n && !(img_tok >= 0 && ids[j] == img_tok)) j++;
        if (j > i) s = mmb_chunks_add_text(ctx, m, c, ids + i, j - i);
        else s = mmb_chunks_add_image(ctx, m, c, &imgs[k++]), j++;
        i = j;
    }
    if (s != MMB_OK) {
        mmb_chunks_free(c);
        return s;
    }
    *out = c;
    return MMB_OK;
}

/* IDEFICS' processor on a prompt with image markers: each piece of text between them stripped of spaces
 * (item.strip(" ")), and each marker wrapped: wrap marker wrap, or marker wrap right after another image
 * (nothing but spaces between). *text is replaced. */
static mmb_status wrap_markers(mmb_ctx *ctx, const char *marker, const char *wrap, char **text) {
    size_t ml = strlen(marker), wl = strlen(wrap), n = 0;
    for (const char *q = strstr(*text, marker); q; q = strstr(q + ml, marker)) n++;
    char *out = malloc(strlen(*text) + n * 2 * wl + 1), *o = out;
    if (!out) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    bool after_image = false;
    for (const char *p = *text;;) {
        const char *q = strstr(p, marker), *e = q ? q : p + strlen(p);
        while (p < e && *p == ' ') p++;
        while (e > p && e[-1] == ' ') e--;
        if (e > p) after_image = false;
        memcpy(o, p, (size_t)(e - p));
        o += e - p;
        if (!q) break;
        o += sprintf(o, "%s%s%s", after_image ? "" : wrap, marker, wrap);
        after_image = true;
        p = q + ml;
    }
    *o = 0;
    free(*text);
    *text = out;
    return MMB_OK;
}

/* Fusion D's processors (ChameleonProcessor, Emu3Processor) on a prompt with image markers: each marker k becomes
 * before marker after, "%h" and "%w" in them the rows and columns of image k's code grid (its processed size over
 * the VQ's downsampling). *text is replaced. */
static mmb_status expand_markers(mmb_ctx *ctx, const mmb_mllm *m, const char *marker, const mmb_image *imgs,
                                 int n_images, char **text) {
    const char *before = m->image_before ? m->image_before : "", *after = m->image_after ? m->image_after : "";
    mmb_model_info mi;
    mmb_model_get_info(m->model, &mi);
    size_t ml = strlen(marker), cap = strlen(*text) + 1, len = 0;
    for (const char *q = strstr(*text, marker); q; q = strstr(q + ml, marker))
        cap += 6 * (strlen(before) + strlen(after)); /* a 2-character %h or %w: at most 11 digits */
    char *out = malloc(cap);
    if (!out) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    int k = 0;
    for (const char *p = *text;; k++) {
        const char *q = strstr(p, marker), *e = q ? q : p + strlen(p);
        memcpy(out + len, p, (size_t)(e - p));
        len += (size_t)(e - p);
        if (!q) break;
        int oh = 0, ow = 0, f = mi.patch_size > 0 ? mi.patch_size : 1;
        mmb_status s = k < n_images ? mmb_preprocess_output_size(ctx, &m->proc, imgs[k].height, imgs[k].width, &oh, &ow)
                                    : MMB_OK;
        if (s != MMB_OK) {
            free(out);
            return s;
        }
        for (int part = 0; part < 2; part++) {
            for (const char *t = part ? after : before; *t; t++) {
                if (t[0] == '%' && (t[1] == 'h' || t[1] == 'w')) {
                    len += (size_t)sprintf(out + len, "%d", (t[1] == 'h' ? oh : ow) / f);
                    t++;
                } else {
                    out[len++] = *t;
                }
            }
            if (!part) {
                memcpy(out + len, marker, ml);
                len += ml;
            }
        }
        p = q + ml;
    }
    out[len] = 0;
    free(*text);
    *text = out;
    return MMB_OK;
}

/* MllamaProcessor's build_string_from_input: a prompt without the BOS text gets it after its leading image
 * markers (the tokenizer then adds its own in front). *text is replaced. */
static mmb_status bos_after_images(mmb_ctx *ctx, const mmb_mllm *m, const char *marker, char **text) {
    const char *bos = mmb_tokenizer_token_text(m->tok, mmb_tokenizer_bos_id(m->tok));
    if (!bos || !*bos || strstr(*text, bos)) return MMB_OK;
    size_t ml = strlen(marker), lead = 0, bl = strlen(bos), n = strlen(*text);
    while (ml && strncmp(*text + lead, marker, ml) == 0) lead += ml;
    char *out = malloc(n + bl + 1);
    if (!out) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    memcpy(out, *text, lead);
    memcpy(out + lead, bos, bl);
    memcpy(out + lead + bl, *text + lead, n - lead + 1);
    free(*text);
    *text = out;
    return MMB_OK;
}

/* CogVLM's build_conversation_input_ids: [BOS], the image's rows, then the text (chat: m->query_fmt around the
 * prompt) tokenized without special tokens. */
static mmb_status image_first_prompt(mmb_ctx *ctx, const mmb_mllm *m, const char *prompt, const mmb_image *imgs,
                                     int n_images, int flags, mmb_chunks **out) {
    if (n_images > 1)
        return mmb__err(ctx, MMB_ERR_ARG, "%s: a %s prompt takes at most one image (build_conversation_input_ids); %d "
                        "were given", m->dir, m->info.family, n_images);
    const char *fmt = flags == MMB_TOKENIZE_CHAT ? m->query_fmt : "%s";
    size_t len = strlen(fmt) + strlen(prompt) + 1;
    char *text = malloc(len);
    if (!text) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    snprintf(text, len, fmt, prompt);
    int32_t *ids = NULL, bos = mmb_tokenizer_bos_id(m->tok);
    int64_t n = 0;
    mmb_chunks *c = NULL;
    mmb_status s = mmb_tokenizer_encode(ctx, m->tok, text, strlen(text), 0, &ids, &n);
    free(text);
    if (s == MMB_OK) s = mmb_chunks_new(ctx, &c);
    if (s == MMB_OK && bos >= 0) s = mmb_chunks_add_text(ctx, m, c, &bos, 1);
    if (s == MMB_OK && n_images) s = mmb_chunks_add_image(ctx, m, c, &imgs[0]);
    if (s == MMB_OK && n) s = mmb_chunks_add_text(ctx, m, c, ids, n);
    free(ids);
    if (s != MMB_OK) {
        mmb_chunks_free(c);
        return s;
    }
    *out = c;
    return MMB_OK;
}

/* LLaVA's tokenizer_image_token, for a marker the tokenizer has no token for (original LLaVA's <image>,
 * mPLUG-Owl2's <|image|>): the text cut at each marker, each piece tokenized on its own (with the tokenizer's
 * specials when `special`), the BOS a piece then starts with dropped but for the first piece's, and the images
 * between the pieces. */
static mmb_status split_at_markers(mmb_ctx *ctx, const mmb_mllm *m, const char *text, const char *marker,
                                   bool special, const mmb_image *imgs, int n_images, mmb_chunks **out) {
    mmb_chunks *c = NULL;
    mmb_status s = mmb_chunks_new(ctx, &c);
    const size_t ml = strlen(marker);
    const int32_t bos = mmb_tokenizer_bos_id(m->tok);
    bool first_bos = false;
    int k = 0;
    for (const char *p = text; s == MMB_OK;) {
        const char *q = strstr(p, marker), *e = q ? q : p + strlen(p);
        int32_t *ids = NULL;
        int64_t n = 0;
        s = mmb_tokenizer_encode(ctx, m->tok, p, (size_t)(e - p), special, &ids, &n);
        if (s == MMB_OK && p == text) first_bos = n > 0 && bos >= 0 && ids[0] == bos;
        int64_t skip = p != text && first_bos && n > 0 && ids[0] == bos; /* x[offset:] */
        if (s == MMB_OK && n > skip) s = mmb_chunks_add_text(ctx, m, c, ids + skip, n - skip);
        free(ids);
        if (!q || s != MMB_OK) break;
        if (k >= n_images) {
            s = mmb__err(ctx, MMB_ERR_ARG, "the prompt holds more image markers '%s' than the %d image(s) given",
                         marker, n_images);
            break;
        }
        s = mmb_chunks_add_image(ctx, m, c, &imgs[k++]);
        p = q + ml;
    }
    if (s == MMB_OK && k != n_images)
        s = mmb__err(ctx, MMB_ERR_ARG, "the prompt holds %d image marker(s) '%s' but %d image(s) were given", k,
                     marker, n_images);
    if (s != MMB_OK) {
        mmb_chunks_free(c);
        return s;
    }
    *out = c;
    return MMB_OK;
}

/* The checks every chat or raw tokenization starts with; the marker images stand for in *marker ("" for
 * LLaMA-Adapter V2, whose images are no text). */
static mmb_status tokenize_checks(mmb_ctx *ctx, const mmb_mllm *m, int n_images, int flags, const char **marker) {
    mmb_status s = need_lm(ctx, m);
    if (s != MMB_OK) return s;
    if (!m->tok) return mmb__err(ctx, MMB_ERR_MISSING, "%s: no tokenizer: %s", m->dir, m->no_tok);
    if (flags == MMB_TOKENIZE_CHAT && !m->info.has_chat_template && !m->query_fmt)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: the tokenizer has no chat template (tokenize with "
                        "MMB_TOKENIZE_RAW)", m->dir);
    *marker = mmb__adapter_rows(m->adapter) ? "" : m->info.image_marker;
    if (n_images && !**marker && !mmb__adapter_rows(m->adapter) && !m->query_fmt)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s: the model has no image marker (config.json names no image token, "
                        "or the tokenizer has none with its id %d)", m->dir, (int)m->info.image_token);
    return MMB_OK;
}

static int count_markers(const char *text, const char *marker) {
    size_t ml = strlen(marker);
    int k = 0;
    for (const char *q = ml ? strstr(text, marker) : NULL; q; q = strstr(q + ml, marker)) k++;
    return k;
}

/* *text (malloc'd) with each marker made what the family's processor writes for its image (imgs[0, n_images), in
 * order): IDEFICS' wrap, the VQ families' text around it, Mllama's raw BOS after the images. *text is replaced. */
static mmb_status family_markers(mmb_ctx *ctx, const mmb_mllm *m, const char *marker, const mmb_image *imgs,
                                 int n_images, int raw, char **text) {
    mmb_status s = MMB_OK;
    if (m->image_wrap) s = wrap_markers(ctx, marker, m->image_wrap, text);
    if (s == MMB_OK && (m->image_before || m->image_after)) s = expand_markers(ctx, m, marker, imgs, n_images, text);
    if (s == MMB_OK && m->raw_bos && raw) s = bos_after_images(ctx, m, marker, text);
    return s;
}

/* The final text (rendered or raw) into chunks: cut at a text marker, or tokenized whole and cut at the image
 * token's ids. */
static mmb_status text_to_chunks(mmb_ctx *ctx, const mmb_mllm *m, const char *in, const char *marker, int raw,
                                 const mmb_image *imgs, int n_images, mmb_chunks **out) {
    if (*marker && m->info.image_token < 0) return split_at_markers(ctx, m, in, marker, raw, imgs, n_images, out);
    int32_t *ids = NULL;
    int64_t n = 0;
    mmb_status s = mmb_tokenizer_encode(ctx, m->tok, in, strlen(in), raw, &ids, &n);
    if (s == MMB_OK) s = mmb_mllm_chunks_from_ids(ctx, m, ids, n, imgs, n_images, out);
    free(ids);
    return s;
}

mmb_status mmb_mllm_tokenize(mmb_ctx *ctx, const mmb_mllm *m, const char *prompt, const mmb_image *imgs,
                             int n_images, int flags, mmb_chunks **out) {
    if (!ctx || !m || !prompt || !out || n_images < 0 || (n_images && !imgs) ||
        (flags != MMB_TOKENIZE_RAW && flags != MMB_TOKENIZE_CHAT))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_tokenize: NULL argument, a negative count or unknown flags");
    const char *marker = "";
    mmb_status s = tokenize_checks(ctx, m, n_images, flags, &marker);
    if (s != MMB_OK) return s;
    if (m->query_fmt) return image_first_prompt(ctx, m, prompt, imgs, n_images, flags, out);
    size_t ml = strlen(marker);
    int markers = count_markers(prompt, marker);
    if (markers && markers != n_images)
        return mmb__err(ctx, MMB_ERR_ARG, "the prompt holds %d image marker(s) '%s' but %d image(s) were given",
                        markers, marker, n_images);
    /* No marker: one per image in front, each on its own line (IDEFICS' processor: the images first). */
    const char sep = m->image_wrap ? ' ' : '\n';
    size_t lead = markers || !ml ? 0 : (ml + 1) * (size_t)n_images, pl = strlen(prompt);
    char *text = malloc(lead + pl + 1), *rendered = NULL;
    if (!text) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int k = 0; lead && k < n_images; k++) {
        memcpy(text + (size_t)k * (ml + 1), marker, ml);
        text[(size_t)k * (ml + 1) + ml] = sep;
    }
    memcpy(text + lead, prompt, pl + 1);
    s = family_markers(ctx, m, marker, imgs, n_images, flags == MMB_TOKENIZE_RAW, &text);
    if (s == MMB_OK && flags == MMB_TOKENIZE_CHAT) {
        mmb_chat_msg msg = {"user", text};
        s = mmb_chat_render(ctx, m->tok, &msg, 1, 1, &rendered);
    }
    if (s == MMB_OK)
        s = text_to_chunks(ctx, m, rendered ? rendered : text, marker, flags == MMB_TOKENIZE_RAW, imgs, n_images, out);
    free(rendered);
    free(text);
    return s;
}

mmb_status mmb_mllm_tokenize_chat(mmb_ctx *ctx, const mmb_mllm *m, const mmb_chat_msg *msgs, int n_msgs,
                                  const mmb_image *imgs, int n_images, mmb_chunks **out) {
    if (!ctx || !m || !msgs || n_msgs < 1 || !out || n_images < 0 || (n_images && !imgs))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_tokenize_chat: NULL argument or a count below one");
    for (int i = 0; i < n_msgs; i++)
        if (!msgs[i].role || !msgs[i].content)
            return mmb__err(ctx, MMB_ERR_ARG, "mmb_mllm_tokenize_chat: message %d has a NULL role or content", i);
    const char *marker = "";
    mmb_status s = tokenize_checks(ctx, m, n_images, MMB_TOKENIZE_CHAT, &marker);
    if (s != MMB_OK) return s;
    if (m->query_fmt)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a %s prompt is one query with its image "
                        "(build_conversation_input_ids): use mmb_mllm_tokenize", m->dir, m->info.family);
    int total = 0;
    for (int i = 0; i < n_msgs; i++) total += count_markers(msgs[i].content, marker);
    if (total != n_images)
        return mmb__err(ctx, MMB_ERR_ARG, "the messages hold %d image marker(s) '%s' but %d image(s) were given",
                        total, marker, n_images);
    mmb_chat_msg *conv = calloc((size_t)n_msgs, sizeof *conv);
    char **texts = calloc((size_t)n_msgs, sizeof *texts), *rendered = NULL;
    if (!conv || !texts) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int i = 0, first = 0; i < n_msgs && s == MMB_OK; i++) {
        int k = count_markers(msgs[i].content, marker);
        if (!(texts[i] = strdup(msgs[i].content))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        if (s == MMB_OK) s = family_markers(ctx, m, marker, imgs + first, k, 0, &texts[i]);
        conv[i] = (mmb_chat_msg){msgs[i].role, texts[i]};
        first += k;
    }
    if (s == MMB_OK) s = mmb_chat_render(ctx, m->tok, conv, n_msgs, 1, &rendered);
    if (s == MMB_OK) s = text_to_chunks(ctx, m, rendered, marker, 0, imgs, n_images, out);
    for (int i = 0; texts && i < n_msgs; i++) free(texts[i]);
    free(texts);
    free(conv);
    free(rendered);
    return s;
}
