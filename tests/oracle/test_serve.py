"""mmbridge serve, run on 127.0.0.1 with a free port and an API key, against a tiny random LLaVA saved by
transformers (test_mllm's fixture), talked to with http.client and with the OpenAI Python client:
  - /v1/embeddings equals the CLI's `encode` bit for bit and transformers' get_image_features within 1e-4 (raw f32,
    base64 and a file path under --allow-path too); "layers" equal transformers' hidden_states; a wrong layer is far off;
  - /v1/chat/completions, streamed and not, equals `generate` (and transformers' greedy tokens); stop strings cut
    the text as OpenAI does;
  - bad requests get the right status and a JSON error, and the server keeps serving;
  - 200 requests from 8 clients are all answered, equal to the serial results, with no memory growth;
  - SIGTERM mid-stream stops it cleanly (exit 0; under ASan, no leak);
  - the web page, in headless Chromium, streams the answer and shows the embedding's shape."""
import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import BIN, VISION, run, sanitized, scaled_err
from test_mllm import llava  # noqa: F401 (the fixture)

KEY = "s3cret-key"
PROMPT = "Describe the image."
N_NEW = 24
MAX_BODY = 1 << 20


class Server:
    def __init__(self, proc, port):
        self.proc, self.port = proc, port

    def request(self, method, path, body=None, headers=None, key=KEY, timeout=120):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        if key:
            h["Authorization"] = "Bearer " + key
        h.update(headers or {})
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        out = r.status, dict(r.getheaders()), r.read()
        c.close()
        return out

    def json(self, method, path, body=None, **kw):
        st, hd, data = self.request(method, path, body, **kw)
        return st, json.loads(data)


def start(model_dir, tmp, *extra):
    args = [str(BIN), "serve", str(model_dir), "--port", "0", "--api-key", KEY, "--max-body", str(MAX_BODY),
            "--allow-path", str(tmp / "allowed"), "--threads", "2", *map(str, extra)]
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:exitcode=99")
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    line = ""
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stderr.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", line)
        if m:
            break
        if not line and p.poll() is not None:
            raise AssertionError(f"serve exited {p.returncode}: {p.stderr.read()}")
    else:
        p.kill()
        raise AssertionError("serve did not start: " + line)
    rest = []
    threading.Thread(target=lambda: rest.extend(p.stderr), daemon=True).start()
    s = Server(p, int(m.group(1)))
    s.log = rest
    return s


def stop(s, timeout=60):
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(timeout=timeout)
    time.sleep(0.2)
    log = "".join(s.log)
    assert "Sanitizer" not in log and "runtime error" not in log, log
    return rc, log


@pytest.fixture(scope="module")
def served(llava, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "allowed").mkdir()
    model, proc, d, image = llava
    shutil.copy(image, tmp / "allowed" / "img.png")
    (tmp / "outside.png").write_bytes(Path(image).read_bytes())
    (tmp / "allowed" / "notes.txt").write_text("not an image")
    s = start(d, tmp, "--parallel", "2")
    yield s, model, proc, d, Path(image), tmp
    rc, log = stop(s)
    assert rc == 0, log
    assert "stopped after" in log


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def chat_body(image, stream, **kw):
    body = dict(model="x", stream=stream, temperature=0, max_tokens=N_NEW,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                       {"type": "text", "text": PROMPT}]}])
    body.update(kw)
    return body


def sse_text(raw):
    pieces, finish, usage = [], None, None
    events = raw.decode().split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == "", events[-3:]
    for ev in events[:-2]:
        j = json.loads(ev[len("data: "):])
        if j.get("usage"):
            usage = j["usage"]
        for ch in j["choices"]:
            pieces.append(ch["delta"].get("content") or "")
            finish = ch["finish_reason"] or finish
    return "".join(pieces), finish, usage


def test_embeddings_equal_cli_and_transformers(served, tmp_path):
    s, model, proc, d, image, tmp = served
    out = tmp_path / "cli.safetensors"
    run("encode", d, image, "-o", out, "--threads", "1")
    cli = load_file(str(out))["embeddings"].numpy()
    st, j = s.json("POST", "/v1/embeddings", {"input": [data_url(image)], "model": "x"})
    assert st == 200, j
    e = j["data"][0]
    got = np.array(e["embedding"], dtype=np.float32).reshape(e["shape"])
    assert got.shape == cli.shape[1:] and np.array_equal(got, cli[0])  # bit for bit
    assert j["usage"]["prompt_tokens"] == e["shape"][0]
    px = proc.image_processor(Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        f = model.get_image_features(pixel_values=px, vision_feature_layer=-2, vision_feature_select_strategy="default")
    f = (torch.stack(list(f.pooler_output)) if hasattr(f, "pooler_output") else f).reshape(got.shape)
    assert scaled_err(torch.from_numpy(got), f) <= 1e-4
    with torch.no_grad():  # a wrong variant: the last layer's features instead of the configured -2
        w = model.get_image_features(pixel_values=px, vision_feature_layer=-1, vision_feature_select_strategy="default")
    w = (torch.stack(list(w.pooler_output)) if hasattr(w, "pooler_output") else w).reshape(got.shape)
    assert scaled_err(torch.from_numpy(got), w) > 1e-2
    # raw little-endian f32 with the shape in a header; base64; a path the server may read: all the same numbers
    st, hd, raw = s.request("POST", "/v1/embeddings", {"input": data_url(image)}, {"Accept": "application/octet-stream"})
    assert st == 200 and hd["Content-Type"] == "application/octet-stream"
    shape = [int(x) for x in hd["X-Mmb-Shape"].split(",")]
    assert shape == [1, *got.shape]
    assert np.array_equal(np.frombuffer(raw, "<f4").reshape(shape)[0], got)
    st, j = s.json("POST", "/v1/embeddings", {"input": data_url(image), "encoding_format": "base64"})
    assert np.array_equal(np.frombuffer(base64.b64decode(j["data"][0]["embedding"]), "<f4").reshape(got.shape), got)
    st, j = s.json("POST", "/v1/embeddings", {"input": [{"image_url": {"url": "img.png"}},
                                                        str(tmp / "allowed" / "img.png")]})
    assert st == 200, j
    for e in j["data"]:
        assert np.array_equal(np.array(e["embedding"], np.float32).reshape(got.shape), got)


def test_hidden_states_of_chosen_layers(served):
    s, model, proc, d, image, tmp = served
    st, j = s.json("POST", "/v1/embeddings", {"input": [data_url(image)] * 2, "layers": [1, -1]})
    assert st == 200, j
    assert [(e["image"], e["layer"]) for e in j["data"]] == [(0, 1), (0, -1), (1, 1), (1, -1)]
    px = proc.image_processor(Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states
    for e in j["data"]:
        got = torch.tensor(e["embedding"]).reshape(e["shape"])
        assert scaled_err(got, hs[e["layer"]][0]) <= 1e-4
        assert scaled_err(got, hs[2][0]) > 1e-2  # the neighbouring layer is far off
    st, hd, raw = s.request("POST", "/v1/embeddings", {"input": data_url(image), "layers": [1, -1],
                                                       "encoding_format": "raw"})
    assert hd["X-Mmb-Shape"] == f"1,2,{hs[1].shape[1]},{hs[1].shape[2]}"
    arr = np.frombuffer(raw, "<f4").reshape(1, 2, hs[1].shape[1], hs[1].shape[2])
    assert np.array_equal(arr[0, 0], np.array(j["data"][0]["embedding"], np.float32).reshape(arr.shape[2:]))


def cli_generate(d, image, *extra):
    out = run("generate", d, "--image", image, "--prompt", PROMPT, "-n", N_NEW, "--threads", "1", *extra).stdout
    assert out.endswith("\n")  # generate ends its output with a newline of its own
    return out[:-1]


def test_chat_streamed_and_not_equals_generate(served):
    s, model, proc, d, image, tmp = served
    want = cli_generate(d, image)
    st, hd, raw = s.request("POST", "/v1/chat/completions", chat_body(image, True, stream_options={"include_usage": True}))
    assert st == 200 and hd["Content-Type"] == "text/event-stream"
    text, finish, usage = sse_text(raw)
    assert text == want and finish == "length" and usage["completion_tokens"] == N_NEW
    st, j = s.json("POST", "/v1/chat/completions", chat_body(image, False))
    assert st == 200, j
    assert j["choices"][0]["message"]["content"] == want and j["object"] == "chat.completion"
    assert j["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    # transformers' greedy tokens, decoded, are the same text
    txt = proc.apply_chat_template([{"role": "user", "content": "<image>\n" + PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    inputs = proc(text=txt, images=Image.open(image).convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0)
    assert proc.tokenizer.decode(ref[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == want
    assert usage["prompt_tokens"] == inputs["input_ids"].shape[1]
    # a different image gives a different answer (the image reaches the LLM)
    other = tmp / "other.png"
    Image.fromarray(np.random.RandomState(9).randint(0, 256, (30, 30, 3), dtype=np.uint8)).save(other)
    st, j2 = s.json("POST", "/v1/chat/completions", chat_body(other, False))
    assert j2["choices"][0]["message"]["content"] != want


def test_stop_strings_cut_as_openai_does(served):
    s, model, proc, d, image, tmp = served
    want = cli_generate(d, image)
    stop = want[len(want) // 2:len(want) // 2 + 3]
    assert stop.strip()
    cut = want[:want.index(stop)]
    st, j = s.json("POST", "/v1/chat/completions", chat_body(image, False, stop=[stop]))
    assert j["choices"][0]["message"]["content"] == cut and j["choices"][0]["finish_reason"] == "stop"
    st, hd, raw = s.request("POST", "/v1/chat/completions", chat_body(image, True, stop=stop))
    text, finish, _ = sse_text(raw)
    assert text == cut and finish == "stop"
    assert text != want[:want.index(stop) + len(stop)]  # the stop string itself is not returned


def test_openai_client(served):
    openai = pytest.importorskip("openai")
    s, model, proc, d, image, tmp = served
    want = cli_generate(d, image)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key=KEY)
    msgs = chat_body(image, False)["messages"]
    r = c.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=N_NEW)
    assert r.choices[0].message.content == want
    pieces = [ch.choices[0].delta.content or "" for ch in
              c.chat.completions.create(model="x", messages=msgs, temperature=0, max_tokens=N_NEW, stream=True)
              if ch.choices]
    assert "".join(pieces) == want
    e = c.embeddings.create(model="x", input=[data_url(image)], encoding_format="float")
    st, j = s.json("POST", "/v1/embeddings", {"input": data_url(image)})
    assert e.data[0].embedding == j["data"][0]["embedding"]
    assert [m.id for m in c.models.list().data] == [d.name]
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_requests_refused_and_server_keeps_serving(served):
    s, model, proc, d, image, tmp = served
    good = {"input": data_url(image)}
    notimg = "data:image/png;base64," + base64.b64encode(b"this is not an image at all").decode()
    cases = [
        ("malformed JSON", "POST", "/v1/embeddings", b'{"input": [', {}, KEY, 400),
        ("not an object", "POST", "/v1/chat/completions", b"[1, 2]", {}, KEY, 400),
        ("huge body", "POST", "/v1/embeddings", b" " * (MAX_BODY + 10), {}, KEY, 413),
        ("bad base64", "POST", "/v1/embeddings", {"input": "data:image/png;base64,@@@@"}, {}, KEY, 400),
        ("not an image", "POST", "/v1/embeddings", {"input": notimg}, {}, KEY, 400),
        ("a text file", "POST", "/v1/embeddings", {"input": "notes.txt"}, {}, KEY, 400),
        ("outside the folder", "POST", "/v1/embeddings", {"input": str(tmp / "outside.png")}, {}, KEY, 403),
        ("escaping by ..", "POST", "/v1/embeddings", {"input": "../outside.png"}, {}, KEY, 403),
        ("remote URL", "POST", "/v1/embeddings", {"input": "https://example.com/a.png"}, {}, KEY, 400),
        ("wrong key", "POST", "/v1/embeddings", good, {}, "nope", 401),
        ("no key", "GET", "/v1/models", None, {}, None, 401),
        ("unknown route", "GET", "/v1/nothing", None, {}, KEY, 404),
        ("wrong method", "GET", "/v1/embeddings", None, {}, KEY, 405),
        ("no messages", "POST", "/v1/chat/completions", {"messages": []}, {}, KEY, 400),
        ("bad temperature", "POST", "/v1/chat/completions", dict(chat_body(image, False), temperature=7), {}, KEY, 400),
        ("too many markers", "POST", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "<image> <image> hi"}]}, {}, KEY, 400),
        ("too many images", "POST", "/v1/embeddings", {"input": [data_url(image)] * 17}, {}, KEY, 400),
    ]
    for name, method, path, body, hdr, key, want in cases:
        st, hd, data = s.request(method, path, body, hdr, key=key)
        assert st == want, (name, st, data[:300])
        err = json.loads(data)["error"]
        assert err["message"] and err["code"] == want, name
        st, j = s.json("GET", "/health", key=None)
        assert st == 200 and j["status"] == "ok", name
    st, j = s.json("POST", "/v1/embeddings", good)
    assert st == 200 and len(j["data"]) == 1
    st, j = s.json("GET", "/info")
    assert j["family"] == "llava" and j["has_lm"] == 1


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_load_200_requests_8_clients(served):
    s, model, proc, d, image, tmp = served
    emb = {"input": data_url(image)}
    chat = chat_body(image, False, max_tokens=4)
    ref_e = s.json("POST", "/v1/embeddings", emb)[1]["data"][0]["embedding"]
    ref_c = s.json("POST", "/v1/chat/completions", chat)[1]["choices"][0]["message"]["content"]

    def one(i):
        if i % 4 == 3:
            st, j = s.json("POST", "/v1/chat/completions", chat)
            return st, j["choices"][0]["message"]["content"] == ref_c
        st, j = s.json("POST", "/v1/embeddings", emb)
        return st, j["data"][0]["embedding"] == ref_e

    with ThreadPoolExecutor(8) as ex:  # a warm-up round, then the measured 200
        list(ex.map(one, range(40)))
        before = rss_kb(s.proc.pid)
        res = list(ex.map(one, range(200)))
    after = rss_kb(s.proc.pid)
    assert [r for r in res if r != (200, True)] == []  # every request answered, each equal to the serial result
    st, j = s.json("GET", "/health", key=None)
    assert j["queued"] == 0 and j["slots_busy"] == 0
    print(f"RSS before {before} kB, after 200 requests {after} kB")
    if not sanitized():  # ASan's quarantine grows by design; there the leak check at exit is the test
        assert after - before < 16 * 1024


def test_sigterm_mid_stream_stops_cleanly(llava, tmp_path):  # noqa: F811
    model, proc, d, image = llava
    (tmp_path / "allowed").mkdir()
    s = start(d, tmp_path, "--max-tokens", "100000")
    c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    body = chat_body(image, True)
    body["max_tokens"] = 100000
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": "Bearer " + KEY})
    r = c.getresponse()
    assert r.status == 200
    first = r.readline()
    assert first.startswith(b"data: ")
    t0 = time.time()
    rc, log = stop(s)
    assert rc == 0 and "SIGTERM: stopping" in log and "stopped after" in log, log
    assert time.time() - t0 < 30
    rest = r.read()  # the stream ended: a finish event and [DONE]
    assert rest.endswith(b"data: [DONE]\n\n")


class Chromium:
    """Headless Chromium driven over its DevTools pipe (--remote-debugging-pipe: JSON messages ending in NUL on
    fds 3 and 4), so the test waits for the page's own signal instead of guessing a time."""

    def __init__(self, exe, profile):
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()

        def fds():
            os.dup2(to_chrome, 3)
            os.dup2(from_chrome, 4)
        self.p = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                   "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                   "--window-size=1100,700", "about:blank"], preexec_fn=fds, pass_fds=(3, 4),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self.n, self.buf = 0, b""
        tid = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=tid, flatten=True)["sessionId"]

    def call(self, method, session=None, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self._r, 1 << 20)
                assert chunk, "Chromium closed its pipe"
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            r = json.loads(raw)
            if r.get("id") == self.n:
                assert "error" not in r, r
                return r["result"]

    def page(self, method, **params):
        return self.call(method, session=self.session, **params)

    def eval(self, expr):
        return self.page("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def close(self):
        self.p.kill()
        self.p.wait()
        os.close(self._w)
        os.close(self._r)


def test_web_page_in_headless_chromium(served, tmp_path):
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chrome:
        pytest.skip("no Chromium")
    s, model, proc, d, image, tmp = served
    want = cli_generate(d, image)
    from urllib.parse import quote
    url = f"http://127.0.0.1:{s.port}/#key={quote(KEY)}&n={N_NEW}&q={quote(PROMPT)}&image={quote(data_url(image), safe='')}"
    b = Chromium(chrome, tmp_path / "profile")
    try:
        b.page("Page.enable")
        b.page("Emulation.setDeviceMetricsOverride", width=1100, height=700, deviceScaleFactor=1, mobile=False)
        b.page("Page.navigate", url=url)
        deadline = time.time() + 240
        while b.eval("document.body && document.body.dataset.state") not in ("done", "error") and time.time() < deadline:
            time.sleep(0.2)
        assert b.eval("document.body.dataset.state") == "done", b.eval("document.getElementById('status').textContent")
        assert b.eval("document.getElementById('answer').textContent") == want
        per = (VISION["image_size"] // VISION["patch_size"]) ** 2
        assert b.eval("document.getElementById('shape').textContent") == f"1 x {per} x {model.config.text_config.hidden_size}"
        shot = tmp_path / "page.png"
        shot.write_bytes(base64.b64decode(b.page("Page.captureScreenshot", format="png")["data"]))
    finally:
        b.close()
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (700, 1100, 3)
    # the page is drawn: the dark header band, the white cards on the grey ground, and the answer's text
    assert (img[5:40].mean(axis=(0, 1)) < 80).all() and img.std() > 20
    keep = Path(os.environ.get("MMB_SCREENSHOT_DIR", tmp_path))
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / "serve_page.png")


def test_multi_turn_conversation_matches_transformers(served):
    """A system message, a user turn with an image, the assistant's reply and a second user turn: the prompt is
    transformers' apply_chat_template + processor, and the greedy answer is model.generate's."""
    s, model, proc, d, image, tmp = served
    conv = [{"role": "system", "content": "You look at pictures."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": "Noise."},
            {"role": "user", "content": "And the colours?"}]
    st, j = s.json("POST", "/v1/chat/completions", {"messages": conv, "temperature": 0, "max_tokens": N_NEW})
    assert st == 200, j
    ref_conv = [{"role": "system", "content": "You look at pictures."},
                {"role": "user", "content": "<image>\n" + PROMPT},
                {"role": "assistant", "content": "Noise."},
                {"role": "user", "content": "And the colours?"}]
    txt = proc.apply_chat_template(ref_conv, tokenize=False, add_generation_prompt=True)
    inputs = proc(text=txt, images=Image.open(image).convert("RGB"), return_tensors="pt")
    assert j["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    with torch.no_grad():
        ref = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0)
    want = proc.tokenizer.decode(ref[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert j["choices"][0]["message"]["content"] == want
    # a wrong variant: the last user turn alone is another prompt, and another answer
    st, j1 = s.json("POST", "/v1/chat/completions", {"messages": conv[3:], "temperature": 0, "max_tokens": N_NEW})
    assert j1["usage"]["prompt_tokens"] < j["usage"]["prompt_tokens"] - 4


def test_limits_pixels_and_tokens(llava, tmp_path):  # noqa: F811
    """--max-pixels refuses a larger image before decoding it; --max-tokens caps what a request asks."""
    model, proc, d, image = llava
    (tmp_path / "allowed").mkdir()
    s = start(d, tmp_path, "--max-pixels", "1000", "--max-tokens", "5")
    try:
        st, j = s.json("POST", "/v1/embeddings", {"input": data_url(image)})  # 45 x 37 = 1665 pixels
        assert st == 400 and "pixels" in j["error"]["message"], j
        small = tmp_path / "small.png"
        Image.fromarray(np.random.RandomState(5).randint(0, 256, (30, 30, 3), dtype=np.uint8)).save(small)
        st, j = s.json("POST", "/v1/chat/completions", chat_body(small, False, max_tokens=24))
        assert st == 200 and j["usage"]["completion_tokens"] == 5 and j["choices"][0]["finish_reason"] == "length"
    finally:
        rc, log = stop(s)
    assert rc == 0, log


def test_queue_full_and_disconnect(llava, tmp_path):  # noqa: F811
    """One slot and --queue 0: a second request while a long stream runs is refused with 503; the streaming client
    going away aborts its generation and frees the slot."""
    model, proc, d, image = llava
    (tmp_path / "allowed").mkdir()
    long = tmp_path / "long"  # the same model with a context long enough for a generation of minutes
    shutil.copytree(d, long)
    cfg = json.loads((long / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 200000
    (long / "config.json").write_text(json.dumps(cfg))
    s = start(long, tmp_path, "--parallel", "1", "--queue", "0", "--max-tokens", "100000")
    try:
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        c.request("POST", "/v1/chat/completions", json.dumps(chat_body(image, True, max_tokens=100000, ignore_eos=True)),
                  {"Authorization": "Bearer " + KEY})
        r = c.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        st, hd, data = s.request("POST", "/v1/embeddings", {"input": data_url(image)})
        assert st == 503 and json.loads(data)["error"]["code"] == 503
        assert s.json("GET", "/health", key=None)[1]["slots_busy"] == 1
        c.close()  # the client goes away mid-stream
        deadline = time.time() + 30
        while s.json("GET", "/health", key=None)[1]["slots_busy"] and time.time() < deadline:
            time.sleep(0.05)
        assert s.json("GET", "/health", key=None)[1]["slots_busy"] == 0
        st, j = s.json("POST", "/v1/embeddings", {"input": data_url(image)})
        assert st == 200
    finally:
        rc, log = stop(s)
    assert rc == 0, log
