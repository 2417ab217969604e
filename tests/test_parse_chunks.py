"""A file parsed again after an edit (compiler/parse.py `_Chunks`): only the statements
that differ are parsed, and the result equals a parse of the whole text — statements,
comments, spans — or the same syntax errors."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from line_edits import edit_lines

from compiler import parse as parse_module
from compiler.diagnostics import PolicySyntaxError
from compiler.memo import ByFile
from compiler.parse import parse

POLICIES = Path(__file__).resolve().parent.parent / "policies"
TEXT = (POLICIES / "trading_floor.zt").read_text()
EXTRA = (Path(__file__).resolve().parent / "fixtures" / "language_ext.zt").read_text()
LINES = [*TEXT.splitlines(), *EXTRA.splitlines()]
MORE = [  # lines an edit may bring: a comment, a rule on two lines, a statement's tail
    "# a comment",
    "",
    "allow algo -> order_router tcp 9876, 9877   # trailing comment",
    "allow dev -> dev",
    "    tcp 22 log",
    "deny dev -> prod log allow dev -> dev tcp 23",
    "service extra = algo1,",
    "  settle2",
    "allow algo -> nowhere tcp",  # a syntax error
]


def _whole(text: str) -> object:
    """What a process that never saw the file makes of it (this one's parses kept)."""
    kept, parse_module._CHUNKS = parse_module._CHUNKS, ByFile()
    try:
        return _outcome(text)
    finally:
        parse_module._CHUNKS = kept


def _outcome(text: str) -> object:
    try:
        return parse(text, "floor.zt")
    except PolicySyntaxError as err:
        return [str(d) for d in err.diagnostics]


edit = st.tuples(
    st.sampled_from(["replace", "insert", "delete", "join"]),
    st.integers(min_value=0, max_value=len(TEXT.splitlines())),
    st.sampled_from(LINES + MORE),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(edit, min_size=1, max_size=6))
def test_a_parse_after_edits_equals_a_parse_of_the_whole(edits: list[tuple[str, int, str]]) -> None:
    lines = TEXT.splitlines()
    parse_module._CHUNKS.clear()
    parse(TEXT, "floor.zt")  # the file as the process last parsed it
    for kind, at, line in edits:
        edit_lines(lines, kind, at, line)
        text = "\n".join(lines) + "\n"
        assert _outcome(text) == _whole(text)  # from the last parse, edit after edit


def test_an_edited_rule_is_the_only_statement_parsed_again() -> None:
    parse_module._CHUNKS.clear()
    before = parse(TEXT, "floor.zt")
    after = parse(TEXT.replace("tcp 9876", "tcp 9877", 1), "floor.zt")
    reused = {id(s) for s in before.statements}
    assert sum(id(s) not in reused for s in after.statements) == 1
    assert after == _whole(TEXT.replace("tcp 9876", "tcp 9877", 1))
    assert parse(TEXT, "floor.zt") == before
