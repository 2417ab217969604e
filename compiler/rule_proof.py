"""The proof by rules: each ToR's `policy` table proven rule by rule, not pair by pair.

The proof by pairs (compiler/verify.py) walks every (sender, destination class) pair of
the floor: on the 10k-rule floor that is 1.8M pairs and minutes, and most of the work
proves one fact again and again — a rule's entries on a ToR match exactly the packets of
the rule. This stage proves that fact once per (rule, direction, ToR), over sets of hosts
held as bit masks, with conditions that are sufficient, not necessary; whatever fails
them (a corrupted table, a routing hole, a quarantined host's packets) is left to the
proof by pairs, which is exact and finds the counterexamples.

1. **Routing**, per (source ToR X, destination class): a packet to a host of X's island
   is delivered to that host, through switches that admit X's hosts on the port it
   arrives by and whose `policy` table passes every packet (its first entry matches
   everything and permits: the spines); a packet to any other address reaches no host.
   Otherwise the pairs (X's hosts, that class) are left to the proof by pairs.
2. **Identities**, per ToR T. The packets T judges (Dom_T) go between two hosts of T's
   island, one of them T's: T's hosts to T's (block LL), T's to the others (LN), the
   others to T's (NL). Each sender gets one source vector from `src_identity` (on its own
   port, or on every uplink its packets to T's hosts arrive by) and each destination one
   from `dst_identity` (0 on a miss). A tag match of an entry then selects a set of
   hosts: the hosts whose vector it covers.
3. **The table, rule by rule**, per ToR T. compiler/semantics.py decides a packet by the
   first group that matches it: forward denies, metered allows (lowest rate first),
   allows, denies of answers, allows of answers, the default deny; the rules of a group
   decide alike. Every `policy` entry that can meet a packet of Dom_T names its rule
   (`rule_id`) and, by its priority band, the direction (the flow, or its answers). The
   table implements the policy on Dom_T when:
   a. every such entry gives its rule's outcome: it passes or not, with the rule's meter
      (a band-0 entry denies, as the default does);
   b. the entries of an earlier group outrank every entry of a later one;
   c. per rule and direction, the entries' packets within Dom_T are the rule's: the
      hosts their tag matches select equal the rule's sources and destinations on each
      block (or both sides are empty there), and together their protocol, ports and
      flags cover exactly the rule's (compared per kind of header: TCP, UDP, ICMP, the
      rest) — and a rule that has packets in Dom_T has entries.
   Why: take a packet of Dom_T and the first group G with a rule R matching it. By (c) an
   entry of R matches it. Any entry that outranks that one and matches the packet stands
   for a rule matching it (c), so its group is not before G, and by (b) not after: it is
   G, whose outcome is R's (a). With no rule matching, no ordinary entry matches, and
   what does (band 0, the table's miss) denies.

End to end, a pair whose route is regular (1) is judged by its sender's ToR and by its
destination's ToR, both proven (3), and passed by the spines between: its verdict is the
policy's, meters included. Spoofing stays with verify.py (`Verifier._spoofing`).

Quarantined hosts keep their ordinary identity on every ToR but their own, where an
overlay above every ordinary entry cuts them off (compiler/quarantine.py): their pairs are
left to the proof by pairs, and the other pairs are judged by the uncarved policy, which
agrees with the carved one wherever no quarantined host is involved.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from compiler.differential import (
    PairScope,
    ScopeBuilder,
    changed_entries,
    changed_rules,
    same_inventory,
)
from compiler.entries import FieldMatch, SwitchTables, TableEntry, meter_for_rate
from compiler.evaluate import MAX_HOPS
from compiler.inventory import Host, Inventory
from compiler.memo import ByObject, also_forget
from compiler.model import Action, Policy, PolicyRule, protocol_number
from compiler.protocols import (
    ICMP_ECHO_REPLY_RANGE,
    MAX_PORT,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    TCP_ACK,
)
from compiler.semantics import bits

_Intervals = tuple[tuple[int, int], ...]
_ALL_PORTS: _Intervals = ((0, MAX_PORT),)
_ALL_FLAGS: _Intervals = ((0, 0xFF),)
_ALL_NUMBERS = (1 << 256) - 1
_PORTED = 1 << PROTO_ICMP | 1 << PROTO_TCP | 1 << PROTO_UDP
_BAND_SHIFT = 28
_MAX_BAND = 7
_FORWARD_BANDS = range(4, 8)  # compiler/rule_entries.py: denies, metered allows, allows
_HEADER_FIELDS = frozenset({"protocol", "l4_src_port", "l4_dst_port", "tcp_flags"})
_MAX_SPANS = 4096  # a ternary match cut into more intervals than this is left unproven
_REASONS = 8  # reasons kept for the report


class _Tables(Protocol):
    """What the proof reads of the switches (compiler.verify.Verifier)."""

    inventory: Inventory
    policy: Policy
    switches: Mapping[str, SwitchTables]

    def epoch(self, switch: str) -> int: ...
    def island(self, switch: str) -> str: ...
    def links(
        self,
    ) -> tuple[Mapping[tuple[str, int], tuple[str, int]], Mapping[tuple[str, int], str]]: ...
    def class_starts(self) -> Sequence[int]: ...
    def source_tags(self, switch: str, port: int, src: int) -> int | None: ...
    def destination_tags(self, switch: str, dst: int) -> int: ...
    def egress(self, switch: str, dst: int) -> int | None: ...


@dataclass
class ByRules:
    """What the proof by rules proved, and what it left to the proof by pairs."""

    tors: int = 0  # ToRs whose `policy` tables were proven rule by rule
    checks: int = 0  # (rule, direction, ToR) compared
    entries: int = 0  # `policy` entries that can meet a judged packet, each attributed
    left: PairScope | None = None  # the pairs for the proof by pairs (None: none)
    reasons: list[str] = field(default_factory=list)  # why (the first few)
    unproven_tors: int = 0  # ToRs left to the proof by pairs

    def left_pairs(self) -> int:
        return 0 if self.left is None else self.left.pairs()

    def to_json(self) -> dict[str, object]:
        return {
            "tors": self.tors,
            "unproven_tors": self.unproven_tors,
            "rule_checks": self.checks,
            "entries": self.entries,
            "pairs_left": self.left_pairs(),
            "reasons": list(self.reasons),
        }


def prove_by_difference(
    tables: _Tables,
    old_policy: Policy,
    old_switches: Mapping[str, SwitchTables],
) -> ByRules | None:
    """The proof by rules of a build from the last one this process proved (`old_policy`
    on `old_switches`, on the same inventory): a ToR whose tables and rules did not change
    keeps its proof; one whose `policy` entries or rules changed is proven from its last
    proof (the entries gone taken out, those added checked, condition (c) for the rules
    they name and the changed rules); one whose identity entries changed, or whose last
    proof this process no longer holds, is proven anew. None: routing, a spine or the
    quarantined hosts changed (prove by pairs)."""
    _STATES.hold(len(tables.switches))
    return _Proof(tables, ()).by_difference(old_policy, old_switches)


def forget_proofs(tables: Iterable[SwitchTables]) -> None:
    """Drop the proofs by rules kept with these tables: their build was proven another way
    (by pairs, or on some ToRs only), and a proof kept from an older build holding the
    same tables was made with that build's routes, which may not be these."""
    for sw in tables:
        _STATES.drop(sw)


def carry_proofs(earlier: Mapping[str, SwitchTables], now: Mapping[str, SwitchTables]) -> None:
    """`now` holds, switch by switch, the tables of `earlier` (a build proven a few builds
    ago: its proof record is this one's), as other objects: each keeps the proof by rules
    its equal tables had, so the next change is proven from it (a grant after a revoke)."""
    for name, tables in now.items():
        was = earlier.get(name)
        if was is not None and was is not tables and (state := _STATES.find(was)) is not None:
            _STATES.put(tables, state)


def holds_proof(tables: SwitchTables) -> bool:
    """Whether these tables keep a proof by rules (the next change can start from it)."""
    return _STATES.find(tables) is not None


def prove_by_rules(tables: _Tables, tors: Collection[str] | None = None) -> ByRules:
    """The proof by rules over `tables` (a Verifier). With `tors`, only what those ToRs
    judge (their tables, rule by rule) and the routes of the pairs from and to their hosts:
    a differential proof (compiler.verify.differential_scope), where every other ToR's
    tables and the rules deciding its other pairs are as proven before."""
    _STATES.hold(len(tables.switches))
    return _Proof(tables, tors).run()


def prove_ahead(tables: _Tables, tor: str) -> bool:
    """Give one ToR of a build proven already (by pairs: a new process's first apply) the
    proof by rules a change is proven from by difference, so that the next grant or edit
    touching it walks none of its routes. The other ToRs' proofs by rules stay: they were
    made over this very build (earlier calls, or the proof by difference that proved it).
    Nothing is concluded about the build. False: `tor` holds no host, the build has a
    quarantine in force, or its table could not be proven rule by rule (it keeps no proof
    by rules, and its next change is proven as before)."""
    _STATES.hold(len(tables.switches))
    return _Proof(tables, (tor,)).ahead()


# -- sets of hosts --------------------------------------------------------------------------


class _Hosts:
    """The floor's hosts as bits, in address order, so that an address interval is a run
    of bits."""

    def __init__(self, hosts: Iterable[Host]) -> None:
        self.hosts = sorted(hosts, key=lambda h: h.ip)
        self.ips = [h.ip for h in self.hosts]
        self.bit = {h.name: 1 << i for i, h in enumerate(self.hosts)}
        self._sides: dict[int, tuple[_Intervals, int]] = {}

    def within(self, intervals: _Intervals) -> int:
        """The hosts inside `intervals` (a rule's side, kept per object: rules naming a
        service share its intervals)."""
        found = self._sides.get(id(intervals))
        if found is not None and found[0] is intervals:
            return found[1]
        mask = 0
        for lo, hi in intervals:
            i, j = bisect.bisect_left(self.ips, lo), bisect.bisect_right(self.ips, hi)
            mask |= ((1 << (j - i)) - 1) << i
        self._sides[id(intervals)] = (intervals, mask)
        return mask


class _Selector:
    """One side of one ToR: each host's identity vector, and which hosts a tag match
    selects. A vector is 4-bit fields; the hosts with value v in field f are kept per
    (f, v), so a one-field match is a dict lookup."""

    def __init__(self, vectors: Mapping[int, int]) -> None:
        """`vectors`: host bit -> its vector."""
        self.vectors = vectors
        self.every = 0
        by_vector: dict[int, int] = {}
        for bit, vector in vectors.items():
            self.every |= bit
            by_vector[vector] = by_vector.get(vector, 0) | bit
        self.by_vector = by_vector
        self.by_slot: dict[tuple[int, int], int] = {}
        self.set_in: dict[int, int] = {}  # field -> hosts with a value there
        for vector, hosts in by_vector.items():
            rest = vector
            while rest:
                shift = ((rest & -rest).bit_length() - 1) & ~3
                value = (rest >> shift) & 0xF
                slot = (shift >> 2, value)
                self.by_slot[slot] = self.by_slot.get(slot, 0) | hosts
                self.set_in[shift >> 2] = self.set_in.get(shift >> 2, 0) | hosts
                rest &= ~(0xF << shift)
        self._selected: dict[tuple[FieldMatch, ...], int] = {}

    def select(self, matches: tuple[FieldMatch, ...]) -> int:
        """The hosts whose vector every one of `matches` covers."""
        found = self._selected.get(matches)
        if found is None:
            found = self.every
            for m in matches:
                found &= self._one(m)
            self._selected[matches] = found
        return found

    def _one(self, m: FieldMatch) -> int:
        if m.kind != "ternary":
            return self._tested(m)
        value, mask = m.value, m.arg
        if value & ~mask:
            return 0
        out, rest = self.every, mask
        while rest and out:
            shift = ((rest & -rest).bit_length() - 1) & ~3
            nibble, want = (mask >> shift) & 0xF, (value >> shift) & 0xF
            f = shift >> 2
            hosts = 0
            for v in range(16) if nibble != 0xF else (want,):
                if v & nibble == want:
                    hosts |= (
                        self.by_slot.get((f, v), 0) if v else self.every & ~self.set_in.get(f, 0)
                    )
            out &= hosts
            rest &= ~(0xF << shift)
        return out

    def _tested(self, m: FieldMatch) -> int:
        out = 0
        for vector, hosts in self.by_vector.items():
            if m.covers(vector) if m.kind != "lpm" else m.covers_lpm(vector, 256):
                out |= hosts
        return out


# -- blocks of the judged domain ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Domain:
    """The pairs a ToR judges: its hosts (local), the senders of its island that reach its
    hosts (senders), the destinations of its island (others)."""

    local: int
    senders: int  # other racks' hosts, as sources
    others: int  # other racks' hosts, as destinations

    def meets(self, x: int, y: int) -> bool:
        """Whether sources `x` x destinations `y` hold a judged pair."""
        xl, yl = x & self.local, y & self.local
        return bool(
            (xl and yl and not (xl == yl and not xl & (xl - 1)))  # one host alone: no pair
            or (xl and y & self.others)
            or (yl and x & self.senders)
        )

    def same(self, x: int, y: int, a: int, b: int) -> bool:
        """Whether x x y and a x b hold the same judged pairs, block by block."""
        local, others, senders = self.local, self.others, self.senders
        return (
            _rectangle(x & local, y & local, a & local, b & local, True)
            and _rectangle(x & local, y & others, a & local, b & others, False)
            and _rectangle(x & senders, y & local, a & senders, b & local, False)
        )


def _rectangle(x: int, y: int, a: int, b: int, diagonal: bool) -> bool:
    """x x y == a x b (less the pairs of a host with itself when `diagonal`)."""
    if x == a and y == b:
        return True
    return _empty(x, y, diagonal) and _empty(a, b, diagonal)


def _empty(x: int, y: int, diagonal: bool) -> bool:
    return not x or not y or (diagonal and x == y and not x & (x - 1))


# -- headers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class _Headers:
    """A set of packet headers, per kind: TCP (sport x dport x flags), UDP (sport x dport),
    ICMP (type << 8 | code), and the protocols without ports (their numbers). Made once
    per value (the makers are memoized), so compared and hashed by identity."""

    tcp: tuple[_Intervals, _Intervals, _Intervals] | None
    udp: tuple[_Intervals, _Intervals] | None
    icmp: _Intervals | None
    bare: int  # protocol numbers other than TCP, UDP and ICMP (bit n: protocol n)


def _rule_headers(rule: PolicyRule, reverse: bool) -> _Headers:
    """The headers of `rule`'s flows (compiler/semantics.py `decide_atoms`), or of the
    answers to them: TCP with ACK from the rule's ports, UDP from them (for a deny, or an
    allow with `reply`), ICMP echo replies when the rule lets pings through."""
    return _rule_headers_of(
        rule.proto, rule.ports, reverse, rule.action is Action.DENY, rule.reply, rule.answers_pings
    )


@functools.lru_cache(maxsize=1 << 12)
def _rule_headers_of(
    proto: str, ports: _Intervals, reverse: bool, deny: bool, reply: bool, pings: bool
) -> _Headers:
    number = protocol_number(proto)
    numbers = _ALL_NUMBERS if number is None else 1 << number
    ports = _merged(ports)
    tcp = numbers >> PROTO_TCP & 1
    udp = numbers >> PROTO_UDP & 1
    if not reverse:
        return _Headers(
            (_ALL_PORTS, ports, _ALL_FLAGS) if tcp else None,
            (_ALL_PORTS, ports) if udp else None,
            ports if numbers >> PROTO_ICMP & 1 else None,
            numbers & ~_PORTED,
        )
    ack = _ternary_spans(TCP_ACK, TCP_ACK, 8)  # flags with ACK set
    assert ack is not None
    return _Headers(
        (ports, _ALL_PORTS, ack) if tcp else None,
        (ports, _ALL_PORTS) if udp and (deny or reply) else None,
        (ICMP_ECHO_REPLY_RANGE,) if pings else None,
        0,
    )


@functools.lru_cache(maxsize=1 << 14)
def _entry_headers(matches: tuple[FieldMatch, ...]) -> _Headers | None:
    """The headers an entry's protocol, port and flag matches cover, as the parser makes
    them: UDP, ICMP and the rest have flags 0, ICMP and the rest source port 0, the rest
    destination port 0. None: a match too scattered to prove (left to the pairs)."""
    numbers, sport, dport, flags = _ALL_NUMBERS, _ALL_PORTS, _ALL_PORTS, _ALL_FLAGS
    for m in matches:
        if m.field == "protocol":
            spans = _spans(m, 8)
            if spans is None:
                return None
            numbers &= sum(((1 << (hi + 1)) - (1 << lo)) for lo, hi in spans)
            continue
        spans = _spans(m, 8 if m.field == "tcp_flags" else 16)
        if spans is None:
            return None
        if m.field == "l4_src_port":
            sport = _intersection(sport, spans)
        elif m.field == "l4_dst_port":
            dport = _intersection(dport, spans)
        else:
            flags = _intersection(flags, spans)
    zero_flags, zero_sport = _holds(flags, 0), _holds(sport, 0)
    tcp = (sport, dport, flags) if numbers >> PROTO_TCP & 1 and sport and dport and flags else None
    udp = (sport, dport) if numbers >> PROTO_UDP & 1 and zero_flags and sport and dport else None
    icmp = dport if numbers >> PROTO_ICMP & 1 and zero_flags and zero_sport and dport else None
    bare = numbers & ~_PORTED if zero_flags and zero_sport and _holds(dport, 0) else 0
    return _Headers(tcp, udp, icmp, bare)


@functools.lru_cache(maxsize=1 << 14)
def _same_headers(want: _Headers, have: tuple[_Headers, ...]) -> bool:
    """Whether the union of `have` is exactly `want`, kind by kind."""
    bare = 0
    for h in have:
        bare |= h.bare
    return (
        bare == want.bare
        and _union_is(want.tcp, [h.tcp for h in have if h.tcp is not None])
        and _union_is(want.udp, [h.udp for h in have if h.udp is not None])
        and _union_is(
            None if want.icmp is None else (want.icmp,),
            [(h.icmp,) for h in have if h.icmp is not None],
        )
    )


def _union_is(want: tuple[_Intervals, ...] | None, boxes: list[tuple[_Intervals, ...]]) -> bool:
    """Whether the union of `boxes` (products of interval sets) is the box `want`."""
    if want is None:
        return not boxes
    if not all(_inside(a, b) for box in boxes for a, b in zip(box, want, strict=True)):
        return False
    return _covered(want, boxes)


def _covered(want: tuple[_Intervals, ...], boxes: list[tuple[_Intervals, ...]]) -> bool:
    """Whether `boxes` cover the box `want`: the first axis cut where any of them begins or
    ends, each piece inside `want` covered by the boxes holding it on the other axes."""
    if not boxes:
        return False
    cuts = sorted(
        {lo for box in boxes for lo, _hi in box[0]}
        | {hi + 1 for box in boxes for _lo, hi in box[0]}
        | {lo for lo, _hi in want[0]}
        | {hi + 1 for _lo, hi in want[0]}
    )
    for start in cuts:
        if not _holds(want[0], start):
            continue
        holding = [box[1:] for box in boxes if _holds(box[0], start)]
        if not holding or (len(want) > 1 and not _covered(want[1:], holding)):
            return False
    return True


def _spans(m: FieldMatch, bits: int) -> _Intervals | None:
    """The values a match covers as merged intervals (None: more than _MAX_SPANS)."""
    top = (1 << bits) - 1
    if m.kind == "exact":
        return ((m.value, m.value),) if m.value <= top else ()
    if m.kind == "range":
        return ((max(m.value, 0), min(m.arg, top)),) if m.value <= min(m.arg, top) else ()
    if m.kind == "lpm":
        size = 1 << (bits - m.arg)
        return ((m.value, m.value + size - 1),)
    return _ternary_spans(m.value, m.arg & top, bits)


@functools.lru_cache(maxsize=1 << 12)
def _ternary_spans(value: int, mask: int, bits: int) -> _Intervals | None:
    """value &&& mask as intervals: blocks of the free bits below the lowest mask bit, one
    per choice of the free bits above it."""
    if value & ~mask:
        return ()
    low = mask & -mask if mask else 1 << bits
    free = ((1 << bits) - 1) & ~mask & ~(low - 1)  # free bits above the lowest mask bit
    if 1 << free.bit_count() > _MAX_SPANS:
        return None
    free_bits = [1 << i for i in range(bits) if free >> i & 1]
    starts = [value]
    for b in free_bits:
        starts += [s | b for s in starts]
    return _merged((s, s + low - 1) for s in starts)


def _merged(intervals: Iterable[tuple[int, int]]) -> _Intervals:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _intersection(a: _Intervals, b: _Intervals) -> _Intervals:
    out = []
    for lo, hi in a:
        for blo, bhi in b:
            if max(lo, blo) <= min(hi, bhi):
                out.append((max(lo, blo), min(hi, bhi)))
    return _merged(out)


def _holds(intervals: _Intervals, value: int) -> bool:
    return any(lo <= value <= hi for lo, hi in intervals)


def _inside(a: _Intervals, b: _Intervals) -> bool:
    """Whether every value of `a` is in `b` (both merged)."""
    return all(any(blo <= lo and hi <= bhi for blo, bhi in b) for lo, hi in a)


# -- outcomes -------------------------------------------------------------------------------

_DEFAULT_RANK = (5, 0)


def _rank(rule: PolicyRule, reverse: bool) -> tuple[int, int]:
    """The semantics' order of groups: forward denies, metered allows by rate, allows,
    denies of answers, allows of answers (then the default)."""
    deny = rule.action is Action.DENY
    if reverse:
        return (3, 0) if deny else (4, 0)
    if deny:
        return (0, 0)
    return (1, rule.rate_pps) if rule.rate_pps is not None else (2, 0)


_PASSING = frozenset({"permit", "permit_metered"})


def _passes(entry: TableEntry) -> bool:
    return entry.action in _PASSING


def _gives(entry: TableEntry, rule: PolicyRule, reverse: bool) -> bool:
    """Whether `entry` treats its packets as `rule` does in that direction: passes or not,
    and with the meter the rule's rate gives a forward allow (none for answers)."""
    if rule.action is Action.DENY:
        return not _passes(entry)
    if not _passes(entry):
        return False
    applied = entry.meter if entry.action == "permit_metered" else None
    wanted = None if reverse or rule.rate_pps is None else meter_for_rate(rule.rate_pps)
    return applied == wanted


# -- the proof ------------------------------------------------------------------------------


@dataclass
class _Entry:
    entry: TableEntry
    sources: int
    destinations: int
    headers: _Headers


@dataclass
class _ToRState:
    """What a ToR's proof by rules found, kept per tables object so that the next build's
    proof can start from it (`prove_by_difference`): the identity entries it was made
    from, the hosts each tag match selects, and the entries that meet judged packets, by
    rule and direction, with each rank's priorities (lowest, highest)."""

    rules: tuple[PolicyRule, ...]  # the (uncarved) policy's rules it was proven for
    inventory: Inventory
    identity: tuple[TableEntry, ...]
    sources: _Selector
    destinations: _Selector
    domain: _Domain
    groups: dict[tuple[int, bool], list[_Entry]]
    bounds: dict[tuple[int, int], tuple[int, int]]
    # The (ToR, uplink port) pairs its hosts' packets from other racks arrive on, when its
    # routes were all found regular (`_Proof.regular`); None: not known. A ToR proven anew
    # while no routing entry and no spine changed takes them instead of walking its routes.
    arrivals: frozenset[tuple[str, int]] | None = None


def _addresses_of(entry: TableEntry, field: str) -> tuple[tuple[int, int], ...]:
    """The addresses an identity entry can match on `field`, or more (a ternary mask that
    is not a prefix: every address)."""
    m, top = entry.match(field), (1 << 32) - 1
    if m is None:
        return ((0, top),)
    if m.kind == "exact":
        return ((m.value, m.value),)
    if m.kind == "lpm":
        return ((m.value, m.value + (1 << (32 - m.arg)) - 1),)
    if m.kind == "range":
        return ((m.value, m.arg),)
    free = ~m.arg & top
    if free & (free + 1) == 0:  # a prefix mask
        return ((m.value & m.arg, (m.value & m.arg) | free),)
    return ((0, top),)


def _identity(switch: SwitchTables) -> tuple[TableEntry, ...]:
    return tuple(e for e in switch.entries if e.table in ("src_identity", "dst_identity"))


def _in_order(bounds: Mapping[tuple[int, int], tuple[int, int]]) -> None:
    """Condition (b): every entry of an earlier group above every entry of a later one."""
    ranks = sorted(bounds)
    for earlier, later in itertools.pairwise(ranks):
        if bounds[earlier][0] <= bounds[later][1]:
            raise _Unproven(
                f"entries out of the semantics' order: priority {bounds[later][1]} "
                f"is not below {bounds[earlier][0]}"
            )


class _Unproven(Exception):
    """A ToR's table does not meet the proof's conditions (the message says where)."""


class _Again(Exception):
    """A ToR's proof cannot start from its last one: prove it from nothing."""


_REDONE = frozenset({"policy", "src_identity", "dst_identity"})  # a ToR proven again


class _Proof:
    def __init__(self, tables: _Tables, tors: Collection[str] | None = None) -> None:
        self.t = tables
        inventory = tables.inventory
        policy = tables.policy
        self.quarantined = set(policy.quarantine.hosts) if policy.quarantine else set()
        self.policy = policy.uncarved()
        self.hosts = _Hosts(inventory.hosts)
        self.result = ByRules()
        self._scope: ScopeBuilder | None = None  # the pairs left, once there are some
        self.peer, self.host_at = tables.links()
        self.by_tor: dict[str, list[Host]] = {}
        for h in self.hosts.hosts:
            self.by_tor.setdefault(h.switch, []).append(h)
        self.tors = sorted(self.by_tor)
        self.proving = self.tors if tors is None else [t for t in self.tors if t in tors]
        bit = self.hosts.bit
        self.local = {
            t: sum(bit[h.name] for h in hs if h.ip not in self.quarantined)
            for t, hs in self.by_tor.items()
        }
        islands: dict[str, int] = {}
        for t, mask in self.local.items():
            islands[tables.island(t)] = islands.get(tables.island(t), 0) | mask
        self.island_hosts = islands
        # (ToR, arrival port at a destination ToR) pairs, found by routing
        self.arrivals: dict[str, set[tuple[str, int]]] = {t: set() for t in self.tors}
        # ToRs whose routes — every one from it, and every one to its hosts — were found
        # delivered through the spines (`_routes`), or known so from their last proof
        self.regular: set[str] = set()
        self.unproven: set[str] = set()
        self.by_id = {r.id: r for r in self.policy.rules}
        self._touched: dict[int, int] = {}  # hosts -> the ToRs holding one of them
        self._rule_headers: dict[int, tuple[PolicyRule, _Headers | None, _Headers | None]] = {}

    @property
    def starts(self) -> Sequence[int]:
        """The address classes' first addresses (the pairs left are counted in them)."""
        return self.t.class_starts()

    @property
    def scope(self) -> ScopeBuilder:
        if self._scope is None:
            self._scope = ScopeBuilder(self.starts, self.t.inventory.hosts)
        return self._scope

    def _left(self) -> PairScope | None:
        if self._scope is None:
            return None
        left = self._scope.scope()
        return left if left.pairs() or left.spoof else None

    def run(self) -> ByRules:
        self._prove_each()
        self.result.unproven_tors = len(self.unproven)
        self.result.left = self._left()
        proving = set(self.proving)  # the others' proofs were made with other routes maybe
        forget_proofs(sw for name, sw in self.t.switches.items() if name not in proving)
        return self.result

    def _prove_each(self) -> None:
        """Prove each ToR of `proving` rule by rule, keeping its proof with its tables."""
        self._quarantine()
        self._routes()
        rules_of = self._rules_by_tor()
        for tor in self.proving:
            if tor in self.unproven:
                continue
            try:
                _STATES.put(self.t.switches[tor], self._tor(tor, rules_of.get(tor, [])))
            except _Unproven as why:
                self._leave_tor(tor, str(why))
                continue
            self.result.tors += 1

    def ahead(self) -> bool:
        """`prove_ahead`: the proof of `proving` alone, the others' proofs left as they are."""
        if self.quarantined or not self.proving:
            return False  # a proof by difference does not start from a quarantined build
        self._prove_each()
        return self.result.tors == len(self.proving)

    def by_difference(
        self, old_policy: Policy, old_switches: Mapping[str, SwitchTables]
    ) -> ByRules | None:
        """`prove_by_difference`: None when the change is not one it can take (then no
        table of the new build keeps a proof by rules: one kept from an older build was
        made with that build's routes)."""
        found = self._by_difference(old_policy, old_switches)
        if found is None:
            forget_proofs(self.t.switches.values())
        return found

    def _by_difference(
        self, old_policy: Policy, old_switches: Mapping[str, SwitchTables]
    ) -> ByRules | None:
        t = self.t
        if self.quarantined or old_policy.quarantine is not None:
            return None  # its pairs go by pairs, and the judged pairs move on every ToR
        if old_switches.keys() != t.switches.keys():
            return None
        changed: dict[str, list[TableEntry]] = {}
        for name, sw in t.switches.items():
            diff = changed_entries(old_switches[name], sw)
            if diff is None:
                return None
            if diff:
                if sw.role != "tor" or any(e.table not in _REDONE for e in diff):
                    return None  # routing or a spine changed: every route again
                changed[name] = diff
        rules = changed_rules(old_policy.uncarved(), self.policy)
        index = {tor: i for i, tor in enumerate(self.tors)}
        affected = {index[name] for name in changed}
        for rule in rules:
            affected |= set(bits(self._touches(rule)))
        again: list[str] = []  # ToRs proven from nothing: their identity entries changed
        proving: list[tuple[str, _ToRState, list[TableEntry]]] = []
        for i in sorted(affected):
            tor = self.tors[i]
            old = self._kept(old_switches[tor], old_policy)
            diff = changed.get(tor, [])
            if old is None or any(e.table != "policy" for e in diff):
                again.append(tor)
            else:
                proving.append((tor, old, diff))
        for i, name in enumerate(self.tors):  # the others keep what their proof found
            kept = self._kept(old_switches[name], old_policy)
            if i not in affected and kept is not None:
                carried = dataclasses.replace(kept, rules=self.policy.rules, inventory=t.inventory)
                _STATES.put(t.switches[name], carried)
        old_rules = {r.id: r for r in old_policy.uncarved().rules}
        ids = {r.id for r in rules}
        for tor, old, diff in proving:
            try:
                state = self._tor_by_difference(tor, old, diff, ids, old_rules)
            except _Again:
                again.append(tor)
                continue
            except _Unproven as why:
                self._leave_tor(tor, str(why))
                continue
            _STATES.put(t.switches[tor], state)
            self.result.tors += 1
        if again:
            self.proving = sorted(again)
            # No routing entry and no spine changed (else no proof by difference): a ToR
            # whose routes its last proof found regular keeps their arrivals; the others'
            # routes are walked (the hosts each of them judges).
            walk = set(self.proving)
            olds = {tor: self._kept(old_switches[tor], old_policy) for tor in self.proving}
            for tor, old in olds.items():
                if old is not None and old.arrivals is not None:
                    self.arrivals[tor] |= old.arrivals
                    self.regular.add(tor)
                    walk.discard(tor)
            if walk:
                self._routes(walk)
            rules_of = self._rules_by_tor()
            for tor in self.proving:
                try:
                    state = self._tor(tor, rules_of.get(tor, []), olds[tor], changed.get(tor, ()))
                except _Unproven as why:
                    self._leave_tor(tor, str(why))
                    continue
                _STATES.put(t.switches[tor], state)
                self.result.tors += 1
        self.result.unproven_tors = len(self.unproven)
        spoof = {
            h.ip
            for name, diff in changed.items()
            if any(e.table == "src_identity" for e in diff)
            for h in self.by_tor.get(name, [])
        }
        if spoof:
            self.scope.spoof |= spoof
        self.result.left = self._left()
        return self.result

    def _kept(self, tables: SwitchTables, policy: Policy) -> _ToRState | None:
        """The proof of `tables` this process holds, if it was for `policy` on this floor."""
        state = _STATES.find(tables)
        if state is None:
            return None
        rules = policy.uncarved().rules
        if state.rules is not rules and state.rules != rules:  # (the same rule objects, mostly)
            return None
        inventory = self.t.inventory
        if state.inventory is inventory or same_inventory(state.inventory, inventory):
            return state
        return None

    def _tor_by_difference(
        self,
        tor: str,
        old: _ToRState,
        diff: list[TableEntry],
        changed: set[int],
        old_rules: Mapping[int, PolicyRule],
    ) -> _ToRState:
        """`tor`'s proof from its last one: the entries gone are taken out, those added
        admitted, and condition (c) checked for the rules either names and the changed
        rules. _Again: a changed rule's entries kept but its group moved (prove anew)."""
        state = dataclasses.replace(
            old,
            rules=self.policy.rules,
            inventory=self.t.inventory,
            groups=dict(old.groups),
            bounds=dict(old.bounds),
        )
        epoch = self.t.epoch(tor)
        gone = getattr(diff, "gone", None) if diff else set()
        if gone is None:
            raise _Again  # (changed_entries tells which are gone)
        check = set(changed)
        added = {id(e) for e in diff if id(e) not in gone}
        for e in diff:
            if e.table != "policy" or not _visible(e, epoch):
                continue
            if id(e) in gone:
                check.add(self._remove(state, e))
            elif (named := self._admit(state, e)) is not None:
                check.add(named)
        for rule_id in changed:
            rule, was = self.by_id.get(rule_id), old_rules.get(rule_id)
            if rule is None or was is None:
                continue
            for reverse in (False, True):
                if _rank(rule, reverse) != _rank(was, reverse) and any(
                    id(m.entry) not in added for m in state.groups.get((rule_id, reverse), ())
                ):
                    raise _Again  # its kept entries are filed under the old group's rank
                for m in state.groups.get((rule_id, reverse), ()):
                    if not _gives(m.entry, rule, reverse):
                        raise _Unproven(f"rule {rule_id}'s entry does not {_what(rule, reverse)}")
        _in_order(state.bounds)
        bit = 1 << self.tors.index(tor)
        for rule_id in check:
            if rule_id < 0:
                continue
            rule = self.by_id.get(rule_id)
            if rule is None:
                if state.groups.get((rule_id, False)) or state.groups.get((rule_id, True)):
                    raise _Unproven(f"entries of rule {rule_id}, which the policy has not")
                continue
            self._check(state, rule, bool(self._touches(rule) & bit))
        return state

    def _remove(self, state: _ToRState, e: TableEntry) -> int:
        """Take a gone entry out of its rule's list; the rule it named (-1: none)."""
        rule_id = _taken_apart(e)[4]
        band = e.priority >> _BAND_SHIFT
        key = (rule_id, band not in _FORWARD_BANDS)
        kept = state.groups.get(key)
        if band == 0 or kept is None:
            return -1
        rest = [m for m in kept if m.entry is not e]
        if rest:
            state.groups[key] = rest
        else:
            del state.groups[key]
        return rule_id

    def _touches(self, rule: PolicyRule) -> int:
        """The ToRs (bits in `tors` order) one of whose hosts a side of `rule` holds."""
        within = self.hosts.within
        return self._tors_of(within(rule.src.intervals)) | self._tors_of(within(rule.dst.intervals))

    def _tors_of(self, hosts: int) -> int:
        found = self._touched.get(hosts)
        if found is None:
            found = self._touched[hosts] = sum(
                1 << i for i, tor in enumerate(self.tors) if self.local[tor] & hosts
            )
        return found

    def _reason(self, text: str) -> None:
        if len(self.result.reasons) < _REASONS:
            self.result.reasons.append(text)

    def _quarantine(self) -> None:
        """A quarantined host's pairs, both ways, go to the proof by pairs."""
        quarantined = [h for h in self.hosts.hosts if h.ip in self.quarantined]
        if not quarantined:
            return
        self.scope.add(quarantined, self.scope.full)
        self.scope.add(None, self.scope.classes((h.ip, h.ip) for h in quarantined))
        self._reason(f"{len(quarantined)} quarantined host(s): their pairs by pairs")

    def _leave_tor(self, tor: str, why: str) -> None:
        """Every pair `tor` judges goes to the proof by pairs (and its tables keep no
        proof by rules)."""
        _STATES.drop(self.t.switches[tor])
        self.unproven.add(tor)
        hosts = self.by_tor[tor]
        self.scope.add(hosts, self.scope.full)
        self.scope.add(None, self.scope.classes((h.ip, h.ip) for h in hosts))
        self._reason(f"{tor}: {why}")

    # -- 1. routing -------------------------------------------------------------------

    def _routes(self, walk: Collection[str] | None = None) -> None:
        """Condition (a) for the ToRs proven (or those of them in `walk`): every route from
        each, and every route to its hosts, delivers to the host through switches that pass
        and tag every packet; the classes routed otherwise go to the proof by pairs. A ToR
        none of whose routes is irregular joins `regular`."""
        t = self.t
        transit = _Memo(self._passes_all)
        admits = _Memo(self._admits)
        host_of = {h.ip: h for h in self.hosts.hosts}
        every = list(enumerate(self.starts))
        proving = set(self.proving if walk is None else walk)
        # from another ToR, only the routes to the hosts of the ToRs proven
        theirs = [
            (bisect.bisect_right(self.starts, h.ip) - 1, h.ip)
            for tor in sorted(proving)
            for h in self.by_tor[tor]
        ]
        irregular_at: set[str] = set()  # proven ToRs a route from or to was irregular
        for tor in self.tors:
            island = t.island(tor)
            irregular = 0
            for index, start in every if tor in proving else theirs:
                target = host_of.get(start)
                owner = target.switch if target is not None else None
                if target is not None and t.island(target.switch) != island:
                    target = None  # no live path: no tables could deliver it
                delivered, loop, hops = self._walk(tor, start)
                ok = not loop
                if ok and target is None:
                    ok = delivered is None
                elif ok:
                    assert target is not None
                    ok = delivered == target.name and all(
                        transit(s) and admits((s, port, tor)) for s, port in hops[:-1]
                    )
                    if ok and hops:  # to another rack (a hairpin back here: by pairs)
                        ok = hops[-1][0] == target.switch != tor
                        if ok:
                            self.arrivals[target.switch].add((tor, hops[-1][1]))
                    elif ok:
                        ok = target.switch == tor
                if not ok:
                    irregular |= 1 << index
                    irregular_at.update(x for x in (tor, owner) if x in proving)
            if irregular:
                self.scope.add(self.by_tor[tor], irregular)
                self._reason(
                    f"{tor}: {irregular.bit_count()} destination class(es) routed other than "
                    "to their host through the spines"
                )
        self.regular |= proving - irregular_at

    def _walk(self, tor: str, dst: int) -> tuple[str | None, bool, list[tuple[str, int]]]:
        """(the host routing delivers to, a loop, the hops after `tor`: switch, port in)."""
        t = self.t
        switch, hops, seen = tor, list[tuple[str, int]](), set[tuple[str, int]]()
        while True:
            egress = t.egress(switch, dst)
            if egress is None:
                return None, False, hops
            out = (switch, egress)
            if out in self.host_at:
                return self.host_at[out], False, hops
            nxt = self.peer.get(out)
            if nxt is None:
                return None, False, hops
            if nxt in seen or len(hops) >= MAX_HOPS:
                return None, True, hops
            seen.add(nxt)
            hops.append(nxt)
            switch = nxt[0]

    def _passes_all(self, switch: str) -> bool:
        """Whether `switch`'s `policy` table passes every packet: its first entry (by
        priority, then table order) matches all of them and permits."""
        epoch = self.t.epoch(switch)
        entries = [
            e for e in self.t.switches[switch].entries if e.table == "policy" and _visible(e, epoch)
        ]
        if not entries:
            return False
        first = min(entries, key=_minus_priority)
        return _passes(first) and all(m.field == "epoch" for m in first.matches)

    def _admits(self, key: tuple[str, int, str]) -> bool:
        """Whether `switch` gives every host of `tor` an identity on `port`."""
        switch, port, tor = key
        return all(self.t.source_tags(switch, port, h.ip) is not None for h in self.by_tor[tor])

    # -- 2. identities ----------------------------------------------------------------

    def _selectors(
        self, tor: str, old: _ToRState | None = None, changed: Sequence[TableEntry] = ()
    ) -> tuple[_Selector, _Selector, _Domain]:
        """Each host's identity vectors on `tor`, as a source (on its own port, or the
        uplinks its packets arrive on) and as a destination. From `old` (its last proof,
        whose routes are these) with `changed` its identity entries added and gone: only
        the hosts one of those can match are looked up again."""
        t, bit = self.t, self.hosts.bit
        src_again = dst_again = ~0  # the hosts looked up (all, without `old`)
        was_src: Mapping[int, int] = {}
        was_dst: Mapping[int, int] = {}
        if old is not None:
            src_again = dst_again = 0
            for e in changed:
                if e.table == "src_identity":
                    src_again |= self.hosts.within(_addresses_of(e, "src_addr"))
                elif e.table == "dst_identity":
                    dst_again |= self.hosts.within(_addresses_of(e, "dst_addr"))
            was_src, was_dst = old.sources.vectors, old.destinations.vectors
        sources: dict[int, int] = {}
        for h in self.by_tor[tor]:
            if h.ip in self.quarantined:
                continue
            b = bit[h.name]
            if not b & src_again and (kept := was_src.get(b)) is not None:
                sources[b] = kept
                continue
            tags = t.source_tags(tor, h.port, h.ip)
            if tags is None:
                raise _Unproven(f"src_identity drops {h.name} on its own port {h.port}")
            sources[bit[h.name]] = tags
        local = self.local[tor]
        senders = 0
        for other, port in sorted(self.arrivals[tor]):
            for h in self.by_tor[other]:
                if h.ip in self.quarantined:
                    continue
                b = bit[h.name]
                if not b & src_again and (kept := was_src.get(b)) is not None:
                    sources[b] = kept  # (found the same on each of its uplinks then)
                    senders |= b
                    continue
                tags = t.source_tags(tor, port, h.ip)
                if tags is None:
                    raise _Unproven(f"src_identity drops {h.name} on uplink port {port}")
                if sources.setdefault(b, tags) != tags:
                    raise _Unproven(f"src_identity gives {h.name} two vectors on its uplinks")
                senders |= b
        others = self.island_hosts[t.island(tor)] & ~local
        destinations = {}
        for h in self.hosts.hosts:
            b = bit[h.name]
            if b & (local | others):
                kept = None if b & dst_again else was_dst.get(b)
                destinations[b] = t.destination_tags(tor, h.ip) if kept is None else kept
        return _Selector(sources), _Selector(destinations), _Domain(local, senders, others)

    # -- 3. the table, rule by rule ---------------------------------------------------

    def _rules_by_tor(self) -> dict[str, list[PolicyRule]]:
        """The rules with a side holding one of each ToR's hosts."""
        out: dict[str, list[PolicyRule]] = {}
        for rule in self.policy.rules:
            for i in bits(self._touches(rule)):
                out.setdefault(self.tors[i], []).append(rule)
        return out

    def _tor(
        self,
        tor: str,
        rules: list[PolicyRule],
        old: _ToRState | None = None,
        changed: Sequence[TableEntry] = (),
    ) -> _ToRState:
        """Prove `tor`'s table rule by rule against `rules` (those naming one of its hosts);
        `old`, `changed`: its last proof, on these routes, and its entries changed since
        (`_selectors`)."""
        sources, destinations, domain = self._selectors(tor, old, changed)
        switch = self.t.switches[tor]
        if any(d.table == "policy" and d.action in _PASSING for d in switch.defaults):
            raise _Unproven("the policy table's default action passes packets")
        arrivals = frozenset(self.arrivals[tor]) if tor in self.regular else None
        state = _ToRState(
            self.policy.rules, self.t.inventory, _identity(switch), sources, destinations,
            domain, {}, {}, arrivals,
        )  # fmt: skip
        epoch = self.t.epoch(tor)
        for e in switch.entries:
            if e.table == "policy" and _visible(e, epoch):
                self._admit(state, e)
        _in_order(state.bounds)
        named = set()
        for rule in rules:
            named |= {(rule.id, False), (rule.id, True)}
            self._check(state, rule, True)
        stray = next((key for key in state.groups if key not in named), None)
        if stray is not None:
            raise _Unproven(f"entries of rule {stray[0]}, which names none of its hosts")
        return state

    def _admit(self, state: _ToRState, e: TableEntry) -> int | None:
        """Check one `policy` entry (its outcome) and file it under its rule and direction,
        its priority under its rank; the rule it names (None: it meets no judged packet)."""
        src, dst, headers, odd, rule_id = _taken_apart(e)
        x, y = state.sources.select(src), state.destinations.select(dst)
        if not state.domain.meets(x, y):
            return None
        self.result.entries += 1
        if odd:
            raise _Unproven(f"a policy entry matches {_fields(e)}")
        if headers is None:
            raise _Unproven(f"a policy entry's matches are too scattered: {_fields(e)}")
        band = e.priority >> _BAND_SHIFT
        rank = _DEFAULT_RANK
        named = None
        if band == 0:
            if _passes(e):
                raise _Unproven(f"a band-0 entry (priority {e.priority}) passes packets")
        else:
            rule = self.by_id.get(rule_id)
            if rule is None or band > _MAX_BAND:
                raise _Unproven(f"an entry (priority {e.priority}) stands for no rule")
            reverse = band not in _FORWARD_BANDS
            if not _gives(e, rule, reverse):
                raise _Unproven(f"rule {rule.id}'s entry does not {_what(rule, reverse)}")
            rank = _rank(rule, reverse)
            key = (rule.id, reverse)
            state.groups[key] = [*state.groups.get(key, ()), _Entry(e, x, y, headers)]
            named = rule.id
        lo, hi = state.bounds.get(rank, (e.priority, e.priority))
        state.bounds[rank] = (min(lo, e.priority), max(hi, e.priority))
        return named

    def _check(self, state: _ToRState, rule: PolicyRule, names_hosts: bool) -> None:
        """Condition (c) for `rule` on the ToR (`names_hosts`: a side holds one of its
        hosts; if not, it must have no entries there)."""
        within = self.hosts.within
        a, b = within(rule.src.intervals), within(rule.dst.intervals)
        domain = state.domain
        for back, want in enumerate(self._headers(rule)):
            made = state.groups.get((rule.id, bool(back)), [])
            if want is None or not names_hosts:
                if made:
                    raise _Unproven(f"rule {rule.id} has entries for packets it has not")
                continue
            self.result.checks += 1
            x, y = (b, a) if back else (a, b)
            if not domain.meets(x, y):
                if made:
                    raise _Unproven(f"rule {rule.id}'s entries meet packets it does not")
                continue
            way = "answers" if back else "flows"
            if not made:
                raise _Unproven(f"rule {rule.id} has no entries for its {way}")
            for m in made:
                if not domain.same(m.sources, m.destinations, x, y):
                    raise _Unproven(f"rule {rule.id}'s tag matches select other hosts")
            if not _same_headers(want, tuple(m.headers for m in made)):
                raise _Unproven(f"rule {rule.id}'s entries cover other {way} than its own")

    def _headers(self, rule: PolicyRule) -> tuple[_Headers | None, _Headers | None]:
        """The headers of `rule`'s flows and of their answers (None: none), per rule."""
        found = self._rule_headers.get(id(rule))
        if found is None or found[0] is not rule:
            pair = tuple(
                None if _no_headers(h := _rule_headers(rule, reverse)) else h
                for reverse in (False, True)
            )
            found = self._rule_headers[id(rule)] = (rule, pair[0], pair[1])
        return found[1], found[2]


# Each ToR's proof, by its tables object: a long-running controller's next build starts
# from it.
_STATES: ByObject[SwitchTables, _ToRState] = ByObject(16)
also_forget(_STATES.clear)

_Parts = tuple[tuple[FieldMatch, ...], tuple[FieldMatch, ...], "_Headers | None", bool, int]


def _taken_apart(entry: TableEntry) -> _Parts:
    """(src_tags matches, dst_tags matches, the headers it covers, whether it matches a
    field no `policy` entry should, the rule it names), once per entry object."""
    found = _TAKEN_APART.get(id(entry))
    if found is not None and found[0] is entry:
        return found[1]
    src: list[FieldMatch] = []
    dst: list[FieldMatch] = []
    headers: list[FieldMatch] = []
    odd = False
    for m in entry.matches:
        name = m.field
        if name == "src_tags":
            src.append(m)
        elif name == "dst_tags":
            dst.append(m)
        elif name in _HEADER_FIELDS:
            headers.append(m)
        elif name != "epoch":
            odd = True
    params = entry.params
    rule_id = params[0][1] if len(params) == 1 and params[0][0] == "rule_id" else -1
    if rule_id < 0:
        rule_id = dict(params).get("rule_id", -1)
    parts = (tuple(src), tuple(dst), _entry_headers(tuple(headers)), odd, rule_id)
    if len(_TAKEN_APART) >= _TAKEN_APART_MAX:
        _TAKEN_APART.clear()
    _TAKEN_APART[id(entry)] = (entry, parts)
    return parts


# Each `policy` entry taken apart, by object (held, so its id stays its own): a ToR
# compiled again keeps its unchanged rules' entries as the same objects.
_TAKEN_APART: dict[int, tuple[TableEntry, _Parts]] = {}
_TAKEN_APART_MAX = 250_000  # two builds of the 10k-rule floor
also_forget(_TAKEN_APART.clear)


class _Memo:
    def __init__(self, make: Callable[..., bool]) -> None:
        self.make = make
        self.known: dict[object, bool] = {}

    def __call__(self, key: object) -> bool:
        found = self.known.get(key)
        if found is None:
            found = self.known[key] = self.make(key)
        return found


def _visible(entry: TableEntry, epoch: int) -> bool:
    return all(m.covers(epoch) for m in entry.matches if m.field == "epoch")


def _minus_priority(entry: TableEntry) -> int:
    return -entry.priority


def _no_headers(h: _Headers) -> bool:
    return h.tcp is None and h.udp is None and h.icmp is None and not h.bare


def _fields(entry: TableEntry) -> str:
    return ", ".join(sorted({m.field for m in entry.matches}))


def _what(rule: PolicyRule, reverse: bool) -> str:
    if rule.action is Action.DENY:
        return "drop"
    if reverse or rule.rate_pps is None:
        return "permit without a meter"
    return f"permit with the meter of {rule.rate_pps} pps"
