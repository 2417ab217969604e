"""A standby's backup streams (p4seg/standby.py) against a reference switch: arbitrated
without an election id, they see every change of primary as the switch announces it, never
become primary themselves, and come back after the switch restarts."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
from finsy import P4Client
from finsy.proto import p4r
from p4rt import bmv2_switch

from p4seg.standby import BackupStreams
from runtime.refswitch.switch import ReferenceSwitch


@dataclass(frozen=True)
class Where:
    name: str
    address: str
    device_id: int


DEADLINE = 20.0  # seconds: an upper bound for something that must happen


async def _until(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while not check():
            await asyncio.sleep(0.01)  # polling a condition
    assert check(), what


def _seen(backups: BackupStreams, switch: str, primary: int | None) -> Callable[[], bool]:
    """Whether the backup stream to `switch` is up and names `primary` as its primary."""

    def check() -> bool:
        v = backups.view.get(switch)
        return v is not None and v.connected and v.primary_election_id == primary

    return check


async def _controller(address: str, election_id: int) -> P4Client:
    """A stream arbitrated with `election_id` (entered; the caller closes it)."""
    client = P4Client(address, None, wait_for_ready=False)
    await client.__aenter__()
    request = p4r.StreamMessageRequest(arbitration=p4r.MasterArbitrationUpdate(device_id=1))
    request.arbitration.election_id.low = election_id
    await client.send(request)
    await client.receive()
    return client


def test_backup_streams_follow_the_primary_and_outlive_a_restart() -> None:
    sw = ReferenceSwitch(device_id=1)
    port = sw.start()
    address = f"127.0.0.1:{port}"
    target = Where("tor1", address, 1)
    backups = BackupStreams()
    seen = partial(_seen, backups, "tor1")

    async def main() -> None:
        nonlocal sw
        task = asyncio.ensure_future(backups.run([target], None))
        try:
            await _until(seen(None), "connected, no primary")
            first = await _controller(address, 7)
            await _until(seen(7), "the controller with id 7 is primary")
            second = await _controller(address, 9)
            await _until(seen(9), "a higher id takes over")
            # The backup never outranks anyone: the one with 9 still writes.
            assert sw.service.arbiter.is_primary("", 9)
            await second.__aexit__(None, None, None)
            await _until(seen(None), "the primary left: none (7 is below the highest seen)")
            await first.__aexit__(None, None, None)
            sw.stop()
            await _until(
                lambda: "tor1" in backups.view and not backups.view["tor1"].connected,
                "the switch is gone",
            )
            assert backups.view["tor1"].error
            sw = ReferenceSwitch(device_id=1)
            sw.start(address)
            await _until(seen(None), "reconnected to the restarted switch")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        asyncio.run(main())
    finally:
        sw.stop()


SIMPLE_SWITCH = shutil.which("simple_switch_grpc")


@pytest.mark.skipif(SIMPLE_SWITCH is None, reason="BMv2 simple_switch_grpc is not on PATH")
def test_backup_streams_follow_the_primary_on_bmv2() -> None:
    """PI counts a stream without an election id as id 0: primary while no controller with
    an id is connected. The view says no controller is primary then, as on the reference
    switch, and names the controller that is."""
    assert SIMPLE_SWITCH is not None
    backups = BackupStreams()
    seen = partial(_seen, backups, "s1")

    async def main(address: str) -> None:
        task = asyncio.ensure_future(backups.run([Where("s1", address, 1)], None))
        try:
            await _until(seen(None), "connected, no controller primary")
            controller = await _controller(address, 7)
            await _until(seen(7), "the controller with id 7 is primary")
            await controller.__aexit__(None, None, None)
            await _until(seen(None), "it left")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with bmv2_switch(SIMPLE_SWITCH) as address:
        asyncio.run(main(address))
