"""A long-running controller plans a switch from the difference between two compiles.

`Desired.made_from(known)` encodes a switch's new tables from the entries it shares with
what the controller last brought it to, and `plan_switch` against `Held.of(known)` then
looks only at that difference. Random chains of edits of the trading floor, each compiled
from the build before (kept rules keep their entry objects) must plan, switch by switch,
exactly what the full encoding plans: the same updates in the same order, the same diff.
A new process plans from the switch's kept tables, never encoded (p4seg/proven.py): then
neither side is encoded in full, only the entries that differ.
"""

from __future__ import annotations

import random

import pytest

from compiler.check import check_policy
from compiler.emit import Build, build
from compiler.entries import SwitchTables
from compiler.inventory import Inventory
from p4src.spec import PIPELINE
from runtime.plan import Desired, Held, SwitchPlan, Tables, plan_switch

TABLES = Tables(PIPELINE)
CPU_PORT = 255
RULES = (
    "allow algo -> risk_db tcp {port}",
    "allow dev -> dev tcp {port}",
    "allow settlement -> risk udp {port}",
    "deny algo -> books tcp {port} log",
    "allow ops_jump -> dev tcp {port} rate 500pps",
)


def _edit(text: str, rng: random.Random) -> str:
    """The policy with one rule added above `default`, one of the added removed, a port
    moved, or a service grown or shrunk."""
    lines = text.splitlines()
    added = [i for i, line in enumerate(lines) if line.startswith("# added")]
    choice = rng.choice(("add", "add", "remove", "port", "service"))
    if choice == "remove" and added:
        i = rng.choice(added)
        del lines[i : i + 2]
    elif choice == "port":
        i = next(i for i, line in enumerate(lines) if line.startswith("allow algo"))
        lines[i] = f"allow algo         -> order_router tcp {rng.randrange(9000, 9900)}"
    elif choice == "service":
        i = next(i for i, line in enumerate(lines) if line.startswith("service risk "))
        lines[i] = "service risk = " + ", ".join(
            ["risk1", "risk2", *rng.sample(["algo3", "oms2", "settle1"], rng.randrange(0, 3))]
        )
    else:
        i = next(i for i, line in enumerate(lines) if line.startswith("default"))
        rule = rng.choice(RULES).format(port=rng.randrange(1000, 60000))
        lines[i:i] = ["# added", rule]
    return "\n".join(lines) + "\n"


def _compiled(text: str, floor: Inventory, previous: Build | None) -> Build:
    text = "\n".join(line for line in text.splitlines() if not line.startswith("expect"))
    result = check_policy(text, "p.zt", floor)
    assert result.policy is not None, result.diagnostics
    allocation = previous.allocation if previous is not None else None
    return build(result.policy, floor, text, "ref", allocation=allocation, previous=previous)


def _switch(b: Build, name: str) -> SwitchTables:
    return next(sw for sw in b.switches if sw.switch == name)


def _plan_text(plan: SwitchPlan) -> list[tuple[str, str, bytes]]:
    return [(c.op, c.table, c.entity.SerializeToString(deterministic=True)) for c in plan.changes()]


@pytest.mark.parametrize("kept", ["applied", "unencoded"])
def test_a_plan_from_the_difference_is_the_full_plan(
    floor: Inventory, floor_policy_text: str, kept: str
) -> None:
    """`applied`: the base is what the controller applied last (encoded by then);
    `unencoded`: a new process's kept tables, each step a lazy Desired never encoded."""
    rng = random.Random(7)
    text = floor_policy_text
    previous = _compiled(text, floor, None)
    known = {sw.switch: Desired.lazy(TABLES, sw, CPU_PORT, b"") for sw in previous.switches}
    by_difference = 0
    for step in range(30):
        text = _edit(text, rng)
        current = _compiled(text, floor, previous)
        for sw in current.switches:
            base = known[sw.switch]
            if kept == "unencoded":
                base = Desired.lazy(TABLES, _switch(previous, sw.switch), CPU_PORT, b"")
            epoch = step % 2
            lazy = Desired.lazy(TABLES, sw, CPU_PORT, b"")
            plan = plan_switch(TABLES, lazy, Held.of(base, epoch, b""))
            delta = lazy.delta_from(base)
            if kept == "unencoded" and delta is not None:
                assert not base.made and not lazy.made  # the difference alone was encoded
            full = plan_switch(TABLES, Desired.of(TABLES, sw, CPU_PORT), Held.of(base, epoch, b""))
            assert _plan_text(plan) == _plan_text(full), (step, sw.switch)
            assert plan.diff == full.diff, (step, sw.switch)
            assert plan.epoch_after == full.epoch_after
            assert dict(lazy.encoded) == dict(Desired.of(TABLES, sw, CPU_PORT).encoded)
            if delta is not None and (delta.gone or delta.came):
                by_difference += 1
            known[sw.switch] = lazy
        previous = current
    # the difference was what planned most changed switches, not the fallback
    assert by_difference >= 20, by_difference
