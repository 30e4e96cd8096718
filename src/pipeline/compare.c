/* Measuring a connector at any size: built from a synthetic checkpoint (random weights of the shapes
 * it asks for), run on random features, timed; and measuring a model as it is opened. What `mmbridge
 * compare` tabulates. */
#include "pipeline.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median of ts[0, n) (n > 0; sorts them). */
static double median(double *ts, int n) {
    qsort(ts, (size_t)n, sizeof *ts, cmp_double);
    return n % 2 ? ts[n / 2] : 0.5 * (ts[n / 2 - 1] + ts[n / 2]);
}

/* Adds json's keys to cfg, replacing keys it has; "%W" in json stands for `width`, "%T" for `tokens`. */
static bool merge_json(cJSON *cfg, const char *json, int64_t width, int64_t tokens) {
    char buf[1024];
    size_t n = 0;
    for (const char *p = json; *p && n < sizeof buf - 32; p++)
        if (p[0] == '%' && (p[1] == 'W' || p[1] == 'T'))
            n += (size_t)snprintf(buf + n, sizeof buf - n, "%lld", (long long)(*++p == 'W' ? width : tokens));
        else
            buf[n++] = *p;
    buf[n] = 0;
    cJSON *extra = cJSON_Parse(buf);
    bool ok = cJSON_IsObject(extra);
    for (cJSON *e = ok ? extra->child : NULL; ok && e; e = e->next) {
        cJSON_DeleteItemFromObjectCaseSensitive(cfg, e->string);
        cJSON *dup = cJSON_Duplicate(e, 1);
        ok = dup && cJSON_AddItemToObject(cfg, e->string, dup);
    }
    cJSON_Delete(extra);
    return ok;
}

/* config.json of the synthetic checkpoint: the original-LLaVA keys, the defaults the connector that
 * builds `type` gives (its synth_config), then config_json's on top. */
static mmb_status synth_config(mmb_ctx *ctx, const char *type, int64_t width, int64_t tokens, int64_t d_model,
                               const char *config_json, cJSON **out) {
    cJSON *cfg = cJSON_CreateObject();
    bool ok = cfg && cJSON_AddStringToObject(cfg, "mm_projector_type", type) &&
              cJSON_AddNumberToObject(cfg, "mm_hidden_size", (double)width) &&
              cJSON_AddNumberToObject(cfg, "hidden_size", (double)d_model);
    const mmb_connector_ops *ops = mmb__connector_find(type);
    if (ok && ops && ops->synth_config) ok = merge_json(cfg, ops->synth_config, width, tokens);
    if (!ok) {
        cJSON_Delete(cfg);
        return mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    }
    if (config_json && (strlen(config_json) >= 1024 || !merge_json(cfg, config_json, width, tokens))) {
        cJSON_Delete(cfg);
        return mmb__err(ctx, MMB_ERR_FORMAT, "config '%s': not a JSON object (of at most 1023 bytes)", config_json);
    }
    *out = cfg;
    return MMB_OK;
}

mmb_status mmb_connector_measure(mmb_ctx *ctx, const char *type, int64_t width, int64_t grid, int64_t d_model,
                                 const char *config_json, int reps, mmb_connector_report *out) {
    if (!ctx || !type || !out || width < 1 || grid < 1 || d_model < 1 || reps < 1 || reps > 1000 ||
        width > (1 << 20) || grid > (1 << 12) || d_model > (1 << 20))
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_connector_measure: bad arguments");
    const mmb_connector_ops *ops = mmb__connector_find(type);
    if (!ops) return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "connector '%s' is not registered", type);
    if (ops->needs)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "connector '%s' reads several hidden states: measure it on a "
                        "checkpoint (mmbridge compare MODEL)", type);
    cJSON *cfg = NULL;
    mmb_ckpt c = {0};
    mmb_status s = synth_config(ctx, type, width, grid * grid, d_model, config_json, &cfg);
    if (s == MMB_OK) s = mmb__ckpt_synth(ctx, type, cfg, 0.05f, &c);
    else cJSON_Delete(cfg);
    if (s != MMB_OK) return s;
    mmb_conn_cfg cc = {.type = type, .prefix = "model.mm_projector.", .in_width = width, .out_width = d_model,
                       .act = MMB_ACT_GELU, .bias = true, .eps = 1e-5f};
    void *st = NULL;
    s = ops->load(ctx, &c, &cc, &st);
    int64_t tokens = grid * grid, t_out = 0, params = 0, flops = 0;
    float *x = NULL, *y = NULL;
    double *ts = NULL;
    if (s == MMB_OK && (t_out = ops->out_tokens(st, tokens)) < 1)
        s = mmb__err(ctx, MMB_ERR_SHAPE, "connector '%s' cannot take a %lldx%lld grid", type, (long long)grid,
                     (long long)grid);
    size_t n_out = s == MMB_OK ? (size_t)t_out * (size_t)ops->out_width(st) : 0;
    if (s == MMB_OK) {
        ops->cost(st, tokens, &params, &flops);
        x = malloc(sizeof(float) * (size_t)(tokens * width));
        y = malloc(sizeof(float) * n_out + 1);
        ts = malloc(sizeof(double) * (size_t)reps);
        if (!x || !y || !ts) s = mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    }
    size_t scratch = s == MMB_OK ? ops->scratch(st, tokens) * sizeof(float) : 0;
    if (s == MMB_OK) s = mmb__arena_reserve(ctx, &ctx->arena, scratch);
    if (s == MMB_OK) {
        uint64_t r = 0x2545f4914f6cdd1dull;
        for (int64_t i = 0; i < tokens * width; i++) {
            r ^= r << 13; r ^= r >> 7; r ^= r << 17;
            x[i] = (float)(r >> 40) / 8388608.0f - 1.0f;
        }
    }
    for (int k = 0; k <= reps && s == MMB_OK; k++) {
        double t0 = mmb__now_s();
        s = ops->forward(ctx, st, y, x, 1, tokens);
        mmb__arena_reset(&ctx->arena);
        if (k) ts[k - 1] = mmb__now_s() - t0;
    }
    if (s == MMB_OK) {
        *out = (mmb_connector_report){
            .params = params, .flops_per_image = flops, .tokens_in = tokens, .tokens_out = t_out,
            .out_width = ops->out_width(st),
            .seconds = median(ts, reps),
            .weight_bytes = params * (int64_t)sizeof(float),
            .activation_bytes = (int64_t)(scratch + sizeof(float) * ((size_t)(tokens * width) + n_out))};
        snprintf(out->type, sizeof out->type, "%s", type);
    }
    if (st) ops->free(st);
    mmb__ckpt_close(&c);
    free(x);
    free(y);
    free(ts);
    return s;
}

mmb_status mmb_model_measure(mmb_ctx *ctx, const mmb_model *m, int64_t grid, int64_t width, int reps,
                             mmb_connector_report *out) {
    if (!ctx || !m || !out || grid < 1 || grid > (1 << 12) || width < 1 || width > (1 << 20) || reps < 1 ||
        reps > 1000)
        return mmb__err(ctx, MMB_ERR_ARG, "mmb_model_measure: bad arguments");
    mmb_model_info mi;
    mmb_model_get_info(m, &mi);
    const mmb_vit *v = mmb_model_vit(m);
    mmb_vit_info vi = {0};
    if (v) mmb_vit_get_info(v, &vi);
    const bool tower = v || strcmp(mi.family, "llava") != 0;
    const mmb_family_ops *fo = mmb__model_fam_ops(m, NULL);
    const bool ids = fo && fo->encode_ids; /* fusion D: the VQ tokenizer's ids, timed as the vision path */
    if (!tower && mi.n_taps != 1)
        return mmb__err(ctx, MMB_ERR_UNSUPPORTED, "a connector reading %d hidden states needs its vision tower to be "
                        "measured", mi.n_taps);
    /* The tower's size; a family that takes any size (Qwen2-VL) gets grid patches a side. */
    const int side = v ? vi.image_size
                   : mi.image_size ? mi.image_size : (int)grid * (mi.patch_size ? mi.patch_size : 14);
    const int64_t tin = grid * grid + 1, w = tower ? 0 : mi.vision_width ? mi.vision_width : width;
    /* AnyRes (LLaVA-NeXT, OneVision): an image of the tower's size, its base and best resolution's tiles */
    const void *fst = NULL;
    const bool anyres = fo && fo->image_tokens && mmb__model_fam_ops(m, &fst);
    int64_t tiles = 1;
    const int64_t t = anyres ? fo->image_tokens(ctx, fst, side, side, &tiles)
                    : tower ? mmb_model_encode_tokens(ctx, m, side, side) : mmb_model_tokens_out(ctx, m, tin);
    if (t < 0) return MMB_ERR_SHAPE;
    const size_t nin = tower ? (size_t)tiles * 3 * (size_t)side * (size_t)side : (size_t)(tin * w),
                 nout = (size_t)t * (size_t)mi.out_width;
    float *in = malloc(nin * sizeof(float)), *y = malloc(nout * sizeof(float) + 1);
    double *ts = malloc(sizeof(double) * (size_t)reps);
    mmb_status s = in && y && ts ? MMB_OK : mmb__err(ctx, MMB_ERR_NOMEM, "out of memory");
    if (s == MMB_OK && anyres) s = mmb__ckpt_verify(ctx, mmb__model_ckpt(m)); /* its encode_image maps no check */
    for (size_t i = 0; s == MMB_OK && i < nin; i++) in[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;
    /* The one hidden state read; a depth the checkpoint does not give is taken as just deep enough. */
    const int tap = mi.taps[0], n_hidden = mi.vision_layers ? mi.vision_layers + 1 : tap < 0 ? -tap : tap + 1;
    mmb_features ft = {.batch = 1, .tokens = tin, .width = w, .n_hidden = n_hidden, .n_taps = 1,
                       .taps = {tap < 0 ? tap + n_hidden : tap}, .data = {in}};
    for (int k = 0; k <= reps && s == MMB_OK; k++) {
        double t0 = mmb__now_s();
        s = anyres ? fo->encode_image(ctx, fst, in, side, side, y)
            : ids ? mmb__model_encode_ids(ctx, m, in, 1, side, side, (int32_t *)(void *)y, (size_t)t)
            : tower ? mmb_model_encode(ctx, m, in, 1, side, side, y, nout) : mmb_model_connect(ctx, m, &ft, y, nout);
        if (k) ts[k - 1] = mmb__now_s() - t0;
    }
    if (s == MMB_OK) {
        *out = (mmb_connector_report){
            .params = mi.params, .flops_per_image = mi.flops_per_image * tiles, .tokens_in = tower ? 0 : tin,
            .tokens_out = t, .out_width = mi.out_width, .seconds = median(ts, reps),
            .weight_bytes = mi.params * (int64_t)sizeof(float),
            .activation_bytes = (int64_t)((nin + nout) * sizeof(float)), .with_tower = tower};
        snprintf(out->type, sizeof out->type, "%s", mi.connector);
    }
    free(in);
    free(y);
    free(ts);
    return s;
}
