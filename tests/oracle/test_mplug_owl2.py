"""mPLUG-Owl2 (MPLUGOwl2LlamaForCausalLM, the X-PLUG/mPLUG-Owl repository's mPLUG-Owl2/mplug_owl2/model code):
`mmbridge encode` and `mmbridge generate` on tiny random checkpoints in the original key names, against a torch
reference written here from the original modules (there is no transformers class):

  MplugOwlVisionModel        cls_token + patch_embed (no bias) + position_embedding, pre_layernorm, pre-norm
                             layers whose query_key_value is reshaped per head as (heads, 3, head_dim), QuickGELU,
                             post_layernorm on every token;
  MplugOwlVisualAbstractor   learned queries; per layer norm1 on the queries, normk on the image, keys over
                             [queries ; image] with the 1-D / 2-D sin-cos positions added (values without), the
                             residual from the normed queries, a SwiGLU MLP with ffn_ln; visual_fc, then vit_eos;
  the modality-adaptive LLM  Llama whose k_proj, v_proj, input_layernorm and post_attention_layernorm are
                             MultiwayNetworks: row i uses multiway[modality_indicators[i]] (1 for the image's
                             rows, 0 for text and for every generated token), q_proj, o_proj and the MLP shared.

The prompt is conv_mplug_owl2's ("USER: <|image|>... ASSISTANT:") and its ids tokenizer_image_token's (the text
split at <|image|>, each piece tokenized, the BOS kept on the first only); images go through expand2square with
the mean colour, then CLIPImageProcessor (the original CLI's default image_aspect_ratio "pad").

Checked: the encode output within 1e-4 scaled; the prefill logits of prompts with one and two images and of a
text-only prompt within 1e-4; 24 greedy tokens identical. Wrong variants (modality 0's K/V for the image rows
too, modality 0's norms for them) are far off. Bad input: a missing multiway tensor (the error names the checkpoint and
the tensor), a missing abstractor tensor, a grid_size that does not fit the tower, and a marker count that does
not match the images."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import fails, random_images, run, scaled_err
from PIL import Image
from safetensors.torch import load_file, save_file

IMAGE_TOKEN_INDEX = -200
MARK = "<|image|>"
VIS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
           patch_size=14, layer_norm_eps=1e-6, hidden_act="quick_gelu")
ABS = dict(num_learnable_queries=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
           layer_norm_eps=1e-6, encoder_hidden_size=32, grid_size=2)
LM = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
          rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512)


# ---- the reference, from visual_encoder.py and modeling_llama2.py ---------------------------------------------

def sincos_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim, grid_size):
    gh = np.arange(grid_size, dtype=np.float32)
    gw = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(gw, gh), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)  # cls_token=True


class VisionEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        D = c["hidden_size"]
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.patch_embed = nn.Conv2d(3, D, c["patch_size"], c["patch_size"], bias=False)
        n = (c["image_size"] // c["patch_size"]) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, n + 1, D))
        self.pre_layernorm = nn.LayerNorm(D, eps=c["layer_norm_eps"])

    def forward(self, px):
        e = self.patch_embed(px).flatten(2).transpose(1, 2)
        e = torch.cat([self.cls_token.expand(px.shape[0], 1, -1), e], dim=1)
        return self.pre_layernorm(e + self.position_embedding[:, :e.shape[1]])


class VisionAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        D = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.query_key_value = nn.Linear(D, 3 * D)
        self.dense = nn.Linear(D, D)

    def forward(self, x):
        b, n, D = x.shape
        qkv = self.query_key_value(x).reshape(b, n, self.heads, 3, D // self.heads).permute(3, 0, 2, 1, 4)
        s = torch.matmul(qkv[0], qkv[1].transpose(-1, -2)) * (D // self.heads) ** -0.5
        o = torch.matmul(s.softmax(-1), qkv[2]).permute(0, 2, 1, 3).reshape(b, n, D)
        return self.dense(o)


class VisionMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c["hidden_size"], c["intermediate_size"])
        self.fc2 = nn.Linear(c["intermediate_size"], c["hidden_size"])

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # QuickGELU


class VisionLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        D = c["hidden_size"]
        self.self_attn = VisionAttention(c)
        self.input_layernorm = nn.LayerNorm(D, eps=c["layer_norm_eps"])
        self.mlp = VisionMLP(c)
        self.post_attention_layernorm = nn.LayerNorm(D, eps=c["layer_norm_eps"])

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Layers(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class VisionModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.encoder = Layers([VisionLayer(c) for _ in range(c["num_hidden_layers"])])
        self.post_layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, px):
        x = self.embeddings(px)
        for l in self.encoder.layers:
            x = l(x)
        return self.post_layernorm(x)


class AbsAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        H = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(c["encoder_hidden_size"], H)
        self.value = nn.Linear(c["encoder_hidden_size"], H)
        self.register_buffer("q_pos_embed", torch.from_numpy(
            sincos_1d(H, np.arange(c["num_learnable_queries"], dtype=np.float32))).float())
        self.register_buffer("k_pos_embed", torch.from_numpy(sincos_2d(H, c["grid_size"])).float())

    def split(self, x):
        return x.view(*x.shape[:-1], self.heads, -1).permute(0, 2, 1, 3)

    def forward(self, h, enc):
        qk = torch.cat([self.q_pos_embed, self.k_pos_embed], dim=0).unsqueeze(0)
        k = self.split(self.key(enc + qk))
        v = self.split(self.value(enc))
        q = self.split(self.query(h + self.q_pos_embed.unsqueeze(0)))
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        o = torch.matmul(s.softmax(-1), v).permute(0, 2, 1, 3)
        return o.reshape(*o.shape[:2], -1)


class AbsMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        H, I = c["hidden_size"], c["intermediate_size"]
        self.w1, self.w2, self.w3 = nn.Linear(H, I), nn.Linear(I, H), nn.Linear(H, I)
        self.ffn_ln = nn.LayerNorm(I, eps=c["layer_norm_eps"])

    def forward(self, x):
        return self.w2(self.ffn_ln(F.silu(self.w1(x)) * self.w3(x)))


class AbsOutput(nn.Module):
    def __init__(self, c):
        super().__init__()
        H = c["hidden_size"]
        self.out_proj = nn.Linear(H, H)
        self.norm2 = nn.LayerNorm(H)
        self.mlp = AbsMLP(c)

    def forward(self, h, inp):
        inp = inp + self.out_proj(h)
        return inp + self.mlp(self.norm2(inp))


class AbsCross(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = AbsAttention(c)
        self.output = AbsOutput(c)
        self.norm1 = nn.LayerNorm(c["hidden_size"])
        self.normk = nn.LayerNorm(c["hidden_size"])

    def forward(self, h, enc):
        h = self.norm1(h)
        enc = torch.cat([h, self.normk(enc)], dim=1)
        return self.output(self.attention(h, enc), h)


class AbsLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.crossattention = AbsCross(c)


class Abstractor(nn.Module):
    def __init__(self, c, d_model):
        super().__init__()
        self.encoder = Layers([AbsLayer(c) for _ in range(c["num_hidden_layers"])])
        self.visual_fc = nn.Linear(c["hidden_size"], d_model)
        self.query_embeds = nn.Parameter(torch.randn(1, c["num_learnable_queries"], c["hidden_size"]))
        self.vit_eos = nn.Parameter(torch.randn(1, 1, d_model))

    def forward(self, enc):
        x = self.query_embeds.repeat(enc.shape[0], 1, 1)
        for l in self.encoder.layers:
            x = l.crossattention(x, enc)
        x = self.visual_fc(x)
        return torch.cat([x, self.vit_eos.repeat(x.shape[0], 1, 1)], dim=1)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Multiway(nn.Module):
    """MultiwayNetwork: row i through multiway[ind[i]]; `force` runs every row through one way (a wrong variant)."""
    def __init__(self, make):
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])
        self.force = None

    def forward(self, x, ind):
        if self.force is not None:
            return self.multiway[self.force](x)
        out = torch.empty(*x.shape[:-1], self.multiway[0](x[:1, :1]).shape[-1], dtype=x.dtype)
        for i, way in enumerate(self.multiway):
            sel = ind.eq(i)
            if sel.any():
                out[sel] = way(x[sel])
        return out


def rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2).float() / hd))
    f = pos.float()[:, None] * inv[None]
    emb = torch.cat([f, f], dim=-1)
    rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
    return x * emb.cos() + rot * emb.sin()


class LMAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, H = c["hidden_size"], c["num_attention_heads"]
        self.H, self.hd, self.theta = H, d // H, c["rope_theta"]
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = Multiway(lambda: nn.Linear(d, d, bias=False))
        self.v_proj = Multiway(lambda: nn.Linear(d, d, bias=False))
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, ind):
        n = x.shape[1]
        sh = lambda t: t.view(1, n, self.H, self.hd).transpose(1, 2)
        pos = torch.arange(n)
        q, k, v = sh(self.q_proj(x)), sh(self.k_proj(x, ind)), sh(self.v_proj(x, ind))
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.hd)
        s = s + torch.full((n, n), float("-inf")).triu(1)
        o = torch.matmul(s.softmax(-1, dtype=torch.float32), v).transpose(1, 2).reshape(1, n, -1)
        return self.o_proj(o)


class LMMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, I = c["hidden_size"], c["intermediate_size"]
        self.gate_proj, self.up_proj = nn.Linear(d, I, bias=False), nn.Linear(d, I, bias=False)
        self.down_proj = nn.Linear(I, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LMLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, eps = c["hidden_size"], c["rms_norm_eps"]
        self.self_attn = LMAttention(c)
        self.mlp = LMMLP(c)
        self.input_layernorm = Multiway(lambda: RMSNorm(d, eps))
        self.post_attention_layernorm = Multiway(lambda: RMSNorm(d, eps))

    def forward(self, x, ind):
        x = x + self.self_attn(self.input_layernorm(x, ind), ind)
        return x + self.mlp(self.post_attention_layernorm(x, ind))


class Inner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([LMLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.vision_model = VisionModel(cfg["visual_config"]["visual_model"])
        self.visual_abstractor = Abstractor(cfg["visual_config"]["visual_abstractor"], cfg["hidden_size"])


class Owl2(nn.Module):
    """MPLUGOwl2LlamaForCausalLM's inference path (prepare_inputs_labels_for_multimodal + the adaptive Llama)."""
    def __init__(self, cfg):
        super().__init__()
        self.model = Inner(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def encode_images(self, px):
        return self.model.visual_abstractor(self.model.vision_model(px))

    def embed(self, ids, px):
        feats = self.encode_images(px) if px is not None and len(px) else None
        embs, ind, k = [], [], 0
        ids = list(ids)
        while IMAGE_TOKEN_INDEX in ids:
            j = ids.index(IMAGE_TOKEN_INDEX)
            embs.append(self.model.embed_tokens(torch.tensor(ids[:j], dtype=torch.long)))
            ind.append(torch.zeros(j, dtype=torch.long))
            embs.append(feats[k])
            ind.append(torch.ones(feats.shape[1], dtype=torch.long))
            k += 1
            ids = ids[j + 1:]
        if ids:
            embs.append(self.model.embed_tokens(torch.tensor(ids, dtype=torch.long)))
            ind.append(torch.zeros(len(ids), dtype=torch.long))
        return torch.cat(embs)[None], torch.cat(ind)[None]

    def logits(self, x, ind):
        for l in self.model.layers:
            x = l(x, ind)
        return self.lm_head(self.model.norm(x))[0]

    def forward(self, ids, px):
        return self.logits(*self.embed(ids, px))

    def greedy(self, ids, px, n):
        x, ind = self.embed(ids, px)
        out = []
        for _ in range(n):  # no cache: every step recomputes the whole sequence; generated tokens are text (0)
            t = int(self.logits(x, ind)[-1].argmax())
            out.append(t)
            x = torch.cat([x, self.model.embed_tokens(torch.tensor([[t]]))], dim=1)
            ind = torch.cat([ind, torch.zeros(1, 1, dtype=torch.long)], dim=1)
        return out

    def set_variant(self, variant):
        for l in self.model.layers:
            a = l.self_attn
            a.k_proj.force = a.v_proj.force = 0 if variant == "shared K/V" else None
            l.input_layernorm.force = l.post_attention_layernorm.force = 0 if variant == "shared norms" else None


# ---- the checkpoint ------------------------------------------------------------------------------------------

def tokenizer(d):
    """A byte-level BPE with Llama's <unk> <s> </s> (ids 0, 1, 2) and <|image|> added; BOS prepended."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["USER: Describe the image. ASSISTANT: A cat sits on a mat.", "What is in the picture? Two dogs."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False,
                                                        special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(MARK, special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<s>", eos_token="</s>")


def make_owl(d, seed=0):
    tok = tokenizer(d)
    cfg = dict(architectures=["MPLUGOwl2LlamaForCausalLM"], model_type="mplug_owl2", vocab_size=len(tok),
               bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu", attention_bias=False,
               tie_word_embeddings=False, torch_dtype="float32", rope_scaling=None, **LM,
               visual_config=dict(visual_model=dict(VIS, model_type="mplug_owl_vision_model"),
                                  visual_abstractor=dict(ABS, model_type="mplug_owl_visual_abstract")))
    torch.manual_seed(seed)
    model = Owl2(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "_ln" in name) and p.dim() == 1 and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name or "pos" in name else 0.15))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    from transformers import CLIPImageProcessor
    ip = CLIPImageProcessor(size={"shortest_edge": VIS["image_size"]},
                            crop_size={"height": VIS["image_size"], "width": VIS["image_size"]})
    ip.save_pretrained(d)
    return model, tok, ip


def tokenizer_image_token(prompt, tok):
    chunks = [tok(c).input_ids if c else [] for c in prompt.split(MARK)]
    ids, off = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        off = 1
        ids.append(chunks[0][0])
    for i, c in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(c[off:])
    return ids


def pixels(ip, paths):
    """process_images with image_aspect_ratio 'pad': expand2square with the mean colour, then the processor."""
    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        w, h = im.size
        bg = tuple(int(x * 255) for x in ip.image_mean)
        if w != h:
            sq = Image.new(im.mode, (max(w, h), max(w, h)), bg)
            sq.paste(im, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
            im = sq
        out.append(ip.preprocess(im, return_tensors="pt")["pixel_values"][0])
    return torch.stack(out) if out else None


def prompt(q, n_images=1):
    """conv_mplug_owl2 (TWO_NO_SYS): 'USER: <|image|>{q} ASSISTANT:'."""
    return f"USER: {MARK * n_images}{q} ASSISTANT:"


def mmb_logits(d, tmp_path, text, paths):
    out = tmp_path / "logits.safetensors"
    imgs = [a for p in paths for a in ("--image", p)]
    run("generate", d, "--raw", "--prompt", text, *imgs, "-n", 0, "--logits", out, "--threads", 2)
    return load_file(str(out))["logits"]


@pytest.fixture(scope="module")
def owl(tmp_path_factory):
    d = tmp_path_factory.mktemp("owl") / "mplug-owl2"
    model, tok, ip = make_owl(d)
    paths = random_images(d.parent, [(28, 28), (30, 41), (45, 22)], 7)
    return d, model, tok, ip, paths


def test_encode_matches_reference(owl, tmp_path):
    d, model, tok, ip, paths = owl
    out = tmp_path / "emb.safetensors"
    run("encode", d, *paths, "-o", out, "--threads", 2)
    got = load_file(str(out))["embeddings"]
    with torch.no_grad():
        want = model.encode_images(pixels(ip, paths))
    err = scaled_err(got, want)
    print(f"mPLUG-Owl2 encode {tuple(want.shape)}: scaled max err {err:.2e}")
    assert got.shape == want.shape == (3, ABS["num_learnable_queries"] + 1, LM["hidden_size"]) and err <= 1e-4


def test_logits_and_greedy_match_reference(owl, tmp_path):
    d, model, tok, ip, paths = owl
    cases = {"1 image, square": (prompt("Describe the image."), paths[:1]),
             "1 image, tall (padded)": (prompt("What is in the picture?"), paths[1:2]),
             "2 images": (f"USER: {MARK}A cat sits on a mat.{MARK}Two dogs. ASSISTANT:", [paths[2], paths[0]]),
             "text only": ("USER: What is in the picture? ASSISTANT:", [])}
    for label, (text, imgs) in cases.items():
        ids = tokenizer_image_token(text, tok)
        with torch.no_grad():
            want = model(ids, pixels(ip, imgs))
        got = mmb_logits(d, tmp_path, text, imgs)
        err = scaled_err(got, want)
        print(f"mPLUG-Owl2 {label}: {want.shape[0]} positions, scaled max err {err:.2e}")
        assert got.shape == want.shape and err <= 1e-4
        if imgs:  # the wrong variants are far off
            for v in ("shared K/V", "shared norms"):
                model.set_variant(v)
                with torch.no_grad():
                    wrong = model(ids, pixels(ip, imgs))
                model.set_variant(None)
                e = scaled_err(got, wrong)
                print(f"  variant {v}: scaled err {e:.2e}")
                assert e > 1e-2
    text, imgs = cases["2 images"]
    with torch.no_grad():
        want = model.greedy(tokenizer_image_token(text, tok), pixels(ip, imgs), 24)
    args = [a for p in imgs for a in ("--image", p)]
    r = run("generate", d, "--raw", "--prompt", text, *args, "-n", 24, "--print-ids", "--ignore-eos", "--threads", 2)
    assert [int(t) for t in r.stdout.split()] == want


def test_marker_not_in_the_tokenizer(owl, tmp_path):
    """The hub's Llama 2 tokenizer has no <|image|> token: the prompt is then cut at the marker's text and the pieces
    tokenized apart, as tokenizer_image_token does (here it gives the same ids as the added token, so the same
    logits as the reference)."""
    import shutil
    d, model, tok, ip, paths = owl
    plain = tmp_path / "owl-plain-tokenizer"
    shutil.copytree(d, plain)
    tj = json.loads((plain / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["content"] != MARK]
    (plain / "tokenizer.json").write_text(json.dumps(tj))
    from tokenizers import Tokenizer
    assert Tokenizer.from_file(str(plain / "tokenizer.json")).token_to_id(MARK) is None
    for text, imgs in [(prompt("Describe the image."), paths[:1]),
                       (f"USER: {MARK}A cat sits on a mat.{MARK}Two dogs. ASSISTANT:", [paths[2], paths[0]])]:
        with torch.no_grad():
            want = model(tokenizer_image_token(text, tok), pixels(ip, imgs))
        got = mmb_logits(plain, tmp_path, text, imgs)
        err = scaled_err(got, want)
        print(f"mPLUG-Owl2, <|image|> as text: scaled max err {err:.2e}")
        assert got.shape == want.shape and err <= 1e-4
    fails(["generate", plain, "--raw", "--prompt", prompt("x", 2), "--image", paths[0], "-n", 1], "marker")


def test_bad_input(owl, tmp_path):
    d, model, tok, ip, paths = owl

    def broken(name, edit):
        b = tmp_path / name
        shutil.copytree(d, b)
        sd = load_file(str(b / "model.safetensors"))
        cfg = json.loads((b / "config.json").read_text())
        edit(sd, cfg)
        save_file(sd, str(b / "model.safetensors"), metadata={"format": "pt"})
        (b / "config.json").write_text(json.dumps(cfg))
        return b

    miss = "model.layers.1.self_attn.v_proj.multiway.1.weight"
    b = broken("no_multiway", lambda sd, cfg: sd.pop(miss))
    fails(["generate", b, "--raw", "--prompt", prompt("a"), "--image", paths[0], "-n", 1],
          str(b), miss, "missing")
    k1 = "model.layers.0.self_attn.k_proj.multiway.1.weight"
    b = broken("short_multiway", lambda sd, cfg: sd.update({k1: sd[k1][:, :-1].contiguous()}))
    fails(["info", b], "model.safetensors", k1)
    norm = "model.layers.0.post_attention_layernorm.multiway.1.weight"
    b = broken("no_norm", lambda sd, cfg: sd.pop(norm))
    fails(["info", b], str(b), norm)
    ab = "model.visual_abstractor.encoder.layers.1.crossattention.normk.weight"
    b = broken("no_abs", lambda sd, cfg: sd.pop(ab))
    fails(["encode", b, paths[0], "-o", tmp_path / "x.safetensors"], str(b), ab)
    b = broken("grid", lambda sd, cfg: cfg["visual_config"]["visual_abstractor"].update(grid_size=3))
    fails(["encode", b, paths[0], "-o", tmp_path / "x.safetensors"], "grid_size 3")
    fails(["generate", d, "--raw", "--prompt", prompt("a", 2), "--image", paths[0], "-n", 1], "2 image marker(s)")
