"""Stable identities: what an edit changes on the switches, entry by entry (compiler/tags.py).

Each case compiles the trading floor, edits it, compiles again with the first compile's
allocation and compares every switch's entries as sets: the exact set that changes is
asserted, and every switch that hosts none of the affected hosts must not change at all.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler import lower as lower_module
from compiler.allocation import Allocation, AllocationError, SideTags, assign_rule_ids
from compiler.check import check_policy
from compiler.entries import SwitchTables, TableEntry
from compiler.inventory import Inventory
from compiler.lower import Lowered, lower, set_keys, settle_quarantine
from compiler.model import Policy
from compiler.quarantine import QUARANTINE_KEY
from compiler.tags import FIELD_VALUES, allocate_side
from compiler.verify import verify
from runtime.live import LiveState, effective_policy


def _policy(text: str, floor: Inventory) -> Policy:
    result = check_policy(text, "floor.zt", floor, expectations=False)
    assert result.policy is not None, [d.message for d in result.diagnostics]
    return result.policy


def _changes(before: Lowered, after: Lowered) -> dict[str, tuple[set[TableEntry], set[TableEntry]]]:
    """Per switch: (entries removed, entries added), only for switches that change."""
    old = {sw.switch: set(sw.entries) for sw in before.switches}
    out = {}
    for sw in after.switches:
        new = set(sw.entries)
        if new != old[sw.switch]:
            out[sw.switch] = (old[sw.switch] - new, new - old[sw.switch])
    return out


def _tables(entries: set[TableEntry]) -> set[str]:
    return {e.table for e in entries}


@pytest.fixture
def first(floor: Inventory, floor_policy: Policy) -> Lowered:
    return lower(floor_policy, floor)


def test_the_same_policy_and_allocation_compile_to_the_same_entries(
    floor: Inventory, floor_policy: Policy, first: Lowered
) -> None:
    again = lower(floor_policy, floor, first.allocation)
    assert again.switches == first.switches
    assert again.allocation == first.allocation
    # and through JSON, as the build and the state directory keep it
    reread = Allocation.from_json(first.allocation.to_json())
    assert lower(floor_policy, floor, reread).switches == first.switches


def test_changing_a_port_changes_only_that_rules_entries(
    floor: Inventory, floor_policy_text: str, first: Lowered
) -> None:
    text = floor_policy_text.replace("risk_db      tcp 5432", "risk_db      tcp 5433")
    edited = lower(_policy(text, floor), floor, first.allocation)
    changes = _changes(first, edited)
    rule_id = 4  # allow risk -> risk_db
    # risk1/risk2 and riskdb all live on tor-rsk: no other switch changes
    assert set(changes) == {"tor-rsk"}
    removed, added = changes["tor-rsk"]
    assert {e.rule_id for e in removed | added} == {rule_id}
    assert len(removed) == len(added) > 0
    ports = {(m.value, m.arg) for e in added for m in e.matches if "port" in m.field}
    assert (5433, 5433) in ports and (5432, 5432) not in ports


def test_adding_a_host_to_a_service_changes_its_identities_and_involves_its_rack(
    floor: Inventory, floor_policy_text: str, first: Lowered
) -> None:
    text = floor_policy_text.replace(
        "service books        = ledger ", "service books        = ledger, md1 "
    )
    assert text != floor_policy_text
    edited = lower(_policy(text, floor), floor, first.allocation)
    changes = _changes(first, edited)
    ip = {h.name: h.ip for h in floor.hosts}
    assert set(changes) == {"tor-md", "tor-stl"}
    # tor-stl judges settlement -> books already: only md1's identity entries change there
    removed, added = changes["tor-stl"]
    assert _tables(removed | added) <= {"src_identity", "dst_identity"}
    assert {_address(e) for e in removed | added} == {ip["md1"]}
    # tor-md now judges settlement -> books too (rule 7): its two entries (forward and the
    # TCP replies) appear, and md1 and the settlement hosts get the new tags there
    removed, added = changes["tor-md"]
    assert {(e.rule_id, e.role) for e in added if e.table == "policy"} == {
        (7, "forward"),
        (7, "reply"),
    }
    assert not [e for e in removed if e.table == "policy"]
    touched = {_address(e) for e in removed | added if e.table != "policy"}
    assert touched == {ip["md1"], ip["settle1"], ip["settle2"]}


def _address(entry: TableEntry) -> int:
    [addr] = [m for m in entry.matches if m.field in ("src_addr", "dst_addr")]
    assert addr.arg == 32, entry
    return addr.value


def test_a_quarantine_renumbers_nothing(floor: Inventory, floor_policy: Policy) -> None:
    hosts = {h.name: h.ip for h in floor.hosts}
    noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600  # inside every `during` window
    before = lower(effective_policy(floor_policy, LiveState(), noon, hosts), floor)
    state = LiveState(quarantined={"algo1": 0.0})
    after = lower(effective_policy(floor_policy, state, noon, hosts), floor, before.allocation)
    # No set changes: the quarantine is an overlay (compiler/lower.py), not a carve of the
    # rules, so every tag stays; algo1's quarantine value is recorded beside them.
    for key, side in before.allocation.tags.items():
        now = after.allocation.tags[key].tags
        assert {k: t for k, t in now.items() if not k.startswith("(quarantine)")} == side.tags
    algo1 = floor.hosts_by_name["algo1"]
    changes = _changes(before, after)
    # Only algo1's ToR changes: its two identity entries, and the overlay's policy entries.
    assert set(changes) == {algo1.switch}
    removed, added = changes[algo1.switch]
    assert {_address(e) for e in removed} == {algo1.ip}
    for entry in added:
        assert (
            entry.role == "quarantine" if entry.table == "policy" else _address(entry) == algo1.ip
        )


def test_a_quarantine_compiles_from_the_very_rules_the_policy_without_it_holds(
    floor: Inventory, floor_policy: Policy
) -> None:
    # The switches' ordinary entries come from the uncarved rules: the same objects as the
    # policy's without the quarantine, so the compile by difference finds no rule changed
    # (nothing keyed or digested again but the quarantined host's ToR's overlay).
    hosts = {h.name: h.ip for h in floor.hosts}
    noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
    plain = effective_policy(floor_policy, LiveState(), noon, hosts)
    carved = _algo1_quarantined(floor, floor_policy)
    assert carved.rules != plain.rules
    ordinary = carved.uncarved().rules
    assert len(ordinary) == len(plain.rules)
    assert all(a is b for a, b in zip(ordinary, plain.rules, strict=True))
    before = lower(plain, floor)
    after = lower(carved, floor, before.allocation, before)
    assert after.given is not None and before.given is not None
    keys = after.given.keys
    assert keys.base is before.given.keys.rules
    assert (keys.removed, keys.added) == ((), ())
    assert {sw.switch for sw in after.switches} - after.reused == {
        floor.hosts_by_name["algo1"].switch
    }


ALL = 0b1111  # every atom, in the small cases below


def test_a_removed_sets_tag_is_retired_until_settled() -> None:
    needs = {"a": (0b0011, 0b1111), "b": (0b0100, 0b1111), "c": (0b0001, 0b1111)}
    codes, tags = allocate_side({k: needs[k] for k in "ab"}, SideTags(), 4, ALL)
    assert codes.of_key["a"] == (0, 1) and codes.of_key["b"] == (0, 2)  # disjoint: one field
    # `a` goes away: its slot is retired, and a new set does not take it
    codes2, tags2 = allocate_side({"b": needs["b"], "c": needs["c"]}, tags, 4, ALL)
    assert codes2.of_key["b"] == (0, 2) and codes2.of_key["c"] == (0, 3)
    assert (0, 1) in tags2.retired
    # once no switch holds it any more, the slot is free again
    settled = Allocation(tags={("t", "src"): tags2}).settled().tags[("t", "src")]
    codes3, _ = allocate_side(
        {"b": needs["b"], "c": needs["c"], "d": (0b1000, 0b1111)}, settled, 4, ALL
    )
    assert codes3.of_key["d"] == (0, 1)


def test_overlapping_sets_take_different_fields_and_a_full_field_opens_another() -> None:
    universe = (1 << 40) - 1
    needs = {f"s{i:02}": (1 << i, universe) for i in range(FIELD_VALUES + 1)}
    needs["all_but_one"] = (universe & ~1, universe)  # overlaps every set but s00
    codes, _ = allocate_side(needs, SideTags(), 4, universe | 1 << 40)
    fields = {k: t for k, t in codes.of_key.items() if isinstance(t, tuple)}
    assert len(set(fields.values())) == len(fields)  # one slot each
    for a, ta in fields.items():
        for b, tb in fields.items():
            if a < b and ta[0] == tb[0]:
                assert not needs[a][0] & needs[b][0], (a, b)
    assert codes.fields >= 2  # 16 disjoint singletons do not fit 15 values


def test_sets_equal_on_their_universe_share_one_tag_and_only_any_needs_none() -> None:
    codes, tags = allocate_side(
        {
            "x": (0b0110, 0b0011),
            "y": (0b0010, 0b0011),
            "covers": (0b11, 0b11),  # all of its universe, not every address: a tag
            "any": (ALL, 0b11),
            "none": (0b100, 0b11),
        },
        SideTags(),
        4,
        ALL,
    )
    assert codes.of_key["x"] == codes.of_key["y"]
    assert isinstance(codes.of_key["covers"], tuple)
    assert codes.of_key["any"] is True and codes.of_key["none"] is False
    assert set(tags.tags) == {"x", "y", "covers"}


def test_a_bad_allocation_file_is_refused_with_its_location() -> None:
    with pytest.raises(AllocationError, match=r"alloc.json:1:2"):
        Allocation.from_json("{,", "alloc.json")
    with pytest.raises(AllocationError, match="not a p4seg allocation"):
        Allocation.from_json('{"format": "other"}', "alloc.json")
    with pytest.raises(AllocationError):
        Allocation.from_json(
            '{"format": "p4seg-allocation/1", "tags": {"t/src": {"tags": {"a": [0, 99]}}}}'
        )


def _switch(lowered: Lowered, name: str) -> SwitchTables:
    return next(sw for sw in lowered.switches if sw.switch == name)


def test_spines_never_hold_identities(first: Lowered) -> None:
    spine = _switch(first, "spine1")
    assert all(dict(e.params).get("tags", 0) == 0 for e in spine.table("src_identity"))
    assert spine.table("dst_identity") == []


def _algo1_quarantined(floor: Inventory, policy: Policy) -> Policy:
    """The effective policy with algo1 quarantined, at noon (no `during` window matters)."""
    hosts = {h.name: h.ip for h in floor.hosts}
    noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
    return effective_policy(policy, LiveState(quarantined={"algo1": 0.0}), noon, hosts)


def test_a_text_that_stands_for_several_sets_gets_one_key_per_set(
    floor: Inventory, floor_policy: Policy
) -> None:
    # A quarantine keeps `prod` on the denies and carves algo1 out of the allows' `prod`,
    # and adds `remediation` rules with pieces of sets: the tables must still be right.
    quarantined = _algo1_quarantined(floor, floor_policy)
    keys = set_keys(quarantined)
    texts = {r.id: (r.src_text, r.dst_text) for r in quarantined.rules}
    by_text: dict[str, set[str]] = {}
    for (rule_id, side), key in keys.items():
        by_text.setdefault(texts[rule_id][side == "dst"], set()).add(key)
    assert by_text["prod"] == {"prod", next(k for k in by_text["prod"] if k != "prod")}
    switches = {sw.switch: sw for sw in lower(quarantined, floor).switches}
    assert verify(quarantined, floor, switches).proven


def test_keys_found_by_difference_are_the_keys_found_in_full(
    floor: Inventory, floor_policy: Policy
) -> None:
    # The carved rules of a quarantine make `prod` stand for two sets: going there, and
    # back, by difference from the last keys must give what the whole policy gives.
    carved = _algo1_quarantined(floor, floor_policy)
    plain = floor_policy.rules
    mixed = plain + tuple(r for r in carved.rules if r not in plain)[:3]  # a few carved rules
    edited = plain[:-1]  # one rule fewer, nothing carved
    # a rule naming `prod` gone while `prod` stands for the same two sets: by difference
    copied = {r.id for r in mixed[len(plain) :]}  # (the carved copies keep their rules' ids)
    prod_rule = next(
        i for i, r in enumerate(mixed) if "prod" in (r.src_text, r.dst_text) and r.id not in copied
    )
    fewer = mixed[:prod_rule] + mixed[prod_rule + 1 :]
    pairs = ((plain, mixed), (mixed, plain), (plain, edited), (edited, plain), (mixed, fewer),
             (fewer, mixed))  # fmt: skip
    for before, after in pairs:
        found = lower_module._keys(after, lower_module._keys(before))
        assert found.of == lower_module._keys_in_full(after).of
        assert found.sets == lower_module._keys_in_full(after).sets
    assert lower_module._keys(edited, lower_module._keys(plain)).base is plain  # by difference
    assert lower_module._keys(fewer, lower_module._keys(mixed)).base is mixed
    assert len({k for k in lower_module._keys(mixed).of.values() if k.startswith("prod")}) == 2


def test_a_shared_tag_stays_with_the_set_it_stood_for() -> None:
    everything = 0b11111
    # `svc` and `whole` are equal on this universe: one tag. Then `svc` loses an atom.
    first, tags = allocate_side(
        {"svc": (0b0110, 0b1111), "whole": (0b0110, 0b1111)}, SideTags(), 4, everything, bin
    )
    assert first.of_key["svc"] == first.of_key["whole"] and tags.shared
    # whichever key sorts first, the set that did not change keeps the tag
    for changed, same in (("svc", "whole"), ("whole", "svc")):
        needs = {changed: (0b0010, 0b1111), same: (0b0110, 0b1111)}
        codes, _ = allocate_side(needs, tags, 4, everything, bin)
        assert codes.of_key[same] == first.of_key[same]
        assert codes.of_key[changed] != first.of_key[same]
    # and the allocation file keeps what the tag stood for
    again = Allocation.from_json(Allocation(tags={("t", "src"): tags}).to_json())
    assert again.tags[("t", "src")] == tags


def test_a_rule_that_cuts_another_racks_prefix_changes_nothing_there(
    floor: Inventory, floor_policy_text: str, first: Lowered
) -> None:
    # 10.8.200.0/24 lies inside `dev` (10.8.0.0/16), which every ToR tags for `prod -> dev`:
    # the new cut must not split their dst_identity entries for dev.
    text = floor_policy_text.replace(
        "default deny log", "allow dev1 -> 10.8.200.0/24 tcp 443\ndefault deny log"
    )
    edited = lower(_policy(text, floor), floor, first.allocation)
    changes = _changes(first, edited)
    assert set(changes) == {"tor-dev"}


# -- incremental compile -----------------------------------------------------------------

EDITS = (
    ("risk_db      tcp 5432", "risk_db      tcp 5433"),  # a port
    ("service books        = ledger ", "service books        = ledger, md1 "),  # a member
    ("default deny log", "allow dev1 -> 10.8.200.0/24 tcp 443\ndefault deny log"),  # a rule
    ("allow settlement   -> books        tcp 5432\n", ""),  # a rule removed
    ("default deny log", "allow algo -> risk udp 9000 reply\ndefault deny log"),  # another
    ("udp 30001-30010", "udp 30001-30020"),  # a range
    ("deny dev  -> prod log", "deny dev  -> prod"),  # a deny without log
    # sets tor-rsk tags already, the source now on a wider universe (every host)
    ("default deny log", "allow prod -> risk udp 1\ndefault deny log"),
    # and a destination on a wider universe (every address)
    ("default deny log", "allow risk -> prod udp 1\ndefault deny log"),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(range(len(EDITS))), min_size=1, max_size=5))
def test_incremental_compile_gives_exactly_what_a_full_compile_gives(
    floor: Inventory, floor_policy_text: str, steps: list[int]
) -> None:
    text = floor_policy_text
    policy, allocation = assign_rule_ids(_policy(text, floor), Allocation())
    previous = lower(policy, floor, allocation)
    allocation = previous.allocation
    for step in steps:
        text = text.replace(*EDITS[step])
        policy, allocation = assign_rule_ids(_policy(text, floor), allocation)
        full = lower(policy, floor, allocation)
        incremental = lower(policy, floor, allocation, previous)
        assert incremental.switches == full.switches
        assert incremental.allocation == full.allocation
        assert incremental.tag_fields == full.tag_fields
        _same_inputs(incremental, full)
        previous, allocation = incremental, incremental.allocation


def test_an_edit_on_one_rack_reuses_every_other_switch(
    floor: Inventory, floor_policy_text: str, first: Lowered
) -> None:
    text = floor_policy_text.replace("risk_db      tcp 5432", "risk_db      tcp 5433")
    again = lower(_policy(text, floor), floor, first.allocation, first)
    assert {sw.switch for sw in again.switches} - again.reused == {"tor-rsk"}
    untouched = lower(_policy(floor_policy_text, floor), floor, first.allocation, first)
    assert untouched.reused == {sw.switch for sw in first.switches}


def test_a_port_edit_makes_only_the_policy_entries_of_its_tor_again(
    floor: Inventory, floor_policy_text: str, first: Lowered
) -> None:
    # tor-rsk tags the same sets on the same universes: its tags and identity entries are
    # kept as they were (the same objects), with neither the semantics nor the allocator.
    text = floor_policy_text.replace("risk_db      tcp 5432", "risk_db      tcp 5433")
    policy = _policy(text, floor)
    again = lower(policy, floor, first.allocation, first)
    assert again.retagged == {"tor-rsk"}
    old, new = _switch(first, "tor-rsk"), _switch(again, "tor-rsk")
    identity = ("src_identity", "dst_identity")
    assert [id(e) for e in new.entries if e.table in identity] == [
        id(e) for e in old.entries if e.table in identity
    ]
    assert new == _switch(lower(policy, floor, first.allocation), "tor-rsk")
    # A member added to a service changes what its ToRs tag: those are compiled in full.
    member = floor_policy_text.replace(
        "service books        = ledger ", "service books        = ledger, md1 "
    )
    moved = lower(_policy(member, floor), floor, first.allocation, first)
    assert {"tor-md", "tor-stl"} <= {sw.switch for sw in moved.switches} - moved.reused
    assert not moved.retagged
    # A rule between sets tor-rsk tags already, but `prod` as a source now on every host
    # (its destination is here), not only on this rack's; then `prod` as a destination on
    # every address, not only on this rack's hosts: compiled in full there.
    for rule in ("allow prod -> risk udp 1", "allow risk -> prod udp 1"):
        wider = floor_policy_text.replace("default deny log", f"{rule}\ndefault deny log")
        policy = _policy(wider, floor)
        widened = lower(policy, floor, first.allocation, first)
        assert "tor-rsk" not in widened.retagged | widened.reused
        assert widened.switches == lower(policy, floor, first.allocation).switches


def test_a_named_rule_edited_in_place_compiles_incrementally_as_in_full(
    floor: Inventory, floor_policy_text: str
) -> None:
    # A named rule keeps its id through an edit: its ToRs keep their tags, and what its
    # entries are made from (log, action, ports, rate, its sets) must not be taken from
    # before.
    named = floor_policy_text.replace("deny dev  -> prod log", "deny dev  -> prod log name dev_out")
    rated = "allow order_router -> risk         tcp 8443        rate 20000pps"
    named = named.replace(rated, f"{rated} name to_risk")
    steps = (
        ("deny dev  -> prod log name", "deny dev  -> prod name"),  # log
        ("deny dev  -> prod name", "allow dev  -> prod name"),  # action
        ("risk         tcp 8443", "risk         tcp 8444"),  # port
        ("rate 20000pps name", "rate 10000pps name"),  # rate (the only one: the same rank)
        # a higher rate on another rule of tor-rsk: the kept rule's rank moves, its parts too
        ("risk_db      tcp 5432", "risk_db      tcp 5432 rate 50000pps"),
        ("order_router -> risk  ", "order_router -> risk_db"),  # a set its ToRs tag already
    )
    chain, text = [(named, LiveState())], named
    for old, new in steps:
        assert old in text
        text = text.replace(old, new)
        chain.append((text, LiveState()))
    compiled = _chain(floor, chain)
    # every step keeps the tags of some ToR (the rule's ToRs, or those of its sets)
    assert all(step.retagged for step in compiled[1:])


@pytest.mark.parametrize("few", [0, 8])
def test_rules_given_new_objects_are_found_again_by_value_and_their_sets(
    floor: Inventory, floor_policy_text: str, few: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rule inserted above the others gives each of them a new object: a ToR whose tags are
    # kept finds their entries again by value (compiler/lower.py `_policy_entries`: past a
    # few new objects; 0 here looks every one up so), and a named rule whose destination
    # became another set its ToR tags already, in the same edit, must not be taken for
    # what it was.
    monkeypatch.setattr(lower_module, "_FEW_NEW", few)
    rated = "allow order_router -> risk         tcp 8443        rate 20000pps"
    named = floor_policy_text.replace(rated, f"{rated} name to_risk")
    first_rule = "allow market_data  -> algo         udp 30001-30010"
    edited = named.replace("order_router -> risk  ", "order_router -> risk_db")
    edited = edited.replace(first_rule, f"allow dev1 -> dev2 udp 9\n{first_rule}")
    assert edited.count("risk_db") == named.count("risk_db") + 1
    compiled = _chain(floor, [(named, LiveState()), (edited, LiveState())])
    assert "tor-rsk" in compiled[1].retagged


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("edit"), st.sampled_from(range(len(EDITS)))),
            st.tuples(st.just("cut"), st.sampled_from(("algo1", "algo2", "md1", "risk2"))),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_edits_and_quarantines_in_any_order_compile_incrementally_as_in_full(
    floor: Inventory, floor_policy_text: str, steps: list[tuple[str, object]]
) -> None:
    """Rule edits (some keep a ToR's tag needs: only its `policy` entries are made again)
    and quarantines toggled in between, with a `remediation` service whose rules the
    overlays keep: each step's incremental compile equals the full one."""
    text = floor_policy_text.replace(
        "default deny log",
        "service remediation = jump1\nallow prod -> remediation tcp 443\ndefault deny log",
    )
    quarantined: dict[str, float] = {}
    chain = [(text, LiveState())]
    for kind, what in steps:
        if kind == "edit":
            assert isinstance(what, int)
            text = text.replace(*EDITS[what])
        elif quarantined.pop(str(what), None) is None:
            quarantined[str(what)] = 0.0
        chain.append((text, LiveState(quarantined=dict(quarantined))))
    _chain(floor, chain)


def test_incremental_compile_of_a_quarantine_and_its_release(
    floor: Inventory, floor_policy: Policy
) -> None:
    hosts = {h.name: h.ip for h in floor.hosts}
    noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
    states = (LiveState(), LiveState(quarantined={"algo1": 0.0}), LiveState())
    previous = None
    allocation = Allocation()
    for state in states:
        policy = effective_policy(floor_policy, state, noon, hosts)
        full = lower(policy, floor, allocation)
        incremental = lower(policy, floor, allocation, previous)
        assert incremental.switches == full.switches
        assert incremental.allocation == full.allocation
        if previous is not None:  # only algo1's ToR is compiled again, from how it was made
            assert {sw.switch for sw in full.switches} - incremental.reused == {"tor-alg"}
            assert incremental.requarantined == {"tor-alg"}
        previous, allocation = incremental, incremental.allocation


QUARANTINABLE = ("algo1", "algo2", "algo3", "md1", "settle1", "dev1", "risk2")


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(QUARANTINABLE), st.booleans(), st.booleans()),
        min_size=1,
        max_size=8,
    ),
    st.booleans(),
)
def test_quarantines_and_releases_made_from_how_a_tor_was_made_equal_a_full_compile(
    floor: Inventory, floor_policy_text: str, steps: list[tuple[str, bool, bool]], cure: bool
) -> None:
    """Hosts quarantined and released in any order (with a `remediation` service or not),
    the allocation settled on a ToR now and then (its switch took the build): the ToRs
    whose quarantined hosts alone changed are made again from how they were made, and give
    exactly what a full compile of the same inputs gives, tags and allocation included."""
    text = floor_policy_text
    if cure:
        text = text.replace(
            "default deny log",
            "service remediation = jump1\nallow prod -> remediation tcp 443\ndefault deny log",
        )
    ordinary = _policy(text, floor)
    hosts = {h.name: h.ip for h in floor.hosts}
    rack = {h.name: h.switch for h in floor.hosts}
    noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
    quarantined: dict[str, float] = {}
    previous = lower(effective_policy(ordinary, LiveState(), noon, hosts), floor)
    allocation = previous.allocation
    settled: set[str] = set()  # a settled allocation differs: the ToR is made again
    for host, cut, settle in steps:
        if cut:
            quarantined[host] = 0.0
        else:
            quarantined.pop(host, None)
        policy = effective_policy(ordinary, LiveState(quarantined=dict(quarantined)), noon, hosts)
        full = lower(policy, floor, allocation)
        incremental = lower(policy, floor, allocation, previous)
        assert incremental.switches == full.switches
        assert incremental.allocation == full.allocation
        assert incremental.tag_fields == full.tag_fields
        _same_inputs(incremental, full)
        changed = {sw.switch for sw in full.switches} - incremental.reused
        assert changed <= {rack[host]} | settled
        assert incremental.requarantined == changed
        previous, allocation = incremental, incremental.allocation
        settled = set()
        if settle:
            allocation = settle_quarantine(allocation, rack[host])
            settled = {rack[host]} if allocation != previous.allocation else set()


def _chain(floor: Inventory, steps: list[tuple[str, LiveState]]) -> list[Lowered]:
    """Compile each (policy text, live state) in turn, incrementally and in full from the
    same allocation: the two must agree at every step, allocation included. The
    incremental compiles, in turn."""
    hosts = {h.name: h.ip for h in floor.hosts}
    noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
    previous: Lowered | None = None
    allocation = Allocation()
    out = []
    for text, state in steps:
        policy = effective_policy(_policy(text, floor), state, noon, hosts)
        policy, allocation = assign_rule_ids(policy, allocation)
        full = lower(policy, floor, allocation)
        incremental = lower(policy, floor, allocation, previous)
        assert incremental.switches == full.switches
        assert incremental.allocation == full.allocation
        _same_inputs(incremental, full)
        previous, allocation = incremental, incremental.allocation
        out.append(incremental)
    return out


def _same_inputs(incremental: Lowered, full: Lowered) -> None:
    """The switches' inputs found by difference from the last compile are those found in
    full: every digest, and each ToR's rules in the policy's order."""
    assert incremental.inputs == full.inputs
    a, b = incremental.given, full.given
    assert a is not None and b is not None
    assert (a.ordinary, a.mine, a.floor, a.logging) == (b.ordinary, b.mine, b.floor, b.logging)
    assert {t: [(id(r), s, d) for r, s, d in x] for t, x in a.touching.items()} == {
        t: [(id(r), s, d) for r, s, d in x] for t, x in b.touching.items()
    }
    assert a.keys.of == b.keys.of
    for tor in a.needed:  # the ToRs' tag needs counted by difference, and in full
        assert a.needs_of(tor) == b.needs_of(tor)


def test_incremental_sees_a_logged_rule_elsewhere_change_a_quarantine_overlays_log(
    floor: Inventory, floor_policy_text: str
) -> None:
    # No rule logs, then one does (on tor-dev): the overlay's catch-all on tor-alg logs now.
    quiet = floor_policy_text.replace(" log\n", "\n").replace(
        "default deny log", "service remediation = jump1\ndefault deny"
    )
    loud = quiet.replace("default deny", "deny dev1 -> dev2 tcp 80 log\ndefault deny")
    algo1 = LiveState(quarantined={"algo1": 0.0})
    _chain(floor, [(quiet, algo1), (loud, algo1)])


def test_a_released_hosts_quarantine_value_stays_retired_until_settled(
    floor: Inventory, floor_policy_text: str
) -> None:
    # tor-alg may still hold entries of algo1's quarantine value after the release: the
    # value is retired (never given to another host) until the allocation settles, and a
    # later compile with nothing quarantined keeps it so.
    text = floor_policy_text.replace(
        "default deny log", "service remediation = jump1\ndefault deny log"
    )
    held = LiveState(quarantined={"algo1": 0.0})
    steps = [(text, held), (text, LiveState()), (text.replace("tcp 5432", "tcp 5433"), LiveState())]
    quarantined, released, edited = _chain(floor, steps)
    side = quarantined.allocation.tags[("tor-alg", "src")]
    [value] = [t for k, t in side.tags.items() if k.startswith(QUARANTINE_KEY)]
    for later in (released, edited):
        after = later.allocation.tags[("tor-alg", "src")]
        assert value in after.retired
        assert not any(k.startswith(QUARANTINE_KEY) for k in after.tags)


def test_incremental_keeps_shared_tags_whatever_another_rack_cuts(
    floor: Inventory, floor_policy_text: str
) -> None:
    # Two texts equal on tor-alg share a tag; a rule on tor-dev cuts inside that prefix;
    # then one of the two sets shrinks: the tag must stay with the same one either way.
    two = floor_policy_text.replace(
        "default deny log",
        "allow algo -> market_data tcp 1\nallow algo -> 10.0.1.0/24 tcp 2\ndefault deny log",
    )
    cut = two.replace("default deny log", "deny dev1 -> 10.0.1.200 tcp 1\ndefault deny log")
    narrower = cut.replace(
        "service market_data  = 10.0.1.0/24", "service market_data  = 10.0.1.0/25"
    )
    assert narrower != cut
    _chain(floor, [(two, LiveState()), (cut, LiveState()), (narrower, LiveState())])


def test_an_allocation_with_odd_quarantine_slots_is_not_trusted(
    floor: Inventory, floor_policy: Policy
) -> None:
    hosts = {h.name: h.ip for h in floor.hosts}
    noon = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
    state = LiveState(quarantined={"algo1": 0.0, "algo2": 0.0})
    policy = effective_policy(floor_policy, state, noon, hosts)
    good = lower(policy, floor).allocation
    side = good.tags[("tor-alg", "src")]
    quarantine = [k for k in side.tags if k.startswith("(quarantine) ")]
    assert len(quarantine) == 2
    # both hosts claim one value, and a key that is no address: neither may be believed
    (_first, value), (second, _) = ((k, side.tags[k]) for k in sorted(quarantine))
    odd = {**side.tags, second: value, "(quarantine) not-an-address": value}
    bad = Allocation(
        good.rules, good.retired_rules, {**good.tags, ("tor-alg", "src"): SideTags(odd)}
    )
    again = lower(policy, floor, bad)
    held = again.allocation.tags[("tor-alg", "src")].tags
    values = [held[k] for k in quarantine]
    assert len(set(values)) == 2  # two hosts, two values
    switches = {sw.switch: sw for sw in again.switches}
    assert verify(policy, floor, switches).proven


def test_a_rule_on_every_tor_of_a_wide_floor_keeps_every_tors_tags() -> None:
    # More ToRs than the memo of how each was made keeps spare (compiler/lower.py `_MADE`):
    # the version each replaces must go, not the records of the ToRs still to be compiled.
    from bench.gen_policy import generate
    from compiler.inventory import parse_inventory

    generated = generate(rules=60, services=24, hosts=160, tors=20, spines=2)
    floor = parse_inventory(generated.inventory, "wide.yaml")
    text = generated.policy.replace("default deny", "deny any -> any tcp 23\ndefault deny")
    last = lower(_policy(text, floor), floor)
    tors = {sw.switch for sw in last.switches if sw.role == "tor"}
    assert len(tors) == 20
    steps = []
    for port in (24, 25, 23):  # edit after edit, each from the compile before it
        policy = _policy(text.replace("any tcp 23\n", f"any tcp {port}\n"), floor)
        allocation = last.allocation
        last = lower(policy, floor, allocation, last)
        assert last.retagged == tors
        steps.append((policy, allocation, last))
    for policy, allocation, made in steps:  # (full compiles fill the memo: after the chain)
        assert made.switches == lower(policy, floor, allocation).switches
