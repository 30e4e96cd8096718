/* Opening input files without blocking: a FIFO, a device or a socket that a checkpoint ships (or a
 * caller names) in place of a regular file is refused at once instead of blocking the open or the
 * reads forever. */
#include "base/base.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *mmb__file_kind(unsigned mode) {
    return S_ISDIR(mode) ? "a directory" : S_ISFIFO(mode) ? "a FIFO" : S_ISCHR(mode) ? "a character device"
           : S_ISBLK(mode) ? "a block device" : S_ISSOCK(mode) ? "a socket" : "not a regular file";
}

mmb_status mmb__open_input(mmb_ctx *ctx, const char *path, int *fd_out, size_t *size) {
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    struct stat st;
    if (fd < 0) {
        int e = errno;
        bool special = stat(path, &st) == 0 && !S_ISREG(st.st_mode);  /* a socket: ENXIO */
        mmb_status s = special ? mmb__err(ctx, MMB_ERR_IO, "%s: is %s, not a regular file: refused", path,
                                          mmb__file_kind(st.st_mode))
                               : mmb__err(ctx, MMB_ERR_IO, "%s: cannot open: %s", path, strerror(e));
        errno = special ? EINVAL : e;  /* the contract: EINVAL for a non-regular file, ENXIO included */
        return s;
    }
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        mmb_status s = mmb__err(ctx, MMB_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
        errno = e;
        return s;
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        mmb_status s = mmb__err(ctx, MMB_ERR_IO, "%s: is %s, not a regular file: refused", path,
                                mmb__file_kind(st.st_mode));
        errno = EINVAL;
        return s;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);  /* regular files never block; tidy only */
    if (size) *size = (size_t)st.st_size;
    *fd_out = fd;
    return MMB_OK;
}

mmb_status mmb__fopen_input(mmb_ctx *ctx, const char *path, FILE **out) {
    int fd = -1;
    mmb_status s = mmb__open_input(ctx, path, &fd, NULL);
    if (s != MMB_OK) return s;
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        int e = errno;
        close(fd);
        mmb_status s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: cannot open: %s", path, strerror(e));
        errno = e;
        return s;
    }
    *out = f;
    return MMB_OK;
}
