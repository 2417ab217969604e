"""The proof by rules (compiler/rule_proof.py) against the proof by pairs.

The proof by rules only decides what its sufficient conditions cover and leaves the rest
to the exact proof by pairs; so whatever the tables, a full `verify` must report exactly
the counterexamples the proof by pairs alone reports. These tests corrupt builds in many
ways (the shared corruptions, and corruptions aimed at each condition: tag matches, the
rule an entry names, its band, its meter, identity vectors) and compare the two, and check
that a sound build is proven rule by rule with nothing left to the pairs."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Collection

import pytest
from corrupt import corruptions
from hypothesis import given, settings
from test_lower import SMALL, small_policies

from bench.gen_policy import generate
from compiler import rule_proof
from compiler.check import check_policy
from compiler.emit import Build, build
from compiler.entries import FieldMatch, SwitchTables, TableEntry, meter_for_rate
from compiler.inventory import Inventory, parse_inventory
from compiler.model import Policy
from compiler.verify import Verifier, VerifyResult, keep_proofs_by_rules, verify
from runtime.live import LiveState, effective_policy

NOON = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
Switches = dict[str, SwitchTables]


def _found(result: VerifyResult) -> set[str]:
    return {c.describe() for c in result.counterexamples}


def _switches(policy: Policy, inventory: Inventory, text: str, target: str = "ref") -> Switches:
    return {s.switch: s for s in build(policy, inventory, text, target).switches}


def _tors(inventory: Inventory) -> int:
    return sum(1 for s in inventory.switches if s.role == "tor")


def _agree(policy: Policy, inventory: Inventory, switches: Switches) -> VerifyResult:
    """The full proof, after asserting it finds what the proof by pairs finds."""
    by_rules = verify(policy, inventory, switches)
    exact = verify(policy, inventory, switches, exact=True)
    assert _found(by_rules) == _found(exact), (
        by_rules.by_rules.reasons if by_rules.by_rules else None
    )
    return by_rules


@pytest.mark.parametrize("target", ["ref", "bmv2", "tofino"])
def test_the_floor_is_proven_rule_by_rule(
    target: str, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    switches = _switches(floor_policy, floor, floor_policy_text, target)
    result = _agree(floor_policy, floor, switches)
    assert result.proven and result.by_rules is not None
    assert result.by_rules.tors == _tors(floor) and result.by_rules.left is None
    assert result.by_rules.checks > 0 and result.classes == 0  # no pair walked
    assert result.spoof_classes > 100  # spoofing is still proven, port by port


# -- corruptions ----------------------------------------------------------------------------


def _aimed(switches: Switches, seed: int, count: int) -> list[Switches]:
    """Builds with one `policy` or identity entry corrupted where the proof by rules looks:
    a tag match moved to another slot, the rule an entry names or its band changed, its
    meter changed, an identity vector's field changed, a copy with the other outcome."""
    rng = random.Random(seed)
    names = sorted(n for n, s in switches.items() if s.role == "tor")
    out: list[Switches] = []
    while len(out) < count:
        name = rng.choice(names)
        sw = switches[name]
        i = rng.randrange(len(sw.entries))
        e = sw.entries[i]
        kind = rng.choice(
            ("tags", "rule", "band", "order", "meter", "vector", "copy", "header", "header",
             "delete", "stranger", "route")
        )  # fmt: skip
        new: tuple[TableEntry, ...]
        if kind == "tags" and e.table == "policy":
            tags = [m for m in e.matches if m.field in ("src_tags", "dst_tags")]
            if not tags:
                continue
            m = rng.choice(tags)
            shift = rng.choice(_fields(m.arg))
            moved = FieldMatch(m.field, m.kind, m.value ^ (rng.randrange(1, 16) << shift), m.arg)
            new = (
                dataclasses.replace(e, matches=tuple(moved if x is m else x for x in e.matches)),
            )
        elif kind == "rule" and e.table == "policy":
            ids = sorted(
                {dict(x.params).get("rule_id", 0) for x in sw.entries if x.table == "policy"}
            )
            new = (dataclasses.replace(e, params=(("rule_id", rng.choice(ids)),)),)
        elif kind == "band" and e.table == "policy":
            band = rng.choice([b for b in range(8) if b != e.priority >> 28])
            new = (dataclasses.replace(e, priority=band << 28 | (e.priority & ((1 << 28) - 1))),)
        elif kind == "delete" and e.table == "policy":
            new = ()
        elif kind == "route" and e.table == "routing":  # another port, or no route
            ports = sorted({dict(x.params)["port"] for x in sw.entries if x.table == "routing"})
            others = [p for p in ports if p != dict(e.params).get("port")]
            new = (
                (dataclasses.replace(e, params=(("port", rng.choice(others)),)),) if others else ()
            )
        elif kind == "stranger" and e.table == "policy":  # a copy naming another rack's rule
            here = {x.params for x in sw.entries if x.table == "policy"}
            strangers = sorted({
                (x.params, x.action) for o in names if o != name for x in switches[o].entries
                if x.table == "policy" and x.action in ("permit", "deny") and x.params not in here
            })  # fmt: skip
            if not strangers:
                continue
            params, action = rng.choice(strangers)
            forward = e.priority >> 28 >= 4  # in the band of its direction and action
            band = (6 if action == "deny" else 4) if forward else (2 if action == "deny" else 1)
            low = e.priority & ((1 << 28) - 1)
            copy = dataclasses.replace(e, params=params, action=action, meter=None,
                                       priority=band << 28 | low)  # fmt: skip
            new = (e, copy)
        elif kind == "order" and e.table == "policy" and e.priority >> 28:
            band = e.priority >> 28  # to the other end of its direction's bands
            band = {7: 4, 6: 4, 5: 7, 4: 7, 3: 1, 2: 1, 1: 3}[band]
            new = (dataclasses.replace(e, priority=band << 28 | (e.priority & ((1 << 28) - 1))),)
        elif kind == "header" and e.table == "policy":
            new = (dataclasses.replace(e, matches=_other_header(e.matches, rng)),)
        elif kind == "meter" and e.action in ("permit", "permit_metered"):
            meter = rng.choice([None, meter_for_rate(100), meter_for_rate(2000)])
            action = "permit" if meter is None and rng.random() < 0.5 else "permit_metered"
            new = (dataclasses.replace(e, action=action, meter=meter),)
        elif kind == "vector" and e.table in ("src_identity", "dst_identity"):
            vector = dict(e.params).get("tags")
            if vector is None:
                continue
            shift = rng.choice(_fields(vector) or [rng.randrange(64) * 4])
            flipped = vector ^ rng.randrange(1, 16) << shift
            new = (dataclasses.replace(e, params=(("tags", flipped),)),)
        elif kind == "copy" and e.table == "policy":
            other = "deny" if e.action in ("permit", "permit_metered") else "permit"
            copy = dataclasses.replace(e, action=other, meter=None,
                                       priority=e.priority + rng.choice([1, -1]))  # fmt: skip
            new = (e, copy)
        else:
            continue
        entries = sw.entries[:i] + new + sw.entries[i + 1 :]
        out.append({**switches, name: dataclasses.replace(sw, entries=entries)})
    return out


def _other_header(matches: tuple[FieldMatch, ...], rng: random.Random) -> tuple[FieldMatch, ...]:
    """The matches with one protocol, port or flags match changed, dropped or added."""
    header = [
        m for m in matches if m.field in ("protocol", "l4_src_port", "l4_dst_port", "tcp_flags")
    ]
    rest = tuple(m for m in matches if m not in header)
    choice = rng.randrange(4)
    if choice == 0 and header:  # one dropped: the entry covers more
        header.remove(rng.choice(header))
    elif choice == 1:
        header.append(rng.choice([
            FieldMatch("protocol", "ternary", rng.choice([1, 6, 17, 132]), 0xFF),
            FieldMatch("l4_dst_port", "range", 80, 80 + rng.randrange(2)),
            FieldMatch("l4_src_port", "range", 1024, 65535),
            FieldMatch("tcp_flags", "ternary", 0x10, 0x10),
        ]))  # fmt: skip
    elif header:  # one moved by a little
        m = rng.choice(header)
        if m.kind == "range":
            moved = FieldMatch(m.field, "range", max(0, m.value + rng.choice([-1, 1])), m.arg)
        else:
            moved = FieldMatch(m.field, m.kind, m.value ^ rng.choice([1, 2, 0x10]), m.arg)
        header[header.index(m)] = moved
    return rest + tuple(header)


def _fields(vector: int) -> list[int]:
    """The shifts of the 4-bit fields where `vector` is not 0."""
    return [f * 4 for f in range(64) if vector >> f * 4 & 0xF]


@pytest.mark.parametrize(
    ("target", "shared", "aimed", "least"), [("ref", 40, 80, 25), ("tofino", 8, 16, 2)]
)
def test_every_corruption_is_reported_as_the_proof_by_pairs_reports_it(
    target: str,
    shared: int,
    aimed: int,
    least: int,
    floor: Inventory,
    floor_policy: Policy,
    floor_policy_text: str,
) -> None:
    """(Tofino's port ranges are ternary entries: its proof by pairs is slow, fewer.)"""
    switches = _switches(floor_policy, floor, floor_policy_text, target)
    broken = corruptions(switches, seed=7, count=shared) + _aimed(switches, 11, aimed)
    caught = left = 0
    for corrupted in broken:
        result = _agree(floor_policy, floor, corrupted)
        caught += not result.proven
        assert result.by_rules is not None
        left += result.by_rules.left is not None
    assert caught >= least and left >= caught  # many matter; each was left to the pairs


def test_a_generated_floor_is_proven_rule_by_rule_and_its_corruptions_caught() -> None:
    floor = generate(rules=120, services=30, hosts=48, tors=6, spines=2, seed=3)
    inventory = parse_inventory(floor.inventory, "inventory.yaml")
    policy = check_policy(floor.policy, "policy.zt", inventory, expectations=False).policy
    assert policy is not None
    switches = _switches(policy, inventory, floor.policy)
    result = _agree(policy, inventory, switches)
    assert result.proven and result.by_rules is not None
    assert result.by_rules.tors == 6 and result.by_rules.left is None
    caught = 0
    for corrupted in corruptions(switches, seed=5, count=10) + _aimed(switches, 9, 20):
        caught += not _agree(policy, inventory, corrupted).proven
    assert caught >= 6


@settings(max_examples=25, deadline=None)
@given(small_policies())
def test_random_policies_are_proven_rule_by_rule(text: str) -> None:
    policy = check_policy(text, "random.zt", SMALL, expectations=False).policy
    assert policy is not None
    switches = _switches(policy, SMALL, text)
    result = _agree(policy, SMALL, switches)
    assert result.proven and result.by_rules is not None
    assert result.by_rules.left is None, result.by_rules.reasons
    for corrupted in _aimed(switches, seed=len(text), count=4):
        _agree(policy, SMALL, corrupted)


# -- what the proof by rules leaves to the pairs ----------------------------------------------


def test_a_quarantined_hosts_pairs_are_left_to_the_pairs(
    floor: Inventory, floor_policy: Policy
) -> None:
    hosts = {h.name: h.ip for h in floor.hosts}
    state = LiveState(quarantined={"algo1": 0.0})
    policy = effective_policy(floor_policy, state, NOON, hosts)
    switches = {s.switch: s for s in build(policy, floor, "", "ref").switches}
    result = _agree(policy, floor, switches)
    assert result.proven and result.by_rules is not None
    assert result.by_rules.tors == _tors(floor)  # every ToR proven for the other hosts
    left = result.by_rules.left
    assert left is not None and hosts["algo1"] in left.masks
    others = {ip for ip, mask in left.masks.items() if ip != hosts["algo1"]}
    assert others and all(left.masks[ip].bit_count() == 1 for ip in others)  # to algo1 only
    for corrupted in _aimed(switches, seed=3, count=20):
        _agree(policy, floor, corrupted)


def test_a_spine_down_is_proven_rule_by_rule(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    spine = next(s.name for s in floor.switches if s.role == "spine")
    gone = floor.with_down([spine])
    switches = _switches(floor_policy, gone, floor_policy_text)
    result = _agree(floor_policy, gone, switches)
    assert result.proven and result.by_rules is not None and result.by_rules.left is None
    # the tables of both spines up, with one down: routes into the dead spine lose packets
    stale = _switches(floor_policy, floor, floor_policy_text)
    result = _agree(floor_policy, gone, {n: s for n, s in stale.items() if n != spine})
    assert result.by_rules is not None


def test_a_route_to_the_wrong_host_is_left_to_the_pairs(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    switches = _switches(floor_policy, floor, floor_policy_text)
    a, b = floor.hosts[0], next(h for h in floor.hosts[1:] if h.switch == floor.hosts[0].switch)
    sw = switches[a.switch]
    entries = tuple(
        dataclasses.replace(e, params=(("port", b.port),))
        if e.table == "routing" and e.matches[-1].value == a.ip
        else e
        for e in sw.entries
    )
    result = _agree(
        floor_policy, floor, {**switches, a.switch: dataclasses.replace(sw, entries=entries)}
    )
    assert not result.proven and result.by_rules is not None
    assert any("routed other than to their host" in r for r in result.by_rules.reasons)
    assert {c.kind for c in result.counterexamples} == {"wrong-destination"}


def test_a_deny_moved_below_the_allow_it_overrides_is_left_to_the_pairs() -> None:
    text = "policy overlap\nallow a1, a2 -> b1, b2 tcp\ndeny a1 -> b1 tcp 22\n"
    policy = check_policy(text, "overlap.zt", SMALL, expectations=False).policy
    assert policy is not None
    switches = _switches(policy, SMALL, text)
    assert _agree(policy, SMALL, switches).proven

    def demoted(sw: SwitchTables) -> SwitchTables:  # the deny's entries into the allow band
        return dataclasses.replace(sw, entries=tuple(
            dataclasses.replace(e, priority=e.priority - (2 << 28))
            if e.table == "policy" and e.action == "deny" and e.priority >> 28 == 6
            else e
            for e in sw.entries
        ))  # fmt: skip

    wrong = {n: demoted(s) for n, s in switches.items()}
    result = _agree(policy, SMALL, wrong)
    assert not result.proven and result.by_rules is not None
    assert any("order" in r for r in result.by_rules.reasons), result.by_rules.reasons
    # the same tables as the next build of a long-running controller (by difference)
    later = verify(policy, SMALL, wrong, previous=(policy, SMALL, switches))
    assert later.by_rules is not None and _found(later) == _found(result)


def test_a_proof_of_some_tors_goes_rule_by_rule_and_finds_what_the_pairs_find(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """`verify(only=...)` (a differential proof of the changed ToRs, differential_scope):
    those ToRs rule by rule and the routes from and to their hosts; a corruption there is
    reported as the proof by pairs of their packets reports it."""
    switches = _switches(floor_policy, floor, floor_policy_text)
    tor = "tor-alg"  # the algo boxes: they reach other racks
    result = verify(floor_policy, floor, switches, frozenset({tor}))
    assert result.proven and result.by_rules is not None
    assert result.by_rules.tors == 1 and result.by_rules.left is None and result.classes == 0
    caught = 0
    for corrupted in _aimed(switches, seed=21, count=30) + corruptions(switches, 4, 10):
        (name,) = [n for n in switches if corrupted[n] is not switches[n]]
        only = frozenset({name}) if switches[name].role == "tor" else None
        by_rules = verify(floor_policy, floor, corrupted, only)
        exact = verify(floor_policy, floor, corrupted, only, exact=True)
        assert _found(by_rules) == _found(exact)
        caught += not exact.proven
    assert caught >= 8
    # its route to another rack's host dropped: the pairs from its hosts to that host
    sw = switches[tor]
    mattered = 0
    for far in (h for h in floor.hosts if h.switch != tor):
        kept = [
            e for e in sw.entries if not (e.table == "routing" and e.matches[-1].value == far.ip)
        ]
        assert len(kept) == len(sw.entries) - 1
        corrupted = {**switches, tor: dataclasses.replace(sw, entries=tuple(kept))}
        by_rules = verify(floor_policy, floor, corrupted, frozenset({tor}))
        exact = verify(floor_policy, floor, corrupted, frozenset({tor}), exact=True)
        assert _found(by_rules) == _found(exact)
        mattered += not exact.proven
    assert mattered  # (some other rack's host is reachable from this one's)


# -- by difference ----------------------------------------------------------------------------

SERVICES = ("algo", "order_router", "risk", "risk_db", "settlement", "books", "dev", "ops_jump")


def _edited(text: str, rng: random.Random, added: list[str]) -> str:
    """One random edit of the trading floor's text: a port moved, a rule added or
    removed, a deny's `log` toggled, a rate put on an allow."""
    lines = text.splitlines()
    kind = rng.choice(("port", "add", "add", "remove", "log", "rate"))
    rules = [i for i, line in enumerate(lines) if line.startswith(("allow ", "deny "))]
    if kind == "remove" and added:
        gone = added.pop(rng.randrange(len(added)))
        return text.replace(gone + "\n", "", 1)
    if kind == "port":
        i = rng.choice([i for i in rules if " tcp " in lines[i] and "during" not in lines[i]])
        head, port = lines[i].rsplit(" tcp ", 1)
        number, *rest = port.split()
        lines[i] = f"{head} tcp {int(number.split('-')[0]) + 1} {' '.join(rest)}".rstrip()
    elif kind == "log":
        i = rng.choice([i for i in rules if lines[i].startswith("deny ")])
        lines[i] = lines[i][: -len(" log")] if lines[i].endswith(" log") else lines[i] + " log"
    elif kind == "rate":
        i = rng.choice([i for i in rules if lines[i].startswith("allow ") and "rate" not in lines[i] and "during" not in lines[i]])  # fmt: skip
        lines[i] += f" rate {rng.choice([100, 5000])}pps"
    else:
        a, b = rng.sample(SERVICES, 2)
        rule = (
            f"{rng.choice(['allow', 'allow', 'deny'])} {a} -> {b} tcp {rng.randrange(1000, 2000)}"
        )
        added.append(rule)
        lines.insert(rules[-1] + 1, rule)
    return "\n".join(lines) + "\n"


def _plain_floor(floor: Inventory, text: str) -> tuple[str, Policy, Build]:
    """The trading floor's policy without its expect lines, checked and built."""
    text = "\n".join(line for line in text.splitlines() if not line.startswith("expect"))
    policy = check_policy(text, "floor.zt", floor).policy
    assert policy is not None
    return text, policy, build(policy, floor, text, "ref")


def _granted(floor: Inventory, text: str, last: Build) -> tuple[Policy, Switches]:
    """`text` with a flow from algo1 to risk1 allowed, as a grant allows it (its hosts get
    tags of their own), compiled from `last`."""
    granted = text.replace(
        "default deny log",
        "service g_from = algo1\nservice g_to = risk1\nallow g_from -> g_to tcp 6001\n"
        "default deny log",
    )
    policy = check_policy(granted, "floor.zt", floor).policy
    assert policy is not None
    built = build(policy, floor, granted, "ref", allocation=last.allocation, previous=last)
    return policy, {s.switch: s for s in built.switches}


def _walked(spies: pytest.MonkeyPatch) -> list[Collection[str] | None]:
    """The ToRs each `_Proof._routes` walked while `spies` holds (None: all proven)."""
    walked: list[Collection[str] | None] = []
    routes = rule_proof._Proof._routes

    def walk(proof: rule_proof._Proof, tors: Collection[str] | None = None) -> None:
        walked.append(tors)
        routes(proof, tors)

    spies.setattr(rule_proof._Proof, "_routes", walk)
    return walked


def test_a_chain_of_edits_is_proven_by_difference_as_the_pairs_prove_it(
    floor: Inventory, floor_policy_text: str
) -> None:
    """Each build of an edit chain (compiled from the one before, so unchanged entries
    are the same objects) is proven rule by rule from the last one's proof: a ToR whose
    tables and rules did not change keeps it, the others start from theirs. Its verdict
    and counterexamples are the proof by pairs' — for the build and for corruptions of
    it — and a corrupted build, refused, is never the next one's starting point."""
    rng = random.Random(2)
    rule_proof._STATES.hold(200)  # room for the corrupted builds proven in between
    text, policy, last = _plain_floor(floor, floor_policy_text)
    switches = {s.switch: s for s in last.switches}
    assert verify(policy, floor, switches).proven  # rule by rule: what the chain starts from
    added: list[str] = []
    kept = 0
    for step in range(24):
        text = _edited(text, rng, added)
        new_policy = check_policy(text, "floor.zt", floor).policy
        assert new_policy is not None, text
        built = build(new_policy, floor, text, "ref", allocation=last.allocation, previous=last)
        new = {s.switch: s for s in built.switches}
        previous = (policy, floor, switches)
        result = verify(new_policy, floor, new, previous=previous)
        assert result.by_rules is not None, step
        assert result.proven == verify(new_policy, floor, new, exact=True).proven, step
        kept += result.by_rules.tors < _tors(floor)  # some ToR kept its proof
        stale = [n for n in new if new[n] is not switches[n]]
        if stale:  # one changed ToR left with the tables of the build before
            name = rng.choice(stale)
            old_tables = {**new, name: switches[name]}
            assert _found(verify(new_policy, floor, old_tables, previous=previous)) == _found(
                verify(new_policy, floor, old_tables, exact=True)
            ), step
        if step % 3 == 0:
            for corrupted in _aimed(new, seed=step, count=6):
                assert _found(verify(new_policy, floor, corrupted, previous=previous)) == _found(
                    verify(new_policy, floor, corrupted, exact=True)
                ), step
        policy, switches, last = new_policy, new, built
    assert kept >= 12


def test_a_build_whose_routes_changed_keeps_no_proof_by_rules(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """A ToR's kept proof holds the ports other racks' packets arrive by: a build proven by
    pairs because routes changed drops the proofs its unchanged ToRs held, so that the next
    build's proof by difference does not start from routes that are gone."""
    switches = _switches(floor_policy, floor, floor_policy_text)
    assert verify(floor_policy, floor, switches).proven  # rule by rule: every ToR keeps it
    tors = [n for n, s in switches.items() if s.role == "tor"]
    assert all(rule_proof._STATES.find(switches[n]) is not None for n in tors)
    tor = "tor-alg"  # its route to another rack's host through the other spine
    far = next(h for h in floor.hosts if h.switch != tor)
    sw = switches[tor]
    route = next(e for e in sw.entries if e.table == "routing" and e.matches[-1].value == far.ip)
    uplinks = sorted({dict(e.params)["port"] for e in sw.entries if e.table == "routing"} - {
        h.port for h in floor.hosts if h.switch == tor
    })  # fmt: skip
    other = next(p for p in uplinks if p != dict(route.params)["port"])
    moved = dataclasses.replace(route, params=(("port", other),))
    rerouted = {**switches, tor: dataclasses.replace(
        sw, entries=tuple(moved if e is route else e for e in sw.entries)
    )}  # fmt: skip
    result = verify(floor_policy, floor, rerouted, previous=(floor_policy, floor, switches))
    assert result.proven and result.by_rules is None and result.pairs is not None  # by pairs
    assert all(rule_proof._STATES.find(rerouted[n]) is None for n in tors)


def test_a_tor_whose_identities_changed_is_proven_from_its_last_proof(
    floor: Inventory, floor_policy_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flow granted between two hosts gives them tags of their own: their ToRs'
    identity entries change, and each is proven anew from its last proof — no route
    walked (no routing entry and no spine changed: the ports other racks' packets arrive
    by are its last proof's) and only the hosts a changed identity entry can match looked
    up. Its verdict and counterexamples are the proof by pairs', for the build and for
    each identity vector of those ToRs corrupted."""
    rule_proof._STATES.hold(200)  # room for the corrupted builds proven in between
    text, policy, last = _plain_floor(floor, floor_policy_text)
    switches = {s.switch: s for s in last.switches}
    assert verify(policy, floor, switches).proven  # rule by rule: every ToR keeps its proof
    new_policy, new = _granted(floor, text, last)
    moved = {
        n for n in new if {e for e in new[n].entries if e.table.endswith("_identity")}
        != {e for e in switches[n].entries if e.table.endswith("_identity")}
    }  # fmt: skip
    assert moved == {"tor-alg", "tor-rsk"}
    looked: list[tuple[str, int]] = []
    source_tags = Verifier.source_tags

    def look(v: Verifier, switch: str, port: int, src: int) -> int | None:
        looked.append((switch, src))
        return source_tags(v, switch, port, src)

    previous = (policy, floor, switches)
    with monkeypatch.context() as spies:
        walked = _walked(spies)
        spies.setattr(Verifier, "source_tags", look)
        result = verify(new_policy, floor, new, previous=previous)
    assert result.proven and result.by_rules is not None and result.by_rules.tors == 2
    assert result.classes == 0  # no pair left (the changed sources' spoofs are walked)
    assert walked == []
    # algo1 on its ToR (its own port, then as a sender to tor-rsk's hosts, by each spine)
    assert {ip for _, ip in looked} <= {h.ip for h in floor.hosts if h.name in ("algo1", "risk1")}
    assert len(looked) < len(floor.hosts)
    caught = 0
    for name in sorted(moved):
        sw = new[name]
        for i, e in enumerate(sw.entries):
            vector = dict(e.params).get("tags")
            if not e.table.endswith("_identity") or not vector:
                continue
            flipped = dataclasses.replace(e, params=(("tags", vector ^ 0x1),))
            entries = (*sw.entries[:i], flipped, *sw.entries[i + 1 :])
            corrupted = {**new, name: dataclasses.replace(sw, entries=entries)}
            by_rules = verify(new_policy, floor, corrupted, previous=previous)
            exact = verify(new_policy, floor, corrupted, exact=True)
            assert _found(by_rules) == _found(exact), (name, e)
            caught += not exact.proven
    assert caught >= 4


def test_a_build_equal_to_one_proven_earlier_takes_its_proofs_by_rules(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """A revoke compiles the build before the grant again, in new objects; `carry_proofs`
    gives them the proofs the equal tables had, so the next grant is proven from them."""
    switches = _switches(floor_policy, floor, floor_policy_text)
    assert verify(floor_policy, floor, switches).proven
    again = {n: dataclasses.replace(s) for n, s in switches.items()}  # equal, other objects
    assert all(rule_proof._STATES.find(again[n]) is None for n in again)
    rule_proof.carry_proofs(switches, again)
    tors = [n for n, s in switches.items() if s.role == "tor"]
    assert all(rule_proof._STATES.find(again[n]) is rule_proof._STATES.find(switches[n])
               for n in tors)  # fmt: skip
    assert all(rule_proof._STATES.find(again[n]) is not None for n in tors)


def test_a_revoke_keeps_proofs_by_rules_carried_from_the_grant_for_the_next_one(
    floor: Inventory, floor_policy_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revoke's build is one proven earlier, in new objects, and its changed ToRs may
    keep no proof by rules (that build was proven by pairs: a new process's proof from
    the kept build). `keep_proofs_by_rules` carries the grant's over by difference, so the
    next grant is proven from them: no route walked."""
    text, policy, last = _plain_floor(floor, floor_policy_text)
    switches = {s.switch: s for s in last.switches}
    new_policy, new = _granted(floor, text, last)
    assert verify(new_policy, floor, new, previous=(policy, floor, switches)).proven
    assert rule_proof.holds_proof(new["tor-alg"]) and rule_proof.holds_proof(new["tor-rsk"])
    revoked = {n: dataclasses.replace(s) for n, s in switches.items()}  # equal, other objects
    assert not any(rule_proof.holds_proof(s) for s in revoked.values())
    keep_proofs_by_rules(policy, floor, revoked, (new_policy, floor, new))
    assert rule_proof.holds_proof(revoked["tor-alg"]) and rule_proof.holds_proof(revoked["tor-rsk"])
    with monkeypatch.context() as spies:
        walked = _walked(spies)
        again = verify(new_policy, floor, new, previous=(policy, floor, revoked))
    assert again.proven and again.by_rules is not None and again.by_rules.tors == 2
    assert walked == []


def test_tors_proven_ahead_one_by_one_hold_what_a_whole_proof_gives(
    floor: Inventory, floor_policy_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build proven by pairs keeps no proof by rules; `prove_tor_ahead` gives its ToRs
    theirs one at a time (a long-running controller between operations), leaving the
    others' in place, each the one a whole proof by rules makes of the same tables. The
    next grant is proven from them, no route walked, and catches what the proof by pairs
    catches in its corrupted builds. A quarantined build is not proven ahead."""
    from compiler.verify import prove_tor_ahead

    rule_proof._STATES.hold(200)
    text, policy, last = _plain_floor(floor, floor_policy_text)
    switches = {s.switch: s for s in last.switches}
    rule_proof.forget_proofs(switches.values())  # as proven by pairs
    tors = sorted(n for n, s in switches.items() if s.role == "tor")
    for i, name in enumerate(tors):
        assert prove_tor_ahead(policy, floor, switches, name)
        assert [rule_proof.holds_proof(switches[n]) for n in tors] == [
            j <= i for j in range(len(tors))
        ]
    whole = {n: dataclasses.replace(s) for n, s in switches.items()}  # equal, other objects
    assert verify(policy, floor, whole).proven
    for name in tors:
        ahead, made = rule_proof._STATES.find(switches[name]), rule_proof._STATES.find(whole[name])
        assert ahead is not None and made is not None and ahead is not made
        assert (ahead.identity, ahead.groups, ahead.bounds, ahead.arrivals) == (
            made.identity, made.groups, made.bounds, made.arrivals)  # fmt: skip
        assert ahead.arrivals is not None
    new_policy, new = _granted(floor, text, last)
    previous = (policy, floor, switches)
    with monkeypatch.context() as spies:
        walked = _walked(spies)
        result = verify(new_policy, floor, new, previous=previous)
    assert result.proven and result.by_rules is not None and result.by_rules.tors == 2
    assert walked == []
    caught = 0
    for name in ("tor-alg", "tor-rsk"):
        sw = new[name]
        for i, e in enumerate(sw.entries):
            if e.table != "policy" or e.role not in ("forward", "reply") or i % 3:
                continue
            dropped = {
                **new,
                name: dataclasses.replace(sw, entries=sw.entries[:i] + sw.entries[i + 1 :]),
            }
            by_rules = verify(new_policy, floor, dropped, previous=previous)
            exact = verify(new_policy, floor, dropped, exact=True)
            assert _found(by_rules) == _found(exact), (name, e)
            caught += not exact.proven
    assert caught >= 4
    quarantined = check_policy(text, "floor.zt", floor).policy
    assert quarantined is not None
    live = LiveState()
    live.quarantine_by_operator("algo1", 0.0)
    cut = effective_policy(quarantined, live, 0.0, {h.name: h.ip for h in floor.hosts})
    assert cut.quarantine is not None
    built = build(cut, floor, text, "ref", allocation=last.allocation)
    assert not prove_tor_ahead(cut, floor, {s.switch: s for s in built.switches}, "tor-alg")
