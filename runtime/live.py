"""Live operations: time-bound grants, quarantine, and time-bound rules on schedule.

The controller keeps what operators changed in a state directory (`.p4seg/` by default):

    live.json     grants (with absolute expiry times), quarantined hosts, and when each
                  `for` rule was first applied — so expiries hold across restarts
    audit.jsonl   the hash-chained audit log (runtime/audit.py)
    alerts.jsonl  alerts from logged denies (runtime/alerts.py)

The switches always hold the *effective* policy at a moment: the policy file, plus the
grants not yet expired, minus the time-bound rules outside their window or past their
`for`, with quarantined hosts cut off. Rule ids never shift: a rule that is not in force
keeps its id with empty endpoints (it compiles to nothing), and what operations add comes
after the policy's own rules.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from compiler.addresses import AddressSet
from compiler.model import REMEDIATION, Action, Policy, PolicyRule, Quarantine, text_key

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

    @classmethod
    def load(cls, state_dir: Path) -> LiveState:
        path = state_dir / STATE_FILE
        if not path.exists():
            return cls()
        try:
            doc = json.loads(path.read_text())
            return cls(
                [Grant(**g) for g in doc.get("grants", [])],
                {str(k): float(v) for k, v in doc.get("quarantined", {}).items()},
                {str(k): float(v) for k, v in doc.get("first_applied", {}).items()},
                str(doc.get("applied_schedule", "")),
                {str(k): str(v) for k, v in doc.get("applied_tables", {}).items()},
            )
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} is damaged ({err}); fix or remove it") from None

    def save(self, state_dir: Path) -> None:
        """Atomically: a crash leaves the old state or the new, never half of one."""
        state_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "grants": [dataclasses.asdict(g) for g in self.grants],
            "quarantined": self.quarantined,
            "first_applied": self.first_applied,
            "applied_schedule": self.applied_schedule,
            "applied_tables": self.applied_tables,
        }
        fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".live.")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / STATE_FILE)

    def active_grants(self, now: float) -> list[Grant]:
        return [g for g in self.grants if g.expires > now]

    def add_grant(
        self, src: str, dst: str, proto: str, ports: str, seconds: int, now: float, actor: str
    ) -> Grant:
        grant = Grant(secrets.token_hex(4), src, dst, proto, ports, now, now + seconds, actor)
        self.grants.append(grant)
        return grant

    def prune(self, now: float) -> list[Grant]:
        """Drop expired grants; returns them (for the audit log)."""
        expired = [g for g in self.grants if g.expires <= now]
        self.grants = self.active_grants(now)
        return expired


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
    after = LiveState(
        list(state.grants),
        dict(state.quarantined),
        dict(state.first_applied),
        state.applied_schedule,
        dict(state.applied_tables),
    )
    match op:
        case GrantFlow():
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
            after.quarantined.setdefault(op.host, now)
            return Operated(after, {"host": op.host}, again=again)
        case ReleaseHost():
            if after.quarantined.pop(op.host, None) is None:
                raise NotQuarantined(op.host)
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


def effective_policy(policy: Policy, state: LiveState, now: float, hosts: dict[str, int]) -> Policy:
    """What the switches must enforce at `now` (see the module docstring).

    `hosts` maps inventory host names to addresses, for quarantine.
    """
    rules = [
        r if in_force(r, state, now) else dataclasses.replace(r, src=_EMPTY, dst=_EMPTY)
        for r in policy.rules
    ]
    addresses = sorted({hosts[h] for h in state.quarantined if h in hosts})
    if not addresses:
        return dataclasses.replace(policy, rules=tuple(rules))
    cut = AddressSet.of((a, a) for a in addresses)
    remediation = remediation_of(policy)
    carved = _quarantine(rules, cut, remediation)
    uncarved = tuple(
        (r.key, r.src, r.dst)
        for r, c in zip(rules, carved, strict=False)
        if (r.src, r.dst) != (c.src, c.dst)
    )
    added = frozenset(r.key for r in carved[len(rules) :])
    quarantine = Quarantine(tuple(addresses), remediation, uncarved, added)
    return dataclasses.replace(policy, rules=tuple(carved), quarantine=quarantine)


def remediation_of(policy: Policy) -> AddressSet:
    """The addresses of the policy's `remediation` service (none if it has no such service)."""
    return policy.remediation() or _EMPTY


def _quarantine(
    rules: list[PolicyRule], cut: AddressSet, remediation: AddressSet
) -> list[PolicyRule]:
    """Every allow loses the quarantined hosts; only their flows with `remediation` that
    the policy allowed come back, as rules after all others."""
    out: list[PolicyRule] = []
    extra: list[PolicyRule] = []
    for r in rules:
        if r.action is not Action.ALLOW:
            out.append(r)
            continue
        out.append(dataclasses.replace(r, src=r.src.difference(cut), dst=r.dst.difference(cut)))
        flows = (
            (r.src.intersection(cut), r.dst.intersection(remediation),
             f"{r.src_text} (quarantined)", REMEDIATION),
            (r.src.intersection(remediation), r.dst.intersection(cut),
             REMEDIATION, f"{r.dst_text} (quarantined)"),
        )  # fmt: skip
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
    grant running out), for `watch` to re-apply then; None if never."""
    moments = [g.expires for g in state.grants if g.expires > now]
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

    def lines(self) -> list[str]:
        at = dt.datetime.fromtimestamp(self.moment, dt.UTC)
        out = [f"effective policy at {at:%Y-%m-%d %H:%M:%S} UTC:"]
        for g in self.grants:
            until = dt.datetime.fromtimestamp(g.expires, dt.UTC)
            out.append(f"  grant {g.id}: {g.line()} (by {g.actor}, until {until:%H:%M:%S} UTC)")
        out += [f"  quarantined: {h}" for h in self.quarantined]
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
        tuple(sorted(state.quarantined)),
        tuple(r for r in timed if in_force(r, state, now)),
        tuple(r for r in timed if not in_force(r, state, now)),
    )
