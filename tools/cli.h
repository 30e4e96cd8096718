/* Shared by the CLI's files (tools/mmbridge.c, tools/compare.c). */
#ifndef MMB_CLI_H
#define MMB_CLI_H

#include "mmbridge.h"

#include <stdio.h>
#include <stdlib.h>

/* Prints ctx's last error (or `what` without a context) and returns 1, the CLI's failure exit. */
static inline int cli_fail(mmb_ctx *ctx, const char *what) {
    fprintf(stderr, "mmbridge: error: %s\n", ctx ? mmb_ctx_error(ctx) : what);
    return 1;
}

static inline int cli_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of n > 0 values (sorts them in place). */
static inline double cli_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cli_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* mmbridge compare (tools/compare.c). */
int cli_compare(int argc, char **argv);

/* mmbridge generate (tools/generate.c). */
int cli_generate(int argc, char **argv);

/* mmbridge tokenize (tools/tokenize.c). */
int cli_tokenize(int argc, char **argv);

#endif
