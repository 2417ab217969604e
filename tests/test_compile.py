"""`p4seg compile`: golden outputs, determinism, atomic output, range expansion, p4c agreement.

Golden files live in tests/golden/build/; regenerate them after a reviewed change with
    P4SEG_REGEN=1 .venv/bin/python -m pytest tests/test_compile.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from finsy.proto import p4i
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.check import check_policy
from compiler.emit import OutputDirError, build, summary, write_build
from compiler.fit import CapacityError, range_to_ternary
from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.p4c import compile_v1model, p4c_available
from p4seg.cli import main
from p4src.p4info import build_p4info
from p4src.render import render_program

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "build"
POLICY = "policies/trading_floor.zt"
FLOOR = "topologies/trading_floor.yaml"
REGEN = os.environ.get("P4SEG_REGEN") == "1"


def _golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual)
    assert path.exists(), f"missing golden file {path}; run with P4SEG_REGEN=1"
    assert actual == path.read_text(), (
        f"{name} differs from its golden file (P4SEG_REGEN=1 to accept)"
    )


@pytest.fixture(scope="module")
def floor_build(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> dict[str, dict[str, str]]:
    policy = floor_policy
    return {t: dict(build(policy, floor, floor_policy_text, t).files) for t in ("ref", "tofino")}


def test_golden_programs_and_p4info(floor_build: dict[str, dict[str, str]]) -> None:
    _golden("v1model.p4", floor_build["ref"]["p4/ref/p4seg.p4"])
    _golden("tna.p4", floor_build["tofino"]["p4/tofino/p4seg.p4"])
    _golden("p4info.txtpb", floor_build["ref"]["p4info.txtpb"])
    _golden("p4info-tna.txtpb", floor_build["tofino"]["p4info.txtpb"])


@pytest.mark.parametrize("switch", ["tor-alg", "tor-oms", "spine1"])
def test_golden_entries(floor_build: dict[str, dict[str, str]], switch: str) -> None:
    _golden(f"entries/{switch}.json", floor_build["ref"][f"entries/{switch}.json"])
    _golden(f"entries/{switch}-tofino.json", floor_build["tofino"][f"entries/{switch}.json"])


def test_compile_is_deterministic_and_complete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["compile", POLICY, "-i", FLOOR, "-o", str(a)]) == 0
    assert main(["compile", POLICY, "-i", FLOOR, "-o", str(b)]) == 0
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    names = {str(f) for f in files_a}
    assert {"p4/ref/p4seg.p4", "p4info.txtpb", "report.json", "entries/tor-alg.json"} <= names
    assert not any(n.endswith("-runtime.json") for n in names)  # only when asked
    listed = tmp_path / "listed"
    assert main(["compile", POLICY, "-i", FLOOR, "-o", str(listed), "--runtime-listings"]) == 0
    with_listings = {str(p.relative_to(listed)) for p in listed.rglob("*") if p.is_file()}
    switches = {f.name.removesuffix(".json") for f in (a / "entries").iterdir()}
    assert with_listings - names == {f"entries/{s}-runtime.json" for s in switches}
    same = [f for f in files_a if str(f) != "p4seg-build.json"]  # the manifest lists more
    assert all((a / f).read_bytes() == (listed / f).read_bytes() for f in same)
    report = json.loads((a / "report.json").read_text())
    out = capsys.readouterr().out
    assert f"policy entries on ToRs: {report['policy_entries']}\n" in out
    assert (
        "naive" not in out and "host pair" not in out
    )  # baselines are bench's (bench/baselines.py)
    assert not {"naive_entries", "reduction", "host_pair_entries"} & report.keys()


def test_errors_leave_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.zt"
    bad.write_text("policy p\nallow algo9 -> oms1 tcp 9876\n")
    out = tmp_path / "out"
    assert main(["compile", str(bad), "-i", FLOOR, "-o", str(out)]) == 1
    assert not out.exists()
    # over capacity: named switch and table, nothing written, an earlier build left intact
    assert main(["compile", POLICY, "-i", FLOOR, "-o", str(out)]) == 0
    before = (out / "report.json").read_text()
    assert main(["compile", POLICY, "-i", FLOOR, "-o", str(out), "--size", "policy=10"]) == 1
    err = capsys.readouterr().err
    assert "E502" in err and "switch tor-oms: table policy needs 21 entries" in err
    assert (out / "report.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zt", "out"]  # no staging left


def test_capacity_error_is_typed(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    policy = floor_policy
    with pytest.raises(CapacityError):
        build(policy, floor, floor_policy_text, "tofino", {"policy": 10})


def test_write_build_never_writes_over_what_it_did_not_write(
    tmp_path: Path, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    # More in tests/test_build_output.py.
    policy = floor_policy
    out = tmp_path / "b"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(OutputDirError):
        write_build(build(policy, floor, floor_policy_text, "ref"), str(out))
    assert sorted(p.name for p in out.iterdir()) == ["stale.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 65535), st.integers(0, 65535))
def test_range_expansion_covers_exactly(a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    prefixes = range_to_ternary(lo, hi, 16)
    assert len(prefixes) <= 2 * 16 - 2
    covered = 0
    for value, mask in prefixes:
        assert value & ~mask & 0xFFFF == 0
        size = (~mask & 0xFFFF) + 1
        covered += size
        assert lo <= value and value + size - 1 <= hi
    assert covered == hi - lo + 1  # disjoint blocks inside [lo, hi] summing to its size


def test_report_counts_policy_entries_and_maps_rules_to_lines(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    built = build(floor_policy, floor, floor_policy_text, "ref")
    report = built.report
    tors = [sw for sw in built.switches if sw.role == "tor"]
    assert report["policy_entries"] == sum(len(sw.table("policy")) for sw in tors) > 0
    rules = report["rules"]
    assert isinstance(rules, list) and rules[1]["line"] == 20  # rule ids map back to lines


def _canonical(text: str) -> p4i.P4Info:
    info = p4i.P4Info()
    text_format.Parse(text, info)
    for repeated in (
        info.tables,
        info.actions,
        info.direct_counters,
        info.direct_meters,
        info.controller_packet_metadata,
    ):
        items = sorted(repeated, key=lambda m: m.preamble.id)
        del repeated[:]
        repeated.extend(items)
    return info


@pytest.mark.skipif(
    p4c_available() is None, reason="p4c-bm2-ss is not on PATH: cannot compare with p4c's P4Info"
)
def test_p4c_compiles_without_warnings_and_agrees_on_p4info() -> None:
    _, p4c_info = compile_v1model(render_program("v1model"))
    ours = build_p4info()
    theirs = _canonical(p4c_info)
    assert text_format.MessageToString(
        _canonical(text_format.MessageToString(ours))
    ) == text_format.MessageToString(theirs)


P4TEST = shutil.which("p4test")
TNA_INCLUDE = os.environ.get("P4SEG_TNA_INCLUDE", "/opt/p4/share/tna-include")


@pytest.mark.skipif(
    P4TEST is None or not Path(TNA_INCLUDE, "tna.p4").exists(),
    reason="p4test or the Tofino TNA includes (P4SEG_TNA_INCLUDE) are not installed: cannot check the TNA program",
)
def test_tna_program_passes_p4test(
    tmp_path: Path, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    import subprocess

    # the program a tofino build writes (ports matched ternary, its table sizes)
    built = build(floor_policy, floor, floor_policy_text, "tofino")
    src = tmp_path / "p4seg_tna.p4"
    src.write_text(built.files["p4/tofino/p4seg.p4"])
    proc = subprocess.run(
        [str(P4TEST), "-I", TNA_INCLUDE, "-D__TARGET_TOFINO__=1", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0 and "warning" not in (proc.stdout + proc.stderr).lower(), (
        proc.stderr
    )


def test_tofino_stage_estimate_fits_by_default_and_says_when_it_does_not(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    built = build(floor_policy, floor, floor_policy_text, "tofino")
    stages = built.report["tofino_stages"]
    assert isinstance(stages, dict) and stages["fits"] and stages["total"] <= 12
    # the policy key is 561 bits: 16384 entries would take 416 TCAM blocks, 18 stages
    big = build(floor_policy, floor, floor_policy_text, "tofino", {"policy": 16384})
    big_stages = big.report["tofino_stages"]
    assert isinstance(big_stages, dict) and not big_stages["fits"]
    assert big_stages["per_table"]["policy"] == 18
    assert "does NOT fit" in summary(big)


def test_a_build_given_the_previous_one_is_the_same_build(
    floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    first = build(floor_policy, floor, floor_policy_text, "ref")
    text = floor_policy_text.replace("risk_db      tcp 5432", "risk_db      tcp 5433")
    edited = check_policy(text, "p.zt", floor, expectations=False).policy
    assert edited is not None
    full = build(edited, floor, text, "ref", allocation=first.allocation)
    again = build(edited, floor, text, "ref", allocation=first.allocation, previous=first)
    assert again.files == full.files and again.switches == full.switches
    assert again.lowered is not None and "tor-rsk" not in again.lowered.reused
    assert len(again.lowered.reused) == len(floor.switches) - 1
