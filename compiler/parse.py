"""Stage 1 — policy text -> AST.

An LALR parser (compiler/grammar.lark) and a transformer to the frozen AST of
:mod:`compiler.ast`. Keywords are reserved: the lexer turns a name that spells a keyword
into that keyword, so `service x = a,` followed by `allow ...` is an incomplete service,
not a service containing a host called `allow`.

A file with syntax errors is re-parsed statement by statement so that every broken
statement is reported at once, each with a message written for people.
"""

from __future__ import annotations

import bisect
import difflib
import re
import threading
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from compiler import ast
from compiler.diagnostics import Diagnostic, PolicySyntaxError, Span, error
from compiler.memo import ByFile

KEYWORDS: dict[str, str] = {
    "policy": "POLICY",
    "service": "SERVICE",
    "allow": "ALLOW",
    "deny": "DENY",
    "default": "DEFAULT",
    "expect": "EXPECT",
    "ports": "PORTS",
    "except": "EXCEPT",
    "proto": "IPPROTO",
    "log": "LOG",
    "reply": "REPLY",
    "rate": "RATE",
    "for": "FOR",
    "during": "DURING",
    "tcp": "PROTO",
    "udp": "PROTO",
    "icmp": "PROTO",
    "ip": "PROTO",
    "allowed": "VERDICT",
    "denied": "VERDICT",
    "signal": "SIGNAL",
    "contain": "CONTAIN",
    "protect": "PROTECT",
}
KEYWORD_TYPES = frozenset(KEYWORDS.values())
STATEMENT_KEYWORDS = (
    "policy",
    "service",
    "allow",
    "deny",
    "default",
    "expect",
    "ports",
    "signal",
    "contain",
    "protect",
)
_STATEMENT_TOKENS = frozenset(KEYWORDS[k] for k in STATEMENT_KEYWORDS)
_OPTION_TOKENS = frozenset({"LOG", "REPLY", "RATE", "FOR", "DURING", "RULE_NAME"})
_STATEMENT_START = re.compile(r"^[ \t]*(?:" + "|".join(STATEMENT_KEYWORDS) + r")\b", re.MULTILINE)

# How an expected terminal reads in an error message.
_EXPECTED_WORDS: dict[str, str] = {
    "NAME": "a name",
    "ADDRESS": "an address",
    "_ARROW": "`->`",
    "EQUAL": "`=`",
    "COMMA": "`,`",
    "MINUS": "`-`",
    "SLASH": "`/`",
    "INT": "a port number",
    "PROTO": "a protocol (tcp, udp, icmp, ip)",
    "VERDICT": "`allowed` or `denied`",
    "QUANTITY": "a value such as 20000pps or 15m",
    "TIME": "a time such as 07:00",
    "DAYS": "a day (Mon to Sun) or a range of days such as Mon-Fri",
    "IPPROTO": "`proto`",
    "EXCEPT": "`except`",
    "ICMP_TYPE": "`type`",
    "ICMP_CODE": "`code`",
    "RULE_NAME": "`name`",
    "FROM": "`from`",
    "RESTRICT": "`restrict`",
    "AFTER": "`after`",
    "DENIES": "`denies`",
    "WITHIN": "`within`",
    "FOR": "`for`",
    "DURING": "`during`",
}

# The shape of the statements whose words are mostly contextual, for their syntax errors.
_FORMS = {
    "signal": "signal NAME from SOURCE, ... -> remediation | restrict PROFILE",
    "contain": "contain [SOURCES] after N denies within DURATION for DURATION",
    "protect": "protect HOSTS [during HH:MM-HH:MM [DAYS] ZONE]",
}


# The numbers the new constructs take, for a message when one is missing.
_NUMBER_AFTER = {
    "type": "an ICMP type (`icmp type 8`)",
    "code": "an ICMP code (`icmp type 3 code 4`)",
    "proto": "an IP protocol number (`proto 132`)",
}


class _CommentSink(threading.local):
    """State of the parse in progress: where comments go, which file spans name."""

    comments: list[ast.Comment] | None = None
    file: str = "<policy>"


_sink = _CommentSink()


def _keep_comment(token: Token) -> Token:
    if _sink.comments is not None:
        _sink.comments.append(
            ast.Comment(str(token.value).rstrip(), token.line or 0, token.column or 0)
        )
    return token


def _reserve_keywords(token: Token) -> Token:
    kind = KEYWORDS.get(token.value)
    if kind is not None:
        token.type = kind
    return token


@cache
def _parser() -> Lark:
    grammar = resources.files("compiler").joinpath("grammar.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        maybe_placeholders=False,
        transformer=_ToAst(),
        lexer_callbacks={"NAME": _reserve_keywords, "COMMENT": _keep_comment},
    )


def parse(text: str, file: str = "<policy>") -> ast.PolicyFile:
    """Parse policy text; raise :class:`PolicySyntaxError` with every syntax error found.

    A file parsed before in this process (a long-running controller's policy, edited) has
    only its statements that differ parsed again (`_Chunks`); the result is the same."""
    chunks = _statement_chunks(text)
    known = _CHUNKS.get(file)
    if known is not None:
        parsed = known.reuse(chunks, file)
        if parsed is not None:
            return parsed
    parsed = _parse_whole(text, file)
    _CHUNKS.keep(file, _Chunks.of(chunks, parsed))
    return parsed


def _parse_whole(text: str, file: str) -> ast.PolicyFile:
    comments: list[ast.Comment] = []
    parser = _parser()
    # Comments are ignored by the grammar; the lexer hands them over for `fmt`.
    _sink.comments, _sink.file = comments, file
    try:
        statements: list[ast.Statement] = parser.parse(text)  # type: ignore[assignment]
    except UnexpectedInput:
        raise PolicySyntaxError(_all_syntax_errors(parser, text, file)) from None
    finally:
        _sink.comments = None
    return ast.PolicyFile(file, tuple(statements), tuple(comments))


Chunk = tuple[int, str]  # (its first line, its text): from a line that starts a statement
Parsed = tuple[tuple[ast.Statement, ...], tuple[ast.Comment, ...]]


class _Chunks:
    """A file's last parse, statement chunk by chunk (`_statement_chunks`). A statement
    ends where the next line that starts with a statement keyword begins (keywords are
    reserved: none can continue a statement), so a file parses to the statements and
    comments of its chunks in order, each chunk parsed alone at its own line."""

    MOST_NEW = 64  # more chunks than this that differ: the whole file is parsed again

    def __init__(self, parsed: dict[Chunk, Parsed]) -> None:
        self.parsed = parsed

    @classmethod
    def of(cls, chunks: list[Chunk], whole: ast.PolicyFile) -> _Chunks:
        """The chunks of a file parsed whole, each with its statements and comments (by
        their lines: the chunk's first line up to the next chunk's)."""
        firsts = [line for line, _ in chunks]
        statements: list[list[ast.Statement]] = [[] for _ in chunks]
        comments: list[list[ast.Comment]] = [[] for _ in chunks]
        for st in whole.statements:
            statements[bisect.bisect_right(firsts, st.span.line) - 1].append(st)
        for c in whole.comments:
            comments[bisect.bisect_right(firsts, c.line) - 1].append(c)
        return cls(
            {chunk: (tuple(statements[i]), tuple(comments[i])) for i, chunk in enumerate(chunks)}
        )

    def reuse(self, chunks: list[Chunk], file: str) -> ast.PolicyFile | None:
        """The file of these chunks, parsing only those this file's last parse did not
        have; None (parse it whole) if more than MOST_NEW did not, or one does not parse
        alone. Becomes the file's last parse."""
        before = self.parsed  # this parse's view, whatever another thread keeps meanwhile
        new = [chunk for chunk in chunks if chunk not in before]
        if len(new) > self.MOST_NEW:
            return None
        parser = _parser()
        parsed: dict[Chunk, Parsed] = {}
        for line, text in new:
            comments: list[ast.Comment] = []
            _sink.comments, _sink.file = comments, file
            try:  # at its own line: the lines before it, empty
                statements = parser.parse("\n" * (line - 1) + text)
            except UnexpectedInput:
                return None
            finally:
                _sink.comments = None
            parsed[(line, text)] = (tuple(statements), tuple(comments))  # type: ignore[arg-type]
        for chunk in chunks:
            if chunk not in parsed:
                parsed[chunk] = before[chunk]
        self.parsed = parsed
        return ast.PolicyFile(
            file,
            tuple(st for chunk in chunks for st in parsed[chunk][0]),
            tuple(c for chunk in chunks for c in parsed[chunk][1]),
        )


_CHUNKS: ByFile[_Chunks] = ByFile()  # per file name, its last parse by chunks


def _statement_chunks(text: str) -> list[Chunk]:
    """Split text at lines that start a statement: (first line number, chunk text)."""
    starts = [m.start() for m in _STATEMENT_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    chunks = []
    line, counted = 1, 0
    for i, begin in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        line += text.count("\n", counted, begin)
        counted = begin
        chunks.append((line, text[begin:end]))
    return chunks


def _all_syntax_errors(parser: Lark, text: str, file: str) -> list[Diagnostic]:
    diags = []
    chunks = _statement_chunks(text)
    for i, (first_line, chunk) in enumerate(chunks):
        try:
            parser.parse(chunk)
        except UnexpectedInput as exc:
            # A chunk ends where the next statement starts, not at the end of the file.
            end = f"the next statement (line {chunks[i + 1][0]})" if i + 1 < len(chunks) else None
            diags.append(_syntax_diagnostic(exc, file, first_line - 1, chunk, end))
    if not diags:  # the whole failed but no statement alone does: report the whole's error
        try:
            parser.parse(text)
        except UnexpectedInput as exc:
            diags.append(_syntax_diagnostic(exc, file, 0, text))
    return diags


# Text before a token that makes a message more precise: a port list's trailing comma
# (`tcp 80,`), a value whose unit stands apart (`rate 50 kpps`), a rule's sides.
_SPACED_UNIT = re.compile(r"\b(?:rate|for)\s+(?P<number>[0-9]+(?:\.[0-9]+)?)\s+$")
_RULE_START = re.compile(r"^\s*(?:allow|deny|expect)\b")
_ARROW_LOOKALIKES = frozenset(">→⟶➔➜=")


def _ends_with_comma(text: str) -> bool:
    """Whether the last thing before the end of `text`, comments aside, is a comma."""
    for line in reversed(text.split("\n")):
        code = line.split("#", 1)[0].rstrip()  # the language has no strings: # starts a comment
        if code:
            return code.endswith(",")
    return False


def _arrow_hint(chunk: str, pos: int) -> str:
    """' (did you mean `->`?)' for an arrow written some other way in a rule, or ''."""
    before = chunk[:pos]
    if pos >= len(chunk) or not _RULE_START.match(before) or "->" in before:
        return ""
    if chunk[pos] == "<":
        return " (rules read source `->` destination: put the source first and write `->`)"
    return " (did you mean `->`?)" if chunk[pos] in _ARROW_LOOKALIKES else ""


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type in _STATEMENT_TOKENS or token.type in _OPTION_TOKENS:
        return f"keyword `{token.value}`"
    if token.type in ("PROTO", "VERDICT", "IPPROTO", "EXCEPT"):
        return f"keyword `{token.value}`"
    if token.type == "NAME":
        return f"name `{token.value}`"
    return f"`{token.value}`"


def _expected_words(expected: set[str], meaning: dict[str, str] | None = None) -> str:
    meaning = {**_EXPECTED_WORDS, **(meaning or {})}
    words = sorted({meaning[e] for e in expected if e in meaning})
    if not words:
        return "a statement"
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _hint(word: str, candidates: tuple[str, ...] | list[str]) -> str:
    """' (did you mean ...?)' for a misspelt, wrongly cased or glued keyword, or ''."""
    if word.lower() in KEYWORDS and word != word.lower():
        return f" (keywords are lower case: `{word.lower()}`)"
    for kw in sorted(KEYWORDS, key=len, reverse=True):
        if word.startswith(kw) and word[len(kw) : len(kw) + 1].isdigit():  # `tcp9876`
            return f" (did you mean `{kw} {word[len(kw) :]}`?)"
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def _syntax_diagnostic(
    exc: UnexpectedInput, file: str, line_offset: int, chunk: str, end: str | None = None
) -> Diagnostic:
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        char = chunk[pos] if pos < len(chunk) else "?"
        span = Span.point(file, exc.line + line_offset, exc.column)
        return error("E001", f"unexpected character {char!r}{_arrow_hint(chunk, pos)}", span)
    assert isinstance(exc, UnexpectedToken)
    tok = exc.token
    expected = set(exc.expected)
    found = end if tok.type == "$END" and end else _describe(tok)
    if tok.type == "$END":
        line, col = tok.end_line or tok.line or 1, tok.end_column or tok.column or 1
        span = Span.point(file, line + line_offset, col)
    else:
        line, col = tok.line or 1, tok.column or 1
        width = len(str(tok.value)) or 1
        span = Span.point(file, line + line_offset, col, width)

    before = chunk[: (tok.start_pos or 0) if tok.type != "$END" else len(chunk)]
    # Before the keyword check: after `9876,` a port-set name is expected, `rate` is not one.
    if "INT" in expected and _ends_with_comma(before):
        return error(
            "E003",
            f"port list ends with `,` before {found}: remove the comma, or add a port (80, 443)",
            span,
        )
    if tok.type in KEYWORD_TYPES and "NAME" in expected:
        return error("E104", f"`{tok.value}` is a keyword and cannot be used as a name", span)
    statement = chunk.split(None, 1)[0] if chunk.strip() else ""
    if statement in _FORMS:
        incomplete = tok.type == "$END" or (
            tok.type in _STATEMENT_TOKENS and tok.type not in expected
        )
        what = "incomplete" if incomplete else f"unexpected {found} in"
        # `protect` takes `during` only (others are E207 once parsed): not suggested here.
        wanted = expected - (_OPTION_TOKENS - {"DURING"}) if statement == "protect" else expected
        numbers = {"INT": "a number", "QUANTITY": "a duration such as 10s"}
        return error(
            "E004" if incomplete else "E001",
            f"{what} `{statement}`: expected {_expected_words(wanted, numbers)} "
            f"(the form is `{_FORMS[statement]}`)",
            span,
        )
    if tok.type in ("INT", "QUANTITY") and "PROTO" in expected:
        return error("E001", f"port `{tok.value}` needs a protocol before it (tcp or udp)", span)
    after_arrow = "->" in chunk[: tok.start_pos or 0] if tok.type != "$END" else False
    if "_ARROW" in expected and not after_arrow:
        tail = " (did you mean `->`?)" if tok.type in ("MINUS", "EQUAL") else ""
        return error(
            "E002", f"expected `->` between source and destination, found {found}{tail}", span
        )
    last_word = before.split()[-1] if before.split() else ""
    if expected == {"INT"} and last_word in _NUMBER_AFTER:
        return error(
            "E001", f"expected {_NUMBER_AFTER[last_word]} after `{last_word}`, found {found}", span
        )
    if tok.type == "MINUS" or expected == {"INT"}:
        return error(
            "E003",
            f"malformed port range{'' if tok.type == '$END' else ' near ' + found}: "
            "write a port (22), a range (30001-30010) "
            "or a list (80, 443, 8000-8100)",
            span,
        )
    if tok.type == "$END" or (tok.type in _STATEMENT_TOKENS and tok.type not in expected):
        return error(
            "E004",
            f"incomplete statement: expected {_expected_words(expected)} before {found}",
            span,
        )
    if expected <= _STATEMENT_TOKENS:
        tail = _hint(str(tok.value), STATEMENT_KEYWORDS) if tok.type == "NAME" else ""
        return error(
            "E001",
            f"expected a statement ({', '.join(STATEMENT_KEYWORDS)}), found {found}{tail}",
            span,
        )
    if expected & _OPTION_TOKENS:
        glued = _SPACED_UNIT.search(before) if tok.type == "NAME" else None
        if glued:
            joined = f"{glued['number']}{tok.value}"
            tail = f" (did you mean `{joined}`? no space between a value and its unit)"
        else:
            tail = _hint(str(tok.value), list(KEYWORDS)) if tok.type == "NAME" else ""
        wants = "a protocol (tcp, udp, icmp, ip), " if "PROTO" in expected else ""
        return error(
            "E005",
            f"unexpected {found} after the statement: expected {wants}an option (log, reply, "
            f"rate, for, during, name) or a new statement{tail}",
            span,
        )
    return error("E001", f"unexpected {found}: expected {_expected_words(expected)}", span)


TOO_MANY_DIGITS = 10**12  # stands for any longer numeral: out of every range p4seg has


def _number(token: Token) -> int:
    text = str(token)
    return int(text) if len(text) <= 12 else TOO_MANY_DIGITS


def _start(node: object) -> tuple[int, int]:
    if isinstance(node, Token):
        return node.line or 0, node.column or 0
    if isinstance(node, tuple):
        return _start(node[0])
    span: Span = node.span  # type: ignore[attr-defined]
    return span.line, span.column


def _end(node: object) -> tuple[int, int]:
    if isinstance(node, Token):
        return node.end_line or 0, node.end_column or 0
    if isinstance(node, tuple):
        return _end(node[-1])
    span: Span = node.span  # type: ignore[attr-defined]
    return span.end_line, span.end_column


class _ToAst(Transformer[Token, Any]):
    """Lark rules -> :mod:`compiler.ast` nodes, applied inline while parsing.

    A node's span runs from its first child's start to its last child's end; the file name
    comes from the parse in progress (one parser serves every file).
    """

    @property
    def file(self) -> str:
        return _sink.file

    def _tok(self, tok: Token) -> Span:
        return Span(
            self.file, tok.line or 0, tok.column or 0, tok.end_line or 0, tok.end_column or 0
        )

    def _span(self, first: object, last: object) -> Span:
        line, column = _start(first)
        end_line, end_column = _end(last)
        return Span(self.file, line, column, end_line, end_column)

    def start(self, children: list[ast.Statement]) -> list[ast.Statement]:
        return children

    def name_ref(self, children: list[Token]) -> ast.Name:
        return ast.Name(str(children[0]), self._tok(children[0]))

    def address(self, children: list[Token]) -> ast.Address:
        return ast.Address(str(children[0]), self._tok(children[0]))

    def endpoints(self, children: list[ast.Endpoint]) -> tuple[ast.Endpoint, ...]:
        return tuple(children)

    def policy_decl(self, children: list[Token]) -> ast.PolicyDecl:
        keyword, name = children
        return ast.PolicyDecl(ast.Name(str(name), self._tok(name)), self._span(keyword, name))

    def endpoint_set(self, children: list[Any]) -> _EndpointSet:
        include = children[0]
        exclude = children[2] if len(children) > 2 else ()
        return _EndpointSet(include, exclude, self._span(include, children[-1]))

    def service_def(self, children: list[Any]) -> ast.ServiceDef:
        keyword, name, endpoints = children
        return ast.ServiceDef(
            ast.Name(str(name), self._tok(name)),
            endpoints.include,
            self._span(keyword, endpoints),
            endpoints.exclude,
        )

    def ports_def(self, children: list[Any]) -> ast.PortsDef:
        keyword, name, ports = children
        return ast.PortsDef(ast.Name(str(name), self._tok(name)), ports, self._span(keyword, ports))

    def port_item(self, children: list[Token]) -> ast.PortRange:
        hi = _number(children[1]) if len(children) > 1 else None
        return ast.PortRange(_number(children[0]), hi, self._span(children[0], children[-1]))

    number_item = port_item

    def port_name(self, children: list[Token]) -> ast.PortName:
        return ast.PortName(str(children[0]), self._tok(children[0]))

    def icmp_type(self, children: list[Token]) -> ast.IcmpType:
        code = _number(children[3]) if len(children) > 3 else None
        span = self._span(children[0], children[-1])
        return ast.IcmpType(_number(children[1]), code, span)

    def port_list(self, children: list[ast.PortItem]) -> tuple[ast.PortItem, ...]:
        return tuple(children)

    number_list = port_list

    def proto_spec(self, children: list[Any]) -> ast.ProtoSpec:
        ports = children[1] if len(children) > 1 else ()
        return ast.ProtoSpec(str(children[0]), ports, self._span(children[0], children[-1]))

    def proto_number(self, children: list[Token]) -> ast.ProtoSpec:
        keyword, number = children
        return ast.ProtoSpec("proto", (), self._span(keyword, number), _number(number))

    def opt_log(self, children: list[Token]) -> ast.LogOption:
        return ast.LogOption(self._tok(children[0]))

    def opt_reply(self, children: list[Token]) -> ast.ReplyOption:
        return ast.ReplyOption(self._tok(children[0]))

    def opt_rate(self, children: list[Token]) -> ast.RateOption:
        keyword, value = children
        return ast.RateOption(str(value), self._span(keyword, value), self._tok(value))

    def opt_for(self, children: list[Token]) -> ast.ForOption:
        keyword, value = children
        return ast.ForOption(str(value), self._span(keyword, value), self._tok(value))

    def opt_name(self, children: list[Token]) -> ast.NameOption:
        keyword, name = children
        return ast.NameOption(ast.Name(str(name), self._tok(name)), self._span(keyword, name))

    def zone(self, children: list[Token]) -> Token:
        return _joined_token(children, children[0], children[-1])

    def days(self, children: list[Token]) -> tuple[ast.DayRange, ...]:
        out = []
        for tok in children:
            first, _, last = str(tok).partition("-")
            out.append(ast.DayRange(first, last or None, self._tok(tok)))
        return tuple(out)

    def opt_during(self, children: list[Any]) -> ast.DuringOption:
        tokens = [c for c in children if isinstance(c, Token)]
        times = [str(c) for c in tokens if c.type == "TIME"]
        zone = next((str(c) for c in tokens if c.type == "ZONE"), None)
        days = next((c for c in children if isinstance(c, tuple)), ())
        span = self._span(children[0], children[-1])
        return ast.DuringOption(times[0], times[1], zone, span, days)

    def rule(self, children: list[Any]) -> ast.Rule:
        action, src, dst, *rest = children
        proto = rest[0] if rest and isinstance(rest[0], ast.ProtoSpec) else None
        options = tuple(rest[1:] if proto is not None else rest)
        span = self._span(action, children[-1])
        return ast.Rule(
            str(action), src.include, dst.include, proto, options, span, src.exclude, dst.exclude
        )

    def default_decl(self, children: list[Any]) -> ast.DefaultDecl:
        keyword, action, *options = children
        span = self._span(keyword, children[-1])
        return ast.DefaultDecl(str(action), self._tok(action), tuple(options), span)

    def expect_decl(self, children: list[Any]) -> ast.Expect:
        keyword, src, dst, proto, *rest = children
        item = rest[0] if len(rest) == 2 else None
        port_tok = item if isinstance(item, Token) else None
        return ast.Expect(
            src=src.include,
            dst=dst.include,
            src_except=src.exclude,
            dst_except=dst.exclude,
            proto="proto" if proto.type == "IPPROTO" else str(proto),
            proto_span=self._tok(proto),
            port=_number(port_tok) if port_tok is not None else None,
            port_span=self._tok(port_tok) if port_tok is not None else None,
            verdict=str(rest[-1]),
            span=self._span(keyword, rest[-1]),
            icmp=item if isinstance(item, ast.PortName | ast.IcmpType) else None,
        )

    def signal_decl(self, children: list[Any]) -> ast.SignalDecl:
        keyword, name, _from, *sources, effect = children
        restrict, target = effect
        return ast.SignalDecl(
            ast.Name(str(name), self._tok(name)),
            tuple(ast.Name(str(s), self._tok(s)) for s in sources),
            ast.Name(str(target), self._tok(target)),
            restrict,
            self._span(keyword, target),
        )

    def effect_name(self, children: list[Token]) -> tuple[bool, Token]:
        return False, children[0]

    def effect_restrict(self, children: list[Token]) -> tuple[bool, Token]:
        return True, children[1]

    def contain_decl(self, children: list[Any]) -> ast.ContainDecl:
        keyword, *rest = children
        scope = rest.pop(0) if isinstance(rest[0], _EndpointSet) else None
        _after, count, _denies, _within, within, _for, duration = rest
        return ast.ContainDecl(
            scope.include if scope else (),
            scope.exclude if scope else (),
            _number(count),
            self._tok(count),
            str(within),
            self._tok(within),
            str(duration),
            self._tok(duration),
            self._span(keyword, duration),
        )

    def protect_decl(self, children: list[Any]) -> ast.ProtectDecl:
        keyword, hosts, *options = children
        span = self._span(keyword, children[-1])
        return ast.ProtectDecl(hosts.include, hosts.exclude, tuple(options), span)


@dataclass(frozen=True, slots=True)
class _EndpointSet:
    """`endpoints [except endpoints]` while parsing; statements keep the two lists."""

    include: tuple[ast.Endpoint, ...]
    exclude: tuple[ast.Endpoint, ...]
    span: Span


def _joined_token(parts: list[Token], first: Token, last: Token) -> Token:
    tok = Token("ZONE", "/".join(str(p) for p in parts))
    tok.line, tok.column = first.line, first.column
    tok.end_line, tok.end_column = last.end_line, last.end_column
    return tok
