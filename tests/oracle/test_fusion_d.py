"""Fusion type D (discrete image tokens in the LLM's vocabulary) against transformers on tiny random checkpoints
made with save_pretrained:

  Chameleon  ChameleonForConditionalGeneration: the image through ChameleonVQVAE's encoder to codes, the codes to
             IMGIMG* ids through vocabulary_map (ChameleonImageVocabularyMapping), spliced between <racm3:break>
             and <eoss> (ChameleonProcessor), then the decoder with per-head q/k LayerNorms (and swin_norm), the
             image tokens' logits at the lowest float.
  Janus      JanusForConditionalGeneration.generate(generation_mode="image"): the ids through generation_head under
             classifier-free guidance, fed back through generation_embeddings + generation_aligner, then
             JanusVQVAE.decode.

Checked: the prompt ids as the processor makes them, the logits of a prompt with an image within 1e-4 scaled,
24 greedy tokens identical; the generated image ids identical to generate's, the PNG identical to the processor's
postprocess of decode_image_tokens. Wrong variants far off: codes without the vocabulary remap, swin_norm off for a
swin model, guidance off. Bad input: a vocabulary_map without a code's token."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import fails, run, scaled_err

LETTERS = "ABCDEFGHIJ"
K = 64  # codebook entries


def img_name(code):
    return "IMGIMG" + "".join(LETTERS[int(c)] for c in str(code)) + "Z"


def tokenizer(d, specials, extra):
    """A byte-level BPE trained here, with special tokens and the image tokens added; returns it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Describe the image in a few words.", "What is in this picture? A cat on a mat.",
              "Draw a red square on blue.", "The quick brown fox jumps over the lazy dog."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=specials))
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    return tok


def randomize(model, seed, skip=("vqmodel",)):
    """LLM weights large enough for well-separated logits, norms away from 1; the VQ model as initialised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in skip):
                continue
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else 0.12))


def images(tmp_path, n, side, seed):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


# ---- Chameleon -------------------------------------------------------------------------------------------

CHAM_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<racm3:break>", "<eoss>", "<reserved08706>"]


def make_chameleon(tmp_path, swin=False, seed=0):
    from transformers import (ChameleonConfig, ChameleonForConditionalGeneration, ChameleonImageProcessor,
                              ChameleonProcessor, PreTrainedTokenizerFast)
    d = tmp_path / ("cham_swin" if swin else "cham")
    tok = tokenizer(d, CHAM_SPECIALS, [img_name(k) for k in range(K)])
    vmap = tok.get_vocab()
    torch.manual_seed(seed)
    cfg = ChameleonConfig(vocab_size=len(vmap), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, swin_norm=swin, vocabulary_map=vmap,
                          bos_token_id=vmap["<s>"], eos_token_id=vmap["</s>"], pad_token_id=None,
                          vq_config=dict(embed_dim=16, num_embeddings=K, latent_channels=16, base_channels=32,
                                         channel_multiplier=[1, 2, 2], resolution=32, num_res_blocks=1,
                                         attn_resolutions=[8]))
    model = ChameleonForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    model.save_pretrained(d)
    ip = ChameleonImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ip.save_pretrained(d)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                sep_token="<reserved08706>")
    t.save_pretrained(d)
    proc = ChameleonProcessor(image_processor=ip, tokenizer=t, image_seq_length=(32 // 4) ** 2)
    return d, model, proc


def cham_inputs(proc, prompt, imgs):
    pil = [Image.open(p).convert("RGB") for p in imgs]
    return proc(images=pil or None, text=prompt, return_tensors="pt", return_for_text_completion=True)


@pytest.mark.parametrize("swin", [False, True])
def test_chameleon_logits_and_greedy(tmp_path, swin):
    d, model, proc = make_chameleon(tmp_path, swin=swin)
    imgs = images(tmp_path, 2, 32, seed=3)
    prompt = "Describe <image> and <image> in a few words."
    inp = cham_inputs(proc, prompt, imgs)
    with torch.no_grad():
        ref = model(**inp).logits[0].float()
        gen = model.generate(**inp, do_sample=False, max_new_tokens=24, min_new_tokens=24)[0, inp.input_ids.shape[1]:]
    out = tmp_path / "logits.safetensors"
    p = run("generate", d, "--image", imgs[0], "--image", imgs[1], "--prompt", prompt, "--raw", "-n", 24,
            "--print-ids", "--ignore-eos", "--logits", out, "--threads", 2)
    got = load_file(str(out))["logits"]
    n = inp.input_ids.shape[1]
    assert got.shape[0] == n + 23, (got.shape, n)
    masked = model.model.vocabulary_mapping.image_tokens
    keep = torch.ones(ref.shape[1], dtype=torch.bool)
    keep[masked] = False
    assert (got[:n, masked] == torch.finfo(torch.float32).min).all()  # the image tokens' logits, as forward sets them
    assert scaled_err(got[:n, keep], ref[:, keep]) < 1e-4
    assert [int(t) for t in p.stdout.split()] == gen.tolist()
    # a wrong variant: the raw codes as ids, without the vocabulary remap
    with torch.no_grad():
        vq = model.model.vqmodel.encode(inp.pixel_values).image_tokens.view(2, -1)
        ids = inp.input_ids.clone()
        ids[ids == model.model.vocabulary_mapping.image_token_id] = vq.flatten()
        wrong = model(input_ids=ids).logits[0].float()
    assert scaled_err(wrong[:, keep], ref[:, keep]) > 1e-2
    if swin:  # the pre-norm layer on a swin checkpoint is far off too
        cfg = json.loads((d / "config.json").read_text())
        cfg["swin_norm"] = False
        (d / "config.json").write_text(json.dumps(cfg))
        run("generate", d, "--image", imgs[0], "--image", imgs[1], "--prompt", prompt, "--raw", "-n", 1,
            "--logits", out, "--threads", 2)
        assert scaled_err(load_file(str(out))["logits"][:n, keep], ref[:, keep]) > 1e-2


def test_chameleon_info_and_bad_vocabulary(tmp_path):
    d, model, proc = make_chameleon(tmp_path)
    p = run("info", d)
    side = (32 // 4)
    assert "fusion:           D" in p.stdout
    assert f"VQ tokens:        {K} codes" in p.stdout and f"is {side * side} ids" in p.stdout, p.stdout
    c = run("compare", d, "--reps", 1)
    row = next(l for l in c.stdout.splitlines() if l.startswith("| cham") and "| D " in l)
    assert f"| {side * side:9d} |" in row  # the ids are prefill positions
    cfg = json.loads((d / "config.json").read_text())
    del cfg["vocabulary_map"][img_name(7)]
    (d / "config.json").write_text(json.dumps(cfg))
    fails(["info", d], "vocabulary_map", "code 7")



# ---- Emu3 ------------------------------------------------------------------------------------------------

EMU3_SPECIALS = ["<|endoftext|>", "<image>", "<|image start|>", "<|image end|>", "<|image token|>", "<|extra_200|>",
                 "<|extra_201|>"]


def make_emu3(tmp_path, seed=0):
    """Emu3Processor's downsample_ratio is 8 whatever the VQ's: four levels of 32 channels make the VQ's 8 too."""
    from transformers import (Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor,
                              PreTrainedTokenizerFast)
    d = tmp_path / "emu3"
    tok = tokenizer(d, EMU3_SPECIALS, [f"<|visual token {k:06d}|>" for k in range(K)])
    v = tok.get_vocab()
    torch.manual_seed(seed)
    e = v["<|endoftext|>"]
    cfg = Emu3Config(text_config=dict(vocab_size=len(v), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      bos_token_id=e, eos_token_id=e, pad_token_id=e),
                     vq_config=dict(codebook_size=K, embed_dim=8, latent_channels=8, base_channels=32,
                                    channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                                    temporal_downsample_factor=2, hidden_size=32, num_attention_heads=1),
                     vocabulary_map=v)
    model = Emu3ForConditionalGeneration(cfg).eval()
    randomize(model, seed)
    model.save_pretrained(d)
    ip = Emu3ImageProcessor(min_pixels=16 * 16, max_pixels=64 * 64, spatial_factor=8)
    ip.save_pretrained(d)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                pad_token="<|endoftext|>",
                                extra_special_tokens={"image_token": "<image>", "boi_token": "<|image start|>",
                                                      "eoi_token": "<|image end|>",
                                                      "image_wrapper_token": "<|image token|>",
                                                      "eof_token": "<|extra_201|>"})
    t.save_pretrained(d)
    return d, model, Emu3Processor(image_processor=ip, tokenizer=t)


def test_emu3_logits_and_greedy(tmp_path):
    d, model, proc = make_emu3(tmp_path)
    rng = np.random.default_rng(5)
    paths = []
    for i, (h, w) in enumerate([(24, 32), (24, 32)]):  # one size: Emu3ImageProcessor pads a batch to its largest, which changes the codes near the edge
        paths.append(tmp_path / f"e{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    prompt = "Describe <image> and <image> please."
    inp = proc(images=[Image.open(p).convert("RGB") for p in paths], text=prompt, return_tensors="pt")
    with torch.no_grad():
        ref = model(**inp).logits[0].float()
        gen = model.generate(**inp, do_sample=False, max_new_tokens=24, min_new_tokens=24)[0, inp.input_ids.shape[1]:]
    out = tmp_path / "logits.safetensors"
    # Emu3Processor puts the BOS in front of the text itself (prepare_inputs_layout)
    p = run("generate", d, "--image", paths[0], "--image", paths[1], "--prompt", "<|endoftext|>" + prompt, "--raw",
            "-n", 24, "--print-ids", "--ignore-eos", "--logits", out, "--threads", 2)
    n = inp.input_ids.shape[1]
    got = load_file(str(out))["logits"]
    assert got.shape[0] == n + 23
    assert scaled_err(got[:n], ref) < 1e-4
    assert [int(t) for t in p.stdout.split()] == gen.tolist()
    # a wrong variant: the rows without their end-of-line ids (the codes alone, each row run together)
    with torch.no_grad():
        toks = model.model.vqmodel.encode(inp.pixel_values, inp.image_sizes).image_tokens
        ids = inp.input_ids.clone()
        m = model.model.vocabulary_mapping
        flat = torch.cat([m.convert_img2bpe(t).flatten() for t in toks])
        eol = flat == m.eol_token_id
        flat[eol] = m.img2bpe[0]
        ids[ids == m.image_token_id] = flat.to(ids.dtype)
        wrong = model(input_ids=ids).logits[0].float()
    assert scaled_err(wrong, ref) > 1e-2



def emu3_generate_ref(model, proc, prompt, negative, gh, gw, scale):
    """The model card's recipe: return_for_image_generation prompts, the negative prompt's unbatched guidance, and
    its prefix_allowed_tokens_fn (visual tokens, eol at each row's end), greedy; the rows' ids and the image."""
    tk = proc.tokenizer
    v = tk.get_vocab()
    visual = [i for t, i in v.items() if t.startswith("<|visual token")]
    wrapper, eol = v["<|image token|>"], v["<|extra_200|>"]
    eof, eoi, eos = v["<|extra_201|>"], v["<|image end|>"], tk.eos_token_id

    def allowed(batch_id, input_ids):
        position = torch.nonzero(input_ids == wrapper, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (gw + 1) == 0:
            return (eol,)
        if offset == (gw + 1) * gh + 1:
            return (eof,)
        if offset == (gw + 1) * gh + 2:
            return (eoi,)
        if offset >= (gw + 1) * gh + 3:
            return (eos,)
        return visual

    def ids_of(text):
        image_prompt = f"<|image start|>{gh}*{gw}<|image token|>"
        return tk(tk.bos_token + text + image_prompt, add_special_tokens=False, return_tensors="pt").input_ids

    inp, neg = ids_of(prompt), ids_of(negative)
    with torch.no_grad():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), prefix_allowed_tokens_fn=allowed,
                             negative_prompt_ids=neg, guidance_scale=scale, do_sample=False,
                             max_new_tokens=(gw + 1) * gh + 3)
        gen = out[0, inp.shape[1]:]
        image = model.decode_image_tokens(image_tokens=gen[None], height=gh, width=gw)
    return inp[0].tolist(), gen[: (gw + 1) * gh].tolist(), image


def test_emu3_generates_an_image(tmp_path):
    d, model, proc = make_emu3(tmp_path)
    gh, gw = 3, 4
    prompt, negative = "Draw a red square on blue.", "the lazy dog"
    want_ids, gen, image = emu3_generate_ref(model, proc, prompt, negative, gh, gw, 3.0)
    out, png = tmp_path / "ids.safetensors", tmp_path / "out.png"
    p = run("generate", d, "--prompt", prompt, "--raw", "--negative-prompt", negative, "--image-grid", f"{gh}x{gw}",
            "--guidance", 3, "--image-ids", out, "--image-out", png, "--threads", 2)
    codes = load_file(str(out))["ids"]
    bpe2img = model.model.vocabulary_mapping.bpe2img
    assert gen[gw::gw + 1] == [model.model.vocabulary_mapping.eol_token_id] * gh
    want = [bpe2img[t] for i, t in enumerate(gen) if (i + 1) % (gw + 1)]
    assert codes.flatten().tolist() == want
    assert "image: [" in p.stderr
    px = proc.postprocess(list(image.float()), return_tensors="PIL.Image.Image")["pixel_values"][0]
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(px))
    # guidance off: other codes
    run("generate", d, "--prompt", prompt, "--raw", "--image-grid", f"{gh}x{gw}", "--guidance", 1,
        "--image-ids", out, "--threads", 2)
    assert load_file(str(out))["ids"].flatten().tolist() != want


# ---- Janus image generation ------------------------------------------------------------------------------

JANUS_SPECIALS = ["<unk>", "<bos>", "<pad>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>"]


def make_janus(tmp_path, seed=0, guidance=3.0):
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessor
    d = tmp_path / "janus"
    tok = tokenizer(d, JANUS_SPECIALS, [])
    v = tok.get_vocab()
    torch.manual_seed(seed)
    cfg = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=len(v), hidden_size=64, intermediate_size=112,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=v["<bos>"], eos_token_id=None, pad_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, num_image_tokens=16, projection_dim=64),
        vq_config=dict(embed_dim=8, num_embeddings=48, latent_channels=16, base_channels=32,
                       channel_multiplier=[1, 2, 2], num_res_blocks=1, projection_dim=64, image_token_embed_dim=64,
                       num_hidden_layers=2), image_token_id=v["<image_placeholder>"])
    model = JanusForConditionalGeneration(cfg).eval()
    randomize(model, seed, skip=("vqmodel", "vision_model"))
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id, gc.eos_token_id = v["<bos>"], v["<pad>"], None
    gc.generation_kwargs = {"boi_token_id": v["<begin_of_image>"]}
    gc.guidance_scale = guidance
    model.save_pretrained(d)
    ip = JanusImageProcessor(size={"height": 32, "width": 32})
    ip.save_pretrained(d)
    return d, model, tok, ip


def janus_ref(model, ids, guidance):
    with torch.no_grad():
        t = torch.tensor([ids])
        return model.generate(t, attention_mask=torch.ones_like(t), generation_mode="image", do_sample=False,
                              guidance_scale=guidance)[0]


def test_janus_generates_the_image_ids_and_pixels(tmp_path):
    d, model, tok, ip = make_janus(tmp_path)
    text = "Draw a red square on blue."
    ids = [tok.token_to_id("<bos>")] + tok.encode(text + "<begin_of_image>").ids
    ref = janus_ref(model, ids, 3.0)
    out, png = tmp_path / "ids.safetensors", tmp_path / "out.png"
    p = run("generate", d, "--ids", ",".join(map(str, ids)), "--image-ids", out, "--image-out", png, "--threads", 2)
    got = load_file(str(out))["ids"]
    assert got.shape == (4, 4)
    assert got.flatten().tolist() == ref.tolist()
    assert "image: [" in p.stderr  # the progress bar
    with torch.no_grad():
        dec = model.decode_image_tokens(ref[None])  # (1, H, W, 3)
    want = np.asarray(ip.postprocess(list(dec.permute(0, 3, 1, 2).float()), return_tensors="PIL.Image.Image")
                      ["pixel_values"][0])
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), want)
    # the text prompt path: the prompt, then <begin_of_image>, tokenized as the processor does
    run("generate", d, "--prompt", "<bos>" + text, "--raw", "--image-ids", out, "--threads", 2)
    assert load_file(str(out))["ids"].flatten().tolist() == ref.tolist()
    # wrong variant: guidance off gives other ids (transformers' generate fails with a scale <= 1: it keeps both
    # sequences' scores without the CFG processor to merge them)
    run("generate", d, "--ids", ",".join(map(str, ids)), "--image-ids", out, "--guidance", 1, "--threads", 2)
    off = load_file(str(out))["ids"].flatten().tolist()
    assert sum(a != b for a, b in zip(off, ref.tolist())) >= 4


def test_janus_bad_input(tmp_path):
    d, model, tok, ip = make_janus(tmp_path)
    fails(["generate", d, "--ids", "1,999999,3", "--image-ids", tmp_path / "o.safetensors"], "outside the vocabulary")
    fails(["generate", d, "--ids", "1,3", "--image", tmp_path / "x.png", "--image-out", tmp_path / "o.png"],
          "takes --prompt or --ids")


# ---- the VQ tokenizers alone: encode --vq, decode-vq ------------------------------------------------------

def save_pixels(path, px):
    from safetensors.torch import save_file
    save_file({"pixel_values": px.contiguous()}, str(path))


def test_chameleon_vq_codes_and_latents(tmp_path):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig
    torch.manual_seed(1)
    vq = ChameleonVQVAE(ChameleonVQVAEConfig(embed_dim=16, num_embeddings=K, latent_channels=16, base_channels=32,
                                             channel_multiplier=[1, 2, 2], resolution=32, num_res_blocks=2,
                                             attn_resolutions=[16])).eval()
    d = tmp_path / "vq"
    vq.save_pretrained(d)
    px = torch.rand(2, 3, 32, 48) * 2 - 1
    save_pixels(tmp_path / "px.safetensors", px)
    out = tmp_path / "codes.safetensors"
    run("encode", d, "--vq", "--latents", "--pixels", tmp_path / "px.safetensors", "-o", out, "--threads", 2)
    got = load_file(str(out))
    with torch.no_grad():
        ref = vq.encode(px)
        lat = vq.quant_conv(vq.encoder(px))
    assert got["codes"].shape == (2, 8, 12)
    assert got["codes"].flatten().tolist() == ref.image_tokens.flatten().tolist()
    assert len(set(got["codes"].flatten().tolist())) >= 8  # the codes vary: a comparison that can fail
    assert scaled_err(got["latents"], lat) < 1e-4
    # a wrong variant: symmetric padding before each stride-2 conv (padding=1 instead of F.pad(0, 1, 0, 1))
    import torch.nn.functional as F
    with torch.no_grad():
        saved = [m.forward for m in vq.encoder.modules() if type(m).__name__.endswith("ConvDownsample")]
        for m in vq.encoder.modules():
            if type(m).__name__.endswith("ConvDownsample"):
                m.forward = (lambda mod: lambda x: mod.conv(F.pad(x, (1, 1, 1, 1))[..., :-1, :-1]))(m)
        wrong = vq.quant_conv(vq.encoder(px))
        del saved
    assert scaled_err(wrong, lat) > 1e-2
    # bad input: a side that is not a multiple of the downsampling
    save_pixels(tmp_path / "bad.safetensors", torch.rand(1, 3, 30, 32))
    fails(["encode", d, "--vq", "--pixels", tmp_path / "bad.safetensors", "-o", out], "multiples of", "4")


def test_chameleon_vq_inside_the_model_and_a_bad_codebook(tmp_path):
    d, model, proc = make_chameleon(tmp_path)
    imgs = images(tmp_path, 1, 32, seed=9)
    out = tmp_path / "codes.safetensors"
    run("encode", d, imgs[0], "--vq", "-o", out, "--threads", 2)  # through ChameleonImageProcessor
    pv = proc.image_processor(images=[Image.open(imgs[0]).convert("RGB")], return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = model.model.vqmodel.encode(pv).image_tokens
    assert load_file(str(out))["codes"].flatten().tolist() == ref.flatten().tolist()
    fails(["decode-vq", d, out, "-o", tmp_path / "x.png"], "no decoder")
    # a codebook of the wrong width
    from safetensors.torch import save_file
    w = load_file(str(d / "model.safetensors"))
    w["model.vqmodel.quantize.embedding.weight"] = w["model.vqmodel.quantize.embedding.weight"][:, :8].contiguous()
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    fails(["encode", d, imgs[0], "--vq", "-o", out], "quantize.embedding.weight")


def test_janus_vq_decode_and_bad_codes(tmp_path):
    d, model, tok, ip = make_janus(tmp_path)
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 48, (2, 4, 4), generator=g, dtype=torch.int32)
    from safetensors.torch import save_file
    save_file({"codes": codes}, str(tmp_path / "codes.safetensors"))
    png = tmp_path / "out.png"
    run("decode-vq", d, tmp_path / "codes.safetensors", "-o", png, "--pixels-out", tmp_path / "raw.safetensors",
        "--threads", 2)
    with torch.no_grad():
        dec = model.model.vqmodel.decode(codes.long().view(2, -1))
    assert scaled_err(load_file(str(tmp_path / "raw.safetensors"))["pixels"], dec) < 1e-4
    with torch.no_grad():  # a wrong variant: the codebook rows without get_codebook_entry's L2 normalisation
        vqm = model.model.vqmodel
        e = vqm.quantize.embedding(codes.long().view(2, -1)).view(2, 4, 4, -1).permute(0, 3, 1, 2)
        wrong = vqm.decoder(vqm.post_quant_conv(e))
    assert scaled_err(wrong, dec) > 1e-2
    for i in range(2):
        want = np.asarray(ip.postprocess([dec[i].float()], return_tensors="PIL.Image.Image")["pixel_values"][0])
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"out-{i}.png").convert("RGB")), want)
    # the raw decoder output within 1e-4, through the encode-decode round trip of the C API's pixels
    px = dec[:1].contiguous()
    save_pixels(tmp_path / "px.safetensors", px)
    run("encode", d, "--vq", "--latents", "--pixels", tmp_path / "px.safetensors", "-o", tmp_path / "c2.safetensors",
        "--threads", 2)
    got = load_file(str(tmp_path / "c2.safetensors"))
    with torch.no_grad():
        assert got["codes"].flatten().tolist() == model.model.vqmodel.encode(px).image_tokens.flatten().tolist()
        lat = model.model.vqmodel.quant_conv(model.model.vqmodel.encoder(px))
    assert len(set(got["codes"].flatten().tolist())) >= 4  # the codes vary
    assert scaled_err(got["latents"], lat) < 1e-4
    # bad input: a code outside the codebook
    bad = codes.clone()
    bad[0, 1, 2] = 48
    save_file({"codes": bad}, str(tmp_path / "bad.safetensors"))
    fails(["decode-vq", d, tmp_path / "bad.safetensors", "-o", png], "outside the codebook", "position 6")
