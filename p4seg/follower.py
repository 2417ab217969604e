"""`p4seg serve` follows its switches: logged denies become alerts, alerts and signals go
through the policy engine (runtime/engine.py), and its decisions are carried out.

The follower is the controller's long-lived sessions (runtime/sessions.py: one finsy session
per switch at the applies' election id, which the applies of this process write through)
reading the PacketIns: a switch sends them to its primary only, and the follower is the
primary. Its session is lent to an apply only once it reads them; an apply that opens a
session of its own (to set the pipeline) makes it step aside, and a logged deny on that
switch then reaches no controller (`Follower.gaps`, docs/serve.md).

With `--etcd` only the leader follows (p4seg/serve.py starts a Follower per term and ends
it the moment the term ends): its id is the term's election id, and it never bids above it
(runtime/sessions.CappedArbitration), so a deposed leader's follower can never take a
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
import dataclasses
import json
import sys
import traceback
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from finsy import Switch

from p4seg import verbs
from p4seg.control import EXIT_ERROR, EXIT_OK, Compiled, _rule_lines, options_of, session_of
from p4seg.operations import ApiError, Operations, Outcome
from runtime import audit
from runtime.alerts import Alert, RateLimiter, alert_of
from runtime.controller import ControllerOptions
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
from runtime.sessions import Sessions

ENGINE_PRINCIPAL = "p4seg-engine"  # the audit actor of what the engine decides
ALERTS_FILE = "alerts.jsonl"
QUEUE_SIZE = 10_000  # alerts waiting for the engine; past it they are counted, not judged

AlertSubscriber = Callable[[Alert], None]


class AlertLog:
    """Appends each alert to STATE/alerts.jsonl, one JSON object a line (as `alerts
    --follow` does), for GET /v1/alerts and its stream."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / ALERTS_FILE

    def __call__(self, alert: Alert) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps(alert.to_json(), sort_keys=True) + "\n")


class Follower:
    """The long-lived sessions of one serve, reading PacketIns (see the module docstring).
    `subscribers` are called in the event loop with every admitted alert; one that raises
    is reported and the others still get the alert. With `options.fenced` (--etcd),
    `options.election_id` is the term's, and the follower never bids above it."""

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
        # Lent to an apply once it is the primary and reads the PacketIns (_ready).
        self.sessions = Sessions(options, self._ready)
        self.received = 0  # PacketIns turned into alerts (admitted or not)
        self._rules: tuple[Compiled | None, dict[int, str]] = (None, {})

    @property
    def options(self) -> ControllerOptions:
        return self.sessions.options

    @property
    def ceiling(self) -> int | None:
        return self.sessions.ceiling

    @property
    def gaps(self) -> deque[float]:
        """Seconds from stepping aside for an apply to following again (the last 100)."""
        return self.sessions.gaps

    @property
    def lent(self) -> int:
        """Applies on a switch carried out through the follower's session."""
        return self.sessions.lent

    def is_following(self, switch: str) -> bool:
        """Whether the follower is the switch's primary and reading its PacketIns."""
        return self.sessions.usable(switch)

    def step_aside(self, name: str) -> AbstractAsyncContextManager[object]:
        """While an apply holds switch `name` with a session of its own."""
        return self.sessions.step_aside(name)

    async def run(self) -> None:
        """Wait for the first build, then follow every switch of it until cancelled."""
        while self.ops.last is None:  # the watch loop's first compile
            if not self.ops.watched.is_set():
                await asyncio.to_thread(self.ops.watched.wait, float(self.ops.args.check))
            else:  # it turned without compiling: a standby's turns (--etcd), a broken policy
                await asyncio.sleep(float(self.ops.args.interval))  # a turn's period
        session = session_of("serve", self.ops.args, self.ops.last)
        if session is None:
            return  # reported: the apply path says the same
        # Between operations (under their lock): an apply of this process writing with a
        # session of its own would meet the new sessions at its election id.
        lock = self.ops.lock
        acquiring = asyncio.ensure_future(asyncio.to_thread(lock.acquire))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            acquiring.add_done_callback(lambda _: lock.release())  # once the thread has it
            raise
        try:
            await self.sessions.start(session.switches, session.files)
        finally:
            lock.release()
        await self.sessions.hold()

    async def _ready(self, sw: Switch) -> None:
        """finsy calls this when the channel is ready and again on every change of role."""
        if not sw.is_primary:
            self.sessions.mark(sw.name, False)  # a backup: another holds the switch
            self.ops.observers.primary(sw.name, False)
            return
        packets = aiter(sw.read_packets())
        pending = asyncio.ensure_future(anext(packets))
        await asyncio.sleep(0)  # one turn: the generator has subscribed to PacketIns
        self.sessions.mark(sw.name, True)
        self.ops.observers.primary(sw.name, True)  # p4seg_switch_primary
        try:
            while True:
                packet = await pending
                pending = asyncio.ensure_future(anext(packets))
                self._packet(sw.name, packet.payload, packet.metadata)
        finally:
            self.sessions.mark(sw.name, False)
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
