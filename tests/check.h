/* A tiny test harness: CHECK records a failure with its line; DONE prints the closing line. */
#ifndef MMB_TEST_CHECK_H
#define MMB_TEST_CHECK_H
#include <stdio.h>

static int n_pass, n_fail;
#define CHECK(cond, ...)                                                        \
    do {                                                                        \
        if (cond) n_pass++;                                                     \
        else {                                                                  \
            n_fail++;                                                           \
            fprintf(stderr, "%s:%d: FAIL %s: ", __FILE__, __LINE__, #cond);     \
            fprintf(stderr, __VA_ARGS__);                                       \
            fputc('\n', stderr);                                                \
        }                                                                       \
    } while (0)
#define DONE(name) (printf("%s: %d passed, %d failed\n", name, n_pass, n_fail), n_fail != 0)
#endif
