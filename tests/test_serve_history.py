"""The history check of `p4seg serve --etcd` (issue 15): concurrent API clients quarantine,
release, grant and revoke through three controller processes while the leader is SIGKILLed
again and again; at the end, etcd, the audit chain and the switch (its packets, and its
tables entry by entry) hold exactly what the acknowledged operations imply.

Every call is recorded with its outcome:
- **acknowledged**: 2xx with a body that says `"ok": true`;
- **refused**: an answer that says nothing was stored — a 4xx (unknown grant, a host not
  quarantined, a grant that could not take effect), 503 `standby`, 503 `etcd_unavailable`
  before the verb ran ("nothing was done");
- **ambiguous**: no answer (the connection reset or timed out, as when the controller is
  killed mid-call), or an answer that says the verb ran but may not be stored (502, 503
  `etcd_unavailable` after the verb).
A call refused by a standby is retried at the leader its 503 names (the client's choice:
serve answers 503 rather than forwarding); with no leader named, or a connection refused
(a killed controller not yet restarted), at a random controller; any retry is of a call
that certainly did nothing.

The check, per host and per grant: an acknowledged operation took effect between its call
and its answer; an ambiguous one may have, until its controller was killed (a dead process
stores nothing later, and etcd orders its last fenced write before any successor's) or at
any time if its controller lived. The final value must be one that an operation which is
not certainly followed by an acknowledged one sets (the initial value only if nothing was
acknowledged). The same reasoning judges every "not quarantined" / "unknown grant" answer:
it is wrong when the host or grant was certainly there at that moment.

The clients' choices come from a seed (printed; P4SEG_HISTORY_SEED=N repeats them); the
interleaving is the machine's.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from etcd_cluster import EtcdCluster, etcd_cluster
from p4rt import wait_for
from serve_process import ServeProcesses
from test_cli_controller import _passes, site
from test_serve import OPERATOR, pki
from test_serve_ha import TTL, _stored

from p4seg.cli import main
from p4seg.replication import SHARED_FILES
from runtime.etcdstore import Etcd, EtcdOptions, EtcdStore
from runtime.live import LiveState
from runtime.refswitch.switch import ReferenceSwitch
from runtime.store import StateMirror

__all__ = ["etcd_cluster", "pki", "site"]  # fixtures, used by name

pytestmark = pytest.mark.slow

CONTROLLERS = ("ctl-a", "ctl-b", "ctl-c")
CLIENTS = 4
KILLS = 3
ACKS = 8  # acknowledged calls under each leader before it is killed (and under the last)
HOSTS = ("h1", "h2", "h3")  # h4 is the policy's remediation service: never quarantined
# Grants the policy does not already allow, none with the remediation service (whose flows a
# quarantine keeps): each passes exactly when it is granted and neither end is quarantined.
FLOWS = (("h2", "h1", 7000), ("h3", "h1", 22), ("h3", "h2", 5432), ("h1", "h2", 9000))
POLICY_FLOWS = (("h1", "h3", 8080), ("h2", "h3", 8080))  # allowed while neither end is quarantined
CALL_TIMEOUT = 20.0  # seconds: one HTTP call (a full apply under load takes a few)
RETRY_FOR = 30.0  # seconds: a call refused for want of a leader is retried this long
POLL = 0.05  # seconds between two attempts of a call refused for want of a leader
LOOK = 0.2  # seconds between two looks at the controllers' statuses (each reads the switch)


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP call: `sent` False when the connection was refused (nothing reached the
    controller); status None when no answer came."""

    sent: bool
    status: int | None = None
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> dict[str, Any]:
        error = self.doc.get("error")
        return error if isinstance(error, dict) else {}


def _call(url: str, method: str, path: str, body: object = None) -> Reply:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=CALL_TIMEOUT)
    try:
        try:
            conn.connect()
        except OSError:  # refused or reset before a byte of the request went out
            return Reply(sent=False)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {OPERATOR}", "Content-Type": "application/json"}
        try:
            conn.request(method, path, data, headers)
            response = conn.getresponse()
            text = response.read()
        except (OSError, http.client.HTTPException):  # reset, EOF, timeout: no answer
            return Reply(sent=True)
        try:
            doc = json.loads(text)
        except ValueError:
            doc = {"text": text.decode(errors="replace")}
        return Reply(True, response.status, doc if isinstance(doc, dict) else {"body": doc})
    finally:
        conn.close()


@dataclass(frozen=True, slots=True)
class Call:
    """One operation as its client saw it (the last attempt: earlier ones did nothing)."""

    client: int
    kind: str  # quarantine, release, grant, revoke
    target: str  # the host, the grant's flow (`h2->h1:7000`) or the grant id revoked
    start: float  # monotonic, when the last attempt was sent
    end: float  # monotonic, when its answer (or its failure) came
    outcome: str  # ack, refused, ambiguous, error
    status: int | None
    code: str  # the error's code, if any
    controller: tuple[str, int]  # name, incarnation
    grant: str | None = None  # the id an acknowledged grant got
    message: str = ""  # the error's message, if any

    def line(self) -> str:
        got = self.grant or self.code or ""
        return (f"client {self.client} {self.kind} {self.target} -> {self.outcome} "
                f"{self.status} {got} via {self.controller[0]}#{self.controller[1]} "
                f"[{self.start:.2f}, {self.end:.2f}]")  # fmt: skip


@dataclass(frozen=True, slots=True)
class Effect:
    """A call as the model sees it: what it sets its key to, and from when to when it may
    have done so."""

    call: Call
    value: bool
    start: float
    until: float  # an ambiguous call: until its controller was killed (inf: it lived)


def possible(effects: Iterable[Effect], start: float, end: float, initial: bool) -> set[bool]:
    """The values a key may hold at some moment in [start, end] (inf: after the history)."""
    effects = [e for e in effects if e.start < end]  # those that may precede the moment
    acked = [e for e in effects if e.call.outcome == "ack" and e.until < start]  # surely did
    values = {e.value for e in effects if not any(k.start > e.until for k in acked)}
    if not acked:
        values.add(initial)
    return values


class Floor:
    """The controllers: where each answers, which incarnation runs under each name, and when
    each incarnation was killed."""

    def __init__(self, ctl: ServeProcesses) -> None:
        self.ctl = ctl
        self.lock = threading.Lock()
        self.addresses: dict[str, tuple[str, int]] = {}
        self.killed: dict[tuple[str, int], float] = {}

    def start(self, name: str) -> None:
        url = self.ctl.start(name)  # outside the lock: the clients keep calling meanwhile
        with self.lock:
            self.addresses[name] = url, self.ctl.incarnations[name]

    def address(self, name: str) -> tuple[str, int]:
        with self.lock:
            return self.addresses[name]

    def status(self, name: str) -> dict[str, Any]:
        reply = _call(self.address(name)[0], "GET", "/v1/status")
        return reply.doc if reply.status == 200 else {}

    def leader(self) -> str | None:
        """The controller every running one names as the leader, if it says it leads."""
        named = {(self.status(n).get("leader") or {}).get("name") for n in CONTROLLERS}
        if len(named) != 1:
            return None
        name = named.pop()
        return name if name and self.status(name).get("role") == "leader" else None

    def kill(self, name: str) -> None:
        """SIGKILL `name`; noted once it is reaped (it stores nothing after that)."""
        incarnation = self.address(name)[1]
        self.ctl.kill(name)
        self.killed[name, incarnation] = time.monotonic()


class Client(threading.Thread):
    """Issues random operations, each to a random controller, until told to stop."""

    def __init__(self, index: int, seed: int, floor: Floor, grants: list[str]) -> None:
        super().__init__(name=f"history-client-{index}", daemon=True)
        self.index, self.floor, self.grants = index, floor, grants
        self.rng = random.Random(seed * 100 + index)
        self.calls: list[Call] = []
        self.attempts = Counter[str]()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.calls.append(self.one())

    def one(self) -> Call:
        kind = self.rng.choice(("quarantine", "release", "grant", "revoke"))
        if kind in ("quarantine", "release"):
            host = self.rng.choice(HOSTS)
            method = "PUT" if kind == "quarantine" else "DELETE"
            return self.issue(kind, host, method, f"/v1/quarantine/{host}", {"reason": "history"})
        if kind == "grant":
            src, dst, port = self.rng.choice(FLOWS)
            body = {"src": src, "dst": dst, "proto": "tcp", "ports": str(port), "for": 3600}
            return self.issue(kind, f"{src}->{dst}:{port}", "POST", "/v1/grants", body)
        known = list(self.grants)  # every acknowledged grant, revoked since or not
        grant_id = self.rng.choice(known) if known and self.rng.random() < 0.85 else "00000000"
        return self.issue(kind, grant_id, "DELETE", f"/v1/grants/{grant_id}", {})

    def issue(self, kind: str, target: str, method: str, path: str, body: object) -> Call:
        """One call, retried while it certainly did nothing; its last attempt recorded."""
        deadline = time.monotonic() + RETRY_FOR
        ask: str | None = None  # the leader a standby named
        while True:
            name = ask or self.rng.choice(CONTROLLERS)
            controller = self.floor.address(name)
            start = time.monotonic()
            reply = _call(controller[0], method, path, body)
            end = time.monotonic()
            self.attempts["sent" if reply.sent else "connection refused"] += 1
            status, error = reply.status, reply.error
            if reply.sent and status is None:
                what = "ambiguous"  # no answer: killed (or stuck) mid-call
            elif status == 503 and (error.get("code") == "standby"
                                    or "nothing was done" in str(error.get("message"))):  # fmt: skip
                self.attempts[f"503 {error.get('code')}"] += 1
                leader = error.get("leader")
                ask = leader.get("name") if isinstance(leader, dict) else None
                ask = ask if ask in CONTROLLERS and ask != name else None
                what = "retry"
            elif status is None:
                ask, what = None, "retry"  # connection refused: a killed controller
            elif 200 <= status < 300:
                what = "ack" if reply.doc.get("ok") is True else "error"
            elif status in (502, 503):
                what = "ambiguous"  # the verb ran; a switch failed it, or etcd did not confirm
            else:
                what = "refused" if 400 <= status < 500 else "error"
            if what == "retry" and time.monotonic() <= deadline:
                if ask is None:
                    time.sleep(POLL)  # polling for a leader (or a restarted controller)
                continue
            granted = reply.doc.get("grant") if kind == "grant" and what == "ack" else None
            call = Call(self.index, kind, target, start, end,
                        "refused" if what == "retry" else what, status,
                        str(error.get("code", "")), (name, controller[1]),
                        granted.get("id") if isinstance(granted, dict) else None,
                        str(error.get("message", ""))[:160])  # fmt: skip
            if call.grant is not None:
                self.grants.append(call.grant)
            return call


def _effects(calls: list[Call], killed: dict[tuple[str, int], float]) -> dict[str, list[Effect]]:
    """The calls that may have changed something, by key (`host:h1`, `grant:ID`)."""
    by_key: dict[str, list[Effect]] = {}
    for c in calls:
        if c.outcome not in ("ack", "ambiguous"):
            continue
        until = c.end
        if c.outcome == "ambiguous":
            death = killed.get(c.controller)
            until = death if death is not None and death >= c.start else math.inf
        if c.kind in ("quarantine", "release"):
            key, value = f"host:{c.target}", c.kind == "quarantine"
        elif c.kind == "revoke":
            key, value = f"grant:{c.target}", False
        elif c.grant is not None:
            key, value = f"grant:{c.grant}", True
        else:
            continue  # an ambiguous grant (its id unknown) or one already allowed
        by_key.setdefault(key, []).append(Effect(c, value, c.start, until))
    return by_key


def _wrong_refusals(calls: list[Call], effects: dict[str, list[Effect]]) -> list[tuple[str, str]]:
    """Refusals that say a host is not quarantined, or a grant unknown, while it certainly
    was (a stale view answering), and acknowledged revocations of grants never granted."""
    granted = {c.grant for c in calls if c.grant is not None}
    wrong = []
    for c in calls:
        if c.kind == "release" and c.code == "not_quarantined":
            key = f"host:{c.target}"
        elif c.kind == "revoke" and c.code == "unknown_grant":
            key = f"grant:{c.target}"
        elif c.kind == "revoke" and c.outcome == "ack" and c.target not in granted:
            wrong.append((c.target, f"acknowledged, never granted: {c.line()}"))
            continue
        else:
            continue
        if possible(effects.get(key, []), c.start, c.end, False) == {True}:
            wrong.append((c.target, f"refused while it held: {c.line()}"))
    return wrong


def _flows(state: LiveState) -> dict[tuple[str, str, int], bool]:
    """What the switch must do with each probe flow under `state` (True: pass)."""
    cut = set(state.quarantined)
    granted = {(g.src, g.dst, int(g.ports)) for g in state.grants if g.proto == "tcp"}
    expect = {f: not cut & set(f[:2]) for f in POLICY_FLOWS}
    expect |= {f: f in granted and not cut & set(f[:2]) for f in FLOWS}
    expect[("h1", "h4", 443)] = True  # remediation: kept through a quarantine of h1
    expect[("h3", "h1", 8080)] = False  # never allowed
    return expect


def _pull(cluster: EtcdCluster, state: Path) -> None:
    """Make `state` a state directory holding what etcd holds (as a controller's pull does,
    by a store that only reads)."""

    async def pull() -> None:
        etcd = Etcd(EtcdOptions(cluster.endpoints, "small"))
        try:
            names = [name.removesuffix(".json") for name in SHARED_FILES]
            await StateMirror(EtcdStore(etcd, None), state, names).pull()
        finally:
            await etcd.close()

    state.mkdir()
    asyncio.run(pull())


def _until(condition: Callable[[], object], timeout: float) -> bool:
    return wait_for(lambda: bool(condition()), timeout, every=LOOK)


def _settled(floor: Floor, timeout: float = 30) -> str:
    """The leader, once every controller names it and it says it leads."""
    seen: list[str | None] = []

    def named() -> bool:
        seen.append(floor.leader())
        return seen[-1] is not None

    assert _until(named, timeout), "no leader every controller names"
    assert seen[-1] is not None
    return seen[-1]


def test_history_of_concurrent_operations_while_leaders_are_killed(
    site: tuple[ReferenceSwitch, list[str]],
    pki: Path,
    etcd_cluster: EtcdCluster,
) -> None:
    seed = int(os.environ.get("P4SEG_HISTORY_SEED", random.randrange(1 << 31)))
    print(f"history seed {seed} (P4SEG_HISTORY_SEED={seed} repeats the clients' choices)")
    sw, inv = site
    etcd = ",".join(f"http://{e}" for e in etcd_cluster.endpoints)
    common = ["small.zt", *inv, "--api-tokens", str(pki / "access.yaml")]
    ctl = ServeProcesses(Path.cwd(), common, etcd, TTL)
    floor = Floor(ctl)
    grants: list[str] = []  # acknowledged grant ids, shared by the clients
    clients = [Client(i, seed, floor, grants) for i in range(CLIENTS)]
    try:
        floor.start(CONTROLLERS[0])
        assert _until(lambda: floor.status(CONTROLLERS[0]).get("role") == "leader", 30)
        assert _until(lambda: _passes(sw, "h1", "h3", 8080), 30)  # its first apply
        for name in CONTROLLERS[1:]:
            floor.start(name)
        assert _until(lambda: floor.leader() == CONTROLLERS[0], 30)

        for client in clients:
            client.start()

        def acknowledged() -> int:
            return sum(1 for c in clients for call in list(c.calls) if call.outcome == "ack")

        def more_acknowledged(than: int) -> Callable[[], bool]:
            return lambda: acknowledged() >= than + ACKS

        def taken_over(victim: str) -> Callable[[], bool]:
            survivors = [n for n in CONTROLLERS if n != victim]
            return lambda: any(floor.status(n).get("role") == "leader" for n in survivors)

        takeovers = []
        began, mark = time.monotonic(), 0
        for k in range(1, KILLS + 2):
            # Kill in the thick of it: once the leader acknowledged a few, whatever runs.
            assert _until(more_acknowledged(mark), 120), f"{acknowledged()} acknowledged"
            if k > KILLS:
                break
            victim = _settled(floor)
            floor.kill(victim)
            killed = time.monotonic()
            assert _until(taken_over(victim), 30), f"no survivor of {victim} took over"
            takeovers.append(time.monotonic() - killed)
            mark = acknowledged()
            floor.start(victim)  # a standby under the killed one's name
            print(f"kill {k} at {killed - began:.1f} s: {victim}, {mark} calls acknowledged; "
                  f"a survivor led {takeovers[-1]:.2f} s later")  # fmt: skip
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(timeout=RETRY_FOR + CALL_TIMEOUT + 10)
            assert not client.is_alive()
        final_leader = _settled(floor)

        calls = sorted((call for client in clients for call in client.calls), key=lambda c: c.start)
        outcomes = Counter(f"{c.kind} {c.outcome}" for c in calls)
        attempts = sum((client.attempts for client in clients), Counter[str]())
        print(f"{len(calls)} calls: {dict(sorted(outcomes.items()))}")
        print(f"attempts: {dict(sorted(attempts.items()))}; leader at the end {final_leader}")
        refusals = Counter(
            f"{c.kind} {c.status} {c.message}" for c in calls if c.outcome == "refused"
        )
        for why, count in refusals.most_common():
            print(f"  {count:3d} x {why}")
        for call in calls:
            if call.outcome in ("ambiguous", "error"):
                print(f"  {call.line()}")
        assert not [c for c in calls if c.outcome == "error"], "a controller answered 5xx"
        assert outcomes["quarantine ack"] + outcomes["release ack"] > 0
        assert outcomes["grant ack"] > 0 and outcomes["revoke ack"] > 0

        # (a) etcd holds what the acknowledged operations imply.
        live, records, chained = _stored(etcd_cluster)
        effects = _effects(calls, floor.killed)
        problems: list[tuple[str, str]] = []  # (the host, grant or flow, what is wrong)
        for host in HOSTS:
            allowed = possible(effects.get(f"host:{host}", []), math.inf, math.inf, False)
            if (host in live.quarantined) not in allowed:
                problems.append((host, f"quarantined={host in live.quarantined} in etcd, the "
                                 f"history allows {sorted(allowed)}"))  # fmt: skip
        stored = {g.id: g for g in live.grants}
        acked = {c.grant for c in calls if c.grant is not None}
        for grant_id in acked:
            allowed = possible(effects[f"grant:{grant_id}"], math.inf, math.inf, False)
            if (grant_id in stored) not in allowed:
                problems.append((grant_id, f"in etcd={grant_id in stored}, the history allows "
                                 f"{sorted(allowed)}"))  # fmt: skip
        maybe = Counter(c.target for c in calls if c.kind == "grant" and c.outcome == "ambiguous")
        unknown = Counter(f"{g.src}->{g.dst}:{g.ports}" for g in live.grants if g.id not in acked)
        for flow, count in unknown.items():
            if count > maybe[flow]:
                problems.append((flow, f"{count} grant(s) in etcd that no call may have made "
                                 f"({maybe[flow]} ambiguous)"))  # fmt: skip
        problems += _wrong_refusals(calls, effects)

        # (b) the audit chain verifies, records every acknowledged call, and nothing that no
        # call may have made.
        assert chained, "the audit chain in etcd does not verify"
        audited = Counter((r["event"], str(r.get("grant") or r.get("host"))) for r in records)
        for c in calls:
            what = c.grant if c.kind == "grant" else c.target
            if c.outcome == "ack" and what is not None and not audited[c.kind, what]:
                problems.append((what, f"no audit record of an acknowledged call: {c.line()}"))
        for (event, what), count in audited.items():
            if event in ("quarantine", "release"):
                most = sum(1 for c in calls if (c.kind, c.target) == (event, what)
                           and c.outcome in ("ack", "ambiguous"))  # fmt: skip
                if count > most:
                    problems.append((what, f"{count} {event} records, {most} calls may have "
                                     "made them"))  # fmt: skip
        strays = sum(
            n for (event, what), n in audited.items() if event == "grant" and what not in acked
        )
        if strays > sum(maybe.values()):
            problems.append(("grant", f"{strays} grant records of ids no call was told, "
                             f"{sum(maybe.values())} ambiguous grant calls"))  # fmt: skip
        if problems:
            subjects = {subject for subject, _ in problems}
            history = [c.line() for c in calls if {c.target, c.grant, c.kind} & subjects]
            pytest.fail("\n".join([*(f"{s}: {p}" for s, p in problems), "calls:", *history]))

        # (c) the switch does what etcd says, once the leader's turn brought it there.
        expect = _flows(live)

        def seen() -> dict[tuple[str, str, int], bool]:
            return {f: _passes(sw, *f) for f in expect}

        if not _until(lambda: seen() == expect, 30):
            got = seen()
            rows = [f"  {s}->{d}:{p}  expected {'pass' if v else 'drop'}, "
                    f"{'passes' if got[s, d, p] else 'dropped'}"
                    for (s, d, p), v in expect.items()]  # fmt: skip
            pytest.fail(f"the switch disagrees with etcd (quarantined {sorted(live.quarantined)}"
                        f", grants {sorted(stored)}):\n" + "\n".join(rows))  # fmt: skip
        # ... and holds exactly the tables that etcd's state compiles to, entry by entry (a
        # plan reading every table: 0, nothing to change).
        _pull(etcd_cluster, Path("state-etcd"))
        assert main(["plan", "small.zt", *inv, "--state", "state-etcd", "--full-read"]) == 0
        print(f"final: quarantined {sorted(live.quarantined)}, grants "
              f"{sorted(f'{g.src}->{g.dst}:{g.ports}' for g in live.grants)}; takeovers "
              f"{', '.join(f'{t:.2f}' for t in takeovers)} s (lease TTL {TTL} s)")  # fmt: skip
    finally:
        ctl.stop()


def _effect(value: bool, start: float, until: float, outcome: str = "ack") -> Effect:
    call = Call(0, "quarantine", "h1", start, until, outcome, 200, "", ("ctl-a", 1))
    return Effect(call, value, start, until)


def test_the_model_allows_what_a_history_may_end_in_and_nothing_else() -> None:
    inf = math.inf
    q, r = _effect(True, 1, 2), _effect(False, 3, 4)
    assert possible([], inf, inf, False) == {False}
    assert possible([q, r], inf, inf, False) == {False}  # released after it was quarantined
    assert possible([q, _effect(False, 1.5, 3)], inf, inf, False) == {True, False}  # overlapping
    died = _effect(True, 5, 6, "ambiguous")  # its controller was killed at 6
    assert possible([q, r, died], inf, inf, False) == {True, False}
    assert possible([q, r, died, _effect(False, 7, 8)], inf, inf, False) == {False}
    lived = _effect(True, 5, inf, "ambiguous")  # no answer from a controller that lived on
    assert possible([r, lived, _effect(False, 7, 8)], inf, inf, False) == {True, False}
    assert possible([died], inf, inf, False) == {True, False}  # nothing acknowledged
    # At a moment: during the quarantine call either; after it, quarantined.
    assert possible([q, r], 1.5, 1.5, False) == {True, False}
    assert possible([q, r], 2.5, 2.9, False) == {True}
    assert possible([q, r], 2.5, 3.5, False) == {True, False}
