/* The CLI's option parser: each command declares its options in a table (name, value type, range or
 * choices, help line), and both the parsing and the --help text come from that table. */
#include "cli.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int cli_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 64 || lb > 64) return 1000;
    int row[65];
    for (size_t j = 0; j <= lb; j++) row[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        int diag = row[0];
        row[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int up = row[j], best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

const char *cli_nearest(const char *word, const char *const *cands, int n) {
    const char *best = NULL;
    int bd = 1000, limit = (int)strlen(word) / 3;
    if (limit < 1) limit = 1;
    if (limit > 3) limit = 3;
    for (int i = 0; i < n; i++) {
        int d = cli_distance(word, cands[i]);
        if (d < bd) { bd = d; best = cands[i]; }
    }
    return bd <= limit ? best : NULL;
}

/* The value's description appended to the help line: the range, the choices. */
static void value_note(const cli_opt *o, char *buf, size_t n) {
    buf[0] = 0;
    if (o->type == CLI_INT) snprintf(buf, n, " [%.0f..%.0f]", o->lo, o->hi);
    else if (o->type == CLI_NUM) snprintf(buf, n, " [%g..%g]", o->lo, o->hi);
    else if (o->type == CLI_CHOICE) snprintf(buf, n, " (%s)", o->choices);
    else if (o->type == CLI_STRS) snprintf(buf, n, " (repeatable, at most %d)", o->max);
}

void cli_help(const cli_spec *s, FILE *f) {
    fprintf(f, "usage: mmbridge %s %s%s\n\n%s", s->cmd, s->args, s->n_opts ? " [options]" : "", s->about);
    fprintf(f, "\noptions:\n");
    for (int i = 0; i <= s->n_opts; i++) {
        const cli_opt *o = i < s->n_opts ? &s->opts[i] : NULL;
        char left[64], note[96];
        snprintf(left, sizeof left, "%s%s%s", o ? o->name : "-h, --help", o && o->meta ? " " : "",
                 o && o->meta ? o->meta : "");
        if (o) value_note(o, note, sizeof note);
        else note[0] = 0;
        const char *h = o ? o->help : "this text";
        fprintf(f, "  %-20s", left);
        if (strlen(left) > 20) fprintf(f, "\n  %-20s", "");
        /* continuation lines of a help text line up under its first */
        for (const char *p = h; *p; p++) {
            fputc(*p, f);
            if (*p == '\n') fprintf(f, "  %-20s", "");
        }
        fprintf(f, "%s\n", note);
    }
}

/* What an option's value must be: "f32, bf16, f16 or int8", "a whole number in 1..1024", ... */
static void wants(const cli_opt *o, char *buf, size_t n) {
    if (o->type == CLI_INT) snprintf(buf, n, "a whole number in %.0f..%.0f", o->lo, o->hi);
    else if (o->type == CLI_NUM) snprintf(buf, n, "a number in %g..%g", o->lo, o->hi);
    else if (o->type == CLI_CHOICE) {
        const char *last = strrchr(o->choices, '|');
        size_t k = 0;
        for (const char *c = o->choices; *c && k + 8 < n; c++) {
            if (*c != '|') buf[k++] = *c;
            else if (c == last) k += (size_t)snprintf(buf + k, n - k, " or ");
            else k += (size_t)snprintf(buf + k, n - k, ", ");
        }
        buf[k < n ? k : n - 1] = 0;
    } else
        snprintf(buf, n, "%s", o->meta);
}

static int bad_value(const cli_spec *s, const cli_opt *o, const char *v) {
    char w[160];
    wants(o, w, sizeof w);
    if (v) fprintf(stderr, "mmbridge %s: %s wants %s (got '%s')\n", s->cmd, o->name, w, v);
    else fprintf(stderr, "mmbridge %s: %s wants a value: %s\n", s->cmd, o->name, w);
    return 2;
}

static int set_value(const cli_spec *s, const cli_opt *o, const char *v) {
    char *end = NULL;
    switch (o->type) {
    case CLI_FLAG: *(int *)o->dst = 1; return 0;
    case CLI_STR: *(const char **)o->dst = v; return 0;
    case CLI_STRS:
        if (*o->count == o->max) {
            fprintf(stderr, "mmbridge %s: %s: at most %d\n", s->cmd, o->name, o->max);
            return 2;
        }
        ((const char **)o->dst)[(*o->count)++] = v;
        return 0;
    case CLI_INT: {
        errno = 0;
        long long x = strtoll(v, &end, 10);
        if (end == v || *end || errno || (double)x < o->lo || (double)x > o->hi) return bad_value(s, o, v);
        *(int64_t *)o->dst = x;
        return 0;
    }
    case CLI_NUM: {
        errno = 0;
        double x = strtod(v, &end);
        if (end == v || *end || errno || !(x >= o->lo && x <= o->hi)) return bad_value(s, o, v);
        *(double *)o->dst = x;
        return 0;
    }
    case CLI_CHOICE: {
        size_t len = strlen(v);
        int k = 0;
        for (const char *c = o->choices; *c; k++) {
            const char *bar = strchr(c, '|');
            size_t cl = bar ? (size_t)(bar - c) : strlen(c);
            if (cl == len && strncmp(c, v, len) == 0) {
                *(int *)o->dst = k;
                return 0;
            }
            c += cl + (bar != NULL);
        }
        return bad_value(s, o, v);
    }
    case CLI_CUSTOM: return o->fn(o->name, v, o->dst);
    }
    return 2;
}

static int unknown(const cli_spec *s, const char *a) {
    const char *names[128];
    int n = 0;
    names[n++] = "--help";
    for (int i = 0; i < s->n_opts && n < 128; i++) names[n++] = s->opts[i].name;
    char word[80];
    snprintf(word, sizeof word, "%.*s", (int)strcspn(a, "="), a);
    const char *near = cli_nearest(word, names, n);
    fprintf(stderr, "mmbridge %s: unknown option '%s'", s->cmd, word);
    if (near) fprintf(stderr, "; did you mean '%s'?", near);
    fprintf(stderr, "\n(mmbridge %s --help lists the options)\n", s->cmd);
    return 2;
}

int cli_parse(const cli_spec *s, int argc, char **argv) {
    int np = 0, only_pos = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!only_pos && (!strcmp(a, "--help") || !strcmp(a, "-h"))) {
            cli_help(s, stdout);
            return 1;
        }
        if (!only_pos && !strcmp(a, "--")) { only_pos = 1; continue; }
        if (only_pos || a[0] != '-' || !a[1]) {  /* "-" alone is a positional (standard input/output) */
            if (np == s->max_pos) {
                fprintf(stderr, "mmbridge %s: unexpected argument '%s'\nusage: mmbridge %s %s\n", s->cmd, a, s->cmd,
                        s->args);
                return 2;
            }
            s->pos[np++] = a;
            continue;
        }
        /* --name=value is the same as --name value */
        const char *eq = strchr(a, '=');
        size_t len = eq && a[1] == '-' ? (size_t)(eq - a) : strlen(a);
        const cli_opt *o = NULL;
        for (int k = 0; k < s->n_opts && !o; k++)
            if (strlen(s->opts[k].name) == len && !strncmp(s->opts[k].name, a, len)) o = &s->opts[k];
        if (!o) return unknown(s, a);
        const char *v = NULL;
        if (o->type == CLI_FLAG) {
            if (len != strlen(a)) { fprintf(stderr, "mmbridge %s: %s takes no value\n", s->cmd, o->name); return 2; }
        } else if (len != strlen(a)) v = a + len + 1;
        else if (i + 1 < argc) v = argv[++i];
        else return bad_value(s, o, NULL);
        int r = set_value(s, o, v);
        if (r) return r;
    }
    if (s->n_pos) *s->n_pos = np;
    if (np < s->min_pos) {
        fprintf(stderr, "mmbridge %s: missing arguments\nusage: mmbridge %s %s\n(mmbridge %s --help for more)\n", s->cmd,
                s->cmd, s->args, s->cmd);
        return 2;
    }
    return 0;
}

int64_t *cli_int_list(const char *opt, const char *v, int64_t lo, int64_t hi, int64_t *n) {
    int64_t cap = 16, *a = malloc(sizeof *a * (size_t)cap);
    *n = 0;
    for (const char *q = v; a && *q;) {
        char *end;
        errno = 0;
        long long x = strtoll(q, &end, 10);
        if (end == q || errno || x < lo || x > hi || (*end && *end != ',')) {
            fprintf(stderr, "mmbridge: %s wants comma-separated integers in [%lld, %lld]\n", opt, (long long)lo,
                    (long long)hi);
            free(a);
            return NULL;
        }
        if (*n == cap) {
            int64_t *b = realloc(a, sizeof *a * (size_t)(cap *= 2));
            if (!b) free(a);
            a = b;
            if (!a) break;
        }
        a[(*n)++] = x;
        q = *end ? end + 1 : end;
    }
    if (!a || *n == 0) {
        fprintf(stderr, a ? "mmbridge: %s is empty\n" : "mmbridge: %s: out of memory\n", opt);
        free(a);
        return NULL;
    }
    return a;
}

/* ---- the Dense Connector's options ---- */

/* "8,16,24" (paper numbering) -> the final layer and the shallow ones; "1-12,13-24" -> groups. HF
 * indices are one less. */
static int dense_list(const char *opt, const char *v, int ranges, mmb_dense_params *p) {
    int first[MMB_MAX_TAPS], last[MMB_MAX_TAPS], n = 0;
    const char *q = v;
    while (*q && n < MMB_MAX_TAPS) {
        char *end;
        long a = strtol(q, &end, 10), b = a;
        if (end != q && ranges && *end == '-') {
            const char *r = end + 1;
            b = strtol(r, &end, 10);
            if (end == r) break;
        }
        if (end == q || (*end && *end != ',') || a < 1 || b < a || b > 100000) break;
        first[n] = (int)a - 1;
        last[n++] = (int)b - 1;
        q = *end ? end + 1 : end;
    }
    if (*q || n < (ranges ? 1 : 2)) {
        fprintf(stderr, "mmbridge: %s wants %s\n", opt, ranges ? "paper layer ranges, e.g. 1-12,13-24"
                                                                 : "two or more paper layer numbers, e.g. 8,16,24");
        return 2;
    }
    if (ranges) {
        p->n_groups = n;
        memcpy(p->group_first, first, sizeof first);
        memcpy(p->group_last, last, sizeof last);
    } else {
        p->use_final = 1;
        p->final_layer = first[n - 1];
        p->n_layers = n - 1;
        memcpy(p->layers, first, sizeof first);
    }
    return 0;
}

int cli_dense_opt(const char *a, const char *v, void *dense) {
    mmb_dense_params *p = dense;
    if (!strcmp(a, "--dense")) {
        p->type = !strcmp(v, "sti") ? MMB_DENSE_STI : !strcmp(v, "sci") ? MMB_DENSE_SCI
                : !strcmp(v, "dci") ? MMB_DENSE_DCI : MMB_DENSE_NONE;
        if (!p->type) { fprintf(stderr, "mmbridge: --dense wants sti, sci or dci\n"); return 2; }
        return 0;
    }
    if (!strcmp(a, "--dense-layers") || !strcmp(a, "--dense-groups")) return dense_list(a, v, a[8] == 'g', p);
    char *end;
    long n = strtol(v, &end, 10);
    if (end == v || *end || n < 1 || n > 1000000) { fprintf(stderr, "mmbridge: %s wants a positive number\n", a); return 2; }
    if (!strcmp(a, "--dense-pool")) p->pool = (int)n;
    else p->tokens = n;
    return 0;
}
