"""p4seg/replication.py: serve's worker threads operate on the state directory as the
leader's working copy of etcd (tests/etcd_cluster.py: a real 3-member cluster)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from etcd_cluster import EtcdCluster, etcd_cluster

from p4seg.replication import Replication
from runtime import audit
from runtime.etcdstore import EtcdOptions, Replica, Role
from runtime.live import LiveState
from runtime.store import NotLeader

__all__ = ["etcd_cluster"]  # the fixture, used by name


def test_an_operation_on_the_leader_lands_in_etcd_and_a_standby_refuses(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        leader = Replica.open(EtcdOptions(etcd_cluster.endpoints, "floor", name="ctl-a"))
        await leader.start()
        await leader.elector.wait_for(Role.LEADER, 10)
        standby = Replica.open(EtcdOptions(etcd_cluster.endpoints, "floor", name="ctl-b"))
        await standby.start()
        try:
            a = Replication(leader, tmp_path / "a", loop)
            b = Replication(standby, tmp_path / "b", loop)

            def operation() -> int:  # a verb, as serve runs it in a worker thread
                election_id = a.begin()
                state = LiveState()
                state.quarantined["algo1"] = 7.0
                state.save(tmp_path / "a")
                (tmp_path / "a" / "quarantines.json").write_text('{"algo1": {"reason": "x"}}')
                audit.append(tmp_path / "a" / "audit.jsonl", "quarantine", host="algo1")
                a.end()
                return election_id

            election_id = await asyncio.to_thread(operation)
            assert election_id == leader.elector.fence().election_id
            live = await leader.store.read("live")
            notes = await leader.store.read("quarantines")
            assert live is not None and LiveState.from_json(live.text, "x").quarantined == {
                "algo1": 7.0
            }
            assert notes is not None and json.loads(notes.text) == {"algo1": {"reason": "x"}}
            stored = [json.loads(r) for _, r in await leader.store.audit_records()]
            assert [(r["event"], r["host"]) for r in stored] == [("quarantine", "algo1")]

            while standby.elector.leader is None:
                await asyncio.sleep(0.02)  # polling a condition: it has seen the leader
            with pytest.raises(NotLeader) as refused:
                await asyncio.to_thread(b.begin)
            assert refused.value.leader == "ctl-a"
            assert b.status()["role"] == "standby" and b.status()["leader"]["name"] == "ctl-a"

            # The leader goes; the standby takes over from what etcd holds.
            await leader.close()
            await standby.elector.wait_for(Role.LEADER, 10)
            assert await asyncio.to_thread(b.begin) > election_id
            assert LiveState.load(tmp_path / "b").quarantined == {"algo1": 7.0}
            await asyncio.to_thread(b.end)  # nothing changed: nothing written
            assert (await standby.store.audit_verify()).records == 1
        finally:
            await standby.close()
            await leader.close()

    asyncio.run(main())
