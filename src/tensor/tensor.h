/* The tensor layer: kernels (each with a _ref oracle), linear layers and the GEMMs, attention, convolutions and pooling on patch grids, dtypes. Uses only the base layer. */
#ifndef MMB_TENSOR_H
#define MMB_TENSOR_H

#include "base/base.h"

/* ---- tensor/kernels.c: elementwise and norm kernels (each with a _ref oracle) -------------- */

typedef enum mmb_act {
    MMB_ACT_NONE = 0,
    MMB_ACT_GELU,       /* exact: 0.5 x (1 + erf(x / sqrt 2)) */
    MMB_ACT_GELU_TANH,  /* 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
    MMB_ACT_QUICK_GELU, /* x sigmoid(1.702 x) */
    MMB_ACT_SILU,       /* x sigmoid(x) */
    MMB_ACT_RELU        /* max(x, 0) */
} mmb_act;

/* Parses an HF ACT2FN name ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "quick_gelu",
 * "silu", "swish", "relu"). Returns false for anything else. */
bool mmb__act_parse(const char *name, mmb_act *out);
const char *mmb__act_name(mmb_act a);

/* x (n) -> x (n): act applied in place. */
void mmb__act_forward(float *x, int64_t n, mmb_act a);
void mmb__act_forward_ref(float *x, int64_t n, mmb_act a);

/* x (M, C) -> out (M, C): (x - mean) / sqrt(var + eps) * w + b; w, b (C) (b may be NULL). */
void mmb__layernorm_forward(float *out, const float *x, const float *w, const float *b,
                            int64_t M, int64_t C, float eps);
void mmb__layernorm_forward_ref(float *out, const float *x, const float *w, const float *b,
                                int64_t M, int64_t C, float eps);

/* out (n), a (n), b (n) -> out = a + b (out may alias a or b). */
void mmb__add_forward(float *out, const float *a, const float *b, int64_t n);
void mmb__add_forward_ref(float *out, const float *a, const float *b, int64_t n);

/* Threaded wrappers: the same kernels split over rows by the context's pool. */
void mmb__act_forward_mt(mmb_ctx *ctx, float *x, int64_t n, mmb_act a);
void mmb__layernorm_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w,
                               const float *b, int64_t M, int64_t C, float eps);
void mmb__add_forward_mt(mmb_ctx *ctx, float *out, const float *a, const float *b, int64_t n);

/* ---- tensor/gemm.c: linear layers ----------------------------------------------------------- */

/* A linear layer y = x W^T + b, as torch.nn.Linear stores it. */
typedef struct mmb_linear {
    int64_t n_out, n_in;
    const float *w;          /* (n_out, n_in), f32: mapped in place or owned_w; NULL once packed
                                (the own backend reads only `packed`; the mapped pages are released) */
    const float *bias;       /* (n_out) or NULL */
    float *owned_w, *owned_b;/* set when converted from f16/bf16 at load */
    float *packed;           /* the own kernel's packed copy of w, or NULL */
    mmb_gemm_backend backend;
    /* Reduced-precision weights: packed holds elements of wdt (the context's weight_dtype), and
     * for MMB_I8 `scales` the per-output scales; the other backends compute with w rounded to wdt. */
    mmb_dtype wdt;
    float *scales;
} mmb_linear;

/* Binds a linear layer to tensor `w` [n_out, n_in] and optional `b` [n_out] (any float dtype;
 * converted once to f32 if not f32) and pre-packs it for ctx's backend. Returns MMB_OK or
 * MMB_ERR_NOMEM. Shapes are the caller's to check. The weights are computed at ctx->weight_dtype
 * (MMB_ERR_UNSUPPORTED, naming the tensor, for a weight beyond f16's range at MMB_F16). Layers whose
 * weights are a checkpoint's bind them with mmb__linear_bind (io/io.h), which also releases the mapped
 * pages the layer no longer reads. */
mmb_status mmb__linear_init(mmb_ctx *ctx, mmb_linear *l, const mmb_tensor *w, const mmb_tensor *b);
void mmb__linear_free(mmb_linear *l);
/* x (M, n_in) -> y (M, n_out): y = x W^T + b, threaded over ctx's pool. */
void mmb__linear_forward(mmb_ctx *ctx, float *y, const float *x, int64_t M, const mmb_linear *l);
/* The same followed by y = act(y); our kernel applies it to each block of y while in cache. */
void mmb__linear_forward_act(mmb_ctx *ctx, float *y, const float *x, int64_t M, const mmb_linear *l, mmb_act act);

/* The oracle: C (M, N) = A (M, K) W^T + bias; W (N, K), bias (N) or NULL. Single-threaded. */
void mmb__gemm_ref(float *C, const float *A, const float *W, const float *bias,
                   int64_t M, int64_t N, int64_t K);

/* ---- tensor/gemm_own.c: mmbridge's packed kernel --------------------------------------------- */

/* Tests: 1 packs A into micro-panels, 0 reads it in place, -1 restores the rule (gemm_own.c's header).
 * Either gives bit-identical results. */
void mmb__gemm_own_force_pack_a(int mode);
/* Floats needed to hold W (N, K) packed. */
size_t mmb__gemm_own_packed_size(int64_t N, int64_t K);
/* W (N, K) row-major -> dst, the own kernel's panel layout. */
void mmb__gemm_own_pack(float *dst, const float *W, int64_t N, int64_t K);
/* A (M, K), packed W (N, K), bias (N) or NULL -> C (M, N) = A W^T + bias, split over the pool. */
void mmb__gemm_own(mmb_pool *pool, float *C, const float *A, const float *packed,
                   const float *bias, int64_t M, int64_t N, int64_t K);
/* The same, then C = act(C), applied block by block as each is finished. */
void mmb__gemm_own_act(mmb_pool *pool, float *C, const float *A, const float *packed, const float *bias,
                       int64_t M, int64_t N, int64_t K, mmb_act act);
/* Reduced-precision weights (docs/decisions.md "Reduced-precision weights"): the same packed
 * layout with elements of dt = MMB_F32, MMB_BF16, MMB_F16 or MMB_I8 (int8: symmetric, one scale
 * absmax/127 per output row of W, in `scales`, mmb__gemm_own_scales_size(N) floats). The kernels
 * widen the weights to f32 as they load them; A, C, bias and the arithmetic stay f32. */
bool mmb__gemm_own_dtype_ok(mmb_dtype dt);
size_t mmb__gemm_own_packed_bytes(int64_t N, int64_t K, mmb_dtype dt);
int64_t mmb__gemm_own_scales_size(int64_t N);
void mmb__gemm_own_pack_dt(void *dst, float *scales, const float *W, int64_t N, int64_t K, mmb_dtype dt);
/* C (M, N) = act(A (M, K) W^T + bias) with W packed by mmb__gemm_own_pack_dt as dt. */
void mmb__gemm_own_dt(mmb_pool *pool, float *C, const float *A, const void *packed, const float *scales,
                      mmb_dtype dt, const float *bias, int64_t M, int64_t N, int64_t K, mmb_act act);
/* dst (N, K) = W rounded to dt and back to f32 (int8: q * scale), the values the kernels compute
 * with: the reference for tests and the weights of the other backends at that dtype. */
void mmb__gemm_own_dequant(float *dst, const float *W, int64_t N, int64_t K, mmb_dtype dt);

/* The micro-kernel on its own, for other blocked kernels (attention, the decoder's weight products).
 * MR = mmb__gemm_own_mr(isa) rows per A micro-panel (isa as mmb__cpu_isa returns it: 14 AVX-512,
 * 6 AVX2, 4 scalar); panels are 32 columns wide. For i < mr <= MR, j < nc <= 32:
 *   c[i * ldc + j] = (load ? c[i * ldc + j] : 0) + sum_{k < kc} a[k * MR + i] * b[k * 32 + j] + bias[j]
 * (bias NULL: none); b must be 64-byte aligned; rows i >= mr of a are not read. */
int mmb__gemm_own_mr(int isa);
void mmb__gemm_own_tile(int isa, int mr, int64_t kc, const float *a, const float *b, float *c, int64_t ldc,
                        int nc, int load, const float *bias);

/* ---- tensor/half.c ---------------------------------------------------------------------------- */
float mmb__f16_to_f32(uint16_t h);
float mmb__bf16_to_f32(uint16_t h);
uint16_t mmb__f32_to_f16(float f);
uint16_t mmb__f32_to_bf16(float f);
/* Parses a safetensors dtype name; false for unknown names. */
bool mmb__dtype_parse(const char *name, mmb_dtype *out);
/* True for F32, F16, BF16: the dtypes the library computes with. */
bool mmb__dtype_is_float(mmb_dtype t);

/* ---- tensor/attention.c: multi-head self-attention ------------------------------------------ */

/* Floats of scratch mmb__attention_forward needs on nth threads. */
size_t mmb__attention_scratch(int nth, int64_t head_dim);
/* qkv (batch, tokens, 3 * heads * head_dim) [q | k | v, head-major inside each] ->
 * out (batch, tokens, heads * head_dim): softmax(q k^T / sqrt(head_dim)) v per head, no mask.
 * Blocked with an online softmax; threaded over the context's pool. */
void mmb__attention_forward(mmb_ctx *ctx, float *out, const float *qkv, int64_t batch, int64_t tokens,
                            int64_t heads, int64_t head_dim, float *scratch);
/* The oracle: full score rows in double. Returns false if it cannot allocate a row. */
bool mmb__attention_forward_ref(float *out, const float *qkv, int64_t batch, int64_t tokens, int64_t heads,
                                int64_t head_dim);

/* ---- tensor/vecmath.c: vectorised math (AVX2, AVX-512) ---------------------------------------- */

/* x[0, n) = act(x) in place with the vector code of isa (as mmb__cpu_isa returns it), whole
 * vectors only: returns how many leading elements it did (0 for isa 0 or MMB_ACT_NONE); the caller
 * does the rest. Relative error of a few ulp (exp about 1 ulp, erfc below 1.2e-7). */
int64_t mmb__vec_act(int isa, float *x, int64_t n, mmb_act a);
/* One key block of an online softmax down the 32 columns of sp (nk rows of 32, 64-byte aligned), in
 * base 2 on scores times `scale`: with running max mp[32] and sum lp[32], sp = 2^(scale (s - m_new)),
 * lp = lp * cp + column sums, mp = m_new, cp = 2^(scale (m_old - m_new)). */
void mmb__vec_softmax_cols(int isa, float *sp, int64_t nk, float *mp, float *lp, float *cp, float scale);

/* ---- RMSNorm and elementwise product (tensor/kernels.c); cross-attention (tensor/attention.c) ---- */

/* x (M, C) -> out (M, C): x / sqrt(mean(x^2) + eps) * w (Llama-style RMSNorm, no bias); w (C). */
void mmb__rmsnorm_forward(float *out, const float *x, const float *w, int64_t M, int64_t C, float eps);
void mmb__rmsnorm_forward_ref(float *out, const float *x, const float *w, int64_t M, int64_t C, float eps);
void mmb__rmsnorm_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w, int64_t M, int64_t C,
                             float eps);
/* out (n), a (n), b (n) -> out = a * b elementwise (out may alias a or b). */
void mmb__mul_forward(float *out, const float *a, const float *b, int64_t n);
void mmb__mul_forward_ref(float *out, const float *a, const float *b, int64_t n);

/* q (batch, tq, ldq), k and v (batch, tk, ldkv): query head h in columns [h * head_dim, (h + 1) * head_dim)
 * of a q row, K/V head h / (heads / kv_heads) likewise in k and v rows (grouped-query attention;
 * kv_heads divides heads) -> out (batch, tq, heads * head_dim): softmax(q k^T / sqrt(head_dim)) v per
 * head, no mask. The blocked kernel of mmb__attention_forward; scratch as mmb__attention_scratch. */
void mmb__cross_attention_forward(mmb_ctx *ctx, float *out, const float *q, const float *k, const float *v,
                                  int64_t ldq, int64_t ldkv, int64_t batch, int64_t tq, int64_t tk, int64_t heads,
                                  int64_t kv_heads, int64_t head_dim, float *scratch);
bool mmb__cross_attention_forward_ref(float *out, const float *q, const float *k, const float *v, int64_t ldq,
                                      int64_t ldkv, int64_t batch, int64_t tq, int64_t tk, int64_t heads,
                                      int64_t kv_heads, int64_t head_dim);

/* ---- tensor/conv.c: maps on a patch grid ---------------------------------------------------------- */

/* Adds l's parameters and its FLOPs over `rows` rows to *params, *flops. */
void mmb__linear_cost(const mmb_linear *l, int64_t rows, int64_t *params, int64_t *flops);
/* Maps are channels-last: (B, H, W, C) row-major, i.e. a connector's (batch, tokens, channels). */
/* The side g of the patch grid of a hidden state of `tokens` tokens: g*g (SigLIP) or g*g + 1 (CLIP,
 * *has_cls set); -1 when it is neither. */
int64_t mmb__patch_grid(int64_t tokens, bool *has_cls);
/* The side g of a square grid of tokens = g * g, or -1. */
int64_t mmb__grid_side(int64_t tokens);
/* w (C, 1, 3, 3) as torch stores a depthwise Conv2d weight -> w9 (9, C), the layout the kernel reads. */
void mmb__dwconv3x3_pack(float *w9, const float *w, int64_t C);
/* x (B, H, W, C), w9 (9, C), bias (C) or NULL -> out (B, Ho, Wo, C), Ho = (H - 1) / stride + 1 (same
 * for W): torch Conv2d(C, C, 3, stride, padding=1, groups=C). The _ref takes torch's w (C, 1, 3, 3). */
void mmb__dwconv3x3_forward(float *out, const float *x, const float *w9, const float *bias, int64_t B, int64_t H,
                            int64_t W, int64_t C, int stride);
void mmb__dwconv3x3_forward_ref(float *out, const float *x, const float *w, const float *bias, int64_t B, int64_t H,
                                int64_t W, int64_t C, int stride);
void mmb__dwconv3x3_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w9, const float *bias,
                               int64_t B, int64_t H, int64_t W, int64_t C, int stride);
/* The im2col rows of a Conv2d of kernel = stride = k, no padding, over channels-last maps: x (B, H, W, C) ->
 * rows (B, H / k, W / k, C k k), each row in (c, ky, kx) order as torch flattens the weight (O, C, k, k), so the
 * conv is the linear layer mmb__ckpt_conv binds, over these rows; a remainder of H or W under k is dropped, as
 * torch does. */
void mmb__conv_rows(float *rows, const float *x, int64_t B, int64_t H, int64_t W, int64_t C, int k);
/* x (B, H, W, C) -> out (B, Ho, Wo, C): torch AdaptiveAvgPool2d((Ho, Wo)); output cell i of n over a side
 * of L averages [floor(i L / n), ceil((i + 1) L / n)) (cells overlap when n does not divide L; Ho > H
 * repeats rows). */
void mmb__adaptive_avgpool2d_forward(float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C,
                                     int64_t Ho, int64_t Wo);
void mmb__adaptive_avgpool2d_forward_ref(float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C,
                                         int64_t Ho, int64_t Wo);
void mmb__adaptive_avgpool2d_forward_mt(mmb_ctx *ctx, float *out, const float *x, int64_t B, int64_t H, int64_t W,
                                        int64_t C, int64_t Ho, int64_t Wo);

typedef enum mmb_se_kind {
    MMB_SE_SILU_SIGMOID,      /* timm SEModule(act_layer=SiLU), gate sigmoid (RegNet in Honeybee) */
    MMB_SE_RELU_HARDSIGMOID   /* torchvision SqueezeExcitation(scale_activation=Hardsigmoid) (MobileVLM) */
} mmb_se_kind;
/* Squeeze-and-excitation in place on x (B, HW, C): s = mean over HW (B, C); x *= gate(fc2(act(fc1(s)))).
 * fc1 (R, C) and fc2 (C, R) are the 1x1 convs with bias. scratch: B * (2 C + R) floats. */
void mmb__se_forward(mmb_ctx *ctx, float *x, int64_t B, int64_t HW, const mmb_linear *fc1, const mmb_linear *fc2,
                     mmb_se_kind kind, float *scratch);

/* ---- tensor/conv2d.c: dense convolution networks on NHWC maps (the VQ tokenizers) ------------------ */

/* Maps are channels-last (B, H, W, C), row-major, C contiguous: rows = pixels. */
/* A Conv2d's geometry: torch Conv2d(cin, cout, (kh, kw), stride) after F.pad with pad = {top, left, bottom,
 * right} zeros (torch's padding=p is {p, p, p, p}; Chameleon's F.pad(0, 1, 0, 1) then stride 2 is {0, 0, 1, 1}).
 * Its weight is torch's (cout, cin, kh, kw) read as it is stored, as an (cout, cin kh kw) mmb_linear
 * (mmb__ckpt_conv binds it, mapped in place when f32): im2col rows are in (cin, ky, kx) order. */
typedef struct mmb_conv2d {
    int64_t cin, cout;
    int kh, kw, stride;
    int pad[4];
} mmb_conv2d;
/* Ho = (H + top + bottom - kh) / stride + 1 (0 when the padded map is smaller than the kernel); Wo likewise. */
int64_t mmb__conv2d_out_h(const mmb_conv2d *g, int64_t H);
int64_t mmb__conv2d_out_w(const mmb_conv2d *g, int64_t W);
/* Floats of scratch mmb__conv2d_forward needs for a (B, H, W, cin) input: one tile of im2col rows (about 4 MiB,
 * at least 64 rows, never more than the output's pixels), 0 for a 1x1 stride-1 unpadded conv (a plain GEMM). */
size_t mmb__conv2d_scratch(const mmb_conv2d *g, int64_t B, int64_t H, int64_t W);
/* x (B, H, W, cin), l the (cout, cin kh kw) layer with its bias -> out (B, Ho, Wo, cout); out must not alias x.
 * Tiles of output pixels: im2col of the tile (threaded), then mmb__linear_forward (threaded). */
void mmb__conv2d_forward(mmb_ctx *ctx, float *out, const float *x, const mmb_linear *l, const mmb_conv2d *g,
                         int64_t B, int64_t H, int64_t W, float *scratch);
/* The oracle: w torch's (cout, cin, kh, kw), bias (cout) or NULL; double accumulation, single-threaded. */
void mmb__conv2d_forward_ref(float *out, const float *x, const float *w, const float *bias, const mmb_conv2d *g,
                             int64_t B, int64_t H, int64_t W);
/* Adds the conv's parameters and its FLOPs for one (H, W) image to *params, *flops. */
void mmb__conv2d_cost(const mmb_linear *l, const mmb_conv2d *g, int64_t H, int64_t W, int64_t *params,
                      int64_t *flops);

/* torch GroupNorm(G, C, eps, affine) over x (B, HW, C) NHWC -> out (B, HW, C) (out may alias x): per image and
 * group of C / G consecutive channels, mean and variance (biased) over HW x C/G values, accumulated in double in
 * two passes; then y = (x - mean) / sqrt(var + eps) * w[c] + b[c] (w, b NULL: 1, 0), then y = y sigmoid(y) when
 * silu (every ResNet block's norm-then-swish). mmb__groupnorm_ok: G divides C, G <= 256, C <= 4096. */
bool mmb__groupnorm_ok(int64_t C, int G);
void mmb__groupnorm_forward_ref(float *out, const float *x, const float *w, const float *b, int64_t B, int64_t HW,
                                int64_t C, int G, float eps, bool silu);
/* Bytes of scratch the threaded GroupNorm needs on nth threads (mmb__pool_size). */
size_t mmb__groupnorm_scratch(int nth, int G);
void mmb__groupnorm_forward_mt(mmb_ctx *ctx, float *out, const float *x, const float *w, const float *b, int64_t B,
                               int64_t HW, int64_t C, int G, float eps, bool silu, double *scratch);

/* x (B, H, W, C) -> out (B, Ho, Wo, C): torch F.interpolate(size=(Ho, Wo), mode="nearest"): source index
 * min(floor(dst * (float)in / out), in - 1) per side (dst >> 1 at twice the size, as scale_factor=2.0 gives). */
void mmb__resize_nearest_ref(float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t Ho,
                             int64_t Wo);
void mmb__resize_nearest_mt(mmb_ctx *ctx, float *out, const float *x, int64_t B, int64_t H, int64_t W, int64_t C,
                            int64_t Ho, int64_t Wo);
/* F.interpolate(scale_factor=2.0, mode="nearest"): out (B, 2H, 2W, C). */
void mmb__upsample2x_nearest_mt(mmb_ctx *ctx, float *out, const float *x, int64_t B, int64_t H, int64_t W,
                                int64_t C);

/* ---- tensor/layers.c: composite layers ------------------------------------------------------- */

/* A pre-norm MLP residual (transformer blocks, perceivers): x (rows, D) -> x + fc2(act(fc1(LN(x)))), in
 * place; LN weights (D); fc1 (I, D), fc2 (D, I); scratch xn (rows, D), h (rows, I). */
void mmb__ffn_residual_forward(mmb_ctx *ctx, float *x, float *xn, float *h, int64_t rows, const float *ln_w,
                               const float *ln_b, float eps, const mmb_linear *fc1, mmb_act act, const mmb_linear *fc2);

/* ---- LLM decoder (lm): tensor/gemm_own.c panel access, tensor/wgemm.c, lm/decoder.c ------------- */

/* The own kernel's packed panel: NR columns wide, k-major, cut into K blocks of KC (gemm_own.c). */
#define MMB_GEMM_OWN_NR 32
#define MMB_GEMM_OWN_KC 256
/* A rows [0, mr) (row stride lda, kc columns) -> dst (kc x MR, k-major), rows mr..MR-1 zero; MR is
 * mmb__gemm_own_mr(mmb__cpu_isa()). */
void mmb__gemm_own_pack_a(float *dst, const float *A, int64_t lda, int mr, int64_t kc);

/* A weight matrix used in its storage dtype (F32, F16, BF16): W (n, k) row-major as nn.Linear stores it,
 * read in place from the mapped file and converted to f32 on the fly (tensor/wgemm.c). */
typedef struct mmb_wmat {
    const void *data;
    mmb_dtype dtype;
    int64_t n, k;
} mmb_wmat;

/* Rows of x up to which mmb__wmat_part streams each weight row once (GEMV); above, it packs panels (GEMM). */
#define MMB_WMAT_GEMV_MAX 4
/* Floats of per-thread scratch mmb__wmat_part needs for M rows of x and K columns. */
size_t mmb__wmat_scratch(int64_t M, int64_t K);
/* Output columns [n0, n1) of y = x W^T + bias, single-threaded (callers split the columns over threads):
 * x (M, w->k) row stride ldx; y0 points at column n0 of row 0 of y (row stride ldy); bias (w->n) or NULL;
 * accumulate: y += x W^T + bias instead of y =. scratch: mmb__wmat_scratch(M, w->k) floats, 64-aligned. */
void mmb__wmat_part(float *y0, int64_t ldy, const float *x, int64_t ldx, int64_t M, const mmb_wmat *w,
                    const float *bias, int64_t n0, int64_t n1, int accumulate, float *scratch);
/* One output of mmb__wmat_share: y (row stride ldy) = x W^T + bias (bias NULL: none). */
typedef struct mmb_wmat_out {
    const mmb_wmat *w;
    const float *bias;
    float *y;
    int64_t ldy;
} mmb_wmat_out;
/* Thread tid of nth's share of the products o[0 .. n) of the same x (M rows, row stride ldx): the columns of
 * all matrices split in units of 8 (GEMV, M <= MMB_WMAT_GEMV_MAX) or one micro-kernel panel, so a pool job
 * computes them all in one step. accumulate as mmb__wmat_part; scratch: the thread's own,
 * mmb__wmat_scratch(M, K) floats for the largest K of the matrices. */
void mmb__wmat_share(int tid, int nth, const float *x, int64_t ldx, int64_t M, const mmb_wmat_out *o, int n,
                     int accumulate, float *scratch);
/* The oracle: y (M, w->n) = x (M, w->k) W^T + bias, weights converted element by element, sums in double. */
void mmb__wmat_ref(float *y, const float *x, int64_t M, const mmb_wmat *w, const float *bias);

/* ---- tensor/grad.c: backward passes and the optimiser, for training ------------------------------------ */

/* y (M, n_out) = x (M, n_in) W^T + b for mutable f32 weights w (n_out, n_in), b (n_out) or NULL (packed here,
 * each call). Returns MMB_OK or MMB_ERR_NOMEM. */
mmb_status mmb__train_linear_forward(mmb_ctx *ctx, float *y, const float *x, int64_t M, const float *w,
                                     const float *b, int64_t n_out, int64_t n_in);
/* The backward of that layer for the output gradient dy (M, n_out): dw (n_out, n_in) += dy^T x and
 * db (n_out) += the column sums of dy (each NULL: not wanted), dx (M, n_in) = dy W (NULL: not wanted).
 * Returns MMB_OK or MMB_ERR_NOMEM. */
mmb_status mmb__train_linear_backward(mmb_ctx *ctx, const float *x, const float *dy, int64_t M, const float *w,
                                      int64_t n_out, int64_t n_in, float *dw, float *db, float *dx);
/* dx (n) *= act'(x): the derivative of mmb__act_forward at its input x (exact GELU, tanh GELU, quick GELU,
 * SiLU, ReLU; NONE: unchanged), in double. */
void mmb__act_backward(float *dx, const float *x, int64_t n, mmb_act a);
/* AdamW as torch.optim.AdamW steps it (decoupled weight decay first, bias corrections): */
typedef struct mmb_adamw {
    double lr, beta1, beta2, eps, weight_decay;
} mmb_adamw;
/* One step t (1-based) of w (n) with gradient g and moments m, v (n each, zero before step 1). */
void mmb__adamw_step(float *w, const float *g, float *m, float *v, int64_t n, const mmb_adamw *o, int64_t t);

/* The transposed product, the backward of y = x W^T with respect to x: dx (M, w->k) = dy (M, w->n) W, with W
 * read in its storage dtype. Output columns [c0, c1) on the calling thread (callers split the columns):
 * dy row stride lddy; dx0 points at column c0 of row 0 of dx (row stride lddx); accumulate: dx += dy W.
 * For each block of MMB_GEMM_OWN_KC rows of W, dy's columns are packed once into the own kernel's A
 * micro-panels and each 32-column block of those W rows, widened to f32 as it lies (no transposition),
 * is the B panel. scratch: mmb__wmat_t_scratch(M, w->n) floats, 64-aligned. */
size_t mmb__wmat_t_scratch(int64_t M, int64_t N);
void mmb__wmat_part_t(float *dx0, int64_t lddx, const float *dy, int64_t lddy, int64_t M, const mmb_wmat *w,
                      int64_t c0, int64_t c1, int accumulate, float *scratch);
/* The oracle: dx (M, w->k) = dy (M, w->n) W, sums in double. */
void mmb__wmat_ref_t(float *dx, const float *dy, int64_t M, const mmb_wmat *w);

#endif
