/* The public API's promises: fixed status values, NULL-safe frees, defaults, the safetensors
 * round trip, and outputs left untouched when a call fails. Also runs the header's usage example
 * on a checkpoint written here. */
#define _POSIX_C_SOURCE 200809L /* symlink, lstat: also when built with plain -std=c11 (the install check) */
#include "check.h"
#include "mmbridge.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define STR_(x) #x
#define STR(x) STR_(x)
#define VERSION_FROM_MACROS STR(MMB_VERSION_MAJOR) "." STR(MMB_VERSION_MINOR) "." STR(MMB_VERSION_PATCH)

static void test_fixed_values(void) {
    CHECK(MMB_OK == 0 && MMB_ERR_IO == 1 && MMB_ERR_FORMAT == 2 && MMB_ERR_SHAPE == 3 && MMB_ERR_MISSING == 4 &&
          MMB_ERR_UNSUPPORTED == 5 && MMB_ERR_NOMEM == 6 && MMB_ERR_ARG == 7, "status values are fixed");
    CHECK(MMB_F32 == 0 && MMB_F16 == 1 && MMB_BF16 == 2, "dtype values are fixed");
    CHECK(strcmp(mmb_status_str(MMB_ERR_SHAPE), "shape mismatch") == 0, "status string");
    CHECK(strcmp(mmb_version(), VERSION_FROM_MACROS) == 0, "version %s, header says %s", mmb_version(),
          VERSION_FROM_MACROS);
    mmb_ctx_params p = mmb_ctx_default_params();
    CHECK(p.n_threads == 0 && p.gemm == MMB_GEMM_AUTO, "defaults");
    mmb_ctx_free(NULL);
    mmb_model_free(NULL);
    mmb_st_close(NULL);
    const char *const *names;
    CHECK(mmb_connector_names(&names) >= 4 && strcmp(names[0], "identity") == 0, "connector names");
}

static const char *dir = "api_test_model";

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

/* A transformers-layout LLaVA projector: 8 -> 6 -> 6, linear weights set so the result is known
 * in closed form: W1 = [I6 | 0] (the first 6 of the 8 inputs), b1 = 0, W2 = 2 * I6, b2 = 1, act silu
 * (projector_hidden_act), so out = 2 * silu(x[:6]) + 1 on every token the "default" strategy keeps. */
static void make_model(mmb_ctx *ctx) {
    mkdir(dir, 0755);
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    write_file(path, "{\"architectures\":[\"LlavaForConditionalGeneration\"],\"model_type\":\"llava\","
                     "\"projector_hidden_act\":\"silu\",\"vision_feature_layer\":-1,"
                     "\"vision_feature_select_strategy\":\"default\","
                     "\"vision_config\":{\"model_type\":\"clip_vision_model\",\"hidden_size\":8,"
                     "\"num_hidden_layers\":2,\"num_attention_heads\":2,\"image_size\":4,\"patch_size\":2},"
                     "\"text_config\":{\"model_type\":\"llama\",\"hidden_size\":6}}");
    static float w1[6 * 8], b1[6], w2[6 * 6], b2[6];
    for (int i = 0; i < 6; i++) { w1[i * 8 + i] = 1.0f; w2[i * 6 + i] = 2.0f; b2[i] = 1.0f; }
    mmb_tensor t[4] = {
        {.name = "model.multi_modal_projector.linear_1.weight", .dtype = MMB_F32, .ndim = 2, .shape = {6, 8}, .data = w1},
        {.name = "model.multi_modal_projector.linear_1.bias", .dtype = MMB_F32, .ndim = 1, .shape = {6}, .data = b1},
        {.name = "model.multi_modal_projector.linear_2.weight", .dtype = MMB_F32, .ndim = 2, .shape = {6, 6}, .data = w2},
        {.name = "model.multi_modal_projector.linear_2.bias", .dtype = MMB_F32, .ndim = 1, .shape = {6}, .data = b2},
    };
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(mmb_st_write(ctx, path, t, 4) == MMB_OK, "write model: %s", mmb_ctx_error(ctx));
}

static void test_roundtrip_and_example(void) {
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    CHECK(mmb_ctx_new(&cp, &ctx) == MMB_OK, "ctx");
    CHECK(mmb_ctx_threads(ctx) >= 1, "threads");
    make_model(ctx);
    /* weight_dtype: f32 by default; the four compute dtypes accepted, the other storage types refused */
    CHECK(cp.weight_dtype == MMB_F32, "default weight_dtype f32");
    for (int d = 0; d <= MMB_F8_E5M2; d++) {
        mmb_ctx_params wp = cp;
        mmb_ctx *wc = NULL;
        wp.weight_dtype = d;
        int ok = d == MMB_F32 || d == MMB_BF16 || d == MMB_F16 || d == MMB_I8;
        CHECK((mmb_ctx_new(&wp, &wc) == MMB_OK) == ok, "weight_dtype %s %s", mmb_dtype_name((mmb_dtype)d),
              ok ? "accepted" : "refused");
        mmb_ctx_free(wc);
    }

    char path[256];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    mmb_st_file *f = NULL;
    CHECK(mmb_st_open(ctx, path, &f) == MMB_OK, "reopen: %s", mmb_ctx_error(ctx));
    CHECK(f && mmb_st_count(f) == 4, "4 tensors");
    const mmb_tensor *w2 = f ? mmb_st_find(f, "model.multi_modal_projector.linear_2.weight") : NULL;
    CHECK(w2 && w2->ndim == 2 && w2->shape[0] == 6 && ((const float *)w2->data)[7] == 2.0f, "w2 round trip");
    mmb_st_close(f);

    /* The header's usage example. */
    mmb_model *m = NULL;
    CHECK(mmb_model_open(ctx, dir, &m) == MMB_OK, "open: %s", mmb_ctx_error(ctx));
    if (!m) return;
    mmb_model_info info;
    mmb_model_get_info(m, &info);
    CHECK(info.n_taps == 1 && info.taps[0] == -1 && info.in_width == 8 && info.out_width == 6, "info");
    CHECK(info.tokens_per_image == 4 && info.params == 6 * 8 + 6 + 36 + 6, "tokens %lld params %lld",
          (long long)info.tokens_per_image, (long long)info.params);
    enum { B = 2, T = 5, W = 8 };
    static float h2[B * T * W];
    for (int i = 0; i < B * T * W; i++) h2[i] = (float)(i % 7) - 3.0f;
    mmb_features ft = {.batch = B, .tokens = T, .width = W, .n_hidden = 3, .n_taps = 1, .taps = {2}, .data = {h2}};
    int64_t t_out = mmb_model_tokens_out(ctx, m, T);
    CHECK(t_out == 4, "tokens out %lld", (long long)t_out);
    size_t n = (size_t)(B * t_out * info.out_width);
    float *out = malloc(n * sizeof(float));
    CHECK(mmb_model_connect(ctx, m, &ft, out, n) == MMB_OK, "connect: %s", mmb_ctx_error(ctx));
    /* out = 2 * silu(x[:, 1:, :6]) + 1 */
    double worst = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < 4; t++)
            for (int c = 0; c < 6; c++) {
                double x = h2[(b * T + t + 1) * W + c], want = 2.0 * x / (1.0 + exp(-x)) + 1.0;
                worst = fmax(worst, fabs(out[(b * 4 + t) * 6 + c] - want));
            }
    CHECK(worst < 1e-5, "closed form: %g", worst);

    /* Failing calls leave the output untouched and say why. */
    for (size_t i = 0; i < n; i++) out[i] = -7.0f;
    ft.taps[0] = 1; /* not the tap the model reads */
    CHECK(mmb_model_connect(ctx, m, &ft, out, n) == MMB_ERR_MISSING, "missing tap");
    CHECK(strstr(mmb_ctx_error(ctx), "hidden_states.2") != NULL, "message: %s", mmb_ctx_error(ctx));
    ft.taps[0] = 2;
    ft.width = 7;
    CHECK(mmb_model_connect(ctx, m, &ft, out, n) == MMB_ERR_SHAPE, "wrong width");
    ft.width = W;
    CHECK(mmb_model_connect(ctx, m, &ft, out, n - 1) == MMB_ERR_SHAPE, "output too small");
    int untouched = 1;
    for (size_t i = 0; i < n; i++) untouched &= out[i] == -7.0f;
    CHECK(untouched, "output untouched after failures");
    free(out);

    mmb_model *m2 = (mmb_model *)0x1;
    CHECK(mmb_model_open(ctx, "no-such-dir", &m2) == MMB_ERR_IO && m2 == (mmb_model *)0x1, "open failure leaves *out");
    CHECK(strstr(mmb_ctx_error(ctx), "no-such-dir/config.json") != NULL, "message: %s", mmb_ctx_error(ctx));
    mmb_model_free(m);
    mmb_ctx_free(ctx);
}

/* mmb_st_write_meta: the metadata read back by mmb_st_meta, and bad keys refused with no file written. */
static void test_write_meta(void) {
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    CHECK(mmb_ctx_new(&cp, &ctx) == MMB_OK, "ctx");
    float x[3] = {1, 2, 3};
    mmb_tensor t = {.name = "x", .dtype = MMB_F32, .ndim = 1, .shape = {3}, .data = x};
    const char *keys[] = {"input.0", "input.1", "note"}, *vals[] = {"cat.jpg", "d\u00e9j\u00e0 \"vu\".png", ""};
    const char *path = "api_test_meta.safetensors";
    CHECK(mmb_st_write_meta(ctx, path, &t, 1, keys, vals, 3) == MMB_OK, "write meta: %s", mmb_ctx_error(ctx));
    mmb_st_file *f = NULL;
    CHECK(mmb_st_open(ctx, path, &f) == MMB_OK, "open: %s", mmb_ctx_error(ctx));
    for (int i = 0; f && i < 3; i++) {
        const char *v = mmb_st_meta(f, keys[i]);
        CHECK(v && strcmp(v, vals[i]) == 0, "meta %s read back", keys[i]);
    }
    CHECK(f && mmb_st_count(f) == 1 && mmb_st_meta(f, "missing") == NULL, "one tensor, no other key");
    mmb_st_close(f);
    const char *dup[] = {"a", "a"}, *empty[] = {""}, *two[] = {"1", "2"};
    remove(path);
    CHECK(mmb_st_write_meta(ctx, path, &t, 1, dup, two, 2) == MMB_ERR_ARG, "duplicate key refused");
    CHECK(mmb_st_write_meta(ctx, path, &t, 1, empty, two, 1) == MMB_ERR_ARG, "empty key refused");
    CHECK(access(path, F_OK) != 0, "nothing written for refused metadata");
    CHECK(mmb_st_write_meta(ctx, path, &t, 1, NULL, NULL, 0) == MMB_OK, "no metadata is mmb_st_write");
    remove(path);
    mmb_ctx_free(ctx);
}

/* mmb_file_write: the one writer's promises seen from the API (tests/oracle/test_hostile_outputs.py has the
 * CLI's): bytes written, a FIFO refused and left a FIFO, a symlink written through, the mode kept. */
static void test_file_write(void) {
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 1;
    CHECK(mmb_ctx_new(&cp, &ctx) == MMB_OK, "ctx");
    const char *path = "api_test_file.txt", *fifo = "api_test_fifo", *link = "api_test_link";
    remove(path), remove(fifo), remove(link);
    CHECK(mmb_file_write(ctx, NULL, "x", 1) == MMB_ERR_ARG && mmb_file_write(ctx, path, NULL, 1) == MMB_ERR_ARG,
          "bad arguments refused");
    CHECK(mmb_file_write(ctx, path, "abc", 3) == MMB_OK, "write: %s", mmb_ctx_error(ctx));
    struct stat st;
    CHECK(stat(path, &st) == 0 && st.st_size == 3, "three bytes written");
    CHECK(chmod(path, 0600) == 0 && symlink(path, link) == 0, "setup");
    CHECK(mmb_file_write(ctx, link, "abcd", 4) == MMB_OK, "write through the link: %s", mmb_ctx_error(ctx));
    CHECK(lstat(link, &st) == 0 && S_ISLNK(st.st_mode), "the link kept");
    CHECK(stat(path, &st) == 0 && st.st_size == 4 && (st.st_mode & 07777) == 0600, "target replaced, mode kept");
    CHECK(mkfifo(fifo, 0644) == 0, "mkfifo");
    CHECK(mmb_file_write(ctx, fifo, "x", 1) == MMB_ERR_IO && strstr(mmb_ctx_error(ctx), "is a FIFO"),
          "a FIFO refused: %s", mmb_ctx_error(ctx));
    CHECK(lstat(fifo, &st) == 0 && S_ISFIFO(st.st_mode), "the FIFO left alone");
    remove(path), remove(fifo), remove(link);
    mmb_ctx_free(ctx);
}

int main(void) {
    test_fixed_values();
    test_roundtrip_and_example();
    test_write_meta();
    test_file_write();
    return DONE("api");
}
