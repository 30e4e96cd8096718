/* libFuzzer target: the chat-template engine (text/chat.c). The input is split at its first NUL byte: the template
 * before it, the messages JSON after (absent or malformed: a fixed two-message conversation). Every render must
 * return a status, bounded in time and memory by the engine's own limits (depth, steps, output, arena). */
#include "fuzz_util.h"

#include <string.h>

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    mmb_ctx *ctx = fuzz_ctx();
    if (size > 1 << 16) return 0;
    char *buf = malloc(size + 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    buf[size] = 0;
    size_t tl = strlen(buf);
    const char *msgs = tl < size ? buf + tl + 1 : NULL;
    static const char *def = "[{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": "
                             "\"What is in <image> this picture?\"}, {\"role\": \"assistant\", \"content\": \"A cat.\"}]";
    char *out = NULL;
    if (mmb_chat_render_json(ctx, NULL, buf, msgs && *msgs ? msgs : def, "{\"bos_token\": \"<s>\"}", 1, &out) != MMB_OK &&
        msgs)
        mmb_chat_render_json(ctx, NULL, buf, def, NULL, 0, &out);
    free(out);
    free(buf);
    return 0;
}
