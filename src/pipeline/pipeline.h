/* Internal interfaces of the pipeline floor (src/pipeline/): the multimodal model (mllm.c), its chunk
 * lists (chunks.c), and what they need of model.c. Nothing
 * here is public API. */
#ifndef MMB_PIPELINE_H
#define MMB_PIPELINE_H

#include "internal.h"

/* ---- pipeline/model.c ------------------------------------------------------------------------- */

/* The checkpoint m was opened from (it lives as long as m). */
const mmb_ckpt *mmb__model_ckpt(const mmb_model *m);
/* Where m's image processor lives when m's directory has none: its family's tower directory
 * (mmb_family_ops.processor_dir), or NULL. */
const char *mmb__model_processor_dir(const mmb_model *m);
/* MMB_OK when m can take the pixels processor p makes (its family's mmb_family_ops.check_processor), else its
 * status and message (naming dir). */
mmb_status mmb__model_check_processor(mmb_ctx *ctx, const mmb_model *m, const mmb_preprocess *p, const char *dir);
/* The family's own image processor (mmb_family_ops.processor: CogVLM's built-in transform) into *p; MMB_ERR_IO
 * (nothing set, no message) when the family has none. */
mmb_status mmb__model_processor(mmb_ctx *ctx, const mmb_model *m, mmb_preprocess *p);
/* Fusion A: the rows per image m's LLM cross-attends to (mmb_family_ops.xattn_tokens: Mllama's max_num_tiles P,
 * the padding tiles included), or 0 when they are mmb_model_encode's rows. */
int64_t mmb__model_xattn_tokens(const mmb_model *m);
/* Those rows for pixels [batch, 3, height, width] (as the processor makes them) into out [batch,
 * mmb__model_xattn_tokens, out_width] (out_count floats); m without them: mmb_model_encode. Returns as
 * mmb_model_encode. */
mmb_status mmb__model_encode_xattn(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, int height,
                                   int width, float *out, size_t out_count);

/* mmb_model_encode plus, from the same pass of the tower, the hidden states hidden_states[taps[i]]
 * (HF indexing, negative from the end, or MMB_TAP_LAST) written to hidden[i] as [batch, tokens, width]
 * f32 (the tower's tokens, CLS included, and width). The tower runs once, up to the deepest of the
 * model's taps and these. n_taps 0 (taps, hidden may be NULL) is mmb_model_encode exactly. Returns as
 * mmb_model_encode; MMB_ERR_ARG for a tap out of range or more than MMB_MAX_TAPS taps with the model's;
 * MMB_ERR_UNSUPPORTED with n_taps > 0 for a family's model (its hidden states are not exposed). `out` is
 * unchanged on failure; hidden[] may have been written. */
mmb_status mmb__model_encode_taps(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, int height,
                                  int width, float *out, size_t out_count, const int *taps, int n_taps,
                                  float *const *hidden);

/* Training (pipeline/train.c): the rows m's LLaVA projector reads for pixels [batch, 3, height, width]: the
 * tower's taps, gathered as mmb_model_connect does (CLS dropped per the strategy), into *x (malloc'd, batch *
 * *rows rows of the projector's in_width; the caller frees it), and the projector's config in *cc (its strings
 * belong to m). Returns MMB_OK; MMB_ERR_UNSUPPORTED for a family's model or a Dense Connector; MMB_ERR_MISSING
 * without a tower; the tower's statuses. */
/* m's projector configuration (its type, key prefix, widths, activation), owned by m. */
const mmb_conn_cfg *mmb__model_conn_cfg(const mmb_model *m);
/* The family's own code of m (NULL for a LLaVA-path model) and, in *state (may be NULL), its state: for the
 * optional ops the pipeline calls (fusion D's logit_mask, vq, gen_*). */
const mmb_family_ops *mmb__model_fam_ops(const mmb_model *m, const void **state);
/* Fusion D: pixels [batch, 3, height, width] -> ids [batch, mmb_model_encode_tokens] (count entries), the image as
 * ids of the LLM's vocabulary (the family's encode_ids). Returns MMB_OK; MMB_ERR_UNSUPPORTED for a model whose
 * images are no ids; MMB_ERR_SHAPE (a size the VQ refuses, count too small); the VQ's statuses. */
mmb_status mmb__model_encode_ids(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, int height,
                                 int width, int32_t *ids, size_t count);
mmb_status mmb__model_projector_input(mmb_ctx *ctx, const mmb_model *m, const float *pixels, int64_t batch, int height,
                                      int width, float **x, int64_t *rows, mmb_conn_cfg *cc);

/* ---- pipeline/mllm.c: the multimodal model ------------------------------------------------------ */

struct mmb_mllm {
    char *dir;
    char arch[128];
    mmb_model *model;          /* the vision path of a LLaVA or family checkpoint, or NULL */
    mmb_vit *vit_only;         /* a vision tower alone (CLIP / SigLIP checkpoint), or NULL */
    const mmb_vit *vit;        /* the tower whose hidden states encode exposes: model's or vit_only; NULL for a
                                  family (its tower is its own) or without one */
    mmb_lm *lm;
    mmb__xattn *xattn;         /* fusion A: the LLM's gated cross-attention layers, or NULL */
    const char *image_wrap;    /* fusion A (IDEFICS): the token around an image marker in the text, or NULL */
    bool raw_bos;              /* the row's raw_bos (Mllama) */
    mmb__adapter *adapter;     /* fusion B: LLaMA-Adapter's prompts (a PEFT adapter, or V2's), or NULL */
    bool image_expert;         /* fusion B: image rows through the LLM's second weight set (the row's) */
    bool image_one_position;   /* fusion B: CogVLM's positions for an image's rows (the row's) */
    bool image_last_text;      /* fusion B: an image's last row through the text weight set (the row's, CogVLM) */
    const char *query_fmt;     /* the row's image_first (CogVLM): the chat mode's "%s" wrapper of the text, else NULL */
    const int32_t *logit_mask; /* fusion D: ids whose logits are the lowest float at every position (Chameleon's
                                  image tokens; the family's), n_logit_mask of them */
    int64_t n_logit_mask;
    const char *image_before, *image_after; /* fusion D: the row's text around each image marker */
    mmb_tokenizer *tok;
    mmb_preprocess proc;
    mmb_mllm_info info;
    int n_eos;
    int32_t eos[16];           /* the LLM's eos ids and the tokenizer's stop ids, merged */
    char no_proc[MMB_ERRMSG_LEN]; /* why there is no processor (info.has_processor 0) */
    char no_tok[MMB_ERRMSG_LEN];  /* why there is no tokenizer (info.has_tokenizer 0 with an LLM) */
};

/* img through m's processor: *pixels (malloc'd [3, *h, *w] f32, the caller frees it) and the embeddings m
 * makes of it in *tokens. Returns MMB_OK; MMB_ERR_MISSING without a vision path or a processor; the
 * processor's and the tower's statuses; MMB_ERR_NOMEM. Outputs untouched on failure. */
mmb_status mmb__mllm_preprocess(mmb_ctx *ctx, const mmb_mllm *m, const mmb_image *img, float **pixels, int *h,
                                int *w, int64_t *tokens);

/* pixels [batch, 3, h, w] (as m's processor makes them) -> emb [batch, tokens, out_width] (emb_count floats),
 * plus hidden states taps[0, n_taps) into hidden[i] [batch, vision_tokens, vision_width], one pass of the
 * tower. Returns as mmb__model_encode_taps (a tower alone: its last_hidden_state as emb); outputs may be
 * written on failure (the callers hand temporaries). */
mmb_status mmb__mllm_encode_pixels(mmb_ctx *ctx, const mmb_mllm *m, const float *pixels, int64_t batch, int h, int w,
                                   float *emb, size_t emb_count, const int *taps, int n_taps, float *const *hidden);

/* ---- pipeline/chunks.c -------------------------------------------------------------------------- */

/* One chunk of a prompt. An image is kept preprocessed, pixels [3, h, w] f32, with n the embeddings it
 * becomes (so positions are known before anything is encoded). */
typedef struct mmb_chunk {
    mmb_chunk_type type;
    int64_t n;               /* positions: ids, image embeddings or rows */
    int32_t *ids;            /* MMB_CHUNK_TEXT: n ids */
    float *data;             /* MMB_CHUNK_IMAGE: pixels [3, h, w]; MMB_CHUNK_EMBED: rows [n, width] */
    int h, w;                /* MMB_CHUNK_IMAGE */
    int64_t width;           /* MMB_CHUNK_EMBED */
} mmb_chunk;

struct mmb_chunks {
    int n, cap;
    mmb_chunk *c;
    int64_t positions;       /* sum of c[i].n */
    int n_images;
};

#endif
