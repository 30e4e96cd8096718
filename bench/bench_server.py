"""mmbridge serve's /v1/embeddings under load, against the library's own time for the same images (the CLI's
`encode`, one image per forward pass, the model's load not counted), in one run, A/B interleaved.

    python3 bench/bench_server.py                       # CLIP ViT-B/32 at 224 px (random weights), 32 requests a round
    python3 bench/bench_server.py --quick               # a tiny tower, a few requests: a smoke run
    python3 bench/bench_server.py --append bench/RESULTS.md

Each request is one image (a 256x256 PNG as a data URL) from Python's http.client, one connection per client
thread, on loopback. Reported per slots x threads and concurrent clients: requests per second, p50 and p99 latency,
and the server's overhead per request over the library (p50 at one client minus the CLI's per-image time), for the
JSON float arrays and for raw little-endian f32 ("encoding_format": "raw").
"""
import argparse
import base64
import http.client
import io
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib  # noqa: E402
from bench_lib import kernel_isa, med, spread, table  # noqa: E402

B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
           patch_size=32, projection_dim=512)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
            patch_size=14, projection_dim=16)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build(d, cfg):
    if (d / "config.json").exists():
        return
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**cfg)).eval().save_pretrained(d)
    side = cfg["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(d)


def images(root, n):
    from PIL import Image
    rs = np.random.RandomState(0)
    paths, urls = [], []
    for i in range(n):
        p = root / f"img{i}.png"
        buf = io.BytesIO()
        Image.fromarray(rs.randint(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue())
        paths.append(p)
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return paths, urls


def cli_per_image(args, d, paths, th):
    p = bench_lib.run([Path(args.build) / "mmbridge", "encode", d, *paths, "-o", Path(args.tmp) / "cli.safetensors",
                       "--threads", th, "--batch", 1])
    m = re.search(r"^encode ([\d.]+) ms", p.stdout + p.stderr, re.M)
    return float(m.group(1)) / 1e3 / len(paths)


class Serve:
    def __init__(self, args, d, slots, th):
        self.p = subprocess.Popen([str(Path(args.build) / "mmbridge"), "serve", str(d), "--port", "0", "--parallel",
                                   str(slots), "--threads", str(th), "--queue", "256"], stderr=subprocess.PIPE, text=True)
        for line in self.p.stderr:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            raise RuntimeError("serve did not start")
        threading.Thread(target=lambda: [None for _ in self.p.stderr], daemon=True).start()

    def close(self):
        self.p.terminate()
        self.p.wait(timeout=60)


def load(port, urls, clients, n_req, raw):
    local = threading.local()

    def one(i):
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = {"input": urls[i % len(urls)]}
        if raw:
            body["encoding_format"] = "raw"
        t0 = time.perf_counter()
        c.request("POST", "/v1/embeddings", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = r.read()
        dt = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]}")
        return dt

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        lat = list(ex.map(one, range(n_req)))
    wall = time.perf_counter() - t0
    lat.sort()
    return n_req / wall, lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", "--smoke", action="store_true", dest="quick")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--build", default="build")
    ap.add_argument("--dir", help="cache for the checkpoint (default: a temporary directory)")
    ap.add_argument("--append", help="write the section into this markdown file")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.requests = 1, 8
    load0 = bench_lib.load_now()
    root = Path(args.dir or tempfile.mkdtemp(prefix="mmb-serve-"))
    args.tmp = tempfile.mkdtemp(prefix="mmb-serve-out-")
    d = root / ("clip-tiny" if args.quick else "clip-b32")
    build(d, TINY if args.quick else B32)
    paths, urls = images(Path(args.tmp), 8)
    th = 2
    peaks = {th: bench_lib.fma_peak(args.build, th)}
    configs = [(1, 2), (2, 2)]  # slots, threads in all
    clients = [1, 2, 4]
    res = {}  # (slots, clients, raw) -> list of (rps, p50, p99)
    cli = {1: [], 2: []}
    for rep in range(args.reps):  # A/B interleaved: the library's time, then each server set-up in turn
        for t in (1, 2):
            cli[t].append(cli_per_image(args, d, paths, t))
        for slots, t in configs:
            s = Serve(args, d, slots, t)
            try:
                load(s.port, urls, 1, 4, False)  # warm-up
                for c in clients:
                    for raw in (False, True) if c == 1 else (False,):
                        res.setdefault((slots, c, raw), []).append(load(s.port, urls, c, args.requests, raw))
            finally:
                s.close()
        log(f"round {rep + 1}/{args.reps} done")
    rows = []
    lib1 = {t: med(cli[t]) for t in cli}
    for (slots, c, raw), runs in sorted(res.items()):
        per_slot = th // slots
        rps, p50, p99 = ([r[k] for r in runs] for k in range(3))
        lib_rps = slots / lib1[per_slot]
        over = (med(p50) - lib1[per_slot]) * 1e3 if c == 1 else None
        rows.append([f"{slots} x {per_slot}", c, "raw f32" if raw else "JSON", spread(rps, "{:.1f}"),
                     f"{med(p50) * 1e3:.1f}", f"{med(p99) * 1e3:.1f}", f"{lib_rps:.1f}", f"{med(rps) / lib_rps:.2f}",
                     f"{over:.1f}" if over is not None else "-"])
        log(" | ".join(map(str, rows[-1])))
    head = ["slots x threads", "clients", "body", "requests/s", "p50 ms", "p99 ms", "library images/s",
            "server / library", "overhead ms (p50 - library)"]
    model = "a tiny CLIP tower (28 px)" if args.quick else "CLIP ViT-B/32 at 224 px (random weights): 50 tokens x 768"
    section = "\n".join([
        "## mmbridge serve: /v1/embeddings under load", "",
        f"`python3 bench/bench_server.py{' --quick' if args.quick else ''}`; {model}; one 256x256 PNG a request as a "
        f"data URL, {args.requests} requests a round from Python http.client threads on loopback; kernel ISA "
        f"{kernel_isa()}; medians of {args.reps} rounds, the library's time and the server's interleaved.",
        f"The library's time is the CLI's `encode --batch 1` per image at the slot's threads (one image a forward, "
        f"load excluded): {lib1[1] * 1e3:.1f} ms at 1 thread, {lib1[2] * 1e3:.1f} ms at 2; 'library images/s' is "
        "slots / that.", "",
        *bench_lib.machine_lines(args.build, peaks, load0), "", table(head, rows), ""])
    print(section)
    if args.append:
        bench_lib.append(args.append, "bench_server", section)


if __name__ == "__main__":
    main()
