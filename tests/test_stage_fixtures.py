"""Per-stage fixtures: a tiny floor through each stage, with every entry it must give.

Whole-build goldens (tests/golden/build) say *that* something changed; these say what each
stage does on a case small enough to read: two ToRs, one spine, three hosts, two rules.
"""

from __future__ import annotations

import pytest

from compiler.check import check_policy
from compiler.entries import FieldMatch, TableEntry
from compiler.fit import fit
from compiler.inventory import Inventory, parse_inventory
from compiler.lower import lower
from compiler.model import Policy
from compiler.targets import make_target

INVENTORY = """\
name: tiny
switches:
  t1: {role: tor, device_id: 1, p4rt: "127.0.0.1:1"}
  t2: {role: tor, device_id: 2, p4rt: "127.0.0.1:2"}
  s1: {role: spine, device_id: 3, p4rt: "127.0.0.1:3"}
hosts:
  a: {ip: 10.0.0.1, switch: t1, port: 1}
  b: {ip: 10.0.0.2, switch: t1, port: 2}
  c: {ip: 10.0.1.1, switch: t2, port: 1}
links:
  - endpoints: ["t1:9", "s1:1"]
  - endpoints: ["t2:9", "s1:2"]
"""
POLICY = """\
policy tiny
service web = c
allow a -> web tcp 80
deny b -> any log
"""


def show(e: TableEntry) -> str:
    """An entry on one line: table[matches] action(params) priority role."""

    def match(m: FieldMatch) -> str:
        if m.kind == "ternary":
            return f"{m.field}={m.value:#x}&&&{m.arg:#x}"
        if m.kind == "range":
            return f"{m.field}={m.value}..{m.arg}"
        if m.kind == "lpm":
            return f"{m.field}={m.value}/{m.arg}"
        return f"{m.field}={m.value}"

    params = ",".join(f"{k}={v:#x}" if k == "tags" else f"{k}={v}" for k, v in e.params)
    matches = " ".join(match(m) for m in e.matches)
    return f"{e.table}[{matches}] {e.action}({params}) prio={e.priority:#x} {e.role}"


@pytest.fixture(scope="module")
def tiny() -> tuple[Policy, Inventory]:
    inventory = parse_inventory(INVENTORY, "tiny.yaml")
    policy = check_policy(POLICY, "tiny.zt", inventory).policy
    assert policy is not None
    return policy, inventory


# 10.0.0.1 = 167772161 (a), 10.0.0.2 = 167772162 (b), 10.0.1.1 = 167772417 (c).
# Tags: on each ToR, field 0 holds `a` (1), `b` (2) and `web` (3) — disjoint sets, one field.
LOWERED = {
    "t1": [
        "src_identity[ingress_port=1 src_addr=167772161/32] set_src_tags(tags=0x1) prio=0x21 host",
        "src_identity[ingress_port=2 src_addr=167772162/32] set_src_tags(tags=0x2) prio=0x21 host",
        "src_identity[ingress_port=9 src_addr=167772417/32] set_src_tags(tags=0x3) prio=0x21 uplink",
        "dst_identity[dst_addr=167772161/32] set_dst_tags(tags=0x1) prio=0x21 identity",
        "dst_identity[dst_addr=167772162/32] set_dst_tags(tags=0x2) prio=0x21 identity",
        "dst_identity[dst_addr=167772417/32] set_dst_tags(tags=0x3) prio=0x21 identity",
        "policy[src_tags=0x2&&&0xf] deny_and_log(rule_id=2) prio=0x7000fffd forward",
        "policy[dst_tags=0x2&&&0xf protocol=0x6&&&0xff tcp_flags=0x10&&&0x10] deny_and_log(rule_id=2) prio=0x3000fffd reverse-deny",
        "policy[dst_tags=0x2&&&0xf protocol=0x11&&&0xff] deny_and_log(rule_id=2) prio=0x3000fffd reverse-deny",
        "policy[dst_tags=0x2&&&0xf protocol=0x1&&&0xff l4_dst_port=0..255] deny_and_log(rule_id=2) prio=0x3000fffd reverse-deny",
        "policy[src_tags=0x1&&&0xf dst_tags=0x3&&&0xf protocol=0x6&&&0xff l4_dst_port=80..80] permit(rule_id=1) prio=0x4000fffe forward",
        "policy[src_tags=0x3&&&0xf dst_tags=0x1&&&0xf protocol=0x6&&&0xff l4_src_port=80..80 tcp_flags=0x10&&&0x10] permit(rule_id=1) prio=0x1000fffe reply",
        "routing[dst_addr=167772161/32] forward(port=1) prio=0x0 host",
        "routing[dst_addr=167772162/32] forward(port=2) prio=0x0 host",
        "routing[dst_addr=167772417/32] forward(port=9) prio=0x0 host",
    ],
    "t2": [
        "src_identity[ingress_port=9 src_addr=167772161/32] set_src_tags(tags=0x1) prio=0x21 uplink",
        "src_identity[ingress_port=9 src_addr=167772162/32] set_src_tags(tags=0x2) prio=0x21 uplink",
        "src_identity[ingress_port=1 src_addr=167772417/32] set_src_tags(tags=0x3) prio=0x21 host",
        "dst_identity[dst_addr=167772161/32] set_dst_tags(tags=0x1) prio=0x21 identity",
        "dst_identity[dst_addr=167772162/32] set_dst_tags(tags=0x2) prio=0x21 identity",
        "dst_identity[dst_addr=167772417/32] set_dst_tags(tags=0x3) prio=0x21 identity",
        "policy[src_tags=0x2&&&0xf] deny_and_log(rule_id=2) prio=0x7000fffd forward",
        "policy[dst_tags=0x2&&&0xf protocol=0x6&&&0xff tcp_flags=0x10&&&0x10] deny_and_log(rule_id=2) prio=0x3000fffd reverse-deny",
        "policy[dst_tags=0x2&&&0xf protocol=0x11&&&0xff] deny_and_log(rule_id=2) prio=0x3000fffd reverse-deny",
        "policy[dst_tags=0x2&&&0xf protocol=0x1&&&0xff l4_dst_port=0..255] deny_and_log(rule_id=2) prio=0x3000fffd reverse-deny",
        "policy[src_tags=0x1&&&0xf dst_tags=0x3&&&0xf protocol=0x6&&&0xff l4_dst_port=80..80] permit(rule_id=1) prio=0x4000fffe forward",
        "policy[src_tags=0x3&&&0xf dst_tags=0x1&&&0xf protocol=0x6&&&0xff l4_src_port=80..80 tcp_flags=0x10&&&0x10] permit(rule_id=1) prio=0x1000fffe reply",
        "routing[dst_addr=167772161/32] forward(port=9) prio=0x0 host",
        "routing[dst_addr=167772162/32] forward(port=9) prio=0x0 host",
        "routing[dst_addr=167772417/32] forward(port=1) prio=0x0 host",
    ],
    "s1": [
        "src_identity[ingress_port=1] set_src_tags(tags=0x0) prio=0x1 fabric",
        "src_identity[ingress_port=2] set_src_tags(tags=0x0) prio=0x1 fabric",
        "policy[] permit(rule_id=65535) prio=0x1 fabric",
        "routing[dst_addr=167772161/32] forward(port=1) prio=0x0 host",
        "routing[dst_addr=167772162/32] forward(port=1) prio=0x0 host",
        "routing[dst_addr=167772417/32] forward(port=2) prio=0x0 host",
    ],
}


def test_lower_gives_exactly_these_entries(tiny: tuple[Policy, Inventory]) -> None:
    policy, inventory = tiny
    got = {sw.switch: [show(e) for e in sw.entries] for sw in lower(policy, inventory).switches}
    assert got == LOWERED


def test_fit_for_tofino_turns_each_range_into_ternary_prefixes(
    tiny: tuple[Policy, Inventory],
) -> None:
    policy, inventory = tiny
    (t1, *_) = fit(lower(policy, inventory).switches, make_target("tofino"))
    policy_entries = [show(e) for e in t1.entries if e.table == "policy"]
    # 80..80 is one exact prefix; ICMP echo replies (type 0, any code: 0..255) one /8
    assert "l4_dst_port=0x50&&&0xffff" in policy_entries[4]
    assert "l4_dst_port=0x0&&&0xff00" in policy_entries[3]
    assert "l4_src_port=0x50&&&0xffff" in policy_entries[5]
    assert len(policy_entries) == len([e for e in LOWERED["t1"] if e.startswith("policy")])
