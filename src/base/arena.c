/* A bump allocator: one block, 64-byte aligned pieces, freed all at once. */
#include "base/base.h"

#include <stdlib.h>
#include <sys/mman.h>

size_t mmb__arena_piece(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

mmb_status mmb__arena_reserve(mmb_ctx *ctx, mmb_arena *a, size_t bytes) {
    bytes = mmb__arena_piece(bytes);
    a->used = 0;
    if (bytes <= a->cap) return MMB_OK;
    free(a->base);
    a->base = aligned_alloc(64, bytes ? bytes : 64);
    a->cap = a->base ? bytes : 0;
    if (!a->base) return mmb__err(ctx, MMB_ERR_NOMEM, "arena: cannot allocate %zu bytes", bytes);
    return MMB_OK;
}

void *mmb__arena_alloc(mmb_arena *a, size_t bytes) {
    size_t piece = mmb__arena_piece(bytes);
    if (piece > a->cap - a->used) return NULL;
    void *p = a->base + a->used;
    a->used += piece;
    return p;
}

void mmb__arena_reset(mmb_arena *a) { a->used = 0; }

void mmb__arena_free(mmb_arena *a) {
    free(a->base);
    a->base = NULL;
    a->cap = a->used = 0;
}

/* Large transients (a weight converted or stacked only to be packed) go straight to the kernel:
 * unmapping returns their pages, where a freed heap block could stay resident as a hole. */
void *mmb__pages_alloc(size_t bytes) {
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void mmb__pages_free(void *p, size_t bytes) {
    if (p) munmap(p, bytes ? bytes : 1);
}
