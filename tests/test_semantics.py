"""The policy semantics of DESIGN.md, packet by packet and flow by flow."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from compiler.addresses import parse_ipv4
from compiler.check import check_policy
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.parse import parse
from compiler.protocols import ICMP_ECHO_REPLY
from compiler.resolve import resolve
from compiler.semantics import Partition, PolicySemantics, around, bits

POLICY = """
policy t
service feed   = 10.0.1.0/24
service algo   = 10.0.2.11, 10.0.2.12
service router = 10.0.3.10
service risk   = 10.0.4.0/28
service dev    = 10.8.0.0/16
allow feed   -> algo   udp 30001-30010
allow algo   -> router tcp 9876
allow router -> risk   tcp 8443 rate 20000pps
allow algo   -> risk   udp 5000 reply
allow algo   -> risk   icmp
allow dev    -> any    tcp 22
deny  dev    -> risk   log
deny  algo   -> router tcp 9876
allow algo   -> 10.0.3.0/24 tcp 9876
"""


def ip(text: str) -> int:
    return parse_ipv4(text)


@pytest.fixture(scope="module")
def sem() -> PolicySemantics:
    policy: Policy = resolve(parse(POLICY, "t.zt"), Inventory.empty()).policy
    return PolicySemantics(policy)


def test_default_deny(sem: PolicySemantics) -> None:
    d = sem.decide(ip("10.0.4.1"), ip("10.0.1.5"), "tcp", dport=80)
    assert not d.allowed and d.rule is None and d.reason == "default"


@pytest.mark.parametrize(
    ("src", "dst", "proto", "dport", "allowed", "rule_line"),
    [
        ("10.0.1.7", "10.0.2.11", "udp", 30001, True, 8),
        ("10.0.1.7", "10.0.2.11", "udp", 30010, True, 8),
        ("10.0.1.7", "10.0.2.11", "udp", 30011, False, None),  # just outside the range
        ("10.0.1.7", "10.0.2.11", "udp", 30000, False, None),
        ("10.0.1.7", "10.0.2.13", "udp", 30001, False, None),  # not an algo host
        ("10.0.1.7", "10.0.2.11", "tcp", 30001, False, None),  # wrong protocol
        ("10.0.3.10", "10.0.4.3", "tcp", 8443, True, 10),
        ("10.0.3.10", "10.0.4.16", "tcp", 8443, False, None),  # outside the /28
        ("10.8.3.3", "10.0.1.1", "tcp", 22, True, 13),  # any includes unknown addresses
        ("10.8.3.3", "192.0.2.1", "tcp", 22, True, 13),
        ("10.8.3.3", "10.0.4.1", "tcp", 22, False, 14),  # deny overrides allow
    ],
)
def test_forward(
    sem: PolicySemantics,
    src: str,
    dst: str,
    proto: str,
    dport: int,
    allowed: bool,
    rule_line: int | None,
) -> None:
    d = sem.decide(ip(src), ip(dst), proto, dport=dport)
    assert d.allowed is allowed
    assert (d.rule.span.line if d.rule else None) == rule_line


def test_deny_overrides_allow_regardless_of_order(sem: PolicySemantics) -> None:
    # line 16 allows algo -> 10.0.3.0/24 tcp 9876; the deny on line 15 wins where they overlap
    d = sem.decide(ip("10.0.2.11"), ip("10.0.3.10"), "tcp", dport=9876)
    assert not d.allowed and d.rule is not None and d.rule.span.line == 15
    other = sem.decide(ip("10.0.2.11"), ip("10.0.3.99"), "tcp", dport=9876)
    assert other.allowed and other.rule is not None and other.rule.span.line == 16


def test_tcp_replies_need_ack(sem: PolicySemantics) -> None:
    router, risk = ip("10.0.3.10"), ip("10.0.4.3")
    syn_ack = sem.decide(risk, router, "tcp", sport=8443, dport=40000, ack=True)
    assert syn_ack.allowed and syn_ack.reason == "reply"
    syn = sem.decide(risk, router, "tcp", sport=8443, dport=40000, ack=False)
    assert not syn.allowed  # the responder can never open a connection
    wrong_port = sem.decide(risk, router, "tcp", sport=8444, dport=40000, ack=True)
    assert not wrong_port.allowed


def test_udp_replies_only_with_reply_option(sem: PolicySemantics) -> None:
    back = sem.decide(ip("10.0.4.2"), ip("10.0.2.12"), "udp", sport=5000, dport=40000)
    assert back.allowed and back.reason == "reply"
    feed_back = sem.decide(ip("10.0.2.11"), ip("10.0.1.7"), "udp", sport=30001, dport=40000)
    assert not feed_back.allowed


def test_icmp_echo_reply_only(sem: PolicySemantics) -> None:
    algo, risk = ip("10.0.2.11"), ip("10.0.4.1")
    assert sem.decide(algo, risk, "icmp").allowed
    assert sem.decide(risk, algo, "icmp", icmp_type=ICMP_ECHO_REPLY).allowed
    assert not sem.decide(risk, algo, "icmp").allowed  # an echo request back is not a reply


def test_reply_to_a_denied_flow_is_denied(sem: PolicySemantics) -> None:
    # algo -> router tcp 9876 is allowed by line 16 but denied by line 15: its replies too.
    d = sem.decide(ip("10.0.3.10"), ip("10.0.2.11"), "tcp", sport=9876, dport=40000, ack=True)
    assert not d.allowed and d.reason == "reply-of-denied"


def test_logging_deny_and_metered_allow_decide(sem: PolicySemantics) -> None:
    d = sem.decide(ip("10.8.0.1"), ip("10.0.4.2"), "tcp", dport=22)
    assert d.log
    m = sem.decide(ip("10.0.3.10"), ip("10.0.4.2"), "tcp", dport=8443)
    assert m.rule is not None and m.rule.rate_pps == 20000


def test_flows(sem: PolicySemantics) -> None:
    assert sem.flow(ip("10.0.3.10"), ip("10.0.4.2"), "tcp", 8443).allowed
    assert not sem.flow(ip("10.0.4.2"), ip("10.0.3.10"), "tcp", 8443).allowed
    assert sem.flow(ip("10.0.2.11"), ip("10.0.4.2"), "icmp").allowed
    assert not sem.flow(ip("10.0.4.2"), ip("10.0.2.11"), "icmp").allowed
    assert sem.flow(ip("10.0.1.1"), ip("10.0.2.12"), "udp", 30005).allowed


def test_partition_atoms_are_exact() -> None:
    sets = [((10, 20),), ((15, 30),), ((0, 5), (25, 40))]
    part = Partition(sets, 100)
    # every value's atom determines membership in every set
    for s in sets:
        mask = part.mask(s)
        for v in range(101):
            inside = any(lo <= v <= hi for lo, hi in s)
            assert bool(mask >> part.atom_of(v) & 1) == inside, (s, v)

    # and atoms are maximal: two values with the same memberships share an atom
    def sig(v: int) -> tuple[bool, ...]:
        return tuple(any(lo <= v <= hi for lo, hi in s) for s in sets)

    for a in range(101):
        for b in range(a, 101, 7):
            assert (part.atom_of(a) == part.atom_of(b)) == (sig(a) == sig(b))


def test_bits() -> None:
    assert list(bits(0b101001)) == [0, 3, 5]
    assert list(bits(0)) == []


# -- the rules a verdict looks at (compiler.semantics.around) -------------------------------

_SOURCES = ("algo1", "algo", "oms1", "order_router", "settle1", "jump1", "dev1", "any")
_DESTINATIONS = ("oms2", "order_router", "algo1", "risk", "books", "prod", "10.0.5.0/24")
_WHAT = ("tcp 9876", "tcp 22", "tcp 5432", "tcp 7000", "tcp 1-9000", "icmp", "ip", "udp 9")


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(("allow", "allow", "deny")),
            st.sampled_from(_SOURCES),
            st.sampled_from(_DESTINATIONS),
            st.sampled_from(_WHAT),
        ),
        min_size=1,
        max_size=4,
    )
)
@example([("allow", "algo1", "oms2", "tcp 9876")])  # covered by an allow
@example([("allow", "dev1", "algo1", "tcp 22")])  # by a deny
@example([("allow", "jump1", "algo1", "icmp")])  # by an allow in the file's order
@example([("deny", "algo", "order_router", "tcp 9876"), ("allow", "algo1", "oms2", "ip")])
def test_a_verdict_from_the_rules_around_equals_the_one_from_the_whole_policy(
    floor: Inventory, floor_policy_text: str, added: list[tuple[str, str, str, str]]
) -> None:
    """Rules added at the end of the trading floor's policy (as grants are): the dead-rule
    verdicts from the first of them on, and the denies overlapping each, are the same from
    the semantics of `around(policy, ...)` as from the whole policy's."""
    lines = "".join(f"{a} {s} -> {d} {w}\n" for a, s, d, w in added)
    text = floor_policy_text.replace("default deny log", lines + "default deny log")
    result = check_policy(text, "floor.zt", floor, expectations=False)
    assert result.policy is not None, [d.message for d in result.diagnostics]
    policy = result.policy
    down_to = policy.rules[-len(added)].id
    near = around(policy, down_to)
    whole, part = PolicySemantics(policy), PolicySemantics(near)

    def verdicts(sem: PolicySemantics) -> list[tuple[str, bool, list[str]]]:
        return [
            (c.rule.key, c.by_deny, sorted(r.key for r in c.covering))
            for c in sem.dead_rules(down_to=down_to)
        ]

    assert verdicts(part) == verdicts(whole)
    for rule in policy.rules[-len(added) :]:
        keys = [r.key for r in whole.overlapping_denies(policy.rules.index(rule))]
        assert [r.key for r in part.overlapping_denies(near.rules.index(rule))] == keys
