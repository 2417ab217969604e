"""The examples of docs/language.md and docs/analysis.md are the tool's real output, and the
`>>>` examples of the code's docstrings pass.

Every fenced block of those docs is classified, never skipped silently:

- a block followed by an output block (diagnostics or `FILE: ok — ...`, with no heading in
  between) is an example: it is run as `p4seg check policy.zt -i
  topologies/trading_floor.yaml` (a ```yaml block: `-i floor.yaml`, with the policy
  `policy demo`) in a directory laid out as the docs' examples were, and what it prints
  (standard error, then standard output) must be the output block's text exactly;
- an output block marked `<!-- the policy above, run as: p4seg ARGS -->` is what `p4seg
  ARGS` prints for the last policy shown (compared as JSON for a ```json block), and one
  marked `<!-- input FILE: BYTES -->` (a Python bytes literal, or `none` for no file) is
  the output of the example run with FILE (policy.zt or floor.yaml) holding BYTES;
- any other policy (first statement `policy NAME`) must check without errors or warnings,
  unless the next block runs it (`$ p4seg check policy.zt ...`);
- a block marked `<!-- not a whole policy -->` is a fragment: it must parse under a
  `policy` header;
- a `$ p4seg ...` block is run, command by command, and its output compared (a line `...`
  stands for any number of lines; `$ echo $?` is the previous exit status);
- a ```yaml block without output is an inventory that must load;
- a block with another language tag (```text, ```ebnf) is not policy text.

A block that fits none of these fails, and every failure names the doc line of its block.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import importlib
import io
import json
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
DOCS = ("language.md", "analysis.md")
FLOOR = "topologies/trading_floor.yaml"

FRAGMENT = "<!-- not a whole policy -->"
RUN_AS = re.compile(r"<!-- the policy above, run as: p4seg (.+) -->$")
INPUT = re.compile(r"<!-- input (policy\.zt|floor\.yaml): (.+) -->$")
_OUTPUT = re.compile(r"^(\S+:\d+:\d+: )?(error|warning)\[[EW]\d{3}\]|^\S+: ok — |^\{\n")
_FENCE = re.compile(r"^```(\S*)\s*$")


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced block of a markdown file."""

    doc: str
    line: int  # of the opening fence, counted from 1
    tag: str  # the language tag after the fence, "" for none
    text: str
    marker: str  # the last non-blank line before the block when it is an HTML comment
    after_heading: bool  # a heading stands between the previous block and this one

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def is_output(self) -> bool:
        return self.tag in ("", "json") and bool(_OUTPUT.match(self.text))

    @property
    def is_shell(self) -> bool:
        return self.tag == "" and self.text.startswith("$ ")

    @property
    def is_policy(self) -> bool:
        statements = [
            line for line in self.text.splitlines() if line.strip() and not line.startswith("#")
        ]
        return self.tag == "" and bool(statements) and statements[0].startswith("policy ")


def blocks(doc: str) -> list[Block]:
    """The fenced blocks of docs/DOC, in order."""
    found: list[Block] = []
    before: list[str] = []
    inside: tuple[int, str, list[str]] | None = None
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        fence = _FENCE.match(line)
        if inside is None:
            if fence:
                inside = (number, fence.group(1), [])
            else:
                before.append(line)
        elif line == "```":
            start, tag, body = inside
            last = next((b.strip() for b in reversed(before) if b.strip()), "")
            marker = last if last.startswith("<!--") else ""
            heading = any(b.startswith("#") for b in before)
            found.append(Block(doc, start, tag, "\n".join(body) + "\n", marker, heading))
            inside, before = None, []
        else:
            inside[2].append(line)
    assert inside is None, f"{doc}:{inside[0]}: the block is never closed"
    return found


@dataclass(frozen=True, slots=True)
class Case:
    """One check a doc block asks for."""

    kind: str  # run, clean, fragment, shell, inventory, invalid
    block: Block  # the block checked (the output block, for `run`)
    argv: tuple[str, ...] = ()  # run: the p4seg command
    policy: bytes | None = None  # run, shell: policy.zt (run: None for no file)
    inventory: bytes | None = None  # run: floor.yaml
    problem: str = ""  # invalid: why the block cannot be checked


CHECK = ("check", "policy.zt", "-i", FLOOR)
CHECK_FLOOR = ("check", "policy.zt", "-i", "floor.yaml")
DEMO = b"policy demo\n"


def _input(block: Block, match: re.Match[str]) -> Case:
    """The case of an output block marked `<!-- input FILE: BYTES -->`."""
    name, literal = match.groups()
    if literal == "none":
        data = None
    else:
        data = ast.literal_eval(literal)
        if not isinstance(data, bytes):
            return Case("invalid", block, problem="the input is not a bytes literal")
    if name == "floor.yaml":
        if data is None:
            return Case("invalid", block, problem="give the inventory's bytes")
        return Case("run", block, CHECK_FLOOR, DEMO, data)
    return Case("run", block, CHECK, data)


def cases(found: list[Block]) -> Iterator[Case]:
    """What to check for every block; a block that fits no rule is an `invalid` case."""
    paired: set[int] = set()
    last_policy = b""
    for index, block in enumerate(found):
        following = found[index + 1] if index + 1 < len(found) else None
        if block.line in paired:
            continue
        if block.is_output:
            run_as, given = RUN_AS.match(block.marker), INPUT.match(block.marker)
            if run_as and last_policy:
                yield Case("run", block, tuple(shlex.split(run_as.group(1))), last_policy)
            elif given:
                yield _input(block, given)
            else:
                problem = "an output without its input: show the policy above it, or mark it"
                yield Case("invalid", block, problem=problem)
        elif (
            following is not None
            and following.is_output
            and not following.after_heading
            and not following.marker  # a marked output says what produced it
        ):
            paired.add(following.line)
            if block.tag == "yaml":
                yield Case("run", following, CHECK_FLOOR, DEMO, block.text.encode())
            elif block.tag == "":
                last_policy = block.text.encode()
                yield Case("run", following, CHECK, last_policy)
            else:
                yield Case("invalid", block, problem="an output follows a block that is no input")
        else:
            if block.is_policy:
                last_policy = block.text.encode()
            yield from _alone(block, following, last_policy)


def _alone(block: Block, following: Block | None, last_policy: bytes = b"") -> Iterator[Case]:
    """The case of a block that is not an example's input."""
    if block.is_shell:
        yield Case("shell", block, policy=last_policy)
    elif block.tag == "yaml":
        yield Case("inventory", block)
    elif block.tag:
        return  # ```text, ```ebnf: not policy text
    elif block.marker == FRAGMENT:
        yield Case("fragment", block)
    elif block.is_policy:
        runs_it = following is not None and following.is_shell and "policy.zt" in following.text
        if not runs_it:
            yield Case("clean", block)
    else:
        problem = f"neither a policy, an example nor a command: mark it `{FRAGMENT}` or tag it"
        yield Case("invalid", block, problem=problem)


CASES = [case for doc in DOCS for case in cases(blocks(doc))]


def _floor_dir(tmp_path: Path) -> Path:
    """A directory laid out like the docs' examples: topologies/, policies/ and tests/."""
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


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def _matches(shown: str, expected: str) -> bool:
    """Whether `shown` is `expected`, where a line `...` in `expected` stands for any lines."""
    pattern = "".join(
        r"(.*\n)*?" if line == "..." else re.escape(line) + r"\n" for line in _lines(expected)
    )
    return re.fullmatch(pattern, "\n".join(_lines(shown)) + "\n") is not None


@pytest.mark.parametrize("case", CASES, ids=[case.block.where for case in CASES])
def test_doc_block(case: Case, tmp_path: Path) -> None:
    where = case.block.where
    cwd = _floor_dir(tmp_path)
    if case.kind == "run":
        if case.policy is not None:
            (cwd / "policy.zt").write_bytes(case.policy)
        if case.inventory is not None:
            (cwd / "floor.yaml").write_bytes(case.inventory)
        _, shown = _run(list(case.argv), cwd)
        command = f"`p4seg {shlex.join(case.argv)}`"
        if case.block.tag == "json":
            assert json.loads(shown) == json.loads(case.block.text), f"{where}: {command} differs"
        else:
            assert _lines(shown) == _lines(case.block.text), f"{where}: {command} differs"
    elif case.kind == "clean":
        (cwd / "policy.zt").write_text(case.block.text, encoding="utf-8")
        status, shown = _run(list(CHECK), cwd)
        assert status == 0 and "0 errors, 0 warnings" in shown, f"{where}: not clean:\n{shown}"
    elif case.kind == "fragment":
        assert not case.block.is_policy, f"{where}: a whole policy is marked as a fragment"
        try:
            parse("policy fragment\n" + case.block.text, "fragment.zt")
        except P4segError as exc:
            pytest.fail(f"{where}: the fragment does not parse: {exc.diagnostics}")
    elif case.kind == "inventory":
        (cwd / "floor.yaml").write_text(case.block.text, encoding="utf-8")
        load_inventory(str(cwd / "floor.yaml"))
    elif case.kind == "shell":
        _check_transcript(case, cwd)
    else:
        pytest.fail(f"{where}: {case.problem}")


def _check_transcript(case: Case, cwd: Path) -> None:
    """Run each `$ p4seg ...` line of a shell block (policy.zt: the last policy shown)."""
    if case.policy:
        (cwd / "policy.zt").write_bytes(case.policy)
    status = 0
    lines = case.block.text.splitlines()
    commands = [i for i, line in enumerate(lines) if line.startswith("$ ")]
    for start, end in zip(commands, [*commands[1:], len(lines)], strict=True):
        command = shlex.split(lines[start][2:])
        expected = "\n".join(lines[start + 1 : end])
        where = f"{case.block.doc}:{case.block.line + 1 + start}"
        if command == ["echo", "$?"]:
            assert expected.strip() == str(status), f"{where}: exit status {status}"
            continue
        assert command[0] == "p4seg", f"{where}: only p4seg commands are run"
        status, shown = _run(command[1:], cwd)
        assert _matches(shown, expected), f"{where}: the output differs:\n{shown}"


def test_the_docs_examples_are_found() -> None:
    """A change to the markers or the layout cannot quietly empty the test."""
    kinds = {kind: sum(case.kind == kind for case in CASES) for kind in ("run", "clean", "shell")}
    assert kinds["run"] >= 60 and kinds["clean"] >= 3 and kinds["shell"] >= 4, kinds


def test_an_ellipsis_stands_for_lines_and_nothing_else() -> None:
    assert _matches("a\nb\nc\n", "a\n...\nc")
    assert _matches("a\nc\n", "a\n...\nc")
    assert not _matches("a\nb\nd\n", "a\n...\nc")
    assert not _matches("a\nb\n", "a")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Every module of the code whose docstrings hold `>>>` examples, found rather than listed.
DOCTEST_MODULES = sorted(
    _module(path)
    for package in ("compiler", "runtime", "p4seg", "p4src", "topologies")
    for path in (ROOT / package).rglob("*.py")
    if ">>>" in path.read_text(encoding="utf-8")
)


def test_doctests_are_found() -> None:
    assert "compiler.targets" in DOCTEST_MODULES, DOCTEST_MODULES


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no doctest"
    assert result.failed == 0, f"{name}: {result.failed} doctest(s) failed"
