/* The family table (src/models/families.c) and the connector registry, through the library: a checkpoint no
 * row claims (an unknown VLM, an unknown architecture, a bare model_type) is refused with its architecture and the
 * supported families; mmb_family_count / mmb_family_get list every row, and every row's architectures are
 * matched back to it; a tower alone matches its vision-only row and opens (mmb_vit_open) while
 * mmb_model_open refuses it; mmb_connector_names lists exactly the names the registered ops give. */
#include "check.h"
#include "internal.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The row claiming dir/config.json (mmb__family_match_config on the parsed file). */
static mmb_status match_dir(mmb_ctx *ctx, const char *dir, const mmb__family **out) {
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    cJSON *config;
    mmb_status s = mmb__json_read(ctx, path, &config);
    if (s != MMB_OK) return s;
    s = mmb__family_match_config(ctx, config, path, out);
    cJSON_Delete(config);
    return s;
}

static void write_config(const char *dir, const char *json) {
    mkdir(dir, 0755);
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    fputs(json, f);
    fclose(f);
}

/* mmb_model_open on a checkpoint of config `json` (and one tensor) fails with UNSUPPORTED, naming `what`
 * and every family with its architectures, and not taken for a tower alone. */
static void check_refused(mmb_ctx *ctx, const char *dir, const char *json, const char *what) {
    write_config(dir, json);
    char path[256];
    float one = 1;
    mmb_tensor t = {.name = "w", .dtype = MMB_F32, .ndim = 1, .shape = {1}, .data = &one};
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(mmb_st_write(ctx, path, &t, 1) == MMB_OK, "write %s", path);
    mmb_model *m = NULL;
    CHECK(mmb_model_open(ctx, dir, &m) == MMB_ERR_UNSUPPORTED && !m, "%s: refused", dir);
    const char *e = mmb_ctx_error(ctx);
    CHECK(strstr(e, what) && strstr(e, "is not supported; supported families: "), "%s: message: %s", dir, e);
    CHECK(!strstr(e, "tower alone"), "%s: not taken for a tower alone: %s", dir, e);
    for (int i = 0; i < mmb_family_count(); i++) {
        mmb_family_desc d;
        mmb_family_get(i, &d);
        char item[160];
        snprintf(item, sizeof item, "%s (", d.name);
        CHECK(strstr(e, item) && strstr(e, d.architectures), "%s: lists %s (%s): %s", dir, d.name, d.architectures, e);
    }
    const mmb__family *row = NULL;
    CHECK(match_dir(ctx, dir, &row) == MMB_ERR_UNSUPPORTED && !row, "%s: by directory too", dir);
}

static void test_refusals(mmb_ctx *ctx) {
    check_refused(ctx, "fam_unknown_vl",
                  "{\"architectures\":[\"UnknownVLForConditionalGeneration\"],\"model_type\":\"unknown_vl\","
                  "\"vision_config\":{\"model_type\":\"siglip_vision_model\"}}",
                  "architecture 'UnknownVLForConditionalGeneration' (model_type 'unknown_vl')");
    check_refused(ctx, "fam_unknown", "{\"architectures\":[\"FooBarForCausalLM\"]}",
                  "architecture 'FooBarForCausalLM' (model_type '')");
    check_refused(ctx, "fam_bare", "{\"model_type\":\"bogus\"}", "model_type 'bogus' (no architectures)");
    write_config("fam_badtype", "{\"architectures\":[\"LlavaForConditionalGeneration\"],\"model_type\":3}");
    const mmb__family *row = NULL;
    CHECK(match_dir(ctx, "fam_badtype", &row) == MMB_ERR_FORMAT, "a model_type that is not a string");
    CHECK(match_dir(ctx, "fam_absent", &row) == MMB_ERR_IO, "no config.json");
}

/* Every row is listed, and a config naming any of its architectures (or, with none, its model types)
 * is claimed by a row of the same family. */
static void test_rows(mmb_ctx *ctx) {
    int n = mmb_family_count(), seen_clip = 0, seen_llava = 0, seen_text = 0;
    mmb_family_desc d;
    CHECK(n >= 14, "rows: %d", n);
    CHECK(mmb_family_get(n, &d) == MMB_ERR_ARG && mmb_family_get(-1, &d) == MMB_ERR_ARG &&
          mmb_family_get(0, NULL) == MMB_ERR_ARG, "out of range");
    for (int i = 0; i < n; i++) {
        bool text = mmb_family_get(i, &d) == MMB_OK && strcmp(d.name, "text") == 0;
        CHECK(d.name[0] && d.architectures[0] && (text ? !d.tower[0] && !d.processor[0] && d.has_lm
                                                       : d.tower[0] && d.processor[0]), "row %d", i);
        seen_text += text && d.fusion == MMB_FUSION_NONE;
        seen_clip += strcmp(d.name, "clip") == 0 && d.fusion == MMB_FUSION_NONE && !d.has_lm && !d.connector[0];
        seen_llava += strcmp(d.name, "llava") == 0 && d.fusion == MMB_FUSION_C && d.has_lm;
        char list[512], json[256];
        snprintf(list, sizeof list, "%s", d.architectures);
        for (char *a = strtok(list, ", "); a; a = strtok(NULL, ", ")) {
            snprintf(json, sizeof json, "{\"architectures\":[\"%s\"]}", a);
            write_config("fam_row", json);
            const mmb__family *row = NULL;
            CHECK(match_dir(ctx, "fam_row", &row) == MMB_OK && row && strcmp(row->name, d.name) == 0,
                  "%s -> %s (got %s)", a, d.name, row ? row->name : mmb_ctx_error(ctx));
        }
    }
    CHECK(seen_clip == 1 && seen_llava == 2 && seen_text == 1, "clip row %d, llava rows %d, text row %d", seen_clip,
          seen_llava, seen_text);
    const mmb__family *row = NULL;
    write_config("fam_row", "{\"model_type\":\"qwen2_vl\"}");
    CHECK(match_dir(ctx, "fam_row", &row) == MMB_OK && strcmp(row->name, "qwen2_vl") == 0 && row->ops,
          "model_type alone");
    write_config("fam_row", "{\"architectures\":[\"SomeLlavaForCausalLM\"],\"mm_projector_type\":\"linear\"}");
    CHECK(match_dir(ctx, "fam_row", &row) == MMB_OK && row->layout == MMB__LAYOUT_ORIGINAL && row->lm_runs,
          "original LLaVA by its keys");
    write_config("fam_row", "{\"architectures\":[\"IdeficsForVisionText2Text\"]}");
    CHECK(match_dir(ctx, "fam_row", &row) == MMB_OK && row->fusion == MMB_FUSION_A && row->lm_runs &&
          row->xattn && strcmp(row->xattn, "idefics") == 0, "IDEFICS: fusion A, its LLM run with IDEFICS' gated layers");
    write_config("fam_row", "{\"model_type\":\"mllama\"}");
    CHECK(match_dir(ctx, "fam_row", &row) == MMB_OK && strcmp(row->name, "mllama") == 0 &&
          row->fusion == MMB_FUSION_A && row->ops == &mmb__family_mllama,
          "Llama 3.2 Vision: fusion A, its own tower and projector");
    /* aspect_ratio_ids: get_all_supported_aspect_ratios(4) = (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1) (4,1), from 1 */
    static const int ratios4[8][2] = {{1, 1}, {1, 2}, {1, 3}, {1, 4}, {2, 1}, {2, 2}, {3, 1}, {4, 1}};
    for (int i = 0; i < 8; i++)
        CHECK(mmb__mllama_aspect_id(4, ratios4[i][0], ratios4[i][1]) == i + 1, "aspect id of %dx%d", ratios4[i][0],
              ratios4[i][1]);
    CHECK(mmb__mllama_aspect_id(4, 2, 3) == 0 && mmb__mllama_aspect_id(2, 2, 1) == 3 &&
          mmb__mllama_aspect_id(1, 1, 1) == 1 && mmb__mllama_aspect_id(1, 1, 2) == 0, "aspect ids, 1 and 2 tiles");
}

/* A CLIPVisionModel of one block (width 8, 28 px, patch 14): its row is the tower alone, mmb_vit_open
 * opens it and mmb_model_open says it has no connector. */
static void test_tower_alone(mmb_ctx *ctx) {
    const char *dir = "fam_clip";
    write_config(dir, "{\"architectures\":[\"CLIPVisionModel\"],\"model_type\":\"clip_vision_model\","
                      "\"hidden_size\":8,\"intermediate_size\":16,\"num_hidden_layers\":1,\"num_attention_heads\":2,"
                      "\"image_size\":28,\"patch_size\":14}");
    static const char *const names[] = {
        "embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
        "pre_layrnorm.weight", "pre_layrnorm.bias", "post_layernorm.weight", "post_layernorm.bias",
        "encoder.layers.0.self_attn.q_proj.weight", "encoder.layers.0.self_attn.q_proj.bias",
        "encoder.layers.0.self_attn.k_proj.weight", "encoder.layers.0.self_attn.k_proj.bias",
        "encoder.layers.0.self_attn.v_proj.weight", "encoder.layers.0.self_attn.v_proj.bias",
        "encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.self_attn.out_proj.bias",
        "encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.mlp.fc1.bias", "encoder.layers.0.mlp.fc2.weight",
        "encoder.layers.0.mlp.fc2.bias", "encoder.layers.0.layer_norm1.weight", "encoder.layers.0.layer_norm1.bias",
        "encoder.layers.0.layer_norm2.weight", "encoder.layers.0.layer_norm2.bias"};
    static const int64_t shapes[][4] = {{8}, {8, 3, 14, 14}, {5, 8}, {8}, {8}, {8}, {8}, {8, 8}, {8}, {8, 8}, {8},
                                        {8, 8}, {8}, {8, 8}, {8}, {16, 8}, {16}, {8, 16}, {8}, {8}, {8}, {8}, {8}};
    enum { N = sizeof names / sizeof names[0] };
    static float data[8 * 3 * 14 * 14];
    for (size_t i = 0; i < sizeof data / sizeof data[0]; i++) data[i] = 0.01f;
    mmb_tensor t[N];
    char full[N][96];
    for (int i = 0; i < N; i++) {
        snprintf(full[i], sizeof full[i], "vision_model.%s", names[i]);
        t[i] = (mmb_tensor){.name = full[i], .dtype = MMB_F32, .ndim = shapes[i][1] ? (shapes[i][2] ? 4 : 2) : 1,
                            .data = data};
        memcpy(t[i].shape, shapes[i], sizeof shapes[i]);
    }
    CHECK(mmb_st_write(ctx, "fam_clip/model.safetensors", t, N) == MMB_OK, "write: %s", mmb_ctx_error(ctx));
    const mmb__family *row = NULL;
    CHECK(match_dir(ctx, dir, &row) == MMB_OK && strcmp(row->name, "clip") == 0 && row->vision_only &&
          row->fusion == MMB_FUSION_NONE && !row->ops, "the clip row");
    mmb_vit *v = NULL;
    CHECK(mmb_vit_open(ctx, dir, &v) == MMB_OK, "opens: %s", mmb_ctx_error(ctx));
    mmb_vit_info vi;
    CHECK(v && mmb_vit_get_info(v, &vi) == MMB_OK && strcmp(vi.family, "clip") == 0 && vi.tokens == 5, "its tower");
    mmb_vit_free(v);
    mmb_model *m = NULL;
    CHECK(mmb_model_open(ctx, dir, &m) == MMB_ERR_UNSUPPORTED && strstr(mmb_ctx_error(ctx), "vision tower alone"),
          "no connector: %s", mmb_ctx_error(ctx));
}

/* The names, in registry order, are the registered ops' own lists; each builds through its ops. */
static void test_connector_names(void) {
    static const char *const want[] = {"identity", "linear", "mlpNx_gelu", "llava", "simple_res", "dense_sti",
                                       "dense_sci", "dense_dci", "c-abs", "ldpnet", "ldpnetv2", "moe_mlpNx_gelu",
                                       "lowrank", "lowrank_mlp2x_gelu", "flamingo_perceiver"};
    const char *const *names;
    int n = mmb_connector_names(&names), k = 0;
    CHECK(n == (int)(sizeof want / sizeof want[0]), "%d names", n);
    for (int i = 0; i < n && i < (int)(sizeof want / sizeof want[0]); i++)
        CHECK(strcmp(names[i], want[i]) == 0, "name %d: %s, expected %s", i, names[i], want[i]);
    while (k < n) {  /* consecutive runs: one ops table's names */
        const mmb_connector_ops *ops = mmb__connector_find(strcmp(names[k], "mlpNx_gelu") == 0 ? "mlp2x_gelu"
                                                           : strcmp(names[k], "moe_mlpNx_gelu") == 0 ? "moe_mlp2x_gelu"
                                                                                                     : names[k]);
        CHECK(ops && ops->names, "%s is registered", names[k]);
        if (!ops || !ops->names) return;
        for (const char *const *p = ops->names; *p; p++, k++)
            CHECK(k < n && strcmp(names[k], *p) == 0, "%s lists %s", ops->name, *p);
    }
    CHECK(!mmb__connector_find("qformer") && !mmb__connector_find("patch_merger"), "family connectors not registered");
}

int main(void) {
    mmb_ctx *ctx = NULL;
    mmb_ctx_params cp = mmb_ctx_default_params();
    cp.n_threads = 1;
    if (mmb_ctx_new(&cp, &ctx) != MMB_OK) return 1;
    test_refusals(ctx);
    test_rows(ctx);
    test_tower_alone(ctx);
    test_connector_names();
    mmb_ctx_free(ctx);
    return DONE("test_families");
}
