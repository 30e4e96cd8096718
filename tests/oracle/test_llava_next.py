"""LLaVA-NeXT (LlavaNextForConditionalGeneration) and LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)
against transformers, on tiny random checkpoints saved with save_pretrained and their processors:
  - AnyRes pixel_values (the base image, the best resolution's tiles) and the token counts equal the processor's,
    for image sizes chosen so that every pinpoint, both unpadding branches (rows or columns cut) and OneVision's
    downscale (and its absence) are taken;
  - the packed image features within 1e-4 scaled; prompt logits within 1e-4; 24 greedy tokens identical;
  - wrong variants are far off: bilinear instead of bicubic tiles, round instead of floor in the unpadding, no
    image_newline;
  - bad input: pinpoints that do not divide into tiles (exit non-zero, no output), more images than markers."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import compile_driver, fails, run, scaled_err
from test_decoder import CHATML, randomize, text_config, tiny_tokenizer

N_NEW = 24
PROMPT = "Describe the image."
S, PATCH = 56, 14  # the tile: a 4 x 4 grid of patches
PINS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
# (height, width): 1x2, 2x1, 2x2, 3x1, 1x3 grids; rows cut, columns cut, a square, tiny and large images
SIZES = [(45, 97), (97, 45), (120, 118), (150, 40), (33, 150), (56, 56), (300, 170), (20, 31), (130, 61), (34, 97), (27, 20),
         (69, 42)]
OV_PINS = [[S * (1 + i // 4), S * (1 + i % 4)] for i in range(16)]
OV_SIZES = [(45, 97), (230, 220), (120, 200), (224, 60), (56, 56), (190, 230)]


def vision_config(kind):
    from transformers import CLIPVisionConfig, SiglipVisionConfig
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=S,
                  patch_size=PATCH)
    return CLIPVisionConfig(projection_dim=16, **common) if kind == "clip" else SiglipVisionConfig(**common)


def make(d, family, arch="llama", layer=-2, strategy="default", seed=0, tower="clip"):
    """A random model, its tokenizer and processor saved in d; returns (model, processor)."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, PreTrainedTokenizerFast)
    vocab, img_tok = tiny_tokenizer(d)
    torch.manual_seed(seed)
    if family == "next":
        cfg = LlavaNextConfig(vision_config=vision_config(tower), text_config=text_config(arch, vocab_size=vocab, max_position_embeddings=512),
                              image_token_index=img_tok, vision_feature_layer=layer,
                              vision_feature_select_strategy=strategy, image_grid_pinpoints=PINS)
        model = LlavaNextForConditionalGeneration(cfg).eval()
    else:
        cfg = LlavaOnevisionConfig(vision_config=vision_config("siglip"), text_config=text_config("qwen2", vocab_size=vocab, max_position_embeddings=512),
                                   image_token_index=img_tok, video_token_index=0, vision_feature_layer=layer,
                                   vision_feature_select_strategy="full", image_grid_pinpoints=OV_PINS,
                                   vision_aspect_ratio="anyres_max_4")
        model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # a projector far from zero, so the image changes the text
        for p in model.model.multi_modal_projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.model.image_newline.copy_(torch.randn(model.model.image_newline.shape, generator=g))
    model.generation_config.eos_token_id = None
    model.save_pretrained(d, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), eos_token="<|im_end|>")
    if family == "next":
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                        image_grid_pinpoints=PINS)
        proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, chat_template=CHATML,
                                  vision_feature_select_strategy=strategy,
                                  num_additional_image_tokens=1 if tower == "clip" else 0)
    else:
        from transformers.processing_utils import ProcessorMixin
        ip = LlavaOnevisionImageProcessorPil(size={"height": S, "width": S}, image_grid_pinpoints=OV_PINS)
        # no video processor here (it needs torchvision): the class check is skipped for it
        check = ProcessorMixin.check_argument_for_proper_class
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None if arg is None else check(
            self, name, arg)
        try:
            proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, chat_template=CHATML,
                                           num_image_tokens=(S // PATCH) ** 2, vision_aspect_ratio="anyres_max_4")
        finally:
            ProcessorMixin.check_argument_for_proper_class = check
    if family == "next":
        proc.save_pretrained(d)
    else:  # without a video processor save_pretrained fails: the image processor alone
        ip.save_pretrained(d)
    return model, proc


def images(tmp_path, sizes, seed=3):
    rs = np.random.RandomState(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        p = tmp_path / f"img{i}_{h}x{w}.png"
        Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return compile_driver("mllm_driver", tmp_path_factory.mktemp("driver"))


@pytest.fixture(scope="module")
def nxt(tmp_path_factory):
    d = tmp_path_factory.mktemp("next") / "m"
    model, proc = make(d, "next")
    return model, proc, d


@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    d = tmp_path_factory.mktemp("ov") / "m"
    model, proc = make(d, "ov", layer=-1, strategy="full")
    return model, proc, d


def ref_features(model, proc, path):
    """The processor's pixel_values, image_sizes, the image's token count in input_ids, and the packed features."""
    img = Image.open(path).convert("RGB")
    inputs = proc(text="<image>", images=img, return_tensors="pt")
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        f = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    f = f.pooler_output if hasattr(f, "pooler_output") else f
    return inputs, n, torch.cat(list(f))


def encode(d, path, out):
    run("encode", d, path, "-o", out)
    return load_file(str(out))["embeddings"][0]


@pytest.mark.parametrize("fam", ["next", "ov"])
def test_features_and_token_counts(fam, request, tmp_path):
    model, proc, d = request.getfixturevalue("nxt" if fam == "next" else "ov")
    from transformers.image_processing_utils import select_best_resolution
    pins = PINS if fam == "next" else OV_PINS
    grids, down = set(), set()
    for path in images(tmp_path, SIZES if fam == "next" else OV_SIZES):
        inputs, n, feats = ref_features(model, proc, path)
        got = encode(d, path, tmp_path / "e.safetensors")
        assert got.shape[0] == n == feats.shape[0], (path.name, got.shape, n, feats.shape)
        err = scaled_err(got, feats)
        print(f"{path.name}: {n} tokens, {inputs['pixel_values'].shape[1]} tiles, scaled err {err:.2e}")
        assert err <= 1e-4, path.name
        grids.add(tuple(select_best_resolution(tuple(inputs["image_sizes"][0].tolist()), pins)))
        if fam == "ov":  # anyres_max_4: downscaled when the unpadded grid holds more than 1.1^2 x 4 tiles' worth
            gh, gw = [x // S for x in select_best_resolution(tuple(inputs["image_sizes"][0].tolist()), pins)]
            down.add(n < (S // PATCH) ** 2 * (1 + gh * gw) and gh * gw > 4)
    assert len(grids) >= (5 if fam == "next" else 4), grids  # the pinpoints taken
    assert fam == "next" or down == {True, False}, down


def test_pixel_values_are_the_processors(nxt, tmp_path):
    """The tiles mmbridge cuts (through a C driver over mmb_preprocess_run) equal pixel_values; bilinear tiles do
    not."""
    from transformers import LlavaNextImageProcessorPil
    model, proc, d = nxt
    exe = compile_driver("preprocess_driver", tmp_path)
    for path in images(tmp_path, SIZES):
        px = proc.image_processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        out = tmp_path / "px.safetensors"
        p = subprocess.run([str(exe), str(out), str(path), str(d)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        got = load_file(str(out))["pixels.0"].reshape(px.shape)
        assert torch.equal(got, px), (path.name, (got - px).abs().max())
        bil = LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                         image_grid_pinpoints=PINS, resample=2)
        wrong = bil(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        if path.name.startswith("img5_"):  # 56 x 56: resized to itself either way
            continue
        assert (got - wrong).abs().max() > 0.05, path.name


def test_wrong_variants_are_far_off(nxt, tmp_path):
    """Round instead of int() in unpad_image (a different token count or window for some size), and no
    image_newline, are far from what mmbridge writes."""
    import transformers.models.llava_next.modeling_llava_next as mod
    model, proc, d = nxt
    orig = mod.unpad_image

    def unpad_round(tensor, original_size):
        oh, ow = [int(x) for x in original_size]
        ch, cw = tensor.shape[1:]
        if ow / oh > cw / ch:
            nh = round(oh * cw / ow)
            pad = round((ch - nh) / 2)
            return tensor[:, pad:ch - pad, :]
        nw = round(ow * ch / oh)
        pad = round((cw - nw) / 2)
        return tensor[:, :, pad:cw - pad]
    differs = 0
    for path in images(tmp_path, SIZES):
        got = encode(d, path, tmp_path / "e.safetensors")
        _, _, feats = ref_features(model, proc, path)
        mod.unpad_image = unpad_round
        try:
            _, _, wrong = ref_features(model, proc, path)
        finally:
            mod.unpad_image = orig
        if wrong.shape != got.shape or scaled_err(got, wrong) > 1e-2:
            differs += 1
        # no image_newline: the rows without it
        nl = model.model.image_newline.detach()
        keep = ~torch.isclose(feats, nl[None]).all(-1)
        assert keep.sum() < feats.shape[0]
        assert feats[keep].shape != got.shape
    print(f"round instead of floor: {differs} of {len(SIZES)} sizes differ")
    assert differs >= 3, differs


@pytest.mark.parametrize("fam", ["next", "ov"])
def test_generate_matches_transformers(fam, driver, request, tmp_path):
    model, proc, d = request.getfixturevalue("nxt" if fam == "next" else "ov")
    path = images(tmp_path, [(97, 45) if fam == "next" else (230, 220)], seed=9)[0]
    out = tmp_path / "out.safetensors"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:exitcode=99")
    p = subprocess.run([str(driver), str(out), str(d), str(path), PROMPT, str(N_NEW)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert "Sanitizer" not in p.stderr and "runtime error:" not in p.stderr, p.stderr
    assert p.returncode == 0, p.stderr
    got = load_file(str(out))
    text = proc.apply_chat_template([{"role": "user", "content": "<image>\n" + PROMPT}], tokenize=False,
                                    add_generation_prompt=True)
    inputs = proc(text=text, images=Image.open(path).convert("RGB"), return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert got["prompt_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0)
        logits = model(**inputs).logits[0]
    err = scaled_err(got["logits"], logits)
    print(f"{fam}: prompt {len(ids)}, logits scaled err {err:.2e}")
    assert err <= 1e-4
    assert got["generated"].tolist() == ref[0, len(ids):].tolist()


def test_info_compare_and_cli_generate(nxt, tmp_path):
    model, proc, d = nxt
    p = run("info", d)
    assert "llava_next" in p.stdout, p.stdout
    p = run("compare", d)  # measured on an image of the tower's size: its base tile and the 56x112 tiles
    _, n, _ = ref_features(model, proc, images(tmp_path, [(S, S)])[0])
    assert "tower+connector" in p.stdout and f"| {n:6d} |" in p.stdout, p.stdout
    path = images(tmp_path, [(45, 97)])[0]
    p = run("generate", d, "--image", path, "--prompt", PROMPT, "-n", "4")
    assert p.stdout.strip() or p.stderr


def test_bad_input(nxt, tmp_path):
    import shutil
    model, proc, d = nxt
    path = images(tmp_path, [(45, 97)])[0]
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["image_grid_pinpoints"] = [[56, 100], [112, 56]]
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.safetensors"
    fails(["encode", bad, path, "-o", out], "image_grid_pinpoints[0]", "does not divide")
    assert not out.exists()
    bad2 = tmp_path / "bad2"
    shutil.copytree(d, bad2)
    pc = json.loads((bad2 / "processor_config.json").read_text())
    pc["image_processor"]["image_grid_pinpoints"] = [[56, 100], [112, 56]]
    (bad2 / "processor_config.json").write_text(json.dumps(pc))
    fails(["encode", bad2, path, "-o", out], "does not divide")
    assert not out.exists()
    fails(["generate", d, "--image", path, "--image", path, "--prompt", "<image> only one", "-n", "2", "--raw"],
          "1 image marker(s)", "2 image(s)")


@pytest.mark.parametrize("tower,layer,strategy,arch", [("clip", [-2, 0, 2], "default", "mistral"),
                                                        ("siglip", -1, "full", "qwen2"),
                                                        ("siglip", [1, -1], "full", "llama")])
def test_feature_layers_and_strategies(tower, layer, strategy, arch, tmp_path):
    """vision_feature_layer as an int or a list (concatenated on channels), the default (CLS dropped) and full
    strategies, CLIP and SigLIP towers, the Llama, Mistral and Qwen2 decoders."""
    d = tmp_path / "m"
    model, proc = make(d, "next", arch=arch, layer=layer, strategy=strategy, tower=tower, seed=4)
    for path in images(tmp_path, [(45, 97), (150, 40), (120, 118)], seed=5):
        inputs, n, feats = ref_features(model, proc, path)
        got = encode(d, path, tmp_path / "e.safetensors")
        assert got.shape[0] == n == feats.shape[0]
        assert scaled_err(got, feats) <= 1e-4, path.name


def test_two_images_of_two_sizes_in_one_prompt(nxt, tmp_path):
    """Each image of a prompt tiled and unpadded for its own size, in order; 24 greedy tokens and the logits."""
    model, proc, d = nxt
    paths = images(tmp_path, [(45, 97), (150, 40)], seed=12)
    text = "<image>\n<image>\nCompare them."
    logits_out = tmp_path / "logits.safetensors"
    p = run("generate", d, "--image", paths[0], "--image", paths[1], "--prompt", text, "-n", str(N_NEW),
            "--ignore-eos", "--print-ids", "--logits", logits_out)
    got = [int(x) for x in p.stdout.split()]
    templ = proc.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    inputs = proc(text=templ, images=[Image.open(x).convert("RGB") for x in paths], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0)
        logits = model(**inputs).logits[0]
    n = inputs["input_ids"].shape[1]
    assert got == ref[0, n:].tolist()
    assert scaled_err(load_file(str(logits_out))["logits"][:n], logits) <= 1e-4


def test_bare_pixels_and_bad_configs_are_refused(nxt, tmp_path):
    """Preprocessed pixels alone carry no image size (the unpadding needs it): refused. A vision_aspect_ratio
    that is not anyres_max_N, pinpoints that are no list of pairs, and a processor whose pinpoints are not the
    model's are refused with messages naming them."""
    import shutil
    from safetensors.torch import save_file
    model, proc, d = nxt
    px = tmp_path / "px.safetensors"
    save_file({"pixel_values": torch.zeros(3, 3, S, S)}, str(px))
    out = tmp_path / "o.safetensors"
    fails(["encode", d, "--pixels", px, "-o", out], "image's own size")
    assert not out.exists()
    path = images(tmp_path, [(45, 97)])[0]
    for i, (key, val, needle) in enumerate([("image_grid_pinpoints", [56, 112], "image_grid_pinpoints[0]"),
                                            ("image_grid_pinpoints", [[56, 112, 3]], "image_grid_pinpoints[0]"),
                                            ("image_grid_pinpoints", [[112, 56]], "not config.json's"),
                                            ("vision_feature_select_strategy", "cls", "'cls'"),
                                            ("vision_feature_layer", 7, "vision_feature_layer 7")]):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(d, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[key] = val
        (bad / "config.json").write_text(json.dumps(cfg))
        fails(["encode", bad, path, "-o", out], needle)
        assert not out.exists()


def test_video_is_refused(ov, tmp_path):
    """OneVision's video path (2x2 bilinear pooling per frame) is not implemented: --video refuses, writing nothing,
    rather than tiling each frame as an image."""
    model, proc, d = ov
    frames = tmp_path / "frames"
    frames.mkdir()
    images(frames, [(40, 60)] * 3)
    out = tmp_path / "o.safetensors"
    fails(["encode", d, "--video", frames, "-o", out], "not implemented")
    assert not out.exists()


def test_onevision_bad_configs(ov, tmp_path):
    """OneVision: a vision_aspect_ratio other than anyres_max_N, and the default strategy on a tower without CLS
    (its tiles would not fill their grid), are refused."""
    import shutil
    model, proc, d = ov
    path = images(tmp_path, [(45, 97)])[0]
    out = tmp_path / "o.safetensors"
    for i, (key, val, needle) in enumerate([("vision_aspect_ratio", "anyres", "vision_aspect_ratio 'anyres'"),
                                            ("vision_aspect_ratio", "anyres_max_x", "anyres_max_N"),
                                            ("vision_feature_select_strategy", "default", "'default' drops")]):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(d, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[key] = val
        (bad / "config.json").write_text(json.dumps(cfg))
        fails(["encode", bad, path, "-o", out], needle)
        assert not out.exists()


@pytest.mark.parametrize("layout", ["newer", "hub"])
def test_key_layouts(layout, tmp_path):
    """The in-memory names (model.*) and the hub's older files (vision_tower.vision_model.*, language_model.model.*,
    image_newline: llava-hf/llava-v1.6-*): the same features and logits."""
    import shutil
    from safetensors.torch import save_file
    from conftest import write_layout
    d = tmp_path / "m"
    model, proc = make(d, "next", seed=7)
    write_layout(model, d, layout)
    if layout == "hub":
        sd = load_file(str(d / "model.safetensors"))
        sd["image_newline"] = sd.pop("model.image_newline")
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    names = load_file(str(d / "model.safetensors")).keys()
    assert any(k.startswith("model.vision_tower." if layout == "newer" else "vision_tower.vision_model.")
               for k in names)
    path = images(tmp_path, [(97, 45)])[0]
    _, n, feats = ref_features(model, proc, path)
    got = encode(d, path, tmp_path / "e.safetensors")
    assert got.shape[0] == n and scaled_err(got, feats) <= 1e-4
    logits_out = tmp_path / "logits.safetensors"
    run("generate", d, "--image", path, "--prompt", PROMPT, "-n", "1", "--logits", logits_out)
    templ = proc.apply_chat_template([{"role": "user", "content": "<image>\n" + PROMPT}], tokenize=False,
                                     add_generation_prompt=True)
    inputs = proc(text=templ, images=Image.open(path).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    assert scaled_err(load_file(str(logits_out))["logits"][:inputs["input_ids"].shape[1]], logits) <= 1e-4
