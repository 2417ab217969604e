"""A reference switch that logs every Write it decides and can hold one, for tests of
several controllers on one switch (tests/test_serve_ha_apply.py).

    sw = LoggedSwitch(device_id=1)
    sw.start("127.0.0.1:0")
    hold = sw.hold(lambda w: w.election_id == leader and is_flip(w), before=False)
    assert hold.held.wait(30)     # the flip has landed; its answer is not sent yet
    ...                           # SIGKILL the leader: it never hears back
    hold.release()

The log (`sw.log`) has one `Decided` per Write that reached the primary check, in the
order the switch decided them, with the highest election id the switch had seen at that
moment: the arbiter's lock is held across the check (and only the check), so no
arbitration falls between what the log says and what the switch did. Writes the switch
turned away before the check (wrong device, no pipeline) are not logged.

A hold parks the gRPC handler of one chosen write, before the primary check (the write is
in flight: the test can let another controller take over first) or after the write landed
(its sender waits for the answer and writes nothing more: the test can kill it at exactly
that point). `release(drop=True)` ends a write held before the check without applying it
(UNAVAILABLE), as if its sender had died before sending it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from finsy.proto import p4r

from runtime.refswitch.server import P4RuntimeService, StreamSlots
from runtime.refswitch.switch import ReferenceSwitch

HOLD_LIMIT = 60.0  # seconds a held write waits for its release at most (a failed test)


@dataclass(frozen=True, slots=True)
class Decided:
    """One Write the switch decided: whether it passed the primary check."""

    election_id: int
    highest: int | None  # the highest election id the switch had seen (None: none yet)
    accepted: bool  # it passed the primary check (its updates may still fail on their own)
    updates: tuple[p4r.Update, ...]
    at: float  # time.monotonic() of the decision


@dataclass(frozen=True, slots=True)
class Pending:
    """A Write as a hold's predicate sees it, before or after it landed."""

    election_id: int
    updates: tuple[p4r.Update, ...]


@dataclass(eq=False)
class Hold:
    """One write to park: the first for which `pick` holds."""

    pick: Callable[[Pending], bool]
    before: bool  # park before the primary check; else after the write landed
    held: threading.Event = field(default_factory=threading.Event)  # set while parked
    _released: threading.Event = field(default_factory=threading.Event)
    _drop: bool = False
    write: Pending | None = None

    def release(self, *, drop: bool = False) -> None:
        """Let the parked write go on; `drop` (a hold before the check): end it unapplied."""
        self._drop = drop
        self._released.set()


def election_of(request: p4r.WriteRequest) -> int:
    """The election id a Write carries (P4Runtime's Uint128)."""
    return (request.election_id.high << 64) | request.election_id.low


class _LoggedService(P4RuntimeService):
    def __init__(self, sw: ReferenceSwitch) -> None:
        super().__init__(sw.device, sw.dataplane, sw._transmit, sw.limits)
        # Reentrant: the check below holds it while the arbiter's own check takes it again.
        self.arbiter.lock = threading.RLock()  # type: ignore[assignment]
        self.slots = StreamSlots(self.limits, self.arbiter.lock)
        self.log: list[Decided] = []
        self.holds: list[Hold] = []
        self._holds_lock = threading.Lock()

    def _take(self, pending: Pending, before: bool) -> Hold | None:
        with self._holds_lock:
            for h in self.holds:
                if h.before == before and h.write is None and h.pick(pending):
                    h.write = pending
                    return h
        return None

    def _park(self, hold: Hold, context: grpc.ServicerContext) -> None:
        hold.held.set()
        released = hold._released.wait(HOLD_LIMIT)
        if hold._drop or not released:
            context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test (sender gone)")

    def _check_primary(self, request: object, context: grpc.ServicerContext) -> None:
        if not isinstance(request, p4r.WriteRequest):
            super()._check_primary(request, context)
            return
        election = election_of(request)
        with self.arbiter.lock:
            highest = self.arbiter.highest.get("")
            accepted = False
            try:
                super()._check_primary(request, context)
                accepted = True
            finally:
                self.log.append(Decided(election, highest, accepted, tuple(request.updates),
                                        time.monotonic()))  # fmt: skip

    def Write(self, request: p4r.WriteRequest, context: grpc.ServicerContext) -> p4r.WriteResponse:
        pending = Pending(election_of(request), tuple(request.updates))
        early = self._take(pending, before=True)
        if early is not None:
            self._park(early, context)
        response = super().Write(request, context)
        late = self._take(pending, before=False)
        if late is not None:
            self._park(late, context)
        return response


class LoggedSwitch(ReferenceSwitch):
    """The in-process reference switch, with the write log and holds (module doc)."""

    def __init__(self, device_id: int) -> None:
        super().__init__(device_id)
        self.service = self.logged = _LoggedService(self)

    @property
    def log(self) -> list[Decided]:
        with self.logged.arbiter.lock:
            return list(self.logged.log)

    def hold(self, pick: Callable[[Pending], bool], *, before: bool) -> Hold:
        """Park the first write `pick` chooses from now on (module doc)."""
        h = Hold(pick, before)
        with self.logged._holds_lock:
            self.logged.holds.append(h)
        return h

    def stop(self) -> None:
        for h in self.logged.holds:  # a failed test: never leave a handler parked
            h.release(drop=True)
        super().stop()
