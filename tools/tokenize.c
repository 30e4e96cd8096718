/* mmbridge tokenize: a checkpoint's tokenizer and chat template from the command line (encode,
 * decode, streamed decode, chat rendering), for users and for tests/oracle/test_tokenizer.py. */
#include "cli.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *usage_tokenize =
    "usage: mmbridge tokenize DIR [--text TEXT | --file F] [--special]\n"
    "       mmbridge tokenize DIR --decode IDS [--skip-special] [--stream]\n"
    "       mmbridge tokenize DIR --chat MESSAGES.json [--template T.jinja] [--vars VARS.json] [--gen-prompt]\n"
    "       mmbridge tokenize DIR --batch TEXTS.json [--special]\n"
    "       mmbridge tokenize DIR --decode-batch IDS.json [--skip-special]\n"
    "       mmbridge tokenize DIR --info\n"
    "\n"
    "DIR holds tokenizer.json (Hugging Face tokenizers format, BPE) and optionally\n"
    "tokenizer_config.json, chat_template.json / .jinja, generation_config.json, config.json.\n"
    "  --text TEXT / --file F   encode TEXT (or the bytes of F); prints the ids, space separated\n"
    "  --special                add the post-processor's special tokens (BOS for Llama)\n"
    "  --decode IDS             decode comma- or space-separated ids; prints the text as is\n"
    "  --skip-special           drop special tokens when decoding\n"
    "  --batch F                encode each string of the JSON list in F; one line of ids each\n"
    "  --decode-batch F         decode each id list of the JSON list in F; prints a JSON list\n"
    "  --stream                 decode one token at a time as a generator would; prints each\n"
    "                           piece handed out as one line of hex (empty line: nothing yet)\n"
    "  --chat MESSAGES.json     render a JSON list of {\"role\", \"content\"} messages (content a\n"
    "                           string or a list of {\"type\": ...} parts) with the chat template\n"
    "  --template T             use the template in file T instead of the checkpoint's\n"
    "  --vars VARS.json         extra template variables (a JSON object)\n"
    "  --gen-prompt             add_generation_prompt=true\n"
    "  --info                   print vocab size, BOS, EOS and stop ids\n";

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
    int rc = 0;
    cJSON *out = cJSON_CreateArray();
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
            cJSON *v;
            cJSON_ArrayForEach(v, it) ids[k++] = (int32_t)v->valuedouble;
            char *text = NULL;
            size_t len = 0;
            if (mmb_tokenizer_decode(ctx, t, ids, n, flag, &text, &len) != MMB_OK) { free(ids); rc = cli_fail(ctx, NULL); break; }
            cJSON_AddItemToArray(out, cJSON_CreateString(text));
            free(text);
            free(ids);
        }
    }
    if (decode && rc == 0) {
        char *o = cJSON_PrintUnformatted(out);
        if (o) puts(o);
        cJSON_free(o);
    }
    cJSON_Delete(out);
    cJSON_Delete(in);
    return rc;
}

int cli_tokenize(int argc, char **argv) {
    const char *dir = NULL, *text = NULL, *file = NULL, *dec = NULL, *chat = NULL, *tmpl = NULL, *vars = NULL;
    const char *batch = NULL, *dbatch = NULL;
    int special = 0, skip = 0, stream = 0, gen = 0, info = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char **val = !strcmp(a, "--text") ? &text : !strcmp(a, "--file") ? &file : !strcmp(a, "--decode") ? &dec
                         : !strcmp(a, "--chat") ? &chat : !strcmp(a, "--template") ? &tmpl : !strcmp(a, "--vars") ? &vars
                         : !strcmp(a, "--batch") ? &batch : !strcmp(a, "--decode-batch") ? &dbatch : NULL;
        if (val) {
            if (i + 1 >= argc) { fprintf(stderr, "mmbridge: %s needs a value\n%s", a, usage_tokenize); return 2; }
            *val = argv[++i];
        } else if (!strcmp(a, "--special")) special = 1;
        else if (!strcmp(a, "--skip-special")) skip = 1;
        else if (!strcmp(a, "--stream")) stream = 1;
        else if (!strcmp(a, "--gen-prompt")) gen = 1;
        else if (!strcmp(a, "--info")) info = 1;
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(usage_tokenize, stdout); return 0; }
        else if (a[0] != '-' && !dir) dir = a;
        else { fprintf(stderr, "mmbridge: unexpected argument '%s'\n%s", a, usage_tokenize); return 2; }
    }
    if (!dir || (!text && !file && !dec && !chat && !info && !batch && !dbatch)) { fputs(usage_tokenize, stderr); return 2; }
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
