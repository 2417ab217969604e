"""Effective policy: quarantine, grants, time-bound rules — judged by the policy semantics."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.addresses import AddressSet
from compiler.check import CheckResult, check_policy
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.semantics import PolicySemantics
from runtime.live import (
    LiveState,
    effective_policy,
    next_change,
    note_applied,
    policy_text_with_grants,
)

REMEDIATION_POLICY = """\
service remediation = jump1
allow algo -> remediation tcp 443
"""


def _policy(text: str, floor: Inventory) -> Policy:
    text = "\n".join(line for line in text.splitlines() if not line.startswith("expect"))
    result = check_policy(text, "p.zt", floor)
    assert result.policy is not None, result.diagnostics
    return result.policy


def _hosts(floor: Inventory) -> dict[str, int]:
    return {h.name: h.ip for h in floor.hosts}


def _allowed(policy: Policy, floor: Inventory, src: str, dst: str, proto: str, port: int) -> bool:
    hosts = _hosts(floor)
    return PolicySemantics(policy).flow(hosts[src], hosts[dst], proto, port).allowed


def test_quarantine_cuts_a_host_off_except_remediation(
    floor: Inventory, floor_policy_text: str
) -> None:
    text = floor_policy_text.replace("default deny log", REMEDIATION_POLICY + "default deny log")
    policy = _policy(text, floor)
    state = LiveState(quarantined={"algo1": 0.0})
    cut = effective_policy(policy, state, 0.0, _hosts(floor))
    assert [r.id for r in cut.rules[: len(policy.rules)]] == [r.id for r in policy.rules]
    flows = [
        ("algo1", "oms1", "tcp", 9876),
        ("md1", "algo1", "udp", 30005),
        ("algo1", "jump1", "tcp", 443),
    ]
    assert [_allowed(policy, floor, *f) for f in flows] == [True, True, True]
    assert [_allowed(cut, floor, *f) for f in flows] == [False, False, True]
    # Every other host keeps exactly what it had.
    for src in ("algo2", "md2", "oms2", "risk1", "jump1"):
        for dst in ("algo3", "oms1", "risk2", "riskdb", "jump1", "ledger"):
            for proto, port in (
                ("tcp", 9876),
                ("tcp", 8443),
                ("udp", 30005),
                ("icmp", 0),
                ("tcp", 443),
            ):
                assert _allowed(cut, floor, src, dst, proto, port) == _allowed(
                    policy, floor, src, dst, proto, port
                ), (src, dst, proto, port)


def test_quarantine_without_remediation_service_isolates_completely(
    floor: Inventory, floor_policy: Policy
) -> None:
    cut = effective_policy(floor_policy, LiveState(quarantined={"oms1": 0.0}), 0.0, _hosts(floor))
    hosts = [h.name for h in floor.hosts]
    for other in hosts:
        for proto, port in (("tcp", 9876), ("tcp", 8443), ("tcp", 7000), ("icmp", 0)):
            assert not _allowed(cut, floor, "oms1", other, proto, port)
            assert not _allowed(cut, floor, other, "oms1", proto, port)


def test_grants_are_rules_until_they_expire(
    floor: Inventory, floor_policy_text: str, tmp_path: Path
) -> None:
    state = LiveState()
    state.add_grant("algo1", "riskdb", "tcp", "5432", 900, now=1000.0, actor="test@host")
    state.save(tmp_path)
    state = LiveState.load(tmp_path)  # survives a restart
    during = _policy(policy_text_with_grants(floor_policy_text, state, 1500.0), floor)
    after = _policy(policy_text_with_grants(floor_policy_text, state, 1900.0), floor)
    assert _allowed(during, floor, "algo1", "riskdb", "tcp", 5432)
    assert not _allowed(after, floor, "algo1", "riskdb", "tcp", 5432)
    assert not _allowed(during, floor, "algo2", "riskdb", "tcp", 5432)
    assert next_change(after, state, 1500.0) == 1900.0
    assert [g.id for g in state.prune(1900.0)] and not state.grants


def test_during_windows_and_for_rules(floor: Inventory, floor_policy: Policy) -> None:
    jump = next(r for r in floor_policy.rules if r.window is not None)  # ssh 07:00-18:00 UTC
    assert jump.dst_text == "prod"
    noon = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC).timestamp()
    night = dt.datetime(2026, 11, 23, 22, 0, tzinfo=dt.UTC).timestamp()
    ssh = ("jump1", "risk1", "tcp", 22)
    assert _allowed(effective_policy(floor_policy, LiveState(), noon, _hosts(floor)), floor, *ssh)
    assert not _allowed(
        effective_policy(floor_policy, LiveState(), night, _hosts(floor)), floor, *ssh
    )
    assert (
        next_change(floor_policy, LiveState(), noon)
        == dt.datetime(2026, 11, 23, 18, 0, tzinfo=dt.UTC).timestamp()
    )
    # Out of force, a rule is the same object at every apply: a compile by difference
    # sees only the rules an edit changed (and in force, the rule itself).
    at_night = effective_policy(floor_policy, LiveState(), night, _hosts(floor))
    again = effective_policy(floor_policy, LiveState(), night + 60, _hosts(floor))
    assert all(a is b for a, b in zip(at_night.rules, again.rules, strict=True))
    (out,) = (r for r in at_night.rules if r.key == jump.key)
    assert out is not jump and not out.src.intervals
    temp = _policy("policy t\nallow algo1 -> riskdb tcp 5432 for 15m\ndefault deny\n", floor)
    state = LiveState()
    note_applied(temp, state, 100.0)
    note_applied(temp, state, 500.0)  # first application counts
    assert _allowed(
        effective_policy(temp, state, 100.0 + 899, _hosts(floor)),
        floor,
        "algo1",
        "riskdb",
        "tcp",
        5432,
    )
    assert not _allowed(
        effective_policy(temp, state, 100.0 + 900, _hosts(floor)),
        floor,
        "algo1",
        "riskdb",
        "tcp",
        5432,
    )


def _members(addresses: AddressSet) -> set[int]:
    return {v for lo, hi in addresses.intervals for v in range(lo, hi + 1)}


@pytest.mark.parametrize("seed", range(5))
def test_address_set_intersection_and_difference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        a = AddressSet.of((x, x + rng.randrange(6)) for x in rng.sample(range(80), 6))
        b = AddressSet.of((x, x + rng.randrange(6)) for x in rng.sample(range(80), 6))
        assert _members(a.intersection(b)) == _members(a) & _members(b)
        assert _members(a.difference(b)) == _members(a) - _members(b)
        assert a.difference(b) == AddressSet.of(a.difference(b).intervals)  # merged, sorted


def test_operations_are_values_applied_to_a_copy_of_the_state() -> None:
    from runtime.live import (
        GrantFlow,
        NotQuarantined,
        QuarantineHost,
        ReleaseHost,
        RevokeGrant,
        UnknownGrant,
        operate,
    )

    state = LiveState()
    granted = operate(state, GrantFlow("algo1", "riskdb", "tcp", "5432", 900, "t@h"), 1000.0)
    assert not state.grants and granted.grant is not None  # the state before is untouched
    assert granted.state.grants == [granted.grant] and granted.grant.expires == 1900.0
    assert granted.event == {
        "grant": granted.grant.id,
        "rule": granted.grant.line(),
        "seconds": 900,
    }
    with pytest.raises(UnknownGrant, match="no grant nope"):
        operate(granted.state, RevokeGrant("nope"), 1000.0)
    revoked = operate(granted.state, RevokeGrant(granted.grant.id), 1000.0)
    assert not revoked.state.grants and granted.state.grants
    cut = operate(revoked.state, QuarantineHost("algo1"), 1000.0)
    assert cut.state.quarantined == {"algo1": 1000.0} and not cut.again
    assert operate(cut.state, QuarantineHost("algo1"), 2000.0).again
    with pytest.raises(NotQuarantined):
        operate(revoked.state, ReleaseHost("algo1"), 1000.0)
    assert not operate(cut.state, ReleaseHost("algo1"), 1000.0).state.quarantined


def test_grant_rules_are_keyed_by_their_grant_so_their_ids_hold(
    floor: Inventory, floor_policy_text: str
) -> None:
    from compiler.allocation import Allocation, assign_rule_ids

    state = LiveState()
    first = state.add_grant("algo1", "riskdb", "tcp", "5432", 100, now=1000.0, actor="t")
    second = state.add_grant("algo2", "riskdb", "tcp", "5432", 900, now=1000.0, actor="t")
    both, allocation = assign_rule_ids(
        _policy(policy_text_with_grants(floor_policy_text, state, 1050.0), floor), Allocation()
    )
    keyed = {r.key: r.id for r in both.rules}
    assert {first.rule_name, second.rule_name} <= keyed.keys()
    one, _ = assign_rule_ids(
        _policy(policy_text_with_grants(floor_policy_text, state, 1500.0), floor), allocation
    )
    assert first.rule_name not in {r.key for r in one.rules}
    assert next(r.id for r in one.rules if r.key == second.rule_name) == keyed[second.rule_name]


def test_for_clocks_are_keyed_by_rule_key_and_old_text_keys_still_count(
    floor: Inventory,
) -> None:
    text = "policy t\nallow algo1 -> riskdb tcp 5432 for 15m name temp_db\ndefault deny\n"
    temp = _policy(text, floor)
    (rule,) = temp.rules
    state = LiveState(first_applied={rule.describe(): 100.0})  # live.json of an older p4seg
    note_applied(temp, state, 500.0)
    assert state.first_applied[rule.key] == 100.0  # the clock did not restart
    assert not _allowed(effective_policy(temp, state, 1000.0, _hosts(floor)), floor,
                        "algo1", "riskdb", "tcp", 5432)  # fmt: skip
    # Editing a named rule keeps its clock (its key is its name), not its text's.
    edited = _policy(text.replace("tcp 5432", "tcp 5433"), floor)
    assert edited.rules[0].key == rule.key and edited.rules[0].describe() != rule.describe()
    assert next_change(edited, LiveState(first_applied={rule.key: 100.0}), 500.0) == 1000.0


def test_a_grant_that_ran_out_unnoticed_is_due_now(floor_policy: Policy) -> None:
    """A watch loop that learns of a grant only after it ran out (a busy loop, a short
    grant) must still remove it: the expired grant, still in the state, is due now."""
    state = LiveState()
    grant = state.add_grant("algo1", "riskdb", "tcp", "5432", 1, 1000.0, "test")
    assert next_change(floor_policy, state, 1000.5) == grant.expires
    assert next_change(floor_policy, state, 1005.0) == 1005.0  # overdue: now
    state.prune(1005.0)  # the apply that removes it prunes it: then only the window is due
    after = next_change(floor_policy, state, 1005.0)
    assert after is not None and after > 1005.0


def _appended(
    text: str, state: LiveState, now: float, floor: Inventory
) -> tuple[CheckResult, CheckResult]:
    """The check of the policy with its grants, whole and appended to the file's check."""
    from compiler.check import check_appended

    granted = policy_text_with_grants(text, state, now)
    checked = check_policy(text, "p.zt", floor)
    return check_policy(granted, "p.zt", floor), check_appended(
        checked, text, granted, "p.zt", floor
    )


def test_grants_appended_to_a_checked_policy_are_the_grants_of_a_whole_check(
    floor: Inventory, floor_policy_text: str
) -> None:
    """A long-running controller resolves grants against the file's check instead of
    checking the file with its grants again: the same rules, ids, keys and spans."""
    state = LiveState()
    state.add_grant("algo1", "settle2", "tcp", "6001", 3600, 1000.0, "op")
    state.add_grant("dev", "10.0.1.5", "udp", "7000-7010", 3600, 1000.0, "op")
    state.add_grant("ops_jump", "risk", "icmp", "", 3600, 1000.0, "op")
    whole, appended = _appended(floor_policy_text, state, 1100.0, floor)
    assert whole.policy is not None and appended.policy is not None
    assert appended.policy.rules == whole.policy.rules
    assert appended.policy.rules[-1].key == f"grant_{state.grants[-1].id}"
    assert [r.span for r in appended.policy.rules] == [r.span for r in whole.policy.rules]
    assert appended.diagnostics == ()


def test_a_grant_that_breaks_an_expectation_or_names_nothing_fails_as_in_a_whole_check(
    floor: Inventory, floor_policy_text: str
) -> None:
    expects = [line for line in floor_policy_text.splitlines() if line.startswith("expect")]
    assert any("denied" in line for line in expects)
    for src, dst, proto, ports in (("algo1", "risk1", "tcp", "8443"),  # an `expect` says denied
                                   ("nohost", "algo1", "tcp", "1")):  # fmt: skip
        state = LiveState()
        state.add_grant(src, dst, proto, ports, 3600, 1000.0, "op")
        whole, appended = _appended(floor_policy_text, state, 1100.0, floor)
        assert whole.policy is None and appended.policy is None
        errors = [(d.code, d.span) for d in whole.diagnostics if d.is_error]
        assert errors and [(d.code, d.span) for d in appended.diagnostics] == errors


def test_grant_text_holding_more_than_its_rule_gets_the_rules_of_a_whole_check(
    floor: Inventory, floor_policy_text: str
) -> None:
    """Grant text with another rule in it (operate refuses such a grant; a live.json
    written by hand may hold one): the same rules as the whole text's check — an unnamed
    rule is not resolved against the file's check, the whole text is checked as it reads."""
    for src in ("algo1 -> settle2 tcp 1\nallow dev", "algo1 -> settle2 tcp 1 name x\nallow dev"):
        state = LiveState()
        state.add_grant(src, "settle2", "tcp", "6001", 3600, 1000.0, "op")
        whole, appended = _appended(floor_policy_text, state, 1100.0, floor)
        assert list(appended.diagnostics) == [d for d in whole.diagnostics if d.is_error]
        assert whole.policy is not None and appended.policy is not None
        assert appended.policy.rules == whole.policy.rules
        assert len(whole.policy.rules) == len(_policy(floor_policy_text, floor).rules) + 2


def test_a_grant_whose_sides_are_not_one_endpoint_is_refused() -> None:
    from runtime.live import GrantFlow, InvalidGrant, operate

    state = LiveState()
    for src, ports in (("algo1 -> settle2 tcp 1\nallow dev", "6001"), ("algo1", "6001 # x"),
                       ("algo1", "6001 log"), ("algo1", "log")):  # fmt: skip
        with pytest.raises(InvalidGrant):
            operate(state, GrantFlow(src, "settle2", "tcp", ports, 60, "op"), 1000.0)
    assert state.grants == []
    for proto, ports in (("icmp", "echo-request"), ("icmp", "type 3 code 4"), ("tcp", "80, 443")):
        done = operate(state, GrantFlow("algo1", "10.0.1.0/24", proto, ports, 60, "op"), 0)
        assert done.grant is not None


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ("algo1", "algo", "oms1", "risk1", "jump1", "md1", "dev1", "10.0.4.0/24")
            ),
            st.sampled_from(
                ("oms1", "risk1", "riskdb", "algo2", "md1", "ledger", "risk", "settle2")
            ),
            st.sampled_from(
                (
                    ("tcp", "8443"),
                    ("tcp", "9876"),
                    ("udp", "30005"),
                    ("tcp", "22"),
                    ("udp", "30011"),
                    ("icmp", ""),
                    ("tcp", "5432"),
                    ("tcp", "6001"),
                )
            ),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_grants_appended_judge_the_expect_lines_as_a_whole_check_does(
    floor: Inventory, floor_policy_text: str, grants: list[tuple[str, str, tuple[str, str]]]
) -> None:
    """Grants that break an `expect` line (algo1 -> risk1 tcp 8443 is expected denied), that
    touch one and keep it, or touch none: the errors of the appended check, which judges
    only the lines the grants can touch, are the whole check's, word for word."""
    state = LiveState()
    for src, dst, (proto, ports) in grants:
        state.add_grant(src, dst, proto, ports, 3600, 1000.0, "op")
    whole, appended = _appended(floor_policy_text, state, 1100.0, floor)
    errors = [d for d in whole.diagnostics if d.is_error]
    assert list(appended.diagnostics) == errors
    assert (appended.policy is None) == (whole.policy is None)
