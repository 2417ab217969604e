"""Plans and the consistent update protocol, executed on an in-process reference device.

After every single write of an update, packets of the live epoch must meet exactly the old
policy's entries (before the flip) or exactly the new one's (after it) — never a mix; a
second plan is empty; a plan interrupted anywhere and re-planned converges without
touching what is already right.
"""

from __future__ import annotations

import random

import pytest
from finsy.proto import p4r
from p4rt import pipeline_config

from compiler.check import check_policy
from compiler.emit import build
from compiler.entries import SwitchTables
from compiler.inventory import Inventory
from p4src.spec import PIPELINE
from runtime.plan import DELETE, INSERT, Desired, Held, Tables, diff, plan_switch
from runtime.refswitch.device import Device

TABLES = Tables(PIPELINE)
CHANGES = {
    "rule removed": ("allow risk         -> risk_db      tcp 5432\n", ""),
    "port changed": ("tcp 9876\n", "tcp 9877\n"),
    "rule added": (
        "default deny log",
        "allow algo -> risk_db tcp 5433\ndefault deny log",
    ),
    "service grown": ("service risk         = risk1, risk2", "service risk = risk1, risk2, algo3"),
}


def _compile(text: str, floor: Inventory, switch: str) -> SwitchTables:
    # The changes break some of the example's expectations on purpose.
    text = "\n".join(line for line in text.splitlines() if not line.startswith("expect"))
    result = check_policy(text, "p.zt", floor)
    assert result.policy is not None, result.diagnostics
    return next(s for s in build(result.policy, floor, text, "ref").switches if s.switch == switch)


def _held(device: Device) -> Held:
    entity = p4r.Entity()
    entity.table_entry.meter_config.SetInParent()  # as the controller reads: with meters
    entries = [e.table_entry for e in device.read([entity])]
    epoch = p4r.Entity()
    epoch.table_entry.table_id = TABLES.epoch_table.id
    epoch.table_entry.is_default_action = True
    (default,) = device.read([epoch])
    clone = p4r.Entity()
    clone.packet_replication_engine_entry.clone_session_entry.SetInParent()
    sessions = [c.packet_replication_engine_entry.clone_session_entry for c in device.read([clone])]
    value = default.table_entry.action.action.params[0].value
    return Held(entries, int.from_bytes(value, "big"), sessions[0] if sessions else None)


def _device() -> Device:
    device = Device(1)
    device.set_pipeline(p4r.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT, pipeline_config())
    return device


def _apply(device: Device, changes: list[p4r.Update]) -> None:
    for result in device.write(changes):
        assert result is None, result.message


def _desired(tables: SwitchTables) -> Desired:
    return Desired.of(TABLES, tables, cpu_port=255)


@pytest.fixture(scope="module")
def floor_text(floor_policy_text: str) -> str:
    return floor_policy_text


@pytest.mark.parametrize(
    ("name", "switch"),
    [
        ("rule removed", "tor-rsk"),
        ("port changed", "tor-alg"),
        ("port changed", "tor-oms"),
        ("rule added", "tor-rsk"),
        ("service grown", "tor-alg"),
        ("service grown", "tor-oms"),
    ],
)
def test_every_intermediate_state_is_the_old_or_the_new_policy(
    name: str, switch: str, floor: Inventory, floor_text: str
) -> None:
    old_text = floor_text
    new_text = floor_text.replace(*CHANGES[name], 1)
    assert new_text != old_text
    a, b = _desired(_compile(old_text, floor, switch)), _desired(_compile(new_text, floor, switch))
    device = _device()
    _apply(device, [c.update() for c in plan_switch(TABLES, a, _held(device)).changes()])
    assert plan_switch(TABLES, a, _held(device)).empty
    plan = plan_switch(TABLES, b, _held(device))
    assert plan.diff, "the change must show in the diff"
    flipped = False
    for change in plan.changes():
        _apply(device, [change.update()])
        flipped = flipped or change is plan.flip
        live = diff(TABLES, b if flipped else a, _held(device))
        routing_only = set(live) <= {"routing"}
        assert not live or routing_only, (change.op, change.table, live)
    assert plan_switch(TABLES, b, _held(device)).empty  # converged: nothing left to write
    held = _held(device)
    assert all(TABLES.split(e)[1] is None for e in held.entries)  # all wildcards again
    assert held.epoch == plan.epoch_after


def test_no_change_plans_nothing(floor: Inventory, floor_text: str) -> None:
    a = _desired(_compile(floor_text, floor, "tor-oms"))
    device = _device()
    _apply(device, [c.update() for c in plan_switch(TABLES, a, _held(device)).changes()])
    again = plan_switch(TABLES, a, _held(device))
    assert again.empty and not again.diff


@pytest.mark.parametrize("seed", range(20))
def test_interrupted_apply_converges_without_touching_what_is_right(
    seed: int, floor: Inventory, floor_text: str
) -> None:
    rng = random.Random(seed)
    name = rng.choice(["port changed", "rule added", "service grown"])
    a = _desired(_compile(floor_text, floor, "tor-alg"))
    b = _desired(_compile(floor_text.replace(*CHANGES[name], 1), floor, "tor-alg"))
    device = _device()
    _apply(device, [c.update() for c in plan_switch(TABLES, a, _held(device)).changes()])
    first = list(plan_switch(TABLES, b, _held(device)).changes())
    cut = rng.randrange(len(first) + 1)
    _apply(device, [c.update() for c in first[:cut]])  # the controller dies here
    before = {e.SerializeToString(deterministic=True) for e in _held(device).entries}
    resumed = list(plan_switch(TABLES, b, _held(device)).changes())
    _apply(device, [c.update() for c in resumed])
    after = {e.SerializeToString(deterministic=True) for e in _held(device).entries}
    final = {e.SerializeToString(deterministic=True) for e in b.entries.values()}
    assert after == final
    for change in resumed:
        entry = change.entity.table_entry.SerializeToString(deterministic=True)
        if change.op == DELETE:
            assert entry not in final or entry not in before  # never deletes a correct entry
        if change.op == INSERT:
            assert entry not in before  # never re-inserts what is there
    assert plan_switch(TABLES, b, _held(device)).empty
    assert len(resumed) <= len(first) - cut + 2  # no more work than what was left (+ a flip)


def test_ranges_go_out_padded_and_read_back_canonical(floor: Inventory, floor_text: str) -> None:
    from runtime.entities import canonical_entry

    desired = _desired(_compile(floor_text, floor, "tor-alg"))
    ranged = next(
        e
        for e in desired.entries.values()
        if any(fm.WhichOneof("field_match_type") == "range" for fm in e.match)
    )
    update = p4r.Update(type=p4r.Update.INSERT)
    update.entity.table_entry.CopyFrom(ranged)
    wire = TABLES.on_the_wire(update).entity.table_entry
    ranges = [fm.range for fm in wire.match if fm.WhichOneof("field_match_type") == "range"]
    assert ranges and all(len(r.low) == len(r.high) == 2 for r in ranges)  # 16-bit fields
    assert wire != ranged and canonical_entry(wire) == ranged
    device = _device()
    _apply(
        device,
        [
            TABLES.on_the_wire(c.update())
            for c in plan_switch(TABLES, desired, _held(device)).changes()
        ],
    )
    assert plan_switch(TABLES, desired, _held(device)).empty
