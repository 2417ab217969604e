"""`p4seg serve --etcd` follows PacketIns on the leader only: two controllers of one floor
on a real 3-member etcd cluster (tests/etcd_cluster.py) and a reference switch judged by
packets (test_serve_ha's floor). A logged deny becomes an alert at the leader, a scan is
contained through the fenced operation path (in etcd before it is acknowledged), and after
the leader stops without resigning the new leader follows with its term's id, while a
follower of the old term can neither become primary nor write; a leader that loses etcd's
quorum stops following at once."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd_cluster import EtcdCluster, etcd_cluster
from finsy import Switch
from finsy.p4client import P4ClientError
from finsy.proto import p4r
from p4rt import wait_for
from test_cli_controller import _passes, site
from test_serve import OPERATOR, _Loop, pki
from test_serve_follow import POLICY, _alerts, _deny
from test_serve_ha import Controller, _stored, floor

from p4seg.control import session_of
from p4seg.follower import Follower, controller_options
from runtime.etcdstore import Role
from runtime.plan import Tables
from runtime.refswitch.switch import ReferenceSwitch
from runtime.sessions import controller_session

__all__ = ["etcd_cluster", "floor", "pki", "site"]  # fixtures, used by name

Floor = tuple[ReferenceSwitch, list[str], list[Controller], EtcdCluster]


@pytest.fixture
def contained(floor: Floor) -> Iterator[Floor]:
    """The floor (ctl-a leads, ctl-b stands by) on test_serve_follow's policy with its
    `contain after 3 denies within 10s`, applied by the leader, which follows tor1."""
    _, _, (a, _standby), _ = floor
    Path("small.zt").write_text(POLICY)
    code, doc = a.served.call("POST", "/v1/apply", {}, token=OPERATOR)
    assert code == 200, doc
    assert wait_for(lambda: _following(a), 30)
    yield floor


def _following(c: Controller) -> bool:
    follower = c.service.follower
    return follower is not None and follower.is_following("tor1")


def _engine_records(cluster: EtcdCluster, host: str) -> list[dict[str, Any]]:
    """The engine's quarantines of `host` in etcd's audit chain."""
    _, records, _ = _stored(cluster)
    return [r for r in records if (r["event"], r["actor"], r.get("host")) == (
        "quarantine", "p4seg-engine", host)]  # fmt: skip


def test_the_leader_turns_denies_into_alerts_and_contains_a_scan(contained: Floor) -> None:
    sw, _, (a, b), cluster = contained
    assert b.role() is Role.STANDBY and b.service.follower is None  # a standby never bids
    follower = a.service.follower
    assert follower is not None
    # The term's id (the leader's applies'), its bids capped there.
    assert follower.ceiling == a.election_id()
    assert follower.options.election_id == a.election_id()

    _deny(sw, "h3", "h2", 22)
    assert wait_for(lambda: len(_alerts(a.served)) == 1)
    [alert] = _alerts(a.served)
    assert (alert["src"], alert["dst"], alert["dport"], alert["switch"]) == (
        "10.0.0.3", "10.0.0.2", 22, "tor1"
    )  # fmt: skip
    assert _alerts(b.served) == []  # the standby follows nothing

    for port in (21, 22, 23):  # h1 scans h3: three logged denies, the `contain` threshold
        _deny(sw, "h1", "h3", port)
    assert wait_for(lambda: not _passes(sw, "h1", "h3", 8080), 30)  # contained by the engine
    assert _passes(sw, "h1", "h4", 443) and _passes(sw, "h2", "h3", 8080)  # remediation; others
    # Carried out as an API quarantine is: on the switch, then in etcd (one fenced
    # transaction) before the engine counts it done.
    assert wait_for(lambda: "h1" in _stored(cluster)[0].quarantined, 30)
    live, _, chained = _stored(cluster)
    assert live.automatic == ["h1"] and chained
    [record] = _engine_records(cluster, "h1")
    assert record["via"] == "engine" and record["decisions"][0]["decision"] == "Quarantine"
    assert a.served.status()["quarantined"] == ["h1"]


def test_the_new_leader_follows_and_the_old_terms_follower_cannot_write(
    contained: Floor,
) -> None:
    sw, _, (a, b), cluster = contained
    for port in (21, 22, 23):
        _deny(sw, "h1", "h3", port)
    assert wait_for(lambda: not _passes(sw, "h1", "h3", 8080), 30)
    # Done once in etcd (stopped before, the quarantine would be undone by the next leader).
    assert wait_for(lambda: len(_engine_records(cluster, "h1")) == 1, 30)
    old_id = a.election_id()

    a.stop(resign=False)  # as if it died: its follower is gone, its lease runs out
    assert wait_for(lambda: b.role() is Role.LEADER, 30)
    assert wait_for(lambda: _following(b), 30)
    follower = b.service.follower
    assert follower is not None
    new_id = b.election_id()
    assert new_id > old_id  # the new follower outranks every id of the old term
    assert (follower.options.election_id, follower.ceiling) == (new_id, new_id)
    _deny(sw, "h3", "h2", 22)
    assert wait_for(lambda: any(x["dport"] == 22 for x in _alerts(b.served)), 30)
    # The engine's hold on h1 came with etcd's state: the new leader's engine knows it.
    engine = b.service.containment.engine()
    assert engine is not None and "h1" in engine.holds
    assert not _passes(sw, "h1", "h3", 8080)

    # A follower of the old term that missed the end of its term (a deposed leader still
    # running): its session reaches the switch but stays a backup, even when the switch
    # has no primary (b's apply below), and the switch refuses its writes.
    roles: list[bool] = []

    async def ready(session: Switch) -> None:
        roles.append(session.is_primary)

    options = controller_options(a.service.ops)
    assert not isinstance(options, str) and a.service.ops.last is not None
    deposed = Follower(a.service.ops, dataclasses.replace(options, election_id=old_id))
    serving = session_of("serve", a.service.ops.args, a.service.ops.last)
    assert serving is not None
    [target] = serving.switches
    old = controller_session(target, serving.files, deposed.options, deposed.ceiling, ready)
    loop = _Loop()

    async def start() -> asyncio.Task[None]:
        return asyncio.ensure_future(old.run())

    running = loop.run(start())
    try:
        assert wait_for(lambda: bool(roles), 30)  # its channel is up
        # b applies a policy change on a session of its own (its follower stepped aside, as
        # for an apply that sets the pipeline): when it closes, the switch, with no primary
        # left, says so to every client (NOT_FOUND with b's id); the old session does not bid.
        Path("small.zt").write_text(POLICY.replace("tcp 8080", "tcp 8080, 8081"))

        async def apply_beside() -> tuple[int | None, object]:
            async with follower.step_aside(target.name):
                return await asyncio.to_thread(
                    b.served.call, "POST", "/v1/apply", {}, token=OPERATOR
                )

        code, doc = loop.run(apply_beside())
        assert code == 200, doc
        assert _passes(sw, "h2", "h3", 8081)
        assert wait_for(lambda: _following(b), 30)  # b's follower is the primary again
        assert True not in roles and old.election_id <= old_id
        tables = Tables(a.service.ops.last.build.target.pipeline)
        flip = p4r.Update(type=p4r.Update.MODIFY)
        flip.entity.table_entry.CopyFrom(tables.epoch_default(1))
        with pytest.raises(P4ClientError) as refused:
            loop.run(old.write([flip]))
        assert "not the primary controller" in str(refused.value)
        _deny(sw, "h3", "h2", 23)  # still reaches the new leader only
        assert wait_for(lambda: any(x["dport"] == 23 for x in _alerts(b.served)), 30)
        assert _passes(sw, "h2", "h3", 8080)  # the refused write changed nothing
    finally:

        async def stop() -> None:
            running.cancel()
            await asyncio.wait([running])

        loop.run(stop())
        loop.close()

    # The new leader's engine contains too: h3's denies (the two above and a scan).
    for port in (21, 22, 23):
        _deny(sw, "h3", "h4", port)
    assert wait_for(lambda: not _passes(sw, "h2", "h3", 8080), 30)
    assert wait_for(lambda: set(_stored(cluster)[0].quarantined) == {"h1", "h3"}, 30)
    assert _stored(cluster)[2]  # the chain verifies
    assert len(_engine_records(cluster, "h1")) == 1 and len(_engine_records(cluster, "h3")) == 1
    # Each controller logs the alerts of its own terms: ctl-a's log ends with h1's scan.
    old_log = (a.served.state / "alerts.jsonl").read_text().splitlines()
    assert {json.loads(line)["src"] for line in old_log} == {"10.0.0.1"}


def test_a_leader_without_etcd_stops_following_and_the_next_leader_follows(
    contained: Floor,
) -> None:
    sw, _, (a, b), cluster = contained
    _deny(sw, "h3", "h2", 22)
    assert wait_for(lambda: len(_alerts(a.served)) == 1)
    assert _following(a) and sw.service.arbiter.primaries()  # the follower is the primary

    cluster.kill(1)
    cluster.kill(2)  # no quorum: the leader cannot refresh its lease and steps down
    assert wait_for(lambda: a.role() is Role.STANDBY, 30)
    assert wait_for(lambda: a.service.follower is None, 30)  # its term's follower is gone
    assert wait_for(lambda: not sw.service.arbiter.primaries(), 30)  # its sessions closed
    _deny(sw, "h3", "h2", 23)  # still dropped (fail-static), reported to nobody
    assert [x["dport"] for x in _alerts(a.served)] == [22] and _alerts(b.served) == []
    assert b.service.follower is None

    cluster.start(1)
    cluster.start(2)
    cluster.wait_healthy()
    assert wait_for(lambda: Role.LEADER in (a.role(), b.role()), 30)
    leader, other = (a, b) if a.role() is Role.LEADER else (b, a)
    assert wait_for(lambda: _following(leader), 30)
    assert other.service.follower is None
    follower = leader.service.follower
    assert follower is not None and follower.ceiling == leader.election_id()
    _deny(sw, "h3", "h2", 24)
    assert wait_for(lambda: any(x["dport"] == 24 for x in _alerts(leader.served)), 30)
    assert not any(x["dport"] == 24 for x in _alerts(other.served))
