"""Hostile checkpoints (issue 20): inputs an attacker can ship in a checkpoint directory, or hand the
CLI, must end in a non-zero exit with a clear message, in bounded time (a subprocess timeout), without
a signal (returncode > 0), and within bounded memory (RLIMIT_AS set before exec).

Parts covered here: linear-time header parsing (1M-entry headers, duplicate names in a header and
across shards), non-regular files in place of every input (FIFOs, devices, sockets), range checks on
the integers a checkpoint supplies, and a mapped file truncated while open."""
import json
import os
import shutil
import socket
import struct
import subprocess

import pytest
import torch

from conftest import BIN, VISION, address_space_limit, compile_driver, save_features
from test_llava_transformers import make_llava

V = VISION["hidden_size"]
N_HIDDEN = VISION["num_hidden_layers"] + 1
TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1
MEM = 4 << 30  # the address-space bound of every hostile run (the CLI maps, parses and allocates within it)
TIMEOUT = 120  # seconds: a bound far above any run here, far below "forever"


def limited(mem=MEM):
    return address_space_limit(mem)


def hostile(args, *needles, timeout=TIMEOUT, mem=MEM, ok=False):
    """Runs the CLI with args under the memory bound and the timeout. Unless ok, it must fail: exit
    status > 0 (no signal), a message on stderr containing each of needles (case-insensitive), no
    sanitizer report. Returns the CompletedProcess."""
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       preexec_fn=limited(mem))
    assert "Sanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr
    if ok:
        assert p.returncode == 0, f"exit {p.returncode}:\n{p.stderr}"
        return p
    assert p.returncode > 0, f"exit {p.returncode} (a signal if negative); stderr:\n{p.stderr}"
    assert p.stderr.strip(), "no message on stderr"
    for n in needles:
        assert n.lower() in p.stderr.lower(), f"stderr lacks {n!r}:\n{p.stderr}"
    return p


def st_bytes(header, data=b""):
    h = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data


def many_entries(n, prefix="x", dup=None):
    """The JSON header (bytes) of n zero-length F32 tensors {prefix}{i}; dup: a name appended again at the end."""
    e = b'{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    parts = [b'"%s%d":%s' % (prefix.encode(), i, e) for i in range(n)]
    if dup is not None:
        parts.append(b'"%s":%s' % (dup.encode(), e))
    return b"{" + b",".join(parts) + b"}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(checkpoint dir, features file) both valid; never modified by the tests."""
    root = tmp_path_factory.mktemp("hostile_base")
    _, d = make_llava(root, "gelu", -2, "default", True)
    torch.manual_seed(2)
    feats = root / "features.safetensors"
    save_features(feats, [torch.randn(2, TOKENS, V) for _ in range(N_HIDDEN)])
    return d, feats


@pytest.fixture
def ckpt(tmp_path, base):
    d = tmp_path / "ckpt"
    shutil.copytree(base[0], d)
    return d


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return compile_driver("st_probe_driver", tmp_path_factory.mktemp("probe"))


# ---- part 3: linear-time parsing ------------------------------------------------------------------

N_BIG = 1_000_000


@pytest.fixture(scope="module")
def big_header(tmp_path_factory):
    """A tiny safetensors file (no data) whose header has 1M zero-length tensors, and one where the
    last of 1M + 1 entries repeats the first's name."""
    d = tmp_path_factory.mktemp("big")
    ok, dup = d / "ok.safetensors", d / "dup.safetensors"
    ok.write_bytes(st_bytes(many_entries(N_BIG)))
    dup.write_bytes(st_bytes(many_entries(N_BIG, dup="x0")))
    return ok, dup


def test_million_entries_linear_work(probe, big_header):
    """The duplicate check's key comparisons over 1M names are counted (mmb__st_probes): a hash set
    makes about one per insertion (the table is at most half full), bounded here by 4 per entry; a
    pairwise check would make n^2 / 2 = 5e11. The run itself gets the generous bound of 1M entries x
    100 us."""
    p = subprocess.run([str(probe), str(big_header[0])], capture_output=True, text=True, timeout=100,
                       preexec_fn=limited())
    assert p.returncode == 0, p.stderr
    n, probes = map(int, p.stdout.split())
    assert n == N_BIG
    assert probes <= 4 * N_BIG, probes


def test_million_entries_duplicate_refused(probe, big_header):
    p = subprocess.run([str(probe), str(big_header[1])], capture_output=True, text=True, timeout=100,
                       preexec_fn=limited())
    assert p.returncode == 1 and "'x0' appears twice" in p.stderr, p.stderr


def test_million_entries_features_through_cli(base, big_header):
    """Through the CLI: a 1M-entry features file is parsed (then refused for lacking hidden states)
    within the bound, and the duplicate among 1M is named."""
    hostile(["connect", base[0], "--features", big_header[0], "-o", "/nonexistent/x.safetensors"],
            "hidden_states", timeout=100)
    hostile(["connect", base[0], "--features", big_header[1], "-o", "/nonexistent/x.safetensors"],
            "'x0' appears twice", timeout=100)


def test_million_entries_across_shards(tmp_path, ckpt, base):
    """Two extra files in the checkpoint, 500k entries each: the cross-shard uniqueness check is
    linear too, and a name in both is refused naming both files."""
    half = N_BIG // 2
    (ckpt / "a-extra.safetensors").write_bytes(st_bytes(many_entries(half, "a")))
    (ckpt / "b-extra.safetensors").write_bytes(st_bytes(many_entries(half, "b", dup="a7")))
    out = tmp_path / "o.safetensors"
    hostile(["connect", ckpt, "--features", base[1], "-o", out], "'a7' is in both", "a-extra.safetensors",
            "b-extra.safetensors", timeout=100)
    (ckpt / "b-extra.safetensors").write_bytes(st_bytes(many_entries(half, "b")))
    hostile(["connect", ckpt, "--features", base[1], "-o", out], timeout=100, ok=True)


# ---- part 4 (inputs): a FIFO, a device or a socket in place of a file -------------------------------

def make_special(path, kind):
    """Puts a non-regular file at path: a FIFO nobody writes, a character device (a symlink to
    /dev/zero, which reads forever, or /dev/tty, which blocks), or a listening unix socket (the
    socket object is returned, to keep it open)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.listen(1)
        return s
    return None


KINDS = ["fifo", "zero", "socket"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model.safetensors.index.json"])
def test_special_file_in_checkpoint(tmp_path, ckpt, base, name, kind):
    keep = make_special(ckpt / name, kind)
    hostile(["connect", ckpt, "--features", base[1], "-o", tmp_path / "o.safetensors"], name, timeout=30)
    if keep:
        keep.close()


@pytest.mark.parametrize("kind", KINDS)
def test_special_features_file(tmp_path, base, kind):
    p = tmp_path / "feats.safetensors"
    keep = make_special(p, kind)
    hostile(["connect", base[0], "--features", p, "-o", tmp_path / "o.safetensors"], str(p), "not a regular file",
            timeout=30)
    if keep:
        keep.close()


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokenizer_json(tmp_path, ckpt, kind):
    keep = make_special(ckpt / "tokenizer.json", kind)
    hostile(["tokenize", ckpt, "--text", "hi"], "tokenizer.json", "not a regular file", timeout=30)
    if keep:
        keep.close()


@pytest.mark.parametrize("kind", ["fifo", "zero"])
def test_special_image(tmp_path, ckpt, kind):
    p = tmp_path / "img.png"
    make_special(p, kind)
    hostile(["encode", ckpt, p, "-o", tmp_path / "o.safetensors"], "img.png", timeout=30)


# ---- part 5: range checks on the integers a checkpoint supplies -----------------------------------

def edit_json(path, fn):
    j = json.loads(path.read_text())
    fn(j)
    path.write_text(json.dumps(j))


def test_vit_flops_overflow(tmp_path, ckpt, base):
    """image_size 2^20 with patch_size 1: 2^40 tokens, whose attention FLOPs overflow int64."""
    def f(c):
        c["vision_config"]["image_size"] = 1 << 20
        c["vision_config"]["patch_size"] = 1
    edit_json(ckpt / "config.json", f)
    img = tmp_path / "i.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    hostile(["encode", ckpt, img, "-o", tmp_path / "o.safetensors"], "config.json")


def post_ids_dir(tmp_path, new_id):
    from test_tokenizer import KINDS
    d = tmp_path / "tok"
    d.mkdir()
    KINDS["llama2"]().save(str(d / "tokenizer.json"))
    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "ids" and isinstance(v, list):
                    o[k] = [new_id for _ in v]
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    j = json.loads((d / "tokenizer.json").read_text())
    assert j.get("post_processor"), "the fixture tokenizer has no post-processor"
    walk(j["post_processor"])
    (d / "tokenizer.json").write_text(json.dumps(j))
    return d


@pytest.mark.parametrize("new_id", [999999, -1, 1e300, 2.5])
def test_post_processor_id_out_of_range(tmp_path, new_id):
    d = post_ids_dir(tmp_path, new_id)
    hostile(["tokenize", d, "--text", "hi", "--special"], "post_processor", "vocabulary")


@pytest.mark.parametrize("ids", ["4294967301", "-1", "99999999999999999999999", "5x"])
def test_decode_id_out_of_range(tmp_path, ids):
    from test_tokenizer import KINDS
    d = tmp_path / "tok"
    d.mkdir()
    KINDS["llama2"]().save(str(d / "tokenizer.json"))
    hostile(["tokenize", d, "--decode", ids])


@pytest.mark.parametrize("ids", [[4294967301], [-1], [1e300], [2.5], ["5"], 5])
def test_decode_batch_id_out_of_range(tmp_path, ids):
    """--decode-batch, as --decode: an id that is not an int32 >= 0 is refused, never cast."""
    from test_tokenizer import KINDS
    d = tmp_path / "tok"
    d.mkdir()
    KINDS["llama2"]().save(str(d / "tokenizer.json"))
    f = tmp_path / "ids.json"
    f.write_text(json.dumps([[1, 2], ids]))
    hostile(["tokenize", d, "--decode-batch", f], "item 1", "token ids")


@pytest.mark.parametrize("name", ["hidden_states.02", "hidden_states.+2", "hidden_states. 2", "hidden_states.-0",
                                  "hidden_states.2 ", "hidden_states.", "hidden_states.0x2"])
def test_feature_names_strict(tmp_path, base, name):
    torch.manual_seed(3)
    t = {f"hidden_states.{i}": torch.randn(2, TOKENS, V) for i in range(N_HIDDEN)}
    t[name] = torch.randn(2, TOKENS, V)
    from safetensors.torch import save_file
    p = tmp_path / "f.safetensors"
    save_file(t, str(p))
    hostile(["connect", base[0], "--features", p, "-o", tmp_path / "o.safetensors"], name)


@pytest.mark.parametrize("value", ["4abc", " 4", "+4", "", "0", "99999999999999999999"])
def test_metadata_number_whole(tmp_path, base, value):
    torch.manual_seed(3)
    p = tmp_path / "f.safetensors"
    save_features(p, [torch.randn(2, TOKENS, V) for _ in range(N_HIDDEN)], meta={"n_hidden_states": value})
    hostile(["connect", base[0], "--features", p, "-o", tmp_path / "o.safetensors"], "n_hidden_states")


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_rope_factor_huge(tmp_path, ckpt, key, kind):
    """A linear or dynamic RoPE factor of 1e300 (the types whose factor multiplies the position limit):
    refused naming the factor, never a negative position limit. The fixture (transformers v5) writes
    rope_parameters, which the library reads before rope_scaling: the rope_scaling case drops it, or
    the huge factor would sit in a dict nobody reads (as this test's first version did, exiting 0)."""
    def f(c):
        tc = c.get("text_config", c)
        tc.pop("rope_parameters", None)
        tc[key] = {"type": kind, "rope_type": kind, "rope_theta": 10000.0, "factor": 1e300}
    edit_json(ckpt / "config.json", f)
    p = hostile(["info", ckpt], "factor")
    assert "-9223372036854775808" not in p.stderr + p.stdout


@pytest.mark.parametrize("size", [{"height": 1 << 30, "width": 1 << 30}, {"shortest_edge": 1 << 30}])
def test_preprocessor_size_huge(tmp_path, ckpt, size):
    """A size of 2^30: refused before allocating (the memory bound would kill an attempt). The fixture
    ships no preprocessor_config.json: a valid CLIP one (the tower's 28 px) is written first, then
    made hostile."""
    from transformers import CLIPImageProcessor
    S = VISION["image_size"]
    CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}).save_pretrained(ckpt)
    pp = ckpt / "preprocessor_config.json"
    def f(c):
        c["size"] = size
        c["crop_size"] = {"height": 1 << 30, "width": 1 << 30}
    edit_json(pp, f)
    img = tmp_path / "i.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    hostile(["encode", ckpt, img, "-o", tmp_path / "o.safetensors"], "pixels")


# ---- part 2: a mapped file truncated while open ---------------------------------------------------

def test_truncated_while_open_is_caught(tmp_path, base, probe):
    """The re-check a forward pass makes (mmb__st_verify, called by mmb_model_connect, mmb_model_encode,
    mmb_lm_forward and a standalone tower's forward) sees a file truncated in place since it was opened
    and returns MMB_ERR_IO naming it, where reading the mapping would raise SIGBUS."""
    p = tmp_path / "m.safetensors"
    shutil.copy(base[0] / "model.safetensors", p)
    r = subprocess.run([str(probe), str(p), "truncate"], capture_output=True, text=True, timeout=60,
                       preexec_fn=limited())
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "truncated while open" in r.stderr and str(p) in r.stderr, r.stderr


# Strings a tokenizer.json puts into the text its regexes then read without a UTF-8 check (PCRE2_NO_UTF_CHECK): raw
# bytes that are not UTF-8 (JSON must be UTF-8; Python's json and the tokenizers library refuse such a file) once
# made PCRE2 read past the text. Each is refused at open; the same string escaped as valid UTF-8 works.
UTF8_PLACES = {
    "replace_content": lambda bad: {"type": "Replace", "pattern": {"String": "a"}, "content": bad},
    "replace_pattern": lambda bad: {"type": "Replace", "pattern": {"String": bad}, "content": "b"},
    "prepend": lambda bad: {"type": "Prepend", "prepend": bad},
}


@pytest.mark.parametrize("place", list(UTF8_PLACES))
def test_tokenizer_strings_not_utf8_refused(tmp_path, place):
    from test_tokenizer import KINDS
    for bad, ok in (("\udcff", False), ("\u00ff", True)):
        d = tmp_path / ("ok" if ok else "bad")
        d.mkdir()
        KINDS["llama2"]().save(str(d / "tokenizer.json"))
        j = json.loads((d / "tokenizer.json").read_text())
        j["normalizer"] = {"type": "Sequence", "normalizers": [UTF8_PLACES[place]("MARK"), {"type": "NFC"}]}
        text = json.dumps(j, ensure_ascii=False).replace("MARK", bad)
        (d / "tokenizer.json").write_bytes(text.encode("utf-8", "surrogateescape"))  # \udcff -> the byte 0xFF
        args = ["tokenize", d, "--text", "a cat \u00e9 a " * 20]
        hostile(args, ok=True) if ok else hostile(args, "not valid UTF-8")
