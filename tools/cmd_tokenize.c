/* mmbridge tokenize: a checkpoint's tokenizer and chat template from the command line (encode,
 * decode, streamed decode, chat rendering), for users and for tests/oracle/test_tokenizer.py. */
#include "cli.h"
#include "serve.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, n = 0, r;
    char *b = malloc(cap);
    while (b && (r = fread(b + n, 1, cap - n - 1, f)) > 0) {
        n += r;
        if (n + 1 == cap) {
            char *nb = realloc(b, cap *= 2);
            if (!nb) { free(b); b = NULL; }
            else b = nb;
        }
    }
    fclose(f);
    if (b) b[n] = 0;
    if (len) *len = n;
    return b;
}

static int decode_cmd(mmb_ctx *ctx, const mmb_tokenizer *t, const char *list, int skip, int stream) {
    int64_t n = 0, cap = 64;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    const char *p = list;
    while (ids && *p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p) {
            if (*p == ',' || *p == ' ') { p++; continue; }
            free(ids);
            fprintf(stderr, "mmbridge: --decode: '%s' is not a list of ids\n", list);
            return 2;
        }
        if (v < 0 || v > INT32_MAX || (*end && *end != ',' && *end != ' ')) {  /* no silent truncation */
            fprintf(stderr, "mmbridge: --decode: '%.*s' is not a token id (0 to %d)\n", (int)(end - p), p, INT32_MAX);
            free(ids);
            return 2;
        }
        if (n == cap) {
            int32_t *ni = realloc(ids, (size_t)(cap *= 2) * sizeof *ids);
            if (!ni) { free(ids); ids = NULL; break; }
            ids = ni;
        }
        ids[n++] = (int32_t)v;
        p = end;
    }
    if (!ids) return cli_fail(NULL, "out of memory");
    int rc = 0;
    if (!stream) {
        char *text = NULL;
        size_t len = 0;
        if (mmb_tokenizer_decode(ctx, t, ids, n, skip, &text, &len) != MMB_OK) rc = cli_fail(ctx, NULL);
        else fwrite(text, 1, len, stdout);
        free(text);
    } else {
        size_t emitted = 0;
        for (int64_t i = 1; i <= n + 1 && rc == 0; i++) { /* the last call flushes */
            char *text = NULL;
            size_t len = 0;
            int flush = i == n + 1;
            if (mmb_tokenizer_decode_stream(ctx, t, ids, flush ? n : i, skip, flush, &emitted, &text, &len) != MMB_OK) {
                rc = cli_fail(ctx, NULL);
                break;
            }
            for (size_t k = 0; k < len; k++) printf("%02x", (unsigned char)text[k]);
            putchar('\n');
            free(text);
        }
    }
    free(ids);
    return rc;
}

/* --batch / --decode-batch: a JSON list in, one result per item out. */
static int batch_cmd(mmb_ctx *ctx, const mmb_tokenizer *t, const char *path, int decode, int flag) {
    char *js = slurp(path, NULL);
    cJSON *in = js ? cJSON_Parse(js) : NULL, *it;
    free(js);
    if (!cJSON_IsArray(in)) {
        cJSON_Delete(in);
        fprintf(stderr, "mmbridge: error: %s is not a JSON list\n", path);
        return 1;
    }
    int rc = 0, count = 0;
    sv_buf out = {0}; /* written here, not by cJSON, whose strings end at a NUL the text may hold */
    sv_puts(&out, "[");
    cJSON_ArrayForEach(it, in) {
        if (!decode) {
            int32_t *ids = NULL;
            int64_t n = 0;
            if (!cJSON_IsString(it)) { fprintf(stderr, "mmbridge: error: %s: not a string\n", path); rc = 1; break; }
            if (mmb_tokenizer_encode(ctx, t, it->valuestring, strlen(it->valuestring), flag, &ids, &n) != MMB_OK) { rc = cli_fail(ctx, NULL); break; }
            for (int64_t i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
            putchar('\n');
            free(ids);
        } else {
            int n = cJSON_GetArraySize(it), k = 0;
            int32_t *ids = malloc(((size_t)n + 1) * sizeof *ids);
            if (!ids) { fprintf(stderr, "mmbridge: error: out of memory\n"); rc = 1; break; }
            cJSON *v;
            cJSON_ArrayForEach(v, it) {  /* as --decode: no silent truncation (a cast of 1e300 is undefined) */
                double d = cJSON_IsNumber(v) ? v->valuedouble : -1.0;
                if (!(d >= 0 && d <= INT32_MAX && d == (double)(int32_t)d)) break;
                ids[k++] = (int32_t)d;
            }
            if (k != n || !cJSON_IsArray(it)) {
                fprintf(stderr, "mmbridge: error: %s: item %d: not a list of token ids (0 to %d)\n", path, count,
                        INT32_MAX);
                free(ids);
                rc = 1;
                break;
            }
            char *text = NULL;
            size_t len = 0;
            if (mmb_tokenizer_decode(ctx, t, ids, n, flag, &text, &len) != MMB_OK) { free(ids); rc = cli_fail(ctx, NULL); break; }
            if (count++) sv_puts(&out, ",");
            sv_json_str(&out, text, len);
            free(text);
            free(ids);
        }
    }
    sv_puts(&out, "]");
    if (decode && rc == 0 && out.oom) rc = cli_fail(NULL, "out of memory");
    else if (decode && rc == 0) puts(out.p);
    sv_free(&out);
    cJSON_Delete(in);
    return rc;
}

int cmd_tokenize(int argc, char **argv) {
    const char *dir = NULL, *text = NULL, *file = NULL, *dec = NULL, *chat = NULL, *tmpl = NULL, *vars = NULL;
    const char *batch = NULL, *dbatch = NULL;
    int special = 0, skip = 0, stream = 0, gen = 0, info = 0;
    const cli_opt opts[] = {
        {.name = "--text", .meta = "TEXT", .type = CLI_STR, .dst = &text,
         .help = "encode TEXT; prints the ids, space separated"},
        {.name = "--file", .meta = "F", .type = CLI_STR, .dst = &file, .help = "encode the bytes of F"},
        {.name = "--special", .meta = NULL, .type = CLI_FLAG, .dst = &special,
         .help = "add the post-processor's special tokens (BOS for Llama)"},
        {.name = "--decode", .meta = "IDS", .type = CLI_STR, .dst = &dec,
         .help = "decode comma- or space-separated ids; prints the text as is"},
        {.name = "--skip-special", .meta = NULL, .type = CLI_FLAG, .dst = &skip,
         .help = "drop special tokens when decoding"},
        {.name = "--stream", .meta = NULL, .type = CLI_FLAG, .dst = &stream,
         .help = "decode one token at a time as a generator would; prints each piece\n"
         "handed out as one line of hex (empty line: nothing yet)"},
        {.name = "--batch", .meta = "F", .type = CLI_STR, .dst = &batch,
         .help = "encode each string of the JSON list in F; one line of ids each"},
        {.name = "--decode-batch", .meta = "F", .type = CLI_STR, .dst = &dbatch,
         .help = "decode each id list of the JSON list in F; prints a JSON list"},
        {.name = "--chat", .meta = "MESSAGES.json", .type = CLI_STR, .dst = &chat,
         .help = "render a JSON list of {\"role\", \"content\"} messages (content a\n"
         "string or a list of {\"type\": ...} parts) with the chat template"},
        {.name = "--template", .meta = "T", .type = CLI_STR, .dst = &tmpl,
         .help = "use the template in file T instead of the checkpoint's"},
        {.name = "--vars", .meta = "VARS.json", .type = CLI_STR, .dst = &vars,
         .help = "extra template variables (a JSON object)"},
        {.name = "--gen-prompt", .meta = NULL, .type = CLI_FLAG, .dst = &gen, .help = "add_generation_prompt=true"},
        {.name = "--info", .meta = NULL, .type = CLI_FLAG, .dst = &info,
         .help = "print vocab size, BOS, EOS and stop ids"},
    };
    const cli_spec spec = {"tokenize", "DIR (--text T | --file F | --decode IDS | --chat M | --batch F | --decode-batch F | --info)",
        "A checkpoint's tokenizer and chat template. DIR holds tokenizer.json (Hugging Face tokenizers\n"
        "format, BPE) and optionally tokenizer_config.json, chat_template.json / .jinja,\n"
        "generation_config.json, config.json.\n",
        opts, CLI_N(opts), &dir, 1, 1, NULL};
    int r = cli_parse(&spec, argc, argv);
    if (r) return r == 1 ? 0 : r;
    if (!text && !file && !dec && !chat && !info && !batch && !dbatch) {
        fprintf(stderr, "mmbridge tokenize: needs one of --text, --file, --decode, --chat, --batch, --decode-batch, "
                "--info\n");
        return 2;
    }
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 1;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return cli_fail(NULL, "cannot create a context");
    mmb_tokenizer *t = NULL;
    int rc = 0;
    if (mmb_tokenizer_open(ctx, dir, &t) != MMB_OK) {
        rc = cli_fail(ctx, NULL);
    } else if (info) {
        int32_t stop[16];
        int ns = mmb_tokenizer_stop_ids(t, stop, 16);
        printf("{\"vocab_size\": %lld, \"bos_id\": %d, \"eos_id\": %d, \"stop_ids\": [", (long long)mmb_tokenizer_vocab_size(t),
               mmb_tokenizer_bos_id(t), mmb_tokenizer_eos_id(t));
        for (int i = 0; i < ns && i < 16; i++) printf("%s%d", i ? ", " : "", stop[i]);
        printf("]}\n");
    } else if (batch || dbatch) {
        rc = batch_cmd(ctx, t, batch ? batch : dbatch, dbatch != NULL, batch ? special : skip);
    } else if (dec) {
        rc = decode_cmd(ctx, t, dec, skip, stream);
    } else if (chat) {
        char *msgs = slurp(chat, NULL), *tt = tmpl ? slurp(tmpl, NULL) : NULL, *vv = vars ? slurp(vars, NULL) : NULL;
        char *out = NULL;
        if (!msgs || (tmpl && !tt) || (vars && !vv)) {
            fprintf(stderr, "mmbridge: error: cannot read %s\n", !msgs ? chat : (tmpl && !tt) ? tmpl : vars);
            rc = 1;
        } else if (mmb_chat_render_json(ctx, t, tt, msgs, vv, gen, &out) != MMB_OK) {
            rc = cli_fail(ctx, NULL);
        } else {
            fputs(out, stdout);
        }
        free(out);
        free(msgs);
        free(tt);
        free(vv);
    } else {
        size_t len = 0;
        char *buf = file ? slurp(file, &len) : NULL;
        if (file && !buf) {
            fprintf(stderr, "mmbridge: error: cannot read %s\n", file);
            rc = 1;
        } else {
            int32_t *ids = NULL;
            int64_t n = 0;
            if (mmb_tokenizer_encode(ctx, t, file ? buf : text, file ? len : strlen(text), special, &ids, &n) != MMB_OK) {
                rc = cli_fail(ctx, NULL);
            } else {
                for (int64_t i = 0; i < n; i++) printf("%s%d", i ? " " : "", ids[i]);
                putchar('\n');
            }
            free(ids);
        }
        free(buf);
    }
    mmb_tokenizer_free(t);
    mmb_ctx_free(ctx);
    return rc;
}
