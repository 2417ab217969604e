"""Property tests of the front end (hypothesis).

(a) Robustness: random text, token soups and random mutations of policies/trading_floor.zt
    never make `check_policy` or `format_policy` raise anything but a P4segError (and
    check_policy returns its diagnostics instead of raising); every diagnostic renders.
(b) `fmt` on every policy that parses (generated from grammar pieces: services, rules with
    protocols, ports and options, defaults, expectations, comments, blank lines and odd
    spacing): idempotent, canonical (no trailing blanks, at most one blank line), and
    meaning-preserving: the AST of the formatted text equals the original's once spans are
    stripped and options put in fmt's documented order, with every comment kept in order.
(c) Random mutations of an inventory YAML never raise anything but InventoryError.

At the end: regression tests for bugs found while writing these properties (huge numerals,
non-ASCII digits, deep YAML nesting, excerpts of files with line separators other than \\n).

P4SEG_PROPERTY_EXAMPLES=N runs every property with N examples instead of 200.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from compiler import ast
from compiler.check import check_policy
from compiler.diagnostics import (
    InventoryError,
    P4segError,
    PolicySyntaxError,
    SourceFiles,
    render_all,
)
from compiler.fmt import format_policy
from compiler.inventory import Inventory, load_inventory, parse_inventory
from compiler.parse import KEYWORDS, parse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "policies" / "trading_floor.zt").read_text()
FLOOR_TEXT = (ROOT / "topologies" / "trading_floor.yaml").read_text()
FLOOR, _ = load_inventory(str(ROOT / "topologies" / "trading_floor.yaml"))
HOSTS = sorted(FLOOR.hosts_by_name)

# P4SEG_PROPERTY_EXAMPLES=5000 for a deeper run; 200 keeps the suite fast.
PROPERTY = settings(
    max_examples=int(os.environ.get("P4SEG_PROPERTY_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
_CODE = re.compile(r"^[EW]\d{3}$")


# -- helpers -------------------------------------------------------------------------------


SAFE_CHARS = st.characters(exclude_categories=["Cs"])


def check_never_crashes(text: str, inventory: Inventory = FLOOR) -> None:
    """check_policy and format_policy on `text`: P4segError or success, nothing else."""
    try:
        result = check_policy(text, "fuzz.zt", inventory)
    except P4segError:  # documented as never raising; tolerated but must be typed
        pass
    else:
        assert all(_CODE.match(d.code) for d in result.diagnostics)
        if result.policy is None:
            assert result.errors > 0, "no policy but no error either"
        else:
            assert result.errors == 0
        sources = SourceFiles()
        sources.add("fuzz.zt", text)
        render_all(result.diagnostics, sources)
        render_all(result.diagnostics, sources, fmt="json")
    try:
        formatted = format_policy(text, "fuzz.zt")
    except PolicySyntaxError as exc:
        assert exc.diagnostics, "a syntax error with no diagnostic"
        assert all(_CODE.match(d.code) for d in exc.diagnostics)
    except P4segError:
        pass
    else:
        assert_fmt_properties(text, formatted)


def strip(node: Any) -> Any:
    """An AST node as plain data without spans; options in fmt's documented order."""
    if isinstance(node, ast.PolicyFile):
        return strip(node.statements)
    if isinstance(node, tuple | list):
        return tuple(strip(n) for n in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        fields = {
            f.name: strip(getattr(node, f.name))
            for f in dataclasses.fields(node)
            if not f.name.endswith("span")
        }
        if isinstance(node, ast.Rule | ast.DefaultDecl):
            options = sorted(node.options, key=lambda o: _OPTION_ORDER.index(type(o)))
            fields["options"] = strip(tuple(options))
        return (type(node).__name__, tuple(sorted(fields.items())))
    return node


# fmt prints options as: log, reply, rate, for, during, name (compiler/fmt.py docstring).
_OPTION_ORDER = [
    ast.LogOption,
    ast.ReplyOption,
    ast.RateOption,
    ast.ForOption,
    ast.DuringOption,
    ast.NameOption,
]


def assert_fmt_properties(original: str, formatted: str) -> None:
    before, after = parse(original, "a.zt"), parse(formatted, "a.zt")
    assert strip(after) == strip(before), f"fmt changed the meaning:\n{formatted}"
    assert [c.text for c in after.comments] == [c.text for c in before.comments], (
        f"fmt lost, changed or reordered comments:\n{formatted}"
    )
    assert format_policy(formatted, "a.zt") == formatted, f"fmt not idempotent:\n{formatted}"
    if formatted:
        assert formatted.endswith("\n") and not formatted.endswith("\n\n")
        assert not formatted.startswith("\n")
    assert "\n\n\n" not in formatted
    assert all(line == line.rstrip() for line in formatted.split("\n")), formatted


# -- (a) robustness of check and fmt --------------------------------------------------------

_TOKEN = re.compile(r"\s+|#[^\n]*|->|[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*|\d[\w.:/]*|.")
EXAMPLE_TOKENS = _TOKEN.findall(EXAMPLE)
assert "".join(EXAMPLE_TOKENS) == EXAMPLE

# Odd and boundary tokens, space separated (plus a few separators added below).
_ODD_TOKENS = re.split(
    r"\s+",
    """
    any -> - , = / : # ; @ -- 0 1 65535 65536 4294967296 99999999999999999999999 1.5 007
    07:00 7:5 24:00 23:59 99:99 00:60 10.0.0.0/8 10.0.1.1/24 256.1.1.1 1.2.3.4/33 01.2.3.4
    0.0.0.0/0 20000pps 0pps 1.5pps 1000mpps 1001mpps 20000 20kpps 1.25kpps 15m 0s 365d 366d
    1.5h 2w UTC Europe/London Mars/Olympus Europe a- -a x-y-z _ é Ω
""".strip(),
)
VOCAB = sorted(
    set(KEYWORDS)
    | set(HOSTS)
    | {t for t in EXAMPLE_TOKENS if not t.isspace() and not t.startswith("#")}
    | set(_ODD_TOKENS)
    | {"# note", "\n", "\t", " ", "\u00b2", "9" * 4400, "1" + "0" * 320 + "pps"}
)


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    tokens = list(EXAMPLE_TOKENS)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["del_tok", "dup_tok", "swap_tok", "vocab_tok", "chars"]))
        i = draw(st.integers(0, len(tokens) - 1))
        if op == "del_tok":
            del tokens[i]
        elif op == "dup_tok":
            tokens.insert(i, tokens[i])
        elif op == "swap_tok":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif op == "vocab_tok":
            tokens[i] = draw(st.sampled_from(VOCAB))
        else:
            text = "".join(tokens)
            pos = draw(st.integers(0, len(text)))
            kind = draw(st.sampled_from(["delete", "insert", "replace"]))
            char = draw(
                st.sampled_from([*sorted(set("->,=/:.#\n \t0123456789azAZ_")), "é"]) | SAFE_CHARS
            )
            if kind == "delete":
                text = text[:pos] + text[pos + 1 :]
            elif kind == "insert":
                text = text[:pos] + char + text[pos:]
            else:
                text = text[:pos] + char + text[pos + 1 :]
            tokens = _TOKEN.findall(text) or [""]
        if not tokens:
            tokens = [""]
    return "".join(tokens)


@PROPERTY
@given(st.text(SAFE_CHARS, max_size=300))
def test_random_text_never_crashes(text: str) -> None:
    check_never_crashes(text)


@PROPERTY
@given(
    st.lists(st.sampled_from(VOCAB), max_size=40),
    st.lists(st.sampled_from([" ", " ", "\n", "", "  ", "\t"]), min_size=40, max_size=40),
    st.booleans(),
)
def test_token_soup_never_crashes(words: list[str], seps: list[str], header: bool) -> None:
    text = "".join(w + s for w, s in zip(words, seps, strict=False))
    check_never_crashes(("policy trading_floor\n" if header else "") + text)


@PROPERTY
@given(mutated_example())
def test_mutations_of_the_example_never_crash(text: str) -> None:
    check_never_crashes(text)


def test_the_example_is_canonical_and_clean() -> None:
    result = check_policy(EXAMPLE, "policies/trading_floor.zt", FLOOR)
    assert result.policy is not None and result.diagnostics == ()
    assert format_policy(EXAMPLE) == EXAMPLE
    assert_fmt_properties(EXAMPLE, EXAMPLE)


# -- (b) fmt on generated policies ------------------------------------------------------------

W, P = "w", "p"  # a word needs whitespace next to another word; punctuation does not

_name_re = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}(-[A-Za-z0-9_]{1,3}){0,2}", fullmatch=True)
NAMES = st.one_of(
    st.sampled_from(
        ["algo", "order_router", "risk", "risk_db", "market_data", "fix_gateway", "dev", "prod"]
    ),
    st.sampled_from(HOSTS),
    st.just("any"),
    _name_re.filter(lambda s: s not in KEYWORDS),
)
ADDRESSES = st.builds(
    lambda octets, length: ".".join(map(str, octets)) + ("" if length is None else f"/{length}"),
    st.lists(st.integers(0, 300), min_size=4, max_size=4),
    st.none() | st.integers(0, 40),
)
PORTS = st.integers(0, 70000)
COMMENT_TEXT = st.text(SAFE_CHARS.filter(lambda c: c not in "\n\t"), max_size=20)


def _endpoints(draw: st.DrawFn) -> list[tuple[str, str]]:
    items = draw(st.lists(st.one_of(NAMES, ADDRESSES), min_size=1, max_size=3))
    out: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        if i:
            out.append((",", P))
        out.append((item, W))
    return out


def _options(draw: st.DrawFn) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    kinds = draw(
        st.lists(st.sampled_from(["log", "reply", "rate", "for", "during", "name"]), max_size=3)
    )
    for kind in kinds:
        out.append((kind, W))
        if kind == "rate":
            out.append(
                (draw(st.sampled_from(["20000pps", "20kpps", "1mpps", "20000", "1.5pps"])), W)
            )
        elif kind == "for":
            out.append((draw(st.sampled_from(["15m", "2h", "1d", "30s", "2w"])), W))
        elif kind == "name":
            out.append((draw(NAMES), W))
        elif kind == "during":
            times = st.sampled_from(["07:00", "18:00", "7:5", "23:59", "00:00"])
            out += [(draw(times), W), ("-", P), (draw(times), W)]
            zone = draw(st.sampled_from([None, "UTC", "Europe/London", "America/New_York"]))
            for j, part in enumerate((zone or "").split("/") if zone else []):
                if j:
                    out.append(("/", P))
                out.append((part, W))
    return out


@st.composite
def statement(draw: st.DrawFn) -> list[tuple[str, str]]:
    kind = draw(st.sampled_from(["policy", "service", "rule", "rule", "rule", "default", "expect"]))
    if kind == "policy":
        return [("policy", W), (draw(NAMES.filter(lambda n: n != "any")), W)]
    if kind == "service":
        return [("service", W), (draw(NAMES), W), ("=", P), *_endpoints(draw)]
    if kind == "default":
        return [("default", W), (draw(st.sampled_from(["deny", "allow"])), W), *_options(draw)]
    src, dst = _endpoints(draw), _endpoints(draw)
    if kind == "expect":
        proto = draw(st.sampled_from(["tcp", "udp", "icmp", "ip"]))
        port = [(str(draw(PORTS)), W)] if draw(st.booleans()) else []
        verdict = draw(st.sampled_from(["allowed", "denied"]))
        return [("expect", W), *src, ("->", P), *dst, (proto, W), *port, (verdict, W)]
    out = [(draw(st.sampled_from(["allow", "deny"])), W), *src, ("->", P), *dst]
    if draw(st.booleans()):
        out.append((draw(st.sampled_from(["tcp", "udp", "icmp", "ip"])), W))
        for i in range(draw(st.integers(0, 3))):
            if i:
                out.append((",", P))
            out.append((str(draw(PORTS)), W))
            if draw(st.booleans()):
                out += [("-", P), (str(draw(PORTS)), W)]
    return out + _options(draw)


def _comment(draw: st.DrawFn) -> str:
    return "#" + draw(COMMENT_TEXT) + "\n"


@st.composite
def policy_text(draw: st.DrawFn) -> str:
    """A policy that parses (values may still be wrong: fmt does not care)."""
    parts: list[str] = []
    for _ in range(draw(st.integers(0, 4))):  # a header block of comments and blank lines
        parts.append(
            draw(st.sampled_from(["\n", "\n\n"])) if draw(st.booleans()) else _comment(draw)
        )
    for stmt in draw(st.lists(statement(), max_size=8)):
        for i, (tok, kind) in enumerate(stmt):
            if i:
                prev_kind = stmt[i - 1][1]
                seps = [" ", "  ", "\t", "\n", " \n   ", "\r\n"]
                if kind == P or prev_kind == P:
                    seps.append("")
                sep = draw(st.sampled_from(seps))
                if draw(st.integers(0, 9)) == 0:  # a comment inside the statement
                    sep = draw(st.sampled_from([" ", ""])) + _comment(draw)
                parts.append(sep)
            parts.append(tok)
        ending = draw(
            st.sampled_from(
                ["\n", "\n", "\n\n", "\n\n\n", " ", "trailing", "own", "\n  \n\t", "\r\n"]
            )
        )
        if ending == "trailing":
            parts.append(draw(st.sampled_from([" ", "   ", ""])) + _comment(draw))
        elif ending == "own":
            parts.append("\n" + _comment(draw))
        else:
            parts.append(ending)
    if draw(st.booleans()):
        parts.append(_comment(draw))
    return "".join(parts)


@PROPERTY
@given(policy_text())
def test_fmt_is_idempotent_and_keeps_meaning_and_comments(text: str) -> None:
    try:
        parse(text, "a.zt")
    except PolicySyntaxError as exc:  # the generator is meant to produce valid syntax only
        raise AssertionError(f"generated policy does not parse: {exc}\n{text}") from None
    assert_fmt_properties(text, format_policy(text, "a.zt"))


@PROPERTY
@given(policy_text())
def test_generated_policies_check_without_crashing(text: str) -> None:
    check_never_crashes(text)


@PROPERTY
@given(mutated_example())
def test_fmt_properties_on_mutations_that_parse(text: str) -> None:
    try:
        formatted = format_policy(text, "a.zt")
    except PolicySyntaxError:
        assume(False)
    else:
        assert_fmt_properties(text, formatted)


# -- (c) inventory mutations ------------------------------------------------------------------

FLOOR_LINES = FLOOR_TEXT.split("\n")
_VALUE = re.compile(r"(?<=: )[^,{}\[\]\n]+")
_KEY = re.compile(r"[A-Za-z_][\w-]*(?=:\s)")
YAML_VALUES = [
    "", "~", "null", "[]", "{}", "[1, 2]", "{a: 1}", "-1", "0", "1", "254", "255", "256",
    "18446744073709551615", "18446744073709551616", "99999999999999999999", "1.5", "true",
    "0x10", "1e3", "'10.0.0.1'", "10.0.2.11", "10.0.2.256", "10.0.02.1", "1.2.3", "::1",
    '"02:00:0a:00:02:0b"', "01:00:00:00:00:01", "02:00:0A:00:02:0B", "zz:00:00:00:00:00",
    "tor-alg", "tor-md", "spine1", "nosuch", "tor-alg-", "&a tor", "*a", "!!int 3",
    "!!binary AAAA", "'a:b'", '"127.0.0.1:50001"', '"tor-md:9"', '"spine1:0"', '"spine1:255"',
    '"tor-md:x"', "tor", "spine", "leaf", "|\n  block", "'é'", "٣", "²", "9" * 4400,
]  # fmt: skip
YAML_KEYS = [
    "ip", "mac", "switch", "port", "role", "device_id", "p4rt", "rack", "cpu_port",
    "endpoints", "name", "hosts", "switches", "links", "prot", "<<", "md1", "tor-md", "1",
]  # fmt: skip


@st.composite
def mutated_inventory(draw: st.DrawFn) -> str:
    lines = list(FLOOR_LINES)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["del", "dup", "swap", "indent", "value", "key", "chars"]))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "del":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "indent":
            lines[i] = draw(st.sampled_from(["", " ", "  ", "    ", "\t"])) + lines[i].lstrip()
        elif op in ("value", "key"):
            spots = list((_VALUE if op == "value" else _KEY).finditer(lines[i]))
            if spots:
                m = spots[draw(st.integers(0, len(spots) - 1))]
                new = draw(st.sampled_from(YAML_VALUES if op == "value" else YAML_KEYS))
                lines[i] = lines[i][: m.start()] + new + lines[i][m.end() :]
        else:
            pos = draw(st.integers(0, len(lines[i])))
            char = draw(st.sampled_from(list(":{}[],-\"'#&*!|>?@`% 0123456789az")) | SAFE_CHARS)
            cut = draw(st.integers(0, 1))
            lines[i] = lines[i][:pos] + char + lines[i][pos + cut :]
        if not lines:
            lines = [""]
    return "\n".join(lines)


@PROPERTY
@given(mutated_inventory())
def test_inventory_mutations_raise_only_inventory_error(text: str) -> None:
    try:
        inventory = parse_inventory(text, "inv.yaml")
    except InventoryError as exc:
        assert exc.diagnostics, "an InventoryError with no diagnostic"
        assert all(re.match(r"^E30\d$", d.code) for d in exc.diagnostics), exc.diagnostics
        sources = SourceFiles()
        sources.add("inv.yaml", text)
        render_all(exc.diagnostics, sources)
    else:
        assert len(inventory.hosts_by_name) == len(inventory.hosts)


@PROPERTY
@given(st.text(SAFE_CHARS, max_size=200))
def test_random_inventory_text_raises_only_inventory_error(text: str) -> None:
    try:
        parse_inventory(text, "inv.yaml")
    except InventoryError as exc:
        assert exc.diagnostics


# -- regressions and known bugs (minimal reproducers) -----------------------------------------

_HUGE = "9" * 4301  # one digit past Python's int-from-str limit (sys.get_int_max_str_digits)
_POLICY_CRASHES = {  # once raised ValueError/OverflowError; now each is its diagnostic
    "rate_overflows_float": (
        "policy p\nallow algo1 -> oms1 tcp 9876 rate 1" + "0" * 309 + "pps\n",
        "E204",
    ),
    "huge_port": (f"policy p\nallow algo1 -> oms1 tcp {_HUGE}\n", "E202"),
    "huge_expect_port": (f"policy p\nexpect algo1 -> oms1 tcp {_HUGE} denied\n", "E202"),
    "huge_address_octet": (f"policy p\nallow 10.0.2.{_HUGE} -> oms1 tcp 9876\n", "E201"),
    "huge_duration": (f"policy p\nallow algo1 -> oms1 tcp 9876 for {_HUGE}s\n", "E205"),
    "huge_time_of_day": (
        f"policy p\nallow algo1 -> oms1 tcp 9876 during {_HUGE}:00-18:00 UTC\n",
        "E206",
    ),
}


@pytest.mark.parametrize("name", sorted(_POLICY_CRASHES))
def test_regression_huge_numerals_in_policy_are_diagnosed(name: str) -> None:
    text, code = _POLICY_CRASHES[name]
    check_never_crashes(text)
    assert code in [d.code for d in check_policy(text, "p.zt", FLOOR).diagnostics]


_SWITCH = "switches:\n  tor-alg: {role: tor, device_id: %s, p4rt: '127.0.0.1:50002'}\n"
_SPINE = "  spine1: {role: spine, device_id: 7, p4rt: '127.0.0.1:50007'}\n"
_HOST = "hosts:\n  algo1: {ip: %s, switch: tor-alg, port: %s}\n"
_INVENTORY_CRASHES = {  # once raised ValueError/RecursionError; now each is its diagnostic
    "superscript_port": (_SWITCH % "2" + _HOST % ("10.0.2.11", "\u00b2"), "E307"),
    "superscript_ip_octet": (_SWITCH % "2" + _HOST % ("10.0.2.\u00b9", "1"), "E307"),
    "huge_device_id": (_SWITCH % _HUGE + _HOST % ("10.0.2.11", "1"), "E307"),
    "huge_link_port": (
        _SWITCH % "2"
        + _SPINE
        + _HOST % ("10.0.2.11", "1")
        + f"links:\n  - endpoints: ['tor-alg:{_HUGE}', 'spine1:2']\n",
        "E307",
    ),
    "deep_nesting": ("switches: " + "[" * 1000 + "]" * 1000 + "\nhosts: {}\n", None),
}


@pytest.mark.parametrize("name", sorted(_INVENTORY_CRASHES))
def test_regression_inventory_crashes_are_diagnosed(name: str) -> None:
    text, code = _INVENTORY_CRASHES[name]
    with pytest.raises(InventoryError) as info:
        parse_inventory(text, "inv.yaml")
    codes = [d.code for d in info.value.diagnostics]
    assert codes and (code is None or code in codes), codes


@pytest.mark.parametrize("sep", ["\f", "\u2028"], ids=["form_feed", "line_separator"])
def test_regression_excerpt_quotes_the_spanned_line(sep: str) -> None:
    text = f"policy p  # page{sep}break\nallow algo1 -> rsik tcp 9876\n"
    result = check_policy(text, "p.zt", FLOOR)
    sources = SourceFiles()
    sources.add("p.zt", text)
    rendered = render_all(result.diagnostics, sources)
    assert "   2 | allow algo1 -> rsik tcp 9876" in rendered, rendered
