"""Stable rule identity: rule names, keys, the rule-id allocation and the priorities built
from it (compiler/allocation.py, compiler/lower.py), and how the CLI keeps the allocation."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from compiler.allocation import (
    MAX_RULE_ID,
    Allocation,
    RuleIdsExhausted,
    assign_rule_ids,
)
from compiler.check import check_policy
from compiler.diagnostics import PolicyError, Span
from compiler.entries import SwitchTables, TableEntry
from compiler.evaluate import Fabric
from compiler.fmt import format_policy
from compiler.inventory import Inventory
from compiler.lower import BAND_DEFAULT, lower
from compiler.model import Policy, text_key
from compiler.parse import parse
from compiler.resolve import resolve
from compiler.semantics import PolicySemantics
from compiler.trace import trace_flow
from compiler.verify import verify

ROOT = Path(__file__).resolve().parent.parent
FLOOR_POLICY = ROOT / "policies" / "trading_floor.zt"
FLOOR_INVENTORY = ROOT / "topologies" / "trading_floor.yaml"
NEW_RULE = "allow dev -> dev tcp 22"


def _checked(text: str, inventory: Inventory, file: str = "policy.zt") -> Policy:
    result = check_policy(text, file, inventory, expectations=False)
    assert result.policy is not None, [d.message for d in result.diagnostics]
    return result.policy


def _codes(text: str, inventory: Inventory) -> list[tuple[str, int, int, tuple[int, ...]]]:
    """(code, line, column, lines of the notes) of every error `text` gives."""
    with pytest.raises(PolicyError) as err:
        resolve(parse(text, "p.zt"), inventory)
    return [
        (d.code, d.span.line, d.span.column, tuple(n.span.line for n in d.notes if n.span))
        for d in err.value.diagnostics
        if d.is_error and d.span is not None
    ]


def _insert_above_first_rule(text: str, rule: str) -> str:
    lines = text.splitlines(keepends=True)
    first = next(i for i, line in enumerate(lines) if line.startswith(("allow ", "deny ")))
    return "".join([*lines[:first], rule + "\n", *lines[first:]])


def _policy_entries(tables: tuple[SwitchTables, ...]) -> dict[str, list[TableEntry]]:
    return {sw.switch: [e for e in sw.entries if e.table == "policy"] for sw in tables}


def _without_groups(entry: TableEntry) -> tuple[object, ...]:
    """An entry as a rule sees it: everything but the group values (the identity encoding
    is numbered per ToR, apart from rule ids)."""
    matches = tuple(m for m in entry.matches if m.field not in ("src_group", "dst_group"))
    return (entry.rule_id, entry.priority, entry.action, entry.params, matches, entry.meter)


# -- the language ---------------------------------------------------------------------------


def test_rule_name_parses_formats_and_round_trips(floor: Inventory) -> None:
    text = (
        "policy p\nservice algo = algo1, algo2\nservice oms = oms1, oms2\n"
        "allow algo -> oms tcp 9876   name fix_orders\n"
        "deny algo -> dev1 name algo_never_dev log\n"
    )
    canonical = format_policy(text)
    assert canonical.splitlines()[-2:] == [
        "allow algo -> oms  tcp 9876 name fix_orders",
        "deny  algo -> dev1          log name algo_never_dev",  # `name` is written last
    ]
    assert format_policy(canonical) == canonical
    policy = _checked(canonical, floor)
    assert [(r.name, r.key, r.id, r.position) for r in policy.rules] == [
        ("fix_orders", "fix_orders", 1, 1),
        ("algo_never_dev", "algo_never_dev", 2, 2),
    ]
    nowhere = Span.point("policy.zt", 1, 1)
    unspanned = [dataclasses.replace(r, span=nowhere) for r in _checked(text, floor).rules]
    assert unspanned == [dataclasses.replace(r, span=nowhere) for r in policy.rules]


def test_name_is_a_word_only_after_a_rule(floor: Inventory) -> None:
    """A service or port set may be called `name`; after `tcp` the word is the option."""
    text = (
        "policy p\nservice name = oms1\nports name = 80, 443\n"
        "allow algo1 -> name tcp 22, name name ssh\n"
        "allow algo2 -> name tcp name web\n"
    )
    first, second = _checked(text, floor).rules
    assert first.name == "ssh" and first.ports == ((22, 22), (80, 80), (443, 443))
    assert second.name == "web" and second.ports == ((0, 65535),)


def test_duplicate_and_bad_rule_names(floor: Inventory) -> None:
    dup = "policy p\nallow algo1 -> oms1 tcp 1 name a\nallow algo2 -> oms1 tcp 2 name a\n"
    assert _codes(dup, floor) == [("E105", 3, 32, (2,))]
    hexname = "policy p\nallow algo1 -> oms1 tcp 1 name abcdef0123456789\n"
    assert [c[0] for c in _codes(hexname, floor)] == ["E106"]
    long = f"policy p\nallow algo1 -> oms1 tcp 1 name {'n' * 65}\n"
    assert [c[0] for c in _codes(long, floor)] == ["E106"]
    twice = "policy p\nallow algo1 -> oms1 tcp 1 name a name b\n"
    assert [c[0] for c in _codes(twice, floor)] == ["E209"]
    on_default = "policy p\nallow algo1 -> oms1 tcp 1\ndefault deny name d\n"
    assert [c[0] for c in _codes(on_default, floor)] == ["E207"]
    # 64 characters, and 16 hex digits with an upper-case letter, are fine names
    ok = (
        f"policy p\nallow algo1 -> oms1 tcp 1 name {'n' * 64}\nallow a -> b name Abcdef0123456789\n"
    )
    assert len(_checked(ok.replace("a -> b", "algo2 -> oms2"), floor).rules) == 2


def test_unnamed_keys_hash_the_normal_form_and_count_copies(floor: Inventory) -> None:
    text = (
        "policy p\nallow algo1 -> oms1 tcp 9876\nallow algo1  ->  oms1 tcp 9876\n"
        "allow algo1 -> oms1 tcp 9877\nallow algo1 -> oms1 tcp 9876\n"
    )
    keys = [r.key for r in _checked(text, floor).rules]
    base = text_key("allow algo1 -> oms1 tcp 9876")
    assert keys == [base, f"{base}#2", text_key("allow algo1 -> oms1 tcp 9877"), f"{base}#3"]


# -- the allocation -------------------------------------------------------------------------


def test_fresh_allocation_gives_file_positions(floor: Inventory, floor_policy: Policy) -> None:
    policy, allocation = assign_rule_ids(floor_policy, Allocation())
    assert [r.id for r in policy.rules] == list(range(1, len(policy.rules) + 1))
    assert [r.position for r in policy.rules] == [r.id for r in policy.rules]
    assert allocation.rules == {r.key: r.id for r in policy.rules}
    assert not allocation.retired_rules
    # the JSON round trip keeps it, and the same inputs give the same ids
    assert Allocation.from_json(allocation.to_json()) == allocation
    assert assign_rule_ids(floor_policy, allocation) == (policy, allocation)


def test_inserting_a_rule_changes_only_its_entries(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """issue 12: `allow dev -> dev tcp 22` above the first rule of the trading floor used to
    rewrite 999 entries on 6 ToRs; now only the new rule's entries appear, on tor-dev."""
    before, allocation = assign_rule_ids(floor_policy, Allocation())
    edited = _checked(_insert_above_first_rule(floor_policy_text, NEW_RULE), floor)
    assert edited.rules[0].describe() == NEW_RULE and edited.rules[0].position == 1
    after, _ = assign_rule_ids(edited, allocation)
    new_id = after.rules[0].id
    assert new_id == len(before.rules) + 1  # the lowest free id, not position 1
    assert {r.key: r.id for r in after.rules[1:]} == {r.key: r.id for r in before.rules}

    first = lower(before, floor)
    second = lower(after, floor, first.allocation)
    old = _policy_entries(first.switches)
    new = _policy_entries(second.switches)
    changed = {}
    for switch in old:
        gone = Counter(map(_without_groups, old[switch]))
        came = Counter(map(_without_groups, new[switch]))
        changed[switch] = (gone - came, came - gone)
    for switch, (removed, added) in changed.items():
        assert not removed, f"{switch} loses entries of other rules: {removed}"
        assert all(e[0] == new_id for e in added), f"{switch} changes other rules: {added}"
    assert {s for s, (_, added) in changed.items() if added} == {"tor-dev"}
    # The new rule's entries: its forward permit and the ACK replies, on tor-dev only.
    assert {e[2] for e in changed["tor-dev"][1]} == {"permit"}
    # With the tags of the first compile, everything else is the same, tags included:
    # identity tables too (`dev` was tagged on tor-dev already).
    for switch in old:
        if switch != "tor-dev":
            assert old[switch] == new[switch], switch
    changes = {
        a.switch: set(a.entries) ^ set(b.entries)
        for a, b in zip(first.switches, second.switches, strict=True)
        if a.entries != b.entries
    }
    assert set(changes) == {"tor-dev"}
    policy_changes = {e for e in changes["tor-dev"] if e.table == "policy"}
    assert {e.rule_id for e in policy_changes} == {new_id}
    # `dev` is now a destination of tor-dev's own hosts too, so its tag must hold on
    # every dev address, not only on tor-dev's: identities change inside 10.8.0.0/16 only.
    dev = (int(ip_address("10.8.0.0")), int(ip_address("10.8.255.255")))
    for e in changes["tor-dev"] - policy_changes:
        (addr,) = (m for m in e.matches if m.field == "dst_addr")
        assert e.table == "dst_identity" and dev[0] <= addr.value <= dev[1], e


def test_removed_rule_id_is_retired_until_settled(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    full, allocation = assign_rule_ids(floor_policy, Allocation())
    dropped = full.rules[2]  # allow order_router -> risk tcp 8443 rate 20000pps
    text = floor_policy_text.replace(
        "allow order_router -> risk         tcp 8443        rate 20000pps\n", ""
    )
    less, retiring = assign_rule_ids(_checked(text, floor), allocation)
    assert dropped.key not in retiring.rules and retiring.retired_rules == {dropped.id}
    assert [r.id for r in less.rules] == [r.id for r in full.rules if r.key != dropped.key]

    added = _checked(text.replace("default deny log", f"{NEW_RULE}\ndefault deny log"), floor)
    unsettled, still = assign_rule_ids(added, retiring)
    new = next(r for r in unsettled.rules if r.describe() == NEW_RULE)
    assert new.id == len(full.rules) + 1  # not the retired id: a switch may still hold it
    assert still.retired_rules == {dropped.id}

    settled, _ = assign_rule_ids(added, retiring.settled())
    assert next(r for r in settled.rules if r.describe() == NEW_RULE).id == dropped.id


def test_the_state_allocation_is_written_only_when_it_changed(
    tmp_path: Path, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """An operation that changes no rule id (a quarantine, a release) leaves allocation.json
    as it is; `settled()` of an allocation with nothing retired is itself."""
    from p4seg.allocations import STATE_FILE, save_state_allocation, state_allocation

    _full, allocation = assign_rule_ids(floor_policy, Allocation())
    assert allocation.settled() is allocation
    save_state_allocation(tmp_path, allocation)
    path = tmp_path / STATE_FILE
    before = path.stat()
    again = Allocation.from_json(allocation.to_json(), "again")  # equal, another object
    save_state_allocation(tmp_path, again)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    text = floor_policy_text.replace(
        "allow order_router -> risk         tcp 8443        rate 20000pps\n", ""
    )
    _less, retiring = assign_rule_ids(_checked(text, floor), allocation)
    save_state_allocation(tmp_path, retiring)  # a retired id: written
    assert path.stat().st_ino != before.st_ino and state_allocation(tmp_path) == retiring
    assert retiring.settled() != retiring and not retiring.settled().retired_rules


def test_a_named_rule_keeps_its_id_through_an_edit(floor: Inventory) -> None:
    v1 = "policy p\nallow algo1 -> oms1 tcp 9876 name fix\nallow algo2 -> oms2 tcp 9876\n"
    v2 = "policy p\nallow algo2 -> oms2 tcp 9876\nallow algo1 -> oms1 tcp 9876, 9877 name fix\n"
    _first, allocation = assign_rule_ids(_checked(v1, floor), Allocation())
    second, after = assign_rule_ids(_checked(v2, floor), allocation)
    assert [(r.name, r.id) for r in second.rules] == [(None, 2), ("fix", 1)]
    assert after == allocation
    # unnamed, the same edit is a new rule: a new id, and the old one retired
    third, retired = assign_rule_ids(_checked(v2.replace(" name fix", ""), floor), allocation)
    assert [r.id for r in third.rules] == [2, 3] and retired.retired_rules == {1}


def test_no_free_rule_id_is_E504(floor: Inventory) -> None:
    policy = _checked("policy p\nallow algo1 -> oms1 tcp 1\nallow algo2 -> oms1 tcp 2\n", floor)
    held = Allocation({policy.rules[0].key: 1}, frozenset(range(2, MAX_RULE_ID + 1)))
    with pytest.raises(RuleIdsExhausted) as err:
        assign_rule_ids(policy, held)
    (diag,) = err.value.diagnostics
    assert diag.code == "E504" and diag.span == policy.rules[1].span
    assert "line 3" in diag.message


# -- deciding rule and priorities -----------------------------------------------------------


def test_the_lowest_id_decides_in_semantics_and_tables(floor: Inventory) -> None:
    """Two overlapping denies and two overlapping allows, with ids against file order: the
    semantics and the compiled tables credit the same (lowest-id) rule, and verify holds."""
    text = (
        "policy p\nallow algo1 -> oms1 tcp 9876\nallow algo1 -> oms1 tcp 9870-9880\n"
        "deny dev1 -> oms1 log\ndeny dev1 -> oms1 tcp 22 log\ndefault deny log\n"
    )
    checked = _checked(text, floor)
    reversed_ids = Allocation({r.key: 10 - r.position for r in checked.rules})
    policy, _ = assign_rule_ids(checked, reversed_ids)
    assert [r.id for r in policy.rules] == [9, 8, 7, 6]
    sem = PolicySemantics(policy)
    tables = {sw.switch: sw for sw in lower(policy, floor).switches}
    fabric = Fabric(tables, floor)
    hosts = floor.hosts_by_name
    for src, dst, port, want in (("algo1", "oms1", 9876, 8), ("dev1", "oms1", 22, 6)):
        trace = trace_flow(fabric, sem, hosts[src], hosts[dst], "tcp", port)
        leg = trace.legs[0]
        assert leg.policy is not None and leg.policy.rule is not None
        assert leg.policy.rule.id == want
        assert leg.path.deciding.rule_id == want
    # the dead-rule analysis keeps the lowest id: the copy with the higher id is reported
    dup = _checked("policy p\nallow algo1 -> oms1 tcp 1\nallow algo1 -> oms1 tcp 1\n", floor)
    swapped, _ = assign_rule_ids(dup, Allocation({r.key: 3 - r.position for r in dup.rules}))
    (dead,) = PolicySemantics(swapped).dead_rules()
    assert dead.rule.position == 1 and dead.covering[0].position == 2
    result = verify(policy, floor, tables)
    assert not result.counterexamples


def test_priorities_follow_rule_ids_and_are_unique_per_rule(
    floor: Inventory, floor_policy: Policy
) -> None:
    policy, _ = assign_rule_ids(floor_policy, Allocation())
    for sw in lower(policy, floor).switches:
        rules_at: dict[int, set[int | None]] = defaultdict(set)
        for e in sw.entries:
            if e.table == "policy":
                assert 0 < e.priority < 1 << 31  # P4Runtime: int32 > 0
                rules_at[e.priority].add(e.rule_id)
        # one rule per priority: within a band, no two rules share a slot
        assert all(len(ids) == 1 for ids in rules_at.values()), sw.switch
        default = [p for p, ids in rules_at.items() if ids == {0}]
        assert all(p >> 28 == BAND_DEFAULT for p in default)


def test_metered_rules_lowest_rate_first_then_lowest_id(floor: Inventory) -> None:
    text = (
        "policy p\nallow oms1 -> risk1 tcp 8443 rate 50kpps\n"
        "allow oms1 -> risk1 tcp 8443 rate 20000pps\nallow oms1 -> risk1 tcp 8000-9000 rate 20kpps\n"
    )
    policy, _ = assign_rule_ids(_checked(text, floor), Allocation())
    (tor,) = (sw for sw in lower(policy, floor).switches if sw.switch == "tor-rsk")
    prio = {e.rule_id: e.priority for e in tor.entries if e.action == "permit_metered"}
    assert prio[2] > prio[3] > prio[1]  # 20 kpps (id 2, then id 3) before 50 kpps


def test_quarantine_rules_get_keys_of_their_own(floor: Inventory) -> None:
    from runtime.live import LiveState, effective_policy

    text = (
        "policy p\nservice remediation = jump1\nservice algo = algo1, algo2\n"
        "allow algo -> remediation tcp 22\nallow remediation -> algo tcp 22\n"
    )
    state = LiveState()
    state.quarantined["algo1"] = 0.0
    hosts = {h.name: h.ip for h in floor.hosts}
    policy = effective_policy(_checked(text, floor), state, 0.0, hosts)
    keys = [r.key for r in policy.rules]
    assert len(policy.rules) == 4 and len(set(keys)) == 4
    ids, _ = assign_rule_ids(policy, Allocation())
    assert sorted(r.id for r in ids.rules) == [1, 2, 3, 4]


# -- the command line -----------------------------------------------------------------------


def _p4seg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "p4seg", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def _compile(policy: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _p4seg(
        "compile", str(policy), "-i", str(FLOOR_INVENTORY), "-o", str(out), *extra, cwd=ROOT
    )


def _report_ids(out: Path) -> dict[str, int]:
    report = json.loads((out / "report.json").read_text())
    return {r["text"]: r["id"] for r in report["rules"] if r["id"]}


def test_compile_twice_into_one_directory_keeps_rule_ids(tmp_path: Path) -> None:
    out = tmp_path / "build"
    assert _compile(FLOOR_POLICY, out).returncode == 0
    first = _report_ids(out)
    assert sorted(first.values()) == list(range(1, len(first) + 1))
    manifest = json.loads((out / "p4seg-build.json").read_text())
    assert "allocation.json" in manifest["files"]
    edited = tmp_path / "edited.zt"
    edited.write_text(_insert_above_first_rule(FLOOR_POLICY.read_text(), NEW_RULE))
    result = _compile(edited, out)
    assert result.returncode == 0, result.stderr
    second = _report_ids(out)
    assert {k: v for k, v in second.items() if k != NEW_RULE} == first
    assert second[NEW_RULE] == len(first) + 1
    # into a new directory, without the allocation, ids are positions again
    fresh = tmp_path / "fresh"
    assert _compile(edited, fresh).returncode == 0
    assert _report_ids(fresh)[NEW_RULE] == 1
    # --allocation FILE starts from a given allocation
    given = tmp_path / "given"
    assert _compile(edited, given, "--allocation", str(out / "allocation.json")).returncode == 0
    assert _report_ids(given) == second


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "allocation.json:1:2:"),
        ('{"format": "p4seg-allocation/1", "rules": {"a": 0}}', "expected an integer in 1..65534"),
        ('{"format": "something else"}', "not a p4seg allocation"),
    ],
)
def test_a_bad_allocation_is_an_error_and_nothing_is_written(
    tmp_path: Path, content: str, message: str
) -> None:
    bad = tmp_path / "allocation.json"
    bad.write_text(content)
    out = tmp_path / "out"
    result = _compile(FLOOR_POLICY, out, "--allocation", str(bad))
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert "nothing written" in result.stderr and not out.exists()
    # the same file inside an earlier build: refused, and the build is left as it was
    assert _compile(FLOOR_POLICY, out).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "allocation.json").write_text(content)
    before[out / "allocation.json"] = content.encode()
    result = _compile(FLOOR_POLICY, out)
    assert result.returncode == 1 and message in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_controller_keeps_the_allocation_and_settles_it_when_every_switch_took_it(
    tmp_path: Path, floor: Inventory, floor_policy: Policy
) -> None:
    from p4seg.allocations import state_allocation
    from p4seg.control import Compiled, _record_allocation
    from runtime.controller import SwitchReport

    policy, allocation = assign_rule_ids(floor_policy, Allocation({"gone": 40}))
    assert allocation.retired_rules == {40}
    compiled = Compiled(None, tmp_path, floor, policy, "", allocation)  # type: ignore[arg-type]
    names = [s.name for s in floor.switches]
    partial = [SwitchReport(n, "", error="unreachable" if n == "tor-md" else None) for n in names]
    _record_allocation(tmp_path, compiled, partial)
    assert state_allocation(tmp_path) == allocation  # tor-md may still hold id 40
    _record_allocation(tmp_path, compiled, [SwitchReport(n, "") for n in names[1:]])
    assert state_allocation(tmp_path) == allocation  # tor-md was not applied to at all
    _record_allocation(tmp_path, compiled, [SwitchReport(n, "") for n in names])
    assert state_allocation(tmp_path) == dataclasses.replace(allocation, retired_rules=frozenset())


def test_a_new_rate_moves_only_lower_rates_and_too_many_rates_is_E504(floor: Inventory) -> None:
    from compiler.rule_entries import MAX_DISTINCT_RATES, LowerError, rate_ranks

    base = _checked("policy p\nallow oms1 -> risk1 tcp 8443 rate 10pps\n", floor)
    rule = base.rules[0]

    def with_rates(*rates: int) -> Policy:
        rules = [dataclasses.replace(rule, rate_pps=r, id=i) for i, r in enumerate(rates, 1)]
        return dataclasses.replace(base, rules=tuple(rules))

    before = rate_ranks(with_rates(10, 30).rules)
    after = rate_ranks(with_rates(10, 30, 20).rules)
    assert after[30] == before[30] and after[10] == before[10] + 1  # 20 joins below 30 only
    assert rate_ranks(with_rates(*range(1, MAX_DISTINCT_RATES + 1)).rules)[1] == MAX_DISTINCT_RATES
    with pytest.raises(LowerError) as err:
        rate_ranks(with_rates(*range(1, MAX_DISTINCT_RATES + 2)).rules)
    assert [d.code for d in err.value.diagnostics] == ["E504"]


@pytest.fixture
def floor_site(
    tmp_path: Path, floor: Inventory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[str]]:
    """The trading floor's switches as reference switches on loopback; its inventory file
    pointing at them (the command line's `-i` argument)."""
    from runtime.refswitch.switch import ReferenceSwitch

    started: list[ReferenceSwitch] = []
    text = FLOOR_INVENTORY.read_text()
    try:
        for s in floor.switches:
            sw = ReferenceSwitch(s.device_id)
            started.append(sw)
            port = sw.start("127.0.0.1:0")
            text = text.replace(f'p4rt: "{s.p4rt}"', f'p4rt: "127.0.0.1:{port}"')
        inventory = tmp_path / "floor.yaml"
        inventory.write_text(text)
        monkeypatch.chdir(tmp_path)
        yield ["-i", str(inventory), "--state", str(tmp_path / "state")]
    finally:
        for sw in started:
            sw.stop()


def test_apply_of_an_inserted_rule_writes_nothing_where_no_dev_host_is(
    floor_site: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """issue 12's example end to end: after `apply`, inserting `allow dev -> dev tcp 22` at
    the top writes nothing on the five ToRs (and two spines) that host no dev machine."""
    from p4seg.allocations import state_allocation
    from p4seg.cli import main

    policy = tmp_path / "floor.zt"
    policy.write_text(FLOOR_POLICY.read_text())
    assert main(["apply", str(policy), *floor_site]) == 0
    first = state_allocation(tmp_path / "state")
    assert sorted(first.rules.values()) == list(range(1, len(first.rules) + 1))
    policy.write_text(_insert_above_first_rule(FLOOR_POLICY.read_text(), NEW_RULE))
    capsys.readouterr()
    assert main(["apply", str(policy), *floor_site, "--output", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    written = {s["switch"]: s["written"] for s in doc["switches"]}
    assert set(written) == {"tor-md", "tor-alg", "tor-oms", "tor-rsk", "tor-stl", "tor-dev",
                            "spine1", "spine2"}  # fmt: skip
    assert {s for s, n in written.items() if n} == {"tor-dev"}, written
    second = state_allocation(tmp_path / "state")
    assert {k: v for k, v in second.rules.items() if k in first.rules} == first.rules
    assert set(second.rules.values()) - set(first.rules.values()) == {len(first.rules) + 1}


def test_the_rule_lines_each_switch_holds_are_kept_once_per_build(tmp_path: Path) -> None:
    """applied-rules.json labels the entries a later plan removes: per switch, the rule
    lines of the build it holds. The switches of one apply share their lines, and the file
    holds each distinct set once; a record in the earlier layout (a copy per switch) reads."""
    from p4seg.control import APPLIED_RULES, applied_rules, record_applied
    from runtime.controller import SwitchReport

    old = {0: "line 9: default deny", 1: "line 3: allow a -> b tcp 1"}
    new = {**old, 2: "line 4: allow a -> c tcp 2"}
    record_applied(tmp_path, [SwitchReport(f"tor{i}", "") for i in range(40)], old)
    record_applied(tmp_path, [SwitchReport("tor1", ""), SwitchReport("tor7", "")], new)
    held = applied_rules(tmp_path)
    assert held["tor1"] == held["tor7"] == new and held["tor2"] == held["tor39"] == old
    doc = json.loads((tmp_path / APPLIED_RULES).read_text())
    assert sorted(map(len, doc["lines"].values())) == [2, 3]  # each set once, not 40 copies
    from p4seg import control

    control._RULES_READ.clear()  # as a new process reads it
    assert applied_rules(tmp_path) == held
    (tmp_path / APPLIED_RULES).write_text(json.dumps({"tor1": {"1": "line 3: x"}}))
    assert applied_rules(tmp_path) == {"tor1": {1: "line 3: x"}}
