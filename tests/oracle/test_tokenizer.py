"""Oracle tests for the tokenizer (src/lm/tokenizer.c) through `mmbridge tokenize`.

Tiny tokenizers are trained here with the `tokenizers` library in the layouts real checkpoints
use: a byte-level BPE with Qwen2's NFC normalizer and Split regex, a Llama-3-like one (its regex,
ignore_merges, a BOS post-processor), a Llama-2-like SentencePiece BPE with byte fallback
(Prepend/Replace normalizer, Replace/ByteFallback/Fuse/Strip decoder) and the Metaspace form
transformers 5 writes for Llama. Every text of a corpus with Unicode, whitespace runs and special
tokens must encode to the ids `tokenizers` gives, and decode to its text."""
import json
import re
import subprocess

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from conftest import BIN, run, write_json

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "Hello world",
    "Hello, World! How are you doing today?",
    "  leading spaces", "trailing spaces   ", "multiple   internal    spaces  and\ttabs\t\there",
    "new\nlines\n\n\nmany\r\nwindows\r\n", "\n", " ", "", "\t", "   \n  \n",
    "numbers 12345 and 3.14159, 1,000,000 and 2024-01-01",
    "你好，世界！这是一个测试。", "日本語のテキストです", "한국어 텍스트",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷 llama 🦙",
    "café naïve résumé", "cafe\u0301 nai\u0308ve re\u0301sume\u0301 (combining marks)",
    "שלום עולם", "مرحبا بالعالم 123",
    "I'm sure we can't, we'll see; they've gone, you'd know. SHE'S HERE, It'S",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "a<image>b <image>\nDescribe the image.", "<image><image>", "USER: <image>\nWhat is this? ASSISTANT:",
    "<s>[INST] hello [/INST] answer</s>", "text with <mask> and  <mask>  spaced",
    "def f(x):\n    return x**2  # comment\n\n\tpass",
    "nbsp\u00a0here, nel\u0085there, zero\u200bwidth, ideographic\u3000space",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math and ſ long s",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...,,,;;;:::---___===+++",
    "the quick brown fox jumps over the lazy dog " * 3,
]

TRAIN = CORPUS[:-1] + ["the quick brown fox jumps over the lazy dog. Hello there! " * 4,
                       "The tokenizer splits words into pieces, and pieces merge into tokens.",
                       "你好世界 你好 世界 测试 日本語 テキスト", "1234567890 0987654321"] * 3


def byte_level(pattern, ignore_merges=False, bos=None):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + ([bos] if bos else [])
    tok.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=specials, show_progress=False))
    if bos:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # added tokens as LLaVA and others use them: special and not, normalized or not, with strip flags
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False),
                    AddedToken("<mask>", special=False, lstrip=True, rstrip=True, normalized=False),
                    AddedToken("quick brown", special=False, normalized=True),
                    AddedToken("fox", special=False, single_word=True, normalized=False)])
    return tok


def sentencepiece_like(form):
    """A Llama-2-like tokenizer: vocab <unk>, <s>, </s>, the 256 byte tokens, then trained pieces
    over a reduced alphabet (so byte fallback runs for the rest)."""
    base = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=500, limit_alphabet=60, show_progress=False,
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    j = json.loads(base.to_str())
    trained = [t for t, _ in sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in ("<unk>", "<s>", "</s>")]
    vocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + trained
    j["model"]["vocab"] = {t: i for i, t in enumerate(vocab)}
    j["added_tokens"] = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
                         for i, c in enumerate(["<unk>", "<s>", "</s>"])]
    tok = Tokenizer.from_str(json.dumps(j))
    seq = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    if form == "metaspace":  # what transformers 5's LlamaTokenizer builds and saves
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    elif form == "metaspace_split":  # the older Metaspace layout, its own decoder
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        seq = [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")]
    tok.decoder = decoders.Sequence(seq)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    return tok


KINDS = {
    "qwen2": lambda: byte_level(QWEN2_PATTERN),
    "llama3": lambda: byte_level(LLAMA3_PATTERN, ignore_merges=True, bos="<|begin_of_text|>"),
    "llama2": lambda: sentencepiece_like("normalizer"),
    "llama2_metaspace": lambda: sentencepiece_like("metaspace"),
    "metaspace_split": lambda: sentencepiece_like("metaspace_split"),
}


@pytest.fixture(scope="module", params=list(KINDS))
def tok_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    tok = KINDS[request.param]()
    tok.save(str(d / "tokenizer.json"))
    return request.param, tok, d


def encode(d, text, tmp_path, special=False):
    f = tmp_path / "text.txt"
    f.write_bytes(text.encode("utf-8"))
    out = run("tokenize", d, "--file", f, *(["--special"] if special else [])).stdout.split()
    return [int(x) for x in out]


def run_bytes(*args):
    """Runs the CLI and returns its stdout as text decoded from the exact bytes (no newline translation)."""
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, timeout=300)
    err = p.stderr.decode("utf-8", "replace")
    assert "Sanitizer" not in err and "runtime error:" not in err, err
    assert p.returncode == 0, err
    return p.stdout.decode("utf-8")


def decode(d, ids, skip=False):
    return run_bytes("tokenize", d, "--decode", ",".join(map(str, ids)) or ",", *(["--skip-special"] if skip else []))


def encode_batch(d, texts, tmp_path, special=False):
    (tmp_path / "texts.json").write_text(json.dumps(texts, ensure_ascii=False))
    out = run_bytes("tokenize", d, "--batch", tmp_path / "texts.json", *(["--special"] if special else []))
    return [[int(x) for x in line.split()] for line in out.split("\n")[:-1]]


def decode_batch(d, id_lists, tmp_path, skip=False):
    (tmp_path / "ids.json").write_text(json.dumps(id_lists))
    return json.loads(run_bytes("tokenize", d, "--decode-batch", tmp_path / "ids.json", *(["--skip-special"] if skip else [])))


def test_encode_matches_tokenizers(tok_dir, tmp_path):
    kind, tok, d = tok_dir
    assert encode(d, CORPUS[1], tmp_path) == tok.encode(CORPUS[1], add_special_tokens=False).ids  # --file, one text
    for special in (False, True):
        got = encode_batch(d, CORPUS, tmp_path, special)
        assert len(got) == len(CORPUS)
        for text, ids in zip(CORPUS, got):
            want = tok.encode(text, add_special_tokens=special).ids
            assert ids == want, f"{kind}: {text!r} (special={special}): got {ids}, want {want}"


def test_features_are_exercised(tok_dir):
    """The corpus reaches the paths it is meant to test (so the comparison above means something)."""
    kind, tok, d = tok_dir
    all_ids = [i for text in CORPUS for i in tok.encode(text).ids]
    img = tok.token_to_id("<image>")
    assert img in all_ids
    if kind.startswith("llama2") or kind == "metaspace_split":
        assert any(3 <= i < 259 for i in all_ids), "byte fallback never used"
    else:
        assert tok.token_to_id("<mask>") in all_ids and tok.token_to_id("<|im_start|>") in all_ids
        assert tok.token_to_id("quick brown") in all_ids
        assert tok.encode("firefox").ids != [tok.token_to_id("fox")] and tok.token_to_id("fox") in tok.encode("a fox").ids


def test_decode_matches_tokenizers(tok_dir, tmp_path):
    kind, tok, d = tok_dir
    id_lists = [tok.encode(text, add_special_tokens=True).ids for text in CORPUS]
    for skip in (False, True):
        got = decode_batch(d, id_lists, tmp_path, skip)
        for text, ids, g in zip(CORPUS, id_lists, got):
            assert g == tok.decode(ids, skip_special_tokens=skip), f"{kind}: {text!r} skip={skip}"
    assert decode(d, id_lists[5], False) == tok.decode(id_lists[5], skip_special_tokens=False)  # --decode, exact bytes
    # broken byte sequences decode as tokenizers does (U+FFFD), token by token prefixes too
    ids = tok.encode("日本語 😀", add_special_tokens=False).ids
    prefixes = [ids[:k] for k in range(1, len(ids) + 1)]
    assert decode_batch(d, prefixes, tmp_path) == [tok.decode(p, skip_special_tokens=False) for p in prefixes]


def test_stream_decode_is_valid_utf8_and_complete(tok_dir):
    kind, tok, d = tok_dir
    text = "日本語のテキスト 😀👍🏽 café 🦙 𝔘𝔫𝔦 done"
    ids = tok.encode(text, add_special_tokens=True).ids
    lines = run("tokenize", d, "--decode", ",".join(map(str, ids)), "--stream").stdout.split("\n")[:-1]
    assert len(lines) == len(ids) + 1  # one line per call, the flush included
    pieces = [bytes.fromhex(x).decode("utf-8", errors="strict") for x in lines]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)


def test_random_ids_decode_and_stream_as_tokenizers(tok_dir, tmp_path):
    """Id lists no encoder would make (byte tokens that are not UTF-8, vocabulary pieces in any order): decode equals
    tokenizers' decode, and the streamed pieces join to it. Two bugs these found: a run of byte-fallback tokens was
    streamed before it ended (tokenizers turns the whole run into U+FFFD when any byte is wrong, so a complete
    character already handed out became wrong), and Metaspace's decoder kept the inner spaces of the first token."""
    import random
    kind, tok, d = tok_dir
    rs = random.Random(1)
    byte_ids = [i for i in range(tok.get_vocab_size()) if re.fullmatch(r"<0x[0-9A-F]{2}>", tok.id_to_token(i) or "")]
    lists = [[rs.choice(byte_ids) if byte_ids and rs.random() < 0.6 else rs.randrange(tok.get_vocab_size())
              for _ in range(rs.randint(1, 12))] for _ in range(40)]
    want = [tok.decode(ids, skip_special_tokens=False) for ids in lists]
    assert decode_batch(d, lists, tmp_path) == want
    for ids, w in zip(lists, want):
        lines = run("tokenize", d, "--decode", ",".join(map(str, ids)), "--stream").stdout.split("\n")[:-1]
        assert b"".join(bytes.fromhex(x) for x in lines).decode("utf-8", errors="strict") == w, ids


@pytest.mark.parametrize("cls", ["PreTrainedTokenizerFast", "LlamaTokenizer"])
def test_autotokenizer_ids_and_special_ids(tmp_path, cls):
    """transformers' AutoTokenizer on the same files (BOS from the file's post-processor). With
    tokenizer_class LlamaTokenizer, transformers 5 rebuilds the pipeline around Metaspace: the ids
    then differ from the file's own after added tokens, and mmbridge follows transformers."""
    from transformers import AutoTokenizer
    tok = sentencepiece_like("normalizer")
    tok.save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "tokenizer_config.json", {
        "tokenizer_class": cls, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False})
    write_json(tmp_path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, 5]})
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    wants = [hf(text).input_ids for text in CORPUS]
    assert all(w[:1] == [1] for w in wants)
    assert encode_batch(tmp_path, CORPUS, tmp_path, special=True) == wants
    assert decode_batch(tmp_path, wants, tmp_path, skip=True) == [hf.decode(w, skip_special_tokens=True) for w in wants]
    differs = sum(w != tok.encode(text).ids for text, w in zip(CORPUS, wants))
    assert (differs > 0) == (cls == "LlamaTokenizer")
    info = json.loads(run("tokenize", tmp_path, "--info").stdout)
    assert info == {"vocab_size": len(hf), "bos_id": hf.bos_token_id, "eos_id": hf.eos_token_id, "stop_ids": [2, 5]}
    # without generation_config.json the stop ids come from config.json's text_config
    (tmp_path / "generation_config.json").unlink()
    write_json(tmp_path / "config.json", {"text_config": {"eos_token_id": 2}})
    assert json.loads(run("tokenize", tmp_path, "--info").stdout)["stop_ids"] == [2]


def test_wrong_merge_order_changes_ids(tmp_path):
    """The comparison is sensitive: the same tokenizer with its merges reversed encodes differently."""
    tok = byte_level(QWEN2_PATTERN)
    j = json.loads(tok.to_str())
    j["model"]["merges"] = j["model"]["merges"][::-1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    text = "the quick brown fox jumps over the lazy dog. Hello there!"
    assert encode(tmp_path, text, tmp_path) == Tokenizer.from_str(json.dumps(j)).encode(text).ids
    assert encode(tmp_path, text, tmp_path) != tok.encode(text).ids


def test_merges_as_strings(tmp_path):
    """Older files store merges as "a b" strings."""
    tok = sentencepiece_like("normalizer")
    j = json.loads(tok.to_str())
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(j, ensure_ascii=False))
    for text in CORPUS[:6]:
        assert encode(tmp_path, text, tmp_path) == tok.encode(text, add_special_tokens=False).ids


def test_bad_input(tmp_path):
    # missing tokenizer.json
    p = run("tokenize", tmp_path, "--text", "hi", check=False)
    assert p.returncode != 0 and "tokenizer.json" in p.stderr and p.stdout == ""
    # malformed JSON
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
    p = run("tokenize", tmp_path, "--text", "hi", check=False)
    assert p.returncode != 0 and "malformed JSON" in p.stderr and "tokenizer.json" in p.stderr
    # unknown model types are refused by name
    for kind in ("WordPiece", "Unigram"):
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": kind, "vocab": {"a": 0}}}))
        p = run("tokenize", tmp_path, "--text", "hi", check=False)
        assert p.returncode != 0 and kind in p.stderr and "not supported" in p.stderr
    # an unsupported component is named
    tok = sentencepiece_like("normalizer")
    j = json.loads(tok.to_str())
    j["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    p = run("tokenize", tmp_path, "--text", "hi", check=False)
    assert p.returncode != 0 and "Precompiled" in p.stderr
    # a merge naming an absent token
    j = json.loads(tok.to_str())
    j["model"]["merges"].append(["zzz", "qqq"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    p = run("tokenize", tmp_path, "--text", "hi", check=False)
    assert p.returncode != 0 and "zzz" in p.stderr
    # invalid UTF-8 text
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "bad.txt").write_bytes(b"abc\xff\xfedef")
    p = run("tokenize", tmp_path, "--file", tmp_path / "bad.txt", check=False)
    assert p.returncode != 0 and "UTF-8" in p.stderr and "byte 3" in p.stderr and p.stdout == ""
