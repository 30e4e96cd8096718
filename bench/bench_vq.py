"""The VQ image tokenizers of fusion type D at their real shapes on random weights: encode and decode of one
image in mmbridge and PyTorch, A/B interleaved in one run, at the same thread count.

    python3 bench/bench_vq.py                        # Chameleon-7B's encoder and Janus-Pro's decoder at 512 / 384 px
    python3 bench/bench_vq.py --quick                # toy shapes, 1 repetition: a smoke run
    python3 bench/bench_vq.py --append bench/RESULTS.md

The models (transformers' classes with their checkpoints' configs, random weights, f32, save_pretrained):
- chameleon-encode: ChameleonVQVAE as facebook/chameleon-7b's vq_config (base_channels 128, channel_multiplier
  [1, 1, 2, 2, 4], 2 ResNet blocks a level, attention in the middle, 8192 codes of 256): a 512x512 image -> 32x32
  codes.
- janus-decode: JanusVQVAE's decoder as deepseek-community/Janus-Pro-1B's vq_config (base 128, [1, 1, 2, 2, 4],
  16384 codes of 8): 24x24 codes -> a 384x384 image.
- emu3-encode / emu3-decode (--models): Emu3VQVAE as BAAI/Emu3-Chat-hf's (base 256, [1, 2, 2, 4], 4 frames in
  time): far heavier (minutes a run on 2 cores), not in the default set.

Timed: mmbridge's `encode --vq` / `decode-vq`, their own forward time (stderr "vq ... s", the checkpoint's load
not included), one process a run; PyTorch in this process (torch.set_num_threads), `encode` / `decode` under
inference_mode after one warm-up. The FLOPs are mmbridge's count of the convolutions' and attention's
multiply-adds (x2), the share of the machine's fp32 FMA peak (bench_gemm's probe) what they reach.
"""
import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib  # noqa: E402
from bench_lib import kernel_isa, med, spread, table  # noqa: E402

CHAM = dict(embed_dim=256, num_embeddings=8192, latent_channels=256, resolution=512, base_channels=128,
            channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[])
JANUS = dict(embed_dim=8, num_embeddings=16384, latent_channels=256, base_channels=128,
             channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, num_patches=24)
EMU3 = dict(codebook_size=32768, embed_dim=4, latent_channels=4, base_channels=256, channel_multiplier=[1, 2, 2, 4],
            num_res_blocks=2, attn_resolutions=[], temporal_downsample_factor=4, hidden_size=1024)
QUICK = {"chameleon": dict(CHAM, base_channels=32, channel_multiplier=[1, 2], num_embeddings=256, embed_dim=32,
                           latent_channels=32, resolution=64),
         "janus": dict(JANUS, base_channels=32, channel_multiplier=[1, 2], num_embeddings=256, num_patches=16),
         "emu3": dict(EMU3, base_channels=32, channel_multiplier=[1, 2], codebook_size=256, hidden_size=64,
                      temporal_downsample_factor=2)}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build(kind, cfg, d):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig, Emu3VQVAE, Emu3VQVAEConfig, JanusVQVAE, JanusVQVAEConfig
    cls, ccls = {"chameleon": (ChameleonVQVAE, ChameleonVQVAEConfig), "janus": (JanusVQVAE, JanusVQVAEConfig),
                 "emu3": (Emu3VQVAE, Emu3VQVAEConfig)}[kind]
    torch.manual_seed(0)
    m = cls(ccls(**cfg)).eval()
    if not (d / "config.json").exists():
        m.save_pretrained(d)
    return m


def mmb_time(args, cmd, what):
    p = bench_lib.run([Path(args.build) / "mmbridge", *cmd])
    m = re.search(rf"vq {what}: ([\d.]+) s", p.stderr)
    if not m:
        raise RuntimeError(f"no 'vq {what}: S s' line in: {p.stderr[-400:]}")
    return float(m.group(1)), p.stderr


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", "--smoke", action="store_true", dest="quick")
    ap.add_argument("--models", default="chameleon-encode,janus-decode",
                    help="of chameleon-encode, janus-decode, emu3-encode, emu3-decode")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--build", default="build")
    ap.add_argument("--dir", help="cache for the checkpoints (default: a temporary directory)")
    ap.add_argument("--append", help="write the section into this markdown file")
    args = ap.parse_args(argv)
    if args.quick:
        args.threads, args.reps = "1", 1
    threads = [int(t) for t in args.threads.split(",")]
    load0 = bench_lib.load_now()
    root = Path(args.dir or tempfile.mkdtemp(prefix="mmb-vq-"))
    rows, peaks = [], {}
    for t in threads:
        peaks[t] = bench_lib.fma_peak(args.build, t)
    for name in args.models.split(","):
        kind, op = name.split("-")
        cfg = (QUICK if args.quick else {"chameleon": CHAM, "janus": JANUS, "emu3": EMU3})[kind]
        d = root / f"{kind}{'-quick' if args.quick else ''}"
        model = build(kind, cfg, d)
        f = 2 ** (len(cfg["channel_multiplier"]) - 1)
        side = cfg.get("resolution") or cfg.get("num_patches", 16) * f
        if kind == "emu3":
            side = 64 if args.quick else 512
        g = side // f
        px = torch.rand(1, 3, side, side) * 2 - 1
        save_file({"pixel_values": px.contiguous()}, str(root / "px.safetensors"))
        codes = torch.randint(0, cfg.get("num_embeddings", cfg.get("codebook_size")), (1, g, g), dtype=torch.int32)
        save_file({"codes": codes}, str(root / "codes.safetensors"))
        for th in threads:
            torch.set_num_threads(th)
            tm, tt = [], []
            with torch.inference_mode():
                def torch_run():
                    if op == "encode":
                        return model.encode(px, torch.tensor([[side, side]])) if kind == "emu3" else model.encode(px)
                    return model.decode(codes.long()) if kind == "emu3" else model.decode(codes.long().view(1, -1))
                torch_run()
                for _ in range(args.reps):  # A/B interleaved
                    if op == "encode":
                        s, err = mmb_time(args, ["encode", d, "--vq", "--pixels", root / "px.safetensors", "-o",
                                                 root / "out.safetensors", "--threads", th], "encode")
                    else:
                        s, err = mmb_time(args, ["decode-vq", d, root / "codes.safetensors", "-o", root / "out.png",
                                                 "--threads", th], "decode")
                    tm.append(s)
                    t0 = time.perf_counter()
                    torch_run()
                    tt.append(time.perf_counter() - t0)
            gf = re.search(r"([\d.]+) GFLOP", err)
            flop = float(gf.group(1)) * 1e9 if gf else 0.0
            rows.append([name, f"{side}x{side}", th, spread([x * 1e3 for x in tm], "{:.1f}"),
                         spread([x * 1e3 for x in tt], "{:.1f}"), f"{med(tt) / med(tm):.2f}x",
                         f"{flop / med(tm) * 1e-9:.1f}" if flop else "-",
                         f"{100 * flop / med(tm) / peaks[th]:.0f} %" if flop else "-"])
            log(" | ".join(map(str, rows[-1])))
    head = ["model", "image", "threads", "mmbridge ms", "PyTorch ms", "PyTorch / mmbridge", "mmbridge GFLOP/s",
            "of the FMA peak"]
    section = "\n".join(["## VQ tokenizers (fusion D): encode and decode of one image", "",
                         f"`python3 bench/bench_vq.py{' --quick' if args.quick else ''}`; kernel ISA "
                         f"{kernel_isa()}; medians of {args.reps} runs, A/B interleaved.", "",
                         *bench_lib.machine_lines(args.build, peaks, load0), "", table(head, rows), ""])
    print(section)
    if args.append:
        bench_lib.append(args.append, "bench_vq", section)


if __name__ == "__main__":
    main()
