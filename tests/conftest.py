"""Shared fixtures: the repository's example policy and inventories, and a fabric of
reference switches on loopback for the trading floor."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler.check import check_policy
from compiler.emit import build, write_build
from compiler.inventory import Inventory, load_inventory
from compiler.model import Policy
from p4src.spec import PIPELINE
from runtime.controller import PipelineFiles, SwitchTarget, targets
from runtime.plan import Tables
from runtime.refswitch.switch import ReferenceSwitch
from topologies import ports

TABLES = Tables(PIPELINE)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def floor_ports_reserved() -> Iterator[ports.Reservation]:
    """The example inventories' fixed P4Runtime ports, out of the ephemeral range for the
    whole run: an earlier test's outgoing connection must not sit on 127.0.0.1:50008 when
    a Mininet floor's spine2 binds it (topologies/ports.py; a floor also reserves its own
    ports, but only from its start)."""
    fixed = set()
    for path in sorted((ROOT / "topologies").glob("*.yaml")):
        inventory, _ = load_inventory(str(path))
        fixed |= {int(sw.p4rt.rpartition(":")[2]) for sw in inventory.switches}
    with ports.reserved(fixed) as reservation:
        yield reservation


@pytest.fixture(scope="session")
def floor() -> Inventory:
    inventory, _ = load_inventory(str(ROOT / "topologies" / "trading_floor.yaml"))
    return inventory


@pytest.fixture(scope="session")
def floor_policy_text() -> str:
    return (ROOT / "policies" / "trading_floor.zt").read_text()


@pytest.fixture(scope="session")
def floor_policy(floor: Inventory, floor_policy_text: str) -> Policy:
    """The example policy, checked clean against the trading floor."""
    result = check_policy(floor_policy_text, "policies/trading_floor.zt", floor)
    assert result.policy is not None, result.diagnostics
    return result.policy


@pytest.fixture
def fabric(
    tmp_path: Path, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> Iterator[tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]]]:
    built = build(floor_policy, floor, floor_policy_text, "ref")
    write_build(built, str(tmp_path / "build"))
    files = PipelineFiles.of(tmp_path / "build", "ref")
    switches: dict[str, ReferenceSwitch] = {}
    found = []
    try:
        for target in targets(floor, built.switches, TABLES):
            sw = ReferenceSwitch(target.device_id)
            port = sw.start("127.0.0.1:0")
            switches[target.name] = sw
            found.append(dataclasses.replace(target, address=f"127.0.0.1:{port}"))
        yield found, files, switches
    finally:
        for sw in switches.values():
            sw.stop()
