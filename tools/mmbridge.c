/* mmbridge: the command-line tool. `info` describes a checkpoint; `connect` runs its connector on
 * hidden states read from a safetensors file. */
#include "cli.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static const char *usage_main =
    "usage: mmbridge <command> [options]\n"
    "\n"
    "commands:\n"
    "  info MODEL                       describe a checkpoint's connector and its costs\n"
    "  connect MODEL --features IN -o OUT\n"
    "                                   run the connector on hidden states, write embeddings\n"
    "  encode MODEL IMAGE... -o OUT     images -> vision encoder -> connector -> embeddings\n"
    "  compare [MODEL...]               one table of connectors' parameters, FLOPs, tokens, LLM\n"
    "                                   prefill cost, measured latency and memory\n"
    "  generate MODEL --image IMG --prompt TEXT\n"
    "                                   image(s) + prompt -> the LLM -> text, streamed\n"
    "  tokenize DIR --text T            encode / decode with a checkpoint's tokenizer, render its\n"
    "                                   chat template (see `mmbridge tokenize --help`)\n"
    "  demo DIR                         write a random-weight LLaVA-1.5-7B-sized checkpoint and\n"
    "                                   features into DIR, then run info and connect on them\n"
    "\n"
    "MODEL is a Hugging Face checkpoint directory (config.json + *.safetensors), in transformers'\n"
    "LlavaForConditionalGeneration layout or the original LLaVA layout (model.mm_projector.*).\n"
    "\n"
    "  --version                        print the version\n"
    "  --help                           this text; `mmbridge <command> --help` for a command\n";

static const char *usage_info =
    "usage: mmbridge info MODEL [--threads N] [--dtype f32|bf16|f16|int8]\n"
    "\n"
    "Prints the architecture, key layout, connector, hidden layers read (HF hidden_states indices),\n"
    "input and output widths, parameter count, visual tokens and FLOPs per image.\n";

static const char *usage_connect =
    "usage: mmbridge connect MODEL --features IN.safetensors -o OUT.safetensors\n"
    "                        [--threads N] [--gemm auto|own|openblas|naive] [--dtype D]\n"
    "\n"
    "IN holds tensors 'hidden_states.{i}' [batch, tokens, width] (or [tokens, width]), f32/f16/bf16,\n"
    "indexed as transformers' output_hidden_states (0 = embeddings, i = output of block i). The\n"
    "model's feature selection is applied: its layer(s) (negative indices are resolved with the\n"
    "metadata key 'n_hidden_states' of IN, or the checkpoint's vision_config), the CLS strategy,\n"
    "and concatenation on channels for a list of layers. OUT gets 'embeddings'\n"
    "[batch, tokens_out, d_model] f32, written to a temporary file and renamed.\n"
    "\n"
    "  --threads N   worker threads (default: online CPUs)\n"
    "  --gemm B      GEMM backend (default auto = the measured fastest)\n"
    "  --dtype D     compute dtype of the linear layers' weights: f32 (default), bf16, f16 or int8\n"
    "                (per-channel scales); converted once at load, activations stay f32\n";

typedef struct {
    const char *model, *features, *output, *pixels, *vision_tower, *video;
    int frames, no_pool;      /* --frames (0: 8), --no-pool */
    const char *images[256];
    int n_images;
    int threads;
    mmb_gemm_backend gemm;
    mmb_dtype dtype;          /* --dtype: weights' compute dtype (MMB_F32 = 0 by default) */
    int taps[MMB_MAX_TAPS], n_taps;
    int positional;           /* encode takes IMAGE... after MODEL */
    mmb_dense_params dense;   /* --dense*, --tokens: type NONE keeps the checkpoint's own */
    int dense_set;            /* any of them given */
} opts;

static const char *dense_help =
    "Dense Connector (info, connect, encode):\n"
    "  --dense V          put a Dense Connector (sti, sci or dci) in front of the projector of any\n"
    "                     LLaVA checkpoint; its input width must be the vision width (sti) or 3x it\n"
    "  --dense-layers L   sti/sci: paper layer numbers, the last being the final feature, e.g.\n"
    "                     8,16,24 (the default) or 8,16,20,24. Paper layer l is hidden_states[l-1]\n"
    "                     (1 = the embeddings / stem, 2..25 = the 24 blocks of ViT-L)\n"
    "  --dense-groups G   dci: paper layer ranges averaged, e.g. 1-12,13-24 (the default for CLIP-L)\n"
    "                     or 1-8,9-16,17-24; the final feature stays the model's select layer\n"
    "  --dense-pool K     sti: AvgPool1d kernel and stride over the tokens (default 8)\n"
    "  --tokens N         efficient DC (sci/dci): bilinear-resize the projected token grid to N\n"
    "                     tokens, a square (144: 24x24 -> 12x12)\n";

/* Parses "8,16,24" (paper numbering) into the final layer and the shallow ones, or "1-12,13-24" into
 * groups; HF indices are one less. Returns 0 or 2. */
static int parse_dense_list(const char *opt, const char *v, int ranges, mmb_dense_params *p) {
    int first[MMB_MAX_TAPS], last[MMB_MAX_TAPS], n = 0;
    const char *q = v;
    while (*q && n < MMB_MAX_TAPS) {
        char *end;
        long a = strtol(q, &end, 10), b = a;
        if (end != q && ranges && *end == '-') {
            const char *r = end + 1;
            b = strtol(r, &end, 10);
            if (end == r) break;
        }
        if (end == q || (*end && *end != ',') || a < 1 || b < a || b > 100000) break;
        first[n] = (int)a - 1;
        last[n++] = (int)b - 1;
        q = *end ? end + 1 : end;
    }
    if (*q || n < (ranges ? 1 : 2)) {
        fprintf(stderr, "mmbridge: %s wants %s\n", opt, ranges ? "paper layer ranges, e.g. 1-12,13-24"
                                                                 : "two or more paper layer numbers, e.g. 8,16,24");
        return 2;
    }
    if (ranges) {
        p->n_groups = n;
        memcpy(p->group_first, first, sizeof first);
        memcpy(p->group_last, last, sizeof last);
    } else {
        p->use_final = 1;
        p->final_layer = first[n - 1];
        p->n_layers = n - 1;
        memcpy(p->layers, first, sizeof first);
    }
    return 0;
}

/* Parses the Dense Connector options. Returns -1 when `a` is none of them, else 0 or 2. */
static int parse_dense(const char *a, const char *v, opts *o) {
    long n = 0;
    char *end = NULL;
    if (!v) return -1;
    if (strcmp(a, "--dense") == 0) {
        o->dense.type = strcmp(v, "sti") == 0 ? MMB_DENSE_STI : strcmp(v, "sci") == 0 ? MMB_DENSE_SCI
                      : strcmp(v, "dci") == 0 ? MMB_DENSE_DCI : MMB_DENSE_NONE;
        if (!o->dense.type) { fprintf(stderr, "mmbridge: --dense wants sti, sci or dci\n"); return 2; }
    } else if (strcmp(a, "--dense-layers") == 0 || strcmp(a, "--dense-groups") == 0) {
        if (parse_dense_list(a, v, a[8] == 'g', &o->dense)) return 2;
    } else if (strcmp(a, "--dense-pool") == 0 || strcmp(a, "--tokens") == 0) {
        n = strtol(v, &end, 10);
        if (*end || n < 1 || n > 1000000) { fprintf(stderr, "mmbridge: %s wants a positive number\n", a); return 2; }
        if (a[2] == 'd') o->dense.pool = (int)n;
        else o->dense.tokens = n;
    } else
        return -1;
    o->dense_set = 1;
    return 0;
}

/* Parses "0,8,-2" into taps. Returns 0 or 2 on error. */
static int parse_taps(const char *v, opts *o) {
    const char *p = v;
    while (*p) {
        char *end;
        long t = strtol(p, &end, 10);
        if (end == p || (*end && *end != ',') || t < -100000 || t > 100000 || o->n_taps == MMB_MAX_TAPS) {
            fprintf(stderr, "mmbridge: --taps wants a comma-separated list of layer indices, e.g. 0,8,-2\n");
            return 2;
        }
        o->taps[o->n_taps++] = (int)t;
        p = *end ? end + 1 : end;
    }
    return 0;
}


/* Reports an error about the hidden states, naming the file they came from. */
static int fail_in(mmb_ctx *ctx, const char *file) {
    fprintf(stderr, "mmbridge: error: %s: %s\n", file, mmb_ctx_error(ctx));
    return 1;
}

/* Applies the Dense Connector options to the model: over its own Dense Connector, or with --dense. */
static int apply_dense(mmb_ctx *ctx, const opts *o, mmb_model *m) {
    if (!o->dense_set) return 0;
    mmb_dense_params p = mmb_model_dense(m), q = o->dense;
    if (q.type) p.type = q.type;
    if (!p.type) {
        fprintf(stderr, "mmbridge: error: %s has no Dense Connector; --dense-layers, --dense-groups, --dense-pool "
                "and --tokens need --dense sti|sci|dci\n", o->model);
        return 1;
    }
    if (q.n_layers) {
        p.use_final = q.use_final;
        p.final_layer = q.final_layer;
        p.n_layers = q.n_layers;
        memcpy(p.layers, q.layers, sizeof p.layers);
    }
    if (q.n_groups) {
        p.n_groups = q.n_groups;
        memcpy(p.group_first, q.group_first, sizeof p.group_first);
        memcpy(p.group_last, q.group_last, sizeof p.group_last);
    }
    if (q.pool) p.pool = q.pool;
    if (q.tokens) p.tokens = q.tokens;
    return mmb_model_set_dense(ctx, m, &p) != MMB_OK ? cli_fail(ctx, NULL) : 0;
}

/* Parses the options shared by the commands. Returns 0, 1 for --help (printed), or 2 on error. */
static int parse(int argc, char **argv, const char *usage, opts *o) {
    int r;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(usage, stdout);
            if (strstr(usage, "MODEL")) fputs(dense_help, stdout);
            return 1;
        }
        if (strcmp(a, "--threads") == 0 && v) {
            char *end;
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > 1024) { fprintf(stderr, "mmbridge: --threads wants 1..1024\n"); return 2; }
            o->threads = (int)n;
            i++;
        } else if (strcmp(a, "--gemm") == 0 && v) {
            static const char *names[] = {"auto", "naive", "own", "openblas"};
            int k = 0;
            while (k < 4 && strcmp(v, names[k]) != 0) k++;
            if (k == 4) { fprintf(stderr, "mmbridge: --gemm wants auto, own, openblas or naive\n"); return 2; }
            o->gemm = (mmb_gemm_backend)k;
            i++;
        } else if (strcmp(a, "--dtype") == 0 && v) {
            static const char *names[] = {"f32", "bf16", "f16", "int8"};
            static const mmb_dtype dts[] = {MMB_F32, MMB_BF16, MMB_F16, MMB_I8};
            int k = 0;
            while (k < 4 && strcmp(v, names[k]) != 0) k++;
            if (k == 4) { fprintf(stderr, "mmbridge: --dtype wants f32, bf16, f16 or int8\n"); return 2; }
            o->dtype = dts[k];
            i++;
        } else if (strcmp(a, "--features") == 0 && v) {
            o->features = v;
            i++;
        } else if (strcmp(a, "--pixels") == 0 && v) {
            o->pixels = v;
            i++;
        } else if (strcmp(a, "--video") == 0 && v) {
            o->video = v;
            i++;
        } else if (strcmp(a, "--frames") == 0 && v) {
            char *end;
            long n = strtol(v, &end, 10);
            if (*end || n < 1 || n > 256) { fprintf(stderr, "mmbridge: --frames wants 1..256\n"); return 2; }
            o->frames = (int)n;
            i++;
        } else if (strcmp(a, "--no-pool") == 0) {
            o->no_pool = 1;
        } else if (strcmp(a, "--vision-tower") == 0 && v) {
            o->vision_tower = v;
            i++;
        } else if (strcmp(a, "--taps") == 0 && v) {
            if (parse_taps(v, o)) return 2;
            i++;
        } else if ((r = parse_dense(a, v, o)) >= 0) {
            if (r) return r;
            i++;
        } else if (o->positional && o->model && a[0] != '-') {
            if (o->n_images == (int)(sizeof o->images / sizeof o->images[0])) {
                fprintf(stderr, "mmbridge: at most 256 images per call\n");
                return 2;
            }
            o->images[o->n_images++] = a;
        } else if (strcmp(a, "-o") == 0 && v) {
            o->output = v;
            i++;
        } else if (a[0] == '-' || o->model) {
            fprintf(stderr, "mmbridge: unexpected argument '%s'\n%s", a, usage);
            return 2;
        } else
            o->model = a;
    }
    if (!o->model) { fprintf(stderr, "%s", usage); return 2; }
    return 0;
}

static mmb_ctx *make_ctx(const opts *o) {
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = o->threads;
    p.gemm = o->gemm;
    p.weight_dtype = o->dtype;
    mmb_ctx *ctx = NULL;
    if (mmb_ctx_new(&p, &ctx) != MMB_OK) fprintf(stderr, "mmbridge: error: cannot create a context (backend unavailable?)\n");
    return ctx;
}

static void print_taps(const mmb_model_info *in) {
    for (int i = 0; i < in->n_taps; i++) printf(i ? ", %d" : "%d", in->taps[i]);
}

static int cmd_info(int argc, char **argv) {
    opts o = {0};
    int r = parse(argc, argv, usage_info, &o);
    if (r) return r == 1 ? 0 : r;
    mmb_ctx *ctx = make_ctx(&o);
    if (!ctx) return 1;
    mmb_model *m = NULL;
    if (mmb_model_open(ctx, o.model, &m) != MMB_OK) { r = cli_fail(ctx, NULL); mmb_ctx_free(ctx); return r; }
    if (apply_dense(ctx, &o, m)) { mmb_model_free(m); mmb_ctx_free(ctx); return 1; }
    mmb_model_info in;
    mmb_model_get_info(m, &in);
    printf("model:            %s\n", o.model);
    printf("architecture:     %s\n", in.architecture);
    printf("layout:           %s\n", in.layout);
    printf("family:           %s\n", in.family);
    printf("connector:        %s%s%s\n", in.connector, in.activation[0] ? ", activation " : "", in.activation);
    printf("weights:          %s\n", mmb_dtype_name(in.weight_dtype));
    printf("compute dtype:    %s (linear layers' weights; activations f32)\n",
           o.dtype == MMB_I8 ? "int8, per-channel scales" : mmb_dtype_name(o.dtype));
    if (in.dense[0]) {
        mmb_dense_params dp = mmb_model_dense(m);
        printf("dense connector:  %s -> projector %s", in.dense, in.projector);
        if (dp.type == MMB_DENSE_STI) printf(", AvgPool1d(%d)", dp.pool ? dp.pool : 8);
        if (dp.tokens) printf(", bilinear to %lld tokens", (long long)dp.tokens);
        printf("\n");
        if (in.n_taps) {
            printf("dense reads:      final hidden_states[%d]", in.taps[0]);
            for (int i = 1; i < in.n_taps; i++)
                if (in.tap_spans[i] > 1) printf("%s mean of [%d..%d]", i > 1 ? "," : ";", in.taps[i],
                                                in.taps[i] + in.tap_spans[i] - 1);
                else printf("%s hidden_states[%d]", i > 1 ? "," : ";", in.taps[i]);
            printf(" (paper layers: final %d", in.taps[0] + 1);
            for (int i = 1; i < in.n_taps; i++)
                if (in.tap_spans[i] > 1) printf(", %d-%d", in.taps[i] + 1, in.taps[i] + in.tap_spans[i]);
                else printf(", %d", in.taps[i] + 1);
            printf(")\n");
        } else
            printf("dense reads:      resolved once the vision tower is known (--vision-tower)\n");
    } else if (in.n_taps) {
        printf("hidden layers:    hidden_states[");
        print_taps(&in);
        printf("]%s, strategy %s\n", in.n_taps > 1 ? " concatenated on channels" : "", in.select_strategy);
    }
    if (in.vision_layers) printf("vision encoder:   %d layers, width %d, image %d, patch %d\n", in.vision_layers,
                                 in.vision_width, in.image_size, in.patch_size);
    else printf("vision encoder:   width %d (tower not in this checkpoint)\n", in.vision_width);
    printf("input width:      %d\n", in.in_width);
    printf("output width:     %d\n", in.out_width);
    printf("parameters:       %lld\n", (long long)in.params);
    if (in.tokens_per_image) {
        printf("tokens per image: %lld\n", (long long)in.tokens_per_image);
        printf("FLOPs per image:  %.3f GFLOP (connector)\n", (double)in.flops_per_image * 1e-9);
    } else
        printf("tokens per image: unknown (image size not in the config)\n");
    const mmb_vit *v = mmb_model_vit(m);
    if (v) {
        mmb_vit_info vi;
        mmb_vit_get_info(v, &vi);
        printf("vision tower:     %s, %lld parameters, %.3f GFLOP per image (all %d blocks)\n", vi.family,
               (long long)vi.params, (double)vi.flops_per_image * 1e-9, vi.layers);
    }
    mmb_model_free(m);
    mmb_ctx_free(ctx);
    return 0;
}

/* Reads hidden_states.{i} from f into feats (converted to f32 copies in *owned). */
static int load_features(mmb_ctx *ctx, const char *path, mmb_st_file *f, mmb_features *ft, float **owned) {
    memset(ft, 0, sizeof *ft);
    for (int i = 0; i < mmb_st_count(f); i++) {
        const mmb_tensor *t = mmb_st_at(f, i);
        char *end;
        if (strncmp(t->name, "hidden_states.", 14) != 0) continue;
        long idx = strtol(t->name + 14, &end, 10);
        if (*end || end == t->name + 14 || idx < 0 || idx > 100000) {
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
    (void)ctx;
    if (!ft->n_taps) {
        fprintf(stderr, "mmbridge: error: %s: no 'hidden_states.{i}' tensors\n", path);
        return 1;
    }
    const char *nh = mmb_st_meta(f, "n_hidden_states");
    if (nh) ft->n_hidden = atoi(nh);
    return 0;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* A mixture-of-experts connector's routing statistics, one line; nothing for other connectors. */
static void print_routing(const mmb_model *m) {
    int64_t counts[256];
    int n = mmb_model_routing_stats(m, counts, 256);
    if (n <= 0) return;
    printf("routing: tokens per expert:");
    for (int e = 0; e < n && e < 256; e++) printf(" %lld", (long long)counts[e]);
    printf("\n");
}

static int cmd_connect(int argc, char **argv) {
    opts o = {0};
    int r = parse(argc, argv, usage_connect, &o);
    if (r) return r == 1 ? 0 : r;
    if (!o.features || !o.output) { fprintf(stderr, "mmbridge: connect needs --features and -o\n%s", usage_connect); return 2; }
    mmb_ctx *ctx = make_ctx(&o);
    if (!ctx) return 1;
    mmb_model *m = NULL;
    mmb_st_file *f = NULL;
    float *owned[MMB_MAX_TAPS] = {0}, *out = NULL;
    mmb_features ft;
    mmb_model_info in;
    r = 1;
    if (mmb_model_open(ctx, o.model, &m) != MMB_OK || mmb_st_open(ctx, o.features, &f) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    if (apply_dense(ctx, &o, m)) goto done;
    mmb_model_get_info(m, &in);
    if (load_features(ctx, o.features, f, &ft, owned)) goto done;
    if (!ft.n_hidden && in.vision_layers) ft.n_hidden = in.vision_layers + 1;
    int64_t t_out = mmb_model_tokens_out(ctx, m, ft.tokens);
    if (t_out < 0) { fail_in(ctx, o.features); goto done; }
    size_t n = (size_t)(ft.batch * t_out * in.out_width);
    out = malloc(n ? n * sizeof(float) : 1);
    if (!out) { fprintf(stderr, "mmbridge: error: out of memory for %zu floats\n", n); goto done; }
    double t0 = now_ms();
    if (mmb_model_connect(ctx, m, &ft, out, n) != MMB_OK) { fail_in(ctx, o.features); goto done; }
    double ms = now_ms() - t0;
    mmb_tensor e = {.name = "embeddings", .dtype = MMB_F32, .ndim = 3,
                    .shape = {ft.batch, t_out, in.out_width}, .data = out};
    if (mmb_st_write(ctx, o.output, &e, 1) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    printf("%s: %s, %lld image(s) x %lld tokens x %d -> embeddings [%lld, %lld, %d] in %.2f ms, %d thread(s) -> %s\n",
           o.model, in.connector, (long long)ft.batch, (long long)ft.tokens, in.in_width, (long long)ft.batch,
           (long long)t_out, in.out_width, ms, mmb_ctx_threads(ctx), o.output);
    print_routing(m);
    r = 0;
done:
    for (int i = 0; i < MMB_MAX_TAPS; i++) free(owned[i]);
    free(out);
    mmb_st_close(f);
    mmb_model_free(m);
    mmb_ctx_free(ctx);
    return r;
}

static const char *usage_encode =
    "usage: mmbridge encode MODEL (IMAGE... | --pixels IN.safetensors | --video FRAMES [--frames 8]\n"
    "                       [--no-pool]) -o OUT.safetensors [--taps 0,8,-2] [--vision-tower DIR]\n"
    "                       [--threads N] [--gemm B] [--dtype f32|bf16|f16|int8]\n"
    "\n"
    "Runs the vision encoder and the connector: pixels -> ViT (CLIP or SigLIP) -> the model's feature\n"
    "selection -> connector, and writes 'embeddings' [n_images, tokens, d_model] f32. Several images\n"
    "make one batch.\n"
    "\n"
    "  MODEL            a LLaVA checkpoint with its vision tower (transformers layout), an original-\n"
    "                   layout LLaVA checkpoint with --vision-tower, or a standalone CLIP/SigLIP vision\n"
    "                   checkpoint (then only hidden states are written, plus 'last_hidden_state')\n"
    "  --pixels F       read preprocessed 'pixel_values' [n, channels, size, size] from F instead of\n"
    "                   decoding images\n"
    "  --taps LIST      also write these hidden_states.{i} (HF indices: 0 = embeddings, i = block i,\n"
    "                   negative from the end; written under their non-negative index)\n"
    "  --vision-tower D the CLIP/SigLIP checkpoint directory of an original-layout LLaVA model\n"
    "  --video FRAMES   a video as image files: a directory (its files in name order, hidden ones\n"
    "                   skipped) or a text file listing one frame path per line (relative to the\n"
    "                   list's directory). --frames N of them are taken, the midpoint of each of N\n"
    "                   equal segments (FreeVA / Dense Connector); each goes through tower and\n"
    "                   connector like an image, then MaxPool1d(2, 2) over each frame's tokens\n"
    "                   (--no-pool keeps them all), frames concatenated in order: 'embeddings'\n"
    "                   [1, frames * tokens / 2, d_model] (8 CLIP-L/336 frames: 2304 tokens)\n"
    "  --dtype D        compute dtype of the linear layers' weights (tower and connector): f32\n"
    "                   (default), bf16, f16 or int8 (per-channel scales); converted at load\n";

/* Opens MODEL as a connector model, or as a standalone vision encoder when it has no connector. */
static int open_encoder(mmb_ctx *ctx, const opts *o, mmb_model **m, mmb_vit **vit_only, const mmb_vit **vit) {
    mmb_status s = mmb_model_open(ctx, o->model, m);
    if (s == MMB_ERR_UNSUPPORTED && strstr(mmb_ctx_error(ctx), "unknown architecture")) {
        char first[1024];
        snprintf(first, sizeof first, "%s", mmb_ctx_error(ctx));
        if (mmb_vit_open(ctx, o->model, vit_only) != MMB_OK) {
            fprintf(stderr, "mmbridge: error: %s\nmmbridge: error: %s\n", first, mmb_ctx_error(ctx));
            return 1;
        }
        *vit = *vit_only;
    } else if (s != MMB_OK)
        return cli_fail(ctx, NULL);
    mmb_model_info mi;
    if (*m && mmb_model_get_info(*m, &mi) == MMB_OK && strcmp(mi.family, "llava") != 0) {
        if (!o->vision_tower && !o->dense_set) return 0;
        fprintf(stderr, "mmbridge: error: %s: a %s model brings its own tower and connector; --vision-tower and "
                "--dense apply to LLaVA models\n", o->model, mi.family);
        return 1;
    }
    if (*m && apply_dense(ctx, o, *m)) return 1;
    if (*m && o->vision_tower) {
        mmb_vit *v = NULL;
        if (mmb_vit_open(ctx, o->vision_tower, &v) != MMB_OK) return cli_fail(ctx, NULL);
        if (mmb_model_attach_vit(ctx, *m, v) != MMB_OK) { mmb_vit_free(v); return cli_fail(ctx, NULL); }
    }
    if (*m) *vit = mmb_model_vit(*m);
    if (!*vit) {
        fprintf(stderr, "mmbridge: error: %s: the checkpoint has no vision tower; pass --vision-tower DIR\n", o->model);
        return 1;
    }
    return 0;
}

/* Reads pixel_values [n, C, H, W] (any float dtype) as f32; `size` > 0 requires H = W = size. */
static float *read_pixels(mmb_ctx *ctx, const char *path, int channels, int size, int64_t *n, int *h, int *w) {
    mmb_st_file *f = NULL;
    if (mmb_st_open(ctx, path, &f) != MMB_OK) { cli_fail(ctx, NULL); return NULL; }
    const mmb_tensor *t = mmb_st_find(f, "pixel_values");
    float *px = NULL;
    if (!t)
        fprintf(stderr, "mmbridge: error: %s: tensor 'pixel_values' is missing\n", path);
    else if (t->ndim != 4 || t->shape[1] != channels || t->shape[0] < 1 || t->shape[2] < 1 || t->shape[3] < 1 ||
             t->shape[2] > (1 << 20) || t->shape[3] > (1 << 20) ||
             (size > 0 && (t->shape[2] != size || t->shape[3] != size)) ||
             (t->dtype != MMB_F32 && t->dtype != MMB_F16 && t->dtype != MMB_BF16)) {
        if (size > 0)
            fprintf(stderr, "mmbridge: error: %s: tensor 'pixel_values': expected [n, %d, %d, %d] F32/F16/BF16\n",
                    path, channels, size, size);
        else
            fprintf(stderr, "mmbridge: error: %s: tensor 'pixel_values': expected [n, %d, height, width] "
                    "F32/F16/BF16\n", path, channels);
    } else if (!(px = malloc(sizeof(float) * (size_t)mmb_tensor_numel(t))))
        fprintf(stderr, "mmbridge: error: out of memory\n");
    else {
        mmb_to_f32(px, t->data, t->dtype, (size_t)mmb_tensor_numel(t));
        *n = t->shape[0];
        *h = (int)t->shape[2];
        *w = (int)t->shape[3];
    }
    mmb_st_close(f);
    return px;
}

/* The image processor for MODEL: its preprocessor_config.json, else the vision tower's; LLaVA's
 * "pad" aspect mode turns on padding to a square. */
static int load_processor(mmb_ctx *ctx, const opts *o, int pad, mmb_preprocess *p) {
    char path[4096];
    snprintf(path, sizeof path, "%s/preprocessor_config.json", o->model);
    const char *dir = access(path, F_OK) == 0 || !o->vision_tower ? o->model : o->vision_tower;
    if (mmb_preprocess_load(ctx, dir, p) != MMB_OK) return cli_fail(ctx, NULL);
    if (pad) p->do_pad = 1;
    return 0;
}

/* Decodes and preprocesses every image into one batch [n, 3, H, W]; `size` > 0 requires H = W = size,
 * otherwise every image must come out at the first one's size, set in *h, *w. */
static float *read_images(mmb_ctx *ctx, const opts *o, const mmb_preprocess *p, int size, int *h, int *w) {
    float *px = NULL;
    size_t per = 0;
    for (int i = 0; i < o->n_images; i++) {
        mmb_image img = {0};
        int ih = 0, iw = 0;
        if (mmb_image_load(ctx, o->images[i], 0, &img) != MMB_OK ||
            mmb_preprocess_output_size(ctx, p, img.height, img.width, &ih, &iw) != MMB_OK) {
            cli_fail(ctx, NULL);
            mmb_image_free(&img);
            free(px);
            return NULL;
        }
        if (!px) {
            *h = size > 0 ? size : ih;
            *w = size > 0 ? size : iw;
            per = (size_t)3 * (size_t)*h * (size_t)*w;
            if (!(px = malloc(per * (size_t)o->n_images * sizeof(float)))) {
                fprintf(stderr, "mmbridge: error: out of memory\n");
                mmb_image_free(&img);
                return NULL;
            }
        }
        if (ih != *h || iw != *w) {
            fprintf(stderr, "mmbridge: error: %s: the image processor makes %dx%d pixels but the %s takes %dx%d\n",
                    o->images[i], iw, ih, size > 0 ? "vision tower" : "batch (the first image's size)", *w, *h);
            mmb_image_free(&img);
            free(px);
            return NULL;
        }
        mmb_status s = mmb_preprocess_run(ctx, p, &img, px + per * (size_t)i, per);
        mmb_image_free(&img);
        if (s != MMB_OK) { cli_fail(ctx, NULL); free(px); return NULL; }
    }
    return px;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void free_list(char **v, int n) {
    for (int i = 0; v && i < n; i++) free(v[i]);
    free(v);
}

/* Appends a copy of dir/name (or name alone when dir is NULL or name is absolute) to *v. */
static int push_path(char ***v, int *n, int *cap, const char *dir, const char *name) {
    if (*n == *cap) {
        char **nv = realloc(*v, sizeof **v * (size_t)(*cap = *cap ? 2 * *cap : 64));
        if (!nv) return 1;
        *v = nv;
    }
    size_t len = strlen(name) + (dir ? strlen(dir) + 2 : 1);
    if (!((*v)[*n] = malloc(len))) return 1;
    if (dir && name[0] != '/') snprintf((*v)[*n], len, "%s/%s", dir, name);
    else snprintf((*v)[*n], len, "%s", name);
    (*n)++;
    return 0;
}

/* The frames of --video: a directory's files in name order (hidden ones skipped), or the paths a list
 * file names one per line (blank lines skipped; relative to the list's directory). Returns a malloc'd
 * array of malloc'd paths and their number in *n, or NULL after printing the error. */
static char **list_frames(const char *path, int *n) {
    char **v = NULL;
    int cap = 0, bad = 0;
    *n = 0;
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "mmbridge: error: %s: %s\n", path, strerror(errno));
        return NULL;
    }
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        if (!d) { fprintf(stderr, "mmbridge: error: %s: %s\n", path, strerror(errno)); return NULL; }
        for (struct dirent *e; !bad && (e = readdir(d));)
            if (e->d_name[0] != '.') bad = push_path(&v, n, &cap, path, e->d_name);
        closedir(d);
        if (!bad && *n) qsort(v, (size_t)*n, sizeof *v, cmp_str);
    } else {
        FILE *f = fopen(path, "r");
        if (!f) { fprintf(stderr, "mmbridge: error: %s: %s\n", path, strerror(errno)); return NULL; }
        char dir[4096], line[4096];
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = 0;
        while (!bad && fgets(line, sizeof line, f)) {
            if (!strchr(line, '\n') && !feof(f)) {
                fprintf(stderr, "mmbridge: error: %s: a line longer than %zu bytes\n", path, sizeof line - 2);
                bad = 2;
                break;
            }
            char *a = line, *z = line + strlen(line);
            while (*a == ' ' || *a == '\t') a++;
            while (z > a && (z[-1] == '\n' || z[-1] == '\r' || z[-1] == ' ' || z[-1] == '\t')) *--z = 0;
            if (*a) bad = push_path(&v, n, &cap, slash ? dir : NULL, a);
        }
        fclose(f);
    }
    if (bad == 1) fprintf(stderr, "mmbridge: error: out of memory\n");
    if (!bad && *n == 0) fprintf(stderr, "mmbridge: error: %s: no frames in it\n", path);
    if (bad || *n == 0) { free_list(v, *n); return NULL; }
    return v;
}

/* --video: the sampled frames become the images to encode. Returns 0, or 1 after printing the error. */
static int pick_frames(mmb_ctx *ctx, opts *o, char ***all, int *n_all) {
    if (!(*all = list_frames(o->video, n_all))) return 1;
    int64_t idx[256];
    int f = o->frames ? o->frames : 8;
    if (mmb_video_sample(ctx, *n_all, f, idx) != MMB_OK) return cli_fail(ctx, NULL);
    for (int i = 0; i < f; i++) o->images[i] = (*all)[idx[i]];
    o->n_images = f;
    printf("video: %s, %d frame(s), taking %d:", o->video, *n_all, f);
    for (int i = 0; i < f; i++) printf(" %lld", (long long)idx[i]);
    printf("\n");
    return 0;
}

/* --video: emb [frames, tokens, d] becomes the one input [1, frames * tokens / 2, d] (in place), or
 * [1, frames * tokens, d] with --no-pool; *t is the token count written. */
static int video_pool(mmb_ctx *ctx, const opts *o, float *emb, int64_t frames, int64_t tokens, int64_t d,
                      int64_t *t) {
    *t = frames * tokens;
    if (o->no_pool) return 0;
    if (mmb_temporal_pool(ctx, emb, frames, tokens, d, emb) != MMB_OK) return cli_fail(ctx, NULL);
    *t = mmb_temporal_pool_tokens(frames, tokens);
    return 0;
}

/* encode for a family's model (BLIP-2, IDEFICS, Qwen2-VL, ...): its processor, then
 * mmb_model_encode on the whole batch. */
static int encode_family(mmb_ctx *ctx, const opts *o, const mmb_model *m, const mmb_model_info *mi) {
    int64_t n = o->n_images;
    int h = 0, w = 0, r = 1;
    float *px = NULL, *emb = NULL;
    if (o->n_taps) {
        fprintf(stderr, "mmbridge: error: --taps: a %s model's hidden states are not exposed\n", mi->family);
        return 2;
    }
    if (o->pixels) px = read_pixels(ctx, o->pixels, 3, 0, &n, &h, &w);
    else {
        mmb_preprocess pp;
        if (!load_processor(ctx, o, 0, &pp)) px = read_images(ctx, o, &pp, 0, &h, &w);
    }
    if (!px) return 1;
    int64_t t = mmb_model_encode_tokens(ctx, m, h, w);
    size_t ne = (size_t)(n * (t > 0 ? t : 0) * mi->out_width);
    double t0 = now_ms();
    if (t < 0 || !(emb = malloc(ne * sizeof(float) + 1)) || mmb_model_encode(ctx, m, px, n, h, w, emb, ne) != MMB_OK) {
        if (t >= 0 && !emb) fprintf(stderr, "mmbridge: error: out of memory\n");
        else cli_fail(ctx, NULL);
        goto done;
    }
    double t1 = now_ms();
    mmb_tensor out = {.name = "embeddings", .dtype = MMB_F32, .ndim = 3, .shape = {n, t, mi->out_width}, .data = emb};
    if (o->video) {
        if (video_pool(ctx, o, emb, n, t, mi->out_width, &out.shape[1])) goto done;
        out.shape[0] = 1;
    }
    if (mmb_st_write(ctx, o->output, &out, 1) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    for (int64_t i = 0; i < n; i++)
        printf("image %lld: %s %dx%d -> %s (%s) -> %lld x %d\n", (long long)i, o->pixels ? o->pixels : o->images[i],
               w, h, mi->family, mi->connector, (long long)t, mi->out_width);
    printf("encoder + connector %.1f ms, %d thread(s) -> %s\n", t1 - t0, mmb_ctx_threads(ctx), o->output);
    r = 0;
done:
    free(px);
    free(emb);
    return r;
}

static int cmd_encode(int argc, char **argv) {
    opts o = {.positional = 1};
    int r = parse(argc, argv, usage_encode, &o);
    if (r) return r == 1 ? 0 : r;
    if (!o.output || (!!o.pixels + !!o.n_images + !!o.video) != 1) {
        fprintf(stderr, "mmbridge: encode needs -o and one of: images, --pixels, --video\n%s", usage_encode);
        return 2;
    }
    if ((o.frames || o.no_pool) && !o.video) {
        fprintf(stderr, "mmbridge: --frames and --no-pool go with --video\n");
        return 2;
    }
    mmb_ctx *ctx = make_ctx(&o);
    if (!ctx) return 1;
    mmb_model *m = NULL;
    mmb_vit *vit_only = NULL;
    const mmb_vit *vit = NULL;
    float *px = NULL, *bufs[MMB_MAX_TAPS + 1] = {0}, *emb = NULL;
    mmb_tensor outs[MMB_MAX_TAPS + 2];
    char names[MMB_MAX_TAPS + 1][32];
    int n_out = 0, n_all = 0;
    char **all_frames = NULL;
    r = 1;
    if (o.video && pick_frames(ctx, &o, &all_frames, &n_all)) goto done;
    if (open_encoder(ctx, &o, &m, &vit_only, &vit)) goto done;
    if (o.video && !m) {
        fprintf(stderr, "mmbridge: error: %s: --video needs a model with a connector\n", o.model);
        goto done;
    }
    mmb_model_info mi = {0};
    if (m) mmb_model_get_info(m, &mi);
    if (m && strcmp(mi.family, "llava") != 0) {
        r = encode_family(ctx, &o, m, &mi);
        goto done;
    }
    mmb_vit_info vi;
    mmb_vit_get_info(vit, &vi);
    int64_t n = o.n_images;
    int ph, pw;
    if (o.pixels) px = read_pixels(ctx, o.pixels, vi.channels, vi.image_size, &n, &ph, &pw);
    else {
        mmb_preprocess pp;
        if (!load_processor(ctx, &o, mi.pad_to_square, &pp)) px = read_images(ctx, &o, &pp, vi.image_size, &ph, &pw);
    }
    if (!px) goto done;
    /* The embeddings (mmb_model_encode: the model's taps, a DCI group's mean summed as the blocks run),
     * then --taps (and last_hidden_state for a vision-only checkpoint) from a second pass of the tower. */
    int64_t t_out = 0;
    double t0 = now_ms();
    if (m) {
        t_out = mmb_model_encode_tokens(ctx, m, vi.image_size, vi.image_size);
        size_t ne = (size_t)(n * (t_out > 0 ? t_out : 0) * mi.out_width);
        if (t_out < 0 || !(emb = malloc(ne * sizeof(float) + 1)) ||
            mmb_model_encode(ctx, m, px, n, vi.image_size, vi.image_size, emb, ne) != MMB_OK) {
            cli_fail(ctx, NULL);
            goto done;
        }
        outs[n_out++] = (mmb_tensor){.name = "embeddings", .dtype = MMB_F32, .ndim = 3,
                                     .shape = {n, t_out, mi.out_width}, .data = emb};
        if (o.video) {
            if (video_pool(ctx, &o, emb, n, t_out, mi.out_width, &outs[0].shape[1])) goto done;
            outs[0].shape[0] = 1;
        }
    }
    double t1 = now_ms();
    int taps[MMB_MAX_TAPS + 1], nt = 0;
    for (int i = 0; i < o.n_taps && nt < MMB_MAX_TAPS; i++) taps[nt++] = o.taps[i];
    if (!m) taps[nt++] = MMB_TAP_LAST;
    size_t per = (size_t)(n * vi.tokens * vi.width);
    for (int i = 0; i < nt; i++)
        if (!(bufs[i] = malloc(per * sizeof(float)))) { fprintf(stderr, "mmbridge: error: out of memory\n"); goto done; }
    if (nt && mmb_vit_forward(ctx, vit, px, n, taps, nt, bufs) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    double t2 = now_ms();
    for (int i = 0; i < nt; i++) {
        int idx = taps[i] == MMB_TAP_LAST ? -1 : taps[i] < 0 ? taps[i] + vi.layers + 1 : taps[i];
        if (idx < 0) snprintf(names[i], sizeof names[i], "last_hidden_state");
        else snprintf(names[i], sizeof names[i], "hidden_states.%d", idx);
        int dup = 0;
        for (int k = 0; k < n_out; k++) dup |= strcmp(outs[k].name, names[i]) == 0;
        if (!dup)
            outs[n_out++] = (mmb_tensor){.name = names[i], .dtype = MMB_F32, .ndim = 3,
                                         .shape = {n, vi.tokens, vi.width}, .data = bufs[i]};
    }
    if (mmb_st_write(ctx, o.output, outs, n_out) != MMB_OK) { cli_fail(ctx, NULL); goto done; }
    for (int64_t i = 0; i < n; i++) {
        const char *src = o.pixels ? o.pixels : o.images[i];
        if (m)
            printf("image %lld: %s %dx%d -> %s %lld tokens x %d -> %s -> %lld x %d\n", (long long)i, src,
                   vi.image_size, vi.image_size, vi.family, (long long)vi.tokens, vi.width, mi.connector,
                   (long long)t_out, mi.out_width);
        else
            printf("image %lld: %s %dx%d -> %s %lld tokens x %d\n", (long long)i, src, vi.image_size,
                   vi.image_size, vi.family, (long long)vi.tokens, vi.width);
    }
    printf("encoder + connector %.1f ms, hidden states %.1f ms, %d thread(s), %d tensor(s) -> %s\n", t1 - t0,
           t2 - t1, mmb_ctx_threads(ctx), n_out, o.output);
    if (m) print_routing(m);
    r = 0;
done:
    free_list(all_frames, n_all);
    for (int i = 0; i <= MMB_MAX_TAPS; i++) free(bufs[i]);
    free(px);
    free(emb);
    mmb_vit_free(vit_only);
    mmb_model_free(m);
    mmb_ctx_free(ctx);
    return r;
}

static const char *usage_demo =
    "usage: mmbridge demo DIR [IMAGE] [--threads N]\n"
    "\n"
    "Writes DIR/llava-demo, a transformers-layout LLaVA checkpoint with RANDOM weights from a fixed\n"
    "seed: a small CLIP vision tower (224x224, patch 14, 256 patches + CLS, 4 blocks of width 512)\n"
    "and LLaVA-1.5-7B's projector (mlp2x_gelu to 4096), plus its preprocessor_config.json; then runs\n"
    "`info` and `encode` on IMAGE (default data/sample.jpg). The numbers mean nothing; the pipeline,\n"
    "the shapes and the speed are real.\n";

enum { DEMO_D = 512, DEMO_I = 2048, DEMO_L = 4, DEMO_P = 14, DEMO_S = 224, DEMO_T = 257, DEMO_OUT = 4096 };

/* Deterministic uniform numbers in [-scale, scale). */
static float *demo_fill(size_t n, float scale, uint64_t *s) {
    float *p = malloc(n * sizeof(float));
    for (size_t i = 0; p && i < n; i++) {
        *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17;
        p[i] = scale * ((float)(*s >> 40) / 8388608.0f - 1.0f);
    }
    return p;
}

/* The demo checkpoint's tensors: name, shape, scale (norm weights are 1 + noise). */
static int demo_write(mmb_ctx *ctx, const char *path) {
    enum { MAXT = 11 + DEMO_L * 16 };
    static char names[MAXT][96];
    mmb_tensor t[MAXT];
    float *bufs[MAXT] = {0};
    int n = 0, r = 0;
    uint64_t seed = 0x6d6d6272696467ull;
    const char *v = "model.vision_tower.";
#define ADD(scale, offset, nd, ...)                                                                   \
    do {                                                                                            \
        t[n] = (mmb_tensor){.name = names[n], .dtype = MMB_F32, .ndim = nd, .shape = {__VA_ARGS__}}; \
        size_t cnt = (size_t)mmb_tensor_numel(&t[n]);                                               \
        bufs[n] = demo_fill(cnt, scale, &seed);                                                     \
        if (!bufs[n]) r = 1;                                                                        \
        for (size_t k = 0; bufs[n] && k < cnt; k++) bufs[n][k] += offset;                           \
        t[n].data = bufs[n];                                                                        \
        n++;                                                                                        \
    } while (0)
    snprintf(names[n], 96, "%sembeddings.class_embedding", v); ADD(0.5f, 0, 1, DEMO_D);
    snprintf(names[n], 96, "%sembeddings.patch_embedding.weight", v); ADD(0.05f, 0, 4, DEMO_D, 3, DEMO_P, DEMO_P);
    snprintf(names[n], 96, "%sembeddings.position_embedding.weight", v); ADD(0.5f, 0, 2, DEMO_T, DEMO_D);
    for (int k = 0; k < 2; k++) {
        snprintf(names[n], 96, "%s%s.weight", v, k ? "post_layernorm" : "pre_layrnorm"); ADD(0.1f, 1, 1, DEMO_D);
        snprintf(names[n], 96, "%s%s.bias", v, k ? "post_layernorm" : "pre_layrnorm"); ADD(0.1f, 0, 1, DEMO_D);
    }
    for (int l = 0; l < DEMO_L; l++) {
        static const char *const lin[6] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.out_proj", "mlp.fc1", "mlp.fc2"};
        for (int k = 0; k < 6; k++) {
            int64_t o = k == 4 ? DEMO_I : DEMO_D, in = k == 5 ? DEMO_I : DEMO_D;
            snprintf(names[n], 96, "%sencoder.layers.%d.%s.weight", v, l, lin[k]); ADD(1.7f / 32, 0, 2, o, in);
            snprintf(names[n], 96, "%sencoder.layers.%d.%s.bias", v, l, lin[k]); ADD(0.02f, 0, 1, o);
        }
        for (int k = 1; k <= 2; k++) {
            snprintf(names[n], 96, "%sencoder.layers.%d.layer_norm%d.weight", v, l, k); ADD(0.1f, 1, 1, DEMO_D);
            snprintf(names[n], 96, "%sencoder.layers.%d.layer_norm%d.bias", v, l, k); ADD(0.1f, 0, 1, DEMO_D);
        }
    }
    snprintf(names[n], 96, "model.multi_modal_projector.linear_1.weight"); ADD(1.7f / 22, 0, 2, DEMO_OUT, DEMO_D);
    snprintf(names[n], 96, "model.multi_modal_projector.linear_1.bias"); ADD(0.02f, 0, 1, DEMO_OUT);
    snprintf(names[n], 96, "model.multi_modal_projector.linear_2.weight"); ADD(1.7f / 64, 0, 2, DEMO_OUT, DEMO_OUT);
    snprintf(names[n], 96, "model.multi_modal_projector.linear_2.bias"); ADD(0.02f, 0, 1, DEMO_OUT);
#undef ADD
    if (r) fprintf(stderr, "mmbridge: error: out of memory\n");
    else if (mmb_st_write(ctx, path, t, n) != MMB_OK) r = cli_fail(ctx, NULL);
    for (int i = 0; i < n; i++) free(bufs[i]);
    return r;
}

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "mmbridge: error: cannot write %s: %s\n", path, strerror(errno));
        if (f) fclose(f);
        return 1;
    }
    return 0;
}

static int cmd_demo(int argc, char **argv) {
    opts o = {.positional = 1};
    int r = parse(argc, argv, usage_demo, &o);
    if (r) return r == 1 ? 0 : r;
    const char *image = o.n_images ? o.images[0] : "data/sample.jpg";
    if (strlen(o.model) > 3000) { fprintf(stderr, "mmbridge: error: DIR is too long\n"); return 2; }
    char model[3100], out[3100], path[3200];
    snprintf(model, sizeof model, "%s/llava-demo", o.model);
    snprintf(out, sizeof out, "%s/embeddings.safetensors", o.model);
    if ((mkdir(o.model, 0755) && errno != EEXIST) || (mkdir(model, 0755) && errno != EEXIST)) {
        fprintf(stderr, "mmbridge: error: cannot create %s: %s\n", model, strerror(errno));
        return 1;
    }
    snprintf(path, sizeof path, "%s/config.json", model);
    if (write_text(path, "{\n  \"architectures\": [\"LlavaForConditionalGeneration\"],\n  \"model_type\": \"llava\",\n"
                         "  \"projector_hidden_act\": \"gelu\",\n  \"vision_feature_layer\": -2,\n"
                         "  \"vision_feature_select_strategy\": \"default\",\n"
                         "  \"vision_config\": {\"model_type\": \"clip_vision_model\", \"hidden_size\": 512,\n"
                         "    \"intermediate_size\": 2048, \"num_hidden_layers\": 4, \"num_attention_heads\": 8,\n"
                         "    \"image_size\": 224, \"patch_size\": 14, \"hidden_act\": \"quick_gelu\"},\n"
                         "  \"text_config\": {\"model_type\": \"llama\", \"hidden_size\": 4096, \"intermediate_size\": 64,\n"
                         "    \"num_hidden_layers\": 1, \"num_attention_heads\": 32, \"vocab_size\": 256}\n}\n"))
        return 1;
    snprintf(path, sizeof path, "%s/preprocessor_config.json", model);
    if (write_text(path, "{\n  \"image_processor_type\": \"CLIPImageProcessor\",\n  \"size\": {\"shortest_edge\": 224},\n"
                         "  \"crop_size\": {\"height\": 224, \"width\": 224}\n}\n"))
        return 1;
    mmb_ctx *ctx = make_ctx(&o);
    if (!ctx) return 1;
    snprintf(path, sizeof path, "%s/model.safetensors", model);
    r = demo_write(ctx, path);
    mmb_ctx_free(ctx);
    if (r) return r;
    printf("wrote %s (random weights)\n\n$ mmbridge info %s\n", model, model);
    fflush(stdout);
    char threads[16];
    snprintf(threads, sizeof threads, "%d", o.threads);
    char *info_argv[] = {model, "--threads", threads};
    if ((r = cmd_info(o.threads > 0 ? 3 : 1, info_argv))) return r;
    printf("\n$ mmbridge encode %s %s -o %s\n", model, image, out);
    fflush(stdout);
    char *enc_argv[] = {model, (char *)image, "-o", out, "--threads", threads};
    if ((r = cmd_encode(o.threads > 0 ? 6 : 4, enc_argv))) return r;
    ctx = make_ctx(&o);
    mmb_st_file *f = NULL;
    if (!ctx || mmb_st_open(ctx, out, &f) != MMB_OK) { r = cli_fail(ctx, NULL); mmb_ctx_free(ctx); return r; }
    const mmb_tensor *e = mmb_st_find(f, "embeddings");
    const float *x = e->data;
    double sum = 0, sq = 0;
    int64_t cnt = mmb_tensor_numel(e);
    for (int64_t i = 0; i < cnt; i++) { sum += x[i]; sq += (double)x[i] * x[i]; }
    printf("\nembeddings [%lld, %lld, %lld]: token 0 starts %.4f %.4f %.4f %.4f; mean %.4f, rms %.4f\n",
           (long long)e->shape[0], (long long)e->shape[1], (long long)e->shape[2], x[0], x[1], x[2], x[3],
           sum / (double)cnt, sqrt(sq / (double)cnt));
    mmb_st_close(f);
    mmb_ctx_free(ctx);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) { fputs(usage_main, stderr); return 2; }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--version") == 0) { printf("mmbridge %s\n", mmb_version()); return 0; }
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) { fputs(usage_main, stdout); return 0; }
    if (strcmp(cmd, "info") == 0) return cmd_info(argc - 2, argv + 2);
    if (strcmp(cmd, "connect") == 0) return cmd_connect(argc - 2, argv + 2);
    if (strcmp(cmd, "demo") == 0) return cmd_demo(argc - 2, argv + 2);
    if (strcmp(cmd, "encode") == 0) return cmd_encode(argc - 2, argv + 2);
    if (strcmp(cmd, "generate") == 0) return cli_generate(argc - 2, argv + 2);
    if (strcmp(cmd, "compare") == 0) return cli_compare(argc - 2, argv + 2);
    if (strcmp(cmd, "tokenize") == 0) return cli_tokenize(argc - 2, argv + 2);
    fprintf(stderr, "mmbridge: unknown command '%s'\n%s", cmd, usage_main);
    return 2;
}
