/* libFuzzer target: config.json. A temporary checkpoint directory is made once per process, with
 * a small valid model.safetensors holding the projector weights of every supported layout
 * (transformers' LLaVA, original LLaVA linear / mlpNx_gelu / simple_res). Each input becomes that
 * directory's config.json and the checkpoint is opened with mmb_model_open; when it opens, its info
 * is read and the connector is run once on small hidden states. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define V 4 /* vision width */
#define D 8 /* d_model */

static mmb_ctx *g_ctx;
static char g_dir[64], g_cfg[96], g_st[96];

static void cleanup(void) {
    unlink(g_cfg);
    unlink(g_st);
    rmdir(g_dir);
    mmb_ctx_free(g_ctx);
}

static float g_w[1024];

static mmb_tensor t2(const char *name, int64_t a, int64_t b) {
    return (mmb_tensor){.name = name, .dtype = MMB_F32, .ndim = 2, .shape = {a, b}, .data = g_w};
}
static mmb_tensor t1(const char *name, int64_t a) {
    return (mmb_tensor){.name = name, .dtype = MMB_F32, .ndim = 1, .shape = {a}, .data = g_w};
}

static void setup(void) {
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = 1;
    if (mmb_ctx_new(&p, &g_ctx) != MMB_OK) abort();
    snprintf(g_dir, sizeof g_dir, "/tmp/mmb_fuzz_cfg_%ld_XXXXXX", (long)getpid());
    if (!mkdtemp(g_dir)) abort();
    snprintf(g_cfg, sizeof g_cfg, "%s/config.json", g_dir);
    snprintf(g_st, sizeof g_st, "%s/model.safetensors", g_dir);
    for (int i = 0; i < 1024; i++) g_w[i] = (float)((i * 37) % 17 - 8) / 16.0f;
    mmb_tensor ts[] = {
        /* transformers LlavaMultiModalProjector */
        t2("model.multi_modal_projector.linear_1.weight", D, V), t1("model.multi_modal_projector.linear_1.bias", D),
        t2("model.multi_modal_projector.linear_2.weight", D, D), t1("model.multi_modal_projector.linear_2.bias", D),
        /* original LLaVA: linear */
        t2("model.mm_projector.weight", D, V), t1("model.mm_projector.bias", D),
        /* original LLaVA: mlp3x_gelu (mlp2x_gelu uses the first two) */
        t2("model.mm_projector.0.weight", D, V), t1("model.mm_projector.0.bias", D),
        t2("model.mm_projector.2.weight", D, D), t1("model.mm_projector.2.bias", D),
        t2("model.mm_projector.4.weight", D, D), t1("model.mm_projector.4.bias", D),
        /* original LLaVA: simple_res, C = mm_hidden_size = V */
        t1("model.mm_projector.pre_norm.weight", V), t1("model.mm_projector.pre_norm.bias", V),
        t2("model.mm_projector.proj.0.weight", V, V), t1("model.mm_projector.proj.0.bias", V),
        t2("model.mm_projector.proj.2.weight", V, V), t1("model.mm_projector.proj.2.bias", V),
        /* something that is not a weight */
        {.name = "model.vision_tower.embeddings.position_ids", .dtype = MMB_I64, .ndim = 2, .shape = {1, 5},
         .data = g_w},
    };
    ts[2].dtype = MMB_BF16; /* half-precision weights are converted at load */
    ts[8].dtype = MMB_F16;
    if (mmb_st_write(g_ctx, g_st, ts, (int)(sizeof ts / sizeof ts[0])) != MMB_OK) {
        fprintf(stderr, "fuzz_config: %s\n", mmb_ctx_error(g_ctx));
        abort();
    }
    atexit(cleanup);
}

static void write_config(const uint8_t *data, size_t size) {
    FILE *fp = fopen(g_cfg, "wb");
    if (!fp || fwrite(data, 1, size, fp) != size || fclose(fp) != 0) abort();
}

/* Runs the connector on batch 1 x 3 tokens when the model is small enough. */
static void run_once(mmb_model *m) {
    mmb_model_info in;
    if (mmb_model_get_info(m, &in) != MMB_OK) abort();
    if (in.n_taps < 1 || in.n_taps > MMB_MAX_TAPS || in.in_width <= 0 || in.out_width <= 0) abort();
    if (in.vision_width <= 0 || in.vision_width > 64 || in.out_width > 64) return;
    const int64_t tokens = 3;
    int64_t t_out = mmb_model_tokens_out(g_ctx, m, tokens);
    if (t_out < 0) return;
    if (t_out > 16) abort();
    static float hs[3 * 64];
    static float out[16 * 64];
    for (int i = 0; i < 3 * 64; i++) hs[i] = (float)(i % 7) - 3.0f;
    mmb_features ft = {.batch = 1, .tokens = tokens, .width = in.vision_width, .n_hidden = 0};
    /* one buffer per distinct tap, negative taps resolved against 100 hidden states */
    ft.n_hidden = 100;
    for (int i = 0; i < in.n_taps; i++) {
        int want = in.taps[i] < 0 ? in.taps[i] + ft.n_hidden : in.taps[i];
        bool have = false;
        for (int k = 0; k < ft.n_taps; k++) have |= ft.taps[k] == want;
        if (!have && want >= 0) { ft.taps[ft.n_taps] = want; ft.data[ft.n_taps++] = hs; }
    }
    (void)mmb_model_connect(g_ctx, m, &ft, out, sizeof out / sizeof out[0]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_ctx) setup();
    write_config(data, size);
    mmb_model *m = NULL;
    mmb_status s = mmb_model_open(g_ctx, g_dir, &m);
    if (s != MMB_OK) {
        if (m || !mmb_ctx_error(g_ctx)[0]) abort(); /* failures say why and leave *out alone */
        return 0;
    }
    run_once(m);
    mmb_model_free(m);
    return 0;
}
