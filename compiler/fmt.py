"""`p4seg fmt`: print a policy in canonical form, keeping every comment.

Canonical form: one statement per line, single spaces, options in a fixed order (log,
reply, rate, for, during, name), columns aligned within a run of statements of the same kind,
trailing comments aligned within the run, at most one blank line between runs. Formatting
is idempotent and never changes what the policy means (both are property-tested).
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler import ast
from compiler.parse import parse

_OPTION_ORDER = {
    ast.LogOption: 0,
    ast.ReplyOption: 1,
    ast.RateOption: 2,
    ast.ForOption: 3,
    ast.DuringOption: 4,
    ast.NameOption: 5,
}


def _endpoints(eps: tuple[ast.Endpoint, ...], excluded: tuple[ast.Endpoint, ...] = ()) -> str:
    text = ", ".join(ep.text for ep in eps)
    return f"{text} except {_endpoints(excluded)}" if excluded else text


def _port(item: ast.PortItem) -> str:
    if isinstance(item, ast.PortName):
        return item.text
    if isinstance(item, ast.IcmpType):
        return f"type {item.type}" + ("" if item.code is None else f" code {item.code}")
    return str(item.lo) if item.hi is None else f"{item.lo}-{item.hi}"


def _ports(ports: tuple[ast.PortItem, ...]) -> str:
    return ", ".join(_port(p) for p in ports)


def _proto(spec: ast.ProtoSpec) -> str:
    if spec.proto == "proto":
        return f"proto {spec.number}"
    return spec.proto + (f" {_ports(spec.ports)}" if spec.ports else "")


def _option(opt: ast.Option) -> str:
    if isinstance(opt, ast.LogOption):
        return "log"
    if isinstance(opt, ast.ReplyOption):
        return "reply"
    if isinstance(opt, ast.RateOption):
        return f"rate {opt.value}"
    if isinstance(opt, ast.ForOption):
        return f"for {opt.value}"
    if isinstance(opt, ast.NameOption):
        return f"name {opt.name.text}"
    days = ",".join(d.first if d.last is None else f"{d.first}-{d.last}" for d in opt.days)
    zone = f" {opt.zone}" if opt.zone else ""
    return f"during {opt.start}-{opt.end}{' ' + days if days else ''}{zone}"


def _options(options: tuple[ast.Option, ...]) -> str:
    ordered = sorted(options, key=lambda o: _OPTION_ORDER[type(o)])
    return " ".join(_option(o) for o in ordered)


def _columns(stmt: ast.Statement) -> list[str]:
    """A statement as columns; aligned runs pad every column but the last."""
    if isinstance(stmt, ast.PolicyDecl):
        return [f"policy {stmt.name.text}"]
    if isinstance(stmt, ast.ServiceDef):
        return ["service", stmt.name.text, f"= {_endpoints(stmt.endpoints, stmt.excluded)}"]
    if isinstance(stmt, ast.PortsDef):
        return ["ports", stmt.name.text, f"= {_ports(stmt.ports)}"]
    if isinstance(stmt, ast.Rule):
        return [
            stmt.action,
            _endpoints(stmt.src, stmt.src_except),
            "->",
            _endpoints(stmt.dst, stmt.dst_except),
            _proto(stmt.proto) if stmt.proto is not None else "",
            _options(stmt.options),
        ]
    if isinstance(stmt, ast.DefaultDecl):
        return [" ".join(filter(None, ["default", stmt.action, _options(stmt.options)]))]
    if isinstance(stmt, ast.SignalDecl):
        effect = f"restrict {stmt.effect.text}" if stmt.restrict else stmt.effect.text
        sources = ", ".join(s.text for s in stmt.sources)
        return ["signal", stmt.name.text, f"from {sources}", "->", effect]
    if isinstance(stmt, ast.ContainDecl):
        scope = _endpoints(stmt.src, stmt.src_except)
        when = f"after {stmt.denies} denies within {stmt.within} for {stmt.duration}"
        return [" ".join(filter(None, ["contain", scope, when]))]
    if isinstance(stmt, ast.ProtectDecl):
        return ["protect", _endpoints(stmt.hosts, stmt.hosts_except), _options(stmt.options)]
    port = str(stmt.port) if stmt.port is not None else _port(stmt.icmp) if stmt.icmp else ""
    return [
        "expect",
        _endpoints(stmt.src, stmt.src_except),
        "->",
        _endpoints(stmt.dst, stmt.dst_except),
        stmt.proto,
        port,
        stmt.verdict,
    ]


@dataclass
class _Line:
    stmt: ast.Statement | None  # None: a comment on a line of its own
    text: str
    first: int  # source lines, for blank-line and grouping decisions
    last: int
    trailing: str = ""


def format_policy(text: str, file: str = "<policy>") -> str:
    """Canonical text of a policy; raises PolicySyntaxError if it does not parse."""
    tree = parse(text, file)
    comments = sorted(tree.comments, key=lambda c: c.line)
    lines: list[_Line] = []
    ci = 0
    for stmt in tree.statements:
        first, last = stmt.span.line, stmt.span.end_line
        trailing = []
        while ci < len(comments) and comments[ci].line <= last:
            c = comments[ci]
            if c.line == last and c.line >= first:
                trailing.append(c.text)
            else:
                lines.append(_Line(None, c.text, c.line, c.line))
            ci += 1
        lines.append(_Line(stmt, "", first, last, " ".join(trailing)))
    lines.extend(_Line(None, c.text, c.line, c.line) for c in comments[ci:])

    # A run: statements of one kind with no blank line between them (comment lines may
    # stand inside a run); its columns and trailing comments are aligned together.
    out: list[str] = []
    prev: _Line | None = None
    run: list[_Line] = []
    for line in lines:
        gap = prev is not None and line.first > prev.last + 1
        kinds = {type(r.stmt) for r in run if r.stmt is not None}
        if gap or (line.stmt is not None and kinds and type(line.stmt) not in kinds):
            out.extend(_render_run(run))
            run = []
            if gap:
                out.append("")
        run.append(line)
        prev = line
    out.extend(_render_run(run))
    return "\n".join(out).strip("\n") + "\n" if out else ""


def _render_run(run: list[_Line]) -> list[str]:
    rows = [_columns(line.stmt) for line in run if line.stmt is not None]
    if not rows:
        return [line.text for line in run]
    keep = [i for i in range(len(rows[0])) if any(r[i] for r in rows)]
    rows = [[r[i] for i in keep] for r in rows]
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    texts = iter(
        " ".join(c.ljust(width[i]) if i < len(row) - 1 else c for i, c in enumerate(row)).rstrip()
        for row in rows
    )
    stmt_text = {id(line): next(texts) for line in run if line.stmt is not None}
    commented = [
        len(stmt_text[id(line)]) for line in run if line.stmt is not None and line.trailing
    ]
    comment_col = max(commented, default=0) + 2
    out = []
    for line in run:
        if line.stmt is None:
            out.append(line.text)
        elif line.trailing:
            out.append(stmt_text[id(line)].ljust(comment_col) + line.trailing)
        else:
            out.append(stmt_text[id(line)])
    return out
