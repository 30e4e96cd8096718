"""Fusion type A's decode cost: an IDEFICS (IdeficsForVisionText2Text) with IDEFICS-9B's layer ratio on random
weights, decoding with and without its gated cross-attention layers, in mmbridge and in PyTorch, in one run.

    python3 bench/bench_fusion_a.py                      # full size (25-40 minutes on 2 cores)
    python3 bench/bench_fusion_a.py --quick              # toy sizes, 1 repetition, 1 thread: a smoke run
    python3 bench/bench_fusion_a.py --append bench/RESULTS.md   # also writes its section into RESULTS.md

The model: 32 decoder layers with cross_layer_interval 4 (8 gated layers, before layers 0, 4, ..., 28), as in
IDEFICS-9B (LLaMA-7B + 8 gated layers); the width scaled down by 4 so that a run fits 2 cores: hidden 1024,
intermediate 2816 (LLaMA's own rule, 256 * ceil(8/3 * hidden / 256), which gives 11008 at 4096), 16 heads of
64, vocabulary 32000 + IDEFICS' 2 additional rows (LLaMA's tokenizer does not shrink with the width); the
perceiver resampler with IDEFICS-9B's 64 latents, depth 6, 16 heads of 96, over a 2-layer vision tower of
width 320 (9B: 1280 for 4096, the same ratio); the gates alpha_type "float", far from 0. "Without" is the
same decoder without the gated layers: its weights saved as a LlamaForCausalLM (model.*, the embedding and
head with the additional rows appended), which mmbridge runs as a text model and PyTorch as
LlamaForCausalLM. Both get the same prompt ids (the IDEFICS processor's, image markers included: ordinary
rows of the Llama's embedding); IDEFICS gets one image.

Timed: greedy decode of --decode tokens after the prompt (--ignore-eos), tokens/s of the decode steps only
(the prefill's and the first token's time left out: mmbridge's own timing on stderr, and the same split
in PyTorch's KV-cached loop). mmbridge runs as `mmbridge generate` (one process per run, its load not
timed); PyTorch runs in this process (torch.set_num_threads) on the saved checkpoints, IDEFICS with the
inputs and per-step arguments model.generate gives it: the image hidden states of the prefill passed back
as perceiver_embeddings, the last row of image_attention_mask. transformers' gated layers do not cache the
cross-attention's keys and values: every step projects the 64 visual tokens through k_proj and v_proj of
all 8 layers again (mmbridge computes them once per image). After one short warm-up of each, the four
implementations take turns, one run each per repetition (the order rotated), --reps repetitions per
(dtype, threads); medians, `±` half the range over the median.

The bound: decode reads every weight once per step, so tokens/s <= read bandwidth / bytes per token. The
bandwidth is bench_decoder's probe (build/bench_decoder --bandwidth: a streaming AVX2 read of 1 GiB on the
same threads, best of 5; the probe bench/RESULTS.md's decoder table uses), run before and after each
group of repetitions; the best of the run at a thread count is its bound. Bytes per token: the weights a step must read (the decoder
layers, final norm and head; with xattn also the gated layers' q, o, MLP, norms and gates, but not k_proj
and v_proj, whose product is computed once per image), plus the visual keys and values (f32) and the
self-attention KV cache (f32) at the mean context. The same bound for every implementation of a model.
"""
import argparse
import hashlib
import json
import os
import re
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_lib  # noqa: E402
from bench_lib import agree, med, spread, table  # noqa: E402
T0 = time.monotonic()
try:
    LOAD0 = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
except OSError:
    LOAD0 = "?"
PROMPT = "User:<image>Describe this image.\nAssistant:"

# hidden, intermediate, heads, layers, interval, vocab, vision width, vision layers, image size,
# perceiver latents, depth, heads, head_dim
SIZES = {
    "9b-ratio": dict(hidden=1024, intermediate=2816, heads=16, layers=32, interval=4, vocab=32000, vis=320,
                     vis_layers=2, image=224, latents=64, p_depth=6, p_heads=16, p_head_dim=96),
    "quick": dict(hidden=64, intermediate=176, heads=4, layers=8, interval=4, vocab=512, vis=32, vis_layers=1,
                  image=28, latents=8, p_depth=1, p_heads=2, p_head_dim=16),
}
IMPLS = ["mmbridge xattn", "mmbridge plain", "pytorch xattn", "pytorch plain"]


def log(msg):
    print(f"[fusion_a {time.monotonic() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", "--smoke", action="store_true", dest="quick",
                    help="toy sizes, 1 repetition, 1 thread, f32 only: a smoke run (well under a minute)")
    ap.add_argument("--size", choices=sorted(SIZES), help="the model's shape (default 9b-ratio; --quick: quick)")
    for k in ("hidden", "intermediate", "heads", "layers", "interval", "vocab", "vis", "latents"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"override the size's {k}")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each implementation (default 5)")
    ap.add_argument("--decode", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--dtypes", default="f32,bf16", help="weight dtypes (default f32,bf16)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="which of: " + ", ".join(IMPLS))
    ap.add_argument("--build", default="build", help="the CMake Release build with mmbridge and bench_decoder")
    ap.add_argument("--dir", help="cache for the checkpoints (default BUILD/bench-cache)")
    ap.add_argument("--json", help="also write one JSON record per figure to this file")
    ap.add_argument("--append", help="write the section into this markdown file (bench/RESULTS.md), replacing "
                    "the one an earlier run left there")
    a = ap.parse_args()
    if a.quick:
        a.size = a.size or "quick"
        a.threads, a.reps, a.decode, a.dtypes = "1", 1, min(a.decode, 8), "f32"
    a.size = a.size or "9b-ratio"
    a.shape = dict(SIZES[a.size])
    for k in ("hidden", "intermediate", "heads", "layers", "interval", "vocab", "vis", "latents"):
        if getattr(a, k) is not None:
            a.shape[k] = getattr(a, k)
    a.threads = [int(t) for t in a.threads.split(",")]
    a.dtypes = a.dtypes.split(",")
    a.impls = a.impls.split(",")
    if set(a.impls) - set(IMPLS) or set(a.dtypes) - {"f32", "bf16"} or a.reps < 1 or a.decode < 2:
        ap.error("bad --impls, --dtypes, --reps or --decode")
    a.dir = Path(a.dir or Path(a.build) / "bench-cache")
    if a.quick and a.append and Path(a.append).resolve() == (ROOT / "bench" / "RESULTS.md").resolve():
        ap.error("--quick does not write into bench/RESULTS.md")
    return a


# ---- the checkpoints ----------------------------------------------------------------------------------------

def tokenizer(d, vocab):
    """A byte-level BPE whose base vocabulary is exactly `vocab` ids (trained merges, then unused filler
    tokens), IDEFICS' <fake_token_around_image> and <image> after it (the additional rows), BOS added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["User: Describe this image. Assistant: a cat on a mat.", "What is in the picture? Two dogs."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(vocab, 300), show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    j = json.loads(tok.to_str())
    v = j["model"]["vocab"]
    for i in range(len(v), vocab):
        v[f"<unused{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(j))
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    tok.add_tokens([AddedToken("<fake_token_around_image>", special=True, normalized=False),
                    AddedToken("<image>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def idefics_config(s):
    from transformers import IdeficsConfig
    return IdeficsConfig(
        hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], vocab_size=s["vocab"], additional_vocab_size=2,
        cross_layer_interval=s["interval"], alpha_type="float", qk_layer_norms=False, use_resampler=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        vision_config=dict(embed_dim=s["vis"], image_size=s["image"], patch_size=14, num_hidden_layers=s["vis_layers"],
                           num_attention_heads=max(1, s["vis"] // 64), intermediate_size=4 * s["vis"]),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=s["latents"], resampler_depth=s["p_depth"],
                              resampler_n_heads=s["p_heads"], resampler_head_dim=s["p_head_dim"]))


def llama_config(c):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_attention_heads, vocab_size=c.vocab_size + c.additional_vocab_size,
                       rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                       rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def checkpoints(a):
    """{dtype: (idefics dir, llama dir)}, made once per shape and kept in --dir; and the image."""
    import torch
    tag = hashlib.sha1(json.dumps(a.shape, sort_keys=True).encode()).hexdigest()[:8]
    dirs = {dt: (a.dir / f"fusion-a-{a.size}-{tag}-{dt}" / "idefics", a.dir / f"fusion-a-{a.size}-{tag}-{dt}" / "llama")
            for dt in ("f32", "bf16")}
    img = a.dir / f"fusion-a-image-{a.shape['image']}.png"
    if not img.exists():
        import numpy as np
        from PIL import Image
        a.dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.RandomState(5).randint(0, 256, (a.shape["image"] + 9, a.shape["image"] + 3, 3),
                                                         dtype=np.uint8)).save(img)
    todo = [dt for dt in a.dtypes if not all((d / "done").exists() for d in dirs[dt])]
    if not todo:
        return dirs, img
    from safetensors.torch import save_file
    from transformers import IdeficsForVisionText2Text, IdeficsImageProcessor
    log(f"making the {a.size} checkpoints ({', '.join(todo)}) in {a.dir}")
    cfg = idefics_config(a.shape)
    torch.manual_seed(0)
    model = IdeficsForVisionText2Text(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight random; the gates far from 0 (tanh ~ 0.5-0.9) so that the image matters
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.copy_((torch.rand(p.shape, generator=g) + 0.6) * torch.where(
                    torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0))
            elif p.dim() == 1 and name.endswith(".weight"):  # norms
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif "latents" in name or "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:  # unit gain: x W^T keeps the scale of x
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model.generation_config.eos_token_id = None
    lcfg = llama_config(cfg)
    for dt in sorted(todo, key=("f32", "bf16").index):  # f32 first: bf16 is its rounding
        di, dl = dirs[dt]
        model.to(torch.float32 if dt == "f32" else torch.bfloat16).save_pretrained(di)
        # the plain Llama: the decoder's tensors, the additional rows appended to the embedding and head
        sd = model.state_dict()
        lsd = {k: v.contiguous() for k, v in sd.items() if k.startswith("model.layers.") or k == "model.norm.weight"}
        lsd["model.embed_tokens.weight"] = torch.cat([sd["model.embed_tokens.weight"],
                                                      sd["model.embed_tokens.additional_embedding.weight"]])
        lsd["lm_head.weight"] = torch.cat([sd["lm_head.weight"], sd["lm_head.additional_fc.weight"]])
        dl.mkdir(parents=True, exist_ok=True)
        save_file(lsd, str(dl / "model.safetensors"), metadata={"format": "pt"})
        lcfg.dtype = "float32" if dt == "f32" else "bfloat16"
        lcfg.save_pretrained(dl)
        tokenizer(di, a.shape["vocab"])
        tokenizer(dl, a.shape["vocab"])
        IdeficsImageProcessor(image_size=a.shape["image"]).save_pretrained(di)
        for d in (di, dl):
            (d / "done").write_text("")
    del model
    return dirs, img


def processor(d, image_size):
    from transformers import IdeficsImageProcessor, IdeficsProcessor, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<unk>")
    return IdeficsProcessor(image_processor=IdeficsImageProcessor(image_size=image_size), tokenizer=tok,
                            image_size=image_size)


# ---- bytes per token --------------------------------------------------------------------------------------

def tensors(d):
    """{name: (dtype, shape)} of every safetensors file of directory d (headers only)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h = json.loads(fh.read(n))
        out.update({k: (v["dtype"], v["shape"]) for k, v in h.items() if k != "__metadata__"})
    return out


def nbytes(dtype, shape):
    n = {"F32": 4, "BF16": 2, "F16": 2}[dtype]
    for s in shape:
        n *= s
    return n


def bytes_per_token(d, shape, prompt_len, decode, xattn):
    """(bytes one decode step must read, its parts): the weights read per token (not the embedding: one row;
    not the gated layers' k_proj/v_proj: their product is per image), the visual K/V (f32) and the
    self-attention KV cache (f32) at the mean context."""
    t = tensors(d)
    weights = sum(nbytes(*v) for k, v in t.items()
                  if (k.startswith("model.layers.") or k == "model.norm.weight" or k.startswith("lm_head."))
                  or (xattn and k.startswith("model.gated_cross_attn_layers.")
                      and not re.search(r"\.(k_proj|v_proj)\.", k)))
    kv_proj = sum(nbytes(*v) for k, v in t.items()
                  if k.startswith("model.gated_cross_attn_layers.") and re.search(r"\.(k_proj|v_proj)\.", k))
    n_gated = shape["layers"] // shape["interval"] + (shape["layers"] % shape["interval"] > 0)
    visual = 2 * n_gated * shape["latents"] * shape["hidden"] * 4 if xattn else 0
    ctx_mean = prompt_len + 0.5 * decode
    kv = 2 * 4 * shape["layers"] * shape["hidden"] * ctx_mean
    return weights + visual + kv, dict(weights=weights, visual_kv=visual, self_kv=kv, kv_proj_weights=kv_proj,
                                       n_gated=n_gated)


# ---- the runs ---------------------------------------------------------------------------------------------

DECODE_RE = re.compile(r"prefill: (\d+) tokens in ([\d.]+) s .*decode: (\d+) tokens in ([\d.]+) s")


def mmbridge(a, args, threads, n):
    """One `mmbridge generate` run: (prefill tok/s, decode tok/s, the generated ids, prompt positions)."""
    cmd = [str(ROOT / a.build / "mmbridge"), "generate", *map(str, args), "-n", str(n), "--ignore-eos",
           "--print-ids", "--threads", str(threads)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate()
    if p.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}: {err.strip()[-500:]}")
    m = DECODE_RE.search(err)
    if not m:
        raise RuntimeError(f"no timings in mmbridge's stderr: {err.strip()[-300:]}")
    npre, tpre, ndec, tdec = int(m.group(1)), float(m.group(2)), int(m.group(3)), float(m.group(4))
    tpre, tdec = max(tpre, 5e-4), max(tdec, 5e-4)  # printed to the ms: a toy model (--quick) can show 0.000
    return npre / tpre, ndec / tdec, [int(x) for x in out.split()], npre


class Torch:
    """The PyTorch side: both models of one dtype, loaded once, timed in this process."""

    def __init__(self, a, dirs, img, dt):
        import torch
        from PIL import Image
        from transformers import IdeficsForVisionText2Text, LlamaForCausalLM
        self.torch = torch
        tdt = torch.float32 if dt == "f32" else torch.bfloat16
        di, dl = dirs
        self.idefics = IdeficsForVisionText2Text.from_pretrained(di, dtype=tdt).eval() \
            if {"pytorch xattn"} & set(a.impls) else None
        self.llama = LlamaForCausalLM.from_pretrained(dl, dtype=tdt).eval() \
            if {"pytorch plain"} & set(a.impls) else None
        proc = processor(di, a.shape["image"])
        text = PROMPT.split("<image>")
        self.enc = proc(text=[[text[0], Image.open(img).convert("RGB"), text[1]]], return_tensors="pt")
        self.ids = self.enc["input_ids"]

    def _loop(self, first, step, n):
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = first()
            t1 = time.perf_counter()
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            toks = [int(tok)]
            for _ in range(n - 1):
                out = step(tok, pkv, out)
                pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                toks.append(int(tok))
            t2 = time.perf_counter()
        return self.ids.shape[1] / (t1 - t0), (n - 1) / (t2 - t1), toks, self.ids.shape[1]

    def run_idefics(self, n):
        m, e = self.idefics, self.enc
        last = e["image_attention_mask"][:, -1:]
        state = {}

        def first():
            out = m(input_ids=e["input_ids"], attention_mask=e["attention_mask"], pixel_values=e["pixel_values"],
                    image_attention_mask=e["image_attention_mask"], use_cache=True)
            state["img"] = out.image_hidden_states  # what generate passes back: perceiver_embeddings
            return out

        def step(tok, pkv, out):
            return m(input_ids=tok, past_key_values=pkv, perceiver_embeddings=state["img"],
                     image_attention_mask=last, use_cache=True)
        return self._loop(first, step, n)

    def run_llama(self, n):
        m = self.llama
        return self._loop(lambda: m(input_ids=self.ids, use_cache=True),
                          lambda tok, pkv, out: m(input_ids=tok, past_key_values=pkv, use_cache=True), n)

    def attribution(self, n):
        """One more (untimed) IDEFICS decode with forward hooks: the shares of the decode steps' time spent
        in the gated layers and, within them, in k_proj/v_proj of the visual tokens (the recomputed K/V)."""
        torch, m = self.torch, self.idefics
        acc = {"gated": 0.0, "kv": 0.0, "on": False}
        t_in = {}

        def pre(key):
            def f(mod, args):
                t_in[id(mod)] = time.perf_counter()
            return f

        def post(key):
            def f(mod, args, out):
                if acc["on"]:
                    acc[key] += time.perf_counter() - t_in[id(mod)]
            return f
        hs = []
        for blk in m.model.gated_cross_attn_layers:
            hs += [blk.register_forward_pre_hook(pre("gated")), blk.register_forward_hook(post("gated"))]
            for lin in (blk.cross_attn.k_proj, blk.cross_attn.v_proj):
                hs += [lin.register_forward_pre_hook(pre("kv")), lin.register_forward_hook(post("kv"))]
        e, last = self.enc, self.enc["image_attention_mask"][:, -1:]
        try:
            with torch.inference_mode():
                out = m(input_ids=e["input_ids"], attention_mask=e["attention_mask"], pixel_values=e["pixel_values"],
                        image_attention_mask=e["image_attention_mask"], use_cache=True)
                img, pkv, tok = out.image_hidden_states, out.past_key_values, out.logits[:, -1:].argmax(-1)
                acc["on"] = True
                t0 = time.perf_counter()
                for _ in range(n - 1):
                    out = m(input_ids=tok, past_key_values=pkv, perceiver_embeddings=img, image_attention_mask=last,
                            use_cache=True)
                    pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                total = time.perf_counter() - t0
        finally:
            for h in hs:
                h.remove()
        return {"gated_share": acc["gated"] / total, "kv_share": acc["kv"] / total, "step_s": total / (n - 1)}

    def generate_ids(self, n):
        """model.generate's greedy ids (to check that the loop is what generate does)."""
        with self.torch.inference_mode():
            out = self.idefics.generate(**self.enc, max_new_tokens=n, do_sample=False, eos_token_id=None)
        return out[0, self.ids.shape[1]:].tolist()


def bandwidth(a, threads):
    """bench_decoder's read-bandwidth probe at each thread count: {threads: bytes/s}."""
    cmd = [str(ROOT / a.build / "bench_decoder"), "--bandwidth", "--threads", ",".join(map(str, threads))]
    if a.quick:
        cmd.append("--quick")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {int(m.group(1)): float(m.group(2)) * 1e9 for m in re.finditer(r"(\d+) thread\(s\): ([\d.]+) GB/s", out)}


def report(a, res, meta):
    rows = []
    for (dt, th), r in res.items():
        bw, bx, bp = r["bw"], r["bytes"]["xattn"], r["bytes"]["plain"]
        ux, up = bw / bx, bw / bp
        rows.append([dt, th, f"bandwidth bound ({bw * 1e-9:.1f} GB/s)", f"{ux:.2f}", "100 %", f"{up:.2f}", "100 %",
                     f"{bx / bp:.3f}x (bytes)", "", ""])
        for impl in ("mmbridge", "pytorch"):
            x, p = r["runs"].get(f"{impl} xattn"), r["runs"].get(f"{impl} plain")
            if not x and not p:
                continue
            over = f"{med(p['decode']) / med(x['decode']):.3f}x" if x and p else ""
            vs, where = "", ""
            if impl == "pytorch":
                mx, mp = r["runs"].get("mmbridge xattn"), r["runs"].get("mmbridge plain")
                vs = " / ".join(f"**{med(m['decode']) / med(q['decode']):.2f}x**" if m and q else "n/a"
                                for m, q in ((mx, x), (mp, p)))
                if r.get("attr"):
                    where = (f"gated layers {100 * r['attr']['gated_share']:.0f} %, of which k_proj/v_proj "
                             f"{100 * r['attr']['kv_share']:.0f} %")
            name = "mmbridge" if impl == "mmbridge" else f"pytorch {meta['torch']}"
            rows.append([dt, th, name, spread(x["decode"]) if x else "n/a",
                         f"{100 * med(x['decode']) / ux:.0f} %" if x else "", spread(p["decode"]) if p else "n/a",
                         f"{100 * med(p['decode']) / up:.0f} %" if p else "", over, vs, where])
    r0 = next(iter(res.values()))
    b = r0["bytes"]["parts_x"]
    s = a.shape
    per_dt = {}
    for (dt, th), r in res.items():
        per_dt[dt] = r["bytes"]
    byte_txt = "; ".join(f"{dt}: {v['plain'] * 1e-6:.0f} MB without, {v['xattn'] * 1e-6:.0f} MB with "
                         f"(of which {v['parts_x']['visual_kv'] * 1e-6:.1f} MB the visual K/V)"
                         for dt, v in per_dt.items())
    kvw = "; ".join(f"{v['parts_x']['kv_proj_weights'] * 1e-6:.1f} MB at {dt}" for dt, v in per_dt.items())
    agreements = "; ".join(f"{dt} {th} thr: " + ", ".join(f"{k} {v}" for k, v in r["agree"].items())
                           for (dt, th), r in res.items())
    prefill = "; ".join(f"{dt} {th} thr: " + ", ".join(
        f"{i} {med(q['prefill']):.1f}" for i, q in r["runs"].items()) for (dt, th), r in res.items())
    text = [
        f"IdeficsForVisionText2Text on random weights at IDEFICS-9B's layer ratio: {s['layers']} decoder layers, "
        f"cross_layer_interval {s['interval']} ({b['n_gated']} gated cross-attention layers), the width scaled down: "
        f"hidden {s['hidden']}, MLP {s['intermediate']}, {s['heads']} heads, vocabulary {s['vocab']} + 2; "
        f"perceiver resampler with {s['latents']} latents (depth {s['p_depth']}) over a {s['vis_layers']}-layer, "
        f"{s['vis']}-wide vision tower; one {s['image']}x{s['image']} image. Without: the same decoder's weights "
        "saved as a LlamaForCausalLM (mmbridge runs it as a text model), the same prompt ids. Greedy decode of "
        f"{a.decode} tokens after the {r0['prompt_len']}-position prompt (--ignore-eos); tokens/s of the "
        f"{a.decode - 1} decode steps, median of {a.reps} runs; the four implementations take turns, one run "
        "each per repetition (the order rotated); `±` is half the range over the median. % of bound: of the "
        "read bandwidth (bench_decoder --bandwidth, the best of the probes run before and after each group of "
        "repetitions at that thread count) over "
        f"the bytes a step must read ({byte_txt}; self-attention KV at the mean context included). overhead: "
        "seconds per token with the gated layers over without (the bound's row: the bytes' ratio, its floor). "
        "mmbridge speed-up: mmbridge's tokens/s over PyTorch's, with / without. PyTorch runs in the benchmark's "
        "process with torch.set_num_threads; where its step goes: a separate run with forward hooks.",
        "",
        table(["dtype", "threads", "implementation", "with xattn tok/s", "% of bound", "without tok/s",
               "% of bound", "overhead", "mmbridge speed-up", "where PyTorch's step goes"], rows),
        "",
        "transformers' IDEFICS does not cache the cross-attention's keys and values: IdeficsGatedCrossAttentionLayer "
        "is called with past_key_values=None and IdeficsAttention projects key_value_states through k_proj and "
        f"v_proj on every call, so each decode step reads {b['n_gated']} x 2 ({s['vis']} x {s['hidden']}) weights "
        f"({kvw}) and spends {2 * 2 * b['n_gated'] * s['latents'] * s['vis'] * s['hidden'] * 1e-6:.0f} MFLOP on "
        f"{s['latents']} visual tokens, which mmbridge does once per image (it keeps the {b['visual_kv'] * 1e-6:.1f} "
        "MB of visual K/V, f32, head-major, and reads them each step). The same 1-image prompt and the image "
        "hidden states of the prefill are passed back as perceiver_embeddings, as model.generate does (checked: "
        "the loop's first ids equal generate's).",
        "",
        f"Greedy ids identical to mmbridge's, of {a.decode} (leading): {agreements} (with vs without: "
        "mmbridge's two models, the gated layers change the output; at bf16 PyTorch rounds every activation to "
        "bf16 and mmbridge keeps them f32, so on random weights their greedy paths part early). Prefill tokens/s (the image's tower and "
        f"perceiver included with xattn): {prefill}.",
    ]
    return "\n".join(text)


def machine_lines(a, bws):
    return bench_lib.machine_lines(a.build, {}, LOAD0, bws)


def append(path, section):
    bench_lib.append(path, "bench_fusion_a.py", section)


def main():
    a = parse_args()
    for tgt in ("mmbridge", "bench_decoder"):
        if not (ROOT / a.build / tgt).exists():
            sys.exit(f"bench_fusion_a: {a.build}/{tgt} is missing: cmake -S . -B {a.build} -DCMAKE_BUILD_TYPE=Release "
                     f"&& cmake --build {a.build} -j2")
    import torch
    dirs, img = checkpoints(a)
    jf = open(a.json, "w") if a.json else None
    res, bws = {}, {}
    n = a.decode
    for dt in a.dtypes:
        di, dl = dirs[dt]
        log(f"{dt}: loading the PyTorch models")
        tp = Torch(a, dirs[dt], img, dt)
        ids = tp.ids[0].tolist()
        prompt_len = len(ids)
        bx, parts_x = bytes_per_token(di, a.shape, prompt_len, n, True)
        bp, parts_p = bytes_per_token(dl, a.shape, prompt_len, n, False)
        runners = {
            "mmbridge xattn": lambda th, k: mmbridge(a, [di, "--raw", "--prompt", PROMPT, "--image", img], th, k),
            "mmbridge plain": lambda th, k: mmbridge(a, [dl, "--ids", ",".join(map(str, ids))], th, k),
            "pytorch xattn": lambda th, k: tp.run_idefics(k),
            "pytorch plain": lambda th, k: tp.run_llama(k),
        }
        impls = [i for i in IMPLS if i in a.impls]
        for th in a.threads:
            torch.set_num_threads(th)
            bw = bandwidth(a, [th])[th]
            log(f"{dt}, {th} thread(s): {bw * 1e-9:.1f} GB/s read; warm-up")
            runs = {i: {"prefill": [], "decode": [], "ids": None} for i in impls}
            for i in impls:  # warm-up: the page cache, torch's first-call allocations; and the checks
                npos = runners[i](th, 4)[3]
                if npos != prompt_len:
                    raise RuntimeError(f"{i}: the prompt is {npos} positions, the processor's is {prompt_len}")
            if "pytorch xattn" in impls and th == a.threads[0]:
                loop, gen = tp.run_idefics(4)[2], tp.generate_ids(4)
                if loop != gen:
                    raise RuntimeError(f"the PyTorch loop's ids {loop} are not model.generate's {gen}")
            for r in range(a.reps):
                order = impls[r % len(impls):] + impls[:r % len(impls)]
                for i in order:
                    pre, dec, out_ids, _ = runners[i](th, n)
                    runs[i]["prefill"].append(pre)
                    runs[i]["decode"].append(dec)
                    runs[i]["ids"] = out_ids
                log(f"{dt}, {th} thr, rep {r + 1}/{a.reps}: " +
                    ", ".join(f"{i} {runs[i]['decode'][-1]:.2f}" for i in impls) + " tok/s")
            attr = tp.attribution(min(n, 16)) if "pytorch xattn" in impls else None
            bw = max(bw, bandwidth(a, [th])[th])
            bws[th] = max(bws.get(th, 0), bw)  # the bound: the best probe of the whole run at this thread count
            ag = {}
            for kind in ("xattn", "plain"):
                m, p = runs.get(f"mmbridge {kind}"), runs.get(f"pytorch {kind}")
                if m and p:
                    ag[f"pytorch {kind}"] = agree(m["ids"], p["ids"])
            if "mmbridge xattn" in runs and "mmbridge plain" in runs:  # the gated layers change the output
                ag["with vs without"] = agree(runs["mmbridge xattn"]["ids"], runs["mmbridge plain"]["ids"])
            res[(dt, th)] = dict(probe=bw, runs=runs, agree=ag, prompt_len=prompt_len, dtype=dt, attr=attr,
                                 bytes=dict(xattn=bx, plain=bp, parts_x=parts_x, parts_p=parts_p))
        del tp
    for (dt, th), r in res.items():
        r["bw"] = bws[th]
        for i, rr in r["runs"].items() if jf else ():
            b = r["bytes"]["xattn" if i.endswith("xattn") else "plain"]
            jf.write(json.dumps({"bench": "fusion_a", "dtype": dt, "threads": th, "impl": i,
                                 "decode_tps": med(rr["decode"]), "decode_tps_all": rr["decode"],
                                 "prefill_tps": med(rr["prefill"]), "bound_tps": r["bw"] / b,
                                 "read_gbps": r["bw"] * 1e-9, "probe_gbps": r["probe"] * 1e-9, "bytes_per_token": b,
                                 "attribution": r["attr"] if i == "pytorch xattn" else None, "shape": a.shape,
                                 "decode": n, "prompt": r["prompt_len"]}) + "\n")
    if jf:
        jf.close()
    meta = {"torch": torch.__version__.split("+")[0]}
    body = report(a, res, meta)
    cmd = "python3 " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    head = ["## Fusion type A (IDEFICS): decode with and without the gated cross-attention layers", "",
            f"Generated by `{cmd}` in {time.monotonic() - T0:.0f} s"
            + (" (--quick: toy sizes, a smoke run, not a measurement)" if a.quick else "") + ".", ""]
    section = "\n".join(head + machine_lines(a, bws) + ["", body])
    print(section)
    if a.append:
        append(a.append, section)
        log(f"wrote the section into {a.append}")


if __name__ == "__main__":
    main()
