/* Video for the LLaVA-style path, as the Dense Connector's training-free extension (FreeVA) does it:
 * frames sampled uniformly (get_seq_frames in dc/eval/model_utils.py), each frame through the tower,
 * connector and projector like an image, then temporal_aggregation (llava_arch.py): MaxPool1d(2, 2)
 * over each frame's token sequence, frames concatenated frame-major. */
#include "internal.h"

#include <math.h>

mmb_status mmb_video_sample(mmb_ctx *ctx, int64_t total, int frames, int64_t *idx) {
    if (!idx || total < 1 || frames < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_video_sample: %lld frames to sample %d from", (long long)total, frames);
    /* seg = (total - 1) / frames; frame i is the midpoint of [round(seg i), round(seg (i + 1))], with
     * numpy's round (half to even: nearbyint in the default rounding mode). */
    double seg = (double)(total - 1) / frames;
    for (int i = 0; i < frames; i++) {
        int64_t a = (int64_t)nearbyint(seg * i), b = (int64_t)nearbyint(seg * (i + 1));
        idx[i] = (a + b) / 2;
    }
    return MMB_OK;
}

int64_t mmb_temporal_pool_tokens(int64_t frames, int64_t tokens) { return frames * (tokens / 2); }

/* emb (frames, tokens, width) -> out (frames * (tokens / 2), width): out[f, j] = max(emb[f, 2j],
 * emb[f, 2j + 1]) per channel; an odd last token is dropped, as MaxPool1d's floor. */
mmb_status mmb_temporal_pool(mmb_ctx *ctx, const float *emb, int64_t frames, int64_t tokens, int64_t width,
                             float *out) {
    if (!emb || !out || frames < 1 || tokens < 2 || width < 1)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_temporal_pool: %lld frames of %lld tokens x %lld (needs >= 1 frame "
                        "of >= 2 tokens)", (long long)frames, (long long)tokens, (long long)width);
    int64_t half = tokens / 2;
    for (int64_t f = 0; f < frames; f++)
        for (int64_t j = 0; j < half; j++) {
            const float *a = emb + (f * tokens + 2 * j) * width, *b = a + width;
            float *o = out + (f * half + j) * width;
            for (int64_t c = 0; c < width; c++) o[c] = a[c] > b[c] || isnan(a[c]) ? a[c] : b[c];
        }
    return MMB_OK;
}
