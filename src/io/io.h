/* The io layer: safetensors files, checkpoint directories and their config.json, JSON files. Uses the tensor and base layers. */
#ifndef MMB_IO_H
#define MMB_IO_H

#include "tensor/tensor.h"

#include <stdio.h>

/* ---- io/safetensors.c ------------------------------------------------------------------------ */
const char *mmb__st_path(const mmb_st_file *f);
/* The key comparisons the header's duplicate-name check made while opening f (for tests that bound
 * the parse's work: linear in the entries, where a pairwise check makes n^2 / 2). */
uint64_t mmb__st_probes(const mmb_st_file *f);
/* Checks that f's file still holds every mapped byte (fstat on the descriptor kept open, so a file
 * replaced by rename, whose old inode the mapping keeps, passes). MMB_OK, or MMB_ERR_IO naming the file
 * when it was truncated while open: reading its mapped weights would raise SIGBUS. */
mmb_status mmb__st_verify(mmb_ctx *ctx, const mmb_st_file *f);
/* Drops the resident pages wholly inside [p, p + n) when that range lies in an open file's mapping
 * (no-op for any other memory): for weights read once at load (packed or converted), so RSS holds
 * them once. The data stays readable: a later read faults the pages in again from the file. */
void mmb__release_mapped(const void *p, size_t n);

/* ---- io/checkpoint.c: a checkpoint directory ------------------------------------------------- */

typedef struct cJSON cJSON;

/* config.json parsed, plus every safetensors file of the directory (one, several, or the shards
 * that model.safetensors.index.json names). */
typedef struct mmb_synth mmb_synth;

typedef struct mmb_ckpt {
    char *dir;
    cJSON *config;
    int n_files;
    mmb_st_file **files;
    mmb_synth *synth;        /* a synthetic checkpoint (mmb__ckpt_synth): no files; every bound tensor is
                                made on request with random values, and mmb__ckpt_find finds nothing */
} mmb_ckpt;

/* Opens dir/config.json and the directory's safetensors. Returns MMB_OK, MMB_ERR_IO, MMB_ERR_FORMAT
 * (malformed JSON, index naming a missing shard, a tensor in two files) or MMB_ERR_MISSING. */
mmb_status mmb__ckpt_open(mmb_ctx *ctx, const char *dir, mmb_ckpt *out);
void mmb__ckpt_close(mmb_ckpt *c);
/* mmb__st_verify on each of c's files: called before each forward pass that reads mapped weights. */
mmb_status mmb__ckpt_verify(mmb_ctx *ctx, const mmb_ckpt *c);
/* A synthetic checkpoint named `name` with config `config` (taken over): mmb__ckpt_bind returns
 * f32 tensors of the requested shape, uniform in [-scale, scale] from a fixed seed, kept until
 * mmb__ckpt_close. For measuring a connector's costs at any size without weights on disk. */
mmb_status mmb__ckpt_synth(mmb_ctx *ctx, const char *name, cJSON *config, float scale, mmb_ckpt *out);
/* Returns the tensor called name in any file, and its file in *file (may be NULL), or NULL. */
const mmb_tensor *mmb__ckpt_find(const mmb_ckpt *c, const char *name, const mmb_st_file **file);

/* Binds a float tensor for computing: present, F32/F16/BF16, and of exactly the given shape
 * (ndim dims from shape[]). Errors name the checkpoint file and the tensor. */
mmb_status mmb__ckpt_bind(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int ndim,
                          const int64_t *shape, const mmb_tensor **out);

/* mmb__linear_init on w and b; when the layer no longer reads w's bytes (packed or converted), the
 * resident pages of w's mapping are released (mmb__release_mapped), so RSS holds the weights once. */
mmb_status mmb__linear_bind(mmb_ctx *ctx, mmb_linear *l, const mmb_tensor *w, const mmb_tensor *b);
/* Binds {prefix}{name}.weight [n_out, n_in] and, if bias, {prefix}{name}.bias [n_out] as a linear layer
 * (converted and packed as mmb__linear_init does); errors name the file and the tensor. */
mmb_status mmb__ckpt_linear(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                            int64_t n_in, bool bias, mmb_linear *l);
/* As mmb__ckpt_linear for a 1x1 Conv2d: weight [n_out, n_in, 1, 1]. */
mmb_status mmb__ckpt_conv1x1(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                             int64_t n_in, bool bias, mmb_linear *l);
/* As mmb__ckpt_linear for a Conv2d of kernel = stride = k (no padding): weight [n_out, n_in, k, k] as an
 * (n_out, n_in k k) layer over im2col rows in (c, ky, kx) order (mmb__conv_rows). */
mmb_status mmb__ckpt_conv(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n_out,
                          int64_t n_in, int64_t k, bool bias, mmb_linear *l);
/* A norm's {prefix}{name}.weight and .bias, (n) each, as f32 copies in *w, *b (the caller frees them). */
mmb_status mmb__ckpt_norm(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t n, float **w,
                          float **b);
/* n linear layers {prefix}{names[i]}.weight [n_out, n_in] and .bias [n_out] stacked into one
 * (n * n_out, n_in) layer, so projections that read the same input run as one GEMM (q | k | v).
 * The stacked f32 copies go to *w and *b (set even on failure; the caller frees them after l); *w is
 * NULL on success when l no longer reads it (packed or converted), so the weights are held once.
 * b NULL: layers without biases (no .bias read). */
mmb_status mmb__ckpt_linear_fused(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *const *names,
                                  int n, int64_t n_out, int64_t n_in, mmb_linear *l, float **w, float **b);

/* Binds a 1-D float tensor of n elements and returns an f32 copy in *out (the caller frees it). */
mmb_status mmb__ckpt_vec(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int64_t n, float **out);


/* Config access. `path` is dotted ("vision_config.hidden_size"). The getters return false when the
 * key is absent (or null); a present key of the wrong type is an MMB_ERR_FORMAT through *s. */
bool mmb__cfg_int(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, int64_t *out, mmb_status *s);
bool mmb__cfg_num(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, double *out, mmb_status *s);
bool mmb__cfg_str(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, const char **out, mmb_status *s);
bool mmb__cfg_bool(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, bool *out, mmb_status *s);
/* An int or a list of ints (vision_feature_layer); at most `cap` values. */
bool mmb__cfg_ints(mmb_ctx *ctx, const mmb_ckpt *c, const char *path, int *out, int cap, int *n, mmb_status *s);

/* Reads and parses the JSON object in `path` (io/checkpoint.c). Returns MMB_OK and sets *out (the
 * caller cJSON_Deletes it), MMB_ERR_IO when it cannot be read, MMB_ERR_FORMAT for malformed JSON or
 * a top level that is not an object; messages name the path. */
mmb_status mmb__json_read(mmb_ctx *ctx, const char *path, cJSON **out);

/* io/ckpt_layers.c. Each binds tensors named {prefix}{name}.weight / .bias, checked as mmb__ckpt_bind does;
 * the f32 copies they return are the caller's to free (also after an error). */
/* A float tensor of exactly the given shape: an f32 copy of its elements in *out. */
mmb_status mmb__ckpt_floats(mmb_ctx *ctx, const mmb_ckpt *c, const char *name, int ndim, const int64_t *shape,
                            float **out);
/* A depthwise 3x3 Conv2d [C, 1, 3, 3], packed for mmb__dwconv3x3_forward into *w9, and its bias [C] if asked. */
mmb_status mmb__ckpt_dwconv(mmb_ctx *ctx, const mmb_ckpt *c, const char *prefix, const char *name, int64_t C,
                            bool bias, float **w9, float **b);

/* ---- io/out.c: every output file ------------------------------------------------------------ */
/* An output being written: a temporary file beside the destination, renamed onto it at commit. */
typedef struct mmb__out {
    FILE *f;     /* write the contents here (stdio, binary) */
    int fd;      /* f's descriptor */
    char *path;  /* the destination, with symlinks followed: the file that the commit replaces */
    char *tmp;   /* the temporary file: path's directory/.mmb-HOSTHASH-PID-XXXXXX */
} mmb__out;

/* Opens an output for path. Follows symlinks to the file they name (a dangling link: the file it
 * names is created). Refuses with MMB_ERR_IO, naming the kind, a destination that exists and is not
 * a regular file (FIFO, device, socket, directory): nothing there is touched. Creates the temporary
 * in the destination's directory with the replaced file's mode (and owner, where the process may
 * set it), or 0666 & ~umask for a new file, after removing the stale temporaries of dead writers of
 * this host in that directory. Returns MMB_OK with *o ready, or MMB_ERR_ARG (no name) / MMB_ERR_IO
 * / MMB_ERR_NOMEM with *o holding nothing (mmb__out_abort on it is a no-op). */
mmb_status mmb__out_open(mmb_ctx *ctx, const char *path, mmb__out *o);
/* Flushes and fsyncs o's temporary file, renames it onto o->path and fsyncs the directory; then
 * releases o. Returns MMB_OK, or MMB_ERR_IO (a write error seen on o->f, a full disk, a failed
 * rename: the temporary removed and the destination untouched; or a failed directory sync after
 * the rename: the new file in place). o holds nothing afterwards, whatever the result. */
mmb_status mmb__out_commit(mmb_ctx *ctx, mmb__out *o);
/* Closes and removes o's temporary file, leaving the destination untouched, and releases o.
 * Safe on an output already committed or aborted, or one whose mmb__out_open failed. */
void mmb__out_abort(mmb__out *o);
/* mmb__out_open, n bytes of data, mmb__out_commit: the whole file in one call. Returns as those. */
mmb_status mmb__out_write_all(mmb_ctx *ctx, const char *path, const void *data, size_t n);

/* ---- io/image.c ------------------------------------------------------------------------------- */
/* Writes rgb (height x width x 3 bytes) as an 8-bit RGB PNG at path (written as mmb__out_write_all writes).
 * Returns MMB_OK, MMB_ERR_ARG, MMB_ERR_IO or MMB_ERR_NOMEM. */
mmb_status mmb__png_write(mmb_ctx *ctx, const char *path, const unsigned char *rgb, int width, int height);

#endif
