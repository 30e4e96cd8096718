/* What sharded extraction stores per image: all tokens, their mean, or the first (CLS) token. */
#include "internal.h"

#include <string.h>

mmb_status mmb_pool_tokens(mmb_ctx *ctx, mmb_pooling mode, const float *x, int64_t n, int64_t tokens, int64_t width,
                           float *out, size_t out_count) {
    if (!x || !out || n < 1 || tokens < 1 || width < 1 || (mode != MMB_POOL_NONE && mode != MMB_POOL_MEAN &&
                                                            mode != MMB_POOL_CLS))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_pool_tokens: bad arguments");
    int64_t per = mode == MMB_POOL_NONE ? tokens * width : width;
    if ((uint64_t)n > (uint64_t)SIZE_MAX / (uint64_t)per || (size_t)(n * per) > out_count)
        return mmb__err(ctx, MMB_ERR_SHAPE, "mmb_pool_tokens: the output needs %lld floats, has %zu",
                        (long long)(n * per), out_count);
    if (mode == MMB_POOL_NONE) {
        if (out != x) memmove(out, x, sizeof(float) * (size_t)(n * per));
        return MMB_OK;
    }
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + (size_t)(i * tokens * width);
        float *o = out + (size_t)(i * width);
        if (mode == MMB_POOL_CLS) {
            memmove(o, xi, sizeof(float) * (size_t)width);
            continue;
        }
        /* image i's mean reads rows of image i only, and image i's output lies at or before its input: writing
         * o after reading all of xi's rows for that column keeps in-place use safe (o's columns < width come
         * before xi's rows 1.. when i > 0, and equal xi's row 0 when i == 0) */
        for (int64_t c = 0; c < width; c++) {
            double s = 0;
            for (int64_t t = 0; t < tokens; t++) s += xi[t * width + c];
            o[c] = (float)(s / (double)tokens);
        }
    }
    return MMB_OK;
}
