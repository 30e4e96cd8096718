"""No allocation inside a warm forward, for the families that run their own tower and connector
(mmb_model_encode through mmb_family_ops.encode): BLIP-2's Q-Former, IDEFICS' perceiver, Idefics2's
resampler, Idefics3 / SmolVLM's pixel shuffle, Qwen2-VL's tower and PatchMerger. Tiny checkpoints are
made with save_pretrained by the builders of their oracle tests; the C test program test_memory
(tests/test_memory.c, which also covers LLaVA, the Dense Connector and peak RSS) encodes each twice
at 1 and 2 threads with malloc & co. interposed, and fails when the second call allocates.

It needs the Release build ($MMB_BUILD_DIR, else the directory of $MMB_BIN, else <repo>/build):
under a sanitized build test_memory only says "skipped" (ASan replaces malloc), and so does this test.
tests/run_all.sh runs it after the Release build."""
import subprocess

import pytest

from conftest import build_dir
from test_blip2 import S as BLIP2_S, make_blip2
from test_idefics2 import build as build_idefics2
from test_perceiver import S as IDEFICS_S, make_idefics
from test_qwen2vl import make_model as make_qwen2vl


def test_families_allocate_nothing_in_a_warm_encode(tmp_path):
    exe = build_dir() / "test_memory"
    if not exe.exists():
        pytest.skip(f"{exe} not built")
    probe = subprocess.run([str(exe), "--alloc"], capture_output=True, text=True, timeout=60)
    if "skipped" in probe.stdout:
        pytest.skip(probe.stdout.strip())
    models = []
    make_blip2(tmp_path / "blip2")
    models.append(("blip2", BLIP2_S, BLIP2_S))
    make_idefics(tmp_path / "idefics")
    models.append(("idefics", IDEFICS_S, IDEFICS_S))
    for fam in ("idefics2", "idefics3", "smolvlm"):
        build_idefics2(tmp_path / fam, fam, image=56)
        models.append((fam, 56, 56))
    make_qwen2vl(tmp_path / "qwen2vl")
    models.append(("qwen2vl", 56, 84))
    args = [str(exe), "--alloc"]
    for name, h, w in models:
        args += [str(tmp_path / name), str(h), str(w)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr
    # Every family was run at 1 and 2 threads, and each run counted its allocations.
    for name, _, _ in models:
        assert p.stdout.count(f"{tmp_path / name} ") == 2, p.stdout
    assert p.stdout.count(": 0 allocations") == 2 * len(models), p.stdout
