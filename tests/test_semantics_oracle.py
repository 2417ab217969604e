"""The atom engine against a direct reading of the semantics, on random policies.

The oracle below evaluates rules one by one on concrete values — slow and obviously
right. The atom/bit-mask engine must agree with it on every packet, and a rule the engine
calls dead must change no decision when it is removed.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.addresses import AddressSet, parse_prefix
from compiler.diagnostics import Span
from compiler.model import ALL_PORTS, Action, Policy, PolicyRule
from compiler.protocols import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST
from compiler.semantics import PolicySemantics

PREFIXES = [
    "10.0.0.0/24",
    "10.0.0.0/28",
    "10.0.0.8/29",
    "10.0.0.5",
    "10.0.0.9",
    "10.0.1.0/24",
    "0.0.0.0/0",
]
ADDRESSES = [parse_prefix(p)[0] + k for p in ("10.0.0.0", "10.0.1.0") for k in (0, 5, 9, 12, 200)]
PORTS = [0, 21, 22, 23, 80, 443, 1000, 8443, 49152, 65535]
SPAN = Span("oracle.zt", 1, 1, 1, 2)

addr_sets = st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=2).map(
    lambda ps: AddressSet.of(parse_prefix(p) for p in ps)
)
port_sets = st.one_of(
    st.just(ALL_PORTS),
    st.lists(st.tuples(st.sampled_from(PORTS), st.integers(0, 600)), min_size=1, max_size=2).map(
        lambda items: tuple(sorted({(lo, min(lo + n, 65535)) for lo, n in items}))
    ),
)


@st.composite
def rules(draw: st.DrawFn, rule_id: int) -> PolicyRule:
    action = draw(st.sampled_from([Action.ALLOW, Action.ALLOW, Action.DENY]))
    proto = draw(st.sampled_from(["tcp", "udp", "icmp", "ip"]))
    ports = draw(port_sets) if proto in ("tcp", "udp") else ALL_PORTS
    allow = action is Action.ALLOW
    return PolicyRule(
        id=rule_id,
        action=action,
        src=draw(addr_sets),
        dst=draw(addr_sets),
        src_text="s",
        dst_text="d",
        proto=proto,
        ports=ports,
        log=not allow and draw(st.booleans()),
        reply=allow and proto == "udp" and draw(st.booleans()),
        rate_pps=draw(st.sampled_from([None, None, 100, 5000])) if allow else None,
        duration_s=None,
        window=None,
        span=SPAN,
    )


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    n = draw(st.integers(1, 7))
    rs = tuple(draw(rules(i)) for i in range(1, n + 1))
    return Policy("oracle", "oracle.zt", (), rs, draw(st.booleans()), None, ())


packets = st.tuples(
    st.sampled_from(ADDRESSES),
    st.sampled_from(ADDRESSES),
    st.sampled_from(["tcp", "udp", "icmp", "other"]),
    st.sampled_from(PORTS),
    st.sampled_from(PORTS),
    st.booleans(),
    st.sampled_from([ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY]),
)


def _matches(r: PolicyRule, src: int, dst: int, proto: str, port: int) -> bool:
    if r.proto != "ip" and r.proto != proto:
        return False
    if src not in r.src or dst not in r.dst:
        return False
    return proto not in ("tcp", "udp") or any(lo <= port <= hi for lo, hi in r.ports)


def oracle(policy: Policy, pkt: tuple[int, int, str, int, int, bool, int]) -> bool:
    src, dst, proto, sport, dport, ack, icmp_type = pkt
    rs = policy.rules
    if any(r.action is Action.DENY and _matches(r, src, dst, proto, dport) for r in rs):
        return False
    if any(r.action is Action.ALLOW and _matches(r, src, dst, proto, dport) for r in rs):
        return True
    # a reply: the reversed packet would be the flow an allow opened
    answers = [r for r in rs if r.action is Action.ALLOW and _matches(r, dst, src, proto, sport)]
    if proto == "tcp":
        answers = answers if ack else []
    elif proto == "udp":
        answers = [r for r in answers if r.reply]
    elif proto == "icmp":
        answers = answers if icmp_type == ICMP_ECHO_REPLY else []
    else:
        answers = []
    if not answers:
        return False
    return not any(r.action is Action.DENY and _matches(r, dst, src, proto, sport) for r in rs)


def _decide(sem: PolicySemantics, pkt: tuple[int, int, str, int, int, bool, int]) -> bool:
    src, dst, proto, sport, dport, ack, icmp_type = pkt
    return sem.decide(src, dst, proto, sport, dport, ack, icmp_type).allowed


@settings(max_examples=300, deadline=None)
@given(policies(), st.lists(packets, min_size=1, max_size=30))
def test_engine_agrees_with_oracle(
    policy: Policy, pkts: list[tuple[int, int, str, int, int, bool, int]]
) -> None:
    sem = PolicySemantics(policy)
    for pkt in pkts:
        assert _decide(sem, pkt) == oracle(policy, pkt), pkt


@settings(max_examples=200, deadline=None)
@given(policies(), st.lists(packets, min_size=10, max_size=40))
def test_dead_rules_change_nothing_when_removed(
    policy: Policy, pkts: list[tuple[int, int, str, int, int, bool, int]]
) -> None:
    sem = PolicySemantics(policy)
    dead = {c.rule.id for c in sem.dead_rules()}
    if not dead:
        return
    kept = tuple(r for r in policy.rules if r.id not in dead)
    pruned = replace(policy, rules=tuple(replace(r, id=i) for i, r in enumerate(kept, 1)))
    for pkt in pkts:
        assert oracle(pruned, pkt) == oracle(policy, pkt), (pkt, dead)
