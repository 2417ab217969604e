"""Which packets a change can have touched: the pairs a differential proof must walk again.

Given a build proven for a policy (the previous one) and a new build for a new policy on the
same inventory, a packet from a sender to a destination class can get another verdict only
if (a) the policy's decision on it changed, which takes a rule that changed (added, removed,
or meaning something else: its addresses, protocol, ports, action, log, reply, rate or id)
and whose flows it belongs to, forward or as a reply; or (b) it meets, on some switch of its
path, an entry that one build has and the other has not — for then the first entry it
matches there may differ. Everything else meets the same first entries on the same path and
is judged by the same rules: its verdict is the one already proven.

So the scope is, per sender, a set of destination address classes:
- a changed rule: its source hosts x the classes meeting its destinations, and its
  destination hosts x the classes meeting its sources (the replies);
- a changed `policy` entry on a switch: the senders whose identity there matches its
  `src_tags` x the classes whose identity there matches its `dst_tags` (the other fields
  left out: over-approximated); identities are looked up in the new tables, and wherever an
  identity entry changed on that switch its addresses are in scope whole (below), so for
  every other address the old identity is the new one;
- a changed `src_identity` entry: every sender in its prefix x every class (and those
  hosts' spoofing is proven again); a changed `dst_identity` or `routing` entry: every
  sender x the classes meeting its prefix.
Anything else (the inventory, a switch added or removed, a default action, a table this
module does not know): None — prove everything.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from compiler.entries import FieldMatch, SwitchTables, TableEntry
from compiler.inventory import Host, Inventory
from compiler.model import Policy, PolicyRule

MAX_ADDRESS = (1 << 32) - 1
_KNOWN_TABLES = frozenset({"src_identity", "dst_identity", "policy", "routing"})


@dataclass(frozen=True)
class PairScope:
    """Per sender address, the destination classes (bit i: the i-th address class of the
    new build's verifier) to prove again; the hosts whose spoofing to prove again."""

    masks: Mapping[int, int]
    spoof: frozenset[int]

    def pairs(self) -> int:
        return sum(m.bit_count() for m in self.masks.values())


def meaning(rule: PolicyRule) -> tuple[object, ...]:
    """What a rule decides: two rules with the same meaning decide the same packets alike."""
    return (
        rule.id, rule.action, rule.src.intervals, rule.dst.intervals, rule.proto, rule.ports,
        rule.log, rule.reply, rule.rate_pps,
    )  # fmt: skip


def changed_rules(old: Policy, new: Policy) -> list[PolicyRule]:
    """Every rule of either version whose meaning is not in the other (by stable key)."""
    before = {r.key: r for r in old.rules}
    after = {r.key: r for r in new.rules}
    out = []
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if a is not None and b is not None and meaning(a) == meaning(b):
            continue
        out += [r for r in (a, b) if r is not None]
    return out


def changed_entries(old: SwitchTables, new: SwitchTables) -> list[TableEntry] | None:
    """The entries one of the two has and the other has not; None if the switches differ
    otherwise (role, device, default actions)."""
    if old is new or old.entries == new.entries:
        return [] if (old.role, old.defaults) == (new.role, new.defaults) else None
    if (old.role, old.device_id, old.defaults) != (new.role, new.device_id, new.defaults):
        return None
    return list(set(old.entries) ^ set(new.entries))


class ScopeBuilder:
    """Accumulates a PairScope over the new build's address classes (`starts`: each
    class's first address, ascending) and the inventory's hosts."""

    def __init__(self, starts: Sequence[int], hosts: Iterable[Host]) -> None:
        self.starts = starts
        self.full = (1 << len(starts)) - 1
        self.hosts = sorted(hosts, key=lambda h: h.ip)
        self._ips = [h.ip for h in self.hosts]
        self.masks: dict[int, int] = {}
        self.every = 0  # classes in scope for every sender
        self.spoof: set[int] = set()

    def classes(self, intervals: Iterable[tuple[int, int]]) -> int:
        """The classes meeting these address intervals, as a bit mask."""
        mask = 0
        for lo, hi in intervals:
            i = bisect.bisect_right(self.starts, lo) - 1
            j = bisect.bisect_right(self.starts, hi)
            mask |= ((1 << (j - i)) - 1) << i
        return mask

    def senders(self, intervals: Iterable[tuple[int, int]]) -> list[Host]:
        """The hosts inside these address intervals."""
        out: list[Host] = []
        for lo, hi in intervals:
            out += self.hosts[
                bisect.bisect_left(self._ips, lo) : bisect.bisect_right(self._ips, hi)
            ]
        return out

    def add(self, senders: Iterable[Host] | None, mask: int) -> None:
        """Pairs: these senders (None: all) x the classes of `mask`."""
        if not mask:
            return
        if senders is None:
            self.every |= mask
            return
        for h in senders:
            self.masks[h.ip] = self.masks.get(h.ip, 0) | mask

    def rule(self, rule: PolicyRule) -> None:
        """A changed rule's flows, forward and back."""
        self.add(self.senders(rule.src.intervals), self.classes(rule.dst.intervals))
        self.add(self.senders(rule.dst.intervals), self.classes(rule.src.intervals))

    def scope(self) -> PairScope:
        masks = {h.ip: self.masks.get(h.ip, 0) | self.every for h in self.hosts}
        return PairScope({ip: m for ip, m in masks.items() if m}, frozenset(self.spoof))


def prefix_interval(m: FieldMatch | None) -> tuple[int, int]:
    """The addresses an lpm match on a 32-bit address covers (everything if absent)."""
    if m is None or m.kind != "lpm" or m.arg == 0:
        return (0, MAX_ADDRESS)
    span = (1 << (32 - m.arg)) - 1
    lo = m.value & ~span & MAX_ADDRESS
    return (lo, lo | span)


def same_inventory(a: Inventory, b: Inventory) -> bool:
    """The same hosts, switches, links and spines out of service (a spine going down or
    back moves routes everywhere: a full proof)."""
    return (a.hosts, a.switches, a.links, a.down) == (b.hosts, b.switches, b.links, b.down)


def changed_tables(
    old: Mapping[str, SwitchTables], new: Mapping[str, SwitchTables]
) -> dict[str, list[TableEntry]] | None:
    """Per switch, its changed entries (only switches with some); None: prove everything."""
    if old.keys() != new.keys():
        return None
    out: dict[str, list[TableEntry]] = {}
    for name, sw in new.items():
        diff = changed_entries(old[name], sw)
        if diff is None or any(e.table not in _KNOWN_TABLES for e in diff):
            return None
        if diff:
            out[name] = diff
    return out
