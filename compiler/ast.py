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
class PortName:
    """A named port set (`ports fix = ...`) after tcp/udp, or an ICMP type name after icmp."""

    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class IcmpType:
    """`type N` or `type N code M` after icmp."""

    type: int
    code: int | None  # None: every code of the type
    span: Span


PortItem = PortRange | PortName | IcmpType


@dataclass(frozen=True, slots=True)
class ProtoSpec:
    proto: str  # tcp | udp | icmp | ip | proto (then `number` is the IP protocol number)
    ports: tuple[PortItem, ...]
    span: Span
    number: int | None = None


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
class DayRange:
    """`Mon`, or `Mon-Fri` (a range may wrap: `Fri-Mon`), as written (checked in resolve)."""

    first: str
    last: str | None  # None: a single day
    span: Span


@dataclass(frozen=True, slots=True)
class DuringOption:
    start: str  # "HH:MM"
    end: str
    zone: str | None
    span: Span
    days: tuple[DayRange, ...] = ()  # (): every day


@dataclass(frozen=True, slots=True)
class NameOption:
    """`name NAME`: the rule's stable name (its key across policy versions)."""

    name: Name
    span: Span


Option = LogOption | ReplyOption | RateOption | ForOption | DuringOption | NameOption

OPTION_KEYWORD: dict[type, str] = {
    LogOption: "log",
    ReplyOption: "reply",
    RateOption: "rate",
    ForOption: "for",
    DuringOption: "during",
    NameOption: "name",
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
    excluded: tuple[Endpoint, ...] = ()  # after `except`


@dataclass(frozen=True, slots=True)
class PortsDef:
    """`ports NAME = 9876, 9880-9889`: a named set of ports for tcp/udp rules."""

    name: Name
    ports: tuple[PortRange, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Rule:
    action: str  # allow | deny
    src: tuple[Endpoint, ...]
    dst: tuple[Endpoint, ...]
    proto: ProtoSpec | None  # None: every protocol, like `ip`
    options: tuple[Option, ...]
    span: Span
    src_except: tuple[Endpoint, ...] = ()
    dst_except: tuple[Endpoint, ...] = ()


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
    proto: str  # tcp | udp | icmp | ip | proto (then `port` is the IP protocol number)
    proto_span: Span
    port: int | None
    port_span: Span | None
    verdict: str  # allowed | denied
    span: Span
    src_except: tuple[Endpoint, ...] = ()
    dst_except: tuple[Endpoint, ...] = ()
    icmp: PortName | IcmpType | None = None  # an ICMP type after icmp (a name after tcp/udp)


@dataclass(frozen=True, slots=True)
class SignalDecl:
    """`signal NAME from SOURCE, ... -> remediation | restrict PROFILE`: what a posture
    signal about a host does to it."""

    name: Name
    sources: tuple[Name, ...]
    effect: Name  # `remediation`, or the profile service after `restrict`
    restrict: bool
    span: Span


@dataclass(frozen=True, slots=True)
class ContainDecl:
    """`contain [SOURCES] after N denies within T for D`: automatic quarantine of a source
    that hits N logged denies within T, for D."""

    src: tuple[Endpoint, ...]  # (): every source
    src_except: tuple[Endpoint, ...]
    denies: int
    denies_span: Span
    within: str
    within_span: Span
    duration: str
    duration_span: Span
    span: Span


@dataclass(frozen=True, slots=True)
class ProtectDecl:
    """`protect ENDPOINTS [during ...]`: hosts never cut off automatically (then)."""

    hosts: tuple[Endpoint, ...]
    hosts_except: tuple[Endpoint, ...]
    options: tuple[Option, ...]
    span: Span


Statement = (
    PolicyDecl
    | ServiceDef
    | PortsDef
    | Rule
    | DefaultDecl
    | Expect
    | SignalDecl
    | ContainDecl
    | ProtectDecl
)


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
