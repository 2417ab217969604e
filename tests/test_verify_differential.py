"""Differential proofs (compiler/verify.py differential_scope): after a proven build, a
change is proven on the ToRs whose tables changed, and only when that covers every packet
whose verdict the change can touch; anything else falls back to the full proof."""

from __future__ import annotations

import dataclasses

from corrupt import corruptions
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.check import check_policy
from compiler.differential import OverlayChange, changed_entries, only_overlay_changed
from compiler.emit import build, load_entries, load_entries_near
from compiler.entries import SwitchTables, TableEntry
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.quarantine import QUARANTINE_MASK
from compiler.verify import (
    ProofRecord,
    Recorded,
    Verifier,
    VerifyResult,
    differential_scope,
    proof_digest,
    proof_record,
    rule_digest,
    verify,
)
from runtime.live import LiveState, effective_policy


def _compile(text: str, floor: Inventory) -> tuple[Policy, dict[str, SwitchTables]]:
    policy = check_policy(text, "floor.zt", floor, expectations=False).policy
    assert policy is not None
    return policy, {sw.switch: sw for sw in build(policy, floor, text, "ref").switches}


def _roles(floor: Inventory) -> dict[str, str]:
    return {s.name: s.role for s in floor.switches}


EDIT = ("risk_db      tcp 5432", "risk_db      tcp 5433")  # risk -> risk_db: all on tor-rsk
RULE_EDITS = [  # a port, another rack's rule, `log` dropped, a rule added
    EDIT,
    ("allow algo         -> order_router tcp 9876", "allow algo -> order_router tcp 9877"),
    ("deny dev  -> prod log", "deny dev -> prod"),
    ("# -- Operations", "allow dev -> dev tcp 22\n# -- Operations"),
]


def test_a_one_rack_edit_is_proven_on_that_rack_alone(
    floor: Inventory, floor_policy_text: str
) -> None:
    p0, b0 = _compile(floor_policy_text, floor)
    before = proof_record(p0, floor, b0)
    assert verify(p0, floor, b0).proven
    p1, b1 = _compile(floor_policy_text.replace(*EDIT), floor)
    after = proof_record(p1, floor, b1)
    scope = differential_scope(before, after, _roles(floor))
    assert scope == frozenset({"tor-rsk"})
    full, part = verify(p1, floor, b1, exact=True), verify(p1, floor, b1, scope)
    assert full.proven and part.proven and part.scope == ("tor-rsk",)
    assert part.classes < full.classes / 2  # far fewer packets walked
    # the record survives its JSON form (the controller keeps it in its state directory)
    assert ProofRecord.from_json(after.to_json()) == after


def test_stale_tables_on_a_rack_the_change_touches_force_a_full_proof(
    floor: Inventory, floor_policy_text: str
) -> None:
    p0, b0 = _compile(floor_policy_text, floor)
    p1, b1 = _compile(floor_policy_text.replace(*EDIT), floor)
    stale = {**b1, "tor-rsk": b0["tor-rsk"]}  # a compiler that forgot to change tor-rsk
    scope = differential_scope(
        proof_record(p0, floor, b0), proof_record(p1, floor, stale), _roles(floor)
    )
    assert scope is None  # the changed rule's rack did not change: prove everything
    result = verify(p1, floor, stale)
    assert not result.proven
    assert any(c.packet.dport in (5432, 5433) for c in result.counterexamples)


def test_a_corruption_on_a_changed_rack_is_caught_by_the_differential_proof(
    floor: Inventory, floor_policy_text: str
) -> None:
    p0, b0 = _compile(floor_policy_text, floor)
    p1, b1 = _compile(floor_policy_text.replace(*EDIT), floor)
    tor = b1["tor-rsk"]
    # the new rule's forward entry loses its port: risk -> risk_db on every TCP port
    widened = tuple(
        dataclasses.replace(e, matches=tuple(m for m in e.matches if m.field != "l4_dst_port"))
        if e.table == "policy"
        and e.role == "forward"
        and any(m.field == "l4_dst_port" and m.value == 5433 for m in e.matches)
        else e
        for e in tor.entries
    )
    corrupted = {**b1, "tor-rsk": dataclasses.replace(tor, entries=widened)}
    scope = differential_scope(
        proof_record(p0, floor, b0), proof_record(p1, floor, corrupted), _roles(floor)
    )
    assert scope == frozenset({"tor-rsk"})
    result = verify(p1, floor, corrupted, scope)
    assert not result.proven and "allowed" in result.counterexamples[0].kind


def test_spine_or_inventory_changes_need_the_full_proof(
    floor: Inventory, floor_policy_text: str
) -> None:
    p0, b0 = _compile(floor_policy_text, floor)
    before = proof_record(p0, floor, b0)
    spine = b0["spine1"]
    moved = {**b0, "spine1": dataclasses.replace(spine, entries=spine.entries[:-1])}
    assert differential_scope(before, proof_record(p0, floor, moved), _roles(floor)) is None
    assert differential_scope(before, proof_record(p0, floor, b0), _roles(floor)) == frozenset()
    fewer = dataclasses.replace(floor, hosts=floor.hosts[:-1])
    assert differential_scope(before, proof_record(p0, fewer, b0), _roles(floor)) is None


# -- differential by pairs (compiler/differential.py) ----------------------------------------


def _found(result: VerifyResult) -> set[str]:
    return {c.describe() for c in result.counterexamples}


def test_pairs_catch_every_corruption_the_full_proof_catches(
    floor: Inventory, floor_policy_text: str
) -> None:
    policy, switches = _compile(floor_policy_text, floor)
    previous = (policy, floor, switches)
    assert verify(policy, floor, switches).proven
    caught = 0
    for corrupted in corruptions(switches, seed=7, count=120):
        full = verify(policy, floor, corrupted)
        part = verify(policy, floor, corrupted, previous=previous)
        assert part.pairs is not None  # proven by pairs, not the fallback
        assert _found(part) == _found(full)
        caught += not full.proven
    assert caught >= 20  # most corruptions matter; each was found by both


def test_a_rule_edit_is_proven_on_its_pairs_and_a_corruption_on_them_caught(
    floor: Inventory, floor_policy_text: str
) -> None:
    p0, b0 = _compile(floor_policy_text, floor)
    for old, new in RULE_EDITS:
        assert old in floor_policy_text
        p1, b1 = _compile(floor_policy_text.replace(old, new), floor)
        full = verify(p1, floor, b1, exact=True)
        part = verify(p1, floor, b1, previous=(p0, floor, b0), exact=True)
        assert full.proven and part.proven, new
        assert part.pairs is not None and 0 < part.classes < full.classes
        by_rules = verify(p1, floor, b1, previous=(p0, floor, b0))  # rule by rule
        assert by_rules.proven and by_rules.by_rules is not None, new
        for corrupted in corruptions(b1, seed=len(new), count=10):
            found = _found(verify(p1, floor, corrupted))
            for exact in (True, False):
                assert (
                    _found(verify(p1, floor, corrupted, previous=(p0, floor, b0), exact=exact))
                    == found
                ), new


def test_pairs_fall_back_to_the_full_proof_when_the_inventory_changes(
    floor: Inventory, floor_policy_text: str
) -> None:
    policy, switches = _compile(floor_policy_text, floor)
    fewer = dataclasses.replace(floor, hosts=floor.hosts[:-1])
    result = verify(policy, floor, switches, previous=(policy, fewer, switches))
    assert result.proven and result.pairs is None and result.scope is None
    nothing = verify(policy, floor, switches, previous=(policy, floor, switches))
    assert nothing.proven and nothing.pairs == 0 and nothing.classes == 0


def test_a_proof_over_what_earlier_proofs_derived_equals_a_cold_one(
    floor: Inventory, floor_policy_text: str
) -> None:
    """The derivations kept per switch object (compiler.verify.DERIVED: indexes, cuts)
    serve the next proof over the same objects; a corrupted switch is a new object and is
    derived afresh, so warm and cold proofs find the same counterexamples."""
    from compiler.verify import DERIVED

    policy, switches = _compile(floor_policy_text, floor)
    assert verify(policy, floor, switches).proven  # warms the cache for every switch
    for corrupted in corruptions(switches, seed=11, count=30):
        warm = verify(policy, floor, corrupted)
        DERIVED.clear()
        cold = verify(policy, floor, corrupted)
        assert _found(warm) == _found(cold) and warm.proven == cold.proven
        verify(policy, floor, switches)  # warm again for the next one


def test_a_host_to_host_grant_is_proven_on_its_own_pairs(
    floor: Inventory, floor_policy_text: str
) -> None:
    """A grant between two hosts gives each of them a tag (their identity entries change in
    their tags alone, on every ToR): only the `policy` entries that tell the old vector
    from the new one can judge them otherwise, so the proof walks the grant's own pairs,
    not every pair of the two hosts — and still finds what the full proof finds."""
    p0 = check_policy(floor_policy_text, "floor.zt", floor, expectations=False).policy
    assert p0 is not None
    first = build(p0, floor, floor_policy_text, "ref")
    b0 = {sw.switch: sw for sw in first.switches}
    text = floor_policy_text + "\nallow algo1 -> settle2 tcp 6001 name grant_1\n"
    p1 = check_policy(text, "floor.zt", floor, expectations=False).policy
    assert p1 is not None
    granted = build(p1, floor, text, "ref", allocation=first.allocation)
    b1 = {sw.switch: sw for sw in granted.switches}
    retagged = {
        (name, e.table)
        for name, sw in b1.items()
        for e in set(sw.entries) - set(b0[name].entries)
        if e.table in ("src_identity", "dst_identity")
    }
    assert retagged  # the two hosts carry a new tag
    full = verify(p1, floor, b1)
    part = verify(p1, floor, b1, previous=(p0, floor, b0), exact=True)
    assert full.proven and part.proven
    # The grant's flow forward and back: 2 pairs, where a whole change of the two hosts'
    # identity entries put 158 in scope (settle2's dst_identity entry on tor-alg is new:
    # a miss before, it is a retag from the table's default).
    assert part.pairs == 2
    shifted = 0
    for corrupted in corruptions(b1, seed=3, count=60):
        found = _found(verify(p1, floor, corrupted))
        for exact in (True, False):
            assert (
                _found(verify(p1, floor, corrupted, previous=(p0, floor, b0), exact=exact)) == found
            )
        shifted += any(corrupted[n] is not b1[n] for n in corrupted)
    assert shifted == 60


def _recorded(policy: Policy, floor: Inventory, switches: dict[str, SwitchTables]) -> Recorded:
    """A proven build as the state directory keeps it for a new process (p4seg/proven.py):
    its record, each rule's addresses (and its uncarved rules with a quarantine in force),
    and its tables read back from their entries files."""
    files = build(policy, floor, "", "ref").files
    kept = {name: load_entries(files[f"entries/{name}.json"]) for name in switches}
    sides = {r.key: (r.src.intervals, r.dst.intervals) for r in policy.rules}
    uncarved = None
    if policy.quarantine is not None:
        uncarved = {
            r.key: (rule_digest(r), r.src.intervals, r.dst.intervals)
            for r in policy.uncarved().rules
        }
    quarantined = frozenset(policy.quarantine.hosts) if policy.quarantine else frozenset()
    return Recorded(proof_record(policy, floor, switches), sides, uncarved, quarantined, kept)


def test_a_new_process_proves_an_edit_on_the_same_pairs_from_the_kept_build(
    floor: Inventory, floor_policy_text: str
) -> None:
    p0, b0 = _compile(floor_policy_text, floor)
    kept = _recorded(p0, floor, b0)
    assert all(proof_digest(kept.switches[n]) == proof_digest(b0[n]) for n in b0)  # exact
    for old, new in RULE_EDITS:
        p1, b1 = _compile(floor_policy_text.replace(old, new), floor)
        record = proof_record(p1, floor, b1)
        held = Verifier(p1, floor, b1).pair_scope(p0, floor, b0)
        from_state = Verifier(p1, floor, b1).recorded_pair_scope(kept, record)
        assert held is not None and from_state == held, new
        for corrupted in corruptions(b1, seed=len(new), count=10):
            record = proof_record(p1, floor, corrupted)
            part = verify(p1, floor, corrupted, recorded=(kept, record))
            assert part.pairs is not None and _found(part) == _found(verify(p1, floor, corrupted))


def test_tables_left_as_they_were_after_an_edit_are_caught_from_the_kept_build(
    floor: Inventory, floor_policy_text: str
) -> None:
    """A compiler that forgot a change: no entry differs, so only the changed rules (their
    addresses then and now) bring the packets in. A removed rule has only its old ones."""
    p0, b0 = _compile(floor_policy_text, floor)
    kept = _recorded(p0, floor, b0)
    removed = "allow algo         -> order_router tcp 9876"
    for text in (floor_policy_text.replace(removed, ""), floor_policy_text.replace(*EDIT)):
        p1, _ = _compile(text, floor)
        result = verify(p1, floor, b0, recorded=(kept, proof_record(p1, floor, b0)))
        assert result.pairs is not None and not result.proven
        assert any(c.packet.dport in (9876, 5432, 5433) for c in result.counterexamples)


def test_a_new_process_proves_on_the_same_pairs_with_quarantines_in_force(
    floor: Inventory, floor_policy: Policy
) -> None:
    """A quarantine carves the rules that name its host; the other ToRs judge by the
    uncarved rules, which the kept build keeps too: the pairs are those a process that
    held the build would walk, whether the quarantine is in the old build, the new, both."""
    hosts = {h.name: h.ip for h in floor.hosts}
    noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600

    def compiled(*quarantined: str) -> tuple[Policy, dict[str, SwitchTables]]:
        state = LiveState(quarantined=dict.fromkeys(quarantined, 0.0))
        policy = effective_policy(floor_policy, state, noon, hosts)
        return policy, {sw.switch: sw for sw in build(policy, floor, "", "ref").switches}

    for old_q, new_q in [((), ("algo1",)), (("algo1",), ()), (("algo1",), ("algo1", "dev1"))]:
        p0, b0 = compiled(*old_q)
        p1, b1 = compiled(*new_q)
        held = Verifier(p1, floor, b1).pair_scope(p0, floor, b0)
        kept = _recorded(p0, floor, b0)
        from_state = Verifier(p1, floor, b1).recorded_pair_scope(kept, proof_record(p1, floor, b1))
        assert held is not None and from_state == held, (old_q, new_q)
        assert verify(p1, floor, b1, recorded=(kept, proof_record(p1, floor, b1))).proven


def test_a_kept_build_tells_an_overlay_change_as_the_proven_build_does(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """`Recorded.overlay_change` (a new process) gives what `only_overlay_changed` gives
    the process that holds the proven build: the overlay, or why not."""
    hosts = {h.name: h.ip for h in floor.hosts}
    noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
    edited = _compile(floor_policy_text.replace(*EDIT), floor)[0]

    def compiled(policy: Policy, *quarantined: str) -> tuple[Policy, dict[str, SwitchTables]]:
        state = LiveState(quarantined=dict.fromkeys(quarantined, 0.0))
        policy = effective_policy(policy, state, noon, hosts)
        return policy, {sw.switch: sw for sw in build(policy, floor, "", "ref").switches}

    plain = floor_policy
    cases: list[tuple[tuple[Policy, tuple[str, ...]], tuple[Policy, tuple[str, ...]], str]] = [
        ((plain, ()), (plain, ("algo1",)), "algo1"),  # a quarantine
        ((plain, ("algo1",)), (plain, ()), "algo1"),  # its release
        ((plain, ("algo1",)), (plain, ("algo1", "risk1")), "risk1"),  # another
        ((plain, ()), (plain, ("algo1", "risk1")), "algo1"),  # two at once
        ((plain, ()), (edited, ("risk1",)), "risk1"),  # and a rule changed
        ((plain, ()), (plain, ()), "algo1"),  # nothing changed
    ]  # the proven build, the new one (policy, quarantined hosts), the host
    shapes = set()
    for (old_policy, then), (new_policy, now), name in cases:
        p0, b0 = compiled(old_policy, *then)
        p1, b1 = compiled(new_policy, *now)
        host = floor.hosts_by_name[name]
        held = only_overlay_changed((p0, floor, b0), p1, floor, b1, host, QUARANTINE_MASK)
        kept = _recorded(p0, floor, b0)
        # as p4seg/proven.py loads it: a switch whose entries are the same is the new object
        same = {n: b1[n] if b1[n].entries == t.entries else t for n, t in kept.switches.items()}
        kept = dataclasses.replace(kept, switches=same)
        assert kept.overlay_change(p1, floor, b1, host, QUARANTINE_MASK) == held, (then, now)
        shapes.add(type(held))
    assert shapes == {str, OverlayChange}


def test_a_kept_build_that_is_not_what_the_record_says_proves_everything(
    floor: Inventory, floor_policy_text: str
) -> None:
    p0, b0 = _compile(floor_policy_text, floor)
    kept = _recorded(p0, floor, b0)
    p1, b1 = _compile(floor_policy_text.replace(*EDIT), floor)
    record = proof_record(p1, floor, b1)
    other_floor = dataclasses.replace(kept.record, inventory="another floor")
    for stale in (
        dataclasses.replace(kept, record=other_floor),
        dataclasses.replace(kept, sides={}),  # a changed rule's addresses unknown
    ):
        result = verify(p1, floor, b1, recorded=(stale, record))
        assert result.proven and result.pairs is None and result.scope is None
        algo1 = floor.hosts_by_name["algo1"]
        assert isinstance(stale.overlay_change(p1, floor, b1, algo1, QUARANTINE_MASK), str)


def test_entries_files_read_back_equal_to_what_the_build_wrote(
    floor: Inventory, floor_policy_text: str
) -> None:
    text = floor_policy_text
    assert " rate " in text  # metered entries too
    policy, switches = _compile(text, floor)
    files = build(policy, floor, text, "ref").files
    edited = build(_compile(text.replace(*EDIT), floor)[0], floor, text, "ref")
    for name, sw in switches.items():
        mine = files[f"entries/{name}.json"]
        back = load_entries(mine)
        assert (back.entries, back.defaults) == (sw.entries, sw.defaults), name
        [near] = [s for s in edited.switches if s.switch == name]
        again = load_entries_near(mine, near, edited.files[f"entries/{name}.json"])
        assert (again.entries, again.defaults) == (sw.entries, sw.defaults), name
        lent = {id(e) for e in near.entries}  # the lines both have: the edited build's objects
        assert sum(id(e) in lent for e in again.entries) >= len(sw.entries) - 8, name


_POOL = [TableEntry("policy", (), "permit", (("rule_id", i),), i, i, "allow") for i in range(1, 30)]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_changed_entries_are_those_one_build_has_and_the_other_not(data: st.DataObject) -> None:
    # An incremental compile hands unchanged entries on as the same objects, in place; the
    # changed ones are found by object in the middle, then by value (equal new objects).
    old = data.draw(st.lists(st.sampled_from(_POOL), unique=True, max_size=12))
    new = list(old)
    for _ in range(data.draw(st.integers(0, 4))):
        where = data.draw(st.integers(0, len(new)))
        kind = data.draw(st.sampled_from(["drop", "add", "copy"]))
        if kind == "drop" and where < len(new):
            del new[where]
        elif kind == "add":
            fresh = [e for e in _POOL if e not in new]
            if fresh:
                new.insert(where, data.draw(st.sampled_from(fresh)))
        elif kind == "copy" and where < len(new):  # an equal entry, another object
            new[where] = dataclasses.replace(new[where])
    a = SwitchTables("t", "tor", 1, tuple(old), ())
    b = SwitchTables("t", "tor", 1, tuple(new), ())
    found = changed_entries(a, b)
    assert found is not None and len(found) == len(set(found))
    assert set(found) == set(old) ^ set(new)
