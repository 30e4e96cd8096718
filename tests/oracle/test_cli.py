"""The CLI itself: its option parser and help, and the bugs a new user hit in it: compare's prefill column
for the checkpoint's own LLM and a row per unusable directory; generate saying the context is full and
printing its timings on Ctrl-C; encode taking directories and list files, in batches, recording its
inputs, writing to standard output, printing each image's original size; an unsupported architecture
refused the same way by every command."""
import csv
import json
import re
import signal
import subprocess
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load, load_file
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, PaliGemmaConfig,
                          PaliGemmaForConditionalGeneration, SiglipVisionConfig)

from conftest import BIN, TEXT, run
from test_encode_images import S, images
from test_vit import TOWER, make_llava

COMMANDS = ["info", "connect", "encode", "compare", "generate", "tokenize", "demo"]


def prefill(t, L, d, f):
    return 2 * t * L * (4 * d * d + 3 * d * f) + 2 * L * d * t * t


@pytest.fixture
def llava(tmp_path):
    """A tiny LLaVA (CLIP tower, projector, a 48-wide LLM) with its image processor."""
    d = tmp_path / "llava"
    make_llava(d, CLIPVisionConfig(**TOWER))
    CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}).save_pretrained(d)
    return d


# ---- options and help ----

def test_help_is_generated_and_tells_the_truth():
    top = run("--help").stdout
    for c in COMMANDS:
        assert re.search(rf"^  {c} ", top, re.M), top
    assert "LlavaForConditionalGeneration layout or the original LLaVA layout" not in top
    assert not re.search(r"demo.*run info and connect", top, re.S)
    for c in COMMANDS:
        h = run(c, "--help").stdout
        assert h.startswith(f"usage: mmbridge {c} ") and "options:" in h and "--help" in h, h
    # ranges and choices come from the option table
    h = run("encode", "--help").stdout
    assert re.search(r"--threads N .*\[1\.\.1024\]", h) and "(f32|bf16|f16|int8)" in h and "--batch N" in h
    assert "demo" in top and "generate" in run("demo", "--help").stdout
    # the family table, from the library
    assert re.search(r"^  llava .*LlavaForConditionalGeneration.*; generate$", top, re.M), top
    assert re.search(r"^  clip .*CLIPVisionModel", top, re.M) and "UnknownVL" not in top


@pytest.mark.parametrize("args,needle", [
    (["encode", "x", "--thread", "2"], "unknown option '--thread'; did you mean '--threads'?"),
    (["generate", "x", "--promt", "hi"], "did you mean '--prompt'?"),
    (["info", "x", "--dens", "sti"], "did you mean '--dense'?"),
    (["genrate", "x"], "unknown command 'genrate'; did you mean 'generate'?"),
    (["infoo"], "did you mean 'info'?"),
    (["info", "x", "--dtype", "f64"], "--dtype wants f32, bf16, f16 or int8 (got 'f64')"),
    (["info", "x", "--threads", "0"], "--threads wants a whole number in 1..1024 (got '0')"),
    (["generate", "x", "--temp", "-1", "--ids", "1"], "--temp wants a number in 0..100"),
    (["encode", "x", "--threads"], "--threads wants a value"),
    (["info"], "missing arguments"),
    (["info", "a", "b"], "unexpected argument 'b'"),
])
def test_bad_command_lines(args, needle):
    p = run(*args, check=False)
    assert p.returncode == 2 and needle in p.stderr, p.stderr


def test_unrelated_word_gets_no_suggestion():
    p = run("encode", "x", "--zzzzzzzz", check=False)
    assert p.returncode == 2 and "unknown option '--zzzzzzzz'" in p.stderr and "did you mean" not in p.stderr


def test_equals_form_of_an_option(llava, tmp_path):
    p = run("encode", llava, images(tmp_path)[0], "-o", tmp_path / "o.safetensors", "--threads=2")
    assert "2 thread(s)" in p.stdout


# ---- compare ----

def test_compare_uses_the_checkpoints_llm_and_reports_bad_rows(llava, tmp_path):
    bad = tmp_path / "paligemma"
    paligemma(bad)
    p = run("compare", llava, "--reps", 1, "--csv", tmp_path / "c.csv")
    (r,) = list(csv.DictReader(open(tmp_path / "c.csv")))
    L, d, f = TEXT["num_hidden_layers"], TEXT["hidden_size"], TEXT["intermediate_size"]
    t = int(r["visual_tokens"])
    assert t == (S // TOWER["patch_size"]) ** 2
    assert abs(float(r["llm_prefill_tflop"]) - prefill(t, L, d, f) * 1e-12) < 1e-15, r
    assert r["llm"] == f"{L}x{d}x{f} checkpoint"
    # without an LLM in the directory, the --llm-* sizes
    p = run("compare", "--types", "linear", "--width", 32, "--grid", 2, "--llm-width", 16, "--llm-layers", 3,
            "--llm-ffn", 8, "--reps", 1, "--csv", tmp_path / "c2.csv")
    (r,) = list(csv.DictReader(open(tmp_path / "c2.csv")))
    assert abs(float(r["llm_prefill_tflop"]) - prefill(4, 3, 16, 8) * 1e-12) < 1e-15 and r["llm"] == "3x16x8 given"
    # an unsupported directory and a missing one are rows with their error; the good row is still measured
    p = run("compare", bad, llava, tmp_path / "missing", "--reps", 1, "--csv", tmp_path / "c3.csv", check=False)
    assert p.returncode == 1, p.stderr
    first, cost = p.stdout.split("what one image costs the LLM", 1)
    rows = [l for l in first.splitlines() if l.startswith("| ") and "connector" not in l.split("|")[1]]
    assert len(rows) == 3, p.stdout
    assert "error:" in rows[0] and "UnknownVLForConditionalGeneration" in rows[0]
    assert "error:" not in rows[1] and "tower+connector" in rows[1]
    assert "error:" in rows[2] and "missing" in rows[2]
    # the LLM-side table lists the measured row alone
    cost_rows = [l for l in cost.splitlines() if l.startswith("| ") and "connector" not in l.split("|")[1]]
    assert len(cost_rows) == 1 and cost_rows[0].split("|")[2].strip() == "C", p.stdout
    assert "2 of 3 row(s) could not be measured" in p.stderr
    assert not (tmp_path / "c3.csv").exists()
    assert "exit status is then 1" in run("compare", "--help").stdout


# ---- generate ----

def tiny_lm(d, **kw):
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TEXT, "vocab_size": 64, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                         **kw})
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(d)
    return model


def test_generate_says_the_context_is_full(tmp_path):
    model = tiny_lm(tmp_path / "lm", max_position_embeddings=12)
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    p = run("generate", tmp_path / "lm", "--ids", ",".join(map(str, ids)), "-n", 50, "--ignore-eos", "--print-ids")
    got = [int(t) for t in p.stdout.split()]
    assert "stopped: the context (12 tokens) is full" in p.stderr, p.stderr
    assert "prefill: 8 tokens" in p.stderr
    # every position is used: 12 - 8 fed back, plus the one sampled from the last position's logits
    assert len(got) == 12 - len(ids) + 1
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=12 - len(ids), pad_token_id=0)[0, len(ids):].tolist()
    assert got[:len(ref)] == ref
    # a generation that ends on -n says nothing
    p = run("generate", tmp_path / "lm", "--ids", "1,2", "-n", 3, "--ignore-eos")
    assert "stopped:" not in p.stderr


def test_generate_prints_its_timings_on_ctrl_c(tmp_path):
    tiny_lm(tmp_path / "lm", max_position_embeddings=1 << 17)
    args = [str(BIN), "generate", str(tmp_path / "lm"), "--ids", "1,2,3", "-n", str(1 << 17), "--ignore-eos",
            "--print-ids", "--threads", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(8)   # a few tokens are out: the decode loop is running
    assert first, proc.stderr.read()
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "stopped: interrupted" in err and re.search(r"prefill: 3 tokens in .* decode: \d+ tokens", err), err
    assert "Sanitizer" not in err and "runtime error:" not in err, err
    assert len((first + out).split()) < 1 << 17


# ---- encode ----

def same(a, b):
    """Batches of other sizes may round differently in the last bits."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_encode_directory_list_batches_metadata(llava, tmp_path):
    (tmp_path / "imgs").mkdir()
    paths = images(tmp_path / "imgs")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"skipped")
    files = tmp_path / "one_by_one.safetensors"
    run("encode", llava, *paths, "-o", files)
    ref = load_file(str(files))["embeddings"]
    out = tmp_path / "dir.safetensors"
    p = run("encode", llava, tmp_path / "imgs", "--batch", 2, "-o", out)
    assert "batch 1/2: inputs 0..1" in p.stdout and "batch 2/2: inputs 2..2" in p.stdout, p.stdout
    assert same(load_file(str(out))["embeddings"], ref)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["n_inputs"] == "3"
    assert [meta[f"input.{i}"] for i in range(3)] == [str(x) for x in sorted(paths)]
    # the original size, then the processed one
    for i, pth in enumerate(sorted(paths)):
        w, h = Image.open(pth).size
        assert f"image {i}: {pth} {w}x{h} -> {S}x{S} -> clip " in p.stdout, p.stdout
    # a list file (relative to its directory), in its own order; files and directories mixed
    (tmp_path / "list.txt").write_text("imgs/c.png\n\n  imgs/a.jpg\n")
    p = run("encode", llava, tmp_path / "list.txt", paths[1], "-o", out, "--batch", 1)
    assert p.stdout.count("batch ") == 3
    got = load_file(str(out))["embeddings"]
    order = [2, 0, 1]
    assert same(got, ref[order])
    # -o -: the safetensors file on standard output, the messages on standard error
    q = subprocess.run([str(BIN), "encode", str(llava), str(tmp_path / "imgs"), "-o", "-"], capture_output=True,
                       timeout=300)
    assert q.returncode == 0, q.stderr
    assert same(load(q.stdout)["embeddings"], ref)
    assert b"batch 1/1" in q.stderr and b"standard output" in q.stderr
    # an empty directory, a missing path
    (tmp_path / "empty").mkdir()
    for bad, msg in [(tmp_path / "empty", "empty directory"), (tmp_path / "nope", "No such file")]:
        p = run("encode", llava, bad, "-o", tmp_path / "x.safetensors", check=False)
        assert p.returncode == 1 and msg in p.stderr and str(bad) in p.stderr, p.stderr
        assert not (tmp_path / "x.safetensors").exists()


def test_encode_images_with_taps_from_the_same_pass(tmp_path):
    """--taps with image files: the hidden states come with the embeddings from one tower pass
    (mmb_mllm_encode), as transformers' vision tower computes them."""
    from conftest import scaled_err
    d = tmp_path / "llava"
    model = make_llava(d, CLIPVisionConfig(**TOWER))
    proc = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    proc.save_pretrained(d)
    paths = images(tmp_path)
    out = tmp_path / "o.safetensors"
    run("encode", d, *paths, "--taps", "0,-2", "-o", out, "--batch", 2)
    got = load_file(str(out))
    px = proc(images=[Image.open(p) for p in paths], return_tensors="pt").pixel_values
    with torch.no_grad():
        hs = model.model.vision_tower(pixel_values=px, output_hidden_states=True).hidden_states
    L = TOWER["num_hidden_layers"]
    assert set(got) == {"embeddings", "hidden_states.0", f"hidden_states.{L - 1}"}
    assert scaled_err(got["hidden_states.0"], hs[0]) <= 1e-4
    assert scaled_err(got[f"hidden_states.{L - 1}"], hs[-2]) <= 1e-4


# ---- an unsupported architecture ----

def paligemma(d):
    torch.manual_seed(0)
    cfg = PaliGemmaConfig(vision_config=SiglipVisionConfig(**TOWER), text_config={
        "model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300},
        image_token_index=299, projection_dim=32)
    PaliGemmaForConditionalGeneration(cfg).eval().save_pretrained(d)
    # PaliGemma itself opens now (encode); renamed, the same directory is an architecture no row claims
    conf = json.loads((d / "config.json").read_text())
    conf["architectures"], conf["model_type"] = ["UnknownVLForConditionalGeneration"], "unknown_vl"
    (d / "config.json").write_text(json.dumps(conf))
    return d


def test_unsupported_architecture_is_refused_by_every_command(tmp_path):
    d = paligemma(tmp_path / "pg")
    img = images(tmp_path)[0]
    out = tmp_path / "o.safetensors"
    (tmp_path / "f.safetensors").write_bytes(b"")
    first = None
    for args in [["info", d], ["encode", d, img, "-o", out], ["connect", d, "--features", tmp_path / "f.safetensors",
                 "-o", out], ["compare", d, "--reps", 1], ["generate", d, "--ids", "1,2", "-n", 1],
                 ["generate", d, "--image", img, "--ids", "299,1", "-n", 1]]:
        p = run(*args, check=False)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        line = p.stderr.splitlines()[0]
        assert "UnknownVLForConditionalGeneration" in line and "supported families" in line, (args, p.stderr)
        assert first is None or line == first, (args, line, first)  # the one open call, the one message
        first = line
        assert not out.exists()
