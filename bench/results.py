"""Regenerates bench/RESULTS.md: mmbridge against every peer, in one run, on this machine.

    python3 bench/results.py                 # full size, writes bench/RESULTS.md (23 minutes on 2 cores)
    python3 bench/results.py --quick --out build/RESULTS-quick.md   # toy sizes, well under a minute

Builds build/ (CMake Release) if needed, then runs the C benchmarks with --json, each of which keeps its
peers running and alternates them with mmbridge repetition by repetition:
  bench_gemm   the FMA peak probe; the connector and ViT GEMM shapes: own kernel, OpenBLAS (both
               OPENBLAS_CORETYPE configurations), BLIS, oneDNN, torch F.linear eager and compiled; the
               ViT attention against torch SDPA (eager, compiled) and onnxruntime; own kernel by weight dtype
  bench_vit    CLIP ViT-L/14-336 + mlp2x_gelu against PyTorch eager, torch.compile and onnxruntime
  bench_dense  the Dense Connector (DCI) against the same in PyTorch
  bench_decoder  a Qwen2-0.5B-shaped decoder against PyTorch (the peer runs after ours, not interleaved)
and writes one markdown file with the machine description (keeping the sections other benchmarks put in
it between their markers: bench_fusion_a.py --append). Medians of the samples, their spread, the share
of the measured fp32 FMA peak and mmbridge's speed ratio against each peer (> 1: mmbridge is faster), all
from this one run. Progress goes to stderr. A peer or library that cannot run is an n/a cell with its reason.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.monotonic()


def log(msg):
    print(f"[results {time.monotonic() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def sh(*cmd):
    """stdout of cmd, stripped, or "" if it cannot run."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes (1 layer, 1 repetition, 1 thread): a smoke run")
    ap.add_argument("--out", help="the markdown file (default bench/RESULTS.md; --quick needs another path)")
    ap.add_argument("--build", default="build", help="the CMake Release build directory (default build)")
    ap.add_argument("--dir", help="cache for checkpoints, pixels and ONNX files (default BUILD/bench-cache)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--layers", type=int, default=24, help="ViT layers (default 24, the real depth)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of the encoder-level rows")
    ap.add_argument("--rounds", type=int, default=3, help="bench_gemm rounds (each: every backend in turn)")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out: gemm,vit,dense,decoder")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: rewrite the report from the JSON files the last run left in BUILD")
    a = ap.parse_args()
    default_out = ROOT / "bench" / "RESULTS.md"
    a.out = Path(a.out) if a.out else (ROOT / a.build / "RESULTS-quick.md" if a.quick else default_out)
    if a.quick and a.out.resolve() == default_out.resolve():
        ap.error("--quick does not overwrite bench/RESULTS.md: give --out")
    if a.quick:
        a.threads, a.layers, a.reps, a.rounds = "1", 1, 1, 1
    a.dir = a.dir or str(Path(a.build) / "bench-cache")
    a.skip = set(filter(None, a.skip.split(",")))
    return a


def build(bdir):
    if not (ROOT / bdir / "CMakeCache.txt").exists():
        log(f"configuring {bdir} (Release)")
        subprocess.run(["cmake", "-S", ".", "-B", bdir, "-DCMAKE_BUILD_TYPE=Release"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    log(f"building the benchmarks in {bdir}")
    subprocess.run(["cmake", "--build", bdir, "-j2", "--target", "bench_gemm", "bench_vit", "bench_dense",
                    "bench_decoder"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def run_bench(a, name, *args):
    """Runs BUILD/name args --json FILE from the repository root, its tables going to stderr as progress;
    returns its JSON records, and a failure note if it exited non-zero."""
    jpath = ROOT / a.build / f"{name}.jsonl"
    if a.render_only:
        return [json.loads(line) for line in jpath.read_text().splitlines() if line.strip()], None
    cmd = [str(ROOT / a.build / name), *args, "--json", str(jpath)]
    log("$ " + " ".join(shlex.quote(c) for c in cmd[:-2]))
    t = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, stdout=sys.stderr, check=False)
    recs = [json.loads(line) for line in jpath.read_text().splitlines() if line.strip()] if jpath.exists() else []
    log(f"{name}: {time.monotonic() - t:.0f} s, exit {p.returncode}")
    note = None if p.returncode == 0 else f"{name} exited with status {p.returncode}; its figures may be incomplete"
    return recs, note


# ---- the machine --------------------------------------------------------------------------------------------

FLAGS = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
         "amx_tile", "amx_bf16", "amx_int8"]


def package_of(soname):
    """The Debian package and version of the library a dlopen of soname finds."""
    m = re.search(rf"{re.escape(soname)} .*=> (\S+)", sh("/sbin/ldconfig", "-p"))
    if not m:
        return f"{soname}: not found"
    owner = sh("dpkg", "-S", os.path.realpath(m.group(1))).split(":")[0]
    if not owner:
        return f"{soname}: {os.path.realpath(m.group(1))} (not from a package)"
    return f"{owner} {sh('dpkg-query', '-W', '-f', '${Version}', owner)}"


def pyversion(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(a):
    cpu = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpu)
    flags = set(re.search(r"flags\s*:\s*(.*)", cpu).group(1).split()) if "flags" in cpu else set()
    lscpu = dict(re.findall(r"^([^:]+):\s*(.*)$", sh("lscpu"), re.M))
    mem = re.search(r"MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text())
    cache = Path(ROOT / a.build / "CMakeCache.txt")
    cc = re.search(r"CMAKE_C_COMPILER:\w+=(.*)", cache.read_text()) if cache.exists() else None
    cc = cc.group(1) if cc else "cc"
    commit = sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if sh("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no") else ""
    have = [f for f in FLAGS if f in flags]
    return [
        ("CPU", f"{model.group(1) if model else '?'} ({lscpu.get('Vendor ID', '?')}, family {lscpu.get('CPU family', '?')} "
                f"model {lscpu.get('Model', '?')}; {lscpu.get('Hypervisor vendor', 'no') } hypervisor)"),
        ("ISA", ", ".join(have) + "; absent: " + ", ".join(f for f in FLAGS if f not in flags)),
        ("cores", f"{os.cpu_count()} logical CPUs: {lscpu.get('Socket(s)', '?')} socket x {lscpu.get('Core(s) per socket', '?')} "
                  f"cores x {lscpu.get('Thread(s) per core', '?')} threads"),
        ("caches", f"L1d {lscpu.get('L1d cache', '?')}, L2 {lscpu.get('L2 cache', '?')}, L3 {lscpu.get('L3 cache', '?')}"),
        ("memory", f"{int(mem.group(1)) / 1048576:.1f} GiB" if mem else "?"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("compiler", f"{cc}: {sh(cc, '--version').splitlines()[0] if sh(cc, '--version') else '?'} (CMake Release)"),
        ("GEMM libraries", "; ".join(package_of(s) for s in ("libopenblas.so.0", "libblis.so.4", "libdnnl.so.2"))),
        ("OpenBLAS environment", f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, "
                                 f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}"),
        ("Python peers", f"torch {pyversion('torch')}, onnxruntime {pyversion('onnxruntime')}, onnx {pyversion('onnx')}, "
                         f"transformers {pyversion('transformers')} (Python {platform.python_version()})"),
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("commit", f"{commit}{dirty}"),
    ]


# ---- formatting ---------------------------------------------------------------------------------------------

def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def pct(x, peak):
    return f"{100 * x / peak:.0f} %" if peak else "?"


def spread(med, lo, hi):
    """Half the samples' range, as a share of the median."""
    return f"±{50 * (hi - lo) / med:.0f} %" if med else ""


def ratio(x):
    return f"**{x:.2f}x**" if x >= 1 else f"{x:.2f}x"


def na(rec):
    return f"n/a: {rec.get('error', 'not measured')}"


class Report:
    def __init__(self, a):
        self.a, self.parts, self.peak = a, [], {}
        self.ratios = {}  # table -> [(ratio, row, peer)] of every speed ratio shown, for the summary

    def vs(self, where, peer, x):
        """A speed ratio cell (mmbridge over peer), kept for the summary."""
        self.ratios.setdefault(where[0], []).append((x, where[1], peer))
        return ratio(x)

    def summary(self):
        rows = []
        for t, rs in self.ratios.items():
            worst, best = min(rs), max(rs)
            rows.append([t, f"{sum(x >= 1 for x, _, _ in rs)} of {len(rs)}",
                         f"{worst[0]:.2f}x ({worst[1]}, {worst[2]})", f"{best[0]:.2f}x ({best[1]}, {best[2]})"])
        return "## Summary\n\n" + table(["table", "mmbridge at least as fast", "slowest against a peer",
                                          "fastest against a peer"], rows)

    def add(self, *text):
        self.parts.append("\n".join(text))

    def peaks(self, recs):
        """The best fp32 FMA peak any probe of this run measured, per thread count."""
        for r in recs:
            t = r.get("threads")
            for k in ("fp32", "peak_gflops"):
                if t and r.get(k, 0) > self.peak.get(t, 0):
                    self.peak[t] = r[k]

    # -- sections --

    def gemm(self, recs):
        peaks = [r for r in recs if r["bench"] == "peak"]
        bf16 = any(r.get("avx512_bf16") for r in peaks)
        self.add("## FMA peak", "",
                 "12 independent accumulator chains of FMAs per thread (bench_common.h), best of the probes in this "
                 "run (bench_gemm before and after its GEMMs, bench_vit and bench_dense at start). Every % below is "
                 "of this fp32 peak at the row's thread count.", "",
                 table(["threads", "fp32 (best, GFLOP/s)", "fp32 256-bit", "fp32 512-bit", "bf16 (dpbf16)"],
                       [[t, f"{self.peak.get(t, 0):.1f}", f"{r['fp32_ymm']:.1f}",
                         f"{r['fp32_zmm']:.1f}" if r.get("avx512f") else "n/a: no avx512f",
                         f"{r['bf16_zmm']:.1f}" if bf16 else "n/a: no avx512_bf16"]
                        for r in peaks for t in [r["threads"]]]))
        g = [r for r in recs if r["bench"] == "gemm"]
        impls = [i for i in ["OB-env", "OB-Haswell", "OB-unpinned", "BLIS", "oneDNN", "torch", "torch.compile"]
                 if any(r["impl"] == i for r in g)]
        label = {"OB-env": "OpenBLAS (env)", "OB-Haswell": "OpenBLAS CORETYPE=Haswell",
                 "OB-unpinned": "OpenBLAS unpinned", "torch": "torch F.linear", "torch.compile": "torch.compile F.linear"}
        cores = {r["impl"]: r.get("core") for r in g if r.get("core")}
        rows, wins, total = [], 0, 0
        for key in dict.fromkeys((r["M"], r["N"], r["K"], r["threads"]) for r in g):
            cell = {r["impl"]: r for r in g if (r["M"], r["N"], r["K"], r["threads"]) == key}
            own, peak = cell.get("own"), self.peak.get(key[3], 0)
            if not own or "gflops" not in own:
                continue
            row = [f"{key[0]}x{key[1]}x{key[2]}", key[3],
                   f"{own['gflops']:.1f} ({pct(own['gflops'], peak)}, {spread(own['gflops'], own['gflops_min'], own['gflops_max'])})"]
            best = ("mmbridge", own["gflops"])
            for i in impls:
                r = cell.get(i, {"error": "not run"})
                if "gflops" not in r:
                    row.append(na(r))
                    continue
                bad = " (wrong result!)" if r["err"] > 1e-4 else ""
                row.append(f"{r['gflops']:.1f} ({pct(r['gflops'], peak)}, {spread(r['gflops'], r['gflops_min'], r['gflops_max'])})"
                           f" {self.vs(('GEMM', f'{row[0]}, {key[3]} thr'), label.get(i, i), own['gflops'] / r['gflops'])}"
                           f"{bad}")
                if not bad and r["gflops"] > best[1]:
                    best = (label.get(i, i), r["gflops"])
            row.append(best[0])
            rows.append(row)
            total += 1
            wins += best[0] == "mmbridge"
        self.add("## GEMM", "",
                 "C (M, N) = A (M, K) W^T, W in the nn.Linear layout, fp32: the LLaVA-1.5 projector's two GEMMs "
                 "(576 tokens), the ViT-L/14-336 block's qkv, out_proj, fc1, fc2 (577 tokens), then a low-rank "
                 "projector's 1024 -> 64 factor, 64 resampler latents through 1024 -> 4096, and 16 rows through "
                 "4096 x 4096 (bandwidth-bound). Our weights are "
                 "packed once before timing. Cell: median GFLOP/s (share of peak, ± half the samples' range) and "
                 "mmbridge's speed over that peer (> 1: mmbridge faster; bold). Backends alternate in each round "
                 f"(bench_gemm --rounds {self.a.rounds}); OpenBLAS's second configuration runs in a child process "
                 "(OPENBLAS_CORETYPE is read at load). Cores OpenBLAS chose: "
                 + ", ".join(f"{label.get(k, k)}: {v}" for k, v in cores.items()) + ".", "",
                 table(["M x N x K", "thr", "mmbridge"] + [label.get(i, i) for i in impls] + ["fastest"], rows), "",
                 f"mmbridge is the fastest on {wins} of {total} rows.")
        self.attention([r for r in recs if r["bench"] == "attention"])
        self.dtypes([r for r in recs if r["bench"] == "dtype"])

    def attention(self, recs):
        if not recs:
            return
        r0 = next((r for r in recs if "s" in r), recs[0])
        name = {"own": "mmbridge (blocked, online softmax)", "eager": "torch SDPA eager",
                "compile": "torch.compile SDPA", "onnxruntime": "onnxruntime (ONNX export of SDPA)"}
        rows = []
        for t in dict.fromkeys(r["threads"] for r in recs):
            own = next((r for r in recs if r["threads"] == t and r["impl"] == "own" and "s" in r), None)
            for r in (r for r in recs if r["threads"] == t):
                if "s" not in r:
                    rows.append([t, name.get(r["impl"], r["impl"]), na(r), "", "", "", ""])
                    continue
                gf = r["flops"] / r["s"] * 1e-9
                bad = " (wrong result!)" if r.get("err", 0) > 1e-4 else ""
                rows.append([t, name.get(r["impl"], r["impl"]) + bad, f"{r['s'] * 1e3:.2f}", spread(r["s"], r["s_min"], r["s_max"]),
                             f"{gf:.1f}", pct(gf, self.peak.get(t, 0)),
                             self.vs(("attention", f"{t} thr"), name.get(r["impl"], r["impl"]), r["s"] / own["s"])
                             if own and r is not own else ""])
        self.add("## Attention", "",
                 f"softmax(q k^T / sqrt(d)) v, {r0.get('tokens', 577)} tokens x {r0.get('heads', 16)} heads x "
                 f"{r0.get('head_dim', 64)} (the ViT-L/14-336 block), no mask; 4 T^2 D flops. The same q, k, v "
                 "everywhere; each peer's output is compared with ours (max rel err above 1e-4 would be marked). One timed run of each, in turn, per repetition.", "",
                 table(["threads", "implementation", "ms (median)", "spread", "GFLOP/s", "% peak", "mmbridge speed-up"], rows))

    def dtypes(self, recs):
        if not recs:
            return
        rows = []
        for key in dict.fromkeys((r["M"], r["N"], r["K"], r["threads"]) for r in recs):
            cell = {r["dtype"]: r for r in recs if (r["M"], r["N"], r["K"], r["threads"]) == key}
            peak = self.peak.get(key[3], 0)
            rows.append([f"{key[0]}x{key[1]}x{key[2]}", key[3]] +
                        [f"{c['gflops']:.1f} ({pct(c['gflops'], peak)}) {c['x_f32']:.2f}x, {c['packed_mib']:.1f} MiB"
                         + (f", err {c['rel_err_vs_f32']:.1g}" if d != "f32" else "")
                         if (c := cell.get(d)) else "n/a" for d in ("f32", "bf16", "f16", "int8")])
        self.add("## Reduced-precision weights (own kernel)", "",
                 "The same GEMMs with the weights packed as f32, bf16, f16 and int8 (per-channel scales), widened to "
                 "f32 in the micro-kernel; activations f32. Cell: median GFLOP/s (share of the fp32 peak), speed "
                 "relative to f32 weights, packed weight size, and max |c - c_f32| / max |c_f32| (the weights' "
                 "rounding). The four dtypes alternate within each round.", "",
                 table(["M x N x K", "thr", "f32", "bf16", "f16", "int8"], rows))

    def encoder(self, recs, title, intro, label, is_base, short):
        """Rows of seconds per image; each peer's speed-up is against the mmbridge row is_base picks."""
        rows = []
        key = (lambda r: (r["threads"], r.get("batch", 1)))
        for k in dict.fromkeys(key(r) for r in recs):
            group = [r for r in recs if key(r) == k]
            own = next((r for r in group if is_base(r) and "s_per_image" in r), None)
            peak = self.peak.get(k[0], 0)
            for r in group:
                name = label(r)
                if "s_per_image" not in r:
                    rows.append([k[0], k[1], name, na(r)] + [""] * 5)
                    continue
                gf = r["gflop_per_image"] / r["s_per_image"]
                rows.append([k[0], k[1], name, f"{r['s_per_image']:.3f}", spread(r["s_per_image"], r["s_min"], r["s_max"]),
                             f"{gf:.1f}", pct(gf, peak),
                             self.vs((short, f"{k[0]} thr, batch {k[1]}"), name, r["s_per_image"] / own["s_per_image"])
                             if own and r["impl"] != "mmbridge" else "",
                             f"{r['peak_rss_mib']:.0f} MiB"])
        self.add(title, "", intro, "",
                 table(["threads", "batch", "implementation", "s/image (median)", "spread", "GFLOP/s", "% peak",
                        "mmbridge speed-up", "peak RSS"], rows))

    def vit(self, recs):
        vit = [r for r in recs if r["bench"] == "vit"]
        if not vit:
            return
        layers = next((r["layers"] for r in vit if "layers" in r), self.a.layers)
        gflop = next((r["gflop_per_image"] for r in vit if "gflop_per_image" in r), 0)
        loads = ", ".join(f"{r['s']:.2f} s at {r['threads']} thread(s)" for r in recs if r["bench"] == "vit_load")
        self.encoder(vit, "## Whole encoder: CLIP ViT-L/14-336 + mlp2x_gelu",
                     f"CLIP ViT-L/14-336 ({layers} layers, 577 tokens, width 1024) and LLaVA-1.5's mlp2x_gelu "
                     f"projector to 4096, fp32, {gflop:.0f} GFLOP per image: the same random weights "
                     "(transformers save_pretrained) and pixels in every implementation. PyTorch runs "
                     "LlavaForConditionalGeneration's tower and projector; torch.compile compiles the encoder layer "
                     "and the projector (regional compilation, dynamic=False); onnxruntime runs a TorchScript ONNX "
                     "export of the same module (intra_op_num_threads = threads, inter_op_num_threads = 1, "
                     "ORT_ENABLE_ALL). Each peer is its own process (its peak RSS is its own) kept running; after one "
                     f"warm-up each, the implementations take turns, one timed run per repetition ({self.a.reps} "
                     f"repetitions). mmbridge's load (map, convert, pack the weights) is not in s/image: {loads}.",
                     lambda r: r.get("peer") or r["impl"], lambda r: r["impl"] == "mmbridge", "encoder")

    def dense(self, recs):
        d = [r for r in recs if r["bench"] == "dense"]
        if not d:
            return
        self.encoder(d, "## Whole encoder + Dense Connector (DCI)",
                     "The same tower with the Dense Connector's DCI (the final feature, then the means of "
                     "hidden_states[0 .. L/2-1] and [L/2 .. L-1] of the L-layer tower, concatenated on channels) and a 3072 -> 4096 -> "
                     "4096 mlp2x_gelu, batch 1. mmbridge runs the tower only up to the deepest hidden state read, and "
                     "so does the PyTorch peer (its last block removed); the formulation is tests/oracle/test_dense.py's "
                     "reference. The LLaVA-1.5 row (select layer -2) is the baseline that DCI adds to. Speed-ups are "
                     "against mmbridge's DCI row; everything alternates per repetition. mmbridge's peak RSS is that "
                     "of bench_dense's process, which holds both models (each with its tower).",
                     lambda r: f"{r.get('peer') or r['impl']} {'DCI' if r['row'] == 'dci' else 'LLaVA-1.5 (no DC)'}",
                     lambda r: r["impl"] == "mmbridge" and r["row"] == "dci", "encoder + DCI")

    def decoder(self, recs):
        dec = [r for r in recs if r["bench"] == "decoder"]
        if not dec:
            return
        rows = []
        for t in dict.fromkeys(r["threads"] for r in dec):
            own = next(r for r in dec if r["threads"] == t and r["impl"] == "mmbridge")
            for r in (r for r in dec if r["threads"] == t):
                rows.append([t, r["impl"], f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.2f}",
                             f"{100 * r['decode_tps'] / r['bound_tps']:.0f} %",
                             self.vs(("decoder decode", f"{t} thr"), r["impl"], own["decode_tps"] / r["decode_tps"])
                             if r is not own else "",
                             self.vs(("decoder prefill", f"{t} thr"), r["impl"], own["prefill_tps"] / r["prefill_tps"])
                             if r is not own else "",
                             f"{r['peak_rss_mib']:.0f} MiB"])
        o = dec[0]
        self.add("## LLM decoder", "",
                 f"A Qwen2 decoder at Qwen2-0.5B's shapes ({o['checkpoint'].rsplit('/', 1)[-1]}, random bf16 weights), "
                 f"a {o['prompt']}-token prompt then {o['decode']} decode steps with the KV cache. Decode reads every "
                 "weight once per token, so its bound is the measured read bandwidth over the bytes per token; the "
                 "share of that bound replaces the share of FMA peak here. The PyTorch peer runs after ours at the "
                 "same thread count (not interleaved).", "",
                 table(["threads", "implementation", "prefill tok/s", "decode tok/s", "% of bandwidth bound",
                        "mmbridge decode speed-up", "prefill speed-up", "peak RSS"], rows))


def main():
    a = parse_args()
    if not a.render_only:
        build(a.build)
    th = a.threads
    records = {}
    if "gemm" not in a.skip:
        args = ["--threads", th, "--torch", "--dir", a.dir, "--rounds", str(a.rounds)]
        records["gemm"] = run_bench(a, "bench_gemm", *(args + (["--quick"] if a.quick else ["--reps", "3"])))
    if "vit" not in a.skip:
        peers = "torch,onnxruntime" if a.quick else "torch,compile,onnxruntime"
        records["vit"] = run_bench(a, "bench_vit", "--threads", th, "--batch", "1" if a.quick else "1,4",
                                   "--reps", str(a.reps), "--layers", str(a.layers), "--dir", a.dir, "--peers", peers)
    if "dense" not in a.skip:
        records["dense"] = run_bench(a, "bench_dense", "--threads", th, "--reps", str(a.reps), "--dir", a.dir,
                                     "--layers", str(max(2, a.layers)), "--rows", "llava,dci",
                                     "--peers", "torch" if a.quick else "torch,compile")
    if "decoder" not in a.skip:
        args = ["--quick", "--peers"] if a.quick else ["--threads", th, "--reps", str(a.reps), "--peers"]
        records["decoder"] = run_bench(a, "bench_decoder", *args, "--dir", a.dir)

    rep = Report(a)
    for recs, _ in records.values():
        rep.peaks(recs)
    if "gemm" in records:
        rep.gemm(records["gemm"][0])
    if "vit" in records:
        rep.vit(records["vit"][0])
    if "dense" in records:
        rep.dense(records["dense"][0])
    if "decoder" in records:
        rep.decoder(records["decoder"][0])
    notes = [n for _, n in records.values() if n]
    if a.quick:
        notes.append("--quick: toy sizes, 1 repetition, 1 thread; torch.compile only at the operation level. "
                     "A smoke test of the generator, not a measurement.")
    run_file = ROOT / a.build / "results-run.json"  # how the figures were made, for --render-only
    if a.render_only:
        run = json.loads(run_file.read_text())
    else:
        run = {"command": "python3 " + " ".join(shlex.quote(x) for x in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
               "seconds": round(time.monotonic() - T0), "machine": machine(a)}
        run_file.write_text(json.dumps(run))
    head = ["# mmbridge against its peers", "",
            f"Generated by `{run['command']}` in {run['seconds']} s. Ratios are mmbridge's speed over the peer's "
            "(> 1: mmbridge is faster), from this one run; `±` is half the samples' range over the median.", ""]
    head += [f"- **{k}**: {v}" for k, v in run["machine"]] + [""] + [f"> {n}" for n in notes]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # sections other benchmarks wrote into the file between their markers (bench_fusion_a.py --append) stay
    kept = re.findall(r"<!-- [\w.]+: begin -->.*?<!-- [\w.]+: end -->\n?", a.out.read_text(), re.S) \
        if a.out.exists() else []
    a.out.write_text("\n".join(head).rstrip() + "\n\n" + "\n\n".join([rep.summary()] + rep.parts) + "\n"
                     + "".join("\n" + k.rstrip("\n") + "\n" for k in kept))
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
