"""LlavaMultiModalProjector from transformers checkpoints (both key layouts), checked against
LlavaForConditionalGeneration.get_image_features on the same pixel values."""
import itertools

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from conftest import TEXT, VISION, connect, save_features, scaled_err

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def make_llava(tmp_path, act="gelu", layer=-2, strategy="default", bias=True, dtype="f32", seed=0):
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**TEXT),
                      projector_hidden_act=act, vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy, multimodal_projector_bias=bias,
                      image_token_index=127)
    model = LlavaForConditionalGeneration(cfg).eval()
    # Non-trivial biases: transformers initialises them to zero.
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.2)
    model = model.to(DTYPES[dtype])
    d = tmp_path / "llava"
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def features_and_reference(model, layer, strategy):
    """Pixels -> (every hidden state of the model's own tower, reference image features from
    get_image_features), both computed by transformers in the model's dtype."""
    torch.manual_seed(1)
    dt = next(model.parameters()).dtype
    pixels = torch.randn(2, 3, VISION["image_size"], VISION["image_size"]).to(dt)
    with torch.no_grad():
        hs = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        out = model.get_image_features(pixel_values=pixels, vision_feature_layer=layer,
                                       vision_feature_select_strategy=strategy)
    feats = torch.stack(list(out.pooler_output)) if hasattr(out, "pooler_output") else out
    return pixels, hs, feats


@pytest.mark.parametrize("act,layer,strategy,bias", [
    ("gelu", -2, "default", True),
    ("gelu_pytorch_tanh", -1, "full", True),
    ("quick_gelu", 1, "default", False),
    ("silu", [0, -2], "default", True),
    ("gelu", [-1, 1, 2], "full", False),
])
def test_fp32_matches_transformers(tmp_path, act, layer, strategy, bias):
    model, d = make_llava(tmp_path, act, layer, strategy, bias)
    pixels, hs, ref = features_and_reference(model, layer, strategy)
    assert hs is not None and len(hs) == VISION["num_hidden_layers"] + 1
    save_features(tmp_path / "f.safetensors", hs)
    got, p = connect(d, tmp_path / "f.safetensors", tmp_path / "out.safetensors")
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = scaled_err(got, ref)
    print(f"{act} layer={layer} {strategy} bias={bias}: scaled max err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("gemm", ["naive", "own", "openblas"])
@pytest.mark.parametrize("threads", [1, 3])
def test_every_gemm_backend_and_thread_count(tmp_path, gemm, threads):
    model, d = make_llava(tmp_path, "gelu", -2, "default", True)
    _, hs, ref = features_and_reference(model, -2, "default")
    save_features(tmp_path / "f.safetensors", hs)
    got, _ = connect(d, tmp_path / "f.safetensors", tmp_path / "o.safetensors", "--gemm", gemm,
                     "--threads", threads)
    assert scaled_err(got, ref) <= 1e-4


@pytest.mark.parametrize("layout,expect", [("saved", "transformers-legacy"), ("newer", "transformers"),
                                           ("hub", "transformers-legacy")])
def test_every_key_layout(tmp_path, layout, expect):
    from conftest import run, write_layout
    model, d = make_llava(tmp_path, "gelu", -2, "default", True)
    write_layout(model, d, layout)
    assert f"layout:           {expect}\n" in run("info", d).stdout
    _, hs, ref = features_and_reference(model, -2, "default")
    save_features(tmp_path / "f.safetensors", hs)
    got, _ = connect(d, tmp_path / "f.safetensors", tmp_path / "o.safetensors")
    assert scaled_err(got, ref) <= 1e-4


@pytest.mark.parametrize("dtype,native_bound", [("f16", 5e-3), ("bf16", 3e-2)])
def test_half_precision_weights(tmp_path, dtype, native_bound):
    """f16/bf16 weights are widened to f32 once at load. Against the same weights run in f32 by
    torch the result must match to 1e-4; against torch computing natively in the half type the
    error is reported and bounded."""
    model, d = make_llava(tmp_path, "gelu", -2, "default", True, dtype=dtype)
    pixels, hs_half, ref_half = features_and_reference(model, -2, "default")
    model32 = model.float()
    _, hs, ref32 = features_and_reference(model32, -2, "default")
    save_features(tmp_path / "f.safetensors", hs)
    got, _ = connect(d, tmp_path / "f.safetensors", tmp_path / "o.safetensors")
    err32 = scaled_err(got, ref32)
    err_native = scaled_err(got, ref_half.float())
    cos = torch.nn.functional.cosine_similarity(got.flatten().double(), ref_half.flatten().double(), dim=0).item()
    print(f"{dtype} weights: vs f32 torch on the same weights {err32:.2e}; vs torch native {dtype}: "
          f"scaled max err {err_native:.2e}, cosine {cos:.6f}")
    assert err32 <= 1e-4
    assert err_native <= native_bound
    assert cos >= 0.999


def test_info_transformers_layout(tmp_path):
    from conftest import run
    make_llava(tmp_path, "quick_gelu", [0, -2], "full", True)
    out = run("info", tmp_path / "llava").stdout
    grid = (VISION["image_size"] // VISION["patch_size"]) ** 2
    tokens = grid + 1  # "full" keeps CLS
    d_in, d = 2 * VISION["hidden_size"], TEXT["hidden_size"]
    assert "LlavaForConditionalGeneration" in out and "layout:           transformers-legacy" in out
    assert "quick_gelu" in out and "hidden_states[0, -2]" in out
    assert f"tokens per image: {tokens}\n" in out
    assert f"parameters:       {d_in * d + d + d * d + d}\n" in out
    assert f"{2 * tokens * (d_in * d + d * d) * 1e-9:.3f} GFLOP" in out
