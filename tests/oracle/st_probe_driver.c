/* Opens the safetensors file argv[1] and prints "<tensors> <probes>": the entries it holds and the key
 * comparisons the header's duplicate check made (mmb__st_probes), so a test can bound the parse's work
 * by a count instead of a clock. Exits 1 with the library's message when the file is refused. */
#include "internal.h"

#include <stdio.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = {.n_threads = 1};
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 2;
    mmb_st_file *f = NULL;
    if (mmb_st_open(ctx, argv[1], &f) != MMB_OK) {
        fprintf(stderr, "%s\n", mmb_ctx_error(ctx));
        mmb_ctx_free(ctx);
        return 1;
    }
    printf("%d %llu\n", mmb_st_count(f), (unsigned long long)mmb__st_probes(f));
    mmb_st_close(f);
    mmb_ctx_free(ctx);
    return 0;
}
