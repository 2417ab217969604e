"""The controller against reference switches on loopback: plan, apply, idempotence, a dead
switch that does not hold up the others, partial failure, election."""

from __future__ import annotations

import asyncio

from finsy.proto import p4r

from p4src.spec import PIPELINE
from runtime.controller import (
    ControllerOptions,
    PipelineFiles,
    SwitchTarget,
    apply_all,
    plan_all,
)
from runtime.plan import Tables
from runtime.refswitch.switch import ReferenceSwitch

TABLES = Tables(PIPELINE)


def _held_entries(sw: ReferenceSwitch) -> set[bytes]:
    entity = p4r.Entity()
    entity.table_entry.SetInParent()
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
