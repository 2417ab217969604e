"""The table index (`compiler.evaluate.TableIndex`) against the linear scan (`lookup`).

The scan is the definition: highest priority wins, then the longest prefix, then the first
entry in table order. For random entry sets over the real pipeline's tables (every key
exact/lpm/ternary/range as the table declares it, or left out; priorities drawn from a small
set so ties are common) and random packets, the index must return the very same entry.
Values are drawn from small pools near each other so that entries overlap and packets hit.
The identity vectors (`src_tags`, `dst_tags`) are mostly matched as the compiler does, one
4-bit field of the vector (compiler/tags.py), and packets carry vectors with a value in a
few fields.

P4SEG_PROPERTY_EXAMPLES=N runs every property with N examples instead of 200.
"""

from __future__ import annotations

import dataclasses
import os
import random

import pytest
from finsy.proto import p4r
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from p4rt import default_updates, inserts, pipeline_config, update
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from compiler.emit import build
from compiler.entries import FieldMatch, SwitchTables, TableEntry
from compiler.evaluate import (
    IndexedSwitch,
    PacketFields,
    ScanSwitch,
    TableIndex,
    _Slices,
    evaluate,
    lookup,
)
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.tags import FIELD_MASK, FIELD_VALUES
from p4src.spec import PIPELINE, TAG_FIELD_BITS, Key, Table, build_pipeline
from runtime.entities import table_entry_proto
from runtime.refswitch.switch import ReferenceSwitch

SPA = p4r.SetForwardingPipelineConfigRequest
DELETE = p4r.Update.DELETE

PROPERTY = settings(
    max_examples=int(os.environ.get("P4SEG_PROPERTY_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KEYED = [t for t in PIPELINE.tables if t.keys]
# The ternary build (fit.py's ranges as ternary prefixes) has the same tables, other kinds.
TERNARY = build_pipeline(range_kind="ternary")
TABLES = KEYED + [TERNARY.table(t.name) for t in KEYED if t.name == "policy"]
A = 10 << 24  # 10.0.0.0
TAG_KEYS = ("src_tags", "dst_tags")
TAG_FIELDS = (0, 1, 2, 5, 63)  # the vector's fields the tests use (63: a prefix mask)


def _pool(key: Key) -> list[int]:
    """Values that make entries overlap and packets hit them (within the field's width, as
    the parser sets them and P4Runtime accepts them)."""
    top = (1 << key.bits) - 1
    if key.bits == 32:
        return [0, A, A + 1, A + 2, A + 3, A + 256, A + 257, A + (1 << 16), top]
    return sorted({v for v in (0, 1, 2, 3, 4, 5, 7, 8, 16, top >> 1, top) if v <= top})


def _value(key: Key) -> st.SearchStrategy[int]:
    anything = st.one_of(st.sampled_from(_pool(key)), st.integers(0, (1 << key.bits) - 1))
    return st.one_of(_vector(), _vector(), anything) if key.name in TAG_KEYS else anything


@st.composite
def _vector(draw: st.DrawFn) -> int:
    """An identity vector: a value (often a small one, so that vectors share it) in a few
    of the tested fields."""
    vector = 0
    for f in draw(st.lists(st.sampled_from(TAG_FIELDS), max_size=4, unique=True)):
        value = draw(st.one_of(st.integers(1, 3), st.integers(0, FIELD_VALUES)))
        vector |= value << (f * TAG_FIELD_BITS)
    return vector


@st.composite
def _tag_slice(draw: st.DrawFn, key: Key) -> FieldMatch:
    """The compiler's match on an identity vector: one field's value; now and then two
    fields at once, or a value outside its mask (an entry that matches nothing)."""
    mask = FIELD_MASK << (draw(st.sampled_from(TAG_FIELDS)) * TAG_FIELD_BITS)
    if not draw(st.integers(0, 9)):
        mask |= FIELD_MASK << (draw(st.sampled_from(TAG_FIELDS)) * TAG_FIELD_BITS)
    value = draw(_vector()) & mask
    if not draw(st.integers(0, 19)):
        value |= 1 << draw(st.integers(0, key.bits - 1))
    return FieldMatch(key.name, "ternary", value, mask)


@st.composite
def _match(draw: st.DrawFn, key: Key) -> FieldMatch:
    top = (1 << key.bits) - 1
    if key.name in TAG_KEYS and draw(st.integers(0, 4)):
        return draw(_tag_slice(key))
    if key.match == "exact":
        return FieldMatch(key.name, "exact", draw(_value(key)))
    if key.match == "lpm":
        plen = draw(st.sampled_from([0, 1, key.bits // 2, key.bits - 2, key.bits, key.bits]))
        return FieldMatch(key.name, "lpm", draw(_value(key)), plen)
    if key.match == "range":
        lo, hi = draw(_value(key)), draw(_value(key))
        if draw(st.integers(0, 9)):  # now and then an empty range (lo > hi)
            lo, hi = min(lo, hi), max(lo, hi)
        return FieldMatch(key.name, "range", lo, hi)
    prefix = [top & ~((1 << n) - 1) for n in range(0, key.bits + 1, max(1, key.bits // 4))]
    mask = draw(st.one_of(st.sampled_from([0, top, *prefix]), st.integers(0, top)))
    value = draw(_value(key))
    return FieldMatch(key.name, "ternary", value & mask if draw(st.booleans()) else value, mask)


@st.composite
def _entry(draw: st.DrawFn, table: Table) -> TableEntry:
    keys = [k for k in table.keys if draw(st.integers(0, 3))]  # a quarter left out
    matches = tuple(draw(_match(k)) for k in keys)
    priority = draw(st.sampled_from([1, 2, 3, 10, 33, 100])) if table.needs_priority else 0
    n = draw(st.integers(0, 1 << 16))
    return TableEntry(table.name, matches, "a", (("n", n),), priority)


@st.composite
def _packet(draw: st.DrawFn, table: Table) -> dict[str, int]:
    return {k.name: draw(_value(k)) for k in table.keys}


@st.composite
def _case(
    draw: st.DrawFn, tables: list[Table] = TABLES, most: int = 60
) -> tuple[Table, list[TableEntry], list[dict[str, int]]]:
    table = draw(st.sampled_from(tables))
    entries = draw(st.lists(_entry(table), max_size=most))
    # Some copies: equal entries and equal ranks, where only table order decides.
    entries += draw(st.lists(st.sampled_from(entries), max_size=5)) if entries else []
    # Some packets built from an entry's own values, so that specific entries are hit (an
    # identity vector keeps its other fields: an address is in several sets).
    packets = draw(st.lists(_packet(table), min_size=1, max_size=25))
    for e in draw(st.lists(st.sampled_from(entries), max_size=10)) if entries else []:
        pkt = draw(_packet(table))
        for m in e.matches:
            keep = pkt[m.field] & ~m.arg if m.field in TAG_KEYS and m.kind == "ternary" else 0
            pkt[m.field] = keep | m.value
        packets.append(pkt)
    return table, entries, packets


# Policy tables only, larger: the identity vectors matched by tag slices, as compiled.
POLICIES = [t for t in TABLES if t.name == "policy"]
TAGGED = _case(POLICIES, 150)


@PROPERTY
@given(st.one_of(_case(), TAGGED))
def test_the_index_returns_what_the_linear_scan_returns(
    case: tuple[Table, list[TableEntry], list[dict[str, int]]],
) -> None:
    _, entries, packets = case
    index = TableIndex(entries)
    for values in packets:
        want = lookup(entries, values)
        got = index.lookup(values)
        assert got is want, (values, want, got)  # the same entry, not an equal one


@PROPERTY
@given(st.one_of(_case(), TAGGED), st.data())
def test_an_index_rebuilt_after_writes_reuses_entries_and_agrees(
    case: tuple[Table, list[TableEntry], list[dict[str, int]]], data: st.DataObject
) -> None:
    """The reference switch's path: each write makes a new `IndexedSwitch` from the previous
    one (entries kept are the same objects, prepared once); every version answers as the scan."""
    spec, entries, packets = case
    table = spec.name
    tables = SwitchTables("s", "tor", 1, tuple(entries), ())
    switch = IndexedSwitch.of(tables)
    for _ in range(data.draw(st.integers(1, 4))):
        for values in packets:
            assert switch.lookup(table, values) is lookup(switch.by_table.get(table, []), values)
        kept = [e for e in tables.entries if data.draw(st.integers(0, 5))]  # some deleted
        added = data.draw(st.lists(_entry(spec), max_size=8))
        at = data.draw(st.integers(0, len(kept)))
        tables = dataclasses.replace(tables, entries=(*kept[:at], *added, *kept[at:]))
        before = switch.indexes.get(table)
        switch = IndexedSwitch.of(tables, switch)
        if before is not None and kept:
            switch.lookup(table, packets[0])
            reused = switch.indexes[table].prepared[id(kept[0])]
            assert reused is before.prepared[id(kept[0])]
    for values in packets:
        assert switch.lookup(table, values) is lookup(switch.by_table.get(table, []), values)


def test_entries_without_a_cuttable_field_are_searched_in_order() -> None:
    """Wildcards and non-prefix masks give the index no field to cut: it must still scan."""
    flags = FieldMatch("tcp_flags", "ternary", 0x12, 0x12)
    entries = [TableEntry("policy", (), "deny", (("rule_id", i),), 5) for i in range(20)]
    entries += [
        TableEntry("policy", (flags,), "permit", (("rule_id", 99),), 5 + i) for i in range(20)
    ]
    index = TableIndex(entries)
    for flag in (0x02, 0x12, 0x13):
        values = {"epoch": 0, "src_tags": 1, "dst_tags": 2, "protocol": 6,
                  "l4_src_port": 1, "l4_dst_port": 2, "tcp_flags": flag}  # fmt: skip
        assert index.lookup(values) is lookup(entries, values)


def _slot(rnd: random.Random, fields: int) -> tuple[int, int]:
    """A random tag (field, value), as compiler/tags.py allocates them: values 1..15."""
    return rnd.randrange(fields), rnd.randint(1, FIELD_VALUES)


def _tag(slot: tuple[int, int]) -> tuple[int, int]:
    """The tag's (value, mask) over the vector."""
    shift = slot[0] * TAG_FIELD_BITS
    return slot[1] << shift, FIELD_MASK << shift


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_large_policy_table_agrees_with_the_scan(seed: int) -> None:
    """Thousands of entries shaped like the compiler's (a tag slice of each identity vector
    over 40 fields, ports, protocols, a few wildcards and wide ranges, clustered priorities),
    and packets whose vectors name several sets, so that the index splits deeply: on a tag
    vector first, as the slices cut best."""
    rnd = random.Random(seed)
    fields = 40
    entries: list[TableEntry] = []
    for i in range(3000):
        matches = [
            FieldMatch("src_tags", "ternary", *_tag(_slot(rnd, fields))),
            FieldMatch("dst_tags", "ternary", *_tag(_slot(rnd, fields))),
        ]
        if rnd.random() < 0.8:
            matches.append(FieldMatch("protocol", "ternary", rnd.choice([6, 17, 1]), 0xFF))
        if rnd.random() < 0.6:
            lo = rnd.choice([22, 80, 443, 1024, 9876, 30000])
            matches.append(FieldMatch("l4_dst_port", "range", lo, lo + rnd.choice([0, 0, 9])))
        if rnd.random() < 0.1:
            matches.append(FieldMatch("tcp_flags", "ternary", 0x10, 0x10))
        if rnd.random() < 0.2:
            matches.append(FieldMatch("epoch", "ternary", rnd.randrange(2), 1))
        if rnd.random() < 0.02:
            matches = matches[1:]  # no source tag: every source
        entries.append(
            TableEntry("policy", tuple(matches), "permit", (("rule_id", i),), rnd.randrange(50))
        )
    index = TableIndex(entries)
    assert isinstance(index.root, _Slices) and index.root.field in TAG_KEYS

    def vector(e: TableEntry, key: str) -> int:
        """An address in a few sets, at most one per field; for most packets, in the
        set `e` names."""
        v = sum(_tag(_slot(rnd, fields))[0] for _ in range(rnd.randrange(8)))
        m = e.match(key)
        return v & ~m.arg | m.value if m is not None and rnd.random() < 0.8 else v

    hits = 0
    for _ in range(3000):
        e = rnd.choice(entries)
        values = {
            "epoch": rnd.randrange(2),
            "src_tags": vector(e, "src_tags"),
            "dst_tags": vector(e, "dst_tags"),
            "protocol": rnd.choice([6, 17, 1, 47]),
            "l4_src_port": rnd.randrange(1 << 16),
            "l4_dst_port": rnd.choice([22, 80, 443, 1024, 1030, 9876, 30005, 5]),
            "tcp_flags": rnd.choice([0x02, 0x10, 0x18]),
        }
        want = lookup(entries, values)
        assert index.lookup(values) is want, values
        hits += want is not None
    assert hits > 300  # the packets hit entries, not only the default


def test_routing_keeps_the_longest_prefix_and_table_order_on_ties() -> None:
    """No priorities: the longest prefix wins, and of equal prefixes the first entry."""
    route = [
        TableEntry("routing", (FieldMatch("dst_addr", "lpm", A, 8),), "forward", (("port", 1),)),
        TableEntry("routing", (FieldMatch("dst_addr", "lpm", A, 24),), "forward", (("port", 2),)),
        TableEntry("routing", (FieldMatch("dst_addr", "lpm", A, 24),), "forward", (("port", 3),)),
        TableEntry("routing", (FieldMatch("dst_addr", "lpm", 0, 0),), "forward", (("port", 4),)),
    ]
    index = TableIndex(route * 5)  # enough to split
    for dst, port in ((A + 5, 2), (A + 300, 1), (11 << 24, 4)):
        hit = index.lookup({"dst_addr": dst})
        assert hit is lookup(route * 5, {"dst_addr": dst})
        assert hit is not None and dict(hit.params)["port"] == port


def test_the_compiled_floor_evaluates_as_the_scan(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """Every table of every switch of the example floor, for packets between all its hosts
    (each service port the policy names, each protocol), from every port."""
    built = build(floor_policy, floor, floor_policy_text, "ref")
    hosts = list(floor.hosts)
    for tables in built.switches:  # whole verdicts, hits included, as with every table scanned
        idx, scan = IndexedSwitch.of(tables), ScanSwitch.of(tables)
        for src in hosts:
            for dst in hosts:
                for proto, dport in ((6, 22), (17, 30005), (6, 9876), (1, 0)):
                    pkt = PacketFields(src.ip, dst.ip, proto, 40000, dport)
                    assert evaluate(idx, src.port, pkt) == evaluate(scan, src.port, pkt)
    ports = sorted(
        {m.value for s in built.switches for e in s.entries for m in e.matches
         if m.field == "l4_dst_port"} | {0, 22, 30005}
    )  # fmt: skip
    checked = 0
    for tables in built.switches:
        idx = IndexedSwitch.of(tables)
        for src in hosts:
            for dst in hosts:
                for port in (1, 2, 9, 10):
                    values = {"epoch": 0, "ingress_port": port, "src_addr": src.ip}
                    values |= {"dst_addr": dst.ip}
                    for table in ("src_identity", "dst_identity", "routing"):
                        want = lookup(idx.by_table.get(table, []), values)
                        assert idx.lookup(table, values) is want
                result = evaluate(idx, src.port, PacketFields(src.ip, dst.ip, 6, 40000, 22))
                if result.rule_id is None:
                    continue
                for proto in (6, 17, 1):
                    for dport in ports:
                        values = {
                            "epoch": 0,
                            "src_tags": dict(result.hits[1].params)["tags"],
                            "dst_tags": dict(result.hits[2].params)["tags"],
                            "protocol": proto,
                            "l4_src_port": 40000,
                            "l4_dst_port": dport,
                            "tcp_flags": 0x10 if proto == 6 else 0,
                        }
                        want = lookup(idx.by_table.get("policy", []), values)
                        assert idx.lookup("policy", values) is want
                        checked += 1
    assert checked > 1000


def test_the_reference_switch_decides_new_flows_as_the_scan_across_writes(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """Device -> snapshot -> indexes reused from the last snapshot -> `Dataplane`: after each
    write (the permits deleted, then put back), every flow is decided as the scan of the
    switch's current entries decides it."""
    built = build(floor_policy, floor, floor_policy_text, "ref")
    tables = next(s for s in built.switches if s.switch == "tor-alg")
    sw = ReferenceSwitch(device_id=1)
    sw.device.set_pipeline(SPA.VERIFY_AND_COMMIT, pipeline_config())
    assert not any(sw.device.write([*default_updates(tables.defaults), *inserts(tables.entries)]))
    senders = [h for h in floor.hosts if h.switch == "tor-alg"]
    flows = [TCP(sport=40000, dport=d, flags="S") for d in (22, 443, 9876)] + [
        UDP(sport=40000, dport=d) for d in (53, 30005)
    ]
    permits = [e for e in tables.table("policy") if e.action.startswith("permit")]
    assert permits
    forwarded: dict[str, int] = {}
    for step in ("loaded", "permits deleted", "permits back"):
        if step == "permits deleted":
            gone = [update(DELETE, table_entry_proto(PIPELINE, e)) for e in permits]
            assert not any(sw.device.write(gone))
        elif step == "permits back":
            assert not any(sw.device.write(inserts(permits)))
        snap = sw.device.snapshot()
        assert snap is not None
        scan = ScanSwitch.of(snap.switch.tables)
        for src in senders:
            for dst in floor.hosts:
                for l4 in flows:
                    frame = bytes(Ether() / IP(src=_dotted(src.ip), dst=_dotted(dst.ip)) / l4)
                    sport, dport = l4.sport, l4.dport
                    flags = 0x02 if isinstance(l4, TCP) else 0
                    proto = 6 if isinstance(l4, TCP) else 17
                    pkt = PacketFields(src.ip, dst.ip, proto, sport, dport, flags)
                    want = evaluate(scan, src.port, pkt).egress_port
                    out = [p for p, _ in sw.inject(src.port, frame) if p != sw.device.cpu_port]
                    assert out == ([want] if want is not None else []), (step, src, dst, l4)
                    forwarded[step] = forwarded.get(step, 0) + len(out)
    # the writes changed what passes, and putting the entries back restored it
    assert forwarded["permits deleted"] < forwarded["loaded"] == forwarded["permits back"], (
        forwarded
    )


def _dotted(ip: int) -> str:
    return ".".join(str(ip >> s & 0xFF) for s in (24, 16, 8, 0))
