"""Prometheus metrics (runtime/metrics.py), read back the way Prometheus reads them: the text
exposition parsed by prometheus_client's parser after real events — an apply and a hits read
on a reference switch that forwarded real packets, alerts parsed from denied frames, audit
records from the hash-chained log."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from test_meters import INVENTORY, _ping, switch  # noqa: F401  (one ToR, a bastion and two strategy hosts; switch: the fixture)

from compiler.check import check_policy
from compiler.emit import build, write_build
from compiler.inventory import load_inventory
from p4src.spec import PIPELINE, REASON_DENY_LOG
from runtime import audit
from runtime.alerts import Alert, RuleHits, alert_of, hits_by_rule, read_counters, read_red_drops
from runtime.controller import ControllerOptions, PipelineFiles, apply_all, targets
from runtime.metrics import OTHER, BoundedLabels, Metrics
from runtime.plan import Tables
from runtime.refswitch.switch import ReferenceSwitch
from runtime.siem import SinkStats

POLICY = """\
policy metrics
allow bastion -> strat1 icmp rate 100pps
allow bastion -> strat2 icmp
deny  strat1  -> strat2 log
default deny log
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(m: Metrics) -> Samples:
    """Every sample of the exposition, keyed by name and sorted labels."""
    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def test_an_apply_and_per_rule_counters_from_a_reference_switch(
    tmp_path: Path,
    switch: ReferenceSwitch,  # noqa: F811  (test_meters' fixture)
) -> None:
    (tmp_path / "metrics.yaml").write_text(INVENTORY)
    inventory, diags = load_inventory(str(tmp_path / "metrics.yaml"))
    assert inventory is not None, diags
    checked = check_policy(POLICY, "metrics.zt", inventory)
    assert checked.policy is not None, checked.diagnostics
    policy = checked.policy
    built = build(policy, inventory, POLICY, "ref")
    write_build(built, str(tmp_path / "build"))
    tables, options = Tables(PIPELINE), ControllerOptions(timeout=20)
    found = [
        dataclasses.replace(t, address=switch.server_address)
        for t in targets(inventory, built.switches, tables)
    ]
    files = PipelineFiles.of(tmp_path / "build", "ref")
    m = Metrics(wall_clock=lambda: 1_800_000_000.0)
    start = time.monotonic()
    reports = asyncio.run(apply_all(found, tables, files, options))
    m.apply_finished("apply", time.monotonic() - start, reports)
    m.table_occupancy(built)
    assert all(r.ok for r in reports) and reports[0].written > 0

    # 300 pings offered at 1000 pps on the meters' clock: the 100 pps rule passes its rate
    # plus one burst, its meters drop the rest; the unmetered rule passes all of them.
    now = [0.0]
    switch.dataplane.clock = lambda: now[0]
    delivered = {"10.0.0.2": 0, "10.0.0.3": 0}
    for _ in range(300):
        now[0] += 0.001
        for dst in delivered:
            delivered[dst] += len(switch.inject(1, _ping(dst)))
    denied = bytes(Ether() / IP(src="10.0.0.2", dst="10.0.0.3") / TCP(dport=22, flags="S"))
    assert switch.inject(2, denied) == []
    counters = asyncio.run(read_counters(found[0], PIPELINE, options))
    red = asyncio.run(read_red_drops(found[0], PIPELINE, options, [1]))
    m.rule_hits(hits_by_rule(policy, PIPELINE, {"tor1": counters}, {"tor1": red}))

    got = samples(m)
    assert value(got, "p4seg_applies_total", verb="apply", result="ok") == 1
    assert value(got, "p4seg_apply_duration_seconds_count", verb="apply") == 1
    assert value(got, "p4seg_writes_total", switch="tor1") == reports[0].written
    assert value(got, "p4seg_last_apply_timestamp_seconds", result="ok") == 1_800_000_000.0
    (tor,) = built.switches
    for table in ("src_identity", "dst_identity", "policy", "routing"):
        held = value(got, "p4seg_table_entries", switch="tor1", table=table)
        assert held == len(tor.table(table)) and held is not None and held > 0
        size = PIPELINE.table(table).size
        assert value(got, "p4seg_table_capacity_entries", switch="tor1", table=table) == size
    assert value(got, "p4seg_table_entries", switch="tor1", table="epoch") is None  # keyless
    dropped = 300 - delivered["10.0.0.2"]
    assert dropped > 0 and delivered["10.0.0.3"] == 300
    assert value(got, "p4seg_rule_packets_total", rule_id="1", action="allow") == 300
    assert value(got, "p4seg_rule_meter_drops_total", rule_id="1") == dropped
    assert value(got, "p4seg_rule_meter_drops_total", rule_id="2") is None  # no meter
    assert value(got, "p4seg_rule_packets_total", rule_id="2", action="allow") == 300
    assert value(got, "p4seg_rule_bytes_total", rule_id="2", action="allow") == 300 * len(
        _ping("10.0.0.3")
    )
    assert value(got, "p4seg_rule_packets_total", rule_id="3", action="deny") == 1
    assert value(got, "p4seg_rule_packets_total", rule_id="0", action="deny") == 0
    info = [k for k in got if k[0] == "p4seg_rule_info"]
    assert ("rule", "line 3: allow bastion -> strat2 icmp") in {
        pair for _, labels in info for pair in labels
    }


def test_a_failed_apply_counts_against_its_switch() -> None:
    from runtime.controller import SwitchReport

    m = Metrics()
    m.apply_finished("quarantine", 0.03, [
        SwitchReport("tor1", "127.0.0.1:1", written=4),
        SwitchReport("tor2", "127.0.0.1:2", written=0, error="UNAVAILABLE: connection refused"),
    ])  # fmt: skip
    m.apply_finished("apply", 0.0, [])  # no switch took it: not ok
    got = samples(m)
    assert value(got, "p4seg_applies_total", verb="quarantine", result="failed") == 1
    assert value(got, "p4seg_applies_total", verb="apply", result="failed") == 1
    assert value(got, "p4seg_switch_apply_errors_total", switch="tor2") == 1
    assert value(got, "p4seg_switch_apply_errors_total", switch="tor1") is None
    assert value(got, "p4seg_writes_total", switch="tor1") == 4
    # 30 ms lands in the 50 ms bucket, not the 25 ms one.
    assert value(got, "p4seg_apply_duration_seconds_bucket", verb="quarantine", le="0.025") == 0
    assert value(got, "p4seg_apply_duration_seconds_bucket", verb="quarantine", le="0.05") == 1


def _frame(src: str, dport: int) -> bytes:
    return bytes(Ether() / IP(src=src, dst="10.0.5.10") / TCP(sport=40000, dport=dport, flags="S"))


def _alert(src: str, rule_id: int = 7, suppressed: int = 0) -> Alert:
    meta = {"ingress_port": 1, "rule_id": rule_id, "reason": REASON_DENY_LOG}
    alert = alert_of("tor-alg", _frame(src, 22), meta, {7: "line 9: deny dev -> any log"}, 0.0)
    return dataclasses.replace(alert, suppressed=suppressed)


def test_alerts_and_denies_per_rule_and_per_source() -> None:
    m = Metrics()
    m.alert(_alert("10.0.2.11"))
    m.alert(_alert("10.0.2.11", suppressed=4))  # four more denies the rate limit held back
    m.alert(_alert("10.0.2.12", rule_id=0))
    got = samples(m)
    assert value(got, "p4seg_alerts_total", kind="deny", rule_id="7") == 2
    assert value(got, "p4seg_alerts_total", kind="deny", rule_id="0") == 1
    assert value(got, "p4seg_alerts_by_source_total", source="10.0.2.11") == 2
    assert value(got, "p4seg_logged_denies_by_source_total", source="10.0.2.11") == 6
    assert value(got, "p4seg_logged_denies_by_source_total", source="10.0.2.12") == 1
    assert value(got, "p4seg_alerts_suppressed_total") == 4


def test_per_source_series_are_bounded_and_idle_sources_give_their_slot_up() -> None:
    now = [0.0]
    m = Metrics(source_limit=3, idle_seconds=60, clock=lambda: now[0])
    for n in range(1, 6):  # five scanners, three slots
        m.alert(_alert(f"10.0.2.{n}"))
    got = samples(m)
    sources = {dict(k[1])["source"] for k in got if k[0] == "p4seg_alerts_by_source_total"}
    assert sources == {"10.0.2.1", "10.0.2.2", "10.0.2.3", OTHER}
    assert value(got, "p4seg_alerts_by_source_total", source=OTHER) == 2
    now[0] = 30.0
    m.alert(_alert("10.0.2.2"))  # active again: keeps its slot
    now[0] = 70.0
    m.alert(_alert("10.0.2.9"))  # 10.0.2.1 idle 70 s: its slot goes to the newcomer
    now[0] = 75.0
    m.alert(_alert("10.0.2.10"))  # 10.0.2.3 idle 75 s: the next one
    m.alert(_alert("10.0.2.11"))  # 10.0.2.2 seen 45 s ago: still busy, so `other`
    got = samples(m)
    sources = {dict(k[1])["source"] for k in got if k[0] == "p4seg_alerts_by_source_total"}
    assert sources == {"10.0.2.2", "10.0.2.9", "10.0.2.10", OTHER}
    assert value(got, "p4seg_alerts_by_source_total", source="10.0.2.2") == 2
    assert value(got, "p4seg_alerts_by_source_total", source=OTHER) == 3  # never goes down
    assert value(got, "p4seg_logged_denies_by_source_total", source="10.0.2.1") is None


def test_bounded_labels_alone() -> None:
    labels = BoundedLabels(limit=0)
    assert labels.label("edr-1", 0.0) == (OTHER, None)
    labels = BoundedLabels(limit=1, idle_seconds=10)
    assert labels.label("edr-1", 0.0) == ("edr-1", None)
    assert labels.label("edr-2", 5.0) == (OTHER, None)
    assert labels.label("edr-2", 10.0) == ("edr-2", "edr-1")
    assert labels.values == ("edr-2",)
    with pytest.raises(ValueError, match="count"):
        BoundedLabels(limit=-1)


def test_state_gauges_signals_containment_audit_and_siem(tmp_path: Path) -> None:
    now = [0.0]
    m = Metrics(source_limit=1, idle_seconds=60, clock=lambda: now[0])
    m.switch_state("tor-alg", connected=True, primary=True)
    m.switch_state("tor-oms", connected=False, primary=True)  # down: not primary either
    m.set_quarantined(["algo1", "algo2", "algo1"])
    m.set_quarantined(["algo2"])  # algo1 released
    m.set_grants(2)
    m.signal_received("unhealthy", "crowdstrike")
    m.signal_received("unhealthy", "sentinelone")  # the one slot is taken
    now[0] = 61.0
    m.signal_received("healthy", "sentinelone")  # crowdstrike idle: its series goes
    m.set_signals_active({"unhealthy": 1})
    m.containment("scan", "contained")
    m.containment("scan", "alert_only")
    log = tmp_path / "audit.jsonl"
    m.audit_record(audit.append(log, "quarantine", host="algo1", result="ok"))
    m.audit_record(audit.append(log, "apply", result="refused: the compiled tables are not proven"))
    stats = SinkStats(sent=5, dropped=2, failed=1, queued=3)
    m.siem_sink("soc", lambda: stats)
    got = samples(m)
    assert value(got, "p4seg_switch_connected", switch="tor-alg") == 1
    assert value(got, "p4seg_switch_primary", switch="tor-alg") == 1
    assert value(got, "p4seg_switch_connected", switch="tor-oms") == 0
    assert value(got, "p4seg_switch_primary", switch="tor-oms") == 0
    assert value(got, "p4seg_quarantined_hosts") == 1
    assert value(got, "p4seg_host_quarantined", host="algo2") == 1
    assert value(got, "p4seg_host_quarantined", host="algo1") is None
    assert value(got, "p4seg_grants") == 2
    assert value(got, "p4seg_signals_total", signal="unhealthy", source="crowdstrike") is None
    assert value(got, "p4seg_signals_total", signal="unhealthy", source=OTHER) == 1
    assert value(got, "p4seg_signals_total", signal="healthy", source="sentinelone") == 1
    assert value(got, "p4seg_signals_active", signal="unhealthy") == 1
    assert value(got, "p4seg_containment_events_total", rule="scan", outcome="contained") == 1
    assert value(got, "p4seg_containment_events_total", rule="scan", outcome="alert_only") == 1
    assert value(got, "p4seg_audit_records_total", event="quarantine", result="ok") == 1
    assert value(got, "p4seg_audit_records_total", event="apply", result="refused") == 1
    assert value(got, "p4seg_siem_events_total", sink="soc", outcome="dropped") == 2
    assert value(got, "p4seg_siem_events_total", sink="soc", outcome="sent") == 5
    assert value(got, "p4seg_siem_queue_events", sink="soc") == 3


def test_two_instances_share_nothing() -> None:
    a, b = Metrics(), Metrics()
    a.set_grants(3)
    assert value(samples(b), "p4seg_grants") == 0


# -- what the docs and the Grafana dashboard say about the metrics -------------------------

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "p4seg.json"
PROMTOOL = shutil.which("promtool")
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def _every_metric() -> Metrics:
    """A Metrics that has seen one event of every kind, so every family has samples."""
    from runtime.controller import SwitchReport

    m = Metrics()
    m.apply_finished("apply", 0.02, [SwitchReport("tor1", "127.0.0.1:1", written=3)])
    m.switch_state("tor1", connected=True, primary=True)
    m.set_quarantined(["algo1"])
    m.set_grants(1)
    m.signal_received("unhealthy", "edr")
    m.set_signals_active({"unhealthy": 1})
    m.containment("scan", "contained")
    m.alert(_alert("10.0.2.11", suppressed=1))
    m.audit_record({"event": "apply", "result": "ok"})
    m.rule_hits(
        [RuleHits(1, "line 3: allow a -> b tcp 80 rate 10pps", "allow", 5, 300, ("tor1",), 10, 2)]
    )
    m.siem_sink("soc", lambda: SinkStats(1, 0, 0, 0))
    return m


def _families(m: Metrics) -> set[str]:
    return {f.name for f in text_string_to_metric_families(m.render()[0].decode())}


def _base(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_the_docs_list_every_metric_and_no_other() -> None:
    doc = (ROOT / "docs" / "observability.md").read_text()
    families = _families(_every_metric())
    named = {_base(n) for n in re.findall(r"\bp4seg_[a-z_]+[a-z]", doc)}
    assert families - named == set(), "metrics the docs do not list"
    assert named - families == set(), "metrics the docs name that do not exist"


def _dashboard_panels() -> list[dict[str, Any]]:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "p4seg" and doc["schemaVersion"] >= 36 and doc["title"]
    panels: list[dict[str, Any]] = doc["panels"]
    return panels


def test_the_dashboard_queries_metrics_that_exist_and_its_panels_do_not_overlap() -> None:
    panels = _dashboard_panels()
    families = _families(_every_metric())
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    queried = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            queried |= {_base(n) for n in re.findall(r"\bp4seg_[a-z_]+[a-z]", t["expr"])}
    assert queried - families == set(), "the dashboard queries metrics that do not exist"
    # Every family is on the dashboard except those only joined or read for state.
    assert families - queried <= {"p4seg_rule_counters_read_timestamp_seconds"}


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)
def test_promtool_accepts_the_exposition_and_every_dashboard_query(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=_every_metric().render()[0],
                          capture_output=True)  # fmt: skip
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
    exprs = [t["expr"] for p in _dashboard_panels() if p["type"] != "row" for t in p["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"p4seg:dashboard_query_{n}",
         "expr": e.replace("$__rate_interval", "5m").replace("$__range", "1h")}
        for n, e in enumerate(exprs)
    ]}]}  # fmt: skip
    (tmp_path / "rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "rules.yml")],
                           capture_output=True)  # fmt: skip
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert f"SUCCESS: {len(exprs)} rules found" in check.stdout.decode()
