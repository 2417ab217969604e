"""A mutation fuzzer for the reference switch's P4Runtime server, after SwitchV's p4-fuzzer.

Each seed starts a switch on loopback, becomes its primary and sets a pipeline (full size
or tiny tables; policy ranges as `range` or as `ternary`). Then batches of updates: valid
ones built from the trading floor's compiled entries and from random entries of every
table, sent with leading zero bytes and shuffled fields now and then (still valid, and read
back canonical), and mutations of them that the P4Runtime specification rejects with a
known status. A pure-Python model holds what the switch must hold; after every batch a
wildcard Read, the default entries and one filtered Read must equal it exactly.

The spec lets a server run a batch's updates in any order ("Batching and Ordering of
Updates"), so no two updates of a batch touch the same entry, and every INSERT of a batch
has room in its table whatever the order, unless the table is full and nothing of the
batch deletes from it. Where the spec gives no precedence between two errors (an invalid
entry into a full table), the fuzzer never sends both in one update.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import grpc
import pytest
from finsy.proto import p4r, p4r_grpc, rpc_code, rpc_status
from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message
from p4rt import WAIT, Session, pipeline_config, u128, update, wait_for

from compiler.emit import build
from compiler.entries import TableEntry as CompiledEntry
from compiler.inventory import Inventory
from compiler.model import Policy
from p4src.spec import Action, Pipeline, Table, build_pipeline
from runtime.refswitch import server
from runtime.refswitch.switch import ReferenceSwitch

DEVICE = 1
PRIMARY = (1 << 128) - 1  # nobody can outbid it: no garbage ever takes the switch over
SEEDS = range(20)
BATCHES = 12  # per seed; about 20 updates each
MAX_BATCH = 40  # the server's limit, lowered so that an oversize batch is cheap
TINY = {"src_identity": 6, "dst_identity": 8, "policy": 10, "routing": 4}
BIG_TRAILERS = [("grpc.max_metadata_size", 1 << 20), ("grpc.absolute_max_metadata_size", 1 << 20)]

INSERT, MODIFY, DELETE = p4r.Update.INSERT, p4r.Update.MODIFY, p4r.Update.DELETE
OK = rpc_code.OK
INVALID_ARGUMENT = rpc_code.INVALID_ARGUMENT
OUT_OF_RANGE = rpc_code.OUT_OF_RANGE
NOT_FOUND = rpc_code.NOT_FOUND
ALREADY_EXISTS = rpc_code.ALREADY_EXISTS
PERMISSION_DENIED = rpc_code.PERMISSION_DENIED
RESOURCE_EXHAUSTED = rpc_code.RESOURCE_EXHAUSTED

Match = tuple[int, int, int]  # key id, value, arg (prefix length, mask or range high)
EntryKey = tuple[int, tuple[Match, ...], int]  # table id, matches by key id, priority


# -- entries and their wire form ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A valid table entry, by value: what the model holds."""

    table: Table
    matches: tuple[Match, ...]  # sorted by key id; a key left out is a don't-care
    priority: int
    action: Action
    args: tuple[int, ...]  # one per action parameter, in order
    cookie: int = 0  # controller_metadata
    metadata: bytes = b""

    @property
    def key(self) -> EntryKey:
        return (self.table.id, self.matches, self.priority)


def _bytes(value: int, pad: int = 0) -> bytes:
    """`value` big-endian in the fewest bytes (at least one), after `pad` zero bytes."""
    return bytes(pad) + value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _padding(rng: random.Random | None) -> int:
    return rng.choice((0, 0, 0, 1, 2, 7)) if rng else 0


def action_msg(action: Action, args: tuple[int, ...], rng: random.Random | None) -> p4r.Action:
    msg = p4r.Action(action_id=action.id)
    params = list(zip(action.params, args, strict=True))
    if rng:
        rng.shuffle(params)
    for param, value in params:
        msg.params.add(param_id=param.id, value=_bytes(value, _padding(rng)))
    return msg


def wire(entry: Entry, rng: random.Random | None = None) -> p4r.TableEntry:
    """The entry as a client may send it: canonical without `rng`; with it, values padded
    with leading zero bytes and repeated fields shuffled, which the spec allows."""
    te = p4r.TableEntry(
        table_id=entry.table.id,
        priority=entry.priority,
        controller_metadata=entry.cookie,
        metadata=entry.metadata,
    )
    keys = {k.id: k for k in entry.table.keys}
    matches = list(entry.matches)
    if rng:
        rng.shuffle(matches)
    for fid, value, arg in matches:
        fm = te.match.add(field_id=fid)
        kind = keys[fid].match
        if kind == "exact":
            fm.exact.value = _bytes(value, _padding(rng))
        elif kind == "lpm":
            fm.lpm.value, fm.lpm.prefix_len = _bytes(value, _padding(rng)), arg
        elif kind == "ternary":
            fm.ternary.mask = _bytes(arg, _padding(rng))
            # The spec's check has the value's string no longer than the mask's.
            room = len(fm.ternary.mask) - len(_bytes(value))
            fm.ternary.value = _bytes(value, rng.randint(0, room) if rng else 0)
        else:
            fm.range.low, fm.range.high = _bytes(value, _padding(rng)), _bytes(arg, _padding(rng))
    te.action.action.CopyFrom(action_msg(entry.action, entry.args, rng))
    return te


def canonical(entry: Entry) -> bytes:
    data: bytes = wire(entry).SerializeToString(deterministic=True)
    return data


def default_msg(
    table: Table, action: Action | None, args: tuple[int, ...], rng: random.Random | None = None
) -> p4r.TableEntry:
    te = p4r.TableEntry(table_id=table.id, is_default_action=True)
    if action is not None:
        te.action.action.CopyFrom(action_msg(action, args, rng))
    return te


def _prefix_mask(bits: int, plen: int) -> int:
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


def random_match(rng: random.Random, kind: str, bits: int) -> tuple[int, int]:
    full = (1 << bits) - 1
    if kind == "exact":
        return rng.randint(0, full), 0
    if kind == "lpm":
        plen = rng.randint(1, bits)
        return rng.randint(0, full) & _prefix_mask(bits, plen), plen
    if kind == "ternary":
        mask = rng.randint(1, full)
        return rng.randint(0, full) & mask, mask
    while True:
        low, high = sorted((rng.randint(0, full), rng.randint(0, full)))
        if (low, high) != (0, full):
            return low, high


def entry_actions(pipeline: Pipeline, table: Table) -> list[Action]:
    return [pipeline.action(r.name) for r in table.actions if r.scope != "DEFAULT_ONLY"]


def random_args(rng: random.Random, action: Action) -> tuple[int, ...]:
    return tuple(rng.randint(0, (1 << p.bits) - 1) for p in action.params)


def random_metadata(rng: random.Random) -> tuple[int, bytes]:
    if rng.random() < 0.7:
        return 0, b""
    return rng.randint(0, (1 << 64) - 1), rng.randbytes(rng.randint(0, 12))


def random_entry(rng: random.Random, pipeline: Pipeline, table: Table) -> Entry:
    matches = tuple(
        (key.id, *random_match(rng, key.match, key.bits))
        for key in table.keys
        if key.match == "exact" or rng.random() < 0.7
    )
    action = rng.choice(entry_actions(pipeline, table))
    cookie, metadata = random_metadata(rng)
    priority = rng.randint(1, 1000) if table.needs_priority else 0
    return Entry(table, matches, priority, action, random_args(rng, action), cookie, metadata)


def from_compiled(pipeline: Pipeline, entry: CompiledEntry) -> Entry:
    table = pipeline.table(entry.table)
    ids = {k.name: k.id for k in table.keys}
    action = pipeline.action(entry.action)
    params = dict(entry.params)
    return Entry(
        table,
        tuple(sorted((ids[m.field], m.value, m.arg) for m in entry.matches)),
        entry.priority,
        action,
        tuple(params[p.name] for p in action.params),
    )


@pytest.fixture(scope="module")
def compiled(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> dict[str, list[CompiledEntry]]:
    """The trading floor's entries of every switch, per policy range kind."""
    out = {}
    for range_kind, target in (("range", "ref"), ("ternary", "tofino")):
        built = build(floor_policy, floor, floor_policy_text, target)
        out[range_kind] = [e for s in built.switches for e in s.entries]
    return out


# -- the model ------------------------------------------------------------------------------


class Model:
    """What the switch must hold: entries by key, and each table's default action."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.entries: dict[EntryKey, Entry] = {}
        self.defaults = {t.id: self.initial_default(t) for t in pipeline.tables}

    def initial_default(self, table: Table) -> tuple[Action, tuple[int, ...]]:
        return self.pipeline.action(table.default_action), table.default_args

    def count(self) -> Counter[int]:
        return Counter(key[0] for key in self.entries)

    def table_state(self) -> list[bytes]:
        return sorted(canonical(e) for e in self.entries.values())

    def default_state(self) -> list[bytes]:
        return [
            default_msg(t, *self.defaults[t.id]).SerializeToString(deterministic=True)
            for t in self.pipeline.tables
        ]


@dataclass(frozen=True, slots=True)
class Case:
    """One update and the status the spec prescribes; its effect if that status is OK."""

    name: str
    update: p4r.Update
    code: int
    put: Entry | None = None
    remove: EntryKey | None = None
    default: tuple[Table, Action, tuple[int, ...]] | None = None

    def apply(self, model: Model) -> None:
        if self.put is not None:
            model.entries[self.put.key] = self.put
        if self.remove is not None:
            del model.entries[self.remove]
        if self.default is not None:
            table, action, args = self.default
            model.defaults[table.id] = (action, args)


# -- mutations --------------------------------------------------------------------------------

# A mutator changes a valid entry's message into one the spec rejects and returns the
# status it prescribes, or None when the mutation does not apply to this entry.
Mutator = Callable[[random.Random, p4r.TableEntry, Table, Pipeline], int | None]


def _byte_slots(
    te: p4r.TableEntry, table: Table, pipeline: Pipeline, match: bool, params: bool
) -> list[tuple[Message, str, int, str]]:
    """(message, field, bit width, kind) of every byte string of the entry."""
    slots: list[tuple[Message, str, int, str]] = []
    keys = {k.id: k for k in table.keys}
    fields = {"exact": ("value",), "lpm": ("value",), "ternary": ("value", "mask")}
    for fm in te.match if match else ():
        kind = fm.WhichOneof("field_match_type")
        for name in fields.get(kind, ("low", "high")):
            slots.append((getattr(fm, kind), name, keys[fm.field_id].bits, f"{kind} {name}"))
    if params and te.HasField("action"):
        spec = next(a for a in pipeline.actions if a.id == te.action.action.action_id)
        bits = {p.id: p.bits for p in spec.params}
        for p in te.action.action.params:
            slots.append((p, "value", bits[p.param_id], "param"))
    return slots


def _too_wide(match: bool, params: bool) -> Mutator:
    """A value with a bit set above the field's width (spec "Bytestrings": OUT_OF_RANGE)."""

    def mutate(
        rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
    ) -> int | None:
        # A ternary value or a range's low bound that is too wide would also break the
        # mask or the bounds: one violation per update, so widen the mask or high instead.
        slots = [
            s
            for s in _byte_slots(te, table, pipeline, match, params)
            if s[3] not in ("ternary value", "range low")
        ]
        if not slots:
            return None
        msg, name, bits, _ = rng.choice(slots)
        value = int.from_bytes(getattr(msg, name), "big")
        extra = rng.randint(1, (1 << rng.choice((1, 3, 16))) - 1)
        setattr(msg, name, _bytes(value | extra << bits, rng.choice((0, 1))))
        return OUT_OF_RANGE

    return mutate


def _empty(match: bool, params: bool) -> Mutator:
    """An empty byte string: always rejected (spec "Bytestrings": OUT_OF_RANGE)."""

    def mutate(
        rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
    ) -> int | None:
        slots = _byte_slots(te, table, pipeline, match, params)
        if not slots:
            return None
        msg, name, _, _ = rng.choice(slots)
        setattr(msg, name, b"")
        return OUT_OF_RANGE

    return mutate


def _field_of(
    te: p4r.TableEntry, table: Table, kind: str, rng: random.Random
) -> p4r.FieldMatch | None:
    fields = [fm for fm in te.match if fm.WhichOneof("field_match_type") == kind]
    return rng.choice(fields) if fields else None


def bad_table_id(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    ids = {t.id for t in pipeline.tables}
    te.table_id = rng.choice(
        [0, table.id + 100, 0x02000000 | rng.randint(6, 0xFFFFFF), rng.randint(1, (1 << 32) - 1)]
    )
    return INVALID_ARGUMENT if te.table_id not in ids else None


def unknown_field(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    fm = te.match.add(field_id=rng.choice((0, len(table.keys) + rng.randint(1, 1000))))
    fm.exact.value = b"\x01"
    return INVALID_ARGUMENT


def duplicate_field(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    if not te.match:
        return None
    te.match.add().CopyFrom(rng.choice(te.match))
    return INVALID_ARGUMENT


def missing_exact(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    exact = [i for i, fm in enumerate(te.match) if fm.WhichOneof("field_match_type") == "exact"]
    if not exact:
        return None
    del te.match[rng.choice(exact)]
    return INVALID_ARGUMENT


def wrong_match_kind(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    if not te.match:
        return None
    fm = rng.choice(te.match)
    kinds = ["exact", "lpm", "ternary", "range", "optional", None]
    kinds.remove(fm.WhichOneof("field_match_type"))
    kind = rng.choice(kinds)
    fm.ClearField(fm.WhichOneof("field_match_type"))
    if kind in ("exact", "optional"):
        getattr(fm, kind).value = b"\x01"
    elif kind == "lpm":
        fm.lpm.value, fm.lpm.prefix_len = b"\x00", 1
    elif kind == "ternary":
        fm.ternary.value, fm.ternary.mask = b"\x00", b"\x01"
    elif kind == "range":
        fm.range.low, fm.range.high = b"\x00", b"\x00"
    return INVALID_ARGUMENT  # kind None: the FieldMatch names no match at all


def lpm_bad_prefix_len(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    fm = _field_of(te, table, "lpm", rng)
    if fm is None:
        return None
    bits = {k.id: k.bits for k in table.keys}[fm.field_id]
    fm.lpm.prefix_len = rng.choice((0, bits + rng.randint(1, 100), -rng.randint(1, 1 << 31)))
    if fm.lpm.prefix_len == 0:
        fm.lpm.value = b"\x00"  # a don't-care spelt out, which must be omitted instead
    return INVALID_ARGUMENT


def lpm_bits_beyond_prefix(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    fm = _field_of(te, table, "lpm", rng)
    bits = {k.id: k.bits for k in table.keys}[fm.field_id] if fm else 0
    if fm is None or fm.lpm.prefix_len >= bits:
        return None
    value = int.from_bytes(fm.lpm.value, "big") | 1 << rng.randrange(bits - fm.lpm.prefix_len)
    fm.lpm.value = _bytes(value)
    return INVALID_ARGUMENT


def ternary_mask_zero(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    fm = _field_of(te, table, "ternary", rng)
    if fm is None:
        return None
    fm.ternary.value, fm.ternary.mask = b"\x00", bytes(rng.randint(1, 3))
    return INVALID_ARGUMENT


def ternary_value_outside_mask(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    fm = _field_of(te, table, "ternary", rng)
    bits = {k.id: k.bits for k in table.keys}[fm.field_id] if fm else 0
    mask = int.from_bytes(fm.ternary.mask, "big") if fm else 0
    outside = [b for b in range(bits) if not mask >> b & 1]
    if fm is None or not outside:
        return None
    fm.ternary.value = _bytes(int.from_bytes(fm.ternary.value, "big") | 1 << rng.choice(outside))
    return INVALID_ARGUMENT


def range_low_above_high(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    fm = _field_of(te, table, "range", rng)
    if fm is None:
        return None
    full = (1 << {k.id: k.bits for k in table.keys}[fm.field_id]) - 1
    low, high = int.from_bytes(fm.range.low, "big"), int.from_bytes(fm.range.high, "big")
    if high < full:
        fm.range.low = _bytes(rng.randint(high + 1, full))
    else:  # low > 0: a valid range is never the full one
        fm.range.high = _bytes(rng.randint(0, low - 1))
    return INVALID_ARGUMENT


def range_full(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    fm = _field_of(te, table, "range", rng)
    if fm is None:
        return None
    bits = {k.id: k.bits for k in table.keys}[fm.field_id]
    fm.range.low, fm.range.high = _bytes(0, rng.choice((0, 1))), _bytes((1 << bits) - 1)
    return INVALID_ARGUMENT


def wrong_priority(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    # Spec "TableEntry": non-zero with a ternary or range key (or several lpm), zero otherwise.
    te.priority = 0 if table.needs_priority else rng.randint(1, (1 << 31) - 1)
    return INVALID_ARGUMENT


def is_const(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    te.is_const = True
    return INVALID_ARGUMENT


KEY_MUTATIONS: dict[str, Mutator] = {
    "bad table id": bad_table_id,
    "unknown match field": unknown_field,
    "duplicate match field": duplicate_field,
    "missing exact field": missing_exact,
    "wrong match kind": wrong_match_kind,
    "match value too wide": _too_wide(match=True, params=False),
    "empty match bytes": _empty(match=True, params=False),
    "lpm prefix length 0 or out of 1..width": lpm_bad_prefix_len,
    "lpm bits beyond the prefix": lpm_bits_beyond_prefix,
    "ternary mask 0": ternary_mask_zero,
    "ternary value outside the mask": ternary_value_outside_mask,
    "range low above high": range_low_above_high,
    "full range": range_full,
    "missing or unexpected priority": wrong_priority,
}


def unknown_action(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    ids = {a.id for a in pipeline.actions}
    te.action.action.action_id = rng.choice((0, 0x01000000 | rng.randint(10, 0xFFFFFF)))
    return INVALID_ARGUMENT if te.action.action.action_id not in ids else None


def foreign_action(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    mine = {r.name for r in table.actions}
    action = rng.choice([a for a in pipeline.actions if a.name not in mine])
    te.action.action.CopyFrom(action_msg(action, random_args(rng, action), rng))
    return INVALID_ARGUMENT


def missing_param(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    params = te.action.action.params
    if not params:
        return None
    del params[rng.randrange(len(params))]
    return INVALID_ARGUMENT


def extra_param(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    params = te.action.action.params
    params.add(param_id=rng.choice((0, len(params) + rng.randint(1, 100))), value=b"\x01")
    return INVALID_ARGUMENT


def duplicate_param(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    params = te.action.action.params
    if not params:
        return None
    params.add().CopyFrom(rng.choice(params))
    return INVALID_ARGUMENT


def no_direct_action(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    # An action profile member on a direct table (spec "Action Specification").
    te.action.action_profile_member_id = rng.randint(0, 1000)
    return INVALID_ARGUMENT


def idle_timeout(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    # No table of the pipeline supports idle timeout (spec "Idle-timeout").
    if rng.random() < 0.5:
        te.idle_timeout_ns = rng.randint(1, 1 << 62)
    else:
        te.time_since_last_hit.elapsed_ns = rng.choice((0, 5))
    return INVALID_ARGUMENT


def missing_direct_resource(
    rng: random.Random, te: p4r.TableEntry, table: Table, pipeline: Pipeline
) -> int | None:
    if table.counter is None and rng.random() < 0.5:
        te.counter_data.packet_count = rng.randint(0, 100)
    elif table.meter is None:
        te.meter_config.cir, te.meter_config.pir = 10, 20
    else:  # spec "MeterEntry": a two-rate (trTCM) meter takes no eburst
        te.meter_config.cir, te.meter_config.pir, te.meter_config.eburst = 10, 20, 5
    return INVALID_ARGUMENT


ACTION_MUTATIONS: dict[str, Mutator] = {
    "unknown action id": unknown_action,
    "action not in the table": foreign_action,
    "missing param": missing_param,
    "extra param": extra_param,
    "duplicate param": duplicate_param,
    "param too wide": _too_wide(match=False, params=True),
    "empty param": _empty(match=False, params=True),
    "action profile member on a direct table": no_direct_action,
    "idle timeout": idle_timeout,
    "bad direct resource": missing_direct_resource,
    "is_const": is_const,
}


# -- one batch --------------------------------------------------------------------------------


class Batch:
    """Plans one batch whose statuses do not depend on the order the switch runs it in."""

    def __init__(self, model: Model, rng: random.Random, pool: dict[str, list[Entry]]) -> None:
        self.model, self.rng, self.pool = model, rng, pool
        self.pipeline = model.pipeline
        self.keyed = [t for t in self.pipeline.tables if t.keys]
        count = model.count()
        self.room = {t.id: t.size - count[t.id] for t in self.keyed}
        self.full = {t.id for t in self.keyed if self.room[t.id] <= 0}
        self.deleting: set[int] = set()  # tables something of this batch deletes from
        self.filling: set[int] = set()  # full tables this batch inserts into
        self.touched: set[object] = set()
        self.cases: list[Case] = []

    # -- entries --------------------------------------------------------------------------

    def fresh(self, table: Table) -> Entry | None:
        """A valid entry whose key neither the switch nor this batch has."""
        for _ in range(20):
            candidates = self.pool.get(table.name, ())
            if candidates and self.rng.random() < 0.5:
                entry = self.rng.choice(candidates)
                if self.rng.random() < 0.3 and table.needs_priority:
                    entry = replace(entry, priority=self.rng.randint(1, 1000))
                cookie, metadata = random_metadata(self.rng)
                entry = replace(entry, cookie=cookie, metadata=metadata)
            else:
                entry = random_entry(self.rng, self.pipeline, table)
            if entry.key not in self.model.entries and entry.key not in self.touched:
                return entry
        return None

    def existing(self, table: Table) -> Entry | None:
        """An entry the switch holds that no other update of this batch touches."""
        keys = [k for k in self.model.entries if k[0] == table.id and k not in self.touched]
        return self.model.entries[self.rng.choice(keys)] if keys else None

    def reserve(self, table: Table) -> bool:
        """Room for one more INSERT into `table`, whichever order the batch runs in."""
        if self.room[table.id] <= 0:
            return False
        self.room[table.id] -= 1
        return True

    def table(self) -> Table:
        return self.rng.choice(self.keyed)

    def add(self, case: Case, key: object = None) -> Case:
        if key is not None:
            self.touched.add(key)
        self.cases.append(case)
        return case

    # -- valid updates --------------------------------------------------------------------

    def insert(self) -> Case | None:
        table = self.table()
        entry = self.fresh(table)
        if entry is None or not self.reserve(table):
            return None
        u = update(INSERT, wire(entry, self.rng))
        return self.add(Case("insert", u, OK, put=entry), entry.key)

    def insert_existing(self) -> Case | None:
        table = self.table()
        old = self.existing(table)
        if old is None or not self.reserve(table):
            return None
        action = self.rng.choice(entry_actions(self.pipeline, table))
        entry = replace(old, action=action, args=random_args(self.rng, action))
        return self.add(
            Case("insert existing", update(INSERT, wire(entry, self.rng)), ALREADY_EXISTS),
            old.key,
        )

    def insert_full(self) -> Case | None:
        table = self.table()
        if table.id not in self.full or table.id in self.deleting:
            return None
        entry = self.fresh(table)
        if entry is None:
            return None
        self.filling.add(table.id)
        u = update(INSERT, wire(entry, self.rng))
        return self.add(Case("insert into a full table", u, RESOURCE_EXHAUSTED), entry.key)

    def modify(self) -> Case | None:
        table = self.table()
        old = self.existing(table)
        if old is None:
            return None
        if self.rng.random() < 0.2:  # no action: the entry stays as it is
            te = wire(old, self.rng)
            te.ClearField("action")
            te.controller_metadata, te.metadata = 0, b""
            return self.add(Case("modify without action", update(MODIFY, te), OK), old.key)
        action = self.rng.choice(entry_actions(self.pipeline, table))
        cookie, metadata = random_metadata(self.rng)
        entry = replace(
            old, action=action, args=random_args(self.rng, action), cookie=cookie, metadata=metadata
        )
        u = update(MODIFY, wire(entry, self.rng))
        return self.add(Case("modify", u, OK, put=entry), old.key)

    def delete(self) -> Case | None:
        table = self.table()
        old = self.existing(table)
        if old is None or table.id in self.filling:
            return None
        self.deleting.add(table.id)
        te = wire(old, self.rng)
        name = "delete"
        if self.rng.random() < 0.3:  # spec: a DELETE ignores everything but the key
            name = "delete with nonsense beyond the key"
            te.action.action.action_id = self.rng.randint(0, (1 << 32) - 1)
            te.action.action.params.add(param_id=99, value=b"")
            te.idle_timeout_ns, te.metadata = 5, b"junk"
            te.counter_data.packet_count = 7
        return self.add(Case(name, update(DELETE, te), OK, remove=old.key), old.key)

    def missing(self) -> Case | None:
        table = self.table()
        entry = self.fresh(table)
        if entry is None:
            return None
        kind = self.rng.choice((MODIFY, DELETE))
        name = "modify missing" if kind == MODIFY else "delete missing"
        return self.add(Case(name, update(kind, wire(entry, self.rng)), NOT_FOUND), entry.key)

    def set_default(self) -> Case | None:
        movable = [t for t in self.pipeline.tables if not t.const_default]
        if not movable:
            return None
        table = self.rng.choice(movable)
        if ("default", table.id) in self.touched:
            return None
        if self.rng.random() < 0.3:  # no action: back to the program's default
            action, args = self.model.initial_default(table)
            te = default_msg(table, None, ())
            name = "reset default"
        else:
            action = self.pipeline.action(
                self.rng.choice([r.name for r in table.actions if r.scope != "TABLE_ONLY"])
            )
            args = random_args(self.rng, action)
            te = default_msg(table, action, args, self.rng)
            name = "set default"
        case = Case(name, update(MODIFY, te), OK, default=(table, action, args))
        return self.add(case, ("default", table.id))

    # -- invalid updates ------------------------------------------------------------------

    def key_mutation(self) -> Case | None:
        """A key the spec rejects, whichever the update type and whether the entry exists."""
        table = self.table()
        name, mutate = self.rng.choice(list(KEY_MUTATIONS.items()))
        base = self.existing(table) if self.rng.random() < 0.5 else None
        base = base or self.fresh(table)
        if base is None:
            return None
        te = wire(base, self.rng)
        code = mutate(self.rng, te, table, self.pipeline)
        if code is None:
            return None
        kind = self.rng.choice((INSERT, MODIFY, DELETE))
        if kind == INSERT and not self.reserve(table):  # a full table: a second error
            kind = self.rng.choice((MODIFY, DELETE))
        return self.add(Case(f"{name} ({p4r.Update.Type.Name(kind)})", update(kind, te), code))

    def action_mutation(self) -> Case | None:
        """A well-formed key with something else wrong: INSERT it fresh, MODIFY it (or, for
        is_const, DELETE it) existing, so that the mutation is the update's only error."""
        table = self.table()
        name, mutate = self.rng.choice(list(ACTION_MUTATIONS.items()))
        if name == "is_const" and self.rng.random() < 0.3:
            base, kind = self.existing(table), DELETE
        elif self.rng.random() < 0.5:
            base, kind = self.existing(table), MODIFY
        else:
            base, kind = self.fresh(table), INSERT
            if name == "missing param" and self.rng.random() < 0.3:
                name = "insert without action"
        if base is None:
            return None
        te = wire(base, self.rng)
        if name == "insert without action":
            te.ClearField("action")
            code: int | None = INVALID_ARGUMENT
        else:
            code = mutate(self.rng, te, table, self.pipeline)
        if code is None or (kind == INSERT and not self.reserve(table)):
            return None
        case = Case(f"{name} ({p4r.Update.Type.Name(kind)})", update(kind, te), code)
        return self.add(case, base.key)

    def default_mutation(self) -> Case | None:
        table = self.rng.choice(self.pipeline.tables)
        ref = self.rng.choice(table.actions)
        action = self.pipeline.action(ref.name)
        te = default_msg(table, action, random_args(self.rng, action), self.rng)
        if table.const_default:  # spec "Default Entry": PERMISSION_DENIED, as for a TABLE_ONLY one
            name = f"modify a const default ({ref.scope})"
            if self.rng.random() < 0.3:
                te.ClearField("action")  # a reset is a modification too
                name = "reset a const default"
            return self.add(Case(name, update(MODIFY, te), PERMISSION_DENIED))
        choice = self.rng.randrange(6)
        kind, name = MODIFY, ""
        code: int = INVALID_ARGUMENT
        if choice == 0:
            kind = self.rng.choice((INSERT, DELETE))
            name = f"{p4r.Update.Type.Name(kind)} a default entry"
        elif choice == 1:
            te.match.add(field_id=1).exact.value = b"\x01"
            name = "default entry with a match"
        elif choice == 2:
            te.priority = self.rng.randint(1, 100)
            name = "default entry with a priority"
        elif choice == 3:
            name = "default entry with an idle timeout"
            te.idle_timeout_ns = self.rng.randint(1, 1 << 40)
        else:
            name, mutate = self.rng.choice(
                [(n, m) for n, m in ACTION_MUTATIONS.items() if n != "bad direct resource"]
            )
            mutated = mutate(self.rng, te, table, self.pipeline)
            if mutated is None:
                return None
            name, code = f"default: {name}", mutated
        return self.add(Case(name, update(kind, te), code))

    def keyless_insert(self) -> Case | None:
        keyless = [t for t in self.pipeline.tables if not t.keys]
        if not keyless:
            return None
        table = self.rng.choice(keyless)
        action = self.rng.choice([self.pipeline.action(r.name) for r in table.actions])
        te = p4r.TableEntry(table_id=table.id)
        te.action.action.CopyFrom(action_msg(action, random_args(self.rng, action), self.rng))
        return self.add(Case("insert into a keyless table", update(INSERT, te), INVALID_ARGUMENT))

    # -- the plan -------------------------------------------------------------------------

    def plan(self, size: int) -> list[Case]:
        kinds: list[tuple[Callable[[], Case | None], int]] = [
            (self.insert, 30),
            (self.insert_existing, 4),
            (self.insert_full, 5),
            (self.modify, 8),
            (self.delete, 8),
            (self.missing, 4),
            (self.set_default, 2),
            (self.key_mutation, 22),
            (self.action_mutation, 12),
            (self.default_mutation, 4),
            (self.keyless_insert, 1),
        ]
        makers, weights = zip(*kinds, strict=True)
        while len(self.cases) < size:
            self.rng.choices(makers, weights)[0]()
        return self.cases


def one_valid_update(batch: Batch) -> Case:
    """An INSERT where a table has room, else a DELETE: an update that must succeed."""
    for _ in range(1000):
        case = batch.insert() or batch.delete()
        if case is not None:
            return case
    raise AssertionError("no table has room and none holds an entry")


def compiled_pool(pipeline: Pipeline, entries: list[CompiledEntry]) -> dict[str, list[Entry]]:
    pool: dict[str, list[Entry]] = {}
    for e in entries:
        pool.setdefault(e.table, []).append(from_compiled(pipeline, e))
    return pool


# -- the client side --------------------------------------------------------------------------


class FuzzSession(Session):
    """A Session whose channel accepts the long error trailers of big failing batches
    (spec "gRPC Metadata Maximum Size": the receiving side raises its limit)."""

    def __init__(self, address: str, election_id: int | None) -> None:
        super().__init__(address, device_id=DEVICE, election_id=election_id, arbitrate=False)
        self.channel.close()
        self.channel = grpc.insecure_channel(address, options=BIG_TRAILERS)
        self.stub = p4r_grpc.P4RuntimeStub(self.channel)
        self.open_stream()
        self.arbitrate(election_id)


@dataclass(frozen=True, slots=True)
class Reply:
    code: grpc.StatusCode
    errors: list[int]  # one google.rpc code per update, or [] without details


def send(stub: p4r_grpc.P4RuntimeStub, request: p4r.WriteRequest) -> Reply:
    try:
        stub.Write(request, timeout=WAIT)
    except grpc.RpcError as err:
        errors = []
        for key, value in err.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                status = rpc_status.Status.FromString(value)
                assert status.code == rpc_code.UNKNOWN
                for detail in status.details:
                    e = p4r.Error()
                    assert detail.Unpack(e)
                    assert e.canonical_code != OK or not e.message  # spec: OK omits the rest
                    errors.append(e.canonical_code)
        return Reply(err.code(), errors)
    return Reply(grpc.StatusCode.OK, [])


def write_request(cases: list[Case], election_id: int | None = PRIMARY) -> p4r.WriteRequest:
    req = p4r.WriteRequest(device_id=DEVICE, updates=[c.update for c in cases])
    if election_id is not None:
        req.election_id.CopyFrom(u128(election_id))
    return req


def _explain(cases: list[Case], errors: list[int]) -> str:
    wrong = [
        f"#{i} {c.name}: want {rpc_code.Code.Name(c.code)}, got {rpc_code.Code.Name(got)}\n"
        f"    {text_format.MessageToString(c.update, as_one_line=True)}"
        for i, (c, got) in enumerate(zip(cases, errors, strict=False))
        if got != c.code
    ]
    return "\n".join(wrong[:8]) + (f"\n... and {len(wrong) - 8} more" if len(wrong) > 8 else "")


def check_batch(stub: p4r_grpc.P4RuntimeStub, cases: list[Case], label: str) -> None:
    want = [c.code for c in cases]
    reply = send(stub, write_request(cases))
    if all(code == OK for code in want):
        assert reply == Reply(grpc.StatusCode.OK, []), f"{label}: {reply}"
        return
    assert reply.code == grpc.StatusCode.UNKNOWN, f"{label}: {reply.code}"
    assert len(reply.errors) == len(cases), f"{label}: {len(reply.errors)} details"
    assert reply.errors == want, f"{label}:\n{_explain(cases, reply.errors)}"


def _diff(got: list[bytes], want: list[bytes]) -> str:
    def show(items: set[bytes]) -> str:
        return "\n".join(
            "    " + text_format.MessageToString(p4r.TableEntry.FromString(b), as_one_line=True)
            for b in sorted(items)[:5]
        )

    extra, missing = set(got) - set(want), set(want) - set(got)
    return f"read but not in the model:\n{show(extra)}\nin the model but not read:\n{show(missing)}"


def check_state(s: Session, model: Model, rng: random.Random, label: str) -> None:
    """The switch holds exactly the model: all entries, the defaults, one filtered read."""
    got = sorted(e.SerializeToString(deterministic=True) for e in s.read_table())
    want = model.table_state()
    assert got == want, f"{label}: wildcard read differs from the model\n{_diff(got, want)}"
    defaults = []
    for table in model.pipeline.tables:
        entity = p4r.Entity()
        entity.table_entry.CopyFrom(default_msg(table, None, ()))
        defaults.append(entity)
    read = [e.table_entry.SerializeToString(deterministic=True) for e in s.read(*defaults)]
    assert read == model.default_state(), f"{label}: default entries differ"
    check_filtered_read(s, model, rng, label)


def check_filtered_read(s: Session, model: Model, rng: random.Random, label: str) -> None:
    """Spec "Wildcard Reads": table, priority, action and exact-match filters."""
    table = rng.choice([t for t in model.pipeline.tables if t.keys])
    entries = [e for e in model.entries.values() if e.table.id == table.id]
    entity = p4r.Entity()
    te = entity.table_entry
    te.table_id = table.id
    how = rng.choice(("table", "priority", "action", "match", "missing match"))
    if how == "priority" and table.needs_priority:
        te.priority = rng.choice([e.priority for e in entries] or [1])
        entries = [e for e in entries if e.priority == te.priority]
    elif how == "action":
        action = rng.choice(entry_actions(model.pipeline, table))
        te.action.action.action_id = action.id
        entries = [e for e in entries if e.action.id == action.id]
    elif how in ("match", "missing match"):
        if how == "match" and entries:
            target = rng.choice(entries)
        else:
            target = random_entry(rng, model.pipeline, table)
        te.match.extend(wire(target, rng).match)  # padded and shuffled: still the same key
        te.priority = target.priority
        if te.match:
            entries = [e for e in entries if e.key == target.key]
        else:  # no match at all is a wildcard (spec's "don't care" entry ambiguity)
            entries = [e for e in entries if e.priority == te.priority or not te.priority]
    got = sorted(e.table_entry.SerializeToString(deterministic=True) for e in s.read(entity))
    want = sorted(canonical(e) for e in entries)
    assert got == want, f"{label}: read filtered by {how} differs\n{_diff(got, want)}"


ENVELOPES = {
    # what is wrong with the WriteRequest itself -> the status the spec prescribes
    "unknown device": grpc.StatusCode.NOT_FOUND,
    "unknown role": grpc.StatusCode.NOT_FOUND,
    "lower election id": grpc.StatusCode.PERMISSION_DENIED,
    "no election id": grpc.StatusCode.PERMISSION_DENIED,
    "from the backup": grpc.StatusCode.PERMISSION_DENIED,
    "ROLLBACK_ON_ERROR": grpc.StatusCode.UNIMPLEMENTED,
    "DATAPLANE_ATOMIC": grpc.StatusCode.UNIMPLEMENTED,
    "oversize batch": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def broken_request(
    how: str, cases: list[Case], backup_id: int, rng: random.Random
) -> p4r.WriteRequest:
    req = write_request(cases)
    if how == "unknown device":
        req.device_id = rng.choice((0, DEVICE + rng.randint(1, 1 << 40)))
    elif how == "unknown role":
        req.role = rng.choice(("sdn", "backup", "\x00"))
    elif how == "lower election id":
        req.election_id.CopyFrom(u128(rng.randint(0, PRIMARY - 1)))
    elif how == "no election id":
        req.ClearField("election_id")
    elif how == "from the backup":
        req.election_id.CopyFrom(u128(backup_id))
    elif how in ("ROLLBACK_ON_ERROR", "DATAPLANE_ATOMIC"):
        req.atomicity = p4r.WriteRequest.Atomicity.Value(how)
    return req


def pipeline_for(seed: int) -> Pipeline:
    """Seeds alternate full-size and tiny tables (which fill up), range and ternary keys."""
    return build_pipeline(TINY if seed % 2 else None, "ternary" if seed % 4 >= 2 else "range")


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(server, "MAX_BATCH", MAX_BATCH)
    return MAX_BATCH


@pytest.fixture
def switch_address() -> Iterator[tuple[ReferenceSwitch, str]]:
    sw = ReferenceSwitch(device_id=DEVICE)
    port = sw.start("127.0.0.1:0")
    yield sw, f"127.0.0.1:{port}"
    sw.stop()


# -- the fuzzer -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_every_mutation_gets_its_status_and_reads_equal_the_model(
    seed: int,
    compiled: dict[str, list[CompiledEntry]],
    switch_address: tuple[ReferenceSwitch, str],
    small_batches: int,
) -> None:
    rng = random.Random(seed)
    pipeline = pipeline_for(seed)
    range_kind = pipeline.table("policy").range_kind
    pool = compiled_pool(pipeline, compiled[range_kind])
    _, addr = switch_address
    backup_id = rng.randint(1, PRIMARY - 1)
    sessions = [FuzzSession(addr, PRIMARY)]
    try:
        primary = sessions[0]
        assert primary.arbitration_status() == rpc_code.OK
        sessions.append(backup := FuzzSession(addr, backup_id))  # after the primary is known
        assert backup.arbitration_status() == rpc_code.ALREADY_EXISTS
        model = Model(pipeline)

        # No pipeline yet: the spec's checks in order, device, primary, then the pipeline.
        cases = Batch(model, rng, pool).plan(rng.randint(1, 5))
        for envelope in ("unknown device", "from the backup"):
            reply = send(primary.stub, broken_request(envelope, cases, backup_id, rng))
            assert reply == Reply(ENVELOPES[envelope], []), envelope
        reply = send(primary.stub, write_request(cases))
        assert reply == Reply(grpc.StatusCode.FAILED_PRECONDITION, [])

        primary.set_pipeline(pipeline_config(pipeline))
        check_state(primary, model, rng, "empty")
        seen: Counter[str] = Counter()
        for n in range(BATCHES):
            label = f"seed {seed} batch {n}"
            # Every fourth batch has a broken request; the seeds cycle through all of them.
            kinds = list(ENVELOPES)
            how = kinds[(3 * seed + n // 4) % len(kinds)] if n % 4 == 3 else None
            size = (
                rng.randint(small_batches + 1, small_batches + 8) if how == "oversize batch" else 0
            )
            size = size or (0 if rng.random() < 0.03 else rng.randint(1, small_batches))
            cases = Batch(model, rng, pool).plan(size)
            if how is None:
                check_batch(primary.stub, cases, label)
                for case in cases:
                    if case.code == OK:
                        case.apply(model)
                seen.update(c.name.split(" (")[0] for c in cases)
            else:
                reply = send(primary.stub, broken_request(how, cases, backup_id, rng))
                assert reply == Reply(ENVELOPES[how], []), f"{label}: {how}"
                seen[how] += 1
            check_state(primary, model, rng, label)
        assert seen["insert"] and sum(seen.values()) > BATCHES  # the fuzzer did fuzz

        # It never crashed: it still answers, and a valid write still works.
        caps = primary.stub.Capabilities(p4r.CapabilitiesRequest(), timeout=WAIT)
        assert caps.p4runtime_api_version
        case = one_valid_update(Batch(model, rng, pool))
        check_batch(primary.stub, [case], f"seed {seed} final")
        case.apply(model)
        check_state(primary, model, rng, f"seed {seed} final")
    finally:
        for session in sessions:
            session.close()


def test_tiny_tables_fill_up_exactly_at_their_size(
    switch_address: tuple[ReferenceSwitch, str],
) -> None:
    """Spec "TableEntry": RESOURCE_EXHAUSTED once the P4Info size is reached, not before."""
    rng = random.Random(7)
    pipeline = build_pipeline({"routing": 4})
    routing = pipeline.table("routing")
    s = FuzzSession(switch_address[1], PRIMARY)
    try:
        assert s.arbitration_status() == rpc_code.OK
        s.set_pipeline(pipeline_config(pipeline))
        model = Model(pipeline)
        entries: dict[EntryKey, Entry] = {}
        while len(entries) < routing.size + 3:
            e = random_entry(rng, pipeline, routing)
            entries[e.key] = e
        ups = [update(INSERT, wire(e, rng)) for e in entries.values()]
        for i, u in enumerate(ups):
            result = s.write([u])
            full = i >= routing.size
            assert result.errors == ([RESOURCE_EXHAUSTED] if full else []), i
        model.entries = dict(list(entries.items())[: routing.size])
        check_state(s, model, rng, "full")
        # A delete makes room for exactly one more.
        first = next(iter(model.entries.values()))
        *_, another, extra = entries.values()
        assert s.write([update(DELETE, wire(first))]).code == grpc.StatusCode.OK
        assert s.write([update(INSERT, wire(extra))]).code == grpc.StatusCode.OK
        assert s.write([update(INSERT, wire(another))]).errors == [RESOURCE_EXHAUSTED]
        del model.entries[first.key]
        model.entries[extra.key] = extra
        check_state(s, model, rng, "after delete and insert")
    finally:
        s.close()


# -- garbage ----------------------------------------------------------------------------------

UNARY: dict[str, type[Message]] = {
    "Write": p4r.WriteRequest,
    "Read": p4r.ReadRequest,
    "SetForwardingPipelineConfig": p4r.SetForwardingPipelineConfigRequest,
    "GetForwardingPipelineConfig": p4r.GetForwardingPipelineConfigRequest,
    "Capabilities": p4r.CapabilitiesRequest,
}


def garbage(rng: random.Random, valid: bytes) -> bytes:
    """Random bytes, or a valid message truncated, bit-flipped or with a bad tag."""
    how = rng.randrange(4)
    if how == 0 or not valid:
        return rng.randbytes(rng.randint(1, 64))
    if how == 1:
        return valid[: rng.randrange(len(valid))] + rng.randbytes(rng.randint(0, 2))
    if how == 2:
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    return b"\x00" + valid  # field number 0 is never valid


def expected_unary(method: str, msg: Message) -> grpc.StatusCode | None:
    """What a request that did decode must get; None if it might be a real request."""
    if method == "Capabilities":
        return grpc.StatusCode.OK
    if msg.device_id != DEVICE:
        return grpc.StatusCode.NOT_FOUND
    if method in ("Read", "GetForwardingPipelineConfig"):
        return None
    if msg.role:
        return grpc.StatusCode.NOT_FOUND
    election = msg.election_id
    if not msg.HasField("election_id") or (election.high, election.low) != (
        PRIMARY >> 64,
        PRIMARY & ((1 << 64) - 1),
    ):
        return grpc.StatusCode.PERMISSION_DENIED
    return None


def call_raw(channel: grpc.Channel, method: str, data: bytes) -> grpc.StatusCode:
    """Send `data` as the request of a unary RPC; the status it ends with."""
    path = f"/p4.v1.P4Runtime/{method}"
    try:
        if method == "Read":
            list(channel.unary_stream(path)(data, timeout=WAIT))
        else:
            channel.unary_unary(path)(data, timeout=WAIT)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def valid_requests(rng: random.Random, pipeline: Pipeline) -> dict[str, bytes]:
    entry = random_entry(rng, pipeline, pipeline.table("routing"))
    entity = p4r.Entity()
    entity.table_entry.table_id = 0
    pipe = p4r.SetForwardingPipelineConfigRequest(
        device_id=DEVICE, action=p4r.SetForwardingPipelineConfigRequest.VERIFY
    )
    pipe.election_id.CopyFrom(u128(PRIMARY))
    pipe.config.CopyFrom(pipeline_config(pipeline))
    return {
        "Write": write_request([Case("x", update(INSERT, wire(entry)), OK)]).SerializeToString(),
        "Read": p4r.ReadRequest(device_id=DEVICE, entities=[entity]).SerializeToString(),
        "SetForwardingPipelineConfig": pipe.SerializeToString(),
        "GetForwardingPipelineConfig": p4r.GetForwardingPipelineConfigRequest(
            device_id=DEVICE
        ).SerializeToString(),
        "Capabilities": b"",
    }


def _undecodable(rng: random.Random) -> bytes:
    while True:
        data = garbage(rng, b"")
        try:
            p4r.StreamMessageRequest.FromString(data)
        except DecodeError:
            return data


ERROR = object()  # any status but OK


def stream_garbage(rng: random.Random) -> tuple[str, list[bytes], object, bool]:
    """Messages for a fresh StreamChannel, the status it must end with, and whether the
    switch first answers with an arbitration (a backup's ALREADY_EXISTS)."""
    arbitration = p4r.StreamMessageRequest()
    arbitration.arbitration.device_id = DEVICE
    arbitration.arbitration.election_id.CopyFrom(u128(rng.randint(1, PRIMARY - 1)))
    how = rng.randrange(4)
    if how == 0:
        return "undecodable", [_undecodable(rng)], ERROR, False
    if how == 1:
        msgs = [arbitration.SerializeToString(), _undecodable(rng)]
        return "undecodable after arbitration", msgs, ERROR, True
    if how == 2:
        first = p4r.StreamMessageRequest()
        rng.choice(
            (
                lambda: first.packet.metadata.add(metadata_id=1, value=b"\x01"),
                lambda: first.digest_ack.SetInParent(),
                lambda: None,
            )
        )()
        return (
            "no arbitration first",
            [first.SerializeToString()],
            grpc.StatusCode.FAILED_PRECONDITION,
            False,
        )
    arbitration.arbitration.device_id = DEVICE + rng.randint(1, 1000)
    return "unknown device", [arbitration.SerializeToString()], grpc.StatusCode.NOT_FOUND, False


@pytest.mark.parametrize("seed", range(4))
def test_garbage_gets_an_error_status_and_the_switch_keeps_serving(
    seed: int, compiled: dict[str, list[CompiledEntry]]
) -> None:
    rng = random.Random(1000 + seed)
    pipeline = pipeline_for(seed)
    pool = compiled_pool(pipeline, compiled[pipeline.table("policy").range_kind])
    sw = ReferenceSwitch(device_id=DEVICE)
    addr = f"127.0.0.1:{sw.start('127.0.0.1:0')}"
    primary = FuzzSession(addr, PRIMARY)
    raw = grpc.insecure_channel(addr)
    stopped = threading.Event()
    try:
        assert primary.arbitration_status() == rpc_code.OK
        primary.set_pipeline(pipeline_config(pipeline))
        model = Model(pipeline)
        batch = Batch(model, rng, pool)
        while len(batch.cases) < 20:
            batch.insert()
        check_batch(primary.stub, batch.cases, "load")
        for case in batch.cases:
            case.apply(model)

        valid = valid_requests(rng, pipeline)
        counts: Counter[str] = Counter()
        for i in range(60):
            method = rng.choice(list(UNARY))
            data = garbage(rng, valid[method])
            try:
                want = expected_unary(method, UNARY[method].FromString(data))
            except DecodeError:
                want = ERROR  # the spec names no status for bytes that are no message
            if want is None:
                continue  # it decoded into something the switch might rightly carry out
            got = call_raw(raw, method, data)
            assert got == want or (want is ERROR and got != grpc.StatusCode.OK), (
                f"#{i} {method} {data.hex()}: {got}"
            )
            counts[f"{method} {got.name}"] += 1

        stream = raw.stream_stream(
            "/p4.v1.P4Runtime/StreamChannel", request_serializer=None, response_deserializer=None
        )
        for i in range(40):
            name, msgs, want, advisory = stream_garbage(rng)
            responses = []
            try:
                for resp in stream(iter(msgs), timeout=WAIT):
                    responses.append(p4r.StreamMessageResponse.FromString(resp))
                got = grpc.StatusCode.OK
            except grpc.RpcError as err:
                got = err.code()
            assert got == want or (want is ERROR and got != grpc.StatusCode.OK), (
                f"stream #{i} {name}: {got}"
            )
            codes = [r.arbitration.status.code for r in responses]
            assert codes == ([rpc_code.ALREADY_EXISTS] if advisory else []), f"stream #{i} {name}"
            counts[f"stream {name}"] += 1
        assert len(counts) >= 4, counts  # several kinds of garbage were tried

        # Still serving, still the same primary, nothing changed.
        check_state(primary, model, rng, "after garbage")
        assert primary.stub.Capabilities(p4r.CapabilitiesRequest(), timeout=WAIT)
        case = one_valid_update(Batch(model, rng, pool))
        check_batch(primary.stub, [case], "after garbage")
        case.apply(model)
        check_state(primary, model, rng, "after garbage")
    finally:
        primary.close()
        raw.close()

        def stop() -> None:
            sw.stop()
            stopped.set()

        # A switch that was sent garbage still shuts down.
        threading.Thread(target=stop, daemon=True).start()
    assert wait_for(stopped.is_set), "the switch did not stop after garbage on its streams"
