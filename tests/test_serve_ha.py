"""`p4seg serve --etcd`: two controllers of one floor on a real 3-member etcd cluster
(tests/etcd_cluster.py) and a reference switch judged by packets: one leads, the other
answers 503 naming it; the leader stops without resigning and the standby takes over, with
a higher election id, so that the switch refuses the old leader's late writes."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from etcd_cluster import EtcdCluster, etcd_cluster
from p4rt import wait_for
from serve_process import ServeProcesses
from test_cli_controller import _passes, site
from test_serve import OPERATOR, Served, _Loop, _serve_args, pki

from p4seg.api_auth import Access, load_access
from p4seg.cli import _front, _parser, main
from p4seg.operations import Operations
from p4seg.serve import Service, api_options, etcd_of
from p4seg.verbs import EARLIER
from runtime.etcdstore import Etcd, EtcdOptions, EtcdStore, Role
from runtime.live import LiveState
from runtime.refswitch.switch import ReferenceSwitch
from runtime.store import NotLeader

__all__ = ["etcd_cluster", "pki", "site"]  # fixtures, used by name

TTL = 2  # seconds: the leader's lease


@dataclass
class Controller:
    """One `p4seg serve --etcd` of the floor, on its own event loop."""

    service: Service
    loop: _Loop
    served: Served
    stopped: bool = False

    def role(self) -> Role:
        assert self.service.replica is not None
        return self.service.replica.elector.role

    def election_id(self) -> int:
        assert self.service.replica is not None
        return self.service.replica.elector.fence().election_id

    def stop(self, *, resign: bool = True) -> None:
        if not self.stopped:
            self.stopped = True
            self.loop.run(self.service.stop(resign=resign))
            self.loop.close()


def _controller(argv: list[str], sw: ReferenceSwitch, pki: Path, state: Path) -> Controller:
    args = _parser().parse_args(argv)
    options = api_options(args)
    assert not isinstance(options, str), options
    access = load_access(options.tokens) if options.tokens is not None else Access()
    service = Service(Operations(args, _front), options, access, etcd_of(args))
    loop = _Loop()
    loop.run(service.start())
    _, port = service.addresses[0]
    served = Served(sw, pki, f"https://127.0.0.1:{port}", "", state.resolve())
    return Controller(service, loop, served)


@pytest.fixture
def floor(
    site: tuple[ReferenceSwitch, list[str]],
    pki: Path,
    etcd_cluster: EtcdCluster,
) -> Iterator[tuple[ReferenceSwitch, list[str], list[Controller], EtcdCluster]]:
    """ctl-a (the leader, its first apply done), then ctl-b (a standby that sees it)."""
    sw, inv = site
    etcd = ",".join(f"http://{e}" for e in etcd_cluster.endpoints)
    controllers: list[Controller] = []

    def start(name: str) -> Controller:
        state = Path(f"state-{name}")
        argv = _serve_args(inv, pki, "--state", str(state), "--etcd", etcd, "--floor", "small",
                           "--etcd-ttl", str(TTL), "--etcd-name", name)  # fmt: skip
        controllers.append(_controller(argv, sw, pki, state))
        return controllers[-1]

    try:
        a = start("ctl-a")
        assert wait_for(lambda: a.role() is Role.LEADER, 30)
        assert wait_for(lambda: _passes(sw, "h1", "h3", 8080), 30)  # its first apply
        b = start("ctl-b")
        assert wait_for(lambda: b.served.status()["leader"] is not None, 30)
        yield sw, inv, controllers, etcd_cluster
    finally:
        for c in reversed(controllers):
            c.stop()


def _stored(cluster: EtcdCluster) -> tuple[LiveState, list[dict[str, Any]], bool]:
    """The floor's live state, audit records and whether the chain verifies, as etcd
    holds them (read by a store that only reads)."""

    async def read() -> tuple[str | None, list[tuple[int, bytes]], bool]:
        etcd = Etcd(EtcdOptions(cluster.endpoints, "small"))
        try:
            store = EtcdStore(etcd, None)
            doc = await store.read("live")
            verdict = await store.audit_verify()
            return None if doc is None else doc.text, await store.audit_records(), verdict.ok
        finally:
            await etcd.close()

    text, records, ok = asyncio.run(read())
    assert text is not None
    return LiveState.from_json(text, "etcd"), [json.loads(r) for _, r in records], ok


def _quarantine(c: Controller, host: str) -> tuple[int | None, dict[str, Any]]:
    code, doc = c.served.call("PUT", f"/v1/quarantine/{host}", {"reason": "EDR: beaconing"},
                              token=OPERATOR)  # fmt: skip
    return code, doc


def test_a_standby_names_the_leader_and_takes_over_when_it_dies(
    floor: tuple[ReferenceSwitch, list[str], list[Controller], EtcdCluster],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sw, inv, (a, b), cluster = floor
    a_url = a.served.url
    status_b = b.served.status()
    assert status_b["role"] == "standby"
    assert status_b["leader"]["name"] == "ctl-a" and status_b["leader"]["url"] == a_url
    assert a.served.status()["role"] == "leader"

    # Through the standby: 503 naming the leader, and nothing changes.
    code, doc = _quarantine(b, "h1")
    assert code == 503, doc
    error = doc["error"]
    assert isinstance(error, dict) and error["code"] == "standby"
    assert f"the leader is ctl-a at {a_url}" in str(error["message"])
    assert _passes(sw, "h1", "h3", 8080)

    # Through the leader: on the switch (packets) and in etcd, with its audit record.
    code, doc = _quarantine(a, "h1")
    assert code == 200, doc
    assert not _passes(sw, "h1", "h3", 8080) and _passes(sw, "h2", "h3", 8080)
    assert "h1" in _stored(cluster)[0].quarantined
    # The standby's view follows etcd (its watch turns read it every --check): it answers
    # GETs with the quarantine the leader stored.
    assert wait_for(lambda: b.served.status()["quarantined"] == ["h1"], 30)
    # A release through the standby is 503 too (not 404 from its view, which may lag).
    code, doc = b.served.call("DELETE", "/v1/quarantine/h1", {}, token=OPERATOR)
    assert code == 503 and doc["error"]["leader"]["name"] == "ctl-a", doc
    assert not _passes(sw, "h1", "h3", 8080)
    old_id = a.election_id()

    # The switch drifts from what etcd holds (as a leader dying halfway through an apply
    # would leave it): a one-shot apply from another state directory lifts the quarantine.
    assert main(["apply", "small.zt", *inv, "--state", "state-elsewhere"]) == 0
    assert _passes(sw, "h1", "h3", 8080)

    # The leader stops without resigning (as if it died): its lease runs out.
    a.stop(resign=False)
    stopped = time.monotonic()
    assert wait_for(lambda: b.role() is Role.LEADER, 30)
    took = time.monotonic() - stopped
    print(f"ctl-b took over {took:.2f} s after ctl-a stopped (lease TTL {TTL} s)")
    status_b = b.served.status()
    assert status_b["role"] == "leader" and status_b["leader"]["name"] == "ctl-b"
    new_id = b.election_id()
    assert new_id > old_id and status_b["leader"]["election_id"] == new_id

    # Its first turn applies what etcd holds: the acknowledged quarantine is back.
    assert wait_for(lambda: not _passes(sw, "h1", "h3", 8080), 30)
    assert _passes(sw, "h2", "h3", 8080)
    code, doc = _quarantine(b, "h2")
    assert code == 200, doc
    assert not _passes(sw, "h2", "h3", 8080) and not _passes(sw, "h1", "h3", 8080)
    live, records, chained = _stored(cluster)
    assert set(live.quarantined) == {"h1", "h2"} and chained
    quarantines = [(r["host"], r["actor"]) for r in records if r["event"] == "quarantine"]
    assert quarantines == [("h1", "token:soar"), ("h2", "token:soar")], records
    assert set(LiveState.load(b.served.state).quarantined) == {"h1", "h2"}

    # The deposed leader's late write: ctl-a's operations, as if it still believed it led
    # (its etcd fences bypassed: before the operation and before each write), release h1
    # with its old election id. The switch has seen ctl-b's higher id, so it does not make
    # ctl-a primary, and p4seg never bids above its own id: nothing is written, h1 stays
    # quarantined.
    late = a.service.ops
    late.replication = None
    late.args.write_fence = None
    assert late.args.election_id == old_id
    outcome = late.operate("release", "ctl-a-late", {"host": "h1"}, {})
    assert outcome.code != 0
    assert f"not the primary controller (election id {old_id}; the primary has {new_id})" in (
        outcome.errors + outcome.output
    ), outcome
    assert not _passes(sw, "h1", "h3", 8080)


def test_a_standby_keeps_the_leaders_build_compiled_and_proven(
    floor: tuple[ReferenceSwitch, list[str], list[Controller], EtcdCluster],
) -> None:
    """A standby compiles and proves what the leader applies, from etcd's state, after
    every change (p4seg/verbs.py `warm`): its build gives every switch the tables the
    leader wrote, and its takeover proves nothing again (an earlier proof of its own). Its
    backup streams (p4seg/standby.py) see the leader as every switch's primary."""
    sw, inv, (a, b), cluster = floor

    def warm_matches() -> bool:
        build = b.served.status().get("standby_build")
        leader = {s["name"]: s["tables_sha256"] for s in a.served.status()["switches"]}
        if not isinstance(build, dict):
            return False
        return build["proof"] is not None and build["tables_sha256"] == leader

    assert wait_for(warm_matches, 30), b.served.status().get("standby_build")
    assert "standby_build" not in a.served.status()  # the leader's build is its applies'
    # Its backup streams (no election id) see the leader's term as each switch's primary:
    # its follower's, its applies'.
    leading = {a.election_id()}

    def backups_see_the_leader() -> bool:
        entries = b.served.status()["switches"]
        return all(
            e.get("backup", {}).get("connected") and e["backup"]["primary_election_id"] in leading
            for e in entries
        )

    assert wait_for(backups_see_the_leader, 30), b.served.status()["switches"]
    assert all("backup" not in e for e in a.served.status()["switches"])
    assert wait_for(lambda: all(e["following"] for e in a.served.status()["switches"]), 30)
    assert not any(e["following"] for e in b.served.status()["switches"])
    before = b.served.status()["standby_build"]["tables_sha256"]
    code, doc = _quarantine(a, "h1")
    assert code == 200, doc
    assert wait_for(warm_matches, 30), b.served.status().get("standby_build")
    assert b.served.status()["standby_build"]["tables_sha256"] != before  # h1's ToR

    # The switch drifts (a one-shot apply elsewhere lifts the quarantine), the leader dies:
    # the standby's first turn writes the quarantine back with the build it proved warm.
    assert main(["apply", "small.zt", *inv, "--state", "state-elsewhere"]) == 0
    assert _passes(sw, "h1", "h3", 8080)
    a.stop(resign=False)
    assert wait_for(lambda: b.role() is Role.LEADER, 30)
    assert wait_for(lambda: not _passes(sw, "h1", "h3", 8080), 30)
    turns = [r for r in _stored(cluster)[1] if r["event"] == "watch"]
    assert turns and turns[-1]["result"] == "ok", turns
    assert turns[-1]["proof"] == EARLIER, turns[-1]  # proven while it stood by
    status = b.served.status()  # a leader: its backup streams are closed
    assert "standby_build" not in status and all("backup" not in e for e in status["switches"])


def test_bad_etcd_options_are_one_line_and_start_nothing(
    site: tuple[ReferenceSwitch, list[str]],
    pki: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, inv = site
    base = _serve_args(inv, pki, "--etcd", "http://127.0.0.1:2379")
    for extra, says in (
        (["--etcd-ttl", "0"], "p4seg serve: error: --etcd: lease TTL 0 s"),
        (["--etcd-cert", "nowhere.pem"], "p4seg serve: error: --etcd: --etcd-cert/--etcd-key"),
        (["--floor", "a/b"], "p4seg serve: error: --etcd: floor 'a/b'"),
    ):
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith(says) and err.count("\n") == 1, err
    assert not Path(".p4seg").exists()  # nothing started, nothing written


def test_kill_9_of_the_leader_process(
    site: tuple[ReferenceSwitch, list[str]],
    pki: Path,
    etcd_cluster: EtcdCluster,
) -> None:
    """Two `p4seg serve --etcd` processes; the leader is SIGKILLed (no resignation, no
    clean-up of any kind): the standby leads within the lease and keeps the quarantine."""
    sw, inv = site
    etcd = ",".join(f"http://{e}" for e in etcd_cluster.endpoints)
    common = ["small.zt", *inv, "--api-tokens", str(pki / "access.yaml")]
    ctl = ServeProcesses(Path.cwd(), common, etcd, TTL)

    def start(name: str) -> Served:
        return Served(sw, pki, ctl.start(name), "", Path())

    def status(s: Served) -> dict[str, Any]:
        code, doc = s.call("GET", "/v1/status", token=OPERATOR)
        assert code == 200, doc
        return dict(doc)

    try:
        a = start("ctl-a")
        assert wait_for(lambda: status(a)["role"] == "leader", 30)
        assert wait_for(lambda: _passes(sw, "h1", "h3", 8080), 30)
        b = start("ctl-b")
        assert wait_for(lambda: (status(b)["leader"] or {}).get("name") == "ctl-a", 30)
        assert status(b)["role"] == "standby"
        code, doc = a.call("PUT", "/v1/quarantine/h1", {"reason": "EDR"}, token=OPERATOR)
        assert code == 200, doc
        assert not _passes(sw, "h1", "h3", 8080)
        old_id = status(a)["leader"]["election_id"]

        ctl.kill("ctl-a")  # SIGKILL
        killed = time.monotonic()
        assert wait_for(lambda: status(b)["role"] == "leader", 30)
        print(f"ctl-b leads {time.monotonic() - killed:.2f} s after ctl-a was killed "
              f"(lease TTL {TTL} s)")  # fmt: skip
        assert status(b)["leader"]["election_id"] > old_id
        assert not _passes(sw, "h1", "h3", 8080)
        code, doc = b.call("PUT", "/v1/quarantine/h2", {"reason": "EDR"}, token=OPERATOR)
        assert code == 200, doc
        assert not _passes(sw, "h2", "h3", 8080) and _passes(sw, "h1", "h4", 443)  # remediation
    finally:
        ctl.stop()


def test_one_etcd_member_killed_and_the_controllers_carry_on(
    floor: tuple[ReferenceSwitch, list[str], list[Controller], EtcdCluster],
) -> None:
    """Two members of three keep quorum: quarantines and releases are acknowledged, stored
    and enforced, the standby names the leader, and the member back catches up. While the
    two elect their raft leader (the dead member may have been it) a call may be refused
    with nothing done, or the leader's lease refresh may miss it and its term renew (the
    same controller, a new election id): a call then in flight fails, unacknowledged and
    unwritten; the next one goes through."""
    sw, _, (a, b), cluster = floor
    cluster.kill(0)
    cluster.wait_healthy([1, 2])

    def leader() -> Controller | None:
        return next((c for c in (a, b) if c.role() is Role.LEADER), None)

    answers: list[tuple[int | None, dict[str, Any]]] = []

    def acknowledged(method: str, path: str, body: dict[str, str] | None = None) -> bool:
        now = leader()
        if now is not None:
            answers.append(now.served.call(method, path, body, token=OPERATOR))
        return now is not None and answers[-1][0] == 200

    assert wait_for(lambda: acknowledged("PUT", "/v1/quarantine/h1", {"reason": "x"}), 30), answers
    assert not _passes(sw, "h1", "h3", 8080) and _passes(sw, "h2", "h3", 8080)
    assert wait_for(lambda: leader() is not None, 30)
    ruling = leader()
    assert ruling is not None
    standby = b if ruling is a else a
    code, doc = standby.served.call("PUT", "/v1/quarantine/h2", {"reason": "x"}, token=OPERATOR)
    assert code == 503 and doc["error"]["code"] == "standby", doc
    assert standby.served.status()["leader"] is not None
    assert wait_for(lambda: acknowledged("DELETE", "/v1/quarantine/h1"), 30), answers[-3:]
    assert _passes(sw, "h1", "h3", 8080)
    cluster.start(0)
    cluster.wait_healthy()
    live, records, chained = _stored(cluster)
    assert live.quarantined == {} and chained
    done = [r["event"] for r in records if r["event"] in ("quarantine", "release")]
    assert done[-2:] == ["quarantine", "release"] and done.count("release") == 1, done


def test_without_etcd_quorum_nothing_changes_and_the_switch_keeps_its_policy(
    floor: tuple[ReferenceSwitch, list[str], list[Controller], EtcdCluster],
) -> None:
    sw, _, (a, b), cluster = floor
    code, doc = _quarantine(a, "h1")
    assert code == 200, doc

    cluster.kill(1)
    cluster.kill(2)  # one member of three: no quorum
    code, doc = _quarantine(a, "h2")
    assert code == 503 and doc["error"]["code"] in ("etcd_unavailable", "standby"), doc
    # The leader cannot refresh its lease: within the TTL it stops leading, and nobody can
    # win: both answer every change 503, and the switch keeps enforcing the last policy.
    assert wait_for(lambda: a.served.status()["role"] == "standby", 30)
    assert b.served.status()["role"] == "standby"
    code, doc = _quarantine(a, "h2")
    assert code == 503 and doc["error"]["code"] == "standby", doc
    assert _passes(sw, "h2", "h3", 8080) and not _passes(sw, "h1", "h3", 8080)

    cluster.start(1)
    cluster.start(2)
    cluster.wait_healthy()
    assert wait_for(lambda: Role.LEADER in (a.role(), b.role()), 30)
    leader = a if a.role() is Role.LEADER else b
    code, doc = _quarantine(leader, "h2")
    assert code == 200, doc
    assert not _passes(sw, "h2", "h3", 8080) and not _passes(sw, "h1", "h3", 8080)
    live, records, chained = _stored(cluster)
    assert set(live.quarantined) == {"h1", "h2"} and chained
    # The calls answered 503 left nothing in etcd: one record per acknowledged quarantine.
    assert [r["host"] for r in records if r["event"] == "quarantine"] == ["h1", "h2"]


def test_a_new_leader_judges_a_release_or_revocation_by_etcd_not_its_stale_copy(
    floor: tuple[ReferenceSwitch, list[str], list[Controller], EtcdCluster],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A standby's state directory is as of its last term (here: none), until its first
    turn as leader pulls: a release or a revocation it answers meanwhile must not be "not
    quarantined" / "unknown grant" from that copy while etcd holds the host or the grant."""
    sw, _, (a, b), cluster = floor
    assert b.service.ops.replication is not None
    # ctl-b's standby turns do not refresh its copy (as if etcd had been out of reach).
    monkeypatch.setattr(b.service.ops.replication, "refresh", lambda: None)
    assert _quarantine(a, "h1")[0] == 200
    body = {"src": "h2", "dst": "h4", "proto": "tcp", "ports": "443", "for": 3600}
    code, doc = a.served.call("POST", "/v1/grants", body, token=OPERATOR)
    assert code == 200, doc
    grant = doc["grant"]["id"]
    assert not _passes(sw, "h1", "h3", 8080) and _passes(sw, "h2", "h4", 443)

    # ctl-b's watch loop takes no turn (its pull once per term), as before its first one.
    pull = b.service.ops.replication.begin

    def calls_only(*, fresh: bool = True) -> int:
        if not fresh:
            raise NotLeader("held off by the test")
        return pull(fresh=fresh)

    monkeypatch.setattr(b.service.ops.replication, "begin", calls_only)
    a.stop()  # resigns: ctl-b leads at once
    assert wait_for(lambda: b.role() is Role.LEADER, 30)
    stale = LiveState.load(b.served.state)
    assert "h1" not in stale.quarantined and not stale.grants  # its copy predates the term

    code, doc = b.served.call("DELETE", "/v1/quarantine/h1", {}, token=OPERATOR)
    assert code == 200 and doc["quarantined"] is False, doc
    code, doc = b.served.call("DELETE", f"/v1/grants/{grant}", {}, token=OPERATOR)
    assert code == 200 and doc["revoked"], doc
    assert _passes(sw, "h1", "h3", 8080) and not _passes(sw, "h2", "h4", 443)
    # Now they are gone, in etcd too: 404 from what etcd holds.
    code, doc = b.served.call("DELETE", "/v1/quarantine/h1", {}, token=OPERATOR)
    assert code == 404 and doc["error"]["code"] == "not_quarantined", doc
    code, doc = b.served.call("DELETE", f"/v1/grants/{grant}", {}, token=OPERATOR)
    assert code == 404 and doc["error"]["code"] == "unknown_grant", doc
    live, _, chained = _stored(cluster)
    assert not live.quarantined and not live.grants and chained


def test_more_concurrent_calls_than_the_loop_has_threads_do_not_stall_the_leader(
    floor: tuple[ReferenceSwitch, list[str], list[Controller], EtcdCluster],
) -> None:
    """serve runs each call's verb in the event loop's default thread pool, where it waits
    for the operations lock; the leader's pull and push of etcd, under that lock, must not
    need a thread of that pool (every one may be waiting for the lock): all calls are
    answered 200, none 503 "not read or written in time"."""
    sw, _, (a, _), cluster = floor
    pool = min(32, (os.cpu_count() or 1) + 4)  # asyncio's default executor (Python 3.8+)
    replies: list[tuple[int | None, dict[str, Any]]] = []
    calls = [
        threading.Thread(target=lambda h=h: replies.append(_quarantine(a, h)))
        for h in [("h1", "h2", "h3")[i % 3] for i in range(pool + 2)]
    ]
    for call in calls:
        call.start()
    for call in calls:
        call.join()
    assert [code for code, _ in replies] == [200] * len(calls), replies
    assert set(_stored(cluster)[0].quarantined) == {"h1", "h2", "h3"}
    assert not _passes(sw, "h1", "h3", 8080) and not _passes(sw, "h2", "h3", 8080)
