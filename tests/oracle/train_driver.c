/* Oracle driver for tests/oracle/test_train.py: a LLaVA checkpoint's projector on its f32 training copy
 * (mmb__trainable_find: connectors/mlp.c, connectors/resmlp.c), one forward and one backward.
 *
 *   train_driver MODEL_DIR IN.safetensors OUT.safetensors
 *       IN:  x [rows, in_width] F32, dout [rows, out_width] F32
 *       OUT: out [rows, out_width] F32 and, for each parameter, "g.<its checkpoint key>" (its gradient for dout)
 *   train_driver --e2e MODEL_DIR IN.safetensors OUT.safetensors
 *       IN:  x [rows, in_width] F32 (the projector's input), ids [n] I32 (the caption), bos [1] I32 (-1: none)
 *       OUT: loss [1] F32 (the caption tokens' mean cross-entropy through the frozen LLM, as mmb_train's sample)
 *            and "g.<key>": each parameter's gradient of that mean
 * Exit 0; 2 with "status: message" when the library refuses; 1 on misuse. */
#include "pipeline/pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    int e2e = argc == 5 && strcmp(argv[1], "--e2e") == 0;
    argv += e2e;
    argc -= e2e;
    if (argc != 4) return 1;
    mmb_ctx *ctx = NULL;
    mmb_model *m = NULL;
    mmb_st_file *in = NULL;
    void *t = NULL;
    const mmb__trainable_ops *ops = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 1;
    mmb_status s = mmb_model_open(ctx, argv[1], &m);
    if (s == MMB_OK) s = mmb_st_open(ctx, argv[2], &in);
    if (s == MMB_OK && !(ops = mmb__trainable_find(mmb__model_conn_cfg(m)->type)))
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "connector '%s' is not trainable", mmb__model_conn_cfg(m)->type);
    if (s == MMB_OK) s = ops->open(ctx, mmb__model_ckpt(m), mmb__model_conn_cfg(m), 0, &t);
    const mmb_tensor *x = s == MMB_OK ? mmb_st_find(in, "x") : NULL;
    const mmb_tensor *dout = x ? mmb_st_find(in, e2e ? "ids" : "dout") : NULL, *bos = e2e ? mmb_st_find(in, "bos") : NULL;
    if (s == MMB_OK && (!x || !dout || x->dtype != MMB_F32 || dout->dtype != (e2e ? MMB_I32 : MMB_F32) || x->ndim != 2 ||
                        (e2e && (!bos || bos->dtype != MMB_I32))))
        return 1;
    int64_t rows = s == MMB_OK ? x->shape[0] : 0, d = t ? ops->out_width(t) : 0;
    float *out = malloc(sizeof(float) * (size_t)(rows * d + 1)), loss = 0;
    if (s == MMB_OK) s = ops->forward(ctx, t, x->data, rows, out);
    if (s == MMB_OK && !e2e) s = ops->backward(ctx, t, dout->data, 1.0f);
    mmb_lm *lm = NULL;
    if (s == MMB_OK && e2e) { /* [BOS] + the image rows + the caption, the loss on the caption */
        const int32_t *ids = dout->data, b = *(const int32_t *)bos->data;
        int64_t nb = b >= 0, ni = dout->shape[0], n = nb + rows + ni, cnt = 0;
        float *emb = malloc(sizeof(float) * (size_t)(n * d)), *g = malloc(sizeof(float) * (size_t)(n * d));
        int32_t *lab = malloc(sizeof(int32_t) * (size_t)n);
        double ls = 0;
        s = emb && g && lab ? mmb_lm_open(ctx, argv[1], &lm) : MMB_ERR_NOMEM;
        if (s == MMB_OK && nb) s = mmb_lm_embed(ctx, lm, &b, 1, emb);
        if (s == MMB_OK) memcpy(emb + nb * d, out, sizeof(float) * (size_t)(rows * d));
        if (s == MMB_OK) s = mmb_lm_embed(ctx, lm, ids, ni, emb + (nb + rows) * d);
        for (int64_t i = 0; s == MMB_OK && i < n; i++) lab[i] = i < nb + rows ? MMB_IGNORE_INDEX : ids[i - nb - rows];
        if (s == MMB_OK) s = mmb__lm_loss_backward(ctx, lm, emb, lab, n, &ls, &cnt, g);
        if (s == MMB_OK) s = ops->backward(ctx, t, g + nb * d, (float)(1.0 / (double)cnt));
        loss = (float)(ls / (double)cnt);
        free(emb), free(g), free(lab);
    }
    mmb_lm_free(lm);
    if (s == MMB_OK) {
        mmb__tparam *p;
        int np = ops->params(t, &p);
        mmb_tensor ts[65];
        char names[65][200];
        ts[0] = e2e ? (mmb_tensor){.name = "loss", .dtype = MMB_F32, .ndim = 1, .shape = {1}, .data = &loss}
                    : (mmb_tensor){.name = "out", .dtype = MMB_F32, .ndim = 2, .shape = {rows, d}, .data = out};
        for (int i = 0; i < np && i < 64; i++) {
            snprintf(names[i], sizeof names[i], "g.%s", p[i].name);
            ts[i + 1] = (mmb_tensor){.name = names[i], .dtype = MMB_F32, .ndim = p[i].ndim,
                                     .shape = {p[i].shape[0], p[i].shape[1]}, .data = p[i].g};
        }
        s = mmb_st_write(ctx, argv[3], ts, np + 1);
    }
    int rc = s == MMB_OK ? 0 : 2;
    if (rc) fprintf(stderr, "%s: %s\n", mmb_status_str(s), mmb_ctx_error(ctx));
    free(out);
    if (ops) ops->free(t);
    mmb_st_close(in);
    mmb_model_free(m);
    mmb_ctx_free(ctx);
    return rc;
}
