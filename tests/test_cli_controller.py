"""`p4seg plan/apply/grant/revoke/quarantine/release/watch/hits/audit` end to end against a
reference switch on loopback, judged by packets through the switch's data plane."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from p4rt import wait_for
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from p4seg import verbs
from p4seg.cli import main
from runtime.refswitch.switch import ReferenceSwitch

POLICY = """\
policy small
service front       = h1, h2
service back        = h3
service remediation = h4
allow front -> back        tcp 8080
allow h1    -> remediation tcp 443
default deny log
"""
HOSTS = {"h1": ("10.0.0.1", 1), "h2": ("10.0.0.2", 2), "h3": ("10.0.0.3", 3), "h4": ("10.0.0.4", 4)}


_Switch = TypeVar("_Switch", bound=ReferenceSwitch)


def small_site(
    sw: _Switch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[_Switch, list[str]]]:
    """The one-ToR floor (HOSTS, POLICY) on `sw`, started on a free loopback port, in
    tmp_path as the working directory; the switch stopped afterwards."""
    port = sw.start("127.0.0.1:0")
    inventory = tmp_path / "small.yaml"
    hosts = "\n".join(
        f"  {h}: {{ip: {ip}, switch: tor1, port: {p}}}" for h, (ip, p) in HOSTS.items()
    )
    inventory.write_text(
        f'name: small\nswitches:\n  tor1: {{role: tor, device_id: 1, p4rt: "127.0.0.1:{port}"}}\n'
        f"hosts:\n{hosts}\n"
    )
    (tmp_path / "small.zt").write_text(POLICY)
    monkeypatch.chdir(tmp_path)
    try:
        yield sw, ["-i", str(inventory)]
    finally:
        sw.stop()


@pytest.fixture
def site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ReferenceSwitch, list[str]]]:
    yield from small_site(ReferenceSwitch(device_id=1), tmp_path, monkeypatch)


def _passes(sw: ReferenceSwitch, src: str, dst: str, dport: int) -> bool:
    (sip, port), (dip, _) = HOSTS[src], HOSTS[dst]
    frame = bytes(Ether() / IP(src=sip, dst=dip) / TCP(sport=40000, dport=dport, flags="S"))
    return bool(sw.inject(port, frame))


def test_a_no_op_apply_encodes_nothing_and_reads_no_table(
    site: tuple[ReferenceSwitch, list[str]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import p4seg.control
    import runtime.plan

    sw, inv = site
    p4seg.control._APPLIED.clear()  # as a new process: only this site's build remembered
    assert main(["apply", "small.zt", *inv]) == 0
    encoded: list[str] = []
    real_encode = runtime.plan._encode

    def encode(tables: Any, compiled: Any) -> Any:
        encoded.append(compiled.switch)
        return real_encode(tables, compiled)

    monkeypatch.setattr(runtime.plan, "_encode", encode)
    reads: list[bool] = []  # per Read: whether it read a table's entries
    real_read = sw.device.read

    def read(entities: list[object]) -> object:
        entities = list(entities)
        reads.append(
            any(
                e.WhichOneof("entity") == "table_entry" and not e.table_entry.is_default_action  # type: ignore[attr-defined]
                for e in entities
            )
        )
        return real_read(entities)  # type: ignore[arg-type]

    monkeypatch.setattr(sw.device, "read", read)
    capsys.readouterr()
    assert main(["apply", "small.zt", *inv, "--output", "json"]) == 0
    [doc] = json.loads(capsys.readouterr().out)["switches"]
    assert (doc["written"], doc["digest_marks"], doc["planned_in_full"]) == (0, 0, False)
    assert encoded == [] and reads == [False]  # the mark's one small read, nothing encoded
    # A changed policy, in the same process (as under `watch`): the switch is still marked
    # with what this process applied (encoded when it was applied), so the plan starts from
    # that, unread, and the new tables are encoded by their difference from it.
    [known] = p4seg.control._APPLIED.values()
    applied = known["tor1"]
    Path("small.zt").write_text(POLICY.replace("tcp 8080", "tcp 8081"))
    assert main(["apply", "small.zt", *inv]) == 0
    assert encoded == [] and reads.count(True) == 0, (encoded, reads)
    delta = known["tor1"].delta_from(applied)
    assert delta is not None and delta.gone and delta.came
    assert _passes(sw, "h1", "h3", 8081) and not _passes(sw, "h1", "h3", 8080)
    assert main(["apply", "small.zt", *inv, "--full-read"]) == 0  # reads every table anyway
    assert reads.count(True) == 1 and encoded == ["tor1"]  # and plans it in full
    # A new process knows nothing it applied: the changed switch is read in full.
    p4seg.control._APPLIED.clear()
    Path("small.zt").write_text(POLICY)
    assert main(["apply", "small.zt", *inv]) == 0
    assert reads.count(True) == 2 and encoded == ["tor1", "tor1"]
    assert _passes(sw, "h1", "h3", 8080) and not _passes(sw, "h1", "h3", 8081)


def test_an_edit_reaches_the_switch_before_its_build_is_written(
    site: tuple[ReferenceSwitch, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch is set from the build directory's pipeline files: a first apply writes the
    build before it writes the switch; an edit that keeps the pipeline writes the switch
    first and the build after it, which then holds the edit's entries."""
    import p4seg.control
    import runtime.controller

    sw, inv = site
    order: list[str] = []
    real_write, real_apply_all = p4seg.control.Compiled.write, runtime.controller.apply_all

    def write(self: p4seg.control.Compiled) -> bool:
        order.append("build")
        return real_write(self)

    async def apply_all(*args: Any, **kwargs: Any) -> Any:
        order.append("switch")
        return await real_apply_all(*args, **kwargs)

    monkeypatch.setattr(p4seg.control.Compiled, "write", write)
    monkeypatch.setattr(p4seg.control, "apply_all", apply_all)
    assert main(["apply", "small.zt", *inv]) == 0
    assert order[:2] == ["build", "switch"], order
    entries = Path("build/small/entries/tor1.json")
    before = entries.read_text()
    order.clear()
    Path("small.zt").write_text(POLICY.replace("tcp 8080", "tcp 8081"))
    assert main(["apply", "small.zt", *inv]) == 0
    assert order[0] == "switch" and "build" in order, order
    assert entries.read_text() != before and '"l4_dst_port"' in entries.read_text()
    assert "8081" in entries.read_text() and "8080" not in entries.read_text()
    assert _passes(sw, "h1", "h3", 8081) and not _passes(sw, "h1", "h3", 8080)


def test_plan_apply_idempotent(
    site: tuple[ReferenceSwitch, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sw, inv = site
    assert main(["plan", "small.zt", *inv]) == 2
    assert "pipeline missing" in capsys.readouterr().out
    assert not _passes(sw, "h1", "h3", 8080)  # fail closed: nothing set yet
    assert main(["apply", "small.zt", *inv]) == 0
    assert _passes(sw, "h1", "h3", 8080) and not _passes(sw, "h3", "h1", 8080)
    capsys.readouterr()
    assert main(["apply", "small.zt", *inv, "--output", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["written"] for s in doc["switches"]] == [0]
    assert main(["plan", "small.zt", *inv]) == 0
    assert "up to date" in capsys.readouterr().out
    # A policy edit shows in the plan with the rule behind it, and --dry-run changes nothing.
    Path("small.zt").write_text(POLICY.replace("tcp 8080", "tcp 8081"))
    assert main(["apply", "small.zt", *inv, "--dry-run"]) == 2
    assert "line 5: allow front -> back tcp 8081" in capsys.readouterr().out
    assert _passes(sw, "h1", "h3", 8080)
    assert main(["apply", "small.zt", *inv]) == 0
    assert _passes(sw, "h1", "h3", 8081) and not _passes(sw, "h1", "h3", 8080)


def test_grant_revoke_quarantine_release_audited(
    site: tuple[ReferenceSwitch, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sw, inv = site
    live = ["-p", "small.zt", *inv]
    assert main(["apply", "small.zt", *inv]) == 0
    assert not _passes(sw, "h2", "h4", 443)
    assert main(["grant", "h2", "h4", "tcp", "443", "--for", "15m", *live]) == 0
    grant_id = capsys.readouterr().out.split("grant ", 1)[1].split(":")[0]
    assert _passes(sw, "h2", "h4", 443)
    assert main(["revoke", grant_id, *live]) == 0
    assert not _passes(sw, "h2", "h4", 443)
    assert main(["grant", "h2", "h4", "tcp", "443", "--for", "15 minutes", *live]) == 1
    assert main(["revoke", "nope", *live]) == 1
    # Quarantine: h1 keeps only its remediation flow; h2 is untouched.
    assert main(["quarantine", "h1", *live]) == 0
    assert not _passes(sw, "h1", "h3", 8080) and _passes(sw, "h1", "h4", 443)
    assert _passes(sw, "h2", "h3", 8080)
    assert main(["release", "h1", *live]) == 0
    assert _passes(sw, "h1", "h3", 8080)
    assert main(["release", "h1", *live]) == 1  # not quarantined any more
    capsys.readouterr()
    assert main(["audit", "verify"]) == 0
    assert "5 records, chain intact" in capsys.readouterr().out
    assert main(["audit", "show"]) == 0
    events = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()]
    assert events == ["apply", "grant", "revoke", "quarantine", "release"]
    log = Path(".p4seg/audit.jsonl")
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    assert main(["audit", "verify"]) == 1


def test_hits_and_watch_keep_going_on_a_bad_edit(
    site: tuple[ReferenceSwitch, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sw, inv = site
    assert main(["watch", "small.zt", *inv, "--once"]) == 0
    for _ in range(4):
        assert _passes(sw, "h2", "h3", 8080)
    capsys.readouterr()
    assert main(["hits", "small.zt", *inv, "--output", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_rule = {r["rule_id"]: r for r in doc["rules"]}
    assert by_rule[1]["packets"] == 4 and by_rule[2]["packets"] == 0
    assert doc["unused_allows"] == [2]
    Path("small.zt").write_text(POLICY.replace("back        tcp", "bakc tcp"))
    assert main(["watch", "small.zt", *inv, "--once"]) == 0
    assert "unknown name 'bakc'" in capsys.readouterr().err
    assert _passes(sw, "h2", "h3", 8080)  # the switches keep the last good policy


def test_watch_restores_a_restarted_switch(site: tuple[ReferenceSwitch, list[str]]) -> None:
    from p4seg.cli import _front, _parser
    from p4seg.verbs import watch_loop

    sw, inv = site
    address = sw.server_address
    args = _parser().parse_args(["watch", "small.zt", *inv, "--check", "0.2", "--interval", "0.05"])
    stop = threading.Event()
    loop = threading.Thread(target=watch_loop, args=(args, _front, stop), daemon=True)
    loop.start()
    try:
        assert wait_for(lambda: _passes(sw, "h1", "h3", 8080))
        sw.stop()  # the switch restarts: its pipeline and entries are gone
        fresh = ReferenceSwitch(device_id=1)
        fresh.start(address)
        try:
            assert not _passes(fresh, "h1", "h3", 8080)
            assert wait_for(lambda: _passes(fresh, "h1", "h3", 8080))
            assert not _passes(fresh, "h3", "h1", 8080)
        finally:
            fresh.stop()
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()


def test_an_expired_grant_is_removed_by_the_next_apply(
    site: tuple[ReferenceSwitch, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    sw, inv = site
    live = ["-p", "small.zt", *inv]
    assert main(["grant", "h2", "h4", "tcp", "443", "--for", "60s", *live]) == 0
    assert _passes(sw, "h2", "h4", 443)
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    assert main(["apply", "small.zt", *inv]) == 0  # e.g. a controller restarted after expiry
    assert not _passes(sw, "h2", "h4", 443)
    record = json.loads(Path(".p4seg/audit.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "apply" and len(record["expired_grants"]) == 1


def test_a_grant_keeps_its_rule_id_and_entries_when_another_expires(
    site: tuple[ReferenceSwitch, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import time

    sw, inv = site
    live = ["-p", "small.zt", *inv]
    assert main(["apply", "small.zt", *inv]) == 0
    # The grant that expires first is listed first: the other one's position in the
    # effective policy moves up when it goes, and must change nothing.
    assert main(["grant", "h2", "h4", "tcp", "443", "--for", "60s", *live]) == 0
    assert main(["grant", "h3", "h4", "tcp", "443", "--for", "1h", *live]) == 0
    capsys.readouterr()
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    assert main(["apply", "small.zt", *inv, "--output", "json"]) == 0
    (switch,) = json.loads(capsys.readouterr().out)["switches"]
    # Only the expired grant's policy entries go; the other's stay, unrewritten (its rule
    # key is its grant id, so its rule id holds).
    policy = switch["tables"].pop("policy")
    assert not policy["added"] and not policy["changed"] and policy["removed"]
    assert {e["rule"] for e in policy["removed"]} == {"line 10: allow h2 -> h4 tcp 443"}
    assert all(not t["added"] and not t["removed"] for t in switch["tables"].values())
    assert _passes(sw, "h3", "h4", 443) and not _passes(sw, "h2", "h4", 443)


def test_watch_removes_an_expired_grant_while_the_policy_file_is_broken(
    site: tuple[ReferenceSwitch, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Fail closed: a broken edit must not keep a grant alive past its expiry."""
    import p4seg.verbs
    from p4seg.cli import _front, _parser
    from p4seg.verbs import watch_loop

    sw, inv = site
    assert main(["grant", "h2", "h4", "tcp", "443", "--for", "60s", "-p", "small.zt", *inv]) == 0
    assert _passes(sw, "h2", "h4", 443)
    now = [p4seg.verbs.clock()]
    monkeypatch.setattr(p4seg.verbs, "clock", lambda: now[0])
    args = _parser().parse_args(["watch", "small.zt", *inv, "--check", "0.2", "--interval", "0.05"])
    stop = threading.Event()
    loop = threading.Thread(target=watch_loop, args=(args, _front, stop), daemon=True)
    loop.start()
    try:
        printed: list[str] = []

        def applied_once() -> bool:
            printed.append(capsys.readouterr().out)
            return "up to date" in "".join(printed)

        assert wait_for(applied_once)
        Path("small.zt").write_text(POLICY.replace("-> back", "-> bakc"))  # a broken edit
        errors: list[str] = []

        def refused_the_edit() -> bool:
            errors.append(capsys.readouterr().err)
            return "unknown name 'bakc'" in "".join(errors)

        assert wait_for(refused_the_edit)
        now[0] += 61  # the grant expires while the file does not compile
        assert wait_for(lambda: not _passes(sw, "h2", "h4", 443))
        assert _passes(sw, "h1", "h3", 8080)  # the rest of the last good policy stays
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()
    record = json.loads(Path(".p4seg/audit.jsonl").read_text().splitlines()[-1])
    assert record["from"] == "last good text" and len(record["expired_grants"]) == 1


def test_apply_writes_only_tables_proven_to_implement_the_policy(
    site: tuple[ReferenceSwitch, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import dataclasses

    import compiler.emit
    from compiler.lower import Lowered, lower

    sw, inv = site
    assert main(["apply", "small.zt", *inv]) == 0
    assert _passes(sw, "h1", "h3", 8080) and not _passes(sw, "h2", "h4", 443)

    def widening(*args: object, **kwargs: object) -> Lowered:
        # A compiler bug: h2 -> remediation tcp 443 slips in (the h1 rule without its source).
        lowered = lower(*args, **kwargs)  # type: ignore[arg-type]
        tor = lowered.switches[0]
        bad = [
            dataclasses.replace(e, matches=tuple(m for m in e.matches if m.field != "src_tags"))
            if e.table == "policy" and e.rule_id == 2 and e.role == "forward"
            else e
            for e in tor.entries
        ]
        return dataclasses.replace(
            lowered, switches=(dataclasses.replace(tor, entries=tuple(bad)),)
        )

    monkeypatch.setattr(compiler.emit, "lower", widening)
    Path("small.zt").write_text(POLICY.replace("tcp 8080", "tcp 8081"))
    capsys.readouterr()
    assert main(["apply", "small.zt", *inv]) == 1
    err = capsys.readouterr().err
    assert "do not implement the policy" in err and "nothing was written" in err
    assert "10.0.0.2" in err  # the counterexample: h2's packet to the remediation host
    # nothing reached the switch: the old policy still holds, the widening never did
    assert _passes(sw, "h1", "h3", 8080) and not _passes(sw, "h1", "h3", 8081)
    assert not _passes(sw, "h2", "h4", 443)
    assert main(["audit", "verify"]) == 0
    last = json.loads(Path(".p4seg/audit.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "apply" and last["result"].startswith("refused")
    # --no-verify is the operator's explicit choice
    assert main(["apply", "small.zt", *inv, "--no-verify"]) == 0
    assert _passes(sw, "h2", "h4", 443)


def _proof() -> str:
    """How the last audited write was proven."""
    last = Path(".p4seg/audit.jsonl").read_text().splitlines()[-1]
    return str(json.loads(last)["proof"])


def test_a_change_after_a_proven_apply_is_proven_by_difference(
    site: tuple[ReferenceSwitch, list[str]],
) -> None:
    sw, inv = site
    assert main(["apply", "small.zt", *inv]) == 0
    assert _proof() == "full"  # nothing proven before

    def edit(port: int, was: int, new_process: bool = False) -> str:
        """Apply the policy with the flow on `port`; how it was proven."""
        if new_process:
            verbs._PROVEN.clear()
        Path("small.zt").write_text(POLICY.replace("tcp 8080", f"tcp {port}"))
        assert main(["apply", "small.zt", *inv]) == 0
        assert _passes(sw, "h1", "h3", port) and not _passes(sw, "h1", "h3", was)
        return _proof()

    # this process proved the last build and holds its tables and its ToRs' proofs: the
    # ToR whose rule changed, from its last proof
    assert edit(8081, 8080) == "differential: rule by rule on 1 ToR"
    # a new process finds the proven build the state directory keeps (p4seg/proven.py):
    # the same pairs
    assert re.fullmatch(
        r"differential: [1-9][0-9]* pairs \(from the proven build the state keeps\)",
        edit(8082, 8081, new_process=True),
    )
    # back to a build this process proved a few builds ago (a revoke, a release): its proof
    # record says so, nothing is walked
    assert edit(8081, 8082) == verbs.EARLIER
    # one whose kept tables are not what the record names: the changed ToRs
    [kept] = Path(".p4seg/proven").glob("tor1-*.json")
    kept.write_text(kept.read_text().replace('"action": "permit"', '"action": "deny"', 1))
    assert edit(8083, 8081, new_process=True) == "differential: tor1"
    assert [p.name for p in Path(".p4seg/proven").glob("tor1-*.json")] != [kept.name]
    # an index that is not one (a disk that filled up, an edit by hand): the same
    Path(".p4seg/proven/index.json").write_text('{"format": 1, "record": {')
    assert edit(8084, 8083, new_process=True) == "differential: tor1"


def test_the_proof_record_is_read_again_only_when_its_file_changes(tmp_path: Path) -> None:
    """verbs._recorded_proof keeps what it read (or wrote) by the file's stamp: the same
    file gives the same record without a parse, a replaced one (another process, a hand
    edit) is read again, a removed one is none."""
    from compiler.verify import ProofRecord

    first = ProofRecord("inv-a", False, {"r1": ("m1", ("tor1",))}, {"tor1": "d1"})
    second = ProofRecord("inv-b", True, {}, {"tor1": "d2"})
    verbs._write_record(tmp_path / verbs.PROOF_FILE, first)
    assert verbs._recorded_proof(tmp_path) is first  # as written: not parsed again
    (tmp_path / "other").write_text(json.dumps(second.to_json()))
    os.replace(tmp_path / "other", tmp_path / verbs.PROOF_FILE)  # as another writer does
    assert verbs._recorded_proof(tmp_path) == second
    (tmp_path / verbs.PROOF_FILE).write_text("{not json")
    assert verbs._recorded_proof(tmp_path) is None
    (tmp_path / verbs.PROOF_FILE).unlink()
    assert verbs._recorded_proof(tmp_path) is None
