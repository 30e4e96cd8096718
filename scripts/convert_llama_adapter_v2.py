#!/usr/bin/env python3
"""Converts a LLaMA-Adapter V2 multimodal model (OpenGVLab/LLaMA-Adapter, llama_adapter_v2_multimodal7b) as its
users have it into the checkpoint directory mmbridge opens (docs/decisions.md "LLaMA-Adapter V2"):

  ADAPTER.pth       what llama_adapter.load() reads: {"model": state dict, "config": {w_bias, w_lora, lora_rank}}
                    (BIAS-7B, LORA-BIAS-7B, CAPTION-7B, ...; a bare state dict is taken too): clip_proj(_norm),
                    visual_query, visual_blocks.{i}.*, visual_proj(_norm), adapter_query, and over the base LLaMA
                    llama.layers.{l}.attention.gate, the biases, the norms, LoRA (lora_*_l1/l2, new_gate)
  --llama DIR       Meta's LLaMA directory: consolidated.*.pth (model-parallel shards are joined) + params.json
  --tokenizer F     tokenizer.model (converted with transformers' LlamaTokenizerFast; needs sentencepiece) or an
                    already converted tokenizer.json
  --clip F          OpenAI CLIP's weights, as clip.load reads them: the TorchScript archive (ViT-L-14.pt) or a
                    state dict, with or without the "visual." prefix (not needed when ADAPTER holds clip.visual.*)

into OUT (written to a temporary directory beside it and renamed at the end; an existing OUT is never touched):

  config.json                architectures ["LlamaAdapterV2ForCausalLM"], model_type "llama_adapter_v2", the Llama
                             keys, query_len, query_layer, vision_config (CLIPVisionConfig keys) and visual_config
                             (the timm Blocks and the projector norms)
  model.safetensors          model.* / lm_head.weight in Hugging Face Llama names (q/k rows permuted from Meta's
                             interleaved RoPE to rotate_half, the q bias with them; LoRA merged),
                             model.layers.{l}.self_attn.adapter_gate [n_heads] (raw: tanh is the reader's) for the
                             top query_layer layers, adapter_query.weight; vision_tower.vision_model.* (CLIPVisionModel
                             names) and vision_tower.visual_projection.weight (CLIP's proj, transposed); clip_proj,
                             clip_proj_norm, visual_query.weight, visual_blocks.{i}.*, visual_proj, visual_proj_norm
  tokenizer.json, tokenizer_config.json (a chat_template reproducing utils.format_prompt, after the BOS the
                             original's encode(bos=True) puts first), preprocessor_config.json (CLIPImageProcessor as
                             clip.load's transform: resize the short side bicubic, center crop, CLIP's mean and std)

load() builds the model with fixed sizes (v_embed_dim 768, v_depth 8, v_num_heads 16, query_len 10, query_layer
31); the converter reads them from the tensors' shapes, except the heads of the visual blocks (--visual-heads) and
of the CLIP tower (--clip-heads: clip's build_model takes width / 64).

LoRA (LORA-BIAS-7B) is merged into the weights: W + l2 l1 for wq, wk, wv, wo, w1, w2, w3, and new_gate folded
into the gate (atanh(new_gate * tanh(gate))). The original runs the adapter prompts through wk and wv WITHOUT
their LoRA: for the adapted layers the unmerged ones are written too, as self_attn.adapter_k_proj.weight (rows
permuted as k_proj's) and self_attn.adapter_v_proj.weight. A reader that sends the prompts through the merged
k_proj / v_proj instead is not the original when lora_wk / lora_wv are non-zero (docs/decisions.md gives the
measured difference).
"""
import argparse
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

# The fields of llama.py's ModelArgs that params.json may set (ModelArgs(**params) refuses others).
MODEL_ARGS = {"dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "norm_eps", "max_batch_size", "max_seq_len",
              "w_bias", "w_lora", "lora_rank", "w_new_gate"}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MAX_SEQ_LEN = 512  # load(): LLaMA_adapter(..., max_seq_len=512)

PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n")
# bos_token, then utils.format_prompt(instruction) for the user message (its text parts joined; images take no
# positions in the text: they reach the LLM as the adapter prompts). An assistant turn (not in the original,
# which is single-turn) is appended with the EOS after it, so that a reply can be followed by a new instruction.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '" + PROMPT_NO_INPUT.replace("\n", "\\n") + "' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '\\n\\n### Response:' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
LORA_TARGETS = {"attention.wq": "wq", "attention.wk": "wk", "attention.wv": "wv", "attention.wo": "wo",
                "feed_forward.w1": "w1", "feed_forward.w2": "w2", "feed_forward.w3": "w3"}
HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
            "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm"}


class ConvertError(Exception):
    pass


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Converts a LLaMA-Adapter V2 multimodal model (its adapter .pth, Meta's LLaMA it was trained on, "
                    "the tokenizer and OpenAI CLIP's weights) into the checkpoint directory mmbridge opens.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("adapter", help="the adapter checkpoint .pth that llama_adapter.load() reads")
    p.add_argument("--llama", required=True, metavar="DIR", help="Meta's LLaMA directory (consolidated.*.pth, params.json)")
    p.add_argument("--tokenizer", required=True, metavar="F", help="tokenizer.model or a tokenizer.json")
    p.add_argument("--clip", metavar="F", help="OpenAI CLIP's weights (ViT-L-14.pt or a state dict)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the directory to write (must not exist)")
    p.add_argument("--visual-heads", type=int, default=16, help="heads of the visual blocks (load(): 16)")
    p.add_argument("--clip-heads", type=int, help="heads of the CLIP tower (default: width / 64, as clip does)")
    p.add_argument("--dtype", choices=("keep", "float32", "float16", "bfloat16"), default="keep",
                   help="tensor dtype in the output (default: as stored)")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="let torch.load run arbitrary pickled code (only for files you trust)")
    return p.parse_args(argv)


def shape_of(t):
    return list(t.shape)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: {e}")


def torch_load(path, unsafe):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as e:  # noqa: BLE001 (torch raises several kinds)
        try:  # OpenAI's ViT-L-14.pt is a TorchScript archive: its tensors through torch.jit
            return torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:  # noqa: BLE001
            pass
        hint = "" if unsafe else " (a file with pickled objects needs --unsafe-pickle, for files you trust)"
        raise ConvertError(f"{path}: cannot be loaded: {e}{hint}")


def tensors_of(obj, path):
    import torch
    if not isinstance(obj, dict) or not obj:
        raise ConvertError(f"{path}: not a state dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ConvertError(f"{path}: entry '{k}' is not a tensor")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


# ---- the adapter checkpoint ------------------------------------------------------------------------------------

def load_adapter(path, unsafe):
    obj = torch_load(path, unsafe)
    cfg = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        cfg = obj.get("config") or {}
        obj = obj["model"]
    return tensors_of(obj, path), cfg


def need(sd, key, path, shape=None):
    if key not in sd:
        raise ConvertError(f"{path}: tensor '{key}' is missing")
    t = sd[key]
    if shape is not None and shape_of(t) != list(shape):
        raise ConvertError(f"{path}: tensor '{key}' is {shape_of(t)}, expected {list(shape)}")
    return t


def split_adapter(sd, path):
    """(visual side, llama overrides by Meta name, CLIP tensors found in the checkpoint)."""
    visual, llama, clip = {}, {}, {}
    vis_prefixes = ("clip_proj.", "clip_proj_norm.", "visual_query.", "visual_blocks.", "visual_proj.",
                    "visual_proj_norm.", "adapter_query.")
    for k, v in sd.items():
        if k.startswith("llama."):
            llama[k[len("llama."):]] = v
        elif k.startswith("clip.visual."):
            clip[k[len("clip."):]] = v
        elif k.startswith("clip."):
            continue  # the text tower (deleted by LLaMA_adapter; a full training checkpoint may still hold it)
        elif k.startswith(vis_prefixes):
            visual[k] = v
        elif k.startswith("criterion."):
            continue
        else:
            raise ConvertError(f"{path}: tensor '{k}' is not LLaMA-Adapter V2's (unexpected keys fail load() too)")
    return visual, llama, clip


def check_visual(vis, dim, clip_out, heads, path):
    """The visual side's settings from its shapes; every tensor's shape checked."""
    q = need(vis, "visual_query.weight", path)
    if q.ndim != 2:
        raise ConvertError(f"{path}: tensor 'visual_query.weight' is {shape_of(q)}, expected [query_len, v_embed_dim]")
    qlen, v = q.shape
    a = need(vis, "adapter_query.weight", path)
    if a.ndim != 2 or a.shape[1] != dim or a.shape[0] % qlen:
        raise ConvertError(f"{path}: tensor 'adapter_query.weight' is {shape_of(a)}, expected [query_layer * {qlen}, "
                           f"{dim}] (the LLaMA's width is {dim}: is --llama the model this adapter was trained on?)")
    qlayer = a.shape[0] // qlen
    need(vis, "clip_proj.weight", path, [v, clip_out])
    need(vis, "clip_proj.bias", path, [v])
    for n in ("clip_proj_norm.weight", "clip_proj_norm.bias"):
        need(vis, n, path, [v])
    need(vis, "visual_proj.weight", path, [dim, v])
    for n in ("visual_proj.bias", "visual_proj_norm.weight", "visual_proj_norm.bias"):
        need(vis, n, path, [dim])
    depth = 0
    while f"visual_blocks.{depth}.norm1.weight" in vis:
        depth += 1
    if v % heads:
        raise ConvertError(f"{path}: v_embed_dim {v} is not a multiple of --visual-heads {heads}")
    fc1 = need(vis, "visual_blocks.0.mlp.fc1.weight", path) if depth else None
    inter = fc1.shape[0] if fc1 is not None else 4 * v
    shapes = {"norm1.weight": [v], "norm1.bias": [v], "attn.qkv.weight": [3 * v, v], "attn.qkv.bias": [3 * v],
              "attn.proj.weight": [v, v], "attn.proj.bias": [v], "norm2.weight": [v], "norm2.bias": [v],
              "mlp.fc1.weight": [inter, v], "mlp.fc1.bias": [inter], "mlp.fc2.weight": [v, inter], "mlp.fc2.bias": [v]}
    for i in range(depth):
        for k in BLOCK_KEYS:
            need(vis, f"visual_blocks.{i}.{k}", path, shapes[k])
    known = {"visual_query.weight", "adapter_query.weight", "clip_proj.weight", "clip_proj.bias",
             "clip_proj_norm.weight", "clip_proj_norm.bias", "visual_proj.weight", "visual_proj.bias",
             "visual_proj_norm.weight", "visual_proj_norm.bias"}
    known |= {f"visual_blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS}
    for k in vis:
        if k not in known:
            raise ConvertError(f"{path}: tensor '{k}' is not LLaMA-Adapter V2's (visual blocks 0..{depth - 1})")
    cfg = {"hidden_size": v, "num_hidden_layers": depth, "num_attention_heads": heads, "intermediate_size": inter,
           "hidden_act": "gelu", "layer_norm_eps": 1e-5, "proj_layer_norm_eps": 1e-5}
    return qlen, qlayer, cfg


# ---- the base LLaMA --------------------------------------------------------------------------------------------

def load_llama(d, unsafe):
    import torch
    d = Path(d)
    params = read_json(d / "params.json")
    extra = sorted(set(params) - MODEL_ARGS)
    if extra:
        raise ConvertError(f"{d}/params.json: keys {extra} are not llama.py's ModelArgs (LLaMA-Adapter V2 runs LLaMA-1 "
                           "7B: no grouped-query attention, no ffn_dim_multiplier)")
    files = sorted(d.glob("consolidated.*.pth"))
    if not files:
        raise ConvertError(f"{d}: no consolidated.*.pth")
    shards = [tensors_of(torch_load(f, unsafe), f) for f in files]
    if len(shards) == 1:
        return params, shards[0], files[0]
    # fairscale's model parallelism: column-parallel (wq, wk, wv, w1, w3, output) split dim 0, row-parallel (wo,
    # w2) and the parallel embedding split dim 1, the norms replicated.
    sd = {}
    for k in shards[0]:
        ts = [s[k] for s in shards]
        if k.endswith(("norm.weight",)) or k == "rope.freqs" or ts[0].ndim < 2:
            sd[k] = ts[0]
        elif re.search(r"\.(wo|w2)\.weight$", k) or k == "tok_embeddings.weight":
            sd[k] = torch.cat(ts, dim=1)
        else:
            sd[k] = torch.cat(ts, dim=0)
    return params, sd, files[0]


def permute_rows(w, heads):
    """Meta's interleaved RoPE pairs (2i, 2i+1) -> rotate_half's (i, i + hd/2), per head (convert_llama_weights_to_hf)."""
    n = w.shape[0]
    rest = list(w.shape[1:])
    return w.reshape(heads, n // heads // 2, 2, *rest).transpose(1, 2).reshape(n, *rest)


def llama_tensors(params, base, over, qlen_layers, path, base_path, lora_cfg):
    import torch
    dim, L, H = params["dim"], params["n_layers"], params["n_heads"]
    if dim % H or (dim // H) % 2:
        raise ConvertError(f"params.json: dim {dim} and n_heads {H} give an odd or fractional head width")
    emb = need(base, "tok_embeddings.weight", base_path)
    vocab = emb.shape[0]
    if emb.shape[1] != dim:
        raise ConvertError(f"{base_path}: tensor 'tok_embeddings.weight' is {shape_of(emb)}; params.json's dim is {dim}")
    inter = need(base, "layers.0.feed_forward.w1.weight", base_path).shape[0]
    lshapes = {"attention.wq.weight": [dim, dim], "attention.wk.weight": [dim, dim], "attention.wv.weight": [dim, dim],
               "attention.wo.weight": [dim, dim], "feed_forward.w1.weight": [inter, dim],
               "feed_forward.w3.weight": [inter, dim], "feed_forward.w2.weight": [dim, inter],
               "attention_norm.weight": [dim], "ffn_norm.weight": [dim]}
    sd = {"tok_embeddings.weight": emb, "norm.weight": need(base, "norm.weight", base_path, [dim]),
          "output.weight": need(base, "output.weight", base_path, [vocab, dim])}
    for l in range(L):
        for k, s in lshapes.items():
            sd[f"layers.{l}.{k}"] = need(base, f"layers.{l}.{k}", base_path, s)
    # the adapter checkpoint's tensors over the base (load_state_dict(strict=False) after the base's)
    bias_shapes = {"attention.wq.bias": [dim], "attention.wo.bias": [dim], "feed_forward.w1.bias": [inter],
                   "feed_forward.w3.bias": [inter], "feed_forward.w2.bias": [dim]}
    r = lora_cfg.get("lora_rank", 16)
    gates, lora, new_gates = {}, {}, {}
    for k, v in over.items():
        full = f"llama.{k}"
        if k in sd:
            if shape_of(v) != shape_of(sd[k]):
                raise ConvertError(f"{path}: tensor '{full}' is {shape_of(v)}; the LLaMA's '{k}' ({base_path}) is "
                                   f"{shape_of(sd[k])} (is --llama the model this adapter was trained on?)")
            sd[k] = v
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", k)
        if not m or int(m[1]) >= L:
            raise ConvertError(f"{path}: tensor '{full}': the LLaMA ({L} layers) has no such tensor")
        l, rest = int(m[1]), m[2]
        if rest == "attention.gate":
            if v.numel() != H:
                raise ConvertError(f"{path}: tensor '{full}' is {shape_of(v)}, expected [1, {H}, 1, 1]")
            gates[l] = v.reshape(H)
        elif rest == "attention.new_gate":
            if v.numel() != 1:
                raise ConvertError(f"{path}: tensor '{full}' is {shape_of(v)}, expected [1, 1, 1, 1]")
            new_gates[l] = v.reshape(())
        elif rest in bias_shapes:
            if shape_of(v) != bias_shapes[rest]:
                raise ConvertError(f"{path}: tensor '{full}' is {shape_of(v)}, expected {bias_shapes[rest]} (the "
                                   f"LLaMA's width is {dim})")
            sd[k] = v
        elif mm := re.fullmatch(r"(attention|feed_forward)\.lora_(w[qkvo123])_l([12])\.weight", rest):
            lora[(l, f"{mm[1]}.{mm[2]}", int(mm[3]))] = v
        else:
            raise ConvertError(f"{path}: tensor '{full}' is not LLaMA-Adapter V2's")
    if lora and lora_cfg.get("w_lora") is False:
        raise ConvertError(f"{path}: LoRA tensors but config w_lora false")
    if lora_cfg.get("w_lora") and not lora:
        raise ConvertError(f"{path}: config w_lora true but no LoRA tensors (llama.layers.*.attention.lora_*)")
    merged, base_kv = 0, {}
    for l in range(L):
        for tgt in LORA_TARGETS:
            a, b = lora.pop((l, tgt, 1), None), lora.pop((l, tgt, 2), None)
            if a is None and b is None:
                continue
            if a is None or b is None:
                raise ConvertError(f"{path}: tensor 'llama.layers.{l}.{tgt.split('.')[0]}.lora_{tgt.split('.')[1]}"
                                   f"_l{1 if a is None else 2}.weight' is missing (LoRA needs l1 and l2)")
            w = sd[f"layers.{l}.{tgt}.weight"]
            if tgt in ("attention.wk", "attention.wv"):
                base_kv[(l, tgt)] = w  # the adapter prompts' own: the original runs them through wk, wv without LoRA
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
                raise ConvertError(f"{path}: LoRA of 'llama.layers.{l}.{tgt}': l1 {shape_of(a)}, l2 {shape_of(b)} for a "
                                   f"weight of {shape_of(w)} (rank {r})")
            sd[f"layers.{l}.{tgt}.weight"] = (w.double() + b.double() @ a.double()).to(w.dtype)
            merged += 1
    if lora:
        (l, tgt, j), _ = next(iter(lora.items()))
        raise ConvertError(f"{path}: LoRA tensor of layer {l} {tgt} l{j} has no LLaMA weight to merge into")
    qlen, qlayer = qlen_layers
    if qlayer > L:
        raise ConvertError(f"{path}: adapter_query holds {qlayer} layers of prompts; the LLaMA has {L} layers")
    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for l in range(L):
        for meta, hf in HF_LAYER.items():
            for suf in ("weight", "bias"):
                k = f"layers.{l}.{meta}.{suf}"
                if k not in sd:
                    continue
                t = sd[k]
                if meta in ("attention.wq", "attention.wk"):
                    t = permute_rows(t, H)
                out[f"model.layers.{l}.{hf}.{suf}"] = t
    for l in range(L - qlayer, L):
        if l not in gates:
            raise ConvertError(f"{path}: tensor 'llama.layers.{l}.attention.gate' is missing (layer {l} is one of the "
                               f"top {qlayer} adapted layers)")
        g = gates[l].double()
        if lora_cfg.get("w_lora") or new_gates:  # w_new_gate = w_lora: new_gate * tanh(gate), folded into the gate
            eff = new_gates.get(l, 1.0) * g.tanh()
            if eff.abs().max() >= 1:
                raise ConvertError(f"{path}: layer {l}: new_gate * tanh(gate) reaches {eff.abs().max():.4g}; a raw "
                                   "gate can only express values inside (-1, 1)")
            g = eff.atanh()
        out[f"model.layers.{l}.self_attn.adapter_gate"] = g.to(gates[l].dtype)
        for tgt, name, perm in (("attention.wk", "adapter_k_proj", True), ("attention.wv", "adapter_v_proj", False)):
            if (l, tgt) in base_kv:
                w = base_kv[(l, tgt)]
                out[f"model.layers.{l}.self_attn.{name}.weight"] = permute_rows(w, H) if perm else w
    info = {"dim": dim, "layers": L, "heads": H, "inter": inter, "vocab": vocab, "lora_merged": merged,
            "eps": params.get("norm_eps", 1e-5)}
    return out, info


# ---- CLIP --------------------------------------------------------------------------------------------------------

def load_clip(path, from_adapter, unsafe, adapter_path):
    if path:
        sd = tensors_of(torch_load(path, unsafe), path)
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        src = path
    elif from_adapter:
        sd = {k[len("visual."):]: v for k, v in from_adapter.items()}
        src = adapter_path
    else:
        raise ConvertError(f"{adapter_path}: holds no CLIP weights (clip.visual.*): give --clip (ViT-L-14.pt)")
    return sd, src


def clip_tensors(sd, src, heads):
    conv = need(sd, "conv1.weight", src)
    if conv.ndim != 4 or conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise ConvertError(f"{src}: tensor 'conv1.weight' is {shape_of(conv)}, expected [width, 3, patch, patch]")
    W, patch = conv.shape[0], conv.shape[2]
    pos = need(sd, "positional_embedding", src)
    grid = math.isqrt(pos.shape[0] - 1)
    if pos.ndim != 2 or grid * grid + 1 != pos.shape[0] or pos.shape[1] != W:
        raise ConvertError(f"{src}: tensor 'positional_embedding' is {shape_of(pos)}, expected [grid^2 + 1, {W}]")
    proj = need(sd, "proj", src)
    if proj.ndim != 2 or proj.shape[0] != W:
        raise ConvertError(f"{src}: tensor 'proj' is {shape_of(proj)}, expected [{W}, output_dim]")
    layers = 0
    while f"transformer.resblocks.{layers}.ln_1.weight" in sd:
        layers += 1
    heads = heads or W // 64
    if heads < 1 or W % heads:
        raise ConvertError(f"{src}: CLIP width {W}: {heads} heads do not divide it (give --clip-heads)")
    inter = need(sd, "transformer.resblocks.0.mlp.c_fc.weight", src).shape[0] if layers else 4 * W
    p = "vision_tower.vision_model."
    out = {p + "embeddings.patch_embedding.weight": conv,
           p + "embeddings.class_embedding": need(sd, "class_embedding", src, [W]),
           p + "embeddings.position_embedding.weight": pos,
           p + "pre_layrnorm.weight": need(sd, "ln_pre.weight", src, [W]),
           p + "pre_layrnorm.bias": need(sd, "ln_pre.bias", src, [W]),
           p + "post_layernorm.weight": need(sd, "ln_post.weight", src, [W]),
           p + "post_layernorm.bias": need(sd, "ln_post.bias", src, [W]),
           "vision_tower.visual_projection.weight": proj.t().contiguous()}
    for i in range(layers):
        b, o = f"transformer.resblocks.{i}.", f"{p}encoder.layers.{i}."
        w = need(sd, b + "attn.in_proj_weight", src, [3 * W, W])
        bi = need(sd, b + "attn.in_proj_bias", src, [3 * W])
        for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
            out[o + f"self_attn.{n}.weight"] = w[j * W:(j + 1) * W]
            out[o + f"self_attn.{n}.bias"] = bi[j * W:(j + 1) * W]
        pairs = [("attn.out_proj.weight", "self_attn.out_proj.weight", [W, W]), ("attn.out_proj.bias", "self_attn.out_proj.bias", [W]),
                 ("ln_1.weight", "layer_norm1.weight", [W]), ("ln_1.bias", "layer_norm1.bias", [W]),
                 ("ln_2.weight", "layer_norm2.weight", [W]), ("ln_2.bias", "layer_norm2.bias", [W]),
                 ("mlp.c_fc.weight", "mlp.fc1.weight", [inter, W]), ("mlp.c_fc.bias", "mlp.fc1.bias", [inter]),
                 ("mlp.c_proj.weight", "mlp.fc2.weight", [W, inter]), ("mlp.c_proj.bias", "mlp.fc2.bias", [W])]
        for a, h, s in pairs:
            out[o + h] = need(sd, b + a, src, s)
    cfg = {"model_type": "clip_vision_model", "hidden_size": W, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": heads, "image_size": grid * patch,
           "patch_size": patch, "projection_dim": proj.shape[1], "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
           "num_channels": 3}
    return {k: v.contiguous() for k, v in out.items()}, cfg


# ---- tokenizer and processor -------------------------------------------------------------------------------------

def tokenizer(path):
    from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast
    path = Path(path)
    if path.suffix == ".json":
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        try:
            tok = LlamaTokenizerFast(vocab_file=str(path), legacy=True, add_bos_token=True, add_eos_token=False)
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"{path}: cannot be converted to tokenizer.json ({e}); install sentencepiece and "
                               "protobuf, or give a tokenizer.json")
    for t in ("<s>", "</s>"):
        if tok.convert_tokens_to_ids(t) is None or tok.convert_tokens_to_ids(t) == tok.unk_token_id and t != "<unk>":
            raise ConvertError(f"{path}: has no token '{t}' (LLaMA's BOS / EOS)")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def processor_config(size):
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD, "do_convert_rgb": True}


def cast(sd, dtype):
    import torch
    if dtype == "keep":
        return sd
    dt = getattr(torch, dtype)
    return {k: v.to(dt) for k, v in sd.items()}


# ---- the whole ---------------------------------------------------------------------------------------------------

def convert(a):
    from safetensors.torch import save_file
    out = Path(a.output)
    if out.exists():
        raise ConvertError(f"{out}: exists; refusing to overwrite it")
    asd, acfg = load_adapter(a.adapter, a.unsafe_pickle)
    vis, over, clip_in = split_adapter(asd, a.adapter)
    params, base, base_path = load_llama(a.llama, a.unsafe_pickle)
    csd, csrc = load_clip(a.clip, clip_in, a.unsafe_pickle, a.adapter)
    clip_t, vcfg = clip_tensors(csd, csrc, a.clip_heads)
    qlen, qlayer, bcfg = check_visual(vis, params["dim"], vcfg["projection_dim"], a.visual_heads, a.adapter)
    llm, info = llama_tensors(params, base, over, (qlen, qlayer), a.adapter, base_path, acfg)
    tok = tokenizer(a.tokenizer)
    if len(tok) != info["vocab"]:
        raise ConvertError(f"{a.tokenizer}: {len(tok)} tokens; the LLaMA's tok_embeddings has {info['vocab']} rows")
    tensors = dict(llm)
    tensors.update(clip_t)
    tensors.update(vis)
    tensors = {k: v.contiguous() for k, v in cast(tensors, a.dtype).items()}
    config = {
        "architectures": ["LlamaAdapterV2ForCausalLM"], "model_type": "llama_adapter_v2",
        "hidden_size": info["dim"], "intermediate_size": info["inter"], "num_hidden_layers": info["layers"],
        "num_attention_heads": info["heads"], "num_key_value_heads": info["heads"], "hidden_act": "silu",
        "rms_norm_eps": info["eps"], "vocab_size": info["vocab"], "max_position_embeddings": MAX_SEQ_LEN,
        "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": tok.convert_tokens_to_ids("<s>"), "eos_token_id": tok.convert_tokens_to_ids("</s>"),
        "query_len": qlen, "query_layer": qlayer, "vision_config": vcfg, "visual_config": bcfg,
        "lora_merged": info["lora_merged"],
    }
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor_config(vcfg["image_size"]), indent=2))
        if out.exists():
            raise ConvertError(f"{out}: appeared while converting; refusing to overwrite it")
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"{out}: LLaMA {info['layers']} layers x {info['dim']}, adapter prompts {qlen} x top {qlayer} layers, "
          f"visual blocks {bcfg['num_hidden_layers']} x {bcfg['hidden_size']}, CLIP {vcfg['num_hidden_layers']} x "
          f"{vcfg['hidden_size']} ({vcfg['image_size']} px), {info['lora_merged']} LoRA pair(s) merged")


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        convert(a)
    except ConvertError as e:
        print(f"convert_llama_adapter_v2: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
