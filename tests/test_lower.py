"""Fixture pairs: the verdict of the compiled entries along the path equals the semantics.

For every ordered pair of hosts and a set of packets around every port a rule names
(inside, at both edges, just outside), as opening packets and as replies, the packet
walked through the switches' tables must be delivered exactly when the policy semantics
allow it, to the right host, and the ToR's policy entry must carry the rule the
semantics say decided.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.check import check_policy
from compiler.entries import SwitchTables
from compiler.evaluate import Fabric, PacketFields
from compiler.fit import fit
from compiler.inventory import Inventory, parse_inventory
from compiler.lower import LowerError, cidr_blocks, lower
from compiler.model import Policy
from compiler.protocols import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from compiler.semantics import PolicySemantics
from compiler.targets import make_target

NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp"}
TCP_SYN, TCP_SYN_ACK = 0x02, 0x12


def probe_packets(policy: Policy, src: int, dst: int) -> list[PacketFields]:
    ports = sorted(
        {
            p
            for r in policy.rules
            for lo, hi in r.ports
            for p in (lo - 1, lo, hi, hi + 1)
            if 0 <= p <= 65535
        }
    )
    pkts = [PacketFields(src, dst, PROTO_ICMP, icmp_type=t) for t in (8, 0, 3)]
    for p in ports:
        pkts += [
            PacketFields(src, dst, PROTO_TCP, 40000, p, TCP_SYN),
            PacketFields(src, dst, PROTO_TCP, p, 40000, TCP_SYN_ACK),
            PacketFields(src, dst, PROTO_UDP, 40000, p),
            PacketFields(src, dst, PROTO_UDP, p, 40000),
        ]
    return pkts


def mismatches(
    policy: Policy,
    inventory: Inventory,
    limit: int = 5,
    switches: tuple[SwitchTables, ...] | None = None,
) -> list[str]:
    if switches is None:
        switches = lower(policy, inventory).switches
    fabric = Fabric({s.switch: s for s in switches}, inventory)
    sem = PolicySemantics(policy, pinned=[h.ip for h in inventory.hosts])
    found = []
    for a in inventory.hosts:
        for b in inventory.hosts:
            if a is b:
                continue
            for pkt in probe_packets(policy, a.ip, b.ip):
                path = fabric.walk(a.name, pkt)
                want = sem.decide(
                    pkt.src,
                    pkt.dst,
                    NAMES[pkt.protocol],
                    pkt.sport,
                    pkt.dport,
                    bool(pkt.tcp_flags & 0x10),
                    pkt.icmp_type,
                )
                want_rule = want.rule.id if want.rule else 0
                ok = (
                    path.delivered == want.allowed
                    and path.deciding.rule_id == want_rule
                    and not path.loop
                )
                if ok and path.delivered:
                    ok = path.delivered_to == b.name
                if not ok:
                    found.append(
                        f"{a.name}->{b.name} {pkt}: tables {path.delivered_to} rule {path.deciding.rule_id}, semantics {want.describe()}"
                    )
                    if len(found) >= limit:
                        return found
    return found


@pytest.fixture
def policy(floor_policy: Policy) -> Policy:
    return floor_policy


def test_trading_floor_tables_implement_the_policy(floor: Inventory, policy: Policy) -> None:
    assert mismatches(policy, floor) == []


def test_tofino_ternary_entries_implement_the_policy_too(floor: Inventory, policy: Policy) -> None:
    switches = lower(policy, floor).switches
    fitted = fit(switches, make_target("tofino"))
    assert all(m.kind != "range" for sw in fitted for e in sw.entries for m in e.matches)
    assert mismatches(policy, floor, switches=fitted) == []


def test_a_rule_costs_one_entry_per_tor_and_port_range(floor: Inventory, policy: Policy) -> None:
    switches = lower(policy, floor).switches
    for sw in switches:
        if sw.role != "tor":
            continue
        forward: dict[int, int] = {}
        for e in sw.table("policy"):
            if e.role == "forward":
                assert e.rule_id is not None
                forward[e.rule_id] = forward.get(e.rule_id, 0) + 1
        for rule_id, count in forward.items():
            rule = policy.rule(rule_id)
            assert rule is not None
            # one entry per port interval, whatever the scatter of the rule's services
            assert count == len(rule.ports), (sw.switch, rule.describe(), count)
    policy_entries = sum(len(s.table("policy")) for s in switches)
    assert policy_entries < 110  # a rule is one entry per ToR (and its replies), not per run


def test_spoofed_source_is_dropped_at_the_first_switch(floor: Inventory, policy: Policy) -> None:
    switches = lower(policy, floor).switches
    fabric = Fabric({s.switch: s for s in switches}, floor)
    algo1, oms1 = floor.hosts_by_name["algo1"], floor.hosts_by_name["oms1"]
    honest = fabric.walk("algo1", PacketFields(algo1.ip, oms1.ip, PROTO_TCP, 40000, 9876, TCP_SYN))
    assert honest.delivered_to == "oms1"
    # algo2 claims to be algo1: same packet, wrong port
    spoofed = fabric.walk("algo2", PacketFields(algo1.ip, oms1.ip, PROTO_TCP, 40000, 9876, TCP_SYN))
    assert not spoofed.delivered and len(spoofed.hops) == 1
    assert spoofed.hops[0].hits[-1].table == "src_identity"


def test_cidr_blocks_cover_exactly() -> None:
    for lo, hi in [(0, 0), (5, 5), (3, 17), (0, 255), (1, 254), (10, 1 << 20), (0, (1 << 32) - 1)]:
        blocks = list(cidr_blocks(lo, hi))
        covered = []
        for value, plen in blocks:
            size = 1 << (32 - plen)
            assert value % size == 0
            covered.append((value, value + size - 1))
        covered.sort()
        assert covered[0][0] == lo and covered[-1][1] == hi
        assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(covered))


SMALL = parse_inventory(
    """
switches:
  t1: {role: tor, device_id: 1, p4rt: "127.0.0.1:50201"}
  t2: {role: tor, device_id: 2, p4rt: "127.0.0.1:50202"}
  s1: {role: spine, device_id: 3, p4rt: "127.0.0.1:50203"}
hosts:
  a1: {ip: 10.0.0.1, switch: t1, port: 1}
  a2: {ip: 10.0.0.2, switch: t1, port: 2}
  b1: {ip: 10.0.1.1, switch: t2, port: 1}
  b2: {ip: 10.0.1.2, switch: t2, port: 2}
links:
  - endpoints: ["t1:9", "s1:1"]
  - endpoints: ["t2:9", "s1:2"]
""",
    "small.yaml",
)
ENDPOINTS = ["a1", "a2", "b1", "b2", "10.0.0.0/24", "10.0.1.0/24", "10.0.0.0/23", "any"]


@st.composite
def small_policies(draw: st.DrawFn) -> str:
    lines = ["policy random"]
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["allow", "allow", "deny"]))
        src = ", ".join(
            draw(st.lists(st.sampled_from(ENDPOINTS), min_size=1, max_size=2, unique=True))
        )
        dst = ", ".join(
            draw(st.lists(st.sampled_from(ENDPOINTS), min_size=1, max_size=2, unique=True))
        )
        proto = draw(st.sampled_from(["tcp", "udp", "icmp", "ip"]))
        text = f"{action} {src} -> {dst} {proto}"
        if proto in ("tcp", "udp") and draw(st.booleans()):
            lo = draw(st.sampled_from([22, 80, 443, 8000]))
            text += f" {lo}-{lo + draw(st.integers(0, 5))}"
        if action == "deny" and draw(st.booleans()):
            text += " log"
        if action == "allow" and proto == "udp" and draw(st.booleans()):
            text += " reply"
        if action == "allow" and draw(st.integers(0, 4)) == 0:
            text += f" rate {draw(st.sampled_from([100, 2000]))}pps"
        lines.append(text)
    if draw(st.booleans()):
        lines.append("default deny log")
    return "\n".join(lines) + "\n"


@settings(max_examples=40, deadline=None)
@given(small_policies())
def test_random_policies_compile_to_tables_that_agree(text: str) -> None:
    result = check_policy(text, "random.zt", SMALL)
    assert result.policy is not None, result.diagnostics
    assert mismatches(result.policy, SMALL, limit=1) == []


def test_more_overlapping_sets_than_tag_fields_is_e501(floor: Inventory) -> None:
    # 65 destination sets that all hold algo1 and differ elsewhere: one field each.
    rules = "".join(f"allow algo2 -> algo1, 10.200.0.{i} tcp 80\n" for i in range(65))
    policy = check_policy(f"policy wide\n{rules}", "wide.zt", floor).policy
    assert policy is not None
    with pytest.raises(LowerError) as caught:
        lower(policy, floor)
    [diag] = caught.value.diagnostics
    assert diag.code == "E501" and "tor-alg" in diag.message and "dst" in diag.message
