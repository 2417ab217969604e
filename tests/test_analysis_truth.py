"""What `diff`, `verify`, `test`, `trace`, `plan`, `grant` and the audit log print is true.

- `diff` reports every change in what the switches would do: replies, windows, `for`,
  rates, logging — not only flows that flip between allowed and denied;
- live analysis judges the effective policy (grants, quarantines, time-bound rules at a
  moment), so a grant or a closed window is no false alarm;
- a grant that a deny blocks is refused, one that is already allowed writes nothing;
- `plan` labels a removed entry with the rule it came from;
- `trace` checks its flow like policy text, and its exit status is the verdict;
- no verb prints a traceback on a closed pipe;
- the audit record hashes the text that was compiled, not the file as it is later.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from p4rt import inventory_at

from p4seg.cli import main
from runtime.controller import PipelineFiles, SwitchTarget
from runtime.refswitch.switch import ReferenceSwitch

POLICY = str(ROOT / "policies" / "trading_floor.zt")
FLOOR = str(ROOT / "topologies" / "trading_floor.yaml")
TEXT = Path(POLICY).read_text()
OPEN = "2026-03-02T12:00:00+00:00"  # inside `during 07:00-18:00 UTC` (SSH from the jump host)
CLOSED = "2026-03-02T21:00:00+00:00"  # outside it


def _moment(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


def _variant(tmp_path: Path, name: str, old: str, new: str) -> str:
    assert old in TEXT, old
    path = tmp_path / f"{name}.zt"
    path.write_text(TEXT.replace(old, new, 1))
    return str(path)


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


# -- diff -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("udp 30001-30010", "udp 30001-30010 reply",
         "~ replies dropped -> replies pass  md1, md2, md3 -> algo1, algo2, algo3 udp 30001-30010"),
        ("during 07:00-18:00 UTC", "during 06:00-18:00 UTC",
         "~ allowed only during 07:00-18:00 UTC (in force now) -> allowed only during "
         "06:00-18:00 UTC (in force now)  jump1 -> md1, md2, md3, algo1"),
        ("rate 20000pps", "rate 10000pps",
         "~ rate 20000pps -> rate 10000pps  oms1, oms2 -> risk1, risk2 tcp 8443"),
        ("tcp 9878\n", "tcp 9878 for 15m\n",
         "~ allowed -> allowed only for 15m after it is first applied  oms1, oms2 -> fixgw tcp 9878"),
        ("deny dev  -> prod log", "deny dev  -> prod",
         "~ logged -> not logged  dev1, dev2, test1 -> md1, md2, md3"),
    ],
)  # fmt: skip
def test_diff_reports_changes_in_treatment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, expected: str
) -> None:
    changed = _variant(tmp_path, "changed", old, new)
    status, out, _ = _run(["diff", POLICY, changed, "-i", FLOOR, "--at", OPEN], capsys)
    assert status == 2, out
    assert expected in out, out
    assert "no changes" not in out
    status, out, _ = _run(["diff", changed, changed, "-i", FLOOR], capsys)
    assert status == 0 and "no changes" in out


def test_diff_says_whether_a_window_is_in_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = _variant(tmp_path, "w", "tcp 22 during 07:00-18:00 UTC", "tcp 22")
    status, out, _ = _run(["diff", POLICY, changed, "-i", FLOOR, "--at", CLOSED, "--output", "json"], capsys)  # fmt: skip
    assert status == 2
    doc = json.loads(out)
    seen = {(c["before"], c["after"]) for c in doc["changes"] if c["on_switches"]}
    assert seen == {("allowed only during 07:00-18:00 UTC (not in force now)", "allowed")}
    status, _, err = _run(["diff", POLICY, changed, "-i", FLOOR, "--at", "tomorrow"], capsys)
    assert status == 1 and "--at 'tomorrow' is not an ISO 8601 time" in err
    status, _, err = _run(["diff", POLICY, changed, "-i", FLOOR, "--at", "2026-03-02T12:00"], capsys)  # fmt: skip
    assert status == 1 and "has no zone" in err


def test_diff_reports_a_reply_to_another_client_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flows are judged with one client port; a packet to another one must not slip by."""
    changed = _variant(
        tmp_path, "p", "default deny log", "deny oms1 -> algo1 tcp 1234\ndefault deny log"
    )
    status, out, _ = _run(["diff", POLICY, changed, "-i", FLOOR], capsys)
    assert status == 2, out
    assert "algo1 -> oms1" in out or "oms1 -> algo1" in out, out


# -- live analysis judges the effective policy ------------------------------------------------


@pytest.fixture
def live_floor(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[list[str]]:
    """The trading floor on reference switches: `-i INVENTORY --state DIR --build DIR`."""
    switches, _, _ = fabric
    live = inventory_at(Path(FLOOR), {t.name: t.address for t in switches}, tmp_path / "floor.yaml")
    yield ["-i", str(live), "--state", str(tmp_path / "state")]


def _at(monkeypatch: pytest.MonkeyPatch, moment: str) -> None:
    monkeypatch.setattr("p4seg.verbs.clock", lambda: _moment(moment))


def test_live_analysis_after_a_grant(
    live_floor: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inv, build = live_floor, ["--build", str(tmp_path / "build")]
    _at(monkeypatch, OPEN)
    assert main(["apply", POLICY, *inv, *build]) == 0
    grant = ["grant", "algo1", "riskdb", "tcp", "5432", "--for", "15m", "-p", POLICY]
    assert main([*grant, *inv, *build]) == 0
    partly = ["grant", "algo1", "10.8.0.0/15", "tcp", "80", "--for", "15m", "-p", POLICY]
    status, _, err = _run([*partly, *inv, *build], capsys)
    assert status == 0
    assert (
        "part of `allow algo1 -> 10.8.0.0/15 tcp 80` stays blocked by `deny prod -> dev log`" in err
    )
    at = ["--at", OPEN]
    status, out, _ = _run(["verify", POLICY, *inv, "--from-switches", *at], capsys)
    assert status == 0, out
    assert "grant " in out and "allow algo1 -> riskdb tcp 5432" in out
    # Without the grant in the state, the same switches are (rightly) not the policy.
    state = ["--state", str(tmp_path / "elsewhere")]
    status, out, _ = _run(["verify", POLICY, *inv[:2], *state, "--from-switches", *at], capsys)
    assert status == 1 and "algo1" in out
    status, out, _ = _run(
        ["trace", "algo1", "riskdb", "tcp", "5432", *inv, "--from-switches", "--policy", POLICY, *at],
        capsys,
    )  # fmt: skip
    assert status == 0 and "PASSES" in out and "policy: allowed" in out


def test_live_analysis_with_a_window_closed(
    live_floor: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    inv, build = live_floor, ["--build", str(tmp_path / "build")]
    _at(monkeypatch, CLOSED)
    assert main(["apply", POLICY, *inv, *build]) == 0
    capsys.readouterr()
    closed = ["--at", CLOSED]
    status, out, _ = _run(["verify", POLICY, *inv, "--from-switches", *closed], capsys)
    assert status == 0, out
    assert "not in force: line 35: allow ops_jump -> prod tcp 22 during 07:00-18:00 UTC" in out
    status, out, _ = _run(["test", POLICY, *inv, "--live", *closed], capsys)
    assert status == 0, out
    assert "13 passed, 0 failed" in out
    assert "not in effect now: jump1 -> risk1 is denied now" in out
    status, out, _ = _run(
        ["trace", "jump1", "risk1", "tcp", "22", *inv, "--from-switches", "--policy", POLICY, *closed],
        capsys,
    )  # fmt: skip
    assert status == 3 and "BLOCKED" in out and "policy: denied" in out
    # At a moment inside the window the switches (still closed) are wrong, and it says so.
    status, out, _ = _run(["verify", POLICY, *inv, "--from-switches", "--at", OPEN], capsys)
    assert status == 1 and "allowed as a reply by `allow ops_jump -> prod tcp 22" in out
    assert "in force:     line 35" in out
    status, out, _ = _run(["plan", POLICY, *inv, *build, "--at", OPEN], capsys)
    assert status == 2 and "in force:     line 35" in out


# -- grants that cannot take effect -----------------------------------------------------------


def test_grant_blocked_by_a_deny_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    common = ["-p", POLICY, "-i", FLOOR, "--state", str(state), "--build", str(tmp_path / "b")]
    status, out, err = _run(["grant", "dev1", "riskdb", "tcp", "5432", "--for", "15m", *common], capsys)  # fmt: skip
    assert status == 1
    assert "blocked by `deny dev -> prod log` at " in err
    assert re.search(r"trading_floor\.zt:39:1", err), err
    assert not (state / "live.json").exists() and not (state / "audit.jsonl").exists()
    status, out, err = _run(["grant", "algo2", "oms1", "tcp", "9876", "--for", "1h", *common], capsys)  # fmt: skip
    assert status == 0, err
    assert "already allowed by `allow algo -> order_router tcp 9876` at " in out
    assert "nothing written" in out
    assert not (state / "live.json").exists() and not (state / "audit.jsonl").exists()


# -- plan labels removed entries with the rule they came from ---------------------------------

SMALL = """\
policy small
service front = h1, h2
service back  = h3
allow front -> back icmp
allow front -> back tcp 8080
"""


@pytest.fixture
def one_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    sw = ReferenceSwitch(device_id=1)
    port = sw.start("127.0.0.1:0")
    hosts = "\n".join(f"  h{i}: {{ip: 10.0.0.{i}, switch: tor1, port: {i}}}" for i in (1, 2, 3))
    (tmp_path / "small.yaml").write_text(
        f'name: small\nswitches:\n  tor1: {{role: tor, device_id: 1, p4rt: "127.0.0.1:{port}"}}\n'
        f"hosts:\n{hosts}\n"
    )
    (tmp_path / "small.zt").write_text(SMALL)
    monkeypatch.chdir(tmp_path)
    try:
        yield ["-i", "small.yaml"]
    finally:
        sw.stop()


def test_plan_labels_removed_entries_with_the_old_rule(
    one_switch: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["apply", "small.zt", *one_switch]) == 0
    Path("small.zt").write_text(SMALL.replace("allow front -> back icmp\n", ""))
    capsys.readouterr()
    status, out, _ = _run(["plan", "small.zt", *one_switch], capsys)
    assert status == 2
    removed = [line for line in out.splitlines() if line.strip().startswith("- ")]
    added = [line for line in out.splitlines() if line.strip().startswith("+ ")]
    # Rule ids are stable: the TCP rule keeps id 2 (and its entries); only rule 1's go.
    assert removed and not added, out
    for line in removed:
        assert "rule_id=1" in line and "# rule 1, line 4: allow front -> back icmp" in line, out
    status, out, _ = _run(["plan", "small.zt", *one_switch, "--output", "json"], capsys)
    doc = json.loads(out)
    rules = {
        e["rule"]
        for t in doc["switches"][0]["tables"].values()
        for e in t["removed"]
        if "rule" in e
    }
    assert rules == {"line 4: allow front -> back icmp"}
    # Once applied, a new rule does not take id 1 from a switch that just held it: the apply
    # went to every switch, so the retired id is free again and the new rule gets it.
    assert main(["apply", "small.zt", *one_switch]) == 0
    Path("small.zt").write_text(
        SMALL.replace("allow front -> back icmp\n", "allow front -> back udp 53\n")
    )
    capsys.readouterr()
    status, out, _ = _run(["plan", "small.zt", *one_switch], capsys)
    assert status == 2 and "# rule 1, line 4: allow front -> back udp 53" in out, out


def test_audit_hashes_the_text_that_was_compiled(
    one_switch: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Under `watch` the file can change between compile and audit: the record must hash
    what went onto the switches."""
    from p4seg.cli import _front, _parser
    from p4seg.control import Compiled
    from p4seg.verbs import PolicyTransform, TextTransform, _apply_compiled
    from runtime.live import LiveState

    def edited_meanwhile(
        args: argparse.Namespace,
        text_transform: TextTransform,
        policy_transform: PolicyTransform,
        text: str | None = None,
        write: bool | None = True,
    ) -> Compiled | None:
        compiled = _front(args, text_transform, policy_transform, text, write)
        Path("small.zt").write_text(SMALL + "allow h3 -> h1 tcp 22\n")
        return compiled

    args = _parser().parse_args(["apply", "small.zt", *one_switch])
    code, _ = _apply_compiled("apply", args, edited_meanwhile, LiveState(), {})
    assert code == 0
    record = json.loads(Path(".p4seg/audit.jsonl").read_text().splitlines()[-1])
    assert record["policy_sha256"] == hashlib.sha256(SMALL.encode()).hexdigest()
    assert record["compiled_sha256"] == hashlib.sha256(SMALL.encode()).hexdigest()
    assert len(record["operations_sha256"]) == 64


# -- trace and test validate their input ------------------------------------------------------


@pytest.mark.parametrize(
    ("flow", "message"),
    [
        (["algo1", "oms1", "tcp", "70011"], "command line:1:16: error[E202]: port 70011 is out of range 0-65535"),
        (["algo1", "oms1", "tcp", "-5"], "error[E202]: port '-5' is not a number from 0 to 65535"),
        (["algo1", "oms1", "tcp"], "command line:1:12: error[E208]: a flow over tcp needs a port, e.g. `tcp 443`"),
        (["algo1", "oms1", "ip", "80"], "error[E208]: ports apply to tcp and udp only, not ip"),
        (["algo1", "oms1", "icmp", "300"], "error[E211]: ICMP type 300 is out of range 0-255"),
        (["algo1", "osm1", "tcp", "9876"], "command line:1:7: error[E101]: unknown host 'osm1' (did you mean 'oms1'?)"),
        (["algo1", "oms1", "tpc", "9876"], "error[E001]: unknown protocol `tpc`: expected tcp, udp, icmp, ip or proto N (did you mean `tcp`?)"),
    ],
)  # fmt: skip
def test_trace_refuses_a_bad_flow(
    capsys: pytest.CaptureFixture[str], flow: list[str], message: str
) -> None:
    status, out, err = _run(["trace", *flow, "-i", FLOOR, "--policy", POLICY], capsys)
    assert status == 1 and out == ""
    assert message in err, err
    assert "^" in err  # the caret under the offending word


def test_trace_exit_status_is_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["-i", FLOOR, "--policy", POLICY, "--at", OPEN]
    status, out, _ = _run(["trace", "algo1", "oms1", "tcp", "9876", *base], capsys)
    assert status == 0 and "PASSES" in out
    status, out, _ = _run(["trace", "oms1", "algo1", "tcp", "9876", *base], capsys)
    assert status == 3 and "BLOCKED" in out
    # `icmp 8` is an echo request (with its reply); another type is one packet.
    status, out, _ = _run(["trace", "jump1", "risk1", "icmp", "8", *base, "--output", "json"], capsys)  # fmt: skip
    legs = json.loads(out)["legs"]
    assert status == 0 and [leg["packet"] for leg in legs] == ["request", "reply"]
    status, out, _ = _run(["trace", "jump1", "risk1", "icmp", "13", *base, "--output", "json"], capsys)  # fmt: skip
    assert status == 0 and [leg["packet"] for leg in json.loads(out)["legs"]] == ["request"]


def test_no_traceback_on_a_closed_pipe(tmp_path: Path) -> None:
    """`p4seg ... | head -1`: the reader goes away; the writer ends quietly."""
    for argv in (["fmt", POLICY], ["check", POLICY, "-i", FLOOR, "--summary"]):
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from p4seg.cli import main; sys.exit(main())", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.readline()
        proc.stdout.close()  # the reader closes after one line, as `head -1` does
        err = proc.stderr.read().decode()
        status = proc.wait()
        assert "Traceback" not in err and "BrokenPipeError" not in err, err
        assert status in (0, 141)


# -- verify's counterexamples -----------------------------------------------------------------


def test_per_tor_counterexamples_say_what_the_switch_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ToR that wrongly permits a packet and forwards it to the spine 'lets it through';
    it never 'lets it through' and is 'dropped' in one breath."""
    out = tmp_path / "build"
    assert main(["compile", POLICY, "-i", FLOOR, "-o", str(out)]) == 0
    entries = out / "entries" / "tor-alg.json"
    text = entries.read_text()
    wide = '"l4_dst_port": {"range": [9876, 9877]}'
    entries.write_text(text.replace('"l4_dst_port": {"range": [9876, 9876]}', wide))
    capsys.readouterr()
    status, doc_text, _ = _run(
        ["verify", POLICY, "-i", FLOOR, "--from-build", str(out), "--output", "json"], capsys
    )
    assert status == 1
    examples = json.loads(doc_text)["counterexamples"]
    through = [c["tables"] for c in examples if "alone lets it through" in c["tables"]]
    assert through, examples
    for observed in through:
        assert "dropped" not in observed and "then forwards it to port" in observed, observed
    for c in examples:
        if "alone" in c["tables"] and "lets it through" not in c["tables"]:
            assert "forwards" not in c["tables"], c["tables"]
