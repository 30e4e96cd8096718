"""Image decoding and preprocessing against Pillow and transformers' PIL-backend image processors.

A small C driver (preprocess_driver.c, compiled here against the build's libmmbridge.a) decodes an
image and runs it through each processor directory, writing the decoded RGB, the uint8 image after
pad / resize / crop, and the final pixel_values to a safetensors file. For every generated image
and every processor config this checks:
  (a) decoded RGB == transformers' convert_to_rgb(Image.open(p)) (= Pillow's convert("RGB") plus
      compositing on white): exact for PNG and lossless WebP, within 1 grey level for JPEG and lossy
      WebP (Pillow bundles its own libjpeg-turbo / libwebp);
  (b) the uint8 image before rescale == the processor's own pad / resize / center_crop on Pillow's
      decode (exact when the decodes agree);
  (c) pixel_values == the processor's pixel_values (max-abs <= 1e-2; exact when the decodes agree).
Bad input (corrupt, truncated, empty, text, GIF/BMP/TIFF, CMYK JPEG, a directory, a bomb) must
give a non-zero status and a message naming the file and the problem, under sanitizers too.

The build directory is $MMB_BUILD_DIR, else the directory of $MMB_BIN, else <repo>/build.
Run with -s to see the measured figures."""
import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from conftest import compile_driver


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return compile_driver("preprocess_driver", tmp_path_factory.mktemp("driver"))


def run_driver(exe, out, image, dirs=(), max_pixels=None):
    args = [str(exe)] + (["--max-pixels", str(max_pixels)] if max_pixels is not None else [])
    args += [str(out), str(image), *map(str, dirs)]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:exitcode=99",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=99")
    p = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert "Sanitizer" not in p.stderr and "runtime error:" not in p.stderr, p.stderr
    assert p.returncode in (0, 2), f"driver exited {p.returncode}: {p.stderr}"
    return p


# ---- processor configs ----------------------------------------------------------------------------

def make_configs(root):
    from transformers import CLIPImageProcessor, LlavaImageProcessor, SiglipImageProcessor
    procs = {
        "clip224": CLIPImageProcessor(),
        "clip336": CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        "siglip384": SiglipImageProcessor(size={"height": 384, "width": 384}),
        "siglip_small_bilinear": SiglipImageProcessor(size={"height": 24, "width": 40}, resample=2),
        "llava_pad": LlavaImageProcessor(do_pad=True),
    }
    dirs = {}
    for name, p in procs.items():
        d = root / name
        p.save_pretrained(d)
        dirs[name] = d
    return dirs


# ---- images ---------------------------------------------------------------------------------------

def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def png_bytes(arr, color_type, depth, plte=None, trns=None, size=None, idat=None, interlace=False):
    """A PNG written by hand (Pillow cannot write 16-bit RGB, LA, tRNS on grey or interlaced
    files): arr is (H, W, C) ints at `depth` bits (interlaced: depth 8 or 16 only)."""
    if arr is not None and interlace:
        h, w = arr.shape[:2]
        raw = b""
        for x0, y0, dx, dy in ADAM7:
            sub = arr[y0::dy, x0::dx]
            if sub.size:
                for r in sub:
                    raw += b"\0" + (r.astype(">u2") if depth == 16 else r.astype(np.uint8)).tobytes()
        out = png_bytes(None, color_type, depth, plte, trns, size=(w, h), idat=zlib.compress(raw))
        return _set_interlace(out)
    if arr is not None:
        h, w = arr.shape[:2]
        rows = []
        for r in arr.reshape(h, w, -1):
            flat = r.reshape(-1).astype(np.int64)
            if depth == 16:
                b = flat.astype(">u2").tobytes()
            elif depth == 8:
                b = flat.astype(np.uint8).tobytes()
            else:
                bits = np.unpackbits(flat.astype(np.uint8)[:, None], axis=1)[:, 8 - depth:].reshape(-1)
                b = np.packbits(bits).tobytes()
            rows.append(b"\0" + b)
        idat = zlib.compress(b"".join(rows))
    else:
        w, h = size
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
    if plte is not None:
        out += chunk(b"PLTE", bytes(plte))
    if trns is not None:
        out += chunk(b"tRNS", trns)
    return out + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _set_interlace(png):
    """Sets the IHDR interlace byte and fixes its CRC."""
    ihdr = bytearray(png[12:29])  # tag + 13 bytes of data
    ihdr[-1] = 1
    return png[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF) + png[33:]


def natural(rng, h, w, c=3):
    """Smooth gradients plus noise: closer to photographs than pure noise, still all levels."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 7) % 256][:c], -1)
    return np.clip(base + rng.integers(-40, 41, (h, w, c)), 0, 255).astype(np.uint8)


def make_images(root):
    """{name: (path, kind)}; kind 'exact' (lossless) or 'lossy'."""
    rng = np.random.default_rng(0)
    imgs = {}

    def save(name, im, fmt="PNG", kind="exact", **kw):
        p = root / f"{name}.{fmt.lower()}"
        im.save(p, fmt, **kw)
        imgs[name] = (p, kind)

    def raw(name, data, kind="exact"):
        p = root / f"{name}.png"
        p.write_bytes(data)
        imgs[name] = (p, kind)

    for w, h in [(640, 480), (1, 1), (7, 5), (1000, 37), (37, 1000), (100, 80), (224, 224), (333, 517), (2, 3)]:
        save(f"rgb_{w}x{h}", Image.fromarray(natural(rng, h, w)))
    save("noise_rgb_301x199", Image.fromarray(rng.integers(0, 256, (199, 301, 3), dtype=np.uint8)))
    save("L_150x97", Image.fromarray(natural(rng, 97, 150, 1)[..., 0], "L"))
    la = np.concatenate([natural(rng, 60, 90, 1), rng.integers(0, 256, (60, 90, 1), dtype=np.uint8)], -1)
    save("LA_90x60", Image.fromarray(la, "LA"))
    rgba = np.concatenate([natural(rng, 77, 131), rng.integers(0, 256, (77, 131, 1), dtype=np.uint8)], -1)
    rgba[:5, :, 3] = 0
    rgba[5:10, :, 3] = 255
    save("RGBA_131x77", Image.fromarray(rgba, "RGBA"))
    pal = Image.fromarray(natural(rng, 64, 80)).quantize(64)
    save("P_80x64", pal)
    pal_t = pal.copy()
    pal_t.info["transparency"] = bytes(rng.integers(0, 256, 64, dtype=np.uint8))
    save("P_trns_80x64", pal_t, transparency=pal_t.info["transparency"])
    save("1bit_45x33", Image.fromarray(rng.integers(0, 2, (33, 45), dtype=np.uint8) * 255, "L").convert("1"))
    i16 = rng.integers(0, 600, (40, 50)).astype(np.uint16)
    i16[0, :4] = [0, 255, 256, 65535]
    save("I16_50x40", Image.frombytes("I;16", (50, 40), i16.astype("<u2").tobytes()))
    raw("rgb16_33x21", png_bytes(rng.integers(0, 65536, (21, 33, 3)), 2, 16))
    raw("rgba16_33x21", png_bytes(rng.integers(0, 65536, (21, 33, 4)), 6, 16))
    raw("la16_33x21", png_bytes(rng.integers(0, 65536, (21, 33, 2)), 4, 16))
    g = rng.integers(0, 4, (19, 23, 1)) * 80
    raw("L_trns_23x19", png_bytes(g, 0, 8, trns=struct.pack(">H", 80)))
    raw("L2bit_trns_23x19", png_bytes(rng.integers(0, 4, (19, 23, 1)), 0, 2, trns=struct.pack(">H", 0)))
    raw("L4bit_23x19", png_bytes(rng.integers(0, 16, (19, 23, 1)), 0, 4))
    c = rng.integers(0, 2, (19, 23, 3)) * 200
    raw("rgb_trns_23x19", png_bytes(c, 2, 8, trns=struct.pack(">HHH", 200, 0, 200)))
    raw("I16_trns_23x19", png_bytes(rng.integers(0, 300, (19, 23, 1)), 0, 16, trns=struct.pack(">H", 100)))
    raw("interlaced_rgb_37x29", png_bytes(natural(rng, 29, 37), 2, 8, interlace=True))
    raw("interlaced_rgba16_13x11", png_bytes(rng.integers(0, 65536, (11, 13, 4)), 6, 16, interlace=True))
    raw("interlaced_1x1", png_bytes(natural(rng, 1, 1), 2, 8, interlace=True))
    photo = Image.fromarray(natural(rng, 480, 640))
    save("jpeg_q90_640x480", photo, "JPEG", "lossy", quality=90)
    save("jpeg_444_333x517", Image.fromarray(natural(rng, 517, 333)), "JPEG", "lossy", quality=90, subsampling=0)
    save("jpeg_progressive_301x199", Image.fromarray(natural(rng, 199, 301)), "JPEG", "lossy", quality=85,
         progressive=True)
    save("jpeg_gray_150x97", Image.fromarray(natural(rng, 97, 150, 1)[..., 0], "L"), "JPEG", "lossy", quality=90)
    save("jpeg_1x1", Image.fromarray(natural(rng, 1, 1)), "JPEG", "lossy", quality=90)
    save("webp_lossy_200x150", Image.fromarray(natural(rng, 150, 200)), "WEBP", "lossy", quality=80)
    save("webp_lossless_200x150", Image.fromarray(natural(rng, 150, 200)), "WEBP", "exact", lossless=True)
    save("webp_alpha_lossless_90x60", Image.fromarray(rgba[:60, :90]), "WEBP", "exact", lossless=True)
    save("webp_alpha_lossy_90x60", Image.fromarray(rgba[:60, :90]), "WEBP", "lossy", quality=80)
    return imgs


# ---- the comparison -------------------------------------------------------------------------------

STATS = {"a": [], "b": [], "c": []}


def hf_reference(path, proc):
    """(decoded RGB HWC, uint8 after pad/resize/crop HWC, pixel_values CHW) the processor computes."""
    from transformers.image_transforms import convert_to_rgb
    im = Image.open(path)
    rgb = convert_to_rgb(im, return_numpy=True)
    x = proc.process_image(Image.open(path), do_convert_rgb=True)  # CHW uint8
    if getattr(proc, "do_pad", False) and hasattr(proc, "pad_to_square"):
        x = proc.pad_to_square(x, background_color=tuple(int(v * 255) for v in proc.image_mean))
    if proc.do_resize:
        x = proc.resize(image=x, size=proc.size, resample=proc.resample)
    if proc.do_center_crop:
        x = proc.center_crop(x, proc.crop_size)
    pix = proc(Image.open(path), return_tensors="np")["pixel_values"][0]
    return rgb, np.moveaxis(x, 0, -1), pix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("preprocess")
    (root / "img").mkdir()
    return make_configs(root), make_images(root / "img"), root


def test_fidelity(driver, corpus):
    import warnings
    from transformers import AutoImageProcessor
    dirs, imgs, root = corpus
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        procs = {n: AutoImageProcessor.from_pretrained(d, use_fast=False) for n, d in dirs.items()}
    assert all(type(p).__name__.endswith("Pil") for p in procs.values())
    names = list(dirs)
    for iname, (path, kind) in imgs.items():
        out = root / f"{iname}.safetensors"
        p = run_driver(driver, out, path, [dirs[n] for n in names])
        assert p.returncode == 0, f"{iname}: {p.stderr}"
        got = load_file(str(out))
        ref_rgb = None
        for i, n in enumerate(names):
            rgb, u8, pix = hf_reference(path, procs[n])
            if ref_rgb is None:
                ref_rgb = rgb
                assert got["rgb"].shape == rgb.shape, iname
                d = np.abs(got["rgb"].astype(int) - rgb.astype(int))
                STATS["a"].append((iname, kind, d.max(), (d == 0).mean()))
                if kind == "exact":
                    assert d.max() == 0, f"{iname}: decoded RGB differs from Pillow by {d.max()}"
                else:
                    assert d.max() <= 1 or iname.startswith("webp"), f"{iname}: decode differs by {d.max()}"
            decode_exact = np.array_equal(got["rgb"], ref_rgb)
            g8 = got[f"u8.{i}"]
            assert g8.shape == u8.shape, f"{iname}/{n}: {g8.shape} vs {u8.shape}"
            d8 = np.abs(g8.astype(int) - u8.astype(int))
            STATS["b"].append((iname, n, decode_exact, d8.max(), (d8 == 0).mean(), d8.size))
            gp = got[f"pixels.{i}"]
            assert gp.shape == pix.shape, f"{iname}/{n}: {gp.shape} vs {pix.shape}"
            dp = np.abs(gp.astype(np.float64) - pix.astype(np.float64)).max()
            STATS["c"].append((iname, n, decode_exact, dp, np.array_equal(gp, pix)))
            if decode_exact:
                assert d8.max() == 0, f"{iname}/{n}: uint8 stage differs by {d8.max()}"
                assert np.array_equal(gp, pix), f"{iname}/{n}: pixel_values differ by {dp}"
            else:
                assert dp <= 2e-2 or iname.startswith("webp"), f"{iname}/{n}: pixel_values differ by {dp}"


def test_resize_random_sizes(driver, tmp_path):
    """Pillow's resize (both pass orders, up and down, bicubic and bilinear) on random sizes: the
    uint8 result must be identical."""
    from transformers import SiglipImageProcessor
    rng = np.random.default_rng(7)
    n = exact = 0
    for k in range(6):
        iw, ih = (int(v) for v in rng.integers(1, 700, 2))
        a = rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8)
        img = tmp_path / f"r{k}.png"
        Image.fromarray(a).save(img)
        dirs, want = [], []
        for j in range(16):
            ow, oh = (int(v) for v in rng.integers(1, 800, 2))
            resample = [2, 3][j % 2]
            d = tmp_path / f"r{k}_{j}"
            SiglipImageProcessor(size={"height": oh, "width": ow}, resample=resample).save_pretrained(d)
            dirs.append(d)
            want.append(np.array(Image.fromarray(a).resize((ow, oh), resample)))
        p = run_driver(driver, tmp_path / "o.st", img, dirs)
        assert p.returncode == 0, p.stderr
        got = load_file(str(tmp_path / "o.st"))
        for j, w in enumerate(want):
            n += 1
            g = got[f"u8.{j}"]
            assert g.shape == w.shape
            exact += np.array_equal(g, w)
            assert np.array_equal(g, w), f"{iw}x{ih} -> {w.shape[1]}x{w.shape[0]} (resample {[2, 3][j % 2]}): " \
                                         f"max diff {np.abs(g.astype(int) - w).max()}"
    STATS["resize"] = (exact, n)


# ---- bad input ------------------------------------------------------------------------------------

def cmyk_jpeg(path):
    Image.fromarray(np.full((16, 16, 4), 100, np.uint8), "CMYK").save(path, "JPEG")


def bad_cases(root, good_png, good_jpeg, good_webp):
    cases = {}

    def add(name, data, expect):
        p = root / name
        if data is not None:
            p.write_bytes(data)
        cases[name] = (p, expect)

    png, jpg, webp = good_png.read_bytes(), good_jpeg.read_bytes(), good_webp.read_bytes()
    corrupt = bytearray(png)
    corrupt[60:80] = b"\xAA" * 20
    add("corrupt.png", bytes(corrupt), "corrupt PNG")
    add("truncated.png", png[: len(png) // 2], "truncated")
    add("header_only.png", png[:40], "PNG")
    cj = bytearray(jpg)
    cj[4:40] = b"\x00" * 36
    add("corrupt.jpg", bytes(cj), "corrupt JPEG")
    add("truncated.jpg", jpg[: len(jpg) // 2], "truncated JPEG")
    add("soi_only.jpg", jpg[:3], "JPEG")
    add("truncated.webp", webp[: len(webp) // 2], "WebP")
    add("empty.png", b"", "empty")
    add("notes.txt", b"this is not an image\n" * 20, "not an image")
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, "GIF")
    add("pic.gif", gif.getvalue(), "unsupported image format (GIF)")
    bmp = io.BytesIO()
    Image.new("RGB", (4, 4)).save(bmp, "BMP")
    add("pic.png", bmp.getvalue(), "unsupported image format (BMP)")  # extension lies
    tif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tif, "TIFF")
    add("pic.tiff", tif.getvalue(), "unsupported image format (TIFF)")
    cmyk_jpeg(root / "cmyk.jpg")
    cases["cmyk.jpg"] = (root / "cmyk.jpg", "CMYK JPEG is not supported")
    (root / "adir.png").mkdir()
    cases["adir.png"] = (root / "adir.png", "is a directory")
    cases["missing.png"] = (root / "missing.png", "cannot open")
    # 30000 x 30000 RGB claimed by the header; the data is a few hundred bytes of zlib.
    add("bomb.png", png_bytes(None, 2, 8, size=(30000, 30000), idat=zlib.compress(b"\0" * 90001)),
        "exceeds the limit")
    return cases


def test_bad_input(driver, tmp_path, corpus):
    _, imgs, _ = corpus
    cases = bad_cases(tmp_path, imgs["rgb_100x80"][0], imgs["jpeg_q90_640x480"][0], imgs["webp_lossy_200x150"][0])
    # Pillow agrees these are not images it can load.
    with pytest.raises(Exception):
        Image.open(cases["bomb.png"][0]).load()
    for name, (path, expect) in cases.items():
        p = run_driver(driver, tmp_path / "out.safetensors", path)
        assert p.returncode == 2, f"{name}: exit {p.returncode}, stderr {p.stderr!r}"
        msg = p.stderr.strip()
        assert str(path) in msg, f"{name}: message does not name the file: {msg}"
        assert expect in msg, f"{name}: expected {expect!r} in {msg!r}"
        assert not (tmp_path / "out.safetensors").exists()
        print(f"  {name:18s} -> {msg.replace(str(tmp_path) + '/', '')}")


def test_mutations(driver, tmp_path, corpus):
    """Random byte flips, cuts and splices of valid PNG / JPEG / WebP files: the library either
    decodes or refuses with a message; never a crash or a sanitizer report (checked by run_driver)."""
    _, imgs, _ = corpus
    rng = np.random.default_rng(11)
    counts = {"ok": 0, "refused": 0}
    for name in ["rgb_7x5", "P_trns_80x64", "interlaced_rgb_37x29", "jpeg_progressive_301x199", "jpeg_q90_640x480",
                 "webp_lossy_200x150", "webp_alpha_lossless_90x60"]:
        data = imgs[name][0].read_bytes()
        for k in range(14):
            b = bytearray(data)
            kind = k % 3
            if kind == 0:
                for _ in range(int(rng.integers(1, 8))):
                    b[int(rng.integers(2, len(b)))] = int(rng.integers(0, 256))
            elif kind == 1:
                b = b[: int(rng.integers(4, len(b)))]
            else:
                i = int(rng.integers(4, len(b)))
                b = b[:i] + bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8)) + b[i:]
            path = tmp_path / f"m_{name}_{k}"
            path.write_bytes(bytes(b))
            p = run_driver(driver, tmp_path / "o.st", path)
            if p.returncode == 2:
                assert str(path) in p.stderr, p.stderr
                counts["refused"] += 1
            else:
                counts["ok"] += 1
    print(f"\n  mutated files: {counts['ok']} decoded, {counts['refused']} refused with a message")


def test_pixel_limit(driver, tmp_path, corpus):
    _, imgs, _ = corpus
    path = imgs["rgb_100x80"][0]
    p = run_driver(driver, tmp_path / "o.st", path, max_pixels=7999)
    assert p.returncode == 2 and "exceeds the limit of 7999 pixels" in p.stderr, p.stderr
    p = run_driver(driver, tmp_path / "o.st", path, max_pixels=8000)
    assert p.returncode == 0, p.stderr


def test_bad_configs(driver, tmp_path, corpus):
    _, imgs, _ = corpus
    img = imgs["rgb_7x5"][0]
    cases = {
        "unknown_type": ({"image_processor_type": "ViTImageProcessor"}, "is not supported"),
        "no_type": ({"size": 224}, "no image_processor_type"),
        "bad_size": ({"image_processor_type": "CLIPImageProcessor", "size": {"foo": 3}}, "unknown entry 'foo'"),
        "bad_mean": ({"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.5]}, "image_mean"),
        "nearest": ({"image_processor_type": "SiglipImageProcessor", "resample": 0}, "nearest"),
        "bad_json": ("{not json", "malformed JSON"),
    }
    for name, (cfg, expect) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "preprocessor_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
        p = run_driver(driver, tmp_path / "o.st", img, [d])
        assert p.returncode == 2 and expect in p.stderr and "preprocessor_config.json" in p.stderr, \
            f"{name}: {p.stderr}"
    # legacy int sizes: CLIP's int size is a shortest edge, crop_size an int is square
    d = tmp_path / "legacy"
    d.mkdir()
    (d / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "CLIPFeatureExtractor", "size": 32, "crop_size": 24}))
    p = run_driver(driver, tmp_path / "o.st", imgs["rgb_100x80"][0], [d])
    assert p.returncode == 0, p.stderr
    from transformers import CLIPImageProcessor
    ref = CLIPImageProcessor(size=32, crop_size=24)(Image.open(imgs["rgb_100x80"][0]), return_tensors="np")
    assert np.array_equal(load_file(str(tmp_path / "o.st"))["pixels.0"], ref["pixel_values"][0])


def tiny_fast_tokenizer():
    """A tokenizer for the processors below: a byte-level BPE without merges, and <image>."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("kind", ["clip", "llava_pad"])
def test_processor_config_json(driver, tmp_path, corpus, kind):
    """A directory saved by transformers 5's LlavaProcessor.save_pretrained: processor_config.json with the image
    processor nested under "image_processor" (top level: processor_class LlavaProcessor, patch_size, ...) and no
    preprocessor_config.json. Its pixels equal the processor's (the one transformers loads back) exactly."""
    import warnings
    from transformers import AutoProcessor, CLIPImageProcessor, LlavaImageProcessor, LlavaProcessor
    _, imgs, _ = corpus
    ip = (CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 36}, resample=2)
          if kind == "clip" else LlavaImageProcessor(do_pad=True, size={"shortest_edge": 30},
                                                     crop_size={"height": 30, "width": 30}))
    d = tmp_path / kind
    LlavaProcessor(image_processor=ip, tokenizer=tiny_fast_tokenizer(), patch_size=14).save_pretrained(d)
    cfg = json.loads((d / "processor_config.json").read_text())
    assert not (d / "preprocessor_config.json").exists() and cfg["processor_class"] == "LlavaProcessor"
    assert cfg["image_processor"]["image_processor_type"] == type(ip).__name__.replace("Pil", "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = AutoProcessor.from_pretrained(d, use_fast=False).image_processor
    for name in ["rgb_100x80", "rgb_7x5"]:
        path = imgs[name][0]
        out = tmp_path / f"{kind}_{name}.safetensors"
        p = run_driver(driver, out, path, [d])
        assert p.returncode == 0, p.stderr
        ref = proc(Image.open(path), return_tensors="np")["pixel_values"][0]
        got = load_file(str(out))["pixels.0"]
        assert got.shape == ref.shape and np.array_equal(got, ref), f"{kind}/{name}: {np.abs(got - ref).max()}"
    # the nested form only: a processor_config.json without an image processor is refused, naming the file
    cfg.pop("image_processor")
    (d / "processor_config.json").write_text(json.dumps(cfg))
    p = run_driver(driver, tmp_path / "o.st", imgs["rgb_7x5"][0], [d])
    assert p.returncode == 2 and "processor_config.json" in p.stderr and "'image_processor'" in p.stderr, p.stderr


def test_report():
    """Prints the measured figures (run pytest with -s)."""
    if not STATS["a"]:
        pytest.skip("test_fidelity did not run")
    print("\n(a) decoded RGB vs transformers.convert_to_rgb(Image.open(p)):")
    for name, kind, mx, ex in STATS["a"]:
        print(f"    {name:28s} {kind:6s} max |diff| {mx:3d}  exact {100 * ex:6.2f}%")
    b = STATS["b"]
    tot = sum(s for *_, s in b)
    exact = sum(e * s for *_, e, s in b)
    print(f"(b) uint8 after pad/resize/crop: {len(b)} image x config pairs, {tot} values, "
          f"{100 * exact / tot:.4f}% exact, max |diff| {max(m for _, _, _, m, _, _ in b)} "
          f"(pairs with identical decodes: max {max([m for _, _, d, m, _, _ in b if d] or [0])})")
    if "resize" in STATS:
        print(f"    random-size resizes (bicubic/bilinear, up and down): {STATS['resize'][0]}/{STATS['resize'][1]} "
              "bit-identical to Pillow")
    c = STATS["c"]
    print(f"(c) pixel_values: {len(c)} pairs, {sum(e for *_, e in c)} bit-identical, max |diff| "
          f"{max(m for _, _, _, m, _ in c):.3g} (identical decodes: {max([m for _, _, d, m, _ in c if d] or [0]):.3g})")
    for name, n, dec, m, e in c:
        if not e:
            print(f"    {name:28s} {n:22s} max |diff| {m:.4g}")
