"""Plans as values: what a switch holds, what it should hold, and the updates between them.

A switch's state (`Held`) is what a Read returns; the desired state (`Desired`) is what
the compiler produced. `diff` is the user-facing difference (entries added, changed,
removed per table); `plan_switch` is the sequence of P4Runtime updates that gets there
without a packet ever being judged by a mix of the old and the new policy.

The update protocol (DESIGN.md "Consistent updates without rewriting everything"): every
packet is stamped with the switch's epoch (0 or 1) by the keyless `epoch` table, and the
`src_identity`, `dst_identity` and `policy` tables match the epoch as a ternary field. In
the steady state every entry leaves the epoch out (a wildcard: it serves both epochs).
To move from policy A (live under epoch e) to B:

  prepare  make the idle epoch e' see exactly B while epoch e still sees exactly A:
           an entry of B that A lacks is inserted for e' only; an entry of A that B lacks
           is re-inserted for e only, then its wildcard is deleted (both answer the same
           for e, so packets of e see A throughout); entries A and B share stay as they are
  flip     one write: the epoch table's default action now stamps e'
  finish   delete the entries kept for e; turn each e'-only entry into a wildcard
           (insert the wildcard, then delete the e'-only copy: both answer the same for e')

Tables without an epoch key (routing) change in `prepare` (inserts, modifications) and
`finish` (deletions). A plan with nothing to change is empty: no flip, no writes.

Switch-side digests: a switch brought to a `Desired` is marked with its `digest` in the
`metadata` of the epoch table's default entry, which P4Runtime keeps opaque and returns on
a read (runtime/controller.py writes it last, and clears it before anything else changes).
A switch whose mark equals the new `Desired.digest` holds exactly it: one small read of the
default entry instead of reading and planning every table.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterable, Iterator, KeysView, Mapping
from dataclasses import dataclass, field

from finsy.proto import p4r

from compiler.entries import SwitchTables, TableEntry
from compiler.memo import ByObject, also_forget, shared_ends
from p4src.spec import CPU_CLONE_SESSION, Pipeline
from runtime.entities import table_entry_proto

INSERT, MODIFY, DELETE = "insert", "modify", "delete"
_UPDATE_TYPE = {INSERT: p4r.Update.INSERT, MODIFY: p4r.Update.MODIFY, DELETE: p4r.Update.DELETE}
EPOCH_TABLE = "epoch"
EPOCH_KEY = "epoch"
DIGEST_MARK = b"p4seg/1 "  # what a digest in a default entry's metadata starts with


@dataclass(frozen=True, slots=True)
class Change:
    """One update: an operation on an entity. Printing a plan prints these."""

    op: str  # insert | modify | delete
    entity: p4r.Entity
    table: str  # the table's name, or "clone_session"

    def update(self) -> p4r.Update:
        u = p4r.Update(type=_UPDATE_TYPE[self.op])
        u.entity.CopyFrom(self.entity)
        return u


def _entity(entry: p4r.TableEntry) -> p4r.Entity:
    e = p4r.Entity()
    e.table_entry.CopyFrom(entry)
    return e


def _clone_entity(session: p4r.CloneSessionEntry) -> p4r.Entity:
    e = p4r.Entity()
    e.packet_replication_engine_entry.clone_session_entry.CopyFrom(session)
    return e


def clone_session(cpu_port: int) -> p4r.CloneSessionEntry:
    """The clone session that carries logged denies to the controller."""
    cs = p4r.CloneSessionEntry(session_id=CPU_CLONE_SESSION)
    cs.replicas.add(egress_port=cpu_port, instance=1)
    return cs


class Tables:
    """The pipeline's table ids and epoch fields, answered once."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.name = {t.id: t.name for t in pipeline.tables}
        self.epoch_field = {
            t.id: k.id for t in pipeline.tables for k in t.keys if k.name == EPOCH_KEY
        }
        self.epoch_table = pipeline.table(EPOCH_TABLE)
        self.range_bytes = {
            (t.id, k.id): (k.bits + 7) // 8
            for t in pipeline.tables
            for k in t.keys
            if k.match == "range"
        }
        self.set_epoch = pipeline.action("set_epoch")
        self.metered = {t.name for t in pipeline.tables if t.meter is not None}

    def split(self, entry: p4r.TableEntry) -> tuple[bytes, int | None]:
        """(the entry's key without its epoch, the epoch it is limited to or None)."""
        fid = self.epoch_field.get(entry.table_id)
        epoch = None
        key = p4r.TableEntry(table_id=entry.table_id, priority=entry.priority)
        for fm in entry.match:
            if fm.field_id == fid:
                epoch = int.from_bytes(fm.ternary.value, "big")
            else:
                key.match.append(fm)
        return key.SerializeToString(deterministic=True), epoch

    def with_epoch(self, entry: p4r.TableEntry, epoch: int | None) -> p4r.TableEntry:
        """`entry` limited to `epoch` (None: the wildcard); match fields stay in id order."""
        fid = self.epoch_field[entry.table_id]
        out = p4r.TableEntry()
        out.CopyFrom(entry)
        del out.match[:]
        fields = [fm for fm in entry.match if fm.field_id != fid]
        if epoch is not None:
            fm = p4r.FieldMatch(field_id=fid)
            fm.ternary.value, fm.ternary.mask = bytes([epoch]), b"\x01"
            fields.append(fm)
        out.match.extend(sorted(fields, key=lambda f: f.field_id))
        return out

    def on_the_wire(self, update: p4r.Update) -> p4r.Update:
        """`update` as sent: range bounds at their full width. Both forms are valid
        (P4Runtime "Bytestrings"), but BMv2 takes a shortest-form range such as 0..255 on a
        16-bit field for a don't-care and refuses it; reads are made canonical again."""
        entry = update.entity.table_entry
        if not any((entry.table_id, fm.field_id) in self.range_bytes for fm in entry.match):
            return update
        out = p4r.Update()
        out.CopyFrom(update)
        for fm in out.entity.table_entry.match:
            width = self.range_bytes.get((entry.table_id, fm.field_id))
            if width is not None:
                fm.range.low = fm.range.low.rjust(width, b"\x00")
                fm.range.high = fm.range.high.rjust(width, b"\x00")
        return out

    def epoch_default(self, epoch: int, digest: bytes = b"") -> p4r.TableEntry:
        """The epoch table's default entry stamping `epoch`, marked with `digest` (what the
        switch holds once the write is done; empty: unknown)."""
        entry = p4r.TableEntry(table_id=self.epoch_table.id, is_default_action=True)
        entry.action.action.action_id = self.set_epoch.id
        entry.action.action.params.add(param_id=1, value=bytes([epoch]))
        entry.metadata = digest
        return entry


def _action_bytes(entry: p4r.TableEntry) -> bytes:
    data: bytes = entry.action.SerializeToString(deterministic=True)
    return data


def _meter_bytes(entry: p4r.TableEntry) -> bytes:
    # Entries are canonical (runtime.entities.canonical_entry): no config is no field.
    if not entry.HasField("meter_config"):
        return b""
    data: bytes = entry.meter_config.SerializeToString(deterministic=True)
    return data


class Entries(Mapping[bytes, p4r.TableEntry]):
    """A switch's entries by key, each message parsed from its bytes when first asked for:
    a plan of a few changes (a quarantine overlay) reads a handful of a ToR's 3,000."""

    __slots__ = ("_messages", "_raw")

    def __init__(
        self, raw: dict[bytes, bytes], messages: dict[bytes, p4r.TableEntry] | None = None
    ) -> None:
        self._raw = raw  # key -> the entry serialized
        self._messages = messages if messages is not None else {}

    def __getitem__(self, key: bytes) -> p4r.TableEntry:
        msg = self._messages.get(key)
        if msg is None:
            msg = self._messages[key] = p4r.TableEntry.FromString(self._raw[key])
        return msg

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def keys(self) -> KeysView[bytes]:
        return self._raw.keys()


class Desired:
    """What one switch must hold: wildcard-epoch entries, by key, and its clone session;
    `encoded`: each entry serialized (once) -> its key, so that a held entry equal to it is
    matched by its bytes alone; `digest`: the mark of a switch that holds all of it (see the
    module docstring; empty: never taken as held).

    `Desired.of` encodes the compiled entries at once; `Desired.lazy` (given the digest the
    build names them by) only when a plan needs them, so that a switch whose mark matches
    costs no encoding at all. A lazy one planned against what a long-running controller
    last brought the switch to (`Held.of(known)`) is encoded by difference from `known`
    (`_Delta`), and planned from that difference alone. When `known` is lazy too (a new
    process's kept tables of the switch, p4seg/proven.py), neither is encoded in full: only
    the entries that differ are, and the rest of either only if something asks for it
    (`_DeltaEntries`). Read only once made.
    """

    __slots__ = (
        "__weakref__",
        "_compiled",
        "_delta",
        "_encoded",
        "_entries",
        "_partly",
        "_tables",
        "clone",
        "digest",
        "switch",
    )

    def __init__(
        self,
        switch: str,
        entries: Mapping[bytes, p4r.TableEntry],
        clone: p4r.CloneSessionEntry,
        encoded: dict[bytes, bytes] | None = None,
        digest: bytes = b"",
    ) -> None:
        self.switch, self.clone, self.digest = switch, clone, digest
        self._entries, self._encoded = entries, encoded if encoded is not None else {}
        self._tables: Tables | None = None  # with `_compiled`: not encoded yet
        self._compiled: SwitchTables | None = None  # what it was encoded from
        self._delta: _Delta | None = None
        self._partly: _Partial | None = None  # unencoded but for its `_delta`

    @classmethod
    def of(cls, tables: Tables, compiled: SwitchTables, cpu_port: int) -> Desired:
        entries, encoded = _encode(tables, compiled)
        clone = clone_session(cpu_port)
        out = cls(compiled.switch, entries, clone, encoded, _digest(encoded, clone))
        out._compiled = compiled
        return out

    @classmethod
    def lazy(cls, tables: Tables, compiled: SwitchTables, cpu_port: int, digest: bytes) -> Desired:
        """`compiled`, encoded when first needed; `digest` must name exactly what it holds
        (with `cpu_port`'s clone session), as the build's entries file does."""
        out = cls(compiled.switch, {}, clone_session(cpu_port), None, digest)
        out._tables, out._compiled = tables, compiled
        return out

    def _made(self, base: Desired | None = None) -> None:
        tables = self._tables
        if tables is None:
            return
        assert self._compiled is not None
        self._tables = None
        if base is not None:
            base._made()  # encoded in full once, to plan from (a new process's kept tables)
        if base is not None and base._compiled is not None:
            made = _encode_by_difference(tables, self._compiled, base)
            if made is not None:
                self._entries, self._encoded, self._delta = made
                return
        self._entries, self._encoded = _encode(tables, self._compiled)

    def made_from(self, base: Desired) -> None:
        """Encode it now, by difference from `base` where it can (see the class doc)."""
        if self._tables is not None and base._tables is not None and self._delta is None:
            assert self._compiled is not None
            found = _differing(self._tables, self._compiled, base)
            if found is not None and _one_per_key(found):
                self._delta = _Delta(weakref.ref(base), *found)
                self._partly = _Partial.of(self._delta)
                return
        self._made(base)

    def delta_from(self, base: Desired) -> _Delta | None:
        """How it differs from `base`, when it was encoded by difference from it."""
        delta = self._delta
        return delta if delta is not None and delta.base() is base else None

    @property
    def made(self) -> bool:
        """Whether every entry is encoded (a lazy one: once a plan or a reader needed them)."""
        return self._tables is None

    @property
    def entries(self) -> Mapping[bytes, p4r.TableEntry]:
        if self._partly is not None and self._tables is not None:
            return _DeltaEntries(self, self._partly)  # (a view: no cycle through self)
        self._made()
        return self._entries

    @property
    def encoded(self) -> dict[bytes, bytes]:
        self._made()
        return self._encoded


@dataclass(frozen=True, slots=True)
class _Delta:
    """A Desired encoded by difference from `base`: the serialized entries of `base` it
    lacks (`gone`) and those it has that `base` lacks (`came`), each -> its key."""

    base: weakref.ref[Desired]
    gone: dict[bytes, bytes]
    came: dict[bytes, bytes]


# Entries encoded before, by value, per pipeline (its tables and actions: a build's pipeline
# is a new object with the same ids): a long-running controller's next build of a switch is
# mostly equal entries in new objects, and parsing an entry's bytes costs a fifth of
# building its message. Messages are never shared: each Desired parses its own. Emptied
# past _ENCODED_MAX entries.
_ENCODED: dict[tuple[object, ...], dict[TableEntry, tuple[bytes, bytes]]] = {}
_ENCODED_MAX = 400_000
also_forget(_ENCODED.clear)


def _encode(tables: Tables, compiled: SwitchTables) -> tuple[Entries, dict[bytes, bytes]]:
    """The compiled entries as messages by key (parsed when first asked for), and
    serialized -> key (each encoded once)."""
    raw: dict[bytes, bytes] = {}
    made: dict[bytes, p4r.TableEntry] = {}
    encoded: dict[bytes, bytes] = {}
    one = _encoder(tables, made)
    for e in compiled.entries:
        serialized, key = one(e)
        raw[key] = serialized
        encoded[serialized] = key
    # The only default the compiler sets is the epoch's, which the update protocol owns.
    assert all(d.table == EPOCH_TABLE for d in compiled.defaults), compiled.defaults
    return Entries(raw, made), encoded


def _encoder(
    tables: Tables, made: dict[bytes, p4r.TableEntry]
) -> Callable[[TableEntry], tuple[bytes, bytes]]:
    """An entry -> (serialized, key), from `_ENCODED` when encoded before (a message built
    now is kept in `made`)."""
    pipeline = tables.pipeline
    ids = (pipeline.name, pipeline.control, pipeline.tables, pipeline.actions)
    seen = _ENCODED.get(ids)
    if seen is None or len(seen) > _ENCODED_MAX:
        _ENCODED.clear()  # one pipeline at a time in practice
        seen = _ENCODED[ids] = {}

    def one(e: TableEntry) -> tuple[bytes, bytes]:
        found = seen.get(e)
        if found is None:
            msg = table_entry_proto(pipeline, e)
            found = seen[e] = (msg.SerializeToString(deterministic=True), tables.split(msg)[0])
            made[found[1]] = msg
        return found

    return one


def _encode_by_difference(
    tables: Tables, compiled: SwitchTables, base: Desired
) -> tuple[Entries, dict[bytes, bytes], _Delta] | None:
    """`_encode(tables, compiled)`, made from `base`'s encoding: only the entries that are
    not `base`'s own entry objects are looked at (a ToR compiled again for a one-rule edit
    keeps most of its entries as the same objects). `base` must be encoded and its compiled
    tables still alive (their ids name them). None where it cannot (another switch, a
    table with repeated keys): the caller encodes in full."""
    assert base._compiled is not None
    if not isinstance(base._entries, Entries) or len(base._entries) != len(base._compiled.entries):
        return None  # `base` holds two entries under one key
    found = _differing(tables, compiled, base)
    if found is None:
        return None
    gone, came = found
    raw = dict(base._entries._raw)
    encoded = dict(base._encoded)
    for serialized, key in gone.items():
        if raw.get(key) != serialized:  # two entries under one key in `base`
            return None
        del raw[key], encoded[serialized]
    for serialized, key in came.items():
        if key in raw:  # two entries under one key: left to the full encoding
            return None
        raw[key] = serialized
        encoded[serialized] = key
    if len(raw) != len(compiled.entries):
        return None
    return Entries(raw, {}), encoded, _Delta(weakref.ref(base), gone, came)


def _differing(
    tables: Tables, compiled: SwitchTables, base: Desired
) -> tuple[dict[bytes, bytes], dict[bytes, bytes]] | None:
    """The entries of `base`'s compiled tables that `compiled` lacks, and those it adds,
    each serialized -> its key: only the entries that are not `base`'s own objects are
    looked at (a ToR compiled again for a one-rule edit keeps most of its entries as the
    same objects, and a new process's kept tables share the build's where they are equal:
    compiler/emit.py `load_entries_near`). None for another switch or other defaults."""
    old = base._compiled
    assert old is not None
    if old.switch != compiled.switch or compiled.defaults != old.defaults:
        return None
    head, tail = shared_ends(old.entries, compiled.entries)  # the rest is as it was
    old_entries = old.entries[head : len(old.entries) - tail]
    new_entries = compiled.entries[head : len(compiled.entries) - tail]
    old_ids, new_ids = set(map(id, old_entries)), set(map(id, new_entries))
    one = _encoder(tables, {})  # (messages parsed from the bytes when asked for)
    gone = dict(map(one, (e for e in old_entries if id(e) not in new_ids)))
    came = dict(map(one, (e for e in new_entries if id(e) not in old_ids)))
    for serialized in gone.keys() & came.keys():  # equal entries in new objects
        del gone[serialized], came[serialized]
    return gone, came


def _one_per_key(found: tuple[dict[bytes, bytes], dict[bytes, bytes]]) -> bool:
    """Whether the entries that differ name each key once on each side. (Two entries
    under one key, one of them among those alike, cannot be seen without encoding every
    entry; a switch refuses a second entry under a key, so the tables a switch was
    brought to never have them, and a build that did would fail its inserts.)"""
    gone, came = found
    return len(set(gone.values())) == len(gone) and len(set(came.values())) == len(came)


@dataclass(frozen=True, slots=True)
class _Partial:
    """What a Desired encoded only by its difference (`_Delta`) knows of its entries: those
    that came, by key (serialized, and each message once parsed), and the keys whose entry
    went and did not come back."""

    came: dict[bytes, bytes]
    gone: frozenset[bytes]
    messages: dict[bytes, p4r.TableEntry]

    @classmethod
    def of(cls, delta: _Delta) -> _Partial:
        came = {key: serialized for serialized, key in delta.came.items()}
        return cls(came, frozenset(delta.gone.values()) - came.keys(), {})


class _DeltaEntries(Mapping[bytes, p4r.TableEntry]):
    """The entries of a Desired encoded only by its difference (`_Partial`): a key the
    difference names is answered from it; any other question encodes the Desired in full.
    A plan from the difference (`_index`, `_diff`, `plan_switch`) asks only the former."""

    __slots__ = ("_owner", "_partly")

    def __init__(self, owner: Desired, partly: _Partial) -> None:
        self._owner, self._partly = owner, partly

    def _full(self) -> Mapping[bytes, p4r.TableEntry]:
        self._owner._made()
        return self._owner._entries

    def __getitem__(self, key: bytes) -> p4r.TableEntry:
        partly = self._partly
        serialized = partly.came.get(key)
        if serialized is not None:
            msg = partly.messages.get(key)
            if msg is None:
                msg = partly.messages[key] = p4r.TableEntry.FromString(serialized)
            return msg
        if key in partly.gone:
            raise KeyError(key)
        return self._full()[key]

    def __contains__(self, key: object) -> bool:
        if key in self._partly.came:
            return True
        return key not in self._partly.gone and key in self._full()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._full())

    def __len__(self) -> int:
        return len(self._full())


def text_digest(text: str, cpu_port: int) -> bytes:
    """The mark of a switch holding what `text` names exactly (a build's entries file) with
    `cpu_port`: remembered per text object (a build hands the switches an edit left alone
    the same file text, and hashing 50 ToRs' files costs ~25 ms an operation)."""
    made = _TEXT_DIGESTS.get(text, lambda _t: {})
    if (found := made.get(cpu_port)) is None:
        h = hashlib.sha256(f"cpu port {cpu_port}\n".encode())
        h.update(text.encode())
        found = made[cpu_port] = DIGEST_MARK + h.hexdigest().encode()
    return found


_TEXT_DIGESTS: ByObject[str, dict[int, bytes]] = ByObject(8)


def hold_text_digests(count: int) -> None:
    """Remember the digests of `count` texts at once (a build's switches)."""
    _TEXT_DIGESTS.hold(count)


def _digest(encoded: Iterable[bytes], clone: p4r.CloneSessionEntry) -> bytes:
    """The mark of a switch holding the `encoded` entries (as wildcards) and `clone`,
    whatever order they were compiled in."""
    h = hashlib.sha256(clone.SerializeToString(deterministic=True))
    for entry in sorted(encoded):
        h.update(len(entry).to_bytes(4, "big"))
        h.update(entry)
    return DIGEST_MARK + h.hexdigest().encode()


@dataclass(slots=True)
class Held:
    """What one switch holds, as read back."""

    entries: list[p4r.TableEntry] = field(default_factory=list)
    epoch: int = 0
    clone: p4r.CloneSessionEntry | None = None
    digest: bytes = b""  # the epoch default's metadata: the mark of what the switch holds
    # Held as this Desired (Held.of): its entries, all wildcard-epoch ones, are its own
    # (by their bytes, parsed only where they differ from a plan's); `entries` is empty.
    known: Desired | None = None

    @classmethod
    def of(cls, known: Desired, epoch: int, digest: bytes) -> Held:
        """What a switch holds when its mark says it holds `known` (a long-running
        controller's last build of it)."""
        return cls([], epoch, known.clone, digest, known)


@dataclass(slots=True)
class _Copies:
    """The entries held under one key: the wildcard and the copies pinned to each epoch."""

    wild: p4r.TableEntry | None = None
    pinned: dict[int, p4r.TableEntry] = field(default_factory=dict)


_NONE = _Copies()  # read only: a key the switch holds no entry under


@dataclass(slots=True)
class _Index:
    """Held entries indexed once: of epoch tables by key (with their copies), of the other
    tables by key, and the keys whose held entry is byte for byte the desired one (`exact`)
    or not (`different`, sorted)."""

    copies: dict[bytes, _Copies] = field(default_factory=dict)
    plain: dict[bytes, p4r.TableEntry] = field(default_factory=dict)
    exact: _Exact = field(default_factory=set)
    different: list[bytes] = field(default_factory=list)

    def add(self, tables: Tables, entry: p4r.TableEntry, key: bytes, epoch: int | None) -> None:
        if entry.table_id not in tables.epoch_field:
            self.plain[key] = entry
        elif epoch is None:
            self.copies.setdefault(key, _Copies()).wild = entry
        else:
            self.copies.setdefault(key, _Copies()).pinned[epoch] = entry


class _AllBut:
    """The desired keys but `but`: `_Index.exact` of a plan made from a difference."""

    __slots__ = ("_but", "_keys")

    def __init__(self, keys: Mapping[bytes, object], but: set[bytes]) -> None:
        self._keys, self._but = keys, but

    def __contains__(self, key: object) -> bool:
        return key in self._keys and key not in self._but


_Exact = set[bytes] | _AllBut


def _index(tables: Tables, held: Held, desired: Desired) -> _Index:
    index = _Index()
    known = held.known
    if known is not None:  # its bytes are at hand: an entry desired as it is needs no more
        desired.made_from(known)
        delta = desired.delta_from(known)
        if delta is not None:  # only what the difference names is not held as desired
            for serialized, own in delta.gone.items():  # (`known` may be unencoded)
                index.add(tables, p4r.TableEntry.FromString(serialized), own, None)
            index.exact = _AllBut(desired.entries, set(delta.came.values()))
            index.different = sorted(delta.came.values())
            return index
        wanted = desired.encoded
        exact = set()
        for data, own in known.encoded.items():
            key = wanted.get(data)
            if key is not None:
                exact.add(key)
            else:
                index.add(tables, known.entries[own], own, None)
        index.exact = exact
        index.different = sorted(desired.entries.keys() - exact)
        return index
    exact = set()
    for entry in held.entries:
        # Serialized entries first: a held entry equal to a desired one needs no splitting.
        key = desired.encoded.get(entry.SerializeToString(deterministic=True))
        epoch = None
        if key is not None:
            exact.add(key)
        else:
            key, epoch = tables.split(entry)
        index.add(tables, entry, key, epoch)
    index.exact = exact
    index.different = sorted(desired.entries.keys() - exact)
    return index


def _same(a: p4r.TableEntry | None, b: p4r.TableEntry | None) -> bool:
    """Whether two entries under one key judge packets alike: the action and, for a
    metered allow, the meter's config (a changed rate is a change)."""
    if a is None or b is None:
        return a is b
    return _action_bytes(a) == _action_bytes(b) and _meter_bytes(a) == _meter_bytes(b)


@dataclass(frozen=True, slots=True)
class TableDiff:
    added: tuple[p4r.TableEntry, ...]
    changed: tuple[tuple[p4r.TableEntry, p4r.TableEntry], ...]  # (held, desired)
    removed: tuple[p4r.TableEntry, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def diff(tables: Tables, desired: Desired, held: Held) -> dict[str, TableDiff]:
    """Per table: what packets of the live epoch meet now against what they should meet."""
    return _diff(tables, desired, held, _index(tables, held, desired))


def _diff(tables: Tables, desired: Desired, held: Held, index: _Index) -> dict[str, TableDiff]:
    live = {
        k: c.wild or c.pinned[held.epoch]
        for k, c in index.copies.items()
        if (c.wild or held.epoch in c.pinned) and k not in index.exact
    }
    live.update((k, e) for k, e in index.plain.items() if k not in index.exact)
    slots: dict[
        str,
        tuple[
            list[p4r.TableEntry], list[tuple[p4r.TableEntry, p4r.TableEntry]], list[p4r.TableEntry]
        ],
    ] = {}
    for key in sorted(live.keys() | set(index.different)):
        have, want = live.get(key), desired.entries.get(key)
        if _same(have, want):
            continue
        some = want if want is not None else have
        assert some is not None
        added, changed, removed = slots.setdefault(tables.name[some.table_id], ([], [], []))
        if have is None:
            added.append(some)
        elif want is None:
            removed.append(
                tables.with_epoch(have, None) if have.table_id in tables.epoch_field else have
            )
        else:
            changed.append((have, want))
    return {
        name: TableDiff(tuple(a), tuple(c), tuple(r)) for name, (a, c, r) in sorted(slots.items())
    }


@dataclass(frozen=True, slots=True)
class SwitchPlan:
    """A switch's writes: `prepare`, the `flip`, `finish`, each acknowledged before the next
    is sent. `barriers`: positions in `prepare` where the updates after must wait for those
    before (a P4Runtime server may apply the updates of one Write in any order): the
    overlay's and the monotone changes' steps (runtime/overlay.py)."""

    switch: str
    prepare: tuple[Change, ...]
    flip: Change | None
    finish: tuple[Change, ...]
    diff: dict[str, TableDiff]
    epoch_after: int
    barriers: tuple[int, ...] = ()

    def steps(self) -> Iterator[tuple[Change, ...]]:
        """`prepare` cut at its barriers (no empty step)."""
        start = 0
        for stop in (*self.barriers, len(self.prepare)):
            if stop > start:
                yield self.prepare[start:stop]
                start = stop

    @property
    def empty(self) -> bool:
        return not (self.prepare or self.flip or self.finish)

    def changes(self) -> Iterable[Change]:
        yield from self.prepare
        if self.flip is not None:
            yield self.flip
        yield from self.finish


def plan_switch(tables: Tables, desired: Desired, held: Held) -> SwitchPlan:
    """The updates that take `held` to `desired` consistently (see the module docstring).

    Entries already right are never touched, so re-planning after an interrupted apply
    only finishes what is left.
    """
    e, idle = held.epoch, 1 - held.epoch
    prepare: list[Change] = []
    finish: list[Change] = []
    index = _index(tables, held, desired)
    copies, plain, exact = index.copies, index.plain, index.exact

    def change(op: str, entry: p4r.TableEntry) -> Change:
        return Change(op, _entity(entry), tables.name[entry.table_id])

    flip_needed = False
    # Only the desired entries not held byte for byte are looked at (and parsed: a lazy
    # Desired parses an entry's message when first asked for it); a held one with copies
    # is among `copies`.
    different = index.different
    wanted = desired.entries
    keys = copies.keys() | {k for k in different if wanted[k].table_id in tables.epoch_field}
    for key in sorted(keys):
        held_k = copies.get(key, _NONE)
        if key in exact and not held_k.pinned:
            continue  # the desired entry, held as a wildcard: nothing to do
        w, oe, oi = held_k.wild, held_k.pinned.get(e), held_k.pinned.get(idle)
        d = desired.entries.get(key)
        if _same(w if w is not None else oe, d):
            # The live epoch already sees B here: tidy up to one wildcard, no flip needed.
            if w is None and d is not None:
                prepare.append(change(INSERT, d))
            for extra in (oe, oi):
                if extra is not None:
                    prepare.append(change(DELETE, extra))
            continue
        flip_needed = True
        if w is not None:  # A's entry keeps serving e only, until the flip
            if not _same(oe, w):
                if oe is not None:
                    prepare.append(change(DELETE, oe))
                prepare.append(change(INSERT, tables.with_epoch(w, e)))
            prepare.append(change(DELETE, w))
            finish.append(change(DELETE, tables.with_epoch(w, e)))
        elif oe is not None:
            finish.append(change(DELETE, oe))
        if d is not None:  # B's entry serves e' only, until the flip; then it is a wildcard
            if not _same(oi, d):
                if oi is not None:
                    prepare.append(change(DELETE, oi))
                prepare.append(change(INSERT, tables.with_epoch(d, idle)))
            finish.append(change(INSERT, d))
            finish.append(change(DELETE, tables.with_epoch(d, idle)))
        elif oi is not None:
            prepare.append(change(DELETE, oi))
    # Tables without an epoch key (routing) change in place.
    for key in different:
        want = wanted[key]
        if want.table_id in tables.epoch_field:
            continue
        have = plain.get(key)
        if have is None:
            prepare.append(change(INSERT, want))
        elif not _same(have, want):
            prepare.append(change(MODIFY, want))
    for key, have in sorted(plain.items()):
        if key not in desired.entries:
            finish.append(change(DELETE, have))
    if held.clone is None:
        prepare.insert(0, Change(INSERT, _clone_entity(desired.clone), "clone_session"))
    elif held.clone != desired.clone:
        prepare.insert(0, Change(MODIFY, _clone_entity(desired.clone), "clone_session"))
    return SwitchPlan(
        desired.switch,
        tuple(prepare),
        change(MODIFY, tables.epoch_default(idle)) if flip_needed else None,
        tuple(finish),
        _diff(tables, desired, held, index),
        idle if flip_needed else e,
    )
