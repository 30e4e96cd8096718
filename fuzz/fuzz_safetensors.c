/* libFuzzer target: the safetensors reader. The input is written to a temporary file (one per
 * process, created once) and opened with mmb_st_open; when it opens, every byte of every tensor is
 * read and float tensors are converted to f32, so an out-of-bounds range left by the validator
 * shows up under AddressSanitizer. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static mmb_ctx *g_ctx;
static char g_path[64];
static int g_fd = -1;
static float *g_scratch;
static size_t g_scratch_n;

static void cleanup(void) {
    if (g_fd >= 0) close(g_fd);
    if (g_path[0]) unlink(g_path);
    free(g_scratch);
    mmb_ctx_free(g_ctx);
}

static void setup(void) {
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = 1;
    if (mmb_ctx_new(&p, &g_ctx) != MMB_OK) abort();
    snprintf(g_path, sizeof g_path, "/tmp/mmb_fuzz_st_%ld_XXXXXX", (long)getpid());
    g_fd = mkstemp(g_path);
    g_scratch = malloc(sizeof(float));
    g_scratch_n = 1;
    if (g_fd < 0 || !g_scratch) abort();
    atexit(cleanup);
}

static void write_input(const uint8_t *data, size_t size) {
    if (ftruncate(g_fd, 0) != 0) abort();
    size_t off = 0;
    while (off < size) {
        ssize_t w = pwrite(g_fd, data + off, size - off, (off_t)off);
        if (w <= 0) abort();
        off += (size_t)w;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_ctx) setup();
    write_input(data, size);
    mmb_st_file *f = NULL;
    mmb_status s = mmb_st_open(g_ctx, g_path, &f);
    if (s != MMB_OK) {
        /* every failure must say something */
        if (!mmb_ctx_error(g_ctx)[0]) abort();
        return 0;
    }
    volatile unsigned sum = 0;
    int n = mmb_st_count(f);
    for (int i = 0; i < n; i++) {
        const mmb_tensor *t = mmb_st_at(f, i);
        if (!t || mmb_st_find(f, t->name) != t) abort();
        if (t->ndim < 0 || t->ndim > MMB_MAX_DIMS) abort();
        int64_t numel = mmb_tensor_numel(t);
        if (numel < 0) abort();
        size_t bytes = (size_t)numel * mmb_dtype_size(t->dtype);
        if (bytes > size) abort(); /* a tensor cannot be larger than the file */
        const unsigned char *p = t->data;
        for (size_t k = 0; k < bytes; k++) sum += p[k];
        if (mmb__dtype_is_float(t->dtype)) {
            if ((size_t)numel > g_scratch_n) {
                float *nb = realloc(g_scratch, (size_t)numel * sizeof(float));
                if (!nb) abort();
                g_scratch = nb;
                g_scratch_n = (size_t)numel;
            }
            if (mmb_to_f32(g_scratch, t->data, t->dtype, (size_t)numel) != MMB_OK) abort();
            for (int64_t k = 0; k < numel; k++) sum += g_scratch[k] != g_scratch[k]; /* touch every float */
        }
    }
    if (mmb_st_at(f, n) != NULL || mmb_st_at(f, -1) != NULL) abort();
    (void)mmb_st_meta(f, "format");
    (void)sum;
    mmb_st_close(f);
    return 0;
}
