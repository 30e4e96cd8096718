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

from conftest import run, scaled_err, corrupt
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
        ERRS.append((f"{name} encode image {hw[0]}x{hw[1]} ({nt} tiles)", err))
        assert err <= 1e-4, (hw, err)
        assert ref.abs().max() > 0.5  # a real signal, not the near-zero of an untrained init
    assert len(canvases) == len(supported(mt)), canvases


def tiles_as_pixels(inputs):
    """The processor's real tiles of image 0 as `--pixels` takes them: the same floats, tile after tile, in the
    [3, rows t, cols t] shape mmb_preprocess_output_size gives (rows, cols from the aspect ratio id)."""
    nt = inputs["num_tiles"][0][0]
    mt = inputs["pixel_values"].shape[2]
    rows, cols = supported(mt)[inputs["aspect_ratio_ids"][0, 0].item() - 1]
    t = inputs["pixel_values"].shape[-1]
    assert rows * cols == nt
    return inputs["pixel_values"][0, 0, :nt].reshape(3, rows * t, cols * t)


def test_encode_batch_and_pixels(mllama, tmp_path):
    """Two images of one canvas: one encode call (a batch of 2), and `--pixels` [2, 3, rows t, cols t] made of the
    processor's pixel_values; both equal the reference image by image."""
    name, model, d, imgs, _ = mllama
    cfg = CONFIGS[name]["vision"]
    t = cfg["image_size"]
    proc = processor(size={"height": t, "width": t}, max_image_tiles=cfg["max_num_tiles"])
    a = save_image(tmp_path / "a.png", t - 2, 2 * t - 3, seed=11)
    b = save_image(tmp_path / "b.png", t - 1, 2 * t - 4, seed=12)
    ins = [proc(Image.open(p), return_tensors="pt") for p in (a, b)]
    assert ins[0]["aspect_ratio_ids"].tolist() == ins[1]["aspect_ratio_ids"].tolist() == [[2]]  # 1 x 2
    ref = torch.stack([vision_reference(model, i)[0] for i in ins])
    out = tmp_path / "emb.safetensors"
    run("encode", d, a, b, "-o", out)
    got = load_file(str(out))["embeddings"]
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = scaled_err(got, ref)
    ERRS.append((f"{name} encode 2 images in a batch (1x2 tiles)", err))
    assert err <= 1e-4, err
    save_file({"pixel_values": torch.stack([tiles_as_pixels(i) for i in ins]).contiguous()},
              str(tmp_path / "px.safetensors"))
    run("encode", d, "--pixels", tmp_path / "px.safetensors", "-o", out)
    got = load_file(str(out))["embeddings"]
    err = scaled_err(got, ref)
    ERRS.append((f"{name} encode --pixels, batch of 2 (1x2 tiles)", err))
    assert err <= 1e-4, err


def test_wrong_variants_far(mllama, tmp_path):
    """What the test can tell apart: the reference without the gated positional embedding's gate (gate 0:
    the full position embedding, no tile-position term), with the tiles in column-major order, and with the
    intermediate features concatenated layer after layer instead of interleaved are all far from our output,
    which is within 1e-4 of the reference."""
    import copy
    name, model, d, imgs, _ = mllama
    cfg = CONFIGS[name]["vision"]
    t = cfg["image_size"]
    proc = processor(size={"height": t, "width": t}, max_image_tiles=cfg["max_num_tiles"])
    path = imgs[(2 * t - 3, t - 2)]  # 2 x 1 tiles
    inputs = proc(Image.open(path), return_tensors="pt")
    out = tmp_path / "emb.safetensors"
    run("encode", d, path, "-o", out)
    got = load_file(str(out))["embeddings"][0]
    ref, states = vision_reference(model, inputs)
    assert scaled_err(got, ref) <= 1e-4
    # no gate on the gated positional embedding
    vm = copy.deepcopy(model.model.vision_model)
    with torch.no_grad():
        vm.gated_positional_embedding.gate.zero_()
    no_gate, _ = vision_reference(model, inputs, vm)
    # the two tiles swapped (column-major order over a 2 x 1 canvas)
    swapped = dict(inputs)
    swapped["pixel_values"] = inputs["pixel_values"].clone()
    swapped["pixel_values"][0, 0, [0, 1]] = inputs["pixel_values"][0, 0, [1, 0]]
    wrong_order, _ = vision_reference(model, swapped)
    # [final | layer k's D features after each other]
    D, K = cfg["hidden_size"], len(cfg["intermediate_layers_indices"])
    inter = states[..., D:].reshape(*states.shape[:-1], D, K).transpose(-1, -2).reshape(*states.shape[:-1], D * K)
    with torch.no_grad():
        concat = model.model.multi_modal_projector(torch.cat([states[..., :D], inter], -1)).reshape(ref.shape)
    for what, wrong in [("no positional gate", no_gate), ("tiles swapped", wrong_order), ("concatenated", concat)]:
        e = scaled_err(got, wrong)
        ERRS.append((f"{name} wrong variant '{what}' (must be far)", e))
        assert e > 1e-2, (what, e)


def test_module_layout(mllama, tmp_path):
    """Weights under the module names (model.vision_model.*, model.multi_modal_projector.*) read the same as
    save_pretrained's (vision_model.*, multi_modal_projector.*)."""
    name, model, d, imgs, _ = mllama
    alt = tmp_path / "alt"
    shutil.copytree(d, alt)
    sd = load_file(str(alt / "model.safetensors"))
    assert any(k.startswith("vision_model.") for k in sd) and "multi_modal_projector.weight" in sd
    ren = {("model." + k if k.startswith(("vision_model.", "multi_modal_projector.")) else k): v for k, v in sd.items()}
    save_file(ren, str(alt / "model.safetensors"), metadata={"format": "pt"})
    t = CONFIGS[name]["vision"]["image_size"]
    path = imgs[(3 * t, t)]
    inputs = processor(size={"height": t, "width": t},
                       max_image_tiles=CONFIGS[name]["vision"]["max_num_tiles"])(Image.open(path), return_tensors="pt")
    ref, _ = vision_reference(model, inputs)
    run("encode", alt, path, "-o", tmp_path / "emb.safetensors")
    err = scaled_err(load_file(str(tmp_path / "emb.safetensors"))["embeddings"][0], ref)
    ERRS.append((f"{name} encode, model.vision_model.* keys", err))
    assert err <= 1e-4, err


def test_info(mllama):
    name, _, d, _, _ = mllama
    out = run("info", d).stdout
    v = CONFIGS[name]["vision"]
    assert "family:           mllama" in out and "multi_modal_projector" in out, out
    assert f"input width:      {v['vision_output_dim']}" in out, out
    assert f"output width:     {CONFIGS[name]['text_d']}" in out, out
    assert "MllamaImageProcessor" in out and "varies with the image" in out, out


# ---- (c) bad input -----------------------------------------------------------------------------------

def test_bad_pixels(mllama, tmp_path):
    """--pixels whose canvas has more tiles than max_num_tiles, sides that are not multiples of the tile: refused
    with a message naming the sizes, no output file."""
    name, _, d, _, _ = mllama
    t, mt = CONFIGS[name]["vision"]["image_size"], CONFIGS[name]["vision"]["max_num_tiles"]
    out = tmp_path / "emb.safetensors"
    too_many = (3 * t, 2 * t) if mt == 4 else (t, 3 * t)
    cases = [(too_many, f"more than the checkpoint's max_num_tiles {mt}"),
             ((t * mt, t * mt), f"more than the checkpoint's max_num_tiles {mt}"),
             ((t + 1, t), f"multiples of {t}"), ((t, t // 2), f"multiples of {t}")]
    for (h, w), needle in cases:
        save_file({"pixel_values": torch.randn(1, 3, h, w)}, str(tmp_path / "px.safetensors"))
        p = run("encode", d, "--pixels", tmp_path / "px.safetensors", "-o", out, check=False)
        assert p.returncode == 1 and needle in p.stderr, (h, w, p.stderr)
        assert f"{w}x{h}" in p.stderr, p.stderr
        assert not out.exists()


BAD = {
    "missing_gate": (dict(drop="vision_model.global_transformer.layers.0.gate_ffn"),
                     "vision_model.global_transformer.layers.0.gate_ffn"),
    "missing_tile_pos": (dict(drop="vision_model.gated_positional_embedding.tile_embedding.weight"),
                         "vision_model.gated_positional_embedding.tile_embedding.weight"),
    "missing_proj_bias": (dict(drop="multi_modal_projector.bias"), "multi_modal_projector.bias"),
    "missing_layer": (dict(drop="vision_model.transformer.layers.1.self_attn.k_proj.weight"),
                      "vision_model.transformer.layers.1.self_attn.k_proj.weight"),
    "shape_pre_tile": (dict(reshape="vision_model.pre_tile_positional_embedding.embedding.weight"),
                       "vision_model.pre_tile_positional_embedding.embedding.weight"),
    "shape_proj": (dict(reshape="multi_modal_projector.weight"), "multi_modal_projector.weight"),
    "ratios": (dict(config={"supported_aspect_ratios": [[1, 1]]}), "supported_aspect_ratios"),
    "inter_index": (dict(config={"intermediate_layers_indices": [0, 9]}), "intermediate_layers_indices"),
    "output_dim": (dict(config={"vision_output_dim": 7}), "vision_output_dim"),
    "act": (dict(config={"hidden_act": "relu6"}), "hidden_act"),
    "proc_tiles": (dict(proc={"max_image_tiles": 3}), "max_num_tiles"),
    "proc_tile_size": (dict(proc={"size": {"height": 56, "width": 56}}), "vision_config.image_size"),
    "proc_no_pad": (dict(proc={"do_pad": False}), "do_pad false"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint(mllama, tmp_path, case):
    """A broken checkpoint or processor: a clear error naming the culprit, exit 1, no output."""
    name, _, d, imgs, _ = mllama
    if name != "t4":
        pytest.skip("one config is enough")
    kw, needle = BAD[case]
    bad = corrupt(d, tmp_path / "bad", **kw)
    out = tmp_path / "emb.safetensors"
    p = run("encode", bad, next(iter(imgs.values())), "-o", out, check=False)
    assert p.returncode == 1 and needle in p.stderr, (p.returncode, p.stderr)
    assert not out.exists()


# ---- (d) what the text side reads: every tile ----------------------------------------------------------

@pytest.fixture(scope="module")
def xattn_driver(tmp_path_factory):
    from conftest import compile_driver
    return compile_driver("mllama_driver", tmp_path_factory.mktemp("mllama_driver"))


def test_cross_attention_states(mllama, xattn_driver, tmp_path):
    """mmb__model_encode_xattn = transformers' cross_attention_states of the image: all max_num_tiles tiles, the
    padding tiles' rows included (the text rows that see no tile, e.g. BOS before <|image|>, attend to them all
    unmasked, and full_text_row_masked_out_mask zeroes only their MLP), real tiles first; its first rows are
    mmb_model_encode's."""
    import subprocess
    name, model, d, imgs, _ = mllama
    cfg = CONFIGS[name]["vision"]
    t, mt = cfg["image_size"], cfg["max_num_tiles"]
    P = (t // cfg["patch_size"]) ** 2 + 1
    proc = processor(size={"height": t, "width": t}, max_image_tiles=mt)
    for hw in [(t, t), (2 * t - 3, t - 2)]:  # 1 tile, 2 tiles
        path = imgs[hw]
        out = tmp_path / "x.safetensors"
        p = subprocess.run([str(xattn_driver), str(out), str(d), str(path)], capture_output=True, text=True,
                           timeout=120)
        assert "Sanitizer" not in p.stderr and "runtime error:" not in p.stderr, p.stderr
        assert p.returncode == 0, p.stderr
        got = load_file(str(out))
        inputs = proc(Image.open(path), return_tensors="pt")
        with torch.no_grad():
            st = model.model.vision_model(pixel_values=inputs["pixel_values"],
                                          aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                          aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
            cas = model.model.multi_modal_projector(st).reshape(-1, st.shape[-2], CONFIGS[name]["text_d"])
        assert cas.shape[0] == mt and got["rows"].item() == mt * P
        ref = cas.reshape(mt * P, -1)
        err = scaled_err(got["xattn"], ref)
        nt = inputs["num_tiles"][0][0]
        ERRS.append((f"{name} cross-attention states, all {mt} tiles ({nt} real)", err))
        assert err <= 1e-4, err
        assert torch.equal(got["xattn"][:nt * P], got["embeddings"])
        if nt < mt:  # the padding tiles' rows are not zeros: they matter to the text side
            assert ref[nt * P:].abs().max() > 0.1


def test_report():
    """Prints the measured errors (pytest -s)."""
    for name, err in ERRS:
        print(f"mllama {name}: scaled max error {err:.2e}")
