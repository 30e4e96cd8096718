/* Encoder benchmark: CLIP ViT-L/14-336 (random weights at real size: 24 layers, 577 tokens,
 * width 1024) followed by LLaVA-1.5's mlp2x_gelu projector to 4096, against PyTorch (eager, and
 * torch.compile with --peers ...,compile) and onnxruntime (an ONNX export of the same torch module) in
 * the same run and thread count.
 *
 *   bench_vit [--threads 1,2] [--batch 1,4] [--reps N] [--layers L] [--dir CACHE] [--no-peers] [--quick]
 *             [--peers torch,compile,onnxruntime] [--json FILE]
 *             [--dtype f32|bf16|f16|int8]   (the linear layers' weight dtype, mmb_ctx_params.weight_dtype)
 *
 * bench/peer_vit.py writes the checkpoint (transformers save_pretrained, cached in CACHE), the
 * pixel values and the ONNX export; mmbridge runs the same weights on the same pixels through the
 * public API (mmb_vit_forward with the last hidden state, then mmb_model_connect). Each peer is kept
 * running (peer_vit.py --serve) at the thread count, and the implementations take turns: one warm-up
 * each, then per repetition one timed run of ours and one of each peer (A/B interleaved). Reports
 * seconds per image of the forward pass alone (median of --reps, divided by the batch), GFLOP/s, the
 * share of the machine's fp32 FMA peak measured at start, and peak RSS (each peer's own process).
 * Loading (mapping, converting and packing the weights) is timed apart, once per thread count, and
 * printed on its own line: it is not part of the per-image figures. --json FILE: one JSON object per
 * figure, with the range of the samples. */
#include "bench_common.h"
#include "mmbridge.h"

#include <unistd.h>

#define MAXP 3

int main(int argc, char **argv) {
    int threads[8] = {1, 2}, nt = 2, batches[8] = {1, 4}, nb = 2, reps = 3, layers = 24, peers = 1, wdt = MMB_F32;
    const char *dir = "build/bench-cache", *peer_list = "torch,onnxruntime";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) nt = parse_list(argv[++i], threads, 8);
        else if (!strcmp(argv[i], "--batch") && i + 1 < argc) nb = parse_list(argv[++i], batches, 8);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--layers") && i + 1 < argc) layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--dir") && i + 1 < argc) dir = argv[++i];
        else if (!strcmp(argv[i], "--no-peers")) peers = 0;
        else if (!strcmp(argv[i], "--peers") && i + 1 < argc) peer_list = argv[++i], peers = 1;
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) { if (!json_open(argv[++i])) return 2; }
        else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
            const char *v = argv[++i];
            wdt = !strcmp(v, "f32") ? MMB_F32 : !strcmp(v, "bf16") ? MMB_BF16 : !strcmp(v, "f16") ? MMB_F16
                : !strcmp(v, "int8") ? MMB_I8 : -1;
            if (wdt < 0) { fprintf(stderr, "bench_vit: --dtype wants f32, bf16, f16 or int8\n"); return 2; }
        }
        else if (!strcmp(argv[i], "--quick")) { layers = 1; reps = 1; nt = 1; nb = 1; peers = 0; }
        else {
            fprintf(stderr, "usage: bench_vit [--threads 1,2] [--batch 1,4] [--reps N] [--layers L] [--dir D] "
                            "[--no-peers] [--peers torch,compile,onnxruntime] [--quick] [--dtype f32|bf16|f16|int8] "
                            "[--json FILE]\n");
            return 2;
        }
    }
    if (reps < 1 || reps > 50 || layers < 1 || layers > 24 || nt < 1 || nb < 1) {
        fprintf(stderr, "bench_vit: bad option\n");
        return 2;
    }
    for (int bi = 0; bi < nb; bi++)
        if (batches[bi] < 1 || batches[bi] > 64) { fprintf(stderr, "bench_vit: bad --batch\n"); return 2; }
    /* the peers named in --peers, in its order */
    char pnames[MAXP][32];
    int np = 0;
    for (const char *q = peer_list; peers && *q && np < MAXP;) {
        size_t len = strcspn(q, ",");
        snprintf(pnames[np++], sizeof pnames[0], "%.*s", (int)len, q);
        q += len + (q[len] == ',');
    }
    bool onnx = false;
    for (int k = 0; k < np; k++) onnx |= !strcmp(pnames[k], "onnxruntime");
    char cmd[2048], ckpt[1024], px_path[1024];
    for (int bi = 0; bi < nb; bi++) {
        snprintf(cmd, sizeof cmd, "mkdir -p '%s' && python3 bench/peer_vit.py --dir '%s' --layers %d --batch %d "
                 "--prepare-only %s 2>/dev/null", dir, dir, layers, batches[bi], onnx ? "--onnx" : "");
        char *prep = run_peer(cmd);
        if (!prep) { fprintf(stderr, "bench_vit: %s failed (run from the repository root)\n", cmd); return 1; }
        free(prep);
    }
    snprintf(ckpt, sizeof ckpt, "%s/llava-vitl336-%d", dir, layers);

    const char *dtn = wdt == MMB_F32 ? "fp32" : wdt == MMB_BF16 ? "bf16" : wdt == MMB_F16 ? "f16" : "int8";
    printf("bench_vit: CLIP ViT-L/14-336 (%d layers, 577 tokens, width 1024) + mlp2x_gelu 1024->4096->4096, "
           "%s weights (activations fp32), forward pass only, median of %d\n", layers, dtn, reps);
    printf("%-8s %-6s %-22s %10s %10s %9s %9s %10s\n", "threads", "batch", "implementation", "s/image", "GFLOP/s",
           "% peak", "vs ours", "peak RSS");
    for (int ti = 0; ti < nt; ti++) {
        int th = threads[ti];
        double peak = fp32_peak(th) * 1e-9;
        json_line("\"bench\": \"peak\", \"threads\": %d, \"fp32\": %.6g", th, peak);
        /* the peers first, loading side by side; each answers once loaded, and nothing is timed meanwhile */
        timed_peer tp[MAXP];
        for (int k = 0; k < np; k++) {
            snprintf(cmd, sizeof cmd, "exec python3 bench/peer_vit.py --serve %s --dir '%s' --layers %d --threads %d "
                     "2>/dev/null", pnames[k], dir, layers, th);
            timed_peer_start(&tp[k], cmd);
        }
        for (int k = 0; k < np; k++) timed_peer_ready(&tp[k]);
        mmb_ctx *ctx = NULL;
        mmb_ctx_params cp = mmb_ctx_default_params();
        cp.n_threads = th;
        cp.weight_dtype = wdt;
        mmb_model *m = NULL;
        double t_load = now();
        if (mmb_ctx_new(&cp, &ctx) != MMB_OK || mmb_model_open(ctx, ckpt, &m) != MMB_OK) {
            fprintf(stderr, "bench_vit: %s\n", ctx ? mmb_ctx_error(ctx) : "no context");
            return 1;
        }
        t_load = now() - t_load;
        const mmb_vit *v = mmb_model_vit(m);
        mmb_vit_info vi;
        mmb_model_info mi;
        mmb_vit_get_info(v, &vi);
        mmb_model_get_info(m, &mi);
        double gflop = (double)(vi.flops_per_image + mi.flops_per_image) * 1e-9;
        for (int bi = 0; bi < nb; bi++) {
            int B = batches[bi];
            mmb_st_file *pf = NULL;
            snprintf(px_path, sizeof px_path, "%s/pixels-%d.safetensors", dir, B);
            if (mmb_st_open(ctx, px_path, &pf) != MMB_OK) { fprintf(stderr, "bench_vit: %s\n", mmb_ctx_error(ctx)); return 1; }
            const float *px = mmb_st_find(pf, "pixel_values")->data;
            float *hs = malloc(sizeof(float) * (size_t)(B * vi.tokens * vi.width));
            float *emb = malloc(sizeof(float) * (size_t)(B * mi.tokens_per_image * mi.out_width));
            int tap = -1;
            double ts[64];
            for (int k = 0; k < np; k++) tp[k].n = 0;
            for (int r = 0; r <= reps; r++) { /* r = 0: everyone's warm-up */
                nap(0.3);
                double t0 = now();
                mmb_features ft = {.batch = B, .tokens = vi.tokens, .width = vi.width, .n_hidden = vi.layers + 1,
                                   .n_taps = 1, .taps = {vi.layers}, .data = {hs}};
                if (mmb_vit_forward(ctx, v, px, B, &tap, 1, &hs) != MMB_OK ||
                    mmb_model_connect(ctx, m, &ft, emb, (size_t)(B * mi.tokens_per_image * mi.out_width)) != MMB_OK) {
                    fprintf(stderr, "bench_vit: %s\n", mmb_ctx_error(ctx));
                    return 1;
                }
                if (r) ts[r - 1] = (now() - t0) / B;
                for (int k = 0; k < np; k++) timed_peer_run(&tp[k], B, r > 0);
            }
            spread ours = spread_of(ts, reps);
            printf("%-8d %-6d %-22s %10.3f %10.1f %8.1f%% %9s %8.0f MiB\n", th, B, "mmbridge", ours.med,
                   gflop / ours.med, 100.0 * gflop / ours.med / peak, "1.00x", peak_rss_mib());
            json_line("\"bench\": \"vit\", \"impl\": \"mmbridge\", \"threads\": %d, \"batch\": %d, \"layers\": %d, "
                      "\"dtype\": \"%s\", \"gflop_per_image\": %.6g, \"s_per_image\": %.6g, \"s_min\": %.6g, "
                      "\"s_max\": %.6g, \"n\": %d, \"peak_rss_mib\": %.1f", th, B, layers, dtn, gflop, ours.med, ours.lo,
                      ours.hi, reps, peak_rss_mib());
            for (int k = 0; k < np; k++) {
                const char *name = tp[k].name[0] ? tp[k].name : pnames[k];
                if (tp[k].why[0] || !tp[k].n) {
                    printf("%-8d %-6d %-22s %10s (%s)\n", th, B, name, "n/a", tp[k].why);
                    json_line("\"bench\": \"vit\", \"impl\": \"%s\", \"threads\": %d, \"batch\": %d, "
                              "\"error\": \"%s\"", pnames[k], th, B, tp[k].why[0] ? tp[k].why : "no timing");
                    continue;
                }
                spread sp = spread_of(tp[k].ts, tp[k].n);
                double s = sp.med / B;
                printf("%-8d %-6d %-22s %10.3f %10.1f %8.1f%% %8.2fx %8.0f MiB\n", th, B, name, s, gflop / s,
                       100.0 * gflop / s / peak, s / ours.med, tp[k].rss);
                json_line("\"bench\": \"vit\", \"impl\": \"%s\", \"peer\": \"%s\", \"threads\": %d, \"batch\": %d, "
                          "\"layers\": %d, \"gflop_per_image\": %.6g, \"s_per_image\": %.6g, \"s_min\": %.6g, "
                          "\"s_max\": %.6g, \"n\": %d, \"peak_rss_mib\": %.1f", pnames[k], name, th, B, layers, gflop,
                          s, sp.lo / B, sp.hi / B, tp[k].n, tp[k].rss);
            }
            fflush(stdout);
            free(hs);
            free(emb);
            mmb_st_close(pf);
        }
        printf("%-8d %-6s %-22s %10.3f s (open, convert and pack the weights; not in s/image)\n", th, "", "mmbridge load",
               t_load);
        json_line("\"bench\": \"vit_load\", \"threads\": %d, \"s\": %.6g", th, t_load);
        for (int k = 0; k < np; k++) peer_stop(&tp[k].proc);
        mmb_model_free(m);
        mmb_ctx_free(ctx);
        printf("%-8d %-6s %-22s %10s %10.1f\n", th, "", "fp32 FMA peak", "", peak);
        fflush(stdout);
    }
    return 0;
}
