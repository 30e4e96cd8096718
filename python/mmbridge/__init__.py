"""mmbridge: multimodal models from Python, over the C library (libmmbridge) through ctypes.

    import mmbridge
    with mmbridge.Model("llava-dir", threads=4) as m:
        emb = m.encode(["cat.jpg", pil_image, rgb_uint8_array])    # float32 [3, tokens, d_model]
        hs = m.hidden_states("cat.jpg", layers=[-2, mmbridge.MMB_TAP_LAST])  # {layer: [1, tokens, width]}
        for piece in m.generate("cat.jpg", "What is in the picture?", max_tokens=64):
            print(piece, end="", flush=True)

Every call releases the GIL while the library computes (ctypes.CDLL). A Model opens the checkpoint once
and gives each Python thread that uses it its own library context (the C contract: a context is used by
one thread at a time, a model may be shared read-only), so threads encode concurrently on one model.
Outputs are numpy arrays allocated here and handed to the library as its output buffers: no copy.
"""
from __future__ import annotations

import ctypes
import enum
import os
import queue
import sys
import threading
import weakref
from ctypes import byref, c_char_p, c_int, c_int64, c_void_p
from dataclasses import dataclass, fields
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union, cast

import numpy as np

from . import _lib
from ._lib import MMB_TAP_LAST

__all__ = ["Model", "Info", "Generation", "Error", "Status", "MMB_TAP_LAST", "version", "library_path",
           "FileError", "FormatError", "ShapeError", "MissingError", "UnsupportedError", "NoMemoryError",
           "ArgumentError", "AbortedError", "NumericError", "ClosedError", "Manifest", "Input", "shard_count",
           "shard_range", "shard_mine", "pool_tokens"]

__version__ = "0.1.0"

_L = _lib.lib

if sys.version_info >= (3, 9):
    PathLike = Union[str, "os.PathLike[str]"]
else:  # pragma: no cover
    PathLike = Union[str, os.PathLike]

#: One image: a file path, the encoded bytes of a JPEG / PNG / WebP, a PIL image, or an RGB uint8 array [H, W, 3].
ImageLike = Union[PathLike, bytes, bytearray, memoryview, np.ndarray, Any]


def version() -> str:
    """The library's version ("MAJOR.MINOR.PATCH")."""
    return str(_L.mmb_version().decode())


def library_path() -> Optional[str]:
    """The libmmbridge file loaded (MMBRIDGE_LIB, the one shipped in the package, or the system's)."""
    return _lib.path


class Status(enum.IntEnum):
    """mmb_status: the result of every fallible library call."""
    OK = 0
    ERR_IO = 1
    ERR_FORMAT = 2
    ERR_SHAPE = 3
    ERR_MISSING = 4
    ERR_UNSUPPORTED = 5
    ERR_NOMEM = 6
    ERR_ARG = 7
    ERR_ABORTED = 8
    ERR_NUMERIC = 9


class Error(Exception):
    """A library call failed. `status` is the mmb_status (a Status, or None when the call reports failure
    without one, as the sizing calls do), `message` the context's message (mmb_ctx_error), which names the
    file, the tensor and the problem."""

    def __init__(self, message: str, status: Optional[int] = None):
        self.message = message
        self.status: Optional[Status] = Status(status) if status is not None else None
        prefix = _L.mmb_status_str(int(status)).decode() + ": " if status is not None else ""
        super().__init__(prefix + message)


class FileError(Error):
    """MMB_ERR_IO: a file could not be opened, read, mapped or written."""


class FormatError(Error):
    """MMB_ERR_FORMAT: a file's contents (an image, a header, JSON) are malformed."""


class ShapeError(Error):
    """MMB_ERR_SHAPE: a tensor or input has the wrong shape (also: a context overflow)."""


class MissingError(Error):
    """MMB_ERR_MISSING: a required tensor, config key or part (tokenizer, processor, LLM) is absent."""


class UnsupportedError(Error):
    """MMB_ERR_UNSUPPORTED: a known-valid choice this build does not run."""


class NoMemoryError(Error, MemoryError):
    """MMB_ERR_NOMEM: an allocation failed."""


class ArgumentError(Error, ValueError):
    """MMB_ERR_ARG: an invalid argument (also raised here for inputs refused before the library sees them)."""


class AbortedError(Error):
    """MMB_ERR_ABORTED: the abort flag stopped the work."""


class NumericError(Error):
    """MMB_ERR_NUMERIC: a computation gave NaN or infinity."""


class ClosedError(Error, ValueError):
    """The Model was closed."""


_BY_STATUS = {1: FileError, 2: FormatError, 3: ShapeError, 4: MissingError, 5: UnsupportedError,
              6: NoMemoryError, 7: ArgumentError, 8: AbortedError, 9: NumericError}


def _error(ctx: int, status: Optional[int]) -> Error:
    msg = _L.mmb_ctx_error(ctx)
    msg = msg.decode("utf-8", "replace") if msg else ""
    cls = _BY_STATUS.get(int(status), Error) if status is not None else Error
    return cls(msg, status)


_DTYPES = {"f32": _lib.MMB_F32, "float32": _lib.MMB_F32, "bf16": _lib.MMB_BF16, "bfloat16": _lib.MMB_BF16,
           "f16": _lib.MMB_F16, "float16": _lib.MMB_F16, "int8": _lib.MMB_I8, "i8": _lib.MMB_I8}

_FUSION = {0: "none", 1: "A", 2: "B", 3: "C", 4: "D"}
_STOP = {0: "eos", 1: "length", 2: "context", 3: "string", 4: "callback", 5: "abort"}


@dataclass(frozen=True)
class Info:
    """mmb_mllm_info: what the checkpoint holds and what an encode produces (the header documents each field)."""
    dir: str
    family: str
    architecture: str
    fusion: str                 # "none", "A", "B", "C" or "D"
    has_vision: bool
    has_connector: bool
    has_lm: bool
    has_tokenizer: bool
    has_processor: bool
    has_chat_template: bool
    vision_layers: int
    vision_width: int
    vision_tokens: int          # tokens of one hidden state (CLS included); 0 for a family's model
    out_width: int              # width of encode's output
    tokens_per_image: int       # encode's rows per image at the processor's fixed size; 0 when it varies
    image_size: int
    image_marker: str
    image_token: int
    context: int
    processor: str
    xattn_layers: int
    xattn_params: int
    xattn_flops_per_token: int
    xattn_kv_bytes_per_image: int
    xattn_kv_flops_per_image: int
    expert_sets: int
    adapter_layers: int
    adapter_len: int
    added_params: int
    added_flops_per_token: int
    adapter_flops_per_image: int
    vq_codebook: int
    vq_downsample: int
    vq_encodes: bool
    vq_decodes: bool

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _info_from(c: "_lib.mmb_mllm_info") -> Info:
    kw: Dict[str, Any] = {}
    for f in fields(Info):
        v = getattr(c, f.name)
        if isinstance(v, bytes) or v is None and f.type == "str":
            v = (v or b"").decode("utf-8", "replace")
        elif f.type == "bool":
            v = bool(v)
        kw[f.name] = v
    kw["fusion"] = _FUSION.get(c.fusion, str(c.fusion))
    return Info(**kw)


class _Slot:
    """A thread's context (in the Model's threading.local). When the thread ends its slot is dropped and the
    context goes back to the model's spare list for the next new thread (it is freed by Model.close)."""
    __slots__ = ("ctx", "model", "__weakref__")

    def __init__(self, ctx: int, model: "Model"):
        self.ctx = ctx
        self.model = weakref.ref(model)

    def __del__(self) -> None:
        m = self.model()
        if m is not None and not m._closed:
            m._spare.append(self.ctx)  # list.append is atomic; close() frees every context it made


def _to_rgb_array(img: Any) -> np.ndarray:
    """A PIL image as transformers' convert_to_rgb gives it (non-RGB modes composited onto white), HxWx3 uint8."""
    import importlib
    Image: Any = importlib.import_module("PIL.Image")  # Pillow is needed only by callers who pass its images
    if img.mode != "RGB":
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255))
        img = Image.alpha_composite(bg, rgba).convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _is_pil(x: Any) -> bool:
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(x, pil.Image)


def _is_single(x: Any) -> bool:
    return isinstance(x, (str, bytes, bytearray, memoryview, os.PathLike, np.ndarray)) or _is_pil(x)


def _as_list(images: Any) -> List[Any]:
    """One image or an iterable of them, as a list."""
    return [images] if _is_single(images) else list(cast(Iterable[Any], images))


class _Images:
    """Images decoded into an mmb_image array for one call; owns what the library decoded."""

    def __init__(self, ctx: int, images: Sequence[Any]):
        n = len(images)
        self.arr = (_lib.mmb_image * max(n, 1))()
        self.n = n
        self.keep: List[Any] = []
        self.owned: List[int] = []
        try:
            for i, x in enumerate(images):
                self._one(ctx, i, x)
        except BaseException:
            self.free()
            raise

    def _one(self, ctx: int, i: int, x: Any) -> None:
        im = self.arr[i]
        if isinstance(x, (str, os.PathLike)):
            s = _L.mmb_image_load(ctx, os.fsencode(os.fspath(x)), 0, byref(im))
            if s:
                raise _error(ctx, s)
            self.owned.append(i)
            return
        if isinstance(x, (bytes, bytearray, memoryview)):
            b = bytes(x)
            s = _L.mmb_image_decode(ctx, b, len(b), f"image {i} (bytes)".encode(), 0, byref(im))
            if s:
                raise _error(ctx, s)
            self.owned.append(i)
            return
        if _is_pil(x):
            a = _to_rgb_array(x)
        elif isinstance(x, np.ndarray):
            if x.dtype != np.uint8 or x.ndim != 3 or x.shape[2] != 3:
                raise ArgumentError(f"image {i}: a numpy image must be uint8 [height, width, 3] (RGB), got "
                                    f"{x.dtype} {list(x.shape)}", Status.ERR_ARG)
            a = np.ascontiguousarray(x)
        else:
            raise TypeError(f"image {i}: expected a path, bytes, a PIL image or a uint8 numpy array [H, W, 3], "
                            f"got {type(x).__name__}")
        if a.shape[0] < 1 or a.shape[1] < 1:
            raise ArgumentError(f"image {i}: empty ({a.shape[0]}x{a.shape[1]})", Status.ERR_ARG)
        self.keep.append(a)
        im.height, im.width = int(a.shape[0]), int(a.shape[1])
        im.rgb = a.ctypes.data

    def free(self) -> None:
        for i in self.owned:
            _L.mmb_image_free(byref(self.arr[i]))
        self.owned = []
        self.keep = []


class Model:
    """A checkpoint directory opened through the library's family table (mmb_mllm_open).

    threads: worker threads of each context (None: the online CPUs; each Python thread that calls the model gets
    a context with this many, so with a pool of N Python threads, threads = CPUs / N avoids oversubscription). dtype: the weights' compute dtype,
    "f32" (exact), "bf16", "f16" or "int8" (mmb_ctx_params.weight_dtype). vision_tower: the CLIP/SigLIP
    directory of an original-layout LLaVA checkpoint. vision_only: do not open the LLM and tokenizer.
    Use as a context manager, or call close(); close() waits for calls in progress and stops generations.
    """

    def __init__(self, path: PathLike, threads: Optional[int] = None, dtype: str = "f32", *,
                 vision_tower: Optional[PathLike] = None, vision_only: bool = False):
        if dtype not in _DTYPES:
            raise ArgumentError(f"dtype {dtype!r}: expected one of f32, bf16, f16, int8", Status.ERR_ARG)
        if threads is not None and (not isinstance(threads, int) or threads < 0):
            raise ArgumentError(f"threads {threads!r}: expected None or an int >= 0", Status.ERR_ARG)
        self._closed = True  # until opened (close() and __del__ then do nothing)
        self._m: Optional[int] = None
        self._params = _L.mmb_ctx_default_params()
        self._params.n_threads = threads or 0
        self._params.weight_dtype = _DTYPES[dtype]
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._all: List[int] = []       # every context made, freed at close()
        self._spare: List[int] = []     # contexts of threads that ended
        self._aborts: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._local = threading.local()
        self.path = os.fspath(path)
        ctx = self._new_ctx()
        mp = _L.mmb_mllm_default_params()
        tower = os.fsencode(os.fspath(vision_tower)) if vision_tower is not None else None
        mp.vision_tower = tower
        mp.vision_only = 1 if vision_only else 0
        out = c_void_p()
        s = _L.mmb_mllm_open(ctx, os.fsencode(self.path), byref(mp), byref(out))
        if s:
            err = _error(ctx, s)
            _L.mmb_ctx_free(ctx)
            self._all = []
            raise err
        self._m = out.value
        self._closed = False
        self._local.slot = _Slot(ctx, self)
        ci = _lib.mmb_mllm_info()
        _L.mmb_mllm_get_info(self._m, byref(ci))
        self._info = _info_from(ci)

    # ---- contexts and lifetime ------------------------------------------------------------------------------
    def _new_ctx(self) -> int:
        out = c_void_p()
        s = _L.mmb_ctx_new(byref(self._params), byref(out))
        if s:
            raise _BY_STATUS.get(s, Error)("mmb_ctx_new failed (no context, no message): " +
                                           _L.mmb_status_str(s).decode(), s)
        if out.value is None:  # pragma: no cover (MMB_OK always sets it)
            raise NoMemoryError("mmb_ctx_new returned no context", Status.ERR_NOMEM)
        with self._lock:
            self._all.append(out.value)
        return out.value

    def _ctx(self) -> int:
        """This thread's context, made on its first call (or a spare one of a thread that ended)."""
        slot = getattr(self._local, "slot", None)
        if slot is None:
            try:
                ctx = self._spare.pop()
            except IndexError:
                ctx = self._new_ctx()
            slot = self._local.slot = _Slot(ctx, self)
        return slot.ctx

    def _acquire(self) -> None:
        with self._lock:
            if self._closed:
                raise ClosedError("the model is closed")
            self._active += 1

    def _release(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._idle.notify_all()

    def close(self) -> None:
        """Stops running generations (their abort flags), waits for calls in progress, frees the model and
        every context. Further calls raise ClosedError. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for st in list(self._aborts):
                st.abort.value = 1
            while self._active:
                self._idle.wait()
            ctxs, self._all, self._spare = self._all, [], []
            m, self._m = self._m, None
        _L.mmb_mllm_free(m)
        for c in ctxs:
            _L.mmb_ctx_free(c)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self._info.family}, out_width {self._info.out_width}"
        return f"mmbridge.Model({self.path!r}: {state})"

    @property
    def info(self) -> Info:
        """mmb_mllm_info's fields."""
        return self._info

    # ---- encoding ---------------------------------------------------------------------------------------------
    def encode(self, images: Union[ImageLike, Iterable[ImageLike]]) -> Union[np.ndarray, List[np.ndarray]]:
        """The model's vision path (processor, tower, feature selection, connector; a tower alone: its
        last_hidden_state) on one image or a list of them (paths, encoded bytes, PIL images, uint8 RGB arrays
        [H, W, 3]). Returns float32 [n, tokens, out_width], written by the library into the returned array's
        own buffer; when the images make different numbers of tokens (a model whose processor keeps the
        aspect), a list of [tokens_i, out_width] views of one buffer instead."""
        lst = _as_list(images)
        if not lst:
            raise ArgumentError("encode: no images", Status.ERR_ARG)
        self._acquire()
        try:
            ctx = self._ctx()
            ims = _Images(ctx, lst)
            try:
                n = len(lst)
                tokens = (c_int64 * n)()
                total = _L.mmb_mllm_encode_size(ctx, self._m, ims.arr, n, tokens)
                if total < 0:
                    raise _error(ctx, None)
                width = self._info.out_width
                counts = list(tokens)
                same = all(t == counts[0] for t in counts)
                out = np.empty((n, counts[0], width) if same else (int(total), width), dtype=np.float32)
                eo = _lib.mmb_encode_out()
                eo.embeddings = out.ctypes.data
                eo.embeddings_count = out.size
                eo.tokens = tokens
                s = _L.mmb_mllm_encode(ctx, self._m, ims.arr, n, byref(eo))
                if s:
                    raise _error(ctx, s)
            finally:
                ims.free()
        finally:
            self._release()
        if same:
            return out
        ends = np.cumsum(counts)
        return [out[e - t:e] for t, e in zip(counts, ends)]

    def hidden_states(self, images: Union[ImageLike, Iterable[ImageLike]],
                      layers: Union[int, Sequence[int]] = (MMB_TAP_LAST,)) -> Dict[int, np.ndarray]:
        """The vision tower's hidden states (Hugging Face indexing: 0 = the embeddings after CLIP's
        pre_layrnorm, i = the output of block i, negative from the end, MMB_TAP_LAST = last_hidden_state) from
        one pass of the tower: {layer: float32 [n, vision_tokens, vision_width]}, keyed by the values given,
        each array the library's output buffer. The images must preprocess to one size."""
        lst = _as_list(images)
        taps = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(x) for x in layers]
        if not lst or not taps:
            raise ArgumentError("hidden_states: no images or no layers", Status.ERR_ARG)
        if len(taps) > _lib.MMB_MAX_TAPS:
            raise ArgumentError(f"hidden_states: at most {_lib.MMB_MAX_TAPS} layers", Status.ERR_ARG)
        n, vt, vw = len(lst), self._info.vision_tokens, self._info.vision_width
        outs = {}
        for t in taps:
            if t not in outs:
                outs[t] = np.empty((n, vt, vw), dtype=np.float32)
        uniq = list(outs)
        self._acquire()
        try:
            ctx = self._ctx()
            ims = _Images(ctx, lst)
            try:
                eo = _lib.mmb_encode_out()
                eo.n_taps = len(uniq)
                for i, t in enumerate(uniq):
                    eo.taps[i] = t
                    eo.hidden[i] = outs[t].ctypes.data
                eo.hidden_count = n * vt * vw
                s = _L.mmb_mllm_encode(ctx, self._m, ims.arr, n, byref(eo))
                if s:
                    raise _error(ctx, s)
            finally:
                ims.free()
        finally:
            self._release()
        return {t: outs[t] for t in taps}

    # ---- generation -------------------------------------------------------------------------------------------
    def generate(self, images: Union[None, ImageLike, Iterable[ImageLike]], prompt: str, *, max_tokens: int = 128,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop: Union[None, str, Sequence[str]] = None, chat: bool = True,
                 ignore_eos: bool = False) -> "Generation":
        """Streams the text the model generates for `prompt` with `images` (None or [] for none): an iterator of
        text pieces (whole UTF-8 characters). The prompt holds the model's image marker (info.image_marker) once
        per image, or none (one is then put in front of it per image); chat=True renders it as the user's turn
        through the checkpoint's chat template, chat=False tokenizes it as it is. Sampling as mmb_sampler:
        temperature <= 0 is greedy; top_k <= 0 and top_p >= 1 are off; seed seeds the generator. Stops at an
        end-of-sequence id (unless ignore_eos), after max_tokens, at a stop string, or when the context is full.
        The prompt is tokenized and its images decoded here (errors are raised by this call); the generation runs
        in a worker thread. Closing the iterator (close(), a `with` block, or dropping it) raises the library's
        abort flag, so the C side stops before its next token."""
        if not isinstance(prompt, str):
            raise TypeError("prompt: expected str")
        flags = _lib.MMB_TOKENIZE_CHAT if chat else _lib.MMB_TOKENIZE_RAW
        return self._generate(images, lambda ctx, ims, n, out: _L.mmb_mllm_tokenize(
            ctx, self._m, prompt.encode("utf-8"), ims, n, flags, out), max_tokens, temperature, top_k, top_p, seed,
            stop, ignore_eos)

    def chat(self, messages: Sequence[Dict[str, str]], images: Union[None, ImageLike, Iterable[ImageLike]] = None, *,
             max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop: Union[None, str, Sequence[str]] = None, ignore_eos: bool = False) -> "Generation":
        """As generate, for a whole conversation (what `mmbridge serve` answers): messages [{"role": "system" |
        "user" | "assistant", "content": str}], each content holding the model's image marker once per image of
        that message; the markers of all messages stand for `images` in order (none is added). The conversation
        is rendered by the checkpoint's chat template with the generation prompt (mmb_mllm_tokenize_chat)."""
        msgs = list(messages)
        if not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and
                               isinstance(m.get("content"), str) for m in msgs):
            raise TypeError("messages: expected a non-empty list of {'role': str, 'content': str}")
        arr = (_lib.mmb_chat_msg * len(msgs))(*[_lib.mmb_chat_msg(m["role"].encode("utf-8"),
                                                                  m["content"].encode("utf-8")) for m in msgs])
        return self._generate(images, lambda ctx, ims, n, out: _L.mmb_mllm_tokenize_chat(
            ctx, self._m, arr, len(msgs), ims, n, out), max_tokens, temperature, top_k, top_p, seed, stop, ignore_eos)

    def _generate(self, images: Union[None, ImageLike, Iterable[ImageLike]], tokenize: Any, max_tokens: int,
                  temperature: float, top_k: int, top_p: float, seed: int, stop: Union[None, str, Sequence[str]],
                  ignore_eos: bool) -> "Generation":
        lst = [] if images is None else _as_list(images)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self._acquire()
        chunks = c_void_p()
        kv = c_void_p()
        owned = True
        try:
            ctx = self._ctx()
            ims = _Images(ctx, lst)
            try:
                s = tokenize(ctx, ims.arr, len(lst), byref(chunks))
                if s:
                    raise _error(ctx, s)
            finally:
                ims.free()
            positions = _L.mmb_chunks_positions(chunks)
            s = _L.mmb_mllm_kv_new(ctx, self._m, positions + max(int(max_tokens), 0), byref(kv))
            if s:
                raise _error(ctx, s)
            gp = _L.mmb_gen_default_params()
            gp.n_predict = int(max_tokens)
            gp.sampler.temperature = float(temperature)
            gp.sampler.top_k = int(top_k)
            gp.sampler.top_p = float(top_p)
            gp.sampler.seed = int(seed) & 0xFFFFFFFFFFFFFFFF
            gp.ignore_eos = 1 if ignore_eos else 0
            gen = Generation(self, int(chunks.value or 0), int(kv.value or 0), gp, [x.encode("utf-8") for x in stops])
            owned = False  # the generation frees them
        except BaseException:
            if owned:
                _L.mmb_chunks_free(chunks)
                _L.mmb_kv_cache_free(kv)
            self._release()
            raise
        return gen  # the worker releases the model's use count when it ends


class _GenState:
    """What the worker thread shares with a Generation (the worker holds no reference to the Generation, so
    dropping the iterator closes it)."""

    def __init__(self) -> None:
        # bounded: the C side runs at most this many pieces ahead of the reader
        self.q: "queue.Queue[Any]" = queue.Queue(maxsize=_AHEAD)
        self.abort = c_int(0)
        self.ids: List[int] = []
        self.result: Optional[_lib.mmb_gen_result] = None


_DONE = object()
_AHEAD = 16


def _put(st: _GenState, item: Any, always: bool = False) -> None:
    """Queues item for the reader, waiting while the queue is full unless the generation was closed (then a
    piece is dropped; the end marker and errors are always queued, the reader having stopped or draining)."""
    while True:
        try:
            st.q.put(item, timeout=0.05)
            return
        except queue.Full:
            if st.abort.value and not always:
                return
            if st.abort.value:
                try:  # nobody reads any more: make room for the end marker
                    st.q.get_nowait()
                except queue.Empty:
                    pass


def _gen_worker(model: Model, st: _GenState, chunks: int, kv: int, gp: "_lib.mmb_gen_params",
                stops: List[bytes]) -> None:
    try:
        ctx = model._ctx()  # this thread's own context

        def on_token(user: Any, tok: int, piece: Any, n: int) -> int:
            try:
                st.ids.append(int(tok))
                if n:
                    _put(st, ctypes.string_at(piece, n).decode("utf-8", "replace"))
            except BaseException as e:  # an exception must not cross the C frames
                _put(st, e, always=True)
                return 1
            return 0  # closing sets the abort flag, which the library checks before each token

        cb = _lib.mmb_token_fn(on_token)
        gp.on_token = cb
        gp.abort = ctypes.pointer(st.abort)
        arr = (c_char_p * max(len(stops), 1))(*stops)
        if stops:
            gp.stops = ctypes.cast(arr, ctypes.POINTER(c_char_p))
            gp.n_stops = len(stops)
        res = _lib.mmb_gen_result()
        s = _L.mmb_mllm_generate(ctx, model._m, kv, chunks, byref(gp), byref(res))
        st.result = res
        if s and not (s == Status.ERR_ABORTED and st.abort.value):
            _put(st, _error(ctx, s), always=True)
    except BaseException as e:
        _put(st, e, always=True)
    finally:
        _L.mmb_chunks_free(chunks)
        _L.mmb_kv_cache_free(kv)
        model._release()
        _put(st, _DONE, always=True)


class Generation(Iterator[str]):
    """The iterator Model.generate returns: text pieces as the library streams them. After it ends, `ids` holds
    the generated token ids, `stop` why it stopped ("eos", "length", "context", "string", "callback", "abort"),
    and n_prompt, n_generated, encode_s, prefill_s, decode_s the library's counts and timings."""

    def __init__(self, model: Model, chunks: int, kv: int, gp: "_lib.mmb_gen_params", stops: List[bytes]):
        self._st = _GenState()
        self._done = False
        model._aborts.add(self._st)
        self._thread = threading.Thread(target=_gen_worker, args=(model, self._st, chunks, kv, gp, stops),
                                        name="mmbridge-generate", daemon=True)
        self._thread.start()

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        item = self._st.q.get()
        if item is _DONE:
            self._done = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return str(item)

    def text(self) -> str:
        """The rest of the text, joined."""
        return "".join(list(self))

    def close(self) -> None:
        """Raises the abort flag and waits for the worker to stop (the C side stops before its next token)."""
        self._st.abort.value = 1
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._done = True

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def ids(self) -> List[int]:
        return list(self._st.ids)

    def _res(self, name: str) -> Any:
        r = self._st.result
        return None if r is None else cast(Any, getattr(r, name))

    @property
    def stop(self) -> Optional[str]:
        r = self._st.result
        return None if r is None else _STOP.get(r.stop, str(r.stop))

    @property
    def n_prompt(self) -> Optional[int]:
        v = self._res("n_prompt")
        return None if v is None else int(v)

    @property
    def n_generated(self) -> Optional[int]:
        v = self._res("n_generated")
        return None if v is None else int(v)

    @property
    def encode_s(self) -> Optional[float]:
        v = self._res("encode_s")
        return None if v is None else float(v)

    @property
    def prefill_s(self) -> Optional[float]:
        v = self._res("prefill_s")
        return None if v is None else float(v)

    @property
    def decode_s(self) -> Optional[float]:
        v = self._res("decode_s")
        return None if v is None else float(v)


# ---- sharded extraction: the library's manifests, split and pooling (mmb_manifest_*, mmb_shard_*, mmb_pool_tokens) --

@dataclass(frozen=True)
class Input:
    """One input of a Manifest (mmb_input): its name in outputs, the file to read (the image, or the tar holding it;
    None for a URL), the URL (or None), its manifest index, and in a tar the member's data offset and size (else 0
    and -1)."""
    name: str
    path: Optional[str]
    url: Optional[str]
    index: int
    offset: int
    size: int


def _text(b: Optional[bytes]) -> Optional[str]:
    return b.decode("utf-8", "surrogateescape") if b is not None else None


class Manifest:
    """The inputs `mmbridge encode --manifest` reads, from the library's reader (mmb_manifest_open): a list of paths,
    JSON lines ({"path"} or {"url"}), or a webdataset .tar read in place. skip_bad: a tar with a garbled header is cut
    there (`warnings` says where) instead of raising FormatError. Use as a sequence of Input; read(i) gives input i's
    encoded bytes (what Model.encode takes)."""

    def __init__(self, path: PathLike, skip_bad: bool = False):
        p = _L.mmb_ctx_default_params()
        p.n_threads = 1
        ctx = c_void_p()
        s = _L.mmb_ctx_new(byref(p), byref(ctx))
        if s or ctx.value is None:
            raise _BY_STATUS.get(s, Error)("mmb_ctx_new failed", s)
        self._ctx: Optional[int] = ctx.value
        self._m: Optional[int] = None
        out = c_void_p()
        s = _L.mmb_manifest_open(self._ctx, os.fsencode(path), _lib.MMB_MANIFEST_SKIP_BAD if skip_bad else 0,
                                 byref(out))
        if s:
            e = _error(self._ctx, s)
            self.close()
            raise e
        self._m = out.value
        self.warnings: List[str] = [_text(_L.mmb_manifest_warning(self._m, i)) or ""
                                    for i in range(_L.mmb_manifest_warnings(self._m))]

    def close(self) -> None:
        if self._m is not None:
            _L.mmb_manifest_free(self._m)
            self._m = None
        if self._ctx is not None:
            _L.mmb_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __len__(self) -> int:
        return int(_L.mmb_manifest_count(self._m)) if self._m is not None else 0

    def __getitem__(self, i: int) -> Input:
        if self._m is None:
            raise ClosedError("the manifest is closed")
        if i < 0:
            i += len(self)
        c = _lib.mmb_input()
        if _L.mmb_manifest_get(self._m, i, byref(c)):
            raise IndexError(i)
        return Input(_text(c.name) or "", _text(c.path), _text(c.url), int(c.index), int(c.offset), int(c.size))

    def __iter__(self) -> Iterator[Input]:
        for i in range(len(self)):
            yield self[i]

    def read(self, i: int) -> bytes:
        """Input i's encoded bytes (the file, or the tar member read at its offset); a URL raises UnsupportedError."""
        if self._m is None or self._ctx is None:
            raise ClosedError("the manifest is closed")
        buf, n = c_void_p(), ctypes.c_size_t()
        s = _L.mmb_manifest_read(self._ctx, self._m, i, byref(buf), byref(n))
        if s:
            raise _error(self._ctx, s)
        try:
            return ctypes.string_at(buf.value, n.value) if n.value and buf.value is not None else b""
        finally:
            _lib.libc.free(buf)


def shard_count(n_inputs: int, shard_size: int) -> int:
    """The number of shards of shard_size inputs (mmb_shard_count); ValueError for n_inputs < 0 or shard_size < 1."""
    n = int(_L.mmb_shard_count(n_inputs, shard_size))
    if n < 0:
        raise ValueError(f"shard_count({n_inputs}, {shard_size})")
    return n


def shard_range(n_inputs: int, shard_size: int, k: int) -> range:
    """The manifest indices shard k holds (mmb_shard_range): range(k * shard_size, min((k + 1) * shard_size, n))."""
    b, e = c_int64(), c_int64()
    if _L.mmb_shard_range(n_inputs, shard_size, k, byref(b), byref(e)):
        raise IndexError(k)
    return range(b.value, e.value)


def shard_mine(k: int, part: int, n_parts: int) -> bool:
    """Whether `--shard part/n_parts` takes shard k (k % n_parts == part)."""
    return bool(_L.mmb_shard_mine(k, part, n_parts))


def pool_tokens(x: np.ndarray, mode: str) -> np.ndarray:
    """What --pool stores per image, computed by the library (mmb_pool_tokens): x float32 [n, tokens, width] ->
    [n, width] for "mean" (summed in double) and "cls" (the first token), a copy for "none"."""
    modes = {"none": _lib.MMB_POOL_NONE, "mean": _lib.MMB_POOL_MEAN, "cls": _lib.MMB_POOL_CLS}
    if mode not in modes:
        raise ValueError(f"pool_tokens: mode {mode!r}: one of none, mean, cls")
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 3:
        raise ValueError("pool_tokens: x must be [n, tokens, width]")
    out = np.empty(a.shape if mode == "none" else (a.shape[0], a.shape[2]), np.float32)
    p = _L.mmb_ctx_default_params()
    p.n_threads = 1
    ctx = c_void_p()
    if _L.mmb_ctx_new(byref(p), byref(ctx)) or ctx.value is None:
        raise NoMemoryError("mmb_ctx_new failed", Status.ERR_NOMEM)
    try:
        s = _L.mmb_pool_tokens(ctx.value, modes[mode], a.ctypes.data, a.shape[0], a.shape[1], a.shape[2],
                               out.ctypes.data, out.size)
        if s:
            raise _error(ctx.value, s)
    finally:
        _L.mmb_ctx_free(ctx.value)
    return out
