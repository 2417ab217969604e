"""A rule's `policy` entries on one ToR: matches, priorities, replies (used by compiler/lower.py).

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

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from compiler.addresses import Interval
from compiler.diagnostics import P4segError, error
from compiler.entries import FieldMatch, MeterConfig, TableEntry, meter_for_rate
from compiler.memo import also_forget
from compiler.model import ALL_PORTS, Action, Policy, PolicyRule, protocol_number
from compiler.protocols import ICMP_ECHO_REPLY_RANGE, TCP_ACK
from compiler.tags import NONE, SideCodes
from p4src.spec import DEFAULT_RULE_ID

FABRIC_RULE_ID = (1 << 16) - 1  # spines' single permit (transit, judged at the ToRs)
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


def rate_ranks(
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


@functools.cache
def field_match(field: str, kind: str, value: int, arg: int = 0) -> FieldMatch:
    # Shared: the same match recurs on every switch (an uplink's host, a service's run).
    return FieldMatch(field, kind, value, arg)


also_forget(field_match.cache_clear)  # a memo: a new process starts without it


@dataclass(frozen=True, slots=True)
class ToRCodes:
    """One ToR's tags: the rules it holds entries for and each side's codes."""

    relevant: frozenset[int]  # rule ids
    keys: Mapping[tuple[int, str], str]  # (rule id, side) -> the key its set is tagged under
    src: SideCodes
    dst: SideCodes
    quarantined: Mapping[int, int] = dataclasses.field(default_factory=dict)  # atom -> value


@functools.lru_cache(maxsize=1 << 14)
def tails(
    proto: str, sport: tuple[Interval, ...], dport: tuple[Interval, ...], ack: bool
) -> tuple[tuple[FieldMatch, ...], ...]:
    """The matches after the identities, one tuple per entry (port range pair): the same
    for a rule on every ToR, so made once."""
    common: tuple[FieldMatch, ...] = ()
    number = protocol_number(proto)
    if number is not None:  # tcp, udp, icmp, `proto N`: exactly that protocol
        common += (field_match("protocol", "ternary", number, 0xFF),)
    # In the table's key order (p4src/spec.py), as an entries file reads back (load_entries).
    flags = (field_match("tcp_flags", "ternary", TCP_ACK, TCP_ACK),) if ack else ()
    out = []
    for sp_lo, sp_hi in sport:
        for dp_lo, dp_hi in dport:
            tail = common
            if (sp_lo, sp_hi) != ALL_PORTS[0]:
                tail += (field_match("l4_src_port", "range", sp_lo, sp_hi),)
            if (dp_lo, dp_hi) != ALL_PORTS[0]:
                tail += (field_match("l4_dst_port", "range", dp_lo, dp_hi),)
            out.append(tail + flags)
    return tuple(out)


class Codes(Protocol):
    """What a ToR's policy entries match a set key by, per side."""

    @property
    def src(self) -> Matcher: ...
    @property
    def dst(self) -> Matcher: ...


class Matcher(Protocol):
    def match(self, key: str) -> tuple[int, int] | bool: ...


@dataclass
class PolicyEntries:
    """The `policy` table entries of one ToR."""

    codes: Codes
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
            head += (field_match("src_tags", "ternary", *src),)
        if not isinstance(dst, bool):
            head += (field_match("dst_tags", "ternary", *dst),)
        params = (("rule_id", rule_id),)
        for tail in tails(proto, sport, dport, ack):
            self.entries.append(
                TableEntry("policy", head + tail, action, params, prio, rule_id, role, meter)
            )


Priority = Callable[[int, int, int], int]  # (band, rule id, sub) -> priority


def rule_entries(
    out: PolicyEntries,
    policy: Policy,
    mine: list[tuple[PolicyRule, str, str]],
    prio: Priority,
    role: str,
    rate_rank: Mapping[int, int],
) -> PolicyEntries:
    """The entries of `mine` (rule, source key, destination key): denies, then allows, then
    the allows' replies; `role`, when given, replaces each entry's role; `rate_rank`: the
    metered sub-bands of the entries these compete with."""
    for rule, src, dst in mine:
        if rule.action is Action.DENY:
            _deny(out, rule, src, dst, prio, role)
    for rule, src, dst in mine:
        if rule.action is Action.ALLOW:
            _allow(out, rule, src, dst, prio, role, rate_rank)
    for rule, src, dst in mine:
        if rule.action is Action.ALLOW:
            _allow_replies(out, rule, src, dst, prio, role)
    return out


# One rule's entries on a ToR, by `rule_entries`' pass: (denies, allows, the allows' replies).
RuleParts = tuple[tuple[TableEntry, ...], tuple[TableEntry, ...], tuple[TableEntry, ...]]


def rule_parts(
    codes: Codes, rule: PolicyRule, src: str, dst: str, rate_rank: Mapping[int, int]
) -> RuleParts:
    """`rule`'s ordinary entries (`priority`, roles as made) split by pass, so that a ToR's
    entries can be put together from rules made before: `rule_entries` of several rules
    is the concatenation of their denies, then of their allows, then of their replies."""
    out = PolicyEntries(codes, [])
    if rule.action is Action.DENY:
        _deny(out, rule, src, dst, priority, "")
        return tuple(out.entries), (), ()
    if rule.action is Action.ALLOW:
        _allow(out, rule, src, dst, priority, "", rate_rank)
        allows, out.entries = tuple(out.entries), []
        _allow_replies(out, rule, src, dst, priority, "")
        return (), allows, tuple(out.entries)
    return (), (), ()


def _deny(out: PolicyEntries, rule: PolicyRule, src: str, dst: str, prio: Priority,
          role: str) -> None:  # fmt: skip
    band, action = (BAND_DENY_LOG, "deny_and_log") if rule.log else (BAND_DENY, "deny")
    out.add(rule, src, dst, rule.proto, action, prio(band, rule.id, 0), role or "forward",
            dport=rule.ports)  # fmt: skip
    rband = BAND_REPLY_DENY_LOG if rule.log else BAND_REPLY_DENY
    replies(out, rule, dst, src, action, prio(rband, rule.id, 0), role or "reverse-deny",
            udp_always=True)  # fmt: skip


def _allow(out: PolicyEntries, rule: PolicyRule, src: str, dst: str, prio: Priority,
           role: str, rate_rank: Mapping[int, int]) -> None:  # fmt: skip
    if rule.rate_pps is None:
        band, action, sub, meter = BAND_ALLOW, "permit", 0, None
    else:
        band, action = BAND_METERED, "permit_metered"
        sub, meter = rate_rank[rule.rate_pps], meter_for_rate(rule.rate_pps)
    out.add(rule, src, dst, rule.proto, action, prio(band, rule.id, sub), role or "forward",
            dport=rule.ports, meter=meter)  # fmt: skip


def _allow_replies(out: PolicyEntries, rule: PolicyRule, src: str, dst: str, prio: Priority,
                   role: str) -> None:  # fmt: skip
    replies(out, rule, dst, src, "permit", prio(BAND_REPLY, rule.id, 0), role or "reply",
            udp_always=False)  # fmt: skip


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
    return _reply_matches(rule.proto, rule.ports, rule.reply, rule.answers_pings, udp_always)


@functools.lru_cache(maxsize=1 << 12)
def _reply_matches(
    proto: str, ports: tuple[Interval, ...], reply: bool, pings: bool, udp_always: bool
) -> tuple[ReplyMatch, ...]:
    """`reply_matches` of a rule by what decides them: made once for every rule alike."""
    out = []
    if proto in ("tcp", "ip"):
        out.append(ReplyMatch("tcp", sport=ports, ack=True))
    if proto == "udp" and (udp_always or reply):
        out.append(ReplyMatch("udp", sport=ports))
    if proto == "ip" and udp_always:
        out.append(ReplyMatch("udp"))
    if pings:  # `icmp`, `ip`, or ICMP types that include the echo request
        out.append(ReplyMatch("icmp", dport=(ICMP_ECHO_REPLY_RANGE,)))
    return tuple(out)


also_forget(_reply_matches.cache_clear)


def replies(
    out: PolicyEntries,
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
