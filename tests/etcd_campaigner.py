"""A controller seat in its own process, for tests that kill a leader with SIGKILL:

    python tests/etcd_campaigner.py ENDPOINTS FLOOR NAME TTL    (PYTHONPATH: the repository)

prints `leader ELECTION_ID` or `standby` on every change of role, and runs until killed."""

from __future__ import annotations

import asyncio
import sys

from runtime.etcdstore import EtcdOptions, Leadership, Replica, Role, parse_endpoints


async def main(endpoints: str, floor: str, name: str, ttl: int) -> None:
    replica = Replica.open(EtcdOptions(parse_endpoints(endpoints), floor, name=name, ttl=ttl))

    def say(role: Role, term: Leadership | None) -> None:
        print(f"leader {term.election_id}" if term else role.value, flush=True)

    replica.elector.on_change(say)
    await replica.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
