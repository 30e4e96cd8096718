/* Oracle driver for tests/oracle/test_train.py: a LLaVA checkpoint's projector on its f32 training copy
 * (connectors/mlp.c's mmb__mlp_train), one forward and one backward.
 *
 *   train_driver MODEL_DIR IN.safetensors OUT.safetensors
 *       IN:  x [rows, in_width] F32, dout [rows, out_width] F32
 *       OUT: out [rows, out_width] F32 and, for each parameter, "g.<its checkpoint key>" (its gradient for dout)
 * Exit 0; 2 with "status: message" when the library refuses; 1 on misuse. */
#include "pipeline/pipeline.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 4) return 1;
    mmb_ctx *ctx = NULL;
    mmb_model *m = NULL;
    mmb_st_file *in = NULL;
    mmb__mlp_train *t = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 2;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 1;
    mmb_status s = mmb_model_open(ctx, argv[1], &m);
    if (s == MMB_OK) s = mmb_st_open(ctx, argv[2], &in);
    if (s == MMB_OK) s = mmb__mlp_train_open(ctx, mmb__model_ckpt(m), mmb__model_conn_cfg(m), 0, &t);
    const mmb_tensor *x = s == MMB_OK ? mmb_st_find(in, "x") : NULL, *dout = x ? mmb_st_find(in, "dout") : NULL;
    if (s == MMB_OK && (!x || !dout || x->dtype != MMB_F32 || dout->dtype != MMB_F32 || x->ndim != 2)) return 1;
    int64_t rows = s == MMB_OK ? x->shape[0] : 0, d = t ? mmb__mlp_train_out_width(t) : 0;
    float *out = malloc(sizeof(float) * (size_t)(rows * d + 1));
    if (s == MMB_OK) s = mmb__mlp_train_forward(ctx, t, x->data, rows, out);
    if (s == MMB_OK) s = mmb__mlp_train_backward(ctx, t, dout->data, 1.0f);
    if (s == MMB_OK) {
        mmb__tparam *p;
        int np = mmb__mlp_train_params(t, &p);
        mmb_tensor ts[65];
        char names[65][200];
        ts[0] = (mmb_tensor){.name = "out", .dtype = MMB_F32, .ndim = 2, .shape = {rows, d}, .data = out};
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
    mmb__mlp_train_free(t);
    mmb_st_close(in);
    mmb_model_free(m);
    mmb_ctx_free(ctx);
    return rc;
}
