"""Issue 15, during an apply: `p4seg serve --etcd` leaders (real processes) on a real
3-member etcd cluster and one reference switch that logs every write it decides
(tests/logged_switch.py).

- The leader is SIGKILLed at each point of the epoch protocol of a policy edit (the switch
  parks the write it dies after, so the point is exact): the standby takes over, finishes
  the apply, and the switch ends holding exactly the edit's compiled tables, with every
  acknowledged quarantine and grant, judged by packets.
- The leader is cut off from etcd (TCP relays the test cuts) with one write landed and one
  in flight: it writes nothing more once its lease can lapse, the standby takes over, and
  the switch refuses the write in flight (a lower election id than the new primary's).

In every case the switch's log shows that each accepted write came from the highest
election id the switch had seen, and that election ids only grew (never two primaries).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd_cluster import EtcdCluster, etcd_cluster
from finsy.proto import p4r
from logged_switch import Decided, Hold, LoggedSwitch, Pending
from p4rt import wait_for
from test_cli_controller import POLICY, _passes, small_site
from test_controller import TABLES, _held_entries, _mark
from test_serve import OPERATOR, Served, _Loop, pki
from test_store_etcd import Partition

from p4seg.cli import main
from runtime.controller import (
    ControllerError,
    ControllerOptions,
    PipelineFiles,
    SwitchTarget,
    apply_all,
)
from runtime.refswitch.device import P4RuntimeError
from runtime.refswitch.switch import ReferenceSwitch
from topologies.switches import terminate

__all__ = ["etcd_cluster", "pki"]  # fixtures, used by name

TTL = 2  # seconds: the leader's lease
ROOT = Path(__file__).resolve().parent.parent
# The edit: front -> back moves from port 8080 to 8081, back gets ssh to remediation, and
# remediation's telnet to back is denied outright: a deny entry added, so the edit takes
# the epoch protocol whose every point these tests kill at (permits alone would go without
# a flip: compiler/differential.py `monotone_change`, tests/test_monotone.py).
EDIT = (
    POLICY.replace("tcp 8080", "tcp 8081")
    + "allow back -> remediation tcp 22\ndeny remediation -> back tcp 23\n"
)


# -- what a write is, in the epoch protocol (docs/controller.md) ---------------------------


def _epoch_default(u: object) -> tuple[int, bytes] | None:
    """(epoch, digest mark) of an update of the epoch table's default entry, else None."""
    te = u.entity.table_entry  # type: ignore[attr-defined]
    if not te.is_default_action or te.table_id != TABLES.epoch_table.id:
        return None
    params = te.action.action.params
    return int.from_bytes(params[0].value, "big") if params else 0, bytes(te.metadata)


def kind(updates: tuple[Any, ...], epoch: int) -> str:
    """clear | flip | mark | entries: a write of an apply from `epoch` (one update each:
    the controllers write with --batch-size 1)."""
    [update] = updates
    default = _epoch_default(update)
    if default is None:
        return "entries"
    value, digest = default
    if digest:
        return "mark"
    return "clear" if value == epoch else "flip"


@dataclasses.dataclass(frozen=True)
class Point:
    """Where the leader dies: at the write `pick` chooses (it sees every landed write of
    the leader, or with `before`, every write about to be checked), before it lands or
    after; `then`: the leader's accepted writes of the edit, one letter per write (clear,
    entries, flip, mark), as a regular expression."""

    name: str
    before: bool
    pick: Callable[[int], Callable[[Pending], bool]]  # (epoch) -> predicate
    then: str


def _nth(n: int) -> Callable[[int], Callable[[Pending], bool]]:
    def make(_epoch: int) -> Callable[[Pending], bool]:
        seen = [0]

        def pick(_w: Pending) -> bool:
            seen[0] += 1
            return seen[0] == n

        return pick

    return make


def _kind_is(one: str, *, after_flip: bool = False) -> Callable[[int], Callable[[Pending], bool]]:
    def make(epoch: int) -> Callable[[Pending], bool]:
        flipped = [False]

        def pick(w: Pending) -> bool:
            k = kind(w.updates, epoch)
            chosen = k == one and (flipped[0] or not after_flip)
            flipped[0] = flipped[0] or k == "flip"
            return chosen

        return pick

    return make


def _letters(kinds: list[str]) -> str:
    return "".join(k[0] for k in kinds)  # clear entries flip mark


POINTS = [
    # Midway through prepare: the mark cleared and one new-epoch entry written.
    Point("prepare", False, _nth(2), "ce"),
    # Every prepare write landed; the flip never left the leader.
    Point("prepared", True, _kind_is("flip"), "ce+"),
    # The flip landed: packets are judged by the edit, the old epoch's entries remain.
    Point("flipped", False, _kind_is("flip"), "ce+f"),
    # Midway through finish: one old-epoch entry removed (or one copy made a wildcard).
    Point("finishing", False, _kind_is("entries", after_flip=True), "ce+fe"),
    # Everything written but the mark: the switch holds the edit but does not claim it.
    Point("finished", True, _kind_is("mark"), "ce+fe+"),
]


# -- the write fence, alone --------------------------------------------------------------


def test_an_apply_asks_the_write_fence_before_every_write(
    fabric: tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]],
) -> None:
    """ControllerOptions.fence (serve --etcd: p4seg/replication.py's still_leads) is asked
    before arbitrating and before every batch; once it refuses, nothing more is written,
    and the next apply converges."""
    switches, files, refs = fabric
    one = [t for t in switches if t.name == "tor-alg"]
    device = refs["tor-alg"].device
    writes: list[int] = []
    real_write = device.write

    def counted(updates: Any) -> Any:
        updates = list(updates)
        writes.append(len(updates))
        return real_write(updates)

    device.write = counted  # type: ignore[method-assign]
    asked: list[int] = []

    def fence(election_id: int) -> None:
        asked.append(election_id)
        if len(asked) > 3:  # arbitration, then two batches
            raise ControllerError("ctl-a is not the leader: nothing more written")

    options = ControllerOptions(election_id=7, batch_size=10, fence=fence)
    (report,) = asyncio.run(apply_all(one, TABLES, files, options))
    assert report.error == "ctl-a is not the leader: nothing more written"
    assert asked == [7] * 4 and writes == [10, 10] and report.written == 20
    (again,) = asyncio.run(apply_all(one, TABLES, files, ControllerOptions(batch_size=10)))
    assert again.ok and again.written > 0
    assert _held_entries(refs["tor-alg"]) == {
        e.SerializeToString(deterministic=True) for e in one[0].desired.entries.values()
    }


# -- the floor: a logged switch, an etcd cluster, serve processes ---------------------------


@pytest.fixture
def site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[LoggedSwitch, list[str]]]:
    """test_cli_controller's one-ToR floor, on a LoggedSwitch."""
    yield from small_site(LoggedSwitch(device_id=1), tmp_path, monkeypatch)


@dataclasses.dataclass
class Serve:
    """One `p4seg serve --etcd` process of the floor (its own state and build directories,
    as on its own machine; the policy file is the same edit on both)."""

    name: str
    proc: subprocess.Popen[bytes]
    served: Served
    out: Path

    def status(self) -> dict[str, Any]:
        code, doc = self.served.call("GET", "/v1/status", token=OPERATOR)
        assert code == 200, (code, doc, self.output())
        return dict(doc)

    def election_id(self) -> int:
        leader = self.status()["leader"]
        assert leader is not None and leader["name"] == self.name, leader
        return int(leader["election_id"])

    def output(self) -> str:
        return self.out.read_text(errors="replace")[-4000:]


@pytest.fixture
def serves(
    site: tuple[LoggedSwitch, list[str]], pki: Path
) -> Iterator[Callable[[str, tuple[str, ...]], Serve]]:
    """start(name, etcd endpoints): a serve process, its API up."""
    sw, inv = site
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started: list[Serve] = []

    def start(name: str, endpoints: tuple[str, ...]) -> Serve:
        out = Path(f"{name}.out")
        argv = ["serve", "small.zt", *inv, "--api", "127.0.0.1:0", "--api-plain",
                "--api-tokens", str(pki / "access.yaml"), "--state", f"state-{name}",
                "--build", f"build-{name}", "--interval", "0.05", "--batch-size", "1",
                "--etcd", ",".join(f"http://{e}" for e in endpoints), "--etcd-ttl", str(TTL),
                "--etcd-name", name]  # fmt: skip
        with out.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "p4seg", *argv], stdout=sink,
                                    stderr=subprocess.STDOUT, env=env)  # fmt: skip
        serve = Serve(name, proc, Served(sw, pki, "", "", Path(f"state-{name}")), out)
        started.append(serve)
        assert wait_for(lambda: b"/v1/status" in out.read_bytes(), 60), serve.output()
        banner = out.read_text().split("p4seg serve: API on ", 1)[1].split()[0]
        serve.served.url = banner.removesuffix("/v1/status").rstrip(",")
        return serve

    try:
        yield start
    finally:
        for s in started:
            terminate(s.proc, 30)


def _leading_pair(
    start: Callable[[str, tuple[str, ...]], Serve],
    sw: LoggedSwitch,
    a_endpoints: tuple[str, ...],
    b_endpoints: tuple[str, ...],
) -> tuple[Serve, Serve]:
    """ctl-a leads (its first apply done), ctl-b is a standby that names it."""
    a = start("ctl-a", a_endpoints)
    assert wait_for(lambda: a.status()["role"] == "leader", 30), a.output()
    assert wait_for(lambda: _marked(sw), 30), a.output()  # its first apply, marked
    b = start("ctl-b", b_endpoints)
    assert wait_for(lambda: (b.status()["leader"] or {}).get("name") == "ctl-a", 30), b.output()
    assert b.status()["role"] == "standby"
    return a, b


def _marked(sw: LoggedSwitch) -> bool:
    """The switch holds a pipeline and claims a build (an apply ended)."""
    try:
        return _mark(sw) != b""
    except P4RuntimeError:  # no pipeline yet
        return False


def _operate(s: Serve, method: str, path: str, body: dict[str, object]) -> dict[str, Any]:
    code, doc = s.served.call(method, path, body, token=OPERATOR)
    assert code == 200, (code, doc)
    return dict(doc)


def _epoch(sw: LoggedSwitch) -> int:
    (default,) = sw.device.read([_default_entity()])
    params = default.table_entry.action.action.params
    return int.from_bytes(params[0].value, "big") if params else 0


def _default_entity() -> p4r.Entity:
    e = p4r.Entity()
    e.table_entry.table_id = TABLES.epoch_table.id
    e.table_entry.is_default_action = True
    return e


def only_the_highest_wrote(log: list[Decided], leaders: set[int]) -> None:
    """Every accepted write came from the highest election id the switch had seen and at
    least every id any earlier write carried; ids only grew; each is an etcd leader's."""
    seen = 0
    for d in log:
        if d.accepted:
            assert d.election_id == d.highest and d.election_id >= seen, (d, seen)
            assert d.election_id in leaders, (d.election_id, leaders)
        seen = max(seen, d.election_id)


def _writes(log: list[Decided], election_id: int, since: int = 0) -> list[Decided]:
    return [d for d in log[since:] if d.election_id == election_id]


def _plan_is_empty(state: str) -> bool:
    """`p4seg plan --full-read` from `state` (what etcd holds, as the leader pulled it):
    every table of the switch read back equals the compiled edit."""
    return main(["plan", "small.zt", "-i", "small.yaml", "--state", state, "--build", "build-plan",
                 "--full-read"]) == 0  # fmt: skip


def _new_policy_on_the_wire(sw: LoggedSwitch) -> None:
    """The edit, with h2 quarantined and the grant h3 -> h1 tcp 9000, judged by packets."""
    assert _passes(sw, "h1", "h3", 8081) and not _passes(sw, "h1", "h3", 8080)
    assert not _passes(sw, "h2", "h3", 8081)  # quarantined (acknowledged before the edit)
    assert _passes(sw, "h3", "h4", 22)  # the edit's new rule
    assert _passes(sw, "h1", "h4", 443) and not _passes(sw, "h1", "h4", 22)
    assert _passes(sw, "h3", "h1", 9000)  # the grant (acknowledged before the edit)


# -- SIGKILL at each point of the epoch protocol ------------------------------------------


@pytest.mark.parametrize("point", POINTS, ids=[p.name for p in POINTS])
def test_a_leader_killed_mid_apply_is_finished_by_the_standby(
    point: Point,
    site: tuple[LoggedSwitch, list[str]],
    serves: Callable[[str, tuple[str, ...]], Serve],
    etcd_cluster: EtcdCluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sw, _ = site
    a, b = _leading_pair(serves, sw, etcd_cluster.endpoints, etcd_cluster.endpoints)
    # Acknowledged before the edit: in etcd, and so on the switch after any takeover.
    _operate(a, "PUT", "/v1/quarantine/h2", {"reason": "EDR: beaconing"})
    _operate(a, "POST", "/v1/grants", {"src": "h3", "dst": "h1", "proto": "tcp",
                                       "ports": "9000", "for": "1h"})  # fmt: skip
    a_id, epoch, since = a.election_id(), _epoch(sw), len(sw.log)
    pick = point.pick(epoch)
    hold = sw.hold(lambda w: w.election_id == a_id and pick(w), before=point.before)
    Path("small.zt").write_text(EDIT)  # ctl-a's watch loop applies it

    assert hold.held.wait(60), a.output()
    a.proc.kill()  # SIGKILL: no resignation, no answer awaited
    killed = time.monotonic()
    a.proc.wait()
    at_kill = _held_entries(sw)
    a_kinds = [kind(d.updates, epoch) for d in _writes(sw.log, a_id, since) if d.accepted]
    assert re.fullmatch(point.then, _letters(a_kinds)), a_kinds
    # Left halfway, the switch judges packets by one policy whole: the edit once flipped.
    flipped = "flip" in a_kinds
    assert _passes(sw, "h1", "h3", 8081) is flipped and _passes(sw, "h1", "h3", 8080) is not flipped
    hold.release(drop=point.before)  # held before the check: it never left the leader

    assert wait_for(lambda: b.status()["role"] == "leader", 30), b.output()
    leads = time.monotonic() - killed
    b_id = b.election_id()
    assert b_id > a_id

    def b_marked() -> bool:
        return any(d.accepted and kind(d.updates, epoch) == "mark" for d in _writes(sw.log, b_id))

    assert wait_for(b_marked, 30), b.output()
    first = min(d.at for d in _writes(sw.log, b_id) if d.accepted) - killed
    with capsys.disabled():
        print(f"\n[{point.name}] ctl-b leads {leads:.2f} s after ctl-a was killed, first write "
              f"on the switch after {first:.2f} s (lease TTL {TTL} s)")  # fmt: skip

    log = sw.log
    only_the_highest_wrote(log, {a_id, b_id})
    assert not [d for d in log if not d.accepted]  # nobody was refused: one primary at a time
    b_writes = [d for d in _writes(log, b_id) if d.accepted]
    b_kinds = [kind(d.updates, epoch) for d in b_writes]
    assert b_kinds[-1] == "mark" and "mark" not in b_kinds[:-1], b_kinds
    if point.name != "finished":
        assert "entries" in b_kinds, b_kinds  # it finished the apply, not only marked it
    # Finished without rewriting what the switch already held right (docs/controller.md).
    final = _held_entries(sw)
    for d in b_writes:
        [u] = d.updates
        entry = u.entity.table_entry.SerializeToString(deterministic=True)
        if u.type == u.INSERT:
            assert entry not in at_kill, "re-inserted an entry the switch already held"
        if u.type == u.DELETE:
            assert not (entry in at_kill and entry in final), "deleted an entry that was right"

    assert _plan_is_empty("state-ctl-b")
    _new_policy_on_the_wire(sw)


# -- a leader cut off from etcd, with a switch ---------------------------------------------


@pytest.fixture
def relays(etcd_cluster: EtcdCluster) -> Iterator[tuple[tuple[str, ...], Callable[[], None]]]:
    """One TCP relay per etcd member (test_store_etcd's Partition, on a loop of its own):
    (the relays' endpoints, cut) — cut drops every connection and refuses new ones."""
    loop = _Loop()
    parts = [Partition(e) for e in etcd_cluster.endpoints]

    async def cut() -> None:
        for p in parts:
            p.cut()

    try:
        yield tuple(loop.run(p.start()) for p in parts), lambda: loop.run(cut())
    finally:
        loop.run(cut())
        loop.close()


def _cut_mid_apply(
    sw: LoggedSwitch,
    serves: Callable[[str, tuple[str, ...]], Serve],
    etcd_cluster: EtcdCluster,
    relays: tuple[tuple[str, ...], Callable[[], None]],
    *,
    before: bool,
) -> tuple[Serve, Serve, int, int, Hold, float]:
    """ctl-a (through the relays) leads and applies the edit; its second write is parked
    (`before` the switch checks it: in flight; else landed, ctl-a awaiting the answer)
    when the relays are cut. Returns ctl-a, ctl-b, ctl-a's election id, the switch's
    epoch before the edit, the hold and when the relays were cut."""
    via, cut = relays
    a, b = _leading_pair(serves, sw, via, etcd_cluster.endpoints)
    _operate(a, "PUT", "/v1/quarantine/h2", {"reason": "EDR: beaconing"})  # acknowledged
    a_id, epoch = a.election_id(), _epoch(sw)
    second = _nth(2)(0)
    hold = sw.hold(lambda w: w.election_id == a_id and second(w), before=before)
    Path("small.zt").write_text(EDIT)  # ctl-a's watch loop applies it
    assert hold.held.wait(60), a.output()
    cut()
    return a, b, a_id, epoch, hold, time.monotonic()


def _b_took_over(b: Serve, sw: LoggedSwitch, epoch: int) -> int:
    """ctl-b leads and has applied (its mark is on the switch); its election id."""
    assert wait_for(lambda: b.status()["role"] == "leader", 30), b.output()
    b_id = b.election_id()

    def marked() -> bool:
        return any(d.accepted and kind(d.updates, epoch) == "mark" for d in _writes(sw.log, b_id))

    assert wait_for(marked, 30), b.output()
    return b_id


def _only_b_state(a: Serve, sw: LoggedSwitch) -> None:
    """ctl-a is a standby that refuses changes; the switch holds ctl-b's apply of the edit."""
    assert wait_for(lambda: a.status()["role"] == "standby", 30), a.output()
    code, doc = a.served.call("PUT", "/v1/quarantine/h1", {"reason": "late"}, token=OPERATOR)
    assert code == 503 and doc["error"]["code"] == "standby", (code, doc)
    assert _plan_is_empty("state-ctl-b")
    assert _passes(sw, "h1", "h3", 8081) and not _passes(sw, "h1", "h3", 8080)
    assert not _passes(sw, "h2", "h3", 8081) and _passes(sw, "h3", "h4", 22)


def test_a_leader_cut_off_from_etcd_mid_apply_writes_nothing_more(
    site: tuple[LoggedSwitch, list[str]],
    serves: Callable[[str, tuple[str, ...]], Serve],
    etcd_cluster: EtcdCluster,
    relays: tuple[tuple[str, ...], Callable[[], None]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ctl-a's write landed and it awaits the answer when it loses etcd. It stops leading
    when it can no longer be sure of its lease (before the lease can expire: etcdstore's
    margin); its answer then arrives, and its apply sends nothing more, though the switch
    would still take it (ctl-b has not won yet)."""
    sw, _ = site
    a, b, a_id, epoch, hold, cut = _cut_mid_apply(sw, serves, etcd_cluster, relays, before=False)
    # serve prints the elector's warnings on stderr: the moment ctl-a gives up leading.
    assert wait_for(lambda: "no longer leads" in a.output(), 30), a.output()
    stopped = time.monotonic() - cut
    parked = len(sw.log)  # the landed write is the log's last decision
    hold.release()
    # Its apply ends (status waits for it), having sent nothing more.
    assert wait_for(lambda: a.status()["role"] == "standby", 30), a.output()
    log = sw.log
    assert log[parked - 1].election_id == a_id and log[parked - 1].accepted
    late = [kind(d.updates, epoch) for d in _writes(log, a_id, parked)]
    assert not late, f"ctl-a wrote after it stopped leading: {late}"
    b_id = _b_took_over(b, sw, epoch)
    leads = min(d.at for d in _writes(sw.log, b_id)) - cut
    with capsys.disabled():
        print(f"\nctl-a stopped leading {stopped:.2f} s after the cut; ctl-b's first write "
              f"{leads:.2f} s after it (lease TTL {TTL} s)")  # fmt: skip
    _only_b_state(a, sw)
    assert not _writes(sw.log, a_id, parked)
    only_the_highest_wrote(sw.log, {a_id, b_id})


def test_a_deposed_leaders_write_in_flight_is_refused_by_the_switch(
    site: tuple[LoggedSwitch, list[str]],
    serves: Callable[[str, tuple[str, ...]], Serve],
    etcd_cluster: EtcdCluster,
    relays: tuple[tuple[str, ...], Callable[[], None]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ctl-a's write is in flight when it loses etcd, and reaches the switch only after
    ctl-b has won and applied: the switch refuses it (ctl-b's election id is higher)."""
    sw, _ = site
    a, b, a_id, epoch, hold, cut = _cut_mid_apply(sw, serves, etcd_cluster, relays, before=True)
    b_id = _b_took_over(b, sw, epoch)
    with capsys.disabled():
        print(f"\nctl-b's first write {min(d.at for d in _writes(sw.log, b_id)) - cut:.2f} s "
              f"after ctl-a was cut off (lease TTL {TTL} s)")  # fmt: skip
    hold.release()  # ctl-a's write arrives now

    def refused() -> list[Decided]:
        return [d for d in sw.log if not d.accepted]

    assert wait_for(lambda: bool(refused()), 30)
    [late] = refused()
    assert late.election_id == a_id < b_id == late.highest
    assert kind(late.updates, epoch) == "entries"  # the edit's first entry, never written
    _only_b_state(a, sw)
    assert refused() == [late]  # and ctl-a tried nothing else
    only_the_highest_wrote(sw.log, {a_id, b_id})
