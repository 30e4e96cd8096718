/* Opens the safetensors file argv[1] and prints "<tensors> <probes>": the entries it holds and the key
 * comparisons the header's duplicate check made (mmb__st_probes), so a test can bound the parse's work
 * by a count instead of a clock. With a second argument "truncate", it then truncates the open file to
 * half its size and prints what mmb__st_verify says (the re-check before a forward pass), exiting 3 when
 * the truncation is caught. Exits 1 with the library's message when the file is refused. */
#define _POSIX_C_SOURCE 200809L /* truncate(), which -std=c11 hides */
#include "internal.h"

#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) return 2;
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
    int rc = 0;
    if (argc == 3 && strcmp(argv[2], "truncate") == 0) {
        struct stat st;
        if (stat(argv[1], &st) != 0 || truncate(argv[1], st.st_size / 2) != 0) rc = 2;
        else if (mmb__st_verify(ctx, f) != MMB_OK) { fprintf(stderr, "%s\n", mmb_ctx_error(ctx)); rc = 3; }
    }
    mmb_st_close(f);
    mmb_ctx_free(ctx);
    return rc;
}
