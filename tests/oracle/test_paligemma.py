"""PaliGemmaForConditionalGeneration's image path against transformers: the SigLIP tower's last_hidden_state through
PaliGemmaMultiModalProjector's Linear (no 1/sqrt(d) scaling in the installed 5.23), from preprocessed pixels; a
projection that disagrees with the text width refused. The prefix-LM decoding (generate) is not built: refused."""
import json
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

from conftest import run, scaled_err, fails

TOWER = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=4, layer_norm_eps=1e-6)
TEXT = {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300}


def make(tmp_path, seed=0):
    torch.manual_seed(seed)
    cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(**TOWER), text_config=TEXT, image_token_index=299,
                          projection_dim=TEXT["hidden_size"])
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    d = tmp_path / "pg"
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def encode(tmp_path, d, pixels, check=True):
    px, out = tmp_path / "px.safetensors", tmp_path / "out.safetensors"
    save_file({"pixel_values": pixels.contiguous()}, str(px))
    p = run("encode", d, "--pixels", px, "-o", out, check=check)
    return (load_file(str(out))["embeddings"] if p.returncode == 0 else None), p, out


def test_image_features_and_info(tmp_path):
    model, d = make(tmp_path)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got, _, _ = encode(tmp_path, d, pixels)
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pixels).pooler_output
    err = scaled_err(got, ref)
    print(f"paligemma image features: scaled max err {err:.2e}")
    assert got.shape == ref.shape == (2, 64, TEXT["hidden_size"]) and err <= 1e-4
    # the token count is the processor's image_seq_length (num_image_tokens = (32 / 4)^2)
    assert model.config.text_config.num_image_tokens == got.shape[1]
    # the older 1/sqrt(d) scaling would be far off
    assert scaled_err(got, ref / TEXT["hidden_size"] ** 0.5) > 1e-2
    info = run("info", d).stdout
    assert "paligemma" in info


def test_bad_config_refused(tmp_path):
    _, d = make(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 32  # multi_modal_projector.linear.weight is [64, 48]
    (bad / "config.json").write_text(json.dumps(cfg))
    _, p, out = encode(tmp_path, bad, torch.zeros(1, 3, 32, 32), check=False)
    assert p.returncode != 0 and "multi_modal_projector.linear.weight" in p.stderr, p.stderr
    assert not out.exists()
    # generate is refused (the prefix-LM mask is not built), with a message, not a wrong answer
    fails(["generate", d, "--ids", "1,2", "-n", 1])
