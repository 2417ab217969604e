"""The `p4seg` command line: exit codes, output formats, and that bad input writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from compiler.model import text_key
from p4seg.cli import main

ROOT = Path(__file__).resolve().parent.parent
POLICY = str(ROOT / "policies" / "trading_floor.zt")
FLOOR = str(ROOT / "topologies" / "trading_floor.yaml")


def test_check_example_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", POLICY, "-i", FLOOR, "--summary"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "expectations (13, all hold)" in out


def test_check_json_describes_the_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", POLICY, "-i", FLOOR, "--error-format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["errors"] == 0
    algo = next(s for s in doc["policy"]["services"] if s["name"] == "algo")
    assert algo["hosts"] == ["algo1", "algo2", "algo3"]
    assert doc["policy"]["rules"][0] == {
        "id": 1,
        "key": text_key("allow market_data -> algo udp 30001-30010"),
        "line": 20,
        "rule": "allow market_data -> algo udp 30001-30010",
    }


def test_check_errors_exit_1_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.zt"
    bad.write_text("policy p\nallow algo9 -> oms1 tcp 9876\n")
    before = sorted(os.listdir(tmp_path))
    assert main(["check", str(bad), "-i", FLOOR, "--error-format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["errors"] == 1 and doc["diagnostics"][0]["code"] == "E101"
    assert doc["diagnostics"][0]["line"] == 2 and doc["diagnostics"][0]["column"] == 7
    assert sorted(os.listdir(tmp_path)) == before


def test_warnings_fail_only_with_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "w.zt"
    policy.write_text("policy p\nservice idle = 10.9.0.0/16\nallow algo1 -> oms1 tcp 9876\n")
    assert main(["check", str(policy), "-i", FLOOR]) == 0
    assert main(["check", str(policy), "-i", FLOOR, "--strict"]) == 1
    assert "W003" in capsys.readouterr().err


def test_bad_inventory_is_reported_in_the_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inv = tmp_path / "inv.yaml"
    inv.write_text(
        "switches:\n  t: {role: tor, device_id: 1, p4rt: 'x:1'}\nhosts:\n  h: {ip: 1.2.3.4, switch: t, port: 0}\n"
    )
    assert main(["check", POLICY, "-i", str(inv)]) == 1
    err = capsys.readouterr().err
    assert f"{inv}:4:" in err and "E307" in err


def test_missing_file_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "/nonexistent.zt"]) == 1
    assert "error[E000]: cannot read policy '/nonexistent.zt'" in capsys.readouterr().err


def test_fmt_check_and_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fmt", "--check", POLICY]) == 0
    messy = tmp_path / "m.zt"
    messy.write_text("policy   p\nallow a->b   tcp 22  # ssh\n")
    assert main(["fmt", "--check", str(messy)]) == 1
    assert "+allow a -> b tcp 22  # ssh" in capsys.readouterr().out
    assert main(["fmt", "-w", str(messy)]) == 0
    assert messy.read_text() == "policy p\nallow a -> b tcp 22  # ssh\n"
    assert main(["fmt", "--check", str(messy)]) == 0


def test_fmt_refuses_broken_policy_and_leaves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "b.zt"
    broken.write_text("policy p\nallow a b\n")
    assert main(["fmt", "-w", str(broken)]) == 1
    assert broken.read_text() == "policy p\nallow a b\n"
    assert "E002" in capsys.readouterr().err


def test_help_teaches_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "p4seg check policies/trading_floor.zt" in out


def test_the_parser_is_made_once_and_its_defaults_are_never_shared() -> None:
    from p4seg.cli import _arguments, _parser

    assert _parser() is _parser()
    first = _arguments(["apply", "p.zt", "--inventory", "i.yaml"])
    first.down.append("spine1")  # a verb that extended a default in place
    second = _arguments(["apply", "p.zt", "--inventory", "i.yaml"])
    assert second.down == [] and second.down is not first.down
