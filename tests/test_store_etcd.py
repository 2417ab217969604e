"""Controller state in a real 3-member etcd cluster (tests/etcd_cluster.py): one leader,
election ids that only grow, failover after a SIGKILL, fencing of a deposed or partitioned
leader, an audit chain that never forks, a dead member survived, quorum loss refused with a
typed error and nothing half written, and the state documents round trip (in etcd and in
the state directory, through the same protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
from etcd_cluster import ETCD, EtcdCluster, etcd_cluster, start_cluster
from pki import make_pki

from compiler.allocation import Allocation
from p4seg.cli import main as cli
from runtime import audit
from runtime.etcdstore import (
    ELECTION_BASE,
    REFRESHES,
    Etcd,
    EtcdOptions,
    Replica,
    Role,
    parse_endpoints,
    status,
    wants_tls,
)
from runtime.live import LiveState
from runtime.store import (
    ALLOCATION,
    LIVE,
    Conflict,
    DirStore,
    Document,
    NotLeader,
    StateMirror,
    StateStore,
    StoreError,
    StoreUnavailable,
    load_allocation,
    load_live,
)

__all__ = ["etcd_cluster"]  # the fixture, used by name

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def options(cluster: EtcdCluster, name: str, **kw: object) -> EtcdOptions:
    return EtcdOptions(cluster.endpoints, "floor", name=name, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def seats(*opts: EtcdOptions) -> AsyncIterator[list[Replica]]:
    replicas = [Replica.open(o) for o in opts]
    try:
        for r in replicas:
            await r.start()
        yield replicas
    finally:
        for r in replicas:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r.close(), 5)


async def one_leader(replicas: list[Replica], timeout: float = 10) -> Replica:
    """The replica that leads, once exactly one does and every other has seen it."""
    async with asyncio.timeout(timeout):
        while True:
            leaders = [r for r in replicas if r.elector.role is Role.LEADER]
            if len(leaders) == 1:
                name = leaders[0].elector.options.who
                if all(r.elector.leader and r.elector.leader.name == name for r in replicas):
                    return leaders[0]
            await asyncio.sleep(0.02)  # polling a condition


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


# -- options ------------------------------------------------------------------------------


def test_endpoints_parse_and_bad_ones_are_named() -> None:
    assert parse_endpoints("http://127.0.0.1:2379, https://etcd1:2380,10.0.0.1:1") == (
        "127.0.0.1:2379",
        "etcd1:2380",
        "10.0.0.1:1",
    )
    for bad in ("127.0.0.1", "ftp://a:1", "http://a:1/v3", "a:99999", ""):
        with pytest.raises(ValueError, match="--etcd"):
            parse_endpoints(bad)
    assert wants_tls("https://a:1,https://b:2") and not wants_tls("a:1,http://b:2")
    with pytest.raises(ValueError, match="mixes"):
        wants_tls("https://a:1,b:2")
    with pytest.raises(ValueError, match="margin"):
        EtcdOptions(("a:1",), "floor", ttl=1, margin=0.6)
    with pytest.raises(ValueError, match="floor"):
        EtcdOptions(("a:1",), "floor/../x")


# -- election -------------------------------------------------------------------------------


def test_one_leader_and_each_new_leader_outranks_the_last(etcd_cluster: EtcdCluster) -> None:
    async def main() -> list[int]:
        ids: list[int] = []
        async with seats(*(options(etcd_cluster, f"c{i}") for i in range(3))) as replicas:
            live = list(replicas)
            while live:
                leader = await one_leader(live)
                term = leader.elector.fence()
                assert term.election_id == ELECTION_BASE + term.create_revision
                ids.append(term.election_id)
                live.remove(leader)
                await leader.close()  # resigns: the lease is revoked, a standby wins at once
        return ids

    ids = run(main())
    assert len(ids) == 3 and ids == sorted(ids) and len(set(ids)) == 3, ids


def test_a_leader_keeps_its_term_across_many_lease_ttls(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        async with seats(options(etcd_cluster, "c0", ttl=1, margin=0.2)) as (leader,):
            await leader.elector.wait_for(Role.LEADER, 10)
            term = leader.elector.fence()
            await asyncio.sleep(3.5)  # the lease would have expired three times unrefreshed
            assert leader.elector.fence() == term
            await leader.store.write(LIVE, "still leading")

    run(main())


def test_a_killed_leader_is_replaced_after_its_lease_expires(etcd_cluster: EtcdCluster) -> None:
    ttl = 3
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    leader = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "etcd_campaigner.py"), ",".join(etcd_cluster.endpoints),
         "floor", "doomed", str(ttl)],
        stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        assert leader.stdout is not None
        line = leader.stdout.readline().split()  # its first role: alone, it leads
        assert line[0] == "leader", line
        killed_id = int(line[1])

        async def main() -> tuple[float, int]:
            async with seats(options(etcd_cluster, "standby", ttl=ttl)) as (standby,):
                async with asyncio.timeout(10):
                    while standby.elector.leader is None:  # it has seen the leader
                        await asyncio.sleep(0.02)
                assert standby.elector.role is Role.STANDBY
                assert standby.elector.leader.name == "doomed"
                leader.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                await standby.elector.wait_for(Role.LEADER, timeout=ttl + 15)
                return time.monotonic() - killed, standby.elector.fence().election_id

        took, new_id = run(main())
    finally:
        leader.kill()
        leader.wait()
    print(f"\nSIGKILLed leader replaced after {took:.2f} s (lease TTL {ttl} s)")
    assert new_id > killed_id


# -- fencing --------------------------------------------------------------------------------


def test_a_deposed_leaders_write_and_audit_append_are_refused_by_etcd(
    etcd_cluster: EtcdCluster,
) -> None:
    async def main() -> None:
        # A's long lease: its own clock still says "leader" when etcd has moved on.
        async with seats(options(etcd_cluster, "A", ttl=30)) as (a,):
            await a.elector.wait_for(Role.LEADER, 10)
            await a.store.write(LIVE, "a1")
            await a.store.audit_append("grant", {"by": "A"})
            term = a.elector.fence()
            async with seats(options(etcd_cluster, "B")) as (b,):
                admin = Etcd(options(etcd_cluster, "admin"))
                try:  # the lease ends behind A's back (as on expiry): B wins
                    await admin.call(
                        "revoke", "leasestub.LeaseRevoke", _revoke_request(term.lease), write=True
                    )
                finally:
                    await admin.close()
                await b.elector.wait_for(Role.LEADER, 10)
                assert a.elector.fence() == term  # A has not noticed yet
                with pytest.raises(NotLeader, match="etcd refused the write") as refused:
                    await a.store.write(LIVE, "a2")
                assert refused.value.leader == "B"
                assert a.elector.role is Role.STANDBY  # a refusal deposes it at once
                with pytest.raises(NotLeader):
                    await a.store.audit_append("grant", {"by": "A, late"})
                assert (await b.store.read(LIVE)).text == "a1"  # type: ignore[union-attr]
                await b.store.write(LIVE, "b1")
                await b.store.audit_append("grant", {"by": "B"})
                verdict = await b.store.audit_verify()
                assert verdict.ok and verdict.records == 2
                records = [json.loads(r) for _, r in await b.store.audit_records()]
                assert [r["by"] for r in records] == ["A", "B"]

    run(main())


def _revoke_request(lease: int) -> object:
    from aetcd import rpc

    return rpc.LeaseRevokeRequest(ID=lease)


class Partition:
    """A TCP relay between one controller and one etcd member; `cut()` drops every
    connection and refuses new ones (the controller can no longer reach etcd)."""

    def __init__(self, upstream: str) -> None:
        self.host, _, port = upstream.rpartition(":")
        self.port = int(port)
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()


def test_a_partitioned_leader_stops_writing_before_its_lease_can_expire(
    etcd_cluster: EtcdCluster,
) -> None:
    ttl = 3

    async def main() -> tuple[float, float]:
        relay = Partition(etcd_cluster.endpoints[0])
        via = await relay.start()
        a_opts = EtcdOptions((via,), "floor", name="A", ttl=ttl, timeout=0.5)
        stopped: list[float] = []
        async with seats(a_opts) as (a,):
            a.elector.on_change(
                lambda role, _t: stopped.append(time.monotonic()) if role is Role.STANDBY else None
            )
            await a.elector.wait_for(Role.LEADER, 10)
            stopped.clear()
            async with seats(options(etcd_cluster, "B", ttl=ttl)) as (b,):
                await one_leader([a, b])
                relay.cut()
                cut = time.monotonic()
                await b.elector.wait_for(Role.LEADER, ttl + 15)
                won = time.monotonic()
                assert stopped, "A never stopped"
                with pytest.raises(NotLeader):
                    await a.store.write(LIVE, "late")
                assert (await b.store.read(LIVE)) is None  # A's late write never landed
                return stopped[0] - cut, won - cut

    a_stopped, b_won = run(main())
    print(f"\npartitioned leader stopped after {a_stopped:.2f} s; standby won after {b_won:.2f} s")
    assert a_stopped < b_won


# -- the audit chain ------------------------------------------------------------------------


def test_concurrent_appenders_never_fork_the_audit_chain(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        async with seats(*(options(etcd_cluster, f"c{i}") for i in range(2))) as replicas:
            leader = await one_leader(replicas)

            async def appender(replica: Replica, n: int, fenced: bool) -> list[int]:
                seqs = []
                for i in range(12):
                    fields = {"by": replica.elector.options.who, "n": n, "i": i}
                    record = await replica.store.audit_append("test", fields, fenced=fenced)
                    seqs.append(int(record["seq"]))  # type: ignore[call-overload]
                return seqs

            jobs = [appender(r, n, fenced=False) for n, r in enumerate(replicas * 2)]
            jobs.append(appender(leader, 9, fenced=True))
            got = await asyncio.gather(*jobs)
            seqs = sorted(s for job in got for s in job)
            assert seqs == list(range(60)), "two appends chained to one record"
            verdict = await leader.store.audit_verify()
            assert verdict.ok and verdict.records == 60, verdict
            stored = [json.loads(r) for _, r in await leader.store.audit_records()]
            assert sum(1 for r in stored if r["n"] == 9) == 12

            # Tampering shows, as in the file: an edited record, then a removed last one.
            admin = leader.etcd
            key = admin.key(f"audit/records/{7:016d}")
            edited = dict(stored[7], by="mallory")
            await _put(admin, key, audit.canonical(edited))
            verdict = await leader.store.audit_verify()
            assert not verdict.ok and verdict.line == 8 and "edited" in verdict.problem
            await _put(admin, key, audit.canonical(stored[7]))
            await _delete(admin, admin.key(f"audit/records/{59:016d}"))
            verdict = await leader.store.audit_verify()
            assert not verdict.ok and "removed" in verdict.problem

    run(main())


def test_audit_verify_and_show_on_the_chain_in_etcd(
    etcd_cluster: EtcdCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    async def append() -> list[dict[str, object]]:
        async with seats(options(etcd_cluster, "c0")) as (leader,):
            await leader.elector.wait_for(Role.LEADER, 10)
            return [await leader.store.audit_append("grant", {"n": n}) for n in range(3)]

    records = run(append())
    etcd = ["--etcd", ",".join(f"http://{e}" for e in etcd_cluster.endpoints)]
    assert cli(["audit", "verify", *etcd, "--floor", "floor"]) == 0
    out = capsys.readouterr().out
    assert out == f"etcd:/p4seg/floor/audit: 3 records, chain intact; head {records[2]['hash']}\n"
    assert cli(["audit", "show", *etcd, "--floor", "floor"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shown == records

    async def tamper() -> None:
        admin = Etcd(options(etcd_cluster, "admin"))
        try:
            edited = dict(records[1], n=7)
            await _put(admin, admin.key(f"audit/records/{1:016d}"), audit.canonical(edited))
        finally:
            await admin.close()

    run(tamper())
    assert cli(["audit", "verify", *etcd, "--floor", "floor"]) == 1
    assert capsys.readouterr().out.startswith("etcd:/p4seg/floor/audit:2: chain broken after 1")
    assert cli(["audit", "verify", *etcd]) == 1
    assert "--etcd needs --floor" in capsys.readouterr().err
    assert cli(["audit", "verify", "--etcd", "127.0.0.1", "--floor", "floor"]) == 1
    assert "is not an etcd endpoint" in capsys.readouterr().err
    assert cli(["audit", "verify", *etcd, "--floor", "nothing-here"]) == 1
    assert "no audit records at etcd:/p4seg/nothing-here/audit" in capsys.readouterr().err


async def _put(etcd: Etcd, key: bytes, value: bytes) -> None:
    from aetcd import rpc

    await etcd.call("put", "kvstub.Put", rpc.PutRequest(key=key, value=value), write=True)


async def _delete(etcd: Etcd, key: bytes) -> None:
    from aetcd import rpc

    await etcd.call("delete", "kvstub.DeleteRange", rpc.DeleteRangeRequest(key=key), write=True)


# -- etcd failures --------------------------------------------------------------------------


def test_one_member_killed_and_the_floor_carries_on(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        async with seats(*(options(etcd_cluster, f"c{i}") for i in range(2))) as replicas:
            leader = await one_leader(replicas)
            await leader.store.write(LIVE, "before")
            etcd_cluster.kill(0)
            await asyncio.to_thread(etcd_cluster.wait_healthy, [1, 2])
            leader = await one_leader(replicas)
            await leader.store.write(LIVE, "after")
            await leader.store.audit_append("quarantine", {"host": "algo1"})
            for r in replicas:
                assert (await r.store.read(LIVE)).text == "after"  # type: ignore[union-attr]
            # The leader resigns; the standby wins with two members.
            standby = next(r for r in replicas if r is not leader)
            await leader.close()
            await standby.elector.wait_for(Role.LEADER, 10)
            await standby.store.write(LIVE, "third")
            assert (await standby.store.audit_verify()).ok

    run(main())


def test_a_leader_keeps_its_term_while_etcd_elects_a_new_raft_leader(
    etcd_cluster: EtcdCluster,
) -> None:
    """The member raft elected leader is SIGKILLed three times under the default 3 s lease.
    The leader's lease refreshes, sent again every 0.1 s while unanswered, carry its term
    through the election of another raft leader (same election id, never lost) whenever
    that election fits in what the lease leaves: TTL - margin - one refresh interval, less
    0.3 s for the answer. A slower election (a loaded machine) may cost the term, as it must
    (the leader cannot know that etcd is only electing); the test then takes the new term
    and says so."""
    ttl, margin = 3, 0.5
    fits = ttl - margin - ttl / REFRESHES - 0.3
    events: list[tuple[Role, int | None]] = []
    slow: list[float] = []

    async def main() -> None:
        async with seats(options(etcd_cluster, "c0", ttl=ttl, margin=margin)) as (leader,):
            await leader.elector.wait_for(Role.LEADER, 10)
            leader.elector.on_change(
                lambda role, t: events.append((role, None if t is None else t.create_revision))
            )
            for round_ in range(3):
                term = leader.elector.fence()
                raft = await asyncio.to_thread(etcd_cluster.raft_leader)
                assert raft is not None, f"round {round_}: no raft leader"
                killed = time.monotonic()
                etcd_cluster.kill(raft)
                others = [i for i in range(3) if i != raft]
                await asyncio.to_thread(etcd_cluster.wait_healthy, others)
                elected = time.monotonic() - killed  # at most: /health is polled

                def settled(since: float = killed) -> bool:  # a refresh sent after the kill
                    until = leader.elector.holds_until  # landed, or the term is gone
                    return bool(events) or (until is not None and until > since + ttl - margin)

                async with asyncio.timeout(ttl + 5):
                    while not settled():
                        await asyncio.sleep(0.01)  # polling a condition
                if events:  # the term was lost: only an election too slow for the lease may
                    assert elected > fits, (round_, elected, events)
                    slow.append(elected)
                    await leader.elector.wait_for(Role.LEADER, 10)
                    events.clear()
                else:
                    assert leader.elector.fence() == term, round_
                await leader.store.write(LIVE, f"round {round_}")  # fenced: leads
                etcd_cluster.start(raft)
                await asyncio.to_thread(etcd_cluster.wait_healthy)

    run(main())
    if slow:
        print(f"etcd elections too slow for the lease ({fits:.2f} s): {slow}")


def test_quorum_lost_refuses_writes_with_a_typed_error_and_writes_nothing_half(
    etcd_cluster: EtcdCluster,
) -> None:
    ttl = 3

    async def main() -> None:
        opts = options(etcd_cluster, "c0", ttl=ttl, timeout=1.0)
        async with seats(opts) as (leader,):
            await leader.elector.wait_for(Role.LEADER, 10)
            await leader.store.write(LIVE, "v1")
            await leader.store.audit_append("apply", {"n": 1})
            etcd_cluster.kill(1)
            etcd_cluster.kill(2)
            with pytest.raises(StoreUnavailable, match="etcd unreachable or without quorum") as e:
                await leader.store.write(LIVE, "v2")
            assert e.value.maybe_applied  # sent, unanswered: etcd may still commit it whole
            with pytest.raises((StoreUnavailable, NotLeader)):
                await leader.store.audit_append("apply", {"n": 2})
            with pytest.raises(StoreUnavailable):
                await leader.store.read(LIVE)
            # It stops leading (before its lease could expire), so P4Runtime writes stop too.
            await leader.elector.wait_for(Role.STANDBY, ttl + 2)
            with pytest.raises(NotLeader, match="not the leader"):
                await leader.store.write(LIVE, "v3")

            etcd_cluster.start(1)
            etcd_cluster.start(2)
            await asyncio.to_thread(etcd_cluster.wait_healthy)
            await leader.elector.wait_for(Role.LEADER, 20)  # it campaigns again and wins
            doc = await leader.store.read(LIVE)
            assert doc is not None and doc.text in ("v1", "v2")  # one whole write or none
            verdict = await leader.store.audit_verify()
            assert verdict.ok and verdict.records in (1, 2), verdict

    run(main())


# -- the state documents ---------------------------------------------------------------------


async def round_trip(store: StateStore) -> None:
    """The same calls on either store give the same answers."""
    assert await store.read(LIVE) is None
    assert (await load_live(store))[1] == 0
    state = LiveState()
    state.add_grant("algo", "risk", "tcp", "8443", 900, 1000.0, "ops@desk")
    state.quarantined["algo1"] = 1001.0
    state.applied_tables["tor-alg"] = "ab" * 32
    rev = await store.write(LIVE, state.to_json())
    loaded, loaded_rev = await load_live(store)
    assert loaded == state and loaded_rev == rev

    allocation = Allocation()
    rev_a = await store.write(ALLOCATION, allocation.to_json(), expected=0)
    assert (await load_allocation(store)) == (allocation, rev_a)
    with pytest.raises(Conflict):
        await store.write(ALLOCATION, allocation.to_json(), expected=0)  # exists already
    await store.write("applied/tor-alg", '{"version": "abc"}')
    assert (await store.read("applied/tor-alg")).text == '{"version": "abc"}'  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="state document name"):
        await store.write("../escape", "x")

    first = await store.audit_append("grant", {"grant": state.grants[0].id})
    second = await store.audit_append("quarantine", {"host": "algo1"})
    assert second["prev"] == first["hash"]
    verdict = await store.audit_verify()
    assert verdict.ok and verdict.records == 2 and verdict.last_hash == second["hash"]


def test_state_round_trips_in_the_state_directory(tmp_path: Path) -> None:
    run(round_trip(DirStore(tmp_path / "state")))


def test_state_round_trips_in_etcd_and_a_standby_sees_it(etcd_cluster: EtcdCluster) -> None:
    async def main() -> None:
        async with seats(*(options(etcd_cluster, f"c{i}") for i in range(2))) as replicas:
            leader = await one_leader(replicas)
            await round_trip(leader.store)
            standby = next(r for r in replicas if r is not leader)
            revision, docs = await standby.store.snapshot()
            assert set(docs) == {LIVE, ALLOCATION, "applied/tor-alg"} and revision > 0
            assert LiveState.from_json(docs[LIVE].text, "x").quarantined == {"algo1": 1001.0}
            with pytest.raises(NotLeader) as refused:
                await standby.store.write(LIVE, "{}")
            assert refused.value.leader == leader.elector.options.who
            term = leader.elector.fence()
            assert status(standby) == {
                "role": "standby",
                "leader": {
                    "name": leader.elector.options.who,
                    "url": "",
                    "election_id": term.election_id,
                },
                "etcd": list(etcd_cluster.endpoints),
            }
            assert status(leader)["role"] == "leader"
            # Past etcd's request limit (1.5 MiB by default): a clear error, nothing written.
            before = await leader.store.read(LIVE)
            for size in (1_600_000, 2 << 20):  # over etcd's limit, over gRPC's
                with pytest.raises(StoreError, match="write live: too large for etcd"):
                    await leader.store.write(LIVE, "x" * size)
            assert await leader.store.read(LIVE) == before

            # Warm: the standby follows every write after its snapshot, in order.
            seen: list[Document] = []

            async def follow() -> None:
                async for doc in standby.store.changes(revision):
                    seen.append(doc)
                    if len(seen) == 2:
                        return

            follower = asyncio.create_task(follow())
            r1 = await leader.store.write("applied/tor-alg", '{"version": "def"}')
            r2 = await leader.store.write(LIVE, LiveState().to_json())
            await asyncio.wait_for(follower, 10)
            assert seen == [
                Document("applied/tor-alg", '{"version": "def"}', r1),
                Document(LIVE, LiveState().to_json(), r2),
            ]

    run(main())


def test_a_state_directory_mirrors_the_store_and_commits_state_with_its_audit(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    async def main() -> None:
        async with seats(options(etcd_cluster, "A", ttl=30)) as (a,):
            await a.elector.wait_for(Role.LEADER, 10)
            work = tmp_path / "a"
            mirror = StateMirror(a.store, work, [LIVE, ALLOCATION])
            await mirror.pull()
            assert not (work / "live.json").exists()
            # An operation as the verbs make it: the state files and the local audit log.
            state = LiveState()
            state.quarantined["algo1"] = 5.0
            state.save(work)
            local = audit.append(work / "audit.jsonl", "quarantine", host="algo1")
            done = await mirror.push()
            assert done is not None and len(done.records) == 1
            assert await mirror.push() is None  # nothing new since
            stored = json.loads((await a.store.audit_records())[0][1])
            assert {k: stored[k] for k in ("time", "actor", "event", "host")} == {
                k: local[k] for k in ("time", "actor", "event", "host")
            }
            async with seats(options(etcd_cluster, "B")) as (b,):
                copy = tmp_path / "b"
                await StateMirror(b.store, copy, [LIVE, ALLOCATION]).pull()
                assert (copy / "live.json").read_text() == (work / "live.json").read_text()
                assert not (copy / "allocation.json").exists()

                # Deposed behind its back, A's next push is refused whole.
                admin = Etcd(options(etcd_cluster, "admin"))
                try:
                    lease = a.elector.fence().lease
                    await admin.call(
                        "revoke", "leasestub.LeaseRevoke", _revoke_request(lease), write=True
                    )
                finally:
                    await admin.close()
                await b.elector.wait_for(Role.LEADER, 10)
                state.quarantined["algo2"] = 6.0
                state.save(work)
                audit.append(work / "audit.jsonl", "quarantine", host="algo2")
                with pytest.raises(NotLeader):
                    await mirror.push()
                held = await b.store.read(LIVE)
                assert held is not None
                assert LiveState.from_json(held.text, "x").quarantined == {"algo1": 5.0}
                assert (await b.store.audit_verify()).records == 1

    run(main())


# -- TLS ------------------------------------------------------------------------------------


def test_mutual_tls_to_etcd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not Path(ETCD).exists():
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server)")
    pki = make_pki(tmp_path)
    cluster = start_cluster(size=1, pki=pki)
    try:
        endpoints = tuple(f"https://{e}" for e in cluster.endpoints)

        async def main() -> None:
            secure = EtcdOptions(
                parse_endpoints(",".join(endpoints)), "floor", name="c0", timeout=3.0,
                ca=pki / "ca.pem", cert=pki / "client.pem", key=pki / "client.key",
            )  # fmt: skip
            async with seats(secure) as (leader,):
                await leader.elector.wait_for(Role.LEADER, 10)
                await leader.store.write(LIVE, "over mTLS")
                await leader.store.audit_append("grant", {"over": "mTLS"})
            for refused in (
                dataclasses.replace(secure, cert=None, key=None),  # no client certificate
                dataclasses.replace(secure, ca=None, cert=None, key=None),  # clear text
            ):
                etcd = Etcd(refused)
                try:
                    with pytest.raises(StoreUnavailable):
                        await etcd.get("state/live")
                finally:
                    await etcd.close()

        run(main())
        etcd = ["--etcd", ",".join(endpoints), "--floor", "floor"]
        tls = ["--etcd-ca", str(pki / "ca.pem")]
        client = ["--etcd-cert", str(pki / "client.pem"), "--etcd-key", str(pki / "client.key")]
        assert cli(["audit", "verify", *etcd, *tls, *client]) == 0
        assert "1 records, chain intact" in capsys.readouterr().out
        assert cli(["audit", "verify", *etcd, *client]) == 1  # the system's CAs do not know it
        assert "etcd unreachable" in capsys.readouterr().err
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
