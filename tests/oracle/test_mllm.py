"""The multimodal model's public API (mmb_mllm) against transformers, end to end: a tiny random
LlavaForConditionalGeneration, its tokenizer and a LlavaProcessor saved with save_pretrained (transformers 5:
processor_config.json with the image processor nested, chat_template.jinja), driven by tests/oracle/mllm_driver.c
(compiled here against the build's libmmbridge.a). Checks that
  - the prompt (chat template, <image> put in front, expanded to the image's rows) is the processor's input_ids;
  - mmb_mllm_generate's greedy tokens are model.generate's, token for token, and the prefill's logits match;
  - mmb_mllm_encode's embeddings and a hidden state from the same tower pass are within 1e-4 scaled error;
  - negative controls: the image spliced one position later, and the neighbouring hidden layer, are far off."""
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

from conftest import VISION, compile_driver, scaled_err
from test_decoder import CHATML, randomize, text_config, tiny_tokenizer

N_NEW = 24
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return compile_driver("mllm_driver", tmp_path_factory.mktemp("driver"))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(model, processor, directory, image path): a random LLaVA whose image matters, saved by transformers."""
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("mllm") / "llava"
    vocab, img_tok = tiny_tokenizer(d)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text_config("llama", vocab_size=vocab),
                      image_token_index=img_tok, vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    randomize(model, 0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # a projector far from zero, so the image changes the text
        for p in model.model.multi_modal_projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.generation_config.eos_token_id = None
    model.save_pretrained(d, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), eos_token="<|im_end|>")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28}),
                          tokenizer=tok, patch_size=VISION["patch_size"], vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHATML)
    proc.save_pretrained(d)
    assert (d / "processor_config.json").exists() and not (d / "preprocessor_config.json").exists()
    rs = np.random.RandomState(3)
    path = d.parent / "img.png"
    Image.fromarray(rs.randint(0, 256, (45, 37, 3), dtype=np.uint8)).save(path)
    return model, proc, d, path


def run_driver(exe, out, d, image, prompt, n, *taps):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:exitcode=99",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=99")
    p = subprocess.run([str(exe), str(out), str(d), str(image), prompt, str(n), *map(str, taps)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert "Sanitizer" not in p.stderr and "runtime error:" not in p.stderr, p.stderr
    return p


def reference_inputs(model, proc, image):
    text = proc.apply_chat_template([{"role": "user", "content": "<image>\n" + PROMPT}], tokenize=False,
                                    add_generation_prompt=True)
    return proc(text=text, images=Image.open(image).convert("RGB"), return_tensors="pt")


def test_generate_encode_and_taps_match_transformers(driver, llava, tmp_path):
    model, proc, d, image = llava
    out = tmp_path / "out.safetensors"
    p = run_driver(driver, out, d, image, PROMPT, N_NEW, 1, -1)
    assert p.returncode == 0, p.stderr
    print(p.stdout.strip())
    got = load_file(str(out))
    inputs = reference_inputs(model, proc, image)
    ids = inputs["input_ids"][0]
    per = (VISION["image_size"] // VISION["patch_size"]) ** 2  # "default" drops CLS
    assert int((ids == model.config.image_token_index).sum()) == per
    # the prompt: the chat template's text, the marker put in front, the image's rows at the marker
    assert got["prompt_ids"].tolist() == ids.tolist()
    # greedy generation, token for token
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0)
        logits = model(**inputs).logits[0]
    assert got["generated"].tolist() == ref[0, len(ids):].tolist()
    err = scaled_err(got["logits"], logits)
    print(f"prefill logits ({len(ids)} positions): scaled max err {err:.2e}")
    assert err <= 1e-4
    # the embeddings and two hidden states from the same pass of the tower
    px = inputs["pixel_values"]
    with torch.no_grad():
        hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states
        feats = model.get_image_features(pixel_values=px, vision_feature_layer=-2,
                                         vision_feature_select_strategy="default")
    feats = torch.stack(list(feats.pooler_output)) if hasattr(feats, "pooler_output") else feats
    errs = {"embeddings": scaled_err(got["embeddings"], feats.reshape(per, -1)),
            "hidden_states[1]": scaled_err(got["hidden.0"], hs[1]),
            "hidden_states[-1]": scaled_err(got["hidden.1"], hs[-1])}
    print("scaled max err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert all(e <= 1e-4 for e in errs.values()), errs
    # negative controls: the neighbouring layer; the image's rows one position later in the prompt
    assert scaled_err(got["hidden.0"], hs[2]) > 1e-2
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids[None])[0]
        at = int((ids == model.config.image_token_index).nonzero()[0])
        shifted = torch.cat([emb[:at], emb[at + per:at + per + 1], feats.reshape(per, -1), emb[at + per + 1:]])
        wrong = model(inputs_embeds=shifted[None]).logits[0]
        right = torch.cat([emb[:at], feats.reshape(per, -1), emb[at + per:]])
        assert scaled_err(model(inputs_embeds=right[None]).logits[0], logits) <= 1e-5  # the control is sound
    off = scaled_err(got["logits"], wrong)
    print(f"image spliced one position later: scaled err {off:.2e}")
    assert off > 1e-2


def test_refusals(driver, llava, tmp_path):
    """A tap beyond the tower and an image marker count that disagrees fail with the library's message."""
    model, proc, d, image = llava
    p = run_driver(driver, tmp_path / "o.st", d, image, PROMPT, 1, VISION["num_hidden_layers"] + 1)
    assert p.returncode == 2 and "out of range" in p.stderr, p.stderr
    p = run_driver(driver, tmp_path / "o.st", d, image, "<image> and <image>", 1)
    assert p.returncode == 2 and "2 image marker(s) '<image>' but 1 image(s)" in p.stderr, p.stderr


def test_family_refuses_taps_and_has_no_lm(driver, tmp_path):
    """A BLIP-2 (a family: its tower and Q-Former run as one) opens through mmb_mllm_open; taps are refused with
    MMB_ERR_UNSUPPORTED, and without taps the prompt is refused for want of a language model it runs."""
    from transformers import BlipImageProcessor
    from test_blip2 import S, make_blip2
    d = tmp_path / "blip2"
    make_blip2(d)
    BlipImageProcessor(size={"height": S, "width": S}).save_pretrained(d)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.RandomState(5).randint(0, 256, (31, 40, 3), dtype=np.uint8)).save(image)
    p = run_driver(driver, tmp_path / "o.st", d, image, PROMPT, 1, 1)
    assert p.returncode == 2 and p.stderr.startswith("unsupported:") and "blip2" in p.stderr and \
        "hidden states are not exposed" in p.stderr, p.stderr
    p = run_driver(driver, tmp_path / "o.st", d, image, PROMPT, 1)
    assert p.returncode == 2 and "no language model" in p.stderr, p.stderr
