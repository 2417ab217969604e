"""`check`: dead rules, unused services, expectations, on the example floor and small cases."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.check import check_policy
from compiler.inventory import Inventory
from compiler.parse import parse
from compiler.resolve import resolve
from compiler.semantics import PolicySemantics


def codes(text: str, inventory: Inventory) -> list[tuple[str, int]]:
    result = check_policy(text, "p.zt", inventory)
    return [(d.code, d.span.line if d.span else 0) for d in result.diagnostics]


def test_example_policy_is_clean(floor: Inventory, floor_policy_text: str) -> None:
    result = check_policy(floor_policy_text, "policies/trading_floor.zt", floor)
    assert result.diagnostics == ()
    assert result.policy is not None
    assert len(result.policy.expects) >= 10


HEAD = "policy p\nservice algo = algo1, algo2, algo3\nservice router = oms1, oms2\n"


def test_rule_covered_by_deny_is_w001_naming_the_deny(floor: Inventory) -> None:
    text = HEAD + "allow algo -> router tcp 9876\ndeny algo -> router ip\n"
    result = check_policy(text, "p.zt", floor)
    [diag] = result.diagnostics
    assert diag.code == "W001" and diag.span is not None and diag.span.line == 4
    assert [n.span.line for n in diag.notes if n.span] == [5]


def test_duplicate_allow_is_reported_once_at_the_later_copy(floor: Inventory) -> None:
    text = HEAD + "allow algo -> router tcp 9876\nallow algo -> router tcp 9876\n"
    assert codes(text, floor) == [("W002", 5)]


def test_union_of_allows_covers_a_rule(floor: Inventory) -> None:
    text = HEAD + (
        "allow algo1 -> oms1 tcp 9000-9100\n"
        "allow algo -> router tcp 9000-9050\n"
        "allow algo -> router tcp 9051-9200\n"
    )
    result = check_policy(text, "p.zt", floor)
    [diag] = result.diagnostics
    assert diag.code == "W002" and diag.span is not None and diag.span.line == 4
    assert sorted(n.span.line for n in diag.notes if n.span) == [5, 6]


def test_partial_overlap_is_not_dead(floor: Inventory) -> None:
    text = HEAD + "allow algo -> router tcp 9000-9100\nallow algo -> router tcp 9050-9200\n"
    assert codes(text, floor) == []


def test_metered_rule_is_not_made_dead_by_an_unmetered_one(floor: Inventory) -> None:
    text = HEAD + "allow algo -> router tcp 9876 rate 100pps\nallow algo -> router tcp\n"
    assert codes(text, floor) == []
    # ... but an unmetered rule inside a metered one never decides
    text = HEAD + "allow algo -> router tcp 9876\nallow algo -> router tcp rate 100pps\n"
    assert codes(text, floor) == [("W002", 4)]


def test_time_bound_rule_does_not_cover_a_permanent_one(floor: Inventory) -> None:
    text = HEAD + "allow algo -> router tcp 22\nallow algo -> router tcp during 07:00-18:00 UTC\n"
    assert codes(text, floor) == []


def test_udp_reply_rule_not_covered_by_one_without_reply(floor: Inventory) -> None:
    text = HEAD + "allow algo -> router udp 53 reply\nallow algo -> router udp\n"
    assert codes(text, floor) == []


def test_unused_service_warning(floor: Inventory) -> None:
    text = HEAD + "service idle = 10.9.0.0/16\nallow algo -> router tcp 9876\n"
    assert codes(text, floor) == [("W003", 2 + 2)]


def test_service_used_only_through_another_is_used(floor: Inventory) -> None:
    text = HEAD + "service trading = algo, router\nallow trading -> trading icmp\n"
    assert codes(text, floor) == []


def test_failed_expectation_names_the_flow_and_the_deciding_rule(floor: Inventory) -> None:
    text = (
        HEAD
        + "allow algo -> router tcp 9876\ndeny algo3 -> oms2 ip\nexpect algo -> router tcp 9876 allowed\n"
    )
    result = check_policy(text, "p.zt", floor)
    [diag] = [d for d in result.diagnostics if d.code == "E401"]
    assert "algo3 (10.0.2.13) -> oms2 (10.0.3.11) tcp 9876 is denied" in diag.message
    assert [n.span.line for n in diag.notes if n.span] == [5]
    assert result.policy is None


def test_without_warnings_the_errors_and_the_policy_are_the_same(floor: Inventory) -> None:
    # what the verbs that drive switches ask for: a dead rule (W001) left out, E401 kept
    dead = HEAD + "allow algo -> router tcp 9876\ndeny algo -> router ip\nallow any -> any udp 9\n"
    full, quiet = (check_policy(dead, "p.zt", floor, warnings=w) for w in (True, False))
    assert {d.code for d in full.diagnostics} == {"W001", "W005"} and quiet.diagnostics == ()
    assert quiet.policy == full.policy and quiet.policy is not None
    failing = dead + "expect algo1 -> oms1 tcp 9876 allowed\n"
    full, quiet = (check_policy(failing, "p.zt", floor, warnings=w) for w in (True, False))
    assert [d.code for d in quiet.diagnostics] == ["E401"]
    assert [d for d in full.diagnostics if d.is_error] == list(quiet.diagnostics)
    assert quiet.policy is None


def test_expectation_judges_the_answer_too(floor: Inventory) -> None:
    # the SYN passes, the SYN-ACK is denied: the connection does not work
    text = (
        HEAD
        + "allow algo -> router tcp 9876\ndeny router -> algo tcp\nexpect algo1 -> oms1 tcp 9876 allowed\n"
    )
    result = check_policy(text, "p.zt", floor)
    [diag] = [d for d in result.diagnostics if d.code == "E401"]
    assert "on the way back" in diag.message


def test_ip_expectation_covers_every_protocol_and_port(floor: Inventory) -> None:
    text = HEAD + "allow algo -> router udp 40000-40010\nexpect algo -> router ip denied\n"
    result = check_policy(text, "p.zt", floor)
    [diag] = [d for d in result.diagnostics if d.code == "E401"]
    assert "udp 40000" in diag.message


def test_errors_are_all_collected(floor: Inventory) -> None:
    text = "policy p\nallow nope -> algo1 tcp 70000\nallow algo1 -> nada udp 5-3\ndefault allow\n"
    assert [c for c, _ in codes(text, floor)] == ["E101", "E202", "E101", "E203", "E013"]


# Rules the property test adds before its expect lines (denies that cut flows, a reply, ...).
EXTRA_RULES = [
    "deny algo1 -> oms1 tcp 9876",
    "allow dev -> prod tcp 22",
    "deny any -> riskdb ip log",
    "allow md1 -> any udp 53 reply",
    "allow any -> jump1 icmp",
    "deny risk -> any tcp 1024-65535",
]
ENDPOINTS = ["algo1", "oms1", "md1", "risk1", "riskdb", "jump1", "ledger", "algo", "prod",
             "dev", "risk", "market_data", "10.8.0.7", "10.0.1.0/25", "any"]  # fmt: skip
FLOWS = ["tcp 22", "tcp 8443", "tcp 9876", "tcp 5432", "udp 30005", "udp 53", "icmp", "ip"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(ENDPOINTS), st.sampled_from(ENDPOINTS),
                  st.sampled_from(FLOWS), st.booleans()),
        min_size=1, max_size=6,
    ),
    st.lists(st.sampled_from(EXTRA_RULES), max_size=3),
)  # fmt: skip
def test_expectations_judged_on_the_rules_meeting_them_as_on_the_whole_policy(
    floor: Inventory,
    floor_policy_text: str,
    expects: list[tuple[str, str, str, bool]],
    extra: list[str],
) -> None:
    # check_policy judges each `expect` line on the rules that can match its flows
    # (PolicySemantics.rules_meeting); the whole policy's semantics must agree, line by line.
    lines = [f"expect {a} -> {b} {flow} {'allowed' if ok else 'denied'}"
             for a, b, flow, ok in expects]  # fmt: skip
    text = floor_policy_text.replace(
        "default deny log", "\n".join([*extra, *lines, "default deny log"])
    )
    result = check_policy(text, "floor.zt", floor)
    resolved = resolve(parse(text, "floor.zt"), floor).policy
    whole = PolicySemantics(resolved, pinned=(h.ip for h in floor.hosts))
    failing = {e.span.line for e in resolved.expects if whole.expectation_failure(e) is not None}
    assert {d.span.line for d in result.diagnostics if d.code == "E401" and d.span} == failing
    assert (
        failing
        or result.policy is not None
        or any(d.is_error and d.code != "E401" for d in result.diagnostics)
    )
