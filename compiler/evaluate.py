"""The table evaluator: what a switch holding some entries does with one packet.

It executes the pipeline of p4src/spec.py on target-neutral entries — the same walk the
P4 program makes — and is shared by the tests (fixture pairs), the verifier and the
reference switch. `Fabric.walk` follows a packet across switches along the inventory's links.

`lookup` is the definition of a table lookup (a linear scan); `IndexedSwitch` answers the
same through one `TableIndex` per table, built on the table's first lookup, so a packet
costs a few tests per table whatever the table's size.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter

from compiler.entries import DefaultAction, SwitchTables, TableEntry
from compiler.inventory import Inventory
from compiler.protocols import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from p4src.spec import NO_TAGS, PIPELINE, REASON_DENY_LOG, REASON_SPOOF

_WIDTH = {k.name: k.bits for t in PIPELINE.tables for k in t.keys}
MAX_HOPS = 16


@dataclass(frozen=True, slots=True)
class PacketFields:
    """The header fields the pipeline reads (ICMP: type/code, ports as the parser sets them)."""

    src: int
    dst: int
    protocol: int
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    icmp_type: int = 8
    icmp_code: int = 0

    def l4(self) -> tuple[int, int]:
        if self.protocol in (PROTO_TCP, PROTO_UDP):
            return self.sport, self.dport
        if self.protocol == PROTO_ICMP:
            return 0, (self.icmp_type << 8) | self.icmp_code
        return 0, 0


@dataclass(frozen=True, slots=True)
class Hit:
    table: str
    entry: TableEntry | None  # None: the table's default action
    action: str
    params: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class SwitchResult:
    switch: str
    hits: tuple[Hit, ...]
    egress_port: int | None  # None: dropped
    logged: bool  # a copy went to the controller (a logged deny, or a spoofed source)
    rule_id: int | None  # the policy entry's rule_id, when the policy table was reached
    reason: int = 0  # packet_in.reason of the copy when logged


def _matches(entry: TableEntry, values: dict[str, int]) -> bool:
    for m in entry.matches:
        x = values[m.field]
        if m.kind == "lpm":
            if not m.covers_lpm(x, _WIDTH[m.field]):
                return False
        elif not m.covers(x):
            return False
    return True


def _rank(entry: TableEntry) -> tuple[int, int]:
    plen = max((m.arg for m in entry.matches if m.kind == "lpm"), default=0)
    return (entry.priority, plen)


def lookup(entries: list[TableEntry], values: dict[str, int]) -> TableEntry | None:
    """The winning entry: highest priority, then longest prefix (routing has no priority).

    The linear scan: the definition `TableIndex` must agree with (tests use it as the oracle).
    """
    best: TableEntry | None = None
    for e in entries:
        if _matches(e, values) and (best is None or _rank(e) > _rank(best)):
            best = e
    return best


# -- the index --------------------------------------------------------------------------------
#
# A decision tree (HiCuts-like) over the match fields, grown lazily. Every entry gets its
# position `pos` in the scan's order of preference — (-priority, -prefix length, table order)
# — so the winner is the matching entry with the lowest pos, ties included, exactly as
# `lookup` picks; every list below is kept in pos order. A node is a `_Leaf` (the first entry
# that matches wins) or a split on the field that cuts its entries best, of one of two kinds:
# - `_Split`: the field's value picks one segment between the entries' interval boundaries;
#   entries too wide to cut (wildcards, non-prefix ternaries, intervals over many segments)
#   sit in the split's fallback.
# - `_Slices`: for ternary matches such as the policy's tag slices (one 4-bit field of a
#   256-bit identity vector, compiler/tags.py), which are not one interval and spread over
#   many slices. Each distinct mask is a virtual field, `value & mask`; an entry sits in the
#   part of its (mask, value), and the packet visits the part of each virtual field it has
#   a value in (a tag vector names the sets its address is in), plus the fallback (the
#   entries with no mask on the field). The parts a value visits are kept per value.
# A split's parts become nodes when a packet first reaches them, so a rebuild after a write
# costs one cut of the table, and the tree grows where traffic goes. Search visits a part
# only while it could still hold an entry better than the best found. Field values are
# assumed within their widths, as the parser sets them.

_LEAF = 12  # entries a leaf holds before it is worth splitting
_DEPTH = 4  # splits along one path
_SPAN = 8  # segments an entry may be copied into before it goes to the fallback
_SAMPLE = 256  # entries a split's field is chosen on
_SEEN = 4096  # values a `_Slices` node keeps the visited parts of
_NONE = 1 << 62  # the pos of no entry
_EMPTY: list[_Item] = []  # every empty segment (never appended to: fewer objects to collect)

_Tests = tuple[tuple[str, int, int], ...]


class _Item:
    """One entry prepared for search: `intervals` (field, lo, hi) and `masks` (field, mask,
    value) together test exactly the entry's matches; `spans` are the values of each field it
    can match as one interval (absent: any value, or not one interval); `slices` the (mask,
    value) of each field it matches ternary with a non-zero mask. Never changed once made
    (a plain slotted class: tens of thousands are made per rebuild)."""

    __slots__ = ("entry", "intervals", "masks", "pos", "rank", "slices", "spans")

    def __init__(
        self,
        pos: int,
        entry: TableEntry,
        rank: tuple[int, int],
        intervals: _Tests,
        masks: _Tests,
        spans: dict[str, tuple[int, int]],
        slices: dict[str, tuple[int, int]],
    ) -> None:
        self.pos, self.entry, self.rank = pos, entry, rank
        self.intervals, self.masks = intervals, masks
        self.spans, self.slices = spans, slices

    def at(self, pos: int) -> _Item:
        return _Item(
            pos, self.entry, self.rank, self.intervals, self.masks, self.spans, self.slices
        )

    @classmethod
    def of(cls, entry: TableEntry) -> _Item:
        intervals: list[tuple[str, int, int]] = []
        masks: list[tuple[str, int, int]] = []
        spans: dict[str, tuple[int, int]] = {}
        slices: dict[str, tuple[int, int]] = {}
        for m in entry.matches:
            full = (1 << _WIDTH[m.field]) - 1
            if m.kind == "ternary":
                masks.append((m.field, m.arg, m.value))
                if m.arg & full:
                    slices.setdefault(m.field, (m.arg & full, m.value))
                low = full & ~m.arg  # a prefix mask (ones, then zeros) is an interval
                if m.arg & ~full or low & (low + 1) or m.value & low:
                    continue
                lo, hi = m.value, m.value | low
            else:
                if m.kind == "exact":
                    lo, hi = m.value, m.value
                elif m.kind == "range":
                    lo, hi = m.value, m.arg
                elif m.kind == "lpm":
                    if not m.arg:  # /0 matches everything
                        continue
                    low = (1 << (_WIDTH[m.field] - m.arg)) - 1
                    lo, hi = m.value & ~low, (m.value & ~low) | low
                else:
                    raise ValueError(f"unknown match kind {m.kind!r}")
                intervals.append((m.field, lo, hi))
            if lo > 0 or hi < full:  # the whole field's range cuts nothing
                spans.setdefault(m.field, (lo, hi))
        return cls(_NONE, entry, _rank(entry), tuple(intervals), tuple(masks), spans, slices)


_Cut = tuple[list[int], list[list[_Item]], list[_Item]]  # bounds, segments, fallback
# each (mask, value) -> its part's index, the parts, the fallback
_SliceCut = tuple[dict[tuple[int, int], int], list[list[_Item]], list[_Item]]


def _cut(items: list[_Item], field: str) -> _Cut:
    """Segment boundaries of `field`, the entries of each segment, the fallback entries
    (all in the order of `items`)."""
    bounds = sorted({b for it in items if (s := it.spans.get(field)) for b in (s[0], s[1] + 1)})
    at = {b: i for i, b in enumerate(bounds)}
    # segment i + 1 holds [bounds[i], bounds[i + 1]); segment 0 lies below every interval
    held: dict[int, list[_Item]] = {}
    fallback: list[_Item] = []
    for it in items:
        span = it.spans.get(field)
        if span is None:
            fallback.append(it)
            continue
        first, last = at[span[0]] + 1, at[span[1] + 1]
        if last - first >= _SPAN:
            fallback.append(it)
        else:
            for i in range(first, last + 1):
                held.setdefault(i, []).append(it)
    return bounds, [held.get(i, _EMPTY) for i in range(len(bounds) + 1)], fallback


def _slice_cut(items: list[_Item], field: str) -> _SliceCut:
    """The entries of each (mask, value) `field` is matched with, the fallback entries (no
    mask on `field`), all in the order of `items`."""
    index: dict[tuple[int, int], int] = {}
    parts: list[list[_Item]] = []
    fallback: list[_Item] = []
    for it in items:
        key = it.slices.get(field)
        if key is None:
            fallback.append(it)
            continue
        i = index.get(key)
        if i is None:
            i = index[key] = len(parts)
            parts.append([])
        parts[i].append(it)
    return index, parts, fallback


def _cost(parts: list[list[_Item]], fallback: list[_Item]) -> float:
    """Entries a search tests after a cut: the fallback, plus the entry-weighted mean part
    (a packet visiting one part: the choice of a split is speed only, never results)."""
    copies = sum(len(s) for s in parts)
    return len(fallback) + (sum(len(s) ** 2 for s in parts) / copies if copies else 0.0)


class _Leaf:
    __slots__ = ("items",)

    def __init__(self, items: list[_Item]) -> None:
        self.items = items

    def find(self, values: dict[str, int], best: _Item | None) -> _Item | None:
        limit = best.pos if best is not None else _NONE
        for item in self.items:
            if item.pos >= limit:
                return best
            for f, lo, hi in item.intervals:
                if not lo <= values[f] <= hi:
                    break
            else:
                for f, mask, value in item.masks:
                    if values[f] & mask != value:
                        break
                else:
                    return item
        return best


class _Parts:
    """A split on `field`: parts, the last one the fallback; each a list of entries until a
    packet reaches it, then a node."""

    __slots__ = ("_others", "depth", "field", "fields", "mins", "parts")

    def __init__(
        self, lists: list[list[_Item]], field: str, fields: tuple[str, ...], depth: int
    ) -> None:
        self.field, self.fields, self.depth = field, fields, depth
        self._others = tuple(f for f in fields if f != field)
        self.mins = [p[0].pos if p else _NONE for p in lists]
        self.parts: list[list[_Item] | _Node] = list(lists)

    def _node(self, i: int) -> _Node:
        part = self.parts[i]
        if isinstance(part, list):
            # a part's entries all match this field alike: cutting them on it again cuts nothing
            fields = self.fields if i == len(self.parts) - 1 else self._others
            part = self.parts[i] = _build(part, fields, self.depth + 1)
        return part

    def _find_in(
        self, order: Iterable[int], values: dict[str, int], best: _Item | None
    ) -> _Item | None:
        """Search the parts `order` names, by their first entries, while they could hold a
        better entry than `best`."""
        mins, parts = self.mins, self.parts
        for i in order:
            if mins[i] >= (best.pos if best is not None else _NONE):
                break  # the rest come later in pos order
            part = parts[i]
            best = (self._node(i) if isinstance(part, list) else part).find(values, best)
        return best


class _Split(_Parts):
    """Parts: one per segment of `field`, then the fallback."""

    __slots__ = ("bounds",)

    def __init__(self, cut: _Cut, field: str, fields: tuple[str, ...], depth: int) -> None:
        bounds, segments, fallback = cut
        super().__init__([*segments, fallback], field, fields, depth)
        self.bounds = bounds

    def find(self, values: dict[str, int], best: _Item | None) -> _Item | None:
        seg, fb = bisect_right(self.bounds, values[self.field]), len(self.parts) - 1
        return self._find_in(
            (seg, fb) if self.mins[seg] < self.mins[fb] else (fb, seg), values, best
        )


class _Slices(_Parts):
    """Parts: one per (mask, value) of `field`, then the fallback. `masks`: each mask with
    its parts by value; `seen`: for a value of the field, the parts it visits by their
    first entry (the fallback included)."""

    __slots__ = ("masks", "seen")

    def __init__(self, cut: _SliceCut, field: str, fields: tuple[str, ...], depth: int) -> None:
        index, parts, fallback = cut
        super().__init__([*parts, fallback], field, fields, depth)
        masks: dict[int, dict[int, int]] = {}
        for (mask, value), i in index.items():
            masks.setdefault(mask, {})[value] = i
        self.masks = tuple(masks.items())
        self.seen: dict[int, list[int]] = {}

    def _visits(self, x: int) -> list[int]:
        order = [i for mask, parts in self.masks if (i := parts.get(x & mask)) is not None]
        order.append(len(self.parts) - 1)
        order.sort(key=self.mins.__getitem__)
        if len(self.seen) >= _SEEN:
            self.seen.clear()
        self.seen[x] = order
        return order

    def find(self, values: dict[str, int], best: _Item | None) -> _Item | None:
        x = values[self.field]
        order = self.seen.get(x)
        return self._find_in(order if order is not None else self._visits(x), values, best)


_Node = _Leaf | _Split | _Slices


def _build(items: list[_Item], fields: tuple[str, ...], depth: int) -> _Node:
    """A leaf, or a split on the field that cuts `items` best (chosen on a sample: the
    choice is speed only, never results), when one cuts the entries tested by half."""
    if len(items) <= _LEAF or depth >= _DEPTH:
        return _Leaf(items)
    sample = items if len(items) <= _SAMPLE else items[:: -(-len(items) // _SAMPLE)]
    best: tuple[float, str, bool] | None = None  # cost, field, sliced
    for f in fields:
        for sliced in (False, True):
            parts, fallback = _slice_cut(sample, f)[1:] if sliced else _cut(sample, f)[1:]
            cost = _cost(parts, fallback)
            if cost <= len(sample) / 2 and (best is None or cost < best[0]):
                best = (cost, f, sliced)
    if best is None:
        return _Leaf(items)
    _, field, sliced = best
    if sliced:
        return _Slices(_slice_cut(items, field), field, fields, depth)
    return _Split(_cut(items, field), field, fields, depth)


_by_rank = attrgetter("rank")
_Prepared = dict[int, _Item]  # id(entry) -> the entry prepared (its `entry` is that entry)


class TableIndex:
    """One table's entries, indexed for `lookup`'s answer in far fewer tests.

    `prepared`: what an earlier index of the same table prepared (its `prepared`); entries
    still there (the same objects) are not prepared again, so a rebuild after a write costs
    a sort and one cut of the table.
    """

    __slots__ = ("prepared", "root")

    def __init__(self, entries: list[TableEntry], prepared: _Prepared | None = None) -> None:
        earlier = prepared or {}
        items: list[_Item] = []
        for e in entries:
            item = earlier.get(id(e))
            items.append(item if item is not None and item.entry is e else _Item.of(e))
        self.prepared: _Prepared = {id(it.entry): it for it in items}  # only what is here now
        # stable: of equal ranks, the first in table order comes first, as in the scan
        items.sort(key=_by_rank, reverse=True)
        fields = tuple(
            sorted(set().union(*(it.spans.keys() | it.slices for it in self.prepared.values())))
        )
        self.root = _build([it.at(pos) for pos, it in enumerate(items)], fields, 0)

    def lookup(self, values: dict[str, int]) -> TableEntry | None:
        """The entry `lookup(entries, values)` returns (field values within their widths)."""
        best = self.root.find(values, None)
        return best.entry if best is not None else None


@dataclass(frozen=True, slots=True)
class IndexedSwitch:
    """A switch's entries grouped by table, built once and reused for every packet; each
    table's `TableIndex` is built on its first lookup (a snapshot nobody sends through
    costs nothing), reusing what the previous version of the switch prepared."""

    tables: SwitchTables
    by_table: dict[str, list[TableEntry]]
    defaults: dict[str, DefaultAction]
    indexes: dict[str, TableIndex] = field(default_factory=dict, compare=False, repr=False)
    carried: dict[str, _Prepared] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, tables: SwitchTables, previous: IndexedSwitch | None = None) -> IndexedSwitch:
        """`previous`: the same switch before its entries changed (the reference switch's
        last snapshot), whose prepared entries the new indexes reuse."""
        by_table: dict[str, list[TableEntry]] = {}
        for e in tables.entries:
            by_table.setdefault(e.table, []).append(e)
        carried = {} if previous is None else previous._prepared()
        return cls(tables, by_table, {d.table: d for d in tables.defaults}, {}, carried)

    def _prepared(self) -> dict[str, _Prepared]:
        return {**self.carried, **{t: i.prepared for t, i in list(self.indexes.items())}}

    def lookup(self, table: str, values: dict[str, int]) -> TableEntry | None:
        """`lookup(self.by_table[table], values)`, through the table's index."""
        index = self.indexes.get(table)
        if index is None:
            entries = self.by_table.get(table, [])
            index = self.indexes[table] = TableIndex(entries, self.carried.get(table))
        return index.lookup(values)


class ScanSwitch(IndexedSwitch):
    """A switch whose lookups are the linear scan: the definition, as benches' baseline."""

    __slots__ = ()

    def lookup(self, table: str, values: dict[str, int]) -> TableEntry | None:
        return lookup(self.by_table.get(table, []), values)


def evaluate(
    switch: SwitchTables | IndexedSwitch, ingress_port: int, pkt: PacketFields
) -> SwitchResult:
    """One switch's verdict on one packet, following the program's apply block."""
    idx = switch if isinstance(switch, IndexedSwitch) else IndexedSwitch.of(switch)
    tables = idx.tables
    sport, dport = pkt.l4()
    values = {
        "ingress_port": ingress_port,
        "src_addr": pkt.src,
        "dst_addr": pkt.dst,
        "protocol": pkt.protocol,
        "l4_src_port": sport,
        "l4_dst_port": dport,
        "tcp_flags": pkt.tcp_flags if pkt.protocol == PROTO_TCP else 0,
    }
    hits: list[Hit] = []
    epoch = idx.defaults.get("epoch")
    values["epoch"] = dict(epoch.params)["value"] if epoch else 0
    hits.append(Hit("epoch", None, "set_epoch", (("value", values["epoch"]),)))

    def apply(table: str, default_action: str, default_params: tuple[tuple[str, int], ...]) -> Hit:
        entry = idx.lookup(table, values)
        hit = Hit(
            table,
            entry,
            entry.action if entry else default_action,
            entry.params if entry else default_params,
        )
        hits.append(hit)
        return hit

    src = apply("src_identity", "drop_spoofed", ())
    if src.action != "set_src_tags":
        spoofed = src.action == "drop_spoofed"
        return SwitchResult(
            tables.switch, tuple(hits), None, spoofed, None, REASON_SPOOF if spoofed else 0
        )
    values["src_tags"] = dict(src.params)["tags"]
    dst = apply("dst_identity", "set_dst_tags", (("tags", NO_TAGS),))
    values["dst_tags"] = dict(dst.params)["tags"]
    verdict = apply("policy", "deny", (("rule_id", 0),))
    rule_id = dict(verdict.params)["rule_id"]
    if verdict.action not in ("permit", "permit_metered"):  # meters are all green here
        logged = verdict.action == "deny_and_log"
        return SwitchResult(
            tables.switch, tuple(hits), None, logged, rule_id, REASON_DENY_LOG if logged else 0
        )
    route = apply("routing", "drop", ())
    port = dict(route.params).get("port") if route.action == "forward" else None
    return SwitchResult(tables.switch, tuple(hits), port, False, rule_id)


@dataclass(frozen=True, slots=True)
class PathResult:
    """A packet's fate across the fabric: delivered to a host port, or where it died."""

    hops: tuple[SwitchResult, ...]
    delivered_to: str | None  # host name
    loop: bool = False

    @property
    def delivered(self) -> bool:
        return self.delivered_to is not None

    @property
    def deciding(self) -> SwitchResult:
        """The first switch that judged the packet by policy (a ToR)."""
        return next((h for h in self.hops if h.rule_id is not None), self.hops[-1])


def fabric_links(
    inventory: Inventory,
) -> tuple[dict[tuple[str, int], tuple[str, int]], dict[tuple[str, int], str]]:
    """(switch, port) -> the (switch, port) at the other end of its link (none to or from a
    spine out of service: a packet sent to it is lost); (switch, port) -> the host there."""
    peer: dict[tuple[str, int], tuple[str, int]] = {}
    for link in inventory.links:
        if link.a in inventory.down or link.b in inventory.down:
            continue
        peer[(link.a, link.a_port)] = (link.b, link.b_port)
        peer[(link.b, link.b_port)] = (link.a, link.a_port)
    return peer, {(h.switch, h.port): h.name for h in inventory.hosts}


class Fabric:
    """The switches of an inventory with their entries, indexed once, to walk packets through."""

    def __init__(
        self,
        tables: Mapping[str, SwitchTables],
        inventory: Inventory,
        indexed: Mapping[str, IndexedSwitch] | None = None,
    ) -> None:
        """`indexed`: the switches already indexed (a proof's cache), by name."""
        self.inventory = inventory
        self.switches = (
            dict(indexed)
            if indexed is not None
            else {name: IndexedSwitch.of(t) for name, t in tables.items()}
        )
        self.peer, self.host_at = fabric_links(inventory)

    def walk(self, src_host: str, pkt: PacketFields) -> PathResult:
        """Send `pkt` from `src_host` and follow it switch by switch."""
        host = self.inventory.hosts_by_name[src_host]
        switch, port = host.switch, host.port
        hops: list[SwitchResult] = []
        for _ in range(MAX_HOPS):
            result = evaluate(self.switches[switch], port, pkt)
            hops.append(result)
            if result.egress_port is None:
                return PathResult(tuple(hops), None)
            out = (switch, result.egress_port)
            if out in self.host_at:
                return PathResult(tuple(hops), self.host_at[out])
            if out not in self.peer:
                return PathResult(tuple(hops), None)
            switch, port = self.peer[out]
        return PathResult(tuple(hops), None, loop=True)
