"""Bad input gets a clear error and changes nothing: for each broken checkpoint, config, features
file or output path, `mmbridge connect` exits non-zero (not by a signal), says on stderr which file
(and tensor) and what is wrong, and leaves no output file (and no temporary) behind.

Every case starts from one valid tiny LLaVA checkpoint (made once per module with make_llava) and
breaks one thing. Crafted safetensors files are built byte by byte with st_bytes."""
import json
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VISION, TEXT, run, save_features
from test_llava_transformers import make_llava

PN = "model.multi_modal_projector."  # names for crafted headers (validated before any binding)
V, D = VISION["hidden_size"], TEXT["hidden_size"]
N_HIDDEN = VISION["num_hidden_layers"] + 1
TOKENS = (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1


# ---- helpers ---------------------------------------------------------------------------------

def st_bytes(header, data=b"", length=None):
    """A safetensors file: u64 LE header length, the header (a dict, dumped as JSON, or str/bytes
    given verbatim), then the raw data section. `length` overrides the declared header length."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def read_header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(checkpoint dir, features file) both valid; never modified by the tests."""
    root = tmp_path_factory.mktemp("bad_input_base")
    _, d = make_llava(root, "gelu", -2, "default", True)
    torch.manual_seed(2)
    feats = root / "features.safetensors"
    save_features(feats, [torch.randn(2, TOKENS, V) for _ in range(N_HIDDEN)])
    return d, feats


@pytest.fixture
def ckpt(tmp_path, base):
    """A private copy of the valid checkpoint directory."""
    d = tmp_path / "ckpt"
    shutil.copytree(base[0], d)
    return d


@pytest.fixture
def feats(base):
    return base[1]


@pytest.fixture
def P(base):
    """The projector's key prefix in this transformers version's checkpoints."""
    keys = load_file(str(base[0] / "model.safetensors")).keys()
    return next(p for p in ("model.multi_modal_projector.", "multi_modal_projector.")
                if p + "linear_1.weight" in keys)


def assert_fails(tmp_path, model, features, *words, out=None, tensor=None, names=()):
    """Runs connect, which must fail cleanly: exit code > 0, stderr naming every entry of `names`
    (file names), `tensor` if given (a name or a tuple of acceptable names), matching each of
    `words` (regexes, case-insensitive), and no output or temporary left in OUT's directory."""
    out = out or tmp_path / "out" / "emb.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    p = run("connect", model, "--features", features, "-o", out, check=False)
    err = p.stderr
    assert p.returncode > 0, f"exit {p.returncode} (a signal if negative); stderr:\n{err}"
    assert "Sanitizer" not in err and "runtime error" not in err, err
    assert err.strip(), "no message on stderr"
    for n in names:
        assert str(n) in err, f"stderr does not name {n!r}:\n{err}"
    if tensor is not None:
        alts = (tensor,) if isinstance(tensor, str) else tuple(tensor)
        assert any(t in err for t in alts), f"stderr names none of the tensors {alts}:\n{err}"
    for w in words:
        assert re.search(w, err, re.IGNORECASE), f"stderr does not match {w!r}:\n{err}"
    assert not out.exists(), f"{out} was written"
    if out.parent.is_dir():
        left = [x.name for x in out.parent.iterdir() if ".tmp." in x.name or x.name.startswith(".mmb-")]
        assert not left, f"temporaries left behind: {left}"
    return err


def test_valid_baseline(tmp_path, ckpt, feats):
    """The unbroken checkpoint and features do work (so the failures below are the breakage's)."""
    out = tmp_path / "ok.safetensors"
    run("connect", ckpt, "--features", feats, "-o", out)
    assert load_file(str(out))["embeddings"].shape == (2, TOKENS - 1, D)


def test_odd_header_length_still_works(tmp_path, ckpt, feats):
    """Not bad input: safetensors does not promise alignment, and published files have odd header
    lengths. Such a checkpoint must give the same embeddings as the aligned one."""
    run("connect", ckpt, "--features", feats, "-o", tmp_path / "aligned.safetensors")
    st = ckpt / "model.safetensors"
    raw = st.read_bytes()
    hlen, hdr = read_header(st)
    h = json.dumps(hdr, separators=(",", ":"))
    h += " " * (1 - len(h) % 2)  # odd length
    st.write_bytes(st_bytes(h, raw[8 + hlen:]))
    run("connect", ckpt, "--features", feats, "-o", tmp_path / "odd.safetensors")
    a = load_file(str(tmp_path / "aligned.safetensors"))["embeddings"]
    b = load_file(str(tmp_path / "odd.safetensors"))["embeddings"]
    assert torch.equal(a, b)


# ---- truncated checkpoint ---------------------------------------------------------------------

@pytest.mark.parametrize("where", ["length", "header", "data_start", "data_end"])
def test_truncated_safetensors(tmp_path, ckpt, feats, where):
    st = ckpt / "model.safetensors"
    raw = st.read_bytes()
    hlen, hdr = read_header(st)
    cut = {"length": 5, "header": 8 + hlen // 2, "data_start": 8 + hlen + 3, "data_end": len(raw) - 1}[where]
    st.write_bytes(raw[:cut])
    if where.startswith("data"):
        dlen = cut - 8 - hlen
        beyond = [k for k, v in hdr.items() if k != "__metadata__" and v["data_offsets"][1] > dlen]
        assert_fails(tmp_path, ckpt, feats, r"outside|truncated|past|beyond", names=["model.safetensors"],
                     tensor=beyond)
    else:
        assert_fails(tmp_path, ckpt, feats, r"truncated", names=["model.safetensors"])


# ---- headers that lie ---------------------------------------------------------------------------

W1, B1 = PN + "linear_1.weight", PN + "linear_1.bias"
F32x4 = struct.pack("<4f", 1, 2, 3, 4)


def ok_entries():
    return {W1: entry("F32", [2, 2], 0, 16), B1: entry("F32", [2], 16, 24)}


LIES = {
    # name: (header, data, tensor named in the message, problem regex)
    "offsets_past_eof": (dict(ok_entries(), **{B1: entry("F32", [2], 16, 4096)}), F32x4 * 2, B1,
                         r"outside|past|beyond"),
    "end_past_eof_exact": (dict(ok_entries(), **{B1: entry("F32", [4], 16, 32)}), F32x4 + F32x4[:8], B1,
                           r"outside|past|beyond"),
    "overlap": (dict(ok_entries(), **{B1: entry("F32", [2], 8, 16)}), F32x4 * 2, (W1, B1), r"overlap"),
    "begin_gt_end": (dict(ok_entries(), **{B1: entry("F32", [0], 24, 16)}), F32x4 * 2, B1,
                     r"data_offsets|begin|outside"),
    "offset_2p64": (dict(ok_entries(), **{B1: entry("F32", [2], 16, 2**64 - 1)}), F32x4 * 2, B1,
                    r"data_offsets"),
    "offset_2p64_wrap": (dict(ok_entries(), **{B1: entry("F32", [2], 2**64 - 8, 0)}), F32x4 * 2, B1,
                         r"data_offsets"),
    "offset_1e300": (dict(ok_entries(), **{B1: entry("F32", [2], 16, 1e300)}), F32x4 * 2, B1, r"data_offsets"),
    "offset_negative": (dict(ok_entries(), **{B1: entry("F32", [2], -8, 0)}), F32x4 * 2, B1, r"data_offsets"),
    "offset_fraction": (dict(ok_entries(), **{B1: entry("F32", [2], 16.5, 24)}), F32x4 * 2, B1, r"data_offsets"),
    "unknown_dtype": (dict(ok_entries(), **{B1: entry("F33", [2], 16, 24)}), F32x4 * 2, B1, r"dtype.*F33"),
    "shape_vs_bytes": (dict(ok_entries(), **{B1: entry("F32", [3], 16, 24)}), F32x4 * 2, B1, r"bytes"),
    "shape_overflow": (dict(ok_entries(), **{B1: entry("F32", [2**31, 2**31, 2**31], 16, 24)}), F32x4 * 2, B1,
                       r"overflow"),
    "shape_overflow_bytes": (dict(ok_entries(), **{B1: entry("F32", [2**31, 2**31, 2**2], 16, 24)}), F32x4 * 2,
                             B1, r"bytes|overflow"),
    "shape_negative": (dict(ok_entries(), **{B1: entry("F32", [-2], 16, 24)}), F32x4 * 2, B1, r"shape"),
    "shape_float": (dict(ok_entries(), **{B1: entry("F32", [2.5], 16, 24)}), F32x4 * 2, B1, r"shape"),
    "shape_string": (dict(ok_entries(), **{B1: entry("F32", ["2"], 16, 24)}), F32x4 * 2, B1, r"shape"),
    "shape_null": (dict(ok_entries(), **{B1: entry("F32", [None], 16, 24)}), F32x4 * 2, B1, r"shape"),
    "shape_not_list": (dict(ok_entries(), **{B1: entry("F32", 2, 16, 24)}), F32x4 * 2, B1, r"shape"),
    "offsets_three": (dict(ok_entries(), **{B1: {"dtype": "F32", "shape": [2], "data_offsets": [16, 24, 32]}}),
                      F32x4 * 2, B1, r"data_offsets"),
    "entry_not_object": (dict(ok_entries(), **{B1: [16, 24]}), F32x4 * 2, B1, r"not an object"),
    "metadata_not_strings": (dict(ok_entries(), __metadata__={"format": 1}), F32x4 * 2, None, r"__metadata__"),
}


@pytest.mark.parametrize("case", sorted(LIES))
def test_header_lies(tmp_path, ckpt, feats, case):
    header, data, tensor, problem = LIES[case]
    (ckpt / "model.safetensors").write_bytes(st_bytes(header, data))
    assert_fails(tmp_path, ckpt, feats, problem, names=["model.safetensors"], tensor=tensor)


RAW = {
    # name: (file bytes, tensor or None, problem regex)
    "header_len_past_eof": (st_bytes(ok_entries(), F32x4 * 2, length=10_000), None, r"truncated|header length"),
    "header_len_2p64": (st_bytes(ok_entries(), F32x4 * 2, length=2**64 - 1), None, r"truncated|header length"),
    "header_len_zero": (st_bytes(ok_entries(), F32x4 * 2, length=0), None, r"JSON"),
    "header_not_json": (st_bytes(b"this is not json at all", F32x4), None, r"JSON"),
    "header_json_array": (st_bytes(b"[1, 2, 3]", F32x4), None, r"JSON object|not an object"),
    "header_json_string": (st_bytes(b'"model"', F32x4), None, r"JSON object|not an object"),
    "header_cut_json": (st_bytes(json.dumps(ok_entries())[:-7].encode(), F32x4 * 2), None, r"JSON"),
    "duplicate_tensor": (st_bytes('{"%s": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                  '"%s": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}' % (B1, B1),
                                  F32x4), B1, r"twice|duplicate"),
    "duplicate_metadata": (st_bytes('{"__metadata__": {"a": "1", "b": "2"}, "__metadata__": {"c": "3"}}'), None,
                           r"__metadata__"),
    "empty_file": (b"", None, r"truncated"),
}


@pytest.mark.parametrize("case", sorted(RAW))
def test_header_raw_bytes(tmp_path, ckpt, feats, case):
    blob, tensor, problem = RAW[case]
    (ckpt / "model.safetensors").write_bytes(blob)
    assert_fails(tmp_path, ckpt, feats, problem, names=["model.safetensors"], tensor=tensor)


# ---- projector tensors ------------------------------------------------------------------------

def rewrite(ckpt, fn):
    sd = load_file(str(ckpt / "model.safetensors"))
    fn(sd)
    save_file(sd, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def test_missing_projector_tensor(tmp_path, ckpt, feats, P):
    rewrite(ckpt, lambda sd: sd.pop(P + "linear_2.weight"))
    assert_fails(tmp_path, ckpt, feats, r"missing", names=[ckpt.name], tensor=P + "linear_2.weight")


def test_missing_first_projector_tensor(tmp_path, ckpt, feats, P):
    rewrite(ckpt, lambda sd: sd.pop(P + "linear_1.weight"))
    assert_fails(tmp_path, ckpt, feats, r"missing", names=[ckpt.name], tensor=P + "linear_1.weight")


@pytest.mark.parametrize("name,shape", [("linear_2.weight", (D, D + 1)), ("linear_1.weight", (V, D)),
                                        ("linear_1.bias", (D, 1)), ("linear_2.bias", ())])
def test_projector_wrong_shape(tmp_path, ckpt, feats, name, shape, P):
    rewrite(ckpt, lambda sd: sd.__setitem__(P + name, torch.zeros(shape)))
    assert_fails(tmp_path, ckpt, feats, r"shape", names=["model.safetensors"], tensor=P + name)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float64])
def test_projector_non_float_dtype(tmp_path, ckpt, feats, dtype, P):
    rewrite(ckpt, lambda sd: sd.__setitem__(P + "linear_1.weight", sd[P + "linear_1.weight"].to(dtype)))
    assert_fails(tmp_path, ckpt, feats, r"dtype", names=["model.safetensors"], tensor=P + "linear_1.weight")


# ---- config.json --------------------------------------------------------------------------------

def edit_config(ckpt, fn):
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    cfg = fn(cfg) or cfg
    path.write_text(json.dumps(cfg))


def test_unknown_hf_activation(tmp_path, ckpt, feats):
    edit_config(ckpt, lambda c: c.__setitem__("projector_hidden_act", "bogus"))
    assert_fails(tmp_path, ckpt, feats, r"bogus", r"not supported|unsupported|unknown", names=["config.json"])


def test_unknown_original_projector_type(tmp_path, ckpt, feats):
    (ckpt / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": D,
        "mm_hidden_size": V, "mm_projector_type": "mlp2x_relu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch"}))
    assert_fails(tmp_path, ckpt, feats, r"mlp2x_relu", r"unknown|not supported|unsupported", names=["config.json"])


@pytest.mark.parametrize("case", ["truncated", "array", "empty", "layer_string", "layer_list_strings",
                                  "layer_float", "text_hidden_negative", "vision_hidden_negative",
                                  "vision_hidden_string", "image_size_zero", "strategy_bogus",
                                  "bias_string", "too_many_layers", "orig_hidden_negative",
                                  "vision_config_not_object", "text_config_list"])
def test_malformed_config(tmp_path, ckpt, feats, case):
    path = ckpt / "config.json"
    text = path.read_text()
    cfg = json.loads(text)
    problem = {"truncated": r"JSON", "array": r"JSON object|not an object", "empty": r"JSON",
               "layer_string": r"vision_feature_layer", "layer_list_strings": r"vision_feature_layer",
               "layer_float": r"vision_feature_layer", "text_hidden_negative": r"range|negative|hidden_size",
               "vision_hidden_negative": r"range|negative|hidden_size", "vision_hidden_string": r"hidden_size",
               "image_size_zero": r"range|image_size", "strategy_bogus": r"vision_feature_select_strategy",
               "bias_string": r"multimodal_projector_bias", "too_many_layers": r"vision_feature_layer",
               "orig_hidden_negative": r"mm_hidden_size", "vision_config_not_object": r"vision_config",
               "text_config_list": r"text_config"}[case]
    if case == "truncated":
        path.write_text(text[: len(text) // 2])
    elif case == "array":
        path.write_text(json.dumps([cfg]))
    elif case == "empty":
        path.write_text("")
    else:
        vc = cfg["vision_config"]
        if case == "layer_string":
            cfg["vision_feature_layer"] = "-2"
        elif case == "layer_list_strings":
            cfg["vision_feature_layer"] = [-2, "x"]
        elif case == "layer_float":
            cfg["vision_feature_layer"] = -1.5
        elif case == "text_hidden_negative":
            cfg["text_config"]["hidden_size"] = -D
        elif case == "vision_hidden_negative":
            vc["hidden_size"] = -V
        elif case == "vision_hidden_string":
            vc["hidden_size"] = "32"
        elif case == "image_size_zero":
            vc["image_size"] = 0
        elif case == "strategy_bogus":
            cfg["vision_feature_select_strategy"] = "bogus"
        elif case == "bias_string":
            cfg["multimodal_projector_bias"] = "yes"
        elif case == "too_many_layers":
            cfg["vision_feature_layer"] = list(range(65))
        elif case == "vision_config_not_object":
            cfg["vision_config"] = 5
        elif case == "text_config_list":
            cfg["text_config"] = [cfg["text_config"]]
        elif case == "orig_hidden_negative":
            cfg = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": D,
                   "mm_hidden_size": -V, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2}
        path.write_text(json.dumps(cfg))
    assert_fails(tmp_path, ckpt, feats, problem, names=["config.json"])


def test_missing_config(tmp_path, ckpt, feats):
    (ckpt / "config.json").unlink()
    assert_fails(tmp_path, ckpt, feats, r"cannot open|no such|missing", names=["config.json"])


# ---- features files ------------------------------------------------------------------------------

def write_feats(path, width=V, layers=range(N_HIDDEN), dtype=torch.float32, shape=None):
    torch.manual_seed(3)
    t = {f"hidden_states.{i}": torch.randn(shape if shape is not None else (2, TOKENS, width)).to(dtype) for i in layers}
    save_file(t, str(path))
    return path


def test_features_wrong_width(tmp_path, ckpt):
    f = write_feats(tmp_path / "feat_wide.safetensors", width=V + 3)
    assert_fails(tmp_path, ckpt, f, r"wide|width", names=["feat_wide.safetensors"])


def test_features_missing_layer(tmp_path, ckpt):
    f = write_feats(tmp_path / "feat_nolayer.safetensors", layers=[0, 1])
    assert_fails(tmp_path, ckpt, f, r"missing", names=["feat_nolayer.safetensors"], tensor="hidden_states.2")


def test_features_no_hidden_states(tmp_path, ckpt):
    f = tmp_path / "feat_none.safetensors"
    save_file({"pixel_values": torch.zeros(1, 3, 2, 2)}, str(f))
    assert_fails(tmp_path, ckpt, f, r"hidden_states", names=["feat_none.safetensors"])


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.float64])
def test_features_non_float(tmp_path, ckpt, dtype):
    f = write_feats(tmp_path / "feat_int.safetensors", dtype=dtype)
    assert_fails(tmp_path, ckpt, f, r"F32|dtype|float", names=["feat_int.safetensors"], tensor="hidden_states.")


@pytest.mark.parametrize("shape", [(2 * TOKENS * V,), (), (1, 2, TOKENS, V)])
def test_features_wrong_rank(tmp_path, ckpt, shape):
    f = write_feats(tmp_path / "feat_rank.safetensors", shape=shape)
    assert_fails(tmp_path, ckpt, f, r"dims|shape|rank", names=["feat_rank.safetensors"], tensor="hidden_states.")


def test_features_too_few_tokens(tmp_path, ckpt):
    f = write_feats(tmp_path / "feat_tok.safetensors", shape=(2, 1, V))
    assert_fails(tmp_path, ckpt, f, r"token", names=["feat_tok.safetensors"])


@pytest.mark.parametrize("frac", [0.003, 0.5, 0.999])
def test_features_truncated(tmp_path, ckpt, feats, frac):
    raw = feats.read_bytes()
    f = tmp_path / "feat_cut.safetensors"
    f.write_bytes(raw[: max(1, int(len(raw) * frac))])
    assert_fails(tmp_path, ckpt, f, r"truncated|outside|JSON", names=["feat_cut.safetensors"])


def test_features_missing_file(tmp_path, ckpt):
    assert_fails(tmp_path, ckpt, tmp_path / "nope.safetensors", r"cannot open|no such", names=["nope.safetensors"])


# ---- sharded checkpoints --------------------------------------------------------------------------

def shard(ckpt):
    """Splits model.safetensors into two shards with an index; returns the index dict."""
    sd = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    wm = {}
    for i, part in enumerate([keys[:half], keys[half:]]):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(ckpt / name), metadata={"format": "pt"})
        wm.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": wm}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_sharded_baseline(tmp_path, ckpt, feats):
    shard(ckpt)
    out = tmp_path / "ok.safetensors"
    run("connect", ckpt, "--features", feats, "-o", out)
    assert out.exists()


def test_sharded_missing_shard(tmp_path, ckpt, feats, P):
    index = shard(ckpt)
    index["weight_map"][P + "linear_1.weight"] = "model-00003-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails(tmp_path, ckpt, feats, r"cannot open|no such|missing", names=["model-00003-of-00002.safetensors"])


def test_sharded_shard_deleted(tmp_path, ckpt, feats):
    shard(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    assert_fails(tmp_path, ckpt, feats, r"cannot open|no such|missing", names=["model-00002-of-00002.safetensors"])


def test_sharded_tensor_not_in_shard(tmp_path, ckpt, feats, P):
    index = shard(ckpt)
    wm = index["weight_map"]
    k = P + "linear_2.bias"
    wm[k] = "model-00002-of-00002.safetensors" if wm[k].startswith("model-00001") else "model-00001-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails(tmp_path, ckpt, feats, r"not in|missing", names=[wm[k]], tensor=k)


def test_sharded_ghost_tensor(tmp_path, ckpt, feats):
    index = shard(ckpt)
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails(tmp_path, ckpt, feats, r"not in|missing", names=["model-00001-of-00002.safetensors"],
                 tensor="model.ghost.weight")


@pytest.mark.parametrize("target", ["../model.safetensors", "/etc/passwd"])
def test_sharded_index_escapes_directory(tmp_path, ckpt, feats, target, P):
    index = shard(ckpt)
    index["weight_map"][P + "linear_1.weight"] = target
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails(tmp_path, ckpt, feats, r"outside", names=["model.safetensors.index.json"])


def test_sharded_index_malformed(tmp_path, ckpt, feats):
    shard(ckpt)
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": [')
    assert_fails(tmp_path, ckpt, feats, r"JSON", names=["model.safetensors.index.json"])


def test_tensor_in_two_files(tmp_path, ckpt, feats, P):
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file({P + "linear_1.bias": sd[P + "linear_1.bias"]}, str(ckpt / "extra.safetensors"))
    assert_fails(tmp_path, ckpt, feats, r"both|two|twice", names=["extra.safetensors"], tensor=P + "linear_1.bias")


# ---- output path ---------------------------------------------------------------------------------

def test_output_dir_missing(tmp_path, ckpt, feats):
    out = tmp_path / "no" / "such" / "dir" / "emb.safetensors"
    p = run("connect", ckpt, "--features", feats, "-o", out, check=False)
    assert p.returncode > 0, p.stderr
    assert "emb.safetensors" in p.stderr and re.search(r"cannot|no such", p.stderr, re.I), p.stderr
    assert not out.parent.exists()


def test_output_is_a_directory(tmp_path, ckpt, feats):
    out = tmp_path / "emb.safetensors"
    out.mkdir()
    p = run("connect", ckpt, "--features", feats, "-o", out, check=False)
    assert p.returncode > 0, p.stderr
    assert "emb.safetensors" in p.stderr, p.stderr
    assert out.is_dir() and not any(out.iterdir())
    assert not [x.name for x in tmp_path.iterdir() if ".tmp." in x.name]


@pytest.mark.parametrize("breakage", ["features_width", "checkpoint_truncated", "config_array"])
def test_failure_keeps_existing_output(tmp_path, ckpt, feats, breakage):
    out = tmp_path / "emb.safetensors"
    before = b"precious bytes that must survive\n" * 4
    out.write_bytes(before)
    if breakage == "features_width":
        feats = write_feats(tmp_path / "feat_wide.safetensors", width=V + 1)
    elif breakage == "checkpoint_truncated":
        st = ckpt / "model.safetensors"
        st.write_bytes(st.read_bytes()[:-16])
    else:
        (ckpt / "config.json").write_text("[]")
    p = run("connect", ckpt, "--features", feats, "-o", out, check=False)
    assert p.returncode > 0, p.stderr
    assert out.read_bytes() == before
    assert not [x.name for x in tmp_path.iterdir() if ".tmp." in x.name]
