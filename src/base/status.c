/* Status names and the context's error message. */
#include "base/base.h"

#include <stdio.h>

const char *mmb_status_str(mmb_status s) {
    switch (s) {
    case MMB_OK: return "ok";
    case MMB_ERR_IO: return "io error";
    case MMB_ERR_FORMAT: return "malformed file";
    case MMB_ERR_SHAPE: return "shape mismatch";
    case MMB_ERR_MISSING: return "missing";
    case MMB_ERR_UNSUPPORTED: return "unsupported";
    case MMB_ERR_NOMEM: return "out of memory";
    case MMB_ERR_ARG: return "invalid argument";
    case MMB_ERR_ABORTED: return "aborted";
    case MMB_ERR_NUMERIC: return "not a number";
    }
    return "unknown status";
}

#define MMB_STR_(x) #x
#define MMB_STR(x) MMB_STR_(x)

/* Built from the header's macros, the one place the version is written. */
const char *mmb_version(void) {
    return MMB_STR(MMB_VERSION_MAJOR) "." MMB_STR(MMB_VERSION_MINOR) "." MMB_STR(MMB_VERSION_PATCH);
}

mmb_status mmb__err(mmb_ctx *ctx, mmb_status s, const char *fmt, ...) {
    if (ctx) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ctx->err, sizeof ctx->err, fmt, ap);
        va_end(ap);
    }
    return s;
}

const char *mmb_ctx_error(const mmb_ctx *ctx) { return ctx ? ctx->err : ""; }
