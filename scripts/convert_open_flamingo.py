#!/usr/bin/env python3
"""Converts an OpenFlamingo model as its users have it into the checkpoint directory mmbridge opens
(docs/decisions.md "OpenFlamingo checkpoints"):

  checkpoint.pt     OpenFlamingo's trainable parameters (the hub's checkpoint.pt, a bare state dict, or a training
                    checkpoint {"model_state_dict": ...} with DDP's "module." prefix): perceiver.*, the gated
                    cross-attention blocks (as lang_encoder.gated_cross_attn_layers.{i}.* and/or
                    lang_encoder.model.layers.{i}.gated_cross_attn_layer.*; kept once), the input embeddings
                    resized for <|endofchunk|>, <image> (and <PAD>)
  --llama DIR       the Hugging Face Llama directory the model was built on (config.json, *.safetensors or
                    pytorch_model*.bin, the tokenizer)
  --vision DIR      the Hugging Face CLIP directory of its vision encoder (a CLIPModel or CLIPVisionModel;
                    openai/clip-vit-large-patch14 holds the weights of open_clip's ViT-L-14 'openai')

into OUT: config.json, model.safetensors (perceiver.*, lang_encoder.* under OpenFlamingo's names),
the tokenizer with OpenFlamingo's tokens added as its factory adds them, vision_tower/ (CLIPVisionModel +
preprocessor_config.json). Written to a temporary directory beside OUT and renamed at the end; an existing OUT is
never touched.

Only Llama language models: the MPT (mpt-1b, mpt-7b) and RedPajama (GPT-NeoX) based OpenFlamingo releases are out
of scope (their decoder layers are not Llama's). A checkpoint that also holds a fine-tuned vision encoder
(vision_encoder.*, open_clip's names) is refused.
"""
import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

BLOCK_KEYS = ("attn_gate", "ff_gate", "attn.norm.weight", "attn.norm.bias", "attn.to_q.weight", "attn.to_kv.weight",
              "attn.to_out.weight", "ff.0.weight", "ff.0.bias", "ff.1.weight", "ff.3.weight")
PERC_LAYER_KEYS = ("0.norm_media.weight", "0.norm_media.bias", "0.norm_latents.weight", "0.norm_latents.bias",
                   "0.to_q.weight", "0.to_kv.weight", "0.to_out.weight", "1.0.weight", "1.0.bias", "1.1.weight",
                   "1.3.weight")


class ConvertError(Exception):
    pass


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Converts a Llama-based OpenFlamingo model (its checkpoint.pt, the Hugging Face Llama and CLIP "
                    "directories it was built on) into the checkpoint directory mmbridge opens. The MPT- and "
                    "RedPajama-based releases (OpenFlamingo-3B/4B/9B) are out of scope.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="OpenFlamingo's checkpoint.pt")
    p.add_argument("--llama", required=True, metavar="DIR", help="the Hugging Face Llama directory")
    p.add_argument("--vision", required=True, metavar="DIR", help="the Hugging Face CLIP directory")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the directory to write (must not exist)")
    p.add_argument("--cross-attn-every-n-layers", type=int, metavar="N",
                   help="a gated block before every N-th decoder layer (OpenFlamingo's training flag; default: what "
                        "the checkpoint's blocks show, checked against this when given)")
    p.add_argument("--vision-feature", choices=("patch", "patch_ln_post"), default="patch",
                   help="the tokens open_clip handed the resampler in training: 'patch' (open_clip < 2.23: before "
                        "ln_post; the released models), 'patch_ln_post' (open_clip >= 2.23: after it)")
    p.add_argument("--attend-all-media", action="store_true",
                   help="only_attend_immediate_media false (text sees every earlier image; OpenFlamingo's default is "
                        "the most recent one only)")
    p.add_argument("--xattn-heads", type=int, default=8, help="heads of the gated cross-attention (OpenFlamingo: 8)")
    p.add_argument("--perceiver-heads", type=int, default=8, help="heads of the resampler (OpenFlamingo: 8)")
    p.add_argument("--dtype", choices=("keep", "float32", "float16", "bfloat16"), default="keep",
                   help="tensor dtype in the output (default: as stored)")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="let torch.load run arbitrary pickled code (only for checkpoint files you trust; needed for "
                        "training checkpoints whose optimizer or scheduler state is not plain tensors)")
    return p.parse_args(argv)


# ---- reading ---------------------------------------------------------------------------------------------------

def load_checkpoint(path, unsafe):
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as e:  # noqa: BLE001 (torch raises several kinds)
        hint = "" if unsafe else " (a checkpoint with pickled objects needs --unsafe-pickle, for files you trust)"
        raise ConvertError(f"{path}: cannot be loaded: {e}{hint}")
    if isinstance(obj, dict) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ConvertError(f"{path}: not a state dict (nor a training checkpoint with model_state_dict)")
    sd = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ConvertError(f"{path}: entry '{k}' is not a tensor")
        k = k[len("module."):] if k.startswith("module.") else k
        k = k.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")
        sd[k] = v
    return sd


def load_tensors(d):
    """Every tensor of a Hugging Face directory: *.safetensors (sharded or not), else pytorch_model*.bin."""
    import torch
    from safetensors.torch import load_file
    d = Path(d)
    files = sorted(d.glob("*.safetensors"))
    if (d / "model.safetensors.index.json").exists():
        index = json.loads((d / "model.safetensors.index.json").read_text())
        files = [d / f for f in sorted(set(index["weight_map"].values()))]
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    if not files:
        bins = sorted(d.glob("pytorch_model*.bin"))
        if not bins:
            raise ConvertError(f"{d}: no *.safetensors or pytorch_model*.bin")
        for f in bins:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
    return sd


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: {e}")


# ---- the checkpoint's parts ------------------------------------------------------------------------------------

def split_checkpoint(sd, path):
    """-> perceiver {name: t}, blocks {layer: {name: t}}, lm overrides {Llama name: t}"""
    import torch
    perc, blocks, alt, lm = {}, {}, {}, {}
    unknown = []
    for k, v in sd.items():
        if k.startswith("perceiver."):
            perc[k[len("perceiver."):]] = v
        elif k.startswith("vision_encoder."):
            raise ConvertError(f"{path}: holds '{k}': a fine-tuned vision encoder (open_clip's names) is not "
                               "supported; the tower must be the --vision directory's as it is")
        elif k.startswith("lang_encoder.transformer.") or k.startswith("lang_encoder.gpt_neox."):
            raise ConvertError(f"{path}: holds '{k}': an MPT or GPT-NeoX (RedPajama) language model; only Llama-based "
                               "OpenFlamingo models convert")
        elif m := re.fullmatch(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)", k):
            blocks.setdefault(int(m[1]), {})[m[2]] = v
        elif m := re.fullmatch(r"lang_encoder\.model\.layers\.(\d+)\.gated_cross_attn_layer\.(.+)", k):
            alt.setdefault(int(m[1]), {})[m[2]] = v
        elif m := re.fullmatch(r"lang_encoder\.model\.layers\.(\d+)\.decoder_layer\.(.+)", k):
            lm[f"model.layers.{m[1]}.{m[2]}"] = v
        elif k.startswith("lang_encoder.old_decoder_blocks."):
            continue  # the decoder layers again, under the mixin's second name
        elif k in ("lang_encoder.model.embed_tokens.weight", "lang_encoder.model.norm.weight",
                   "lang_encoder.lm_head.weight"):
            lm[k[len("lang_encoder."):]] = v
        else:
            unknown.append(k)
    if unknown:
        raise ConvertError(f"{path}: {len(unknown)} tensor(s) this converter does not know, e.g. "
                           f"{', '.join(sorted(unknown)[:5])}")
    for i, names in alt.items():  # FlamingoLayer's name for the same modules: keep one
        for n, v in names.items():
            have = blocks.setdefault(i, {}).get(n)
            if have is not None and not (have.shape == v.shape and torch.equal(have, v)):
                raise ConvertError(f"{path}: 'lang_encoder.gated_cross_attn_layers.{i}.{n}' and "
                                   f"'lang_encoder.model.layers.{i}.gated_cross_attn_layer.{n}' differ")
            blocks[i][n] = v
    if not perc:
        raise ConvertError(f"{path}: no perceiver.* tensors: not an OpenFlamingo checkpoint")
    if not blocks:
        raise ConvertError(f"{path}: no gated cross-attention blocks (lang_encoder.gated_cross_attn_layers.* or "
                           "lang_encoder.model.layers.{i}.gated_cross_attn_layer.*)")
    return perc, blocks, lm


def shape_of(t):
    return list(t.shape)


def check_perceiver(perc, heads, path):
    lat = perc.get("latents")
    if lat is None or lat.ndim != 2:
        raise ConvertError(f"{path}: 'perceiver.latents' is missing or not [num_latents, dim]")
    n, dim = lat.shape
    for extra in ("frame_embs", "media_time_embs"):
        if extra in perc:
            raise ConvertError(f"{path}: 'perceiver.{extra}': OpenFlamingo's Flamingo builds its resampler without "
                               "it; such a checkpoint is not supported")
    layers = sorted({int(k.split(".")[1]) for k in perc if k.startswith("layers.")})
    if layers != list(range(len(layers))) or not layers:
        raise ConvertError(f"{path}: perceiver layers {layers}: expected 0..depth-1")
    want = {"latents", "norm.weight", "norm.bias"} | {f"layers.{i}.{k}" for i in layers for k in PERC_LAYER_KEYS}
    if set(perc) != want:
        miss, extra = sorted(want - set(perc)), sorted(set(perc) - want)
        raise ConvertError(f"{path}: perceiver tensors: missing {['perceiver.' + k for k in miss[:5]]}, "
                           f"unexpected {['perceiver.' + k for k in extra[:5]]}")
    inner, F = perc["layers.0.0.to_q.weight"].shape[0], perc["layers.0.1.1.weight"].shape[0]
    if inner % heads or F % dim:
        raise ConvertError(f"{path}: perceiver.layers.0.0.to_q.weight is {inner} wide, not {heads} heads x "
                           f"dim_head, or layers.0.1.1.weight's {F} rows not a multiple of {dim}")
    dh, mult = inner // heads, F // dim
    shapes = {"norm.weight": [dim], "norm.bias": [dim]}
    for i in layers:
        p = f"layers.{i}."
        shapes.update({p + "0.norm_media.weight": [dim], p + "0.norm_media.bias": [dim],
                       p + "0.norm_latents.weight": [dim], p + "0.norm_latents.bias": [dim],
                       p + "0.to_q.weight": [inner, dim], p + "0.to_kv.weight": [2 * inner, dim],
                       p + "0.to_out.weight": [dim, inner],
                       p + "1.0.weight": [dim], p + "1.0.bias": [dim], p + "1.1.weight": [F, dim],
                       p + "1.3.weight": [dim, F]})
    for k, s in shapes.items():
        if shape_of(perc[k]) != s:
            raise ConvertError(f"{path}: 'perceiver.{k}' is {shape_of(perc[k])}, expected {s}")
    return dim, dict(depth=len(layers), heads=heads, dim_head=dh, num_latents=n, ff_mult=mult)


def check_blocks(blocks, n_layers, every, d_txt, vis, heads, path):
    idx = sorted(blocks)
    if idx[-1] >= n_layers:
        raise ConvertError(f"{path}: a gated block for decoder layer {idx[-1]}, but the Llama has {n_layers} layers")
    if every is None:
        every = idx[0] + 1
    if every < 1:
        raise ConvertError("--cross-attn-every-n-layers must be at least 1")
    want = [i for i in range(n_layers) if (i + 1) % every == 0]
    if idx != want:
        raise ConvertError(f"{path}: gated blocks at decoder layers {idx}, but cross_attn_every_n_layers {every} puts "
                           f"them at {want} (OpenFlamingo: before layer i when (i + 1) % N == 0)")
    b0 = blocks[idx[0]]
    if "attn.to_q.weight" not in b0 or "ff.1.weight" not in b0:
        raise ConvertError(f"{path}: gated block {idx[0]}: attn.to_q.weight or ff.1.weight is missing")
    inner, F = b0["attn.to_q.weight"].shape[0], b0["ff.1.weight"].shape[0]
    if inner % heads or F % d_txt:
        raise ConvertError(f"{path}: gated block {idx[0]}: attn.to_q.weight is {inner} wide, not {heads} heads x "
                           f"dim_head, or ff.1.weight's {F} rows not a multiple of the LLM width {d_txt}")
    shapes = {"attn_gate": [1], "ff_gate": [1], "attn.norm.weight": [d_txt], "attn.norm.bias": [d_txt],
              "attn.to_q.weight": [inner, d_txt], "attn.to_kv.weight": [2 * inner, vis],
              "attn.to_out.weight": [d_txt, inner], "ff.0.weight": [d_txt], "ff.0.bias": [d_txt],
              "ff.1.weight": [F, d_txt], "ff.3.weight": [d_txt, F]}
    for i in idx:
        if set(blocks[i]) != set(BLOCK_KEYS):
            miss, extra = sorted(set(BLOCK_KEYS) - set(blocks[i])), sorted(set(blocks[i]) - set(BLOCK_KEYS))
            raise ConvertError(f"{path}: gated block {i}: missing {miss}, unexpected {extra}")
        for k, s in shapes.items():
            if shape_of(blocks[i][k]) != s:
                raise ConvertError(f"{path}: 'lang_encoder.gated_cross_attn_layers.{i}.{k}' is "
                                   f"{shape_of(blocks[i][k])}, expected {s}")
    return every, dict(heads=heads, dim_head=inner // heads, ff_mult=F // d_txt)


def llama_weights(d, cfg, overrides, vocab, path):
    """The Llama's tensors under HF names, the checkpoint's over them, the vocabulary resized to `vocab` rows."""
    import torch
    sd = {k: v for k, v in load_tensors(d).items() if not k.endswith("rotary_emb.inv_freq")}
    n, D = cfg["num_hidden_layers"], cfg["hidden_size"]
    known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for k in sd:
        if k not in known and not re.fullmatch(r"model\.layers\.(\d+)\..+", k):
            raise ConvertError(f"{d}: tensor '{k}' is not a LlamaForCausalLM's")
    for k, v in overrides.items():
        if k in sd and k != "model.embed_tokens.weight" and k != "lm_head.weight" and sd[k].shape != v.shape:
            raise ConvertError(f"{path}: 'lang_encoder.{k}' is {shape_of(v)}; the Llama's is {shape_of(sd[k])}")
        if k not in sd and k not in known:
            raise ConvertError(f"{path}: 'lang_encoder.{k}': the Llama has no such tensor")
        sd[k] = v
    emb = sd.get("model.embed_tokens.weight")
    if emb is None or shape_of(emb) != [vocab, D]:
        raise ConvertError(f"{path}: lang_encoder.model.embed_tokens.weight is {None if emb is None else shape_of(emb)}"
                           f"; OpenFlamingo resizes it to the tokenizer with its tokens added: [{vocab}, {D}] (is "
                           "--llama the model it was trained on?)")
    if "lm_head.weight" in overrides:
        pass  # the checkpoint's own
    elif cfg.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = emb
    else:
        head = sd.get("lm_head.weight")
        if head is None:
            raise ConvertError(f"{d}: lm_head.weight is missing (and tie_word_embeddings is false)")
        if head.shape[0] < vocab:  # the rows of the added tokens: their mean (transformers' resize draws around it)
            head = torch.cat([head, head.float().mean(0, keepdim=True).to(head.dtype).expand(vocab - head.shape[0], D)])
        sd["lm_head.weight"] = head[:vocab]
    if shape_of(sd["lm_head.weight"]) != [vocab, D]:
        raise ConvertError(f"lm_head.weight is {shape_of(sd['lm_head.weight'])}, expected [{vocab}, {D}]")
    for i in range(n):
        if f"model.layers.{i}.self_attn.q_proj.weight" not in sd:
            raise ConvertError(f"{d}: decoder layer {i} is missing (model.layers.{i}.self_attn.q_proj.weight)")
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", k):
            out[f"lang_encoder.model.layers.{m[1]}.decoder_layer.{m[2]}"] = v
        else:
            out["lang_encoder." + k] = v
    return out


def tokenizer(d):
    """The Llama's tokenizer with OpenFlamingo's tokens, as factory.create_model_and_transforms adds them."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    return tok, tok.encode("<image>")[-1], tok.encode("<|endofchunk|>")[-1]


def vision_tower(d, vis, out):
    from transformers import CLIPImageProcessor, CLIPVisionModel
    try:
        model, info = CLIPVisionModel.from_pretrained(d, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{d}: not a CLIP directory: {e}")
    if info.get("missing_keys"):
        raise ConvertError(f"{d}: the CLIP vision weights are incomplete: missing {sorted(info['missing_keys'])[:5]}")
    if model.config.hidden_size != vis:
        raise ConvertError(f"{d}: the CLIP tower is {model.config.hidden_size} wide, the resampler {vis} "
                           "(perceiver.latents): not the tower this model was trained with")
    model.save_pretrained(out, safe_serialization=True)
    if (Path(d) / "preprocessor_config.json").exists():
        proc = CLIPImageProcessor.from_pretrained(d)
    else:  # open_clip's transform for OpenAI's CLIP: bicubic resize of the short side, centre crop, OpenAI mean/std
        S = model.config.image_size
        print(f"note: {d} has no preprocessor_config.json; writing CLIPImageProcessor's defaults for {S}x{S}")
        proc = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    proc.save_pretrained(out)


def cast(sd, dtype):
    import torch
    if dtype == "keep":
        return sd
    dt = getattr(torch, dtype)
    return {k: v.to(dt) for k, v in sd.items()}


# ---- the whole -------------------------------------------------------------------------------------------------

def convert(a):
    from safetensors.torch import save_file
    out = Path(a.output)
    if out.exists():
        raise ConvertError(f"{out}: exists; refusing to overwrite it")
    lcfg = read_json(Path(a.llama) / "config.json")
    if lcfg.get("model_type") != "llama":
        raise ConvertError(f"{a.llama}/config.json: model_type {lcfg.get('model_type')!r}: only Llama language models "
                           "convert (MPT- and RedPajama-based OpenFlamingo releases are out of scope)")
    sd = load_checkpoint(a.checkpoint, a.unsafe_pickle)
    perc, blocks, overrides = split_checkpoint(sd, a.checkpoint)
    vis, pcfg = check_perceiver(perc, a.perceiver_heads, a.checkpoint)
    every, xcfg = check_blocks(blocks, lcfg["num_hidden_layers"], a.cross_attn_every_n_layers, lcfg["hidden_size"],
                               vis, a.xattn_heads, a.checkpoint)
    tok, img_id, eoc_id = tokenizer(a.llama)
    vocab = len(tok)
    tensors = {"perceiver." + k: v for k, v in perc.items()}
    for i, b in blocks.items():
        tensors.update({f"lang_encoder.gated_cross_attn_layers.{i}.{k}": v for k, v in b.items()})
    tensors.update(llama_weights(a.llama, lcfg, overrides, vocab, a.checkpoint))
    tensors = {k: v.contiguous() for k, v in cast(tensors, a.dtype).items()}
    text_config = dict(lcfg, vocab_size=vocab, model_type="llama")
    if tok.pad_token_id is not None:
        text_config["pad_token_id"] = tok.pad_token_id
    config = {
        "architectures": ["OpenFlamingo"], "model_type": "open_flamingo",
        "cross_attn_every_n_layers": every, "only_attend_immediate_media": not a.attend_all_media,
        "image_token_id": img_id, "end_of_chunk_token_id": eoc_id,
        "xattn_heads": xcfg["heads"], "xattn_dim_head": xcfg["dim_head"], "xattn_ff_mult": xcfg["ff_mult"],
        "vis_dim": vis, "vision_tower": "vision_tower", "vision_feature": a.vision_feature, "perceiver": pcfg,
        "text_config": text_config,
    }
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        vision_tower(a.vision, vis, tmp / "vision_tower")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if out.exists():
            raise ConvertError(f"{out}: appeared while converting; refusing to overwrite it")
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"{out}: {len(blocks)} gated block(s) every {every} layer(s), perceiver depth {pcfg['depth']} x "
          f"{pcfg['num_latents']} latents of {vis}, vocabulary {vocab} (<image> {img_id}, <|endofchunk|> {eoc_id}), "
          f"vision_feature {a.vision_feature}")


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        convert(a)
    except ConvertError as e:
        print(f"convert_open_flamingo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
