"""The last proven build, kept in the state directory for the next process.

A long-running controller proves a change by the (sender, destination) pairs it can touch,
because it holds the build it proved last (compiler/differential.py). A new process used to
hold nothing but the proof record (proof.json: digests), which names the changed ToRs but
not what changed on them, so it walked every packet from and to their hosts: ~570,000 pairs
for a one-rule change on 11 of 48 ToRs, 10 s. This module keeps what the pairs are read off:

    STATE/proven/index.json             the record, each rule's addresses, quarantined or not
    STATE/proven/<switch>-<digest>.json  the switch's entries file, as the build wrote it

Each entries file is named by the proof record's digest of its tables and is written once
(without fsync: this is a cache, every byte of it checked when read);
files that no index names any more are removed after the index is written, so a process
stopped at any point leaves files that are either named or unnamed, never wrong. Nothing
here is trusted: `load` takes the index only when its record equals proof.json's, and each
switch's tables only when their digest, computed again, equals the record's; otherwise the
proof falls back to the changed ToRs' packets.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from compiler.emit import load_entries, load_entries_near
from compiler.entries import SwitchTables
from compiler.model import Policy
from compiler.verify import ProofRecord, Recorded, Sides, proof_digest
from p4seg.control import Compiled
from runtime.files import write_atomic

DIRECTORY = "proven"
INDEX = "index.json"
FORMAT = 1


def save(state_dir: Path, compiled: Compiled, record: ProofRecord) -> None:
    """Keep `compiled`, proven with `record`, for the next process (see the module doc).
    Only the entries files the directory lacks are written. A failure to write is not an
    error: the next process proves by the changed ToRs instead."""
    directory = state_dir / DIRECTORY
    files = compiled.build.files
    try:
        directory.mkdir(parents=True, exist_ok=True)
        wanted = {_name(switch, digest) for switch, digest in record.switches.items()}
        present = {p.name for p in directory.iterdir() if p.name != INDEX}
        for switch, digest in record.switches.items():
            name = _name(switch, digest)
            text = files.get(f"entries/{switch}.json")
            if name not in present and text is not None:
                write_atomic(directory / name, text, durable=False)
        write_atomic(directory / INDEX, _index(record, compiled.policy), durable=False)
        for name in present - wanted:
            (directory / name).unlink(missing_ok=True)
    except OSError:
        return


@dataclass(frozen=True, slots=True)
class Kept:
    """The proven build as the state directory keeps it: what a differential proof needs,
    and the entries files of the switches whose tables differ from the new build's (what
    a switch marked with that file's digest holds: runtime/plan.py `text_digest`)."""

    recorded: Recorded
    texts: Mapping[str, str]


def load(state_dir: Path, before: ProofRecord, compiled: Compiled) -> Kept | None:
    """The build `before` records, as the state directory keeps it, or None when it does
    not keep exactly that build. `compiled`'s tables stand in for every switch whose digest
    is the same, and lend their entries to the others (only the lines that differ are
    parsed)."""
    directory = state_dir / DIRECTORY
    try:
        doc = json.loads((directory / INDEX).read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return None
        if ProofRecord.from_json(doc.get("record")) != before:
            return None
        sets = [tuple((int(lo), int(hi)) for lo, hi in s) for s in doc["sets"]]
        sides = {str(k): (sets[i], sets[j]) for k, (i, j) in doc["sides"].items()}
        quarantined = bool(doc["quarantined"])
        now = {sw.switch: sw for sw in compiled.build.switches}
        switches: dict[str, SwitchTables] = {}
        texts: dict[str, str] = {}
        for switch, digest in before.switches.items():
            new = now.get(switch)
            if new is not None and proof_digest(new) == digest:
                switches[switch] = new
                continue
            text = (directory / _name(switch, digest)).read_text()
            near = compiled.build.files.get(f"entries/{switch}.json")
            old = load_entries_near(text, new, near) if new and near else load_entries(text)
            if proof_digest(old) != digest:
                return None
            switches[switch], texts[switch] = old, text
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return Kept(Recorded(before, sides, quarantined, switches), texts)


def _name(switch: str, digest: str) -> str:
    return f"{switch}-{digest}.json"


def _index(record: ProofRecord, policy: Policy) -> str:
    """The index: the record, each rule's addresses (each distinct set once), whether the
    policy carries a quarantine."""
    sets: dict[Sides, int] = {}
    sides = {}
    for rule in policy.rules:
        src, dst = rule.src.intervals, rule.dst.intervals
        sides[rule.key] = [sets.setdefault(src, len(sets)), sets.setdefault(dst, len(sets))]
    doc = {
        "format": FORMAT,
        "record": record.to_json(),
        "quarantined": policy.quarantine is not None,
        "sets": [_set_json(s) for s in sets],
        "sides": sides,
    }
    return json.dumps(doc, sort_keys=True) + "\n"


@functools.lru_cache(maxsize=1 << 14)
def _set_json(intervals: Sides) -> list[list[int]]:
    return [[lo, hi] for lo, hi in intervals]
