"""The semantic difference between two policies: every change in what the switches do.

Not a text diff: both policies are judged flow by flow (compiler/semantics.py) over the
classes of addresses and ports that either one can tell apart, so renaming a service or
reordering rules gives an empty diff, and a changed port range shows as exactly the ports
that changed. Flows are TCP connections (with their replies), UDP datagrams (with whether
answers pass), ICMP echoes and packets of other protocols.

A flow's verdict is not all the switches enforce: a flow class is compared on its
*profile* — at every moment the time-bound rules allow, whether it passes, at which rate,
whether its answers pass (UDP `reply`) and whether a refused packet is logged. The moments
are the feasible combinations of `during` windows (from the windows' edges over a week)
and of how long ago the policy was applied (before or after each `for` duration).

Host pairs are then checked packet by packet (every source and destination port class,
TCP ACK, ICMP echo reply), so a difference in a packet no flow sends — a reply to a client
port other than the one flows are judged with — is reported too. Flows with no inventory
host at one end are reported apart: the switches never see them.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from compiler.addresses import format_ipv4
from compiler.inventory import Inventory
from compiler.model import PORT_PROTOCOLS, Action, Policy, PolicyRule, TimeWindow, format_icmp_types
from compiler.protocols import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REPLY_RANGE,
    ICMP_ECHO_REQUEST,
    ICMP_ECHO_REQUEST_RANGE,
    MAX_PORT,
)
from compiler.semantics import (
    EPHEMERAL_PORT,
    Decision,
    Partition,
    PolicySemantics,
    protocol_classes,
)

MAX_ADDRESS = (1 << 32) - 1
MAX_ICMP = 0xFFFF  # ICMP type << 8 | code, as the pipeline matches it
# ICMP flows: every type but the echo reply, which answers a ping (judged per packet)
ICMP_FLOW_VALUES = (0x0100, MAX_ICMP)
MAX_LISTED_TYPES = 3  # longer runs of whole ICMP types read as `types N-M`
WEEK_DAYS = 8  # a week of window edges, plus a day for windows that wrap past midnight

# (window, moment) -> whether the window is open then (runtime/live.py decides it)
WindowOpen = Callable[[TimeWindow, float], bool]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the switches do with a flow class at one moment."""

    allowed: bool
    rate_pps: int | None  # the meter of the allow that passes it
    replies: bool | None  # UDP: whether answers pass (None: not applicable)
    logged: bool  # refused and logged


@dataclass(frozen=True, slots=True)
class Moment:
    """A feasible state of the clock: which windows are open, how long since applied.
    `moments()` puts the moment the diff is asked about first."""

    open_windows: frozenset[TimeWindow]
    elapsed_s: int  # seconds since the policy was first applied

    def in_force(self, rule: PolicyRule) -> bool:
        if rule.window is not None and rule.window not in self.open_windows:
            return False
        return rule.duration_s is None or self.elapsed_s < rule.duration_s


@dataclass(frozen=True, slots=True)
class FlowChange:
    allowed: bool  # the verdict now: True allowed (at some moment), False denied
    src: str  # the addresses, named by inventory hosts where they are hosts
    dst: str
    proto: str
    ports: str  # "" for protocols without ports
    kind: str = "verdict"  # verdict (+/-) | behaviour (~) | packet (~, one packet class)
    before: str = ""  # the old profile, in words (behaviour and packet changes)
    after: str = ""
    on_switches: bool = True  # False: no inventory host at one end (or a host to itself)

    def describe(self) -> str:
        ports = f" {self.ports}" if self.ports else ""
        flow = f"{self.src} -> {self.dst} {self.proto}{ports}"
        where = "" if self.on_switches else "   (not on the switches: no host pair)"
        if self.kind == "verdict":
            sign = "+ allowed" if self.allowed else "- denied "
            extra = f" ({self.after})" if self.after else ""
            return f"{sign}  {flow}{extra}{where}"
        return f"~ {self.before} -> {self.after}  {flow}{where}"

    def to_json(self) -> dict[str, object]:
        change = {"verdict": "allowed" if self.allowed else "denied"}.get(self.kind, self.kind)
        return {
            "change": change,
            "src": self.src,
            "dst": self.dst,
            "proto": self.proto,
            "ports": self.ports,
            "before": self.before,
            "after": self.after,
            "on_switches": self.on_switches,
        }


# -- moments ------------------------------------------------------------------------------


def _windows(policies: Sequence[Policy]) -> list[TimeWindow]:
    return sorted({r.window for p in policies for r in p.rules if r.window is not None}, key=str)


def moments(policies: Sequence[Policy], window_open: WindowOpen, now: float) -> tuple[Moment, ...]:
    """Every feasible combination of open windows and elapsed `for` phases, `now`'s first."""
    windows = _windows(policies)
    durations = sorted({r.duration_s for p in policies for r in p.rules if r.duration_s})
    now_state = frozenset(w for w in windows if window_open(w, now))
    states = {now_state}
    # Window states change only at a window's start or end: try every edge of a week.
    for w in windows:
        midnight = dt.datetime.fromtimestamp(now, ZoneInfo(w.zone)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        for day in range(-1, WEEK_DAYS):
            for minute in (w.start, w.end):
                edge = (midnight + dt.timedelta(days=day, minutes=minute)).timestamp()
                states.add(frozenset(x for x in windows if window_open(x, edge)))
    out = [Moment(now_state, 0)]
    for state in sorted(states, key=lambda s: sorted(map(str, s))):
        for elapsed in (0, *durations):  # 0: just applied; d: the `for d` rules have lapsed
            if (state, elapsed) != (now_state, 0):
                out.append(Moment(state, elapsed))
    return tuple(out)


# -- profiles -----------------------------------------------------------------------------


class _Judge:
    """One policy's semantics with the rules in force at each moment as bit masks."""

    def __init__(self, policy: Policy, pinned: Sequence[int], when: Sequence[Moment]) -> None:
        self.sem = PolicySemantics(policy, pinned)
        self.active = [
            sum(1 << i for i, r in enumerate(policy.rules) if m.in_force(r)) for m in when
        ]
        self.eph = self.sem.ports.atom_of(EPHEMERAL_PORT)

    def decide(self, src: int, dst: int, proto: str, sport: int, dport: int, moment: int,
               ack: bool = False, icmp_value: int = ICMP_ECHO_REQUEST << 8) -> Decision:  # fmt: skip
        """One packet at one moment; ICMP given as type << 8 | code in `icmp_value`."""
        a, p = self.sem.addresses, self.sem.ports
        return self.sem.decide_atoms(
            a.atom_of(src), a.atom_of(dst), proto, p.atom_of(sport), p.atom_of(dport),
            ack, icmp_value >> 8, self.active[moment], icmp_value & 0xFF,
        )  # fmt: skip

    def flow(self, src: int, dst: int, proto: str, port: int, moment: int) -> Outcome:
        """A flow's outcome; for icmp, `port` is the ICMP type << 8 | code of its first
        packet (an echo request is answered by an echo reply; other types are one packet)."""
        if proto == "icmp":
            fwd = self.decide(src, dst, proto, 0, 0, moment, icmp_value=port)
        else:
            fwd = self.decide(src, dst, proto, EPHEMERAL_PORT, port, moment)
        if not fwd.allowed:
            return Outcome(False, None, None, fwd.log)
        rate = fwd.rule.rate_pps if fwd.rule is not None else None
        if proto == "tcp":
            back = self.decide(dst, src, "tcp", port, EPHEMERAL_PORT, moment, ack=True)
        elif proto == "icmp" and port >> 8 == ICMP_ECHO_REQUEST:
            back = self.decide(dst, src, "icmp", 0, 0, moment, icmp_value=ICMP_ECHO_REPLY << 8)
        elif proto == "udp":
            answer = self.decide(dst, src, "udp", port, EPHEMERAL_PORT, moment)
            return Outcome(True, rate, answer.allowed, False)
        else:
            return Outcome(True, rate, None, False)
        if not back.allowed:
            return Outcome(False, None, None, back.log)
        return Outcome(True, rate, None, False)


Profile = tuple[Outcome, ...]


def _cond_text(rule: PolicyRule, when: Sequence[Moment]) -> str:
    parts = []
    if rule.window is not None:
        now_open = rule.window in when[0].open_windows
        parts.append(f"during {rule.window} ({'in force' if now_open else 'not in force'} now)")
    if rule.duration_s is not None:
        parts.append(f"for {_duration(rule.duration_s)} after it is first applied")
    return " and ".join(parts)


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _verdict_text(profile: Profile, when: Sequence[Moment], rules: Sequence[PolicyRule]) -> str:
    passing = {i for i, o in enumerate(profile) if o.allowed}
    if len(passing) == len(profile):
        return "allowed"
    if not passing:
        return "denied"
    conds: dict[str, set[int]] = {}
    for r in rules:
        if r.action is Action.ALLOW and r.is_time_bound:
            cover = {i for i, m in enumerate(when) if m.in_force(r)}
            if cover <= passing:
                conds.setdefault(_cond_text(r, when), set()).update(cover)
    if conds and set().union(*conds.values()) == passing:
        return "allowed only " + " or ".join(sorted(conds))
    now = "allowed now" if 0 in passing else "denied now"
    return f"allowed at some times ({now})"


def _attributes(
    profile: Profile, when: Sequence[Moment], rules: Sequence[PolicyRule], proto: str
) -> dict[str, str]:
    out = {"verdict": _verdict_text(profile, when, rules)}
    rates = sorted({o.rate_pps for o in profile if o.allowed}, key=lambda r: r or 0)
    if rates:
        out["rate"] = " or ".join(f"rate {r}pps" if r else "no rate" for r in rates)
    if proto == "udp":
        replies = {o.replies for o in profile if o.allowed}
        if replies:
            out["replies"] = " or ".join(
                "replies pass" if r else "replies dropped" for r in sorted(replies, key=bool)
            )
    logged = {o.logged for o in profile if not o.allowed}
    if logged:
        out["log"] = " or ".join("logged" if v else "not logged" for v in sorted(logged))
    return out


def _change_text(
    old: Profile, new: Profile, when: Sequence[Moment], rules: tuple[Sequence[PolicyRule], ...],
    proto: str,
) -> tuple[str, str]:  # fmt: skip
    a = _attributes(old, when, rules[0], proto)
    b = _attributes(new, when, rules[1], proto)
    keys = [k for k in ("verdict", "rate", "replies", "log") if k in a and k in b and a[k] != b[k]]
    if a["verdict"] == b["verdict"] and "log" in keys and not a["verdict"].startswith("allowed"):
        return a["log"], b["log"]
    before = "; ".join(a[k] for k in keys)
    after = "; ".join(b[k] for k in keys)
    if not keys:  # the same words for different profiles: say each moment apart
        before, after = _moment_text(old, when), _moment_text(new, when)
    return before, after


def _moment_text(profile: Profile, when: Sequence[Moment]) -> str:
    def one(o: Outcome) -> str:
        if not o.allowed:
            return "denied" + (" logged" if o.logged else "")
        return "allowed" + (f" rate {o.rate_pps}pps" if o.rate_pps else "")

    return ", ".join(one(o) for o in profile[:4]) + (" ..." if len(profile) > 4 else "")


# -- reading ------------------------------------------------------------------------------


def _ranges(values: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(values):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _port_text(intervals: Sequence[tuple[int, int]]) -> str:
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in intervals)


def icmp_text(intervals: Sequence[tuple[int, int]]) -> str:
    """ICMP type << 8 | code intervals for reading: names and `type N code M` as a policy
    writes them (model.format_icmp_types), with runs of whole types as `types N-M` and the
    codes of one type as `type N codes A-B, C`; "" for every ICMP flow (all but echo-reply),
    and `all types but ...` where that is the shorter list."""
    merged = _ranges(intervals)
    if merged == [ICMP_FLOW_VALUES] or merged == [(0, MAX_ICMP)]:
        return ""
    items = _icmp_items(merged)
    if merged[0][0] >= ICMP_FLOW_VALUES[0]:
        rest, start = [], ICMP_FLOW_VALUES[0]
        for lo, hi in [*merged, (MAX_ICMP + 1, MAX_ICMP + 1)]:
            if lo > start:
                rest.append((start, lo - 1))
            start = hi + 1
        but = _icmp_items(rest)
        if len(but) < len(items):
            return "all types but " + ", ".join(but)
    return ", ".join(items)


def _icmp_items(merged: list[tuple[int, int]]) -> list[str]:
    whole: list[int] = []  # types all of whose codes are in
    items: list[tuple[int, str]] = []
    for t in range(merged[0][0] >> 8, (merged[-1][1] >> 8) + 1):
        codes = _ranges([(max(lo, t << 8) & 0xFF, min(hi, t << 8 | 0xFF) & 0xFF)
                         for lo, hi in merged if lo <= t << 8 | 0xFF and hi >= t << 8])  # fmt: skip
        if codes == [(0, 0xFF)]:
            whole.append(t)
        elif len(codes) == 1 and codes[0][0] == codes[0][1]:
            items.append((t, format_icmp_types(((t << 8 | codes[0][0],) * 2,))))
        elif codes:
            items.append((t, f"type {t} codes {_port_text(codes)}"))
    for lo, hi in _ranges([(t, t) for t in whole]):
        if hi - lo + 1 > MAX_LISTED_TYPES:
            items.append((lo, f"types {lo}-{hi}"))
        else:
            items += [(t, format_icmp_types(((t << 8, t << 8 | 0xFF),))) for t in range(lo, hi + 1)]
    return [text for _, text in sorted(items)]


def _atom_intervals(part: Partition) -> list[list[tuple[int, int]]]:
    out: list[list[tuple[int, int]]] = [[] for _ in range(part.count)]
    for i, start in enumerate(part.starts):
        end = part.starts[i + 1] - 1 if i + 1 < len(part.starts) else part.top
        out[part.element_atom[i]].append((start, end))
    return out


def _name(intervals: list[tuple[int, int]], hosts: dict[int, str]) -> str:
    names = []
    for lo, hi in intervals:
        inside = [hosts[ip] for ip in sorted(hosts) if lo <= ip <= hi]
        if inside and hi - lo + 1 == len(inside):
            names += inside
        elif lo == hi:
            names.append(format_ipv4(lo))
        else:
            names.append(f"{format_ipv4(lo)}-{format_ipv4(hi)}")
    return ", ".join(names)


def _always_open(window: TimeWindow, moment: float) -> bool:
    return True


# -- the diff -----------------------------------------------------------------------------


def semantic_diff(
    old: Policy,
    new: Policy,
    inventory: Inventory,
    now: float | None = None,
) -> list[FlowChange]:
    """Every flow class whose profile differs between `old` and `new`, grouped for reading,
    then every host-pair packet class that differs where no flow change shows it.

    `now` (UNIX time) places the `during` windows (TimeWindow.active_at); without it every
    window counts as always open (no time-bound rule ever lapses)."""
    window_open: WindowOpen = _always_open if now is None else TimeWindow.active_at
    hosts = {h.ip: h.name for h in inventory.hosts}
    addr_sets = [s for p in (old, new) for r in p.rules for s in (r.src.intervals, r.dst.intervals)]
    all_rules = [r for p in (old, new) for r in p.rules]
    port_sets = [r.ports for r in all_rules if r.proto in PORT_PROTOCOLS]
    port_sets.append(((EPHEMERAL_PORT, EPHEMERAL_PORT),))
    icmp_sets = [r.ports for r in all_rules if r.proto == "icmp"]
    icmp_sets += [(ICMP_ECHO_REPLY_RANGE,), (ICMP_ECHO_REQUEST_RANGE,)]
    addresses = Partition(addr_sets, MAX_ADDRESS, hosts)
    ports = Partition(port_sets, MAX_PORT)
    icmp = Partition(icmp_sets, MAX_ICMP)
    classes = protocol_classes(old, new)
    when = moments((old, new), window_open, 0.0 if now is None else now)
    judges = (_Judge(old, list(hosts), when), _Judge(new, list(hosts), when))
    rules = (old.rules, new.rules)
    addr_iv = _atom_intervals(addresses)
    port_iv = _atom_intervals(ports)
    icmp_iv = _atom_intervals(icmp)
    # (value judged, the values it stands for) per protocol class
    values: dict[str, list[tuple[int, list[tuple[int, int]]]]] = {
        "tcp": [(ports.representative[p], port_iv[p]) for p in range(ports.count)],
        "icmp": [
            (icmp.representative[a], icmp_iv[a])
            for a in range(icmp.count)
            if icmp_iv[a][0][0] >= ICMP_FLOW_VALUES[0]  # echo replies answer pings
        ],
    }
    values["udp"] = values["tcp"]
    host_atoms = {addresses.atom_of(ip) for ip in hosts}
    # (src atom, dst atom, proto, old profile, new profile) -> port intervals
    changed: dict[tuple[int, int, str, Profile, Profile], list[tuple[int, int]]] = {}
    for s in range(addresses.count):
        src = addresses.representative[s]
        for d in range(addresses.count):
            dst = addresses.representative[d]
            for proto in classes:
                for port, ivs in values.get(proto, [(0, [(0, 0)])]):
                    before = tuple(
                        judges[0].flow(src, dst, proto, port, m) for m in range(len(when))
                    )
                    after = tuple(
                        judges[1].flow(src, dst, proto, port, m) for m in range(len(when))
                    )
                    if before != after:
                        changed.setdefault((s, d, proto, before, after), []).extend(ivs)
    out = _grouped(changed, addr_iv, hosts, host_atoms, when, rules)
    # A flow change explains its packets both ways (its replies too); of ICMP flows, only
    # pings have packets other than their first (the echo reply).
    lo, hi = ICMP_ECHO_REQUEST_RANGE
    flagged = {
        k
        for c, ivs in changed.items()
        if c[2] != "icmp" or any(a <= hi and lo <= b for a, b in ivs)
        for k in ((c[0], c[1], c[2]), (c[1], c[0], c[2]))
    }
    out += _packet_changes(judges, addresses, ports, icmp, classes, hosts, when, flagged)
    return sorted(
        out,
        key=lambda c: (not c.on_switches, c.kind != "verdict", not c.allowed, c.src, c.dst,
                       c.proto, c.ports),
    )  # fmt: skip


def _grouped(
    changed: dict[tuple[int, int, str, Profile, Profile], list[tuple[int, int]]],
    addr_iv: list[list[tuple[int, int]]],
    hosts: dict[int, str],
    host_atoms: set[int],
    when: Sequence[Moment],
    rules: tuple[Sequence[PolicyRule], ...],
) -> list[FlowChange]:
    """Rows that differ only in the source (or destination) atom are merged for reading."""
    Ports = tuple[tuple[int, int], ...]
    Key = tuple[str, Profile, Profile, Ports, bool]
    by_rest: dict[tuple[int, Key], list[int]] = {}
    for (src_atom, dst_atom, proto, before, after), ivs in changed.items():
        # A host's traffic to itself never reaches its switch.
        visible = src_atom in host_atoms and dst_atom in host_atoms and src_atom != dst_atom
        key: Key = (proto, before, after, tuple(_ranges(ivs)), visible)
        by_rest.setdefault((dst_atom, key), []).append(src_atom)
    merged: dict[tuple[tuple[int, ...], Key], list[int]] = {}
    for (dst_atom, key), sources in by_rest.items():
        merged.setdefault((tuple(sorted(sources)), key), []).append(dst_atom)
    out = []
    for (src_atoms, (proto, before, after, port_ranges, visible)), dst_atoms in merged.items():
        src_text = _name(_ranges([iv for a in src_atoms for iv in addr_iv[a]]), hosts)
        dst_text = _name(_ranges([iv for a in dst_atoms for iv in addr_iv[a]]), hosts)
        ports_text = (
            _port_text(port_ranges)
            if proto in PORT_PROTOCOLS
            else icmp_text(port_ranges)
            if proto == "icmp"
            else ""
        )
        was = {o.allowed for o in before}
        now = {o.allowed for o in after}
        if len(was) == 1 and len(now) == 1 and was != now:
            extra = ""
            if True in now:
                attrs = _attributes(after, when, rules[1], proto)
                extra = ", ".join(v for k, v in attrs.items() if k in ("rate", "replies"))
                extra = "" if extra == "no rate" else extra.removeprefix("no rate, ")
            out.append(FlowChange(True in now, src_text, dst_text, proto, ports_text,
                                  after=extra, on_switches=visible))  # fmt: skip
            continue
        old_text, new_text = _change_text(before, after, when, rules, proto)
        out.append(
            FlowChange(after[0].allowed, src_text, dst_text, proto, ports_text, "behaviour",
                       old_text, new_text, visible)
        )  # fmt: skip
    return out


def _packet_changes(
    judges: tuple[_Judge, _Judge],
    addresses: Partition,
    ports: Partition,
    icmp: Partition,
    classes: Sequence[str],
    hosts: dict[int, str],
    when: Sequence[Moment],
    flagged: set[tuple[int, int, str]],
) -> list[FlowChange]:
    """Host pairs whose packets (any port class, TCP ACK, ICMP echo request and reply) are
    treated differently where no flow change of that pair and protocol already says so."""
    out = []
    port_reps = [ports.representative[p] for p in range(ports.count)]
    # Other ICMP types are one-packet flows, compared exactly above; pings have two packets.
    echo = [
        (icmp.representative[a], icmp_text(iv))
        for a, iv in enumerate(_atom_intervals(icmp))
        if iv[0][0] >> 8 in (ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST)
    ]
    for src, dst in itertools.permutations(sorted(hosts), 2):
        sa, da = addresses.atom_of(src), addresses.atom_of(dst)
        pair_ports = _port_classes(judges, src, dst, port_reps)
        for proto in classes:
            if (sa, da, proto) in flagged:
                continue
            found = _first_packet_difference(judges, src, dst, proto, pair_ports, echo, len(when))
            if found is None:
                continue
            what, before, after = found
            out.append(
                FlowChange(after, hosts[src], hosts[dst], proto, what, "packet",
                           "passes" if before else "dropped", "passes" if after else "dropped")
            )  # fmt: skip
    return out


def _port_classes(judges: tuple[_Judge, _Judge], src: int, dst: int, ports: list[int]) -> list[int]:
    """One port of each class that the rules between `src` and `dst` (either way, in either
    policy) tell apart: ports no such rule separates are judged alike by both."""
    keys = []
    for j in judges:
        sem = j.sem
        a, b = sem.addresses.atom_of(src), sem.addresses.atom_of(dst)
        between = ((sem.src_index[a] | sem.src_any) & (sem.dst_index[b] | sem.dst_any)) | (
            (sem.src_index[b] | sem.src_any) & (sem.dst_index[a] | sem.dst_any)
        )
        keys.append((sem, between))
    classes: dict[tuple[int, ...], int] = {}
    for port in ports:
        key = tuple(
            (sem.port_index[sem.ports.atom_of(port)] | sem.port_any) & between
            for sem, between in keys
        )
        classes.setdefault(key, port)
    return sorted({*classes.values(), EPHEMERAL_PORT})


def _first_packet_difference(
    judges: tuple[_Judge, _Judge],
    src: int,
    dst: int,
    proto: str,
    ports: list[int],
    echo: list[tuple[int, str]],
    n: int,
) -> tuple[str, bool, bool] | None:
    """(the packet, old verdict, new verdict) of the first packet class that differs."""
    # (source port, destination port, TCP ACK, ICMP type << 8 | code, what it is)
    cases: list[tuple[int, int, bool, int, str]] = [(0, 0, False, 0, "packet")]
    if proto in PORT_PROTOCOLS:
        acks = (False, True) if proto == "tcp" else (False,)
        cases = [
            (sp, dp, ack, 0, f"packet from port {sp} to port {dp}" + (" with ACK" if ack else ""))
            for sp in ports
            for dp in ports
            for ack in acks
        ]
    elif proto == "icmp":
        cases = [(0, 0, False, value, f"{what} packet") for value, what in echo]
    for m in range(n):
        for sp, dp, ack, value, what in cases:
            a, b = (j.decide(src, dst, proto, sp, dp, m, ack, value) for j in judges)
            if (a.allowed, a.log, _rate(a)) != (b.allowed, b.log, _rate(b)):
                if a.allowed == b.allowed:  # only the log or the meter differs
                    what += " (log or rate)"
                return what, a.allowed, b.allowed
    return None


def _rate(d: Decision) -> int | None:
    return d.rule.rate_pps if d.allowed and d.rule is not None and d.reason == "allow" else None
