"""CogVLM2 (THUDM/cogvlm2-llama3-chat-19B's remote code, CogVLMForCausalLM again): the visual expert on Llama 3.

The reference is test_cogvlm.py's, imported (its functions take the model's shapes and constants), with what
CogVLM2's modeling_cogvlm.py and visual.py change: EVA2CLIPModel.conv, a Conv2d(vision hidden, vision hidden,
kernel 2, stride 2, with bias) on the (grid, grid) map of the patch tokens before the GLU, so an image is
(grid / 2)^2 + 2 rows, as build_conversation_input_ids counts them ((image_size // patch_size // 2)^2 + 2);
VisionExpertAttention's grouped K/V (q | k | v of [heads, num_multi_query_heads, num_multi_query_heads] head
widths, each K/V head serving heads / kv consecutive query heads) and its rotary base, 500000, written in the
code (FastRotaryEmbedding(..., base=500000)) rather than in the config; the vision expert's QKV with a bias. The
rest is CogVLM's: build_position_ids, get_expert_mask, token_type_ids, the 'chat' template "Question: {q}
Answer:" after [bos] and the image rows, the torchvision transform. The tokenizer is Llama 3's kind (byte-level
BPE, <|begin_of_text|> put in front by the post-processor, eos <|end_of_text|> and <|eot_id|>).

Tiny random weights in the original key names beside a config.json laid out as the hub's (num_multi_query_heads,
no rope_theta, no model_type). Checked: encode within 1e-4 scaled, the logits of a prompt with an image (whole
and split over decoder calls) and of a text-only one within 1e-4, 24 greedy tokens identical; wrong variants far
off (the default RoPE base 10000, the grid transposed before the conv, the K/V heads interleaved); bad input (the
conv's tensors missing or misshapen, a QKV of CogVLM's ungrouped width) fails naming the file and the tensor."""
import json

import pytest
import torch
from conftest import fails, random_images, run, scaled_err
from safetensors.torch import load_file
from test_cogvlm import LANG, VIS, V1, VISION, conversation, forward_ref, greedy_ref, make_cogvlm, pixels_ref, \
    rewrite, vision_ref

VIS2 = dict(VIS, image_size=84, num_positions=37)  # grid 6 -> 3 x 3 after the conv
LM2 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_multi_query_heads=2,
           rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu")
V2 = dict(V1, vis=VIS2, lm=LM2, theta=500000.0, down=2)
QUERY = "What is in the picture?"


def llama3_tokenizer(d):
    """A byte-level BPE with Llama 3's specials (<|begin_of_text|> 0, <|end_of_text|> 1, <|eot_id|> 2, a
    reserved pad 3); the post-processor puts <|begin_of_text|> in front, as Llama 3's tokenizer.json does.
    Returns (vocab size, PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Question: What is in the picture? Answer: A cat sits on a mat.", "Describe this image. Two dogs."] * 20
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|reserved_special_token_0|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=230, show_progress=False, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return tok.get_vocab_size(), PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"),
                                                         bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def make_cogvlm2(d, seed=0):
    """The checkpoint: CogVLM's names plus model.vision.conv.*, the QKV [D + 2 kv hd, D] with the vision bias."""
    return make_cogvlm(d, seed=seed, vision_bias=True, cfg=V2, make_tokenizer=llama3_tokenizer,
                       config={"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": 3})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cog2") / "cogvlm2"
    w, tok = make_cogvlm2(d)
    img = random_images(d.parent, [(70, 53)], 4)[0]
    return d, w, tok, img


def mmb_logits(d, tmp_path, image, *extra):
    out = tmp_path / "logits.safetensors"
    args = ["--image", image] if image is not None else []
    run("generate", d, "--prompt", QUERY, *args, "-n", 0, "--logits", out, "--threads", 2, *extra)
    return load_file(str(out))["logits"]


def test_encode_matches_reference(ckpt, tmp_path):
    d, w, _, img = ckpt
    info = run("info", d).stdout
    assert "cogvlm" in info, info
    out = tmp_path / "e.safetensors"
    run("encode", d, img, "-o", out, "--threads", 2)
    got = load_file(str(out))["embeddings"]
    with torch.no_grad():
        want = vision_ref(w, pixels_ref(img, V2), V2)
        far = scaled_err(got, vision_ref(w, pixels_ref(img, V2), V2, "transposed grid"))
    err = scaled_err(got, want)
    print(f"CogVLM2 encode {tuple(want.shape)}: scaled max err {err:.2e}; grid transposed before the conv {far:.3e}")
    assert want.shape == (1, 3 * 3 + 2, LM2["hidden_size"])
    assert got.shape == want.shape and err <= 1e-4 and far > 1e-2


def test_logits_and_greedy_match_reference(ckpt, tmp_path):
    d, w, tok, img = ckpt
    for label, image, extra in (("text only", None, ()), ("image", img, ()), ("image, --n-batch 4", img,
                                                                             ("--n-batch", 4))):
        ids, tt = conversation(tok, QUERY, image, V2)
        assert ids[0, 0] == 0  # <|begin_of_text|>
        with torch.no_grad():
            want = forward_ref(w, ids, tt, image, cfg=V2)
        got = mmb_logits(d, tmp_path, image, *extra)
        err = scaled_err(got, want)
        print(f"CogVLM2 logits, {label}: {want.shape[0]} positions, scaled max err {err:.2e}")
        assert got.shape == want.shape and err <= 1e-4
    ids, tt = conversation(tok, QUERY, img, V2)
    with torch.no_grad():
        want = greedy_ref(w, ids, tt, img, 24, cfg=V2)
    r = run("generate", d, "--prompt", QUERY, "--image", img, "-n", 24, "--print-ids", "--ignore-eos",
            "--threads", 2)
    assert [int(t) for t in r.stdout.split()] == want


@pytest.mark.parametrize("variant", ["default RoPE base", "K/V heads interleaved", "transposed grid"])
def test_wrong_variants_are_far_off(ckpt, tmp_path, variant):
    d, w, tok, img = ckpt
    ids, tt = conversation(tok, QUERY, img, V2)
    got = mmb_logits(d, tmp_path, img)
    with torch.no_grad():
        assert scaled_err(got, forward_ref(w, ids, tt, img, cfg=V2)) <= 1e-4
        if variant == "default RoPE base":
            want = forward_ref(w, ids, tt, img, cfg=dict(V2, theta=10000.0))
        else:
            want = forward_ref(w, ids, tt, img, variant, cfg=V2)
    far = scaled_err(got, want)
    print(f"CogVLM2, {variant}: scaled max err {far:.3e}")
    assert far > 1e-2


def test_conv_left_out_changes_the_image_rows(ckpt):
    """Without the conv, the image would be grid^2 + 2 = 38 rows; the prompt has (grid / 2)^2 + 2 = 11."""
    _, _, tok, img = ckpt
    assert int((conversation(tok, QUERY, img, V2)[1] == VISION).sum()) == 11
    assert int((conversation(tok, QUERY, img, dict(V2, down=1))[1] == VISION).sum()) == 38
    assert int((conversation(tok, QUERY, None, V2)[1] == LANG).sum()) == conversation(tok, QUERY, None, V2)[0].shape[1]


def test_bad_input(ckpt, tmp_path):
    d, _, _, img = ckpt
    for name in ("model.vision.conv.weight", "model.vision.conv.bias"):
        bad = rewrite(d, tmp_path / name, edit=lambda t: t.pop(name))
        p = fails(["encode", bad, img, "-o", tmp_path / "x.safetensors"], str(bad), name)
        assert "missing" in p.stderr or "no tensor" in p.stderr, p.stderr
        fails(["generate", bad, "--prompt", "a", "-n", 1], name)
    name = "model.vision.conv.weight"
    bad = rewrite(d, tmp_path / "convshape", edit=lambda t: t.__setitem__(name, t[name][:, :, :1].contiguous()))
    p = fails(["encode", bad, img, "-o", tmp_path / "x.safetensors"], name)
    assert "model.safetensors" in p.stderr, p.stderr
    # CogVLM's ungrouped QKV width (3 D) where num_multi_query_heads makes D + 2 kv hd
    name = "model.layers.1.self_attn.language_expert_query_key_value.weight"
    D = LM2["hidden_size"]
    bad = rewrite(d, tmp_path / "qkv", edit=lambda t: t.__setitem__(name, torch.zeros(3 * D, D)))
    fails(["generate", bad, "--prompt", "a", "-n", 1], name)
    # num_multi_query_heads must divide the heads
    bad = rewrite(d, tmp_path / "kv", config=lambda c: c.update(num_multi_query_heads=3))
    fails(["generate", bad, "--prompt", "a", "-n", 1], "num_multi_query_heads")
