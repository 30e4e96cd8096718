/* Manifests for sharded extraction: path lists, JSON lines, webdataset tar shards read in place (a tar reader
 * written here: every header field, size and offset of the archive is untrusted), and the shard split.
 *
 * The tar reader walks 512-byte headers: POSIX ustar (name + prefix), PAX extended headers ('x': their `path`
 * record names the next member; 'g' global ones are skipped), GNU long names ('L'). Numeric fields are octal (NUL-
 * or space-terminated) or GNU base-256 (high bit set; accepted when non-negative and below 2^62). Each header's
 * checksum must match (the unsigned sum, as POSIX says, or the signed one old tars wrote). A member's data must lie
 * inside the file; offsets advance by the size rounded up to 512 with overflow checks. */
#include "io/io.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

struct mmb_manifest {
    mmb_input *v;
    int64_t n, cap;
    char **strs;          /* every string the inputs point at, owned */
    int64_t n_strs, cap_strs;
    char **warn;
    int n_warn;
};

#define TAR_BLOCK 512
#define MAX_NAME 65536    /* longest member name a PAX or GNU record may give */
#define MAX_META (1 << 20) /* largest PAX / GNU long-name member read */

static char *keep(mmb_manifest *m, const char *s, size_t n) {
    if (m->n_strs == m->cap_strs) {
        int64_t cap = m->cap_strs ? 2 * m->cap_strs : 64;
        char **nv = realloc(m->strs, sizeof *nv * (size_t)cap);
        if (!nv) return NULL;
        m->strs = nv;
        m->cap_strs = cap;
    }
    char *c = malloc(n + 1);
    if (!c) return NULL;
    memcpy(c, s, n);
    c[n] = 0;
    return m->strs[m->n_strs++] = c;
}

static mmb_status push(mmb_ctx *ctx, mmb_manifest *m, mmb_input in) {
    if (m->n == m->cap) {
        int64_t cap = m->cap ? 2 * m->cap : 64;
        mmb_input *nv = realloc(m->v, sizeof *nv * (size_t)cap);
        if (!nv) return mmb__err(ctx, MMB_ERR_NOMEM, "manifest: out of memory");
        m->v = nv;
        m->cap = cap;
    }
    in.index = m->n;
    m->v[m->n++] = in;
    return MMB_OK;
}

static mmb_status warn(mmb_ctx *ctx, mmb_manifest *m, const char *msg) {
    char **nv = realloc(m->warn, sizeof *nv * (size_t)(m->n_warn + 1));
    if (!nv) return mmb__err(ctx, MMB_ERR_NOMEM, "manifest: out of memory");
    m->warn = nv;
    if (!(m->warn[m->n_warn] = strdup(msg))) return mmb__err(ctx, MMB_ERR_NOMEM, "manifest: out of memory");
    m->n_warn++;
    return MMB_OK;
}

void mmb_manifest_free(mmb_manifest *m) {
    if (!m) return;
    for (int64_t i = 0; i < m->n_strs; i++) free(m->strs[i]);
    for (int i = 0; i < m->n_warn; i++) free(m->warn[i]);
    free(m->strs);
    free(m->warn);
    free(m->v);
    free(m);
}

int64_t mmb_manifest_count(const mmb_manifest *m) { return m ? m->n : 0; }

mmb_status mmb_manifest_get(const mmb_manifest *m, int64_t i, mmb_input *out) {
    if (!m || !out || i < 0 || i >= m->n) return MMB_ERR_ARG;
    *out = m->v[i];
    return MMB_OK;
}

int mmb_manifest_warnings(const mmb_manifest *m) { return m ? m->n_warn : 0; }

const char *mmb_manifest_warning(const mmb_manifest *m, int i) {
    return m && i >= 0 && i < m->n_warn ? m->warn[i] : NULL;
}

/* ---- tar ------------------------------------------------------------------------------------------------- */

/* A numeric header field: octal digits (leading spaces, then digits, then NUL/space padding) or GNU base-256.
 * False when malformed or out of [0, 2^62). */
static bool tar_num(const unsigned char *f, size_t len, int64_t *out) {
    if (len && (f[0] & 0x80)) {
        if (f[0] != 0x80) return false;  /* negative, or more than 2^(8(len-1)) */
        uint64_t v = 0;
        for (size_t i = 1; i < len; i++) {
            if (v >> 54) return false;
            v = v << 8 | f[i];
        }
        if (v >> 62) return false;
        *out = (int64_t)v;
        return true;
    }
    size_t i = 0;
    while (i < len && f[i] == ' ') i++;
    uint64_t v = 0;
    int digits = 0;
    for (; i < len && f[i] >= '0' && f[i] <= '7'; i++, digits++) {
        if (v >> 58) return false;
        v = v * 8 + (uint64_t)(f[i] - '0');
    }
    for (; i < len; i++)
        if (f[i] != 0 && f[i] != ' ') return false;
    if (!digits) {
        *out = 0;  /* an empty field reads as 0, as GNU tar reads it */
        return true;
    }
    *out = (int64_t)v;
    return true;
}

static bool all_zero(const unsigned char *b) {
    for (int i = 0; i < TAR_BLOCK; i++)
        if (b[i]) return false;
    return true;
}

static bool checksum_ok(const unsigned char *h) {
    int64_t want;
    if (!tar_num(h + 148, 8, &want)) return false;
    uint64_t u = 0;
    int64_t s = 0;
    for (int i = 0; i < TAR_BLOCK; i++) {
        unsigned char c = i >= 148 && i < 156 ? ' ' : h[i];
        u += c;
        s += (signed char)c;
    }
    return (int64_t)u == want || s == want;
}

/* A source of bytes: memory, or a file read with pread. */
typedef struct src {
    const unsigned char *mem;
    int fd;
    int64_t size;
} src;

static bool src_read(const src *s, int64_t off, void *dst, size_t n) {
    if (off < 0 || (uint64_t)off > (uint64_t)s->size || n > (uint64_t)(s->size - off)) return false;
    if (s->mem) {
        memcpy(dst, s->mem + off, n);
        return true;
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(s->fd, (char *)dst + got, n - got, (off_t)(off + (int64_t)got));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return false;
        got += (size_t)r;
    }
    return true;
}

/* The value of the PAX record `key` in data[0, n) ("LEN key=value\n" records), copied to *val (malloc'd). Returns
 * 1 found, 0 absent, -1 malformed records, -2 out of memory. */
static int pax_find(const char *data, size_t n, const char *key, char **val) {
    size_t i = 0, kl = strlen(key);
    while (i < n) {
        size_t len = 0, j = i;
        while (j < n && data[j] >= '0' && data[j] <= '9' && len < MAX_META) len = len * 10 + (size_t)(data[j++] - '0');
        if (j == i || j >= n || data[j] != ' ' || len <= j - i + 1 || len > n - i || data[i + len - 1] != '\n')
            return -1;
        const char *kv = data + j + 1;
        size_t kvn = i + len - 1 - (j + 1);
        const char *eq = memchr(kv, '=', kvn);
        if (!eq) return -1;
        if ((size_t)(eq - kv) == kl && memcmp(kv, key, kl) == 0) {
            size_t vl = kvn - (size_t)(eq - kv) - 1;
            if (!(*val = malloc(vl + 1))) return -2;
            memcpy(*val, eq + 1, vl);
            (*val)[vl] = 0;
            return 1;
        }
        i += len;
    }
    return 0;
}

static bool is_image_ext(const char *ext) {
    static const char *const e[] = {"jpg", "jpeg", "png", "webp"};
    for (size_t i = 0; i < sizeof e / sizeof *e; i++)
        if (strcasecmp(ext, e[i]) == 0) return true;
    return false;
}

/* The member name's key (path up to the first '.' of its base name) length and where its extension starts (NULL
 * for none). */
static size_t key_len(const char *name, const char **ext) {
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    const char *dot = strchr(base, '.');
    *ext = dot ? dot + 1 : NULL;
    return dot ? (size_t)(dot - name) : strlen(name);
}

/* Walks the tar in s, pushing one input per key with an image member. `label` names it in inputs and messages. */
static mmb_status tar_scan(mmb_ctx *ctx, mmb_manifest *m, const src *s, const char *label, const char *path,
                           int flags) {
    unsigned char h[TAR_BLOCK];
    int64_t off = 0;
    char *long_name = NULL, *cur_key = NULL;
    bool cur_has_image = false;
    mmb_status st = MMB_OK;
    char msg[1024];
    msg[0] = 0;
    const char *tar_path = path ? keep(m, path, strlen(path)) : NULL;
    if (path && !tar_path) return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", label);
    for (;;) {
        if (off == s->size) break;  /* the end of the file without the two zero blocks: accepted, as tar does */
        if (s->size - off < TAR_BLOCK) {
            snprintf(msg, sizeof msg, "%s: truncated tar header at byte %lld (%lld bytes left, a header takes 512)",
                     label, (long long)off, (long long)(s->size - off));
            break;
        }
        if (!src_read(s, off, h, TAR_BLOCK)) {
            snprintf(msg, sizeof msg, "%s: cannot read the tar header at byte %lld", label, (long long)off);
            break;
        }
        if (all_zero(h)) break;  /* the end-of-archive marker */
        if (!checksum_ok(h)) {
            snprintf(msg, sizeof msg, "%s: garbled tar header at byte %lld (bad checksum)", label, (long long)off);
            break;
        }
        int64_t size;
        if (!tar_num(h + 124, 12, &size)) {
            snprintf(msg, sizeof msg, "%s: garbled tar header at byte %lld (size field)", label, (long long)off);
            break;
        }
        int64_t data = off + TAR_BLOCK;
        if (size > s->size - data) {
            snprintf(msg, sizeof msg, "%s: tar member at byte %lld says %lld bytes, past the end of the file (%lld)",
                     label, (long long)off, (long long)size, (long long)s->size);
            break;
        }
        int64_t padded = size + (TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK;  /* size < 2^62: no overflow */
        int64_t next = data + padded;
        if (next > s->size) next = s->size;  /* the last member's padding may be cut; the next header check says so */
        char type = (char)h[156];
        if (type == 'x' || type == 'L') {
            if (size > MAX_META) {
                snprintf(msg, sizeof msg, "%s: tar %s header at byte %lld of %lld bytes (at most %d)", label,
                         type == 'x' ? "PAX" : "GNU long-name", (long long)off, (long long)size, MAX_META);
                break;
            }
            char *buf = malloc((size_t)size + 1);
            if (!buf) { st = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", label); break; }
            if (!src_read(s, data, buf, (size_t)size)) {
                free(buf);
                snprintf(msg, sizeof msg, "%s: cannot read the tar member at byte %lld", label, (long long)data);
                break;
            }
            buf[size] = 0;
            char *name = NULL;
            if (type == 'L') {
                size_t nl = strnlen(buf, (size_t)size);
                if (nl == 0 || nl > MAX_NAME) {
                    free(buf);
                    snprintf(msg, sizeof msg, "%s: bad GNU long name at byte %lld", label, (long long)off);
                    break;
                }
                name = strndup(buf, nl);
                if (!name) { free(buf); st = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", label); break; }
            } else {
                int r = pax_find(buf, (size_t)size, "path", &name);
                if (r == -2) { free(buf); st = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", label); break; }
                if (r == -1 || (r == 1 && (!name[0] || strlen(name) > MAX_NAME))) {
                    free(buf);
                    free(name);
                    snprintf(msg, sizeof msg, "%s: malformed PAX header at byte %lld", label, (long long)off);
                    break;
                }
            }
            free(buf);
            if (name) {
                free(long_name);
                long_name = name;
            }
            off = next;
            continue;
        }
        if (type == 'g') {  /* global PAX header: nothing mmbridge reads */
            off = next;
            continue;
        }
        char name[100 + 1 + 155 + 1];
        const char *nm = long_name;
        if (!nm) {
            size_t nl = strnlen((const char *)h, 100), pl = 0;
            if (memcmp(h + 257, "ustar", 5) == 0) pl = strnlen((const char *)h + 345, 155);
            if (pl) {
                memcpy(name, h + 345, pl);
                name[pl] = '/';
                memcpy(name + pl + 1, h, nl);
                name[pl + 1 + nl] = 0;
            } else {
                memcpy(name, h, nl);
                name[nl] = 0;
            }
            nm = name;
        }
        if (!nm[0]) {
            snprintf(msg, sizeof msg, "%s: tar member at byte %lld has no name", label, (long long)off);
            break;
        }
        if (type == '0' || type == 0 || type == '7') {
            const char *ext;
            size_t kl = key_len(nm, &ext);
            if (!cur_key || strlen(cur_key) != kl || strncmp(cur_key, nm, kl) != 0) {
                free(cur_key);
                cur_has_image = false;
                if (!(cur_key = strndup(nm, kl))) { st = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", label); break; }
            }
            if (!cur_has_image && ext && is_image_ext(ext)) {
                size_t need = strlen(label) + strlen(nm) + 2;
                char *full = malloc(need);
                if (!full) { st = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", label); break; }
                snprintf(full, need, "%s#%s", label, nm);
                const char *kept = keep(m, full, strlen(full));
                free(full);
                if (!kept) { st = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", label); break; }
                st = push(ctx, m, (mmb_input){.name = kept, .path = tar_path, .offset = data, .size = size});
                if (st != MMB_OK) break;
                cur_has_image = true;
            }
        }
        free(long_name);
        long_name = NULL;
        off = next;
    }
    free(long_name);
    free(cur_key);
    if (st != MMB_OK) return st;
    if (msg[0]) {
        if (!(flags & MMB_MANIFEST_SKIP_BAD)) return mmb__err(ctx, MMB_ERR_FORMAT, "%s", msg);
        return warn(ctx, m, msg);
    }
    return MMB_OK;
}

static mmb_status tar_file(mmb_ctx *ctx, mmb_manifest *m, const char *path, const char *label, int flags) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mmb__err(ctx, MMB_ERR_IO, "%s: %s", label, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return mmb__err(ctx, MMB_ERR_IO, "%s: not a regular file", label);
    }
    src s = {.fd = fd, .size = (int64_t)st.st_size};
    mmb_status r = tar_scan(ctx, m, &s, label, path, flags);
    close(fd);
    return r;
}

static bool ends_with(const char *s, const char *suf) {
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && strcmp(s + n - k, suf) == 0;
}

static mmb_manifest *new_manifest(mmb_ctx *ctx) {
    mmb_manifest *m = calloc(1, sizeof *m);
    if (!m) mmb__err(ctx, MMB_ERR_NOMEM, "manifest: out of memory");
    return m;
}

static mmb_status finish(mmb_ctx *ctx, mmb_manifest *m, const char *label, mmb_status s, mmb_manifest **out) {
    if (s == MMB_OK && m->n == 0) s = mmb__err(ctx, MMB_ERR_MISSING, "%s: the manifest names no image", label);
    if (s != MMB_OK) {
        mmb_manifest_free(m);
        return s;
    }
    *out = m;
    return MMB_OK;
}

mmb_status mmb_manifest_from_tar(mmb_ctx *ctx, const void *data, size_t n, const char *name, int flags,
                                 mmb_manifest **out) {
    if ((!data && n) || !out || n > (size_t)INT64_MAX) return mmb__err(ctx, MMB_ERR_ARG, "mmb_manifest_from_tar: bad arguments");
    mmb_manifest *m = new_manifest(ctx);
    if (!m) return MMB_ERR_NOMEM;
    src s = {.mem = data, .fd = -1, .size = (int64_t)n};
    const char *label = name ? name : "(tar in memory)";
    return finish(ctx, m, label, tar_scan(ctx, m, &s, label, name, flags), out);
}

/* `rel` relative to dir (NULL: the current directory) unless absolute: kept in m. */
static const char *join(mmb_manifest *m, const char *dir, const char *rel) {
    if (!dir || rel[0] == '/') return keep(m, rel, strlen(rel));
    size_t n = strlen(dir) + strlen(rel) + 2;
    char *t = malloc(n);
    if (!t) return NULL;
    snprintf(t, n, "%s/%s", dir, rel);
    const char *k = keep(m, t, strlen(t));
    free(t);
    return k;
}

mmb_status mmb_manifest_open(mmb_ctx *ctx, const char *path, int flags, mmb_manifest **out) {
    if (!path || !out) return mmb__err(ctx, MMB_ERR_ARG, "mmb_manifest_open: NULL argument");
    mmb_manifest *m = new_manifest(ctx);
    if (!m) return MMB_ERR_NOMEM;
    if (ends_with(path, ".tar")) return finish(ctx, m, path, tar_file(ctx, m, path, path, flags), out);
    FILE *f = fopen(path, "rb");
    if (!f) return finish(ctx, m, path, mmb__err(ctx, MMB_ERR_IO, "%s: %s", path, strerror(errno)), out);
    char *dir = strdup(path);
    if (!dir) {
        fclose(f);
        return finish(ctx, m, path, mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path), out);
    }
    char *slash = strrchr(dir, '/');
    if (slash) *slash = 0;
    const char *base = slash ? dir : NULL;
    mmb_status s = MMB_OK;
    int json = -1;  /* told by the first non-blank line */
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int64_t lineno = 0;
    while (s == MMB_OK && (len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if ((size_t)len != strlen(line)) {
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s:%lld: a NUL byte in the line", path, (long long)lineno);
            break;
        }
        char *a = line, *z = line + len;
        while (*a == ' ' || *a == '\t') a++;
        while (z > a && (z[-1] == '\n' || z[-1] == '\r' || z[-1] == ' ' || z[-1] == '\t')) *--z = 0;
        if (!*a) continue;
        if (json < 0) json = *a == '{';
        if (!json) {
            const char *p = join(m, base, a);
            if (!p) { s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path); break; }
            const char *nm = keep(m, a, strlen(a));
            if (!nm) s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
            else if (ends_with(a, ".tar")) s = tar_file(ctx, m, p, nm, flags);
            else s = push(ctx, m, (mmb_input){.name = nm, .path = p, .size = -1});
            continue;
        }
        cJSON *o = cJSON_Parse(a);
        const cJSON *jp = o ? cJSON_GetObjectItemCaseSensitive(o, "path") : NULL;
        const cJSON *ju = o ? cJSON_GetObjectItemCaseSensitive(o, "url") : NULL;
        if (!cJSON_IsObject(o))
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s:%lld: not a JSON object", path, (long long)lineno);
        else if (cJSON_IsString(jp) && jp->valuestring[0]) {
            const char *p = join(m, base, jp->valuestring), *nm = keep(m, jp->valuestring, strlen(jp->valuestring));
            if (!p || !nm) s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
            else if (ends_with(nm, ".tar")) s = tar_file(ctx, m, p, nm, flags);
            else s = push(ctx, m, (mmb_input){.name = nm, .path = p, .size = -1});
        } else if (cJSON_IsString(ju) && ju->valuestring[0]) {
            const char *u = keep(m, ju->valuestring, strlen(ju->valuestring));
            if (!u) s = mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory", path);
            else s = push(ctx, m, (mmb_input){.name = u, .url = u, .size = -1});
        } else
            s = mmb__err(ctx, MMB_ERR_FORMAT, "%s:%lld: a JSON line needs a non-empty string \"path\" or \"url\"",
                         path, (long long)lineno);
        cJSON_Delete(o);
    }
    if (s == MMB_OK && ferror(f)) s = mmb__err(ctx, MMB_ERR_IO, "%s: read error", path);
    free(line);
    fclose(f);
    free(dir);
    return finish(ctx, m, path, s, out);
}

mmb_status mmb_manifest_read(mmb_ctx *ctx, const mmb_manifest *m, int64_t i, void **bytes, size_t *n) {
    if (!m || !bytes || !n || i < 0 || i >= m->n) return mmb__err(ctx, MMB_ERR_ARG, "mmb_manifest_read: bad arguments");
    const mmb_input *in = &m->v[i];
    if (!in->path)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: a URL; mmbridge reads local files only (download the set "
                        "first, e.g. with img2dataset, and list the files or its tar shards)", in->name);
    int fd = open(in->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mmb__err(ctx, MMB_ERR_IO, "%s: %s", in->name, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return mmb__err(ctx, MMB_ERR_IO, "%s: not a regular file", in->name);
    }
    int64_t off = in->size < 0 ? 0 : in->offset, size = in->size < 0 ? (int64_t)st.st_size : in->size;
    if (off < 0 || size < 0 || off > (int64_t)st.st_size || size > (int64_t)st.st_size - off) {
        close(fd);
        return mmb__err(ctx, MMB_ERR_IO, "%s: the tar is shorter than when it was read (%lld bytes)", in->name,
                        (long long)st.st_size);
    }
    void *buf = malloc((size_t)size + 1);
    if (!buf) {
        close(fd);
        return mmb__err(ctx, MMB_ERR_NOMEM, "%s: out of memory (%lld bytes)", in->name, (long long)size);
    }
    src s = {.fd = fd, .size = (int64_t)st.st_size};
    bool ok = src_read(&s, off, buf, (size_t)size);
    int err = errno;
    close(fd);
    if (!ok) {
        free(buf);
        return mmb__err(ctx, MMB_ERR_IO, "%s: read error: %s", in->name, strerror(err ? err : EIO));
    }
    *bytes = buf;
    *n = (size_t)size;
    return MMB_OK;
}

/* ---- the shard split ------------------------------------------------------------------------------------- */

int64_t mmb_shard_count(int64_t n_inputs, int64_t shard_size) {
    if (n_inputs < 0 || shard_size < 1) return -1;
    return n_inputs / shard_size + (n_inputs % shard_size != 0);
}

mmb_status mmb_shard_range(int64_t n_inputs, int64_t shard_size, int64_t k, int64_t *begin, int64_t *end) {
    int64_t n = mmb_shard_count(n_inputs, shard_size);
    if (n < 0 || k < 0 || k >= n || !begin || !end) return MMB_ERR_ARG;
    *begin = k * shard_size;
    *end = n_inputs - *begin < shard_size ? n_inputs : *begin + shard_size;
    return MMB_OK;
}

int mmb_shard_mine(int64_t k, int64_t part, int64_t n_parts) {
    return n_parts >= 1 && part >= 0 && part < n_parts && k >= 0 && k % n_parts == part;
}

/* ---- .npy ------------------------------------------------------------------------------------------------ */

mmb_status mmb_npy_write(mmb_ctx *ctx, const char *path, const float *data, int ndim, const int64_t *shape) {
    if (!path || !shape || ndim < 1 || ndim > MMB_MAX_DIMS) return mmb__err(ctx, MMB_ERR_ARG, "mmb_npy_write: bad arguments");
    char dict[512];
    int k = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (");
    uint64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) return mmb__err(ctx, MMB_ERR_ARG, "%s: a negative dimension", path);
        if (shape[i] && numel > UINT64_MAX / (uint64_t)shape[i] / 4)
            return mmb__err(ctx, MMB_ERR_ARG, "%s: too many elements", path);
        numel *= (uint64_t)shape[i];
        k += snprintf(dict + k, sizeof dict - (size_t)k, "%lld%s", (long long)shape[i], ndim == 1 ? "," : i + 1 < ndim ? ", " : "");
    }
    k += snprintf(dict + k, sizeof dict - (size_t)k, "), }");
    if (numel && !data) return mmb__err(ctx, MMB_ERR_ARG, "%s: no data", path);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: .npy '<f4' from a big-endian machine is not implemented", path);
#endif
    /* magic (6) + version (2) + header length (2) + dict + spaces + '\n', padded to a multiple of 64 */
    size_t hl = (size_t)k + 1, total = 10 + hl;
    size_t pad = (64 - total % 64) % 64;
    hl += pad;
    unsigned char head[10 + 512 + 64];
    memcpy(head, "\x93NUMPY\x01\x00", 8);
    head[8] = (unsigned char)(hl & 0xff);
    head[9] = (unsigned char)(hl >> 8);
    memcpy(head + 10, dict, (size_t)k);
    memset(head + 10 + k, ' ', pad);
    head[10 + hl - 1] = '\n';
    mmb__out o;
    mmb_status s = mmb__out_open(ctx, path, &o);
    if (s != MMB_OK) return s;
    bool ok = fwrite(head, 1, 10 + hl, o.f) == 10 + hl;
    /* little-endian f32: the machines mmbridge builds for are little-endian (x86-64, aarch64) */
    if (ok && numel) ok = fwrite(data, sizeof(float), (size_t)numel, o.f) == (size_t)numel;
    if (!ok) {
        s = mmb__err(ctx, MMB_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        mmb__out_abort(&o);
        return s;
    }
    return mmb__out_commit(ctx, &o);
}
