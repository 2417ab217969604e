"""The live verbs (`quarantine`, `release`, `grant`, `revoke`) against a running `p4seg
serve` (`--server URL` or $P4SEG_SERVER): the service applies them in turn with its own
watch loop, so an operator never races it.

Credentials: a bearer token (`--server-token`, or $P4SEG_SERVER_TOKEN, which keeps it out
of `ps`) and/or a client certificate (`--server-cert/--server-key`); `--server-ca`
verifies the server (default: the system's CAs).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR = 0, 1
SERVE_LOCK = "serve.lock"  # in the state directory: held by the p4seg serve running on it


def serving(state_dir: Path) -> str | None:
    """The API URL of the p4seg serve running on `state_dir`, or None if none is."""
    try:
        fd = os.open(state_dir / SERVE_LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return (state_dir / SERVE_LOCK).read_text().strip() or "(address unknown)"
    finally:
        os.close(fd)  # also drops a shared lock this took
    return None


def hold(state_dir: Path, url: str) -> int | None:
    """Mark `state_dir` as served at `url` for as long as the returned descriptor is open;
    None if another p4seg serve holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / SERVE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{url}\n".encode())
    return fd


def server_of(args: argparse.Namespace) -> str | None:
    """The configured server's URL, if any."""
    return getattr(args, "server", None) or os.environ.get("P4SEG_SERVER") or None


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, object] | None
             ) -> tuple[int, dict[str, Any]]:  # fmt: skip
    base = server_of(args)
    assert base is not None
    url = base.rstrip("/") + path
    headers = {"Accept": "application/json"}
    token = args.server_token or os.environ.get("P4SEG_SERVER_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=args.server_ca)
        if args.server_cert:
            context.load_cert_chain(args.server_cert, args.server_key)
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, context=context, timeout=args.timeout) as reply:
            return reply.status, json.loads(reply.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"{}")
        except ValueError:
            return err.code, {"error": {"code": "http", "message": str(err.reason)}}


def run_remote(args: argparse.Namespace) -> int:
    """One live verb through the server; prints what it answered."""
    verb = args.verb
    quote = urllib.parse.quote
    call: tuple[str, str, dict[str, object] | None]
    if verb == "quarantine":
        body: dict[str, object] = {"reason": args.reason}
        if args.ttl:
            body["ttl"] = args.ttl
        call = ("PUT", f"/v1/quarantine/{quote(args.host, safe='')}", body)
    elif verb == "release":
        call = ("DELETE", f"/v1/quarantine/{quote(args.host, safe='')}", None)
    elif verb == "grant":
        body = {"src": args.src, "dst": args.dst, "proto": args.proto, "for": args.duration}
        if args.ports:
            body["ports"] = args.ports
        call = ("POST", "/v1/grants", body)
    elif verb == "signal":
        body = {"host": args.host, "name": args.name, "source": args.source,
                "reason": args.reason, "dry_run": args.dry_run}  # fmt: skip
        if args.ttl:
            body["ttl"] = args.ttl
        call = ("POST", "/v1/signals", body)
    else:
        call = ("DELETE", f"/v1/grants/{quote(args.grant_id, safe='')}", None)
    try:
        status, doc = _request(args, *call)
    except (OSError, ssl.SSLError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        print(f"p4seg {verb}: error: {server_of(args)}: {reason}", file=sys.stderr)
        return EXIT_ERROR
    if args.output == "json":
        print(json.dumps(doc, indent=2, sort_keys=True))
    if status >= 300:
        error = doc.get("error", {}) if isinstance(doc, dict) else {}
        print(f"p4seg {verb}: error: {server_of(args)} answered {status}: "
              f"{error.get('message', doc)}", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    if args.output == "human":
        print(_summary(verb, args, doc))
    return EXIT_OK


def _summary(verb: str, args: argparse.Namespace, doc: dict[str, Any]) -> str:
    if verb == "grant":
        grant = doc.get("grant")
        if grant is None:
            return str(doc.get("message") or "already allowed; nothing written")
        return (
            f"grant {grant['id']}: {grant['rule']} until {grant['expires']} (via {server_of(args)})"
        )
    if verb == "signal":
        decisions = doc.get("decisions") or []
        said = "; ".join(f"{d.get('decision')} {d.get('host')}: {d.get('reason')}"
                         for d in decisions)  # fmt: skip
        return f"{said or args.host + ': nothing changes'} (via {server_of(args)})"
    if verb == "revoke":
        return f"revoked {args.grant_id} (via {server_of(args)})"
    done = "Quarantined" if verb == "quarantine" else "Released"
    return f"{done} {args.host} (via {server_of(args)})"
