/* The text layer: the tokenizer (text/tokenizer.c) and the Jinja subset of chat templates (text/chat.c). Uses the io layer and below. */
#ifndef MMB_TEXT_H
#define MMB_TEXT_H

#include "io/io.h"

/* ---- text/tokenizer.c: what the chat templates read of a tokenizer ------------------------------- */

/* The tokenizer's chat template (chat_template.jinja, chat_template.json or tokenizer_config.json's
 * chat_template) or NULL, and the path it came from (for messages). */
const char *mmb__tokenizer_chat_template(const mmb_tokenizer *t, const char **source);
/* The content of the special token `name` ("bos_token", "eos_token", "unk_token", "pad_token") as
 * tokenizer_config.json (or special_tokens_map.json) names it, or NULL. */
const char *mmb__tokenizer_special(const mmb_tokenizer *t, const char *name);

#endif
