"""Edits of a policy file line by line, for the tests that check or parse a file again
after each edit (tests/test_parse_chunks.py, tests/test_resolve_kept.py)."""

from __future__ import annotations


def edit_lines(lines: list[str], kind: str, at: int, line: str) -> None:
    """Apply one edit to `lines` in place: replace, insert or delete the line at `at`, or
    join it with the next; an edit past the end does nothing (`at` is clamped)."""
    at = min(at, len(lines))
    if kind == "replace" and at < len(lines):
        lines[at] = line
    elif kind == "insert":
        lines.insert(at, line)
    elif kind == "delete" and at < len(lines):
        del lines[at]
    elif kind == "join" and at + 1 < len(lines):
        lines[at : at + 2] = [lines[at] + " " + lines[at + 1]]
