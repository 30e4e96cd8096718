#!/usr/bin/env python3
"""Regenerates the seed corpora fuzz/corpus/safetensors and fuzz/corpus/config (stdlib only).
Run from anywhere: python3 fuzz/make_corpus.py"""
import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent


def st(header, data=b"", pad=True):
    """A safetensors file from a header dict and the raw data section."""
    h = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def raw(header_bytes, data=b""):
    """A safetensors file from header bytes given verbatim (JSON that json.dumps cannot write)."""
    return struct.pack("<Q", len(header_bytes)) + header_bytes + data


def f32(n, start=0.0):
    return b"".join(struct.pack("<f", start + 0.25 * i) for i in range(n))


def entry(dtype, shape, b, e):
    return {"dtype": dtype, "shape": shape, "data_offsets": [b, e]}


def safetensors_seeds():
    P = "model.multi_modal_projector."
    llava = {P + "linear_1.weight": entry("F32", [4, 2], 0, 32), P + "linear_1.bias": entry("F32", [4], 32, 48),
             P + "linear_2.weight": entry("F16", [2, 4], 48, 64), P + "linear_2.bias": entry("BF16", [2], 64, 68),
             "__metadata__": {"format": "pt"}}
    yield "llava_tiny", st(llava, f32(12) + bytes(range(20)))
    yield "features", st({"hidden_states.0": entry("F32", [1, 3, 2], 0, 24),
                          "hidden_states.1": entry("F32", [1, 3, 2], 24, 48),
                          "__metadata__": {"n_hidden_states": "2"}}, f32(12))
    yield "every_dtype", st({
        "a": entry("F64", [1], 0, 8), "b": entry("I64", [1], 8, 16), "c": entry("I32", [1], 16, 20),
        "d": entry("I16", [1], 20, 22), "e": entry("I8", [1], 22, 23), "f": entry("U8", [1], 23, 24),
        "g": entry("BOOL", [1], 24, 25), "h": entry("U16", [1], 26, 28), "i": entry("U32", [1], 28, 32),
        "j": entry("U64", [1], 32, 40), "k": entry("F8_E4M3", [2], 40, 42), "l": entry("F8_E5M2", [2], 42, 44),
        "m": entry("F16", [2], 44, 48), "n": entry("BF16", [2], 48, 52), "o": entry("F32", [], 52, 56)},
        bytes(range(56)))
    yield "empty_tensors", st({"z": entry("F32", [0, 4], 0, 0), "y": entry("F32", [2], 0, 8)}, f32(2))
    yield "empty_header", st({})
    # valid, but with an odd header length: every tensor is misaligned in the mapping
    yield "misaligned", st({"a": entry("F32", [2], 0, 8), "b": entry("F16", [3], 8, 14),
                            "c": entry("F32", [1], 14, 18)}, f32(2) + bytes(6) + f32(1), pad=False)
    # slightly broken
    yield "overlap", st({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, f32(3))
    yield "past_eof", st({"a": entry("F32", [4], 0, 16)}, f32(2))
    yield "bad_dtype", st({"a": entry("F33", [2], 0, 8)}, f32(2))
    yield "shape_mismatch", st({"a": entry("F32", [3], 0, 8)}, f32(2))
    yield "begin_gt_end", st({"a": entry("F32", [0], 8, 4)}, f32(2))
    yield "dup_metadata", raw(b'{"__metadata__":{"a":"1","b":"2"},"__metadata__":{"c":"3"}}')
    yield "truncated", st(llava, f32(12) + bytes(range(20)))[:100]
    yield "header_len_huge", struct.pack("<Q", 1 << 40) + b"{}"


def config_seeds():
    vision = {"model_type": "clip_vision_model", "hidden_size": 4, "num_hidden_layers": 3, "image_size": 28,
              "patch_size": 14,
              "num_attention_heads": 2, "intermediate_size": 8}
    yield "hf_llava", {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                       "vision_config": vision, "text_config": {"hidden_size": 8},
                       "projector_hidden_act": "gelu", "vision_feature_layer": -2,
                       "vision_feature_select_strategy": "default", "multimodal_projector_bias": True}
    yield "hf_llava_multi", {"model_type": "llava", "vision_config": dict(vision, hidden_size=2, num_attention_heads=1),
                             "text_config": {"hidden_size": 8}, "projector_hidden_act": "quick_gelu",
                             "vision_feature_layer": [-1, 1], "vision_feature_select_strategy": "full"}
    orig = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 8,
            "mm_hidden_size": 4, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch"}
    yield "orig_mlp2x_gelu", dict(orig, mm_projector_type="mlp2x_gelu")
    yield "orig_mlp3x_gelu", dict(orig, mm_projector_type="mlp3x_gelu", mm_vision_select_feature="cls_patch")
    yield "orig_linear", dict(orig, mm_projector_type="linear")
    yield "orig_identity", dict(orig, mm_projector_type="identity", hidden_size=4)
    yield "orig_simple_res", dict(orig, mm_projector_type="simple_res", hidden_size=4)


def main():
    sd, cd = HERE / "corpus" / "safetensors", HERE / "corpus" / "config"
    sd.mkdir(parents=True, exist_ok=True)
    cd.mkdir(parents=True, exist_ok=True)
    for name, blob in safetensors_seeds():
        assert len(blob) < 2048, name
        (sd / f"{name}.safetensors").write_bytes(blob)
    for name, cfg in config_seeds():
        (cd / f"{name}.json").write_text(json.dumps(cfg, indent=1) + "\n")


if __name__ == "__main__":
    main()
