"""The package's sharded-extraction helpers (mmbridge.Manifest, shard_range, pool_tokens) over the library, against
the CLI's `encode --manifest` shards: the same inputs with the same names, the same bytes read from a tar, and
Model.encode of them pooled by the library equal to the CLI's rows bit for bit. Loads the library as
test_package.py does (MMBRIDGE_LIB, else the build directory's)."""
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALLED = os.environ.get("MMB_PY_INSTALLED") == "1"
sys.path.insert(0, str(ROOT / "tests" / "oracle"))
if not INSTALLED:
    sys.path.insert(0, str(ROOT / "python"))
import conftest as oc  # noqa: E402

if not INSTALLED:
    LIB = Path(os.environ["MMBRIDGE_LIB"]) if os.environ.get("MMBRIDGE_LIB") else oc.build_dir() / "libmmbridge.so"
    if not LIB.exists():
        pytest.skip(f"{LIB} not built", allow_module_level=True)
    os.environ["MMBRIDGE_LIB"] = str(LIB)
import mmbridge  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_extract import make_tar, sidecars, tower  # noqa: E402,F401  (tower: the fixture)


def test_manifest_reads_tars_as_the_cli(tmp_path, tower):  # noqa: F811
    if not oc.BIN.exists():
        pytest.skip(f"{oc.BIN} not built")
    d, _, _ = tower
    tar = tmp_path / "data.tar"
    imgs = make_tar(tar, tarfile.PAX_FORMAT)
    with mmbridge.Manifest(tar) as m:
        assert len(m) == len(imgs)
        assert [x.name for x in m] == [f"{tar}#{k}" for k in imgs]
        assert [m.read(i) for i in range(len(m))] == list(imgs.values())
        assert m[0].path == str(tar) and m[0].size == len(next(iter(imgs.values()))) and m[-1].index == len(m) - 1
        oc.run("encode", d, "--manifest", tar, "-o", tmp_path / "o", "--shard-size", 3, "--pool", "mean",
               "--threads", 1, "--batch", 1)
        assert [i["name"] for s in sidecars(tmp_path / "o") for i in s["inputs"]] == [x.name for x in m]
        # Model.encode of the bytes, pooled by the library: the CLI's rows bit for bit (one image a forward, 1 thread)
        with mmbridge.Model(d, threads=1) as model:
            rows = np.concatenate([mmbridge.pool_tokens(model.encode([m.read(i)]), "mean") for i in range(len(m))])
        cli = np.concatenate([load_file(str(tmp_path / "o" / s["files"][0]))["embeddings"]
                              for s in sidecars(tmp_path / "o")])
        assert np.array_equal(rows, cli)
    with tarfile.open(tar) as t:
        third = t.getmembers()[3].offset
    (tmp_path / "cut.tar").write_bytes(tar.read_bytes()[:third + 100])
    with pytest.raises(mmbridge.FormatError, match="truncated tar header"):
        mmbridge.Manifest(tmp_path / "cut.tar")
    cut = mmbridge.Manifest(tmp_path / "cut.tar", skip_bad=True)
    assert len(cut) == 1 and "truncated" in cut.warnings[0]


def test_shards_and_pooling():
    assert mmbridge.shard_count(23, 5) == 5 and list(mmbridge.shard_range(23, 5, 4)) == [20, 21, 22]
    assert mmbridge.shard_mine(7, 1, 3) and not mmbridge.shard_mine(7, 2, 3)
    with pytest.raises(IndexError):
        mmbridge.shard_range(23, 5, 5)
    x = np.random.default_rng(0).standard_normal((3, 7, 5)).astype(np.float32)
    mean = mmbridge.pool_tokens(x, "mean")
    assert np.abs(mean - x.mean(1)).max() < 1e-6 and np.abs(mean - x[:, 0]).max() > 0.1   # cls is far off
    assert np.array_equal(mmbridge.pool_tokens(x, "cls"), x[:, 0]) and np.array_equal(mmbridge.pool_tokens(x, "none"), x)


def test_ray_example_shards_equal_the_cli(tmp_path, tower):  # noqa: F811
    """examples/ray_encode.py's per-shard encoder (what each Ray actor runs), called without Ray: the same
    clip-retrieval files as the CLI's, bit for bit."""
    if not oc.BIN.exists():
        pytest.skip(f"{oc.BIN} not built")
    import importlib.util
    import json
    from types import SimpleNamespace
    spec = importlib.util.spec_from_file_location("ray_encode", ROOT / "examples" / "ray_encode.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    d, _, _ = tower
    tar = tmp_path / "data.tar"
    make_tar(tar, tarfile.GNU_FORMAT, corrupt=True)
    oc.run("encode", d, "--manifest", tar, "-o", tmp_path / "cli", "--shard-size", 3, "--format", "clip-retrieval",
           "--threads", 1, "--batch", 1, "--skip-bad")
    args = SimpleNamespace(model=str(d), manifest=str(tar), output=str(tmp_path / "ray"), shard_size=3, pool="mean",
                           threads=1)
    n = len(ex.read_manifest(tar))
    enc = ex.EncodeShards(args, n)
    for k in range(mmbridge.shard_count(n, 3)):
        enc.encode_shard(k)
    for k in range(mmbridge.shard_count(n, 3)):
        for f in (f"img_emb/img_emb_{k}.npy", f"metadata/metadata_{k}.jsonl"):
            assert (tmp_path / "ray" / f).read_bytes() == (tmp_path / "cli" / f).read_bytes(), f
        a, b = (json.loads((tmp_path / w / f"shard-{k:06d}.json").read_text()) for w in ("ray", "cli"))
        assert a["inputs"] == b["inputs"] and [e["input"] for e in a["errors"]] == [e["input"] for e in b["errors"]]
    assert ex.finished(tmp_path / "ray", 0)
