"""Builds with one entry corrupted: what a proof must catch (tests of compiler/verify.py and
compiler/differential.py)."""

from __future__ import annotations

import dataclasses
import random

from compiler.entries import FieldMatch, SwitchTables, TableEntry


def corruptions(
    switches: dict[str, SwitchTables], seed: int, count: int = 40
) -> list[dict[str, SwitchTables]]:
    """Builds with one entry corrupted each: deleted, its action flipped, a range or prefix
    widened, an identity shifted, its priority raised."""
    rng = random.Random(seed)
    out: list[dict[str, SwitchTables]] = []
    names = sorted(switches)
    while len(out) < count:
        name = rng.choice(names)
        sw = switches[name]
        i = rng.randrange(len(sw.entries))
        e = sw.entries[i]
        kind = rng.choice(("delete", "action", "widen", "shift", "priority"))
        new: TableEntry | None
        if kind == "delete":
            new = None
        elif kind == "action":
            flip = {"permit": "deny", "deny": "permit", "deny_and_log": "permit"}
            if e.action not in flip:
                continue
            new = dataclasses.replace(e, action=flip[e.action], meter=None)
        elif kind == "widen":
            ms = [m for m in e.matches if m.kind in ("range", "lpm")]
            if not ms:
                continue
            m = rng.choice(ms)
            wider = (
                FieldMatch(m.field, "range", max(0, m.value - 100), min(65535, m.arg + 100))
                if m.kind == "range"
                else FieldMatch(m.field, "lpm", m.value & ~0xFF, min(m.arg, 24))
            )
            new = dataclasses.replace(e, matches=tuple(wider if x is m else x for x in e.matches))
        elif kind == "shift":
            key = next((p for p, _v in e.params if p == "tags"), None)
            if key is None:
                continue
            params = tuple(
                (p, v ^ (1 << rng.randrange(8)) if p == "tags" else v) for p, v in e.params
            )
            new = dataclasses.replace(e, params=params)
        else:
            if not e.priority:
                continue
            new = dataclasses.replace(e, priority=e.priority + (1 << 27))
        entries = sw.entries[:i] + ((new,) if new is not None else ()) + sw.entries[i + 1 :]
        out.append({**switches, name: dataclasses.replace(sw, entries=entries)})
    return out
