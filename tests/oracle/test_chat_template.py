"""Oracle tests for chat templates (src/lm/chat.c) through `mmbridge tokenize DIR --chat`.

The templates are the ones real checkpoints ship (copied from their tokenizer_config.json /
chat_template.json): Llama-2-chat, Mistral-Instruct v0.1 and the multi-line v0.2 form, Vicuna,
llava-hf's LLaVA-1.5 processor template (typed content parts), Qwen2 ChatML, Qwen2.5 with tools,
Qwen2-VL, Llama-3-Instruct. transformers' apply_chat_template(tokenize=False) is the oracle; the
output must be byte-identical, or both must refuse with the template's own message."""
import json
import subprocess

import pytest
from tokenizers import AddedToken, Tokenizer, models

from conftest import BIN, write_json

LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
          "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
          "user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = "
          "'<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}"
          "{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif "
          "message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

MISTRAL_V01 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
               "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are "
               "supported!') }}{% endif %}{% endfor %}")

MISTRAL_V02 = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

VICUNA = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{{ messages[0]['content'].strip() + '\\n\\n' }}"
          "{% else %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
          "{{ 'USER: ' + message['content'].strip() + '\\n' }}{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + "
          "message['content'].strip() + eos_token + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

LLAVA15_HF = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
              "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
              "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
              "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
              "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}"
              "{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a "
         "helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
         "+ '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

QWEN2_VL = ("{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
            "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
            "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
            "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
            "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
            "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
            "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
            "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

TEMPLATES = {"llama2": LLAMA2, "mistral_v01": MISTRAL_V01, "mistral_v02": MISTRAL_V02, "vicuna": VICUNA, "llava15_hf": LLAVA15_HF,
             "qwen2": QWEN2, "qwen25": QWEN25, "qwen2_vl": QWEN2_VL, "llama3": LLAMA3}

SYSTEM = {"role": "system", "content": "You are a helpful assistant.\nAnswer briefly, in \"plain\" text."}
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello! What's 2+2?"}],
    "multi": [{"role": "user", "content": "  Hi there  \n"}, {"role": "assistant", "content": " Hello. How can I help? "},
              {"role": "user", "content": "Describe 日本 😀 in one line.\tThanks"}],
    "system": [SYSTEM, {"role": "user", "content": "<image>\nWhat is in the image?"},
               {"role": "assistant", "content": "A llama 🦙 on grass."}, {"role": "user", "content": "And the color?"}],
    "system_only_user": [SYSTEM, {"role": "user", "content": "Quote: 'it''s' and \\ backslash"}],
}


def as_parts(conv):
    """The typed-content form processors use: "<image>\\n" placeholders become image parts."""
    out = []
    for m in conv:
        text = m["content"]
        parts = []
        while text.startswith("<image>\n"):
            parts.append({"type": "image"})
            text = text[len("<image>\n"):]
        parts.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": parts})
    return out


def make_dir(d, template, where="tokenizer_config"):
    """A tokenizer directory whose tokenizer_config.json (or chat_template.json / .jinja) holds `template`."""
    d.mkdir(parents=True, exist_ok=True)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "ab": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if where == "tokenizer_config":
        cfg["chat_template"] = template
    elif where == "chat_template.json":
        write_json(d / "chat_template.json", {"chat_template": template})
    else:
        (d / "chat_template.jinja").write_text(template + "\n")
    write_json(d / "tokenizer_config.json", cfg)
    return d


def render(d, messages, gen, extra=None):
    """Runs mmbridge's renderer; returns (ok, text or stderr)."""
    (d / "msgs.json").write_text(json.dumps(messages, ensure_ascii=False))
    args = [str(BIN), "tokenize", str(d), "--chat", str(d / "msgs.json")] + (["--gen-prompt"] if gen else [])
    if extra is not None:
        (d / "vars.json").write_text(json.dumps(extra, ensure_ascii=False))
        args += ["--vars", str(d / "vars.json")]
    p = subprocess.run(args, capture_output=True, timeout=120)
    err = p.stderr.decode("utf-8", "replace")
    assert "Sanitizer" not in err and "runtime error:" not in err, err
    return (True, p.stdout.decode("utf-8")) if p.returncode == 0 else (False, err)


def oracle(d, messages, gen, template=None, **kw):
    """transformers' rendering with the tokenizer of d (its special tokens) and `template` (default:
    the template of d, given explicitly: a tokenizer does not read chat_template.json, a processor does)."""
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(d))
    if template is None:
        for f in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
            if (d / f).exists():
                template = (d / f).read_text() if f.endswith("jinja") else json.loads((d / f).read_text()).get("chat_template")
                if template:
                    break
    try:
        return True, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen, chat_template=template, **kw)
    except TemplateError as e:
        return False, str(e)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_match_transformers(tmp_path, name):
    where = {"llava15_hf": "chat_template.json", "qwen25": "chat_template.jinja"}.get(name, "tokenizer_config")
    d = make_dir(tmp_path / name, TEMPLATES[name], where)
    typed = name in ("llava15_hf", "qwen2_vl")
    compared = 0
    for conv_name, conv in CONVERSATIONS.items():
        msgs = as_parts(conv) if typed else conv
        for gen in (False, True):
            ok, want = oracle(d, msgs, gen)
            got_ok, got = render(d, msgs, gen)
            assert got_ok == ok, f"{name}/{conv_name}/gen={gen}: transformers {'rendered' if ok else 'raised'} {want!r}, mmbridge {got!r}"
            if ok:
                assert got == want, f"{name}/{conv_name}/gen={gen}"
                compared += 1
            else:
                assert want in got, f"{name}/{conv_name}: the template's own message is reported"
    assert compared >= 4


def test_string_content_with_typed_template(tmp_path):
    """A plain-string content with a parts template (llava-hf) renders as transformers renders the
    typed form [{"type": "image"}, {"type": "text", ...}]: "USER: <image>\\nWhat ... ASSISTANT:"."""
    d = make_dir(tmp_path / "llava", LLAVA15_HF, "chat_template.json")
    for conv in (CONVERSATIONS["system"], CONVERSATIONS["single"]):
        ok, want = oracle(d, as_parts(conv), True)
        assert ok
        assert render(d, conv, True) == (True, want)
    assert want.startswith("USER: ") and want.endswith("ASSISTANT:")


def test_qwen25_tools_and_tool_calls(tmp_path):
    d = make_dir(tmp_path / "q", QWEN25, "chat_template.jinja")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather at a place, \"now\".",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    msgs = [{"role": "user", "content": "Weather in Zürich?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Zürich", "units": None, "days": 2, "ratio": 0.5, "ok": True}}}]},
            {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "21 degrees and sunny."}]
    ok, want = oracle(d, msgs, True, tools=tools)
    assert ok
    assert render(d, msgs, True, extra={"tools": tools}) == (True, want)
    ok, want = oracle(d, msgs, False)
    assert render(d, msgs, False) == (True, want)


def test_jinja_semantics(tmp_path):
    """Constructs beyond the shipped templates, each against jinja2 as transformers configures it."""
    tpl = """{%- set ns = namespace(n=0, names=[]) -%}
{% for m in messages if m.role != 'system' %}
  {%- set ns.n = ns.n + 1 %}
  {{ loop.index }}/{{ loop.length }} {{ loop.revindex0 }} {{ m.role | upper }}: {{ m.content | trim | length }} {{ m['content'][:5] }}|{{ m.content[-3:] }}
  {% if loop.first %}first{% elif loop.last %}last{% else %}mid{% endif %}
{% else %}
  empty
{% endfor %}
{{ ns.n }} {{ messages | map(attribute='role') | join(',') }} {{ messages | selectattr('role', 'equalto', 'user') | list | length }}
{{ 7 // 2 }} {{ -7 % 3 }} {{ 1 / 4 }} {{ 2 ** 10 }} {{ 'ab' * 3 }} {{ 'x' ~ 1 ~ none }} {{ [1, 'a', none, true, 2.5] }} {{ {'k': 'v'} }}
{{ 'Hello World'.lower() }} {{ 'hello world'.title() }} {{ 'a,b,,c'.split(',') }} {{ ' x y '.split() }} {{ 'abc'.startswith(('x', 'a')) }}
{{ 'abc' if messages else 'none' }} {{ undefined_var is defined }} {{ undefined_var | default('dflt') }} {{ 'b' in 'abc' }} {{ 'z' not in ['a'] }}
{{ {'a': 1, 'b': [1, 2, {'c': "q\\"uote"}]} | tojson }} {{ {'a': 1} | tojson(indent=2) }} {{ messages[0].content | replace('\\n', ' ') }}
{%- for k, v in {'x': 1, 'y': 2}.items() %} {{ k }}={{ v }}{% if loop.last %};{% endif %}{% endfor %}
{% for i in range(3) %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %} {% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}
    {# an indented comment #}
  {%+ if true %}kept-indent{% endif +%}
done"""
    d = make_dir(tmp_path / "j", tpl)
    for conv in CONVERSATIONS.values():
        for gen in (False, True):
            ok, want = oracle(d, conv, gen)
            assert ok, want
            assert render(d, conv, gen) == (True, want)
    ok, want = oracle(d, [SYSTEM], False)  # every message filtered out: the for's else branch
    assert render(d, [SYSTEM], False) == (True, want) and "empty" in want


def test_whitespace_control_matters(tmp_path):
    """The comparison is sensitive to trim_blocks / lstrip_blocks: the multi-line template would differ
    without them (here checked against jinja2 without them)."""
    from jinja2 import Environment
    plain = Environment().from_string(MISTRAL_V02.replace("{%-", "{%").replace("{{-", "{{")).render(
        messages=CONVERSATIONS["multi"], bos_token="<s>", eos_token="</s>", raise_exception=None)
    d = make_dir(tmp_path / "m", MISTRAL_V02.replace("{%-", "{%").replace("{{-", "{{"))
    ok, want = oracle(d, CONVERSATIONS["multi"], False)
    assert ok and want != plain
    assert render(d, CONVERSATIONS["multi"], False) == (True, want)


def test_bad_templates(tmp_path):
    conv = CONVERSATIONS["single"]
    cases = {
        "{% macro f(x) %}{{ x }}{% endmacro %}{{ f(1) }}": "macro",
        "{{ messages | wordcount }}": "wordcount",
        "{% for m in messages %}{{ m.content }}": "endfor",
        "{{ messages[0].content.zfill(3) }}": "zfill",
        "{{ raise_exception('custom failure 42') }}": "custom failure 42",
        "{{ undefined_thing.attr }}": "undefined_thing",
        "{{ 'a' + 1 }}": "cannot add",
    }
    for i, (tpl, needle) in enumerate(cases.items()):
        d = make_dir(tmp_path / f"b{i}", tpl)
        ok, err = render(d, conv, False)
        assert not ok and needle in err and "chat template" in err, (tpl, err)
    # no chat template at all
    d = make_dir(tmp_path / "none", None)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    write_json(d / "tokenizer_config.json", cfg)
    ok, err = render(d, conv, False)
    assert not ok and "no chat template" in err
    # messages that are not a list
    d = make_dir(tmp_path / "q", QWEN2)
    ok, err = render(d, {"role": "user"}, False)
    assert not ok and "list" in err
