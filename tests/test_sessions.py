"""The long-lived controller (runtime/sessions.py) against reference switches on loopback:
applies write through its sessions without arbitrating, an apply that must set the pipeline
steps a session aside and the session comes back, and nothing is left registered after."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from finsy import Switch, SwitchOptions
from finsy.proto import p4r
from p4rt import wait_for
from test_controller import NEEDS_BMV2, _bmv2, _count, _on_bmv2, _write_faults

import runtime.controller
from compiler.check import check_policy
from compiler.emit import build
from compiler.inventory import Inventory
from compiler.model import Policy
from p4src.spec import PIPELINE
from runtime.controller import (
    ControllerOptions,
    PipelineFiles,
    SwitchTarget,
    apply_all,
    plan_all,
)
from runtime.plan import Desired, Tables
from runtime.refswitch.switch import ReferenceSwitch
from runtime.sessions import Sessions, running

TABLES = Tables(PIPELINE)
OPTIONS = ControllerOptions(timeout=20)
Fabric = tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]]


def _held(sw: ReferenceSwitch) -> set[bytes]:
    entity = p4r.Entity()
    entity.table_entry.meter_config.SetInParent()
    return {e.table_entry.SerializeToString(deterministic=True) for e in sw.device.read([entity])}


def _wanted(target: SwitchTarget) -> set[bytes]:
    return {e.SerializeToString(deterministic=True) for e in target.desired.entries.values()}


def _arbitrations(sw: ReferenceSwitch) -> Callable[[], int]:
    """Counts the switch's arbitration requests from now on (every session opened makes one)."""
    arbiter = sw.service.arbiter
    update, seen = arbiter.update, [0]

    def counted(client: object, msg: p4r.MasterArbitrationUpdate) -> None:
        seen[0] += 1
        update(client, msg)  # type: ignore[arg-type]

    arbiter.update = counted  # type: ignore[method-assign]
    return lambda: seen[0]


def _edited_policy(floor: Inventory, text: str) -> tuple[Policy, str]:
    """The trading floor's policy with one rule's port changed (its `expect` lines gone)."""
    text = text.replace("tcp 9876\n", "tcp 9877\n", 1)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("expect"))
    result = check_policy(text, "p.zt", floor)
    assert result.policy is not None
    return result.policy, text


def _edited(switches: list[SwitchTarget], floor: Inventory, text: str) -> list[SwitchTarget]:
    """The targets of the trading floor with one rule's port changed."""
    policy, text = _edited_policy(floor, text)
    edited = {s.switch: s for s in build(policy, floor, text, "ref").switches}
    return [
        dataclasses.replace(t, desired=Desired.of(TABLES, edited[t.name], 255)) for t in switches
    ]


def test_applies_write_through_the_sessions_without_opening_one(
    fabric: Fabric, floor: Inventory, floor_policy_text: str
) -> None:
    switches, files, refs = fabric
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, OPTIONS)))
    new = _edited(switches, floor, floor_policy_text)
    with running(Sessions(OPTIONS), switches, files) as sessions:
        assert all(sessions.usable(t.name) for t in switches)
        opened = {name: _arbitrations(sw) for name, sw in refs.items()}
        reports = asyncio.run(apply_all(new, TABLES, files, OPTIONS))
        assert all(r.ok and r.shared for r in reports), [(r.switch, r.error) for r in reports]
        assert {r.switch for r in reports if r.written} == {"tor-alg", "tor-oms"}
        assert sessions.lent == len(switches) and not sessions.gaps
        assert {name: count() for name, count in opened.items()} == dict.fromkeys(refs, 0)
        for target in new:
            assert _held(refs[target.name]) == _wanted(target), target.name
            # The writes carried the applies' election id: the sessions' is the primary's.
            primary = refs[target.name].service.arbiter.primaries()
            assert [c.election_id for c in primary] == [OPTIONS.election_id]
    # Nothing is left registered, and no stream of ours holds the id: a session of its own.
    assert not runtime.controller._SHARED
    back = asyncio.run(apply_all(switches, TABLES, files, OPTIONS))
    assert all(r.ok and not r.shared for r in back), [(r.switch, r.error) for r in back]
    assert all(_held(refs[t.name]) == _wanted(t) for t in switches)


def test_an_apply_that_sets_the_pipeline_steps_the_session_aside(fabric: Fabric) -> None:
    switches, files, refs = fabric
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, OPTIONS)))
    victim = switches[0]
    with running(Sessions(OPTIONS), switches, files) as sessions:
        # The switch restarts empty: no pipeline, no entries, no sessions.
        refs[victim.name].stop()
        fresh = ReferenceSwitch(victim.device_id)
        fresh.start(victim.address)
        refs[victim.name] = fresh  # the fixture stops it
        reports = {r.switch: r for r in asyncio.run(apply_all(switches, TABLES, files, OPTIONS))}
        assert all(r.ok for r in reports.values()), [r.error for r in reports.values()]
        assert reports[victim.name].pipeline == "missing" and not reports[victim.name].shared
        assert all(r.shared for name, r in reports.items() if name != victim.name)
        assert _held(fresh) == _wanted(victim)
        # The session stepped aside for it, and is back: the next apply goes through it.
        assert sessions.wait_usable(victim.name, 30)
        assert len(sessions.gaps) == 1
        [again] = asyncio.run(apply_all([victim], TABLES, files, OPTIONS))
        assert again.ok and again.shared and again.written == 0


def test_sessions_end_and_unregister_when_the_caller_fails(fabric: Fabric) -> None:
    switches, files, _ = fabric
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, OPTIONS)))
    with pytest.raises(RuntimeError), running(Sessions(OPTIONS), switches, files):
        assert runtime.controller._SHARED
        raise RuntimeError("the caller failed")
    assert not runtime.controller._SHARED
    again = asyncio.run(apply_all(switches, TABLES, files, OPTIONS))
    assert all(r.ok and not r.shared for r in again), [r.error for r in again]


@pytest.mark.parametrize("offset", [-1, 1], ids=["older", "newer"])
def test_another_controllers_apply_is_never_lent_a_session(
    fabric: Fabric, floor: Inventory, floor_policy_text: str, offset: int
) -> None:
    switches, files, refs = fabric
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, OPTIONS)))
    new = {t.name: t for t in _edited(switches, floor, floor_policy_text)}
    with running(Sessions(OPTIONS), switches, files) as sessions:
        # Another etcd leader's apply (fenced: it writes as its own id or not at all).
        election_id = OPTIONS.election_id + offset
        other = dataclasses.replace(OPTIONS, election_id=election_id, fenced=True)
        [report] = asyncio.run(apply_all([new["tor-alg"]], TABLES, files, other))
        assert not report.shared and sessions.lent == 0
        if offset < 0:  # an older one is no primary on a session of its own: nothing written
            assert not report.ok and report.written == 0
            assert "not the primary controller" in (report.error or "")
            assert _held(refs["tor-alg"]) == _wanted(_by(switches)["tor-alg"])
        else:  # a newer one writes, as itself
            assert report.ok and _held(refs["tor-alg"]) == _wanted(new["tor-alg"])


def _by(switches: list[SwitchTarget]) -> dict[str, SwitchTarget]:
    return {t.name: t for t in switches}


def test_within_its_tenure_a_session_reads_nothing_and_another_primary_ends_it(
    fabric: Fabric, floor: Inventory, floor_policy_text: str
) -> None:
    """Only the primary writes: while a session stays the primary, the switch holds what it
    last marked it with, and an apply confirms it without a read. Another primary (who may
    have written) ends that: the next apply reads the switch's mark again."""
    switches, files, refs = fabric
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, OPTIONS)))
    new = _edited(switches, floor, floor_policy_text)
    with running(Sessions(OPTIONS), switches, files) as sessions:
        assert all(r.ok and r.shared for r in asyncio.run(apply_all(new, TABLES, files, OPTIONS)))
        traffic = {name: _count(sw) for name, sw in refs.items()}
        again = asyncio.run(apply_all(new, TABLES, files, OPTIONS))
        assert all(r.ok and r.shared and r.written == 0 and not r.in_full for r in again)
        assert all((t.writes, t.full_reads, t.small_reads) == (0, 0, 0) for t in traffic.values())

        async def another_primary() -> None:  # connects above us, writes nothing, leaves
            options = SwitchOptions(p4info=files.p4info_path, device_id=new[0].device_id,
                                    initial_election_id=OPTIONS.election_id + 90)  # fmt: skip
            async with Switch("other", new[0].address, options) as other:
                assert other.is_primary

        asyncio.run(another_primary())
        assert wait_for(lambda: sessions.usable(new[0].name))  # ours again, at its bid
        traffic = {name: _count(sw) for name, sw in refs.items()}
        third = asyncio.run(apply_all(new, TABLES, files, OPTIONS))
        assert all(r.ok and r.shared and r.written == 0 for r in third)
        reads = {name: t.small_reads for name, t in traffic.items()}
        assert reads.pop(new[0].name) >= 1  # its mark (and cookie) read again
        assert set(reads.values()) == {0}  # the others' sessions stayed the primary


def test_an_apply_that_fails_midway_ends_what_the_session_knew(
    fabric: Fabric, floor: Inventory, floor_policy_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed apply leaves the switch holding neither build: the session must not go on
    believing it holds the one it marked before, or going back to that build would write
    nothing."""
    switches, files, refs = fabric
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, OPTIONS)))
    new = {t.name: t for t in _edited(switches, floor, floor_policy_text)}
    alg = _by(switches)["tor-alg"]
    with running(Sessions(OPTIONS), switches, files):
        [known] = asyncio.run(apply_all([alg], TABLES, files, OPTIONS))  # marks it A
        assert known.ok and known.shared
        policy = PIPELINE.table("policy").id
        taken: list[bytes] = []

        def fail(update: p4r.Update) -> bool:  # every `policy` update but the first
            if update.entity.table_entry.table_id != policy:
                return False
            taken.append(update.SerializeToString(deterministic=True))
            return taken[0] != taken[-1]

        with monkeypatch.context() as faults:
            _write_faults(faults, fail)
            [failed] = asyncio.run(apply_all([new["tor-alg"]], TABLES, files, OPTIONS))
        assert not failed.ok and failed.shared and failed.written == 1  # one entry of B
        [back] = asyncio.run(apply_all([alg], TABLES, files, OPTIONS))
        assert back.ok and back.shared and back.written > 0
        assert _held(refs["tor-alg"]) == _wanted(alg)


@NEEDS_BMV2
def test_bmv2_takes_applies_on_a_long_lived_session(
    tmp_path: Path, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    """simple_switch_grpc: the pipeline set by an apply's own session (the long-lived one
    steps aside), then an edit and a no-op on the long-lived session, no read in its tenure."""
    with _bmv2() as grpc_port:
        built = build(floor_policy, floor, floor_policy_text, "bmv2")
        target, tables, files = _on_bmv2(built, floor, tmp_path, grpc_port)
        options = ControllerOptions(timeout=60)
        edited_policy, text = _edited_policy(floor, floor_policy_text)
        edited = build(edited_policy, floor, text, "bmv2", allocation=built.allocation)
        (new,) = [
            dataclasses.replace(target, desired=Desired.of(tables, s, 255))
            for s in edited.switches
            if s.switch == target.name
        ]
        with running(Sessions(options), [target], files, wait=5) as sessions:
            (first,) = asyncio.run(apply_all([target], tables, files, options))
            assert first.ok and first.pipeline == "missing" and not first.shared, first.error
            assert sessions.wait_usable(target.name, 30)
            (changed,) = asyncio.run(apply_all([new], tables, files, options))
            assert changed.ok and changed.shared and changed.written > 0, changed.error
            (again,) = asyncio.run(apply_all([new], tables, files, options))
            assert again.ok and again.shared and again.written == 0 and not again.in_full
        full = dataclasses.replace(options, full_read=True)
        (planned,) = asyncio.run(plan_all([new], tables, files, full))
        assert planned.ok and planned.plan is not None and planned.plan.empty  # BMv2 holds it


def test_an_apply_whose_lent_work_the_sessions_end_is_told_it_was_not_lent(
    fabric: Fabric,
) -> None:
    """When the sessions' loop ends a lent write (the sessions stop: serve --etcd's term
    is over), the apply that borrowed the session hears "not lent" and goes on as with a
    session that is not usable; it is not itself cancelled — the watch loop that ran it
    would die, and with it every expiry."""
    switches, files, _refs = fabric
    with running(Sessions(OPTIONS), switches, files) as sessions:
        writing = threading.Event()

        async def work(_sw: object, _client: object, _tenure: object) -> bool:
            writing.set()
            await asyncio.Event().wait()  # until the sessions end it
            return True

        def end_the_lent_work() -> None:
            for task in asyncio.all_tasks():
                if "lend.<locals>.lent" in task.get_coro().__qualname__:  # type: ignore[union-attr]
                    task.cancel()

        lent: list[bool] = []
        borrower = threading.Thread(
            target=lambda: lent.append(
                asyncio.run(sessions.lend(switches[0].name, OPTIONS.election_id, work))
            )
        )
        borrower.start()
        assert writing.wait(10)
        assert sessions._loop is not None
        sessions._loop.call_soon_threadsafe(end_the_lent_work)
        borrower.join(10)
        assert lent == [False]
