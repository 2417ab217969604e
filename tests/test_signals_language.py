"""The signal, contain and protect statements: parsed, formatted, resolved into the model,
shown by `p4seg check`, and refused with a located error when they make no sense."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compiler import ast
from compiler.check import check_policy
from compiler.fmt import format_policy
from compiler.inventory import Inventory
from compiler.model import TimeWindow
from compiler.parse import parse
from p4seg.cli import main

POLICY = """\
policy floor
service algo        = algo1, algo2, algo3
service dev         = 10.8.0.0/16
service remediation = jump1
service read_only   = 10.0.2.250
service nobody      = algo1 except algo
signal unhealthy from edr      -> remediation
signal degraded  from edr, mdm -> restrict read_only
contain algo, dev except dev1 after 20 denies within 10s for 15m
contain after 200 denies within 1m for 1h
protect fixgw
protect oms1, oms2 during 08:00-17:00 Mon-Fri Europe/London
allow algo, read_only -> oms1 tcp 9876
allow algo -> remediation tcp 443
deny dev -> algo log
default deny log
"""


def test_the_statements_resolve_into_the_model(floor: Inventory) -> None:
    result = check_policy(POLICY, "floor.zt", floor)
    assert result.policy is not None
    # `nobody` is unused; services named only by a signal, contain or protect are used.
    assert [(d.code, d.message) for d in result.diagnostics] == [
        ("W003", "service 'nobody' is never used by a rule or expectation")
    ]
    only = POLICY.replace("allow algo, read_only -> oms1", "allow algo -> oms1").replace(
        "service nobody      = algo1 except algo\n", ""
    )
    assert check_policy(only, "floor.zt", floor).diagnostics == ()
    p = result.policy
    hosts = {h.name: h.ip for h in floor.hosts}
    assert [(s.name, s.sources, s.profile) for s in p.signals] == [
        ("unhealthy", ("edr",), None),
        ("degraded", ("edr", "mdm"), "read_only"),
    ]
    scoped, everyone = p.containment
    assert (scoped.denies, scoped.within_s, scoped.for_s) == (20, 10, 900)
    assert hosts["algo1"] in scoped.src and hosts["dev2"] in scoped.src
    assert hosts["dev1"] not in scoped.src and hosts["oms1"] not in scoped.src
    assert (everyone.denies, everyone.within_s, everyone.for_s, everyone.src_text) == (
        200,
        60,
        3600,
        "",
    )
    always, hours = p.protected
    assert always.window is None and hosts["fixgw"] in always.hosts
    assert hours.window == TimeWindow(480, 1020, "Europe/London", frozenset(range(5)))
    assert [x.describe() for x in p.automatic()] == [
        "signal unhealthy from edr -> remediation",
        "signal degraded from edr, mdm -> restrict read_only",
        "contain algo, dev except dev1 after 20 denies within 10s for 15m",
        "contain after 200 denies within 1m for 1h",
        "protect fixgw",
        "protect oms1, oms2 during 08:00-17:00 Mon-Fri Europe/London",
    ]


def test_fmt_keeps_them_and_is_idempotent() -> None:
    messy = POLICY.replace("from edr, mdm", "from edr,mdm").replace(
        "contain after", "contain   after"
    )
    once = format_policy(messy)
    assert once == format_policy(once)
    kinds = [type(s) for s in parse(once).statements]
    assert kinds.count(ast.SignalDecl) == 2 and kinds.count(ast.ContainDecl) == 2
    assert "signal degraded  from edr, mdm -> restrict read_only" in once
    assert "contain after 200 denies within 1m for 1h" in once


def test_fmt_keeps_their_meaning(floor: Inventory) -> None:
    def meaning(text: str) -> list[str]:
        policy = check_policy(text, "floor.zt", floor).policy
        assert policy is not None
        return [
            f"{x.describe()} {getattr(x, 'src', '')} {getattr(x, 'hosts', '')}"
            for x in policy.automatic()
        ]

    assert meaning(format_policy(POLICY)) == meaning(POLICY)


def test_their_words_are_names_elsewhere(floor: Inventory) -> None:
    """`from`, `after`, `within`, `denies` and `restrict` are contextual: services may
    bear those names; `signal`, `contain` and `protect` are keywords."""
    text = """\
policy words
service from     = algo1
service after    = algo2
service restrict = 10.0.2.250
allow from, after, restrict -> oms1 tcp 9876
signal within from denies -> restrict restrict
contain from after 3 denies within 1s for 1m
default deny log
"""
    result = check_policy(text, "w.zt", floor)
    assert result.policy is not None, result.diagnostics
    assert result.policy.signals[0].describe() == "signal within from denies -> restrict restrict"
    bad = check_policy("policy k\nservice protect = algo1\n", "k.zt", floor)
    assert [d.code for d in bad.diagnostics] == ["E104"]


@pytest.mark.parametrize(
    ("line", "code", "fragment"),
    [
        ("signal infected from edr -> quarantine", "E108", "not 'quarantine'"),
        ("signal infected from edr -> restrict algo1", "E108", "a service, not 'algo1'"),
        ("signal infected from edr -> restrict red_only", "E101", "did you mean 'read_only'"),
        ("signal infected from edr -> restrict nobody", "E108", "'nobody' has no addresses"),
        ("signal healthy from edr -> remediation", "E104", "`healthy` is built in"),
        ("contain after 10001 denies within 1s for 1m", "E212", "from 1 to 10000"),
        ("contain after 5 denies within 10 for 1m", "E205", "not a whole number with a unit"),
        ("contain after 5 denies within 1s for 0m", "E205", "from 1s to 365d"),
        ("contain algo9 after 5 denies within 1s for 1m", "E101", "unknown name 'algo9'"),
        ("protect oms1 rate 10pps", "E207", "takes only `during`"),
        ("protect oms1 during 08:00-17:00", "E206", "needs a time zone"),
        ("protect oms1 during 08:00-17:00 UTC during 09:00-10:00 UTC", "E209", "given twice"),
        ("signal infected edr -> remediation", "E001", "expected `from`"),
        ("contain after 5 within 1s for 1m", "E001", "expected `denies`"),
    ],
)
def test_nonsense_is_an_error_with_its_location(
    floor: Inventory, line: str, code: str, fragment: str
) -> None:
    text = POLICY.replace("protect fixgw\n", f"protect fixgw\n{line}\n")
    result = check_policy(text, "floor.zt", floor)
    assert result.policy is None
    [diag] = [d for d in result.diagnostics if d.is_error]
    assert (diag.code, diag.span is not None and diag.span.line) == (code, 12), diag
    assert fragment in diag.message, diag.message


def test_removing_the_remediation_service_breaks_a_remediation_signal(floor: Inventory) -> None:
    text = POLICY.replace("service remediation = jump1\n", "").replace(
        "allow algo -> remediation tcp 443\n", ""
    )
    result = check_policy(text, "floor.zt", floor)
    errors = [(d.code, d.span and d.span.line) for d in result.diagnostics if d.is_error]
    assert errors == [("E108", 6)]


def test_check_shows_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    floor = Path("topologies/trading_floor.yaml").resolve()
    monkeypatch.chdir(tmp_path)
    Path("floor.zt").write_text(POLICY)
    assert main(["check", "floor.zt", "-i", str(floor), "--summary"]) == 0
    out = capsys.readouterr().out
    assert "signals and containment (6):" in out
    assert "  line 9    contain algo, dev except dev1 after 20 denies within 10s for 15m" in out
    assert main(["check", "floor.zt", "-i", str(floor), "--error-format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)["policy"]
    assert doc["signals"][1] == {
        "line": 8, "name": "degraded", "sources": ["edr", "mdm"], "effect": "restrict",
        "profile": "read_only"}  # fmt: skip
    assert doc["containment"][0]["within_s"] == 10 and doc["containment"][1]["sources"] == "any"
    assert doc["protected"][1] == {
        "line": 12, "hosts": ["oms1", "oms2"], "addresses": "10.0.3.10/31",
        "during": "08:00-17:00 Mon-Fri Europe/London"}  # fmt: skip
