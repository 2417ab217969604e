"""Where `p4seg compile -o DIR` (and every verb's `--build`) writes: never over what p4seg
did not write. A new directory appears complete; an empty one or one of p4seg's own builds
(recognised by its manifest) is updated in place, only in the files p4seg wrote; any other
directory is refused and left exactly as it was. Modes follow the umask."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler.emit import MANIFEST, Build, BuildFiles, OutputDirError, build, write_build
from compiler.inventory import Inventory
from compiler.model import Policy
from p4seg.cli import main

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "trading_floor.zt"
FLOOR = ROOT / "topologies" / "trading_floor.yaml"


@pytest.fixture(scope="module")
def builds(floor: Inventory, floor_policy: Policy, floor_policy_text: str) -> dict[str, Build]:
    return {t: build(floor_policy, floor, floor_policy_text, t) for t in ("ref", "tofino")}


@pytest.fixture
def umask() -> Iterator[int]:
    """A umask other than the usual 022, so that following it is observable."""
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under `root` (itself included): its mode, and its bytes for a file."""
    out: dict[str, tuple[int, bytes | None]] = {".": (root.lstat().st_mode, None)}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[str(path.relative_to(root))] = (st.st_mode, data)
    return out


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def manifest(root: Path) -> list[str]:
    doc = json.loads((root / MANIFEST).read_text())
    assert doc["p4seg_build"] == 1
    files: list[str] = doc["files"]
    return files


def test_compile_into_the_current_directory_with_a_policy_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "project"
    work.mkdir()
    shutil.copy(POLICY, work / "policy.zt")
    shutil.copy(FLOOR, work / "floor.yaml")
    (work / "notes").mkdir()
    (work / "notes" / "todo.txt").write_text("mine\n")
    before = snapshot(work)
    monkeypatch.chdir(work)
    assert main(["compile", "policy.zt", "-i", "floor.yaml", "-o", "."]) == 1
    err = capsys.readouterr().err
    assert f"p4seg: error: {work} is not empty and is not a p4seg build" in err, err
    assert "Traceback" not in err
    assert snapshot(work) == before  # nothing written, nothing deleted, no staging left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_a_new_directory_gets_the_build_and_its_manifest(
    tmp_path: Path, builds: dict[str, Build], umask: int
) -> None:
    out = tmp_path / "a" / "b"
    written = write_build(builds["ref"], str(out))
    assert sorted(manifest(out)) == sorted(builds["ref"].files)
    assert files_under(out) == set(builds["ref"].files) | {MANIFEST}
    assert written == sorted(str(out / rel) for rel in builds["ref"].files)
    # The umask decides every mode: a build dir is not 0700 (tempfile's) any more.
    for path in [out, out.parent, *out.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging left
    assert sorted(p.name for p in out.parent.iterdir()) == ["b"]


def test_the_same_build_twice_is_byte_identical(tmp_path: Path, builds: dict[str, Build]) -> None:
    write_build(builds["ref"], str(tmp_path / "one"))
    write_build(builds["ref"], str(tmp_path / "two"))
    write_build(builds["ref"], str(tmp_path / "two"))  # over itself
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert one == two


def test_an_empty_directory_is_filled_in_place(
    tmp_path: Path, builds: dict[str, Build], umask: int
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o711)
    os.chmod(out, 0o711)
    inode = out.stat().st_ino
    write_build(builds["ref"], str(out))
    # Same directory (a shell inside it, `-o .`, keeps working), and its mode kept.
    assert out.stat().st_ino == inode and stat.S_IMODE(out.stat().st_mode) == 0o711
    assert files_under(out) == set(builds["ref"].files) | {MANIFEST}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in out.rglob("*") if p.is_file())


def test_a_build_is_replaced_and_a_user_file_in_it_survives(
    tmp_path: Path, builds: dict[str, Build]
) -> None:
    out = tmp_path / "out"
    write_build(builds["ref"], str(out))
    (out / "NOTES.md").write_text("why this build\n")
    (out / "p4" / "ref" / "mine.txt").write_text("keep\n")
    write_build(builds["tofino"], str(out))
    assert manifest(out) == sorted(builds["tofino"].files)
    assert files_under(out) == set(builds["tofino"].files) | {
        MANIFEST,
        "NOTES.md",
        "p4/ref/mine.txt",
    }
    for rel, content in builds["tofino"].files.items():
        assert (out / rel).read_text() == content, rel
    assert (out / "NOTES.md").read_text() == "why this build\n"
    # Back to ref: p4/tofino held only p4seg's file, so the directory goes with it.
    write_build(builds["ref"], str(out))
    assert not (out / "p4" / "tofino").exists()
    assert (out / "p4" / "ref" / "mine.txt").read_text() == "keep\n"
    assert files_under(out) == set(builds["ref"].files) | {MANIFEST, "NOTES.md", "p4/ref/mine.txt"}


def test_a_user_file_where_the_build_would_write_is_refused(
    tmp_path: Path, builds: dict[str, Build]
) -> None:
    out = tmp_path / "out"
    write_build(builds["ref"], str(out))
    (out / "p4" / "tofino").mkdir()
    (out / "p4" / "tofino" / "p4seg.p4").write_text("// my own program\n")
    before = snapshot(out)
    with pytest.raises(OutputDirError, match="p4seg did not write it"):
        write_build(builds["tofino"], str(out))
    assert snapshot(out) == before


def test_a_manifest_never_reaches_outside_its_directory(
    tmp_path: Path, builds: dict[str, Build]
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    write_build(builds["ref"], str(out))
    doc = json.loads((out / MANIFEST).read_text())
    doc["files"].append("../victim.txt")
    (out / MANIFEST).write_text(json.dumps(doc))
    before = snapshot(tmp_path)
    with pytest.raises(OutputDirError, match="unreadable build manifest"):
        write_build(builds["tofino"], str(out))
    assert snapshot(tmp_path) == before


def test_a_directory_of_the_build_that_leads_elsewhere_is_refused(
    tmp_path: Path, builds: dict[str, Build]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tor-alg.json").write_text("not p4seg's\n")
    out = tmp_path / "out"
    write_build(builds["ref"], str(out))
    shutil.rmtree(out / "entries")
    (out / "entries").symlink_to(elsewhere)
    before = snapshot(tmp_path)
    with pytest.raises(OutputDirError, match="is not a directory p4seg made"):
        write_build(builds["ref"], str(out))
    assert snapshot(tmp_path) == before


def test_a_file_given_as_the_directory_is_refused(tmp_path: Path, builds: dict[str, Build]) -> None:
    out = tmp_path / "policy.zt"
    out.write_text("policy p\n")
    with pytest.raises(OutputDirError, match="is not a directory"):
        write_build(builds["ref"], str(out))
    assert out.read_text() == "policy p\n"


def test_a_verbs_build_directory_follows_the_same_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `plan` compiles into --build before it talks to any switch: refused there, exit 1.
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    argv = ["plan", str(POLICY), "-i", str(FLOOR), "--build", str(out), "--state", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "is not empty and is not a p4seg build" in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_an_update_rewrites_only_the_files_that_differ(
    tmp_path: Path, builds: dict[str, Build]
) -> None:
    """A build over its predecessor replaces only the files whose content changed (the
    manifest records each file's SHA-256); a file edited by hand is rewritten all the same."""
    out = tmp_path / "out"
    first = builds["ref"]
    write_build(first, str(out))
    inodes = {rel: (out / rel).stat().st_ino for rel in first.files}
    one = next(rel for rel in first.files if rel.startswith("entries/"))
    files = BuildFiles()
    for rel in first.files:
        files.take(first.files, rel)
    files[one] = first.files[one] + " "
    edited = dataclasses.replace(first, files=files)
    (out / "report.json").write_text("edited by hand\n")
    write_build(edited, str(out))
    moved = {rel for rel in first.files if (out / rel).stat().st_ino != inodes[rel]}
    assert moved == {one, "report.json"}
    for rel, content in edited.files.items():
        assert (out / rel).read_text() == content, rel
    assert manifest(out) == sorted(edited.files)


def test_a_new_process_writes_a_build_without_making_what_it_would_find_unchanged(
    tmp_path: Path, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """A switch's runtime listing is a function of its entries file and the P4Info alone: a
    build written over one with the same entries for a switch (a new process's compile
    after a one-rule edit) leaves that switch's listing as it is without making it — unless
    the listing there is not what the earlier build wrote. The directory ends up byte for
    byte what writing every file would give."""
    out = tmp_path / "out"
    first = build(floor_policy, floor, floor_policy_text, "ref", listings=True)
    write_build(first, str(out))
    edited_text = floor_policy_text.replace("risk_db      tcp 5432", "risk_db      tcp 5433")
    policy = dataclasses.replace(
        floor_policy,
        rules=tuple(
            dataclasses.replace(r, ports=((5433, 5433),)) if r.ports == ((5432, 5432),) else r
            for r in floor_policy.rules
        ),
    )
    hand = out / "entries" / "tor-md-runtime.json"
    hand.write_text(hand.read_text() + " ")  # edited by hand: made and written again
    fresh = build(policy, floor, edited_text, "ref", listings=True)  # as a new process compiles it
    write_build(fresh, str(out))
    unmade = {
        rel for rel in fresh.files if rel.endswith("-runtime.json") and fresh.files.unmade(rel)
    }
    changed = {
        s.name
        for s in floor.switches
        if first.files[f"entries/{s.name}.json"] != fresh.files[f"entries/{s.name}.json"]
    }
    assert "tor-rsk" in changed and "tor-md" not in changed
    assert unmade == {
        f"entries/{name}-runtime.json"
        for name in {s.name for s in floor.switches} - changed - {"tor-md"}  # tor-md: by hand
    }
    reference = tmp_path / "reference"
    write_build(build(policy, floor, edited_text, "ref", listings=True), str(reference))
    assert snapshot(out).keys() == snapshot(reference).keys()
    for rel in files_under(reference):
        assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel
