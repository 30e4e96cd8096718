"""LLaMA-Adapter V1 (fusion type B) as PEFT builds it (peft.AdaptionPromptConfig, AdaptedAttention), against PEFT
itself: a PEFT adapter directory (adapter_config.json + adapter_model.safetensors, save_pretrained) put on a base
Llama or Mistral directory with `--adapter DIR`. The logits of a prompt within 1e-4 and 24 greedy tokens
identical, for several adapter_len / adapter_layers; at gate 0 (PEFT's zero-init) the plain model's output; the
wrong variants (the adapter's keys in the main softmax, V2's tanh on the gate) far off; bad adapters
refused with the file and tensor named, and `info` reporting what the adapter adds."""
import json

import pytest
import torch
from peft import AdaptionPromptConfig, get_peft_model
from safetensors.torch import load_file, save_file

from conftest import run, scaled_err, fails
from test_decoder import csv, ids_of, make_lm, mmb_greedy, ref_greedy


def make_adapter(tmp_path, base, adapter_len, adapter_layers, seed=3, gate=None, name="adapter"):
    """PEFT's model over `base` (a copy), its prompts random and its gates set (PEFT starts them at 0, so that the
    adapter is silent until trained: here they are what training made them), saved with save_pretrained."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                          task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if n.endswith("adaption_prompt"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith("adaption_gate"):
                p.fill_(float(torch.rand(1, generator=g) * 1.5 + 0.5) if gate is None else gate)
    d = tmp_path / name
    peft_model.save_pretrained(d)
    return peft_model.eval(), d


def peft_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()


def mmb_logits(d, adapter, tmp_path, ids):
    out = tmp_path / "logits.safetensors"
    run("generate", d, "--ids", csv(ids), "-n", 0, "--adapter", adapter, "--logits", out, "--threads", 2)
    return load_file(str(out))["logits"]


@pytest.mark.parametrize("arch,adapter_len,adapter_layers,extra", [
    ("llama", 5, 2, {}),
    ("llama", 1, 3, dict(attention_bias=True)),   # o_proj's bias: PEFT adds it a second time with the adapter
    ("mistral", 12, 1, {}),                      # GQA: the prompt's keys repeated over the query heads
])
def test_logits_and_greedy_match_peft(tmp_path, arch, adapter_len, adapter_layers, extra):
    base, d = make_lm(tmp_path, arch, num_hidden_layers=3, **extra)
    plain = peft_logits(base, ids_of(20))
    model, a = make_adapter(tmp_path, base, adapter_len, adapter_layers)
    ids = ids_of(20)
    want = peft_logits(model, ids)
    got = mmb_logits(d, a, tmp_path, ids)
    err = scaled_err(got, want)
    print(f"{arch} adapter_len {adapter_len} layers {adapter_layers}: logits {err:.2e} scaled")
    assert err < 1e-4, err
    assert scaled_err(plain, want) > 1e-2  # the adapter changes the output: this test sees it
    assert mmb_greedy(d, ids[:6], 24, "--adapter", a)[0] == ref_greedy(model, ids[:6], 24)


def test_gate_zero_is_the_plain_model(tmp_path):
    base, d = make_lm(tmp_path, "llama", num_hidden_layers=2)
    ids = ids_of(16)
    plain = peft_logits(base, ids)
    _, a = make_adapter(tmp_path, base, 4, 2, gate=0.0)
    got = mmb_logits(d, a, tmp_path, ids)
    assert scaled_err(got, plain) < 1e-5


def wrong_variant(model, ids, variant):
    """PEFT's model computed a plausible wrong way: V2's tanh on PEFT's gate, or the prompt's keys in the main
    softmax (one softmax over prompt + causal keys, no gate: the prefix-tuning way)."""
    layers = model.base_model.model.model.layers
    adapted = {i: l.self_attn for i, l in enumerate(layers) if hasattr(l.self_attn, "adaption_prompt")}
    if variant == "merged_softmax":
        return merged_forward(model.base_model.model, ids, {i: a.adaption_prompt.data for i, a in adapted.items()})
    saved = {i: a.adaption_gate.data.clone() for i, a in adapted.items()}
    for a in adapted.values():
        a.adaption_gate.data.tanh_()
    try:
        return peft_logits(model, ids)
    finally:
        for i, g in saved.items():
            adapted[i].adaption_gate.data.copy_(g)


def merged_forward(base, ids, prompts):
    """The decoder by hand with the prompt's keys and values prepended to each adapted layer's own (one softmax)."""
    m, cfg = base.model, base.config
    x = m.embed_tokens(ids[None])
    pos = torch.arange(len(ids))[None]
    cos, sin = m.rotary_emb(x, pos)
    H, KVH = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H

    def rot(t):
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat((-b, a), -1)
    with torch.no_grad():
        for i, layer in enumerate(m.layers):
            at = layer.self_attn
            inner = at.model if hasattr(at, "model") else at
            h = layer.input_layernorm(x)
            q = inner.q_proj(h).view(1, -1, H, hd).transpose(1, 2)
            k = inner.k_proj(h).view(1, -1, KVH, hd).transpose(1, 2)
            v = inner.v_proj(h).view(1, -1, KVH, hd).transpose(1, 2)
            c, s = cos[:, None], sin[:, None]
            q, k = q * c + rot(q) * s, k * c + rot(k) * s
            n = len(ids)
            mask = torch.full((n, n), float("-inf")).triu(1)
            if i in prompts:
                p = prompts[i]
                pk = inner.k_proj(p).view(1, -1, KVH, hd).transpose(1, 2)
                pv = inner.v_proj(p).view(1, -1, KVH, hd).transpose(1, 2)
                k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
                mask = torch.cat([torch.zeros(n, p.shape[1]), mask], 1)
            k = k.repeat_interleave(H // KVH, 1)
            v = v.repeat_interleave(H // KVH, 1)
            a = torch.softmax(q @ k.transpose(2, 3) / hd ** 0.5 + mask, -1) @ v
            x = x + inner.o_proj(a.transpose(1, 2).reshape(1, n, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return base.lm_head(m.norm(x))[0].float()


@pytest.mark.parametrize("variant", ["tanh_gate", "merged_softmax"])
def test_wrong_variants_are_far(tmp_path, variant):
    base, d = make_lm(tmp_path, "llama", num_hidden_layers=3)
    model, a = make_adapter(tmp_path, base, 6, 2)
    ids = ids_of(18)
    got = mmb_logits(d, a, tmp_path, ids)
    want = peft_logits(model, ids)
    assert scaled_err(got, want) < 1e-4
    far = scaled_err(got, wrong_variant(model, ids, variant))
    print(f"wrong variant {variant}: {far:.2e} scaled")
    assert far > 1e-2, far
    # the hand-written decoder itself is right: with the adapter's layers emptied it is the plain model
    if variant == "merged_softmax":
        with model.disable_adapter():
            plain = peft_logits(model, ids)
        assert scaled_err(merged_forward(model.base_model.model, ids, {}), plain) < 1e-5


def test_info_reports_the_adapter(tmp_path):
    base, d = make_lm(tmp_path, "llama", num_hidden_layers=3)
    _, a = make_adapter(tmp_path, base, 7, 2)
    out = run("info", d, "--adapter", a).stdout
    H, hd, D = base.config.num_attention_heads, base.config.hidden_size // base.config.num_attention_heads, \
        base.config.hidden_size
    line = next(l for l in out.splitlines() if l.startswith("adapter:"))
    assert "2 adapted layers x 7 prompt vectors" in line
    assert f"{2 * (7 * D + 1)} parameters added" in line
    assert f"{2 * 4 * H * hd * 7} FLOP per text position added" in line


def test_bad_adapters(tmp_path):
    base, d = make_lm(tmp_path, "llama", num_hidden_layers=3)
    _, a = make_adapter(tmp_path, base, 4, 2)
    ids = csv(ids_of(5))
    # an adapter for another base model: a prompt of another width
    other, _ = make_lm(tmp_path, "llama", name="wide", num_hidden_layers=3, hidden_size=96, num_attention_heads=4)
    _, wide = make_adapter(tmp_path, other, 4, 2, name="wide_adapter")
    fails(["generate", d, "--ids", ids, "-n", 1, "--adapter", wide], "adapter_model.safetensors",
          "layers.1.self_attn.adaption_prompt", "another model")
    # a missing tensor
    t = load_file(str(a / "adapter_model.safetensors"))
    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    save_file({k: v for k, v in t.items() if "layers.2" not in k}, str(bad / "adapter_model.safetensors"))
    fails(["generate", d, "--ids", ids, "-n", 1, "--adapter", bad], "adapter_model.safetensors",
          "layers.2.self_attn.adaption_prompt", "missing")
    # more adapted layers than the base has; another peft type; no directory
    cfg = json.loads((a / "adapter_config.json").read_text())
    for key, val, needle in [("adapter_layers", 9, "adapter_layers 9"), ("peft_type", "LORA", "ADAPTION_PROMPT"),
                             ("adapter_len", 0, "adapter_len")]:
        b = tmp_path / f"bad_{key}"
        b.mkdir()
        (b / "adapter_config.json").write_text(json.dumps(dict(cfg, **{key: val})))
        (b / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes())
        fails(["generate", d, "--ids", ids, "-n", 1, "--adapter", b], needle)
    fails(["generate", d, "--ids", ids, "-n", 1, "--adapter", tmp_path / "nowhere"], "adapter_config.json")
    # a Qwen2 base: PEFT has no adaption prompts for it
    _, q = make_lm(tmp_path, "qwen2", name="qwen", num_hidden_layers=3)
    fails(["generate", q, "--ids", ids, "-n", 1, "--adapter", a], "Llama and Mistral")
