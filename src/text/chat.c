/* Chat templates: a checkpoint's Jinja chat template rendered by a Jinja subset, byte for byte as
 * transformers' apply_chat_template renders it (jinja2 with trim_blocks, lstrip_blocks, the loop
 * controls, no trailing newline kept, and transformers' raise_exception, tojson, namespace,
 * strftime_now globals).
 *
 * The subset: text; {{ expr }}; {# comments #}; {% if / elif / else / endif %}; {% for x in xs [if c] %}
 * (tuple targets, loop.index / index0 / revindex / revindex0 / first / last / length / previtem /
 * nextitem, {% else %}, break, continue); {% set x = e %} and {% set ns.attr = e %};
 * {% generation %}; whitespace control with - and +. Expressions: literals (strings, numbers,
 * true / false / none, lists, dicts), names, .attr, [item], [a:b:c], calls, filters, `is` tests,
 * + - * / // % ~, comparisons, in / not in, and / or / not, a if c else b. Filters, tests and methods
 * are the ones chat templates use (see the tables below); anything else is refused by name.
 *
 * Values live in an arena freed after the render; errors unwind with longjmp to the entry point.
 *
 * A template is a program from the internet (issue 20), so a render is bounded; each limit is an
 * MMB_ERR_FORMAT naming the template and the limit:
 *   - JMAX_DEPTH: one depth counter shared by the parser (parentheses, `not`, unary minus, blocks) and
 *     every recursive walker (evaluation, statement bodies, printing, tojson, equality, JSON input), so
 *     no input overflows the C stack; printing and tojson also refuse a container that contains itself.
 *     The templates of tests/oracle/test_chat_template.py (Llama 2 / 3, Mistral, Vicuna, llava-hf,
 *     Qwen2 / 2.5 / 2-VL) reach depth 10, all of these counted together.
 *   - JMAX_STEPS: evaluated expressions, executed statements and loop iterations (plus one step per
 *     list item a filter walks and per 64 bytes a string method scans). Those templates take 41k-108k
 *     steps for 2000 messages; 20M steps run in ~0.4 s.
 *   - JMAX_OUTPUT: bytes of rendered text (a 1M-token prompt is ~4 MB).
 *   - JMAX_ARENA: bytes of the arena, which keeps every intermediate value until the end of the render
 *     (3-7 KB a message in those templates; 'x' * n is refused before it allocates).
 *   - JMAX_RANGE: range() lengths, Jinja2's sandbox's MAX_RANGE.
 * Integers are exact int64; a result beyond 64 bits (9223372036854775807 * 2, 3 ** 100, a literal
 * beyond int64, (-2**63) // -1) is refused: Jinja2 computes a Python big integer there, and promoting
 * to float would print a different number without an error. Division and modulo by zero are errors as
 * in Python. */
#include "text/text.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <utf8proc.h>

#define JMAX_DEPTH 256
#define JMAX_STEPS 20000000ull
#define JMAX_OUTPUT ((size_t)64 << 20)
#define JMAX_ARENA ((size_t)512 << 20)
#define JMAX_RANGE 100000

/* ---- arena ----------------------------------------------------------------------------------- */

typedef struct blk {
    struct blk *next;
    size_t used, cap;
    max_align_t data[];
} blk;

typedef struct jctx jctx;
static _Noreturn void fail(jctx *J, mmb_status s, int line, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* ---- values ---------------------------------------------------------------------------------- */

typedef enum { T_UNDEF, T_NONE, T_BOOL, T_INT, T_FLOAT, T_STR, T_LIST, T_DICT, T_NS, T_FN } vtype;

typedef struct vlist vlist;
typedef struct vdict vdict;

typedef struct val {
    vtype t;
    bool parts;              /* T_STR: a message's content, iterated as [{"type": "text", "text": s}] */
    union {
        bool b;
        int64_t i;
        double f;
        struct { const char *p; size_t n; } s;
        vlist *l;
        vdict *d;            /* T_DICT, T_NS */
        int fn;              /* T_FN: a global function */
    } u;
    const char *name;        /* T_UNDEF: the name that was undefined (for messages) */
} val;

struct vlist { val *v; int n, cap; };
struct vdict { val *k; val *v; int n, cap; }; /* keys are strings */

enum { FN_RAISE, FN_NAMESPACE, FN_RANGE, FN_DICT, FN_STRFTIME };

/* ---- the template's parse tree ----------------------------------------------------------------- */

typedef enum {
    E_LIT, E_NAME, E_ATTR, E_ITEM, E_SLICE, E_CALL, E_FILTER, E_TEST, E_BIN, E_NOT, E_NEG, E_AND, E_OR, E_COND,
    E_LIST, E_DICT
} etype;

typedef struct expr expr;
struct expr {
    etype t;
    int line, op, nargs;
    bool negate;
    val lit;
    const char *name;        /* E_NAME, E_ATTR, E_FILTER, E_TEST */
    expr *a, *b, *c;         /* operands; E_SLICE: a[b:c:args[0]] */
    expr **args;             /* E_CALL, E_FILTER, E_TEST: arguments; E_LIST / E_DICT items (k, v pairs) */
    const char **kw;         /* keyword names (NULL for positional) */
};

enum { OP_ADD = 1, OP_SUB, OP_MUL, OP_DIV, OP_FLOORDIV, OP_MOD, OP_POW, OP_CONCAT, OP_EQ, OP_NE, OP_LT, OP_GT, OP_LE,
       OP_GE, OP_IN, OP_NOTIN };

typedef enum { N_TEXT, N_OUT, N_IF, N_FOR, N_SET, N_SETATTR, N_BREAK, N_CONTINUE, N_BODY } ntype;

typedef struct node node;
struct node {
    ntype t;
    int line;
    const char *text;        /* N_TEXT */
    size_t len;
    expr *e;                 /* N_OUT, N_SET value, N_IF condition, N_FOR iterable */
    expr *cond;              /* N_FOR: the `if` filter */
    const char *names[4];    /* N_FOR targets, N_SET target, N_SETATTR object */
    int nnames;
    const char *attr;        /* N_SETATTR */
    node **kids;             /* N_BODY: statements; N_IF / N_FOR: [then, else] bodies */
    int nkids;
};

/* ---- interpreter state -------------------------------------------------------------------------- */

struct jctx {
    mmb_ctx *ctx;
    const char *src_name;
    jmp_buf jb;
    blk *mem;
    /* lexer */
    const char *src;
    size_t pos, len;
    int line;
    bool line_start;         /* the previous tag's match ended a line (jinja2's line_starting) */
    /* expression tokens of the current tag */
    struct tok { int k; const char *p; size_t n; int line; } *toks;
    int ntok, tpos, tcap;
    /* scopes: [0] the globals and the caller's variables */
    vdict **scope;
    int nscope, scope_cap;
    /* output */
    char *out;
    size_t on, ocap;
    /* limits (see the top of the file) */
    int depth;                       /* shared by the parser and every recursive walker */
    uint64_t steps;
    size_t arena;                    /* bytes taken from the arena */
    const void *active[JMAX_DEPTH + 1]; /* containers being printed (cycle detection) */
    int nactive;
};

static void *jalloc(jctx *J, size_t n) {
    if (n > JMAX_ARENA || J->arena + n > JMAX_ARENA)
        fail(J, MMB_ERR_FORMAT, 0, "the template needs more than %zu MiB of working memory (the arena limit)", JMAX_ARENA >> 20);
    n = (n + 15) & ~(size_t)15;
    J->arena += n;
    if (!J->mem || J->mem->used + n > J->mem->cap) {
        size_t cap = n > 65536 ? n : 65536;
        blk *b = malloc(sizeof *b + cap);
        if (!b) fail(J, MMB_ERR_NOMEM, 0, "out of memory");
        b->next = J->mem;
        b->used = 0;
        b->cap = cap;
        J->mem = b;
    }
    void *p = (char *)J->mem->data + J->mem->used;
    J->mem->used += n;
    memset(p, 0, n);
    return p;
}

static char *jstrndup(jctx *J, const char *s, size_t n) {
    char *p = jalloc(J, n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

static _Noreturn void fail(jctx *J, mmb_status s, int line, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (line > 0) mmb__err(J->ctx, s, "chat template (%s) line %d: %s", J->src_name, line, msg);
    else mmb__err(J->ctx, s, "chat template (%s): %s", J->src_name, msg);
    longjmp(J->jb, (int)s);
}

/* The shared depth counter: every recursive function calls deeper() on entry and J->depth-- on return
 * (an error unwinds past the decrements, and the render ends). */
static void deeper(jctx *J, int line) {
    if (++J->depth > JMAX_DEPTH)
        fail(J, MMB_ERR_FORMAT, line, "nesting deeper than %d levels (the depth limit, shared by expressions, blocks and values)", JMAX_DEPTH);
}

static void step(jctx *J, int line, uint64_t n) {
    J->steps += n;
    if (J->steps > JMAX_STEPS)
        fail(J, MMB_ERR_FORMAT, line, "the template ran more than %llu steps (the execution budget)", (unsigned long long)JMAX_STEPS);
}

/* Cycle detection for the printers: a container being printed that is reached again. */
static void enter_container(jctx *J, const void *p, int line, const char *what) {
    for (int i = 0; i < J->nactive; i++)
        if (J->active[i] == p) fail(J, MMB_ERR_FORMAT, line, "%s: a namespace or list that contains itself (a cycle)", what);
    J->active[J->nactive++] = p; /* nactive <= depth <= JMAX_DEPTH: deeper() runs first */
}

/* ---- value helpers ------------------------------------------------------------------------------- */

static val v_undef(const char *name) { val v = {0}; v.t = T_UNDEF; v.name = name; return v; }
static val v_none(void) { val v = {0}; v.t = T_NONE; return v; }
static val v_bool(bool b) { val v = {0}; v.t = T_BOOL; v.u.b = b; return v; }
static val v_int(int64_t i) { val v = {0}; v.t = T_INT; v.u.i = i; return v; }
static val v_float(double f) { val v = {0}; v.t = T_FLOAT; v.u.f = f; return v; }
static val v_str(const char *p, size_t n) { val v = {0}; v.t = T_STR; v.u.s.p = p; v.u.s.n = n; return v; }
static val v_cstr(const char *p) { return v_str(p, strlen(p)); }

static val v_list(jctx *J) { val v = {0}; v.t = T_LIST; v.u.l = jalloc(J, sizeof(vlist)); return v; }
static val v_dict(jctx *J) { val v = {0}; v.t = T_DICT; v.u.d = jalloc(J, sizeof(vdict)); return v; }

static void l_push(jctx *J, vlist *l, val x) {
    if (l->n == l->cap) {
        int c = l->cap ? l->cap * 2 : 8;
        val *nv = jalloc(J, (size_t)c * sizeof *nv);
        if (l->n) memcpy(nv, l->v, (size_t)l->n * sizeof *nv);
        l->v = nv;
        l->cap = c;
    }
    l->v[l->n++] = x;
}

static bool str_eq(val a, const char *s, size_t n) { return a.t == T_STR && a.u.s.n == n && memcmp(a.u.s.p, s, n) == 0; }

static int d_find(const vdict *d, const char *k, size_t n) {
    for (int i = 0; d && i < d->n; i++)
        if (str_eq(d->k[i], k, n)) return i;
    return -1;
}

static void d_set(jctx *J, vdict *d, val k, val x) {
    int i = d_find(d, k.u.s.p, k.u.s.n);
    if (i >= 0) { d->v[i] = x; return; }
    if (d->n == d->cap) {
        int c = d->cap ? d->cap * 2 : 8;
        val *nk = jalloc(J, (size_t)c * sizeof *nk), *nv = jalloc(J, (size_t)c * sizeof *nv);
        if (d->n) { memcpy(nk, d->k, (size_t)d->n * sizeof *nk); memcpy(nv, d->v, (size_t)d->n * sizeof *nv); }
        d->k = nk;
        d->v = nv;
        d->cap = c;
    }
    d->k[d->n] = k;
    d->v[d->n++] = x;
}

static void d_setc(jctx *J, vdict *d, const char *k, val x) { d_set(J, d, v_cstr(k), x); }

static const char *type_name(val v) {
    static const char *const n[] = {"undefined", "none", "bool", "int", "float", "str", "list", "dict", "namespace", "function"};
    return n[v.t];
}

static bool truthy(val v) {
    switch (v.t) {
    case T_UNDEF: case T_NONE: return false;
    case T_BOOL: return v.u.b;
    case T_INT: return v.u.i != 0;
    case T_FLOAT: return v.u.f != 0;
    case T_STR: return v.u.s.n > 0;
    case T_LIST: return v.u.l->n > 0;
    case T_DICT: return v.u.d->n > 0;
    default: return true;
    }
}

/* ---- a growable string in the arena ---------------------------------------------------------- */

typedef struct jbuf { char *p; size_t n, cap; } jbuf;

static void jb_put(jctx *J, jbuf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        if (n > JMAX_ARENA || b->n + n + 1 > JMAX_ARENA)
            fail(J, MMB_ERR_FORMAT, 0, "a string longer than %zu MiB (the arena limit)", JMAX_ARENA >> 20);
        size_t c = b->cap ? b->cap * 2 : 64;
        while (c < b->n + n + 1) c *= 2;
        char *np = jalloc(J, c);
        if (b->n) memcpy(np, b->p, b->n);
        b->p = np;
        b->cap = c;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void jb_str(jctx *J, jbuf *b, const char *s) { jb_put(J, b, s, strlen(s)); }

/* Python's repr of a float. */
static void fmt_float(char *buf, size_t cap, double f) {
    if (isnan(f)) { snprintf(buf, cap, "nan"); return; }
    if (isinf(f)) { snprintf(buf, cap, f > 0 ? "inf" : "-inf"); return; }
    char e[64];
    int prec = 1;
    for (; prec <= 17; prec++) {
        snprintf(e, sizeof e, "%.*e", prec - 1, f);
        if (strtod(e, NULL) == f) break;
    }
    int exp10 = atoi(strchr(e, 'e') + 1);
    if (exp10 >= -5 && exp10 < 16) {
        int dec = prec - 1 - exp10;
        snprintf(buf, cap, "%.*f", dec > 0 ? dec : 0, f);
        if (!strchr(buf, '.')) strncat(buf, ".0", cap - strlen(buf) - 1);
    } else {
        char mant[40];
        snprintf(mant, sizeof mant, "%.*e", prec - 1, f);
        *strchr(mant, 'e') = 0;
        snprintf(buf, cap, "%se%s%02d", mant, exp10 < 0 ? "-" : "+", abs(exp10));
    }
}

static void repr_str(jctx *J, jbuf *b, val s) {
    bool dq = memchr(s.u.s.p, '\'', s.u.s.n) && !memchr(s.u.s.p, '"', s.u.s.n);
    char q = dq ? '"' : '\'';
    jb_put(J, b, &q, 1);
    for (size_t i = 0; i < s.u.s.n; i++) {
        unsigned char c = (unsigned char)s.u.s.p[i];
        char tmp[8];
        if (c == '\\' || c == (unsigned char)q) { tmp[0] = '\\'; tmp[1] = (char)c; jb_put(J, b, tmp, 2); }
        else if (c == '\n') jb_str(J, b, "\\n");
        else if (c == '\r') jb_str(J, b, "\\r");
        else if (c == '\t') jb_str(J, b, "\\t");
        else if (c < 0x20 || c == 0x7f) { snprintf(tmp, sizeof tmp, "\\x%02x", c); jb_str(J, b, tmp); }
        else jb_put(J, b, (const char *)&c, 1);
    }
    jb_put(J, b, &q, 1);
}

/* str(v) as Python prints it; inside a container, strings are repr'd. */
static void to_str(jctx *J, jbuf *b, val v, bool nested) {
    char tmp[64];
    switch (v.t) {
    case T_UNDEF: break;
    case T_NONE: jb_str(J, b, "None"); break;
    case T_BOOL: jb_str(J, b, v.u.b ? "True" : "False"); break;
    case T_INT: snprintf(tmp, sizeof tmp, "%lld", (long long)v.u.i); jb_str(J, b, tmp); break;
    case T_FLOAT: fmt_float(tmp, sizeof tmp, v.u.f); jb_str(J, b, tmp); break;
    case T_STR: if (nested) repr_str(J, b, v); else jb_put(J, b, v.u.s.p, v.u.s.n); break;
    case T_LIST:
        deeper(J, 0);
        enter_container(J, v.u.l, 0, "printing");
        jb_str(J, b, "[");
        for (int i = 0; i < v.u.l->n; i++) { if (i) jb_str(J, b, ", "); to_str(J, b, v.u.l->v[i], true); }
        jb_str(J, b, "]");
        J->nactive--;
        J->depth--;
        break;
    case T_DICT: case T_NS:
        deeper(J, 0);
        enter_container(J, v.u.d, 0, "printing");
        jb_str(J, b, v.t == T_NS ? "<Namespace {" : "{");
        for (int i = 0; i < v.u.d->n; i++) {
            if (i) jb_str(J, b, ", ");
            to_str(J, b, v.u.d->k[i], true);
            jb_str(J, b, ": ");
            to_str(J, b, v.u.d->v[i], true);
        }
        jb_str(J, b, v.t == T_NS ? "}>" : "}");
        J->nactive--;
        J->depth--;
        break;
    case T_FN: jb_str(J, b, "<function>"); break;
    }
}

static val stringify(jctx *J, val v) {
    if (v.t == T_STR) return v;
    jbuf b = {0};
    jb_put(J, &b, "", 0);
    to_str(J, &b, v, false);
    return v_str(b.p, b.n);
}

/* json.dumps(v, ensure_ascii=False, indent=indent (<0: None), sort_keys=False). */
static void to_json(jctx *J, jbuf *b, val v, int indent, int level, int line) {
    char tmp[64];
    switch (v.t) {
    case T_NONE: jb_str(J, b, "null"); return;
    case T_BOOL: jb_str(J, b, v.u.b ? "true" : "false"); return;
    case T_INT: snprintf(tmp, sizeof tmp, "%lld", (long long)v.u.i); jb_str(J, b, tmp); return;
    case T_FLOAT:
        if (isnan(v.u.f)) jb_str(J, b, "NaN");
        else if (isinf(v.u.f)) jb_str(J, b, v.u.f > 0 ? "Infinity" : "-Infinity");
        else { fmt_float(tmp, sizeof tmp, v.u.f); jb_str(J, b, tmp); }
        return;
    case T_STR:
        jb_str(J, b, "\"");
        for (size_t i = 0; i < v.u.s.n; i++) {
            unsigned char c = (unsigned char)v.u.s.p[i];
            if (c == '"') jb_str(J, b, "\\\"");
            else if (c == '\\') jb_str(J, b, "\\\\");
            else if (c == '\n') jb_str(J, b, "\\n");
            else if (c == '\r') jb_str(J, b, "\\r");
            else if (c == '\t') jb_str(J, b, "\\t");
            else if (c == '\b') jb_str(J, b, "\\b");
            else if (c == '\f') jb_str(J, b, "\\f");
            else if (c < 0x20) { snprintf(tmp, sizeof tmp, "\\u%04x", c); jb_str(J, b, tmp); }
            else jb_put(J, b, (const char *)&c, 1);
        }
        jb_str(J, b, "\"");
        return;
    case T_LIST: case T_DICT: {
        bool isl = v.t == T_LIST;
        int n = isl ? v.u.l->n : v.u.d->n;
        jb_str(J, b, isl ? "[" : "{");
        if (n == 0) { jb_str(J, b, isl ? "]" : "}"); return; }
        deeper(J, line);
        enter_container(J, isl ? (const void *)v.u.l : (const void *)v.u.d, line, "tojson");
        for (int i = 0; i < n; i++) {
            if (i) jb_str(J, b, indent >= 0 ? "," : ", ");
            if (indent >= 0) {
                jb_str(J, b, "\n");
                for (int k = 0; k < indent * (level + 1); k++) jb_str(J, b, " ");
            }
            if (!isl) { to_json(J, b, v.u.d->k[i], indent, level + 1, line); jb_str(J, b, ": "); }
            to_json(J, b, isl ? v.u.l->v[i] : v.u.d->v[i], indent, level + 1, line);
        }
        if (indent >= 0) {
            jb_str(J, b, "\n");
            for (int k = 0; k < indent * level; k++) jb_str(J, b, " ");
        }
        jb_str(J, b, isl ? "]" : "}");
        J->nactive--;
        J->depth--;
        return;
    }
    default: fail(J, MMB_ERR_FORMAT, line, "tojson: a %s is not JSON serializable", type_name(v));
    }
}

/* ---- lexer: template text into tags ------------------------------------------------------------ */

enum { K_EOF, K_NAME, K_STR, K_INT, K_FLOAT, K_OP };

static bool is_ident(char c) { return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

static void push_tok(jctx *J, int k, const char *p, size_t n, int line) {
    if (J->ntok == J->tcap) {
        int c = J->tcap ? J->tcap * 2 : 64;
        struct tok *nt = jalloc(J, (size_t)c * sizeof *nt);
        if (J->ntok) memcpy(nt, J->toks, (size_t)J->ntok * sizeof *nt);
        J->toks = nt;
        J->tcap = c;
    }
    J->toks[J->ntok++] = (struct tok){k, p, n, line};
}

/* Tokenizes the inside of a tag from J->pos up to its closer ("}}" or "%}", optionally "-"-prefixed);
 * leaves J->pos after the closer and returns whether the closer had "-" (or "+" as *plus). */
static bool lex_tag(jctx *J, const char *closer, bool *plus) {
    J->ntok = J->tpos = 0;
    const char *s = J->src;
    *plus = false;
    for (;;) {
        while (J->pos < J->len && (s[J->pos] == ' ' || s[J->pos] == '\t' || s[J->pos] == '\n' || s[J->pos] == '\r')) {
            if (s[J->pos] == '\n') J->line++;
            J->pos++;
        }
        if (J->pos >= J->len) fail(J, MMB_ERR_FORMAT, J->line, "unterminated tag (no '%s')", closer);
        size_t p = J->pos;
        char c = s[p];
        if ((c == '-' || c == '+') && p + 2 < J->len + 1 && strncmp(s + p + 1, closer, 2) == 0) {
            J->pos = p + 3;
            *plus = c == '+';
            return c == '-';
        }
        if (strncmp(s + p, closer, 2) == 0) { J->pos = p + 2; return false; }
        if (c == '\'' || c == '"') {
            size_t q = p + 1;
            while (q < J->len && s[q] != c) { if (s[q] == '\\') q++; if (q < J->len && s[q] == '\n') J->line++; q++; }
            if (q >= J->len) fail(J, MMB_ERR_FORMAT, J->line, "unterminated string literal");
            push_tok(J, K_STR, s + p + 1, q - p - 1, J->line);
            J->pos = q + 1;
        } else if (c >= '0' && c <= '9') {
            size_t q = p;
            bool fl = false;
            while (q < J->len && ((s[q] >= '0' && s[q] <= '9') || s[q] == '_' ||
                                  (s[q] == '.' && q + 1 < J->len && s[q + 1] >= '0' && s[q + 1] <= '9') ||
                                  ((s[q] == 'e' || s[q] == 'E') && q > p))) {
                if (s[q] == '.' || s[q] == 'e' || s[q] == 'E') fl = true;
                if ((s[q] == 'e' || s[q] == 'E') && q + 1 < J->len && (s[q + 1] == '-' || s[q + 1] == '+')) q++;
                q++;
            }
            push_tok(J, fl ? K_FLOAT : K_INT, s + p, q - p, J->line);
            J->pos = q;
        } else if (is_ident(c)) {
            size_t q = p;
            while (q < J->len && is_ident(s[q])) q++;
            push_tok(J, K_NAME, s + p, q - p, J->line);
            J->pos = q;
        } else {
            static const char *const two[] = {"==", "!=", "<=", ">=", "//", "**"};
            size_t n = 1;
            for (int i = 0; i < 6; i++) if (strncmp(s + p, two[i], 2) == 0) n = 2;
            if (!strchr("+-*/%~()[]{}.,:|=<>!", c)) fail(J, MMB_ERR_FORMAT, J->line, "unexpected character '%c'", c);
            push_tok(J, K_OP, s + p, n, J->line);
            J->pos = p + n;
        }
    }
}

/* ---- expression parser ------------------------------------------------------------------------ */

static struct tok *peek(jctx *J) {
    static struct tok eof = {K_EOF, "", 0, 0};
    return J->tpos < J->ntok ? &J->toks[J->tpos] : &eof;
}
static bool tok_is(const struct tok *t, int k, const char *s) { return t->k == k && t->n == strlen(s) && memcmp(t->p, s, t->n) == 0; }
static bool accept(jctx *J, int k, const char *s) { if (tok_is(peek(J), k, s)) { J->tpos++; return true; } return false; }
static void expect(jctx *J, int k, const char *s) {
    if (!accept(J, k, s)) {
        struct tok *t = peek(J);
        fail(J, MMB_ERR_FORMAT, J->line, "expected '%s', found '%.*s'", s, (int)t->n, t->k == K_EOF ? "end of tag" : t->p);
    }
}
static const char *expect_name(jctx *J) {
    struct tok *t = peek(J);
    if (t->k != K_NAME) fail(J, MMB_ERR_FORMAT, J->line, "expected a name, found '%.*s'", (int)t->n, t->p);
    J->tpos++;
    return jstrndup(J, t->p, t->n);
}

static expr *mk(jctx *J, etype t) {
    expr *e = jalloc(J, sizeof *e);
    e->t = t;
    e->line = J->line;
    return e;
}

static expr *parse_expr(jctx *J);
static expr *parse_or(jctx *J);

/* Decodes a string literal's escapes as Python does. */
static val unescape(jctx *J, const char *p, size_t n) {
    jbuf b = {0};
    jb_put(J, &b, "", 0);
    for (size_t i = 0; i < n; i++) {
        if (p[i] != '\\' || i + 1 >= n) { jb_put(J, &b, p + i, 1); continue; }
        char c = p[++i], o = 0;
        switch (c) {
        case 'n': o = '\n'; break;
        case 't': o = '\t'; break;
        case 'r': o = '\r'; break;
        case '0': o = '\0'; break;
        case 'a': o = '\a'; break;
        case 'b': o = '\b'; break;
        case 'f': o = '\f'; break;
        case 'v': o = '\v'; break;
        case '\\': case '\'': case '"': o = c; break;
        case '\n': continue;
        case 'x': case 'u': case 'U': {
            int w = c == 'x' ? 2 : c == 'u' ? 4 : 8;
            if (i + (size_t)w >= n) fail(J, MMB_ERR_FORMAT, J->line, "bad \\%c escape", c);
            char hex[9] = {0};
            memcpy(hex, p + i + 1, (size_t)w);
            char *end;
            long cp = strtol(hex, &end, 16);
            if (end != hex + w || cp < 0 || cp > 0x10FFFF) fail(J, MMB_ERR_FORMAT, J->line, "bad \\%c escape", c);
            char enc[8];
            jb_put(J, &b, enc, (size_t)utf8proc_encode_char((utf8proc_int32_t)cp, (utf8proc_uint8_t *)enc));
            i += (size_t)w;
            continue;
        }
        default: jb_put(J, &b, p + i - 1, 2); continue;
        }
        jb_put(J, &b, &o, 1);
    }
    return v_str(b.p, b.n);
}

/* Call arguments after '(' up to ')': positional and name=value. */
static void parse_args(jctx *J, expr *e) {
    expr *args[32];
    const char *kw[32];
    int n = 0;
    while (!accept(J, K_OP, ")")) {
        if (n) expect(J, K_OP, ",");
        if (accept(J, K_OP, ")")) break;
        if (n == 32) fail(J, MMB_ERR_UNSUPPORTED, J->line, "more than 32 arguments");
        kw[n] = NULL;
        if (peek(J)->k == K_NAME && J->tpos + 1 < J->ntok && tok_is(&J->toks[J->tpos + 1], K_OP, "=")) {
            kw[n] = expect_name(J);
            J->tpos++;
        }
        args[n++] = parse_expr(J);
    }
    e->nargs = n;
    e->args = jalloc(J, (size_t)(n + 1) * sizeof *e->args);
    e->kw = jalloc(J, (size_t)(n + 1) * sizeof *e->kw);
    memcpy(e->args, args, (size_t)n * sizeof *args);
    memcpy(e->kw, kw, (size_t)n * sizeof *kw);
}

static expr *parse_primary(jctx *J) {
    struct tok *t = peek(J);
    expr *e;
    if (t->k == K_STR) {
        jbuf b = {0};
        jb_put(J, &b, "", 0);
        while (peek(J)->k == K_STR) { /* adjacent literals concatenate */
            val s = unescape(J, peek(J)->p, peek(J)->n);
            jb_put(J, &b, s.u.s.p, s.u.s.n);
            J->tpos++;
        }
        e = mk(J, E_LIT);
        e->lit = v_str(b.p, b.n);
        return e;
    }
    if (t->k == K_INT || t->k == K_FLOAT) {
        char num[400];
        size_t k = 0;
        for (size_t i = 0; i < t->n && k < sizeof num - 1; i++) if (t->p[i] != '_') num[k++] = t->p[i];
        num[k] = 0;
        e = mk(J, E_LIT);
        errno = 0;
        if (t->k == K_INT) {
            long long x = strtoll(num, NULL, 10);
            if (errno == ERANGE || k == sizeof num - 1)
                fail(J, MMB_ERR_FORMAT, J->line, "the integer literal %.40s%s is beyond 64 bits (mmbridge's integers are int64)", num, k > 40 ? "..." : "");
            e->lit = v_int(x);
        } else {
            if (k == sizeof num - 1) fail(J, MMB_ERR_FORMAT, J->line, "a float literal of more than %zu characters", sizeof num - 2);
            e->lit = v_float(strtod(num, NULL));
        }
        J->tpos++;
        return e;
    }
    if (t->k == K_NAME) {
        J->tpos++;
        e = mk(J, E_LIT);
        if (tok_is(t, K_NAME, "true") || tok_is(t, K_NAME, "True")) e->lit = v_bool(true);
        else if (tok_is(t, K_NAME, "false") || tok_is(t, K_NAME, "False")) e->lit = v_bool(false);
        else if (tok_is(t, K_NAME, "none") || tok_is(t, K_NAME, "None")) e->lit = v_none();
        else { e->t = E_NAME; e->name = jstrndup(J, t->p, t->n); }
        return e;
    }
    if (accept(J, K_OP, "(")) {
        e = parse_expr(J);
        if (accept(J, K_OP, ",")) { /* a tuple: a list will do */
            expr *l = mk(J, E_LIST);
            expr *items[64];
            int n = 0;
            items[n++] = e;
            while (!accept(J, K_OP, ")")) {
                if (n == 64) fail(J, MMB_ERR_UNSUPPORTED, J->line, "tuple of more than 64 items");
                items[n++] = parse_expr(J);
                if (!accept(J, K_OP, ",")) { expect(J, K_OP, ")"); break; }
            }
            l->nargs = n;
            l->args = jalloc(J, (size_t)n * sizeof *l->args);
            memcpy(l->args, items, (size_t)n * sizeof *items);
            return l;
        }
        expect(J, K_OP, ")");
        return e;
    }
    if (tok_is(t, K_OP, "[") || tok_is(t, K_OP, "{")) {
        bool isd = tok_is(t, K_OP, "{");
        J->tpos++;
        e = mk(J, isd ? E_DICT : E_LIST);
        int cap = 16, n = 0;
        e->args = jalloc(J, (size_t)cap * sizeof *e->args);
        while (!accept(J, K_OP, isd ? "}" : "]")) {
            if (n) { expect(J, K_OP, ","); if (accept(J, K_OP, isd ? "}" : "]")) break; }
            if (n + 2 > cap) {
                expr **na = jalloc(J, (size_t)(cap *= 2) * sizeof *na);
                memcpy(na, e->args, (size_t)n * sizeof *na);
                e->args = na;
            }
            e->args[n++] = parse_expr(J);
            if (isd) { expect(J, K_OP, ":"); e->args[n++] = parse_expr(J); }
        }
        e->nargs = n;
        return e;
    }
    fail(J, MMB_ERR_FORMAT, J->line, "unexpected '%.*s' in an expression", (int)t->n, t->k == K_EOF ? "end of tag" : t->p);
}

static expr *parse_postfix(jctx *J, expr *e) {
    for (;;) {
        if (accept(J, K_OP, ".")) {
            expr *a = mk(J, E_ATTR);
            a->a = e;
            struct tok *t = peek(J);
            if (t->k == K_INT) {
                errno = 0;
                long long x = strtoll(t->p, NULL, 10);
                if (errno == ERANGE) fail(J, MMB_ERR_FORMAT, J->line, "an index beyond 64 bits");
                a->t = E_ITEM; a->b = mk(J, E_LIT); a->b->lit = v_int(x); J->tpos++;
            }
            else a->name = expect_name(J);
            e = a;
        } else if (accept(J, K_OP, "[")) {
            expr *lo = NULL, *hi = NULL, *st = NULL;
            bool slice = false;
            if (!tok_is(peek(J), K_OP, ":")) lo = parse_expr(J);
            if (accept(J, K_OP, ":")) {
                slice = true;
                if (!tok_is(peek(J), K_OP, "]") && !tok_is(peek(J), K_OP, ":")) hi = parse_expr(J);
                if (accept(J, K_OP, ":") && !tok_is(peek(J), K_OP, "]")) st = parse_expr(J);
            }
            expect(J, K_OP, "]");
            expr *a = mk(J, slice ? E_SLICE : E_ITEM);
            a->a = e;
            a->b = lo;
            a->c = hi;
            if (slice) { a->args = jalloc(J, sizeof *a->args); a->args[0] = st; }
            e = a;
        } else if (accept(J, K_OP, "(")) {
            expr *c = mk(J, E_CALL);
            c->a = e;
            parse_args(J, c);
            e = c;
        } else {
            return e;
        }
    }
}

/* filters and tests after a unary operand: x | f(args) | g, x is [not] t(args) */
static expr *parse_filters(jctx *J, expr *e) {
    for (;;) {
        if (accept(J, K_OP, "|")) {
            expr *f = mk(J, E_FILTER);
            f->a = e;
            f->name = expect_name(J);
            if (accept(J, K_OP, "(")) parse_args(J, f);
            e = f;
        } else if (accept(J, K_NAME, "is")) {
            expr *t = mk(J, E_TEST);
            t->a = e;
            t->negate = accept(J, K_NAME, "not");
            t->name = expect_name(J);
            if (accept(J, K_OP, "(")) parse_args(J, t);
            else if (peek(J)->k == K_STR || peek(J)->k == K_INT || peek(J)->k == K_FLOAT ||
                     (peek(J)->k == K_NAME && !tok_is(peek(J), K_NAME, "and") && !tok_is(peek(J), K_NAME, "or") &&
                      !tok_is(peek(J), K_NAME, "else") && !tok_is(peek(J), K_NAME, "if") && !tok_is(peek(J), K_NAME, "is"))) {
                t->nargs = 1; /* `is equalto x`, `is sameas x` */
                t->args = jalloc(J, sizeof *t->args);
                t->kw = jalloc(J, sizeof *t->kw);
                t->args[0] = parse_postfix(J, parse_primary(J));
            }
            e = t;
        } else {
            return e;
        }
    }
}

static expr *parse_unary(jctx *J) {
    expr *e;
    bool neg = accept(J, K_OP, "-");
    if (neg || accept(J, K_OP, "+")) { /* a chain of signs nests */
        deeper(J, J->line);
        e = parse_unary(J);
        J->depth--;
        if (neg) { expr *n = mk(J, E_NEG); n->a = e; e = n; }
        return e;
    }
    return parse_filters(J, parse_postfix(J, parse_primary(J)));
}

static expr *bin(jctx *J, int op, expr *a, expr *b) {
    expr *e = mk(J, E_BIN);
    e->op = op;
    e->a = a;
    e->b = b;
    return e;
}

typedef expr *(*parse_fn)(jctx *J);

/* One left-associative level of binary operators over the next level's operands. */
static expr *parse_binary(jctx *J, parse_fn next, const char *const *ops, const int *codes, int nops) {
    expr *e = next(J);
    for (;;) {
        int op = 0;
        for (int i = 0; i < nops && !op; i++) if (accept(J, K_OP, ops[i])) op = codes[i];
        if (!op) return e;
        e = bin(J, op, e, next(J));
    }
}

static expr *parse_pow(jctx *J) {
    static const char *const o[] = {"**"};
    static const int c[] = {OP_POW};
    return parse_binary(J, parse_unary, o, c, 1);
}
static expr *parse_mul(jctx *J) {
    static const char *const o[] = {"*", "//", "/", "%"};
    static const int c[] = {OP_MUL, OP_FLOORDIV, OP_DIV, OP_MOD};
    return parse_binary(J, parse_pow, o, c, 4);
}
static expr *parse_concat(jctx *J) {
    static const char *const o[] = {"~"};
    static const int c[] = {OP_CONCAT};
    return parse_binary(J, parse_mul, o, c, 1);
}
static expr *parse_add(jctx *J) {
    static const char *const o[] = {"+", "-"};
    static const int c[] = {OP_ADD, OP_SUB};
    return parse_binary(J, parse_concat, o, c, 2);
}
static expr *parse_cmp(jctx *J) {
    expr *e = parse_add(J);
    for (;;) {
        static const char *const ops[] = {"==", "!=", "<=", ">=", "<", ">"};
        static const int codes[] = {OP_EQ, OP_NE, OP_LE, OP_GE, OP_LT, OP_GT};
        int op = 0;
        for (int i = 0; i < 6 && !op; i++) if (accept(J, K_OP, ops[i])) op = codes[i];
        if (!op && accept(J, K_NAME, "in")) op = OP_IN;
        if (!op && tok_is(peek(J), K_NAME, "not") && J->tpos + 1 < J->ntok && tok_is(&J->toks[J->tpos + 1], K_NAME, "in")) {
            J->tpos += 2;
            op = OP_NOTIN;
        }
        if (!op) return e;
        e = bin(J, op, e, parse_add(J));
    }
}
static expr *parse_not(jctx *J) {
    if (!accept(J, K_NAME, "not")) return parse_cmp(J);
    deeper(J, J->line); /* a chain of `not` nests */
    expr *e = mk(J, E_NOT);
    e->a = parse_not(J);
    J->depth--;
    return e;
}
static expr *parse_and(jctx *J) {
    expr *e = parse_not(J);
    while (accept(J, K_NAME, "and")) { expr *n = mk(J, E_AND); n->a = e; n->b = parse_not(J); e = n; }
    return e;
}
static expr *parse_or(jctx *J) {
    expr *e = parse_and(J);
    while (accept(J, K_NAME, "or")) { expr *n = mk(J, E_OR); n->a = e; n->b = parse_and(J); e = n; }
    return e;
}
static expr *parse_expr(jctx *J) {
    deeper(J, J->line);
    expr *e = parse_or(J);
    while (accept(J, K_NAME, "if")) {
        expr *c = mk(J, E_COND);
        c->b = parse_or(J);
        c->a = e;
        c->c = accept(J, K_NAME, "else") ? parse_expr(J) : NULL;
        e = c;
    }
    J->depth--;
    return e;
}

static void expect_end(jctx *J) {
    struct tok *t = peek(J);
    if (t->k != K_EOF) fail(J, MMB_ERR_FORMAT, t->line, "unexpected '%.*s' at the end of a tag", (int)t->n, t->p);
}

/* ---- statement parser ---------------------------------------------------------------------- */

static node *mknode(jctx *J, ntype t) {
    node *n = jalloc(J, sizeof *n);
    n->t = t;
    n->line = J->line;
    return n;
}

typedef struct nlist { node **v; int n, cap; } nlist;
static void nl_push(jctx *J, nlist *l, node *x) {
    if (l->n == l->cap) {
        int c = l->cap ? l->cap * 2 : 16;
        node **nv = jalloc(J, (size_t)c * sizeof *nv);
        if (l->n) memcpy(nv, l->v, (size_t)l->n * sizeof *nv);
        l->v = nv;
        l->cap = c;
    }
    l->v[l->n++] = x;
}

/* Parses the body up to one of the `ends` keywords (NULL-terminated); returns which one was found
 * (its tokens stay for the caller), or -1 at the end of the template. */
static int parse_body(jctx *J, node *body, const char *const *ends, bool *strip_next);

static node *body_node(jctx *J) { return mknode(J, N_BODY); }

static void body_set(jctx *J, node *b, nlist *l) {
    (void)J;
    b->kids = l->v;
    b->nkids = l->n;
}

/* Handles one {% ... %} whose tokens are lexed; returns -1 normally, or the index in `ends` of an
 * end keyword that closes the caller's body. */
static int parse_stmt(jctx *J, nlist *out, const char *const *ends, bool *strip_next) {
    int line = J->line;
    struct tok *kw = peek(J);
    if (kw->k != K_NAME) fail(J, MMB_ERR_FORMAT, line, "a statement tag without a keyword");
    for (int i = 0; ends && ends[i]; i++)
        if (tok_is(kw, K_NAME, ends[i])) { J->tpos++; return i; }
    J->tpos++;
    if (tok_is(kw, K_NAME, "if")) {
        node *n = mknode(J, N_IF);
        n->line = line;
        n->e = parse_expr(J);
        expect_end(J);
        n->kids = jalloc(J, 2 * sizeof *n->kids);
        n->nkids = 2;
        n->kids[0] = body_node(J);
        static const char *const if_ends[] = {"elif", "else", "endif", NULL};
        int w = parse_body(J, n->kids[0], if_ends, strip_next);
        if (w == 0) { /* elif: an if in the else branch */
            node *inner = mknode(J, N_BODY);
            nlist l = {0};
            J->tpos = 0;
            J->toks[0] = (struct tok){K_NAME, "if", 2, J->line};
            int r = parse_stmt(J, &l, NULL, strip_next);
            (void)r;
            body_set(J, inner, &l);
            n->kids[1] = inner;
        } else if (w == 1) {
            expect_end(J);
            n->kids[1] = body_node(J);
            static const char *const else_ends[] = {"endif", NULL};
            if (parse_body(J, n->kids[1], else_ends, strip_next) != 0) fail(J, MMB_ERR_FORMAT, line, "if without endif");
            expect_end(J);
        } else if (w == 2) {
            expect_end(J);
            n->kids[1] = body_node(J);
        } else {
            fail(J, MMB_ERR_FORMAT, line, "if without endif");
        }
        nl_push(J, out, n);
        return -1;
    }
    if (tok_is(kw, K_NAME, "for")) {
        node *n = mknode(J, N_FOR);
        n->line = line;
        do {
            if (n->nnames == 4) fail(J, MMB_ERR_UNSUPPORTED, line, "for with more than 4 targets");
            n->names[n->nnames++] = expect_name(J);
        } while (accept(J, K_OP, ","));
        expect(J, K_NAME, "in");
        n->e = parse_or(J);
        if (accept(J, K_NAME, "if")) n->cond = parse_expr(J);
        if (accept(J, K_NAME, "recursive")) fail(J, MMB_ERR_UNSUPPORTED, line, "recursive for loops are not supported");
        expect_end(J);
        n->kids = jalloc(J, 2 * sizeof *n->kids);
        n->nkids = 2;
        n->kids[0] = body_node(J);
        n->kids[1] = body_node(J);
        static const char *const for_ends[] = {"else", "endfor", NULL};
        int w = parse_body(J, n->kids[0], for_ends, strip_next);
        if (w < 0) fail(J, MMB_ERR_FORMAT, line, "for without endfor");
        expect_end(J);
        if (w == 0) {
            static const char *const e2[] = {"endfor", NULL};
            if (parse_body(J, n->kids[1], e2, strip_next) != 0) fail(J, MMB_ERR_FORMAT, line, "for without endfor");
            expect_end(J);
        }
        nl_push(J, out, n);
        return -1;
    }
    if (tok_is(kw, K_NAME, "set")) {
        const char *name = expect_name(J);
        node *n;
        if (accept(J, K_OP, ".")) {
            n = mknode(J, N_SETATTR);
            n->names[0] = name;
            n->nnames = 1;
            n->attr = expect_name(J);
        } else {
            n = mknode(J, N_SET);
            n->names[n->nnames++] = name;
            while (accept(J, K_OP, ",")) {
                if (n->nnames == 4) fail(J, MMB_ERR_UNSUPPORTED, line, "set with more than 4 targets");
                n->names[n->nnames++] = expect_name(J);
            }
        }
        n->line = line;
        if (!accept(J, K_OP, "=")) fail(J, MMB_ERR_UNSUPPORTED, line, "block assignments ({%% set x %%}...{%% endset %%}) are not supported");
        n->e = parse_expr(J);
        expect_end(J);
        nl_push(J, out, n);
        return -1;
    }
    if (tok_is(kw, K_NAME, "break") || tok_is(kw, K_NAME, "continue")) {
        expect_end(J);
        nl_push(J, out, mknode(J, tok_is(kw, K_NAME, "break") ? N_BREAK : N_CONTINUE));
        return -1;
    }
    if (tok_is(kw, K_NAME, "generation")) { /* transformers' assistant-mask marker: renders its body */
        expect_end(J);
        node *b = body_node(J);
        static const char *const g_ends[] = {"endgeneration", NULL};
        if (parse_body(J, b, g_ends, strip_next) != 0) fail(J, MMB_ERR_FORMAT, line, "generation without endgeneration");
        expect_end(J);
        nl_push(J, out, b);
        return -1;
    }
    fail(J, MMB_ERR_UNSUPPORTED, line, "the statement '%.*s' is not supported by mmbridge's Jinja subset", (int)kw->n, kw->p);
}

/* Finds the next tag opener at or after `from`; returns its offset or len. */
static size_t next_open(const jctx *J, size_t from) {
    for (size_t i = from; i + 1 < J->len; i++)
        if (J->src[i] == '{' && (J->src[i + 1] == '{' || J->src[i + 1] == '%' || J->src[i + 1] == '#')) return i;
    return J->len;
}

static int parse_body(jctx *J, node *body, const char *const *ends, bool *strip_next) {
    nlist l = {0};
    int found = -1;
    deeper(J, J->line);
    while (J->pos < J->len) {
        size_t o = next_open(J, J->pos);
        /* the text up to the tag; a "-" closer before it strips its leading whitespace */
        size_t ts = J->pos, te = o;
        if (*strip_next) while (ts < te && strchr(" \t\n\r\v\f", J->src[ts])) ts++;
        *strip_next = false;
        for (size_t i = J->pos; i < o; i++) if (J->src[i] == '\n') J->line++;
        if (o < J->len) {
            char kind = J->src[o + 1];
            char sign = o + 2 < J->len ? J->src[o + 2] : 0;
            if (sign == '-') { /* "{%-": all whitespace before the tag goes */
                while (te > ts && strchr(" \t\n\r\v\f", J->src[te - 1])) te--;
            } else if (sign != '+' && kind != '{') {
                /* lstrip_blocks (jinja2's lexer): blanks between the line start and a {% or {# tag go, when
                 * the text has a newline or the previous tag ended a line */
                size_t lp = te;
                while (lp > ts && J->src[lp - 1] != '\n') lp--;
                if (lp > ts || J->line_start) {
                    size_t k = lp;
                    while (k < te && (J->src[k] == ' ' || J->src[k] == '\t')) k++;
                    if (k == te) te = lp;
                }
            }
        }
        if (te > ts) {
            node *text = mknode(J, N_TEXT);
            text->text = J->src + ts;
            text->len = te - ts;
            nl_push(J, &l, text);
        }
        if (o >= J->len) { J->pos = J->len; break; }
        char kind = J->src[o + 1];
        size_t p = o + 2;
        if (p < J->len && (J->src[p] == '-' || J->src[p] == '+')) p++;
        J->pos = p;
        bool closer_minus, closer_plus;
        if (kind == '#') {
            const char *e = strstr(J->src + p, "#}");
            if (!e) fail(J, MMB_ERR_FORMAT, J->line, "unterminated comment");
            closer_minus = e > J->src + p && e[-1] == '-';
            closer_plus = e > J->src + p && e[-1] == '+';
            for (const char *q = J->src + p; q < e; q++) if (*q == '\n') J->line++;
            J->pos = (size_t)(e - J->src) + 2;
        } else {
            closer_minus = lex_tag(J, kind == '{' ? "}}" : "%}", &closer_plus);
        }
        /* after the tag (before a block's body is parsed): "-" strips all whitespace; trim_blocks drops
         * one newline after {% %} and {# #} */
        J->line_start = false;
        if (closer_minus) *strip_next = true;
        else if (kind != '{' && !closer_plus && J->pos < J->len && J->src[J->pos] == '\n') {
            J->pos++;
            J->line++;
            J->line_start = true;
        }
        if (kind == '{') {
            node *n = mknode(J, N_OUT);
            n->e = parse_expr(J);
            expect_end(J);
            nl_push(J, &l, n);
        } else if (kind == '%') {
            int w = parse_stmt(J, &l, ends, strip_next);
            if (w >= 0) found = w;
        }
        if (found >= 0) break;
    }
    body_set(J, body, &l);
    J->depth--;
    return found;
}

/* ---- evaluation -------------------------------------------------------------------------- */

static val eval(jctx *J, const expr *e);

static val lookup(jctx *J, const char *name) {
    for (int i = J->nscope - 1; i >= 0; i--) {
        int k = d_find(J->scope[i], name, strlen(name));
        if (k >= 0) return J->scope[i]->v[k];
    }
    return v_undef(name);
}

static void assign(jctx *J, const char *name, val v) { d_setc(J, J->scope[J->nscope - 1], name, v); }

static double num(jctx *J, val v, int line, const char *what) {
    if (v.t == T_INT) return (double)v.u.i;
    if (v.t == T_FLOAT) return v.u.f;
    if (v.t == T_BOOL) return v.u.b;
    fail(J, MMB_ERR_FORMAT, line, "%s: expected a number, got %s", what, type_name(v));
}

static bool is_num(val v) { return v.t == T_INT || v.t == T_FLOAT || v.t == T_BOOL; }

static int cmp_str(val a, val b) {
    size_t n = a.u.s.n < b.u.s.n ? a.u.s.n : b.u.s.n;
    int c = memcmp(a.u.s.p, b.u.s.p, n);
    return c ? c : (a.u.s.n > b.u.s.n) - (a.u.s.n < b.u.s.n);
}

static int64_t ival(val v) { return v.t == T_INT ? v.u.i : v.u.b; } /* T_INT or T_BOOL */

/* Compares an int with a float exactly, as Python does: -1, 0, 1, or 2 when unordered (NaN). */
static int cmp_int_float(int64_t i, double f) {
    if (isnan(f)) return 2;
    if (f >= 9223372036854775808.0) return -1;
    if (f < -9223372036854775808.0) return 1;
    double fl = floor(f);
    int64_t k = (int64_t)fl;
    if (i != k) return i < k ? -1 : 1;
    return f > fl ? -1 : 0;
}

/* Compares two numbers (int, float or bool) exactly: -1, 0, 1, or 2 when unordered. */
static int cmp_num(val a, val b) {
    if (a.t != T_FLOAT && b.t != T_FLOAT) { int64_t x = ival(a), y = ival(b); return (x > y) - (x < y); }
    if (a.t == T_FLOAT && b.t == T_FLOAT) {
        if (isnan(a.u.f) || isnan(b.u.f)) return 2;
        return (a.u.f > b.u.f) - (a.u.f < b.u.f);
    }
    if (a.t == T_FLOAT) { int c = cmp_int_float(ival(b), a.u.f); return c == 2 ? 2 : -c; }
    return cmp_int_float(ival(a), b.u.f);
}

static bool equal(jctx *J, val a, val b) {
    if (is_num(a) && is_num(b)) return cmp_num(a, b) == 0;
    if (a.t != b.t) return false;
    bool r = true;
    switch (a.t) {
    case T_UNDEF: case T_NONE: return true;
    case T_STR: return cmp_str(a, b) == 0;
    case T_LIST:
        if (a.u.l == b.u.l) return true; /* Python compares items by identity first */
        if (a.u.l->n != b.u.l->n) return false;
        deeper(J, 0);
        step(J, 0, (uint64_t)a.u.l->n);
        for (int i = 0; i < a.u.l->n && r; i++) r = equal(J, a.u.l->v[i], b.u.l->v[i]);
        J->depth--;
        return r;
    case T_DICT:
        if (a.u.d == b.u.d) return true;
        if (a.u.d->n != b.u.d->n) return false;
        deeper(J, 0);
        step(J, 0, (uint64_t)a.u.d->n * (uint64_t)a.u.d->n);
        for (int i = 0; i < a.u.d->n && r; i++) {
            int k = d_find(b.u.d, a.u.d->k[i].u.s.p, a.u.d->k[i].u.s.n);
            r = k >= 0 && equal(J, a.u.d->v[i], b.u.d->v[k]);
        }
        J->depth--;
        return r;
    default: return a.u.d == b.u.d; /* a namespace or a function: identity, as in Python */
    }
}

/* A message content string seen as a list of parts. */
static val as_parts(jctx *J, val s) {
    val l = v_list(J), d = v_dict(J);
    d_setc(J, d.u.d, "type", v_cstr("text"));
    val txt = s;
    txt.parts = false;
    d_setc(J, d.u.d, "text", txt);
    l_push(J, l.u.l, d);
    return l;
}

/* The items a for loop or a filter walks: a list's elements, a dict's keys, a string's characters. */
static val iterable(jctx *J, val v, int line) {
    if (v.t == T_LIST) return v;
    if (v.t == T_UNDEF) return v_list(J);
    if (v.t == T_STR && v.parts) return as_parts(J, v);
    val l = v_list(J);
    if (v.t == T_DICT) { for (int i = 0; i < v.u.d->n; i++) l_push(J, l.u.l, v.u.d->k[i]); return l; }
    if (v.t == T_STR) {
        for (size_t i = 0; i < v.u.s.n;) {
            size_t k = i + 1;
            while (k < v.u.s.n && ((unsigned char)v.u.s.p[k] & 0xC0) == 0x80) k++;
            l_push(J, l.u.l, v_str(v.u.s.p + i, k - i));
            i = k;
        }
        return l;
    }
    fail(J, MMB_ERR_FORMAT, line, "a %s is not iterable", type_name(v));
}

static int64_t py_len(jctx *J, val v, int line) {
    switch (v.t) {
    case T_UNDEF: return 0;
    case T_STR: {
        if (v.parts) return 1;
        int64_t n = 0;
        for (size_t i = 0; i < v.u.s.n; i++) n += ((unsigned char)v.u.s.p[i] & 0xC0) != 0x80;
        return n;
    }
    case T_LIST: return v.u.l->n;
    case T_DICT: case T_NS: return v.u.d->n;
    default: fail(J, MMB_ERR_FORMAT, line, "object of type %s has no length", type_name(v));
    }
}

static val getattr_(jctx *J, val obj, const char *name, size_t n, int line) {
    if (obj.t == T_UNDEF)
        fail(J, MMB_ERR_FORMAT, line, "'%s' is undefined (reading .%.*s)", obj.name ? obj.name : "value", (int)n, name);
    if (obj.t == T_DICT || obj.t == T_NS) {
        int k = d_find(obj.u.d, name, n);
        if (k >= 0) return obj.u.d->v[k];
    }
    return v_undef(jstrndup(J, name, n));
}

static val getitem(jctx *J, val obj, val key, int line) {
    if (obj.t == T_UNDEF) fail(J, MMB_ERR_FORMAT, line, "'%s' is undefined (indexing it)", obj.name ? obj.name : "value");
    if (key.t == T_STR) return getattr_(J, obj, key.u.s.p, key.u.s.n, line);
    if (key.t == T_INT || key.t == T_BOOL) {
        int64_t i = key.t == T_INT ? key.u.i : key.u.b;
        obj.parts = false; /* a content string indexes as a string */
        val l = obj.t == T_STR ? iterable(J, obj, line) : obj;
        if (l.t == T_LIST) {
            int64_t n = l.u.l->n;
            if (i < 0) i += n;
            if (i < 0 || i >= n) return v_undef("item");
            return l.u.l->v[i];
        }
    }
    return v_undef("item");
}

static int64_t clampi(int64_t i, int64_t n, bool neg_step) {
    if (i < 0) i += n;
    if (neg_step) return i < -1 ? -1 : i >= n ? n - 1 : i;
    return i < 0 ? 0 : i > n ? n : i;
}

static val slice(jctx *J, val obj, val lo, val hi, val st, int line) {
    int64_t step = st.t == T_INT ? st.u.i : 1;
    if (step == 0) fail(J, MMB_ERR_FORMAT, line, "slice step cannot be zero");
    bool isstr = obj.t == T_STR;
    obj.parts = false; /* a content string slices as a string */
    val l = iterable(J, obj, line);
    int64_t n = l.u.l->n;
    int64_t a = lo.t == T_INT ? clampi(lo.u.i, n, step < 0) : (step > 0 ? 0 : n - 1);
    int64_t b = hi.t == T_INT ? clampi(hi.u.i, n, step < 0) : (step > 0 ? n : -1);
    val r = v_list(J);
    for (int64_t i = a; step > 0 ? i < b : i > b;) {
        l_push(J, r.u.l, l.u.l->v[i]);
        if (__builtin_add_overflow(i, step, &i)) break;
    }
    if (!isstr) return r;
    jbuf s = {0};
    jb_put(J, &s, "", 0);
    for (int i = 0; i < r.u.l->n; i++) jb_put(J, &s, r.u.l->v[i].u.s.p, r.u.l->v[i].u.s.n);
    return v_str(s.p, s.n);
}

static val concat(jctx *J, val a, val b) {
    jbuf s = {0};
    jb_put(J, &s, a.u.s.p, a.u.s.n);
    jb_put(J, &s, b.u.s.p, b.u.s.n);
    return v_str(s.p, s.n);
}

static _Noreturn void int_overflow(jctx *J, int line, const char *op) {
    fail(J, MMB_ERR_FORMAT, line, "integer overflow in %s: the exact result needs more than 64 bits (Jinja2 would compute a Python "
         "big integer; mmbridge refuses rather than print a rounded number)", op);
}

/* s * count (str or list), refused before it allocates past the arena limit. */
static val repeat(jctx *J, val s, int64_t count, int line) {
    if (count < 0) count = 0;
    size_t unit = s.t == T_STR ? s.u.s.n : (size_t)s.u.l->n * sizeof(val);
    if (!unit) count = 0; /* "" * 10**16: empty at once, not 10**16 empty copies */
    if (unit && (uint64_t)count > (JMAX_ARENA - J->arena) / unit)
        fail(J, MMB_ERR_FORMAT, line, "%s * %lld needs more than %zu MiB (the arena limit)", type_name(s), (long long)count, JMAX_ARENA >> 20);
    if (s.t == T_LIST) {
        if ((uint64_t)count * (uint64_t)s.u.l->n > INT_MAX / 2) fail(J, MMB_ERR_FORMAT, line, "a list too long");
        val r = v_list(J);
        for (int64_t i = 0; i < count; i++) for (int k = 0; k < s.u.l->n; k++) l_push(J, r.u.l, s.u.l->v[k]);
        return r;
    }
    char *p = jalloc(J, unit * (size_t)count + 1);
    for (int64_t i = 0; i < count; i++) memcpy(p + (size_t)i * unit, s.u.s.p, unit);
    p[unit * (size_t)count] = 0;
    return v_str(p, unit * (size_t)count);
}

/* Python's float // and % (floatobject.c's float_divmod). */
static void float_divmod(double vx, double wx, double *fdiv, double *fmodv) {
    double mod = fmod(vx, wx), div = (vx - mod) / wx;
    if (mod) { if ((wx < 0) != (mod < 0)) { mod += wx; div -= 1.0; } }
    else mod = copysign(0.0, wx);
    double fl;
    if (div) { fl = floor(div); if (div - fl > 0.5) fl += 1.0; }
    else fl = copysign(0.0, vx / wx);
    *fdiv = fl;
    *fmodv = mod;
}

static val binop(jctx *J, int op, val a, val b, int line) {
    switch (op) {
    case OP_ADD:
        if (a.t == T_STR && b.t == T_STR) return concat(J, a, b);
        if (a.t == T_LIST && b.t == T_LIST) {
            val r = v_list(J);
            for (int i = 0; i < a.u.l->n; i++) l_push(J, r.u.l, a.u.l->v[i]);
            for (int i = 0; i < b.u.l->n; i++) l_push(J, r.u.l, b.u.l->v[i]);
            return r;
        }
        if (is_num(a) && is_num(b)) break;
        if (a.t == T_UNDEF || b.t == T_UNDEF)
            fail(J, MMB_ERR_FORMAT, line, "'%s' is undefined (in +)", (a.t == T_UNDEF ? a : b).name ? (a.t == T_UNDEF ? a : b).name : "value");
        fail(J, MMB_ERR_FORMAT, line, "cannot add %s and %s", type_name(a), type_name(b));
    case OP_CONCAT: return concat(J, stringify(J, a), stringify(J, b));
    case OP_SUB: case OP_MUL: case OP_DIV: case OP_FLOORDIV: case OP_MOD: case OP_POW:
        if (op == OP_MUL && (a.t == T_STR || a.t == T_LIST) && (b.t == T_INT || b.t == T_BOOL)) return repeat(J, a, ival(b), line);
        if (op == OP_MUL && (b.t == T_STR || b.t == T_LIST) && (a.t == T_INT || a.t == T_BOOL)) return repeat(J, b, ival(a), line);
        break;
    case OP_EQ: return v_bool(equal(J, a, b));
    case OP_NE: return v_bool(!equal(J, a, b));
    case OP_LT: case OP_GT: case OP_LE: case OP_GE: {
        int c;
        if (a.t == T_STR && b.t == T_STR) c = cmp_str(a, b);
        else if (is_num(a) && is_num(b)) { c = cmp_num(a, b); if (c == 2) return v_bool(false); }
        else fail(J, MMB_ERR_FORMAT, line, "cannot compare %s and %s", type_name(a), type_name(b));
        return v_bool(op == OP_LT ? c < 0 : op == OP_GT ? c > 0 : op == OP_LE ? c <= 0 : c >= 0);
    }
    case OP_IN: case OP_NOTIN: {
        bool r = false;
        if (b.t == T_STR && !b.parts) {
            if (a.t != T_STR) fail(J, MMB_ERR_FORMAT, line, "'in <string>' requires a string on the left, got %s", type_name(a));
            step(J, line, b.u.s.n >> 6);
            r = a.u.s.n == 0 || memmem(b.u.s.p, b.u.s.n, a.u.s.p, a.u.s.n) != NULL;
        } else if (b.t == T_DICT || b.t == T_NS) {
            r = a.t == T_STR && d_find(b.u.d, a.u.s.p, a.u.s.n) >= 0;
        } else if (b.t == T_LIST || b.parts) {
            val l = iterable(J, b, line);
            for (int i = 0; i < l.u.l->n && !r; i++) { step(J, line, 1); r = equal(J, a, l.u.l->v[i]); }
        } else if (b.t != T_UNDEF) {
            fail(J, MMB_ERR_FORMAT, line, "argument of type %s is not iterable", type_name(b));
        }
        return v_bool(op == OP_IN ? r : !r);
    }
    default: fail(J, MMB_ERR_FORMAT, line, "bad operator");
    }
    /* numbers: exact int64 when both are ints (or bools), else Python's float semantics */
    static const char *const opname[] = {"", "+", "-", "*", "/", "//", "%", "**"};
    double x = num(J, a, line, "arithmetic"), y = num(J, b, line, "arithmetic");
    if ((op == OP_DIV || op == OP_FLOORDIV || op == OP_MOD) && y == 0)
        fail(J, MMB_ERR_FORMAT, line, "division by zero (%s)", opname[op]);
    if (a.t != T_FLOAT && b.t != T_FLOAT) {
        int64_t p = ival(a), q = ival(b), r;
        switch (op) {
        case OP_ADD: if (__builtin_add_overflow(p, q, &r)) int_overflow(J, line, "+"); return v_int(r);
        case OP_SUB: if (__builtin_sub_overflow(p, q, &r)) int_overflow(J, line, "-"); return v_int(r);
        case OP_MUL: if (__builtin_mul_overflow(p, q, &r)) int_overflow(J, line, "*"); return v_int(r);
        case OP_DIV: return v_float((double)p / (double)q);
        case OP_FLOORDIV: {
            if (p == INT64_MIN && q == -1) int_overflow(J, line, "//");
            int64_t d = p / q;
            if ((p % q != 0) && ((p < 0) != (q < 0))) d--;
            return v_int(d);
        }
        case OP_MOD: {
            if (q == -1) return v_int(0); /* INT64_MIN % -1 would trap */
            int64_t m = p % q;
            if (m != 0 && ((m < 0) != (q < 0))) m += q;
            return v_int(m);
        }
        default: /* ** */
            if (q < 0) {
                if (p == 0) fail(J, MMB_ERR_FORMAT, line, "0 cannot be raised to a negative power (division by zero)");
                return v_float(pow((double)p, (double)q));
            }
            r = 1;
            for (uint64_t e = (uint64_t)q; e; ) {
                if ((e & 1) && __builtin_mul_overflow(r, p, &r)) int_overflow(J, line, "**");
                e >>= 1;
                if (e && __builtin_mul_overflow(p, p, &p)) int_overflow(J, line, "**");
            }
            return v_int(r);
        }
    }
    switch (op) {
    case OP_ADD: return v_float(x + y);
    case OP_SUB: return v_float(x - y);
    case OP_MUL: return v_float(x * y);
    case OP_DIV: return v_float(x / y);
    case OP_FLOORDIV: { double d, m; float_divmod(x, y, &d, &m); return v_float(d); }
    case OP_MOD: { double d, m; float_divmod(x, y, &d, &m); return v_float(m); }
    default: {
        if (x == 0 && y < 0) fail(J, MMB_ERR_FORMAT, line, "0.0 cannot be raised to a negative power (division by zero)");
        if (x < 0 && isfinite(y) && y != floor(y)) fail(J, MMB_ERR_FORMAT, line, "a negative number to a fractional power is complex");
        double r = pow(x, y);
        if (isinf(r) && isfinite(x) && isfinite(y)) fail(J, MMB_ERR_FORMAT, line, "float overflow in ** (Python raises OverflowError)");
        return v_float(r);
    }
    }
}

/* Python's str.isspace for one code point. */
static bool py_space(int32_t c) {
    return (c >= 9 && c <= 13) || (c >= 28 && c <= 32) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

static int32_t cp_at(const char *s, size_t n, size_t i, size_t *len) {
    int32_t cp = 0;
    utf8proc_ssize_t l = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
    *len = l > 0 ? (size_t)l : 1;
    return l > 0 ? cp : (unsigned char)s[i];
}

static bool in_set(const val *chars, int32_t cp) {
    if (!chars) return py_space(cp);
    size_t cl;
    for (size_t q = 0; q < chars->u.s.n; q += cl)
        if (cp_at(chars->u.s.p, chars->u.s.n, q, &cl) == cp) return true;
    return false;
}

/* str.strip / lstrip / rstrip with chars (NULL: whitespace). */
static val py_strip(jctx *J, val s, const val *chars, bool left, bool right) {
    (void)J;
    size_t a = 0, b = s.u.s.n, l;
    const char *p = s.u.s.p;
    if (left) while (a < b && in_set(chars, cp_at(p, b, a, &l))) a += l;
    if (right)
        while (b > a) {
            size_t k = b - 1;
            while (k > a && ((unsigned char)p[k] & 0xC0) == 0x80) k--;
            if (!in_set(chars, cp_at(p, b, k, &l))) break;
            b = k;
        }
    return v_str(p + a, b - a);
}

typedef enum { CASE_UPPER, CASE_LOWER, CASE_TITLE, CASE_CAP } casemode;

static val py_case(jctx *J, val s, casemode m) {
    jbuf b = {0};
    jb_put(J, &b, "", 0);
    bool prev_cased = false, first = true;
    for (size_t i = 0, l; i < s.u.s.n; i += l) {
        int32_t c = cp_at(s.u.s.p, s.u.s.n, i, &l), o;
        utf8proc_category_t k = utf8proc_category(c);
        bool cased = k == UTF8PROC_CATEGORY_LU || k == UTF8PROC_CATEGORY_LL || k == UTF8PROC_CATEGORY_LT;
        switch (m) {
        case CASE_UPPER: o = utf8proc_toupper(c); break;
        case CASE_LOWER: o = utf8proc_tolower(c); break;
        case CASE_TITLE: o = prev_cased ? utf8proc_tolower(c) : utf8proc_totitle(c); break;
        default: o = first ? utf8proc_totitle(c) : utf8proc_tolower(c); break;
        }
        prev_cased = cased;
        first = false;
        char enc[8];
        jb_put(J, &b, enc, (size_t)utf8proc_encode_char(o, (utf8proc_uint8_t *)enc));
    }
    return v_str(b.p, b.n);
}

static val py_replace(jctx *J, val s, val a, val b, int64_t count) {
    jbuf o = {0};
    jb_put(J, &o, "", 0);
    size_t i = 0;
    int64_t done = 0;
    if (a.u.s.n == 0) return s;
    while (i < s.u.s.n) {
        const char *f = (count < 0 || done < count) ? memmem(s.u.s.p + i, s.u.s.n - i, a.u.s.p, a.u.s.n) : NULL;
        if (!f) break;
        jb_put(J, &o, s.u.s.p + i, (size_t)(f - s.u.s.p) - i);
        jb_put(J, &o, b.u.s.p, b.u.s.n);
        i = (size_t)(f - s.u.s.p) + a.u.s.n;
        done++;
    }
    jb_put(J, &o, s.u.s.p + i, s.u.s.n - i);
    return v_str(o.p, o.n);
}

static val py_split(jctx *J, val s, const val *sep, int64_t maxsplit) {
    val r = v_list(J);
    const char *p = s.u.s.p;
    size_t n = s.u.s.n, i = 0, l;
    int64_t done = 0;
    if (sep && sep->t == T_STR) {
        if (sep->u.s.n == 0) fail(J, MMB_ERR_FORMAT, 0, "split: empty separator");
        for (;;) {
            const char *f = (maxsplit < 0 || done < maxsplit) ? memmem(p + i, n - i, sep->u.s.p, sep->u.s.n) : NULL;
            if (!f) { l_push(J, r.u.l, v_str(p + i, n - i)); break; }
            l_push(J, r.u.l, v_str(p + i, (size_t)(f - p) - i));
            i = (size_t)(f - p) + sep->u.s.n;
            done++;
        }
        return r;
    }
    for (;;) {
        while (i < n && py_space(cp_at(p, n, i, &l))) i += l;
        if (i >= n) break;
        if (maxsplit >= 0 && done >= maxsplit) {
            size_t e = n;
            while (e > i) { size_t k = e - 1; while (k > i && ((unsigned char)p[k] & 0xC0) == 0x80) k--; if (!py_space(cp_at(p, e, k, &l))) break; e = k; }
            l_push(J, r.u.l, v_str(p + i, e - i));
            break;
        }
        size_t st = i;
        while (i < n && !py_space(cp_at(p, n, i, &l))) i += l;
        l_push(J, r.u.l, v_str(p + st, i - st));
        done++;
    }
    return r;
}

static val arg_or(const expr *e, val *args, int i, const char *kw, val def) {
    for (int k = 0; k < e->nargs; k++)
        if (e->kw[k] && strcmp(e->kw[k], kw) == 0) return args[k];
    if (i < e->nargs && !e->kw[i]) return args[i];
    return def;
}

static val *eval_args(jctx *J, const expr *e) {
    val *a = jalloc(J, (size_t)(e->nargs + 1) * sizeof *a);
    for (int i = 0; i < e->nargs; i++) a[i] = eval(J, e->args[i]);
    return a;
}

static val need_str(jctx *J, val v, int line, const char *what) {
    if (v.t != T_STR) fail(J, MMB_ERR_FORMAT, line, "%s: expected a string, got %s", what, type_name(v));
    return v;
}

static bool run_test(jctx *J, const char *name, val v, const val *args, int nargs, int line);

/* A method call obj.name(args) on a str, dict or list. */
static bool call_method(jctx *J, val obj, const char *m, const expr *e, val *args, int line, val *out) {
    val none = v_none();
    step(J, line, obj.t == T_STR ? obj.u.s.n >> 6 : obj.t == T_DICT ? (uint64_t)obj.u.d->n : 0);
    if (obj.t == T_STR) {
        if (!strcmp(m, "strip") || !strcmp(m, "lstrip") || !strcmp(m, "rstrip")) {
            val c = arg_or(e, args, 0, "chars", none);
            *out = py_strip(J, obj, c.t == T_STR ? &c : NULL, m[0] != 'r', m[0] != 'l');
        } else if (!strcmp(m, "upper")) *out = py_case(J, obj, CASE_UPPER);
        else if (!strcmp(m, "lower")) *out = py_case(J, obj, CASE_LOWER);
        else if (!strcmp(m, "title")) *out = py_case(J, obj, CASE_TITLE);
        else if (!strcmp(m, "capitalize")) *out = py_case(J, obj, CASE_CAP);
        else if (!strcmp(m, "startswith") || !strcmp(m, "endswith")) {
            val p = arg_or(e, args, 0, "prefix", none);
            val l = p.t == T_LIST ? p : v_list(J);
            if (p.t != T_LIST) l_push(J, l.u.l, need_str(J, p, line, m));
            bool r = false;
            for (int i = 0; i < l.u.l->n && !r; i++) {
                val x = need_str(J, l.u.l->v[i], line, m);
                r = x.u.s.n <= obj.u.s.n &&
                    memcmp(obj.u.s.p + (m[0] == 's' ? 0 : obj.u.s.n - x.u.s.n), x.u.s.p, x.u.s.n) == 0;
            }
            *out = v_bool(r);
        } else if (!strcmp(m, "split")) {
            val sep = arg_or(e, args, 0, "sep", none), mx = arg_or(e, args, 1, "maxsplit", v_int(-1));
            *out = py_split(J, obj, sep.t == T_STR ? &sep : NULL, mx.t == T_INT ? mx.u.i : -1);
        } else if (!strcmp(m, "replace")) {
            val c = arg_or(e, args, 2, "count", v_int(-1));
            *out = py_replace(J, obj, need_str(J, arg_or(e, args, 0, "old", none), line, m),
                              need_str(J, arg_or(e, args, 1, "new", none), line, m), c.t == T_INT ? c.u.i : -1);
        } else if (!strcmp(m, "join")) {
            val l = iterable(J, arg_or(e, args, 0, "iterable", none), line);
            jbuf b = {0};
            jb_put(J, &b, "", 0);
            for (int i = 0; i < l.u.l->n; i++) {
                if (i) jb_put(J, &b, obj.u.s.p, obj.u.s.n);
                val x = need_str(J, l.u.l->v[i], line, "join");
                jb_put(J, &b, x.u.s.p, x.u.s.n);
            }
            *out = v_str(b.p, b.n);
        } else if (!strcmp(m, "find") || !strcmp(m, "count")) {
            val x = need_str(J, arg_or(e, args, 0, "sub", none), line, m);
            const char *f = memmem(obj.u.s.p, obj.u.s.n, x.u.s.p, x.u.s.n);
            if (m[0] == 'f') *out = v_int(f ? (int64_t)(f - obj.u.s.p) : -1);
            else {
                int64_t c = 0;
                for (size_t i = 0; x.u.s.n && (f = memmem(obj.u.s.p + i, obj.u.s.n - i, x.u.s.p, x.u.s.n)); c++)
                    i = (size_t)(f - obj.u.s.p) + x.u.s.n;
                *out = v_int(c);
            }
        } else return false;
        return true;
    }
    if (obj.t == T_DICT) {
        if (!strcmp(m, "items") || !strcmp(m, "keys") || !strcmp(m, "values")) {
            val r = v_list(J);
            for (int i = 0; i < obj.u.d->n; i++) {
                if (m[0] == 'k') l_push(J, r.u.l, obj.u.d->k[i]);
                else if (m[0] == 'v') l_push(J, r.u.l, obj.u.d->v[i]);
                else { val p = v_list(J); l_push(J, p.u.l, obj.u.d->k[i]); l_push(J, p.u.l, obj.u.d->v[i]); l_push(J, r.u.l, p); }
            }
            *out = r;
        } else if (!strcmp(m, "get")) {
            val k = arg_or(e, args, 0, "key", none), d = arg_or(e, args, 1, "default", none);
            int i = k.t == T_STR ? d_find(obj.u.d, k.u.s.p, k.u.s.n) : -1;
            *out = i >= 0 ? obj.u.d->v[i] : d;
        } else return false;
        return true;
    }
    return false;
}

static val call_global(jctx *J, int fn, const expr *e, val *args, int line) {
    switch (fn) {
    case FN_RAISE: {
        val m = e->nargs ? stringify(J, args[0]) : v_cstr("");
        fail(J, MMB_ERR_FORMAT, line, "the template raised an exception: %.*s", (int)m.u.s.n, m.u.s.p);
    }
    case FN_NAMESPACE: case FN_DICT: {
        val d = v_dict(J);
        if (fn == FN_NAMESPACE) d.t = T_NS;
        for (int i = 0; i < e->nargs; i++) {
            if (e->kw[i]) { d_setc(J, d.u.d, e->kw[i], args[i]); continue; }
            if (args[i].t != T_DICT) fail(J, MMB_ERR_UNSUPPORTED, line, "namespace() / dict() take keyword arguments or a dict");
            for (int k = 0; k < args[i].u.d->n; k++) d_set(J, d.u.d, args[i].u.d->k[k], args[i].u.d->v[k]);
        }
        return d;
    }
    case FN_RANGE: {
        int64_t a = 0, b = 0, s = 1;
        for (int i = 0; i < e->nargs; i++) /* a bool is an int, as in Python: range(True, 3) is [1, 2] */
            if (args[i].t != T_INT && args[i].t != T_BOOL) fail(J, MMB_ERR_FORMAT, line, "range() takes integers");
        if (e->nargs == 1) b = ival(args[0]);
        else if (e->nargs >= 2) { a = ival(args[0]); b = ival(args[1]); if (e->nargs == 3) s = ival(args[2]); }
        if (s == 0 || e->nargs < 1 || e->nargs > 3) fail(J, MMB_ERR_FORMAT, line, "bad range() arguments");
        uint64_t len = 0; /* computed before anything is built; unsigned differences cannot overflow */
        if (s > 0 && a < b) len = ((uint64_t)b - (uint64_t)a - 1) / (uint64_t)s + 1;
        else if (s < 0 && a > b) len = ((uint64_t)a - (uint64_t)b - 1) / (0 - (uint64_t)s) + 1;
        if (len > JMAX_RANGE)
            fail(J, MMB_ERR_FORMAT, line, "range() of %llu items: more than MAX_RANGE (%d), the range limit of Jinja2's sandbox",
                 (unsigned long long)len, JMAX_RANGE);
        val r = v_list(J);
        for (uint64_t k = 0; k < len; k++) l_push(J, r.u.l, v_int((int64_t)((uint64_t)a + k * (uint64_t)s)));
        return r;
    }
    case FN_STRFTIME: {
        val f = e->nargs ? need_str(J, args[0], line, "strftime_now") : v_cstr("");
        char fmt[256], out[512];
        snprintf(fmt, sizeof fmt, "%.*s", (int)f.u.s.n, f.u.s.p);
        time_t now = time(NULL);
        struct tm tmv;
        localtime_r(&now, &tmv);
        size_t n = strftime(out, sizeof out, fmt, &tmv);
        return v_str(jstrndup(J, out, n), n);
    }
    }
    fail(J, MMB_ERR_FORMAT, line, "bad function");
}

static bool run_test(jctx *J, const char *name, val v, const val *args, int nargs, int line) {
    if (!strcmp(name, "defined")) return v.t != T_UNDEF;
    if (!strcmp(name, "undefined")) return v.t == T_UNDEF;
    if (!strcmp(name, "none")) return v.t == T_NONE;
    if (!strcmp(name, "string")) return v.t == T_STR;
    if (!strcmp(name, "number")) return v.t == T_INT || v.t == T_FLOAT;
    if (!strcmp(name, "integer")) return v.t == T_INT;
    if (!strcmp(name, "float")) return v.t == T_FLOAT;
    if (!strcmp(name, "boolean")) return v.t == T_BOOL;
    if (!strcmp(name, "true")) return v.t == T_BOOL && v.u.b;
    if (!strcmp(name, "false")) return v.t == T_BOOL && !v.u.b;
    if (!strcmp(name, "mapping")) return v.t == T_DICT;
    if (!strcmp(name, "iterable")) return v.t == T_LIST || v.t == T_DICT || v.t == T_STR || v.t == T_UNDEF;
    if (!strcmp(name, "sequence")) return v.t == T_LIST || v.t == T_DICT || v.t == T_STR;
    if (!strcmp(name, "callable")) return v.t == T_FN;
    if (!strcmp(name, "odd") || !strcmp(name, "even")) {
        if (v.t != T_INT) fail(J, MMB_ERR_FORMAT, line, "test %s on a %s", name, type_name(v));
        return (v.u.i % 2 != 0) == (name[0] == 'o');
    }
    if (!strcmp(name, "lower") || !strcmp(name, "upper")) {
        if (v.t != T_STR) return false;
        val c = py_case(J, v, name[0] == 'l' ? CASE_LOWER : CASE_UPPER);
        return cmp_str(c, v) == 0;
    }
    if (nargs >= 1) {
        if (!strcmp(name, "equalto") || !strcmp(name, "eq") || !strcmp(name, "==") || !strcmp(name, "sameas")) return equal(J, v, args[0]);
        if (!strcmp(name, "ne") || !strcmp(name, "!=")) return !equal(J, v, args[0]);
        if (!strcmp(name, "in")) return truthy(binop(J, OP_IN, v, args[0], line));
        if (!strcmp(name, "divisibleby")) {
            if (v.t != T_INT || args[0].t != T_INT) return false;
            if (args[0].u.i == 0) fail(J, MMB_ERR_FORMAT, line, "divisibleby(0): division by zero");
            return args[0].u.i == -1 || v.u.i % args[0].u.i == 0;
        }
    }
    fail(J, MMB_ERR_UNSUPPORTED, line, "the test '%s' is not supported by mmbridge's Jinja subset", name);
}

static val filter(jctx *J, const expr *e, val v, val *args, int line) {
    const char *f = e->name;
    val none = v_none();
    step(J, line, v.t == T_LIST ? (uint64_t)v.u.l->n : v.t == T_DICT ? (uint64_t)v.u.d->n : v.t == T_STR ? v.u.s.n >> 6 : 0);
    if (!strcmp(f, "trim")) { val c = arg_or(e, args, 0, "chars", none); return py_strip(J, stringify(J, v), c.t == T_STR ? &c : NULL, true, true); }
    if (!strcmp(f, "length") || !strcmp(f, "count")) return v_int(py_len(J, v, line));
    if (!strcmp(f, "upper")) return py_case(J, stringify(J, v), CASE_UPPER);
    if (!strcmp(f, "lower")) return py_case(J, stringify(J, v), CASE_LOWER);
    if (!strcmp(f, "capitalize")) return py_case(J, stringify(J, v), CASE_CAP);
    if (!strcmp(f, "string")) return stringify(J, v);
    if (!strcmp(f, "safe") || !strcmp(f, "e") || !strcmp(f, "escape")) {
        if (f[0] == 'e') fail(J, MMB_ERR_UNSUPPORTED, line, "the filter 'escape' is not supported");
        return v;
    }
    if (!strcmp(f, "tojson")) {
        val ind = arg_or(e, args, 0, "indent", none);
        for (int i = 0; i < e->nargs; i++)
            if (e->kw[i] && strcmp(e->kw[i], "indent") && strcmp(e->kw[i], "ensure_ascii"))
                fail(J, MMB_ERR_UNSUPPORTED, line, "tojson(%s=...) is not supported", e->kw[i]);
        jbuf b = {0};
        jb_put(J, &b, "", 0);
        to_json(J, &b, v, ind.t == T_INT ? (int)ind.u.i : -1, 0, line);
        return v_str(b.p, b.n);
    }
    if (!strcmp(f, "int")) {
        if (v.t == T_INT) return v;
        if (v.t == T_FLOAT) {
            if (isnan(v.u.f) || isinf(v.u.f)) return arg_or(e, args, 0, "default", v_int(0));
            if (!(v.u.f > -9223372036854775809.0 && v.u.f < 9223372036854775808.0)) int_overflow(J, line, "int");
            return v_int((int64_t)v.u.f);
        }
        if (v.t == T_BOOL) return v_int(v.u.b);
        if (v.t == T_STR) {
            char *end, tmp[64];
            snprintf(tmp, sizeof tmp, "%.*s", (int)v.u.s.n, v.u.s.p);
            errno = 0;
            long long x = strtoll(tmp, &end, 10);
            bool digits = v.u.s.n > 0;
            for (size_t i = 0; i < v.u.s.n && digits; i++) digits = strchr("0123456789+-_ \t\n", v.u.s.p[i]) != NULL;
            if (digits && (errno == ERANGE || v.u.s.n >= sizeof tmp)) int_overflow(J, line, "int");
            if (v.u.s.n >= sizeof tmp) return v_int(0);
            return v_int(*end || end == tmp ? 0 : x);
        }
        return arg_or(e, args, 0, "default", v_int(0));
    }
    if (!strcmp(f, "float")) {
        if (is_num(v)) return v_float(num(J, v, line, "float"));
        return arg_or(e, args, 0, "default", v_float(0));
    }
    if (!strcmp(f, "abs")) {
        if (v.t == T_INT || v.t == T_BOOL) { if (ival(v) == INT64_MIN) int_overflow(J, line, "abs"); return v_int(ival(v) < 0 ? -ival(v) : ival(v)); }
        return v_float(fabs(num(J, v, line, "abs")));
    }
    if (!strcmp(f, "default") || !strcmp(f, "d")) {
        val d = arg_or(e, args, 0, "default_value", v_cstr("")), b = arg_or(e, args, 1, "boolean", v_bool(false));
        return (v.t == T_UNDEF || (truthy(b) && !truthy(v))) ? d : v;
    }
    if (!strcmp(f, "first") || !strcmp(f, "last")) {
        val l = iterable(J, v, line);
        if (!l.u.l->n) return v_undef("first");
        return l.u.l->v[f[0] == 'f' ? 0 : l.u.l->n - 1];
    }
    if (!strcmp(f, "list")) { val l = iterable(J, v, line); val r = v_list(J); for (int i = 0; i < l.u.l->n; i++) l_push(J, r.u.l, l.u.l->v[i]); return r; }
    if (!strcmp(f, "reverse")) {
        if (v.t == T_STR && !v.parts) return slice(J, v, none, none, v_int(-1), line);
        val l = iterable(J, v, line), r = v_list(J);
        for (int i = l.u.l->n - 1; i >= 0; i--) l_push(J, r.u.l, l.u.l->v[i]);
        return r;
    }
    if (!strcmp(f, "join")) {
        val sep = arg_or(e, args, 0, "d", v_cstr("")), attr = arg_or(e, args, 1, "attribute", none);
        val l = iterable(J, v, line);
        jbuf b = {0};
        jb_put(J, &b, "", 0);
        for (int i = 0; i < l.u.l->n; i++) {
            if (i) { val s = stringify(J, sep); jb_put(J, &b, s.u.s.p, s.u.s.n); }
            val x = l.u.l->v[i];
            if (attr.t == T_STR) x = getattr_(J, x, attr.u.s.p, attr.u.s.n, line);
            x = stringify(J, x);
            jb_put(J, &b, x.u.s.p, x.u.s.n);
        }
        return v_str(b.p, b.n);
    }
    if (!strcmp(f, "items")) {
        if (v.t == T_UNDEF) return v_list(J);
        if (v.t != T_DICT) fail(J, MMB_ERR_FORMAT, line, "items: expected a dict, got %s", type_name(v));
        val r;
        call_method(J, v, "items", e, args, line, &r);
        return r;
    }
    if (!strcmp(f, "replace")) {
        val c = arg_or(e, args, 2, "count", v_int(-1));
        return py_replace(J, stringify(J, v), need_str(J, arg_or(e, args, 0, "old", none), line, f),
                          need_str(J, arg_or(e, args, 1, "new", none), line, f), c.t == T_INT ? c.u.i : -1);
    }
    if (!strcmp(f, "selectattr") || !strcmp(f, "rejectattr") || !strcmp(f, "select") || !strcmp(f, "reject") || !strcmp(f, "map")) {
        bool attr_form = f[strlen(f) - 1] == 'r' && f[0] != 'm'; /* selectattr / rejectattr */
        bool keep_on = f[0] == 's';
        val l = iterable(J, v, line), r = v_list(J);
        if (f[0] == 'm') {
            val a = arg_or(e, args, 99, "attribute", none), d = arg_or(e, args, 99, "default", v_undef("default"));
            if (a.t != T_STR) {
                if (e->nargs >= 1 && args[0].t == T_STR && !e->kw[0]) {
                    for (int i = 0; i < l.u.l->n; i++) {
                        expr fe = *e;
                        fe.name = jstrndup(J, args[0].u.s.p, args[0].u.s.n);
                        fe.nargs = e->nargs - 1;
                        fe.args = e->args + 1;
                        fe.kw = e->kw + 1;
                        l_push(J, r.u.l, filter(J, &fe, l.u.l->v[i], args + 1, line));
                    }
                    return r;
                }
                fail(J, MMB_ERR_UNSUPPORTED, line, "map() needs attribute= or a filter name");
            }
            for (int i = 0; i < l.u.l->n; i++) {
                val x = getattr_(J, l.u.l->v[i], a.u.s.p, a.u.s.n, line);
                l_push(J, r.u.l, x.t == T_UNDEF && d.t != T_UNDEF ? d : x);
            }
            return r;
        }
        int base = attr_form ? 1 : 0;
        if (attr_form && (e->nargs < 1 || args[0].t != T_STR)) fail(J, MMB_ERR_FORMAT, line, "%s needs an attribute name", f);
        for (int i = 0; i < l.u.l->n; i++) {
            val x = l.u.l->v[i];
            if (attr_form) x = (x.t == T_DICT || x.t == T_NS) ? getattr_(J, x, args[0].u.s.p, args[0].u.s.n, line) : v_undef("attribute");
            bool ok;
            if (e->nargs > base) {
                if (args[base].t != T_STR) fail(J, MMB_ERR_FORMAT, line, "%s: the test name must be a string", f);
                const char *tn = jstrndup(J, args[base].u.s.p, args[base].u.s.n);
                ok = run_test(J, tn, x, args + base + 1, e->nargs - base - 1, line);
            } else {
                ok = truthy(x);
            }
            if (ok == keep_on) l_push(J, r.u.l, l.u.l->v[i]);
        }
        return r;
    }
    fail(J, MMB_ERR_UNSUPPORTED, line, "the filter '%s' is not supported by mmbridge's Jinja subset", f);
}

static val eval_inner(jctx *J, const expr *e) {
    switch (e->t) {
    case E_LIT: return e->lit;
    case E_NAME: return lookup(J, e->name);
    case E_ATTR: return getattr_(J, eval(J, e->a), e->name, strlen(e->name), e->line);
    case E_ITEM: return getitem(J, eval(J, e->a), eval(J, e->b), e->line);
    case E_SLICE: {
        val o = eval(J, e->a), none = v_none();
        return slice(J, o, e->b ? eval(J, e->b) : none, e->c ? eval(J, e->c) : none, e->args[0] ? eval(J, e->args[0]) : none, e->line);
    }
    case E_CALL: {
        val *args = eval_args(J, e);
        if (e->a->t == E_ATTR) {
            val obj = eval(J, e->a->a), r;
            if (obj.t == T_UNDEF)
                fail(J, MMB_ERR_FORMAT, e->line, "'%s' is undefined (calling .%s())", obj.name ? obj.name : "value", e->a->name);
            if (call_method(J, obj, e->a->name, e, args, e->line, &r)) return r;
            fail(J, MMB_ERR_UNSUPPORTED, e->line, "the method %s.%s() is not supported by mmbridge's Jinja subset", type_name(obj), e->a->name);
        }
        val f = eval(J, e->a);
        if (f.t != T_FN) {
            if (e->a->t == E_NAME) fail(J, MMB_ERR_UNSUPPORTED, e->line, "the function '%s' is not supported (or not callable)", e->a->name);
            fail(J, MMB_ERR_FORMAT, e->line, "a %s is not callable", type_name(f));
        }
        return call_global(J, f.u.fn, e, args, e->line);
    }
    case E_FILTER: {
        val v = eval(J, e->a);
        return filter(J, e, v, eval_args(J, e), e->line);
    }
    case E_TEST: {
        val v = eval(J, e->a);
        val *args = eval_args(J, e);
        return v_bool(run_test(J, e->name, v, args, e->nargs, e->line) != e->negate);
    }
    case E_BIN: {
        val a = eval(J, e->a), b = eval(J, e->b);
        return binop(J, e->op, a, b, e->line);
    }
    case E_NOT: return v_bool(!truthy(eval(J, e->a)));
    case E_NEG: {
        val v = eval(J, e->a);
        if (v.t == T_INT || v.t == T_BOOL) {
            if (ival(v) == INT64_MIN) int_overflow(J, e->line, "unary -");
            return v_int(-ival(v));
        }
        return v_float(-num(J, v, e->line, "unary -"));
    }
    case E_AND: { val a = eval(J, e->a); return truthy(a) ? eval(J, e->b) : a; }
    case E_OR: { val a = eval(J, e->a); return truthy(a) ? a : eval(J, e->b); }
    case E_COND: return truthy(eval(J, e->b)) ? eval(J, e->a) : e->c ? eval(J, e->c) : v_undef("else");
    case E_LIST: { val l = v_list(J); for (int i = 0; i < e->nargs; i++) l_push(J, l.u.l, eval(J, e->args[i])); return l; }
    case E_DICT: {
        val d = v_dict(J);
        for (int i = 0; i + 1 < e->nargs; i += 2) {
            val k = eval(J, e->args[i]);
            if (k.t != T_STR) fail(J, MMB_ERR_UNSUPPORTED, e->line, "dict keys must be strings");
            d_set(J, d.u.d, k, eval(J, e->args[i + 1]));
        }
        return d;
    }
    }
    fail(J, MMB_ERR_FORMAT, e->line, "bad expression");
}

static val eval(jctx *J, const expr *e) {
    deeper(J, e->line);
    step(J, e->line, 1);
    val v = eval_inner(J, e);
    J->depth--;
    return v;
}

/* ---- execution ------------------------------------------------------------------------------ */

enum { FLOW_NEXT, FLOW_BREAK, FLOW_CONTINUE };

static void emit(jctx *J, const char *s, size_t n) {
    if (n > JMAX_OUTPUT || J->on + n > JMAX_OUTPUT)
        fail(J, MMB_ERR_FORMAT, 0, "the rendered text would exceed %zu MiB (the output limit)", JMAX_OUTPUT >> 20);
    if (J->on + n + 1 > J->ocap) {
        size_t c = J->ocap ? J->ocap * 2 : 4096;
        while (c < J->on + n + 1) c *= 2;
        char *np = realloc(J->out, c);
        if (!np) fail(J, MMB_ERR_NOMEM, 0, "out of memory");
        J->out = np;
        J->ocap = c;
    }
    memcpy(J->out + J->on, s, n);
    J->on += n;
    J->out[J->on] = 0;
}

static void push_scope(jctx *J) {
    if (J->nscope == J->scope_cap) {
        int c = J->scope_cap * 2;
        vdict **ns = jalloc(J, (size_t)c * sizeof *ns);
        memcpy(ns, J->scope, (size_t)J->nscope * sizeof *ns);
        J->scope = ns;
        J->scope_cap = c;
    }
    J->scope[J->nscope++] = jalloc(J, sizeof(vdict));
}

static int exec_body(jctx *J, const node *b);

static void bind_targets(jctx *J, const node *n, val item) {
    if (n->nnames == 1) { assign(J, n->names[0], item); return; }
    val l = iterable(J, item, n->line);
    if (l.u.l->n != n->nnames) fail(J, MMB_ERR_FORMAT, n->line, "cannot unpack %d values into %d names", l.u.l->n, n->nnames);
    for (int i = 0; i < n->nnames; i++) assign(J, n->names[i], l.u.l->v[i]);
}

static int exec_node(jctx *J, const node *n) {
    switch (n->t) {
    case N_TEXT: emit(J, n->text, n->len); return FLOW_NEXT;
    case N_OUT: {
        val v = eval(J, n->e);
        if (v.t == T_STR) emit(J, v.u.s.p, v.u.s.n);
        else { val s = stringify(J, v); emit(J, s.u.s.p, s.u.s.n); }
        return FLOW_NEXT;
    }
    case N_IF: return exec_body(J, n->kids[truthy(eval(J, n->e)) ? 0 : 1]);
    case N_SET: {
        val v = eval(J, n->e);
        bind_targets(J, n, v);
        return FLOW_NEXT;
    }
    case N_SETATTR: {
        val o = lookup(J, n->names[0]);
        if (o.t != T_NS) fail(J, MMB_ERR_FORMAT, n->line, "cannot assign attribute on a %s ('%s' is not a namespace)", type_name(o), n->names[0]);
        d_setc(J, o.u.d, n->attr, eval(J, n->e));
        return FLOW_NEXT;
    }
    case N_BREAK: return FLOW_BREAK;
    case N_CONTINUE: return FLOW_CONTINUE;
    case N_BODY: return exec_body(J, n);
    case N_FOR: {
        val src = eval(J, n->e);
        if (src.t == T_NONE) fail(J, MMB_ERR_FORMAT, n->line, "'NoneType' object is not iterable");
        val all = iterable(J, src, n->line);
        val items = all;
        if (n->cond) { /* the loop's `if` filters before loop.length is known */
            items = v_list(J);
            for (int i = 0; i < all.u.l->n; i++) {
                push_scope(J);
                bind_targets(J, n, all.u.l->v[i]);
                bool keep = truthy(eval(J, n->cond));
                J->nscope--;
                if (keep) l_push(J, items.u.l, all.u.l->v[i]);
            }
        }
        int cnt = items.u.l->n;
        for (int i = 0; i < cnt; i++) {
            step(J, n->line, 1);
            push_scope(J);
            val loop = v_dict(J);
            d_setc(J, loop.u.d, "index", v_int(i + 1));
            d_setc(J, loop.u.d, "index0", v_int(i));
            d_setc(J, loop.u.d, "revindex", v_int(cnt - i));
            d_setc(J, loop.u.d, "revindex0", v_int(cnt - i - 1));
            d_setc(J, loop.u.d, "first", v_bool(i == 0));
            d_setc(J, loop.u.d, "last", v_bool(i == cnt - 1));
            d_setc(J, loop.u.d, "length", v_int(cnt));
            if (i > 0) d_setc(J, loop.u.d, "previtem", items.u.l->v[i - 1]);
            if (i + 1 < cnt) d_setc(J, loop.u.d, "nextitem", items.u.l->v[i + 1]);
            d_setc(J, loop.u.d, "depth", v_int(1));
            d_setc(J, loop.u.d, "depth0", v_int(0));
            assign(J, "loop", loop);
            bind_targets(J, n, items.u.l->v[i]);
            int fl = exec_body(J, n->kids[0]);
            J->nscope--;
            if (fl == FLOW_BREAK) break;
        }
        if (cnt == 0) return exec_body(J, n->kids[1]);
        return FLOW_NEXT;
    }
    }
    return FLOW_NEXT;
}

static int exec_body(jctx *J, const node *b) {
    int fl = FLOW_NEXT;
    deeper(J, b ? b->line : 0);
    for (int i = 0; b && i < b->nkids && fl == FLOW_NEXT; i++) {
        step(J, b->kids[i]->line, 1);
        fl = exec_node(J, b->kids[i]);
    }
    J->depth--;
    return fl;
}

/* ---- entry points ----------------------------------------------------------------------------- */

static val from_json_inner(jctx *J, const cJSON *j, bool content);
static val from_json(jctx *J, const cJSON *j, bool content) {
    deeper(J, 0);
    val v = from_json_inner(J, j, content);
    J->depth--;
    return v;
}
static val from_json_inner(jctx *J, const cJSON *j, bool content) {
    if (cJSON_IsNull(j) || !j) return v_none();
    if (cJSON_IsBool(j)) return v_bool(cJSON_IsTrue(j));
    if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) < 9e15) return v_int((int64_t)d); /* cJSON keeps no int / float distinction */
        return v_float(d);
    }
    if (cJSON_IsString(j)) { val s = v_cstr(jstrndup(J, j->valuestring, strlen(j->valuestring))); s.parts = content; return s; }
    if (cJSON_IsArray(j)) {
        val l = v_list(J);
        const cJSON *it;
        cJSON_ArrayForEach(it, j) l_push(J, l.u.l, from_json(J, it, false));
        return l;
    }
    val d = v_dict(J);
    const cJSON *it;
    cJSON_ArrayForEach(it, j) {
        bool is_content = !strcmp(it->string, "content") && cJSON_IsString(it);
        d_setc(J, d.u.d, jstrndup(J, it->string, strlen(it->string)), from_json(J, it, is_content));
    }
    return d;
}

static void set_globals(jctx *J, const mmb_tokenizer *t, int add_generation_prompt) {
    J->scope_cap = 16;
    J->scope = jalloc(J, (size_t)J->scope_cap * sizeof *J->scope);
    push_scope(J);
    static const char *const fns[] = {"raise_exception", "namespace", "range", "dict", "strftime_now"};
    static const int ids[] = {FN_RAISE, FN_NAMESPACE, FN_RANGE, FN_DICT, FN_STRFTIME};
    for (int i = 0; i < 5; i++) { val f = {0}; f.t = T_FN; f.u.fn = ids[i]; assign(J, fns[i], f); }
    assign(J, "add_generation_prompt", v_bool(add_generation_prompt != 0));
    assign(J, "tools", v_none());
    assign(J, "documents", v_none());
    static const char *const sp[] = {"bos_token", "eos_token", "unk_token", "pad_token"};
    for (int i = 0; i < 4; i++) {
        const char *s = mmb__tokenizer_special(t, sp[i]);
        if (s) assign(J, sp[i], v_cstr(s));
    }
}

/* Parses and runs the template with messages (and extra variables) already in scope 0. */
static mmb_status render(jctx *J, const char *tmpl, char **out) {
    /* jinja2's lexer: newlines normalized to \n, one trailing newline dropped (keep_trailing_newline=False) */
    size_t n = strlen(tmpl);
    char *src = jalloc(J, n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (tmpl[i] == '\r') { src[k++] = '\n'; if (i + 1 < n && tmpl[i + 1] == '\n') i++; }
        else src[k++] = tmpl[i];
    }
    if (k && src[k - 1] == '\n') k--;
    src[k] = 0;
    J->src = src;
    J->len = k;
    J->pos = 0;
    J->line = 1;
    J->line_start = true;
    node *root = body_node(J);
    bool strip = false;
    if (parse_body(J, root, NULL, &strip) >= 0) fail(J, MMB_ERR_FORMAT, J->line, "an end tag without its block");
    exec_body(J, root);
    emit(J, "", 0);
    *out = J->out;
    J->out = NULL;
    return MMB_OK;
}

static void jctx_free(jctx *J) {
    while (J->mem) { blk *n = J->mem->next; free(J->mem); J->mem = n; }
    free(J->out);
}

/* Sets up the variables and renders; errors longjmp back here (nothing here changes after setjmp). */
static mmb_status guarded(jctx *J, const mmb_tokenizer *t, const char *tmpl, const cJSON *msgs, const cJSON *extra,
                          int add_generation_prompt, char **out) {
    int rc = setjmp(J->jb);
    if (rc != 0) return (mmb_status)rc;
    set_globals(J, t, add_generation_prompt);
    const cJSON *it;
    cJSON_ArrayForEach(it, extra) assign(J, jstrndup(J, it->string, strlen(it->string)), from_json(J, it, false));
    cJSON_ArrayForEach(it, msgs) if (!cJSON_IsObject(it)) fail(J, MMB_ERR_FORMAT, 0, "a chat message is not a JSON object");
    assign(J, "messages", from_json(J, msgs, false));
    return render(J, tmpl, out);
}

mmb_status mmb_chat_render_json(mmb_ctx *ctx, const mmb_tokenizer *t, const char *template_text, const char *messages_json,
                                 const char *extra_json, int add_generation_prompt, char **out) {
    if ((!t && !template_text) || !messages_json || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_chat_render_json: NULL argument");
    const char *src_name = "given template";
    if (!template_text) {
        template_text = mmb__tokenizer_chat_template(t, &src_name);
        if (!template_text) return mmb__err(ctx, MMB_ERR_MISSING, "the checkpoint has no chat template (chat_template.jinja, "
                                            "chat_template.json or tokenizer_config.json's chat_template)");
    }
    cJSON *msgs = cJSON_Parse(messages_json), *extra = extra_json ? cJSON_Parse(extra_json) : NULL;
    if (!cJSON_IsArray(msgs) || (extra_json && !cJSON_IsObject(extra))) {
        cJSON_Delete(msgs);
        cJSON_Delete(extra);
        return mmb__err(ctx, MMB_ERR_FORMAT, "chat messages: %s", !cJSON_IsArray(msgs) ? "not a JSON list of messages" : "extra variables: not a JSON object");
    }
    jctx *J = calloc(1, sizeof *J);
    if (!J) { cJSON_Delete(msgs); cJSON_Delete(extra); return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory"); }
    J->ctx = ctx;
    J->src_name = src_name;
    mmb_status s = guarded(J, t, template_text, msgs, extra, add_generation_prompt, out);
    cJSON_Delete(msgs);
    cJSON_Delete(extra);
    jctx_free(J);
    free(J);
    return s;
}

mmb_status mmb_chat_render(mmb_ctx *ctx, const mmb_tokenizer *t, const mmb_chat_msg *msgs, int n, int add_generation_prompt,
                           char **out) {
    if (!t || !out || n < 0 || (n && !msgs)) return mmb__err(ctx, MMB_ERR_ARG, "mmb_chat_render: NULL argument or n < 0");
    for (int i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content) return mmb__err(ctx, MMB_ERR_ARG, "mmb_chat_render: message %d has a NULL role or content", i);
    cJSON *arr = cJSON_CreateArray();
    bool ok = arr != NULL;
    for (int i = 0; ok && i < n; i++) {
        cJSON *m = cJSON_CreateObject();
        ok = m && cJSON_AddItemToArray(arr, m) && cJSON_AddStringToObject(m, "role", msgs[i].role) &&
             cJSON_AddStringToObject(m, "content", msgs[i].content);
    }
    char *js = ok ? cJSON_PrintUnformatted(arr) : NULL;
    cJSON_Delete(arr);
    if (!js) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    mmb_status s = mmb_chat_render_json(ctx, t, NULL, js, NULL, add_generation_prompt, out);
    cJSON_free(js);
    return s;
}
