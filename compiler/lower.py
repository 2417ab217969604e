"""Stage 3 — Policy + inventory -> per-switch table entries (target neutral).

Groups. Addresses are partitioned into atoms (compiler.semantics); each atom gets a
16-bit group id. Ids are handed out in an order that keeps the atoms of each service
together, so a rule's source or destination is a few *runs* of consecutive ids and one
rule becomes a few `range` entries instead of one entry per pair of atoms. The atom of
addresses named by no rule gets group 0, which is also `dst_identity`'s default.

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

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx

from compiler.addresses import Interval
from compiler.diagnostics import P4segError, error
from compiler.entries import (
    DefaultAction,
    FieldMatch,
    MeterConfig,
    SwitchTables,
    TableEntry,
    meter_for_rate,
)
from compiler.inventory import Inventory, Switch
from compiler.model import ALL_PORTS, Action, Policy, PolicyRule, protocol_number
from compiler.protocols import ICMP_ECHO_REPLY_RANGE, TCP_ACK
from compiler.semantics import PolicySemantics, bits
from p4src.spec import DEFAULT_RULE_ID, GROUP_BITS

FABRIC_RULE_ID = (1 << 16) - 1
ALL_GROUPS = (0, (1 << GROUP_BITS) - 1)  # spines' single permit: transit, judged at the ToRs
_BAND_SHIFT, _SUB_SHIFT = 28, 16
MAX_DISTINCT_RATES = (1 << (_BAND_SHIFT - _SUB_SHIFT)) - 1

BAND_DENY_LOG, BAND_DENY, BAND_METERED, BAND_ALLOW = 7, 6, 5, 4
BAND_REPLY_DENY_LOG, BAND_REPLY_DENY, BAND_REPLY, BAND_DEFAULT = 3, 2, 1, 0


class LowerError(P4segError):
    """The policy cannot be laid out on the switches (e.g. more atoms than group ids)."""


def priority(band: int, rule_id: int, sub: int = 0) -> int:
    """P4Runtime priority of a rule's entries in a band: the lowest rule id decides first,
    after a higher `sub` (the metered band's rate rank)."""
    return band << _BAND_SHIFT | sub << _SUB_SHIFT | (FABRIC_RULE_ID - rule_id)


def _rate_ranks(policy: Policy) -> dict[int, int]:
    """Metered band: rate -> sub-band, the lowest rate highest (so it decides first)."""
    rates = sorted({r.rate_pps for r in policy.rules if r.rate_pps is not None})
    if len(rates) > MAX_DISTINCT_RATES:
        raise LowerError(
            [
                error(
                    "E504",
                    f"the policy has {len(rates)} distinct rates; the metered band orders at "
                    f"most {MAX_DISTINCT_RATES}",
                    None,
                )
            ]
        )
    return {rate: len(rates) - i for i, rate in enumerate(rates)}


@dataclass(frozen=True, slots=True)
class Groups:
    """Atom -> group id, and the inverse view a rule needs: runs of consecutive ids."""

    semantics: PolicySemantics
    of_atom: tuple[int, ...]
    _runs: dict[int, list[Interval]]

    def runs(self, atom_mask: int) -> list[Interval]:
        cached = self._runs.get(atom_mask)
        if cached is not None:
            return cached
        ids = sorted(self.of_atom[a] for a in bits(atom_mask))
        runs: list[list[int]] = []
        for g in ids:
            if runs and g == runs[-1][1] + 1:
                runs[-1][1] = g
            else:
                runs.append([g, g])
        result = [(lo, hi) for lo, hi in runs]
        self._runs[atom_mask] = result
        return result

    def group_of(self, address: int) -> int:
        return self.of_atom[self.semantics.addresses.atom_of(address)]

    @property
    def count(self) -> int:
        return max(self.of_atom, default=0) + 1


def assign_groups(semantics: PolicySemantics, masks: Iterable[int] | None = None) -> Groups:
    """Group ids for the atoms, keeping the atoms of each of `masks` consecutive.

    `masks` are the atom sets entries will match (default: every rule's source and
    destination). Ids are a switch's own business: each switch maps addresses to groups
    in its own identity tables, so each ToR gets the numbering that suits its entries.
    """
    part = semantics.addresses
    if masks is None:
        masks = (
            part.mask(s)
            for s in sorted(
                {s for r in semantics.rules for s in (r.src.intervals, r.dst.intervals)}
            )
        )
    members: list[list[int]] = [[] for _ in range(part.count)]
    for j, mask in enumerate(dict.fromkeys(m for m in masks if m and m != part.full)):
        for a in bits(mask):
            members[a].append(j)
    # Atoms sharing memberships sort next to each other: services become runs of ids.
    order = sorted(range(part.count), key=lambda a: (members[a], part.representative[a]))
    of_atom = [0] * part.count
    next_id = 1
    for atom in order:
        if members[atom]:
            of_atom[atom] = next_id
            next_id += 1
    if next_id > 1 << GROUP_BITS:
        raise LowerError(
            [
                error(
                    "E501",
                    f"the policy needs {next_id} groups; the pipeline has {1 << GROUP_BITS}",
                    None,
                )
            ]
        )
    return Groups(semantics, tuple(of_atom), {})


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


@dataclass
class _PolicyEntries:
    """The `policy` table entries of one ToR."""

    groups: Groups
    entries: list[TableEntry]
    local: int  # atoms of this ToR's hosts

    def _runs(self, mask: int) -> list[Interval]:
        if mask == self.groups.semantics.addresses.full:
            return [ALL_GROUPS]
        return self.groups.runs(mask) if mask else []

    def add(
        self,
        rule: PolicyRule | None,
        src_mask: int,
        dst_mask: int,
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
        # A ToR sees only packets from its hosts or to them: (src ∩ local) x dst, then
        # (src \ local) x (dst ∩ local) — disjoint, and far fewer runs than src x dst.
        full = self.groups.semantics.addresses.full
        if src_mask == full and dst_mask == full:
            blocks = [([ALL_GROUPS], [ALL_GROUPS])]
        else:
            blocks = [
                (self._runs(src_mask & self.local), self._runs(dst_mask)),
                (self._runs(src_mask & ~self.local & full), self._runs(dst_mask & self.local)),
            ]
        common: list[FieldMatch] = []
        number = protocol_number(proto)
        if number is not None:  # tcp, udp, icmp, `proto N`: exactly that protocol
            common.append(_m("protocol", "ternary", number, 0xFF))
        if ack:
            common.append(_m("tcp_flags", "ternary", TCP_ACK, TCP_ACK))
        params = (("rule_id", rule_id),)
        for src_runs, dst_runs in blocks:
            for s_lo, s_hi in src_runs:
                for d_lo, d_hi in dst_runs:
                    for sp_lo, sp_hi in sport:
                        for dp_lo, dp_hi in dport:
                            matches = []
                            if (s_lo, s_hi) != ALL_GROUPS:
                                matches.append(_m("src_group", "range", s_lo, s_hi))
                            if (d_lo, d_hi) != ALL_GROUPS:
                                matches.append(_m("dst_group", "range", d_lo, d_hi))
                            matches += common
                            if (sp_lo, sp_hi) != ALL_PORTS[0]:
                                matches.append(_m("l4_src_port", "range", sp_lo, sp_hi))
                            if (dp_lo, dp_hi) != ALL_PORTS[0]:
                                matches.append(_m("l4_dst_port", "range", dp_lo, dp_hi))
                            self.entries.append(
                                TableEntry(
                                    "policy",
                                    tuple(matches),
                                    action,
                                    params,
                                    prio,
                                    rule_id,
                                    role,
                                    meter,
                                )
                            )


def _policy_entries(groups: Groups, policy: Policy, local: int) -> list[TableEntry]:
    sem = groups.semantics
    out = _PolicyEntries(groups, [], local)
    rate_rank = _rate_ranks(policy)
    # Boxes are in the semantics' own order (the policy's), never looked up by rule id.
    boxes = [(rule, box[1], box[2]) for rule, box in zip(policy.rules, sem.boxes, strict=True)]
    mine = [(rule, src, dst) for rule, src, dst in boxes if src & local or dst & local]
    for rule, src, dst in mine:
        if rule.action is Action.DENY:
            band, action = (BAND_DENY_LOG, "deny_and_log") if rule.log else (BAND_DENY, "deny")
            out.add(
                rule,
                src,
                dst,
                rule.proto,
                action,
                priority(band, rule.id),
                "forward",
                dport=rule.ports,
            )
            rband = BAND_REPLY_DENY_LOG if rule.log else BAND_REPLY_DENY
            _replies(
                out,
                rule,
                dst,
                src,
                action,
                priority(rband, rule.id),
                "reverse-deny",
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
            priority(band, rule.id, sub),
            "forward",
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
                priority(BAND_REPLY, rule.id),
                "reply",
                udp_always=False,
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
    src: int,
    dst: int,
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
    inventory: Inventory, switch: Switch, next_port: dict[tuple[str, str], int]
) -> list[TableEntry]:
    entries = []
    for host in sorted(inventory.hosts, key=lambda h: h.ip):
        if host.switch == switch.name:
            port = host.port
        elif (switch.name, host.switch) in next_port:
            port = next_port[(switch.name, host.switch)]
        else:
            continue  # unreachable: no route, the packet is dropped
        entries.append(
            TableEntry(
                "routing",
                (_m("dst_addr", "lpm", host.ip, 32),),
                "forward",
                (("port", port),),
                role="host",
            )
        )
    return entries


def _identity(
    groups: Groups, inventory: Inventory, switch: Switch, uplinks: list[int]
) -> list[TableEntry]:
    entries = []
    if switch.role == "spine":
        for port in sorted({p for p in uplinks}):
            entries.append(
                TableEntry(
                    "src_identity",
                    # Any source from the fabric: a don't-care, so the address is left out.
                    (_m("ingress_port", "exact", port),),
                    "set_src_group",
                    (("group", 0),),
                    1,
                    role="fabric",
                )
            )
        return entries
    for host in sorted(inventory.hosts, key=lambda h: h.ip):
        group = (("group", groups.group_of(host.ip)),)
        if host.switch == switch.name:
            entries.append(
                TableEntry(
                    "src_identity",
                    (_m("ingress_port", "exact", host.port), _m("src_addr", "lpm", host.ip, 32)),
                    "set_src_group",
                    group,
                    33,
                    role="host",
                )
            )
        else:  # another rack's host, arriving from the fabric
            for port in uplinks:
                entries.append(
                    TableEntry(
                        "src_identity",
                        (_m("ingress_port", "exact", port), _m("src_addr", "lpm", host.ip, 32)),
                        "set_src_group",
                        group,
                        33,
                        role="uplink",
                    )
                )
    for atom, intervals in enumerate(_atom_intervals(groups)):
        group_id = groups.of_atom[atom]
        if group_id == 0:
            continue  # dst_identity's default
        for lo, hi in intervals:
            for value, plen in cidr_blocks(lo, hi):
                entries.append(
                    TableEntry(
                        "dst_identity",
                        (_m("dst_addr", "lpm", value, plen),) if plen else (),
                        "set_dst_group",
                        (("group", group_id),),
                        plen + 1,
                        role="atom",
                    )
                )
    return entries


def _atom_intervals(groups: Groups) -> list[list[Interval]]:
    """Each atom's address intervals, in one pass over the partition."""
    part = groups.semantics.addresses
    out: list[list[Interval]] = [[] for _ in range(part.count)]
    for i, start in enumerate(part.starts):
        end = part.starts[i + 1] - 1 if i + 1 < len(part.starts) else part.top
        out[part.element_atom[i]].append((start, end))
    return out


def _tor_masks(semantics: PolicySemantics, local: int) -> list[int]:
    """The atom sets a ToR's policy entries match (see _PolicyEntries.add)."""
    full = semantics.addresses.full
    masks = []
    for _, src, dst, _ in semantics.boxes:
        if src & local or dst & local:
            masks += [src & local, dst, src & ~local & full, dst & local]
    return masks


def lower(
    policy: Policy, inventory: Inventory
) -> tuple[dict[str, Groups], tuple[SwitchTables, ...]]:
    """Every switch's entries for `policy` on `inventory` (epoch left wildcard), and the
    group numbering of each ToR."""
    semantics = PolicySemantics(policy, pinned=(h.ip for h in inventory.hosts))
    groups_of: dict[str, Groups] = {}
    global_groups = assign_groups(semantics)
    next_port = _next_ports(inventory, _topology(inventory))
    part = semantics.addresses
    out = []
    for switch in sorted(inventory.switches, key=lambda s: s.device_id):
        uplinks = sorted(
            port
            for link in inventory.links
            for name, port in ((link.a, link.a_port), (link.b, link.b_port))
            if name == switch.name
        )
        local = 0
        for host in inventory.hosts:
            if host.switch == switch.name:
                local |= 1 << part.atom_of(host.ip)
        masks = _tor_masks(semantics, local)
        groups = min(  # two orderings; keep the one whose entries need fewer runs
            (assign_groups(semantics, masks), global_groups),
            key=lambda g: sum(len(g.runs(m)) for m in set(masks) if m != part.full),
        )
        entries = _identity(groups, inventory, switch, uplinks)
        if switch.role == "tor":
            groups_of[switch.name] = groups
            entries += _policy_entries(groups, policy, local)
        else:
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
        entries += _routing(inventory, switch, next_port)
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
    return groups_of, tuple(out)
