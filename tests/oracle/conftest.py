"""Shared helpers for the oracle tests: tiny random checkpoints made with transformers'
save_pretrained (or, for the original LLaVA layout, torch modules with LLaVA's key names),
hidden states computed by torch, and the mmbridge CLI run on them."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("MMB_BIN", ROOT / "build" / "mmbridge"))

# Tiny CLIP tower: 28x28 image, patch 14 -> 2x2 = 4 patches + CLS = 5 tokens, 3 blocks -> 4 hidden states.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=28, patch_size=14, projection_dim=16)
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=128)


def build_dir():
    """The build directory: $MMB_BUILD_DIR, else the directory of $MMB_BIN, else <repo>/build."""
    if os.environ.get("MMB_BUILD_DIR"):
        return Path(os.environ["MMB_BUILD_DIR"])
    if os.environ.get("MMB_BIN"):
        return Path(os.environ["MMB_BIN"]).resolve().parent
    return ROOT / "build"


def sanitized():
    """Whether the build under test is an ASan or TSan one (its CMakeCache says so)."""
    cache = build_dir() / "CMakeCache.txt"
    text = cache.read_text() if cache.exists() else ""
    return "MMB_SANITIZE:BOOL=ON" in text or "MMB_TSAN:BOOL=ON" in text


def address_space_limit(mem):
    """A preexec_fn that caps the child's address space at mem bytes (RLIMIT_AS), or None for a sanitized build:
    ASan and TSan reserve terabytes of shadow memory at start, which no such cap allows. tests/run_all.sh runs the
    hostile-input tests against the Release build too, where the cap holds."""
    if sanitized():
        return None

    def pre():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    return pre


def compile_driver(name, out_dir):
    """Compiles tests/oracle/{name}.c against the build's libmmbridge.a (sanitized when the build is) into
    out_dir; skips the test when the library is not built. Returns the executable's path."""
    bd = build_dir()
    lib = bd / "libmmbridge.a"
    if not lib.exists():
        pytest.skip(f"{lib} not built")
    cache = (bd / "CMakeCache.txt").read_text() if (bd / "CMakeCache.txt").exists() else ""
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if "MMB_SANITIZE:BOOL=ON" in cache else []
    san += ["-fsanitize=thread"] if "MMB_TSAN:BOOL=ON" in cache else []
    libs = subprocess.run(["pkg-config", "--libs", "libcjson", "libjpeg", "libpng", "libwebp", "libpcre2-8",
                           "libutf8proc", "openblas"], capture_output=True, text=True, check=True).stdout.split()
    exe = Path(out_dir) / name
    cmd = [os.environ.get("CC", "cc"), "-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *san,
           f"-I{ROOT / 'include'}", f"-I{ROOT / 'src'}", str(ROOT / f"tests/oracle/{name}.c"),
           str(lib), *libs, "-lpthread", "-lm", "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


def run(*args, check=True):
    """Runs the CLI; returns the CompletedProcess. With check, a non-zero exit fails the test."""
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=300)
    # Under the sanitized build a memory or UB error must fail the test, whatever the exit code.
    assert "Sanitizer" not in p.stderr and "runtime error:" not in p.stderr, p.stderr
    if check and p.returncode != 0:
        raise AssertionError(f"mmbridge {' '.join(map(str, args))} exited {p.returncode}:\n{p.stderr}")
    return p


def random_images(tmp_path, shapes, seed):
    """PNG files img{i}.png of uniform random RGB pixels, one per (height, width) in shapes; their paths."""
    import numpy as np
    from PIL import Image
    rs = np.random.RandomState(seed)
    paths = []
    for i, (h, w) in enumerate(shapes):
        p = Path(tmp_path) / f"img{i}.png"
        Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def fails(args, *needles):
    """Runs the CLI with args, which must fail (non-zero exit) with each of needles in its stderr."""
    p = run(*args, check=False)
    assert p.returncode != 0, p.stdout
    for n in needles:
        assert n in p.stderr, p.stderr
    return p


def corrupt(src, dst, drop=None, reshape=None, config=None, proc=None):
    """A copy of checkpoint src at dst with tensor `drop` removed, tensor `reshape` one column short, `config`
    merged into its vision_config and `proc` into its preprocessor_config.json; returns dst."""
    import shutil
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape] = sd[reshape][..., :-1].contiguous()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["vision_config"].update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if proc is not None:
        pc = json.loads((dst / "preprocessor_config.json").read_text())
        pc.update(proc)
        (dst / "preprocessor_config.json").write_text(json.dumps(pc))
    return dst


def scaled_err(got, ref):
    """max |got - ref| divided by max(1, max |ref|): the project's fp32 criterion (<= 1e-4)."""
    got, ref = got.double(), ref.double()
    return ((got - ref).abs().max() / max(1.0, ref.abs().max().item())).item()


def save_features(path, hidden_states, meta=None):
    """Writes hidden_states.{i} ([batch, tokens, width] f32) as mmbridge connect reads them."""
    tensors = {f"hidden_states.{i}": h.detach().float().contiguous() for i, h in enumerate(hidden_states)}
    save_file(tensors, str(path), metadata=meta)


def connect(model_dir, features, out, *extra):
    p = run("connect", model_dir, "--features", features, "-o", out, *extra)
    return load_file(str(out))["embeddings"], p


@pytest.fixture(scope="session")
def clip_hidden_states():
    """Hidden states of a real (tiny, random) CLIPVisionModel for a batch of 2 images."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    pixels = torch.randn(2, 3, VISION["image_size"], VISION["image_size"])
    with torch.no_grad():
        hs = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    return [h.clone() for h in hs]


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2))


def write_layout(model, d, layout):
    """Rewrites d/model.safetensors with one of the LLaVA key layouts found in the wild:
    "saved"   what transformers' save_pretrained writes (multi_modal_projector.*, vision_tower.*);
    "newer"   the in-memory names (model.multi_modal_projector.*, model.vision_tower.*), as
              transformers 4.5x checkpoints store them;
    "hub"     the older hub files (multi_modal_projector.*, vision_tower.vision_model.*,
              language_model.model.*), e.g. llava-hf/llava-1.5-7b-hf."""
    if layout == "saved":
        return
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "hub":
        ren = {}
        for k, v in sd.items():
            if k.startswith("model.multi_modal_projector."):
                k = k[len("model."):]
            elif k.startswith("model.vision_tower."):
                k = "vision_tower.vision_model." + k[len("model.vision_tower."):]
            elif k.startswith("model.language_model."):
                k = "language_model.model." + k[len("model.language_model."):]
            elif k == "lm_head.weight":
                k = "language_model.lm_head.weight"
            ren[k] = v
        sd = ren
    save_file(sd, str(Path(d) / "model.safetensors"), metadata={"format": "pt"})
