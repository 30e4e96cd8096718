"""Llama 3.2 Vision (MllamaForConditionalGeneration) at Llama-3.2-11B-Vision's widths on random bf16 weights: the
vision encode of one 4-tile image (s/image) and greedy decode (tokens/s), in mmbridge and in PyTorch, in one run.

    python3 bench/bench_mllama.py                      # full widths, reduced depth (about 25 minutes on 2 cores)
    python3 bench/bench_mllama.py --quick              # toy sizes, 1 repetition, 1 thread: a smoke run
    python3 bench/bench_mllama.py --append bench/RESULTS.md   # also writes its section into RESULTS.md

The model: every width of Llama-3.2-11B-Vision, fewer layers. Vision: hidden 1280, MLP 5120, 16 heads, image
560, patch 14, max_num_tiles 4, vision_output_dim 7680 (the final state and 5 intermediate layers), with 8 local
+ 2 global layers instead of 32 + 8 (the 4:1 ratio kept) and intermediate_layers_indices [0, 1, 3, 5, 7] (the
11B's [3, 7, 15, 23, 30] at the same fractions of the depth); what bounds the tower's depth is time, not memory
(the 11B's 18.6 TFLOP an image would take minutes a run at these 2 cores' 0.2 TFLOP/s). Text: hidden 4096, MLP
14336, 32 heads, 8 KV heads, vocabulary 128256 (+ 8 embedding rows, <|image|> = 128256), llama3 RoPE (theta
500000, factor 8), with 20 layers instead of 40 and cross_attention_layers [3, 8, 13, 18] (the 11B's [3, 8, ...,
38], one in five): 13.5 GB of bf16 weights, which PyTorch and mmbridge both map from the same files (the same
page cache; the 11B's 21 GB does not fit these 24 GB machines with anything else). Random weights (unit-gain
matrices, the gates far from 0, so that the image matters), saved in bf16 by save_pretrained (2 GB shards)
with a MllamaProcessor; one random 1120x1120 image (2x2 tiles, every tile real).

Vision, timed: mmbridge as `mmbridge encode` (one process per run; its own timing of the batch: the image's
load, the processor, the tower and the projector; the process's start-up and the output's write not timed);
PyTorch `model.model.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)` then
`multi_modal_projector`, as MllamaModel.forward calls them, on the processor's pixel_values, with fp32 compute
(a float32 copy of the bf16 weights: what mmbridge computes in). PyTorch with bf16 compute is too slow on a CPU
without AVX512-BF16 to run the whole tower each repetition (its bf16 GEMM runs at a few GFLOP/s here): one
local encoder layer is timed on the real hidden states and the projector on a sixteenth of its rows, once per
thread count, and the tower's time is estimated from them (layers x the layer's time + 16 x the slice's).
FLOPs per image from the shapes: the patch convolution, each layer's projections and MLP and its attention
over all 4 x 1608 (padded) positions (local layers attend across tiles), and the projector over the 4 x 1601
real positions; the share of the fp32 FMA peak measured here (bench_gemm's probe, 12 independent FMA chains
per thread, the best probe of the run at each thread count).

Decode, timed: greedy decode of --decode tokens after the prompt "<|image|>Describe this image." (--raw: the
processor's BOS before and after the image marker), --ignore-eos; tokens/s of the decode steps only.
mmbridge: `mmbridge generate` (one process per run; each run encodes the image again, its K/V cached), its own
split on stderr. PyTorch: `model.generate` with bf16 weights and the same inputs; so that each repetition does
not redo the image (the bf16 tower would take minutes), the prompt but its last token is prefilled once, with
cross_attention_states from the fp32 tower, and each repetition's generate starts from a copy of that cache
(the cross-attention layers' K/V in it): generate runs the last prompt token and the decode steps; the decode
steps are timed with a logits processor (the time from the first token's scores to the last's). --quick
checks that this gives the ids a plain generate with pixel_values gives.

The bound: decode reads every weight a step needs once per step, so tokens/s <= read bandwidth / bytes per
token. The bandwidth: bench_decoder --bandwidth (a streaming AVX2 read of 1 GiB on the same threads, best of
5), before and after each group of repetitions; the best of the run at a thread count is its bound. Bytes per
token: the text layers (the cross-attention layers' q_proj, o_proj, MLP, norms and gates, not k_proj and
v_proj, whose product is per image), the final norm and lm_head, as stored (bf16); plus the cross-attention
K/V of all 4 tiles (f32, as mmbridge keeps them) and the self-attention KV cache (f32) at the mean context.

The implementations take turns, one run each per repetition, the order rotated; --reps repetitions per
thread count; medians, `±` half the range over the median.
"""
import argparse
import copy
import json
import os
import re
import shlex
import struct
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_lib  # noqa: E402
from bench_lib import agree, kernel_isa, med, run, spread, table  # noqa: E402
T0 = time.monotonic()
try:
    LOAD0 = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
except OSError:
    LOAD0 = "?"
PROMPT = "<|image|>Describe this image."

# vision: hidden, MLP, heads, local layers, global layers, intermediate indices, tile size, tiles; the image's
# side; text: hidden, MLP, heads, KV heads, layers, cross-attention layers, vocabulary
SIZES = {
    "11b-width": dict(v_hidden=1280, v_inter=5120, v_heads=16, v_local=8, v_global=2, v_idx=[0, 1, 3, 5, 7],
                      tile=560, tiles=4, image=1120, hidden=4096, inter=14336, heads=32, kv_heads=8, layers=20,
                      vocab=128256),
    "quick": dict(v_hidden=32, v_inter=64, v_heads=4, v_local=2, v_global=1, v_idx=[0, 1], tile=28, tiles=4,
                  image=56, hidden=64, inter=128, heads=4, kv_heads=2, layers=10, vocab=512),
}
PATCH = 14
IMPLS = ["mmbridge encode", "pytorch fp32 vision", "mmbridge generate", "pytorch generate"]


def log(msg):
    print(f"[mllama {time.monotonic() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", "--smoke", action="store_true", dest="quick",
                    help="toy sizes, 1 repetition, 1 thread: a smoke run (well under a minute)")
    ap.add_argument("--size", choices=sorted(SIZES), help="the model's shape (default 11b-width; --quick: quick)")
    ap.add_argument("--vision-layers", help="LOCAL,GLOBAL vision layers (override; the indices stay the size's)")
    ap.add_argument("--text-layers", type=int, help="text layers (override; the cross-attention layers: 3, 8, ... below it)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each implementation (default 3)")
    ap.add_argument("--decode", type=int, default=16, help="tokens generated per run (default 16)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="which of: " + ", ".join(IMPLS))
    ap.add_argument("--no-bf16-layer", action="store_true", help="skip the PyTorch bf16-compute layer probe")
    ap.add_argument("--build", default="build", help="the CMake Release build with mmbridge, bench_decoder, bench_gemm")
    ap.add_argument("--dir", help="cache for the checkpoint (default BUILD/bench-cache)")
    ap.add_argument("--json", help="also write one JSON record per figure to this file")
    ap.add_argument("--append", help="write the section into this markdown file (bench/RESULTS.md), replacing "
                    "the one an earlier run left there")
    a = ap.parse_args()
    if a.quick:
        a.size = a.size or "quick"
        a.threads, a.reps, a.decode = "1", 1, min(a.decode, 8)
    a.size = a.size or "11b-width"
    a.shape = copy.deepcopy(SIZES[a.size])
    if a.vision_layers:
        a.shape["v_local"], a.shape["v_global"] = map(int, a.vision_layers.split(","))
    if a.text_layers:
        a.shape["layers"] = a.text_layers
    a.shape["cross"] = list(range(3, a.shape["layers"], 5))  # the 11B's [3, 8, ..., 38]: one in five
    a.threads = [int(t) for t in a.threads.split(",")]
    a.impls = a.impls.split(",")
    if set(a.impls) - set(IMPLS) or a.reps < 1 or a.decode < 2:
        ap.error("bad --impls, --reps or --decode")
    if max(a.shape["v_idx"]) >= a.shape["v_local"] or not a.shape["cross"]:
        ap.error("the intermediate indices or cross-attention layers do not fit the layer counts")
    a.dir = Path(a.dir or Path(a.build) / "bench-cache")
    if a.quick and a.append and Path(a.append).resolve() == (ROOT / "bench" / "RESULTS.md").resolve():
        ap.error("--quick does not write into bench/RESULTS.md")
    return a


# ---- the checkpoint ------------------------------------------------------------------------------------------

CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' }}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<|image|>' }}{% else %}{{ c['text'] }}"
        "{% endif %}{% endfor %}{% endif %}{{ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def tokenizer(d, vocab):
    """A byte-level BPE with Llama 3's specials whose vocabulary is exactly `vocab` ids (trained merges, then
    unused filler tokens); <|image|> added after it (id `vocab`, one of the embedding's 8 extra rows)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["Describe this image in one sentence. A cat sits on a mat.", "What is in the picture? Two dogs."] * 20
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(vocab, 300), show_progress=False,
                                                        special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    j = json.loads(tok.to_str())
    v = j["model"]["vocab"]
    for i in range(len(v), vocab):
        v[f"<unused{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(j))
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    tok.add_tokens([AddedToken("<|image|>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": CHAT}))
    assert tok.token_to_id("<|image|>") == vocab
    return vocab


def mllama_config(s):
    from transformers import MllamaConfig
    t = s["tiles"]
    ratios = [[r, c] for r in range(1, t + 1) for c in range(1, t + 1) if r * c <= t]
    return MllamaConfig(
        vision_config=dict(hidden_size=s["v_hidden"], intermediate_size=s["v_inter"], num_hidden_layers=s["v_local"],
                           num_global_layers=s["v_global"], attention_heads=s["v_heads"], image_size=s["tile"],
                           patch_size=PATCH, max_num_tiles=t, intermediate_layers_indices=list(s["v_idx"]),
                           vision_output_dim=s["v_hidden"] * (len(s["v_idx"]) + 1), supported_aspect_ratios=ratios,
                           norm_eps=1e-5),
        text_config=dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], cross_attention_layers=list(s["cross"]),
                         max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192},
                         bos_token_id=0, eos_token_id=4, pad_token_id=None, tie_word_embeddings=False),
        image_token_index=s["vocab"])


def checkpoint(a):
    """The checkpoint directory (made once per shape and kept in --dir) and the image."""
    import hashlib
    tag = hashlib.sha1(json.dumps(a.shape, sort_keys=True).encode()).hexdigest()[:8]
    d = a.dir / f"mllama-{a.size}-{tag}-bf16"
    img = a.dir / f"mllama-image-{a.shape['image']}.png"
    if not img.exists():
        import numpy as np
        from PIL import Image
        a.dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.RandomState(7).randint(0, 256, (a.shape["image"], a.shape["image"], 3),
                                                         dtype=np.uint8)).save(img)
    if (d / "done").exists():
        return d, img
    import torch
    from transformers import (MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor,
                              PreTrainedTokenizerFast)
    log(f"making the {a.size} checkpoint in {d} (random bf16 weights)")
    cfg = mllama_config(a.shape)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every matrix random with unit gain; the gates far from 0 (tanh ~ 0.5-0.9)
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.copy_((torch.rand(1, generator=g) + 0.6) * (1 if torch.rand(1, generator=g) < 0.7 else -1))
            elif "norm" in name and p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() == 1:
                p.normal_(0.0, 0.02, generator=g)
            elif "embed" in name:
                p.normal_(0.0, 0.5, generator=g)
            else:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=g)
    model.generation_config.eos_token_id = None
    model.save_pretrained(d, max_shard_size="2GB")
    del model
    tokenizer(d, a.shape["vocab"])
    ip = MllamaImageProcessor(size={"height": a.shape["tile"], "width": a.shape["tile"]},
                              max_image_tiles=a.shape["tiles"])
    ip.save_pretrained(d)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=CHAT).save_pretrained(d)
    (d / "done").write_text("")
    return d, img


# ---- FLOPs and bytes ----------------------------------------------------------------------------------------

def vision_flops(s):
    """Multiply-adds x 2 of one image of `tiles` real tiles: (total, parts)."""
    side = s["tile"] // PATCH
    p = side * side + 1  # the class token
    pp = p + (8 - p % 8) % 8  # padded to a multiple of 8, as MllamaVisionModel
    t, d, f = s["tiles"], s["v_hidden"], s["v_inter"]
    rows = t * pp
    layers = s["v_local"] + s["v_global"]
    parts = {
        "patch": 2 * t * side * side * 3 * PATCH * PATCH * d,
        "linear": layers * 2 * rows * (4 * d * d + 2 * d * f),
        "attention": layers * 2 * 2 * rows * rows * d,
        "projector": 2 * t * p * s["v_hidden"] * (len(s["v_idx"]) + 1) * s["hidden"],
    }
    return sum(parts.values()), dict(parts, rows=rows, positions=p, padded=pp)


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
    for x in shape:
        n *= x
    return n


def bytes_per_token(d, s, prompt_len, decode):
    """(bytes one decode step must read, its parts)."""
    t = tensors(d)
    text = [k for k in t if "language_model" in k or k.startswith("lm_head")]
    per_image = [k for k in text if re.search(r"cross_attn\.(k_proj|v_proj)\.", k)]
    weights = sum(nbytes(*t[k]) for k in text if "embed_tokens" not in k and k not in per_image)
    side = s["tile"] // PATCH
    visual = len(s["cross"]) * 2 * s["tiles"] * (side * side + 1) * s["kv_heads"] * (s["hidden"] // s["heads"]) * 4
    ctx = prompt_len + 0.5 * decode
    self_kv = (s["layers"] - len(s["cross"])) * 2 * s["kv_heads"] * (s["hidden"] // s["heads"]) * 4 * ctx
    return weights + visual + self_kv, dict(weights=weights, visual_kv=visual, self_kv=self_kv,
                                            kv_proj=sum(nbytes(*t[k]) for k in per_image),
                                            head=sum(nbytes(*t[k]) for k in text if k.endswith("lm_head.weight")))


# ---- the probes -----------------------------------------------------------------------------------------------

def bandwidth(a, th):
    return bench_lib.bandwidth(a.build, th, a.quick)


def fma_peak(a, th):
    return bench_lib.fma_peak(a.build, th)


# ---- mmbridge ---------------------------------------------------------------------------------------------------

GEN_RE = re.compile(r"prefill: (\d+) tokens in ([\d.]+) s \(.*images ([\d.]+) s\); decode: (\d+) tokens in ([\d.]+) s")
ENC_RE = re.compile(r"batch 1/1: .*?, ([\d.]+) ms")


def mmb_encode(a, d, img, th, out):
    """One `mmbridge encode`: its own seconds for the batch (load, processor, tower, projector)."""
    p = run([ROOT / a.build / "mmbridge", "encode", d, img, "-o", out, "--threads", th])
    m = ENC_RE.search(p.stdout + p.stderr)
    if not m:
        raise RuntimeError(f"no batch timing in mmbridge encode's output: {p.stdout[-300:]}")
    return float(m.group(1)) * 1e-3


def mmb_generate(a, d, img, th, n):
    """One `mmbridge generate`: dict(decode tok/s, images s, prefill s, ids, prompt positions)."""
    p = run([ROOT / a.build / "mmbridge", "generate", d, "--raw", "--prompt", PROMPT, "--image", img, "-n", n,
             "--ignore-eos", "--print-ids", "--threads", th])
    m = GEN_RE.search(p.stderr)
    if not m:
        raise RuntimeError(f"no timings in mmbridge's stderr: {p.stderr.strip()[-300:]}")
    # printed to the ms: a toy model (--quick) can show 0.000
    return dict(decode=int(m.group(4)) / max(float(m.group(5)), 5e-4), images=float(m.group(3)),
                prefill=float(m.group(2)) - float(m.group(3)), ids=[int(x) for x in p.stdout.split()],
                prompt=int(m.group(1)))


# ---- PyTorch --------------------------------------------------------------------------------------------------

class Torch:
    """The transformers model (bf16 weights, loaded once) and a float32 copy of its tower and projector."""

    def __init__(self, a, d, img):
        import torch
        from PIL import Image
        from transformers import MllamaForConditionalGeneration, MllamaProcessor
        self.torch, self.a = torch, a
        t0 = time.perf_counter()
        self.model = MllamaForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16).eval()
        self.load_s = time.perf_counter() - t0
        self.model.generation_config.eos_token_id = None
        mm = self.model.model
        self.vis32 = copy.deepcopy(mm.vision_model).float().eval()
        self.proj32 = copy.deepcopy(mm.multi_modal_projector).float().eval()
        proc = MllamaProcessor.from_pretrained(d)
        t0 = time.perf_counter()
        self.enc = proc(text=PROMPT, images=[[Image.open(img).convert("RGB")]], return_tensors="pt")
        self.proc_s = time.perf_counter() - t0
        self.ids = self.enc["input_ids"]
        self.prefix = None

    def vision(self, bf16=False, hook=None):
        """(seconds, cross_attention_states) of the tower and projector, as MllamaModel.forward runs them."""
        torch, e = self.torch, self.enc
        mm = self.model.model
        v, p = (mm.vision_model, mm.multi_modal_projector) if bf16 else (self.vis32, self.proj32)
        pv = e["pixel_values"].to(torch.bfloat16 if bf16 else torch.float32)
        with torch.inference_mode():
            t0 = time.perf_counter()
            h = v(pixel_values=pv, aspect_ratio_ids=e["aspect_ratio_ids"],
                  aspect_ratio_mask=e["aspect_ratio_mask"]).last_hidden_state
            st = p(h).reshape(-1, h.shape[-2], self.model.config.text_config.hidden_size)
            return time.perf_counter() - t0, st

    def vision_capture(self):
        """One fp32 run that also keeps the first local layer's inputs (for bf16_probe): its states."""
        got = self.layer_in = {}

        def grab(mod, args, kwargs):
            h, m = kwargs.get("hidden_states", args[0] if args else None), kwargs.get("attention_mask")
            got["h"], got["mask"] = h.detach().clone(), m.detach().clone() if m is not None else None
        hk = self.vis32.transformer.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            return self.vision()[1]
        finally:
            hk.remove()

    def bf16_probe(self, n_layers):
        """bf16 compute, timed on parts: (one local layer's s, the projector's s on 1/16 of its rows, estimate
        of the tower + projector). The layer's inputs are vision_capture's, in bf16."""
        torch, got = self.torch, self.layer_in
        mm = self.model.model
        layer = mm.vision_model.transformer.layers[0]
        h = got["h"].to(torch.bfloat16)
        mask = got["mask"].to(torch.bfloat16) if got["mask"] is not None else None
        with torch.inference_mode():
            t0 = time.perf_counter()
            layer(hidden_states=h, attention_mask=mask)
            t_layer = time.perf_counter() - t0
            rows = self.enc["pixel_values"].shape[2] * self.proj_positions()
            x = torch.randn(1, rows // 16, mm.multi_modal_projector.in_features, dtype=torch.bfloat16)
            t0 = time.perf_counter()
            mm.multi_modal_projector(x)
            t_proj = time.perf_counter() - t0
        return t_layer, t_proj, n_layers * t_layer + 16 * t_proj

    def proj_positions(self):
        c = self.model.config.vision_config
        return (c.image_size // c.patch_size) ** 2 + 1

    def prefill_prefix(self, states):
        """The cache of the prompt but its last token, with the cross-attention layers' K/V of the image."""
        torch, e = self.torch, self.enc
        with torch.inference_mode():
            out = self.model(input_ids=e["input_ids"][:, :-1], attention_mask=e["attention_mask"][:, :-1],
                             cross_attention_mask=e["cross_attention_mask"][:, :-1],
                             cross_attention_states=states.to(torch.bfloat16), use_cache=True)
        self.prefix = out.past_key_values

    def generate(self, n):
        """model.generate from a copy of the prefix cache: (decode tok/s, ids)."""
        torch, e = self.torch, self.enc
        from transformers import LogitsProcessor, LogitsProcessorList
        stamps = []

        class Stamp(LogitsProcessor):
            def __call__(self, input_ids, scores):
                stamps.append(time.perf_counter())
                return scores
        with torch.inference_mode():
            out = self.model.generate(input_ids=e["input_ids"], attention_mask=e["attention_mask"],
                                      cross_attention_mask=e["cross_attention_mask"],
                                      past_key_values=copy.deepcopy(self.prefix), max_new_tokens=n, do_sample=False,
                                      eos_token_id=None, logits_processor=LogitsProcessorList([Stamp()]))
        assert len(stamps) == n, (len(stamps), n)
        return (n - 1) / (stamps[-1] - stamps[0]), out[0, self.ids.shape[1]:].tolist()

    def generate_plain(self, n):
        """model.generate with pixel_values, no cache handed in (the bf16 tower included): the ids only."""
        with self.torch.inference_mode():
            out = self.model.generate(**self.enc, max_new_tokens=n, do_sample=False, eos_token_id=None)
        return out[0, self.ids.shape[1]:].tolist()


# ---- the report -------------------------------------------------------------------------------------------------

def report(a, res, meta):
    s, fl, parts = a.shape, meta["flops"], meta["flops_parts"]
    vrows, drows = [], []
    for th, r in res.items():
        pk, bw = meta["peak"][th], meta["bw"][th]
        vrows.append([th, f"FMA peak ({pk * 1e-9:.1f} GFLOP/s fp32)", f"{fl / pk:.2f}", f"{pk * 1e-9:.1f}", "100 %", ""])
        me = r["runs"].get("mmbridge encode")
        for impl, label in (("mmbridge encode", "mmbridge `encode`"),
                            ("pytorch fp32 vision", f"PyTorch {meta['torch']}, fp32 compute")):
            xs = r["runs"].get(impl)
            if not xs:
                continue
            vs = f"**{med(xs) / med(me):.2f}x**" if impl != "mmbridge encode" and me else ""
            vrows.append([th, label, spread(xs), f"{fl / med(xs) * 1e-9:.1f}", f"{100 * fl / med(xs) / pk:.0f} %", vs])
        if r.get("bf16"):
            tl, tp, est = r["bf16"]
            lay = parts["linear"] / (s["v_local"] + s["v_global"]) + parts["attention"] / (s["v_local"] + s["v_global"])
            vrows.append([th, f"PyTorch {meta['torch']}, bf16 compute (estimate: one layer {tl:.1f} s, "
                          f"{lay / tl * 1e-9:.1f} GFLOP/s; projector slice x 16 {16 * tp:.1f} s; 1 run)",
                          f"~{est:.0f}", f"~{fl / est * 1e-9:.1f}", f"~{100 * fl / est / pk:.0f} %",
                          f"**~{est / med(me):.0f}x**" if me else ""])
        bound = bw / meta["bytes"]
        drows.append([th, f"bandwidth bound ({bw * 1e-9:.1f} GB/s read)", f"{bound:.2f}", "100 %", ""])
        mg, pg = r["runs"].get("mmbridge generate"), r["runs"].get("pytorch generate")
        if mg:
            drows.append([th, "mmbridge `generate`", spread([x["decode"] for x in mg]),
                          f"{100 * med([x['decode'] for x in mg]) / bound:.0f} %", ""])
        if pg:
            vs = (f"**{med([x['decode'] for x in mg]) / med([x['decode'] for x in pg]):.2f}x**" if mg else "")
            drows.append([th, f"PyTorch {meta['torch']} `generate`, bf16", spread([x["decode"] for x in pg]),
                          f"{100 * med([x['decode'] for x in pg]) / bound:.0f} %", vs])
    b = meta["bytes_parts"]
    nlay = s["v_local"] + s["v_global"]
    side = s["tile"] // PATCH
    gen_extra = "; ".join(
        f"{th} thr: images {med([x['images'] for x in r['runs']['mmbridge generate']]):.1f} s, text prefill "
        f"{med([x['prefill'] for x in r['runs']['mmbridge generate']]):.1f} s"
        for th, r in res.items() if r["runs"].get("mmbridge generate"))
    agreements = "; ".join(f"{th} thr: {r['agree']}" for th, r in res.items() if r.get("agree") is not None)
    text = [
        f"MllamaForConditionalGeneration on random bf16 weights at Llama-3.2-11B-Vision's widths, fewer layers. "
        f"Vision: hidden {s['v_hidden']}, MLP {s['v_inter']}, {s['v_heads']} heads, {s['v_local']} local + "
        f"{s['v_global']} global layers (11B: 32 + 8), intermediate_layers_indices {s['v_idx']} (11B: [3, 7, 15, 23, "
        f"30]), vision_output_dim {s['v_hidden'] * (len(s['v_idx']) + 1)}; one {s['image']}x{s['image']} image, "
        f"{s['tiles']} tiles of {s['tile']} ({parts['positions']} positions each, {parts['padded']} padded). Text: "
        f"hidden {s['hidden']}, MLP {s['inter']}, {s['heads']} heads / {s['kv_heads']} KV heads, vocabulary "
        f"{s['vocab']}, {s['layers']} layers with cross_attention_layers {s['cross']} (11B: 40 layers, 8 cross). "
        f"Threads: {', '.join(map(str, a.threads))}; ISA: mmbridge's own kernel {kernel_isa()} (bf16 weights widened "
        "to f32 in the micro-kernel), PyTorch's CPU kernels (oneDNN / its own) on the same machine.",
        "",
        f"**Vision encode**, s/image (median of {a.reps} runs; one 4-tile image, {fl * 1e-12:.2f} TFLOP: "
        f"{nlay} layers' projections and MLP {parts['linear'] * 1e-12:.2f}, attention over the "
        f"{parts['rows']} positions {parts['attention'] * 1e-12:.2f}, projector {parts['projector'] * 1e-12:.2f}, "
        f"patch convolution {parts['patch'] * 1e-12:.3f}). % peak: of the fp32 FMA peak at that thread count "
        "(bench_gemm's probe, the best of the run). mmbridge speed-up: PyTorch's s/image over mmbridge's. "
        f"mmbridge's time includes the image's load and processor; PyTorch's processor call, not timed, took "
        f"{meta['proc_s'] * 1e3:.0f} ms.",
        "",
        table(["threads", "implementation", "s/image", "GFLOP/s", "% of FMA peak", "mmbridge speed-up"], vrows),
        "",
        f"**Decode**, tokens/s of the {a.decode - 1} decode steps after the {meta['prompt']}-position prompt "
        f"(greedy, --ignore-eos; median of {a.reps} runs). % of bound: of read bandwidth / bytes per token "
        f"({meta['bytes'] * 1e-9:.2f} GB: weights {b['weights'] * 1e-9:.2f} GB bf16, of which lm_head "
        f"{b['head'] * 1e-9:.2f} GB, not the cross layers' k_proj/v_proj ({b['kv_proj'] * 1e-6:.0f} MB, once per "
        f"image); the cross-attention K/V of {s['tiles']} x {side * side + 1} positions {b['visual_kv'] * 1e-6:.0f} "
        f"MB f32; the self-attention KV cache {b['self_kv'] * 1e-6:.1f} MB f32 at the mean context). mmbridge "
        "speed-up: mmbridge's tokens/s over PyTorch's.",
        "",
        table(["threads", "implementation", "decode tok/s", "% of bound", "mmbridge speed-up"], drows),
        "",
        f"mmbridge `generate`'s other figures (medians): {gen_extra} (images: the tower, projector and the cross "
        "layers' K/V). PyTorch's generate starts from a copy of a cache of the prompt but its last token (the "
        "image's K/V in it), made once from the fp32 tower's states; "
        f"PyTorch's load of the bf16 checkpoint took {meta['load_s']:.0f} s. Greedy ids identical, of "
        f"{a.decode} (leading, mmbridge vs PyTorch): {agreements} (bf16 compute in PyTorch against f32 compute "
        "on bf16 weights in mmbridge: random weights' near-ties may part them).",
    ]
    if meta.get("plain_ok") is not None:
        text.append("")
        text.append(f"Check: generate from the prefix cache gives plain generate's ids (with pixel_values): "
                    f"{'yes' if meta['plain_ok'] else 'NO'}.")
    if meta.get("enc_err") is not None:
        text.append("")
        text.append(f"Check: mmbridge encode's embeddings against PyTorch's fp32 cross_attention_states of the real "
                    f"tiles: scaled max error {meta['enc_err']:.1e}.")
    return "\n".join(text)


def machine_lines(a, meta):
    return bench_lib.machine_lines(a.build, meta["peak"], LOAD0, meta["bw"])


def append(path, section):
    bench_lib.append(path, "bench_mllama.py", section)


def scaled_err(got, want):
    import numpy as np
    got, want = np.asarray(got, dtype=np.float64).ravel(), np.asarray(want, dtype=np.float64).ravel()
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def main():
    a = parse_args()
    for tgt in ("mmbridge", "bench_decoder", "bench_gemm"):
        if not (ROOT / a.build / tgt).exists():
            sys.exit(f"bench_mllama: {a.build}/{tgt} is missing: cmake -S . -B {a.build} -DCMAKE_BUILD_TYPE=Release "
                     f"&& cmake --build {a.build} -j2")
    import torch
    d, img = checkpoint(a)
    for f in sorted(d.glob("*.safetensors")):  # the page cache: no run pays the first read
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    fl, fparts = vision_flops(a.shape)
    out_st = a.dir / "mllama-encode-out.safetensors"
    tp = Torch(a, d, img) if {"pytorch fp32 vision", "pytorch generate"} & set(a.impls) else None
    log(f"loaded the PyTorch model ({tp.load_s:.0f} s)" if tp else "no PyTorch")
    meta = {"flops": fl, "flops_parts": fparts, "peak": {}, "bw": {}, "torch": torch.__version__.split("+")[0],
            "proc_s": tp.proc_s if tp else 0.0, "load_s": tp.load_s if tp else 0.0}
    torch.set_num_threads(max(a.threads))
    states = None
    if tp:
        states = tp.vision_capture()
        if "pytorch generate" in a.impls:
            log("PyTorch: prefilling the prompt but its last token (the image's K/V)")
            tp.prefill_prefix(states)
            if a.quick:  # the prefix cache's generate is plain generate
                meta["plain_ok"] = tp.generate(a.decode)[1] == tp.generate_plain(a.decode)
    prompt_len = tp.ids.shape[1] if tp else None
    runners = {
        "mmbridge encode": lambda th: mmb_encode(a, d, img, th, out_st),
        "pytorch fp32 vision": lambda th: tp.vision()[0],
        "mmbridge generate": lambda th: mmb_generate(a, d, img, th, a.decode),
        "pytorch generate": lambda th: dict(zip(("decode", "ids"), tp.generate(a.decode))),
    }
    impls = [i for i in IMPLS if i in a.impls]
    res = {}
    jf = open(a.json, "w") if a.json else None
    for th in a.threads:
        torch.set_num_threads(th)
        meta["bw"][th] = max(meta["bw"].get(th, 0), bandwidth(a, th))
        meta["peak"][th] = max(meta["peak"].get(th, 0), fma_peak(a, th))
        log(f"{th} thread(s): {meta['bw'][th] * 1e-9:.1f} GB/s read, fp32 peak {meta['peak'][th] * 1e-9:.1f} "
            "GFLOP/s; warm-up")
        if "pytorch generate" in impls:
            tp.generate(2)
        runs = {i: [] for i in impls}
        for r in range(a.reps):
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for i in order:
                runs[i].append(runners[i](th))
            log(f"{th} thr, rep {r + 1}/{a.reps}: " + ", ".join(
                f"{i} {x:.2f} s" if isinstance(x, float) else f"{i} {x['decode']:.2f} tok/s"
                for i in impls for x in [runs[i][-1]]))
        if prompt_len is None and runs.get("mmbridge generate"):
            prompt_len = runs["mmbridge generate"][0]["prompt"]
        if runs.get("mmbridge generate") and tp and runs["mmbridge generate"][0]["prompt"] != prompt_len:
            raise RuntimeError(f"mmbridge's prompt is {runs['mmbridge generate'][0]['prompt']} positions, the "
                               f"processor's {prompt_len}")
        bf16 = None
        if tp and not a.no_bf16_layer:
            log(f"{th} thr: PyTorch bf16-compute probe (one layer, a projector slice)")
            bf16 = tp.bf16_probe(a.shape["v_local"] + a.shape["v_global"])
        meta["bw"][th] = max(meta["bw"][th], bandwidth(a, th))
        meta["peak"][th] = max(meta["peak"][th], fma_peak(a, th))
        ag = None
        if runs.get("mmbridge generate") and runs.get("pytorch generate"):
            ag = agree(runs["mmbridge generate"][-1]["ids"], runs["pytorch generate"][-1]["ids"])
        res[th] = dict(runs=runs, bf16=bf16, agree=ag)
    if out_st.exists() and states is not None:
        from safetensors.numpy import load_file
        got = load_file(str(out_st))["embeddings"]
        meta["enc_err"] = scaled_err(got, states.float().numpy())
    out_st.unlink(missing_ok=True)
    meta["prompt"] = prompt_len
    meta["bytes"], meta["bytes_parts"] = bytes_per_token(d, a.shape, prompt_len or 8, a.decode)
    if jf:
        for th, r in res.items():
            for i, xs in r["runs"].items():
                rec = {"bench": "mllama", "threads": th, "impl": i, "shape": a.shape, "decode": a.decode}
                if xs and isinstance(xs[0], float):
                    rec.update(s_per_image=med(xs), all=xs, gflops=fl / med(xs) * 1e-9,
                               peak_gflops=meta["peak"][th] * 1e-9)
                elif xs:
                    rec.update(decode_tps=med([x["decode"] for x in xs]), all=[x["decode"] for x in xs],
                               bound_tps=meta["bw"][th] / meta["bytes"], read_gbps=meta["bw"][th] * 1e-9,
                               bytes_per_token=meta["bytes"])
                jf.write(json.dumps(rec) + "\n")
            if r["bf16"]:
                jf.write(json.dumps({"bench": "mllama", "threads": th, "impl": "pytorch bf16 vision (estimate)",
                                     "layer_s": r["bf16"][0], "projector_slice_s": r["bf16"][1],
                                     "s_per_image_est": r["bf16"][2]}) + "\n")
        jf.close()
    body = report(a, res, meta)
    cmd = "python3 " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    head = ["## Llama 3.2 Vision (Mllama): vision encode and decode at 11B widths", "",
            f"Generated by `{cmd}` in {time.monotonic() - T0:.0f} s"
            + (" (--quick: toy sizes, a smoke run, not a measurement)" if a.quick else "") + ".", ""]
    section = "\n".join(head + machine_lines(a, meta) + ["", body])
    print(section)
    if a.append:
        append(a.append, section)
        log(f"wrote the section into {a.append}")
    if a.quick and meta.get("plain_ok") is False:
        sys.exit("bench_mllama: generate from the prefix cache does not give plain generate's ids")


if __name__ == "__main__":
    main()
