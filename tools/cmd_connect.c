/* mmbridge connect: a checkpoint's connector on hidden states read from a safetensors file. */
#include "cli.h"

#include <stdlib.h>
#include <errno.h>
#include <stdbool.h>
#include <string.h>

/* Reads hidden_states.{i} from f into ft (converted to f32 copies in owned). Returns 0 or 1 (printed). */
static int load_features(const char *path, mmb_st_file *f, mmb_features *ft, float **owned) {
    memset(ft, 0, sizeof *ft);
    for (int i = 0; i < mmb_st_count(f); i++) {
        const mmb_tensor *t = mmb_st_at(f, i);
        char *end;
        if (strncmp(t->name, "hidden_states.", 14) != 0) continue;
        /* strictly "hidden_states." then decimal digits: no sign, space or leading zero, so that no two
         * names alias one index */
        const char *dg = t->name + 14;
        bool digits = *dg >= '0' && *dg <= '9' && !(dg[0] == '0' && dg[1]);
        for (const char *q = dg; digits && *q; q++) digits = *q >= '0' && *q <= '9';
        long idx = digits && strlen(dg) <= 6 ? strtol(dg, &end, 10) : -1;
        if (idx < 0 || idx > 100000) {
            fprintf(stderr, "mmbridge: error: %s: tensor '%s': expected hidden_states.<non-negative index>\n", path, t->name);
            return 1;
        }
        if (ft->n_taps == MMB_MAX_TAPS) {
            fprintf(stderr, "mmbridge: error: %s: more than %d hidden_states tensors\n", path, MMB_MAX_TAPS);
            return 1;
        }
        if ((t->ndim != 2 && t->ndim != 3) || (t->dtype != MMB_F32 && t->dtype != MMB_F16 && t->dtype != MMB_BF16)) {
            fprintf(stderr, "mmbridge: error: %s: tensor '%s': expected [batch, tokens, width] F32/F16/BF16, got "
                    "%d dims %s\n", path, t->name, t->ndim, mmb_dtype_name(t->dtype));
            return 1;
        }
        int64_t b = t->ndim == 3 ? t->shape[0] : 1, tok = t->shape[t->ndim - 2], w = t->shape[t->ndim - 1];
        if (ft->n_taps && (b != ft->batch || tok != ft->tokens || w != ft->width)) {
            fprintf(stderr, "mmbridge: error: %s: tensor '%s': shape [%lld, %lld, %lld] differs from the other "
                    "hidden states [%lld, %lld, %lld]\n", path, t->name, (long long)b, (long long)tok, (long long)w,
                    (long long)ft->batch, (long long)ft->tokens, (long long)ft->width);
            return 1;
        }
        ft->batch = b; ft->tokens = tok; ft->width = w;
        size_t n = (size_t)(b * tok * w);
        owned[ft->n_taps] = malloc(n ? n * sizeof(float) : 1);
        if (!owned[ft->n_taps]) { fprintf(stderr, "mmbridge: error: out of memory\n"); return 1; }
        mmb_to_f32(owned[ft->n_taps], t->data, t->dtype, n);
        ft->data[ft->n_taps] = owned[ft->n_taps];
        ft->taps[ft->n_taps++] = (int)idx;
    }
    if (!ft->n_taps) {
        fprintf(stderr, "mmbridge: error: %s: no 'hidden_states.{i}' tensors\n", path);
        return 1;
    }
    const char *nh = mmb_st_meta(f, "n_hidden_states");
    if (nh) {  /* the whole value a decimal integer, or refused */
        char *end;
        errno = 0;
        long v = strtol(nh, &end, 10);
        if (!(*nh >= '0' && *nh <= '9') || *end || errno || v < 1 || v > 100000) {
            fprintf(stderr, "mmbridge: error: %s: metadata 'n_hidden_states' = '%s' is not an integer in [1, 100000]\n",
                    path, nh);
            return 1;
        }
        ft->n_hidden = (int)v;
    }
    return 0;
}

/* An error about the hidden states, naming the file they came from. */
static int fail_in(mmb_ctx *ctx, const char *file) {
    fprintf(stderr, "mmbridge: error: %s: %s\n", file, mmb_ctx_error(ctx));
    return 1;
}

int cmd_connect(int argc, char **argv) {
    const char *pos[1], *features = NULL, *output = NULL;
    cli_ctx_opts co = {0};
    mmb_dense_params dense = {0};
    const cli_opt opts[] = {
        {.name = "--features", .meta = "IN", .type = CLI_STR, .dst = &features,
         .help = "the hidden states: a safetensors file (required)"},
        {.name = "-o", .meta = "OUT", .type = CLI_STR, .dst = &output,
         .help = "the output safetensors file (required)"},
        CLI_OPTS_CTX(&co),
        CLI_OPTS_DENSE(&dense),
    };
    const cli_spec spec = {"connect", "MODEL --features IN.safetensors -o OUT.safetensors",
        "IN holds tensors 'hidden_states.{i}' [batch, tokens, width] (or [tokens, width]), f32/f16/bf16,\n"
        "indexed as transformers' output_hidden_states (0 = embeddings, i = output of block i). The\n"
        "model's feature selection is applied: its layer(s) (negative indices are resolved with the\n"
        "metadata key 'n_hidden_states' of IN, or the checkpoint's vision_config), the CLS strategy,\n"
        "and concatenation on channels for a list of layers. OUT gets 'embeddings'\n"
        "[batch, tokens_out, d_model] f32, written to a temporary file and renamed.\n",
        opts, CLI_N(opts), pos, 1, 1, NULL};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r == 1 ? 0 : r;
    if (!features || !output) {
        fprintf(stderr, "mmbridge connect: needs --features and -o\n");
        return 2;
    }
    mmb_ctx *ctx = cli_ctx(&co);
    if (!ctx) return 1;
    mmb_mllm *mm = NULL;
    mmb_st_file *f = NULL;
    float *owned[MMB_MAX_TAPS] = {0}, *out = NULL;
    mmb_features ft;
    mmb_model_info in;
    r = 1;
    if (cli_open(ctx, pos[0], NULL, &dense, 1, NULL, &mm)) goto done;
    const mmb_model *m = mmb_mllm_model(mm);
    if (!m) {
        fprintf(stderr, "mmbridge: error: %s: a %s alone has no connector to run\n", pos[0],
                mmb_mllm_vit(mm) ? "vision tower" : "language model");
        goto done;
    }
    if (mmb_st_open(ctx, features, &f) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    mmb_model_get_info(m, &in);
    if (load_features(features, f, &ft, owned)) goto done;
    if (!ft.n_hidden && in.vision_layers) ft.n_hidden = in.vision_layers + 1;
    int64_t t_out = mmb_model_tokens_out(ctx, m, ft.tokens);
    if (t_out < 0) { fail_in(ctx, features); goto done; }
    size_t n = (size_t)(ft.batch * t_out * in.out_width);
    out = malloc(n ? n * sizeof(float) : 1);
    if (!out) { fprintf(stderr, "mmbridge: error: out of memory for %zu floats\n", n); goto done; }
    double t0 = cli_now();
    if (mmb_model_connect(ctx, m, &ft, out, n) != MMB_OK) { fail_in(ctx, features); goto done; }
    double ms = (cli_now() - t0) * 1e3;
    mmb_tensor e = {.name = "embeddings", .dtype = MMB_F32, .ndim = 3, .shape = {ft.batch, t_out, in.out_width},
                    .data = out};
    if (mmb_st_write(ctx, output, &e, 1) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    printf("%s: %s, %lld image(s) x %lld tokens x %d -> embeddings [%lld, %lld, %d] in %.2f ms, %d thread(s) -> %s\n",
           pos[0], in.connector, (long long)ft.batch, (long long)ft.tokens, in.in_width, (long long)ft.batch,
           (long long)t_out, in.out_width, ms, mmb_ctx_threads(ctx), output);
    cli_print_routing(m);
    r = 0;
done:
    for (int i = 0; i < MMB_MAX_TAPS; i++) free(owned[i]);
    free(out);
    mmb_st_close(f);
    mmb_mllm_free(mm);
    mmb_ctx_free(ctx);
    return r;
}
