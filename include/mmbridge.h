/*
 * mmbridge: multimodal connectors in C.
 *
 * The whole public API. Every fallible call returns an mmb_status; when it is not MMB_OK the
 * context's message (mmb_ctx_error) names the file, the tensor and the problem (except for
 * mmb_ctx_new, which has no context to hold one), and every output parameter is left untouched.
 * Sizes are int64_t or size_t; arrays are row-major, f32 unless said.
 *
 * The whole job, from a checkpoint directory and images to streamed text, is the multimodal model
 * (mmb_mllm, "The multimodal model" below; tests/test_mllm.c runs its example). The parts under it stay
 * public: the connector model on hidden states you computed yourself (what the CLI's `connect` does;
 * tests/test_api.c runs this sequence):
 *
 *     mmb_ctx *ctx = NULL;
 *     mmb_ctx_params cp = mmb_ctx_default_params();
 *     if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 1;          // only fails on out-of-memory
 *     mmb_model *m = NULL;
 *     if (mmb_model_open(ctx, "llava-dir", &m) != MMB_OK) { puts(mmb_ctx_error(ctx)); ... }
 *     mmb_model_info info;
 *     mmb_model_get_info(m, &info);
 *     // features: the hidden states the model reads (info.taps, HF indexing), each
 *     // [batch, tokens, info.vision_width] f32
 *     int64_t t_out = mmb_model_tokens_out(ctx, m, tokens);
 *     size_t n = (size_t)(batch * t_out * info.out_width);
 *     float *out = malloc(n * sizeof(float));
 *     if (mmb_model_connect(ctx, m, &features, out, n) != MMB_OK) puts(mmb_ctx_error(ctx));
 *     free(out); mmb_model_free(m); mmb_ctx_free(ctx);
 */
#ifndef MMBRIDGE_H
#define MMBRIDGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define MMB_API
#else
#define MMB_API __attribute__((visibility("default")))
#endif

/* The version's one source: CMakeLists.txt reads these three lines (library SOVERSION, mmbridge.pc)
 * and mmb_version() is built from them. Keep the form '#define MMB_VERSION_X <number>'. */
#define MMB_VERSION_MAJOR 0
#define MMB_VERSION_MINOR 1
#define MMB_VERSION_PATCH 0

/* Result of every fallible call. Values are fixed; new codes are only ever appended. */
typedef enum mmb_status {
    MMB_OK = 0,
    MMB_ERR_IO = 1,          /* a file could not be opened, read, mapped or written */
    MMB_ERR_FORMAT = 2,      /* a file's contents are malformed (header, JSON, offsets, dtype) */
    MMB_ERR_SHAPE = 3,       /* a tensor or input has the wrong shape */
    MMB_ERR_MISSING = 4,     /* a required tensor or config key is absent */
    MMB_ERR_UNSUPPORTED = 5, /* a known-valid but unsupported choice (projector type, activation) */
    MMB_ERR_NOMEM = 6,       /* an allocation failed */
    MMB_ERR_ARG = 7,         /* the caller passed an invalid argument */
    MMB_ERR_ABORTED = 8,     /* the caller's abort flag stopped the work between two steps */
    MMB_ERR_NUMERIC = 9      /* a computation gave NaN or infinity (a training loss) */
} mmb_status;

/* Returns a static, short English name for a status ("ok", "io error", ...). Never NULL. */
MMB_API const char *mmb_status_str(mmb_status s);

/* Returns the library version as "MAJOR.MINOR.PATCH"; a static string. */
MMB_API const char *mmb_version(void);

/* ---------------------------------------------------------------------------------------------
 * Context: owns the thread pool, the GEMM backend choice and the last error message.
 * A context is used by one thread at a time; models opened with it may be shared read-only.
 */
typedef struct mmb_ctx mmb_ctx;

typedef enum mmb_gemm_backend {
    MMB_GEMM_AUTO = 0,  /* the measured default (docs/decisions.md) */
    MMB_GEMM_NAIVE = 1, /* the reference triple loop: the oracle, slow */
    MMB_GEMM_OWN = 2,   /* mmbridge's packed AVX-512 / AVX2 kernel, chosen by CPUID at run time */
    MMB_GEMM_OPENBLAS = 3 /* cblas_sgemm from the OpenBLAS the library was built against */
} mmb_gemm_backend;

typedef struct mmb_ctx_params {
    int n_threads;            /* worker threads; <= 0 means the number of online CPUs */
    mmb_gemm_backend gemm;    /* MMB_GEMM_AUTO unless a benchmark or test wants another */
    /* The dtype the linear layers' weights are computed in, whatever the checkpoint stores:
     * MMB_F32 (default, exact), MMB_BF16 or MMB_F16 (16-bit packed weights, half the memory),
     * MMB_I8 (int8 with one symmetric scale per output channel, a quarter). Weights are converted
     * once at load; activations, biases, norms and accumulation stay f32. Models opened with the
     * context use it (docs/decisions.md "Reduced-precision weights" gives the accuracy).
     * An mmb_dtype (declared below): int here so the struct can come first. */
    int weight_dtype;
} mmb_ctx_params;

/* Returns the default context parameters: n_threads 0 (online CPUs), gemm MMB_GEMM_AUTO,
 * weight_dtype MMB_F32. */
MMB_API mmb_ctx_params mmb_ctx_default_params(void);

/* Creates a context and starts its threads. Returns MMB_OK and sets *out; the caller frees it with
 * mmb_ctx_free. On failure *out is left untouched and, as there is no context to hold one, no
 * message is available: the status alone gives the cause.
 *   MMB_ERR_ARG    p or out is NULL; p->gemm is not an mmb_gemm_backend value, or is
 *                  MMB_GEMM_OPENBLAS in a build without OpenBLAS; p->weight_dtype is not MMB_F32,
 *                  MMB_BF16, MMB_F16 or MMB_I8.
 *   MMB_ERR_NOMEM  the context could not be allocated or a worker thread could not be started.
 * mmb_ctx_default_params() always passes the checks, so with it only MMB_ERR_NOMEM is possible. */
MMB_API mmb_status mmb_ctx_new(const mmb_ctx_params *p, mmb_ctx **out);

/* Stops the threads and frees the context. NULL is a no-op. */
MMB_API void mmb_ctx_free(mmb_ctx *ctx);

/* Returns the number of threads the context computes with (>= 1). */
MMB_API int mmb_ctx_threads(const mmb_ctx *ctx);

/* Returns the message of the last failed call made with this context ("" if none). The string
 * belongs to the context and stays valid until its next failing call or mmb_ctx_free. */
MMB_API const char *mmb_ctx_error(const mmb_ctx *ctx);

/* ---------------------------------------------------------------------------------------------
 * Tensors and safetensors files.
 */
/* Storage types. Only F32, F16 and BF16 are computed with; the others are the remaining
 * safetensors dtypes, accepted in a file (checkpoints carry e.g. I64 position_ids) and refused
 * with MMB_ERR_UNSUPPORTED only when a computation needs that tensor. */
typedef enum mmb_dtype {
    MMB_F32 = 0, MMB_F16 = 1, MMB_BF16 = 2,
    MMB_F64 = 3, MMB_I64 = 4, MMB_I32 = 5, MMB_I16 = 6, MMB_I8 = 7, MMB_U8 = 8, MMB_BOOL = 9,
    MMB_U16 = 10, MMB_U32 = 11, MMB_U64 = 12, MMB_F8_E4M3 = 13, MMB_F8_E5M2 = 14
} mmb_dtype;

#define MMB_MAX_DIMS 8

/* A view of an n-dimensional row-major array. `data` is not owned by the view. */
typedef struct mmb_tensor {
    const char *name;          /* the tensor's name in its file (owned by the file) */
    mmb_dtype dtype;
    int ndim;
    int64_t shape[MMB_MAX_DIMS];
    const void *data;          /* ndim product * dtype size bytes */
} mmb_tensor;

/* Returns the element size of a dtype in bytes. */
MMB_API size_t mmb_dtype_size(mmb_dtype t);

/* Returns the safetensors name of a dtype ("F32", "F16", "BF16", "I64", ...). */
MMB_API const char *mmb_dtype_name(mmb_dtype t);

/* Returns the number of elements of a tensor (1 for ndim 0). */
MMB_API int64_t mmb_tensor_numel(const mmb_tensor *t);

/* Converts n elements of src (of dtype t) to f32 in dst. Returns MMB_OK, or MMB_ERR_UNSUPPORTED
 * (dst untouched) when t is not F32, F16 or BF16. */
MMB_API mmb_status mmb_to_f32(float *dst, const void *src, mmb_dtype t, size_t n);

/* A read-only, memory-mapped safetensors file. */
typedef struct mmb_st_file mmb_st_file;

/* Maps `path` and validates its whole header before returning: the 8-byte length, the JSON, each
 * entry's dtype (a safetensors dtype name; unknown names are MMB_ERR_FORMAT), shape (non-negative, product
 * overflow-checked), data_offsets (inside the file, begin <= end, length == numel * dtype size,
 * no two ranges overlapping). Returns MMB_OK and sets *out, or MMB_ERR_IO / MMB_ERR_FORMAT with a
 * message naming the file and the tensor. Free with mmb_st_close. */
MMB_API mmb_status mmb_st_open(mmb_ctx *ctx, const char *path, mmb_st_file **out);

/* Unmaps and frees. NULL is a no-op. Tensor views taken from the file become invalid. */
MMB_API void mmb_st_close(mmb_st_file *f);

/* Returns the number of tensors in the file. */
MMB_API int mmb_st_count(const mmb_st_file *f);

/* Returns a view of tensor i (0 <= i < count) in file order, or NULL when out of range. */
MMB_API const mmb_tensor *mmb_st_at(const mmb_st_file *f, int i);

/* Returns the tensor called `name`, or NULL if the file has none. */
MMB_API const mmb_tensor *mmb_st_find(const mmb_st_file *f, const char *name);

/* Returns the `__metadata__` string value for `key`, or NULL. */
MMB_API const char *mmb_st_meta(const mmb_st_file *f, const char *key);

/* Writes `n` tensors to `path` as safetensors, as mmb_file_write writes a file (a temporary file in
 * the same directory, fsynced and renamed onto `path`, so a failure never leaves a partial file
 * there; through symlinks; the replaced file's mode kept; a non-regular `path` refused). Returns
 * MMB_OK, MMB_ERR_ARG for duplicate or empty names, or MMB_ERR_IO. */
MMB_API mmb_status mmb_st_write(mmb_ctx *ctx, const char *path, const mmb_tensor *tensors, int n);

/* Writes n bytes of data as the file `path`, the one way every output of the library and the CLI is
 * written: symlinks are followed (the file they name is replaced, the links kept); a `path` that
 * exists and is not a regular file (a FIFO, a device such as /dev/null, a socket, a directory) is
 * refused with MMB_ERR_IO and left alone; the bytes go to a temporary file `.mmb-HOSTHASH-PID-XXXXXX`
 * in the same directory, with the replaced file's mode (0666 & ~umask for a new file), which is
 * fsynced, renamed onto `path`, and the directory fsynced. Every failure removes the temporary and
 * leaves `path` as it was. Temporaries a killed writer of this host left in that directory (its PID
 * no longer alive) are removed first. Returns MMB_OK, MMB_ERR_ARG (path NULL or empty, data NULL
 * with n > 0), MMB_ERR_IO or MMB_ERR_NOMEM. */
MMB_API mmb_status mmb_file_write(mmb_ctx *ctx, const char *path, const void *data, size_t n);

/* As mmb_st_write, with the file's `__metadata__` holding the n_meta string pairs keys[i]: values[i]
 * (UTF-8; mmb_st_meta and safetensors' safe_open(...).metadata() read them back). Returns as
 * mmb_st_write, and MMB_ERR_ARG for an empty or NULL key, a NULL value or a key given twice. */
MMB_API mmb_status mmb_st_write_meta(mmb_ctx *ctx, const char *path, const mmb_tensor *tensors, int n,
                                     const char *const *keys, const char *const *values, int n_meta);

/* ---------------------------------------------------------------------------------------------
 * Vision encoders: CLIP (CLIPVisionModel) and SigLIP (SiglipVisionModel) ViTs, as transformers
 * runs them, with any set of hidden states tapped.
 */
typedef struct mmb_vit mmb_vit;

/* Tap value meaning `last_hidden_state`: the last block's output, after post_layernorm for
 * SigLIP (CLIP applies post_layernorm only to the pooled CLS, so there it equals the last
 * hidden state). */
#define MMB_TAP_LAST 0x7fffffff

typedef struct mmb_vit_info {
    const char *family;       /* "clip", "siglip", "blip2", "idefics", "idefics2", "idefics3", "smolvlm" */
    const char *prefix;       /* weight-name prefix found, e.g. "model.vision_tower.vision_model." */
    const char *act;          /* hidden_act */
    float eps;                /* layer_norm_eps */
    int layers, width, heads, intermediate, image_size, patch_size, channels;
    int has_cls;              /* CLIP: 1 (token 0 is CLS) */
    int64_t tokens;           /* tokens per image: (image/patch)^2 + has_cls */
    int64_t flops_per_image;  /* all layers, 2 FLOPs per multiply-add */
    int64_t params;
} mmb_vit_info;

/* Opens the vision encoder in checkpoint directory `dir`: a standalone CLIPVisionModel /
 * SiglipVisionModel, a full CLIPModel / SiglipModel (vision_model.*), or the vision tower of a
 * LLaVA checkpoint in either transformers key layout. Every weight's presence, dtype and shape is
 * checked against the config. Returns MMB_OK and sets *out, or MMB_ERR_IO / MMB_ERR_FORMAT /
 * MMB_ERR_MISSING / MMB_ERR_SHAPE / MMB_ERR_UNSUPPORTED (message names the file and tensor).
 * Free with mmb_vit_free. */
MMB_API mmb_status mmb_vit_open(mmb_ctx *ctx, const char *dir, mmb_vit **out);

/* Frees the encoder. NULL is a no-op. */
MMB_API void mmb_vit_free(mmb_vit *v);

/* Fills *out. Strings belong to the encoder. Returns MMB_OK or MMB_ERR_ARG for NULL pointers. */
MMB_API mmb_status mmb_vit_get_info(const mmb_vit *v, mmb_vit_info *out);

/* Runs the encoder on pixels [batch, channels, image_size, image_size] (f32, already
 * preprocessed) and writes the requested hidden states: outs[i] receives hidden_states[taps[i]]
 * as [batch, tokens, width] f32 (HF indexing: 0 = embeddings after CLIP's pre_layrnorm, i = output
 * of block i, negative counts from the end, no post-layernorm), or last_hidden_state for
 * MMB_TAP_LAST. Only the blocks up to the deepest tap are computed and only the taps are kept.
 * Returns MMB_OK; MMB_ERR_ARG for a tap out of range or n_taps outside 1..MMB_MAX_TAPS;
 * MMB_ERR_NOMEM. Outputs are untouched on failure. */
MMB_API mmb_status mmb_vit_forward(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t batch,
                                   const int *taps, int n_taps, float *const *outs);

/* As mmb_vit_forward, and where spans[i] > 1 outs[i] receives the mean of the spans[i] hidden
 * states hidden_states[taps[i]] .. hidden_states[taps[i] + spans[i] - 1] (taps[i] resolved as in
 * mmb_vit_forward; the range must stay inside 0..layers). A mean is kept as a running sum in
 * outs[i] while the blocks run, so DCI's layer groups cost one buffer each, not one per layer.
 * spans NULL, or spans[i] 0 or 1, is a single hidden state. Returns as mmb_vit_forward. */
MMB_API mmb_status mmb_vit_forward_groups(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t batch,
                                          const int *taps, const int *spans, int n_taps, float *const *outs);

/* Attention maps (the Dense Connector paper's Figure 1): what each block's self-attention looks at. With
 * A_l = softmax(q k^T / sqrt(head_dim)) of block l (l = 0 .. layers-1), [heads, tokens, tokens], q and k the
 * block's projections (with their biases) of layer_norm1 of its input: transformers' output_attentions[l][b]
 * (attn_implementation="eager"). Writes out [n, layers, patches] f32, patches = (image_size / patch_size)^2 in
 * the patch grid's row-major order (image b, block l, patch p at out[(b * layers + l) * patches + p]):
 *   a tower with a CLS token (has_cls: CLIP, BLIP-2, IDEFICS): out[b, l] = A_l[:, 0, 1:].mean(heads), the CLS
 *     query's row without its own column (so a map sums to 1 - the CLS's attention to itself);
 *   without one (SigLIP, Idefics2/3, SmolVLM): out[b, l] = A_l.mean(heads).mean(queries), each key's attention
 *     averaged over every query (a map sums to 1).
 * pixels [n, channels, height, width] are preprocessed as mmb_vit_forward's (height = width = image_size). The
 * maps come from one forward through every block, computed from each block's q and k as it runs; the plain
 * forward (mmb_vit_forward) does none of this work. Returns MMB_OK; MMB_ERR_ARG (NULL, n < 1); MMB_ERR_SHAPE
 * (another size; count < n x layers x patches floats, the message saying how many); MMB_ERR_NOMEM. out is
 * untouched on failure. From an mmb_mllm: mmb_mllm_attention, or mmb_mllm_vit and mmb_mllm_processor. */
MMB_API mmb_status mmb_vit_attention(mmb_ctx *ctx, const mmb_vit *v, const float *pixels, int64_t n, int height,
                                     int width, float *out, size_t count);

/* ---------------------------------------------------------------------------------------------
 * Models: a checkpoint directory (config.json + *.safetensors, sharded through
 * model.safetensors.index.json) with its connector and feature selection.
 */
typedef struct mmb_model mmb_model;

#define MMB_MAX_TAPS 64

typedef struct mmb_model_info {
    const char *architecture;   /* e.g. "LlavaForConditionalGeneration", "LlavaLlamaForCausalLM" */
    const char *layout;         /* "transformers" (model.multi_modal_projector.*), "transformers-legacy"
                                   (multi_modal_projector.*: the hub files, and what transformers 5's
                                   save_pretrained writes) or "llava-original" (model.mm_projector.*) */
    const char *connector;      /* registry name: "linear", "mlp2x_gelu", "llava", ... */
    const char *activation;     /* "gelu", "gelu_pytorch_tanh", "quick_gelu", "silu", or "" */
    const char *select_strategy;/* "default"/"patch" (drop token 0) or "full"/"cls_patch" (keep it) */
    int n_taps;                 /* hidden layers read, concatenated on channels in this order */
    int taps[MMB_MAX_TAPS];     /* HF hidden_states indices as configured (may be negative) */
    int vision_layers;          /* encoder blocks, or 0 when the checkpoint does not say */
    int vision_width;           /* width of one hidden state */
    int in_width;               /* projector input width: vision_width * n_taps for LLaVA; for the Dense
                                   Connector vision_width (STI) or vision_width * n_taps (SCI, DCI) */
    int out_width;              /* d_model: the LLM's embedding width */
    int image_size, patch_size; /* 0 when unknown */
    int64_t tokens_per_image;   /* visual tokens out per image, 0 when image size unknown or it varies
                                   with the image (Qwen2-VL: its grid; Mllama: its tiles) */
    int64_t params;             /* connector parameters */
    int64_t flops_per_image;    /* connector FLOPs per image (2 per multiply-add), 0 if unknown */
    mmb_dtype weight_dtype;     /* dtype the connector's weights are stored in */
    int pad_to_square;          /* original LLaVA image_aspect_ratio "pad": images are padded to a
                                   square with the mean colour before the image processor runs */
    int tap_spans[MMB_MAX_TAPS];/* 0 or 1: taps[i] is one hidden state; n > 1: the mean of hidden_states
                                   taps[i] .. taps[i] + n - 1 (a Dense Connector DCI group) */
    const char *projector;      /* the projector's type: connector, or what the Dense Connector feeds */
    const char *family;         /* "llava" (a tower + feature selection + projector, the fields above), or a
                                   family that runs its own tower and connector as one model: "blip2",
                                   "idefics", "idefics2", "idefics3", "qwen2_vl", "mllama", ... (mmb_model_encode) */
    const char *dense;          /* Dense Connector variant "sti", "sci", "dci", or "" for none; its taps
                                   are resolved (non-negative) once the encoder's depth is known, and
                                   n_taps is 0 before that; taps[0] is the final feature */
} mmb_model_info;

/* Opens the checkpoint directory `dir`: reads config.json, maps its safetensors, finds the row of
 * the family table (mmb_family_get) that claims it and builds its connector (or the family's own
 * model), checking every weight's presence, dtype and shape. f16/bf16 weights are converted to f32
 * once here. Returns MMB_OK and sets *out; MMB_ERR_UNSUPPORTED for an architecture no row claims (the
 * message names it and lists the supported families) or a vision tower alone (a row without a
 * connector: mmb_vit_open opens it); MMB_ERR_IO, MMB_ERR_FORMAT, MMB_ERR_MISSING, MMB_ERR_SHAPE or
 * MMB_ERR_UNSUPPORTED with a message naming the file and tensor otherwise. Free with mmb_model_free. */
MMB_API mmb_status mmb_model_open(mmb_ctx *ctx, const char *dir, mmb_model **out);

/* Frees the model. NULL is a no-op. */
MMB_API void mmb_model_free(mmb_model *m);

/* Fills *out with what the model reads and produces. Strings belong to the model. Returns MMB_OK
 * or MMB_ERR_ARG for NULL pointers. */
MMB_API mmb_status mmb_model_get_info(const mmb_model *m, mmb_model_info *out);

/* Hidden states from a vision encoder, as the connector reads them. */
typedef struct mmb_features {
    int64_t batch;          /* images */
    int64_t tokens;         /* tokens per image in each hidden state, CLS included if present */
    int64_t width;          /* channels of one hidden state */
    int n_hidden;           /* length of the encoder's hidden_states tuple (layers + 1), used to
                               resolve negative taps; 0 if unknown */
    int n_taps;
    int taps[MMB_MAX_TAPS];           /* non-negative HF indices of the buffers below */
    const float *data[MMB_MAX_TAPS];  /* each [batch, tokens, width] */
    int spans[MMB_MAX_TAPS];          /* 0 or 1: data[i] is hidden_states[taps[i]]; n > 1: the mean
                                         of hidden_states[taps[i] .. taps[i] + n - 1] */
} mmb_features;

/* Returns how many tokens per image the model emits for hidden states of `tokens` tokens per
 * image, or -1 if it cannot take them (message set). Like transformers, the "default" / "patch"
 * strategy drops token 0 whatever the encoder (CLS for CLIP). */
MMB_API int64_t mmb_model_tokens_out(mmb_ctx *ctx, const mmb_model *m, int64_t tokens);

/* Runs feature selection and the connector: picks the model's taps from `in` (negative taps are
 * resolved with in->n_hidden), crops CLS as the strategy says, concatenates on channels, and
 * writes embeddings [batch, tokens_out, out_width] to `out`, which holds `out_count` floats.
 * Returns MMB_OK; MMB_ERR_MISSING when a tap is absent (or negative with n_hidden 0); MMB_ERR_SHAPE
 * when the width does not match or out_count is too small; MMB_ERR_NOMEM. `out` is unchanged on
 * failure. */
MMB_API mmb_status mmb_model_connect(mmb_ctx *ctx, const mmb_model *m, const mmb_features *in,
                                     float *out, size_t out_count);

/* Returns the model's vision encoder (the checkpoint's own tower, or the one attached), or NULL.
 * It belongs to the model. */
MMB_API const mmb_vit *mmb_model_vit(const mmb_model *m);

/* Attaches vision encoder v to the model, which takes ownership of it on success (replacing any
 * tower it had): for original-layout LLaVA checkpoints whose tower is a separate directory.
 * Returns MMB_OK, or MMB_ERR_SHAPE when v's width times the model's taps is not the connector's
 * input width (v is then still the caller's), or MMB_ERR_ARG. */
MMB_API mmb_status mmb_model_attach_vit(mmb_ctx *ctx, mmb_model *m, mmb_vit *v);

/* Returns how many embeddings per image mmb_model_encode writes for pixels of height x width, or -1
 * with a message when the model cannot take them (no vision tower, a size its encoder refuses). */
MMB_API int64_t mmb_model_encode_tokens(mmb_ctx *ctx, const mmb_model *m, int height, int width);

/* Runs the model's whole vision path on pixels [batch, 3, height, width] f32, preprocessed as the
 * checkpoint's image processor makes them: the encoder, feature selection and the connector (for a
 * family, its own tower and connector). Writes embeddings [batch, tokens, out_width] to `out`, which
 * holds out_count floats (tokens from mmb_model_encode_tokens). Returns MMB_OK; MMB_ERR_MISSING when
 * the model has no vision tower (attach one); MMB_ERR_SHAPE for a size the encoder refuses or
 * out_count too small; MMB_ERR_ARG for NULL pointers or batch < 1; MMB_ERR_NOMEM. `out` is unchanged
 * on failure. */
MMB_API mmb_status mmb_model_encode(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch,
                                    int height, int width, float *out, size_t out_count);

/* Video, as the Dense Connector's training-free extension (FreeVA) runs it: sample frames, encode each
 * like an image (mmb_model_encode with batch = frames), then pool over time.
 *
 * Sets idx[0 .. frames) to the frames to take out of `total`: [0, total - 1] split into `frames`
 * equal segments, each segment's midpoint (get_seq_frames, with numpy's half-to-even rounding).
 * Frames repeat when total < frames. Returns MMB_OK, or MMB_ERR_ARG for total < 1, frames < 1 or
 * NULL. */
MMB_API mmb_status mmb_video_sample(mmb_ctx *ctx, int64_t total, int frames, int64_t *idx);

/* Tokens mmb_temporal_pool makes from `frames` frames of `tokens` embeddings: frames * (tokens / 2). */
MMB_API int64_t mmb_temporal_pool_tokens(int64_t frames, int64_t tokens);

/* emb [frames, tokens, width] -> out [frames * (tokens / 2), width] (the LLM's single video input):
 * MaxPool1d(kernel 2, stride 2) over each frame's token sequence (pairs of raster-adjacent tokens; an
 * odd last token is dropped), frames concatenated in order. out may equal emb. Returns MMB_OK or
 * MMB_ERR_ARG (NULL, frames < 1, tokens < 2, width < 1). */
MMB_API mmb_status mmb_temporal_pool(mmb_ctx *ctx, const float *emb, int64_t frames, int64_t tokens, int64_t width,
                                     float *out);

/* A connector's costs at given sizes (mmb_connector_measure). */
typedef struct mmb_connector_report {
    char type[64];
    int64_t params;            /* parameters */
    int64_t flops_per_image;   /* 2 per multiply-add */
    int64_t tokens_in;         /* grid x grid patch tokens (CLS dropped, as LLaVA's "default") */
    int64_t tokens_out;        /* visual tokens handed to the LLM */
    int64_t out_width;
    double seconds;            /* median time of one image's forward pass */
    int64_t weight_bytes;      /* the parameters in f32 */
    int64_t activation_bytes;  /* input features + output + the connector's scratch */
    int with_tower;            /* mmb_model_measure: 1 when the timed pass ran the vision tower too */
} mmb_connector_report;

/* Builds registry connector `type` (mmb_connector_names) with random weights for features of
 * `width` channels on a grid x grid patch grid and an LLM of width d_model, as an original-LLaVA
 * checkpoint would configure it (mm_projector_type, mm_hidden_size, hidden_size; `config_json`,
 * may be NULL, adds or overrides config.json keys, e.g. "{\"mm_moe_num_experts\": 8}"), runs it
 * reps + 1 times on random features with ctx's threads and fills *out (the first run is a warm-up).
 * Returns MMB_OK; MMB_ERR_UNSUPPORTED for an unknown type or one that reads several hidden states
 * (the Dense Connector); MMB_ERR_SHAPE when the connector cannot take the grid; MMB_ERR_FORMAT for
 * bad config_json; MMB_ERR_ARG; MMB_ERR_NOMEM. *out is untouched on failure. */
MMB_API mmb_status mmb_connector_measure(mmb_ctx *ctx, const char *type, int64_t width, int64_t grid,
                                         int64_t d_model, const char *config_json, int reps,
                                         mmb_connector_report *out);

/* Measures model m as it is opened. With a vision tower (its own, an attached one, or a family's), its
 * whole vision path (mmb_model_encode) on fixed pseudo-random pixels of the tower's size (a tower that
 * takes any size: grid patches a side); without one, feature selection and the connector
 * (mmb_model_connect) on features of the model's vision width (else `width`) for a grid x grid patch grid
 * plus CLS. Runs reps + 1 times with ctx's threads (the first a warm-up) and fills *out: type = the
 * connector, params, FLOPs and tokens as mmb_model_get_info reports them, the median time, with_tower,
 * activation_bytes = input + output. Returns MMB_OK; MMB_ERR_UNSUPPORTED for a connector reading several
 * hidden states without its tower; the statuses of mmb_model_encode / mmb_model_connect; MMB_ERR_ARG (NULL,
 * grid, width or reps out of range); MMB_ERR_NOMEM. *out is untouched on failure. */
MMB_API mmb_status mmb_model_measure(mmb_ctx *ctx, const mmb_model *m, int64_t grid, int64_t width, int reps,
                                     mmb_connector_report *out);

/* Returns the number of registered connector names, and sets *names to a static array of them. */
MMB_API int mmb_connector_names(const char *const **names);

/* The Dense Connector (Yao et al., NeurIPS 2024) on top of a model's projector. Indices are HF
 * hidden_states indices (the paper's layer l is hidden_states[l - 1]); negative count from the end. */
typedef enum mmb_dense_type {
    MMB_DENSE_NONE = 0,
    MMB_DENSE_STI = 1,   /* final tokens, then each shallow layer AvgPool1d(pool, pool) over the tokens */
    MMB_DENSE_SCI = 2,   /* [final | layer a | layer b ...] on channels */
    MMB_DENSE_DCI = 3    /* [final | mean of group 1 | mean of group 2 ...] on channels */
} mmb_dense_type;

typedef struct mmb_dense_params {
    mmb_dense_type type;
    int use_final;              /* 1: final_layer is the final feature; 0: the model's select layer */
    int final_layer;
    int n_layers;               /* STI/SCI shallow layers; 0 = the reference's 7 and 15 */
    int layers[MMB_MAX_TAPS];
    int n_groups;               /* DCI groups, inclusive ranges; 0 = the reference's two halves */
    int group_first[MMB_MAX_TAPS], group_last[MMB_MAX_TAPS];
    int pool;                   /* STI AvgPool1d kernel = stride; 0 = 8 */
    int64_t tokens;             /* Efficient DC: bilinear-resize the projected token grid to this
                                   many tokens (a square); 0 = keep them all */
} mmb_dense_params;

/* Returns the parameters of the model's own Dense Connector (all zero, type MMB_DENSE_NONE, for a
 * model without one). */
MMB_API mmb_dense_params mmb_model_dense(const mmb_model *m);

/* Puts a Dense Connector (p->type != MMB_DENSE_NONE) in front of the model's projector, replacing
 * the one the checkpoint configured, or removes it (MMB_DENSE_NONE). The projector's input width
 * must be the vision width times the features concatenated on channels (1 for STI, 1 + layers for
 * SCI, 1 + groups for DCI). Returns MMB_OK; MMB_ERR_SHAPE when the widths disagree (the message
 * names both); MMB_ERR_ARG for bad parameters (the message says which); MMB_ERR_NOMEM. The model
 * is unchanged on failure. */
MMB_API mmb_status mmb_model_set_dense(mmb_ctx *ctx, mmb_model *m, const mmb_dense_params *p);

/* ---------------------------------------------------------------------------------------------
 * GGUF files (llama.cpp's format, versions 2 and 3), read-only and memory-mapped. The whole header is validated
 * by mmb_gguf_open before anything is handed out: every string length, array count, dimension, type and offset
 * against the bytes that remain, with overflow-safe arithmetic; unique keys and tensor names; general.alignment a
 * power of two; each tensor inside the data section, aligned, not overlapping another.
 */
typedef struct mmb_gguf mmb_gguf;

/* GGUF's value types (the numbers are the file's). */
typedef enum mmb_gguf_type {
    MMB_GGUF_UINT8 = 0, MMB_GGUF_INT8 = 1, MMB_GGUF_UINT16 = 2, MMB_GGUF_INT16 = 3, MMB_GGUF_UINT32 = 4,
    MMB_GGUF_INT32 = 5, MMB_GGUF_FLOAT32 = 6, MMB_GGUF_BOOL = 7, MMB_GGUF_STRING = 8, MMB_GGUF_ARRAY = 9,
    MMB_GGUF_UINT64 = 10, MMB_GGUF_INT64 = 11, MMB_GGUF_FLOAT64 = 12
} mmb_gguf_type;

/* A tensor of the file: a view into the map, valid until mmb_gguf_close. */
typedef struct mmb_gguf_tensor {
    const char *name;
    int ggml_type;              /* ggml's type number: 0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0,
                                   10 Q2_K, 11 Q3_K, 12 Q4_K, 13 Q5_K, 14 Q6_K, 30 BF16, ... (mmb_ggml_type_name) */
    int ndim;                   /* 1..4 */
    int64_t shape[4];           /* row-major, outermost first: GGUF's ne[] reversed (ne[0], the row, is last) */
    const void *data;           /* nbytes of ggml blocks */
    size_t nbytes;
} mmb_gguf_tensor;

/* Opens and validates `path`. Returns MMB_OK and sets *out; MMB_ERR_IO (cannot open, map; not a regular file),
 * MMB_ERR_FORMAT (no GGUF magic, truncated, a count or length the file cannot hold, an unknown value or ggml type,
 * a row not a multiple of its type's block, a tensor outside the data section or misaligned or overlapping, a
 * duplicate key or name, arrays nested deeper than 8), MMB_ERR_UNSUPPORTED (another version), MMB_ERR_ARG,
 * MMB_ERR_NOMEM; messages name the file and the key or tensor. Free with mmb_gguf_close. */
MMB_API mmb_status mmb_gguf_open(mmb_ctx *ctx, const char *path, mmb_gguf **out);
MMB_API void mmb_gguf_close(mmb_gguf *g); /* NULL is a no-op; the file's views become invalid */

/* The file's version (2 or 3), its keys and tensors (0 for NULL). */
MMB_API int mmb_gguf_version(const mmb_gguf *g);
MMB_API int64_t mmb_gguf_kv_count(const mmb_gguf *g);
MMB_API int64_t mmb_gguf_tensor_count(const mmb_gguf *g);

/* Key i's name (NULL out of range); the index of `key`, or -1. */
MMB_API const char *mmb_gguf_key(const mmb_gguf *g, int64_t i);
MMB_API int64_t mmb_gguf_find_key(const mmb_gguf *g, const char *key);

/* Key i's type (-1 out of range); *elem (may be NULL) its element type (an array's, or the scalar's own) and *n
 * (may be NULL) its element count (1 for a scalar). */
MMB_API mmb_gguf_type mmb_gguf_kv_type(const mmb_gguf *g, int64_t i, mmb_gguf_type *elem, int64_t *n);

/* Element k of key i (k 0 for a scalar; arrays of arrays have no elements here): as an integer (any integer or
 * bool type; a UINT64 above INT64_MAX fails), as a double (any number), or as a string (its bytes in the map, not
 * NUL-terminated, *len of them). The number getters return 1, or 0 with *out untouched for another type or k out of
 * range; the string getter NULL. */
MMB_API int mmb_gguf_get_int(const mmb_gguf *g, int64_t i, int64_t k, int64_t *out);
MMB_API int mmb_gguf_get_float(const mmb_gguf *g, int64_t i, int64_t k, double *out);
MMB_API const char *mmb_gguf_get_str(const mmb_gguf *g, int64_t i, int64_t k, size_t *len);

/* Tensor i in file order (NULL out of range); the tensor called `name`, or NULL. */
MMB_API const mmb_gguf_tensor *mmb_gguf_tensor_at(const mmb_gguf *g, int64_t i);
MMB_API const mmb_gguf_tensor *mmb_gguf_find_tensor(const mmb_gguf *g, const char *name);

/* A tensor's element count; ggml's name of a type ("Q4_K"; "?" for an unknown number, static). */
MMB_API int64_t mmb_gguf_numel(const mmb_gguf_tensor *t);
MMB_API const char *mmb_ggml_type_name(int ggml_type);

/* Writes the tensor's mmb_gguf_numel(t) elements as f32 to out (count floats), as ggml's dequantize_row_* computes
 * them (in f32): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q4_K, Q5_K, Q6_K. Returns MMB_OK;
 * MMB_ERR_UNSUPPORTED for another type; MMB_ERR_SHAPE when count is too small; MMB_ERR_ARG for NULL. */
MMB_API mmb_status mmb_gguf_dequantize(mmb_ctx *ctx, const mmb_gguf_tensor *t, float *out, size_t count);

/* ---------------------------------------------------------------------------------------------
 * Images: decoding to 8-bit RGB, and the Hugging Face image processors' preprocessing
 * (docs/preprocessing.md gives the semantics and the measured fidelity).
 */
/* A decoded image: height rows of width RGB pixels, 8 bits per channel, row-major (HWC). */
typedef struct mmb_image {
    int width, height;
    unsigned char *rgb;    /* height * width * 3 bytes; owned, freed by mmb_image_free */
} mmb_image;

/* Pixel limit used when a decoder is given max_pixels = 0: Pillow's DecompressionBombError
 * threshold, 2 * 89478485 pixels. */
#define MMB_IMAGE_DEFAULT_MAX_PIXELS ((int64_t)178956970)

/* Decodes the JPEG, PNG or WebP file at `path` (format detected from the magic bytes, not the
 * extension) to RGB exactly as transformers receives it: Pillow's Image.open, then transformers'
 * convert_to_rgb, i.e. grey / palette / 16-bit data converted as Pillow's convert("RGB") does, and
 * images with transparency (alpha channel, or tRNS) composited onto white. EXIF orientation is
 * ignored, as transformers ignores it. max_pixels (0 = MMB_IMAGE_DEFAULT_MAX_PIXELS) is checked
 * against the header before anything is allocated. Returns MMB_OK and fills *out (free it with
 * mmb_image_free); MMB_ERR_IO (cannot open or read, a directory, not a regular file);
 * MMB_ERR_FORMAT (empty, not an image, corrupt or truncated data); MMB_ERR_UNSUPPORTED (GIF, BMP,
 * TIFF and other formats, CMYK/YCCK JPEG, animated WebP, more pixels than max_pixels);
 * MMB_ERR_NOMEM; MMB_ERR_ARG (NULL path or out, negative max_pixels). Messages start with the
 * path. *out is untouched on failure. */
MMB_API mmb_status mmb_image_load(mmb_ctx *ctx, const char *path, int64_t max_pixels, mmb_image *out);

/* As mmb_image_load, from the `n` bytes at `bytes` (not kept); `name` (may be NULL) is what the
 * error messages call them. */
MMB_API mmb_status mmb_image_decode(mmb_ctx *ctx, const void *bytes, size_t n, const char *name,
                                    int64_t max_pixels, mmb_image *out);

/* Frees img->rgb and zeroes *img. NULL is a no-op. */
MMB_API void mmb_image_free(mmb_image *img);

/* How `size` of preprocessor_config.json asks to resize. */
typedef enum mmb_size_mode {
    MMB_SIZE_HEIGHT_WIDTH = 0,  /* {"height", "width"}: exactly size_height x size_width */
    MMB_SIZE_SHORTEST_EDGE = 1, /* {"shortest_edge"}: short side -> shortest_edge, long side int()-truncated */
    MMB_SIZE_SHORTEST_LONGEST = 2, /* {"shortest_edge", "longest_edge"}: as transformers'
                                      get_size_with_aspect_ratio */
    MMB_SIZE_MAX_HEIGHT_WIDTH = 3, /* {"max_height", "max_width"}: fit inside, keeping aspect */
    MMB_SIZE_SMART = 4,            /* Qwen2-VL's smart_resize: both sides multiples of resize_factor, the
                                      aspect kept as closely as possible, min_pixels <= H * W <= max_pixels */
    MMB_SIZE_TILES = 5,            /* Mllama's tiling (MllamaImageProcessor): a canvas of rows x cols tiles of
                                      tile_size, rows * cols <= max_image_tiles, chosen as get_optimal_tiled_canvas
                                      does; the image resized into it keeping its aspect
                                      (get_image_size_fit_to_canvas), then zero-padded at the bottom and right */
    MMB_SIZE_ANYRES = 6            /* LLaVA-NeXT / LLaVA-OneVision AnyRes (LlavaNextImageProcessor,
                                      LlavaOnevisionImageProcessor): the base image resized to tile_size x
                                      tile_size, then the image resized keeping its aspect into the best of
                                      image_grid_pinpoints (select_best_resolution, get_patch_output_size), zeros
                                      padded around it (centred) and split into tiles of tile_size */
} mmb_size_mode;

/* The most image_grid_pinpoints an AnyRes processor may list (OneVision's: 36). */
#define MMB_MAX_PINPOINTS 64

/* Resampling filters, numbered as PIL.Image.Resampling. */
typedef enum mmb_resample {
    MMB_RESAMPLE_NEAREST = 0,   /* refused with MMB_ERR_UNSUPPORTED */
    MMB_RESAMPLE_LANCZOS = 1,
    MMB_RESAMPLE_BILINEAR = 2,
    MMB_RESAMPLE_BICUBIC = 3,
    MMB_RESAMPLE_BOX = 4,
    MMB_RESAMPLE_HAMMING = 5
} mmb_resample;

/* An image processor's settings: the fields of transformers' CLIP / SigLIP / LLaVA image
 * processors that change the pixels. Steps run in this order: pad to square, resize, center crop,
 * rescale, normalize; the output is f32 [3, H, W].
 * MMB_SIZE_TILES (MllamaImageProcessor) instead: choose the canvas, resize into it, pad with zeros at the
 * bottom and right, rescale, normalize, split into tiles; the output is the canvas's rows * cols tiles one
 * after another, row-major over the canvas, each [3, tile_size, tile_size]: f32 [rows * cols, 3, tile_size,
 * tile_size] (transformers' pixel_values[0, image, :rows * cols]), and mmb_preprocess_output_size gives
 * H = rows * tile_size, W = cols * tile_size (3 * H * W floats), from which rows and cols follow.
 * MMB_SIZE_ANYRES: the base image then the tiles of the padded best resolution (row-major), each [3, tile_size,
 * tile_size], as pixel_values[i, :1 + tiles]: mmb_preprocess_output_size gives H = (1 + tiles) * tile_size,
 * W = tile_size (3 * H * W floats). The model's unpadding needs the image's own size besides. */
typedef struct mmb_preprocess {
    char type[64];            /* "CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor",
                                 "Qwen2VLImageProcessor" */
    int do_convert_rgb;       /* informational: mmb_image is always RGB */
    int do_pad;               /* LLaVA: pad to a square of the long side, image centred, before resizing */
    unsigned char pad_color[3]; /* its background: int(image_mean[c] * 255), 0 without a mean */
    int do_resize;
    mmb_size_mode size_mode;
    int size_height, size_width;       /* MMB_SIZE_HEIGHT_WIDTH, MMB_SIZE_MAX_HEIGHT_WIDTH */
    int shortest_edge, longest_edge;   /* MMB_SIZE_SHORTEST_EDGE, MMB_SIZE_SHORTEST_LONGEST */
    mmb_resample resample;
    int do_center_crop;
    int crop_height, crop_width;       /* zero-padded when the image is smaller, as transformers */
    int do_rescale;
    double rescale_factor;             /* usually 1/255 */
    int do_normalize;
    double image_mean[3], image_std[3];/* applied in float32: (x - mean) / std */
    int min_pixels, max_pixels;        /* MMB_SIZE_SMART: size {shortest_edge, longest_edge} or the
                                          min_pixels / max_pixels keys (Qwen2VLImageProcessor) */
    int resize_factor;                 /* MMB_SIZE_SMART: patch_size * merge_size (28) */
    int max_image_tiles;               /* MMB_SIZE_TILES: at most this many tiles an image (Mllama: 4) */
    int tile_size;                     /* MMB_SIZE_TILES: a tile's side, size {height, width} (square; Mllama
                                          560), also in size_height and size_width; MMB_SIZE_ANYRES: the
                                          processor's patch_size (crop_size height, else size's) */
    int n_pinpoints;                   /* MMB_SIZE_ANYRES: image_grid_pinpoints, (height, width) each, every side
                                          a positive multiple of tile_size */
    int pinpoints[MMB_MAX_PINPOINTS][2];
} mmb_preprocess;

/* Fills *out with the defaults of the transformers image processor class `type`
 * ("CLIPImageProcessor", "SiglipImageProcessor", "LlavaImageProcessor", "BlipImageProcessor",
 * "Qwen2VLImageProcessor", "IdeficsImageProcessor", "MllamaImageProcessor", "LlavaNextImageProcessor" or
 * "LlavaOnevisionImageProcessor" (MMB_SIZE_ANYRES with the class's pinpoints and tile; Emu3, Chameleon and Janus'
 * too); a "Fast" or "Pil" suffix is accepted). Returns MMB_OK, MMB_ERR_UNSUPPORTED for another class, or
 * MMB_ERR_ARG for NULL. */
MMB_API mmb_status mmb_preprocess_init(mmb_ctx *ctx, const char *type, mmb_preprocess *out);

/* Reads `model_dir`/preprocessor_config.json, or without one the image processor that transformers 5's
 * processor save_pretrained nests in `model_dir`/processor_config.json (its "image_processor" object; the
 * top level's processor_class, e.g. "LlavaProcessor", is not read): the class from image_processor_type
 * (else processor_class, else feature_extractor_type), its defaults for absent or null keys, then the
 * file's do_resize, size (dict, int or [h, w], read as transformers' get_size_dict with the class's
 * default_to_square), resample, do_center_crop, crop_size, do_rescale, rescale_factor,
 * do_normalize, image_mean, image_std (a number or 3 numbers), do_pad, do_convert_rgb; for
 * Qwen2VLImageProcessor size {shortest_edge, longest_edge} as min / max pixels, overridden by the
 * min_pixels and max_pixels keys, and patch_size * merge_size as the resize factor; for
 * MllamaImageProcessor size {height, width} (equal: the tile size) and max_image_tiles (MMB_SIZE_TILES;
 * do_pad and do_resize false, which its class refuses too, are MMB_ERR_UNSUPPORTED); for
 * LlavaNextImageProcessor and LlavaOnevisionImageProcessor image_grid_pinpoints (MMB_SIZE_ANYRES; a side that is
 * not a multiple of the tile is MMB_ERR_FORMAT, a size or crop that would resize a tile MMB_ERR_UNSUPPORTED).
 * Returns MMB_OK and fills *out; MMB_ERR_IO (neither file); MMB_ERR_FORMAT (bad JSON, a key of the
 * wrong type or value, naming the file and the key); MMB_ERR_MISSING (no class key, do_center_crop
 * without crop_size, or a processor_config.json without an "image_processor" object);
 * MMB_ERR_UNSUPPORTED (another processor class, a size mode or resample filter not implemented);
 * MMB_ERR_ARG for NULL. *out untouched on failure. */
MMB_API mmb_status mmb_preprocess_load(mmb_ctx *ctx, const char *model_dir, mmb_preprocess *out);

/* Sets *out_height, *out_width to the size of the tensor mmb_preprocess_run makes from an image of
 * in_height x in_width (it depends on the image only when there is no center crop; MMB_SIZE_TILES: the
 * canvas, rows * tile_size x cols * tile_size, whose tiles run writes one after another). Returns
 * MMB_OK; MMB_ERR_SHAPE when a resulting side would be < 1 or > INT32_MAX; MMB_ERR_UNSUPPORTED for
 * a resample filter or size mode that run refuses; MMB_ERR_ARG for NULL or non-positive sizes. */
MMB_API mmb_status mmb_preprocess_output_size(mmb_ctx *ctx, const mmb_preprocess *p, int in_height,
                                              int in_width, int *out_height, int *out_width);

/* Runs the processor on `img`: writes pixel_values [3, H, W] f32 (channels first; H, W from
 * mmb_preprocess_output_size; MMB_SIZE_TILES: the same 3 * H * W floats as [rows * cols, 3, tile_size,
 * tile_size], the tiles row-major over the canvas) to `out`, which holds `out_count` floats. Resizing is Pillow's
 * antialiased 8-bit resampling (matches Image.resize exactly for bicubic and bilinear), so the
 * result equals the transformers PIL-backend processor's. Threads: ctx's pool. Returns MMB_OK;
 * MMB_ERR_SHAPE when out_count < 3 * H * W; MMB_ERR_ARG for NULL pointers or an empty image;
 * MMB_ERR_UNSUPPORTED / MMB_ERR_SHAPE as mmb_preprocess_output_size; MMB_ERR_NOMEM. `out` is
 * untouched on failure. */
MMB_API mmb_status mmb_preprocess_run(mmb_ctx *ctx, const mmb_preprocess *p, const mmb_image *img, float *out,
                                      size_t out_count);

/* Routing statistics of a mixture-of-experts connector (mm_projector_type "moe_mlpNx_gelu"): the tokens
 * each expert received, summed over every connect / encode since the model was opened (a token counts
 * once for each of its top-k experts). Fills counts[0 .. min(E, cap)) and returns E, the number of
 * experts; 0 for NULL m or a connector that does not route. counts may be NULL (cap ignored) to ask E. */
MMB_API int mmb_model_routing_stats(const mmb_model *m, int64_t *counts, int cap);

/* ---------------------------------------------------------------------------------------------
 * The LLM: a Llama-family decoder (Llama, Vicuna, Mistral, Qwen2) as transformers runs it, with a KV
 * cache, for generation from text ids or from embeddings (type C: visual embeddings spliced into the text).
 *
 *     mmb_lm *lm; mmb_kv_cache *kv;
 *     mmb_lm_open(ctx, "dir", &lm);  mmb_lm_info li;  mmb_lm_get_info(lm, &li);
 *     mmb_kv_cache_new(ctx, lm, n_prompt + n_new, &kv);
 *     mmb_lm_embed(ctx, lm, ids, n_prompt, emb);                 // emb [n_prompt, d_model]
 *     mmb_lm_forward(ctx, lm, kv, emb, n_prompt, logits, 1);     // prefill: logits [vocab] of the last
 *     for (...) { mmb_sample(ctx, &smp, logits, li.vocab, &id); mmb_lm_embed(ctx, lm, &id, 1, emb);
 *                 mmb_lm_forward(ctx, lm, kv, emb, 1, logits, 1); }
 */
typedef struct mmb_lm mmb_lm;
typedef struct mmb_kv_cache mmb_kv_cache;

typedef struct mmb_lm_info {
    const char *arch;           /* "llama" (Llama, Vicuna), "mistral" or "qwen2": the text model's model_type */
    const char *architecture;   /* config architectures[0], e.g. "LlavaForConditionalGeneration" */
    const char *prefix;         /* where its weights are: "model.", "language_model.model.", ... */
    const char *rope_type;      /* "default", "linear", "dynamic" or "llama3" */
    int64_t vocab, d_model, layers, heads, kv_heads, head_dim, intermediate;
    int64_t embed_rows;         /* the ids the embedding takes: vocab, or more (Mllama's 8 rows past the logits,
                                   its <|image|> among them) */
    int n_replaced;             /* layers a fusion-A model replaces by its cross-attention layers (Mllama's
                                   cross_attention_layers): no self-attention, no KV cache entries of their own */
    int64_t max_positions;      /* max_position_embeddings, times the factor for linear and dynamic RoPE */
    double rope_theta, rms_eps;
    int tied;                   /* 1: the output head is the embedding matrix */
    mmb_dtype weight_dtype;     /* dtype of the embedding matrix (the others are used in their own dtypes) */
    int64_t params;             /* parameters, the embedding counted once */
    int64_t bytes_per_token;    /* weight bytes one decode step reads: every layer, the final norm and the head */
    int32_t image_token;        /* config image_token_index / image_token_id (LLaVA's <image>), -1 if none */
    int n_eos;                  /* end-of-sequence ids: generation_config.json's eos_token_id, else config's */
    int32_t eos[8];
} mmb_lm_info;

/* Opens the text model in checkpoint directory `dir`: LlamaForCausalLM, MistralForCausalLM,
 * Qwen2ForCausalLM (and the Vicuna / Llama checkpoints that use them), the language model of a
 * LlavaForConditionalGeneration (text_config; weights under model.language_model.*,
 * language_model.model.* or language_model.*, head lm_head.weight or language_model.lm_head.weight), or
 * original-layout LLaVA (LlavaLlamaForCausalLM, LlavaMistralForCausalLM, LlavaQwen...: model.layers.*).
 * Weights stay mapped in their own dtype (f32, f16, bf16) and are converted inside the products; norms and
 * biases are copied to f32. RoPE: rope_parameters (transformers 5) or rope_theta + rope_scaling, types
 * default, linear, dynamic (NTK, recomputed from the sequence length of each forward call as transformers
 * does) and llama3; others are MMB_ERR_UNSUPPORTED. Every tensor's presence, dtype and shape is checked.
 * Returns MMB_OK and sets *out; MMB_ERR_IO, MMB_ERR_FORMAT, MMB_ERR_MISSING, MMB_ERR_SHAPE,
 * MMB_ERR_UNSUPPORTED (unknown architecture, RoPE type, ...) with a message naming the file and tensor or
 * key; MMB_ERR_NOMEM; MMB_ERR_ARG. Free with mmb_lm_free. */
MMB_API mmb_status mmb_lm_open(mmb_ctx *ctx, const char *dir, mmb_lm **out);

/* Frees the model. NULL is a no-op. Caches made for it must be freed first or after, but not used after. */
MMB_API void mmb_lm_free(mmb_lm *lm);

/* Fills *out; strings belong to the model. Returns MMB_OK or MMB_ERR_ARG for NULL pointers. */
MMB_API mmb_status mmb_lm_get_info(const mmb_lm *lm, mmb_lm_info *out);

/* The embedding rows of ids[0 .. n) -> out [n, d_model] f32. Returns MMB_OK, or MMB_ERR_ARG for NULL
 * pointers, n < 1, or an id outside [0, vocab) (the message gives the id, its position and the vocab). */
MMB_API mmb_status mmb_lm_embed(mmb_ctx *ctx, const mmb_lm *lm, const int32_t *ids, int64_t n, float *out);

/* A KV cache for up to max_tokens positions of lm (f32 keys after RoPE and values, every layer: 8 * layers
 * * kv_heads * head_dim * max_tokens bytes). Returns MMB_OK and sets *out; MMB_ERR_SHAPE when max_tokens
 * exceeds the model's max_positions (the message gives both); MMB_ERR_ARG for max_tokens < 1;
 * MMB_ERR_NOMEM. Free with mmb_kv_cache_free. */
MMB_API mmb_status mmb_kv_cache_new(mmb_ctx *ctx, const mmb_lm *lm, int64_t max_tokens, mmb_kv_cache **out);

/* Frees the cache. NULL is a no-op. */
MMB_API void mmb_kv_cache_free(mmb_kv_cache *kv);

/* Empties the cache (the next forward starts at position 0). NULL is a no-op. */
MMB_API void mmb_kv_cache_reset(mmb_kv_cache *kv);

/* Positions held: the next forward's first position. 0 for NULL. */
MMB_API int64_t mmb_kv_cache_len(const mmb_kv_cache *kv);

/* Runs the decoder on n new positions given as input embeddings embeds [n, d_model] (mmb_lm_embed's rows,
 * or any rows: type C splices visual embeddings in), appending them to the cache, the first at position
 * mmb_kv_cache_len(kv). Causal attention over everything cached (a sliding window where the config sets
 * one). Long inputs run in blocks of up to 256 positions, with the same result as one block. Writes logits
 * [n, vocab] for every new position, or with last_only [vocab] for the last one only; logits may be NULL
 * to only fill the cache. Threads: ctx's pool; scratch: ctx's arena. Returns MMB_OK; MMB_ERR_SHAPE when
 * the cache cannot take n more positions (context overflow: the message gives the positions cached, n, and
 * the cache's limit), with nothing appended; MMB_ERR_ARG for NULL pointers, n < 1 or a cache made for
 * another model; MMB_ERR_NOMEM. */
MMB_API mmb_status mmb_lm_forward(mmb_ctx *ctx, const mmb_lm *lm, mmb_kv_cache *kv, const float *embeds, int64_t n,
                                  float *logits, int last_only);

/* Picks the next token from logits, as transformers' sampling does: temperature, then top-k, then top-p
 * (nucleus: the smallest set of most likely tokens whose probability reaches top_p), then a draw from the
 * renormalized distribution with a xorshift64* generator seeded by `seed` (the same seed gives the same
 * tokens on every machine). temperature <= 0 is greedy: the argmax, the lowest id on ties. */
typedef struct mmb_sampler {
    float temperature;   /* <= 0: greedy (the default) */
    int top_k;           /* <= 0: off */
    float top_p;         /* >= 1 or <= 0: off */
    uint64_t seed;
    uint64_t state;      /* the generator's state; 0 = take it from seed at the next draw */
} mmb_sampler;

/* Returns the default sampler: greedy, top_k 0, top_p 1, seed 0. */
MMB_API mmb_sampler mmb_sampler_default(void);

/* Sets *token to the next token for logits [vocab] (not modified). Returns MMB_OK; MMB_ERR_ARG for NULL
 * pointers, vocab < 1 or vocab > INT32_MAX; MMB_ERR_NOMEM (sampling needs 8 * vocab bytes). */
MMB_API mmb_status mmb_sample(mmb_ctx *ctx, mmb_sampler *s, const float *logits, int64_t vocab, int32_t *token);

/* ---------------------------------------------------------------------------------------------
 * Tokenizer: a checkpoint's tokenizer.json (Hugging Face `tokenizers` format), encoding and decoding
 * as that library does. Supported: the BPE model (merges stored as "a b" strings or [a, b] pairs,
 * byte_fallback, fuse_unk, ignore_merges, unk_token, continuing_subword_prefix / end_of_word_suffix);
 * normalizers NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Strip, Sequence; pre-tokenizers
 * Split (String or Regex pattern, every behavior, invert), ByteLevel, Metaspace, Digits, Whitespace,
 * WhitespaceSplit, Sequence; decoders ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace,
 * Sequence; post-processors TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing,
 * Sequence; added tokens with their special, normalized, lstrip, rstrip and single_word flags.
 * Everything else (WordPiece, Unigram and WordLevel models, a Precompiled normalizer, ...) is refused
 * at open with MMB_ERR_UNSUPPORTED naming the file and the component. docs/decisions.md has details.
 * A tokenizer is immutable once open and may be shared by threads.
 */
typedef struct mmb_tokenizer mmb_tokenizer;

/* Opens dir/tokenizer.json, and when present dir/tokenizer_config.json (bos_token, eos_token,
 * unk_token, pad_token, chat_template, tokenizer_class, legacy, add_prefix_space),
 * dir/special_tokens_map.json, dir/chat_template.jinja, dir/chat_template.json,
 * dir/generation_config.json and dir/config.json (bos / eos ids). As transformers 5 does, the file's
 * post-processor decides the special tokens added (add_bos_token is not read), and tokenizer_class
 * "LlamaTokenizer" replaces the file's normalizer, pre-tokenizer and decoder with the ones that class
 * builds (Metaspace, prepend_scheme "first"). Returns MMB_OK and sets *out; MMB_ERR_IO
 * (no tokenizer.json), MMB_ERR_FORMAT (malformed JSON, a merge naming an absent token, a bad regex),
 * MMB_ERR_UNSUPPORTED (a model type other than BPE, an unknown component), MMB_ERR_ARG for NULL,
 * MMB_ERR_NOMEM. Messages name the file. */
MMB_API mmb_status mmb_tokenizer_open(mmb_ctx *ctx, const char *dir, mmb_tokenizer **out);

/* Frees t. NULL is a no-op. */
MMB_API void mmb_tokenizer_free(mmb_tokenizer *t);

/* Encodes len bytes of UTF-8 text (no NUL needed; len 0 is the empty text) into token ids, as
 * tokenizers' Tokenizer.encode(text, add_special_tokens=add_special) does: added tokens split out
 * first, then normalizer, pre-tokenizer, BPE, and with add_special the post-processor's tokens (BOS
 * for Llama). *ids is malloc'd (the caller frees it; non-NULL even for zero ids), *n its length.
 * Returns MMB_OK; MMB_ERR_ARG for NULL pointers or text that is not valid UTF-8 (the message gives
 * the byte offset); MMB_ERR_NOMEM. Outputs untouched on failure. */
MMB_API mmb_status mmb_tokenizer_encode(mmb_ctx *ctx, const mmb_tokenizer *t, const char *text, size_t len,
                                        int add_special, int32_t **ids, int64_t *n);

/* Decodes n ids into UTF-8 text as tokenizers' Tokenizer.decode(ids, skip_special_tokens) does
 * (transformers' decode too: it skips clean_up_tokenization_spaces for BPE): ids the tokenizer does
 * not know are skipped, byte sequences that are not UTF-8 become U+FFFD. *text is malloc'd and
 * NUL-terminated (the caller frees it), *len its length without the NUL. Returns MMB_OK; MMB_ERR_ARG
 * for NULL pointers or n < 0; MMB_ERR_NOMEM. */
MMB_API mmb_status mmb_tokenizer_decode(mmb_ctx *ctx, const mmb_tokenizer *t, const int32_t *ids, int64_t n,
                                        int skip_special, char **text, size_t *len);

/* Streaming: decodes the growing list ids[0, n) and returns in *text (malloc'd, NUL-terminated,
 * caller frees) only the bytes past *emitted (the count already handed out; start at 0) that are
 * final: a trailing incomplete UTF-8 sequence, or a trailing run of U+FFFD that more byte tokens
 * may still complete, is held back until a later call completes it or until a call with flush != 0
 * (after the last token) hands out everything; so is the text of a trailing run of byte-fallback
 * tokens ("<0xXX>" with a ByteFallback decoder), which tokenizers decodes as a whole (one U+FFFD per
 * byte when any of the run is not UTF-8), until a token after the run ends it. Advances *emitted by *len. Printing each piece
 * prints exactly mmb_tokenizer_decode's text for the final list. Returns as mmb_tokenizer_decode. */
MMB_API mmb_status mmb_tokenizer_decode_stream(mmb_ctx *ctx, const mmb_tokenizer *t, const int32_t *ids, int64_t n,
                                               int skip_special, int flush, size_t *emitted, char **text,
                                               size_t *len);

/* The id of a token given by its exact text (an added token's content, or a vocabulary entry in
 * the model's own spelling, e.g. "Ġthe" or "▁the"); -1 if absent or NULL. */
MMB_API int32_t mmb_tokenizer_token_id(const mmb_tokenizer *t, const char *token);

/* The text of token `id` in the model's own spelling (an added token's content), owned by t; NULL
 * for an unknown id. */
MMB_API const char *mmb_tokenizer_token_text(const mmb_tokenizer *t, int32_t id);

/* 1 + the largest id of the vocabulary and the added tokens: ids in [0, size) are the ones the
 * tokenizer may produce (an id without a token in that range is skipped by decode). 0 for NULL. */
MMB_API int64_t mmb_tokenizer_vocab_size(const mmb_tokenizer *t);

/* The BOS / EOS id: tokenizer_config.json's bos_token / eos_token (else special_tokens_map.json's),
 * as transformers' tokenizer.bos_token_id; when the tokenizer names none, generation_config.json's
 * bos_token_id / eos_token_id, then config.json's (top level, then text_config); the first of a list.
 * -1 when none. */
MMB_API int32_t mmb_tokenizer_bos_id(const mmb_tokenizer *t);
MMB_API int32_t mmb_tokenizer_eos_id(const mmb_tokenizer *t);

/* Whether id is a special added token (what skip_special drops). 0 for an unknown id. */
MMB_API int mmb_tokenizer_is_special(const mmb_tokenizer *t, int32_t id);

/* The ids generation stops at, as transformers' generate() reads them: generation_config.json's
 * eos_token_id (an int or a list), else config.json's (top level, then text_config), else the
 * tokenizer's EOS. Copies up to cap of them to out (may be NULL when cap is 0) and returns how many
 * there are (0 when none). */
MMB_API int mmb_tokenizer_stop_ids(const mmb_tokenizer *t, int32_t *out, int cap);

/* ---------------------------------------------------------------------------------------------
 * Chat templates: the checkpoint's own Jinja chat template (chat_template.jinja, chat_template.json
 * or tokenizer_config.json's chat_template, in that order) rendered by a Jinja subset, byte for
 * byte as transformers' apply_chat_template(messages, tokenize=False) renders it.
 */
typedef struct mmb_chat_msg {
    const char *role;      /* "system", "user", "assistant", ... */
    const char *content;   /* UTF-8 text; images as the checkpoint's placeholder, e.g. "<image>\n..." */
} mmb_chat_msg;

/* Renders msgs[0, n) with the template, with add_generation_prompt, bos_token, eos_token, unk_token
 * and pad_token set as transformers sets them. A template that iterates a message's content as a list
 * of parts (llava-hf's processors) sees a string content as [{"type": "text", "text": content}].
 * *out is malloc'd and NUL-terminated (the caller frees it). Returns MMB_OK; MMB_ERR_MISSING when the
 * tokenizer has no chat template; MMB_ERR_UNSUPPORTED for a Jinja construct outside the subset (the
 * message names it and the line); MMB_ERR_FORMAT for a template syntax error or a runtime error
 * (raise_exception's message, an undefined attribute of an undefined value, a type error);
 * MMB_ERR_ARG for NULL pointers or n < 0; MMB_ERR_NOMEM. */
MMB_API mmb_status mmb_chat_render(mmb_ctx *ctx, const mmb_tokenizer *t, const mmb_chat_msg *msgs, int n,
                                   int add_generation_prompt, char **out);

/* As mmb_chat_render with the messages given as transformers takes them, a JSON array of objects
 * (e.g. [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]), and with
 * the template given explicitly (NULL: the tokenizer's). extra_json, when not NULL, is a JSON object
 * of further template variables (e.g. {"tools": [...]}). t may be NULL when template is given
 * (special tokens then undefined). Returns as mmb_chat_render, MMB_ERR_FORMAT for malformed JSON. */
MMB_API mmb_status mmb_chat_render_json(mmb_ctx *ctx, const mmb_tokenizer *t, const char *template_text,
                                        const char *messages_json, const char *extra_json,
                                        int add_generation_prompt, char **out);

/* ---------------------------------------------------------------------------------------------
 * VQ image tokenizers (fusion type D): an image to discrete codes and back
 * ------------------------------------------------------------------------------------------- */

/* A VQ-VAE image tokenizer: Chameleon's ChameleonVQVAE (encoder), Janus' JanusVQVAE (encoder and decoder), Emu3's
 * Emu3VQVAE (encoder and decoder), as transformers runs them, weights from a checkpoint. */
typedef struct mmb_vq mmb_vq;

typedef struct mmb_vq_info {
    const char *kind;           /* the VQ config's model_type: "chameleon_vqgan", "janus_vqgan", "emu3_vqgan" */
    int64_t codebook_size;      /* codes (num_embeddings / codebook_size) */
    int64_t embed_dim;          /* the width of one code */
    int64_t latent_channels;
    int downsample;             /* pixels per code side: 2^(levels - 1) */
    int temporal;               /* Emu3's temporal_downsample_factor (frames an image is repeated into), else 1 */
    int has_encoder, has_decoder;
    int64_t encoder_params, decoder_params; /* quant_conv and the codebook with the encoder, post_quant_conv with
                                               the decoder */
    int resolution;             /* the config's image side (Chameleon's resolution), 0 when it names none */
    int in_channels, out_channels;
} mmb_vq_info;

/* Opens the VQ tokenizer of checkpoint directory dir: a whole model's (config.json's vq_config, weights under
 * model.vqmodel.* or vqmodel.*: ChameleonForConditionalGeneration, JanusForConditionalGeneration,
 * Emu3ForConditionalGeneration) or a VQ model's own (ChameleonVQVAE, JanusVQVAE, Emu3VQVAE save_pretrained:
 * model_type *_vqgan, weights unprefixed). Every weight's presence, dtype and shape is checked (a codebook of
 * another width than embed_dim: MMB_ERR_SHAPE naming the tensor). Returns MMB_OK; MMB_ERR_UNSUPPORTED for another
 * VQ model_type or settings this build does not run (double_latent, another attn_type); MMB_ERR_IO /
 * MMB_ERR_FORMAT / MMB_ERR_MISSING / MMB_ERR_SHAPE with a message naming the file and tensor; MMB_ERR_NOMEM.
 * Free with mmb_vq_free. */
MMB_API mmb_status mmb_vq_open(mmb_ctx *ctx, const char *dir, mmb_vq **out);
/* Frees it (NULL: nothing). A VQ a multimodal model owns (mmb_mllm_vq) is freed with the model. */
MMB_API void mmb_vq_free(mmb_vq *vq);
MMB_API mmb_status mmb_vq_get_info(const mmb_vq *vq, mmb_vq_info *out);

/* pixels [n, 3, height, width] f32, as the model's image processor makes them -> codes [n, height / downsample,
 * width / downsample] (the nearest codebook entry of each latent by squared L2 distance, |z|^2 + |e|^2 - 2 z.e as
 * transformers computes it, the lowest index on ties as torch.argmin) and, when latents is not NULL, latents
 * [n, embed_dim, height / downsample, width / downsample], the quant_conv output the codes are the nearest entries
 * of. Returns MMB_OK; MMB_ERR_SHAPE for a side that is not a positive multiple of downsample; MMB_ERR_UNSUPPORTED
 * for a VQ without an encoder; MMB_ERR_ARG for NULL pointers or n < 1; MMB_ERR_IO (a mapped file truncated);
 * MMB_ERR_NOMEM. */
MMB_API mmb_status mmb_vq_encode(mmb_ctx *ctx, const mmb_vq *vq, const float *pixels, int64_t n, int height,
                                 int width, int32_t *codes, float *latents);
/* codes [n, grid_h, grid_w] -> pixels [n, out_channels, grid_h * downsample, grid_w * downsample] f32: the
 * decoder's output before the processor's postprocess (JanusVQVAE.decode, Emu3VQVAE.decode's first frame).
 * Returns MMB_OK; MMB_ERR_ARG for a code outside [0, codebook_size) (naming its position), NULL pointers or a
 * grid side < 1; MMB_ERR_SHAPE for a grid the model cannot take (Janus: its num_patches square);
 * MMB_ERR_UNSUPPORTED for a VQ without a decoder; MMB_ERR_NOMEM. */
MMB_API mmb_status mmb_vq_decode(mmb_ctx *ctx, const mmb_vq *vq, const int32_t *codes, int64_t n, int grid_h,
                                 int grid_w, float *pixels);
/* FLOPs (2 per multiply-add: the convolutions, attention and the code search) of one image of height x width
 * through the encoder (decode 0) or of its codes through the decoder (decode 1); 0 for a part the VQ lacks. */
MMB_API int64_t mmb_vq_flops(const mmb_vq *vq, int height, int width, int decode);

/* The image processor's postprocess of decoded pixels [3, height, width] (JanusImageProcessor's, Emu3's:
 * x * std + mean as normalize(-mean / std, 1 / std) in f32, then * (1 / rescale_factor) in double, clipped to
 * [0, 255] and truncated to 8 bits) into *out (mmb_image_free it). Returns MMB_OK; MMB_ERR_ARG; MMB_ERR_NOMEM. */
MMB_API mmb_status mmb_preprocess_postprocess(mmb_ctx *ctx, const mmb_preprocess *p, const float *pixels, int height,
                                              int width, mmb_image *out);
/* Writes img as an 8-bit RGB PNG to path, as every output is written (a temporary file renamed over it; a
 * FIFO, device or directory refused). Returns MMB_OK, MMB_ERR_ARG or MMB_ERR_IO with a message. */
MMB_API mmb_status mmb_image_write_png(mmb_ctx *ctx, const char *path, const mmb_image *img);

/* ---------------------------------------------------------------------------------------------
 * The multimodal model: one checkpoint directory opened through the library's family table (its
 * vision path: processor, tower, taps, connector; its fusion; its language model and tokenizer where
 * the directory has them), with the whole job from image files and a prompt to streamed text done
 * here, as llama.cpp's mtmd does it (tokenize a prompt with image markers into chunks, evaluate the
 * chunks into a KV cache, generate). Threads and the weights' compute dtype are the context's
 * (mmb_ctx_params). tests/test_mllm.c compiles and runs this example:
 *
 *     mmb_ctx *ctx; mmb_ctx_params cp = mmb_ctx_default_params();
 *     mmb_ctx_new(&cp, &ctx);
 *     mmb_mllm *m;
 *     if (mmb_mllm_open(ctx, "llava-dir", NULL, &m) != MMB_OK) { puts(mmb_ctx_error(ctx)); ... }
 *     mmb_mllm_info info;  mmb_mllm_get_info(m, &info);
 *     mmb_image img;  mmb_image_load(ctx, "cat.jpg", 0, &img);
 *     mmb_chunks *prompt;                                           // "<image>\nWhat is this?" through
 *     mmb_mllm_tokenize(ctx, m, "What is this?", &img, 1, MMB_TOKENIZE_CHAT, &prompt);   // the template
 *     mmb_kv_cache *kv;  mmb_mllm_kv_new(ctx, m, mmb_chunks_positions(prompt) + 64, &kv);
 *     mmb_gen_params gp = mmb_gen_default_params();
 *     gp.n_predict = 64;  gp.on_token = print_piece;             // streamed text pieces
 *     mmb_gen_result res;
 *     mmb_mllm_generate(ctx, m, kv, prompt, &gp, &res);           // res.stop: why it stopped
 *     mmb_chunks_free(prompt); mmb_kv_cache_free(kv); mmb_image_free(&img);
 *     mmb_mllm_free(m); mmb_ctx_free(ctx);
 */
typedef struct mmb_mllm mmb_mllm;

/* How the visual side reaches the language model (docs: ../shared/specs/fusion_types.md). */
typedef enum mmb_fusion {
    MMB_FUSION_NONE = 0, /* no language model: a vision tower alone, or a connector without its LLM */
    MMB_FUSION_A = 1,    /* gated cross-attention layers inside the LLM (Flamingo, IDEFICS, Mllama) */
    MMB_FUSION_B = 2,    /* custom layers inside the LLM (LLaMA-Adapter, CogVLM, mPLUG-Owl2) */
    MMB_FUSION_C = 3,    /* projected visual tokens spliced into the text embeddings (LLaVA) */
    MMB_FUSION_D = 4     /* discrete VQ tokens in the vocabulary (Chameleon, Emu3, Janus) */
} mmb_fusion;

/* Returns "none", "A", "B", "C" or "D" (static). */
MMB_API const char *mmb_fusion_name(mmb_fusion f);

typedef struct mmb_mllm_params {
    const char *vision_tower;   /* the CLIP/SigLIP directory of an original-layout LLaVA checkpoint, whose
                                   config only names its tower; NULL: the checkpoint's own */
    /* Dense Connector settings over the checkpoint's own: type MMB_DENSE_NONE keeps the checkpoint's
     * variant (an error for a checkpoint without one when any other field is set); each other field
     * that is non-zero replaces the checkpoint's value (layers, groups, pool, tokens). */
    mmb_dense_params dense;
    int vision_only;            /* 1: do not open the language model and tokenizer even when present */
    const char *adapter;        /* a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) of
                                   type ADAPTION_PROMPT (LLaMA-Adapter) put on the LLM (a Llama or Mistral
                                   model), or NULL */
} mmb_mllm_params;

/* Returns the default parameters: all zero (the checkpoint as it is). */
MMB_API mmb_mllm_params mmb_mllm_default_params(void);

/* Opens checkpoint directory `dir`: the family table names the row that matches its config.json
 * (architectures[0], model_type and the keys or tensors a layout is told by), which says where the
 * tower, taps, connector, processor and LLM are and which fusion joins them. Told from config.json alone:
 * a vision tower alone (architectures CLIPVisionModel, SiglipVisionModel, CLIPModel, SiglipModel or their
 * model_type: family "clip" / "siglip", fusion NONE, encode gives its last_hidden_state) and a language
 * model alone ("...ForCausalLM" without vision_config or mm_* keys: family "text", mmb_lm_open's models);
 * everything else opens through mmb_model_open. Loads the image processor (preprocessor_config.json, or
 * the image processor nested in transformers 5's processor_config.json; for an original-layout LLaVA, the
 * tower directory's; none when neither has one: encoding then fails with MMB_ERR_MISSING saying so), the
 * vision tower, connector, LLM (a LLaVA's when its weights are there; a family's LLM is not run) and
 * tokenizer (tokenizer.json; none without the file) that the directory holds, checking every weight.
 * p may be NULL (mmb_mllm_default_params). Returns MMB_OK and sets *out; MMB_ERR_UNSUPPORTED for an
 * architecture nothing reads (mmb_model_open's message), or vision_tower / dense given for a family's
 * model; MMB_ERR_ARG for them given for a tower or an LLM alone, or dense fields without a dense type on a
 * checkpoint without a Dense Connector; MMB_ERR_SHAPE when the connector's width is not the LLM's; the
 * statuses of mmb_model_open, mmb_model_set_dense, mmb_model_attach_vit, mmb_preprocess_load, mmb_lm_open
 * and mmb_tokenizer_open otherwise, with their messages. Free with mmb_mllm_free. */
MMB_API mmb_status mmb_mllm_open(mmb_ctx *ctx, const char *dir, const mmb_mllm_params *p, mmb_mllm **out);

/* Frees the model. NULL is a no-op. */
MMB_API void mmb_mllm_free(mmb_mllm *m);

typedef struct mmb_mllm_info {
    const char *dir;
    const char *family;         /* the family table row: "llava", "blip2", "idefics", "idefics2", "idefics3",
                                   "smolvlm", "qwen2_vl", "clip" / "siglip" (a vision tower alone), "text" (a
                                   language model alone), ... */
    const char *architecture;   /* config.json's architectures[0] (else its model_type) */
    mmb_fusion fusion;          /* MMB_FUSION_C for LLaVA-style splicing; NONE without an LLM */
    int has_vision, has_connector, has_lm, has_tokenizer, has_processor, has_chat_template;
    int vision_layers, vision_width;  /* the tower: blocks and width of one hidden state */
    int64_t vision_tokens;      /* tokens of one hidden state at the processor's fixed size, CLS included;
                                   0 for a family's model (its hidden states are not exposed) */
    int out_width;              /* width of an encode's output: the connector's d_model, or vision_width
                                   for a tower alone (its last_hidden_state) */
    int64_t tokens_per_image;   /* outputs per image at the processor's fixed size, 0 when it depends on
                                   the image */
    int image_size;             /* the tower's input side, 0 when it varies */
    const char *image_marker;   /* the prompt text that stands for one image ("<image>"), "" without an LLM */
    int32_t image_token;        /* its token id, -1 without one */
    int64_t context;            /* the LLM's max positions, 0 without an LLM */
    const char *processor;      /* the image processor class, "" without one */
    /* Fusion A (gated cross-attention inside the LLM), 0 otherwise: the layers, their parameters, FLOPs per
     * text position that sees one image (its projections, attention over the image's tokens_per_image
     * visual tokens, the gated MLP), and per image the visual keys and values kept (bytes, every layer) and
     * the FLOPs of computing them, once per prompt. Against fusion C, where an image costs tokens_per_image
     * positions of LLM prefill and KV cache instead. */
    int xattn_layers;
    int64_t xattn_params, xattn_flops_per_token, xattn_kv_bytes_per_image, xattn_kv_flops_per_image;
    /* Fusion B (layers of the LLM changed), 0 otherwise. expert_sets: weight sets per layer (2: CogVLM's visual
     * expert, mPLUG-Owl2's modality-adaptive module; each position runs one set, so a set adds parameters but no
     * FLOPs per position); adapter_layers / adapter_len: LLaMA-Adapter's adapted layers and prompt vectors per
     * layer (a PEFT adapter too). added_params: what the design adds over the plain LLM (the second sets' own
     * tensors; the prompts, adapter queries and gates); added_flops_per_token: per text position (the
     * prompts' attention); adapter_flops_per_image: the prompts' keys and values (per image for V2, once at load
     * for PEFT). */
    int expert_sets, adapter_layers;
    int64_t adapter_len, added_params, added_flops_per_token, adapter_flops_per_image;
    /* Fusion D (the image as ids of the LLM's vocabulary), 0 otherwise: the VQ tokenizer's codebook entries and
     * the pixels one code covers on a side; vq_encodes: it reads images (Chameleon, Emu3: tokens_per_image is the
     * ids, and the positions, an image takes at the processor's size); vq_decodes: it turns ids into pixels (the
     * model generates images: Janus, mmb_mllm_generate_image). */
    int64_t vq_codebook;
    int vq_downsample, vq_encodes, vq_decodes;
} mmb_mllm_info;

/* Fills *out; strings belong to the model. Returns MMB_OK or MMB_ERR_ARG for NULL pointers. */
MMB_API mmb_status mmb_mllm_get_info(const mmb_mllm *m, mmb_mllm_info *out);

/* The parts, owned by the model (NULL where the directory has none): for the calls documented above.
 * mmb_mllm_vit is the tower whose hidden states mmb_mllm_encode exposes: NULL for a family's model, whose
 * tower runs inside mmb_model_encode; mmb_mllm_model is NULL for a tower or an LLM alone. */
MMB_API const mmb_model *mmb_mllm_model(const mmb_mllm *m);
MMB_API const mmb_vit *mmb_mllm_vit(const mmb_mllm *m);
MMB_API const mmb_lm *mmb_mllm_lm(const mmb_mllm *m);
MMB_API const mmb_tokenizer *mmb_mllm_tokenizer(const mmb_mllm *m);
MMB_API const mmb_preprocess *mmb_mllm_processor(const mmb_mllm *m);
/* Fusion D: the model's VQ tokenizer (mmb_vq_encode / mmb_vq_decode), owned by the model; NULL otherwise. */
MMB_API const mmb_vq *mmb_mllm_vq(const mmb_mllm *m);

/* Encoding images: the processor, the tower and the connector in one pass. */
typedef struct mmb_encode_out {
    float *embeddings;          /* receives each image's outputs, the images one after another: tokens[i]
                                   rows of out_width; NULL: hidden states only */
    size_t embeddings_count;    /* floats embeddings holds */
    int64_t *tokens;            /* NULL or n_images entries: rows written per image */
    int n_taps;                 /* hidden states also wanted, from the same pass of the tower (0: none) */
    int taps[MMB_MAX_TAPS];     /* HF hidden_states indices (negative from the end), or MMB_TAP_LAST */
    float *hidden[MMB_MAX_TAPS];/* hidden[i] receives [n_images, vision_tokens, vision_width] for taps[i] */
    size_t hidden_count;        /* floats each hidden[i] holds */
} mmb_encode_out;

/* Sizes an encode of imgs[0, n): sets tokens[i] (n entries; tokens may be NULL) to the outputs image i makes
 * and returns their sum, or -1 with a message (an image the processor or the tower refuses, no vision path
 * or processor), tokens untouched. */
MMB_API int64_t mmb_mllm_encode_size(mmb_ctx *ctx, const mmb_mllm *m, const mmb_image *imgs, int n, int64_t *tokens);

/* Runs imgs[0, n) (8-bit RGB, as mmb_image_load decodes them) through the model's processor, tower,
 * feature selection and connector (a tower alone: its last_hidden_state) and writes out->embeddings,
 * plus out->taps' hidden states from the same forward pass. Images that the processor makes the same
 * size are one batch; others are encoded one by one (hidden states need one size: MMB_ERR_SHAPE
 * otherwise). Returns MMB_OK; MMB_ERR_SHAPE when a buffer is too small (the message gives the floats
 * needed) or a size the tower refuses; MMB_ERR_MISSING without a vision path or an image processor;
 * MMB_ERR_UNSUPPORTED for taps on a family's model (BLIP-2, IDEFICS, Idefics2/3, Qwen2-VL, Mllama: its tower and
 * connector run as one); MMB_ERR_ARG for NULL pointers, n < 1, a tap out of range, a NULL hidden[i], nothing
 * asked (embeddings NULL and n_taps 0), more than MMB_MAX_TAPS taps with the model's own; MMB_ERR_NOMEM.
 * The outputs are untouched on failure. */
MMB_API mmb_status mmb_mllm_encode(mmb_ctx *ctx, mmb_mllm *m, const mmb_image *imgs, int n, mmb_encode_out *out);

/* The outputs per image an encode makes of pixels of height x width (as the processor makes them), or -1
 * with a message (a size the tower refuses, no vision path). */
MMB_API int64_t mmb_mllm_pixel_tokens(mmb_ctx *ctx, const mmb_mllm *m, int height, int width);

/* As mmb_mllm_encode on pixels [n, 3, height, width] f32 that the model's processor already made (what
 * transformers' processor returns as pixel_values): the tower, feature selection and connector, and
 * out->taps from the same pass; out->tokens (n entries) all get the one count. Returns as
 * mmb_mllm_encode (MMB_ERR_SHAPE for a size the tower refuses). */
MMB_API mmb_status mmb_mllm_encode_pixels(mmb_ctx *ctx, mmb_mllm *m, const float *pixels, int n, int height,
                                          int width, mmb_encode_out *out);

/* As mmb_mllm_encode for one image decoded from the file at `path`, or from the n bytes at `bytes`
 * (JPEG, PNG, WebP: mmb_image_decode). */
MMB_API mmb_status mmb_mllm_encode_file(mmb_ctx *ctx, mmb_mllm *m, const char *path, mmb_encode_out *out);
MMB_API mmb_status mmb_mllm_encode_bytes(mmb_ctx *ctx, mmb_mllm *m, const void *bytes, size_t n,
                                         mmb_encode_out *out);

/* mmb_vit_attention on imgs[0, n) through m's image processor and tower (mmb_mllm_processor, mmb_mllm_vit):
 * out [n, layers, patches] as documented there (layers and patches from mmb_vit_get_info of mmb_mllm_vit(m)),
 * and, when pixels is not NULL, the processed pixel_values [n, 3, image_size, image_size] f32 the maps were
 * computed on (pixel_count floats; mmb_preprocess_postprocess turns one into the picture the maps lie over).
 * Returns MMB_OK; MMB_ERR_MISSING without a tower whose attention is exposed (a language model alone, or a
 * family's model, whose tower runs inside mmb_model_encode) or without an image processor; MMB_ERR_SHAPE
 * when out or pixels is too small (the message gives the floats needed) or the processor makes another size
 * than the tower takes; MMB_ERR_ARG for NULL pointers or n < 1; MMB_ERR_NOMEM. Outputs untouched on failure. */
MMB_API mmb_status mmb_mllm_attention(mmb_ctx *ctx, const mmb_mllm *m, const mmb_image *imgs, int n, float *out,
                                      size_t count, float *pixels, size_t pixel_count);

/* A prompt cut into chunks: runs of text token ids, and images (preprocessed when added, so their
 * positions are known before anything is encoded), as llama.cpp's mtmd_input_chunks. */
typedef struct mmb_chunks mmb_chunks;

typedef enum mmb_chunk_type {
    MMB_CHUNK_TEXT = 0,   /* token ids */
    MMB_CHUNK_IMAGE = 1,  /* one image: its embeddings take tokens positions */
    MMB_CHUNK_EMBED = 2   /* rows of input embeddings given by the caller */
} mmb_chunk_type;

/* mmb_mllm_tokenize flags. */
enum {
    MMB_TOKENIZE_RAW = 0,    /* the prompt tokenized verbatim, with the tokenizer's special tokens (BOS) */
    MMB_TOKENIZE_CHAT = 1    /* the prompt as one user message through the chat template, with the
                                generation prompt; tokenized without special tokens, as transformers does */
};

/* Tokenizes `prompt` (UTF-8) holding the model's image marker (mmb_mllm_info.image_marker) once per
 * image, in order; a prompt without any marker gets one per image put in front, each followed by a
 * newline. Each marker becomes an image chunk of imgs[k] (preprocessed: imgs may be freed afterwards), the
 * text between them text chunks (the ids are cut at the LLM's image token: mmb_mllm_chunks_from_ids).
 * Returns MMB_OK and sets *out; MMB_ERR_ARG when markers and images disagree in number (the message gives
 * both), for NULL pointers or flags other than the two; MMB_ERR_MISSING when the model has no LLM or
 * tokenizer (or, with MMB_TOKENIZE_CHAT, no chat template; with images, no image marker); the chat
 * template's and the processor's errors. Free with mmb_chunks_free. */
MMB_API mmb_status mmb_mllm_tokenize(mmb_ctx *ctx, const mmb_mllm *m, const char *prompt, const mmb_image *imgs,
                                     int n_images, int flags, mmb_chunks **out);

/* A conversation through the chat template (with the generation prompt), as an OpenAI-style chat request holds
 * it: msgs[0, n_msgs) in order, each message's content holding the model's image marker once per image of that
 * message; the markers of all messages together stand for imgs[0, n_images) in order (no marker is added).
 * Each marker becomes what the family's processor writes for its image, then the conversation is rendered
 * (mmb_chat_render) and tokenized as mmb_mllm_tokenize with MMB_TOKENIZE_CHAT does: one user message whose
 * content holds the markers gives the same chunks as mmb_mllm_tokenize of that content. Returns MMB_OK and
 * sets *out; MMB_ERR_ARG when markers and images disagree in number, for NULL pointers (a message's role or
 * content too) or n_msgs < 1; MMB_ERR_UNSUPPORTED for a family whose prompt is one query around its image
 * (CogVLM); otherwise as mmb_mllm_tokenize. Free with mmb_chunks_free. */
MMB_API mmb_status mmb_mllm_tokenize_chat(mmb_ctx *ctx, const mmb_mllm *m, const mmb_chat_msg *msgs, int n_msgs,
                                          const mmb_image *imgs, int n_images, mmb_chunks **out);

/* As mmb_mllm_tokenize from token ids: each id equal to the model's image token becomes an image chunk
 * of the next of imgs[0, n_images). Returns as mmb_mllm_tokenize; MMB_ERR_ARG for an id outside the
 * vocabulary. */
MMB_API mmb_status mmb_mllm_chunks_from_ids(mmb_ctx *ctx, const mmb_mllm *m, const int32_t *ids, int64_t n,
                                            const mmb_image *imgs, int n_images, mmb_chunks **out);

/* An empty list, and appending to one (ids and rows are copied; an image is preprocessed now). Return MMB_OK,
 * MMB_ERR_ARG (NULL, n < 1, an id outside the vocabulary, width other than the LLM's), MMB_ERR_MISSING
 * (a model without an LLM; an image without a vision path or processor), MMB_ERR_NOMEM; the list is
 * unchanged on failure. A list holds no reference to the model: evaluate it with the one that made it. */
MMB_API mmb_status mmb_chunks_new(mmb_ctx *ctx, mmb_chunks **out);
MMB_API mmb_status mmb_chunks_add_text(mmb_ctx *ctx, const mmb_mllm *m, mmb_chunks *c, const int32_t *ids, int64_t n);
MMB_API mmb_status mmb_chunks_add_image(mmb_ctx *ctx, const mmb_mllm *m, mmb_chunks *c, const mmb_image *img);
MMB_API mmb_status mmb_chunks_add_embeds(mmb_ctx *ctx, const mmb_mllm *m, mmb_chunks *c, const float *rows,
                                         int64_t n, int64_t width);
MMB_API void mmb_chunks_free(mmb_chunks *c);

/* The chunks held, chunk i's type, and the positions chunk i (or the whole list) takes in the KV cache.
 * 0 / MMB_CHUNK_TEXT for NULL or i out of range. */
MMB_API int mmb_chunks_count(const mmb_chunks *c);
MMB_API mmb_chunk_type mmb_chunks_type(const mmb_chunks *c, int i);
MMB_API int64_t mmb_chunk_positions(const mmb_chunks *c, int i);
MMB_API int64_t mmb_chunks_positions(const mmb_chunks *c);
/* A text chunk's ids (owned by c) and their number in *n; NULL for another type. */
MMB_API const int32_t *mmb_chunks_text(const mmb_chunks *c, int i, int64_t *n);

/* A KV cache for the model's LLM (mmb_kv_cache_new) of max_tokens positions; max_tokens < 1 or above the
 * model's context (mmb_mllm_info.context) is the whole context, so "prompt + n_predict" never fails for
 * being too long: the generation stops with MMB_STOP_CONTEXT. Returns as mmb_kv_cache_new; MMB_ERR_MISSING
 * without an LLM; MMB_ERR_ARG for NULL pointers. */
MMB_API mmb_status mmb_mllm_kv_new(mmb_ctx *ctx, const mmb_mllm *m, int64_t max_tokens, mmb_kv_cache **out);

/* Called between steps of an evaluation or a generation: `phase` is "encode" (images), "prefill" or
 * "decode"; done of total units of that phase. */
typedef void (*mmb_progress_fn)(void *user, const char *phase, int64_t done, int64_t total);

typedef struct mmb_eval_params {
    int64_t n_batch;            /* positions per decoder call (0: each chunk in one call) */
    float *logits;              /* NULL, or receives the last position's logits [vocab] (all_logits 0) or
                                   every evaluated position's [positions, vocab] (all_logits 1) */
    int all_logits;
    mmb_progress_fn on_progress;/* NULL: none */
    void *user;
    const volatile int *abort;  /* NULL, or checked between steps: non-zero stops with MMB_ERR_ABORTED (read with a
                                   relaxed atomic load: another thread raises it with __atomic_store_n) */
} mmb_eval_params;

/* Evaluates the chunks into kv, from position mmb_kv_cache_len(kv): text through the LLM's embeddings,
 * images through mmb_mllm_encode (each just before its positions), spliced in order (fusion C), each chunk in
 * decoder calls of up to n_batch positions.
 * Progress: "encode" once per image (done of the list's images), "prefill" after each decoder call (positions
 * done of the list's). Returns MMB_OK; MMB_ERR_SHAPE when kv cannot take the chunks (context overflow: the
 * message gives the positions cached, the positions asked and the limit), with nothing evaluated;
 * MMB_ERR_ABORTED when the flag was raised (kv then holds the positions evaluated so far, the message how
 * many, and all_logits' rows for them are written); MMB_ERR_MISSING without an LLM; MMB_ERR_UNSUPPORTED
 * for an image chunk on a model that splices none (fusion other than C); MMB_ERR_ARG for NULL pointers, a
 * negative n_batch, a chunk the LLM cannot take (an id outside its vocabulary, rows of another width:
 * nothing evaluated); the statuses of mmb_mllm_encode and mmb_lm_forward. */
MMB_API mmb_status mmb_mllm_eval(mmb_ctx *ctx, mmb_mllm *m, mmb_kv_cache *kv, const mmb_chunks *chunks,
                                 const mmb_eval_params *p);

/* Why a generation stopped. */
typedef enum mmb_stop {
    MMB_STOP_EOS = 0,       /* an end-of-sequence id (generation_config / config / tokenizer) */
    MMB_STOP_LENGTH = 1,    /* n_predict tokens */
    MMB_STOP_CONTEXT = 2,   /* the KV cache (the model's context) is full */
    MMB_STOP_STRING = 3,    /* a stop string appeared in the text */
    MMB_STOP_CALLBACK = 4,  /* on_token returned non-zero */
    MMB_STOP_ABORT = 5      /* the abort flag */
} mmb_stop;

/* Called with each generated token, the end-of-sequence one included: its id and the text it completes
 * (UTF-8, whole characters only; a byte token that starts a character comes with the one that ends it,
 * a run of byte-fallback tokens with the token after it: len 0 then; mmb_tokenizer_decode_stream), special
 * tokens skipped; piece "" without a tokenizer. Return non-zero to stop. */
typedef int (*mmb_token_fn)(void *user, int32_t id, const char *piece, size_t len);

typedef struct mmb_gen_params {
    int64_t n_predict;          /* tokens to generate at most (0: prefill only) */
    mmb_sampler sampler;
    int ignore_eos;             /* do not stop at the end-of-sequence ids */
    const char *const *stops;   /* stop strings (n_stops, non-empty): stop once the text holds one (the
                                   token completing it is handed out whole); need the tokenizer */
    int n_stops;
    int64_t n_batch;            /* as mmb_eval_params */
    mmb_token_fn on_token;      /* NULL: none */
    /* NULL, or called with the logits of every prompt position ([n, vocab], once after the prefill)
     * and of every decode step ([1, vocab]) */
    void (*on_logits)(void *user, const float *logits, int64_t n, int64_t vocab);
    mmb_progress_fn on_progress;
    void *user;
    const volatile int *abort;  /* as mmb_eval_params; a generation stops cleanly with MMB_STOP_ABORT */
} mmb_gen_params;

/* Returns the default: n_predict 128, greedy, the rest zero. */
MMB_API mmb_gen_params mmb_gen_default_params(void);

typedef struct mmb_gen_result {
    mmb_stop stop;
    int64_t n_prompt;           /* positions the prompt took */
    int64_t n_generated;        /* tokens generated (handed to on_token) */
    double encode_s, prefill_s, decode_s; /* wall time: images, the rest of the prompt, the decode steps */
} mmb_gen_result;

/* Evaluates `prompt` (mmb_mllm_eval) and then samples up to n_predict tokens, each fed back, streaming
 * them through on_token. Stops at the first of the mmb_stop reasons; the cache being full is one of
 * them, not an error (the last token is handed out, not fed back). With several reasons at once the first
 * of EOS, STRING, CALLBACK, LENGTH, CONTEXT is given. The abort flag is checked before each token: raised
 * during the decoding, the generation returns MMB_OK with MMB_STOP_ABORT. p NULL: mmb_gen_default_params.
 * Fills *res (res may be NULL; on MMB_ERR_ABORTED during the prompt too: MMB_STOP_ABORT and the timings so
 * far; untouched on other errors). Progress as mmb_mllm_eval, then "decode" after each token fed back (done
 * of n_predict). Returns MMB_OK; MMB_ERR_ARG for NULL pointers, an empty prompt, a negative n_predict, NULL
 * or empty stop strings; MMB_ERR_MISSING for stop strings without a tokenizer; the statuses of
 * mmb_mllm_eval (the prompt alone overflowing the cache is MMB_ERR_SHAPE) and mmb_sample. */
MMB_API mmb_status mmb_mllm_generate(mmb_ctx *ctx, mmb_mllm *m, mmb_kv_cache *kv, const mmb_chunks *prompt,
                                     const mmb_gen_params *p, mmb_gen_result *res);

/* ---- image generation (fusion D written by the LLM: Janus, Janus-Pro) ---------------------------------- */

typedef struct mmb_imagegen_params {
    /* Classifier-free guidance. Janus: scores = uncond + guidance_scale * (cond - uncond), the unconditional prompt
     * being the prompt with every id but bos and begin-of-image replaced by pad (its generate). Emu3: on the
     * log-softmax of both (UnbatchedClassifierFreeGuidanceLogitsProcessor), the unconditional prompt being
     * negative_ids. <= 0: the checkpoint's generation_config.json guidance_scale, else 5 (Janus) or 3 (Emu3's
     * example); <= 1 after that: no guidance (the conditional scores alone, one sequence). */
    float guidance_scale;
    const int32_t *negative_ids;/* Emu3: the unconditional prompt (mmb_mllm_tokenize_image_prompt of the negative
                                   text); NULL: its last id alone, as transformers' processor does without one */
    int64_t n_negative;
    int grid_h, grid_w;         /* Emu3: the codes to generate (rows, columns), as the prompt names them; the
                                   prompt's must agree. 0: the model's (Janus: its fixed grid) */
    mmb_sampler sampler;        /* how each image id is drawn from the guided scores (the default: argmax) */
    mmb_progress_fn on_progress;/* phase "image": after each image id (done, total); NULL: none */
    void *user;
    const volatile int *abort;  /* checked before each id: raised, the call returns MMB_ERR_ABORTED */
} mmb_imagegen_params;

/* Returns the default: the model's guidance, greedy, no callbacks. */
MMB_API mmb_imagegen_params mmb_imagegen_default_params(void);

typedef struct mmb_imagegen_result {
    int32_t *ids;               /* the image's codes, grid_h x grid_w row-major (n_ids) */
    int64_t n_ids;
    int grid_h, grid_w;
    float *pixels;              /* [3, height, width]: the VQ decoder's output, before the processor's postprocess */
    int height, width;
    double prefill_s, decode_s, vq_s; /* wall time: both prompts, the ids, the VQ decoder */
} mmb_imagegen_result;

/* Frees what a result holds and zeroes it (NULL: nothing). */
MMB_API void mmb_imagegen_result_free(mmb_imagegen_result *r);

/* The prompt of an image generation as the model's processor makes it: text (MMB_TOKENIZE_CHAT: rendered as the
 * user's turn with the generation prompt) followed by the begin-of-image token (JanusProcessor with
 * generation_mode "image"), or the BOS, text and "<|image start|>{grid_h}*{grid_w}<|image token|>" (Emu3Processor
 * with return_for_image_generation; a grid of 0 x 0: 90 x 90, its 518400-pixel 1:1 default), tokenized; *ids is
 * malloc'd (the caller frees it), *n its length. Returns MMB_OK; MMB_ERR_UNSUPPORTED for a model that does not
 * generate images; MMB_ERR_MISSING without a tokenizer, a chat template (CHAT) or a begin-of-image token; the
 * tokenizer's statuses. */
MMB_API mmb_status mmb_mllm_tokenize_image_prompt(mmb_ctx *ctx, const mmb_mllm *m, const char *text, int flags,
                                                  int grid_h, int grid_w, int32_t **ids, int64_t *n);

/* Generates an image from prompt ids[0, n) (mmb_mllm_tokenize_image_prompt's) as JanusForConditionalGeneration's
 * generate(generation_mode="image"): the model's n_ids image ids one by one through its generation head, under
 * classifier-free guidance, each fed back through its generation embeddings; then the VQ decoder. Both sequences
 * get KV caches of their own, made and freed here. On success *out holds the ids and the pixels (free with
 * mmb_imagegen_result_free). Returns MMB_OK; MMB_ERR_UNSUPPORTED for a model without image generation;
 * MMB_ERR_ARG for NULL pointers, an empty prompt or ids outside the vocabulary; MMB_ERR_MISSING without the pad
 * id that guidance needs; MMB_ERR_SHAPE when prompt and image exceed the context; MMB_ERR_ABORTED; MMB_ERR_NOMEM.
 * *out is untouched on failure. */
MMB_API mmb_status mmb_mllm_generate_image(mmb_ctx *ctx, mmb_mllm *m, const int32_t *ids, int64_t n,
                                           const mmb_imagegen_params *p, mmb_imagegen_result *out);

/* ---------------------------------------------------------------------------------------------------------
 * Stage-1 training: a LLaVA projector trained through the frozen tower and LLM (LLaVA's pretraining recipe).
 *
 * The data is LLaVA's pretraining JSON: a list of {"image": path, "conversations": [{"from": "human", "value":
 * "<image>\n..."}, {"from": "gpt", "value": caption}]}; each sample is LLaVA's preprocess_plain: the image's
 * tokens then caption + "\n", tokenized as tokenizer_image_token does (the tokenizer's BOS first), the loss on the
 * caption's tokens only (BOS and image positions are IGNORE_INDEX). The tower is run once per image; what the
 * projector reads (its input rows, f32) is cached in cache_dir (safetensors shards of 64 samples, written
 * atomically), and every later pass reads the cache. A step is `batch` samples in order (no shuffle; the data's
 * order), in micro-batches of micro_batch samples: the loss of a micro-batch is the mean over its target tokens,
 * and a step's gradient the mean of its micro-batches' (LLaVA's per-device means, averaged over the devices).
 * Then the gradient's global norm is clipped to max_grad_norm, and AdamW (torch.optim.AdamW: decoupled weight
 * decay, bias corrections) steps with the learning rate of transformers' get_cosine_schedule_with_warmup
 * (warm-up over ceil(warmup_ratio * steps) steps from 0, then cosine to 0; the rate of step s is the schedule at
 * s, so a step 0 with warm-up has rate 0). Master weights, moments and gradients are f32.
 */
typedef struct mmb_train_params {
    const char *model;          /* the LLaVA checkpoint directory: tower, projector (its initial weights), LLM and
                                   tokenizer (a transformers LlavaForConditionalGeneration or original LLaVA) */
    const char *vision_tower;   /* as mmb_mllm_params (original LLaVA), or NULL */
    const char *data;           /* the JSON file */
    const char *image_dir;      /* the images' paths are relative to it (LLaVA's --image_folder); NULL: the JSON
                                   file's directory */
    const char *out;            /* the output directory (created; must not hold another run's files unless resume) */
    const char *cache_dir;      /* the feature cache; NULL: out/features */
    int random_init;            /* 1: the projector starts from nn.Linear's default init (seed), not the checkpoint */
    double lr, weight_decay, warmup_ratio, beta1, beta2, eps, max_grad_norm; /* 0: the defaults below */
    int64_t batch, micro_batch; /* samples per step (256), per micro-batch (16; it divides batch) */
    int64_t epochs;             /* passes over the data (1) */
    int64_t max_steps;          /* > 0: stop after this many steps (the schedule still spans them all) */
    int64_t save_every;         /* steps between resume checkpoints (50; the last step always) */
    uint64_t seed;              /* random_init's */
    int resume;                 /* 1: continue from out/checkpoint.safetensors (its step, moments, weights) */
    int skip_bad;               /* 1: an image that cannot be read or decoded, or a sample longer than the LLM's
                                   context, is skipped and counted (out/skipped.txt); 0: it stops the run */
    /* Called after each step: step (1-based) of steps, its loss (the mean of its micro-batches' means), the rate
     * it used, the LLM's positions (image rows and text) per second over this call's steps, and the seconds
     * left at that pace. Non-zero: stop after writing a checkpoint (MMB_ERR_ABORTED). NULL: none. */
    int (*on_step)(void *user, int64_t step, int64_t steps, double loss, double lr, double tokens_per_s,
                   double eta_s);
    /* Called as the cache is made: the sample just done (1-based) of the samples. NULL: none. */
    void (*on_cache)(void *user, int64_t done, int64_t total);
    void *user;
} mmb_train_params;

/* The defaults: lr 1e-3, weight_decay 0, warmup_ratio 0.03, betas 0.9 / 0.999, eps 1e-8, max_grad_norm 1, batch
 * 256, micro_batch 16, epochs 1, save_every 50, the rest 0 / NULL. */
MMB_API mmb_train_params mmb_train_default_params(void);

typedef struct mmb_train_result {
    int64_t steps;              /* steps done (all of them, the resumed ones included) */
    int64_t samples, skipped;   /* samples in the data, and those skipped (skip_bad) */
    int64_t cached;             /* images run through the tower in this call (0 when the cache had them all) */
    double last_loss;           /* the last step's loss */
    double seconds;             /* this call's wall time */
} mmb_train_result;

/* Trains the projector of p->model on p->data and writes into p->out:
 *   mm_projector.safetensors   LLaVA's layout (model.mm_projector.* keys, as --pretrain_mm_mlp_adapter reads);
 *   hf/                        for a transformers checkpoint: a LlavaForConditionalGeneration directory (its
 *                              config, tokenizer and processor files copied, its weights with
 *                              multi_modal_projector.* replaced), which transformers and mmbridge load;
 *   checkpoint.safetensors     the resume point (weights, moments, step, data position), every save_every steps;
 *   loss.csv, loss.png         step, loss, rate; the loss curve.
 * Every file is written to a temporary name and renamed. Returns MMB_OK; MMB_ERR_ARG for bad parameters (batch
 * not a multiple of micro_batch, out holding a run without resume); MMB_ERR_UNSUPPORTED for a model whose
 * connector is not a LLaVA projector (linear, mlpNx_gelu, llava) or without an LLM, tokenizer or tower;
 * MMB_ERR_FORMAT for malformed data (the message names the sample) or a checkpoint that is not this run's;
 * MMB_ERR_IO for an unreadable image without skip_bad (naming it); MMB_ERR_SHAPE for a sample longer than the
 * context without skip_bad; MMB_ERR_NUMERIC (a NaN or infinite loss: the step is not applied, the last checkpoint
 * is kept); MMB_ERR_ABORTED; the statuses of the parts. res may be NULL. */
MMB_API mmb_status mmb_train(mmb_ctx *ctx, const mmb_train_params *p, mmb_train_result *res);

/* The family table: the number of rows, and row i's name, the architectures it matches (comma-
 * separated) and its fusion type. Returns MMB_ERR_ARG for i out of range. */
typedef struct mmb_family_desc {
    const char *name;           /* "llava", "blip2", ... */
    const char *architectures;  /* e.g. "LlavaForConditionalGeneration, LlavaLlamaForCausalLM" */
    const char *tower, *connector, *processor;
    mmb_fusion fusion;
    int has_lm;                 /* the library runs its LLM (generate) */
} mmb_family_desc;
MMB_API int mmb_family_count(void);
MMB_API mmb_status mmb_family_get(int i, mmb_family_desc *out);


/* ---------------------------------------------------------------------------------------------------------
 * Feature extraction at scale: manifests (path lists, JSON lines, webdataset tar shards read in place), the
 * deterministic split of their inputs into fixed-size shards, pooling what is stored per image, and .npy files.
 * `mmbridge encode --manifest` is a thin layer over these (docs/decisions.md "Sharded extraction").
 */
typedef struct mmb_manifest mmb_manifest;

/* One input of a manifest. The strings belong to the manifest. */
typedef struct mmb_input {
    const char *name;    /* what outputs call it: the path as listed, the JSON line's "path" or "url", or
                            "TAR#MEMBER" for a webdataset member (TAR as the manifest names it) */
    const char *path;    /* the file to read: the image itself, or the tar holding it; NULL for a URL */
    const char *url;     /* a JSON line's "url" (not fetched: mmb_manifest_read refuses it), else NULL */
    int64_t index;       /* its position in the manifest, from 0 */
    int64_t offset;      /* in a tar: the member's data offset; else 0 */
    int64_t size;        /* in a tar: the member's size in bytes; else -1 (the whole file) */
} mmb_input;

/* Flags of mmb_manifest_open. */
#define MMB_MANIFEST_SKIP_BAD 1  /* a tar whose header is garbled or truncated is cut there (its members before
                                    it kept) and the problem kept as a warning, instead of failing */

/* Opens the manifest at `path`, told by its name and contents:
 *   a `.tar` file                  a webdataset shard: members grouped by key (the member path up to the first
 *                                  '.' of its base name, as webdataset's __key__), one input per key that has an
 *                                  image member (extension jpg, jpeg, png or webp; the first one in tar order);
 *   a file whose first non-blank   JSON lines: one object a line with "path" (relative to the manifest's directory
 *   character is '{'               unless absolute) or "url"; blank lines skipped;
 *   any other file                 one path a line (relative to the manifest's directory unless absolute), blank
 *                                  lines skipped; a listed path ending in `.tar` is a webdataset shard, expanded in
 *                                  place.
 * Tar headers are validated as untrusted input: each block's checksum, every numeric field (octal, or GNU base-256
 * where non-negative and in range), the member's size and offset inside the file (overflow-checked), the name
 * (NUL-terminated, with the ustar prefix, PAX `path` records and GNU long names); regular files are inputs,
 * directories, links and other types are skipped; the archive ends at two zero blocks or at the end of the file.
 * Returns MMB_OK; MMB_ERR_IO (unreadable); MMB_ERR_FORMAT (a bad JSON line, a line without "path" or "url", a
 * garbled or truncated tar header, with the file, line or byte offset; unless flags has MMB_MANIFEST_SKIP_BAD for
 * tars); MMB_ERR_MISSING (no input at all); MMB_ERR_ARG; MMB_ERR_NOMEM. */
MMB_API mmb_status mmb_manifest_open(mmb_ctx *ctx, const char *path, int flags, mmb_manifest **out);

/* As mmb_manifest_open on a tar held in memory (n bytes at data, not kept; the inputs' path is `name`): what the
 * fuzzer drives. */
MMB_API mmb_status mmb_manifest_from_tar(mmb_ctx *ctx, const void *data, size_t n, const char *name, int flags,
                                         mmb_manifest **out);

MMB_API void mmb_manifest_free(mmb_manifest *m);
/* The number of inputs (>= 1), and input i (0 <= i < count; MMB_ERR_ARG otherwise). */
MMB_API int64_t mmb_manifest_count(const mmb_manifest *m);
MMB_API mmb_status mmb_manifest_get(const mmb_manifest *m, int64_t i, mmb_input *out);
/* The problems MMB_MANIFEST_SKIP_BAD kept (a garbled tar cut short): their number, and the message of the i-th
 * (NULL out of range). */
MMB_API int mmb_manifest_warnings(const mmb_manifest *m);
MMB_API const char *mmb_manifest_warning(const mmb_manifest *m, int i);

/* Reads input i's encoded bytes into *bytes (malloc'd, the caller frees it) and *n: the file, or the tar member
 * (read at its offset, checked against the file's current size). Returns MMB_OK; MMB_ERR_IO (unreadable, a tar
 * that shrank); MMB_ERR_UNSUPPORTED (a URL: mmbridge does not download; img2dataset does); MMB_ERR_ARG;
 * MMB_ERR_NOMEM. Messages start with the input's name. */
MMB_API mmb_status mmb_manifest_read(mmb_ctx *ctx, const mmb_manifest *m, int64_t i, void **bytes, size_t *n);

/* The split: n_inputs in shards of shard_size consecutive inputs in manifest order, shard k holding
 * [k * shard_size, min((k + 1) * shard_size, n_inputs)). Returns the number of shards (>= 0), or -1 for
 * n_inputs < 0 or shard_size < 1. mmb_shard_range gives shard k's [*begin, *end); MMB_ERR_ARG for k out of range.
 * `--shard K/N` takes the shards whose index % N == K (mmb_shard_mine). */
MMB_API int64_t mmb_shard_count(int64_t n_inputs, int64_t shard_size);
MMB_API mmb_status mmb_shard_range(int64_t n_inputs, int64_t shard_size, int64_t k, int64_t *begin, int64_t *end);
MMB_API int mmb_shard_mine(int64_t k, int64_t part, int64_t n_parts);

/* What is stored per image. */
typedef enum mmb_pooling {
    MMB_POOL_NONE = 0,  /* all tokens: [tokens, width] */
    MMB_POOL_MEAN = 1,  /* the mean over the tokens: [width] (summed in double, in token order) */
    MMB_POOL_CLS = 2    /* the first token (CLIP's CLS; a connector's first output): [width] */
} mmb_pooling;

/* Pools x [n, tokens, width] into out: [n, width] for MEAN and CLS, a copy of x for NONE (out may equal x, and
 * for MEAN and CLS out may alias x's start). out_count floats must fit. Returns MMB_OK; MMB_ERR_ARG (NULL pointers,
 * n, tokens or width < 1, an unknown mode); MMB_ERR_SHAPE (out_count too small). */
MMB_API mmb_status mmb_pool_tokens(mmb_ctx *ctx, mmb_pooling mode, const float *x, int64_t n, int64_t tokens,
                                   int64_t width, float *out, size_t out_count);

/* Writes data (ndim dims of shape, f32) as a NumPy .npy file, format version 1.0, dtype '<f4', C order, as
 * mmb_file_write writes files (atomically). Returns MMB_OK; MMB_ERR_ARG (ndim not in [1, 8], a negative dim,
 * NULL data with elements); MMB_ERR_IO; MMB_ERR_NOMEM. */
MMB_API mmb_status mmb_npy_write(mmb_ctx *ctx, const char *path, const float *data, int ndim, const int64_t *shape);

#ifdef __cplusplus
}
#endif
#endif
