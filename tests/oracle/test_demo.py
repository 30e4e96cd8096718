"""The README's demo: `mmbridge demo` writes a random-weight LLaVA checkpoint and encodes the
bundled sample image. transformers loads the same directory and must agree with what it prints."""
import re

import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, LlavaForConditionalGeneration

from conftest import ROOT, run, scaled_err


def test_demo_output_matches_transformers(tmp_path):
    p = run("demo", tmp_path / "demo", ROOT / "data" / "sample.jpg")
    assert "embeddings [1, 256, 4096]" in p.stdout
    assert re.search(r"vision tower:\s+clip, 13044736 parameters", p.stdout)
    d = tmp_path / "demo" / "llava-demo"
    got = load_file(str(tmp_path / "demo" / "embeddings.safetensors"))["embeddings"]
    model = LlavaForConditionalGeneration.from_pretrained(d).eval()  # the LLM is absent: random, unused
    proc = AutoImageProcessor.from_pretrained(d, use_fast=False)
    px = proc(images=Image.open(ROOT / "data" / "sample.jpg"), return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.get_image_features(pixel_values=px)
    ref = torch.stack(list(out.pooler_output)) if hasattr(out, "pooler_output") else out
    err = scaled_err(got, ref)
    print(f"demo: mmbridge vs transformers on the demo checkpoint and data/sample.jpg: {err:.2e}")
    assert err <= 1e-4
    # The same seed gives the same checkpoint: a second run prints the same numbers.
    q = run("demo", tmp_path / "demo2", ROOT / "data" / "sample.jpg")
    line = [l for l in p.stdout.splitlines() if l.startswith("embeddings [")]
    assert line and line == [l for l in q.stdout.splitlines() if l.startswith("embeddings [")]
