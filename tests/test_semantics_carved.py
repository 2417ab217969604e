"""A quarantine's carved policy judged on the atoms of the policy before the carve
(compiler.semantics `PolicySemantics.amended`, found by `semantics_of`): every packet is
decided as semantics made afresh decide it, whichever hosts are cut off; a set the atoms
cannot hold is refused, not approximated. And the verifier's address classes, kept while
a carve cuts nowhere new (compiler.verify `_DerivedCache.classes_within`)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.addresses import MAX_ADDRESS, AddressSet, merge_intervals
from compiler.allocation import Allocation, assign_rule_ids
from compiler.check import check_policy
from compiler.emit import build
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.semantics import Partition, PolicySemantics, semantics_of
from compiler.verify import DERIVED, Verifier
from runtime.live import LiveState, effective_policy

NOON = 1_780_000_000 - 1_780_000_000 % 86_400 + 12 * 3600
REMEDIATION = "service remediation = jump1\nallow algo -> remediation tcp 443\n"
PORTS = (22, 443, 80, 8080, 30001, 49152, 9999)
PROTOCOLS: tuple[str | int, ...] = ("tcp", "udp", "icmp", 47)


def _policy(floor_policy_text: str, floor: Inventory) -> Policy:
    text = "\n".join(ln for ln in floor_policy_text.splitlines() if not ln.startswith("expect"))
    text = text.replace("default deny log", REMEDIATION + "default deny log")
    policy = check_policy(text, "floor.zt", floor).policy
    assert policy is not None
    return assign_rule_ids(policy, Allocation())[0]


def _carved(policy: Policy, floor: Inventory, hosts: tuple[str, ...]) -> Policy:
    state = LiveState(quarantined={h: 0.0 for h in hosts})
    out = effective_policy(policy, state, NOON, {h.name: h.ip for h in floor.hosts})
    assert out.quarantine is not None
    return out


def _decisions(sem: PolicySemantics, floor: Inventory, hosts: tuple[str, ...]) -> list[object]:
    """Every packet between the quarantined hosts and every host (and an address no
    host holds), both ways, each protocol, port and ACK flag: its decision."""
    cut = [floor.hosts_by_name[h].ip for h in hosts]
    return _decided(sem, cut, [h.ip for h in floor.hosts] + [0x0A0000FE], PORTS)


def _decided(
    sem: PolicySemantics, ends: Iterable[int], everyone: list[int], ports: Iterable[int]
) -> list[object]:
    """The decision of every packet between each of `ends` and each of `everyone`, both
    ways, each protocol, each of `ports` and each ACK flag."""
    out: list[object] = []
    for a, b in itertools.product(ends, everyone):
        for src, dst in ((a, b), (b, a)):
            for proto, port, ack in itertools.product(PROTOCOLS, ports, (0, 1)):
                d = sem.decide(src, dst, proto, 49152, port, bool(ack))
                out.append((src, dst, proto, port, ack, d.allowed, d.reason, d.log,
                            d.rule and d.rule.id))  # fmt: skip
    return out


def _examples(count: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Hypothesis settings of these tests: `count` examples, no deadline, fixtures shared."""
    return settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


@_examples(25)
@given(data=st.data())
def test_a_carved_policy_on_the_uncarved_atoms_decides_as_fresh_semantics(
    data: st.DataObject, floor: Inventory, floor_policy_text: str
) -> None:
    policy = _policy(floor_policy_text, floor)
    names = sorted(h.name for h in floor.hosts if h.name != "jump1")
    hosts = tuple(data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)))
    pinned = tuple(h.ip for h in floor.hosts)
    base = semantics_of(policy, pinned)  # what the proof of the policy before made
    carved = _carved(policy, floor, hosts)
    view = semantics_of(carved, pinned)
    assert view.addresses is base.addresses  # derived: the same atoms, bits moved
    assert len(view.rules) == len(carved.rules)
    assert all(a is b for a, b in zip(view.rules, carved.rules, strict=True))
    fresh = PolicySemantics(carved, pinned)
    assert _decisions(view, floor, hosts) == _decisions(fresh, floor, hosts)
    # and the semantics before the carve are left as they were
    assert _decisions(base, floor, hosts) == _decisions(
        PolicySemantics(policy, pinned), floor, hosts
    )


def test_the_carve_keeps_the_remediation_flow_and_nothing_else(
    floor: Inventory, floor_policy_text: str
) -> None:
    policy = _policy(floor_policy_text, floor)
    pinned = tuple(h.ip for h in floor.hosts)
    semantics_of(policy, pinned)
    view = semantics_of(_carved(policy, floor, ("algo1",)), pinned)
    algo1, jump1 = (floor.hosts_by_name[h].ip for h in ("algo1", "jump1"))
    assert view.flow(algo1, jump1, "tcp", 443).allowed
    allowed = [h.name for h in floor.hosts if view.flow(algo1, h.ip, "tcp", 443).allowed]
    assert allowed == ["jump1"]


def test_a_set_the_atoms_cannot_hold_is_refused() -> None:
    # two runs of one atom (in the set {10-19, 30-39} alike): half of it is no union of atoms
    part = Partition([((10, 19), (30, 39))], MAX_ADDRESS)
    assert part.exact_mask(((10, 19), (30, 39))) == part.mask(((10, 19), (30, 39)))
    assert part.exact_mask(((10, 19),)) is None
    assert part.exact_mask(((12, 19),)) is None  # an edge inside a run
    assert part.exact_mask(((0, 9),)) is None  # the atom outside the set is three runs
    outside = ((0, 9), (20, 29), (40, MAX_ADDRESS))
    assert part.exact_mask(outside) == part.full ^ part.mask(((10, 19),))
    assert part.exact_mask(()) == 0
    policy_text = "policy a\nservice a = 10.0.0.10\nallow a -> a tcp 22\ndefault deny\n"
    inventory = Inventory.empty()
    checked = check_policy(policy_text, "a.zt", inventory).policy
    assert checked is not None
    sem = PolicySemantics(checked)
    wider = checked.rules[0].src.union(AddressSet.of([(0x0A000001, 0x0A000002)]))
    moved = dataclasses.replace(checked, rules=(dataclasses.replace(checked.rules[0], src=wider),))
    assert sem.amended(moved) is None  # new edges: cut anew, never approximated


def test_the_verifier_keeps_its_classes_while_a_carve_cuts_nowhere_new(
    floor: Inventory, floor_policy_text: str
) -> None:
    policy = _policy(floor_policy_text, floor)
    plain = build(policy, floor, "floor.zt", "ref", allocation=Allocation())
    switches = {sw.switch: sw for sw in plain.switches}
    DERIVED.clear()
    first = Verifier(policy, floor, switches).address_classes()
    carved = _carved(policy, floor, ("algo1",))
    carved, allocation = assign_rule_ids(carved, plain.allocation)
    quarantined = build(carved, floor, "floor.zt", "ref", allocation=allocation, previous=plain)
    moved = {sw.switch: sw for sw in quarantined.switches}
    assert moved["tor-alg"] is not switches["tor-alg"]
    kept = Verifier(carved, floor, moved).address_classes()
    assert kept is first  # the carve and the overlay cut at no new address
    DERIVED.clear()
    assert Verifier(carved, floor, moved).address_classes() == first  # and they are exact
    # a policy that names a new address range is cut afresh
    wider = floor_policy_text.replace("default deny log", "service odd = 10.9.9.0/30\n"
                                      "allow odd -> algo tcp 1\ndefault deny log")  # fmt: skip
    other = _policy(wider, floor)
    again = Verifier(other, floor, switches).address_classes()
    assert again is not first and any(lo == 0x0A090900 for lo, _ in again)


def _port_values(sem: PolicySemantics, mask: int) -> tuple[tuple[int, int], ...]:
    """The ports of the port atoms in `mask`, merged."""
    part, out = sem.ports, []
    for i, start in enumerate(part.starts):
        if mask >> part.element_atom[i] & 1:
            end = part.starts[i + 1] - 1 if i + 1 < len(part.starts) else part.top
            out.append((start, end))
    return merge_intervals(out)


APPENDED_PORTS = st.sampled_from([22, 443, 444, 6001, 8080, 8081, 30000, 65535, 0])


@_examples(30)
@given(data=st.data())
def test_rules_appended_on_the_atoms_before_decide_as_fresh_semantics(
    data: st.DataObject, floor: Inventory, floor_policy_text: str
) -> None:
    """A grant's rules come after the policy's: their semantics are those of the policy
    before with the new rules' bits moved in (compiler.semantics `_appended`), the port
    atoms their ports cut split in two (`Partition.refined`). Every packet on the ports
    around the new ones' edges is decided as semantics made afresh decide it, the dead
    rules are the same, and the semantics before are left as they were."""
    policy = _policy(floor_policy_text, floor)
    pinned = tuple(h.ip for h in floor.hosts)
    base = semantics_of(policy, pinned)
    hosts = sorted(floor.hosts_by_name)
    added = []
    for k in range(data.draw(st.integers(min_value=1, max_value=3))):
        src, dst = (floor.hosts_by_name[data.draw(st.sampled_from(hosts))] for _ in range(2))
        proto = data.draw(st.sampled_from(["tcp", "udp", "icmp"]))
        lo = data.draw(APPENDED_PORTS)
        hi = data.draw(st.sampled_from([lo, min(lo + 1, 65535), min(lo + 100, 65535)]))
        span = ((0, 65535),) if proto == "icmp" else ((lo, hi),)
        rule = dataclasses.replace(
            policy.rules[-1],
            id=max(r.id for r in policy.rules) + 1 + k,
            name=f"g{k}",
            action=policy.rules[-1].action.ALLOW,
            src=AddressSet.of([(src.ip, src.ip)]),
            dst=AddressSet.of([(dst.ip, dst.ip)]),
            proto=proto,
            ports=span,
            reply=False,
            log=False,
            rate_pps=None,
            duration_s=None,
            window=None,
        )
        added.append(rule)
    granted = dataclasses.replace(policy, rules=(*policy.rules, *added))
    view = semantics_of(granted, pinned)
    assert view.addresses is base.addresses  # moved in, not made afresh
    fresh = PolicySemantics(granted, pinned)
    edges = {p for r in added for lo, hi in r.ports for p in (lo - 1, lo, hi, hi + 1)}
    ports = sorted({p for p in edges | set(PORTS) if 0 <= p <= 65535})
    everyone = [h.ip for h in floor.hosts] + [0x0A0000FE]
    ends = sorted({r.src.intervals[0][0] for r in added} | {r.dst.intervals[0][0] for r in added})

    def decisions(sem: PolicySemantics) -> list[object]:
        return _decided(sem, ends, everyone, ports)

    assert decisions(view) == decisions(fresh)
    assert [c.rule.id for c in view.dead_rules()] == [c.rule.id for c in fresh.dead_rules()]
    for rule, box in zip(view.rules, view.boxes, strict=True):  # each box's ports, exactly
        assert _port_values(view, box[3]) == merge_intervals(rule.ports), rule.describe()
    assert decisions(base) == decisions(PolicySemantics(policy, pinned))
