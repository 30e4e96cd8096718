"""CogVLM's visual expert (fusion type B) at CogVLM-17B's layer shapes on random bf16 weights: the prefill and
decode cost of the expert over the plain LLM, in mmbridge, PyTorch and llama.cpp (llama-cpp-python), in one run.

    python3 bench/bench_cogvlm.py                      # 17B widths, 5 layers (about 13 minutes on 2 cores)
    python3 bench/bench_cogvlm.py --quick              # toy sizes, 1 repetition, 1 thread: a smoke run
    python3 bench/bench_cogvlm.py --append bench/RESULTS.md   # also writes its section into RESULTS.md

The model: CogVLMForCausalLM (THUDM/cogvlm-chat-hf's remote code) with the widths of its LLM, Vicuna-7B: hidden
4096, MLP 11008, 32 heads of 128, vocabulary 32000, RMSNorm 1e-5, RoPE base 10000; each layer with its two weight
sets, the language expert's (language_expert_query_key_value, language_expert_dense, language_mlp) and the vision
expert's (vision_expert_*, vision_mlp), as the hub's checkpoint names them. --layers of the 32 (default 5: each
layer is 0.81 GB of bf16, and the four files below map 2.5 copies of the layers' weights, which must fit in the
page cache beside the other processes of these 24 GB machines: 14 GB mapped at 5 layers). Random weights (unit-gain
matrices), bf16. The image: one 490x490 picture, CogVLM's 1225 patches (35 x 35 of 14 px) + boi + eoi = 1227
rows, through a tiny EVA2-CLIP tower (1 layer of width 64, not CogVLM's 63 layers of 1792: the tower's cost is
not the question, and mmbridge's time of it is subtracted) and the GLU adapter at the LLM's widths. The prompt:
build_conversation_input_ids' template "base" (--raw): BOS, the 1227 image rows, "Describe this image." tokenized
alone; P positions in all. A Llama-2-like tokenizer (byte-fallback BPE, the vocabulary filled to 32000 ids).

"Plain" is the same LLM without the expert: the same layers' language-expert weights saved as a
LlamaForCausalLM (language_expert_query_key_value split into q_proj, k_proj, v_proj; language_expert_dense as
o_proj; language_mlp as mlp), fed the same P positions as ids (the image rows as id 0). CogVLM runs each row
through one of its two sets, so with and without the expert the prefill does the same FLOPs: what the expert
costs is the split (a gather and a scatter of the rows per projection, two GEMMs of fewer rows instead of one)
and memory; in decode (one text row a step, the language set only) nothing but what the second set's pages
cost.

Timed, the LLM only (the tower, the adapter and the splice of the image rows not in the prefill's time):
- mmbridge: `mmbridge generate` (one process per run; its own split on stderr: the prefill less its "images"
  seconds, the tower, adapter and boi/eoi; the decode steps); the CogVLM checkpoint with --image, the plain one
  with --ids.
- PyTorch (this process, torch.set_num_threads): a torch module written from the remote code's
  VisionExpertAttention / VisionExpertMLP (the rows split by get_expert_mask into two index_puts per
  projection, rotate_half RoPE on build_position_ids' positions, attention_fn's scaled_dot_product_attention,
  causal in the prefill; the KV cache concatenated each step), bf16 weights and compute, the weights mapped from
  the same safetensors files mmbridge maps; the image rows are mmbridge's `encode` output (the same tower),
  spliced over the embeddings at token_type_ids VISION as CogVLMModel.forward does. One departure: the logits
  of the last row only (the remote code runs lm_head over every row: 0.3 TFLOP more at 1240 rows), as mmbridge
  and llama.cpp compute them. The plain model is the same module's Llama path on the plain checkpoint's tensors
  (q_proj, k_proj, v_proj, o_proj, mlp as LlamaAttention / LlamaMLP), sequential positions.
- llama.cpp: llama-cpp-python 0.3.36's bundled llama.cpp through its C API (one process per run, a warm-up
  decode first as llama.cpp's tools do, then the timed run), on GGUF files made by its own converter
  (convert_hf_to_gguf.py and gguf-py from the package's sdist, fetched into --dir with `pip download`; the
  converter needs sentencepiece, its requirement, for the Llama vocabulary path), --outtype bf16. Its cogvlm
  graph picks the expert per batch: a batch of token ids runs the language set, a batch of embeddings the
  vision set. So the CogVLM GGUF gets BOS as a token, the 1227 image rows (mmbridge's `encode` output) as one
  batch of embeddings, the text as tokens; the plain GGUF all P ids in one batch; and, to tell the graph's
  cost from the vision set's, the CogVLM GGUF with all P ids (its text path). Context defaults
  (llama_context_default_params: n_ubatch 512, flash attention auto, f16 KV cache); positions sequential. The
  cogvlm graph has no output-row selection: it hands back the first row's logits where only the last row's
  are asked for, so its runs ask for every row of the last batch (the text's) and take the last.

Prefill: tokens/s of the P positions; % of the fp32 FMA peak measured here (bench_gemm's probe, 12 independent
FMA chains a thread; its bf16 dot-product probe, vdpbf16ps, is twice that on AVX512-BF16 hardware: PyTorch's and
llama.cpp's bf16 kernels can use it, mmbridge widens bf16 weights to f32). FLOPs: each layer's projections and
MLP over the P rows (one set a row), causal attention (2 x 2 x hidden x (i + 1) for row i), lm_head of one row.
Decode: greedy, --ignore-eos, tokens/s of the --decode - 1 steps after the first token; the bound read
bandwidth / bytes a step must read: the language expert's weights (the layers' language set and norms, the final
norm, lm_head; bf16), the KV cache not counted. The bandwidth: bench_decoder --bandwidth (a streaming read of
1 GiB on the same threads, best of 5), before and after each group of repetitions, the best of the run.

The implementations take turns, one run each per repetition, the order rotated; --reps repetitions per thread
count; medians, `±` half the range over the median. The machine is shared: its load average is recorded.
"""
import argparse
import copy
import hashlib
import json
import mmap
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
from bench_lib import agree, kernel_isa, med, spread, table  # noqa: E402
T0 = time.monotonic()
try:
    LOAD0 = ", ".join(Path("/proc/loadavg").read_text().split()[:3])
except OSError:
    LOAD0 = "?"
PROMPT = "Describe this image."
LANG, VISION = 0, 1
PATCH = 14
LLAMA_CPP_VERSION = "0.3.36"

# LLM: hidden, MLP, heads, layers, vocabulary; image side (rows: (side / 14)^2 + 2); the tiny EVA2-CLIP tower
SIZES = {
    "17b-width": dict(hidden=4096, inter=11008, heads=32, layers=5, vocab=32000, image=490,
                      v_hidden=64, v_inter=128, v_heads=2, v_layers=1),
    "quick": dict(hidden=64, inter=176, heads=4, layers=2, vocab=512, image=70,
                  v_hidden=32, v_inter=64, v_heads=2, v_layers=1),
}
IMPLS = ["mmbridge cogvlm", "mmbridge plain", "pytorch cogvlm", "pytorch plain", "llama.cpp cogvlm", "llama.cpp plain",
         "llama.cpp cogvlm ids"]


def log(msg):
    print(f"[cogvlm {time.monotonic() - T0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", "--smoke", action="store_true", dest="quick",
                    help="toy sizes, 1 repetition, 1 thread: a smoke run (well under a minute once the llama.cpp "
                    "sources are in --dir)")
    ap.add_argument("--size", choices=sorted(SIZES), help="the model's shape (default 17b-width; --quick: quick)")
    ap.add_argument("--layers", type=int, help="decoder layers (override the size's)")
    ap.add_argument("--image-size", type=int, help="the image's side in px, a multiple of 14 (override; rows: "
                    "(side / 14)^2 + 2; CogVLM's 490 gives 1227)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each implementation (default 3)")
    ap.add_argument("--decode", type=int, default=24, help="tokens generated per run (default 24)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="which of: " + ", ".join(IMPLS))
    ap.add_argument("--build", default="build", help="the CMake Release build with mmbridge, bench_decoder, bench_gemm")
    ap.add_argument("--dir", help="cache for the checkpoints, the GGUF files and llama.cpp's converter "
                    "(default BUILD/bench-cache)")
    ap.add_argument("--json", help="also write one JSON record per figure to this file")
    ap.add_argument("--append", help="write the section into this markdown file (bench/RESULTS.md), replacing "
                    "the one an earlier run left there")
    ap.add_argument("--llama-child", help=argparse.SUPPRESS)  # internal: one llama.cpp run (a JSON request)
    a = ap.parse_args(argv)
    if a.llama_child:
        return a
    if a.quick:
        a.size = a.size or "quick"
        a.threads, a.reps, a.decode = "1", 1, min(a.decode, 8)
    a.size = a.size or "17b-width"
    a.shape = copy.deepcopy(SIZES[a.size])
    if a.layers:
        a.shape["layers"] = a.layers
    if a.image_size:
        a.shape["image"] = a.image_size
    a.threads = [int(t) for t in a.threads.split(",")]
    a.impls = a.impls.split(",")
    if set(a.impls) - set(IMPLS) or a.reps < 1 or a.decode < 2 or a.shape["image"] % PATCH:
        ap.error("bad --impls, --reps, --decode or --image-size")
    a.dir = Path(a.dir or Path(a.build) / "bench-cache")
    if a.quick and a.append and Path(a.append).resolve() == (ROOT / "bench" / "RESULTS.md").resolve():
        ap.error("--quick does not write into bench/RESULTS.md")
    return a


def n_image_rows(s):
    g = s["image"] // PATCH
    return g * g + 2


# ---- the checkpoints ----------------------------------------------------------------------------------------

def tokenizer(d, vocab):
    """A Llama-2-like tokenizer.json (what LlamaTokenizerFast saves for a SentencePiece model): BPE with
    byte_fallback, <unk> <s> </s> = 0, 1, 2, the 256 <0xXX> byte tokens, trained pieces, filler pieces up to
    `vocab` ids; the Prepend / Replace normalizer, its decoder; BOS added. Returns the tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    corpus = ["Describe this image. A cat sits on a mat.", "What is in the picture? Two dogs in the snow."] * 20
    base = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, limit_alphabet=60, show_progress=False,
                                                         special_tokens=["<unk>", "<s>", "</s>"]))
    j = json.loads(base.to_str())
    trained = [t for t, _ in sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1])
               if t not in ("<unk>", "<s>", "</s>")]
    toks = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + trained
    toks += [f"▁filler{i}" for i in range(vocab - len(toks))]
    assert len(toks) == vocab, (len(toks), vocab)
    j["model"]["vocab"] = {t: i for i, t in enumerate(toks)}
    j["added_tokens"] = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False,
                              special=True) for i, c in enumerate(["<unk>", "<s>", "</s>"])]
    tok = Tokenizer.from_str(json.dumps(j))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    return tok


def cog_specs(s):
    """[(name, shape)] of CogVLMForCausalLM's state dict in its own names (cogvlm-chat-hf: no vision QKV bias)."""
    D, I, V, H, Iv = s["hidden"], s["inter"], s["vocab"], s["v_hidden"], s["v_inter"]
    g = s["image"] // PATCH
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(s["layers"]):
        q = f"model.layers.{i}."
        out += [(q + "input_layernorm.weight", (D,)), (q + "post_attention_layernorm.weight", (D,))]
        for e in ("language", "vision"):
            out += [(q + f"self_attn.{e}_expert_query_key_value.weight", (3 * D, D)),
                    (q + f"self_attn.{e}_expert_dense.weight", (D, D)),
                    (q + f"mlp.{e}_mlp.gate_proj.weight", (I, D)), (q + f"mlp.{e}_mlp.up_proj.weight", (I, D)),
                    (q + f"mlp.{e}_mlp.down_proj.weight", (D, I))]
    out += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    v = "model.vision."
    out += [(v + "patch_embedding.proj.weight", (H, 3, PATCH, PATCH)), (v + "patch_embedding.proj.bias", (H,)),
            (v + "patch_embedding.cls_embedding", (1, H)),
            (v + "patch_embedding.position_embedding.weight", (g * g + 1, H))]
    for i in range(s["v_layers"]):
        q = f"{v}transformer.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            out += [(q + n + ".weight", (H,)), (q + n + ".bias", (H,))]
        out += [(q + "attention.query_key_value.weight", (3 * H, H)), (q + "attention.query_key_value.bias", (3 * H,)),
                (q + "attention.dense.weight", (H, H)), (q + "attention.dense.bias", (H,)),
                (q + "mlp.fc1.weight", (Iv, H)), (q + "mlp.fc1.bias", (Iv,)),
                (q + "mlp.fc2.weight", (H, Iv)), (q + "mlp.fc2.bias", (H,))]
    q = v + "linear_proj."
    out += [(q + "linear_proj.weight", (D, H)), (q + "norm1.weight", (D,)), (q + "norm1.bias", (D,)),
            (q + "dense_h_to_4h.weight", (I, D)), (q + "gate_proj.weight", (I, D)), (q + "dense_4h_to_h.weight", (D, I)),
            (v + "boi", (1, 1, D)), (v + "eoi", (1, 1, D))]
    return out


def random_tensor(name, shape, seed):
    """Random bf16: norm weights in [0.5, 1.5), biases N(0, 0.02), embeddings and the vision side's learned rows
    N(0, 0.5), matrices with unit gain (N(0, 1 / fan_in))."""
    import torch
    g = torch.Generator().manual_seed(seed)
    if (("norm" in name or "layernorm" in name) and name.endswith(".weight")) and len(shape) == 1:
        t = torch.rand(shape, generator=g) + 0.5
    elif len(shape) == 1:
        t = torch.randn(shape, generator=g) * 0.02
    elif "embed" in name or name.endswith(("boi", "eoi", "cls_embedding")):
        t = torch.randn(shape, generator=g) * 0.5
    else:
        fan_in = 1
        for x in shape[1:]:
            fan_in *= x
        t = torch.randn(shape, generator=g) * fan_in ** -0.5
    return t.to(torch.bfloat16)


def write_safetensors(path, specs, make):
    """Writes a BF16 safetensors file tensor by tensor (make(name, shape) -> bf16 tensor), never holding more than
    one tensor: to a temporary name, then renamed."""
    import torch
    header, off = {}, 0
    for name, shape in specs:
        n = 2
        for x in shape:
            n *= x
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, shape in specs:
            t = make(name, shape)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == tuple(shape), (name, t.shape, shape)
            f.write(t.contiguous().view(torch.int16).numpy().tobytes())
    tmp.rename(path)


class Mapped:
    """The tensors of a safetensors file as torch tensors over a private (copy-on-write) mapping of the file:
    the page cache's pages, shared with the other processes that map it; nothing copied."""

    def __init__(self, path):
        import torch
        self.torch = torch
        self.f = open(path, "rb")
        n = struct.unpack("<Q", self.f.read(8))[0]
        self.header = {k: v for k, v in json.loads(self.f.read(n)).items() if k != "__metadata__"}
        self.base = 8 + n
        self.mm = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_COPY)

    def __getitem__(self, name):
        torch = self.torch
        h = self.header[name]
        dt = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}[h["dtype"]]
        a, b = h["data_offsets"]
        count = (b - a) // torch.tensor([], dtype=dt).element_size()
        return torch.frombuffer(self.mm, dtype=dt, count=count, offset=self.base + a).view(h["shape"])

    def keys(self):
        return self.header.keys()


def cog_config(s):
    return {"architectures": ["CogVLMForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                         "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"},
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.02,
            "template_version": "chat", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
            "vocab_size": s["vocab"], "hidden_size": s["hidden"], "intermediate_size": s["inter"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "hidden_act": "silu",
            "vision_config": dict(hidden_size=s["v_hidden"], intermediate_size=s["v_inter"],
                                  num_hidden_layers=s["v_layers"], num_heads=s["v_heads"], patch_size=PATCH,
                                  image_size=s["image"], in_channels=3, num_positions=(s["image"] // PATCH) ** 2 + 1,
                                  layer_norm_eps=1e-6, hidden_act="gelu", dropout_prob=0.0)}


def llama_config(s):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": s["hidden"], "intermediate_size": s["inter"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "num_key_value_heads": s["heads"],
            "vocab_size": s["vocab"], "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16"}


def plain_specs(s):
    D, I, V = s["hidden"], s["inter"], s["vocab"]
    out = [("model.embed_tokens.weight", (V, D))]
    for i in range(s["layers"]):
        q = f"model.layers.{i}."
        out += [(q + "input_layernorm.weight", (D,)), (q + "post_attention_layernorm.weight", (D,)),
                (q + "self_attn.q_proj.weight", (D, D)), (q + "self_attn.k_proj.weight", (D, D)),
                (q + "self_attn.v_proj.weight", (D, D)), (q + "self_attn.o_proj.weight", (D, D)),
                (q + "mlp.gate_proj.weight", (I, D)), (q + "mlp.up_proj.weight", (I, D)),
                (q + "mlp.down_proj.weight", (D, I))]
    return out + [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]


def plain_source(name, cog, D):
    """The plain LlamaForCausalLM's tensor `name` from the CogVLM file's language expert."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
    if not m:
        return cog[name]
    q, rest = f"model.layers.{m.group(1)}.", m.group(2)
    third = {"self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 1, "self_attn.v_proj.weight": 2}
    if rest in third:  # torch.split(mixed_raw_layer, hidden_size, dim=-1): q, k, v are the rows' thirds
        k = third[rest]
        return cog[q + "self_attn.language_expert_query_key_value.weight"][k * D:(k + 1) * D]
    if rest == "self_attn.o_proj.weight":
        return cog[q + "self_attn.language_expert_dense.weight"]
    if rest.startswith("mlp."):
        return cog[q + "mlp.language_mlp." + rest[len("mlp."):]]
    return cog[name]


def checkpoints(a):
    """(CogVLM dir, plain Llama dir, image), made once per shape and kept in --dir."""
    tag = hashlib.sha1(json.dumps(a.shape, sort_keys=True).encode()).hexdigest()[:8]
    root = a.dir / f"cogvlm-{a.size}-{tag}-bf16"
    dc, dp = root / "cogvlm", root / "llama"
    img = a.dir / f"cogvlm-image-{a.shape['image']}.png"
    if not img.exists():
        import numpy as np
        from PIL import Image
        a.dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.RandomState(11).randint(0, 256, (a.shape["image"], a.shape["image"], 3),
                                                          dtype=np.uint8)).save(img)
    if (dc / "done").exists() and (dp / "done").exists():
        return dc, dp, img
    log(f"making the {a.size} checkpoints in {root} (random bf16 weights)")
    s = a.shape
    specs = cog_specs(s)
    seeds = {name: i + 1 for i, (name, _) in enumerate(specs)}
    tokenizer(dc, s["vocab"])
    write_safetensors(dc / "model.safetensors", specs, lambda n, sh: random_tensor(n, sh, seeds[n]))
    (dc / "config.json").write_text(json.dumps(cog_config(s), indent=2))
    (dc / "done").write_text("")
    cog = Mapped(dc / "model.safetensors")
    tokenizer(dp, s["vocab"])
    write_safetensors(dp / "model.safetensors", plain_specs(s), lambda n, sh: plain_source(n, cog, s["hidden"]))
    (dp / "config.json").write_text(json.dumps(llama_config(s), indent=2))
    (dp / "done").write_text("")
    return dc, dp, img


def file_bytes(d):
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


# ---- FLOPs and bytes ----------------------------------------------------------------------------------------

def prefill_flops(s, P):
    """Multiply-adds x 2 of the LLM over P positions (each row through one weight set), logits of the last row."""
    D, I = s["hidden"], s["inter"]
    linear = s["layers"] * 2 * P * (4 * D * D + 3 * D * I)
    attention = s["layers"] * 2 * D * P * (P + 1)  # QK^T and PV, 2 x 2 x D x (i + 1) for row i
    head = 2 * D * s["vocab"]
    return linear + attention + head, dict(linear=linear, attention=attention, head=head)


def decode_bytes(dc):
    """Bytes a decode step reads: the layers' language set and norms, the final norm, lm_head (as stored)."""
    h = Mapped(dc / "model.safetensors").header
    tot, parts = 0, {"head": 0, "vision_set": 0}
    for k, v in h.items():
        n = v["data_offsets"][1] - v["data_offsets"][0]
        if k.startswith("model.vision.") or k == "model.embed_tokens.weight":
            continue
        if "vision_expert" in k or "vision_mlp" in k:
            parts["vision_set"] += n
            continue
        tot += n
        if k == "lm_head.weight":
            parts["head"] = n
    return tot, parts


def bandwidth(a, th):
    return bench_lib.bandwidth(a.build, th, a.quick)


def fma_peak(a, th):
    """(fp32 flop/s, bf16 dpbf16 flop/s or None) on th threads."""
    return bench_lib.fma_probes(a.build, th)


# ---- mmbridge ---------------------------------------------------------------------------------------------------

GEN_RE = re.compile(r"prefill: (\d+) tokens in ([\d.]+) s \((?:.*images ([\d.]+) s)?.*?\); "
                    r"decode: (\d+) tokens in ([\d.]+) s")


def proc_mem(pid, peak):
    """Folds /proc/PID/status's VmHWM, RssAnon and RssFile (bytes) into the dict peak (their maxima)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmHWM", "RssAnon", "RssFile"):
                peak[k] = max(peak.get(k, 0), int(v.split()[0]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return peak


def run_child(cmd, env=None):
    """Runs cmd: (stdout, stderr, its memory: the maxima of VmHWM, RssAnon, RssFile, polled every 0.1 s from
    /proc; wait4's ru_maxrss would not do: exec keeps the parent's high-water mark)."""
    import selectors
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    sel.register(p.stderr, selectors.EVENT_READ)
    chunks = {p.stdout: [], p.stderr: []}
    peak = {}
    while sel.get_map():
        for key, _ in sel.select(timeout=0.1):
            data = os.read(key.fileobj.fileno(), 1 << 16)
            if not data:
                sel.unregister(key.fileobj)
            else:
                chunks[key.fileobj].append(data)
        proc_mem(p.pid, peak)
    p.wait()
    out, err = b"".join(chunks[p.stdout]).decode(), b"".join(chunks[p.stderr]).decode("utf-8", "replace")
    if p.returncode:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} exited {p.returncode}: {err.strip()[-800:]}")
    return out, err, peak


def mmb_generate(a, args, th, n):
    """One `mmbridge generate`: dict(prefill s of the LLM, images s, decode tok/s, ids, positions, rss)."""
    out, err, rss = run_child([ROOT / a.build / "mmbridge", "generate", *args, "-n", n, "--ignore-eos",
                               "--print-ids", "--threads", th])
    m = GEN_RE.search(err)
    if not m:
        raise RuntimeError(f"no timings in mmbridge's stderr: {err.strip()[-300:]}")
    images = float(m.group(3) or 0.0)
    # printed to the ms: a toy model (--quick) can show 0.000
    return dict(prefill=max(float(m.group(2)) - images, 5e-4), images=images,
                decode=int(m.group(4)) / max(float(m.group(5)), 5e-4), ids=[int(x) for x in out.split()],
                positions=int(m.group(1)), rss=rss)


def mmb_encode_rows(a, dc, img):
    """The image's rows (boi, patches, eoi; f32 [rows, hidden]) from `mmbridge encode`: the PyTorch and llama.cpp
    runs get these (the tower is not what is timed)."""
    from safetensors.numpy import load_file
    out = a.dir / "cogvlm-rows.safetensors"
    run_child([ROOT / a.build / "mmbridge", "encode", dc, img, "-o", out, "--threads", max(a.threads)])
    rows = load_file(str(out))["embeddings"][0]
    out.unlink()
    return rows


# ---- PyTorch ------------------------------------------------------------------------------------------------

def reference_module():
    """tests/oracle/test_cogvlm.py: the reference written from the remote code (build_position_ids,
    get_expert_mask, lm_ref)."""
    sys.path.insert(0, str(ROOT / "tests" / "oracle"))
    import test_cogvlm
    return test_cogvlm


class Torch:
    """The CogVLM LLM as the remote code computes it (VisionExpertAttention, VisionExpertMLP) and the plain Llama,
    over tensors mapped from the two safetensors files; bf16 (or, for the checks, another dtype: a copy)."""

    def __init__(self, s, dc, dp, dtype=None):
        import torch
        self.torch, self.s = torch, s
        self.dt = dtype or torch.bfloat16
        self.cog, self.plain = Mapped(dc / "model.safetensors"), Mapped(dp / "model.safetensors")
        conv = (lambda t: t) if self.dt == torch.bfloat16 else (lambda t: t.to(self.dt))
        self.wc = {k: conv(self.cog[k]) for k in self.cog.keys() if not k.startswith("model.vision.")}
        self.wp = {k: conv(self.plain[k]) for k in self.plain.keys()}
        hd = s["hidden"] // s["heads"]
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))  # RotaryEmbedding, base 10000
        emb = torch.cat([torch.outer(torch.arange(4096, dtype=inv.dtype), inv)] * 2, dim=-1)
        self.cos, self.sin = emb.cos().to(self.dt), emb.sin().to(self.dt)  # cos_cached / sin_cached in x.dtype
        self.ref = reference_module()

    # -- the remote code's pieces
    def rms(self, x, w):
        """RMSNorm: in f32, the weight times the normalised rows, back to the input's dtype."""
        h = x.float()
        h = h * self.torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return (w * h).to(x.dtype)

    def rope(self, q, k, pos):
        """apply_rotary_pos_emb_index_bhs: q, k (B, H, L, hd); positions (B, L)."""
        F = self.torch.nn.functional
        cos, sin = F.embedding(pos, self.cos).unsqueeze(1), F.embedding(pos, self.sin).unsqueeze(1)
        rot = self.ref.rotate_half
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin

    def heads(self, t):
        B, L, _ = t.shape
        return t.view(B, L, self.s["heads"], -1).permute(0, 2, 1, 3)

    def attend(self, q, k, v, causal):
        """attention_fn: scaled_dot_product_attention, is_causal for the prefill's lower-triangular mask."""
        return self.torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                                                     is_causal=causal)

    def expert(self, h, vm, lm, name, out_dim):
        """The remote code's split: torch.empty, then out[vision] = vision(h[vision]), out[lang] = lang(h[lang])."""
        F = self.torch.nn.functional
        out = self.torch.empty(h.shape[:-1] + (out_dim,), dtype=h.dtype)
        out[vm] = F.linear(h[vm], self.wc[name.format("vision")])
        out[lm] = F.linear(h[lm], self.wc[name.format("language")])
        return out

    def cog_forward(self, x, tt, pos, cache):
        """CogVLMModel.llm_forward over x (1, L, D) with token types tt (1, L), positions (1, L), the KV cache (a
        list of (K, V) per layer, extended): the final-normed last row's logits (1, vocab)."""
        torch, F, s = self.torch, self.torch.nn.functional, self.s
        D = s["hidden"]
        vm = self.ref.expert_mask(tt)  # get_expert_mask: (vision, language) = (m, ~m)
        lm = ~vm
        L = x.shape[1]
        for i in range(s["layers"]):
            q = f"model.layers.{i}."
            res = x
            h = self.rms(x, self.wc[q + "input_layernorm.weight"])
            qkv = self.expert(h, vm, lm, q + "self_attn.{}_expert_query_key_value.weight", 3 * D)
            qs, ks, vs = (self.heads(t) for t in torch.split(qkv, D, dim=-1))
            qs, ks = self.rope(qs, ks, pos)
            if cache[i] is not None:
                ks, vs = torch.cat([cache[i][0], ks], dim=2), torch.cat([cache[i][1], vs], dim=2)
            cache[i] = (ks, vs)
            ctx = self.attend(qs, ks, vs, causal=L > 1).transpose(1, 2).contiguous().reshape(1, L, D)
            x = res + self.expert(ctx, vm, lm, q + "self_attn.{}_expert_dense.weight", D)
            h = self.rms(x, self.wc[q + "post_attention_layernorm.weight"])
            out = torch.empty(h.shape, dtype=h.dtype)  # VisionExpertMLP: MLP = down(silu(gate(x)) * up(x))
            for m, e in ((vm, "vision"), (lm, "language")):
                hm = h[m]
                p = q + f"mlp.{e}_mlp."
                out[m] = F.linear(F.silu(F.linear(hm, self.wc[p + "gate_proj.weight"])) *
                                  F.linear(hm, self.wc[p + "up_proj.weight"]), self.wc[p + "down_proj.weight"])
            x = x + out
        last = self.rms(x[:, -1:], self.wc["model.norm.weight"])
        return F.linear(last, self.wc["lm_head.weight"])[:, -1]

    def plain_forward(self, x, pos, cache):
        """LlamaForCausalLM (LlamaAttention's q_proj / k_proj / v_proj / o_proj, LlamaMLP) over x (1, L, D)."""
        torch, F, s, w = self.torch, self.torch.nn.functional, self.s, self.wp
        D = s["hidden"]
        L = x.shape[1]
        for i in range(s["layers"]):
            q = f"model.layers.{i}."
            res = x
            h = self.rms(x, w[q + "input_layernorm.weight"])
            qs, ks, vs = (self.heads(F.linear(h, w[q + f"self_attn.{n}_proj.weight"])) for n in "qkv")
            qs, ks = self.rope(qs, ks, pos)
            if cache[i] is not None:
                ks, vs = torch.cat([cache[i][0], ks], dim=2), torch.cat([cache[i][1], vs], dim=2)
            cache[i] = (ks, vs)
            ctx = self.attend(qs, ks, vs, causal=L > 1).transpose(1, 2).contiguous().reshape(1, L, D)
            x = res + F.linear(ctx, w[q + "self_attn.o_proj.weight"])
            h = self.rms(x, w[q + "post_attention_layernorm.weight"])
            x = x + F.linear(F.silu(F.linear(h, w[q + "mlp.gate_proj.weight"])) * F.linear(h, w[q + "mlp.up_proj.weight"]),
                             w[q + "mlp.down_proj.weight"])
        last = self.rms(x[:, -1:], w["model.norm.weight"])
        return F.linear(last, w["lm_head.weight"])[:, -1]

    # -- the runs
    def run_cog(self, ids, tt, rows, n):
        """Prefill (the embedding, the splice of the image rows over token type VISION as CogVLMModel.forward
        does, the layers, the last row's logits), then n - 1 greedy decode steps (each new row LANGUAGE, its
        position the last + 1, as the remote code's generate gives it). (prefill s, decode tok/s, ids)."""
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            x = F_embedding(torch, ids, self.wc["model.embed_tokens.weight"])
            x[tt == VISION] = rows
            pos = self.ref.build_position_ids(tt)
            cache = [None] * self.s["layers"]
            logits = self.cog_forward(x, tt, pos, cache)
            t1 = time.perf_counter()
            tok, p, out = int(logits.argmax()), int(pos.max()), []
            out.append(tok)
            one = torch.tensor([[LANG]])
            for _ in range(n - 1):
                p += 1
                x = F_embedding(torch, torch.tensor([[tok]]), self.wc["model.embed_tokens.weight"])
                logits = self.cog_forward(x, one, torch.tensor([[p]]), cache)
                tok = int(logits.argmax())
                out.append(tok)
            t2 = time.perf_counter()
        return t1 - t0, (n - 1) / (t2 - t1), out

    def run_plain(self, ids, n):
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            x = F_embedding(torch, ids, self.wp["model.embed_tokens.weight"])
            cache = [None] * self.s["layers"]
            logits = self.plain_forward(x, torch.arange(ids.shape[1])[None], cache)
            t1 = time.perf_counter()
            tok, p, out = int(logits.argmax()), ids.shape[1] - 1, []
            out.append(tok)
            for _ in range(n - 1):
                p += 1
                x = F_embedding(torch, torch.tensor([[tok]]), self.wp["model.embed_tokens.weight"])
                logits = self.plain_forward(x, torch.tensor([[p]]), cache)
                tok = int(logits.argmax())
                out.append(tok)
            t2 = time.perf_counter()
        return t1 - t0, (n - 1) / (t2 - t1), out


def F_embedding(torch, ids, w):
    return torch.nn.functional.embedding(ids, w).clone()


def torch_checks(s, dc, dp, ids, tt, rows):
    """At toy sizes (--quick), in f32 on the bf16 weights: the bench's CogVLM module against the test's reference
    (lm_ref, written from the remote code) on every row, and its plain module against transformers'
    LlamaForCausalLM on the plain checkpoint. Returns {check: scaled max error}."""
    import torch
    ref = reference_module()
    t = Torch(s, dc, dp, dtype=torch.float32)
    saved = dict(ref.LM)
    ref.LM.update(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], rms_norm_eps=1e-5)
    try:
        with torch.inference_mode():
            x = F_embedding(torch, ids, t.wc["model.embed_tokens.weight"])
            x[tt == VISION] = torch.from_numpy(rows).float()
            pos = ref.build_position_ids(tt)
            want = ref.lm_ref(t.wc, x[0], pos[0], ref.expert_mask(tt)[0])[-1]
            got = t.cog_forward(x, tt, pos, [None] * s["layers"])[0]
            err = {"cogvlm module vs the test's lm_ref": ref_err(got, want)}
            from transformers import LlamaForCausalLM
            m = LlamaForCausalLM.from_pretrained(dp, dtype=torch.float32).eval()
            want = m(input_ids=ids).logits[0, -1]
            got = t.plain_forward(F_embedding(torch, ids, t.wp["model.embed_tokens.weight"]),
                                  torch.arange(ids.shape[1])[None], [None] * s["layers"])[0]
            err["plain module vs transformers' LlamaForCausalLM"] = ref_err(got, want)
    finally:
        ref.LM.clear()
        ref.LM.update(saved)
    return err


def ref_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / max(1.0, want.abs().max().item())).item()


# ---- llama.cpp ------------------------------------------------------------------------------------------------

def llama_cpp_version():
    try:
        from importlib.metadata import version
        return version("llama_cpp_python")
    except Exception:
        return None


def llama_sources(a):
    """The sdist's llama.cpp directory (convert_hf_to_gguf.py, conversion/, gguf-py/) in --dir, fetched with pip
    download when missing: (path, None) or (None, why not)."""
    base = a.dir / "llama-cpp-src"
    top = base / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if (top / "convert_hf_to_gguf.py").exists() and (top / "conversion").is_dir() and (top / "gguf-py").is_dir():
        return top, None
    sdist = base / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.exists():
        log(f"fetching llama-cpp-python {LLAMA_CPP_VERSION}'s sdist (its converter) into {base}")
        base.mkdir(parents=True, exist_ok=True)
        p = subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_VERSION}",
                            "--no-deps", "--no-binary", ":all:", "-d", str(base)], capture_output=True, text=True)
        if p.returncode or not sdist.exists():
            return None, f"pip download of the sdist failed: {p.stderr.strip()[-300:]}"
    import tarfile
    pre = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
    keep = (pre + "convert_hf_to_gguf.py", pre + "conversion/", pre + "gguf-py/",
            pre + "src/models/cogvlm.cpp", pre + "LICENSE")
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(keep)]
        tf.extractall(base, members=members, filter="data")
    return top, None


def converter(src, d, out, wrapper=None):
    """Runs convert_hf_to_gguf.py d --outtype bf16 (through `wrapper`, a script that patches it, when given):
    None, or why it failed (its last lines)."""
    tmp = out.with_suffix(".tmp.gguf")
    tmp.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", wrapper, str(src)] if wrapper else [sys.executable, str(src / "convert_hf_to_gguf.py")]
    p = subprocess.run(cmd + [str(d), "--outtype", "bf16", "--outfile", str(tmp)], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if p.returncode or not tmp.exists():
        tmp.unlink(missing_ok=True)
        lines = [l.strip() for l in (p.stderr + p.stdout).strip().splitlines() if l.strip()]
        return " / ".join(lines[-2:])[-400:] or f"exit status {p.returncode}"
    tmp.rename(out)
    return None


# The converter's CogVLMModel (conversion/cogvlm.py) has no filter of its own: TextModel.filter_tensors skips
# every name holding "vision_", the vision expert's too. This restores the rule its earlier modify_tensors had
# (only model.vision.*, the tower, is left to --mmproj) and runs the converter unchanged otherwise.
KEEP_EXPERT = r"""
import runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
sys.path.insert(1, src + "/gguf-py")
from conversion import cogvlm
from conversion.base import ModelBase

def filter_tensors(cls, item):
    if item[0].startswith("model.vision."):
        return None
    return ModelBase.filter_tensors.__func__(cls, item)

cogvlm.CogVLMModel.filter_tensors = classmethod(filter_tensors)
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# Which of the given tensor names the converter's own CogVLM text class leaves out of the GGUF.
DROPPED = r"""
import json, sys
src, names = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, src)
sys.path.insert(1, src + "/gguf-py")
from conversion import get_model_class
cls = get_model_class("CogVLMForCausalLM")
print(json.dumps([n for n in names if cls.filter_tensors((n, None)) is None]))
"""


def gguf_tensor_names(src, path):
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import gguf; "
            "print(json.dumps([t.name for t in gguf.GGUFReader(sys.argv[2]).tensors]))")
    p = subprocess.run([sys.executable, "-c", code, str(src / "gguf-py"), str(path)], capture_output=True, text=True,
                       check=True)
    return json.loads(p.stdout)


def convert(a, src, d, out, kind):
    """The GGUF of checkpoint d by llama.cpp's converter, bf16: (path or None, [what it took, in words]). The
    CogVLM checkpoint as the hub lays it out is tried first; where the converter fails on it, the failures are
    recorded and worked around (a config.json with num_key_value_heads, the expert's tensors kept), each said."""
    notes_f = out.with_suffix(".notes.json")
    if out.exists() and notes_f.exists():
        return out, json.loads(notes_f.read_text())
    notes = []
    why = converter(src, d, out)
    if kind == "plain":
        if why:
            return None, [f"convert_hf_to_gguf.py failed on the plain LlamaForCausalLM: {why}"]
        notes_f.write_text(json.dumps(notes))
        return out, notes
    if why:
        notes.append(f"convert_hf_to_gguf.py fails on the checkpoint as cogvlm-chat-hf lays it out: {why}")
    names = [k for k in Mapped(d / "model.safetensors").keys() if k.startswith("model.layers.0.")
             and ("vision_expert" in k or "vision_mlp" in k)]
    p = subprocess.run([sys.executable, "-c", DROPPED, str(src), json.dumps(names)], capture_output=True, text=True)
    dropped = json.loads(p.stdout) if p.returncode == 0 else []
    if dropped:
        notes.append("its CogVLMModel class inherits TextModel.filter_tensors, which leaves out every tensor whose "
                     "name holds \"vision_\" (the multimodal towers' rule), so the vision expert's "
                     f"{', '.join(n.split('.', 3)[3] for n in dropped)} of every layer would be missing and llama.cpp's "
                     "cogvlm loader (which requires blk.N.vis_attn_qkv, vis_attn_output, vis_gate, vis_up, vis_down) "
                     "refuses the file")
    if not why and not dropped:
        notes_f.write_text(json.dumps(notes))
        return out, notes
    out.unlink(missing_ok=True)
    shadow = d.parent / f"{d.name}-for-convert"
    shadow.mkdir(exist_ok=True)
    for f in d.iterdir():
        if f.name != "config.json" and not (shadow / f.name).exists():
            (shadow / f.name).symlink_to(f.resolve())
    cfg = json.loads((d / "config.json").read_text())
    if "num_key_value_heads" not in cfg:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
        notes.append("converted from a copy of config.json with num_key_value_heads = num_attention_heads added "
                     "(LlamaModel.modify_tensors asks for it; the remote code's CogVLMConfig has no such field, so a "
                     "config.json laid out as cogvlm-chat-hf's has none: MHA)")
    (shadow / "config.json").write_text(json.dumps(cfg, indent=2))
    if dropped:
        notes.append("and through a wrapper that gives CogVLMModel the filter its earlier modify_tensors had "
                     "(only model.vision.*, the tower, left out)")
    why2 = converter(src, shadow, out, KEEP_EXPERT if dropped else None)
    if why2:
        return None, notes + [f"even so the converter failed: {why2}"]
    if dropped and a.quick:  # at toy size, that llama.cpp does refuse the converter's own output
        bare = out.with_name(out.stem + "-own-filter.gguf")
        if not converter(src, shadow, bare):
            env = dict(os.environ, OMP_NUM_THREADS="1")
            o, _, _ = run_child([sys.executable, __file__, "--llama-child",
                                 json.dumps(dict(gguf=str(bare), load_only=True))], env=env)
            r = json.loads(o.strip().splitlines()[-1])
            notes.append("(checked here: the converter's own filter gives a file llama.cpp "
                         + ("loads" if r["loaded"] else f"refuses: {r['error']}") + ")")
            bare.unlink()
    vis = [n for n in gguf_tensor_names(src, out) if ".vis_" in n]
    if len(vis) != 5 * a.shape["layers"]:
        out.unlink()
        return None, notes + [f"the GGUF holds {len(vis)} vision-expert tensors, not {5 * a.shape['layers']}"]
    notes_f.write_text(json.dumps(notes))
    return out, notes


def llama_run(a, gguf, th, n, ids_head, rows_file, ids_tail, tail_all=False, return_logits=False):
    """One llama.cpp run in a child process (this script with --llama-child): dict(prefill s, decode tok/s, ids,
    rss, info). The prompt in batches: ids_head, the rows (a batch of embeddings), ids_tail (each batch present
    when not empty); the logits of the last row, or with tail_all of every row of the last batch."""
    req = dict(gguf=str(gguf), threads=th, n=n, head=ids_head, rows=str(rows_file) if rows_file else None,
               tail=ids_tail, tail_all=tail_all, return_logits=return_logits)
    env = dict(os.environ, OMP_NUM_THREADS=str(th))
    out, err, rss = run_child([sys.executable, __file__, "--llama-child", json.dumps(req)], env=env)
    r = json.loads(out.strip().splitlines()[-1])
    r["rss"] = rss
    return r


def llama_child(req):
    """One run: load (mmap), a warm-up decode of one token, then the timed prompt (head ids, rows as a batch of
    embeddings, tail ids; the last row's logits) and n - 1 greedy steps. Prints one JSON line."""
    import ctypes

    import numpy as np
    import llama_cpp as L
    said = []

    def said_so(level, text, user):
        said.append(text.decode("utf-8", "replace"))
    keep = L.llama_log_callback(said_so)
    L.llama_log_set(keep, ctypes.c_void_p(0))
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_mmap = True
    model = L.llama_model_load_from_file(req["gguf"].encode(), mp)
    if req.get("load_only"):  # does llama.cpp take the file? (its error lines if not)
        err = [l.strip() for l in "".join(said).splitlines() if "error" in l or "failed" in l]
        print(json.dumps(dict(loaded=bool(model), error=" / ".join(err[-2:]))))
        return
    if not model:
        raise SystemExit(f"llama.cpp could not load {req['gguf']}: {''.join(said)[-500:]}")
    rows = np.load(req["rows"]).astype(np.float32) if req["rows"] else None
    total = len(req["head"]) + (len(rows) if rows is not None else 0) + len(req["tail"])
    cp = L.llama_context_default_params()
    cp.n_ctx = total + req["n"] + 16
    cp.n_batch = max(total, 512)
    cp.n_threads = cp.n_threads_batch = req["threads"]
    cp.no_perf = False
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not make a context")
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    n_embd = L.llama_model_n_embd(model)
    mem = L.llama_get_memory(ctx)

    def token_batch(toks, pos0, last_logits):
        b = L.llama_batch_init(len(toks), 0, 1)
        for i, t in enumerate(toks):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, pos0 + i, 1, 0
            b.logits[i] = 0
        b.n_tokens = len(toks)
        return b

    def embd_batch(r, pos0):
        b = L.llama_batch_init(len(r), n_embd, 1)
        ctypes.memmove(b.embd, np.ascontiguousarray(r).ctypes.data, r.nbytes)
        for i in range(len(r)):
            b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = pos0 + i, 1, 0, 0
        b.n_tokens = len(r)
        return b

    def decode(b):
        rc = L.llama_decode(ctx, b)
        if rc:
            raise SystemExit(f"llama_decode returned {rc}")

    def argmax():
        return int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(vocab,))))

    batches, pos = [], 0
    if req["head"]:
        batches.append(token_batch(req["head"], 0, False))
        pos += len(req["head"])
    if rows is not None:
        batches.append(embd_batch(rows, pos))
        pos += len(rows)
    if req["tail"]:
        batches.append(token_batch(req["tail"], pos, True))
    last = batches[-1]
    if req.get("tail_all"):
        for i in range(last.n_tokens):
            last.logits[i] = 1
    else:
        last.logits[last.n_tokens - 1] = 1
    step = L.llama_batch_init(1, 0, 1)
    step.n_tokens, step.n_seq_id[0], step.seq_id[0][0], step.logits[0] = 1, 1, 0, 1
    # warm-up (as llama.cpp's common_init does: one token, then the memory cleared)
    step.token[0], step.pos[0] = req["head"][0], 0
    decode(step)
    L.llama_memory_clear(mem, True)
    L.llama_perf_context_reset(ctx)
    t0 = time.perf_counter()
    for b in batches:
        decode(b)
    t1 = time.perf_counter()
    handed = {}
    if req.get("return_logits"):  # for the check of --quick: the row llama.cpp hands back, and the batch's first
        row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(vocab,))
        handed["logits_last"] = row.tolist()
        if req.get("tail_all"):
            handed["logits_first"] = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, 0), shape=(vocab,)).tolist()
    tok, out = argmax(), []
    out.append(tok)
    p = total
    for _ in range(req["n"] - 1):
        step.token[0], step.pos[0] = tok, p
        decode(step)
        tok = argmax()
        out.append(tok)
        p += 1
    t2 = time.perf_counter()
    log_text = "".join(said)

    def grab(pattern):
        m = re.search(pattern, log_text)
        return m.group(1) if m else "?"
    got = [grab(r"n_batch += (\d+)"), grab(r"n_ubatch += (\d+)"), grab(r"flash_attn += (\w+)"),
           grab(r"Flash Attention (\w+)"), grab(r"K \((\w+)\)"), grab(r"V \((\w+)\)"),
           grab(r"(CPU_\w+|CPU) model buffer")]
    info = ("n_batch {}, n_ubatch {}, flash attention {} ({}), KV cache K {} V {}, weights in the {} buffer "
            "(mmap)").format(*got)
    pf = L.llama_perf_context(ctx)  # llama.cpp's own: batches of more than one row are "prompt eval"
    perf = dict(p_eval_s=pf.t_p_eval_ms * 1e-3, n_p_eval=pf.n_p_eval, eval_s=pf.t_eval_ms * 1e-3, n_eval=pf.n_eval)
    print(json.dumps(dict(prefill=t1 - t0, decode=(req["n"] - 1) / (t2 - t1), ids=out, positions=total, info=info,
                          perf=perf, **handed)))
    for b in batches + [step]:
        L.llama_batch_free(b)
    L.llama_free(ctx)
    L.llama_model_free(model)


# ---- the report -------------------------------------------------------------------------------------------------

NAMES = {"mmbridge": "mmbridge `generate`", "pytorch": "PyTorch {torch}, bf16 (the remote code's module)",
         "llama.cpp": "llama.cpp (llama-cpp-python {llama}), bf16 GGUF"}


def report(a, res, meta):
    s, P, fl = a.shape, meta["positions"], meta["flops"]
    prow, drow = [], []
    for th, r in res.items():
        pk, pk16, bw = meta["peak"][th], meta["peak16"].get(th), meta["bw"][th]
        bound = bw / meta["bytes"]
        prow.append([th, f"FMA peak ({pk * 1e-9:.0f} GFLOP/s fp32" +
                     (f"; bf16 dpbf16 {pk16 * 1e-9:.0f}" if pk16 else "") + ")",
                     f"{P / (fl / pk):.0f}", "100 %", f"{P / (fl / pk):.0f}", "100 %", "1 (same FLOPs)", ""])
        drow.append([th, f"bandwidth bound ({bw * 1e-9:.1f} GB/s read)", f"{bound:.2f}", "100 %", f"{bound:.2f}",
                     "100 %", "1 (same bytes)", ""])
        for impl in ("mmbridge", "pytorch", "llama.cpp"):
            c, p = r["runs"].get(f"{impl} cogvlm"), r["runs"].get(f"{impl} plain")
            if not c and not p:
                continue
            name = NAMES[impl].format(torch=meta["torch"], llama=meta.get("llama_version"))
            pc = P / med([x["prefill"] for x in c]) if c else None
            pp = P / med([x["prefill"] for x in p]) if p else None
            dc_ = med([x["decode"] for x in c]) if c else None
            dp_ = med([x["decode"] for x in p]) if p else None
            vs_p = vs_d = ""
            if impl != "mmbridge":
                mc, mp = r["runs"].get("mmbridge cogvlm"), r["runs"].get("mmbridge plain")
                vs_p = " / ".join(
                    f"**{(P / med([x['prefill'] for x in m])) / q:.2f}x**" if m and q else "n/a"
                    for m, q in ((mc, pc), (mp, pp)))
                vs_d = " / ".join(
                    f"**{med([x['decode'] for x in m]) / q:.2f}x**" if m and q else "n/a"
                    for m, q in ((mc, dc_), (mp, dp_)))
            prow.append([th, name,
                         spread([P / x["prefill"] for x in c], "{:.1f}") if c else "n/a",
                         f"{100 * pc * fl / P / pk:.0f} %" if c else "",
                         spread([P / x["prefill"] for x in p], "{:.1f}") if p else "n/a",
                         f"{100 * pp * fl / P / pk:.0f} %" if p else "",
                         f"{pp / pc:.3f}x" if c and p else "", vs_p])
            drow.append([th, name, spread([x["decode"] for x in c]) if c else "n/a",
                         f"{100 * dc_ / bound:.0f} %" if c else "",
                         spread([x["decode"] for x in p]) if p else "n/a",
                         f"{100 * dp_ / bound:.0f} %" if p else "",
                         f"{dp_ / dc_:.3f}x" if c and p else "", vs_d])
    b = meta["bytes_parts"]
    fp = meta["flops_parts"]
    rows = n_image_rows(s)
    g = s["image"] // PATCH
    imgs = "; ".join(f"{th} thr {med([x['images'] for x in r['runs']['mmbridge cogvlm']]):.2f} s"
                     for th, r in res.items() if r["runs"].get("mmbridge cogvlm"))
    agreements = "; ".join(f"{th} thr: " + ", ".join(f"{k} {v}" for k, v in r["agree"].items())
                           for th, r in res.items() if r.get("agree"))
    rss = "; ".join(f"{k} {v.get('VmHWM', 0) * 1e-9:.2f} GB (anonymous {v.get('RssAnon', 0) * 1e-9:.2f}, "
                    f"file-backed {v.get('RssFile', 0) * 1e-9:.2f})" for k, v in meta["rss"].items())
    files = ", ".join(f"{k} {v * 1e-9:.2f} GB" for k, v in meta["files"].items())
    text = [
        f"CogVLMForCausalLM (cogvlm-chat-hf's remote code) on random bf16 weights at CogVLM-17B's LLM widths, "
        f"{s['layers']} of its 32 layers: hidden {s['hidden']}, MLP {s['inter']}, {s['heads']} heads, vocabulary "
        f"{s['vocab']}; each layer with the language and the vision expert's QKV, dense and MLP "
        f"({b['vision_set'] / s['layers'] * 1e-6:.0f} MB of bf16 a set). One {s['image']}x{s['image']} image: "
        f"{g * g} patches + boi + eoi = {rows} rows"
        + (" (CogVLM's 1227)" if rows == 1227 else f" ({rows / 1227:.2f} of CogVLM's 1227)") +
        f" through a tiny EVA2-CLIP tower ({s['v_layers']} layer of width {s['v_hidden']}: its cost is not the "
        "question) and the GLU adapter at the LLM's widths; the prompt (template base): BOS, the image rows, "
        f"\"{PROMPT}\": {P} positions. Plain: the same layers' language-expert weights as a LlamaForCausalLM, "
        f"the same {P} positions as ids. Threads: {', '.join(map(str, a.threads))}; ISA: mmbridge's own kernel "
        f"{kernel_isa()} (bf16 weights widened to f32, f32 activations); PyTorch's CPU kernels (oneDNN) and "
        "llama.cpp's ggml-cpu (built by pip on this machine: "
        f"{meta.get('llama_sysinfo', 'n/a')}) compute in bf16.",
        "",
        f"**Prefill**, tokens/s of the {P} positions through the LLM (the tower, the adapter and the splice not "
        f"timed; median of {a.reps} runs; {fl * 1e12 ** -1:.2f} TFLOP: projections and MLP "
        f"{fp['linear'] * 1e-12:.2f}, causal attention {fp['attention'] * 1e-12:.3f}, lm_head of the last row "
        f"{fp['head'] * 1e-9:.2f} GFLOP; the same with and without the expert, each row running one set). "
        "% of FMA peak: of bench_gemm's fp32 probe at that thread count (the best of the run). expert's cost: "
        "seconds with the expert over without. mmbridge speed-up: mmbridge's tokens/s over the peer's, with / "
        "without the expert.",
        "",
        table(["threads", "implementation", "with the expert tok/s", "% of FMA peak", "plain tok/s", "% of FMA peak",
               "expert's cost", "mmbridge speed-up"], prow),
        "",
        f"**Decode**, tokens/s of the {a.decode - 1} greedy steps after the first token (--ignore-eos; median of "
        f"{a.reps} runs). % of bound: of read bandwidth / the bytes a step must read, the language expert's weights "
        f"({meta['bytes'] * 1e-9:.2f} GB bf16: the layers' language set and norms, the final norm, lm_head "
        f"{b['head'] * 1e-9:.2f} GB; not the vision set's {b['vision_set'] * 1e-9:.2f} GB, which a text row does "
        f"not read; the KV cache, {meta['kv_bytes'] * 1e-6:.0f} MB in f32 at the mean context, not counted).",
        "",
        table(["threads", "implementation", "with the expert tok/s", "% of bound", "plain tok/s", "% of bound",
               "expert's cost", "mmbridge speed-up"], drow),
        "",
        f"mmbridge `generate`'s image encode (the tower, the GLU adapter, boi/eoi; subtracted from its prefill): "
        f"{imgs or 'n/a'}. Peak RSS (VmHWM; and the largest anonymous and file-backed parts, polled; the "
        f"file-backed pages are the mapped weights, the page cache's, shared by every process mapping the same "
        f"file): {rss or 'n/a'}. The files (each its own page-cache pages): {files}; "
        f"{sum(meta['files'].values()) * 1e-9:.1f} GB in all. llama.cpp's context: {meta.get('llama_info', 'n/a')}.",
        "",
        f"Greedy ids identical, of {a.decode} (leading): {agreements or 'n/a'} (mmbridge computes in f32 on bf16 "
        "weights, PyTorch and llama.cpp in bf16: on random weights near-ties part them; llama.cpp's CogVLM is "
        "not the remote code's on the image: its vision set also takes eoi, and its positions are sequential).",
    ]
    extra = []
    for th, r in res.items():
        t, p, c = r["runs"].get("llama.cpp cogvlm ids"), r["runs"].get("llama.cpp plain"), r["runs"].get("llama.cpp cogvlm")
        if t:
            pt, dt = P / med([x["prefill"] for x in t]), med([x["decode"] for x in t])
            extra.append(f"{th} thr: prefill {spread([P / x['prefill'] for x in t], '{:.1f}')} tok/s, decode "
                         f"{spread([x['decode'] for x in t])} tok/s"
                         + (f" (plain over it: {P / med([x['prefill'] for x in p]) / pt:.3f}x and "
                            f"{med([x['decode'] for x in p]) / dt:.3f}x" if p else "")
                         + (f"; it over the image path: {pt / (P / med([x['prefill'] for x in c])):.3f}x prefill"
                            if c else "") + (")" if p else ""))
    if extra:
        lost = 2 * s["hidden"] * s["vocab"] * (P - 1)
        text += ["", f"llama.cpp's CogVLM GGUF fed all {P} positions as ids (BOS and the image's rows as one batch of "
                 f"ids, then the {P - 1 - rows} text ids: its text path, the language set only), which separates its "
                 "cogvlm graph's own cost from the vision set's: " + "; ".join(extra) + ". That graph "
                 "(src/models/cogvlm.cpp) has no output-row selection (no inp_out_ids, which llama.cpp's Llama graph "
                 f"has): lm_head runs on every row of every batch ({lost * 1e-9:.0f} GFLOP more than one row's, "
                 f"{100 * lost / fl:.0f} % of the prefill's FLOPs), and where only the last row's logits are asked "
                 "for, llama.cpp hands back the first row's (" + (meta["last_row_check"] if meta.get("last_row_check") else
                 "bench_cogvlm.py --quick checks it") + "); so the CogVLM GGUF's runs ask for the logits of every row of their last batch "
                 "(the text) and take the last."]
    cn = meta.get("convert_notes", {})
    if cn:
        text += ["", "llama.cpp's converter (convert_hf_to_gguf.py of the llama-cpp-python "
                 f"{LLAMA_CPP_VERSION} sdist, --outtype bf16): the plain LlamaForCausalLM "
                 + ("as it is" if "plain" in cn and not cn["plain"] else "; ".join(cn.get("plain", ["not run"])))
                 + "; the CogVLM checkpoint: " + ("as it is" if "cogvlm" in cn and not cn["cogvlm"]
                                                   else "; ".join(cn.get("cogvlm", ["not run"]))) + "."]
    for k, v in meta.get("checks", {}).items():
        text += ["", f"Check (--quick, f32 on the bf16 weights): {k}: scaled max error {v:.1e}."]
    for why in meta.get("not_measured", []):
        text += ["", f"Not measured: {why}"]
    return "\n".join(text)


def machine_lines(a, meta):
    return bench_lib.machine_lines(a.build, meta["peak"], LOAD0, meta["bw"], meta.get("peak16"))


def append(path, section):
    bench_lib.append(path, "bench_cogvlm.py", section)


def main():
    a = parse_args()
    if a.llama_child:
        return llama_child(json.loads(a.llama_child))
    for tgt in ("mmbridge", "bench_decoder", "bench_gemm"):
        if not (ROOT / a.build / tgt).exists():
            sys.exit(f"bench_cogvlm: {a.build}/{tgt} is missing: cmake -S . -B {a.build} -DCMAKE_BUILD_TYPE=Release "
                     f"&& cmake --build {a.build} -j2")
    import numpy as np
    import torch
    s = a.shape
    dc, dp, img = checkpoints(a)
    meta = {"peak": {}, "peak16": {}, "bw": {}, "torch": torch.__version__.split("+")[0], "rss": {},
            "not_measured": [], "llama_version": llama_cpp_version()}
    # the prompt: BOS, the image rows, the text tokenized alone (template base, as mmbridge --raw builds it)
    from tokenizers import Tokenizer
    text = Tokenizer.from_file(str(dc / "tokenizer.json")).encode(PROMPT, add_special_tokens=False).ids
    rows_n = n_image_rows(s)
    ids = [1] + [0] * rows_n + text
    tt = [LANG] + [VISION] * rows_n + [LANG] * len(text)
    P = len(ids)
    meta["positions"] = P
    meta["flops"], meta["flops_parts"] = prefill_flops(s, P)
    meta["bytes"], meta["bytes_parts"] = decode_bytes(dc)
    meta["kv_bytes"] = s["layers"] * 2 * s["hidden"] * 4 * (P + 0.5 * a.decode)
    meta["files"] = {"CogVLM safetensors": file_bytes(dc), "plain safetensors": file_bytes(dp)}
    log(f"{P} positions ({rows_n} image rows); encoding the image once for PyTorch and llama.cpp")
    rows = mmb_encode_rows(a, dc, img)
    assert rows.shape == (rows_n, s["hidden"]), rows.shape
    rows_file = a.dir / f"cogvlm-rows-{s['image']}-{s['hidden']}.npy"
    np.save(rows_file, rows)

    # llama.cpp: its converter on both checkpoints
    gg = {}
    want_llama = [i for i in a.impls if i.startswith("llama.cpp")]
    if want_llama and not meta["llama_version"]:
        meta["not_measured"].append("llama.cpp: llama-cpp-python is not installed (pip install "
                                    f"llama-cpp-python=={LLAMA_CPP_VERSION}).")
    elif want_llama:
        try:
            import llama_cpp
            meta["llama_sysinfo"] = llama_cpp.llama_print_system_info().decode().strip().rstrip("|").strip()
        except Exception as e:  # noqa: BLE001 - reported
            meta["llama_sysinfo"] = f"unknown ({e})"
        src, why = llama_sources(a)
        if not src:
            meta["not_measured"].append(f"llama.cpp: its converter could not be had: {why}")
        else:
            for kind, d in (("cogvlm", dc), ("plain", dp)):
                if f"llama.cpp {kind}" not in a.impls:
                    continue
                log(f"converting the {kind} checkpoint with llama.cpp's convert_hf_to_gguf.py (bf16)")
                out, notes = convert(a, src, d, d.parent / f"{kind}-bf16.gguf", kind)
                meta.setdefault("convert_notes", {})[kind] = notes
                if out:
                    gg[kind] = out
                    meta["files"][f"{kind} GGUF"] = out.stat().st_size
                else:
                    meta["not_measured"].append(f"llama.cpp {kind}: " + "; ".join(notes))
    impls = [i for i in IMPLS if i in a.impls and not (i.startswith("llama.cpp") and i.split()[1] not in gg)]

    # the page cache: no run pays the first read
    for f in [*dc.glob("*.safetensors"), *dp.glob("*.safetensors"), *gg.values()]:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    tp = Torch(s, dc, dp) if any(i.startswith("pytorch") for i in impls) else None
    if a.quick and tp:
        meta["checks"] = torch_checks(s, dc, dp, torch.tensor([ids]), torch.tensor([tt]), rows)
        for k, v in meta["checks"].items():
            log(f"check: {k}: {v:.1e}")
    ids_t, tt_t = torch.tensor([ids]), torch.tensor([tt])
    rows_t = torch.from_numpy(rows).to(torch.bfloat16)
    n = a.decode
    torch_mem = {}
    runners = {
        "mmbridge cogvlm": lambda th: mmb_generate(a, [dc, "--raw", "--prompt", PROMPT, "--image", img], th, n),
        "mmbridge plain": lambda th: mmb_generate(a, [dp, "--ids", ",".join(map(str, ids))], th, n),
        "pytorch cogvlm": lambda th: dict(zip(("prefill", "decode", "ids"), tp.run_cog(ids_t, tt_t, rows_t, n)),
                                          positions=P, mem=proc_mem(os.getpid(), torch_mem)),
        "pytorch plain": lambda th: dict(zip(("prefill", "decode", "ids"), tp.run_plain(ids_t, n)), positions=P,
                                         mem=proc_mem(os.getpid(), torch_mem)),
        # the CogVLM GGUF: the logits of every row of the last batch, of which the last row's is taken: its graph
        # has no output-row selection (inp_out_ids), so with only the last row's asked for, llama.cpp hands back
        # the first row's
        "llama.cpp cogvlm": lambda th: llama_run(a, gg["cogvlm"], th, n, [1], rows_file, text, tail_all=True),
        "llama.cpp plain": lambda th: llama_run(a, gg["plain"], th, n, ids, None, []),
        "llama.cpp cogvlm ids": lambda th: llama_run(a, gg["cogvlm"], th, n, ids[:-len(text)], None, text,
                                                     tail_all=True),
    }
    res = {}
    jf = open(a.json, "w") if a.json else None
    for th in a.threads:
        torch.set_num_threads(th)
        meta["bw"][th] = max(meta["bw"].get(th, 0), bandwidth(a, th))
        pk, pk16 = fma_peak(a, th)
        meta["peak"][th] = max(meta["peak"].get(th, 0), pk)
        if pk16:
            meta["peak16"][th] = max(meta["peak16"].get(th, 0), pk16)
        log(f"{th} thread(s): {meta['bw'][th] * 1e-9:.1f} GB/s read, fp32 peak {meta['peak'][th] * 1e-9:.1f} "
            "GFLOP/s; PyTorch warm-up")
        if tp:  # torch's first calls (allocations, oneDNN's primitives) on a short prompt
            k = min(P, 24)
            tp.run_cog(ids_t[:, :k], tt_t[:, :k], rows_t[:max(0, min(rows_n, k - 1))], 2)
            tp.run_plain(ids_t[:, :k], 2)
        runs = {i: [] for i in impls}
        for r in range(a.reps):
            order = impls[r % len(impls):] + impls[:r % len(impls)]
            for i in order:
                x = runners[i](th)
                if x["positions"] != P:
                    raise RuntimeError(f"{i}: the prompt is {x['positions']} positions, the bench's {P}")
                runs[i].append(x)
                if x.get("rss"):
                    for k, v in x["rss"].items():
                        meta["rss"].setdefault(i, {})[k] = max(meta["rss"].get(i, {}).get(k, 0), v)
                if x.get("info"):
                    meta["llama_info"] = x["info"]
            log(f"{th} thr, rep {r + 1}/{a.reps}: " + ", ".join(
                f"{i} {P / runs[i][-1]['prefill']:.1f} / {runs[i][-1]['decode']:.2f}" for i in impls)
                + " tok/s (prefill / decode)")
        meta["bw"][th] = max(meta["bw"][th], bandwidth(a, th))
        pk, pk16 = fma_peak(a, th)
        meta["peak"][th] = max(meta["peak"][th], pk)
        if pk16:
            meta["peak16"][th] = max(meta["peak16"].get(th, 0), pk16)
        ag = {}
        for x, y in (("mmbridge cogvlm", "pytorch cogvlm"), ("mmbridge plain", "pytorch plain"),
                     ("mmbridge plain", "llama.cpp plain"), ("mmbridge cogvlm", "llama.cpp cogvlm"),
                     ("llama.cpp cogvlm ids", "llama.cpp plain"), ("mmbridge cogvlm", "mmbridge plain")):
            if runs.get(x) and runs.get(y):
                ag[f"{x} vs {y}"] = agree(runs[x][-1]["ids"], runs[y][-1]["ids"])
        res[th] = dict(runs=runs, agree=ag)
        if a.quick and "cogvlm" in gg:
            one = llama_run(a, gg["cogvlm"], th, 2, ids[:-len(text)], None, text, return_logits=True)
            every = llama_run(a, gg["cogvlm"], th, 2, ids[:-len(text)], None, text, tail_all=True, return_logits=True)
            last, first = torch.tensor(every["logits_last"]), torch.tensor(every["logits_first"])
            got = torch.tensor(one["logits_last"])
            meta["last_row_check"] = (f"checked by --quick: the logits handed back with only the last row's asked for "
                                      f"are {ref_err(got, last):.1e} (scaled) off the last row's and "
                                      f"{ref_err(got, first):.1e} off the first row's of that batch")
    if tp:
        meta["rss"]["this process (PyTorch)"] = proc_mem(os.getpid(), torch_mem)
    if jf:
        for th, r in res.items():
            for i, xs in r["runs"].items():
                jf.write(json.dumps({"bench": "cogvlm", "threads": th, "impl": i, "shape": a.shape, "positions": P,
                                     "prefill_tps": P / med([x["prefill"] for x in xs]),
                                     "prefill_s_all": [x["prefill"] for x in xs],
                                     "decode_tps": med([x["decode"] for x in xs]),
                                     "decode_tps_all": [x["decode"] for x in xs], "flops": meta["flops"],
                                     "peak_gflops": meta["peak"][th] * 1e-9, "bytes_per_token": meta["bytes"],
                                     "read_gbps": meta["bw"][th] * 1e-9}) + "\n")
        jf.close()
    body = report(a, res, meta)
    cmd = "python3 " + shlex.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    head = ["## CogVLM's visual expert (fusion B): prefill and decode with and without the expert", "",
            f"Generated by `{cmd}` in {time.monotonic() - T0:.0f} s"
            + (" (--quick: toy sizes, a smoke run, not a measurement)" if a.quick else "") + ".", ""]
    section = "\n".join(head + machine_lines(a, meta) + ["", body])
    print(section)
    if a.append:
        append(a.append, section)
        log(f"wrote the section into {a.append}")
    if a.quick and any(v > 1e-4 for v in meta.get("checks", {}).values()):
        sys.exit("bench_cogvlm: the PyTorch modules do not compute what the references compute")


if __name__ == "__main__":
    main()
