"""mmbridge compare: the cost table's columns against torch modules' parameter counts and the
documented prefill formula, the CSV and SVG outputs, checkpoint rows, what an image costs the LLM for fusion C
(prefill positions, KV cache, attention of later text) beside fusion A (IDEFICS' gated cross-attention) in one
table, and bad options."""
import csv
import re
import xml.etree.ElementTree as ET

import torch
from torch import nn

from conftest import VISION, run
from test_dense import make_projector, make_tower, D, H


def prefill(t, L=32, d=4096, f=11008):
    return 2 * t * L * (4 * d * d + 3 * d * f) + 2 * L * d * t * t


def check_type_c(r, L, q, kv):
    """A fusion-C row: the image's tokens are its LLM positions, kept in the KV cache (keys and values, f32,
    every layer, kv = kv_heads x head_dim wide) and attended by every later text position (q wide)."""
    t = int(r["visual_tokens"])
    assert r["fusion"] == "C" and int(r["llm_positions"]) == t
    assert int(r["llm_kv_bytes_per_image"]) == 2 * L * t * kv * 4
    assert int(r["llm_flops_per_text_token"]) == 4 * L * t * q
    assert int(r["xattn_kv_flops_per_image"]) == int(r["xattn_layers"]) == int(r["xattn_params"]) == 0


def test_registry_rows_match_torch_modules(tmp_path):
    W, G, DM = 32, 4, 48
    p = run("compare", "--width", W, "--grid", G, "--llm-width", DM, "--reps", 1, "--csv", tmp_path / "c.csv",
            "--svg", tmp_path / "c.svg", "--threads", 2)
    rows = {r["connector"]: r for r in csv.DictReader(open(tmp_path / "c.csv"))}
    refs = {"linear": nn.Linear(W, DM), "mlp2x_gelu": nn.Sequential(nn.Linear(W, DM), nn.GELU(), nn.Linear(DM, DM)),
            "identity": nn.Identity()}
    for name, mod in refs.items():
        assert name in rows, p.stdout
        assert int(rows[name]["params"]) == sum(q.numel() for q in mod.parameters())
        macs = sum(m.weight.numel() for m in mod.modules() if isinstance(m, nn.Linear)) * G * G
        assert abs(float(rows[name]["gflop_per_image"]) - 2 * macs * 1e-9) < 1e-4
    for r in rows.values():
        assert float(r["latency_ms"]) >= 0 and r["measured"] == "connector"
        t = int(r["visual_tokens"])
        assert abs(float(r["llm_prefill_tflop"]) - prefill(t, d=DM) * 1e-12) < 1e-6
        check_type_c(r, 32, DM, DM)  # the --llm-* sizes: K/V and query width d
        assert r["connector"] in p.stdout
    assert int(rows["mlp2x_gelu"]["visual_tokens"]) == G * G
    svg = ET.parse(tmp_path / "c.svg").getroot()
    assert svg.tag.endswith("svg") and len([e for e in svg.iter() if e.tag.endswith("rect")]) == 1 + 2 * len(rows)


def test_checkpoint_row_and_llm_size(tmp_path):
    make_tower(tmp_path / "tower", "clip")
    make_projector(tmp_path / "llava", D, "none", "tiny-clip")
    p = run("compare", tmp_path / "llava", "--grid", 3, "--llm-layers", 2, "--llm-width", 8, "--llm-ffn", 16, "--reps", 1,
            "--csv", tmp_path / "c.csv")
    (r,) = list(csv.DictReader(open(tmp_path / "c.csv")))
    torch.manual_seed(0)
    proj = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, H))
    assert int(r["params"]) == sum(q.numel() for q in proj.parameters())
    assert r["measured"] == "connector" and int(r["visual_tokens"]) == 9
    t = int(r["visual_tokens"])
    assert abs(float(r["llm_prefill_tflop"]) - prefill(t, 2, 8, 16) * 1e-12) < 1e-15
    check_type_c(r, 2, 8, 8)
    assert "llava" in p.stdout


def test_type_c_and_type_a_in_one_table(tmp_path):
    """A registry connector (the --llm-* sizes), a LLaVA with its own GQA LLM (K/V narrower than d) and an
    IDEFICS (fusion A) in one run: the C rows pay prefill positions and KV cache for the image's tokens, the
    A row one marker position and its gated layers' costs, counted independently from transformers."""
    from test_decoder import make_llava_lm
    from test_fusion_a import images, make_idefics
    from test_xattn_cost import independent_costs
    llava, ld = make_llava_lm(tmp_path, "llama")
    idefics, proc = make_idefics(tmp_path / "idefics", layers=4, interval=2, alpha="vector", qk_norm=True)
    (img,) = images(tmp_path, 1)
    want = independent_costs(idefics, proc, img)
    p = run("compare", "--types", "linear", ld, tmp_path / "idefics", "--width", 16, "--grid", 3, "--llm-width", 24,
            "--llm-layers", 3, "--llm-ffn", 40, "--reps", 1, "--threads", 2, "--csv", tmp_path / "c.csv")
    lin, lv, ide = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert lin["connector"] == "linear" and lin["llm"] == "3x24x40 given"
    check_type_c(lin, 3, 24, 24)
    tc = llava.config.text_config
    L, hd = tc.num_hidden_layers, tc.hidden_size // tc.num_attention_heads
    assert tc.num_key_value_heads < tc.num_attention_heads
    assert lv["llm"] == f"{L}x{tc.hidden_size}x{tc.intermediate_size} checkpoint"
    assert int(lv["visual_tokens"]) == (VISION["image_size"] // VISION["patch_size"]) ** 2  # CLS dropped
    check_type_c(lv, L, tc.num_attention_heads * hd, tc.num_key_value_heads * hd)
    t = int(lv["visual_tokens"])
    want_prefill = prefill(t, L, tc.hidden_size, tc.intermediate_size)
    assert abs(float(lv["llm_prefill_tflop"]) - want_prefill * 1e-12) < 1e-15
    assert ide["fusion"] == "A" and int(ide["visual_tokens"]) == want["T"]
    assert int(ide["llm_positions"]) == 1 and float(ide["llm_prefill_tflop"]) == 0
    assert int(ide["xattn_layers"]) == want["layers"] and int(ide["xattn_params"]) == want["params"]
    assert int(ide["xattn_kv_flops_per_image"]) == want["kv_flops"]
    assert int(ide["llm_kv_bytes_per_image"]) == want["kv_bytes"]
    assert int(ide["llm_flops_per_text_token"]) == want["per_token"]
    # the printed table: each row in the LLM-side table with its fusion type
    cost = p.stdout.split("what one image costs the LLM", 1)[1]
    for r, f in [(lin, "C"), (lv, "C"), (ide, "A")]:
        assert re.search(r"^\| " + re.escape(r["connector"]) + r" +\| " + f + r" ", cost, re.M), p.stdout
    assert re.search(r"\| A +\| %s, %s " % (want["layers"], want["params"]), cost), p.stdout


def test_bad_options(tmp_path):
    for args, code, msg in [(["--grid", "0"], 2, "--grid"), (["--types", "nope"], 1, "nope"),
                            (["--types", "mlp2x_gelu", "--config", "mlp2x_gelu={bad"], 1, "JSON"),
                            (["--types", "dense_dci"], 1, "several hidden states"),
                            ([str(tmp_path / "missing")], 1, "missing")]:
        p = run("compare", *args, "--reps", 1, "--csv", tmp_path / "x.csv", check=False)
        assert p.returncode == code and msg in p.stderr, (args, p.stderr)
        assert not (tmp_path / "x.csv").exists()


def marker_blobs(png, colour=(214, 39, 40)):
    """The 4-connected blobs of exactly the marker colour in a PNG: a list of (pixel count, centre x, centre y)."""
    import numpy as np
    from PIL import Image
    im = Image.open(png)
    im.load()
    assert im.format == "PNG"
    mask = (np.asarray(im.convert("RGB")) == colour).all(-1)
    seen, blobs = np.zeros_like(mask), []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        ys, xs = zip(*pts)
        blobs.append((len(pts), sum(xs) / len(xs), sum(ys) / len(ys)))
    return im.size, blobs


def test_png_scatter(tmp_path):
    """--png: an 800x520 PNG with one marker per row, placed by latency (x) and LLM prefill tokens (y); three
    connectors whose token counts differ (64, 144, 16 on an 8x8 grid), so no two markers touch."""
    p = run("compare", "--types", "identity,c-abs,ldpnet", "--width", 32, "--grid", 8, "--llm-width", 48, "--reps", 1,
            "--threads", 2, "--csv", tmp_path / "c.csv", "--png", tmp_path / "c.png")
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    size, blobs = marker_blobs(tmp_path / "c.png")
    assert size == (800, 520)
    assert len(blobs) == len(rows) == 3, (blobs, p.stdout)
    assert all(20 <= n <= 120 for n, _, _ in blobs)  # each a disc of radius 4, whole
    # the markers' heights follow the rows' token counts (more tokens higher up), their x the latencies
    by_tokens = sorted(rows, key=lambda r: int(r["llm_positions"]))
    by_y = sorted(blobs, key=lambda b: -b[2])
    lat = [float(r["latency_ms"]) for r in by_tokens]
    for i in range(3):
        for j in range(3):
            if lat[i] > lat[j] + 0.05 * max(lat):
                assert by_y[i][1] > by_y[j][1], (lat, by_y)
    assert len({round(b[2]) for b in blobs}) == 3
    # a row that fails: no picture
    p = run("compare", "--types", "identity,nope", "--reps", 1, "--png", tmp_path / "x.png", check=False)
    assert p.returncode == 1 and "--png" in p.stderr and not (tmp_path / "x.png").exists()
