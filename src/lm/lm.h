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

/* ---- lm/decoder.c: what the pipeline asks of a checkpoint and a cache ---------------------------------- */

/* True when c holds a text model's weights (embed_tokens under a prefix mmb_lm_open looks at). */
bool mmb__lm_present(const mmb_ckpt *c);
/* The positions kv can hold (max_tokens of mmb_kv_cache_new); 0 for NULL. */
int64_t mmb__kv_cache_cap(const mmb_kv_cache *kv);

#endif
