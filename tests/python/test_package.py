"""The Python package (python/mmbridge) against the CLI and transformers, through the package only.

Tiny random checkpoints come from transformers' save_pretrained (the oracle tests' helpers, tests/oracle). The
library is the one MMBRIDGE_LIB names, else libmmbridge.so in the build directory ($MMB_BUILD_DIR, the directory
of $MMB_BIN, else build/); the CLI is $MMB_BIN (else build/mmbridge). Without a built library the module is
skipped. tests/run_all.sh runs it three times: against the ASan+UBSan build (an ASan-built .so loads into Python
only with libasan and libubsan preloaded, LD_PRELOAD; memory errors and UB abort the run, leaks are not checked
there, as the interpreter's and torch's own allocations would be reported: the C tests check the library's),
against the Release build, and against the package `pip install .` made (MMB_PY_INSTALLED=1).

Checked: encode equals `mmbridge encode` bit for bit and transformers within 1e-4 (a LLaVA: get_image_features; a
CLIP tower alone: last_hidden_state); hidden_states against output_hidden_states and the CLI's --taps; paths,
bytes, PIL images and numpy arrays give identical results; the returned arrays are the buffers the library wrote
(no copy); a bad image raises mmbridge.Error with the library's message and the model keeps working; 4 Python
threads on one Model equal serial calls; generate equals the CLI's greedy text and transformers' greedy tokens,
and closing it early stops the C side. Each numeric comparison has a plausible wrong variant that is far off."""
import concurrent.futures
import ctypes
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# MMB_PY_INSTALLED=1: test the package as installed (pip install .; on sys.path, with its own library unless
# MMBRIDGE_LIB says otherwise); else the source tree's python/mmbridge over the build directory's library.
INSTALLED = os.environ.get("MMB_PY_INSTALLED") == "1"
sys.path.insert(0, str(ROOT / "tests" / "oracle"))
if not INSTALLED:
    sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel  # noqa: E402

import conftest as oc  # noqa: E402  (tests/oracle/conftest.py: BIN, build_dir, run, scaled_err)


def _library():
    if os.environ.get("MMBRIDGE_LIB"):
        return Path(os.environ["MMBRIDGE_LIB"])
    return oc.build_dir() / "libmmbridge.so"


if not INSTALLED:
    LIB = _library()
    if not LIB.exists():
        pytest.skip(f"{LIB} not built (set MMBRIDGE_LIB or MMB_BUILD_DIR)", allow_module_level=True)
    os.environ["MMBRIDGE_LIB"] = str(LIB)
import mmbridge  # noqa: E402

if INSTALLED:
    assert Path(mmbridge.__file__).resolve().parent != ROOT / "python" / "mmbridge", mmbridge.__file__

from test_vit import TOWER, make_llava, randomize_norms  # noqa: E402

S = TOWER["image_size"]
THREADS = 2  # the package and the CLI compute with the same thread count


def need_cli():
    if not oc.BIN.exists():
        pytest.skip(f"{oc.BIN} not built")


def to_np(t):
    return t.detach().float().numpy()


def err(got, ref):
    return oc.scaled_err(torch.from_numpy(np.asarray(got)), torch.as_tensor(ref))


def write_images(d, shapes, seed):
    rs = np.random.RandomState(seed)
    paths = []
    for i, (h, w) in enumerate(shapes):
        p = Path(d) / f"img{i}.png"
        Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(transformers model, processor, directory, image paths): a LLaVA vision path (tower, layer -2, default
    strategy, projector) with a CLIP processor, saved by transformers."""
    d = tmp_path_factory.mktemp("pkg") / "llava"
    model = make_llava(d, CLIPVisionConfig(**TOWER))
    proc = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    proc.save_pretrained(d)
    paths = write_images(d.parent, [(50, 61), (80, 45), (42, 42), (33, 70)], 1)
    return model, proc, d, paths


@pytest.fixture(scope="module")
def model(llava):
    with mmbridge.Model(llava[2], threads=THREADS) as m:
        yield m


def pixels(proc, paths):
    return proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values


def image_features(model, px, layer):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=px, vision_feature_layer=layer,
                                       vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output)) if hasattr(out, "pooler_output") else out


# ---- the bindings' structures are the header's ---------------------------------------------------------------

def test_struct_layouts_match_the_header(tmp_path):
    """Each ctypes structure's size and field offsets equal the C compiler's for include/mmbridge.h."""
    from mmbridge import _lib
    cc = os.environ.get("CC", "cc")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include \"mmbridge.h\"", "int main(void) {"]
    expect = []
    for name, cls in _lib.STRUCTS.items():
        lines.append(f'printf("%zu\\n", sizeof({name}));')
        expect.append(ctypes.sizeof(cls))
        for f in cls._fields_:
            lines.append(f'printf("%zu\\n", offsetof({name}, {f[0]}));')
            expect.append(getattr(cls, f[0]).offset)
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    try:
        subprocess.run([cc, "-std=c11", f"-I{ROOT / 'include'}", str(src), "-o", str(exe)], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no C compiler")
    got = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()]
    assert got == expect


def test_version_and_info(model, llava):
    assert mmbridge.version() == mmbridge.__version__ == "{}.{}.{}".format(
        *[line.split()[2] for line in (ROOT / "include/mmbridge.h").read_text().splitlines()
          if line.startswith("#define MMB_VERSION_")])
    i = model.info
    assert (i.family, i.architecture, i.fusion) == ("llava", "LlavaForConditionalGeneration", "C")
    assert (i.vision_layers, i.vision_width, i.out_width) == (TOWER["num_hidden_layers"], TOWER["hidden_size"],
                                                              oc.TEXT["hidden_size"])
    assert i.vision_tokens == (S // TOWER["patch_size"]) ** 2 + 1 and i.tokens_per_image == i.vision_tokens - 1
    assert i.has_vision and i.has_connector and i.has_processor and i.processor == "CLIPImageProcessor"
    assert i.as_dict()["out_width"] == i.out_width


# ---- encode -------------------------------------------------------------------------------------------------

def test_encode_equals_cli_and_transformers(model, llava, tmp_path):
    need_cli()
    hf, proc, d, paths = llava
    got = model.encode(paths)
    assert got.dtype == np.float32 and got.shape == (len(paths), model.info.tokens_per_image, model.info.out_width)
    oc.run("encode", d, *paths, "-o", tmp_path / "o.safetensors", "--threads", THREADS)
    cli = load_file(str(tmp_path / "o.safetensors"))["embeddings"].numpy()
    assert cli.shape == got.shape and np.array_equal(cli, got)  # bit for bit
    ref = image_features(hf, pixels(proc, paths), -2)
    e = err(got, ref)
    print(f"encode vs get_image_features: scaled max err {e:.2e}")
    assert e <= 1e-4
    # wrong variants: the last layer instead of the penultimate one; the images in another order
    assert err(got, image_features(hf, pixels(proc, paths), -1)) > 1e-2
    assert err(got, ref.flip(0)) > 1e-2


def test_hidden_states_equal_cli_and_transformers(model, llava, tmp_path):
    need_cli()
    hf, proc, d, paths = llava
    layers = [0, 1, -2, mmbridge.MMB_TAP_LAST]
    got = model.hidden_states(paths, layers=layers)
    assert list(got) == layers
    with torch.no_grad():
        out = hf.model.vision_tower(pixels(proc, paths), output_hidden_states=True)
    hs = out.hidden_states
    n = len(hs)
    for layer in layers:
        a = got[layer]
        assert a.shape == (len(paths), model.info.vision_tokens, model.info.vision_width) and a.flags.owndata
        ref = out.last_hidden_state if layer == mmbridge.MMB_TAP_LAST else hs[layer]
        e = err(a, ref)
        print(f"hidden_states[{layer}]: scaled max err {e:.2e}")
        assert e <= 1e-4
    # wrong variants: the neighbouring layer, for each layer asked
    assert err(got[0], hs[1]) > 1e-2 and err(got[1], hs[2]) > 1e-2 and err(got[-2], hs[-1]) > 1e-2
    # the CLI's --taps from its pass of the tower: bit for bit
    oc.run("encode", d, *paths, "-o", tmp_path / "o.safetensors", "--threads", THREADS, "--taps", "0,1,-2")
    cli = load_file(str(tmp_path / "o.safetensors"))
    for layer in (0, 1, -2):
        assert np.array_equal(cli[f"hidden_states.{layer % n}"].numpy(), got[layer])
    # a single int is one layer
    assert np.array_equal(model.hidden_states(paths[0], layers=1)[1][0], got[1][0])


def test_clip_tower_alone(tmp_path):
    """A CLIPVisionModel directory: encode is its last_hidden_state (as the CLI's)."""
    need_cli()
    torch.manual_seed(3)
    tower = CLIPVisionModel(CLIPVisionConfig(**TOWER)).eval()
    randomize_norms(tower)
    d = tmp_path / "clip"
    tower.save_pretrained(d)
    proc = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    proc.save_pretrained(d)
    paths = write_images(tmp_path, [(47, 52), (60, 38)], 2)
    with mmbridge.Model(d, threads=THREADS) as m:
        assert m.info.family == "clip" and m.info.out_width == TOWER["hidden_size"]
        got = m.encode(paths)
    with torch.no_grad():
        out = tower(pixel_values=pixels(proc, paths), output_hidden_states=True)
    e = err(got, out.last_hidden_state)
    print(f"CLIP tower: encode vs last_hidden_state: scaled max err {e:.2e}")
    assert got.shape == tuple(out.last_hidden_state.shape) and e <= 1e-4
    assert err(got, out.hidden_states[-2]) > 1e-2  # wrong variant: the penultimate layer
    oc.run("encode", d, *paths, "-o", tmp_path / "o.safetensors", "--threads", THREADS)
    assert np.array_equal(load_file(str(tmp_path / "o.safetensors"))["last_hidden_state"].numpy(), got)


def test_images_of_different_token_counts(tmp_path):
    """Qwen2-VL keeps each image's aspect: images of other sizes make other token counts, and encode returns one
    [tokens_i, out_width] array per image (views of the one buffer the library wrote), each transformers'
    get_image_features and what encoding that image alone gives, bit for bit."""
    import test_qwen2vl as q
    d = tmp_path / "qwen"
    hf = q.make_model(d)
    paths = [q.save_image(tmp_path / "a.png", 56, 84, 0), q.save_image(tmp_path / "b.png", 112, 56, 1)]
    proc = q.processor(**q.PROC)
    with mmbridge.Model(d, threads=THREADS) as m:
        got = m.encode(paths)
        alone = [m.encode(p) for p in paths]
        with pytest.raises(mmbridge.UnsupportedError, match="hidden states are not exposed"):
            m.hidden_states(paths[0], layers=[1])  # a family's tower and connector run as one
    assert isinstance(got, list) and len(got) == 2 and got[0].shape[0] != got[1].shape[0]
    assert got[0].base is got[1].base and got[0].base is not None  # one buffer, no copy
    for g, a, p in zip(got, alone, paths):
        assert np.array_equal(g, a[0])
        r = proc(Image.open(p), return_tensors="pt")
        ref = q.reference(hf, r["pixel_values"], r["image_grid_thw"])[0]
        e = err(g, ref)
        print(f"qwen2-vl {p.name}: {g.shape[0]} tokens, scaled max err {e:.2e}")
        assert g.shape == tuple(ref.shape) and e <= 1e-4
    r0 = proc(Image.open(paths[0]), return_tensors="pt")
    ref0 = q.reference(hf, r0["pixel_values"], r0["image_grid_thw"])[0]
    assert err(got[1][:ref0.shape[0]], ref0) > 1e-2  # wrong variant: the other image's rows


def test_original_layout_with_a_separate_tower(tmp_path):
    """Original LLaVA (model.mm_projector.*) with vision_tower=: the CLI's --vision-tower output, bit for bit, and
    the torch modules' within 1e-4."""
    need_cli()
    from test_vit import make_original_with_tower
    tower, proj = make_original_with_tower(tmp_path)
    proc = CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    proc.save_pretrained(tmp_path / "tower")
    paths = write_images(tmp_path, [(50, 40), (44, 66)], 5)
    with pytest.raises(mmbridge.Error, match="no vision tower"):  # the config only names its tower
        mmbridge.Model(tmp_path / "llava").encode(paths)
    with mmbridge.Model(tmp_path / "llava", threads=THREADS, vision_tower=tmp_path / "tower") as m:
        got = m.encode(paths)
    oc.run("encode", tmp_path / "llava", *paths, "--vision-tower", tmp_path / "tower", "-o", tmp_path / "o.st",
           "--threads", THREADS)
    assert np.array_equal(load_file(str(tmp_path / "o.st"))["embeddings"].numpy(), got)
    with torch.no_grad():
        hs = tower(pixel_values=pixels(proc, paths), output_hidden_states=True).hidden_states
        ref, wrong = proj(hs[-2][:, 1:]), proj(hs[-1][:, 1:])
    assert err(got, ref) <= 1e-4 and err(got, wrong) > 1e-2  # wrong variant: the last layer


def test_reduced_precision_weights(llava, tmp_path):
    """dtype="bf16" is the CLI's --dtype bf16 bit for bit, close to f32 and not equal to it."""
    need_cli()
    hf, proc, d, paths = llava
    with mmbridge.Model(d, threads=THREADS, dtype="bf16") as m:
        got = m.encode(paths)
    oc.run("encode", d, *paths, "-o", tmp_path / "o.safetensors", "--threads", THREADS, "--dtype", "bf16")
    assert np.array_equal(load_file(str(tmp_path / "o.safetensors"))["embeddings"].numpy(), got)
    ref = image_features(hf, pixels(proc, paths), -2).numpy()
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    print(f"bf16 weights: cosine {cos:.6f}, scaled max err {err(got, ref):.2e}")
    assert cos > 0.999 and not np.array_equal(got, ref)
    with pytest.raises(mmbridge.ArgumentError, match="dtype"):
        mmbridge.Model(d, dtype="f64")


def test_input_kinds_are_identical(model, llava, tmp_path):
    """A path (str and Path), its bytes, the PIL image and its uint8 array give the same embeddings; an RGBA
    image is composited onto white the same way whether the library or the package converts it."""
    paths = llava[3]
    ref = model.encode(paths)
    for p, r in zip(paths, ref):
        pil = Image.open(p)
        kinds = {"str": str(p), "path": p, "bytes": p.read_bytes(), "bytearray": bytearray(p.read_bytes()),
                 "pil": pil, "numpy": np.asarray(pil.convert("RGB")),
                 "numpy-strided": np.asarray(pil.convert("RGB"))[:, ::-1][:, ::-1]}
        for k, x in kinds.items():
            got = model.encode(x)
            assert got.shape == (1,) + r.shape and np.array_equal(got[0], r), k
        mixed = model.encode([kinds["numpy"], kinds["bytes"], kinds["pil"], kinds["str"]])
        assert all(np.array_equal(mixed[i], r) for i in range(4))
    rs = np.random.RandomState(4)
    rgba = Image.fromarray(rs.randint(0, 256, (40, 44, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "a.png")
    from_file = model.encode(tmp_path / "a.png")
    assert np.array_equal(model.encode(rgba), from_file)
    assert np.array_equal(model.encode(Image.open(tmp_path / "a.png")), from_file)
    assert not np.array_equal(model.encode(rgba.convert("RGB")), from_file)  # wrong variant: alpha dropped
    with pytest.raises(mmbridge.ArgumentError, match="uint8"):
        model.encode(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(mmbridge.ArgumentError, match=r"\[height, width, 3\]"):
        model.encode(np.zeros((8, 8), np.uint8))
    with pytest.raises(TypeError):
        model.encode([1234])


def test_no_copy(model, llava, monkeypatch):
    """The returned arrays own their memory, and it is the memory the library was handed as its output."""
    paths = llava[3]
    seen = {}

    class Spy:
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def mmb_mllm_encode(self, ctx, m, imgs, n, out):
            eo = out._obj
            seen["emb"] = eo.embeddings
            seen["hidden"] = [eo.hidden[i] for i in range(eo.n_taps)]
            return self._real.mmb_mllm_encode(ctx, m, imgs, n, out)

    monkeypatch.setattr(mmbridge, "_L", Spy(mmbridge._L))
    a = model.encode(paths)
    assert a.flags.owndata and a.base is None and a.flags.c_contiguous
    assert seen["emb"] == a.ctypes.data
    hs = model.hidden_states(paths, layers=[1, -1])
    assert seen["hidden"] == [hs[1].ctypes.data, hs[-1].ctypes.data]
    assert all(h.flags.owndata and h.base is None for h in hs.values())


def test_bad_images_raise_and_the_model_keeps_working(model, llava, tmp_path):
    paths = llava[3]
    ref = model.encode(paths[0])
    with pytest.raises(mmbridge.FormatError) as e:
        model.encode(b"\x89PNG garbage, not an image at all")
    assert e.value.status == mmbridge.Status.ERR_FORMAT and "image 0 (bytes)" in e.value.message
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    with pytest.raises(mmbridge.Error) as e:
        model.encode([paths[1], text])
    assert str(text) in e.value.message and e.value.status == mmbridge.Status.ERR_FORMAT, e.value.message
    assert str(e.value) == "malformed file: " + e.value.message  # mmb_status_str, then the library's message
    if oc.BIN.exists():  # the message is the one the CLI prints for that file
        p = oc.run("encode", llava[2], text, "-o", tmp_path / "o.safetensors", check=False)
        assert p.returncode == 1 and p.stderr.strip() == "mmbridge: error: " + e.value.message, p.stderr
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(mmbridge.Error, match="empty.png"):
        model.encode(tmp_path / "empty.png")
    with pytest.raises(mmbridge.FileError, match="directory"):
        model.encode(tmp_path)
    with pytest.raises(mmbridge.FileError, match="missing.png"):
        model.hidden_states(tmp_path / "missing.png", layers=[1])
    with pytest.raises(mmbridge.ArgumentError, match="out of range"):
        model.hidden_states(paths[0], layers=[TOWER["num_hidden_layers"] + 1])
    with pytest.raises(mmbridge.FileError):
        mmbridge.Model(tmp_path / "no-such-model")
    assert np.array_equal(model.encode(paths[0]), ref)  # still working, same result


def test_four_threads_on_one_model_equal_serial_calls(llava):
    hf, proc, d, paths = llava
    rs = np.random.RandomState(9)
    inputs = [rs.randint(0, 256, (int(rs.randint(30, 90)), int(rs.randint(30, 90)), 3), dtype=np.uint8)
              for _ in range(24)]
    with mmbridge.Model(d, threads=1) as m:
        serial = [m.encode(x) for x in inputs]
        serial_hs = [m.hidden_states(x, layers=[1, -2]) for x in inputs]
        barrier = threading.Barrier(4)
        used = set()

        def work(i):
            if i < 4:
                barrier.wait()  # the first four calls run at once, one per thread
            used.add(m._ctx())
            return m.encode(inputs[i]), m.hidden_states(inputs[i], layers=[1, -2])

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            got = list(ex.map(work, range(len(inputs))))
        assert len(used) == 4  # one context per thread
        for (e, h), s, sh in zip(got, serial, serial_hs):
            assert np.array_equal(e, s) and all(np.array_equal(h[k], sh[k]) for k in sh)
        assert not np.array_equal(got[0][0], serial[1])  # the inputs differ: the check can fail
    assert m.closed
    with pytest.raises(mmbridge.ClosedError):
        m.encode(inputs[0])


def test_close_waits_for_calls_in_progress(llava, monkeypatch):
    """close() from another thread while a call is inside the library waits for it (its result is whole), then
    frees the model; later calls raise ClosedError."""
    rs = np.random.RandomState(6)
    batch = [rs.randint(0, 256, (42, 42, 3), dtype=np.uint8) for _ in range(800)]
    inside = threading.Event()
    events = []

    class Spy:
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def mmb_mllm_encode(self, *a):
            inside.set()
            r = self._real.mmb_mllm_encode(*a)
            events.append("encode returned")
            return r

    m = mmbridge.Model(llava[2], threads=1)
    ref = m.encode(batch[:3])
    monkeypatch.setattr(mmbridge, "_L", Spy(mmbridge._L))
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(m.encode, batch)
        assert inside.wait(60)
        m.close()
        events.append("close returned")
        got = fut.result()
    assert events == ["encode returned", "close returned"]
    assert np.array_equal(got[:3], ref)
    with pytest.raises(mmbridge.ClosedError):
        m.hidden_states(batch[0], layers=[1])
    m.close()  # idempotent


def test_gil_released_during_compute(llava, monkeypatch):
    """The library is a ctypes.CDLL, whose calls release the GIL: while one thread is inside mmb_mllm_encode,
    another runs Python code (holding the GIL, the C call would let no bytecode run until it returns)."""
    assert not mmbridge._L._func_flags_ & ctypes._FUNCFLAG_PYTHONAPI  # not a PyDLL
    rs = np.random.RandomState(2)
    batch = [rs.randint(0, 256, (42, 42, 3), dtype=np.uint8) for _ in range(1500)]
    count = [0]
    during = []
    stop = threading.Event()

    class Spy:
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def mmb_mllm_encode(self, *a):
            c0 = count[0]
            r = self._real.mmb_mllm_encode(*a)
            during.append(count[0] - c0)
            return r

    def spin():
        while not stop.is_set():
            count[0] += 1

    with mmbridge.Model(llava[2], threads=1) as m:
        monkeypatch.setattr(mmbridge, "_L", Spy(mmbridge._L))
        t = threading.Thread(target=spin)
        t.start()
        try:
            m.encode(batch)
        finally:
            stop.set()
            t.join()
    print(f"Python loop iterations while the library encoded: {during}")
    assert during and during[0] > 100


# ---- generate ------------------------------------------------------------------------------------------------

# llava_lm: (model, processor, directory, image path), test_mllm's random LLaVA with its tokenizer and LlavaProcessor
# (ChatML template), whose image matters, saved by transformers
from test_mllm import N_NEW, PROMPT, reference_inputs  # noqa: E402
from test_mllm import llava as llava_lm  # noqa: E402,F401 (the fixture)


def test_generate_equals_cli_and_transformers(llava_lm, tmp_path):
    need_cli()
    hf, proc, d, image = llava_lm
    with mmbridge.Model(d, threads=THREADS) as m:
        assert m.info.has_lm and m.info.has_tokenizer and m.info.image_marker == "<image>"
        g = m.generate(image, PROMPT, max_tokens=N_NEW, ignore_eos=True)
        pieces = list(g)
        assert g.stop == "length" and g.n_generated == N_NEW and len(g.ids) == N_NEW
        text = "".join(pieces)
        assert all(isinstance(p, str) and p for p in pieces) and len(pieces) > 1
        # the same from encoded bytes and from a numpy image
        assert m.generate(Path(image).read_bytes(), PROMPT, max_tokens=N_NEW, ignore_eos=True).text() == text
        other = np.asarray(Image.open(image).convert("RGB"))[::-1].copy()
        g2 = m.generate(other, PROMPT, max_tokens=N_NEW, ignore_eos=True)
        other_text = g2.text()
        other_ids = g2.ids
    p = oc.run("generate", d, "--prompt", PROMPT, "--image", image, "-n", N_NEW, "--ignore-eos", "--threads", THREADS)
    assert p.stdout == text + "\n"
    inputs = reference_inputs(hf, proc, image)
    n = inputs["input_ids"].shape[1]
    assert g.n_prompt == n
    with torch.no_grad():
        ref = hf.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0)
    assert g.ids == ref[0, n:].tolist()
    assert text == proc.tokenizer.decode(g.ids, skip_special_tokens=True)
    # wrong variant: the image flipped upside down gives other tokens
    assert other_ids != g.ids and other_text != text
    # sampling: the package's text is the CLI's for the same temperature, top-k, top-p and seed
    with mmbridge.Model(d, threads=THREADS) as m:
        sampled = m.generate(image, PROMPT, max_tokens=N_NEW, ignore_eos=True, temperature=1.3, top_k=40,
                             top_p=0.9, seed=5).text()
    p = oc.run("generate", d, "--prompt", PROMPT, "--image", image, "-n", N_NEW, "--ignore-eos", "--threads", THREADS,
               "--temp", 1.3, "--top-k", 40, "--top-p", 0.9, "--seed", 5)
    assert p.stdout == sampled + "\n" and sampled != text


def test_chat_a_conversation_matches_transformers(llava_lm):
    """chat(): a system turn, a user turn with the image, the assistant's answer, a second user turn, rendered by
    the checkpoint's template: the prompt's ids and the greedy tokens are transformers' (apply_chat_template +
    processor + generate); one user message equals generate() of its content."""
    hf, proc, d, image = llava_lm
    conv = [{"role": "system", "content": "You look at pictures."},
            {"role": "user", "content": "<image>\n" + PROMPT},
            {"role": "assistant", "content": "Noise."},
            {"role": "user", "content": "And the colours?"}]
    with mmbridge.Model(d, threads=THREADS) as m:
        g = m.chat(conv, image, max_tokens=N_NEW, ignore_eos=True)
        text = g.text()
        single = m.chat([conv[1]], image, max_tokens=N_NEW, ignore_eos=True).text()
        assert single == m.generate(image, PROMPT, max_tokens=N_NEW, ignore_eos=True).text()
        with pytest.raises(mmbridge.ArgumentError, match="marker"):  # two markers, one image
            m.chat([{"role": "user", "content": "<image> <image> hi"}], image)
        with pytest.raises(TypeError):
            m.chat([{"role": "user"}])
    txt = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=txt, images=Image.open(image).convert("RGB"), return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    assert g.n_prompt == n
    with torch.no_grad():
        ref = hf.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0)
    assert g.ids == ref[0, n:].tolist()
    assert text != single  # the wrong variant: the last turn alone is another prompt


def test_generate_options_errors_and_early_close(llava_lm):
    hf, proc, d, image = llava_lm
    with mmbridge.Model(d, threads=THREADS) as m:
        full = m.generate(image, PROMPT, max_tokens=N_NEW, ignore_eos=True)
        text = full.text()
        # sampling: the same seed the same text, another seed (very likely) another
        a = m.generate(image, PROMPT, max_tokens=N_NEW, ignore_eos=True, temperature=1.5, top_k=50, top_p=0.95,
                       seed=7).text()
        assert a == m.generate(image, PROMPT, max_tokens=N_NEW, ignore_eos=True, temperature=1.5, top_k=50,
                               top_p=0.95, seed=7).text()
        assert a != text
        # a stop string
        if len(text) > 6:
            stop = text[3:6]
            s = m.generate(image, PROMPT, max_tokens=N_NEW, ignore_eos=True, stop=stop)
            st = s.text()
            assert s.stop == "string" and stop in st and text.startswith(st[:st.index(stop)])
        # raw prompt: no template, other tokens
        assert m.generate(image, "<image>" + PROMPT, max_tokens=N_NEW, ignore_eos=True, chat=False).ids != full.ids
        # errors are raised by the call, with the library's message
        with pytest.raises(mmbridge.ArgumentError, match=r"2 image marker\(s\) '<image>' but 1 image\(s\)"):
            m.generate(image, "<image> and <image>", max_tokens=1)
        with pytest.raises(mmbridge.FormatError, match="not an image"):
            m.generate(b"junk", PROMPT, max_tokens=1)
        # closing early raises the abort flag: the C side stops long before max_tokens
        g = m.generate(image, PROMPT, max_tokens=100000, ignore_eos=True)
        first = next(g)
        g.close()
        assert first and g.stop == "abort" and g.n_generated < 100000
        with pytest.raises(StopIteration):
            next(g)
        with m.generate(image, PROMPT, max_tokens=100000, ignore_eos=True) as g3:
            next(g3)
        assert g3.stop == "abort"
        # and the model keeps working
        assert m.generate(image, PROMPT, max_tokens=N_NEW, ignore_eos=True).text() == text
        # a generation left running when the model closes is stopped
        g4 = m.generate(image, PROMPT, max_tokens=100000, ignore_eos=True)
    assert m.closed
    list(g4)
    assert g4.stop == "abort" and g4.n_generated < 100000


def test_generate_needs_an_lm(model, llava):
    with pytest.raises(mmbridge.MissingError):
        model.generate(llava[3][0], "hi", max_tokens=1)
