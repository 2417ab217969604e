"""Golden diagnostics: one bad input per diagnostic code, checked through the real CLI.

The corpus lives in tests/golden/:

- ``diagnostics/<CODE>_<short_name>.zt``: a small trading-floor policy that triggers CODE,
  checked against topologies/trading_floor.yaml (a code may have several cases);
- ``inventory/<CODE>_<short_name>.yaml``: an inventory that triggers CODE, checked with
  the tiny valid policy ``inventory/policy.zt``.

Next to each input, ``<same name>.expected`` holds exactly what ``p4seg check`` prints to
stderr. Every case runs ``p4seg.cli.main`` with the repository root as the working
directory and paths relative to it, so the expected output is stable wherever the clone
lives. The exit status is checked too: 1 when the case has an error; 0 for a warning-only
case, and 1 for it again with ``--strict``. No case may write any file.

To regenerate every ``.expected`` file after an intended change of wording or layout::

    P4SEG_REGEN=1 .venv/bin/python -m pytest tests/test_golden_diagnostics.py

then review the diff (``git diff tests/golden``) before committing it.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p4seg.cli import main

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
POLICY_DIR = GOLDEN / "diagnostics"
INVENTORY_DIR = GOLDEN / "inventory"
FLOOR = "topologies/trading_floor.yaml"
TINY_POLICY = "tests/golden/inventory/policy.zt"
REGEN = os.environ.get("P4SEG_REGEN") == "1"

# Codes `p4seg check` cannot produce, so they have no file here; each needs a reason.
NOT_FROM_CHECK = {
    "E501": "back end (`p4seg compile`): a ToR needs more identity tag fields than the pipeline has",
    "E502": "back end (`p4seg compile`): a table over capacity for the chosen target",
    "E503": "back end (`p4seg compile`): p4c missing or rejecting the program; depends on PATH",
    "E504": "rule ids (`p4seg compile`): every id held or retired by the allocation; "
    "tests/test_rule_ids.py",
}

_CODE = re.compile(r"^(?P<code>[EW]\d{3})_[a-z0-9_]+$")
_CODE_LITERAL = re.compile(r"""["']([EW]\d{3})["']""")
_RENDERED_CODE = re.compile(r"^\S+: (?:error|warning)\[([EW]\d{3})\]: ", re.MULTILINE)


def _cases() -> list[Path]:
    return sorted(POLICY_DIR.glob("*.zt")) + sorted(INVENTORY_DIR.glob("*.yaml"))


def _code(path: Path) -> str:
    m = _CODE.match(path.stem)
    assert m, f"{path.name}: corpus files are named <CODE>_<short_name>"
    return m["code"]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _argv(path: Path) -> list[str]:
    if path.suffix == ".zt":
        return ["check", _rel(path), "-i", FLOOR]
    return ["check", TINY_POLICY, "-i", _rel(path)]


def _snapshot(top: Path) -> dict[str, tuple[int, int]]:
    """Every file under `top` with its size and modification time."""
    out = {}
    for dirpath, _, files in os.walk(top):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def no_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every file opened for writing (the open still happens, the test then fails)."""
    written: list[str] = []
    real_open = builtins.open

    def guarded(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(flag in mode for flag in "wax+"):
            written.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)
    yield written


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("path", _cases(), ids=lambda p: p.stem)
def test_golden(
    path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    no_writes: list[str],
) -> None:
    monkeypatch.chdir(ROOT)
    code = _code(path)
    before = _snapshot(GOLDEN)
    status, out, err = _run(_argv(path), capsys)
    assert no_writes == [], f"p4seg check wrote {no_writes}"
    assert _snapshot(GOLDEN) == before, "p4seg check changed files under tests/golden"

    rendered = _RENDERED_CODE.findall(err)
    assert code in rendered, f"{path.name} does not trigger {code}; got {rendered}:\n{err}"
    if code.startswith("E"):
        assert status == 1, f"{path.name}: an error must exit 1"
        assert out == "", f"{path.name}: nothing goes to stdout on error:\n{out}"
    else:
        assert status == 0, f"{path.name}: warnings alone exit 0 without --strict"
        assert not any(c.startswith("E") for c in rendered), f"{path.name} has errors:\n{err}"
        assert out.startswith(f"{_rel(path)}: ok — "), out
        strict_status, strict_out, strict_err = _run([*_argv(path), "--strict"], capsys)
        assert strict_status == 1, f"{path.name}: a warning must exit 1 with --strict"
        assert strict_err == err and strict_out == ""
        assert no_writes == []

    expected = path.with_name(path.name + ".expected")
    monkeypatch.undo()  # the real open() again, for the .expected file
    if REGEN:
        expected.write_text(err, encoding="utf-8")
        return
    assert expected.exists(), f"missing {_rel(expected)}: run with P4SEG_REGEN=1"
    assert err == expected.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", _cases(), ids=lambda p: p.stem)
def test_golden_json_agrees(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--error-format json` prints on stdout the codes of the human output, in its order."""
    monkeypatch.chdir(ROOT)
    human_status, _, human_err = _run(_argv(path), capsys)
    status, out, _ = _run([*_argv(path), "--error-format", "json"], capsys)
    assert status == human_status
    doc = json.loads(out)
    assert [d["code"] for d in doc["diagnostics"]] == _RENDERED_CODE.findall(human_err)
    assert doc["ok"] is (status == 0)


def _codes_in_compiler() -> set[str]:
    codes: set[str] = set()
    # The command line (p4seg/) reports the codes of reading files (E000) itself.
    for source in [*(ROOT / "compiler").rglob("*.py"), *(ROOT / "p4seg").rglob("*.py")]:
        codes |= set(_CODE_LITERAL.findall(source.read_text(encoding="utf-8")))
    return codes


def test_every_code_in_the_compiler_has_a_corpus_file() -> None:
    corpus = {_code(p) for p in _cases()}
    in_source = _codes_in_compiler()
    missing = sorted(in_source - corpus - set(NOT_FROM_CHECK))
    assert not missing, f"codes with no file in tests/golden: {missing}"
    gone = sorted(set(NOT_FROM_CHECK) - in_source)
    assert not gone, f"NOT_FROM_CHECK lists codes the compiler no longer has: {gone}"


def test_every_corpus_file_names_a_code_of_the_compiler() -> None:
    stale = sorted(p.name for p in _cases() if _code(p) not in _codes_in_compiler())
    assert not stale, f"corpus files for codes the compiler no longer has: {stale}"


def test_an_expected_file_for_each_corpus_file() -> None:
    # A code may have several cases: one per message that once misled someone.
    if not REGEN:
        missing = [_rel(p) for p in _cases() if not p.with_name(p.name + ".expected").exists()]
        assert not missing, f"no .expected file for {missing}"
    inputs = {p.name for p in _cases()}
    orphans = [
        _rel(e)
        for e in sorted(GOLDEN.rglob("*.expected"))
        if e.name.removesuffix(".expected") not in inputs
    ]
    assert not orphans, f".expected files without an input: {orphans}"


def test_tiny_inventory_policy_is_valid(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inventory cases fail because of the inventory alone."""
    monkeypatch.chdir(ROOT)
    status, out, err = _run(["check", TINY_POLICY, "-i", FLOOR, "--strict"], capsys)
    assert (status, err) == (0, "")
    assert out.startswith(f"{TINY_POLICY}: ok — ")
