"""The last proven build, kept in the state directory for the next process.

A long-running controller proves a change by the (sender, destination) pairs it can touch,
because it holds the build it proved last (compiler/differential.py). A new process used to
hold nothing but the proof record (proof.json: digests), which names the changed ToRs but
not what changed on them, so it walked every packet from and to their hosts: ~570,000 pairs
for a one-rule change on 11 of 48 ToRs, 10 s. This module keeps what the pairs are read off:

    STATE/proven/index.json             the record, each rule's addresses (and with a
                                        quarantine, the uncarved rules' meanings and addresses)
    STATE/proven/<switch>-<digest>.json  the switch's entries file, as the build wrote it

Each entries file is named by the proof record's digest of its tables and written once,
without fsync (a cache: what it holds is checked when read); files that no index names any
more are removed after the index is written, so a process stopped at any point leaves files
that are either named or unnamed, never wrong. The index also names each switch's entries
file by its SHA-256, beside the record's digest of the same tables (one build wrote both).

`load` takes the index only when its record equals proof.json's. A switch whose new entries
file is the one the index names holds the tables the record names: the new ones. Every other
switch is read back from its kept file, and taken only if its digest, computed again, is the
record's. Anything else: None, and the proof falls back to the changed ToRs' packets.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from compiler.emit import file_digest, hold_file_digests, load_entries, load_entries_near
from compiler.entries import SwitchTables
from compiler.memo import also_forget
from compiler.model import Policy, PolicyRule
from compiler.verify import (
    ProofRecord,
    Recorded,
    Sides,
    proof_digest,
    remember_digests,
    rule_digest,
)
from p4seg.control import Compiled
from runtime.files import write_atomic

DIRECTORY = "proven"
INDEX = "index.json"
FORMAT = 4


def save(state_dir: Path, compiled: Compiled, record: ProofRecord) -> None:
    """Keep `compiled`, proven with `record`, for the next process (see the module doc).
    Only the entries files the directory lacks are written. A failure to write is not an
    error: the next process proves by the changed ToRs instead."""
    directory = state_dir / DIRECTORY
    files = compiled.build.files
    entries = {switch: files.get(f"entries/{switch}.json") for switch in record.switches}
    if any(text is None for text in entries.values()):
        return  # a build without entries files (not one `apply` writes)
    texts = cast(dict[str, str], entries)
    hold_file_digests(2 * len(texts))  # the index names each by its digest, made once
    try:
        directory.mkdir(parents=True, exist_ok=True)
        wanted = {_name(switch, digest) for switch, digest in record.switches.items()}
        present = {p.name for p in directory.iterdir() if p.name != INDEX}
        for switch, digest in record.switches.items():
            if (name := _name(switch, digest)) not in present:
                write_atomic(directory / name, texts[switch], durable=False)
        write_atomic(directory / INDEX, _index(record, compiled.policy, texts), durable=False)
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
    not keep exactly that build. `compiled`'s tables stand in for every switch whose
    entries file is the one the index names, and lend their entries to the others (only
    the lines that differ are parsed)."""
    directory = state_dir / DIRECTORY
    try:
        doc = json.loads((directory / INDEX).read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return None
        if ProofRecord.from_json(doc.get("record")) != before:
            return None
        sides = {
            str(k): (_intervals(src), _intervals(dst)) for k, (src, dst) in doc["sides"].items()
        }
        uncarved = doc["uncarved"]
        if uncarved is not None:
            uncarved = {
                str(k): (str(d), _intervals(src), _intervals(dst))
                for k, (d, src, dst) in uncarved.items()
            }
        quarantined = frozenset(int(ip) for ip in doc["quarantined"])
        files = {str(k): str(v) for k, v in doc["files"].items()}
        now = {sw.switch: sw for sw in compiled.build.switches}
        switches: dict[str, SwitchTables] = {}
        same: dict[SwitchTables, str] = {}
        texts: dict[str, str] = {}
        for switch, digest in before.switches.items():
            new, near = now.get(switch), compiled.build.files.get(f"entries/{switch}.json")
            if new is not None and near is not None and file_digest(near) == files[switch]:
                switches[switch] = new  # the same entries file: the same tables
                same[new] = digest
                continue
            text = (directory / _name(switch, digest)).read_text()
            old = load_entries_near(text, new, near) if new and near else load_entries(text)
            if proof_digest(old) != digest:
                return None
            switches[switch], texts[switch] = old, text
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    if not remember_digests(same, len(before.switches)):
        return None  # the index pairs a file with other tables than this process digested
    return Kept(Recorded(before, sides, uncarved, quarantined, switches), texts)


def _intervals(doc: list[list[int]]) -> Sides:
    return tuple((int(lo), int(hi)) for lo, hi in doc)


def _name(switch: str, digest: str) -> str:
    return f"{switch}-{digest}.json"


def _index(record: ProofRecord, policy: Policy, entries: Mapping[str, str]) -> str:
    """The index: the record, each entries file's digest, each rule's addresses, and with a
    quarantine in force the quarantined hosts and the uncarved rules' meaning digests and
    addresses. Each rule's part is made once per rule object (most rules are the same
    objects build after build)."""
    sides = ", ".join(_fragment(rule, _sides_json) for rule in policy.rules)
    uncarved = "null"
    if policy.quarantine is not None:
        rules = policy.uncarved().rules
        uncarved = "{" + ", ".join(_fragment(rule, _uncarved_json) for rule in rules) + "}"
    quarantined = sorted(policy.quarantine.hosts) if policy.quarantine is not None else []
    files = {switch: file_digest(text) for switch, text in entries.items()}
    return (
        f'{{"format": {FORMAT}, "record": {json.dumps(record.to_json())}, '
        f'"files": {json.dumps(files)}, "quarantined": {json.dumps(quarantined)}, '
        f'"uncarved": {uncarved}, "sides": {{{sides}}}}}\n'
    )


def _sides_json(rule: PolicyRule) -> str:
    """`"key": [sources, destinations]`, each a list of [first, last] address intervals."""
    return f"{json.dumps(rule.key)}: [{_set_json(rule.src.intervals)}, {_set_json(rule.dst.intervals)}]"


def _uncarved_json(rule: PolicyRule) -> str:
    """`"key": [meaning digest, sources, destinations]`."""
    return (
        f"{json.dumps(rule.key)}: [{json.dumps(rule_digest(rule))}, "
        f"{_set_json(rule.src.intervals)}, {_set_json(rule.dst.intervals)}]"
    )


@functools.lru_cache(maxsize=1 << 14)
def _set_json(intervals: Sides) -> str:
    return json.dumps([[lo, hi] for lo, hi in intervals])


# Each rule object's part of the index, by kind: (the rule, its text) by the rule's id (the
# rule is held, so its id is not reused while remembered); emptied past _MOST parts.
_FRAGMENTS: dict[tuple[Callable[[PolicyRule], str], int], tuple[PolicyRule, str]] = {}
_MOST = 100_000
also_forget(_FRAGMENTS.clear)


def _fragment(rule: PolicyRule, make: Callable[[PolicyRule], str]) -> str:
    found = _FRAGMENTS.get((make, id(rule)))
    if found is not None and found[0] is rule:
        return found[1]
    if len(_FRAGMENTS) >= _MOST:
        _FRAGMENTS.clear()
    text = make(rule)
    _FRAGMENTS[(make, id(rule))] = (rule, text)
    return text
