"""Stable rule ids assigned by difference (compiler/allocation.py `_by_difference`): given
the allocation the last assignment made and a policy whose rules are mostly the same
objects at the same places, the ids and the allocation are the ones a full assignment
gives — kept, retired and new ids alike."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from line_edits import edit_lines
from test_resolve_kept import INVENTORY, LINES, MORE, TEXT

from compiler import allocation as allocation_module
from compiler.allocation import Allocation, assign_rule_ids
from compiler.check import check_policy
from compiler.model import Policy

# Edits in place keep the rule count (the by-difference case); an insert or a delete
# comes now and then, and the assignment after it is made in full.
edit = st.tuples(
    st.sampled_from(["replace"] * 4 + ["insert", "delete"]),
    st.integers(min_value=0, max_value=len(LINES)),
    st.sampled_from(LINES + MORE),
)


def _checked(text: str) -> Policy | None:
    return check_policy(text, "floor.zt", INVENTORY, expectations=False).policy


@settings(max_examples=80, deadline=None)
@given(st.lists(edit, min_size=1, max_size=8))
def test_ids_assigned_by_difference_are_the_ids_assigned_in_full(
    edits: list[tuple[str, int, str]],
) -> None:
    lines = list(LINES)
    policy = _checked(TEXT)
    assert policy is not None
    allocation_module._LAST.clear()
    _, allocation = assign_rule_ids(policy, Allocation())
    # Two rules gone and their ids freed (every switch applied since): holes that new
    # keys take first, lowest first.
    rules = [i for i, text in enumerate(lines) if text.startswith(("allow ", "deny "))]
    del lines[rules[4]], lines[rules[1]]
    thinner = _checked("\n".join(lines) + "\n")
    assert thinner is not None
    _, allocation = assign_rule_ids(thinner, allocation)
    _, allocation = assign_rule_ids(thinner, allocation.settled())
    for kind, at, line in edits:
        edit_lines(lines, kind, at, line)
        policy = _checked("\n".join(lines) + "\n")
        if policy is None:
            continue  # an error: nothing is assigned
        full_rules, full = allocation_module._in_full(policy.rules, allocation)
        numbered, allocation = assign_rule_ids(policy, allocation)
        assert [(r.key, r.id) for r in numbered.rules] == [(r.key, r.id) for r in full_rules]
        assert numbered.rules == full_rules and allocation == full


def test_an_edit_in_place_is_assigned_by_difference() -> None:
    """The case the property above is about does happen: a port edited keeps every other
    rule's object and id, and the edited rule (a new key) takes the lowest free id."""
    policy = _checked(TEXT)
    assert policy is not None
    allocation_module._LAST.clear()
    first, allocation = assign_rule_ids(policy, Allocation())
    edited = _checked(TEXT.replace("risk_db      tcp 5432", "risk_db      tcp 5433"))
    assert edited is not None
    calls: list[object] = []
    real = allocation_module._in_full
    allocation_module._in_full = lambda *a: calls.append(a) or real(*a)  # type: ignore[func-returns-value]
    try:
        again, after = assign_rule_ids(edited, allocation)
    finally:
        allocation_module._in_full = real
    assert calls == []
    changed = [(a, b) for a, b in zip(first.rules, again.rules, strict=True) if a is not b]
    [(old, new)] = changed
    assert new.id == max(allocation.rules.values()) + 1 and old.id in after.retired_rules
