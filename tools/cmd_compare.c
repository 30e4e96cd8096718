/* mmbridge compare: one table of connectors' costs, measured on this machine: the registry's
 * connectors built at a given size (mmb_connector_measure), and any checkpoints named; and what one image
 * costs the LLM, fusion C (its tokens are prefill positions and KV cache) against fusion A (gated
 * cross-attention layers read them, mmb_mllm_info's xattn_* figures) and fusion B (a second weight set per
 * layer for C's positions, or adapter prompts: mmb_mllm_info's added_* and adapter_* figures). */
#include "cli.h"
#include "plot.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char name[160], measured[24];
    char error[4096];          /* why the row could not be measured (the library's message, whole); "" when it was */
    int64_t params, flops, tokens;
    int64_t llm[3];            /* the LLM the prefill column is for: layers, width, MLP width */
    int64_t q_width, kv_width; /* its attention's query width (heads x head_dim) and K/V width (kv_heads x
                                  head_dim); d for the --llm-* sizes */
    int own_llm;               /* 1: the checkpoint's own LLM, 0: the --llm-* sizes */
    char fusion;               /* 'A': gated cross-attention layers read the tokens; 'B': layers of the LLM changed
                                  (expert weight sets, with the tokens spliced as C's, or adapter prompts); 'C':
                                  spliced */
    int adapter;               /* B: the image becomes adapter prompts (no positions) */
    /* what one image costs the LLM: positions it takes in the sequence, FLOPs of its keys and values computed
     * once outside the prefill (fusion A's gated layers), bytes of keys and values kept, FLOPs each later text
     * position spends on it */
    int64_t positions, kv_flops, kv_bytes, text_flops;
    int64_t xattn_layers, xattn_params; /* A: the gated layers and their parameters; B: the changed layers and the
                                           parameters the design adds (0 for C) */
    double seconds, prefill, mem_mib;
} row;

static double prefill_flops(double t, double L, double d, double f) {
    return 2.0 * t * L * (4 * d * d + 3 * d * f) + 2.0 * L * d * t * t;
}

/* Records why the row failed (also on stderr); returns 1. */
static int row_fail(row *r, const char *why) {
    snprintf(r->error, sizeof r->error, "%s", why);
    fprintf(stderr, "mmbridge: error: %s\n", why);
    return 1;
}

/* A checkpoint as it is: its vision path on random pixels (or its connector on random features). */
static int measure_model(mmb_ctx *ctx, const char *dir, int reps, int64_t grid, int64_t width, row *r) {
    size_t len = strlen(dir);
    while (len > 1 && dir[len - 1] == '/') len--;
    const char *base = dir + len;
    while (base > dir && base[-1] != '/') base--;
    snprintf(r->name, sizeof r->name, "%.*s", (int)(dir + len - base), base);
    snprintf(r->measured, sizeof r->measured, "-");
    mmb_mllm *mm = NULL;
    if (cli_open(ctx, dir, NULL, NULL, 0, NULL, &mm)) return row_fail(r, mmb_ctx_error(ctx));
    const mmb_model *m = mmb_mllm_model(mm);
    if (!m) {
        char why[4096];
        snprintf(why, sizeof why, "%s: a %s alone: no connector to measure", dir,
                 mmb_mllm_vit(mm) ? "vision tower" : "language model");
        mmb_mllm_free(mm);
        return row_fail(r, why);
    }
    mmb_model_info mi;
    mmb_model_get_info(m, &mi);
    snprintf(r->name, sizeof r->name, "%.*s (%s)", (int)(dir + len - base), base, mi.connector);
    if (mmb_mllm_lm(mm)) {  /* the checkpoint's own LLM is what its prefill column is for */
        mmb_lm_info li;
        mmb_lm_get_info(mmb_mllm_lm(mm), &li);
        r->llm[0] = li.layers;
        r->llm[1] = li.d_model;
        r->llm[2] = li.intermediate;
        r->q_width = li.heads * li.head_dim;
        r->kv_width = li.kv_heads * li.head_dim;
        r->own_llm = 1;
        mmb_mllm_info in;
        mmb_mllm_get_info(mm, &in);
        if (in.fusion == MMB_FUSION_B) { /* the second weight sets (or the adapter's prompts) are what B adds */
            r->fusion = 'B';
            r->xattn_layers = in.adapter_layers ? in.adapter_layers : in.expert_sets > 1 ? li.layers : 0;
            r->xattn_params = in.added_params;
            r->text_flops = in.added_flops_per_token;
            if ((r->adapter = in.adapter_layers > 0)) { /* V2: the image is the prompts' keys and values */
                r->kv_flops = in.adapter_flops_per_image;
                r->kv_bytes = 2 * (int64_t)in.adapter_layers * in.adapter_len * r->kv_width * (int64_t)sizeof(float);
            }
        }
        if (in.fusion == MMB_FUSION_D) r->fusion = 'D'; /* ids: prefill positions and KV cache as C's */
        if (in.fusion == MMB_FUSION_A) { /* the image is one marker position; the gated layers pay for it */
            r->fusion = 'A';
            r->positions = 1;
            r->kv_flops = in.xattn_kv_flops_per_image;
            r->kv_bytes = in.xattn_kv_bytes_per_image;
            r->text_flops = in.xattn_flops_per_token;
            r->xattn_layers = in.xattn_layers;
            r->xattn_params = in.xattn_params;
        }
    }
    mmb_connector_report rep;
    int rc = mmb_model_measure(ctx, m, grid, width, reps, &rep) != MMB_OK;
    if (rc) {
        char why[4096];
        snprintf(why, sizeof why, "%s: %s", dir, mmb_ctx_error(ctx));
        row_fail(r, why);
    } else {
        snprintf(r->measured, sizeof r->measured, "%s", rep.with_tower ? "tower+connector" : "connector");
        r->params = rep.params;
        r->flops = rep.flops_per_image;
        r->tokens = rep.tokens_out;
        r->seconds = rep.seconds;
        r->mem_mib = (double)(rep.weight_bytes + rep.activation_bytes) / 1048576.0;
    }
    mmb_mllm_free(mm);
    return rc;
}

static void write_csv(FILE *f, const row *rows, int n) {
    fprintf(f, "connector,measured,params,gflop_per_image,visual_tokens,llm_prefill_tflop,latency_ms,memory_mib,llm,"
            "fusion,llm_positions,xattn_kv_flops_per_image,llm_kv_bytes_per_image,llm_flops_per_text_token,"
            "xattn_layers,xattn_params\n");
    for (int i = 0; i < n; i++)
        fprintf(f, "\"%s\",%s,%lld,%.9g,%lld,%.9g,%.9g,%.9g,%lldx%lldx%lld %s,%s,%lld,%lld,%lld,%lld,%lld,%lld\n",
                rows[i].name, rows[i].measured, (long long)rows[i].params, (double)rows[i].flops * 1e-9, (long long)rows[i].tokens,
                rows[i].prefill * 1e-12, rows[i].seconds * 1e3, rows[i].mem_mib, (long long)rows[i].llm[0],
                (long long)rows[i].llm[1], (long long)rows[i].llm[2], rows[i].own_llm ? "checkpoint" : "given",
                rows[i].fusion ? (char[2]){rows[i].fusion, 0} : "C", (long long)rows[i].positions, (long long)rows[i].kv_flops,
                (long long)rows[i].kv_bytes, (long long)rows[i].text_flops, (long long)rows[i].xattn_layers,
                (long long)rows[i].xattn_params);
}

/* Two bar panels, latency (ms) and visual tokens, one row per connector, scaled to each maximum. */
static void write_svg(FILE *f, const row *rows, int n, const char *title) {
    const int rh = 22, left = 230, bw = 300, top = 50, h = top + n * rh + 20, W = left + 2 * (bw + 90);
    double ml = 1e-12, mt = 1;
    for (int i = 0; i < n; i++) {
        if (rows[i].seconds > ml) ml = rows[i].seconds;
        if (rows[i].tokens > mt) mt = (double)rows[i].tokens;
    }
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
            "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, h);
    fprintf(f, "<text x=\"10\" y=\"18\" font-size=\"14\">%s</text>\n", title);
    fprintf(f, "<text x=\"%d\" y=\"40\">latency (ms)</text><text x=\"%d\" y=\"40\">visual tokens</text>\n", left,
            left + bw + 90);
    for (int i = 0; i < n; i++) {
        int y = top + i * rh;
        const char *slash = strrchr(rows[i].name, '/');
        fprintf(f, "<text x=\"10\" y=\"%d\">%.34s</text>\n", y + 14, slash ? slash + 1 : rows[i].name);
        double a = bw * rows[i].seconds / ml, b = bw * (double)rows[i].tokens / mt;
        fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%.1f\" height=\"16\" fill=\"#4477aa\"/>"
                "<text x=\"%.1f\" y=\"%d\">%.2f</text>\n", left, y + 2, a, left + a + 4, y + 14, rows[i].seconds * 1e3);
        fprintf(f, "<rect x=\"%d\" y=\"%d\" width=\"%.1f\" height=\"16\" fill=\"#ee6677\"/>"
                "<text x=\"%.1f\" y=\"%d\">%lld</text>\n", left + bw + 90, y + 2, b, left + bw + 90 + b + 4, y + 14,
                (long long)rows[i].tokens);
    }
    fprintf(f, "</svg>\n");
}

/* The trade-off as a scatter (--png): x the connector's measured latency (ms per image), y the positions an
 * image takes in the LLM's prefill (tokens per image), one labelled marker per row, axes with ticks. PNG_W x PNG_H
 * pixels; the markers are discs of radius 4 in PNG_MARK, a colour nothing else uses (the tests count them). */
#define PNG_W 800
#define PNG_H 520
static const unsigned char PNG_MARK[3] = {214, 39, 40};

static int write_png(mmb_ctx *ctx, const char *path, const row *rows, int n, const char *title) {
    static const unsigned char white[3] = {255, 255, 255}, black[3] = {0, 0, 0}, grid[3] = {225, 225, 225},
                               text[3] = {60, 60, 60};
    const int left = 64, right = 24, top = 44, bottom = 48, pw = PNG_W - left - right, ph = PNG_H - top - bottom;
    double xmax = 0, ymax = 0;
    for (int i = 0; i < n; i++) {
        xmax = rows[i].seconds * 1e3 > xmax ? rows[i].seconds * 1e3 : xmax;
        ymax = (double)rows[i].positions > ymax ? (double)rows[i].positions : ymax;
    }
    double x0, y0, xs = plot_ticks(0, xmax > 0 ? xmax * 1.08 : 1, 8, &x0), ys = plot_ticks(0, ymax > 0 ? ymax * 1.08 : 1, 6, &y0);
    xmax = ceil((xmax > 0 ? xmax * 1.08 : 1) / xs - 1e-9) * xs;  /* the axes end on a tick */
    ymax = ceil((ymax > 0 ? ymax * 1.08 : 1) / ys - 1e-9) * ys;
    mmb_image c;
    if (plot_new(&c, PNG_W, PNG_H, white)) return cli_fail(NULL, "out of memory");
    char t[160];
    snprintf(t, sizeof t, "%.128s", title);
    plot_text(&c, 8, 6, t, 1, text);
    plot_text(&c, 8, 22, "LLM prefill (tokens per image)", 1, black);
    const char *xl = "connector latency (ms per image)";
    plot_text(&c, left + (pw - plot_text_width(xl, 1)) / 2, PNG_H - 14, xl, 1, black);
    for (double v = x0; v <= xmax + xs * 1e-6; v += xs) {
        int px = left + (int)lround(v / xmax * pw);
        plot_line(&c, px, top, px, top + ph, grid);
        plot_line(&c, px, top + ph, px, top + ph + 4, black);
        snprintf(t, sizeof t, "%g", fabs(v) < xs * 1e-6 ? 0.0 : v);
        plot_text(&c, px - plot_text_width(t, 1) / 2, top + ph + 8, t, 1, black);
    }
    for (double v = y0; v <= ymax + ys * 1e-6; v += ys) {
        int py = top + ph - (int)lround(v / ymax * ph);
        plot_line(&c, left, py, left + pw, py, grid);
        plot_line(&c, left - 4, py, left, py, black);
        snprintf(t, sizeof t, "%g", fabs(v) < ys * 1e-6 ? 0.0 : v);
        plot_text(&c, left - 7 - plot_text_width(t, 1), py - 3, t, 1, black);
    }
    plot_line(&c, left, top, left, top + ph, black);
    plot_line(&c, left, top + ph, left + pw, top + ph, black);
    int *xy = malloc(sizeof(int) * 6 * (size_t)(n > 0 ? n : 1)), *lab = xy + 2 * (n > 0 ? n : 1);
    if (!xy) { mmb_image_free(&c); return cli_fail(NULL, "out of memory"); }
    for (int i = 0; i < n; i++) { /* labels first, so no label covers a marker */
        xy[2 * i] = left + (int)lround(rows[i].seconds * 1e3 / xmax * pw);
        xy[2 * i + 1] = top + ph - (int)lround((double)rows[i].positions / ymax * ph);
        const char *slash = strrchr(rows[i].name, '/');
        snprintf(t, sizeof t, "%.28s", slash ? slash + 1 : rows[i].name);
        int tw = plot_text_width(t, 1), tx = xy[2 * i] + 7, ty = xy[2 * i + 1] - 10;
        if (tx + tw > PNG_W - 2) tx = xy[2 * i] - 7 - tw;
        /* a label that would overlap an earlier one moves down a line at a time (a crowd of points stacks its
         * labels), at most n lines */
        for (int moved = 0, hit = 1; hit && moved <= n; moved++) {
            hit = 0;
            for (int k = 0; k < i && !hit; k++)
                hit = tx < lab[4 * k] + lab[4 * k + 2] && lab[4 * k] < tx + tw && ty < lab[4 * k + 1] + 9 &&
                      lab[4 * k + 1] < ty + 9;
            if (hit) ty += 9;
        }
        lab[4 * i] = tx, lab[4 * i + 1] = ty, lab[4 * i + 2] = tw;
        plot_text(&c, tx, ty, t, 1, text);
    }
    for (int i = 0; i < n; i++) plot_disc(&c, xy[2 * i], xy[2 * i + 1], 4, PNG_MARK);
    free(xy);
    int r = mmb_image_write_png(ctx, path, &c) != MMB_OK ? cli_fail(ctx, NULL) : 0;
    mmb_image_free(&c);
    return r;
}

/* Writes path through fn: the text made in memory, then written as every output is (cli_write_text). */
static int write_out(const char *path, void (*fn)(FILE *, const row *, int, const char *), const row *rows, int n,
                     const char *title) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return cli_fail(NULL, "out of memory");
    fn(f, rows, n, title);
    int r = fclose(f) != 0 || !buf ? cli_fail(NULL, "out of memory") : cli_write_text(path, buf);
    free(buf);
    return r;
}

static void csv_fn(FILE *f, const row *rows, int n, const char *title) { (void)title; write_csv(f, rows, n); }

int cmd_compare(int argc, char **argv) {
    int64_t width = 1024, grid = 24, d = 4096, L = 32, ffn = 11008, reps = 5, threads = 0;
    const char *types = NULL, *csv = NULL, *svg = NULL, *png = NULL, *models[64], *cfgs[64];
    int n_models = 0, n_cfgs = 0;
    const cli_opt opts[] = {
        {.name = "--width", .meta = "C", .type = CLI_INT, .dst = &width,
         .help = "registry rows: channels of the random features (default 1024)", .lo = 1, .hi = 1 << 16},
        {.name = "--grid", .meta = "G", .type = CLI_INT, .dst = &grid,
         .help = "registry rows: a G x G patch grid, CLS dropped (default 24)", .lo = 1, .hi = 1 << 10},
        {.name = "--llm-width", .meta = "D", .type = CLI_INT, .dst = &d,
         .help = "the LLM the LLM-side columns are for, when a row brings none: width\n"
         "(default 4096), also the registry rows' projection width", .lo = 1, .hi = 1 << 16},
        {.name = "--llm-layers", .meta = "L", .type = CLI_INT, .dst = &L,
         .help = "... its layers (default 32)", .lo = 1, .hi = 1 << 10},
        {.name = "--llm-ffn", .meta = "F", .type = CLI_INT, .dst = &ffn,
         .help = "... its MLP width (default 11008)", .lo = 1, .hi = 1 << 20},
        {.name = "--types", .meta = "T1,T2", .type = CLI_STR, .dst = &types,
         .help = "the registry connectors to measure (all: every one, also with MODELs)"},
        {.name = "--config", .meta = "TYPE=JSON", .type = CLI_STRS, .dst = cfgs,
         .help = "config.json keys for one type, e.g. moe_mlp2x_gelu='{...}'", .count = &n_cfgs,
         .max = 64},
        {.name = "--reps", .meta = "N", .type = CLI_INT, .dst = &reps,
         .help = "timed runs per row, after one warm-up (default 5)", .lo = 1, .hi = 1000},
        {.name = "--csv", .meta = "F", .type = CLI_STR, .dst = &csv, .help = "also write both tables as one CSV"},
        {.name = "--svg", .meta = "F", .type = CLI_STR, .dst = &svg,
         .help = "also write a bar chart of latency and tokens"},
        {.name = "--png", .meta = "F", .type = CLI_STR, .dst = &png,
         .help = "also write a scatter (800x520 PNG) of connector latency (ms per image, x)\n"
         "against the image's LLM prefill positions (tokens per image, y), a point per row"},
        CLI_OPT_THREADS(&threads),
    };
    const cli_spec spec = {"compare", "[MODEL...]",
        "Prints two tables, one row per connector in each. The first: parameters, FLOPs per image,\n"
        "visual tokens the connector makes, the measured median latency, and the planned memory\n"
        "(weights in f32 + activations). The second: what one image costs the LLM, by fusion type.\n"
        "Fusion C (the registry's connectors, LLaVA-style checkpoints): the tokens are T positions\n"
        "of the prompt: their prefill FLOPs, 2 T L (4 d^2 + 3 d f) + 2 L d T^2 (a Llama-style decoder\n"
        "of L layers, width d, MLP width f; the defaults are a 7B: 32, 4096, 11008), their keys and\n"
        "values in the KV cache, 2 L T kv 4 bytes (kv = kv_heads x head_dim), and 4 L T q FLOPs that\n"
        "every later text position spends attending them (q = heads x head_dim; kv = q = d for the\n"
        "--llm-* sizes). Fusion A (IDEFICS: gated cross-attention layers inside the LLM): the image\n"
        "takes one marker position and no prefill; the gated layers compute its visual keys and values\n"
        "once (x-attn K/V FLOPs) and keep them (bytes, every gated layer), and every text position\n"
        "pays their FLOPs (projections, attention over the T tokens, gated MLP: mmbridge info's\n"
        "cross-attention line). Fusion B: CogVLM's and mPLUG-Owl2's image rows are prefill positions\n"
        "as C's, through a second weight set per layer: 'added layers, params' are every layer and the\n"
        "parameters the second sets add (no FLOPs per position: each runs one set); LLaMA-Adapter V2's\n"
        "image takes no position: it becomes the adapted layers' prompts, whose keys and values are\n"
        "computed once (K/V FLOPs, bytes) and which every text position attends (MFLOP/text pos).\n"
        "Fusion D (Chameleon, Emu3): the image is ids of the LLM's vocabulary from a VQ tokenizer (its\n"
        "row's FLOPs and latency are the VQ encoder's); the ids are prefill positions as C's tokens.\n"
        "Without --types, every registered connector that can be built from a config alone (--types\n"
        "all: also when MODELs are named) is measured with random weights on random features of\n"
        "--width channels on a --grid x --grid patch grid (CLS dropped), projecting to --llm-width.\n"
        "Each MODEL checkpoint is measured as it is: with a vision tower (or as a family model), its\n"
        "whole vision path on random pixels; without one, its connector on random features. Its LLM\n"
        "columns are for its own LLM when the directory has one (a LLaVA's text_config and weights,\n"
        "IDEFICS' decoder), else for the --llm-* sizes; the LLM column says which.\n"
        "--csv writes both tables as one: connector, measured, params, gflop_per_image, visual_tokens,\n"
        "llm_prefill_tflop, latency_ms, memory_mib, llm, then fusion (A, B, C or D), llm_positions,\n"
        "xattn_kv_flops_per_image (A, B's adapters; 0 for C), llm_kv_bytes_per_image, llm_flops_per_text_token,\n"
        "xattn_layers and xattn_params (0 for C); these last six exact integers.\n"
        "A row that cannot be measured (an unsupported checkpoint, an unknown type) is reported in the\n"
        "first table with its error, the others are still measured; the exit status is then 1 and\n"
        "--csv / --svg / --png are not written (a file is only written when it holds every row).\n",
        opts, CLI_N(opts), models, 0, 64, &n_models};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r == 1 ? 0 : r;
    for (int i = 0; i < n_cfgs; i++)
        if (!strchr(cfgs[i], '=')) {
            fprintf(stderr, "mmbridge compare: --config wants TYPE=JSON, got '%s'\n", cfgs[i]);
            return 2;
        }
    cli_ctx_opts co = {.threads = threads};
    mmb_ctx *ctx = cli_ctx(&co);
    if (!ctx) return 1;
    /* The types: --types, or every registered name (llava is mlp2x_gelu's network; Dense Connectors read taps). */
    char list[4096] = "";
    if (types && strcmp(types, "all") != 0) snprintf(list, sizeof list, "%s", types);
    else if (types || !n_models) {
        const char *const *names;
        int nn = mmb_connector_names(&names);
        for (int i = 0; i < nn; i++) {
            if (!strcmp(names[i], "llava") || !strncmp(names[i], "dense_", 6)) continue;
            char t[128];  /* a pattern name (mlpNx_gelu) as its 2-layer member */
            snprintf(t, sizeof t, "%s", names[i]);
            char *nx = strstr(t, "Nx");
            if (nx) *nx = '2';
            if (strlen(list) + strlen(t) + 2 < sizeof list) { if (*list) strcat(list, ","); strcat(list, t); }
        }
    }
    static row rows[128];
    memset(rows, 0, sizeof rows);
    int n = 0, failed = 0;
    for (char *save = NULL, *t = *list ? strtok_r(list, ",", &save) : NULL; t && n < 64;
         t = strtok_r(NULL, ",", &save)) {
        const char *cfg = NULL;
        size_t tl = strlen(t);
        for (int i = 0; i < n_cfgs; i++)
            if (!strncmp(cfgs[i], t, tl) && cfgs[i][tl] == '=') cfg = cfgs[i] + tl + 1;
        mmb_connector_report rep;
        row *w = &rows[n++];
        snprintf(w->name, sizeof w->name, "%s", t);
        if (mmb_connector_measure(ctx, t, width, grid, d, cfg, (int)reps, &rep) != MMB_OK) {
            snprintf(w->measured, sizeof w->measured, "-");
            failed += row_fail(w, mmb_ctx_error(ctx));
            continue;
        }
        snprintf(w->measured, sizeof w->measured, "connector");
        w->params = rep.params;
        w->flops = rep.flops_per_image;
        w->tokens = rep.tokens_out;
        w->seconds = rep.seconds;
        w->mem_mib = (double)(rep.weight_bytes + rep.activation_bytes) / 1048576.0;
    }
    for (int i = 0; i < n_models; i++) failed += measure_model(ctx, models[i], (int)reps, grid, width, &rows[n++]);
    for (int i = 0; i < n; i++) {
        row *w = &rows[i];
        if (!w->own_llm) {
            w->llm[0] = L;
            w->llm[1] = d;
            w->llm[2] = ffn;
            w->q_width = w->kv_width = d;
        }
        if (w->fusion == 'A' || w->adapter) continue; /* no prefill positions: its costs came with the checkpoint */
        /* fusion C: the image's tokens are prefill positions, kept in the KV cache (keys and values, f32, every
         * layer), and every later text position attends them (scores and the weighted sum) */
        w->prefill = prefill_flops((double)w->tokens, (double)w->llm[0], (double)w->llm[1], (double)w->llm[2]);
        w->positions = w->tokens;
        w->kv_bytes = 2 * w->llm[0] * w->tokens * w->kv_width * (int64_t)sizeof(float);
        w->text_flops = 4 * w->llm[0] * w->tokens * w->q_width; /* B's expert sets add no FLOPs a position */
    }
    char title[256];
    snprintf(title, sizeof title, "vision width %lld, %lldx%lld grid, LLM width %lld (%lld layers, MLP %lld) unless "
             "the checkpoint has one, %d thread(s), median of %lld", (long long)width, (long long)grid, (long long)grid,
             (long long)d, (long long)L, (long long)ffn, mmb_ctx_threads(ctx), (long long)reps);
    printf("%s\n", title);
    printf("| %-28s | %-15s | %12s | %10s | %6s | %11s | %10s |\n", "connector", "measured", "params", "GFLOP/img",
           "tokens", "latency ms", "memory MiB");
    printf("|%.30s|%.17s|%.14s|%.12s|%.8s|%.13s|%.12s|\n", "------------------------------", "-----------------",
           "--------------", "------------", "--------", "-------------", "------------");
    for (int i = 0; i < n; i++) {
        const row *w = &rows[i];
        if (w->error[0]) {
            printf("| %-28s | %-15s | error: %s\n", w->name, w->measured, w->error);
            continue;
        }
        printf("| %-28s | %-15s | %12lld | %10.3f | %6lld | %11.3f | %10.1f |\n", w->name, w->measured,
               (long long)w->params, (double)w->flops * 1e-9, (long long)w->tokens, w->seconds * 1e3, w->mem_mib);
    }
    printf("\nwhat one image costs the LLM (C: its tokens are prefill positions kept in the KV cache; A: gated "
           "cross-attention layers read them; B: C's positions through a second weight set per layer, or adapter "
           "prompts: the added layers, the parameters and the FLOPs per text position the design adds)\n");
    printf("| %-28s | %-6s | %-21s | %9s | %13s | %13s | %10s | %14s | %-22s |\n", "connector", "fusion",
           "added layers, params", "positions", "prefill TFLOP", "x-attn K/V GF", "K/V MiB", "MFLOP/text pos",
           "LLM (layers x d x f)");
    printf("|%.30s|%.8s|%.23s|%.11s|%.15s|%.15s|%.12s|%.16s|%.24s|\n", "------------------------------", "--------",
           "-----------------------", "-----------", "---------------", "---------------", "------------",
           "----------------", "------------------------");
    for (int i = 0; i < n; i++) {
        const row *w = &rows[i];
        if (w->error[0]) continue;
        char llm[64], xa[48] = "-", kvf[32] = "-"; /* fusion C: its keys and values are part of the prefill */
        snprintf(llm, sizeof llm, "%lldx%lldx%lld %s", (long long)w->llm[0], (long long)w->llm[1],
                 (long long)w->llm[2], w->own_llm ? "(own)" : "");
        if (w->fusion) snprintf(xa, sizeof xa, "%lld, %lld", (long long)w->xattn_layers, (long long)w->xattn_params);
        if (w->fusion == 'A' || w->adapter) snprintf(kvf, sizeof kvf, "%.3f", (double)w->kv_flops * 1e-9);
        printf("| %-28s | %-6s | %-21s | %9lld | %13.3f | %13s | %10.3f | %14.3f | %-22s |\n", w->name,
               w->fusion ? (char[2]){w->fusion, 0} : "C", xa, (long long)w->positions, w->prefill * 1e-12, kvf,
               (double)w->kv_bytes / 1048576.0, (double)w->text_flops * 1e-6, llm);
    }
    int rc = failed ? 1 : 0;
    if (failed) fprintf(stderr, "mmbridge compare: %d of %d row(s) could not be measured%s\n", failed, n,
                        csv || svg || png ? "; --csv / --svg / --png not written" : "");
    else {
        if (csv) rc |= write_out(csv, csv_fn, rows, n, title);
        if (svg) rc |= write_out(svg, write_svg, rows, n, title);
        if (png) rc |= write_png(ctx, png, rows, n, title);
    }
    mmb_ctx_free(ctx);
    return rc;
}
