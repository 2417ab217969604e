"""The policy engine: posture signals and automatic containment, turned into decisions.

A pure, typed state machine over what the policy says (`signal`, `contain` and `protect`
statements, docs/language.md 3.8). Its inputs are typed values with their own time —
:class:`Signal` (an EDR or identity provider about a host) and the logged-deny
:class:`~runtime.alerts.Alert` of the switches — and a clock passed in (`tick(now)`);
its outputs are typed decisions for the controller to carry out:

    Quarantine(host, reason, until)          cut the host off: only `remediation` remains
    Restrict(host, profiles, reason, until)  keep only the flows its profiles also have
    Unrestrict(host, reason)                 the restriction is over
    Release(host, reason)                    the quarantine is over
    AlertOnly(host, why, reason)             would have acted, did not (protected, ...)
    WouldContain(host, action, reason, until) dry run: what would have been done

It does no I/O and reads no clock: the same inputs give the same decisions, so it is
tested without sleeping, and its state is a JSON document (`to_json`/`from_json`) that the
service keeps in its state directory.

Each host carries *holds*: one per signal name and source (refreshed by the same signal,
cleared by `healthy` from that source or by its TTL), and one per containment (for the
`contain` duration). A host's posture is the union of its active holds: quarantined if
any hold quarantines it, restricted to every profile its restricting holds name. While a
`protect` statement covers the host, its posture is normal: the engine only alerts, and a
hold that outlives the protection takes effect when the protection ends.

Containment counts logged denies per source address in a sliding window: the timestamps
of its last N denies (N the largest `after N denies`), for at most `max_sources` sources;
past that the source whose last deny is oldest is forgotten first (`evicted` counts them),
so a flood of spoofed-looking sources cannot grow the state without bound. Only `deny`
alerts count: a `spoof` alert's source is an address its port does not own.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from compiler.addresses import AddressSet, AddressSyntaxError, parse_ipv4
from compiler.model import (
    HEALTHY,
    ContainRule,
    Policy,
    Protection,
    SignalRule,
    format_duration,
)
from runtime.alerts import Alert

DEFAULT_MAX_SOURCES = 4096
STATE_VERSION = 1


class SignalError(ValueError):
    """A signal the policy does not accept (unknown name, source or host; bad TTL)."""


@dataclass(frozen=True, slots=True)
class Signal:
    """`name` about `host` from `source` at `at` (UNIX time); `ttl` seconds (None: until
    `healthy` from the same source)."""

    host: str
    name: str
    source: str
    ttl: float | None
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Quarantine:
    host: str
    reason: str
    until: float | None  # None: until released


@dataclass(frozen=True, slots=True)
class Restrict:
    host: str
    profiles: tuple[str, ...]  # the host keeps the flows every one of them has
    reason: str
    until: float | None


@dataclass(frozen=True, slots=True)
class Unrestrict:
    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class Release:
    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class AlertOnly:
    host: str  # a host name, or the address of a source that is no inventory host
    why: str
    reason: str


@dataclass(frozen=True, slots=True)
class WouldContain:
    host: str
    action: str  # "quarantine" | "restrict PROFILE, ..."
    reason: str
    until: float | None


Decision = Quarantine | Restrict | Unrestrict | Release | AlertOnly | WouldContain


def decision_json(decision: Decision) -> dict[str, object]:
    """A decision as JSON (for the audit log and the API): its kind and its fields."""
    return {"decision": type(decision).__name__, **dataclasses.asdict(decision)}


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """What the policy says about signals and containment, with the inventory's hosts."""

    signals: tuple[SignalRule, ...]
    containment: tuple[ContainRule, ...]
    protected: tuple[Protection, ...]
    hosts: Mapping[str, int]  # host name -> address
    remediation: AddressSet
    names: Mapping[int, str] = field(init=False, repr=False, compare=False)  # address -> host

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", {ip: name for name, ip in self.hosts.items()})

    @classmethod
    def of(cls, policy: Policy, hosts: Mapping[str, int]) -> EngineSettings:
        return cls(
            policy.signals,
            policy.containment,
            policy.protected,
            dict(hosts),
            policy.remediation() or AddressSet(()),
        )

    def signal(self, name: str) -> SignalRule | None:
        return next((s for s in self.signals if s.name == name), None)

    @property
    def window_size(self) -> int:
        """Timestamps kept per source: the largest count of any `contain`."""
        return max((c.denies for c in self.containment), default=0)


@dataclass(frozen=True, slots=True)
class Hold:
    """One reason a host is held: a signal (`origin` "signal", `key` "SOURCE NAME") or a
    containment (`origin` "contain", `key` its statement)."""

    origin: str
    key: str
    profile: str | None  # None: quarantine; else restrict to this profile
    reason: str
    since: float
    until: float | None

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until


@dataclass(frozen=True, slots=True)
class Posture:
    """What a host is held to: quarantined, restricted to profiles, or neither."""

    quarantined: bool = False
    quarantine_until: float | None = None
    profiles: tuple[str, ...] = ()
    restrict_until: float | None = None


_NORMAL = Posture()


def _last(untils: Sequence[float | None]) -> float | None:
    """When the last of several holds lapses (None if one never does)."""
    return None if any(u is None for u in untils) else max(u for u in untils if u is not None)


@dataclass
class PolicyEngine:
    """See the module docstring. `dry_run`: decide, but report WouldContain instead of
    Quarantine/Restrict (and no releases: nothing was done)."""

    settings: EngineSettings
    dry_run: bool = False
    max_sources: int = DEFAULT_MAX_SOURCES
    holds: dict[str, dict[str, Hold]] = field(default_factory=dict)  # host -> key -> hold
    windows: OrderedDict[str, list[float]] = field(default_factory=OrderedDict)
    applied: dict[str, Posture] = field(default_factory=dict)  # host -> last decided
    evicted: int = 0

    # -- inputs --------------------------------------------------------------------------

    def signal(self, signal: Signal) -> list[Decision]:
        """Record a signal about a host; raises SignalError for one the policy refuses."""
        if signal.host not in self.settings.hosts:
            known = ", ".join(sorted(self.settings.hosts)) or "none"
            raise SignalError(f"no host {signal.host!r} in the inventory (hosts: {known})")
        if signal.ttl is not None and not signal.ttl > 0:
            raise SignalError(f"ttl must be positive, got {signal.ttl}")
        sources = {s for rule in self.settings.signals for s in rule.sources}
        if signal.name == HEALTHY:
            if signal.source not in sources:
                raise SignalError(
                    f"no signal of the policy comes from {signal.source!r} "
                    f"(sources: {', '.join(sorted(sources)) or 'none'})"
                )
            held = self.holds.get(signal.host, {})
            cleared = [
                k for k, h in held.items() if h.origin == "signal" and _source(k) == signal.source
            ]
            for k in cleared:
                del held[k]
            why = f"{HEALTHY} from {signal.source}" + (
                f": {signal.reason}" if signal.reason else ""
            )
            return self._settle(signal.host, signal.at, why)
        rule = self.settings.signal(signal.name)
        if rule is None:
            declared = ", ".join(s.name for s in self.settings.signals) or "none"
            raise SignalError(
                f"the policy declares no signal {signal.name!r} (declared: {declared}; "
                f"`{HEALTHY}` clears a source's signals)"
            )
        if signal.source not in rule.sources:
            raise SignalError(
                f"signal {signal.name!r} is accepted from {', '.join(rule.sources)}, "
                f"not from {signal.source!r} (line {rule.span.line})"
            )
        until = None if signal.ttl is None else signal.at + signal.ttl
        reason = f"signal {signal.name} from {signal.source}" + (
            f": {signal.reason}" if signal.reason else ""
        )
        hold = Hold(
            "signal", f"{signal.source} {signal.name}", rule.profile, reason, signal.at, until
        )
        self.holds.setdefault(signal.host, {})[hold.key] = hold
        return self._settle(signal.host, signal.at, reason, fresh=hold)

    def observe(self, alert: Alert, at: float) -> list[Decision]:
        """Count one logged deny (and the denies the alert rate limit suppressed before it,
        counted at `at`); contain its source if a `contain` threshold is reached."""
        if alert.kind != "deny" or not self.settings.containment:
            return []
        try:
            address = parse_ipv4(alert.src)
        except AddressSyntaxError:
            return []  # not an IPv4 packet: no source to count
        rules = [c for c in self.settings.containment if address in c.src]
        if not rules:
            return []
        host = self.settings.names.get(address)
        if host is not None and any(
            h.origin == "contain" and h.active(at) for h in self.holds.get(host, {}).values()
        ):
            return []  # contained already: its denies are what containment is for
        times = self._window(alert.src)
        for _ in range(min(1 + alert.suppressed, self.settings.window_size)):
            bisect.insort(times, at)  # alerts of several switches may arrive out of order
        del times[: max(0, len(times) - self.settings.window_size)]
        hit = [c for c in rules if _dense(times, c.denies, c.within_s)]
        if not hit:
            return []
        rule = max(hit, key=lambda c: c.for_s)
        del self.windows[alert.src]
        reason = (
            f"{rule.denies} logged denies within {format_duration(rule.within_s)} "
            f"(line {rule.span.line}: {rule.describe()}); last: {alert.proto} to {alert.dst}"
            + (f" port {alert.dport}" if alert.proto in ("tcp", "udp") else "")
        )
        if host is None:
            return [AlertOnly(alert.src, "not an inventory host: nothing to quarantine", reason)]
        hold = Hold("contain", rule.describe(), None, reason, at, at + rule.for_s)
        self.holds.setdefault(host, {})[hold.key] = hold
        return self._settle(host, at, reason, fresh=hold)

    def tick(self, now: float) -> list[Decision]:
        """Holds past their TTL lapse, protection windows open or close: the decisions
        that follow at `now`. Also forgets windows no `contain` can still count."""
        out: list[Decision] = []
        for host in sorted(set(self.holds) | set(self.applied)):
            held = self.holds.get(host, {})
            lapsed = []
            for key, hold in list(held.items()):
                if not hold.active(now):
                    lapsed.append(f"lapsed: {hold.reason}")
                elif hold.origin == "signal" and self.settings.signal(_name(key)) is None:
                    lapsed.append(f"no longer in the policy: {hold.reason}")
                else:
                    continue
                del held[key]
            out += self._settle(host, now, "; ".join(lapsed) or "protection window changed")
        longest = max((c.within_s for c in self.settings.containment), default=0)
        for src in [s for s, t in self.windows.items() if not t or t[-1] < now - longest]:
            del self.windows[src]
        return out

    def next_change(self, now: float) -> float | None:
        """The next moment `tick` may decide something: a hold lapsing, or a protection
        window of a held host opening or closing; None if nothing is due."""
        moments: list[float] = []
        for host, held in self.holds.items():
            active = [h for h in held.values() if h.active(now)]
            moments += [h.until for h in active if h.until is not None]
            if active:
                moments += [
                    edge
                    for p in self._protections(host)
                    if p.window is not None and (edge := p.window.next_edge(now)) is not None
                ]
        return min(moments, default=None)

    # -- decisions -----------------------------------------------------------------------

    def _window(self, src: str) -> list[float]:
        if src in self.windows:
            self.windows.move_to_end(src)
        else:
            while len(self.windows) >= self.max_sources:
                self.windows.popitem(last=False)  # the source whose last deny is oldest
                self.evicted += 1
            self.windows[src] = []
        return self.windows[src]

    def _protections(self, host: str) -> list[Protection]:
        ip = self.settings.hosts.get(host)
        return [p for p in self.settings.protected if ip is not None and ip in p.hosts]

    def posture(self, host: str, now: float) -> Posture:
        """The host's posture at `now` from its active holds (protection aside)."""
        active = [h for h in self.holds.get(host, {}).values() if h.active(now)]
        quarantine = [h.until for h in active if h.profile is None]
        restrict = [h for h in active if h.profile is not None]
        return Posture(
            bool(quarantine),
            _last(quarantine) if quarantine else None,
            tuple(sorted({h.profile for h in restrict if h.profile is not None})),
            _last([h.until for h in restrict]) if restrict else None,
        )

    def _settle(
        self, host: str, now: float, reason: str, fresh: Hold | None = None
    ) -> list[Decision]:
        """Decide what changes for `host` now; `fresh`: the hold just added (alerts)."""
        wanted = self.posture(host, now)
        out: list[Decision] = []
        blocked = self._blocked(host, now)
        if blocked is not None and wanted != _NORMAL:
            if fresh is not None:
                out.append(AlertOnly(host, blocked, fresh.reason))
            wanted = _NORMAL
        ip = self.settings.hosts.get(host)
        if wanted.quarantined and ip is not None and ip in self.settings.remediation:
            if fresh is not None and fresh.profile is None:
                why = "in the `remediation` service: quarantined, it could not serve the others' remediation"
                out.append(AlertOnly(host, why, fresh.reason))
            wanted = dataclasses.replace(wanted, quarantined=False, quarantine_until=None)
        before = self.applied.get(host, _NORMAL)
        if wanted.quarantined and (
            not before.quarantined or wanted.quarantine_until != before.quarantine_until
        ):
            out.append(Quarantine(host, reason, wanted.quarantine_until))
        elif before.quarantined and not wanted.quarantined and not self.dry_run:
            out.append(Release(host, reason))
        if wanted.profiles and (wanted.profiles, wanted.restrict_until) != (
            before.profiles,
            before.restrict_until,
        ):
            out.append(Restrict(host, wanted.profiles, reason, wanted.restrict_until))
        elif before.profiles and not wanted.profiles and not self.dry_run:
            out.append(Unrestrict(host, reason))
        if wanted == _NORMAL:
            self.applied.pop(host, None)
        else:
            self.applied[host] = wanted
        if not self.holds.get(host):
            self.holds.pop(host, None)
        return [_dry(d) for d in out] if self.dry_run else out

    def _blocked(self, host: str, now: float) -> str | None:
        """Why the host may not be held automatically at `now` (protected), or None."""
        for p in self._protections(host):
            if p.active_at(now):
                during = f", during {p.window}" if p.window else ""
                return (
                    f"protected: never contained automatically (line {p.span.line}: "
                    f"protect {p.hosts_text}{during}); alert only"
                )
        return None

    # -- state ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        """The engine's state as a JSON document (settings come from the policy)."""
        return {
            "version": STATE_VERSION,
            "holds": {
                host: [dataclasses.asdict(h) for h in held.values()]
                for host, held in sorted(self.holds.items())
            },
            "windows": {src: list(times) for src, times in self.windows.items()},
            "applied": {host: dataclasses.asdict(p) for host, p in sorted(self.applied.items())},
            "evicted": self.evicted,
        }

    @classmethod
    def from_json(
        cls,
        doc: object,
        settings: EngineSettings,
        dry_run: bool = False,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> PolicyEngine:
        """An engine with the state `to_json` gave; ValueError if the document is not one."""
        try:
            if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
                raise ValueError(f"not an engine state of version {STATE_VERSION}")
            holds = {
                str(host): {h.key: h for h in (_hold(x) for x in held)}
                for host, held in doc["holds"].items()
            }
            windows: OrderedDict[str, list[float]] = OrderedDict(
                (str(src), sorted(float(t) for t in times)) for src, times in doc["windows"].items()
            )
            applied = {str(host): _posture(p) for host, p in doc["applied"].items()}
            evicted = int(doc["evicted"])
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"damaged engine state ({err!r})") from None
        engine = cls(settings, dry_run, max_sources, holds, OrderedDict(), applied, evicted)
        for src, times in windows.items():  # past the cap: keep the most recent sources
            engine._window(src).extend(times)
        return engine


def _dense(times: list[float], count: int, within: float) -> bool:
    """Whether `count` of the sorted `times` fall within `within` seconds."""
    return any(times[i + count - 1] - times[i] <= within for i in range(len(times) - count + 1))


def _source(key: str) -> str:
    return key.split(" ", 1)[0]


def _name(key: str) -> str:
    return key.split(" ", 1)[-1]


def _number(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _hold(doc: Mapping[str, object]) -> Hold:
    since = _number(doc["since"])
    if since is None:
        raise TypeError("a hold needs `since`")
    profile = doc["profile"]
    return Hold(
        str(doc["origin"]),
        str(doc["key"]),
        None if profile is None else str(profile),
        str(doc["reason"]),
        since,
        _number(doc["until"]),
    )


def _posture(doc: Mapping[str, object]) -> Posture:
    profiles = doc["profiles"]
    if not isinstance(profiles, list):
        raise TypeError("profiles must be a list")
    return Posture(
        bool(doc["quarantined"]),
        _number(doc["quarantine_until"]),
        tuple(str(p) for p in profiles),
        _number(doc["restrict_until"]),
    )


def _dry(decision: Decision) -> Decision:
    if isinstance(decision, Quarantine):
        return WouldContain(decision.host, "quarantine", decision.reason, decision.until)
    if isinstance(decision, Restrict):
        action = f"restrict {', '.join(decision.profiles)}"
        return WouldContain(decision.host, action, decision.reason, decision.until)
    return decision
