"""The checked policy: what `resolve` produces and every later stage consumes.

Names are gone: services are address sets, rules are normalised (protocol, merged port
intervals, parsed options) and keep the span of the text that made them, so anything
downstream (alerts, traces, counterexamples) can say which line decided.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from compiler.addresses import AddressSet, Interval
from compiler.diagnostics import Span

ALL_PORTS: tuple[Interval, ...] = ((0, 65535),)
PORT_PROTOCOLS = ("tcp", "udp")


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Daily window [start, end) in minutes after midnight in `zone`; end < start wraps."""

    start: int
    end: int
    zone: str

    def __str__(self) -> str:
        def hhmm(m: int) -> str:
            return f"{m // 60:02d}:{m % 60:02d}"

        return f"{hhmm(self.start)}-{hhmm(self.end)} {self.zone}"

    def contains(self, minute_of_day: int) -> bool:
        if self.start < self.end:
            return self.start <= minute_of_day < self.end
        return minute_of_day >= self.start or minute_of_day < self.end


@dataclass(frozen=True, slots=True)
class Service:
    """A named address set. Its value is computed on first use: a chain of n nested services
    would otherwise hold n²/2 intervals when only the outermost is used."""

    name: str
    span: Span
    value: Callable[[], AddressSet] = field(repr=False, compare=False)

    @property
    def addresses(self) -> AddressSet:
        return self.value()


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One allow/deny rule. `id` is 1-based in file order; 0 is the default deny."""

    id: int
    action: Action
    src: AddressSet
    dst: AddressSet
    src_text: str  # as written, for messages
    dst_text: str
    proto: str  # tcp | udp | icmp | ip
    ports: tuple[Interval, ...]  # merged; ALL_PORTS when none given or not tcp/udp
    log: bool
    reply: bool
    rate_pps: int | None
    duration_s: int | None
    window: TimeWindow | None
    span: Span

    @property
    def is_time_bound(self) -> bool:
        return self.duration_s is not None or self.window is not None

    def describe(self) -> str:
        """The rule in policy syntax, normalised (for messages and reports)."""
        parts = [self.action.value, self.src_text, "->", self.dst_text]
        if self.proto != "ip" or self.ports != ALL_PORTS:
            parts.append(self.proto)
        if self.ports != ALL_PORTS:
            parts.append(format_ports(self.ports))
        if self.log:
            parts.append("log")
        if self.reply:
            parts.append("reply")
        if self.rate_pps is not None:
            parts.append(f"rate {self.rate_pps}pps")
        if self.duration_s is not None:
            parts.append(f"for {self.duration_s}s")
        if self.window is not None:
            parts.append(f"during {self.window}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class ExpectCase:
    src: AddressSet
    dst: AddressSet
    src_text: str
    dst_text: str
    proto: str  # tcp | udp | icmp | ip
    port: int | None
    allowed: bool
    span: Span

    def describe(self) -> str:
        port = f" {self.port}" if self.port is not None else ""
        verdict = "allowed" if self.allowed else "denied"
        return f"{self.src_text} -> {self.dst_text} {self.proto}{port} {verdict}"


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    file: str
    services: tuple[Service, ...]
    rules: tuple[PolicyRule, ...]
    default_log: bool
    default_span: Span | None
    expects: tuple[ExpectCase, ...]

    def rule(self, rule_id: int) -> PolicyRule | None:
        if 1 <= rule_id <= len(self.rules):
            return self.rules[rule_id - 1]
        return None


def format_ports(ports: tuple[Interval, ...]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)
