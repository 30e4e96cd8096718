"""The CLIP and SigLIP vision encoders against transformers, hidden state by hidden state, and
`mmbridge encode --pixels` end to end against LlavaForConditionalGeneration.get_image_features."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel)

from conftest import TEXT, VISION, run, scaled_err

# 3 blocks, 4 heads of 8, a 3x3 patch grid (42 / 14) so tokens are not a power of two.
TOWER = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, image_size=42,
             patch_size=14)


def pixels_file(path, n, size, seed=2):
    torch.manual_seed(seed)
    px = torch.randn(n, 3, size, size)
    save_file({"pixel_values": px}, str(path))
    return px


def encode(model_dir, px_path, out, *extra):
    p = run("encode", model_dir, "--pixels", px_path, "-o", out, *extra)
    return load_file(str(out)), p


def randomize_norms(model):
    """transformers initialises LayerNorms to (1, 0); random values make them count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.normal_(0.5, 0.3)


@pytest.mark.parametrize("name,make,taps", [
    ("clip quick_gelu", lambda: CLIPVisionModel(CLIPVisionConfig(**TOWER, hidden_act="quick_gelu")), "0,1,2,-1"),
    ("clip gelu", lambda: CLIPVisionModel(CLIPVisionConfig(**TOWER, hidden_act="gelu")), "0,1,2,-1"),
    ("siglip", lambda: SiglipVisionModel(SiglipVisionConfig(**TOWER, layer_norm_eps=1e-6, vision_use_head=False)),
     "0,1,2,3"),
])
def test_vision_model_every_hidden_state(tmp_path, name, make, taps):
    """Every hidden_states[i] (no post-layernorm) and last_hidden_state (post-layernorm for SigLIP
    only) of a standalone vision checkpoint."""
    torch.manual_seed(0)
    model = make().eval()
    randomize_norms(model)
    model.save_pretrained(tmp_path / "tower")
    px = pixels_file(tmp_path / "px.safetensors", 2, TOWER["image_size"])
    with torch.no_grad():
        ref = model(pixel_values=px, output_hidden_states=True)
    got, _ = encode(tmp_path / "tower", tmp_path / "px.safetensors", tmp_path / "o.safetensors", "--taps", taps)
    for i, h in enumerate(ref.hidden_states):
        err = scaled_err(got[f"hidden_states.{i}"], h)
        print(f"{name} hidden_states[{i}]: {err:.2e}")
        assert err <= 1e-4
    err = scaled_err(got["last_hidden_state"], ref.last_hidden_state)
    print(f"{name} last_hidden_state: {err:.2e}")
    assert err <= 1e-4
    if name == "siglip":  # the post-layernorm really differs from the last block's output
        assert scaled_err(got["hidden_states.3"], ref.last_hidden_state) > 1e-2


def test_full_clip_model_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = CLIPConfig(vision_config=TOWER, text_config=dict(hidden_size=16, intermediate_size=32,
                     num_hidden_layers=1, num_attention_heads=2, vocab_size=64), projection_dim=8)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clipfull")
    px = pixels_file(tmp_path / "px.safetensors", 1, TOWER["image_size"])
    with torch.no_grad():
        ref = model.vision_model(pixel_values=px, output_hidden_states=True)
    got, _ = encode(tmp_path / "clipfull", tmp_path / "px.safetensors", tmp_path / "o.safetensors", "--taps", "-2")
    assert scaled_err(got["hidden_states.2"], ref.hidden_states[-2]) <= 1e-4


def make_llava(d, vision, layer=-2, strategy="default", act="gelu", seed=0):
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), projector_hidden_act=act,
                      vision_feature_layer=layer, vision_feature_select_strategy=strategy, image_token_index=127)
    model = LlavaForConditionalGeneration(cfg).eval()
    randomize_norms(model)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(d)
    return model


@pytest.mark.parametrize("vision,layer,strategy,layout", [
    (CLIPVisionConfig(**TOWER), -2, "default", "saved"),
    (CLIPVisionConfig(**TOWER), -2, "default", "newer"),
    (CLIPVisionConfig(**TOWER), -2, "default", "hub"),
    (CLIPVisionConfig(**TOWER), [0, 2], "full", "saved"),
    (SiglipVisionConfig(**TOWER), -1, "full", "hub"),
])
def test_llava_encode_matches_get_image_features(tmp_path, vision, layer, strategy, layout):
    from conftest import write_layout
    model = make_llava(tmp_path / "llava", vision, layer, strategy)
    write_layout(model, tmp_path / "llava", layout)
    px = pixels_file(tmp_path / "px.safetensors", 3, TOWER["image_size"])
    with torch.no_grad():
        out = model.get_image_features(pixel_values=px, vision_feature_layer=layer,
                                       vision_feature_select_strategy=strategy)
    ref = torch.stack(list(out.pooler_output)) if hasattr(out, "pooler_output") else out
    got, p = encode(tmp_path / "llava", tmp_path / "px.safetensors", tmp_path / "o.safetensors", "--threads", "2")
    assert got["embeddings"].shape == ref.shape
    err = scaled_err(got["embeddings"], ref)
    print(f"llava {type(vision).__name__} layer={layer} {strategy}: encode vs get_image_features {err:.2e}")
    assert err <= 1e-4
    assert p.stdout.count("image ") == 3


def make_original_with_tower(tmp_path, **config):
    """A tiny CLIP tower in tmp_path/tower and an original-layout LLaVA checkpoint (mlp2x_gelu,
    model.mm_projector.*) in tmp_path/llava; returns (tower, projector) as torch modules."""
    import json
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**TOWER)).eval()
    randomize_norms(tower)
    tower.save_pretrained(tmp_path / "tower")
    proj = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 48))
    d = tmp_path / "llava"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 48,
        "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336", **config}))
    save_file({f"model.mm_projector.{k}": v.contiguous() for k, v in proj.state_dict().items()},
              str(d / "model.safetensors"))
    return tower, proj


def test_original_layout_with_separate_vision_tower(tmp_path):
    """An original-layout LLaVA checkpoint (model.mm_projector.*) plus --vision-tower DIR."""
    tower, proj = make_original_with_tower(tmp_path)
    d = tmp_path / "llava"
    px = pixels_file(tmp_path / "px.safetensors", 2, TOWER["image_size"])
    with torch.no_grad():
        ref = proj(tower(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:])
    got, _ = encode(d, tmp_path / "px.safetensors", tmp_path / "o.safetensors", "--vision-tower", tmp_path / "tower")
    assert scaled_err(got["embeddings"], ref) <= 1e-4
    p = run("encode", d, "--pixels", tmp_path / "px.safetensors", "-o", tmp_path / "o2.safetensors", check=False)
    assert p.returncode == 1 and "--vision-tower" in p.stderr and not (tmp_path / "o2.safetensors").exists()


def test_vision_config_disagreeing_with_tensors(tmp_path):
    import json
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TOWER)).save_pretrained(tmp_path / "clip")
    cfg = json.loads((tmp_path / "clip" / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "clip" / "config.json").write_text(json.dumps(cfg))
    pixels_file(tmp_path / "px.safetensors", 1, TOWER["image_size"])
    p = run("encode", tmp_path / "clip", "--pixels", tmp_path / "px.safetensors", "-o", tmp_path / "o.safetensors",
            check=False)
    assert p.returncode == 1
    assert "fc1.weight" in p.stderr and "[80, 32]" in p.stderr and "[96, 32]" in p.stderr
    assert not (tmp_path / "o.safetensors").exists()
