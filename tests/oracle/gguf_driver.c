/* Test driver for the GGUF reader: `gguf_driver FILE OUT.safetensors` prints the file's keys and tensors as JSON
 * lines ({"key", "type", "elem", "n", "values"}: up to 64 values of an array; {"tensor", "type", "shape", "nbytes"})
 * and writes each tensor the library dequantizes as an F32 tensor of the same name and shape to OUT. A file the
 * reader refuses: the message on stderr, exit 1. */
#include "mmbridge.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void json_str(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 1;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 3;
    mmb_gguf *g = NULL;
    if (mmb_gguf_open(ctx, argv[1], &g) != MMB_OK) {
        fprintf(stderr, "%s\n", mmb_ctx_error(ctx));
        mmb_ctx_free(ctx);
        return 1;
    }
    printf("{\"version\": %d}\n", mmb_gguf_version(g));
    for (int64_t i = 0; i < mmb_gguf_kv_count(g); i++) {
        mmb_gguf_type elem;
        int64_t n;
        mmb_gguf_type t = mmb_gguf_kv_type(g, i, &elem, &n);
        printf("{\"key\": ");
        json_str(mmb_gguf_key(g, i), strlen(mmb_gguf_key(g, i)));
        printf(", \"type\": %d, \"elem\": %d, \"n\": %lld, \"values\": [", (int)t, (int)elem, (long long)n);
        for (int64_t k = 0; k < n && k < 64; k++) {
            int64_t iv;
            double fv;
            size_t len;
            const char *sv;
            if (k) printf(", ");
            if ((sv = mmb_gguf_get_str(g, i, k, &len))) json_str(sv, len);
            else if (elem != MMB_GGUF_FLOAT32 && elem != MMB_GGUF_FLOAT64 && mmb_gguf_get_int(g, i, k, &iv)) printf("%lld", (long long)iv);
            else if (mmb_gguf_get_float(g, i, k, &fv)) printf("%.17g", fv);
            else printf("null");
        }
        printf("]}\n");
    }
    int64_t nt = mmb_gguf_tensor_count(g), nw = 0;
    mmb_tensor *out = calloc((size_t)nt + 1, sizeof *out);
    float **bufs = calloc((size_t)nt + 1, sizeof *bufs);
    for (int64_t i = 0; i < nt; i++) {
        const mmb_gguf_tensor *t = mmb_gguf_tensor_at(g, i);
        printf("{\"tensor\": \"%s\", \"type\": %d, \"shape\": [", t->name, t->ggml_type);
        for (int d = 0; d < t->ndim; d++) printf("%s%lld", d ? ", " : "", (long long)t->shape[d]);
        printf("], \"nbytes\": %zu}\n", t->nbytes);
        size_t n = (size_t)mmb_gguf_numel(t);
        bufs[i] = malloc(sizeof(float) * (n ? n : 1));
        if (mmb_gguf_dequantize(ctx, t, bufs[i], n) != MMB_OK) {
            fprintf(stderr, "%s\n", mmb_ctx_error(ctx));
            continue;
        }
        mmb_tensor *o = &out[nw++];
        o->name = t->name;
        o->dtype = MMB_F32;
        o->ndim = t->ndim;
        memcpy(o->shape, t->shape, sizeof t->shape);
        o->data = bufs[i];
    }
    int rc = mmb_st_write(ctx, argv[2], out, (int)nw) == MMB_OK ? 0 : 4;
    for (int64_t i = 0; i < nt; i++) free(bufs[i]);
    free(bufs);
    free(out);
    mmb_gguf_close(g);
    mmb_ctx_free(ctx);
    return rc;
}
