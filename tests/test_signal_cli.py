"""`p4seg signal` end to end against a reference switch on loopback: a signal quarantines,
restricts or only alerts, judged by packets through the switch's data plane."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from p4rt import wait_for
from test_cli_controller import _passes, site  # noqa: F401  (the fixture)

import p4seg.verbs
from p4seg.cli import main
from runtime.refswitch.switch import ReferenceSwitch

POLICY = """\
policy small
service front       = h1, h2
service back        = h3
service remediation = h4
service read_only   = 10.0.0.250
allow front            -> back        tcp 8080
allow front, read_only -> back        tcp 8443
allow h1               -> remediation tcp 443
signal unhealthy from edr -> remediation
signal degraded  from edr -> restrict read_only
protect h2
default deny log
"""


@pytest.fixture
def signal_site(request: pytest.FixtureRequest) -> tuple[ReferenceSwitch, list[str]]:
    """test_cli_controller's switch and hosts (h1..h4 on tor1), with this module's policy."""
    sw, inventory = request.getfixturevalue("site")
    Path("small.zt").write_text(POLICY)
    return sw, ["-p", "small.zt", *inventory]


def _flows(sw: ReferenceSwitch) -> list[bool]:
    return [
        _passes(sw, "h1", "h3", 8080),
        _passes(sw, "h1", "h3", 8443),
        _passes(sw, "h1", "h4", 443),
        _passes(sw, "h2", "h3", 8080),
    ]


def _audit() -> list[dict[str, object]]:
    return [json.loads(line) for line in Path(".p4seg/audit.jsonl").read_text().splitlines()]


def test_a_signal_quarantines_then_healthy_releases(
    signal_site: tuple[ReferenceSwitch, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sw, args = signal_site
    assert main(["apply", *args[1:]]) == 0
    assert _flows(sw) == [True, True, True, True]
    capsys.readouterr()
    signal = ["signal", "h1", "unhealthy", "--source", "edr", "--ttl", "1h", "--reason", "beacon"]
    assert main([*signal, *args]) == 0
    out = capsys.readouterr().out
    assert "quarantine h1 until " in out and "signal unhealthy from edr: beacon" in out
    assert "writes on tor1 only" in out  # the overlay's fast path, as `p4seg quarantine`
    assert _flows(sw) == [False, False, True, True]
    record = _audit()[-1]
    assert record["event"] == "quarantine" and record["signal"] == {
        "name": "unhealthy", "source": "edr", "ttl": 3600, "reason": "beacon"}  # fmt: skip
    live = json.loads(Path(".p4seg/live.json").read_text())
    assert list(live["quarantined"]) == ["h1"] and "h1" in live["quarantine_until"]
    assert main(["signal", "h1", "healthy", "--source", "edr", *args]) == 0
    assert "release h1: healthy from edr" in capsys.readouterr().out
    assert _flows(sw) == [True, True, True, True]


def test_the_ttl_lapses_on_the_next_apply(
    signal_site: tuple[ReferenceSwitch, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sw, args = signal_site
    now = [p4seg.verbs.clock()]
    monkeypatch.setattr(p4seg.verbs, "clock", lambda: now[0])
    assert main(["apply", *args[1:]]) == 0
    assert main(["signal", "h1", "unhealthy", "--source", "edr", "--ttl", "10m", *args]) == 0
    assert _flows(sw)[0] is False
    now[0] += 600
    assert main(["apply", *args[1:]]) == 0  # what `watch` does when the TTL is due
    assert _flows(sw) == [True, True, True, True]
    assert json.loads(Path(".p4seg/live.json").read_text())["quarantined"] == {}


def test_restrict_downgrades_to_the_profile(
    signal_site: tuple[ReferenceSwitch, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sw, args = signal_site
    assert main(["apply", *args[1:]]) == 0
    capsys.readouterr()
    assert main(["signal", "h1", "degraded", "--source", "edr", *args]) == 0
    assert "restrict h1 to read_only: signal degraded from edr" in capsys.readouterr().out
    # 8080 is not the profile's; 8443 is; remediation on 443 is not the profile's either.
    assert _flows(sw) == [False, True, False, True]
    assert _audit()[-1]["event"] == "signal"
    capsys.readouterr()
    assert main(["signal", "h1", "healthy", "--source", "edr", "--output", "json", *args]) == 0
    doc = json.loads(capsys.readouterr().out)  # one document: the decisions and the apply
    assert doc["decisions"] == [
        {"decision": "Unrestrict", "host": "h1", "reason": "healthy from edr"}]  # fmt: skip
    assert [s["switch"] for s in doc["applied"]["switches"]] == ["tor1"]
    assert _flows(sw) == [True, True, True, True]


def test_a_protected_host_only_alerts_and_bad_signals_change_nothing(
    signal_site: tuple[ReferenceSwitch, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    sw, args = signal_site
    assert main(["apply", *args[1:]]) == 0
    capsys.readouterr()
    assert main(["signal", "h2", "unhealthy", "--source", "edr", *args]) == 0
    assert "alert only, h2 protected: never contained automatically" in capsys.readouterr().out
    assert _flows(sw) == [True, True, True, True]
    assert _audit()[-1]["result"] == "no change"
    before = {p.name: p.read_bytes() for p in Path(".p4seg").iterdir() if p.is_file()}
    for bad in (["h9", "unhealthy", "--source", "edr"], ["h1", "infected", "--source", "edr"],
                ["h1", "unhealthy", "--source", "idp"], ["h1", "unhealthy", "--source", "edr",
                "--ttl", "0s"]):  # fmt: skip
        assert main(["signal", *bad, *args]) == 1
    err = capsys.readouterr().err
    assert "no host 'h9'" in err and "declares no signal 'infected'" in err
    assert "not from 'idp'" in err and "--ttl: duration '0s'" in err
    after = {p.name: p.read_bytes() for p in Path(".p4seg").iterdir() if p.is_file()}
    assert after == before and _flows(sw) == [True, True, True, True]
    # --dry-run says what would happen and records nothing.
    assert main(["signal", "h1", "unhealthy", "--source", "edr", "--dry-run", *args]) == 0
    assert "would quarantine h1" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in Path(".p4seg").iterdir() if p.is_file()} == before


def test_a_scan_is_contained_from_real_packet_ins(
    signal_site: tuple[ReferenceSwitch, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The loop `p4seg serve` runs: PacketIns of logged denies -> Alerts -> the engine ->
    the live state -> the switch. h1 scans; after 5 denies it is cut off but for
    remediation; h2 is untouched; the containment lapses after its 15 minutes."""
    from p4seg.cli import _front, _parser
    from p4seg.control import _rule_lines
    from p4seg.signals import hold
    from p4seg.verbs import _open_session
    from runtime.alerts import Alert, follow
    from runtime.engine import EngineSettings, PolicyEngine, Quarantine, Release
    from runtime.live import LiveState

    sw, args = signal_site
    Path("small.zt").write_text(POLICY + "contain front after 5 denies within 10s for 15m\n")
    assert main(["apply", *args[1:]]) == 0
    opened = _open_session("alerts", _parser().parse_args(["alerts", *args[1:]]), _front)
    assert opened is not None
    compiled, session = opened
    hosts = {h.name: h.ip for h in compiled.inventory.hosts}
    engine = PolicyEngine(EngineSettings.of(compiled.policy, hosts))
    alerts: list[Alert] = []

    async def scan() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(
            follow(session.switches, session.files, session.options,
                   _rule_lines(compiled.build), alerts.append, on_ready=lambda _: ready.set())
        )  # fmt: skip
        await asyncio.wait_for(ready.wait(), 10)
        for _ in range(50):  # h3 (outside `front`) until the path switch -> sink is live
            _passes(sw, "h3", "h1", 23)
            if await asyncio.to_thread(wait_for, lambda: bool(alerts), 0.2):
                break
        assert alerts and alerts[0].src == "10.0.0.3"
        for port in range(20, 25):
            assert not _passes(sw, "h1", "h3", port)
        assert await asyncio.to_thread(wait_for, lambda: len(alerts) == 6)
        task.cancel()

    asyncio.run(scan())
    t0 = p4seg.verbs.clock()  # the live state judges the quarantine's end by the clock
    decisions = [d for i, a in enumerate(alerts) for d in engine.observe(a, t0 + i)]
    assert [(type(d), d.host) for d in decisions] == [(Quarantine, "h1")]
    state = LiveState.load(Path(".p4seg"))
    assert hold(state, decisions, t0 + 5)
    state.save(Path(".p4seg"))
    assert main(["apply", *args[1:]]) == 0
    assert _flows(sw) == [False, False, True, True]  # h1: remediation only; h2 untouched
    until = decisions[0].until  # type: ignore[union-attr]
    assert until == t0 + 5 + 900  # the fifth deny of h1 (the first alert was h3's)
    assert engine.tick(until - 1) == []
    [release] = engine.tick(until)
    assert isinstance(release, Release)
    state = LiveState.load(Path(".p4seg"))
    assert hold(state, [release], until)
    state.save(Path(".p4seg"))
    assert main(["apply", *args[1:]]) == 0
    assert _flows(sw) == [True, True, True, True]


def test_the_engine_never_ends_an_operators_quarantine() -> None:
    from p4seg.signals import hold
    from runtime.engine import Quarantine, Release, Restrict
    from runtime.live import LiveState

    state = LiveState()
    state.quarantine_by_operator("h1", 10.0)
    assert not hold(state, [Quarantine("h1", "signal", 100.0)], 20.0)
    assert not hold(state, [Release("h1", "healthy")], 30.0)
    assert (state.quarantined, state.quarantine_until) == ({"h1": 10.0}, {})
    # The engine's own quarantine: given its end, and released by the engine.
    assert hold(state, [Quarantine("h2", "contain", 100.0), Restrict("h3", ("p",), "", None)], 20.0)
    assert state.quarantine_until == {"h2": 100.0} and state.automatic == ["h2"]
    assert state.restricted == {"h3": ["p"]} and state.restricted_until == {}
    # An operator who quarantines a contained host makes it theirs: no end any more.
    state.quarantine_by_operator("h2", 40.0)
    assert (state.quarantine_until, state.automatic) == ({}, [])
    assert not hold(state, [Release("h2", "lapsed")], 100.0)
