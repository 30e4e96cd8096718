"""LLaMA-Adapter V2 multimodal (fusion B): scripts/convert_llama_adapter_v2.py and src/models/llama_adapter_v2.c.

There is no transformers class for it: the reference below is written from the original code
(OpenGVLab/LLaMA-Adapter, llama_adapter_v2_multimodal7b/llama/{llama_adapter,llama}.py, OpenAI CLIP's
clip/model.py VisionTransformer, timm's Block). Tiny random weights are saved IN THE ORIGINAL FORMAT (the adapter
.pth that llama_adapter.load() reads, Meta's consolidated.00.pth + params.json, a CLIP state dict under 'visual.';
a tokenizer.json in place of tokenizer.model, which the converter also takes), converted with the script, then run
through mmbridge. Run with -s to see the errors."""
import json
import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import ROOT, compile_driver, run, scaled_err

CONVERT = ROOT / "scripts" / "convert_llama_adapter_v2.py"
S = 28           # the tiny CLIP's image: 2x2 patches of 14 + CLS
CLIP = dict(width=128, layers=2, patch=14, output_dim=24)   # heads = width // 64 = 2, as clip's build_model
VIS = dict(v_embed_dim=32, v_depth=2, v_num_heads=4, v_mlp_ratio=4.0, query_len=3)
LLAMA = dict(dim=48, n_layers=3, n_heads=4, multiple_of=16, norm_eps=1e-6, vocab_size=-1)
QUERY_LAYER = 2


# ---- the reference, from the original code ---------------------------------------------------------------------

class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):  # clip/model.py
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, d * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(d * 4, d))]))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x):  # (L, N, D)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class VisionTransformer(nn.Module):  # clip/model.py, the parts clip_encode_image uses
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = ClipTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))


class TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.h = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // self.h) ** -0.5).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, N, C))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):  # timm's Block(dim, num_heads, mlp_ratio, qkv_bias=True): nn.LayerNorm (eps 1e-5), nn.GELU
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TimmAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), TimmMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def freqs_cis(head_dim, end, theta=10000.0):  # llama.py precompute_freqs_cis: Meta's complex RoPE
    f = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return torch.polar(torch.ones(end, head_dim // 2), torch.outer(torch.arange(end).float(), f))


def rope(x, fc):  # apply_rotary_emb: pairs (2i, 2i+1) as complex numbers; x (B, T, H, hd)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * fc[None, :, None, :]).flatten(3)


class Attention(nn.Module):  # llama.py Attention with w_bias (wq, wo biases), the per-head gate; w_lora optional
    def __init__(self, dim, heads, lora_rank=0):
        super().__init__()
        self.h, self.hd = heads, dim // heads
        self.wq, self.wk = nn.Linear(dim, dim, bias=True), nn.Linear(dim, dim, bias=False)
        self.wv, self.wo = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=True)
        self.gate = nn.Parameter(torch.zeros(1, heads, 1, 1))
        self.r = lora_rank
        if lora_rank:
            for n in ("wq", "wk", "wv", "wo"):
                setattr(self, f"lora_{n}_l1", nn.Linear(dim, lora_rank, bias=False))
                setattr(self, f"lora_{n}_l2", nn.Linear(lora_rank, dim, bias=False))
            self.new_gate = nn.Parameter(torch.ones(1, 1, 1, 1))

    def lin(self, n, x, lora=True):
        y = getattr(self, n)(x)
        if self.r and lora:
            y = y + getattr(self, f"lora_{n}_l2")(getattr(self, f"lora_{n}_l1")(x))
        return y

    def forward(self, x, fc, adapter=None, variant=None):
        B, T, _ = x.shape
        q = self.lin("wq", x).view(B, T, self.h, self.hd)
        k = self.lin("wk", x).view(B, T, self.h, self.hd)
        v = self.lin("wv", x).view(B, T, self.h, self.hd)
        q, k = rope(q, fc), rope(k, fc)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.hd)
        scores = scores + torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        gate = self.gate if variant == "no_tanh" else self.gate.tanh()
        if self.r:
            gate = self.new_gate * gate
        if adapter is not None:
            L = adapter.shape[1]
            # the original: the adapter's keys and values through wk and wv alone (no LoRA)
            ak = self.wk(adapter).view(B, L, self.h, self.hd).transpose(1, 2)
            av = self.wv(adapter).view(B, L, self.h, self.hd).transpose(1, 2)
            a_scores = q @ ak.transpose(2, 3) / math.sqrt(self.hd)
            if variant == "merged_softmax":  # one softmax over prompt and text keys (the V1 paper's wrong reading)
                p = F.softmax(torch.cat([a_scores, scores], -1), dim=-1)
                out = gate * (p[..., :L] @ av) + p[..., L:] @ v
            else:
                out = F.softmax(scores, dim=-1) @ v + (gate * F.softmax(a_scores, dim=-1)) @ av
        else:
            out = F.softmax(scores, dim=-1) @ v
        return self.lin("wo", out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden, lora_rank=0):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Linear(dim, hidden)
        self.r = lora_rank
        if lora_rank:
            for n, a, b in (("w1", dim, hidden), ("w2", hidden, dim), ("w3", dim, hidden)):
                setattr(self, f"lora_{n}_l1", nn.Linear(a, lora_rank, bias=False))
                setattr(self, f"lora_{n}_l2", nn.Linear(lora_rank, b, bias=False))

    def lin(self, n, x):
        y = getattr(self, n)(x)
        if self.r:
            y = y + getattr(self, f"lora_{n}_l2")(getattr(self, f"lora_{n}_l1")(x))
        return y

    def forward(self, x):
        return self.lin("w2", F.silu(self.lin("w1", x)) * self.lin("w3", x))


class TransformerBlock(nn.Module):
    def __init__(self, a, lora_rank):
        super().__init__()
        hidden = int(2 * 4 * a["dim"] / 3)
        hidden = a["multiple_of"] * ((hidden + a["multiple_of"] - 1) // a["multiple_of"])
        self.attention = Attention(a["dim"], a["n_heads"], lora_rank)
        self.feed_forward = FeedForward(a["dim"], hidden, lora_rank)
        self.attention_norm, self.ffn_norm = RMSNorm(a["dim"], a["norm_eps"]), RMSNorm(a["dim"], a["norm_eps"])

    def forward(self, x, fc, adapter=None, variant=None):
        h = x + self.attention(self.attention_norm(x), fc, adapter, variant)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, a, vocab, lora_rank):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, a["dim"])
        self.layers = nn.ModuleList([TransformerBlock(a, lora_rank) for _ in range(a["n_layers"])])
        self.norm = RMSNorm(a["dim"], a["norm_eps"])
        self.output = nn.Linear(a["dim"], vocab, bias=False)
        self.freqs_cis = freqs_cis(a["dim"] // a["n_heads"], 1024)


class LlamaAdapter(nn.Module):  # llama_adapter.py LLaMA_adapter: the same module names, so the same state dict keys
    def __init__(self, vocab, llama=LLAMA, vis=VIS, query_layer=QUERY_LAYER, lora_rank=0):
        super().__init__()
        self.clip = nn.Module()
        self.clip.visual = VisionTransformer(S, CLIP["patch"], CLIP["width"], CLIP["layers"], CLIP["width"] // 64,
                                             CLIP["output_dim"])
        v = vis["v_embed_dim"]
        self.clip_proj, self.clip_proj_norm = nn.Linear(CLIP["output_dim"], v), nn.LayerNorm(v)
        self.query_len, self.query_layer = vis["query_len"], query_layer
        self.visual_query = nn.Embedding(vis["query_len"], v)
        self.visual_blocks = nn.ModuleList([Block(v, vis["v_num_heads"], vis["v_mlp_ratio"])
                                            for _ in range(vis["v_depth"])])
        self.visual_proj, self.visual_proj_norm = nn.Linear(v, llama["dim"]), nn.LayerNorm(llama["dim"])
        self.adapter_query = nn.Embedding(vis["query_len"] * query_layer, llama["dim"])
        self.llama = Transformer(llama, vocab, lora_rank)

    def clip_encode_image(self, x, variant=None):
        c = self.clip.visual
        x = c.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([c.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        x = c.ln_pre(x + c.positional_embedding)
        x = c.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        if variant == "ln_post_cls_only":  # CLIP's own encode_image: ln_post on CLS only
            x = torch.cat([c.ln_post(x[:, :1]), x[:, 1:]], 1)
        else:
            x = c.ln_post(x[:, :, :])  # "preserve all spatial tokens"
        return x @ c.proj

    def forward_visual(self, imgs, variant=None):
        feats = self.clip_proj_norm(self.clip_proj(self.clip_encode_image(imgs, variant).float()))
        q = self.visual_query.weight.unsqueeze(0).repeat(len(imgs), 1, 1)
        x = torch.cat([feats, q] if variant == "queries_after" else [q, feats], dim=1)
        for b in self.visual_blocks:
            x = b(x)
        x = x[:, :self.query_len]  # queries_after: the first rows are then CLIP tokens
        return self.visual_proj_norm(self.visual_proj(x))

    def forward_inference(self, visual_query, tokens, variant=None):
        """All positions' logits (the original returns the last one's: the same computation, start_pos 0)."""
        T = tokens.shape[1]
        h = self.llama.tok_embeddings(tokens)
        fc = self.llama.freqs_cis[:T]
        L = len(self.llama.layers)
        for layer in self.llama.layers[: L - self.query_layer]:
            h = layer(h, fc)
        adapter = self.adapter_query.weight.reshape(self.query_layer, self.query_len, -1).unsqueeze(1)
        for i, layer in enumerate(self.llama.layers[L - self.query_layer:]):
            h = layer(h, fc, adapter[i].repeat(tokens.shape[0], 1, 1) + visual_query, variant)
        return self.llama.output(self.llama.norm(h)).float()


# ---- tiny random models saved in the original format -------------------------------------------------------------

def tokenizer_json(path):
    """A tiny byte-level BPE with LLaMA's <unk>, <s>, </s> at 0, 1, 2 (stands in for tokenizer.model)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.", "### Instruction:\nPlease introduce this painting.\n\n### Response:",
              "A cat sits on a mat in the sun."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(path))
    return tok


def randomize(model, seed):
    """Every weight drawn so that every part matters: norms away from 1, biases non-zero, gates in (-1.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mname, mod in model.named_modules():
            norm = isinstance(mod, (nn.LayerNorm, RMSNorm))
            for pname, p in mod.named_parameters(recurse=False):
                if pname == "gate":
                    p.copy_(torch.rand(p.shape, generator=g) * 3 - 1.5)
                elif pname == "new_gate":
                    p.copy_(0.5 + torch.rand(p.shape, generator=g) * 0.5)
                elif norm and pname == "weight":
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
                elif isinstance(mod, nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=g))
                elif p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p.shape[-1]))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def adapter_keys(model):
    """The adapter checkpoint's keys (util/extract_adapter_from_checkpoint.py): the visual side, and of the LLaMA the
    gates, biases and norms (and LoRA when the model has it)."""
    keys = []
    for k in model.state_dict():
        if k.startswith(("clip_proj", "visual_", "adapter_query")):
            keys.append(k)
        elif k.startswith("llama.") and (k.endswith(("gate", ".bias", "norm.weight")) or ".lora_" in k):
            keys.append(k)
    return keys


def save_original(model, d, vocab, lora_rank=0, llama=LLAMA):
    """The files the original load() reads: adapter .pth, LLaMA dir (consolidated.00.pth, params.json), CLIP."""
    d = Path(d)
    (d / "llama" / "7B").mkdir(parents=True)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = adapter_keys(model)
    torch.save({"model": {k: sd[k] for k in keys},
                "config": {"w_bias": True, "w_lora": bool(lora_rank), "lora_rank": lora_rank or 16}},
               d / "adapter.pth")
    base = {k[len("llama."):]: v for k, v in sd.items() if k.startswith("llama.") and ".lora_" not in k
            and not k.endswith(("gate", ".bias"))}
    # the base's own norms differ from the adapter's (which load_state_dict puts over them)
    base = {k: (v + 0.5 if k.endswith("norm.weight") else v) for k, v in base.items()}
    torch.save(base, d / "llama" / "7B" / "consolidated.00.pth")
    (d / "llama" / "7B" / "params.json").write_text(json.dumps(llama))
    torch.save({f"visual.{k}": v for k, v in model.clip.visual.state_dict().items()}, d / "clip.pth")
    return d


def convert(d, out, *extra, check=True):
    p = subprocess.run([sys.executable, str(CONVERT), str(d / "adapter.pth"), "--llama", str(d / "llama" / "7B"),
                        "--tokenizer", str(d / "tokenizer.json"), "--clip", str(d / "clip.pth"), "-o", str(out),
                        "--visual-heads", str(VIS["v_num_heads"]), *map(str, extra)],
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def make(tmp_path, seed=0, lora_rank=0):
    d = tmp_path / "orig"
    d.mkdir()
    tok = tokenizer_json(d / "tokenizer.json")
    torch.manual_seed(seed)
    model = randomize(LlamaAdapter(tok.get_vocab_size(), lora_rank=lora_rank), seed).eval()
    save_original(model, d, tok.get_vocab_size(), lora_rank)
    convert(d, tmp_path / "m")
    return model, d, tmp_path / "m"


@pytest.fixture(scope="module")
def bias(tmp_path_factory):
    """One BIAS-style model (no LoRA), converted once for the tests that only read it."""
    return make(tmp_path_factory.mktemp("bias"), seed=1)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return compile_driver("mllm_driver", tmp_path_factory.mktemp("drv"))


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


# ---- (a) the vision side: `mmbridge encode` writes the visual queries -----------------------------------------

@pytest.mark.parametrize("n", [1, 2])
def test_visual_query_matches_reference(tmp_path, bias, n):
    model, _, m = bias
    px = pixels(tmp_path / "px.safetensors", n)
    with torch.no_grad():
        ref = model.forward_visual(px)
    got, p = encode(m, ["--pixels", tmp_path / "px.safetensors"], tmp_path / "o.safetensors", "--threads", "2")
    assert report(f"llama_adapter_v2 visual_query ({n} image(s))", got, ref) <= 1e-4
    assert got.shape == (n, VIS["query_len"], LLAMA["dim"])
    # The test can tell: ln_post on CLS only (CLIP's encode_image); the queries concatenated after the CLIP tokens
    # (the first query_len rows are then CLIP tokens: attention alone cannot tell the order).
    with torch.no_grad():
        for v in ("ln_post_cls_only", "queries_after"):
            err = scaled_err(got, model.forward_visual(px, v))
            print(f"  wrong variant {v}: {err:.2e}")
            assert err > 1e-2, v


def test_info_and_image_files(tmp_path, bias):
    """encode on PNG files through preprocessor_config.json (CLIPImageProcessor as clip.load's transform: short side
    to 28 bicubic, center crop, CLIP's mean and std), checked against transformers' CLIPImageProcessor; `info`."""
    from transformers import CLIPImageProcessor
    model, _, m = bias
    proc = CLIPImageProcessor.from_pretrained(m)
    assert proc.crop_size == {"height": S, "width": S} and proc.resample == 3
    rng = np.random.default_rng(0)
    files = []
    for i, (h, w) in enumerate([(50, 37), (28, 90)]):
        files.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1])
    px = torch.cat([torch.as_tensor(np.asarray(proc(Image.open(f).convert("RGB"), return_tensors="np")["pixel_values"]))
                    for f in files])
    got, _ = encode(m, files, tmp_path / "o.safetensors")
    with torch.no_grad():
        assert report("llama_adapter_v2 visual_query from image files", got, model.forward_visual(px)) <= 1e-4
    info = run("info", m).stdout
    assert "family:           llama_adapter_v2" in info and f"tokens per image: {VIS['query_len']}\n" in info, info
    n = sum(p.numel() for k, p in model.named_parameters()
            if k.startswith(("clip_proj", "visual_")) ) + CLIP["width"] * CLIP["output_dim"]
    assert f"parameters:       {n}\n" in info, info


def test_converted_names(bias):
    """The converted file: HF Llama names, q/k rows permuted (checked by rotating both ways), gates raw, the
    adapter checkpoint's norms over the base's."""
    model, d, m = bias
    sd = load_file(str(m / "model.safetensors"))
    cfg = json.loads((m / "config.json").read_text())
    assert cfg["model_type"] == "llama_adapter_v2" and cfg["query_len"] == VIS["query_len"]
    assert cfg["query_layer"] == QUERY_LAYER and cfg["vision_config"]["num_attention_heads"] == CLIP["width"] // 64
    L, H, hd = LLAMA["n_layers"], LLAMA["n_heads"], LLAMA["dim"] // LLAMA["n_heads"]
    for l in range(L):
        a = model.llama.layers[l].attention
        key = f"model.layers.{l}.self_attn.adapter_gate"
        if l >= L - QUERY_LAYER:
            assert torch.equal(sd[key], a.gate.detach().reshape(H))
        else:
            assert key not in sd
        assert torch.equal(sd[f"model.layers.{l}.input_layernorm.weight"], model.llama.layers[l].attention_norm.weight)
        # Meta's RoPE on the original rows and rotate_half's on the permuted ones give the same scores q.k per head
        x = torch.randn(5, LLAMA["dim"])
        fc = freqs_cis(hd, 5)
        with torch.no_grad():
            qm = rope((x @ a.wq.weight.T + a.wq.bias).view(1, 5, H, hd), fc)[0].transpose(0, 1)
            km = rope((x @ a.wk.weight.T).view(1, 5, H, hd), fc)[0].transpose(0, 1)
        pre = f"model.layers.{l}.self_attn."
        cos, sin = torch.cat([fc.real, fc.real], -1)[:, None], torch.cat([fc.imag, fc.imag], -1)[:, None]

        def rot(t):
            t = t.view(5, H, hd)
            return (t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin).transpose(0, 1)
        qh = rot(x @ sd[pre + "q_proj.weight"].T + sd[pre + "q_proj.bias"])
        kh = rot(x @ sd[pre + "k_proj.weight"].T)
        assert torch.allclose(qm @ km.transpose(1, 2), qh @ kh.transpose(1, 2), atol=1e-4)
        # and not without the permutation
        qn = rot(x @ a.wq.weight.detach().T + a.wq.bias.detach())
        kn = rot(x @ a.wk.weight.detach().T)
        assert not torch.allclose(qm @ km.transpose(1, 2), qn @ kn.transpose(1, 2), atol=1e-2)
    assert "model.layers.0.self_attn.k_proj.bias" not in sd and "model.layers.0.self_attn.q_proj.bias" in sd


# ---- (b) bad input --------------------------------------------------------------------------------------------

def test_converter_refuses_other_width(tmp_path):
    """An adapter checkpoint made for another LLaMA width: the converter names the file and the tensor."""
    tok = tokenizer_json(tmp_path / "tokenizer.json")
    wide = dict(LLAMA, dim=64)
    adapter = randomize(LlamaAdapter(tok.get_vocab_size(), llama=wide), 1)
    base = randomize(LlamaAdapter(tok.get_vocab_size()), 2)
    d = tmp_path / "o"
    save_original(base, d, tok.get_vocab_size())
    torch.save({"model": {k: adapter.state_dict()[k] for k in adapter_keys(adapter)}, "config": {"w_bias": True}},
               d / "adapter.pth")
    (d / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text())
    p = convert(d, tmp_path / "m", check=False)
    print(p.stderr.strip())
    assert p.returncode != 0 and "adapter.pth" in p.stderr and "adapter_query.weight" in p.stderr, p.stderr
    assert "48" in p.stderr and not (tmp_path / "m").exists()
    # one LLaMA tensor of the adapter for another width (the visual side right)
    sd = torch.load(d / "adapter.pth")
    sd["model"] = {k: base.state_dict()[k] for k in adapter_keys(base)}
    sd["model"]["llama.layers.1.attention.wq.bias"] = torch.zeros(64)
    torch.save(sd, d / "adapter.pth")
    p = convert(d, tmp_path / "m", check=False)
    print(p.stderr.strip())
    assert p.returncode != 0 and "llama.layers.1.attention.wq.bias" in p.stderr and "[64]" in p.stderr, p.stderr


def test_bad_converted_dir(tmp_path, bias):
    _, _, m = bias
    pixels(tmp_path / "px.safetensors", 1)
    sd = load_file(str(m / "model.safetensors"))
    cfg = json.loads((m / "config.json").read_text())

    def attempt(name, *want, tensors=None, config=None):
        d = tmp_path / name
        d.mkdir()
        save_file(sd if tensors is None else tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(cfg if config is None else config))
        out = tmp_path / f"{name}.safetensors"
        _, p = encode(d, ["--pixels", tmp_path / "px.safetensors"], out, check=False)
        assert p.returncode != 0 and not out.exists(), p.stderr
        for w in want:
            assert w in p.stderr, p.stderr
        print(f"{name}: {p.stderr.strip()}")

    attempt("width", "visual_proj.weight", config=dict(cfg, hidden_size=64))
    k = "visual_blocks.1.attn.qkv.weight"
    attempt("missing", k, tensors={n: t for n, t in sd.items() if n != k})
    attempt("short", "visual_query.weight", tensors=dict(sd, **{"visual_query.weight": sd["visual_query.weight"][:2]}))
    attempt("depth", "visual_blocks.2.norm1.weight",
            config=dict(cfg, visual_config=dict(cfg["visual_config"], num_hidden_layers=3)))
    attempt("extra_block", "visual_blocks.1.norm1.weight", "more visual blocks",
            config=dict(cfg, visual_config=dict(cfg["visual_config"], num_hidden_layers=1)))
    attempt("heads", "settings out of range", config=dict(cfg, visual_config=dict(cfg["visual_config"],
                                                                                   num_attention_heads=5)))
    attempt("no_proj", "vision_tower.visual_projection.weight",
            tensors={n: t for n, t in sd.items() if n != "vision_tower.visual_projection.weight"})
    save_file({"pixel_values": torch.zeros(1, 3, 42, 42)}, str(tmp_path / "px42.safetensors"))
    _, p = encode(m, ["--pixels", tmp_path / "px42.safetensors"], tmp_path / "o42.safetensors", check=False)
    assert p.returncode != 0 and "42x42" in p.stderr and not (tmp_path / "o42.safetensors").exists()


# ---- (c) the prompt: the chat template reproduces utils.format_prompt ------------------------------------------

def format_prompt(instruction):  # utils.py, prompt_no_input
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{instruction}\n\n### Response:")


def test_chat_template_is_format_prompt(tmp_path, bias):
    _, _, m = bias
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(m)
    instr = "Please introduce this painting."
    want = "<s>" + format_prompt(instr)
    for content in (instr, [{"type": "image"}, {"type": "text", "text": instr}]):
        msgs = [{"role": "user", "content": content}]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
        (tmp_path / "chat.json").write_text(json.dumps(msgs))
        got = run("tokenize", m, "--chat", tmp_path / "chat.json", "--gen-prompt").stdout
        assert got.rstrip("\n") == want, got


# ---- (d) the converted LLM tensors, read as Hugging Face Llama names would be --------------------------------

def hf_logits(sd, cfg, vq, ids, merged_kv=False):
    """The converted checkpoint computed as its names say (transformers' Llama: rotate_half RoPE, the biases the file
    has, the adapter prompts adapter_query + visual_query through the layer's k_proj / v_proj, their own softmax
    scaled by tanh(adapter_gate)): what the decoder must compute, from the file alone."""
    D, L, H = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    hd, T, eps = D // H, len(ids), cfg["rms_norm_eps"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).double() / hd))
    ang = torch.outer(torch.arange(T).double(), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None].float(), torch.cat([ang.sin()] * 2, -1)[:, None].float()

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rot(t):
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin

    Q, ql = cfg["query_len"], cfg["query_layer"]
    aq = sd["adapter_query.weight"].reshape(ql, Q, D)
    h = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    for l in range(L):
        p = f"model.layers.{l}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        q = rot(lin(x, p + "self_attn.q_proj").view(T, H, hd)).transpose(0, 1)
        k = rot(lin(x, p + "self_attn.k_proj").view(T, H, hd)).transpose(0, 1)
        v = lin(x, p + "self_attn.v_proj").view(T, H, hd).transpose(0, 1)
        o = F.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ v
        if l >= L - ql:
            pr = aq[l - (L - ql)] + vq
            kn, vn = p + "self_attn.adapter_k_proj", p + "self_attn.adapter_v_proj"  # unmerged LoRA's, when written
            kn = p + "self_attn.k_proj" if merged_kv or kn + ".weight" not in sd else kn
            vn = p + "self_attn.v_proj" if merged_kv or vn + ".weight" not in sd else vn
            ak = lin(pr, kn).view(Q, H, hd).transpose(0, 1)
            av = lin(pr, vn).view(Q, H, hd).transpose(0, 1)
            g = sd[p + "self_attn.adapter_gate"].tanh()[:, None, None]
            o = o + g * F.softmax(q @ ak.transpose(1, 2) / math.sqrt(hd), -1) @ av
        h = h + lin(o.transpose(0, 1).reshape(T, D), p + "self_attn.o_proj")
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        h = h + lin(F.silu(lin(x, p + "mlp.gate_proj")) * lin(x, p + "mlp.up_proj"), p + "mlp.down_proj")
    return norm(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("lora", ["lora_text_only", "lora"])  # "none": test_logits_and_greedy, through mmbridge
def test_converted_llm_matches_reference(tmp_path, lora):
    """The converter loses nothing: the converted tensors, computed as their names say, give the original's logits.
    LoRA merged: exact while lora_wk / lora_wv are zero (the adapter prompts then see the same wk, wv); with them
    non-zero the merged wk, wv also reach the prompts, which the original's do not: the difference is measured."""
    d = tmp_path / "orig"
    d.mkdir()
    tok = tokenizer_json(d / "tokenizer.json")
    torch.manual_seed(8)
    model = randomize(LlamaAdapter(tok.get_vocab_size(), lora_rank=4 if lora != "none" else 0), 8).eval()
    if lora == "lora_text_only":
        with torch.no_grad():
            for layer in model.llama.layers:
                layer.attention.lora_wk_l2.weight.zero_()
                layer.attention.lora_wv_l2.weight.zero_()
    save_original(model, d, tok.get_vocab_size(), 4 if lora != "none" else 0)
    p = convert(d, tmp_path / "m")
    sd = load_file(str(tmp_path / "m" / "model.safetensors"))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    ids = ref_ids(d, "Please introduce this painting.")
    with torch.no_grad():
        vq = model.forward_visual(pixels(tmp_path / "px.safetensors", 1))
        ref = model.forward_inference(vq, torch.tensor([ids]))[0]
        got = hf_logits(sd, cfg, vq[0], ids)
        err = report(f"converted LLM ({lora})", got, ref)
        for v in ("no_tanh", "merged_softmax"):
            e = scaled_err(got, model.forward_inference(vq, torch.tensor([ids]), v)[0])
            print(f"  wrong variant {v}: {e:.2e}")
            assert e > 1e-2, v
    assert err <= 1e-4
    assert (f"model.layers.{LLAMA['n_layers'] - 1}.self_attn.adapter_k_proj.weight" in sd) == (lora != "none")
    if lora != "none":  # a reader that sends the prompts through the merged k_proj / v_proj instead
        with torch.no_grad():
            e = scaled_err(hf_logits(sd, cfg, vq[0], ids, merged_kv=True), ref)
        print(f"  the adapter prompts through the merged k_proj / v_proj: {e:.2e}")
        assert (e <= 1e-4) == (lora == "lora_text_only")
    assert ("LoRA pair(s) merged" in p.stdout) and (("0 LoRA" in p.stdout) == (lora == "none"))


# ---- (d) the LLM side: logits and greedy tokens ----------------------------------------------------------------

def ref_ids(d, instr):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return [tok.token_to_id("<s>")] + tok.encode(format_prompt(instr), add_special_tokens=False).ids


def ref_greedy(model, vq, ids, n, variant=None):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model.forward_inference(vq, torch.tensor([ids]), variant)[0, -1].argmax()))
    return ids[-n:]


@pytest.mark.parametrize("lora", ["none", "lora_text_only", "lora"])
def test_logits_and_greedy(tmp_path, bias, driver, lora):
    if lora == "none":
        model, d, m = bias
    else:
        model, d, m = lora_model(tmp_path, lora)
    run_llm(tmp_path, model, d, m, driver, lora)


def lora_model(tmp_path, lora):
    d = tmp_path / "orig"
    d.mkdir()
    tok = tokenizer_json(d / "tokenizer.json")
    rank = 0 if lora == "none" else 4
    model = randomize(LlamaAdapter(tok.get_vocab_size(), lora_rank=rank), 7).eval()
    if lora == "lora_text_only":  # lora_wk, lora_wv zero: the adapter prompts see the same wk, wv merged or not
        with torch.no_grad():
            for layer in model.llama.layers:
                layer.attention.lora_wk_l2.weight.zero_()
                layer.attention.lora_wv_l2.weight.zero_()
    save_original(model, d, tok.get_vocab_size(), rank)
    m = tmp_path / "m"
    convert(d, m)
    return model, d, m


def run_llm(tmp_path, model, d, m, drv, lora):
    from transformers import CLIPImageProcessor
    img = tmp_path / "im.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 33, 3), dtype=np.uint8)).save(img)
    instr = "Please introduce this painting."
    p = subprocess.run([str(drv), str(tmp_path / "o.safetensors"), str(m), str(img), instr, "24"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = load_file(str(tmp_path / "o.safetensors"))
    ids = ref_ids(d, instr)
    assert out["prompt_ids"].tolist() == ids  # the image takes no positions in the text
    px = torch.as_tensor(np.asarray(CLIPImageProcessor.from_pretrained(m)(Image.open(img).convert("RGB"),
                                                                          return_tensors="np")["pixel_values"]))
    with torch.no_grad():
        vq = model.forward_visual(px)
        ref = model.forward_inference(vq, torch.tensor([ids]))[0]
    got = out["logits"]
    label = f"llama_adapter_v2 logits ({lora})"
    err = report(label, got, ref[-got.shape[0]:])
    want = ref_greedy(model, vq, ids, 24)
    same = out["generated"].tolist() == want
    print(f"  greedy 24 tokens identical: {same}")
    for v in ("no_tanh", "merged_softmax"):
        with torch.no_grad():
            print(f"  wrong variant {v}: {scaled_err(got, model.forward_inference(vq, torch.tensor([ids]), v)[0][-got.shape[0]:]):.2e}")
            assert scaled_err(got, model.forward_inference(vq, torch.tensor([ids]), v)[0][-got.shape[0]:]) > 1e-2
    assert err <= 1e-4 and same
