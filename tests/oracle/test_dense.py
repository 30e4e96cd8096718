"""The Dense Connector (dense_sti / dense_sci / dense_dci) against a torch reference written here
from shared/specs/dense_connector.md (HJYao00/DenseConnector's dense_connector.py), with
transformers' CLIPVisionModel and SiglipVisionModel as the tower, end to end through
`mmbridge encode --pixels ... --vision-tower DIR`; the efficient form against F.interpolate; and
shapes at real sizes through `mmbridge info`."""
import copy
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from conftest import run, save_features, scaled_err
from test_vit import pixels_file

D, H = 16, 24
# ViT-L's depth (24 blocks) and so400m's (27) at a tiny width, so the reference's own indices apply.
CLIP = dict(hidden_size=D, intermediate_size=32, num_hidden_layers=24, num_attention_heads=2, image_size=56,
            patch_size=14)                     # 4x4 patches + CLS
SIGLIP = dict(hidden_size=D, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2, image_size=42,
              patch_size=14, vision_use_head=False)  # 3x3 patches: 9 // 8 = 1 pooled token per layer


def make_tower(d, family, seed=0):
    torch.manual_seed(seed)
    model = (CLIPVisionModel(CLIPVisionConfig(**CLIP)) if family == "clip"
             else SiglipVisionModel(SiglipVisionConfig(**SIGLIP))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.normal_(0.5, 0.3)
    model.save_pretrained(d)
    return model


def hidden_states(model, family, px):
    """What the DC repository's towers return: CLIP's full output; SigLIP's with the last block deleted
    (SigLipVisionModel.__init__ drops it), so its hidden_states[-1] is block L-1's output."""
    if family == "siglip":
        model = copy.deepcopy(model)
        enc = next(m for n, m in model.named_modules() if n.endswith("encoder") and hasattr(m, "layers"))
        enc.layers = enc.layers[:-1]
    with torch.no_grad():
        return model(pixel_values=px, output_hidden_states=True).hidden_states


def dense_reference(hs, family, variant, layers=(7, 15), groups=None, pool=8, final=None):
    """dense_connector(image_features, image_forward_outs, is_siglip, type) as the spec gives it."""
    cut = (lambda h: h) if family == "siglip" else (lambda h: h[:, 1:])
    feat = cut(hs[final if final is not None else (-1 if family == "siglip" else -2)])
    if variant == "sti":
        avg = nn.AvgPool1d(kernel_size=pool, stride=pool)
        dc = [avg(cut(hs[i]).permute(0, 2, 1)).permute(0, 2, 1) for i in layers]
        return torch.cat([feat] + dc, dim=-2)
    if variant == "sci":
        return torch.cat([feat] + [cut(hs[i]) for i in layers], dim=-1)
    if groups is None:
        m = 12 if family == "clip" else 13
        groups = [range(0, m), range(m, 2 * m)]
    means = [torch.stack([cut(hs[i]) for i in g], 0).sum(0) / len(g) for g in groups]
    return torch.cat([feat] + means, dim=-1)


def make_projector(d, width_in, dense_type, tower_name, seed=1):
    """An original-layout Dense Connector checkpoint: mlp2x_gelu projector, model.mm_projector.*."""
    torch.manual_seed(seed)
    proj = nn.Sequential(nn.Linear(width_in, H), nn.GELU(), nn.Linear(H, H)).eval()
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": H,
        "mm_hidden_size": width_in, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_dense_connector_type": dense_type, "mm_vision_tower": tower_name}))
    save_file({f"model.mm_projector.{k}": v.contiguous() for k, v in proj.state_dict().items()},
              str(d / "model.safetensors"))
    return proj


def setup(tmp_path, family, width_in, dense_type, n=2, model="dc"):
    """A tower, an original-layout checkpoint feeding a width_in projector, n random images; returns
    the projector and the reference's hidden states."""
    tower = make_tower(tmp_path / "tower", family)
    proj = make_projector(tmp_path / model, width_in, dense_type, "tiny-" + family)
    px = pixels_file(tmp_path / "px.safetensors", n, (CLIP if family == "clip" else SIGLIP)["image_size"])
    return proj, hidden_states(tower, family, px)


def check(got, ref, label):
    assert got.shape == ref.shape
    err = scaled_err(got, ref)
    print(f"{label}: {tuple(ref.shape)} scaled max err {err:.2e}")
    assert err <= 1e-4


def encode(tmp_path, model, tower, *extra):
    out = tmp_path / "o.safetensors"
    p = run("encode", model, "--pixels", tmp_path / "px.safetensors", "-o", out, "--vision-tower", tower, *extra)
    return load_file(str(out))["embeddings"], p


@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("variant", ["sti", "sci", "dci"])
def test_variant_matches_reference(tmp_path, family, variant):
    proj, hs = setup(tmp_path, family, D if variant == "sti" else 3 * D, variant)
    with torch.no_grad():
        ref = proj(dense_reference(hs, family, variant))
    got, _ = encode(tmp_path, tmp_path / "dc", tmp_path / "tower", "--threads", "2")
    check(got, ref, f"{family} {variant}")


def test_dci_from_hidden_states_file(tmp_path):
    """connect: a features file with every hidden state; the group means are formed from them."""
    proj, hs = setup(tmp_path, "clip", 3 * D, "dci")
    save_features(tmp_path / "f.safetensors", hs, {"n_hidden_states": str(len(hs))})
    with torch.no_grad():
        ref = proj(dense_reference(hs, "clip", "dci"))
    run("connect", tmp_path / "dc", "--features", tmp_path / "f.safetensors", "-o", tmp_path / "o.safetensors")
    got = load_file(str(tmp_path / "o.safetensors"))["embeddings"]
    assert scaled_err(got, ref) <= 1e-4
    # Without hidden_states[5] the first group cannot be formed: the error names it.
    save_file({f"hidden_states.{i}": hs[i].contiguous() for i in range(len(hs)) if i != 5},
              str(tmp_path / "g.safetensors"), metadata={"n_hidden_states": str(len(hs))})
    p = run("connect", tmp_path / "dc", "--features", tmp_path / "g.safetensors", "-o", tmp_path / "o2.safetensors",
            check=False)
    assert p.returncode == 1 and "hidden_states[0..11]" in p.stderr and not (tmp_path / "o2.safetensors").exists()


@pytest.mark.parametrize("variant,opt,layers,groups,pool,width", [
    ("sti", ["--dense-layers", "8,16,20,24", "--dense-pool", "4"], (7, 15, 19), None, 4, D),
    ("sci", ["--dense-layers", "16,24"], (15,), None, 8, 2 * D),
    ("dci", ["--dense-groups", "1-8,9-16,17-24"], None, [range(0, 8), range(8, 16), range(16, 24)], 8, 4 * D),
])
def test_custom_layers_and_groups(tmp_path, variant, opt, layers, groups, pool, width):
    proj, hs = setup(tmp_path, "clip", width, variant, n=1)
    with torch.no_grad():
        ref = proj(dense_reference(hs, "clip", variant, layers=layers or (7, 15), groups=groups, pool=pool,
                                   final=23))
    got, _ = encode(tmp_path, tmp_path / "dc", tmp_path / "tower", *opt)
    check(got, ref, f"{variant} {' '.join(opt)}")


@pytest.mark.parametrize("tokens", [4, 9, 1])
def test_efficient_bilinear_matches_interpolate(tmp_path, tokens):
    """--tokens N: the projected 4x4 grid resized as F.interpolate(bilinear, align_corners=False)."""
    proj, hs = setup(tmp_path, "clip", 3 * D, "dci")
    with torch.no_grad():
        e = proj(dense_reference(hs, "clip", "dci"))                      # [B, 16, H]
        g, t = 4, int(round(tokens ** 0.5))
        grid = e.transpose(1, 2).reshape(e.shape[0], H, g, g)
        ref = Fn.interpolate(grid, size=(t, t), mode="bilinear", align_corners=False)
        ref = ref.reshape(e.shape[0], H, t * t).transpose(1, 2)
    got, _ = encode(tmp_path, tmp_path / "dc", tmp_path / "tower", "--tokens", tokens)
    check(got, ref, f"dci + bilinear 4x4 -> {t}x{t}")


def test_plug_and_play_on_llava_checkpoint(tmp_path):
    """--dense sti on an original-layout LLaVA checkpoint (projector D wide), and the width error for sci."""
    proj, hs = setup(tmp_path, "clip", D, "none", model="llava")
    with torch.no_grad():
        ref = proj(dense_reference(hs, "clip", "sti"))
    got, _ = encode(tmp_path, tmp_path / "llava", tmp_path / "tower", "--dense", "sti")
    check(got, ref, "--dense sti on a LLaVA projector")
    out = tmp_path / "bad.safetensors"
    p = run("encode", tmp_path / "llava", "--pixels", tmp_path / "px.safetensors", "-o", out, "--vision-tower",
            tmp_path / "tower", "--dense", "sci", check=False)
    assert p.returncode == 1 and not out.exists()
    assert "dense_sci" in p.stderr and "16" in p.stderr and "48" in p.stderr, p.stderr
    p = run("encode", tmp_path / "llava", "--pixels", tmp_path / "px.safetensors", "-o", out, "--vision-tower",
            tmp_path / "tower", "--dense-pool", "4", check=False)
    assert p.returncode == 1 and "need a dense type (sti, sci or dci)" in p.stderr


def test_bad_dense_options(tmp_path):
    make_projector(tmp_path / "dc", 3 * D, "dci", "tiny")
    for opt in (["--dense", "xyz"], ["--dense-layers", "8"], ["--dense-groups", "12-1"], ["--tokens", "0"]):
        p = run("info", tmp_path / "dc", *opt, check=False)
        assert p.returncode == 2 and opt[0] in p.stderr, (opt, p.stderr)
    p = run("info", tmp_path / "dc", "--tokens", "10", check=False)
    assert p.returncode == 1 and "square" in p.stderr


def write_real(d, dense_type, width_in, tower):
    """A config at real sizes with a thin projector (d_model 8): shapes only, no big weights."""
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 8,
        "mm_hidden_size": width_in, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_dense_connector_type": dense_type, "mm_vision_tower": tower}))
    save_file({"model.mm_projector.0.weight": torch.zeros(8, width_in), "model.mm_projector.0.bias": torch.zeros(8),
               "model.mm_projector.2.weight": torch.zeros(8, 8), "model.mm_projector.2.bias": torch.zeros(8)},
              str(d / "model.safetensors"))


@pytest.mark.parametrize("dense_type,width,tower,extra,tokens,reads", [
    ("sti", 1024, "openai/clip-vit-large-patch14-336", [], 720, r"final hidden_states\[23\]; hidden_states\[7\], "
                                                             r"hidden_states\[15\] \(paper layers: final 24, 8, 16\)"),
    ("sci", 3072, "openai/clip-vit-large-patch14-336", [], 576, r"\(paper layers: final 24, 8, 16\)"),
    ("dci", 3072, "openai/clip-vit-large-patch14-336", [], 576, r"mean of \[0\.\.11\], mean of \[12\.\.23\]"),
    ("dci", 3456, "google/siglip-so400m-patch14-384", [], 729, r"final hidden_states\[26\]; mean of \[0\.\.12\], "
                                                            r"mean of \[13\.\.25\]"),
    ("dci", 3072, "openai/clip-vit-large-patch14-336", ["--tokens", "144"], 144, r"1-12, 13-24"),
    ("sti", 1152, "google/siglip-so400m-patch14-384", [], 729 + 2 * 91, r"hidden_states\[7\]"),
])
def test_info_at_real_sizes(tmp_path, dense_type, width, tower, extra, tokens, reads):
    write_real(tmp_path / "m", dense_type, width, tower)
    out = run("info", tmp_path / "m", *extra).stdout
    assert re.search(rf"tokens per image:\s+{tokens}\b", out), out
    assert re.search(rf"input width:\s+{width}\b", out), out
    assert re.search(reads, out), out
    assert f"dense connector:  {dense_type} -> projector mlp2x_gelu" in out
    assert re.search(rf"parameters:\s+{width * 8 + 8 + 8 * 8 + 8}\b", out), out



def get_seq_frames(total, desired):
    """dc/eval/model_utils.get_seq_frames, as the spec gives it: midpoints of equal segments."""
    seg = float(total - 1) / desired
    return [(int(np.round(seg * i)) + int(np.round(seg * (i + 1)))) // 2 for i in range(desired)]


def write_frames(d, n, seed=3):
    """n random RGB frames of an odd size (the processor resizes and crops them), named in order."""
    d.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (61, 75, 3), dtype=np.uint8)).save(d / f"f{i:03d}.png")
    return sorted(d.glob("f*.png"))


def video_setup(tmp_path):
    tower = make_tower(tmp_path / "tower", "clip")
    CLIPImageProcessor(size={"shortest_edge": CLIP["image_size"]},
                       crop_size={"height": CLIP["image_size"], "width": CLIP["image_size"]}
                       ).save_pretrained(tmp_path / "tower")
    proj = make_projector(tmp_path / "dc", 3 * D, "dci", "tiny-clip")
    return tower, proj


def video_reference(tower, proj, paths, pool=True):
    """ViT -> DC -> projector per frame, then temporal_aggregation (MaxPool1d(2, 2) over each frame's
    tokens, frames concatenated): [1, T * N', H]."""
    proc = CLIPImageProcessor.from_pretrained(str(paths[0].parent.parent / "tower"))
    px = proc(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        e = proj(dense_reference(hidden_states(tower, "clip", px), "clip", "dci"))
        if pool:
            e = nn.MaxPool1d(kernel_size=2, stride=2)(e.permute(0, 2, 1)).permute(0, 2, 1)
    return e.reshape(1, -1, H)


@pytest.mark.parametrize("total,frames", [(11, 4), (3, 5), (20, 8)])
def test_video_frames_from_directory(tmp_path, total, frames):
    tower, proj = video_setup(tmp_path)
    paths = write_frames(tmp_path / "frames", total)
    (tmp_path / "frames" / ".hidden.png").write_bytes(b"not an image: hidden files are skipped")
    picked = [paths[i] for i in get_seq_frames(total, frames)]
    out = tmp_path / "v.safetensors"
    p = run("encode", tmp_path / "dc", "--video", tmp_path / "frames", "--frames", frames, "-o", out,
            "--vision-tower", tmp_path / "tower")
    assert " ".join(map(str, get_seq_frames(total, frames))) in p.stdout
    check(load_file(str(out))["embeddings"], video_reference(tower, proj, picked), f"video {total}->{frames}")


def test_video_list_file_and_no_pool(tmp_path):
    """A list file keeps its own order (paths relative to it); --no-pool keeps every token."""
    tower, proj = video_setup(tmp_path)
    paths = write_frames(tmp_path / "frames", 6)[::-1]
    (tmp_path / "frames.txt").write_text("".join(f"  frames/{p.name}\r\n\n" for p in paths))
    out = tmp_path / "v.safetensors"
    run("encode", tmp_path / "dc", "--video", tmp_path / "frames.txt", "--frames", 3, "--no-pool", "-o", out,
        "--vision-tower", tmp_path / "tower")
    picked = [paths[i] for i in get_seq_frames(6, 3)]
    check(load_file(str(out))["embeddings"], video_reference(tower, proj, picked, pool=False), "video list, no pool")


def test_video_token_count_at_clip_l_grid(tmp_path):
    """8 frames at CLIP-L/336's 24x24 grid (a thin, 2-block tower) give the paper's 2304 tokens."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=336,
               patch_size=14)
    CLIPVisionModel(CLIPVisionConfig(**cfg)).save_pretrained(tmp_path / "tower")
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
                       ).save_pretrained(tmp_path / "tower")
    make_projector(tmp_path / "llava", 8, "none", "tiny-clip")
    write_frames(tmp_path / "frames", 9)
    out = tmp_path / "v.safetensors"
    run("encode", tmp_path / "llava", "--video", tmp_path / "frames", "-o", out, "--vision-tower", tmp_path / "tower")
    assert tuple(load_file(str(out))["embeddings"].shape) == (1, 8 * 576 // 2, H)


def test_video_bad_input(tmp_path):
    video_setup(tmp_path)
    (tmp_path / "empty").mkdir()
    write_frames(tmp_path / "frames", 4)
    (tmp_path / "frames" / "f001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "v.safetensors"
    base = ["encode", tmp_path / "dc", "-o", out, "--vision-tower", tmp_path / "tower"]
    for args, code, msg in [
        (["--video", tmp_path / "empty"], 1, "no frames"),
        (["--video", tmp_path / "missing"], 1, "missing"),
        (["--video", tmp_path / "frames", "--frames", "2"], 1, "f001.png"),
        (["--video", tmp_path / "frames", "--frames", "0"], 2, "--frames"),
        (["--frames", "2", tmp_path / "frames" / "f000.png"], 2, "--frames"),
        (["--video", tmp_path / "frames", tmp_path / "frames" / "f000.png"], 2, "one of"),
    ]:
        p = run(*base, *args, check=False)
        assert p.returncode == code and msg in p.stderr, (args, p.stderr)
        assert not out.exists()


def test_dci_parameter_count_at_7b(tmp_path):
    """CLIP-L DCI feeding LLaVA-1.5-7B's projector (3072 -> 4096 -> 4096): info's parameter count and
    FLOPs are those of the torch module (the paper's 29,368,320: DC itself adds no parameters)."""
    with torch.device("meta"):
        proj = nn.Sequential(nn.Linear(3072, 4096), nn.GELU(), nn.Linear(4096, 4096))
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 4096,
        "mm_hidden_size": 3072, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_dense_connector_type": "dci",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    save_file({f"model.mm_projector.{k}": torch.zeros(v.shape, dtype=torch.bfloat16)
               for k, v in proj.state_dict().items()}, str(d / "model.safetensors"))
    out = run("info", d).stdout
    params = sum(p.numel() for p in proj.parameters())
    assert params == 29_368_320
    assert re.search(rf"parameters:\s+{params}\b", out), out
    macs = 576 * sum(m.weight.numel() for m in proj if isinstance(m, nn.Linear))
    assert re.search(rf"FLOPs per image:\s+{2 * macs * 1e-9:.3f} GFLOP", out), out
