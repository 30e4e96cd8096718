"""`mmbridge encode MODEL IMAGE...` end to end: image files -> the checkpoint's own image processor
-> ViT -> feature selection -> projector, against transformers running its processor on the same
files and LlavaForConditionalGeneration.get_image_features on the result."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaImageProcessor,
                          SiglipImageProcessor, SiglipVisionConfig)

from conftest import run, scaled_err
from test_vit import TOWER, make_llava, make_original_with_tower

S = TOWER["image_size"]


def images(tmp_path):
    """A landscape JPEG, a portrait RGBA PNG and a small greyscale PNG (upscaled)."""
    rng = np.random.default_rng(0)
    paths = []
    a = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=90)
    b = rng.integers(0, 256, (120, 50, 4), dtype=np.uint8)
    Image.fromarray(b, "RGBA").save(tmp_path / "b.png")
    c = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(c, "L").save(tmp_path / "c.png")
    for n in ("a.jpg", "b.png", "c.png"):
        paths.append(tmp_path / n)
    return paths


def reference(model, processor, paths, layer, strategy):
    px = processor(images=[Image.open(p) for p in paths], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.get_image_features(pixel_values=px, vision_feature_layer=layer,
                                       vision_feature_select_strategy=strategy)
    return torch.stack(list(out.pooler_output)) if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize("kind", ["clip", "llava-pad", "siglip"])
def test_encode_images_matches_transformers(tmp_path, kind):
    if kind == "siglip":
        vision, layer, strategy = SiglipVisionConfig(**TOWER), -1, "full"
        proc = SiglipImageProcessor(size={"height": S, "width": S})
    else:
        vision, layer, strategy = CLIPVisionConfig(**TOWER), -2, "default"
        cls = LlavaImageProcessor if kind == "llava-pad" else CLIPImageProcessor
        kw = {"do_pad": True} if kind == "llava-pad" else {}
        proc = cls(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, **kw)
    d = tmp_path / "llava"
    model = make_llava(d, vision, layer, strategy)
    proc.save_pretrained(d)
    paths = images(tmp_path)
    ref = reference(model, proc, paths, layer, strategy)
    p = run("encode", d, *paths, "-o", tmp_path / "o.safetensors")
    got = load_file(str(tmp_path / "o.safetensors"))["embeddings"]
    assert got.shape == ref.shape
    err = scaled_err(got, ref)
    print(f"{kind}: encode from image files vs transformers processor + get_image_features: {err:.2e}")
    assert err <= 1e-4
    for pth in paths:
        assert str(pth) in p.stdout


def expand2square(img, background):
    """LLaVA's expand2square (llava/mm_utils.py), written from its definition."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def test_original_layout_pad_aspect_with_tower_processor(tmp_path):
    """Original LLaVA: image_aspect_ratio "pad" pads with the processor's mean colour, and the image
    processor comes from the --vision-tower directory."""
    tower, proj = make_original_with_tower(tmp_path, image_aspect_ratio="pad")
    proc = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    proc.save_pretrained(tmp_path / "tower")
    d = tmp_path / "llava"
    paths = [images(tmp_path)[i] for i in (0, 2)]  # LLaVA's load_image drops alpha; see docs/preprocessing.md
    bg = tuple(int(x * 255) for x in proc.image_mean)
    px = proc(images=[expand2square(Image.open(p).convert("RGB"), bg) for p in paths],
              return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = proj(tower(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:])
    run("encode", d, *paths, "--vision-tower", tmp_path / "tower", "-o", tmp_path / "o.safetensors")
    got = load_file(str(tmp_path / "o.safetensors"))["embeddings"]
    err = scaled_err(got, ref)
    print(f"original layout, pad: {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("make,expect", [
    (lambda p: p.write_bytes(b""), "empty|truncated|zero"),
    (lambda p: p.write_text("not an image at all"), "format|not a"),
    (lambda p: p.mkdir(), "directory"),
])
def test_bad_image_files(tmp_path, make, expect):
    import re
    d = tmp_path / "llava"
    make_llava(d, CLIPVisionConfig(**TOWER))
    CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}).save_pretrained(d)
    bad = tmp_path / "bad.png"
    make(bad)
    good = images(tmp_path)[0]
    p = run("encode", d, good, bad, "-o", tmp_path / "o.safetensors", check=False)
    assert p.returncode == 1
    assert "bad.png" in p.stderr and re.search(expect, p.stderr, re.I), p.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_processor_size_must_fit_the_tower(tmp_path):
    d = tmp_path / "llava"
    make_llava(d, CLIPVisionConfig(**TOWER))
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(d)
    p = run("encode", d, images(tmp_path)[0], "-o", tmp_path / "o.safetensors", check=False)
    assert p.returncode == 1 and "28x28" in p.stderr and "42x42" in p.stderr
