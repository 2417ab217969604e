"""Live operations: time-bound grants, quarantine, and time-bound rules on schedule.

The controller keeps what operators changed in a state directory (`.p4seg/` by default):

    live.json     grants (with absolute expiry times), quarantined hosts, and when each
                  `for` rule was first applied — so expiries hold across restarts; the
                  policy engine's holds: when automatic quarantines lapse, restricted hosts
    engine.json   the policy engine's own state (runtime/engine.py, p4seg/signals.py)
    audit.jsonl   the hash-chained audit log (runtime/audit.py)
    alerts.jsonl  alerts from logged denies (runtime/alerts.py)

The switches always hold the *effective* policy at a moment: the policy file, plus the
grants not yet expired, minus the time-bound rules outside their window or past their
`for`, with restricted hosts narrowed to their profiles and quarantined hosts cut off
(holds past their end lapse by themselves). Rule ids never shift: a rule that is not in force
keeps its id with empty endpoints (it compiles to nothing), and what operations add comes
after the policy's own rules.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from compiler.addresses import AddressSet
from compiler.memo import ByObject
from compiler.model import (
    ICMP_NAMES,
    REMEDIATION,
    Action,
    Policy,
    PolicyRule,
    Quarantine,
    text_key,
)
from runtime.files import Parsed, write_atomic

STATE_FILE = "live.json"
_EMPTY = AddressSet(())


@dataclass(frozen=True, slots=True)
class Grant:
    """`allow SRC -> DST PROTO PORTS` until `expires` (UNIX time)."""

    id: str
    src: str
    dst: str
    proto: str
    ports: str
    created: float
    expires: float
    actor: str

    def line(self) -> str:
        ports = f" {self.ports}" if self.ports else ""
        return f"allow {self.src} -> {self.dst} {self.proto}{ports}"

    @property
    def rule_name(self) -> str:
        """The grant's rule's name, hence its rule key: its id (and so its rule id and
        entries) stays the same whatever other grants come and go."""
        return f"grant_{self.id}"


@dataclass(slots=True)
class LiveState:
    grants: list[Grant] = field(default_factory=list)
    quarantined: dict[str, float] = field(default_factory=dict)  # host -> since
    # rule key -> when a `for` rule first went onto the switches (live.json written before
    # rule keys may hold a rule's text instead: still read, see `_first_applied`)
    first_applied: dict[str, float] = field(default_factory=dict)
    # What the last full apply held in force (InForce.schedule_digest): a quarantine writes
    # only its overlay while nothing else is due (runtime/overlay.py).
    applied_schedule: str = ""
    # switch -> digest of the compiled tables it was last brought to (a full apply, or the
    # overlay): a quarantine writes only its overlay while every other switch holds the
    # tables the new compile gives it (nothing else pending).
    applied_tables: dict[str, str] = field(default_factory=dict)
    # Automatic holds (runtime/engine.py): when a quarantine lapses (none: until released),
    # and hosts restricted to profiles (services), with when that lapses.
    quarantine_until: dict[str, float] = field(default_factory=dict)
    automatic: list[str] = field(default_factory=list)  # quarantined by the engine, not by hand
    restricted: dict[str, list[str]] = field(default_factory=dict)
    restricted_until: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path) -> LiveState:
        path = state_dir / STATE_FILE
        return cls.from_json(path.read_text(), str(path)) if path.exists() else cls()

    @classmethod
    def from_json(cls, text: str, where: str) -> LiveState:
        """The state as `to_json` wrote it; ValueError naming `where` when it is damaged."""
        try:
            doc = json.loads(text)
            return cls(
                [Grant(**g) for g in doc.get("grants", [])],
                {str(k): float(v) for k, v in doc.get("quarantined", {}).items()},
                {str(k): float(v) for k, v in doc.get("first_applied", {}).items()},
                str(doc.get("applied_schedule", "")),
                {str(k): str(v) for k, v in doc.get("applied_tables", {}).items()},
                {str(k): float(v) for k, v in doc.get("quarantine_until", {}).items()},
                [str(h) for h in doc.get("automatic", [])],
                {str(k): [str(p) for p in v] for k, v in doc.get("restricted", {}).items()},
                {str(k): float(v) for k, v in doc.get("restricted_until", {}).items()},
            )
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{where} is damaged ({err}); fix or remove it") from None

    def to_json(self) -> str:
        """The state as one JSON document (the state directory's live.json, etcd's `live`)."""
        doc = {
            "grants": [dataclasses.asdict(g) for g in self.grants],
            "quarantined": self.quarantined,
            "first_applied": self.first_applied,
            "applied_schedule": self.applied_schedule,
            "applied_tables": self.applied_tables,
            "quarantine_until": self.quarantine_until,
            "automatic": self.automatic,
            "restricted": self.restricted,
            "restricted_until": self.restricted_until,
        }
        return json.dumps(doc, indent=2, sort_keys=True)

    def save(self, state_dir: Path) -> None:
        """Atomically: a crash leaves the old state or the new, never half of one. Not
        written when the file holds this text already, as this process wrote it (an apply
        saves the state before its first write to a switch: most change nothing in it)."""
        path, text = state_dir / STATE_FILE, self.to_json()
        if _WRITTEN.holds(path, text):
            return
        write_atomic(path, text)
        _WRITTEN.remember(path, text)

    def active_grants(self, now: float) -> list[Grant]:
        return [g for g in self.grants if g.expires > now]

    def add_grant(
        self, src: str, dst: str, proto: str, ports: str, seconds: int, now: float, actor: str
    ) -> Grant:
        grant = Grant(secrets.token_hex(4), src, dst, proto, ports, now, now + seconds, actor)
        self.grants.append(grant)
        return grant

    def quarantine_by_operator(self, host: str, now: float) -> None:
        """An operator's quarantine: it never lapses, and the engine never releases it."""
        self.quarantined.setdefault(host, now)
        self.quarantine_until.pop(host, None)
        self.automatic = [h for h in self.automatic if h != host]

    def quarantined_at(self, now: float) -> list[str]:
        """Hosts quarantined at `now` (an automatic quarantine past its end is not)."""
        return sorted(h for h in self.quarantined if self.quarantine_until.get(h, now + 1) > now)

    def restricted_at(self, now: float) -> dict[str, list[str]]:
        """Hosts restricted at `now` -> their profiles."""
        return {
            h: p for h, p in self.restricted.items() if self.restricted_until.get(h, now + 1) > now
        }

    def prune(self, now: float) -> list[Grant]:
        """Drop expired grants; returns them (for the audit log)."""
        expired = [g for g in self.grants if g.expires <= now]
        self.grants = self.active_grants(now)
        for host in set(self.quarantined) - set(self.quarantined_at(now)):
            del self.quarantined[host]
        for host in set(self.restricted) - set(self.restricted_at(now)):
            del self.restricted[host]
        self.quarantine_until = {
            h: t for h, t in self.quarantine_until.items() if h in self.quarantined
        }
        self.restricted_until = {
            h: t for h, t in self.restricted_until.items() if h in self.restricted
        }
        self.automatic = [h for h in self.automatic if h in self.quarantined]
        return expired


def save_json(state_dir: Path, name: str, doc: object) -> None:
    """Write a state file atomically: a crash leaves the old document or the new one."""
    write_atomic(state_dir / name, json.dumps(doc, indent=2, sort_keys=True))


# -- operations: typed values that change the live state ---------------------------------


@dataclass(frozen=True, slots=True)
class GrantFlow:
    """`grant`: allow SRC -> DST PROTO PORTS for `seconds` from the moment it is applied."""

    src: str
    dst: str
    proto: str
    ports: str
    seconds: int
    actor: str


@dataclass(frozen=True, slots=True)
class RevokeGrant:
    """`revoke`: end a grant now."""

    grant_id: str


@dataclass(frozen=True, slots=True)
class QuarantineHost:
    """`quarantine`: cut an inventory host off (but for `remediation`)."""

    host: str


@dataclass(frozen=True, slots=True)
class ReleaseHost:
    """`release`: end a host's quarantine."""

    host: str


Operation = GrantFlow | RevokeGrant | QuarantineHost | ReleaseHost


class OperationError(Exception):
    """An operation that does not apply to the live state (nothing changed)."""


# One side of a grant: a name or an address/prefix, as compiler/grammar.lark spells them
# (a grant's sides become policy text: nothing else may reach it).
GRANT_ENDPOINT = re.compile(
    r"^(?:[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*|[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?:/[0-9]{1,2})?)$"
)
GRANT_PROTOCOLS = ("tcp", "udp", "icmp", "ip")
# One item of a grant's ports as the policy writes them after a protocol: a number, a
# range, `type N [code M]` (or an ICMP type's name) — no option, comment or statement.
_PORT_ITEM = re.compile(r"^(?:[0-9]{1,5}(?:-[0-9]{1,5})?|type [0-9]{1,3}(?: code [0-9]{1,3})?)$")


class InvalidGrant(OperationError):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)


def grant_problem(op: GrantFlow) -> str | None:
    """Why a grant's fields cannot be one rule of policy text, or None."""
    for side, value in (("SRC", op.src), ("DST", op.dst)):
        if not GRANT_ENDPOINT.match(value):
            return (f"{side} {value!r} must be one service, host name, address or prefix "
                    "(e.g. algo, algo1, 10.0.1.0/24)")  # fmt: skip
    if op.proto not in GRANT_PROTOCOLS:
        return f"PROTO must be one of {', '.join(GRANT_PROTOCOLS)}, not {op.proto!r}"
    items = [item.strip() for item in op.ports.split(",")] if op.ports else []
    if not all(_PORT_ITEM.match(item) or item in ICMP_NAMES for item in items):
        return f"PORTS {op.ports!r} must be ports as the policy writes them (5432, 8000-8080)"
    return None


class UnknownGrant(OperationError):
    def __init__(self, grant_id: str, grants: list[Grant]) -> None:
        known = ", ".join(f"{g.id} ({g.line()})" for g in grants) or "none"
        super().__init__(f"no grant {grant_id} (active: {known})")
        self.grant_id = grant_id


class NotQuarantined(OperationError):
    def __init__(self, host: str) -> None:
        super().__init__(f"{host} is not quarantined")
        self.host = host


@dataclass(frozen=True, slots=True)
class Operated:
    """An operation applied: the live state after it (the one before is untouched), what
    the audit log records of it, and the grant it made (GrantFlow)."""

    state: LiveState
    event: dict[str, object]
    grant: Grant | None = None
    again: bool = False  # it was in force already (a host quarantined twice)


def operate(state: LiveState, op: Operation, now: float) -> Operated:
    """`op` applied to `state` at `now`; OperationError when it does not apply."""
    after = copy.deepcopy(state)  # every field, the engine's holds too
    match op:
        case GrantFlow():
            problem = grant_problem(op)
            if problem is not None:
                raise InvalidGrant(problem)
            grant = after.add_grant(op.src, op.dst, op.proto, op.ports, op.seconds, now, op.actor)
            event = {"grant": grant.id, "rule": grant.line(), "seconds": op.seconds}
            return Operated(after, event, grant)
        case RevokeGrant():
            match = [g for g in after.grants if g.id == op.grant_id]
            if not match:
                raise UnknownGrant(op.grant_id, after.grants)
            after.grants.remove(match[0])
            return Operated(after, {"grant": op.grant_id, "rule": match[0].line()})
        case QuarantineHost():
            again = op.host in after.quarantined
            after.quarantine_by_operator(op.host, now)
            return Operated(after, {"host": op.host}, again=again)
        case ReleaseHost():
            if after.quarantined.pop(op.host, None) is None:
                raise NotQuarantined(op.host)
            after.quarantine_until.pop(op.host, None)
            after.automatic = [h for h in after.automatic if h != op.host]
            return Operated(after, {"host": op.host})


def policy_text_with_grants(text: str, state: LiveState, now: float) -> str:
    """The policy text with the active grants appended as rules (after every policy rule,
    so rule ids of the file stay what they are)."""
    grants = state.active_grants(now)
    if not grants:
        return text
    lines = [
        f"{g.line()} name {g.rule_name}  # grant {g.id} by {g.actor}, expires "
        f"{dt.datetime.fromtimestamp(g.expires, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"
        for g in grants
    ]
    return text.rstrip("\n") + "\n\n# -- live grants (p4seg grant) --\n" + "\n".join(lines) + "\n"


def in_force(rule: PolicyRule, state: LiveState, now: float) -> bool:
    """Whether a time-bound rule holds at `now` (`during` window, `for` since first applied)."""
    if rule.window is not None and not rule.window.active_at(now):
        return False
    if rule.duration_s is not None:
        since = _first_applied(rule, state)
        if since is not None and now >= since + rule.duration_s:
            return False
    return True


def _first_applied(rule: PolicyRule, state: LiveState) -> float | None:
    """When `rule`'s `for` clock started: by its stable key, else (a state saved before
    clocks were keyed so) by its text — never restarted by the change of format."""
    since = state.first_applied.get(rule.key)
    return since if since is not None else state.first_applied.get(rule.describe())


def _emptied(rule: PolicyRule) -> PolicyRule:
    return dataclasses.replace(rule, src=_EMPTY, dst=_EMPTY)


# A rule out of force (outside its `during` window, past its `for`), per rule object: the
# same object apply after apply, so that a compile by difference (compiler/lower.py) sees
# only the rules an edit changed, not every rule out of force made anew.
_OUT_OF_FORCE: ByObject[PolicyRule, PolicyRule] = ByObject(10_000)


def effective_policy(policy: Policy, state: LiveState, now: float, hosts: dict[str, int]) -> Policy:
    """What the switches must enforce at `now` (see the module docstring).

    `hosts` maps inventory host names to addresses, for quarantine.
    """
    rules = [r if in_force(r, state, now) else _OUT_OF_FORCE.get(r, _emptied) for r in policy.rules]
    restricted = {hosts[h]: p for h, p in state.restricted_at(now).items() if h in hosts}
    if restricted:
        rules = _restrict(policy, rules, restricted)
    addresses = sorted({hosts[h] for h in state.quarantined_at(now) if h in hosts})
    if not addresses:
        return dataclasses.replace(policy, rules=tuple(rules))
    cut = AddressSet.of((a, a) for a in addresses)
    remediation = remediation_of(policy)
    carved = _quarantine(rules, cut, addresses, remediation)
    uncarved = tuple(r for r, c in zip(rules, carved, strict=False) if r is not c)
    added = frozenset(r.key for r in carved[len(rules) :])
    quarantine = Quarantine(tuple(addresses), remediation, uncarved, added)
    return dataclasses.replace(policy, rules=tuple(carved), quarantine=quarantine)


def _restrict(
    policy: Policy, rules: list[PolicyRule], restricted: dict[int, list[str]]
) -> list[PolicyRule]:
    """Each restricted host keeps a side of an allow only if every one of its profiles is
    wholly on that side: the flows it had that its profiles also have, never more. A
    profile the policy no longer defines keeps it nothing (fail closed)."""
    services = {s.name: s.addresses for s in policy.services}

    def keeps(side: AddressSet, profiles: list[str]) -> bool:
        sets = [services.get(p, _EMPTY) for p in profiles]
        return all(s and not s.difference(side) for s in sets)

    def narrowed(side: AddressSet) -> AddressSet:
        cut = [a for a, profiles in restricted.items() if a in side and not keeps(side, profiles)]
        return side.difference(AddressSet.of((a, a) for a in cut)) if cut else side

    return [
        dataclasses.replace(r, src=narrowed(r.src), dst=narrowed(r.dst))
        if r.action is Action.ALLOW
        else r
        for r in rules
    ]


def remediation_of(policy: Policy) -> AddressSet:
    """The addresses of the policy's `remediation` service (none if it has no such service)."""
    return policy.remediation() or _EMPTY


def _quarantine(
    rules: list[PolicyRule], cut: AddressSet, addresses: list[int], remediation: AddressSet
) -> list[PolicyRule]:
    """Every allow loses the quarantined hosts (`cut`: the set of `addresses`); only their
    flows with `remediation` that the policy allowed come back, as rules after all others.
    An allow naming none of them is kept as it is (most of them: a lookup per address)."""
    out: list[PolicyRule] = []
    extra: list[PolicyRule] = []
    # Per set object, its results: the rules naming a service share its set (held in the
    # memos, so that its id stays its own).
    names: dict[int, tuple[AddressSet, bool]] = {}
    made: dict[tuple[int, int], tuple[AddressSet, AddressSet]] = {}

    def meets(side: AddressSet) -> bool:
        found = names.get(id(side))
        if found is None:
            found = names[id(side)] = (side, any(a in side for a in addresses))
        return found[1]

    def once(side: AddressSet, op: int) -> AddressSet:  # 1: minus the cut; 2: in it; 3: in rem.
        found = made.get((id(side), op))
        if found is None:
            value = (
                side.difference(cut)
                if op == 1
                else side.intersection(cut if op == 2 else remediation)
            )
            found = made[(id(side), op)] = (side, value)
        return found[1]

    for r in rules:
        if r.action is not Action.ALLOW or not (meets(r.src) or meets(r.dst)):
            out.append(r)
            continue
        out.append(dataclasses.replace(r, src=once(r.src, 1), dst=once(r.dst, 1)))
        flows = (
            (once(r.src, 2), once(r.dst, 3), f"{r.src_text} (quarantined)", REMEDIATION),
            (once(r.src, 3), once(r.dst, 2), REMEDIATION, f"{r.dst_text} (quarantined)"),
        )
        for src, dst, src_text, dst_text in flows:
            if src and dst:
                # Its own key (derived from the allow's), so it gets an id of its own.
                key = text_key(f"quarantine {r.key}: {src_text} -> {dst_text}")
                extra.append(
                    dataclasses.replace(
                        r,
                        src=src,
                        dst=dst,
                        src_text=src_text,
                        dst_text=dst_text,
                        name=None,
                        key=key,
                    )
                )
    base = len(out)
    return out + [
        dataclasses.replace(r, id=base + i, position=base + i) for i, r in enumerate(extra, start=1)
    ]


def next_change(policy: Policy, state: LiveState, now: float) -> float | None:
    """The next moment the effective policy changes by itself (a window edge, a `for` or a
    grant running out), for `watch` to re-apply then; None if never. A grant or hold that
    ran out while still in the state (nothing applied since) is due now."""
    ends = [g.expires for g in state.grants]
    ends += [*state.quarantine_until.values(), *state.restricted_until.values()]
    moments = [max(t, now) for t in ends]
    for rule in policy.rules:
        if rule.duration_s is not None:
            since = _first_applied(rule, state)
            if since is not None and since + rule.duration_s > now:
                moments.append(since + rule.duration_s)
        edge = rule.window.next_edge(now) if rule.window is not None else None
        if edge is not None:
            moments.append(edge)
    return min(moments, default=None)


def note_applied(policy: Policy, state: LiveState, now: float) -> None:
    """Remember when each `for` rule first went onto the switches."""
    for rule in policy.rules:
        if rule.duration_s is not None:
            since = _first_applied(rule, state)
            state.first_applied[rule.key] = now if since is None else since


def parse_moment(text: str) -> float | str:
    """`--at`: an ISO 8601 time with a zone (`2026-03-02T21:30:00Z`, `...+01:00`) or `now`,
    as UNIX time; or what is wrong with it."""
    if text == "now":
        return dt.datetime.now(dt.UTC).timestamp()
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return f"--at {text!r} is not an ISO 8601 time (e.g. 2026-03-02T21:30:00Z) or `now`"
    if moment.tzinfo is None:
        return f"--at {text!r} has no zone: add one (Z, +01:00) so the moment is unambiguous"
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class InForce:
    """What made the effective policy at a moment differ from the file (for reports)."""

    moment: float
    grants: tuple[Grant, ...]
    quarantined: tuple[str, ...]
    in_force: tuple[PolicyRule, ...]  # time-bound rules in force
    lapsed: tuple[PolicyRule, ...]  # time-bound rules not in force
    restricted: tuple[tuple[str, tuple[str, ...]], ...] = ()  # host, profiles

    def lines(self) -> list[str]:
        at = dt.datetime.fromtimestamp(self.moment, dt.UTC)
        out = [f"effective policy at {at:%Y-%m-%d %H:%M:%S} UTC:"]
        for g in self.grants:
            until = dt.datetime.fromtimestamp(g.expires, dt.UTC)
            out.append(f"  grant {g.id}: {g.line()} (by {g.actor}, until {until:%H:%M:%S} UTC)")
        out += [f"  quarantined: {h}" for h in self.quarantined]
        out += [f"  restricted:  {h} to {', '.join(p)}" for h, p in self.restricted]
        out += [f"  in force:     line {r.span.line}: {r.describe()}" for r in self.in_force]
        out += [f"  not in force: line {r.span.line}: {r.describe()}" for r in self.lapsed]
        if len(out) == 1:
            out[0] += " the policy file as written (no grants, quarantines or time-bound rules)"
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "at": dt.datetime.fromtimestamp(self.moment, dt.UTC).isoformat(),
            "grants": [dataclasses.asdict(g) for g in self.grants],
            "quarantined": list(self.quarantined),
            # Only when some: the digests of states without restrictions stay what they were.
            **({"restricted": {h: list(p) for h, p in self.restricted}} if self.restricted else {}),
            "in_force": [{"line": r.span.line, "rule": r.describe()} for r in self.in_force],
            "not_in_force": [{"line": r.span.line, "rule": r.describe()} for r in self.lapsed],
        }

    def digest(self) -> str:
        """A SHA-256 of the operations and rule states (for the audit log)."""
        doc = self.to_json()
        doc.pop("at")
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def schedule_digest(self) -> str:
        """A SHA-256 of what holds apart from quarantines: the grants and which time-bound
        rules are in force (what a quarantine must not leave behind when it writes only its
        overlay)."""
        doc = self.to_json()
        doc.pop("at")
        doc.pop("quarantined")
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def in_force_report(policy: Policy, state: LiveState, now: float) -> InForce:
    """Which grants, quarantines and time-bound rules of `policy` hold at `now`."""
    timed = [r for r in policy.rules if r.is_time_bound]
    return InForce(
        now,
        tuple(state.active_grants(now)),
        tuple(state.quarantined_at(now)),
        tuple(r for r in timed if in_force(r, state, now)),
        tuple(r for r in timed if not in_force(r, state, now)),
        tuple((h, tuple(p)) for h, p in sorted(state.restricted_at(now).items())),
    )


# The state files' texts as this process last wrote them (LiveState.save).
_WRITTEN: Parsed[str] = Parsed()
