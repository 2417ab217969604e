"""The controller against reference switches on loopback: plan, apply, idempotence, a dead
switch that does not hold up the others, partial failure, election."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from finsy.proto import p4r
from p4rt import wait_for

from compiler.check import check_policy
from compiler.emit import Build, build, write_build
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.p4c import p4c_artifacts, p4c_available
from p4src.spec import PIPELINE
from runtime.controller import (
    ControllerOptions,
    PipelineFiles,
    SwitchTarget,
    apply_all,
    plan_all,
    targets,
)
from runtime.plan import Change, Desired, Tables, plan_switch
from runtime.refswitch.device import P4RuntimeError
from runtime.refswitch.switch import ReferenceSwitch
from topologies.switches import free_port

TABLES = Tables(PIPELINE)


def _held_entries(sw: ReferenceSwitch) -> set[bytes]:
    entity = p4r.Entity()
    entity.table_entry.meter_config.SetInParent()  # metered entries: with their config
    return {e.table_entry.SerializeToString(deterministic=True) for e in sw.device.read([entity])}


def test_plan_apply_and_a_second_apply_writes_nothing(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
) -> None:
    switches, files, refs = fabric
    options = ControllerOptions(timeout=20)
    plans = asyncio.run(plan_all(switches, TABLES, files, options))
    assert all(r.ok and r.pipeline == "missing" for r in plans), [r.error for r in plans]
    applied = asyncio.run(apply_all(switches, TABLES, files, options))
    assert all(r.ok for r in applied), [(r.switch, r.error) for r in applied if not r.ok]
    assert all(r.written > 0 for r in applied)
    for target in switches:
        want = {e.SerializeToString(deterministic=True) for e in target.desired.entries.values()}
        assert _held_entries(refs[target.name]) == want, target.name
    again = asyncio.run(plan_all(switches, TABLES, files, options))
    assert all(r.ok and r.pipeline == "same" and r.plan and r.plan.empty for r in again)
    second = asyncio.run(apply_all(switches, TABLES, files, options))
    assert all(r.ok and r.written == 0 for r in second)


def _mark(sw: ReferenceSwitch) -> bytes:
    """The digest the switch is marked with (the epoch default's metadata), read over the
    device's own Read."""
    entity = p4r.Entity()
    entity.table_entry.table_id = TABLES.epoch_table.id
    entity.table_entry.is_default_action = True
    (read,) = sw.device.read([entity])
    return bytes(read.table_entry.metadata)


@dataclasses.dataclass
class _Traffic:
    """What the controller asked one reference switch: Write requests and table reads."""

    writes: int = 0
    full_reads: int = 0  # reads of a table's entries (not of its default entry alone)
    small_reads: int = 0


def _count(sw: ReferenceSwitch) -> _Traffic:
    seen = _Traffic()
    device = sw.device
    read, write = device.read, device.write

    def counted_read(entities: Iterable[p4r.Entity]) -> Iterator[p4r.Entity]:
        entities = list(entities)
        full = any(
            e.WhichOneof("entity") == "table_entry" and not e.table_entry.is_default_action
            for e in entities
        )
        if full:
            seen.full_reads += 1
        else:
            seen.small_reads += 1
        return read(entities)

    def counted_write(updates: Iterable[p4r.Update]) -> list[P4RuntimeError | None]:
        seen.writes += 1
        return list(write(updates))

    device.read = counted_read  # type: ignore[method-assign]
    device.write = counted_write  # type: ignore[method-assign]
    return seen


def test_a_switch_marked_with_the_build_is_neither_read_in_full_nor_written(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
) -> None:
    switches, files, refs = fabric
    options = ControllerOptions(timeout=20)
    applied = asyncio.run(apply_all(switches, TABLES, files, options))
    assert all(r.ok and r.marks == 1 for r in applied)  # marked once, after the last write
    for target in switches:
        assert _mark(refs[target.name]) == target.desired.digest != b""
    traffic = {name: _count(sw) for name, sw in refs.items()}
    again = asyncio.run(apply_all(switches, TABLES, files, options))
    planned = asyncio.run(plan_all(switches, TABLES, files, options))
    for r in (*again, *planned):
        assert r.ok and not r.in_full and r.written == 0 and r.marks == 0
        assert r.plan is not None and r.plan.empty
    for name, seen in traffic.items():
        # Per switch: the apply's and the plan's one small read each; nothing written.
        assert (seen.writes, seen.full_reads, seen.small_reads) == (0, 0, 2), name
    full = asyncio.run(plan_all(switches, TABLES, files, ControllerOptions(full_read=True)))
    assert all(r.in_full and r.plan is not None and r.plan.empty for r in full)
    assert all(seen.full_reads == 1 for seen in traffic.values())


def test_a_long_running_caller_plans_a_marked_switch_from_what_it_applied(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
    floor: Inventory,
    floor_policy_text: str,
) -> None:
    switches, files, refs = fabric
    options = ControllerOptions(timeout=20)
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, options)))
    text = floor_policy_text.replace("tcp 9876\n", "tcp 9877\n", 1)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("expect"))
    result = check_policy(text, "p.zt", floor)
    assert result.policy is not None
    edited = {s.switch: s for s in build(result.policy, floor, text, "ref").switches}
    new = [
        dataclasses.replace(t, desired=Desired.of(TABLES, edited[t.name], 255)) for t in switches
    ]
    traffic = {name: _count(sw) for name, sw in refs.items()}
    known = {t.name: t.desired for t in switches}
    reports = asyncio.run(apply_all(new, TABLES, files, options, known=known))
    assert all(r.ok and not r.in_full for r in reports)  # planned from `known`, none read
    assert {r.switch for r in reports if r.written} == {"tor-alg", "tor-oms"}
    assert all(seen.full_reads == 0 for seen in traffic.values())
    for target in new:
        want = {e.SerializeToString(deterministic=True) for e in target.desired.entries.values()}
        assert _held_entries(refs[target.name]) == want, target.name
        assert _mark(refs[target.name]) == target.desired.digest
    # A `known` the mark does not confirm is never trusted: the switch is read.
    back = asyncio.run(apply_all(switches, TABLES, files, options, known=known))
    assert all(r.ok for r in back) and all(r.in_full for r in back if r.written)
    assert {r.switch for r in back if r.in_full} == {"tor-alg", "tor-oms"}


def test_a_restarted_or_overwritten_switch_is_read_and_planned_in_full(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
) -> None:
    switches, files, refs = fabric
    options = ControllerOptions(timeout=20)
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, options)))
    restarted, overwritten = "tor-alg", "tor-oms"
    address = next(t.address for t in switches if t.name == restarted)
    refs[restarted].stop()
    refs[restarted] = ReferenceSwitch(next(t.device_id for t in switches if t.name == restarted))
    refs[restarted].start(address)
    # Another writer leaves the epoch default without our mark (and one entry fewer).
    held = refs[overwritten].device
    target = next(t for t in switches if t.name == overwritten)
    routing = next(
        e
        for e in target.desired.entries.values()
        if e.table_id == TABLES.pipeline.table("routing").id
    )
    updates = [p4r.Update(type=p4r.Update.MODIFY), p4r.Update(type=p4r.Update.DELETE)]
    updates[0].entity.table_entry.CopyFrom(TABLES.epoch_default(0))
    updates[1].entity.table_entry.CopyFrom(routing)
    assert held.write(updates) == [None, None]
    planned = {r.switch: r for r in asyncio.run(plan_all(switches, TABLES, files, options))}
    assert {n for n, r in planned.items() if r.in_full} == {restarted, overwritten}
    assert planned[restarted].pipeline == "missing"
    overwritten_plan = planned[overwritten].plan
    assert overwritten_plan is not None and not overwritten_plan.empty
    applied = {r.switch: r for r in asyncio.run(apply_all(switches, TABLES, files, options))}
    assert all(r.ok for r in applied.values())
    assert {n for n, r in applied.items() if r.written} == {restarted, overwritten}
    assert applied[overwritten].written == 1  # the routing entry, back
    for target in switches:
        want = {e.SerializeToString(deterministic=True) for e in target.desired.entries.values()}
        assert _held_entries(refs[target.name]) == want, target.name
        assert _mark(refs[target.name]) == target.desired.digest


def test_a_dead_switch_does_not_hold_up_the_others(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
) -> None:
    switches, files, refs = fabric
    dead = switches[0].name
    refs[dead].stop()
    applied = asyncio.run(apply_all(switches, TABLES, files, ControllerOptions(timeout=5)))
    by_name = {r.switch: r for r in applied}
    assert not by_name[dead].ok and by_name[dead].error
    assert all(r.ok for name, r in by_name.items() if name != dead)


def test_a_backup_controller_writes_nothing(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
) -> None:
    switches, files, _ = fabric
    one = switches[:1]
    assert asyncio.run(apply_all(one, TABLES, files, ControllerOptions(election_id=50)))[0].ok

    async def two_controllers() -> list[object]:
        from finsy import Switch, SwitchOptions

        primary = SwitchOptions(
            p4info=files.p4info_path,
            p4blob=files.device_config_path,
            device_id=one[0].device_id,
            initial_election_id=100,
        )
        async with Switch("other", one[0].address, primary):
            backup = ControllerOptions(election_id=5)
            held = await apply_all(one, TABLES, files, backup)  # marked with this build
            # a build the switch does not hold (--full-read: whatever the mark says)
            forced = await apply_all(one, TABLES, files, replace(backup, full_read=True))
            return [*held, *forced]

    held, forced = asyncio.run(two_controllers())
    # The switch already holds the build: nothing to write, no session needed.
    assert held.ok and held.written == 0 and held.plan is not None and held.plan.empty  # type: ignore[attr-defined]
    assert not forced.ok and "not the primary" in (forced.error or "")  # type: ignore[attr-defined]


def _write_faults(monkeypatch: pytest.MonkeyPatch, fail: Callable[[p4r.Update], bool]) -> None:
    """Make the device fail the updates `fail` picks (once each), as a full table would."""
    from runtime.refswitch import device as device_module

    original = device_module.Device._update
    failed: set[bytes] = set()

    def flaky(self: device_module.Device, schema: object, update: p4r.Update) -> None:
        key = update.SerializeToString(deterministic=True)
        if fail(update) and key not in failed:
            failed.add(key)
            raise device_module.P4RuntimeError(device_module.RESOURCE_EXHAUSTED, "table is full")
        original(self, schema, update)  # type: ignore[arg-type]

    monkeypatch.setattr(device_module.Device, "_update", flaky)


def test_a_write_that_failed_as_a_whole_is_reported_as_such(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Write whose RPC fails (no answer in time, the switch unavailable) carries no
    # per-update errors: its updates' outcome is unknown, not "0 of N failed".
    from runtime.refswitch import device as device_module

    switches, files, _refs = fabric
    one = [t for t in switches if t.name == "tor-alg"]

    def busy(self: object, updates: object) -> None:
        raise device_module.P4RuntimeError(device_module.RESOURCE_EXHAUSTED, "the switch is busy")

    monkeypatch.setattr(device_module.Device, "write", busy)
    (report,) = asyncio.run(apply_all(one, TABLES, files, ControllerOptions()))
    assert not report.ok and report.error is not None
    assert "failed as a whole (RESOURCE_EXHAUSTED: the switch is busy)" in report.error
    assert "0 of" not in report.error and report.written == 0


def test_partial_failure_of_a_batch_is_reported_and_the_retry_converges(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    switches, files, refs = fabric
    one = [t for t in switches if t.name == "tor-alg"]
    routing = PIPELINE.table("routing").id
    _write_faults(monkeypatch, lambda u: u.entity.table_entry.table_id == routing)
    (report,) = asyncio.run(apply_all(one, TABLES, files, ControllerOptions(batch_size=50)))
    assert not report.ok and "updates failed" in (report.error or "")
    assert report.failed_updates and all(c.table == "routing" for c, _ in report.failed_updates)
    assert all("RESOURCE_EXHAUSTED" in e for _, e in report.failed_updates)
    # Each update fails once; an apply stops at a failed batch, so updates it never sent
    # may fail on the next one: every apply gets further, and they converge.
    failures = [len(report.failed_updates)]
    for _ in range(5):
        (retry,) = asyncio.run(apply_all(one, TABLES, files, ControllerOptions(batch_size=50)))
        if retry.ok:
            break
        failures.append(len(retry.failed_updates))
    assert retry.ok, failures
    want = {e.SerializeToString(deterministic=True) for e in one[0].desired.entries.values()}
    assert _held_entries(refs["tor-alg"]) == want


@pytest.mark.parametrize("seed", range(20))
def test_a_controller_killed_mid_apply_converges_on_restart(
    seed: int,
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
    monkeypatch: pytest.MonkeyPatch,
    floor: Inventory,
    floor_policy_text: str,
) -> None:
    import runtime.controller as controller

    switches, files, refs = fabric
    one = [t for t in switches if t.name == "tor-alg"]
    assert asyncio.run(apply_all(one, TABLES, files, ControllerOptions()))[0].ok
    # The new policy: one rule's port changes and a service grows.
    text = floor_policy_text.replace("tcp 9876\n", "tcp 9877\n", 1).replace(
        "service risk         = risk1, risk2", "service risk = risk1, risk2, algo3"
    )
    text = "\n".join(line for line in text.splitlines() if not line.startswith("expect"))
    result = check_policy(text, "p.zt", floor)
    assert result.policy is not None
    compiled = next(
        s for s in build(result.policy, floor, text, "ref").switches if s.switch == "tor-alg"
    )
    target = dataclasses.replace(one[0], desired=Desired.of(TABLES, compiled, 255))
    rng = random.Random(seed)
    kill_after = rng.randrange(1, 60)
    real_write = controller._write
    written = 0

    async def dying(
        sw: object,
        tables: Tables,
        changes: Sequence[Change],
        batch: int,
        report: object,
        reset_meters: bool = False,
        fence: object = None,
    ) -> None:
        nonlocal written
        room = kill_after - written
        if room <= 0:
            raise controller.ControllerError("killed")
        await real_write(sw, tables, changes[:room], batch, report, reset_meters, fence)  # type: ignore[arg-type]
        written += min(room, len(changes))
        if room < len(changes):
            raise controller.ControllerError("killed")

    monkeypatch.setattr(controller, "_write", dying)
    (killed,) = asyncio.run(apply_all([target], TABLES, files, ControllerOptions()))
    monkeypatch.setattr(controller, "_write", real_write)
    # Killed anywhere, the switch claims no build: neither the old nor the new digest.
    assert _mark(refs["tor-alg"]) == (target.desired.digest if killed.ok else b"")
    before = _held_entries(refs["tor-alg"])
    (resumed,) = asyncio.run(apply_all([target], TABLES, files, ControllerOptions()))
    assert resumed.ok and resumed.plan is not None and resumed.in_full != killed.ok
    assert _mark(refs["tor-alg"]) == target.desired.digest
    final = {e.SerializeToString(deterministic=True) for e in target.desired.entries.values()}
    assert _held_entries(refs["tor-alg"]) == final
    for change in resumed.plan.changes():
        entry = change.entity.table_entry.SerializeToString(deterministic=True)
        if change.op == "insert":
            assert entry not in before, "re-inserted an entry the switch already held"
        if change.op == "delete":
            assert not (entry in before and entry in final), "deleted an entry that was right"


SIMPLE_SWITCH = shutil.which("simple_switch_grpc")
NEEDS_BMV2 = pytest.mark.skipif(
    SIMPLE_SWITCH is None or p4c_available() is None,
    reason="BMv2 simple_switch_grpc and p4c-bm2-ss are not on PATH: cannot drive BMv2",
)


@NEEDS_BMV2
def test_the_controller_drives_bmv2_unchanged(
    tmp_path: Path, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    with _bmv2() as grpc_port:
        built = build(floor_policy, floor, floor_policy_text, "bmv2")
        target, tables, files = _on_bmv2(built, floor, tmp_path, grpc_port)
        options = ControllerOptions(timeout=60)
        (applied,) = asyncio.run(apply_all([target], tables, files, options))
        assert applied.ok and applied.written > 0, applied.error
        full = dataclasses.replace(options, full_read=True)
        (planned,) = asyncio.run(plan_all([target], tables, files, full))
        assert planned.ok and planned.pipeline == "same" and planned.plan is not None
        assert planned.plan.empty, planned.plan.diff  # BMv2 holds exactly the compiled entries
        # BMv2 keeps the digest in the epoch default's metadata: one small read confirms it.
        (again,) = asyncio.run(apply_all([target], tables, files, options))
        assert again.ok and again.written == 0 and again.marks == 0 and not again.in_full


def _on_bmv2(
    built: Build, floor: Inventory, tmp_path: Path, grpc_port: int
) -> tuple[SwitchTarget, Tables, PipelineFiles]:
    """tor-alg of `built` (written with p4c's JSON) as the BMv2 on `grpc_port` takes it."""
    built.files.update(p4c_artifacts(built))
    write_build(built, str(tmp_path / "build"))
    files = PipelineFiles.of(tmp_path / "build", "bmv2")
    tables = Tables(built.target.pipeline)
    (target,) = [
        dataclasses.replace(t, address=f"127.0.0.1:{grpc_port}", device_id=1)
        for t in targets(floor, built.switches, tables)
        if t.name == "tor-alg"
    ]
    return target, tables, files


@contextlib.contextmanager
def _bmv2() -> Iterator[int]:
    """A simple_switch_grpc without a program, device id 1: its P4Runtime port."""
    assert SIMPLE_SWITCH is not None
    grpc_port, thrift_port = free_port(), free_port()
    proc = subprocess.Popen(
        [SIMPLE_SWITCH, "--no-p4", "--device-id", "1", "--thrift-port", str(thrift_port),
         "--", "--grpc-server-addr", f"127.0.0.1:{grpc_port}", "--cpu-port", "255"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for(lambda: _listening(grpc_port), 30), "simple_switch_grpc did not start"
        yield grpc_port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@NEEDS_BMV2
def test_bmv2_takes_a_grant_and_its_revoke_entry_by_entry(
    tmp_path: Path, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """The writes of a change that only widens (then narrows) — permits inserted, identity
    entries modified, a dst_identity /32 inserted — as BMv2 takes them, no flip."""
    from compiler.differential import Monotone, monotone_change
    from runtime.overlay import monotone_plan

    text = floor_policy_text + "\nallow algo1 -> settle2 tcp 6001 name grant_1\n"
    granted_policy = check_policy(text, "floor.zt", floor).policy
    assert granted_policy is not None
    with _bmv2() as grpc_port:
        first = build(floor_policy, floor, floor_policy_text, "bmv2")
        granted = build(granted_policy, floor, text, "bmv2", allocation=first.allocation)
        options = ControllerOptions(timeout=60)
        builds = [first, granted, first]
        for i, built in enumerate(builds):
            target, tables, files = _on_bmv2(built, floor, tmp_path, grpc_port)
            planner = plan_switch
            if i:
                before = {sw.switch: sw for sw in builds[i - 1].switches}
                change = monotone_change(before, {sw.switch: sw for sw in built.switches})
                assert isinstance(change, Monotone) and change.widens is (i == 1)
                planner = functools.partial(monotone_plan, change=change)
            (applied,) = asyncio.run(apply_all([target], tables, files, options, planner=planner))
            assert applied.ok and applied.plan is not None, applied.error
            if i:
                assert applied.plan.flip is None and 0 < applied.written <= 12
            full = dataclasses.replace(options, full_read=True)
            (planned,) = asyncio.run(plan_all([target], tables, files, full))
            assert planned.ok and planned.plan is not None and planned.plan.empty


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("wait", [True, False], ids=["waited-out", "no-wait"])
def test_a_session_waits_out_our_own_stream_the_switch_still_holds(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
    monkeypatch: pytest.MonkeyPatch,
    wait: bool,
) -> None:
    """A switch refuses a second live stream with one election id, and a stream a session
    of ours just closed may still be live on it: the next session (an overlay right after
    an apply) must not come up a backup for that. Here the first stream is held open until
    the second session has started; without the wait, the second is not primary."""
    import runtime.controller as controller

    if not wait:
        monkeypatch.setattr(controller, "OWN_STREAM_WAIT_S", 0.0)
    switches, files, _refs = fabric
    target, options = switches[0], ControllerOptions(timeout=20)

    async def scenario() -> tuple[bool, bool]:
        opened, close = asyncio.Event(), asyncio.Event()

        async def first() -> bool:
            async with controller._arbitrated(target, files, options) as sw:
                opened.set()
                await close.wait()
                return sw.is_primary

        held = asyncio.create_task(first())
        await opened.wait()
        asyncio.get_running_loop().call_later(0.2, close.set)
        async with controller._arbitrated(target, files, options) as sw:
            second = sw.is_primary
        close.set()
        return await held, second

    first_primary, second_primary = asyncio.run(scenario())
    assert first_primary
    assert second_primary is wait
