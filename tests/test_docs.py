"""The examples of docs/language.md are the tool's real output, and compiler/ doctests pass.

Every fenced block of the language reference is classified, never skipped silently:

- a block followed by an output block (diagnostics or `FILE: ok — ...`, with no heading in
  between) is an example: it is checked as `p4seg check policy.zt -i
  topologies/trading_floor.yaml` (a ```yaml block: `-i floor.yaml` with the policy
  `policy demo`) in a directory laid out as the docs' examples were, and the output must
  be the block's text exactly;
- any other policy (first statement `policy NAME`) must check without errors or warnings,
  unless the next block runs it (`$ p4seg check policy.zt ...`);
- a block marked `<!-- not a whole policy -->` is a fragment: it must parse under a
  `policy` header;
- a `$ p4seg ...` block is run, command by command, and its output compared;
- an output block without its input must say why (`<!-- output only: REASON -->`), or be
  marked `<!-- the policy above, checked without -i -->`;
- a block with a language tag (```text, ```json, ```ebnf) is not policy text;
- a ```yaml block without output is an inventory that must load.

A failure names the doc line of the block.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from compiler.diagnostics import P4segError
from compiler.inventory import load_inventory
from compiler.parse import parse
from p4seg.cli import main

ROOT = Path(__file__).resolve().parent.parent
LANGUAGE = ROOT / "docs" / "language.md"
FLOOR = "topologies/trading_floor.yaml"

FRAGMENT = "<!-- not a whole policy -->"
OUTPUT_ONLY = "<!-- output only:"
WITHOUT_INVENTORY = "<!-- the policy above, checked without -i -->"
_OUTPUT = re.compile(r"^(\S+:\d+:\d+: )?(error|warning)\[[EW]\d{3}\]|^\S+: ok — ")
_FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced block of a markdown file."""

    line: int  # of the opening fence, counted from 1
    tag: str  # the language tag after the fence, "" for none
    text: str
    before: str  # the markdown between the previous block and this one

    def marked(self, marker: str) -> bool:
        """Whether the last non-blank line before the block starts with `marker`."""
        lines = [line for line in self.before.splitlines() if line.strip()]
        return bool(lines) and lines[-1].strip().startswith(marker)

    @property
    def is_output(self) -> bool:
        return self.tag == "" and bool(_OUTPUT.match(self.text))

    @property
    def is_shell(self) -> bool:
        return self.tag == "" and self.text.startswith("$ ")

    @property
    def is_policy(self) -> bool:
        statements = [
            line for line in self.text.splitlines() if line.strip() and not line.startswith("#")
        ]
        return self.tag == "" and bool(statements) and statements[0].startswith("policy ")


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, in order."""
    found: list[Block] = []
    before: list[str] = []
    inside: tuple[int, str, list[str]] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fence = _FENCE.match(line)
        if inside is None:
            if fence:
                inside = (number, fence.group(1), [])
            else:
                before.append(line)
        elif line == "```":
            start, tag, body = inside
            found.append(Block(start, tag, "\n".join(body) + "\n", "\n".join(before)))
            inside, before = None, []
        else:
            inside[2].append(line)
    assert inside is None, f"{path}:{inside[0]}: the block is never closed"
    return found


@dataclass(frozen=True, slots=True)
class Case:
    """One check a doc block asks for; `id` is `language.md:LINE`."""

    kind: str  # example, clean, fragment, shell, inventory
    block: Block
    expected: Block | None = None  # the output block of an example
    inventory: bool = True  # checked with -i (examples only)
    problem: str = ""  # why the block cannot be checked (kind "invalid")

    @property
    def id(self) -> str:
        return f"language.md:{self.block.line}"


def _no_heading_between(block: Block) -> bool:
    return not any(line.startswith("#") for line in block.before.splitlines())


def cases(found: list[Block]) -> Iterator[Case]:
    """What to check for every block; a block that fits no rule is an "invalid" case."""
    used: set[int] = set()
    last_input: Block | None = None
    for index, block in enumerate(found):
        following = found[index + 1] if index + 1 < len(found) else None
        if block.line in used:
            continue
        if block.is_output:
            if block.marked(WITHOUT_INVENTORY) and last_input is not None:
                yield Case("example", last_input, block, inventory=False)
            elif not block.marked(OUTPUT_ONLY):
                problem = f"an output without its policy: mark it `{OUTPUT_ONLY} REASON -->`"
                yield Case("invalid", block, problem=problem)
        elif (
            following is not None
            and following.is_output
            and _no_heading_between(following)
            and not following.marked(OUTPUT_ONLY)
        ):
            used.add(following.line)
            if block.tag not in ("", "yaml") or block.is_shell:
                yield Case("invalid", block, problem="an output follows a block that is no input")
                continue
            last_input = block
            yield Case("example", block, following)
        elif block.is_shell:
            yield Case("shell", block, last_input)
        elif block.tag == "yaml":
            yield Case("inventory", block)
        elif block.tag:
            continue  # ```text, ```json, ```ebnf: not policy text
        elif block.marked(FRAGMENT):
            yield Case("fragment", block)
        elif block.is_policy:
            last_input = block
            runs_it = following is not None and following.is_shell and "policy.zt" in following.text
            if not runs_it:
                yield Case("clean", block)
        else:
            problem = f"neither a policy, an example nor a command: mark it `{FRAGMENT}` or tag it"
            yield Case("invalid", block, problem=problem)


CASES = list(cases(blocks(LANGUAGE)))


def _floor_dir(tmp_path: Path) -> Path:
    """A directory laid out like the docs' examples: topologies/ and policies/ beside policy.zt."""
    for name in ("topologies", "policies", "tests"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def _run(argv: list[str], cwd: Path) -> tuple[int, str]:
    """`p4seg ARGV` in `cwd`: its exit status and what a terminal shows (stderr, then stdout)."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        os.chdir(previous)
    return status, err.getvalue() + out.getvalue()


def _trimmed(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_doc_block(case: Case, tmp_path: Path) -> None:
    where = case.id
    cwd = _floor_dir(tmp_path)
    if case.kind == "example":
        assert case.expected is not None
        if case.block.tag == "yaml":
            (cwd / "floor.yaml").write_text(case.block.text, encoding="utf-8")
            (cwd / "policy.zt").write_text("policy demo\n", encoding="utf-8")
            argv = ["check", "policy.zt", "-i", "floor.yaml"]
        else:
            (cwd / "policy.zt").write_text(case.block.text, encoding="utf-8")
            argv = ["check", "policy.zt", *(["-i", FLOOR] if case.inventory else [])]
        _, shown = _run(argv, cwd)
        assert _trimmed(shown) == _trimmed(case.expected.text), (
            f"{where}: the output of `p4seg {' '.join(argv)}` differs from "
            f"language.md:{case.expected.line}"
        )
    elif case.kind == "clean":
        (cwd / "policy.zt").write_text(case.block.text, encoding="utf-8")
        status, shown = _run(["check", "policy.zt", "-i", FLOOR], cwd)
        assert status == 0 and "0 errors, 0 warnings" in shown, f"{where}: not clean:\n{shown}"
    elif case.kind == "invalid":
        pytest.fail(f"{where}: {case.problem}")
    elif case.kind == "fragment":
        assert not case.block.is_policy, f"{where}: a whole policy is marked as a fragment"
        try:
            parse("policy fragment\n" + case.block.text, "fragment.zt")
        except P4segError as exc:
            pytest.fail(f"{where}: the fragment does not parse: {exc.diagnostics}")
    elif case.kind == "inventory":
        (cwd / "floor.yaml").write_text(case.block.text, encoding="utf-8")
        load_inventory(str(cwd / "floor.yaml"))
    else:
        _check_transcript(case, cwd)


def _check_transcript(case: Case, cwd: Path) -> None:
    """Run each `$ p4seg ...` line of a shell block; `$ echo $?` is the previous status."""
    if case.expected is not None:
        (cwd / "policy.zt").write_text(case.expected.text, encoding="utf-8")
    status = 0
    lines = case.block.text.splitlines()
    commands = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    for start, end in zip(commands, [*commands[1:], len(lines)], strict=True):
        command = shlex.split(lines[start][2:])
        expected = "\n".join(lines[start + 1 : end])
        where = f"language.md:{case.block.line + 1 + start}"
        if command == ["echo", "$?"]:
            assert expected.strip() == str(status), f"{where}: exit status {status}"
            continue
        assert command[0] == "p4seg", f"{where}: only p4seg commands are run"
        status, shown = _run(command[1:], cwd)
        assert _trimmed(shown) == _trimmed(expected), f"{where}: output differs:\n{shown}"


def test_every_kind_of_block_is_checked() -> None:
    """The classification finds the examples (a change to the markers cannot empty the test)."""
    kinds = {kind: sum(case.kind == kind for case in CASES) for kind in ("example", "clean")}
    assert kinds["example"] >= 50 and kinds["clean"] >= 3, kinds


# Modules whose docstrings hold `>>>` examples.
DOCTEST_MODULES = ("compiler.targets", "topologies.console", "topologies.names")


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no doctest"
    assert result.failed == 0, f"{name}: {result.failed} doctest(s) failed"
