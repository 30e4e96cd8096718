"""Hostile chat templates (issue 20, part 1) through `mmbridge tokenize DIR --chat`.

A checkpoint's chat template is a program from the internet. Each template below once crashed the
process (stack overflow, SIGFPE) or ran without bound in time or memory; now each must end the process
with a non-zero exit (not a signal), a clear message naming the template and the limit, within a
timeout, under an address-space limit of 2 GiB. The limits are stated in src/text/chat.c and
docs/decisions.md. Integer arithmetic is compared with jinja2's ImmutableSandboxedEnvironment (what
transformers renders with); results beyond 64 bits, where Jinja2 computes a Python big integer, are
refused by mmbridge."""
import subprocess
import time

import pytest

from conftest import BIN, address_space_limit
from test_chat_template import CONVERSATIONS, make_dir, oracle, render

AS_LIMIT = 2 << 30
TIMEOUT = 120
N = 100_000




def run_bounded(d):
    """Renders the template of d under RLIMIT_AS; returns (returncode, stderr, seconds)."""
    (d / "msgs.json").write_text('[{"role": "user", "content": "hi"}]')
    t0 = time.monotonic()
    p = subprocess.run([str(BIN), "tokenize", str(d), "--chat", str(d / "msgs.json")], capture_output=True,
                       timeout=TIMEOUT, preexec_fn=address_space_limit(AS_LIMIT))
    return p.returncode, p.stderr.decode("utf-8", "replace"), time.monotonic() - t0


NS_DEEP = "{% set ns = namespace(a=[], b=[]) %}{% for i in range(1000) %}{% set ns.a = [ns.a] %}{% set ns.b = [ns.b] %}{% endfor %}"

HOSTILE = {
    # one depth counter: the parser
    "parens": ("{{ " + "(" * N + "1" + ")" * N + " }}", "depth limit"),
    "not_chain": ("{{ " + "not " * N + "true }}", "depth limit"),
    "minus_chain": ("{{ " + "-" * N + "1 }}", "depth limit"),
    "list_literal": ("{{ " + "[" * N + "]" * N + " | tojson }}", "depth limit"),
    "blocks": ("{% if true %}" * 300 + "x" + "{% endif %}" * 300, "depth limit"),
    # ... evaluation (left-deep trees the parser builds without recursion)
    "filter_chain": ("{{ 'a'" + " | trim" * N + " }}", "depth limit"),
    "concat_chain": ("{{ 'x'" + " ~ 'x'" * N + " }}", "depth limit"),
    "plus_chain": ("{{ 1" + " + 1" * N + " }}", "depth limit"),
    # ... values: printing, tojson, equality
    "deep_tojson": (NS_DEEP + "{{ ns.a | tojson }}", "depth limit"),
    "deep_print": (NS_DEEP + "{{ ns.a }}", "depth limit"),
    "deep_equal": (NS_DEEP + "{{ ns.a == ns.b }}", "depth limit"),
    # cycles
    "self_namespace": ("{% set ns = namespace(a=1) %}{% set ns.me = ns %}{{ ns }}", "contains itself"),
    "list_cycle": ("{% set ns = namespace() %}{% set ns.l = [1, ns] %}{{ ns.l }}", "contains itself"),
    "self_namespace_concat": ("{% set ns = namespace(a=1) %}{% set ns.me = ns %}{{ 'x' ~ ns }}", "contains itself"),
    # integer traps and division by zero
    "int_min_floordiv": ("{{ (-9223372036854775807 - 1) // -1 }}", "64 bits"),
    "int_min_neg": ("{{ -(-9223372036854775807 - 1) }}", "64 bits"),
    "int_min_abs": ("{{ (-9223372036854775807 - 1) | abs }}", "64 bits"),
    "floordiv_zero": ("{{ 1 // 0 }}", "division by zero"),
    "mod_zero": ("{{ 1 % 0 }}", "division by zero"),
    "div_zero": ("{{ 1 / 0 }}", "division by zero"),
    "float_mod_zero": ("{{ 1.5 % 0.0 }}", "division by zero"),
    "divisibleby_zero": ("{{ 4 is divisibleby 0 }}", "division by zero"),
    "pow_huge": ("{{ 2 ** 10 ** 12 }}", "64 bits"),
    "literal_huge": ("{{ 99999999999999999999 }}", "beyond 64 bits"),
    # the execution budget
    "nested_ranges": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "limit"),
    "repeat_huge": ("{{ 'x' * 10 ** 12 }}", "arena limit"),
    "repeat_huge_left": ("{{ 10 ** 12 * 'x' }}", "arena limit"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s | length }}", "arena limit"),
    "output": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output limit"),
    "scan_steps": ("{% set s = 'x' * 100000000 %}{% for i in range(100000) %}{% if 'y' in s %}{% endif %}{% endfor %}",
                   "execution budget"),
    "range_cap": ("{{ range(100001) | length }}", "MAX_RANGE"),
    "range_cap_huge": ("{{ range(-9223372036854775807, 9223372036854775807, 3) | length }}", "MAX_RANGE"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_template_is_refused(tmp_path, name):
    tpl, needle = HOSTILE[name]
    rc, err, secs = run_bounded(make_dir(tmp_path / name, tpl))
    assert rc > 0, f"{name}: exit {rc} (a negative code is a signal) {err[-500:]!r}"
    assert "chat template" in err and "tokenizer_config" in err, err[-500:]
    assert needle in err, err[-500:]
    assert secs < TIMEOUT


def sandbox_render(tpl):
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(tpl).render(messages=[], add_generation_prompt=False)


EXACT = ["9007199254740993 - 0", "9007199254740993 + 2", "9007199254740993 * 1", "9223372036854775807 - 1",
         "-9223372036854775807 - 1", "(-9223372036854775807 - 1) % -1", "(-9223372036854775807 - 1) // 1",
         "9223372036854775807 // 2", "9223372036854775807 % 10", "-7 // 2", "7 // -2", "-7 % 3", "7 % -3",
         "2 ** 62", "(-2) ** 63", "3 ** 39", "10 ** 18", "2 ** -1", "0 ** 0",
         "9007199254740993 > 9007199254740992", "9007199254740993 == 9007199254740992.0",
         "9007199254740992 == 9007199254740992.0", "9007199254740993 < 9007199254740994.0", "1 < 1.5",
         "7.5 // 2", "-7.5 % 2", "-7.5 // 2", "7 // 2.0", "1e308 * 10", "3 * 'ab'", "[1, 'a'] * 2", "-true",
         "true + true", "(-9) | abs", "9007199254740993 | string", "range(5, 100, 7) | list",
         "range(10, -10, -3) | list", "range(100000) | length", "[1, [2, 3]] == [1, [2, 3]]", "15 is divisibleby(-1)",
         "'abcdef'[::9223372036854775807]", "'abcdef'[-9223372036854775807:9223372036854775807]",
         # once a hang: 4.7e15 copies of nothing
         "'' * 4777203685477580", "([] * 4777203685477580) | length", "4777203685477580 * ''",
         # a bool is an int to range(), as in Python
         "range(True, 3) | list", "range(false, true + 3, true) | list"]


def test_exact_integers_match_jinja2(tmp_path):
    tpl = "\n".join("{{ %s }}" % e for e in EXACT)
    want = sandbox_render(tpl)
    d = make_dir(tmp_path / "exact", tpl)
    ok, got = render(d, CONVERSATIONS["single"], False)
    assert ok, got
    for e, w, g in zip(EXACT, want.split("\n"), got.split("\n")):
        assert g == w, f"{e}: jinja2 {w!r}, mmbridge {g!r}"
    assert got == want


BEYOND = ["9223372036854775807 * 2", "3 ** 100", "9223372036854775807 + 1", "-9223372036854775807 - 2",
          "(-9223372036854775807 - 1) // -1", "2 ** 63"]


@pytest.mark.parametrize("e", BEYOND)
def test_beyond_64_bits_is_refused(tmp_path, e):
    """Jinja2 computes a big integer; mmbridge refuses instead of printing a rounded float."""
    assert abs(int(sandbox_render("{{ %s }}" % e))) >= 2 ** 63
    d = make_dir(tmp_path / "b", "{{ %s }}" % e)
    ok, err = render(d, CONVERSATIONS["single"], False)
    assert not ok and "64 bits" in err and "chat template" in err, err


def test_range_cap_is_jinja2s(tmp_path):
    """range(100000) renders in both; range(100001) is refused by both (the sandbox's MAX_RANGE)."""
    from jinja2.sandbox import MAX_RANGE
    assert MAX_RANGE == 100000
    with pytest.raises(OverflowError):
        sandbox_render("{{ range(100001) | length }}")
    d = make_dir(tmp_path / "r", "{{ range(100000) | length }}")
    assert render(d, CONVERSATIONS["single"], False) == (True, "100000")


def test_long_conversation_is_within_the_limits(tmp_path):
    """A 2000-message conversation through Qwen2.5's template (tools, tool calls) stays far inside the
    budgets and matches transformers."""
    from test_chat_template import QWEN25
    d = make_dir(tmp_path / "q", QWEN25, "chat_template.jinja")
    msgs = []
    for i in range(1000):
        msgs += [{"role": "user", "content": f"question {i} " + "x" * 200}, {"role": "assistant", "content": f"answer {i}"}]
    ok, want = oracle(d, msgs, True)
    assert ok
    assert render(d, msgs, True) == (True, want)
