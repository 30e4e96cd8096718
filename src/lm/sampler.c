/* Next-token choice: greedy, or temperature -> top-k -> top-p -> a draw, the order of transformers'
 * logits processors. The generator is xorshift64* (Vigna), so a seed gives the same tokens anywhere. */
#include "lm/lm.h"

#include <math.h>
#include <stdlib.h>

mmb_sampler mmb_sampler_default(void) {
    return (mmb_sampler){.temperature = 0.0f, .top_k = 0, .top_p = 1.0f, .seed = 0, .state = 0};
}

static uint64_t next_u64(mmb_sampler *s) {
    if (s->state == 0) s->state = s->seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    if (s->state == 0) s->state = 1;
    uint64_t x = s->state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    s->state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

typedef struct cand {
    float p;
    int32_t id;
} cand;

/* Higher probability first; the lower id first on ties (a stable, machine-independent order). */
static int by_p(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

mmb_status mmb_sample(mmb_ctx *ctx, mmb_sampler *s, const float *logits, int64_t vocab, int32_t *token) {
    if (!s || !logits || !token || vocab < 1 || vocab > INT32_MAX)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_sample: NULL argument or vocab %lld outside [1, 2^31)", (long long)vocab);
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; i++)
        if (logits[i] > logits[best]) best = i;
    if (!(s->temperature > 0.0f)) {
        *token = (int32_t)best;
        return MMB_OK;
    }
    cand *c = malloc(sizeof *c * (size_t)vocab);
    if (!c) return mmb__err(ctx, MMB_ERR_NOMEM, "mmb_sample: cannot allocate %lld candidates", (long long)vocab);
    /* softmax(logits / T), max subtracted */
    float mx = logits[best] / s->temperature;
    for (int64_t i = 0; i < vocab; i++) {
        float e = expf(logits[i] / s->temperature - mx);
        c[i] = (cand){e, (int32_t)i};
    }
    qsort(c, (size_t)vocab, sizeof *c, by_p);
    int64_t n = vocab;
    if (s->top_k > 0 && s->top_k < n) n = s->top_k;
    double kept = 0;
    for (int64_t i = 0; i < n; i++) kept += c[i].p;
    if (s->top_p > 0.0f && s->top_p < 1.0f) {
        /* smallest prefix whose probability (renormalized over the top-k) reaches top_p; at least one */
        double acc = 0;
        int64_t m = 0;
        while (m < n) {
            acc += c[m++].p;
            if (acc >= (double)s->top_p * kept) break;
        }
        n = m;
        kept = acc;
    }
    double u = (double)(next_u64(s) >> 11) * (1.0 / 9007199254740992.0) * kept, acc = 0;
    int32_t pick = c[n - 1].id;
    for (int64_t i = 0; i < n; i++) {
        acc += c[i].p;
        if (u < acc) {
            pick = c[i].id;
            break;
        }
    }
    free(c);
    *token = pick;
    return MMB_OK;
}
