"""Shared fixtures: the repository's example policy and inventories."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler.inventory import Inventory, load_inventory

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def floor() -> Inventory:
    inventory, _ = load_inventory(str(ROOT / "topologies" / "trading_floor.yaml"))
    return inventory


@pytest.fixture(scope="session")
def floor_policy_text() -> str:
    return (ROOT / "policies" / "trading_floor.zt").read_text()
