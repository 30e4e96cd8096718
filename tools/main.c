/* mmbridge: the command-line tool. One table of commands; each lives in tools/cmd_NAME.c and parses
 * its own options through tools/opts.c. */
#include "cli.h"

#include <string.h>

static const struct {
    const char *name, *args, *summary;
    int (*run)(int argc, char **argv);
} commands[] = {
    {"info", "MODEL", "describe a checkpoint: family, tower, connector, LLM, tokenizer, costs", cmd_info},
    {"connect", "MODEL --features IN -o OUT", "run the connector on hidden states, write embeddings", cmd_connect},
    {"encode", "MODEL INPUT... -o OUT", "images (files, directories, lists) -> tower -> connector -> embeddings",
     cmd_encode},
    {"compare", "[MODEL...]", "connectors' parameters, FLOPs, tokens, measured latency and memory, and\n"
     "what an image costs the LLM (fusion C: prefill, KV cache; A: gated layers)", cmd_compare},
    {"attention", "MODEL IMAGE -o OUT.png", "a ViT's per-layer attention maps drawn over the image", cmd_attention},
    {"decode-vq", "MODEL CODES -o OUT.png", "fusion D: a VQ model's codes -> its decoder -> PNG", cmd_decode_vq},
    {"generate", "MODEL [--image IMG]... --prompt TEXT", "image(s) + prompt -> the LLM -> text, streamed", cmd_generate},
    {"train", "MODEL --data JSON -o DIR", "stage-1 training: a LLaVA projector through the frozen tower and LLM",
     cmd_train},
#ifdef MMB_HAVE_SERVE
    {"serve", "MODEL [--port N]", "an HTTP server: OpenAI-style /v1/chat/completions and /v1/embeddings\n"
     "(image embeddings or hidden states), /health, and a web page", cmd_serve},
#endif
    {"tokenize", "DIR --text T", "encode / decode with a checkpoint's tokenizer, render its chat template",
     cmd_tokenize},
    {"demo", "DIR [IMAGE]", "write a random-weight LLaVA checkpoint (a LLaVA-1.5-7B-sized projector, a\n"
     "tiny LLM and tokenizer) into DIR, then show info, encode and generate on it", cmd_demo},
};

static void usage(FILE *f) {
    fprintf(f, "usage: mmbridge <command> [options]\n\ncommands:\n");
    for (int i = 0; i < CLI_N(commands); i++) {
        char left[64];
        snprintf(left, sizeof left, "%s %s", commands[i].name, commands[i].args);
        fprintf(f, "  %-38s", left);
        if (strlen(left) > 38) fprintf(f, "\n  %-38s", "");
        for (const char *p = commands[i].summary; *p; p++) {
            fputc(*p, f);
            if (*p == '\n') fprintf(f, "  %-38s", "");
        }
        fputc('\n', f);
    }
    fprintf(f, "\nMODEL is a checkpoint directory as save_pretrained writes it (config.json + *.safetensors),\n"
               "opened through the library's family table; an architecture it does not list is refused.\n"
               "The families (architectures; 'generate' where the library runs the LLM):\n");
    /* the table's rows, those of one family on one line */
    int n = mmb_family_count();
    for (int i = 0; i < n; i++) {
        mmb_family_desc d, e;
        mmb_family_get(i, &d);
        int seen = 0, lm = d.has_lm;
        for (int k = 0; k < i && !seen; k++) seen = mmb_family_get(k, &e) == MMB_OK && !strcmp(e.name, d.name);
        if (seen) continue;
        fprintf(f, "  %-10s %s", d.name, d.architectures);
        for (int k = i + 1; k < n; k++)
            if (mmb_family_get(k, &e) == MMB_OK && !strcmp(e.name, d.name)) {
                fprintf(f, ", %s", e.architectures);
                lm |= e.has_lm;
            }
        fprintf(f, "%s\n", lm ? "; generate" : "");
    }
    fprintf(f, "\n"
               "  --version                             print the version\n"
               "  -h, --help                            this text; `mmbridge <command> --help` for a command\n");
}

int main(int argc, char **argv) {
    if (argc < 2) { usage(stderr); return 2; }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--version")) { printf("mmbridge %s\n", mmb_version()); return 0; }
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h")) { usage(stdout); return 0; }
    const char *names[CLI_N(commands)];
    for (int i = 0; i < CLI_N(commands); i++) {
        if (!strcmp(cmd, commands[i].name)) return commands[i].run(argc - 2, argv + 2);
        names[i] = commands[i].name;
    }
    const char *near = cli_nearest(cmd, names, CLI_N(commands));
    fprintf(stderr, "mmbridge: unknown command '%s'", cmd);
    if (near) fprintf(stderr, "; did you mean '%s'?", near);
    fprintf(stderr, "\n(mmbridge --help lists the commands)\n");
    return 2;
}
