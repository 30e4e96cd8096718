"""Emu3's VQVAE (issue 16, fusion type D): codes, quant_conv latents and decoded pixels against transformers'
Emu3VQVAE.encode / decode (and Emu3Model.decode_image_tokens) on tiny random models saved with save_pretrained,
both standalone and inside an Emu3ForConditionalGeneration checkpoint; wrong variants computed in torch are far
off; bad inputs fail with clear errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run

transformers = pytest.importorskip("transformers")
from transformers import (Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3VQVAE,  # noqa: E402
                          Emu3VQVAEConfig)
from transformers.models.emu3 import modeling_emu3  # noqa: E402

# GroupNorm has 32 groups: channels 32 and 64. Two levels -> spatial factor 2; attention at level 1 (and in the
# middle blocks) over hidden_size = 64 channels, 2 heads; temporal_downsample_factor 4 -> two time_conv blocks.
VQ = dict(codebook_size=128, embed_dim=8, latent_channels=8, base_channels=32, channel_multiplier=[1, 2],
          num_res_blocks=2, attn_resolutions=[1], hidden_size=64, num_attention_heads=2,
          temporal_downsample_factor=4)
H, W = 32, 48  # not square, so a transposed grid shows


def scaled_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def randomize_norms(m, seed):
    """GroupNorm / BatchNorm3d affine weights and BatchNorm running statistics away from their 1/0 defaults,
    so that each is seen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.BatchNorm3d)):
                mod.weight.copy_(1 + 0.2 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g))
            if isinstance(mod, torch.nn.BatchNorm3d):
                mod.running_mean.copy_(0.2 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))


def make_vq(seed=0, **over):
    torch.manual_seed(seed)
    m = Emu3VQVAE(Emu3VQVAEConfig(**{**VQ, **over})).eval()
    randomize_norms(m, seed + 1)
    return m


def save_vq(m, d):
    """save_pretrained, plus the image processor decode-vq's postprocess reads."""
    m.save_pretrained(d)
    Emu3ImageProcessor(spatial_factor=2).save_pretrained(d)


@pytest.fixture(scope="module")
def vq(tmp_path_factory):
    """(model, standalone dir, full Emu3ForConditionalGeneration dir)."""
    m = make_vq()
    d = tmp_path_factory.mktemp("emu3vq")
    save_vq(m, d / "vq")
    vocab = {f"<|visual token{i:06d}|>": 10 + i for i in range(VQ["codebook_size"])}
    vocab.update({"<|extra_200|>": 5, "<image>": 6})
    cfg = Emu3Config(vq_config=VQ, vocabulary_map=vocab,
                     text_config=dict(vocab_size=10 + VQ["codebook_size"], hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    torch.manual_seed(7)
    full = Emu3ForConditionalGeneration(cfg).eval()
    full.model.vqmodel.load_state_dict(m.state_dict())
    full.save_pretrained(d / "full")
    Emu3ImageProcessor(spatial_factor=2).save_pretrained(d / "full")
    # transformers 5 saves the whole model's VQ under vqmodel.*; older checkpoints have model.vqmodel.*
    old = d / "full_old_layout"
    old.mkdir()
    t = load_file(str(d / "full" / "model.safetensors"))
    save_file({("model." + k if k.startswith("vqmodel.") else k): v for k, v in t.items()},
              str(old / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "preprocessor_config.json"):
        (old / f).write_text((d / "full" / f).read_text())
    return m, d / "vq", d / "full", full


def pixels(batch=2, h=H, w=W, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 2 - 1


def torch_encode(m, x):
    """transformers' image tokens and the quant_conv output (batch, embed_dim, h, w) of Emu3VQVAE.encode."""
    with torch.no_grad():
        out = m.encode(x, torch.tensor([list(x.shape[-2:])] * x.shape[0]))
        codes = torch.stack(out.image_tokens)
        lat = m.quant_conv(out.last_hidden_state.permute(0, 2, 1, 3, 4)).permute(0, 2, 1, 3, 4)[:, 0]
    return codes.numpy(), lat.numpy()


# ---- mmbridge through the CLI -------------------------------------------------------------------------

def mmb_encode(model, x, tmp_path, check=True):
    pf, of = tmp_path / "pixels.safetensors", tmp_path / "codes.safetensors"
    save_file({"pixel_values": x.contiguous()}, str(pf))
    p = run("encode", model, "--vq", "--latents", "--pixels", pf, "-o", of, "--threads", 2, check=check)
    if not check:
        return p
    t = load_file(str(of))
    return t["codes"].numpy(), t["latents"].numpy()


def mmb_decode(model, codes, tmp_path, check=True):
    """decode-vq: the raw decoder output (--pixels-out); the PNGs go to tmp_path/out.png (out-{i}.png for several)."""
    cf, of = tmp_path / "in_codes.safetensors", tmp_path / "decoded.safetensors"
    save_file({"codes": torch.as_tensor(np.asarray(codes)).to(torch.int32).contiguous()}, str(cf))
    p = run("decode-vq", model, cf, "-o", tmp_path / "out.png", "--pixels-out", of, "--threads", 2, check=check)
    if not check:
        return p
    return load_file(str(of))["pixels"].numpy()


# ---- tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["vq", "full", "full_old_layout"])
def test_encode_codes_and_latents(vq, tmp_path, which):
    m, d_vq, d_full, _ = vq
    x = pixels()
    codes, lat = torch_encode(m, x)
    got_codes, got_lat = mmb_encode({"vq": d_vq, "full": d_full, "full_old_layout": d_full.parent / which}[which], x,
                                    tmp_path)
    assert got_codes.shape == codes.shape and got_lat.shape == lat.shape
    assert scaled_err(got_lat, lat) < 1e-4, scaled_err(got_lat, lat)
    np.testing.assert_array_equal(got_codes, codes)
    assert len(np.unique(codes)) > 10  # the codes are not all one


@pytest.mark.parametrize("which", ["vq", "full"])
def test_decode_pixels(vq, tmp_path, which):
    m, d_vq, d_full, full = vq
    codes, _ = torch_encode(m, pixels())
    with torch.no_grad():
        ref = m.decode(torch.as_tensor(codes)).numpy()
    got = mmb_decode(d_vq if which == "vq" else d_full, codes, tmp_path)
    assert got.shape == ref.shape == (2, 3, H, W)
    assert scaled_err(got, ref) < 1e-4, scaled_err(got, ref)
    ip = Emu3ImageProcessor(spatial_factor=2)  # the PNGs: the processor's postprocess of transformers' output
    for i in range(2):
        want = np.asarray(ip.postprocess([torch.as_tensor(ref[i])], return_tensors="PIL.Image.Image")["pixel_values"][0])
        png = np.asarray(Image.open(tmp_path / f"out-{i}.png").convert("RGB"))
        assert png.shape == want.shape and np.abs(png.astype(int) - want).max() <= 1  # 1e-4 off may round apart
        assert (png != want).mean() < 1e-3
    if which == "full":  # the same through Emu3Model.decode_image_tokens (BPE ids, an EOL column, 3 tail ids)
        vm = full.model.vocabulary_mapping
        bpe = vm.convert_img2bpe(torch.as_tensor(codes).flatten(0, 0).reshape(-1, codes.shape[-1]))
        bpe = bpe.reshape(codes.shape[0], -1)
        bpe = torch.cat([bpe, torch.zeros(codes.shape[0], 3, dtype=bpe.dtype)], dim=1)
        with torch.no_grad():
            ref2 = full.model.decode_image_tokens(bpe, height=codes.shape[1], width=codes.shape[2]).numpy()
        assert scaled_err(got, ref2) < 1e-4, scaled_err(got, ref2)


def test_square_and_single_image(vq, tmp_path):
    """One 32x32 image: batch 1, a square grid, the same results."""
    m, d_vq, _, _ = vq
    x = pixels(1, 32, 32, seed=5)
    codes, lat = torch_encode(m, x)
    got_codes, got_lat = mmb_encode(d_vq, x, tmp_path)
    np.testing.assert_array_equal(got_codes, codes)
    assert scaled_err(got_lat, lat) < 1e-4
    with torch.no_grad():
        ref = m.decode(torch.as_tensor(codes)).numpy()
    assert scaled_err(mmb_decode(d_vq, codes, tmp_path), ref) < 1e-4


@pytest.mark.parametrize("tdf", [1, 2])
def test_other_temporal_factors(tmp_path, tdf):
    """temporal_downsample_factor 1 (no time_conv) and 2 (one), against transformers too."""
    m = make_vq(seed=11, temporal_downsample_factor=tdf)
    save_vq(m, tmp_path / "m")
    x = pixels(1, 32, 32, seed=9)
    codes, lat = torch_encode(m, x)
    got_codes, got_lat = mmb_encode(tmp_path / "m", x, tmp_path)
    np.testing.assert_array_equal(got_codes, codes)
    assert scaled_err(got_lat, lat) < 1e-4
    with torch.no_grad():
        ref = m.decode(torch.as_tensor(codes)).numpy()
    assert scaled_err(mmb_decode(tmp_path / "m", codes, tmp_path), ref) < 1e-4


# ---- wrong variants, computed in torch, are far off ---------------------------------------------------

def _symmetric_time_padding(m):
    for mod in m.modules():
        if isinstance(mod, modeling_emu3.Emu3VQVAEConv3d):
            kt = mod.conv.kernel_size[0]
            mod.padding = mod.padding[:-2] + ((kt - 1) // 2 + (kt - 1) % 2, (kt - 1) // 2)


def test_wrong_variants_are_far_off(vq, tmp_path):
    m, d_vq, _, _ = vq
    x = pixels()
    got_codes, got_lat = mmb_encode(d_vq, x, tmp_path)
    codes, _ = torch_encode(m, x)
    got_px = mmb_decode(d_vq, codes, tmp_path)

    sym = make_vq()  # the same weights (same seeds), symmetric time padding in every Conv3d
    _symmetric_time_padding(sym)
    wcodes, wlat = torch_encode(sym, x)
    assert scaled_err(got_lat, wlat) > 1e-2, scaled_err(got_lat, wlat)
    assert (wcodes != got_codes).mean() > 0.1
    with torch.no_grad():
        wpx = sym.decode(torch.as_tensor(codes)).numpy()
    assert scaled_err(got_px, wpx) > 1e-2

    plain = make_vq()  # SpatialNorm without the zq modulation: GroupNorm alone
    orig = modeling_emu3.Emu3VQVAESpatialNorm.forward
    try:
        modeling_emu3.Emu3VQVAESpatialNorm.forward = lambda self, h, q: self.norm_layer(h)
        with torch.no_grad():
            wpx = plain.decode(torch.as_tensor(codes)).numpy()
    finally:
        modeling_emu3.Emu3VQVAESpatialNorm.forward = orig
    assert scaled_err(got_px, wpx) > 1e-2, scaled_err(got_px, wpx)

    with torch.no_grad():  # zq not through the decoder's temporal stack: the raw embedding modulates
        q = m.quantize.embedding(torch.as_tensor(codes).flatten()).view(*codes.shape, -1).permute(0, 3, 1, 2)
        hq = m.post_quant_conv(q[:, :, None])  # (batch, latent, 1, h, w)
        for layer in m.decoder.time_res_stack:
            hq = layer(hq)
        for layer in m.decoder.time_conv:
            hq = layer(hq)
            hq = hq * torch.sigmoid(hq)
        hid = hq[:, :, 0]
        d = m.decoder
        h = d.up_block(d.middle_block(d.conv_in(hid), q), q)
        h = d.norm_out(h, q)
        wpx = d.conv_out(h * torch.sigmoid(h)).numpy()
    assert scaled_err(got_px, wpx) > 1e-2, scaled_err(got_px, wpx)


# ---- bad input ----------------------------------------------------------------------------------------

def test_codes_outside_the_codebook(vq, tmp_path):
    _, d_vq, _, _ = vq
    codes = np.zeros((1, 4, 4), dtype=np.int32)
    codes[0, 2, 3] = VQ["codebook_size"]
    p = mmb_decode(d_vq, codes, tmp_path, check=False)
    assert p.returncode != 0 and "outside the codebook" in p.stderr, p.stderr
    codes[0, 2, 3] = -1
    p = mmb_decode(d_vq, codes, tmp_path, check=False)
    assert p.returncode != 0 and "outside the codebook" in p.stderr, p.stderr


def test_image_size_not_a_multiple(vq, tmp_path):
    _, d_vq, _, _ = vq
    p = mmb_encode(d_vq, pixels(1, 32, 33), tmp_path, check=False)
    assert p.returncode != 0 and "multiple" in p.stderr, p.stderr


def test_codebook_of_the_wrong_width(vq, tmp_path):
    _, d_vq, _, _ = vq
    bad = tmp_path / "bad"
    bad.mkdir()
    t = load_file(str(d_vq / "model.safetensors"))
    t["quantize.embedding.weight"] = t["quantize.embedding.weight"][:, :-1].contiguous()
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    for f in ("config.json", "preprocessor_config.json"):
        (bad / f).write_text((d_vq / f).read_text())
    p = mmb_encode(bad, pixels(1, 32, 32), tmp_path, check=False)
    assert p.returncode != 0 and "quantize.embedding.weight" in p.stderr, p.stderr


def test_embed_dim_not_latent_channels_refused(tmp_path):
    """torch's decoder cannot run such a model (it concatenates post_quant and quant); mmbridge refuses it at
    load, naming the keys."""
    m = make_vq(seed=2)
    save_vq(m, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["embed_dim"] = 4
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    p = mmb_encode(tmp_path / "m", pixels(1, 32, 32), tmp_path, check=False)
    assert p.returncode != 0 and "embed_dim" in p.stderr, p.stderr
