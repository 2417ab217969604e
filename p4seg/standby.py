"""A standby's backup streams (`p4seg serve --etcd`): while this controller stands by, one
P4Runtime stream per switch, arbitrated without an election id.

A stream without an election id is a backup in P4Runtime: it may read, never write, and it
outranks no controller that has an id. (The reference switch keeps it a backup for good;
PI/BMv2 counts it as election id 0, so there it is the primary only while no controller
with an id is connected, and then receives PacketIns, which are dropped here.) Every change
of primary is announced on every stream of the role, so without polling the standby knows
whether each switch answers it and which election id the switch's primary holds — the
leader's term (its follower's): GET /v1/status shows it per switch
(`backup`), so an operator sees, from any controller, that the switches follow the leader
etcd elected. The streams end the moment this controller leads (its term's follower and
applies hold their own sessions) and open again when it stands by.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from typing import Protocol

import grpc
from finsy import P4Client
from finsy.grpcutil import GRPCCredentialsTLS
from finsy.p4client import P4ClientError
from finsy.proto import U128, p4r, rpc_code

RETRY_FIRST = 0.1  # seconds before a lost stream is opened again (doubling)
RETRY_MAX = 2.0


class Reachable(Protocol):
    """Where a switch is (runtime/controller.py SwitchTarget is one)."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def device_id(self) -> int: ...


@dataclasses.dataclass(frozen=True, slots=True)
class BackupView:
    """One switch as the standby's stream last saw it."""

    connected: bool
    primary_election_id: int | None = None  # the switch's primary (None: it has none)
    error: str | None = None  # why the stream is down
    since: float = dataclasses.field(default_factory=time.time)  # of this view

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"connected": self.connected,
                                  "primary_election_id": self.primary_election_id}  # fmt: skip
        if self.error is not None:
            out["error"] = self.error
        return out


def primary_of(update: p4r.MasterArbitrationUpdate) -> int | None:
    """The election id of the switch's primary in an arbitration notice to a backup stream
    (None: no controller with an id is primary; on PI/BMv2 the stream itself then is, as
    election id 0, which is no controller's)."""
    if update.status.code in (rpc_code.NOT_FOUND, rpc_code.OK):
        return None
    return int(U128.decode(update.election_id))


class BackupStreams:
    """The backup streams of one standby; `view` is what each switch's last said."""

    def __init__(self, view: dict[str, BackupView] | None = None) -> None:
        self.view: dict[str, BackupView] = {} if view is None else view  # the caller's

    async def run(self, targets: Sequence[Reachable], tls: GRPCCredentialsTLS | None) -> None:
        """Hold a stream to every target, reopening lost ones, until cancelled."""
        await asyncio.gather(*(self._hold(t, tls) for t in targets))

    async def _hold(self, target: Reachable, tls: GRPCCredentialsTLS | None) -> None:
        pause = RETRY_FIRST
        request = p4r.StreamMessageRequest(
            arbitration=p4r.MasterArbitrationUpdate(device_id=target.device_id)
        )
        while True:
            try:
                async with P4Client(target.address, tls, wait_for_ready=False) as client:
                    await client.send(request)
                    while True:
                        reply = await client.receive()
                        if reply.HasField("arbitration"):  # PacketIns (PI/BMv2): dropped
                            self.view[target.name] = BackupView(True, primary_of(reply.arbitration))
                            pause = RETRY_FIRST
            except (P4ClientError, RuntimeError, OSError, grpc.RpcError) as err:
                self.view[target.name] = BackupView(False, error=str(err) or type(err).__name__)
            await asyncio.sleep(pause)  # a switch restarting: back off, then again
            pause = min(pause * 2, RETRY_MAX)
