/* libFuzzer target: mmbridge serve's request parser (tools/serve_api.c) and its base64 decoder (tools/serve_util.c).
 * The first byte picks the route (even: /v1/embeddings, odd: /v1/chat/completions); the rest is the body. Every
 * parse must give a job or an error body with a status in 400..599, never a crash or a leak; the base64 decoder
 * must accept exactly what a re-encode gives back; the body's bytes read as f32s must print as JSON numbers that read
 * back as themselves. */
#include "../tools/serve.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    if (!size || size > 1 << 16) return 0;
    sv_server sv = {.cfg = {.max_body = 1 << 20, .max_pixels = 1 << 20, .max_tokens = 64, .max_images = 4,
                            .slots = 1, .name = "fuzz"}};
    sv.info.image_marker = "<image>";
    sv.info.has_vision = sv.info.has_lm = 1;
    int http = 0;
    sv_buf err = {0};
    sv_job *j = sv_job_parse(&sv, data[0] & 1 ? SV_CHAT : SV_EMBED, (const char *)data + 1, size - 1, 0, &http, &err);
    if (!j && (http < 400 || http > 599 || !err.p)) abort();
    sv_job_unref(j);
    sv_free(&err);
    unsigned char *dec = NULL;
    size_t n = 0;
    if (sv_b64_decode((const char *)data + 1, size - 1, &dec, &n) == 0) {
        sv_buf enc = {0};
        sv_b64_encode(&enc, dec, n);
        unsigned char *again = NULL;
        size_t m = 0;
        if (sv_b64_decode(enc.p ? enc.p : "", enc.n, &again, &m) || m != n || (n && memcmp(again, dec, n))) abort();
        free(again);
        sv_free(&enc);
        free(dec);
    }
    for (size_t i = 1; i + 4 <= size; i += 4) { /* the JSON floats read back as the same f32 */
        float f, g;
        memcpy(&f, data + i, 4);
        if (!isfinite(f)) continue;
        char buf[32];
        buf[sv_fmt_f32(buf, f)] = 0;
        g = strtof(buf, NULL);
        if (memcmp(&f, &g, 4)) abort();
    }
    return 0;
}
