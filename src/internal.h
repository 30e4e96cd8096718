/* Internal interfaces shared by the library's files. Nothing here is public API. */
#ifndef MMB_INTERNAL_H
#define MMB_INTERNAL_H

#include "mmbridge.h"

#include <stdarg.h>
#include <stdbool.h>

/* Hot elementwise loops are compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load
 * time by the dynamic linker (GCC function multi-versioning); a plain function elsewhere. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MMB_SIMD_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define MMB_SIMD_CLONES
#endif

/* ---- base/status.c: error messages --------------------------------------------------------- */

#define MMB_ERRMSG_LEN 1024

/* Formats a message into ctx (if not NULL) and returns s, so callers can `return mmb__err(...)`. */
mmb_status mmb__err(mmb_ctx *ctx, mmb_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- base/arena.c: bump allocator ---------------------------------------------------------- */

/* One malloc'd block carved into 64-byte aligned pieces; reset frees them all at once. */
typedef struct mmb_arena {
    unsigned char *base;
    size_t cap, used;
} mmb_arena;

/* Grows the arena to at least `bytes` of capacity (discarding contents). Returns MMB_OK or
 * MMB_ERR_NOMEM. */
mmb_status mmb__arena_reserve(mmb_ctx *ctx, mmb_arena *a, size_t bytes);
/* Returns a 64-byte aligned piece of `bytes`, or NULL when the reservation is exceeded. */
void *mmb__arena_alloc(mmb_arena *a, size_t bytes);
void mmb__arena_reset(mmb_arena *a);
void mmb__arena_free(mmb_arena *a);
/* Bytes arena_alloc would consume for a piece of `bytes` (for sizing a reservation). */
size_t mmb__arena_piece(size_t bytes);
/* Page-backed memory for large load-time transients (freed with the same size): unlike a heap
 * block, its pages leave RSS when freed. NULL when out of memory. */
void *mmb__pages_alloc(size_t bytes);
void mmb__pages_free(void *p, size_t bytes);

/* ---- base/pool.c: thread pool -------------------------------------------------------------- */

typedef struct mmb_pool mmb_pool;

/* Called once per thread by mmb__pool_run: tid in [0, nth). */
typedef void (*mmb_pool_fn)(void *arg, int tid, int nth);

/* Starts n-1 workers (the caller is thread 0). Returns MMB_OK or MMB_ERR_NOMEM. */
mmb_status mmb__pool_new(int n, mmb_pool **out);
void mmb__pool_free(mmb_pool *p);
int mmb__pool_size(const mmb_pool *p);
/* Runs fn(arg, tid, nth) on every thread of the pool, the caller included, and returns when all
 * are done. Not reentrant: fn must not call mmb__pool_run. */
void mmb__pool_run(mmb_pool *p, mmb_pool_fn fn, void *arg);
/* Thread tid's scratch of at least `bytes` (64-byte aligned), kept by the pool from run to run and
 * grown when asked for more (the contents are then lost); NULL if it cannot be allocated. Only
 * thread tid of a run may use it, and only one kernel at a time. */
void *mmb__pool_scratch(mmb_pool *p, int tid, size_t bytes);
/* Splits [0, n) into nth near-equal contiguous ranges; sets [*lo, *hi) for tid. */
void mmb__split(int64_t n, int tid, int nth, int64_t *lo, int64_t *hi);

/* ---- the context ---------------------------------------------------------------------------- */

struct mmb_ctx {
    mmb_pool *pool;
    mmb_gemm_backend gemm;   /* resolved: never MMB_GEMM_AUTO */
    mmb_dtype weight_dtype;  /* linear layers' compute dtype: MMB_F32, MMB_BF16, MMB_F16 or MMB_I8 */
    mmb_arena arena;         /* activations of the current forward pass */
    mmb_arena feats;         /* the tower's hidden states while the connector reads them (mmb_model_encode
                                and the families' encode), kept from call to call like the arena */
    char err[MMB_ERRMSG_LEN];
};

/* ---- tensor/kernels.c: elementwise and norm kernels (each with a _ref oracle) -------------- */

typedef enum mmb_act {
    MMB_ACT_NONE = 0,
    MMB_ACT_GELU,       /* exact: 0.5 x (1 + erf(x / sqrt 2)) */
    MMB_ACT_GELU_TANH,  /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
    MMB_ACT_QUICK_GELU, /* x sigmoid(1.702 x) */
    MMB_ACT_SILU,       /* x sigmoid(x) */
    MMB_ACT_RELU        /* max(x, 0) */
} mmb_act;

/* Parses an HF ACT2FN name ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "quick_gelu",
 * "silu", "swish", "relu"). Returns false for anything else. */
bool mmb__act_parse(const char *name, mmb_act *out);
const char *mmb__act_name(mmb_act a);

/* x (n) -> x (n): act applied in place. */
void mmb__act_forward(float *x, int64_t n, mmb_act a);
void mmb__act_forward_ref(float *x, int64_t n, mmb_act a);

/* x (M, C) -> out (M, C): (x - mean) / sqrt(var + eps) * w + b; w, b (C) (b may be NULL). */
void mmb__layernorm_forward(float *out, const float *x, const float *w, const float *b,
                            int64_t M, int64_t C, float eps);
void mmb__layernorm_forward_ref(float *out, const float *x, const float *w, const float *b,
                                int64_t M, int64_t C, float eps);

/* out (n), a (n), b (n) -> out = a + b (out may alias a or b). */
void mmb__add_forward(float *out, const float *a, const float *b, int64_t n);
void mmb__add_forward_ref(float *out, const float *a, const float *b, int64_t n);

/* Threaded wrappers: the same kernels split over rows by the context's pool. */
void mmb__act_forward_mt(mmb_ctx *ctx, float *x, int64_t n, mmb_act a);
void mmb__layernorm_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w,
                               const float *b, int64_t M, int64_t C, float eps);
void mmb__add_forward_mt(mmb_ctx *ctx, float *out, const float *a, const float *b, int64_t n);

/* ---- tensor/gemm.c: linear layers ----------------------------------------------------------- */

/* A linear layer y = x W^T + b, as torch.nn.Linear stores it. */
typedef struct mmb_linear {
    int64_t n_out, n_in;
    const float *w;          /* (n_out, n_in), f32: mapped in place or owned_w; NULL once packed
                                (the own backend reads only `packed`; the mapped pages are released) */
    const float *bias;       /* (n_out) or NULL */
    float *owned_w, *owned_b;/* set when converted from f16/bf16 at load */
    float *packed;           /* the own kernel's packed copy of w, or NULL */
    mmb_gemm_backend backend;
    /* Reduced-precision weights: packed holds elements of wdt (the context's weight_dtype), and
     * for MMB_I8 `scales` the per-output scales; the other backends compute with w rounded to wdt. */
    mmb_dtype wdt;
    float *scales;
} mmb_linear;

/* Binds a linear layer to tensor `w` [n_out, n_in] and optional `b` [n_out] (any float dtype;
 * converted once to f32 if not f32) and pre-packs it for ctx's backend. Returns MMB_OK or
 * MMB_ERR_NOMEM. Shapes are the caller's to check. The weights are computed at ctx->weight_dtype
 * (MMB_ERR_UNSUPPORTED, naming the tensor, for a weight beyond f16's range at MMB_F16). */
mmb_status mmb__linear_init(mmb_ctx *ctx, mmb_linear *l, const mmb_tensor *w, const mmb_tensor *b);
void mmb__linear_free(mmb_linear *l);
/* x (M, n_in) -> y (M, n_out): y = x W^T + b, threaded over ctx's pool. */
void mmb__linear_forward(mmb_ctx *ctx, float *y, const float *x, int64_t M, const mmb_linear *l);
/* The same followed by y = act(y); our kernel applies it to each block of y while in cache. */
void mmb__linear_forward_act(mmb_ctx *ctx, float *y, const float *x, int64_t M, const mmb_linear *l, mmb_act act);

/* The oracle: C (M, N) = A (M, K) W^T + bias; W (N, K), bias (N) or NULL. Single-threaded. */
void mmb__gemm_ref(float *C, const float *A, const float *W, const float *bias,
                   int64_t M, int64_t N, int64_t K);

/* ---- tensor/gemm_own.c: mmbridge's packed kernel --------------------------------------------- */

/* Returns the instruction set the own kernel will use: 2 AVX-512F, 1 AVX2+FMA+F16C, 0 none. */
int mmb__gemm_own_isa(void);
/* Forces min(isa, what the CPU has) for later calls (tests cover every path); isa < 0 restores
 * the automatic choice. */
void mmb__gemm_own_force_isa(int isa);
/* Tests: 1 packs A into micro-panels, 0 reads it in place, -1 restores the rule (gemm_own.c's header).
 * Either gives bit-identical results. */
void mmb__gemm_own_force_pack_a(int mode);
/* Floats needed to hold W (N, K) packed. */
size_t mmb__gemm_own_packed_size(int64_t N, int64_t K);
/* W (N, K) row-major -> dst, the own kernel's panel layout. */
void mmb__gemm_own_pack(float *dst, const float *W, int64_t N, int64_t K);
/* A (M, K), packed W (N, K), bias (N) or NULL -> C (M, N) = A W^T + bias, split over the pool. */
void mmb__gemm_own(mmb_pool *pool, float *C, const float *A, const float *packed,
                   const float *bias, int64_t M, int64_t N, int64_t K);
/* The same, then C = act(C), applied block by block as each is finished. */
void mmb__gemm_own_act(mmb_pool *pool, float *C, const float *A, const float *packed, const float *bias,
                       int64_t M, int64_t N, int64_t K, mmb_act act);
/* Reduced-precision weights (docs/decisions.md "Reduced-precision weights"): the same packed
 * layout with elements of dt = MMB_F32, MMB_BF16, MMB_F16 or MMB_I8 (int8: symmetric, one scale
 * absmax/127 per output row of W, in `scales`, mmb__gemm_own_scales_size(N) floats). The kernels
 * widen the weights to f32 as they load them; A, C, bias and the arithmetic stay f32. */
bool mmb__gemm_own_dtype_ok(mmb_dtype dt);
size_t mmb__gemm_own_packed_bytes(int64_t N, int64_t K, mmb_dtype dt);
int64_t mmb__gemm_own_scales_size(int64_t N);
void mmb__gemm_own_pack_dt(void *dst, float *scales, const float *W, int64_t N, int64_t K, mmb_dtype dt);
/* C (M, N) = act(A (M, K) W^T + bias) with W packed by mmb__gemm_own_pack_dt as dt. */
void mmb__gemm_own_dt(mmb_pool *pool, float *C, const float *A, const void *packed, const float *scales,
                      mmb_dtype dt, const float *bias, int64_t M, int64_t N, int64_t K, mmb_act act);
/* dst (N, K) = W rounded to dt and back to f32 (int8: q * scale), the values the kernels compute
 * with: the reference for tests and the weights of the other backends at that dtype. */
void mmb__gemm_own_dequant(float *dst, const float *W, int64_t N, int64_t K, mmb_dtype dt);

/* The micro-kernel on its own, for other blocked kernels (attention, the decoder's weight products).
 * MR = mmb__gemm_own_mr(isa) rows per A micro-panel (isa as mmb__gemm_own_isa returns it: 14 AVX-512,
 * 6 AVX2, 4 scalar); panels are 32 columns wide. For i < mr <= MR, j < nc <= 32:
 *   c[i * ldc + j] = (load ? c[i * ldc + j] : 0) + sum_{k < kc} a[k * MR + i] * b[k * 32 + j] + bias[j]
 * (bias NULL: none); b must be 64-byte aligned; rows i >= mr of a are not read. */
int mmb__gemm_own_mr(int isa);
void mmb__gemm_own_tile(int isa, int mr, int64_t kc, const float *a, const float *b, float *c, int64_t ldc,
                        int nc, int load, const float *bias);

/* ---- tensor/half.c ---------------------------------------------------------------------------- */
float mmb__f16_to_f32(uint16_t h);
float mmb__bf16_to_f32(uint16_t h);
uint16_t mmb__f32_to_f16(float f);
uint16_t mmb__f32_to_bf16(float f);
/* Parses a safetensors dtype name; false for unknown names. */
bool mmb__dtype_parse(const char *name, mmb_dtype *out);
/* True for F32, F16, BF16: the dtypes the library computes with. */
bool mmb__dtype_is_float(mmb_dtype t);

/* ---- overflow-checked sizes ------------------------------------------------------------------ */
static inline bool mmb__mul_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline bool mmb__add_ok(uint64_t a, uint64_t b, uint64_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

/* ---- io/safetensors.c ------------------------------------------------------------------------ */
const char *mmb__st_path(const mmb_st_file *f);
/* Drops the resident pages wholly inside [p, p + n) when that range lies in an open file's mapping
 * (no-op for any other memory): for weights read once at load (packed or converted), so RSS holds
 * them once. The data stays readable: a later read faults the pages in again from the file. */
void mmb__release_mapped(const void *p, size_t n);

/* ---- io/checkpoint.c: a checkpoint directory ------------------------------------------------- */

typedef struct cJSON cJSON;

/* config.json parsed, plus every safetensors file of the directory (one, several, or the shards
 * that model.safetensors.index.json names). */
typedef struct mmb_synth mmb_synth;

typedef struct mmb_ckpt {
    char *dir;
    cJSON *config;
    int n_files;
    mmb_st_file **files;
    mmb_synth *synth;        /* a synthetic checkpoint (mmb__ckpt_synth): no files; every bound tensor is
                                made on request with random values, and mmb__ckpt_find finds nothing */
} mmb_ckpt;

/* Opens dir/config.json and the directory's safetensors. Returns MMB_OK, MMB_ERR_IO, MMB_ERR_FORMAT
 * (malformed JSON, index naming a missing shard, a tensor in two files) or MMB_ERR_MISSING. */
mmb_status mmb__ckpt_open(mmb_ctx *ctx, const char *dir, mmb_ckpt *out);
void mmb__ckpt_close(mmb_ckpt *c);
/* A synthetic checkpoint named `name` with config `config` (taken over): mmb__ckpt_bind returns
 * f32 tensors of the requested shape, uniform in [-scale, scale] from a fixed seed, kept until
 * mmb__ckpt_close. For measuring a connector's costs at any size without weights on disk. */
mmb_status mmb__ckpt_synth(mmb_ctx *ctx, const char *name, cJSON *config, float scale, mmb_ckpt *out);
/* Returns the tensor called name in any file, and its file in *file (may be NULL), or NULL. */
const mmb_tensor *mmb__ckpt_find(const mmb_ckpt *c, const char *name, const mmb_st_file **file);

/* Binds a float tensor for computing: present, F32/F16/BF16, and of exactly the given shape
 * (ndim dims from shape[]). Errors name the checkpoint file and the tensor. */
mmb_status mmb__ckpt_bind(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int ndim,
                          const int64_t *shape, const mmb_tensor **out);

/* Binds {prefix}{name}.weight [n_out, n_in] and, if bias, {prefix}{name}.bias [n_out] as a linear layer
 * (converted and packed as mmb__linear_init does); errors name the file and the tensor. */
mmb_status mmb__ckpt_linear(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                            int64_t n_in, bool bias, mmb_linear *l);
/* As mmb__ckpt_linear for a 1x1 Conv2d: weight [n_out, n_in, 1, 1]. */
mmb_status mmb__ckpt_conv1x1(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                             int64_t n_in, bool bias, mmb_linear *l);
/* A norm's {prefix}{name}.weight and .bias, (n) each, as f32 copies in *w, *b (the caller frees them). */
mmb_status mmb__ckpt_norm(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n, float **w,
                          float **b);
/* n linear layers {prefix}{names[i]}.weight [n_out, n_in] and .bias [n_out] stacked into one
 * (n * n_out, n_in) layer, so projections that read the same input run as one GEMM (q | k | v).
 * The stacked f32 copies go to *w and *b (set even on failure; the caller frees them after l); *w is
 * NULL on success when l no longer reads it (packed or converted), so the weights are held once. */
mmb_status mmb__ckpt_linear_fused(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *const *names,
                                  int n, int64_t n_out, int64_t n_in, mmb_linear *l, float **w, float **b);

/* Binds a 1-D float tensor of n elements and returns an f32 copy in *out (the caller frees it). */
mmb_status mmb__ckpt_vec(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int64_t n, float **out);


/* Config access. `path` is dotted ("vision_config.hidden_size"). The getters return false when the
 * key is absent (or null); a present key of the wrong type is an MMB_ERR_FORMAT through *s. */
bool mmb__cfg_int(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, int64_t *out, mmb_status *s);
bool mmb__cfg_num(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, double *out, mmb_status *s);
bool mmb__cfg_str(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, const char **out, mmb_status *s);
bool mmb__cfg_bool(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, bool *out, mmb_status *s);
/* An int or a list of ints (vision_feature_layer); at most `cap` values. */
bool mmb__cfg_ints(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, int *out, int cap, int *n, mmb_status *s);

/* ---- lm/tokenizer.c, lm/chat.c (tokenizer and chat templates) --------------------------------- */

/* Reads and parses the JSON object in `path` (io/checkpoint.c). Returns MMB_OK and sets *out (the
 * caller cJSON_Deletes it), MMB_ERR_IO when it cannot be read, MMB_ERR_FORMAT for malformed JSON or
 * a top level that is not an object; messages name the path. */
mmb_status mmb__json_read(mmb_ctx *ctx, const char *path, cJSON **out);
/* The tokenizer's chat template (chat_template.jinja, chat_template.json or tokenizer_config.json's
 * chat_template) or NULL, and the path it came from (for messages). */
const char *mmb__tokenizer_chat_template(const mmb_tokenizer *t, const char **source);
/* The content of the special token `name` ("bos_token", "eos_token", "unk_token", "pad_token") as
 * tokenizer_config.json (or special_tokens_map.json) names it, or NULL. */
const char *mmb__tokenizer_special(const mmb_tokenizer *t, const char *name);

/* ---- connectors/registry.c: the connector vtable ---------------------------------------------- */

/* What the model tells a connector to build. */
typedef struct mmb_conn_cfg {
    const char *type;      /* the checkpoint's own name: "linear", "mlp2x_gelu", "llava", ... */
    const char *prefix;    /* weight-name prefix, e.g. "model.mm_projector." */
    int64_t in_width;      /* channels in (vision width x taps) */
    int64_t out_width;     /* d_model */
    mmb_act act;           /* for connectors whose activation is configurable */
    bool bias;             /* for connectors whose bias is optional */
    float eps;             /* norm eps, for connectors with a norm */
    const char *proj_type; /* dense_*: the projector the Dense Connector feeds */
    int select_layer;      /* dense_*: the model's select layer, the default final feature */
    mmb_dense_params dense;/* dense_*: layers, groups, pool, tokens */
} mmb_conn_cfg;

typedef struct mmb_connector_ops {
    const char *name;                                /* registry name (a pattern for mlpNx_gelu) */
    bool (*accepts)(const char *type);               /* does this connector build `type`? */
    mmb_status (*load)(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, void **state);
    int64_t (*out_tokens)(const void *state, int64_t tokens_in);
    int64_t (*out_width)(const void *state);
    void (*cost)(const void *state, int64_t tokens_in, int64_t *params, int64_t *flops);
    /* Floats of scratch forward needs for `rows` input rows (taken from ctx's arena). */
    size_t (*scratch)(const void *state, int64_t rows);
    /* x (batch, tokens, in_width) -> out (batch, out_tokens, out_width) */
    mmb_status (*forward)(mmb_ctx *ctx, const void *state, float *out, const float *x, int64_t batch,
                          int64_t tokens);
    void (*free)(void *state);
    /* Optional; NULL for connectors that read the model's taps concatenated on channels. The hidden
     * states this one reads from an encoder of n_hidden hidden states (0 = unknown) with or without a
     * leading CLS token: taps[i] non-negative, spans[i] >= 1 (a mean over that many, from taps[i]).
     * Returns their number (<= MMB_MAX_TAPS), or -1 with a message when it cannot resolve them. */
    int (*needs)(mmb_ctx *ctx, const void *state, int n_hidden, bool has_cls, int *taps, int *spans);
    /* With needs: bufs[i] (batch, tokens, width) for each need in needs() order, CLS included when
     * tokens is a square plus one -> out (batch, out_tokens, out_width). tokens_in of out_tokens,
     * cost and scratch's rows (batch * tokens) count the CLS token too. */
    mmb_status (*forward_taps)(mmb_ctx *ctx, const void *state, float *out, const float *const *bufs,
                               int64_t batch, int64_t tokens, int64_t width);
    /* Optional; NULL for connectors that do not route. Tokens each expert received, summed over every
     * forward since load: fills counts[0 .. min(E, cap)) and returns E. */
    int (*routing)(const void *state, int64_t *counts, int cap);
} mmb_connector_ops;

/* Returns the connector that builds `type`, or NULL. */
const mmb_connector_ops *mmb__connector_find(const char *type);

extern const mmb_connector_ops mmb__conn_identity, mmb__conn_mlp, mmb__conn_resmlp, mmb__conn_dense;

/* ---- pipeline/families.c: checkpoints whose tower and connector are one model ---------------- */

/* A family (BLIP-2, IDEFICS, Idefics2/3, Qwen2-VL, ...) reads its own config and weights and maps
 * preprocessed pixels to embeddings itself; model.c tries the families before the LLaVA layouts.
 * One file per family under src/connectors/ (the connector) or src/vision/ (its tower), registered
 * in families.c. */
typedef struct mmb_family_ops {
    const char *name;  /* mmb_model_info.family: "blip2", "idefics", ... */
    /* Is this checkpoint one of the family's? arch: config's architectures[0] (or ""), model_type. */
    bool (*detect)(const mmb_ckpt *c, const char *arch, const char *model_type);
    /* Builds the state from c (which outlives it), checking every weight's presence, dtype and shape,
     * and fills *info: connector, select_strategy ("" if none), vision_layers, vision_width, in_width,
     * out_width, image_size, patch_size, tokens_per_image, params, flops_per_image, weight_dtype.
     * architecture and layout are filled by model.c. */
    mmb_status (*load)(mmb_ctx *ctx, const mmb_ckpt *c, void **state, mmb_model_info *info);
    /* Embeddings per image for pixels of height x width, or -1 with a message when it cannot take them. */
    int64_t (*tokens)(mmb_ctx *ctx, const void *state, int height, int width);
    /* pixels (batch, 3, height, width), as the checkpoint's image processor makes them ->
     * out (batch, tokens(height, width), out_width). Scratch comes from ctx's arena (reserved here,
     * reset before returning). */
    mmb_status (*encode)(mmb_ctx *ctx, const void *state, const float *pixels, int64_t batch, int height, int width,
                         float *out);
    void (*free)(void *state);
} mmb_family_ops;

/* The family that claims c, or NULL (then c is read as a LLaVA checkpoint). */
const mmb_family_ops *mmb__family_find(const mmb_ckpt *c, const char *arch, const char *model_type);

/* ---- connectors/dense.c ------------------------------------------------------------------------ */

/* The side g of the patch grid of a hidden state of `tokens` tokens: g*g (SigLIP) or g*g + 1 (CLIP,
 * *has_cls set); -1 when it is neither. */
int64_t mmb__dense_grid(int64_t tokens, bool *has_cls);
/* Features p concatenates on channels: 1 for STI, 1 + layers for SCI, 1 + groups for DCI. */
int mmb__dense_mult(const mmb_dense_params *p);
/* The registry name of p's variant: "dense_sti", "dense_sci", "dense_dci". */
const char *mmb__dense_name(mmb_dense_type t);

/* ---- tensor/attention.c: multi-head self-attention ------------------------------------------ */

/* Floats of scratch mmb__attention_forward needs on nth threads. */
size_t mmb__attention_scratch(int nth, int64_t head_dim);
/* qkv (batch, tokens, 3 * heads * head_dim) [q | k | v, head-major inside each] ->
 * out (batch, tokens, heads * head_dim): softmax(q k^T / sqrt(head_dim)) v per head, no mask.
 * Blocked with an online softmax; threaded over the context's pool. */
void mmb__attention_forward(mmb_ctx *ctx, float *out, const float *qkv, int64_t batch, int64_t tokens,
                            int64_t heads, int64_t head_dim, float *scratch);
/* The oracle: full score rows in double. Returns false if it cannot allocate a row. */
bool mmb__attention_forward_ref(float *out, const float *qkv, int64_t batch, int64_t tokens, int64_t heads,
                                int64_t head_dim);

/* ---- tensor/vecmath.c: vectorised math (AVX2, AVX-512) ---------------------------------------- */

/* x[0, n) = act(x) in place with the vector code of isa (as mmb__gemm_own_isa returns it), whole
 * vectors only: returns how many leading elements it did (0 for isa 0 or MMB_ACT_NONE); the caller
 * does the rest. Relative error of a few ulp (exp about 1 ulp, erfc below 1.2e-7). */
int64_t mmb__vec_act(int isa, float *x, int64_t n, mmb_act a);
/* One key block of an online softmax down the 32 columns of sp (nk rows of 32, 64-byte aligned), in
 * base 2 on scores times `scale`: with running max mp[32] and sum lp[32], sp = 2^(scale (s - m_new)),
 * lp = lp * cp + column sums, mp = m_new, cp = 2^(scale (m_old - m_new)). */
void mmb__vec_softmax_cols(int isa, float *sp, int64_t nk, float *mp, float *lp, float *cp, float scale);

/* ---- vision/vit.c ------------------------------------------------------------------------------ */

/* Reads a CLIP/SigLIP vision config under cfg_prefix ("vision_config." or "" for a standalone
 * vision model), filling class defaults for absent keys. */
mmb_status mmb__vision_cfg(mmb_ctx *ctx, const mmb_ckpt *c, const char *cfg_prefix, mmb_vit_info *out);
/* True when c holds vision-encoder weights under a known prefix. */
bool mmb__vit_present(const mmb_ckpt *c);
/* Loads the vision encoder whose weights are in c (c must outlive it). */
mmb_status mmb__vit_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb_vit **out);
/* The last hidden state (floats = batch x tokens x width) into *out, taken from ctx->feats (empty on
 * entry; kept from call to call, so a warm forward allocates nothing); the caller resets ctx->feats
 * when done reading it, on failure too. */
mmb_status mmb__vit_last_feats(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t batch, int64_t floats,
                               float **out);

/* ---- vision/preprocess.c ---------------------------------------------------------------------- */

/* Pad, resize and crop (the steps before rescale/normalize): the uint8 image, HWC, malloc'd in
 * *out (the caller frees it), of size *h x *w. The oracle tests check this stage on its own. */
mmb_status mmb__preprocess_u8(mmb_ctx *ctx, const mmb_preprocess *p, const mmb_image *img, unsigned char **out,
                              int *h, int *w);

/* ---- BLIP-2: cross-attention (tensor/attention.c), layers bound by name (io/checkpoint.c), the family
 * (connectors/qformer.c) ---------------------------------------------------------------------- */

extern const mmb_family_ops mmb__family_blip2;

/* ---- Qwen2-VL: vision/qwen2vl.c (the family) and connectors/patch_merger.c ----------------------- */

/* The PatchMerger: cfg->prefix ("visual.merger."), in_width D (one patch), out_width, eps; forward takes
 * x (batch, tokens, D) with each m^2 consecutive tokens one merge window. Not in the registry. */
extern const mmb_connector_ops mmb__conn_patch_merger;
/* Qwen2VLForConditionalGeneration: its vision tower and merger as the family "qwen2_vl". */
extern const mmb_family_ops mmb__family_qwen2vl;

/* ---- Idefics2 / Idefics3 (idefics2): tensor/kernels.c, tensor/attention.c, connectors/idefics2.c,
 * connectors/pixel_shuffle.c --------------------------------------------------------------------- */

/* x (M, C) -> out (M, C): x / sqrt(mean(x^2) + eps) * w (Llama-style RMSNorm, no bias); w (C). */
void mmb__rmsnorm_forward(float *out, const float *x, const float *w, int64_t M, int64_t C, float eps);
void mmb__rmsnorm_forward_ref(float *out, const float *x, const float *w, int64_t M, int64_t C, float eps);
void mmb__rmsnorm_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w, int64_t M, int64_t C,
                             float eps);
/* out (n), a (n), b (n) -> out = a * b elementwise (out may alias a or b). */
void mmb__mul_forward(float *out, const float *a, const float *b, int64_t n);
void mmb__mul_forward_ref(float *out, const float *a, const float *b, int64_t n);

/* q (batch, tq, ldq), k and v (batch, tk, ldkv): query head h in columns [h * head_dim, (h + 1) * head_dim)
 * of a q row, K/V head h / (heads / kv_heads) likewise in k and v rows (grouped-query attention;
 * kv_heads divides heads) -> out (batch, tq, heads * head_dim): softmax(q k^T / sqrt(head_dim)) v per
 * head, no mask. The blocked kernel of mmb__attention_forward; scratch as mmb__attention_scratch. */
void mmb__cross_attention_forward(mmb_ctx *ctx, float *out, const float *q, const float *k, const float *v,
                                  int64_t ldq, int64_t ldkv, int64_t batch, int64_t tq, int64_t tk, int64_t heads,
                                  int64_t kv_heads, int64_t head_dim, float *scratch);
bool mmb__cross_attention_forward_ref(float *out, const float *q, const float *k, const float *v, int64_t ldq,
                                      int64_t ldkv, int64_t batch, int64_t tq, int64_t tk, int64_t heads,
                                      int64_t kv_heads, int64_t head_dim);

/* The connectors, read from the family's config (not registered under a projector type):
 * mmb__conn_idefics2 = Idefics2Connector (SwiGLU modality_projection + perceiver resampler),
 * mmb__conn_pixel_shuffle = Idefics3Connector (pixel shuffle + modality_projection.proj). */
extern const mmb_connector_ops mmb__conn_idefics2, mmb__conn_pixel_shuffle;
extern const mmb_family_ops mmb__family_idefics2, mmb__family_idefics3, mmb__family_smolvlm;

/* ---- research connectors on a patch grid (llavaconn): tensor/conv.c, connectors/{cabstractor,ldp,
 * moe,lowrank}.c ----------------------------------------------------------------------------------- */

extern const mmb_connector_ops mmb__conn_cabs, mmb__conn_ldp, mmb__conn_moe, mmb__conn_lowrank;

/* io/ckpt_layers.c. Each binds tensors named {prefix}{name}.weight / .bias, checked as mmb__ckpt_bind does;
 * the f32 copies they return are the caller's to free (also after an error). */
/* A float tensor of exactly the given shape: an f32 copy of its elements in *out. */
mmb_status mmb__ckpt_floats(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int ndim, const int64_t *shape,
                            float **out);
/* Adds l's parameters and its FLOPs over `rows` rows to *params, *flops. */
void mmb__linear_cost(const mmb_linear *l, int64_t rows, int64_t *params, int64_t *flops);
/* A depthwise 3x3 Conv2d [C, 1, 3, 3], packed for mmb__dwconv3x3_forward into *w9, and its bias [C] if asked. */
mmb_status mmb__ckpt_dwconv(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t C,
                            bool bias, float **w9, float **b);

/* Maps are channels-last: (B, H, W, C) row-major, i.e. a connector's (batch, tokens, channels). */
/* The side g of a square grid of tokens = g * g, or -1. */
int64_t mmb__grid_side(int64_t tokens);
/* w (C, 1, 3, 3) as torch stores a depthwise Conv2d weight -> w9 (9, C), the layout the kernel reads. */
void mmb__dwconv3x3_pack(float *w9, const float *w, int64_t C);
/* x (B, H, W, C), w9 (9, C), bias (C) or NULL -> out (B, Ho, Wo, C), Ho = (H - 1) / stride + 1 (same
 * for W): torch Conv2d(C, C, 3, stride, padding=1, groups=C). The _ref takes torch's w (C, 1, 3, 3). */
void mmb__dwconv3x3_forward(float *out, const float *x, const float *w9, const float *bias, int64_t B, int64_t H,
                            int64_t W, int64_t C, int stride);
void mmb__dwconv3x3_forward_ref(float *out, const float *x, const float *w, const float *bias, int64_t B, int64_t H,
                                int64_t W, int64_t C, int stride);
void mmb__dwconv3x3_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w9, const float *bias,
                               int64_t B, int64_t H, int64_t W, int64_t C, int stride);
/* x (B, H, W, C) -> out (B, Ho, Wo, C): torch AdaptiveAvgPool2d((Ho, Wo)); output cell i of n over a side
 * of L averages [floor(i L / n), ceil((i + 1) L / n)) (cells overlap when n does not divide L; Ho > H
 * repeats rows). */
void mmb__adaptive_avgpool2d_forward(float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C,
                                     int64_t Ho, int64_t Wo);
void mmb__adaptive_avgpool2d_forward_ref(float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C,
                                         int64_t Ho, int64_t Wo);
void mmb__adaptive_avgpool2d_forward_mt(mmb_ctx *ctx, float *out, const float *x, int64_t B, int64_t H, int64_t W,
                                        int64_t C, int64_t Ho, int64_t Wo);

typedef enum mmb_se_kind {
    MMB_SE_SILU_SIGMOID,      /* timm SEModule(act_layer=SiLU), gate sigmoid (RegNet in Honeybee) */
    MMB_SE_RELU_HARDSIGMOID   /* torchvision SqueezeExcitation(scale_activation=Hardsigmoid) (MobileVLM) */
} mmb_se_kind;
/* Squeeze-and-excitation in place on x (B, HW, C): s = mean over HW (B, C); x *= gate(fc2(act(fc1(s)))).
 * fc1 (R, C) and fc2 (C, R) are the 1x1 convs with bias. scratch: B * (2 C + R) floats. */
void mmb__se_forward(mmb_ctx *ctx, float *x, int64_t B, int64_t HW, const mmb_linear *fc1, const mmb_linear *fc2,
                     mmb_se_kind kind, float *scratch);

/* ---- tensor/layers.c: composite layers ------------------------------------------------------- */

/* A pre-norm MLP residual (transformer blocks, perceivers): x (rows, D) -> x + fc2(act(fc1(LN(x)))), in
 * place; LN weights (D); fc1 (I, D), fc2 (D, I); scratch xn (rows, D), h (rows, I). */
void mmb__ffn_residual_forward(mmb_ctx *ctx, float *x, float *xn, float *h, int64_t rows, const float *ln_w,
                               const float *ln_b, float eps, const mmb_linear *fc1, mmb_act act, const mmb_linear *fc2);

/* ---- connectors/perceiver.c: IDEFICS (v1) and OpenFlamingo perceiver resamplers --------------- */

extern const mmb_connector_ops mmb__conn_flamingo_perceiver;
extern const mmb_family_ops mmb__family_idefics;

/* ---- LLM decoder (lm): tensor/gemm_own.c panel access, tensor/wgemm.c, lm/decoder.c ------------- */

/* The own kernel's packed panel: NR columns wide, k-major, cut into K blocks of KC (gemm_own.c). */
#define MMB_GEMM_OWN_NR 32
#define MMB_GEMM_OWN_KC 256
/* A rows [0, mr) (row stride lda, kc columns) -> dst (kc x MR, k-major), rows mr..MR-1 zero; MR is
 * mmb__gemm_own_mr(mmb__gemm_own_isa()). */
void mmb__gemm_own_pack_a(float *dst, const float *A, int64_t lda, int mr, int64_t kc);

/* A weight matrix used in its storage dtype (F32, F16, BF16): W (n, k) row-major as nn.Linear stores it,
 * read in place from the mapped file and converted to f32 on the fly (tensor/wgemm.c). */
typedef struct mmb_wmat {
    const void *data;
    mmb_dtype dtype;
    int64_t n, k;
} mmb_wmat;

/* Rows of x up to which mmb__wmat_part streams each weight row once (GEMV); above, it packs panels (GEMM). */
#define MMB_WMAT_GEMV_MAX 4
/* Floats of per-thread scratch mmb__wmat_part needs for M rows of x and K columns. */
size_t mmb__wmat_scratch(int64_t M, int64_t K);
/* Output columns [n0, n1) of y = x W^T + bias, single-threaded (callers split the columns over threads):
 * x (M, w->k) row stride ldx; y0 points at column n0 of row 0 of y (row stride ldy); bias (w->n) or NULL;
 * accumulate: y += x W^T + bias instead of y =. scratch: mmb__wmat_scratch(M, w->k) floats, 64-aligned. */
void mmb__wmat_part(float *y0, int64_t ldy, const float *x, int64_t ldx, int64_t M, const mmb_wmat *w,
                    const float *bias, int64_t n0, int64_t n1, int accumulate, float *scratch);
/* The oracle: y (M, w->n) = x (M, w->k) W^T + bias, weights converted element by element, sums in double. */
void mmb__wmat_ref(float *y, const float *x, int64_t M, const mmb_wmat *w, const float *bias);

/* Hooks for fusion types A (gated cross-attention) and B (adapters / visual experts): extra work inside the
 * decoder's layer loop. The loop runs in segments between hooks; a hook is called on the caller's thread
 * with every worker idle, so it may use ctx's pool (mmb__pool_run, mmb__linear_forward, ...); ctx's arena
 * is NOT free for it (the decoder's activations live there: a hook brings its own scratch).
 * x (n, d_model) is the residual stream of the n positions of the current block, the first at position
 * pos0; a hook changes it in place. before_layer(l) runs before layer l's input RMSNorm, after_attention(l)
 * after layer l's attention residual and before its MLP (Flamingo's gated xattn sits before a layer,
 * adapters after attention or around the MLP). A hook's non-OK status (with its message) ends the forward;
 * the cache then holds the positions of the earlier blocks only. */
typedef struct mmb_lm_hook {
    mmb_status (*before_layer)(mmb_ctx *ctx, void *user, int layer, float *x, int64_t n, int64_t pos0);
    mmb_status (*after_attention)(mmb_ctx *ctx, void *user, int layer, float *x, int64_t n, int64_t pos0);
    void *user;
} mmb_lm_hook;
/* Installs hooks[0 .. layers) (copied; NULL removes them all). Returns MMB_OK, MMB_ERR_ARG or MMB_ERR_NOMEM. */
mmb_status mmb__lm_set_hooks(mmb_ctx *ctx, mmb_lm *lm, const mmb_lm_hook *hooks);

#endif
