"""BLIP-2 end to end against transformers: `mmbridge encode` on tiny random
Blip2ForConditionalGeneration checkpoints (save_pretrained) gives get_image_features' pooler_output
(language_projection of the Q-Former's query outputs); the Blip2VisionModel tower hidden state by
hidden state; BlipImageProcessor's pixel_values; `mmbridge info`; refused inputs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2VisionConfig, Blip2VisionModel,
                          BlipImageProcessor, OPTConfig, T5Config)

from conftest import run, scaled_err
from test_encode_images import images
from test_preprocess import driver, run_driver  # noqa: F401 (driver is a fixture)
from test_vit import pixels_file

S = 28  # image 28, patch 14: 2x2 patches + CLS = 5 image tokens
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=S,
              patch_size=14)
QFORMER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               cross_attention_frequency=2, vocab_size=16, max_position_embeddings=8)
NQ = 8
TEXTS = {
    "opt": OPTConfig(hidden_size=24, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                     max_position_embeddings=16, word_embed_proj_dim=24),
    "t5": T5Config(d_model=20, d_ff=32, d_kv=10, num_layers=1, num_decoder_layers=1, num_heads=2, vocab_size=64),
}


def randomize(model):
    """Everything but the language model away from its init (query tokens and embeddings start at ~0,
    norms at (1, 0), qkv's bias at 0): norms around 0.5, the rest N(0, 0.3)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("language_model"):
                continue
            if "norm" in name.lower():
                p.normal_(0.5, 0.3)
            else:
                p.normal_(0.0, 0.3)


def make_blip2(d, text="opt", seed=0, **qformer):
    torch.manual_seed(seed)
    cfg = Blip2Config(vision_config=VISION, qformer_config={**QFORMER, **qformer},
                      text_config=TEXTS[text].to_dict(), num_query_tokens=NQ)
    model = Blip2ForConditionalGeneration(cfg).eval()
    randomize(model)
    model.save_pretrained(d)
    return model


def rewrite(d, fn):
    """Applies fn to d/model.safetensors' dict of tensors and writes it back."""
    sd = load_file(str(d / "model.safetensors"))
    sd = fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})


def to_q_v_bias(model):
    """The hub / older transformers form: self_attn.q_bias and v_bias instead of qkv.bias (k has no bias).
    Zeroes the model's k bias so that it computes what such a checkpoint means."""
    D = VISION["hidden_size"]
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[D:2 * D] = 0

    def fn(sd):
        out = {}
        for k, v in sd.items():
            if k.endswith("self_attn.qkv.bias"):
                out[k.replace("qkv.bias", "q_bias")] = v[:D]
                out[k.replace("qkv.bias", "v_bias")] = v[2 * D:]
            else:
                out[k] = v
        return out
    return fn


def features(model, px):
    with torch.no_grad():
        return model.get_image_features(pixel_values=px).pooler_output


def encode(d, px_path, out, *extra, check=True):
    p = run("encode", d, "--pixels", px_path, "-o", out, *extra, check=check)
    return (load_file(str(out))["embeddings"] if p.returncode == 0 else None), p


@pytest.mark.parametrize("text,layout", [("opt", "saved"), ("opt", "q_v_bias"), ("opt", "model_prefix"),
                                         ("t5", "saved"), ("opt", "bf16")])
def test_encode_matches_get_image_features(tmp_path, text, layout):
    d = tmp_path / "blip2"
    model = make_blip2(d, text)
    if layout == "q_v_bias":
        rewrite(d, to_q_v_bias(model))
    elif layout == "model_prefix":
        rewrite(d, lambda sd: {k if k.startswith("language_model") else "model." + k: v for k, v in sd.items()})
    elif layout == "bf16":  # bf16 weights, widened at load: the reference runs the same rounded weights in f32
        with torch.no_grad():
            for q in model.parameters():
                q.copy_(q.bfloat16().float())
        rewrite(d, lambda sd: {k: v.bfloat16() for k, v in sd.items()})
    px = pixels_file(tmp_path / "px.safetensors", 3, S)
    ref = features(model, px)
    got, p = encode(d, tmp_path / "px.safetensors", tmp_path / "o.safetensors", "--threads", "2")
    assert got.shape == ref.shape == (3, NQ, model.config.text_config.hidden_size)
    err = scaled_err(got, ref)
    print(f"blip2 {text} {layout}: encode vs get_image_features {err:.2e} (max |ref| {ref.abs().max():.2f})")
    assert err <= 1e-4
    assert p.stdout.count("image ") == 3
    if layout == "bf16":
        assert "weights:          BF16" in run("info", d).stdout
    if layout == "q_v_bias":
        # The test sees where v_bias goes: in k's third (where a bias cancels in the softmax) it moves the result.
        D = VISION["hidden_size"]
        with torch.no_grad():
            for layer in model.vision_model.encoder.layers:
                b = layer.self_attn.qkv.bias
                b[D:2 * D], b[2 * D:] = b[2 * D:].clone(), 0
        assert scaled_err(got, features(model, px)) > 1e-3


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vision_tower_every_hidden_state(tmp_path, qkv_bias):
    """A standalone Blip2VisionModel: every hidden state, and last_hidden_state = post_layernorm of all tokens."""
    torch.manual_seed(1)
    tower = Blip2VisionModel(Blip2VisionConfig(**VISION, qkv_bias=qkv_bias, layer_norm_eps=1e-5)).eval()
    randomize(tower)
    tower.save_pretrained(tmp_path / "tower")
    px = pixels_file(tmp_path / "px.safetensors", 2, S)
    with torch.no_grad():
        ref = tower(pixel_values=px, output_hidden_states=True)
    p = run("encode", tmp_path / "tower", "--pixels", tmp_path / "px.safetensors", "-o", tmp_path / "o.safetensors",
            "--taps", "0,1,2")
    got = load_file(str(tmp_path / "o.safetensors"))
    assert len(ref.hidden_states) == 3 and "blip2" in p.stdout
    want = {**{f"hidden_states.{i}": h for i, h in enumerate(ref.hidden_states)},
            "last_hidden_state": ref.last_hidden_state}
    errs = {k: scaled_err(got[k], h) for k, h in want.items()}
    print(f"blip2 tower qkv_bias={qkv_bias}: " + ", ".join(f"{k} {e:.2e}" for k, e in errs.items()))
    assert max(errs.values()) <= 1e-4
    assert scaled_err(got["hidden_states.2"], ref.last_hidden_state) > 1e-2  # the post-layernorm is applied


def test_encode_image_files_matches_processor_and_model(tmp_path, driver):  # noqa: F811
    """Image files -> BlipImageProcessor (saved into the checkpoint) -> the model, against transformers
    running the same processor and get_image_features; and the processor's pixel_values themselves."""
    d = tmp_path / "blip2"
    model = make_blip2(d)
    proc = BlipImageProcessor(size={"height": S, "width": S})
    proc.save_pretrained(d)
    paths = images(tmp_path)
    px = proc(images=[Image.open(p) for p in paths], return_tensors="pt").pixel_values
    assert px.shape == (3, 3, S, S)
    ref = features(model, px)
    p = run("encode", d, *paths, "-o", tmp_path / "o.safetensors")
    got = load_file(str(tmp_path / "o.safetensors"))["embeddings"]
    err = scaled_err(got, ref)
    print(f"blip2: encode from image files vs BlipImageProcessor + get_image_features: {err:.2e}")
    assert err <= 1e-4
    for pth in paths:
        assert str(pth) in p.stdout

    # pixel_values: the checkpoint's processor, the class defaults (384 x 384), and an int size (square for BLIP).
    dflt, intsize = tmp_path / "default", tmp_path / "intsize"
    BlipImageProcessor().save_pretrained(dflt)
    intsize.mkdir()
    (intsize / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "BlipImageProcessor",
                                                                   "size": 20}))
    procs = [proc, BlipImageProcessor(), BlipImageProcessor(size=20)]
    worst = 0.0
    for i, pth in enumerate(paths):
        out = tmp_path / f"px{i}.safetensors"
        r = run_driver(driver, out, pth, [d, dflt, intsize])
        assert r.returncode == 0, r.stderr
        got_px = load_file(str(out))
        for k, pr in enumerate(procs):
            want = pr(images=Image.open(pth), return_tensors="pt").pixel_values[0]
            assert got_px[f"pixels.{k}"].shape == want.shape
            worst = max(worst, (got_px[f"pixels.{k}"] - want).abs().max().item())
    print(f"blip2: BlipImageProcessor pixel_values max |diff| {worst:.2e}")
    assert worst <= 2e-2  # the project's preprocessing bound (1 grey level / std); measured 0


def test_info(tmp_path):
    d = tmp_path / "blip2"
    model = make_blip2(d)
    p = run("info", d)
    info = dict(line.split(":", 1) for line in p.stdout.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    assert info["architecture"] == "Blip2ForConditionalGeneration"
    assert info["family"] == "blip2"
    assert info["connector"] == "qformer, activation gelu"
    assert info["vision encoder"] == f"2 layers, width 32, image {S}, patch 14"
    assert info["input width"] == "32" and info["output width"] == "24"
    assert info["tokens per image"] == str(NQ)
    n = sum(p.numel() for name, p in model.named_parameters()
            if name.startswith(("qformer.", "query_tokens", "language_projection.")))
    assert info["parameters"] == str(n)


def test_bad_input(tmp_path):
    d = tmp_path / "blip2"
    model = make_blip2(d)
    px = tmp_path / "px.safetensors"
    pixels_file(px, 1, S)
    good = load_file(str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())

    def refused(*needles, pixels=px, code=1):
        out = tmp_path / "o.safetensors"
        p = run("encode", d, "--pixels", pixels, "-o", out, check=False)
        assert p.returncode == code, p.stderr
        for n in needles:
            assert n in p.stderr, (n, p.stderr)
        assert not out.exists()
        save_file(good, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg))

    name = "qformer.encoder.layer.1.output_query.dense.weight"
    rewrite(d, lambda sd: {k: v for k, v in sd.items() if k != name})
    refused(f"'{name}' is missing")
    rewrite(d, lambda sd: {**sd, "language_projection.weight": torch.zeros(24, 16)})
    refused("'language_projection.weight'", "[24, 16]", "[24, 32]")
    rewrite(d, lambda sd: {**sd, "qformer.encoder.layer.2.crossattention.attention.key.weight": torch.zeros(32, 16)})
    refused("crossattention.attention.key.weight", "[32, 16]", "[32, 32]")
    rewrite(d, lambda sd: {k: v for k, v in sd.items() if not k.endswith("layers.1.self_attn.qkv.bias")})
    refused("'vision_model.encoder.layers.1.self_attn.qkv.bias' (or", "q_bias", "v_bias")
    rewrite(d, lambda sd: {k: v for k, v in to_q_v_bias(model)(sd).items() if not k.endswith("layers.0.self_attn.v_bias")})
    refused("'vision_model.encoder.layers.0.self_attn.v_bias' is missing")
    rewrite(d, lambda sd: {k: v for k, v in sd.items() if k != "query_tokens"})
    refused("'query_tokens' is missing")
    (d / "config.json").write_text(json.dumps({**cfg, "qformer_config": {**cfg["qformer_config"],
                                                                         "cross_attention_frequency": 0}}))
    refused("cross_attention_frequency")
    (d / "config.json").write_text(json.dumps({**cfg, "qformer_config": {**cfg["qformer_config"],
                                                                         "num_attention_heads": 5}}))
    refused("num_attention_heads")
    pixels_file(tmp_path / "px42.safetensors", 1, 42)
    refused("42x42", "28x28", pixels=tmp_path / "px42.safetensors")
    p = run("encode", d, "--pixels", px, "-o", tmp_path / "o.safetensors", "--taps", "0", check=False)
    assert p.returncode == 2 and "--taps" in p.stderr and not (tmp_path / "o.safetensors").exists()
