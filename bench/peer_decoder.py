"""Peer for bench_decoder: a Qwen2ForCausalLM at Qwen2-0.5B's shapes (random weights; --quick: tiny shapes),
written once with save_pretrained in bf16 (the checkpoint mmbridge reads) and timed in PyTorch at a given
thread count: prefill of --prompt tokens, then --decode steps of one token with the KV cache, in bf16 (the
stored weights) and in f32 (the same weights widened).

Prints one JSON line per dtype: prefill and decode seconds (median of --reps) and the peak RSS."""
import argparse
import json
import statistics
import time
from pathlib import Path

from peer_common import rss_mib

ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--quick", action="store_true")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--prompt", type=int, default=128)
ap.add_argument("--decode", type=int, default=32)
ap.add_argument("--dtypes", default="bf16,f32")
ap.add_argument("--prepare-only", action="store_true")
a = ap.parse_args()
name = "qwen2-tiny" if a.quick else "qwen2-0.5b"
ckpt = Path(a.dir) / name
if a.prepare_only and (ckpt / "config.json").exists():  # cached: no need to import torch and transformers
    print(json.dumps({"checkpoint": str(ckpt)}))
    raise SystemExit(0)

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

torch.set_num_threads(a.threads)

if a.quick:
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000)
else:  # Qwen/Qwen2-0.5B
    shape = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936)
cfg = Qwen2Config(**shape, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, eos_token_id=None, bos_token_id=None)
if not (ckpt / "config.json").exists():
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).eval()
    m.to(torch.bfloat16).save_pretrained(ckpt)
    del m
print(json.dumps({"checkpoint": str(ckpt)}))
if a.prepare_only:
    raise SystemExit(0)

model = Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
ids = torch.randint(0, shape["vocab_size"], (1, a.prompt), generator=torch.Generator().manual_seed(0))
for dt in a.dtypes.split(","):
    m = model.to(torch.bfloat16 if dt == "bf16" else torch.float32)
    pre, dec = [], []
    with torch.inference_mode():
        for r in range(a.reps + 1):
            t0 = time.perf_counter()
            out = m(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(a.decode):
                out = m(input_ids=tok, past_key_values=pkv, use_cache=True)
                pkv, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            if r:
                pre.append(t1 - t0)
                dec.append(t2 - t1)
    print(json.dumps({"peer": f"pytorch {dt}", "prefill_s": statistics.median(pre), "decode_s": statistics.median(dec),
                      "peak_rss_mib": rss_mib()}), flush=True)
