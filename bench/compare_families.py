"""The families that bring their own tower (BLIP-2, IDEFICS, Idefics2, Idefics3, Qwen2-VL) as
checkpoints for `mmbridge compare`, at their real connector sizes for a 7B-class LLM (text width
4096) and a CLIP-L-like patch grid, with a one-block tower and a one-layer text model (random
weights, save_pretrained): their rows then sit in the same table as the registry's connectors.

    python3 bench/compare_families.py --dir build/compare-set [--run]

--run also runs `./build/mmbridge compare --types all --width 1024 --grid 24 --llm-width 4096`
over them and writes build/compare-set/compare.{csv,svg}. The family rows' latency includes their
one-block tower (patch embedding, one block, norms): the column says "tower+connector"."""
import argparse
import subprocess
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--dir", default="build/compare-set")
ap.add_argument("--run", action="store_true")
a = ap.parse_args()
d = Path(a.dir)
d.mkdir(parents=True, exist_ok=True)
D_LLM = 4096
text = dict(hidden_size=D_LLM, intermediate_size=64, num_hidden_layers=1, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=512)


def save(name, model):
    out = d / name
    if not (out / "config.json").exists():
        model.save_pretrained(out)
    return out


def build():
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Idefics2Config,
                              Idefics2ForConditionalGeneration, Idefics3Config, Idefics3ForConditionalGeneration,
                              IdeficsConfig, IdeficsForVisionText2Text, OPTConfig, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    torch.manual_seed(0)
    dirs = []
    if not (d / "blip2" / "config.json").exists():   # EVA-g width 1408, 224 px (16x16), Q-Former defaults
        cfg = Blip2Config(vision_config=dict(num_hidden_layers=1),
                          text_config=OPTConfig(hidden_size=D_LLM, ffn_dim=64, num_hidden_layers=1,
                                                num_attention_heads=32, vocab_size=512, word_embed_proj_dim=D_LLM).to_dict())
        dirs.append(save("blip2", Blip2ForConditionalGeneration(cfg).eval()))
    else:
        dirs.append(d / "blip2")
    if not (d / "idefics" / "config.json").exists():  # IDEFICS-9B: ViT-H width 1280, 64 latents x 6
        cfg = IdeficsConfig(hidden_size=D_LLM, intermediate_size=64, num_hidden_layers=1, num_attention_heads=32,
                            vocab_size=512, use_resampler=True,
                            vision_config=dict(embed_dim=1280, num_hidden_layers=1, num_attention_heads=16,
                                               image_size=224, patch_size=14, intermediate_size=5120),
                            perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=6,
                                                  resampler_n_heads=16, resampler_head_dim=96))
        dirs.append(save("idefics", IdeficsForVisionText2Text(cfg).eval()))
    else:
        dirs.append(d / "idefics")
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16,
                  image_size=336, patch_size=14)
    for name, cls, ccls, extra in [("idefics2", Idefics2ForConditionalGeneration, Idefics2Config, {}),
                                   ("idefics3", Idefics3ForConditionalGeneration, Idefics3Config, {"scale_factor": 2})]:
        if not (d / name / "config.json").exists():
            cfg = ccls(vision_config=vision, text_config=dict(text, model_type="llama"), **extra)
            dirs.append(save(name, cls(cfg).eval()))
        else:
            dirs.append(d / name)
    if not (d / "qwen2_vl" / "config.json").exists():   # Qwen2-VL-7B: ViT width 1280, merger to 3584
        cfg = Qwen2VLConfig(vision_config=dict(depth=1, embed_dim=1280, num_heads=16, hidden_size=3584),
                            text_config=dict(hidden_size=3584, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=28, num_key_value_heads=4, vocab_size=512))
        dirs.append(save("qwen2_vl", Qwen2VLForConditionalGeneration(cfg).eval()))
    else:
        dirs.append(d / "qwen2_vl")
    return dirs


dirs = build()
if a.run:
    subprocess.run(["./build/mmbridge", "compare", "--types", "all", "--width", "1024", "--grid", "24",
                    "--llm-width", str(D_LLM), "--reps", "3", "--csv", str(d / "compare.csv"),
                    "--svg", str(d / "compare.svg"), *map(str, dirs)], check=True)
