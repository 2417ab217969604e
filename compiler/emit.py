"""Stage 5 — a compiled policy -> the build directory.

`build` is pure: it returns every artefact as text. `write_build` is the only place that
touches the file system: a new directory appears complete or not at all, an error never
leaves a partial build behind, and it writes only into new or empty directories and its
own builds (recognised by their manifest), never touching a file it did not write. Same
inputs, byte-identical outputs.

    DIR/p4/<target>/p4seg.p4          the P4 program for the target
    DIR/p4/ref/p4seg.json              ref only: the reference switch's device config
    DIR/p4info.txtpb                   our P4Info (text protobuf)
    DIR/entries/<switch>.json          p4seg's entry format
    DIR/entries/<switch>-runtime.json  the p4lang tutorials runtime format, for interop
                                       (with `listings`: compile --runtime-listings)
    DIR/report.json                    rules -> source lines, entries and utilisation, resources
    DIR/allocation.json                the stable rule ids (compiler.allocation): the next
                                       compile into DIR starts from them
    DIR/p4seg-build.json               the manifest: every file above that p4seg wrote
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import operator
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import cast

from compiler.addresses import format_ipv4
from compiler.allocation import Allocation, AllocationError
from compiler.entries import DefaultAction, FieldMatch, MeterConfig, SwitchTables, TableEntry
from compiler.fit import fit
from compiler.inventory import Inventory
from compiler.lower import SEGMENTS, Lowered, lower
from compiler.memo import ByObject, also_forget, collection_paused
from compiler.model import Policy, PolicyRule
from compiler.targets import (
    P4INFO_FILE,
    Target,
    device_config_file,
    make_target,
    program_file,
)
from p4src.p4info import p4info_text
from p4src.refconfig import device_config
from p4src.render import render_program
from p4src.spec import Pipeline, Table, build_pipeline

_ADDRESS_FIELDS = ("src_addr", "dst_addr")
# Tofino memory units (per stage): TCAM blocks 44 bits x 512 entries, SRAM blocks 128 bits x 1024.
TCAM_WIDTH, TCAM_DEPTH = 44, 512
SRAM_WIDTH, SRAM_DEPTH = 128, 1024
# Tofino (1): 12 match-action stages, each with 24 TCAM blocks and 80 SRAM blocks.
TOFINO_STAGES, STAGE_TCAM_BLOCKS, STAGE_SRAM_BLOCKS = 12, 24, 80


class BuildFiles(MutableMapping[str, str]):
    """A build's files: relative path -> content. A file nothing has asked for yet may be
    held as the function that makes its text, run once on its first read (a quarantine's
    switch is written before its runtime JSON and the report are made; write_build reads
    them all)."""

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}
        self._later: dict[str, Callable[[], str]] = {}
        # name -> the files its text is a function of alone (write_build: an earlier build's
        # copy of it stands while they are the same)
        self._sources: dict[str, tuple[str, ...]] = {}

    def later(self, name: str, make: Callable[[], str], sources: tuple[str, ...] = ()) -> None:
        """`name`'s text, made by `make` on its first read; `sources`: files whose texts
        alone determine it."""
        self._texts.pop(name, None)
        self._later[name] = make
        self._sources[name] = sources

    def unmade(self, name: str) -> tuple[str, ...] | None:
        """The sources of `name` while its text is not made yet (None: made, or none)."""
        return self._sources.get(name) if name in self._later else None

    def take(self, other: BuildFiles, name: str) -> None:
        """`other`'s file `name`, as it is there (made, or still to make)."""
        if name in other._later:
            self.later(name, other._later[name], other._sources.get(name, ()))
        else:
            self[name] = other._texts[name]

    def __getitem__(self, name: str) -> str:
        text = self._texts.get(name)
        if text is not None:
            return text
        make = self._later.get(name)
        if make is None:  # made by another thread meanwhile, or no such file
            return self._texts[name]
        text = self._texts[name] = make()  # two threads may both make it: the same text
        self._later.pop(name, None)
        return text

    def __setitem__(self, name: str, text: str) -> None:
        self._later.pop(name, None)
        self._texts[name] = text

    def __delitem__(self, name: str) -> None:
        if self._later.pop(name, None) is None:
            del self._texts[name]

    def __contains__(self, name: object) -> bool:
        return name in self._texts or name in self._later

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._texts, *self._later]))  # one moving meanwhile: once

    def __len__(self) -> int:
        return len(self._texts) + len(self._later)


@dataclass(frozen=True, slots=True)
class Build:
    target: Target
    files: BuildFiles  # relative path -> content
    made_report: Callable[[], dict[str, object]]  # report.json's document, made once asked
    switches: tuple[SwitchTables, ...]
    allocation: Allocation  # to give the next compile (allocation.json)
    lowered: Lowered | None = None  # to give the next compile, for an incremental one

    @property
    def report(self) -> dict[str, object]:
        """What report.json holds: made when first read (a quarantine's switch write does
        not wait for its 1,000 rule lines)."""
        return self.made_report()


def _dumps(doc: object) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _dumps_listing(doc: dict[str, object], key: str) -> str:
    """`doc` with its (long) list `key` written one compact item per line.

    Diffs stay one line per entry, and only the C encoder runs: `indent` would switch json
    to its pure-Python encoder, 20x slower on a floor's hundreds of thousands of entries.
    """
    items = doc[key]
    assert isinstance(items, list)
    head = json.dumps({k: v for k, v in doc.items() if k != key}, indent=2, sort_keys=True)
    lines = ",\n".join(
        "    " + (item if isinstance(item, str) else json.dumps(item, sort_keys=True))
        for item in items
    )
    body = f'  "{key}": [\n{lines}\n  ]' if items else f'  "{key}": []'
    return head[:-2] + ",\n" + body + "\n}\n" if head != "{}" else "{\n" + body + "\n}\n"


@collection_paused()  # hundreds of thousands of entries that live as long as the build
def build(
    policy: Policy,
    inventory: Inventory,
    policy_text: str,
    target_name: str,
    sizes: dict[str, int] | None = None,
    allocation: Allocation | None = None,
    previous: Build | None = None,
    listings: bool = False,
) -> Build:
    """Compile a checked policy for a target: every output file, as text. `allocation`:
    the previous compile's (compiler/allocation.py), so that ids stay what they were;
    `previous`: that compile's build, if at hand, to reuse what did not change (the
    switches whose inputs are the same, and their files) — the result is the same.
    `listings`: each switch's runtime listing too (the p4lang tutorials' format, for their
    tooling; as much text again as the entries files)."""
    target = make_target(target_name, sizes)
    same_target = previous is not None and previous.target == target
    lowered = lower(
        policy, inventory, allocation, previous.lowered if previous and same_target else None
    )
    fitted = fit(lowered.switches, target)
    cpu_ports = {s.cpu_port for s in inventory.switches} or {255}
    files = BuildFiles()
    files.update(_pipeline_files(target, min(cpu_ports)))
    ours = _LINES.setdefault("entries", {})
    runtime = _LINES.setdefault(f"runtime {target.name}", {})
    kept = {sw.switch: sw for sw in previous.switches} if previous and same_target else {}
    _RUNS.hold(4 * len(fitted))
    for sw in fitted:
        name, listing = f"entries/{sw.switch}.json", f"entries/{sw.switch}-runtime.json"
        if kept.get(sw.switch) is sw and previous is not None:  # reused as it was
            files.take(previous.files, name)
        else:  # the entries file is what a controller plans from; the rest is made when read
            files[name] = _entries_file(sw, target, ours)
        if not listings:
            continue
        if kept.get(sw.switch) is sw and previous is not None and listing in previous.files:
            files.take(previous.files, listing)
        else:  # a function of the entries (their file) and the pipeline
            files.later(listing, partial(_runtime_listing, sw, target, runtime),
                        (name, P4INFO_FILE))  # fmt: skip
    report = functools.cache(
        partial(_report, policy, inventory, policy_text, target, fitted, lowered.tag_fields)
    )
    files.later("report.json", lambda: _report_json(policy, report()))
    files.later(ALLOCATION, lowered.allocation.to_json)
    return Build(target, files, report, fitted, lowered.allocation, lowered)


def _pipeline_files(target: Target, cpu_port: int) -> dict[str, str]:
    """The program, its P4Info and the reference device config: a function of the target
    and the CPU port alone, made again only when they change (a policy edit keeps them)."""
    key = (target.name, cpu_port)
    found = _PIPELINE_FILES.get(key)
    if found is None or found[0] != target:
        files = {
            program_file(target.name): render_program(target.program, target.pipeline, cpu_port),
            P4INFO_FILE: p4info_text(target.pipeline, target.program),
        }
        if target.kind.own_device_config:
            files[device_config_file(target.name)] = device_config(target.pipeline)
        found = _PIPELINE_FILES[key] = (target, files)
    return found[1]


# Per (target, CPU port): the target they were made for and its pipeline files.
_PIPELINE_FILES: dict[tuple[str, int], tuple[Target, dict[str, str]]] = {}
also_forget(_PIPELINE_FILES.clear)


_Lines = dict[TableEntry, str]  # an entry -> its line
# Per encoding, the lines of the entries of this build and the ones before, by value: identity
# and routing entries are the same objects on most switches (a dict finds an object by
# identity before it compares), and a long-running controller's next build (a quarantine, a
# one-rule edit) lowers a changed switch again into new but mostly equal entries, whose
# cached hash costs a tenth of encoding one. Emptied past _LINES_MAX entries.
_LINES: dict[str, _Lines] = {}
_LINES_MAX = 400_000
also_forget(_LINES.clear)


def _line(lines: _Lines, entry: TableEntry, encode: Callable[[TableEntry], str]) -> str:
    """An entry's line in one encoding, made once per value (`_LINES`)."""
    text = lines.get(entry)
    if text is None:
        if len(lines) >= _LINES_MAX:
            lines.clear()
        text = lines[entry] = encode(entry)
    return text


# The JSON lines are written directly, keys in sorted order: what
# `json.dumps(doc, sort_keys=True)` makes of the entry's document (TableEntry.to_json,
# _runtime_entry), byte for byte (a test compares them), at under half its cost — the
# dicts are never made, and a floor has tens of thousands of distinct entries.


@functools.cache
def _quoted(name: str) -> str:
    """A name (table, action, field, parameter, role) as a JSON string, made once."""
    return json.dumps(name)


def _params_json(params: tuple[tuple[str, int], ...]) -> str:
    if len(params) == 1:  # most actions take one parameter
        ((name, value),) = params
        return f"{{{_quoted(name)}: {value}}}"
    return "{" + ", ".join(f"{_quoted(k)}: {v}" for k, v in sorted(params)) + "}"


def _meter_json(m: MeterConfig) -> str:
    return f'{{"cburst": {m.cburst}, "cir": {m.cir}, "pburst": {m.pburst}, "pir": {m.pir}}}'


def _sorted_matches(e: TableEntry) -> tuple[FieldMatch, ...] | list[FieldMatch]:
    return sorted(e.matches, key=_field_name) if len(e.matches) > 1 else e.matches


def _field_name(m: FieldMatch) -> str:
    return m.field


def _match_json(m: FieldMatch) -> str:
    if m.kind == "exact":
        return f'{_quoted(m.field)}: {{"exact": {m.value}}}'
    return f"{_quoted(m.field)}: {{{_quoted(m.kind)}: [{m.value}, {m.arg}]}}"


def entry_line(e: TableEntry) -> str:
    """The entry's line in an entries file: `json.dumps(e.to_json(), sort_keys=True)`.

    Made by its shape's encoder (`_SHAPES`): a floor's tens of thousands of entries have a
    few dozen shapes, and filling one template costs two thirds of composing the line field
    by field (`_plain_entry_line`)."""
    shape = (e.table, e.action, e.role, not e.priority, e.rule_id is None, e.meter is None,
             tuple(map(_FIELD_KIND, e.matches)), tuple(map(_PARAM_NAME, e.params)))  # fmt: skip
    encode = _SHAPES.get(shape)
    if encode is None:
        encode = _shape_encoder(e)
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()
        _SHAPES[shape] = encode
    return encode(e)


# An entry's shape: table, action, role, which optional keys it has, its fields and their
# kinds in its order, its parameters' names. Its encoder fills a template with the values.
_SHAPES: dict[tuple[object, ...], Callable[[TableEntry], str]] = {}
_SHAPES_MAX = 4096
_FIELD_KIND = operator.attrgetter("field", "kind")
_PARAM_NAME = operator.itemgetter(0)


def _shape_encoder(e: TableEntry) -> Callable[[TableEntry], str]:
    """`_plain_entry_line` as a template of `e`'s shape (a `%` format of the JSON with a
    placeholder per value) and a getter of the values in their order, generated from
    attribute names and indices alone: no text of the entry is compiled."""
    fields = [m.field for m in e.matches]
    names = [name for name, _ in e.params]
    if len(set(fields)) < len(fields) or len(set(names)) < len(names):
        return _plain_entry_line  # not a table entry P4Runtime could hold; kept exact anyway
    parts: list[str] = []  # the template, `%` escaped
    values: list[str] = []  # the getter's expressions, one per `%s`

    def literal(text: str) -> None:
        parts.append(text.replace("%", "%%"))

    def value(expression: str) -> None:
        parts.append("%s")
        values.append(expression)

    literal(f'{{"action": {_quoted(e.action)}, "match": {{')
    order = sorted(range(len(fields)), key=fields.__getitem__)
    for n, i in enumerate(order):
        m = e.matches[i]
        literal(f"{', ' if n else ''}{_quoted(m.field)}: {{")
        if m.kind == "exact":
            literal('"exact": ')
            value(f"e.matches[{i}].value")
            literal("}")
        else:
            literal(f"{_quoted(m.kind)}: [")
            value(f"e.matches[{i}].value")
            literal(", ")
            value(f"e.matches[{i}].arg")
            literal("]}")
    literal("}")
    if e.meter is not None:
        literal(', "meter": {')
        for n, key in enumerate(("cburst", "cir", "pburst", "pir")):
            literal(f'{", " if n else ""}"{key}": ')
            value(f"e.meter.{key}")
        literal("}")
    literal(', "params": {')
    for n, j in enumerate(sorted(range(len(names)), key=names.__getitem__)):
        literal(f"{', ' if n else ''}{_quoted(names[j])}: ")
        value(f"e.params[{j}][1]")
    literal("}")
    if e.priority:
        literal(', "priority": ')
        value("e.priority")
    if e.role:
        literal(f', "role": {_quoted(e.role)}')
    if e.rule_id is not None:
        literal(', "rule_id": ')
        value("e.rule_id")
    literal(f', "table": {_quoted(e.table)}}}')
    template = "".join(parts)
    getter = eval(f"lambda e: ({''.join(v + ', ' for v in values)})")  # indices, attributes
    return lambda entry: template % getter(entry)


def _plain_entry_line(e: TableEntry) -> str:
    """`entry_line`, composed field by field."""
    text = f'{{"action": {_quoted(e.action)}, "match": {{'
    text += ", ".join(map(_match_json, _sorted_matches(e))) + "}"
    if e.meter is not None:
        text += f', "meter": {_meter_json(e.meter)}'
    text += f', "params": {_params_json(e.params)}'
    if e.priority:
        text += f', "priority": {e.priority}'
    if e.role:
        text += f', "role": {_quoted(e.role)}'
    if e.rule_id is not None:
        text += f', "rule_id": {e.rule_id}'
    return text + f', "table": {_quoted(e.table)}}}'


def entry_text(e: TableEntry) -> str:
    """`entry_line(e)`, made once per entry object and value (the line the entries file
    holds or will hold: a proof record digests it, compiler/verify.py)."""
    return _line(_LINES.setdefault("entries", {}), e, entry_line)


def _entries_file(sw: SwitchTables, target: Target, lines: _Lines) -> str:
    """`_dumps_listing(_entries_json(...), "entries")`, made from the runs the switch's
    entries were lowered as (compiler/lower.py SEGMENTS) when it has them: each run's
    lines are joined once per tuple, and a ToR compiled again for a policy edit keeps its
    identity entries and routes as the same tuples."""
    segments = SEGMENTS.find(sw)
    if segments is None:
        return _dumps_listing(_entries_json(sw, target, lines), "entries")
    doc = _entries_json(sw, target, lines, entries=False)
    return _listing_by_runs(doc, "entries", [], _run_texts(segments, lines, entry_line, "entries"))


def _listing_by_runs(doc: dict[str, object], key: str, first: list[str], runs: list[str]) -> str:
    """`_dumps_listing` of `doc` with its list `key` made of the lines `first` (each a
    line, indented) and the runs' texts (`_run_text`)."""
    head = json.dumps(doc, indent=2, sort_keys=True)[:-2] + ",\n"
    texts = first + runs
    if not texts:
        return head + f'  "{key}": []\n}}\n'
    parts = [head, f'  "{key}": [\n']
    for text in texts:  # one copy of the megabytes of lines, not one per concatenation
        parts += (text, ",\n")
    parts[-1] = "\n  ]\n}\n"
    return "".join(parts)


def _run_texts(
    segments: tuple[tuple[TableEntry, ...], ...],
    lines: _Lines,
    encode: Callable[[TableEntry], str],
    kind: str,
) -> list[str]:
    """Each run's text in a listing of `kind`, made once per run tuple and kind."""
    out = []
    for run in segments:
        if run:
            texts = _RUNS.get(run, _no_texts)
            text = texts.get(kind)
            if text is None:
                text = texts[kind] = _run_text(lines, encode, run)
            out.append(text)
    return out


def _no_texts(_run: tuple[TableEntry, ...]) -> dict[str, str]:
    return {}


def _run_text(
    lines: _Lines, encode: Callable[[TableEntry], str], run: tuple[TableEntry, ...]
) -> str:
    """The run's lines, indented, one per entry: a policy edit makes a ToR's `policy` run
    again from thousands of lines it mostly has (`_line` inlined for those)."""
    get = lines.get
    texts = []
    for e in run:
        text = get(e)
        texts.append(text if text is not None else _line(lines, e, encode))
    return "    " + ",\n    ".join(texts)


# Per run of entries (a tuple of SEGMENTS), per kind of listing (an entries file, a
# target's runtime listing): its lines, joined.
_RUNS: ByObject[tuple[TableEntry, ...], dict[str, str]] = ByObject(32)


def _entries_json(
    sw: SwitchTables, target: Target, lines: _Lines, entries: bool = True
) -> dict[str, object]:
    return {
        "switch": sw.switch,
        "role": sw.role,
        "device_id": sw.device_id,
        "target": target.name,
        "defaults": [
            {"table": d.table, "action": d.action, "params": dict(d.params)} for d in sw.defaults
        ],
        **({"entries": [_line(lines, e, entry_line) for e in sw.entries]}
           if entries else {}),
    }  # fmt: skip


def _runtime_value(field: str, value: int) -> str:
    return f'"{format_ipv4(value)}"' if field in _ADDRESS_FIELDS else str(value)


def _runtime_match(m: FieldMatch) -> str:
    value = _runtime_value(m.field, m.value)
    if m.kind == "exact":
        return f"{_quoted(m.field)}: {value}"
    if m.kind == "lpm":
        return f"{_quoted(m.field)}: [{value}, {m.arg}]"
    return f"{_quoted(m.field)}: [{value}, {_runtime_value(m.field, m.arg)}]"


def _runtime_line(pipe: Pipeline, e: TableEntry) -> str:
    """The entry in the p4lang tutorials' runtime format, as `json.dumps(doc,
    sort_keys=True)` writes its document: the table and action names qualified by the
    target's program; addresses dotted (a range's or mask's too); no rule id or role."""
    text = f'{{"action_name": {_quoted(pipe.qualified(e.action))}'
    text += f', "action_params": {_params_json(e.params)}, "match": {{'
    text += ", ".join(map(_runtime_match, _sorted_matches(e))) + "}"
    if e.meter is not None:  # P4Runtime's MeterConfig field names, as in the entries JSON
        text += f', "meter_config": {_meter_json(e.meter)}'
    if e.priority:
        text += f', "priority": {e.priority}'
    return text + f', "table": {_quoted(pipe.qualified(e.table))}}}'


def _runtime_listing(sw: SwitchTables, target: Target, lines: _Lines) -> str:
    """`_dumps_listing(_runtime_json(...), "table_entries")`, by runs as `_entries_file`."""
    segments = SEGMENTS.find(sw)
    if segments is None:
        return _dumps_listing(_runtime_json(sw, target, lines), "table_entries")
    doc = _runtime_json(sw, target, lines, entries=False)
    defaults = doc.pop("table_entries")
    assert isinstance(defaults, list)
    first = ["    " + json.dumps(d, sort_keys=True) for d in defaults]
    encode = functools.partial(_runtime_line, target.pipeline)
    kind = f"runtime {target.name}"
    return _listing_by_runs(doc, "table_entries", first, _run_texts(segments, lines, encode, kind))


def _runtime_json(
    sw: SwitchTables, target: Target, lines: _Lines, entries: bool = True
) -> dict[str, object]:
    """The runtime listing's document (`entries`: False, its defaults alone)."""
    pipe = target.pipeline
    table_entries: list[object] = [
        {
            "table": pipe.qualified(d.table),
            "default_action": True,
            "action_name": pipe.qualified(d.action),
            "action_params": dict(d.params),
        }
        for d in sw.defaults
    ]
    encode = functools.partial(_runtime_line, pipe)  # names qualified by the target's program
    if entries:
        table_entries += [_line(lines, e, encode) for e in sw.entries]
    return {
        "target": "bmv2" if target.program == "v1model" else target.name,
        "p4info": f"../{P4INFO_FILE}",
        "bmv2_json": f"../{device_config_file(target.name)}",
        "table_entries": table_entries,
    }


def tofino_stages(resources: list[dict[str, object]]) -> dict[str, object]:
    """How many of Tofino's 12 stages the tables take, estimated: each table depends on the
    one before it (every lookup reads what the previous one set), so each starts a stage of
    its own and spans as many as its TCAM (or SRAM) blocks need."""
    per_table = {}
    for row in resources:
        tcam, sram = row.get("tcam_blocks", 0), row.get("sram_blocks", 0)
        assert isinstance(tcam, int) and isinstance(sram, int)
        action = row["action_sram_blocks"]
        assert isinstance(action, int)
        per_table[str(row["table"])] = max(
            1, math.ceil(tcam / STAGE_TCAM_BLOCKS), math.ceil((sram + action) / STAGE_SRAM_BLOCKS)
        )
    total = sum(per_table.values())
    return {
        "per_table": per_table,
        "total": total,
        "available": TOFINO_STAGES,
        "fits": total <= TOFINO_STAGES,
    }


def tofino_resources(
    pipeline: Pipeline, switches: tuple[SwitchTables, ...]
) -> list[dict[str, object]]:
    """Per-table estimate for Tofino: TCAM for ternary/lpm/range keys, SRAM for exact ones,
    for the table sizes of the program (size the `policy` table to what the floor needs:
    its key is 561 bits wide, 13 TCAM blocks per 512 entries)."""
    out = []
    for table in pipeline.tables:
        entries = max((len(sw.table(table.name)) for sw in switches), default=0)
        key_bits = sum(k.bits for k in table.keys)
        tcam = any(k.match != "exact" for k in table.keys)
        action_bits = max(
            (sum(p.bits for p in pipeline.action(a.name).params) for a in table.actions), default=0
        )
        row: dict[str, object] = {
            "table": table.name,
            "key_bits": key_bits,
            "memory": "tcam" if tcam else ("sram" if key_bits else "none (keyless)"),
            "max_entries_per_switch": entries,
            "size": table.size,
            "action_data_bits": action_bits,
        }
        if tcam:
            row["tcam_blocks"] = math.ceil(key_bits / TCAM_WIDTH) * max(
                1, math.ceil(table.size / TCAM_DEPTH)
            )
        elif key_bits:
            row["sram_blocks"] = math.ceil((key_bits + action_bits) / SRAM_WIDTH) * max(
                1, math.ceil(table.size / SRAM_DEPTH)
            )
        row["action_sram_blocks"] = (
            math.ceil(action_bits / SRAM_WIDTH) * max(1, math.ceil(table.size / SRAM_DEPTH))
            if action_bits
            else 0
        )
        out.append(row)
    return out


def _table_use(count: int, table: Table) -> dict[str, object]:
    return {"entries": count, "size": table.size, "utilisation": round(count / table.size, 4)}


def _switch_report(target: Target, sw: SwitchTables) -> tuple[dict[str, object], int]:
    """A switch's line of the report, and its number of `policy` entries."""
    tables = Counter(e.table for e in sw.entries)  # one pass each, not one per table
    line = {
        "name": sw.switch,
        "role": sw.role,
        "device_id": sw.device_id,
        "tables": {t.name: _table_use(tables[t.name], t) for t in target.pipeline.tables if t.keys},
        "entries_by_role": dict(sorted(Counter(e.role for e in sw.entries).items())),
    }
    return line, tables["policy"]


# A switch's line of the report, per target, kept while its SwitchTables object lives on
# in the builds an incremental compile makes (compiler/memo.py).
_SWITCH_REPORTS: defaultdict[str, ByObject[SwitchTables, tuple[dict[str, object], int]]] = (
    defaultdict(lambda: ByObject(16))
)
# Each file's SHA-256 by its text object: the files of reused switches are the same strings.
_DIGESTS: ByObject[str, str] = ByObject(32)


def file_digest(text: str) -> str:
    """A build file's SHA-256 (hex), remembered per text object."""
    return _DIGESTS.get(text, lambda t: hashlib.sha256(t.encode()).hexdigest())


def hold_file_digests(count: int) -> None:
    """Room to remember `count` files' digests at once (a build's switches' entries)."""
    _DIGESTS.hold(count)


def _rule_line(r: PolicyRule) -> tuple[dict[str, object], str]:
    line: dict[str, object] = {
        "id": r.id,
        "key": r.key,
        **({"name": r.name} if r.name else {}),
        "text": r.describe(),
        "file": r.span.file,
        "line": r.span.line,
        "column": r.span.column,
    }
    return line, json.dumps(line, sort_keys=True)


# Per rule object: its line in report.json, and that line's JSON. A quarantine, a grant or
# an edit keeps most rule objects as they were: 1,000 rules described and dumped for a
# change of one cost ~15 ms an operation.
_RULE_LINES: ByObject[PolicyRule, tuple[dict[str, object], str]] = ByObject(64)


def _report_rules(policy: Policy) -> list[tuple[dict[str, object], str]]:
    _RULE_LINES.hold(len(policy.rules))
    return [_RULE_LINES.get(r, _rule_line) for r in policy.rules]


def _report_json(policy: Policy, report: dict[str, object]) -> str:
    """report.json: `report` with its rule lines dumped once per rule object."""
    rules = report["rules"]
    assert isinstance(rules, list)
    lines = [json.dumps(rules[0], sort_keys=True)] + [j for _line, j in _report_rules(policy)]
    return _dumps_listing({**report, "rules": lines}, "rules")


def _report(
    policy: Policy,
    inventory: Inventory,
    policy_text: str,
    target: Target,
    switches: tuple[SwitchTables, ...],
    tag_fields: int,
) -> dict[str, object]:
    memo = _SWITCH_REPORTS[target.name]
    memo.hold(len(switches))
    lines = [memo.get(sw, partial(_switch_report, target)) for sw in switches]
    policy_entries = sum(n for (_, n), sw in zip(lines, switches, strict=True) if sw.role == "tor")
    report: dict[str, object] = {
        "policy": policy.name,
        "policy_sha256": hashlib.sha256(policy_text.encode()).hexdigest(),
        "inventory": inventory.name,
        "target": target.name,
        "program": target.program,
        "tag_fields": tag_fields,
        "rules": [
            {
                "id": 0,
                "text": "default deny" + (" log" if policy.default_log else ""),
                "line": policy.default_span.line if policy.default_span else None,
            }
        ]
        + [line for line, _json in _report_rules(policy)],
        "switches": [line for line, _ in lines],
        "policy_entries": policy_entries,
    }
    if target.kind.resource_estimate:
        resources = tofino_resources(target.pipeline, switches)
        report["tofino_resources"] = resources
        report["tofino_stages"] = tofino_stages(resources)
    return report


def summary(build_: Build) -> str:
    """The human summary `p4seg compile` prints."""
    r = build_.report
    lines = [
        f"target {build_.target.name} ({build_.target.description}), {r['tag_fields']} tag fields"
    ]
    switches = r["switches"]
    assert isinstance(switches, list)
    tables = [t for t in build_.target.pipeline.tables if t.keys]
    head = f"  {'switch':<10}" + "".join(f"{t.name:>22}" for t in tables)
    lines.append(head)
    for sw in switches:
        cells = "".join(
            f"{sw['tables'][t.name]['entries']:>9}/{t.size:<6} {100 * sw['tables'][t.name]['utilisation']:>4.1f}%"
            for t in tables
        )
        lines.append(f"  {sw['name']:<10}{cells}")
    lines.append(f"policy entries on ToRs: {r['policy_entries']}")
    resources = r.get("tofino_resources", [])
    assert isinstance(resources, list)
    for row in resources:
        assert isinstance(row, dict)
        blocks = row.get("tcam_blocks", row.get("sram_blocks", 0))
        lines.append(
            f"  tofino {row['table']:<13} {row['memory']:<15} key {row['key_bits']:>3} bits, "
            f"{blocks} {'TCAM' if 'tcam_blocks' in row else 'SRAM'} blocks, action data {row['action_sram_blocks']} SRAM blocks"
        )
    stages = r.get("tofino_stages")
    if isinstance(stages, dict):
        verdict = "fits" if stages["fits"] else "does NOT fit (size the tables with --size)"
        lines.append(
            f"  tofino stages (estimate): {stages['total']} of {stages['available']}: {verdict}"
        )
    return "\n".join(lines)


MANIFEST = "p4seg-build.json"  # in every build: the files p4seg wrote there, and only those
ALLOCATION = "allocation.json"  # in every build: the allocation the compile ended with


class OutputDirError(Exception):
    """The output directory cannot take the build without touching what p4seg did not write."""


def _relative(rel: object) -> str:
    """`rel` if it is a plain relative path inside a build directory; ValueError if not."""
    if not isinstance(rel, str):
        raise ValueError(f"not a path: {rel!r}")
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or str(path) != rel or rel in ("", ".", MANIFEST):
        raise ValueError(f"not a file of a build: {rel!r}")
    return rel


def _manifest(files: set[str], digests: dict[str, str] | None = None) -> str:
    doc: dict[str, object] = {"p4seg_build": 1, "files": sorted(files)}
    if digests:  # each file's SHA-256: the next build rewrites only the files that differ
        doc["sha256"] = {rel: digests[rel] for rel in sorted(files) if rel in digests}
    return _dumps(doc)


def _put_manifest(
    staging: Path, target: Path, files: set[str], digests: dict[str, str] | None = None
) -> None:
    (staging / MANIFEST).write_text(_manifest(files, digests), encoding="utf-8")
    os.replace(staging / MANIFEST, target / MANIFEST)


# Files this process found holding a digest, with the (inode, size, mtime) it saw: a
# long-running controller writes the same build directory on every operation, and reading
# and hashing its unchanged files (every switch's entries) cost more than the change.
_CHECKED: dict[Path, tuple[str, tuple[int, int, int]]] = {}
also_forget(_CHECKED.clear)


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _holds(path: Path, digest: str, recorded: str | None) -> bool:
    """Whether `path` holds the content of `digest` — as the manifest says and as the file
    still is (a file edited by hand is rewritten; one unchanged since this process hashed
    it, the same inode, size and modification time, is not hashed again)."""
    if recorded != digest:
        return False
    try:
        stamp = _stamp(path)
        if _CHECKED.get(path) == (digest, stamp):
            return True
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return False
    except OSError:
        return False
    _CHECKED[path] = (digest, stamp)
    return True


def _digests_before(target: Path) -> dict[str, str]:
    """The SHA-256 of each file the build in `target` wrote, as its manifest records them
    ({} for an older manifest without them: then every file is rewritten)."""
    try:
        doc = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
        digests = doc.get("sha256", {})
        return {str(k): str(v) for k, v in digests.items()} if isinstance(digests, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _remove(target: Path, rel: str) -> None:
    """Remove a file of an earlier build, and the directories that leaves empty."""
    (target / rel).unlink(missing_ok=True)
    for parent in (target / rel).parents:
        try:
            if parent == target or any(parent.iterdir()):
                return
            parent.rmdir()
        except OSError:
            return


def _written_before(target: Path) -> set[str] | None:
    """What p4seg wrote into an existing directory, from its manifest; None when the
    directory has none (OutputDirError when it has one that is not p4seg's)."""
    path = target / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("p4seg_build") != 1 or not isinstance(doc.get("files"), list):
            raise ValueError("not a p4seg build manifest")
        return {_relative(rel) for rel in doc["files"]}
    except (OSError, ValueError, AttributeError) as err:
        raise OutputDirError(
            f"{path}: unreadable build manifest ({err}); nothing written"
        ) from None


def previous_allocation(out_dir: str) -> Allocation:
    """The allocation of the p4seg build in `out_dir`: empty when `out_dir` holds no build
    or a build without one; AllocationError or OutputDirError when it cannot be read."""
    target = Path(out_dir)
    if not target.is_dir():
        return Allocation()
    written = _written_before(target.resolve())
    if written is None or ALLOCATION not in written:
        return Allocation()
    path = target / ALLOCATION
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AllocationError(f"{path}: cannot read ({err})") from None
    return Allocation.from_json(text, str(path))


def _check_path(target: Path, rel: str, ours: set[str]) -> None:
    """Refuse to write or remove `rel` unless every directory on its way is a real directory
    inside `target` and whatever is there now is a file p4seg wrote."""
    here = target
    for part in PurePosixPath(rel).parts[:-1]:
        here = here / part
        if here.is_symlink() or (os.path.lexists(here) and not here.is_dir()):
            raise OutputDirError(f"{here} is not a directory p4seg made; nothing written")
    path = target / rel
    if os.path.lexists(path) and (rel not in ours or path.is_symlink() or not path.is_file()):
        raise OutputDirError(f"{path} exists and p4seg did not write it; nothing written")


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new, empty directory under `parent` with the mode the umask gives (mkdtemp's is
    0700, and a build directory is renamed into place with the mode it was made with)."""
    while True:
        path = parent / f"{prefix}{os.urandom(6).hex()}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path


def _write_files(root: Path, files: Mapping[str, str]) -> None:
    for rel, content in sorted(files.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


def write_build(build_: Build, out_dir: str) -> list[str]:
    """Write all files of a build into `out_dir`, with a manifest of them (MANIFEST).

    A new directory appears complete or not at all. An empty directory, or one holding a
    p4seg build, is updated in place: each file is replaced atomically, the files of the
    previous build that this one lacks are removed, and nothing else in it is touched.
    Any other directory is refused (OutputDirError) and left as it was. Directories and
    files get the modes the umask gives; an existing directory keeps its own.
    """
    target = Path(out_dir).resolve()
    rels = [_relative(rel) for rel in build_.files]
    _DIGESTS.hold(len(build_.files))
    if not os.path.lexists(target):
        digests = {_relative(rel): file_digest(text) for rel, text in build_.files.items()}
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = _fresh_dir(target.parent, f".{target.name}.")
        try:
            _write_files(staging, build_.files)
            (staging / MANIFEST).write_text(_manifest(set(rels), digests), encoding="utf-8")
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return sorted(str(target / rel) for rel in rels)
    if not target.is_dir():
        raise OutputDirError(f"{target} exists and is not a directory; nothing written")
    before = _written_before(target)
    if before is None:
        if any(target.iterdir()):
            raise OutputDirError(
                f"{target} is not empty and is not a p4seg build (it has no {MANIFEST}); "
                "p4seg writes into a new or empty directory or one of its own builds; "
                "nothing written"
            )
        before = set()
    gone = sorted(before - set(rels))
    for rel in [*rels, *gone]:
        _check_path(target, rel, before)
    # A file the previous build wrote with the same content stays as it is (a quarantine
    # changes one ToR's entries: the program, its P4Info and the other switches' files stay).
    known = _digests_before(target)
    digests = {}
    changed = {}
    for rel in build_.files:
        path, recorded = target / _relative(rel), known.get(_relative(rel))
        if _as_written(build_.files, rel, target, known):  # not even made: as it is there
            assert recorded is not None
            digests[_relative(rel)] = recorded
            continue
        text = build_.files[rel]
        digests[_relative(rel)] = file_digest(text)
        if not _holds(path, digests[_relative(rel)], recorded):
            changed[rel] = text
    staging = _fresh_dir(target, ".p4seg-staging-")
    try:
        _write_files(staging, changed)
        # Old and new files first: whatever happens next, every file p4seg puts here is one
        # it will recognise, and nothing else ever is (and no digest vouches for a file
        # that is being replaced).
        _put_manifest(staging, target, before | set(rels))
        for rel in sorted(_relative(r) for r in changed):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target / rel)
        for rel in gone:
            _remove(target, rel)
        _put_manifest(staging, target, set(rels), digests)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(str(target / rel) for rel in rels)


def _as_written(files: BuildFiles, rel: str, target: Path, known: Mapping[str, str]) -> bool:
    """Whether the file `rel` that the build has not made yet holds there what it would
    make: its sources are the texts the earlier build wrote (so it would make the same
    text), and it is still as that build wrote it (a new process writing into a build
    directory need not make every switch's runtime listing to find it unchanged)."""
    sources = files.unmade(rel)
    recorded = known.get(_relative(rel))
    if not sources or recorded is None:
        return False
    for source in sources:
        if source not in files or known.get(_relative(source)) != file_digest(files[source]):
            return False
    return _holds(target / _relative(rel), recorded, recorded)


_KEY_ORDER = {t.name: {k.name: k.id for k in t.keys} for t in build_pipeline().tables}


def _in_key_order(table: str, matches: list[FieldMatch]) -> tuple[FieldMatch, ...]:
    order = _KEY_ORDER[table]
    return tuple(sorted(matches, key=lambda m: order[m.field]))


def _field_match(name: str, doc: dict[str, object]) -> FieldMatch:
    ((kind, value),) = doc.items()
    if kind == "exact":
        assert isinstance(value, int)
        return FieldMatch(name, "exact", value)
    assert isinstance(value, list) and len(value) == 2
    return FieldMatch(name, kind, int(value[0]), int(value[1]))


def _entry_of(e: dict[str, object]) -> TableEntry:
    match, params, meter = e["match"], e["params"], e.get("meter")
    assert isinstance(match, dict) and isinstance(params, dict)
    table = str(e["table"])
    return TableEntry(
        table,
        _in_key_order(table, [_field_match(k, v) for k, v in match.items()]),
        str(e["action"]),
        tuple(params.items()),
        int(cast(int, e.get("priority", 0))),
        cast("int | None", e.get("rule_id")),
        str(e.get("role", "")),
        MeterConfig(**meter) if isinstance(meter, dict) else None,
    )


def _tables_of(doc: dict[str, object], entries: tuple[TableEntry, ...]) -> SwitchTables:
    defaults = doc["defaults"]
    assert isinstance(defaults, list)
    return SwitchTables(
        str(doc["switch"]),
        str(doc["role"]),
        int(cast(int, doc["device_id"])),
        entries,
        tuple(DefaultAction(d["table"], d["action"], tuple(d["params"].items())) for d in defaults),
    )


def load_entries(text: str) -> SwitchTables:
    """A switch's entries back from `DIR/entries/<switch>.json` (what `verify` reads);
    ValueError if the document is not in that format. The entries are those the build
    wrote, equal value for value (the compiler makes matches in key order)."""
    try:
        doc = json.loads(text)
        return _tables_of(doc, tuple(_entry_of(e) for e in doc["entries"]))
    except (ValueError, KeyError, TypeError, AssertionError, AttributeError) as err:
        raise ValueError(f"not a p4seg entries file ({err.__class__.__name__}: {err})") from None


_ENTRIES_OPEN = '\n  "entries": [\n'
_ENTRIES_CLOSE = "\n  ]\n}\n"


def _entry_lines(text: str) -> tuple[str, list[str]] | None:
    """An entries file (as write_build writes it: one entry a line) as the document without
    its entries and each entry's JSON; None if it is not laid out so."""
    start = text.find(_ENTRIES_OPEN)
    if start < 0 or not text.endswith(_ENTRIES_CLOSE):
        return None
    body = text[start + len(_ENTRIES_OPEN) : -len(_ENTRIES_CLOSE)]
    rest = text[:start] + '\n  "entries": []\n}\n'
    return rest, [line.strip().removesuffix(",") for line in body.split("\n")]


def load_entries_near(text: str, near: SwitchTables, near_text: str) -> SwitchTables:
    """`load_entries(text)`, taking `near`'s entry objects (`near_text` is its entries
    file) for the lines both files have: two builds of one switch differ in a few lines,
    and only those are parsed."""
    mine, theirs = _entry_lines(text), _entry_lines(near_text)
    if mine is None or theirs is None or len(theirs[1]) != len(near.entries):
        return load_entries(text)
    known = dict(zip(theirs[1], near.entries, strict=True))
    try:
        doc = json.loads(mine[0])
        entries = tuple(
            found if (found := known.get(line)) is not None else _entry_of(json.loads(line))
            for line in mine[1]
        )
        return _tables_of(doc, entries)
    except (ValueError, KeyError, TypeError, AssertionError, AttributeError) as err:
        raise ValueError(f"not a p4seg entries file ({err.__class__.__name__}: {err})") from None
