"""`p4seg serve`: the controller as a service — `watch` plus an authenticated HTTPS API.

The engine (`Engine`) runs the same verbs an operator runs (p4seg/verbs.py), in a worker
thread, one at a time: the watch loop and every API operation share one lock, so an API
call never races an apply. The HTTP side is aiohttp (asyncio like finsy; its transport
gives the TLS peer certificate, the mTLS principal); every route is one row of `ROUTES`,
from which the router and the OpenAPI document are both made, so they cannot drift.

Every operation is validated before anything runs (bad input changes nothing), runs on
behalf of its caller (runtime/audit.py `on_behalf_of`: the audit records name the
principal), and answers JSON; errors are `{"error": {"code": ..., "message": ...}}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import difflib
import io
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web

from compiler.diagnostics import InventoryError
from compiler.inventory import Inventory, load_inventory
from compiler.resolve import MAX_DURATION_S, parse_duration
from p4seg.api_auth import (
    SCOPES,
    Access,
    AccessError,
    Principal,
    common_name,
    is_loopback,
    load_access,
    server_context,
)
from p4seg.control import EXIT_CHANGES, EXIT_ERROR, EXIT_OK, Compiled, options_of, session_of
from p4seg.remote import hold, serving
from p4seg.verbs import (
    HANDLERS,
    Front,
    PolicyTransform,
    TextTransform,
    WatchHooks,
    clock,
    watch_loop,
)
from runtime import audit
from runtime.live import STATE_FILE, LiveState

DEFAULT_MAX_BODY = 64 * 1024  # bytes: the largest request body (a grant is ~200)
NOTES_FILE = "quarantines.json"  # in the state directory: reason, caller, expiry per host
PROTOCOLS = ("tcp", "udp", "icmp", "ip")
_PORTS = re.compile(r"^[0-9]{1,5}(-[0-9]{1,5})?$")
# One endpoint of a grant: a name or an address/prefix, as compiler/grammar.lark spells them
# (a grant's sides become policy text: nothing else may reach it).
_ENDPOINT = re.compile(
    r"^(?:[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*|[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?:/[0-9]{1,2})?)$"
)
SERVICE_PRINCIPAL = "p4seg-serve"  # the audit actor of what serve does by itself (expiries)


# -- options ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiOptions:
    """The API's listeners and credentials, checked (`api_options`)."""

    host: str
    port: int
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    tokens: Path | None = None
    plain: bool = False
    metrics: tuple[str, int] | None = None  # a separate Prometheus listener
    max_body: int = DEFAULT_MAX_BODY

    @property
    def scheme(self) -> str:
        return "http" if self.plain else "https"


def parse_address(text: str, flag: str) -> tuple[str, int] | str:
    """HOST:PORT (IPv6 as [ADDR]:PORT), or what is wrong with it."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f"{flag} {text!r}: expected HOST:PORT (e.g. 127.0.0.1:8443)"
    return host, int(port)


def api_options(args: argparse.Namespace) -> ApiOptions | str:
    """The API options of a command line, or what is wrong with them (nothing started)."""
    address = parse_address(args.api, "--api")
    if isinstance(address, str):
        return address
    metrics = parse_address(args.metrics, "--metrics") if args.metrics else None
    if isinstance(metrics, str):
        return metrics
    host, port = address
    paths = {
        flag: Path(value) if value else None
        for flag, value in (
            ("--api-cert", args.api_cert),
            ("--api-key", args.api_key),
            ("--api-client-ca", args.api_client_ca),
            ("--api-tokens", args.api_tokens),
        )
    }
    for flag, path in paths.items():
        if path is not None and not path.is_file():
            return f"{flag} {path}: no such file"
    cert, key, client_ca = paths["--api-cert"], paths["--api-key"], paths["--api-client-ca"]
    if args.api_plain:
        if not is_loopback(host):
            return (
                f"--api-plain serves the API without TLS: only on a loopback address "
                f"(127.0.0.1, ::1), not {host}"
            )
        if cert or key or client_ca:
            return "--api-plain is without TLS: drop --api-cert, --api-key and --api-client-ca"
    elif not (cert and key):
        return "the API needs --api-cert and --api-key (or --api-plain on a loopback address)"
    if client_ca is None and paths["--api-tokens"] is None:
        return "no way to authenticate callers: give --api-client-ca and/or --api-tokens"
    if args.api_max_body <= 0:
        return "--api-max-body must be > 0"
    return ApiOptions(
        host, port, cert, key, client_ca, paths["--api-tokens"], args.api_plain, metrics,
        args.api_max_body,
    )  # fmt: skip


# -- the engine ---------------------------------------------------------------------------


class _ThreadStream(io.TextIOBase):
    """A stand-in for sys.stdout or sys.stderr: the thread that installed it writes into a
    buffer (the verbs report by printing), every other thread to the real stream."""

    def __init__(self, real: TextIO) -> None:
        super().__init__()
        self.real = real
        self.buffer_ = io.StringIO()
        self._owner = threading.get_ident()

    def write(self, text: str) -> int:
        if threading.get_ident() == self._owner:
            return self.buffer_.write(text)
        return self.real.write(text)

    def flush(self) -> None:
        if threading.get_ident() != self._owner:
            self.real.flush()


@contextlib.contextmanager
def _captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """What this thread prints to stdout and stderr, meanwhile (other threads unaffected)."""
    out, err = _ThreadStream(sys.stdout), _ThreadStream(sys.stderr)
    sys.stdout, sys.stderr = out, err
    try:
        yield out.buffer_, err.buffer_
    finally:
        sys.stdout, sys.stderr = out.real, err.real


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a verb run on the API's behalf did: exit status, its JSON report (if it
    reached the switches) and what it said on stderr."""

    code: int
    report: dict[str, Any] | None
    errors: str
    output: str


@dataclass(frozen=True, slots=True)
class QuarantineNote:
    """Why and by whom a host was quarantined through the API, and until when."""

    reason: str
    by: str
    since: float
    expires: float | None = None


class StateBusy(Exception):
    """Another p4seg serve holds the state directory."""


class ApiError(Exception):
    """An answer other than success: HTTP status, a stable code, a message."""

    def __init__(self, status: int, code: str, message: str, **details: object) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def body(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, **self.details}}


def _report_of(output: str) -> dict[str, Any] | None:
    """The JSON document a verb printed (`--output json`) among its other lines."""
    for match in re.finditer(r"^\{", output, re.MULTILINE):
        try:
            doc, _ = json.JSONDecoder().raw_decode(output[match.start() :])
        except ValueError:
            continue
        if isinstance(doc, dict):
            return doc
    return None


class Engine:
    """The controller behind the API: the command line's options, the compiler front end,
    one lock for every operation, and the notes serve keeps (quarantine reasons, TTLs)."""

    def __init__(self, args: argparse.Namespace, front: Front) -> None:
        self.args = args
        self.state_dir = Path(args.state)
        self.lock = threading.Lock()
        self.changed = threading.Event()  # the live state changed: the watch loop reschedules
        self.last: Compiled | None = None  # the last build that compiled
        self._front = front
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    # The front end of every compile: the last build is what status probes the switches with.
    def front(
        self,
        args: argparse.Namespace,
        text_transform: TextTransform,
        policy_transform: PolicyTransform,
        text: str | None = None,
    ) -> Compiled | None:
        compiled = self._front(args, text_transform, policy_transform, text)
        if compiled is not None:
            self.last = compiled
        return compiled

    def start(self, failed: Callable[[], object]) -> None:
        """Start the watch loop in its thread; `failed` is called if it ever dies."""
        self._watch = threading.Thread(
            target=self._watch_loop, args=(failed,), name="p4seg-watch", daemon=True
        )
        self._watch.start()

    def _watch_loop(self, failed: Callable[[], object]) -> None:
        hooks = WatchHooks(self.lock, self.changed)
        try:
            watch_loop(self.args, self.front, self._stop.is_set, hooks)
        except Exception:  # a bug: without its watch loop nothing would expire; stop (fail closed)
            print("p4seg serve: the watch loop failed; stopping", file=sys.stderr)
            traceback.print_exc()
            failed()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def inventory(self) -> Inventory:
        try:
            return load_inventory(self.args.inventory)[0]
        except InventoryError as err:
            first = err.diagnostics[0].message if err.diagnostics else "cannot be loaded"
            raise ApiError(500, "inventory", f"{self.args.inventory}: {first}") from None

    def live(self) -> LiveState:
        try:
            return LiveState.load(self.state_dir)
        except ValueError as err:
            raise ApiError(500, "state", str(err)) from None

    def _state_bytes(self) -> bytes:
        with contextlib.suppress(OSError):
            return (self.state_dir / STATE_FILE).read_bytes()
        return b""

    def operate(self, verb: str, principal: str, fields: Mapping[str, object],
                audit_fields: Mapping[str, object], done: Callable[[], None] | None = None
                ) -> Outcome:  # fmt: skip
        """Run one verb (p4seg/verbs.py) under the lock, on behalf of `principal`, with
        its report as JSON, then `done` (still under the lock) if it succeeded; call from a
        worker thread."""
        args = argparse.Namespace(**{
            **vars(self.args), "verb": verb, "output": "json", "dry_run": False, "switch": [],
            "error_format": "human", "reason": "", **fields,
        })  # fmt: skip
        with (
            self.lock,  # also keeps the watch loop's printing out of the capture
            audit.on_behalf_of(principal, via="api", **audit_fields),
            _captured() as (stdout, stderr),
        ):
            before = self._state_bytes()
            code = HANDLERS[verb](args, self.front)
            changed = self._state_bytes() != before
            if code == EXIT_OK and done is not None:
                done()
        if changed:
            self.changed.set()
        output = stdout.getvalue()
        return Outcome(code, _report_of(output), stderr.getvalue().strip(), output)

    # -- quarantine notes (serve's own: the live state knows only who is quarantined) --

    def notes(self) -> dict[str, QuarantineNote]:
        try:
            doc = json.loads((self.state_dir / NOTES_FILE).read_text())
            return {str(h): QuarantineNote(**n) for h, n in doc.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise ApiError(
                500, "state", f"{self.state_dir / NOTES_FILE} is damaged ({err})"
            ) from None

    def note(self, host: str, note: QuarantineNote | None) -> None:
        """Keep (or, None, drop) the note of `host`'s quarantine; under the lock."""
        notes = self.notes()
        if note is not None:
            notes[host] = note
        elif notes.pop(host, None) is None:
            return
        self.save_notes(notes)

    def save_notes(self, notes: Mapping[str, QuarantineNote]) -> None:
        doc = {h: dataclasses.asdict(n) for h, n in sorted(notes.items())}
        tmp = self.state_dir / f".{NOTES_FILE}.tmp"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.state_dir / NOTES_FILE)

    def expire_quarantines(self) -> float:
        """Release every quarantine whose TTL ran out (worker thread); seconds until the
        next one runs out (at most a check period)."""
        now = clock()
        period = float(self.args.check)
        notes = self.notes()
        for host, note in notes.items():
            if note.expires is None or note.expires > now:
                continue
            if host in self.live().quarantined:
                self.operate("release", SERVICE_PRINCIPAL, {"host": host},
                             {"reason": f"quarantine TTL expired ({note.reason})"})  # fmt: skip
            if host not in self.live().quarantined:  # else retried after a check period
                with self.lock:
                    if self.notes().get(host) == note:  # not quarantined again meanwhile
                        self.note(host, None)
        pending = [n.expires - now for n in self.notes().values() if n.expires is not None]
        return max(0.05, min([period, *pending]))

    # -- status --------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """GET /v1/status (worker thread)."""
        with self.lock:
            state, notes, inventory = self.live(), self.notes(), self.inventory()
            probes = self._probe(self.last)
        records = _recent_audit(self.state_dir / "audit.jsonl")
        applied: dict[str, dict[str, object]] = {}
        last_apply: dict[str, object] | None = None
        for record in records:  # oldest first: the latest wins
            switches = record.get("switches")
            if not isinstance(switches, dict):
                continue
            seconds = [s.get("seconds", 0) for s in switches.values() if isinstance(s, dict)]
            last_apply = {
                "event": record.get("event"),
                "time": record.get("time"),
                "actor": record.get("actor"),
                "result": record.get("result"),
                "seconds": max(seconds, default=0),
            }
            for name, summary in switches.items():
                if isinstance(summary, dict) and summary.get("ok"):
                    applied[name] = {
                        "time": record.get("time"),
                        "policy_sha256": record.get("policy_sha256"),
                        "compiled_sha256": record.get("compiled_sha256"),
                    }
        now = clock()
        return {
            "role": "leader",
            "policy": str(self.args.policy),
            "switches": [
                {
                    "name": sw.name,
                    "address": sw.p4rt,
                    **probes.get(sw.name, {"connection": "unknown"}),
                    "applied": applied.get(sw.name),
                    "tables_sha256": state.applied_tables.get(sw.name),
                }
                for sw in inventory.switches
            ],
            "last_apply": last_apply,
            "grants": [_grant_json(g) for g in state.active_grants(now)],
            "quarantined": sorted(state.quarantined),
            "quarantines": [
                {"host": h, "since": _iso(since), **_note_json(notes.get(h))}
                for h, since in sorted(state.quarantined.items())
            ],
            "signals": [],
        }

    def _probe(self, compiled: Compiled | None) -> dict[str, dict[str, object]]:
        """Each switch's connection, pipeline and epoch (one cookie read, one default read)."""
        if compiled is None:
            return {}
        from finsy import P4Client
        from finsy.p4client import P4ClientError

        from runtime.controller import pipeline_state, read_epoch

        session = session_of("status", self.args, compiled)
        if session is None:
            return {}
        schema = session.files.schema()
        timeout = min(5.0, session.options.timeout)

        async def one(target: Any) -> dict[str, object]:
            try:
                async with P4Client(target.address, session.options.tls,
                                    wait_for_ready=False) as client:  # fmt: skip
                    pipeline = await asyncio.wait_for(
                        pipeline_state(client, target.device_id, schema), timeout
                    )
                    epoch = None
                    if pipeline == "same":
                        epoch = await asyncio.wait_for(
                            read_epoch(client, target.device_id, session.tables), timeout
                        )
                return {"connection": "up", "pipeline": pipeline, "epoch": epoch}
            except (P4ClientError, TimeoutError, OSError) as err:
                return {"connection": "unreachable", "reason": str(err) or type(err).__name__}

        async def every() -> list[dict[str, object]]:
            return list(await asyncio.gather(*(one(t) for t in session.switches)))

        results = asyncio.run(every())
        return {t.name: r for t, r in zip(session.switches, results, strict=True)}


def _iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")


def _grant_json(grant: Any) -> dict[str, object]:
    return {
        "id": grant.id,
        "rule": grant.line(),
        "by": grant.actor,
        "created": _iso(grant.created),
        "expires": _iso(grant.expires),
    }


def _note_json(note: QuarantineNote | None) -> dict[str, object]:
    if note is None:
        return {}
    return {
        "reason": note.reason,
        "by": note.by,
        "expires": None if note.expires is None else _iso(note.expires),
    }


def _recent_audit(path: Path, tail: int = 1 << 18) -> list[dict[str, Any]]:
    """The audit records in the last `tail` bytes of the log (a status needs the latest)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - tail))
            lines = f.read().splitlines()[1 if size > tail else 0 :]
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


def metrics_text(engine: Engine) -> str:
    """The Prometheus text body of /metrics (a minimal one; runtime/metrics.py replaces it)."""
    try:
        state = engine.live()
    except ApiError:
        state = LiveState()
    now = clock()
    lines = [
        "# HELP p4seg_quarantined_hosts Hosts quarantined now.",
        "# TYPE p4seg_quarantined_hosts gauge",
        f"p4seg_quarantined_hosts {len(state.quarantined)}",
        "# HELP p4seg_grants Grants in force now.",
        "# TYPE p4seg_grants gauge",
        f"p4seg_grants {len(state.active_grants(now))}",
    ]
    return "\n".join(lines) + "\n"


# -- the HTTP API -------------------------------------------------------------------------

Handler = Callable[["Api", web.Request, Principal], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Field:
    """A field of a JSON request body."""

    name: str
    types: tuple[type, ...]
    required: bool
    description: str


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: the router and the OpenAPI document are both made from `ROUTES`."""

    method: str
    path: str
    scope: str
    summary: str
    handler: Handler
    body: tuple[Field, ...] = ()
    query: tuple[tuple[str, str], ...] = ()  # (name, description)
    errors: tuple[int, ...] = ()  # statuses it can answer besides 200, 401, 403
    content: str = "application/json"


_JSON_TYPES = {str: "string", int: "integer", bool: "boolean"}  # also OpenAPI's names


def _json(doc: object, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status, dumps=lambda d: json.dumps(d, indent=1) + "\n")


async def _body(request: web.Request, fields: tuple[Field, ...]) -> dict[str, Any]:
    """The request's JSON object, checked against `fields` (ApiError 400 / 413)."""
    raw = await request.read()  # over --api-max-body: HTTPRequestEntityTooLarge (413)
    if not raw.strip():
        doc: Any = {}
    else:
        try:
            doc = json.loads(raw)
        except UnicodeDecodeError:
            raise ApiError(400, "malformed_json", "the body is not UTF-8") from None
        except json.JSONDecodeError as err:
            raise ApiError(
                400, "malformed_json", f"the body is not JSON: {err.msg} at line {err.lineno} "
                f"column {err.colno}",
            ) from None  # fmt: skip
    if not isinstance(doc, dict):
        raise ApiError(400, "wrong_type", "the body must be a JSON object")
    known = {f.name: f for f in fields}
    for name in doc:
        if name not in known:
            raise ApiError(400, "unknown_field", f"unknown field {name!r} (fields: "
                           f"{', '.join(known) or 'none'})")  # fmt: skip
    for f in fields:
        if f.name not in doc:
            if f.required:
                raise ApiError(400, "missing_field", f"field {f.name!r} is required")
            continue
        value = doc[f.name]
        if not isinstance(value, f.types) or (isinstance(value, bool) and bool not in f.types):
            kinds = " or ".join(_JSON_TYPES[t] for t in f.types)
            raise ApiError(400, "wrong_type", f"field {f.name!r} must be a {kinds}")
    return doc


def _seconds(value: object, field: str) -> int:
    """A duration: whole seconds, or a string such as `15m` (ApiError 400)."""
    if isinstance(value, int):
        if not 1 <= value <= MAX_DURATION_S:
            raise ApiError(400, "bad_value", f"field {field!r} must be from 1 to "
                           f"{MAX_DURATION_S} seconds (365d)")  # fmt: skip
        return value
    seconds = parse_duration(str(value))
    if isinstance(seconds, str):
        raise ApiError(400, "bad_value", f"field {field!r}: {seconds}")
    return seconds


def _outcome(outcome: Outcome, doc: dict[str, object]) -> web.Response:
    """200 when the verb succeeded; 422 when it refused (nothing reached the switches);
    502 when a switch failed (the live state is kept; watch retries)."""
    if outcome.code == EXIT_OK:
        return _json({**doc, "ok": True, "result": outcome.report})
    message = outcome.errors or "the operation failed"
    if outcome.report is None:
        raise ApiError(422, "refused", message)
    raise ApiError(502, "apply_failed", message, result=outcome.report)


class Api:
    """The endpoints, over an Engine."""

    def __init__(self, engine: Engine, access: Access) -> None:
        self.engine = engine
        self.access = access

    def principal(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(401, "unauthenticated", "Authorization must be `Bearer TOKEN`")
            found = self.access.by_token(token.strip())
            if found is None:
                raise ApiError(401, "unauthenticated", "unknown token")
            return found
        transport = request.transport
        peer = transport.get_extra_info("peercert") if transport is not None else None
        name = common_name(peer)
        if name is not None:
            return self.access.by_certificate(name)
        raise ApiError(
            401, "unauthenticated",
            "no credentials: present a client certificate or `Authorization: Bearer TOKEN`",
        )  # fmt: skip

    def _host(self, host: str) -> None:
        """404 (with a suggestion) for a host the inventory does not have."""
        names = sorted(self.engine.inventory().hosts_by_name)
        if host not in names:
            close = difflib.get_close_matches(host, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ApiError(404, "unknown_host", f"no host {host!r} in the inventory{hint}",
                           hosts=names)  # fmt: skip

    async def status(self, request: web.Request, who: Principal) -> web.StreamResponse:
        return _json(await asyncio.to_thread(self.engine.status))

    async def quarantine(self, request: web.Request, who: Principal) -> web.StreamResponse:
        host = request.match_info["host"]
        doc = await _body(request, QUARANTINE_BODY)
        ttl = _seconds(doc["ttl"], "ttl") if "ttl" in doc else None
        reason = doc.get("reason", "")
        self._host(host)
        now = clock()
        note = QuarantineNote(reason, who.audit_name, now, None if ttl is None else now + ttl)
        outcome = await asyncio.to_thread(self.engine.operate, "quarantine", who.audit_name,
                                          {"host": host}, {"reason": reason, "ttl": ttl},
                                          lambda: self.engine.note(host, note))  # fmt: skip
        return _outcome(outcome, {"host": host, "quarantined": outcome.code == EXIT_OK})

    async def release(self, request: web.Request, who: Principal) -> web.StreamResponse:
        host = request.match_info["host"]
        doc = await _body(request, RELEASE_BODY)
        self._host(host)
        if host not in self.engine.live().quarantined:
            raise ApiError(404, "not_quarantined", f"{host} is not quarantined")
        outcome = await asyncio.to_thread(self.engine.operate, "release", who.audit_name,
                                          {"host": host}, {"reason": doc.get("reason", "")},
                                          lambda: self.engine.note(host, None))  # fmt: skip
        return _outcome(outcome, {"host": host, "quarantined": outcome.code != EXIT_OK})

    async def grants(self, request: web.Request, who: Principal) -> web.StreamResponse:
        state = self.engine.live()
        return _json({"grants": [_grant_json(g) for g in state.active_grants(clock())]})

    async def grant(self, request: web.Request, who: Principal) -> web.StreamResponse:
        doc = await _body(request, GRANT_BODY)
        for side in ("src", "dst"):
            if not _ENDPOINT.match(doc[side]):
                raise ApiError(400, "bad_value", f"{side} must be one service, host name, "
                               "address or prefix (e.g. algo, algo1, 10.0.1.0/24)")  # fmt: skip
        if doc["proto"] not in PROTOCOLS:
            raise ApiError(400, "bad_value", f"proto must be one of {', '.join(PROTOCOLS)}")
        ports = doc.get("ports", "")
        if ports and not _PORTS.match(ports):
            raise ApiError(400, "bad_value", "ports must be a port or a range (5432, 8000-8080)")
        seconds = _seconds(doc["for"], "for")
        before = {g.id for g in self.engine.live().grants}
        fields = {"src": doc["src"], "dst": doc["dst"], "proto": doc["proto"], "ports": ports,
                  "duration": f"{seconds}s"}  # fmt: skip
        outcome = await asyncio.to_thread(self.engine.operate, "grant", who.audit_name, fields,
                                          {"reason": doc.get("reason", "")})  # fmt: skip
        new = [g for g in self.engine.live().grants if g.id not in before]
        if outcome.code == EXIT_OK and not new:  # already allowed: nothing to grant
            return _json({"ok": True, "grant": None, "message": outcome.output.strip()})
        return _outcome(outcome, {"grant": _grant_json(new[0]) if new else None})

    async def revoke(self, request: web.Request, who: Principal) -> web.StreamResponse:
        grant_id = request.match_info["id"]
        doc = await _body(request, RELEASE_BODY)
        known = [g.id for g in self.engine.live().grants]
        if grant_id not in known:
            raise ApiError(404, "unknown_grant", f"no grant {grant_id!r}", grants=known)
        outcome = await asyncio.to_thread(self.engine.operate, "revoke", who.audit_name,
                                          {"grant_id": grant_id},
                                          {"reason": doc.get("reason", "")})  # fmt: skip
        return _outcome(outcome, {"grant": grant_id, "revoked": outcome.code == EXIT_OK})

    async def apply(self, request: web.Request, who: Principal) -> web.StreamResponse:
        doc = await _body(request, APPLY_BODY)
        dry = doc.get("dry_run", False)
        outcome = await asyncio.to_thread(self.engine.operate, "apply", who.audit_name,
                                          {"dry_run": dry}, {"reason": doc.get("reason", "")})  # fmt: skip
        if dry and outcome.code == EXIT_CHANGES:  # the plan has changes: a plan, not a failure
            outcome = dataclasses.replace(outcome, code=EXIT_OK)
        return _outcome(outcome, {"policy": str(self.engine.args.policy), "dry_run": dry})

    async def signals(self, request: web.Request, who: Principal) -> web.StreamResponse:
        raise ApiError(501, "not_implemented",
                       "POST /v1/signals is not built yet: signals (EDR/IdP posture) are "
                       "not in the policy language yet; nothing was changed")  # fmt: skip

    def _alerts_path(self) -> Path:
        return self.engine.state_dir / "alerts.jsonl"

    async def alerts(self, request: web.Request, who: Principal) -> web.StreamResponse:
        since = _since(request)
        limit = _limit(request)
        alerts = [a for a in _read_alerts(self._alerts_path(), 0)[0] if _after(a, since)]
        return _json({"alerts": alerts[-limit:]})

    async def alert_stream(self, request: web.Request, who: Principal) -> web.StreamResponse:
        since = _since(request)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        offset = 0
        try:
            while not self.engine.stopping:
                alerts, offset = _read_alerts(self._alerts_path(), offset)
                for a in alerts:
                    if _after(a, since):
                        await response.write(json.dumps(a, sort_keys=True).encode() + b"\n")
                await asyncio.sleep(0.2)  # the log is a file: look again
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        return response

    async def openapi(self, request: web.Request, who: Principal) -> web.StreamResponse:
        return _json(openapi_document())

    async def metrics(self, request: web.Request, who: Principal) -> web.StreamResponse:
        return web.Response(text=metrics_text(self.engine), content_type="text/plain",
                            charset="utf-8")  # fmt: skip


def _since(request: web.Request) -> dt.datetime | None:
    text = request.query.get("since")
    if text is None:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, "bad_value", f"since={text!r} is not an ISO 8601 time "
                       "(e.g. 2026-03-02T21:30:00Z)") from None  # fmt: skip
    if moment.tzinfo is None:
        raise ApiError(400, "bad_value", f"since={text!r} has no zone (add Z or +01:00)")
    return moment


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "1000")
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise ApiError(400, "bad_value", "limit must be a number from 1 to 100000")
    return int(text)


def _after(alert: dict[str, Any], since: dt.datetime | None) -> bool:
    if since is None:
        return True
    try:
        return dt.datetime.fromisoformat(str(alert.get("time"))) >= since
    except ValueError:
        return False


def _read_alerts(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The whole alert lines of `path` from byte `offset`, and the offset after them."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next look
    out = []
    for line in data[:end].splitlines():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict):
                out.append(doc)
    return out, offset + end


QUARANTINE_BODY = (
    Field("reason", (str,), False, "why (audited)"),
    Field("ttl", (str, int), False, "release after this long: seconds or e.g. `30m`"),
)
RELEASE_BODY = (Field("reason", (str,), False, "why (audited)"),)
APPLY_BODY = (
    *RELEASE_BODY,
    Field("dry_run", (bool,), False, "plan only: the answer is the plan, nothing is written"),
)
GRANT_BODY = (
    Field("src", (str,), True, "a service, host name or address, as in the policy"),
    Field("dst", (str,), True, "a service, host name or address"),
    Field("proto", (str,), True, "tcp, udp, icmp or ip"),
    Field("ports", (str,), False, "a port or a range, e.g. 5432 or 8000-8080"),
    Field("for", (str, int), True, "how long: seconds or e.g. `15m`"),
    Field("reason", (str,), False, "why (audited)"),
)
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/status", "read", "switches, applied policy, grants, quarantines",
          Api.status),
    Route("PUT", "/v1/quarantine/{host}", "operate", "quarantine a host (its ToR's overlay)",
          Api.quarantine, QUARANTINE_BODY, errors=(400, 404, 413, 422, 502)),
    Route("DELETE", "/v1/quarantine/{host}", "operate", "release a quarantined host",
          Api.release, RELEASE_BODY, errors=(400, 404, 413, 422, 502)),
    Route("GET", "/v1/grants", "read", "the grants in force", Api.grants),
    Route("POST", "/v1/grants", "operate", "allow one flow for a while", Api.grant,
          GRANT_BODY, errors=(400, 413, 422, 502)),
    Route("DELETE", "/v1/grants/{id}", "operate", "end a grant now", Api.revoke,
          RELEASE_BODY, errors=(400, 404, 413, 422, 502)),
    Route("POST", "/v1/apply", "operate", "re-read the policy file and apply it; the plan "
          "and the result", Api.apply, APPLY_BODY, errors=(400, 413, 422, 502)),
    Route("POST", "/v1/signals", "operate", "posture signals (not built yet: 501)",
          Api.signals, errors=(501,)),
    Route("GET", "/v1/alerts", "read", "logged denies (alerts.jsonl), oldest first",
          Api.alerts, query=(("since", "ISO 8601 time with a zone: only alerts from then on"),
                             ("limit", "at most this many, the latest (default 1000)")),
          errors=(400,)),
    Route("GET", "/v1/alerts/stream", "read", "logged denies as they come (NDJSON)",
          Api.alert_stream, query=(("since", "ISO 8601 time with a zone"),), errors=(400,),
          content="application/x-ndjson"),
    Route("GET", "/openapi.json", "read", "this document", Api.openapi),
    Route("GET", "/metrics", "read", "Prometheus metrics", Api.metrics, content="text/plain"),
)  # fmt: skip


def openapi_document() -> dict[str, object]:
    """The OpenAPI 3 document of ROUTES."""
    paths: dict[str, dict[str, object]] = {}
    error = {"$ref": "#/components/schemas/Error"}
    for r in ROUTES:
        op: dict[str, object] = {
            "summary": r.summary,
            "operationId": r.handler.__name__,
            "x-p4seg-scope": r.scope,
            "responses": {
                "200": {"description": "ok", "content": {r.content: {}}},
                **{
                    str(s): {
                        "description": "error",
                        "content": {"application/json": {"schema": error}},
                    }
                    for s in (401, 403, *r.errors)
                },
            },
        }
        params: list[dict[str, object]] = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in re.findall(r"\{(\w+)\}", r.path)
        ]
        params += [
            {"name": n, "in": "query", "required": False, "description": d,
             "schema": {"type": "string"}}
            for n, d in r.query
        ]  # fmt: skip
        if params:
            op["parameters"] = params
        if r.body:
            props = {
                f.name: {
                    "description": f.description,
                    **(
                        {"type": _JSON_TYPES[f.types[0]]}
                        if len(f.types) == 1
                        else {"oneOf": [{"type": _JSON_TYPES[t]} for t in f.types]}
                    ),
                }
                for f in r.body
            }
            schema = {
                "type": "object",
                "additionalProperties": False,
                "properties": props,
                "required": [f.name for f in r.body if f.required],
            }
            op["requestBody"] = {
                "required": any(f.required for f in r.body),
                "content": {"application/json": {"schema": schema}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "p4seg serve", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "mtls": {"type": "mutualTLS"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                            "required": ["code", "message"],
                        }
                    },
                }
            },
        },
        "security": [{"bearer": []}, {"mtls": []}],
        "x-p4seg-scopes": list(SCOPES),
    }


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every answer is JSON: ApiError, aiohttp's own (404, 405, 413) and bugs (500)."""
    try:
        return await handler(request)
    except ApiError as err:
        response = _json(err.body(), err.status)
        if err.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="p4seg"'
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {413: "too_large", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status, "http_error"
        )
        return _json({"error": {"code": code, "message": exc.reason}}, exc.status)
    except Exception as exc:  # a bug: the service answers and keeps running
        print(f"p4seg serve: internal error on {request.method} {request.path}: {exc!r}",
              file=sys.stderr)  # fmt: skip
        return _json({"error": {"code": "internal", "message": "internal error (logged)"}}, 500)


def application(api: Api, max_body: int) -> web.Application:
    """The API's aiohttp application: ROUTES, each behind its scope."""
    app = web.Application(client_max_size=max_body, middlewares=[_errors])

    def bind(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            who = api.principal(request)
            if not who.may(route.scope):
                raise ApiError(403, "forbidden", f"{who.audit_name} lacks the "
                               f"{route.scope!r} scope for {route.method} {route.path}")  # fmt: skip
            return await route.handler(api, request, who)

        return handle

    for route in ROUTES:
        app.router.add_route(route.method, route.path, bind(route))
    return app


def metrics_application(engine: Engine) -> web.Application:
    """The separate --metrics listener: /metrics alone, for Prometheus to scrape."""
    app = web.Application(middlewares=[_errors])

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(text=metrics_text(engine), content_type="text/plain", charset="utf-8")

    app.router.add_get("/metrics", handle)
    return app


class Service:
    """The listeners of one serve process (API, and metrics when asked), over an Engine."""

    def __init__(self, engine: Engine, options: ApiOptions, access: Access) -> None:
        self.engine, self.options, self.access = engine, options, access
        self._runners: list[web.AppRunner] = []
        self._held: int | None = None  # the state directory's serve.lock
        self.failed = asyncio.Event()  # the watch loop died: the process must stop
        self._expiry: asyncio.Task[None] | None = None
        self.addresses: list[tuple[str, int]] = []  # bound: API first, then metrics

    async def start(self) -> None:
        """Bind the listeners (AccessError: bad TLS material), then start the engine."""
        o = self.options
        context = None
        if not o.plain:
            assert o.cert is not None and o.key is not None
            context = server_context(o.cert, o.key, o.client_ca, optional=o.tokens is not None)
        listeners = [(application(Api(self.engine, self.access), o.max_body), o.host, o.port,
                      context)]  # fmt: skip
        if o.metrics is not None:
            listeners.append((metrics_application(self.engine), *o.metrics, None))
        for app, host, port, ssl_context in listeners:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self._runners.append(runner)
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
            await site.start()
            self.addresses.append(runner.addresses[-1][:2])
        host, port = self.addresses[0]
        url = f"{o.scheme}://{host}:{port}"
        self._held = hold(self.engine.state_dir, url)
        if self._held is None:
            busy = serving(self.engine.state_dir)
            for runner in self._runners:
                await runner.cleanup()
            raise StateBusy(f"another p4seg serve runs on {self.engine.state_dir} ({busy})")
        metrics = ""
        if o.metrics is not None:
            metrics = f", metrics on http://{o.metrics[0]}:{self.addresses[1][1]}/metrics"
        print(f"p4seg serve: API on {url}/v1/status{metrics}", flush=True)
        loop = asyncio.get_running_loop()
        # After the banner: the watch loop prints its first apply.
        self.engine.start(lambda: loop.call_soon_threadsafe(self.failed.set))
        self._expiry = asyncio.create_task(self._expire())

    async def _expire(self) -> None:
        """Release quarantines whose TTL ran out, as they run out."""
        while True:
            try:
                pause = await asyncio.to_thread(self.engine.expire_quarantines)
            except ApiError as err:  # a damaged notes file: say so, keep serving, retry
                print(f"p4seg serve: {err.message}", file=sys.stderr)
                pause = float(self.engine.args.check)
            await asyncio.sleep(pause)

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        await asyncio.to_thread(self.engine.stop)
        for runner in self._runners:
            await runner.cleanup()
        if self._held is not None:
            os.close(self._held)
            self._held = None


def cmd_serve(args: argparse.Namespace, front: Front) -> int:
    """`p4seg serve`: check every option, start, and serve until SIGINT/SIGTERM."""
    options = api_options(args)
    controller = options_of(args)
    problem = options if isinstance(options, str) else None
    if problem is None and isinstance(controller, str):
        problem = controller
    if problem is not None or isinstance(options, str):
        print(f"p4seg serve: error: {problem}", file=sys.stderr)
        return EXIT_ERROR
    try:
        access = load_access(options.tokens) if options.tokens is not None else Access()
        LiveState.load(Path(args.state))
    except (AccessError, ValueError) as err:
        print(f"p4seg serve: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    service = Service(Engine(args, front), options, access)

    async def serve() -> int:
        try:
            await service.start()
        except (AccessError, OSError, StateBusy) as err:
            print(f"p4seg serve: error: {err}", file=sys.stderr)
            await service.stop()
            return EXIT_ERROR
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        failed = asyncio.ensure_future(service.failed.wait())
        await asyncio.wait([asyncio.ensure_future(stopped.wait()), failed],
                           return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        await service.stop()
        return EXIT_ERROR if failed.done() else EXIT_OK

    return asyncio.run(serve())
