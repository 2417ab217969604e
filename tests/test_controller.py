"""The controller against reference switches on loopback: plan, apply, idempotence, a dead
switch that does not hold up the others, partial failure, election."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from finsy.proto import p4r
from p4rt import wait_for

from compiler.check import check_policy
from compiler.emit import build, write_build
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
from runtime.plan import Change, Desired, Tables
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
            return list(await apply_all(one, TABLES, files, ControllerOptions(election_id=5)))

    (report,) = asyncio.run(two_controllers())
    assert not report.ok and "not the primary" in (report.error or "")  # type: ignore[attr-defined]


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
    ) -> None:
        nonlocal written
        room = kill_after - written
        if room <= 0:
            raise controller.ControllerError("killed")
        await real_write(sw, tables, changes[:room], batch, report, reset_meters)  # type: ignore[arg-type]
        written += min(room, len(changes))
        if room < len(changes):
            raise controller.ControllerError("killed")

    monkeypatch.setattr(controller, "_write", dying)
    asyncio.run(apply_all([target], TABLES, files, ControllerOptions()))
    monkeypatch.setattr(controller, "_write", real_write)
    before = _held_entries(refs["tor-alg"])
    (resumed,) = asyncio.run(apply_all([target], TABLES, files, ControllerOptions()))
    assert resumed.ok and resumed.plan is not None
    final = {e.SerializeToString(deterministic=True) for e in target.desired.entries.values()}
    assert _held_entries(refs["tor-alg"]) == final
    for change in resumed.plan.changes():
        entry = change.entity.table_entry.SerializeToString(deterministic=True)
        if change.op == "insert":
            assert entry not in before, "re-inserted an entry the switch already held"
        if change.op == "delete":
            assert not (entry in before and entry in final), "deleted an entry that was right"


SIMPLE_SWITCH = shutil.which("simple_switch_grpc")


@pytest.mark.skipif(
    SIMPLE_SWITCH is None or p4c_available() is None,
    reason="BMv2 simple_switch_grpc and p4c-bm2-ss are not on PATH: cannot drive BMv2",
)
def test_the_controller_drives_bmv2_unchanged(
    tmp_path: Path, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    assert SIMPLE_SWITCH is not None
    grpc_port, thrift_port = free_port(), free_port()
    proc = subprocess.Popen(
        [SIMPLE_SWITCH, "--no-p4", "--device-id", "1", "--thrift-port", str(thrift_port),
         "--", "--grpc-server-addr", f"127.0.0.1:{grpc_port}", "--cpu-port", "255"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert wait_for(lambda: _listening(grpc_port), 30), "simple_switch_grpc did not start"
        built = build(floor_policy, floor, floor_policy_text, "bmv2")
        built.files.update(p4c_artifacts(built))
        write_build(built, str(tmp_path / "build"))
        files = PipelineFiles.of(tmp_path / "build", "bmv2")
        tables = Tables(built.target.pipeline)
        (target,) = [
            dataclasses.replace(t, address=f"127.0.0.1:{grpc_port}", device_id=1)
            for t in targets(floor, built.switches, tables)
            if t.name == "tor-alg"
        ]
        options = ControllerOptions(timeout=60)
        (applied,) = asyncio.run(apply_all([target], tables, files, options))
        assert applied.ok and applied.written > 0, applied.error
        (planned,) = asyncio.run(plan_all([target], tables, files, options))
        assert planned.ok and planned.pipeline == "same" and planned.plan is not None
        assert planned.plan.empty, planned.plan.diff  # BMv2 holds exactly the compiled entries
        (again,) = asyncio.run(apply_all([target], tables, files, options))
        assert again.ok and again.written == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
