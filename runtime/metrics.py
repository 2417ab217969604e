"""Prometheus metrics of the controller: what `p4seg serve` exposes on `/metrics`.

`Metrics` owns its own CollectorRegistry (never the process-wide default, so two services or
two tests never share series); the service calls one method per event — an apply finished, a
switch connected, an alert, an audit record, a hits read — and `render()` gives the text
exposition. docs/observability.md lists every metric and label.

Cardinality is bounded by construction: switches, tables, rules, hosts and verbs come from
the inventory and the policy; the only open-ended label values — the source address of an
alert, the source of a signal — go through `BoundedLabels`: at most `limit` values own a
series at a time, the rest count under `source="other"`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from compiler.emit import Build
from runtime.alerts import Alert, RuleHits
from runtime.siem import SinkStats

# The classic text format every Prometheus reads (the library's latest, 1.0.0, needs 3.x).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"  # the label value every source past the limit counts under
DEFAULT_SOURCE_LIMIT = 20
DEFAULT_IDLE_SECONDS = 900.0
# From a one-rule overlay write (milliseconds) to a full floor apply (tens of seconds).
APPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(slots=True)
class BoundedLabels:
    """At most `limit` label values own a series; a value past the limit is `other`.

    Slots are sticky, so every series stays a monotonic counter: a value keeps its slot
    while it is active, and gives it up to a newcomer only after `idle_seconds` without an
    event (least recently seen first). `label` returns the label to count under and the
    value evicted to make room, whose series the caller removes.

    >>> sources = BoundedLabels(limit=1, idle_seconds=60)
    >>> sources.label("10.0.2.11", now=0.0)
    ('10.0.2.11', None)
    >>> sources.label("10.0.2.12", now=30.0)  # the one slot is busy
    ('other', None)
    >>> sources.label("10.0.2.12", now=90.0)  # 10.0.2.11 idle for 90 s: its slot is free
    ('10.0.2.12', '10.0.2.11')
    """

    limit: int = DEFAULT_SOURCE_LIMIT
    idle_seconds: float = DEFAULT_IDLE_SECONDS
    _seen: OrderedDict[str, float] = field(default_factory=OrderedDict)  # value -> last event

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"a label limit is a count, not {self.limit}")

    def label(self, value: str, now: float) -> tuple[str, str | None]:
        """The label for one event of `value` at `now`, and the value evicted (or None)."""
        if value in self._seen:
            self._seen[value] = now
            self._seen.move_to_end(value)
            return value, None
        evicted = None
        if len(self._seen) >= self.limit and self._seen:
            oldest, last = next(iter(self._seen.items()))
            if now - last < self.idle_seconds:
                return OTHER, None  # every slot busy: the newcomer counts as `other`
            del self._seen[oldest]
            evicted = oldest
        if len(self._seen) >= self.limit:
            return OTHER, None  # limit 0: every value is `other`
        self._seen[value] = now
        return value, evicted

    @property
    def values(self) -> tuple[str, ...]:
        """The values that own a series, least recently seen first."""
        return tuple(self._seen)


def rule_hit_families(hits: Sequence[RuleHits]) -> list[Metric]:
    """What `p4seg hits` reads, as samples: packets and bytes of every rule's entries (its
    direct counters, summed over the switches read), the packets its meters dropped over the
    rate (only where every switch reported it: an unknown count is left out, never 0), and
    one info series per rule carrying its text."""
    packets = CounterMetricFamily(
        "p4seg_rule_packets",
        "Packets matched by a rule's policy entries (direct counters, summed over switches).",
        labels=["rule_id", "action"],
    )
    octets = CounterMetricFamily(
        "p4seg_rule_bytes",
        "Bytes matched by a rule's policy entries (direct counters, summed over switches).",
        labels=["rule_id", "action"],
    )
    red = CounterMetricFamily(
        "p4seg_rule_meter_drops",
        "Packets a rate-limited rule's meters dropped over its rate (policy_red_drops).",
        labels=["rule_id"],
    )
    info = GaugeMetricFamily(
        "p4seg_rule_info",
        "One series per rule, 1, with its text (join on rule_id).",
        labels=["rule_id", "action", "rule"],
    )
    for h in hits:
        rule_id = str(h.rule_id)
        packets.add_metric([rule_id, h.action], h.packets)
        octets.add_metric([rule_id, h.action], h.bytes)
        if h.red is not None:
            red.add_metric([rule_id], h.red)
        info.add_metric([rule_id, h.action, h.rule], 1)
    return [packets, octets, red, info]


@dataclass(eq=False, slots=True)  # a registry keys its collectors by identity
class _Snapshot(Collector):
    """Families computed at scrape time from the last value handed over."""

    families: Callable[[], Iterable[Metric]]

    def collect(self) -> Iterator[Metric]:
        yield from self.families()


@dataclass(eq=False, slots=True)
class _WithoutCreated(Collector):
    """The registry's families without `_created` samples: in the 0.0.4 text format they
    read as a separate gauge per counter, doubling the series for nothing Prometheus uses."""

    registry: CollectorRegistry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():  # fresh objects per collect: ours to trim
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def _result(record: Mapping[str, object]) -> str:
    """An audit record's result, its first word: ok | failed | refused (bounded)."""
    result = str(record.get("result", "ok"))
    return result.split(":", 1)[0].strip() or "ok"


class Applied(Protocol):
    """What a metric needs of one switch's apply (runtime.controller.SwitchReport has it)."""

    @property
    def switch(self) -> str: ...
    @property
    def ok(self) -> bool: ...
    @property
    def written(self) -> int: ...


class Metrics:
    """Every metric the controller exposes, in a registry of its own. Event methods are
    called from one thread (the service's event loop); `render` from any."""

    def __init__(
        self,
        source_limit: int = DEFAULT_SOURCE_LIMIT,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock, self._wall = clock, wall_clock
        r = self.registry
        self.applies = Counter(
            "p4seg_applies", "Applies finished, by verb and result (ok: every switch took it).",
            ["verb", "result"], registry=r,
        )  # fmt: skip
        self.apply_seconds = Histogram(
            "p4seg_apply_duration_seconds", "Time from compile to the last switch written.",
            ["verb"], buckets=APPLY_BUCKETS, registry=r,
        )  # fmt: skip
        self.writes = Counter(
            "p4seg_writes", "P4Runtime updates written, per switch.", ["switch"], registry=r
        )
        self.switch_errors = Counter(
            "p4seg_switch_apply_errors", "Applies that failed on a switch.", ["switch"], registry=r
        )
        self.last_apply = Gauge(
            "p4seg_last_apply_timestamp_seconds", "When the last apply of each result finished.",
            ["result"], registry=r,
        )  # fmt: skip
        self.connected = Gauge(
            "p4seg_switch_connected", "1 while the controller holds a P4Runtime session.",
            ["switch"], registry=r,
        )  # fmt: skip
        self.primary = Gauge(
            "p4seg_switch_primary", "1 while this controller is the switch's primary.",
            ["switch"], registry=r,
        )  # fmt: skip
        self.table_entries = Gauge(
            "p4seg_table_entries", "Entries the applied build places in a table.",
            ["switch", "table"], registry=r,
        )  # fmt: skip
        self.table_capacity = Gauge(
            "p4seg_table_capacity_entries", "The size the target's program gives a table.",
            ["switch", "table"], registry=r,
        )  # fmt: skip
        self.quarantined = Gauge("p4seg_quarantined_hosts", "Hosts quarantined now.", registry=r)
        self.host_quarantined = Gauge(
            "p4seg_host_quarantined", "1 for each quarantined host.", ["host"], registry=r
        )
        self.grants = Gauge("p4seg_grants", "Grants in force now.", registry=r)
        self.signals = Counter(
            "p4seg_signals", "Signals received, by signal and source (bounded: see docs).",
            ["signal", "source"], registry=r,
        )  # fmt: skip
        self.signals_active = Gauge(
            "p4seg_signals_active", "Hosts a signal holds now, by signal.", ["signal"], registry=r
        )
        self.containments = Counter(
            "p4seg_containment_events", "Containment events, by contain rule and outcome.",
            ["rule", "outcome"], registry=r,
        )  # fmt: skip
        self.alerts = Counter(
            "p4seg_alerts", "Alerts raised (logged denies and spoofed sources), by kind and rule.",
            ["kind", "rule_id"], registry=r,
        )  # fmt: skip
        self.alerts_by_source = Counter(
            "p4seg_alerts_by_source", "Alerts raised per source address (bounded: see docs).",
            ["source"], registry=r,
        )  # fmt: skip
        self.denies_by_source = Counter(
            "p4seg_logged_denies_by_source",
            "Logged denies per source address, rate-limited ones included (bounded: see docs).",
            ["source"], registry=r,
        )  # fmt: skip
        self.suppressed = Counter(
            "p4seg_alerts_suppressed", "Alerts the per-source rate limit held back.", registry=r
        )
        self.audit = Counter(
            "p4seg_audit_records", "Audit records written, by event and result.",
            ["event", "result"], registry=r,
        )  # fmt: skip
        self.alert_sources = BoundedLabels(source_limit, idle_seconds)
        self.signal_sources = BoundedLabels(source_limit, idle_seconds)
        self._signal_series: set[tuple[str, str]] = set()  # (signal, source label) held
        self._hits: Sequence[RuleHits] = ()
        self.hits_read = Gauge(
            "p4seg_rule_counters_read_timestamp_seconds", "When the rule counters were read.",
            registry=r,
        )  # fmt: skip
        r.register(_Snapshot(lambda: rule_hit_families(self._hits)))
        self._sinks: dict[str, Callable[[], SinkStats]] = {}
        r.register(_Snapshot(self._siem_families))

    # -- the service's events ---------------------------------------------------------------

    def apply_finished(self, verb: str, seconds: float, reports: Sequence[Applied]) -> None:
        """One apply (of any verb) finished in `seconds`, with a report per switch."""
        result = "ok" if reports and all(rep.ok for rep in reports) else "failed"
        self.applies.labels(verb, result).inc()
        self.apply_seconds.labels(verb).observe(seconds)
        self.last_apply.labels(result).set(self._wall())
        for rep in reports:
            self.writes.labels(rep.switch).inc(rep.written)
            if not rep.ok:
                self.switch_errors.labels(rep.switch).inc()

    def switch_state(self, switch: str, connected: bool, primary: bool) -> None:
        """A switch's session went up or down, or its primary changed."""
        self.connected.labels(switch).set(int(connected))
        self.primary.labels(switch).set(int(connected and primary))

    def table_occupancy(self, build: Build) -> None:
        """Entries per switch and table of the build the switches hold, against sizes."""
        self.table_entries.clear()
        self.table_capacity.clear()
        keyed = [t for t in build.target.pipeline.tables if t.keys]  # keyless: nothing held
        for sw in build.switches:
            for table in keyed:
                self.table_entries.labels(sw.switch, table.name).set(len(sw.table(table.name)))
                self.table_capacity.labels(sw.switch, table.name).set(table.size)

    def set_quarantined(self, hosts: Iterable[str]) -> None:
        """The hosts quarantined now (manual quarantines and containments)."""
        held = sorted(set(hosts))
        self.host_quarantined.clear()
        for host in held:
            self.host_quarantined.labels(host).set(1)
        self.quarantined.set(len(held))

    def set_grants(self, active: int) -> None:
        """How many grants are in force now."""
        self.grants.set(active)

    def signal_received(self, signal: str, source: str) -> None:
        """A signal (`unhealthy`, `healthy`, ...) from a source (an EDR, an IdP)."""
        label, evicted = self.signal_sources.label(source, self._clock())
        if evicted is not None:
            for pair in [p for p in self._signal_series if p[1] == evicted]:
                self.signals.remove(*pair)
                self._signal_series.discard(pair)
        self._signal_series.add((signal, label))
        self.signals.labels(signal, label).inc()

    def set_signals_active(self, by_signal: Mapping[str, int]) -> None:
        """How many hosts each signal holds now."""
        self.signals_active.clear()
        for signal, count in by_signal.items():
            self.signals_active.labels(signal).set(count)

    def containment(self, rule: str, outcome: str) -> None:
        """A contain rule fired: `contained`, `alert_only` (a protected host), `dry_run`,
        or ended: `released`, `expired`."""
        self.containments.labels(rule, outcome).inc()

    def alert(self, alert: Alert) -> None:
        """One alert handed over by the PacketIn follower (after its rate limit)."""
        self.alerts.labels(alert.kind, str(alert.rule_id)).inc()
        label, evicted = self.alert_sources.label(alert.src, self._clock())
        if evicted is not None:
            self.alerts_by_source.remove(evicted)
            self.denies_by_source.remove(evicted)
        self.alerts_by_source.labels(label).inc()
        self.denies_by_source.labels(label).inc(1 + alert.suppressed)
        self.suppressed.inc(alert.suppressed)

    def audit_record(self, record: Mapping[str, object]) -> None:
        """One record appended to the audit log (runtime.audit.append's return)."""
        self.audit.labels(str(record.get("event", "?")), _result(record)).inc()

    def rule_hits(self, hits: Sequence[RuleHits]) -> None:
        """The last per-rule counters read (runtime.alerts.hits_by_rule), served as is."""
        self._hits = tuple(hits)
        self.hits_read.set(self._wall())

    def siem_sink(self, name: str, stats: Callable[[], SinkStats]) -> None:
        """Expose a SIEM sink's counts (sent, dropped, failed, queued) under `name`."""
        self._sinks[name] = stats

    # -- exposition ------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric, and its content type."""
        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE

    def _siem_families(self) -> list[Metric]:
        events = CounterMetricFamily(
            "p4seg_siem_events",
            "Events handed to a SIEM sink, by outcome (sent, dropped: queue full, failed).",
            labels=["sink", "outcome"],
        )
        queued = GaugeMetricFamily(
            "p4seg_siem_queue_events", "Events waiting in a SIEM sink's queue.", labels=["sink"]
        )
        for name, stats in sorted(self._sinks.items()):
            now = stats()
            events.add_metric([name, "sent"], now.sent)
            events.add_metric([name, "dropped"], now.dropped)
            events.add_metric([name, "failed"], now.failed)
            queued.add_metric([name], now.queued)
        return [events, queued]
