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

TABLES = Tables(PIPELINE)

ROOT = Path(__file__).resolve().parent.parent


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
