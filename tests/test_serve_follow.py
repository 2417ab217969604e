"""`p4seg serve` follows the switch's PacketIns: logged denies become alerts, a scan gets its
source quarantined automatically, signals go through the API, all judged by real packets
through a reference switch on loopback (test_serve's HTTPS API and certificates)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from p4rt import wait_for
from test_cli_controller import HOSTS, _passes, site  # noqa: F401  (site: the fixture)
from test_cli_controller import POLICY as BASE_POLICY
from test_serve import OPERATOR, READER, Served, _running, _serve_args, pki  # noqa: F401

import p4seg.verbs
from p4seg.serve import Service
from runtime.alerts import Alert
from runtime.refswitch.switch import ReferenceSwitch

# test_cli_controller's policy, with posture and containment statements.
POLICY = BASE_POLICY.replace(
    "default deny log",
    "signal unhealthy from edr -> remediation\n"
    "contain after 3 denies within 10s for 10m\n"
    "protect h2\n"
    "default deny log",
)


@pytest.fixture
def follows(
    site: tuple[ReferenceSwitch, list[str]],  # noqa: F811
    pki: Path,  # noqa: F811
) -> Iterator[tuple[Served, Service]]:
    """A serve of POLICY whose follower is the switch's primary, reading its PacketIns."""
    sw, inv = site
    Path("small.zt").write_text(POLICY)
    with _running(_serve_args(inv, pki)) as service:
        (_, port), *_ = service.addresses
        served = Served(sw, pki, f"https://127.0.0.1:{port}", "", Path(".p4seg").resolve())
        assert service.ops.watched.wait(30)
        assert service.follower is not None
        follower = service.follower
        assert wait_for(lambda: follower.is_following("tor1"))
        yield served, service


def _deny(sw: ReferenceSwitch, src: str, dst: str, dport: int) -> None:
    assert not _passes(sw, src, dst, dport), f"{src} -> {dst}:{dport} passed"


def _alerts(served: Served) -> list[dict[str, Any]]:
    code, doc = served.call("GET", "/v1/alerts", token=READER)
    assert code == 200, doc
    return list(doc["alerts"])


def _record(served: Served, **match: object) -> dict[str, Any] | None:
    """The latest audit record with these fields."""
    for record in reversed(served.audit()):
        if all(record.get(k) == v for k, v in match.items()):
            return dict(record)
    return None


def test_denied_packets_become_alerts(follows: tuple[Served, Service]) -> None:
    served, service = follows
    seen: list[Alert] = []
    service.alert_subscribers.append(seen.append)  # how metrics and syslog take them
    _deny(served.switch, "h3", "h1", 22)
    assert wait_for(lambda: len(_alerts(served)) == 1)
    assert [a.dport for a in seen] == [22]
    [alert] = _alerts(served)
    assert (alert["src"], alert["dst"], alert["proto"], alert["dport"]) == (
        "10.0.0.3", "10.0.0.1", "tcp", 22
    )  # fmt: skip
    assert alert["switch"] == "tor1" and alert["ingress_port"] == HOSTS["h3"][1]
    assert alert["rule"] == "line 10: default deny log"
    [line] = (served.state / "alerts.jsonl").read_text().splitlines()
    assert json.loads(line) == alert  # the format of `p4seg alerts --follow`


def test_a_scan_is_contained_then_the_containment_lapses(
    follows: tuple[Served, Service], monkeypatch: pytest.MonkeyPatch
) -> None:
    served, _ = follows
    sw = served.switch
    for port in (21, 22, 23):  # three denied packets: the `contain` threshold
        _deny(sw, "h1", "h3", port)
    assert wait_for(lambda: not _passes(sw, "h1", "h3", 8080))  # quarantined by the engine
    assert _passes(sw, "h1", "h4", 443) and _passes(sw, "h2", "h3", 8080)  # remediation; others
    assert wait_for(lambda: _record(served, event="quarantine") is not None)
    record = _record(served, event="quarantine")
    assert record is not None and (record["actor"], record["via"]) == ("p4seg-engine", "engine")
    assert record["overlay"]["switch"] == "tor1"  # the fast path
    [decision] = record["decisions"]
    assert (
        decision["decision"] == "Quarantine"
        and "3 logged denies within 10s" in (decision["reason"])
    )
    assert wait_for(lambda: served.status()["quarantined"] == ["h1"])
    later = p4seg.verbs.clock() + 601  # past the `for 10m`
    monkeypatch.setattr(p4seg.verbs, "clock", lambda: later)
    # No probe from h1 meanwhile: its denied packets would count towards a new containment.
    assert wait_for(lambda: served.status()["quarantined"] == [])
    assert _passes(sw, "h1", "h3", 8080)  # released on the switch (the watch loop's apply)


def test_a_protected_host_is_only_alerted(follows: tuple[Served, Service]) -> None:
    served, _ = follows
    sw = served.switch
    for port in (21, 22, 23):
        _deny(sw, "h2", "h4", port)
    assert wait_for(lambda: _record(served, event="contain", result="alert only") is not None)
    record = _record(served, event="contain", result="alert only")
    assert record is not None and record["actor"] == "p4seg-engine"
    [decision] = record["decisions"]
    assert decision["decision"] == "AlertOnly" and "protected" in decision["why"]
    assert _passes(sw, "h2", "h3", 8080)  # not cut off
    assert served.status()["quarantined"] == []


def test_a_signal_through_the_api_quarantines_and_healthy_releases(
    follows: tuple[Served, Service],
) -> None:
    served, _ = follows
    sw = served.switch
    before = served.snapshot()
    bad: list[tuple[dict[str, object], int, str]] = [
        ({"host": "h11", "name": "unhealthy", "source": "edr"}, 404, "did you mean 'h1'"),
        ({"host": "h1", "name": "infected", "source": "edr"}, 422, "declared: unhealthy"),
        ({"host": "h1", "name": "unhealthy", "source": "soc"}, 422, "not from 'soc'"),
        ({"host": "h1", "name": "unhealthy", "source": "edr", "ttl": True}, 400, "wrong_type"),
        ({"host": "h1", "name": "unhealthy"}, 400, "missing_field"),
        ({"host": "h1", "name": 5, "source": "edr"}, 400, "wrong_type"),
    ]
    for body, status, text in bad:
        code, doc = served.call("POST", "/v1/signals", body, token=OPERATOR)
        error = doc["error"]
        assert code == status and text in f"{error['code']}: {error['message']}", (body, doc)
    code, doc = served.call("POST", "/v1/signals", {"host": "h1", "name": "x", "source": "edr"},
                            token=READER)  # fmt: skip
    assert code == 403
    assert served.snapshot() == before and _passes(sw, "h1", "h3", 8080)  # nothing changed
    body = {"host": "h1", "name": "unhealthy", "source": "edr", "ttl": "1h", "reason": "beacon"}
    code, doc = served.call("POST", "/v1/signals", {**body, "dry_run": True}, token=OPERATOR)
    assert code == 200 and [d["decision"] for d in doc["decisions"]] == ["WouldContain"]
    assert _passes(sw, "h1", "h3", 8080) and served.status()["signals"] == []
    assert (served.audit()[-1]["event"], served.audit()[-1]["result"]) == ("signal", "dry run")
    code, doc = served.call("POST", "/v1/signals", body, token=OPERATOR)
    assert code == 200, doc
    assert [d["decision"] for d in doc["decisions"]] == ["Quarantine"]
    assert not _passes(sw, "h1", "h3", 8080) and _passes(sw, "h1", "h4", 443)
    [signal] = served.status()["signals"]
    assert (signal["host"], signal["name"], signal["source"]) == ("h1", "unhealthy", "edr")
    assert signal["expires"] is not None
    assert wait_for(lambda: _record(served, event="quarantine") is not None)
    record = _record(served, event="quarantine", actor="token:soar")
    assert record is not None and record["signal"]["reason"] == "beacon"
    code, doc = served.call("POST", "/v1/signals", {"host": "h1", "name": "healthy",
                                                    "source": "edr"}, token=OPERATOR)  # fmt: skip
    assert code == 200 and [d["decision"] for d in doc["decisions"]] == ["Release"]
    assert _passes(sw, "h1", "h3", 8080)
    assert served.status()["signals"] == [] and served.status()["quarantined"] == []


def test_an_apply_does_not_lose_the_follower(follows: tuple[Served, Service]) -> None:
    served, service = follows
    assert service.follower is not None
    follower = service.follower
    _deny(served.switch, "h3", "h1", 22)
    assert wait_for(lambda: len(_alerts(served)) == 1)
    Path("small.zt").write_text(POLICY.replace("tcp 8080", "tcp 8080, 8081"))
    lent, gaps = follower.lent, len(follower.gaps)  # (serve's first apply may have made one)
    code, doc = served.call("POST", "/v1/apply", {}, token=OPERATOR)
    assert code == 200, doc
    assert _passes(served.switch, "h1", "h3", 8081)
    # Written through the follower's session: it never stepped aside, and is still primary.
    # The watch loop also sees the file change and may apply it first (lent too): one or two.
    assert follower.lent in (lent + 1, lent + 2) and len(follower.gaps) == gaps
    assert follower.is_following("tor1")
    _deny(served.switch, "h3", "h1", 23)
    assert wait_for(lambda: len(_alerts(served)) == 2)
    assert _alerts(served)[-1]["dport"] == 23


def test_the_follower_comes_back_after_a_switch_restart(follows: tuple[Served, Service]) -> None:
    served, service = follows
    follower = service.follower
    assert follower is not None
    address = served.switch.server_address
    served.switch.stop()  # the switch restarts: its pipeline, entries and sessions are gone
    fresh = ReferenceSwitch(device_id=1)
    fresh.start(address)
    try:
        assert wait_for(lambda: _passes(fresh, "h1", "h3", 8080), 60)  # watch restored it
        assert wait_for(lambda: follower.is_following("tor1"), 60)  # finsy reconnected
        assert follower.gaps  # the pipeline was set by a session of the apply's own
        _deny(fresh, "h3", "h1", 25)
        assert wait_for(lambda: any(a["dport"] == 25 for a in _alerts(served)))
    finally:
        fresh.stop()


def test_p4seg_signal_asks_the_running_serve(
    follows: tuple[Served, Service], capsys: pytest.CaptureFixture[str]
) -> None:
    from p4seg.cli import main

    served, _ = follows
    remote = ["--server", served.url, "--server-ca", str(served.pki / "ca.pem"),
              "--server-token", OPERATOR]  # fmt: skip
    signal = ["signal", "h1", "unhealthy", "--source", "edr", "--ttl", "1h"]
    assert main([*signal, "-p", "small.zt", "-i", "small.yaml"]) == 1  # not beside it
    assert "a p4seg serve runs on .p4seg" in capsys.readouterr().err
    assert main([*signal, *remote]) == 0
    assert "Quarantine h1: signal unhealthy from edr (via https://" in capsys.readouterr().out
    assert not _passes(served.switch, "h1", "h3", 8080)
    assert main(["signal", "h1", "healthy", "--source", "edr", *remote]) == 0
    assert "Release h1" in capsys.readouterr().out
    assert _passes(served.switch, "h1", "h3", 8080)


def test_the_alert_stream_gets_each_alert_as_it_comes(follows: tuple[Served, Service]) -> None:
    import ssl
    import urllib.request

    served, _ = follows
    context = ssl.create_default_context(cafile=served.pki / "ca.pem")
    request = urllib.request.Request(
        served.url + "/v1/alerts/stream", headers={"Authorization": f"Bearer {READER}"}
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as stream:
        _deny(served.switch, "h3", "h1", 26)
        first = json.loads(stream.readline())
        _deny(served.switch, "h3", "h1", 27)
        second = json.loads(stream.readline())
    assert (first["dport"], second["dport"]) == (26, 27)


def test_contain_dry_run_only_reports(
    site: tuple[ReferenceSwitch, list[str]],  # noqa: F811
    pki: Path,  # noqa: F811
) -> None:
    sw, inv = site
    Path("small.zt").write_text(POLICY)
    with _running(_serve_args(inv, pki, "--contain-dry-run")) as service:
        served = Served(sw, pki, "", "", Path(".p4seg").resolve())
        assert service.ops.watched.wait(30) and service.follower is not None
        follower = service.follower
        assert wait_for(lambda: follower.is_following("tor1"))
        for port in (21, 22, 23):
            _deny(sw, "h1", "h3", port)
        assert wait_for(lambda: _record(served, event="contain", result="dry run") is not None)
        record = _record(served, event="contain", result="dry run")
        assert record is not None and record["decisions"][0]["decision"] == "WouldContain"
        assert _passes(sw, "h1", "h3", 8080)  # nothing was contained
        assert not (served.state / "engine.json").exists()
