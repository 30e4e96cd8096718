/* The lm layer: the decoder (lm/decoder.c), its KV cache and sampler, and the hooks the fusion types A and B run inside it. Uses the models layer and below. */
#ifndef MMB_LM_H
#define MMB_LM_H

#include "models/models.h"

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

/* ---- lm/decoder.c: what the hooks and the pipeline ask of the decoder ---------------------------------- */

/* The checkpoint lm was opened from (it lives as long as lm). */
const mmb_ckpt *mmb__lm_ckpt(const mmb_lm *lm);
/* Binds tensor `name` [n, k] of lm's checkpoint as a weight matrix used in its storage dtype (a realigned
 * copy, owned by lm, when its file offset is not aligned). Errors name the file and the tensor. */
mmb_status mmb__lm_bind(mmb_ctx *ctx, mmb_lm *lm, const char *name, int64_t n, int64_t k, mmb_wmat *w);
/* Whether layer l is replaced by a fusion-A layer (Mllama's cross_attention_layers): the decoder skips its
 * steps, its before_layer hook runs it. */
bool mmb__lm_replaced(const mmb_lm *lm, int l);
/* One query row against keys [k0, k1) of one head, K and V (rows of ld floats, hd used): out (hd) =
 * softmax(q K^T * scale) V, and *lse (lse NULL: not wanted) the log-sum-exp of the scaled scores (the backward's
 * statistics); sc: k1 - k0 floats of scratch. */
void mmb__lm_attend(float *out, float *lse, const float *q, const float *K, const float *V, int64_t ld, int64_t k0,
                    int64_t k1, int64_t hd, float scale, float *sc);

/* ---- fusion type B inside the decoder's layers ------------------------------------------------------ */

/* Two weight sets per layer (type B's experts), told from the checkpoint's tensor names at mmb_lm_open:
 * CogVLM's visual expert (self_attn.{language,vision}_expert_query_key_value, _dense, mlp.{language,
 * vision}_mlp.*: QKV, o_proj and the MLP per set, the norms shared) and mPLUG-Owl2's modality-adaptive
 * module (self_attn.{k,v}_proj.multiway.{0,1}, {input,post_attention}_layernorm.multiway.{0,1}: K, V and
 * both norms per set; Q, O and the MLP shared). Set 0 is the text one. Returns 2 for such a model, else 1. */
int mmb__lm_experts(const mmb_lm *lm);
/* What the second set adds: its parameters (the tensors it does not share with set 0). */
int64_t mmb__lm_expert_params(const mmb_lm *lm);

/* Per-row options of one mmb__lm_forward_rows call (either pointer NULL: the default).
 *   expert[i]:   0 or 1, the weight set row i runs through (values past the model's sets: an error);
 *   rope_pos[i]: the position RoPE rotates row i's query and key by, instead of its cache index minus the
 *                cache's shift; after the call the shift is the last row's index minus its rope_pos, so
 *                later rows (decode steps) go on from rope_pos[n - 1] + 1 (CogVLM gives all of an image's
 *                tokens one position). mmb_kv_cache_reset zeroes the shift. */
typedef struct mmb__lm_rows {
    const uint8_t *expert;
    const int64_t *rope_pos;
    float *hidden;  /* the last row's hidden state after the final RMSNorm (d_model floats), what a head other than
                       lm_head reads (Janus' generation_head); logits may then be NULL */
} mmb__lm_rows;
/* mmb_lm_forward with per-row options (rows NULL: mmb_lm_forward). Same returns; MMB_ERR_ARG for an expert
 * value the model has no set for or a negative rope_pos (nothing evaluated). */
mmb_status mmb__lm_forward_rows(mmb_ctx *ctx, const mmb_lm *lm, mmb_kv_cache *kv, const float *embeds, int64_t n,
                                float *logits, int last_only, const mmb__lm_rows *rows);

/* LLaMA-Adapter's adaption prompt in layer l: prompt (len, d) goes through the layer's own k_proj and v_proj
 * (their biases included, no RoPE; text set), or through pk / pv (kv_heads * head_dim, d) when given (V2's
 * unmerged wk / wv: its LoRA does not reach the prompts; the layer's biases still apply), now, on ctx's pool; every query of the layer attends the len
 * keys in a softmax of its own, scaled per head by gate[h] (H floats: PEFT's adaption_gate repeated, or V2's
 * tanh(gate)), and the result is added to the attention output before o_proj. o_bias_twice: o_proj's bias
 * is added once more (PEFT runs o_proj on the adapter's output separately). prompt NULL (or len 0) removes
 * layer l's prompt. Returns MMB_OK; MMB_ERR_ARG (l out of range or a replaced layer, len < 0 or > 65536,
 * gate NULL with a prompt), MMB_ERR_NOMEM (the layer unchanged). */
mmb_status mmb__lm_set_prompt(mmb_ctx *ctx, mmb_lm *lm, int l, const float *prompt, int64_t len, const float *gate,
                              bool o_bias_twice, const mmb_wmat *pk, const mmb_wmat *pv);
/* The prompt positions of layer l (0: none). */
int64_t mmb__lm_prompt_len(const mmb_lm *lm, int l);

/* True when c holds a text model's weights (embed_tokens under a prefix mmb_lm_open looks at). */
bool mmb__lm_present(const mmb_ckpt *c);
/* The positions kv can hold (max_tokens of mmb_kv_cache_new); 0 for NULL. */
int64_t mmb__kv_cache_cap(const mmb_kv_cache *kv);
/* The RoPE position the next row appended to kv gets by default: its length minus its shift (mmb__lm_rows). */
int64_t mmb__kv_cache_rope_next(const mmb_kv_cache *kv);

/* ---- lm/xattn.c: fusion type A, gated cross-attention layers inside the decoder ------------------------ */

/* The gated cross-attention layers of a type-A checkpoint (IDEFICS' IdeficsGatedCrossAttentionLayer, or
 * OpenFlamingo's GatedCrossAttentionBlock), installed as lm's before_layer hooks; the visual keys and
 * values of the prompt's images, computed once when the images are added; and which images each position
 * sees. One conversation at a time: the media and the positions' state belong to the layers, not to a
 * KV cache. */
typedef struct mmb__xattn mmb__xattn;

/* What the layers cost (mmb_mllm_info's xattn_* fields). */
typedef struct mmb__xattn_cost {
    int layers;                 /* gated layers */
    int64_t params;             /* their parameters */
    int64_t flops_per_token;    /* per text position, seeing one image: projections, attention over its tokens,
                                   the gated MLP */
    int64_t kv_bytes_per_image; /* the visual keys and values kept for one image, every layer */
    int64_t kv_flops_per_image; /* computing them, once per image */
} mmb__xattn_cost;

/* Opens the layers of `kind` ("idefics", "open_flamingo" or "mllama": the decoder's replaced layers) from lm's
 * checkpoint and config for visual tokens of width vis_dim, tokens_per_image of them per image (for the costs;
 * each image brings its own, mmb__xattn_add_media); image_token is the token that marks an image in the
 * text, eod_token the end-of-document token after which IDEFICS' text sees no image until the next (-1:
 * none). Installs the hooks (lm must outlive *out). Returns MMB_OK; MMB_ERR_MISSING / MMB_ERR_SHAPE /
 * MMB_ERR_FORMAT / MMB_ERR_UNSUPPORTED for a missing tensor, a K/V width other than vis_dim, a gate of the
 * wrong shape, a bad or unsupported setting (each naming the layer and tensor); MMB_ERR_NOMEM. */
mmb_status mmb__xattn_open(mmb_ctx *ctx, mmb_lm *lm, const char *kind, int64_t vis_dim, int64_t tokens_per_image,
                           int32_t image_token, int32_t eod_token, mmb__xattn **out);
/* Removes the hooks from lm and frees x (NULL: nothing). */
void mmb__xattn_free(mmb_ctx *ctx, mmb__xattn *x);
/* Drops the media and the positions' state (a new prompt from position 0). */
void mmb__xattn_clear(mmb__xattn *x);
/* Appends one image, media (tokens, vis_dim) f32, of which text attends the first `attended` tokens (all but
 * Mllama's padding tiles): every layer's keys and values of them are computed now, on ctx's pool, and kept.
 * Returns MMB_OK, MMB_ERR_ARG, MMB_ERR_NOMEM (nothing added). */
mmb_status mmb__xattn_add_media(mmb_ctx *ctx, mmb__xattn *x, const float *media, int64_t tokens, int64_t attended);
int64_t mmb__xattn_images(const mmb__xattn *x);
/* Records positions [pos, pos + n): their token ids (NULL: rows that are no token, as embeddings) decide
 * which images they see (an image token starts the next image; IDEFICS: none after eod_token until the
 * next image), or, with carry, each sees what position pos - 1 saw (generated tokens, as transformers'
 * and OpenFlamingo's generation do). pos <= the positions recorded (earlier ones are overwritten).
 * Returns MMB_OK, MMB_ERR_ARG or MMB_ERR_NOMEM. */
mmb_status mmb__xattn_feed(mmb_ctx *ctx, mmb__xattn *x, int64_t pos, const int32_t *ids, int64_t n, bool carry);
void mmb__xattn_get_cost(const mmb__xattn *x, mmb__xattn_cost *out);

/* ---- lm/adapter.c: LLaMA-Adapter's prompts (fusion type B) ------------------------------------------- */

/* The adaption prompts of lm's top layers (PEFT's AdaptionPrompt, or LLaMA-Adapter V2's adapter queries), set
 * in the decoder through mmb__lm_set_prompt. One conversation at a time: V2's image lives in lm's layers. */
typedef struct mmb__adapter mmb__adapter;

typedef struct mmb__adapter_cost {
    int layers;                 /* adapted layers */
    int64_t prompt_len;         /* prompt vectors per layer */
    int64_t params;             /* the prompts and gates (V2: adapter_query and the gates) */
    int64_t flops_per_token;    /* per text position: attention over the prompts, every adapted layer */
    int64_t flops_per_prompt;   /* the prompts' keys and values, once per image (V2) or at load (PEFT) */
} mmb__adapter_cost;

/* Reads a PEFT ADAPTION_PROMPT adapter directory (adapter_config.json + adapter_model.safetensors) for lm (a
 * Llama or Mistral model) and installs its prompts. Returns MMB_OK; MMB_ERR_IO / MMB_ERR_FORMAT for unreadable
 * or malformed files; MMB_ERR_UNSUPPORTED for another peft_type or target, another base architecture, or a
 * dtype other than F32/F16/BF16; MMB_ERR_SHAPE for more adapter_layers than lm has or a prompt of another
 * width (the adapter of another base model); MMB_ERR_MISSING for a missing tensor (messages name the file
 * and the tensor); MMB_ERR_NOMEM. lm is unchanged on failure. Free with mmb__adapter_free (which removes the
 * prompts). */
mmb_status mmb__adapter_open_peft(mmb_ctx *ctx, mmb_lm *lm, const char *dir, mmb__adapter **out);
/* The adapter of kind "llama_adapter_v2" from lm's own checkpoint (config query_len, query_layer;
 * adapter_query.weight, {prefix}layers.{l}.self_attn.adapter_gate); its prompts start as adapter_query alone.
 * Returns as mmb__adapter_open_peft. */
mmb_status mmb__adapter_open(mmb_ctx *ctx, mmb_lm *lm, const char *kind, mmb__adapter **out);
void mmb__adapter_free(mmb_ctx *ctx, mmb__adapter *a);
/* The rows of visual query an image must bring (V2's query_len), 0 for an adapter that takes no image. */
int64_t mmb__adapter_rows(const mmb__adapter *a);
/* V2: every adapted layer's prompt becomes its adapter query + visual (rows, d), on ctx's pool; visual NULL:
 * the adapter query alone. Returns MMB_OK; MMB_ERR_ARG for rows other than mmb__adapter_rows;
 * MMB_ERR_UNSUPPORTED for an image on a PEFT adapter; MMB_ERR_NOMEM. */
mmb_status mmb__adapter_image(mmb_ctx *ctx, mmb__adapter *a, const float *visual, int64_t rows);
void mmb__adapter_get_cost(const mmb__adapter *a, mmb__adapter_cost *out);

/* ---- lm/backward.c: the frozen decoder's backward (stage-1 training) -------------------------------- */

/* What lm/backward.c reads of the decoder (lm/decoder.c's accessors; the structs stay private there).
 * The pointers live as long as lm. */
typedef struct mmb__lm_view {
    int64_t d, I, H, KVH, hd, vocab, L;
    int64_t extra;               /* IDEFICS' additional vocabulary (a second head), 0 without */
    float eps;
    const float *norm;           /* the final RMSNorm's weight (d) */
    const mmb_wmat *head;        /* lm_head (vocab, d), or the tied embedding's first vocab rows */
    bool hooks;                  /* fusion-A / type-B hooks installed */
    int experts;                 /* weight sets per layer (2: type B's second set) */
    int n_replaced;              /* layers a hook runs instead (Mllama's cross-attention ones) */
    bool qk_norm_or_swin;        /* Chameleon's per-head q/k LayerNorms or swin_norm */
    int64_t max_positions;
} mmb__lm_view;
typedef struct mmb__lm_layer_view {
    const mmb_wmat *q, *k, *v, *o, *gate, *up, *down;
    const float *bq, *bk, *bv, *bo, *bgate, *bup, *bdown; /* f32 or NULL */
    const float *ln1, *ln2;                                /* (d) */
    int64_t window;                                        /* keys per query, 0: none */
    bool replaced;
    int64_t prompt;                                        /* LLaMA-Adapter prompt positions, 0: none */
} mmb__lm_layer_view;
void mmb__lm_get_view(const mmb_lm *lm, mmb__lm_view *v);
/* Layer l < v.L of lm. */
void mmb__lm_get_layer(const mmb_lm *lm, int l, mmb__lm_layer_view *v);
/* RoPE's inverse frequencies (hd / 2 floats) for a forward over seq_len positions from 0, as the decoder
 * uses them (only the dynamic scaling depends on seq_len). */
void mmb__lm_rope_freqs(const mmb_lm *lm, int64_t seq_len, float *inv);

/* The labels value that marks a position without a target (transformers' and LLaVA's IGNORE_INDEX). */
#define MMB_IGNORE_INDEX (-100)
/* The most bytes of activations mmb__lm_loss_backward keeps for one sequence (16 GiB: 2870 positions of a
 * Vicuna-7B, 1834 of a 13B, 13139 of a Qwen2-0.5B; LLaVA's stage-1 samples are ~620). */
#define MMB_LM_BWD_MAX_BYTES ((int64_t)1 << 34)
/* Floats kept per position for one sequence: every layer's (lm/backward.c's header), plus the final
 * residual stream. */
int64_t mmb__lm_bwd_floats_per_pos(const mmb_lm *lm);

/* Next-token cross-entropy of the frozen decoder on one sequence and its gradient with respect to the input
 * embeddings. embeds (n, d) f32; labels (n) as transformers' LlamaForCausalLM takes them: the loss of position
 * i's logits against labels[i + 1] for every i + 1 < n with labels[i + 1] != -100 (IGNORE_INDEX; labels[0] is
 * never a target and not read). Adds the summed token losses (double) to *loss_sum and their number to
 * *count; writes d_embeds (n, d) = the gradient of that SUM with respect to embeds (the caller scales it by
 * 1 / the tokens of its batch; all zero when no position has a target). No KV cache is used or changed.
 * Scratch: its own (the activations of the n positions, malloc'd), freed before returning.
 * Returns MMB_OK; MMB_ERR_ARG (NULL pointer, n < 2, a label outside [0, vocab) and not -100, naming the
 * position); MMB_ERR_SHAPE (n beyond the model's positions, or activations beyond MMB_LM_BWD_MAX_BYTES);
 * MMB_ERR_UNSUPPORTED for what the backward does not cover: hooks installed (fusion A), replaced layers,
 * adapter prompts, a second expert weight set, IDEFICS' additional vocabulary; MMB_ERR_NOMEM. On an error
 * *loss_sum, *count and d_embeds are unchanged. */
mmb_status mmb__lm_loss_backward(mmb_ctx *ctx, const mmb_lm *lm, const float *embeds, const int32_t *labels,
                                 int64_t n, double *loss_sum, int64_t *count, float *d_embeds);

#endif
