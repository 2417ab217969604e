"""The reference switch's device: its pipeline and everything a P4Runtime client can write.

One `Device` per switch. It validates every update the way the P4Runtime specification
asks (ids, match kinds, bit widths, priorities, action scopes, existence, capacity), keeps
what it accepts in canonical form so that a Read returns exactly what was written, and
hands the data plane an immutable `Snapshot` of the tables to execute.

The pipeline is the spec in p4src/spec.py; the device config (p4src/refconfig.py) names it
and its table sizes, and the P4Info must describe exactly that pipeline.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from finsy.proto import p4r, rpc_code

from compiler.entries import DefaultAction, FieldMatch, SwitchTables, TableEntry
from compiler.evaluate import IndexedSwitch
from p4src.p4info import build_p4info
from p4src.refconfig import pipeline_of
from p4src.spec import Action, Key, Pipeline, Table
from runtime.codec import EncodingError, decode
from runtime.entities import action_proto, match_proto

OK = rpc_code.OK
INVALID_ARGUMENT = rpc_code.INVALID_ARGUMENT
NOT_FOUND = rpc_code.NOT_FOUND
ALREADY_EXISTS = rpc_code.ALREADY_EXISTS
PERMISSION_DENIED = rpc_code.PERMISSION_DENIED
RESOURCE_EXHAUSTED = rpc_code.RESOURCE_EXHAUSTED
FAILED_PRECONDITION = rpc_code.FAILED_PRECONDITION
OUT_OF_RANGE = rpc_code.OUT_OF_RANGE
UNIMPLEMENTED = rpc_code.UNIMPLEMENTED

INSERT, MODIFY, DELETE = p4r.Update.INSERT, p4r.Update.MODIFY, p4r.Update.DELETE
MAX_CLONE_SESSION = 1 << 15
MAX_METADATA = 1024  # bytes of a table entry's opaque metadata, by default
GREEN, YELLOW, RED = 0, 1, 2


class P4RuntimeError(Exception):
    """A failed request or update, with its google.rpc code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _fail(code: int, message: str) -> P4RuntimeError:
    return P4RuntimeError(code, message)


@dataclass(slots=True)
class Meter:
    """A two-rate three-colour marker (RFC 2698, colour-blind), in packets."""

    cir: int
    cburst: int
    pir: int
    pburst: int
    tokens_c: float = 0.0
    tokens_p: float = 0.0
    last: float | None = None  # the data plane's clock at the first packet: buckets start full
    colours: list[int] = field(default_factory=lambda: [0, 0, 0])  # packets: green, yellow, red

    def __post_init__(self) -> None:
        self.tokens_c, self.tokens_p = float(self.cburst), float(self.pburst)

    def color(self, now: float) -> int:
        # A clock that never goes back (the data plane's) needs no clamp here.
        elapsed, self.last = (0.0 if self.last is None else now - self.last), now
        self.tokens_p = min(float(self.pburst), self.tokens_p + elapsed * self.pir)
        self.tokens_c = min(float(self.cburst), self.tokens_c + elapsed * self.cir)
        if self.tokens_p < 1:
            colour = RED
        elif self.tokens_c < 1:
            self.tokens_p -= 1
            colour = YELLOW
        else:
            self.tokens_p -= 1
            self.tokens_c -= 1
            colour = GREEN
        self.colours[colour] += 1
        return colour

    def counter_data(self) -> p4r.MeterCounterData:
        """Packets per colour since the config was written (P4Runtime MeterCounterData)."""
        green, yellow, red = (p4r.CounterData(packet_count=n) for n in self.colours)
        return p4r.MeterCounterData(green=green, yellow=yellow, red=red)

    def config(self) -> p4r.MeterConfig:
        return p4r.MeterConfig(cir=self.cir, cburst=self.cburst, pir=self.pir, pburst=self.pburst)


def _meter_of(config: p4r.MeterConfig) -> Meter | None:
    """None for the all-zero config, which resets a meter to unconfigured (all green)."""
    if config.eburst:
        raise _fail(INVALID_ARGUMENT, "eburst is for single-rate meters; this meter is trTCM")
    if not (config.cir or config.cburst or config.pir or config.pburst):
        return None
    if config.cir < 0 or config.pir < 0 or config.cburst < 0 or config.pburst < 0:
        raise _fail(INVALID_ARGUMENT, "meter rates and bursts cannot be negative")
    if config.pir < config.cir:
        raise _fail(INVALID_ARGUMENT, f"pir {config.pir} is below cir {config.cir}")
    return Meter(config.cir, config.cburst, config.pir, config.pburst)


@dataclass(slots=True, eq=False)
class Stored:
    """One table entry as the device holds it, with its direct counter and meter."""

    entry: TableEntry  # what the evaluator executes
    proto: p4r.TableEntry  # the canonical entry, as a Read returns it
    packets: int = 0
    bytes: int = 0
    meter: Meter | None = None

    def counter_data(self) -> p4r.CounterData:
        return p4r.CounterData(packet_count=self.packets, byte_count=self.bytes)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the data plane executes: immutable, replaced (never changed) on every write."""

    version: int
    switch: IndexedSwitch
    # entries with direct resources (policy) by id(entry): `switch` holds those very entries
    stored: dict[int, Stored]
    clone_ports: dict[int, tuple[int, ...]]  # clone session -> egress ports


class Schema:
    """A pipeline's P4Runtime ids, answered once."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.tables = {t.id: t for t in pipeline.tables}
        self.actions = {a.id: a for a in pipeline.actions}
        self.keys = {t.id: {k.id: k for k in t.keys} for t in pipeline.tables}
        self.action_refs = {
            t.id: {pipeline.action(r.name).id: r.scope for r in t.actions} for t in pipeline.tables
        }
        self.counters = {t.counter.id: t for t in pipeline.tables if t.counter}
        self.meters = {t.meter.id: t for t in pipeline.tables if t.meter}
        self.p4info = build_p4info(pipeline)

    def table(self, table_id: int) -> Table:
        table = self.tables.get(table_id)
        if table is None:
            raise _fail(INVALID_ARGUMENT, f"no table with id {table_id:#x} in the P4Info")
        return table

    def initial_default(self, table: Table) -> tuple[str, tuple[tuple[str, int], ...]]:
        action = self.pipeline.action(table.default_action)
        return action.name, tuple(
            (p.name, v) for p, v in zip(action.params, table.default_args, strict=True)
        )


MatchKey = tuple[tuple[tuple[int, int, int], ...], int]  # ((field id, value, arg)...), priority


def _parse_match(table: Table, schema: Schema, te: p4r.TableEntry) -> tuple[FieldMatch, ...]:
    keys = schema.keys[table.id]
    seen: set[int] = set()
    matches: list[FieldMatch] = []
    for fm in te.match:
        key = keys.get(fm.field_id)
        if key is None:
            raise _fail(INVALID_ARGUMENT, f"table {table.name} has no match field {fm.field_id}")
        if fm.field_id in seen:
            raise _fail(INVALID_ARGUMENT, f"match field {key.name} given twice")
        seen.add(fm.field_id)
        kind = fm.WhichOneof("field_match_type")
        if kind != key.match:
            raise _fail(
                INVALID_ARGUMENT, f"match field {key.name} is {key.match}, got {kind or 'nothing'}"
            )
        matches.append(_parse_field(key, fm))
    for key in table.keys:
        if key.match == "exact" and key.id not in seen:
            raise _fail(INVALID_ARGUMENT, f"exact match field {key.name} is missing")
    matches.sort(key=lambda m: next(k.id for k in table.keys if k.name == m.field))
    return tuple(matches)


def _value(data: bytes, bits: int, what: str) -> int:
    try:
        return decode(data, bits, what)
    except EncodingError as err:
        raise _fail(OUT_OF_RANGE, str(err)) from None


def _parse_field(key: Key, fm: p4r.FieldMatch) -> FieldMatch:
    bits, name = key.bits, key.name
    full = (1 << bits) - 1
    if key.match == "exact":
        return FieldMatch(name, "exact", _value(fm.exact.value, bits, name))
    if key.match == "lpm":
        plen = fm.lpm.prefix_len
        value = _value(fm.lpm.value, bits, name)
        if not 0 < plen <= bits:
            raise _fail(
                INVALID_ARGUMENT,
                f"{name}: prefix length {plen} outside 1..{bits} (omit a don't-care match)",
            )
        if value & ~(full ^ ((1 << (bits - plen)) - 1)):
            raise _fail(INVALID_ARGUMENT, f"{name}: bits beyond the /{plen} prefix are set")
        return FieldMatch(name, "lpm", value, plen)
    if key.match == "ternary":
        value = _value(fm.ternary.value, bits, name)
        mask = _value(fm.ternary.mask, bits, f"{name} mask")
        if mask == 0:
            raise _fail(INVALID_ARGUMENT, f"{name}: mask 0 is a don't-care match: omit the field")
        if value & ~mask:
            raise _fail(INVALID_ARGUMENT, f"{name}: value has bits outside the mask")
        return FieldMatch(name, "ternary", value, mask)
    low = _value(fm.range.low, bits, f"{name} low")
    high = _value(fm.range.high, bits, f"{name} high")
    if low > high:
        raise _fail(INVALID_ARGUMENT, f"{name}: range low {low} is above high {high}")
    if low == 0 and high == full:
        raise _fail(INVALID_ARGUMENT, f"{name}: the full range is a don't-care match: omit it")
    return FieldMatch(name, "range", low, high)


def _parse_action(
    table: Table, schema: Schema, action: p4r.Action, default: bool
) -> tuple[Action, tuple[tuple[str, int], ...]]:
    spec = schema.actions.get(action.action_id)
    scope = schema.action_refs[table.id].get(action.action_id)
    if spec is None or scope is None:
        raise _fail(
            INVALID_ARGUMENT, f"action id {action.action_id:#x} is not an action of {table.name}"
        )
    if scope == ("TABLE_ONLY" if default else "DEFAULT_ONLY"):
        where = "the default action" if default else "an entry"
        raise _fail(PERMISSION_DENIED, f"{spec.name} cannot be {where} of {table.name} ({scope})")
    given: dict[int, bytes] = {}
    for p in action.params:
        if p.param_id in given:
            raise _fail(INVALID_ARGUMENT, f"{spec.name}: parameter {p.param_id} given twice")
        given[p.param_id] = p.value
    params = []
    for param in spec.params:
        if param.id not in given:
            raise _fail(INVALID_ARGUMENT, f"{spec.name}: parameter {param.name} is missing")
        params.append((param.name, _value(given.pop(param.id), param.bits, param.name)))
    if given:
        raise _fail(INVALID_ARGUMENT, f"{spec.name} has no parameter {min(given)}")
    return spec, tuple(params)


class Device:
    """One P4Runtime device: pipeline, entries, defaults, direct resources, clone sessions."""

    def __init__(
        self, device_id: int, cpu_port: int = 255, max_metadata: int = MAX_METADATA
    ) -> None:
        self.device_id = device_id
        self.cpu_port = cpu_port
        self.max_metadata = max_metadata  # every entry's metadata is kept and read back
        self.lock = threading.RLock()
        self.schema: Schema | None = None
        self.config: p4r.ForwardingPipelineConfig | None = None
        self._saved: tuple[Schema, p4r.ForwardingPipelineConfig] | None = None
        self.tables: dict[int, dict[MatchKey, Stored]] = {}
        self.defaults: dict[int, tuple[str, tuple[tuple[str, int], ...]]] = {}
        # A default entry's opaque `metadata`, kept and read back like an entry's (P4Runtime).
        self.default_metadata: dict[int, bytes] = {}
        self.clone_sessions: dict[int, p4r.CloneSessionEntry] = {}
        self.counters: dict[int, list[int]] = {}  # indexed counters: id -> packets per index
        self.version = 0
        self._snapshot: Snapshot | None = None
        self._previous: IndexedSwitch | None = None  # the last snapshot's: its indexes are reused

    # -- pipeline ------------------------------------------------------------------------

    def verify(self, config: p4r.ForwardingPipelineConfig) -> Schema:
        """The schema of a config this device can run; INVALID_ARGUMENT says why not."""
        if not config.HasField("p4info"):
            raise _fail(INVALID_ARGUMENT, "the config has no P4Info")
        try:
            schema = Schema(pipeline_of(config.p4_device_config))
        except ValueError as err:
            raise _fail(INVALID_ARGUMENT, str(err)) from None
        except RecursionError:
            raise _fail(INVALID_ARGUMENT, "the device config is JSON nested too deeply") from None
        if schema.p4info != config.p4info:
            raise _fail(
                INVALID_ARGUMENT,
                "the P4Info does not describe the pipeline the device config names: load "
                "p4info.txtpb with p4/ref/p4seg.json from the same `p4seg compile --target ref`",
            )
        return schema

    def set_pipeline(self, action: int, config: p4r.ForwardingPipelineConfig | None) -> None:
        A = p4r.SetForwardingPipelineConfigRequest
        with self.lock:
            if action == A.COMMIT:
                if config is not None:
                    raise _fail(
                        INVALID_ARGUMENT, "COMMIT takes no config (it commits the saved one)"
                    )
                if self._saved is None:
                    raise _fail(NOT_FOUND, "COMMIT without a config saved by VERIFY_AND_SAVE")
                schema, saved = self._saved
                self._saved = None
                keep = self.schema is not None and self.schema.p4info == schema.p4info
                self._install(schema, saved, keep_state=keep)
                return
            if action not in (
                A.VERIFY,
                A.VERIFY_AND_SAVE,
                A.VERIFY_AND_COMMIT,
                A.RECONCILE_AND_COMMIT,
            ):
                raise _fail(INVALID_ARGUMENT, f"pipeline config action {action} is not supported")
            if config is None:
                raise _fail(INVALID_ARGUMENT, "no config given")
            schema = self.verify(config)
            if action == A.VERIFY_AND_SAVE:
                self._saved = (schema, config)
            elif action == A.VERIFY_AND_COMMIT:
                self._install(schema, config, keep_state=False)
            elif action == A.RECONCILE_AND_COMMIT:
                self._reconcile(schema, config)

    def _install(
        self, schema: Schema, config: p4r.ForwardingPipelineConfig, keep_state: bool
    ) -> None:
        self.schema, self.config = schema, config
        if not keep_state:
            self.tables = {t.id: {} for t in schema.pipeline.tables}
            self.defaults = {t.id: schema.initial_default(t) for t in schema.pipeline.tables}
            self.default_metadata = {}
            self.clone_sessions = {}
        self.counters = {
            c.id: (self.counters.get(c.id) if keep_state else None) or [0] * c.size
            for c in schema.pipeline.counters
        }
        self._changed()

    def _reconcile(self, schema: Schema, config: p4r.ForwardingPipelineConfig) -> None:
        """Commit a new config keeping every entry, or refuse and change nothing."""
        if self.schema is None:
            self._install(schema, config, keep_state=False)
            return
        old = self.schema.pipeline
        for table in schema.pipeline.tables:
            before = old.table(table.name)
            if [(k.id, k.match, k.bits) for k in before.keys] != [
                (k.id, k.match, k.bits) for k in table.keys
            ]:
                raise _fail(
                    INVALID_ARGUMENT, f"cannot keep the entries: {table.name}'s key changes"
                )
            if len(self.tables.get(table.id, {})) > table.size:
                raise _fail(
                    INVALID_ARGUMENT,
                    f"cannot keep the entries: {table.name} holds "
                    f"{len(self.tables[table.id])} > new size {table.size}",
                )
        self._install(schema, config, keep_state=True)

    def pipeline_config(self, response_type: int) -> p4r.ForwardingPipelineConfig | None:
        R = p4r.GetForwardingPipelineConfigRequest
        with self.lock:
            if self.config is None:
                return None
            out = p4r.ForwardingPipelineConfig()
            if self.config.HasField("cookie"):
                out.cookie.CopyFrom(self.config.cookie)
            if response_type in (R.ALL, R.P4INFO_AND_COOKIE):
                out.p4info.CopyFrom(self.config.p4info)
            if response_type in (R.ALL, R.DEVICE_CONFIG_AND_COOKIE):
                out.p4_device_config = self.config.p4_device_config
            return out

    # -- writes --------------------------------------------------------------------------

    def write(self, updates: Iterable[p4r.Update]) -> list[P4RuntimeError | None]:
        """Apply each update (CONTINUE_ON_ERROR): one error or None per update, in order."""
        results: list[P4RuntimeError | None] = []
        with self.lock:
            if self.schema is None:
                raise _fail(FAILED_PRECONDITION, "no forwarding pipeline is set")
            for update in updates:
                try:
                    self._update(self.schema, update)
                    results.append(None)
                except P4RuntimeError as err:
                    results.append(err)
            self._changed()
        return results

    def _update(self, schema: Schema, update: p4r.Update) -> None:
        if update.type not in (INSERT, MODIFY, DELETE):
            raise _fail(INVALID_ARGUMENT, f"update type {update.type} (INSERT, MODIFY or DELETE)")
        kind = update.entity.WhichOneof("entity")
        if kind == "table_entry":
            self._table_entry(schema, update.type, update.entity.table_entry)
        elif kind == "direct_counter_entry":
            self._direct_counter(schema, update.type, update.entity.direct_counter_entry)
        elif kind == "direct_meter_entry":
            self._direct_meter(schema, update.type, update.entity.direct_meter_entry)
        elif kind == "packet_replication_engine_entry":
            self._pre(update.type, update.entity.packet_replication_engine_entry)
        elif kind is None:
            raise _fail(INVALID_ARGUMENT, "the update has no entity")
        else:
            raise _fail(UNIMPLEMENTED, f"{kind} is not supported by the p4seg reference switch")

    def _find(
        self, schema: Schema, te: p4r.TableEntry
    ) -> tuple[Table, MatchKey, tuple[FieldMatch, ...]]:
        table = schema.table(te.table_id)
        if te.is_const:
            raise _fail(INVALID_ARGUMENT, "is_const must be false in a write")
        if not table.keys:
            raise _fail(INVALID_ARGUMENT, f"{table.name} is keyless: only its default entry exists")
        matches = _parse_match(table, schema, te)
        if table.needs_priority:
            if te.priority <= 0:
                raise _fail(INVALID_ARGUMENT, f"{table.name} entries need a priority > 0")
        elif te.priority:
            raise _fail(
                INVALID_ARGUMENT, f"{table.name} entries take no priority (got {te.priority})"
            )
        key = (tuple(sorted(_key_triple(table, m) for m in matches)), te.priority)
        return table, key, matches

    def _table_entry(self, schema: Schema, kind: int, te: p4r.TableEntry) -> None:
        if kind != DELETE and (te.idle_timeout_ns or te.HasField("time_since_last_hit")):
            raise _fail(INVALID_ARGUMENT, "no table of this pipeline supports idle timeout")
        if kind != DELETE and len(te.metadata) > self.max_metadata:
            raise _fail(
                INVALID_ARGUMENT,
                f"metadata of {len(te.metadata)} bytes (this switch keeps at most "
                f"{self.max_metadata} per entry)",
            )
        if te.is_default_action:
            self._default_entry(schema, kind, te)
            return
        table, key, matches = self._find(schema, te)
        entries = self.tables[table.id]
        stored = entries.get(key)
        if kind == DELETE:
            if stored is None:
                raise _fail(NOT_FOUND, f"no such entry in {table.name}")
            del entries[key]
            return
        if kind == INSERT and stored is not None:
            raise _fail(ALREADY_EXISTS, f"the entry already exists in {table.name}")
        if kind == MODIFY and stored is None:
            raise _fail(NOT_FOUND, f"no such entry in {table.name} to modify")
        if kind == INSERT and len(entries) >= table.size:
            raise _fail(RESOURCE_EXHAUSTED, f"{table.name} is full ({table.size} entries)")
        if te.HasField("action"):
            if te.action.WhichOneof("type") != "action":
                raise _fail(INVALID_ARGUMENT, f"{table.name} takes a direct action")
            action, params = _parse_action(table, schema, te.action.action, default=False)
        elif kind == INSERT:
            raise _fail(INVALID_ARGUMENT, "an INSERT needs an action")
        else:
            assert stored is not None
            action, params = schema.pipeline.action(stored.entry.action), stored.entry.params
        meter = self._direct_config(table, te, stored)
        proto = p4r.TableEntry(table_id=table.id, priority=te.priority)
        # Opaque to the switch, returned by reads; a MODIFY without an action changes nothing.
        kept = te if stored is None or te.HasField("action") else stored.proto
        proto.controller_metadata, proto.metadata = kept.controller_metadata, kept.metadata
        proto.match.extend(match_proto(table, matches))
        proto.action.action.CopyFrom(action_proto(action, params))
        entry = TableEntry(table.name, matches, action.name, params, te.priority)
        if stored is None:
            stored = entries[key] = Stored(entry, proto)
        else:
            stored.entry, stored.proto = entry, proto
        if te.HasField("counter_data"):
            stored.packets, stored.bytes = te.counter_data.packet_count, te.counter_data.byte_count
        if te.HasField("meter_config"):
            stored.meter = meter

    def _direct_config(
        self, table: Table, te: p4r.TableEntry, stored: Stored | None
    ) -> Meter | None:
        if te.HasField("counter_data"):
            if table.counter is None:
                raise _fail(INVALID_ARGUMENT, f"{table.name} has no direct counter")
            _check_counter(te.counter_data)
        if te.HasField("meter_config"):
            if table.meter is None:
                raise _fail(INVALID_ARGUMENT, f"{table.name} has no direct meter")
            return _meter_of(te.meter_config)
        return stored.meter if stored else None

    def _default_entry(self, schema: Schema, kind: int, te: p4r.TableEntry) -> None:
        table = schema.table(te.table_id)
        if te.is_const:
            raise _fail(INVALID_ARGUMENT, "is_const must be false in a write")
        if te.match or te.priority:
            raise _fail(INVALID_ARGUMENT, "a default entry has no match and no priority")
        if kind != MODIFY:
            raise _fail(INVALID_ARGUMENT, "the default entry can only be modified")
        if table.const_default:
            raise _fail(PERMISSION_DENIED, f"{table.name}'s default action is constant")
        if not te.HasField("action"):
            self.defaults[table.id] = schema.initial_default(table)
            self.default_metadata.pop(table.id, None)
            return
        action, params = _parse_action(table, schema, te.action.action, default=True)
        self.defaults[table.id] = (action.name, params)
        self.default_metadata[table.id] = te.metadata

    def _stored_of(self, schema: Schema, te: p4r.TableEntry, resource: str) -> tuple[Table, Stored]:
        table = schema.table(te.table_id)
        if getattr(table, resource) is None:
            raise _fail(INVALID_ARGUMENT, f"{table.name} has no direct {resource}")
        _, key, _ = self._find(schema, te)
        stored = self.tables[table.id].get(key)
        if stored is None:
            raise _fail(NOT_FOUND, f"no such entry in {table.name}")
        return table, stored

    def _direct_counter(self, schema: Schema, kind: int, dce: p4r.DirectCounterEntry) -> None:
        if kind != MODIFY:
            raise _fail(INVALID_ARGUMENT, "direct counters can only be modified")
        _, stored = self._stored_of(schema, dce.table_entry, "counter")
        _check_counter(dce.data)
        stored.packets, stored.bytes = dce.data.packet_count, dce.data.byte_count

    def _direct_meter(self, schema: Schema, kind: int, dme: p4r.DirectMeterEntry) -> None:
        if kind != MODIFY:
            raise _fail(INVALID_ARGUMENT, "direct meters can only be modified")
        _, stored = self._stored_of(schema, dme.table_entry, "meter")
        stored.meter = _meter_of(dme.config)

    def _pre(self, kind: int, pre: p4r.PacketReplicationEngineEntry) -> None:
        if pre.WhichOneof("type") != "clone_session_entry":
            raise _fail(UNIMPLEMENTED, "only clone sessions are supported (no multicast groups)")
        cs = pre.clone_session_entry
        if not 0 < cs.session_id < MAX_CLONE_SESSION:
            raise _fail(
                INVALID_ARGUMENT,
                f"clone session id {cs.session_id} outside 1..{MAX_CLONE_SESSION - 1}",
            )
        exists = cs.session_id in self.clone_sessions
        if kind == DELETE:
            if not exists:
                raise _fail(NOT_FOUND, f"no clone session {cs.session_id}")
            del self.clone_sessions[cs.session_id]
            return
        if kind == INSERT and exists:
            raise _fail(ALREADY_EXISTS, f"clone session {cs.session_id} exists")
        if kind == MODIFY and not exists:
            raise _fail(NOT_FOUND, f"no clone session {cs.session_id} to modify")
        seen = set()
        for replica in cs.replicas:
            port = _replica_port(replica)
            if (port, replica.instance) in seen:
                raise _fail(
                    INVALID_ARGUMENT,
                    f"replica (port {port}, instance {replica.instance}) given twice",
                )
            seen.add((port, replica.instance))
        self.clone_sessions[cs.session_id] = p4r.CloneSessionEntry(
            session_id=cs.session_id,
            replicas=cs.replicas,
            class_of_service=cs.class_of_service,
            packet_length_bytes=cs.packet_length_bytes,
        )

    # -- reads ---------------------------------------------------------------------------

    def read(self, entities: Iterable[p4r.Entity]) -> Iterator[p4r.Entity]:
        """Every entity the request names (wildcards expanded), as canonical messages."""
        with self.lock:
            schema = self.schema
            out: list[p4r.Entity] = []
            for entity in entities:
                kind = entity.WhichOneof("entity")
                if schema is None:
                    raise _fail(FAILED_PRECONDITION, "no forwarding pipeline is set")
                if kind == "table_entry":
                    out.extend(self._read_table(schema, entity.table_entry))
                elif kind == "direct_counter_entry":
                    out.extend(
                        self._read_direct(
                            schema, entity.direct_counter_entry.table_entry, "counter"
                        )
                    )
                elif kind == "direct_meter_entry":
                    out.extend(
                        self._read_direct(schema, entity.direct_meter_entry.table_entry, "meter")
                    )
                elif kind == "packet_replication_engine_entry":
                    out.extend(self._read_pre(entity.packet_replication_engine_entry))
                elif kind == "counter_entry":
                    out.extend(self._read_counter(entity.counter_entry))
                else:
                    raise _fail(
                        UNIMPLEMENTED, f"reading {kind or 'an empty entity'} is not supported"
                    )
        return iter(out)

    def _selected(self, schema: Schema, te: p4r.TableEntry) -> Iterator[tuple[Table, Stored]]:
        tables = [schema.table(te.table_id)] if te.table_id else list(schema.pipeline.tables)
        action_id = te.action.action.action_id  # 0 (unset): any action
        if te.match:
            table, key, _ = self._find(schema, te)
            stored = self.tables[table.id].get(key)
            if stored is not None and action_id in (0, stored.proto.action.action.action_id):
                yield table, stored
            return
        for table in tables:
            for stored in self.tables[table.id].values():
                if te.priority and stored.proto.priority != te.priority:
                    continue
                if action_id and stored.proto.action.action.action_id != action_id:
                    continue
                yield table, stored

    def _read_table(self, schema: Schema, te: p4r.TableEntry) -> Iterator[p4r.Entity]:
        if te.is_default_action:
            table = schema.table(te.table_id)
            name, params = self.defaults[table.id]
            entity = p4r.Entity()
            entity.table_entry.table_id = table.id
            entity.table_entry.is_default_action = True
            entity.table_entry.action.action.CopyFrom(
                action_proto(schema.pipeline.action(name), params)
            )
            entity.table_entry.metadata = self.default_metadata.get(table.id, b"")
            yield entity
            return
        want_counter, want_meter = te.HasField("counter_data"), te.HasField("meter_config")
        want_colours = te.HasField("meter_counter_data")
        for table, stored in self._selected(schema, te):
            entity = p4r.Entity()
            out = entity.table_entry
            out.CopyFrom(stored.proto)
            if want_counter and table.counter is not None:
                out.counter_data.CopyFrom(stored.counter_data())
            if want_meter and table.meter is not None and stored.meter is not None:
                out.meter_config.CopyFrom(stored.meter.config())
            if want_colours and table.meter is not None and stored.meter is not None:
                out.meter_counter_data.CopyFrom(stored.meter.counter_data())
            yield entity

    def _read_direct(
        self, schema: Schema, te: p4r.TableEntry, resource: str
    ) -> Iterator[p4r.Entity]:
        for table, stored in self._selected(schema, te):
            if getattr(table, resource) is None:
                continue
            entity = p4r.Entity()
            if resource == "counter":
                entity.direct_counter_entry.table_entry.CopyFrom(stored.proto)
                entity.direct_counter_entry.data.CopyFrom(stored.counter_data())
            else:
                entity.direct_meter_entry.table_entry.CopyFrom(stored.proto)
                if stored.meter is not None:
                    entity.direct_meter_entry.config.CopyFrom(stored.meter.config())
            yield entity

    def _read_counter(self, ce: p4r.CounterEntry) -> Iterator[p4r.Entity]:
        """An indexed counter's cells: counter id 0 is every counter, no index every cell."""
        if ce.counter_id and ce.counter_id not in self.counters:
            raise _fail(NOT_FOUND, f"no counter with id {ce.counter_id:#x}")
        for cid in sorted(self.counters) if not ce.counter_id else [ce.counter_id]:
            cells = self.counters[cid]
            if ce.HasField("index") and not 0 <= ce.index.index < len(cells):
                raise _fail(OUT_OF_RANGE, f"index {ce.index.index} outside 0..{len(cells) - 1}")
            wanted = [ce.index.index] if ce.HasField("index") else range(len(cells))
            for i in wanted:
                entity = p4r.Entity()
                entity.counter_entry.counter_id = cid
                entity.counter_entry.index.index = i
                entity.counter_entry.data.packet_count = cells[i]
                yield entity

    def _read_pre(self, pre: p4r.PacketReplicationEngineEntry) -> Iterator[p4r.Entity]:
        if pre.WhichOneof("type") != "clone_session_entry":
            raise _fail(UNIMPLEMENTED, "only clone sessions are supported (no multicast groups)")
        wanted = pre.clone_session_entry.session_id
        for sid in sorted(self.clone_sessions):
            if wanted in (0, sid):
                entity = p4r.Entity()
                entity.packet_replication_engine_entry.clone_session_entry.CopyFrom(
                    self.clone_sessions[sid]
                )
                yield entity

    # -- the data plane's view -----------------------------------------------------------

    def _changed(self) -> None:
        self.version += 1
        self._snapshot = None

    def snapshot(self) -> Snapshot | None:
        """The tables as the data plane executes them; None before a pipeline is set."""
        snap = self._snapshot
        if snap is not None:
            return snap
        with self.lock:
            if self.schema is None:
                return None
            if self._snapshot is None:
                self._snapshot = self._build_snapshot(self.schema)
            return self._snapshot

    def _build_snapshot(self, schema: Schema) -> Snapshot:
        entries: list[TableEntry] = []
        stored: dict[int, Stored] = {}
        for table in schema.pipeline.tables:
            for s in self.tables[table.id].values():
                entries.append(s.entry)
                if table.counter is not None or table.meter is not None:
                    stored[id(s.entry)] = s
        defaults = tuple(
            DefaultAction(schema.tables[tid].name, name, params)
            for tid, (name, params) in sorted(self.defaults.items())
        )
        tables = SwitchTables(
            f"device-{self.device_id}", "", self.device_id, tuple(entries), defaults
        )
        clone_ports = {
            sid: tuple(_replica_port(r) for r in cs.replicas)
            for sid, cs in self.clone_sessions.items()
        }
        self._previous = IndexedSwitch.of(tables, self._previous)
        return Snapshot(self.version, self._previous, stored, clone_ports)


def _check_counter(data: p4r.CounterData) -> None:
    if data.packet_count < 0 or data.byte_count < 0:
        raise _fail(
            INVALID_ARGUMENT,
            f"counters cannot be negative (packets {data.packet_count}, bytes {data.byte_count})",
        )


def _key_triple(table: Table, m: FieldMatch) -> tuple[int, int, int]:
    return (next(k.id for k in table.keys if k.name == m.field), m.value, m.arg)


def _replica_port(replica: p4r.Replica) -> int:
    if replica.WhichOneof("port_kind") == "port":
        try:
            return decode(replica.port, 32, "replica port")
        except EncodingError as err:
            raise _fail(OUT_OF_RANGE, str(err)) from None
    return replica.egress_port
