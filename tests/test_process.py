"""The `p4seg` process itself (`python -m p4seg`, the console script: p4seg/cli.py `run`).

A one-shot verb runs without the cyclic collector and ends its process without the
interpreter freeing every object it built; these tests check that nothing it says or
writes is lost on the way out, that its exit status is the verb's, and that exit handlers
still run."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p4seg import cli

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "trading_floor.zt"
FLOOR = ROOT / "topologies" / "trading_floor.yaml"


def _p4seg(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p4seg", *argv],
        capture_output=True, text=True, cwd=ROOT, timeout=300, input=stdin,
    )  # fmt: skip


def test_a_compile_in_its_own_process_writes_every_file_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "build"
    done = _p4seg("compile", str(POLICY), "-i", str(FLOOR), "-o", str(out), "--output", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # the whole document, up to its last byte
    assert report
    manifest = json.loads((out / "p4seg-build.json").read_text())
    assert manifest["files"] and set(manifest["sha256"]) == set(manifest["files"])
    for rel, digest in manifest["sha256"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel
    assert len(list((out / "entries").glob("*.json"))) == 8  # six ToRs and two spines


def test_a_verb_that_fails_exits_with_its_status_and_its_diagnostics(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zt"
    bad.write_text("policy p\nallow nowhere -> algo tcp 22\ndefault deny\n")
    done = _p4seg("check", str(bad), "-i", str(FLOOR), "--error-format", "json")
    assert done.returncode == 1
    report = json.loads(done.stdout)  # the whole document, up to its last byte
    assert report["ok"] is False and report["errors"] == 2
    assert [(d["code"], d["line"], d["column"]) for d in report["diagnostics"]] == [
        ("E101", 2, 7), ("E101", 2, 18)]  # fmt: skip


def test_exit_handlers_still_run(tmp_path: Path) -> None:
    """A handler registered by the verb's libraries (atexit) runs before the process ends."""
    mark = tmp_path / "ran"
    script = (
        "import atexit, pathlib, sys\n"
        f"atexit.register(pathlib.Path({str(mark)!r}).write_text, 'yes')\n"
        "from p4seg.cli import run\n"
        "sys.argv = ['p4seg', 'check', sys.argv[1], '-i', sys.argv[2]]\n"
        "run()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(POLICY), str(FLOOR)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert mark.read_text() == "yes"


@pytest.fixture
def collector() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    if enabled:
        gc.enable()


@pytest.mark.usefixtures("collector")
def test_only_a_one_shot_verb_turns_the_collector_off(capsys: pytest.CaptureFixture[str]) -> None:
    gc.enable()
    assert cli.main(["check", str(POLICY), "-i", str(FLOOR)]) == 0
    assert gc.isenabled()  # in a long-running process (tests, serve's verbs): left on
    assert cli.main(["check", str(POLICY), "-i", str(FLOOR)], one_shot=True) == 0
    assert not gc.isenabled()
    gc.enable()
    assert cli.main(["fmt", str(POLICY)], one_shot=True) == 0  # not one of them
    assert gc.isenabled()
    capsys.readouterr()


def test_the_console_script_is_run() -> None:
    """`p4seg` (pyproject's script) and `python -m p4seg` both go through `run`."""
    text = (ROOT / "pyproject.toml").read_text()
    assert 'p4seg = "p4seg.cli:run"' in text
    assert "run()" in (ROOT / "p4seg" / "__main__.py").read_text()
    assert os.access(sys.executable, os.X_OK)


@pytest.mark.usefixtures("collector")
def test_a_paused_pass_hands_what_it_made_to_the_oldest_generation() -> None:
    """`collection_paused`: no young collection walks what a large pass made once it ends
    (it joins the oldest generation), nothing is left frozen, and a cycle it made that
    becomes garbage is still collected. A small pass's objects stay young."""
    import weakref

    from compiler.memo import collection_paused

    class Node:
        def __init__(self) -> None:
            self.peer: Node | None = None

    gc.enable()
    gc.unfreeze()  # what a one-shot verb run in-process by another test froze
    gc.collect()
    with collection_paused():
        assert not gc.isenabled()
        made = [Node() for _ in range(120_000)]
        a, b = Node(), Node()
        a.peer, b.peer = b, a  # a cycle
        gone = weakref.ref(a)
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
    assert gc.get_count()[0] < 1_000  # not 120,000 objects waiting for a young collection
    assert any(x is made[0] for x in gc.get_objects(generation=2))
    del a, b
    assert gone() is not None  # a cycle: reference counting alone cannot free it
    gc.collect()
    assert gone() is None
    with collection_paused():
        few = [Node() for _ in range(2_000)]
    assert not any(x is few[0] for x in gc.get_objects(generation=2))  # a young collection's
    gc.freeze()  # as a one-shot compile leaves its memos: they stay frozen
    held = gc.get_freeze_count()
    with collection_paused():
        more = [Node() for _ in range(120_000)]
    assert gc.get_freeze_count() == held and more
    gc.unfreeze()
