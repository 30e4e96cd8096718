"""What fusion type A costs, counted independently of mmbridge from transformers' IdeficsForVisionText2Text:
the gated cross-attention layers' parameters (torch's numel over model.model.gated_cross_attn_layers), the
FLOPs a text position spends in them and the FLOPs of the image's keys and values (from the modules' weight
shapes, and measured by torch's FlopCounterMode over whole forwards of two prompt lengths), and the bytes of
keys and values kept per image (heads x head_dim x the visual tokens the layers read, every layer, f32).
Compared with `mmbridge info`'s cross-attention line and `mmbridge compare --csv`'s type-A row."""
import csv
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import run
from test_fusion_a import images, inputs, make_idefics

CONFIGS = [dict(), dict(layers=4, interval=2, alpha="vector", qk_norm=True),
           dict(layers=3, interval=1, resampler=False, alpha="vector")]


def gated_layer_flops(model, enc):
    """FLOPs torch counts in the gated layers during one forward (matrix products and attention)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(**enc)
    counts = fc.get_flop_counts()
    keys = [k for k in counts if re.search(r"gated_cross_attn_layers\.\d+$", k)]
    assert len(keys) == len(model.model.gated_cross_attn_layers), list(counts)
    return sum(sum(counts[k].values()) for k in keys)


def independent_costs(model, proc, img):
    """The type-A figures, from the model's modules alone."""
    layers = model.model.gated_cross_attn_layers
    seen = []  # what the layers' k_proj read: (batch, visual tokens, vision width)
    hook = layers[0].cross_attn.k_proj.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    short = inputs(proc, ["User:", img, "A cat."])
    long = inputs(proc, ["User:", img, "Describe this image. Assistant: a cat on a mat."])
    f1, f2 = gated_layer_flops(model, short), gated_layer_flops(model, long)
    hook.remove()
    _, T, vis = seen[0]
    n1, n2 = short["input_ids"].shape[1], long["input_ids"].shape[1]
    measured_per_token = (f2 - f1) // (n2 - n1)
    assert (f2 - f1) % (n2 - n1) == 0
    measured_kv = f1 - n1 * measured_per_token
    per_token = kv_flops = kv_bytes = 0
    for g in layers:
        a = g.cross_attn
        inner = a.num_heads * a.head_dim
        assert a.k_proj.weight.shape == (inner, vis) and a.v_proj.weight.shape == (inner, vis)
        mats = [a.q_proj, a.o_proj, g.mlp.gate_proj, g.mlp.up_proj, g.mlp.down_proj]
        per_token += 2 * sum(m.weight.numel() for m in mats) + 2 * 2 * T * inner  # products; q k^T and a v
        kv_flops += 2 * T * (a.k_proj.weight.numel() + a.v_proj.weight.numel())
        kv_bytes += 2 * T * inner * 4
    assert (per_token, kv_flops) == (measured_per_token, measured_kv)  # the shapes and torch's counter agree
    return dict(layers=len(layers), params=sum(p.numel() for p in layers.parameters()), T=T, per_token=per_token,
                kv_flops=kv_flops, kv_bytes=kv_bytes)


INFO = re.compile(r"cross-attention:\s+(\d+) gated layers, (\d+) parameters; (\d+) FLOP per text position seeing "
                  r"one image; per image (\d+) visual tokens, (\d+) bytes of keys and values kept, (\d+) FLOP to "
                  r"compute them once")


@pytest.mark.parametrize("cfg", CONFIGS, ids=["float", "interval2-vector-qknorm", "no-resampler"])
def test_type_a_costs_match_an_independent_count(tmp_path, cfg):
    d = tmp_path / "idefics"
    model, proc = make_idefics(d, **cfg)
    (img,) = images(tmp_path, 1)
    want = independent_costs(model, proc, img)
    # every parameter of a gated layer is one of those named in the layer's description
    names = {n.split(".", 1)[1] for n, _ in model.model.gated_cross_attn_layers.named_parameters()}
    expect = {f"cross_attn.{p}_proj.weight" for p in "qkvo"} | {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    expect |= {"input_layernorm.weight", "post_attention_layernorm.weight", "alpha_cross_attn", "alpha_dense"}
    if cfg.get("qk_norm"):
        expect |= {"cross_attn.q_layer_norm.weight", "cross_attn.k_layer_norm.weight"}
    assert names == expect
    print(f"IDEFICS {cfg}: {want}")

    m = INFO.search(run("info", d).stdout)
    assert m, "no cross-attention line"
    got = dict(zip(["layers", "params", "per_token", "T", "kv_bytes", "kv_flops"], map(int, m.groups())))
    assert got == {k: want[k] for k in got}

    run("compare", d, "--reps", 1, "--threads", 2, "--csv", tmp_path / "c.csv")
    (r,) = list(csv.DictReader(open(tmp_path / "c.csv")))
    c = model.config
    assert r["fusion"] == "A" and r["llm"] == f"{c.num_hidden_layers}x{c.hidden_size}x{c.intermediate_size} checkpoint"
    assert int(r["visual_tokens"]) == want["T"]
    assert int(r["llm_positions"]) == 1 and float(r["llm_prefill_tflop"]) == 0  # no prefill positions for the image
    assert int(r["xattn_layers"]) == want["layers"] and int(r["xattn_params"]) == want["params"]
    assert int(r["llm_flops_per_text_token"]) == want["per_token"]
    assert int(r["xattn_kv_flops_per_image"]) == want["kv_flops"]
    assert int(r["llm_kv_bytes_per_image"]) == want["kv_bytes"]
