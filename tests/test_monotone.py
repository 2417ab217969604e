"""A change that only widens or only narrows (a grant, a revoke), or that adds permits and
removes others with no identity changed (a rule's port edited), is written without an
epoch flip: compiler/differential.py `monotone_change` says when, runtime/overlay.py
`monotone_plan` orders the writes. Every state between two of them judges each packet as
the old tables or as the new ones do."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import pytest

from compiler.check import check_policy
from compiler.differential import Monotone, monotone_change
from compiler.emit import Build, build
from compiler.entries import SwitchTables, TableEntry
from compiler.evaluate import Fabric, PacketFields
from compiler.inventory import Inventory
from compiler.protocols import PROTO_TCP, TCP_ACK, TCP_SYN
from p4src.spec import PIPELINE
from runtime.entities import canonical_entry, entry_from_proto, table_entry_proto
from runtime.overlay import monotone_plan
from runtime.plan import (
    DELETE,
    INSERT,
    MODIFY,
    Change,
    Desired,
    Held,
    SwitchPlan,
    Tables,
    clone_session,
)

GRANT = "allow algo1 -> settle2 tcp 6001 name grant_1"
SOME_PORTS = (6001, 9876, 7000, 7001)
PORT_EDIT = ("settlement   tcp 7000", "settlement   tcp 7001")  # two racks' hosts
RANGE_EDIT = ("settlement   tcp 7000", "settlement   tcp 6990-7010")  # over the old port


def _text(floor_policy_text: str, extra: str = "") -> str:
    lines = [line for line in floor_policy_text.splitlines() if not line.startswith("expect")]
    return "\n".join(lines) + "\n" + extra + "\n"


def _build(text: str, floor: Inventory, first: Build | None = None) -> Build:
    policy = check_policy(text, "floor.zt", floor).policy
    assert policy is not None
    return build(policy, floor, text, "ref", allocation=first.allocation if first else None)


def _switches(built: Build) -> dict[str, SwitchTables]:
    return {sw.switch: sw for sw in built.switches}


@pytest.fixture(scope="module")
def granted(floor: Inventory, floor_policy_text: str) -> tuple[Build, Build]:
    """The trading floor, and the same with a grant between two racks' hosts."""
    first = _build(_text(floor_policy_text), floor)
    return first, _build(_text(floor_policy_text, GRANT), floor, first)


def test_a_grant_only_widens_and_its_revoke_only_narrows(granted: tuple[Build, Build]) -> None:
    before, after = (_switches(b) for b in granted)
    grant = monotone_change(before, after)
    assert isinstance(grant, Monotone) and grant.widens
    assert set(grant.changes) == {"tor-alg", "tor-stl"}  # algo1's and settle2's racks
    for name, changed in grant.changes.items():
        tables = {e.table for e in changed}
        assert tables <= {"src_identity", "dst_identity", "policy"}
        added = [e for e in changed if e.table == "policy"]
        assert added and all(e.action == "permit" and e not in before[name].entries for e in added)
    revoke = monotone_change(after, before)
    assert isinstance(revoke, Monotone) and not revoke.widens
    assert revoke.changes.keys() == grant.changes.keys()


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ("default deny log", "deny algo1 -> settle2 tcp 6001\ndefault deny log", "other than"),
        ("allow risk         -> risk_db      tcp 5432", "", "other than"),  # a reply deny goes
    ],
)
def test_a_change_that_moves_both_ways_or_denies_is_refused(
    floor: Inventory, floor_policy_text: str, old: str, new: str, why: str
) -> None:
    text = _text(floor_policy_text)
    assert old in text
    first = _build(text, floor)
    second = _build(text.replace(old, new), floor, first)
    found = monotone_change(_switches(first), _switches(second))
    assert isinstance(found, str) and why in found, found


def test_a_retag_that_changes_what_a_kept_entry_matches_is_refused(
    granted: tuple[Build, Build], floor: Inventory
) -> None:
    before, after = (_switches(b) for b in granted)
    tor = after["tor-alg"]
    kept = next(e for e in tor.entries if e.table == "policy" and e in before["tor-alg"].entries
                and e.match("src_tags") is not None)  # fmt: skip
    src = kept.match("src_tags")
    assert src is not None
    # algo1's identity entry on its port given a vector this kept entry matches
    ip = floor.hosts_by_name["algo1"].ip
    algo1 = next(
        e for e in tor.entries
        if e.table == "src_identity" and e.role == "host"
        and (m := e.match("src_addr")) is not None and m.value == ip
    )  # fmt: skip
    tags = dict(algo1.params)["tags"]
    bent = TableEntry(algo1.table, algo1.matches, algo1.action,
                      (("tags", (tags & ~src.arg) | src.value),), algo1.priority, None,
                      algo1.role)  # fmt: skip
    if dict(bent.params)["tags"] == tags:
        pytest.skip("the kept entry matches algo1 already")
    entries = tuple(bent if e is algo1 else e for e in tor.entries)
    bad = {
        **after,
        "tor-alg": SwitchTables(tor.switch, tor.role, tor.device_id, entries, tor.defaults),
    }
    found = monotone_change(before, bad)
    assert isinstance(found, str) and "kept entry" in found, found


def _held(tables: SwitchTables) -> Held:
    entries = [canonical_entry(table_entry_proto(PIPELINE, e)) for e in tables.entries]
    return Held(entries, 0, clone_session(255))


def _key(entry: TableEntry) -> tuple[object, ...]:
    return (entry.table, tuple(sorted(entry.matches, key=lambda m: m.field)))


def _after(tables: SwitchTables, changes: Iterable[Change]) -> SwitchTables:
    """`tables` once these writes took, as the switch then holds them."""
    held = {_key(e): e for e in tables.entries}
    for c in changes:
        entry = entry_from_proto(PIPELINE, c.entity.table_entry)
        if c.op == DELETE:
            del held[_key(entry)]
        else:
            assert (c.op == MODIFY) == (_key(entry) in held)
            held[_key(entry)] = entry
    return SwitchTables(tables.switch, tables.role, tables.device_id, tuple(held.values()),
                        tables.defaults)  # fmt: skip


def _packets(floor: Inventory) -> list[tuple[str, PacketFields]]:
    """Every host to every other, a SYN to and an ACK back from a few ports."""
    out = []
    for s, d in itertools.permutations(floor.hosts, 2):
        for port in SOME_PORTS:
            out.append((s.name, PacketFields(s.ip, d.ip, PROTO_TCP, 40000, port, TCP_SYN)))
            out.append((s.name, PacketFields(s.ip, d.ip, PROTO_TCP, port, 40000, TCP_ACK)))
    return out


def _verdicts(
    tables: Mapping[str, SwitchTables], floor: Inventory, packets: list[tuple[str, PacketFields]]
) -> list[bool]:
    fabric = Fabric(tables, floor)
    return [fabric.walk(src, pkt).delivered for src, pkt in packets]


@pytest.mark.parametrize("widen", [True, False], ids=["grant", "revoke"])
def test_every_state_between_the_writes_judges_each_packet_by_the_old_or_the_new_tables(
    granted: tuple[Build, Build], floor: Inventory, widen: bool
) -> None:
    old, new = (_switches(b) for b in (granted if widen else granted[::-1]))
    change = monotone_change(old, new)
    assert isinstance(change, Monotone) and change.widens is widen
    steps: dict[str, list[Change]] = {}
    for name, plan in _plans(old, new, change).items():
        assert plan.flip is None and not plan.finish
        steps[name] = list(plan.prepare)
        ops = [c.op for c in plan.prepare if c.table == "policy"]
        assert ops and set(ops) == {INSERT if widen else DELETE}
        # permits before the retags when they come, after them when they go: two writes
        # (a switch may apply one Write's updates in any order)
        tables = [{c.table == "policy" for c in step} for step in plan.steps()]
        assert tables == ([{True}, {False}] if widen else [{False}, {True}])
    _every_state(old, new, steps, floor)


@pytest.mark.parametrize("edit", [PORT_EDIT, RANGE_EDIT], ids=["port", "range-widened"])
@pytest.mark.parametrize("reverse", [False, True], ids=["as-planned", "each-write-reversed"])
def test_a_port_edit_adds_the_new_permits_then_removes_the_old_without_a_flip(
    floor: Inventory, floor_policy_text: str, edit: tuple[str, str], reverse: bool
) -> None:
    """The new permits written, then the old ones deleted, in two writes and no flip;
    every state between two writes (each write's updates in the planned order or the
    reverse: a switch may take a batch in any order) judges each packet by the old or the
    new tables, a new range that holds the old port included."""
    old, new = _edited(floor, floor_policy_text, edit)
    change = monotone_change(old, new)
    assert isinstance(change, Monotone) and change.both, change
    assert set(change.changes) == {"tor-oms", "tor-stl"}  # order_router's and settlement's
    steps: dict[str, list[Change]] = {}
    for name, plan in _plans(old, new, change).items():
        assert plan.flip is None and not plan.finish
        added, gone = plan.steps()
        assert {(c.op, c.table) for c in added} == {(INSERT, "policy")}
        assert {(c.op, c.table) for c in gone} == {(DELETE, "policy")}
        order = -1 if reverse else 1
        steps[name] = [*added[::order], *gone[::order]]
    _every_state(old, new, steps, floor)


def test_old_permits_removed_before_the_new_ones_come_would_drop_a_packet_midway(
    floor: Inventory, floor_policy_text: str
) -> None:
    """Why the new permits go first: a port range widened over the old port, written the
    other way round, has a state between the writes that drops a packet both builds
    deliver (the old port's, once its permit is gone and before the range is in)."""
    old, new = _edited(floor, floor_policy_text, RANGE_EDIT)
    change = monotone_change(old, new)
    assert isinstance(change, Monotone) and change.both
    steps = {}
    for name, plan in _plans(old, new, change).items():
        added, gone = plan.steps()
        steps[name] = [*gone, *added]
    assert _odd_states(old, new, steps, floor)


def test_permits_both_ways_with_an_identity_retagged_take_the_flip(
    floor: Inventory, floor_policy_text: str
) -> None:
    old, new = _edited(floor, floor_policy_text, PORT_EDIT)
    tor = new["tor-stl"]
    host = next(e for e in tor.entries if e.table == "src_identity" and e.role == "host")
    tags = dict(host.params)["tags"]
    bent = TableEntry(host.table, host.matches, host.action, (("tags", tags ^ 1),),
                      host.priority, None, host.role)  # fmt: skip
    entries = tuple(bent if e is host else e for e in tor.entries)
    retagged = {**new, "tor-stl": SwitchTables(tor.switch, tor.role, tor.device_id, entries,
                                               tor.defaults)}  # fmt: skip
    found = monotone_change(old, retagged)
    assert isinstance(found, str) and "identities change" in found, found


def _plans(
    old: Mapping[str, SwitchTables], new: Mapping[str, SwitchTables], change: Monotone
) -> dict[str, SwitchPlan]:
    """Each changed switch's writes, from `old` (held as compiled) to `new`."""
    pipeline = Tables(PIPELINE)
    out = {}
    for name in change.changes:
        desired = Desired.of(pipeline, new[name], 255)
        out[name] = monotone_plan(pipeline, desired, _held(old[name]), change)
    return out


def _edited(
    floor: Inventory, floor_policy_text: str, edit: tuple[str, str]
) -> tuple[dict[str, SwitchTables], dict[str, SwitchTables]]:
    """The trading floor's tables, and those of the policy with `edit` made (the same
    allocation)."""
    text = _text(floor_policy_text)
    assert edit[0] in text
    first = _build(text, floor)
    return _switches(first), _switches(_build(text.replace(*edit), floor, first))


def _every_state(
    old: Mapping[str, SwitchTables],
    new: Mapping[str, SwitchTables],
    steps: Mapping[str, list[Change]],
    floor: Inventory,
) -> None:
    """Two switches' writes (`steps`, from `old`), each state one of them has reached while
    the other is at its start or its end: every packet judged as `old` or `new` judge it,
    and the last state is `new`."""
    odd = _odd_states(old, new, steps, floor)
    assert not odd, odd[:3]
    final = {name: _after(old[name], changes) for name, changes in steps.items()}
    packets = _packets(floor)
    assert _verdicts({**old, **final}, floor, packets) == _verdicts(new, floor, packets)


def _odd_states(
    old: Mapping[str, SwitchTables],
    new: Mapping[str, SwitchTables],
    steps: Mapping[str, list[Change]],
    floor: Inventory,
) -> list[str]:
    """`_every_state`'s states where some packet is judged as neither build judges it."""
    packets = _packets(floor)
    before, after = _verdicts(old, floor, packets), _verdicts(new, floor, packets)
    assert before != after  # the changed flow
    a, b = sorted(steps)
    states = {(i, len(steps[b])) for i in range(len(steps[a]) + 1)}
    states |= {(len(steps[a]), j) for j in range(len(steps[b]) + 1)}
    states |= {(i, 0) for i in range(len(steps[a]) + 1)}
    states |= {(0, j) for j in range(len(steps[b]) + 1)}
    out = []
    for i, j in sorted(states):
        mid = {**old, a: _after(old[a], steps[a][:i]), b: _after(old[b], steps[b][:j])}
        seen = _verdicts(mid, floor, packets)
        odd = [
            p for p, s, x, y in zip(packets, seen, before, after, strict=True) if s not in (x, y)
        ]
        if odd:
            out.append(f"{a} after {i} writes, {b} after {j}: {odd[:3]}")
    return out
