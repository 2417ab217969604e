"""Language extensions: named port sets, `except`, weekdays in time windows, ICMP types and
IP protocol numbers — parsed, formatted, resolved, judged, compiled and proven.

The fixture tests/fixtures/language_ext.zt uses every construct; it must be canonical, check
clean (its expectations hold), compile for every target and be proven by `verify`, and
corrupting what the new constructs compile to must be caught. The semantics of ICMP types
and protocol numbers is checked against a direct reading of the rules (an oracle, as in
tests/test_semantics_oracle.py), and time windows against minute-by-minute evaluation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import grpc
import pytest
from finsy.proto import rpc_code
from hypothesis import given, settings
from hypothesis import strategies as st
from p4rt import Session, clone_session_update, default_updates, inserts, pipeline_config
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Packet as Frame
from test_properties import PROPERTY, assert_fmt_properties

from compiler.addresses import AddressSet, parse_prefix
from compiler.check import check_policy
from compiler.diagnostics import Diagnostic, Span
from compiler.emit import build
from compiler.entries import SwitchTables, TableEntry
from compiler.fmt import format_policy
from compiler.inventory import Inventory
from compiler.model import (
    ALL_PORTS,
    EVERY_DAY,
    Action,
    Policy,
    PolicyRule,
    TimeWindow,
    protocol_number,
)
from compiler.parse import parse
from compiler.semantics import PolicySemantics, protocol_classes, protocol_of
from compiler.trace import run_expects
from compiler.verify import verify
from p4src.spec import CPU_CLONE_SESSION
from runtime.live import LiveState, effective_policy, next_change
from runtime.refswitch.switch import ReferenceSwitch

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "language_ext.zt"
HEADER = "policy demo\n"


def _check(text: str, floor: Inventory) -> tuple[Policy | None, list[Diagnostic]]:
    result = check_policy(HEADER + text, "p.zt", floor)
    return result.policy, list(result.diagnostics)


def _policy(text: str, floor: Inventory) -> Policy:
    policy, diags = _check(text, floor)
    assert policy is not None, [d.message for d in diags]
    return policy


def _errors(text: str, floor: Inventory) -> list[tuple[str, str]]:
    _, diags = _check(text, floor)
    return [(d.code, d.message) for d in diags if d.is_error]


# -- the fixture: canonical, clean, compiled and proven -------------------------------------


@pytest.fixture(scope="module")
def fixture_policy(floor: Inventory) -> tuple[str, Policy]:
    text = FIXTURE.read_text()
    result = check_policy(text, "tests/fixtures/language_ext.zt", floor)
    assert result.policy is not None and not result.diagnostics, result.diagnostics
    return text, result.policy


def test_the_fixture_is_canonical(fixture_policy: tuple[str, Policy]) -> None:
    text, _ = fixture_policy
    assert format_policy(text) == text
    assert_fmt_properties(text, text)


@pytest.mark.parametrize("target", ["ref", "bmv2", "tofino"])
def test_the_fixture_compiles_and_is_proven(
    target: str, floor: Inventory, fixture_policy: tuple[str, Policy]
) -> None:
    text, policy = fixture_policy
    switches = {s.switch: s for s in build(policy, floor, text, target).switches}
    result = verify(policy, floor, switches)
    assert result.proven, "\n".join(c.describe() for c in result.counterexamples[:5])
    assert result.by_rules is not None and result.by_rules.left is None
    exact = verify(policy, floor, switches, exact=True)
    assert exact.proven and exact.classes > 10_000
    failed = [r.expect.describe() for r in run_expects(policy, floor, switches) if not r.ok]
    assert failed == []


def _rule_id(policy: Policy, text: str) -> int:
    return next(r.id for r in policy.rules if text in r.describe())


def _corrupt(
    switches: dict[str, SwitchTables],
    pick: Callable[[TableEntry], bool],
    change: Callable[[TableEntry], TableEntry | None],
) -> dict[str, SwitchTables]:
    """Every switch with `change` applied to the entries `pick` selects (None: removed)."""
    out, touched = {}, 0
    for name, sw in switches.items():
        entries = []
        for e in sw.entries:
            new = change(e) if pick(e) else e
            touched += pick(e)
            if new is not None:
                entries.append(new)
        out[name] = dataclasses.replace(sw, entries=tuple(entries))
    assert touched, "the corruption must touch an entry"
    return out


def _caught(policy: Policy, floor: Inventory, switches: dict[str, SwitchTables]) -> set[str]:
    result = verify(policy, floor, switches)
    assert not result.proven
    return {c.kind for c in result.counterexamples}


@pytest.fixture(scope="module")
def fixture_tables(floor: Inventory, fixture_policy: tuple[str, Policy]) -> dict[str, SwitchTables]:
    text, policy = fixture_policy
    return {s.switch: s for s in build(policy, floor, text, "ref").switches}


def test_an_icmp_type_left_unmatched_is_caught(
    floor: Inventory, fixture_policy: tuple[str, Policy], fixture_tables: dict[str, SwitchTables]
) -> None:
    _, policy = fixture_policy
    rule = _rule_id(policy, "icmp frag-needed")
    bad = _corrupt(
        fixture_tables,
        lambda e: e.rule_id == rule and e.role == "forward",
        lambda e: dataclasses.replace(
            e, matches=tuple(m for m in e.matches if m.field != "l4_dst_port")
        ),
    )
    assert "allowed-by-tables" in _caught(policy, floor, bad)


def test_a_wrong_protocol_number_is_caught(
    floor: Inventory, fixture_policy: tuple[str, Policy], fixture_tables: dict[str, SwitchTables]
) -> None:
    _, policy = fixture_policy
    rule = _rule_id(policy, "allow order_router -> risk proto 132")

    def to_133(e: TableEntry) -> TableEntry:
        matches = tuple(
            dataclasses.replace(m, value=133) if m.field == "protocol" else m for m in e.matches
        )
        return dataclasses.replace(e, matches=matches)

    bad = _corrupt(fixture_tables, lambda e: e.rule_id == rule, to_133)
    assert {"allowed-by-tables", "denied-by-tables"} <= _caught(policy, floor, bad)


def test_a_missing_echo_reply_is_caught(
    floor: Inventory, fixture_policy: tuple[str, Policy], fixture_tables: dict[str, SwitchTables]
) -> None:
    _, policy = fixture_policy
    rule = _rule_id(policy, "allow ops_jump -> prod icmp echo-request")
    bad = _corrupt(
        fixture_tables, lambda e: e.rule_id == rule and e.role == "reply", lambda e: None
    )
    assert "denied-by-tables" in _caught(policy, floor, bad)


def test_what_the_new_constructs_compile_to(
    fixture_policy: tuple[str, Policy], fixture_tables: dict[str, SwitchTables]
) -> None:
    _, policy = fixture_policy
    entries = [e for sw in fixture_tables.values() for e in sw.entries if e.table == "policy"]

    def matches(rule: int, role: str) -> set[tuple[str, str, int, int]]:
        return {
            (m.field, m.kind, m.value, m.arg)
            for e in entries
            if e.rule_id == rule and e.role == role
            for m in e.matches
            if m.field in ("protocol", "l4_dst_port", "l4_src_port")
        }

    sctp = _rule_id(policy, "allow order_router -> risk proto 132")
    assert matches(sctp, "forward") == {("protocol", "ternary", 132, 0xFF)}
    assert matches(sctp, "reply") == set()  # no reply shape for other protocols
    frag = _rule_id(policy, "icmp frag-needed")
    assert matches(frag, "forward") == {
        ("protocol", "ternary", 1, 0xFF),
        ("l4_dst_port", "range", 0x0304, 0x0304),
    }
    assert matches(frag, "reply") == set()  # not an echo request: nothing answers it
    ping = _rule_id(policy, "allow ops_jump -> prod icmp echo-request")
    assert ("l4_dst_port", "range", 0x0800, 0x08FF) in matches(ping, "forward")
    assert ("l4_dst_port", "range", 0x0000, 0x00FF) in matches(ping, "reply")


def test_real_packets_through_the_reference_switch(
    floor: Inventory, fixture_policy: tuple[str, Policy], fixture_tables: dict[str, SwitchTables]
) -> None:
    """tor-oms over P4Runtime, then frames from oms1 to risk1: ICMP types and codes, and IP
    protocols, forwarded exactly when the semantics allows them."""
    _, policy = fixture_policy
    tables = fixture_tables["tor-oms"]
    sw = ReferenceSwitch(tables.device_id)
    addr = f"127.0.0.1:{sw.start('127.0.0.1:0')}"
    s = Session(addr, device_id=tables.device_id, election_id=10)
    try:
        assert s.arbitration_status() == rpc_code.OK
        s.set_pipeline(pipeline_config())
        updates = [
            *default_updates(tables.defaults),
            *inserts(tables.entries),
            clone_session_update(CPU_CLONE_SESSION, sw.device.cpu_port),
        ]
        assert s.write(updates).code == grpc.StatusCode.OK
        hosts = {h.name: h for h in floor.hosts}
        oms1, risk1 = hosts["oms1"], hosts["risk1"]
        sem = PolicySemantics(policy)
        probes: list[Frame] = [
            ICMP(type=t, code=c) for t, c in ((3, 4), (3, 3), (8, 0), (11, 0), (0, 0))
        ]
        probes += [IP(proto=n) / (b"\x00" * 16) for n in (132, 133, 112, 47)]
        probes.append(TCP(sport=40000, dport=9880, flags="S"))
        verdicts = []
        for l4 in probes:
            ip = IP(src=oms1.ip_text, dst=risk1.ip_text) / l4
            if isinstance(l4, IP):  # a bare protocol number: the payload after the IP header
                ip = IP(src=oms1.ip_text, dst=risk1.ip_text, proto=l4.proto) / bytes(l4.payload)
            frame = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip)
            out = sw.inject(oms1.port, frame)
            icmp = ip.getlayer(ICMP)
            want = sem.decide(
                oms1.ip, risk1.ip, ip.proto,
                dport=ip.dport if ip.proto == 6 else 0,
                icmp_type=icmp.type if icmp else 8, icmp_code=icmp.code if icmp else 0,
            ).allowed  # fmt: skip
            assert bool(out) == want, (ip.summary(), out)
            assert all(payload == frame for _, payload in out)
            verdicts.append(want)
        # frag-needed passes, port-unreachable does not; SCTP passes, 133 does not
        assert verdicts[:2] == [True, False] and verdicts[5:7] == [True, False]
    finally:
        s.close()
        sw.stop()


# -- each construct, resolved --------------------------------------------------------------


def test_the_issue_line_parses_and_means_trading_days(floor: Inventory) -> None:
    policy = _policy(
        "allow jump1 -> oms1 tcp 22 during 06:00-20:00 Mon-Fri America/New_York", floor
    )
    window = policy.rules[0].window
    assert window == TimeWindow(360, 1200, "America/New_York", frozenset(range(5)))
    assert str(window) == "06:00-20:00 Mon-Fri America/New_York"


@pytest.mark.parametrize(
    ("days", "expected", "shown"),
    [
        ("Mon,Wed,Fri", {0, 2, 4}, "Mon,Wed,Fri"),
        ("Sat-Sun", {5, 6}, "Sat-Sun"),
        ("Fri-Mon", {4, 5, 6, 0}, "Fri-Mon"),
        ("Mon-Wed,Sat", {0, 1, 2, 5}, "Mon-Wed,Sat"),
        ("Mon-Sun", set(range(7)), ""),
        ("Tue,Mon-Wed", {0, 1, 2}, "Mon-Wed"),
    ],
)
def test_day_lists_and_wrapping_ranges(
    days: str, expected: set[int], shown: str, floor: Inventory
) -> None:
    rule = _policy(f"allow jump1 -> oms1 tcp 22 during 09:30-16:00 {days} UTC", floor).rules[0]
    assert rule.window is not None and rule.window.days == frozenset(expected)
    assert str(rule.window) == f"09:30-16:00 {shown + ' ' if shown else ''}UTC"


def test_day_names_are_names_elsewhere(floor: Inventory) -> None:
    """`Mon` is a day only after a window's times: elsewhere it is a name like any other."""
    policy = _policy("service Mon = 10.0.9.0/24\nallow Mon -> oms1 tcp 22", floor)
    assert policy.rules[0].src_text == "Mon"


def _utc(year: int, month: int, day: int, hour: int, minute: int) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC).timestamp()


def test_a_window_over_midnight_belongs_to_the_day_it_starts() -> None:
    window = TimeWindow(22 * 60, 2 * 60, "UTC", frozenset({4}))  # Fri 22:00 to Sat 02:00
    # 2026-11-27 is a Friday.
    assert window.active_at(_utc(2026, 11, 27, 23, 0))
    assert window.active_at(_utc(2026, 11, 28, 1, 59))
    assert not window.active_at(_utc(2026, 11, 28, 2, 0))
    assert not window.active_at(_utc(2026, 11, 28, 23, 0))  # Saturday's evening
    assert not window.active_at(_utc(2026, 11, 27, 1, 0))  # Friday's early hours: Thursday's
    assert window.next_edge(_utc(2026, 11, 25, 12, 0)) == _utc(2026, 11, 27, 22, 0)
    assert window.next_edge(_utc(2026, 11, 27, 22, 0)) == _utc(2026, 11, 28, 2, 0)


def test_windows_follow_the_zone_across_dst() -> None:
    window = TimeWindow(6 * 60, 20 * 60, "America/New_York", frozenset(range(5)))
    # Monday 2026-03-09, the day after clocks go forward: 06:00 EDT is 10:00 UTC.
    assert not window.active_at(_utc(2026, 3, 9, 9, 59))
    assert window.active_at(_utc(2026, 3, 9, 10, 0))
    # Friday 2026-03-06 (still EST): 20:00 EST is 01:00 UTC on Saturday.
    assert window.next_edge(_utc(2026, 3, 6, 20, 0)) == _utc(2026, 3, 7, 1, 0)
    # Then nothing until Monday 06:00 EDT.
    assert window.next_edge(_utc(2026, 3, 7, 1, 0)) == _utc(2026, 3, 9, 10, 0)


ZONES = ["UTC", "America/New_York", "Europe/London", "Asia/Tokyo", "Australia/Sydney"]
windows = st.builds(
    TimeWindow,
    st.integers(0, 1439),
    st.integers(0, 1439),
    st.sampled_from(ZONES),
    st.frozensets(st.integers(0, 6), min_size=1),
).filter(lambda w: w.start != w.end)


def _by_minutes(window: TimeWindow, when: dt.datetime) -> bool:
    """The window read directly: which day's window (if any) covers this wall-clock time."""
    for back in (0, 1):
        day = when.date() - dt.timedelta(days=back)
        if day.weekday() not in window.days:
            continue
        start = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=window.start)
        length = (window.end - window.start) % 1440
        naive = when.replace(tzinfo=None)
        if start <= naive < start + dt.timedelta(minutes=length):
            return True
    return False


@settings(max_examples=150, deadline=None)
@given(windows, st.integers(1_700_000_000, 1_900_000_000))
def test_windows_against_wall_clock_reading(window: TimeWindow, t: int) -> None:
    local = dt.datetime.fromtimestamp(t, ZoneInfo(window.zone))
    assert window.active_at(t) == _by_minutes(window, local)
    edge = window.next_edge(t)
    assert edge is not None and edge > t
    assert window.active_at(edge) != window.active_at(t)
    # Constant until the edge: every minute boundary in between answers as `t` does.
    first = t - t % 60 + 60
    for m in range(first, int(edge), 60 * 7):
        assert window.active_at(m) == window.active_at(t), m
    assert window.active_at(edge - 1) == window.active_at(t)


def test_live_operations_honour_the_days(floor: Inventory) -> None:
    text = "allow jump1 -> oms1 tcp 22 during 06:00-20:00 Mon-Fri America/New_York"
    policy = _policy(text, floor)
    hosts = {h.name: h.ip for h in floor.hosts}
    saturday_noon = _utc(2026, 11, 28, 17, 0)
    cut = effective_policy(policy, LiveState(), saturday_noon, hosts)
    assert not cut.rules[0].src and not cut.rules[0].dst
    monday_morning = _utc(2026, 11, 30, 11, 0)  # 06:00 EST
    assert next_change(policy, LiveState(), saturday_noon) == monday_morning
    kept = effective_policy(policy, LiveState(), monday_morning, hosts)
    assert kept.rules[0] == policy.rules[0]


def test_except_binds_loosest(floor: Inventory) -> None:
    policy = _policy(
        "service s = 10.0.0.0/24, 10.0.1.0/24 except 10.0.0.0/25, 10.0.1.128/25\n"
        "allow s except 10.0.0.200 -> any except dev tcp 22\n"
        "service dev = 10.8.0.0/16",
        floor,
    )
    s = next(x for x in policy.services if x.name == "s").addresses
    assert s == AddressSet.of([parse_prefix("10.0.0.128/25"), parse_prefix("10.0.1.0/25")])
    rule = policy.rules[0]
    assert rule.src == s.difference(AddressSet.of([parse_prefix("10.0.0.200")]))
    assert rule.dst == AddressSet.everything().difference(
        AddressSet.of([parse_prefix("10.8.0.0/16")])
    )
    assert rule.describe() == "allow s except 10.0.0.200 -> any except dev tcp 22"


def test_except_names_count_as_uses_and_cycles(floor: Inventory) -> None:
    _, diags = _check("service a = oms1\nservice b = any except a\nallow b -> oms1 tcp 1", floor)
    assert diags == []
    errors = _errors("service a = oms1 except b\nservice b = a\nallow a -> oms1 tcp 1", floor)
    assert [c for c, _ in errors] == ["E103"]


def test_port_sets(floor: Inventory) -> None:
    policy = _policy(
        "ports fix = 9876, 9880-9889\nports web = 443\nallow algo1 -> oms1 tcp fix, web, 80", floor
    )
    assert policy.rules[0].ports == ((80, 80), (443, 443), (9876, 9876), (9880, 9889))
    errors = _errors("ports fix = 9876\nallow algo1 -> oms1 tcp fxi", floor)
    assert errors == [("E101", "unknown port set 'fxi' (did you mean 'fix'?)")]
    errors = _errors("ports fix = 9876\nports fix = 9877\nallow algo1 -> oms1 udp fix", floor)
    assert [c for c, _ in errors] == ["E102"]
    errors = _errors(
        "ports bad = 70000, 9-8\nallow algo1 -> oms1 tcp bad\nallow oms2 -> oms1 tcp bad", floor
    )
    assert [c for c, _ in errors] == ["E202", "E203"]  # once, where the set is defined
    assert [c for c, _ in _errors("ports unused = 70000", floor)] == ["E202"]
    # a misspelt option after the protocol now reads as a port set: the hint says so
    assert _errors("allow algo1 -> oms1 tcp lgo", floor) == [
        ("E101", "unknown port set 'lgo' (did you mean the option `log`?)")
    ]
    _, diags = _check("ports idle = 1\nallow algo1 -> oms1 tcp 9876", floor)
    assert [(d.code, d.message) for d in diags] == [
        ("W003", "port set 'idle' is never used by a rule")
    ]


def test_icmp_types(floor: Inventory) -> None:
    policy = _policy(
        "allow jump1 -> oms1 icmp echo-request, type 3 code 4, type 11\n"
        "allow jump1 -> oms2 icmp port-unreachable",
        floor,
    )
    assert policy.rules[0].ports == ((0x0304, 0x0304), (0x0800, 0x08FF), (0x0B00, 0x0BFF))
    assert policy.rules[0].answers_pings and not policy.rules[1].answers_pings
    assert policy.rules[1].ports == ((0x0303, 0x0303),)
    assert policy.rules[0].describe() == (
        "allow jump1 -> oms1 icmp frag-needed, echo-request, time-exceeded"
    )
    assert _errors("allow jump1 -> oms1 icmp echo-requst", floor) == [
        ("E211", "unknown ICMP type 'echo-requst' (did you mean 'echo-request'?)")
    ]
    codes = [c for c, _ in _errors("allow jump1 -> oms1 icmp type 256, type 3 code 300", floor)]
    assert codes == ["E211", "E211"]
    assert [c for c, _ in _errors("allow jump1 -> oms1 tcp type 8", floor)] == ["E208"]
    assert [c for c, _ in _errors("allow jump1 -> oms1 icmp 8", floor)] == ["E208"]


def test_protocol_numbers(floor: Inventory) -> None:
    policy = _policy("allow oms1 -> risk1 proto 132\nexpect oms1 -> risk1 proto 132 allowed", floor)
    rule = policy.rules[0]
    assert (rule.proto, rule.ports, protocol_number(rule.proto)) == ("proto 132", ALL_PORTS, 132)
    assert rule.describe() == "allow oms1 -> risk1 proto 132"
    assert _errors("allow oms1 -> risk1 proto 6", floor) == [
        ("E210", "IP protocol 6 is tcp: write `tcp` (with its ports, if any)")
    ]
    assert [c for c, _ in _errors("allow oms1 -> risk1 proto 256", floor)] == ["E210"]
    assert [c for c, _ in _errors("expect oms1 -> risk1 proto 17 allowed", floor)] == ["E210"]


def test_protocol_classes_enumerate_what_policies_name(floor: Inventory) -> None:
    a = _policy("allow oms1 -> risk1 proto 132", floor)
    b = _policy("allow oms1 -> risk1 proto 47\nallow oms1 -> risk1 proto 112", floor)
    assert protocol_classes(a) == ("tcp", "udp", "icmp", "proto 132", "other")
    classes = protocol_classes(a, b)
    assert classes == ("tcp", "udp", "icmp", "proto 47", "proto 112", "proto 132", "other")
    assert [protocol_of(c, classes) for c in classes] == [6, 17, 1, 47, 112, 132, 0]
    assert protocol_of("other") == 47
    hosts = {h.name: h.ip for h in floor.hosts}
    sem = PolicySemantics(a)
    # a class another policy names maps to this policy's own classes
    assert sem.proto_class("proto 47") == "other" and sem.proto_class(132) == "proto 132"
    assert sem.flow(hosts["oms1"], hosts["risk1"], "proto 132").allowed
    assert not sem.flow(hosts["oms1"], hosts["risk1"], "other").allowed
    assert not sem.flow(hosts["oms1"], hosts["risk1"], "proto 47").allowed
    with pytest.raises(ValueError):
        sem.proto_class("sctp")


# -- the semantics of ICMP types and protocol numbers, against an oracle ----------------------

SPAN = Span("oracle.zt", 1, 1, 1, 2)
PREFIXES = ["10.0.0.0/24", "10.0.0.0/28", "10.0.0.5", "10.0.1.0/24", "0.0.0.0/0"]
ADDRESSES = [parse_prefix(p)[0] + k for p in ("10.0.0.0", "10.0.1.0") for k in (0, 5, 9)]
NUMBERS = [6, 1, 1, 1, 17, 47, 132, 50]  # ICMP most: types and replies are the new part
ICMP_TYPES = [(0, 0), (0, 3), (0, 0), (3, 4), (3, 0), (8, 0), (8, 9), (11, 0), (11, 1), (200, 200)]
PORTS = [0, 22, 80, 443, 49152]
addr_sets = st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=2).map(
    lambda ps: AddressSet.of(parse_prefix(p) for p in ps)
)
icmp_sets = st.one_of(
    st.just(ALL_PORTS),
    st.lists(
        st.sampled_from([(0x0000, 0x00FF), (0x0800, 0x08FF), (0x0304, 0x0304), (0x0800, 0x0800),
                         (0x0300, 0x03FF), (0x0B01, 0x0B01), (0x0000, 0x0000)]),
        min_size=1, max_size=3,
    ).map(lambda ivs: tuple(sorted(set(ivs)))),
)  # fmt: skip
tcp_sets = st.one_of(st.just(ALL_PORTS), st.just(((22, 22),)), st.just(((80, 443),)))


@st.composite
def ext_rules(draw: st.DrawFn, rule_id: int) -> PolicyRule:
    action = draw(st.sampled_from([Action.ALLOW, Action.ALLOW, Action.DENY]))
    proto = draw(st.sampled_from(["tcp", "icmp", "icmp", "ip", "proto 47", "proto 132"]))
    ports = {"tcp": tcp_sets, "icmp": icmp_sets}.get(proto, st.just(ALL_PORTS))
    return PolicyRule(
        rule_id, action, draw(addr_sets), draw(addr_sets), "s", "d", proto, draw(ports),
        log=action is Action.DENY and draw(st.booleans()), reply=False, rate_pps=None,
        duration_s=None, window=None, span=SPAN,
    )  # fmt: skip


@st.composite
def ext_policies(draw: st.DrawFn) -> Policy:
    rules = tuple(draw(ext_rules(i)) for i in range(1, draw(st.integers(1, 6)) + 1))
    return Policy("oracle", "oracle.zt", (), rules, False, None, ())


Packet = tuple[int, int, int, int, int, bool, int, int]
ext_packets = st.tuples(
    st.sampled_from(ADDRESSES),
    st.sampled_from(ADDRESSES),
    st.sampled_from(NUMBERS),
    st.sampled_from(PORTS),
    st.sampled_from(PORTS),
    st.booleans(),
    st.sampled_from(ICMP_TYPES),
).map(lambda p: (*p[:6], *p[6]))


def _matches(r: PolicyRule, src: int, dst: int, number: int, value: int) -> bool:
    """Rule r matches a packet forward; `value` is the port, or ICMP type << 8 | code."""
    wanted = protocol_number(r.proto)
    if (wanted is not None and wanted != number) or src not in r.src or dst not in r.dst:
        return False
    return number not in (6, 17, 1) or any(lo <= value <= hi for lo, hi in r.ports)


def oracle(policy: Policy, pkt: Packet) -> bool:
    src, dst, number, sport, dport, ack, icmp_type, icmp_code = pkt
    value = icmp_type << 8 | icmp_code if number == 1 else dport
    rs = policy.rules
    if any(r.action is Action.DENY and _matches(r, src, dst, number, value) for r in rs):
        return False
    if any(r.action is Action.ALLOW and _matches(r, src, dst, number, value) for r in rs):
        return True
    if number == 6 and ack:
        answered = [r for r in rs if _matches(r, dst, src, 6, sport)]
    elif number == 1 and icmp_type == 0:  # an echo reply answers rules that pass some echo request
        answered = [r for r in rs if any(_matches(r, dst, src, 1, 0x0800 | c) for c in range(256))]
    else:
        return False
    allows = [r for r in answered if r.action is Action.ALLOW]
    return bool(allows) and not any(r.action is Action.DENY for r in answered)


@settings(max_examples=300, deadline=None)
@given(ext_policies(), st.lists(ext_packets, min_size=1, max_size=30))
def test_icmp_types_and_protocol_numbers_against_the_oracle(
    policy: Policy, pkts: list[Packet]
) -> None:
    sem = PolicySemantics(policy)
    for src, dst, number, sport, dport, ack, icmp_type, icmp_code in pkts:
        got = sem.decide(src, dst, number, sport, dport, ack, icmp_type, icmp_code).allowed
        assert got == oracle(policy, (src, dst, number, sport, dport, ack, icmp_type, icmp_code))


@settings(max_examples=150, deadline=None)
@given(ext_policies(), st.lists(ext_packets, min_size=10, max_size=30))
def test_dead_rules_with_icmp_types_and_protocol_numbers_change_nothing(
    policy: Policy, pkts: list[Packet]
) -> None:
    dead = {c.rule.id for c in PolicySemantics(policy).dead_rules()}
    kept = tuple(r for r in policy.rules if r.id not in dead)
    pruned = dataclasses.replace(
        policy, rules=tuple(dataclasses.replace(r, id=i) for i, r in enumerate(kept, 1))
    )
    for pkt in pkts:
        assert oracle(pruned, pkt) == oracle(policy, pkt), (pkt, dead)


# -- fmt: canonical, comment-preserving, idempotent on the new constructs -------------------

_DAYS = st.lists(
    st.sampled_from(["Mon", "Tue", "Fri", "Sun", "Mon-Fri", "Fri-Mon", "Sat-Sun"]),
    min_size=1, max_size=3,
)  # fmt: skip
_SEP = st.sampled_from([" ", "  ", "\n  ", " # c\n  ", "\t"])
_TIGHT = st.sampled_from(["", " ", " # c\n"])


@st.composite
def ext_statement(draw: st.DrawFn) -> str:
    def sep() -> str:
        return draw(_SEP)

    def tight() -> str:
        return draw(_TIGHT)

    def endpoints() -> str:
        names = draw(
            st.lists(st.sampled_from(["algo", "oms1", "10.0.0.0/8", "any"]), min_size=1, max_size=2)
        )
        text = f"{tight()},{tight()}".join(names)
        if draw(st.booleans()):
            text += sep() + "except" + sep() + draw(st.sampled_from(["dev", "algo3, 10.0.0.1"]))
        return text

    kind = draw(st.sampled_from(["ports", "service", "rule", "expect"]))
    if kind == "ports":
        return f"ports{sep()}fix{sep()}={tight()}9876,{tight()}9880{tight()}-{tight()}9889"
    if kind == "service":
        return f"service{sep()}s{sep()}={tight()}{endpoints()}"
    if kind == "expect":
        proto = draw(st.sampled_from(["proto 132", "tcp 22", "icmp"]))
        return f"expect{sep()}{endpoints()}{sep()}->{sep()}{endpoints()}{sep()}{proto}{sep()}denied"
    proto = draw(
        st.sampled_from(
            ["tcp fix, 443", "icmp echo-request", "icmp type 3 code 4, type 11", "proto 132", ""]
        )
    ).replace(" ", sep())
    during = ""
    if draw(st.booleans()):
        days = f"{tight()},{tight()}".join(draw(_DAYS))
        zone = draw(st.sampled_from(["", " UTC", " America/New_York"]))
        during = f"{sep()}during{sep()}06:00-20:00{sep()}{days}{zone}"
    return f"allow{sep()}{endpoints()}{sep()}->{sep()}{endpoints()}{sep()}{proto}{during}"


@PROPERTY
@given(
    st.lists(ext_statement(), min_size=1, max_size=6),
    st.lists(st.sampled_from(["\n", "\n\n", "  # t\n"]), min_size=6, max_size=6),
)
def test_fmt_on_the_new_constructs(statements: list[str], ends: list[str]) -> None:
    text = "policy p\n" + "".join(s + e for s, e in zip(statements, ends, strict=False))
    parse(text, "a.zt")  # the generator writes valid syntax only
    assert_fmt_properties(text, format_policy(text, "a.zt"))


def test_every_day_is_the_default() -> None:
    assert TimeWindow(0, 60, "UTC").days == EVERY_DAY


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ("mon-fri UTC", "'mon' is not a day: write Mon (days are Mon, Tue, Wed, Thu, Fri, Sat, Sun)"),
        ("Monday America/New_York", "'Monday' is not a day: write Mon (days are Mon, Tue, Wed, Thu, Fri, Sat, Sun)"),
        ("Mon-Mon UTC", "day range Mon-Mon is one day: write Mon"),
        ("Mon-Fri", "time window 06:00-20:00 needs a time zone, e.g. `UTC` or `Europe/London`"),
    ],
)  # fmt: skip
def test_day_mistakes_are_located_errors(window: str, message: str, floor: Inventory) -> None:
    errors = _errors(f"allow jump1 -> oms1 tcp 22 during 06:00-20:00 {window}", floor)
    assert errors == [("E206", message)]


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ("icmp type", "expected an ICMP type (`icmp type 8`) after `type`, found end of file"),
        ("proto tcp", "expected an IP protocol number (`proto 132`) after `proto`, found keyword `tcp`"),
        ("tcp 22 during 06:00-20:00 Mon, UTC", "unexpected name `UTC`: expected a day (Mon to Sun) or a range of days such as Mon-Fri"),
    ],
)  # fmt: skip
def test_syntax_mistakes_in_the_new_constructs(tail: str, message: str, floor: Inventory) -> None:
    assert _errors(f"allow jump1 -> oms1 {tail}", floor) == [("E001", message)]


def test_dead_rules_down_to_an_id_judge_those_rules_as_the_whole_pass_does(
    floor: Inventory,
) -> None:
    """`dead_rules(down_to=id)` (a grant's check: only its verdict is needed) reports, of
    the rules with that id or above, exactly what the whole pass reports."""
    from compiler.semantics import PolicySemantics

    text = (ROOT / "policies" / "trading_floor.zt").read_text() + (
        "\nallow algo -> order_router tcp 9876\n"  # a copy of a rule: dead
        "allow dev -> prod tcp 22\n"  # blocked by the floor's deny
        "allow ops_jump -> prod tcp 22\n"
    )
    policy = check_policy(text, "floor.zt", floor, expectations=False).policy
    assert policy is not None
    sem = PolicySemantics(policy)
    whole = sem.dead_rules()
    assert len(whole) >= 2
    for rule in policy.rules:
        part = sem.dead_rules(down_to=rule.id)
        assert part == [c for c in whole if c.rule.id >= rule.id], rule.describe()
