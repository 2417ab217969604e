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
- an identity entry whose tags alone changed (the same match, action and priority: a
  grant or a new rule gave its addresses a tag): only a `policy` entry of that switch that
  matches one of its two tag vectors and not the other can judge its addresses otherwise,
  so for `src_identity` the senders in its prefix x the classes meeting such an entry's
  `dst_tags`, for `dst_identity` the senders meeting its `src_tags` x the classes meeting
  the prefix; a changed `policy` entry's sides are then read off both tag vectors. Which
  sources a port accepts is the same (spoofing is not proven again);
- any other changed `src_identity` entry: every sender in its prefix x every class (and
  those hosts' spoofing is proven again); a changed `dst_identity` or `routing` entry:
  every sender x the classes meeting its prefix.
Anything else (the inventory, a switch added or removed, a default action, a table this
module does not know): None — prove everything.
"""

from __future__ import annotations

import bisect
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

from compiler.entries import FieldMatch, SwitchTables, TableEntry
from compiler.inventory import Host, Inventory
from compiler.memo import ByObject, differing_places, shared_ends
from compiler.model import Policy, PolicyRule
from p4src.spec import NO_TAGS

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
    olds, news = old.rules, new.rules
    if len(olds) == len(news):  # an edit in place: the rules where they differ by position
        moved = differing_places(olds, news)
        olds, news = tuple(olds[i] for i in moved), tuple(news[i] for i in moved)
    before = {r.key: r for r in olds}  # (a key names one rule of a policy)
    after = {r.key: r for r in news}
    out = []
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if a is not None and b is not None and (a is b or meaning(a) == meaning(b)):
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
    # By object first: an incremental compile keeps the entries it did not make again as
    # the same objects (a changed ToR's identity and routing entries, its unchanged rules'
    # `policy` entries), and only the rest is compared by value.
    # The same objects at both ends (a ToR's identity entries first, its routing last) are
    # in both: only the middle is compared, by object, then by value. (A table holding one
    # entry twice, which no switch takes, could add that entry here: more pairs proven.)
    a, b = old.entries, new.entries
    head, tail = shared_ends(a, b)
    a, b = a[head : len(a) - tail], b[head : len(b) - tail]
    old_ids, new_ids = set(map(id, a)), set(map(id, b))
    removed = {e for e in a if id(e) not in new_ids}
    added = {e for e in b if id(e) not in old_ids}
    changed = Changed(removed ^ added)
    changed.gone = {id(e) for e in changed if id(e) in old_ids}
    changed.tables = (old, new)
    return changed


class Changed(list[TableEntry]):
    """`changed_entries`: and which of them are the old tables' objects (`gone`: their
    ids, while `tables` holds both), so that none of the old tables' thousands of entries
    is indexed to ask."""

    gone: set[int]
    tables: tuple[SwitchTables, SwitchTables]


def _old_objects(old: SwitchTables, changed: list[TableEntry]) -> Container[TableEntry]:
    """`entry in` it: whether one of `changed` (`changed_entries(old, ...)`) is an object
    of `old`."""
    if isinstance(changed, Changed) and changed.tables[0] is old:
        return _Objects(changed.gone, changed.tables)
    return _Objects(set(map(id, old.entries)), old)


class _Objects:
    """`entry in` it: whether `entry` is one of the objects `ids` names (`held`, their
    holder, keeps those ids theirs)."""

    __slots__ = ("_held", "_ids")

    def __init__(self, ids: set[int], held: object) -> None:
        self._ids, self._held = ids, held

    def __contains__(self, entry: object) -> bool:
        return id(entry) in self._ids


@dataclass(frozen=True, slots=True)
class Retag:
    """An identity entry whose tags alone changed: its table, the addresses its prefix
    covers, its tag vector before and after."""

    table: str
    interval: tuple[int, int]
    old: int
    new: int

    def differs(self, m: FieldMatch | None) -> bool:
        """Whether a `policy` match on this side matches one tag vector and not the other."""
        if m is None or not m.arg & (self.old ^ self.new):
            return False
        return m.covers(self.old) != m.covers(self.new)


def retags(
    old: SwitchTables, changed: list[TableEntry], new: SwitchTables | None = None
) -> tuple[list[Retag], list[TableEntry]]:
    """A switch's changed entries (`changed_entries`, `old` its tables before, `new` after)
    split into the identity entries whose tags alone changed and every other change. With
    `new`, a `dst_identity` entry for one address added or removed is a retag too: from or
    to what the other build's table gives that address (its default, NO_TAGS, on a miss).
    Each of `changed` is an object of one of the two tables, as `changed_entries` gives
    them (an entry both hold is not among them): whether it was removed is which it is."""
    before = _old_objects(old, changed)
    removed = {_without_tags(e): e for e in changed if e.table in _IDENTITY_FIELD and e in before}
    out: list[Retag] = []
    rest: list[TableEntry] = []
    for e in changed:
        if e.table in _IDENTITY_FIELD:
            if e in before:
                continue  # removed: paired with its new version below, or kept as a change
            was = removed.pop(_without_tags(e), None)
            if was is not None:
                where = prefix_interval(e.match(_IDENTITY_FIELD[e.table]))
                out.append(Retag(e.table, where, _tags(was), _tags(e)))
                continue
        rest.append(e)
    for e in removed.values():
        rest.append(e)
    if new is None:
        return out, rest
    kept: list[TableEntry] = []
    for e in rest:
        gone = e in before
        other = _host_tags(new if gone else old, e)
        if other is None:
            kept.append(e)
            continue
        where = prefix_interval(e.match("dst_addr"))
        out.append(Retag(e.table, where, _tags(e), other) if gone else
                   Retag(e.table, where, other, _tags(e)))  # fmt: skip
    return out, kept


def _host_tags(tables: SwitchTables, entry: TableEntry) -> int | None:
    """For a `dst_identity` entry of one address: the tags `tables` give that address (the
    longest prefix covering it; NO_TAGS on a miss), or None (another entry or kind)."""
    m = entry.match("dst_addr")
    if entry.table != "dst_identity" or entry.action != "set_dst_tags" or m is None:
        return None
    if m.kind != "lpm" or m.arg != 32:
        return None
    best, tags = -1, NO_TAGS
    for other in tables.entries:
        o = other.match("dst_addr") if other.table == "dst_identity" else None
        if o is None or o.arg <= best or not o.covers_lpm(m.value, 32):
            continue
        if other.action != "set_dst_tags":
            return None
        best, tags = o.arg, _tags(other)
    return tags


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
        self.flows(rule.src.intervals, rule.dst.intervals)

    def flows(self, src: Sequence[tuple[int, int]], dst: Sequence[tuple[int, int]]) -> None:
        """The flows between these sources and destinations, forward and back."""
        self.add(self.senders(src), self.classes(dst))
        self.add(self.senders(dst), self.classes(src))

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
    _ENTRY_SETS.hold(len(new))  # the changed switches' entry sets (monotone_change, overlays)
    out: dict[str, list[TableEntry]] = {}
    for name, sw in new.items():
        diff = changed_entries(old[name], sw)
        if diff is None or any(e.table not in _KNOWN_TABLES for e in diff):
            return None
        if diff:
            out[name] = diff
    return out


# -- a quarantine proven by its shape -------------------------------------------------------
#
# A quarantine cuts a host off with an overlay on its own ToR (compiler/quarantine.py):
# the host's two identity entries there give it a quarantine identity (a value in reserved
# bits of the tag vector), and `policy` entries match that identity. When a build differs
# from a proven one only by one host's overlay coming or going (`overlay_change`):
#
# 1. every other packet meets exactly the entries it met before — the two builds differ
#    only in the host's identity entries (their tags, nothing else) and in `policy` entries
#    that match a quarantine identity of the host, which no other address carries on that
#    ToR — and the policy decides it as the proven one did (the same rules, the quarantine
#    one host larger or smaller): its verdict is the one already proven. So proving the
#    host's packets (verify's `focus`) proves the whole build.
# 2. when the host is newly quarantined and may reach nothing at all under the carved
#    policy (no `remediation` flow of it survives the carve), its packets need no walk
#    either (`cuts_off`): each crosses the host's ToR, gets the quarantine
#    identity there on its side, and meets a catch-all deny of that identity (no other
#    field matched) above every ordinary `policy` entry: dropped, as the policy says.
#
# 3. when the host keeps flows with `remediation`, point 2's catch-all denies still drop
#    every packet of the host that meets no other entry of the overlay (`outranked`); the
#    verifier then walks only the pairs that can meet one (read off the ToR's identity
#    entries) and the flows the carved policy allows the host (compiler/verify.py
#    `quarantine_scope`): a few pairs instead of every pair of the host.
#
# A release (it widens), or any other change, is left to the verifier: the host's packets.

_DENY_ACTIONS = frozenset({"deny", "deny_and_log"})
_IDENTITY_FIELD = {"src_identity": "src_addr", "dst_identity": "dst_addr"}


def _without_tags(entry: TableEntry) -> TableEntry:
    return TableEntry(
        entry.table, entry.matches, entry.action,
        tuple(p for p in entry.params if p[0] != "tags"), entry.priority, entry.rule_id,
        entry.role, entry.meter,
    )  # fmt: skip


def _tags(entry: TableEntry) -> int:
    for name, value in entry.params:
        if name == "tags":
            return value
    return 0


def _host_identity(entry: TableEntry, host: int) -> bool:
    field = _IDENTITY_FIELD.get(entry.table)
    for m in entry.matches if field is not None else ():
        if m.field == field:
            return m.kind == "lpm" and m.arg == 32 and m.value == host
    return False


def _matches_value(entry: TableEntry, values: set[int], mask: int) -> bool:
    """A `policy` entry that matches one of these quarantine identities on a side."""
    return entry.table == "policy" and any(
        m is not None and m.kind == "ternary" and m.arg & mask == mask and m.value & mask in values
        for m in (entry.match("src_tags"), entry.match("dst_tags"))
    )


@dataclass(frozen=True, slots=True)
class OverlayChange:
    """How a ToR's tables differ by one host's overlay: its quarantine identity before and
    after (0: none), and the `policy` entries added."""

    before: int
    after: int
    added: frozenset[TableEntry]


# A ToR's entries as a set, per SwitchTables object: the new build of one quarantine is the
# proven old one of the next (3,000 entries hashed once, not twice per operation).
_ENTRY_SETS: ByObject[SwitchTables, frozenset[TableEntry]] = ByObject(4)


def _entry_set(tables: SwitchTables) -> frozenset[TableEntry]:
    return _ENTRY_SETS.get(tables, lambda t: frozenset(t.entries))


def overlay_change(
    old: SwitchTables, new: SwitchTables, host: int, mask: int
) -> OverlayChange | str:
    """The change from `old` to `new` when it is only `host`'s quarantine overlay (`mask`:
    the tag vector's quarantine bits); else why not."""
    if (old.role, old.device_id, old.defaults) != (new.role, new.device_id, new.defaults):
        return "the switch's role or default actions changed"
    before, after = _entry_set(old), _entry_set(new)
    removed, added = before - after, after - before
    moved = {_without_tags(e): e for e in removed if e.table in _IDENTITY_FIELD}
    values: dict[str, set[int]] = {"old": set(), "new": set()}
    for entry in added:
        if entry.table not in _IDENTITY_FIELD:
            continue
        was = moved.pop(_without_tags(entry), None)
        if was is None or not _host_identity(entry, host):
            return f"{entry.table} entries other than the host's changed"
        values["old"].add(_tags(was) & mask)
        values["new"].add(_tags(entry) & mask)
    if moved:
        return "identity entries were removed"
    if len(values["old"]) > 1 or len(values["new"]) > 1:
        return "the host's identity entries disagree on its quarantine identity"
    q_old, q_new = max(values["old"], default=0), max(values["new"], default=0)
    if (q_old == 0) == (q_new == 0):
        return "the host's quarantine identity neither came nor went"
    held = {q_old, q_new} - {0}
    others = (e for e in after | removed if e.table in _IDENTITY_FIELD)
    if any(_tags(e) & mask in held and not _host_identity(e, host) for e in others):
        return "another address of the switch carries the host's quarantine identity"
    if any(e.table not in _IDENTITY_FIELD and not _matches_value(e, held, mask)
           for e in removed | added):  # fmt: skip
        return "entries outside the host's overlay changed"
    return OverlayChange(q_old, q_new, frozenset(e for e in added if e.table == "policy"))


def only_overlay_changed(
    old: tuple[Policy, Inventory, Mapping[str, SwitchTables]],
    policy: Policy,
    inventory: Inventory,
    switches: Mapping[str, SwitchTables],
    host: Host,
    mask: int,
) -> OverlayChange | str:
    """Point 1 above: the new build differs from the proven `old` one only by `host`'s
    quarantine (in the policy) and its overlay (on its ToR), or why not."""
    old_policy, old_inventory, old_switches = old
    if not same_inventory(old_inventory, inventory):
        return "the inventory changed"
    if old_policy.default_log != policy.default_log:
        return "the default's logging changed"
    if changed_rules(old_policy.uncarved(), policy.uncarved()):
        return "rules changed"
    before = set(old_policy.quarantine.hosts) if old_policy.quarantine else set()
    after = set(policy.quarantine.hosts) if policy.quarantine else set()
    if before ^ after != {host.ip}:
        return "not just the host's quarantine changed"
    if old_switches.keys() != switches.keys():
        return "the switches changed"
    for name, sw in switches.items():
        was = old_switches[name]
        if name != host.switch and was is not sw and changed_entries(was, sw) != []:
            return f"{name} changed"
    return overlay_change(old_switches[host.switch], switches[host.switch], host.ip, mask)


def cuts_off(
    change: OverlayChange,
    policy: Policy,
    switches: Mapping[str, SwitchTables],
    host: Host,
    mask: int,
) -> str | None:
    """Point 2 above, given point 1's change (`only_overlay_changed`): None when the new
    overlay drops every packet from and to `host` and the policy allows it nothing, so the
    new build is proven with no packet walked; else why not."""
    if change.before or not change.after:
        return "not a new quarantine"
    if any(r.action.value == "allow" and (host.ip in r.src or host.ip in r.dst)
           for r in policy.rules):  # fmt: skip
        return "the carved policy still allows flows of the host (remediation)"
    if any(e.action not in _DENY_ACTIONS for e in change.added):
        return "the overlay allows flows of the host"
    return outranked(change, switches, host, mask)[0]


def outranked(
    change: OverlayChange, switches: Mapping[str, SwitchTables], host: Host, mask: int
) -> tuple[str | None, frozenset[TableEntry]]:
    """Whether, on the host's ToR, a catch-all deny of its new quarantine identity (that
    identity alone matched) outranks, on each side, every entry whose match admits the
    vector the host's packets carry there: (None, those catch-alls), or (why not, ...).
    Then a packet from or to the host meets an overlay entry other than the catch-alls or
    is dropped."""
    if change.before or not change.after:
        return "not a new quarantine", frozenset()
    # The vectors the host's packets carry there, per side: an entry whose match on that
    # side refuses them can never judge them. And the ToR's other `policy` entries.
    vectors: dict[str, list[int]] = {"src_tags": [], "dst_tags": []}
    others: list[TableEntry] = []
    for e in switches[host.switch].entries:
        if e.table == "policy":
            if e not in change.added:
                others.append(e)
        elif _host_identity(e, host.ip):
            vectors["src_tags" if e.table == "src_identity" else "dst_tags"].append(_tags(e))
    found: set[TableEntry] = set()
    for field, carried in vectors.items():

        def may_judge(e: TableEntry, field: str = field, carried: list[int] = carried) -> bool:
            m = e.match(field)
            return m is None or any(v & m.arg == m.value for v in carried)

        rivals = [(e.priority, (e.action, e.params)) for e in others if may_judge(e)]
        # Above every entry that could judge the host's packets otherwise (one that does
        # the same — another quarantined host's catch-all — may outrank it).
        catch_all = next((
            e for e in change.added
            if e.action in _DENY_ACTIONS and len(e.matches) == 1
            and (m := e.match(field)) is not None
            and (m.kind, m.value, m.arg) == ("ternary", change.after, mask)
            and all(p < e.priority for p, does in rivals if does != (e.action, e.params))
        ), None)  # fmt: skip
        if catch_all is None:
            return (
                f"no catch-all deny of the quarantine identity on {field} above the others",
                frozenset(),
            )
        found.add(catch_all)
    return None, frozenset(found)


# -- a change that only widens, or only narrows -----------------------------------------
#
# When every switch's change from the tables it holds (`old`) to the new ones is
#
# - `policy` entries that plainly permit (no meter), all added (a widening: a grant, a new
#   allow) or all removed (a narrowing: a revoke, an allow taken out), and
# - identity entries whose tags alone change (`Retag`) such that no `policy` entry both
#   builds keep tells the old vector from the new one, and an added permit that tells them
#   apart matches the new one (a removed permit, the old one) —
#
# then writing the entries one by one, without an epoch flip — permits added before the
# retags, removed after them — keeps every packet judged by the old policy or by the new
# one (runtime/overlay.py `monotone_plan`): a retag changes no kept entry's match, so after
# each write a hop's first matching entry is a kept one (its decision the same before and
# after) or a permit that one of the two builds gives it too — its decision moves once, from
# old to new, the same way on every hop. A packet that meets one hop still old and another
# already new is dropped by one of them, which is the old verdict of a widening and the new
# verdict of a narrowing.
#
# A change that both removes and adds plain permits (a rule's ports or addresses edited)
# needs no flip either when no identity entry changes (`both`): on each switch the added
# permits are written first, and the removed ones deleted once they are in (two writes,
# each in any order). While permits come, a hop's first matching entry is one the old
# tables hold (their decision) or an added permit above every kept entry the packet
# matches (a permit: the new tables' decision, as the added permits are permits too); while
# permits go, it is one the new tables hold (their decision) or a permit still there above
# every kept entry (the old tables', whose first match is it or a permit already gone).
# Each hop's decision is the old tables' or the new ones'. Since a ToR judges the whole
# policy for the packets from and to its hosts, a packet delivered is delivered by both
# builds, and a packet dropped is dropped by one of them. The other order would not do: a
# hop without the old permit and not yet with a new one that matches the same packet (a
# port range widened) would drop a packet both builds permit.


@dataclass(frozen=True, slots=True)
class Monotone:
    """A change that only widens (or only narrows), or adds and removes permits with no
    identity changed (`both`): per changed switch, the compiled entries the two builds do
    not share."""

    widens: bool
    changes: Mapping[str, frozenset[TableEntry]]
    both: bool = False


def monotone_change(
    old: Mapping[str, SwitchTables], new: Mapping[str, SwitchTables]
) -> Monotone | str:
    """The change from `old` to `new` when it only widens or only narrows, or adds and
    removes permits with no identity changed (above), else why not."""
    changed = changed_tables(old, new)
    if changed is None:
        return "the switches, their defaults or other tables changed"
    parts = {name: retags(old[name], entries, new[name]) for name, entries in changed.items()}
    for name, (_retagged, rest) in parts.items():  # first: the reason whatever the order
        for e in rest:
            if e.table != "policy" or e.action != "permit" or e.meter is not None:
                return f"{name}: {e.table} entries other than plain permits changed"
    ways: set[bool] = set()  # whether each changed permit is added (else removed)
    for name, (_retagged, rest) in parts.items():
        objects = _old_objects(old[name], changed[name])  # (each of `rest` is in one build)
        ways |= {e not in objects for e in rest}
    entries = {name: frozenset(es) for name, es in changed.items()}
    if len(ways) == 2:  # added and removed: a `both` change, if no identity changes
        retagging = next((name for name, (retagged, _) in parts.items() if retagged), None)
        if retagging is not None:
            return f"{retagging}: permits are both added and removed, and identities change"
        return Monotone(False, entries, both=True)
    for name, (retagged, rest) in parts.items():
        if retagged:
            before = _entry_set(old[name])
            kept = [e for e in new[name].entries if e.table == "policy" and e in before]
            for r in retagged:
                side = "src_tags" if r.table == "src_identity" else "dst_tags"
                if any(r.differs(e.match(side)) for e in kept):
                    return f"{name}: an identity's new tags change what a kept entry matches"
                # An added permit never stops matching an address once it matched (written
                # before the retags); a removed one never starts to (deleted after them).
                for e in rest:
                    m = e.match(side)
                    if m is None or not r.differs(m):
                        continue
                    if m.covers(r.old) if e not in before else m.covers(r.new):
                        return f"{name}: a retag takes a permit away midway"
    return Monotone(ways != {False}, entries)
