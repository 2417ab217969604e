"""`p4seg serve --etcd`: the seat of one controller among several sharing a floor in etcd.

serve runs its verbs in worker threads, one at a time under its lock, on files in the state
directory. With etcd, each operation becomes:

    election_id = replication.begin()   # leader only (else NotLeader naming the leader);
                                        # the state directory is what etcd holds
    ... the verb, as P4Runtime primary with that election id ...
    replication.end()                   # the changed state files and the verb's audit
                                        # records, in one fenced etcd transaction
    ... only now acknowledge the caller ...

An operation whose `end()` fails was not acknowledged: the switches may hold it, etcd does
not, and the next leader brings the switches back to what etcd holds. The election, lease
refresh and fencing are runtime/etcdstore.py's; this module only bridges serve's threads to
the asyncio loop that owns the etcd connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from p4seg.allocations import STATE_FILE as ALLOCATION_FILE
from p4seg.control import APPLIED_RULES
from p4seg.operations import NOTES_FILE
from p4seg.signals import ENGINE_FILE
from p4seg.spines import DOWN_FILE
from p4seg.verbs import PROOF_FILE
from runtime.controller import ControllerError
from runtime.etcdstore import Replica, Role, status
from runtime.live import STATE_FILE as LIVE_FILE
from runtime.store import NotLeader, StateMirror, StoreUnavailable

T = TypeVar("T")

# The state directory's files that are the floor's state (not a controller's own: alerts,
# the last `up` matrix): each is the etcd document of its name without `.json`.
SHARED_FILES = (LIVE_FILE, ALLOCATION_FILE, ENGINE_FILE, NOTES_FILE, APPLIED_RULES, PROOF_FILE,
                DOWN_FILE)  # fmt: skip


class Replication:
    """A started Replica on `loop` (serve's event loop) and the mirror of `state_dir`; the
    methods are for worker threads, never for the loop itself."""

    def __init__(self, replica: Replica, state_dir: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.replica = replica
        self.loop = loop
        names = [name.removesuffix(".json") for name in SHARED_FILES]
        self.mirror = StateMirror(replica.store, state_dir, names)
        # The term whose pull the state directory holds (None: unsure, after a push that
        # was not confirmed): only the leader writes, so its copy stays current.
        self._pulled: int | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            # Every etcd request has its own deadline; this bounds a pull or push of them all.
            return future.result(timeout=self.replica.etcd.options.timeout * 4)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise StoreUnavailable("etcd: the state was not read or written in time") from None

    def begin(self, *, fresh: bool = True) -> int:
        """Before an operation: this controller's P4Runtime election id, once the state
        directory holds what etcd holds; NotLeader on a standby, StoreUnavailable when etcd
        cannot be read. `fresh`: read etcd even if this term's copy is current (an
        operation a caller waits for must not start while etcd is unreachable); else
        once per term (the watch loop's turns)."""
        term = self.replica.elector.fence()
        if fresh or self._pulled != term.create_revision:
            self._run(self.mirror.pull())
            self._pulled = term.create_revision
        return term.election_id

    def refresh(self) -> None:
        """On a standby: the state directory made what etcd holds, for its GET answers
        and so that a takeover starts from a recent copy (StoreUnavailable when etcd
        cannot be read). Reads only: a standby never pushes."""
        self._run(self.mirror.pull())

    def end(self) -> None:
        """After an operation: what it changed is in etcd (NotLeader if this controller was
        deposed meanwhile: nothing of it was stored)."""
        try:
            self._run(self.mirror.push())
        except BaseException:
            self._pulled = None  # what etcd holds is unsure: pull before the next operation
            raise

    def still_leads(self, election_id: int) -> None:
        """Before every switch write (ControllerOptions.fence): ControllerError unless this
        controller still leads with `election_id`. An operation's writes stop once the
        lease may lapse (no refresh for ttl - margin), not only its next operation."""
        try:
            term = self.replica.elector.fence()
        except NotLeader as err:
            raise ControllerError(f"{err}: nothing more written") from None
        if term.election_id != election_id:
            raise ControllerError(f"this controller leads with election id {term.election_id} "
                                  f"now, not {election_id}: nothing more written")  # fmt: skip

    def leads(self) -> bool:
        """Whether this controller leads now (no etcd request)."""
        return self.replica.elector.role is Role.LEADER

    def status(self) -> dict[str, Any]:
        """`GET /v1/status`'s replication part: role, leader, election id, endpoints."""
        return status(self.replica)
