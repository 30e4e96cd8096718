"""`mmbridge encode MODEL --manifest FILE -o DIR`: sharded, resumable extraction (tools/cmd_extract.c over the library's
mmb_manifest_* / mmb_shard_* / mmb_pool_tokens / mmb_npy_write).

- the MPI work queue (`mpirun --oversubscribe -np 3 ... --mpi`) writes byte-identical shards to a single process;
- a rank killed mid-shard (the MMB_TEST_EXIT_AFTER hook) and a `--resume` leave every image exactly once, equal to the
  single-process result, and no partial file;
- webdataset tars made by Python's tarfile (PAX and GNU long names, a corrupt member, truncated and garbled headers);
- the clip-retrieval layout loads with numpy, its metadata lines up with the rows, and the pooled embeddings equal
  transformers' (mean and cls, each far from the other).

MPI and the sanitizers: OpenMPI's own allocations (and its shared-memory transport's) make ASan report leaks and
LeakSanitizer cannot be told apart per library, so under the ASan build (tests/run_all.sh) the MPI tests run the
Release binary (build/mmbridge, built by run_all.sh's Release step or by hand) and are skipped when it is absent; every
non-MPI test here runs the sanitized binary ($MMB_BIN)."""
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from conftest import BIN, ROOT, run, sanitized, scaled_err

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
            patch_size=14)
MPIRUN = shutil.which("mpirun")
# The MPI tests' binary: the Release one under a sanitized build (see the module's docstring).
MPI_BIN = ROOT / "build" / "mmbridge" if sanitized() else BIN
MPI_ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1")


def has_mpi(binary):
    if not MPIRUN or not Path(binary).exists():
        return False
    p = subprocess.run([str(binary), "encode", "--help"], capture_output=True, text=True)
    q = subprocess.run([str(binary), "encode", "x", "--manifest", "/nonexistent", "-o", "/tmp/mmb-none", "--mpi"],
                       capture_output=True, text=True, env=MPI_ENV, timeout=60)
    return "--mpi" in p.stdout and "built without MPI" not in q.stderr


needs_mpi = pytest.mark.skipif(not has_mpi(MPI_BIN), reason="mpirun or an MPI-enabled build/mmbridge is absent")


def mpirun(n, *args, env=None, check=True):
    cmd = [MPIRUN, "--oversubscribe", "-np", str(n)]
    for k in ("MMB_TEST_EXIT_AFTER", "MMB_TEST_EXIT_RANK"):
        if env and k in env:
            cmd += ["-x", k]
    e = dict(MPI_ENV, **(env or {}))
    p = subprocess.run(cmd + [str(MPI_BIN), *map(str, args), "--mpi"], capture_output=True, text=True, env=e,
                       timeout=300)
    if check and p.returncode:
        raise AssertionError(f"mpirun exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    d = tmp_path_factory.mktemp("tower") / "clip"
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY)).eval()
    model.save_pretrained(d)
    proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    proc.save_pretrained(d)
    return d, model, proc


def make_images(d, n, seed=0):
    rs = np.random.RandomState(seed)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 30 + (i % 5) * 3, 34 + (i % 3) * 4
        p = d / f"im{i:03d}.png"
        Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def list_manifest(tmp_path, paths, name="list.txt"):
    m = tmp_path / name
    m.write_text("".join(f"{p.relative_to(tmp_path)}\n" for p in paths))
    return m


def sidecars(out):
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("shard-*.json"))]


def rows_by_index(out):
    """{manifest index: embedding row (numpy)} over every safetensors shard of out; asserts each index once."""
    got = {}
    for s in sidecars(out):
        t = load_file(str(Path(out) / s["files"][0]))["embeddings"].numpy()
        assert t.shape[0] == s["rows"] == len(s["inputs"])
        for r, inp in enumerate(s["inputs"]):
            assert inp["index"] not in got, f"image {inp['index']} twice"
            got[inp["index"]] = t[r]
    return got


def no_partial_files(out):
    left = [p for p in Path(out).rglob(".mmb-*")] + [p for p in Path(out).rglob("*") if ".partial" in p.parts]
    assert not left, left


def test_shards_sidecars_and_index(tmp_path, tower):
    d, model, proc = tower
    paths = make_images(tmp_path / "img", 23)
    m = list_manifest(tmp_path, paths)
    out = tmp_path / "out"
    p = run("encode", d, "--manifest", m, "-o", out, "--shard-size", 5, "--batch", 3, "--threads", 1)
    assert "progress: 23/23 images" in p.stderr and "images/s" in p.stderr and "ETA" in p.stderr
    idx = json.loads((out / "index.json").read_text())
    assert idx["complete"] and idx["n_shards"] == 5 and idx["rows"] == 23
    sc = sidecars(out)
    assert [s["first"] for s in sc] == [0, 5, 10, 15, 20] and [s["rows"] for s in sc] == [5, 5, 5, 5, 3]
    f = load_file(str(out / "shard-000004.safetensors"))["embeddings"]
    from safetensors import safe_open
    with safe_open(str(out / "shard-000004.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["input.0"] == str(paths[20].relative_to(tmp_path)) and meta["index.2"] == "22"
    # against transformers: the tower's last_hidden_state, all tokens (pool none)
    px = proc(images=[Image.open(q) for q in paths[20:]], return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = model(pixel_values=px).last_hidden_state
    err = scaled_err(f, ref)
    print(f"shard 4 vs transformers last_hidden_state: {err:.2e}")
    assert err <= 1e-4
    # finished shards are refused without --resume; --resume with nothing left rewrites the index only
    p = run("encode", d, "--manifest", m, "-o", out, "--shard-size", 5, check=False)
    assert p.returncode == 1 and "--resume" in p.stderr
    p = run("encode", d, "--manifest", m, "-o", out, "--shard-size", 5, "--resume")
    assert "0 shard(s)" in p.stdout and "5 finished shard(s) skipped" in p.stdout
    # other settings on the same directory are refused
    p = run("encode", d, "--manifest", m, "-o", out, "--shard-size", 6, "--resume", check=False)
    assert p.returncode == 1 and "other settings" in p.stderr
    # --shard K/N: every shard whose index % N == K
    out2 = tmp_path / "out2"
    run("encode", d, "--manifest", m, "-o", out2, "--shard-size", 5, "--shard", "1/2", "--batch", 3, "--threads", 1)
    assert [s["shard"] for s in sidecars(out2)] == [1, 3]
    assert not json.loads((out2 / "index.json").read_text())["complete"]
    for k in (1, 3):
        a = (out / f"shard-{k:06d}.safetensors").read_bytes()
        assert a == (out2 / f"shard-{k:06d}.safetensors").read_bytes()


def test_kill_then_resume_single_process(tmp_path, tower):
    """The test hook stops the process mid-shard; --resume finishes: every image once, equal to an uninterrupted
    run, no temporary left."""
    d, _, _ = tower
    paths = make_images(tmp_path / "img", 30)
    m = list_manifest(tmp_path, paths)
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    args = ["--shard-size", 10, "--batch", 4, "--threads", 1]
    run("encode", d, "--manifest", m, "-o", ref_out, *args)
    p = subprocess.run([str(BIN), "encode", str(d), "--manifest", str(m), "-o", str(out), *map(str, args)],
                       env=dict(os.environ, MMB_TEST_EXIT_AFTER="15"), capture_output=True, text=True)
    assert p.returncode == 3, p.stderr
    assert [s["shard"] for s in sidecars(out)] == [0]   # the hook stopped it 8 images into shard 1
    assert not (out / "shard-000001.json").exists() and not (out / "index.json").exists()
    pieces = sorted(p.name for p in (out / ".partial" / "shard-000001").iterdir())
    assert pieces == ["batch-000000.safetensors", "batch-000001.safetensors"], pieces
    p = run("encode", d, "--manifest", m, "-o", out, *args, "--resume")
    assert "shard 1: resumed at input 18 (2 batch(es) read back)" in p.stdout   # not encoded twice
    assert "progress: 20/20 images" in p.stderr
    ref, got = rows_by_index(ref_out), rows_by_index(out)
    assert sorted(got) == list(range(30))
    for i in range(30):
        assert np.array_equal(got[i], ref[i])
    no_partial_files(out)


@needs_mpi
def test_mpi_matches_single_process(tmp_path, tower):
    d, _, _ = tower
    paths = make_images(tmp_path / "img", 60)
    m = list_manifest(tmp_path, paths)
    args = ["encode", d, "--manifest", m, "--shard-size", 7, "--batch", 4, "--threads", 1]
    subprocess.run([str(MPI_BIN), *map(str, args), "-o", str(tmp_path / "single")], check=True, capture_output=True)
    p = mpirun(3, *args, "-o", tmp_path / "mpi")
    assert "3 rank(s)" in p.stderr and "progress: 60/60" in p.stderr
    ranks = {line.split("rank ")[1].split(",")[0] for line in p.stdout.splitlines() if line.startswith("shard ")}
    print("shards encoded by ranks", sorted(ranks))
    for f in sorted((tmp_path / "single").glob("shard-*")):
        assert f.read_bytes() == (tmp_path / "mpi" / f.name).read_bytes(), f.name
    a = json.loads((tmp_path / "single" / "index.json").read_text())
    b = json.loads((tmp_path / "mpi" / "index.json").read_text())
    assert a == b and b["complete"] and b["rows"] == 60


@needs_mpi
def test_mpi_rank_killed_mid_shard_then_resume(tmp_path, tower):
    """Rank 1 exits after 6 images (mid-shard: shard size 10, batches of 4). OpenMPI 4.1 then aborts the whole job
    (docs/decisions.md); `--resume` completes it with nothing lost, nothing twice, nothing partial left."""
    d, _, _ = tower
    paths = make_images(tmp_path / "img", 60)
    m = list_manifest(tmp_path, paths)
    args = ["encode", d, "--manifest", m, "--shard-size", 10, "--batch", 4, "--threads", 1]
    subprocess.run([str(MPI_BIN), *map(str, args), "-o", str(tmp_path / "single")], check=True, capture_output=True)
    out = tmp_path / "mpi"
    p = mpirun(3, *args, "-o", out, env={"MMB_TEST_EXIT_AFTER": "6", "MMB_TEST_EXIT_RANK": "1"}, check=False)
    assert p.returncode != 0 and "MMB_TEST_EXIT_AFTER: rank 1 exits" in p.stderr, p.stderr
    done_before = [s["shard"] for s in sidecars(out)]
    assert len(done_before) < 6 and not (out / "index.json").exists()
    partial = sorted(str(p.relative_to(out)) for p in (out / ".partial").rglob("batch-*"))
    print("finished before the kill:", done_before, "pieces of unfinished shards:", partial)
    p = mpirun(3, *args, "-o", out, "--resume")
    assert f"{len(done_before)} finished shard(s) skipped" in p.stdout
    # each batch piece left is read back, not encoded again
    assert p.stdout.count("batch(es) read back") == len({q.split("/")[0] for q in partial}), p.stdout
    ref, got = rows_by_index(tmp_path / "single"), rows_by_index(out)
    assert sorted(got) == list(range(60))
    for i in range(60):
        assert np.array_equal(got[i], ref[i]), i
    for f in sorted((tmp_path / "single").glob("shard-*.safetensors")):
        assert f.read_bytes() == (out / f.name).read_bytes()
    assert json.loads((out / "index.json").read_text())["complete"]
    no_partial_files(out)


def png_bytes(rs, h=32, w=36):
    b = io.BytesIO()
    Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(b, format="PNG")
    return b.getvalue()


def add(t, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    t.addfile(ti, io.BytesIO(data))


def make_tar(path, fmt=tarfile.PAX_FORMAT, corrupt=False):
    """A webdataset shard: samples 000..004 with a png/jpg and a txt each, a sample without an image, a directory,
    a name longer than ustar's 100 bytes (a PAX record or a GNU long name), and optionally a corrupt image member."""
    rs = np.random.RandomState(5)
    imgs = {}
    with tarfile.open(path, "w", format=fmt) as t:
        d = tarfile.TarInfo("shard")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for i in range(5):
            ext = "jpg" if i == 2 else "png"
            data = png_bytes(rs) if ext == "png" else None
            if ext == "jpg":
                b = io.BytesIO()
                Image.fromarray(rs.randint(0, 256, (40, 30, 3), dtype=np.uint8)).save(b, format="JPEG")
                data = b.getvalue()
            add(t, f"shard/{i:03d}.{ext}", data)
            add(t, f"shard/{i:03d}.txt", f"caption {i}".encode())
            imgs[f"shard/{i:03d}.{ext}"] = data
        add(t, "shard/noimage.json", b"{}")
        long = "shard/" + "x" * 120 + ".webp.png"  # key up to the first dot: ext 'webp.png' is not an image ext
        add(t, long, png_bytes(rs))
        long2 = "shard/" + "y" * 130 + ".png"
        data = png_bytes(rs)
        add(t, long2, data)
        imgs[long2] = data
        if corrupt:
            add(t, "shard/bad.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
            imgs["shard/bad.png"] = None
    return imgs


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_webdataset_tar_in_place(tmp_path, tower, fmt):
    d, model, proc = tower
    tar = tmp_path / "data.tar"
    imgs = make_tar(tar, fmt)
    out = tmp_path / "out"
    run("encode", d, "--manifest", tar, "-o", out, "--shard-size", 4, "--threads", 1)
    names = [i["name"] for s in sidecars(out) for i in s["inputs"]]
    assert names == [f"{tar}#{k}" for k in imgs], names
    got = rows_by_index(out)
    ims = [Image.open(io.BytesIO(v)) for v in imgs.values()]
    px = proc(images=ims, return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = model(pixel_values=px).last_hidden_state
    err = scaled_err(torch.from_numpy(np.stack([got[i] for i in range(len(imgs))])), ref)
    print(f"tar members vs transformers: {err:.2e}")
    assert err <= 1e-4


def test_tar_corrupt_member(tmp_path, tower):
    d, _, _ = tower
    tar = tmp_path / "data.tar"
    imgs = make_tar(tar, corrupt=True)
    p = run("encode", d, "--manifest", tar, "-o", tmp_path / "o1", "--shard-size", 4, check=False)
    assert p.returncode == 1 and "bad.png" in p.stderr
    assert not list((tmp_path / "o1").glob("shard-000001.*"))  # the shard holding it was never written
    out = tmp_path / "o2"
    run("encode", d, "--manifest", tar, "-o", out, "--shard-size", 4, "--skip-bad")
    errs = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["input"] for e in errs] == [f"{tar}#shard/bad.png"] and errs[0]["index"] == len(imgs) - 1
    assert errs[0]["message"]
    got = rows_by_index(out)
    assert sorted(got) == list(range(len(imgs) - 1))
    assert json.loads((out / "index.json").read_text())["errors"] == 1


def test_tar_truncated_and_garbled_headers(tmp_path, tower):
    d, _, _ = tower
    tar = tmp_path / "data.tar"
    make_tar(tar)
    raw = tar.read_bytes()
    # the offset of the 3rd member's header, from tarfile itself
    with tarfile.open(tar) as t:
        members = t.getmembers()
    third = members[3].offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:third + 100])           # a truncated header
    p = run("encode", d, "--manifest", cut, "-o", tmp_path / "o1", check=False)
    assert p.returncode == 1 and "truncated tar header" in p.stderr and str(third) in p.stderr, p.stderr
    bad = bytearray(raw)
    bad[third + 10:third + 20] = b"\xff" * 10     # a garbled header: its checksum no longer matches
    g = tmp_path / "garbled.tar"
    g.write_bytes(bytes(bad))
    p = run("encode", d, "--manifest", g, "-o", tmp_path / "o2", check=False)
    assert p.returncode == 1 and "garbled tar header" in p.stderr, p.stderr
    # a size field past the end of the file
    big = bytearray(raw)
    h = members[1].offset
    big[h + 124:h + 136] = b"77777777777\0"
    s = sum(b for b in bytes(big[h:h + 148]) + b" " * 8 + bytes(big[h + 156:h + 512]))
    big[h + 148:h + 156] = b"%06o\0 " % s
    o = tmp_path / "big.tar"
    o.write_bytes(bytes(big))
    p = run("encode", d, "--manifest", o, "-o", tmp_path / "o3", check=False)
    assert p.returncode == 1 and "past the end of the file" in p.stderr, p.stderr
    # --skip-bad: the tar is cut at the bad header, the members before it encoded, the problem reported
    p = run("encode", d, "--manifest", g, "-o", tmp_path / "o4", "--skip-bad")
    assert "warning" in p.stderr and "garbled" in p.stderr
    assert sum(s["rows"] for s in sidecars(tmp_path / "o4")) == 1  # members[1] = 000.png; members[3] is cut


def test_jsonl_manifest_and_urls(tmp_path, tower):
    d, _, _ = tower
    paths = make_images(tmp_path / "img", 3)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"path": "img/im000.png"}) + "\n\n" + json.dumps({"url": "https://example.com/a.jpg"}) +
                 "\n" + json.dumps({"path": str(paths[2])}) + "\n")
    p = run("encode", d, "--manifest", m, "-o", tmp_path / "o1", check=False)
    assert p.returncode == 1 and "https://example.com/a.jpg" in p.stderr and "img2dataset" in p.stderr
    run("encode", d, "--manifest", m, "-o", tmp_path / "o2", "--skip-bad")
    errs = [json.loads(x) for x in (tmp_path / "o2" / "errors.jsonl").read_text().splitlines()]
    assert errs[0]["input"] == "https://example.com/a.jpg" and errs[0]["index"] == 1
    assert sorted(rows_by_index(tmp_path / "o2")) == [0, 2]
    m.write_text('{"path": 3}\n')
    p = run("encode", d, "--manifest", m, "-o", tmp_path / "o3", check=False)
    assert p.returncode == 1 and "m.jsonl:1" in p.stderr


def test_clip_retrieval_layout_against_transformers(tmp_path):
    """A LLaVA checkpoint's connector output pooled (mean, cls), in clip-retrieval's layout: numpy loads it, the
    metadata's rows line up, and it equals transformers' get_image_features pooled the same way."""
    from test_vit import TOWER, make_llava
    S = TOWER["image_size"]
    d = tmp_path / "llava"
    model = make_llava(d, CLIPVisionConfig(**TOWER))
    proc = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    proc.save_pretrained(d)
    paths = make_images(tmp_path / "img", 7)
    m = list_manifest(tmp_path, paths)
    px = proc(images=[Image.open(p) for p in paths], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = model.get_image_features(pixel_values=px, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    full = torch.stack(list(out.pooler_output)) if hasattr(out, "pooler_output") else out
    refs = {"mean": full.mean(1), "cls": full[:, 0]}
    got = {}
    for pool in ("mean", "cls"):
        o = tmp_path / pool
        run("encode", d, "--manifest", m, "-o", o, "--format", "clip-retrieval", "--pool", pool, "--shard-size", 3,
            "--layers", "-1")
        embs, metas = [], []
        for k in range(3):
            e = np.load(o / "img_emb" / f"img_emb_{k}.npy")
            lines = [json.loads(x) for x in (o / "metadata" / f"metadata_{k}.jsonl").read_text().splitlines()]
            assert e.dtype == np.float32 and e.ndim == 2 and e.shape[0] == len(lines)
            hs = np.load(o / "hidden_states_3" / f"img_emb_{k}.npy")
            assert hs.shape == (len(lines), TOWER["hidden_size"])
            embs.append(e)
            metas += lines
        assert [x["image_path"] for x in metas] == [str(p.relative_to(tmp_path)) for p in paths]
        assert [x["manifest_index"] for x in metas] == list(range(7))
        got[pool] = torch.from_numpy(np.concatenate(embs))
        err = scaled_err(got[pool], refs[pool])
        print(f"clip-retrieval --pool {pool} vs transformers: {err:.2e}")
        assert err <= 1e-4
    # the wrong variant is far off: mean against cls
    wrong = scaled_err(got["mean"], refs["cls"])
    print(f"--pool mean vs transformers' cls token: {wrong:.2e}")
    assert wrong > 1e-2


def test_ray_example_is_valid():
    """examples/ray_encode.py compiles and has its parts (ray is not a test dependency: the example imports it only in
    main; tests/python/test_manifest.py runs its shard encoder without Ray against the CLI)."""
    import ast
    import py_compile
    src = ROOT / "examples" / "ray_encode.py"
    py_compile.compile(str(src), doraise=True)
    names = {n.name for n in ast.parse(src.read_text()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert {"main", "EncodeShards", "read_manifest", "write_atomic", "finished"} <= names
    assert "map_batches" in src.read_text()
