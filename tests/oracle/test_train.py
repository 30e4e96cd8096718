"""Stage-1 training (`mmbridge train`, mmb_train): a LLaVA projector through the frozen tower and LLM, against
PyTorch doing the same on the same tiny random LlavaForConditionalGeneration (save_pretrained): the projector's
gradients against torch autograd (several projector types, through tests/oracle/train_driver.c), 20 AdamW steps
with transformers' cosine schedule, clipping and gradient accumulation giving the same weights and losses as a
PyTorch loop, a run stopped at step 7 and resumed reaching the same weights, the outputs loaded by transformers and
by mmbridge, and bad input (a caption longer than the context, an unreadable image, a corrupt checkpoint, a NaN
loss)."""
import copy
import json
import math
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                          get_cosine_schedule_with_warmup)

from conftest import VISION, compile_driver, fails, random_images, run, scaled_err, write_json
from test_decoder import randomize, text_config
from test_llava_original import build_projector, make_original

VIS = dict(VISION, image_size=42)  # 3 x 3 patches + CLS
WORDS = "a cat on the mat dog runs over grass red blue small big tree sky water boat".split()


def tokenizer(d, bos):
    """A byte-level BPE with <image>; with bos, a TemplateProcessing that puts <s> first (Llama's way)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=200, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"]))
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "bos_token": "<s>", "eos_token": "</s>"}))
    return tok


def make_llava(tmp_path, arch="llama", bos=True, act="gelu", name="llava", max_pos=128):
    d = tmp_path / name
    tok = tokenizer(d, bos)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VIS),
                      text_config=text_config(arch, vocab_size=tok.get_vocab_size(), max_position_embeddings=max_pos),
                      image_token_index=tok.token_to_id("<image>"), projector_hidden_act=act)
    model = LlavaForConditionalGeneration(cfg).eval()
    randomize(model, 0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(d, safe_serialization=True)
    proc = CLIPImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42})
    proc.save_pretrained(d)
    return model, d, proc, tok


def make_data(tmp_path, n, seed=3, long_caption=None):
    g = torch.Generator().manual_seed(seed)
    paths = random_images(tmp_path, [(30 + 7 * (i % 5), 50 - 3 * (i % 4)) for i in range(n)], seed)
    data = []
    for i, p in enumerate(paths):
        k = 3 + int(torch.randint(0, 6, (1,), generator=g))
        cap = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k,), generator=g))
        if long_caption is not None and i == long_caption:
            cap = " ".join(WORDS * 12)
        data.append({"id": str(i), "image": p.name,
                     "conversations": [{"from": "human", "value": "<image>\nRender a clear and concise summary."},
                                       {"from": "gpt", "value": cap}]})
    js = tmp_path / "data.json"
    js.write_text(json.dumps(data))
    return js, data, paths


def features(model, proc, paths):
    """What the projector reads: hidden_states[vision_feature_layer] without CLS (strategy default)."""
    from PIL import Image
    out = []
    with torch.no_grad():
        for p in paths:
            pv = proc(images=Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"]
            hs = model.model.vision_tower(pv, output_hidden_states=True).hidden_states
            out.append(hs[model.config.vision_feature_layer][0, 1:])
    return out


def ref_train(model, proc, tok, data, paths, steps, batch, micro, bos=True, step_mean=False, **kw):
    """ref_loop on a LlavaForConditionalGeneration: its features, projector and LLM."""
    lm = model.model.language_model
    return ref_loop(model.model.multi_modal_projector, lm, model.lm_head, lm.embed_tokens, features(model, proc, paths),
                    tok, data, steps, batch, micro, bos, step_mean, **kw)


def ref_loop(projector, lm, head, emb, feats, tok, data, steps, batch, micro, bos, step_mean, lr=1e-3, warmup=0.03,
             clip=1.0):
    """The PyTorch loop mmb_train documents: preprocess_plain's sequences, each micro-batch's loss its token mean,
    a step's loss the mean of its micro-batches', clip_grad_norm_, torch.optim.AdamW, transformers' cosine
    schedule with warm-up. step_mean: the wrong variant of one token mean over the whole step."""
    proj = copy.deepcopy(projector)
    for p in list(lm.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    ids = [tok.encode(s["conversations"][1]["value"] + "\n", add_special_tokens=False).ids for s in data]
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(steps * warmup), steps)
    per_epoch = math.ceil(len(data) / batch)
    losses = []
    for step in range(steps):
        a = (step % per_epoch) * batch
        idx = list(range(a, min(a + batch, len(data))))
        micros = [idx] if step_mean else [idx[i:i + micro] for i in range(0, len(idx), micro)]
        total = 0
        for mb in micros:
            tokens = sum(len(ids[k]) for k in mb)
            s = 0
            for k in mb:
                v = proj(feats[k])
                parts = ([emb(torch.tensor([0]))] if bos else []) + [v, emb(torch.tensor(ids[k]))]
                x = torch.cat(parts)[None]
                labels = torch.tensor([-100] * (int(bos) + len(v)) + ids[k])
                logits = head(lm(inputs_embeds=x).last_hidden_state)[0]
                s = s + torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")
            total = total + s / tokens / len(micros)
        total.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(total))
    return proj, losses


def trained(out):
    """mm_projector.safetensors in transformers' names (model.mm_projector.{0,2} -> linear_{1,2})."""
    sd = load_file(str(out / "mm_projector.safetensors"))
    return {f"linear_{int(k.split('.')[2]) // 2 + 1}.{k.split('.')[3]}": v for k, v in sd.items()}


def train(d, js, out, *extra):
    return run("train", d, "--data", js, "-o", out, "--threads", 2, *extra)


def losses_of(out):
    return [float(l.split(",")[1]) for l in (out / "loss.csv").read_text().splitlines()[1:]]


# ---- the projector's gradients against autograd -------------------------------------------------------------

@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return compile_driver("train_driver", tmp_path_factory.mktemp("drv"))


@pytest.mark.parametrize("kind", ["llava-gelu", "llava-silu", "linear", "mlp2x_gelu", "mlp3x_gelu", "simple_res"])
def test_projector_gradients_match_autograd(tmp_path, driver, kind):
    g = torch.Generator().manual_seed(1)
    if kind.startswith("llava"):
        model, d, _, _ = make_llava(tmp_path, act=kind.split("-")[1])
        proj, prefix = model.model.multi_modal_projector, "multi_modal_projector."  # save_pretrained's keys
    else:
        d = tmp_path / kind
        proj, prefix = make_original(d, kind), "model.mm_projector."
    d_in = proj.pre_norm.weight.shape[0] if kind == "simple_res" else next(proj.parameters()).shape[1]
    x = torch.randn(11, d_in, generator=g)
    dout = torch.randn(11, next(reversed(list(proj.parameters()))).shape[0], generator=g)
    save_file({"x": x, "dout": dout}, str(tmp_path / "in.safetensors"))
    r = subprocess.run([str(driver), str(d), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Sanitizer" not in r.stderr, r.stderr
    got = load_file(str(tmp_path / "out.safetensors"))
    proj.zero_grad()
    y = proj(x)
    (y * dout).sum().backward()
    assert scaled_err(got["out"], y.detach()) < 1e-5
    names = dict(proj.named_parameters())
    assert len(got) == len(names) + 1
    for n, p in names.items():
        e = scaled_err(got[f"g.{prefix}{n}"], p.grad)
        print(f"{kind} {n}: gradient {e:.2e} scaled")
        assert e < 1e-4, (n, e)
    # a wrong variant: the activation's derivative left out (the gradient as if the activation were linear)
    if kind in ("llava-gelu", "mlp2x_gelu"):
        w1 = names["linear_1.weight" if kind.startswith("llava") else "0.weight"]
        w2 = names["linear_2.weight" if kind.startswith("llava") else "2.weight"]
        wrong = (dout @ w2) .T @ x
        assert scaled_err(got[f"g.{prefix}{'linear_1.weight' if kind.startswith('llava') else '0.weight'}"],
                          wrong.detach()) > 1e-2
        assert w1.grad is not None


@pytest.mark.parametrize("arch,bos", [("llama", True), ("qwen2", False)])
def test_gradients_through_the_llm_match_autograd(tmp_path, driver, arch, bos):
    """End to end: one sample's caption loss through the frozen LLM, its gradient at the projector's weights."""
    model, d, proc, tok = make_llava(tmp_path, arch, bos)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, VIS["hidden_size"], generator=g)
    ids = tok.encode("a cat on the mat\n", add_special_tokens=False).ids
    save_file({"x": x, "ids": torch.tensor(ids, dtype=torch.int32),
               "bos": torch.tensor([0 if bos else -1], dtype=torch.int32)}, str(tmp_path / "in.safetensors"))
    r = subprocess.run([str(driver), "--e2e", str(d), str(tmp_path / "in.safetensors"), str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Sanitizer" not in r.stderr, r.stderr
    got = load_file(str(tmp_path / "o.safetensors"))
    proj = model.model.multi_modal_projector
    lm, emb = model.model.language_model, model.model.language_model.embed_tokens
    proj.zero_grad()
    v = proj(x)
    e = torch.cat(([emb(torch.tensor([0]))] if bos else []) + [v, emb(torch.tensor(ids))])[None]
    labels = torch.tensor([-100] * (int(bos) + len(v)) + ids)
    logits = model.lm_head(lm(inputs_embeds=e).last_hidden_state)[0]
    loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
    loss.backward()
    assert abs(float(got["loss"][0]) - float(loss)) < 1e-5 * abs(float(loss))
    for n, p in proj.named_parameters():
        err = scaled_err(got[f"g.multi_modal_projector.{n}"], p.grad)
        print(f"{arch} end to end {n}: gradient {err:.2e} scaled")
        assert err < 1e-4, (n, err)


# ---- training against a PyTorch loop ------------------------------------------------------------------------

@pytest.mark.parametrize("arch,bos", [("llama", True), ("qwen2", False)])
def test_twenty_steps_match_pytorch(tmp_path, arch, bos):
    model, d, proc, tok = make_llava(tmp_path, arch, bos)
    js, data, paths = make_data(tmp_path, 10)
    out = tmp_path / "run"
    train(d, js, out, "--batch", 4, "--micro-batch", 2, "--epochs", 8, "--max-steps", 20)
    proj, ref_losses = ref_train(model, proc, tok, data, paths, steps=20, batch=4, micro=2, bos=bos)
    got = trained(out)
    for n, p in proj.named_parameters():
        e = scaled_err(got[n], p.detach())
        print(f"{arch}: {n} after 20 steps {e:.2e} scaled")
        assert e < 1e-4, (n, e)
    start = model.model.multi_modal_projector.state_dict()
    assert max(scaled_err(got[n], start[n]) for n in got) > 1e-3  # the steps moved the weights
    losses = losses_of(out)
    assert len(losses) == 20
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)) < 1e-4, (losses, ref_losses)
    # a wrong variant of the loop: one token mean over the whole step instead of the micro-batches' mean
    _, wrong = ref_train(model, proc, tok, data, paths, steps=3, batch=4, micro=2, bos=bos, step_mean=True)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, wrong)) > 1e-3, (losses[:3], wrong)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_reaches_the_same_weights(tmp_path):
    model, d, proc, tok = make_llava(tmp_path)
    js, data, paths = make_data(tmp_path, 8)
    common = ("--batch", 4, "--micro-batch", 2, "--epochs", 10, "--max-steps", 20, "--save-every", 5)
    train(d, js, tmp_path / "a", *common)
    p = run("train", d, "--data", js, "-o", tmp_path / "b", "--threads", 2, *common, "--stop-after", 7, check=False)
    assert p.returncode == 130 and "resume with --resume" in p.stderr, p.stderr
    assert len(losses_of(tmp_path / "b")) == 7  # its curve so far
    # the run refuses to start over a checkpoint without --resume
    fails(["train", d, "--data", js, "-o", tmp_path / "b", *common], "another run's checkpoint")
    train(d, js, tmp_path / "b", *common, "--resume")
    a, b = trained(tmp_path / "a"), trained(tmp_path / "b")
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert losses_of(tmp_path / "b") == losses_of(tmp_path / "a")  # the curve goes on from the checkpoint
    assert "0 images cached now" in train(d, js, tmp_path / "c", *common, "--cache", tmp_path / "a" / "features",
                                          "--max-steps", 2).stderr


def test_outputs_load_in_transformers_and_mmbridge(tmp_path):
    from PIL import Image
    model, d, proc, tok = make_llava(tmp_path)
    js, data, paths = make_data(tmp_path, 4)
    out = tmp_path / "run"
    train(d, js, out, "--batch", 2, "--micro-batch", 1, "--epochs", 2)
    hf = LlavaForConditionalGeneration.from_pretrained(out / "hf").eval()
    got = trained(out)
    for n, p in hf.model.multi_modal_projector.named_parameters():
        assert torch.equal(p.detach(), got[n]), n
    pv = proc(images=[Image.open(p).convert("RGB") for p in paths[:2]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=pv)
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    want = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    run("encode", out / "hf", *paths[:2], "-o", tmp_path / "e.safetensors")
    enc = load_file(str(tmp_path / "e.safetensors"))
    e = next(v for k, v in enc.items() if "embed" in k)
    assert scaled_err(e.reshape(want.shape), want) < 1e-4
    # LLaVA's layout: the keys --pretrain_mm_mlp_adapter loads
    assert sorted(load_file(str(out / "mm_projector.safetensors"))) == [
        "model.mm_projector.0.bias", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
        "model.mm_projector.2.weight"]


def test_bad_input(tmp_path):
    model, d, proc, tok = make_llava(tmp_path, max_pos=40)
    js, data, paths = make_data(tmp_path, 6, long_caption=2)
    common = ("--batch", 2, "--micro-batch", 1)
    fails(["train", d, "--data", js, "-o", tmp_path / "o1", *common], "sample 2", "context")
    p = train(d, js, tmp_path / "o2", *common, "--skip-bad")
    assert "(1 skipped)" in p.stderr, p.stderr
    # an image that does not decode
    paths[4].write_bytes(b"not an image")
    bad = json.loads(js.read_text())
    bad[2]["conversations"][1]["value"] = "a cat"
    js.write_text(json.dumps(bad))
    fails(["train", d, "--data", js, "-o", tmp_path / "o3", *common], paths[4].name)
    assert "(1 skipped)" in train(d, js, tmp_path / "o4", *common, "--skip-bad").stderr
    # malformed data
    (tmp_path / "m.json").write_text(json.dumps([{"image": "x.png"}]))
    fails(["train", d, "--data", tmp_path / "m.json", "-o", tmp_path / "o5"], "sample 0")
    # a corrupt checkpoint to resume from
    ck = tmp_path / "o4" / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    fails(["train", d, "--data", js, "-o", tmp_path / "o4", *common, "--skip-bad", "--resume"], "checkpoint.safetensors")
    # a NaN loss: the step is refused
    sd = load_file(str(d / "model.safetensors"))
    k = next(k for k in sd if "multi_modal_projector" in k and k.endswith("weight"))
    sd[k][0, 0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    fails(["train", d, "--data", js, "-o", tmp_path / "o6", *common, "--skip-bad"], "the loss is nan")
    # a batch that the micro-batches do not divide
    fails(["train", d, "--data", js, "-o", tmp_path / "o7", "--batch", 3, "--micro-batch", 2], "multiple")


# ---- a Dense Connector in front of the projector --------------------------------------------------------------

@pytest.mark.parametrize("variant", ["sti", "sci", "dci"])
def test_dense_connector_training_matches_pytorch(tmp_path, variant):
    """An original-layout Dense Connector checkpoint (mm_dense_connector_type, a tower directory beside it): its
    projector trained on the combined hidden states (dense_connector.py's, as test_dense.py's reference makes them)."""
    from PIL import Image
    from transformers import CLIPVisionModel
    from test_dense import CLIP, dense_reference, make_tower
    from test_decoder import ARCH
    tower_dir, d = tmp_path / "tower", tmp_path / "dc"
    tower = make_tower(tower_dir, "clip")
    proc = CLIPImageProcessor(size={"shortest_edge": CLIP["image_size"]},
                              crop_size={"height": CLIP["image_size"], "width": CLIP["image_size"]})
    proc.save_pretrained(tower_dir)
    tok = tokenizer(d, True)
    cfg = text_config("llama", vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    lm = ARCH["llama"][1](cfg).eval()
    randomize(lm, 0)
    W = CLIP["hidden_size"] * (1 if variant == "sti" else 3)
    proj = build_projector("mlp2x_gelu", W, cfg.hidden_size)
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_(0, 0.2)
    lm.save_pretrained(d, safe_serialization=True)
    conf = json.loads((d / "config.json").read_text())
    conf.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_hidden_size=W,
                mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                mm_dense_connector_type=variant, mm_vision_tower="tiny-clip")
    write_json(d / "config.json", conf)
    sd = load_file(str(d / "model.safetensors"))
    sd.update({f"model.mm_projector.{k}": v.contiguous() for k, v in proj.state_dict().items()})
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    js, data, paths = make_data(tmp_path, 6)
    out = tmp_path / "run"
    run("train", d, "--vision-tower", tower_dir, "--data", js, "-o", out, "--threads", 2, "--batch", 2,
        "--micro-batch", 1, "--epochs", 3, "--max-steps", 8)
    feats = []
    with torch.no_grad():
        for p in paths:
            pv = proc(images=Image.open(p).convert("RGB"), return_tensors="pt")["pixel_values"]
            hs = tower(pixel_values=pv, output_hidden_states=True).hidden_states
            feats.append(dense_reference(hs, "clip", variant)[0])
    ref, ref_losses = ref_loop(proj, lm.model, lm.lm_head, lm.model.embed_tokens, feats, tok, data, 8, 2, 1, True,
                               False)
    got = load_file(str(out / "mm_projector.safetensors"))
    for n, p in ref.named_parameters():
        e = scaled_err(got[f"model.mm_projector.{n}"], p.detach())
        print(f"dense {variant}: {n} after 8 steps {e:.2e} scaled")
        assert e < 1e-4, (n, e)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses_of(out), ref_losses)) < 1e-4
    assert not (out / "hf").exists()  # an original-layout checkpoint: LLaVA's layout only
