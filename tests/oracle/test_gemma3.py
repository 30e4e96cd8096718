"""The Gemma 3 decoder (Gemma3ForCausalLM) against transformers on tiny random checkpoints whose sliding window is
smaller than the prompt, so the local layers' window and their own RoPE base matter: prompt logits, prefill in
pieces + decode steps, 24 greedy tokens; wrong variants (no embedding scaling, RMSNorm w instead of 1 + w, full
attention instead of the sliding window) far off; a config whose shapes disagree with the tensors refused."""
import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from conftest import run, scaled_err, fails
from test_decoder import csv, ids_of, mmb_greedy, mmb_logits, ref_greedy, ref_logits

SHAPE = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-6,
             sliding_window=5, query_pre_attn_scalar=24, rope_theta=10000.0, bos_token_id=None,
             eos_token_id=None, pad_token_id=None,
             layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])


def make(tmp_path, seed=0, name="g3", **kw):
    cfg = dict(SHAPE)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "embed" in n else 0.12))
    model.generation_config.eos_token_id = None
    d = tmp_path / name
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def test_config_is_the_local_global_one(tmp_path):
    model, d = make(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["sliding_window"] < 12
    # the two RoPE bases differ (rope_local_base_freq 10000 vs the global 10000 here would not test it)
    print(cfg.get("rope_parameters"), cfg.get("rope_theta"), cfg.get("rope_local_base_freq"))


@pytest.mark.parametrize("kw", [{}, {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 500.0},
                                                          "sliding_attention": {"rope_type": "default",
                                                                                "rope_theta": 30.0}}},
                                {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
                                {"tie_word_embeddings": False}])
def test_prompt_logits(tmp_path, kw):
    model, d = make(tmp_path, **kw)
    ids = ids_of(12)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    ref = ref_logits(model, ids)
    err = scaled_err(got, ref)
    print(f"gemma3 {kw}: scaled max err {err:.2e}")
    assert got.shape == ref.shape and err <= 1e-4


def test_pieces_decode_and_greedy(tmp_path):
    model, d = make(tmp_path, seed=3)
    ids = ids_of(10, seed=4)
    got, p = mmb_logits(d, tmp_path, "--ids", csv(ids), "--n-batch", 3, "-n", 7, "--print-ids", "--ignore-eos")
    gen = [int(t) for t in p.stdout.split()]
    ref = ref_logits(model, torch.cat([ids, torch.tensor(gen[:6])]))
    assert scaled_err(got, ref) <= 1e-4
    ids = ids_of(8, seed=5)
    mine, _ = mmb_greedy(d, ids, 24)
    assert mine == ref_greedy(model, ids, 24)


def test_wrong_variants_are_far(tmp_path):
    model, d = make(tmp_path, seed=1, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500.0},
                                                       "sliding_attention": {"rope_type": "default", "rope_theta": 30.0}})
    ids = ids_of(12)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    assert scaled_err(got, ref_logits(model, ids)) <= 1e-4
    # no embedding scaling
    m = copy.deepcopy(model)
    m.model.embed_tokens.embed_scale.fill_(1.0)
    assert scaled_err(got, ref_logits(m, ids)) > 1e-2
    # RMSNorm w instead of 1 + w: the same logits come from weights w - 1 only
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.sub_(1.0)
    assert scaled_err(got, ref_logits(m, ids)) > 1e-2
    # the local layers on the global RoPE base
    m = copy.deepcopy(model)
    m.model.rotary_emb.sliding_attention_inv_freq.copy_(m.model.rotary_emb.full_attention_inv_freq)
    assert scaled_err(got, ref_logits(m, ids)) > 1e-2
    # full attention instead of the sliding window
    cfg = copy.deepcopy(model.config)
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    m = Gemma3ForCausalLM(cfg).eval()
    m.load_state_dict(model.state_dict())
    assert scaled_err(got, ref_logits(m, ids)) > 1e-2


def test_bad_config_refused(tmp_path):
    _, d = make(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["head_dim"] = 8  # q_proj is [64, 64]; 4 heads of 8 want [32, 64]
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.safetensors"
    fails(["generate", bad, "--ids", "1,2,3", "-n", 0, "--logits", out], "q_proj")
    assert not out.exists()
    cfg["head_dim"] = 16
    cfg["layer_types"] = ["sliding_attention"]
    (bad / "config.json").write_text(json.dumps(cfg))
    fails(["generate", bad, "--ids", "1,2,3", "-n", 0, "--logits", out], "layer_types")
    assert not out.exists()


def test_gemma_v1_decoder(tmp_path):
    """The original Gemma (GemmaForCausalLM, PaliGemma's text model): scaled embedding, (1 + w) norms, GeGLU."""
    from transformers import GemmaConfig, GemmaForCausalLM
    torch.manual_seed(0)
    cfg = GemmaConfig(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=16, vocab_size=256, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = GemmaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.5 if "norm" in n else torch.randn(p.shape, generator=g) * 0.1)
    model.generation_config.eos_token_id = None
    d = tmp_path / "gemma"
    model.save_pretrained(d, safe_serialization=True)
    ids = ids_of(12)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    err = scaled_err(got, ref_logits(model, ids))
    print(f"gemma: scaled max err {err:.2e}")
    assert err <= 1e-4
    mine, _ = mmb_greedy(d, ids, 24)
    assert mine == ref_greedy(model, ids, 24)


# ---- Gemma3ForConditionalGeneration: the SigLIP tower and Gemma3MultiModalProjector (encode) ----------------

def make_mm(tmp_path, mm_tokens=4, seed=0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
    torch.manual_seed(seed)
    vc = SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=4, layer_norm_eps=1e-6)
    tc = dict(SHAPE)
    cfg = Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=mm_tokens, image_token_index=255,
                       boi_token_index=253, eoi_token_index=254)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "multi_modal_projector" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    d = tmp_path / f"g3mm{mm_tokens}"
    model.save_pretrained(d, safe_serialization=True)
    return model, d


@pytest.mark.parametrize("mm_tokens", [4, 16])
def test_image_features(tmp_path, mm_tokens):
    from safetensors.torch import save_file
    model, d = make_mm(tmp_path, mm_tokens)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    px, out = tmp_path / "px.safetensors", tmp_path / "out.safetensors"
    save_file({"pixel_values": pixels.contiguous()}, str(px))
    run("encode", d, "--pixels", px, "-o", out)
    got = load_file(str(out))["embeddings"]
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pixels).pooler_output
    err = scaled_err(got, ref)
    print(f"gemma3 image features ({mm_tokens} tokens): scaled max err {err:.2e}")
    assert got.shape == ref.shape == (2, mm_tokens, SHAPE["hidden_size"]) and err <= 1e-4
    # the projector's norm as w instead of 1 + w is far off
    with torch.no_grad():
        proj = model.model.multi_modal_projector
        vis = model.model.vision_tower(pixel_values=pixels).last_hidden_state
        proj.mm_soft_emb_norm.weight.sub_(1.0)
        wrong = proj(vis)
    assert scaled_err(got, wrong) > 1e-2


def test_image_bad_config_refused(tmp_path):
    _, d = make_mm(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mm_tokens_per_image"] = 9  # a 3x3 pool does not divide the 8x8 grid
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.safetensors"
    fails(["info", bad], "mm_tokens_per_image")
    cfg["mm_tokens_per_image"] = 4
    cfg["text_config"]["hidden_size"] = 32  # mm_input_projection_weight is [48, 64]
    (bad / "config.json").write_text(json.dumps(cfg))
    px = tmp_path / "px.safetensors"
    from safetensors.torch import save_file
    save_file({"pixel_values": torch.zeros(1, 3, 32, 32)}, str(px))
    fails(["encode", bad, "--pixels", px, "-o", out], "mm_input_projection_weight")
    assert not out.exists()
