"""`signal ... -> restrict PROFILE` and automatic holds in the live state: the effective
policy (runtime/live.py) judged by the policy semantics, and compiled tables proven."""

from __future__ import annotations

from pathlib import Path

from compiler.check import check_policy
from compiler.emit import build
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.semantics import PolicySemantics
from compiler.verify import verify
from runtime.live import LiveState, effective_policy, in_force_report, next_change

POLICY = """\
policy floor
service algo         = algo1, algo2, algo3
service order_router = oms1, oms2
service remediation  = jump1
service read_only    = 10.0.2.250
service quiet        = 10.0.2.251
allow algo, read_only -> order_router tcp 9876
allow algo            -> risk1        tcp 8443
allow any             -> remediation  tcp 443
allow order_router    -> algo, read_only udp 5000
signal degraded from edr -> restrict read_only
signal silenced from edr -> restrict quiet
default deny log
"""
FLOWS = [
    ("algo1", "oms1", "tcp", 9876),  # read_only has it
    ("algo1", "risk1", "tcp", 8443),  # read_only does not
    ("algo1", "jump1", "tcp", 443),  # `any`: every profile has it
    ("oms1", "algo1", "udp", 5000),  # towards the host: read_only has it
    ("algo2", "risk1", "tcp", 8443),  # another host: untouched
]


def _policy(floor: Inventory) -> Policy:
    result = check_policy(POLICY, "p.zt", floor)
    assert result.policy is not None, result.diagnostics
    return result.policy


def _verdicts(policy: Policy, floor: Inventory) -> list[bool]:
    hosts = {h.name: h.ip for h in floor.hosts}
    sem = PolicySemantics(policy)
    return [sem.flow(hosts[s], hosts[d], proto, port).allowed for s, d, proto, port in FLOWS]


def test_restrict_keeps_only_the_flows_the_profile_has(floor: Inventory) -> None:
    policy = _policy(floor)
    hosts = {h.name: h.ip for h in floor.hosts}
    assert _verdicts(policy, floor) == [True, True, True, True, True]
    state = LiveState(restricted={"algo1": ["read_only"]})
    narrowed = effective_policy(policy, state, 0.0, hosts)
    assert _verdicts(narrowed, floor) == [True, False, True, True, True]
    # Ids and keys stay: the rules are the same rules, with the host off one side.
    assert [(r.id, r.key) for r in narrowed.rules] == [(r.id, r.key) for r in policy.rules]
    # Two profiles: only what both have (`quiet` is named by `any` only).
    both = effective_policy(
        policy, LiveState(restricted={"algo1": ["read_only", "quiet"]}), 0.0, hosts
    )
    assert _verdicts(both, floor) == [False, False, True, False, True]
    # A profile the policy no longer has keeps nothing but what `any` covers: fail closed.
    gone = effective_policy(policy, LiveState(restricted={"algo1": ["retired"]}), 0.0, hosts)
    assert _verdicts(gone, floor)[:4] == [False, False, False, False]


def test_restricted_tables_are_proven(floor: Inventory) -> None:
    policy = _policy(floor)
    hosts = {h.name: h.ip for h in floor.hosts}
    state = LiveState(restricted={"algo1": ["read_only"]}, quarantined={"algo2": 0.0})
    effective = effective_policy(policy, state, 0.0, hosts)
    built = build(effective, floor, POLICY, "ref")
    result = verify(effective, floor, {sw.switch: sw for sw in built.switches})
    assert result.proven, result.counterexamples[:3]


def test_automatic_holds_lapse_on_their_own(floor: Inventory, tmp_path: Path) -> None:
    policy = _policy(floor)
    hosts = {h.name: h.ip for h in floor.hosts}
    state = LiveState(
        quarantined={"algo2": 0.0},
        quarantine_until={"algo2": 100.0},
        restricted={"algo1": ["read_only"]},
        restricted_until={"algo1": 200.0},
    )
    state.save(tmp_path)
    state = LiveState.load(tmp_path)
    assert next_change(policy, state, 0.0) == 100.0
    report = in_force_report(policy, state, 50.0)
    assert report.quarantined == ("algo2",) and report.restricted == (("algo1", ("read_only",)),)
    assert "  restricted:  algo1 to read_only" in report.lines()
    assert _verdicts(effective_policy(policy, state, 150.0, hosts), floor)[1] is False
    assert in_force_report(policy, state, 150.0).quarantined == ()
    assert _verdicts(effective_policy(policy, state, 200.0, hosts), floor)[1] is True
    state.prune(200.0)
    assert (state.quarantined, state.restricted, state.quarantine_until) == ({}, {}, {})
