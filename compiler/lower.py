"""Stage 3 — Policy + inventory -> per-switch table entries (target neutral).

Identities. Each ToR's identity tables give an address a vector of tags, one per endpoint
set it belongs to that the ToR's entries match (compiler/tags.py); a rule's entry matches
its source's tag and its destination's tag, so a rule is one entry per ToR (per protocol
and port range). Tags come from the previous compile's allocation where they still fit
(compiler/allocation.py), so an edit changes only what it touches.

Placement. A ToR binds each host's address to its port (anti-spoofing), accepts the
other racks' hosts on its uplinks, and holds the policy entries of every rule that
involves one of its hosts; it judges traffic from and to its hosts. Spines forward.

Priorities (higher wins), one band per kind, rules ordered inside a band exactly as the
semantics choose the deciding rule (compiler.semantics: the lowest rule id decides):
  7 logged deny   6 deny   5 metered allow (lowest rate first)   4 allow
  3 logged deny of replies   2 deny of replies   1 reply allows   0 `default deny log`
A priority is `band << 28 | sub << 16 | (0xFFFF - rule id)` (a P4Runtime int32 > 0), with
`sub` 0 except in the metered band, where it ranks the rule's rate among the policy's
distinct rates (the lowest rate highest). Rule ids are stable (compiler.allocation), so
inserting, removing or editing a rule changes no other rule's entries — except metered
entries of lower rates when a rate appears or disappears (their sub-band moves up/down).

Meters. The forward entries of a `rate` allow are `permit_metered` and carry the direct
meter's config derived from the rate (compiler.entries.meter_for_rate); each entry has its
own meter, so a rule's rate holds per entry. Replies of a metered allow are not metered.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import networkx as nx

from compiler.addresses import AddressSet, Interval, merge_intervals
from compiler.allocation import Allocation, SideTags, Tag
from compiler.diagnostics import P4segError, error
from compiler.entries import (
    DefaultAction,
    FieldMatch,
    MeterConfig,
    SwitchTables,
    TableEntry,
    meter_for_rate,
)
from compiler.inventory import Host, Inventory, Switch
from compiler.model import ALL_PORTS, Action, Policy, PolicyRule, protocol_number
from compiler.protocols import ICMP_ECHO_REPLY_RANGE, TCP_ACK
from compiler.semantics import PolicySemantics, bits
from compiler.tags import (
    FIELD_MASK,
    FIELD_VALUES,
    MAX_FIELDS,
    NONE,
    SideCodes,
    TagSpaceError,
    allocate_side,
)
from p4src.spec import DEFAULT_RULE_ID, NO_TAGS, TAG_BITS, TAG_FIELD_BITS

FABRIC_RULE_ID = (1 << 16) - 1
_BAND_SHIFT, _SUB_SHIFT = 28, 16
MAX_DISTINCT_RATES = (1 << (_BAND_SHIFT - _SUB_SHIFT)) - 1

BAND_DENY_LOG, BAND_DENY, BAND_METERED, BAND_ALLOW = 7, 6, 5, 4
BAND_REPLY_DENY_LOG, BAND_REPLY_DENY, BAND_REPLY, BAND_DEFAULT = 3, 2, 1, 0


class LowerError(P4segError):
    """The policy cannot be laid out on the switches (e.g. more overlapping sets than tag fields)."""


def priority(band: int, rule_id: int, sub: int = 0) -> int:
    """P4Runtime priority of a rule's entries in a band: the lowest rule id decides first,
    after a higher `sub` (the metered band's rate rank)."""
    return band << _BAND_SHIFT | sub << _SUB_SHIFT | (FABRIC_RULE_ID - rule_id)


def _rate_ranks(
    rules: Iterable[PolicyRule], limit: int = MAX_DISTINCT_RATES, what: str = "the metered band"
) -> dict[int, int]:
    """Metered band: rate -> sub-band, the lowest rate highest (so it decides first), over
    the rates of `rules` (the entries that compete with each other)."""
    rates = sorted({r.rate_pps for r in rules if r.rate_pps is not None})
    if len(rates) > limit:
        raise LowerError(
            [
                error(
                    "E504",
                    f"the policy has {len(rates)} distinct rates; {what} orders at most {limit}",
                    None,
                )
            ]
        )
    return {rate: len(rates) - i for i, rate in enumerate(rates)}


def cidr_blocks(lo: int, hi: int, width: int = 32) -> Iterable[tuple[int, int]]:
    """The fewest aligned prefixes covering [lo, hi]: (value, prefix length)."""
    while lo <= hi:
        size = lo & -lo if lo else 1 << width
        while size > hi - lo + 1:
            size >>= 1
        yield lo, width - size.bit_length() + 1
        lo += size


@functools.cache
def _m(field: str, kind: str, value: int, arg: int = 0) -> FieldMatch:
    # Shared: the same match recurs on every switch (an uplink's host, a service's run).
    return FieldMatch(field, kind, value, arg)


# Identity and routing entries are made once for all the switches holding them: a remote
# host's uplink entry and its route are the same on most ToRs (keyed by ints: fast to hash).
@functools.lru_cache(maxsize=1 << 18)
def _source_entry(port: int, address: int, tags: int, role: str) -> TableEntry:
    matches = (_m("ingress_port", "exact", port), _m("src_addr", "lpm", address, 32))
    return TableEntry("src_identity", matches, "set_src_tags", (("tags", tags),), 33, None, role)


@functools.lru_cache(maxsize=1 << 18)
def _route_entry(address: int, port: int) -> TableEntry:
    matches = (_m("dst_addr", "lpm", address, 32),)
    return TableEntry("routing", matches, "forward", (("port", port),), 0, None, "host")


@functools.lru_cache(maxsize=1 << 14)
def _tails(
    proto: str, sport: tuple[Interval, ...], dport: tuple[Interval, ...], ack: bool
) -> tuple[tuple[FieldMatch, ...], ...]:
    """The matches after the identities, one tuple per entry (port range pair): the same
    for a rule on every ToR, so made once."""
    common: tuple[FieldMatch, ...] = ()
    number = protocol_number(proto)
    if number is not None:  # tcp, udp, icmp, `proto N`: exactly that protocol
        common += (_m("protocol", "ternary", number, 0xFF),)
    if ack:
        common += (_m("tcp_flags", "ternary", TCP_ACK, TCP_ACK),)
    out = []
    for sp_lo, sp_hi in sport:
        for dp_lo, dp_hi in dport:
            tail = common
            if (sp_lo, sp_hi) != ALL_PORTS[0]:
                tail += (_m("l4_src_port", "range", sp_lo, sp_hi),)
            if (dp_lo, dp_hi) != ALL_PORTS[0]:
                tail += (_m("l4_dst_port", "range", dp_lo, dp_hi),)
            out.append(tail)
    return tuple(out)


class _Codes(Protocol):
    """What a ToR's policy entries match a set key by, per side."""

    @property
    def src(self) -> _Matcher: ...
    @property
    def dst(self) -> _Matcher: ...


class _Matcher(Protocol):
    def match(self, key: str) -> tuple[int, int] | bool: ...


@dataclass
class _PolicyEntries:
    """The `policy` table entries of one ToR."""

    codes: _Codes
    entries: list[TableEntry]

    def add(
        self,
        rule: PolicyRule | None,
        src_key: str,
        dst_key: str,
        proto: str,
        action: str,
        prio: int,
        role: str,
        sport: tuple[Interval, ...] = ALL_PORTS,
        dport: tuple[Interval, ...] = ALL_PORTS,
        ack: bool = False,
        meter: MeterConfig | None = None,
    ) -> None:
        rule_id = rule.id if rule else DEFAULT_RULE_ID
        src = self.codes.src.match(src_key)
        dst = self.codes.dst.match(dst_key)
        if src is NONE or dst is NONE:
            return  # no packet this ToR judges is in the rule's source (or destination)
        head: tuple[FieldMatch, ...] = ()
        if not isinstance(src, bool):
            head += (_m("src_tags", "ternary", *src),)
        if not isinstance(dst, bool):
            head += (_m("dst_tags", "ternary", *dst),)
        params = (("rule_id", rule_id),)
        for tail in _tails(proto, sport, dport, ack):
            self.entries.append(
                TableEntry("policy", head + tail, action, params, prio, rule_id, role, meter)
            )


Priority = Callable[[int, int, int], int]  # (band, rule id, sub) -> priority


def _policy_entries(codes: _ToRCodes, policy: Policy) -> list[TableEntry]:
    mine = [
        (rule, codes.keys[(rule.id, "src")], codes.keys[(rule.id, "dst")])
        for rule in policy.rules
        if rule.id in codes.relevant  # else no host of this rack is involved
    ]
    out = _rule_entries(
        _PolicyEntries(codes, []), policy, mine, priority, "", _rate_ranks(policy.rules)
    )
    if policy.default_log:
        out.entries.append(
            TableEntry(
                "policy",
                (),
                "deny_and_log",
                (("rule_id", DEFAULT_RULE_ID),),
                priority(BAND_DEFAULT, DEFAULT_RULE_ID),
                DEFAULT_RULE_ID,
                "default-log",
            )
        )
    return out.entries


def _rule_entries(
    out: _PolicyEntries,
    policy: Policy,
    mine: list[tuple[PolicyRule, str, str]],
    prio: Priority,
    role: str,
    rate_rank: Mapping[int, int],
) -> _PolicyEntries:
    """The entries of `mine` (rule, source key, destination key): denies, then allows, then
    the allows' replies; `role`, when given, replaces each entry's role; `rate_rank`: the
    metered sub-bands of the entries these compete with."""
    for rule, src, dst in mine:
        if rule.action is Action.DENY:
            band, action = (BAND_DENY_LOG, "deny_and_log") if rule.log else (BAND_DENY, "deny")
            out.add(
                rule,
                src,
                dst,
                rule.proto,
                action,
                prio(band, rule.id, 0),
                role or "forward",
                dport=rule.ports,
            )
            rband = BAND_REPLY_DENY_LOG if rule.log else BAND_REPLY_DENY
            _replies(
                out,
                rule,
                dst,
                src,
                action,
                prio(rband, rule.id, 0),
                role or "reverse-deny",
                udp_always=True,
            )
    for rule, src, dst in mine:
        if rule.action is not Action.ALLOW:
            continue
        if rule.rate_pps is None:
            band, action, sub, meter = BAND_ALLOW, "permit", 0, None
        else:
            band, action = BAND_METERED, "permit_metered"
            sub, meter = rate_rank[rule.rate_pps], meter_for_rate(rule.rate_pps)
        out.add(
            rule,
            src,
            dst,
            rule.proto,
            action,
            prio(band, rule.id, sub),
            role or "forward",
            dport=rule.ports,
            meter=meter,
        )
    for rule, src, dst in mine:
        if rule.action is Action.ALLOW:
            _replies(
                out,
                rule,
                dst,
                src,
                "permit",
                prio(BAND_REPLY, rule.id, 0),
                role or "reply",
                udp_always=False,
            )
    return out


@dataclass(frozen=True, slots=True)
class ReplyMatch:
    """One kind of packet answering a rule's flows, as the ToRs' reply entries match it."""

    proto: str
    sport: tuple[Interval, ...] = ALL_PORTS
    dport: tuple[Interval, ...] = ALL_PORTS
    ack: bool = False


def reply_matches(rule: PolicyRule, udp_always: bool) -> tuple[ReplyMatch, ...]:
    """The packets answering `rule`'s flows that get entries of their own: TCP with ACK,
    UDP (always when `udp_always`, as for a deny; else with `reply`), ICMP echo replies."""
    out = []
    if rule.proto in ("tcp", "ip"):
        out.append(ReplyMatch("tcp", sport=rule.ports, ack=True))
    if rule.proto == "udp" and (udp_always or rule.reply):
        out.append(ReplyMatch("udp", sport=rule.ports))
    if rule.proto == "ip" and udp_always:
        out.append(ReplyMatch("udp"))
    if rule.answers_pings:  # `icmp`, `ip`, or ICMP types that include the echo request
        out.append(ReplyMatch("icmp", dport=(ICMP_ECHO_REPLY_RANGE,)))
    return tuple(out)


def _replies(
    out: _PolicyEntries,
    rule: PolicyRule,
    src: str,
    dst: str,
    action: str,
    prio: int,
    role: str,
    udp_always: bool,
) -> None:
    """Entries for the packets that answer `rule`'s flows (src/dst already reversed)."""
    for m in reply_matches(rule, udp_always):
        out.add(rule, src, dst, m.proto, action, prio, role, m.sport, m.dport, m.ack)


def _topology(inventory: Inventory) -> nx.Graph:
    g = nx.Graph()
    for s in sorted(inventory.switches, key=lambda s: s.name):
        g.add_node(s.name)
    for link in sorted(
        inventory.links, key=lambda link: (link.a, link.a_port, link.b, link.b_port)
    ):
        g.add_edge(link.a, link.b, ports={link.a: link.a_port, link.b: link.b_port})
    return g


def _next_ports(inventory: Inventory, graph: nx.Graph) -> dict[tuple[str, str], int]:
    """(switch, destination ToR) -> the port towards it, one BFS per destination ToR."""
    out = {}
    for dest in sorted({h.switch for h in inventory.hosts}):
        if dest not in graph:
            continue
        for switch, path in nx.single_source_shortest_path(graph, dest).items():
            if switch != dest:  # path runs dest -> ... -> switch: its last hop leads back
                out[(switch, dest)] = graph.edges[path[-1], path[-2]]["ports"][switch]
    return out


def _routing(
    hosts: list[Host], switch: Switch, next_port: dict[tuple[str, str], int]
) -> list[TableEntry]:
    """Every host's address to its port, or to the uplink towards its ToR (hosts sorted)."""
    entries = []
    for host in hosts:
        if host.switch == switch.name:
            port = host.port
        elif (switch.name, host.switch) in next_port:
            port = next_port[(switch.name, host.switch)]
        else:
            continue  # unreachable: no route, the packet is dropped
        entries.append(_route_entry(host.ip, port))
    return entries


def set_keys(policy: Policy) -> dict[tuple[int, str], str]:
    """The key each rule's source and destination set is tagged under ((rule id, "src" or
    "dst") -> key): its text, whitespace normalised — and, where one text stands for
    different sets in this policy (a quarantine or a grant rewrites sets and keeps texts),
    the text with a digest of the addresses for all but the largest, so that each key
    names one set."""
    first: dict[str, AddressSet] = {}  # text -> its first set (resolved sets are shared)
    sets: dict[str, set[tuple[Interval, ...]]] = {}
    uses: list[tuple[tuple[int, str], str, tuple[Interval, ...]]] = []
    for rule in policy.rules:
        for side, text, addresses in (
            ("src", rule.src_text, rule.src),
            ("dst", rule.dst_text, rule.dst),
        ):
            text = " ".join(text.split())
            seen = first.setdefault(text, addresses)
            if seen is not addresses and (text in sets or seen != addresses):
                sets.setdefault(text, {seen.intervals}).add(addresses.intervals)
            uses.append(((rule.id, side), text, addresses.intervals))
    # The largest of a text's sets keeps the bare text: a quarantine or a grant carves
    # pieces out of a service, and the service itself keeps its tags.
    bare = {
        text: max(found, key=lambda iv: (sum(hi - lo + 1 for lo, hi in iv), iv))
        for text, found in sets.items()
    }
    out = {}
    for use, text, intervals in uses:
        if text in bare and intervals != bare[text]:
            digest = hashlib.sha256(repr(intervals).encode()).hexdigest()[:12]
            text = f"{text} ~{digest}"
        out[use] = text
    return out


@dataclass(frozen=True, slots=True)
class _ToRCodes:
    """One ToR's tags: the rules it holds entries for and each side's codes."""

    relevant: frozenset[int]  # rule ids
    keys: Mapping[tuple[int, str], str]  # (rule id, side) -> the key its set is tagged under
    src: SideCodes
    dst: SideCodes
    quarantined: Mapping[int, int] = dataclasses.field(default_factory=dict)  # atom -> value


# -- quarantine overlay -------------------------------------------------------------------
# A quarantined host keeps its ordinary identity everywhere but on its own ToR, where both
# identity tables give it a reserved quarantine identity instead: value v in the top field
# of the vector (one v per quarantined host of the ToR, kept in the allocation). No
# ordinary tag is left on it there, so of the ToR's ordinary entries only those that match
# a side without a tag (`any`) could still meet its packets; the overlay's own entries,
# above every ordinary one (band 7 with a sub-band over 0), give it exactly the carved
# policy (runtime/live.py): each rule that names it, restricted to `remediation` on the
# other side, then a deny of everything else from or to it.
QUARANTINE_FIELD = MAX_FIELDS - 1  # reserved: ordinary sets use the fields below it
QUARANTINE_VALUES = FIELD_VALUES  # quarantined hosts per ToR
QUARANTINE_KEY = "(quarantine) "  # + the host's address: its value, in the ToR's src tags
REMEDIATION_KEY = "(remediation)"  # the `remediation` service, tagged on every ToR
_Q_SHIFT = QUARANTINE_FIELD * TAG_FIELD_BITS
_Q_SUB = 1 << 11  # overlay entries' sub-band in band 7: band << 8 | rate rank below it
_Q_DENY_SRC_SUB, _Q_DENY_DST_SUB = 2, 1  # the overlay's catch-all denies, below its rules
_Q_RATES = (1 << 8) - 1  # distinct rates the overlay's sub-band orders


def quarantine_tags(value: int) -> int:
    """The identity vector of a quarantined host (its value in the reserved field)."""
    return value << _Q_SHIFT


def _overlay_priority(band: int, rule_id: int, sub: int) -> int:
    if sub > _Q_RATES:
        raise LowerError(
            [
                error(
                    "E504",
                    f"a quarantined host's rule ranks {sub} among the policy's rates; the "
                    f"quarantine overlay orders at most {(1 << 8) - 1}",
                    None,
                )
            ]
        )
    return priority(BAND_DENY_LOG, rule_id, _Q_SUB | band << 8 | sub)


def _both(a: tuple[int, int] | bool, b: tuple[int, int] | bool) -> tuple[int, int] | bool:
    """The match of addresses in both sets (ANY: no match needed; NONE: nothing matches)."""
    if a is NONE or b is NONE:
        return NONE
    if isinstance(a, bool):
        return b
    if isinstance(b, bool):
        return a
    if a[1] & b[1]:  # one field: one tag, one set (or two disjoint ones)
        return a if a == b else NONE
    return a[0] | b[0], a[1] | b[1]


@dataclass(frozen=True, slots=True)
class _OverlaySide:
    """A side's codes with the overlay's keys: `QUARANTINE_KEY`+address (that host's
    quarantine identity) and `KEY & remediation`."""

    codes: SideCodes
    quarantined: Mapping[str, int]  # key -> value

    def match(self, key: str) -> tuple[int, int] | bool:
        if key in self.quarantined:
            return quarantine_tags(self.quarantined[key]), FIELD_MASK << _Q_SHIFT
        base, _, rest = key.rpartition(" & ")
        if rest == REMEDIATION_KEY:
            return _both(self.codes.match(base), self.codes.match(REMEDIATION_KEY))
        return self.codes.match(key)


@dataclass(frozen=True, slots=True)
class _OverlayCodes:
    src: _OverlaySide
    dst: _OverlaySide


def _overlay_entries(
    codes: _ToRCodes,
    policy: Policy,
    semantics: PolicySemantics,
    remediation: int,
    hosts: Iterable[tuple[Host, int]],
) -> list[TableEntry]:
    """The quarantine overlay's `policy` entries on one ToR (`hosts`: its quarantined hosts
    with their atoms; `remediation`: the service's atoms, 0 without one)."""
    keys = {f"{QUARANTINE_KEY}{h.ip}": codes.quarantined[atom] for h, atom in hosts}
    overlay = _OverlayCodes(_OverlaySide(codes.src, keys), _OverlaySide(codes.dst, keys))
    out = _PolicyEntries(overlay, [])
    log = policy.default_log or any(r.log for r in policy.rules)
    for host, atom in hosts:
        me = f"{QUARANTINE_KEY}{host.ip}"
        mine: list[tuple[PolicyRule, str, str]] = []
        for i, rule in enumerate(policy.rules):
            _, src, dst, _ = semantics.boxes[i]
            if src >> atom & 1 and dst & remediation:
                mine.append((rule, me, f"{codes.keys[(rule.id, 'dst')]} & {REMEDIATION_KEY}"))
            if dst >> atom & 1 and src & remediation:
                mine.append((rule, f"{codes.keys[(rule.id, 'src')]} & {REMEDIATION_KEY}", me))
        # The overlay's entries compete only with each other: their rates ranked among them.
        ranks = _rate_ranks((r for r, _s, _d in mine), _Q_RATES)
        _rule_entries(out, policy, mine, _overlay_priority, "quarantine", ranks)
        # Everything else from or to it: denied (and logged as the default deny, or when a
        # logged deny might have named it), above any ordinary entry that matches no tag.
        action = "deny_and_log" if log else "deny"
        for field, sub in (("src_tags", _Q_DENY_SRC_SUB), ("dst_tags", _Q_DENY_DST_SUB)):
            value, mask = overlay.src.match(me)  # type: ignore[misc]
            out.entries.append(
                TableEntry(
                    "policy",
                    (_m(field, "ternary", value, mask),),
                    action,
                    (("rule_id", DEFAULT_RULE_ID),),
                    priority(BAND_DENY_LOG, DEFAULT_RULE_ID, sub),
                    DEFAULT_RULE_ID,
                    "quarantine",
                )
            )
    return out.entries


def settle_quarantine(allocation: Allocation, switch: str) -> Allocation:
    """`allocation` once `switch` holds its compiled tables: the quarantine values retired
    there are free again (only a host's own ToR ever holds its quarantine identity)."""
    side = allocation.tags.get((switch, "src"))
    if side is None:
        return allocation
    retired = frozenset(t for t in side.retired if t[0] != QUARANTINE_FIELD)
    tags = {**allocation.tags, (switch, "src"): SideTags(side.tags, retired, side.shared)}
    return Allocation(allocation.rules, allocation.retired_rules, tags)


def _quarantine_values(
    switch: str, here: list[int], previous: SideTags
) -> tuple[dict[int, int], dict[str, Tag], frozenset[Tag]]:
    """Each quarantined host of a ToR (by address) -> its value in the reserved field: kept
    from `previous`, else the lowest free; values of released hosts are retired (a switch
    may still hold their entries) until the allocation settles. Also what to record."""
    # What the allocation says each quarantined address holds; anything odd in it (an
    # address that is no number, a slot outside the reserved field, a value two addresses
    # claim) is not trusted: that host gets a fresh value, never one another host holds.
    held: dict[int, int] = {}
    claimed: set[int] = set()
    for k, (f, v) in sorted(previous.tags.items()):
        text = k[len(QUARANTINE_KEY) :]
        if not k.startswith(QUARANTINE_KEY) or f != QUARANTINE_FIELD or not text.isdigit():
            continue
        if v not in claimed:
            held[int(text)] = v
            claimed.add(v)
    values = {a: v for a, v in held.items() if a in here}
    retired = {(QUARANTINE_FIELD, v) for a, v in held.items() if a not in here}
    taken = set(values.values()) | {
        v for f, v in previous.retired | retired if f == QUARANTINE_FIELD
    }
    for address in sorted(here):
        if address in values:
            continue
        free = next((v for v in range(1, QUARANTINE_VALUES + 1) if v not in taken), None)
        if free is None:
            raise LowerError(
                [
                    error(
                        "E501",
                        f"switch {switch}: more than {QUARANTINE_VALUES} quarantined hosts "
                        f"(held or being released) on one ToR; release some first",
                        None,
                    )
                ]
            )
        values[address] = free
        taken.add(free)
    record = {f"{QUARANTINE_KEY}{a}": (QUARANTINE_FIELD, v) for a, v in values.items()}
    return values, record, frozenset(retired)


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
    quarantined: Mapping[int, int],
) -> tuple[_ToRCodes, SideTags, SideTags]:
    """Allocate the ToR's tags (compiler.tags): every set its entries match, on the universe
    where the ToR needs it exact (its own hosts, every host, or every address); the
    `remediation` service (atoms) on every address, for a quarantine overlay; and a value
    of the reserved field for each of its `quarantined` hosts (address -> atom)."""
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
        if reply_matches(rule, udp_always=rule.action is Action.DENY):
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
    ordinary = SideTags(
        {k: t for k, t in previous["src"].tags.items() if not k.startswith(QUARANTINE_KEY)},
        previous["src"].retired,
        previous["src"].shared,
    )
    values, record, released = _quarantine_values(switch, sorted(quarantined), previous["src"])
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
    src_tags = SideTags({**src_tags.tags, **record}, src_tags.retired | released, src_tags.shared)
    by_atom = {quarantined[a]: v for a, v in values.items()}
    codes = _ToRCodes(frozenset(relevant), keys, src_codes, dst_codes, by_atom)
    return codes, src_tags, dst_tags


def _spine_identity(uplinks: list[int]) -> list[TableEntry]:
    """A spine's `src_identity`: any source from the fabric, no tags (ToRs judge)."""
    return [
        TableEntry(
            "src_identity",
            # Any source from the fabric: a don't-care, so the address is left out.
            (_m("ingress_port", "exact", port),),
            "set_src_tags",
            (("tags", NO_TAGS),),
            1,
            role="fabric",
        )
        for port in sorted(set(uplinks))
    ]


def _identity(
    codes: _ToRCodes,
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
        for value, plen in cidr_blocks(lo, hi):
            entries.append(
                TableEntry(
                    "dst_identity",
                    (_m("dst_addr", "lpm", value, plen),) if plen else (),
                    "set_dst_tags",
                    (("tags", vector),),
                    plen + 1,
                    role="identity",
                )
            )
    return entries


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


def _digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _switch_inputs(
    policy: Policy,
    inventory: Inventory,
    keys: Mapping[tuple[int, str], str],
    remediation: AddressSet | None,
    quarantined: set[int],
) -> dict[str, str]:
    """Per switch, a digest of what its entries are made from, at the level of addresses
    (atoms are renumbered by any edit): the inventory and the remediation service (tagged
    on every ToR); for a ToR, every rule naming one of its hosts — its id, meaning, set
    keys and rate rank —, the default rule, and its quarantined hosts."""
    floor = _digest(
        inventory.hosts,
        inventory.switches,
        inventory.links,
        remediation.intervals if remediation else None,
        any(r.log for r in policy.rules),  # a quarantine overlay logs its catch-all then
    )
    held = {h.ip: h.switch for h in inventory.hosts if h.ip in quarantined}
    located = sorted((h.ip, h.switch) for h in inventory.hosts)
    ips = [ip for ip, _ in located]
    tors = sorted({sw for _, sw in located})
    rate_rank = _rate_ranks(policy.rules)
    mine: dict[str, list[str]] = {t: [] for t in tors}
    for r in policy.rules:
        touched: set[str] = set()
        for lo, hi in (*r.src.intervals, *r.dst.intervals):
            for k in range(bisect.bisect_left(ips, lo), bisect.bisect_right(ips, hi)):
                touched.add(located[k][1])
                if len(touched) == len(tors):
                    break
        if not touched:
            continue
        meaning = _digest(
            r.id, r.action, r.src.intervals, r.dst.intervals, r.proto, r.ports, r.log,
            r.reply, r.rate_pps, keys[(r.id, "src")], keys[(r.id, "dst")],
            rate_rank.get(r.rate_pps) if r.rate_pps is not None else None,
        )  # fmt: skip
        for t in touched:
            mine[t].append(meaning)
    return {
        sw.name: _digest(
            floor,
            sw.name,
            policy.default_log,
            sorted(mine.get(sw.name, ())),
            sorted(ip for ip, tor in held.items() if tor == sw.name),
        )
        for sw in inventory.switches
    }


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
    if service is not None:
        # A quarantine overlay ranks the rates of the rules meeting `remediation` in 8 bits:
        # refuse such a policy now, not the day a host must be cut off.
        meeting = (
            r for r in policy.rules if r.src.intersection(service) or r.dst.intersection(service)
        )
        _rate_ranks(meeting, _Q_RATES, "among the rules meeting `remediation`, a quarantine")
    keys = set_keys(policy)
    inputs = _switch_inputs(policy, inventory, keys, service, cut)
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
        pinned = (h.ip for h in inventory.hosts)
        return PolicySemantics(policy, pinned, sets=[service.intervals] if service else ())

    next_port = _next_ports(inventory, _topology(inventory))
    tags: dict[tuple[str, str], SideTags] = {}
    hosts_sorted = sorted(inventory.hosts, key=lambda h: h.ip)
    out = []
    fields: dict[str, int] = {}
    reused = set()
    for switch in sorted(inventory.switches, key=lambda s: s.device_id):
        if reusable(switch.name):
            assert previous is not None
            out.append(before[switch.name])
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
        if switch.role == "tor":
            sem = semantics()
            part = sem.addresses
            host_atoms = [(h, part.atom_of(h.ip)) for h in hosts_sorted]
            local = hosts = 0
            for host, atom in host_atoms:
                hosts |= 1 << atom
                if host.switch == switch.name:
                    local |= 1 << atom
            remediation = part.mask(service.intervals) if service else 0
            here = [(h, a) for h, a in host_atoms if h.switch == switch.name and h.ip in cut]
            codes, tags[(switch.name, "src")], tags[(switch.name, "dst")] = _tor_codes(
                sem,
                policy,
                switch.name,
                local,
                hosts,
                keys,
                allocation,
                remediation,
                {h.ip: a for h, a in here},
            )
            fields[switch.name] = max(codes.src.fields, codes.dst.fields)
            entries = _identity(codes, sem, host_atoms, switch, uplinks)
            entries += _policy_entries(codes, policy)
            entries += _overlay_entries(codes, policy, sem, remediation, here)
        else:
            entries = _spine_identity(uplinks)
            entries.append(
                TableEntry(
                    "policy",
                    (),
                    "permit",
                    (("rule_id", FABRIC_RULE_ID),),
                    1,
                    FABRIC_RULE_ID,
                    "fabric",
                )
            )
        entries += _routing(hosts_sorted, switch, next_port)
        defaults = (DefaultAction("epoch", "set_epoch", (("value", 0),)),)
        out.append(
            SwitchTables(
                switch.name,
                switch.role,
                switch.device_id,
                tuple(entries),
                defaults,
                span=switch.span,
            )
        )
    # Switches no longer in the inventory: their tags are retired with everything else.
    for key, side in allocation.tags.items():
        if key not in tags:
            tags[key] = SideTags({}, frozenset(side.retired | set(side.tags.values())))
    new = Allocation(allocation.rules, allocation.retired_rules, tags)
    most = max(fields.values(), default=0)
    return Lowered(tuple(out), new, most, inputs, fields, frozenset(reused))
