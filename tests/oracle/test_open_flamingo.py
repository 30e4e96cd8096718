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
    perc = lambda **kw: dict(cfg, perceiver=dict(cfg["perceiver"], **kw))  # noqa: E731
    attempt("depth", "perceiver.layers.2.0.norm_media.weight", config=perc(depth=3))
    attempt("latents", "perceiver.latents", "[4, 32]", config=perc(num_latents=4))
    attempt("heads", "perceiver.layers.0.0.to_q.weight", "[12, 32]", config=perc(heads=3, dim_head=4))
    attempt("ff_mult", "perceiver sizes out of range", config=perc(ff_mult=0))
    attempt("feature", "vision_feature 'cls'", config=dict(cfg, vision_feature="cls"))
    attempt("feature_type", "vision_feature", config=dict(cfg, vision_feature=3))
    attempt("time_embs", "media_time_embs", tensors=dict(sd, **{"perceiver.media_time_embs": torch.zeros(2, 1, 32)}))
    # a SigLIP tower where a CLIP one belongs
    from transformers import SiglipVisionConfig, SiglipVisionModel
    d = tmp_path / "siglip"
    d.mkdir()
    shutil.copy(tmp_path / "m" / "model.safetensors", d)
    (d / "config.json").write_text(json.dumps(cfg))
    sig = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             image_size=S, patch_size=14)
    SiglipVisionModel(sig).save_pretrained(d / "vision_tower")
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


# ---- scripts/convert_open_flamingo.py --------------------------------------------------------------------------

CONVERT = ROOT / "scripts" / "convert_open_flamingo.py"


def convert(*args):
    """The script as a command."""
    return subprocess.run([sys.executable, str(CONVERT), *map(str, args)], capture_output=True, text=True, timeout=300)


def convert_here(*args):
    """The script's main() in this process (no start-up of torch per call), as a CompletedProcess."""
    import contextlib
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location("convert_open_flamingo", CONVERT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = mod.main(list(map(str, args)))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def users_files(model, d, full_clip=False, **ckpt_kw):
    """What an OpenFlamingo user has for `model`: its checkpoint.pt (trainable parameters), the Hugging Face Llama
    it was built on (the vocabulary before OpenFlamingo's tokens, with that tokenizer) and the CLIP tower (a
    CLIPVisionModel, or with full_clip a whole CLIPModel as openai/clip-vit-large-patch14 is)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaForCausalLM
    d.mkdir()
    torch.save(trainable_state_dict(model, **ckpt_kw), d / "checkpoint.pt")
    tok = base_tokenizer()
    V = len(tok)
    cfg = model.lang_encoder.config.to_dict()
    cfg.update(vocab_size=V, pad_token_id=None)
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})).eval()
    sd = plain_llama(model).state_dict()
    sd = {k: (v[:V] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in sd.items()}
    llama.load_state_dict(sd)
    llama.save_pretrained(d / "llama", safe_serialization=True)
    tok.save_pretrained(d / "llama")
    tower = model.vision_encoder
    if full_clip:
        tc = tower.config.to_dict()
        clip = CLIPModel(CLIPConfig(vision_config=tc, text_config=dict(hidden_size=16, intermediate_size=32,
                                                                         num_hidden_layers=1, num_attention_heads=2,
                                                                         vocab_size=64, bos_token_id=0,
                                                                         eos_token_id=1, pad_token_id=1),
                                    projection_dim=8)).eval()
        clip.vision_model.load_state_dict(tower.state_dict())
        clip.save_pretrained(d / "clip", safe_serialization=True)
    else:
        tower.save_pretrained(d / "clip", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}).save_pretrained(d / "clip")
    # the added tokens' lm_head rows: the converter writes the mean of the others (OpenFlamingo never trains them)
    with torch.no_grad():
        head = model.lang_encoder.lm_head.weight
        head[V:] = head[:V].mean(0)
    return d / "checkpoint.pt", d / "llama", d / "clip"


@pytest.mark.parametrize("case", ["bare", "training_checkpoint", "full_clip"])
def test_convert(tmp_path, case):
    model = make_open_flamingo(tmp_path / "ref", n_every=2, immediate=case != "bare", seed=6,
                               vision_feature="patch_ln_post" if case == "full_clip" else "patch")
    ckpt, llama, clip = users_files(model, tmp_path / "user", full_clip=case == "full_clip",
                                    both_names=case == "bare", wrapped=case == "training_checkpoint")
    out = tmp_path / "converted"
    extra = ["--vision-feature", model.vision_feature, "--xattn-heads", "2", "--perceiver-heads", "2"]
    extra += [] if model.immediate else ["--attend-all-media"]  # (heads: OpenFlamingo's are 8; the tiny model's 2)
    if case == "training_checkpoint":
        extra += ["--cross-attn-every-n-layers", "2"]
    run_it = convert if case == "bare" else convert_here  # once as a command; in this process otherwise (faster)
    p = run_it(ckpt, "--llama", llama, "--vision", clip, "-o", out, *extra)
    assert p.returncode == 0, p.stderr
    print(p.stdout.strip())
    cfg = json.loads((out / "config.json").read_text())
    want = json.loads((tmp_path / "ref" / "config.json").read_text())
    for k in ("architectures", "model_type", "cross_attn_every_n_layers", "only_attend_immediate_media",
              "image_token_id", "end_of_chunk_token_id", "xattn_heads", "xattn_dim_head", "xattn_ff_mult", "vis_dim",
              "vision_tower", "vision_feature", "perceiver"):
        assert cfg[k] == want[k], (k, cfg[k], want[k])
    assert cfg["text_config"]["vocab_size"] == want["text_config"]["vocab_size"]
    names = set(load_file(str(out / "model.safetensors")))
    assert names == set(load_file(str(tmp_path / "ref" / "model.safetensors"))), names
    assert not any(".gated_cross_attn_layer." in n for n in names)
    # the converted directory is the same model: the reference on it, and mmbridge's vision side
    again = load_open_flamingo(out)
    ids = prompt_ids(model, PROMPT)
    px = torch.randn(2, 3, S, S)
    err = scaled_err(ref_logits(again, px, ids), ref_logits(model, px, ids))
    print(f"converted ({case}): reference logits {err:.2e}")
    assert err <= 1e-6
    save_file({"pixel_values": px}, str(tmp_path / "px.safetensors"))
    got, _ = encode(out, ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors")
    assert report(f"converted ({case}): mmbridge vision", got, ref_vision(model, px)) <= 1e-4
    # never over an existing directory
    before = sorted(q.name for q in out.iterdir())
    p = convert_here(ckpt, "--llama", llama, "--vision", clip, "-o", out, *extra)
    assert p.returncode != 0 and "exists" in p.stderr and sorted(q.name for q in out.iterdir()) == before


def test_convert_bad_input(tmp_path):
    model = make_open_flamingo(tmp_path / "ref", n_every=2, seed=8)
    ckpt, llama, clip = users_files(model, tmp_path / "user")
    sd = torch.load(ckpt, weights_only=True)

    def attempt(name, *want, checkpoint=None, args=(), llama_dir=llama, clip_dir=clip):
        path = ckpt
        if checkpoint is not None:
            path = tmp_path / f"{name}.pt"
            torch.save(checkpoint, path)
        out = tmp_path / name
        p = convert_here(path, "--llama", llama_dir, "--vision", clip_dir, "-o", out, "--xattn-heads", "2",
                    "--perceiver-heads", "2", *args)
        assert p.returncode != 0 and not out.exists(), p.stderr
        assert not list(tmp_path.glob(f".{name}.tmp-*"))
        for w in want:
            assert w in p.stderr, p.stderr
        print(f"{name}: {p.stderr.strip().splitlines()[-1]}")

    attempt("every", "gated blocks at decoder layers [1, 3]", "[0, 1, 2, 3]", args=["--cross-attn-every-n-layers", "1"])
    blk = "lang_encoder.model.layers.1.gated_cross_attn_layer.attn.to_kv.weight"
    attempt("missing", "gated block 1", "attn.to_kv.weight", checkpoint={
        k: v for k, v in sd.items() if k not in (blk, "lang_encoder.gated_cross_attn_layers.1.attn.to_kv.weight")})
    differ, gate = dict(sd), "lang_encoder.gated_cross_attn_layers.1.attn_gate"
    differ[gate] = sd[gate] + 1
    attempt("differ", "differ", checkpoint=differ)
    attempt("perceiver", "perceiver.layers.1.1.3.weight",
            checkpoint={k: v for k, v in sd.items() if k != "perceiver.layers.1.1.3.weight"})
    attempt("vision_encoder", "fine-tuned vision encoder",
            checkpoint=dict(sd, **{"vision_encoder.conv1.weight": torch.zeros(1)}))
    attempt("mpt", "MPT", checkpoint=dict(sd, **{"lang_encoder.transformer.blocks.0.attn.Wqkv.weight": torch.zeros(1)}))
    attempt("unknown", "does not know", checkpoint=dict(sd, **{"lang_encoder.something": torch.zeros(1)}))
    attempt("vocab", "embed_tokens", "[306, 48]",
            checkpoint=dict(sd, **{"lang_encoder.model.embed_tokens.weight": torch.zeros(306, 48)}))
    attempt("pickle", "--unsafe-pickle", checkpoint={"model_state_dict": sd, "args": argparse_like()})
    # an MPT language model directory
    mpt = tmp_path / "mpt"
    shutil.copytree(llama, mpt)
    cfg = json.loads((mpt / "config.json").read_text())
    (mpt / "config.json").write_text(json.dumps(dict(cfg, model_type="mpt")))
    attempt("mpt_dir", "only Llama", llama_dir=mpt)
    # a CLIP tower of another width
    from transformers import CLIPVisionConfig, CLIPVisionModel
    CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=S, patch_size=14)).save_pretrained(tmp_path / "clip48")
    attempt("tower_width", "48 wide", "resampler 32", clip_dir=tmp_path / "clip48")


class argparse_like:  # a pickled object that torch.load(weights_only=True) refuses
    pass
