/* Trainable connectors (stage 1): the list, and what every trainable parameter needs (its f32 master and
 * gradient, its checkpoint weights or a default init). Adding one is its ops table in its connector's file plus
 * one line below. */
#include "connectors/connectors.h"

#include <stdlib.h>
#include <string.h>

static const mmb__trainable_ops *const trainable[] = {&mmb__train_mlp, &mmb__train_resmlp};

const mmb__trainable_ops *mmb__trainable_find(const char *type) {
    for (size_t i = 0; type && i < sizeof trainable / sizeof trainable[0]; i++)
        if (trainable[i]->accepts(type)) return trainable[i];
    return NULL;
}

mmb_status mmb__tparam_new(mmb_ctx *ctx, mmb__tparam *p, const char *name, int64_t n0, int64_t n1) {
    memset(p, 0, sizeof *p);
    if (strlen(name) >= sizeof p->name) return mmb__err(ctx, MMB_ERR_ARG, "%s: the key is too long", name);
    memcpy(p->name, name, strlen(name) + 1);
    p->ndim = n1 ? 2 : 1;
    p->shape[0] = n0;
    p->shape[1] = n1;
    p->numel = n0 * (n1 ? n1 : 1);
    p->w = calloc((size_t)p->numel, sizeof(float));
    p->g = calloc((size_t)p->numel, sizeof(float));
    if (!p->w || !p->g) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory for a trainable copy", name);
    return MMB_OK;
}

void mmb__tparam_free(mmb__tparam *p) {
    free(p->w);
    free(p->g);
    p->w = p->g = NULL;
}

mmb_status mmb__tparam_load(mmb_ctx *ctx, const mmb_ckpt *c, mmb__tparam *p) {
    float *f = NULL;
    mmb_status s = mmb__ckpt_floats(ctx, c, p->name, p->ndim, p->shape, &f);
    if (s == MMB_OK) memcpy(p->w, f, sizeof(float) * (size_t)p->numel);
    free(f);
    return s;
}

/* splitmix64 */
static uint64_t mix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void mmb__tparam_uniform(mmb__tparam *p, float bound, uint64_t *state) {
    for (int64_t e = 0; e < p->numel; e++) p->w[e] = bound * (float)((double)(mix(state) >> 11) * 0x1p-52 - 1);
}
