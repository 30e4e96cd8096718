/* The connectors layer: one file per connector, each described by its ops table, and the registry. Uses the vision layer and below. */
#ifndef MMB_CONNECTORS_H
#define MMB_CONNECTORS_H

#include "vision/vision.h"

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
    const char *name;                                /* what mmb_model_info.connector reports */
    /* The names checkpoints give it (mm_projector_type, ...), NULL-terminated; a pattern such as
     * "mlpNx_gelu" stands for the names `accepts` takes. mmb_connector_names lists them. */
    const char *const *names;
    /* Optional: does this connector build `type`? NULL: `type` is one of `names`. */
    bool (*accepts)(const char *type);
    /* Optional: the activation the loaded connector applies, as mmb_model_info.activation reports it:
     * "gelu", "silu", "gelu, hardswish", ... or "" for none. NULL: it applies none. Read it through
     * mmb__connector_activation. */
    const char *(*activation)(const void *state);
    /* Optional: config.json keys a synthetic checkpoint (mmb_connector_measure) adds to the LLaVA ones, for
     * keys a real checkpoint's config has or its tensors imply: the original papers' defaults, as a JSON
     * object in which "%W" stands for the vision width and "%T" for the patch tokens. NULL: none. */
    const char *synth_config;
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
    /* Optional, with needs (training): the rows the connector's projector reads, from bufs as forward_taps
     * takes them, into *x (malloc'd, batch * *rows rows of the projector's input width; the caller frees it).
     * MMB_ERR_UNSUPPORTED when the projector's output is transformed further. NULL: not trainable. */
    mmb_status (*projector_input)(mmb_ctx *ctx, const void *state, const float *const *bufs, int64_t batch,
                                  int64_t tokens, int64_t width, float **x, int64_t *rows);
    /* Optional; NULL for connectors that do not route. Tokens each expert received, summed over every
     * forward since load: fills counts[0 .. min(E, cap)) and returns E. */
    int (*routing)(const void *state, int64_t *counts, int cap);
} mmb_connector_ops;

/* Returns the registered connector that builds `type` (registry.c's list), or NULL. */
const mmb_connector_ops *mmb__connector_find(const char *type);
/* The activation the connector state (of ops) applies: ops->activation's, or "" without one. */
const char *mmb__connector_activation(const mmb_connector_ops *ops, const void *state);

/* ---- connectors/dense.c ------------------------------------------------------------------------ */

/* Features p concatenates on channels: 1 for STI, 1 + layers for SCI, 1 + groups for DCI. */
int mmb__dense_mult(const mmb_dense_params *p);
/* The registry name of p's variant: "dense_sti", "dense_sci", "dense_dci". */
const char *mmb__dense_name(mmb_dense_type t);

/* ---- connectors a family builds from its own config (not registered under a projector type) ------ */

/* The PatchMerger: cfg->prefix ("visual.merger."), in_width D (one patch), out_width, eps; forward takes
 * x (batch, tokens, D) with each m^2 consecutive tokens one merge window. Not in the registry. */
extern const mmb_connector_ops mmb__conn_patch_merger;
/* The connectors of the families whose tower is a ViT (src/models/vit_family.c): each reads what it needs
 * beyond cfg's prefix, in_width (the tower's) and out_width (text_config.hidden_size) from the family's config:
 * mmb__conn_idefics2 = Idefics2Connector (SwiGLU modality_projection + perceiver resampler),
 * mmb__conn_pixel_shuffle = Idefics3Connector (pixel shuffle + modality_projection.proj),
 * mmb__conn_qformer = BLIP-2's Q-Former + language_projection (its own text width: OPT's, T5's d_model),
 * mmb__conn_idefics_perceiver = IdeficsPerceiverResampler (perceiver_config; out width = in width). */
extern const mmb_connector_ops mmb__conn_idefics2, mmb__conn_pixel_shuffle, mmb__conn_qformer,
    mmb__conn_idefics_perceiver;
/* Gemma3MultiModalProjector (connectors/gemma3_proj.c): AvgPool2d to mm_tokens_per_image, Gemma RMSNorm, then
 * x @ mm_input_projection_weight. */
extern const mmb_connector_ops mmb__conn_gemma3_proj;
/* PaliGemmaMultiModalProjector (connectors/paligemma_proj.c): one Linear with bias, {prefix}linear.*. */
extern const mmb_connector_ops mmb__conn_paligemma_proj;

/* OpenFlamingo's PerceiverResampler (connectors/perceiver.c) with its settings given by the family (the
 * open_flamingo checkpoint's "perceiver" section) rather than read from the LLaVA path's mm_perceiver_*
 * keys and the tensors: weights {prefix}latents [num_latents, dim], {prefix}layers.{i}.0.{norm_media,
 * norm_latents,to_q,to_kv,to_out}, {prefix}layers.{i}.1.{0,1,3}, {prefix}norm, each checked for presence and
 * shape; optional {prefix}frame_embs / media_time_embs add their row 0 (one frame, one media). The state runs
 * through mmb__conn_flamingo_perceiver's ops (forward, out_tokens, cost, scratch, free): out (batch,
 * num_latents, dim) from x (batch, tokens, dim). */
typedef struct mmb__perceiver_cfg {
    int64_t dim, depth, heads, dim_head, num_latents, ff_mult;
} mmb__perceiver_cfg;
extern const mmb_connector_ops mmb__conn_flamingo_perceiver;
mmb_status mmb__flamingo_perceiver_load(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix,
                                        const mmb__perceiver_cfg *cfg, void **out);

/* ---- training (stage 1): trainable connectors ---------------------------------------------------------- */

/* One trainable parameter: its checkpoint key, shape, the f32 master weight and its gradient (numel each). */
typedef struct mmb__tparam {
    char name[192];
    int ndim;
    int64_t shape[2];
    int64_t numel;
    float *w, *g;
} mmb__tparam;

/* A trainable connector: the same network on mutable f32 master weights, with a forward that keeps what its
 * backward needs. connectors/mlp.c (mmb__train_mlp: "linear", "mlpNx_gelu", "llava" with its activation) and
 * connectors/resmlp.c (mmb__train_resmlp: "simple_res"). */
typedef struct mmb__trainable_ops {
    const char *name;
    bool (*accepts)(const char *type);
    /* The connector cfg names (type, prefix, in_width, out_width, act, bias, eps), its weights from c (their keys
     * as the connector's load reads them, each checked for presence and shape), or, c NULL, nn.Linear's and
     * nn.LayerNorm's default init (uniform +-1/sqrt(in) from seed; norms 1 and 0). Gradients start at 0.
     * Returns MMB_OK, the checkpoint's statuses, MMB_ERR_NOMEM. */
    mmb_status (*open)(mmb_ctx *ctx, const mmb_ckpt *c, const mmb_conn_cfg *cfg, uint64_t seed, void **out);
    void (*free)(void *t);
    /* Its parameters (owned by t; the trainer updates w in place and reads and zeroes g). Returns their number. */
    int (*params)(void *t, mmb__tparam **p);
    int64_t (*out_width)(const void *t);
    /* x (rows, in_width) -> out (rows, out_width), keeping what the backward needs (rows of activations). */
    mmb_status (*forward)(mmb_ctx *ctx, void *t, const float *x, int64_t rows, float *out);
    /* The last forward's backward for dout (rows, out_width) times scale: every parameter's g += its gradient. */
    mmb_status (*backward)(mmb_ctx *ctx, void *t, const float *dout, float scale);
} mmb__trainable_ops;
extern const mmb__trainable_ops mmb__train_mlp, mmb__train_resmlp;
/* connectors/trainable.c: a parameter's master and gradient (numel floats each, zeroed) for key `name` of shape
 * [n0, n1] ([n0] when n1 is 0); its free; its weights from c (the key, of that shape); a uniform init in
 * [-bound, bound) from the splitmix64 stream *state. Return MMB_OK, MMB_ERR_NOMEM or the checkpoint's status. */
mmb_status mmb__tparam_new(mmb_ctx *ctx, mmb__tparam *p, const char *name, int64_t n0, int64_t n1);
void mmb__tparam_free(mmb__tparam *p);
mmb_status mmb__tparam_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb__tparam *p);
void mmb__tparam_uniform(mmb__tparam *p, float bound, uint64_t *state);
/* The trainable connector that builds `type` (connectors/registry.c's list), or NULL. */
const mmb__trainable_ops *mmb__trainable_find(const char *type);

#endif
