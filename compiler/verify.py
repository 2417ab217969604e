"""Stage 6 — translation validation: do the entries on the switches implement the policy?

A proof of everything goes rule by rule first (compiler/rule_proof.py: per ToR, each
rule's entries against the rule, over sets of hosts); what that does not settle is proven
pair by pair, as below, which is also the whole proof with `exact` (`verify --by-pairs`).

For every sending host, every destination address class, every protocol, every class of
source and destination ports and every class of TCP flags, one representative packet is
walked through the fabric (compiler/evaluate.py: every hop's tables, as the switches
execute them) and its fate compared with the policy semantics (compiler/semantics.py).
Classes are cut where either side can tell values apart: the host addresses, every address
set of the policy and every prefix in the tables; for ports and flags, the ranges of the
policy rules and of the `policy` entries that can match between that host and that
destination on that path. Inside a class neither side can change its answer, so checking
one packet per class is checking them all: the result is a proof, not a sample.

The proof goes hop by hop, so that it scales: a triple (sender, destination class,
protocol) is proven when routing takes it to its host (or nowhere), and each hop's `policy`
decisions agree with the policy's — exactly on the ToRs that judge it (source, and the
destination's ToR), at least wherever the policy allows on the others (spines) — for then
the end-to-end verdict is the policy's too. A hop's decisions depend only on the `policy`
entries its identities and protocol meet, and the policy's only on the rules of the flow (those
matching it forward and those whose flows it answers), so each such check runs once and
serves every triple that asks it again. A triple that fails it, or takes an unusual path
(a loop, the wrong host, a drop before a policy table), is walked class by class as above,
which finds and reports the same counterexamples as ever.

Spoofing is checked apart: on every host port, every source address class other than the
host's own must be refused by `src_identity` (a miss or an explicit drop).

Spines out of service (`inventory.down`) forward nothing: a packet routed to one is lost.
A host whose ToR has no live path to the sender's (every spine between them down) counts
as no host at all: no tables could deliver to it, so a packet to it that goes nowhere
contradicts nothing, and one delivered anywhere is a wrong destination.

A difference is a `Counterexample`: the packet, where it went (or the hop, table and entry
that stopped it), and the policy's decision with the rule and line behind it.

Rate limits: a packet an allow with `rate R` decides is allowed up to R packets/s, not
always. The proof holds for it when every ToR that judges it decides with a
`permit_metered` entry whose meter config is the one R gives (compiler.entries.
meter_for_rate); a missing, unconfigured or different meter, or a meter on a packet the
policy allows without a rate, is a `meter-source-tor` / `meter-destination-tor`
counterexample. What the meter then does with real packets is the data plane's part
(tests/test_meters.py, tests/test_rate_mininet.py), not this proof's.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar, cast

from compiler.addresses import Interval
from compiler.differential import (
    OverlayChange,
    PairScope,
    Retag,
    ScopeBuilder,
    changed_rules,
    changed_tables,
    overlay_change,
    prefix_interval,
    retags,
    same_inventory,
)
from compiler.emit import entry_text
from compiler.entries import FieldMatch, MeterConfig, SwitchTables, TableEntry, meter_for_rate
from compiler.evaluate import (
    MAX_HOPS,
    Fabric,
    IndexedSwitch,
    PacketFields,
    PathResult,
    SwitchResult,
    evaluate,
    fabric_links,
    lookup,
)
from compiler.inventory import Host, Inventory
from compiler.memo import ByObject, ByPlace, also_forget, collection_paused
from compiler.model import ALL_PORTS, Action, Policy, PolicyRule
from compiler.placement import placement
from compiler.protocols import (
    ICMP_ECHO_REPLY_RANGE,
    ICMP_ECHO_REQUEST_RANGE,
    MAX_PORT,
    OTHER_PROTOCOL,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
)
from compiler.rule_proof import (
    ByRules,
    forget_proofs,
    holds_proof,
    prove_ahead,
    prove_by_difference,
    prove_by_rules,
)
from compiler.semantics import (
    EPHEMERAL_PORT,
    Decision,
    PolicySemantics,
    bits,
    protocol_of,
    semantics_of,
)
from p4src.spec import NO_TAGS, PIPELINE

MAX_ADDRESS = (1 << 32) - 1
_IDENTITY_FIELDS = ("epoch", "src_tags", "dst_tags", "protocol")  # fixed by a packet's hop
_PROTO_NAME = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp"}
_WIDTH = {k.name: k.bits for t in PIPELINE.tables for k in t.keys}
_Judged = tuple[int, list[tuple[tuple[FieldMatch, ...], TableEntry]]]


@dataclass(frozen=True, slots=True)
class Counterexample:
    kind: str  # allowed-by-tables | denied-by-tables | wrong-destination | loop | spoof-accepted
    sender: str
    packet: PacketFields
    path: PathResult | None
    expected: str  # what the policy says, with the rule and line
    observed: str  # what the tables do, with the hop, table and entry

    def describe(self) -> str:
        p = self.packet
        proto = _PROTO_NAME.get(p.protocol, f"proto {p.protocol}")
        if p.protocol in (PROTO_TCP, PROTO_UDP):
            ports = f" {p.sport} -> {p.dport}"
            if p.protocol == PROTO_TCP:
                ports += f" flags {p.tcp_flags:#04x}"
        elif p.protocol == PROTO_ICMP:
            ports = f" type {p.icmp_type} code {p.icmp_code}"
        else:
            ports = ""
        head = f"{self.kind}: from {self.sender}: {_ip(p.src)} -> {_ip(p.dst)} {proto}{ports}"
        return f"{head}\n    policy: {self.expected}\n    tables: {self.observed}"

    def to_json(self) -> dict[str, object]:
        p = self.packet
        return {
            "kind": self.kind,
            "sender": self.sender,
            "packet": {
                "src": _ip(p.src),
                "dst": _ip(p.dst),
                "protocol": p.protocol,
                "sport": p.sport,
                "dport": p.dport,
                "tcp_flags": p.tcp_flags,
                "icmp_type": p.icmp_type,
                "icmp_code": p.icmp_code,
            },
            "policy": self.expected,
            "tables": self.observed,
        }


@dataclass(frozen=True, slots=True)
class MeteredRule:
    """A `rate` allow: what verify treats as allowed up to the rate, with the meter the
    tables must carry for that to hold."""

    rule_id: int
    line: int
    rule: str
    rate_pps: int
    meter: MeterConfig

    def to_json(self) -> dict[str, object]:
        return {
            "rule_id": self.rule_id,
            "line": self.line,
            "rule": self.rule,
            "rate_pps": self.rate_pps,
            "meter": self.meter.to_json(),
        }


@dataclass
class VerifyResult:
    classes: int = 0  # packet classes walked end to end
    spoof_classes: int = 0  # (host port, source class) pairs checked
    counterexamples: list[Counterexample] = field(default_factory=list)
    seconds: float = 0.0
    metered_classes: int = 0  # allowed classes whose deciding rule has a rate
    metered: list[MeteredRule] = field(default_factory=list)  # the policy's rate limits
    scope: tuple[str, ...] | None = None  # differential: the ToRs whose packets were proven
    pairs: int | None = None  # differential by pairs: the (sender, destination class) pairs
    by_rules: ByRules | None = None  # what went rule by rule (rule_proof.py), if any did

    def metered_note(self) -> list[str]:
        """What the proof says about rate limits, one line per metered allow."""
        return [
            f"metered: rule {m.rule_id} (line {m.line}) `{m.rule}` is verified as allowed up "
            f"to {m.rate_pps} pps: every ToR entry that decides its packets carries the meter "
            f"{m.meter.describe()}"
            for m in self.metered
        ]

    @property
    def proven(self) -> bool:
        return not self.counterexamples


def _ip(value: int) -> str:
    return ".".join(str((value >> s) & 0xFF) for s in (24, 16, 8, 0))


def _cuts(intervals: Iterable[tuple[int, int]], top: int) -> set[int]:
    out = set()
    for lo, hi in intervals:
        out.add(lo)
        if hi < top:
            out.add(hi + 1)
    return out


@functools.lru_cache(maxsize=1 << 14)
def _set_cuts(intervals: tuple[tuple[int, int], ...]) -> frozenset[int]:
    """`_cuts` of a rule's address set (Verifier.address_classes)."""
    return frozenset(_cuts(intervals, MAX_ADDRESS))


def _address_cuts(entries: Iterable[TableEntry]) -> frozenset[int]:
    """Where the address matches of `entries` begin and end (+1): `_cuts` of every
    src_addr and dst_addr match, a prefix (most of them) worked out inline."""
    out: set[int] = set()
    for entry in entries:
        for m in entry.matches:
            if m.field != "src_addr" and m.field != "dst_addr":
                continue
            if m.kind == "lpm":
                out.add(m.value)
                end = m.value + (1 << (32 - m.arg))
                if end <= MAX_ADDRESS:
                    out.add(end)
            else:
                out |= _cuts(_match_intervals(m, 32), MAX_ADDRESS)
    return frozenset(out)


def _classes(cuts: set[int], top: int) -> list[tuple[int, int]]:
    starts = sorted(cuts | {0})
    return [(s, (starts[i + 1] - 1) if i + 1 < len(starts) else top) for i, s in enumerate(starts)]


def _match_intervals(m: FieldMatch, bits: int) -> list[tuple[int, int]]:
    """The values a match covers, as intervals (ternary: prefix masks exactly; others by
    the blocks of their lowest mask bit, which is exact too)."""
    top = (1 << bits) - 1
    if m.kind == "exact":
        return [(m.value, m.value)]
    if m.kind == "range":
        return [(m.value, m.arg)]
    if m.kind == "lpm":
        size = 1 << (bits - m.arg)
        return [(m.value, m.value + size - 1)]
    low = m.arg & -m.arg if m.arg else 1 << bits
    block = low - 1  # the bits below the lowest mask bit are free: blocks of `low` values
    high_mask = m.arg & ~block & top
    out = []
    for start in range(0, top + 1, low):
        if start & high_mask == m.value & high_mask:
            out.append((start, start + block))
        if len(out) > 4096:
            break
    return out


def _first(item: tuple[int, TableEntry]) -> int:
    return item[0]


class _AddressIndex:
    """One table's entries bucketed by the address classes (cut at every table prefix) their
    `field` can match, in table order: a lookup scans one bucket, not the table, and finds
    the same winner (every other entry misses the address)."""

    def __init__(
        self, entries: list[TableEntry], field: str, starts: list[int], width: int = 32
    ) -> None:
        self.starts = starts
        # Only the classes some entry reaches have a bucket (most of a floor's classes are
        # another ToR's hosts); the entries with no bound on `field` are kept apart, with
        # their positions, to be merged in table order (`lookup` keeps the first of a tie).
        self.buckets: dict[int, list[TableEntry]] = {}
        self.anywhere: list[tuple[int, TableEntry]] = []
        self._positions: dict[int, int] = {}  # id(entry) -> position, when some are anywhere
        for pos, entry in enumerate(entries):
            m = entry.match(field)
            spans = _match_intervals(m, width) if m is not None else []
            if m is None or len(spans) > 4096:  # unbounded: a candidate everywhere
                self.anywhere.append((pos, entry))
                continue
            for lo, hi in spans:
                first = bisect.bisect_right(starts, lo) - 1
                for k in range(first, bisect.bisect_right(starts, hi)):
                    self.buckets.setdefault(k, []).append(entry)
        if self.anywhere:
            self._positions = {id(e): pos for pos, e in enumerate(entries)}

    def lookup(self, address: int, values: dict[str, int]) -> TableEntry | None:
        bucket = self.buckets.get(bisect.bisect_right(self.starts, address) - 1, [])
        if self.anywhere:
            where = self._positions
            merged = sorted([(where[id(e)], e) for e in bucket] + self.anywhere, key=_first)
            bucket = [e for _pos, e in merged]
        return lookup(bucket, values)


_T = TypeVar("_T")


class _SliceIndex(Generic[_T]):
    """Items (in their order) by the match their entry has on an identity field: the items
    a vector matches are those without a match there and, per ternary mask, those whose
    value is the vector's under that mask — a few dict lookups instead of a test per item
    (any other kind of match, as a corrupted table may have, is tested one by one)."""

    def __init__(self, items: list[_T], matches: Iterable[FieldMatch | None]) -> None:
        """`matches`: each item's match on the field (None: none)."""
        self.items = items
        self.anywhere: list[int] = []  # positions of items with no match on `field`
        self.by_mask: dict[int, dict[int, list[int]]] = {}
        self.tested: list[tuple[int, FieldMatch]] = []
        for pos, m in enumerate(matches):
            if m is None:
                self.anywhere.append(pos)
            elif m.kind == "ternary":
                self.by_mask.setdefault(m.arg, {}).setdefault(m.value, []).append(pos)
            else:
                self.tested.append((pos, m))

    def matching(self, vector: int) -> list[_T]:
        return [self.items[p] for p in self.positions(vector)]

    def positions(self, vector: int) -> list[int]:
        """The positions of the items `vector` matches, in order."""
        found = [self.anywhere]
        for mask, values in self.by_mask.items():
            if (hit := values.get(vector & mask)) is not None:
                found.append(hit)
        if self.tested:
            found.append([pos for pos, m in self.tested if m.covers(vector)])
        return found[0] if len(found) == 1 else sorted(itertools.chain(*found))


_V = TypeVar("_V")


class _ByEntries:
    """Values derived from a table's list of entry objects, found again when a later build
    holds the same objects in the same order: the compiler makes identity and routing
    entries once per value (compiler/lower.py), and an incremental compile keeps a changed
    ToR's when its tags stay (`_retagged`), so an index, the tags or the address cuts of
    the same objects are the same. The lists are held with their values, so their ids stay
    theirs while remembered; the least recently used go first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[Hashable, tuple[int, ...]], tuple[list[TableEntry], Any]]
        self._items = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: Hashable, entries: list[TableEntry], make: Callable[[], _V]) -> _V:
        """`make()`, derived from `entries` (a `kind` of value), or what it gave before."""
        key = (kind, tuple(map(id, entries)))
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return cast(_V, found[1])
        value = make()
        with self._lock:
            self._items[key] = (list(entries), value)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# A few values per table of every switch, of a build and the one before it.
_BY_ENTRIES = _ByEntries(2048)
also_forget(_BY_ENTRIES.clear)
# Tables bucketed by address class (`_AddressIndex`): those of the last builds' changed
# switches.
_ADDRESS_INDEXES = _ByEntries(256)


class _Derived:
    """What a proof derives from one switch's tables alone, whatever the policy: the
    switch indexed for walking packets, the address cuts and protocols of its entries, its
    tables bucketed by address class, its policy entries by source identity. Kept for the
    next proof over the same `SwitchTables` object (DERIVED): a long-running controller
    proves build after build, and an incremental compile passes the switches a change did
    not touch on as the same objects, so a quarantine's proof indexes one ToR, not all."""

    def __init__(self, tables: SwitchTables) -> None:
        self.indexed = IndexedSwitch.of(tables)
        self.cuts = frozenset().union(
            *(
                _BY_ENTRIES.get("cuts", entries, functools.partial(_address_cuts, entries))
                for entries in self.indexed.by_table.values()
            )
        )
        self.protocols = frozenset(
            m.value
            for e in self.indexed.by_table.get("policy", [])
            for m in e.matches
            if m.field == "protocol" and m.kind == "ternary" and m.arg == 0xFF
        )
        self._addresses: dict[tuple[str, str], tuple[tuple[int, ...], _AddressIndex]] = {}
        self._parts: list[_PolicyEntry] | None = None  # `policy`, taken apart (`_by_protocol`)
        self._by_proto: dict[int, _ProtocolIndex] = {}
        self._sources: dict[tuple[int, int, int], frozenset[int]] = {}
        self._destinations: dict[tuple[int, int], frozenset[int]] = {}

    def address_index(self, table: str, field: str, starts: tuple[int, ...]) -> _AddressIndex:
        """`table` bucketed by the address classes starting at `starts` (built once per
        partition: a new partition, e.g. a rule's new prefix, builds it again)."""
        found = self._addresses.get((table, field))
        if found is not None and (found[0] is starts or found[0] == starts):
            return found[1]
        entries = self.indexed.by_table.get(table, [])
        index = _ADDRESS_INDEXES.get(
            (field, starts), entries, lambda: _AddressIndex(entries, field, list(starts))
        )
        self._addresses[(table, field)] = (starts, index)
        return index

    def meeting(
        self, epoch: int, src_tags: int, dst_tags: int, proto: int
    ) -> list[tuple[tuple[FieldMatch, ...], TableEntry]]:
        """The policy entries that can match these identities and protocol, by priority,
        with the matches left to decide (ports, flags): those the source identity can meet
        and the destination identity can meet, each found once per identity (a source
        meets a few destinations only) and intersected."""
        index = self._by_protocol(proto)
        src = self._sources.get((epoch, src_tags, proto))
        if src is None:
            values = {"epoch": epoch, "src_tags": src_tags}
            src = self._sources[(epoch, src_tags, proto)] = frozenset(
                p
                for p in index.src.positions(src_tags)
                if not (tests := index.parts[p].tests)
                or all(m.covers(values[m.field]) for m in tests)
            )
        dst = self._destinations.get((dst_tags, proto))
        if dst is None:
            dst = self._destinations[(dst_tags, proto)] = frozenset(index.dst.positions(dst_tags))
        parts = index.parts
        return [(parts[p].varying, parts[p].entry) for p in sorted(src & dst)]

    def _by_protocol(self, proto: int) -> _ProtocolIndex:
        """The `policy` entries that can match protocol `proto`, highest priority first
        (ties in table order), indexed by their src_tags and their dst_tags matches: each
        entry taken apart once, for every identity."""
        found = self._by_proto.get(proto)
        if found is None:
            if self._parts is None:
                entries = sorted(self.indexed.by_table.get("policy", []), key=_minus_priority)
                self._parts = [_taken_apart(e) for e in entries]
            parts = [
                p
                for p in self._parts
                if p.protocol == proto
                or p.protocol == _ANY_PROTOCOL
                or (p.protocol == _TESTED and all(m.covers(proto) for m in p.protocols))
            ]
            found = self._by_proto[proto] = _ProtocolIndex(
                parts,
                _SliceIndex(parts, [p.src_tags for p in parts]),
                _SliceIndex(parts, [p.dst_tags for p in parts]),
            )
        return found


@dataclass(frozen=True, slots=True)
class _ProtocolIndex:
    """A switch's `policy` entries that can match one protocol, by priority, and the
    positions among them each source and each destination identity can meet."""

    parts: list[_PolicyEntry]
    src: _SliceIndex[_PolicyEntry]
    dst: _SliceIndex[_PolicyEntry]


def _minus_priority(entry: TableEntry) -> int:
    return -entry.priority


def _taken_apart(entry: TableEntry) -> _PolicyEntry:
    """_PolicyEntry.of, once per entry object (_TAKEN_APART)."""
    found = _TAKEN_APART.get(id(entry))
    if found is None or found.entry is not entry:
        if len(_TAKEN_APART) >= _TAKEN_APART_MAX:
            _TAKEN_APART.clear()
        found = _TAKEN_APART[id(entry)] = _PolicyEntry.of(entry)
    return found


_ANY_PROTOCOL, _TESTED = -1, -2  # _PolicyEntry.protocol: no protocol match; another match


class _PolicyEntry(NamedTuple):
    """A `policy` entry taken apart by the fields a hop fixes: its protocol (the one
    number it matches, or _ANY_PROTOCOL, or _TESTED: `protocols` are tested), its (first)
    src_tags and dst_tags matches, which the slice indexes take; the rest of those fields'
    matches, tested per source identity (`tests`: epoch, and any second src_tags match a
    corrupted entry may carry); and the other matches (ports, flags), left to decide per
    packet class. A tuple: made for every `policy` entry of every switch a proof walks."""

    entry: TableEntry
    protocol: int
    protocols: tuple[FieldMatch, ...]
    src_tags: FieldMatch | None
    dst_tags: FieldMatch | None
    tests: tuple[FieldMatch, ...]
    varying: tuple[FieldMatch, ...]

    @staticmethod
    def of(entry: TableEntry) -> _PolicyEntry:
        protocols: list[FieldMatch] = []
        tests: list[FieldMatch] = []
        varying: list[FieldMatch] = []
        src = dst = None
        for m in entry.matches:
            name = m.field
            if name == "protocol":
                protocols.append(m)
            elif name == "src_tags" and src is None:
                src = m
            elif name == "dst_tags":
                dst = dst or m
            elif name in _IDENTITY_FIELDS:  # epoch, a second src_tags
                tests.append(m)
            else:
                varying.append(m)
        protocol = _TESTED
        if not protocols:
            protocol = _ANY_PROTOCOL
        elif len(protocols) == 1 and protocols[0].kind == "ternary" and protocols[0].arg == 0xFF:
            protocol = protocols[0].value
        return _PolicyEntry(
            entry, protocol, tuple(protocols), src, dst, tuple(tests), tuple(varying)
        )


# Each `policy` entry taken apart, by object (it holds its entry, so the id stays its
# own): a ToR compiled again keeps its unchanged rules' entries as the same objects.
_TAKEN_APART: dict[int, _PolicyEntry] = {}
_TAKEN_APART_MAX = 250_000  # two builds of the 10k-rule floor (109,036 `policy` entries each)
also_forget(_TAKEN_APART.clear)


@dataclass(frozen=True, slots=True)
class _Cut:
    """What a proof's address classes are cut from: the inventory's hosts, the rules'
    address sets (by identity) and each switch's derived tables."""

    hosts: tuple[Host, ...]
    sides: dict[int, tuple[tuple[int, int], ...]]  # held: their ids stay theirs
    derived: dict[str, _Derived]


class _DerivedCache:
    """`_Derived` per `SwitchTables` object (compiler/memo.py), and the last address
    partition, shared so that indexes built for it are found by identity."""

    def __init__(self, spare: int = 16) -> None:
        self._derived: ByObject[SwitchTables, _Derived] = ByObject(spare)
        self._starts: tuple[int, ...] = ()
        self._lock = threading.Lock()
        # The last classes cut, what they were cut from and at which addresses.
        self._cut: tuple[_Cut, frozenset[int], list[tuple[int, int]]] | None = None

    def classes_within(self, made: _Cut) -> list[tuple[int, int]] | None:
        """The last classes cut, when they cut at every address `made` asks for (its sets
        and tables are those of the last, or cut within its cuts: a quarantine's carve and
        overlay, a release): still exact for every set and table, if finer than needed."""
        with self._lock:
            last = self._cut
        if last is None:
            return None
        was, cuts, classes = last
        if made.hosts is not was.hosts and made.hosts != was.hosts:
            return None
        for key, intervals in made.sides.items():
            if was.sides.get(key) is not intervals and not _set_cuts(intervals) <= cuts:
                return None
        for name, derived in made.derived.items():
            if was.derived.get(name) is not derived and not derived.cuts <= cuts:
                return None
        with self._lock:  # what they were cut from, now: the next asks about fewer sets
            self._cut = (made, cuts, classes)
        return classes

    def cut(self, made: _Cut, cuts: frozenset[int], classes: list[tuple[int, int]]) -> None:
        with self._lock:
            self._cut = (made, cuts, classes)

    def of(self, tables: SwitchTables) -> _Derived:
        return self._derived.get(tables, _Derived)

    def hold(self, count: int) -> None:
        """Room for `count` switches proven at once (ByObject.hold)."""
        self._derived.hold(count)

    def starts(self, starts: list[int]) -> tuple[int, ...]:
        """The address partition as one shared tuple when it equals the last one."""
        new = tuple(starts)
        with self._lock:
            if new == self._starts:
                return self._starts
            self._starts = new
        return new

    def clear(self) -> None:
        """Forget everything proofs derived (and the rules' meaning digests)."""
        self._derived.clear()
        _ADDRESS_INDEXES.clear()
        _BY_ENTRIES.clear()
        _TAKEN_APART.clear()
        _meaning.cache_clear()
        _set_cuts.cache_clear()
        with self._lock:
            self._starts = ()
            self._cut = None


DERIVED = _DerivedCache()


@dataclass(frozen=True, slots=True)
class _Hop:
    switch: str
    port: int  # ingress
    entries: list[tuple[tuple[FieldMatch, ...], TableEntry]] | None  # None: src_identity drops
    egress: int | None  # where routing sends the packet (None: no route)
    loop: bool = False


def _deciding(hop: _Hop, values: dict[str, int]) -> TableEntry | None:
    """The `policy` entry of `hop` a packet with these port/flag values hits (None: the
    table's default, deny, or src_identity already dropped it)."""
    return None if hop.entries is None else _first_hit(hop.entries, values)


_Bounds = tuple[int, int, int, int, int, int, TableEntry]  # sport, dport, flags mask/value


def _bounds(entries: list[tuple[tuple[FieldMatch, ...], TableEntry]]) -> list[_Bounds] | None:
    """The port and flag matches of `entries` as plain bounds (None if one is no interval),
    for `_first_bound`: the same first hit, without a dict per packet."""
    out = []
    for varying, entry in entries:
        ports = {"l4_src_port": (0, MAX_PORT), "l4_dst_port": (0, MAX_PORT)}
        mask = value = 0
        for m in varying:
            if m.field == "tcp_flags" and m.kind == "ternary":
                mask, value = m.arg, m.value & m.arg
                continue
            spans = _match_intervals(m, 16) if m.field in ports else []
            if len(spans) != 1:
                return None
            ports[m.field] = spans[0]
        (slo, shi), (dlo, dhi) = ports["l4_src_port"], ports["l4_dst_port"]
        out.append((slo, shi, dlo, dhi, mask, value, entry))
    return out


def _first_bound(bounds: list[_Bounds], sport: int, dport: int, flags: int) -> TableEntry | None:
    for slo, shi, dlo, dhi, mask, value, entry in bounds:
        if slo <= sport <= shi and dlo <= dport <= dhi and flags & mask == value:
            return entry
    return None


def _first_hit(
    entries: list[tuple[tuple[FieldMatch, ...], TableEntry]], values: dict[str, int]
) -> TableEntry | None:
    """The first of `entries` (by priority) whose remaining matches cover `values`."""
    for varying, entry in entries:
        if all(m.covers(values[m.field]) for m in varying):
            return entry
    return None


def _passes(entry: TableEntry | None) -> bool:
    return entry is not None and entry.action in ("permit", "permit_metered")


def _meter_applied(entry: TableEntry) -> MeterConfig | None:
    """The meter a permitting entry subjects packets to: a `permit_metered` entry's config
    (none written: unmetered, every packet green); `permit` runs no meter."""
    return entry.meter if entry.action == "permit_metered" else None


def _meter_wanted(decision: Decision) -> MeterConfig | None:
    """The meter the policy puts on an allowed packet: its deciding allow's rate (replies
    of a metered allow are not metered)."""
    rule = decision.rule
    if decision.reason != "allow" or rule is None or rule.rate_pps is None:
        return None
    return meter_for_rate(rule.rate_pps)


def _islands(inventory: Inventory) -> dict[str, str]:
    """Each switch's island: the switches it is linked to, with the down spines gone (the
    first of them by name)."""
    live = [s.name for s in inventory.switches if s.name not in inventory.down]
    parent = {name: name for name in sorted(live)}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for link in inventory.links:
        if link.a in parent and link.b in parent:
            a, b = sorted((root(link.a), root(link.b)))
            parent[b] = a
    return {name: root(name) for name in parent} | {n: n for n in inventory.down}


def _judge(loop: bool, delivered_to: str | None, target: Host | None, allowed: bool) -> list[str]:
    if loop:
        return ["loop"]
    if delivered_to is not None and (target is None or delivered_to != target.name):
        return ["wrong-destination"]
    if target is None:
        return []  # no host there: dropped, which no policy contradicts
    if delivered_to is not None and not allowed:
        return ["allowed-by-tables"]
    if delivered_to is None and allowed:
        return ["denied-by-tables"]
    return []


class Verifier:
    def __init__(
        self, policy: Policy, inventory: Inventory, switches: Mapping[str, SwitchTables]
    ) -> None:
        self.policy = policy
        self.inventory = inventory
        self.switches = switches
        DERIVED.hold(len(switches))
        self.host_by_ip = {h.ip: h for h in inventory.hosts}
        self._island = _islands(inventory)
        self._epoch = {
            name: next((dict(d.params)["value"] for d in sw.defaults if d.table == "epoch"), 0)
            for name, sw in switches.items()
        }
        self._routes: dict[
            tuple[str, int], list[tuple[str, int, tuple[int, int, int] | None, int | None, bool]]
        ] = {}
        self._by_dst: dict[tuple[str, str, int], int | None] = {}
        self._by_source: dict[tuple[str, int, int, int], dict[int, _Judged]] = {}
        self._entry_sets: dict[tuple[int, ...], _Judged] = {}
        self._classes: list[tuple[int, int]] | None = None
        self._starts: tuple[int, ...] | None = None  # address classes' first addresses
        self._indexes: dict[tuple[str, str], _AddressIndex] = {}
        self._src_ids: dict[tuple[str, int, int], tuple[int, TableEntry | None]] = {}
        self._hop_checks: dict[tuple[int, bool, int], tuple[bool, bool, int, int]] = {}
        self._hops: dict[
            tuple[str, tuple[int, int, int], bool, int, int], tuple[bool, bool, int, int]
        ] = {}
        self._rule_sets: dict[int, tuple[int, int]] = {}  # atom -> (as source, as destination)
        self._port_rules: dict[tuple[int, str], list[tuple[int, int]]] = {}
        self._rule_ids: dict[tuple[int, int, int], int] = {}
        self._decided: dict[tuple[int, int, int, int], Decision] = {}
        # Quarantined hosts (address -> their ToR): only their own ToR holds the overlay.
        q = policy.quarantine
        self._cut = {a: h.switch for a in (q.hosts if q else ()) if (h := self.host_by_ip.get(a))}

    # What only a walk by pairs needs (a proof by rules from the last proof needs none of
    # it): made on first use.

    @functools.cached_property
    def sem(self) -> PolicySemantics:
        return semantics_of(self.policy, tuple(h.ip for h in self.inventory.hosts))

    @functools.cached_property
    def _derived(self) -> dict[str, _Derived]:
        return {name: DERIVED.of(t) for name, t in self.switches.items()}

    @functools.cached_property
    def fabric(self) -> Fabric:
        indexed = {n: d.indexed for n, d in self._derived.items()}
        return Fabric(self.switches, self.inventory, indexed)

    @functools.cached_property
    def _other(self) -> Verifier | None:
        """The uncarved policy's verifier over the same tables, for the ToRs other than
        the quarantined hosts' own."""
        if not self._cut:
            return None
        return Verifier(self.policy.uncarved(), self.inventory, self.switches)

    @functools.cached_property
    def _uncarved(self) -> PolicySemantics | None:
        return self._other.sem if self._other is not None else None

    # -- address classes ---------------------------------------------------------------

    def address_classes(self) -> list[tuple[int, int]]:
        if self._classes is not None:
            return self._classes
        # Each address set once (rules naming a service share its intervals: 20,000 sides
        # of a 10k-rule policy are about 1,400 sets), its cuts kept by value across proofs.
        sides = {id(iv): iv for r in self.policy.rules for iv in (r.src.intervals, r.dst.intervals)}
        made = _Cut(self.inventory.hosts, sides, self._derived)
        classes = DERIVED.classes_within(made)
        if classes is None:
            cuts: set[int] = _cuts([(h.ip, h.ip) for h in self.inventory.hosts], MAX_ADDRESS)
            for intervals in sides.values():
                cuts |= _set_cuts(intervals)
            for derived in self._derived.values():
                cuts |= derived.cuts
            classes = _classes(cuts, MAX_ADDRESS)
            DERIVED.cut(made, frozenset(cuts), classes)
        self._classes = classes
        self._starts = DERIVED.starts([lo for lo, _hi in classes])
        return classes

    def _index(self, switch: str, table: str, field: str) -> _AddressIndex:
        """`table` of `switch` bucketed by address class of `field`, built on first use."""
        key = (switch, table)
        found = self._indexes.get(key)
        if found is None:
            if self._starts is None:
                self.address_classes()
            assert self._starts is not None
            found = self._indexes[key] = self._derived[switch].address_index(
                table, field, self._starts
            )
        return found

    # -- the path a destination's packets take, and what each hop can decide -------------

    def plan(self, sender: Host, dst: int, proto: int) -> list[_Hop]:
        """Every hop routing takes `sender`'s packets to `dst` through, with the `policy`
        entries each can judge them by (those whose fixed fields match): the port and
        flag classes of a packet then only pick among those."""
        hops = []
        for switch, port, idents, egress, loop in self._route(sender, dst):
            entries = None if idents is None else self._policy_entries(switch, *idents, proto)
            hops.append(_Hop(switch, port, entries, egress, loop))
        return hops

    def _route(
        self, sender: Host, dst: int, keep: bool = True
    ) -> list[tuple[str, int, tuple[int, int, int] | None, int | None, bool]]:
        """(switch, ingress port, (epoch, src tags, dst tags) or None if src_identity drops
        it, egress port, loops here) per hop; the same for every protocol, so cached unless
        `keep` is False (the fast proof asks once per pair: keeping them all costs memory)."""
        key = (sender.name, dst)
        cached = self._routes.get(key)
        if cached is not None:
            return cached
        hops: list[tuple[str, int, tuple[int, int, int] | None, int | None, bool]] = []
        switch, port = sender.switch, sender.port
        seen: set[tuple[str, int]] = set()
        while True:
            if (switch, port) in seen or len(hops) >= MAX_HOPS:
                hops.append((switch, port, None, None, True))
                break
            seen.add((switch, port))
            epoch = self._epoch[switch]
            src_tags = self._src_tags(switch, epoch, port, sender.ip)
            idents = None
            if src_tags is not None:
                dst_tags = self._lookup(switch, "dst_identity", epoch, dst) or 0
                idents = (epoch, src_tags, dst_tags)
            egress = self._lookup(switch, "routing", epoch, dst)
            hops.append((switch, port, idents, egress, False))
            if egress is None or (switch, egress) in self.fabric.host_at:
                break
            if (switch, egress) not in self.fabric.peer:
                break
            switch, port = self.fabric.peer[(switch, egress)]
        if keep:
            self._routes[key] = hops
        return hops

    def _lookup(self, switch: str, table: str, epoch: int, dst: int) -> int | None:
        """dst_identity's tags (0 on a miss) or routing's egress port (None), cached."""
        key = (switch, table, dst)
        if key not in self._by_dst:
            hit = self._index(switch, table, "dst_addr").lookup(
                dst, {"epoch": epoch, "dst_addr": dst}
            )
            if table == "dst_identity":
                self._by_dst[key] = dict(hit.params)["tags"] if hit else 0
            else:
                self._by_dst[key] = (
                    dict(hit.params)["port"] if hit and hit.action == "forward" else None
                )
        return self._by_dst[key]

    def _src_tags(self, switch: str, epoch: int, port: int, src: int) -> int | None:
        """src_identity's identity for a source on an ingress port (None: dropped), cached."""
        key = (switch, port, src)
        found = self._src_ids.get(key)
        if found is None:
            values = {"epoch": epoch, "ingress_port": port, "src_addr": src}
            hit = self._index(switch, "src_identity", "src_addr").lookup(src, values)
            tags = dict(hit.params)["tags"] if hit and hit.action == "set_src_tags" else -1
            found = self._src_ids[key] = (tags, hit)
        return None if found[0] < 0 else found[0]

    # -- what the proof by rules reads (compiler/rule_proof.py) --------------------------

    def epoch(self, switch: str) -> int:
        return self._epoch[switch]

    def island(self, switch: str) -> str:
        return self._island[switch]

    def links(
        self,
    ) -> tuple[Mapping[tuple[str, int], tuple[str, int]], Mapping[tuple[str, int], str]]:
        """(switch, port) -> the (switch, port) at the other end; -> the host there."""
        return fabric_links(self.inventory)

    def class_starts(self) -> tuple[int, ...]:
        """The address classes' first addresses."""
        self.address_classes()
        assert self._starts is not None
        return self._starts

    def source_tags(self, switch: str, port: int, src: int) -> int | None:
        return self._src_tags(switch, self._epoch[switch], port, src)

    def destination_tags(self, switch: str, dst: int) -> int:
        return self._lookup(switch, "dst_identity", self._epoch[switch], dst) or 0

    def egress(self, switch: str, dst: int) -> int | None:
        return self._lookup(switch, "routing", self._epoch[switch], dst)

    def _policy_entries(
        self, switch: str, epoch: int, src_tags: int, dst_tags: int, proto: int
    ) -> list[tuple[tuple[FieldMatch, ...], TableEntry]]:
        """The policy entries that can match these identities and protocol, by priority,
        with the matches left to decide (ports, flags); cached."""
        return self._judged(switch, epoch, src_tags, dst_tags, proto)[1]

    def _judged(self, switch: str, epoch: int, src_tags: int, dst_tags: int, proto: int) -> _Judged:
        """`_policy_entries` with a number naming that list of entries: identities whose
        packets meet the same entries are judged alike, so one check serves them all."""
        by_dst = self._by_source.get((switch, epoch, src_tags, proto))
        if by_dst is None:
            by_dst = self._by_source[(switch, epoch, src_tags, proto)] = {}
        found = by_dst.get(dst_tags)
        if found is None:
            entries = self._derived[switch].meeting(epoch, src_tags, dst_tags, proto)
            ident = tuple(id(e) for _v, e in entries)
            found = self._entry_sets.setdefault(ident, (len(self._entry_sets), entries))
            by_dst[dst_tags] = found
        return found

    def _rule_ports(self, src: int, dst: int, proto: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = [(EPHEMERAL_PORT, EPHEMERAL_PORT)]
        for r in self.policy.rules:
            if r.proto not in (proto, "ip") or r.ports == ALL_PORTS:
                continue
            if (src in r.src and dst in r.dst) or (dst in r.src and src in r.dst):
                out += r.ports
        return out

    # -- the proof ---------------------------------------------------------------------

    def run(
        self,
        focus: Collection[int] | None = None,
        scope: tuple[str, ...] | None = None,
        pairs: PairScope | None = None,
        exact: bool = False,
        tors: Collection[str] | None = None,
        by_rules: ByRules | None = None,
    ) -> VerifyResult:
        """The proof; with `focus` (host addresses), only the packets from or to them (and
        only their ports' spoofing) — what a change that touches only their packets needs
        (`scope`: the ToRs whose hosts they are, when that is how they were chosen); with
        `pairs`, only those (sender, destination class) pairs and those hosts' spoofing
        (compiler/differential.py). A proof of everything goes rule by rule first
        (compiler/rule_proof.py) and walks by pairs only what that leaves, unless `exact`:
        every pair walked; so does a proof of what `tors` judge (`focus`: their hosts).
        `by_rules`: what a proof by rules by difference proved (`pairs`: what it left)."""
        start = time.monotonic()
        result = VerifyResult(
            scope=scope, pairs=None if pairs is None else pairs.pairs(), by_rules=by_rules
        )
        spoof = focus  # the hosts whose ports' spoofing to prove (None: all)
        if pairs is not None:
            spoof = pairs.spoof
        elif (focus is None or tors is not None) and not exact:
            by_rules = result.by_rules = prove_by_rules(self, tors)
            pairs = by_rules.left or PairScope({}, frozenset())
        result.metered = [
            MeteredRule(r.id, r.span.line, r.describe(), r.rate_pps, meter_for_rate(r.rate_pps))
            for r in self.policy.rules
            if r.rate_pps is not None
        ]
        if pairs is not None and not pairs.masks and spoof is not None and not spoof:
            result.seconds = time.monotonic() - start  # nothing left to walk
            return result
        classes = self.address_classes()
        self._spoofing(classes, result, spoof)
        protocols = sorted(
            {protocol_of(c, self.sem.proto_classes) for c in self.sem.proto_classes}
            | {p for derived in self._derived.values() for p in derived.protocols}
        )
        atom_of = self.sem.addresses.atom_of
        protocols_rules = [(p, self.sem.proto_index[self.sem.proto_class(p)]) for p in protocols]
        every = [(lo, atom_of(lo)) for lo, _hi in classes]
        focused = every if focus is None else [(lo, a) for lo, a in every if lo in focus]
        island = self._island
        for sender in self.inventory.hosts:
            if pairs is not None:
                mask = pairs.masks.get(sender.ip, 0)
                if not mask:
                    continue
                targets = [every[i] for i in bits(mask)]
            else:
                targets = every if focus is None or sender.ip in focus else focused
            src_atom = atom_of(sender.ip)
            from_s, to_s = self._rule_set(src_atom)
            for lo, dst_atom in targets:
                target = self.host_by_ip.get(lo)
                if target is not None and target.name == sender.name:
                    continue
                if target is not None and island[target.switch] != island[sender.switch]:
                    target = None  # no live path (spines down): no tables could deliver it
                from_d, to_d = self._rule_set(dst_atom)
                forward, reverse = from_s & to_d, from_d & to_s  # the rules of its flows
                flows = (forward, reverse, src_atom, dst_atom)
                owners = frozenset(self._cut[a] for a in (sender.ip, lo) if a in self._cut)
                unproven = self._unproven(
                    sender, lo, target, flows, protocols_rules, result, owners
                )
                for proto in unproven:
                    self._check(sender, lo, target, proto, result)
        result.seconds = time.monotonic() - start
        return result

    def by_rules_from(
        self,
        old_policy: Policy,
        old_inventory: Inventory,
        old_switches: Mapping[str, SwitchTables],
    ) -> ByRules | None:
        """The proof by rules of this build from a build proven before in this process
        (compiler/rule_proof.py `prove_by_difference`), or None: prove it by pairs."""
        if not same_inventory(old_inventory, self.inventory):
            return None
        if old_policy.default_log != self.policy.default_log:
            return None
        return prove_by_difference(self, old_policy, old_switches)

    def pair_scope(
        self,
        old_policy: Policy,
        old_inventory: Inventory,
        old_switches: Mapping[str, SwitchTables],
    ) -> PairScope | None:
        """The pairs whose verdicts a change from a proven build (the old policy and
        tables) to this one can have touched, or None: prove everything
        (compiler/differential.py has the argument)."""
        if not same_inventory(old_inventory, self.inventory):
            return None
        if old_policy.default_log != self.policy.default_log:
            return None
        rules = changed_rules(old_policy, self.policy)
        if old_policy.quarantine is not None or self.policy.quarantine is not None:
            # ToRs other than a quarantined host's own judge by the uncarved policy
            rules += changed_rules(old_policy.uncarved(), self.policy.uncarved())
        return self._pairs_of([(r.src.intervals, r.dst.intervals) for r in rules], old_switches)

    def recorded_pair_scope(self, old: Recorded, record: ProofRecord) -> PairScope | None:
        """`pair_scope` from a build proven by another process, as the state directory
        keeps it (`Recorded`), this build's record being `record`: the changed rules are
        the keys whose meaning digests differ, each read off its addresses then and now —
        and with a quarantine in force in either build, the same for the uncarved rules,
        as `pair_scope` does. None (prove everything) when the floor or the default
        changed, or a changed rule's addresses are not kept."""
        before = old.record
        if (before.inventory, before.default_log) != (record.inventory, record.default_log):
            return None
        then = old.rule_sides()
        if then is None:
            return None
        sides = _changed_sides(then, _rule_sides(self.policy))
        if old.uncarved is not None or self.policy.quarantine is not None:
            uncarved = old.uncarved if old.uncarved is not None else then
            sides += _changed_sides(uncarved, _rule_sides(self.policy.uncarved()))
        return self._pairs_of(sides, old.switches)

    def _pairs_of(
        self, rules: Iterable[tuple[Sides, Sides]], old_switches: Mapping[str, SwitchTables]
    ) -> PairScope | None:
        """The pairs of changed rules (their source and destination addresses) and of the
        entries that differ from `old_switches`; None: prove everything."""
        changed = changed_tables(old_switches, self.switches)
        if changed is None:
            return None
        self.address_classes()
        assert self._starts is not None
        scope = ScopeBuilder(self._starts, self.inventory.hosts)
        for src, dst in rules:
            scope.flows(src, dst)
        for name, entries in changed.items():
            self._entries_scope(name, entries, scope, old_switches[name])
        return scope.scope()

    def quarantine_scope(self, host: Host, overlay: Iterable[TableEntry]) -> PairScope:
        """The pairs a new quarantine of `host` can let through, given that its ToR drops
        every packet from and to it that meets none of the `overlay` entries (the overlay
        without its catch-all denies; compiler/differential.py `outranked`): the pairs that
        can meet one of them, read off the ToR's identity entries, and the flows the
        (carved) policy still allows the host, forward and back. Every other pair of the
        host is dropped by the tables and denied by the policy; every other packet is
        judged as before (`only_overlay_changed`)."""
        self.address_classes()
        assert self._starts is not None
        scope = ScopeBuilder(self._starts, self.inventory.hosts)
        self._entries_scope(host.switch, list(overlay), scope)
        for rule in self.policy.rules:
            if rule.action is Action.ALLOW and (host.ip in rule.src or host.ip in rule.dst):
                scope.rule(rule)
        scope.spoof.add(host.ip)
        return scope.scope()

    def _entries_scope(
        self,
        switch: str,
        entries: list[TableEntry],
        scope: ScopeBuilder,
        old: SwitchTables | None = None,
    ) -> None:
        """Add the pairs that can meet these changed entries of `switch` (`old`: its tables
        before, when known: identity entries whose tags alone changed are then scoped by
        the `policy` entries that tell their two vectors apart). A policy entry's senders
        and destinations are read off the identity entries whose tags it matches (every
        prefix such an entry covers: a superset of the addresses whose lookup ends there),
        not looked up address by address."""
        if old is None:
            retagged: list[Retag] = []
        else:
            retagged, entries = retags(old, entries, self.switches[switch])
        policy = [e for e in entries if e.table == "policy"]
        for e in entries:
            if e.table == "src_identity":
                scope.add(scope.senders([prefix_interval(e.match("src_addr"))]), scope.full)
                scope.spoof |= {h.ip for h in self.inventory.hosts if h.switch == switch}
            elif e.table in ("dst_identity", "routing"):
                scope.add(None, scope.classes([prefix_interval(e.match("dst_addr"))]))
        if not policy and not retagged:
            return
        tables = self.fabric.switches[switch].by_table
        sources = _tagged(tables.get("src_identity", []), "set_src_tags", "src_addr")
        destinations = _tagged(tables.get("dst_identity", []), "set_dst_tags", "dst_addr")
        for r in retagged:  # a changed policy entry may have met the old vector
            (sources if r.table == "src_identity" else destinations).append((r.old, r.interval))

        def who(src: FieldMatch | None) -> list[Host] | None:
            if src is None:
                return None
            return scope.senders(iv for tags, iv in sources if src.covers(tags))

        def where(dst: FieldMatch | None) -> int:
            if dst is None or dst.covers(NO_TAGS):  # a miss sets no tags: every address can
                return scope.full
            return scope.classes(iv for tags, iv in destinations if dst.covers(tags))

        for e in policy:
            scope.add(who(e.match("src_tags")), where(e.match("dst_tags")))
        if not retagged:
            return
        # (a retag keeps which sources a port accepts: their spoofing stands as proven)
        for e in tables.get("policy", []):
            src, dst = e.match("src_tags"), e.match("dst_tags")
            for r in retagged:
                if r.table == "src_identity" and r.differs(src):
                    scope.add(scope.senders([r.interval]), where(dst))
                elif r.table == "dst_identity" and r.differs(dst):
                    scope.add(who(src), scope.classes([r.interval]))

    def _rule_set(self, atom: int) -> tuple[int, int]:
        """The rules an address atom is a source of, and a destination of (as bit masks)."""
        found = self._rule_sets.get(atom)
        if found is None:
            sem = self.sem
            found = (sem.src_index[atom] | sem.src_any, sem.dst_index[atom] | sem.dst_any)
            self._rule_sets[atom] = found
        return found

    def _unproven(
        self,
        sender: Host,
        dst: int,
        target: Host | None,
        flows: tuple[int, int, int, int],
        protocols: list[tuple[int, int]],
        result: VerifyResult,
        owners: frozenset[str] = frozenset(),
    ) -> list[int]:
        """The fast proof for one sender and destination class, hop by hop: routing delivers
        to the target (or nowhere), and per protocol each hop's policy decisions, checked
        once per (entries met, rules of the flow), agree with the policy: exactly on the ToRs
        that judge (meters included), at least where it allows elsewhere. Then the end-to-end
        verdict is the policy's. Returns the protocols not proven so (a difference or an
        unusual path), for `_check` to walk class by class and report.
        `flows`: the rules matching its flows forward and back, the address atoms; `owners`:
        the ToRs of the quarantined hosts among the two — any other ToR that judges is held
        to the uncarved policy (`_other`), and since the carve only takes allows away, the
        verdict end to end is still the (carved) policy's."""
        everything = [proto for proto, _rules in protocols]
        route = self._route(sender, dst, keep=False)
        last = route[-1]
        if last[4]:
            return everything  # a loop
        egress = last[3]
        end_host = self.fabric.host_at.get((last[0], egress)) if egress is not None else None
        complete = all(hop[2] is not None for hop in route)
        if target is None:
            if end_host is None or not complete:
                result.classes += len(protocols)  # nowhere to deliver: nothing to contradict
                return []
            return everything
        if not complete or (end_host is not None and end_host != target.name):
            return everything
        judge_last = last[0] == target.switch and len(route) > 1
        forward, reverse, src_atom, dst_atom = flows
        rule_ids = self._rule_ids
        out = []
        other = self._other if owners else None
        if other is not None:
            o_src, o_dst = other.sem.addresses.atom_of(sender.ip), other.sem.addresses.atom_of(dst)
            (o_from_s, o_to_s), (o_from_d, o_to_d) = other._rule_set(o_src), other._rule_set(o_dst)
        for proto, of_proto in protocols:
            rules = (forward & of_proto, reverse & of_proto)
            rules_id = rule_ids.setdefault((proto, *rules), len(rule_ids))
            held: tuple[Verifier, tuple[int, int], int, int, int] = (
                self,
                rules,
                rules_id,
                src_atom,
                dst_atom,
            )
            relaxed = held
            if other is not None:
                o_proto = other.sem.proto_index[other.sem.proto_class(proto)]
                o_rules = (o_from_s & o_to_d & o_proto, o_from_d & o_to_s & o_proto)
                o_id = other._rule_ids.setdefault((proto, *o_rules), len(other._rule_ids))
                relaxed = (other, o_rules, o_id, o_src, o_dst)
            first: tuple[bool, bool, int, int] | None = None
            for index, (switch, _port, idents, _egress, _loop) in enumerate(route):
                assert idents is not None
                judge = index == 0 or (judge_last and index == len(route) - 1)
                by, by_rules, by_id, by_src, by_dst = (
                    relaxed if judge and owners and switch not in owners else held
                )
                asked = (switch, idents, judge, proto, by_id)
                check = by._hops.get(asked)  # (most are known)
                if check is None:
                    check = by._hops[asked] = by._hop_check(
                        switch, idents, judge, proto, by_rules, by_id, by_src, by_dst
                    )
                if not check[0]:
                    break
                first = first or check
            else:
                assert first is not None
                _ok, allows, classes, metered = first
                if end_host is None and allows:
                    out.append(proto)  # allowed but not routed: `_check` reports it
                    continue
                result.classes += classes
                result.metered_classes += metered
                continue
            out.append(proto)
        return out

    def _hop_check(
        self,
        switch: str,
        idents: tuple[int, int, int],
        judge: bool,
        proto: int,
        rules: tuple[int, int],
        rules_id: int,
        src_atom: int,
        dst_atom: int,
    ) -> tuple[bool, bool, int, int]:
        """(agrees, the policy allows some class, port/flag classes, metered allowed
        classes) for one hop's `policy` decisions on packets of these identities and protocol
        whose flows the `rules` (forward, reverse) match: the policy decides every such
        packet alike whatever its addresses, so the atoms given stand for all of them.
        Identities that meet the same entries are judged alike; the caller also keeps the
        result by these arguments (`_hops`): a proof asks a million times for a few
        thousand checks."""
        ident, entries = self._judged(switch, *idents, proto)
        key = (ident, judge, rules_id)
        found = self._hop_checks.get(key)
        if found is not None:
            return found
        if not judge and entries and not entries[0][0] and _passes(entries[0][1]):
            found = self._hop_checks[key] = (True, False, 0, 0)  # passes all: a spine
            return found
        sem = self.sem
        name = sem.proto_class(proto)
        has_ports = proto in (PROTO_TCP, PROTO_UDP)
        flag_bits = TCP_ACK if proto == PROTO_TCP else 0
        ported = has_ports or proto == PROTO_ICMP
        # The policy reads the destination port for a flow's own rules, the source port
        # for the rules a reply answers (semantics.decide_atoms): each axis cut by its own.
        sport_cuts = _cuts(self._ports_of(rules[1], name) if ported else [], MAX_PORT)
        dport_cuts = _cuts(self._ports_of(rules[0], name) if ported else [], MAX_PORT)
        if proto == PROTO_ICMP:
            dport_cuts |= _ECHO_CUTS
        flag_bits |= _cut_by_entries(entries, proto, sport_cuts, dport_cuts)
        sports = _classes(sport_cuts, MAX_PORT) if has_ports else [(0, 0)]
        dports = _classes(dport_cuts, MAX_PORT) if has_ports or proto == PROTO_ICMP else [(0, 0)]
        flag_values = _subsets(flag_bits) if proto == PROTO_TCP else [0]
        ok, allows, classes, metered = True, False, 0, 0
        bounds = _bounds(entries)
        # The policy's decisions depend on the flow's rules, not on the hop: shared by hops.
        decided = self._decided
        for sport, _s in sports:
            sport_atom = sem.ports.atom_of(sport if has_ports else EPHEMERAL_PORT)
            for dport, _d in dports:
                dport_atom = sem.ports.atom_of(dport if has_ports else 0)
                for flags in flag_values:
                    classes += 1
                    if bounds is not None:
                        entry = _first_bound(bounds, sport, dport, flags)
                    else:
                        values = {"l4_src_port": sport, "l4_dst_port": dport, "tcp_flags": flags}
                        entry = _first_hit(entries, values)
                    icmp = proto == PROTO_ICMP
                    ask = (rules_id, sport_atom, dport if icmp else dport_atom, flags & TCP_ACK)
                    decision = decided.get(ask)
                    if decision is None:
                        decision = decided[ask] = sem.decide_atoms(
                            src_atom,
                            dst_atom,
                            name,
                            sport_atom,
                            dport_atom,
                            ack=bool(flags & TCP_ACK),
                            icmp_type=dport >> 8 if icmp else 8,
                            icmp_code=dport & 0xFF if icmp else 0,
                        )
                    if not decision.allowed:
                        ok = ok and not (judge and _passes(entry))
                        continue
                    allows = True
                    want = _meter_wanted(decision)
                    metered += want is not None
                    if not _passes(entry):
                        ok = False
                    elif judge:
                        assert entry is not None
                        ok = ok and _meter_applied(entry) == want
        found = self._hop_checks[key] = (ok, allows, classes, metered)
        return found

    def _ports_of(self, rules: int, proto: str) -> list[tuple[int, int]]:
        """The port ranges of `rules` (a bit mask) that apply to `proto`, and the client
        port: where the policy's decisions on those flows can change."""
        key = (rules, proto)
        found = self._port_rules.get(key)
        if found is None:
            found = [(EPHEMERAL_PORT, EPHEMERAL_PORT)]
            for i in bits(rules):
                r = self.policy.rules[i]
                if r.proto in (proto, "ip") and r.ports != ALL_PORTS:
                    found += r.ports
            self._port_rules[key] = found
        return found

    def _check(
        self, sender: Host, dst: int, target: Host | None, proto: int, result: VerifyResult
    ) -> None:
        src = sender.ip
        name = self.sem.proto_class(proto)
        hops = self.plan(sender, dst, proto)
        last = hops[-1]
        end_host = (
            self.fabric.host_at.get((last.switch, last.egress)) if last.egress is not None else None
        )
        has_ports = proto in (PROTO_TCP, PROTO_UDP)
        flag_bits = TCP_ACK if proto == PROTO_TCP else 0
        rule_ports = self._rule_ports(src, dst, name) if has_ports or proto == PROTO_ICMP else []
        sport_cuts = _cuts(rule_ports, MAX_PORT)
        dport_cuts = set(sport_cuts)
        if proto == PROTO_ICMP:
            dport_cuts |= _ECHO_CUTS
        for hop in hops:
            flag_bits |= _cut_by_entries(hop.entries or (), proto, sport_cuts, dport_cuts)
        if target is None and (end_host is None or not all(h.entries is not None for h in hops)):
            # Nowhere to deliver, whatever the ports: nothing a policy could contradict.
            result.classes += 1
            if last.loop:
                self._report(sender, PacketFields(src, dst, proto), name, ["loop"], result)
            return
        sports = _classes(sport_cuts, MAX_PORT) if has_ports else [(0, 0)]
        dports = _classes(dport_cuts, MAX_PORT) if has_ports or proto == PROTO_ICMP else [(0, 0)]
        flag_values = _subsets(flag_bits) if proto == PROTO_TCP else [0]
        # The source ToR and the destination ToR each judge alone (defence in depth) —
        # except that a ToR other than a quarantined host's own still holds its ordinary
        # identity, so judges its flows by the uncarved policy (relaxed: True).
        tors = [(0, "source")]
        if target is not None and hops[-1].switch == target.switch and len(hops) > 1:
            tors.append((len(hops) - 1, "destination"))
        owners = {self._cut[a] for a in (src, dst) if a in self._cut}
        relaxed = {i: bool(owners) and hops[i].switch not in owners for i, _side in tors}
        sem = self.sem
        src_atom, dst_atom = sem.addresses.atom_of(src), sem.addresses.atom_of(dst)
        sport_atoms = [sem.ports.atom_of(p if has_ports else EPHEMERAL_PORT) for p, _ in sports]
        dport_atoms = [sem.ports.atom_of(p if has_ports else 0) for p, _ in dports]
        for (sport, _), sport_atom in zip(sports, sport_atoms, strict=True):
            for (dport, _), dport_atom in zip(dports, dport_atoms, strict=True):
                for flags in flag_values:
                    result.classes += 1
                    values = {"l4_src_port": sport, "l4_dst_port": dport, "tcp_flags": flags}
                    deciding = [_deciding(hop, values) for hop in hops]
                    verdicts = [_passes(e) for e in deciding]
                    delivered_to = end_host if all(verdicts) and not last.loop else None
                    if proto == PROTO_ICMP:
                        pkt = PacketFields(
                            src, dst, proto, icmp_type=dport >> 8, icmp_code=dport & 0xFF
                        )
                    else:
                        pkt = PacketFields(src, dst, proto, sport, dport, flags)
                    decision = sem.decide_atoms(
                        src_atom,
                        dst_atom,
                        name,
                        sport_atom,
                        dport_atom,
                        ack=bool(flags & TCP_ACK),
                        icmp_type=pkt.icmp_type,
                        icmp_code=pkt.icmp_code,
                    )
                    allowed = decision.allowed
                    looping = last.loop and all(verdicts[:-1])
                    kinds = _judge(looping, delivered_to, target, allowed)
                    ordinary = decision
                    if any(relaxed.values()):
                        ordinary = self._decide(self._uncarved, pkt, name)
                    if target is not None:
                        for index, side in tors:
                            want = ordinary if relaxed[index] else decision
                            if verdicts[index] != want.allowed:
                                kinds.append(f"{side}-tor:{hops[index].switch}")
                    if kinds:
                        self._report(sender, pkt, name, kinds, result)
                    elif allowed and target is not None:
                        judged = [
                            (i, side, ordinary if relaxed[i] else decision) for i, side in tors
                        ]
                        self._meters(sender, pkt, hops, judged, deciding, decision, result)

    @staticmethod
    def _decide(sem: PolicySemantics | None, pkt: PacketFields, proto: str) -> Decision:
        """`sem`'s decision on a packet (by its addresses)."""
        assert sem is not None
        return sem.decide(
            pkt.src,
            pkt.dst,
            proto,
            pkt.sport if proto in ("tcp", "udp") else EPHEMERAL_PORT,
            pkt.dport if proto in ("tcp", "udp") else 0,
            ack=bool(pkt.tcp_flags & TCP_ACK),
            icmp_type=pkt.icmp_type,
            icmp_code=pkt.icmp_code,
        )

    def _report(
        self, sender: Host, pkt: PacketFields, proto: str, kinds: list[str], result: VerifyResult
    ) -> None:
        """The slow path, for a difference only: the full walk, for the details."""
        path = self.fabric.walk(sender.name, pkt)
        expected = self._decide(self.sem, pkt, proto).describe()
        for kind in kinds:
            if ":" in kind:
                side, switch = kind.split(":")
                port = sender.port if side == "source-tor" else None
                if port is None:
                    port = self.plan(sender, pkt.dst, pkt.protocol)[-1].port
                alone = evaluate(self.fabric.switches[switch], port, pkt)
                observed = _alone(alone, self.fabric)
                result.counterexamples.append(
                    Counterexample(side, sender.name, pkt, path, expected, observed)
                )
            else:
                result.counterexamples.append(
                    Counterexample(kind, sender.name, pkt, path, expected, _observed(path))
                )

    def _meters(
        self,
        sender: Host,
        pkt: PacketFields,
        hops: list[_Hop],
        tors: list[tuple[int, str, Decision]],
        deciding: list[TableEntry | None],
        decision: Decision,
        result: VerifyResult,
    ) -> None:
        """An allowed packet is allowed up to its rule's rate: each ToR that judges it must
        meter it with exactly the config the rate gives (none for an unmetered allow) —
        the rate of the decision that ToR is held to (`tors`: index, side, decision)."""
        if _meter_wanted(decision) is not None:
            result.metered_classes += 1
        for index, side, judged in tors:
            want = _meter_wanted(judged)
            entry = deciding[index]
            assert entry is not None  # the packet passes this ToR
            have = _meter_applied(entry)
            if have == want:
                continue
            switch = hops[index].switch
            expected = judged.describe() + (
                f", up to {want.cir} pps (meter {want.describe()})"
                if want is not None
                else ", with no rate limit"
            )
            what = "unmetered: no rate limit" if have is None else f"meter {have.describe()}"
            result.counterexamples.append(
                Counterexample(
                    f"meter-{side}-tor",
                    sender.name,
                    pkt,
                    None,
                    expected,
                    f"{switch} lets it through {what} ({_entry(entry)})",
                )
            )

    def _spoofing(
        self, classes: list[tuple[int, int]], result: VerifyResult, focus: Collection[int] | None
    ) -> None:
        admitting: dict[str, _Admitting] = {}
        for host in self.inventory.hosts:
            if focus is not None and host.ip not in focus:
                continue
            epoch = self._epoch[host.switch]
            by_port = admitting.get(host.switch)
            if by_port is None:
                by_port = admitting[host.switch] = _Admitting(
                    self._derived[host.switch].indexed.by_table.get("src_identity", []), epoch
                )
            if by_port.only(host.port, host.ip):
                result.spoof_classes += len(classes) - 1  # no other source can be accepted
                continue
            index = self._index(host.switch, "src_identity", "src_addr")
            for lo, _hi in classes:
                if lo == host.ip:
                    continue
                result.spoof_classes += 1
                pkt = PacketFields(lo, host.ip ^ 1, OTHER_PROTOCOL)
                values = {"epoch": epoch, "ingress_port": host.port, "src_addr": lo}
                hit = index.lookup(lo, values)
                if hit is not None and hit.action != "drop":
                    result.counterexamples.append(
                        Counterexample(
                            "spoof-accepted",
                            host.name,
                            pkt,
                            None,
                            f"a packet on {host.name}'s port ({host.switch} port {host.port}) "
                            f"must carry {_ip(host.ip)}",
                            f"{host.switch}: src_identity {_entry(hit)} accepts {_ip(lo)}",
                        )
                    )


class _Admitting:
    """A switch's `src_identity` entries that can accept a source (any action but `drop`),
    by the ingress port they match: on a host's port, if every one of them matches the
    host's own address alone, no other source address can be accepted there, whatever the
    priorities, and its spoofing classes are proven without a lookup each."""

    def __init__(self, entries: Iterable[TableEntry], epoch: int) -> None:
        self.by_port: dict[int, list[TableEntry]] = {}
        self.anywhere: list[TableEntry] = []  # entries whose port match is not `exact`
        for e in entries:
            if e.action == "drop" or not all(
                m.covers(epoch) for m in e.matches if m.field == "epoch"
            ):
                continue
            ports = [m for m in e.matches if m.field == "ingress_port"]
            if len(ports) == 1 and ports[0].kind == "exact":
                self.by_port.setdefault(ports[0].value, []).append(e)
            else:
                self.anywhere.append(e)

    def only(self, port: int, address: int) -> bool:
        """Whether every entry that can accept a source on `port` matches `address` alone."""
        for e in itertools.chain(self.by_port.get(port, ()), self.anywhere):
            if not all(m.covers(port) for m in e.matches if m.field == "ingress_port"):
                continue
            spans = [_match_intervals(m, 32) for m in e.matches if m.field == "src_addr"]
            if len(spans) != 1 or spans[0] != [(address, address)]:
                return False
        return True


# The l4_dst_port values where ICMP echo replies and requests begin and end.
_ECHO_CUTS = frozenset(_cuts((ICMP_ECHO_REPLY_RANGE, ICMP_ECHO_REQUEST_RANGE), MAX_PORT))


def _tagged(
    entries: list[TableEntry], action: str, field: str
) -> list[tuple[int, tuple[int, int]]]:
    """(tags, address interval) of each identity entry that sets tags (a new list: the
    caller adds to it)."""

    def made() -> list[tuple[int, Interval]]:
        return [
            (dict(e.params)["tags"], prefix_interval(e.match(field)))
            for e in entries
            if e.action == action
        ]

    return list(_BY_ENTRIES.get(action, entries, made))


def _cut_by_entries(
    entries: Iterable[tuple[tuple[FieldMatch, ...], TableEntry]],
    proto: int,
    sport_cuts: set[int],
    dport_cuts: set[int],
) -> int:
    """Add the port cuts of `entries`' varying matches to the sets; the TCP flag bits they
    read (for TCP)."""
    flag_bits = 0
    for varying, _entry in entries:
        for m in varying:
            if m.field == "l4_src_port":
                sport_cuts |= _cuts(_match_intervals(m, 16), MAX_PORT)
            elif m.field == "l4_dst_port":
                dport_cuts |= _cuts(_match_intervals(m, 16), MAX_PORT)
            elif m.field == "tcp_flags" and proto == PROTO_TCP:
                flag_bits |= m.arg
    return flag_bits


def _subsets(bits: int) -> list[int]:
    """Every combination of the given flag bits (each a class of TCP flags)."""
    out = [0]
    b = bits & 0xFF
    while b:
        low = b & -b
        out += [v | low for v in out]
        b ^= low
    return out


def _entry(entry: TableEntry) -> str:
    matches = " ".join(f"{m.field}={_show(m)}" for m in entry.matches)
    params = ", ".join(f"{k}={v}" for k, v in entry.params)
    rule = f" [rule {entry.rule_id}]" if entry.rule_id is not None else ""
    meter = f" meter {entry.meter.describe()}" if entry.meter is not None else ""
    return f"{entry.table}[{matches}] -> {entry.action}({params}){meter}{rule}"


def _show(m: FieldMatch) -> str:
    v = _ip(m.value) if m.field.endswith("_addr") else str(m.value)
    if m.kind == "lpm":
        return f"{v}/{m.arg}"
    if m.kind == "range":
        return v if m.value == m.arg else f"{m.value}..{m.arg}"
    if m.kind == "ternary":
        full = (1 << _WIDTH.get(m.field, 32)) - 1
        return v if m.arg == full else f"{m.value:#x}&&&{m.arg:#x}"
    return v


def _observed(path: PathResult) -> str:
    if path.loop:
        return "routing loops: " + " -> ".join(h.switch for h in path.hops[:MAX_HOPS])
    if path.delivered:
        return f"delivered to {path.delivered_to} via " + " -> ".join(h.switch for h in path.hops)
    last = path.hops[-1]
    if last.egress_port is not None:  # forwarded, to nothing: a down spine, an unlinked port
        return (
            f"lost: {last.switch} sends it out of port {last.egress_port}, which leads to no "
            "live switch or host"
        )
    stop = next(
        (h for h in reversed(last.hits) if h.action in ("drop", "deny", "deny_and_log")),
        last.hits[-1] if last.hits else None,
    )
    if stop is None:
        return f"dropped at {last.switch}"
    what = _entry(stop.entry) if stop.entry else f"{stop.table} default {stop.action}"
    return f"dropped at {last.switch} by {what}"


def _alone(hop: SwitchResult, fabric: Fabric) -> str:
    """What one switch, judging alone, does with a packet: the `policy` entry that decided,
    then where the packet goes — never "dropped" for a packet it forwards."""
    decided = next((h for h in hop.hits if h.table == "policy"), None)
    if decided is None:
        return f"{hop.switch} alone drops it before its policy table: " + _observed(
            PathResult((hop,), None)
        )
    entry = _entry(decided.entry) if decided.entry else f"policy default {decided.action}"
    verdict = "permits" if decided.action in ("permit", "permit_metered") else "refuses"
    if hop.egress_port is None:
        after = "; " + _observed(PathResult((hop,), None)) if verdict == "permits" else ""
        return f"{hop.switch} alone {verdict} it: {entry}{after}"
    host = fabric.host_at.get((hop.switch, hop.egress_port))
    peer = fabric.peer.get((hop.switch, hop.egress_port))
    to = f"port {hop.egress_port}"
    if host:
        to = f"host {host} ({to})"
    elif peer:
        to += f" (towards {peer[0]})"
    return f"{hop.switch} alone lets it through: {entry}, then forwards it to {to}"


# A build proven before: its policy, inventory and tables (for a differential proof).
Proven = tuple[Policy, Inventory, Mapping[str, SwitchTables]]


def verify(
    policy: Policy,
    inventory: Inventory,
    switches: Mapping[str, SwitchTables],
    only: frozenset[str] | None = None,
    focus: Collection[int] | None = None,
    previous: Proven | None = None,
    recorded: tuple[Recorded, ProofRecord] | None = None,
    exact: bool = False,
) -> VerifyResult:
    """Prove that `switches`' entries implement `policy` on `inventory`, or show where not;
    with `only` (ToR names), for the packets those ToRs judge — from and to their hosts (a
    differential proof, differential_scope); with `focus` (host addresses), for the packets
    from and to those hosts only; with `previous` (a build proven before), for the pairs
    the change from it can have touched (compiler/differential.py), or everything when
    that cannot be told; with `recorded` (a build proven by another process, as the state
    directory keeps it, and this build's record), the same pairs. A proof of everything
    goes rule by rule where it can (compiler/rule_proof.py); `exact` walks every pair."""
    with collection_paused():
        result = _verify(policy, inventory, switches, only, focus, previous, recorded, exact)
    if result.by_rules is None and not exact:
        # proven by pairs because rules could not: no ToR keeps a proof by rules (`exact`,
        # a walk asked for, leaves them as a proof by rules of the same tables made them)
        forget_proofs(switches.values())
    return result


def keep_proofs_by_rules(
    policy: Policy, inventory: Inventory, switches: Mapping[str, SwitchTables], previous: Proven
) -> None:
    """Give a build proven already (the build of an earlier proof: a revoke's), whose ToRs
    do not all keep a proof by rules, those of `previous` (the build proven last) carried
    over by difference (compiler/rule_proof.py `prove_by_difference`), so that the next
    change is proven from them rule by rule. Nothing is concluded about the build: a ToR
    whose conditions fail keeps no proof by rules."""
    if all(holds_proof(sw) for sw in switches.values() if sw.role == "tor"):
        return
    with collection_paused():
        Verifier(policy, inventory, switches).by_rules_from(*previous)


def prove_tor_ahead(
    policy: Policy, inventory: Inventory, switches: Mapping[str, SwitchTables], tor: str
) -> bool:
    """Give `tor`, of a build proven already (`switches`: the very mapping it was proven
    as), its proof by rules for the next change (compiler/rule_proof.py `prove_ahead`),
    one ToR at a time: a long-running controller does it between operations. The
    verifier (its routes, its address indexes) is kept for the next ToR of the build."""
    verifier = _AHEAD.find(switches)
    if verifier is None or verifier.policy is not policy or verifier.inventory is not inventory:
        verifier = Verifier(policy, inventory, switches)
        _AHEAD.put(switches, verifier)
    with collection_paused(splice=True):
        return prove_ahead(verifier, tor)


# The verifier of the build whose ToRs are being proven ahead (`prove_tor_ahead`).
_AHEAD: ByObject[Mapping[str, SwitchTables], Verifier] = ByObject(1)


def _verify(
    policy: Policy,
    inventory: Inventory,
    switches: Mapping[str, SwitchTables],
    only: frozenset[str] | None,
    focus: Collection[int] | None,
    previous: Proven | None,
    recorded: tuple[Recorded, ProofRecord] | None,
    exact: bool,
) -> VerifyResult:
    verifier = Verifier(policy, inventory, switches)
    pairs = None
    if previous is not None and not exact:
        by_rules = verifier.by_rules_from(*previous)
        if by_rules is not None:
            return verifier.run(
                pairs=by_rules.left or PairScope({}, frozenset()), by_rules=by_rules
            )
    if previous is not None:
        pairs = verifier.pair_scope(*previous)
    elif recorded is not None:
        pairs = verifier.recorded_pair_scope(*recorded)
    if pairs is not None:
        return verifier.run(pairs=pairs)
    if only is not None:
        tors = None if focus else only  # rule by rule, unless other hosts are asked for too
        held = {h.ip for h in inventory.hosts if h.switch in only}
        focus = held | set(focus or ())
        return verifier.run(focus, tuple(sorted(only)), exact=exact, tors=tors)
    return verifier.run(focus, exact=exact)


# -- differential proofs ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProofRecord:
    """What a proven build was proven for: enough to prove the next one by difference.

    rules: rule key -> (digest of what the rule means, the ToRs its flows touch);
    switches: switch -> digest of its tables; the inventory's and the default's digests."""

    inventory: str
    default_log: bool
    rules: Mapping[str, tuple[str, tuple[str, ...]]]
    switches: Mapping[str, str]

    def to_json(self) -> dict[str, object]:
        return {
            "inventory": self.inventory,
            "default_log": self.default_log,
            "rules": {k: [d, list(t)] for k, (d, t) in sorted(self.rules.items())},
            "switches": dict(sorted(self.switches.items())),
        }

    @staticmethod
    def from_json(doc: object) -> ProofRecord | None:
        """The record, or None if `doc` is not one (then the next proof is a full one)."""
        try:
            assert isinstance(doc, dict)
            rules = {
                str(k): (str(v[0]), tuple(str(t) for t in v[1])) for k, v in doc["rules"].items()
            }
            switches = {str(k): str(v) for k, v in doc["switches"].items()}
            return ProofRecord(str(doc["inventory"]), bool(doc["default_log"]), rules, switches)
        except (AssertionError, KeyError, TypeError, IndexError, AttributeError):
            return None


Sides = tuple[tuple[int, int], ...]  # a rule's source or destination addresses, as intervals


@dataclass(frozen=True, slots=True)
class Recorded:
    """A build proven by another process, as the state directory keeps it (p4seg/proven.py):
    its proof record, each rule's addresses (rule key -> sources, destinations: where a
    changed rule's pairs are read from), its uncarved rules when a quarantine was in force,
    and its switches' tables (each checked against the record's digest)."""

    record: ProofRecord
    sides: Mapping[str, tuple[Sides, Sides]]
    # With a quarantine in force: the rules as the other ToRs judge (Policy.uncarved), each
    # with its meaning digest and addresses; None: no quarantine, they are the rules.
    uncarved: Mapping[str, tuple[str, Sides, Sides]] | None
    quarantined: frozenset[int]  # the hosts a quarantine held then
    switches: Mapping[str, SwitchTables]

    def rule_sides(self) -> RuleSides | None:
        """Its rules by key: meaning digest and addresses (None: an address is missing)."""
        if not self.record.rules.keys() <= self.sides.keys():
            return None
        return {k: (d, *self.sides[k]) for k, (d, _) in self.record.rules.items()}

    def overlay_change(
        self, policy: Policy, inventory: Inventory, switches: Mapping[str, SwitchTables],
        host: Host, mask: int,
    ) -> OverlayChange | str:  # fmt: skip
        """compiler/differential.py `only_overlay_changed` from this kept build: the new
        build (`policy`, `switches`) differs from it only by `host`'s quarantine and its
        overlay, or why not. The kept switches equal to the new ones are the new objects
        (p4seg/proven.py `load`), so any other is a change."""
        if self.record.inventory != floor_digest(inventory):
            return "the inventory changed"
        if self.record.default_log != policy.default_log:
            return "the default's logging changed"
        then = self.uncarved if self.uncarved is not None else self.rule_sides()
        if then is None:
            return "the kept build lacks rules' addresses"
        if _changed_sides(then, _rule_sides(policy.uncarved())):
            return "rules changed"
        after = set(policy.quarantine.hosts) if policy.quarantine else set()
        if self.quarantined ^ after != {host.ip}:
            return "not just the host's quarantine changed"
        if self.switches.keys() != switches.keys():
            return "the switches changed"
        for name, sw in switches.items():
            if name != host.switch and self.switches[name] is not sw:
                return f"{name} changed"
        return overlay_change(self.switches[host.switch], switches[host.switch], host.ip, mask)


def rule_digest(r: PolicyRule) -> str:
    """A rule's meaning, as a proof record keeps it (compiler/differential.py `meaning`)."""
    return _meaning(
        (r.id, r.action, r.src.intervals, r.dst.intervals, r.proto, r.ports, r.log, r.reply,
         r.rate_pps)
    )  # fmt: skip


RuleSides = Mapping[str, tuple[str, Sides, Sides]]  # rule key -> meaning digest, addresses


def _rule_sides(policy: Policy) -> RuleSides:
    return {r.key: (rule_digest(r), r.src.intervals, r.dst.intervals) for r in policy.rules}


def _changed_sides(then: RuleSides, now: RuleSides) -> list[tuple[Sides, Sides]]:
    """The addresses, then and now, of every rule whose meaning changed (by key)."""
    out = []
    for key in then.keys() | now.keys():
        a, b = then.get(key), now.get(key)
        if a is not None and b is not None and a[0] == b[0]:
            continue
        out += [(x[1], x[2]) for x in (a, b) if x is not None]
    return out


def proof_digest(sw: SwitchTables) -> str:
    """The digest of a switch's tables, as a proof record keeps it."""
    return _TABLES_DIGESTS.get(sw, _tables_digest)


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def proof_record(
    policy: Policy, inventory: Inventory, switches: Mapping[str, SwitchTables]
) -> ProofRecord:
    """The record of a build proven for `policy` (see differential_scope)."""
    placed = placement(inventory)
    known = _RULE_RECORDS.get(id(placed))
    if known is None or known[0] is not placed or len(known[1]) > 4 * len(policy.rules) + 64:
        if len(_RULE_RECORDS) >= 2:  # a floor or two: the last inventories
            _RULE_RECORDS.clear()
        known = _RULE_RECORDS[id(placed)] = (placed, {})
    mine = known[1]
    rules = {}
    for r in policy.rules:
        found = mine.get(id(r))
        if found is None or found[0] is not r:
            tors = placed.tors_of(r.src.intervals) | placed.tors_of(r.dst.intervals)
            found = mine[id(r)] = (r, (rule_digest(r), tuple(sorted(tors))))
        rules[r.key] = found[1]
    _TABLES_DIGESTS.hold(len(switches))
    tables = {
        name: _TABLES_DIGESTS.get(sw, _tables_digest) for name, sw in sorted(switches.items())
    }
    return ProofRecord(floor_digest(inventory), policy.default_log, rules, tables)


def floor_digest(inventory: Inventory) -> str:
    """The inventory as a proof record keeps it (a spine going down or back: a new one)."""
    floor = _INVENTORY_DIGESTS.get(inventory, _floor_digest)
    down = sorted(inventory.down)
    return _digest(floor, down) if down else floor


def remember_digests(digests: Mapping[SwitchTables, str], count: int) -> bool:
    """Take these tables' proof digests as known (the kept build's record names them: p4seg/
    proven.py), with room for `count` switches: a new process's record of a build that
    changed one ToR digests that one. False, and nothing taken, if one of them was
    digested already to something else."""
    if any((known := _TABLES_DIGESTS.find(sw)) is not None and known != d
           for sw, d in digests.items()):  # fmt: skip
        return False
    _TABLES_DIGESTS.hold(count)
    for sw, digest in digests.items():
        _TABLES_DIGESTS.put(sw, digest)
    return True


@functools.lru_cache(maxsize=1 << 16)
def _meaning(parts: tuple[object, ...]) -> str:
    """A rule's meaning digest (a tuple of numbers hashes in microseconds; its repr and
    SHA-256 cost far more, for every rule of every record)."""
    return _digest(*parts)


def _tables_digest(sw: SwitchTables) -> str:
    """The digest of a switch's tables: of its entries' digests in order, each made once per
    value (`_ENTRY_DIGESTS`: a quarantine changes a few of a ToR's 3,000 entries, and the
    repr of all of them cost 20 ms a build), and of its default actions."""
    if len(_ENTRY_DIGESTS) >= _ENTRY_DIGESTS_MAX:
        _ENTRY_DIGESTS.clear()
    h = hashlib.sha256(
        b"".join(_ENTRY_DIGESTS_IN_PLACE.values(sw.switch, sw.entries, _entry_digest))
    )
    h.update(repr(sw.defaults).encode())
    return h.hexdigest()[:24]


def _entry_digest(entry: TableEntry) -> bytes:
    """The digest of the entry's line in an entries file (every field of the entry, its
    matches by field name): a new process's build has just made those lines."""
    d = _ENTRY_DIGESTS.get(entry)
    if d is None:
        d = _ENTRY_DIGESTS[entry] = hashlib.sha256(entry_text(entry).encode()).digest()[:16]
    return d


# Each entry's digest by value, for _tables_digest; emptied past _ENTRY_DIGESTS_MAX. And a
# switch's entry digests by place: its tables compiled again for an edit differ from the
# last ones in a few places in the middle (a ToR's 3,000 to 8,000 entries).
_ENTRY_DIGESTS: dict[TableEntry, bytes] = {}
_ENTRY_DIGESTS_MAX = 400_000
also_forget(_ENTRY_DIGESTS.clear)
_ENTRY_DIGESTS_IN_PLACE: ByPlace[TableEntry, bytes] = ByPlace(4096)


def _floor_digest(inventory: Inventory) -> str:
    return _digest(inventory.hosts, inventory.switches, inventory.links)


# The digests of a proof record, per switch's tables and per inventory (compiler/memo.py):
# a repr of 3,000 entries costs 25 ms, and most switches are the same objects build after build.
_TABLES_DIGESTS: ByObject[SwitchTables, str] = ByObject(16)
# Per placement (an inventory's), each rule's part of a record by the rule object (held, so
# that its id stays its own): a quarantine's or an edit's rules are mostly the last ones.
_RULE_RECORDS: dict[
    int, tuple[object, dict[int, tuple[PolicyRule, tuple[str, tuple[str, ...]]]]]
] = {}
also_forget(_RULE_RECORDS.clear)
_INVENTORY_DIGESTS: ByObject[Inventory, str] = ByObject(2)


def differential_scope(
    before: ProofRecord, after: ProofRecord, roles: Mapping[str, str]
) -> frozenset[str] | None:
    """The ToRs whose packets must be proven for a build (`after`) when the last proven
    one (`before`) is known, or None when only a full proof will do.

    The argument: a packet crosses its source ToR, spines, and its destination's ToR. On
    ToRs whose tables did not change it meets the entries that were proven for the old
    policy; its verdict is the new policy's as long as no rule deciding it changed. A
    changed rule (added, removed, or meaning something else) may change the verdict of
    its flows only, each of which starts or ends on a ToR hosting one of its hosts: if
    every such ToR is among those re-proven (every packet from or to their hosts), every
    packet whose verdict can have changed is proven again. A changed spine, inventory or
    default rule: a full proof."""
    if before.inventory != after.inventory or before.default_log != after.default_log:
        return None
    changed = {
        name
        for name in set(before.switches) | set(after.switches)
        if before.switches.get(name) != after.switches.get(name)
    }
    if any(roles.get(name) != "tor" for name in changed):
        return None
    for key in set(before.rules) | set(after.rules):
        old, new = before.rules.get(key), after.rules.get(key)
        if old is not None and new is not None and old[0] == new[0]:
            continue
        touched = set(old[1] if old else ()) | set(new[1] if new else ())
        if not touched <= changed:
            return None
    return frozenset(changed)
