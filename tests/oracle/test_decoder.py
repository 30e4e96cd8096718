"""The LLM decoder (Llama, Mistral, Qwen2; the text model of LlavaForConditionalGeneration; original-layout
LLaVA) against transformers on tiny random checkpoints made with save_pretrained: logits from ids and
from embeddings, prefill in pieces + decode steps = one full forward, greedy generation token for token,
the RoPE scalings, bf16 weights, tied and untied heads, and bad input."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from conftest import VISION, run, scaled_err, random_images, fails

SHAPE = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
ARCH = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM)}


def randomize(model, seed):
    """Weights large enough for well-separated logits (greedy must not hinge on 1e-7), norms away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                continue
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.12))


def text_config(arch, **kw):
    cfg = dict(SHAPE)
    cfg.update(kw)
    return ARCH[arch][0](**cfg)


def make_lm(tmp_path, arch="llama", dtype=torch.float32, seed=0, name="lm", **kw):
    torch.manual_seed(seed)
    model = ARCH[arch][1](text_config(arch, **kw)).eval()
    randomize(model, seed)
    model.generation_config.eos_token_id = None
    d = tmp_path / name
    # the f32 reference runs on the stored (rounded) weights; .to(dtype) would also round RoPE's inv_freq buffer
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
    model.to(dtype).save_pretrained(d, safe_serialization=True)
    return (ref, model) if dtype != torch.float32 else ref, d


def make_llava_lm(tmp_path, arch, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text_config(arch, **kw),
                      image_token_index=SHAPE["vocab_size"] - 1)
    model = LlavaForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    model.generation_config.eos_token_id = None
    d = tmp_path / "llava"
    model.save_pretrained(d, safe_serialization=True)
    return model, d


def ids_of(n, seed=1, vocab=SHAPE["vocab_size"] - 1):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def csv(ids):
    return ",".join(str(int(i)) for i in ids)


def mmb_logits(d, tmp_path, *args):
    out = tmp_path / "logits.safetensors"
    p = run("generate", d, *args, "--logits", out, "--threads", 2)
    return load_file(str(out))["logits"], p


def ref_logits(model, ids=None, embeds=None):
    with torch.no_grad():
        if embeds is not None:
            return model(inputs_embeds=embeds[None]).logits[0].float()
        return model(input_ids=ids[None]).logits[0].float()


def mmb_greedy(d, ids, n, *extra):
    p = run("generate", d, "--ids", csv(ids), "-n", n, "--print-ids", "--ignore-eos", "--threads", 2, *extra)
    return [int(t) for t in p.stdout.split()], p


def ref_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True),
                                       ("mistral", False)])
def test_logits_from_ids_and_embeddings(tmp_path, arch, tied):
    model, d = make_lm(tmp_path, arch, tie_word_embeddings=tied)
    ids = ids_of(11)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    ref = ref_logits(model, ids)
    err = scaled_err(got, ref)
    print(f"{arch} tied={tied}: ids scaled max err {err:.2e}")
    assert got.shape == ref.shape and err <= 1e-4
    emb = torch.randn(9, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(3))
    save_file({"embeds": emb.contiguous()}, str(tmp_path / "e.safetensors"))
    got, _ = mmb_logits(d, tmp_path, "--embeds", tmp_path / "e.safetensors", "-n", 0)
    err = scaled_err(got, ref_logits(model, embeds=emb))
    print(f"{arch} tied={tied}: embeds scaled max err {err:.2e}")
    assert err <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefill_in_pieces_and_decode_steps_equal_one_forward(tmp_path, arch):
    model, d = make_lm(tmp_path, arch)
    ids = ids_of(10)
    # 10 prompt positions fed as 3 + 3 + 3 + 1 (decoder calls of --n-batch 3), then 6 decode steps: 16 rows of logits
    got, p = mmb_logits(d, tmp_path, "--ids", csv(ids), "--n-batch", 3, "-n", 7, "--print-ids", "--ignore-eos")
    gen = [int(t) for t in p.stdout.split()]
    assert len(gen) == 7 and got.shape[0] == 16
    ref = ref_logits(model, torch.cat([ids, torch.tensor(gen[:6])]))
    err = scaled_err(got, ref)
    print(f"{arch}: pieces + decode scaled max err {err:.2e}")
    assert err <= 1e-4
    # and it would catch a wrong cache: the logits of a shifted sequence differ a lot
    assert scaled_err(got[1:], ref[:-1]) > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_32_tokens_identical(tmp_path, arch):
    model, d = make_lm(tmp_path, arch)
    ids = ids_of(8, seed=5)
    got, p = mmb_greedy(d, ids, 32)
    ref = ref_greedy(model, ids, 32)
    print(p.stderr.strip())
    assert got == ref


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32, "rope_theta": 10000.0},
])
def test_rope_scaling(tmp_path, rope):
    # max_position_embeddings 16: dynamic NTK rescales once the sequence passes it (llama3's is the extended one)
    mpe = 64 if rope["rope_type"] == "llama3" else 16
    model, d = make_lm(tmp_path, "llama", rope_parameters=dict(rope), max_position_embeddings=mpe)
    ids = ids_of(12)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    err = scaled_err(got, ref_logits(model, ids))
    print(f"{rope['rope_type']}: scaled max err {err:.2e}")
    assert err <= 1e-4
    gen, _ = mmb_greedy(d, ids[:6], 20)
    assert gen == ref_greedy(model, ids[:6], 20)
    # the scaling matters: the same weights read with default RoPE give other logits (beyond 16 for dynamic)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    cfg["max_position_embeddings"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    long_ids = ids_of(30)
    got_default, _ = mmb_logits(d, tmp_path, "--ids", csv(long_ids), "-n", 0)
    assert scaled_err(got_default, ref_logits(model, long_ids)) > 1e-3


def test_legacy_rope_keys(tmp_path):
    """rope_theta + rope_scaling at the top level, as configs written before transformers 5 have them."""
    rope = {"rope_type": "linear", "factor": 3.0, "rope_theta": 20000.0}
    model, d = make_lm(tmp_path, "llama", rope_parameters=dict(rope))
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg["rope_theta"] = 20000.0
    cfg["rope_scaling"] = {"type": "linear", "factor": 3.0}
    (d / "config.json").write_text(json.dumps(cfg))
    ids = ids_of(12)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    assert scaled_err(got, ref_logits(model, ids)) <= 1e-4


def test_mistral_sliding_window(tmp_path):
    model, d = make_lm(tmp_path, "mistral", sliding_window=5)
    ids = ids_of(14)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "--n-batch", 4, "-n", 0)
    ref = ref_logits(model, ids)
    err = scaled_err(got, ref)
    print(f"mistral window 5: scaled max err {err:.2e}")
    assert err <= 1e-4
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    got_full, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    assert scaled_err(got_full, ref) > 1e-3  # the window matters


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_weights(tmp_path, arch):
    """bf16 weights stay bf16 and are widened exactly inside the products: equal to transformers in f32 on
    the bf16-rounded weights within 1e-4; against transformers computing in bf16 the gap is bf16's own."""
    (model, model16), d = make_lm(tmp_path, arch, dtype=torch.bfloat16)
    ids = ids_of(12)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    err32 = scaled_err(got, ref_logits(model, ids))  # model: the bf16 weights, in f32
    err16 = scaled_err(got, ref_logits(model16, ids))
    print(f"{arch} bf16 weights: vs f32 compute {err32:.2e}, vs bf16 compute {err16:.2e}")
    assert err32 <= 1e-4 and err16 <= 0.1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("layout", ["saved", "newer"])
def test_llava_text_model(tmp_path, arch, layout):
    model, d = make_llava_lm(tmp_path, arch)
    if layout == "newer":  # model.language_model.* and lm_head.weight, as transformers 4.5x wrote them
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        assert any(k.startswith("model.language_model.") for k in sd)
    ids = ids_of(10)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    err = scaled_err(got, ref_logits(model, ids))
    print(f"llava {arch} {layout}: scaled max err {err:.2e}")
    assert err <= 1e-4
    gen, _ = mmb_greedy(d, ids, 32)
    assert gen == ref_greedy(model, ids, 32)


def test_original_llava_layout(tmp_path):
    """LlavaLlamaForCausalLM: the Llama weights at model.layers.*, model.embed_tokens, lm_head, beside the
    projector (model.mm_projector.*) of a whole original-layout checkpoint."""
    model, d = make_lm(tmp_path, "llama")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_projector_type="mlp2x_gelu",
               mm_hidden_size=32, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               mm_vision_tower="openai/clip-vit-large-patch14-336")
    (d / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(d / "model.safetensors"))
    h = SHAPE["hidden_size"]
    sd.update({"model.mm_projector.0.weight": torch.zeros(h, 32), "model.mm_projector.0.bias": torch.zeros(h),
               "model.mm_projector.2.weight": torch.zeros(h, h), "model.mm_projector.2.bias": torch.zeros(h)})
    save_file(sd, str(d / "model.safetensors"))
    ids = ids_of(10)
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), "-n", 0)
    assert scaled_err(got, ref_logits(model, ids)) <= 1e-4


def test_bad_input(tmp_path):
    model, d = make_lm(tmp_path, "llama")
    ids = csv(ids_of(6))
    # unknown architecture
    cfg = json.loads((d / "config.json").read_text())
    bad = dict(cfg, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (d / "config.json").write_text(json.dumps(bad))
    fails(["generate", d, "--ids", ids, "-n", 1], "architecture 'GPT2LMHeadModel'", "supported families")
    # an unsupported RoPE type
    (d / "config.json").write_text(json.dumps(dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                          "rope_theta": 1e4})))
    fails(["generate", d, "--ids", ids, "-n", 1], "rope type 'yarn' is not supported")
    # a linear factor that takes the context past any int64 position count (it used to come out negative)
    (d / "config.json").write_text(json.dumps(dict(cfg, max_position_embeddings=2 ** 40, rope_parameters={
        "rope_type": "linear", "factor": 1e10, "rope_theta": 1e4})))
    fails(["generate", d, "--ids", ids, "-n", 1], "beyond any context")
    (d / "config.json").write_text(json.dumps(cfg))
    # context overflow: 130 ids for max_position_embeddings 128
    fails(["generate", d, "--ids", csv(ids_of(130)), "-n", 1], "context overflow", "130 tokens", "limit is 128")
    # an id outside the vocabulary
    fails(["generate", d, "--ids", "1,2,999", "-n", 1], "token id 999", "[0, 256)")
    # image placeholders without images: Llava config names the image token
    (d / "config.json").write_text(json.dumps(dict(cfg, image_token_index=7)))
    fails(["generate", d, "--ids", "1,7,3", "-n", 1], "1 image placeholder(s) (token 7) but 0 image(s)")
    (d / "config.json").write_text(json.dumps(cfg))
    # a missing tensor, a wrong shape
    sd = load_file(str(d / "model.safetensors"))
    full = dict(sd)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    fails(["generate", d, "--ids", ids, "-n", 1], "model.layers.1.mlp.up_proj.weight", "missing")
    sd = dict(full)
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(sd, str(d / "model.safetensors"))
    fails(["generate", d, "--ids", ids, "-n", 1], "model.layers.0.self_attn.k_proj.weight", "shape [16, 64]",
          "expected [32, 64]")
    # untied without a head
    sd = dict(full)
    del sd["lm_head.weight"]
    save_file(sd, str(d / "model.safetensors"))
    fails(["generate", d, "--ids", ids, "-n", 1], "lm_head.weight", "missing")


# ---- type C: images spliced into the prompt -------------------------------------------------------------

def make_images(tmp_path, n):
    return random_images(tmp_path, [(40 + 9 * i, 33) for i in range(n)], 7)


def llava_with_processor(tmp_path, arch):
    from transformers import CLIPImageProcessor
    model, d = make_llava_lm(tmp_path, arch)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # a projector that is not near zero, so the image matters
        for p in model.model.multi_modal_projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(d, safe_serialization=True)
    proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc.save_pretrained(d)
    return model, d, proc


def expand(ids, image_token, per_image):
    out = []
    for t in ids:
        out.extend([image_token] * per_image if t == image_token else [t])
    return torch.tensor(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_generate_with_images(tmp_path, arch, n_images):
    from PIL import Image
    model, d, proc = llava_with_processor(tmp_path, arch)
    img_tok = model.config.image_token_index
    paths = make_images(tmp_path, n_images)
    px = proc([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    text = ids_of(9).tolist()
    ids = text[:2] + [img_tok] + text[2:5] + ([img_tok] if n_images == 2 else []) + text[5:]
    per = (VISION["image_size"] // VISION["patch_size"]) ** 2  # "default" drops CLS
    full = expand(ids, img_tok, per)
    imgs = [a for p in paths for a in ("--image", p)]
    got, _ = mmb_logits(d, tmp_path, "--ids", csv(ids), *imgs, "-n", 0)
    with torch.no_grad():
        ref = model(input_ids=full[None], pixel_values=px).logits[0]
    err = scaled_err(got, ref)
    print(f"llava {arch} {n_images} image(s): {len(full)} positions, scaled max err {err:.2e}")
    assert got.shape == ref.shape and err <= 1e-4
    # the image matters: another image gives other logits
    with torch.no_grad():
        ref_other = model(input_ids=full[None], pixel_values=torch.flip(px, dims=[0, 3])).logits[0]
    assert scaled_err(got, ref_other) > 1e-3
    # greedy, 32 tokens
    gen, p = mmb_greedy(d, ids, 32, *imgs)
    with torch.no_grad():
        out = model.generate(input_ids=full[None], pixel_values=px, attention_mask=torch.ones(1, len(full), dtype=torch.long),
                             do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
    assert gen == out[0, len(full):].tolist()
    assert "prefill:" in p.stderr and "decode:" in p.stderr


def test_placeholder_count_mismatch(tmp_path):
    model, d, proc = llava_with_processor(tmp_path, "llama")
    img_tok = model.config.image_token_index
    paths = make_images(tmp_path, 2)
    fails(["generate", d, "--ids", f"1,{img_tok},3", "--image", paths[0], "--image", paths[1], "-n", 1],
          "1 image placeholder(s)", "but 2 image(s)")
    fails(["generate", d, "--ids", f"1,{img_tok},3,{img_tok}", "--image", paths[0], "-n", 1],
          "2 image placeholder(s)", "but 1 image(s)")


# ---- --prompt: the chat template and the tokenizer ------------------------------------------------------

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_tokenizer(d):
    """A byte-level BPE trained here, with ChatML specials and LLaVA's <image>; returns its size and <image> id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Describe the image in a few words.", "What is in this picture? A cat on a mat.",
              "The quick brown fox jumps over the lazy dog."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return tok.get_vocab_size(), tok.token_to_id("<image>")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_from_a_prompt(tmp_path, arch):
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor
    d = tmp_path / "llava"
    vocab, img_tok = tiny_tokenizer(d)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text_config(arch, vocab_size=vocab),
                      image_token_index=img_tok)
    model = LlavaForConditionalGeneration(cfg).eval()
    randomize(model, 0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.generation_config.eos_token_id = None
    model.save_pretrained(d, safe_serialization=True)
    proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc.save_pretrained(d)
    paths = make_images(tmp_path, 2)
    px = proc([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    hf = AutoTokenizer.from_pretrained(str(d))
    text = hf.apply_chat_template([{"role": "user", "content": "<image>\n<image>\nDescribe the image."}],
                                  tokenize=False, add_generation_prompt=True)
    ids = hf(text, add_special_tokens=False).input_ids
    per = (VISION["image_size"] // VISION["patch_size"]) ** 2
    full = expand(ids, img_tok, per)
    imgs = [a for p in paths for a in ("--image", p)]
    # logits: the placeholders put in front by generate (none in the prompt)
    got, _ = mmb_logits(d, tmp_path, "--prompt", "Describe the image.", *imgs, "-n", 0)
    with torch.no_grad():
        ref = model(input_ids=full[None], pixel_values=px).logits[0]
    err = scaled_err(got, ref)
    print(f"prompt + chat template, {arch}, 2 images: {len(full)} positions, scaled max err {err:.2e}")
    assert got.shape == ref.shape and err <= 1e-4
    with torch.no_grad():
        out = model.generate(input_ids=full[None], pixel_values=px, attention_mask=torch.ones(1, len(full), dtype=torch.long),
                             do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
    ref_ids = out[0, len(full):].tolist()
    p = run("generate", d, "--prompt", "<image>\n<image>\nDescribe the image.", *imgs, "-n", 32, "--ignore-eos",
            "--print-ids", "--threads", 2)
    assert [int(t) for t in p.stdout.split()] == ref_ids
    # text mode: the streamed text is the tokenizer's decode of the same ids
    p = run("generate", d, "--prompt", "Describe the image.", *imgs, "-n", 32, "--ignore-eos", "--threads", 2)
    assert p.stdout == hf.decode(ref_ids, skip_special_tokens=True) + "\n"
    # --raw: no template; the raw text's ids
    raw_ids = hf("<image> hi <image>", add_special_tokens=True).input_ids
    got, _ = mmb_logits(d, tmp_path, "--prompt", "<image> hi <image>", "--raw", *imgs, "-n", 0)
    with torch.no_grad():
        ref = model(input_ids=expand(raw_ids, img_tok, per)[None], pixel_values=px).logits[0]
    assert scaled_err(got, ref) <= 1e-4
    # a stop string ends the text once it appears
    full_text = hf.decode(ref_ids, skip_special_tokens=True)
    if len(full_text) > 4:
        stop = full_text[2:4]
        p = run("generate", d, "--prompt", "Describe the image.", *imgs, "-n", 32, "--ignore-eos", "--stop", stop)
        assert stop in p.stdout and len(p.stdout) < len(full_text) + 1 and full_text.startswith(p.stdout.rstrip("\n"))
    # no tokenizer file
    (d / "tokenizer.json").unlink()
    fails(["generate", d, "--prompt", "Describe the image.", *imgs, "-n", 1], "tokenizer.json")
