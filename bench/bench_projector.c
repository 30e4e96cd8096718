/* Projector benchmark: LLaVA-1.5-7B's mlp2x_gelu (576 tokens x 1024 -> 4096 -> GELU -> 4096),
 * mmbridge (each GEMM backend it offers) against PyTorch at the same thread count, with the
 * machine's fp32 FMA peak measured at start; all in one run.
 *
 *   bench_projector [--threads 1,2] [--reps N] [--quick]
 *
 * The checkpoint (random weights, transformers layout) is written to a temporary directory and
 * opened through the public API, so loading and packing happen as for a user, outside the timing.
 * The raw GEMM libraries (OpenBLAS, BLIS, oneDNN) run the projector's two GEMMs alone (no bias,
 * no GELU: a lower bound on what a projector built on them would take). */
#include "bench_common.h"
#include "bench_peers.h"

#include <sys/stat.h>
#include <unistd.h>

enum { T = 576, DV = 1024, D = 4096 };

static float *randn(size_t n, float scale, unsigned *s) {
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; p && i < n; i++) {
        *s = *s * 1664525u + 1013904223u;
        p[i] = scale * (((float)(*s >> 8) / 16777216.0f) * 2.0f - 1.0f);
    }
    return p;
}

static int write_model(const char *dir, int tokens) {
    char path[512];
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return 1;
    fprintf(f, "{\"architectures\": [\"LlavaForConditionalGeneration\"], \"model_type\": \"llava\", "
               "\"vision_feature_layer\": -2, \"vision_feature_select_strategy\": \"full\", "
               "\"vision_config\": {\"model_type\": \"clip_vision_model\", \"hidden_size\": %d, "
               "\"num_hidden_layers\": 24, \"num_attention_heads\": 16, \"image_size\": 336, \"patch_size\": 14}, "
               "\"text_config\": {\"model_type\": \"llama\", \"hidden_size\": %d}}\n", DV, D);
    fclose(f);
    (void)tokens;
    unsigned s = 7;
    float *w1 = randn((size_t)D * DV, 0.03f, &s), *b1 = randn(D, 0.1f, &s), *w2 = randn((size_t)D * D, 0.015f, &s),
          *b2 = randn(D, 0.1f, &s);
    mmb_tensor t[4] = {
        {.name = "model.multi_modal_projector.linear_1.weight", .dtype = MMB_F32, .ndim = 2, .shape = {D, DV}, .data = w1},
        {.name = "model.multi_modal_projector.linear_1.bias", .dtype = MMB_F32, .ndim = 1, .shape = {D}, .data = b1},
        {.name = "model.multi_modal_projector.linear_2.weight", .dtype = MMB_F32, .ndim = 2, .shape = {D, D}, .data = w2},
        {.name = "model.multi_modal_projector.linear_2.bias", .dtype = MMB_F32, .ndim = 1, .shape = {D}, .data = b2},
    };
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    int r = mmb_st_write(NULL, path, t, 4) != MMB_OK;
    free(w1); free(b1); free(w2); free(b2);
    return r;
}

int main(int argc, char **argv) {
    int threads[8] = {1, 2}, nt = 2, reps = 7, tokens = T, peers = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
            nt = 0;
            for (char *p = argv[++i]; p && nt < 8; p = strchr(p, ',') ? strchr(p, ',') + 1 : NULL) threads[nt++] = atoi(p);
        } else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--quick")) { reps = 1; nt = 1; tokens = 16; peers = 0; }
        else { fprintf(stderr, "usage: bench_projector [--threads 1,2] [--reps N] [--quick]\n"); return 2; }
    }
    if (reps < 1 || reps > 60 || nt < 1) { fprintf(stderr, "bench_projector: bad option\n"); return 2; }
    open_peers();
    char dir[] = "/tmp/mmb-bench-proj-XXXXXX";
    if (!mkdtemp(dir) || write_model(dir, tokens)) { fprintf(stderr, "bench_projector: cannot write the model\n"); return 1; }
    unsigned s = 11;
    float *x = randn((size_t)tokens * DV, 1.0f, &s), *out = malloc(sizeof(float) * (size_t)tokens * D);
    double gflop = 2.0 * tokens * ((double)DV * D + (double)D * D) * 1e-9;
    printf("bench_projector: mlp2x_gelu %d x %d -> %d -> %d (LLaVA-1.5-7B), fp32, median of %d\n", tokens, DV, D, D, reps);
    printf("%-8s %-26s %10s %10s %9s %9s\n", "threads", "implementation", "ms", "GFLOP/s", "% peak", "vs best");
    static const struct { mmb_gemm_backend b; const char *name; } backends[] = {
        {MMB_GEMM_OWN, "mmbridge (own GEMM)"}, {MMB_GEMM_OPENBLAS, "mmbridge (OpenBLAS GEMM)"}};
    for (int ti = 0; ti < nt; ti++) {
        int th = threads[ti];
        double peak = fp32_peak(th) * 1e-9, best = 1e30, res[4] = {0};
        for (int bi = 0; bi < 2; bi++) {
            mmb_ctx_params cp = {.n_threads = th, .gemm = backends[bi].b};
            mmb_ctx *ctx = NULL;
            mmb_model *m = NULL;
            if (mmb_ctx_new(&cp, &ctx) != MMB_OK) continue;
            if (mmb_model_open(ctx, dir, &m) != MMB_OK) { fprintf(stderr, "%s\n", mmb_ctx_error(ctx)); return 1; }
            mmb_features ft = {.batch = 1, .tokens = tokens, .width = DV, .n_hidden = 25, .n_taps = 1, .taps = {23}, .data = {x}};
            double ts[64];
            for (int r = 0; r <= reps; r++) {
                double t0 = now();
                if (mmb_model_connect(ctx, m, &ft, out, (size_t)tokens * D) != MMB_OK) { fprintf(stderr, "%s\n", mmb_ctx_error(ctx)); return 1; }
                if (r) ts[r - 1] = now() - t0;
            }
            res[bi] = median(ts, reps);
            best = res[bi] < best ? res[bi] : best;
            mmb_model_free(m);
            mmb_ctx_free(ctx);
        }
        /* The raw libraries: GEMM 1 (tokens x 1024 -> 4096) then GEMM 2 (4096 -> 4096). */
        static const struct { int b; const char *name; } libs[] = {
            {B_OB, "OpenBLAS, 2 GEMMs only"}, {B_BLIS, "BLIS, 2 GEMMs only"}, {B_DNNL, "oneDNN, 2 GEMMs only"}};
        double lib_s[3] = {0};
        unsigned ls = 5;
        float *w1 = randn((size_t)D * DV, 0.03f, &ls), *w2 = randn((size_t)D * D, 0.015f, &ls);
        float *h = malloc(sizeof(float) * (size_t)tokens * D);
        prob p1 = {.A = x, .W = w1, .M = tokens, .N = D, .K = DV}, p2 = {.A = h, .W = w2, .M = tokens, .N = D, .K = D};
        for (int li = 0; li < 3 && w1 && w2 && h; li++) {
            set_threads(libs[li].b, th);
            double ts[64];
            bool ok = true;
            for (int r = 0; r <= reps && ok; r++) {
                double t0 = now();
                ok = run_backend(libs[li].b, &p1, h) && run_backend(libs[li].b, &p2, out);
                if (r) ts[r - 1] = now() - t0;
            }
            if (ok) lib_s[li] = median(ts, reps);
        }
        free(w1); free(w2); free(h);
        char cmd[256];
        snprintf(cmd, sizeof cmd, "python3 bench/peer_torch.py --tokens %d --threads %d --reps %d 2>/dev/null", tokens, th, reps);
        char *o = peers ? run_peer(cmd) : NULL;
        double torch_s = o ? json_num(o, "median_ms") * 1e-3 : -1;
        free(o);
        for (int bi = 0; bi < 2; bi++)
            if (res[bi] > 0)
                printf("%-8d %-26s %10.2f %10.1f %8.1f%% %8.2fx\n", th, backends[bi].name, res[bi] * 1e3, gflop / res[bi],
                       100 * gflop / res[bi] / peak, res[bi] / best);
        for (int li = 0; li < 3; li++)
            if (lib_s[li] > 0)
                printf("%-8d %-26s %10.2f %10.1f %8.1f%% %8.2fx\n", th, libs[li].name, lib_s[li] * 1e3,
                       gflop / lib_s[li], 100 * gflop / lib_s[li] / peak, lib_s[li] / best);
        if (torch_s > 0)
            printf("%-8d %-26s %10.2f %10.1f %8.1f%% %8.2fx\n", th, "PyTorch (same threads)", torch_s * 1e3,
                   gflop / torch_s, 100 * gflop / torch_s / peak, torch_s / best);
        printf("%-8d %-26s %10s %10.1f\n", th, "fp32 FMA peak", "", peak);
        fflush(stdout);
    }
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", dir); unlink(path);
    snprintf(path, sizeof path, "%s/config.json", dir); unlink(path);
    rmdir(dir);
    free(x);
    free(out);
    return 0;
}
