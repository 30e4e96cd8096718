"""OpenFlamingo (fusion A), the vision side and the checkpoint convention (src/models/open_flamingo.c).

The reference is tests/oracle/flamingo_ref.py, written from open_flamingo/src/{helpers,flamingo,flamingo_lm}.py:
tiny random models saved in mmbridge's convention (config.json, model.safetensors under OpenFlamingo's names, the
CLIP tower in vision_tower/). `mmbridge encode` opens the vision path alone, so these tests need nothing of the
LLM side; its logits are tested elsewhere against the same reference. Also the reference's own checks (its
gates and masks wired as OpenFlamingo's) and scripts/convert_open_flamingo.py. Run with -s to see the errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import ROOT, run, scaled_err
from flamingo_ref import (PERCEIVER_DEFAULTS, base_tokenizer, load_open_flamingo, make_open_flamingo, plain_llama,
                          ref_greedy, ref_logits, ref_vision, trainable_state_dict, vision_features)

S = 28  # the tiny tower's image: 2x2 patches of 14 + CLS


def pixels(path, n, seed=2):
    torch.manual_seed(seed)
    px = torch.randn(n, 3, S, S)
    save_file({"pixel_values": px}, str(path))
    return px


def encode(model_dir, inputs, out, *extra, check=True):
    p = run("encode", model_dir, *inputs, "-o", out, *extra, check=check)
    return (load_file(str(out))["embeddings"] if p.returncode == 0 else None), p


def report(label, got, ref):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = scaled_err(got, ref)
    print(f"{label}: {tuple(ref.shape)} scaled max err {err:.2e}")
    return err


# ---- (a) the vision output against the reference -------------------------------------------------------------

@pytest.mark.parametrize("feature", ["patch", "patch_ln_post"])
@pytest.mark.parametrize("n", [1, 2])
def test_vision_matches_reference(tmp_path, feature, n):
    model = make_open_flamingo(tmp_path / "m", vision_feature=feature, seed=n)
    px = pixels(tmp_path / "px.safetensors", n)
    ref = ref_vision(model, px)
    got, p = encode(tmp_path / "m", ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors",
                    "--threads", "2")
    assert report(f"open_flamingo vision ({feature}, {n} image(s))", got, ref) <= 1e-4
    assert got.shape == (n, 3, 32) and "flamingo_perceiver" in p.stdout
    # The test can tell: the other vision_feature, or the CLS token kept, is far off.
    model.vision_feature = "patch" if feature == "patch_ln_post" else "patch_ln_post"
    err = scaled_err(got, ref_vision(model, px))
    model.vision_feature = feature
    with torch.no_grad():
        h = model.vision_encoder(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        if feature == "patch_ln_post":
            h = getattr(model.vision_encoder, "vision_model", model.vision_encoder).post_layernorm(h)
        with_cls = model.perceiver(h[None, :, None])[0]
    print(f"  the other vision_feature: {err:.2e}; CLS kept: {scaled_err(got, with_cls):.2e}")
    assert err > 1e-2 and scaled_err(got, with_cls) > 1e-2


def test_vision_settings_from_config(tmp_path):
    """Perceiver sizes other than the tiny defaults, read from config.perceiver; a block every 2 layers."""
    perc = dict(depth=3, heads=4, dim_head=4, num_latents=5, ff_mult=3)
    model = make_open_flamingo(tmp_path / "m", n_every=2, perceiver=perc, seed=7)
    px = pixels(tmp_path / "px.safetensors", 3)
    got, _ = encode(tmp_path / "m", ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors")
    assert report("open_flamingo vision (perceiver 3x4x4, 5 latents, ff_mult 3)", got, ref_vision(model, px)) <= 1e-4
    info = run("info", tmp_path / "m").stdout
    n = sum(t.numel() for t in model.perceiver.parameters())
    assert f"parameters:       {n}\n" in info, info
    assert "family:           open_flamingo" in info and "tokens per image: 5\n" in info
    assert "connector:        flamingo_perceiver, activation gelu" in info
    assert "image processor:  CLIPImageProcessor" in info  # the tower directory's


def test_vision_defaults(tmp_path):
    """A config without 'perceiver' and 'vision_feature': OpenFlamingo's PerceiverResampler defaults (depth 6,
    8 heads of 64, 64 latents, ff_mult 4) and 'patch' (the released models')."""
    model = make_open_flamingo(tmp_path / "m", perceiver=PERCEIVER_DEFAULTS, seed=5)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["perceiver"], cfg["vision_feature"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    px = pixels(tmp_path / "px.safetensors", 2)
    got, _ = encode(tmp_path / "m", ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors")
    assert report("open_flamingo vision (defaults)", got, ref_vision(model, px)) <= 1e-4
    assert got.shape == (2, 64, 32)


def test_vision_from_image_files(tmp_path):
    """encode on PNG files: the processor is the tower directory's preprocessor_config.json (CLIPImageProcessor),
    the model directory having none."""
    from transformers import CLIPImageProcessor
    model = make_open_flamingo(tmp_path / "m", seed=3)
    assert not (tmp_path / "m" / "preprocessor_config.json").exists()
    proc = CLIPImageProcessor.from_pretrained(tmp_path / "m" / "vision_tower")
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate([(50, 37), (28, 90)]):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    px = torch.cat([torch.as_tensor(np.asarray(proc(Image.open(f).convert("RGB"), return_tensors="np")["pixel_values"]))
                    for f in files])
    got, _ = encode(tmp_path / "m", files, tmp_path / "o.safetensors")
    assert report("open_flamingo vision from image files", got, ref_vision(model, px)) <= 1e-4


def test_vision_bf16(tmp_path):
    """bf16 weights (as the released checkpoints' LLMs often are): converted once; fp32 math on the rounded values."""
    model = make_open_flamingo(tmp_path / "m", seed=4)
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(tmp_path / "m" / "model.safetensors"))
    with torch.no_grad():
        for p in model.perceiver.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    px = pixels(tmp_path / "px.safetensors", 2)
    got, _ = encode(tmp_path / "m", ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors")
    assert report("open_flamingo vision, bf16 perceiver", got, ref_vision(model, px)) <= 1e-4
    assert "BF16" in run("info", tmp_path / "m").stdout


# ---- (b) bad input ---------------------------------------------------------------------------------------------

def test_bad_input(tmp_path):
    make_open_flamingo(tmp_path / "m", seed=1)
    pixels(tmp_path / "px.safetensors", 1)
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())

    def attempt(name, *want, tensors=None, config=None, tower=True):
        d = tmp_path / name
        d.mkdir()
        save_file(sd if tensors is None else tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg if config is None else config))
        if tower:
            shutil.copytree(tmp_path / "m" / "vision_tower", d / "vision_tower")
        out = tmp_path / f"{name}.safetensors"
        _, p = encode(d, ["--pixels", tmp_path / "px.safetensors"], out, check=False)
        assert p.returncode != 0 and not out.exists(), p.stderr
        for w in want:
            assert w in p.stderr, p.stderr
        print(f"{name}: {p.stderr.strip()}")

    attempt("vis_dim", "vis_dim is 48", "32 wide", config=dict(cfg, vis_dim=48))
    attempt("no_tower", "vision_tower", "vision_tower/config.json cannot be read", tower=False)
    attempt("tower_elsewhere", "vision_tower 'clip'", config=dict(cfg, vision_tower="clip"))
    k = "perceiver.layers.1.0.to_kv.weight"
    attempt("missing", k, "missing", tensors={n: t for n, t in sd.items() if n != k})
    attempt("no_latents", "perceiver.latents", tensors={n: t for n, t in sd.items() if n != "perceiver.latents"})
    attempt("depth", "perceiver.layers.2.0.norm_media.weight", config=dict(cfg, perceiver=dict(cfg["perceiver"], depth=3)))
    attempt("latents", "perceiver.latents", "[4, 32]", config=dict(cfg, perceiver=dict(cfg["perceiver"], num_latents=4)))
    attempt("heads", "perceiver.layers.0.0.to_q.weight", "[12, 32]",
            config=dict(cfg, perceiver=dict(cfg["perceiver"], heads=3, dim_head=4)))
    attempt("ff_mult", "perceiver sizes out of range", config=dict(cfg, perceiver=dict(cfg["perceiver"], ff_mult=0)))
    attempt("feature", "vision_feature 'cls'", config=dict(cfg, vision_feature="cls"))
    attempt("feature_type", "vision_feature", config=dict(cfg, vision_feature=3))
    attempt("time_embs", "media_time_embs", tensors=dict(sd, **{"perceiver.media_time_embs": torch.zeros(2, 1, 32)}))
    # a SigLIP tower where a CLIP one belongs
    from transformers import SiglipVisionConfig, SiglipVisionModel
    d = tmp_path / "siglip"
    d.mkdir()
    shutil.copy(tmp_path / "m" / "model.safetensors", d)
    (d / "config.json").write_text(json.dumps(cfg))
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=S, patch_size=14)).save_pretrained(d / "vision_tower")
    _, p = encode(d, ["--pixels", tmp_path / "px.safetensors"], tmp_path / "sig.safetensors", check=False)
    assert p.returncode != 0 and "CLIP" in p.stderr and not (tmp_path / "sig.safetensors").exists(), p.stderr
    # pixels of another size
    save_file({"pixel_values": torch.zeros(1, 3, 42, 42)}, str(tmp_path / "px42.safetensors"))
    _, p = encode(tmp_path / "m", ["--pixels", tmp_path / "px42.safetensors"], tmp_path / "o42.safetensors",
                  check=False)
    assert p.returncode != 0 and "42x42" in p.stderr and not (tmp_path / "o42.safetensors").exists()


# ---- (c) the reference checks itself ---------------------------------------------------------------------------

def prompt_ids(model, text):
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


PROMPT = "Hi there <image>An image of a cat.<|endofchunk|><image>Output: a dog"


def first_image(model, ids):
    return ids.index(model.media_token_id)


@pytest.mark.parametrize("n_every", [1, 2])
def test_reference_zero_gates_is_llama(tmp_path, n_every):
    """tanh(0) = 0: with both gates 0 every block is the identity and the logits are the plain Llama's."""
    model = make_open_flamingo(tmp_path / "m", n_every=n_every, gates=(0.0, 0.0))
    ids = prompt_ids(model, PROMPT)
    px = torch.randn(2, 3, S, S)
    got = ref_logits(model, px, ids)
    with torch.no_grad():
        plain = plain_llama(model)(input_ids=torch.tensor([ids])).logits[0]
    assert scaled_err(got, plain) <= 1e-6
    # and the blocks are really there and wired: a nonzero attention gate changes the positions after an image
    for blk in model.blocks().values():
        blk.attn_gate.data.fill_(0.8)
    assert scaled_err(ref_logits(model, px, ids), plain) > 1e-2


def test_reference_text_before_the_first_image(tmp_path):
    """Immediate mode: the attention of tokens before the first <image> is zeroed, so with ff_gate 0 they come
    out as the plain Llama's, and after it they do not. OpenFlamingo's block applies its FeedForward to every
    token (only the attention is masked), so with a nonzero ff_gate the text before the first image changes too;
    and with only_attend_immediate_media false those tokens see every image with uniform weights (all scores
    masked to -finfo.max, then the row max subtracted)."""
    model = make_open_flamingo(tmp_path / "m", gates=(0.9, 0.0), seed=1)
    ids = prompt_ids(model, PROMPT)
    k = first_image(model, ids)
    assert k > 1
    px = torch.randn(2, 3, S, S)
    with torch.no_grad():
        plain = plain_llama(model)(input_ids=torch.tensor([ids])).logits[0]
    got = ref_logits(model, px, ids)
    assert scaled_err(got[:k], plain[:k]) <= 1e-6
    assert scaled_err(got[k:], plain[k:]) > 1e-2
    for blk in model.blocks().values():
        blk.ff_gate.data.fill_(-0.7)
    assert scaled_err(ref_logits(model, px, ids)[:k], plain[:k]) > 1e-2  # the FeedForward is not masked
    all_media = make_open_flamingo(tmp_path / "ge", immediate=False, gates=(0.9, 0.0), seed=1)
    assert scaled_err(ref_logits(all_media, px, ids)[:k], plain[:k]) > 1e-2


@pytest.mark.parametrize("immediate", [True, False])
def test_reference_media_masks(tmp_path, immediate):
    """One gated block on the token embeddings (before any self-attention mixes the positions), with only the
    first image changed: eq (immediate) lets text after the second <image> see the second image alone and text
    before the first see none; ge lets it see both, and text before the first image sees them all alike."""
    model = make_open_flamingo(tmp_path / "m", immediate=immediate, seed=2)
    ids = prompt_ids(model, PROMPT)
    first, second = [i for i, t in enumerate(ids) if t == model.media_token_id][:2]
    px = torch.randn(2, 3, S, S)
    other = px.clone()
    other[0] = torch.randn(3, S, S)
    blk = model.blocks()[0]
    locs = torch.tensor([ids]) == model.media_token_id
    with torch.no_grad():
        x = model.lang_encoder.model.embed_tokens(torch.tensor([ids]))
        a, b = (blk(x, ref_vision(model, p)[None], locs)[0] for p in (px, other))
    assert scaled_err(a[first:second], b[first:second]) > 1e-2  # the first image's text sees it either way
    if immediate:
        assert torch.equal(a[second:], b[second:]) and torch.equal(a[:first], b[:first])
    else:
        assert scaled_err(a[second:], b[second:]) > 1e-2 and scaled_err(a[:first], b[:first]) > 1e-2


def test_reference_greedy(tmp_path):
    """ref_greedy (KV cache, cached media: new tokens have text_time = the prompt's <image> count) against full
    forwards of the prompt and the tokens so far, where cumsum gives the new tokens that same text time."""
    model = make_open_flamingo(tmp_path / "m", seed=3)
    ids = prompt_ids(model, PROMPT)
    px = torch.randn(2, 3, S, S)
    out = ref_greedy(model, px, ids, 6)
    assert len(out) == 6 and model.media_token_id not in out
    full = ref_logits(model, px, ids + out[:-1])
    assert full[len(ids) - 1:].argmax(-1).tolist() == out
    stop = ref_greedy(model, px, ids, 6, stop_ids=(out[2],))
    assert stop == out[:out.index(out[2]) + 1]


def test_reference_round_trip(tmp_path):
    """load_open_flamingo rebuilds the saved model: the same logits and vision output."""
    model = make_open_flamingo(tmp_path / "m", n_every=2, immediate=False, vision_feature="patch_ln_post", seed=4)
    again = load_open_flamingo(tmp_path / "m")
    ids = prompt_ids(model, PROMPT)
    px = torch.randn(2, 3, S, S)
    assert torch.equal(ref_logits(model, px, ids), ref_logits(again, px, ids))
    assert torch.equal(ref_vision(model, px), ref_vision(again, px))
    assert again.tokenizer.convert_tokens_to_ids("<image>") == model.media_token_id
    assert vision_features(model, px).shape == (2, 4, 32)
