"""Stage 4 — target-neutral entries -> entries a target can hold.

Passes run in the order of PASSES; adding a pass is adding a line:
- expand_ranges: on a target without the `range` match kind, each range becomes the
  fewest ternary prefixes that cover it exactly (never more than 2w-2 for w bits);
- check_capacity: every table of every switch against the program's sizes; over
  capacity is an error naming switch, table, needed and available, and nothing is written.
"""

from __future__ import annotations

import itertools
import operator
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial

from compiler.diagnostics import P4segError, error
from compiler.entries import FieldMatch, SwitchTables, TableEntry
from compiler.lower import cidr_blocks
from compiler.memo import ByObject
from compiler.targets import Target


class CapacityError(P4segError):
    """A switch would need more entries than a table of the program holds."""


def range_to_ternary(lo: int, hi: int, width: int) -> list[tuple[int, int]]:
    """Exact cover of [lo, hi] by (value, mask) prefixes, fewest possible."""
    full = (1 << width) - 1
    return [
        (value, full ^ ((1 << (width - plen)) - 1)) for value, plen in cidr_blocks(lo, hi, width)
    ]


def expand_ranges(switches: tuple[SwitchTables, ...], target: Target) -> tuple[SwitchTables, ...]:
    if target.has_range:
        return switches
    width = {k.name: k.bits for t in target.pipeline.tables for k in t.keys}
    memo = _EXPANDED[target.name]
    memo.hold(len(switches))
    return tuple(memo.get(sw, partial(_expanded, width)) for sw in switches)


def _expanded(width: Mapping[str, int], sw: SwitchTables) -> SwitchTables:
    entries: list[TableEntry] = []
    for entry in sw.entries:
        choices = [
            [
                FieldMatch(m.field, "ternary", v, mask)
                for v, mask in range_to_ternary(m.value, m.arg, width[m.field])
            ]
            if m.kind == "range"
            else [m]
            for m in entry.matches
        ]
        entries.extend(
            replace(entry, matches=tuple(combo)) for combo in itertools.product(*choices)
        )
    return replace(sw, entries=tuple(entries))


# Per target, a switch's tables fitted to it, and its entries per table, for as long as an
# incremental compile passes the switch on unchanged (compiler/memo.py).
_EXPANDED: defaultdict[str, ByObject[SwitchTables, SwitchTables]] = defaultdict(
    lambda: ByObject(16)
)
_COUNTS: ByObject[SwitchTables, Counter[str]] = ByObject(16)


_TABLE = operator.attrgetter("table")


def check_capacity(switches: tuple[SwitchTables, ...], target: Target) -> tuple[SwitchTables, ...]:
    diags = []
    for sw in switches:
        _COUNTS.hold(len(switches))
        counts = _COUNTS.get(sw, lambda t: Counter(map(_TABLE, t.entries)))
        for table in target.pipeline.tables:
            if counts[table.name] > table.size:
                diags.append(
                    error(
                        "E502",
                        f"switch {sw.switch}: table {table.name} needs {counts[table.name]} entries, "
                        f"the {target.name} program holds {table.size} (raise it with --size {table.name}=N)",
                        sw.span,
                    )
                )
    if diags:
        raise CapacityError(diags)
    return switches


PASSES: tuple[Callable[[tuple[SwitchTables, ...], Target], tuple[SwitchTables, ...]], ...] = (
    expand_ranges,
    check_capacity,
)


def fit(switches: tuple[SwitchTables, ...], target: Target) -> tuple[SwitchTables, ...]:
    for run in PASSES:
        switches = run(switches, target)
    return switches
