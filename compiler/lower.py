"""Stage 3 — Policy + inventory -> per-switch table entries (target neutral).

Identities. Each ToR's identity tables give an address a vector of tags, one per endpoint
set it belongs to that the ToR's entries match (compiler/tags.py); a rule's entry matches
its source's tag and its destination's tag, so a rule is one entry per ToR (per protocol
and port range). Tags come from the previous compile's allocation where they still fit
(compiler/allocation.py), so an edit changes only what it touches.

Placement. A ToR binds each host's address to its port (anti-spoofing), accepts the
other racks' hosts on its uplinks, and holds the policy entries of every rule that
involves one of its hosts; it judges traffic from and to its hosts. Spines forward.

Routing. Each destination host takes one of the equal-cost next hops, round robin by
address over all hosts, so every spine carries about 1/N of every rack's destinations and
each packet has one path (no hash in the data plane). A spine out of service
(`inventory.down`) is routed around: only the hosts it carried move (_NextHops.port).

Entries of rules: compiler/rule_entries.py (matches, priority bands, replies, meters).
Quarantine: compiler/quarantine.py (an overlay on the quarantined host's own ToR).
Incremental: given the previous compile, a switch whose inputs did not change is reused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from compiler.addresses import AddressSet, Interval, merge_intervals
from compiler.allocation import Allocation, SideTags
from compiler.diagnostics import error
from compiler.entries import DefaultAction, SwitchTables, TableEntry
from compiler.inventory import Host, Inventory, Switch
from compiler.memo import ByObject, also_forget, collection_paused, differing_places
from compiler.model import Action, Policy, PolicyRule
from compiler.placement import Placement, placement
from compiler.quarantine import (
    QUARANTINE_FIELD,
    QUARANTINE_KEY,
    QUARANTINE_RATES,
    REMEDIATION_KEY,
    overlay_entries,
    quarantine_tags,
    quarantine_values,
    settle_quarantine,
)
from compiler.rule_entries import (
    BAND_DEFAULT,
    FABRIC_RULE_ID,
    MAX_DISTINCT_RATES,
    LowerError,
    RuleParts,
    ToRCodes,
    field_match,
    priority,
    rate_ranks,
    reply_matches,
    rule_parts,
)
from compiler.semantics import PolicySemantics, bits, semantics_of
from compiler.tags import TagSpaceError, allocate_side
from p4src.spec import DEFAULT_RULE_ID, NO_TAGS, TAG_BITS, TAG_FIELD_BITS

__all__ = [  # what the other stages and the tests take from here
    "BAND_DEFAULT",
    "MAX_DISTINCT_RATES",
    "QUARANTINE_FIELD",
    "LowerError",
    "Lowered",
    "cidr_blocks",
    "lower",
    "reply_matches",
    "set_keys",
    "settle_quarantine",
]


def cidr_blocks(lo: int, hi: int, width: int = 32) -> Iterable[tuple[int, int]]:
    """The fewest aligned prefixes covering [lo, hi]: (value, prefix length)."""
    while lo <= hi:
        size = lo & -lo if lo else 1 << width
        while size > hi - lo + 1:
            size >>= 1
        yield lo, width - size.bit_length() + 1
        lo += size


# Identity and routing entries are made once for all the switches holding them: a remote
# host's uplink entry and its route are the same on most ToRs (keyed by ints: fast to hash).
@functools.lru_cache(maxsize=1 << 18)
def _source_entry(port: int, address: int, tags: int, role: str) -> TableEntry:
    matches = (
        field_match("ingress_port", "exact", port),
        field_match("src_addr", "lpm", address, 32),
    )
    return TableEntry("src_identity", matches, "set_src_tags", (("tags", tags),), 33, None, role)


@functools.lru_cache(maxsize=1 << 18)
def _route_entry(address: int, port: int) -> TableEntry:
    matches = (field_match("dst_addr", "lpm", address, 32),)
    return TableEntry("routing", matches, "forward", (("port", port),), 0, None, "host")


# A rule as its entries on a ToR see it (with the ToR's codes): id, action, protocol, ports,
# log, reply, rate and its rank, and its set keys.
_RuleKey = tuple[object, ...]
# A rule's part of a ToR's `policy` entries, by rule object: the rule, its set keys and
# rate rank, and its parts (denies, allows, answers).
_Known = tuple[PolicyRule, str, str, int | None, RuleParts]
# More new rule objects than this in a ToR compiled again: look them up by value too (a
# line inserted above them gives them new objects, a grant rewrites them).
_FEW_NEW = 8


def _rule_key(rule: PolicyRule, src: str, dst: str, rank: int | None) -> _RuleKey:
    return (rule.id, rule.action, rule.proto, rule.ports, rule.log, rule.reply,
            rule.rate_pps, rank, src, dst)  # fmt: skip


def _policy_entries(
    codes: ToRCodes,
    policy: Policy,
    known: Mapping[int, _Known] | None = None,
    rules: Iterable[PolicyRule] | None = None,
    ranks: Mapping[int, int] | None = None,
) -> tuple[tuple[TableEntry, ...], dict[int, _Known]]:
    """A ToR's ordinary `policy` entries (`rule_entries` of its rules), and each rule's
    parts to make them from next time: `known`, the parts made with these very codes (a
    ToR whose tags are kept, `_retagged`), are taken as they are — by rule object, and when
    more than a few rules are new objects, by value too. `rules`: the policy's rules that
    can be relevant, in its order (default: all); `ranks`: rate_ranks of the policy's
    rules, when at hand."""
    known = known or {}
    ranks = rate_ranks(policy.rules) if ranks is None else ranks
    made: dict[int, _Known] = {}
    order: list[_Known | None] = []
    new: list[tuple[int, PolicyRule, str, str, int | None]] = []  # (place, rule, keys, rank)
    relevant, keys = codes.relevant, codes.keys
    for rule in policy.rules if rules is None else rules:
        if rule.id not in relevant:
            continue  # no host of this rack is involved
        src, dst = keys[(rule.id, "src")], keys[(rule.id, "dst")]
        rank = ranks[rule.rate_pps] if rule.rate_pps is not None else None
        found = known.get(id(rule))
        if found is not None and found[0] is rule and found[1:4] == (src, dst, rank):
            made[id(rule)] = found
            order.append(found)
        else:
            new.append((len(order), rule, src, dst, rank))
            order.append(None)
    by_value: dict[_RuleKey, RuleParts] = {}
    if len(new) > _FEW_NEW:
        by_value = {_rule_key(*k[:4]): k[4] for k in known.values()}
    for place, rule, src, dst, rank in new:
        parts = by_value.get(_rule_key(rule, src, dst, rank)) if by_value else None
        if parts is None:
            parts = rule_parts(codes, rule, src, dst, ranks)
        made[id(rule)] = order[place] = (rule, src, dst, rank, parts)
    done = cast("list[_Known]", order)
    entries = [e for k in done for e in k[4][0]]  # denies, then allows, then answers
    entries += [e for k in done for e in k[4][1]]
    entries += [e for k in done for e in k[4][2]]
    if policy.default_log:
        entries.append(_DEFAULT_LOG)
    return tuple(entries), made


_DEFAULT_LOG = TableEntry(
    "policy",
    (),
    "deny_and_log",
    (("rule_id", DEFAULT_RULE_ID),),
    priority(BAND_DEFAULT, DEFAULT_RULE_ID),
    DEFAULT_RULE_ID,
    "default-log",
)


# The fabric as the next hops are found on it: switch -> neighbour -> the port towards it
# (of parallel links between two switches, the last in (a, a_port, b, b_port) order).
_Graph = dict[str, dict[str, int]]


def _topology(inventory: Inventory) -> _Graph:
    graph: _Graph = {s.name: {} for s in sorted(inventory.switches, key=lambda s: s.name)}
    for link in sorted(
        inventory.links, key=lambda link: (link.a, link.a_port, link.b, link.b_port)
    ):
        graph.setdefault(link.a, {})[link.b] = link.a_port
        graph.setdefault(link.b, {})[link.a] = link.b_port
    return graph


def _distances(graph: _Graph, source: str, down: Collection[str] = ()) -> dict[str, int]:
    """Hops from `source` to each switch it reaches (breadth first), not through `down`."""
    dist, frontier = {source: 0}, [source]
    while frontier:
        reached = []
        for switch in frontier:
            for n in graph[switch]:
                if n not in dist and n not in down:
                    dist[n] = dist[switch] + 1
                    reached.append(n)
        frontier = reached
    return dist


@dataclass(frozen=True, slots=True)
class _NextHops:
    """From one switch towards one destination ToR: the ports of the equal-cost next hops
    on the whole fabric, and of those still on a shortest path with the down spines gone."""

    every: tuple[int, ...]
    live: tuple[int, ...]

    def port(self, rank: int) -> int | None:
        """The port for the destination host of `rank` (its place among all hosts by
        address): round robin over every next hop, so that each carries about 1/N of any
        rack's hosts; a host whose next hop is down moves to the live ones, round robin
        too, and the others keep theirs (a spine going down or back moves only its own
        share)."""
        if not self.live:
            return None  # unreachable: no route, the packet is dropped
        if self.every:
            preferred = self.every[rank % len(self.every)]
            if preferred in self.live:
                return preferred
        return self.live[rank % len(self.live)]


def _next_hops(inventory: Inventory, graph: _Graph) -> dict[tuple[str, str], _NextHops]:
    """(switch, destination ToR) -> its next hops, from one BFS per destination ToR on the
    whole fabric and one on the live part. A down spine's own next hops are those of the
    whole fabric: its tables stay what they were, ready for when it comes back."""
    down = inventory.down
    out = {}

    def towards(switch: str, dist: Mapping[str, int]) -> tuple[int, ...]:
        closer = (n for n in graph[switch] if dist.get(n) == dist[switch] - 1)
        return tuple(graph[switch][n] for n in sorted(closer))

    for dest in sorted({h.switch for h in inventory.hosts}):
        if dest not in graph:
            continue
        whole = _distances(graph, dest)
        alive = _distances(graph, dest, down) if dest not in down else {}
        for switch in whole:
            if switch == dest:
                continue
            every = towards(switch, whole)
            if switch in down:
                out[(switch, dest)] = _NextHops(every, every)
            else:
                ports = towards(switch, alive) if switch in alive else ()
                out[(switch, dest)] = _NextHops(every, ports)
    return out


# An inventory's next hops, while its object lives (the verbs parse an unchanged file once).
_NEXT_HOPS: ByObject[Inventory, dict[tuple[str, str], _NextHops]] = ByObject(2)


# Per lowered switch: the runs its entries are the concatenation of (a ToR: its identity
# entries, `policy` entries, quarantine overlay and routes), each a tuple that the next
# compile hands on as it is where it did not change (compiler/emit.py writes each run's
# lines once per tuple).
SEGMENTS: ByObject[SwitchTables, tuple[tuple[TableEntry, ...], ...]] = ByObject(8)


# Per inventory object, per switch: its routing entries (a function of the floor alone: a
# policy edit compiles a ToR again with the same routes).
_ROUTES: ByObject[Inventory, dict[str, tuple[TableEntry, ...]]] = ByObject(2)


def _routing(
    hosts: list[Host], switch: Switch, next_hops: Mapping[tuple[str, str], _NextHops]
) -> list[TableEntry]:
    """Every host's address to its port, or to the uplink towards its ToR that its rank
    picks (`hosts` sorted by address: see _NextHops.port)."""
    entries = []
    for rank, host in enumerate(hosts):
        if host.switch == switch.name:
            port: int | None = host.port
        elif (hops := next_hops.get((switch.name, host.switch))) is not None:
            port = hops.port(rank)
        else:
            port = None
        if port is not None:  # else unreachable: no route, the packet is dropped
            entries.append(_route_entry(host.ip, port))
    return entries


def set_keys(policy: Policy) -> dict[tuple[int, str], str]:
    """The key each rule's source and destination set is tagged under ((rule id, "src" or
    "dst") -> key): its text, whitespace normalised — and, where one text stands for
    different sets in this policy (a quarantine or a grant rewrites sets and keeps texts),
    the text with a digest of the addresses for all but the largest, so that each key
    names one set."""
    return _keys(policy.rules).of


@dataclass(frozen=True, slots=True)
class _Keys:
    """`set_keys` of `rules`, with what finds the next policy's by difference: per text, its
    sets and how many rule sides name each. `base`: the rules of the keys these were made
    from by difference (`removed`, `added`: the rule objects that differ), else None."""

    rules: tuple[PolicyRule, ...]
    of: dict[tuple[int, str], str]
    sets: dict[str, dict[tuple[Interval, ...], int]]
    base: tuple[PolicyRule, ...] | None = None
    removed: tuple[PolicyRule, ...] = ()
    added: tuple[PolicyRule, ...] = ()


_MOST_CHANGED_RULES = 64  # more rules than this differ from the last compile's: in full


def _rule_difference(
    before: tuple[PolicyRule, ...], after: tuple[PolicyRule, ...]
) -> tuple[tuple[PolicyRule, ...], tuple[PolicyRule, ...]] | None:
    """The rule objects of `before` that `after` lacks, and those it adds (in its order);
    None when more than _MOST_CHANGED_RULES differ."""
    if before is after:
        return (), ()
    if len(before) == len(after):  # an edit in place: the rules that differ by position
        moved = differing_places(before, after)
        if len(moved) * 2 <= _MOST_CHANGED_RULES:  # every other rule is in both (once each)
            return tuple(before[i] for i in moved), tuple(after[i] for i in moved)
    old, new = set(map(id, before)), set(map(id, after))
    if len(old ^ new) > _MOST_CHANGED_RULES:
        return None
    return tuple(r for r in before if id(r) not in new), tuple(r for r in after if id(r) not in old)


def _keys(rules: tuple[PolicyRule, ...], last: _Keys | None = None) -> _Keys:
    """`set_keys`, by difference from `last` (the last compile's) when few rule objects
    differ and none of their texts stands for several sets: the other rules' keys are then
    theirs as they were (the bare text)."""
    if last is not None and (found := _rule_difference(last.rules, rules)) is not None:
        removed, added = found
        sets = dict(last.sets)
        counted: dict[str, dict[tuple[Interval, ...], int]] = {}
        for sign, group in ((-1, removed), (1, added)):
            for r in group:
                for text, addresses in ((r.src_text, r.src), (r.dst_text, r.dst)):
                    text = _normalised(text)
                    if text not in counted:
                        counted[text] = dict(sets.get(text, {}))
                    counts = counted[text]
                    if n := counts.get(addresses.intervals, 0) + sign:
                        counts[addresses.intervals] = n
                    else:
                        counts.pop(addresses.intervals, None)
        # Every other rule's key stays what it was when no text that changed stands for
        # several sets, or the sets it stands for are the same (only how many rules name
        # each changed): the largest keeps the bare text, as it did.
        if all(
            (len(sets.get(t, ())) <= 1 and len(c) <= 1) or c.keys() == sets.get(t, {}).keys()
            for t, c in counted.items()
        ):
            for text, counts in counted.items():
                if counts:
                    sets[text] = counts
                else:
                    sets.pop(text, None)
            of = dict(last.of)
            for r in removed:
                del of[(r.id, "src")], of[(r.id, "dst")]
            for r in added:
                for side, text, addresses in (
                    ("src", r.src_text, r.src),
                    ("dst", r.dst_text, r.dst),
                ):
                    text = _normalised(text)
                    of[(r.id, side)] = _set_key(text, addresses.intervals, sets[text])
            return _Keys(rules, of, sets, last.rules, removed, added)
    return _keys_in_full(rules)


def _set_key(
    text: str, intervals: tuple[Interval, ...], sets: Mapping[tuple[Interval, ...], int]
) -> str:
    """The key of the set `intervals` a rule names by `text`, which stands for `sets`: the
    bare text, unless the text stands for several sets and this is not the largest."""
    if len(sets) <= 1 or intervals == _largest(sets):
        return text
    return f"{text} ~{hashlib.sha256(repr(intervals).encode()).hexdigest()[:12]}"


def _largest(sets: Iterable[tuple[Interval, ...]]) -> tuple[Interval, ...]:
    return max(sets, key=lambda iv: (sum(hi - lo + 1 for lo, hi in iv), iv))


def _keys_in_full(rules: tuple[PolicyRule, ...]) -> _Keys:
    sets: dict[str, dict[tuple[Interval, ...], int]] = {}
    uses: list[tuple[tuple[int, str], str, tuple[Interval, ...]]] = []
    for rule in rules:
        for side, text, addresses in (
            ("src", rule.src_text, rule.src),
            ("dst", rule.dst_text, rule.dst),
        ):
            text = _normalised(text)
            counts = sets.get(text)
            if counts is None:
                counts = sets[text] = {}
            counts[addresses.intervals] = counts.get(addresses.intervals, 0) + 1
            uses.append(((rule.id, side), text, addresses.intervals))
    # The largest of a text's sets keeps the bare text: a quarantine or a grant carves
    # pieces out of a service, and the service itself keeps its tags.
    out = {use: _set_key(text, intervals, sets[text]) for use, text, intervals in uses}
    return _Keys(rules, out, sets)


@functools.lru_cache(maxsize=1 << 16)
def _normalised(text: str) -> str:
    """A set's text with its whitespace normalised (rules naming a service share its text)."""
    return " ".join(text.split())


def _atom_intervals(semantics: PolicySemantics) -> list[list[Interval]]:
    """Each address atom's intervals, in one pass over the partition."""
    part = semantics.addresses
    out: list[list[Interval]] = [[] for _ in range(part.count)]
    for i, start in enumerate(part.starts):
        end = part.starts[i + 1] - 1 if i + 1 < len(part.starts) else part.top
        out[part.element_atom[i]].append((start, end))
    return out


def _tor_codes(
    semantics: PolicySemantics,
    policy: Policy,
    switch: str,
    local: int,
    hosts: int,
    keys: Mapping[tuple[int, str], str],
    allocation: Allocation,
    remediation: int,
) -> tuple[ToRCodes, SideTags, SideTags]:
    """Allocate the ToR's tags (compiler.tags): every set its entries match, on the universe
    where the ToR needs it exact (its own hosts, every host, or every address), and the
    `remediation` service (atoms) on every address, for a quarantine overlay (its hosts'
    values of the reserved field: _quarantined)."""
    full = semantics.addresses.full
    src_needs: dict[str, tuple[int, int]] = {}
    dst_needs: dict[str, tuple[int, int]] = {}

    def need(src_key: str, src: int, dst_key: str, dst: int) -> None:
        # Packets from this rack go anywhere; packets from elsewhere come to this rack.
        for needs, key, mask, universe in (
            (src_needs, src_key, src, hosts if dst & local else local),
            (dst_needs, dst_key, dst, full if src & local else local),
        ):
            old = needs.get(key, (mask, 0))
            needs[key] = (mask, old[1] | universe)

    relevant = set()
    # The rules naming a local atom on either side (the semantics index them by atom).
    touching = semantics.src_any | semantics.dst_any if local else 0
    for atom in bits(local):
        touching |= semantics.src_index[atom] | semantics.dst_index[atom]
    for i in bits(touching):
        rule = policy.rules[i]
        _, src, dst, _ = semantics.boxes[i]
        relevant.add(rule.id)
        src_key, dst_key = keys[(rule.id, "src")], keys[(rule.id, "dst")]
        need(src_key, src, dst_key, dst)
        if _REPLIED.get(rule, _replied):
            need(dst_key, dst, src_key, src)
    if remediation:  # always, quarantine or not: a quarantine then changes no ordinary tag
        src_needs[REMEDIATION_KEY] = dst_needs[REMEDIATION_KEY] = (remediation, full)
    intervals_of: list[list[Interval]] = []

    def digest(atoms: int) -> str:
        """A set of atoms by its addresses, merged: the same whatever the partition (atoms
        are renumbered and cut differently by any edit, even one elsewhere)."""
        if not intervals_of:
            intervals_of.extend(_atom_intervals(semantics))
        spans = merge_intervals(iv for a in bits(atoms) for iv in intervals_of[a])
        return hashlib.sha256(repr(spans).encode()).hexdigest()[:16]

    sides = []
    previous = {side: allocation.tags.get((switch, side), SideTags()) for side in ("src", "dst")}
    ordinary = _ordinary(previous["src"])
    for side, needs, before in (("src", src_needs, ordinary), ("dst", dst_needs, previous["dst"])):
        try:
            sides.append(allocate_side(needs, before, QUARANTINE_FIELD, full, digest))
        except TagSpaceError as exc:
            raise LowerError(
                [
                    error(
                        "E501",
                        f"switch {switch}: the {side} identities need more than "
                        f"{exc.available} tag fields of {TAG_FIELD_BITS} bits (the pipeline's "
                        f"{TAG_BITS}-bit vector): too many overlapping address sets",
                        None,
                    )
                ]
            ) from None
    (src_codes, src_tags), (dst_codes, dst_tags) = sides
    codes = ToRCodes(frozenset(relevant), keys, src_codes, dst_codes)
    return codes, src_tags, dst_tags


def _ordinary(side: SideTags) -> SideTags:
    """A ToR's source tags without its quarantine values (kept apart: _quarantined)."""
    if _plain(side):
        return side
    tags = {k: t for k, t in side.tags.items() if not k.startswith(QUARANTINE_KEY)}
    return SideTags(tags, side.retired, side.shared)


def _plain(side: SideTags) -> bool:
    """Whether a side holds no quarantine value, held or retired (once per object:
    an allocation hands a ToR's tags on as they were, compile after compile)."""
    return _PLAIN.get(side, _holds_none)


def _holds_none(side: SideTags) -> bool:
    return not any(k.startswith(QUARANTINE_KEY) for k in side.tags) and not any(
        t[0] == QUARANTINE_FIELD for t in side.retired
    )


_PLAIN: ByObject[SideTags, bool] = ByObject(128)


def _quarantined(
    codes: ToRCodes,
    src_tags: SideTags,
    switch: str,
    quarantined: Mapping[int, int],
    previous: SideTags,
) -> tuple[ToRCodes, SideTags]:
    """The ToR's ordinary codes and source tags with a value of the reserved field for each
    of its `quarantined` hosts (address -> atom), kept from the `previous` source tags."""
    if not quarantined and _plain(previous) and _plain(src_tags):
        return dataclasses.replace(codes, quarantined={}), src_tags  # none, before or now
    values, record, released = quarantine_values(switch, sorted(quarantined), previous)
    by_atom = {quarantined[a]: v for a, v in values.items()}
    tags = SideTags({**src_tags.tags, **record}, src_tags.retired | released, src_tags.shared)
    return dataclasses.replace(codes, quarantined=by_atom), tags


@dataclass(frozen=True, slots=True)
class _Made:
    """What a ToR's entries were made from, kept by their tables object (`_MADE`): when only
    its quarantined hosts change, `lower` makes them again from this, with neither the
    policy's semantics nor the tag allocation (a quarantine adds no ordinary tag); when its
    rules change but not its tag needs, only its `policy` entries (`_retagged`)."""

    ordinary: str  # the ToR's inputs digest without its quarantined hosts
    rules: Sequence[PolicyRule]  # the ordinary policy's rules its `policy` entries are of
    # what its atoms are numbered by (codes, host_atoms): the semantics of `rules`, or of
    # the earlier version its needs were first allocated for
    semantics: PolicySemantics
    host_atoms: tuple[tuple[Host, int], ...]
    codes: ToRCodes  # no host quarantined
    src: SideTags  # each side's ordinary tags, as the allocation made them
    dst: SideTags
    policy: tuple[TableEntry, ...]  # the ordinary `policy` entries
    parts: Mapping[int, _Known]  # what they were put together from, per rule object
    needs: _Needs  # what its tags were allocated for, in addresses (`_needs`)
    # its identity entries with no host quarantined, once made (the same for the next
    # compile whose needs are these: `_retagged`)
    identity: tuple[TableEntry, ...] | None = None


# Per lowered ToR: how it was made (one build's ToRs and a few replaced ones).
_MADE: ByObject[SwitchTables, _Made] = ByObject(8)


def _same_ordinary(
    made: _Made, ordinary: str, rules: Sequence[PolicyRule], allocation: Allocation, switch: str
) -> bool:
    """Whether the ToR's ordinary entries and tags are still what `made` says: the same
    ordinary inputs and rules, and the allocation holding the tags it made (so that the
    allocator, given them again, keeps every one: compiler/tags.allocate_side)."""
    return (
        made.ordinary == ordinary and made.rules == rules and _holds_tags(made, allocation, switch)
    )


def _holds_tags(made: _Made, allocation: Allocation, switch: str) -> bool:
    """Whether `allocation` holds the ordinary tags `made` was made with (so that the
    allocator, given them again for the same needs, keeps every one)."""
    src = _ordinary(allocation.tags.get((switch, "src"), SideTags()))
    dst = allocation.tags.get((switch, "dst"), SideTags())
    return (src.tags, src.shared, dst.tags, dst.shared) == (
        made.src.tags,
        made.src.shared,
        made.dst.tags,
        made.dst.shared,
    )


def _make_tor(
    sem: PolicySemantics,
    policy: Policy,
    switch: str,
    hosts_sorted: list[Host],
    keys: Mapping[tuple[int, str], str],
    allocation: Allocation,
    service: AddressSet | None,
    ordinary: str,
    needs: _Needs,
) -> _Made:
    """A ToR's ordinary codes, tags and `policy` entries (no host quarantined)."""
    part = sem.addresses
    host_atoms = tuple((h, part.atom_of(h.ip)) for h in hosts_sorted)
    local = hosts = 0
    for host, atom in host_atoms:
        hosts |= 1 << atom
        if host.switch == switch:
            local |= 1 << atom
    remediation = part.mask(service.intervals) if service else 0
    codes, src, dst = _tor_codes(sem, policy, switch, local, hosts, keys, allocation, remediation)
    entries, parts = _policy_entries(codes, policy)
    return _Made(ordinary, policy.rules, sem, host_atoms, codes, src, dst, entries, parts, needs)


# A ToR's tag needs in addresses: per side, (set key, its intervals, its universe), and
# what every ToR's needs share (the inventory, the `remediation` service).
_Need = tuple[str, tuple[Interval, ...], int]
_Needs = tuple[str, frozenset[_Need], frozenset[_Need]]
# The universe a set is tagged on (compiler/tags.py), widest last: this rack's hosts,
# every host, every address (what `_tor_codes` ORs together as atoms).
_LOCAL, _HOSTS, _FULL = 0, 1, 2


# A ToR's tag needs, counted so that a compile can find its own from the last one's by
# difference: per side, set key -> [its intervals, how many uses need each universe
# (_LOCAL, _HOSTS, _FULL)].
_NeedCounts = tuple[dict[str, list[Any]], dict[str, list[Any]]]


def _count_needs(
    counts: _NeedCounts,
    touching: Iterable[tuple[PolicyRule, bool, bool]],
    keys: Mapping[tuple[int, str], str],
    sign: int = 1,
) -> bool:
    """Count (`sign` 1) or take back (-1) the needs of the rules `touching` a ToR (rule,
    whether its source / destination has a host there), in place; a key's counts are
    copied before they change (the last compile's stay as they were). Whether a key came
    or went, or its widest universe changed (else `_needs` gives what it gave)."""
    src, dst = counts
    moved = False

    def need(src_key: str, src_set: AddressSet, src_in: bool,
             dst_key: str, dst_set: AddressSet, dst_in: bool) -> None:  # fmt: skip
        for needs, key, addresses, level in (
            (src, src_key, src_set, _HOSTS if dst_in else _LOCAL),
            (dst, dst_key, dst_set, _FULL if src_in else _LOCAL),
        ):
            nonlocal moved
            found = needs.get(key)
            if found is None:
                before, found = None, [addresses.intervals, 0, 0, 0]
            else:
                before, found = _widest(found), [*found]
            found[1 + level] += sign
            if any(found[1:]):
                needs[key] = found
                moved = moved or _widest(found) != before
            else:
                del needs[key]
                moved = True

    for rule, src_in, dst_in in touching:
        src_key, dst_key = keys[(rule.id, "src")], keys[(rule.id, "dst")]
        need(src_key, rule.src, src_in, dst_key, rule.dst, dst_in)
        if _REPLIED.get(rule, _replied):
            need(dst_key, rule.dst, dst_in, src_key, rule.src, src_in)
    return moved


def _widest(found: list[Any]) -> int:
    """The widest universe some use needs (found: [intervals, _LOCAL, _HOSTS, _FULL counts])."""
    return _FULL if found[1 + _FULL] else _HOSTS if found[1 + _HOSTS] else _LOCAL


def _needs(floor: str, counts: _NeedCounts) -> _Needs:
    """What `_tor_codes` allocates a ToR's tags from, in addresses rather than atoms (atoms
    are renumbered by any edit): for each set key of the rules touching the ToR, its
    addresses and the widest universe it needs (`counts`: `_count_needs`). Two compiles
    with equal needs and the same tags in the allocation make the same tags and the same
    identity entries (`_retagged`)."""
    src, dst = counts
    return (
        floor,
        frozenset((k, found[0], _widest(found)) for k, found in src.items()),
        frozenset((k, found[0], _widest(found)) for k, found in dst.items()),
    )


def _replied(rule: PolicyRule) -> bool:
    """Whether the ToRs hold reply entries for `rule` (its sets then also tag reversed)."""
    return bool(reply_matches(rule, udp_always=rule.action is Action.DENY))


_RULE_ID = operator.attrgetter("id")
_MEANING = operator.attrgetter("meaning")
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


# Per rule object, `_replied` (every ToR a rule touches asks, compile after compile).
_REPLIED: ByObject[PolicyRule, bool] = ByObject(100_000)


def _retagged(
    made: _Made,
    needs: _Needs,
    policy: Policy,
    touching: Sequence[tuple[PolicyRule, bool, bool]],
    keys: Mapping[tuple[int, str], str],
    allocation: Allocation,
    switch: str,
    ordinary: str,
    ranks: Mapping[int, int],
) -> _Made | None:
    """A ToR whose rules changed but whose tag needs did not (a port, an action, a rule
    whose sets it already tags on the same universes), with the allocation holding the tags
    it was made with: the allocator would give every set its tag again and the identity
    entries would be the same, so only its `policy` entries are made again, with neither
    the policy's semantics nor the allocator. None: not such a ToR."""
    if made.needs != needs or not _holds_tags(made, allocation, switch):
        return None
    # its rules' parts: the same codes; its rules are those touching it, in the policy's order
    mine = [rule for rule, _, _ in touching]
    relevant = frozenset(map(_RULE_ID, mine))
    codes = dataclasses.replace(made.codes, relevant=relevant, keys=keys)
    entries, parts = _policy_entries(codes, policy, made.parts, mine, ranks)
    return dataclasses.replace(made, ordinary=ordinary, rules=policy.rules, codes=codes,
                               policy=entries, parts=parts)  # fmt: skip


def _spine_identity(uplinks: list[int]) -> list[TableEntry]:
    """A spine's `src_identity`: any source from the fabric, no tags (ToRs judge)."""
    return [
        TableEntry(
            "src_identity",
            # Any source from the fabric: a don't-care, so the address is left out.
            (field_match("ingress_port", "exact", port),),
            "set_src_tags",
            (("tags", NO_TAGS),),
            1,
            role="fabric",
        )
        for port in sorted(set(uplinks))
    ]


def _identity(
    codes: ToRCodes,
    semantics: PolicySemantics,
    hosts: list[tuple[Host, int]],
    switch: Switch,
    uplinks: list[int],
) -> list[TableEntry]:
    """A ToR's identity tables: its hosts and destinations with their vectors (`hosts`:
    every host with its atom, by address)."""
    entries: list[TableEntry] = []
    part = semantics.addresses
    vectors = codes.src.vector_of_atom
    cut = {atom: quarantine_tags(v) for atom, v in codes.quarantined.items()}
    for host, atom in hosts:
        vector = vectors.get(atom, NO_TAGS)
        if host.switch == switch.name:
            vector = cut.get(atom, vector)
            entries.append(_source_entry(host.port, host.ip, vector, "host"))
        else:  # another rack's host, arriving from the fabric
            entries += [_source_entry(uplink, host.ip, vector, "uplink") for uplink in uplinks]
    # Destinations: each host's address alone, so that a host whose memberships change
    # changes its own entry only; between hosts, runs of addresses with one vector, so
    # that a cut another rule makes elsewhere in the address space changes nothing here.
    runs: list[tuple[int, int, int]] = []
    vectors = {**codes.dst.vector_of_atom, **cut}  # a quarantined host: its own interval
    host_ips = {h.ip for h, _ in hosts}
    for i, start in enumerate(part.starts):
        end = part.starts[i + 1] - 1 if i + 1 < len(part.starts) else part.top
        vector = vectors.get(part.element_atom[i], NO_TAGS)
        alone = start == end and start in host_ips
        if runs and not alone and runs[-1][2] == vector and runs[-1][1] + 1 == start:
            last = runs[-1]
            if not (last[0] == last[1] and last[0] in host_ips):
                runs[-1] = (last[0], end, vector)
                continue
        runs.append((start, end, vector))
    for lo, hi, vector in runs:
        if vector == NO_TAGS:
            continue  # dst_identity's default
        entries += (_destination_entry(value, plen, vector) for value, plen in cidr_blocks(lo, hi))
    return entries


@functools.lru_cache(maxsize=1 << 18)
def _destination_entry(value: int, plen: int, tags: int) -> TableEntry:
    matches = (field_match("dst_addr", "lpm", value, plen),) if plen else ()
    return TableEntry("dst_identity", matches, "set_dst_tags", (("tags", tags),), plen + 1,
                      role="identity")  # fmt: skip


@dataclass(frozen=True, slots=True)
class _RuleInputs:
    """A rule's part of the switches' inputs (`_switch_inputs`), and what it was made from
    beyond the rule object: the same rule object with the same keys and rate rank on the
    same floor is found again (most rules of a long-running controller's next policy,
    compiler.resolve keeping the rules of unchanged statements)."""

    rule: PolicyRule
    placed: Placement
    src_key: str
    dst_key: str
    rank: int | None
    meaning: str
    tors: tuple[tuple[str, tuple[PolicyRule, bool, bool]], ...]  # ToR, (rule, src there, dst there)


def _rule_inputs(
    r: PolicyRule,
    placed: Placement,
    src_key: str,
    dst_key: str,
    rank: int | None,
    side: Callable[[AddressSet], tuple[str, frozenset[str]]],
) -> _RuleInputs:
    (src_at, src_tors), (dst_at, dst_tors) = side(r.src), side(r.dst)
    touched = src_tors | dst_tors
    meaning = _meaning((
        r.id, r.action.value, src_at, dst_at, r.proto, r.ports, r.log, r.reply,
        r.rate_pps, src_key, dst_key, rank,
    )) if touched else ""  # fmt: skip
    tors = tuple((t, (r, t in src_tors, t in dst_tors)) for t in sorted(touched))
    made = _RuleInputs(r, placed, src_key, dst_key, rank, meaning, tors)
    if len(_RULE_INPUTS) >= _RULE_INPUTS_MAX:
        _RULE_INPUTS.clear()
    _RULE_INPUTS[id(r)] = made  # holds the rule: its id stays its own while remembered
    return made


_RULE_INPUTS: dict[int, _RuleInputs] = {}
_RULE_INPUTS_MAX = 100_000  # emptied past this: two 10k-rule policies' rules many times over
also_forget(_RULE_INPUTS.clear)


@dataclass(frozen=True, slots=True)
class Lowered:
    """Every switch's entries, and the allocation they were made with (to keep for next time)."""

    switches: tuple[SwitchTables, ...]
    allocation: Allocation
    tag_fields: int  # the most fields one side of one ToR uses
    # Per switch: a digest of everything its entries depend on but the allocation, and the
    # tag fields it uses — what the next compile needs to reuse it (see `lower`).
    inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    fields: Mapping[str, int] = dataclasses.field(default_factory=dict)
    reused: frozenset[str] = frozenset()  # switches taken as they were from `previous`
    down: frozenset[str] = frozenset()  # the spines routed around (inventory.down)
    # ToRs whose quarantined hosts alone changed: made again from how they were (`_Made`)
    requarantined: frozenset[str] = frozenset()
    # ToRs whose rules changed but not their tag needs: only their `policy` entries made
    # again (`_retagged`)
    retagged: frozenset[str] = frozenset()
    # What the switches' inputs were found from: the next compile finds its own by
    # difference (`_switch_inputs`)
    given: _Inputs | None = dataclasses.field(default=None, repr=False, compare=False)


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=1 << 16)
def _meaning(parts: tuple[object, ...]) -> str:
    """A rule's digest among a switch's inputs: the tuple hashes in microseconds, its repr
    and SHA-256 cost far more, for every rule of every compile."""
    return _digest(*parts)


@functools.lru_cache(maxsize=1 << 16)
def _addresses(intervals: tuple[Interval, ...]) -> str:
    """An address set's digest among a rule's meaning (`_switch_inputs`)."""
    return _digest(intervals)


# The entries and digests made once per value are memos too: a new process has none.
for _made_once in (_source_entry, _route_entry, _destination_entry, _meaning, _addresses):
    also_forget(_made_once.cache_clear)


def _inventory_digest(inventory: Inventory) -> str:
    return _digest(inventory.hosts, inventory.switches, inventory.links)


# Per inventory object: its digest among the switches' inputs (a repr of 1,000 hosts).
_INVENTORY_DIGESTS: ByObject[Inventory, str] = ByObject(2)


def _switch_inputs(
    policy: Policy,
    inventory: Inventory,
    keys: _Keys,
    remediation: AddressSet | None,
    quarantined: set[int],
    last: _Inputs | None = None,
) -> _Inputs:
    """Per switch, a digest of what its entries are made from, at the level of addresses
    (atoms are renumbered by any edit): the inventory and the remediation service (tagged
    on every ToR); for a ToR, every rule naming one of its hosts — its id, meaning, set
    keys and rate rank —, the default rule, and its quarantined hosts. The down spines are
    left out: they change routing only (`lower` makes it again, _rerouted). Also the same
    digest without the quarantined hosts: what a ToR's ordinary entries are made from;
    and per ToR, the rules touching it (`_Inputs`).

    By difference from `last` (the last compile's) when `keys` were found by difference
    from its keys and nothing else a rule's part depends on changed: only the ToRs of the
    rules that differ are digested again."""
    by_difference = last is not None and keys.base is not None and keys.base is last.rules
    if by_difference:
        assert last is not None
        logging = last.logging - sum(r.log for r in keys.removed) + sum(r.log for r in keys.added)
    else:
        logging = sum(r.log for r in policy.rules)
    floor = _digest(
        _INVENTORY_DIGESTS.get(inventory, _inventory_digest),
        remediation.intervals if remediation else None,
        logging > 0,  # some rule logs: a quarantine overlay logs its catch-all then
    )
    held = {h.ip: h.switch for h in inventory.hosts if h.ip in quarantined}
    placed = placement(inventory)
    rate_rank = rate_ranks(policy.rules)
    # Per address set object (rules naming one service share it): a digest of its
    # addresses, and the ToRs hosting one. 20,000 sides of a 10k-rule policy are about
    # 1,400 sets, so each set's intervals are hashed once, not once per rule.
    sides: dict[int, tuple[str, frozenset[str]]] = {}

    def side(addresses: AddressSet) -> tuple[str, frozenset[str]]:
        found = sides.get(id(addresses))
        if found is None:
            intervals = addresses.intervals
            found = sides[id(addresses)] = (_addresses(intervals), placed.tors_of(intervals))
        return found

    def part(r: PolicyRule) -> _RuleInputs:
        src_key, dst_key = keys.of[(r.id, "src")], keys.of[(r.id, "dst")]
        rank = rate_rank.get(r.rate_pps) if r.rate_pps is not None else None
        found = _RULE_INPUTS.get(id(r))
        if (
            found is None
            or found.rule is not r
            or found.placed is not placed
            or (found.src_key, found.dst_key, found.rank) != (src_key, dst_key, rank)
        ):
            found = _rule_inputs(r, placed, src_key, dst_key, rank, side)
        return found

    same = (placed, floor, policy.default_log, rate_rank)
    if by_difference and last is not None and (
        last.placed, last.floor, last.default_log, last.rate_rank) == same:  # fmt: skip
        by_rule = dict(last.by_rule)
        changed: set[str] = set()
        for r in keys.removed:
            changed.update(t for t, _ in by_rule.pop(id(r)).tors)
        for r in keys.added:
            made = by_rule[id(r)] = part(r)
            changed.update(t for t, _ in made.tors)
        mine, touching, ordinary = dict(last.mine), dict(last.touching), dict(last.ordinary)
        needed, needs = dict(last.needed), dict(last.needs)
        if changed:
            # (each pass over a ToR's thousand rules below runs in C: map, zip, sorted)
            order = dict(zip(map(id, policy.rules), itertools.count()))
            gone = {id(r) for r in keys.removed}
            added = {id(r) for r in keys.added}
            for t in changed:
                here = [x for x in last.touching.get(t, ()) if id(x[0]) not in gone]
                here += [x for r in keys.added for u, x in by_rule[id(r)].tors if u == t]
                places = map(order.__getitem__, map(id, map(_FIRST, here)))  # policy order
                here = list(map(_SECOND, sorted(zip(places, here, strict=True), key=_FIRST)))
                touching[t] = here
                rules_here = map(by_rule.__getitem__, map(id, map(_FIRST, here)))
                mine[t] = sorted(map(_MEANING, rules_here))
                ordinary[t] = _digest(floor, t, policy.default_log, mine[t])
                known = needs.pop(t, None)
                if (counted := needed.get(t)) is not None:  # its needs, by difference too
                    counts = needed[t] = (dict(counted[0]), dict(counted[1]))
                    gone_here = [
                        x for r in keys.removed for u, x in last.by_rule[id(r)].tors if u == t
                    ]
                    moved = _count_needs(counts, gone_here, last.keys.of, -1)
                    new_here = [x for x in here if id(x[0]) in added]
                    moved = _count_needs(counts, new_here, keys.of) or moved
                    if known is not None and not moved:
                        needs[t] = known
    else:
        by_rule, needed, needs = {}, {}, {}
        lists: dict[str, list[str]] = {t: [] for t in placed.tors}
        touching = {t: [] for t in placed.tors}
        for r in policy.rules:
            made = by_rule[id(r)] = part(r)
            for t, touched in made.tors:
                lists[t].append(made.meaning)
                touching[t].append(touched)
        mine = {t: sorted(found) for t, found in lists.items()}
        ordinary = {
            sw.name: _digest(floor, sw.name, policy.default_log, mine.get(sw.name, []))
            for sw in inventory.switches
        }
    inputs = {
        name: _digest(digest, sorted(ip for ip, tor in held.items() if tor == name))
        for name, digest in ordinary.items()
    }
    return _Inputs(inputs, ordinary, floor, touching, policy.rules, keys, placed,
                   policy.default_log, rate_rank, mine, by_rule, logging, needed, needs)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Inputs:
    """What `_switch_inputs` finds: per switch, the digest of its inputs and of its ordinary
    inputs (no host quarantined); the part every switch shares; per ToR, the rules touching
    it (rule, whether its source / destination has a host there). And what the next
    compile finds its own from by difference: the rules, their keys, the floor, the
    default's logging and the rate ranks they were made with, each ToR's rule meanings
    (sorted) and each rule's part (by id of the rule object, which `rules` holds)."""

    of: dict[str, str]
    ordinary: dict[str, str]
    floor: str
    touching: dict[str, list[tuple[PolicyRule, bool, bool]]]
    rules: tuple[PolicyRule, ...]
    keys: _Keys
    placed: Placement
    default_log: bool
    rate_rank: dict[int, int]
    mine: dict[str, list[str]]
    by_rule: dict[int, _RuleInputs]
    logging: int  # how many rules log
    # Per ToR, its needs counted (`_count_needs`), once asked for (`needs_of`), and what
    # `_needs` made of them (the same object while they are the same)
    needed: dict[str, _NeedCounts] = dataclasses.field(default_factory=dict)
    needs: dict[str, _Needs] = dataclasses.field(default_factory=dict)

    def needs_of(self, tor: str) -> _Needs:
        """The ToR's tag needs (`_needs`), counted once (or by difference, `_switch_inputs`)."""
        found = self.needs.get(tor)
        if found is not None:
            return found
        counts = self.needed.get(tor)
        if counts is None:
            counts = self.needed[tor] = ({}, {})
            _count_needs(counts, self.touching.get(tor, ()), self.keys.of)
        found = self.needs[tor] = _needs(self.floor, counts)
        return found


@collection_paused()  # see build: every full collection would walk what it makes
def lower(
    policy: Policy,
    inventory: Inventory,
    allocation: Allocation | None = None,
    previous: Lowered | None = None,
) -> Lowered:
    """Every switch's entries for `policy` on `inventory` (epoch left wildcard), with the
    tags of `allocation` kept where they still fit (compiler.tags).

    Incremental: given the `previous` compile (whose allocation is `allocation`), a switch
    whose inputs are unchanged (the digest of `_switch_inputs`) is taken as it was — exactly
    what compiling it again would give, since its tags all still fit — and the policy's
    semantics are only built if some switch must be compiled again.
    """
    allocation = allocation or Allocation()
    quarantine = policy.quarantine
    policy = policy.uncarved()  # the ordinary entries; a quarantine is an overlay
    service = policy.remediation()
    cut = set(quarantine.hosts) if quarantine else set()
    # The rules whose source, and whose destination, meets the `remediation` service (by id).
    meets: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())
    if service is not None:
        meets = (
            frozenset(r.id for r in policy.rules if r.src.meets(service)),
            frozenset(r.id for r in policy.rules if r.dst.meets(service)),
        )
        # A quarantine overlay ranks the rates of the rules meeting `remediation` in 8 bits:
        # refuse such a policy now, not the day a host must be cut off.
        meeting = (r for r in policy.rules if r.id in meets[0] or r.id in meets[1])
        rate_ranks(meeting, QUARANTINE_RATES, "among the rules meeting `remediation`, a quarantine")
    last = previous.given if previous is not None else None
    keyed = _keys(policy.rules, last.keys if last is not None else None)
    keys = keyed.of
    given = _switch_inputs(policy, inventory, keyed, service, cut, last)
    inputs, ordinary = given.of, given.ordinary
    _MADE.hold(len(inventory.switches))
    before = {sw.switch: sw for sw in previous.switches} if previous is not None else {}

    def reusable(name: str) -> bool:
        if previous is None or previous.inputs.get(name) != inputs[name] or name not in before:
            return False
        return all(
            allocation.tags.get((name, side)) == previous.allocation.tags.get((name, side))
            for side in ("src", "dst")
        )

    @functools.cache
    def semantics() -> PolicySemantics:
        pinned = tuple(h.ip for h in inventory.hosts)
        return semantics_of(policy, pinned, service.intervals if service else None)

    next_hops = _NEXT_HOPS.get(inventory, lambda inv: _next_hops(inv, _topology(inv)))
    tags: dict[tuple[str, str], SideTags] = {}
    hosts_sorted = sorted(inventory.hosts, key=lambda h: h.ip)
    out = []
    fields: dict[str, int] = {}
    reused = set()
    requarantined = set()
    retagged = set()
    for switch in sorted(inventory.switches, key=lambda s: s.device_id):
        if reusable(switch.name):
            assert previous is not None
            held = before[switch.name]
            _MADE.find(held)  # still in use: the last to forget
            if previous.down != inventory.down:
                held = _rerouted(held, hosts_sorted, switch, next_hops)
            out.append(held)
            reused.add(switch.name)
            for which in ("src", "dst"):
                if (found := previous.allocation.tags.get((switch.name, which))) is not None:
                    tags[(switch.name, which)] = found
            fields[switch.name] = previous.fields.get(switch.name, 0)
            continue
        uplinks = sorted(
            port
            for link in inventory.links
            for name, port in ((link.a, link.a_port), (link.b, link.b_port))
            if name == switch.name
        )
        made = None  # how a ToR's entries are made (`_Made`)
        if switch.role == "tor":
            made = _MADE.find(before[switch.name]) if switch.name in before else None
            src_now = allocation.tags.get((switch.name, "src"), SideTags())
            if made is not None and _same_ordinary(
                made, ordinary[switch.name], policy.rules, allocation, switch.name
            ):  # only its quarantined hosts changed: every ordinary tag is kept as it was
                requarantined.add(switch.name)
            else:
                touching = given.touching.get(switch.name, [])
                needs = given.needs_of(switch.name)
                again = None if made is None else _retagged(
                    made, needs, policy, touching, keys, allocation, switch.name,
                    ordinary[switch.name], given.rate_rank,
                )  # fmt: skip
                if again is not None:  # its rules changed, not what its tags are for
                    made = again
                    retagged.add(switch.name)
                else:
                    made = _make_tor(semantics(), policy, switch.name, hosts_sorted, keys,
                                     allocation, service, ordinary[switch.name], needs)  # fmt: skip
            if switch.name in requarantined or switch.name in retagged:
                src = _ordinary(src_now)
                tags[(switch.name, "dst")] = allocation.tags.get((switch.name, "dst"), SideTags())
            else:
                src, tags[(switch.name, "dst")] = made.src, made.dst
            here = [(h, a) for h, a in made.host_atoms if h.switch == switch.name and h.ip in cut]
            codes, tags[(switch.name, "src")] = _quarantined(
                dataclasses.replace(made.codes, keys=keys),
                src,
                switch.name,
                {h.ip: a for h, a in here},
                src_now,
            )
            fields[switch.name] = max(codes.src.fields, codes.dst.fields)
            if here or made.identity is None:
                identity = tuple(
                    _identity(codes, made.semantics, list(made.host_atoms), switch, uplinks)
                )
                if not here:  # no quarantine cut: what the next compile with these needs makes
                    made = dataclasses.replace(made, identity=identity)
            else:
                identity = made.identity
            segments = [identity, made.policy, tuple(overlay_entries(codes, policy, meets, here))]
        else:
            fabric = TableEntry(
                "policy", (), "permit", (("rule_id", FABRIC_RULE_ID),), 1, FABRIC_RULE_ID, "fabric"
            )
            segments = [(*_spine_identity(uplinks), fabric)]
        routes = _ROUTES.get(inventory, lambda _inv: {})
        if (route := routes.get(switch.name)) is None:
            route = routes[switch.name] = tuple(_routing(hosts_sorted, switch, next_hops))
        segments.append(route)
        defaults = (DefaultAction("epoch", "set_epoch", (("value", 0),)),)
        tables = SwitchTables(
            switch.name,
            switch.role,
            switch.device_id,
            tuple(itertools.chain.from_iterable(segments)),
            defaults,
            span=switch.span,
        )
        SEGMENTS.hold(len(inventory.switches))
        SEGMENTS.put(tables, tuple(segments))
        if made is not None:
            _MADE.put(tables, made)
            # The version it replaces is forgotten now: kept until the memo overflowed, the
            # records of the ToRs still to be compiled would go first (a rule touching more
            # ToRs than the memo's spare room compiled most of them in full).
            if (replaced := before.get(switch.name)) is not None and replaced is not tables:
                _MADE.drop(replaced)
        out.append(tables)
    # Switches no longer in the inventory: their tags are retired with everything else.
    for key, side in allocation.tags.items():
        if key not in tags:
            tags[key] = SideTags({}, frozenset(side.retired | set(side.tags.values())))
    new = Allocation(allocation.rules, allocation.retired_rules, tags)
    most = max(fields.values(), default=0)
    return Lowered(
        tuple(out), new, most, inputs, fields, frozenset(reused), inventory.down,
        frozenset(requarantined), frozenset(retagged), given,
    )  # fmt: skip


def _rerouted(
    held: SwitchTables,
    hosts: list[Host],
    switch: Switch,
    next_hops: Mapping[tuple[str, str], _NextHops],
) -> SwitchTables:
    """A reused switch's tables with its routing made again, for a change of the down
    spines (the one input `_switch_inputs` leaves out: a spine going down or back changes
    routing only); the same object when its routing is unchanged."""
    routes = _routing(hosts, switch, next_hops)
    if routes == [e for e in held.entries if e.table == "routing"]:
        return held
    kept = [e for e in held.entries if e.table != "routing"]  # routing comes last
    return dataclasses.replace(held, entries=(*kept, *routes))
