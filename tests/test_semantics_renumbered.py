"""The semantics `check` made, renumbered for the same rules with their stable ids
(compiler.semantics.semantics_of, PolicySemantics.renumbered): every decision, and every
dead rule, as semantics made afresh for the renumbered policy give them — also when the
stable ids do not grow in file order."""

from __future__ import annotations

from pathlib import Path

from compiler.allocation import Allocation, assign_rule_ids
from compiler.check import check_policy
from compiler.inventory import load_inventory
from compiler.model import Policy
from compiler.semantics import PolicySemantics, semantics_of

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "policies" / "trading_floor.zt").read_text()
INVENTORY = load_inventory(str(ROOT / "topologies" / "trading_floor.yaml"))[0]
PINNED = tuple(h.ip for h in INVENTORY.hosts)
FIRST_RULE = "allow market_data  -> algo         udp 30001-30010"
DEV = "allow dev -> dev tcp 22"  # a new rule, first in the file: the next free id
WIDER = "allow dev -> dev tcp 20-30"  # overlaps it: the lower id decides, and it is this one
SSH = "allow ops_jump -> prod tcp 22 during 07:00-18:00 UTC"


def _checked(text: str) -> Policy:
    result = check_policy(text, "renumbered.zt", INVENTORY, expectations=False)
    assert result.policy is not None, [d.message for d in result.diagnostics]
    return result.policy


def _renumbered_floor() -> tuple[Policy, Policy]:
    """The floor as checked, and with the stable ids an earlier version left it: a rule
    added at the top takes the next free id, a removed one's id is retired."""
    base = TEXT.replace(FIRST_RULE, f"{FIRST_RULE}\n{WIDER}")
    _, allocation = assign_rule_ids(_checked(base.replace(SSH, "")), Allocation())
    text = base.replace(FIRST_RULE, f"{DEV}\n{FIRST_RULE}")
    checked = _checked(text)
    policy, _ = assign_rule_ids(checked, allocation)
    return checked, policy


def test_renumbered_rules_do_not_grow_in_file_order() -> None:
    checked, policy = _renumbered_floor()
    ids = [r.id for r in policy.rules]
    assert ids != sorted(ids)  # the case the renumbered semantics must get right
    assert [r.id for r in checked.rules] == sorted(r.id for r in checked.rules)


def test_the_renumbered_semantics_decide_as_fresh_ones() -> None:
    checked, policy = _renumbered_floor()
    made = semantics_of(checked, PINNED)  # what check made
    view = semantics_of(policy, PINNED)
    assert view.addresses is made.addresses and view.rules is policy.rules  # shared atoms
    fresh = PolicySemantics(policy, PINNED)
    assert (view.addresses.starts, view.ports.starts) == (
        fresh.addresses.starts,
        fresh.ports.starts,
    )
    decided = 0
    for proto in view.proto_classes:
        for src in range(view.addresses.count):
            for dst in range(view.addresses.count):
                for port in range(view.ports.count):
                    for ack in (False, True):
                        a = view.decide_atoms(src, dst, proto, port, port, ack=ack)
                        b = fresh.decide_atoms(src, dst, proto, port, port, ack=ack)
                        assert (a.allowed, a.reason, a.log, a.rule and a.rule.id) == (
                            b.allowed, b.reason, b.log, b.rule and b.rule.id
                        )  # fmt: skip
                        decided += a.rule is not None
    assert decided  # some packet is decided by a rule, not all by the default
    dev = next(h.ip for h in INVENTORY.hosts if h.name.startswith("dev"))
    atom, port = view.addresses.atom_of(dev), view.ports.atom_of(22)
    deciding = view.decide_atoms(atom, atom, "tcp", port, port).rule
    assert deciding is not None and deciding.describe() == WIDER  # by id, not by position


def test_the_renumbered_semantics_find_the_dead_rules_fresh_ones_find() -> None:
    # a copy of a rule below its first: dead, and which of the two is reported goes by id
    _, policy = _renumbered_floor()
    base = TEXT.replace(FIRST_RULE, f"{FIRST_RULE}\n{WIDER}")
    text = base.replace(FIRST_RULE, f"{DEV}\n{FIRST_RULE}") + f"\n{FIRST_RULE}\n"
    _, allocation = assign_rule_ids(policy, Allocation())
    again = _checked(text)
    semantics_of(again, PINNED)
    policy, _ = assign_rule_ids(again, allocation)
    view = semantics_of(policy, PINNED)
    assert view.addresses is semantics_of(again, PINNED).addresses
    dead = [(c.rule.id, c.by_deny, [r.id for r in c.covering]) for c in view.dead_rules()]
    fresh = PolicySemantics(policy, PINNED).dead_rules()
    assert dead == [(c.rule.id, c.by_deny, [r.id for r in c.covering]) for c in fresh]
    assert dead  # the copy is reported
