"""bench/baselines.py: the entry counts p4seg's policy entries are measured against.

The figures of the generated floor and the trading floor were computed by compiler/lower.py
when it still counted them while lowering (main at 25d5dee); bench/baselines.py must give
the same. The small case is counted by hand in its comments.
"""

from __future__ import annotations

from test_lower import SMALL

from bench.baselines import Baseline, baselines, total
from bench.gen_policy import generate
from compiler.check import check_policy
from compiler.inventory import Inventory, parse_inventory
from compiler.lower import lower
from compiler.model import Policy

TWO_RACKS = SMALL  # two racks of two hosts behind one spine (tests/test_lower.py)


def _checked(text: str, inventory: Inventory) -> Policy:
    result = check_policy(text, "policy.zt", inventory)
    assert result.policy is not None, result.diagnostics
    return result.policy


def _per_tor(policy: Policy, inventory: Inventory) -> dict[str, tuple[int, int]]:
    return {b.switch: (b.naive, b.host_pairs) for b in baselines(policy, inventory)}


def test_counted_by_hand() -> None:
    policy = _checked(
        "policy tiny\n"
        "allow a1 -> b1, b2 tcp 8000-8009\n"
        "deny b1 -> a2 udp 53\n"
        "allow a2 -> b2 icmp\n",
        TWO_RACKS,
    )
    # Each ToR, each rule: the forward packets and their replies each touch the ToR's hosts.
    #   tcp: 2 host pairs x 10 ports, forward and ACK replies:   naive 40, host pairs 4
    #   udp deny: 1 pair x port 53, forward and (a deny) replies:      2,            2
    #   icmp: 1 pair, forward (any type: one entry) + echo replies
    #         (types 0, codes 0-255 in the port field: 256):         257,            2
    assert _per_tor(policy, TWO_RACKS) == {"t1": (299, 8), "t2": (299, 8)}  # spines: none


def test_generated_floor_figures_as_lower_counted_them() -> None:
    floor = generate(rules=60, services=20, hosts=40, tors=4)
    inventory = parse_inventory(floor.inventory, "inventory.yaml")
    policy = _checked(floor.policy, inventory)
    per_tor = baselines(policy, inventory)
    assert {b.switch: (b.naive, b.host_pairs) for b in per_tor} == {
        "t01": (54778, 1228),
        "t02": (55122, 1364),
        "t03": (60873, 1760),
        "t04": (155540, 2484),
    }
    assert total(per_tor) == Baseline("", 326313, 6836)
    switches = lower(policy, inventory).switches
    compiled = sum(len(sw.table("policy")) for sw in switches if sw.role == "tor")
    assert compiled < total(per_tor).host_pairs  # what the baselines are there to show


def test_trading_floor_figures_as_lower_counted_them(
    floor: Inventory, floor_policy: Policy
) -> None:
    assert _per_tor(floor_policy, floor) == {
        "tor-md": (5529, 93),
        "tor-alg": (5541, 105),
        "tor-oms": (5471, 116),
        "tor-rsk": (5451, 96),
        "tor-stl": (8559, 144),
        "tor-dev": (23310, 360),
    }
    assert total(baselines(floor_policy, floor)) == Baseline("", 53861, 914)
