"""Peers for bench_vit and bench_dense: CLIP ViT-L/14-336 (random weights at real size) followed by LLaVA-1.5's
mlp2x_gelu projector to 4096, in PyTorch eager, under torch.compile and in onnxruntime (on an ONNX export of
the same torch module); and the Dense Connector's DCI on the same tower (PyTorch only).

--prepare-only writes the checkpoint mmbridge reads (once, cached in --dir) and the pixel values of a batch
(and with --onnx the ONNX export for that batch), so that every implementation runs the same weights on the
same input.

--serve PEER (torch, compile or onnxruntime) keeps one peer running at --threads threads for a C benchmark
(peer_common.serve): after the first line, {"peer": name}, each request `run BATCH REPS WARM` answers
{"times": [seconds per batch...], "peak_rss_mib": ...}: the peer's own process, so RSS is its own.
--workload dci: the tower up to the deepest hidden state DCI reads, DCI (the final feature, then the means of
hidden_states[0 .. L/2-1] and [L/2 .. L-1], on channels, as tests/oracle/test_dense.py's reference), and the
3072-wide projector bench_dense wrote in --projector."""
import argparse
import json
from pathlib import Path

from peer_common import ort_session, rss_mib, serve_setup, times

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True, help="cache directory for the checkpoint, pixels and ONNX files")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--layers", type=int, default=24)
ap.add_argument("--prepare-only", action="store_true")
ap.add_argument("--onnx", action="store_true", help="with --prepare-only: also export the ONNX file")
ap.add_argument("--serve", choices=["torch", "compile", "onnxruntime"])
ap.add_argument("--workload", choices=["llava", "dci"], default="llava")
ap.add_argument("--projector", help="--workload dci: the Dense Connector checkpoint directory")
a = ap.parse_args()
if not a.prepare_only and not a.serve:
    ap.error("give --prepare-only or --serve PEER")
d = Path(a.dir)
ckpt = d / f"llava-vitl336-{a.layers}"


def px_path(batch):
    return d / f"pixels-{batch}.safetensors"


def onnx_path(batch):
    return d / f"vitl336-{a.layers}-b{batch}.onnx"


def ort_setup():
    """The onnxruntime peer: no torch in its process, so that its RSS is onnxruntime's own."""
    import onnxruntime as ort
    from safetensors.numpy import load_file

    session = {}

    def run(batch, reps, warm):
        b = int(batch)
        if b not in session:
            if not onnx_path(b).exists():
                raise FileNotFoundError(f"{onnx_path(b)}: run peer_vit.py --prepare-only --onnx first")
            session.clear()  # one session alive at a time
            session[b] = ort_session(onnx_path(b), a.threads), {"px": load_file(str(px_path(b)))["pixel_values"]}
        sess, feed = session[b]
        return {"times": times(lambda: sess.run(None, feed), int(reps), int(warm)), "peak_rss_mib": rss_mib()}

    return {"peer": "onnxruntime " + ort.__version__}, {"run": run}


if a.serve == "onnxruntime":
    serve_setup(ort_setup)
    raise SystemExit(0)


def prepared():
    print(json.dumps({"checkpoint": str(ckpt), "pixels": str(px_path(a.batch))}))
    raise SystemExit(0)


if a.prepare_only and all(p.exists() for p in [ckpt / "config.json", px_path(a.batch)] + [onnx_path(a.batch)] * a.onnx):
    prepared()  # all cached: no need to import torch

import torch  # noqa: E402

torch.set_num_threads(a.threads)


class Workload(torch.nn.Module):
    """pixels -> hidden_states[-1] of the tower (all layers run) -> drop CLS -> projector."""

    def __init__(self, llava):
        super().__init__()
        self.tower = llava.model.vision_tower
        self.proj = llava.model.multi_modal_projector

    def forward(self, px):
        h = self.tower(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        return self.proj(h[:, 1:])


class DciWorkload(torch.nn.Module):
    """pixels -> the tower's first L-1 blocks -> DCI -> the 3072 -> 4096 -> 4096 mlp2x_gelu projector."""

    def __init__(self, llava, projector_dir):
        super().__init__()
        from safetensors.torch import load_file
        self.tower = llava.model.vision_tower
        layers = self.tower.encoder.layers
        self.tower.encoder.layers = layers[:-1]  # hidden_states[L - 1] is the deepest read
        self.half = len(layers) // 2
        sd = load_file(str(Path(projector_dir) / "model.safetensors"))
        w0, w2 = sd["model.mm_projector.0.weight"], sd["model.mm_projector.2.weight"]
        self.proj = torch.nn.Sequential(torch.nn.Linear(w0.shape[1], w0.shape[0]), torch.nn.GELU(),
                                        torch.nn.Linear(w2.shape[1], w2.shape[0]))
        self.proj.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in sd.items()})

    def forward(self, px):
        hs = [h[:, 1:] for h in self.tower(pixel_values=px, output_hidden_states=True).hidden_states]
        m = self.half
        groups = [torch.stack(hs[:m]).mean(0), torch.stack(hs[m:2 * m]).mean(0)]
        return self.proj(torch.cat([hs[-1]] + groups, dim=-1))


def build():
    """The LLaVA model with the cached checkpoint's weights (written from seed 0 the first time)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    if (ckpt / "config.json").exists():
        return LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=a.layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=64, num_hidden_layers=1, num_attention_heads=32,
                       vocab_size=256)
    cfg = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                      vision_feature_select_strategy="default", image_token_index=255)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.save_pretrained(ckpt)
    return m


def pixels(batch):
    """The batch's pixel values (written from seed 1 the first time)."""
    from safetensors.torch import load_file, save_file
    if not px_path(batch).exists():
        torch.manual_seed(1)
        save_file({"pixel_values": torch.randn(batch, 3, 336, 336)}, str(px_path(batch)))
    return load_file(str(px_path(batch)))["pixel_values"]


def torch_setup():
    """The PyTorch peer, eager or (--serve compile) under torch.compile."""
    wl = (DciWorkload(build(), a.projector) if a.workload == "dci" else Workload(build())).eval()
    name = "pytorch " + torch.__version__.split("+")[0]
    if a.serve == "compile":
        # Regional compilation (torch.compile of the repeated block, as PyTorch recommends for stacks of
        # identical layers): the encoder layers share one compiled graph per batch size instead of one
        # graph of the whole tower, which takes minutes to compile here; the projector is compiled too.
        import torch._dynamo.config as dc
        dc.recompile_limit = max(dc.recompile_limit, 64)
        layers = wl.tower.encoder.layers
        for i in range(len(layers)):
            layers[i] = torch.compile(layers[i], dynamic=False)
        wl.proj = torch.compile(wl.proj, dynamic=False)
        name += " compile"

    def run(batch, reps, warm):
        px = pixels(int(batch))
        with torch.inference_mode():
            ts = times(lambda: wl(px), int(reps), int(warm))
        return {"times": ts, "peak_rss_mib": rss_mib()}

    return {"peer": name}, {"run": run}


if a.prepare_only:
    px = pixels(a.batch)
    if a.onnx and not onnx_path(a.batch).exists():
        torch.onnx.export(Workload(build()).eval(), (px,), str(onnx_path(a.batch)), dynamo=False,
                          input_names=["px"], output_names=["emb"])
    elif not (ckpt / "config.json").exists():
        build()
    prepared()
else:
    serve_setup(torch_setup)
