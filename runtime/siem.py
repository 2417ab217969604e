"""Alerts and audit records to a SIEM: syslog (RFC 5424 with structured data) or CEF, over
UDP (RFC 5426), TCP (octet counting, RFC 6587) or TLS (RFC 5425).

A sink is configured by URL — `udp://host:514`, `tcp://host:514`, `tls://host:6514` — with
options in the query (`?format=cef&facility=local0`) or as keywords (the TLS CA, client
certificate and key). `SyslogSink.emit` never blocks: events go to a bounded queue that one
sender thread drains; an event that finds the queue full is dropped and counted, so a slow or
unreachable collector costs the controller nothing but the events themselves (its counts are
`stats()`, exposed as metrics by runtime/metrics.py).

Structured data goes under the SD-ID `p4seg@32473`: 32473 is the private enterprise number
RFC 5612 reserves for documentation. An organisation with its own number sets `sd_id`.
docs/observability.md shows both formats and an rsyslog configuration that receives them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import queue
import re
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from runtime.alerts import Alert

VERSION = "0.1.0"
DEFAULT_SD_ID = "p4seg@32473"  # RFC 5612's documentation enterprise number: a placeholder
DEFAULT_PORTS = {"udp": 514, "tcp": 514, "tls": 6514}
MAX_PARAM = 1024  # characters of one SD-PARAM value; longer ones are cut and say so
MAX_BACKOFF = 30.0
CLOSE_WAIT = 2.0  # seconds a closing sink waits for the collector to close its side


class SiemConfigError(ValueError):
    """A sink URL or option that cannot work; the message says which and why."""


class Severity(IntEnum):
    """Syslog severities (RFC 5424, 6.2.1)."""

    EMERGENCY = 0
    ALERT = 1
    CRITICAL = 2
    ERROR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6
    DEBUG = 7


FACILITIES = {
    "kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10,
    "audit": 13, "alert": 14,
    **{f"local{n}": 16 + n for n in range(8)},
}  # fmt: skip
# Without a configured facility: audit records as "log audit", alerts as "log alert".
KIND_FACILITY = {"audit": FACILITIES["audit"], "alert": FACILITIES["alert"]}
# CEF severity (0-10) of each syslog severity.
CEF_SEVERITY = {0: 10, 1: 10, 2: 9, 3: 7, 4: 5, 5: 3, 6: 1, 7: 0}


@dataclass(frozen=True, slots=True)
class Event:
    """One event for a SIEM: what happened, how bad, and its fields."""

    time: str  # RFC 3339, as the alert or record has it
    kind: str  # alert | audit
    name: str  # deny | spoof | apply | quarantine | ... (the syslog MSGID)
    severity: Severity
    message: str
    params: tuple[tuple[str, str], ...]  # structured data, in order


def _value(value: object) -> str:
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, sort_keys=True, separators=(",", ":"))
    )
    if len(text) > MAX_PARAM:
        text = f"{text[:MAX_PARAM]}...(+{len(text) - MAX_PARAM} chars)"
    return text


def event_of_alert(alert: Alert) -> Event:
    """An alert as an event: a logged deny is a warning, a spoofed source an error."""
    severity = Severity.ERROR if alert.kind == "spoof" else Severity.WARNING
    message = (
        f"{alert.kind} {alert.proto} {alert.src}:{alert.sport} -> {alert.dst}:{alert.dport}"
        f" on {alert.switch} port {alert.ingress_port}: {alert.rule}"
    )
    if alert.suppressed:
        message += f" ({alert.suppressed} more from {alert.src} suppressed)"
    return Event(
        alert.time, "alert", alert.kind, severity, message,
        tuple((name, _value(getattr(alert, name))) for name in alert.__slots__ if name != "time"),
    )  # fmt: skip


def event_of_audit(record: Mapping[str, object]) -> Event:
    """An audit record as an event: a failed or refused change is an error, a quarantine or
    containment a warning, any other change a notice."""
    name = str(record.get("event", "audit"))
    result = str(record.get("result", "ok"))
    if not result.startswith("ok"):
        severity = Severity.ERROR
    elif name in ("quarantine", "contain"):
        severity = Severity.WARNING
    else:
        severity = Severity.NOTICE
    subject = next((str(record[k]) for k in ("host", "grant") if k in record), "")
    message = f"{name}{' ' + subject if subject else ''} by {record.get('actor', '?')}: {result}"
    params = tuple(
        (_param_name(key), _value(value))
        for key, value in record.items()
        if key != "time" and value is not None
    )
    time = str(record.get("time") or dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"))
    return Event(time, "audit", name, severity, message, params)


_NAME_BAD = re.compile(r'[^\x21-\x7e]|[= \]"]')


def _param_name(key: str) -> str:
    """An SD-PARAM name (RFC 5424: 1-32 printable characters, no `=`, space, `]` or `"`)."""
    return _NAME_BAD.sub("_", key)[:32] or "_"


# -- configuration ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """Where and how a sink sends: parse_sink builds it from a URL."""

    transport: str  # udp | tcp | tls
    host: str
    port: int
    format: str = "rfc5424"  # rfc5424 | cef
    facility: int | None = None  # None: KIND_FACILITY
    app_name: str = "p4seg"
    hostname: str = field(default_factory=socket.gethostname)
    sd_id: str = DEFAULT_SD_ID
    ca: Path | None = None  # tls: the CA that signed the collector's certificate
    cert: Path | None = None  # tls: our client certificate (mutual TLS) ...
    key: Path | None = None  # ... and its key
    queue_size: int = 10_000
    timeout: float = 5.0  # seconds to connect or send before the attempt counts as failed

    @property
    def url(self) -> str:
        return f"{self.transport}://{self.host}:{self.port}"


_OPTIONS = ("format", "facility", "app", "sd_id", "ca", "cert", "key", "queue", "timeout")
_SD_ID = re.compile(r"[\x21-\x7e]+@[0-9]+(\.[0-9]+)*")


def parse_sink(
    url: str, *, ca: str | None = None, cert: str | None = None, key: str | None = None
) -> SinkConfig:
    """A sink from its URL (`udp|tcp|tls://host[:port][?option=value&...]`); the TLS files
    may come as keywords instead of options. Raises SiemConfigError.

    >>> sink = parse_sink("tls://siem.example?format=cef&facility=local0")
    >>> sink.port, sink.format, sink.facility
    (6514, 'cef', 16)
    >>> parse_sink("tcp://siem.example?colour=red")
    Traceback (most recent call last):
    ...
    runtime.siem.SiemConfigError: tcp://siem.example?colour=red: unknown option colour (known: format, facility, app, sd_id, ca, cert, key, queue, timeout)
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise SiemConfigError(f"{url}: {err}") from None
    transport = parts.scheme.lower()
    if transport not in DEFAULT_PORTS:
        raise SiemConfigError(f"{url}: the scheme must be udp, tcp or tls, not {transport!r}")
    if not parts.hostname:
        raise SiemConfigError(f"{url}: no host")
    if parts.path not in ("", "/"):
        raise SiemConfigError(f"{url}: a sink has no path ({parts.path!r})")
    options = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise SiemConfigError(
            f"{url}: unknown option {', '.join(unknown)} (known: {', '.join(_OPTIONS)})"
        )
    files = {"ca": ca or options.get("ca"), "cert": cert or options.get("cert"),
             "key": key or options.get("key")}  # fmt: skip
    if transport != "tls" and any(files.values()):
        raise SiemConfigError(f"{url}: CA, certificate and key are for tls:// sinks only")
    if bool(files["cert"]) != bool(files["key"]):
        raise SiemConfigError(
            f"{url}: a client certificate needs its key, and a key its certificate"
        )
    for name, path in files.items():
        if path and not Path(path).is_file():
            raise SiemConfigError(f"{url}: {name} file {path} does not exist")
    fmt = options.get("format", "rfc5424").lower()
    if fmt not in ("rfc5424", "cef"):
        raise SiemConfigError(f"{url}: format must be rfc5424 or cef, not {fmt!r}")
    facility = None
    if "facility" in options:
        spelled = options["facility"].lower()
        facility = FACILITIES.get(spelled, int(spelled) if spelled.isdigit() else -1)
        if not 0 <= facility <= 23:
            raise SiemConfigError(
                f"{url}: unknown facility {options['facility']!r} (0-23 or {', '.join(FACILITIES)})"
            )
    app = options.get("app", "p4seg")
    if not re.fullmatch(r"[\x21-\x7e]{1,48}", app):
        raise SiemConfigError(f"{url}: app must be 1-48 printable ASCII characters")
    sd_id = options.get("sd_id", DEFAULT_SD_ID)
    if len(sd_id) > 32 or not _SD_ID.fullmatch(sd_id) or _NAME_BAD.search(sd_id.split("@")[0]):
        raise SiemConfigError(f"{url}: sd_id must be NAME@ENTERPRISE-NUMBER, at most 32 characters")
    numbers: dict[str, float] = {}
    for name, low in (("queue", 1.0), ("timeout", 0.001)):
        if name in options:
            try:
                numbers[name] = float(options[name]) if name == "timeout" else int(options[name])
            except ValueError:
                numbers[name] = math.nan
            if not (math.isfinite(numbers[name]) and numbers[name] >= low):
                raise SiemConfigError(f"{url}: {name} must be a number >= {low:g}")
    return SinkConfig(
        transport, parts.hostname, port or DEFAULT_PORTS[transport], fmt, facility, app,
        sd_id=sd_id,
        ca=Path(files["ca"]) if files["ca"] else None,
        cert=Path(files["cert"]) if files["cert"] else None,
        key=Path(files["key"]) if files["key"] else None,
        queue_size=int(numbers.get("queue", 10_000)),
        timeout=numbers.get("timeout", 5.0),
    )  # fmt: skip


# -- formats ------------------------------------------------------------------------------


def _timestamp(time: str) -> str:
    """RFC 3339 in UTC with milliseconds, as RFC 5424's TIMESTAMP wants ("-": unknown)."""
    try:
        moment = dt.datetime.fromisoformat(time)
    except ValueError:
        return "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _header_field(text: str, limit: int) -> str:
    cleaned = re.sub(r"[^\x21-\x7e]", "_", text)[:limit]
    return cleaned or "-"


def _header(event: Event, config: SinkConfig, procid: int) -> str:
    facility = config.facility if config.facility is not None else KIND_FACILITY[event.kind]
    return (
        f"<{facility * 8 + event.severity}>1 {_timestamp(event.time)} "
        f"{_header_field(config.hostname, 255)} {config.app_name} {procid} "
        f"{_header_field(event.name, 32)}"
    )


def _sd_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _one_line(text: str) -> str:
    return re.sub(r"[\r\n\t]+", " ", text)


def format_rfc5424(event: Event, config: SinkConfig, sequence: int, procid: int = 0) -> bytes:
    """One RFC 5424 message: header, structured data (our SD-ID with the event's fields,
    `origin` with the software, `meta` with a sequence number a collector can check for
    gaps), and the human message.

    >>> config = SinkConfig("udp", "siem", 514, hostname="ctl1")
    >>> event = Event("2026-03-02T08:00:00+00:00", "audit", "grant", Severity.NOTICE,
    ...               "grant g1 by ops@ctl1: ok", (("grant", "g1"), ("rule", 'a "b" [c]')))
    >>> print(format_rfc5424(event, config, sequence=1, procid=7).decode())
    <109>1 2026-03-02T08:00:00.000Z ctl1 p4seg 7 grant [p4seg@32473 category="audit" grant="g1" rule="a \\"b\\" [c\\]"][origin software="p4seg" swVersion="0.1.0"][meta sequenceId="1"] grant g1 by ops@ctl1: ok
    """
    ours = "".join(f' {name}="{_sd_escape(value)}"' for name, value in event.params)
    sd = (
        f'[{config.sd_id} category="{event.kind}"{ours}]'
        f'[origin software="p4seg" swVersion="{VERSION}"]'
        f'[meta sequenceId="{sequence}"]'
    )
    return f"{_header(event, config, procid)} {sd} {_one_line(event.message)}".encode()


def _cef_header(text: str) -> str:
    return _one_line(text).replace("\\", "\\\\").replace("|", "\\|")


def _cef_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("=", "\\=").replace("\r", "\\r").replace("\n", "\\n")


# CEF extension keys for the fields that have one (ArcSight's dictionary); then, as custom
# strings cs1..cs6 under their own label, the first six of _CEF_CUSTOM an event has. The
# RFC 5424 format carries every field; CEF this subset.
_CEF_KEYS = {
    "src": "src", "dst": "dst", "sport": "spt", "dport": "dpt", "proto": "proto",
    "switch": "dvchost", "ingress_port": "deviceInboundInterface", "actor": "suser",
    "result": "outcome", "policy": "filePath",
}  # fmt: skip
_CEF_CUSTOM = ("rule", "rule_id", "host", "grant", "suppressed", "seq", "hash", "proof",
               "policy_sha256")  # fmt: skip


def format_cef(event: Event, config: SinkConfig, sequence: int, procid: int = 0) -> bytes:
    """One CEF:0 event in an RFC 5424 syslog header (no structured data): the signature
    is the kind and name (`alert:deny`, `audit:quarantine`), severity 0-10."""
    params = dict(event.params)
    extension: list[tuple[str, str]] = []
    try:
        stamp = dt.datetime.fromisoformat(event.time).timestamp()
        extension.append(("rt", str(int(stamp * 1000))))
    except ValueError:
        pass
    extension += [("act", event.name), ("msg", event.message)]
    extension += [(_CEF_KEYS[name], value) for name, value in params.items() if name in _CEF_KEYS]
    custom = [name for name in _CEF_CUSTOM if name in params][:6]  # CEF has cs1..cs6
    for n, name in enumerate(custom, start=1):
        extension += [(f"cs{n}Label", name), (f"cs{n}", params[name])]
    extension.append(("cn1Label", "sequenceId"))
    extension.append(("cn1", str(sequence)))
    cef = "|".join(
        [
            "CEF:0", "p4seg", "p4seg", VERSION,
            _cef_header(f"{event.kind}:{event.name}"), _cef_header(event.message),
            str(CEF_SEVERITY[event.severity]),
        ]
    ) + "|" + " ".join(f"{k}={_cef_value(v)}" for k, v in extension)  # fmt: skip
    return f"{_header(event, config, procid)} - {cef}".encode()


# -- the sink -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SinkStats:
    sent: int
    dropped: int  # the queue was full
    failed: int  # sending failed for good (UDP error, or the sink closed while retrying)
    queued: int


_STOP = object()


class SyslogSink:
    """Events to one collector: `emit` queues, a thread sends. `start` before, `close` after."""

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self._queue: queue.Queue[object] = queue.Queue(config.queue_size)
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._sent = self._dropped = self._failed = 0
        self._sequence = 0
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=f"siem {config.url}", daemon=True)
        self._context: ssl.SSLContext | None = None
        if config.transport == "tls":
            try:
                self._context = ssl.create_default_context(
                    cafile=str(config.ca) if config.ca else None
                )
                if config.cert and config.key:
                    self._context.load_cert_chain(str(config.cert), str(config.key))
            except (ssl.SSLError, OSError) as err:
                raise SiemConfigError(f"{config.url}: TLS files not usable: {err}") from None
        self._procid = os.getpid()

    def start(self) -> SyslogSink:
        self._thread.start()
        return self

    def emit(self, event: Event) -> bool:
        """Queue an event; False when the queue is full (the event is dropped and counted)."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self._dropped += 1
            return False
        return True

    def stats(self) -> SinkStats:
        with self._lock:
            return SinkStats(self._sent, self._dropped, self._failed, self._queue.qsize())

    def flush(self, timeout: float) -> bool:
        """Wait until every queued event is sent or failed; whether that happened in time."""
        with self._queue.all_tasks_done:
            return self._queue.all_tasks_done.wait_for(
                lambda: self._queue.unfinished_tasks == 0, timeout
            )

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued for up to `timeout` seconds, then stop: what is still queued
        counts as failed, and the thread ends once its attempt in flight (at most the
        config's timeout) does."""
        if self._thread.is_alive():
            self.flush(timeout)
            self._closing.set()
            self._queue.put(_STOP)
            self._thread.join(self.config.timeout + 1.0)  # the thread closes its socket

    # -- the sender thread -----------------------------------------------------------------

    def _message(self, event: Event) -> bytes:
        self._sequence = self._sequence % 2_147_483_647 + 1  # meta sequenceId: 1..2^31-1
        render = format_cef if self.config.format == "cef" else format_rfc5424
        message = render(event, self.config, self._sequence, self._procid)
        if self.config.transport == "udp":
            return message
        return f"{len(message)} ".encode() + message  # octet counting (RFC 6587 3.4.1)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    self._disconnect(graceful=True)
                    return
                assert isinstance(item, Event)
                sent = not self._closing.is_set() and self._deliver(self._message(item))
                with self._lock:
                    if sent:
                        self._sent += 1
                    else:
                        self._failed += 1
            finally:
                self._queue.task_done()

    def _deliver(self, data: bytes) -> bool:
        """Send one framed message; over TCP and TLS retry with backoff until it goes or the
        sink closes (UDP: one attempt, as the transport itself promises no more)."""
        backoff = 0.1
        while True:
            try:
                self._connected().sendall(data)
                return True
            except OSError:
                self._disconnect()
                if self.config.transport == "udp":
                    return False
            if self._closing.wait(backoff):
                return False
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _connected(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        c = self.config
        if c.transport == "udp":
            info = socket.getaddrinfo(c.host, c.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(info[0], socket.SOCK_DGRAM)
            sock.connect(info[4])
        else:
            sock = socket.create_connection((c.host, c.port), timeout=c.timeout)
            if self._context is not None:
                try:
                    sock = self._context.wrap_socket(sock, server_hostname=c.host)
                except OSError:
                    sock.close()
                    raise
        sock.settimeout(c.timeout)
        self._sock = sock
        return sock

    def _disconnect(self, graceful: bool = False) -> None:
        """Close the connection. `graceful` (the sink closing, TCP and TLS): end our side
        first and read what the collector sent until it closes its own. Closing a socket
        with unread data in it (a TLS collector's session tickets) resets the connection,
        and a reset makes the collector's kernel drop what it had not read yet: the last
        messages sent."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if graceful and self.config.transport != "udp":
            try:
                sock.settimeout(min(self.config.timeout, CLOSE_WAIT))
                sock.shutdown(socket.SHUT_WR)  # TLS: the raw socket's, after its records
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # the collector went away, or took too long: closed anyway
        sock.close()
