/* mmbridge compare: one table of connectors' costs, measured on this machine: the registry's
 * connectors built at a given size (mmb_connector_measure), and any checkpoints named. */
#include "cli.h"

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
    int own_llm;               /* 1: the checkpoint's own LLM, 0: the --llm-* sizes */
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
    if (cli_open(ctx, dir, NULL, NULL, 0, &mm)) return row_fail(r, mmb_ctx_error(ctx));
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
        r->own_llm = 1;
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
    fprintf(f, "connector,measured,params,gflop_per_image,visual_tokens,llm_prefill_tflop,latency_ms,memory_mib,llm\n");
    for (int i = 0; i < n; i++)
        fprintf(f, "\"%s\",%s,%lld,%.9g,%lld,%.9g,%.9g,%.9g,%lldx%lldx%lld %s\n", rows[i].name, rows[i].measured,
                (long long)rows[i].params, (double)rows[i].flops * 1e-9, (long long)rows[i].tokens,
                rows[i].prefill * 1e-12, rows[i].seconds * 1e3, rows[i].mem_mib, (long long)rows[i].llm[0],
                (long long)rows[i].llm[1], (long long)rows[i].llm[2], rows[i].own_llm ? "checkpoint" : "given");
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

/* Writes path through fn, via a temporary file renamed into place. */
static int write_out(const char *path, void (*fn)(FILE *, const row *, int, const char *), const row *rows, int n,
                     const char *title) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) { fprintf(stderr, "mmbridge: error: %s: %s\n", tmp, strerror(errno)); return 1; }
    fn(f, rows, n, title);
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        fprintf(stderr, "mmbridge: error: %s: %s\n", path, strerror(errno));
        remove(tmp);
        return 1;
    }
    return 0;
}

static void csv_fn(FILE *f, const row *rows, int n, const char *title) { (void)title; write_csv(f, rows, n); }

int cmd_compare(int argc, char **argv) {
    int64_t width = 1024, grid = 24, d = 4096, L = 32, ffn = 11008, reps = 5, threads = 0;
    const char *types = NULL, *csv = NULL, *svg = NULL, *models[64], *cfgs[64];
    int n_models = 0, n_cfgs = 0;
    const cli_opt opts[] = {
        {.name = "--width", .meta = "C", .type = CLI_INT, .dst = &width,
         .help = "registry rows: channels of the random features (default 1024)", .lo = 1, .hi = 1 << 16},
        {.name = "--grid", .meta = "G", .type = CLI_INT, .dst = &grid,
         .help = "registry rows: a G x G patch grid, CLS dropped (default 24)", .lo = 1, .hi = 1 << 10},
        {.name = "--llm-width", .meta = "D", .type = CLI_INT, .dst = &d,
         .help = "the LLM the prefill column is for, when a row brings none: width\n"
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
        {.name = "--csv", .meta = "F", .type = CLI_STR, .dst = &csv, .help = "also write the table as CSV"},
        {.name = "--svg", .meta = "F", .type = CLI_STR, .dst = &svg,
         .help = "also write a bar chart of latency and tokens"},
        CLI_OPT_THREADS(&threads),
    };
    const cli_spec spec = {"compare", "[MODEL...]",
        "Prints one row per connector: parameters, FLOPs per image, visual tokens handed to the LLM,\n"
        "the prefill FLOPs those tokens cost the LLM, the measured median latency, and the planned\n"
        "memory (weights in f32 + activations). Without --types, every registered connector that can\n"
        "be built from a config alone (--types all: also when MODELs are named) is measured with random\n"
        "weights on random features of --width channels on a --grid x --grid patch grid (CLS dropped),\n"
        "projecting to --llm-width.\n"
        "Each MODEL checkpoint is measured as it is: with a vision tower (or as a family model), its\n"
        "whole vision path on random pixels; without one, its connector on random features. Its\n"
        "prefill column is for its own LLM when the directory has one (a LLaVA's text_config and\n"
        "weights), else for the --llm-* sizes; the 'llm' column says which.\n"
        "LLM prefill FLOPs for T visual tokens: 2 T L (4 d^2 + 3 d f) + 2 L d T^2 (a Llama-style\n"
        "decoder of L layers, width d, MLP width f; the defaults are a 7B: 32, 4096, 11008).\n"
        "A row that cannot be measured (an unsupported checkpoint, an unknown type) is reported in the\n"
        "table with its error, the others are still measured; the exit status is then 1 and --csv /\n"
        "--svg are not written (a file is only written when it holds every row).\n",
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
        if (!rows[i].own_llm) {
            rows[i].llm[0] = L;
            rows[i].llm[1] = d;
            rows[i].llm[2] = ffn;
        }
        rows[i].prefill = prefill_flops((double)rows[i].tokens, (double)rows[i].llm[0], (double)rows[i].llm[1],
                                        (double)rows[i].llm[2]);
    }
    char title[256];
    snprintf(title, sizeof title, "vision width %lld, %lldx%lld grid, LLM width %lld (%lld layers, MLP %lld) unless "
             "the checkpoint has one, %d thread(s), median of %lld", (long long)width, (long long)grid, (long long)grid,
             (long long)d, (long long)L, (long long)ffn, mmb_ctx_threads(ctx), (long long)reps);
    printf("%s\n", title);
    printf("| %-28s | %-15s | %12s | %10s | %6s | %15s | %11s | %10s | %-22s |\n", "connector", "measured", "params",
           "GFLOP/img", "tokens", "LLM prefill TF", "latency ms", "memory MiB", "LLM (layers x d x f)");
    printf("|%.30s|%.17s|%.14s|%.12s|%.8s|%.17s|%.13s|%.12s|%.24s|\n", "------------------------------",
           "-----------------", "--------------", "------------", "--------", "-----------------",
           "-------------", "------------", "------------------------");
    for (int i = 0; i < n; i++) {
        const row *w = &rows[i];
        if (w->error[0]) {
            printf("| %-28s | %-15s | error: %s\n", w->name, w->measured, w->error);
            continue;
        }
        char llm[64];
        snprintf(llm, sizeof llm, "%lldx%lldx%lld %s", (long long)w->llm[0], (long long)w->llm[1],
                 (long long)w->llm[2], w->own_llm ? "(own)" : "");
        printf("| %-28s | %-15s | %12lld | %10.3f | %6lld | %15.3f | %11.3f | %10.1f | %-22s |\n", w->name, w->measured,
               (long long)w->params, (double)w->flops * 1e-9, (long long)w->tokens, w->prefill * 1e-12,
               w->seconds * 1e3, w->mem_mib, llm);
    }
    int rc = failed ? 1 : 0;
    if (failed) fprintf(stderr, "mmbridge compare: %d of %d row(s) could not be measured%s\n", failed, n,
                        csv || svg ? "; --csv / --svg not written" : "");
    else {
        if (csv) rc |= write_out(csv, csv_fn, rows, n, title);
        if (svg) rc |= write_out(svg, write_svg, rows, n, title);
    }
    mmb_ctx_free(ctx);
    return rc;
}
