"""CogVLM (THUDM/cogvlm-chat-hf's remote code, CogVLMForCausalLM): the visual expert, end to end.

There is no transformers class, so the reference is written here, in torch, from the remote code
(modeling_cogvlm.py and visual.py): EVA2CLIPModel (PatchEmbedding with the CLS token and the whole
position_embedding added, TransformerLayer with its norms on the sub-layers' outputs, the GLU adapter, the
boi/eoi rows), CogVLMModel's splice of the image rows over the input embeddings at token_type_ids VISION,
build_position_ids (boi p, every image token p + 1, eoi p + 2), get_expert_mask (a row takes the vision expert
when it and the next row are VISION: boi and the patches do, eoi does not; a single decode row never does),
VisionExpertAttention / VisionExpertMLP and the Llama-style rest (RMSNorm, rotate_half RoPE on the position ids,
causal attention). build_conversation_input_ids' prompt: [bos] + image rows + tokenizer.encode("Question: {q}
Answer:", add_special_tokens=False); its transform: Resize((S, S), bicubic) on the PIL image, ToTensor,
Normalize with CLIP's mean and std (torchvision's PIL path is PIL's resize; written here with PIL and torch).

Tiny random weights in the original key names (model.vision.*, model.layers.*.self_attn.vision_expert_*, ...),
saved with safetensors beside a config.json laid out as the hub's. Checked: the encode output, the logits of a
prompt with an image and of a text-only one within 1e-4 scaled, 24 greedy tokens identical; the wrong variants
(the vision expert on text rows, sequential RoPE positions for the image rows, eoi through the vision expert) far
off; bad input fails with the file and the tensor named."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fails, random_images, run, scaled_err
from PIL import Image
from safetensors.torch import load_file, save_file

VIS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_heads=4, patch_size=14, image_size=42,
           in_channels=3, num_positions=10, layer_norm_eps=1e-6, hidden_act="gelu", dropout_prob=0.0)
LM = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-5,
          max_position_embeddings=2048, hidden_act="silu")
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
LANG, VISION = 0, 1
# A model's shapes and its code's constants: the reference below takes one (test_cogvlm2.py passes CogVLM2's).
# theta: the RoPE base (FastRotaryEmbedding's, fixed in the code); down: EVA2CLIPModel.conv's stride (1: none).
V1 = dict(vis=VIS, lm=LM, theta=10000.0, down=1)


def tokenizer(d):
    """A byte-level BPE with Llama's specials <unk> <s> </s> (ids 0, 1, 2); tokenizer.json adds <s> in front, as
    LlamaTokenizer does. Returns (vocab size, PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Question: What is in the picture? Answer: A cat sits on a mat.", "Describe this image. Two dogs."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False,
                                                        special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return tok.get_vocab_size(), PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<s>",
                                                         eos_token="</s>", unk_token="<unk>")


def make_cogvlm(d, seed=0, vision_bias=False, cfg=V1, make_tokenizer=tokenizer, config=None):
    """A tiny CogVLM checkpoint: the state dict of CogVLMForCausalLM in its own names, random. vision_bias: the
    vision expert's QKV with a bias (CogVLM2's form; cogvlm-chat-hf's has none). cfg: the shapes (V1 or CogVLM2's,
    whose lm has num_multi_query_heads and whose down 2 adds model.vision.conv); make_tokenizer(d) -> (vocab,
    tokenizer); config: keys over config.json's. Returns (weights, tokenizer)."""
    VIS, LM = cfg["vis"], cfg["lm"]
    vocab, tok = make_tokenizer(d)
    g = torch.Generator().manual_seed(seed)
    D, I, H, Iv = LM["hidden_size"], LM["intermediate_size"], VIS["hidden_size"], VIS["intermediate_size"]
    p, P = VIS["patch_size"], VIS["num_positions"]
    qkv = D + 2 * LM.get("num_multi_query_heads", LM["num_attention_heads"]) * (D // LM["num_attention_heads"])

    def r(*shape, s=0.15):
        return torch.randn(*shape, generator=g) * s

    def norm(n):
        return torch.rand(n, generator=g) + 0.5

    w = {"model.embed_tokens.weight": r(vocab, D, s=0.5), "model.norm.weight": norm(D), "lm_head.weight": r(vocab, D)}
    for i in range(LM["num_hidden_layers"]):
        q = f"model.layers.{i}."
        w[q + "input_layernorm.weight"] = norm(D)
        w[q + "post_attention_layernorm.weight"] = norm(D)
        for e in ("language", "vision"):
            w[q + f"self_attn.{e}_expert_query_key_value.weight"] = r(qkv, D)
            w[q + f"self_attn.{e}_expert_dense.weight"] = r(D, D)
            w[q + f"mlp.{e}_mlp.gate_proj.weight"] = r(I, D)
            w[q + f"mlp.{e}_mlp.up_proj.weight"] = r(I, D)
            w[q + f"mlp.{e}_mlp.down_proj.weight"] = r(D, I)
        if vision_bias:
            w[q + "self_attn.vision_expert_query_key_value.bias"] = r(qkv)
    v = "model.vision."
    w[v + "patch_embedding.proj.weight"] = r(H, 3, p, p, s=0.05)
    w[v + "patch_embedding.proj.bias"] = r(H)
    w[v + "patch_embedding.cls_embedding"] = r(1, H, s=0.5)
    w[v + "patch_embedding.position_embedding.weight"] = r(P, H, s=0.5)
    for i in range(VIS["num_hidden_layers"]):
        q = f"{v}transformer.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            w[q + n + ".weight"], w[q + n + ".bias"] = norm(H), r(H)
        w[q + "attention.query_key_value.weight"], w[q + "attention.query_key_value.bias"] = r(3 * H, H), r(3 * H)
        w[q + "attention.dense.weight"], w[q + "attention.dense.bias"] = r(H, H), r(H)
        w[q + "mlp.fc1.weight"], w[q + "mlp.fc1.bias"] = r(Iv, H), r(Iv)
        w[q + "mlp.fc2.weight"], w[q + "mlp.fc2.bias"] = r(H, Iv), r(H)
    if cfg["down"] > 1:
        k = cfg["down"]
        w[v + "conv.weight"], w[v + "conv.bias"] = r(H, H, k, k, s=0.3), r(H)
    q = v + "linear_proj."
    w[q + "linear_proj.weight"] = r(D, H, s=0.3)
    w[q + "norm1.weight"], w[q + "norm1.bias"] = norm(D), r(D)
    w[q + "dense_h_to_4h.weight"], w[q + "gate_proj.weight"] = r(I, D), r(I, D)
    w[q + "dense_4h_to_h.weight"] = r(D, I)
    w[v + "boi"], w[v + "eoi"] = r(1, 1, D, s=0.5), r(1, 1, D, s=0.5)
    save_file({k: t.contiguous() for k, t in w.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"architectures": ["CogVLMForCausalLM"],
           "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                        "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"},
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.02,
           "template_version": "chat", "tie_word_embeddings": False, "torch_dtype": "float32",
           "use_cache": True, "vocab_size": vocab, **LM, "vision_config": dict(VIS), **(config or {})}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return w, tok


# ---- the reference, from modeling_cogvlm.py / visual.py -----------------------------------------------------

def vision_ref(w, pixels, cfg=V1, variant=None):
    """EVA2CLIPModel.forward: pixels (B, 3, S, S) -> (B, n^2 + 2, hidden): boi, GLU(patch tokens), eoi; n = grid,
    or grid / 2 after CogVLM2's conv (cfg down 2) on the (B, hidden, grid, grid) map of the patch tokens.
    variant "transposed grid": the map's rows and columns swapped before the conv (a wrong im2col order)."""
    VIS = cfg["vis"]
    v, H, nh, eps = "model.vision.", VIS["hidden_size"], VIS["num_heads"], VIS["layer_norm_eps"]
    x = F.conv2d(pixels, w[v + "patch_embedding.proj.weight"], w[v + "patch_embedding.proj.bias"],
                 stride=VIS["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((w[v + "patch_embedding.cls_embedding"].expand(x.shape[0], -1, -1), x), dim=1)
    x = x + w[v + "patch_embedding.position_embedding.weight"].unsqueeze(0)
    B, L, _ = x.shape
    for i in range(VIS["num_hidden_layers"]):
        q = f"{v}transformer.layers.{i}."
        qkv = F.linear(x, w[q + "attention.query_key_value.weight"], w[q + "attention.query_key_value.bias"])
        qkv = qkv.reshape(B, L, 3, nh, -1).permute(2, 0, 3, 1, 4)  # 3, B, H, L, hd
        a = torch.softmax((qkv[0] / (H // nh) ** 0.5) @ qkv[1].transpose(-1, -2), dim=-1) @ qkv[2]
        a = F.linear(a.transpose(1, 2).reshape(B, L, H), w[q + "attention.dense.weight"], w[q + "attention.dense.bias"])
        x = x + F.layer_norm(a, (H,), w[q + "input_layernorm.weight"], w[q + "input_layernorm.bias"], eps)
        m = F.linear(F.gelu(F.linear(x, w[q + "mlp.fc1.weight"], w[q + "mlp.fc1.bias"])), w[q + "mlp.fc2.weight"],
                     w[q + "mlp.fc2.bias"])
        x = x + F.layer_norm(m, (H,), w[q + "post_attention_layernorm.weight"], w[q + "post_attention_layernorm.bias"],
                             eps)
    x = x[:, 1:]
    if cfg["down"] > 1:
        g = int(round(x.shape[1] ** 0.5))
        x = x.reshape(B, g, g, H).permute(0, 3, 1, 2)
        if variant == "transposed grid":
            x = x.transpose(2, 3)
        x = F.conv2d(x, w[v + "conv.weight"], w[v + "conv.bias"], stride=cfg["down"]).flatten(2).transpose(1, 2)
    q = v + "linear_proj."
    x = F.linear(x, w[q + "linear_proj.weight"])
    x = F.gelu(F.layer_norm(x, (x.shape[-1],), w[q + "norm1.weight"], w[q + "norm1.bias"], 1e-5))
    x = F.silu(F.linear(x, w[q + "gate_proj.weight"])) * F.linear(x, w[q + "dense_h_to_4h.weight"])
    x = F.linear(x, w[q + "dense_4h_to_h.weight"])
    return torch.cat((w[v + "boi"].expand(B, -1, -1), x, w[v + "eoi"].expand(B, -1, -1)), dim=1)


def build_position_ids(tt):
    """build_position_ids: boi and eoi count as language; a run of vision rows shares one position."""
    tmp = tt.clone()
    is_boi_eoi = torch.zeros_like(tt, dtype=torch.bool)
    is_boi_eoi[:, 1:] |= (tmp[:, 1:] == VISION) & (tmp[:, :-1] == LANG)
    is_boi_eoi[:, 0] |= tmp[:, 0] == VISION
    is_boi_eoi[:, :-1] |= (tmp[:, :-1] == VISION) & (tmp[:, 1:] == LANG)
    is_boi_eoi[:, -1] |= tmp[:, -1] == VISION
    tmp[is_boi_eoi] = LANG
    y = torch.zeros_like(tt)
    y[:, 1:] = (tmp[:, 1:] == LANG) | ((tmp[:, 1:] == VISION) & (tmp[:, :-1] == LANG))
    return y.cumsum(dim=-1)


def expert_mask(tt):
    """get_expert_mask: vision when this row and the next are VISION."""
    m = torch.zeros_like(tt, dtype=torch.bool)
    m[:, :-1] = (tt[:, :-1] == VISION) & (tt[:, 1:] == VISION)
    return m


def rms(x, wt, eps=LM["rms_norm_eps"]):
    return wt * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def lm_ref(w, embeds, pos, vmask, cfg=V1, variant=None):
    """CogVLMModel.llm_forward + lm_head on one sequence: embeds (L, D), position ids (L), vision mask (L).
    CogVLM2's VisionExpertAttention: q | k | v split [heads, kv, kv] head widths, kv = num_multi_query_heads, each
    K/V head repeated for heads / kv consecutive query heads (unsqueeze(2).expand); the RoPE base cfg theta.
    variant "K/V heads interleaved": query head h reads K/V head h % kv instead (a wrong grouping)."""
    LM = cfg["lm"]
    D, nh = LM["hidden_size"], LM["num_attention_heads"]
    kv = LM.get("num_multi_query_heads", nh)
    hd, L = D // nh, embeds.shape[0]
    inv = 1.0 / (cfg["theta"] ** (torch.arange(0, hd, 2).float() / hd))
    t = torch.arange(int(pos.max()) + 1, dtype=inv.dtype)
    emb = torch.cat([torch.outer(t, inv)] * 2, dim=-1)
    cos, sin = emb.cos()[pos], emb.sin()[pos]  # (L, hd)
    causal = torch.full((L, L), float("-inf")).triu(1)
    x = embeds
    vm = vmask[:, None]

    def expert(h, name, bias=True):
        lw, vw = w[name.format("language")], w[name.format("vision")]
        vb = w.get(name.format("vision")[:-len("weight")] + "bias") if bias else None
        return torch.where(vm, F.linear(h, vw, vb), F.linear(h, lw))

    for i in range(LM["num_hidden_layers"]):
        q = f"model.layers.{i}."
        eps = LM["rms_norm_eps"]
        h = rms(x, w[q + "input_layernorm.weight"], eps)
        qkv = expert(h, q + "self_attn.{}_expert_query_key_value.weight")
        qs, ks, vs = (t.reshape(L, -1, hd).transpose(0, 1) for t in qkv.split([D, kv * hd, kv * hd], dim=-1))
        qs, ks = qs * cos + rotate_half(qs) * sin, ks * cos + rotate_half(ks) * sin
        if variant == "K/V heads interleaved":
            ks, vs = ks.repeat(nh // kv, 1, 1), vs.repeat(nh // kv, 1, 1)
        else:
            ks, vs = ks.repeat_interleave(nh // kv, dim=0), vs.repeat_interleave(nh // kv, dim=0)
        a = torch.softmax(qs @ ks.transpose(-1, -2) / hd ** 0.5 + causal, dim=-1) @ vs
        a = a.transpose(0, 1).reshape(L, D)
        x = x + expert(a, q + "self_attn.{}_expert_dense.weight", bias=False)
        h = rms(x, w[q + "post_attention_layernorm.weight"], eps)
        gate = expert(h, q + "mlp.{}_mlp.gate_proj.weight", bias=False)
        up = expert(h, q + "mlp.{}_mlp.up_proj.weight", bias=False)
        x = x + torch.where(vm, F.linear(F.silu(gate) * up, w[q + "mlp.vision_mlp.down_proj.weight"]),
                            F.linear(F.silu(gate) * up, w[q + "mlp.language_mlp.down_proj.weight"]))
    return F.linear(rms(x, w["model.norm.weight"], LM["rms_norm_eps"]), w["lm_head.weight"])


def pixels_ref(path, cfg=V1):
    """build_conversation_input_ids' transform: Resize((S, S), BICUBIC) on the PIL image, ToTensor, Normalize."""
    S = cfg["vis"]["image_size"]
    img = Image.open(path).convert("RGB").resize((S, S), Image.BICUBIC)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
    return ((t - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])[None]


def conversation(tok, query, image, cfg=V1):
    """build_conversation_input_ids (template 'chat'): ids and token_type_ids; image rows as pad ids (CogVLM2's
    code counts (image_size // patch_size // 2)^2 + 2 of them)."""
    VIS = cfg["vis"]
    n_img = (VIS["image_size"] // VIS["patch_size"] // cfg["down"]) ** 2 + 2 if image is not None else 0
    text = tok.encode(f"Question: {query} Answer:", add_special_tokens=False)
    ids = [tok.bos_token_id] + [0] * n_img + text
    tt = [LANG] + [VISION] * n_img + [LANG] * len(text)
    return torch.tensor([ids]), torch.tensor([tt])


def forward_ref(w, ids, tt, image, variant=None, cfg=V1):
    """Logits (L, vocab) of the whole sequence as CogVLMForCausalLM computes them (variant: a wrong one, as named
    here, in vision_ref or in lm_ref)."""
    x = w["model.embed_tokens.weight"][ids[0]].clone()
    if image is not None:
        x[tt[0] == VISION] = vision_ref(w, pixels_ref(image, cfg), cfg, variant)[0]
    pos, vm = build_position_ids(tt)[0], expert_mask(tt)[0]
    if variant == "vision expert on text rows":
        vm = torch.ones_like(vm)
    elif variant == "sequential positions":
        pos = torch.arange(ids.shape[1])
    elif variant == "eoi through the vision expert":
        vm = tt[0] == VISION
    return lm_ref(w, x, pos, vm, cfg, variant)


def greedy_ref(w, ids, tt, image, n, cfg=V1):
    """generate(do_sample=False): each new token LANGUAGE; with the cache a decode row's expert mask is computed on
    it alone (never vision) and its position is the last + 1, which a full recompute reproduces."""
    out = []
    for _ in range(n):
        t = int(forward_ref(w, ids, tt, image, cfg=cfg)[-1].argmax())
        out.append(t)
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
        tt = torch.cat([tt, torch.tensor([[LANG]])], dim=1)
    return out


# ---- the tests ---------------------------------------------------------------------------------------------

QUERY = "What is in the picture?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cog") / "cogvlm"
    w, tok = make_cogvlm(d)
    img = random_images(d.parent, [(50, 61)], 3)[0]
    return d, w, tok, img


def mmb_logits(d, tmp_path, image, query=QUERY):
    out = tmp_path / "logits.safetensors"
    args = ["--image", image] if image is not None else []
    run("generate", d, "--prompt", query, *args, "-n", 0, "--logits", out, "--threads", 2)
    return load_file(str(out))["logits"]


def test_encode_matches_reference(ckpt, tmp_path):
    d, w, _, img = ckpt
    info = run("info", d).stdout
    assert "cogvlm" in info, info
    out = tmp_path / "e.safetensors"
    run("encode", d, img, "-o", out, "--threads", 2)
    got = load_file(str(out))["embeddings"]
    with torch.no_grad():
        want = vision_ref(w, pixels_ref(img))
    err = scaled_err(got, want)
    print(f"CogVLM encode {tuple(want.shape)}: scaled max err {err:.2e}")
    assert got.shape == want.shape and err <= 1e-4


def test_logits_and_greedy_match_reference(ckpt, tmp_path):
    d, w, tok, img = ckpt
    for label, image in (("text only", None), ("image", img)):
        ids, tt = conversation(tok, QUERY, image)
        with torch.no_grad():
            want = forward_ref(w, ids, tt, image)
        got = mmb_logits(d, tmp_path, image)
        err = scaled_err(got, want)
        print(f"CogVLM logits, {label}: {want.shape[0]} positions, scaled max err {err:.2e}")
        assert got.shape == want.shape and err <= 1e-4
    ids, tt = conversation(tok, QUERY, img)
    with torch.no_grad():
        want = greedy_ref(w, ids, tt, img, 24)
    r = run("generate", d, "--prompt", QUERY, "--image", img, "-n", 24, "--print-ids", "--ignore-eos",
            "--threads", 2)
    assert [int(t) for t in r.stdout.split()] == want


def test_raw_prompt_and_split_batches(ckpt, tmp_path):
    """--raw is template 'base' (the query as it is, after BOS and the image); --n-batch 4 cuts the image's 11 rows
    across decoder calls, with the same experts and positions."""
    d, w, tok, img = ckpt
    ids, tt = conversation(tok, QUERY, img)
    text = tok.encode(QUERY, add_special_tokens=False)
    n_img = int((tt == VISION).sum())
    raw_ids = torch.tensor([[tok.bos_token_id] + [0] * n_img + text])
    raw_tt = torch.tensor([[LANG] + [VISION] * n_img + [LANG] * len(text)])
    out = tmp_path / "l.safetensors"
    with torch.no_grad():
        want = forward_ref(w, raw_ids, raw_tt, img)
        run("generate", d, "--raw", "--prompt", QUERY, "--image", img, "-n", 0, "--logits", out, "--threads", 2)
        assert scaled_err(load_file(str(out))["logits"], want) <= 1e-4
        want = forward_ref(w, ids, tt, img)
        run("generate", d, "--prompt", QUERY, "--image", img, "-n", 0, "--logits", out, "--n-batch", 4)
        assert scaled_err(load_file(str(out))["logits"], want) <= 1e-4


@pytest.mark.parametrize("variant", ["vision expert on text rows", "sequential positions",
                                     "eoi through the vision expert"])
def test_wrong_variants_are_far_off(ckpt, tmp_path, variant):
    d, w, tok, img = ckpt
    ids, tt = conversation(tok, QUERY, img)
    got = mmb_logits(d, tmp_path, img)
    with torch.no_grad():
        assert scaled_err(got, forward_ref(w, ids, tt, img)) <= 1e-4
        far = scaled_err(got, forward_ref(w, ids, tt, img, variant))
    print(f"CogVLM, {variant}: scaled max err {far:.3e}")
    assert far > 1e-2


def test_vision_qkv_bias(tmp_path):
    """A vision expert QKV with a bias (the form CogVLM2 has) is read and used."""
    d = tmp_path / "cogb"
    w, tok = make_cogvlm(d, seed=5, vision_bias=True)
    img = random_images(tmp_path, [(40, 40)], 7)[0]
    ids, tt = conversation(tok, QUERY, img)
    with torch.no_grad():
        want = forward_ref(w, ids, tt, img)
    assert scaled_err(mmb_logits(d, tmp_path, img), want) <= 1e-4


def rewrite(src, dst, edit=None, config=None):
    shutil.copytree(src, dst)
    if edit:
        t = load_file(str(dst / "model.safetensors"))
        edit(t)
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_bad_input(ckpt, tmp_path):
    d, _, _, img = ckpt
    name = "model.layers.1.mlp.vision_mlp.up_proj.weight"
    bad = rewrite(d, tmp_path / "noexpert", edit=lambda t: t.pop(name))
    fails(["generate", bad, "--prompt", "a", "-n", 1], str(bad), name, "missing")
    name = "model.layers.0.self_attn.vision_expert_query_key_value.weight"
    bad = rewrite(d, tmp_path / "qkv", edit=lambda t: t.__setitem__(name, t[name][:-3].contiguous()))
    fails(["generate", bad, "--prompt", "a", "-n", 1], name)
    bad = rewrite(d, tmp_path / "boi", edit=lambda t: t.__setitem__("model.vision.boi", torch.zeros(1, 1, 40)))
    p = fails(["encode", bad, img, "-o", tmp_path / "x.safetensors"], "model.vision.boi")
    assert "model.safetensors" in p.stderr, p.stderr
    name = "model.vision.transformer.layers.1.mlp.fc2.bias"
    bad = rewrite(d, tmp_path / "nofc2", edit=lambda t: t.pop(name))
    fails(["encode", bad, img, "-o", tmp_path / "x.safetensors"], name)
    bad = rewrite(d, tmp_path / "npos", config=lambda c: c["vision_config"].update(num_positions=17))
    fails(["info", bad], "num_positions")
    # one image a prompt, as build_conversation_input_ids asserts
    fails(["generate", d, "--prompt", "a", "--image", img, "--image", img, "-n", 1], "image")
