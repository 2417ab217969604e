"""What `p4seg serve` tells the outside: its /metrics after real operations and real
packets (parsed as Prometheus parses them), and its audit records at a real rsyslogd."""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from browser import CHROMIUM, Browser
from p4rt import wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_cli_controller import _passes, site  # noqa: F401  (site: the fixture)
from test_serve import OPERATOR, READER, Served, _running, _serve_args, pki  # noqa: F401  (pki)
from test_siem import Collector, collector, structured_data  # noqa: F401  (collector)

from runtime.refswitch.switch import ReferenceSwitch


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _until(check: Callable[[], object], timeout: float = 30.0) -> object:
    """Poll `check` until it returns something truthy (a condition, not a fixed wait)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{check} never held")
        time.sleep(0.05)


@pytest.fixture
def observed(
    site: tuple[ReferenceSwitch, list[str]],  # noqa: F811
    pki: Path,  # noqa: F811
    collector: Collector,  # noqa: F811
) -> Iterator[Served]:
    sw, inv = site
    argv = _serve_args(inv, pki, "--metrics", "127.0.0.1:0", "--hits-interval", "0.2",
                       "--syslog", collector.url("tcp"))  # fmt: skip
    with _running(argv) as service:
        (_, port), (_, metrics) = service.addresses
        assert service.ops.watched.wait(30)  # the watch loop's first apply is done
        follower = service.follower
        assert follower is not None and wait_for(lambda: follower.is_following("tor1"))
        yield Served(sw, pki, f"https://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}",
                     Path(".p4seg").resolve())  # fmt: skip


def _metrics(served: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(served.metrics_url + "/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return _samples(reply.read().decode())


def test_metrics_follow_operations_and_packets(observed: Served, collector: Collector) -> None:  # noqa: F811
    sw = observed.switch
    # the first apply (the watch loop's) is counted, with the table occupancy of its build
    first = _until(lambda: (m := _metrics(observed)).get(("p4seg_applies_total",
                   (("result", "ok"), ("verb", "watch")))) and m)  # fmt: skip
    assert isinstance(first, dict)
    assert first[("p4seg_table_entries", (("switch", "tor1"), ("table", "policy")))] > 0
    assert first[("p4seg_table_capacity_entries", (("switch", "tor1"), ("table", "policy")))] > 0
    code, _doc = observed.call("PUT", "/v1/quarantine/h2", {"reason": "edr"}, token=OPERATOR)
    assert code == 200
    after = _metrics(observed)
    assert after[("p4seg_quarantined_hosts", ())] == 1
    assert after[("p4seg_host_quarantined", (("host", "h2"),))] == 1
    assert after[("p4seg_applies_total", (("result", "ok"), ("verb", "quarantine")))] == 1
    assert after[("p4seg_audit_records_total", (("event", "quarantine"), ("result", "ok")))] == 1
    # real packets through the data plane: the counters reach /metrics within a read or two
    for _ in range(5):
        assert _passes(sw, "h1", "h3", 8080)
    assert not _passes(sw, "h2", "h3", 8080)  # quarantined

    def counted() -> float:
        m = _metrics(observed)
        allow = [v for (name, labels), v in m.items()
                 if name == "p4seg_rule_packets_total" and ("action", "allow") in labels]  # fmt: skip
        return sum(allow) >= 5 and m.get(("p4seg_switch_connected", (("switch", "tor1"),)), 0)

    assert _until(counted)
    # serve's follower holds the switch between applies: this controller is its primary
    primary = ("p4seg_switch_primary", (("switch", "tor1"),))
    assert _until(lambda: _metrics(observed).get(primary) == 1)

    # the SIEM got the quarantine, with the API caller as the actor
    def sent() -> list[str]:
        return [line for line in collector.lines("raw.log") if "quarantine" in line]

    line = str(_until(sent)[0])  # type: ignore[index]
    sd = structured_data(line[line.index("[") : line.rindex("]") + 1])
    fields = next(v for k, v in sd.items() if k.startswith("p4seg@"))
    assert fields["event"] == "quarantine" and fields["host"] == "h2"
    assert fields["actor"] == "token:soar"  # the API caller, as the audit names it
    # a logged deny from the switch (the follower's PacketIn): counted, and at the SIEM
    assert not _passes(sw, "h3", "h1", 22)
    by_source = ("p4seg_alerts_by_source_total", (("source", "10.0.0.3"),))
    assert _until(lambda: _metrics(observed).get(by_source) == 1)

    def alerted() -> list[str]:
        return [
            line
            for line in collector.lines("raw.log")
            if 'category="alert"' in line and 'src="10.0.0.3"' in line
        ]

    alert = str(_until(alerted)[0])  # type: ignore[index]
    fields = next(v for k, v in structured_data(alert[alert.index("[") : alert.rindex("]") + 1])
                  .items() if k.startswith("p4seg@"))  # fmt: skip
    assert (fields["src"], fields["dst"], fields["dport"]) == ("10.0.0.3", "10.0.0.1", "22")


def test_the_live_map_in_a_real_browser_updates_after_a_quarantine(observed: Served) -> None:
    """Chromium opens the map with a read-only login link, draws the services from
    /v1/map, and marks a host quarantined through the API on its next refresh."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    code, doc = observed.call("GET", "/v1/map", token=READER)
    assert code == 200 and {n["name"] for n in doc["nodes"]} == {"front", "back", "h1",
                                                                   "remediation"}  # fmt: skip
    # a cookie is read-only: it cannot quarantine
    request = urllib.request.Request(observed.url + "/v1/quarantine/h2", b"{}", method="PUT",
                                     headers={"Cookie": f"p4seg_token={OPERATOR}"})  # fmt: skip
    context = ssl.create_default_context(cafile=observed.pki / "ca.pem")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, context=context, timeout=10)
    assert refused.value.code == 401

    async def look() -> None:
        async with Browser(f"{observed.url}/?token={READER}") as page:
            drawn = await page.wait_for("document.querySelectorAll('#nodes g.node').length")
            assert drawn == 4
            assert await page.evaluate("location.pathname + location.search") == "/"
            assert await page.evaluate("document.querySelectorAll('#edges path.allow').length") == 2
            code, _ = await asyncio.to_thread(
                observed.call, "PUT", "/v1/quarantine/h2", {"reason": "edr"}, token=OPERATOR
            )
            assert code == 200
            held = await page.wait_for(
                "document.querySelector('g.node[data-name=\"front\"]').dataset.quarantined"
            )
            assert held == "h2"
            assert await page.evaluate(
                "[...document.querySelectorAll('#quarantined li')].map(li => li.dataset.host)"
            ) == ["h2"]

    asyncio.run(look())
