"""`diff` is empty exactly when the switches would do the same (hypothesis).

For random pairs of small policies on a one-switch inventory: the switch-visible part of
`semantic_diff` is empty if and only if

- the compiled tables of each build implement the other policy (`verify`, both ways), and
- at every moment — each state of the `during` windows over a day, before and after each
  `for` duration — the effective policies (runtime/live.py) treat every packet between
  inventory hosts alike: the verdict, the meter of the allow that passes it, and whether a
  refused packet is logged (UDP replies and TCP answers are packets too), for TCP, UDP,
  ICMP types and codes (echo request and reply among them) and IP protocol numbers
  (`proto 132`, `proto 133`, and one no rule names).

The oracle shares no code with the diff's moments and profiles: it samples real moments and
runs `effective_policy` on each.

P4SEG_PROPERTY_EXAMPLES=N runs N examples (default 25: each compiles and verifies twice),
after the explicit ones: changes that only one protocol number or ICMP type class sees.
"""

from __future__ import annotations

import datetime as dt
import os
from itertools import permutations

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from compiler.check import check_policy
from compiler.diff import semantic_diff
from compiler.emit import build
from compiler.inventory import Inventory, parse_inventory
from compiler.model import Policy
from compiler.semantics import Decision, PolicySemantics
from compiler.verify import verify
from runtime.live import LiveState, effective_policy

INVENTORY_TEXT = """\
name: tiny
switches:
  tor1: {role: tor, device_id: 1, p4rt: "127.0.0.1:1"}
hosts:
  h1: {ip: 10.0.0.1, switch: tor1, port: 1}
  h2: {ip: 10.0.0.2, switch: tor1, port: 2}
  h3: {ip: 10.0.0.3, switch: tor1, port: 3}
"""
INVENTORY: Inventory = parse_inventory(INVENTORY_TEXT, "tiny.yaml")
HOSTS = {h.name: h.ip for h in INVENTORY.hosts}
NOW = dt.datetime(2026, 3, 2, 9, 30, tzinfo=dt.UTC).timestamp()
WINDOWS = ("08:00-12:00 UTC", "10:00-14:00 UTC", "22:00-02:00 UTC")
DURATIONS = {"30m": 1800, "2h": 7200}
PORTS = ("22", "80", "80-81", "443")
PROTO_NUMBERS = ("proto 132", "proto 133")
ICMP_TYPES = (
    "icmp echo-request",
    "icmp echo-reply",
    "icmp type 3",
    "icmp frag-needed",
    "icmp type 3 code 5",
)
# ICMP (type, code): both echo kinds, codes of type 3 inside and outside the rules', another
SAMPLE_ICMP = ((8, 0), (0, 0), (3, 4), (3, 5), (3, 0), (13, 0))
SAMPLE_PROTOCOLS = (132, 133, 47)  # the named protocol numbers and one no rule names
SAMPLE_PORTS = (0, 21, 22, 23, 79, 80, 81, 82, 442, 443, 444, 1234, 49152, 65535)
EXAMPLES = int(os.environ.get("P4SEG_PROPERTY_EXAMPLES", "25"))

endpoints = st.sampled_from(["h1", "h2", "h3", "any", "10.0.0.0/30"])


@st.composite
def rule_lines(draw: st.DrawFn) -> str:
    action = draw(st.sampled_from(["allow", "allow", "deny"]))
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", "", *PROTO_NUMBERS, *ICMP_TYPES]))
    parts = [action, draw(endpoints), "->", draw(endpoints)]
    if proto:
        parts.append(proto)
    if proto in ("tcp", "udp"):
        parts.append(draw(st.sampled_from(PORTS)))
    if action == "deny":
        if draw(st.booleans()):
            parts.append("log")
        return " ".join(parts)
    if proto == "udp" and draw(st.booleans()):
        parts.append("reply")
    rate = draw(st.sampled_from([None, None, "50pps", "100pps"]))
    if rate:
        parts.append(f"rate {rate}")
    duration = draw(st.sampled_from([None, None, "30m", "2h"]))
    if duration:
        parts.append(f"for {duration}")
    window = draw(st.sampled_from([None, None, *WINDOWS]))
    if window:
        parts.append(f"during {window}")
    return " ".join(parts)


@st.composite
def policy_pairs(draw: st.DrawFn) -> tuple[str, str]:
    old = draw(st.lists(rule_lines(), min_size=1, max_size=4))
    new = list(old)
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["replace", "drop", "add", "swap"]))
        if kind == "replace" and new:
            new[draw(st.integers(0, len(new) - 1))] = draw(rule_lines())
        elif kind == "drop" and new:
            new.pop(draw(st.integers(0, len(new) - 1)))
        elif kind == "add":
            new.append(draw(rule_lines()))
        elif kind == "swap" and len(new) > 1:
            new.reverse()
    logs = draw(st.tuples(st.booleans(), st.booleans()))
    return _text(old, logs[0]), _text(new, logs[1])


def _pair(old: str, new: str) -> tuple[str, str]:
    return f"policy p\n{old}\n", f"policy p\n{new}\n"


def _text(rules: list[str], log: bool) -> str:
    return "policy p\n" + "".join(f"{r}\n" for r in rules) + ("default deny log\n" if log else "")


def _checked(text: str) -> Policy:
    result = check_policy(text, "p.zt", INVENTORY)
    assume(result.policy is not None)
    assert result.policy is not None
    return result.policy


# -- the oracle --------------------------------------------------------------------------------


def _moments(policies: tuple[Policy, Policy]) -> list[tuple[float, LiveState, LiveState]]:
    """Every half hour of a day, each with the `for` rules just applied, 30 minutes ago and
    two hours ago."""
    start = dt.datetime(2026, 3, 2, tzinfo=dt.UTC).timestamp()
    out = []
    for step in range(48):
        t = start + step * 1800 + 900
        for elapsed in (0, 1800, 7200):
            states = []
            for policy in policies:
                state = LiveState()
                for r in policy.rules:
                    if r.duration_s is not None:
                        state.first_applied[r.describe()] = t - elapsed
                states.append(state)
            out.append((t, states[0], states[1]))
    return out


def _seen(d: Decision) -> tuple[bool, bool, int | None]:
    rate = d.rule.rate_pps if d.allowed and d.reason == "allow" and d.rule is not None else None
    return d.allowed, d.log, rate


def _packets_alike(a: Policy, b: Policy) -> bool:
    sa, sb = PolicySemantics(a), PolicySemantics(b)
    for src, dst in permutations(HOSTS.values(), 2):
        for sport in SAMPLE_PORTS:
            for dport in SAMPLE_PORTS:
                for proto, ack in (("tcp", False), ("tcp", True), ("udp", False)):
                    if _seen(sa.decide(src, dst, proto, sport, dport, ack)) != _seen(
                        sb.decide(src, dst, proto, sport, dport, ack)
                    ):
                        return False
        for kind, code in SAMPLE_ICMP:
            if _seen(sa.decide(src, dst, "icmp", icmp_type=kind, icmp_code=code)) != _seen(
                sb.decide(src, dst, "icmp", icmp_type=kind, icmp_code=code)
            ):
                return False
        for number in SAMPLE_PROTOCOLS:
            if _seen(sa.decide(src, dst, number)) != _seen(sb.decide(src, dst, number)):
                return False
    return True


def _alike_at_every_moment(old: Policy, new: Policy) -> bool:
    seen: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
    for t, state_old, state_new in _moments((old, new)):
        a = effective_policy(old, state_old, t, HOSTS)
        b = effective_policy(new, state_new, t, HOSTS)
        key = (
            tuple(r.id for r in a.rules if r.src),
            tuple(r.id for r in b.rules if r.src),
        )
        if key in seen:
            continue
        seen.add(key)
        if not _packets_alike(a, b):
            return False
    return True


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(policy_pairs())
# Changes that only one protocol number or one ICMP type class sees, every run.
@example(_pair("allow h1 -> h2 proto 132", "allow h1 -> h2 proto 133"))
@example(_pair("allow h1 -> h2 icmp echo-request", "allow h1 -> h2 icmp type 3"))
@example(_pair("allow h1 -> h2 icmp type 3", "allow h1 -> h2 icmp frag-needed"))
@example(_pair("allow h1 -> h2 icmp type 3 code 5", "allow h1 -> h2 icmp type 3 code 5"))
@example(_pair("allow h1 -> any", "allow h1 -> any\ndeny h1 -> h3 icmp frag-needed log"))
@example(_pair("allow h1 -> h2 proto 132", "allow h1 -> h2 proto 132 rate 50pps"))
@example(_pair("allow h2 -> h1 icmp echo-request", "allow h1 -> h2 icmp echo-reply"))
@example(_pair("deny h1 -> h2 tcp 22", "allow h1 -> h2 icmp echo-reply"))
def test_diff_is_empty_exactly_when_the_switches_do_the_same(pair: tuple[str, str]) -> None:
    old_text, new_text = pair
    old, new = _checked(old_text), _checked(new_text)
    old_tables = {s.switch: s for s in build(old, INVENTORY, old_text, "ref").switches}
    new_tables = {s.switch: s for s in build(new, INVENTORY, new_text, "ref").switches}
    tables_alike = (
        verify(new, INVENTORY, old_tables).proven and verify(old, INVENTORY, new_tables).proven
    )
    same = tables_alike and _alike_at_every_moment(old, new)
    changes = [c for c in semantic_diff(old, new, INVENTORY, NOW) if c.on_switches]
    shown = "\n".join(c.describe() for c in changes)
    assert (not changes) == same, (
        f"tables alike: {tables_alike}\n--- old\n{old_text}--- new\n{new_text}--- diff\n{shown}"
    )
