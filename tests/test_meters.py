"""Rate limits end to end: the meter config the compiler derives from `rate`, the controller
writing it, reading it back and planning a rate change, the reference switch enforcing it
on injected packets (on a simulated clock), red packets in `hits`, and verify's proof.

The same with real packets in Mininet: tests/test_rate_mininet.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from finsy.proto import p4r
from p4rt import bmv2_switch, pipeline_config
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from compiler.check import check_policy
from compiler.emit import Build, build, load_entries, write_build
from compiler.entries import MeterConfig, SwitchTables, meter_for_rate
from compiler.inventory import Inventory, load_inventory
from compiler.model import Policy
from compiler.p4c import p4c_artifacts, p4c_available
from compiler.verify import verify
from p4seg.control import print_reports
from p4src.spec import PIPELINE
from runtime.alerts import hits_by_rule, read_counters, read_red_drops
from runtime.controller import (
    ControllerOptions,
    PipelineFiles,
    SwitchTarget,
    apply_all,
    plan_all,
    targets,
)
from runtime.entities import meter_of, table_entry_proto
from runtime.plan import Tables
from runtime.refswitch.device import OUT_OF_RANGE, P4RuntimeError
from runtime.refswitch.switch import ReferenceSwitch

INVENTORY = """\
name: meters
switches:
  tor1: {role: tor, device_id: 1, p4rt: "127.0.0.1:1"}
hosts:
  bastion: {ip: 10.0.0.1, switch: tor1, port: 1}
  strat1:  {ip: 10.0.0.2, switch: tor1, port: 2}
  strat2:  {ip: 10.0.0.3, switch: tor1, port: 3}
"""

POLICY = """\
policy meters
allow bastion -> strat1 icmp rate {rate}
allow bastion -> strat2 icmp
default deny
"""


@pytest.fixture
def inventory(tmp_path: Path) -> Inventory:
    path = tmp_path / "meters.yaml"
    path.write_text(INVENTORY)
    inv, diags = load_inventory(str(path))
    assert inv is not None, diags
    return inv


def _policy(inventory: Inventory, rate: str = "100pps") -> tuple[Policy, str]:
    text = POLICY.format(rate=rate)
    result = check_policy(text, "meters.zt", inventory)
    assert result.policy is not None, result.diagnostics
    return result.policy, text


def _build(
    inventory: Inventory, rate: str = "100pps", target: str = "ref", listings: bool = False
) -> Build:
    policy, text = _policy(inventory, rate)
    return build(policy, inventory, text, target, listings=listings)


# -- compile ------------------------------------------------------------------------------


def test_burst_sizing() -> None:
    assert meter_for_rate(5) == MeterConfig(5, 1, 5, 1)
    assert meter_for_rate(15) == MeterConfig(15, 2, 15, 2)  # 100 ms, rounded up
    assert meter_for_rate(100) == MeterConfig(100, 10, 100, 10)
    assert meter_for_rate(20000) == MeterConfig(20000, 2000, 20000, 2000)


@pytest.mark.parametrize("target", ["ref", "tofino"])
def test_metered_entries_carry_the_config_their_rate_gives(
    inventory: Inventory, target: str
) -> None:
    (tor,) = _build(inventory, "100pps", target).switches
    metered = [e for e in tor.entries if e.action == "permit_metered"]
    assert metered and all(e.rule_id == 1 for e in metered)
    assert {e.meter for e in metered} == {MeterConfig(100, 10, 100, 10)}
    assert all(e.meter is None for e in tor.entries if e.action != "permit_metered")


def test_entries_json_round_trips_the_meter(inventory: Inventory) -> None:
    built = _build(inventory, "2kpps")
    doc = built.files["entries/tor1.json"]
    assert '"meter": {"cburst": 200, "cir": 2000, "pburst": 200, "pir": 2000}' in doc
    assert load_entries(doc).entries == built.switches[0].entries
    listed = _build(inventory, "2kpps", listings=True)
    assert '"meter_config": {' in listed.files["entries/tor1-runtime.json"]


def test_a_rate_change_changes_exactly_the_metered_entries(inventory: Inventory) -> None:
    (before,) = _build(inventory, "100pps").switches
    (after,) = _build(inventory, "5pps").switches
    gone = set(before.entries) - set(after.entries)
    new = set(after.entries) - set(before.entries)
    assert gone and {e.action for e in gone} == {"permit_metered"}
    assert {dataclasses.replace(e, meter=None) for e in gone} == {
        dataclasses.replace(e, meter=None) for e in new
    }
    assert {e.meter for e in new} == {meter_for_rate(5)}


# -- verify -------------------------------------------------------------------------------


def _with_meter(tables: SwitchTables, meter: MeterConfig | None) -> SwitchTables:
    return dataclasses.replace(
        tables,
        entries=tuple(
            dataclasses.replace(e, meter=meter) if e.action == "permit_metered" else e
            for e in tables.entries
        ),
    )


def test_verify_proves_metered_allows_up_to_their_rate(inventory: Inventory) -> None:
    policy, _ = _policy(inventory, "100pps")
    (tor,) = _build(inventory, "100pps").switches
    result = verify(policy, inventory, {"tor1": tor}, exact=True)
    assert result.proven, [c.describe() for c in result.counterexamples]
    assert [(m.rule_id, m.rate_pps) for m in result.metered] == [(1, 100)]
    assert result.metered_classes > 0
    by_rules = verify(policy, inventory, {"tor1": tor})  # the meter checked per entry
    assert by_rules.proven and by_rules.by_rules is not None and by_rules.by_rules.left is None
    assert "allowed up to 100 pps" in result.metered_note()[0]


@pytest.mark.parametrize(
    ("meter", "shown"),
    [(meter_for_rate(1000), "meter 1000pps burst 100"), (None, "unmetered: no rate limit")],
)
def test_verify_finds_a_wrong_or_missing_meter(
    inventory: Inventory, meter: MeterConfig | None, shown: str
) -> None:
    policy, _ = _policy(inventory, "100pps")
    (tor,) = _build(inventory, "100pps").switches
    result = verify(policy, inventory, {"tor1": _with_meter(tor, meter)})
    assert not result.proven
    kinds = {c.kind for c in result.counterexamples}
    assert kinds == {"meter-source-tor"}, kinds
    first = result.counterexamples[0]
    assert shown in first.observed and "up to 100 pps" in first.expected


def test_verify_finds_a_meter_the_policy_does_not_ask_for(inventory: Inventory) -> None:
    policy, _ = _policy(inventory, "100pps")
    (tor,) = _build(inventory, "100pps").switches
    plain = tuple(
        dataclasses.replace(e, action="permit_metered", meter=meter_for_rate(7))
        if e.action == "permit" and e.rule_id == 2 and e.role == "forward"
        else e
        for e in tor.entries
    )
    result = verify(policy, inventory, {"tor1": dataclasses.replace(tor, entries=plain)})
    assert {c.kind for c in result.counterexamples} == {"meter-source-tor"}
    assert "with no rate limit" in result.counterexamples[0].expected


# -- the controller against a reference switch ----------------------------------------------

TABLES = Tables(PIPELINE)
METERED = PIPELINE.action("permit_metered").id
OPTIONS = ControllerOptions(timeout=20)


@pytest.fixture
def switch() -> Iterator[ReferenceSwitch]:
    sw = ReferenceSwitch(1)
    sw.start("127.0.0.1:0")
    try:
        yield sw
    finally:
        sw.stop()


def _deploy(
    tmp_path: Path, inventory: Inventory, sw: ReferenceSwitch, rate: str
) -> tuple[list[SwitchTarget], PipelineFiles]:
    """The compile of `rate`, written to a build directory, aimed at `sw`."""
    built = _build(inventory, rate)
    write_build(built, str(tmp_path / "build"))
    files = PipelineFiles.of(tmp_path / "build", "ref")
    found = [
        dataclasses.replace(t, address=sw.server_address)
        for t in targets(inventory, built.switches, TABLES)
    ]
    return found, files


def _meters_held(sw: ReferenceSwitch) -> list[MeterConfig | None]:
    """The meter config of every permit_metered entry, as a Read that asks for it returns."""
    entity = p4r.Entity()
    entity.table_entry.meter_config.SetInParent()
    return [
        meter_of(e.table_entry)
        for e in sw.device.read([entity])
        if e.table_entry.action.action.action_id == METERED
    ]


def test_apply_writes_the_meter_reads_it_back_and_plans_a_rate_change(
    tmp_path: Path,
    inventory: Inventory,
    switch: ReferenceSwitch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    found, files = _deploy(tmp_path, inventory, switch, "100pps")
    (applied,) = asyncio.run(apply_all(found, TABLES, files, OPTIONS))
    assert applied.ok, applied.error
    held = _meters_held(switch)
    assert held and set(held) == {meter_for_rate(100)}
    (again,) = asyncio.run(plan_all(found, TABLES, files, OPTIONS))
    assert again.ok and again.plan is not None and again.plan.empty, again.plan

    found, files = _deploy(tmp_path, inventory, switch, "5pps")
    (planned,) = asyncio.run(plan_all(found, TABLES, files, OPTIONS))
    assert planned.ok and planned.plan is not None
    diff = planned.plan.diff
    assert set(diff) == {"policy"}
    changed = diff["policy"].changed
    assert not diff["policy"].added and not diff["policy"].removed
    assert len(changed) == len(held)
    for have, want in changed:
        assert meter_of(have) == meter_for_rate(100) and meter_of(want) == meter_for_rate(5)
    print_reports([planned], TABLES, {1: "line 2: allow bastion -> strat1 icmp rate 5pps"}, False)
    shown = capsys.readouterr().out
    assert "~ policy[" in shown and "permit_metered(rule_id=1) meter 5pps burst 1" in shown

    (applied,) = asyncio.run(apply_all(found, TABLES, files, OPTIONS))
    assert applied.ok, applied.error
    assert set(_meters_held(switch)) == {meter_for_rate(5)}
    (after,) = asyncio.run(plan_all(found, TABLES, files, OPTIONS))
    assert after.ok and after.plan is not None and after.plan.empty


# -- the reference switch's data plane, on a simulated clock --------------------------------


def _ping(dst: str) -> bytes:
    return bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.0.1", dst=dst)
        / ICMP(type=8, id=7, seq=1)
    )


def test_a_metered_flow_passes_its_rate_and_red_packets_are_counted(
    tmp_path: Path, inventory: Inventory, switch: ReferenceSwitch
) -> None:
    rate, offered_pps, seconds = 100, 1000, 5
    found, files = _deploy(tmp_path, inventory, switch, f"{rate}pps")
    (applied,) = asyncio.run(apply_all(found, TABLES, files, OPTIONS))
    assert applied.ok, applied.error
    now = [0.0]  # the meters' clock, driven by the test
    switch.dataplane.clock = lambda: now[0]
    delivered = {"10.0.0.2": 0, "10.0.0.3": 0}
    offered = offered_pps * seconds
    for _ in range(offered):
        now[0] += 1 / offered_pps
        for dst in delivered:
            delivered[dst] += len(switch.inject(1, _ping(dst)))
    burst = meter_for_rate(rate).cburst
    # The bucket starts full (one burst), then refills at the rate.
    print(f"offered {offered} at {offered_pps} pps over {seconds} s: delivered {delivered}")
    assert rate * seconds <= delivered["10.0.0.2"] <= rate * seconds + burst, delivered
    assert delivered["10.0.0.3"] == offered  # the same flow without `rate`: everything
    policy, _ = _policy(inventory, f"{rate}pps")
    counters = asyncio.run(read_counters(found[0], PIPELINE, OPTIONS))
    red = asyncio.run(read_red_drops(found[0], PIPELINE, OPTIONS, [1]))
    assert red == {1: offered - delivered["10.0.0.2"]}
    hits = {h.rule_id: h for h in hits_by_rule(policy, PIPELINE, {"tor1": counters}, {"tor1": red})}
    assert hits[1].packets == offered and hits[1].rate_pps == rate
    assert hits[1].red == offered - delivered["10.0.0.2"]
    assert hits[2].packets == offered and hits[2].red is None and hits[2].rate_pps is None
    # The meter's own colour counts agree (P4Runtime 1.4 meter_counter_data).
    entity = p4r.Entity()
    entity.table_entry.table_id = PIPELINE.table("policy").id
    entity.table_entry.meter_counter_data.SetInParent()
    colours = [
        e.table_entry.meter_counter_data
        for e in switch.device.read([entity])
        if e.table_entry.HasField("meter_counter_data")
    ]
    assert sum(c.red.packet_count for c in colours) == red[1]
    assert sum(c.green.packet_count for c in colours) == delivered["10.0.0.2"]
    assert sum(c.yellow.packet_count for c in colours) == 0  # PIR = CIR: never yellow


def test_red_drops_is_an_indexed_counter_read_per_rule(switch: ReferenceSwitch) -> None:
    switch.device.set_pipeline(
        p4r.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT, pipeline_config()
    )
    red = PIPELINE.counter("policy_red_drops")
    one = p4r.Entity()
    one.counter_entry.counter_id = red.id
    one.counter_entry.index.index = 7
    (cell,) = switch.device.read([one])
    assert cell.counter_entry.index.index == 7 and cell.counter_entry.data.packet_count == 0
    every = p4r.Entity()
    every.counter_entry.SetInParent()
    assert sum(1 for _ in switch.device.read([every])) == red.size
    one.counter_entry.index.index = red.size
    with pytest.raises(P4RuntimeError) as err:
        list(switch.device.read([one]))
    assert err.value.code == OUT_OF_RANGE


def test_hits_says_unknown_when_a_switch_gave_no_red_count(inventory: Inventory) -> None:
    policy, _ = _policy(inventory)
    (tor,) = _build(inventory).switches
    entries = []
    for e in tor.entries:
        if e.table == "policy":
            msg = table_entry_proto(PIPELINE, e)
            msg.counter_data.packet_count = 3
            entries.append(msg)
    hits = {h.rule_id: h for h in hits_by_rule(policy, PIPELINE, {"tor1": entries})}
    assert hits[1].red is None and hits[1].packets > 0  # never a made-up zero
    hits = {
        h.rule_id: h
        for h in hits_by_rule(policy, PIPELINE, {"tor1": entries, "tor2": []}, {"tor1": {1: 4}})
    }
    assert hits[1].red is None  # tor2's cell is missing


# -- BMv2 ---------------------------------------------------------------------------------

SIMPLE_SWITCH = shutil.which("simple_switch_grpc")


@pytest.mark.skipif(
    SIMPLE_SWITCH is None or p4c_available() is None,
    reason="BMv2 simple_switch_grpc and p4c-bm2-ss are not on PATH: cannot check its direct meter",
)
def test_bmv2_holds_the_meter_config_written_with_the_entry(
    tmp_path: Path, inventory: Inventory
) -> None:
    assert SIMPLE_SWITCH is not None
    with bmv2_switch(SIMPLE_SWITCH) as address:
        built = _build(inventory, "100pps", "bmv2")
        built.files.update(p4c_artifacts(built))
        write_build(built, str(tmp_path / "build"))
        files = PipelineFiles.of(tmp_path / "build", "bmv2")
        tables = Tables(built.target.pipeline)
        found = [
            dataclasses.replace(t, address=address)
            for t in targets(inventory, built.switches, tables)
        ]
        # BMv2 may keep a deleted entry's meter on the next entry it inserts in that slot
        # (the unmetered entry written right after the metered one's old-epoch copy goes):
        # the controller resets the meter of every unmetered insert there.
        assert built.target.kind.stale_direct_meters
        options = ControllerOptions(timeout=60, reset_direct_meters=True)
        (applied,) = asyncio.run(apply_all(found, tables, files, options))
        assert applied.ok and applied.written > 0, applied.error
        (planned,) = asyncio.run(plan_all(found, tables, files, options))
        assert planned.ok and planned.plan is not None
        assert planned.plan.empty, planned.plan.diff  # the meter config read back as written
        red = asyncio.run(read_red_drops(found[0], tables.pipeline, options, [1]))
        assert red == {1: 0}  # policy_red_drops is there, per rule, readable


def test_a_held_entry_is_not_labelled_with_the_rule_that_now_has_its_number(
    tmp_path: Path,
    inventory: Inventory,
    switch: ReferenceSwitch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Applied: rule 1 is the 5 pps rule. Then a 50 kpps rule is written above it: rule 1
    is now the 50 kpps rule, and the switch's entries of the 5 pps rule still say rule 1."""
    found, files = _deploy(tmp_path, inventory, switch, "5pps")
    (applied,) = asyncio.run(apply_all(found, TABLES, files, OPTIONS))
    assert applied.ok, applied.error
    text = "policy meters\nallow strat2 -> strat1 icmp rate 50kpps\n" + POLICY.format(
        rate="5pps"
    ).removeprefix("policy meters\n")
    result = check_policy(text, "meters.zt", inventory)
    assert result.policy is not None, result.diagnostics
    built = build(result.policy, inventory, text, "ref")
    shifted = [
        dataclasses.replace(t, address=switch.server_address)
        for t in targets(inventory, built.switches, TABLES)
    ]
    (planned,) = asyncio.run(plan_all(shifted, TABLES, files, OPTIONS))
    assert planned.ok and planned.plan is not None
    rules = {1: "line 2: allow strat2 -> strat1 icmp rate 50000pps",
             2: "line 3: allow bastion -> strat1 icmp rate 5pps"}  # fmt: skip
    before = {planned.switch: {1: "line 2: allow bastion -> strat1 icmp rate 5pps"}}
    print_reports([planned], TABLES, rules, False, limit=100, before=before)
    shown = capsys.readouterr().out
    removed = [line for line in shown.splitlines() if line.lstrip().startswith("- policy")]
    assert removed, shown
    for line in removed:
        assert "rate 50000pps" not in line, line  # what the plan used to claim
        if "permit_metered(rule_id=1)" in line:
            assert "meter 5pps burst 1" in line and "rate 5pps" in line, line
