/* The multimodal model (mmb_mllm) on tiny checkpoints written here: a transformers-layout LLaVA (CLIP tower,
 * projector, Llama, byte-level tokenizer with a ChatML template), a CLIP vision tower alone and a Llama alone.
 * Runs the header's usage example; checks the chunk bookkeeping, the abort flag, a full context, bad inputs
 * (outputs untouched), and that the embeddings and hidden states are mmb_model_encode's and mmb_vit_forward's
 * bit for bit, with the prompt spliced where the image marker is (a splice one position off is caught). */
#include "check.h"
#include "mmbridge.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "mllm_fixture.h"

/* ---- the header's example ---- */

typedef struct collect {
    char text[4096];
    size_t len;
    int32_t ids[256];
    int n;
} collect;

static int print_piece(void *user, int32_t id, const char *piece, size_t len) {
    collect *c = user;
    if (c->len + len < sizeof c->text) {
        memcpy(c->text + c->len, piece, len);
        c->len += len;
        c->text[c->len] = 0;
    }
    if (c->n < 256) c->ids[c->n++] = id;
    return 0;
}

static void test_example(void) {
    mmb_ctx *ctx; mmb_ctx_params cp = mmb_ctx_default_params();
    mmb_ctx_new(&cp, &ctx);
    mmb_mllm *m;
    if (mmb_mllm_open(ctx, LLAVA, NULL, &m) != MMB_OK) { puts(mmb_ctx_error(ctx)); CHECK(0, "open"); return; }
    mmb_mllm_info info;  mmb_mllm_get_info(m, &info);
    mmb_image img = test_image(1);                       /* the example's mmb_image_load(ctx, "cat.jpg", 0, &img) */
    mmb_chunks *prompt;                                           // "<image>\nWhat is this?" through
    mmb_mllm_tokenize(ctx, m, "What is this?", &img, 1, MMB_TOKENIZE_CHAT, &prompt);   // the template
    mmb_kv_cache *kv;  mmb_mllm_kv_new(ctx, m, mmb_chunks_positions(prompt) + 64, &kv);
    mmb_gen_params gp = mmb_gen_default_params();
    collect col = {0};
    gp.n_predict = 64;  gp.on_token = print_piece;  gp.user = &col;  // streamed text pieces
    mmb_gen_result res;
    CHECK(mmb_mllm_generate(ctx, m, kv, prompt, &gp, &res) == MMB_OK, "%s", mmb_ctx_error(ctx)); // res.stop: why
    /* the cache was clamped to the context (64): the 37-position prompt leaves room for 28 tokens (the last is not
     * fed back) */
    int64_t np = mmb_chunks_positions(prompt);
    CHECK(res.n_prompt == np && np == 37 && res.n_generated == col.n && res.n_generated >= 1, "prompt %lld, %lld "
          "generated, %d handed out", (long long)res.n_prompt, (long long)res.n_generated, col.n);
    CHECK(res.stop == MMB_STOP_EOS ? col.ids[col.n - 1] == 257 : res.stop == MMB_STOP_CONTEXT && col.n == CTX - np + 1,
          "stop %d after %d tokens", (int)res.stop, col.n);
    CHECK(res.encode_s > 0 && res.prefill_s > 0 && res.decode_s >= 0, "timings");
    char *text = NULL;
    size_t len = 0;
    mmb_tokenizer_decode(ctx, mmb_mllm_tokenizer(m), col.ids, col.n, 1, &text, &len);
    CHECK(text && len == col.len && memcmp(text, col.text, len) == 0, "streamed text = decode: '%s' vs '%s'", col.text,
          text ? text : "");
    free(text);
    mmb_chunks_free(prompt); mmb_kv_cache_free(kv); mmb_image_free(&img);
    mmb_mllm_free(m); mmb_ctx_free(ctx);
}

/* ---- info, chunks ---- */

static void test_info_and_chunks(mmb_ctx *ctx, mmb_mllm *m) {
    mmb_mllm_info in;
    CHECK(mmb_mllm_get_info(m, &in) == MMB_OK, "info");
    CHECK(!strcmp(in.family, "llava") && !strcmp(in.architecture, "LlavaForConditionalGeneration") &&
          in.fusion == MMB_FUSION_C && !strcmp(mmb_fusion_name(in.fusion), "C"), "family %s fusion %d", in.family,
          (int)in.fusion);
    CHECK(in.has_vision && in.has_connector && in.has_lm && in.has_tokenizer && in.has_processor &&
          in.has_chat_template, "has all");
    CHECK(in.vision_layers == VL && in.vision_width == VD && in.vision_tokens == VT && in.out_width == D &&
          in.tokens_per_image == 4 && in.image_size == IMG && in.context == CTX, "shapes");
    CHECK(!strcmp(in.image_marker, "<image>") && in.image_token == IMG_TOK && !strcmp(in.processor,
          "CLIPImageProcessor"), "marker '%s' %d, processor '%s'", in.image_marker, (int)in.image_token, in.processor);
    CHECK(mmb_mllm_model(m) && mmb_mllm_vit(m) && mmb_mllm_lm(m) && mmb_mllm_tokenizer(m) && mmb_mllm_processor(m),
          "parts");
    CHECK(!mmb_mllm_model(NULL) && !mmb_mllm_processor(NULL) && mmb_mllm_get_info(NULL, &in) == MMB_ERR_ARG, "NULL");

    mmb_image imgs[2] = {test_image(2), test_image(3)};
    /* raw, no marker: one per image in front, each on its own line: [image]["\n"][image]["\nhi"] */
    mmb_chunks *c = NULL;
    CHECK(mmb_mllm_tokenize(ctx, m, "hi", imgs, 2, MMB_TOKENIZE_RAW, &c) == MMB_OK, "%s", mmb_ctx_error(ctx));
    int64_t n = 0;
    CHECK(mmb_chunks_count(c) == 4 && mmb_chunks_type(c, 0) == MMB_CHUNK_IMAGE && mmb_chunks_type(c, 2) ==
          MMB_CHUNK_IMAGE && mmb_chunks_type(c, 3) == MMB_CHUNK_TEXT, "4 chunks, images first");
    const int32_t *ids = mmb_chunks_text(c, 3, &n);
    CHECK(ids && n == 3 && ids[0] == '\n' && ids[1] == 'h' && ids[2] == 'i', "text chunk");
    CHECK(mmb_chunk_positions(c, 0) == 4 && mmb_chunk_positions(c, 1) == 1 && mmb_chunks_positions(c) == 4 + 1 + 4 + 3,
          "positions %lld", (long long)mmb_chunks_positions(c));
    CHECK(!mmb_chunks_text(c, 0, &n) && !mmb_chunks_text(c, 9, &n) && mmb_chunk_positions(c, -1) == 0 &&
          mmb_chunks_type(NULL, 0) == MMB_CHUNK_TEXT && mmb_chunks_count(NULL) == 0, "out of range");
    /* appending: text, embeddings (the LLM's width only), ids checked */
    float rows[2 * D] = {0};
    int32_t bad[2] = {5, V};
    CHECK(mmb_chunks_add_embeds(ctx, m, c, rows, 2, D) == MMB_OK && mmb_chunks_count(c) == 5 &&
          mmb_chunks_positions(c) == 14, "add embeds");
    CHECK(mmb_chunks_add_embeds(ctx, m, c, rows, 2, D - 1) == MMB_ERR_ARG, "embeds width");
    CHECK(mmb_chunks_add_text(ctx, m, c, bad, 2) == MMB_ERR_ARG && strstr(mmb_ctx_error(ctx), "token id 260") &&
          mmb_chunks_count(c) == 5, "%s", mmb_ctx_error(ctx));
    CHECK(mmb_chunks_add_text(ctx, m, c, bad, 1) == MMB_OK && mmb_chunks_positions(c) == 15, "add text");
    mmb_chunks_free(c);
    /* from ids: each image token takes the next image */
    const int32_t pid[6] = {1, 2, IMG_TOK, 3, IMG_TOK, 4};
    c = NULL;
    CHECK(mmb_mllm_chunks_from_ids(ctx, m, pid, 6, imgs, 2, &c) == MMB_OK && mmb_chunks_count(c) == 5 &&
          mmb_chunks_positions(c) == 4 + 4 + 4, "from ids");
    mmb_chunks_free(c);
    c = (mmb_chunks *)0x1;
    CHECK(mmb_mllm_chunks_from_ids(ctx, m, pid, 6, imgs, 1, &c) == MMB_ERR_ARG && c == (mmb_chunks *)0x1 &&
          strstr(mmb_ctx_error(ctx), "2 image placeholder(s) (token 258) but 1 image(s)"), "%s", mmb_ctx_error(ctx));
    CHECK(mmb_mllm_tokenize(ctx, m, "<image> a <image>", imgs, 1, MMB_TOKENIZE_CHAT, &c) == MMB_ERR_ARG &&
          strstr(mmb_ctx_error(ctx), "2 image marker(s) '<image>' but 1 image(s)") && c == (mmb_chunks *)0x1, "%s",
          mmb_ctx_error(ctx));
    CHECK(mmb_mllm_tokenize(ctx, m, "x", imgs, 1, 7, &c) == MMB_ERR_ARG, "flags");
    mmb_image_free(&imgs[0]);
    mmb_image_free(&imgs[1]);
}

/* ---- the same numbers as the parts ---- */

static void test_equals_parts(mmb_ctx *ctx, mmb_mllm *m) {
    mmb_image imgs[2] = {test_image(4), test_image(5)};
    const mmb_preprocess *pp = mmb_mllm_processor(m);
    static float px[2 * 3 * IMG * IMG], ref[2 * 4 * D], emb[2 * 4 * D], hid0[2 * VT * VD], hid1[2 * VT * VD],
        vref[2][2 * VT * VD];
    for (int i = 0; i < 2; i++)
        CHECK(mmb_preprocess_run(ctx, pp, &imgs[i], px + i * 3 * IMG * IMG, 3 * IMG * IMG) == MMB_OK, "preprocess");
    CHECK(mmb_model_encode(ctx, mmb_mllm_model(m), px, 2, IMG, IMG, ref, 2 * 4 * D) == MMB_OK, "%s", mmb_ctx_error(ctx));
    const int taps[2] = {0, -1};
    float *vouts[2] = {vref[0], vref[1]};
    CHECK(mmb_vit_forward(ctx, mmb_mllm_vit(m), px, 2, taps, 2, vouts) == MMB_OK, "vit");
    int64_t tok[2] = {0};
    mmb_encode_out o = {.embeddings = emb, .embeddings_count = 2 * 4 * D, .tokens = tok, .n_taps = 2, .taps = {0, -1},
                        .hidden = {hid0, hid1}, .hidden_count = 2 * VT * VD};
    CHECK(mmb_mllm_encode(ctx, m, imgs, 2, &o) == MMB_OK, "%s", mmb_ctx_error(ctx));
    CHECK(tok[0] == 4 && tok[1] == 4 && mmb_mllm_encode_size(ctx, m, imgs, 2, tok) == 8, "tokens");
    CHECK(memcmp(emb, ref, sizeof emb) == 0, "embeddings = mmb_model_encode's, bit for bit");
    CHECK(memcmp(hid0, vref[0], sizeof hid0) == 0 && memcmp(hid1, vref[1], sizeof hid1) == 0,
          "hidden states = mmb_vit_forward's, bit for bit");
    CHECK(memcmp(emb, emb + 4 * D, 4 * D * sizeof(float)) != 0, "the two images differ");
    /* the same from the preprocessed pixels, and the size the tower refuses */
    static float emb2[2 * 4 * D], hid2[2 * VT * VD];
    int64_t tok2[2] = {0};
    mmb_encode_out o2 = {.embeddings = emb2, .embeddings_count = 2 * 4 * D, .tokens = tok2, .n_taps = 1, .taps = {-1},
                         .hidden = {hid2}, .hidden_count = 2 * VT * VD};
    CHECK(mmb_mllm_pixel_tokens(ctx, m, IMG, IMG) == 4 && mmb_mllm_pixel_tokens(ctx, m, IMG + 1, IMG) == -1,
          "pixel tokens");
    CHECK(mmb_mllm_encode_pixels(ctx, m, px, 2, IMG, IMG, &o2) == MMB_OK && tok2[0] == 4 && tok2[1] == 4 &&
          memcmp(emb2, ref, sizeof emb2) == 0 && memcmp(hid2, vref[1], sizeof hid2) == 0,
          "encode_pixels = mmb_model_encode and mmb_vit_forward, bit for bit: %s", mmb_ctx_error(ctx));
    emb2[0] = 12345.0f;
    CHECK(mmb_mllm_encode_pixels(ctx, m, px, 2, IMG + 1, IMG + 1, &o2) == MMB_ERR_SHAPE && emb2[0] == 12345.0f,
          "a size the tower refuses, output untouched");

    /* the prompt's logits: eval = one forward of the embeddings spliced by hand at the marker; the image one
     * position later is far off */
    const int32_t pid[5] = {'a', 'b', IMG_TOK, 'c', 'd'};
    mmb_chunks *c = NULL;
    CHECK(mmb_mllm_chunks_from_ids(ctx, m, pid, 5, imgs, 1, &c) == MMB_OK, "chunks");
    const mmb_lm *lm = mmb_mllm_lm(m);
    static float lg[8 * V], lg_ref[8 * V], x[8 * D];
    mmb_kv_cache *kv = NULL;
    CHECK(mmb_mllm_kv_new(ctx, m, 8, &kv) == MMB_OK, "kv");
    mmb_eval_params ep = {.n_batch = 3, .logits = lg, .all_logits = 1};
    CHECK(mmb_mllm_eval(ctx, m, kv, c, &ep) == MMB_OK && mmb_kv_cache_len(kv) == 8, "%s", mmb_ctx_error(ctx));
    double worst[2] = {0};
    for (int variant = 0; variant < 2; variant++) {
        int at = 2 + variant; /* the image's first row */
        const int32_t text[4] = {'a', 'b', 'c', 'd'};
        for (int r = 0, t = 0; r < 8; r++)
            if (r >= at && r < at + 4) memcpy(x + r * D, ref + (r - at) * D, sizeof(float) * D);
            else mmb_lm_embed(ctx, lm, &text[t++], 1, x + r * D);
        mmb_kv_cache_reset(kv);
        CHECK(mmb_lm_forward(ctx, lm, kv, x, 8, lg_ref, 0) == MMB_OK, "forward");
        for (int i = 0; i < 8 * V; i++) worst[variant] = fmax(worst[variant], fabs((double)lg[i] - lg_ref[i]));
    }
    CHECK(worst[0] < 1e-5 && worst[1] > 1e-2, "eval vs spliced by hand: %g; image one position later: %g", worst[0],
          worst[1]);
    mmb_kv_cache_free(kv);
    mmb_chunks_free(c);
    mmb_image_free(&imgs[0]);
    mmb_image_free(&imgs[1]);
}

/* An on_token that asks to stop at its at-th token. */
typedef struct counter {
    int n, at;
} counter;

static int stop_at(void *user, int32_t id, const char *piece, size_t len) {
    counter *c = user;
    (void)id, (void)piece, (void)len;
    return ++c->n == c->at;
}

/* ---- abort, a full context ---- */

typedef struct stopper {
    volatile int flag;
    const char *phase;
    int64_t at;
    int calls;
} stopper;

static void on_progress(void *user, const char *phase, int64_t done, int64_t total) {
    stopper *s = user;
    s->calls++;
    if (!strcmp(phase, s->phase) && done >= s->at) s->flag = 1;
    (void)total;
}

static void test_abort_and_context(mmb_ctx *ctx, mmb_mllm *m) {
    mmb_image img = test_image(6);
    mmb_chunks *c = NULL;
    CHECK(mmb_mllm_tokenize(ctx, m, "Describe.", &img, 1, MMB_TOKENIZE_CHAT, &c) == MMB_OK, "%s", mmb_ctx_error(ctx));
    const int64_t np = mmb_chunks_positions(c);
    mmb_kv_cache *kv = NULL;
    CHECK(mmb_mllm_kv_new(ctx, m, 0, &kv) == MMB_OK, "kv of the whole context");
    /* the prefill stops between two decoder calls; the cache holds what was evaluated */
    stopper st = {.phase = "prefill", .at = 2};
    mmb_eval_params ep = {.n_batch = 2, .on_progress = on_progress, .user = &st, .abort = &st.flag};
    CHECK(mmb_mllm_eval(ctx, m, kv, c, &ep) == MMB_ERR_ABORTED && mmb_kv_cache_len(kv) == 2 &&
          strstr(mmb_ctx_error(ctx), "aborted: 2 of the"), "aborted eval: %lld cached, %s",
          (long long)mmb_kv_cache_len(kv), mmb_ctx_error(ctx));
    /* a generation: during the prompt, MMB_ERR_ABORTED with the result filled */
    mmb_kv_cache_reset(kv);
    st = (stopper){.phase = "encode", .at = 1};
    mmb_gen_params gp = mmb_gen_default_params();
    gp.ignore_eos = 1;
    gp.n_predict = 10;
    gp.on_progress = on_progress;
    gp.user = &st;
    gp.abort = &st.flag;
    mmb_gen_result res = {.n_generated = -1};
    CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_ERR_ABORTED && res.stop == MMB_STOP_ABORT &&
          res.n_generated == 0 && res.encode_s > 0, "aborted in the prompt: stop %d", (int)res.stop);
    /* during decoding: stops cleanly after 3 tokens */
    mmb_kv_cache_reset(kv);
    st = (stopper){.phase = "decode", .at = 3};
    CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_OK && res.stop == MMB_STOP_ABORT && res.n_generated == 3 &&
          mmb_kv_cache_len(kv) == np + 3, "aborted decode: stop %d, %lld tokens", (int)res.stop,
          (long long)res.n_generated);
    mmb_kv_cache_free(kv);
    /* a cache of np + 3: four tokens (the last is not fed back), then MMB_STOP_CONTEXT */
    CHECK(mmb_mllm_kv_new(ctx, m, np + 3, &kv) == MMB_OK, "kv");
    gp.abort = NULL;
    CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_OK && res.stop == MMB_STOP_CONTEXT &&
          res.n_generated == 4 && mmb_kv_cache_len(kv) == np + 3, "context: stop %d after %lld", (int)res.stop,
          (long long)res.n_generated);
    /* the prompt alone overflowing: MMB_ERR_SHAPE, nothing evaluated, the result untouched */
    mmb_kv_cache_free(kv);
    CHECK(mmb_mllm_kv_new(ctx, m, np - 1, &kv) == MMB_OK, "kv");
    res.n_prompt = -5;
    CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_ERR_SHAPE && res.n_prompt == -5 &&
          mmb_kv_cache_len(kv) == 0 && strstr(mmb_ctx_error(ctx), "context overflow"), "%s", mmb_ctx_error(ctx));
    /* a stop string, and an on_token that says stop */
    mmb_kv_cache_free(kv);
    CHECK(mmb_mllm_kv_new(ctx, m, 0, &kv) == MMB_OK, "kv");
    collect col = {0};
    gp.on_token = print_piece;
    gp.user = &col;
    gp.on_progress = NULL;
    gp.n_predict = 12;
    CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_OK && res.n_generated == 12, "12 tokens");
    /* the stop: the first ASCII character whose first appearance is not the text's first byte */
    char stop[2] = {0};
    for (size_t i = 1; i < col.len && !stop[0]; i++)
        if (col.text[i] > ' ' && col.text[i] < 127 && !memchr(col.text, col.text[i], i)) stop[0] = col.text[i];
    CHECK(stop[0], "an ASCII character in '%s'", col.text);
    if (stop[0]) {
        const char *stops[1] = {stop};
        gp.stops = stops;
        gp.n_stops = 1;
        collect col2 = {0};
        gp.user = &col2;
        mmb_kv_cache_reset(kv);
        CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_OK && res.stop == MMB_STOP_STRING &&
              strstr(col2.text, stop) && col2.n <= col.n && memcmp(col.ids, col2.ids, sizeof(int32_t) * col2.n) == 0,
              "stop string '%s': '%s' (of '%s')", stop, col2.text, col.text);
        /* the stop string completed by the last token n_predict allows: STRING, not LENGTH */
        gp.n_predict = col2.n;
        collect col3 = {0};
        gp.user = &col3;
        mmb_kv_cache_reset(kv);
        CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_OK && res.stop == MMB_STOP_STRING &&
              res.n_generated == col2.n, "stop string on the last token: stop %d", (int)res.stop);
        gp.n_stops = 0;
    }
    /* on_token saying stop: CALLBACK, also on the last token n_predict allows (not LENGTH) */
    for (int at = 3; at <= 4; at++) {
        counter cn = {.at = 3};
        gp.on_token = stop_at;
        gp.user = &cn;
        gp.n_predict = at;
        mmb_kv_cache_reset(kv);
        CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_OK && res.stop == MMB_STOP_CALLBACK &&
              res.n_generated == 3 && cn.n == 3, "on_token stop at 3 of %d: stop %d after %lld", at, (int)res.stop,
              (long long)res.n_generated);
    }
    gp.on_token = NULL;
    mmb_kv_cache_free(kv);
    mmb_chunks_free(c);
    mmb_image_free(&img);
}

/* ---- bad inputs ---- */

static void test_bad_inputs(mmb_ctx *ctx, mmb_mllm *m) {
    mmb_mllm *m2 = (mmb_mllm *)0x1;
    CHECK(mmb_mllm_open(ctx, "no-such-dir", NULL, &m2) == MMB_ERR_IO && m2 == (mmb_mllm *)0x1 &&
          strstr(mmb_ctx_error(ctx), "no-such-dir/config.json"), "%s", mmb_ctx_error(ctx));
    CHECK(mmb_mllm_open(ctx, NULL, NULL, &m2) == MMB_ERR_ARG && m2 == (mmb_mllm *)0x1, "NULL dir");
    mmb_mllm_params p = mmb_mllm_default_params();
    p.dense.pool = 4;
    CHECK(mmb_mllm_open(ctx, LLAVA, &p, &m2) == MMB_ERR_ARG && strstr(mmb_ctx_error(ctx), "no Dense Connector"),
          "%s", mmb_ctx_error(ctx));
    p = mmb_mllm_default_params();
    p.vision_tower = CLIP;
    CHECK(mmb_mllm_open(ctx, TEXT, &p, &m2) == MMB_ERR_ARG && m2 == (mmb_mllm *)0x1, "%s", mmb_ctx_error(ctx));

    mmb_image img = test_image(7);
    static float emb[4 * D + 1], hid[VT * VD];
    for (int i = 0; i < 4 * D + 1; i++) emb[i] = -7.0f;
    int64_t tok = -3;
    mmb_encode_out o = {.embeddings = emb, .embeddings_count = 4 * D - 1, .tokens = &tok};
    CHECK(mmb_mllm_encode(ctx, m, &img, 1, &o) == MMB_ERR_SHAPE && strstr(mmb_ctx_error(ctx), "128 needed"), "%s",
          mmb_ctx_error(ctx));
    o.embeddings_count = 4 * D;
    o.n_taps = 1;
    o.taps[0] = 3; /* 2 blocks: hidden_states 0..2 */
    o.hidden[0] = hid;
    o.hidden_count = VT * VD;
    CHECK(mmb_mllm_encode(ctx, m, &img, 1, &o) == MMB_ERR_ARG && strstr(mmb_ctx_error(ctx), "out of range"), "%s",
          mmb_ctx_error(ctx));
    o.taps[0] = 1;
    o.hidden[0] = NULL;
    CHECK(mmb_mllm_encode(ctx, m, &img, 1, &o) == MMB_ERR_ARG, "hidden NULL");
    CHECK(mmb_mllm_encode(ctx, m, &img, 0, &o) == MMB_ERR_ARG, "n 0");
    CHECK(mmb_mllm_encode_file(ctx, m, "no-such.png", &o) == MMB_ERR_IO && strstr(mmb_ctx_error(ctx), "no-such.png"),
          "%s", mmb_ctx_error(ctx));
    CHECK(mmb_mllm_encode_bytes(ctx, m, "not an image", 12, &o) == MMB_ERR_FORMAT, "%s", mmb_ctx_error(ctx));
    mmb_image empty = {0};
    CHECK(mmb_mllm_encode_size(ctx, m, &empty, 1, &tok) == -1, "empty image sized");
    bool untouched = tok == -3;
    for (int i = 0; i < 4 * D + 1; i++) untouched &= emb[i] == -7.0f;
    CHECK(untouched, "outputs untouched after failures");
    mmb_chunks *c = NULL;
    CHECK(mmb_mllm_tokenize(ctx, m, "x", NULL, 0, MMB_TOKENIZE_RAW, &c) == MMB_OK, "no images");
    mmb_gen_params gp = mmb_gen_default_params();
    gp.n_stops = 1;
    mmb_kv_cache *kv = NULL;
    CHECK(mmb_mllm_kv_new(ctx, m, 8, &kv) == MMB_OK, "kv");
    CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, NULL) == MMB_ERR_ARG, "stops NULL");
    mmb_chunks *empty_c = NULL;
    mmb_chunks_new(ctx, &empty_c);
    CHECK(mmb_mllm_generate(ctx, m, kv, empty_c, NULL, NULL) == MMB_ERR_ARG && strstr(mmb_ctx_error(ctx), "empty"),
          "empty prompt");
    mmb_chunks_free(empty_c);
    mmb_kv_cache_free(kv);
    mmb_chunks_free(c);
    mmb_image_free(&img);
}

/* ---- a tower alone, a language model alone, the LLaVA without its LLM ---- */

static void test_other_dirs(mmb_ctx *ctx) {
    mmb_mllm *m = NULL;
    mmb_mllm_info in;
    CHECK(mmb_mllm_open(ctx, CLIP, NULL, &m) == MMB_OK, "%s", mmb_ctx_error(ctx));
    if (m) {
        mmb_mllm_get_info(m, &in);
        CHECK(!strcmp(in.family, "clip") && in.fusion == MMB_FUSION_NONE && in.has_vision && !in.has_connector &&
              !in.has_lm && in.out_width == VD && in.tokens_per_image == VT && !strcmp(in.image_marker, "") &&
              in.image_token == -1 && in.context == 0, "clip info: %s", in.family);
        mmb_image img = test_image(8);
        static float px[3 * IMG * IMG], ref[VT * VD], emb[VT * VD], hid[VT * VD], ref2[VT * VD];
        mmb_preprocess_run(ctx, mmb_mllm_processor(m), &img, px, 3 * IMG * IMG);
        const int taps[2] = {MMB_TAP_LAST, 1};
        float *outs[2] = {ref, ref2};
        CHECK(mmb_vit_forward(ctx, mmb_mllm_vit(m), px, 1, taps, 2, outs) == MMB_OK, "vit");
        mmb_encode_out o = {.embeddings = emb, .embeddings_count = VT * VD, .n_taps = 1, .taps = {1}, .hidden = {hid},
                            .hidden_count = VT * VD};
        CHECK(mmb_mllm_encode(ctx, m, &img, 1, &o) == MMB_OK && memcmp(emb, ref, sizeof emb) == 0 &&
              memcmp(hid, ref2, sizeof hid) == 0, "a tower alone: last_hidden_state and a tap, bit for bit");
        mmb_chunks *c = (mmb_chunks *)0x1;
        CHECK(mmb_mllm_tokenize(ctx, m, "x", NULL, 0, MMB_TOKENIZE_RAW, &c) == MMB_ERR_MISSING && c == (mmb_chunks *)0x1,
              "no LLM to tokenize for");
        mmb_image_free(&img);
        mmb_mllm_free(m);
    }
    m = NULL;
    CHECK(mmb_mllm_open(ctx, TEXT, NULL, &m) == MMB_OK, "%s", mmb_ctx_error(ctx));
    if (m) {
        mmb_mllm_get_info(m, &in);
        CHECK(!strcmp(in.family, "text") && !in.has_vision && in.has_lm && !in.has_tokenizer && in.context == CTX,
              "text info");
        const int32_t ids[3] = {1, 2, 3};
        mmb_chunks *c = NULL;
        mmb_kv_cache *kv = NULL;
        CHECK(mmb_mllm_chunks_from_ids(ctx, m, ids, 3, NULL, 0, &c) == MMB_OK && mmb_mllm_kv_new(ctx, m, 16, &kv) ==
              MMB_OK, "%s", mmb_ctx_error(ctx));
        collect col = {0};
        mmb_gen_params gp = mmb_gen_default_params();
        gp.n_predict = 5;
        gp.on_token = print_piece;
        gp.user = &col;
        mmb_gen_result res;
        CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_OK && col.len == 0 &&
              (res.stop == MMB_STOP_LENGTH ? col.n == 5 : res.stop == MMB_STOP_EOS && col.ids[col.n - 1] == 7),
              "ids only: stop %d after %d", (int)res.stop, col.n);
        const char *stops[1] = {"a"};
        gp.stops = stops;
        gp.n_stops = 1;
        res.n_prompt = -5;
        CHECK(mmb_mllm_generate(ctx, m, kv, c, &gp, &res) == MMB_ERR_MISSING && res.n_prompt == -5 &&
              strstr(mmb_ctx_error(ctx), "stop strings need"), "stop strings without a tokenizer: %s",
              mmb_ctx_error(ctx));
        mmb_image img = test_image(9);
        mmb_encode_out o = {0};
        static float emb[4];
        o.embeddings = emb;
        o.embeddings_count = 4;
        CHECK(mmb_mllm_encode(ctx, m, &img, 1, &o) == MMB_ERR_MISSING, "no vision path");
        mmb_image_free(&img);
        mmb_kv_cache_free(kv);
        mmb_chunks_free(c);
        mmb_mllm_free(m);
    }
    m = NULL;
    mmb_mllm_params p = mmb_mllm_default_params();
    p.vision_only = 1;
    CHECK(mmb_mllm_open(ctx, LLAVA, &p, &m) == MMB_OK, "%s", mmb_ctx_error(ctx));
    if (m) {
        mmb_mllm_get_info(m, &in);
        mmb_kv_cache *kv = (mmb_kv_cache *)0x1;
        CHECK(!in.has_lm && !in.has_tokenizer && in.fusion == MMB_FUSION_NONE && in.has_vision && in.out_width == D &&
              mmb_mllm_kv_new(ctx, m, 4, &kv) == MMB_ERR_MISSING && kv == (mmb_kv_cache *)0x1, "vision_only");
        mmb_mllm_free(m);
    }
}

/* ---- mmb_mllm_params: a separate tower (original layout), the Dense Connector ---- */

static const char *const ORIG = "mllm_orig", *const DENSE = "mllm_dense";

static void test_params(mmb_ctx *ctx) {
    static tset s;
    /* an original-layout LLaVA projector whose config only names its tower; no processor of its own */
    mkdir(ORIG, 0755);
    write_text(ORIG, "config.json", "{\"architectures\": [\"LlavaLlamaForCausalLM\"], \"mm_projector_type\": "
               "\"mlp2x_gelu\", \"mm_hidden_size\": 16, \"hidden_size\": 32, \"mm_vision_select_layer\": -2, "
               "\"mm_vision_tower\": \"mllm_clip\"}");
    add(&s, 0, 0.4f, 2, D, VD, "model.mm_projector.0.weight%s", "", 0);
    add(&s, 0, 0.1f, 1, D, 0, "model.mm_projector.0.bias%s", "", 0);
    add(&s, 0, 0.3f, 2, D, D, "model.mm_projector.2.weight%s", "", 0);
    add(&s, 0, 0.1f, 1, D, 0, "model.mm_projector.2.bias%s", "", 0);
    write_tensors(ctx, ORIG, &s);
    /* an original-layout Dense Connector checkpoint (SCI: three hidden states into the projector) */
    mkdir(DENSE, 0755);
    write_text(DENSE, "config.json", "{\"architectures\": [\"LlavaLlamaForCausalLM\"], \"mm_projector_type\": "
               "\"mlp2x_gelu\", \"mm_dense_connector_type\": \"sci\", \"mm_hidden_size\": 48, \"hidden_size\": 32, "
               "\"mm_vision_select_layer\": -2, \"mm_vision_tower\": \"mllm_clip\"}");
    add(&s, 0, 0.4f, 2, D, 3 * VD, "model.mm_projector.0.weight%s", "", 0);
    add(&s, 0, 0.1f, 1, D, 0, "model.mm_projector.0.bias%s", "", 0);
    add(&s, 0, 0.3f, 2, D, D, "model.mm_projector.2.weight%s", "", 0);
    add(&s, 0, 0.1f, 1, D, 0, "model.mm_projector.2.bias%s", "", 0);
    write_tensors(ctx, DENSE, &s);

    mmb_image img = test_image(10);
    static float px[3 * IMG * IMG], ref[4 * D], emb[4 * D];
    mmb_encode_out o = {.embeddings = emb, .embeddings_count = 4 * D};
    mmb_mllm *m = NULL;
    CHECK(mmb_mllm_open(ctx, ORIG, NULL, &m) == MMB_OK && mmb_mllm_encode(ctx, m, &img, 1, &o) == MMB_ERR_MISSING &&
          strstr(mmb_ctx_error(ctx), "vision_tower"), "no tower: %s", mmb_ctx_error(ctx));
    mmb_mllm_free(m);
    mmb_mllm_params p = mmb_mllm_default_params();
    p.vision_tower = CLIP;
    m = NULL;
    CHECK(mmb_mllm_open(ctx, ORIG, &p, &m) == MMB_OK, "%s", mmb_ctx_error(ctx));
    if (m) {
        mmb_mllm_info in;
        mmb_mllm_get_info(m, &in);
        CHECK(in.has_vision && in.has_processor && !in.has_lm && in.vision_tokens == VT && in.tokens_per_image == 4,
              "the tower and its directory's processor");
        mmb_preprocess_run(ctx, mmb_mllm_processor(m), &img, px, 3 * IMG * IMG);
        CHECK(mmb_model_encode(ctx, mmb_mllm_model(m), px, 1, IMG, IMG, ref, 4 * D) == MMB_OK &&
              mmb_mllm_encode(ctx, m, &img, 1, &o) == MMB_OK && memcmp(emb, ref, sizeof emb) == 0, "%s",
              mmb_ctx_error(ctx));
        mmb_mllm_free(m);
    }
    /* the checkpoint's SCI with the layers replaced (its own 7 and 15 do not exist in a 2-block tower): over
     * hidden_states 0 and 1, the last one final (paper layers 1, 2, 3) */
    p = mmb_mllm_default_params();
    p.vision_tower = CLIP;
    p.dense = (mmb_dense_params){.use_final = 1, .final_layer = 2, .n_layers = 2, .layers = {0, 1}};
    m = NULL;
    CHECK(mmb_mllm_open(ctx, DENSE, &p, &m) == MMB_OK, "%s", mmb_ctx_error(ctx));
    mmb_model *ref_m = NULL;
    mmb_vit *v = NULL;
    mmb_dense_params dp = {0};
    if (mmb_model_open(ctx, DENSE, &ref_m) == MMB_OK) {
        dp = mmb_model_dense(ref_m);
        dp.use_final = 1;
        dp.final_layer = 2;
        dp.n_layers = 2;
        dp.layers[0] = 0;
        dp.layers[1] = 1;
    }
    CHECK(ref_m && dp.type == MMB_DENSE_SCI && mmb_model_set_dense(ctx, ref_m, &dp) == MMB_OK &&
          mmb_vit_open(ctx, CLIP, &v) == MMB_OK && mmb_model_attach_vit(ctx, ref_m, v) == MMB_OK, "%s",
          mmb_ctx_error(ctx));
    if (m && ref_m) {
        mmb_model_info mi;
        mmb_model_get_info(mmb_mllm_model(m), &mi);
        CHECK(!strcmp(mi.dense, "sci") && mi.n_taps == 3 && mi.taps[0] == 2 && mi.taps[1] == 0 && mi.taps[2] == 1,
              "dense sci, %d taps", mi.n_taps);
        mmb_preprocess_run(ctx, mmb_mllm_processor(m), &img, px, 3 * IMG * IMG);
        CHECK(mmb_model_encode(ctx, ref_m, px, 1, IMG, IMG, ref, 4 * D) == MMB_OK &&
              mmb_mllm_encode(ctx, m, &img, 1, &o) == MMB_OK && memcmp(emb, ref, sizeof emb) == 0,
              "the merged Dense Connector = mmb_model_set_dense's: %s", mmb_ctx_error(ctx));
    }
    mmb_model_free(ref_m);
    mmb_mllm_free(m);
    /* SCI in front of the 16-wide projector of the plain LLaVA: the widths disagree */
    p.dense = (mmb_dense_params){.type = MMB_DENSE_SCI};
    m = (mmb_mllm *)0x1;
    CHECK(mmb_mllm_open(ctx, LLAVA, &p, &m) == MMB_ERR_SHAPE && m == (mmb_mllm *)0x1, "%s", mmb_ctx_error(ctx));
    mmb_image_free(&img);
}

int main(void) {
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 1;
    write_models(ctx);
    test_example();
    mmb_mllm *m = NULL;
    CHECK(mmb_mllm_open(ctx, LLAVA, NULL, &m) == MMB_OK, "%s", mmb_ctx_error(ctx));
    if (m) {
        test_info_and_chunks(ctx, m);
        test_equals_parts(ctx, m);
        test_abort_and_context(ctx, m);
        test_bad_inputs(ctx, m);
    }
    mmb_mllm_free(m);
    test_other_dirs(ctx);
    test_params(ctx);
    mmb_ctx_free(ctx);
    mmb_mllm_free(NULL);
    mmb_chunks_free(NULL);
    return DONE("mllm");
}
