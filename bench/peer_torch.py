"""PyTorch peers of the C benchmarks.

Default (bench_projector): times an LLaVA mlpNx_gelu projector (Linear, then [GELU, Linear] x (depth-1))
on CPU at a given thread count; prints one JSON line.

--serve (bench_gemm): a peer kept running that times single operations on the operands bench_gemm
wrote (raw float32 files: the inputs, then mmbridge's result, which the answer compares with):
  gemm MODE FILE M N K THREADS REPS WARM   C (M, N) = A (M, K) W^T: torch.nn.functional.linear
  attn MODE FILE T H D THREADS REPS WARM   softmax(q k^T / sqrt(D)) v over H heads of D on T tokens,
                                           qkv (T, 3 H D) [q | k | v]: scaled_dot_product_attention
MODE is eager, compile (torch.compile, dynamic=False) or onnxruntime (attn only: an ONNX export of the
same function). Each answer: {"times": [seconds...], "err": max |c - c_ours| / max |c_ours|}."""
import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from peer_common import Compiled, ort_session, serve, times

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=576)
ap.add_argument("--d-in", type=int, default=1024)
ap.add_argument("--d-out", type=int, default=4096)
ap.add_argument("--depth", type=int, default=2)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--reps", type=int, default=7)
ap.add_argument("--serve", action="store_true")
a = ap.parse_args()


def rel_err(c, ref):
    ref = ref.reshape(c.shape)
    return float((c - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def load(path, *shapes):
    """The arrays of the given shapes, one after another in a raw float32 file."""
    flat = torch.from_numpy(np.fromfile(path, dtype=np.float32))
    out, at = [], 0
    for s in shapes:
        n = int(np.prod(s))
        out.append(flat[at:at + n].reshape(s))
        at += n
    return out


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


class Sdpa(torch.nn.Module):
    """sdpa as a module, for the ONNX export."""

    def forward(self, q, k, v):
        return sdpa(q, k, v)


class Ops:
    def __init__(self):
        self.linear_c, self.sdpa_c, self.ort = Compiled(F.linear), Compiled(sdpa), {}

    def run(self, fn, threads, reps, warm, ref):
        """reps timed calls of fn after warm; the last result is compared with ours."""
        torch.set_num_threads(int(threads))
        last = [None]

        def call():
            last[0] = fn()
        with torch.inference_mode():
            ts = times(call, int(reps), int(warm))
        return {"times": ts, **({} if last[0] is None else {"err": rel_err(torch.as_tensor(last[0]), ref)})}

    def gemm(self, mode, path, M, N, K, threads, reps, warm):
        M, N, K = int(M), int(N), int(K)
        A, W, ref = load(path, (M, K), (N, K), (M, N))
        if mode not in ("eager", "compile"):
            raise ValueError(f"gemm: no mode {mode}")
        f = F.linear if mode == "eager" else self.linear_c
        return self.run(lambda: f(A, W), threads, reps, warm, ref)

    def attn(self, mode, path, T, H, D, threads, reps, warm):
        T, H, D = int(T), int(H), int(D)
        qkv, ref = load(path, (T, 3, H, D), (T, H * D))
        q, k, v = (qkv[:, i].transpose(0, 1).unsqueeze(0).contiguous() for i in range(3))  # (1, H, T, D)
        if mode == "onnxruntime":
            sess = self.ort_attn(Path(path).with_suffix(".onnx"), q, k, v, int(threads))
            feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
            f = lambda: torch.from_numpy(sess.run(None, feed)[0])  # noqa: E731
        elif mode in ("eager", "compile"):
            g = sdpa if mode == "eager" else self.sdpa_c
            f = lambda: g(q, k, v)  # noqa: E731
        else:
            raise ValueError(f"attn: no mode {mode}")
        return self.run(f, threads, reps, warm, ref.reshape(T, H, D).transpose(0, 1).unsqueeze(0))

    def ort_attn(self, onnx_path, q, k, v, threads):
        if (onnx_path, threads) not in self.ort:
            if not onnx_path.exists():
                torch.onnx.export(Sdpa(), (q, k, v), str(onnx_path), dynamo=False, input_names=["q", "k", "v"],
                                  output_names=["o"])
            self.ort = {(onnx_path, threads): ort_session(onnx_path, threads)}  # one session alive at a time
        return self.ort[(onnx_path, threads)]


if a.serve:
    ops = Ops()
    serve({"peer": "pytorch " + torch.__version__.split("+")[0]}, {"gemm": ops.gemm, "attn": ops.attn})
    raise SystemExit(0)

torch.set_num_threads(a.threads)
torch.manual_seed(0)
mods = [torch.nn.Linear(a.d_in, a.d_out)]
for _ in range(a.depth - 1):
    mods += [torch.nn.GELU(), torch.nn.Linear(a.d_out, a.d_out)]
proj = torch.nn.Sequential(*mods).eval()
x = torch.randn(a.tokens, a.d_in)
with torch.inference_mode():
    ts = times(lambda: proj(x), a.reps, warm=2)
print(json.dumps({"peer": "torch", "version": torch.__version__, "threads": a.threads,
                  "median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3}))
