"""PyTorch peer for bench_projector: times an LLaVA mlpNx_gelu projector (Linear, then
[GELU, Linear] x (depth-1)) on CPU at a given thread count; prints one JSON line."""
import argparse
import json
import statistics
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=576)
ap.add_argument("--d-in", type=int, default=1024)
ap.add_argument("--d-out", type=int, default=4096)
ap.add_argument("--depth", type=int, default=2)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--reps", type=int, default=7)
a = ap.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(0)
mods = [torch.nn.Linear(a.d_in, a.d_out)]
for _ in range(a.depth - 1):
    mods += [torch.nn.GELU(), torch.nn.Linear(a.d_out, a.d_out)]
proj = torch.nn.Sequential(*mods).eval()
x = torch.randn(a.tokens, a.d_in)
times = []
with torch.inference_mode():
    for i in range(a.reps + 2):
        t0 = time.perf_counter()
        proj(x)
        if i >= 2:
            times.append(time.perf_counter() - t0)
print(json.dumps({"peer": "torch", "version": torch.__version__, "threads": a.threads,
                  "median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}))
