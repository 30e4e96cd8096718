/* Oracle driver for tests/oracle/test_mllm.py: the multimodal model's whole job through the public API.
 *
 *   mllm_driver OUT.safetensors MODEL_DIR IMAGE PROMPT N_PREDICT [TAP ...]
 *
 * Opens MODEL_DIR (mmb_mllm_open), encodes IMAGE with the hidden states TAP... from the same tower pass, then
 * tokenizes PROMPT with the image through the chat template (MMB_TOKENIZE_CHAT) and generates N_PREDICT tokens
 * greedily (EOS ignored). Writes to OUT:
 *   embeddings   [tokens, d_model] F32   mmb_mllm_encode's
 *   hidden.{k}   [1, T, W] F32           the k-th TAP's hidden state
 *   prompt_ids   [positions] I32         the prompt as the LLM sees it: text ids, the image token per image row
 *   logits       [positions, vocab] F32  the prefill's logits (on_logits)
 *   generated    [n] I32                 the tokens handed to on_token
 * and prints the stop reason and counts. Exit 0; 2 with "status: message" when the library refuses. */
#include "mmbridge.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct run {
    float *logits;
    int64_t rows;
    int32_t ids[1024];
    int n;
} run;

static int on_token(void *user, int32_t id, const char *piece, size_t len) {
    run *r = user;
    if (r->n < 1024) r->ids[r->n++] = id;
    (void)piece;
    (void)len;
    return 0;
}

static void on_logits(void *user, const float *logits, int64_t n, int64_t vocab) {
    run *r = user;
    if (r->logits) return; /* the prefill's only */
    r->logits = malloc(sizeof(float) * (size_t)(n * vocab));
    if (r->logits) memcpy(r->logits, logits, sizeof(float) * (size_t)(n * vocab));
    r->rows = n;
}

static int fail(mmb_ctx *ctx, mmb_status s) {
    fprintf(stderr, "%s: %s\n", mmb_status_str(s), mmb_ctx_error(ctx));
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 6 || argc - 6 > MMB_MAX_TAPS) {
        fprintf(stderr, "usage: %s OUT.safetensors MODEL_DIR IMAGE PROMPT N_PREDICT [TAP ...]\n", argv[0]);
        return 1;
    }
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    mmb_ctx *ctx = NULL;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 1;
    mmb_mllm *m = NULL;
    mmb_image img = {0};
    mmb_chunks *prompt = NULL;
    mmb_kv_cache *kv = NULL;
    run r = {0};
    float *emb = NULL, *hid[MMB_MAX_TAPS] = {0};
    int32_t *pids = NULL;
    int rc = 0;
    mmb_status s = mmb_mllm_open(ctx, argv[2], NULL, &m);
    if (s == MMB_OK) s = mmb_image_load(ctx, argv[3], 0, &img);
    if (s != MMB_OK) { rc = fail(ctx, s); goto done; }
    mmb_mllm_info in;
    mmb_mllm_get_info(m, &in);
    int64_t tokens = 0;
    if (mmb_mllm_encode_size(ctx, m, &img, 1, &tokens) < 0) { rc = fail(ctx, MMB_ERR_SHAPE); goto done; }
    mmb_encode_out o = {.n_taps = argc - 6, .hidden_count = (size_t)(in.vision_tokens * in.vision_width)};
    o.embeddings_count = (size_t)(tokens * in.out_width);
    emb = o.embeddings = malloc(sizeof(float) * o.embeddings_count);
    for (int k = 0; k < o.n_taps; k++) {
        o.taps[k] = atoi(argv[6 + k]);
        hid[k] = o.hidden[k] = malloc(sizeof(float) * o.hidden_count);
    }
    if ((s = mmb_mllm_encode(ctx, m, &img, 1, &o)) != MMB_OK) { rc = fail(ctx, s); goto done; }
    if ((s = mmb_mllm_tokenize(ctx, m, argv[4], &img, 1, MMB_TOKENIZE_CHAT, &prompt)) != MMB_OK ||
        (s = mmb_mllm_kv_new(ctx, m, 0, &kv)) != MMB_OK) {
        rc = fail(ctx, s);
        goto done;
    }
    int64_t np = mmb_chunks_positions(prompt), at = 0;
    pids = malloc(sizeof(int32_t) * (size_t)np);
    for (int i = 0; i < mmb_chunks_count(prompt); i++) {
        int64_t n = mmb_chunk_positions(prompt, i);
        const int32_t *ids = mmb_chunks_text(prompt, i, &n);
        for (int64_t k = 0; k < n; k++) pids[at + k] = ids ? ids[k] : in.image_token;
        at += n;
    }
    mmb_gen_params gp = mmb_gen_default_params();
    gp.n_predict = atoi(argv[5]);
    gp.ignore_eos = 1;
    gp.n_batch = 5;
    gp.on_token = on_token;
    gp.on_logits = on_logits;
    gp.user = &r;
    mmb_gen_result res;
    if ((s = mmb_mllm_generate(ctx, m, kv, prompt, &gp, &res)) != MMB_OK) { rc = fail(ctx, s); goto done; }
    printf("stop %d, prompt %lld, generated %lld, encode %.4f s, prefill %.4f s, decode %.4f s\n", (int)res.stop,
           (long long)res.n_prompt, (long long)res.n_generated, res.encode_s, res.prefill_s, res.decode_s);
    mmb_tensor t[3 + MMB_MAX_TAPS];
    char names[MMB_MAX_TAPS][32];
    int nt = 0;
    t[nt++] = (mmb_tensor){"embeddings", MMB_F32, 2, {tokens, in.out_width}, emb};
    t[nt++] = (mmb_tensor){"prompt_ids", MMB_I32, 1, {np}, pids};
    t[nt++] = (mmb_tensor){"generated", MMB_I32, 1, {r.n}, r.ids};
    mmb_lm_info li;
    mmb_lm_get_info(mmb_mllm_lm(m), &li);
    if (r.logits) t[nt++] = (mmb_tensor){"logits", MMB_F32, 2, {r.rows, li.vocab}, r.logits};
    for (int k = 0; k < o.n_taps; k++) {
        snprintf(names[k], sizeof names[k], "hidden.%d", k);
        t[nt++] = (mmb_tensor){names[k], MMB_F32, 3, {1, in.vision_tokens, in.vision_width}, hid[k]};
    }
    if ((s = mmb_st_write(ctx, argv[1], t, nt)) != MMB_OK) rc = fail(ctx, s);
done:
    for (int k = 0; k < MMB_MAX_TAPS; k++) free(hid[k]);
    free(emb);
    free(pids);
    free(r.logits);
    mmb_kv_cache_free(kv);
    mmb_chunks_free(prompt);
    mmb_image_free(&img);
    mmb_mllm_free(m);
    mmb_ctx_free(ctx);
    return rc;
}
