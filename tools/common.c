/* Helpers two or more of the CLI's commands share. */
#include "cli.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

int cli_fail(mmb_ctx *ctx, const char *what) {
    fprintf(stderr, "mmbridge: error: %s\n", ctx ? mmb_ctx_error(ctx) : what);
    return 1;
}

mmb_ctx *cli_ctx(const cli_ctx_opts *o) {
    static const mmb_dtype dts[] = {MMB_F32, MMB_BF16, MMB_F16, MMB_I8};  /* --dtype's choices, in order */
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = (int)o->threads;
    p.gemm = (mmb_gemm_backend)o->gemm;
    p.weight_dtype = dts[o->dtype];
    mmb_ctx *ctx = NULL;
    if (mmb_ctx_new(&p, &ctx) != MMB_OK)
        fprintf(stderr, "mmbridge: error: cannot create a context (a --gemm backend this build lacks?)\n");
    return ctx;
}

double cli_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int cli_write_text(const char *path, const char *text) {
    mmb_ctx_params p = mmb_ctx_default_params();
    p.n_threads = 1;
    mmb_ctx *ctx = NULL;
    if (mmb_ctx_new(&p, &ctx) != MMB_OK) return cli_fail(NULL, "cannot create a context");
    int r = mmb_file_write(ctx, path, text, strlen(text)) != MMB_OK ? cli_fail(ctx, NULL) : 0;
    mmb_ctx_free(ctx);
    return r;
}

void cli_free_list(char **v, int n) {
    for (int i = 0; v && i < n; i++) free(v[i]);
    free(v);
}

/* Appends a copy of dir/name (name alone when dir is NULL or name is absolute). 0, or 1 out of memory. */
static int push_path(char ***v, int *n, int *cap, const char *dir, const char *name) {
    if (*n == *cap) {
        char **nv = realloc(*v, sizeof **v * (size_t)(*cap = *cap ? 2 * *cap : 64));
        if (!nv) return 1;
        *v = nv;
    }
    size_t len = strlen(name) + (dir ? strlen(dir) + 2 : 1);
    if (!((*v)[*n] = malloc(len))) return 1;
    if (dir && name[0] != '/') snprintf((*v)[*n], len, "%s/%s", dir, name);
    else snprintf((*v)[*n], len, "%s", name);
    (*n)++;
    return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* A directory's files in name order, hidden ones skipped. Returns 0, 1 (out of memory), 2 (printed). */
static int push_dir(const char *path, char ***v, int *n, int *cap) {
    DIR *d = opendir(path);
    if (!d) { fprintf(stderr, "mmbridge: error: %s: %s\n", path, strerror(errno)); return 2; }
    int first = *n, bad = 0;
    for (struct dirent *e; !bad && (e = readdir(d));)
        if (e->d_name[0] != '.') bad = push_path(v, n, cap, path, e->d_name);
    closedir(d);
    if (bad) return bad;
    if (*n == first) {
        fprintf(stderr, "mmbridge: error: %s: an empty directory (no frames, no images in it)\n", path);
        return 2;
    }
    qsort(*v + first, (size_t)(*n - first), sizeof **v, cmp_str);
    return 0;
}

/* The paths a list file names one per line, relative to the list's directory. */
static int push_listed(const char *path, char ***v, int *n, int *cap) {
    FILE *f = fopen(path, "r");
    if (!f) { fprintf(stderr, "mmbridge: error: %s: %s\n", path, strerror(errno)); return 2; }
    char dir[4096], line[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    int first = *n, bad = 0;
    while (!bad && fgets(line, sizeof line, f)) {
        if (!strchr(line, '\n') && !feof(f)) {
            fprintf(stderr, "mmbridge: error: %s: a line longer than %zu bytes\n", path, sizeof line - 2);
            bad = 2;
            break;
        }
        char *a = line, *z = line + strlen(line);
        while (*a == ' ' || *a == '\t') a++;
        while (z > a && (z[-1] == '\n' || z[-1] == '\r' || z[-1] == ' ' || z[-1] == '\t')) *--z = 0;
        if (*a) bad = push_path(v, n, cap, slash ? dir : NULL, a);
    }
    fclose(f);
    if (!bad && *n == first) {
        fprintf(stderr, "mmbridge: error: %s: an empty list (no frames, no image paths in it)\n", path);
        bad = 2;
    }
    return bad;
}

/* Whether `path` names a list file: a .txt or .lst file. */
static int is_list(const char *path) {
    size_t n = strlen(path);
    return n > 4 && (!strcmp(path + n - 4, ".txt") || !strcmp(path + n - 4, ".lst"));
}

int cli_expand_inputs(const char *const *in, int n_in, int any_file_is_list, char ***out, int *n) {
    char **v = NULL;
    int cap = 0, bad = 0;
    *n = 0;
    for (int i = 0; i < n_in && !bad; i++) {
        struct stat st;
        if (stat(in[i], &st) != 0) {
            fprintf(stderr, "mmbridge: error: %s: %s\n", in[i], strerror(errno));
            bad = 2;
        } else if (S_ISDIR(st.st_mode))
            bad = push_dir(in[i], &v, n, &cap);
        else if (any_file_is_list || is_list(in[i]))
            bad = push_listed(in[i], &v, n, &cap);
        else
            bad = push_path(&v, n, &cap, NULL, in[i]);
    }
    if (bad == 1) fprintf(stderr, "mmbridge: error: out of memory\n");
    if (bad) { cli_free_list(v, *n); *n = 0; return 1; }
    *out = v;
    return 0;
}

int cli_open(mmb_ctx *ctx, const char *dir, const char *vision_tower, const mmb_dense_params *dense, int vision_only,
             const char *adapter, mmb_mllm **out) {
    mmb_mllm_params p = mmb_mllm_default_params();
    p.vision_tower = vision_tower;
    p.adapter = adapter;
    if (dense) p.dense = *dense;
    p.vision_only = vision_only;
    return mmb_mllm_open(ctx, dir, &p, out) != MMB_OK ? cli_fail(ctx, NULL) : 0;
}

void cli_print_routing(const mmb_model *m) {
    int64_t counts[256];
    int n = m ? mmb_model_routing_stats(m, counts, 256) : 0;
    if (n <= 0) return;
    printf("routing: tokens per expert:");
    for (int e = 0; e < n && e < 256; e++) printf(" %lld", (long long)counts[e]);
    printf("\n");
}
