/* What the libFuzzer targets share: one single-threaded context a process (freed at exit), and a temporary
 * directory of the process's own for the files a target writes (removed at exit with them). */
#ifndef MMB_FUZZ_UTIL_H
#define MMB_FUZZ_UTIL_H

#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static mmb_ctx *fuzz_ctx_;
static char fuzz_dir_[64], fuzz_file_[128];

static inline void fuzz_cleanup_(void) {
    if (fuzz_file_[0]) unlink(fuzz_file_);
    if (fuzz_dir_[0]) rmdir(fuzz_dir_);
    mmb_ctx_free(fuzz_ctx_);
}

/* The process's context (made on the first call). */
static inline mmb_ctx *fuzz_ctx(void) {
    if (!fuzz_ctx_) {
        mmb_ctx_params p = mmb_ctx_default_params();
        p.n_threads = 1;
        if (mmb_ctx_new(&p, &fuzz_ctx_) != MMB_OK) abort();
        atexit(fuzz_cleanup_);
    }
    return fuzz_ctx_;
}

/* A directory /tmp/mmb_fuzz_TAG_PID_XXXXXX made once, and the path of file `name` in it; returns the directory. */
static inline const char *fuzz_dir(const char *tag, const char *name) {
    if (!fuzz_dir_[0]) {
        fuzz_ctx();
        snprintf(fuzz_dir_, sizeof fuzz_dir_, "/tmp/mmb_fuzz_%s_%ld_XXXXXX", tag, (long)getpid());
        if (!mkdtemp(fuzz_dir_)) abort();
        snprintf(fuzz_file_, sizeof fuzz_file_, "%s/%s", fuzz_dir_, name);
    }
    return fuzz_dir_;
}

/* Writes n bytes as the directory's file. */
static inline void fuzz_write(const void *data, size_t n) {
    FILE *f = fopen(fuzz_file_, "wb");
    if (!f) abort();
    if (n && fwrite(data, 1, n, f) != n) abort();
    fclose(f);
}

#endif
