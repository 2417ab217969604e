"""SIEM export (runtime/siem.py) into a real rsyslogd started by the test: RFC 5424 with
structured data over UDP, TCP (octet counting) and mutual TLS, and CEF; what rsyslog's own
RFC 5424 parser extracted, and the raw message it received, are read back from its files."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from p4rt import wait_for
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from p4src.spec import REASON_DENY_LOG, REASON_SPOOF
from runtime import audit
from runtime.alerts import Alert, alert_of
from runtime.metrics import Metrics
from runtime.siem import (
    DEFAULT_SD_ID,
    Event,
    Severity,
    SiemConfigError,
    SinkConfig,
    SinkStats,
    SyslogSink,
    event_of_alert,
    event_of_audit,
    format_rfc5424,
    parse_sink,
)

RSYSLOGD = shutil.which("rsyslogd") or (
    "/usr/sbin/rsyslogd" if os.access("/usr/sbin/rsyslogd", os.X_OK) else None
)
OSSL = bool(
    glob.glob("/usr/lib/*/rsyslog/lmnsd_ossl.so") + glob.glob("/usr/lib/rsyslog/lmnsd_ossl.so")
)
# rsyslog's parsed view of each message, then the raw message, one line each.
FIELDS = (
    "%inputname%|%protocol-version%|%syslogfacility%|%syslogseverity%|"
    "%timereported:::date-rfc3339%|%hostname%|%app-name%|%procid%|%msgid%|"
    "%structured-data%|%msg%"
)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int, proto: str) -> bool:
    """Whether something listens on this port, on any address (IPv4 or IPv6)."""
    suffix = f":{port:04X}"
    for table in (proto, f"{proto}6"):
        path = Path(f"/proc/net/{table}")
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            cols = line.split()
            local, state = cols[1], cols[3]
            if local.endswith(suffix) and (proto == "udp" or state == "0A"):  # 0A: LISTEN
                return True
    return False


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _certificate(d: Path, name: str, ca: str, subject: str, ext: str | None = None) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", subject)  # fmt: skip
    extra = []
    if ext:
        (d / f"{name}.ext").write_text(ext)
        extra = ["-extfile", str(d / f"{name}.ext")]
    _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.pem"),
             "-CAkey", str(d / f"{ca}.key"), "-CAcreateserial", "-days", "2",
             "-out", str(d / f"{name}.pem"), *extra)  # fmt: skip


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"),
             "-days", "2", "-subj", f"/CN=p4seg test {name}")  # fmt: skip


@dataclass(frozen=True)
class Collector:
    dir: Path
    udp: int
    tcp: int
    tls: int | None  # None: rsyslog has no OpenSSL driver here

    def lines(self, name: str) -> list[str]:
        """The file's lines, without the fixture's readiness probes."""
        path = self.dir / name
        text = path.read_text() if path.exists() else ""
        return [line for line in text.splitlines() if READY not in line]

    def url(self, transport: str, query: str = "") -> str:
        port = {"udp": self.udp, "tcp": self.tcp, "tls": self.tls}[transport]
        return f"{transport}://127.0.0.1:{port}{'?' + query if query else ''}"

    def tls_files(self) -> dict[str, str]:
        return {k: str(self.dir / f) for k, f in
                (("ca", "ca.pem"), ("cert", "client.pem"), ("key", "client.key"))}  # fmt: skip


def _certificates(d: Path) -> None:
    """A CA, the collector's certificate (for 127.0.0.1) and the controller's, all by openssl."""
    _ca(d, "ca")
    _certificate(d, "server", "ca", "/CN=collector", "subjectAltName=IP:127.0.0.1\n")
    _certificate(d, "client", "ca", "/CN=p4seg controller")


@contextlib.contextmanager
def _rsyslogd(conf: Path, ports: list[tuple[int, str]]) -> Iterator[None]:
    """rsyslogd -n on `conf`, until every (port, tcp|udp) listens; stopped on the way out."""
    assert RSYSLOGD is not None
    process = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(conf.with_suffix(".pid"))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        up = wait_for(
            lambda: process.poll() is not None or all(_listening(p, k) for p, k in ports), 20
        )
        if process.poll() is not None or not up:
            process.kill()
            pytest.fail(f"rsyslogd did not start: {process.communicate(timeout=10)[0].decode()}")
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def _need_rsyslogd() -> None:
    if RSYSLOGD is None:
        pytest.skip("rsyslogd is not installed (Debian package rsyslog)")


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    _need_rsyslogd()
    d = tmp_path / "rsyslog"
    d.mkdir()
    tls_port = None
    tls_input, tls_global = "", ""
    if OSSL and shutil.which("openssl"):
        _certificates(d)
        tls_port = _free_port(socket.SOCK_STREAM)
        tls_global = (
            f' defaultNetstreamDriverCAFile="{d}/ca.pem"'
            f' defaultNetstreamDriverCertFile="{d}/server.pem"'
            f' defaultNetstreamDriverKeyFile="{d}/server.key"'
        )
        # x509/certvalid: the client must present a certificate our CA signed (mutual TLS).
        tls_input = (
            f'input(type="imtcp" name="tls" address="127.0.0.1" port="{tls_port}" ruleset="in"'
            ' streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="x509/certvalid")'
        )
    udp, tcp = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
    (d / "rsyslog.conf").write_text(f"""\
global(workDirectory="{d}"{tls_global})
module(load="imudp")
module(load="imtcp")
template(name="raw" type="string" string="%inputname% %rawmsg%\\n")
template(name="fields" type="string" string="{FIELDS}\\n")
ruleset(name="in") {{
  action(type="omfile" file="{d}/raw.log" template="raw")
  action(type="omfile" file="{d}/fields.log" template="fields")
}}
input(type="imudp" name="udp" address="127.0.0.1" port="{udp}" ruleset="in")
input(type="imtcp" name="tcp" address="127.0.0.1" port="{tcp}" ruleset="in")
{tls_input}
""")
    ports = [(udp, "udp"), (tcp, "tcp")] + ([(tls_port, "tcp")] if tls_port else [])
    with _rsyslogd(d / "rsyslog.conf", ports):
        _until_received(d / "raw.log", udp, tcp)
        yield Collector(d, udp, tcp, tls_port)


READY = "p4seg-collector-ready"  # the fixture's probes (Collector.lines leaves them out)


def _until_received(log: Path, udp: int, tcp: int) -> None:
    """Until rsyslog writes what its UDP and TCP inputs receive: a port that listens is not
    yet an input that processes (a datagram before that is lost)."""
    probe = f"<14>1 - - {READY} - - - probe\n".encode()

    def arrived(transport: str) -> bool:
        if transport == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(probe, ("127.0.0.1", udp))
        text = log.read_text() if log.exists() else ""
        return any(line.startswith(f"{transport} ") and READY in line for line in text.splitlines())

    with socket.create_connection(("127.0.0.1", tcp), timeout=10) as s:
        s.sendall(probe)
    for transport in ("udp", "tcp"):
        if not wait_for(lambda t=transport: arrived(t), 20, every=0.1):  # type: ignore[misc]
            pytest.fail(f"rsyslogd wrote nothing it received over {transport}")


def _alert(src: str = "10.0.2.11", spoof: bool = False) -> Alert:
    frame = bytes(Ether() / IP(src=src, dst="10.0.5.10") / TCP(sport=40000, dport=22, flags="S"))
    meta = {"ingress_port": 1, "rule_id": 7, "reason": REASON_SPOOF if spoof else REASON_DENY_LOG}
    rules = {7: 'line 9: deny dev -> any log  # "quoted" [x] \\ back'}
    return alert_of("tor-alg", frame, meta, rules, 1_795_665_614.25)


_SD_ELEMENT = re.compile(r'\[([^ \]]+)((?: [^=\]]+="(?:[^"\\]|\\.)*")*)\]')
_SD_PARAM = re.compile(r' ([^=]+)="((?:[^"\\]|\\.)*)"')


def structured_data(sd: str) -> dict[str, dict[str, str]]:
    """RFC 5424 STRUCTURED-DATA, parsed and unescaped: SD-ID -> name -> value."""
    out: dict[str, dict[str, str]] = {}
    end = 0
    for element in _SD_ELEMENT.finditer(sd):
        assert element.start() == end, f"not structured data at {end}: {sd!r}"
        end = element.end()
        out[element[1]] = {
            p[1]: re.sub(r"\\(.)", r"\1", p[2]) for p in _SD_PARAM.finditer(element[2])
        }
    assert end == len(sd), f"trailing text after structured data: {sd[end:]!r}"
    return out


def _holds_lines(collector: Collector, count: int) -> bool:
    return len(collector.lines("fields.log")) == count


def _send(url: str, events: list[Event], **tls: str) -> SyslogSink:
    sink = SyslogSink(parse_sink(url, **tls)).start()
    try:
        for event in events:
            assert sink.emit(event)
        assert sink.flush(20)
    finally:
        sink.close()
    return sink


def test_rfc5424_with_structured_data_over_udp_tcp_and_mutual_tls(
    collector: Collector, tmp_path: Path
) -> None:
    record = audit.append(tmp_path / "audit.jsonl", "quarantine", host="algo1", result="ok",
                          switches={"tor-alg": {"ok": True, "written": 4}})  # fmt: skip
    events = [event_of_alert(_alert()), event_of_audit(record)]
    transports = ["udp", "tcp"] + (["tls"] if collector.tls else [])
    for n, transport in enumerate(transports, 1):
        sink = _send(collector.url(transport), events, **(
            collector.tls_files() if transport == "tls" else {}))  # fmt: skip
        assert (sink.stats().sent, sink.stats().failed, sink.stats().dropped) == (2, 0, 0)
        # rsyslog runs each input in its own thread: a transport's lines are
        # awaited before the next one sends, so the file's order is the sending order
        assert wait_for(partial(_holds_lines, collector, 2 * n), 20), transport
    rows = [line.split("|", 10) for line in collector.lines("fields.log")]
    assert [r[0] for r in rows] == [t for t in transports for _ in events]
    pid = str(os.getpid())
    for n, (
        inputname,
        version,
        facility,
        severity,
        stamp,
        host,
        app,
        procid,
        msgid,
        sd,
        msg,
    ) in enumerate(rows):
        assert (version, host, app, procid) == ("1", socket.gethostname(), "p4seg", pid), inputname
        parsed = structured_data(sd)
        assert parsed["meta"] == {"sequenceId": str(n % 2 + 1)}  # per sink, from 1
        assert parsed["origin"]["software"] == "p4seg"
        ours = parsed[DEFAULT_SD_ID]
        if n % 2 == 0:  # the alert: facility log alert (14), warning
            assert (facility, severity, msgid) == ("14", "4", "deny")
            assert stamp == "2026-11-26T04:00:14.250Z"
            assert ours["category"] == "alert" and ours["kind"] == "deny"
            assert (ours["src"], ours["dst"], ours["dport"], ours["switch"]) == (
                "10.0.2.11", "10.0.5.10", "22", "tor-alg")  # fmt: skip
            assert ours["rule"] == 'line 9: deny dev -> any log  # "quoted" [x] \\ back'
            assert msg.startswith("deny tcp 10.0.2.11:40000 -> 10.0.5.10:22 on tor-alg port 1")
        else:  # the audit record: facility log audit (13), a quarantine is a warning
            assert (facility, severity, msgid) == ("13", "4", "quarantine")
            assert ours["category"] == "audit" and ours["host"] == "algo1"
            assert ours["hash"] == record["hash"] and ours["seq"] == "0"
            assert ours["switches"] == '{"tor-alg":{"ok":true,"written":4}}'
            assert msg == f"quarantine algo1 by {record['actor']}: ok"
    # The raw message is exactly what we framed (TCP: the octet count is not part of it).
    raw = collector.lines("raw.log")
    config = parse_sink(collector.url("tcp"))
    expected = format_rfc5424(events[0], config, 1, os.getpid()).decode()
    assert f"tcp {expected}" in raw


@pytest.mark.skipif(not OSSL, reason="rsyslog has no OpenSSL stream driver (rsyslog-openssl)")
def test_tls_with_a_collector_we_do_not_trust_sends_nothing(collector: Collector) -> None:
    other = collector.dir / "other"
    other.mkdir()
    _ca(other, "ca")  # a CA that did not sign the collector's certificate
    files = collector.tls_files() | {"ca": str(other / "ca.pem")}
    sink = SyslogSink(parse_sink(collector.url("tls"), **files)).start()
    assert sink.emit(event_of_alert(_alert("10.0.2.66")))
    assert not sink.flush(0.5)  # retrying: the handshake fails every time
    sink.close(0.1)
    assert (sink.stats().sent, sink.stats().failed) == (0, 1)
    # A client certificate from a CA the collector does not trust: refused by rsyslog.
    _certificate(other, "client", "ca", "/CN=intruder")
    files = collector.tls_files() | {
        "cert": str(other / "client.pem"),
        "key": str(other / "client.key"),
    }
    stranger = SyslogSink(parse_sink(collector.url("tls"), **files)).start()
    stranger.emit(event_of_alert(_alert("10.0.2.67")))
    stranger.flush(0.5)
    stranger.close(0.1)
    # Then a trusted one, as a barrier: once it is written, the others would have been.
    _send(collector.url("tls"), [event_of_alert(_alert("10.0.2.68"))], **collector.tls_files())
    assert wait_for(lambda: any("10.0.2.68" in line for line in collector.lines("raw.log")), 20)
    raw = "\n".join(collector.lines("raw.log"))
    assert "10.0.2.66" not in raw and "10.0.2.67" not in raw


def test_cef_over_tcp(collector: Collector, tmp_path: Path) -> None:
    record = audit.append(tmp_path / "audit.jsonl", "apply", result="failed")
    spoof = _alert("10.0.9.9", spoof=True)
    sink = _send(collector.url("tcp", "format=cef&facility=local4"),
                 [event_of_alert(spoof), event_of_audit(record)])  # fmt: skip
    assert sink.stats().sent == 2
    assert wait_for(lambda: len(collector.lines("fields.log")) == 2, 20)
    rows = [line.split("|", 10) for line in collector.lines("fields.log")]
    assert [(r[2], r[3], r[8], r[9]) for r in rows] == [
        ("20", "3", "spoof", "-"),  # local4; a spoofed source is an error
        ("20", "3", "apply", "-"),  # a failed change too
    ]
    cef = rows[0][10]
    header = cef.split("|", 7)
    assert header[:7] == ["CEF:0", "p4seg", "p4seg", "0.1.0", "alert:spoof", header[5], "7"]
    extension = dict(re.findall(r"(\w+)=((?:[^=\\]|\\.)*?)(?= \w+=|$)", header[7]))
    assert (extension["src"], extension["dst"], extension["dpt"], extension["act"]) == (
        "10.0.9.9", "10.0.5.10", "22", "spoof")  # fmt: skip
    assert extension["dvchost"] == "tor-alg" and extension["rt"] == "1795665614250"
    assert "spoofed source" in extension["cs1"] and extension["cs1Label"] == "rule"
    audit_cef = rows[1][10].split("|", 7)
    assert audit_cef[4] == "audit:apply" and audit_cef[6] == "7"
    assert f"suser={record['actor']}" in audit_cef[7] and "outcome=failed" in audit_cef[7]


def test_a_full_queue_drops_and_counts_without_blocking() -> None:
    config = dataclasses.replace(parse_sink("udp://127.0.0.1:9"), queue_size=2)
    sink = SyslogSink(config)  # not started: nothing drains the queue
    event = event_of_alert(_alert())
    assert [sink.emit(event) for _ in range(5)] == [True, True, False, False, False]
    m = Metrics()
    m.siem_sink("soc", sink.stats)
    body = m.render()[0].decode()
    assert 'p4seg_siem_events_total{outcome="dropped",sink="soc"} 3.0' in body
    assert 'p4seg_siem_queue_events{sink="soc"} 2.0' in body


def test_severities() -> None:
    assert event_of_alert(_alert()).severity == Severity.WARNING
    assert event_of_alert(_alert(spoof=True)).severity == Severity.ERROR
    record = {
        "event": "apply",
        "result": "refused: not proven",
        "time": "2026-01-01T00:00:00+00:00",
    }
    assert event_of_audit(record).severity == Severity.ERROR
    assert event_of_audit({**record, "result": "ok"}).severity == Severity.NOTICE
    assert (
        event_of_audit({**record, "event": "quarantine", "result": "ok"}).severity
        == Severity.WARNING
    )


def test_long_and_odd_fields_are_bounded_and_escaped() -> None:
    record = {"event": "grant", "result": "ok", "time": "bad time", "a key=with space": "v",
              "switches": {f"tor{n}": {"written": n} for n in range(200)}}  # fmt: skip
    event = event_of_audit(record)
    message = format_rfc5424(event, SinkConfig("udp", "h", 514, hostname="ctl 1"), 5).decode()
    assert message.startswith("<109>1 - ctl_1 p4seg 0 grant [")  # an unparsable time: "-"
    ours = structured_data(message.split(" ", 6)[6].rsplit("] ", 1)[0] + "]")[DEFAULT_SD_ID]
    assert ours["a_key_with_space"] == "v"
    assert ours["switches"].endswith("chars)") and len(ours["switches"]) < 1100


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://siem:514", "scheme must be udp, tcp or tls"),
        ("tcp://:514", "no host"),
        ("tcp://siem:99999", "out of range"),
        ("tcp://siem:514/x", "no path"),
        ("tcp://siem?format=leef", "format must be rfc5424 or cef"),
        ("tcp://siem?facility=mail2", "unknown facility"),
        ("tcp://siem?facility=24", "unknown facility"),
        ("tcp://siem?colour=red", "unknown option colour"),
        ("tcp://siem?ca=/etc/hostname", "for tls:// sinks only"),
        ("tls://siem?cert=/etc/hostname", "needs its key"),
        ("tls://siem?ca=/nonexistent/ca.pem", "ca file /nonexistent/ca.pem does not exist"),
        ("tcp://siem?sd_id=p4seg", "sd_id must be NAME@ENTERPRISE-NUMBER"),
        ("tcp://siem?app=", "app must be"),
        ("tcp://siem?queue=0", "queue must be a number >= 1"),
        ("tcp://siem?timeout=soon", "timeout must be a number"),
        ("tcp://siem?timeout=inf", "timeout must be a number"),
    ],
)
def test_bad_sink_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(SiemConfigError, match=re.escape(message)):
        parse_sink(url)


def test_tls_files_that_are_not_certificates_are_refused(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    config = parse_sink("tls://127.0.0.1:6514", ca=str(tmp_path / "ca.pem"))
    with pytest.raises(SiemConfigError, match="TLS files not usable"):
        SyslogSink(config)


def test_sink_defaults() -> None:
    assert parse_sink("tls://siem.example").port == 6514  # RFC 5425
    assert parse_sink("udp://siem.example").port == 514
    config = parse_sink("tcp://siem:1514?facility=local0&sd_id=acme@12345&queue=50")
    assert (config.facility, config.sd_id, config.queue_size) == (16, "acme@12345", 50)


def test_tcp_events_wait_for_a_collector_that_comes_up_later() -> None:
    """Events queued while nothing listens are sent, octet-counted, once a collector does."""
    port = _free_port(socket.SOCK_STREAM)
    sink = SyslogSink(parse_sink(f"tcp://127.0.0.1:{port}")).start()
    events = [event_of_alert(_alert(f"10.0.2.{n}")) for n in (31, 32, 33)]
    try:
        assert all(sink.emit(e) for e in events)
        assert not sink.flush(0.3)  # refused: the sender backs off and retries
        with socket.create_server(("127.0.0.1", port)) as server:
            server.settimeout(20)
            conn, _ = server.accept()
            with conn:
                assert sink.flush(20)
                received = b""
                conn.settimeout(5)
                while received.count(b"<116>1 ") < 3:
                    received += conn.recv(65536)
    finally:
        sink.close()
    frames = []
    while received:  # RFC 6587 octet counting: LENGTH SP MESSAGE
        length, rest = received.split(b" ", 1)
        frames.append(rest[: int(length)].decode())
        received = rest[int(length) :]
    assert [re.findall(r'src="([^"]+)"', f)[0] for f in frames] == [
        "10.0.2.31", "10.0.2.32", "10.0.2.33",
    ]  # fmt: skip
    assert sink.stats() == SinkStats(sent=3, dropped=0, failed=0, queued=0)


@pytest.mark.skipif(not OSSL, reason="rsyslog has no OpenSSL stream driver (rsyslog-openssl)")
def test_the_rsyslog_configuration_of_the_docs_receives_and_parses_events(tmp_path: Path) -> None:
    """docs/observability.md's collector configuration, run as written (paths and ports
    moved into the test's directory): events over TCP and mutual TLS land in the per-host
    file raw and in the JSON file with their structured data parsed."""
    _need_rsyslogd()
    doc = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
    conf = doc.split("# /etc/rsyslog.d/p4seg.conf\n", 1)[1].split("```", 1)[0]
    d = tmp_path / "collector"
    d.mkdir()
    _certificates(d)
    tcp, tls = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_STREAM)
    for old, new in (("/etc/rsyslog/p4seg-ca.pem", f"{d}/ca.pem"),
                     ("/etc/rsyslog/collector.pem", f"{d}/server.pem"),
                     ("/etc/rsyslog/collector.key", f"{d}/server.key"),
                     ("/var/log/p4seg", f"{d}/log"),
                     ('port="514"', f'port="{tcp}"'), ('port="6514"', f'port="{tls}"')):  # fmt: skip
        assert old in conf, old
        conf = conf.replace(old, new)
    (d / "p4seg.conf").write_text(f'global(workDirectory="{d}")\n{conf}')
    record = audit.append(tmp_path / "audit.jsonl", "grant", grant="g1", result="ok")
    with _rsyslogd(d / "p4seg.conf", [(tcp, "tcp"), (tls, "tcp")]):
        _send(f"tcp://127.0.0.1:{tcp}", [event_of_alert(_alert())])
        files = {k: str(d / f) for k, f in (("ca", "ca.pem"), ("cert", "client.pem"),
                                            ("key", "client.key"))}  # fmt: skip
        _send(f"tls://127.0.0.1:{tls}", [event_of_audit(record)], **files)
        events = d / "log" / "events.json"
        assert wait_for(lambda: events.exists() and len(events.read_text().splitlines()) == 2, 20)
    alert, grant = (json.loads(line) for line in events.read_text().splitlines())
    assert (alert["event"], alert["severity"], alert["controller"]) == (
        "deny",
        "4",
        socket.gethostname(),
    )
    assert alert["sd"][DEFAULT_SD_ID]["src"] == "10.0.2.11"
    assert (
        alert["sd"][DEFAULT_SD_ID]["rule"] == 'line 9: deny dev -> any log  # "quoted" [x] \\ back'
    )
    assert alert["sd"]["meta"] == {"sequenceId": "1"}
    assert (grant["event"], grant["severity"]) == ("grant", "5")
    assert grant["sd"][DEFAULT_SD_ID]["hash"] == record["hash"]
    raw = (d / "log" / f"{socket.gethostname()}.log").read_text().splitlines()
    assert len(raw) == 2 and raw[1].startswith("<109>1 ") and 'grant="g1"' in raw[1]
