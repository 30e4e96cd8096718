"""Qwen2-VL end to end against transformers: a tiny random Qwen2VLForConditionalGeneration
(save_pretrained) with Qwen2VLImageProcessorPil.
(a) the pixel stage: our Qwen2VLImageProcessor (smart resize, bicubic, rescale, normalize; through the
    preprocess driver of test_preprocess.py) vs the processor's pixel_values, which are our [3, H, W]
    flattened by the processor's own patchify, and image_grid_thw, on images of several sizes and
    aspect ratios that hit each branch of smart_resize;
(b) `mmbridge encode MODEL IMAGE` and `--pixels` vs model.get_image_features (the merger's output,
    as the model splices it into the LLM's embeddings), batch of two images included;
(c) bad input: a missing tensor, a wrong shape, bad configs, pixels that are not multiples of 28."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run, scaled_err, corrupt
from test_preprocess import driver, run_driver  # noqa: F401  (driver is a fixture)

TEXT_D = 48
VISION = dict(depth=2, embed_dim=32, hidden_size=TEXT_D, num_heads=4, mlp_ratio=2, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2)
# max_pixels small enough that the larger images take smart_resize's shrinking branch
PROC = dict(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 30})
# (height, width): exact multiples of 28; rounded to the nearest; shrunk (max_pixels); grown (min_pixels);
# long thin ones
SIZES = [(56, 84), (112, 56), (100, 150), (300, 200), (20, 50), (40, 500), (517, 61)]


def processor(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLImageProcessorPil(**kw)


def make_model(d, seed=0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    cfg = Qwen2VLConfig(
        vision_config=VISION,
        text_config=dict(hidden_size=TEXT_D, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=160, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 1e4}),
        image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("model.visual."):
                continue
            if "norm" in name or "ln_q" in name:
                p.normal_(0.5, 0.3)   # LayerNorms away from 1 / 0, so a missing one shows
            else:
                p.normal_(0.0, 0.1)   # outputs of order 1, not the init's near-zero
    model.save_pretrained(d)
    processor(**PROC).save_pretrained(d)
    return model


def save_image(path, h, w, seed):
    rng = np.random.RandomState(seed)
    # smooth gradients plus noise: resampling has something to do
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
    img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def unflatten(pv, grid, m=2, p=14):
    """The processor's pixel_values (gh*gw, C*T*p*p) of one image -> [3, H, W] (temporal copy 0)."""
    _, gh, gw = grid
    x = pv.reshape(gh // m, gw // m, m, m, 3, 2, p, p)[:, :, :, :, :, 0]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)


def reference(model, pixel_values, grid):
    with torch.no_grad():
        return model.get_image_features(pixel_values, grid).pooler_output


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2vl")
    d = root / "model"
    model = make_model(d)
    imgs = {hw: save_image(root / f"img_{hw[0]}x{hw[1]}.png", *hw, seed=i) for i, hw in enumerate(SIZES)}
    return model, d, imgs, root


def test_pixels_match_processor(qwen, driver):  # noqa: F811
    """Our pixel_values [3, H, W], flattened by the processor's own patchify, equal the processor's
    (bit for bit: Pillow-exact resize, the same float32 rescale / normalize), and so do the grids;
    also with the hub files' min_pixels / max_pixels keys instead of size."""
    _, d, imgs, root = qwen
    hub = root / "hub_proc"
    hub.mkdir()
    (hub / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 28 * 28 * 8, "max_pixels": 28 * 28 * 20,
        "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    procs = [processor(**PROC), processor(min_pixels=28 * 28 * 8, max_pixels=28 * 28 * 20)]
    grids = set()
    for hw, path in imgs.items():
        out = root / "px.safetensors"
        p = run_driver(driver, out, path, [d, hub])
        assert p.returncode == 0, p.stderr
        got = load_file(str(out))
        for i, proc in enumerate(procs):
            ref = proc(Image.open(path), return_tensors="np")
            ours = got[f"pixels.{i}"].numpy()
            H, W = ours.shape[1:]
            assert H % 28 == 0 and W % 28 == 0, (hw, H, W)
            assert ref["image_grid_thw"].tolist() == [[1, H // 14, W // 14]], (hw, i, ref["image_grid_thw"], H, W)
            flat, gh, gw = proc.patchify(ours, patch_size=14, merge_size=2, temporal_patch_size=2)
            assert flat.shape == ref["pixel_values"].shape
            assert np.array_equal(flat, ref["pixel_values"]), (hw, i, np.abs(flat - ref["pixel_values"]).max())
            grids.add((i, gh, gw))
    # the sizes exercise distinct grids: exact, rounded, shrunk and grown
    assert len({g for g in grids if g[0] == 0}) == len(SIZES)


@pytest.mark.parametrize("hw", [(56, 84), (112, 56), (100, 150), (300, 200)])
def test_encode_image(qwen, tmp_path, hw):
    """`mmbridge encode MODEL IMAGE` = get_image_features on the processor's pixel_values."""
    model, d, imgs, _ = qwen
    ref_in = processor(**PROC)(Image.open(imgs[hw]), return_tensors="pt")
    ref = reference(model, ref_in["pixel_values"], ref_in["image_grid_thw"])[0]
    out = tmp_path / "emb.safetensors"
    run("encode", d, imgs[hw], "-o", out)
    got = load_file(str(out))["embeddings"]
    _, gh, gw = ref_in["image_grid_thw"][0].tolist()
    assert got.shape == (1, gh * gw // 4, TEXT_D)
    err = scaled_err(got[0], ref)
    ERRS.append((f"encode image {hw[0]}x{hw[1]} (grid {gh}x{gw})", err))
    assert err <= 1e-4, err
    assert ref.abs().max() > 0.5  # a real signal, not the near-zero of an untrained init


def test_encode_pixels_batch(qwen, tmp_path):
    """`--pixels` [2, 3, H, W]: the processor's pixel_values un-flattened; two images in one batch, each
    attending only to itself (cu_seqlens), = get_image_features on both. A raster (not window) order
    of the same patches gives a large error, so the order is what the test checks."""
    model, d, imgs, _ = qwen
    proc = processor(**PROC)
    ins = [proc(Image.open(imgs[(56, 84)]), return_tensors="pt"),
           proc(Image.open(save_image(tmp_path / "b.png", 60, 80, seed=9)), return_tensors="pt")]
    assert all(i["image_grid_thw"].tolist() == [[1, 4, 6]] for i in ins)
    px = torch.stack([unflatten(i["pixel_values"], i["image_grid_thw"][0].tolist()) for i in ins])
    save_file({"pixel_values": px.contiguous()}, str(tmp_path / "px.safetensors"))
    pv = torch.cat([i["pixel_values"] for i in ins])
    grid = torch.cat([i["image_grid_thw"] for i in ins])
    ref = torch.stack(reference(model, pv, grid))
    out = tmp_path / "emb.safetensors"
    run("encode", d, "--pixels", tmp_path / "px.safetensors", "-o", out)
    got = load_file(str(out))["embeddings"]
    assert got.shape == ref.shape == (2, 6, TEXT_D)
    err = scaled_err(got, ref)
    ERRS.append(("encode --pixels, batch of 2 (grid 4x6)", err))
    assert err <= 1e-4, err
    # the same patches in raster order (row by row over the 4x6 grid) through the model
    raster = ins[0]["pixel_values"].reshape(2, 3, 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(24, -1)
    wrong = reference(model, raster, ins[0]["image_grid_thw"])[0]
    assert scaled_err(got[0], wrong) > 1e-2


def test_module_layout(qwen, tmp_path):
    """Weights under transformers' module names (model.visual.*) read the same as save_pretrained's
    (visual.*)."""
    model, d, imgs, _ = qwen
    alt = tmp_path / "alt"
    shutil.copytree(d, alt)
    sd = load_file(str(alt / "model.safetensors"))
    assert any(k.startswith("visual.") for k in sd)
    save_file({("model." + k if k.startswith("visual.") else k): v for k, v in sd.items()},
              str(alt / "model.safetensors"), metadata={"format": "pt"})
    ref_in = processor(**PROC)(Image.open(imgs[(112, 56)]), return_tensors="pt")
    ref = reference(model, ref_in["pixel_values"], ref_in["image_grid_thw"])[0]
    run("encode", alt, imgs[(112, 56)], "-o", tmp_path / "emb.safetensors")
    err = scaled_err(load_file(str(tmp_path / "emb.safetensors"))["embeddings"][0], ref)
    ERRS.append(("encode image 112x56, model.visual.* keys", err))
    assert err <= 1e-4, err


def test_info(qwen):
    _, d, _, _ = qwen
    out = run("info", d).stdout
    assert "family:           qwen2_vl" in out and "patch_merger" in out, out
    assert "input width:      128" in out and f"output width:     {TEXT_D}" in out, out


BAD = {
    "missing": (dict(drop="visual.blocks.1.mlp.fc2.bias"), "visual.blocks.1.mlp.fc2.bias"),
    "shape_qkv": (dict(reshape="visual.blocks.0.attn.qkv.weight"), "visual.blocks.0.attn.qkv.weight"),
    "shape_merger": (dict(reshape="visual.merger.mlp.2.weight"), "visual.merger.mlp.2.weight"),
    "shape_patch": (dict(reshape="visual.patch_embed.proj.weight"), "visual.patch_embed.proj.weight"),
    "merge_size": (dict(config={"spatial_merge_size": 3}), "visual.merger.mlp.0.weight"),
    "heads": (dict(config={"num_heads": 5}), "num_heads"),
    "act": (dict(config={"hidden_act": "relu6"}), "hidden_act"),
    "proc_size": (dict(proc={"image_processor_type": "Qwen2VLImageProcessor", "size": {"longest_edge": 5000}}),
                  "shortest_edge"),
    "proc_pixels": (dict(proc={"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": "many"}),
                    "max_pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint(qwen, tmp_path, case):
    """A broken checkpoint or processor config: a clear error naming the culprit, exit 1, no output."""
    _, d, imgs, _ = qwen
    kw, needle = BAD[case]
    bad = corrupt(d, tmp_path / "bad", **kw)
    out = tmp_path / "emb.safetensors"
    p = run("encode", bad, imgs[(56, 84)], "-o", out, check=False)
    assert p.returncode == 1 and needle in p.stderr, (p.returncode, p.stderr)
    assert not out.exists()


def test_bad_pixels(qwen, tmp_path):
    """--pixels not multiples of 28, the wrong tensor name or rank, and an image beyond smart_resize's
    aspect limit: refused with a message, no output file."""
    _, d, _, _ = qwen
    out = tmp_path / "emb.safetensors"
    cases = [({"pixel_values": torch.randn(1, 3, 56, 70)}, "multiples of 28"),
             ({"pixel_values": torch.randn(1, 3, 14, 28)}, "multiples of 28"),
             ({"pixels": torch.randn(1, 3, 56, 56)}, "'pixel_values' is missing"),
             ({"pixel_values": torch.randn(24, 1176)}, "expected [n, 3, height, width]")]
    for tensors, needle in cases:
        save_file(tensors, str(tmp_path / "px.safetensors"))
        p = run("encode", d, "--pixels", tmp_path / "px.safetensors", "-o", out, check=False)
        assert p.returncode == 1 and needle in p.stderr, (needle, p.stderr)
        assert not out.exists()
    thin = save_image(tmp_path / "thin.png", 2, 500, seed=3)
    p = run("encode", d, thin, "-o", out, check=False)
    assert p.returncode == 1 and "aspect ratio" in p.stderr, p.stderr
    assert not out.exists()
    p = run("encode", d, "--pixels", tmp_path / "px.safetensors", "-o", out, "--taps", "1", check=False)
    assert p.returncode != 0 and not out.exists()


ERRS = []


def test_report():
    """Prints the measured errors (pytest -s)."""
    for name, err in ERRS:
        print(f"qwen2_vl {name}: scaled max error {err:.2e}")
