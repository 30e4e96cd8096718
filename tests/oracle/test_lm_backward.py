"""The frozen LLM's backward for stage-1 training (mmb__lm_loss_backward, issue 17) against torch autograd on tiny
random transformers checkpoints (test_decoder's make_lm): the summed next-token cross-entropy of one sequence
with LLaVA-style labels (an ignored image + prompt span, the caption kept) and its gradient with respect to
inputs_embeds. Llama, Qwen2 (q/k/v biases), Mistral (GQA, a sliding window shorter than the sequence), llama3
RoPE scaling, bf16 weights. Wrong backward variants, emulated in a functional torch decoder with custom
autograd pieces, are shown to be far off; bad input is refused with clear messages."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import compile_driver, scaled_err
from test_decoder import SHAPE, make_lm

IGNORE = -100
N_POS = 40   # sequence length of the checks
N_IGN = 24   # the ignored "image + prompt" span at the start


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return compile_driver("lm_backward_driver", tmp_path_factory.mktemp("drv"))


def llava_labels(n=N_POS, ignored=N_IGN, seed=1, vocab=SHAPE["vocab_size"]):
    """Labels as LLaVA's preprocess_plain makes them: IGNORE over the image + prompt, the caption's ids after."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, vocab, (n,), generator=g)
    lab[:ignored] = IGNORE
    lab[ignored + 5] = IGNORE  # an ignored position inside the kept span too
    return lab


def embeds_of(n=N_POS, seed=3):
    return torch.randn(n, SHAPE["hidden_size"], generator=torch.Generator().manual_seed(seed))


def run_driver(driver, d, tmp_path, emb, lab, check=True, threads=2):
    import subprocess
    fin, fout = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"embeds": emb.float().contiguous(), "labels": lab.long().contiguous()}, str(fin))
    p = subprocess.run([str(driver), str(d), str(fin), str(fout), str(threads)], capture_output=True, text=True, timeout=120)
    assert "Sanitizer" not in p.stderr and "runtime error:" not in p.stderr, p.stderr
    if not check:
        return p
    assert p.returncode == 0, p.stderr
    out = load_file(str(fout))
    return out["loss_sum"].item(), int(out["count"].item()), out["d_embeds"]


def torch_loss_grad(model, emb, lab):
    """transformers' loss (CrossEntropyLoss(reduction='sum') on the shifted logits) and inputs_embeds.grad."""
    e = emb.clone().requires_grad_(True)
    logits = model(inputs_embeds=e[None]).logits[0].float()
    loss = torch.nn.CrossEntropyLoss(reduction="sum")(logits[:-1], lab[1:])
    loss.backward()
    return loss.item(), int((lab[1:] != IGNORE).sum()), e.grad.detach()


def check(driver, model, d, tmp_path, what, emb=None, lab=None, threads=2):
    emb = embeds_of() if emb is None else emb
    lab = llava_labels() if lab is None else lab
    loss, cnt, grad = run_driver(driver, d, tmp_path, emb, lab, threads=threads)
    rloss, rcnt, rgrad = torch_loss_grad(model, emb, lab)
    rel = abs(loss - rloss) / abs(rloss)
    err = scaled_err(grad, rgrad)
    print(f"{what}: loss {loss:.6f} vs {rloss:.6f} (rel {rel:.1e}), count {cnt}, d_embeds scaled err {err:.2e} "
          f"(|grad| max {rgrad.abs().max():.3g})")
    assert cnt == rcnt and rel <= 1e-5 and err <= 1e-4
    return grad, rgrad


@pytest.mark.parametrize("arch,kw", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("mistral", {"sliding_window": 8}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                   "rope_theta": 10000.0}}),
], ids=["llama", "llama-tied", "qwen2-bias", "mistral-window8", "llama3-rope"])
def test_loss_and_grad_match_autograd(driver, tmp_path, arch, kw):
    model, d = make_lm(tmp_path, arch, **kw)
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if arch == "mistral":
        assert model.config.sliding_window < N_POS and model.config.num_key_value_heads < model.config.num_attention_heads
    grad, _ = check(driver, model, d, tmp_path, f"{arch} {kw}")
    # the ignored span (the image's rows) has no target of its own; its gradient comes through the caption's
    # attention
    assert grad[:N_IGN].abs().max() > 1e-3 * grad.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_weights(driver, tmp_path, arch):
    (model, _), d = make_lm(tmp_path, arch, dtype=torch.bfloat16)  # model: the bf16-rounded weights in f32
    check(driver, model, d, tmp_path, f"{arch} bf16 weights")


def test_row_blocks_and_head_chunks(driver, tmp_path):
    """300 positions: two row blocks of the products (256 rows each call), 119 targets: two chunks of the head;
    3 threads, so the column splits are uneven (64 columns = 2 panels of 32 on 3 threads)."""
    model, d = make_lm(tmp_path, "mistral", sliding_window=40, max_position_embeddings=512)
    check(driver, model, d, tmp_path, "mistral window 40, 300 positions, 3 threads", embeds_of(300),
          llava_labels(300, 180), threads=3)


def test_no_target_and_all_targets(driver, tmp_path):
    model, d = make_lm(tmp_path, "llama")
    emb = embeds_of(12)
    lab = torch.full((12,), IGNORE)
    loss, cnt, grad = run_driver(driver, d, tmp_path, emb, lab)
    assert loss == 0 and cnt == 0 and grad.abs().max() == 0
    lab = llava_labels(12, ignored=0)
    lab[5] = 7
    check(driver, model, d, tmp_path, "llama every position kept", emb, lab)


# ---- wrong variants: a functional decoder whose backward can be broken on purpose -------------------------

class MaskedSoftmax(torch.autograd.Function):
    """softmax(s + mask) forward; backward with the mask (right) or, with drop_mask, through softmax(s) as if the
    backward's recomputed probabilities had no causal mask."""

    @staticmethod
    def forward(ctx, s, mask, drop_mask):
        p = torch.softmax(s + mask, -1)
        ctx.save_for_backward(s, p)
        ctx.drop = drop_mask
        return p

    @staticmethod
    def backward(ctx, dp):
        s, p = ctx.saved_tensors
        if ctx.drop:
            p = torch.softmax(s, -1)
        return p * (dp - (dp * p).sum(-1, keepdim=True)), None, None


class Rope(torch.autograd.Function):
    """x rotated by the positions' angles; backward by -angle (right) or, with no_inverse, by +angle again."""

    @staticmethod
    def forward(ctx, x, cos, sin, no_inverse):
        ctx.save_for_backward(cos, sin)
        ctx.no_inv = no_inverse
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        sign = 1.0 if ctx.no_inv else -1.0
        return g * cos + rotate_half(g) * (sign * sin), None, None, None


class NormWeight(torch.autograd.Function):
    """y = x * w; backward g * w (right) or, with drop_w, g (the final norm's weight left out of the gradient)."""

    @staticmethod
    def forward(ctx, x, w, drop_w):
        ctx.save_for_backward(w)
        ctx.drop = drop_w
        return x * w

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return (g if ctx.drop else g * w), None, None


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def functional_loss_grad(model, emb, lab, drop_mask=False, no_rope_inverse=False, drop_final_w=False):
    cfg = model.config
    H, KVH = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H
    n = emb.shape[0]
    m = model.model
    x0 = emb.clone().requires_grad_(True)
    cos, sin = m.rotary_emb(x0[None], torch.arange(n)[None])
    cos, sin = cos[0][:, None, :].float(), sin[0][:, None, :].float()
    i = torch.arange(n)
    allowed = i[None, :] <= i[:, None]
    win = getattr(cfg, "sliding_window", None)
    if win:
        allowed &= i[None, :] > i[:, None] - win
    mask = torch.where(allowed, 0.0, -math.inf)

    def rms(x, w, drop=False):
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
        return NormWeight.apply(xn, w, drop)

    x = x0
    for layer in m.layers:
        a = layer.self_attn
        h = rms(x, layer.input_layernorm.weight)
        q = Rope.apply(a.q_proj(h).view(n, H, hd), cos, sin, no_rope_inverse)
        k = Rope.apply(a.k_proj(h).view(n, KVH, hd), cos, sin, no_rope_inverse)
        v = a.v_proj(h).view(n, KVH, hd)
        k, v = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        s = torch.einsum("ihe,jhe->hij", q, k) / math.sqrt(hd)
        p = MaskedSoftmax.apply(s, mask, drop_mask)
        o = torch.einsum("hij,jhe->ihe", p, v).reshape(n, H * hd)
        x = x + a.o_proj(o)
        h = rms(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    logits = model.lm_head(rms(x, m.norm.weight, drop_final_w))
    loss = torch.nn.CrossEntropyLoss(reduction="sum")(logits[:-1], lab[1:])
    loss.backward()
    return loss.item(), x0.grad.detach()


def test_wrong_variants_are_far_off(driver, tmp_path):
    model, d = make_lm(tmp_path, "mistral", sliding_window=8)
    for p in model.parameters():
        p.requires_grad_(False)
    emb, lab = embeds_of(), llava_labels()
    grad, rgrad = check(driver, model, d, tmp_path, "mistral window 8 (variants' base)", emb, lab)
    rloss, fgrad = functional_loss_grad(model, emb, lab)
    assert scaled_err(fgrad, rgrad) <= 1e-5  # the functional decoder is transformers' (its right backward)
    variants = {"no causal mask in the backward's softmax": dict(drop_mask=True),
                "RoPE's rotation not inverted": dict(no_rope_inverse=True),
                "the final norm's weight left out of the gradient": dict(drop_final_w=True)}
    for what, kw in variants.items():
        loss, vgrad = functional_loss_grad(model, emb, lab, **kw)
        assert loss == pytest.approx(rloss, rel=1e-6)  # a backward-only defect: the loss is the same
        far = scaled_err(vgrad, rgrad)
        print(f"variant '{what}': scaled distance {far:.2e} from autograd (mmbridge's: {scaled_err(grad, rgrad):.2e})")
        assert far > 1e-2


# ---- bad input -----------------------------------------------------------------------------------------------

def test_bad_input(driver, tmp_path):
    import subprocess
    model, d = make_lm(tmp_path, "llama")
    emb, lab = embeds_of(), llava_labels()
    for bad, needle in [(SHAPE["vocab_size"], "label 256 at position 30 is outside the vocabulary [0, 256)"),
                        (-5, "label -5 at position 30")]:
        lb = lab.clone()
        lb[30] = bad
        p = run_driver(driver, d, tmp_path, emb, lb, check=False)
        assert p.returncode == 2 and needle in p.stderr, p.stderr
    p = run_driver(driver, d, tmp_path, emb[:1], lab[:1], check=False)
    assert p.returncode == 2 and "1 positions; the next-token loss needs at least 2" in p.stderr, p.stderr
    n = SHAPE["max_position_embeddings"] + 1
    p = run_driver(driver, d, tmp_path, embeds_of(n), llava_labels(n), check=False)
    assert p.returncode == 2 and f"a sequence of {n} positions; the model has 128" in p.stderr, p.stderr
    # the activation limit: 64 thin layers keep 35136 floats a position, so 130000 positions pass 16 GiB (refused
    # before the untouched inputs are read)
    _, d64 = make_lm(tmp_path, "llama", name="deep", num_hidden_layers=64, max_position_embeddings=1 << 17)
    p = subprocess.run([str(driver), "--claim", str(d64), "130000"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "would keep 18.27 GB of activations (35136 floats per position), over the limit " \
        "of 17.18 GB" in p.stderr and "at most 122238 positions" in p.stderr, p.stderr
    print(p.stderr.strip())


def test_refuses_what_it_does_not_cover(driver, tmp_path):
    """A type-B model (mPLUG-Owl2's multiway K/V: a second weight set) is refused, not computed wrongly."""
    from safetensors.torch import save_file as sf
    _, d = make_lm(tmp_path, "llama")
    sd = load_file(str(d / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        for name in ("k_proj", "v_proj", "input_layernorm", "post_attention_layernorm"):
            if f".{name}." in k and k.endswith(".weight"):
                out[k.replace(".weight", ".multiway.0.weight")] = v
                out[k.replace(".weight", ".multiway.1.weight")] = v.clone()
                break
        else:
            out[k] = v
    sf(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    p = run_driver(driver, d, tmp_path, embeds_of(), llava_labels(), check=False)
    assert p.returncode == 2 and "covers the plain Llama/Mistral/Qwen2 decoder only: the layers have a second " \
        "expert weight set" in p.stderr, p.stderr
    print(p.stderr.strip())
