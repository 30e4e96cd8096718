/* Dense Connector benchmark: what STI, SCI, DCI and the efficient 144-token DCI cost against the plain
 * LLaVA-1.5 path on CLIP ViT-L/14-336 (random weights at real size), all in one run, interleaved, and
 * what their visual tokens cost a 7B LLM's prefill.
 *
 *   bench_dense [--threads 1,2] [--reps N] [--dir CACHE] [--quick] [--layers L] [--rows llava,sti,sci,dci,dci144]
 *               [--peers torch,compile] [--json FILE]
 *
 * The tower is bench_vit's cached checkpoint (bench/peer_vit.py writes it); the two original-layout
 * projectors (mlp2x_gelu 1024 -> 4096 -> 4096 for LLaVA and STI, 3072 -> 4096 -> 4096 for SCI and
 * DCI) are written here with random weights, once, into CACHE. Every row runs mmb_model_encode on
 * the same pixels (batch 1): tower up to the deepest layer read, Dense Connector, projector.
 * Reported: median seconds per image over --reps after a warm-up, the overhead against LLaVA, visual
 * tokens, vision-side GFLOP, the hidden-state buffers the encoder keeps, and the prefill TFLOP of a
 * Vicuna-7B (32 layers, width 4096, MLP 11008) on those tokens plus 64 text tokens:
 * 2 T (32 (4 d^2 + 3 d f)) + 32 * 2 d T^2 (causal attention scores and values).
 * --peers: the DCI row in PyTorch (eager, compiled) on the same tower, projector and pixels
 * (bench/peer_vit.py --serve --workload dci), kept running and taking turns with the rows. --json
 * FILE: one JSON object per figure, with the range of the samples. */
#include "bench_common.h"
#include "mmbridge.h"

#include <sys/stat.h>

#define D_LLM 4096

static float *fill(size_t n, float scale, uint64_t *s) {
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; p && i < n; i++) {
        *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
        p[i] = scale * ((float)(*s >> 40) / 8388608.0f - 1.0f);
    }
    return p;
}

/* An original-layout mlp2x_gelu projector width_in -> 4096 -> 4096 in dir (written once). */
static int write_projector(mmb_ctx *ctx, const char *dir, int width_in, const char *dense) {
    char path[1200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    struct stat st;
    if (stat(path, &st) == 0) return 0;
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return 1;
    fprintf(f, "{\"architectures\": [\"LlavaLlamaForCausalLM\"], \"model_type\": \"llava_llama\", \"hidden_size\": %d, "
            "\"mm_hidden_size\": %d, \"mm_projector_type\": \"mlp2x_gelu\", \"mm_vision_select_layer\": -2, "
            "\"mm_vision_select_feature\": \"patch\", \"mm_dense_connector_type\": \"%s\", "
            "\"mm_vision_tower\": \"openai/clip-vit-large-patch14-336\"}\n", D_LLM, width_in, dense);
    fclose(f);
    uint64_t seed = 0x9e3779b97f4a7c15ull + (uint64_t)width_in;
    float *w0 = fill((size_t)D_LLM * width_in, 0.02f, &seed), *b0 = fill(D_LLM, 0.02f, &seed);
    float *w2 = fill((size_t)D_LLM * D_LLM, 0.02f, &seed), *b2 = fill(D_LLM, 0.02f, &seed);
    mmb_tensor t[4] = {
        {.name = "model.mm_projector.0.weight", .dtype = MMB_F32, .ndim = 2, .shape = {D_LLM, width_in}, .data = w0},
        {.name = "model.mm_projector.0.bias", .dtype = MMB_F32, .ndim = 1, .shape = {D_LLM}, .data = b0},
        {.name = "model.mm_projector.2.weight", .dtype = MMB_F32, .ndim = 2, .shape = {D_LLM, D_LLM}, .data = w2},
        {.name = "model.mm_projector.2.bias", .dtype = MMB_F32, .ndim = 1, .shape = {D_LLM}, .data = b2},
    };
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    int r = !w0 || !b0 || !w2 || !b2 || mmb_st_write(ctx, path, t, 4) != MMB_OK;
    free(w0); free(b0); free(w2); free(b2);
    return r;
}

/* Opens the projector in dir with the tower in tower_dir. */
static mmb_model *open_with(mmb_ctx *ctx, const char *dir, const char *tower_dir) {
    mmb_model *m = NULL;
    mmb_vit *v = NULL;
    if (mmb_model_open(ctx, dir, &m) != MMB_OK || mmb_vit_open(ctx, tower_dir, &v) != MMB_OK ||
        mmb_model_attach_vit(ctx, m, v) != MMB_OK) {
        fprintf(stderr, "bench_dense: %s\n", mmb_ctx_error(ctx));
        mmb_vit_free(v);
        mmb_model_free(m);
        return NULL;
    }
    return m;
}

/* Prefill FLOPs of a Vicuna-7B on t tokens. */
static double prefill_flops(double t) {
    const double d = 4096, f = 11008, L = 32;
    return 2.0 * t * L * (4 * d * d + 3 * d * f) + L * 2.0 * d * t * t;
}

int main(int argc, char **argv) {
    int threads[8] = {1, 2}, nt = 2, reps = 3, layers = 24;
    const char *dir = "build/bench-cache", *row_list = "llava,sti,sci,dci,dci144", *peer_list = "";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) nt = parse_list(argv[++i], threads, 8);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--quick")) { layers = 2; reps = 1; nt = 1; }
        else if (!strcmp(argv[i], "--layers") && i + 1 < argc) layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--rows") && i + 1 < argc) row_list = argv[++i];
        else if (!strcmp(argv[i], "--peers") && i + 1 < argc) peer_list = argv[++i];
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) { if (!json_open(argv[++i])) return 2; }
        else {
            fprintf(stderr, "usage: bench_dense [--threads 1,2] [--reps N] [--dir D] [--quick] "
                            "[--layers L] [--rows llava,sti,sci,dci,dci144] [--peers torch,compile] [--json FILE]\n");
            return 2;
        }
    }
    if (reps < 1 || reps > 50 || nt < 1 || layers < 2 || layers > 24) {
        fprintf(stderr, "bench_dense: bad option\n");
        return 2;
    }
    char cmd[2048], tower[1024], px_path[1024], p1024[1024], p3072[1024];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && python3 bench/peer_vit.py --dir '%s' --layers %d --prepare-only 2>/dev/null",
             dir, dir, layers);
    char *prep = run_peer(cmd);
    if (!prep) { fprintf(stderr, "bench_dense: %s failed (run from the repository root)\n", cmd); return 1; }
    free(prep);
    snprintf(tower, sizeof tower, "%s/llava-vitl336-%d", dir, layers);
    snprintf(px_path, sizeof px_path, "%s/pixels-1.safetensors", dir);
    snprintf(p1024, sizeof p1024, "%s/dc-mlp2x-1024", dir);
    snprintf(p3072, sizeof p3072, "%s/dc-mlp2x-3072-dci", dir);
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK || write_projector(ctx, p1024, 1024, "none") ||
        write_projector(ctx, p3072, 3072, "dci")) {
        fprintf(stderr, "bench_dense: cannot write the projectors in %s: %s\n", dir, ctx ? mmb_ctx_error(ctx) : "");
        return 1;
    }
    mmb_ctx_free(ctx);

    /* With a shallow tower (--quick, --layers) the reference's layers do not exist: STI and SCI read
     * hidden_states[L/2 - 1] and [2 (L/2) - 1]; DCI averages [0, L/2) and
     * [L/2, 2 (L/2)), as bench/peer_vit.py's DCI does. */
    mmb_dense_params sti = {.type = MMB_DENSE_STI}, sci = {.type = MMB_DENSE_SCI}, dci = {.type = MMB_DENSE_DCI},
                     eff = {.type = MMB_DENSE_DCI, .tokens = 144};
    if (layers < 16) {
        int h = layers / 2;
        sti.n_layers = sci.n_layers = 2;
        sti.layers[0] = sci.layers[0] = h - 1;
        sti.layers[1] = sci.layers[1] = 2 * h - 1;
        eff.n_groups = dci.n_groups = 2;
        dci.group_last[0] = eff.group_last[0] = h - 1;
        dci.group_first[1] = eff.group_first[1] = h;
        dci.group_last[1] = eff.group_last[1] = 2 * h - 1;
    }
    mmb_dense_params none = {.type = MMB_DENSE_NONE};
    /* Two models (the 1024- and the 3072-wide projector, each with the tower); a row sets its Dense
     * Connector on its model before it runs, outside the timing. */
    struct { const char *key, *name; int model; const mmb_dense_params *p; } all_rows[] = {
        {"llava", "llava-1.5 (-2, mlp2x)", 0, &none}, {"sti", "DC sti (8,16; pool 8)", 0, &sti},
        {"sci", "DC sci (8,16)", 1, &sci},            {"dci", "DC dci (1-12,13-24)", 1, &dci},
        {"dci144", "DC dci efficient 144", 1, &eff},
    }, rows[5];
    int NR = 0, dci_row = -1;
    for (int r = 0; r < 5; r++)
        if (list_has(row_list, all_rows[r].key)) {
            if (!strcmp(all_rows[r].key, "dci")) dci_row = NR;
            rows[NR++] = all_rows[r];
        }
    if (!NR) { fprintf(stderr, "bench_dense: --rows names none of llava,sti,sci,dci,dci144\n"); return 2; }
    static const char *peer_names[2] = {"torch", "compile"};
    printf("bench_dense: CLIP ViT-L/14-336 (%d layers) + Dense Connector + mlp2x_gelu to %d, 1 image, fp32, "
           "median of %d, rows interleaved\n", layers, D_LLM, reps);
    printf("%-8s %-24s %9s %9s %7s %10s %8s %11s %15s\n", "threads", "connector", "s/image", "overhead", "tokens",
           "GFLOP", "% peak", "taps kept", "7B prefill TF");
    for (int ti = 0; ti < nt; ti++) {
        cp.n_threads = threads[ti];
        double peak = fp32_peak(threads[ti]) * 1e-9;
        mmb_model *m[2] = {0};
        mmb_st_file *pf = NULL;
        if (mmb_ctx_new(&cp, &ctx) != MMB_OK || mmb_st_open(ctx, px_path, &pf) != MMB_OK) {
            fprintf(stderr, "bench_dense: %s\n", ctx ? mmb_ctx_error(ctx) : "no context");
            return 1;
        }
        if (!(m[0] = open_with(ctx, p1024, tower)) || !(m[1] = open_with(ctx, p3072, tower))) return 1;
        const float *px = mmb_st_find(pf, "pixel_values")->data;
        timed_peer tp[2];
        const char *pkey[2];
        int np = 0;
        for (int k = 0; k < 2 && dci_row >= 0; k++) {
            if (!list_has(peer_list, peer_names[k])) continue;
            snprintf(cmd, sizeof cmd, "exec python3 bench/peer_vit.py --serve %s --workload dci --projector '%s' "
                     "--dir '%s' --layers %d --threads %d 2>/dev/null", peer_names[k], p3072, dir, layers, threads[ti]);
            pkey[np] = peer_names[k];
            timed_peer_start(&tp[np++], cmd);
        }
        for (int q = 0; q < np; q++) timed_peer_ready(&tp[q]);
        double ts[5][64];
        float *emb = malloc(sizeof(float) * 720 * D_LLM);
        for (int k = 0; k <= reps; k++) {
            for (int r = 0; r < NR; r++) {
                mmb_model *mr = m[rows[r].model];
                if (mmb_model_set_dense(ctx, mr, rows[r].p) != MMB_OK) {
                    fprintf(stderr, "bench_dense: %s: %s\n", rows[r].name, mmb_ctx_error(ctx));
                    return 1;
                }
                double t0 = now();
                if (mmb_model_encode(ctx, mr, px, 1, 336, 336, emb, 720 * D_LLM) != MMB_OK) {
                    fprintf(stderr, "bench_dense: %s: %s\n", rows[r].name, mmb_ctx_error(ctx));
                    return 1;
                }
                if (k) ts[r][k - 1] = now() - t0;
            }
            for (int q = 0; q < np; q++) timed_peer_run(&tp[q], 1, k > 0);
        }
        double base = 0;
        for (int r = 0; r < NR; r++) {
            mmb_model *mr = m[rows[r].model];
            mmb_model_info mi;
            mmb_vit_info vi;
            mmb_model_set_dense(ctx, mr, rows[r].p);
            mmb_model_get_info(mr, &mi);
            mmb_vit_get_info(mmb_model_vit(mr), &vi);
            int deepest = 0;
            for (int i = 0; i < mi.n_taps; i++) {
                int last = (mi.taps[i] < 0 ? mi.taps[i] + vi.layers + 1 : mi.taps[i]) +
                           (mi.tap_spans[i] > 1 ? mi.tap_spans[i] - 1 : 0);
                if (last > deepest) deepest = last;
            }
            spread sp = spread_of(ts[r], reps);
            double s = sp.med;
            if (!r) base = s;
            double gflop = ((double)vi.flops_per_image * deepest / vi.layers + (double)mi.flops_per_image) * 1e-9;
            double kept = (double)mi.n_taps * (double)(vi.tokens * vi.width) * 4.0 / 1048576.0;
            printf("%-8d %-24s %9.3f %8.1f%% %7lld %10.1f %7.1f%% %7.1f MiB %15.2f\n", threads[ti], rows[r].name, s,
                   100.0 * (s / base - 1.0), (long long)mi.tokens_per_image, gflop, 100.0 * gflop / s / peak, kept,
                   prefill_flops((double)mi.tokens_per_image + 64) * 1e-12);
            json_line("\"bench\": \"dense\", \"row\": \"%s\", \"name\": \"%s\", \"impl\": \"mmbridge\", \"threads\": %d, "
                      "\"layers\": %d, \"s_per_image\": %.6g, \"s_min\": %.6g, \"s_max\": %.6g, \"n\": %d, \"tokens\": %lld, "
                      "\"gflop_per_image\": %.6g, \"peak_gflops\": %.6g, \"peak_rss_mib\": %.1f", rows[r].key, rows[r].name,
                      threads[ti], layers, s, sp.lo, sp.hi, reps, (long long)mi.tokens_per_image, gflop, peak,
                      peak_rss_mib());
            for (int q = 0; r == dci_row && q < np; q++) {
                char label[96];
                snprintf(label, sizeof label, "  %s", tp[q].name[0] ? tp[q].name : "peer");
                if (tp[q].why[0] || !tp[q].n) {
                    printf("%-8d %-24s %9s (%s)\n", threads[ti], label, "n/a", tp[q].why);
                    json_line("\"bench\": \"dense\", \"row\": \"%s\", \"impl\": \"%s\", \"threads\": %d, "
                              "\"error\": \"%s\"", rows[r].key, pkey[q], threads[ti], tp[q].why[0] ? tp[q].why : "no timing");
                    continue;
                }
                spread pp = spread_of(tp[q].ts, tp[q].n);
                printf("%-8d %-24s %9.3f %8.2fx %7lld %10.1f %7.1f%% (vs ours; peak RSS %.0f MiB)\n", threads[ti], label,
                       pp.med, pp.med / s, (long long)mi.tokens_per_image, gflop, 100.0 * gflop / pp.med / peak,
                       tp[q].rss);
                json_line("\"bench\": \"dense\", \"row\": \"%s\", \"impl\": \"%s\", \"peer\": \"%s\", \"threads\": %d, "
                          "\"layers\": %d, \"s_per_image\": %.6g, \"s_min\": %.6g, \"s_max\": %.6g, \"n\": %d, "
                          "\"tokens\": %lld, \"gflop_per_image\": %.6g, \"peak_gflops\": %.6g, \"peak_rss_mib\": %.1f",
                          rows[r].key, pkey[q], tp[q].name, threads[ti], layers, pp.med, pp.lo, pp.hi,
                          tp[q].n, (long long)mi.tokens_per_image, gflop, peak, tp[q].rss);
            }
        }
        for (int q = 0; q < np; q++) peer_stop(&tp[q].proc);
        mmb_model_free(m[0]);
        mmb_model_free(m[1]);
        printf("%-8d %-24s %9s %9s %7s %10.1f\n", threads[ti], "fp32 FMA peak (GFLOP/s)", "", "", "", peak);
        fflush(stdout);
        free(emb);
        mmb_st_close(pf);
        mmb_ctx_free(ctx);
    }
    return 0;
}
