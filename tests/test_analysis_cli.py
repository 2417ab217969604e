"""`p4seg verify`, `diff`, `trace` and `test` from the command line, on compiled tables, on a
build directory (also a corrupted one) and on live reference switches."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, TABLES
from p4rt import inventory_at

from p4seg.cli import main
from runtime.controller import ControllerOptions, PipelineFiles, SwitchTarget, apply_all
from runtime.refswitch.switch import ReferenceSwitch

POLICY = str(ROOT / "policies" / "trading_floor.zt")
FLOOR = str(ROOT / "topologies" / "trading_floor.yaml")


def test_verify_compiled_and_from_a_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", POLICY, "-i", FLOOR]) == 0
    assert "PROVEN" in capsys.readouterr().out
    out = tmp_path / "build"
    assert main(["compile", POLICY, "-i", FLOOR, "-o", str(out)]) == 0
    assert main(["verify", POLICY, "-i", FLOOR, "--from-build", str(out)]) == 0
    # Corrupt the build: FIX to the routers now also opens 9877 on tor-alg.
    entries = out / "entries" / "tor-alg.json"
    text = entries.read_text()
    assert '"l4_dst_port": {"range": [9876, 9876]}' in text
    entries.write_text(
        text.replace(
            '"l4_dst_port": {"range": [9876, 9876]}', '"l4_dst_port": {"range": [9876, 9877]}'
        )
    )
    capsys.readouterr()
    assert main(["verify", POLICY, "-i", FLOOR, "--from-build", str(out), "--output", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["proven"]
    example = doc["counterexamples"][0]
    assert (
        example["packet"]["dport"] == 9877 and "tor-alg alone lets it through" in example["tables"]
    )
    assert main(["verify", POLICY, "-i", FLOOR, "--from-build", str(tmp_path / "nothing")]) == 1


def test_diff_is_semantic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = Path(POLICY).read_text()
    renamed = tmp_path / "renamed.zt"
    renamed.write_text(re.sub(r"\brisk_db\b", "limits_store", text))
    assert main(["diff", POLICY, str(renamed), "-i", FLOOR]) == 0
    assert "no changes" in capsys.readouterr().out
    widened = tmp_path / "widened.zt"
    widened.write_text(
        text.replace("tcp 9876\n", "tcp 9876-9877\n", 1).replace(
            "expect algo1 -> oms1   tcp  9876  allowed\n", ""
        )
    )
    assert main(["diff", POLICY, str(widened), "-i", FLOOR]) == 2
    out = capsys.readouterr().out
    assert "+ allowed  algo1, algo2, algo3 -> oms1, oms2 tcp 9877" in out
    assert main(["diff", str(widened), POLICY, "-i", FLOOR, "--output", "json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert [c["change"] for c in doc["changes"]] == ["denied"]


def test_trace_and_test(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "oms1", "algo1", "tcp", "9876", "-i", FLOOR, "--policy", POLICY]) == 3
    out = capsys.readouterr().out
    assert "BLOCKED" in out and "denied by the default deny" in out
    assert main(["trace", "algo1", "nobody", "tcp", "1", "-i", FLOOR, "--policy", POLICY]) == 1
    assert main(["test", POLICY, "-i", FLOOR]) == 0
    assert "13 passed, 0 failed" in capsys.readouterr().out
    wrong = tmp_path / "wrong.zt"
    wrong.write_text(Path(POLICY).read_text() + "expect algo1 -> riskdb tcp 5432 allowed\n")
    assert main(["test", str(wrong), "-i", FLOOR, "--output", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    failed = [e for e in doc["expects"] if not e["ok"]]
    assert len(failed) == 1 and not failed[0]["semantics"] and not failed[0]["tables"]
    assert "algo1 -> riskdb" in failed[0]["tables_note"]


def test_verify_trace_and_test_live(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    switches, files, refs = fabric
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, ControllerOptions())))
    live = inventory_at(Path(FLOOR), {t.name: t.address for t in switches}, tmp_path / "floor.yaml")
    # The fabric holds every rule in force: judge at a moment inside the SSH window.
    at = ["--at", "2026-03-02T12:00:00Z", "--state", str(tmp_path / "state")]
    assert main(["verify", POLICY, "-i", str(live), "--from-switches", *at]) == 0
    assert main(["test", POLICY, "-i", str(live), "--live", *at]) == 0
    capsys.readouterr()
    assert main(["trace", "algo1", "oms1", "tcp", "9876", "-i", str(live), "--from-switches"]) == 0
    assert "PASSES" in capsys.readouterr().out
    refs["tor-rsk"].stop()
    assert main(["verify", POLICY, "-i", str(live), "--from-switches", "--timeout", "3", *at]) == 1
    assert "cannot read tor-rsk" in capsys.readouterr().err
