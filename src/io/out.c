/* Output files, written the one safe way: every file the library or the CLI writes goes through here.
 *
 * mmb__out_open resolves the destination (through symlinks, to the file they name), refuses one that
 * exists and is not a regular file (a FIFO, a device, a socket, a directory), and creates a temporary
 * file with a short name in the destination's own directory: `.mmb-HHHHHHHH-PID-RRRRRR`, where HHHHHHHH
 * is a hash of the host name and PID the writer's process id. The temporary takes the mode (and, where
 * allowed, the owner) of the file it will replace, or 0666 & ~umask for a new file. mmb__out_commit
 * flushes it, fsyncs it, renames it onto the destination and fsyncs the directory; mmb__out_abort and
 * every failure remove it. A temporary left by a writer that died (kill -9) is recognised by its name in
 * the next mmb__out_open in the same directory: same host hash, and a PID that is no live process. */
#include "io/io.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define TMP_PREFIX ".mmb-"
#define MAX_LINKS 40 /* as the kernel's own limit on symlinks followed in one lookup */

/* The host name's FNV-1a hash as 8 hex digits in buf (9 bytes): temporaries of another host or
 * container that shares the directory are never taken for stale ones. */
static void host_tag(char *buf) {
    char h[256] = {0};
    if (gethostname(h, sizeof h - 1) != 0) h[0] = 0;
    uint32_t x = 2166136261u;
    for (const char *p = h; *p; p++) x = (x ^ (unsigned char)*p) * 16777619u;
    snprintf(buf, 9, "%08x", (unsigned)x);
}

/* Removes the temporaries in dir that a dead writer of this host left: `.mmb-<tag>-<pid>-<6 chars>` with
 * kill(pid, 0) failing with ESRCH. Best effort: errors are ignored (an unreadable directory, a file
 * another cleaner removed first). A live process (ours included) or one of another user (EPERM) keeps
 * its file. */
static void remove_stale(const char *dir, const char *tag) {
    DIR *d = opendir(dir);
    if (!d) return;
    size_t dl = strlen(dir), pl = strlen(TMP_PREFIX);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const char *n = e->d_name;
        if (strncmp(n, TMP_PREFIX, pl) != 0 || strncmp(n + pl, tag, 8) != 0 || n[pl + 8] != '-') continue;
        const char *p = n + pl + 9;
        long pid = 0;
        int digits = 0;
        while (*p >= '0' && *p <= '9' && digits < 10) pid = pid * 10 + (*p++ - '0'), digits++;
        if (digits == 0 || *p != '-' || strlen(p + 1) != 6 || pid <= 0 || (long)(pid_t)pid != pid) continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;
        char *full = malloc(dl + strlen(n) + 2);
        if (!full) break;
        sprintf(full, "%s/%s", dir, n);
        struct stat st;
        if (lstat(full, &st) == 0 && S_ISREG(st.st_mode)) unlink(full);
        free(full);
    }
    closedir(d);
}

/* *out = a malloc'd copy of the directory part of path ("." when it has none). False out of memory. */
static bool dir_of(const char *path, char **out) {
    const char *slash = strrchr(path, '/');
    size_t n = !slash ? 1 : slash == path ? 1 : (size_t)(slash - path);
    if (!(*out = malloc(n + 1))) return false;
    if (!slash) memcpy(*out, ".", 2);
    else {
        memcpy(*out, path, n);
        (*out)[n] = 0;
    }
    return true;
}

/* Follows path through symlinks to the file they name: *final (malloc'd) is that path, *st its lstat
 * and *exists whether it exists (a dangling link names a file to be created). Returns MMB_OK,
 * MMB_ERR_IO (a loop, an unreadable link, an lstat error other than ENOENT) or MMB_ERR_NOMEM. */
static mmb_status resolve(mmb_ctx *ctx, const char *path, char **final, struct stat *st, bool *exists) {
    char *cur = strdup(path);
    if (!cur) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
    for (int hops = 0;; hops++) {
        if (lstat(cur, st) != 0) {
            if (errno != ENOENT) {
                mmb_status s = mmb__err(ctx, MMB_ERR_IO, "%s: %s", cur, strerror(errno));
                free(cur);
                return s;
            }
            *exists = false;
            break;
        }
        if (!S_ISLNK(st->st_mode)) {
            *exists = true;
            break;
        }
        if (hops == MAX_LINKS) {
            free(cur);
            return mmb__err(ctx, MMB_ERR_IO, "%s: too many levels of symbolic links", path);
        }
        size_t cap = (size_t)st->st_size + 2 > 4096 ? (size_t)st->st_size + 2 : 4096;  /* st_size 0: /proc */
        char *t = malloc(cap);
        ssize_t n = t ? readlink(cur, t, cap - 1) : -1;
        if (n < 0) {
            mmb_status s = t ? mmb__err(ctx, MMB_ERR_IO, "%s: cannot read the link: %s", cur, strerror(errno))
                             : mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
            free(t);
            free(cur);
            return s;
        }
        t[n] = 0;
        char *next = NULL;
        if (t[0] == '/') next = t, t = NULL;
        else {
            char *d = NULL;
            if (dir_of(cur, &d) && (next = malloc(strlen(d) + (size_t)n + 2)) != NULL) sprintf(next, "%s/%s", d, t);
            free(d);
        }
        free(t);
        free(cur);
        if (!next) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
        cur = next;
    }
    *final = cur;
    return MMB_OK;
}

static const char *kind_of(mode_t m) {
    return S_ISFIFO(m) ? "a FIFO" : S_ISCHR(m) ? "a character device" : S_ISBLK(m) ? "a block device"
         : S_ISSOCK(m) ? "a socket" : S_ISDIR(m) ? "a directory" : "not a regular file";
}

mmb_status mmb__out_open(mmb_ctx *ctx, const char *path, mmb__out *o) {
    memset(o, 0, sizeof *o);
    o->fd = -1;
    if (!path || !path[0]) return mmb__err(ctx, MMB_ERR_ARG, "an output file needs a name");
    struct stat st;
    bool exists = false;
    mmb_status s = resolve(ctx, path, &o->path, &st, &exists);
    if (s != MMB_OK) return s;
    if (exists && !S_ISREG(st.st_mode)) {
        s = mmb__err(ctx, MMB_ERR_IO, "%s: is %s; refusing to replace it with a regular file", path,
                     kind_of(st.st_mode));
        mmb__out_abort(o);
        return s;
    }
    char *dir = NULL, tag[9];
    if (!dir_of(o->path, &dir)) {
        mmb__out_abort(o);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
    }
    host_tag(tag);
    remove_stale(dir, tag);
    o->tmp = malloc(strlen(dir) + 64);
    if (!o->tmp) {
        free(dir);
        mmb__out_abort(o);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
    }
    /* A random 6-character suffix, created with O_EXCL (so the kernel applies the umask to 0666, as
     * fopen(path, "w") does); retried on a collision. */
    static _Atomic unsigned counter;
    static const char abc[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint64_t r = (uint64_t)now.tv_nsec * 6364136223846793005u ^ (uint64_t)now.tv_sec ^ ((uint64_t)getpid() << 32);
    int err = EEXIST;
    for (int tries = 0; tries < 100 && o->fd < 0 && err == EEXIST; tries++) {
        r = r * 6364136223846793005u + 1442695040888963407u + atomic_fetch_add(&counter, 1);
        char suf[7];
        for (int i = 0; i < 6; i++) suf[i] = abc[(r >> (10 + 6 * i)) % (sizeof abc - 1)];
        suf[6] = 0;
        sprintf(o->tmp, "%s/%s%s-%ld-%s", dir, TMP_PREFIX, tag, (long)getpid(), suf);
        o->fd = open(o->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (o->fd < 0) err = errno;
    }
    free(dir);
    if (o->fd < 0) {
        s = mmb__err(ctx, MMB_ERR_IO, "%s: cannot create a temporary file beside it: %s", path, strerror(err));
        free(o->tmp);
        o->tmp = NULL;  /* not ours: nothing to remove */
        mmb__out_abort(o);
        return s;
    }
    if (exists) {
        /* The replaced file's owner (where allowed: as root, or a group of ours), then its mode (after
         * the owner, as a change of owner clears the set-id bits). */
        if (st.st_uid != geteuid() || st.st_gid != getegid())
            if (fchown(o->fd, st.st_uid, st.st_gid) != 0 && fchown(o->fd, (uid_t)-1, st.st_gid) != 0) { /* kept ours */ }
        if (fchmod(o->fd, st.st_mode & 07777) != 0) {
            s = mmb__err(ctx, MMB_ERR_IO, "%s: cannot set the mode of its temporary file: %s", path, strerror(errno));
            mmb__out_abort(o);
            return s;
        }
    }
    if (!(o->f = fdopen(o->fd, "wb"))) {
        s = mmb__err(ctx, MMB_ERR_IO, "%s: %s", path, strerror(errno));
        mmb__out_abort(o);
        return s;
    }
    return MMB_OK;
}

mmb_status mmb__out_commit(mmb_ctx *ctx, mmb__out *o) {
    if (!o->f) {
        mmb__out_abort(o);
        return mmb__err(ctx, MMB_ERR_ARG, "mmb__out_commit: no open output");
    }
    bool ok = !ferror(o->f) && fflush(o->f) == 0;
    int err = ok ? 0 : errno ? errno : EIO;
    if (ok && fsync(o->fd) != 0 && errno != EINVAL && errno != ENOTSUP) ok = false, err = errno;
    int c = fclose(o->f);
    o->f = NULL;
    o->fd = -1;
    if (ok && c != 0) ok = false, err = errno;
    if (ok && rename(o->tmp, o->path) != 0) {
        mmb_status s = mmb__err(ctx, MMB_ERR_IO, "%s: cannot rename its temporary file onto it: %s", o->path,
                                strerror(errno));
        mmb__out_abort(o);
        return s;
    }
    if (!ok) {
        mmb_status s = mmb__err(ctx, MMB_ERR_IO, "%s: write failed: %s", o->path, strerror(err));
        mmb__out_abort(o);
        return s;
    }
    free(o->tmp);
    o->tmp = NULL;  /* renamed: nothing left to remove */
    /* The directory entry: the rename survives a crash only once the directory is synced. */
    char *dir = NULL;
    mmb_status s = MMB_OK;
    if (dir_of(o->path, &dir)) {
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            if (fsync(dfd) != 0 && errno != EINVAL && errno != ENOTSUP && errno != EBADF)
                s = mmb__err(ctx, MMB_ERR_IO, "%s: written, but its directory could not be synced: %s", o->path,
                             strerror(errno));
            close(dfd);
        }
    }
    free(dir);
    mmb__out_abort(o);
    return s;
}

void mmb__out_abort(mmb__out *o) {
    if (o->f) fclose(o->f);
    else if (o->fd >= 0) close(o->fd);
    if (o->tmp) unlink(o->tmp);
    free(o->tmp);
    free(o->path);
    memset(o, 0, sizeof *o);
    o->fd = -1;
}

mmb_status mmb__out_write_all(mmb_ctx *ctx, const char *path, const void *data, size_t n) {
    if (!data && n > 0) return mmb__err(ctx, MMB_ERR_ARG, "%s: no data to write", path ? path : "(null)");
    mmb__out o;
    mmb_status s = mmb__out_open(ctx, path, &o);
    if (s != MMB_OK) return s;
    if (n > 0 && fwrite(data, 1, n, o.f) != n) {
        s = mmb__err(ctx, MMB_ERR_IO, "%s: write failed: %s", o.path, strerror(errno));
        mmb__out_abort(&o);
        return s;
    }
    return mmb__out_commit(ctx, &o);
}

mmb_status mmb_file_write(mmb_ctx *ctx, const char *path, const void *data, size_t n) {
    return mmb__out_write_all(ctx, path, data, n);
}
