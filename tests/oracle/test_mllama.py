"""Llama 3.2 Vision's vision side (Mllama) against transformers: tiny random MllamaForConditionalGeneration
checkpoints (save_pretrained) with MllamaImageProcessorPil.
(a) the processor: our MllamaImageProcessor (through the preprocess driver of test_preprocess.py) writes the
    canvas's tiles [rows * cols, 3, tile, tile]; they equal the processor's pixel_values[0, 0, :rows * cols]
    bit for bit (torch.equal), the tiles after them are the processor's zeros, and our canvas gives its
    num_tiles, aspect_ratio_ids and aspect_ratio_mask, on images tiny, huge, thin and square, for
    max_image_tiles 1, 2, 3, 4 and tile sizes 28 to 560;
(b) `mmbridge encode MODEL IMAGE` and `--pixels` vs MllamaModel's vision path (vision_model(pixel_values,
    aspect_ratio_ids, aspect_ratio_mask), then multi_modal_projector), the real tiles only, for two configs
    (max tiles, global layers, intermediate_layers_indices), images of several aspect ratios, a batch;
    wrong variants (no gate on the gated positional embedding, tiles in another order, the intermediate
    features concatenated instead of interleaved) far off;
(c) bad input: pixels needing more tiles than the checkpoint allows, sides that are not multiples of the
    tile, a missing tensor, a wrong shape, bad configs."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run, scaled_err
from test_preprocess import driver, run_driver  # noqa: F401  (driver is a fixture)

ERRS = []  # (what, scaled max error), printed by test_report
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def processor(**kw):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MllamaImageProcessorPil(**kw)


def supported(max_tiles):
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios
    return get_all_supported_aspect_ratios(max_tiles)


def save_image(path, h, w, seed):
    rng = np.random.RandomState(seed)
    # smooth gradients plus noise: resampling has something to do
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], -1)
    img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


# ---- (a) the processor ------------------------------------------------------------------------------

# (name, kwargs): the class defaults at a small tile; the hub's Llama 3.2 settings (560, CLIP's mean and
# std); 1, 2 and 3 tiles; bicubic
PROCS = {
    "t28_max4": dict(size={"height": 28, "width": 28}, max_image_tiles=4),
    "hub560": dict(size={"height": 560, "width": 560}, max_image_tiles=4, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                   resample=2),
    "t28_max1": dict(size={"height": 28, "width": 28}, max_image_tiles=1),
    "t40_max2": dict(size={"height": 40, "width": 40}, max_image_tiles=2),
    "t32_max3_bicubic": dict(size={"height": 32, "width": 32}, max_image_tiles=3, resample=3),
}
# (height, width): tiny, square, landscape, portrait, thin both ways, huge, exact canvases, odd sizes
IMAGE_SIZES = [(1, 1), (3, 5), (28, 28), (30, 29), (56, 28), (28, 56), (50, 120), (120, 50), (7, 300), (300, 7),
               (2, 1000), (100, 100), (560, 1120), (600, 450), (1000, 1500), (3000, 2000), (61, 517), (1120, 560)]


@pytest.fixture(scope="module")
def proc_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllama_procs")
    dirs = {}
    for name, kw in PROCS.items():
        processor(**kw).save_pretrained(root / name)
        dirs[name] = root / name
    imgs = {hw: save_image(root / f"img_{hw[0]}x{hw[1]}.png", *hw, seed=i) for i, hw in enumerate(IMAGE_SIZES)}
    return root, dirs, imgs


def aspect_id(max_tiles, rows, cols):
    return supported(max_tiles).index((rows, cols)) + 1


def test_pixels_match_processor(driver, proc_dirs):  # noqa: F811
    """Our tiles equal the processor's pixel_values bit for bit; our canvas gives its num_tiles,
    aspect_ratio_ids and aspect_ratio_mask. Every processor meets several canvases."""
    root, dirs, imgs = proc_dirs
    names = list(PROCS)
    canvases = {n: set() for n in names}
    for hw, path in imgs.items():
        out = root / "px.safetensors"
        p = run_driver(driver, out, path, [dirs[n] for n in names])
        assert p.returncode == 0, p.stderr
        got = load_file(str(out))
        for i, name in enumerate(names):
            kw = PROCS[name]
            t, mt = kw["size"]["height"], kw["max_image_tiles"]
            ref = processor(**kw)(Image.open(path), return_tensors="pt")
            ours = got[f"pixels.{i}"]
            H, W = ours.shape[1:]
            assert H % t == 0 and W % t == 0, (hw, name, H, W)
            rows, cols = H // t, W // t
            nt = rows * cols
            assert 1 <= nt <= mt, (hw, name, rows, cols)
            canvases[name].add((rows, cols))
            pv = ref["pixel_values"]
            assert pv.shape == (1, 1, mt, 3, t, t), pv.shape
            assert ref["num_tiles"] == [[nt]], (hw, name, ref["num_tiles"], rows, cols)
            assert ref["aspect_ratio_ids"].tolist() == [[aspect_id(mt, rows, cols)]], (hw, name)
            assert ref["aspect_ratio_mask"].tolist() == [[[1] * nt + [0] * (mt - nt)]], (hw, name)
            tiles = ours.reshape(nt, 3, t, t)  # the floats as they lie: tile after tile
            assert torch.equal(tiles, pv[0, 0, :nt]), (hw, name, (tiles - pv[0, 0, :nt]).abs().max())
            assert not pv[0, 0, nt:].any()  # the processor's padding tiles are zeros, which we leave out
            # the uint8 canvas: the resized image at the top left, zeros below and to the right
            u8 = got[f"u8.{i}"]
            assert u8.shape == (H, W, 3)
    for name in names:
        mt = PROCS[name]["max_image_tiles"]
        assert len(canvases[name]) >= min(len(supported(mt)), 3), (name, canvases[name])


def test_processor_defaults_and_hub_keys(driver, tmp_path):  # noqa: F811
    """A preprocessor_config.json with only the class name gets the class's defaults (224, 4 tiles,
    bilinear, mean = std = 0.5); the processor_config.json that transformers 5's MllamaProcessor writes
    (the image processor nested) reads the same."""
    d = tmp_path / "defaults"
    d.mkdir()
    (d / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "MllamaImageProcessor"}))
    path = save_image(tmp_path / "img.png", 300, 500, seed=1)
    out = tmp_path / "px.safetensors"
    p = run_driver(driver, out, path, [d])
    assert p.returncode == 0, p.stderr
    ref = processor()(Image.open(path), return_tensors="pt")
    ours = load_file(str(out))["pixels.0"]
    nt = ref["num_tiles"][0][0]
    assert ours.shape == (3, 448, 448) and nt == 4  # 2x2 tiles of 224: the largest downscale
    assert torch.equal(ours.reshape(nt, 3, 224, 224), ref["pixel_values"][0, 0, :nt])
    nested = tmp_path / "nested"
    nested.mkdir()
    kw = PROCS["hub560"]
    (nested / "processor_config.json").write_text(json.dumps({
        "processor_class": "MllamaProcessor", "image_processor": {
            "image_processor_type": "MllamaImageProcessorPil", **kw}}))
    p = run_driver(driver, out, path, [nested])
    assert p.returncode == 0, p.stderr
    ref = processor(**kw)(Image.open(path), return_tensors="pt")
    ours = load_file(str(out))["pixels.0"]
    nt = ref["num_tiles"][0][0]
    assert torch.equal(ours.reshape(nt, 3, 560, 560), ref["pixel_values"][0, 0, :nt])


BAD_PROCS = {
    "no_pad": ({"do_pad": False}, "do_pad false"),
    "no_resize": ({"do_resize": False}, "do_resize false"),
    "not_square": ({"size": {"height": 28, "width": 56}}, "height == width"),
    "shortest_edge": ({"size": {"shortest_edge": 28}}, "height == width"),
    "tiles_zero": ({"max_image_tiles": 0}, "max_image_tiles"),
    "tiles_str": ({"max_image_tiles": "4"}, "max_image_tiles"),
    "resample": ({"resample": 0}, "nearest"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROCS))
def test_bad_processor_configs(driver, tmp_path, case):  # noqa: F811
    extra, needle = BAD_PROCS[case]
    d = tmp_path / "p"
    d.mkdir()
    (d / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MllamaImageProcessor", "size": {"height": 28, "width": 28}, **extra}))
    p = run_driver(driver, tmp_path / "px.safetensors", save_image(tmp_path / "i.png", 30, 40, 0), [d])
    assert p.returncode == 2 and needle in p.stderr, p.stderr


# ---- (b) the vision model and projector ------------------------------------------------------------

# Two configs: 4 tiles, 3 local + 2 global layers, intermediates [0, 2], tile 28 / patch 14 (P = 5, pad 3);
# 2 tiles, 4 local + 1 global, intermediates [3, 1, 0] (out of order), tile 42 (P = 10, pad 6), 2 heads.
CONFIGS = {
    "t4": dict(vision=dict(hidden_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=4,
                           intermediate_size=64, vision_output_dim=32 * 3, image_size=28, patch_size=14,
                           max_num_tiles=4, intermediate_layers_indices=[0, 2]),
               text_d=48),
    "t2": dict(vision=dict(hidden_size=24, num_hidden_layers=4, num_global_layers=1, attention_heads=2,
                           intermediate_size=40, vision_output_dim=24 * 4, image_size=42, patch_size=14,
                           max_num_tiles=2, intermediate_layers_indices=[3, 1, 0],
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
               text_d=40),
}


def make_model(d, cfg, seed=0):
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    v = cfg["vision"]
    config = MllamaConfig(
        vision_config=v,
        text_config=dict(hidden_size=cfg["text_d"], intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, cross_attention_layers=[1], bos_token_id=1,
                         eos_token_id=2, pad_token_id=3),
        image_token_index=299)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not (name.startswith("model.vision_model.") or name.startswith("model.multi_modal_projector.")):
                continue
            if "layernorm" in name and name.endswith("weight"):
                p.normal_(0.8, 0.3)   # LayerNorms away from 1 / 0, so a missing one shows
            elif name.endswith("gate") or "gate_attn" in name or "gate_ffn" in name:
                p.uniform_(0.3, 1.2)  # every gate matters: tanh well inside (0, 1)
            elif "embedding" in name:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.15)  # outputs of order 1, not the init's near-zero
    model.save_pretrained(d)
    processor(size={"height": v["image_size"], "width": v["image_size"]},
              max_image_tiles=v["max_num_tiles"]).save_pretrained(d)
    return model


def vision_reference(model, inputs, vision_model=None):
    """MllamaModel's path to cross_attention_states: vision_model then multi_modal_projector; the real tiles
    of image 0, (num_tiles * P, text hidden)."""
    vm = vision_model or model.model.vision_model
    with torch.no_grad():
        st = vm(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        proj = model.model.multi_modal_projector(st)
    nt = inputs["num_tiles"][0][0]
    return proj[0, 0, :nt].reshape(nt * st.shape[-2], -1), st[0, 0, :nt]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def mllama(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(f"mllama_{name}")
    d = root / "model"
    model = make_model(d, CONFIGS[name])
    t = CONFIGS[name]["vision"]["image_size"]
    # square, landscape, portrait, tiny, thin, large: every canvas the tiles allow
    sizes = [(t, t), (t - 2, 2 * t - 3), (2 * t - 3, t - 2), (t, 2 * t + 5), (3 * t, t), (5, 7), (3, 20 * t),
             (20 * t, 9), (4 * t, 3 * t), (t + 3, 3 * t)]
    imgs = {hw: save_image(root / f"img_{hw[0]}x{hw[1]}.png", *hw, seed=i) for i, hw in enumerate(sizes)}
    return name, model, d, imgs, root


def test_encode_images(mllama, tmp_path):
    """`mmbridge encode MODEL IMAGE` = the projector's output on the vision model's last_hidden_state for the
    real tiles, tile-major then patch; every canvas the config allows is met."""
    name, model, d, imgs, _ = mllama
    cfg = CONFIGS[name]["vision"]
    t, mt = cfg["image_size"], cfg["max_num_tiles"]
    P = (t // cfg["patch_size"]) ** 2 + 1
    proc = processor(size={"height": t, "width": t}, max_image_tiles=mt)
    canvases = set()
    for hw, path in imgs.items():
        inputs = proc(Image.open(path), return_tensors="pt")
        ref, _ = vision_reference(model, inputs)
        out = tmp_path / "emb.safetensors"
        run("encode", d, path, "-o", out)
        got = load_file(str(out))["embeddings"]
        nt = inputs["num_tiles"][0][0]
        canvases.add(inputs["aspect_ratio_ids"][0, 0].item())
        assert got.shape == (1, nt * P, CONFIGS[name]["text_d"]), (hw, got.shape)
        err = scaled_err(got[0], ref)
        print(hw, err)
        ERRS.append((f"{name} encode image {hw[0]}x{hw[1]} ({nt} tiles)", err))
        assert err <= 1e-4, (hw, err)
        assert ref.abs().max() > 0.5  # a real signal, not the near-zero of an untrained init
    assert len(canvases) == len(supported(mt)), canvases
