"""The HTTP side of `p4seg serve` (aiohttp): every route is one row of `ROUTES`, from
which the router and the OpenAPI document are both made, so they cannot drift.

Every request is authenticated (p4seg/api_auth.py) and checked against its route's scope,
its body and parameters are validated before anything runs (bad input changes
nothing), and every answer is JSON; errors are `{"error": {"code": ..., "message": ...}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import difflib
import json
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from compiler.resolve import MAX_DURATION_S, parse_duration
from p4seg.api_auth import SCOPES, Access, Principal, common_name
from p4seg.control import EXIT_CHANGES, EXIT_OK
from p4seg.operations import (
    ApiError,
    Operations,
    Outcome,
    QuarantineNote,
    grant_json,
)
from p4seg.verbs import clock
from p4seg.webmap import page
from runtime.live import GRANT_ENDPOINT, GRANT_PROTOCOLS

if TYPE_CHECKING:
    from p4seg.follower import Containment

_PORTS = re.compile(r"^[0-9]{1,5}(-[0-9]{1,5})?$")


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
        warnings = {"warnings": outcome.errors} if outcome.errors else {}
        return _json({**doc, "ok": True, "result": outcome.report, **warnings})
    message = outcome.errors or "the operation failed"
    if outcome.report is None:
        raise ApiError(422, "refused", message)
    raise ApiError(502, "apply_failed", message, result=outcome.report)


class Api:
    """The endpoints, over an Operations."""

    def __init__(self, ops: Operations, access: Access,
                 containment: Containment | None = None) -> None:  # fmt: skip
        self.ops = ops
        self.access = access
        self.containment = containment  # the policy engine (p4seg/follower.py)
        self._streams: set[asyncio.Event] = set()  # one per /v1/alerts/stream reader

    def principal(self, request: web.Request) -> Principal:
        token = _browser_token(request)
        if token is not None:  # the map's page in a browser: read scope at most
            found = self.access.by_token(token)
            if found is None:
                raise ApiError(401, "unauthenticated", "unknown token")
            return found.reading()
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
        names = sorted(self.ops.inventory().hosts_by_name)
        if host not in names:
            close = difflib.get_close_matches(host, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ApiError(404, "unknown_host", f"no host {host!r} in the inventory{hint}",
                           hosts=names)  # fmt: skip

    async def status(self, request: web.Request, who: Principal) -> web.StreamResponse:
        return _json(await asyncio.to_thread(self.ops.status))

    async def quarantine(self, request: web.Request, who: Principal) -> web.StreamResponse:
        host = request.match_info["host"]
        doc = await _body(request, QUARANTINE_BODY)
        ttl = _seconds(doc["ttl"], "ttl") if "ttl" in doc else None
        reason = doc.get("reason", "")
        self._host(host)
        now = clock()
        note = QuarantineNote(reason, who.audit_name, now, None if ttl is None else now + ttl)
        outcome = await asyncio.to_thread(self.ops.operate, "quarantine", who.audit_name,
                                          {"host": host}, {"reason": reason, "ttl": ttl},
                                          lambda: self.ops.note(host, note))  # fmt: skip
        return _outcome(outcome, {"host": host, "quarantined": outcome.code == EXIT_OK})

    async def release(self, request: web.Request, who: Principal) -> web.StreamResponse:
        host = request.match_info["host"]
        doc = await _body(request, RELEASE_BODY)
        self._host(host)

        def quarantined() -> None:
            if host not in self.ops.live().quarantined:
                raise ApiError(404, "not_quarantined", f"{host} is not quarantined")

        outcome = await asyncio.to_thread(self.ops.operate, "release", who.audit_name,
                                          {"host": host}, {"reason": doc.get("reason", "")},
                                          lambda: self.ops.note(host, None),
                                          check=quarantined)  # fmt: skip
        return _outcome(outcome, {"host": host, "quarantined": outcome.code != EXIT_OK})

    async def grants(self, request: web.Request, who: Principal) -> web.StreamResponse:
        state = self.ops.live()
        return _json({"grants": [grant_json(g) for g in state.active_grants(clock())]})

    async def grant(self, request: web.Request, who: Principal) -> web.StreamResponse:
        doc = await _body(request, GRANT_BODY)
        for side in ("src", "dst"):
            if not GRANT_ENDPOINT.match(doc[side]):
                raise ApiError(400, "bad_value", f"{side} must be one service, host name, "
                               "address or prefix (e.g. algo, algo1, 10.0.1.0/24)")  # fmt: skip
        if doc["proto"] not in GRANT_PROTOCOLS:
            raise ApiError(400, "bad_value", f"proto must be one of {', '.join(GRANT_PROTOCOLS)}")
        ports = doc.get("ports", "")
        if ports and not _PORTS.match(ports):
            raise ApiError(400, "bad_value", "ports must be a port or a range (5432, 8000-8080)")
        seconds = _seconds(doc["for"], "for")
        fields = {"src": doc["src"], "dst": doc["dst"], "proto": doc["proto"], "ports": ports,
                  "duration": f"{seconds}s"}  # fmt: skip
        outcome = await asyncio.to_thread(self.ops.operate, "grant", who.audit_name, fields,
                                          {"reason": doc.get("reason", "")})  # fmt: skip
        new = [g for g in self.ops.live().grants if g.id in outcome.grants_added]
        if outcome.code == EXIT_OK and not new:  # already allowed: nothing to grant
            return _json({"ok": True, "grant": None, "message": outcome.output.strip()})
        return _outcome(outcome, {"grant": grant_json(new[0]) if new else None})

    async def revoke(self, request: web.Request, who: Principal) -> web.StreamResponse:
        grant_id = request.match_info["id"]
        doc = await _body(request, RELEASE_BODY)

        def granted() -> None:
            known = [g.id for g in self.ops.live().grants]
            if grant_id not in known:
                raise ApiError(404, "unknown_grant", f"no grant {grant_id!r}", grants=known)

        outcome = await asyncio.to_thread(self.ops.operate, "revoke", who.audit_name,
                                          {"grant_id": grant_id},
                                          {"reason": doc.get("reason", "")},
                                          check=granted)  # fmt: skip
        return _outcome(outcome, {"grant": grant_id, "revoked": outcome.code == EXIT_OK})

    async def apply(self, request: web.Request, who: Principal) -> web.StreamResponse:
        doc = await _body(request, APPLY_BODY)
        dry = doc.get("dry_run", False)
        outcome = await asyncio.to_thread(self.ops.operate, "apply", who.audit_name,
                                          {"dry_run": dry}, {"reason": doc.get("reason", "")})  # fmt: skip
        if dry and outcome.code == EXIT_CHANGES:  # the plan has changes: a plan, not a failure
            outcome = dataclasses.replace(outcome, code=EXIT_OK)
        return _outcome(outcome, {"policy": str(self.ops.args.policy), "dry_run": dry})

    async def signals(self, request: web.Request, who: Principal) -> web.StreamResponse:
        from p4seg.follower import SignalRefused
        from runtime.engine import Signal, decision_json

        doc = await _body(request, SIGNAL_BODY)
        ttl = _seconds(doc["ttl"], "ttl") if "ttl" in doc else None
        self._host(doc["host"])
        if self.containment is None:
            raise ApiError(501, "not_implemented", "this serve runs no policy engine")
        signal = Signal(doc["host"], doc["name"], doc["source"], ttl, doc.get("reason", ""), 0.0)
        try:
            carried = await asyncio.to_thread(self.containment.signal, who.audit_name, signal,
                                              doc.get("dry_run", False))  # fmt: skip
        except SignalRefused as err:
            raise ApiError(422, "refused_signal", str(err), signals=err.declared) from None
        decisions = [decision_json(d) for d in carried.decisions]
        return _outcome(carried.outcome, {"host": doc["host"], "decisions": decisions})

    def alert_arrived(self, alert: object) -> None:
        """An alert subscriber (p4seg/follower.py): wakes the stream readers, in the loop,
        once the alert log has the alert."""
        for arrived in self._streams:
            arrived.set()

    def _alerts_path(self) -> Path:
        return self.ops.state_dir / "alerts.jsonl"

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
        arrived = asyncio.Event()
        self._streams.add(arrived)
        try:
            while not self.ops.stopping:
                alerts, offset = _read_alerts(self._alerts_path(), offset)
                for a in alerts:
                    if _after(a, since):
                        await response.write(json.dumps(a, sort_keys=True).encode() + b"\n")
                # Woken by the follower; the timeout notices a stop and lines other writers add.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(arrived.wait(), 1.0)
                arrived.clear()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._streams.discard(arrived)
        return response

    async def openapi(self, request: web.Request, who: Principal) -> web.StreamResponse:
        return _json(openapi_document())

    async def page(self, request: web.Request, who: Principal) -> web.StreamResponse:
        token = request.query.get("token")
        if token is not None:  # the login link: keep the token in a cookie, not in the URL
            response = web.Response(status=303, headers={"Location": "/"})
            response.set_cookie(
                COOKIE, token, httponly=True, samesite="Strict", path="/",
                secure=request.secure, max_age=12 * 3600,
            )  # fmt: skip
            return response
        return web.Response(body=page(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})  # fmt: skip

    async def map(self, request: web.Request, who: Principal) -> web.StreamResponse:
        return _json(await asyncio.to_thread(self.ops.map))

    async def metrics(self, request: web.Request, who: Principal) -> web.StreamResponse:
        return _metrics(await asyncio.to_thread(self.ops.metrics))


COOKIE = "p4seg_token"  # a browser's bearer token, set by /?token=... (read scope only)


def _browser_token(request: web.Request) -> str | None:
    """A browser's token: `/?token=...` (the login link) or the cookie it sets — only for
    GET, and only when no other credential is given (a cookie never authorises a change:
    no cross-site request can use it to write)."""
    if request.method != "GET" or "Authorization" in request.headers:
        return None
    if request.path == "/" and "token" in request.query:
        return request.query["token"]
    transport = request.transport
    if transport is not None and transport.get_extra_info("peercert"):
        return None
    return request.cookies.get(COOKIE)


def _metrics(exposition: tuple[bytes, str]) -> web.Response:
    body, content_type = exposition
    return web.Response(body=body, headers={"Content-Type": content_type})


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
SIGNAL_BODY = (
    Field("host", (str,), True, "the inventory host the signal is about"),
    Field("name", (str,), True, "a signal the policy declares, or `healthy`"),
    Field("source", (str,), True, "who says so (a source the policy accepts it from)"),
    Field("ttl", (str, int), False, "the signal lapses after this long: seconds or e.g. `1h`"),
    Field("reason", (str,), False, "why (audited)"),
    Field("dry_run", (bool,), False, "decide only: the answer says what would be done"),
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
    Route("POST", "/v1/signals", "operate", "a posture signal about a host, through the "
          "policy engine; the decisions and what carrying them out did", Api.signals,
          SIGNAL_BODY, errors=(400, 404, 413, 422, 501, 502)),
    Route("GET", "/v1/alerts", "read", "logged denies (alerts.jsonl), oldest first",
          Api.alerts, query=(("since", "ISO 8601 time with a zone: only alerts from then on"),
                             ("limit", "at most this many, the latest (default 1000)")),
          errors=(400,)),
    Route("GET", "/v1/alerts/stream", "read", "logged denies as they come (NDJSON)",
          Api.alert_stream, query=(("since", "ISO 8601 time with a zone"),), errors=(400,),
          content="application/x-ndjson"),
    Route("GET", "/openapi.json", "read", "this document", Api.openapi),
    Route("GET", "/", "read", "the live map (a page: services, flows, quarantines, alerts); "
          "`/?token=TOKEN` logs a browser in with a read-only cookie", Api.page,
          query=(("token", "a bearer token, kept in a cookie (then redirected to /)"),),
          content="text/html"),
    Route("GET", "/v1/map", "read", "the live map's document", Api.map, errors=(503,)),
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
                    # 503: with --etcd, a standby (or etcd unreachable) refuses every change
                    for s in (401, 403, *r.errors, *(() if r.method == "GET" else (503,)))
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
            required = [f.name for f in r.body if f.required]
            schema = {
                "type": "object",
                "additionalProperties": False,
                "properties": props,
                **({"required": required} if required else {}),
            }
            op["requestBody"] = {
                "required": any(f.required for f in r.body),
                "content": {"application/json": {"schema": schema}},
            }
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",  # 3.1: it has the mutualTLS security scheme
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


def _access_line(request: web.Request, who: Principal | None, status: int) -> None:
    moment = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
    caller = who.audit_name if who is not None else "-"
    print(f"p4seg serve: {moment} {request.remote} {caller} {request.method} "
          f"{request.path_qs} {status}", file=sys.stderr, flush=True)  # fmt: skip


def application(api: Api, max_body: int) -> web.Application:
    """The API's aiohttp application: ROUTES, each behind its scope."""
    app = web.Application(client_max_size=max_body, middlewares=[_errors])

    def bind(route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            who: Principal | None = None
            status = 500
            try:
                who = api.principal(request)
                if not who.may(route.scope):
                    raise ApiError(403, "forbidden", f"{who.audit_name} lacks the "
                                   f"{route.scope!r} scope for {route.method} {route.path}")  # fmt: skip
                if request.method != "GET":  # a standby's view is stale: name the leader
                    api.ops.refuse_on_standby()
                response = await route.handler(api, request, who)
                status = response.status
                return response
            except ApiError as err:
                status = err.status
                raise
            finally:  # changes and refused callers, one line each (reads are not logged)
                if request.method != "GET" or status in (401, 403):
                    _access_line(request, who, status)

        return handle

    for route in ROUTES:
        app.router.add_route(route.method, route.path, bind(route))
    return app


def metrics_application(ops: Operations) -> web.Application:
    """The separate --metrics listener: /metrics alone, for Prometheus to scrape."""
    app = web.Application(middlewares=[_errors])

    async def handle(request: web.Request) -> web.StreamResponse:
        return _metrics(await asyncio.to_thread(ops.metrics))

    app.router.add_get("/metrics", handle)
    return app
