"""The lines of the entries files and runtime listings are written directly, not through
`json.dumps`: each must be, byte for byte, what `json.dumps(doc, sort_keys=True)` makes of
the entry's document (its entries-file format, TableEntry.to_json; and the p4lang runtime
format), for any entry — every match kind, address fields, meters, no parameters or several,
a priority, rule id or role present or not. (Entry lines are filled in from a template per
shape, compiler/emit.py `_SHAPES`: names with `%` in them, and many values per shape.)"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.addresses import format_ipv4
from compiler.emit import (
    _dumps_listing,
    _entries_json,
    _runtime_json,
    _runtime_line,
    build,
    entry_line,
    load_entries,
)
from compiler.entries import FieldMatch, MeterConfig, TableEntry
from compiler.inventory import Inventory
from compiler.lower import SEGMENTS
from compiler.model import Policy
from compiler.targets import make_target

PIPE = make_target("ref").pipeline
TABLES = [t.name for t in PIPE.tables]
ACTIONS = [a.name for a in PIPE.actions]
FIELDS = ["src_addr", "dst_addr", "ingress_port", "protocol", "l4_dst_port", "src_tags", "epoch"]
NAMES = st.sampled_from(["tags", "port", "rule_id", "value", "a", "z", 'é"q', "p%s"])
INTS = st.integers(min_value=0, max_value=(1 << 64) - 1)

matches = st.lists(
    st.builds(FieldMatch, st.sampled_from(FIELDS),
              st.sampled_from(["exact", "lpm", "ternary", "range"]), INTS, INTS),
    unique_by=lambda m: m.field, max_size=5,
)  # fmt: skip
meters = st.none() | st.builds(MeterConfig, INTS, INTS, INTS, INTS)
entries = st.builds(
    TableEntry,
    st.sampled_from(TABLES),
    matches.map(tuple),
    st.sampled_from(ACTIONS),
    st.lists(st.tuples(NAMES, INTS), unique_by=lambda p: p[0], max_size=3).map(tuple),
    st.sampled_from([0, 1, 33, 1 << 30]),
    st.none() | st.integers(min_value=0, max_value=10_000),
    st.sampled_from(["", "host", "forward", "reply", 'odd "role" é', "100%d"]),
    meters,
)


def _runtime_doc(e: TableEntry) -> dict[str, object]:
    """The p4lang tutorials' runtime format of an entry, spelled out."""

    def value(field: str, v: int) -> object:
        return format_ipv4(v) if field in ("src_addr", "dst_addr") else v

    match: dict[str, object] = {}
    for m in e.matches:
        if m.kind == "exact":
            match[m.field] = value(m.field, m.value)
        elif m.kind == "lpm":
            match[m.field] = [value(m.field, m.value), m.arg]
        else:
            match[m.field] = [value(m.field, m.value), value(m.field, m.arg)]
    doc: dict[str, object] = {
        "table": PIPE.qualified(e.table),
        "match": match,
        "action_name": PIPE.qualified(e.action),
        "action_params": dict(e.params),
    }
    if e.priority:
        doc["priority"] = e.priority
    if e.meter is not None:
        doc["meter_config"] = e.meter.to_json()
    return doc


@settings(max_examples=400, deadline=None)
@given(entries)
def test_an_entry_line_is_what_json_dumps_writes(entry: TableEntry) -> None:
    assert entry_line(entry) == json.dumps(entry.to_json(), sort_keys=True)


@settings(max_examples=400, deadline=None)
@given(entries)
def test_a_runtime_line_is_what_json_dumps_writes(entry: TableEntry) -> None:
    assert _runtime_line(PIPE, entry) == json.dumps(_runtime_doc(entry), sort_keys=True)


def test_the_floor_entries_files_read_back(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """The trading floor's files, made of these lines, hold exactly its tables."""
    for target in ("ref", "bmv2", "tofino"):
        built = build(floor_policy, floor, floor_policy_text, target, listings=True)
        for sw in built.switches:
            text = built.files[f"entries/{sw.switch}.json"]
            assert load_entries(text).entries == sw.entries
            # written run by run (compiler/lower.py SEGMENTS; the ref target's tables are
            # the lowered ones): as the whole list would be
            assert SEGMENTS.find(sw) is not None or target != "ref"
            assert text == _dumps_listing(_entries_json(sw, built.target, {}), "entries")
            listing = built.files[f"entries/{sw.switch}-runtime.json"]
            whole = _runtime_json(sw, built.target, {})
            assert listing == _dumps_listing(whole, "table_entries")
            runtime = json.loads(listing)
            rows = [r for r in runtime["table_entries"] if not r.get("default_action")]
            if target == "ref":
                assert rows == [_runtime_doc(e) for e in sw.entries]
