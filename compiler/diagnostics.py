"""Diagnostics shared by every compiler stage: codes, source spans, human and JSON rendering.

Every problem p4seg reports is a :class:`Diagnostic`. Stages collect them and raise one typed
exception carrying all of them, so a user sees every problem of a file at once.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MAX_REPORTED = 50


class Severity(enum.Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Span:
    """A region of a source file: 1-based line and column, end column exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    @classmethod
    def point(cls, file: str, line: int, column: int, width: int = 1) -> Span:
        return cls(file, line, column, line, column + max(width, 1))

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class Note:
    """A secondary message, optionally pointing at another place (the covering rule, ...)."""

    message: str
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str
    severity: Severity
    message: str
    span: Span | None
    notes: tuple[Note, ...] = ()

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def sort_key(self) -> tuple[str, int, int, str]:
        if self.span is None:
            return ("", 0, 0, self.code)
        return (self.span.file, self.span.line, self.span.column, self.code)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "code": self.code,
            "severity": self.severity.value,
            "message": self.message,
        }
        if self.span is not None:
            out.update(_span_json(self.span))
        if self.notes:
            out["notes"] = [
                {"message": n.message, **(_span_json(n.span) if n.span else {})} for n in self.notes
            ]
        return out


def quote(text: str, limit: int = 24) -> str:
    """User text for a message: quoted, and cut when it is long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def error(code: str, message: str, span: Span | None, *notes: Note) -> Diagnostic:
    return Diagnostic(code, Severity.ERROR, message, span, tuple(notes))


def warning(code: str, message: str, span: Span | None, *notes: Note) -> Diagnostic:
    return Diagnostic(code, Severity.WARNING, message, span, tuple(notes))


def _span_json(span: Span) -> dict[str, object]:
    return {
        "file": span.file,
        "line": span.line,
        "column": span.column,
        "end_line": span.end_line,
        "end_column": span.end_column,
    }


class P4segError(Exception):
    """Base of every stage's exception: carries all diagnostics the stage collected."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(sorted(diagnostics, key=Diagnostic.sort_key))
        first = self.diagnostics[0].message if self.diagnostics else "failed"
        super().__init__(first)


class PolicySyntaxError(P4segError):
    """The policy text does not parse."""


class PolicyError(P4segError):
    """The policy parses but is wrong: unknown names, bad values, failed expectations."""


class InventoryError(P4segError):
    """The inventory YAML is malformed or inconsistent."""


class SourceError(P4segError):
    """A source file (policy, inventory) cannot be read or is not UTF-8 text."""


def read_source(path: str, code: str, what: str) -> str:
    """The text of a source file, or :class:`SourceError` with one diagnostic `code`:
    the reason it cannot be read, or the first byte that is not UTF-8, located."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SourceError([error(code, f"cannot read {what} '{path}': {reason}", None)]) from None
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        start = before.rfind(b"\n") + 1
        column = len(before[start:].decode("utf-8-sig", errors="replace")) + 1
        message = f"{what} '{path}' is not UTF-8 text (byte 0x{data[exc.start]:02x})"
        raise SourceError([error(code, message, Span.point(path, line, column))]) from None


def decode_for_display(data: bytes) -> str:
    """Text of a source for excerpts, whatever its bytes (undecodable ones become U+FFFD)."""
    return data.decode("utf-8-sig", errors="replace")


@dataclass
class SourceFiles:
    """Text of the files diagnostics point into, to quote the offending line."""

    texts: dict[str, list[str]] = field(default_factory=dict)

    def add(self, name: str, text: str) -> None:
        # Spans count "\n" only; str.splitlines() would also end lines at \f, \u2028, ...
        self.texts[name] = [line.removesuffix("\r") for line in text.split("\n")]

    def line(self, name: str, line: int) -> str | None:
        lines = self.texts.get(name)
        if lines is None or not 1 <= line <= len(lines):
            return None
        return lines[line - 1]


def _excerpt(span: Span, sources: SourceFiles) -> list[str]:
    text = sources.line(span.file, span.line)
    if text is None:
        return []
    # A line separator or control character would break the excerpt on a terminal.
    text = "".join(c if c.isprintable() else "\ufffd" for c in text.expandtabs(1))
    gutter = f"{span.line:>4} | "
    end = span.end_column if span.end_line == span.line else len(text) + 1
    width = max(1, min(end, len(text) + 1) - span.column)
    caret = " " * (len(gutter) - 2) + "| " + " " * (span.column - 1) + "^" * width
    return [gutter + text, caret]


def render_human(diag: Diagnostic, sources: SourceFiles) -> str:
    where = f"{diag.span}: " if diag.span else ""
    lines = [f"{where}{diag.severity.value}[{diag.code}]: {diag.message}"]
    if diag.span:
        lines.extend(_excerpt(diag.span, sources))
    for note in diag.notes:
        at = f" ({note.span})" if note.span else ""
        lines.append(f"     = note: {note.message}{at}")
        if note.span:
            lines.extend(_excerpt(note.span, sources))
    return "\n".join(lines)


def render_all(
    diagnostics: Iterable[Diagnostic],
    sources: SourceFiles,
    fmt: str = "human",
    limit: int = MAX_REPORTED,
) -> str:
    """Render diagnostics sorted by location; human output is cut at `limit` with a count."""
    diags = sorted(diagnostics, key=Diagnostic.sort_key)
    if fmt == "json":
        return json.dumps([d.to_json() for d in diags], indent=2)
    shown = [render_human(d, sources) for d in diags[:limit]]
    if len(diags) > limit:
        shown.append(f"... and {len(diags) - limit} more")
    errors = sum(d.is_error for d in diags)
    warnings = len(diags) - errors
    if diags:
        shown.append(summary_line(errors, warnings))
    return "\n\n".join(shown[:-1]) + ("\n\n" if len(shown) > 1 else "") + shown[-1] if shown else ""


def summary_line(errors: int, warnings: int) -> str:
    def plural(n: int, word: str) -> str:
        return f"{n} {word}{'' if n == 1 else 's'}"

    return f"{plural(errors, 'error')}, {plural(warnings, 'warning')}"
