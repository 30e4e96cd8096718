/* mmbridge compare: one table of connectors' costs, measured on this machine: the registry's
 * connectors built at a given size (mmb_connector_measure), and any checkpoints named. */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *usage_compare =
    "usage: mmbridge compare [MODEL...] [--width 1024] [--grid 24] [--llm-width 4096]\n"
    "                        [--llm-layers 32] [--llm-ffn 11008] [--types T1,T2,...]\n"
    "                        [--config TYPE=JSON]... [--reps 5] [--csv F] [--svg F] [--threads N]\n"
    "\n"
    "Prints one row per connector: parameters, FLOPs per image, visual tokens handed to the LLM,\n"
    "the prefill FLOPs those tokens cost the LLM, the measured median latency, and the planned\n"
    "memory (weights in f32 + activations). Without --types, every registered connector that can\n"
    "be built from a config alone (--types all: also when MODELs are named) is measured with random\n"
    "weights on random features of --width\n"
    "channels on a --grid x --grid patch grid (CLS dropped), projecting to --llm-width.\n"
    "--config TYPE=JSON adds config.json keys for one type (e.g. moe_mlp2x_gelu='{...}').\n"
    "Each MODEL checkpoint is measured as it is: with a vision tower (or as a family model),\n"
    "its whole vision path on random pixels; without one, its connector on random features.\n"
    "LLM prefill FLOPs for T visual tokens: 2 T L (4 d^2 + 3 d f) + 2 L d T^2 (a Llama-style\n"
    "decoder of L layers, width d, MLP width f; the defaults are a 7B: 32, 4096, 11008).\n"
    "--csv F writes the table as CSV, --svg F as a bar chart of latency and tokens.\n";

typedef struct {
    char name[160], measured[24];
    int64_t params, flops, tokens;
    double seconds, prefill, mem_mib;
} row;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static double prefill_flops(double t, double L, double d, double f) {
    return 2.0 * t * L * (4 * d * d + 3 * d * f) + 2.0 * L * d * t * t;
}

/* A checkpoint as it is: its vision path on random pixels (or its connector on random features). */
static int measure_model(mmb_ctx *ctx, const char *dir, int reps, int64_t grid, int64_t width, row *r) {
    mmb_model *m = NULL;
    if (mmb_model_open(ctx, dir, &m) != MMB_OK) return cli_fail(ctx, NULL);
    mmb_model_info mi;
    mmb_model_get_info(m, &mi);
    const mmb_vit *v = mmb_model_vit(m);
    mmb_vit_info vi = {0};
    if (v) mmb_vit_get_info(v, &vi);
    int tower = v || strcmp(mi.family, "llava") != 0;
    /* The tower's size; a family that takes any size (Qwen2-VL) gets --grid patches a side. */
    int side = v ? vi.image_size : mi.image_size ? mi.image_size : (int)grid * (mi.patch_size ? mi.patch_size : 14);
    int64_t tin = grid * grid + 1, t = tower ? mmb_model_encode_tokens(ctx, m, side, side)
                                             : mmb_model_tokens_out(ctx, m, tin);
    if (!tower && mi.n_taps != 1) {
        fprintf(stderr, "mmbridge: error: %s: a connector reading %d hidden states needs its vision tower to be "
                "measured\n", dir, mi.n_taps);
        mmb_model_free(m);
        return 1;
    }
    int64_t w = tower ? 0 : mi.vision_width ? mi.vision_width : width;
    size_t nin = tower ? (size_t)3 * side * side : (size_t)(tin * w), nout = (size_t)(t > 0 ? t : 0) * mi.out_width;
    float *in = t > 0 ? malloc(nin * sizeof(float)) : NULL, *out = in ? malloc(nout * sizeof(float) + 1) : NULL;
    double *ts = out ? malloc(sizeof(double) * (size_t)reps) : NULL;
    int rc = 1;
    if (!ts) {
        if (t > 0) fprintf(stderr, "mmbridge: error: out of memory\n");
        else cli_fail(ctx, NULL);
        goto done;
    }
    for (size_t i = 0; i < nin; i++) in[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;
    /* The one hidden state read; a depth the checkpoint does not give is taken as just deep enough. */
    int tap = mi.taps[0], n_hidden = mi.vision_layers ? mi.vision_layers + 1 : tap < 0 ? -tap : tap + 1;
    mmb_features ft = {.batch = 1, .tokens = tin, .width = w, .n_hidden = n_hidden, .n_taps = 1,
                       .taps = {tap < 0 ? tap + n_hidden : tap}, .data = {in}};
    for (int k = 0; k <= reps; k++) {
        double t0 = now_s();
        mmb_status s = tower ? mmb_model_encode(ctx, m, in, 1, side, side, out, nout)
                             : mmb_model_connect(ctx, m, &ft, out, nout);
        if (s != MMB_OK) { cli_fail(ctx, NULL); goto done; }
        if (k) ts[k - 1] = now_s() - t0;
    }
    size_t len = strlen(dir);
    while (len > 1 && dir[len - 1] == '/') len--;
    const char *base = dir + len;
    while (base > dir && base[-1] != '/') base--;
    snprintf(r->name, sizeof r->name, "%.*s (%s)", (int)(dir + len - base), base, mi.connector);
    snprintf(r->measured, sizeof r->measured, "%s", tower ? "tower+connector" : "connector");
    r->params = mi.params;
    r->flops = mi.flops_per_image;
    r->tokens = t;
    r->seconds = cli_median(ts, reps);
    r->mem_mib = ((double)mi.params * 4.0 + (double)(nin + nout) * 4.0) / 1048576.0;
    rc = 0;
done:
    free(in);
    free(out);
    free(ts);
    mmb_model_free(m);
    return rc;
}

static void write_csv(FILE *f, const row *rows, int n) {
    fprintf(f, "connector,measured,params,gflop_per_image,visual_tokens,llm_prefill_tflop,latency_ms,memory_mib\n");
    for (int i = 0; i < n; i++)
        fprintf(f, "\"%s\",%s,%lld,%.9g,%lld,%.9g,%.9g,%.9g\n", rows[i].name, rows[i].measured,
                (long long)rows[i].params, (double)rows[i].flops * 1e-9, (long long)rows[i].tokens,
                rows[i].prefill * 1e-12, rows[i].seconds * 1e3, rows[i].mem_mib);
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

static int parse_i64(const char *opt, const char *v, int64_t lo, int64_t hi, int64_t *out) {
    char *end;
    errno = 0;
    long long x = v ? strtoll(v, &end, 10) : 0;
    if (!v || *end || errno || x < lo || x > hi) {
        fprintf(stderr, "mmbridge: %s wants a whole number in %lld..%lld\n", opt, (long long)lo, (long long)hi);
        return 1;
    }
    *out = x;
    return 0;
}

int cli_compare(int argc, char **argv) {
    int64_t width = 1024, grid = 24, d = 4096, L = 32, ffn = 11008, reps = 5, threads = 0;
    const char *types = NULL, *csv = NULL, *svg = NULL, *models[64], *cfgs[64];
    int n_models = 0, n_cfgs = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(usage_compare, stdout); return 0; }
        else if (!strcmp(a, "--width")) bad = parse_i64(a, v, 1, 1 << 16, &width), i++;
        else if (!strcmp(a, "--grid")) bad = parse_i64(a, v, 1, 1 << 10, &grid), i++;
        else if (!strcmp(a, "--llm-width")) bad = parse_i64(a, v, 1, 1 << 16, &d), i++;
        else if (!strcmp(a, "--llm-layers")) bad = parse_i64(a, v, 1, 1 << 10, &L), i++;
        else if (!strcmp(a, "--llm-ffn")) bad = parse_i64(a, v, 1, 1 << 20, &ffn), i++;
        else if (!strcmp(a, "--reps")) bad = parse_i64(a, v, 1, 1000, &reps), i++;
        else if (!strcmp(a, "--threads")) bad = parse_i64(a, v, 1, 1024, &threads), i++;
        else if (!strcmp(a, "--types") && v) types = v, i++;
        else if (!strcmp(a, "--csv") && v) csv = v, i++;
        else if (!strcmp(a, "--svg") && v) svg = v, i++;
        else if (!strcmp(a, "--config") && v && strchr(v, '=') && n_cfgs < 64) cfgs[n_cfgs++] = v, i++;
        else if (a[0] != '-' && n_models < 64) models[n_models++] = a;
        else { fprintf(stderr, "mmbridge: unexpected argument '%s'\n%s", a, usage_compare); return 2; }
        if (bad) return 2;
    }
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = (int)threads;
    mmb_ctx *ctx = NULL;
    if (mmb_ctx_new(&p, &ctx) != MMB_OK) { fprintf(stderr, "mmbridge: error: cannot create a context\n"); return 1; }
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
    row rows[128];
    int n = 0, rc = 0;
    for (char *save = NULL, *t = *list ? strtok_r(list, ",", &save) : NULL; t && n < 64 && !rc;
         t = strtok_r(NULL, ",", &save)) {
        const char *cfg = NULL;
        size_t tl = strlen(t);
        for (int i = 0; i < n_cfgs; i++)
            if (!strncmp(cfgs[i], t, tl) && cfgs[i][tl] == '=') cfg = cfgs[i] + tl + 1;
        mmb_connector_report r;
        if (mmb_connector_measure(ctx, t, width, grid, d, cfg, (int)reps, &r) != MMB_OK) {
            rc = cli_fail(ctx, NULL);
            break;
        }
        row *w = &rows[n++];
        snprintf(w->name, sizeof w->name, "%s", t);
        snprintf(w->measured, sizeof w->measured, "connector");
        w->params = r.params;
        w->flops = r.flops_per_image;
        w->tokens = r.tokens_out;
        w->seconds = r.seconds;
        w->mem_mib = (double)(r.weight_bytes + r.activation_bytes) / 1048576.0;
    }
    for (int i = 0; i < n_models && !rc; i++) rc = measure_model(ctx, models[i], (int)reps, grid, width, &rows[n++]);
    if (!rc) {
        for (int i = 0; i < n; i++) rows[i].prefill = prefill_flops((double)rows[i].tokens, (double)L, (double)d,
                                                                    (double)ffn);
        char title[256];
        snprintf(title, sizeof title, "vision width %lld, %lldx%lld grid, LLM width %lld (%lld layers, MLP %lld), "
                 "%d thread(s), median of %lld", (long long)width, (long long)grid, (long long)grid, (long long)d,
                 (long long)L, (long long)ffn, mmb_ctx_threads(ctx), (long long)reps);
        printf("%s\n", title);
        printf("| %-28s | %-15s | %12s | %10s | %6s | %15s | %11s | %10s |\n", "connector", "measured", "params",
               "GFLOP/img", "tokens", "LLM prefill TF", "latency ms", "memory MiB");
        printf("|%.30s|%.17s|%.14s|%.12s|%.8s|%.17s|%.13s|%.12s|\n", "------------------------------",
               "-----------------", "--------------", "------------", "--------", "-----------------",
               "-------------", "------------");
        for (int i = 0; i < n; i++)
            printf("| %-28s | %-15s | %12lld | %10.3f | %6lld | %15.3f | %11.3f | %10.1f |\n", rows[i].name,
                   rows[i].measured, (long long)rows[i].params, (double)rows[i].flops * 1e-9,
                   (long long)rows[i].tokens, rows[i].prefill * 1e-12, rows[i].seconds * 1e3, rows[i].mem_mib);
        if (csv) rc |= write_out(csv, csv_fn, rows, n, title);
        if (svg) rc |= write_out(svg, write_svg, rows, n, title);
    }
    mmb_ctx_free(ctx);
    return rc;
}
