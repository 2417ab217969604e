"""A quarantine proven by its shape (compiler/differential.py): a build that differs from a
proven one only by a new, deny-only quarantine overlay needs no packet walked. These tests
check that the shape argument agrees with the verifier: whenever it says "proven", the
full proof says so too, whatever single entry of the ToR is corrupted."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest
from corrupt import corruptions

from compiler.allocation import Allocation, assign_rule_ids
from compiler.check import check_policy
from compiler.differential import OverlayChange, cuts_off, only_overlay_changed, outranked
from compiler.emit import Build, build
from compiler.entries import SwitchTables, TableEntry
from compiler.inventory import Host, Inventory
from compiler.model import Policy
from compiler.quarantine import QUARANTINE_MASK
from compiler.verify import Verifier, verify
from runtime.live import LiveState, effective_policy

NOON = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
Proven = tuple[Policy, Inventory, Mapping[str, SwitchTables]]


def _text(floor_policy_text: str, extra: str = "") -> str:
    lines = floor_policy_text.splitlines()
    text = "\n".join(line for line in lines if not line.startswith("expect"))
    return text.replace("default deny log", extra + "default deny log")


def _build(
    text: str, floor: Inventory, quarantined: tuple[str, ...], previous: Build | None = None
) -> tuple[Policy, Build]:
    policy = check_policy(text, "floor.zt", floor).policy
    assert policy is not None
    state = LiveState(quarantined={h: 0.0 for h in quarantined})
    effective = effective_policy(policy, state, NOON, {h.name: h.ip for h in floor.hosts})
    effective, allocation = assign_rule_ids(
        effective, previous.allocation if previous else Allocation()
    )
    return effective, build(effective, floor, text, "ref", allocation=allocation,
                            previous=previous)  # fmt: skip


def _switches(b: Build) -> dict[str, SwitchTables]:
    return {sw.switch: sw for sw in b.switches}


def quarantine_by_shape(
    old: Proven,
    policy: Policy,
    inventory: Inventory,
    switches: Mapping[str, SwitchTables],
    host: Host,
    mask: int,
) -> str | None:
    """Points 1 and 2 of compiler/differential.py, as the controller asks them: None when
    the new build is proven with no packet walked, else why not."""
    change = only_overlay_changed(old, policy, inventory, switches, host, mask)
    return change if isinstance(change, str) else cuts_off(change, policy, switches, host, mask)


def _quarantine(
    text: str, floor: Inventory, host: str, already: tuple[str, ...] = ()
) -> tuple[Proven, Policy, dict[str, SwitchTables], Host]:
    p0, b0 = _build(text, floor, already)
    p1, b1 = _build(text, floor, (*already, host), b0)
    return (p0, floor, _switches(b0)), p1, _switches(b1), floor.hosts_by_name[host]


def test_a_deny_only_quarantine_is_proven_by_its_shape(
    floor: Inventory, floor_policy_text: str
) -> None:
    text = _text(floor_policy_text)
    for already in ((), ("algo2",), ("risk1",)):
        old, p1, s1, host = _quarantine(text, floor, "algo1", already)
        assert verify(*old).proven
        assert quarantine_by_shape(old, p1, floor, s1, host, QUARANTINE_MASK) is None
        assert verify(p1, floor, s1).proven  # what the shape stands for


def test_the_shape_is_refused_for_anything_else(floor: Inventory, floor_policy_text: str) -> None:
    text = _text(floor_policy_text)
    old, p1, s1, host = _quarantine(text, floor, "algo1")

    def why(policy: Policy = p1, switches: Mapping[str, SwitchTables] = s1, h: Host = host) -> str:
        out = quarantine_by_shape(old, policy, floor, switches, h, QUARANTINE_MASK)
        assert out is not None
        return out

    # A release is proven by the verifier (it widens); so is a host with remediation flows.
    assert why(old[0], old[2]) == "not just the host's quarantine changed"
    remediation = "service remediation = jump1\nallow algo -> remediation tcp 443\n"
    r_old, r1, rs1, _ = _quarantine(_text(floor_policy_text, remediation), floor, "algo1")
    reason = quarantine_by_shape(r_old, r1, floor, rs1, host, QUARANTINE_MASK)
    assert reason == "the carved policy still allows flows of the host (remediation)"
    # Another switch changed, or the ToR changed beyond the overlay.
    tor = s1[host.switch]
    other = next(n for n in s1 if n != host.switch)
    assert why(switches={**s1, other: dataclasses.replace(s1[other], entries=s1[other].entries[1:])}) == f"{other} changed"  # fmt: skip
    overlay = [e for e in tor.entries if e.role == "quarantine"]
    ordinary = max(
        e.priority for e in tor.entries if e.table == "policy" and e.role != "quarantine"
    )

    def tor_with(entries: list[TableEntry]) -> dict[str, SwitchTables]:
        return {**s1, host.switch: dataclasses.replace(tor, entries=tuple(entries))}

    rest = [e for e in tor.entries if e not in overlay]
    # An ordinary allow of any source (here: of every packet) above the catch-all deny.
    permit = next(e for e in rest if e.table == "policy" and e.action == "permit")
    top = max(e.priority for e in overlay) + 1
    anyone = dataclasses.replace(permit, matches=(), priority=top)
    was = old[2][host.switch]
    old_with = {**old[2], host.switch: dataclasses.replace(was, entries=(*was.entries, anyone))}
    reason = quarantine_by_shape((old[0], floor, old_with), p1, floor,
                                 tor_with([*rest, anyone, *overlay]), host, QUARANTINE_MASK)  # fmt: skip
    assert reason is not None and reason.startswith("no catch-all deny"), reason
    assert top > ordinary
    allow = [dataclasses.replace(overlay[0], action="permit"), *overlay[1:]]
    assert why(switches=tor_with(rest + allow)) == "the overlay allows flows of the host"
    assert why(switches=tor_with(rest + overlay[1:])).startswith("no catch-all deny")
    q_tags = next(dict(e.params)["tags"] for e in tor.entries
                  if e.table == "dst_identity" and e.matches[0].value == host.ip)  # fmt: skip
    stolen = [
        dataclasses.replace(e, params=(("tags", q_tags),))
        if e.table == "dst_identity" and e.matches[0].value != host.ip else e
        for e in tor.entries
    ][:]  # fmt: skip
    assert why(switches=tor_with(stolen)).startswith("dst_identity entries other than")
    # A rule changed along with the quarantine.
    edited = text.replace("tcp 5432", "tcp 5433")
    p2, b2 = _build(edited, floor, ("algo1",))
    assert why(p2, _switches(b2)) == "rules changed"


@pytest.mark.parametrize("seed", [3, 5])
def test_whenever_the_shape_says_proven_the_verifier_agrees(
    floor: Inventory, floor_policy_text: str, seed: int
) -> None:
    """Corrupt one entry of the quarantined host's ToR at a time (deleted, action flipped,
    widened, identity shifted, priority raised): every build the shape still accepts is
    one the full proof proves; the corruptions it refuses include every one the proof
    catches."""
    text = _text(floor_policy_text)
    old, p1, s1, host = _quarantine(text, floor, "algo1")
    tor = s1[host.switch]
    overlay = tuple(e for e in tor.entries if e.role == "quarantine" or (
        e.table in ("src_identity", "dst_identity") and e.matches[-1].value == host.ip))  # fmt: skip
    rest = tuple(e for e in tor.entries if e not in overlay)
    mine = dataclasses.replace(tor, entries=overlay)  # the overlay's own entries, corrupted
    builds = corruptions({host.switch: tor}, seed=seed, count=60)
    builds += [
        {host.switch: dataclasses.replace(tor, entries=rest + c[host.switch].entries)}
        for c in corruptions({host.switch: mine}, seed=seed, count=40)
    ]
    accepted = refused = caught = 0
    for corrupted in builds:
        switches = {**s1, **corrupted}
        shape = quarantine_by_shape(old, p1, floor, switches, host, QUARANTINE_MASK)
        proven = verify(p1, floor, switches).proven
        if shape is None:
            accepted += 1
            assert proven, "the shape accepted tables the verifier refutes"
        else:
            refused += 1
            caught += not proven
    print(f"seed {seed}: shape accepted {accepted}, refused {refused}, proof caught {caught}")
    assert accepted and refused and caught  # real corruptions, some caught, some harmless


def test_only_the_overlay_changed_is_told_apart_from_other_changes(
    floor: Inventory, floor_policy_text: str
) -> None:
    """A release differs from the quarantined build only by the overlay going (so its proof
    of the host's packets proves it all); two hosts at once do not."""
    text = _text(floor_policy_text)
    old, p1, s1, host = _quarantine(text, floor, "algo1")
    back = only_overlay_changed((p1, floor, s1), old[0], floor, old[2], host, QUARANTINE_MASK)
    assert not isinstance(back, str) and back.before and not back.after
    _, p2, s2, _ = _quarantine(text, floor, "algo2", ("algo1",))
    two = only_overlay_changed(old, p2, floor, s2, host, QUARANTINE_MASK)
    assert two == "not just the host's quarantine changed"


REMEDIATION = "service remediation = jump1\nallow algo -> remediation tcp 443\n"


def _scoped(
    old: Proven, policy: Policy, floor: Inventory, switches: dict[str, SwitchTables], host: Host
) -> tuple[bool, int] | None:
    """The proof of a quarantine with remediation flows as the controller runs it: None
    when the argument does not hold (the verifier walks all the host's packets then), else
    (proven, pairs walked)."""
    change = only_overlay_changed(old, policy, floor, switches, host, QUARANTINE_MASK)
    if isinstance(change, str):
        return None
    why, catch_alls = outranked(change, switches, host, QUARANTINE_MASK)
    if why is not None:
        return None
    verifier = Verifier(policy, floor, switches)
    result = verifier.run(pairs=verifier.quarantine_scope(host, change.added - catch_alls))
    return result.proven, result.pairs or 0


def test_a_quarantine_with_remediation_flows_walks_only_what_its_overlay_lets_through(
    floor: Inventory, floor_policy_text: str
) -> None:
    old, p1, s1, host = _quarantine(_text(floor_policy_text, REMEDIATION), floor, "algo1")
    change = only_overlay_changed(old, p1, floor, s1, host, QUARANTINE_MASK)
    assert isinstance(change, OverlayChange)
    assert any(e.action == "permit" for e in change.added)  # algo1 -> jump1 tcp 443 and back
    scoped = _scoped(old, p1, floor, s1, host)
    focus = verify(p1, floor, s1, focus={host.ip})
    assert scoped is not None and scoped[0] and focus.proven
    assert 0 < scoped[1] < (focus.pairs or len(floor.hosts) * 2)  # fewer than every pair of algo1


@pytest.mark.parametrize("seed", [7, 9])
def test_whenever_the_scoped_pairs_prove_it_the_verifier_agrees(
    floor: Inventory, floor_policy_text: str, seed: int
) -> None:
    """As above with remediation flows in the overlay: corrupt the ToR and the overlay one
    entry at a time; whenever the argument holds and the scoped pairs are proven, the full
    proof proves the build too."""
    old, p1, s1, host = _quarantine(_text(floor_policy_text, REMEDIATION), floor, "algo1")
    tor = s1[host.switch]
    overlay = tuple(e for e in tor.entries if e.role == "quarantine" or (
        e.table in ("src_identity", "dst_identity") and e.matches[-1].value == host.ip))  # fmt: skip
    rest = tuple(e for e in tor.entries if e not in overlay)
    mine = dataclasses.replace(tor, entries=overlay)
    builds = corruptions({host.switch: tor}, seed=seed, count=40)
    builds += [
        {host.switch: dataclasses.replace(tor, entries=rest + c[host.switch].entries)}
        for c in corruptions({host.switch: mine}, seed=seed, count=60)
    ]
    accepted = caught = 0
    for corrupted in builds:
        switches = {**s1, **corrupted}
        scoped = _scoped(old, p1, floor, switches, host)
        proven = verify(p1, floor, switches).proven
        if scoped is not None and scoped[0]:
            accepted += 1
            assert proven, "the scoped pairs proved tables the verifier refutes"
        caught += not proven
    print(f"seed {seed}: scoped proof accepted {accepted} of {len(builds)}; {caught} caught")
    assert accepted and caught
