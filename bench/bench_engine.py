"""The policy engine (runtime/engine.py): what containment adds per logged deny.

    python -m bench.bench_engine            # 200k alerts, 4096 sources, median of 5 runs
    python -m bench.bench_engine --quick    # 20k alerts, one run

Per alert, the engine's `observe` (the sliding window of the source, the `contain`
thresholds) against the baseline measured in the same run: `alert_of`, decoding the
PacketIn that carried the deny, which the controller does for every alert anyway. Also the
time of one containment decision (the Nth deny), `tick` over every tracked source, and the
size of the engine's state (engine.json) with the source cap reached.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import time
from collections.abc import Callable

from compiler.check import check_policy
from compiler.inventory import load_inventory
from runtime.alerts import Alert, alert_of
from runtime.engine import DEFAULT_MAX_SOURCES, EngineSettings, PolicyEngine

POLICY = """\
policy bench
service remediation = jump1
deny 10.8.0.0/16 -> any log
contain after 20 denies within 10s for 15m
contain after 200 denies within 1m for 1h
default deny log
"""


def _frame(src: int, dport: int) -> bytes:
    eth = b"\x02\x00\x00\x00\x00\x01" * 2 + b"\x08\x00"
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 40, 0, 0, 64, 6, 0, src, 0x0A000310)
    tcp = struct.pack("!HHIIBBHHH", 40000, dport, 0, 0, 0x50, 0x02, 1024, 0, 0)
    return eth + ip + tcp


def _timed(fn: Callable[[], None], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    alerts_n, repeat = (20_000, 1) if args.quick else (200_000, 5)
    inventory, _ = load_inventory("topologies/trading_floor.yaml")
    result = check_policy(POLICY, "bench.zt", inventory)
    assert result.policy is not None
    settings = EngineSettings.of(result.policy, {h.name: h.ip for h in inventory.hosts})
    # Sources outside the inventory (10.9.x.y), round robin: every window fills, none is
    # ever contained, the cap of tracked sources is reached and held.
    sources = [0x0A090000 + i for i in range(DEFAULT_MAX_SOURCES + 904)]
    frames = [_frame(sources[i % len(sources)], 1000 + i % 1000) for i in range(alerts_n)]
    meta = {"ingress_port": 1, "rule_id": 1, "reason": 1}
    rules = {1: "line 3: deny 10.8.0.0/16 -> any log"}
    decoded: list[Alert] = []

    def decode() -> None:
        decoded.clear()
        decoded.extend(alert_of("tor-dev", f, meta, rules, 0.0) for f in frames)

    base = _timed(decode, repeat)
    engine = PolicyEngine(settings)

    def observe() -> None:
        engine.windows.clear()
        engine.evicted = 0
        for i, a in enumerate(decoded):
            engine.observe(a, i * 1e-3)  # 1000 alerts/s overall: no source hits 20 in 10s

    spent = _timed(observe, repeat)
    print(f"alerts: {alerts_n:,}, sources {len(sources):,} (cap {DEFAULT_MAX_SOURCES:,})")
    print(f"  decode PacketIn (alert_of), baseline  {base / alerts_n * 1e6:7.2f} us/alert")
    print(
        f"  engine.observe                         {spent / alerts_n * 1e6:7.2f} us/alert"
        f"  ({spent / base:.2f}x decode)"
    )
    print(f"  tracked sources {len(engine.windows):,}, evicted {engine.evicted:,}")
    size = len(json.dumps(engine.to_json()))
    print(f"  engine.json with the cap reached: {size / 1024:.0f} KiB")
    scan = PolicyEngine(settings)
    algo1 = Alert("", "tor-alg", 1, "10.0.2.11", "10.0.3.10", "tcp", 40000, 22, 2, 0, "")
    for i in range(19):
        scan.observe(algo1, i * 0.01)
    start = time.perf_counter()
    decisions = scan.observe(algo1, 0.2)
    decide = time.perf_counter() - start
    print(f"  the 20th deny -> {type(decisions[0]).__name__}: {decide * 1e6:.1f} us")
    start = time.perf_counter()
    engine.tick(1e9)
    print(
        f"  tick over {DEFAULT_MAX_SOURCES:,} sources: {(time.perf_counter() - start) * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    main()
