/* The tokenizer of a checkpoint: tokenizer.json in Hugging Face `tokenizers` format, BPE model,
 * encoding and decoding step for step as that library does (tokenizers 0.2x):
 *
 *   text -> added tokens split out (non-normalized ones on the raw text) -> normalizer on each
 *   remaining piece -> normalized added tokens split out -> pre-tokenizer (pieces -> words) ->
 *   BPE on each word -> post-processor (special tokens) -> ids
 *   ids -> tokens (added tokens' content, else the vocabulary) -> decoder chain -> text
 *
 * Regexes (Split patterns, written for Oniguruma) run on PCRE2 with UTF and UCP; normalization forms
 * come from utf8proc. tokenizer_config.json and friends add the special tokens and the chat template. */
#include "text/text.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

/* ---- growable byte buffer (an allocation failure sets oom; checked once at the end) ----------- */

typedef struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
} sbuf;

static void sb_put(sbuf *b, const void *s, size_t n) {
    if (b->oom) return;
    if (b->n + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 64;
        while (c < b->n + n + 1) c *= 2;
        char *np = realloc(b->p, c);
        if (!np) { b->oom = true; return; }
        b->p = np;
        b->cap = c;
    }
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}
static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

typedef struct ibuf {
    int32_t *p;
    int64_t n, cap;
    bool oom;
} ibuf;

static void ib_push(ibuf *b, int32_t v) {
    if (b->oom) return;
    if (b->n == b->cap) {
        int64_t c = b->cap ? b->cap * 2 : 64;
        int32_t *np = realloc(b->p, (size_t)c * sizeof *np);
        if (!np) { b->oom = true; return; }
        b->p = np;
        b->cap = c;
    }
    b->p[b->n++] = v;
}

/* ---- UTF-8 ---------------------------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s[0, n), or 0 when it is not one (overlong, surrogate,
 * > U+10FFFF, truncated). Sets *cp. */
static int utf8_next(const unsigned char *s, size_t n, int32_t *cp) {
    unsigned c = s[0];
    if (c < 0x80) { *cp = (int32_t)c; return 1; }
    int len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return 0;
    if ((size_t)len > n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    int32_t v = (int32_t)(c & (0xFF >> (len + 1)));
    for (int i = 1; i < len; i++) {
        if (i > 1 && (s[i] & 0xC0) != 0x80) return 0;
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return len;
}

/* Byte offset of the first invalid sequence, or n when s is valid UTF-8. */
static size_t utf8_invalid_at(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    int32_t cp;
    for (size_t i = 0; i < n;) {
        int l = utf8_next(u + i, n - i, &cp);
        if (!l) return i;
        i += (size_t)l;
    }
    return n;
}

/* Appends bytes to b as Rust's String::from_utf8_lossy: each maximal invalid subpart -> U+FFFD. */
static void utf8_lossy(sbuf *b, const unsigned char *s, size_t n) {
    int32_t cp;
    for (size_t i = 0; i < n;) {
        int l = utf8_next(s + i, n - i, &cp);
        if (l) { sb_put(b, s + i, (size_t)l); i += (size_t)l; continue; }
        /* the maximal subpart: a lead byte and the continuation bytes that were still acceptable */
        unsigned c = s[i];
        size_t adv = 1;
        if (c >= 0xC2 && c <= 0xF4) {
            int want = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
            unsigned lo = 0x80, hi = 0xBF;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
            if (i + 1 < n && s[i + 1] >= lo && s[i + 1] <= hi) {
                adv = 2;
                while ((int)adv < want && i + adv < n && (s[i + adv] & 0xC0) == 0x80) adv++;
            }
        }
        sb_put(b, "\xEF\xBF\xBD", 3);
        i += adv;
    }
}

/* Unicode White_Space, as Rust's char::is_whitespace. */
static bool is_ws(int32_t c) {
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
           c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* Rust's char::is_alphanumeric (letters and numbers), or '_'. */
static bool is_word_char(int32_t c) {
    if (c == '_') return true;
    utf8proc_category_t k = utf8proc_category(c);
    return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_LO) ||
           (k >= UTF8PROC_CATEGORY_ND && k <= UTF8PROC_CATEGORY_NO);
}

/* The code point that ends s[0, n) (n > 0, valid UTF-8). */
static int32_t utf8_last(const char *s, size_t n) {
    size_t i = n - 1;
    while (i > 0 && ((unsigned char)s[i] & 0xC0) == 0x80) i--;
    int32_t cp = 0;
    utf8_next((const unsigned char *)s + i, n - i, &cp);
    return cp;
}

/* ---- GPT-2's byte <-> printable character map (ByteLevel) ----------------------------------- */

static void byte_map(int32_t *b2c /* [256] */) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        b2c[b] = keep ? b : 256 + n++;
    }
}

static int put_cp(char *o, int32_t c) { return (int)utf8proc_encode_char(c, (utf8proc_uint8_t *)o); }

/* ---- hash maps: token text -> id, (id, id) -> merge -------------------------------------------- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

typedef struct strmap {
    int32_t *slot;           /* ids, -1 empty; keys are the tokenizer's token texts */
    size_t cap;              /* power of two */
} strmap;

typedef struct pairmap {
    uint64_t *key;           /* (a << 32 | b) + 1; 0 empty */
    int32_t *rank, *new_id;
    size_t cap;
} pairmap;

typedef struct added_tok {
    char *content;           /* as written in the file */
    char *match;             /* what is searched: content, normalized when `normalized` */
    size_t match_len;
    int32_t id;
    bool special, single_word, lstrip, rstrip, normalized;
} added_tok;

/* Where a pattern (tokenizers' Pattern: {"String": s} or {"Regex": r}) is looked for. */
typedef struct matcher {
    char *lit;               /* literal, or NULL */
    size_t lit_len;
    pcre2_code *re;          /* or a compiled regex */
} matcher;

typedef enum { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD, NORM_LOWER, NORM_PREPEND, NORM_REPLACE, NORM_STRIP } norm_kind;
typedef struct norm_op {
    norm_kind k;
    matcher m;               /* NORM_REPLACE */
    char *text;              /* NORM_PREPEND: what is prepended; NORM_REPLACE: the replacement */
    bool left, right;        /* NORM_STRIP */
} norm_op;

typedef enum { B_REMOVED, B_ISOLATED, B_MERGED_PREV, B_MERGED_NEXT, B_CONTIGUOUS } split_behavior;
typedef enum { PRE_SPLIT, PRE_BYTELEVEL, PRE_METASPACE } pre_kind;
enum { SCHEME_ALWAYS, SCHEME_NEVER, SCHEME_FIRST };
typedef struct pre_op {
    pre_kind k;
    matcher m;               /* PRE_SPLIT (Digits, Whitespace, WhitespaceSplit are Splits too) */
    split_behavior beh;
    bool invert;
    bool prefix_space, use_regex; /* PRE_BYTELEVEL */
    char repl[8];            /* PRE_METASPACE: the replacement character, UTF-8 */
    int scheme;
    bool split;
} pre_op;

typedef enum { DEC_BYTELEVEL, DEC_REPLACE, DEC_BYTEFALLBACK, DEC_FUSE, DEC_STRIP, DEC_METASPACE } dec_kind;
typedef struct dec_op {
    dec_kind k;
    matcher m;               /* DEC_REPLACE */
    char *text;              /* DEC_REPLACE: the replacement */
    char strip[8];           /* DEC_STRIP: the character; DEC_METASPACE: the replacement */
    int start, stop;         /* DEC_STRIP */
    int scheme;              /* DEC_METASPACE */
} dec_op;

struct mmb_tokenizer {
    char *path;              /* dir/tokenizer.json, for messages */
    int32_t n_ids;           /* 1 + the largest id */
    char **vocab;            /* [n_ids] the model's token texts (NULL where none) */
    uint32_t *vocab_len;
    int32_t *added_of;       /* [n_ids] index into added, or -1 */
    strmap vmap;             /* model vocabulary */
    pairmap merges;
    int32_t byte_tok[256];   /* "<0xXX>" ids for byte_fallback, -1 when absent */
    bool byte_fallback, fuse_unk, ignore_merges;
    int32_t unk_id;          /* -1: none */
    char *cont_prefix, *eow_suffix;
    int n_added;
    added_tok *added;
    int n_norm, n_pre, n_dec;
    norm_op *norm;
    pre_op *pre;
    dec_op *dec;
    bool has_decoder;
    int n_post_pre, n_post_post;
    int32_t post_pre[8], post_post[8]; /* the post-processor's ids before and after the sequence */
    int32_t b2c[256], c2b[512];        /* ByteLevel maps (c2b: -1 for characters that are no byte) */
    pcre2_code *gpt2_re;     /* ByteLevel's own split (use_regex) */
    /* tokenizer_config.json and friends */
    char *special[4];        /* bos, eos, unk, pad token content */
    int32_t bos_id, eos_id;
    int n_stop;
    int32_t stop[16];
    char *chat_template, *chat_source;
};

static const char *const SPECIAL_NAMES[4] = {"bos_token", "eos_token", "unk_token", "pad_token"};

static size_t next_pow2(size_t n) {
    size_t c = 16;
    while (c < n) c *= 2;
    return c;
}

static bool strmap_init(strmap *m, size_t n) {
    m->cap = next_pow2(n * 2 + 1);
    m->slot = malloc(m->cap * sizeof *m->slot);
    if (!m->slot) return false;
    for (size_t i = 0; i < m->cap; i++) m->slot[i] = -1;
    return true;
}

static int32_t strmap_get(const mmb_tokenizer *t, const char *s, size_t n) {
    if (!t->vmap.slot) return -1;
    size_t mask = t->vmap.cap - 1;
    for (size_t i = hash_bytes(s, n) & mask;; i = (i + 1) & mask) {
        int32_t id = t->vmap.slot[i];
        if (id < 0) return -1;
        if (t->vocab_len[id] == n && memcmp(t->vocab[id], s, n) == 0) return id;
    }
}

static void strmap_put(mmb_tokenizer *t, int32_t id) {
    size_t mask = t->vmap.cap - 1;
    size_t i = hash_bytes(t->vocab[id], t->vocab_len[id]) & mask;
    while (t->vmap.slot[i] >= 0) i = (i + 1) & mask;
    t->vmap.slot[i] = id;
}

static bool pairmap_init(pairmap *m, size_t n) {
    m->cap = next_pow2(n * 2 + 1);
    m->key = calloc(m->cap, sizeof *m->key);
    m->rank = malloc(m->cap * sizeof *m->rank);
    m->new_id = malloc(m->cap * sizeof *m->new_id);
    return m->key && m->rank && m->new_id;
}

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static bool pairmap_get(const pairmap *m, int32_t a, int32_t b, int32_t *rank, int32_t *new_id) {
    if (!m->cap) return false;
    uint64_t k = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    size_t mask = m->cap - 1;
    for (size_t i = mix64(k) & mask;; i = (i + 1) & mask) {
        if (m->key[i] == 0) return false;
        if (m->key[i] == k) { *rank = m->rank[i]; *new_id = m->new_id[i]; return true; }
    }
}

/* Inserts unless present (the first of duplicate merges keeps its rank, as tokenizers). */
static void pairmap_put(pairmap *m, int32_t a, int32_t b, int32_t rank, int32_t new_id) {
    uint64_t k = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    size_t mask = m->cap - 1;
    size_t i = mix64(k) & mask;
    while (m->key[i] && m->key[i] != k) i = (i + 1) & mask;
    if (m->key[i]) return;
    m->key[i] = k;
    m->rank[i] = rank;
    m->new_id[i] = new_id;
}

/* ---- patterns --------------------------------------------------------------------------------- */

static mmb_status re_compile(mmb_ctx *ctx, const char *path, const char *what, const char *pat, pcre2_code **out) {
    int err = 0;
    PCRE2_SIZE off = 0;
    *out = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &err, &off, NULL);
    if (!*out) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return mmb__err(ctx, MMB_ERR_FORMAT, "%s: %s: regex '%s' does not compile at offset %zu: %s", path, what, pat,
                        (size_t)off, (const char *)msg);
    }
    pcre2_jit_compile(*out, PCRE2_JIT_COMPLETE); /* optional: the interpreter runs when JIT is unavailable */
    return MMB_OK;
}

/* Reads a tokenizers Pattern: {"String": s}, {"Regex": r}, or a bare string (a literal). */
static mmb_status matcher_load(mmb_ctx *ctx, const char *path, const char *what, const cJSON *p, matcher *m) {
    const cJSON *s = cJSON_IsString(p) ? p : cJSON_GetObjectItemCaseSensitive(p, "String");
    if (cJSON_IsString(s)) {
        m->lit = strdup(s->valuestring);
        if (!m->lit) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        m->lit_len = strlen(m->lit);
        if (!m->lit_len) return mmb__err(ctx, MMB_ERR_FORMAT, "%s: %s: empty pattern", path, what);
        /* a literal cutting a character in two would hand the regexes (run without a UTF check) broken text */
        if (utf8_invalid_at(m->lit, m->lit_len) < m->lit_len)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: %s: the pattern is not valid UTF-8", path, what);
        return MMB_OK;
    }
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(p, "Regex");
    if (cJSON_IsString(r)) return re_compile(ctx, path, what, r->valuestring, &m->re);
    return mmb__err(ctx, MMB_ERR_FORMAT, "%s: %s: pattern is neither {\"String\": ...} nor {\"Regex\": ...}", path, what);
}

static void matcher_free(matcher *m) {
    free(m->lit);
    if (m->re) pcre2_code_free(m->re);
}

/* Finds the next match in s[from, n): sets [*ms, *me). A regex's empty match is skipped. Returns
 * false when there is none (or on a match error / out of memory, then *err is set). */
static bool matcher_find(const matcher *m, const char *s, size_t n, size_t from, size_t *ms, size_t *me, bool *err) {
    if (m->lit) {
        if (from >= n) return false;
        const char *p = memmem(s + from, n - from, m->lit, m->lit_len);
        if (!p) return false;
        *ms = (size_t)(p - s);
        *me = *ms + m->lit_len;
        return true;
    }
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(m->re, NULL);
    if (!md) { *err = true; return false; }
    bool found = false;
    while (from <= n) {
        int rc = pcre2_match(m->re, (PCRE2_SPTR)s, n, from, PCRE2_NO_UTF_CHECK, md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) { *err = true; break; }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        if (ov[1] > ov[0]) { *ms = ov[0]; *me = ov[1]; found = true; break; }
        /* empty match: move on one character */
        from = ov[0] + 1;
        while (from < n && ((unsigned char)s[from] & 0xC0) == 0x80) from++;
    }
    pcre2_match_data_free(md);
    return found;
}

/* Appends s with every match of m replaced by rep. */
static bool replace_all(const matcher *m, const char *s, size_t n, const char *rep, sbuf *out) {
    bool err = false;
    size_t at = 0, ms, me;
    while (matcher_find(m, s, n, at, &ms, &me, &err)) {
        sb_put(out, s + at, ms - at);
        sb_str(out, rep);
        at = me;
    }
    sb_put(out, s + at, n - at);
    return !err;
}

/* ---- pieces: what flows between the encoding steps --------------------------------------------- */

typedef struct piece {
    char *s;                 /* owned text (NULL for an added token) */
    size_t n;
    int32_t id;              /* an added token's id, else -1 */
    bool start;              /* starts at offset 0 of the original text (Metaspace "first") */
} piece;

typedef struct plist {
    piece *p;
    int64_t n, cap;
    bool oom;
} plist;

static void pl_push(plist *l, const char *s, size_t n, int32_t id, bool start) {
    if (l->oom) return;
    if (l->n == l->cap) {
        int64_t c = l->cap ? l->cap * 2 : 16;
        piece *np = realloc(l->p, (size_t)c * sizeof *np);
        if (!np) { l->oom = true; return; }
        l->p = np;
        l->cap = c;
    }
    piece pc = {NULL, n, id, start};
    if (id < 0) {
        pc.s = malloc(n + 1);
        if (!pc.s) { l->oom = true; return; }
        memcpy(pc.s, s, n);
        pc.s[n] = 0;
    }
    l->p[l->n++] = pc;
}

static void pl_free(plist *l) {
    for (int64_t i = 0; i < l->n; i++) free(l->p[i].s);
    free(l->p);
    memset(l, 0, sizeof *l);
}

/* ---- added tokens: tokenizers' AddedVocabulary::find_matches (leftmost-longest) ------------- */

static void split_added(const mmb_tokenizer *t, bool normalized, const char *s, size_t n, bool start, plist *out) {
    size_t start_off = 0, i = 0;
    while (i < n) {
        int best = -1;
        size_t best_len = 0;
        for (int k = 0; k < t->n_added; k++) {
            const added_tok *a = &t->added[k];
            if (a->normalized != normalized || a->match_len <= best_len || a->match_len > n - i) continue;
            if (memcmp(s + i, a->match, a->match_len) == 0) { best = k; best_len = a->match_len; }
        }
        if (best < 0) { i++; continue; }
        const added_tok *a = &t->added[best];
        size_t ms = i, me = i + best_len;
        i = me; /* the search goes on after the raw match, whether it is kept or not */
        if (a->single_word) {
            bool left_ok = ms == 0 || !is_word_char(utf8_last(s, ms));
            int32_t cp = 0;
            bool right_ok = me == n || (utf8_next((const unsigned char *)s + me, n - me, &cp) && !is_word_char(cp));
            if (!left_ok || !right_ok) continue;
        }
        if (a->lstrip) {
            size_t ns = ms;
            while (ns > 0) {
                size_t b = ns - 1;
                while (b > 0 && ((unsigned char)s[b] & 0xC0) == 0x80) b--;
                int32_t cp = 0;
                utf8_next((const unsigned char *)s + b, ns - b, &cp);
                if (!is_ws(cp)) break;
                ns = b;
            }
            ms = ns > start_off ? ns : start_off;
        }
        if (a->rstrip) {
            int32_t cp = 0;
            int l;
            while (me < n && (l = utf8_next((const unsigned char *)s + me, n - me, &cp)) > 0 && is_ws(cp)) me += (size_t)l;
        }
        if (start_off < ms) pl_push(out, s + start_off, ms - start_off, -1, start && start_off == 0);
        pl_push(out, NULL, 0, a->id, false);
        start_off = me;
    }
    if (start_off < n || n == 0) pl_push(out, s + start_off, n - start_off, -1, start && start_off == 0);
}

/* ---- normalizers ------------------------------------------------------------------------------ */

static bool normalize_one(const norm_op *op, const char *s, size_t n, sbuf *out) {
    switch (op->k) {
    case NORM_NFC: case NORM_NFD: case NORM_NFKC: case NORM_NFKD: {
        if (n == 0) return true;
        int opt = UTF8PROC_STABLE;
        opt |= (op->k == NORM_NFC || op->k == NORM_NFKC) ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE;
        if (op->k == NORM_NFKC || op->k == NORM_NFKD) opt |= UTF8PROC_COMPAT;
        utf8proc_uint8_t *r = NULL;
        utf8proc_ssize_t len = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &r, (utf8proc_option_t)opt);
        if (len < 0) { free(r); return false; }
        sb_put(out, r, (size_t)len);
        free(r);
        return true;
    }
    case NORM_LOWER: {
        int32_t cp;
        char enc[8];
        for (size_t i = 0; i < n;) {
            int l = utf8_next((const unsigned char *)s + i, n - i, &cp);
            if (!l) return false;
            sb_put(out, enc, (size_t)put_cp(enc, utf8proc_tolower(cp)));
            i += (size_t)l;
        }
        return true;
    }
    case NORM_PREPEND:
        if (n) sb_str(out, op->text);
        sb_put(out, s, n);
        return true;
    case NORM_REPLACE: return replace_all(&op->m, s, n, op->text, out);
    case NORM_STRIP: {
        size_t a = 0, b = n;
        int32_t cp;
        int l;
        if (op->left)
            while (a < b && (l = utf8_next((const unsigned char *)s + a, b - a, &cp)) > 0 && is_ws(cp)) a += (size_t)l;
        if (op->right)
            while (b > a) {
                size_t k = b - 1;
                while (k > a && ((unsigned char)s[k] & 0xC0) == 0x80) k--;
                utf8_next((const unsigned char *)s + k, b - k, &cp);
                if (!is_ws(cp)) break;
                b = k;
            }
        sb_put(out, s + a, b - a);
        return true;
    }
    }
    return false;
}

/* Runs every normalizer on s[0, n); the result (malloc'd) in *res, *rn. */
static bool normalize(const mmb_tokenizer *t, const char *s, size_t n, char **res, size_t *rn) {
    sbuf cur = {0};
    sb_put(&cur, s, n);
    for (int i = 0; i < t->n_norm && !cur.oom; i++) {
        sbuf nx = {0};
        sb_put(&nx, "", 0);
        bool ok = normalize_one(&t->norm[i], cur.p, cur.n, &nx);
        free(cur.p);
        cur = nx;
        if (!ok) cur.oom = true;
    }
    if (cur.oom) { free(cur.p); return false; }
    *res = cur.p;
    *rn = cur.n;
    return true;
}

/* ---- pre-tokenizers --------------------------------------------------------------------------- */

/* tokenizers' NormalizedString::split with a behavior (the spans between and at matches, folded as
 * tokenizers folds them); empty pieces are dropped. */
static bool split_pattern(const matcher *m, split_behavior beh, bool invert, const piece *in, plist *out) {
    const char *s = in->s;
    size_t n = in->n;
    size_t at = 0, ms = 0, me = 0;
    bool err = false;
    size_t pend_s = 0, pend_e = 0; /* MergedWithNext: a delimiter waiting for the span after it */
    bool pend = false;
    size_t prev_s = 0;             /* MergedWithPrevious / Contiguous: the last emitted span */
    bool have_prev = false, prev_match = false;
#define EMIT(a, b) do { if ((b) > (a)) pl_push(out, s + (a), (b) - (a), -1, in->start && (a) == 0); } while (0)
#define REPLACE_LAST(a, b) do { out->n--; free(out->p[out->n].s); EMIT(a, b); } while (0)
    for (;;) {
        bool found = matcher_find(m, s, n, at, &ms, &me, &err);
        if (err) return false;
        for (int part = 0; part < 2; part++) {   /* the gap before the match, then the match */
            size_t a = part ? ms : at, b = part ? me : (found ? ms : n);
            if (part && !found) break;
            if (b <= a) continue;
            bool is_match = (part == 1) != invert;
            switch (beh) {
            case B_REMOVED: if (!is_match) EMIT(a, b); break;
            case B_ISOLATED: EMIT(a, b); break;
            case B_MERGED_PREV:
                if (is_match && have_prev && !prev_match) REPLACE_LAST(prev_s, b);
                else { EMIT(a, b); prev_s = a; have_prev = true; }
                prev_match = is_match;
                break;
            case B_MERGED_NEXT:
                if (is_match) {
                    if (pend) EMIT(pend_s, pend_e);
                    pend = true;
                    pend_s = a;
                    pend_e = b;
                } else {
                    EMIT(pend ? pend_s : a, b);
                    pend = false;
                }
                break;
            case B_CONTIGUOUS:
                if (is_match && have_prev && prev_match) REPLACE_LAST(prev_s, b);
                else { EMIT(a, b); prev_s = a; have_prev = true; }
                prev_match = is_match;
                break;
            }
        }
        if (!found) break;
        at = me;
    }
    if (pend) EMIT(pend_s, pend_e);
#undef EMIT
#undef REPLACE_LAST
    return !out->oom;
}

static bool pretok_one(const mmb_tokenizer *t, const pre_op *op, const piece *in, plist *out) {
    switch (op->k) {
    case PRE_SPLIT: return split_pattern(&op->m, op->beh, op->invert, in, out);
    case PRE_BYTELEVEL: {
        sbuf src = {0};
        if (op->prefix_space && (in->n == 0 || in->s[0] != ' ')) sb_put(&src, " ", 1);
        sb_put(&src, in->s, in->n);
        if (src.oom) return false;
        plist words = {0};
        piece whole = {src.p, src.n, -1, in->start};
        bool ok = true;
        if (op->use_regex) {
            matcher m = {NULL, 0, t->gpt2_re};
            ok = split_pattern(&m, B_ISOLATED, false, &whole, &words);
        } else {
            pl_push(&words, src.p, src.n, -1, in->start);
        }
        for (int64_t w = 0; ok && w < words.n; w++) {
            sbuf mapped = {0};
            char enc[8];
            for (size_t i = 0; i < words.p[w].n; i++)
                sb_put(&mapped, enc, (size_t)put_cp(enc, t->b2c[(unsigned char)words.p[w].s[i]]));
            if (mapped.oom) ok = false;
            else pl_push(out, mapped.p, mapped.n, -1, words.p[w].start);
            free(mapped.p);
        }
        pl_free(&words);
        free(src.p);
        return ok && !out->oom;
    }
    case PRE_METASPACE: {
        matcher sp = {(char *)" ", 1, NULL};
        sbuf r = {0};
        if (!replace_all(&sp, in->s, in->n, op->repl, &r)) { free(r.p); return false; }
        size_t rl = strlen(op->repl);
        bool has = r.n >= rl && memcmp(r.p, op->repl, rl) == 0;
        if (!has && (op->scheme == SCHEME_ALWAYS || (op->scheme == SCHEME_FIRST && in->start))) {
            sbuf p2 = {0};
            sb_str(&p2, op->repl);
            sb_put(&p2, r.p, r.n);
            free(r.p);
            r = p2;
        }
        if (r.oom) { free(r.p); return false; }
        bool ok = true;
        if (op->split) {
            matcher m = {(char *)op->repl, rl, NULL};
            piece whole = {r.p, r.n, -1, in->start};
            ok = split_pattern(&m, B_MERGED_NEXT, false, &whole, out);
        } else if (r.n) {
            pl_push(out, r.p, r.n, -1, in->start);
        }
        free(r.p);
        return ok && !out->oom;
    }
    }
    return false;
}

/* ---- BPE (tokenizers' BPE::merge_word and Word::merge_all) ------------------------------------ */

typedef struct sym {
    int32_t c, prev, next, len;
} sym;

typedef struct mrg {
    int32_t rank, pos, new_id;
} mrg;

static bool mrg_less(const mrg *a, const mrg *b) { /* pops first: lower rank, then lower pos */
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(mrg *h, int *n, mrg v) {
    int i = (*n)++;
    while (i > 0) {
        int p = (i - 1) / 2;
        if (!mrg_less(&v, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static mrg heap_pop(mrg *h, int *n) {
    mrg top = h[0], v = h[--(*n)];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        const mrg *best = &v;
        if (l < *n && mrg_less(&h[l], best)) { m = l; best = &h[l]; }
        if (r < *n && mrg_less(&h[r], best)) m = r;
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (*n > 0) h[i] = v;
    return top;
}

/* Tokenizes one word (pre-tokenized text) and appends its ids. */
static bool bpe_word(const mmb_tokenizer *t, const char *w, size_t n, ibuf *ids) {
    if (n == 0) return true;
    if (t->ignore_merges) {
        int32_t id = strmap_get(t, w, n);
        if (id >= 0) { ib_push(ids, id); return !ids->oom; }
    }
    /* at most one symbol per byte of each character's lookup string (byte fallback) */
    size_t extra = (t->cont_prefix ? strlen(t->cont_prefix) : 0) + (t->eow_suffix ? strlen(t->eow_suffix) : 0);
    sym *sy = malloc((n * (1 + extra) + 2) * sizeof *sy);
    if (!sy) return false;
    int ns = 0;
    int32_t unk_len = 0;
    bool unk = false;
    sbuf tmp = {0};
#define ADD(id_, len_) do { sy[ns].c = (id_); sy[ns].len = (len_); sy[ns].prev = ns - 1; sy[ns].next = ns + 1; ns++; } while (0)
    for (size_t i = 0; i < n;) {
        int32_t cp;
        int l = utf8_next((const unsigned char *)w + i, n - i, &cp);
        if (!l) l = 1;
        bool first = i == 0, last = i + (size_t)l == n;
        const char *s = w + i;
        size_t sl = (size_t)l;
        if ((!first && t->cont_prefix) || (last && t->eow_suffix)) {
            tmp.n = 0;
            if (!first && t->cont_prefix) sb_str(&tmp, t->cont_prefix);
            sb_put(&tmp, w + i, (size_t)l);
            if (last && t->eow_suffix) sb_str(&tmp, t->eow_suffix);
            if (tmp.oom) { free(sy); free(tmp.p); return false; }
            s = tmp.p;
            sl = tmp.n;
        }
        int32_t id = strmap_get(t, s, sl);
        if (id >= 0) {
            if (unk) { ADD(t->unk_id, unk_len); unk = false; }
            ADD(id, l);
        } else {
            bool done = false;
            if (t->byte_fallback) {
                bool all = true;
                for (size_t k = 0; k < sl; k++) all = all && t->byte_tok[(unsigned char)s[k]] >= 0;
                if (all) {
                    for (size_t k = 0; k < sl; k++) ADD(t->byte_tok[(unsigned char)s[k]], 1);
                    done = true;
                }
            }
            if (!done && t->unk_id >= 0) {
                if (unk && t->fuse_unk) unk_len += l;
                else {
                    if (unk) ADD(t->unk_id, unk_len);
                    unk = true;
                    unk_len = l;
                }
            }
        }
        i += (size_t)l;
    }
    if (unk) ADD(t->unk_id, unk_len);
#undef ADD
    free(tmp.p);
    if (ns == 0) { free(sy); return true; }
    sy[ns - 1].next = -1;
    mrg *heap = malloc((size_t)(3 * ns + 2) * sizeof *heap); /* ns - 1 pairs, then two per merge */
    if (!heap) { free(sy); return false; }
    int nh = 0;
    int32_t rank, nid;
    for (int i = 0; i + 1 < ns; i++)
        if (pairmap_get(&t->merges, sy[i].c, sy[i + 1].c, &rank, &nid)) heap_push(heap, &nh, (mrg){rank, i, nid});
    while (nh > 0) {
        mrg top = heap_pop(heap, &nh);
        sym *cur = &sy[top.pos];
        if (cur->len == 0 || cur->next == -1) continue;
        int nx = cur->next;
        sym right = sy[nx];
        if (!pairmap_get(&t->merges, cur->c, right.c, &rank, &nid) || nid != top.new_id) continue;
        cur->c = top.new_id;
        cur->len += right.len;
        cur->next = right.next;
        sy[nx].len = 0;
        if (right.next >= 0) sy[right.next].prev = top.pos;
        if (cur->prev >= 0 && pairmap_get(&t->merges, sy[cur->prev].c, cur->c, &rank, &nid))
            heap_push(heap, &nh, (mrg){rank, cur->prev, nid});
        if (cur->next >= 0 && pairmap_get(&t->merges, cur->c, sy[cur->next].c, &rank, &nid))
            heap_push(heap, &nh, (mrg){rank, top.pos, nid});
    }
    for (int i = 0; i < ns; i++)
        if (sy[i].len) ib_push(ids, sy[i].c);
    free(heap);
    free(sy);
    return !ids->oom;
}

/* ---- encode --------------------------------------------------------------------------------- */

mmb_status mmb_tokenizer_encode(mmb_ctx *ctx, const mmb_tokenizer *t, const char *text, size_t len, int add_special,
                                int32_t **ids, int64_t *n) {
    if (!t || !ids || !n || (!text && len)) return mmb__err(ctx, MMB_ERR_ARG, "mmb_tokenizer_encode: NULL argument");
    if (!text) text = "";
    size_t bad = utf8_invalid_at(text, len);
    if (bad < len) return mmb__err(ctx, MMB_ERR_ARG, "text to encode is not valid UTF-8 at byte %zu", bad);
    ibuf out = {0};
    plist raw = {0}, norm = {0};
    bool ok = true;
    if (add_special) for (int i = 0; i < t->n_post_pre; i++) ib_push(&out, t->post_pre[i]);
    /* 1. non-normalized added tokens on the raw text; 2. normalize the rest, then normalized ones */
    split_added(t, false, text, len, true, &raw);
    for (int64_t i = 0; ok && !raw.oom && i < raw.n; i++) {
        const piece *p = &raw.p[i];
        if (p->id >= 0) { pl_push(&norm, NULL, 0, p->id, false); continue; }
        char *ns = NULL;
        size_t nn = 0;
        if (!normalize(t, p->s, p->n, &ns, &nn)) { ok = false; break; }
        split_added(t, true, ns, nn, p->start, &norm);
        free(ns);
    }
    ok = ok && !raw.oom && !norm.oom;
    /* 3. pre-tokenize each remaining piece, 4. BPE each word */
    for (int64_t i = 0; ok && i < norm.n; i++) {
        const piece *p = &norm.p[i];
        if (p->id >= 0) { ib_push(&out, p->id); continue; }
        if (p->n == 0) continue;
        plist cur = {0};
        pl_push(&cur, p->s, p->n, -1, p->start);
        ok = !cur.oom; /* each stage's list checked: a piece it failed to keep must not vanish from the next */
        for (int k = 0; ok && k < t->n_pre; k++) {
            plist nx = {0};
            for (int64_t j = 0; ok && j < cur.n; j++) ok = pretok_one(t, &t->pre[k], &cur.p[j], &nx);
            ok = ok && !nx.oom;
            pl_free(&cur);
            cur = nx;
        }
        for (int64_t j = 0; ok && j < cur.n; j++) ok = bpe_word(t, cur.p[j].s, cur.p[j].n, &out);
        ok = ok && !cur.oom;
        pl_free(&cur);
    }
    if (add_special) for (int i = 0; i < t->n_post_post; i++) ib_push(&out, t->post_post[i]);
    pl_free(&raw);
    pl_free(&norm);
    if (!ok || out.oom) {
        free(out.p);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: encoding failed: out of memory or a regex match error", t->path);
    }
    if (!out.p) out.p = malloc(sizeof(int32_t));
    if (!out.p) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    *ids = out.p;
    *n = out.n;
    return MMB_OK;
}

/* ---- decode --------------------------------------------------------------------------------- */

typedef struct tlist {
    sbuf *s;
    int n, cap;
    bool oom;
} tlist;

static void tl_push(tlist *l, const char *p, size_t n) {
    if (l->oom) return;
    if (l->n == l->cap) {
        int c = l->cap ? l->cap * 2 : 16;
        sbuf *ns = realloc(l->s, (size_t)c * sizeof *ns);
        if (!ns) { l->oom = true; return; }
        l->s = ns;
        l->cap = c;
    }
    sbuf b = {0};
    sb_put(&b, p, n);
    if (b.oom) l->oom = true;
    l->s[l->n++] = b;
}

static void tl_free(tlist *l) {
    for (int i = 0; i < l->n; i++) free(l->s[i].p);
    free(l->s);
    memset(l, 0, sizeof *l);
}

/* "<0xXX>" -> the byte, or -1. */
static int byte_token(const sbuf *s) {
    if (s->n != 6 || memcmp(s->p, "<0x", 3) || s->p[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s->p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* One decoder of the chain: tokens in -> tokens out. */
static bool decode_step(const mmb_tokenizer *t, const dec_op *op, const tlist *in, tlist *out) {
    bool ok = true;
    sbuf acc = {0};
    sb_put(&acc, "", 0);
    switch (op->k) {
    case DEC_BYTELEVEL: { /* every token's characters back to bytes (a token with a character outside
                             the map contributes its own UTF-8), then lossy UTF-8 over all of them */
        sbuf bytes = {0};
        for (int i = 0; i < in->n; i++) {
            const sbuf *tk = &in->s[i];
            size_t start = bytes.n;
            int32_t cp;
            for (size_t k = 0; k < tk->n;) {
                int l = utf8_next((const unsigned char *)tk->p + k, tk->n - k, &cp);
                if (!l || cp >= 512 || t->c2b[cp] < 0) { bytes.n = start; sb_put(&bytes, tk->p, tk->n); break; }
                unsigned char b = (unsigned char)t->c2b[cp];
                sb_put(&bytes, &b, 1);
                k += (size_t)l;
            }
        }
        utf8_lossy(&acc, (const unsigned char *)bytes.p, bytes.n);
        tl_push(out, acc.p, acc.n);
        ok = !bytes.oom;
        free(bytes.p);
        break;
    }
    case DEC_REPLACE:
        for (int i = 0; i < in->n && ok; i++) {
            acc.n = 0;
            ok = replace_all(&op->m, in->s[i].p, in->s[i].n, op->text, &acc);
            tl_push(out, acc.p, acc.n);
        }
        break;
    case DEC_BYTEFALLBACK: { /* runs of <0xXX> tokens -> their UTF-8 text, or one U+FFFD per byte */
        int nb = 0;
        for (int i = 0; i <= in->n; i++) {
            int b = i < in->n ? byte_token(&in->s[i]) : -1;
            if (b >= 0) {
                unsigned char c = (unsigned char)b;
                sb_put(&acc, &c, 1);
                nb++;
                continue;
            }
            if (nb) {
                if (utf8_invalid_at(acc.p, acc.n) == acc.n) tl_push(out, acc.p, acc.n);
                else for (int k = 0; k < nb; k++) tl_push(out, "\xEF\xBF\xBD", 3);
                acc.n = 0;
                nb = 0;
            }
            if (i < in->n) tl_push(out, in->s[i].p, in->s[i].n);
        }
        break;
    }
    case DEC_FUSE:
        for (int i = 0; i < in->n; i++) sb_put(&acc, in->s[i].p, in->s[i].n);
        tl_push(out, acc.p, acc.n);
        break;
    case DEC_STRIP: {
        size_t cl = strlen(op->strip);
        for (int i = 0; i < in->n; i++) {
            const char *p = in->s[i].p;
            size_t a = 0, b = in->s[i].n;
            for (int k = 0; k < op->start && b - a >= cl && memcmp(p + a, op->strip, cl) == 0; k++) a += cl;
            for (int k = 0; k < op->stop && b - a >= cl && memcmp(p + b - cl, op->strip, cl) == 0; k++) b -= cl;
            tl_push(out, p + a, b - a);
        }
        break;
    }
    case DEC_METASPACE: {
        matcher m = {(char *)op->strip, strlen(op->strip), NULL};
        for (int i = 0; i < in->n && ok; i++) {
            acc.n = 0;
            /* tokenizers' Metaspace decoder drops every replacement of the first token (not only a leading one:
             * "e▁nai" decodes as "enai") unless the scheme is "never"; later ones become spaces */
            ok = replace_all(&m, in->s[i].p, in->s[i].n, i == 0 && op->scheme != SCHEME_NEVER ? "" : " ", &acc);
            tl_push(out, acc.p, acc.n);
        }
        break;
    }
    }
    ok = ok && !acc.oom && !out->oom;
    free(acc.p);
    return ok;
}

/* The text of the decoded ids, raw: decoders applied, tokens joined. */
static mmb_status decode_all(mmb_ctx *ctx, const mmb_tokenizer *t, const int32_t *ids, int64_t n, int skip_special,
                             sbuf *res) {
    tlist cur = {0};
    bool ok = true;
    for (int64_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_ids) continue;
        const char *s;
        size_t sl;
        int32_t a = t->added_of[id];
        if (a >= 0) {
            if (skip_special && t->added[a].special) continue;
            s = t->added[a].content;
            sl = strlen(s);
        } else if (t->vocab[id]) {
            s = t->vocab[id];
            sl = t->vocab_len[id];
        } else {
            continue;
        }
        tl_push(&cur, s, sl);
    }
    ok = !cur.oom;
    for (int k = 0; ok && t->has_decoder && k < t->n_dec; k++) {
        tlist nx = {0};
        ok = decode_step(t, &t->dec[k], &cur, &nx);
        tl_free(&cur);
        cur = nx;
    }
    sb_put(res, "", 0);
    for (int i = 0; ok && i < cur.n; i++) {
        if (i && !t->has_decoder) sb_put(res, " ", 1);
        sb_put(res, cur.s[i].p, cur.s[i].n);
    }
    tl_free(&cur);
    if (!ok || res->oom) { free(res->p); *res = (sbuf){0}; return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory"); }
    return MMB_OK;
}

mmb_status mmb_tokenizer_decode(mmb_ctx *ctx, const mmb_tokenizer *t, const int32_t *ids, int64_t n, int skip_special,
                                char **text, size_t *len) {
    if (!t || !text || !len || n < 0 || (!ids && n)) return mmb__err(ctx, MMB_ERR_ARG, "mmb_tokenizer_decode: NULL argument or n < 0");
    sbuf r = {0};
    mmb_status s = decode_all(ctx, t, ids, n, skip_special, &r);
    if (s != MMB_OK) return s;
    *text = r.p;
    *len = r.n;
    return MMB_OK;
}

/* How many of ids[0, n) come before the trailing run of byte-fallback tokens ("<0xXX>" with a ByteFallback decoder;
 * ids the decode drops do not end a run). tokenizers decodes such a run as a whole, its UTF-8 or one U+FFFD per byte
 * when any of it is not, so no part of the run is final before the run ends. */
static int64_t before_byte_run(const mmb_tokenizer *t, const int32_t *ids, int64_t n, int skip_special) {
    bool fallback = false;
    for (int k = 0; t->has_decoder && k < t->n_dec; k++) fallback |= t->dec[k].k == DEC_BYTEFALLBACK;
    if (!fallback) return n;
    int64_t k = n;
    for (; k > 0; k--) {
        int32_t id = ids[k - 1], a = id >= 0 && id < t->n_ids ? t->added_of[id] : -1;
        if (id < 0 || id >= t->n_ids || (a >= 0 && skip_special && t->added[a].special)) continue;
        const char *tx = a >= 0 ? t->added[a].content : t->vocab[id];
        if (!tx) continue;
        sbuf v = {.p = (char *)tx, .n = strlen(tx)};
        if (byte_token(&v) < 0) break;
    }
    return k;
}

mmb_status mmb_tokenizer_decode_stream(mmb_ctx *ctx, const mmb_tokenizer *t, const int32_t *ids, int64_t n,
                                       int skip_special, int flush, size_t *emitted, char **text, size_t *len) {
    if (!t || !text || !len || !emitted || n < 0 || (!ids && n))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_tokenizer_decode_stream: NULL argument or n < 0");
    sbuf r = {0};
    mmb_status s = decode_all(ctx, t, ids, flush ? n : before_byte_run(t, ids, n, skip_special), skip_special, &r);
    if (s != MMB_OK) return s;
    size_t end = r.n;
    if (!flush) {
        /* the decoded text is valid UTF-8 (bytes that are not became U+FFFD): an incomplete character
         * at the end shows as a trailing run of U+FFFD, which later byte tokens may complete */
        while (end >= 3 && memcmp(r.p + end - 3, "\xEF\xBF\xBD", 3) == 0) end -= 3;
    }
    /* the text may shrink for a while (a run of byte tokens with an incomplete character becomes one
     * U+FFFD per byte, the earlier complete characters of the run included): never hand out less */
    size_t from = *emitted;
    size_t cnt = end > from ? end - from : 0;
    char *o = malloc(cnt + 1);
    if (!o) { free(r.p); return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory"); }
    memcpy(o, r.p + from, cnt);
    o[cnt] = 0;
    free(r.p);
    *text = o;
    *len = cnt;
    *emitted = from + cnt;
    return MMB_OK;
}

/* ---- queries -------------------------------------------------------------------------------- */

int32_t mmb_tokenizer_token_id(const mmb_tokenizer *t, const char *token) {
    if (!t || !token) return -1;
    for (int i = 0; i < t->n_added; i++)
        if (strcmp(t->added[i].content, token) == 0) return t->added[i].id;
    return strmap_get(t, token, strlen(token));
}

const char *mmb_tokenizer_token_text(const mmb_tokenizer *t, int32_t id) {
    if (!t || id < 0 || id >= t->n_ids) return NULL;
    if (t->added_of[id] >= 0) return t->added[t->added_of[id]].content;
    return t->vocab[id];
}

int64_t mmb_tokenizer_vocab_size(const mmb_tokenizer *t) { return t ? t->n_ids : 0; }
int32_t mmb_tokenizer_bos_id(const mmb_tokenizer *t) { return t ? t->bos_id : -1; }
int32_t mmb_tokenizer_eos_id(const mmb_tokenizer *t) { return t ? t->eos_id : -1; }

int mmb_tokenizer_is_special(const mmb_tokenizer *t, int32_t id) {
    return t && id >= 0 && id < t->n_ids && t->added_of[id] >= 0 && t->added[t->added_of[id]].special;
}

int mmb_tokenizer_stop_ids(const mmb_tokenizer *t, int32_t *out, int cap) {
    if (!t) return 0;
    for (int i = 0; i < t->n_stop && i < cap && out; i++) out[i] = t->stop[i];
    return t->n_stop;
}

const char *mmb__tokenizer_chat_template(const mmb_tokenizer *t, const char **source) {
    if (source) *source = t ? t->chat_source : NULL;
    return t ? t->chat_template : NULL;
}

const char *mmb__tokenizer_special(const mmb_tokenizer *t, const char *name) {
    for (int i = 0; t && i < 4; i++)
        if (strcmp(name, SPECIAL_NAMES[i]) == 0) return t->special[i];
    return NULL;
}

/* ---- open ------------------------------------------------------------------------------------ */

void mmb_tokenizer_free(mmb_tokenizer *t) {
    if (!t) return;
    for (int32_t i = 0; t->vocab && i < t->n_ids; i++) free(t->vocab[i]);
    free(t->vocab);
    free(t->vocab_len);
    free(t->added_of);
    free(t->vmap.slot);
    free(t->merges.key);
    free(t->merges.rank);
    free(t->merges.new_id);
    for (int i = 0; i < t->n_added; i++) {
        if (t->added[i].match != t->added[i].content) free(t->added[i].match);
        free(t->added[i].content);
    }
    free(t->added);
    for (int i = 0; i < t->n_norm; i++) { matcher_free(&t->norm[i].m); free(t->norm[i].text); }
    free(t->norm);
    for (int i = 0; i < t->n_pre; i++) matcher_free(&t->pre[i].m);
    free(t->pre);
    for (int i = 0; i < t->n_dec; i++) { matcher_free(&t->dec[i].m); free(t->dec[i].text); }
    free(t->dec);
    if (t->gpt2_re) pcre2_code_free(t->gpt2_re);
    for (int i = 0; i < 4; i++) free(t->special[i]);
    free(t->cont_prefix);
    free(t->eow_suffix);
    free(t->chat_template);
    free(t->chat_source);
    free(t->path);
    free(t);
}

typedef struct loader {
    mmb_ctx *ctx;
    mmb_tokenizer *t;
    const char *path;
} loader;

static const char *jstr(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static bool jbool(const cJSON *o, const char *k, bool def) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : def;
}

static const char *jtype(const cJSON *o) {
    const char *s = jstr(o, "type");
    return s ? s : "(no type)";
}

static mmb_status unsupported(loader *L, const char *what, const char *type) {
    return mmb__err(L->ctx, MMB_ERR_UNSUPPORTED, "%s: %s type '%s' is not supported (docs/decisions.md lists what is)",
                    L->path, what, type);
}

/* Counts the leaves of a component that may be a "Sequence" of them under `list_key`. */
static int count_leaves(const cJSON *o, const char *list_key) {
    if (!o || cJSON_IsNull(o)) return 0;
    const char *ty = jstr(o, "type");
    if (ty && strcmp(ty, "Sequence") == 0) {
        int n = 0;
        const cJSON *it;
        cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(o, list_key)) n += count_leaves(it, list_key);
        return n;
    }
    return 1;
}

typedef mmb_status (*leaf_fn)(loader *L, const cJSON *o);

/* A component that may be null, one leaf, or a "Sequence" of them (nested) under list_key: calls
 * leaf on each leaf in order. */
static mmb_status load_seq(loader *L, const cJSON *o, const char *list_key, leaf_fn leaf) {
    if (!o || cJSON_IsNull(o)) return MMB_OK;
    if (strcmp(jtype(o), "Sequence") != 0) return leaf(L, o);
    const cJSON *it;
    cJSON_ArrayForEach(it, cJSON_GetObjectItemCaseSensitive(o, list_key)) {
        mmb_status s = load_seq(L, it, list_key, leaf);
        if (s != MMB_OK) return s;
    }
    return MMB_OK;
}

static mmb_status load_norm(loader *L, const cJSON *o) {
    mmb_tokenizer *t = L->t;
    const char *ty = jtype(o);
    norm_op *op = &t->norm[t->n_norm];
    memset(op, 0, sizeof *op);
    if (!strcmp(ty, "NFC")) op->k = NORM_NFC;
    else if (!strcmp(ty, "NFD")) op->k = NORM_NFD;
    else if (!strcmp(ty, "NFKC")) op->k = NORM_NFKC;
    else if (!strcmp(ty, "NFKD")) op->k = NORM_NFKD;
    else if (!strcmp(ty, "Lowercase")) op->k = NORM_LOWER;
    else if (!strcmp(ty, "Strip")) {
        op->k = NORM_STRIP;
        op->left = jbool(o, "strip_left", false);
        op->right = jbool(o, "strip_right", false);
    } else if (!strcmp(ty, "Prepend")) {
        const char *p = jstr(o, "prepend");
        if (!p) return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: normalizer Prepend without \"prepend\"", L->path);
        if (utf8_invalid_at(p, strlen(p)) < strlen(p))
            return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: normalizer Prepend: \"prepend\" is not valid UTF-8", L->path);
        op->k = NORM_PREPEND;
        if (!(op->text = strdup(p))) return mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory");
    } else if (!strcmp(ty, "Replace")) {
        const char *c = jstr(o, "content");
        if (!c) return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: normalizer Replace without \"content\"", L->path);
        if (utf8_invalid_at(c, strlen(c)) < strlen(c)) /* it goes into the text the regexes read unchecked */
            return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: normalizer Replace: \"content\" is not valid UTF-8", L->path);
        op->k = NORM_REPLACE;
        t->n_norm++; /* owned from here on, freed with the tokenizer */
        if (!(op->text = strdup(c))) return mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory");
        return matcher_load(L->ctx, L->path, "normalizer Replace", cJSON_GetObjectItemCaseSensitive(o, "pattern"), &op->m);
    } else {
        return unsupported(L, "normalizer", ty);
    }
    t->n_norm++;
    return MMB_OK;
}

static int parse_scheme(const cJSON *o) {
    const char *ps = jstr(o, "prepend_scheme");
    if (ps) return !strcmp(ps, "never") ? SCHEME_NEVER : !strcmp(ps, "first") ? SCHEME_FIRST : SCHEME_ALWAYS;
    return jbool(o, "add_prefix_space", true) ? SCHEME_ALWAYS : SCHEME_NEVER;
}

static bool copy_repl(const cJSON *o, char *dst) {
    const char *r = jstr(o, "replacement");
    if (!r) r = jstr(o, "str_rep");
    if (!r) r = "\xE2\x96\x81";
    if (strlen(r) >= 8 || utf8_invalid_at(r, strlen(r)) < strlen(r)) return false;
    strcpy(dst, r);
    return true;
}

static mmb_status load_pre(loader *L, const cJSON *o) {
    mmb_tokenizer *t = L->t;
    const char *ty = jtype(o);
    pre_op *op = &t->pre[t->n_pre];
    memset(op, 0, sizeof *op);
    if (!strcmp(ty, "Split")) {
        const char *b = jstr(o, "behavior");
        op->k = PRE_SPLIT;
        op->invert = jbool(o, "invert", false);
        if (!b) return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: pre-tokenizer Split without \"behavior\"", L->path);
        if (!strcmp(b, "Removed")) op->beh = B_REMOVED;
        else if (!strcmp(b, "Isolated")) op->beh = B_ISOLATED;
        else if (!strcmp(b, "MergedWithPrevious")) op->beh = B_MERGED_PREV;
        else if (!strcmp(b, "MergedWithNext")) op->beh = B_MERGED_NEXT;
        else if (!strcmp(b, "Contiguous")) op->beh = B_CONTIGUOUS;
        else return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: pre-tokenizer Split: unknown behavior '%s'", L->path, b);
        t->n_pre++;
        return matcher_load(L->ctx, L->path, "pre-tokenizer Split", cJSON_GetObjectItemCaseSensitive(o, "pattern"), &op->m);
    }
    if (!strcmp(ty, "Digits") || !strcmp(ty, "Whitespace") || !strcmp(ty, "WhitespaceSplit")) {
        /* as tokenizers defines them: Digits splits digit runs (or each digit) off, Whitespace keeps
         * \w+ and [^\w\s]+ runs, WhitespaceSplit drops whitespace */
        const char *re;
        op->k = PRE_SPLIT;
        if (!strcmp(ty, "Digits")) {
            bool indiv = jbool(o, "individual_digits", false);
            re = "[0-9]";
            op->beh = indiv ? B_ISOLATED : B_CONTIGUOUS;
        } else if (!strcmp(ty, "Whitespace")) {
            re = "\\w+|[^\\w\\s]+";
            op->beh = B_REMOVED;
            op->invert = true;
        } else {
            re = "\\s+";
            op->beh = B_REMOVED;
        }
        t->n_pre++;
        return re_compile(L->ctx, L->path, ty, re, &op->m.re);
    }
    if (!strcmp(ty, "ByteLevel")) {
        op->k = PRE_BYTELEVEL;
        op->prefix_space = jbool(o, "add_prefix_space", true);
        op->use_regex = jbool(o, "use_regex", true);
    } else if (!strcmp(ty, "Metaspace")) {
        op->k = PRE_METASPACE;
        if (!copy_repl(o, op->repl)) return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: Metaspace replacement too long or not valid UTF-8", L->path);
        op->scheme = parse_scheme(o);
        op->split = jbool(o, "split", true);
    } else {
        return unsupported(L, "pre-tokenizer", ty);
    }
    t->n_pre++;
    return MMB_OK;
}

static mmb_status load_dec(loader *L, const cJSON *o) {
    mmb_tokenizer *t = L->t;
    const char *ty = jtype(o);
    dec_op *op = &t->dec[t->n_dec];
    memset(op, 0, sizeof *op);
    if (!strcmp(ty, "ByteLevel")) op->k = DEC_BYTELEVEL;
    else if (!strcmp(ty, "ByteFallback")) op->k = DEC_BYTEFALLBACK;
    else if (!strcmp(ty, "Fuse")) op->k = DEC_FUSE;
    else if (!strcmp(ty, "Strip")) {
        const char *c = jstr(o, "content");
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, "start"), *b = cJSON_GetObjectItemCaseSensitive(o, "stop");
        if (!c || strlen(c) >= 8 || !cJSON_IsNumber(a) || !cJSON_IsNumber(b))
            return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: decoder Strip needs content (one character), start and stop", L->path);
        op->k = DEC_STRIP;
        strcpy(op->strip, c);
        op->start = a->valueint;
        op->stop = b->valueint;
    } else if (!strcmp(ty, "Metaspace")) {
        op->k = DEC_METASPACE;
        if (!copy_repl(o, op->strip)) return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: Metaspace replacement too long or not valid UTF-8", L->path);
        op->scheme = parse_scheme(o);
    } else if (!strcmp(ty, "Replace")) {
        const char *c = jstr(o, "content");
        if (!c) return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: decoder Replace without \"content\"", L->path);
        op->k = DEC_REPLACE;
        t->n_dec++;
        if (!(op->text = strdup(c))) return mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory");
        return matcher_load(L->ctx, L->path, "decoder Replace", cJSON_GetObjectItemCaseSensitive(o, "pattern"), &op->m);
    } else {
        return unsupported(L, "decoder", ty);
    }
    t->n_dec++;
    return MMB_OK;
}

/* A post-processor id: a JSON integer in [0, the vocabulary size), else MMB_ERR_FORMAT naming the token. */
static mmb_status post_id(loader *L, const cJSON *v, const char *name, int32_t *out) {
    double d = cJSON_IsNumber(v) ? v->valuedouble : -1;
    if (!(d >= 0 && d < (double)L->t->n_ids) || d != (double)(int64_t)d)
        return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: post_processor: special token '%s': id %.17g is not an id of the "
                        "vocabulary [0, %d)", L->path, name, d, (int)L->t->n_ids);
    *out = (int32_t)d;
    return MMB_OK;
}

/* Appends a special token's ids (by name in the post-processor's special_tokens, or by content); each
 * id must be in the vocabulary. */
static mmb_status post_ids(loader *L, const cJSON *specials, const char *name, int32_t *dst, int *n) {
    const cJSON *sp = cJSON_GetObjectItemCaseSensitive(specials, name);
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(sp, "ids"), *it;
    if (!cJSON_IsArray(ids))
        return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: post_processor: special token '%s' has no ids", L->path, name);
    cJSON_ArrayForEach(it, ids) {
        if (!cJSON_IsNumber(it) || *n >= 8)
            return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: post_processor: bad ids for '%s'", L->path, name);
        mmb_status s = post_id(L, it, name, &dst[*n]);
        if (s != MMB_OK) return s;
        ++*n;
    }
    return MMB_OK;
}

static mmb_status load_post(loader *L, const cJSON *o) {
    mmb_tokenizer *t = L->t;
    const char *ty = jtype(o);
    const cJSON *it;
    if (!strcmp(ty, "ByteLevel")) return MMB_OK; /* offsets only */
    if (!strcmp(ty, "TemplateProcessing")) {
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(o, "single");
        const cJSON *specials = cJSON_GetObjectItemCaseSensitive(o, "special_tokens");
        bool after = false;
        t->n_post_pre = t->n_post_post = 0;
        cJSON_ArrayForEach(it, single) {
            const cJSON *sp = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
            if (cJSON_GetObjectItemCaseSensitive(it, "Sequence")) { after = true; continue; }
            const char *id = jstr(sp, "id");
            if (!id) return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: post_processor: bad template piece", L->path);
            mmb_status s = after ? post_ids(L, specials, id, t->post_post, &t->n_post_post)
                                 : post_ids(L, specials, id, t->post_pre, &t->n_post_pre);
            if (s != MMB_OK) return s;
        }
        return MMB_OK;
    }
    if (!strcmp(ty, "RobertaProcessing") || !strcmp(ty, "BertProcessing")) {
        const cJSON *cls = cJSON_GetObjectItemCaseSensitive(o, "cls"), *sep = cJSON_GetObjectItemCaseSensitive(o, "sep");
        if (cJSON_GetArraySize(cls) != 2 || cJSON_GetArraySize(sep) != 2)
            return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: post_processor %s needs cls and sep", L->path, ty);
        mmb_status s = post_id(L, cJSON_GetArrayItem(cls, 1), "cls", &t->post_pre[0]);
        if (s == MMB_OK) s = post_id(L, cJSON_GetArrayItem(sep, 1), "sep", &t->post_post[0]);
        if (s != MMB_OK) return s;
        t->n_post_pre = t->n_post_post = 1;
        return MMB_OK;
    }
    return unsupported(L, "post_processor", ty);
}

static mmb_status load_model(loader *L, const cJSON *m) {
    mmb_tokenizer *t = L->t;
    mmb_ctx *ctx = L->ctx;
    if (!cJSON_IsObject(m)) return mmb__err(ctx, MMB_ERR_FORMAT, "%s: no \"model\" object", L->path);
    const char *ty = jstr(m, "type");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (ty ? strcmp(ty, "BPE") != 0 : !cJSON_IsArray(merges))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: model type '%s' is not supported: mmbridge reads BPE tokenizers only "
                        "(WordPiece, Unigram and WordLevel are refused)", L->path, ty ? ty : "(none)");
    if (!cJSON_IsObject(vocab)) return mmb__err(ctx, MMB_ERR_FORMAT, "%s: model.vocab is not an object", L->path);
    if (!cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(m, "dropout")) && cJSON_GetObjectItemCaseSensitive(m, "dropout"))
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: BPE dropout is not supported", L->path);
    t->byte_fallback = jbool(m, "byte_fallback", false);
    t->fuse_unk = jbool(m, "fuse_unk", false);
    t->ignore_merges = jbool(m, "ignore_merges", false);
    const char *cp = jstr(m, "continuing_subword_prefix"), *ew = jstr(m, "end_of_word_suffix");
    if ((cp && !(t->cont_prefix = strdup(cp))) || (ew && !(t->eow_suffix = strdup(ew))))
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    return MMB_OK;
}

/* Sizes the id tables from the vocabulary and the added tokens, fills the vocabulary. */
static mmb_status load_vocab(loader *L, const cJSON *root) {
    mmb_tokenizer *t = L->t;
    mmb_ctx *ctx = L->ctx;
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "model"), "vocab");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), *it;
    int64_t maxid = -1, nv = 0;
    cJSON_ArrayForEach(it, vocab) {
        if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > INT32_MAX - 1 || it->valuedouble != (double)(int64_t)it->valuedouble)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: model.vocab['%s'] is not a valid id", L->path, it->string);
        if ((int64_t)it->valuedouble > maxid) maxid = (int64_t)it->valuedouble;
        nv++;
    }
    cJSON_ArrayForEach(it, added) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(it, "id");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble > INT32_MAX - 1 || !jstr(it, "content"))
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s: added_tokens: an entry without a valid id or content", L->path);
        if ((int64_t)id->valuedouble > maxid) maxid = (int64_t)id->valuedouble;
    }
    if (maxid > (1 << 26)) return mmb__err(ctx, MMB_ERR_FORMAT, "%s: token id %lld is implausibly large", L->path, (long long)maxid);
    t->n_ids = (int32_t)(maxid + 1);
    t->vocab = calloc((size_t)t->n_ids + 1, sizeof *t->vocab);
    t->vocab_len = calloc((size_t)t->n_ids + 1, sizeof *t->vocab_len);
    t->added_of = malloc(((size_t)t->n_ids + 1) * sizeof *t->added_of);
    if (!t->vocab || !t->vocab_len || !t->added_of || !strmap_init(&t->vmap, (size_t)nv))
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int32_t i = 0; i < t->n_ids; i++) t->added_of[i] = -1;
    cJSON_ArrayForEach(it, vocab) {
        int32_t id = (int32_t)it->valuedouble;
        if (t->vocab[id]) return mmb__err(ctx, MMB_ERR_FORMAT, "%s: model.vocab: id %d given twice", L->path, id);
        if (!(t->vocab[id] = strdup(it->string))) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        t->vocab_len[id] = (uint32_t)strlen(it->string);
        strmap_put(t, id);
    }
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_tok[b] = strmap_get(t, name, 6);
    }
    return MMB_OK;
}

static mmb_status load_merges(loader *L, const cJSON *m) {
    mmb_tokenizer *t = L->t;
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges"), *it;
    int n = cJSON_GetArraySize(merges);
    if (merges && !cJSON_IsArray(merges)) return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: model.merges is not a list", L->path);
    if (!pairmap_init(&t->merges, (size_t)n)) return mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory");
    size_t plen = t->cont_prefix ? strlen(t->cont_prefix) : 0;
    sbuf nt = {0};
    int32_t rank = 0;
    mmb_status s = MMB_OK;
    cJSON_ArrayForEach(it, merges) {
        const char *a, *b;
        size_t al, bl;
        char *sp = NULL;
        if (cJSON_IsString(it)) { /* "a b" */
            sp = strchr(it->valuestring, ' ');
            if (!sp) { s = mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: merge %d '%s' is not two tokens", L->path, rank, it->valuestring); break; }
            a = it->valuestring;
            al = (size_t)(sp - a);
            b = sp + 1;
            bl = strlen(b);
        } else if (cJSON_GetArraySize(it) == 2 && cJSON_IsString(cJSON_GetArrayItem(it, 0)) && cJSON_IsString(cJSON_GetArrayItem(it, 1))) {
            a = cJSON_GetArrayItem(it, 0)->valuestring;
            b = cJSON_GetArrayItem(it, 1)->valuestring;
            al = strlen(a);
            bl = strlen(b);
        } else {
            s = mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: merge %d is neither \"a b\" nor [a, b]", L->path, rank);
            break;
        }
        int32_t ia = strmap_get(t, a, al), ib = strmap_get(t, b, bl);
        nt.n = 0;
        sb_put(&nt, a, al);
        if (plen && bl >= plen && memcmp(b, t->cont_prefix, plen) == 0) sb_put(&nt, b + plen, bl - plen);
        else sb_put(&nt, b, bl);
        if (nt.oom) { s = mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory"); break; }
        int32_t in = strmap_get(t, nt.p, nt.n);
        if (ia < 0 || ib < 0 || in < 0) {
            s = mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: merge %d ('%.*s' + '%.*s') names a token absent from the vocabulary",
                         L->path, rank, (int)al, a, (int)bl, b);
            break;
        }
        pairmap_put(&t->merges, ia, ib, rank, in);
        rank++;
    }
    free(nt.p);
    return s;
}

static mmb_status load_added(loader *L, const cJSON *root) {
    mmb_tokenizer *t = L->t;
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), *it;
    int n = cJSON_GetArraySize(added);
    t->added = calloc((size_t)n + 1, sizeof *t->added);
    if (!t->added) return mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory");
    cJSON_ArrayForEach(it, added) {
        added_tok *a = &t->added[t->n_added];
        const char *c = jstr(it, "content");
        a->id = (int32_t)cJSON_GetObjectItemCaseSensitive(it, "id")->valuedouble;
        a->special = jbool(it, "special", false);
        a->single_word = jbool(it, "single_word", false);
        a->lstrip = jbool(it, "lstrip", false);
        a->rstrip = jbool(it, "rstrip", false);
        a->normalized = jbool(it, "normalized", !a->special);
        if (!(a->content = strdup(c))) return mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory");
        t->n_added++;
        if (utf8_invalid_at(c, strlen(c)) != strlen(c))
            return mmb__err(L->ctx, MMB_ERR_FORMAT, "%s: added token %d is not valid UTF-8", L->path, a->id);
        a->match = a->content;
        if (a->normalized && t->n_norm) {
            size_t nn;
            if (!normalize(t, c, strlen(c), &a->match, &nn)) {
                a->match = a->content;
                return mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory");
            }
        }
        a->match_len = strlen(a->match);
        if (t->added_of[a->id] < 0) t->added_of[a->id] = t->n_added - 1;
    }
    return MMB_OK;
}

static char *join_path(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* Reads dir/name if it exists: MMB_OK with *out NULL when absent. */
static mmb_status read_optional(mmb_ctx *ctx, const char *dir, const char *name, cJSON **out, char **path_out) {
    *out = NULL;
    char *p = join_path(dir, name);
    if (!p) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    struct stat st;  /* present in any form: mmb__json_read refuses what is not a regular file */
    mmb_status s = MMB_OK;
    if (stat(p, &st) == 0 || errno != ENOENT) s = mmb__json_read(ctx, p, out);
    if (path_out && *out) *path_out = p;
    else free(p);
    return s;
}

/* A special token as tokenizer_config.json writes it: a string or {"content": ...}. */
static const char *token_content(const cJSON *v) {
    if (cJSON_IsString(v)) return v->valuestring;
    return jstr(v, "content");
}

/* An id or the first of a list of ids at key in o (or o.text_config), or -1. */
static int json_ids(const cJSON *o, const char *key, int32_t *out, int cap) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v || cJSON_IsNull(v)) v = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(o, "text_config"), key);
    int n = 0;
    if (cJSON_IsNumber(v)) {
        if (cap > 0) out[n++] = (int32_t)v->valuedouble;
    } else if (cJSON_IsArray(v)) {
        const cJSON *it;
        cJSON_ArrayForEach(it, v) if (cJSON_IsNumber(it) && n < cap) out[n++] = (int32_t)it->valuedouble;
    }
    return n;
}

static char *read_text_file(const char *path) {
    FILE *f = NULL;
    if (mmb__fopen_input(NULL, path, &f) != MMB_OK) return NULL;
    sbuf b = {0};
    char buf[65536];
    size_t r;
    sb_put(&b, "", 0);
    while ((r = fread(buf, 1, sizeof buf, f)) > 0) sb_put(&b, buf, r);
    fclose(f);
    if (b.oom) { free(b.p); return NULL; }
    return b.p;
}

/* tokenizer_config.json, special_tokens_map.json, chat templates, generation_config.json, config.json. */
static mmb_status load_config(loader *L, const char *dir, const cJSON *tc, const char *tc_path) {
    mmb_tokenizer *t = L->t;
    mmb_ctx *ctx = L->ctx;
    cJSON *stm = NULL, *gc = NULL, *cfg = NULL, *ctj = NULL;
    char *ctj_path = NULL;
    mmb_status s = read_optional(ctx, dir, "special_tokens_map.json", &stm, NULL);
    if (s == MMB_OK) s = read_optional(ctx, dir, "generation_config.json", &gc, NULL);
    if (s == MMB_OK) s = read_optional(ctx, dir, "config.json", &cfg, NULL);
    if (s == MMB_OK) s = read_optional(ctx, dir, "chat_template.json", &ctj, &ctj_path);
    for (int i = 0; s == MMB_OK && i < 4; i++) {
        const char *c = token_content(cJSON_GetObjectItemCaseSensitive(tc, SPECIAL_NAMES[i]));
        if (!c) c = token_content(cJSON_GetObjectItemCaseSensitive(stm, SPECIAL_NAMES[i]));
        if (c && !(t->special[i] = strdup(c))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    }
    if (s == MMB_OK) {
        int32_t v[16];
        t->bos_id = t->special[0] ? mmb_tokenizer_token_id(t, t->special[0]) : -1;
        t->eos_id = t->special[1] ? mmb_tokenizer_token_id(t, t->special[1]) : -1;
        if (t->bos_id < 0 && !t->special[0]) {
            if (json_ids(gc, "bos_token_id", v, 1) || json_ids(cfg, "bos_token_id", v, 1)) t->bos_id = v[0];
        }
        if (t->eos_id < 0 && !t->special[1]) {
            if (json_ids(gc, "eos_token_id", v, 1) || json_ids(cfg, "eos_token_id", v, 1)) t->eos_id = v[0];
        }
        t->n_stop = gc ? json_ids(gc, "eos_token_id", t->stop, 16) : 0;
        if (!t->n_stop) t->n_stop = json_ids(cfg, "eos_token_id", t->stop, 16);
        if (!t->n_stop && t->eos_id >= 0) t->stop[t->n_stop++] = t->eos_id;
    }
    /* the chat template: chat_template.jinja, chat_template.json, tokenizer_config.json */
    if (s == MMB_OK) {
        char *jp = join_path(dir, "chat_template.jinja");
        const char *src = NULL;
        const cJSON *ct = NULL;
        char *text = jp ? read_text_file(jp) : NULL;
        if (text) src = jp;
        else if ((ct = cJSON_GetObjectItemCaseSensitive(ctj, "chat_template")) && ctj_path) src = ctj_path;
        else if ((ct = cJSON_GetObjectItemCaseSensitive(tc, "chat_template")) && tc_path) src = tc_path;
        if (!text && ct) {
            const char *str = cJSON_IsString(ct) ? ct->valuestring : NULL;
            if (cJSON_IsArray(ct)) { /* [{"name": ..., "template": ...}]: the "default" one */
                const cJSON *it;
                cJSON_ArrayForEach(it, ct) {
                    const char *nm = jstr(it, "name");
                    if (nm && !strcmp(nm, "default")) str = jstr(it, "template");
                }
            }
            if (str && !(text = strdup(str))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        }
        if (text) {
            t->chat_template = text;
            if (!(t->chat_source = strdup(src))) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
        }
        free(jp);
    }
    cJSON_Delete(stm);
    cJSON_Delete(gc);
    cJSON_Delete(cfg);
    cJSON_Delete(ctj);
    free(ctj_path);
    return s;
}

/* transformers 5's LlamaTokenizer (tokenizer_class "LlamaTokenizer" / "LlamaTokenizerFast") keeps
 * the file's vocabulary, merges, added tokens and post-processor but rebuilds the rest: no
 * normalizer, Metaspace("▁", prepend_scheme "first" ("always" with legacy: true, "never" with
 * add_prefix_space: false), split false), BPE with byte_fallback and fuse_unk, and the decoder
 * Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0) (no Strip without a prefix space). */
static mmb_status llama_rebuild(loader *L, const cJSON *tc) {
    mmb_tokenizer *t = L->t;
    const char *cls = jstr(tc, "tokenizer_class");
    if (!cls || (strcmp(cls, "LlamaTokenizer") && strcmp(cls, "LlamaTokenizerFast"))) return MMB_OK;
    const cJSON *aps = cJSON_GetObjectItemCaseSensitive(tc, "add_prefix_space");
    bool prefix = !cJSON_IsFalse(aps);
    bool legacy = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(tc, "legacy"));
    for (int i = 0; i < t->n_norm; i++) { matcher_free(&t->norm[i].m); free(t->norm[i].text); }
    for (int i = 0; i < t->n_pre; i++) matcher_free(&t->pre[i].m);
    for (int i = 0; i < t->n_dec; i++) { matcher_free(&t->dec[i].m); free(t->dec[i].text); }
    free(t->pre);
    free(t->dec);
    t->n_norm = t->n_pre = t->n_dec = 0;
    t->pre = calloc(1, sizeof *t->pre);
    t->dec = calloc(4, sizeof *t->dec);
    if (!t->pre || !t->dec) return mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory");
    t->pre[0].k = PRE_METASPACE;
    strcpy(t->pre[0].repl, "\xE2\x96\x81");
    t->pre[0].scheme = !prefix ? SCHEME_NEVER : legacy ? SCHEME_ALWAYS : SCHEME_FIRST;
    t->pre[0].split = false;
    t->n_pre = 1;
    t->byte_fallback = t->fuse_unk = true;
    t->ignore_merges = false;
    t->has_decoder = true;
    dec_op *d = t->dec;
    d[0].k = DEC_REPLACE;
    d[0].m.lit = strdup("\xE2\x96\x81");
    d[0].m.lit_len = 3;
    d[0].text = strdup(" ");
    d[1].k = DEC_BYTEFALLBACK;
    d[2].k = DEC_FUSE;
    d[3].k = DEC_STRIP;
    strcpy(d[3].strip, " ");
    d[3].start = 1;
    t->n_dec = prefix ? 4 : 3;
    if (!d[0].m.lit || !d[0].text) return mmb__err(L->ctx, MMB_ERR_NOMEM, "out of memory");
    return MMB_OK;
}

mmb_status mmb_tokenizer_open(mmb_ctx *ctx, const char *dir, mmb_tokenizer **out) {
    if (!dir || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_tokenizer_open: NULL argument");
    mmb_tokenizer *t = calloc(1, sizeof *t);
    if (!t || !(t->path = join_path(dir, "tokenizer.json"))) {
        free(t);
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    }
    t->unk_id = t->bos_id = t->eos_id = -1;
    byte_map(t->b2c);
    for (int i = 0; i < 512; i++) t->c2b[i] = -1;
    for (int b = 0; b < 256; b++) t->c2b[t->b2c[b]] = b;
    loader L = {ctx, t, t->path};
    cJSON *root = NULL;
    FILE *f = NULL;
    mmb_status s = mmb__fopen_input(ctx, t->path, &f);  /* a FIFO, device or socket: refused at once */
    if (s != MMB_OK && errno != EINVAL)
        s = mmb__err(ctx, MMB_ERR_IO, "%s: cannot open the tokenizer: %s", t->path, strerror(errno));
    else if (s == MMB_OK) {
        fclose(f);
        s = mmb__json_read(ctx, t->path, &root);
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (s == MMB_OK) s = load_model(&L, model);
    if (s == MMB_OK) s = load_vocab(&L, root);
    if (s == MMB_OK) s = load_merges(&L, model);
    if (s == MMB_OK) {
        const char *unk = jstr(model, "unk_token");
        if (unk && (t->unk_id = strmap_get(t, unk, strlen(unk))) < 0)
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s: unk_token '%s' is not in the vocabulary", t->path, unk);
    }
    const cJSON *nj = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    const cJSON *pj = cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer");
    const cJSON *dj = cJSON_GetObjectItemCaseSensitive(root, "decoder");
    if (s == MMB_OK) {
        t->norm = calloc((size_t)count_leaves(nj, "normalizers") + 1, sizeof *t->norm);
        t->pre = calloc((size_t)count_leaves(pj, "pretokenizers") + 1, sizeof *t->pre);
        t->dec = calloc((size_t)count_leaves(dj, "decoders") + 1, sizeof *t->dec);
        if (!t->norm || !t->pre || !t->dec) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    }
    if (s == MMB_OK) s = load_seq(&L, nj, "normalizers", load_norm);
    if (s == MMB_OK) s = load_seq(&L, pj, "pretokenizers", load_pre);
    if (s == MMB_OK) s = load_seq(&L, dj, "decoders", load_dec);
    if (s == MMB_OK) t->has_decoder = dj && !cJSON_IsNull(dj);
    if (s == MMB_OK) s = load_seq(&L, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), "processors", load_post);
    cJSON *tc = NULL;
    char *tc_path = NULL;
    if (s == MMB_OK) s = read_optional(ctx, dir, "tokenizer_config.json", &tc, &tc_path);
    if (s == MMB_OK) s = llama_rebuild(&L, tc);
    if (s == MMB_OK) s = load_added(&L, root);
    if (s == MMB_OK)
        s = re_compile(ctx, t->path, "ByteLevel",
                       "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", &t->gpt2_re);
    if (s == MMB_OK) s = load_config(&L, dir, tc, tc_path);
    cJSON_Delete(tc);
    free(tc_path);
    cJSON_Delete(root);
    if (s != MMB_OK) {
        mmb_tokenizer_free(t);
        return s;
    }
    *out = t;
    return MMB_OK;
}
