"""runtime/engine.py: signals, containment windows, TTLs, protected hours, dry run and
state, on the trading floor's inventory with a clock passed in (no sleeping)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from compiler.check import check_policy
from compiler.inventory import load_inventory
from runtime.alerts import Alert
from runtime.engine import (
    AlertOnly,
    EngineSettings,
    PolicyEngine,
    Quarantine,
    Release,
    Restrict,
    Signal,
    SignalError,
    Unrestrict,
    WouldContain,
)

POLICY = """\
policy floor
service algo         = algo1, algo2, algo3
service order_router = oms1, oms2
service remediation  = jump1
service read_only    = 10.0.2.250
service dev          = 10.8.0.0/16
allow algo, read_only -> order_router tcp 9876
allow algo            -> remediation  tcp 443
deny  dev             -> algo         log
signal unhealthy from edr      -> remediation
signal degraded  from edr, mdm -> restrict read_only
contain after 5 denies within 10s for 15m
protect fixgw
protect oms1 during 08:00-17:00 Mon-Fri Europe/London
default deny log
"""
T0 = dt.datetime(2026, 3, 2, 3, 0, tzinfo=dt.UTC).timestamp()  # a Monday, 03:00 London
ADDRESSES = {"algo1": "10.0.2.11", "oms1": "10.0.3.10", "fixgw": "10.0.3.20"}


def _settings(text: str = POLICY) -> EngineSettings:
    inventory, _ = load_inventory("topologies/trading_floor.yaml")
    result = check_policy(text, "floor.zt", inventory)
    assert result.policy is not None, result.diagnostics
    return EngineSettings.of(result.policy, {h.name: h.ip for h in inventory.hosts})


@pytest.fixture(scope="module")
def settings() -> EngineSettings:
    return _settings()


def _deny(src: str, kind: str = "deny", suppressed: int = 0, dport: int = 22) -> Alert:
    return Alert(
        "", "tor-alg", 1, src, "10.0.3.11", "tcp", 40000, dport, 2, 0, "", kind, suppressed
    )


def _scan(engine: PolicyEngine, src: str, times: list[float]) -> list[object]:
    out: list[object] = []
    for i, t in enumerate(times):
        out += engine.observe(_deny(src, dport=1000 + i), t)
    return out


def test_the_nth_deny_within_the_window_quarantines(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    assert _scan(engine, "10.0.2.11", [T0 + i for i in range(4)]) == []
    [decision] = engine.observe(_deny("10.0.2.11"), T0 + 4)
    assert isinstance(decision, Quarantine)
    assert (decision.host, decision.until) == ("algo1", T0 + 4 + 900)
    assert "5 logged denies within 10s" in decision.reason and "port 22" in decision.reason
    # Contained: its further denies are not counted again, nothing new is decided.
    assert _scan(engine, "10.0.2.11", [T0 + 5 + i for i in range(10)]) == []
    assert engine.next_change(T0 + 5) == T0 + 904
    assert engine.tick(T0 + 903) == []
    [release] = engine.tick(T0 + 904)
    assert isinstance(release, Release) and release.host == "algo1"
    assert release.reason.startswith("lapsed: 5 logged denies")
    assert engine.holds == {} and engine.applied == {}


def test_denies_spread_wider_than_the_window_never_contain(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    assert _scan(engine, "10.0.2.11", [T0 + 3 * i for i in range(20)]) == []  # 5 span 12s
    assert len(engine.windows["10.0.2.11"]) == 5  # bounded by the largest count


def test_out_of_order_alerts_are_counted_in_time_order(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    assert _scan(engine, "10.0.2.11", [T0 + 2, T0 + 1, T0 + 12, T0 + 3]) == []
    # The fifth deny at T0+4: in time order the five span T0+1..T0+12, more than 10s.
    assert engine.observe(_deny("10.0.2.11"), T0 + 4) == []
    [decision] = engine.observe(_deny("10.0.2.11"), T0 + 5)  # T0+2..T0+12: 10s
    assert isinstance(decision, Quarantine)


def test_suppressed_denies_count_and_spoofed_sources_do_not(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    assert engine.observe(_deny("10.0.2.11", kind="spoof", suppressed=50), T0) == []
    assert engine.windows == {}
    [decision] = engine.observe(_deny("10.0.2.11", suppressed=4), T0)
    assert isinstance(decision, Quarantine)


def test_a_source_outside_the_inventory_only_alerts(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    decisions = _scan(engine, "10.9.9.9", [T0 + i for i in range(5)])
    assert decisions == [AlertOnly("10.9.9.9", "not an inventory host: nothing to quarantine",
                                   decisions[0].reason)]  # type: ignore[attr-defined]  # fmt: skip
    assert engine.holds == {}


def test_contain_scope_limits_the_sources(settings: EngineSettings) -> None:
    scoped = _settings(POLICY.replace("contain after", "contain dev after"))
    engine = PolicyEngine(scoped)
    assert _scan(engine, "10.0.2.11", [T0 + i for i in range(10)]) == []
    assert engine.windows == {}
    [decision] = _scan(engine, "10.8.0.11", [T0 + i for i in range(5)])
    assert isinstance(decision, Quarantine) and decision.host == "dev1"


def test_signal_ttl_and_healthy(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    [q] = engine.signal(Signal("algo1", "unhealthy", "edr", 3600, "malware", T0))
    assert q == Quarantine("algo1", "signal unhealthy from edr: malware", T0 + 3600)
    [r] = engine.signal(Signal("algo1", "degraded", "mdm", None, "old agent", T0 + 10))
    assert r == Restrict("algo1", ("read_only",), "signal degraded from mdm: old agent", None)
    # `healthy` from edr clears edr's word only: mdm's restriction stays.
    [release] = engine.signal(Signal("algo1", "healthy", "edr", None, "reimaged", T0 + 20))
    assert release == Release("algo1", "healthy from edr: reimaged")
    assert engine.tick(T0 + 10**6) == []  # no TTL: the restriction holds
    [unrestrict] = engine.signal(Signal("algo1", "healthy", "mdm", None, "", T0 + 30))
    assert unrestrict == Unrestrict("algo1", "healthy from mdm")
    # A TTL lapses on its own.
    engine.signal(Signal("algo2", "unhealthy", "edr", 60, "", T0))
    assert engine.next_change(T0) == T0 + 60
    assert [type(d) for d in engine.tick(T0 + 60)] == [Release]


def test_refused_signals_change_nothing(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    engine.signal(Signal("algo1", "degraded", "edr", None, "", T0))
    before = json.dumps(engine.to_json())
    cases = [
        (Signal("algo9", "unhealthy", "edr", None, "", T0), "no host 'algo9'"),
        (Signal("algo1", "infected", "edr", None, "", T0), "declares no signal 'infected'"),
        (Signal("algo1", "unhealthy", "mdm", None, "", T0), "accepted from edr, not from 'mdm'"),
        (Signal("algo1", "unhealthy", "edr", 0, "", T0), "ttl must be positive"),
        (Signal("algo1", "healthy", "soc", None, "", T0), "no signal of the policy comes from"),
    ]
    for signal, message in cases:
        with pytest.raises(SignalError, match=message):
            engine.signal(signal)
    assert json.dumps(engine.to_json()) == before


def test_restrictions_and_quarantine_stack(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    engine.signal(Signal("algo1", "degraded", "edr", 100, "", T0))
    engine.signal(Signal("algo1", "unhealthy", "edr", 50, "", T0))
    # The quarantine lapses first; the restriction it sat on remains until its own TTL.
    assert [type(d) for d in engine.tick(T0 + 50)] == [Release]
    assert engine.applied["algo1"].profiles == ("read_only",)
    assert [type(d) for d in engine.tick(T0 + 100)] == [Unrestrict]


def test_a_remediation_server_is_never_quarantined(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    [decision] = engine.signal(Signal("jump1", "unhealthy", "edr", None, "", T0))
    assert isinstance(decision, AlertOnly) and "remediation" in decision.why


def test_always_protected_host_only_alerts(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    [decision] = engine.signal(Signal("fixgw", "unhealthy", "edr", None, "c2 beacon", T0))
    assert isinstance(decision, AlertOnly)
    assert decision.why.startswith("protected: never contained automatically (line 13")
    decisions = _scan(engine, ADDRESSES["fixgw"], [T0 + i for i in range(5)])
    assert [type(d) for d in decisions] == [AlertOnly]
    assert engine.tick(T0 + 10**6) == [] and "fixgw" not in engine.applied


@pytest.mark.parametrize(
    ("day", "protected"),
    [("2026-01-05", True), ("2026-07-06", False)],  # Mondays: GMT, then BST (UTC+1)
)
def test_protected_hours_follow_their_time_zone(
    settings: EngineSettings, day: str, protected: bool
) -> None:
    at = dt.datetime.fromisoformat(f"{day}T16:30:00+00:00").timestamp()
    engine = PolicyEngine(settings)
    [decision] = engine.signal(Signal("oms1", "unhealthy", "edr", 7200, "", at))
    if not protected:  # 17:30 in London in July: market hours are over
        assert isinstance(decision, Quarantine)
        return
    assert isinstance(decision, AlertOnly) and "08:00-17:00 Mon-Fri Europe/London" in decision.why
    close = dt.datetime.fromisoformat(f"{day}T17:00:00+00:00").timestamp()
    assert engine.next_change(at) == close
    # At 17:00 London the protection ends and the signal, still valid, takes effect.
    assert [type(d) for d in engine.tick(close)] == [Quarantine]
    # Held past the next morning's 08:00? The TTL ends first (18:30), so it is released.
    assert [type(d) for d in engine.tick(at + 7200)] == [Release]


def test_protection_starting_releases_a_held_host(settings: EngineSettings) -> None:
    evening = dt.datetime(2026, 1, 5, 20, 0, tzinfo=dt.UTC).timestamp()  # Monday 20:00 GMT
    engine = PolicyEngine(settings)
    assert [
        type(d) for d in engine.signal(Signal("oms1", "unhealthy", "edr", None, "", evening))
    ] == [Quarantine]
    morning = dt.datetime(2026, 1, 6, 8, 0, tzinfo=dt.UTC).timestamp()
    assert engine.next_change(evening) == morning
    [release] = engine.tick(morning)
    assert release == Release("oms1", "protection window changed")


def test_dry_run_reports_what_would_be_contained(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings, dry_run=True)
    [decision] = _scan(engine, "10.0.2.11", [T0 + i for i in range(5)])
    assert isinstance(decision, WouldContain)
    assert (decision.host, decision.action, decision.until) == ("algo1", "quarantine", T0 + 904)
    [restrict] = engine.signal(Signal("algo2", "degraded", "edr", None, "", T0))
    assert restrict == WouldContain("algo2", "restrict read_only", "signal degraded from edr", None)
    assert engine.tick(T0 + 904) == []  # nothing was done, nothing to release


def test_state_round_trips_through_json(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings)
    _scan(engine, "10.0.2.11", [T0, T0 + 1, T0 + 2])
    engine.signal(Signal("algo2", "unhealthy", "edr", 600, "x", T0))
    engine.signal(Signal("algo3", "degraded", "mdm", None, "y", T0))
    doc = json.loads(json.dumps(engine.to_json()))
    again = PolicyEngine.from_json(doc, settings)
    assert again.to_json() == engine.to_json()
    # The window carries on where it was, and the holds lapse as they would have.
    assert _scan(again, "10.0.2.11", [T0 + 3]) == []
    assert [type(d) for d in again.observe(_deny("10.0.2.11"), T0 + 4)] == [Quarantine]
    assert [(type(d), d.host) for d in again.tick(T0 + 600)] == [(Release, "algo2")]


@pytest.mark.parametrize(
    "doc",
    [None, {}, {"version": 2}, {"version": 1, "holds": {}, "windows": {}, "applied": {}},
     {"version": 1, "holds": {"a": [{"origin": "signal"}]}, "windows": {}, "applied": {}, "evicted": 0},
     {"version": 1, "holds": {}, "windows": {"10.0.0.1": ["x"]}, "applied": {}, "evicted": 0}],
)  # fmt: skip
def test_a_damaged_state_is_refused(settings: EngineSettings, doc: object) -> None:
    with pytest.raises(ValueError):
        PolicyEngine.from_json(doc, settings)


def test_tracked_sources_are_bounded(settings: EngineSettings) -> None:
    engine = PolicyEngine(settings, max_sources=3)
    for i in range(5):
        engine.observe(_deny(f"10.8.0.{11 + i}"), T0 + i)
    assert list(engine.windows) == ["10.8.0.13", "10.8.0.14", "10.8.0.15"]
    assert engine.evicted == 2
    engine.observe(_deny("10.8.0.13"), T0 + 10)  # touched: now the most recent
    engine.observe(_deny("10.8.0.99"), T0 + 11)
    assert list(engine.windows) == ["10.8.0.15", "10.8.0.13", "10.8.0.99"]
    # Windows nothing can count any more are forgotten on the next tick.
    engine.tick(T0 + 100)
    assert engine.windows == {}
