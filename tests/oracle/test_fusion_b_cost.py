"""What fusion B adds over the plain LLM, as `info` and `compare` report it, against counts made here from the
checkpoints' own tensors: CogVLM's and mPLUG-Owl2's second weight sets (the vision expert's tensors, multiway.1's),
LLaMA-Adapter V2's adapter queries and gates and the FLOPs of attending its prompts, a PEFT adapter's prompts and
gates. A wrong count (the shared tensors counted twice, the expert counted as FLOPs) would differ."""
import csv as csvlib

from safetensors import safe_open

from conftest import run
from test_cogvlm import make_cogvlm
from test_mplug_owl2 import make_owl
from test_llama_adapter_v2 import LLAMA, QUERY_LAYER, VIS, make as make_v2


def tensors(d):
    out = {}
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = s.get_slice(k).get_shape()
    return out


def numel(shape):
    n = 1
    for x in shape:
        n *= x
    return n


def compare_row(d, tmp_path):
    out = tmp_path / "c.csv"
    run("compare", d, "--reps", 1, "--csv", out)
    rows = list(csvlib.DictReader(out.open()))
    return next(r for r in rows if r["connector"].startswith(d.name))


def test_expert_sets(tmp_path):
    cog, owl = tmp_path / "cogvlm", tmp_path / "owl"
    cog.mkdir()
    owl.mkdir()
    make_cogvlm(cog)
    make_owl(owl)
    for d, own in [(cog, lambda k: "vision_expert" in k or "vision_mlp" in k),
                   (owl, lambda k: ".multiway.1." in k)]:
        t = tensors(d)
        added = sum(numel(s) for k, s in t.items() if k.startswith("model.layers.") and own(k))
        layers = len({k.split(".")[2] for k in t if k.startswith("model.layers.")})
        info = run("info", d).stdout
        line = next(l for l in info.splitlines() if l.startswith("expert sets:"))
        assert f"{added} parameters added" in line and "no FLOPs per position added" in line, line
        r = compare_row(d, tmp_path)
        assert r["fusion"] == "B"
        assert int(r["xattn_params"]) == added and int(r["xattn_layers"]) == layers
        # the image's rows are prefill positions as fusion C's; the expert adds no FLOPs a position
        assert int(r["llm_positions"]) == int(r["visual_tokens"]) > 0
        assert int(r["xattn_kv_flops_per_image"]) == 0


def test_adapter_v2(tmp_path):
    _, _, m = make_v2(tmp_path)
    t = tensors(m)
    H, D = LLAMA["n_heads"], LLAMA["dim"]
    hd, L = D // H, QUERY_LAYER
    qlen = VIS["query_len"]
    params = numel(t["adapter_query.weight"]) + sum(numel(s) for k, s in t.items() if k.endswith("adapter_gate"))
    per_token = L * 4 * H * hd * qlen
    kv_flops = L * 2 * 2 * qlen * D * H * hd
    info = run("info", m).stdout
    line = next(l for l in info.splitlines() if l.startswith("adapter:"))
    assert f"{L} adapted layers x {qlen} prompt vectors" in line
    assert f"{params} parameters added" in line and f"{per_token} FLOP per text position added" in line, line
    assert f"{kv_flops} FLOP for the prompts' keys and values (per image)" in line, line
    r = compare_row(m, tmp_path)
    assert r["fusion"] == "B" and int(r["llm_positions"]) == 0
    assert int(r["xattn_params"]) == params and int(r["llm_flops_per_text_token"]) == per_token
    assert int(r["xattn_kv_flops_per_image"]) == kv_flops
    assert int(r["llm_kv_bytes_per_image"]) == 2 * L * qlen * H * hd * 4
