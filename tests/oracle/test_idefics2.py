"""Idefics2 (Idefics2ForConditionalGeneration) and Idefics3 / SmolVLM (Idefics3ForConditionalGeneration):
tower + connector end to end, `mmbridge encode --pixels` against transformers' get_image_features on
tiny random checkpoints made with save_pretrained (norms and latents randomised), full images of the
tower's image_size with an all-ones pixel_attention_mask."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run, scaled_err, write_json

TEXT = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128, rms_norm_eps=1e-5)
PERCEIVER = dict(hidden_size=48, rms_norm_eps=1e-5, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4,
                 resampler_head_dim=8, num_key_value_heads=2)


def vision(image, patch):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image,
                patch_size=patch)


def randomize(model, seed):
    """Norm weights (and LayerNorm biases) away from 1/0, latents away from their torch.ones init, so a
    missing norm or latents taken as ones shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) - 0.5)
        for name, p in model.named_parameters():
            # latents; position embeddings at the scale of the patch embeddings, so wrong ids show
            if name.endswith(("perceiver_resampler.latents", "position_embedding.weight")):
                p.copy_(torch.randn(p.shape, generator=g))


def build(d, family, image=28, patch=14, scale=2, seed=0, bare=False):
    """A tiny Idefics2/Idefics3/SmolVLMForConditionalGeneration saved in d (with bare, only its inner
    *Model, whose keys lack the "model." prefix); returns the ForConditionalGeneration model (eval, fp32)."""
    from transformers import (Idefics2Config, Idefics2ForConditionalGeneration, Idefics3Config,
                              Idefics3ForConditionalGeneration, SmolVLMConfig, SmolVLMForConditionalGeneration)
    torch.manual_seed(seed)
    if family == "idefics2":
        cfg = Idefics2Config(text_config=TEXT, vision_config=vision(image, patch), perceiver_config=PERCEIVER)
        model = Idefics2ForConditionalGeneration(cfg)
    else:
        cls, mcls = ((Idefics3Config, Idefics3ForConditionalGeneration) if family == "idefics3" else
                     (SmolVLMConfig, SmolVLMForConditionalGeneration))
        model = mcls(cls(text_config=TEXT, vision_config=vision(image, patch), scale_factor=scale))
    model.eval()
    randomize(model, seed + 1)
    (model.model if bare else model).save_pretrained(str(d))
    return model


def reference(model, pixels):
    """get_image_features for pixel_values [1, n, 3, S, S] with an all-ones pixel_attention_mask:
    (n, tokens, d_model)."""
    n, _, h, w = pixels.shape
    mask = torch.ones(1, n, h, w, dtype=torch.long)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels[None], pixel_attention_mask=mask)
    feats = out.pooler_output[0]
    return feats.reshape(n, -1, feats.shape[-1])


def encode(tmp_path, d, pixels, check=True):
    px, out = tmp_path / "px.safetensors", tmp_path / "out.safetensors"
    save_file({"pixel_values": pixels.contiguous()}, str(px))
    p = run("encode", d, "--pixels", px, "-o", out, check=check)
    return (load_file(str(out))["embeddings"] if p.returncode == 0 else None), p, out


def pixel_shuffle_swapped(x, s):
    """The pixel shuffle with the two permutes' roles exchanged (vertical neighbours packed first): a
    plausible wrong order that the comparison must reject."""
    b, t, d = x.shape
    g = int(t ** 0.5)
    x = x.view(b, g, g, d).transpose(1, 2).reshape(b, g, g // s, d * s).permute(0, 2, 1, 3)
    return x.reshape(b, g // s, g // s, d * s * s).permute(0, 2, 1, 3).reshape(b, t // (s * s), d * s * s)


@pytest.mark.parametrize("family,image,scale,bare", [("idefics3", 28, 2, False), ("idefics3", 56, 2, False),
                                                     ("idefics3", 56, 4, False), ("smolvlm", 56, 2, False),
                                                     ("idefics3", 28, 2, True)])
def test_idefics3_encode(tmp_path, family, image, scale, bare):
    d = tmp_path / "m"
    model = build(d, family, image=image, scale=scale, bare=bare)
    pixels = torch.randn(2, 3, image, image)
    ref = reference(model, pixels)
    got, p, _ = encode(tmp_path, d, pixels)
    g = image // 14
    assert got.shape == (2, g * g // scale ** 2, TEXT["hidden_size"]) == ref.shape
    err = scaled_err(got, ref)
    print(f"{family}{' (bare model)' if bare else ''} image {image} scale {scale}: max scaled error {err:.3g}")
    assert info(d)["family"] == family
    assert err <= 1e-4, err
    # The comparison tells pixel-shuffle orders apart: the swapped one is far off.
    with torch.no_grad():
        hs = model.model.vision_model(pixel_values=pixels).last_hidden_state
        wrong = model.model.connector.modality_projection(pixel_shuffle_swapped(hs, scale))
    assert scaled_err(got, wrong) > 1e-2


@pytest.mark.parametrize("image,bare", [(28, False), (56, False), (28, True)])
def test_idefics2_encode(tmp_path, image, bare):
    d = tmp_path / "m"
    model = build(d, "idefics2", image=image, bare=bare)
    pixels = torch.randn(3, 3, image, image)
    ref = reference(model, pixels)
    got, p, _ = encode(tmp_path, d, pixels)
    assert got.shape == (3, PERCEIVER["resampler_n_latents"], TEXT["hidden_size"]) == ref.shape
    err = scaled_err(got, ref)
    print(f"idefics2{' (bare model)' if bare else ''} image {image}: max scaled error {err:.3g}")
    assert err <= 1e-4, err
    # Latents taken as torch.ones (their init) instead of the checkpoint's would be far off.
    with torch.no_grad():
        lat = model.model.connector.perceiver_resampler.latents
        keep = lat.clone()
        lat.fill_(1.0)
        ones = reference(model, pixels)
        lat.copy_(keep)
    assert scaled_err(got, ones) > 1e-2


def torch_position_ids(n):
    """transformers' position ids for a full image of an n x n patch grid, as torch computes them here."""
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings
    from transformers import Idefics2VisionConfig
    emb = Idefics2VisionEmbeddings(Idefics2VisionConfig(hidden_size=4, image_size=n, patch_size=1))
    captured = {}
    emb.position_embedding.register_forward_hook(lambda m, i, o: captured.update(ids=i[0]))
    with torch.no_grad():
        emb(torch.zeros(1, 3, n, n), torch.ones(1, n, n, dtype=torch.bool))
    return captured["ids"][0]


def test_bucketed_positions(tmp_path):
    """A 31x31 grid, where torch's bucketize of float32 fractional coordinates does not give arange (on
    torch's 8- and 16-lane CPU paths alike): mmbridge must reproduce those ids, not assume arange. Idefics3
    with scale_factor 1, so each output token is its own patch's (no pooling dilutes a wrong id)."""
    ids = torch_position_ids(31)
    assert not torch.equal(ids, torch.arange(31 * 31)), "this grid no longer exercises the bucketize path"
    assert torch.equal(torch_position_ids(26), torch.arange(26 * 26))  # Idefics3-8B's 364/14 grid is arange
    d = tmp_path / "m"
    model = build(d, "idefics3", image=62, patch=2, scale=1, seed=3)
    pixels = torch.randn(1, 3, 62, 62)
    ref = reference(model, pixels)
    got, _, _ = encode(tmp_path, d, pixels)
    err = scaled_err(got, ref)
    print(f"idefics3 31x31 grid (bucketized position ids): max scaled error {err:.3g}")
    assert err <= 1e-4, err
    # With arange ids the output differs: the test sees the position ids.
    pe = model.model.vision_model.embeddings.position_embedding
    hook = pe.register_forward_pre_hook(lambda m, args: (torch.arange(31 * 31)[None],))
    try:
        wrong = reference(model, pixels)
    finally:
        hook.remove()
    assert scaled_err(got, wrong) > 1e-2


def info(d):
    out = {}
    for line in run("info", d).stdout.splitlines():
        k, _, v = line.partition(":")
        out[k.strip()] = v.strip()
    return out


@pytest.mark.parametrize("family", ["idefics2", "idefics3"])
def test_info(tmp_path, family):
    d = tmp_path / "m"
    model = build(d, family, image=56)
    inf = info(d)
    conn = model.model.connector
    arch = "Idefics2ForConditionalGeneration" if family == "idefics2" else "Idefics3ForConditionalGeneration"
    assert inf["architecture"] == arch and inf["family"] == family
    assert inf["connector"].startswith("idefics2" if family == "idefics2" else "pixel_shuffle")
    assert inf["parameters"] == str(sum(p.numel() for p in conn.parameters()))
    tokens = PERCEIVER["resampler_n_latents"] if family == "idefics2" else 16 // 4
    assert inf["tokens per image"] == str(tokens)
    assert inf["output width"] == str(TEXT["hidden_size"]) and inf["input width"] == "32"
    assert inf["vision encoder"].startswith("2 layers, width 32, image 56, patch 14")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint of each family, copied by the bad-input tests before they break it."""
    root = tmp_path_factory.mktemp("idefics_saved")
    for fam in ("idefics2", "idefics3"):
        build(root / fam, fam, image=56)
    return root


def broken(saved, tmp_path, family, edit_tensors=None, edit_config=None):
    d = tmp_path / "m"
    shutil.copytree(saved / family, d)
    if edit_tensors:
        sd = load_file(str(d / "model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((d / "config.json").read_text())
        edit_config(cfg)
        write_json(d / "config.json", cfg)
    return d


def fails(tmp_path, d, *needles, size=56):
    _, p, out = encode(tmp_path, d, torch.randn(1, 3, size, size), check=False)
    assert p.returncode != 0 and not out.exists(), p.stdout
    for n in needles:
        assert n in p.stderr, p.stderr
    return p.stderr


@pytest.mark.parametrize("family,name", [
    ("idefics2", "model.connector.perceiver_resampler.layers.1.self_attn.k_proj.weight"),
    ("idefics2", "model.connector.perceiver_resampler.latents"),
    ("idefics2", "model.vision_model.post_layernorm.weight"),
    ("idefics3", "model.connector.modality_projection.proj.weight"),
])
def test_missing_tensor(saved, tmp_path, family, name):
    d = broken(saved, tmp_path, family, edit_tensors=lambda sd: sd.pop(name))
    fails(tmp_path, d, name, "missing")


@pytest.mark.parametrize("family,name,shape", [
    ("idefics2", "model.connector.perceiver_resampler.latents", (5, 48)),
    ("idefics2", "model.connector.perceiver_resampler.layers.0.self_attn.k_proj.weight", (32, 48)),
    ("idefics3", "model.connector.modality_projection.proj.weight", (48, 64)),
])
def test_wrong_shape(saved, tmp_path, family, name, shape):
    d = broken(saved, tmp_path, family, edit_tensors=lambda sd: sd.__setitem__(name, torch.zeros(shape)))
    fails(tmp_path, d, name, "shape")


def test_scale_factor_not_dividing(saved, tmp_path):
    d = broken(saved, tmp_path, "idefics3", edit_config=lambda c: c.__setitem__("scale_factor", 3))
    fails(tmp_path, d, "scale_factor", "3", "4x4")


def test_bad_perceiver_config(saved, tmp_path):
    d = broken(saved, tmp_path, "idefics2",
               edit_config=lambda c: c["perceiver_config"].__setitem__("num_key_value_heads", 3))
    fails(tmp_path, d, "num_key_value_heads")


def test_wrong_pixel_size(saved, tmp_path):
    for fam in ("idefics2", "idefics3"):
        err = fails(tmp_path, saved / fam, "full, unpadded images", "56x56", size=42)
        assert "42x42" in err


def test_image_file_needs_pixels(saved, tmp_path):
    """The image path refuses the Idefics processors (image splitting, longest-edge resize, padding are
    not implemented) with a message naming the class; --pixels is the way in."""
    from PIL import Image
    d = tmp_path / "m"
    shutil.copytree(saved / "idefics3", d)
    write_json(d / "preprocessor_config.json", {"image_processor_type": "Idefics3ImageProcessor",
                                                "do_image_splitting": False})
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(img)
    out = tmp_path / "o.safetensors"
    p = run("encode", d, img, "-o", out, check=False)
    assert p.returncode != 0 and not out.exists()
    assert "Idefics3ImageProcessor" in p.stderr and "not supported" in p.stderr, p.stderr
