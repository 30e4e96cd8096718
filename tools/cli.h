/* The CLI's shared declarations: the option parser (tools/opts.c), the helpers two or more commands
 * share (tools/common.c) and the commands (tools/cmd_*.c), which tools/main.c lists in one table. */
#ifndef MMB_CLI_H
#define MMB_CLI_H

#include "mmbridge.h"

#include <stdint.h>
#include <stdio.h>

/* ---- the option parser (tools/opts.c) ------------------------------------------------------- */

typedef enum cli_opt_type {
    CLI_FLAG,    /* no value: *(int *)dst = 1 */
    CLI_STR,     /* *(const char **)dst = the value */
    CLI_STRS,    /* repeatable: the values appended to (const char **)dst, their number in *count, at most max */
    CLI_INT,     /* a whole number in [lo, hi]: *(int64_t *)dst */
    CLI_NUM,     /* a number in [lo, hi]: *(double *)dst */
    CLI_CHOICE,  /* one of choices ("auto|own|..."): its index in *(int *)dst */
    CLI_CUSTOM   /* fn(name, value, dst) parses; it prints its own message and returns 2 on a bad value */
} cli_opt_type;

typedef struct cli_opt {
    const char *name;    /* "--threads", "-o" */
    const char *meta;    /* the value's name in the help ("N"); NULL for a flag */
    cli_opt_type type;
    void *dst;
    const char *help;    /* one line (more lines with \n); the range or the choices are appended */
    double lo, hi;       /* CLI_INT, CLI_NUM */
    const char *choices; /* CLI_CHOICE */
    int *count, max;     /* CLI_STRS */
    int (*fn)(const char *name, const char *value, void *dst);
} cli_opt;

/* A command's command line: positionals named `args` in the usage line, then the options. */
typedef struct cli_spec {
    const char *cmd;       /* "encode" */
    const char *args;      /* the usage line after the command, e.g. "MODEL INPUT... -o OUT" */
    const char *about;     /* what the command does, paragraphs ending in \n */
    const cli_opt *opts;
    int n_opts;
    const char **pos;      /* receives the positionals, in order */
    int min_pos, max_pos;
    int *n_pos;            /* NULL when max_pos is 1 */
} cli_spec;

#define CLI_N(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* Parses argv[0, argc) (the words after the command). Returns 0; 1 after printing the help for
 * --help / -h (exit 0); 2 after printing what is wrong (exit 2): an unknown option (with the nearest
 * one when it is close), a missing or bad value, too few or too many positionals. */
int cli_parse(const cli_spec *s, int argc, char **argv);

/* Prints the command's help, generated from its table. */
void cli_help(const cli_spec *s, FILE *f);

/* Levenshtein distance of a and b; and the candidate nearest to `word`, or NULL when none is close
 * enough to be a typo (distance at most a third of the word's length, at least 1, at most 3). */
int cli_distance(const char *a, const char *b);
const char *cli_nearest(const char *word, const char *const *cands, int n);

/* "1,-2,3" -> a malloc'd array of *n integers in [lo, hi]; NULL after printing what is wrong (opt names
 * the option). */
int64_t *cli_int_list(const char *opt, const char *v, int64_t lo, int64_t hi, int64_t *n);

/* ---- options several commands take ------------------------------------------------------------ */

typedef struct cli_ctx_opts {
    int64_t threads;   /* 0: online CPUs */
    int gemm;          /* mmb_gemm_backend */
    int dtype;         /* index into cli_dtypes */
} cli_ctx_opts;

#define CLI_OPT_THREADS(p)                                                                                      \
    {.name = "--threads", .meta = "N", .type = CLI_INT, .dst = (p), .lo = 1, .hi = 1024,                         \
     .help = "worker threads (default: the online CPUs)"}
#define CLI_OPTS_CTX(c)                                                                                         \
    CLI_OPT_THREADS(&(c)->threads),                                                                             \
    {.name = "--gemm", .meta = "B", .type = CLI_CHOICE, .dst = &(c)->gemm, .choices = "auto|naive|own|openblas",  \
     .help = "GEMM backend (auto: the measured fastest)"},                                                      \
    {.name = "--dtype", .meta = "D", .type = CLI_CHOICE, .dst = &(c)->dtype, .choices = "f32|bf16|f16|int8",      \
     .help = "compute dtype of the linear layers' weights, converted once at load\n"                           \
             "(int8: per-channel scales); activations stay f32"}

/* The Dense Connector options, into an mmb_dense_params (type NONE keeps the checkpoint's own). */
int cli_dense_opt(const char *name, const char *value, void *dense);
#define CLI_DENSE_OPT(nm, mt, p, hl)                                                                            \
    {.name = (nm), .meta = (mt), .type = CLI_CUSTOM, .dst = (p), .fn = cli_dense_opt, .help = (hl)}
#define CLI_OPTS_DENSE(p)                                                                                       \
    CLI_DENSE_OPT("--dense", "V", p, "put a Dense Connector (sti, sci or dci) in front of the projector of any\n" \
                  "LLaVA checkpoint; its input width must be the vision width (sti) or 3x it"),                  \
    CLI_DENSE_OPT("--dense-layers", "L", p, "sti/sci: paper layer numbers, the last being the final feature,\n"  \
                  "e.g. 8,16,24 (the default) or 8,16,20,24; paper layer l is hidden_states[l-1]"),              \
    CLI_DENSE_OPT("--dense-groups", "G", p, "dci: paper layer ranges averaged, e.g. 1-12,13-24 (the default for\n" \
                  "CLIP-L); the final feature stays the model's select layer"),                                  \
    CLI_DENSE_OPT("--dense-pool", "K", p, "sti: AvgPool1d kernel and stride over the tokens (default 8)"),       \
    CLI_DENSE_OPT("--tokens", "N", p, "efficient DC (sci/dci): bilinear-resize the projected token grid to N\n"  \
                  "tokens, a square (144: 24x24 -> 12x12)")


/* ---- shared helpers (tools/common.c) ---------------------------------------------------------- */

/* Prints ctx's last error (or `what` without a context) and returns 1, the CLI's failure exit. */
int cli_fail(mmb_ctx *ctx, const char *what);

/* A context with the options' threads, backend and dtype; NULL after printing why. */
mmb_ctx *cli_ctx(const cli_ctx_opts *o);

double cli_now(void);                  /* seconds, monotonic */

/* Writes `text` to path as mmb_file_write does (through symlinks, mode kept, non-regular paths refused,
 * fsynced, atomic); returns 0 or 1 after printing why. */
int cli_write_text(const char *path, const char *text);

/* Expands `in` into *out, a malloc'd array of malloc'd paths, *n of them: a directory becomes its
 * files in name order (hidden ones skipped), a list file (a .txt or .lst file; any file with
 * any_file_is_list) the paths it names one per line (relative to the list's directory, blank lines
 * skipped), any other path stays as it is. Returns 0, or 1 after printing why (a missing path, an
 * empty directory or list). */
int cli_expand_inputs(const char *const *in, int n_in, int any_file_is_list, char ***out, int *n);
void cli_free_list(char **v, int n);

/* Opens `dir` the one way every command does, through the library's family table (mmb_mllm_open): the
 * Dense Connector options over the checkpoint's own (dense may be NULL), the vision tower of an
 * original-layout LLaVA (vision_tower may be NULL), the LLM and tokenizer unless vision_only, a PEFT
 * adapter directory on the LLM (adapter may be NULL). Returns 0, or 1 after printing the library's message
 * (an unsupported architecture: the families it reads). */
int cli_open(mmb_ctx *ctx, const char *dir, const char *vision_tower, const mmb_dense_params *dense, int vision_only,
             const char *adapter, mmb_mllm **out);

/* A mixture-of-experts connector's routing statistics, one line; nothing for other models. */
void cli_print_routing(const mmb_model *m);

/* An encode: what `encode` parses, and what `demo` fills in. */
typedef struct cli_enc {
    const char *model, *output, *pixels, *video, *tower;
    const char *const *inputs;  /* image files, directories, list files */
    int n_inputs, no_pool;
    int vq, latents;            /* --vq: the VQ tokenizer's codes (fusion D) instead of embeddings; --latents too */
    int64_t frames, batch;      /* --video's frames (0: 8); images per forward pass */
    int taps[MMB_MAX_TAPS], n_taps;
    cli_ctx_opts co;
    mmb_dense_params dense;
    /* --manifest: sharded extraction into the directory -o names (tools/cmd_extract.c) */
    const char *manifest, *shard, *pool;
    int64_t shard_size, shard_k, shard_n;  /* --shard K/N (0/1 when not given) */
    int resume, skip_bad, format, mpi;     /* format: 0 safetensors, 1 clip-retrieval */
    int no_partial;                        /* --no-partial: no per-batch pieces (resume redoes a shard) */
} cli_enc;

/* encode --manifest (tools/cmd_extract.c): the manifest's inputs in shards of e->shard_size, each shard written
 * atomically with its sidecar, --resume, --skip-bad, --shard K/N, --mpi's work queue; index.json at the end.
 * Returns the exit status. */
int cli_extract_run(mmb_ctx *ctx, const cli_enc *e);

/* Runs it, printing a line per batch and per image. Returns the exit status: 0, 1 or 2 (printed). */
int cli_encode_run(mmb_ctx *ctx, const cli_enc *e);
/* encode --vq (tools/cmd_vq.c): the model's VQ tokenizer on images (its processor) or --pixels: 'codes' [n, gh, gw]
 * I32 (and 'latents' [n, embed_dim, gh, gw] F32 with --latents). Returns the exit status. */
int cli_vq_encode(mmb_ctx *ctx, const cli_enc *e);
/* Reads tensor 'pixel_values' [n, channels, H, W] (F32/F16/BF16; size > 0: H = W = size) of path into *px
 * (malloc'd). Returns 0, or 1 after printing the error. */
int cli_read_pixels(mmb_ctx *ctx, const char *path, int channels, int size, float **px, int64_t *n, int *h, int *w);

/* Prints what `info` prints about `dir`. Returns the exit status: 0 or 1 (printed). */
int cli_info_run(mmb_ctx *ctx, const char *dir, const char *tower, const mmb_dense_params *dense, int dtype,
                 const char *adapter);

/* A generation: what `generate` parses, and what `demo` fills in. */
#define CLI_MAX_IMAGES 64
#define CLI_MAX_STOPS 8
typedef struct cli_gen {
    const char *model, *tower, *adapter, *prompt, *ids, *embeds, *logits;
    const char *image_out, *image_ids; /* image generation (fusion D): the PNG, the codes' safetensors */
    const char *negative, *grid;       /* Emu3: the negative prompt; the code grid "HxW" */
    double guidance;
    const char *images[CLI_MAX_IMAGES];
    const char *stops[CLI_MAX_STOPS];
    int n_images, n_stops, raw, ignore_eos, print_ids;
    int64_t n_new, n_batch;
    mmb_sampler smp;
    cli_ctx_opts co;
} cli_gen;

/* Runs it through mmb_mllm_generate: the generated text (or ids) streamed to stdout, the stop reason
 * (context full, Ctrl-C) and the timings to stderr. Returns the exit status: 0, 1 (printed), 2 (a bad
 * --ids list) or 130 (Ctrl-C). */
int cli_generate_run(mmb_ctx *ctx, const cli_gen *g);

/* ---- the commands (tools/cmd_*.c) ------------------------------------------------------------ */

int cmd_info(int argc, char **argv);
int cmd_connect(int argc, char **argv);
int cmd_encode(int argc, char **argv);
int cmd_compare(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_demo(int argc, char **argv);
int cmd_decode_vq(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_attention(int argc, char **argv);

#endif
