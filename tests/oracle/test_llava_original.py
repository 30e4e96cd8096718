"""Original-layout LLaVA checkpoints (model.mm_projector.*, mm_projector_type), built in the test
from torch modules that follow LLaVA's builder (llava/model/multimodal_projector/builder.py):
identity, linear, mlpNx_gelu, and the SimpleResBlock residual MLP. Also sharded checkpoints."""
import json
import re

import pytest
import torch
from torch import nn
from safetensors.torch import save_file

from conftest import VISION, connect, run, save_features, scaled_err, write_json

D_V, D_T = VISION["hidden_size"], 48


class SimpleResBlock(nn.Module):
    """LLaVA's residual MLP: x = LayerNorm(x); return x + Linear-GELU-Linear(x)."""

    def __init__(self, c):
        super().__init__()
        self.pre_norm = nn.LayerNorm(c)
        self.proj = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, c))

    def forward(self, x):
        x = self.pre_norm(x)
        return x + self.proj(x)


def build_projector(kind, d_in, d_out):
    """The module LLaVA's build_vision_projector returns for mm_projector_type `kind`."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "identity":
        return nn.Identity()
    if kind == "simple_res":
        return SimpleResBlock(d_in)
    depth = int(re.match(r"^mlp(\d+)x_gelu$", kind).group(1))
    mods = [nn.Linear(d_in, d_out)]
    for _ in range(1, depth):
        mods += [nn.GELU(), nn.Linear(d_out, d_out)]
    return nn.Sequential(*mods)


def make_original(d, kind, select_layer=-2, select_feature="patch", seed=0, d_out=D_T, llm_tensor=True):
    torch.manual_seed(seed)
    proj = build_projector(kind, D_V, d_out).eval()
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_(0, 0.3)
    d.mkdir()
    write_json(d / "config.json", {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": d_out if kind not in ("identity", "simple_res") else D_V,
        "mm_hidden_size": D_V, "mm_projector_type": kind,
        "mm_vision_select_layer": select_layer, "mm_vision_select_feature": select_feature,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    })
    sd = {f"model.mm_projector.{k}": v.contiguous() for k, v in proj.state_dict().items()}
    if llm_tensor:  # an LLM tensor, ignored by connect and encode (they open the vision path alone)
        sd["model.embed_tokens.weight"] = torch.randn(16, d_out)
    save_file(sd, str(d / "model.safetensors"))
    return proj


def select(hs, layer, feature):
    """CLIPVisionTower.feature_select: hidden_states[layer], CLS dropped for 'patch'."""
    x = hs[layer]
    return x[:, 1:] if feature == "patch" else x


@pytest.mark.parametrize("kind", ["linear", "identity", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu", "simple_res"])
def test_projector_matches_torch(tmp_path, clip_hidden_states, kind):
    proj = make_original(tmp_path / "m", kind)
    hs = clip_hidden_states
    save_features(tmp_path / "f.safetensors", hs, {"n_hidden_states": str(len(hs))})
    with torch.no_grad():
        ref = proj(select(hs, -2, "patch"))
    got, _ = connect(tmp_path / "m", tmp_path / "f.safetensors", tmp_path / "o.safetensors")
    assert got.shape == ref.shape
    err = scaled_err(got, ref)
    print(f"{kind}: scaled max err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("layer,feature", [(-1, "cls_patch"), (1, "patch"), (0, "cls_patch")])
def test_select_layer_and_feature(tmp_path, clip_hidden_states, layer, feature):
    proj = make_original(tmp_path / "m", "mlp2x_gelu", layer, feature)
    hs = clip_hidden_states
    save_features(tmp_path / "f.safetensors", hs, {"n_hidden_states": str(len(hs))})
    with torch.no_grad():
        ref = proj(select(hs, layer, feature))
    got, _ = connect(tmp_path / "m", tmp_path / "f.safetensors", tmp_path / "o.safetensors")
    assert got.shape == ref.shape
    assert scaled_err(got, ref) <= 1e-4


def test_negative_layer_needs_the_hidden_state_count(tmp_path, clip_hidden_states):
    make_original(tmp_path / "m", "linear", -2)
    save_features(tmp_path / "f.safetensors", clip_hidden_states)  # no n_hidden_states metadata
    p = run("connect", tmp_path / "m", "--features", tmp_path / "f.safetensors", "-o", tmp_path / "o.safetensors",
            check=False)
    assert p.returncode == 1
    assert "hidden_states[-2]" in p.stderr and "unknown" in p.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_sharded_checkpoint(tmp_path, clip_hidden_states):
    """model.safetensors.index.json with the projector split over two shards."""
    proj = make_original(tmp_path / "m", "mlp2x_gelu")
    d = tmp_path / "m"
    (d / "model.safetensors").unlink()
    sd = {f"model.mm_projector.{k}": v.contiguous() for k, v in proj.state_dict().items()}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / fname))
        weight_map.update({k: fname for k in keys})
    write_json(d / "model.safetensors.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map})
    hs = clip_hidden_states
    save_features(tmp_path / "f.safetensors", hs, {"n_hidden_states": str(len(hs))})
    with torch.no_grad():
        ref = proj(select(hs, -2, "patch"))
    got, _ = connect(d, tmp_path / "f.safetensors", tmp_path / "o.safetensors")
    assert scaled_err(got, ref) <= 1e-4


def test_info_reports_costs(tmp_path):
    # info opens the whole checkpoint, its LLM too when the weights say there is one: none here
    make_original(tmp_path / "m", "mlp2x_gelu", llm_tensor=False)
    out = run("info", tmp_path / "m").stdout
    params = D_V * D_T + D_T + D_T * D_T + D_T
    assert "llava-original" in out and "mlp2x_gelu" in out
    assert re.search(rf"parameters:\s+{params}\b", out), out
    assert re.search(r"input width:\s+32\b", out) and re.search(r"output width:\s+48\b", out)
    assert "hidden_states[-2]" in out
