"""The quarantine fast path: write a quarantine overlay onto one ToR, nothing else.

A quarantine (compiler/quarantine.py) changes the tables of the host's
own ToR only, and there only entries no other host's packets meet: the host's two identity
entries (its `src_identity` entry on its port, its `dst_identity` /32) and `policy`
entries that match its reserved quarantine identity. So `quarantine` and `release` need
no epoch flip; the overlay is written in steps that keep every packet consistent, each step
its own Write, acknowledged before the next (a P4Runtime server may apply the updates of
one Write in any order):

  quarantine  1. insert the overlay's `policy` entries: they match only the quarantine
                 identity, which no packet carries yet, so nothing is judged differently
              2. the host's identity entries (`src_identity`, then `dst_identity`)
  release     the same order: 1. the identity entries back to the ordinary identity
              (no packet carries the quarantine identity after them), 2. delete the
              overlay's `policy` entries, which no packet meets any more

Per packet: a packet through the ToR is from the host or to it, never both (the host's
own traffic to itself does not cross the switch), so it reads the one identity entry that
changes on its side — old or new — and the other side's identity, which does not change.
Its `policy` lookup then sees every entry either identity meets: with the old identity
the ordinary ones (untouched), with the new one the overlay (complete before step 2). It is
judged entirely by the policy before or entirely by the policy after. Other ToRs keep
judging the host's flows by its ordinary identity (the uncarved policy), so end to end a
packet is judged by the carved policy or, before the write, by the old one.

`monotone_plan` (below) writes a grant or a revoke the same way, entry by entry, when the
change only widens or only narrows (compiler/differential.py `monotone_change`), and a
change of a rule's ports or addresses as a widening then a narrowing, in two writes.

`overlay_plan` refuses (NotAnOverlay) whenever the switch differs from the compiled
tables in anything else — another pending change, an interrupted apply's epoch copies, a
pipeline just set — so that the caller falls back to a full apply (and its full proof).
"""

from __future__ import annotations

from collections.abc import Collection

from finsy.proto import p4r

from compiler.differential import Monotone
from compiler.entries import TableEntry
from compiler.quarantine import QUARANTINE_MASK
from runtime.controller import ControllerError
from runtime.entities import entry_from_proto
from runtime.plan import (
    DELETE,
    INSERT,
    MODIFY,
    Change,
    Desired,
    Held,
    SwitchPlan,
    Tables,
    diff,
    plan_switch,
)

NOT_AN_OVERLAY = "not only the quarantine overlay differs"
_IDENTITY = {"src_identity": "src_addr", "dst_identity": "dst_addr"}


class NotAnOverlay(ControllerError):
    """The switch differs from the compiled tables in more than a quarantine overlay."""

    def __init__(self, why: str) -> None:
        super().__init__(f"{NOT_AN_OVERLAY}: {why}")


def _overlay_policy(entry: TableEntry) -> bool:
    """A `policy` entry of the overlay: it matches a quarantine identity on one side."""
    return any(
        (m := entry.match(f)) is not None and m.kind == "ternary" and m.arg == QUARANTINE_MASK
        for f in ("src_tags", "dst_tags")
    )


def _hosts_identity(entry: TableEntry, table: str, hosts: Collection[int]) -> bool:
    m = entry.match(_IDENTITY[table])
    return m is not None and m.kind == "lpm" and m.arg == 32 and m.value in hosts


def overlay_plan(
    tables: Tables, desired: Desired, held: Held, hosts: Collection[int]
) -> SwitchPlan:
    """The writes that take `held` to `desired` when they differ only in the quarantine
    overlay of `hosts` (addresses), in the order of the module docstring; NotAnOverlay
    otherwise."""
    if held.clone is None or held.clone != desired.clone:
        raise NotAnOverlay("the clone session")
    # Held as a Desired (Held.of): wildcard-epoch entries only, none in `entries`.
    for entry in held.entries:
        if entry.table_id in tables.epoch_field and tables.split(entry)[1] is not None:
            raise NotAnOverlay("entries of an interrupted apply (pinned to an epoch)")
    pipeline = tables.pipeline
    inserts: list[Change] = []
    identity: list[Change] = []
    deletes: list[Change] = []

    differences = diff(tables, desired, held)
    for table, d in differences.items():
        if table == "policy":
            if d.changed:
                raise NotAnOverlay("a policy entry's action")
            for entries, out, op in ((d.added, inserts, INSERT), (d.removed, deletes, DELETE)):
                for entry in entries:
                    if not _overlay_policy(entry_from_proto(pipeline, entry)):
                        raise NotAnOverlay("policy entries outside the overlay")
                    out.append(_change(op, entry, table))
        elif table in _IDENTITY:
            ops = [(INSERT, e) for e in d.added] + [(MODIFY, b) for _a, b in d.changed]
            ops += [(DELETE, e) for e in d.removed]
            for op, entry in ops:
                if not _hosts_identity(entry_from_proto(pipeline, entry), table, hosts):
                    raise NotAnOverlay(f"{table} entries of other addresses")
                identity.append(_change(op, entry, table))
        else:
            raise NotAnOverlay(f"the {table} table")
    identity.sort(key=lambda c: c.table != "src_identity")  # src first, as documented
    barriers = (len(inserts), len(inserts) + len(identity))  # three writes, in this order
    return SwitchPlan(desired.switch, (*inserts, *identity, *deletes), None, (), differences,
                      held.epoch, barriers)  # fmt: skip


# -- a change that only widens or only narrows (compiler/differential.py) -------------------


def _key(entry: TableEntry) -> tuple[object, ...]:
    """An entry as a switch holds it: what the compiler adds (role, rule id, meter, the
    lpm tables' priorities, which P4Runtime leaves out) left out, its matches by field."""
    priority = entry.priority if entry.table == "policy" else 0
    matches = tuple(sorted(entry.matches, key=lambda m: m.field))  # in P4Info's key order
    return (entry.table, matches, entry.action, entry.params, priority)


def monotone_plan(
    tables: Tables, desired: Desired, held: Held, change: Monotone | None
) -> SwitchPlan:
    """The writes that take `held` to `desired` without an epoch flip when they are exactly
    the switch's part of `change` (compiler/differential.py `monotone_change`): the new
    permits, then the retagged identity entries (a widening); the retags, then the removed
    permits deleted (a narrowing); the added permits, then the removed ones deleted (`both`:
    no identity changes). Each step its own write (`SwitchPlan.barriers`). Anything else — the switch holds other than the tables
    the change starts from, no change known — is planned by the epoch protocol."""
    if change is None or held.clone is None or held.clone != desired.clone:
        return plan_switch(tables, desired, held)
    expected = change.changes.get(desired.switch)
    if expected is None:
        return plan_switch(tables, desired, held)
    if any(e.table_id in tables.epoch_field and tables.split(e)[1] is not None
           for e in held.entries):  # fmt: skip
        return plan_switch(tables, desired, held)  # an interrupted apply's epoch copies
    pipeline = tables.pipeline
    differences = diff(tables, desired, held)
    permits: list[Change] = []
    identity: list[Change] = []
    seen: set[tuple[object, ...]] = set()
    for table, d in differences.items():
        if table in _IDENTITY:  # retags; a dst_identity /32 coming or going
            for was, now in d.changed:
                seen |= {_key(entry_from_proto(pipeline, e)) for e in (was, now)}
                identity.append(_change(MODIFY, now, table))
            for entries, op in ((d.added, INSERT), (d.removed, DELETE)):
                for entry in entries:
                    seen.add(_key(entry_from_proto(pipeline, entry)))
                    identity.append(_change(op, entry, table))
        elif table == "policy" and not d.changed:
            for entries, op in ((d.added, INSERT), (d.removed, DELETE)):
                for entry in entries:
                    seen.add(_key(entry_from_proto(pipeline, entry)))
                    permits.append(_change(op, entry, table))
        else:
            return plan_switch(tables, desired, held)
    if seen != {_key(e) for e in expected}:
        return plan_switch(tables, desired, held)
    if change.both:  # no identity changes: the new permits in, then the old ones out
        first = [c for c in permits if c.op != DELETE]
        second = [c for c in permits if c.op == DELETE]
    elif change.widens:
        first, second = permits, identity
    else:
        first, second = identity, permits
    return SwitchPlan(desired.switch, (*first, *second), None, (), differences, held.epoch,
                      (len(first),))  # fmt: skip


def _change(op: str, entry: p4r.TableEntry, table: str) -> Change:
    e = p4r.Entity()
    e.table_entry.CopyFrom(entry)
    return Change(op, e, table)
