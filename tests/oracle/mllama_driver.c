/* Oracle driver for tests/oracle/test_mllama.py: the rows Llama 3.2 Vision's text side cross-attends to.
 *
 *   mllama_driver OUT.safetensors MODEL_DIR IMAGE
 *
 * Opens MODEL_DIR (mmb_mllm_open), runs IMAGE through its processor and writes to OUT:
 *   xattn        [max_num_tiles * P, d] F32   mmb__model_encode_xattn: every tile, the padding ones after the real
 *   embeddings   [num_tiles * P, d] F32       mmb_model_encode: the real tiles
 *   rows         [1] I64                      mmb__model_xattn_tokens
 * Exit 0; 2 with "status: message" when the library refuses; 1 on misuse. */
#include "pipeline/pipeline.h"

#include <stdio.h>
#include <stdlib.h>

static int fail(mmb_ctx *ctx, mmb_status s) {
    fprintf(stderr, "%s: %s\n", mmb_status_str(s), mmb_ctx_error(ctx));
    return 2;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s OUT.safetensors MODEL_DIR IMAGE\n", argv[0]);
        return 1;
    }
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    mmb_ctx *ctx = NULL;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 1;
    mmb_mllm *m = NULL;
    mmb_image img = {0, 0, NULL};
    float *px = NULL, *xa = NULL, *emb = NULL;
    int rc = 0, h = 0, w = 0;
    mmb_status s = mmb_mllm_open(ctx, argv[2], NULL, &m);
    if (s == MMB_OK) s = mmb_image_load(ctx, argv[3], 0, &img);
    if (s == MMB_OK) s = mmb_preprocess_output_size(ctx, mmb_mllm_processor(m), img.height, img.width, &h, &w);
    const mmb_model *model = mmb_mllm_model(m);
    mmb_model_info mi = {0};
    if (s == MMB_OK) s = mmb_model_get_info(model, &mi);
    const int64_t t_all = model ? mmb__model_xattn_tokens(model) : 0;
    const int64_t t_real = s == MMB_OK ? mmb_model_encode_tokens(ctx, model, h, w) : 0;
    const size_t n_px = (size_t)3 * h * w, n_xa = (size_t)(t_all * mi.out_width);
    const size_t n_emb = (size_t)(t_real * mi.out_width);
    if (s == MMB_OK && (t_all < 1 || t_real < 1)) {
        fprintf(stderr, "no cross-attention rows (%lld) or no embeddings (%lld)\n", (long long)t_all,
                (long long)t_real);
        rc = 1;
    }
    if (s == MMB_OK && !rc && (!(px = malloc(n_px * sizeof(float))) || !(xa = malloc(n_xa * sizeof(float))) ||
                               !(emb = malloc(n_emb * sizeof(float)))))
        rc = 1;
    if (s == MMB_OK && !rc) s = mmb_preprocess_run(ctx, mmb_mllm_processor(m), &img, px, n_px);
    /* one float short is refused */
    if (s == MMB_OK && !rc && mmb__model_encode_xattn(ctx, model, px, 1, h, w, xa, n_xa - 1) != MMB_ERR_SHAPE) {
        fprintf(stderr, "short output buffer not refused\n");
        rc = 1;
    }
    if (s == MMB_OK && !rc) s = mmb__model_encode_xattn(ctx, model, px, 1, h, w, xa, n_xa);
    if (s == MMB_OK && !rc) s = mmb_model_encode(ctx, model, px, 1, h, w, emb, n_emb);
    if (s == MMB_OK && !rc) {
        int64_t rows = t_all;
        mmb_tensor t[3] = {{"xattn", MMB_F32, 2, {t_all, mi.out_width}, xa},
                           {"embeddings", MMB_F32, 2, {t_real, mi.out_width}, emb},
                           {"rows", MMB_I64, 1, {1}, &rows}};
        s = mmb_st_write(ctx, argv[1], t, 3);
    }
    if (s != MMB_OK) rc = fail(ctx, s);
    free(px);
    free(xa);
    free(emb);
    mmb_image_free(&img);
    mmb_mllm_free(m);
    mmb_ctx_free(ctx);
    return rc;
}
