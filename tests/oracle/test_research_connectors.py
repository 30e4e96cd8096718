"""Research connectors read from an original-LLaVA checkpoint (model.mm_projector.*, mm_projector_type):
Honeybee's C-Abstractor ("c-abs"), MobileVLM's LDP ("ldpnet") and LDPv2 ("ldpnetv2"), a mixture-of-experts
projector ("moe_mlpNx_gelu") and a low-rank one ("lowrank", "lowrank_mlp2x_gelu"). None is in transformers:
each reference below is an independent torch module written from shared/specs/connectors_catalog.md section 7
(Honeybee projectors.py + timm RegStage; MobileVLM vision_projector.py + torchvision InvertedResidual) and
docs/connector_format.md, with the original state-dict names. End to end through
`mmbridge encode --pixels P --vision-tower CLIP_DIR` on tiny transformers CLIP towers; costs via `info`."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from conftest import run, scaled_err
from test_vit import pixels_file, randomize_norms

D, H = 16, 24          # tower width, LM width (d_model)
# 56 / 14 -> a 4x4 grid (16 patches + CLS); 48 / 2 -> MobileVLM's 24x24 grid (576 patches + CLS).
SMALL = dict(hidden_size=D, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=56,
             patch_size=14)
GRID24 = dict(SMALL, num_hidden_layers=2, image_size=48, patch_size=2)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """name -> (directory, the CLIPVisionModel), norms randomized."""
    out = {}
    for name, cfg in (("small", SMALL), ("grid24", GRID24)):
        torch.manual_seed(0)
        model = CLIPVisionModel(CLIPVisionConfig(**cfg)).eval()
        randomize_norms(model)
        d = tmp_path_factory.mktemp(name)
        model.save_pretrained(d)
        out[name] = (d, model)
    return out


def randomize(module, seed=1, std=0.3):
    """Every parameter random; norm weights around 0.5 so a missing or misplaced norm shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if re.search(r"(bn|norm|\.1|0\.1|2\.1)\.weight$", name) and p.dim() == 1:
                p.normal_(0.5, 0.3)
            else:
                p.normal_(0, std)
    return module.eval()


def write_checkpoint(d, ptype, module, width_in=D, width_out=H, layer=-2, feature="patch", **extra):
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": width_out,
        "mm_hidden_size": width_in, "mm_projector_type": ptype, "mm_vision_select_layer": layer,
        "mm_vision_select_feature": feature, "mm_vision_tower": "tiny-clip", **extra}))
    sd = {f"model.mm_projector.{k}": v.contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(d / "model.safetensors"))
    return sd


def features(tower, px, layer=-2):
    with torch.no_grad():
        return tower(pixel_values=px, output_hidden_states=True).hidden_states[layer][:, 1:]


def encode(tmp_path, model_dir, tower_dir, check=True):
    out = tmp_path / "o.safetensors"
    p = run("encode", model_dir, "--pixels", tmp_path / "px.safetensors", "-o", out, "--vision-tower", tower_dir,
            check=check)
    return (load_file(str(out))["embeddings"] if p.returncode == 0 else None), p


def compare(got, ref, label, wrong=None):
    """got within 1e-4 scaled of ref; `wrong` (a reference with one feature left out) must be far from it."""
    assert got.shape == ref.shape, (got.shape, ref.shape)
    err = scaled_err(got, ref)
    print(f"{label}: {tuple(ref.shape)} scaled max err {err:.2e}")
    assert err <= 1e-4
    if wrong is not None:
        assert scaled_err(got, wrong) > 1e-2, f"{label}: the test cannot tell the variant apart"
    return err


# ---- Honeybee C-Abstractor: timm RegStage(act SiLU, norm LayerNorm2d) as Honeybee builds it ----

class LayerNormAct2d(nn.LayerNorm):
    """timm LayerNormAct2d: LayerNorm over channels of an NCHW map (eps 1e-5), then the activation."""

    def __init__(self, c, act=None):
        super().__init__(c, eps=1e-5)
        self.act = act() if act else nn.Identity()

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(x.permute(0, 3, 1, 2))


class ConvNormAct(nn.Module):
    """timm ConvNormAct: conv (no bias, 'same' padding) -> bn (a norm-act layer)."""

    def __init__(self, cin, cout, k, groups=1, act=nn.SiLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)
        self.bn = LayerNormAct2d(cout, act)

    def forward(self, x):
        return self.bn(self.conv(x))


class SEModule(nn.Module):
    """timm SEModule(act_layer=SiLU): x * sigmoid(fc2(act(fc1(mean_hw x))))."""

    def __init__(self, c, rd):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, rd, 1), nn.Conv2d(rd, c, 1)

    def forward(self, x):
        s = self.fc2(F.silu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class Bottleneck(nn.Module):
    """timm regnet Bottleneck: bottle_ratio 1, group_size 1 (depthwise), se_ratio 0.25 of in_chs."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 1)
        self.conv2 = ConvNormAct(cout, cout, 3, groups=cout)
        self.se = SEModule(cout, int(round(cin * 0.25)))
        self.conv3 = ConvNormAct(cout, cout, 1, act=None)
        self.downsample = ConvNormAct(cin, cout, 1, act=None) if cin != cout else nn.Identity()

    def forward(self, x):
        y = self.conv3(self.se(self.conv2(self.conv1(x))))
        return F.silu(y + self.downsample(x))


class RegStage(nn.Sequential):
    def __init__(self, depth, cin, cout):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", Bottleneck(cin if i == 0 else cout, cout))


class CAbstractor(nn.Module):
    """Honeybee CAbstractor: x + pos_emb -> net = (s1, AdaptiveAvgPool2d, s2) -> readout (Linear, SiLU, ...)."""

    def __init__(self, d_in, hidden, d_out, n_in, queries, depth=3, mlp_depth=2, pos=True):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, n_in, d_in)) if pos else None
        hw = int(queries ** 0.5)
        sampler = nn.AdaptiveAvgPool2d((hw, hw))
        self.net = nn.Sequential(RegStage(depth, d_in, hidden), sampler, RegStage(depth, hidden, hidden)) \
            if depth else sampler
        width = hidden if depth else d_in
        mods = [nn.Linear(width, d_out)]
        for _ in range(1, mlp_depth):
            mods += [nn.SiLU(), nn.Linear(d_out, d_out)]
        self.readout = nn.Sequential(*mods)

    def forward(self, x, use_pos=True):
        if self.pos_emb is not None and use_pos:
            x = x + self.pos_emb[:, -x.shape[1]:]   # an obsolete CLS slot (one extra row) is skipped
        b, n, c = x.shape
        hw = int(n ** 0.5)
        x = x.transpose(1, 2).reshape(b, c, hw, hw)
        x = self.net(x)
        return self.readout(x.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("tower,depth,hidden,queries,mlp_depth,cls_slot", [
    ("small", 3, 24, 9, 2, False),     # 4x4 -> 3x3: pooling bins overlap; downsample shortcut (16 -> 24)
    ("small", 2, 16, 4, 3, True),      # in == hidden: identity shortcuts; pos_emb with the obsolete CLS slot
    ("small", 0, 0, 4, 2, False),      # depth 0: the pooling alone, readout from the tower width
    ("grid24", 1, 32, 144, 2, False),  # Honeybee's 144 queries from a 24x24 grid
])
def test_cabstractor_matches_reference(tmp_path, towers, tower, depth, hidden, queries, mlp_depth, cls_slot):
    tdir, tmodel = towers[tower]
    n = (tmodel.config.image_size // tmodel.config.patch_size) ** 2
    ref_mod = randomize(CAbstractor(D, hidden, H, n + cls_slot, queries, depth, mlp_depth))
    write_checkpoint(tmp_path / "m", "c-abs", ref_mod, layer=-1, mm_cabs_depth=depth, mm_cabs_mlp_depth=mlp_depth,
                     mm_cabs_num_queries=queries)
    px = pixels_file(tmp_path / "px.safetensors", 2, tmodel.config.image_size)
    x = features(tmodel, px, -1)  # Honeybee reads the last hidden state
    with torch.no_grad():
        ref, no_pos = ref_mod(x), ref_mod(x, use_pos=False)
    got, _ = encode(tmp_path, tmp_path / "m", tdir)
    compare(got, ref, f"c-abs depth {depth} hidden {hidden} {n}->{queries} mlp {mlp_depth}", no_pos)


# ---- MobileVLM LDP (torchvision MobileNetV3 InvertedResidual, timm LayerNormAct2d) and LDPv2 ----

class ConvNormActivation(nn.Sequential):
    """torchvision Conv2dNormActivation: Sequential(conv (no bias), norm[, activation])."""

    def __init__(self, cin, cout, k, stride=1, groups=1, act=None):
        mods = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), LayerNormAct2d(cout)]
        super().__init__(*(mods + ([act()] if act else [])))


def make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SqueezeExcitation(nn.Module):
    """torchvision SqueezeExcitation(activation ReLU, scale_activation Hardsigmoid)."""

    def __init__(self, c, sq):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, sq, 1), nn.Conv2d(sq, c, 1)

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return F.hardsigmoid(s) * x


class InvertedResidual(nn.Module):
    """MobileNetV3 block with expanded = in = out = c, kernel 3, SE, Hardswish."""

    def __init__(self, c, stride):
        super().__init__()
        self.block = nn.Sequential(ConvNormActivation(c, c, 3, stride, groups=c, act=nn.Hardswish),
                                   SqueezeExcitation(c, make_divisible(c // 4)),
                                   ConvNormActivation(c, c, 1))
        self.use_res = stride == 1

    def forward(self, x, residual=True):
        y = self.block(x)
        return y + x if self.use_res and residual else y


class LDPBlock(nn.Module):
    def __init__(self, inc, ouc):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))
        self.mb_block = nn.Sequential(nn.Identity(), InvertedResidual(ouc, 1), InvertedResidual(ouc, 2))

    def forward(self, x, residual=True):
        b, n, _ = x.shape
        h = int(n ** 0.5)
        x = self.mlp(x).permute(0, 2, 1).reshape(b, -1, h, h)
        x = self.mb_block[2](self.mb_block[1](x, residual))
        return x.flatten(2).permute(0, 2, 1)


class LDPNetProjector(nn.Module):
    def __init__(self, inc, ouc):
        super().__init__()
        self.model = LDPBlock(inc, ouc)

    def forward(self, x, residual=True):
        return self.model(x, residual)


class FeatureIRLayer(nn.Module):
    def __init__(self, inc, ouc):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))


class PosInjectLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=True, groups=c))


class LDPNetV2Projector(nn.Module):
    def __init__(self, inc, ouc):
        super().__init__()
        self.mlp = FeatureIRLayer(inc, ouc)
        self.peg = PosInjectLayer(ouc)

    def forward(self, x, residual=True):
        x = self.mlp.mlp(x)
        b, n, c = x.shape
        h = int(n ** 0.5)
        x = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(b, c, h, h), (12, 12))  # TokenDownLayer((12, 12))
        x = self.peg.peg(x) + (x if residual else 0)
        return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("ptype,tower,ouc", [
    ("ldpnet", "grid24", 32), ("ldpnet", "small", 48), ("ldpnetv2", "grid24", 24), ("ldpnetv2", "small", 16)])
def test_ldp_matches_reference(tmp_path, towers, ptype, tower, ouc):
    """24x24 -> 12x12 as in MobileVLM; a 4x4 grid -> 2x2 (LDP) or pooled up to 12x12 (LDPv2)."""
    tdir, tmodel = towers[tower]
    ref_mod = randomize((LDPNetProjector if ptype == "ldpnet" else LDPNetV2Projector)(D, ouc))
    sd = write_checkpoint(tmp_path / "m", ptype, ref_mod, width_out=ouc)
    if ptype == "ldpnet":
        assert "model.mm_projector.model.mb_block.2.block.1.fc1.weight" in sd  # MobileVLM's own names
    else:
        assert set(sd) == {f"model.mm_projector.{k}" for k in ("mlp.mlp.0.weight", "mlp.mlp.0.bias", "mlp.mlp.2.weight",
                                                              "mlp.mlp.2.bias", "peg.peg.0.weight", "peg.peg.0.bias")}
    px = pixels_file(tmp_path / "px.safetensors", 2, tmodel.config.image_size)
    x = features(tmodel, px)
    with torch.no_grad():
        ref, no_res = ref_mod(x), ref_mod(x, residual=False)
    got, _ = encode(tmp_path, tmp_path / "m", tdir)
    compare(got, ref, f"{ptype} {tower} C={ouc}", no_res)


# ---- mixture of experts ----

class MoEProjector(nn.Module):
    """docs/connector_format.md: router Linear(D -> E), E experts mlpNx_gelu, softmax, top-k, renormalised."""

    def __init__(self, d_in, d_out, n_exp, k, depth=2, router_bias=False):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d_in, n_exp, bias=router_bias)
        self.experts = nn.ModuleList()
        for _ in range(n_exp):
            mods = [nn.Linear(d_in, d_out)]
            for _ in range(1, depth):
                mods += [nn.GELU(), nn.Linear(d_out, d_out)]
            self.experts.append(nn.Sequential(*mods))

    def route(self, x):
        p = torch.softmax(self.router(x).float(), dim=-1)
        # Ties go to the lower expert index (a stable sort); torch.topk leaves their order unspecified.
        choice = torch.sort(p, dim=-1, descending=True, stable=True).indices[..., :self.k]
        return p, choice

    def forward(self, x, renormalise=True):
        p, choice = self.route(x)
        w = p.gather(-1, choice)
        if renormalise:
            w = w / w.sum(-1, keepdim=True)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)                     # (..., E, d)
        picked = outs.gather(-2, choice.unsqueeze(-1).expand(*choice.shape, outs.shape[-1]))
        return (w.unsqueeze(-1) * picked).sum(-2)

    def counts(self, x):
        return torch.bincount(self.route(x)[1].flatten(), minlength=len(self.experts)).tolist()


def routing_line(stdout):
    m = re.search(r"routing: tokens per expert:((?: \d+)+)", stdout)
    assert m, stdout
    return [int(v) for v in m.group(1).split()]


@pytest.mark.parametrize("n_exp,k,depth,router_bias", [(4, 2, 2, False), (3, 1, 2, True), (5, 5, 1, False),
                                                        (4, 3, 3, False)])
def test_moe_matches_reference(tmp_path, towers, n_exp, k, depth, router_bias):
    tdir, tmodel = towers["small"]
    ref_mod = randomize(MoEProjector(D, H, n_exp, k, depth, router_bias), std=0.5)
    write_checkpoint(tmp_path / "m", f"moe_mlp{depth}x_gelu", ref_mod, mm_moe_num_experts=n_exp, mm_moe_top_k=k)
    px = pixels_file(tmp_path / "px.safetensors", 2, tmodel.config.image_size)
    x = features(tmodel, px)
    with torch.no_grad():
        ref, raw = ref_mod(x), ref_mod(x, renormalise=False)
        counts = ref_mod.counts(x)
    got, p = encode(tmp_path, tmp_path / "m", tdir)
    compare(got, ref, f"moe E={n_exp} k={k} depth {depth}", raw if k < n_exp else None)
    assert routing_line(p.stdout) == counts and sum(counts) == x.shape[0] * x.shape[1] * k


def test_moe_ties_take_the_lower_expert(tmp_path, towers):
    """A zero router: every expert equally likely; mmbridge (and the reference) take experts 0..k-1."""
    tdir, tmodel = towers["small"]
    ref_mod = randomize(MoEProjector(D, H, 4, 2))
    with torch.no_grad():
        ref_mod.router.weight.zero_()
    write_checkpoint(tmp_path / "m", "moe_mlp2x_gelu", ref_mod, mm_moe_num_experts=4, mm_moe_top_k=2)
    px = pixels_file(tmp_path / "px.safetensors", 2, tmodel.config.image_size)
    x = features(tmodel, px)
    with torch.no_grad():
        ref = ref_mod(x)
        mean01 = (ref_mod.experts[0](x) + ref_mod.experts[1](x)) / 2
    got, p = encode(tmp_path, tmp_path / "m", tdir)
    compare(got, ref, "moe ties")
    assert scaled_err(ref, mean01) <= 1e-6
    assert routing_line(p.stdout) == [32, 32, 0, 0]


# ---- low rank ----

def make_lowrank(r, mlp):
    mods = [nn.Linear(D, r, bias=False), nn.Linear(r, H)]
    if mlp:
        mods += [nn.GELU(), nn.Linear(H, H)]
    return randomize(nn.Sequential(*mods))


@pytest.mark.parametrize("ptype,r", [("lowrank", 3), ("lowrank", 1), ("lowrank_mlp2x_gelu", 5)])
def test_lowrank_matches_reference(tmp_path, towers, ptype, r):
    tdir, tmodel = towers["small"]
    ref_mod = make_lowrank(r, ptype != "lowrank")
    write_checkpoint(tmp_path / "m", ptype, ref_mod, mm_lowrank_rank=r)
    px = pixels_file(tmp_path / "px.safetensors", 2, tmodel.config.image_size)
    x = features(tmodel, px)
    with torch.no_grad():
        ref = ref_mod(x)
        wrong = ref_mod[1](x @ ref_mod[0].weight.T[:, :].flip(1)) if r > 1 else None  # U's rows out of order
    got, _ = encode(tmp_path, tmp_path / "m", tdir)
    compare(got, ref, f"{ptype} r={r}", wrong)


# ---- costs through `mmbridge info`, at real sizes (ViT-L/14-336 by name; thin d_model) ----

def info(d):
    out = run("info", d).stdout
    get = lambda key: int(re.search(rf"{key}:\s+(\d+)", out).group(1))
    return get("parameters"), get("tokens per image"), out


@pytest.mark.parametrize("ptype,make,extra,tokens", [
    ("c-abs", lambda: CAbstractor(1024, 8, 8, 576, 144, depth=1), dict(mm_cabs_depth=1), 144),
    ("ldpnet", lambda: LDPNetProjector(1024, 16), {}, 144),
    ("ldpnetv2", lambda: LDPNetV2Projector(1024, 16), {}, 144),
    ("moe_mlp2x_gelu", lambda: MoEProjector(1024, 8, 4, 2), dict(mm_moe_num_experts=4, mm_moe_top_k=2), 576),
    ("lowrank_mlp2x_gelu", lambda: nn.Sequential(nn.Linear(1024, 4, bias=False), nn.Linear(4, 8), nn.GELU(),
                                                 nn.Linear(8, 8)), dict(mm_lowrank_rank=4), 576),
])
def test_info_reports_costs(tmp_path, ptype, make, extra, tokens):
    mod = make()
    (tmp_path / "m").mkdir()
    out_w = 16 if ptype.startswith("ldp") else 8
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": out_w,
        "mm_hidden_size": 1024, "mm_projector_type": ptype, "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336", **extra}))
    save_file({f"model.mm_projector.{k}": v.contiguous() for k, v in mod.state_dict().items()},
              str(tmp_path / "m" / "model.safetensors"))
    params, got_tokens, out = info(tmp_path / "m")
    act = {"c-abs": "silu", "ldpnet": "gelu, hardswish"}.get(ptype, "gelu")
    assert re.search(rf"connector:\s+{ptype}, activation {act}\n", out), out
    assert params == sum(p.numel() for p in mod.parameters()), out
    assert got_tokens == tokens, out
    flops = float(re.search(r"FLOPs per image:\s+([\d.]+) GFLOP", out).group(1)) * 1e9
    if ptype == "lowrank_mlp2x_gelu":
        assert abs(flops - 2 * 576 * (1024 * 4 + 4 * 8 + 8 * 8)) < 1e6
    if ptype == "moe_mlp2x_gelu":  # the router and k = 2 experts per token
        assert abs(flops - 2 * 576 * (1024 * 4 + 2 * (1024 * 8 + 8 * 8))) < 1e6
    assert flops > 0


# ---- bad input: non-zero exit, a clear message, no output file ----

def bad(tmp_path, towers, ptype, module, expect, tower="small", mutate=None, feature="patch", **extra):
    tdir, tmodel = towers[tower]
    sd = write_checkpoint(tmp_path / "m", ptype, module, feature=feature, **extra)
    if mutate:
        mutate(sd)
        save_file(sd, str(tmp_path / "m" / "model.safetensors"))
    pixels_file(tmp_path / "px.safetensors", 1, tmodel.config.image_size)
    _, p = encode(tmp_path, tmp_path / "m", tdir, check=False)
    assert p.returncode != 0 and not (tmp_path / "o.safetensors").exists()
    for e in expect:
        assert e in p.stderr, (e, p.stderr)


def drop(name):
    return lambda sd: sd.pop(f"model.mm_projector.{name}")


def reshape(name, shape):
    return lambda sd: sd.__setitem__(f"model.mm_projector.{name}", torch.zeros(shape))


@pytest.mark.parametrize("case", [
    "cabs missing", "cabs shape", "cabs not square", "cabs queries", "cabs pos", "ldp missing", "ldp shape",
    "ldpv2 not square", "moe topk", "moe missing key", "moe expert missing", "moe router shape", "rank 0",
    "rank mismatch", "lowrank missing"])
def test_bad_input(tmp_path, towers, case):
    cabs = lambda **kw: randomize(CAbstractor(D, 24, H, 16, 4, 1, 2, **kw))
    cabs_cfg = dict(mm_cabs_depth=1, mm_cabs_num_queries=4, layer=-1)
    moe = lambda: randomize(MoEProjector(D, H, 3, 2))
    if case == "cabs missing":
        bad(tmp_path, towers, "c-abs", cabs(), ["net.0.b1.se.fc2.weight", "missing"],
            mutate=drop("net.0.b1.se.fc2.weight"), **cabs_cfg)
    elif case == "cabs shape":
        bad(tmp_path, towers, "c-abs", cabs(), ["net.2.b1.conv2.conv.weight", "[24, 1, 3, 3]"],
            mutate=reshape("net.2.b1.conv2.conv.weight", (24, 1, 5, 5)), **cabs_cfg)
    elif case == "cabs not square":  # CLS kept: 17 tokens
        bad(tmp_path, towers, "c-abs", cabs(), ["17 tokens", "square"], feature="cls_patch", **cabs_cfg)
    elif case == "cabs queries":
        bad(tmp_path, towers, "c-abs", cabs(), ["mm_cabs_num_queries", "square"],
            **dict(cabs_cfg, mm_cabs_num_queries=5))
    elif case == "cabs pos":  # pos_emb for a 5x5 grid on a 4x4 one
        bad(tmp_path, towers, "c-abs", cabs(), ["pos_emb", "25", "16"], mutate=reshape("pos_emb", (1, 25, D)),
            **cabs_cfg)
    elif case == "ldp missing":
        bad(tmp_path, towers, "ldpnet", randomize(LDPNetProjector(D, 16)),
            ["model.mb_block.2.block.2.1.bias", "missing"], mutate=drop("model.mb_block.2.block.2.1.bias"),
            width_out=16)
    elif case == "ldp shape":  # SE squeeze channels other than make_divisible(C / 4, 8)
        bad(tmp_path, towers, "ldpnet", randomize(LDPNetProjector(D, 16)), ["block.1.fc1.weight", "[8, 16, 1, 1]"],
            mutate=reshape("model.mb_block.1.block.1.fc1.weight", (4, 16, 1, 1)), width_out=16)
    elif case == "ldpv2 not square":
        bad(tmp_path, towers, "ldpnetv2", randomize(LDPNetV2Projector(D, 16)), ["17 tokens", "square"],
            feature="cls_patch", width_out=16)
    elif case == "moe topk":
        bad(tmp_path, towers, "moe_mlp2x_gelu", moe(), ["mm_moe_top_k", "= 4", "1..3"], mm_moe_num_experts=3,
            mm_moe_top_k=4)
    elif case == "moe missing key":
        bad(tmp_path, towers, "moe_mlp2x_gelu", moe(), ["mm_moe_num_experts", "missing"], mm_moe_top_k=1)
    elif case == "moe expert missing":
        bad(tmp_path, towers, "moe_mlp2x_gelu", moe(), ["experts.2.2.weight", "missing"],
            mutate=drop("experts.2.2.weight"), mm_moe_num_experts=3, mm_moe_top_k=2)
    elif case == "moe router shape":  # 3 experts in the config, a router for 4
        bad(tmp_path, towers, "moe_mlp2x_gelu", moe(), ["router.weight", "[3, 16]"],
            mutate=reshape("router.weight", (4, D)), mm_moe_num_experts=3, mm_moe_top_k=2)
    elif case == "rank 0":
        bad(tmp_path, towers, "lowrank", make_lowrank(2, False), ["mm_lowrank_rank", "= 0", "at least 1"],
            mm_lowrank_rank=0)
    elif case == "rank mismatch":
        bad(tmp_path, towers, "lowrank", make_lowrank(2, False), ["0.weight", "[3, 16]"], mm_lowrank_rank=3)
    elif case == "lowrank missing":
        bad(tmp_path, towers, "lowrank_mlp2x_gelu", make_lowrank(2, True), ["3.bias", "missing"],
            mutate=drop("3.bias"), mm_lowrank_rank=2)
