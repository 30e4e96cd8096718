/* The type-D families that read images as vocabulary (Chameleon, Emu3): the VQ tokenizer (vision/vq.c) turns an
 * image into codes, and the checkpoint's vocabulary_map (config.json: token name -> id, the tokenizer's vocabulary)
 * turns each code into the id of its image token, as ChameleonImageVocabularyMapping / Emu3ImageVocabularyMapping
 * do:
 *   Chameleon  tokens named "IMGIMG" + digits spelled A-J (A = 0) + one more character: the code is the digits
 *              (bpe2img: name[len("IMGIMG"):-1]); an image is its codes row-major; the LM's logits of every such
 *              token are set to the lowest float (ChameleonForConditionalGeneration.forward: "Disallow image
 *              tokens which does not include special begin-image and end-image tokens")
 *   Emu3       tokens named "<|visual token NNNNNN|>": the code is name[-8:-2]; each row of an image's codes is
 *              followed by the end-of-line token "<|extra_200|>" (convert_img2bpe's eol column)
 * The ids then go through the LLM's own embedding (pipeline/mllm.c), which is what get_image_features' pooler_output
 * is; the processor's text around the image (boi, Emu3's "H*W" and wrapper, eoi) comes from the row's image_before
 * and image_after (pipeline/chunks.c). */
#include "models/models.h"

#include <cjson/cJSON.h>
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    mmb_vq *vq;
    mmb_vq_info vi;
    const mmb__vq_part *part;
    int32_t *img2bpe;       /* (codebook_size): code -> vocabulary id */
    int32_t eol;            /* Emu3's end-of-line id, -1 */
    int32_t *mask;          /* ids whose logits are suppressed (Chameleon's image tokens), ascending */
    int64_t n_mask;
} vqf_state;

static void vqf_free(void *st) {
    vqf_state *f = st;
    if (!f) return;
    mmb_vq_free(f->vq);
    free(f->img2bpe);
    free(f->mask);
    free(f);
}

/* The code an image token's name spells, or -1 when the name is not one of the part's (-2: malformed). */
static int64_t code_of(const mmb__vq_part *p, const char *name) {
    size_t pl = strlen(p->token_prefix), nl = strlen(name);
    if (strncmp(name, p->token_prefix, pl) != 0) return -1;
    const char *d = name + pl;
    size_t dl;
    if (p->letters) { /* IMGIMG + letters A-J + a last character */
        if (nl < pl + 2) return -2;
        dl = nl - pl - 1;
    } else { /* <|visual token NNNNNN|>: name[-8:-2] */
        if (nl < pl + 2 + 1 || nl < 8 || strcmp(name + nl - 2, "|>") != 0) return -2;
        d = name + nl - 8;
        dl = 6;
    }
    if (dl > 9) return -2;
    int64_t v = 0;
    for (size_t i = 0; i < dl; i++) {
        char c = d[i];
        int digit = p->letters ? (c >= 'A' && c <= 'J' ? c - 'A' : -1) : (c >= '0' && c <= '9' ? c - '0' : -1);
        if (digit < 0) return -2;
        v = v * 10 + digit;
    }
    return v;
}

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* img2bpe from config.json's vocabulary_map: every code of the codebook must have its token. */
static mmb_status read_vocab(mmb_ctx *ctx, const mmb_ckpt *c, vqf_state *f, int64_t vocab) {
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(c->config, "vocabulary_map");
    if (!cJSON_IsObject(map))
        return mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: no 'vocabulary_map' object (the tokenizer's vocabulary "
                        "the image codes are mapped through)", c->dir);
    const int64_t K = f->vi.codebook_size;
    int n = cJSON_GetArraySize(map);
    if (!(f->img2bpe = malloc(sizeof(int32_t) * (size_t)K)) || !(f->mask = malloc(sizeof(int32_t) * (size_t)(n + 1))))
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    for (int64_t k = 0; k < K; k++) f->img2bpe[k] = -1;
    f->eol = -1;
    for (const cJSON *e = map->child; e; e = e->next) {
        if (!e->string || !cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= (double)vocab ||
            e->valuedouble != (double)(int64_t)e->valuedouble)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vocabulary_map['%s'] is not a token id in [0, %lld)",
                            c->dir, e->string ? e->string : "", (long long)vocab);
        int32_t id = (int32_t)e->valuedouble;
        if (f->part->eol && strcmp(e->string, f->part->eol) == 0) f->eol = id;
        int64_t code = code_of(f->part, e->string);
        if (code == -1) continue;
        if (code == -2 || code >= K)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vocabulary_map token '%s' names no code of the "
                            "codebook [0, %lld)", c->dir, e->string, (long long)K);
        f->mask[f->n_mask++] = id;
        if (id > f->img2bpe[code]) f->img2bpe[code] = id; /* a repeated code: the last in id order, as img2bpe */
    }
    for (int64_t k = 0; k < K; k++)
        if (f->img2bpe[k] < 0)
            return mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: vocabulary_map has no image token for code %lld "
                            "of the %lld-code codebook", c->dir, (long long)k, (long long)K);
    if (f->part->eol && f->eol < 0)
        return mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: vocabulary_map has no end-of-line token '%s'", c->dir,
                        f->part->eol);
    qsort(f->mask, (size_t)f->n_mask, sizeof *f->mask, cmp_i32);
    if (!f->part->mask) f->n_mask = 0;
    return MMB_OK;
}

static int64_t vqf_tokens(mmb_ctx *ctx, const void *st, int height, int width) {
    const vqf_state *f = st;
    int fct = f->vi.downsample;
    if (height < fct || width < fct || height % fct || width % fct) {
        mmb__err(ctx, MMB_ERR_SHAPE, "an image of %dx%d pixels: the VQ tokenizer takes sides that are multiples of "
                 "%d", height, width, fct);
        return -1;
    }
    int64_t gh = height / fct, gw = width / fct;
    return gh * (gw + (f->eol >= 0));
}

static mmb_status vqf_load(mmb_ctx *ctx, const mmb_ckpt *c, const mmb__family *fam, void **state,
                           mmb_model_info *info) {
    vqf_state *f = calloc(1, sizeof *f);
    if (!f) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    f->part = fam->part;
    const char *tp = f->part->text_config ? "text_config." : "";
    char k1[64], k2[64];
    snprintf(k1, sizeof k1, "%shidden_size", tp);
    snprintf(k2, sizeof k2, "%svocab_size", tp);
    int64_t d = 0, vocab = 0;
    mmb_status s = MMB_OK;
    if (!mmb__cfg_int(ctx, c, k1, &d, &s) && s == MMB_OK)
        s = mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: no '%s'", c->dir, k1);
    if (s == MMB_OK && !mmb__cfg_int(ctx, c, k2, &vocab, &s) && s == MMB_OK)
        s = mmb__err(ctx, MMB_ERR_MISSING, "%s/config.json: no '%s'", c->dir, k2);
    if (s == MMB_OK && (d < 1 || d > (1 << 20) || vocab < 1 || vocab > INT32_MAX))
        s = mmb__err(ctx, MMB_ERR_FORMAT, "%s/config.json: %s %lld or %s %lld out of range", c->dir, k1, (long long)d,
                     k2, (long long)vocab);
    if (s == MMB_OK) s = mmb__vq_open(ctx, c, &f->vq);
    if (s == MMB_OK) s = mmb_vq_get_info(f->vq, &f->vi);
    if (s == MMB_OK && !f->vi.has_encoder)
        s = mmb__err(ctx, MMB_ERR_UNSUPPORTED, "%s: the VQ model (%s) has no encoder", c->dir, f->vi.kind);
    if (s == MMB_OK) s = read_vocab(ctx, c, f, vocab);
    if (s != MMB_OK) {
        vqf_free(f);
        return s;
    }
    int res = f->vi.resolution;
    info->connector = "vq";
    info->activation = "";
    info->vision_width = (int)f->vi.embed_dim;
    info->in_width = (int)f->vi.embed_dim;
    info->out_width = (int)d;
    info->image_size = res;
    info->patch_size = f->vi.downsample;
    info->tokens_per_image = res > 0 ? vqf_tokens(ctx, f, res, res) : 0;
    if (info->tokens_per_image < 0) info->tokens_per_image = 0;
    info->params = f->vi.encoder_params;
    info->flops_per_image = res > 0 ? mmb_vq_flops(f->vq, res, res, 0) : 0;
    info->weight_dtype = MMB_F32;
    *state = f;
    return MMB_OK;
}

static mmb_status vqf_encode_ids(mmb_ctx *ctx, const void *st, const float *pixels, int64_t batch, int height,
                                 int width, int32_t *ids) {
    const vqf_state *f = st;
    if (vqf_tokens(ctx, f, height, width) < 0) return MMB_ERR_SHAPE;
    const int64_t gh = height / f->vi.downsample, gw = width / f->vi.downsample, per = gh * gw;
    int32_t *codes = malloc(sizeof(int32_t) * (size_t)(batch * per));
    if (!codes) return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory for %lld codes", (long long)(batch * per));
    mmb_status s = mmb_vq_encode(ctx, f->vq, pixels, batch, height, width, codes, NULL);
    for (int64_t b = 0, o = 0; s == MMB_OK && b < batch; b++)
        for (int64_t y = 0; y < gh; y++) {
            for (int64_t x = 0; x < gw; x++) ids[o++] = f->img2bpe[codes[(b * gh + y) * gw + x]];
            if (f->eol >= 0) ids[o++] = f->eol;
        }
    free(codes);
    return s;
}

static const int32_t *vqf_logit_mask(const void *st, int64_t *n) {
    const vqf_state *f = st;
    *n = f->n_mask;
    return f->mask;
}

static const mmb_vq *vqf_vq(const void *st) { return ((const vqf_state *)st)->vq; }

static void vqf_gen_info(const void *st, mmb__gen_info *out) {
    const vqf_state *f = st;
    *out = (mmb__gen_info){.codebook = f->vi.codebook_size, .bos = -1, .pad = -1, .boi = -1, .lm_head = true,
                           .img2bpe = f->img2bpe, .eol = f->eol};
    if (!f->part->generates || !f->vi.has_decoder) out->codebook = 0; /* no image generation */
}

const mmb_family_ops mmb__family_vq = {.load = vqf_load, .tokens = vqf_tokens, .free = vqf_free,
                                       .encode_ids = vqf_encode_ids, .logit_mask = vqf_logit_mask, .vq = vqf_vq,
                                       .gen_info = vqf_gen_info};
