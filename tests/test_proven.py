"""The proven build the state directory keeps for a new process (p4seg/proven.py): what it
writes, what it reads back, and what it refuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from compiler.check import check_policy
from compiler.emit import Build, build
from compiler.inventory import Inventory
from compiler.memo import forget
from compiler.verify import ProofRecord, proof_digest, proof_record
from p4seg import proven
from p4seg.control import Compiled

EDIT = ("risk_db      tcp 5432", "risk_db      tcp 5433")  # changes tor-rsk alone


def _compiled(text: str, floor: Inventory, where: Path) -> Compiled:
    policy = check_policy(text, "floor.zt", floor, expectations=False).policy
    assert policy is not None
    built: Build = build(policy, floor, text, "ref")
    return Compiled(built, where / "build", floor, policy, text, built.allocation)


def _record(c: Compiled) -> ProofRecord:
    return proof_record(c.policy, c.inventory, {sw.switch: sw for sw in c.build.switches})


def _kept_floor(where: Path, floor: Inventory, text: str) -> tuple[Compiled, ProofRecord]:
    """The floor compiled, proven (its record) and kept in `where` as a state directory."""
    before = _compiled(text, floor, where)
    record = _record(before)
    proven.save(where, before, record)
    return before, record


def test_the_kept_build_reads_back_as_it_was_proven(
    tmp_path: Path, floor: Inventory, floor_policy_text: str
) -> None:
    before, record = _kept_floor(tmp_path, floor, floor_policy_text)
    kept_files = sorted(p.name for p in (tmp_path / "proven").iterdir())
    assert len(kept_files) == len(floor.switches) + 1  # each switch's file and the index
    forget()  # a new process
    after = _compiled(floor_policy_text.replace(*EDIT), floor, tmp_path)
    kept = proven.load(tmp_path, record, after)
    assert kept is not None and set(kept.texts) == {"tor-rsk"}  # read back: what changed
    now = {sw.switch: sw for sw in after.build.switches}
    then = {sw.switch: sw for sw in before.build.switches}
    for name, sw in kept.recorded.switches.items():
        assert sw is now[name] if name != "tor-rsk" else sw.entries == then[name].entries
        assert proof_digest(sw) == record.switches[name]
    # Saved again for the edit: only tor-rsk's new file is written, the old one removed.
    proven.save(tmp_path, after, _record(after))
    again = sorted(p.name for p in (tmp_path / "proven").iterdir())
    assert len(again) == len(kept_files)
    assert [n for n in again if n not in kept_files] == [
        n for n in again if n.startswith("tor-rsk-")
    ]


def test_a_record_naming_other_tables_than_this_process_made_is_refused(
    tmp_path: Path, floor: Inventory, floor_policy_text: str
) -> None:
    _, record = _kept_floor(tmp_path, floor, floor_policy_text)
    # proof.json and the index edited alike: an unchanged switch named by other tables
    forged = dataclasses.replace(record, switches={**record.switches, "tor-md": "0" * 24})
    index = json.loads((tmp_path / "proven" / "index.json").read_text())
    (tmp_path / "proven" / "index.json").write_text(
        json.dumps({**index, "record": forged.to_json()})
    )
    forget()
    after = _compiled(floor_policy_text.replace(*EDIT), floor, tmp_path)
    _record(after)  # this process digests the new build (as `_proven` does first)
    assert proven.load(tmp_path, forged, after) is None
    assert proven.load(tmp_path, record, after) is None  # not the index's record
    # A kept file that is not what its name says: refused too.
    index["record"] = record.to_json()
    (tmp_path / "proven" / "index.json").write_text(json.dumps(index))
    assert proven.load(tmp_path, record, after) is not None
    [kept] = (tmp_path / "proven").glob("tor-rsk-*.json")
    kept.write_text(kept.read_text().replace('"permit"', '"deny"', 1))
    assert proven.load(tmp_path, record, after) is None
