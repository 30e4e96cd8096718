/* libFuzzer target: the tokenizer (text/tokenizer.c). The first byte picks the mode:
 *   even  the rest is a tokenizer.json, written to a temporary directory and opened; when it opens, a fixed text
 *         with special tokens is encoded and decoded back;
 *   odd   the rest is text, encoded (with and without special tokens) by a fixed byte-level BPE tokenizer made once
 *         per process (fuzz/corpus/tokenizer's seeds are of both kinds), and its ids decoded back. */
#include "fuzz_util.h"

#include <string.h>

static mmb_tokenizer *g_tok;

/* A small byte-level BPE with a merge list and added special tokens, as `tokenizers` saves one. */
static const char *FIXED =
    "{\"version\": \"1.0\", \"added_tokens\": [{\"id\": 262, \"content\": \"<s>\", \"special\": true},"
    " {\"id\": 263, \"content\": \"<image>\", \"special\": true}],"
    " \"normalizer\": null, \"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true,"
    " \"use_regex\": true}, \"post_processor\": null, \"decoder\": {\"type\": \"ByteLevel\"},"
    " \"model\": {\"type\": \"BPE\", \"dropout\": null, \"unk_token\": null, \"byte_fallback\": false, \"vocab\": %s,"
    " \"merges\": [\"\\u0120 t\", \"h e\", \"\\u0120t he\", \"a t\", \"c at\"]}}";

static void free_tok(void) { mmb_tokenizer_free(g_tok); }

/* The byte-level alphabet's 256 symbols as GPT-2 maps bytes, ids 0..255, then the merges' results. */
static void setup(void) {
    const char *dir = fuzz_dir("tok", "tokenizer.json");
    char *vocab = malloc(1 << 16), *o = vocab;
    o += sprintf(o, "{");
    for (int b = 0, n = 0; b < 256; b++) { /* bytes_to_unicode */
        int cp = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174) ? b : 256 + n++;
        o += sprintf(o, "%s\"\\u%04x\": %d", b ? ", " : "", cp, b);
    }
    o += sprintf(o, ", \"\\u0120t\": 256, \"he\": 257, \"\\u0120the\": 258, \"at\": 259, \"cat\": 260, \"c\\u0120\": 261}");
    char *json = malloc(1 << 17);
    int n = snprintf(json, 1 << 17, FIXED, vocab);
    fuzz_write(json, (size_t)n);
    free(vocab);
    free(json);
    if (mmb_tokenizer_open(fuzz_ctx(), dir, &g_tok) != MMB_OK) abort();
    atexit(free_tok); /* runs before fuzz_util's cleanup, registered earlier */
}

static void roundtrip(const mmb_tokenizer *t, const char *text, size_t n, int special) {
    int32_t *ids = NULL;
    int64_t k = 0;
    if (mmb_tokenizer_encode(fuzz_ctx(), t, text, n, special, &ids, &k) == MMB_OK) {
        char *back = NULL;
        size_t bn = 0;
        if (mmb_tokenizer_decode(fuzz_ctx(), t, ids, k, 0, &back, &bn) == MMB_OK) free(back);
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    if (!g_tok) setup();
    if (size < 1 || size > 1 << 17) return 0;
    const char *rest = (const char *)data + 1;
    size_t n = size - 1;
    if (data[0] % 2 == 0) {
        fuzz_write(rest, n);
        mmb_tokenizer *t = NULL;
        if (mmb_tokenizer_open(fuzz_ctx(), fuzz_dir("tok", "tokenizer.json"), &t) == MMB_OK) {
            static const char text[] = "<s>The cat sat on <image> the mat, caf\xc3\xa9 \xe2\x9c\x93 1234.";
            roundtrip(t, text, sizeof text - 1, 1);
            mmb_tokenizer_free(t);
        }
        return 0;
    }
    roundtrip(g_tok, rest, n, 1);
    roundtrip(g_tok, rest, n, 0);
    return 0;
}
