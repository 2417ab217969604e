"""The checked policy: what `resolve` produces and every later stage consumes.

Names are gone: services are address sets, rules are normalised (protocol, merged port
intervals, parsed options) and keep the span of the text that made them, so anything
downstream (alerts, traces, counterexamples) can say which line decided.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from compiler.addresses import AddressSet, Interval
from compiler.diagnostics import Span
from compiler.protocols import ICMP_ECHO_REQUEST_RANGE, MAX_PORT, PROTOCOL_NUMBERS

ALL_PORTS: tuple[Interval, ...] = ((0, MAX_PORT),)
REMEDIATION = "remediation"  # the service a quarantined host may still reach
HEALTHY = "healthy"  # the built-in signal that clears what its source said about a host
PORT_PROTOCOLS = ("tcp", "udp")
# The ICMP types (and a few codes) a rule may name: name -> (type, code or None: every code).
ICMP_NAMES: dict[str, tuple[int, int | None]] = {
    "echo-reply": (0, None),
    "dest-unreachable": (3, None),
    "net-unreachable": (3, 0),
    "host-unreachable": (3, 1),
    "protocol-unreachable": (3, 2),
    "port-unreachable": (3, 3),
    "frag-needed": (3, 4),
    "source-quench": (4, None),
    "redirect": (5, None),
    "echo-request": (8, None),
    "router-advertisement": (9, None),
    "router-solicitation": (10, None),
    "time-exceeded": (11, None),
    "parameter-problem": (12, None),
    "timestamp-request": (13, None),
    "timestamp-reply": (14, None),
}
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # datetime.weekday() order
EVERY_DAY = frozenset(range(7))


def protocol_number(proto: str) -> int | None:
    """The IP protocol number a rule's `proto` matches (`tcp`, ..., `proto 132`); None: `ip`."""
    if proto.startswith("proto "):
        return int(proto[6:])
    return PROTOCOL_NUMBERS.get(proto)


def format_duration(seconds: int) -> str:
    """A duration in the largest unit that divides it (`900` -> `15m`), as a policy writes it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_days(days: frozenset[int]) -> str:
    """Days as written in a window: runs become ranges (`Mon-Fri`, wrapping as `Fri-Mon`)."""
    if days == EVERY_DAY:
        return ""
    runs: list[list[int]] = []
    for d in sorted(days):
        if runs and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    if len(runs) > 1 and runs[0][0] == 0 and runs[-1][-1] == 6:  # Sun runs on into Mon
        runs[0] = runs.pop() + runs[0]
    return ",".join(
        DAY_NAMES[r[0]] if len(r) == 1 else f"{DAY_NAMES[r[0]]}-{DAY_NAMES[r[-1]]}" for r in runs
    )


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Window [start, end) in minutes after midnight, wall-clock time in `zone`, on `days`
    (0 = Monday); end < start runs over midnight, and belongs to the day it starts."""

    start: int
    end: int
    zone: str
    days: frozenset[int] = EVERY_DAY

    def __str__(self) -> str:
        def hhmm(m: int) -> str:
            return f"{m // 60:02d}:{m % 60:02d}"

        days = format_days(self.days)
        return f"{hhmm(self.start)}-{hhmm(self.end)} {days + ' ' if days else ''}{self.zone}"

    def active_at(self, unix_time: float) -> bool:
        """Whether the window is in force at this instant."""
        local = dt.datetime.fromtimestamp(unix_time, ZoneInfo(self.zone))
        minute, day = local.hour * 60 + local.minute, local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Over midnight: the part after midnight belongs to the day before.
        return (minute >= self.start and day in self.days) or (
            minute < self.end and (day - 1) % 7 in self.days
        )

    def next_edge(self, unix_time: float) -> float | None:
        """The first instant after `unix_time` at which `active_at` changes, or None."""
        zone = ZoneInfo(self.zone)
        local = dt.datetime.fromtimestamp(unix_time, zone)
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
        now = self.active_at(unix_time)
        edges = sorted(
            t
            for day in range(-1, 9)  # a week and a day each side covers every pattern
            for minute in (self.start, self.end)
            if (t := (midnight + dt.timedelta(days=day, minutes=minute)).timestamp()) > unix_time
        )
        return next((t for t in edges if self.active_at(t) != now), None)


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
    """One allow/deny rule.

    `id` is the stable rule id (1..0xFFFE; 0 is the default deny, 0xFFFF the fabric's
    permit): what entries, counters and alerts carry. It equals `position` until
    compiler.allocation.assign_rule_ids maps `key` to the id an earlier compile gave it.
    `key` names the rule across versions: its `name`, else a hash of `describe()` (plus
    `#n` for the n-th copy of the same text). `position` (1-based file order) is for
    display only; no decision depends on it.
    """

    id: int
    action: Action
    src: AddressSet
    dst: AddressSet
    src_text: str  # as written, for messages
    dst_text: str
    proto: str  # tcp | udp | icmp | ip | "proto N" (one IP protocol number, no ports)
    # merged; ALL_PORTS when none given; for icmp, ICMP type << 8 | code intervals
    ports: tuple[Interval, ...]
    log: bool
    reply: bool
    rate_pps: int | None
    duration_s: int | None
    window: TimeWindow | None
    span: Span
    key: str = ""
    position: int = 0
    name: str | None = None  # `name NAME` as written
    # The hash, once made: a policy's rules are hashed as a whole by the memos that find
    # its semantics again, and hashing 10,000 rules field by field cost 40 ms each time.
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __hash__(self) -> int:
        h = self._hash
        if not h:  # of fields __eq__ compares: equal rules hash alike
            h = hash((self.id, self.key, self.action, self.proto, self.ports, self.src_text,
                      self.dst_text, self.span)) or 1  # fmt: skip
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def label(self) -> str:
        """How messages point at the rule for people: its name, else its line."""
        return f"rule {self.name}" if self.name else f"the rule at line {self.span.line}"

    @property
    def answers_pings(self) -> bool:
        """Whether the rule's flows include ICMP echo requests (so echo replies answer it)."""
        if self.proto not in ("icmp", "ip"):
            return False
        lo, hi = ICMP_ECHO_REQUEST_RANGE
        return any(a <= hi and lo <= b for a, b in self.ports)

    @property
    def is_time_bound(self) -> bool:
        return self.duration_s is not None or self.window is not None

    def describe(self) -> str:
        """The rule in policy syntax, normalised (for messages and reports)."""
        parts = [self.action.value, self.src_text, "->", self.dst_text]
        if self.proto != "ip" or self.ports != ALL_PORTS:
            parts.append(self.proto)
        if self.ports != ALL_PORTS:
            parts.append(
                format_icmp_types(self.ports) if self.proto == "icmp" else format_ports(self.ports)
            )
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
    proto: str  # tcp | udp | icmp | ip | "proto N" (then `port` is None)
    port: int | None
    allowed: bool
    span: Span
    # icmp: the type (and code) named, as type << 8 | code intervals; () for a ping
    icmp_types: tuple[Interval, ...] = ()

    def describe(self) -> str:
        port = f" {self.port}" if self.port is not None else ""
        if self.icmp_types:
            port = f" {format_icmp_types(self.icmp_types)}"
        verdict = "allowed" if self.allowed else "denied"
        return f"{self.src_text} -> {self.dst_text} {self.proto}{port} {verdict}"


@dataclass(frozen=True, slots=True)
class SignalRule:
    """`signal NAME from SOURCE, ... -> remediation | restrict PROFILE`: a host with the
    signal is quarantined (reaches only `remediation`), or keeps only the flows it had that
    every address of the service PROFILE also has (`profile`)."""

    name: str
    sources: tuple[str, ...]
    profile: str | None  # None: remediation only
    span: Span

    def describe(self) -> str:
        effect = REMEDIATION if self.profile is None else f"restrict {self.profile}"
        return f"signal {self.name} from {', '.join(self.sources)} -> {effect}"


@dataclass(frozen=True, slots=True)
class ContainRule:
    """`contain [SOURCES] after N denies within T for D`: a source address of `src` that
    hits `denies` logged denies within `within_s` seconds is quarantined for `for_s`."""

    src: AddressSet
    src_text: str  # "": every source
    denies: int
    within_s: int
    for_s: int
    span: Span

    def describe(self) -> str:
        scope = f" {self.src_text}" if self.src_text else ""
        return (
            f"contain{scope} after {self.denies} denies within "
            f"{format_duration(self.within_s)} for {format_duration(self.for_s)}"
        )


@dataclass(frozen=True, slots=True)
class Protection:
    """`protect HOSTS [during WINDOW]`: never contained automatically (while the window is
    open; always without one): containment and signals only alert."""

    hosts: AddressSet
    hosts_text: str
    window: TimeWindow | None
    span: Span

    def active_at(self, unix_time: float) -> bool:
        return self.window is None or self.window.active_at(unix_time)

    def describe(self) -> str:
        return f"protect {self.hosts_text}" + (f" during {self.window}" if self.window else "")


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Hosts cut off by `p4seg quarantine`: the rules are carved for the semantics (each
    allow loses the hosts, their flows with `remediation` come back as added rules), while
    the switches keep the uncarved rules and cut the hosts off with an overlay on their own
    ToRs (compiler.lower). `uncarved`: each carved rule's key -> its sets before the carve;
    `added`: the keys of the rules the carve added."""

    hosts: tuple[int, ...]  # addresses, sorted
    remediation: AddressSet
    uncarved: tuple[PolicyRule, ...]
    added: frozenset[str]


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    file: str
    services: tuple[Service, ...]
    rules: tuple[PolicyRule, ...]
    default_log: bool
    default_span: Span | None
    expects: tuple[ExpectCase, ...]
    quarantine: Quarantine | None = None  # set by runtime.live.effective_policy
    signals: tuple[SignalRule, ...] = ()
    containment: tuple[ContainRule, ...] = ()
    protected: tuple[Protection, ...] = ()

    _by_id: dict[int, PolicyRule] = field(init=False, repr=False, compare=False)
    _uncarved: list[Policy] = field(init=False, repr=False, compare=False)  # made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {r.id: r for r in self.rules})
        object.__setattr__(self, "_uncarved", [])

    def automatic(self) -> list[SignalRule | ContainRule | Protection]:
        """The statements that change access without an operator, in that order: signals,
        containment, protected hosts."""
        return [*self.signals, *self.containment, *self.protected]

    def rule(self, rule_id: int) -> PolicyRule | None:
        """The rule with this (stable) rule id, or None."""
        return self._by_id.get(rule_id)

    def remediation(self) -> AddressSet | None:
        """The addresses of the `remediation` service (what a quarantined host may still
        reach), or None if the policy has no such service."""
        return next((s.addresses for s in self.services if s.name == REMEDIATION), None)

    def uncarved(self) -> Policy:
        """The policy the switches' ordinary entries hold: a quarantine's carve undone (the
        rules it added dropped, the others' sets restored; ids kept), no quarantine."""
        q = self.quarantine
        if q is None:
            return self
        if self._uncarved:  # asked by the proof, the schedule, the kept build: made once
            return self._uncarved[0]
        before = {r.key: r for r in q.uncarved}

        def restored(r: PolicyRule) -> PolicyRule:
            # The carve changed the sets alone, `assign_rule_ids` perhaps the id since.
            was = before.get(r.key)
            if was is None:
                return r
            return was if was.id == r.id else dataclasses.replace(r, src=was.src, dst=was.dst)

        rules = tuple(restored(r) for r in self.rules if r.key not in q.added)
        self._uncarved.append(dataclasses.replace(self, rules=rules, quarantine=None))
        return self._uncarved[0]


def text_key(text: str) -> str:
    """The key of an unnamed rule: a hash of its normalised text (`PolicyRule.describe`)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def with_keys(
    rules: Sequence[PolicyRule],
    made: dict[int, tuple[PolicyRule, PolicyRule]] | None = None,
    kept: Mapping[int, tuple[PolicyRule, PolicyRule]] | None = None,
) -> tuple[PolicyRule, ...]:
    """`rules` with their keys: the name, else the hash of the text, `#n` on its n-th copy.

    Everything `describe` shows is in the key, so editing a rule (a port, `log`, a rate)
    makes it a new rule with a new id; give it a `name` to keep its id through edits.

    `kept` (by id of a rule before its key: (that rule, it keyed)) is what an earlier call
    made: a rule found there with the same key is that same object again; `made` receives
    this call's, to be kept for the next (compiler.resolve).
    """
    seen: dict[str, int] = {}
    out = []
    for r in rules:
        found = kept.get(id(r)) if kept is not None else None
        if found is not None and found[0] is r:
            before = found[1].key
            base = before.partition("#")[0] if r.name is None else r.name
        else:
            found, base = None, r.name if r.name is not None else text_key(r.describe())
        seen[base] = n = seen.get(base, 0) + 1
        key = base if n == 1 else f"{base}#{n}"
        keyed = found[1] if found is not None and found[1].key == key else None
        if keyed is None:
            keyed = dataclasses.replace(r, key=key)
        if made is not None:
            made[id(r)] = (r, keyed)
        out.append(keyed)
    return tuple(out)


def format_ports(ports: tuple[Interval, ...]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


def format_icmp_types(ports: tuple[Interval, ...]) -> str:
    """ICMP type/code intervals in policy syntax (`echo-request`, `type 3 code 4`)."""
    names = {v: k for k, v in ICMP_NAMES.items()}
    out = []
    for lo, hi in ports:
        for t in range(lo >> 8, (hi >> 8) + 1):
            first, last = max(lo, t << 8), min(hi, t << 8 | 0xFF)
            if (first, last) == (t << 8, t << 8 | 0xFF):
                out.append(names.get((t, None), f"type {t}"))
            else:
                out += [
                    names.get((t, c & 0xFF), f"type {t} code {c & 0xFF}")
                    for c in range(first, last + 1)
                ]
    return ", ".join(out)
