"""The GGUF reader (src/io/gguf.c) against llama.cpp's own Python package `gguf` (gguf-py, from PyPI): files written
by its GGUFWriter with keys of every value type (nested arrays included) and tensors of every type the reader
dequantizes; the keys, values, shapes and dequantized numbers must be gguf-py's (GGUFReader, gguf.quants.dequantize),
within 1e-6 scaled. Block bytes are random (every bit pattern is a valid block), so every code path of each format is
hit. Wrong variants are far off (the neighbouring format's dequantizer, the shape not reversed). Hostile files: each
truncation point, corrupted counts, lengths, types, offsets and alignment, a duplicate key, are refused with a
message and no crash."""
import json
import struct
import subprocess

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from safetensors.numpy import load_file  # noqa: E402

from conftest import compile_driver, sanitized  # noqa: E402

Q = gguf.GGMLQuantizationType
FORMATS = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return compile_driver("gguf_driver", tmp_path_factory.mktemp("gguf_driver"))


def random_blocks(qt, shape, rs):
    """Raw bytes for a tensor of logical shape (rows, row) of type qt; f16 scales kept finite."""
    blck, size = gguf.GGML_QUANT_SIZES[qt]
    rows, row = shape
    if qt in (Q.F32, Q.F16, Q.BF16):
        x = rs.randn(rows, row).astype(np.float32)
        if qt == Q.F32:
            return x
        if qt == Q.F16:
            return x.astype(np.float16)
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    raw = rs.randint(0, 256, (rows, row // blck, size), dtype=np.uint8)
    # the f16 scales (d, dmin) as finite halves of moderate size, wherever the format keeps them
    half_at = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
               Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}[qt]
    for off in half_at:
        h = (rs.rand(rows, row // blck).astype(np.float16) * 0.1 + 0.01).view(np.uint8).reshape(rows, row // blck, 2)
        raw[:, :, off:off + 2] = h
    return raw.reshape(rows, -1)


def write_file(path, rs, extra_kv=True):
    w = gguf.GGUFWriter(str(path), "llama")
    if extra_kv:
        w.add_uint8("t.u8", 200)
        w.add_int8("t.i8", -100)
        w.add_uint16("t.u16", 60000)
        w.add_int16("t.i16", -30000)
        w.add_uint32("t.u32", 4000000000)
        w.add_int32("t.i32", -2000000000)
        w.add_float32("t.f32", 0.1)
        w.add_float64("t.f64", 1e300)
        w.add_bool("t.bool", True)
        w.add_uint64("t.u64", 2 ** 62)
        w.add_int64("t.i64", -2 ** 62)
        w.add_string("t.str", "héllo \"world\"\n")
        w.add_array("t.arr_i", [1, -2, 3])
        w.add_array("t.arr_f", [0.5, -1.25])
        w.add_array("t.arr_s", ["a", "", "ünï"])
        w.add_array("t.nested", [[1, 2], [3]])
    shapes = {}
    for k, qt in enumerate(FORMATS):
        shape = (3, 512) if gguf.GGML_QUANT_SIZES[qt][0] > 1 else (3, 40)
        data = random_blocks(qt, shape, rs)
        name = f"blk.{k}.{qt.name.lower()}"
        if qt in (Q.F32, Q.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
        shapes[name] = (qt, shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return shapes


def run_driver(driver, path, out):
    p = subprocess.run([str(driver), str(path), str(out)], capture_output=True, text=True, timeout=120)
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr
    return p


def scaled(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / max(1.0, np.abs(b).max()))


def test_keys_tensors_and_dequantization_match_gguf_py(driver, tmp_path):
    rs = np.random.RandomState(0)
    path = tmp_path / "m.gguf"
    shapes = write_file(path, rs)
    p = run_driver(driver, path, tmp_path / "out.safetensors")
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    assert lines[0]["version"] == 3
    got_kv = {x["key"]: x for x in lines if "key" in x}
    rd = gguf.GGUFReader(str(path))
    for name, field in rd.fields.items():
        if name.startswith("GGUF."):  # the reader's pseudo-fields: the header's version and counts
            continue
        g = got_kv.pop(name)
        assert g["type"] == int(field.types[0]), name
        if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[1] == gguf.GGUFValueType.ARRAY:
            assert g["values"] == [None] * g["n"]  # nested arrays: counted, not handed out
            continue
        want = field.contents()
        want = want if isinstance(want, list) else [want]
        if field.types[-1] in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
            assert np.allclose(g["values"], want, rtol=1e-7, atol=0), name
        else:
            assert g["values"] == [int(v) if isinstance(v, (bool, np.bool_)) else v for v in want], name
    assert not got_kv
    got_t = {x["tensor"]: x for x in lines if "tensor" in x}
    out = load_file(str(tmp_path / "out.safetensors"))
    for t in rd.tensors:
        qt, shape = shapes[t.name]
        g = got_t[t.name]
        assert g["type"] == int(qt) and tuple(g["shape"]) == shape and g["nbytes"] == t.n_bytes
        want = gguf.quants.dequantize(np.asarray(t.data), qt).reshape(shape).astype(np.float64)
        err = scaled(out[t.name], want)
        assert err <= 1e-6, (t.name, err)
        assert np.abs(want).max() > 0
        if qt in (Q.Q4_0, Q.Q4_K, Q.Q5_0, Q.Q5_K):  # a wrong variant: the neighbouring format's reading of the bytes
            other = {Q.Q4_0: Q.Q4_1, Q.Q4_K: Q.Q5_K, Q.Q5_0: Q.Q5_1, Q.Q5_K: Q.Q4_K}[qt]
            ob, os_ = gguf.GGML_QUANT_SIZES[other]
            raw = np.asarray(t.data).reshape(-1)
            nb = raw.size // os_
            if nb:
                alt = gguf.quants.dequantize(raw[:nb * os_].reshape(-1, os_), other).reshape(-1)
                n = min(alt.size, want.size)
                ok = np.isfinite(alt[:n])  # the other format may read our scales' bytes as inf
                assert scaled(out[t.name].reshape(-1)[:n][ok], alt[:n][ok].astype(np.float64)) > 1e-2
    # the shape is GGUF's ne reversed: a (3, 512) tensor is stored with ne = [512, 3]
    assert got_t["blk.0.f32"]["shape"] == [3, 40]


def test_hostile_files_refused(driver, tmp_path):
    rs = np.random.RandomState(1)
    good = tmp_path / "good.gguf"
    write_file(good, rs, extra_kv=False)
    b = good.read_bytes()
    cases = {}
    for cut in sorted({4, 8, 16, 24, 30, 60, len(b) // 3, len(b) // 2, len(b) - 40}):  # (the last 31 may be padding)
        cases[f"cut{cut}"] = (b[:cut], "")
    cases["magic"] = (b"GGUX" + b[4:], "magic")
    cases["version"] = (b[:4] + struct.pack("<I", 9) + b[8:], "version 9")
    cases["n_tensors"] = (b[:8] + struct.pack("<Q", 2 ** 62) + b[16:], "cannot fit")
    cases["n_kv"] = (b[:16] + struct.pack("<Q", 2 ** 61) + b[24:], "cannot fit")
    cases["key_len"] = (b[:24] + struct.pack("<Q", 2 ** 63) + b[32:], "needs")
    # the first key's value type (after its 8-byte length and text)
    klen = struct.unpack("<Q", b[24:32])[0]
    at = 32 + klen
    cases["value_type"] = (b[:at] + struct.pack("<I", 77) + b[at + 4:], "unknown value type")
    # a tensor's ggml type, dims and offset: find the first tensor name in the header
    name = b"blk.0.f32"
    ti = b.index(name) + len(name)
    cases["n_dims"] = (b[:ti] + struct.pack("<I", 9) + b[ti + 4:], "dimensions")
    nd = struct.unpack("<I", b[ti:ti + 4])[0]
    ty_at = ti + 4 + 8 * nd
    cases["ggml_type"] = (b[:ty_at] + struct.pack("<I", 99) + b[ty_at + 4:], "unknown ggml type")
    cases["offset_misaligned"] = (b[:ty_at + 4] + struct.pack("<Q", 3) + b[ty_at + 12:], "alignment")
    cases["offset_past_end"] = (b[:ty_at + 4] + struct.pack("<Q", 2 ** 40) + b[ty_at + 12:], "past")
    dim_at = ti + 4
    cases["dim_huge"] = (b[:dim_at] + struct.pack("<Q", 2 ** 63 - 1) + b[dim_at + 8:], "")
    cases["overlap"] = (b[:ty_at + 4] + struct.pack("<Q", 32 * ((len(b) // 2) // 32)) + b[ty_at + 12:], "")
    # a duplicate key: the writer's own architecture key twice
    w = gguf.GGUFWriter(str(tmp_path / "dup.gguf"), "llama")
    w.add_uint32("dup.k", 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    d = (tmp_path / "dup.gguf").read_bytes()
    kv_start = 24
    # duplicate the whole key/value section and double the count
    n_kv = struct.unpack("<Q", d[16:24])[0]
    cases["duplicate_key"] = (d[:16] + struct.pack("<Q", 2 * n_kv) + d[kv_start:] + d[kv_start:], "twice")
    for case, (data, needle) in cases.items():
        f = tmp_path / f"{case}.gguf"
        f.write_bytes(data)
        p = run_driver(driver, f, tmp_path / f"{case}.out")
        assert p.returncode == 1, (case, p.returncode, p.stderr, p.stdout[:200])
        assert str(f) in p.stderr and needle in p.stderr, (case, p.stderr)
        assert not (tmp_path / f"{case}.out").exists()
    assert run_driver(driver, good, tmp_path / "good.out").returncode == 0  # the control opens


def test_info_lists_a_gguf_file(tmp_path):
    from conftest import run
    rs = np.random.RandomState(2)
    path = tmp_path / "m.gguf"
    write_file(path, rs)
    out = run("info", path).stdout
    assert out.startswith("GGUF v3: 17 keys, 12 tensors")
    assert '"héllo \\"world\\"' in out or 't.str' in out
    assert "blk.11.q6_k" in out and "Q6_K  [3, 512] 1260 bytes" in out
    assert "[str x 3]" in out and "4000000000" in out
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes()[:100])
    p = run("info", bad, check=False)
    assert p.returncode == 1 and str(bad) in p.stderr
