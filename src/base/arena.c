/* A bump allocator: one block, 64-byte aligned pieces, freed all at once. */
#include "internal.h"

#include <stdlib.h>

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
