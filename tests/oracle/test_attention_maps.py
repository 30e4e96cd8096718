"""`mmbridge attention`: each block's attention maps of a CLIP / SigLIP tower (mmb_vit_attention) against
transformers' output_attentions (eager attention), on standalone towers and on a LLaVA checkpoint's CLIP tower
through its image processor; the picture (a PNG of the documented grid); bad input refused with nothing written."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel)

from conftest import TEXT, fails, run, scaled_err

# 3 blocks, 4 heads of 8, a 3x3 patch grid (42 / 14): 9 patches (+ CLS for CLIP).
TOWER = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, image_size=42,
             patch_size=14)
G = TOWER["image_size"] // TOWER["patch_size"]
L = TOWER["num_hidden_layers"]


def sharpen(model, seed=1):
    """Random LayerNorms, and q / k projections large enough that the softmax is far from uniform, so that the
    layers', heads' and queries' maps differ (transformers' init gives near-uniform attention)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.copy_(0.5 + 0.3 * torch.randn(p.shape, generator=g))
            elif "q_proj" in name or "k_proj" in name:
                p.copy_(0.4 * torch.randn(p.shape, generator=g))


def reference(attentions, cls):
    """The documented definition on transformers' output_attentions (L tensors [b, heads, q, k]): [b, L, patches]."""
    maps = [a[:, :, 0, 1:].mean(1) if cls else a.mean(1).mean(1) for a in attentions]
    return torch.stack(maps, 1)


def attention(model_dir, out_dir, *args):
    raw, png = out_dir / "maps.safetensors", out_dir / "maps.png"
    p = run("attention", model_dir, *args, "--raw", raw, "-o", png, "--threads", 2)
    with safe_open(str(raw), "pt") as f:
        meta = f.metadata()
    return load_file(str(raw))["attention"], meta, png, p


def check_png(png, layers, tile=160, cols=None):
    cols = cols or int(np.ceil(np.sqrt(layers + 1)))
    rows = -(-(layers + 1) // cols)
    im = Image.open(png)
    im.load()
    assert im.format == "PNG" and im.mode == "RGB"
    assert im.size == (8 + cols * (tile + 8), 22 + rows * (tile + 20)), im.size
    return np.asarray(im)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_tower_maps_match_output_attentions(tmp_path, family):
    torch.manual_seed(0)
    if family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**TOWER, attn_implementation="eager"))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**TOWER, vision_use_head=False, attn_implementation="eager"))
    model.eval()
    sharpen(model)
    model.save_pretrained(tmp_path / "tower")
    px = torch.randn(2, 3, TOWER["image_size"], TOWER["image_size"])
    save_file({"pixel_values": px}, str(tmp_path / "px.safetensors"))
    with torch.no_grad():
        att = model(pixel_values=px, output_attentions=True).attentions
    assert len(att) == L and att[0].shape[-1] == G * G + (family == "clip")
    cls = family == "clip"
    ref = reference(att, cls)
    got, meta, png, p = attention(tmp_path / "tower", tmp_path, "--pixels", tmp_path / "px.safetensors")
    assert got.shape == (2, L, G * G) and meta["kind"] == ("cls" if cls else "mean_query")
    assert meta["grid"] == f"{G},{G}"
    err = scaled_err(got, ref)
    print(f"{family}: attention maps vs output_attentions {err:.2e}; {p.stderr.strip()}")
    assert err <= 1e-4
    # each map sums to 1 (SigLIP) or 1 minus the CLS's attention to itself (CLIP)
    self_cls = torch.stack([a[:, :, 0, 0].mean(1) for a in att], 1) if cls else torch.zeros(2, L)
    assert torch.allclose(got.sum(-1), 1 - self_cls, atol=1e-5)
    # wrong variants are far off: the next layer, one head alone, the pre-softmax scores (log-probabilities), the
    # other definition (CLS row vs mean over queries), the CLS column kept instead of the last patch's
    wrong = {"next layer": torch.roll(ref, 1, dims=1),
             "head 0 alone": torch.stack([a[:, 0, 0, 1:] if cls else a[:, 0].mean(1) for a in att], 1),
             "scores": torch.stack([(a[:, :, 0, 1:] if cls else a.mean(2)).log().mean(1) for a in att], 1),
             "other definition": torch.stack([a.mean(1).mean(1)[:, 1:] if cls else a[:, :, 0].mean(1)
                                              for a in att], 1)}
    if cls:
        wrong["CLS column kept"] = torch.stack([a[:, :, 0, :-1].mean(1) for a in att], 1)
    for name, w in wrong.items():
        e = scaled_err(got, w)
        print(f"  {name}: {e:.2e}")
        assert e > 1e-2, name
    check_png(png, L)
    assert f"{G}x{G}" in p.stderr


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A LLaVA checkpoint (CLIP tower, its CLIPImageProcessor saved beside it) and an image file."""
    d = tmp_path_factory.mktemp("attn") / "llava"
    torch.manual_seed(0)
    vision = CLIPVisionConfig(**TOWER)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), vision_feature_layer=-2,
                      image_token_index=127)
    model = LlavaForConditionalGeneration(cfg).eval()
    sharpen(model.model.vision_tower)
    model.save_pretrained(d)
    size = TOWER["image_size"]
    proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    proc.save_pretrained(d)
    rs = np.random.RandomState(3)
    img = d.parent / "img.png"
    Image.fromarray(rs.randint(0, 256, (61, 50, 3), dtype=np.uint8)).save(img)
    return model, proc, d, img


def test_llava_tower_through_the_processor(llava, tmp_path):
    model, proc, d, img = llava
    px = proc(images=Image.open(img).convert("RGB"), return_tensors="pt")["pixel_values"]
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    with torch.no_grad():
        att = tower(px, output_attentions=True).attentions
    ref = reference(att, True)
    got, meta, png, p = attention(d, tmp_path, img)
    err = scaled_err(got, ref)
    print(f"llava's CLIP tower, image through the processor: {err:.2e}")
    assert got.shape == (1, L, G * G) and err <= 1e-4
    assert scaled_err(got, torch.roll(ref, 1, dims=1)) > 1e-2
    # the picture: the grid of the image and a tile per layer; the layer tiles are tinted by the heat map
    a = check_png(png, L)
    assert a[22 + 20 + 80, 8 + 80].tolist() != a[22 + 20 + 80, 8 + 168 + 80].tolist()
    # --cols and --tile change the grid as documented
    p = run("attention", d, img, "-o", tmp_path / "small.png", "--cols", 4, "--tile", 64)
    check_png(tmp_path / "small.png", L, tile=64, cols=4)


def test_bad_input_writes_nothing(llava, tmp_path):
    _, _, d, img = llava
    out, raw = tmp_path / "o.png", tmp_path / "o.safetensors"
    notimg = tmp_path / "notes.png"
    notimg.write_text("this is text, not a picture\n")
    for args, needle in [([tmp_path / "missing.png"], "missing.png"), ([notimg], "notes.png"),
                         ([tmp_path], str(tmp_path))]:
        p = fails(["attention", d, *args, "-o", out, "--raw", raw], needle)
        assert p.returncode == 1, p.stderr
        assert not out.exists() and not raw.exists()
        assert not [f for f in tmp_path.iterdir() if f.name.startswith(".mmb-")]
    # usage errors: exit 2, nothing written
    p = run("attention", d, img, check=False)  # neither -o nor --raw
    assert p.returncode == 2 and "-o" in p.stderr
    p = run("attention", d, "-o", out, check=False)  # neither IMAGE nor --pixels
    assert p.returncode == 2 and not out.exists()
    # pixels of the wrong size
    save_file({"pixel_values": torch.zeros(1, 3, 28, 28)}, str(tmp_path / "px.safetensors"))
    fails(["attention", d, "--pixels", tmp_path / "px.safetensors", "-o", out], "pixel_values")
    assert not out.exists()


def test_blip2_tower_and_a_family_model(tmp_path):
    """A standalone Blip2VisionModel (CLS, one fused qkv with its q | 0 | v bias) gives its maps too; a whole
    BLIP-2 model, whose tower runs inside its own encode, is refused with a message and nothing written."""
    from transformers import Blip2VisionConfig, Blip2VisionModel
    from test_blip2 import make_blip2
    torch.manual_seed(1)
    cfg = Blip2VisionConfig(**TOWER, qkv_bias=True, layer_norm_eps=1e-5, attn_implementation="eager")
    tower = Blip2VisionModel(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            p.copy_((0.5 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    tower.save_pretrained(tmp_path / "tower")
    px = torch.randn(2, 3, TOWER["image_size"], TOWER["image_size"])
    save_file({"pixel_values": px}, str(tmp_path / "px.safetensors"))
    with torch.no_grad():
        att = tower(pixel_values=px, output_attentions=True).attentions
    ref = reference(att, True)
    got, meta, _, _ = attention(tmp_path / "tower", tmp_path, "--pixels", tmp_path / "px.safetensors")
    err = scaled_err(got, ref)
    print(f"blip2 tower: {err:.2e}")
    assert meta["family"] == "blip2" and err <= 1e-4
    assert scaled_err(got, torch.roll(ref, 1, dims=1)) > 1e-2
    make_blip2(tmp_path / "blip2")
    out = tmp_path / "b.png"
    fails(["attention", tmp_path / "blip2", "--pixels", tmp_path / "px.safetensors", "-o", out], "its own encode")
    assert not out.exists()
