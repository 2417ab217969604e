"""Compiled entries (compiler/entries.py) <-> P4Runtime messages, in canonical form.

Shared by the controller, which writes what the compiler produced, and the reference
switch, which stores what it accepted: both sides build messages here, so what is written
and what is read back compare as protobuf values.
"""

from __future__ import annotations

from finsy.proto import p4r

from compiler.addresses import format_ipv4
from compiler.entries import DefaultAction, FieldMatch, MeterConfig, TableEntry
from p4src.spec import Action, Pipeline, Table
from runtime.codec import encode


def match_proto(table: Table, matches: tuple[FieldMatch, ...]) -> list[p4r.FieldMatch]:
    """The FieldMatch messages of `matches`, in the table's key order."""
    keys = {k.name: k for k in table.keys}
    out = []
    for m in sorted(matches, key=lambda m: keys[m.field].id):
        key = keys[m.field]
        fm = p4r.FieldMatch(field_id=key.id)
        if m.kind == "exact":
            fm.exact.value = encode(m.value, key.bits)
        elif m.kind == "lpm":
            fm.lpm.value, fm.lpm.prefix_len = encode(m.value, key.bits), m.arg
        elif m.kind == "ternary":
            fm.ternary.value, fm.ternary.mask = encode(m.value, key.bits), encode(m.arg, key.bits)
        else:
            fm.range.low, fm.range.high = encode(m.value, key.bits), encode(m.arg, key.bits)
        out.append(fm)
    return out


def action_proto(action: Action, params: tuple[tuple[str, int], ...]) -> p4r.Action:
    values = dict(params)
    msg = p4r.Action(action_id=action.id)
    for param in action.params:
        msg.params.add(param_id=param.id, value=encode(values[param.name], param.bits))
    return msg


def table_entry_proto(pipeline: Pipeline, entry: TableEntry) -> p4r.TableEntry:
    table = pipeline.table(entry.table)
    msg = p4r.TableEntry(table_id=table.id, priority=entry.priority)
    msg.match.extend(match_proto(table, entry.matches))
    msg.action.action.CopyFrom(action_proto(pipeline.action(entry.action), entry.params))
    if entry.meter is not None:
        msg.meter_config.CopyFrom(meter_proto(entry.meter))
    return msg


def meter_proto(meter: MeterConfig) -> p4r.MeterConfig:
    return p4r.MeterConfig(cir=meter.cir, cburst=meter.cburst, pir=meter.pir, pburst=meter.pburst)


def meter_of(entry: p4r.TableEntry) -> MeterConfig | None:
    """The entry's direct meter config; None when absent or all zero (unconfigured: every
    packet green, which P4Runtime reads back either way)."""
    if not entry.HasField("meter_config"):
        return None
    m = entry.meter_config
    if not (m.cir or m.cburst or m.pir or m.pburst):
        return None
    return MeterConfig(m.cir, m.cburst, m.pir, m.pburst)


def default_entry_proto(pipeline: Pipeline, default: DefaultAction) -> p4r.TableEntry:
    msg = p4r.TableEntry(table_id=pipeline.table(default.table).id, is_default_action=True)
    msg.action.action.CopyFrom(action_proto(pipeline.action(default.action), default.params))
    return msg


def _show(field: str, value: int) -> str:
    return format_ipv4(value) if field.endswith("_addr") else str(value)


def describe_entry(pipeline: Pipeline, entry: p4r.TableEntry) -> tuple[str, int | None]:
    """A one-line reading of an entry (`policy[src_tags=3..5 ...] -> permit(rule_id=2)`),
    and the policy rule id it carries, if any."""
    table = next((t for t in pipeline.tables if t.id == entry.table_id), None)
    if table is None:
        return f"table {entry.table_id:#x}", None
    keys = {k.id: k for k in table.keys}
    parts = []
    for fm in entry.match:
        key = keys.get(fm.field_id)
        if key is None:
            parts.append(f"field{fm.field_id}=?")
            continue
        kind = fm.WhichOneof("field_match_type")
        if kind == "exact":
            parts.append(f"{key.name}={_show(key.name, int.from_bytes(fm.exact.value, 'big'))}")
        elif kind == "lpm":
            addr = _show(key.name, int.from_bytes(fm.lpm.value, "big"))
            parts.append(f"{key.name}={addr}/{fm.lpm.prefix_len}")
        elif kind == "ternary":
            value, mask = (int.from_bytes(b, "big") for b in (fm.ternary.value, fm.ternary.mask))
            full = (1 << key.bits) - 1
            parts.append(
                f"{key.name}={value}" if mask == full else f"{key.name}={value:#x}&&&{mask:#x}"
            )
        elif kind == "range":
            lo, hi = (int.from_bytes(b, "big") for b in (fm.range.low, fm.range.high))
            parts.append(f"{key.name}={lo}" if lo == hi else f"{key.name}={lo}..{hi}")
    action = next((a for a in pipeline.actions if a.id == entry.action.action.action_id), None)
    rule_id: int | None = None
    if action is None:
        call = "?"
    else:
        names = {p.id: p.name for p in action.params}
        args = []
        for p in entry.action.action.params:
            arg = int.from_bytes(p.value, "big")
            args.append(f"{names.get(p.param_id, p.param_id)}={arg}")
            if names.get(p.param_id) == "rule_id":
                rule_id = arg
        call = f"{action.name}({', '.join(args)})"
    prio = f" prio {entry.priority}" if entry.priority else ""
    meter = meter_of(entry)
    metered = f" meter {meter.describe()}" if meter is not None else ""
    return f"{table.name}[{' '.join(parts)}]{prio} -> {call}{metered}", rule_id


def entry_from_proto(pipeline: Pipeline, entry: p4r.TableEntry) -> TableEntry:
    """A read-back entry as the compiler's value (for the evaluator: verify, trace, test).

    The rule id is read from the action's `rule_id` parameter where the action has one."""
    table = next(t for t in pipeline.tables if t.id == entry.table_id)
    keys = {k.id: k for k in table.keys}
    matches = []
    for fm in entry.match:
        key = keys[fm.field_id]
        kind = fm.WhichOneof("field_match_type")
        if kind == "exact":
            matches.append(FieldMatch(key.name, "exact", int.from_bytes(fm.exact.value, "big")))
        elif kind == "lpm":
            value = int.from_bytes(fm.lpm.value, "big")
            matches.append(FieldMatch(key.name, "lpm", value, fm.lpm.prefix_len))
        elif kind == "ternary":
            value, mask = (int.from_bytes(b, "big") for b in (fm.ternary.value, fm.ternary.mask))
            matches.append(FieldMatch(key.name, "ternary", value, mask))
        elif kind == "range":
            lo, hi = (int.from_bytes(b, "big") for b in (fm.range.low, fm.range.high))
            matches.append(FieldMatch(key.name, "range", lo, hi))
    action = next(a for a in pipeline.actions if a.id == entry.action.action.action_id)
    values = {p.param_id: int.from_bytes(p.value, "big") for p in entry.action.action.params}
    params = tuple((p.name, values[p.id]) for p in action.params)
    rule_id = dict(params).get("rule_id")
    return TableEntry(
        table.name,
        tuple(matches),
        action.name,
        params,
        entry.priority,
        rule_id,
        meter=meter_of(entry),
    )


def _shortest(data: bytes) -> bytes:
    return data.lstrip(b"\x00") or b"\x00"


def canonical_entry(entry: p4r.TableEntry) -> p4r.TableEntry:
    """`entry` with every byte string in its shortest form, its match in field order and an
    all-zero meter config dropped: what a target reads back may be padded (both are valid),
    plans compare exact bytes."""
    unconfigured = entry.HasField("meter_config") and meter_of(entry) is None
    if (
        all(_canonical_match(fm) for fm in entry.match)
        and all(_shortest(p.value) == p.value for p in entry.action.action.params)
        and not unconfigured
    ):
        return entry
    out = p4r.TableEntry()
    out.CopyFrom(entry)
    if unconfigured:  # an all-zero config is no config: what the compiler leaves out
        out.ClearField("meter_config")
    for fm in out.match:
        kind = fm.WhichOneof("field_match_type")
        if kind == "exact":
            fm.exact.value = _shortest(fm.exact.value)
        elif kind == "lpm":
            fm.lpm.value = _shortest(fm.lpm.value)
        elif kind == "ternary":
            fm.ternary.value, fm.ternary.mask = (
                _shortest(fm.ternary.value),
                _shortest(fm.ternary.mask),
            )
        elif kind == "range":
            fm.range.low, fm.range.high = _shortest(fm.range.low), _shortest(fm.range.high)
    for p in out.action.action.params:
        p.value = _shortest(p.value)
    matches = sorted(out.match, key=lambda m: m.field_id)
    del out.match[:]
    out.match.extend(matches)
    return out


def _canonical_match(fm: p4r.FieldMatch) -> bool:
    kind = fm.WhichOneof("field_match_type")
    values = {
        "exact": (fm.exact.value,),
        "lpm": (fm.lpm.value,),
        "ternary": (fm.ternary.value, fm.ternary.mask),
        "range": (fm.range.low, fm.range.high),
    }.get(kind or "", ())
    return all(_shortest(v) == v for v in values)
