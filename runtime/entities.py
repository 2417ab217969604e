"""Compiled entries (compiler/entries.py) <-> P4Runtime messages, in canonical form.

Shared by the controller, which writes what the compiler produced, and the reference
switch, which stores what it accepted: both sides build messages here, so what is written
and what is read back compare as protobuf values.
"""

from __future__ import annotations

from finsy.proto import p4r

from compiler.entries import DefaultAction, FieldMatch, TableEntry
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
    return msg


def default_entry_proto(pipeline: Pipeline, default: DefaultAction) -> p4r.TableEntry:
    msg = p4r.TableEntry(table_id=pipeline.table(default.table).id, is_default_action=True)
    msg.action.action.CopyFrom(action_proto(pipeline.action(default.action), default.params))
    return msg
