"""The quarantine overlay: how a quarantined host is cut off on its own ToR (used by lower).

A quarantined host keeps its ordinary identity everywhere but on its own ToR, where both
identity tables give it a reserved quarantine identity instead: value v in the top field
of the vector (one v per quarantined host of the ToR, kept in the allocation). No
ordinary tag is left on it there, so of the ToR's ordinary entries only those that match
a side without a tag (`any`) could still meet its packets; the overlay's own entries,
above every ordinary one (band 7 with a sub-band over 0), give it exactly the carved
policy (runtime/live.py): each rule that names it, restricted to `remediation` on the
other side, then a deny of everything else from or to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from compiler.allocation import Allocation, SideTags, Tag
from compiler.diagnostics import error
from compiler.entries import TableEntry
from compiler.inventory import Host
from compiler.model import Policy, PolicyRule
from compiler.rule_entries import (
    BAND_DENY_LOG,
    LowerError,
    PolicyEntries,
    ToRCodes,
    field_match,
    priority,
    rate_ranks,
    rule_entries,
)
from compiler.tags import FIELD_MASK, FIELD_VALUES, MAX_FIELDS, NONE, SideCodes
from p4src.spec import DEFAULT_RULE_ID, TAG_FIELD_BITS

QUARANTINE_FIELD = MAX_FIELDS - 1  # reserved: ordinary sets use the fields below it
QUARANTINE_VALUES = FIELD_VALUES  # quarantined hosts per ToR
QUARANTINE_KEY = "(quarantine) "  # + the host's address: its value, in the ToR's src tags
REMEDIATION_KEY = "(remediation)"  # the `remediation` service, tagged on every ToR
_Q_SHIFT = QUARANTINE_FIELD * TAG_FIELD_BITS
QUARANTINE_MASK = FIELD_MASK << _Q_SHIFT  # the tag vector's bits that hold quarantine values
_Q_SUB = 1 << 11  # overlay entries' sub-band in band 7: band << 8 | rate rank below it
_Q_DENY_SRC_SUB, _Q_DENY_DST_SUB = 2, 1  # the overlay's catch-all denies, below its rules
QUARANTINE_RATES = (1 << 8) - 1  # distinct rates the overlay's sub-band orders


def quarantine_tags(value: int) -> int:
    """The identity vector of a quarantined host (its value in the reserved field)."""
    return value << _Q_SHIFT


def _overlay_priority(band: int, rule_id: int, sub: int) -> int:
    if sub > QUARANTINE_RATES:
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
            return quarantine_tags(self.quarantined[key]), QUARANTINE_MASK
        base, _, rest = key.rpartition(" & ")
        if rest == REMEDIATION_KEY:
            return _both(self.codes.match(base), self.codes.match(REMEDIATION_KEY))
        return self.codes.match(key)


@dataclass(frozen=True, slots=True)
class _OverlayCodes:
    src: _OverlaySide
    dst: _OverlaySide


def overlay_entries(
    codes: ToRCodes,
    policy: Policy,
    meets: tuple[frozenset[int], frozenset[int]],
    hosts: Iterable[tuple[Host, int]],
) -> list[TableEntry]:
    """The quarantine overlay's `policy` entries on one ToR (`hosts`: its quarantined hosts
    with their atoms; `meets`: the ids of the rules whose source, and whose destination,
    meets the `remediation` service — none without one). In addresses, not atoms: a ToR's
    codes may come from a compile of an earlier version of the policy (compiler/lower.py
    `_retagged`)."""
    src_meets, dst_meets = meets
    keys = {f"{QUARANTINE_KEY}{h.ip}": codes.quarantined[atom] for h, atom in hosts}
    overlay = _OverlayCodes(_OverlaySide(codes.src, keys), _OverlaySide(codes.dst, keys))
    out = PolicyEntries(overlay, [])
    log = policy.default_log or any(r.log for r in policy.rules)
    for host, _atom in hosts:
        me = f"{QUARANTINE_KEY}{host.ip}"
        mine: list[tuple[PolicyRule, str, str]] = []
        for rule in policy.rules:
            if rule.id in dst_meets and host.ip in rule.src:
                mine.append((rule, me, f"{codes.keys[(rule.id, 'dst')]} & {REMEDIATION_KEY}"))
            if rule.id in src_meets and host.ip in rule.dst:
                mine.append((rule, f"{codes.keys[(rule.id, 'src')]} & {REMEDIATION_KEY}", me))
        # The overlay's entries compete only with each other: their rates ranked among them.
        ranks = rate_ranks((r for r, _s, _d in mine), QUARANTINE_RATES)
        rule_entries(out, policy, mine, _overlay_priority, "quarantine", ranks)
        # Everything else from or to it: denied (and logged as the default deny, or when a
        # logged deny might have named it), above any ordinary entry that matches no tag.
        action = "deny_and_log" if log else "deny"
        for field, sub in (("src_tags", _Q_DENY_SRC_SUB), ("dst_tags", _Q_DENY_DST_SUB)):
            value, mask = overlay.src.match(me)  # type: ignore[misc]
            out.entries.append(
                TableEntry(
                    "policy",
                    (field_match(field, "ternary", value, mask),),
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
    if retired == side.retired:
        return allocation  # nothing of a quarantine retired there
    tags = {**allocation.tags, (switch, "src"): SideTags(side.tags, retired, side.shared)}
    return Allocation(allocation.rules, allocation.retired_rules, tags)


def quarantine_values(
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
