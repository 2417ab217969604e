"""`diff`, `trace` and `test` on the language's newer constructs: IP protocol numbers
(`proto 132`) and ICMP types and codes (`icmp type 3 code 4`, `icmp frag-needed`).

- `diff` names the protocol number and the ICMP types that change, as a policy writes them;
- `trace` sends `proto N` and any ICMP type and code, and its verdict on the fixture's
  tables is exactly what the semantics say, for every pair of hosts;
- a bad flow is refused like bad policy text (E001, E208, E210, E211, with a caret);
- `expect` lines may name one ICMP type; `test` runs them, and `proto N` ones, on the
  semantics and on the tables, and says which flow broke.
"""

from __future__ import annotations

import json
from itertools import permutations
from pathlib import Path

import pytest
from conftest import ROOT

from compiler.check import check_policy
from compiler.diff import icmp_text, semantic_diff
from compiler.emit import build
from compiler.entries import SwitchTables
from compiler.evaluate import Fabric
from compiler.fmt import format_policy
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.semantics import PolicySemantics
from compiler.trace import run_expects, trace_flow
from p4seg.cli import main

FLOOR = str(ROOT / "topologies" / "trading_floor.yaml")
FIXTURE = ROOT / "tests" / "fixtures" / "language_ext.zt"
BASE = "policy p\nallow algo1 -> oms1 tcp 9876\n"


def _policy(text: str, floor: Inventory) -> Policy:
    result = check_policy(text, "p.zt", floor)
    assert result.policy is not None, [d.message for d in result.diagnostics]
    return result.policy


def _diff(old: str, new: str, floor: Inventory) -> list[str]:
    changes = semantic_diff(_policy(BASE + old, floor), _policy(BASE + new, floor), floor)
    return [c.describe() for c in changes]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


# -- diff ---------------------------------------------------------------------------------


def test_diff_reports_protocol_numbers(floor: Inventory) -> None:
    assert _diff("", "allow algo1 -> oms1 proto 132\n", floor) == [
        "+ allowed  algo1 -> oms1 proto 132"
    ]
    assert _diff("allow algo1 -> oms1 proto 132\n", "allow algo1 -> oms1 proto 133\n", floor) == [
        "+ allowed  algo1 -> oms1 proto 133",
        "- denied   algo1 -> oms1 proto 132",
    ]
    # A deny of one protocol number carves it out of an `ip` allow: only that class changes.
    assert _diff(
        "allow jump1 -> risk1\n", "allow jump1 -> risk1\ndeny jump1 -> risk1 proto 112 log\n", floor
    ) == ["- denied   jump1 -> risk1 proto 112"]
    assert _diff("allow algo1 -> oms1 proto 132\n", "allow algo1 -> oms1 proto 132\n", floor) == []


def test_diff_reports_icmp_types(floor: Inventory) -> None:
    ping = "allow jump1 -> risk1 icmp echo-request\n"
    unreachable = "allow jump1 -> risk1 icmp type 3\n"
    frag = "allow jump1 -> risk1 icmp type 3 code 4\n"
    assert _diff(ping, unreachable, floor) == [
        "+ allowed  jump1 -> risk1 icmp dest-unreachable",
        "- denied   jump1 -> risk1 icmp echo-request",
    ]
    assert _diff(unreachable, frag, floor) == [
        "- denied   jump1 -> risk1 icmp type 3 codes 0-3, 5-255"
    ]
    assert _diff("", frag, floor) == ["+ allowed  jump1 -> risk1 icmp frag-needed"]
    # The same types written another way: no change.
    assert _diff(frag, "allow jump1 -> risk1 icmp frag-needed\n", floor) == []
    assert _diff("", "allow jump1 -> risk1 icmp\n", floor) == ["+ allowed  jump1 -> risk1 icmp"]
    assert _diff("allow jump1 -> risk1 icmp echo-request\n", "", floor) == [
        "- denied   jump1 -> risk1 icmp echo-request"
    ]


def test_diff_reports_a_forward_echo_reply_as_a_packet(floor: Inventory) -> None:
    """An echo reply is an answer, not a flow: allowing it forward is a packet change."""
    assert _diff("", "allow jump1 -> risk1 icmp echo-reply\n", floor) == [
        "~ dropped -> passes  jump1 -> risk1 icmp echo-reply packet"
    ]


def test_icmp_text_reads_like_the_language() -> None:
    assert icmp_text([(0x0300, 0x03FF)]) == "dest-unreachable"
    assert icmp_text([(0x0304, 0x0304), (0x0800, 0x08FF)]) == "frag-needed, echo-request"
    assert icmp_text([(0x0D00, 0x0D00)]) == "type 13 code 0"
    assert icmp_text([(0x0100, 0x07FF), (0x0900, 0xFFFF)]) == "all types but echo-request"
    assert icmp_text([(0x0100, 0x02FF), (0x0304, 0x0304), (0x0D00, 0xFFFF)]) == (
        "all types but type 3 codes 0-3, 5-255, types 4-12"
    )
    assert icmp_text([(0x0000, 0x00FF)]) == "echo-reply"
    assert icmp_text([(0x0100, 0xFFFF)]) == ""


def test_diff_cli_on_the_fixture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = FIXTURE.read_text()
    changed = tmp_path / "changed.zt"
    changed.write_text(
        text.replace("proto 132  # SCTP", "proto 133  # not SCTP")
        .replace("icmp type 3 code 4", "icmp type 3")
        .replace("expect oms1                -> risk1  proto 132   allowed\n", "")
    )
    status, out, _ = _run(["diff", str(FIXTURE), str(changed), "-i", FLOOR], capsys)
    assert status == 2, out
    lines = out.splitlines()
    assert "+ allowed  oms1, oms2 -> risk1, risk2 proto 133" in lines
    assert "- denied   oms1, oms2 -> risk1, risk2 proto 132" in lines
    assert "+ allowed  oms1, oms2 -> risk1, risk2 icmp type 3 codes 0-3, 5-255" in lines


# -- trace --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_policy(floor: Inventory) -> tuple[str, Policy]:
    text = FIXTURE.read_text()
    result = check_policy(text, "tests/fixtures/language_ext.zt", floor)
    assert result.policy is not None
    return text, result.policy


@pytest.fixture(scope="module")
def fixture_tables(floor: Inventory, fixture_policy: tuple[str, Policy]) -> dict[str, SwitchTables]:
    text, policy = fixture_policy
    return {s.switch: s for s in build(policy, floor, text, "ref").switches}


def test_trace_protocol_numbers_as_the_semantics_say(
    floor: Inventory, fixture_policy: tuple[str, Policy], fixture_tables: dict[str, SwitchTables]
) -> None:
    _, policy = fixture_policy
    sem = PolicySemantics(policy, [h.ip for h in floor.hosts])
    fabric = Fabric(fixture_tables, floor)
    verdicts = {}
    for src, dst in permutations(floor.hosts, 2):
        for proto in ("proto 132", "proto 112", "proto 133"):
            t = trace_flow(fabric, sem, src, dst, proto, 0)
            allowed = sem.flow(src.ip, dst.ip, proto).allowed
            assert t.passed == allowed == t.policy_allows, (src.name, dst.name, proto)
            assert t.legs[0].packet.protocol == int(proto[6:])
            verdicts[src.name, dst.name, proto] = t.passed
    assert verdicts["oms1", "risk1", "proto 132"] and verdicts["oms2", "risk2", "proto 132"]
    assert not verdicts["algo3", "oms1", "proto 132"]  # the logging deny
    assert not verdicts["risk1", "oms1", "proto 132"]  # no reply direction for proto N
    assert verdicts["risk1", "risk2", "proto 112"] and not verdicts["oms1", "risk1", "proto 112"]
    assert not any(v for (_, _, p), v in verdicts.items() if p == "proto 133")


def test_trace_icmp_types_as_the_semantics_say(
    floor: Inventory, fixture_policy: tuple[str, Policy], fixture_tables: dict[str, SwitchTables]
) -> None:
    _, policy = fixture_policy
    sem = PolicySemantics(policy, [h.ip for h in floor.hosts])
    fabric = Fabric(fixture_tables, floor)
    names = ("oms1", "risk1", "jump1", "riskdb", "algo1")
    hosts = [floor.hosts_by_name[n] for n in names]
    passed = set()
    for src, dst in permutations(hosts, 2):
        for kind, code in ((8, 0), (3, 4), (3, 5), (11, 0), (13, 0)):
            t = trace_flow(fabric, sem, src, dst, "icmp", kind, code)
            value = kind << 8 | code
            assert t.passed == sem.flow(src.ip, dst.ip, "icmp", icmp_value=value).allowed
            assert t.passed == t.policy_allows
            assert [leg.what for leg in t.legs][:2] == (
                ["request", "reply"][: 1 + (kind == 8 and t.legs[0].path.delivered)]
            )
            if t.passed:
                passed.add((src.name, dst.name, kind, code))
    assert ("oms1", "risk1", 3, 4) in passed and ("oms1", "risk1", 3, 5) not in passed
    assert ("risk1", "jump1", 11, 0) in passed and ("jump1", "risk1", 8, 0) in passed
    assert ("jump1", "riskdb", 8, 0) not in passed  # the logging deny of pings to the db


def test_trace_cli_new_flows(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["-i", FLOOR, "--policy", str(FIXTURE)]
    status, out, _ = _run(["trace", "oms1", "risk1", "proto", "132", *base], capsys)
    assert status == 0 and out.startswith("oms1 (10.0.3.10) -> risk1 (10.0.4.2) proto 132: PASSES")
    status, out, _ = _run(["trace", "algo3", "oms1", "proto", "132", *base], capsys)
    assert status == 3 and "proto 132: BLOCKED" in out and "proto 132 log" in out
    for words in (["frag-needed"], ["3", "4"], ["type", "3", "code", "4"]):
        status, out, _ = _run(["trace", "oms1", "risk1", "icmp", *words, *base], capsys)
        assert status == 0 and "icmp type 3 code 4 (frag-needed): PASSES" in out, words
    status, out, _ = _run(["trace", "oms1", "risk1", "icmp", "3", "5", *base], capsys)
    assert status == 3 and "icmp type 3 code 5 (dest-unreachable): BLOCKED" in out
    status, out, _ = _run(["trace", "jump1", "risk1", "icmp", "echo-request", *base], capsys)
    assert status == 0 and "icmp type 8 code 0 (echo-request): PASSES" in out
    assert "reply from risk1: delivered to jump1" in out


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        (["proto"], "command line:1:12: error[E001]: expected an IP protocol number after `proto` (`proto 132`)"),
        (["proto", "6"], "command line:1:18: error[E210]: IP protocol 6 is tcp: write `tcp` (with its ports, if any)"),
        (["proto", "256"], "command line:1:18: error[E210]: IP protocol 256 is out of range 0-255"),
        (["proto", "sctp"], "command line:1:18: error[E210]: IP protocol 'sctp' is not a number from 0 to 255"),
        (["proto", "132", "80"], "command line:1:22: error[E208]: ports apply to tcp and udp only, not proto 132"),
        (["prto", "132"], "error[E001]: unknown protocol `prto`: expected tcp, udp, icmp, ip or proto N (did you mean `proto`?)"),
        (["icmp", "echo-requets"], "command line:1:17: error[E211]: unknown ICMP type 'echo-requets' (did you mean 'echo-request'?)"),
        (["icmp", "3", "256"], "command line:1:19: error[E211]: ICMP code 256 is out of range 0-255"),
        (["icmp", "frag-needed", "5"], "command line:1:29: error[E211]: 'frag-needed' is type 3 code 4: it takes no other code"),
        (["icmp", "type"], "command line:1:17: error[E001]: expected an ICMP type after `type` (`icmp type 8`)"),
        (["icmp", "3", "4", "5"], "command line:1:21: error[E001]: unexpected `5`: an ICMP flow has one type and code"),
        (["tcp", "80", "81"], "command line:1:19: error[E001]: unexpected `81`: a flow has one port"),
    ],
)  # fmt: skip
def test_trace_refuses_a_bad_new_flow(
    capsys: pytest.CaptureFixture[str], flow: list[str], message: str
) -> None:
    status, out, err = _run(["trace", "oms1", "risk1", *flow, "-i", FLOOR, "--policy", str(FIXTURE)], capsys)  # fmt: skip
    assert status == 1 and out == ""
    assert message in err, err
    assert "^" in err


def test_trace_reports_every_problem_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["trace", "osm1", "risk1", "icmp", "300", "400", "-i", FLOOR, "--policy", str(FIXTURE)]
    status, out, _ = _run([*argv, "--error-format", "json"], capsys)
    assert status == 1
    found = [(d["code"], d["message"]) for d in json.loads(out)["diagnostics"]]
    assert found == [
        ("E101", "unknown host 'osm1' (did you mean 'oms1'?)"),
        ("E211", "ICMP type 300 is out of range 0-255"),
        ("E211", "ICMP code 400 is out of range 0-255"),
    ]


# -- expect and test ----------------------------------------------------------------------

EXPECTS = """\
expect oms1  -> risk1 icmp frag-needed        allowed
expect oms1  -> risk1 icmp type 3 code 4      allowed
expect oms1  -> risk1 icmp type 3 code 5      denied
expect risk1 -> jump1 icmp time-exceeded      allowed
expect jump1 -> risk1 icmp echo-request       allowed
expect jump1 -> riskdb icmp type 8            denied
expect oms2  -> risk2 proto 132               allowed
expect algo3 -> oms2  proto 132               denied
"""


def test_expect_names_an_icmp_type(floor: Inventory) -> None:
    policy = _policy(FIXTURE.read_text() + EXPECTS, floor)
    named = [e.describe() for e in policy.expects[-8:]]
    assert named[:3] == [
        "oms1 -> risk1 icmp frag-needed allowed",
        "oms1 -> risk1 icmp frag-needed allowed",
        "oms1 -> risk1 icmp type 3 code 5 denied",
    ]
    assert named[5] == "jump1 -> riskdb icmp echo-request denied"
    # Every code of a type: type 3 is not denied, since code 4 passes.
    result = check_policy(
        FIXTURE.read_text() + "expect oms1 -> risk1 icmp type 3 denied\n", "p.zt", floor
    )
    assert [d.message for d in result.diagnostics] == [
        "expectation failed: oms1 (10.0.3.10) -> risk1 (10.0.4.2) icmp frag-needed is allowed "
        "by `allow order_router -> risk icmp frag-needed`"
    ]


def test_expect_icmp_type_mistakes_are_located(floor: Inventory) -> None:
    text = (
        "policy p\n"
        "expect oms1 -> risk1 icmp echo-requets denied\n"
        "expect oms1 -> risk1 tcp type 3 denied\n"
        "expect oms1 -> risk1 icmp type 3 code 256 denied\n"
        "expect oms1 -> risk1 ip frag-needed denied\n"
        "expect oms1 -> risk1 icmp 3 denied\n"
    )
    result = check_policy(text, "p.zt", floor)
    located = [(d.code, d.span, d.message) for d in result.diagnostics]
    assert [(c, s.line, s.column, m) for c, s, m in located if s is not None] == [
        (
            "E211",
            2,
            27,
            "unknown ICMP type 'echo-requets' (did you mean 'echo-request'?)",
        ),
        ("E208", 3, 26, "ICMP types apply to icmp only, not tcp"),
        ("E211", 4, 27, "ICMP code 256 is out of range 0-255"),
        ("E208", 5, 25, "ports apply to tcp and udp only, not ip"),
        (
            "E208",
            6,
            27,
            "ports apply to tcp and udp only, not icmp (an ICMP type is written `icmp type 3`)",
        ),
    ]


def test_fmt_keeps_the_icmp_type_of_an_expectation() -> None:
    text = "policy p\nexpect oms1 -> risk1 icmp   type 3  code 4 allowed\nexpect a -> b icmp frag-needed denied\n"
    formatted = format_policy(text)
    assert "expect oms1 -> risk1 icmp type 3 code 4 allowed" in formatted
    assert "expect a    -> b     icmp frag-needed   denied" in formatted
    assert format_policy(formatted) == formatted


def test_ip_expectations_cover_icmp_types(floor: Inventory) -> None:
    """`ip denied` holds only if no ICMP type passes, not only pings."""
    text = "policy p\nallow oms1 -> risk1 icmp type 3 code 4\nexpect oms1 -> risk1 ip denied\n"
    result = check_policy(text, "p.zt", floor)
    assert [d.message for d in result.diagnostics] == [
        "expectation failed: oms1 (10.0.3.10) -> risk1 (10.0.4.2) icmp frag-needed is allowed "
        "by `allow oms1 -> risk1 icmp frag-needed`"
    ]


def test_test_runs_new_expectations_on_the_tables(
    floor: Inventory, fixture_tables: dict[str, SwitchTables]
) -> None:
    policy = _policy(FIXTURE.read_text() + EXPECTS, floor)
    results = run_expects(policy, floor, fixture_tables)
    assert [r.expect.describe() for r in results if not r.ok] == []
    assert all(r.pairs == 1 for r in results[-8:])
    # Tables that let code 5 through too fail the line, naming the flow that broke.
    wider = FIXTURE.read_text().replace("icmp type 3 code 4", "icmp type 3")
    wide_policy = _policy(wider, floor)
    wide_tables = {s.switch: s for s in build(wide_policy, floor, wider, "ref").switches}
    results = run_expects(policy, floor, wide_tables)
    failed = {r.expect.describe(): r.tables_note for r in results if not r.tables_ok}
    assert failed == {
        "oms1 -> risk1 icmp type 3 code 5 denied": (
            "oms1 -> risk1 icmp type 3 code 5 (dest-unreachable) got through"
        )
    }
    assert all(r.semantics_ok for r in results)


def test_test_cli_with_new_expectations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.zt"
    policy.write_text(FIXTURE.read_text() + EXPECTS)
    status, out, _ = _run(["test", str(policy), "-i", FLOOR], capsys)
    assert status == 0, out
    assert "21 passed, 0 failed" in out
    assert "PASS  line 48   oms1 -> risk1 icmp frag-needed allowed" in out
    assert "oms2 -> risk2 proto 132 allowed" in out
