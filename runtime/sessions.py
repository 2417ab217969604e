"""The long-lived controller: one finsy session per switch, kept open, that applies write
through.

A one-shot `p4seg apply` opens a session per switch, arbitrates, writes and closes. A
long-lived controller (`p4seg serve`; the long-running figures of bench/bench_controller.py)
keeps a finsy `Switch` per switch instead, at the applies' election id, run by finsy's
`Switch.run`: it reconnects when the switch restarts and calls the ready handler when the
channel is up and on every change of role. While a session is the switch's primary, an
apply of this process plans and writes on it (`Sessions.lend`, registered with
runtime/controller.py as the switch's `SharedPrimary`): no session to open, no arbitration,
and the switch's PacketIns keep reaching whoever reads them (p4seg serve's follower). An
apply that must set the pipeline, or that finds the session not the primary (still
reconnecting), opens a session of its own; the long-lived one steps aside there (it ends,
and the switch has dropped it) and comes back when the apply is done, so two live streams
never hold one election id (`Sessions.gaps`: how long it was away).

Each `Sessions` runs in one event loop; applies run in loops of their own (one per
operation, runtime/grpc_loops.py) and hop into it (`_in_loop`).

With `options.fenced` (serve --etcd) the sessions never bid above their election id, the
term's (`CappedArbitration`), so a deposed leader's session can never take a switch from
its successor (docs/serve.md, "Following with --etcd").
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from finsy import P4Client, Switch, SwitchEvent
from finsy.grpcutil import GRPCStatusCode
from finsy.p4arbitrator import Arbitrator
from finsy.p4client import P4ClientError, P4RpcStatus
from finsy.proto import U128, p4r, rpc_code

from runtime import grpc_loops
from runtime.controller import (
    ControllerOptions,
    PipelineFiles,
    SwitchTarget,
    Tenure,
    register_shared,
    session_options,
)

RELEASE_WAIT = 1.0  # seconds a session stepping aside waits for the switch to drop it
READY_WAIT = 10.0  # seconds `running` waits for every session to be the primary
_T = TypeVar("_T")
_TENURE_ENDS = (
    SwitchEvent.CHANNEL_UP,
    SwitchEvent.CHANNEL_DOWN,
    SwitchEvent.BECOME_PRIMARY,
    SwitchEvent.BECOME_BACKUP,
)
Ready = Callable[[Switch], Coroutine[Any, Any, None]]


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


def controller_session(
    target: SwitchTarget,
    files: PipelineFiles,
    options: ControllerOptions,
    ceiling: int | None,
    ready: Ready | None = None,
) -> Switch:
    """A long-lived finsy session with one switch (not started): at `options.election_id`,
    reconnecting after failures, never bidding above `ceiling` (None: finsy's own bids);
    finsy calls `ready` when the channel is up and on every change of role."""
    opts = session_options(target, files, options, set_pipeline=False, fail_fast=False)
    switch = Switch(target.name, target.address, opts(ready_handler=ready))
    if ceiling is not None:  # finsy takes no arbitrator as an option
        switch._arbitrator = CappedArbitration(options.election_id, ceiling, options.role)
    return switch


class Sessions:
    """The long-lived sessions of one controller (see the module docstring).

    `ready`: called by finsy when a session's channel is up and on every change of role;
    it says through `mark` when the session may be lent (p4seg serve's follower: once it
    reads the PacketIns). Without it, a session may be lent whenever it is the primary."""

    def __init__(self, options: ControllerOptions, ready: Ready | None = None) -> None:
        self.options = options  # the applies' (p4seg serve --etcd: the term's)
        # --etcd: the term's id caps the bids (None: finsy bids whatever id the switch saw).
        self.ceiling = options.election_id if options.fenced else None
        # Seconds from stepping aside for an apply to being the primary again (the last 100).
        self.gaps: deque[float] = deque(maxlen=100)
        self.lent = 0  # applies on a switch carried out through these sessions
        self._ready = ready or self._primary
        self._usable: dict[str, threading.Event] = {}
        self._switches: dict[str, Switch] = {}
        self._tenures: dict[str, Tenure] = {}  # per switch: what its session knows it holds
        self._raws: dict[str, P4Client] = {}  # per switch: raw reads for the applies lent to
        self._lending: dict[str, asyncio.Lock] = {}
        self._aside_since: dict[str, float] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._targets: dict[str, SwitchTarget] = {}
        self._files: PipelineFiles | None = None
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._paused: dict[str, int] = {}
        self.started = threading.Event()  # every session of `run` started

    def usable(self, switch: str) -> bool:
        """Whether an apply on `switch` would be lent its session now."""
        event = self._usable.get(switch)
        return event is not None and event.is_set()

    def wait_usable(self, switch: str, timeout: float) -> bool:
        """Until an apply on `switch` would be lent its session, at most `timeout` s."""
        return self._usable[switch].wait(timeout)

    def mark(self, switch: str, usable: bool) -> None:
        """From the ready handler: the session may (not) be lent from now on."""
        event = self._usable[switch]
        if not usable:
            event.clear()
            return
        event.set()
        if (since := self._aside_since.pop(switch, None)) is not None:
            self.gaps.append(time.monotonic() - since)

    async def _primary(self, sw: Switch) -> None:
        self.mark(sw.name, sw.is_primary)

    # -- sessions -------------------------------------------------------------------------

    async def run(self, targets: Sequence[SwitchTarget], files: PipelineFiles) -> None:
        """Hold a session with every switch of `targets` until cancelled."""
        await self.start(targets, files)
        await self.hold()

    async def start(self, targets: Sequence[SwitchTarget], files: PipelineFiles) -> None:
        """Register and start a session with every switch of `targets`, in the sessions'
        loop. From then on every apply of this process on them is lent its session or
        steps it aside; an apply already writing with a session of its own would meet it
        at the same election id (p4seg/follower.py starts between operations)."""
        self._loop = asyncio.get_running_loop()
        self._files = files
        for target in targets:
            self._targets[target.name] = target
            self._usable[target.name] = threading.Event()
            self._paused[target.name] = 0
            self._lending[target.name] = asyncio.Lock()
            register_shared(target.address, _Shared(self, target.name))
            self._start(target.name)
        self.started.set()

    async def hold(self) -> None:
        """Until cancelled; then every session ends and is unregistered."""
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
        switch = controller_session(target, files, self.options, self.ceiling, self._ready)
        self._switches[name] = switch
        self._tenures[name] = Tenure()
        # Any change of the stream or of the role ends what the session knew: a restart,
        # another primary (who may write), ours again after it.
        for event in _TENURE_ENDS:
            switch.ee.on(event, lambda sw: self._tenures.__setitem__(sw.name, Tenure()))
        # Switch.run reconnects (with finsy's back-off) when the switch restarts.
        self._runs[name] = asyncio.ensure_future(switch.run())

    async def _end(self, name: str) -> None:
        task = self._runs.pop(name, None)
        self._switches.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self._usable[name].clear()
        raw = self._raws.pop(name, None)
        if raw is not None:
            await raw.close()

    # -- an apply on the session, or beside it --------------------------------------------

    async def lend(
        self,
        name: str,
        election_id: int,
        work: Callable[[Switch, P4Client, Tenure], Awaitable[bool]],
    ) -> bool:
        """runtime/controller.SharedPrimary.lend for switch `name`: `work` runs in the
        sessions' loop while the session there is usable and the primary, one at a time."""

        async def lent() -> bool:
            async with self._lending[name]:
                sw = self._switches.get(name)
                if (
                    sw is None
                    or election_id != self.options.election_id  # another controller's
                    or self._paused[name]
                    or not self.usable(name)
                    or not sw.is_primary
                    # Fenced (serve --etcd): written as the term's id or not at all.
                    or (self.options.fenced and sw.election_id != election_id)
                ):
                    return False
                done = await work(sw, await self._raw(name), self._tenures[name])
                self.lent += done
                return done

        try:
            return await self._in_loop(lent())
        except asyncio.CancelledError:
            if _cancelling():
                raise  # the apply itself is cancelled
            # The sessions' loop ended the work (the sessions stop: a term of serve --etcd
            # is over): not lent. The apply goes on as with a session that is not usable.
            return False

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
        paused = await self._beside(self._pause(name))
        try:
            yield
        finally:
            if paused:
                await self._beside(self._resume(name))

    async def _beside(self, coroutine: Coroutine[Any, Any, None]) -> bool:
        """`coroutine` in the sessions' loop; False when that loop ended it (the sessions
        stop, and with them what it would have paused or resumed)."""
        try:
            await self._in_loop(coroutine)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            return False
        return True

    async def _in_loop(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run `coroutine` in the sessions' loop (applies run in their own, in a thread)."""
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


def _cancelling() -> bool:
    """Whether the running task is being cancelled (not only a future it awaited)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass(frozen=True, slots=True)
class _Shared:
    """One switch's session, as runtime/controller.py shares it."""

    sessions: Sessions
    name: str

    async def lend(
        self, election_id: int, work: Callable[[Switch, P4Client, Tenure], Awaitable[bool]]
    ) -> bool:
        return await self.sessions.lend(self.name, election_id, work)

    def aside(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self.sessions.step_aside(self.name)


@contextlib.contextmanager
def running(
    sessions: Sessions,
    targets: Sequence[SwitchTarget],
    files: PipelineFiles,
    wait: float = READY_WAIT,
) -> Iterator[Sessions]:
    """`sessions` held in an event loop of their own, in a thread, for a synchronous
    long-lived caller (bench/bench_controller.py's long-running controller); waits up to
    `wait` s for every session to be usable (those that are not are not lent to)."""
    loop = asyncio.new_event_loop()
    grpc_loops.ignore_closed_loop_events(loop)
    thread = threading.Thread(target=loop.run_forever, name="p4seg-sessions", daemon=True)
    thread.start()
    held = asyncio.run_coroutine_threadsafe(sessions.run(targets, files), loop)
    try:
        deadline = time.monotonic() + wait
        sessions.started.wait(wait)
        for target in targets:
            if sessions.started.is_set():
                sessions.wait_usable(target.name, max(0.0, deadline - time.monotonic()))
        yield sessions
    finally:
        held.cancel()  # the sessions end in their loop, before it stops

        async def drained() -> None:
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:
                await asyncio.wait(others, timeout=RELEASE_WAIT + 5)

        asyncio.run_coroutine_threadsafe(drained(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
