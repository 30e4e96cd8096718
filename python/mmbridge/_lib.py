"""ctypes bindings of the part of include/mmbridge.h the package uses.

The structures mirror the header field for field (tests/python/test_package.py compares their sizes
and offsets with a C compiler's). The library is loaded with ctypes.CDLL, never PyDLL: a CDLL call
releases the GIL for its whole duration, so other Python threads run while the library computes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char_p, c_double, c_float, c_int, c_int32, c_int64,
                    c_size_t, c_uint64, c_void_p)
from pathlib import Path
from typing import Any, Dict, List, Tuple

MMB_MAX_TAPS = 64
MMB_TAP_LAST = 0x7FFFFFFF

# mmb_dtype values used for mmb_ctx_params.weight_dtype
MMB_F32, MMB_F16, MMB_BF16, MMB_I8 = 0, 1, 2, 7

MMB_TOKENIZE_RAW, MMB_TOKENIZE_CHAT = 0, 1


class mmb_ctx_params(Structure):
    _fields_ = [("n_threads", c_int), ("gemm", c_int), ("weight_dtype", c_int)]


class mmb_image(Structure):
    _fields_ = [("width", c_int), ("height", c_int), ("rgb", c_void_p)]


class mmb_dense_params(Structure):
    _fields_ = [("type", c_int), ("use_final", c_int), ("final_layer", c_int), ("n_layers", c_int),
                ("layers", c_int * MMB_MAX_TAPS), ("n_groups", c_int), ("group_first", c_int * MMB_MAX_TAPS),
                ("group_last", c_int * MMB_MAX_TAPS), ("pool", c_int), ("tokens", c_int64)]


class mmb_mllm_params(Structure):
    _fields_ = [("vision_tower", c_char_p), ("dense", mmb_dense_params), ("vision_only", c_int),
                ("adapter", c_char_p)]


class mmb_mllm_info(Structure):
    _fields_ = [("dir", c_char_p), ("family", c_char_p), ("architecture", c_char_p), ("fusion", c_int),
                ("has_vision", c_int), ("has_connector", c_int), ("has_lm", c_int), ("has_tokenizer", c_int),
                ("has_processor", c_int), ("has_chat_template", c_int),
                ("vision_layers", c_int), ("vision_width", c_int), ("vision_tokens", c_int64),
                ("out_width", c_int), ("tokens_per_image", c_int64), ("image_size", c_int),
                ("image_marker", c_char_p), ("image_token", c_int32), ("context", c_int64),
                ("processor", c_char_p),
                ("xattn_layers", c_int), ("xattn_params", c_int64), ("xattn_flops_per_token", c_int64),
                ("xattn_kv_bytes_per_image", c_int64), ("xattn_kv_flops_per_image", c_int64),
                ("expert_sets", c_int), ("adapter_layers", c_int),
                ("adapter_len", c_int64), ("added_params", c_int64), ("added_flops_per_token", c_int64),
                ("adapter_flops_per_image", c_int64),
                ("vq_codebook", c_int64), ("vq_downsample", c_int), ("vq_encodes", c_int), ("vq_decodes", c_int)]


class mmb_encode_out(Structure):
    _fields_ = [("embeddings", c_void_p), ("embeddings_count", c_size_t), ("tokens", POINTER(c_int64)),
                ("n_taps", c_int), ("taps", c_int * MMB_MAX_TAPS), ("hidden", c_void_p * MMB_MAX_TAPS),
                ("hidden_count", c_size_t)]


class mmb_sampler(Structure):
    _fields_ = [("temperature", c_float), ("top_k", c_int), ("top_p", c_float), ("seed", c_uint64),
                ("state", c_uint64)]


mmb_token_fn = CFUNCTYPE(c_int, c_void_p, c_int32, ctypes.POINTER(ctypes.c_char), c_size_t)
mmb_logits_fn = CFUNCTYPE(None, c_void_p, POINTER(c_float), c_int64, c_int64)
mmb_progress_fn = CFUNCTYPE(None, c_void_p, c_char_p, c_int64, c_int64)


class mmb_gen_params(Structure):
    _fields_ = [("n_predict", c_int64), ("sampler", mmb_sampler), ("ignore_eos", c_int),
                ("stops", POINTER(c_char_p)), ("n_stops", c_int), ("n_batch", c_int64),
                ("on_token", mmb_token_fn), ("on_logits", mmb_logits_fn), ("on_progress", mmb_progress_fn),
                ("user", c_void_p), ("abort", POINTER(c_int))]


class mmb_chat_msg(Structure):
    _fields_ = [("role", c_char_p), ("content", c_char_p)]


class mmb_gen_result(Structure):
    _fields_ = [("stop", c_int), ("n_prompt", c_int64), ("n_generated", c_int64), ("encode_s", c_double),
                ("prefill_s", c_double), ("decode_s", c_double)]


class mmb_input(Structure):
    _fields_ = [("name", c_char_p), ("path", c_char_p), ("url", c_char_p), ("index", c_int64), ("offset", c_int64),
                ("size", c_int64)]


MMB_MANIFEST_SKIP_BAD = 1
MMB_POOL_NONE, MMB_POOL_MEAN, MMB_POOL_CLS = 0, 1, 2

STRUCTS = {"mmb_input": mmb_input, "mmb_ctx_params": mmb_ctx_params, "mmb_image": mmb_image, "mmb_dense_params": mmb_dense_params,
           "mmb_mllm_params": mmb_mllm_params, "mmb_mllm_info": mmb_mllm_info, "mmb_encode_out": mmb_encode_out,
           "mmb_sampler": mmb_sampler, "mmb_gen_params": mmb_gen_params, "mmb_gen_result": mmb_gen_result,
           "mmb_chat_msg": mmb_chat_msg}

_ctx_p = c_void_p
_status = c_int

# name: (restype, argtypes)
_SIGNATURES: Dict[str, Tuple[Any, List[Any]]] = {
    "mmb_version": (c_char_p, []),
    "mmb_status_str": (c_char_p, [c_int]),
    "mmb_ctx_default_params": (mmb_ctx_params, []),
    "mmb_ctx_new": (_status, [POINTER(mmb_ctx_params), POINTER(c_void_p)]),
    "mmb_ctx_free": (None, [_ctx_p]),
    "mmb_ctx_threads": (c_int, [_ctx_p]),
    "mmb_ctx_error": (c_char_p, [_ctx_p]),
    "mmb_mllm_default_params": (mmb_mllm_params, []),
    "mmb_mllm_open": (_status, [_ctx_p, c_char_p, POINTER(mmb_mllm_params), POINTER(c_void_p)]),
    "mmb_mllm_free": (None, [c_void_p]),
    "mmb_mllm_get_info": (_status, [c_void_p, POINTER(mmb_mllm_info)]),
    "mmb_image_load": (_status, [_ctx_p, c_char_p, c_int64, POINTER(mmb_image)]),
    "mmb_image_decode": (_status, [_ctx_p, c_void_p, c_size_t, c_char_p, c_int64, POINTER(mmb_image)]),
    "mmb_image_free": (None, [POINTER(mmb_image)]),
    "mmb_mllm_encode_size": (c_int64, [_ctx_p, c_void_p, POINTER(mmb_image), c_int, POINTER(c_int64)]),
    "mmb_mllm_encode": (_status, [_ctx_p, c_void_p, POINTER(mmb_image), c_int, POINTER(mmb_encode_out)]),
    "mmb_mllm_tokenize": (_status, [_ctx_p, c_void_p, c_char_p, POINTER(mmb_image), c_int, c_int,
                                    POINTER(c_void_p)]),
    "mmb_mllm_tokenize_chat": (_status, [_ctx_p, c_void_p, POINTER(mmb_chat_msg), c_int, POINTER(mmb_image), c_int,
                                         POINTER(c_void_p)]),
    "mmb_chunks_free": (None, [c_void_p]),
    "mmb_chunks_positions": (c_int64, [c_void_p]),
    "mmb_mllm_kv_new": (_status, [_ctx_p, c_void_p, c_int64, POINTER(c_void_p)]),
    "mmb_kv_cache_free": (None, [c_void_p]),
    "mmb_gen_default_params": (mmb_gen_params, []),
    "mmb_sampler_default": (mmb_sampler, []),
    "mmb_mllm_generate": (_status, [_ctx_p, c_void_p, c_void_p, c_void_p, POINTER(mmb_gen_params),
                                    POINTER(mmb_gen_result)]),
    "mmb_manifest_open": (_status, [_ctx_p, c_char_p, c_int, POINTER(c_void_p)]),
    "mmb_manifest_free": (None, [c_void_p]),
    "mmb_manifest_count": (c_int64, [c_void_p]),
    "mmb_manifest_get": (_status, [c_void_p, c_int64, POINTER(mmb_input)]),
    "mmb_manifest_warnings": (c_int, [c_void_p]),
    "mmb_manifest_warning": (c_char_p, [c_void_p, c_int]),
    "mmb_manifest_read": (_status, [_ctx_p, c_void_p, c_int64, POINTER(c_void_p), POINTER(c_size_t)]),
    "mmb_shard_count": (c_int64, [c_int64, c_int64]),
    "mmb_shard_range": (_status, [c_int64, c_int64, c_int64, POINTER(c_int64), POINTER(c_int64)]),
    "mmb_shard_mine": (c_int, [c_int64, c_int64, c_int64]),
    "mmb_pool_tokens": (_status, [_ctx_p, c_int, c_void_p, c_int64, c_int64, c_int64, c_void_p, c_size_t]),
}


def _candidates() -> List[str]:
    env = os.environ.get("MMBRIDGE_LIB")
    if env:
        return [env]  # asked for explicitly: that one or nothing
    here = Path(__file__).resolve().parent
    out = [str(here / "libmmbridge.so"), str(here / "libmmbridge.dylib")]
    found = ctypes.util.find_library("mmbridge")
    if found:
        out.append(found)
    return out


def _load() -> Tuple[ctypes.CDLL, str]:
    errors = []
    for path in _candidates():
        if os.sep in path and not os.path.exists(path):
            errors.append(f"{path}: no such file")
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
        return lib, path
    raise ImportError("mmbridge: cannot load libmmbridge (set MMBRIDGE_LIB to the path of libmmbridge.so, or "
                      "`pip install .` from the repository): " + "; ".join(errors or ["nothing found"]))


lib, path = _load()
# free() for the buffers the library allocates for the caller (mmb_manifest_read): the process's own, which is the
# one the library's malloc came from (ASan's when it is preloaded).
libc = ctypes.CDLL(None)
libc.free.restype = None
libc.free.argtypes = [c_void_p]
