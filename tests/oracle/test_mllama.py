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
