"""mmbridge compare: the cost table's columns against torch modules' parameter counts and the
documented prefill formula, the CSV and SVG outputs, checkpoint rows, and bad options."""
import csv
import xml.etree.ElementTree as ET

import torch
from torch import nn

from conftest import run
from test_dense import make_projector, make_tower, D, H


def prefill(t, L=32, d=4096, f=11008):
    return 2 * t * L * (4 * d * d + 3 * d * f) + 2 * L * d * t * t


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
    assert "llava" in p.stdout


def test_bad_options(tmp_path):
    for args, code, msg in [(["--grid", "0"], 2, "--grid"), (["--types", "nope"], 1, "nope"),
                            (["--types", "mlp2x_gelu", "--config", "mlp2x_gelu={bad"], 1, "JSON"),
                            (["--types", "dense_dci"], 1, "several hidden states"),
                            ([str(tmp_path / "missing")], 1, "missing")]:
        p = run("compare", *args, "--reps", 1, "--csv", tmp_path / "x.csv", check=False)
        assert p.returncode == code and msg in p.stderr, (args, p.stderr)
        assert not (tmp_path / "x.csv").exists()
