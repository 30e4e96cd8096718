/* libFuzzer target: the webdataset tar reader (io/manifest.c, mmb_manifest_from_tar) on arbitrary bytes, strict and
 * with MMB_MANIFEST_SKIP_BAD; every input it finds is read back and its offset and size checked against the buffer. */
#include "fuzz_util.h"

static void scan(const unsigned char *data, size_t size, int flags) {
    mmb_manifest *m = NULL;
    if (mmb_manifest_from_tar(fuzz_ctx(), data, size, NULL, flags, &m) != MMB_OK) return;
    int64_t n = mmb_manifest_count(m);
    for (int64_t i = 0; i < n; i++) {
        mmb_input in;
        if (mmb_manifest_get(m, i, &in) != MMB_OK || in.index != i || !in.name || in.offset < 0 || in.size < 0 ||
            (uint64_t)in.offset > size || (uint64_t)in.size > size - (uint64_t)in.offset)
            abort();  /* a member outside the archive: the reader's bounds checks failed */
        volatile unsigned char sink = in.size ? data[in.offset + in.size - 1] : 0;  /* readable */
        (void)sink;
    }
    for (int i = 0; i < mmb_manifest_warnings(m); i++)
        if (!mmb_manifest_warning(m, i)) abort();
    mmb_manifest_free(m);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size) {
    scan(data, size, 0);
    scan(data, size, MMB_MANIFEST_SKIP_BAD);
    return 0;
}
