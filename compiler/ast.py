"""The policy AST: frozen nodes, each carrying the source span it was parsed from.

The AST is what the user wrote, nothing resolved: names are still names, numbers are still
text where their meaning is checked later (rates, durations, time windows), so that `fmt`
can print the policy back and `resolve` can point at the exact token that is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.diagnostics import Span


@dataclass(frozen=True, slots=True)
class Name:
    """A reference to a service, an inventory host, or the built-in `any`."""

    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class Address:
    """An IPv4 address or prefix literal, as written (validated in resolve)."""

    text: str
    span: Span


Endpoint = Name | Address


@dataclass(frozen=True, slots=True)
class PortRange:
    lo: int
    hi: int | None  # None: a single port, written without a dash
    span: Span


@dataclass(frozen=True, slots=True)
class ProtoSpec:
    proto: str  # tcp | udp | icmp | ip
    ports: tuple[PortRange, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class LogOption:
    span: Span


@dataclass(frozen=True, slots=True)
class ReplyOption:
    span: Span


@dataclass(frozen=True, slots=True)
class RateOption:
    value: str  # e.g. "20000pps", "20kpps"
    span: Span
    value_span: Span


@dataclass(frozen=True, slots=True)
class ForOption:
    value: str  # e.g. "15m", "2h", "1d"
    span: Span
    value_span: Span


@dataclass(frozen=True, slots=True)
class DuringOption:
    start: str  # "HH:MM"
    end: str
    zone: str | None
    span: Span


Option = LogOption | ReplyOption | RateOption | ForOption | DuringOption

OPTION_KEYWORD: dict[type, str] = {
    LogOption: "log",
    ReplyOption: "reply",
    RateOption: "rate",
    ForOption: "for",
    DuringOption: "during",
}


@dataclass(frozen=True, slots=True)
class PolicyDecl:
    name: Name
    span: Span


@dataclass(frozen=True, slots=True)
class ServiceDef:
    name: Name
    endpoints: tuple[Endpoint, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Rule:
    action: str  # allow | deny
    src: tuple[Endpoint, ...]
    dst: tuple[Endpoint, ...]
    proto: ProtoSpec | None  # None: every protocol, like `ip`
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class DefaultDecl:
    action: str
    action_span: Span
    options: tuple[Option, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Expect:
    src: tuple[Endpoint, ...]
    dst: tuple[Endpoint, ...]
    proto: str
    proto_span: Span
    port: int | None
    port_span: Span | None
    verdict: str  # allowed | denied
    span: Span


Statement = PolicyDecl | ServiceDef | Rule | DefaultDecl | Expect


@dataclass(frozen=True, slots=True)
class Comment:
    text: str  # including the leading '#'
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class PolicyFile:
    file: str
    statements: tuple[Statement, ...]
    comments: tuple[Comment, ...]
