"""Flamingo-style perceiver resamplers (src/connectors/perceiver.c).

IDEFICS (v1): tiny random IdeficsForVisionText2Text checkpoints made with save_pretrained; the
reference is what IdeficsModel.forward hands its gated cross-attention layers (image_hidden_states:
vision_model(...).last_hidden_state, then perceiver_resampler when use_resampler), through
`mmbridge encode` from pixels and from image files (IdeficsImageProcessor, checked pixel for pixel).

OpenFlamingo: transformers has no PerceiverResampler, so the reference is written here from
shared/specs/connectors_catalog.md section 6 (open_flamingo/src/helpers.py); an original-layout
LLaVA checkpoint with mm_projector_type "flamingo_perceiver" and a tiny CLIP tower (--vision-tower).
Run with -s to see the measured errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, IdeficsConfig, IdeficsForVisionText2Text

from conftest import run, save_features, scaled_err
from test_preprocess import driver, run_driver  # noqa: F401  (driver is a fixture)
from test_vit import pixels_file

D, S = 32, 28  # vision width; image 28 = 2x2 patches of 14 + CLS = 5 tokens


def randomize(module, scale=0.15):
    """Norms away from 1/0, other weights large enough that every layer matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.normal_(0.5, 0.3)
            elif "latents" in name or "embs" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, scale)


def report(label, got, ref):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = scaled_err(got, ref)
    print(f"{label}: {tuple(ref.shape)} scaled max err {err:.2e}")
    return err


# ---- IDEFICS v1 --------------------------------------------------------------------------------------

def make_idefics(d, qk_norm=False, resampler=True, seed=0):
    torch.manual_seed(seed)
    cfg = IdeficsConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
        additional_vocab_size=2, use_resampler=resampler,
        vision_config=dict(embed_dim=D, image_size=S, patch_size=14, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=resampler, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=12, qk_layer_norms_perceiver=qk_norm))
    model = IdeficsForVisionText2Text(cfg).eval()
    randomize(model.model.vision_model)
    if resampler:
        randomize(model.model.perceiver_resampler)
    model.save_pretrained(d)
    return model


def image_hidden_states(model, px):
    """IdeficsModel.forward's image_hidden_states for one sample holding all the images: [n, tokens, D]."""
    n = px.shape[0]
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        out = model.model(input_ids=ids, pixel_values=px[None], image_attention_mask=torch.ones(1, 4, n, dtype=torch.long))
    return out.image_hidden_states[0]


def encode(model_dir, inputs, out, *extra, check=True):
    p = run("encode", model_dir, *inputs, "-o", out, *extra, check=check)
    return (load_file(str(out))["embeddings"] if p.returncode == 0 else None), p


def expect_failure(tmp_path, name, tensors, config, extra, *want):
    """A checkpoint tmp_path/name of these tensors and config fails to encode tmp_path/px.safetensors, with
    each of `want` in the message and no output file."""
    d = tmp_path / name
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    out = tmp_path / f"{name}.safetensors"
    _, p = encode(d, ["--pixels", tmp_path / "px.safetensors"], out, *extra, check=False)
    assert p.returncode != 0 and not out.exists(), p.stderr
    for w in want:
        assert w in p.stderr, p.stderr


@pytest.mark.parametrize("qk_norm", [False, True])
def test_idefics_resampler_from_pixels(tmp_path, qk_norm):
    model = make_idefics(tmp_path / "m", qk_norm=qk_norm)
    px = pixels_file(tmp_path / "px.safetensors", 3, S)
    ref = image_hidden_states(model, px)
    got, p = encode(tmp_path / "m", ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors",
                    "--threads", "2")
    assert report(f"idefics resampler qk_norm={qk_norm}", got, ref) <= 1e-4
    assert got.shape == (3, 4, D) and "idefics_perceiver" in p.stdout
    # The test can tell: the latents before the final LayerNorm, or without K/V = [context; latents], are far off.
    with torch.no_grad():
        r = model.model.perceiver_resampler
        ctx = model.model.vision_model(px).last_hidden_state
        lat = r.latents.repeat(3, 1, 1)
        for attn, ff in r.blocks:
            lat = attn(ctx, lat) + lat
            lat = ff(lat) + lat
    assert scaled_err(got, lat) > 1e-2


def test_idefics_without_resampler(tmp_path):
    """use_resampler false: the features are the tower's last_hidden_state (CLS kept, no post_layernorm)."""
    model = make_idefics(tmp_path / "m", resampler=False)
    px = pixels_file(tmp_path / "px.safetensors", 2, S)
    ref = image_hidden_states(model, px)
    got, p = encode(tmp_path / "m", ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors")
    assert report("idefics last_hidden_state", got, ref) <= 1e-4
    assert got.shape == (2, 5, D)
    vm = model.model.vision_model
    with torch.no_grad():
        post = vm.post_layernorm(vm(px).last_hidden_state)
    assert scaled_err(got, post) > 1e-2  # post_layernorm on every token would be wrong
    info = run("info", tmp_path / "m").stdout
    assert "family:           idefics" in info and "tokens per image: 5" in info and "identity" in info


def test_idefics_bf16_weights(tmp_path):
    """The hub's checkpoints are bf16: converted once at load, the result is the fp32 network on the
    bf16-rounded weights."""
    model = make_idefics(tmp_path / "m32", qk_norm=True)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "m")
    model.float()
    px = pixels_file(tmp_path / "px.safetensors", 2, S)
    got, _ = encode(tmp_path / "m", ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors")
    assert report("idefics, bf16 weights", got, image_hidden_states(model, px)) <= 1e-4
    assert "BF16" in run("info", tmp_path / "m").stdout


def test_idefics_hub_style_config(tmp_path):
    """A vision_config as the hub's idefics checkpoints write it: no model_type, hidden_act or layer_norm_eps,
    so IdeficsVisionConfig's defaults (gelu, 1e-5) apply, not CLIP's (quick_gelu)."""
    model = make_idefics(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for k in ("model_type", "hidden_act", "layer_norm_eps", "num_channels"):
        del cfg["vision_config"][k]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    px = pixels_file(tmp_path / "px.safetensors", 1, S)
    got, _ = encode(tmp_path / "m", ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors")
    assert report("idefics, hub-style vision_config", got, image_hidden_states(model, px)) <= 1e-4


def test_idefics_info(tmp_path):
    model = make_idefics(tmp_path / "m", qk_norm=True)
    info = run("info", tmp_path / "m").stdout
    n = sum(p.numel() for p in model.model.perceiver_resampler.parameters())
    assert f"parameters:       {n}\n" in info, info
    assert "tokens per image: 4\n" in info and "connector:        idefics_perceiver, activation relu" in info
    assert "vision encoder:   2 layers, width 32, image 28, patch 14" in info


def save_png(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_idefics_image_files(tmp_path, driver):  # noqa: F811
    """encode on PNG files: IdeficsImageProcessor (square bicubic resize to image_size, CLIP mean/std)
    pixel for pixel, then the model."""
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil
    model = make_idefics(tmp_path / "m")
    IdeficsImageProcessorPil(image_size=S).save_pretrained(tmp_path / "m")
    proc = IdeficsImageProcessorPil.from_pretrained(tmp_path / "m")
    files = []
    for i, (h, w) in enumerate([(50, 37), (20, 90), (28, 28)]):
        files.append(tmp_path / f"im{i}.png")
        save_png(files[-1], h, w, i)
    px = torch.cat([torch.as_tensor(np.asarray(proc(Image.open(f).convert("RGB"), return_tensors="pt")))
                    for f in files])
    for i, f in enumerate(files):  # the C preprocessing alone, against the processor's pixel_values
        run_driver(driver, tmp_path / f"d{i}.safetensors", f, [tmp_path / "m"])
        assert np.array_equal(load_file(str(tmp_path / f"d{i}.safetensors"))["pixels.0"], px[i].numpy())
    ref = image_hidden_states(model, px)
    got, p = encode(tmp_path / "m", files, tmp_path / "o.safetensors")
    assert report("idefics from image files", got, ref) <= 1e-4


def test_idefics_bad_input(tmp_path):
    make_idefics(tmp_path / "m", qk_norm=True)
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    pixels_file(tmp_path / "px.safetensors", 1, S)

    attempt = lambda name, tensors, config, *want: expect_failure(tmp_path, name, tensors, config, [], *want)
    k = "model.perceiver_resampler.blocks.1.0.k_layer_norm.weight"
    attempt("missing", {n: t for n, t in sd.items() if n != k}, cfg, k, "missing")
    bad = dict(sd)
    bad["model.perceiver_resampler.latents"] = torch.zeros(5, D)
    attempt("shape", bad, cfg, "model.perceiver_resampler.latents", "[4, 32]")
    bad = dict(sd)
    bad["model.perceiver_resampler.blocks.0.1.fc.weight"] = torch.zeros(64, D)
    attempt("mlp", bad, cfg, "blocks.0.1.fc.weight", "[128, 32]")
    attempt("heads", sd, dict(cfg, perceiver_config=dict(cfg["perceiver_config"], resampler_n_heads=0)),
            "perceiver sizes out of range")
    attempt("type", sd, dict(cfg, use_resampler="yes"), "use_resampler")
    attempt("tower", {n: t for n, t in sd.items() if "vision_model.encoder.layers.1.mlp.fc2" not in n}, cfg,
            "model.vision_model.encoder.layers.1.mlp.fc2")
    # Pixels of the wrong size.
    save_file({"pixel_values": torch.zeros(1, 3, 42, 42)}, str(tmp_path / "px42.safetensors"))
    _, p = encode(tmp_path / "m", ["--pixels", tmp_path / "px42.safetensors"], tmp_path / "o42.safetensors",
                  check=False)
    assert p.returncode != 0 and "42x42" in p.stderr and not (tmp_path / "o42.safetensors").exists()


# ---- OpenFlamingo PerceiverResampler: the reference, from the spec ---------------------------------------

class PerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head, heads):
        super().__init__()
        self.scale, self.heads = dim_head ** -0.5, heads
        inner = dim_head * heads
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents, concat=True):
        """x (b, T, n1, D), latents (b, T, n2, D); K/V from [x; latents] (concat=False: x only, for the
        sensitivity check)."""
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2) if concat else x).chunk(2, dim=-1)
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, -1).transpose(-3, -2)  # b T h n d
        q, k, v = split(q) * self.scale, split(k), split(v)
        sim = q @ k.transpose(-1, -2)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = (attn @ v).transpose(-3, -2)
        return self.to_out(out.reshape(*out.shape[:-2], -1))


def FeedForward(dim, mult):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverResampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_latents, max_num_media=None, max_num_frames=None, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim)) if max_num_frames else None
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim)) if max_num_media else None
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim, dim_head, heads), FeedForward(dim, ff_mult)])
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, concat=True):
        """x (b, T, F, v, D) -> (b, T, num_latents, D)."""
        b, T, F, v = x.shape[:4]
        if self.frame_embs is not None:
            x = x + self.frame_embs[:F][None, None, :, None, :]
        x = x.reshape(b, T, F * v, -1)
        if self.media_time_embs is not None:
            x = x + self.media_time_embs[:T]
        latents = self.latents.expand(b, T, *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents, concat) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


CLIP_TOWER = dict(hidden_size=D, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=S,
                  patch_size=14)


def make_tower(d, seed=3):
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**CLIP_TOWER)).eval()
    randomize(tower, 0.1)
    tower.save_pretrained(d)
    return tower


def make_flamingo(d, perceiver_kw, config_extra, prefix="model.mm_projector.perceiver.", select_layer=-2, seed=4,
                  llm_tensor=True):
    """An original-layout checkpoint whose mm_projector is OpenFlamingo's PerceiverResampler."""
    torch.manual_seed(seed)
    perc = PerceiverResampler(dim=D, **perceiver_kw).eval()
    randomize(perc)
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 48,
        "mm_hidden_size": D, "mm_projector_type": "flamingo_perceiver", "mm_vision_select_layer": select_layer,
        "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14"}, **config_extra)))
    sd = {prefix + k: v.contiguous() for k, v in perc.state_dict().items()}
    if llm_tensor:  # an LLM tensor, ignored by connect and encode (they open the vision path alone)
        sd["model.embed_tokens.weight"] = torch.randn(16, 48)
    save_file(sd, str(d / "model.safetensors"))
    return perc


def flamingo_reference(perc, tower, px, layer=-2, concat=True):
    """One image's patch features as vision_x (T = 1 media, F = 1 frame) -> (n, num_latents, D)."""
    with torch.no_grad():
        feats = tower(pixel_values=px, output_hidden_states=True).hidden_states[layer][:, 1:]
        return perc(feats[:, None, None], concat)[:, 0]


FLAMINGO_CASES = {
    # heads and dim_head from the config; OpenFlamingo's default: no time or frame embeddings
    "config_heads": (dict(depth=2, dim_head=12, heads=2, num_latents=4),
                     {"mm_perceiver_heads": 2, "mm_perceiver_dim_head": 12}, "model.mm_projector.perceiver."),
    # everything from the tensors (dim_head 64 by default); media_time_embs and frame_embs present;
    # the projector is the resampler itself (no 'perceiver.' level); ff_mult 2
    "inferred_embs": (dict(depth=3, dim_head=64, heads=2, num_latents=6, max_num_media=3, max_num_frames=2, ff_mult=2),
                      {}, "model.mm_projector."),
}


@pytest.mark.parametrize("case", sorted(FLAMINGO_CASES))
def test_flamingo_perceiver_encode(tmp_path, case):
    kw, extra, prefix = FLAMINGO_CASES[case]
    tower = make_tower(tmp_path / "tower")
    # info below opens the whole checkpoint, its LLM too when the weights say there is one: none here
    perc = make_flamingo(tmp_path / "m", kw, extra, prefix, llm_tensor=False)
    px = pixels_file(tmp_path / "px.safetensors", 2, S)
    ref = flamingo_reference(perc, tower, px)
    got, p = encode(tmp_path / "m", ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors",
                    "--vision-tower", tmp_path / "tower", "--threads", "2")
    assert report(f"flamingo perceiver ({case})", got, ref) <= 1e-4
    assert got.shape == (2, kw["num_latents"], D)
    # The test can tell: K/V from the media alone (no latents appended) is far off, and so is leaving out
    # the time and frame embeddings.
    assert scaled_err(got, flamingo_reference(perc, tower, px, concat=False)) > 1e-2
    n = sum(t.numel() for t in perc.parameters())
    if kw.get("max_num_media"):  # only row 0 of each embedding table is used: one media, one frame
        n -= perc.media_time_embs.numel() + perc.frame_embs.numel() - D
        perc.media_time_embs, perc.frame_embs = None, None
        assert scaled_err(got, flamingo_reference(perc, tower, px)) > 1e-2
    info = run("info", tmp_path / "m").stdout
    assert f"parameters:       {n}\n" in info, info
    assert "connector:        flamingo_perceiver" in info


def test_flamingo_perceiver_connect(tmp_path):
    """`connect` on saved hidden states: the resampler as the last stage for features computed elsewhere."""
    kw, extra, prefix = FLAMINGO_CASES["config_heads"]
    tower = make_tower(tmp_path / "tower")
    perc = make_flamingo(tmp_path / "m", kw, extra, prefix, select_layer=-1)
    px = torch.randn(3, 3, S, S)
    with torch.no_grad():
        hs = tower(pixel_values=px, output_hidden_states=True).hidden_states
    save_features(tmp_path / "f.safetensors", hs, {"n_hidden_states": str(len(hs))})
    run("connect", tmp_path / "m", "--features", tmp_path / "f.safetensors", "-o", tmp_path / "o.safetensors")
    got = load_file(str(tmp_path / "o.safetensors"))["embeddings"]
    assert report("flamingo perceiver (connect)", got, flamingo_reference(perc, tower, px, layer=-1)) <= 1e-4


def test_flamingo_perceiver_bad_input(tmp_path):
    kw, extra, prefix = FLAMINGO_CASES["config_heads"]
    make_tower(tmp_path / "tower")
    make_flamingo(tmp_path / "m", kw, extra, prefix)
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    pixels_file(tmp_path / "px.safetensors", 1, S)

    tower = ["--vision-tower", tmp_path / "tower"]
    attempt = lambda name, tensors, config, *want: expect_failure(tmp_path, name, tensors, config, tower, *want)
    p = "model.mm_projector.perceiver."
    attempt("missing", {n: t for n, t in sd.items() if n != p + "layers.1.0.to_kv.weight"}, cfg,
            p + "layers.1.0.to_kv.weight", "missing")
    attempt("no_norm", {n: t for n, t in sd.items() if n != p + "norm.bias"}, cfg, p + "norm.bias")
    bad = dict(sd)
    bad[p + "layers.0.0.to_out.weight"] = torch.zeros(D, 20)
    attempt("shape", bad, cfg, p + "layers.0.0.to_out.weight", "[32, 24]")
    attempt("latents", sd, dict(cfg, mm_perceiver_num_latents=5), p + "latents", "[5, 32]")
    attempt("depth", sd, dict(cfg, mm_perceiver_depth=3), p + "layers.2.0.norm_media.weight")
    attempt("heads", sd, dict(cfg, mm_perceiver_heads=5, mm_perceiver_dim_head=0), "heads x dim_head")
    attempt("width", sd, dict(cfg, mm_hidden_size=48), p + "latents", "[4, 48]")
    attempt("nothing", {"model.embed_tokens.weight": sd["model.embed_tokens.weight"]}, cfg,
            "model.mm_projector.perceiver.latents", "missing")
    bad = dict(sd)
    bad[p + "media_time_embs"] = torch.zeros(2, 1, 7)
    attempt("embs", bad, cfg, p + "media_time_embs")
