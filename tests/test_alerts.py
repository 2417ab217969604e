"""Alerts from logged denies (PacketIn -> JSON lines, rate-limited per source) and per-rule
hit counts, against reference switches on loopback."""

from __future__ import annotations

import asyncio
import json

from conftest import TABLES
from p4rt import wait_for
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from compiler.emit import build
from compiler.inventory import Inventory
from compiler.model import Policy
from runtime.alerts import Alert, RateLimiter, follow, hits_by_rule, read_counters
from runtime.controller import ControllerOptions, PipelineFiles, SwitchTarget, apply_all
from runtime.refswitch.switch import ReferenceSwitch

Fabric = tuple[list[SwitchTarget], PipelineFiles, dict[str, ReferenceSwitch]]


def _frame(src: str, dst: str, dport: int, flags: str = "S") -> bytes:
    return bytes(Ether() / IP(src=src, dst=dst) / TCP(sport=40000, dport=dport, flags=flags))


def _rules(floor: Inventory, floor_policy: Policy, text: str) -> dict[int, str]:
    report = build(floor_policy, floor, text, "ref").report
    rules = report["rules"]
    assert isinstance(rules, list)
    return {r["id"]: f"line {r['line']}: {r['text']}" for r in rules}


def test_logged_denies_become_rate_limited_alerts(
    fabric: Fabric, floor: Inventory, floor_policy: Policy, floor_policy_text: str
) -> None:
    switches, files, refs = fabric
    options = ControllerOptions(timeout=20)
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, options)))
    tor_alg = next(t for t in switches if t.name == "tor-alg")
    sw = refs["tor-alg"]
    alerts: list[Alert] = []
    rules = _rules(floor, floor_policy, floor_policy_text)

    async def scenario() -> None:
        ready = asyncio.Event()
        limiter = RateLimiter(rate=0.001, burst=5)
        task = asyncio.create_task(
            follow(
                [tor_alg],
                files,
                options,
                rules,
                alerts.append,
                limiter,
                on_ready=lambda _: ready.set(),
            )
        )
        await asyncio.wait_for(ready.wait(), 10)
        # Warm up from a third source until its alert shows the path switch -> sink is
        # live (the per-source limiter keeps it out of algo1's and algo2's budget).
        for _ in range(50):
            sw.inject(3, _frame("10.0.2.13", "10.0.5.10", 23))
            if await asyncio.to_thread(wait_for, lambda: bool(alerts), 0.2):
                break
        assert alerts and alerts[0].src == "10.0.2.13"
        alerts.clear()
        # algo1 ssh to settle1: denied by the default deny, which logs.
        assert sw.inject(1, _frame("10.0.2.11", "10.0.5.10", 22)) == []
        assert await asyncio.to_thread(wait_for, lambda: len(alerts) == 1)
        # A scan of 200 ports from algo2: only the burst gets through, the rest is counted.
        for port in range(1000, 1200):
            sw.inject(2, _frame("10.0.2.12", "10.0.4.2", port))
        assert await asyncio.to_thread(wait_for, lambda: len(alerts) == 6)
        # A source algo1's port does not own: dropped at the first table, and reported.
        assert sw.inject(1, _frame("10.0.9.9", "10.0.3.10", 9876)) == []
        assert await asyncio.to_thread(wait_for, lambda: len(alerts) == 7)
        task.cancel()

    asyncio.run(scenario())
    first = alerts[0]
    assert (first.switch, first.ingress_port, first.src, first.dst, first.proto, first.dport) == (
        "tor-alg", 1, "10.0.2.11", "10.0.5.10", "tcp", 22,
    )  # fmt: skip
    assert first.rule_id == 0 and "default deny log" in first.rule
    assert json.loads(json.dumps(first.to_json()))["rule_id"] == 0
    spoof = alerts.pop()
    assert (spoof.kind, spoof.src, spoof.ingress_port) == ("spoof", "10.0.9.9", 1)
    assert "spoofed source" in spoof.rule and first.kind == "deny"
    scan = alerts[1:]
    assert [a.dport for a in scan] == [1000, 1001, 1002, 1003, 1004]
    assert all(a.src == "10.0.2.12" for a in scan)


def test_rate_limiter_reports_what_it_suppressed() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    admitted = [limiter.admit("10.0.0.1", 0.0) for _ in range(5)]
    assert admitted == [0, 0, None, None, None]
    assert limiter.admit("10.0.0.2", 0.0) == 0  # per source
    assert limiter.admit("10.0.0.1", 1.5) == 3  # a token back: says how many were dropped


def test_hits_count_per_rule_and_show_unused_allows(fabric: Fabric, floor_policy: Policy) -> None:
    switches, files, refs = fabric
    options = ControllerOptions(timeout=20)
    assert all(r.ok for r in asyncio.run(apply_all(switches, TABLES, files, options)))
    fix = _frame("10.0.2.11", "10.0.3.10", 9876)  # algo1 -> oms1 FIX: allowed
    for _ in range(3):
        assert refs["tor-alg"].inject(1, fix)
    counters = {
        t.name: asyncio.run(read_counters(t, TABLES.pipeline, options))
        for t in switches
        if t.name.startswith("tor-")
    }
    hits = {h.rule_id: h for h in hits_by_rule(floor_policy, TABLES.pipeline, counters)}
    fix_rule = next(r for r in floor_policy.rules if "9876" in r.describe())
    assert hits[fix_rule.id].packets == 3 and hits[fix_rule.id].switches == ("tor-alg",)
    assert hits[fix_rule.id].bytes == 3 * len(fix)
    unused = [h for h in hits.values() if h.action == "allow" and h.packets == 0]
    assert fix_rule.id not in {h.rule_id for h in unused}
    assert len(unused) == sum(r.action.value == "allow" for r in floor_policy.rules) - 1
