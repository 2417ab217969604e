"""Our P4Info, built from the pipeline spec with the protobufs finsy ships.

It must be identical in content to what `p4c-bm2-ss --p4runtime-files` writes for the
v1model program (tests/test_p4info.py compares them when p4c is installed): names are
"<control>.<object>" with the object name as alias, ids are the spec's `@id`s, and
resources appear in id order.
"""

from __future__ import annotations

from finsy.proto import p4i
from google.protobuf import text_format

from p4src.spec import PIPELINE, ControllerHeader, Pipeline

_MATCH_TYPES = {
    "exact": p4i.MatchField.EXACT,
    "lpm": p4i.MatchField.LPM,
    "ternary": p4i.MatchField.TERNARY,
    "range": p4i.MatchField.RANGE,
}
_SCOPES = {
    "TABLE_AND_DEFAULT": p4i.ActionRef.TABLE_AND_DEFAULT,
    "TABLE_ONLY": p4i.ActionRef.TABLE_ONLY,
    "DEFAULT_ONLY": p4i.ActionRef.DEFAULT_ONLY,
}
_SCOPE_ANNOTATION = {"TABLE_ONLY": "@tableonly", "DEFAULT_ONLY": "@defaultonly"}


def build_p4info(pipeline: Pipeline = PIPELINE, arch: str = "v1model") -> p4i.P4Info:
    info = p4i.P4Info()
    info.pkg_info.arch = arch
    for table in sorted(pipeline.tables, key=lambda t: t.id):
        t = info.tables.add()
        _preamble(t.preamble, table.id, pipeline.qualified(table.name), table.name)
        for key in table.keys:
            mf = t.match_fields.add()
            mf.id, mf.name, mf.bitwidth = key.id, key.name, key.bits
            mf.match_type = _MATCH_TYPES[key.match]
        for ref in table.actions:
            ar = t.action_refs.add()
            ar.id = pipeline.action(ref.name).id
            if ref.scope != "TABLE_AND_DEFAULT":
                ar.scope = _SCOPES[ref.scope]
                ar.annotations.append(_SCOPE_ANNOTATION[ref.scope])
        default = pipeline.action(table.default_action)
        if table.const_default:
            t.const_default_action_id = default.id
        # p4c writes the program's default action, arguments at their full byte width.
        t.initial_default_action.action_id = default.id
        for param, value in zip(default.params, table.default_args, strict=True):
            arg = t.initial_default_action.arguments.add()
            arg.param_id = param.id
            arg.value = value.to_bytes((param.bits + 7) // 8, "big")
        for resource in (table.counter, table.meter):
            if resource is not None:
                t.direct_resource_ids.append(resource.id)
        t.size = table.size
    used = {ref.name for table in pipeline.tables for ref in table.actions}
    for action in sorted(pipeline.actions, key=lambda a: a.id):
        if action.name not in used:
            continue
        a = info.actions.add()
        _preamble(a.preamble, action.id, pipeline.qualified(action.name), action.name)
        for param in action.params:
            p = a.params.add()
            p.id, p.name, p.bitwidth = param.id, param.name, param.bits
    for counter in sorted(pipeline.counters, key=lambda c: c.id):
        ic = info.counters.add()
        _preamble(ic.preamble, counter.id, pipeline.qualified(counter.name), counter.name)
        ic.spec.unit = p4i.CounterSpec.Unit.Value(counter.unit)
        ic.size = counter.size
    for table in pipeline.tables:
        if table.counter is not None:
            c = info.direct_counters.add()
            _preamble(
                c.preamble,
                table.counter.id,
                pipeline.qualified(table.counter.name),
                table.counter.name,
            )
            c.spec.unit = p4i.CounterSpec.Unit.Value(table.counter.unit)
            c.direct_table_id = table.id
        if table.meter is not None:
            m = info.direct_meters.add()
            _preamble(
                m.preamble, table.meter.id, pipeline.qualified(table.meter.name), table.meter.name
            )
            m.spec.unit = p4i.MeterSpec.Unit.Value(table.meter.unit)
            m.direct_table_id = table.id
    for header in (pipeline.packet_in, pipeline.packet_out):
        _controller_header(info.controller_packet_metadata.add(), header)
    info.type_info.SetInParent()  # p4c always writes it, empty for this program
    return info


def _preamble(pre: p4i.Preamble, ident: int, name: str, alias: str) -> None:
    pre.id, pre.name, pre.alias = ident, name, alias


def _controller_header(cpm: p4i.ControllerPacketMetadata, header: ControllerHeader) -> None:
    _preamble(cpm.preamble, header.id, header.name, header.name)
    cpm.preamble.annotations.append(f'@controller_header("{header.name}")')
    for i, f in enumerate(header.fields, start=1):
        md = cpm.metadata.add()
        md.id, md.name, md.bitwidth = i, f.name, f.bits


def p4info_text(pipeline: Pipeline = PIPELINE, arch: str = "v1model") -> str:
    """The P4Info as text protobuf, the form written to p4info.txtpb."""
    text: str = text_format.MessageToString(build_p4info(pipeline, arch))
    return text
