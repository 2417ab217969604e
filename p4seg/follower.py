"""`p4seg serve` follows its switches: logged denies become alerts, alerts and signals go
through the policy engine (runtime/engine.py), and its decisions are carried out.

The follower holds one long-lived finsy session per switch, at the applies' election id: it
is the controller's session with the switch. A switch sends PacketIns to its primary only,
and the follower is the primary; the applies of this process write through its session
(`lend`, runtime/controller.SharedPrimary): no session to open, and the PacketIns keep
coming. Only an apply that must set the pipeline, or one that finds the follower not the
primary (a switch restarting), opens a session of its own; the follower then steps aside
there (its session ends, and the switch has dropped it) and comes back when the apply is
done, so two live streams never hold one election id. The gap is that apply's time on that
switch: a logged deny then reaches no controller (docs/serve.md).

With `--etcd` only the leader follows (p4seg/serve.py starts a Follower per term and ends
it the moment the term ends): its id is the term's election id, and it never bids
above the term's id (`CappedArbitration`), so a deposed leader's follower can never take a
switch from its successor (docs/serve.md, "Following with --etcd").

Every admitted alert (runtime/alerts.py: parsed, rate-limited per source) goes to each of
`Follower.subscribers`, in the event loop: the alert log (STATE/alerts.jsonl, the format of
`p4seg alerts --follow`), the containment, and whoever else subscribes (metrics, syslog).

Containment: the engine sees every alert and every signal under the operations' lock; its
decisions are carried out as `p4seg signal` carries them out (p4seg/signals.py: a lone
quarantine or release through its ToR's overlay, a restriction by a full apply), audited
with the engine as the actor; its state is saved in STATE/engine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, TypeVar

from finsy import P4Client, Switch
from finsy.grpcutil import GRPCStatusCode
from finsy.p4arbitrator import Arbitrator
from finsy.p4client import P4ClientError, P4RpcStatus
from finsy.proto import U128, p4r, rpc_code

from p4seg import verbs
from p4seg.control import EXIT_ERROR, EXIT_OK, Compiled, _rule_lines, options_of, session_of
from p4seg.operations import ApiError, Operations, Outcome
from runtime import audit
from runtime.alerts import Alert, RateLimiter, alert_of
from runtime.controller import (
    ControllerOptions,
    PipelineFiles,
    SwitchTarget,
    register_shared,
    session_options,
)
from runtime.engine import (
    AlertOnly,
    Decision,
    EngineSettings,
    PolicyEngine,
    Signal,
    SignalError,
    WouldContain,
    decision_json,
)
from runtime.files import file_mark as _stat

ENGINE_PRINCIPAL = "p4seg-engine"  # the audit actor of what the engine decides
ALERTS_FILE = "alerts.jsonl"
QUEUE_SIZE = 10_000  # alerts waiting for the engine; past it they are counted, not judged
RELEASE_WAIT = 1.0  # seconds a stepping-aside follower waits for the switch to drop it

AlertSubscriber = Callable[[Alert], None]
_T = TypeVar("_T")


class AlertLog:
    """Appends each alert to STATE/alerts.jsonl, one JSON object a line (as `alerts
    --follow` does), for GET /v1/alerts and its stream."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / ALERTS_FILE

    def __call__(self, alert: Alert) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps(alert.to_json(), sort_keys=True) + "\n")


class CappedArbitration(Arbitrator):
    """finsy's arbitration, except that it never bids above `ceiling`. finsy bids the
    switch's highest-seen election id whenever the switch has no primary; when that id is
    above the ceiling (a newer etcd leader's), this one stays a backup instead."""

    def __init__(self, initial_election_id: int, ceiling: int, role_name: str = "") -> None:
        super().__init__(initial_election_id, role_name)
        self.ceiling = ceiling

    async def handshake(self, switch: Switch, *, conflict: bool = False) -> None:
        """finsy's handshake (p4arbitrator.py) with the ceiling on its NOT_FOUND loop."""
        assert not self.is_primary
        if conflict:
            self.election_id -= 1
        response = await self._arbitration_request(switch)
        status = P4RpcStatus.from_status(response.status)
        primary_id = U128.decode(response.election_id)
        while status.code == GRPCStatusCode.NOT_FOUND and primary_id <= self.ceiling:
            self.election_id = primary_id
            response = await self._arbitration_request(switch)
            status = P4RpcStatus.from_status(response.status)
            primary_id = U128.decode(response.election_id)
        self.primary_id = primary_id
        self.is_primary = status.code == GRPCStatusCode.OK
        self._check_invariant()  # type: ignore[no-untyped-call]  # finsy leaves it untyped

    async def _request_primary(self, switch: Switch) -> None:
        if self.primary_id <= self.ceiling:  # above it: a newer leader's id, not ours to bid
            await super()._request_primary(switch)


def follower_session(
    target: SwitchTarget,
    files: PipelineFiles,
    options: ControllerOptions,
    ceiling: int | None,
    ready: Callable[[Switch], Coroutine[Any, Any, None]] | None = None,
) -> Switch:
    """A follower's finsy session with one switch (not started): at `options.election_id`,
    reconnecting after failures, never bidding above `ceiling` (None: finsy's own bids);
    finsy calls `ready` when the channel is up and on every change of role."""
    opts = session_options(target, files, options, set_pipeline=False, fail_fast=False)
    switch = Switch(target.name, target.address, opts(ready_handler=ready))
    if ceiling is not None:
        switch._arbitrator = CappedArbitration(options.election_id, ceiling, options.role)
    return switch


class Follower:
    """The long-lived sessions of one serve (see the module docstring). `subscribers` are
    called in the event loop with every admitted alert; one that raises is reported and
    the others still get the alert. With `options.fenced` (--etcd), `options.election_id`
    is the term's, and the follower never bids above it."""

    def __init__(
        self,
        ops: Operations,
        options: ControllerOptions,
        subscribers: list[AlertSubscriber] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.ops = ops
        self.subscribers = subscribers if subscribers is not None else []  # the caller's list
        self.limiter = limiter or RateLimiter()
        self.options = options  # the applies' election id (p4seg/serve.py: the term's)
        # --etcd: the term's id caps the bids (None: finsy bids whatever id the switch saw).
        self.ceiling = options.election_id if options.fenced else None
        self.following: dict[str, threading.Event] = {}  # primary and reading PacketIns
        self.received = 0  # PacketIns turned into alerts (admitted or not)
        # Seconds from stepping aside for an apply to being the primary again (the last 100).
        self.gaps: deque[float] = deque(maxlen=100)
        self.lent = 0  # applies on a switch carried out through the follower's session
        self._switches: dict[str, Switch] = {}
        self._raws: dict[str, P4Client] = {}  # per switch: raw reads for the applies lent to
        self._lending: dict[str, asyncio.Lock] = {}
        self._aside_since: dict[str, float] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._targets: dict[str, SwitchTarget] = {}
        self._files: PipelineFiles | None = None
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._paused: dict[str, int] = {}
        self._rules: tuple[Compiled | None, dict[int, str]] = (None, {})

    def is_following(self, switch: str) -> bool:
        """Whether the follower is the switch's primary and reading its PacketIns."""
        event = self.following.get(switch)
        return event is not None and event.is_set()

    # -- sessions -------------------------------------------------------------------------

    async def run(self) -> None:
        """Wait for the first build, then follow every switch of it until cancelled."""
        self._loop = asyncio.get_running_loop()
        while self.ops.last is None:  # the watch loop's first compile
            if not self.ops.watched.is_set():
                await asyncio.to_thread(self.ops.watched.wait, float(self.ops.args.check))
            else:  # it turned without compiling: a standby's turns (--etcd), a broken policy
                await asyncio.sleep(float(self.ops.args.interval))  # a turn's period
        session = session_of("serve", self.ops.args, self.ops.last)
        if session is None:
            return  # reported: the apply path says the same
        self._files = session.files
        for target in session.switches:
            self._targets[target.name] = target
            self.following[target.name] = threading.Event()
            self._paused[target.name] = 0
            self._lending[target.name] = asyncio.Lock()
            register_shared(target.address, _Shared(self, target.name))
            self._start(target.name)
        try:
            await asyncio.Event().wait()
        finally:
            self._stopping = True  # an apply still running does not bring a session back
            for target in self._targets.values():
                register_shared(target.address, None)
            for name in list(self._runs):
                await self._end(name)

    def _start(self, name: str) -> None:
        target, files = self._targets[name], self._files
        assert files is not None
        switch = follower_session(target, files, self.options, self.ceiling, self._ready)
        self._switches[name] = switch
        # Switch.run reconnects (with finsy's back-off) when the switch restarts.
        self._runs[name] = asyncio.ensure_future(switch.run())

    async def _end(self, name: str) -> None:
        task = self._runs.pop(name, None)
        self._switches.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self.following[name].clear()
        raw = self._raws.pop(name, None)
        if raw is not None:
            await raw.close()

    async def _ready(self, sw: Switch) -> None:
        """finsy calls this when the channel is ready and again on every change of role."""
        following = self.following[sw.name]
        if not sw.is_primary:
            following.clear()  # a backup: an apply holds the switch; finsy calls back
            self.ops.observers.primary(sw.name, False)
            return
        packets = aiter(sw.read_packets())
        pending = asyncio.ensure_future(anext(packets))
        await asyncio.sleep(0)  # one turn: the generator has subscribed to PacketIns
        following.set()
        self.ops.observers.primary(sw.name, True)  # p4seg_switch_primary
        if (since := self._aside_since.pop(sw.name, None)) is not None:
            self.gaps.append(time.monotonic() - since)
        try:
            while True:
                packet = await pending
                pending = asyncio.ensure_future(anext(packets))
                self._packet(sw.name, packet.payload, packet.metadata)
        finally:
            following.clear()
            self.ops.observers.primary(sw.name, False)
            pending.cancel()

    def _packet(self, switch: str, payload: bytes, metadata: dict[str, int]) -> None:
        now = verbs.clock()
        self.received += 1
        alert = alert_of(switch, payload, metadata, self.rules(), now)
        suppressed = self.limiter.admit(alert.src, now)
        if suppressed is None:
            return
        alert = dataclasses.replace(alert, suppressed=suppressed)
        for subscriber in list(self.subscribers):
            try:
                subscriber(alert)
            except Exception:  # one subscriber's bug must not stop the others, nor following
                print(f"p4seg serve: alert subscriber {subscriber!r} failed", file=sys.stderr)
                traceback.print_exc()

    def rules(self) -> dict[int, str]:
        """Rule id -> "line N: rule" of the last build (the alerts' `rule`)."""
        last = self.ops.last
        if last is not None and self._rules[0] is not last:
            self._rules = (last, _rule_lines(last.build))
        return self._rules[1]

    # -- an apply on the follower's session, or beside it ---------------------------------

    async def lend(
        self,
        name: str,
        election_id: int,
        work: Callable[[Switch, P4Client], Awaitable[bool]],
    ) -> bool:
        """runtime/controller.SharedPrimary.lend for switch `name`: `work` runs in the
        follower's loop while its session there is the primary, one apply at a time."""

        async def lent() -> bool:
            async with self._lending[name]:
                sw = self._switches.get(name)
                if (
                    sw is None
                    or election_id != self.options.election_id  # another controller's
                    or self._paused[name]
                    or not self.is_following(name)
                    or not sw.is_primary
                    or sw.election_id > election_id  # bid up to another controller's id
                ):
                    return False
                done = await work(sw, await self._raw(name))
                self.lent += done
                return done

        return await self._in_loop(lent())

    async def _raw(self, name: str) -> P4Client:
        """The client an apply lent the session reads with (reads need no arbitration)."""
        raw = self._raws.get(name)
        if raw is None:
            target = self._targets[name]
            raw = P4Client(target.address, self.options.tls, wait_for_ready=False)
            await raw.open()
            self._raws[name] = raw
        return raw

    @contextlib.asynccontextmanager
    async def step_aside(self, name: str) -> AsyncIterator[None]:
        """While an apply holds switch `name` with a session of its own (SharedPrimary)."""
        await self._in_loop(self._pause(name))
        try:
            yield
        finally:
            await self._in_loop(self._resume(name))

    async def _in_loop(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run `coroutine` in the follower's loop (applies run in their own, in a thread)."""
        assert self._loop is not None
        if asyncio.get_running_loop() is self._loop:
            return await coroutine
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    async def _pause(self, name: str) -> None:
        self._paused[name] += 1
        self._aside_since.setdefault(name, time.monotonic())
        if name in self._runs:
            await self._end(name)
            await self._dropped(self._targets[name])

    async def _resume(self, name: str) -> None:
        self._paused[name] -= 1
        if self._paused[name] == 0 and name not in self._runs and not self._stopping:
            self._start(name)

    async def _dropped(self, target: SwitchTarget) -> None:
        """Until the switch has dropped our stream (it then has no primary), at most
        RELEASE_WAIT: asked on a stream without an election id, which never conflicts."""
        request = p4r.StreamMessageRequest(
            arbitration=p4r.MasterArbitrationUpdate(device_id=target.device_id)
        )
        deadline = asyncio.get_running_loop().time() + RELEASE_WAIT
        while asyncio.get_running_loop().time() < deadline:
            try:
                async with P4Client(target.address, self.options.tls,
                                    wait_for_ready=False) as client:  # fmt: skip
                    await client.send(request)
                    reply = await asyncio.wait_for(client.receive(), RELEASE_WAIT)
            except (P4ClientError, TimeoutError, OSError):
                return  # unreachable: nothing of ours is held there either
            if reply.arbitration.status.code != rpc_code.ALREADY_EXISTS:
                return  # no primary: our stream is gone
            await asyncio.sleep(0.005)  # the switch has not seen our stream end yet


@dataclasses.dataclass(frozen=True, slots=True)
class _Shared:
    """The follower's session with one switch, as runtime/controller.py shares it."""

    follower: Follower
    name: str

    async def lend(
        self, election_id: int, work: Callable[[Switch, P4Client], Awaitable[bool]]
    ) -> bool:
        return await self.follower.lend(self.name, election_id, work)

    def aside(self) -> AbstractAsyncContextManager[object]:
        return self.follower.step_aside(self.name)


@dataclasses.dataclass(frozen=True, slots=True)
class Carried:
    """What the engine decided about one input, and how carrying it out went."""

    decisions: tuple[Decision, ...]
    outcome: Outcome


class SignalRefused(Exception):
    """The engine refused a signal (SignalError) with the policy's declared signals."""

    def __init__(self, message: str, declared: list[str]) -> None:
        super().__init__(message)
        self.declared = declared


class Containment:
    """The policy engine of one serve: alerts and signals in, decisions carried out. Its
    engine is touched under the operations' lock only."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.dropped = 0  # alerts the engine never saw (its queue was full)
        # --contain-dry-run: the engine (signals too) only reports WouldContain, audited;
        # nothing is held or written, engine.json included.
        self.dry_run = bool(getattr(ops.args, "contain_dry_run", False))
        self._engine: PolicyEngine | None = None
        self._settings: EngineSettings | None = None  # of the last policy text that compiled
        self._files: object = None  # the policy's and inventory's stat when last read
        self._saved: object = None  # engine.json's stat when the engine was last loaded/saved
        self._queue: asyncio.Queue[Alert] | None = None

    # -- the engine -----------------------------------------------------------------------

    def engine(self) -> PolicyEngine | None:
        """The engine for the policy file as it is now (under the lock); the last settings
        if the file does not compile (fail closed: its holds stand). Its state is reloaded
        when engine.json changed under it (--etcd: a pull brought another leader's)."""
        from p4seg.signals import ENGINE_FILE, _settings, load_engine

        args = self.ops.args
        files = (_stat(Path(args.policy)), _stat(Path(args.inventory)))
        saved = _stat(self.ops.state_dir / ENGINE_FILE)
        if self._engine is not None and (files, saved) == (self._files, self._saved):
            return self._engine
        if files != self._files:  # said once per edit of the files, not on every call
            self._files = files
            loaded = _settings(args)
            if loaded is not None:
                self._settings = loaded[0]
        if self._settings is None:
            return None
        try:
            if self._engine is None or saved != self._saved:
                self._engine = load_engine(self.ops.state_dir, self._settings, self.dry_run)
            else:
                self._engine = _copy(self._engine, self._settings, self.dry_run)
        except ValueError as err:
            raise ApiError(500, "state", str(err)) from None
        self._saved = saved
        return self._engine

    def _save(self, state_dir: Path, engine: PolicyEngine) -> None:
        """Save the engine's state; the file then holds what this engine holds."""
        from p4seg.signals import ENGINE_FILE, save_engine

        save_engine(state_dir, engine)
        self._saved = _stat(state_dir / ENGINE_FILE)

    def active_signals(self) -> list[dict[str, object]]:
        """The signals in force (GET /v1/status): host, name, source, reason, expiry."""
        engine = self.engine()
        if engine is None:
            return []
        now = verbs.clock()
        out: list[dict[str, object]] = []
        for host, held in sorted(engine.holds.items()):
            for h in held.values():
                if h.origin == "signal" and h.active(now):
                    source, _, name = h.key.partition(" ")
                    expires = None if h.until is None else _iso(h.until)
                    out.append({"host": host, "name": name, "source": source,
                                "reason": h.reason, "expires": expires})  # fmt: skip
        return out

    # -- inputs ---------------------------------------------------------------------------

    def subscriber(self) -> AlertSubscriber:
        """The follower's subscriber: alerts queued for `consume` (in the event loop)."""
        self._queue = asyncio.Queue(QUEUE_SIZE)
        queue = self._queue

        def put(alert: Alert) -> None:
            try:
                queue.put_nowait(alert)
            except asyncio.QueueFull:
                self.dropped += 1

        return put

    async def consume(self) -> None:
        """Judge the queued alerts one at a time, in a worker thread, until cancelled."""
        assert self._queue is not None
        while True:
            alert = await self._queue.get()
            try:
                await asyncio.to_thread(self.observe, alert)
            except ApiError as err:  # a damaged engine state: said; the next alert retries
                print(f"p4seg serve: containment: {err.message}", file=sys.stderr)

    async def ticks(self) -> None:
        """Carry out what the engine's clock decides (holds lapsing), until cancelled."""
        while True:
            try:
                pause = await asyncio.to_thread(self.tick)
            except ApiError as err:
                print(f"p4seg serve: containment: {err.message}", file=sys.stderr)
                pause = float(self.ops.args.check)
            await asyncio.sleep(pause)

    def observe(self, alert: Alert) -> Carried:
        """One alert through the engine (worker thread); none when the policy has no
        `contain` statement (nothing to count: no operation, no etcd round trip)."""
        with self.ops.lock:
            engine = self.engine()
            if engine is None or not engine.settings.containment:
                return Carried((), Outcome(EXIT_OK, None, "", ""))

        def decide(engine: PolicyEngine, now: float) -> list[Decision]:
            return engine.tick(now) + engine.observe(alert, now)

        event: dict[str, object] = {"alert": alert.to_json()}
        return self._run("contain", ENGINE_PRINCIPAL, decide, event, self.dry_run)

    def tick(self) -> float:
        """Carry out what is due now (worker thread); seconds until the next look."""
        period = float(self.ops.args.check)
        if not self.ops.leads():  # --etcd: a standby's engine decides nothing
            return period
        with self.ops.lock:
            engine = self.engine()
            now = verbs.clock()
            due = None if engine is None else engine.next_change(now)
            # next_change counts active holds only: one past its end (the clock moved on
            # while nothing ticked) is due now.
            lapsed = engine is not None and any(
                not h.active(now) for held in engine.holds.values() for h in held.values()
            )
        if lapsed or (due is not None and due <= now):
            self._run("contain", ENGINE_PRINCIPAL, lambda e, t: e.tick(t), {}, self.dry_run)
            return 0.05
        return period if due is None else max(0.05, min(period, due - now))

    def signal(self, principal: str, signal: Signal, dry_run: bool = False) -> Carried:
        """A signal (POST /v1/signals) through the engine (worker thread); SignalRefused
        before anything changes when the engine refuses it."""

        def decide(engine: PolicyEngine, now: float) -> list[Decision]:
            at = dataclasses.replace(signal, at=now)
            trial = _copy(engine, engine.settings, dry_run=True)
            try:
                trial.signal(at)  # refused before the real engine ticks (nothing changes)
            except SignalError as err:
                declared = [s.name for s in engine.settings.signals]
                raise SignalRefused(str(err), declared) from None
            if dry_run:  # a copy decides: the engine itself is left as it was
                engine = _copy(engine, engine.settings, dry_run=True)
            return engine.tick(now) + engine.signal(at)

        event: dict[str, object] = {"host": signal.host, "signal": {"name": signal.name, "source": signal.source,
                                                 "ttl": signal.ttl, "reason": signal.reason}}  # fmt: skip
        return self._run("signal", principal, decide, event, dry_run or self.dry_run)

    # -- carrying out ---------------------------------------------------------------------

    def _run(
        self,
        verb: str,
        principal: str,
        decide: Callable[[PolicyEngine, float], list[Decision]],
        event: dict[str, object],
        dry_run: bool = False,
    ) -> Carried:
        decided: list[Decision] = []

        def handler(args: argparse.Namespace, front: verbs.Front) -> int:
            engine = self.engine()
            if engine is None:
                print("p4seg serve: the policy does not compile: no engine", file=sys.stderr)
                return EXIT_ERROR
            now = verbs.clock()
            decided.extend(decide(engine, now))
            return self._carry_out(args, front, engine, decided, now, event, dry_run)

        via = "engine" if principal == ENGINE_PRINCIPAL else "api"
        outcome = self.ops.operate(verb, principal, {}, {}, handler=handler, via=via)
        if decided and principal == ENGINE_PRINCIPAL:  # the serve log: what the engine did
            from p4seg.signals import describe

            for d in decided:
                print(f"p4seg serve: engine: {describe(d)}", file=sys.stderr, flush=True)
            if outcome.code != EXIT_OK:
                print(f"p4seg serve: engine: not carried out: {outcome.errors}", file=sys.stderr,
                      flush=True)  # fmt: skip
        return Carried(tuple(decided), outcome)

    def _carry_out(
        self,
        args: argparse.Namespace,
        front: verbs.Front,
        engine: PolicyEngine,
        decisions: list[Decision],
        now: float,
        event: dict[str, object],
        dry_run: bool,
    ) -> int:
        """The engine's decisions into the live state and onto the switches (under the
        lock): as `p4seg signal` does; alerts only and dry runs are audited, not applied."""
        from p4seg.signals import _write, hold

        state_dir = Path(args.state)
        if not decisions:
            if not dry_run:
                self._save(state_dir, engine)  # its counting windows
            return EXIT_OK
        acting = [d for d in decisions if not isinstance(d, AlertOnly | WouldContain)]
        hosts = sorted({d.host for d in (acting or decisions)})
        fields = {**event, "host": ", ".join(hosts),
                  "decisions": [decision_json(d) for d in decisions]}  # fmt: skip
        verb = "signal" if "signal" in event else "contain"
        state = verbs._load_state(args, verb)
        if state is None:
            return EXIT_ERROR
        if dry_run or not hold(state, decisions, now):
            if not dry_run:
                self._save(state_dir, engine)
            result = "dry run" if dry_run else "alert only" if not acting else "no change"
            audit.append(state_dir / "audit.jsonl", verb, **fields, result=result)
            return EXIT_OK
        code = _write(args, front, state, decisions, fields)
        if code == EXIT_OK:
            self._save(state_dir, engine)
        else:  # not carried out: forget the decision; the next denies or signal decide again
            self._engine = None
        return code


def _copy(engine: PolicyEngine, settings: EngineSettings, dry_run: bool = False) -> PolicyEngine:
    """The engine's state under `settings`, as saved and loaded (JSON: tuples become lists)."""
    return PolicyEngine.from_json(json.loads(json.dumps(engine.to_json())), settings, dry_run)


def _iso(moment: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")


def controller_options(ops: Operations) -> ControllerOptions | str:
    """The options of the follower's sessions: the applies' (a problem: its message)."""
    return options_of(ops.args)
