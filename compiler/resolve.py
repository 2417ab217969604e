"""Stage 2 — AST + inventory -> checked :class:`Policy`.

Resolves names (services, inventory hosts, `any`) to address sets, validates every value
(addresses, ports, rates, durations, time windows, which options fit which rules) and
normalises rules. All problems are collected; if any is an error, :class:`PolicyError`
carries them all and no policy is produced.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from compiler import ast
from compiler.addresses import (
    MAX_ADDRESS,
    AddressSet,
    AddressSyntaxError,
    Interval,
    merge_intervals,
    parse_prefix,
)
from compiler.diagnostics import Diagnostic, Note, PolicyError, Span, error, quote, warning
from compiler.inventory import Inventory
from compiler.memo import ByFile
from compiler.model import (
    ALL_PORTS,
    DAY_NAMES,
    EVERY_DAY,
    HEALTHY,
    ICMP_NAMES,
    PORT_PROTOCOLS,
    REMEDIATION,
    Action,
    ContainRule,
    ExpectCase,
    Policy,
    PolicyRule,
    Protection,
    Service,
    SignalRule,
    TimeWindow,
    with_keys,
)
from compiler.parse import TOO_MANY_DIGITS
from compiler.protocols import MAX_PORT, PROTOCOL_NUMBERS

ANY = "any"
MAX_PROTOCOL = 255
MAX_RATE_PPS = 1_000_000_000
MAX_DURATION_S = 365 * 86400
MAX_CONTAIN_DENIES = 10_000  # a source's window keeps this many timestamps at most
_RATE = re.compile(r"^(?P<n>[0-9]{1,12}(?:\.[0-9]{1,6})?)(?P<unit>pps|kpps|mpps)$")
_DURATION = re.compile(r"^(?P<n>[0-9]{1,9})(?P<unit>s|m|h|d)$")
_CLOCK = re.compile(r"^(?P<h>[0-9]{1,2}):(?P<m>[0-9]{2})$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE_UNITS = {"pps": 1, "kpps": 1_000, "mpps": 1_000_000}
# Bit and byte rates (kbps, Mbps, MBps, gbit, ...): the pipeline meters packets.
_BIT_OR_BYTE_RATE = re.compile(r"[kmgt]?i?(?:bps|bit|bits|byte|bytes|b)(?:/s)?", re.IGNORECASE)
# Time zone abbreviations people write for a place that has daylight saving time.
_ABBREVIATIONS = {
    "PST": "America/Los_Angeles",
    "PDT": "America/Los_Angeles",
    "CST": "America/Chicago",
    "CDT": "America/Chicago",
    "EDT": "America/New_York",
    "MDT": "America/Denver",
    "BST": "Europe/London",
    "CEST": "Europe/Paris",
    "AEST": "Australia/Sydney",
    "AEDT": "Australia/Sydney",
}
_REGION_EXAMPLES = ("America/New_York", "Europe/London", "Asia/Tokyo", "Australia/Sydney")
_DAYLIGHT_PLACES = {"EST": "America/New_York", "MST": "America/Denver"}
_REFERENCE_YEAR = 2026  # fixed, so that a check gives the same answer every day


def protocol_problem(number: int | None) -> str | None:
    """Why `proto N` is invalid (E210; also `p4seg trace`), or None when it is valid."""
    if number is None or number > MAX_PROTOCOL:
        shown = number if number is not None and number < TOO_MANY_DIGITS else "number"
        return f"IP protocol {shown} is out of range 0-255"
    named = next((p for p, n in PROTOCOL_NUMBERS.items() if n == number), None)
    if named is not None:
        return f"IP protocol {number} is {named}: write `{named}` (with its ports, if any)"
    return None


def parse_duration(text: str) -> int | str:
    """Seconds in a duration such as `15m` (1s to 365d), or what is wrong with it."""
    m = _DURATION.match(text)
    if not m:
        return f"duration {quote(text)} is not a whole number with a unit s, m, h or d (e.g. 15m)"
    seconds = int(m["n"]) * _DURATION_UNITS[m["unit"]]
    if not 1 <= seconds <= MAX_DURATION_S:
        return f"duration {quote(text)} must be from 1s to 365d"
    return seconds


_APPENDING = threading.Lock()


@dataclass(frozen=True, slots=True)
class _Resolution:
    """What a file's last resolve made, for the next resolve of the file (a long-running
    controller's policy, edited): the rules of unchanged statements are found again as the
    same objects, and what is derived from a rule object downstream (its keys, its entries,
    its digests: compiler.lower, compiler.allocation) is found again with them.

    Valid for a resolve whose inventory is the same object and whose service and port set
    definitions are the same statement objects (compiler.parse hands an unchanged
    statement on at its line as the same object): a rule statement then resolves to what
    it did, and an unchanged statement at its position keeps its rule."""

    inventory: Inventory
    definitions: tuple[ast.Statement, ...]  # the services and port sets, in file order
    values: dict[str, AddressSet | None]  # the services evaluated (shared address sets)
    rules: dict[int, tuple[ast.Rule, int, PolicyRule, tuple[Diagnostic, ...]]]  # by id(stmt)
    keyed: dict[int, tuple[PolicyRule, PolicyRule]]  # by id of the rule before its key
    expects: dict[int, tuple[ast.Expect, ExpectCase]]  # by id(stmt)

    def holds(self, inventory: Inventory, definitions: tuple[ast.Statement, ...]) -> bool:
        return (
            self.inventory is inventory
            and len(self.definitions) == len(definitions)
            and all(a is b for a, b in zip(self.definitions, definitions, strict=True))
        )


_RESOLUTIONS: ByFile[_Resolution] = ByFile()  # per file name, its last resolve without errors


@dataclass(frozen=True, slots=True)
class Resolved:
    policy: Policy
    warnings: tuple[Diagnostic, ...]
    _resolver: _Resolver | None = field(default=None, repr=False, compare=False)

    def appended(self, tree: ast.PolicyFile) -> Policy | None:
        """The policy with the rules of `tree` after its own, as if its statements were
        appended to the file (live grants): resolved against the file's services and port
        sets, numbered on, keyed by their names; PolicyError when one does not resolve.
        None when `tree` holds anything but rules with names the file does not use: check
        the whole text then."""
        resolver = self._resolver
        assert resolver is not None
        stmts = [s for s in tree.statements if isinstance(s, ast.Rule)]
        names = [_rule_name(s) for s in stmts]
        taken = {r.name for r in self.policy.rules}
        if len(stmts) != len(tree.statements) or None in names or len(set(names)) < len(names):
            return None
        if taken.intersection(names) or any(_rule_name_problem(n) for n in names if n):
            return None
        with _APPENDING:  # the resolver's lists are shared by every caller
            kept = resolver.warnings
            resolver.diags, resolver.warnings = [], []
            try:
                first = len(self.policy.rules) + 1
                rules = [resolver.rule(stmt, first + i) for i, stmt in enumerate(stmts)]
                if resolver.diags:
                    raise PolicyError(resolver.diags)
            finally:
                resolver.warnings = kept
        added = tuple(dataclasses.replace(r, key=r.name or "") for r in rules if r is not None)
        return dataclasses.replace(self.policy, rules=self.policy.rules + added)


def _rule_name(stmt: ast.Rule) -> str | None:
    return next((o.name.text for o in stmt.options if isinstance(o, ast.NameOption)), None)


@dataclass
class _Resolver:
    tree: ast.PolicyFile
    inventory: Inventory
    diags: list[Diagnostic] = field(default_factory=list)
    defs: dict[str, ast.ServiceDef] = field(default_factory=dict)
    values: dict[str, AddressSet | None] = field(default_factory=dict)
    port_defs: dict[str, ast.PortsDef] = field(default_factory=dict)
    port_values: dict[str, tuple[Interval, ...] | None] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)  # services with errors, or nesting one
    warnings: list[Diagnostic] = field(default_factory=list)

    def fail(self, code: str, message: str, span: Span | None, *notes: Note) -> None:
        self.diags.append(error(code, message, span, *notes))

    # -- names -----------------------------------------------------------------------------

    def collect_services(self) -> None:
        for stmt in self.tree.statements:
            if not isinstance(stmt, ast.ServiceDef):
                continue
            name = stmt.name.text
            if name == ANY:
                self.fail(
                    "E104",
                    "`any` is built in (every address) and cannot be redefined",
                    stmt.name.span,
                )
            elif name in self.defs:
                first = self.defs[name].name.span
                self.fail(
                    "E102",
                    f"service '{name}' is defined twice",
                    stmt.name.span,
                    Note("first defined here", first),
                )
            elif name in self.inventory.hosts_by_name:
                host = self.inventory.hosts_by_name[name]
                self.fail(
                    "E102",
                    f"service '{name}' has the name of an inventory host; rename the service",
                    stmt.name.span,
                    Note("the host is defined here", host.span),
                )
            else:
                self.defs[name] = stmt

    def collect_port_sets(self) -> None:
        for stmt in self.tree.statements:
            if not isinstance(stmt, ast.PortsDef):
                continue
            first = self.port_defs.get(stmt.name.text)
            if first is not None:
                self.fail(
                    "E102",
                    f"port set '{stmt.name.text}' is defined twice",
                    stmt.name.span,
                    Note("first defined here", first.name.span),
                )
            else:
                self.port_defs[stmt.name.text] = stmt
                # Checked once here, used or not: uses only look the result up.
                self.port_values[stmt.name.text] = self.ports(stmt.ports, "tcp")

    def known_names(self) -> list[str]:
        return [ANY, *self.defs, *self.inventory.hosts_by_name]

    def unknown_name(self, ref: ast.Name) -> None:
        name = ref.text
        if self.inventory.hosts:
            what = f"not a service, and not a host of the inventory {self.inventory.file}"
        else:
            what = "not a service (no inventory given: host names need -i INVENTORY)"
        close = difflib.get_close_matches(name, self.known_names(), n=1, cutoff=0.6)
        hint = f" (did you mean {self.kind_of(close[0])} '{close[0]}'?)" if close else ""
        self.fail("E101", f"unknown name {quote(name)}: {what}{hint}", ref.span)

    def kind_of(self, name: str) -> str:
        if name == ANY:
            return "the built-in"
        return "service" if name in self.defs else "host"

    def resolve_name(self, ref: ast.Name) -> AddressSet | None:
        name = ref.text
        if name == ANY:
            return AddressSet.everything()
        if name in self.defs:
            return self.service_value(name)
        host = self.inventory.hosts_by_name.get(name)
        if host is not None:
            return AddressSet(((host.ip, host.ip),))
        self.unknown_name(ref)
        return None

    def check_services(self) -> None:
        """Every service's own endpoints and the service graph's cycles; marks bad services."""
        for name, definition in self.defs.items():
            for ep in definition.endpoints + definition.excluded:
                if isinstance(ep, ast.Address):
                    try:
                        parse_prefix(ep.text)
                    except AddressSyntaxError as exc:
                        self.fail("E201", f"invalid address: {exc}", ep.span)
                        self.bad.add(name)
                elif not (
                    ep.text == ANY
                    or ep.text in self.defs
                    or ep.text in self.inventory.hosts_by_name
                ):
                    self.unknown_name(ep)
                    self.bad.add(name)
        on_path: dict[str, bool] = {}  # True while on the path being explored, then False
        for root in self.defs:
            if root in on_path:
                continue
            path, members = [root], [iter(self.nested(root))]
            on_path[root] = True
            while path:
                child = next(members[-1], None)
                if child is None:
                    on_path[path.pop()] = False
                    members.pop()
                elif on_path.get(child):
                    cycle = [*path[path.index(child) :], child]
                    self.fail(
                        "E103", f"service cycle: {' -> '.join(cycle)}", self.defs[child].name.span
                    )
                    self.bad.update(cycle)
                elif child not in on_path:
                    on_path[child] = True
                    path.append(child)
                    members.append(iter(self.nested(child)))

    def service_value(self, root: str) -> AddressSet | None:
        """A service's addresses: every address it reaches through nested services, merged
        once (only services asked for are kept, so nesting costs linear time and memory)."""
        if root in self.values:
            return self.values[root]
        # A service with `except` is a difference, which does not flatten into a parent's
        # union: those the root reaches are evaluated first, deepest first, and memoised.
        for name in self.except_services_below(root):
            if name not in self.values:
                self.values[name] = self.evaluate_service(name)
        value = self.evaluate_service(root)
        self.values[root] = value
        return value

    def except_services_below(self, root: str) -> list[str]:
        """Services with `except` nested under `root` (not root), in post-order."""
        order: list[str] = []
        seen = {root}
        path, members = [root], [iter(self.nested(root))]
        while path:
            child = next(members[-1], None)
            if child is None:
                name = path.pop()
                members.pop()
                if name != root and self.defs[name].excluded:
                    order.append(name)
            elif child not in seen and child not in self.bad:
                seen.add(child)
                path.append(child)
                members.append(iter(self.nested(child)))
        return order

    def evaluate_service(self, name: str) -> AddressSet | None:
        if name in self.bad:
            return None
        definition = self.defs[name]
        kept = self.flatten(definition.endpoints)
        if kept is None or not definition.excluded:
            return kept
        removed = self.flatten(definition.excluded)
        return None if removed is None else kept.difference(removed)

    def flatten(self, endpoints: tuple[ast.Endpoint, ...]) -> AddressSet | None:
        """The union of `endpoints`, through nested services without storing theirs (so a
        deep nesting costs linear time and memory); services with `except` are memoised."""
        intervals: list[Interval] = []
        seen: set[str] = set()
        todo = list(endpoints)
        while todo:
            ep = todo.pop()
            if isinstance(ep, ast.Address):
                intervals.append(parse_prefix(ep.text))
            elif ep.text == ANY:
                intervals.append((0, MAX_ADDRESS))
            elif ep.text in self.defs:
                if ep.text in self.bad:
                    return None
                if ep.text in seen:
                    continue
                seen.add(ep.text)
                known = self.values.get(ep.text)
                if known is not None:
                    intervals.extend(known.intervals)
                elif ep.text in self.values:  # memoised as failed
                    return None
                else:
                    todo.extend(self.defs[ep.text].endpoints)
            else:
                ip = self.inventory.hosts_by_name[ep.text].ip
                intervals.append((ip, ip))
        return AddressSet.of(intervals)

    def service_address_set(self, name: str) -> AddressSet:
        """The value of a service of a policy without errors (Service.addresses)."""
        value = self.service_value(name)
        assert value is not None, f"service {name} has errors"
        return value

    def nested(self, name: str) -> list[str]:
        definition = self.defs[name]
        return [
            ep.text
            for ep in definition.endpoints + definition.excluded
            if isinstance(ep, ast.Name) and ep.text in self.defs
        ]

    def resolve_set(
        self, include: tuple[ast.Endpoint, ...], exclude: tuple[ast.Endpoint, ...]
    ) -> AddressSet | None:
        """`include except exclude`: the addresses of the first list not in the second."""
        kept = self.resolve_endpoints(include)
        if not exclude:
            return kept
        removed = self.resolve_endpoints(exclude)
        return None if kept is None or removed is None else kept.difference(removed)

    def resolve_endpoints(self, endpoints: tuple[ast.Endpoint, ...]) -> AddressSet | None:
        if len(endpoints) == 1 and isinstance(endpoints[0], ast.Name):
            return self.resolve_name(endpoints[0])  # already merged: nothing to recompute
        intervals: list[Interval] = []
        ok = True
        for ep in endpoints:
            if isinstance(ep, ast.Address):
                try:
                    intervals.append(parse_prefix(ep.text))
                except AddressSyntaxError as exc:
                    self.fail("E201", f"invalid address: {exc}", ep.span)
                    ok = False
            else:
                value = self.resolve_name(ep)
                if value is None:
                    ok = False
                else:
                    intervals.extend(value.intervals)
        return AddressSet.of(intervals) if ok else None

    # -- values ----------------------------------------------------------------------------

    def ports(self, items: tuple[ast.PortItem, ...], proto: str) -> tuple[Interval, ...] | None:
        """A tcp/udp rule's ports: numbers, ranges and named port sets, merged."""
        out: list[Interval] = []
        ok = True
        for item in items:
            if isinstance(item, ast.IcmpType):
                self.fail("E208", f"ICMP types apply to icmp only, not {proto}", item.span)
                ok = False
                continue
            if isinstance(item, ast.PortName):
                named = self.port_set(item)
                ok = ok and named is not None
                out += named or ()
                continue
            hi = item.lo if item.hi is None else item.hi
            bad = [p for p in (item.lo, hi) if p > MAX_PORT]
            if bad:
                shown = bad[0] if bad[0] < TOO_MANY_DIGITS else "number"
                self.fail("E202", f"port {shown} is out of range 0-65535", item.span)
                ok = False
            elif hi < item.lo:
                self.fail(
                    "E203",
                    f"port range {item.lo}-{hi} is reversed (write {hi}-{item.lo})",
                    item.span,
                )
                ok = False
            else:
                out.append((item.lo, hi))
        return merge_intervals(out) if ok else None

    def port_set(self, ref: ast.PortName) -> tuple[Interval, ...] | None:
        if ref.text not in self.port_defs:
            close = difflib.get_close_matches(ref.text, list(self.port_defs), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            if not close and ref.text in ICMP_NAMES:
                hint = f" ('{ref.text}' is an ICMP type: write `icmp {ref.text}`)"
            hint = hint or _option_hint(ref.text)
            self.fail("E101", f"unknown port set '{ref.text}'{hint}", ref.span)
            return None
        return self.port_values[ref.text]

    def icmp_types(self, items: tuple[ast.PortItem, ...]) -> tuple[Interval, ...] | None:
        """An icmp rule's types and codes as intervals of ICMP type << 8 | code."""
        out: list[Interval] = []
        ok = True
        for item in items:
            if isinstance(item, ast.PortRange):
                self.fail(
                    "E208",
                    "ports apply to tcp and udp only, not icmp "
                    f"(an ICMP type is written `icmp type {item.lo}` or by name, `icmp echo-request`)",
                    item.span,
                )
                ok = False
                continue
            if isinstance(item, ast.PortName):
                known = ICMP_NAMES.get(item.text)
                if known is None:
                    close = difflib.get_close_matches(item.text, list(ICMP_NAMES), n=1, cutoff=0.6)
                    hint = f" (did you mean '{close[0]}'?)" if close else " (or write `type N`)"
                    if not close and item.text in self.port_defs:
                        hint = f" ('{item.text}' is a port set: ports apply to tcp and udp)"
                    elif not close:
                        hint = _option_hint(item.text) or hint
                    self.fail("E211", f"unknown ICMP type '{item.text}'{hint}", item.span)
                    ok = False
                    continue
                icmp_type, code = known
            else:
                icmp_type, code = item.type, item.code
                bad = [v for v in (icmp_type, code) if v is not None and v > 0xFF]
                if bad:
                    shown = bad[0] if bad[0] < TOO_MANY_DIGITS else "number"
                    what = "type" if bad[0] == icmp_type else "code"
                    self.fail("E211", f"ICMP {what} {shown} is out of range 0-255", item.span)
                    ok = False
                    continue
            if code is None:
                out.append((icmp_type << 8, icmp_type << 8 | 0xFF))
            else:
                out.append((icmp_type << 8 | code, icmp_type << 8 | code))
        return merge_intervals(out) if ok else None

    def protocol(self, number: int | None, span: Span) -> str | None:
        """`proto N` as a rule's protocol (`proto 132`), or None after an error."""
        problem = protocol_problem(number)
        if problem is not None:
            self.fail("E210", problem, span)
            return None
        return f"proto {number}"

    def rate(self, opt: ast.RateOption) -> int | None:
        m = _RATE.match(opt.value)
        if not m:
            self.fail("E204", f"rate {quote(opt.value)} {_rate_problem(opt.value)}", opt.value_span)
            return None
        pps = float(m["n"]) * _RATE_UNITS[m["unit"]]
        if pps != int(pps) or not 1 <= pps <= MAX_RATE_PPS:
            self.fail(
                "E204",
                f"rate {quote(opt.value)} must be a whole number of packets/s from 1 to 1000mpps",
                opt.value_span,
            )
            return None
        return int(pps)

    def duration(self, opt: ast.ForOption) -> int | None:
        seconds = parse_duration(opt.value)
        if isinstance(seconds, str):
            self.fail("E205", seconds, opt.value_span)
            return None
        return seconds

    def window(self, opt: ast.DuringOption) -> TimeWindow | None:
        minutes = []
        for text in (opt.start, opt.end):
            clock = _CLOCK.match(text)
            if not clock or not (int(clock["h"]) <= 23 and int(clock["m"]) <= 59):
                self.fail(
                    "E206", f"{quote(text)} is not a time of day HH:MM (00:00 to 23:59)", opt.span
                )
                return None
            minutes.append(int(clock["h"]) * 60 + int(clock["m"]))
        if minutes[0] == minutes[1]:
            self.fail("E206", f"time window {opt.start}-{opt.end} is empty", opt.span)
            return None
        days = self.days(opt)
        if days is None:
            return None
        if opt.zone is None:
            self.fail(
                "E206",
                f"time window {opt.start}-{opt.end} needs a time zone, e.g. `UTC` or `Europe/London`",
                opt.span,
            )
            return None
        problem = _zone_problem(opt.zone)
        if problem:
            self.fail("E206", problem, opt.span)
            return None
        offset = _fixed_offset(opt.zone)
        if offset is not None:
            place = _DAYLIGHT_PLACES.get(opt.zone, "America/New_York")
            self.warnings.append(
                warning(
                    "W004",
                    f"time zone '{opt.zone}' is UTC{offset} all year: the window does not move "
                    f"with daylight saving time (name a place, e.g. {place}, if it should)",
                    opt.span,
                )
            )
        return TimeWindow(minutes[0], minutes[1], opt.zone, days)

    def days(self, opt: ast.DuringOption) -> frozenset[int] | None:
        """The days of a window; a range may wrap around the week (`Fri-Mon`)."""
        if not opt.days:
            return EVERY_DAY
        days: set[int] = set()
        for item in opt.days:
            wrong = [d for d in (item.first, item.last) if d is not None and d not in DAY_NAMES]
            if wrong:
                self.fail(
                    "E206",
                    f"'{wrong[0]}' is not a day: write {wrong[0][:3].capitalize()} "
                    "(days are Mon, Tue, Wed, Thu, Fri, Sat, Sun)",
                    item.span,
                )
                return None
            first = DAY_NAMES.index(item.first)
            if item.last is None:
                days.add(first)
                continue
            if item.last == item.first:
                self.fail(
                    "E206",
                    f"day range {item.first}-{item.last} is one day: write {item.first}",
                    item.span,
                )
                return None
            last = DAY_NAMES.index(item.last)
            days.update(d % 7 for d in range(first, first + (last - first) % 7 + 1))
        return frozenset(days)

    # -- statements ------------------------------------------------------------------------

    def check_options(
        self, options: tuple[ast.Option, ...], action: str, proto: str, default: bool
    ) -> bool:
        ok = True
        seen: dict[type, ast.Option] = {}
        for opt in options:
            kind = ast.OPTION_KEYWORD[type(opt)]
            if type(opt) in seen:
                self.fail(
                    "E209",
                    f"option `{kind}` is given twice",
                    opt.span,
                    Note("first here", seen[type(opt)].span),
                )
                ok = False
                continue
            seen[type(opt)] = opt
            problem = _option_problem(opt, action, proto, default)
            if problem:
                self.fail("E207", problem, opt.span)
                ok = False
        return ok

    def check_rule_names(self, rule_stmts: list[ast.Rule]) -> None:
        """Rule names: unique in the file (E105), and well formed (E106)."""
        first: dict[str, ast.Name] = {}
        for stmt in rule_stmts:
            for opt in stmt.options:
                if not isinstance(opt, ast.NameOption):
                    continue
                name = opt.name
                problem = _rule_name_problem(name.text)
                if problem:
                    self.fail("E106", problem, name.span)
                elif name.text in first:
                    self.fail(
                        "E105",
                        f"rule name '{name.text}' is used twice",
                        name.span,
                        Note("first used here", first[name.text].span),
                    )
                else:
                    first[name.text] = name
                break  # a second `name` on one rule is E209

    def rule(self, stmt: ast.Rule, rule_id: int) -> PolicyRule | None:
        src = self.resolve_set(stmt.src, stmt.src_except)
        dst = self.resolve_set(stmt.dst, stmt.dst_except)
        proto: str | None = stmt.proto.proto if stmt.proto else "ip"
        ports: tuple[Interval, ...] | None = ALL_PORTS
        if stmt.proto and stmt.proto.proto == "proto":
            proto = self.protocol(stmt.proto.number, stmt.proto.span)
        elif stmt.proto and stmt.proto.ports:
            if proto == "icmp":
                ports = self.icmp_types(stmt.proto.ports)
            elif proto not in PORT_PROTOCOLS:
                self.fail("E208", f"ports apply to tcp and udp only, not {proto}", stmt.proto.span)
                ports = None
            else:
                ports = self.ports(stmt.proto.ports, stmt.proto.proto)
        if proto is None:
            return None
        ok = self.check_options(stmt.options, stmt.action, proto, default=False)
        rate = duration = None
        window = None
        for opt in stmt.options:
            if isinstance(opt, ast.RateOption):
                rate = self.rate(opt)
                ok = ok and rate is not None
            elif isinstance(opt, ast.ForOption):
                duration = self.duration(opt)
                ok = ok and duration is not None
            elif isinstance(opt, ast.DuringOption):
                window = self.window(opt)
                ok = ok and window is not None
        if src is None or dst is None or ports is None or not ok:
            return None
        name = next((o.name.text for o in stmt.options if isinstance(o, ast.NameOption)), None)
        return PolicyRule(
            id=rule_id,
            position=rule_id,
            name=name,
            action=Action(stmt.action),
            src=src,
            dst=dst,
            src_text=_endpoints_text(stmt.src, stmt.src_except),
            dst_text=_endpoints_text(stmt.dst, stmt.dst_except),
            proto=proto,
            ports=ports,
            log=any(isinstance(o, ast.LogOption) for o in stmt.options),
            reply=any(isinstance(o, ast.ReplyOption) for o in stmt.options),
            rate_pps=rate,
            duration_s=duration,
            window=window,
            span=stmt.span,
        )

    def expect(self, stmt: ast.Expect) -> ExpectCase | None:
        src = self.resolve_set(stmt.src, stmt.src_except)
        dst = self.resolve_set(stmt.dst, stmt.dst_except)
        ok = True
        proto: str | None = stmt.proto
        port = stmt.port
        icmp_types: tuple[Interval, ...] | None = ()
        if stmt.icmp is not None and stmt.proto == "icmp":
            icmp_types = self.icmp_types((stmt.icmp,))
            ok = icmp_types is not None
        elif isinstance(stmt.icmp, ast.IcmpType):
            self.fail("E208", f"ICMP types apply to icmp only, not {stmt.proto}", stmt.icmp.span)
            ok = False
        elif stmt.icmp is not None:
            problem = (
                f"an expectation names one port, not a port set: e.g. `{stmt.proto} 443`"
                if stmt.proto in PORT_PROTOCOLS
                else f"ports apply to tcp and udp only, not {stmt.proto}"
            )
            self.fail("E208", problem, stmt.icmp.span)
            ok = False
        elif stmt.proto == "proto":
            proto, port = self.protocol(stmt.port, stmt.port_span or stmt.proto_span), None
            ok = proto is not None
        elif stmt.proto in PORT_PROTOCOLS and stmt.port is None:
            self.fail(
                "E208",
                f"an expectation over {stmt.proto} needs a port, e.g. `{stmt.proto} 443`",
                stmt.proto_span,
            )
            ok = False
        elif stmt.proto not in PORT_PROTOCOLS and stmt.port is not None:
            hint = (
                f" (an ICMP type is written `icmp type {stmt.port}`)"
                if stmt.proto == "icmp"
                else ""
            )
            problem = f"ports apply to tcp and udp only, not {stmt.proto}{hint}"
            self.fail("E208", problem, stmt.port_span)
            ok = False
        elif stmt.port is not None and stmt.port > MAX_PORT:
            shown = stmt.port if stmt.port < TOO_MANY_DIGITS else "number"
            self.fail("E202", f"port {shown} is out of range 0-65535", stmt.port_span)
            ok = False
        if src is None or dst is None or proto is None or icmp_types is None or not ok:
            return None
        return ExpectCase(
            src,
            dst,
            _endpoints_text(stmt.src, stmt.src_except),
            _endpoints_text(stmt.dst, stmt.dst_except),
            proto,
            port,
            stmt.verdict == "allowed",
            stmt.span,
            icmp_types,
        )

    # -- signals, containment, protection -------------------------------------------------

    def signals(self) -> list[SignalRule]:
        out: list[SignalRule] = []
        first: dict[str, ast.SignalDecl] = {}
        for stmt in self.tree.statements:
            if not isinstance(stmt, ast.SignalDecl):
                continue
            name = stmt.name.text
            if name == HEALTHY:
                self.fail(
                    "E104",
                    f"`{HEALTHY}` is built in (it clears what its source said about a host) "
                    "and cannot be declared",
                    stmt.name.span,
                )
                continue
            if name in first:
                self.fail(
                    "E102",
                    f"signal '{name}' is defined twice",
                    stmt.name.span,
                    Note("first defined here", first[name].name.span),
                )
                continue
            first[name] = stmt
            profile = self.signal_profile(stmt)
            if profile is None:
                continue
            sources = tuple(dict.fromkeys(src.text for src in stmt.sources))
            out.append(SignalRule(name, sources, profile or None, stmt.span))
        return out

    def signal_profile(self, stmt: ast.SignalDecl) -> str | None:
        """The profile of a signal ('' for remediation only), or None after an error."""
        target = stmt.effect
        if not stmt.restrict:
            if target.text != REMEDIATION:
                hint = (
                    f" (did you mean `restrict {target.text}`?)" if target.text in self.defs else ""
                )
                self.fail(
                    "E108",
                    f"a signal leads to `{REMEDIATION}` or to `restrict PROFILE`, not "
                    f"{quote(target.text)}{hint}",
                    target.span,
                )
                return None
            if REMEDIATION not in self.defs:
                self.fail(
                    "E108",
                    f"`-> {REMEDIATION}` needs a service named `{REMEDIATION}` (what a "
                    "quarantined host may still reach): define it, even with a single address",
                    target.span,
                )
                return None
            return ""
        if target.text not in self.defs:
            if target.text in self.inventory.hosts_by_name or target.text == ANY:
                self.fail(
                    "E108",
                    f"the profile of `restrict` is a service, not {quote(target.text)}: "
                    f"define a service holding the flows a downgraded host keeps",
                    target.span,
                )
            else:
                close = difflib.get_close_matches(target.text, list(self.defs), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.fail(
                    "E101", f"unknown service {quote(target.text)} after `restrict`{hint}",
                    target.span,
                )  # fmt: skip
            return None
        if target.text in self.bad:
            return None
        if not self.service_address_set(target.text):
            self.fail(
                "E108",
                f"profile '{target.text}' has no addresses: a downgraded host keeps the flows "
                "every address of its profile has, so name at least one",
                target.span,
            )
            return None
        return target.text

    def containment(self) -> list[ContainRule]:
        out: list[ContainRule] = []
        for stmt in self.tree.statements:
            if not isinstance(stmt, ast.ContainDecl):
                continue
            src = (
                self.resolve_set(stmt.src, stmt.src_except) if stmt.src else AddressSet.everything()
            )
            ok = src is not None
            if not 1 <= stmt.denies <= MAX_CONTAIN_DENIES:
                shown = stmt.denies if stmt.denies < TOO_MANY_DIGITS else "number"
                self.fail(
                    "E212",
                    f"`after {shown} denies`: the count must be from 1 to {MAX_CONTAIN_DENIES}",
                    stmt.denies_span,
                )
                ok = False
            times: list[int] = []
            for text, span in (
                (stmt.within, stmt.within_span),
                (stmt.duration, stmt.duration_span),
            ):
                seconds = parse_duration(text)
                if isinstance(seconds, str):
                    self.fail("E205", seconds, span)
                    ok = False
                else:
                    times.append(seconds)
            if ok and src is not None:
                text = _endpoints_text(stmt.src, stmt.src_except)
                out.append(ContainRule(src, text, stmt.denies, times[0], times[1], stmt.span))
        return out

    def protections(self) -> list[Protection]:
        out: list[Protection] = []
        for stmt in self.tree.statements:
            if not isinstance(stmt, ast.ProtectDecl):
                continue
            hosts = self.resolve_set(stmt.hosts, stmt.hosts_except)
            ok = hosts is not None
            window = None
            seen: ast.Option | None = None
            for opt in stmt.options:
                if not isinstance(opt, ast.DuringOption):
                    kind = ast.OPTION_KEYWORD[type(opt)]
                    self.fail("E207", f"`protect` takes only `during`, not `{kind}`", opt.span)
                    ok = False
                elif seen is not None:
                    self.fail(
                        "E209", "option `during` is given twice", opt.span,
                        Note("first here", seen.span),
                    )  # fmt: skip
                    ok = False
                else:
                    seen = opt
                    window = self.window(opt)
                    ok = ok and window is not None
            if ok and hosts is not None:
                text = _endpoints_text(stmt.hosts, stmt.hosts_except)
                out.append(Protection(hosts, text, window, stmt.span))
        return out

    def run(self) -> Policy:
        statements = self.tree.statements
        headers = [s for s in statements if isinstance(s, ast.PolicyDecl)]
        if not headers:
            self.fail(
                "E010",
                "missing `policy NAME` header: start the file with e.g. `policy trading_floor`",
                Span.point(self.tree.file, 1, 1),
            )
        elif statements[0] is not headers[0]:
            self.fail("E010", "`policy NAME` must be the first statement", headers[0].span)
        for extra in headers[1:]:
            self.fail(
                "E011",
                "a file holds one policy: second `policy` header",
                extra.span,
                Note("first here", headers[0].span),
            )

        self.collect_services()
        self.collect_port_sets()
        self.check_services()
        services = [
            Service(name, definition.span, functools.partial(self.service_address_set, name))
            for name, definition in self.defs.items()
            if name not in self.bad
        ]

        definitions = tuple(s for s in statements if isinstance(s, ast.ServiceDef | ast.PortsDef))
        last = _RESOLUTIONS.get(self.tree.file)
        if last is not None and not last.holds(self.inventory, definitions):
            last = None
        if last is not None and not self.diags:  # the same services: the same sets
            self.values.update(last.values)
        rules: list[PolicyRule] = []
        made: dict[int, tuple[ast.Rule, int, PolicyRule, tuple[Diagnostic, ...]]] = {}
        rule_stmts = [s for s in statements if isinstance(s, ast.Rule)]
        self.check_rule_names(rule_stmts)
        for rule_id, rule_stmt in enumerate(rule_stmts, start=1):
            found = last.rules.get(id(rule_stmt)) if last is not None else None
            if found is not None and found[0] is rule_stmt and found[1] == rule_id:
                rules.append(found[2])
                self.warnings += found[3]
                made[id(rule_stmt)] = found
                continue
            diags, warned = len(self.diags), len(self.warnings)
            resolved = self.rule(rule_stmt, rule_id)
            if resolved is not None:
                rules.append(resolved)
                if len(self.diags) == diags:
                    made[id(rule_stmt)] = (
                        rule_stmt, rule_id, resolved, tuple(self.warnings[warned:])
                    )  # fmt: skip

        default_log, default_span = False, None
        defaults = [s for s in statements if isinstance(s, ast.DefaultDecl)]
        for extra_default in defaults[1:]:
            self.fail(
                "E012",
                "more than one `default` statement",
                extra_default.span,
                Note("first here", defaults[0].span),
            )
        if defaults:
            decl = defaults[0]
            default_span = decl.span
            if decl.action == "allow":
                self.fail(
                    "E013",
                    "p4seg is default deny: `default allow` would trust everything the rules do not name",
                    decl.action_span,
                )
            self.check_options(decl.options, decl.action, "ip", default=True)
            default_log = any(isinstance(o, ast.LogOption) for o in decl.options)

        expects = []
        expected: dict[int, tuple[ast.Expect, ExpectCase]] = {}
        for stmt in statements:
            if not isinstance(stmt, ast.Expect):
                continue
            known = last.expects.get(id(stmt)) if last is not None else None
            if known is not None and known[0] is stmt:  # the same line: the same object
                expects.append(known[1])
                expected[id(stmt)] = known
                continue
            diags = len(self.diags)
            if (case := self.expect(stmt)) is not None:
                expects.append(case)
                if len(self.diags) == diags:
                    expected[id(stmt)] = (stmt, case)
        containment = self.containment()
        logged = default_log or any(r.log for r in rules)
        for contain in containment if not logged else ():
            self.warnings.append(
                warning(
                    "W007",
                    "`contain` counts logged denies, and no rule logs any: it never triggers "
                    "(add `log` to a deny, or write `default deny log`)",
                    contain.span,
                )
            )
        keyed: dict[int, tuple[PolicyRule, PolicyRule]] = {}
        policy = Policy(
            name=headers[0].name.text if headers else "policy",
            file=self.tree.file,
            services=tuple(services),
            rules=with_keys(rules, keyed, last.keyed if last is not None else None),
            default_log=default_log,
            default_span=default_span,
            expects=tuple(expects),
            signals=tuple(self.signals()),
            containment=tuple(containment),
            protected=tuple(self.protections()),
        )
        if not self.diags:
            resolution = _Resolution(
                self.inventory, definitions, self.values, made, keyed, expected
            )  # fmt: skip
            _RESOLUTIONS.keep(self.tree.file, resolution)
        return policy

    def unused_services(self) -> list[Diagnostic]:
        edges = {name: _names_in(d.endpoints + d.excluded) for name, d in self.defs.items()}
        roots: set[str] = set()
        for stmt in self.tree.statements:
            if isinstance(stmt, ast.Rule | ast.Expect):
                roots |= _names_in(stmt.src + stmt.src_except + stmt.dst + stmt.dst_except)
            elif isinstance(stmt, ast.ContainDecl):
                roots |= _names_in(stmt.src + stmt.src_except)
            elif isinstance(stmt, ast.ProtectDecl):
                roots |= _names_in(stmt.hosts + stmt.hosts_except)
            elif isinstance(stmt, ast.SignalDecl):
                roots.add(stmt.effect.text)
        seen, todo = set(), [n for n in roots if n in edges]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(n for n in edges[name] if n in edges)
        port_sets_used = {
            item.text
            for stmt in self.tree.statements
            if isinstance(stmt, ast.Rule) and stmt.proto and stmt.proto.proto in PORT_PROTOCOLS
            for item in stmt.proto.ports
            if isinstance(item, ast.PortName)
        }
        return [
            warning("W003", f"service '{name}' is never used by a rule or expectation", d.name.span)
            for name, d in self.defs.items()
            if name not in seen
        ] + [
            warning("W003", f"port set '{name}' is never used by a rule", d.name.span)
            for name, d in self.port_defs.items()
            if name not in port_sets_used
        ]


def _rate_problem(text: str) -> str:
    """What is wrong with a rate that is not a number and one of the units."""
    shape = re.fullmatch(r"[0-9]+(?:\.[0-9]+)?(?P<unit>[A-Za-z]*)", text)
    unit = shape["unit"] if shape else ""
    units = "pps, kpps or mpps (packets per second)"
    if not unit:
        return f"needs a unit: {units}"
    if unit in _RATE_UNITS:
        return "must be a whole number of packets/s from 1 to 1000mpps"
    if unit.lower() in _RATE_UNITS:
        return f"has unit '{unit}': units are lower case, `{unit.lower()}`"
    if _BIT_OR_BYTE_RATE.fullmatch(unit):
        return (
            f"is a bit or byte rate: p4seg meters count packets, byte rates are not "
            f"supported yet; write {units}, e.g. 20kpps"
        )
    return f"has unknown unit {quote(unit)}: write {units}, e.g. 20kpps"


@functools.cache
def _iana_zones() -> frozenset[str]:
    """Zone names of the IANA database as the tzdata package lists them: the same on every
    host, unlike the host's zoneinfo folder (localtime, posixrules, right/...)."""
    listing = resources.files("tzdata").joinpath("zones").read_text(encoding="utf-8")
    return frozenset(line.strip() for line in listing.splitlines() if line.strip())


def _zone_problem(zone: str) -> str | None:
    """Why a time zone name is not usable in a window, or None."""
    zones = _iana_zones()
    if zone in zones:
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            return f"time zone '{zone}' cannot be loaded on this host"
        return None
    example = "UTC or America/New_York"
    if zone.upper() in _ABBREVIATIONS:
        return (
            f"unknown time zone {quote(zone)}: abbreviations are not zones "
            f"(for {zone.upper()} write {_ABBREVIATIONS[zone.upper()]})"
        )
    if zone in ("localtime", "posixrules") or zone.startswith(("right/", "posix/")):
        return (
            f"time zone {quote(zone)} is a file of this host's zoneinfo folder, not an IANA "
            f"zone: its meaning differs from host to host (use an IANA name such as {example})"
        )
    in_region = sorted(z for z in zones if z.startswith(zone + "/"))
    if in_region:
        region = next((z for z in _REGION_EXAMPLES if z in in_region), in_region[0])
        return f"time zone {quote(zone)} is a region, not a zone: name a city, e.g. {region}"
    close = difflib.get_close_matches(zone, zones, n=1, cutoff=0.8) if len(zone) <= 64 else []
    hint = f"did you mean '{close[0]}'?" if close else f"use an IANA name such as {example}"
    return f"unknown time zone {quote(zone)} ({hint})"


@functools.cache
def _fixed_offset(zone: str) -> str | None:
    """'-05:00' for a zone named for no place (EST, Etc/GMT+5) whose offset from UTC is
    the same all year and not zero, or None."""
    if "/" in zone and not zone.startswith("Etc/"):
        return None  # a place: its rules are that place's, daylight saving included
    tz = ZoneInfo(zone)
    offsets = {
        datetime(_REFERENCE_YEAR, month, 15, 12, tzinfo=UTC).astimezone(tz).utcoffset()
        for month in range(1, 13)
    }
    if len(offsets) != 1:
        return None
    offset = offsets.pop()
    if not offset:
        return None
    minutes = int(offset.total_seconds()) // 60
    return f"{'+' if minutes > 0 else '-'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


MAX_RULE_NAME = 64
_GENERATED_KEY = re.compile(r"^[0-9a-f]{16}$")


def _rule_name_problem(name: str) -> str | None:
    """What is wrong with a rule name, or None."""
    if len(name) > MAX_RULE_NAME:
        return f"rule name {quote(name)} is longer than {MAX_RULE_NAME} characters"
    if _GENERATED_KEY.match(name):
        return (
            f"rule name '{name}' has the form of a generated rule key (16 hex digits), "
            "which unnamed rules get; choose another name"
        )
    return None


def _option_problem(opt: ast.Option, action: str, proto: str, default: bool) -> str | None:
    if isinstance(opt, ast.NameOption) and not default:
        return None
    if default:
        if isinstance(opt, ast.LogOption):
            return None
        return f"`default deny` takes only `log`, not `{ast.OPTION_KEYWORD[type(opt)]}`"
    if isinstance(opt, ast.LogOption):
        if action == "allow":
            return "`log` applies to deny rules; allowed traffic is counted per rule instead"
    elif isinstance(opt, ast.ReplyOption):
        if action == "deny":
            return "`reply` applies to allow rules"
        if proto == "tcp":
            return "tcp replies are already allowed for established connections; `reply` is for udp"
        if proto != "udp":
            return f"`reply` is for udp rules, not {proto}"
    elif action == "deny":
        kind = ast.OPTION_KEYWORD[type(opt)]
        if isinstance(opt, ast.RateOption):
            return "`rate` limits allowed traffic; it does not apply to deny rules"
        return f"`{kind}` makes a rule time-bound; a deny that lapses would widen access, so denies are permanent"
    return None


def _option_hint(word: str) -> str:
    """' (did you mean the option `log`?)' for a misspelt option where a name was read."""
    options = list(ast.OPTION_KEYWORD.values())
    close = difflib.get_close_matches(word.lower(), options, n=1, cutoff=0.6)
    return f" (did you mean the option `{close[0]}`?)" if close else ""


def _endpoints_text(
    endpoints: tuple[ast.Endpoint, ...], excluded: tuple[ast.Endpoint, ...] = ()
) -> str:
    text = ", ".join(ep.text for ep in endpoints)
    return f"{text} except {', '.join(ep.text for ep in excluded)}" if excluded else text


def _names_in(endpoints: tuple[ast.Endpoint, ...]) -> set[str]:
    return {ep.text for ep in endpoints if isinstance(ep, ast.Name)}


def resolve(tree: ast.PolicyFile, inventory: Inventory | None = None) -> Resolved:
    """Resolve a parsed policy against an inventory; raise :class:`PolicyError` on any error."""
    resolver = _Resolver(tree, inventory or Inventory.empty())
    policy = resolver.run()
    warnings = resolver.warnings + resolver.unused_services()
    if resolver.diags:
        raise PolicyError(resolver.diags + warnings)
    return Resolved(policy, tuple(warnings), resolver)
