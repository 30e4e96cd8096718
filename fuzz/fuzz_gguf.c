/* libFuzzer target: the GGUF reader (io/gguf.c). The input is written to the process's file and opened with
 * mmb_gguf_open; when it opens, every key's every element is read through the getters, every tensor's bytes are
 * summed and the dequantizable ones are dequantized, so a range the validator let through past the map shows up
 * under AddressSanitizer. Every refusal must say something. */
#include "fuzz_util.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    mmb_ctx *ctx = fuzz_ctx();
    fuzz_dir("gguf", "f.gguf");
    fuzz_write(data, size);
    mmb_gguf *g = NULL;
    if (mmb_gguf_open(ctx, fuzz_file_, &g) != MMB_OK) {
        if (!mmb_ctx_error(ctx)[0]) abort();
        return 0;
    }
    volatile unsigned sum = 0;
    for (int64_t i = 0; i < mmb_gguf_kv_count(g); i++) {
        mmb_gguf_type elem;
        int64_t n = 0, iv;
        double fv;
        size_t len;
        if (mmb_gguf_find_key(g, mmb_gguf_key(g, i)) != i) abort();
        mmb_gguf_kv_type(g, i, &elem, &n);
        for (int64_t k = 0; k < n && k < 4096; k++) {
            const char *s = mmb_gguf_get_str(g, i, k, &len);
            if (s) {
                if (len > size) abort();
                for (size_t b = 0; b < len; b++) sum += (unsigned char)s[b];
            }
            if (mmb_gguf_get_int(g, i, k, &iv)) sum += (unsigned)iv;
            if (mmb_gguf_get_float(g, i, k, &fv)) sum += fv != fv;
        }
    }
    for (int64_t i = 0; i < mmb_gguf_tensor_count(g); i++) {
        const mmb_gguf_tensor *t = mmb_gguf_tensor_at(g, i);
        if (!t || mmb_gguf_find_tensor(g, t->name) != t || t->nbytes > size) abort();
        for (size_t b = 0; b < t->nbytes; b++) sum += ((const unsigned char *)t->data)[b];
        size_t n = (size_t)mmb_gguf_numel(t);
        if (n > (size_t)1 << 24) continue;
        float *out = malloc(sizeof(float) * (n ? n : 1));
        if (!out) abort();
        if (mmb_gguf_dequantize(ctx, t, out, n) == MMB_OK)
            for (size_t k = 0; k < n; k++) sum += out[k] != out[k];
        free(out);
    }
    mmb_gguf_close(g);
    (void)sum;
    return 0;
}
