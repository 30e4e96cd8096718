"""Fusion type A, OpenFlamingo: `mmbridge generate` on checkpoints in OpenFlamingo's own state-dict names
(lang_encoder.gated_cross_attn_layers.{i}.*, lang_encoder.model.layers.{i}.decoder_layer.*) against the
independent torch reference written from open_flamingo/src/helpers.py and flamingo_lm.py (flamingo_ref.py).

Checked: every prompt position's logits with 1 and 2 images and text only, within 1e-4 scaled, for
only_attend_immediate_media true and false and several cross_attn_every_n_layers; 24 greedy tokens identical
(cached media: every new token sees what the prompt's last token saw); positions before the first image
(immediate mode) equal the plain Llama's when the FF gates are 0. Wrong variants (the block after the decoder
layer, no tanh on the gates, every position attending every image) are far off; bad input fails clearly."""
import json
import shutil

import pytest
import torch
from conftest import run, scaled_err, random_images, fails
from flamingo_ref import make_open_flamingo, plain_llama, ref_greedy, ref_logits
from PIL import Image
from safetensors.torch import load_file, save_file


def images(tmp_path, n):
    return random_images(tmp_path, [(30 + 5 * i, 34) for i in range(n)], 9)


def pixels(d, paths):
    from transformers import CLIPImageProcessor
    proc = CLIPImageProcessor.from_pretrained(d / "vision_tower")
    return proc([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]


def ids_of(model, text):
    return model.tokenizer(text, add_special_tokens=True).input_ids


def mmb_logits(d, tmp_path, prompt, paths):
    out = tmp_path / "logits.safetensors"
    imgs = [a for p in paths for a in ("--image", p)]
    p = run("generate", d, "--raw", "--prompt", prompt, *imgs, "-n", 0, "--logits", out, "--threads", 2)
    return load_file(str(out))["logits"], p


PROMPTS = {"1 image": "<image>An image of a cat on a mat.<|endofchunk|>Output:",
           "2 images": "Question: what is it?<image>Answer: a bird.<|endofchunk|><image>Answer:",
           "2 images in a row": "<image><image>An image of"}


@pytest.mark.parametrize("n_every,immediate", [(1, True), (2, False), (2, True), (4, False)])
def test_logits_and_greedy_match_the_reference(tmp_path, n_every, immediate):
    d = tmp_path / "of"
    model = make_open_flamingo(d, n_every=n_every, immediate=immediate)
    paths = images(tmp_path, 2)
    for label, prompt in PROMPTS.items():
        n = prompt.count("<image>")
        got, _ = mmb_logits(d, tmp_path, prompt, paths[:n])
        ref = ref_logits(model, pixels(d, paths[:n]), ids_of(model, prompt))
        err = scaled_err(got, ref)
        print(f"OpenFlamingo every {n_every}, immediate {immediate}, {label}: {ref.shape[0]} positions, "
              f"scaled max err {err:.2e}")
        assert got.shape == ref.shape and err <= 1e-4
    # text only: the reference always takes images; with no <image> in the text and immediate mode no position
    # sees one (the all-media mode would read them: no text-only equivalent there)
    if immediate:
        text = "Question: what is it? Answer: a bird."
        got, _ = mmb_logits(d, tmp_path, text, [])
        ref = ref_logits(model, pixels(d, paths[:1]), ids_of(model, text))
        assert scaled_err(got, ref) <= 1e-4
    prompt = PROMPTS["2 images"]
    want = ref_greedy(model, pixels(d, paths), ids_of(model, prompt), 24)
    p = run("generate", d, "--raw", "--prompt", prompt, "--image", paths[0], "--image", paths[1], "-n", 24,
            "--print-ids", "--ignore-eos", "--threads", 2)
    assert [int(t) for t in p.stdout.split()] == want


def test_positions_before_the_first_image_are_the_plain_llm(tmp_path):
    d = tmp_path / "of"
    model = make_open_flamingo(d, n_every=1, immediate=True, gates="random")
    for blk in model.blocks().values():
        with torch.no_grad():
            blk.ff_gate.zero_()
    from flamingo_ref import save_open_flamingo
    save_open_flamingo(model, d, model.tokenizer)
    paths = images(tmp_path, 1)
    prompt = "Question: what is it?<image>Answer: a bird."
    got, _ = mmb_logits(d, tmp_path, prompt, paths)
    ids = ids_of(model, prompt)
    first = ids.index(model.media_token_id)
    with torch.no_grad():
        plain = plain_llama(model)(input_ids=torch.tensor([ids])).logits[0]
    assert first > 3 and scaled_err(got[:first], plain[:first]) <= 1e-4
    assert scaled_err(got[first:], plain[first:]) > 1e-2


# ---- wrong variants ------------------------------------------------------------------------------------------

def variant_logits(model, px, ids, variant):
    import flamingo_ref as fr
    if variant == "every image":
        old = fr.MaskedCrossAttention.forward

        def every(self, x, media, media_locations=None, use_cached_media=False):
            return old(self, x, media, None, False)
        fr.MaskedCrossAttention.forward = every
        try:
            return ref_logits(model, px, ids)
        finally:
            fr.MaskedCrossAttention.forward = old
    if variant == "no tanh":
        old = fr.GatedCrossAttentionBlock.forward

        def plain(self, x, media, media_locations=None, use_cached_media=False):
            x = self.attn(x, media, media_locations=media_locations, use_cached_media=use_cached_media) \
                * self.attn_gate + x
            return self.ff(x) * self.ff_gate + x
        fr.GatedCrossAttentionBlock.forward = plain
        try:
            return ref_logits(model, px, ids)
        finally:
            fr.GatedCrossAttentionBlock.forward = old
    old = fr.FlamingoLayer.forward  # "after the layer"

    def after(self, hidden_states, *args, **kwargs):
        out = self.decoder_layer(hidden_states, *args, **kwargs)
        if self.gated_cross_attn_layer is None:
            return out
        h = out[0] if isinstance(out, tuple) else out
        h = self.gated_cross_attn_layer(h, self.vis_x, media_locations=self.media_locations,
                                        use_cached_media=self.use_cached_media)
        return (h, *out[1:]) if isinstance(out, tuple) else h
    fr.FlamingoLayer.forward = after
    try:
        return ref_logits(model, px, ids)
    finally:
        fr.FlamingoLayer.forward = old


@pytest.mark.parametrize("variant", ["after the layer", "no tanh", "every image"])
def test_wrong_variants_are_far_off(tmp_path, variant):
    d = tmp_path / "of"
    model = make_open_flamingo(d, n_every=2, immediate=True)
    paths = images(tmp_path, 2)
    prompt = PROMPTS["2 images"]
    got, _ = mmb_logits(d, tmp_path, prompt, paths)
    px, ids = pixels(d, paths), ids_of(model, prompt)
    assert scaled_err(got, ref_logits(model, px, ids)) <= 1e-4
    far = scaled_err(got, variant_logits(model, px, ids, variant))
    print(f"OpenFlamingo, {variant}: scaled max err {far:.3e}")
    assert far > 1e-2


# ---- bad input ---------------------------------------------------------------------------------------------

def test_bad_input(tmp_path):
    d = tmp_path / "of"
    make_open_flamingo(d, n_every=2)
    paths = images(tmp_path, 2)
    fails(["generate", d, "--raw", "--prompt", "<image>a cat", "--image", paths[0], "--image", paths[1], "-n", 1],
          "1 image marker(s)", "2 image(s)")
    kv = tmp_path / "kv"
    shutil.copytree(d, kv)
    t = load_file(str(kv / "model.safetensors"))
    name = "lang_encoder.gated_cross_attn_layers.1.attn.to_kv.weight"
    t[name] = torch.zeros(t[name].shape[0], t[name].shape[1] + 8)
    save_file(t, str(kv / "model.safetensors"))
    fails(["info", kv], name, "-wide visual tokens")
    gate = tmp_path / "gate"
    shutil.copytree(d, gate)
    t = load_file(str(gate / "model.safetensors"))
    t["lang_encoder.gated_cross_attn_layers.3.ff_gate"] = torch.zeros(2)
    save_file(t, str(gate / "model.safetensors"))
    fails(["info", gate], "ff_gate", "[1]")
    cfg = json.loads((d / "config.json").read_text())
    every = tmp_path / "every"
    shutil.copytree(d, every)
    (every / "config.json").write_text(json.dumps(dict(cfg, cross_attn_every_n_layers=1)))
    fails(["info", every], "lang_encoder.gated_cross_attn_layers.0.", "missing")


def test_generation_stops_at_the_end_of_chunk(tmp_path):
    """Flamingo.generate's eos_token_id defaults to <|endofchunk|>: made here the id greedy decoding reaches
    fifth, so the stop is seen."""
    d = tmp_path / "of"
    model = make_open_flamingo(d, n_every=1)
    paths = images(tmp_path, 1)
    prompt = PROMPTS["1 image"]
    full = ref_greedy(model, pixels(d, paths), ids_of(model, prompt), 24)
    stop = full[4]
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, end_of_chunk_token_id=stop)))
    p = run("generate", d, "--raw", "--prompt", prompt, "--image", paths[0], "-n", 24, "--print-ids", "--threads", 2)
    got = [int(t) for t in p.stdout.split()]
    assert got == full[:full.index(stop) + 1]
