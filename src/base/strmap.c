/* A string-to-index hash map: open addressing with linear probing over a power-of-two table of
 * (key, value) slots, FNV-1a hashes, grown at half full. Keys are borrowed, not copied. */
#include "base/base.h"

#include <stdlib.h>
#include <string.h>

static uint64_t hash(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

/* The slot of key in m (its own, or the empty one where it would go); m->cap > 0. */
static size_t slot(const mmb__strmap *m, const char *key, uint64_t *probes) {
    size_t mask = m->cap - 1, i = (size_t)hash(key) & mask;
    while (m->keys[i]) {
        ++*probes;
        if (strcmp(m->keys[i], key) == 0) break;
        i = (i + 1) & mask;
    }
    return i;
}

static bool grow(mmb__strmap *m) {
    size_t cap = m->cap ? m->cap * 2 : 64;
    if (cap < m->cap || cap > SIZE_MAX / sizeof(const char *)) return false;
    mmb__strmap g = {.cap = cap, .n = m->n, .probes = m->probes};
    g.keys = calloc(cap, sizeof *g.keys);
    g.vals = malloc(cap * sizeof *g.vals);
    if (!g.keys || !g.vals) { free(g.keys); free(g.vals); return false; }
    for (size_t i = 0; i < m->cap; i++)
        if (m->keys[i]) {
            size_t j = slot(&g, m->keys[i], &g.probes);
            g.keys[j] = m->keys[i];
            g.vals[j] = m->vals[i];
        }
    g.probes = m->probes;  /* rehashing is not lookup work: keep the count to lookups */
    free(m->keys);
    free(m->vals);
    *m = g;
    return true;
}

int mmb__strmap_put(mmb__strmap *m, const char *key, int64_t val, int64_t *old) {
    if (m->cap == 0 || 2 * (m->n + 1) > m->cap) {
        if (!grow(m)) return -1;
    }
    size_t i = slot(m, key, &m->probes);
    if (m->keys[i]) {
        if (old) *old = m->vals[i];
        return 0;
    }
    m->keys[i] = key;
    m->vals[i] = val;
    m->n++;
    return 1;
}

bool mmb__strmap_get(const mmb__strmap *m, const char *key, int64_t *val) {
    if (m->cap == 0) return false;
    uint64_t probes = 0;
    size_t i = slot(m, key, &probes);
    if (!m->keys[i]) return false;
    if (val) *val = m->vals[i];
    return true;
}

void mmb__strmap_free(mmb__strmap *m) {
    free(m->keys);
    free(m->vals);
    *m = (mmb__strmap){0};
}
