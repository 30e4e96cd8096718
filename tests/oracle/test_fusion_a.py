"""Fusion type A, IDEFICS (v1): gated cross-attention layers inside the LLM, end to end through
`mmbridge generate`, against transformers' IdeficsForVisionText2Text on tiny random checkpoints made with
save_pretrained and its IdeficsProcessor (token ids, pixels, image_attention_mask).

Checked: the logits of every
prompt position with 1 and with 2 images and text only (so the prompt's ids are the processor's:
the <fake_token_around_image> wrapping, BOS), within 1e-4 scaled; 24 greedy tokens identical;
positions before the first image independent of the images (and equal to the plain Llama's when the MLP
gates are 0 as well); the decoupled embedding and head (additional_vocab_size). Wrong variants (the layer
after the decoder layer, no tanh on the gates, every position seeing every image) are far off. Bad input
(K/V width, a gate's shape, more images than markers) fails with a clear error."""
import json

import pytest
import torch
from conftest import run, scaled_err, random_images, fails
from PIL import Image
from safetensors.torch import load_file, save_file

S = 28  # image side: 2x2 patches of 14
VIS = 24  # vision width (embed_dim)


def tokenizer(d):
    """A byte-level BPE with <s>, </s>, <unk>, and IDEFICS' two added tokens after the base vocabulary
    (the additional_vocab_size rows); BOS added by the post-processor. Returns the base vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["User: Describe this image. Assistant: a cat on a mat.", "What is in the picture? Two dogs."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    base = tok.get_vocab_size()
    tok.add_tokens([AddedToken("<fake_token_around_image>", special=True, normalized=False),
                    AddedToken("<image>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return base


def make_idefics(d, *, layers=2, interval=1, alpha="float", qk_norm=False, resampler=True, zero_dense=False,
                 seed=0):
    """A random IDEFICS whose images matter: every weight random, the gates far from 0 (tanh(gate) ~ 0.5-0.9)."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessor, IdeficsProcessor
    from transformers import PreTrainedTokenizerFast
    base = tokenizer(d)
    torch.manual_seed(seed)
    cfg = IdeficsConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, vocab_size=base,
        additional_vocab_size=2, cross_layer_interval=interval, alpha_type=alpha, qk_layer_norms=qk_norm,
        use_resampler=resampler, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        vision_config=dict(embed_dim=VIS, image_size=S, patch_size=14, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48),
        perceiver_config=dict(use_resampler=resampler, resampler_n_latents=3, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8))
    model = IdeficsForVisionText2Text(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.copy_((torch.rand(p.shape, generator=g) + 0.6) * torch.where(
                    torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0))
                if zero_dense and "alpha_dense" in name:
                    p.zero_()
            elif "norm" in name and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "latents" in name or "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    model.generation_config.eos_token_id = None
    model.save_pretrained(d, safe_serialization=True)
    ip = IdeficsImageProcessor(image_size=S)
    ip.save_pretrained(d)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<unk>")
    return model, IdeficsProcessor(image_processor=ip, tokenizer=tok, image_size=S)


def images(tmp_path, n):
    return random_images(tmp_path, [(31 + 7 * i, 29) for i in range(n)], 5)


def inputs(proc, items):
    """The processor's tensors for one prompt: a list of text pieces and image paths."""
    sample = [Image.open(x).convert("RGB") if not isinstance(x, str) else x for x in items]
    return proc(text=[sample], return_tensors="pt")


def prompt_of(items):
    return "".join(x if isinstance(x, str) else "<image>" for x in items)


def image_args(items):
    return [a for x in items if not isinstance(x, str) for a in ("--image", x)]


def ref_logits(model, enc):
    with torch.no_grad():
        return model(**enc).logits[0].float()


def mmb_logits(d, tmp_path, items, *extra):
    out = tmp_path / "logits.safetensors"
    p = run("generate", d, "--raw", "--prompt", prompt_of(items), *image_args(items), "-n", 0, "--logits", out,
            "--threads", 2, *extra)
    return load_file(str(out))["logits"], p


def text_only_inputs(proc, text):
    """What the processor gives a prompt without images: one all-zero image that no position sees."""
    return proc(text=[[text]], return_tensors="pt")


CONFIGS = [dict(), dict(layers=4, interval=2, alpha="vector", qk_norm=True),
           dict(layers=3, interval=1, resampler=False, alpha="vector")]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["float", "interval2-vector-qknorm", "no-resampler"])
def test_logits_and_greedy_match_transformers(tmp_path, cfg):
    d = tmp_path / "idefics"
    model, proc = make_idefics(d, **cfg)
    p1, p2 = images(tmp_path, 2)
    cases = {"1 image": ["User:", p1, "Describe this image.\nAssistant:"],
             "2 images": ["User:", p1, "What is in the picture?", p2, "Two dogs. Assistant:"],
             "2 images in a row": [p1, p2, "What is in the picture?"],
             "end of document": ["User:", p1, "A cat.</s>User: and this one? Two dogs.", p2, "Assistant:"],
             "text only": ["User: Describe this image. Assistant:"]}
    for label, items in cases.items():
        enc = inputs(proc, items) if len(items) > 1 else text_only_inputs(proc, items[0])
        ids = enc["input_ids"][0].tolist()
        got, _ = mmb_logits(d, tmp_path, items)
        ref = ref_logits(model, enc)
        err = scaled_err(got, ref)
        print(f"IDEFICS {cfg} {label}: {len(ids)} positions, scaled max err {err:.2e}")
        assert got.shape == ref.shape and err <= 1e-4
    # 24 greedy tokens, 2 images: transformers carries the last prompt row of image_attention_mask
    items = cases["2 images"]
    enc = inputs(proc, items)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=None)
    want = out[0, enc["input_ids"].shape[1]:].tolist()
    p = run("generate", d, "--raw", "--prompt", prompt_of(items), *image_args(items), "-n", 24, "--print-ids",
            "--ignore-eos", "--threads", 2)
    assert [int(t) for t in p.stdout.split()] == want


def test_positions_before_the_first_image(tmp_path):
    """They see no image: the same with other images or none, and the plain Llama's once the MLP gates are 0."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path / "idefics"
    model, proc = make_idefics(d, layers=2, zero_dense=True)
    p1, p2 = images(tmp_path, 2)
    items = ["User: what is it?", p1, "A cat."]
    got, _ = mmb_logits(d, tmp_path, items)
    got2, _ = mmb_logits(d, tmp_path, ["User: what is it?", p2, "A cat."])
    enc = inputs(proc, items)
    first = enc["input_ids"][0].tolist().index(proc.tokenizer.convert_tokens_to_ids("<fake_token_around_image>"))
    assert first > 3
    assert torch.equal(got[:first], got2[:first])
    assert (got[first + 2:] - got2[first + 2:]).abs().max() > 1e-2  # after it, the image matters
    # the plain Llama with the decoder's weights (IDEFICS' decoder is a Llama)
    c = model.config
    lc = LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                     vocab_size=c.vocab_size + c.additional_vocab_size, rms_norm_eps=c.rms_norm_eps,
                     max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False)
    llama = LlamaForCausalLM(lc).eval()
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in model.state_dict().items()}
    lsd = llama.state_dict()
    for k in lsd:
        if k == "model.embed_tokens.weight":
            lsd[k] = torch.cat([sd["embed_tokens.weight"], sd["embed_tokens.additional_embedding.weight"]])
        elif k == "lm_head.weight":
            lsd[k] = torch.cat([sd["lm_head.weight"], sd["lm_head.additional_fc.weight"]])
        else:
            lsd[k] = sd[k[len("model."):]]
    llama.load_state_dict(lsd)
    with torch.no_grad():
        plain = llama(input_ids=enc["input_ids"]).logits[0]
    err = scaled_err(got[:first], plain[:first])
    print(f"positions before the first image vs the plain Llama: scaled max err {err:.2e}")
    assert err <= 1e-4
    assert scaled_err(got[first + 2:], plain[first + 2:]) > 1e-2


def test_the_decoupled_rows(tmp_path):
    """Ids past vocab_size read the additional embedding; their logits come from additional_fc."""
    d = tmp_path / "idefics"
    model, proc = make_idefics(d)
    base = model.config.vocab_size
    ids = [1, 5, base, 7, base + 1 - 1, 9]
    out = tmp_path / "l.safetensors"
    run("generate", d, "--ids", ",".join(map(str, ids)), "-n", 0, "--logits", out)
    got = load_file(str(out))["logits"]
    enc = text_only_inputs(proc, "x")
    t = torch.tensor([ids])
    with torch.no_grad():
        ref = model(input_ids=t, pixel_values=enc["pixel_values"],
                    image_attention_mask=torch.zeros(1, len(ids), 1, dtype=torch.long)).logits[0]
    assert got.shape == (len(ids), base + 2) and scaled_err(got, ref) <= 1e-4


# ---- wrong variants are far off --------------------------------------------------------------------------

def reference_variant(model, enc, variant):
    """The model's logits with one thing done wrong, by patching transformers' own modules."""
    from transformers.models.idefics import modeling_idefics as mi
    layer_fwd = mi.IdeficsGatedCrossAttentionLayer.forward
    model_fwd = mi.IdeficsModel.forward
    try:
        if variant == "no tanh":
            for blk in model.model.gated_cross_attn_layers:
                blk.act_cross_attn = torch.nn.Identity()
                blk.act_dense = torch.nn.Identity()
        elif variant == "every image":
            e = dict(enc)
            e["image_attention_mask"] = torch.ones_like(enc["image_attention_mask"])
            return ref_logits(model, e)
        elif variant == "after the layer":
            # each gated layer run after decoder layer idx instead of before it
            layers = model.model.layers
            orig = [layer.forward for layer in layers]
            cross = model.model.gated_cross_attn_layers
            interval = model.model.cross_layer_interval
            saved = list(cross)
            state = {}

            def make(idx, f, blk):
                def fwd(hidden_states, *a, **k):
                    out = f(hidden_states, *a, **k)
                    if blk is not None:
                        return layer_fwd(blk, out, None, state["img"], image_attention_mask=state["mask"],
                                         cross_attention_gate=state["gate"])
                    return out
                return fwd

            def capture(self, hidden_states, attention_mask=None, image_hidden_states=None, image_attention_mask=None,
                        cross_attention_gate=None, **k):
                state.update(img=image_hidden_states, mask=image_attention_mask, gate=cross_attention_gate)
                return hidden_states
            mi.IdeficsGatedCrossAttentionLayer.forward = capture
            for i, layer in enumerate(layers):
                blk = saved[i // interval] if i % interval == 0 else None
                layer.forward = make(i, orig[i], blk)
            try:
                return ref_logits(model, enc)
            finally:
                mi.IdeficsGatedCrossAttentionLayer.forward = layer_fwd
                for i, layer in enumerate(layers):
                    layer.forward = orig[i]
        return ref_logits(model, enc)
    finally:
        mi.IdeficsGatedCrossAttentionLayer.forward = layer_fwd
        mi.IdeficsModel.forward = model_fwd


@pytest.mark.parametrize("variant", ["after the layer", "no tanh", "every image"])
def test_wrong_variants_are_far_off(tmp_path, variant):
    d = tmp_path / "idefics"
    model, proc = make_idefics(d, layers=2)
    p1, p2 = images(tmp_path, 2)
    items = ["Look:", p1, "What is in the picture?", p2, "Two dogs. Assistant:"]
    enc = inputs(proc, items)
    got, _ = mmb_logits(d, tmp_path, items)
    right = ref_logits(model, enc)
    wrong = reference_variant(model, enc, variant)
    assert scaled_err(got, right) <= 1e-4
    far = scaled_err(got, wrong)
    print(f"IDEFICS, {variant}: scaled max err {far:.6e} (the right model: {scaled_err(got, right):.2e})")
    assert far > 1e-2


# ---- bad input --------------------------------------------------------------------------------------------

def rewrite(d, fn):
    f = d / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


def test_bad_input(tmp_path):
    d = tmp_path / "idefics"
    make_idefics(d, layers=2)
    p1, p2 = images(tmp_path, 2)
    fails(["generate", d, "--raw", "--prompt", "a <image> b", "--image", p1, "--image", p2, "-n", 1],
          "1 image marker(s)", "2 image(s)")
    out = tmp_path / "never.safetensors"
    bad = tmp_path / "kv"
    import shutil
    shutil.copytree(d, bad)
    rewrite(bad, lambda t: t.__setitem__("model.gated_cross_attn_layers.1.cross_attn.k_proj.weight",
                                         torch.zeros(32, VIS + 4)))
    fails(["generate", bad, "--raw", "--prompt", "a <image> b", "--image", p1, "-n", 1, "--logits", out],
          "gated_cross_attn_layers.1.cross_attn.k_proj.weight", f"{VIS + 4}-wide", f"{VIS}-wide")
    assert not out.exists()
    gate = tmp_path / "gate"
    shutil.copytree(d, gate)
    rewrite(gate, lambda t: t.__setitem__("model.gated_cross_attn_layers.0.alpha_dense", torch.zeros(1, 1, 32)))
    fails(["info", gate], "alpha_dense", "alpha_type 'float'")
