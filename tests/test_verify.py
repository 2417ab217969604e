"""Translation validation: the compiled floor is proven; each kind of corrupted entry set is
caught with a concrete counterexample."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from compiler.check import check_policy
from compiler.emit import build
from compiler.entries import FieldMatch, SwitchTables, TableEntry
from compiler.evaluate import lookup
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.verify import verify

EXTRA_DENY = "deny algo3 -> order_router tcp 9876 log\n"
# A flow opened where the policy denies it: end to end, or on one ToR (defence in depth).
OPENED = {"allowed-by-tables", "source-tor", "destination-tor"}


@pytest.fixture(scope="module")
def floor_with_deny(
    floor: Inventory, floor_policy_text: str
) -> tuple[Policy, dict[str, SwitchTables]]:
    text = floor_policy_text.replace("default deny log", EXTRA_DENY + "default deny log")
    result = check_policy(text, "p.zt", floor)
    assert result.policy is not None, result.diagnostics
    built = build(result.policy, floor, text, "ref")
    return result.policy, {s.switch: s for s in built.switches}


@pytest.mark.parametrize("target", ["ref", "tofino"])
def test_the_compiled_floor_is_proven(
    target: str, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    built = build(floor_policy, floor, floor_policy_text, target)
    switches = {s.switch: s for s in built.switches}
    result = verify(floor_policy, floor, switches)
    assert result.proven, "\n".join(c.describe() for c in result.counterexamples[:5])
    assert result.by_rules is not None and result.by_rules.left is None  # rule by rule
    assert result.spoof_classes > 100
    exact = verify(floor_policy, floor, switches, exact=True)  # and pair by pair
    assert exact.proven and exact.classes > 10_000 and exact.by_rules is None


def _edit(
    switches: dict[str, SwitchTables],
    switch: str,
    pick: Callable[[TableEntry], bool],
    change: Callable[[TableEntry], TableEntry | None],
) -> dict[str, SwitchTables]:
    sw = switches[switch]
    hits = [e for e in sw.entries if pick(e)]
    assert hits, "the corruption must touch an entry"
    entries = []
    for e in sw.entries:
        if pick(e):
            new = change(e)
            if new is not None:
                entries.append(new)
        else:
            entries.append(e)
    return {**switches, switch: dataclasses.replace(sw, entries=tuple(entries))}


def _match(e: TableEntry, field: str) -> FieldMatch | None:
    return e.match(field)


def _with(e: TableEntry, field: str, m: FieldMatch | None) -> TableEntry:
    matches = tuple(x for x in e.matches if x.field != field) + ((m,) if m else ())
    return dataclasses.replace(e, matches=matches)


def _kinds(policy: Policy, floor: Inventory, switches: dict[str, SwitchTables]) -> set[str]:
    result = verify(policy, floor, switches)
    assert not result.proven
    text = result.counterexamples[0].describe()
    assert "policy:" in text and "tables:" in text
    return {c.kind for c in result.counterexamples}


def test_a_deleted_deny_is_caught(
    floor: Inventory, floor_with_deny: tuple[Policy, dict[str, SwitchTables]]
) -> None:
    policy, switches = floor_with_deny
    assert verify(policy, floor, switches).proven
    deny_id = len(policy.rules)  # EXTRA_DENY is the last rule
    # On the source ToR only: the destination ToR still stops the flow, but defence in
    # depth is gone, and that is reported.
    one = _edit(switches, "tor-alg", lambda e: e.rule_id == deny_id, lambda e: None)
    result = verify(policy, floor, one)
    assert "allowed-by-tables" not in {c.kind for c in result.counterexamples}
    example = next(c for c in result.counterexamples if c.kind == "source-tor")
    assert example.sender == "algo3" and example.packet.dport == 9876
    assert "deny algo3 -> order_router tcp 9876" in example.expected
    assert "tor-alg alone lets it through" in example.observed
    # On both ToRs: the flow opens end to end.
    both = _edit(one, "tor-oms", lambda e: e.rule_id == deny_id, lambda e: None)
    kinds = {c.kind for c in verify(policy, floor, both).counterexamples}
    assert "allowed-by-tables" in kinds


def test_a_widened_range_is_caught(
    floor: Inventory, floor_with_deny: tuple[Policy, dict[str, SwitchTables]]
) -> None:
    policy, switches = floor_with_deny

    def fix(e: TableEntry) -> bool:
        m = _match(e, "l4_dst_port")
        return e.table == "policy" and m is not None and (m.value, m.arg) == (9876, 9876)

    corrupted = _edit(
        switches,
        "tor-alg",
        fix,
        lambda e: _with(e, "l4_dst_port", FieldMatch("l4_dst_port", "range", 9876, 9880)),
    )
    result = verify(policy, floor, corrupted)
    assert any(c.kind in OPENED and 9877 <= c.packet.dport <= 9880 for c in result.counterexamples)


def test_a_wrong_identity_is_caught(
    floor: Inventory, floor_with_deny: tuple[Policy, dict[str, SwitchTables]]
) -> None:
    policy, switches = floor_with_deny
    tor = switches["tor-alg"]
    riskdb, oms1 = floor.hosts_by_name["riskdb"].ip, floor.hosts_by_name["oms1"].ip
    hit = lookup(tor.table("dst_identity"), {"epoch": 0, "dst_addr": riskdb})
    tags = hit.params if hit is not None else (("tags", 0),)  # the default: no tags

    # On tor-alg, oms1's packets are labelled as riskdb's: algo -> oms1 FIX stops working.
    def oms1_entry(e: TableEntry) -> bool:
        return e.table == "dst_identity" and getattr(_match(e, "dst_addr"), "value", None) == oms1

    assert any(oms1_entry(e) for e in tor.entries)  # one entry per host: relabel it
    relabel = lambda e: dataclasses.replace(e, params=tags)  # noqa: E731
    corrupted = _edit(switches, "tor-alg", oms1_entry, relabel)
    kinds = _kinds(policy, floor, corrupted)
    assert {"denied-by-tables", "source-tor"} <= kinds


def test_a_missing_reply_restriction_is_caught(
    floor: Inventory, floor_with_deny: tuple[Policy, dict[str, SwitchTables]]
) -> None:
    policy, switches = floor_with_deny
    reply = lambda e: e.table == "policy" and _match(e, "tcp_flags") is not None  # noqa: E731
    corrupted = _edit(switches, "tor-oms", reply, lambda e: _with(e, "tcp_flags", None))
    result = verify(policy, floor, corrupted)
    assert "allowed-by-tables" in {c.kind for c in result.counterexamples}
    syn = [
        c
        for c in result.counterexamples
        if c.packet.protocol == 6 and not c.packet.tcp_flags & 0x10
    ]
    assert syn, "a SYN from the answering side must be shown getting through"


def test_a_routing_loop_is_caught(
    floor: Inventory, floor_with_deny: tuple[Policy, dict[str, SwitchTables]]
) -> None:
    policy, switches = floor_with_deny
    oms1 = floor.hosts_by_name["oms1"]

    def route_to_oms1(e: TableEntry) -> bool:
        m = _match(e, "dst_addr")
        return e.table == "routing" and m is not None and (m.value, m.arg) == (oms1.ip, 32)

    # tor-oms sends oms1's packets up to spine1, which sends them back down: a loop.
    up = lambda e: dataclasses.replace(e, params=(("port", 9),))  # noqa: E731
    result = verify(policy, floor, _edit(switches, "tor-oms", route_to_oms1, up))
    loops = [c for c in result.counterexamples if c.kind == "loop"]
    assert loops and "routing loops: " in loops[0].observed
    assert loops[0].packet.dst == oms1.ip


def test_an_accepted_spoof_is_caught(
    floor: Inventory, floor_with_deny: tuple[Policy, dict[str, SwitchTables]]
) -> None:
    policy, switches = floor_with_deny
    algo1, algo2 = floor.hosts_by_name["algo1"], floor.hosts_by_name["algo2"]

    def own(e: TableEntry) -> bool:
        m = _match(e, "src_addr")
        port = FieldMatch("ingress_port", "exact", algo1.port)
        return (
            e.table == "src_identity"
            and m is not None
            and m.value == algo1.ip
            and _match(e, "ingress_port") == port
        )

    widened = lambda e: _with(e, "src_addr", FieldMatch("src_addr", "lpm", algo1.ip & ~0xFF, 24))  # noqa: E731
    result = verify(policy, floor, _edit(switches, "tor-alg", own, widened))
    spoofs = [c for c in result.counterexamples if c.kind == "spoof-accepted"]
    assert any(c.packet.src == algo2.ip and c.sender == "algo1" for c in spoofs)
