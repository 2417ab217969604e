"""Both spines carry traffic, and a spine out of service is routed around (compiler/lower.py
routing, p4seg/spines.py): the compile-time spread, what a spine going down changes (routing
only), the proof with a spine gone, and `watch` following spines on reference switches on
loopback (the same with real packets and a killed process: tests/test_spines_mininet.py)."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter
from pathlib import Path

import pytest
from p4rt import wait_for
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from compiler.allocation import Allocation, assign_rule_ids
from compiler.check import check_policy
from compiler.diagnostics import InventoryError
from compiler.emit import Build, build
from compiler.entries import SwitchTables
from compiler.inventory import Inventory, parse_inventory
from compiler.model import Policy
from compiler.verify import differential_scope, proof_record, verify
from p4seg.cli import _front, _parser, main
from p4seg.spines import DOWN_FILE, read_down, take_down, write_down
from runtime.refswitch.switch import ReferenceSwitch
from topologies.switches import free_port

Routes = dict[str, dict[int, int]]  # switch -> destination address -> egress port


def _compile(
    policy: Policy, inventory: Inventory, text: str, previous: Build | None = None
) -> Build:
    allocation = previous.allocation if previous is not None else Allocation()
    policy, allocation = assign_rule_ids(policy, allocation)
    return build(policy, inventory, text, "ref", allocation=allocation, previous=previous)


def _routes(built: Build) -> Routes:
    return {
        sw.switch: {e.matches[0].value: dict(e.params)["port"] for e in sw.table("routing")}
        for sw in built.switches
    }


def _uplinks(inventory: Inventory) -> dict[tuple[str, int], str]:
    """(switch, port) -> the switch at the other end of the link."""
    out = {}
    for link in inventory.links:
        out[(link.a, link.a_port)] = link.b
        out[(link.b, link.b_port)] = link.a
    return out


def _spine_of(inventory: Inventory, built: Build) -> dict[tuple[str, str], str]:
    """(ToR, remote host) -> the spine the ToR sends that host's packets to."""
    routes, uplinks = _routes(built), _uplinks(inventory)
    return {
        (tor.name, h.name): uplinks[(tor.name, routes[tor.name][h.ip])]
        for tor in inventory.switches
        if tor.role == "tor"
        for h in inventory.hosts
        if h.switch != tor.name and h.ip in routes[tor.name]
    }


def _taken_down(
    policy: Policy, inventory: Inventory, text: str, spine: str
) -> tuple[Build, Inventory, Build]:
    """The build of `inventory`, the inventory with `spine` down, and the build of that
    from the first (incremental, as `watch` compiles)."""
    before = _compile(policy, inventory, text)
    gone = inventory.with_down([spine])
    return before, gone, _compile(policy, gone, text, previous=before)


def _without_routing(sw: SwitchTables) -> list[object]:
    return [e for e in sw.entries if e.table != "routing"]


# -- the spread ------------------------------------------------------------------------------


def test_every_spine_carries_about_half_of_every_racks_hosts(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    built = _compile(floor_policy, floor, floor_policy_text)
    spine_of = _spine_of(floor, built)
    racks: dict[str, list[str]] = {}
    for h in floor.hosts:
        racks.setdefault(h.switch, []).append(h.name)
    for tor in racks:
        for rack, hosts in racks.items():
            if rack == tor:
                continue
            counts = Counter(spine_of[(tor, h)] for h in hosts)
            assert set(counts) == {"spine1", "spine2"}, (tor, rack, counts)
            assert max(counts.values()) - min(counts.values()) <= 1, (tor, rack, counts)
    # One path per destination: every ToR sends a host's packets through the same spine.
    by_host: dict[str, set[str]] = {}
    for (_, host), spine in spine_of.items():
        by_host.setdefault(host, set()).add(spine)
    assert all(len(spines) == 1 for spines in by_host.values()), by_host
    total = Counter(next(iter(s)) for s in by_host.values())
    assert abs(total["spine1"] - total["spine2"]) <= 1, total


def test_the_spread_does_not_depend_on_the_order_of_the_inventory(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    shuffled = Inventory.build(
        floor.name,
        floor.file,
        tuple(reversed(floor.switches)),
        tuple(reversed(floor.hosts)),
        tuple(reversed(floor.links)),
    )
    first = _routes(_compile(floor_policy, floor, floor_policy_text))
    assert first == _routes(_compile(floor_policy, floor, floor_policy_text))
    assert first == _routes(_compile(floor_policy, shuffled, floor_policy_text))


# -- a spine out of service ------------------------------------------------------------------


def test_a_down_spine_changes_routing_only_and_moves_only_its_own_hosts(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    before, gone, after = _taken_down(floor_policy, floor, floor_policy_text, "spine1")
    # Incremental: nothing compiled again but routing — and the same as compiling afresh.
    assert after.lowered is not None
    assert after.lowered.reused == {s.name for s in floor.switches}
    scratch = _compile(floor_policy, gone, floor_policy_text)
    assert [sw.entries for sw in after.switches] == [sw.entries for sw in scratch.switches]

    old, new = {s.switch: s for s in before.switches}, {s.switch: s for s in after.switches}
    for name, sw in old.items():
        assert _without_routing(sw) == _without_routing(new[name]), name  # policy untouched
        if sw.role == "spine":
            assert sw is new[name]  # spines keep their tables, spine1 for when it is back
    spine_before, spine_after = _spine_of(floor, before), _spine_of(floor, after)
    assert set(spine_after.values()) == {"spine2"}
    moved = {k for k in spine_before if spine_before[k] != spine_after[k]}
    assert moved == {k for k, s in spine_before.items() if s == "spine1"}
    assert moved  # spine1 carried something

    # Proven with spine1 gone; the old tables lose spine1's share, and the proof says so.
    tables = {s.switch: s for s in after.switches}
    assert verify(floor_policy, gone, tables).proven
    stale = verify(floor_policy, gone, old)
    assert not stale.proven
    assert all("leads to no live switch or host" in c.describe() for c in stale.counterexamples), (
        stale.counterexamples[0].describe()
    )
    # Back in service: exactly the tables of before.
    back = _compile(floor_policy, floor, floor_policy_text, previous=after)
    assert [sw.entries for sw in back.switches] == [sw.entries for sw in before.switches]


THREE_SPINES = """\
name: three_spines
switches:
  tor1:   {role: tor,   device_id: 1, p4rt: "127.0.0.1:50201"}
  tor2:   {role: tor,   device_id: 2, p4rt: "127.0.0.1:50202"}
  spine1: {role: spine, device_id: 11, p4rt: "127.0.0.1:50211"}
  spine2: {role: spine, device_id: 12, p4rt: "127.0.0.1:50212"}
  spine3: {role: spine, device_id: 13, p4rt: "127.0.0.1:50213"}
hosts:
%s
links:
%s
"""


def _three_spines(hosts_per_rack: int = 6) -> Inventory:
    hosts = [
        f"  h{t}{i}: {{ip: 10.0.{t}.{i}, switch: tor{t}, port: {i}}}"
        for t in (1, 2)
        for i in range(1, hosts_per_rack + 1)
    ]
    links = [
        f'  - endpoints: ["tor{t}:{20 + s}", "spine{s}:{t}"]' for t in (1, 2) for s in (1, 2, 3)
    ]
    return parse_inventory(THREE_SPINES % ("\n".join(hosts), "\n".join(links)))


def test_three_spines_one_down_its_hosts_spread_over_the_other_two() -> None:
    inventory = _three_spines()
    text = "policy p\nallow 10.0.1.0/24 -> 10.0.2.0/24 tcp 80\ndefault deny log\n"
    policy = check_policy(text, "p.zt", inventory).policy
    assert policy is not None
    before = _compile(policy, inventory, text)
    spine_before = _spine_of(inventory, before)
    assert Counter(spine_before.values()) == {"spine1": 4, "spine2": 4, "spine3": 4}
    gone = inventory.with_down(["spine2"])
    after = _compile(policy, gone, text, previous=before)
    spine_after = _spine_of(inventory, after)
    for key, spine in spine_before.items():
        if spine != "spine2":
            assert spine_after[key] == spine, key  # the others keep their spine
    moved = Counter(spine_after[k] for k, s in spine_before.items() if s == "spine2")
    assert moved == {"spine1": 2, "spine3": 2}, moved
    assert verify(policy, gone, {s.switch: s for s in after.switches}).proven
    # Every spine down: no route across racks (dropped, never sent astray). No tables could
    # deliver across, so the proof holds for what is left: each rack's own packets.
    dark = inventory.with_down(["spine1", "spine2", "spine3"])
    none = _compile(policy, dark, text, previous=after)
    assert _spine_of(inventory, none) == {}
    assert verify(policy, dark, {s.switch: s for s in none.switches}).proven
    # ... and it still proves what is left: a rack that drops its own allowed traffic fails.
    intra = "policy p\nallow 10.0.1.1 -> 10.0.1.2 tcp 80\ndefault deny log\n"
    intra_policy = check_policy(intra, "p.zt", dark).policy
    assert intra_policy is not None
    tables = {s.switch: s for s in _compile(intra_policy, dark, intra).switches}
    assert verify(intra_policy, dark, tables).proven
    tor1 = tables["tor1"]
    lost = tuple(e for e in tor1.entries if e.table != "routing" or e.params != (("port", 2),))
    tables["tor1"] = dataclasses.replace(tor1, entries=lost)
    assert not verify(intra_policy, dark, tables).proven


def test_a_spine_change_asks_for_a_full_proof(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    before, gone, after = _taken_down(floor_policy, floor, floor_policy_text, "spine2")
    roles = {s.name: s.role for s in floor.switches}
    old = proof_record(floor_policy, floor, {s.switch: s for s in before.switches})
    new = proof_record(floor_policy, gone, {s.switch: s for s in after.switches})
    assert differential_scope(old, new, roles) is None
    assert proof_record(floor_policy, floor.with_down([]), {}) == proof_record(
        floor_policy, floor, {}
    )


# -- naming the spines out of service --------------------------------------------------------


def test_down_in_the_inventory_the_command_line_and_the_state_directory(
    floor: Inventory, tmp_path: Path
) -> None:
    text = Path(floor.file).read_text() + "\ndown: [spine2]\n"
    assert parse_inventory(text).down == {"spine2"}
    with pytest.raises(InventoryError) as caught:
        floor.with_down(["spine9", "tor-md"], "state/down.json")
    messages = [d.message for d in caught.value.diagnostics]
    assert messages == [
        "state/down.json: unknown switch 'spine9' (did you mean 'spine2'?)",
        "state/down.json: 'tor-md' is a tor: only spines can be out of service "
        "(a ToR's hosts have no other way in)",
    ]
    state = tmp_path / "state"
    args = _parser().parse_args(
        ["apply", "p.zt", "-i", "f.yaml", "--state", str(state), "--down", "spine1"]
    )
    assert take_down(floor, args).down == {"spine1"}
    write_down(state, ["spine2", "spine2"])
    assert read_down(state) == ["spine2"]
    assert take_down(floor, args).down == {"spine1", "spine2"}
    (state / DOWN_FILE).write_text('{"down": "spine2"}')
    with pytest.raises(InventoryError, match="expected"):
        take_down(floor, args)


def test_compile_down_names_a_tor_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = Path(__file__).resolve().parent.parent
    argv = ["compile", str(root / "policies" / "trading_floor.zt")]
    argv += ["-i", str(root / "topologies" / "trading_floor.yaml"), "-o", str(tmp_path / "b")]
    assert main([*argv, "--down", "tor-md"]) == 1
    assert "error[E307]: --down: 'tor-md' is a tor" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main([*argv, "--down", "spine1"]) == 0
    held = json.loads((tmp_path / "b" / "entries" / "tor-md.json").read_text())
    ports = {e["params"]["port"] for e in held["entries"] if e["table"] == "routing"}
    assert ports == {1, 2, 3, 10}  # its hosts, and spine2 for every other rack


# -- `watch` follows the spines ---------------------------------------------------------------

FABRIC = """\
name: two_spines
switches:
  tor1:   {{role: tor,   device_id: 1, p4rt: "127.0.0.1:{tor1}"}}
  tor2:   {{role: tor,   device_id: 2, p4rt: "127.0.0.1:{tor2}"}}
  spine1: {{role: spine, device_id: 3, p4rt: "127.0.0.1:{spine1}"}}
  spine2: {{role: spine, device_id: 4, p4rt: "127.0.0.1:{spine2}"}}
hosts:
  h1: {{ip: 10.0.1.1, switch: tor1, port: 1}}
  h2: {{ip: 10.0.1.2, switch: tor1, port: 2}}
  h3: {{ip: 10.0.2.3, switch: tor2, port: 1}}
  h4: {{ip: 10.0.2.4, switch: tor2, port: 2}}
links:
  - endpoints: ["tor1:9", "spine1:1"]
  - endpoints: ["tor1:10", "spine2:1"]
  - endpoints: ["tor2:9", "spine1:2"]
  - endpoints: ["tor2:10", "spine2:2"]
"""
POLICY = """\
policy two_spines
allow h1 -> h3, h4 tcp 80
default deny log
"""
ADDRESSES = {"h1": "10.0.1.1", "h2": "10.0.1.2", "h3": "10.0.2.3", "h4": "10.0.2.4"}


def _out(sw: ReferenceSwitch, port: int, src: str, dst: str, reply: bool = False) -> set[int]:
    """The ports `sw` sends a TCP SYN to port 80 (or its SYN-ACK) out of, arriving on `port`."""
    tcp = TCP(sport=80, dport=40000, flags="SA") if reply else TCP(dport=80, flags="S")
    frame = Ether() / IP(src=ADDRESSES[src], dst=ADDRESSES[dst]) / tcp
    return {p for p, _ in sw.inject(port, bytes(frame))}


def test_watch_routes_around_a_dead_spine_and_back_through_it_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p4seg.verbs import watch_loop

    ports: dict[str, int] = {}
    for name in ("tor1", "tor2", "spine1", "spine2"):
        ports[name] = free_port(set(ports.values()))
    (tmp_path / "fabric.yaml").write_text(FABRIC.format(**ports))
    (tmp_path / "p.zt").write_text(POLICY)
    monkeypatch.chdir(tmp_path)
    switches = {name: ReferenceSwitch(device_id=i + 1) for i, name in enumerate(ports)}
    for name, sw in switches.items():
        sw.start(f"127.0.0.1:{ports[name]}")
    argv = ["watch", "p.zt", "-i", "fabric.yaml", "--check", "0.2", "--interval", "0.05"]
    stop = threading.Event()
    loop = threading.Thread(
        target=watch_loop, args=(_parser().parse_args(argv), _front, stop), daemon=True
    )
    tor1, tor2 = switches["tor1"], switches["tor2"]

    def denied_stays_denied() -> None:  # whatever the spines do, h3 never opens to h1
        assert _out(tor2, 1, "h3", "h1") == set()

    loop.start()
    try:
        # Both spines: h3 through spine1 (port 9), h4 through spine2 (port 10).
        assert wait_for(
            lambda: (
                _out(tor1, 1, "h1", "h3") == {9}
                and _out(switches["spine1"], 1, "h1", "h3") == {2}  # every switch applied
                and _out(switches["spine2"], 1, "h1", "h4") == {2}
            )
        )
        assert _out(tor1, 1, "h1", "h4") == {10}
        denied_stays_denied()
        switches["spine1"].stop()  # dead: its P4Runtime server and its tables are gone
        assert wait_for(
            lambda: (
                _out(tor1, 1, "h1", "h3") == {10} and _out(tor2, 1, "h3", "h1", reply=True) == {10}
            )
        )  # replies too
        assert _out(tor1, 1, "h1", "h4") == {10}
        assert read_down(Path(".p4seg")) == ["spine1"]
        denied_stays_denied()
        fresh = switches["spine1"] = ReferenceSwitch(device_id=3)  # back, empty
        fresh.start(f"127.0.0.1:{ports['spine1']}")
        assert wait_for(
            lambda: (
                _out(tor1, 1, "h1", "h3") == {9} and _out(tor2, 1, "h3", "h1", reply=True) == {9}
            )
        )
        assert _out(fresh, 1, "h1", "h3") == {2}  # its tables are back
        assert read_down(Path(".p4seg")) == []
        denied_stays_denied()
    finally:
        stop.set()
        loop.join(timeout=30)
        for sw in switches.values():
            sw.stop()
    assert not loop.is_alive()
    records = [json.loads(line) for line in Path(".p4seg/audit.jsonl").read_text().splitlines()]
    # A restore that failed (a loaded machine: the spine not ready yet) is tried again at the
    # next check: only the attempts that took count, and each that did not says so.
    retried = [r for r in records if "spine_restored" in r and r.get("result") != "ok"]
    assert all(r.get("result") for r in retried), retried
    marks = [
        {k: r[k] for k in ("spines_down", "spines_back", "spine_restored") if k in r}
        for r in records
        if r not in retried
    ]
    marks = [m for m in marks if m]
    # spine1's own tables first (alone), then the ToRs route through it again.
    assert marks == [
        {"spines_down": ["spine1"], "spines_back": []},
        {"spine_restored": "spine1"},
        {"spines_down": [], "spines_back": ["spine1"]},
    ], marks
    restored = next(r for r in records if "spine_restored" in r)
    assert set(restored["switches"]) == {"spine1"}
    down = next(r for r in records if r.get("spines_down"))
    written = {name: s["written"] for name, s in down["switches"].items()}
    assert "spine1" not in written and written["spine2"] == 0, written
    assert written["tor1"] > 0 and written["tor2"] > 0, written


def test_a_down_spine_is_not_written_unless_named(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str, tmp_path: Path
) -> None:
    from p4seg.control import Compiled, _selected
    from runtime.plan import Tables

    gone = floor.with_down(["spine1"])
    built = _compile(floor_policy, gone, floor_policy_text)
    compiled = Compiled(built, tmp_path, gone, floor_policy)
    tables = Tables(built.target.pipeline)
    every = _selected(compiled, [], tables)
    assert not isinstance(every, str)
    assert {t.name for t in every} == {s.name for s in floor.switches} - {"spine1"}
    named = _selected(compiled, ["spine1"], tables)
    assert not isinstance(named, str) and [t.name for t in named] == ["spine1"]
