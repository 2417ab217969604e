"""What `p4seg serve` tells the outside world: Prometheus metrics (runtime/metrics.py), events
for the SIEM (runtime/siem.py), and the packet rates the live map draws (p4seg/webmap.py).

Audit records reach them through `runtime.audit.watch` (every change, whoever made it:
an API caller, the watch loop, an expiry); alerts through `alert`, which the PacketIn
follower calls; the per-rule counters through `hits`, read by the service every
`--hits-interval` seconds. The gauges that describe a state (quarantined hosts, grants,
table occupancy, switch sessions) are set from that state each time /metrics is read.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from compiler.emit import Build
from runtime import audit
from runtime.alerts import Alert, RuleHits
from runtime.live import LiveState
from runtime.metrics import Metrics
from runtime.siem import SinkConfig, SyslogSink, event_of_alert, event_of_audit, parse_sink


def sinks_of(args: argparse.Namespace) -> list[SinkConfig]:
    """The --syslog collectors (SiemConfigError for a bad one); the --syslog-ca/-cert/-key
    files go to the tls:// ones."""
    out = []
    for url in getattr(args, "syslog", None) or []:
        tls = url.lower().startswith("tls:")
        files = {"ca": args.syslog_ca, "cert": args.syslog_cert, "key": args.syslog_key}
        out.append(parse_sink(url, **(files if tls else {})))
    return out


@dataclass(frozen=True, slots=True)
class _Applied:
    """One switch of an audited apply, as runtime.metrics counts it."""

    switch: str
    ok: bool
    written: int


class Observers:
    """The metrics and the SIEM sinks of one service, fed from the audit log, the alerts and
    the rule counters; `close()` stops listening and flushes the sinks."""

    def __init__(self, sinks: Sequence[SyslogSink] = (), metrics: Metrics | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.sinks = list(sinks)
        for sink in self.sinks:
            self.metrics.siem_sink(sink.config.url, sink.stats)
        self.rates: dict[int, float] = {}  # rule id -> packets/s between the last two reads
        self._counts: tuple[float, dict[int, int]] | None = None
        self._build: Build | None = None
        self._primary: dict[str, bool] = {}
        self._unwatch = audit.watch(self.audit)

    def close(self) -> None:
        self._unwatch()
        for sink in self.sinks:
            sink.close()

    def audit(self, record: Mapping[str, object]) -> None:
        """An audit record: counted, sent to the SIEM, and if it wrote switches, an apply."""
        self.metrics.audit_record(record)
        switches = record.get("switches")
        if isinstance(switches, dict) and switches:
            applied = [
                _Applied(name, bool(s.get("ok")), int(s.get("written", 0)))
                for name, s in switches.items()
                if isinstance(s, dict)
            ]
            seconds = max(
                (float(s.get("seconds", 0.0)) for s in switches.values() if isinstance(s, dict)),
                default=0.0,
            )
            self.metrics.apply_finished(str(record.get("event", "?")), seconds, applied)
        event = event_of_audit(record)
        for sink in self.sinks:
            sink.emit(event)

    def alert(self, alert: Alert) -> None:
        """A logged deny or spoofed source the follower admitted."""
        self.metrics.alert(alert)
        event = event_of_alert(alert)
        for sink in self.sinks:
            sink.emit(event)

    def hits(self, hits: Sequence[RuleHits], now: float) -> None:
        """The per-rule counters just read: served as they are, and as rates for the map."""
        self.metrics.rule_hits(hits)
        counts = {h.rule_id: h.packets for h in hits}
        if self._counts is not None and now > self._counts[0]:
            then, before = self._counts
            self.rates = {
                rule: max(0, n - before.get(rule, 0)) / (now - then) for rule, n in counts.items()
            }
        self._counts = (now, counts)

    def refresh(
        self,
        state: LiveState,
        now: float,
        build: Build | None,
        sessions: Mapping[str, Mapping[str, object]],
    ) -> None:
        """The state gauges, from the live state, the build the switches hold and the last
        probe of each switch (status's `connection`: `up` when it answers)."""
        self.metrics.set_quarantined(state.quarantined)
        self.metrics.set_grants(len(state.active_grants(now)))
        if build is not None and build is not self._build:
            self.metrics.table_occupancy(build)
            self._build = build
        for name, probe in sessions.items():
            up = probe.get("connection") == "up"
            self.metrics.switch_state(name, up, up and self._primary.get(name, False))

    def primary(self, switch: str, is_primary: bool) -> None:
        """Whether this service is the switch's primary now (its PacketIn follower says)."""
        self._primary[switch] = is_primary

    def following(self, switch: str) -> bool:
        """Whether this service's follower is the switch's primary, reading its PacketIns."""
        return self._primary.get(switch, False)

    def sources(self) -> Iterable[str]:
        """The SIEM destinations, for the banner."""
        return [sink.config.url for sink in self.sinks]
