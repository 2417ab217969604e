"""Controller failover and fenced writes on a real 3-member etcd cluster on loopback.

    .venv/bin/python -m bench.bench_etcd              # 20 failovers, TTL 3 s
    .venv/bin/python -m bench.bench_etcd --runs 5 --ttl 2

Prints, for `--runs` rounds each:
- SIGKILL failover: a leader in its own process is killed; the time until a standby (in
  this process, watching the leader key) holds the leadership — bounded by the lease TTL
  plus etcd's lease-expiry tick (0.5 s); shown as a multiple of the TTL;
- clean handover: the leader resigns (revokes its lease); the time until the standby leads;
- a fenced document write and an audit append (median of 200), against an unfenced put
  measured in the same run (the baseline: what one etcd round trip costs here).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from aetcd import rpc

from runtime.etcdstore import EtcdOptions, Replica, Role

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the loopback cluster the tests use

from etcd_cluster import EtcdCluster, start_cluster  # noqa: E402


def _line(name: str, samples: list[float], suffix: str = "") -> None:
    med, top = statistics.median(samples), max(samples)
    print(f"{name:<28} median {med:8.3f} s  max {top:8.3f} s  ({len(samples)} runs){suffix}")


async def _sigkill_failover(cluster: EtcdCluster, ttl: int) -> float:
    leader = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "etcd_campaigner.py"),
         ",".join(cluster.endpoints), "bench", "doomed", str(ttl)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert leader.stdout is not None
        first = await asyncio.to_thread(leader.stdout.readline)
        assert first.startswith("leader"), first
        standby = Replica.open(EtcdOptions(cluster.endpoints, "bench", name="standby", ttl=ttl))
        await standby.start()
        try:
            while standby.elector.leader is None:  # it has seen the leader
                await asyncio.sleep(0.01)
            leader.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await standby.elector.wait_for(Role.LEADER, ttl + 30)
            return time.monotonic() - killed
        finally:
            await standby.close()
    finally:
        leader.kill()
        leader.wait()


async def _handover(cluster: EtcdCluster, ttl: int) -> float:
    a = Replica.open(EtcdOptions(cluster.endpoints, "bench", name="a", ttl=ttl))
    b = Replica.open(EtcdOptions(cluster.endpoints, "bench", name="b", ttl=ttl))
    await a.start()
    await a.elector.wait_for(Role.LEADER, 30)
    await b.start()
    while b.elector.leader is None:
        await asyncio.sleep(0.01)
    resigned = time.monotonic()
    await a.close()
    await b.elector.wait_for(Role.LEADER, 30)
    took = time.monotonic() - resigned
    await b.close()
    return took


async def _writes(cluster: EtcdCluster, count: int) -> tuple[list[float], list[float], list[float]]:
    r = Replica.open(EtcdOptions(cluster.endpoints, "bench-writes", name="w"))
    await r.start()
    await r.elector.wait_for(Role.LEADER, 30)
    plain, fenced, appends = [], [], []
    try:
        for i in range(count):
            t = time.perf_counter()
            put = rpc.PutRequest(key=b"/bench/plain", value=str(i).encode())
            await r.etcd.call("put", "kvstub.Put", put, write=True)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            await r.store.write("live", str(i))
            fenced.append(time.perf_counter() - t)
            t = time.perf_counter()
            await r.store.audit_append("bench", {"i": i})
            appends.append(time.perf_counter() - t)
    finally:
        await r.close()
    return plain, fenced, appends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ttl", type=int, default=3)
    args = parser.parse_args()
    cluster = start_cluster()
    try:
        kills = [asyncio.run(_sigkill_failover(cluster, args.ttl)) for _ in range(args.runs)]
        med = statistics.median(kills)
        _line("SIGKILL failover", kills, suffix=f"  = {med / args.ttl:.2f}x TTL {args.ttl} s")
        _line("clean handover (resign)", [asyncio.run(_handover(cluster, args.ttl))
                                          for _ in range(args.runs)])  # fmt: skip
        plain, fenced, appends = asyncio.run(_writes(cluster, 200))
        base = statistics.median(plain)
        for name, samples in (("unfenced put", plain), ("fenced write", fenced),
                              ("audit append", appends)):  # fmt: skip
            m = statistics.median(samples)
            print(f"{name:<28} median {m * 1e3:7.2f} ms  ({m / base:.2f}x unfenced put)")
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    main()
