"""An independent torch reference of OpenFlamingo (mlfoundations/open_flamingo: open_flamingo/src/helpers.py,
flamingo.py, flamingo_lm.py), written here from those files' semantics, and the checkpoint directory
convention mmbridge reads for it (docs/decisions.md "OpenFlamingo checkpoints").

The model, as Flamingo.forward runs it on one sample:
  vision   CLIPVisionModel (transformers; open_clip's ViT with the same weights) -> hidden_states[-1]
           (= last_hidden_state: CLIP has no norm after its blocks) -> vision_feature "patch_ln_post": through
           post_layernorm (open_clip >= 2.23's ln_post on every token), "patch": as it is (older open_clip, the
           released models) -> drop CLS -> vision_x (b, T_img, F=1, v, d) -> PerceiverResampler -> media
           (b, T_img, num_latents, vis_dim)
  text     LlamaForCausalLM whose decoder layer idx runs a GatedCrossAttentionBlock first when
           (idx + 1) % cross_attn_every_n_layers == 0 (FlamingoLayer); the block reads the media and
           media_locations = input_ids == <image> (text_time = cumsum, eq or ge against media_time = 1..T_img,
           masked scores = -finfo.max, row-max subtraction, softmax; only_attend_immediate_media zeroes the
           attention of tokens before the first image); its output is x + tanh(attn_gate) * attn(x) then
           + tanh(ff_gate) * ff(x).
  generate Flamingo.generate caches the media: the prompt's forward conditions media_locations from the prompt;
           each later single-token forward without an <image> has use_cached_media, so its text_time is the
           number of <image> tokens in the prompt (count_nonzero of the kept media_locations).

Entry points (float32, eval mode, no gradients):
  make_open_flamingo(d, ...) -> OpenFlamingoRef   builds a random tiny model and saves it under d
  load_open_flamingo(d) -> OpenFlamingoRef        rebuilds the reference from a saved (or converted) directory
  ref_vision(model, pixel_values) -> (n_images, num_latents, vis_dim)
  ref_logits(model, pixel_values, input_ids) -> (len(input_ids), vocab)
  ref_greedy(model, pixel_values, input_ids, n, stop_ids=()) -> [token ids]
  plain_llama(model) -> LlamaForCausalLM          the same decoder without the gated blocks
  trainable_state_dict(model) -> {name: tensor}   what OpenFlamingo's train script saves (checkpoint.pt)
"""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# ---- helpers.py's modules --------------------------------------------------------------------------------


def FeedForward(dim, mult=4):
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def _heads(t, h):
    """(..., n, h*d) -> (..., h, n, d)"""
    return t.reshape(*t.shape[:-1], h, -1).transpose(-3, -2)


def _merge(t):
    """(..., h, n, d) -> (..., n, h*d)"""
    t = t.transpose(-3, -2)
    return t.reshape(*t.shape[:-2], -1)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim, dim_head=64, heads=8):
        super().__init__()
        self.scale, self.heads = dim_head ** -0.5, heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        """x (b, T, n1, D) media, latents (b, T, n2, D): keys and values from [x; latents]."""
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = _heads(q, self.heads) * self.scale, _heads(k, self.heads), _heads(v, self.heads)
        sim = q @ k.transpose(-1, -2)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        return self.to_out(_merge(sim.softmax(dim=-1) @ v))


class PerceiverResampler(nn.Module):
    def __init__(self, *, dim, depth=6, dim_head=64, heads=8, num_latents=64, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        # Flamingo builds its resampler with max_num_media = max_num_frames = None: no time or frame embeddings
        self.layers = nn.ModuleList([nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                                                    FeedForward(dim, ff_mult)]) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        """x (b, T, F, v, D) -> (b, T, num_latents, D)"""
        b, T, F, v, D = x.shape
        x = x.reshape(b, T, F * v, D)
        latents = self.latents.expand(b, T, *self.latents.shape)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8, only_attend_immediate_media=True):
        super().__init__()
        self.scale, self.heads = dim_head ** -0.5, heads
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media

    def forward(self, x, media, media_locations=None, use_cached_media=False):
        """x (B, T_txt, D_txt), media (B, T_img, n, D_img), media_locations (B, T_txt) bool (with
        use_cached_media: the mask of an earlier forward; every row of x then comes after all its images)."""
        T_txt = x.shape[1]
        B, T_img, n = media.shape[:3]
        h = self.heads
        x = self.norm(x)
        q = self.to_q(x)
        k, v = self.to_kv(media.reshape(B, T_img * n, -1)).chunk(2, dim=-1)
        q, k, v = _heads(q, h) * self.scale, _heads(k, h), _heads(v, h)
        sim = q @ k.transpose(-1, -2)  # (B, h, T_txt, T_img * n)
        if media_locations is not None:
            media_time = torch.arange(T_img) + 1
            if use_cached_media:
                text_time = torch.count_nonzero(media_locations, dim=1)[:, None].expand(B, T_txt)
            else:
                text_time = media_locations.cumsum(dim=-1)
            op = torch.eq if self.only_attend_immediate_media else torch.ge
            mask = op(text_time[:, None, :, None], media_time.repeat_interleave(n)[None, None, None, :])
            sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        if media_locations is not None and self.only_attend_immediate_media:
            attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        return self.to_out(_merge(attn @ v))


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8, ff_mult=4, only_attend_immediate_media=True):
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads,
                                         only_attend_immediate_media=only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = FeedForward(dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x, media, media_locations=None, use_cached_media=False):
        x = self.attn(x, media, media_locations=media_locations, use_cached_media=use_cached_media) \
            * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


# ---- flamingo_lm.py: the gated block before the decoder layer -----------------------------------------------


class FlamingoLayer(nn.Module):
    def __init__(self, gated_cross_attn_layer, decoder_layer):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.vis_x = self.media_locations = None
        self.use_cached_media = False

    def is_conditioned(self):
        return self.vis_x is not None and self.media_locations is not None

    def forward(self, hidden_states, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            if self.vis_x is None or self.media_locations is None:
                raise ValueError("the Flamingo layer is not conditioned on media")
            hidden_states = self.gated_cross_attn_layer(hidden_states, self.vis_x, media_locations=self.media_locations,
                                                        use_cached_media=self.use_cached_media)
        return self.decoder_layer(hidden_states, *args, **kwargs)


class OpenFlamingoRef(nn.Module):
    """Flamingo with a CLIPVisionModel tower and a LlamaForCausalLM lang_encoder (float32, eval)."""

    def __init__(self, tower, lm, *, vis_dim, n_every, immediate, vision_feature, image_token_id, eoc_token_id,
                 perceiver, xattn):
        super().__init__()
        self.vision_encoder = tower
        self.perceiver = PerceiverResampler(dim=vis_dim, **perceiver)
        self.lang_encoder = lm
        self.vis_dim, self.n_every, self.immediate = vis_dim, n_every, immediate
        self.vision_feature, self.media_token_id, self.eoc_token_id = vision_feature, image_token_id, eoc_token_id
        self.perceiver_cfg, self.xattn_cfg = dict(perceiver), dict(xattn)
        d_txt = lm.config.hidden_size
        # FlamingoLMMixin.init_flamingo: the list holds None where a layer has no block; FlamingoLayer holds the
        # same module, so its parameters have two names, as in OpenFlamingo's state dict
        lm.gated_cross_attn_layers = nn.ModuleList([
            GatedCrossAttentionBlock(dim=d_txt, dim_visual=vis_dim, dim_head=xattn["dim_head"], heads=xattn["heads"],
                                     ff_mult=xattn["ff_mult"], only_attend_immediate_media=immediate)
            if (i + 1) % n_every == 0 else None for i in range(lm.config.num_hidden_layers)])
        lm.model.layers = nn.ModuleList([FlamingoLayer(g, layer) for g, layer in
                                         zip(lm.gated_cross_attn_layers, lm.model.layers)])
        self.eval()

    @property
    def flamingo_layers(self):
        return list(self.lang_encoder.model.layers)

    def blocks(self):
        """{decoder layer index: GatedCrossAttentionBlock}"""
        return {i: g for i, g in enumerate(self.lang_encoder.gated_cross_attn_layers) if g is not None}

    def condition(self, media, media_locations=None, use_cached_media=False):
        for layer in self.flamingo_layers:
            if media is not None:
                layer.vis_x = media
            if not use_cached_media:
                layer.media_locations = media_locations
            layer.use_cached_media = use_cached_media

    def clear(self):
        for layer in self.flamingo_layers:
            layer.vis_x = layer.media_locations = None
            layer.use_cached_media = False


# ---- the reference's entry points ---------------------------------------------------------------------------


def _pixels(pixel_values):
    px = torch.as_tensor(pixel_values, dtype=torch.float32)
    return px[None] if px.ndim == 3 else px


def _ids(input_ids):
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    return ids[None] if ids.ndim == 1 else ids


def vision_features(model, pixel_values):
    """What open_clip's visual(x, output_tokens=True)[1] hands the resampler: (n, patches, vis_dim)."""
    with torch.no_grad():
        out = model.vision_encoder(pixel_values=_pixels(pixel_values), output_hidden_states=True)
        h = out.hidden_states[-1]
        if model.vision_feature == "patch_ln_post":
            enc = model.vision_encoder  # transformers 5's CLIPVisionModel holds its layers; 4.x's, vision_model
            h = getattr(enc, "vision_model", enc).post_layernorm(h)
        elif model.vision_feature != "patch":
            raise ValueError(f"vision_feature {model.vision_feature!r}")
        return h[:, 1:]


def _media(model, pixel_values):
    """Flamingo._encode_vision_x for one sample holding every image: (1, n, num_latents, vis_dim)."""
    feats = vision_features(model, pixel_values)
    with torch.no_grad():
        return model.perceiver(feats[None, :, None])


def ref_vision(model, pixel_values):
    """pixel_values (n, 3, H, W) -> the resampler's output (n, num_latents, vis_dim)."""
    return _media(model, pixel_values)[0]


def ref_logits(model, pixel_values, input_ids):
    """Flamingo.forward(vision_x = the n images (n, 3, H, W) of one sample, lang_x = input_ids): every position's
    logits (len(input_ids), vocab). For text alone use plain_llama (OpenFlamingo always takes vision_x)."""
    ids = _ids(input_ids)
    media = _media(model, pixel_values)
    model.condition(media, ids == model.media_token_id)
    try:
        with torch.no_grad():
            return model.lang_encoder(input_ids=ids).logits[0]
    finally:
        model.clear()


def ref_greedy(model, pixel_values, input_ids, n, stop_ids=()):
    """Flamingo.generate's greedy decoding (cached media, KV cache): up to n new tokens; stops after appending
    one of stop_ids (which is then the last token returned)."""
    ids = _ids(input_ids)
    media = _media(model, pixel_values)
    out, past = [], None
    model.condition(media, None)
    try:
        with torch.no_grad():
            step = ids
            for _ in range(n):
                locs = step == model.media_token_id
                # FlamingoLMMixin.forward: cached media when the layers hold a mask already and the input has no
                # <image>; otherwise the input's own mask
                cached = all(layer.is_conditioned() for layer in model.flamingo_layers) and not bool(locs.any())
                model.condition(None, locs, use_cached_media=cached)
                res = model.lang_encoder(input_ids=step, past_key_values=past, use_cache=True)
                past = res.past_key_values
                tok = int(res.logits[0, -1].argmax())
                out.append(tok)
                if tok in stop_ids:
                    break
                step = torch.tensor([[tok]])
    finally:
        model.clear()
    return out


def plain_llama(model):
    """A LlamaForCausalLM with model's decoder weights and no gated blocks."""
    from transformers import LlamaForCausalLM
    lm = model.lang_encoder
    plain = LlamaForCausalLM(lm.config).eval()
    sd = {}
    for k, v in lm.state_dict().items():
        if "gated_cross_attn_layer" in k:
            continue
        sd[k.replace(".decoder_layer.", ".")] = v
    plain.load_state_dict(sd, strict=True)
    return plain


# ---- the checkpoint convention ------------------------------------------------------------------------------


def flamingo_state_dict(model):
    """model.safetensors' tensors: perceiver.*, lang_encoder.* as OpenFlamingo names them, the gated blocks once,
    as lang_encoder.gated_cross_attn_layers.{decoder layer index}.*"""
    sd = {"perceiver." + k: v for k, v in model.perceiver.state_dict().items()}
    for k, v in model.lang_encoder.state_dict().items():
        if ".gated_cross_attn_layer." in k:  # the same tensors as gated_cross_attn_layers.{i}.*
            continue
        sd["lang_encoder." + k] = v
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def trainable_state_dict(model, both_names=True, wrapped=False):
    """What OpenFlamingo's train script saves (filter_state_dict_to_trainable): the perceiver, the gated blocks
    (as lang_encoder.model.layers.{i}.gated_cross_attn_layer.*; also as lang_encoder.gated_cross_attn_layers.{i}.*
    when both_names, as a model.state_dict() holds them) and the input embeddings. wrapped: as a training
    checkpoint ({"model_state_dict": {"module." + name: ...}, "epoch": ...})."""
    sd = {"perceiver." + k: v for k, v in model.perceiver.state_dict().items()}
    for k, v in model.lang_encoder.state_dict().items():
        if ".gated_cross_attn_layer." in k or (both_names and k.startswith("gated_cross_attn_layers.")) or \
                "embed_tokens" in k:
            sd["lang_encoder." + k] = v
    sd = {k: v.detach().clone() for k, v in sd.items()}
    if wrapped:
        return {"epoch": 0, "model_state_dict": {"module." + k: v for k, v in sd.items()}}
    return sd


def flamingo_config(model, vision_tower="vision_tower"):
    b = model.xattn_cfg
    return {
        "architectures": ["OpenFlamingo"], "model_type": "open_flamingo",
        "cross_attn_every_n_layers": model.n_every, "only_attend_immediate_media": model.immediate,
        "image_token_id": model.media_token_id, "end_of_chunk_token_id": model.eoc_token_id,
        "xattn_heads": b["heads"], "xattn_dim_head": b["dim_head"], "xattn_ff_mult": b["ff_mult"],
        "vis_dim": model.vis_dim, "vision_tower": vision_tower, "vision_feature": model.vision_feature,
        "perceiver": dict(model.perceiver_cfg), "text_config": model.lang_encoder.config.to_dict(),
    }


def base_tokenizer():
    """A tiny byte-level BPE (eos <|endoftext|>) as a transformers tokenizer, before OpenFlamingo's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["An image of a cat on a mat.", "Output: a dog in the park.", "Question: what is it? Answer: a bird.",
              "The quick brown fox jumps over the lazy dog."] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def add_flamingo_tokens(tok):
    """factory.create_model_and_transforms: <|endofchunk|> and <image> as additional special tokens, <PAD> when
    the tokenizer has no pad token. Returns (image id, end-of-chunk id)."""
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    return tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<|endofchunk|>")


TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
             patch_size=14)  # 2x2 patches + CLS
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
PERCEIVER = dict(depth=2, heads=2, dim_head=8, num_latents=3, ff_mult=2)
XATTN = dict(heads=2, dim_head=8, ff_mult=2)


def _randomize(module, g, scale):
    """Norms away from 1 and 0, other weights large enough that every layer matters; the gates are left alone."""
    with torch.no_grad():
        for mname, mod in module.named_modules():
            norm = isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm")
            for pname, p in mod.named_parameters(recurse=False):
                name = f"{mname}.{pname}"
                if pname.endswith("_gate"):
                    continue
                if norm:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5 if pname == "weight" else
                            torch.randn(p.shape, generator=g) * 0.1)
                elif "latents" in pname:
                    p.copy_(torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embed" in name else scale))


def make_open_flamingo(d, *, n_every=1, immediate=True, vision_feature="patch", gates="random", seed=0,
                       tower=None, text=None, perceiver=None, xattn=None, vision_tower="vision_tower"):
    """A random OpenFlamingo saved under d in mmbridge's convention (config.json, model.safetensors, tokenizer,
    the CLIP tower with its preprocessor_config.json in d/vision_tower). gates: "random" (each block's attn_gate
    and ff_gate drawn with |g| in [0.4, 1.2], random sign), or (attn, ff) for every block ((0, 0): the blocks are
    the identity). tower, text, perceiver, xattn: overrides of TOWER, TEXT, PERCEIVER, XATTN. Returns the
    OpenFlamingoRef (its .dir is d, .tokenizer the tokenizer)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tcfg, xcfg = dict(TOWER, **(tower or {})), dict(XATTN, **(xattn or {}))
    pcfg = dict(PERCEIVER, **(perceiver or {}))
    tok = base_tokenizer()
    img_id, eoc_id = add_flamingo_tokens(tok)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clip = CLIPVisionModel(CLIPVisionConfig(**tcfg)).eval()
    _randomize(clip, g, 0.1)
    lcfg = LlamaConfig(**dict(TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, bos_token_id=None, **(text or {})))
    lcfg._attn_implementation = "eager"
    lm = LlamaForCausalLM(lcfg).eval()
    _randomize(lm, g, 0.12)
    model = OpenFlamingoRef(clip, lm, vis_dim=tcfg["hidden_size"], n_every=n_every, immediate=immediate,
                            vision_feature=vision_feature, image_token_id=img_id, eoc_token_id=eoc_id,
                            perceiver=pcfg, xattn=xcfg)
    _randomize(model.perceiver, g, 0.15)
    for blk in model.blocks().values():
        _randomize(blk, g, 0.15)
        with torch.no_grad():
            for gate in (blk.attn_gate, blk.ff_gate):
                if gates == "random":
                    mag = torch.rand(1, generator=g) * 0.8 + 0.4
                    gate.copy_(mag * (1 if torch.rand(1, generator=g) < 0.5 else -1))
                else:
                    gate.fill_(float(gates[0] if gate is blk.attn_gate else gates[1]))
    model.eval()
    save_open_flamingo(model, d, tok, vision_tower)
    return model


def save_open_flamingo(model, d, tok, vision_tower="vision_tower"):
    from transformers import CLIPImageProcessor
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    S = model.vision_encoder.config.image_size
    tdir = d / vision_tower
    model.vision_encoder.save_pretrained(tdir, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}).save_pretrained(tdir)
    save_file(flamingo_state_dict(model), str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(flamingo_config(model, vision_tower), indent=2))
    tok.save_pretrained(d)
    model.dir, model.tokenizer = d, tok


def load_open_flamingo(d):
    """The reference model of a directory in the convention (written by make_open_flamingo or the converter)."""
    from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    d = Path(d)
    cfg = json.loads((d / "config.json").read_text())
    tc = dict(cfg["text_config"])
    tc.pop("model_type", None)
    lcfg = LlamaConfig(**tc)
    lcfg._attn_implementation = "eager"
    lm = LlamaForCausalLM(lcfg).eval()
    tower = CLIPVisionModel.from_pretrained(d / cfg.get("vision_tower", "vision_tower"), torch_dtype=torch.float32)
    tower.eval()
    p = dict(PERCEIVER_DEFAULTS, **cfg.get("perceiver", {}))
    model = OpenFlamingoRef(tower, lm, vis_dim=cfg["vis_dim"], n_every=cfg["cross_attn_every_n_layers"],
                            immediate=cfg["only_attend_immediate_media"],
                            vision_feature=cfg.get("vision_feature", "patch"), image_token_id=cfg["image_token_id"],
                            eoc_token_id=cfg["end_of_chunk_token_id"], perceiver=p,
                            xattn=dict(heads=cfg["xattn_heads"], dim_head=cfg["xattn_dim_head"],
                                       ff_mult=cfg["xattn_ff_mult"]))
    sd = {k: v.float() for k, v in load_file(str(d / "model.safetensors")).items()}
    model.perceiver.load_state_dict({k[len("perceiver."):]: v for k, v in sd.items() if k.startswith("perceiver.")},
                                    strict=True)
    lsd = {k[len("lang_encoder."):]: v for k, v in sd.items() if k.startswith("lang_encoder.")}
    for k in list(lsd):  # FlamingoLayer's second name for each block
        if k.startswith("gated_cross_attn_layers."):
            i, rest = k[len("gated_cross_attn_layers."):].split(".", 1)
            lsd[f"model.layers.{i}.gated_cross_attn_layer.{rest}"] = lsd[k]
    missing, unexpected = model.lang_encoder.load_state_dict(lsd, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{d}: missing {missing}, unexpected {unexpected}")
    model.eval()
    model.dir = d
    model.tokenizer = PreTrainedTokenizerFast.from_pretrained(d)
    return model


PERCEIVER_DEFAULTS = dict(depth=6, heads=8, dim_head=64, num_latents=64, ff_mult=4)
