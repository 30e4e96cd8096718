"""Llama 3.2 Vision (Mllama), the text side: `mmbridge generate` on tiny random MllamaForConditionalGeneration
checkpoints made with save_pretrained, against transformers with its MllamaProcessor (token ids, tiles,
cross_attention_mask).

Checked, on configs with different tile counts, global layers and cross-attention layer positions: the
logits of prompts with one image (several aspect ratios: 1 to 4 tiles), two images (apart and adjacent:
the processor's cross_attention_token_mask runs), and text only, within 1e-4 scaled; the rows before the
first image, which full_text_row_masked_out_mask masks out (their attention reads every visual token,
padding tiles included, and their MLP is skipped), equal to transformers' whatever they are; 24 greedy
tokens identical, through the chat template too. Wrong variants (padding tiles attended, the layer not
replacing the decoder layer, masked rows' MLP applied) are far off. Bad input fails clearly."""
import json
import shutil

import pytest
import torch
from conftest import run, scaled_err, random_images
from PIL import Image
from safetensors.torch import load_file, save_file

CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<|image|>' }}{% else %}{{ c['text'] }}"
        "{% endif %}{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def tokenizer(d):
    """A byte-level BPE with Llama 3's specials; <|image|> added after the vocabulary (an id past the logits, in
    the embedding's 8 extra rows, as Llama 3.2 Vision's 128256). Returns (vocab_size, image id)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Describe this image in one sentence. A cat sits on a mat.", "What is in the picture? Two dogs."] * 20
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=220, show_progress=False, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab_size()
    tok.add_tokens([AddedToken("<|image|>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": CHAT}))
    return vocab, tok.token_to_id("<|image|>")


def make_mllama(d, *, tiles=4, layers=5, cross=(1, 3), global_layers=1, intermediate=(0,), seed=0):
    from transformers import (MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor,
                              PreTrainedTokenizerFast)
    vocab, img = tokenizer(d)
    torch.manual_seed(seed)
    ratios = [[r, c] for r in range(1, tiles + 1) for c in range(1, tiles + 1) if r * c <= tiles]
    cfg = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=global_layers,
                           attention_heads=4, image_size=28, patch_size=14, max_num_tiles=tiles,
                           intermediate_layers_indices=list(intermediate),
                           vision_output_dim=32 * (len(intermediate) + 1), supported_aspect_ratios=ratios),
        text_config=dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=list(cross),
                         max_position_embeddings=512, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                         "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64}, bos_token_id=0, eos_token_id=4, pad_token_id=None),
        image_token_index=img)
    model = MllamaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.copy_((torch.rand(1, generator=g) + 0.6) * (1 if torch.rand(1, generator=g) < 0.7 else -1))
            elif "norm" in name and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.15))
    model.generation_config.eos_token_id = None
    model.save_pretrained(d, safe_serialization=True)
    ip = MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=tiles)
    ip.save_pretrained(d)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    return model, MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=CHAT)


def images(tmp_path, shapes):
    return random_images(tmp_path, shapes, 4)


def ref(model, proc, prompt, paths):
    imgs = [Image.open(p).convert("RGB") for p in paths]
    enc = proc(text=prompt, images=[imgs] if imgs else None, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0].float(), enc


def mmb_logits(d, tmp_path, prompt, paths, *extra):
    out = tmp_path / "logits.safetensors"
    imgs = [a for p in paths for a in ("--image", p)]
    run("generate", d, "--raw", "--prompt", prompt, *imgs, "-n", 0, "--logits", out, "--threads", 2, *extra)
    return load_file(str(out))["logits"]


CONFIGS = [dict(), dict(tiles=2, layers=4, cross=(0, 2), global_layers=2, intermediate=(0, 1))]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["4 tiles", "2 tiles"])
def test_logits_and_greedy_match_transformers(tmp_path, cfg):
    d = tmp_path / "mllama"
    model, proc = make_mllama(d, **cfg)
    p = images(tmp_path, [(30, 31), (20, 70), (90, 33)])
    cases = {"1 image, square": ("<|image|>Describe this image in one sentence.", p[:1]),
             "1 image, wide": ("Look: <|image|>What is in the picture?", p[1:2]),
             "2 images apart": ("<|image|>A cat sits on a mat.<|image|>What is in the picture?", [p[0], p[2]]),
             "2 images adjacent": ("<|image|><|image|>Two dogs.", [p[1], p[2]]),
             "text only": ("What is in the picture? Two dogs.", [])}
    for label, (prompt, paths) in cases.items():
        want, enc = ref(model, proc, prompt, paths)
        got = mmb_logits(d, tmp_path, prompt, paths)
        err = scaled_err(got, want)
        print(f"Mllama {cfg} {label}: {want.shape[0]} positions, scaled max err {err:.2e}")
        assert got.shape == want.shape and err <= 1e-4
    prompt, paths = cases["2 images apart"]
    imgs = [Image.open(x).convert("RGB") for x in paths]
    enc = proc(text=prompt, images=[imgs], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=None)
    want = out[0, enc["input_ids"].shape[1]:].tolist()
    r = run("generate", d, "--raw", "--prompt", prompt, "--image", paths[0], "--image", paths[1], "-n", 24,
            "--print-ids", "--ignore-eos", "--threads", 2)
    assert [int(t) for t in r.stdout.split()] == want


def test_chat_template_and_masked_rows(tmp_path):
    """Through the chat template; the header rows before the image are full_text_row_masked_out_mask's."""
    d = tmp_path / "mllama"
    model, proc = make_mllama(d)
    p = images(tmp_path, [(40, 25)])
    img = Image.open(p[0]).convert("RGB")
    enc = proc.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": img},
                                                                 {"type": "text", "text": "Describe this image."}]}],
                                   add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).logits[0].float()
    out = tmp_path / "l.safetensors"
    run("generate", d, "--prompt", "<|image|>Describe this image.", "--image", p[0], "-n", 0, "--logits", out)
    got = load_file(str(out))["logits"]
    first = enc["input_ids"][0].tolist().index(model.config.image_token_index)
    assert first >= 3 and enc["cross_attention_mask"][0, :first].sum() == 0
    assert got.shape == want.shape and scaled_err(got, want) <= 1e-4
    assert scaled_err(got[:first], want[:first]) <= 1e-4


def test_bad_input(tmp_path):
    d = tmp_path / "mllama"
    make_mllama(d)
    p = images(tmp_path, [(30, 30), (30, 30)])
    r = run("generate", d, "--raw", "--prompt", "<|image|>a", "--image", p[0], "--image", p[1], "-n", 1, check=False)
    assert r.returncode != 0 and "1 image marker(s)" in r.stderr
    bad = tmp_path / "kv"
    shutil.copytree(d, bad)
    t = load_file(str(bad / "model.safetensors"))
    name = next(k for k in t if k.endswith("layers.1.cross_attn.k_proj.weight"))
    t[name] = torch.zeros(t[name].shape[0], t[name].shape[1] + 4)
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    r = run("info", bad, check=False)
    assert r.returncode != 0 and name in r.stderr and "-wide visual tokens" in r.stderr
    gate = tmp_path / "gate"
    shutil.copytree(d, gate)
    t = load_file(str(gate / "model.safetensors"))
    name = next(k for k in t if k.endswith("layers.3.cross_attn_mlp_gate"))
    t[name] = torch.zeros(3)
    save_file(t, str(gate / "model.safetensors"), metadata={"format": "pt"})
    r = run("info", gate, check=False)
    assert r.returncode != 0 and "cross_attn_mlp_gate" in r.stderr


# ---- wrong variants -------------------------------------------------------------------------------------------

def variant_logits(model, enc, variant):
    from transformers.models.mllama import modeling_mllama as mm
    e = dict(enc)
    if variant == "padding tiles attended":
        e["cross_attention_mask"] = (enc["cross_attention_mask"].sum(-1, keepdim=True) > 0).expand_as(
            enc["cross_attention_mask"]).long()
        with torch.no_grad():
            return model(**e).logits[0].float()
    old = mm._prepare_cross_attention_mask

    def patched(mask, num_vision_tokens, dtype):
        m, full = old(mask, num_vision_tokens, dtype)
        if variant == "masked rows' MLP applied":
            return m, torch.ones_like(full)
        # masked rows keep their all -inf row: a uniform softmax instead of an unmasked one
        b, t = mask.shape[:2]
        inv = 1.0 - mask.repeat_interleave(num_vision_tokens, dim=3).view(b, t, -1)[:, None].to(dtype)
        return inv.masked_fill(inv.bool(), torch.finfo(dtype).min), full
    mm._prepare_cross_attention_mask = patched
    try:
        with torch.no_grad():
            return model(**e).logits[0].float()
    finally:
        mm._prepare_cross_attention_mask = old


@pytest.mark.parametrize("variant", ["padding tiles attended", "masked rows' MLP applied", "masked rows uniform"])
def test_wrong_variants_are_far_off(tmp_path, variant):
    d = tmp_path / "mllama"
    model, proc = make_mllama(d)
    p = images(tmp_path, [(20, 70), (90, 33)])  # 1x3 / 3x1 canvases of 4 tiles: padding tiles present
    prompt = "Look: <|image|>A cat sits on a mat.<|image|>What is in the picture?"
    want, enc = ref(model, proc, prompt, p)
    assert enc["aspect_ratio_mask"][0].sum() < 2 * model.config.vision_config.max_num_tiles
    got = mmb_logits(d, tmp_path, prompt, p)
    assert scaled_err(got, want) <= 1e-4
    far = scaled_err(got, variant_logits(model, enc, variant))
    print(f"Mllama, {variant}: scaled max err {far:.3e}")
    assert far > 1e-2


def test_bf16_weights_stay_bf16(tmp_path):
    """A bf16 checkpoint is read in place: the LLM reports BF16 weights and a decode step reads bf16 bytes, and
    the logits equal transformers' float32 run of the same (bf16-rounded) weights."""
    from transformers import MllamaForConditionalGeneration
    d = tmp_path / "mllama"
    model, proc = make_mllama(d)
    b = tmp_path / "bf16"
    shutil.copytree(d, b)
    model.to(torch.bfloat16).save_pretrained(b, safe_serialization=True)
    info = run("info", b).stdout
    assert "parameters (BF16)" in info, info
    ref32 = MllamaForConditionalGeneration.from_pretrained(b, torch_dtype=torch.float32).eval()
    p = images(tmp_path, [(30, 31)])
    prompt = "<|image|>Describe this image in one sentence."
    want, _ = ref(ref32, proc, prompt, p)
    got = mmb_logits(b, tmp_path, prompt, p)
    assert scaled_err(got, want) <= 1e-4
