#include "internal.h"
mmb_status mmb_chat_render(mmb_ctx *ctx, const mmb_tokenizer *t, const mmb_chat_msg *msgs, int n, int add_generation_prompt, char **out) {
    (void)t; (void)msgs; (void)n; (void)add_generation_prompt; (void)out;
    return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "todo");
}
mmb_status mmb_chat_render_json(mmb_ctx *ctx, const mmb_tokenizer *t, const char *template_text, const char *messages_json, const char *extra_json, int add_generation_prompt, char **out) {
    (void)t; (void)template_text; (void)messages_json; (void)extra_json; (void)add_generation_prompt; (void)out;
    return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "todo");
}
