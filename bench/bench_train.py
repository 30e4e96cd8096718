"""Stage-1 training's speed: LLaVA-1.5's projector (mlp2x_gelu, 1024 -> d) trained through a Qwen2-0.5B-shaped frozen
LLM on cached features, mmbridge (`mmbridge train`) against PyTorch doing the same step, at the same thread count,
in one run.

    python3 bench/bench_train.py                      # Qwen2-0.5B's shape (about 10 minutes on 2 cores)
    python3 bench/bench_train.py --quick              # toy sizes, a smoke run
    python3 bench/bench_train.py --append bench/RESULTS.md

The model: a LlavaForConditionalGeneration with random bf16 weights (save_pretrained): a one-layer CLIP tower of
width 1024 on a 24 x 24 patch grid (576 image rows, LLaVA-1.5's; the tower runs once per image into the cache, so
its depth does not matter here), transformers' llava projector with GELU (LLaVA-1.5's mlp2x_gelu), and a Qwen2 of
Qwen2-0.5B's shape (24 layers, hidden 896, MLP 4864, 14 heads, 2 KV heads, vocabulary 151936). Samples: the image's
576 rows and a caption of --caption tokens (BLIP-LAION-CC-SBU's captions are about that long), the loss on the
caption.

A step, timed: --batch samples in micro-batches of --micro-batch, then clipping and AdamW. mmbridge: `mmbridge train
--max-steps S` in its own process on the cache a first, untimed run made; the rate is its own (the LLM's
positions per second over the steps, printed on its last progress line). PyTorch: the same step in this process,
f32 compute on an f32 copy of the bf16 weights (what mmbridge computes in), the LLM frozen (requires_grad off), the
head computed at the caption's positions only (not at every position, which transformers' forward would: that would
be 2 x 576 x 896 x 151936 FLOP a sample more), torch.optim.AdamW, clip_grad_norm_. The implementations take turns,
--reps times per thread count; medians, `±` half the range over the median.

FLOPs of a sample, counted from the shapes: the projector forward and backward (its weights' gradients, and the
second layer's input gradient); the LLM forward (projections and MLP 2 P x weights, attention 4 x P(P+1)/2 x heads x
head_dim), its backward (dX = dY W: the projections' FLOPs again; attention twice its forward: the gradients of the
scores and of q, k, v; the probabilities recomputed: once more), and the head forward and backward at the caption's
positions. The share of the fp32 FMA peak measured here (bench_gemm's probe). Memory: the peak RSS of mmbridge's
process (the mapped bf16 weights included), and the growth of PyTorch's peak RSS over its first step (its
activations and the autograd graph). The 558K estimate: the measured
seconds per sample times 558,128 samples (the tower's caching pass not included); the 64-core one scales this
machine's per-core rate at 2 threads to 64 cores, an extrapolation, not a measurement.
"""
import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lib import ROOT, append, bandwidth, fma_peak, load_now, machine_lines, med, spread, table  # noqa: E402

LOAD0 = load_now()
T0 = time.monotonic()
SIZES = {
    "qwen2-0.5b": dict(vis=1024, grid=24, hidden=896, inter=4864, layers=24, heads=14, kv=2, vocab=151936),
    "quick": dict(vis=64, grid=4, hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=512),
}
WORDS = "a photo of the cat dog on grass red blue small big tree sky water boat man woman car street".split()


def log(msg):
    print(f"[train {time.monotonic() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", "--smoke", action="store_true", dest="quick", help="toy sizes, 1 repetition, 1 thread")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each implementation (default 3)")
    ap.add_argument("--batch", type=int, default=4, help="samples a step (default 4)")
    ap.add_argument("--micro-batch", type=int, default=2, help="samples a micro-batch (default 2)")
    ap.add_argument("--steps", type=int, default=1, help="steps a timed run (default 1)")
    ap.add_argument("--caption", type=int, default=16, help="caption tokens a sample (default 16)")
    ap.add_argument("--build", default="build", help="the CMake Release build with mmbridge and bench_gemm")
    ap.add_argument("--dir", help="cache for the checkpoint and data (default BUILD/bench-cache)")
    ap.add_argument("--append", help="write the section into this markdown file (bench/RESULTS.md)")
    a = ap.parse_args()
    a.size = "quick" if a.quick else "qwen2-0.5b"
    a.s = SIZES[a.size]
    a.threads = [1] if a.quick else [int(t) for t in a.threads.split(",")]
    if a.quick:
        a.reps, a.caption = 1, 6
    a.dir = Path(a.dir or ROOT / a.build / "bench-cache")
    return a


# ---- the model and data ---------------------------------------------------------------------------------------

def checkpoint(a):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config
    s = a.s
    d = a.dir / f"train-{a.size}"
    if (d / "done").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<image>"]))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "eos_token": "<|endoftext|>"}))
    vis = CLIPVisionConfig(hidden_size=s["vis"], intermediate_size=s["vis"] * 4, num_hidden_layers=1,
                           num_attention_heads=max(1, s["vis"] // 64), image_size=s["grid"] * 14, patch_size=14)
    txt = Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=4096, tie_word_embeddings=True)
    cfg = LlavaConfig(vision_config=vis, text_config=txt, image_token_index=tok.token_to_id("<image>"),
                      projector_hidden_act="gelu", vision_feature_layer=-2)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    side = s["grid"] * 14
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(d)
    (d / "done").write_text("")
    return d


def data(a, n):
    import numpy as np
    from PIL import Image
    d = a.dir / f"train-data-{a.size}-{n}-{a.caption}"
    js = d / "data.json"
    if js.exists():
        return js
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    items = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(d / f"{i}.png")
        cap = " ".join(WORDS[int(k)] for k in rng.integers(0, len(WORDS), a.caption))
        items.append({"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\n"},
                                                            {"from": "gpt", "value": cap}]})
    js.write_text(json.dumps(items))
    return js


def caption_ids(d, js):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return [tok.encode(x["conversations"][1]["value"] + "\n", add_special_tokens=False).ids
            for x in json.loads(js.read_text())]


def flops_per_sample(s, rows, caption):
    """(total, parts) from the shapes: see the module's docstring."""
    d, I, L, H, KV, V = s["hidden"], s["inter"], s["layers"], s["heads"], s["kv"], s["vocab"]
    hd, P = d // H, rows + caption
    proj_fwd = 2 * rows * (s["vis"] * d + d * d)
    proj = 2 * proj_fwd + 2 * rows * d * d
    lin = 2 * P * (d * (H * hd + 2 * KV * hd) + H * hd * d + 3 * d * I) * L
    att = 4 * (P * (P + 1) // 2) * H * hd * L
    head = 2 * caption * d * V
    parts = dict(projector=proj, llm_forward=lin + att, llm_backward=lin + 3 * att, head=2 * head)
    return sum(parts.values()), parts


# ---- the implementations ----------------------------------------------------------------------------------------

STEP_RE = re.compile(r"step (\d+)/(\d+) \[.*?\] loss ([\d.]+) lr \S+ (\d+) tok/s")


def mmb_train(a, d, js, cache, out, th, steps):
    """One `mmbridge train` process: (positions/s, peak RSS MiB, last loss)."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    cmd = [ROOT / a.build / "mmbridge", "train", d, "--data", js, "-o", out, "--cache", cache, "--batch", a.batch,
           "--micro-batch", a.micro_batch, "--max-steps", steps, "--epochs", 1000, "--threads", th]
    import tempfile
    with tempfile.TemporaryFile("w+") as errf:
        p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=errf, text=True)
        hwm = 0  # VmHWM of the process after its exec (wait4's maxrss would count the forked Python's pages)
        while p.poll() is None:
            try:
                st = Path(f"/proc/{p.pid}/status").read_text()
                if re.search(r"^Name:\s+mmbridge$", st, re.M):  # after the exec
                    hwm = max(hwm, int(re.search(r"VmHWM:\s+(\d+) kB", st).group(1)))
            except (OSError, AttributeError):
                pass
            time.sleep(0.05)
        errf.seek(0)
        err = errf.read()
    if p.returncode:
        raise RuntimeError(f"mmbridge train exited {p.returncode}: {err.strip()[-400:]}")
    m = STEP_RE.findall(err.replace("\r", "\n"))
    if not m:
        raise RuntimeError(f"no progress line in mmbridge's stderr: {err.strip()[-300:]}")
    return float(m[-1][3]), hwm / 1024, float(m[-1][2])


class Torch:
    """The same step in PyTorch (f32 compute), on features its own tower made once."""

    def __init__(self, a, d, js):
        import torch
        from PIL import Image
        from transformers import CLIPImageProcessor, LlavaForConditionalGeneration
        self.a = a
        model = LlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
        proc = CLIPImageProcessor.from_pretrained(d)
        items = json.loads(js.read_text())
        with torch.no_grad():
            self.feats = []
            for it in items:
                pv = proc(images=Image.open(js.parent / it["image"]).convert("RGB"), return_tensors="pt")["pixel_values"]
                hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
                self.feats.append(hs[model.config.vision_feature_layer][0, 1:].clone())
        self.ids = caption_ids(d, js)
        self.lm, self.head = model.model.language_model, model.lm_head
        for p in list(self.lm.parameters()) + list(self.head.parameters()):
            p.requires_grad_(False)
        self.proj = model.model.multi_modal_projector
        self.opt = torch.optim.AdamW(self.proj.parameters(), lr=1e-3, weight_decay=0.0)
        self.n = len(items)

    def step(self, k):
        import torch
        a, emb = self.a, self.lm.embed_tokens
        idx = [(k * a.batch + i) % self.n for i in range(a.batch)]
        micros = [idx[i:i + a.micro_batch] for i in range(0, len(idx), a.micro_batch)]
        positions = 0
        for mb in micros:
            tokens = sum(len(self.ids[j]) for j in mb)
            for j in mb:
                v = self.proj(self.feats[j])
                ids = torch.tensor(self.ids[j])
                x = torch.cat([v, emb(ids)])[None]
                h = self.lm(inputs_embeds=x).last_hidden_state[0, len(v) - 1:-1]  # the caption's predictors
                loss = torch.nn.functional.cross_entropy(self.head(h), ids, reduction="sum") / tokens / len(micros)
                loss.backward()
                positions += x.shape[1]
        torch.nn.utils.clip_grad_norm_(self.proj.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        return positions

    def warm(self, th):
        """One untimed step; returns the growth of the process's peak RSS over it (MiB): a step's memory."""
        import torch
        torch.set_num_threads(th)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.step(0)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024

    def timed(self, th, steps):
        import torch
        torch.set_num_threads(th)
        t = time.perf_counter()
        pos = sum(self.step(k) for k in range(steps))
        return pos / (time.perf_counter() - t)


# ---- the run -----------------------------------------------------------------------------------------------------

def main():
    a = parse_args()
    for tgt in ("mmbridge", "bench_gemm", "bench_decoder"):
        if not (ROOT / a.build / tgt).exists():
            sys.exit(f"bench_train: {a.build}/{tgt} is missing: cmake --build {a.build}")
    import torch
    d = checkpoint(a)
    n = max(a.batch * a.steps, 4)
    js = data(a, n)
    cache = a.dir / f"train-cache-{a.size}-{n}-{a.caption}"
    rows = a.s["grid"] ** 2
    log("the feature cache (untimed)")
    mmb_train(a, d, js, cache, a.dir / "train-out", max(a.threads), 1)
    log("PyTorch: loading, its features")
    tp = Torch(a, d, js)
    torch_mem = tp.warm(max(a.threads))
    fl, parts = flops_per_sample(a.s, rows, a.caption)
    peak, res = {}, {}
    for th in a.threads:
        peak[th] = max(fma_peak(a.build, th), peak.get(th, 0))
        r = res.setdefault(th, {"mmbridge": [], "pytorch": [], "rss": []})
        for rep in range(a.reps):
            order = ["mmbridge", "pytorch"] if rep % 2 == 0 else ["pytorch", "mmbridge"]
            for impl in order:
                if impl == "mmbridge":
                    rate, rss, _ = mmb_train(a, d, js, cache, a.dir / "train-out", th, a.steps)
                    r["mmbridge"].append(rate)
                    r["rss"].append(rss)
                else:
                    r["pytorch"].append(tp.timed(th, a.steps))
            log(f"{th} thr, rep {rep + 1}/{a.reps}: mmbridge {r['mmbridge'][-1]:.0f} pos/s, "
                f"pytorch {r['pytorch'][-1]:.0f} pos/s")
        peak[th] = max(fma_peak(a.build, th), peak[th])
    bw = {th: bandwidth(a.build, th, a.quick) for th in a.threads}
    P = rows + a.caption
    lines = ["## Stage-1 training: LLaVA-1.5's projector through a Qwen2-0.5B-shaped frozen LLM", "",
             f"Generated by `python3 bench/bench_train.py{' --quick' if a.quick else ''}` in "
             f"{time.monotonic() - T0:.0f} s.", ""]
    lines += machine_lines(a.build, peak, LOAD0, bw)
    s = a.s
    lines += ["", f"LlavaForConditionalGeneration, random bf16 weights: the projector (transformers' llava, GELU: "
              f"LLaVA-1.5's mlp2x_gelu) {s['vis']} -> {s['hidden']}, a Qwen2 of {s['layers']} layers, hidden "
              f"{s['hidden']}, MLP {s['inter']}, {s['heads']} heads / {s['kv']} KV heads, vocabulary {s['vocab']}, "
              f"frozen. A sample: {rows} image rows (cached features) + {a.caption} caption tokens = {P} positions; "
              f"a step: {a.batch} samples in micro-batches of {a.micro_batch}, clipping, AdamW; {a.steps} step(s) a "
              f"timed run, median of {a.reps}. FLOPs a sample {fl * 1e-12:.3f} TFLOP (projector "
              f"{parts['projector'] * 1e-9:.1f} GFLOP, LLM forward {parts['llm_forward'] * 1e-12:.3f} T, its "
              f"backward {parts['llm_backward'] * 1e-12:.3f} T, head at the caption {parts['head'] * 1e-9:.1f} G). "
              f"mmbridge computes in f32 on the bf16 weights as mapped; PyTorch {torch.__version__.split('+')[0]} in "
              f"f32 on an f32 copy.", ""]
    rows_t = []
    for th in a.threads:
        r = res[th]
        for impl in ("mmbridge", "pytorch"):
            rate = med(r[impl])
            sps = rate / P
            gf = sps * fl
            rows_t.append([th, impl, spread(r[impl], "{:.0f}"), f"{sps:.3f}", f"{gf * 1e-9:.1f}",
                           f"{100 * gf / peak[th]:.0f} %", f"{med(r['mmbridge']) / med(r['pytorch']):.2f}x"
                           if impl == "mmbridge" else "",
                           f"{med(r['rss']):.0f} MiB peak RSS" if impl == "mmbridge"
                           else f"+{torch_mem:.0f} MiB over its first step"])
    lines.append(table(["threads", "implementation", "positions/s", "samples/s", "GFLOP/s", "% of FMA peak",
                        "mmbridge speed-up", "memory"], rows_t))
    th2 = max(a.threads)
    sps2 = med(res[th2]["mmbridge"]) / P
    per_core = sps2 * fl / th2
    days = 558128 / sps2 / 86400
    days64 = 558128 * fl / (per_core * 64) / 86400
    lines += ["", f"The 558K stage 1 (one epoch, the cache made): at {th2} thread(s) here {days:.1f} days "
              f"({sps2:.3f} samples/s); on 64 cores at this machine's per-core rate at {th2} threads "
              f"({per_core * 1e-9:.0f} GFLOP/s a core), {days64 * 24:.1f} hours (an extrapolation: memory bandwidth "
              f"and the LLM's weights in cache are not modelled). Memory a micro-batch: mmbridge keeps one sample's "
              f"activations at a time (the LLM's backward: lm/backward.c's floats per position x {P} positions); "
              f"its peak RSS includes the mapped bf16 weights."]
    section = "\n".join(lines)
    print(section)
    if a.append:
        append(a.append, "bench_train.py", section)
        log(f"wrote the section into {a.append}")


if __name__ == "__main__":
    main()
