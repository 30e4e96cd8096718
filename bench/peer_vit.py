"""Peers for bench_vit: CLIP ViT-L/14-336 (random weights at real size) followed by LLaVA-1.5's
mlp2x_gelu projector to 4096, timed in PyTorch and in onnxruntime (on an ONNX export of the same
torch module), at a given thread count. Also writes the checkpoint mmbridge reads (once, cached)
and the pixel values, so all three run the same weights on the same input.

Prints one JSON line per peer: median/min seconds per batch and the process's peak RSS."""
import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True, help="cache directory for the checkpoint, pixels and ONNX file")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--layers", type=int, default=24)
ap.add_argument("--peers", default="torch,onnxruntime")
ap.add_argument("--prepare-only", action="store_true")
a = ap.parse_args()
torch.set_num_threads(a.threads)
d = Path(a.dir)
ckpt = d / f"llava-vitl336-{a.layers}"


class Workload(torch.nn.Module):
    """pixels -> hidden_states[-1] of the tower (all layers run) -> drop CLS -> projector."""

    def __init__(self, llava):
        super().__init__()
        self.tower = llava.model.vision_tower
        self.proj = llava.model.multi_modal_projector

    def forward(self, px):
        h = self.tower(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        return self.proj(h[:, 1:])


def build():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=a.layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=64, num_hidden_layers=1, num_attention_heads=32,
                       vocab_size=256)
    cfg = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", image_token_index=255)
    m = LlavaForConditionalGeneration(cfg).eval()
    if not (ckpt / "config.json").exists():
        m.save_pretrained(ckpt)
    return m


model = build()
wl = Workload(model).eval()
torch.manual_seed(1)
px = torch.randn(a.batch, 3, 336, 336)
px_path = d / f"pixels-{a.batch}.safetensors"
if not px_path.exists():
    from safetensors.torch import save_file
    save_file({"pixel_values": px}, str(px_path))
if a.prepare_only:
    print(json.dumps({"checkpoint": str(ckpt), "pixels": str(px_path)}))
    raise SystemExit(0)


def timeit(fn):
    fn()
    ts = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


peers = a.peers.split(",")
if "torch" in peers:
    with torch.inference_mode():
        med, mn = timeit(lambda: wl(px))
    print(json.dumps({"peer": "pytorch " + torch.__version__.split("+")[0], "median_s": med, "min_s": mn,
                      "peak_rss_mib": rss_mib()}), flush=True)
try:
    import onnxruntime as ort
except ImportError:  # report the missing peer and keep the others' lines (the caller needs exit 0)
    if "onnxruntime" in peers:
        print(json.dumps({"peer": "onnxruntime (not installed)", "median_s": -1, "min_s": -1, "peak_rss_mib": -1}))
    peers = [p for p in peers if p != "onnxruntime"]
if "onnxruntime" in peers:
    onnx_path = d / f"vitl336-{a.layers}-b{a.batch}.onnx"
    if not onnx_path.exists():
        torch.onnx.export(wl, (px,), str(onnx_path), dynamo=False, input_names=["px"], output_names=["emb"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    feed = {"px": px.numpy()}
    med, mn = timeit(lambda: sess.run(None, feed))
    print(json.dumps({"peer": "onnxruntime " + ort.__version__, "median_s": med, "min_s": mn,
                      "peak_rss_mib": rss_mib()}), flush=True)
