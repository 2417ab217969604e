"""Shared fixtures: the repository's example policy and inventories."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler.check import check_policy
from compiler.inventory import Inventory, load_inventory
from compiler.model import Policy

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
