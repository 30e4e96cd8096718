"""The README's demo: `mmbridge demo` writes a random-weight LlavaForConditionalGeneration checkpoint (tower,
LLaVA-1.5-7B-sized projector, a one-layer LLM, a byte-level BPE tokenizer with a chat template) and runs
info, encode and generate on the bundled sample image. transformers loads the same directory and must
agree with what it prints: the embeddings, and the generated text token for token; `tokenizers` loads
its tokenizer.json and must agree with ours."""
import re

import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

from conftest import ROOT, run, scaled_err

PROMPT = "What is in this image?"
IMAGE_TOKEN, IMAGE_TOKENS = 258, 256


def test_demo_output_matches_transformers(tmp_path):
    p = run("demo", tmp_path / "demo", ROOT / "data" / "sample.jpg")
    assert "embeddings [1, 256, 4096]" in p.stdout
    assert re.search(r"vision tower:\s+clip, 13044736 parameters", p.stdout)
    assert re.search(r"language model:\s+llama, 1 layers, width 4096", p.stdout), p.stdout
    d = tmp_path / "demo" / "llava-demo"
    got = load_file(str(tmp_path / "demo" / "embeddings.safetensors"))["embeddings"]
    model = LlavaForConditionalGeneration.from_pretrained(d).eval()
    proc = AutoImageProcessor.from_pretrained(d, use_fast=False)
    px = proc(images=Image.open(ROOT / "data" / "sample.jpg"), return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.get_image_features(pixel_values=px)
    ref = torch.stack(list(out.pooler_output)) if hasattr(out, "pooler_output") else out
    err = scaled_err(got, ref)
    print(f"demo: mmbridge vs transformers on the demo checkpoint and data/sample.jpg: {err:.2e}")
    assert err <= 1e-4
    # generation: the chat template, the image's 256 tokens spliced in, greedy decoding
    tok = AutoTokenizer.from_pretrained(d)
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    full = []
    for i in ids:
        full += [i] * (IMAGE_TOKENS if i == IMAGE_TOKEN else 1)
    with torch.no_grad():
        gen = model.generate(input_ids=torch.tensor([full]), pixel_values=px, do_sample=False, max_new_tokens=32,
                             attention_mask=torch.ones(1, len(full), dtype=torch.long), pad_token_id=0)
    ref_ids = gen[0, len(full):].tolist()
    q = run("generate", d, "--image", ROOT / "data" / "sample.jpg", "--prompt", PROMPT, "-n", 32, "--print-ids")
    assert [int(t) for t in q.stdout.split()] == ref_ids, (q.stdout, ref_ids)
    lines = p.stdout.splitlines()
    k = next(i for i, l in enumerate(lines) if l.startswith("$ mmbridge generate"))
    assert lines[k + 1] == tok.decode(ref_ids, skip_special_tokens=True) and lines[k + 1].strip(), lines[k:]
    assert re.search(r"prefill: \d+ tokens .* decode: \d+ tokens", p.stderr), p.stderr
    # the tokenizer: tokenizers reads the same file and encodes as we do
    hf = Tokenizer.from_file(str(d / "tokenizer.json"))
    for s in ["hello <image> world", "déjà vu, \"quoted\" \\ tabs\tand\nlines", "<image>\nWhat is in this image?"]:
        ours = [int(t) for t in run("tokenize", d, "--text", s).stdout.split()]
        assert ours == hf.encode(s).ids, s
        assert hf.decode(ours) == s.replace("<image>", "") or hf.decode(ours, skip_special_tokens=False) == s
    # The same seed gives the same checkpoint: a second run prints the same numbers.
    q = run("demo", tmp_path / "demo2", ROOT / "data" / "sample.jpg")
    line = [l for l in p.stdout.splitlines() if l.startswith("embeddings [")]
    assert line and line == [l for l in q.stdout.splitlines() if l.startswith("embeddings [")]
