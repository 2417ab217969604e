"""`p4seg serve`: the controller as a service — `watch` plus an authenticated HTTPS API.

The operations (p4seg/operations.py) runs the verbs an operator runs, one at a time with the watch
loop; the API (p4seg/api.py) is aiohttp — asyncio like finsy, and its transport gives the
TLS peer certificate, the mTLS principal; who may call it is p4seg/api_auth.py. This
module holds the options, the listeners and the command. docs/serve.md describes it all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from compiler.diagnostics import InventoryError
from compiler.inventory import load_inventory
from p4seg.api import Api, application, metrics_application
from p4seg.api_auth import Access, AccessError, is_loopback, load_access, server_context
from p4seg.control import EXIT_ERROR, EXIT_OK, options_of, session_of
from p4seg.follower import AlertLog, AlertSubscriber, Containment, Follower, controller_options
from p4seg.observe import sinks_of
from p4seg.operations import ApiError, Operations
from p4seg.remote import hold, serving
from p4seg.standby import BackupStreams
from p4seg.verbs import Front, etcd_options
from runtime.controller import ControllerOptions
from runtime.etcdstore import EtcdOptions, Leadership, Replica, Role
from runtime.grpc_loops import ignore_closed_loop_events
from runtime.live import LiveState
from runtime.siem import SiemConfigError

DEFAULT_MAX_BODY = 64 * 1024  # bytes: the largest request body (a grant is ~200)


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


class StateBusy(Exception):
    """Another p4seg serve holds the state directory."""


class Service:
    """The listeners of one serve process (API, and metrics when asked), over an Operations."""

    def __init__(
        self, ops: Operations, options: ApiOptions, access: Access, etcd: EtcdOptions | None = None
    ) -> None:
        self.ops, self.options, self.access = ops, options, access
        self.etcd = etcd  # --etcd: one of several controllers of the floor
        if etcd is not None and not ops.args.build:  # a standby compiles too (p4seg/verbs.py
            ops.args.build = str(ops.state_dir / "build")  # warm): never into another's build
        self.replica: Replica | None = None
        self._runners: list[web.AppRunner] = []
        self._held: int | None = None  # the state directory's serve.lock
        self.failed = asyncio.Event()  # the watch loop died: the process must stop
        self._expiry: asyncio.Task[None] | None = None
        self._hits: asyncio.Task[None] | None = None
        self.addresses: list[tuple[str, int]] = []  # bound: API first, then metrics
        # PacketIns -> alerts -> each of these, in the event loop (p4seg/follower.py): the
        # alert log, the engine, the metrics and SIEM; append more before or after start.
        self.containment = Containment(ops)
        self.alert_subscribers: list[AlertSubscriber] = [
            AlertLog(ops.state_dir),
            self.containment.subscriber(),
            ops.observers.alert,  # metrics and the SIEM (p4seg/observe.py)
        ]
        self.follower: Follower | None = None  # with --etcd: this term's, while it leads
        self._following: list[asyncio.Task[None]] = []
        self._term_follower: asyncio.Task[None] | None = None  # --etcd: runs self.follower
        self._followed: int | None = None  # --etcd: the term followed (its create_revision)
        # --etcd, while a standby: a backup stream per switch (p4seg/standby.py); its view
        # is the operations' (GET /v1/status).
        self.backups = BackupStreams(ops.backup_view)
        self._standing: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Bind the listeners (AccessError: bad TLS material), then start the operations."""
        ignore_closed_loop_events(asyncio.get_running_loop())  # runtime/grpc_loops.py
        o = self.options
        context = None
        if not o.plain:
            assert o.cert is not None and o.key is not None
            context = server_context(o.cert, o.key, o.client_ca, optional=o.tokens is not None)
        api = Api(self.ops, self.access, self.containment)
        self.alert_subscribers.append(api.alert_arrived)  # after the log: it has the line
        listeners = [(application(api, o.max_body), o.host, o.port, context)]
        if o.metrics is not None:
            listeners.append((metrics_application(self.ops), *o.metrics, None))
        for app, host, port, ssl_context in listeners:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self._runners.append(runner)
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
            await site.start()
            self.addresses.append(runner.addresses[-1][:2])
        host, port = self.addresses[0]
        url = f"{o.scheme}://{host}:{port}"
        self._held = hold(self.ops.state_dir, url)
        if self._held is None:
            busy = serving(self.ops.state_dir)
            for runner in self._runners:
                await runner.cleanup()
            self._runners.clear()
            raise StateBusy(f"another p4seg serve runs on {self.ops.state_dir} ({busy})")
        metrics = ""
        if o.metrics is not None:
            metrics = f", metrics on http://{o.metrics[0]}:{self.addresses[1][1]}/metrics"
        print(f"p4seg serve: API on {url}/v1/status{metrics}", flush=True)
        loop = asyncio.get_running_loop()
        if self.etcd is not None:
            from p4seg.replication import Replication

            # Campaigns in the background: the watch loop turns once this controller leads.
            self.replica = Replica.open(dataclasses.replace(self.etcd, url=url))
            await self.replica.start()
            self.ops.replication = Replication(self.replica, self.ops.state_dir, loop)
            self.ops.args.write_fence = self.ops.replication.still_leads  # every switch write
            print(f"p4seg serve: {self.replica.elector.options.who} on floor {self.etcd.floor} "
                  f"(etcd {','.join(self.etcd.endpoints)})", flush=True)  # fmt: skip
        # After the banner: the watch loop prints its first apply.
        self.ops.start(lambda: loop.call_soon_threadsafe(self.failed.set))
        self._expiry = asyncio.create_task(self._expire())
        interval = float(getattr(self.ops.args, "hits_interval", 0.0) or 0.0)
        if interval > 0:
            self._hits = asyncio.create_task(self._read_hits(interval))
        self._follow()

    def _follow(self) -> None:
        """Start the follower (p4seg/follower.py) and the engine behind it; with --etcd, a
        follower per term of this controller as leader (`_lead`)."""
        self.ops.active_signals = self.containment.active_signals
        self._following = [asyncio.create_task(self.containment.ticks())]
        options = controller_options(self.ops)
        if isinstance(options, str):
            print(f"p4seg serve: {options}", file=sys.stderr)
            return
        self._following.append(asyncio.create_task(self.containment.consume()))
        if self.replica is None:
            self.follower = Follower(self.ops, options, self.alert_subscribers)
            self._following.append(asyncio.create_task(self.follower.run()))
            return
        elector = self.replica.elector
        elector.on_change(lambda role, term: self._lead(options, term, role))
        if elector.role is Role.LEADER:
            self._lead(options, elector.fence(), Role.LEADER)
        else:
            self._stand_by(True)

    def _stand_by(self, standing: bool) -> None:
        """--etcd: hold the backup streams while a standby, end them when leading."""
        if standing and self._standing is None:
            self._standing = asyncio.create_task(self._backup_streams())
        elif not standing and self._standing is not None:
            self._standing.cancel()
            self._standing = None
            self.backups.view.clear()

    async def _backup_streams(self) -> None:
        while self.ops.last is None:  # the standby's first compile (p4seg/verbs.py warm)
            await asyncio.sleep(float(self.ops.args.interval))
        session = session_of("serve", self.ops.args, self.ops.last)
        if session is not None:  # else reported: the applies say the same
            await self.backups.run(session.switches, session.options.tls)

    def _lead(self, options: ControllerOptions, term: Leadership | None, role: Role) -> None:
        """--etcd, on every change of role: a term that ends (deposed, lease lost, resigned)
        cancels its follower now; a term that begins starts one at its election id, once
        the previous one has closed its sessions."""
        revision = term.create_revision if term is not None and role is Role.LEADER else None
        if self._stopping:
            revision = None
        self._stand_by(role is Role.STANDBY and not self._stopping)
        if revision == self._followed:
            return
        self._followed = revision
        previous, self._term_follower, self.follower = self._term_follower, None, None
        if previous is not None:
            previous.cancel()
        if term is None or revision is None:
            return
        assert options.fenced  # --etcd: the follower's bids are capped at the term's id
        follower = Follower(self.ops, dataclasses.replace(options, election_id=term.election_id),
                            self.alert_subscribers)  # fmt: skip
        self.follower = follower
        self._term_follower = asyncio.create_task(_after(previous, follower.run()))

    async def _expire(self) -> None:
        """Release quarantines whose TTL ran out, as they run out."""
        while True:
            try:
                pause = await asyncio.to_thread(self.ops.expire_quarantines)
            except ApiError as err:  # a damaged notes file: say so, keep serving, retry
                print(f"p4seg serve: {err.message}", file=sys.stderr)
                pause = float(self.ops.args.check)
            await asyncio.sleep(pause)

    async def _read_hits(self, interval: float) -> None:
        """The rule counters, every `interval` seconds (metrics, the map's rates)."""
        while True:
            try:
                await asyncio.to_thread(self.ops.read_hits)
            except Exception as err:  # a failed read is retried, never fatal
                print(f"p4seg serve: reading the rule counters failed: {err!r}", file=sys.stderr)
            await asyncio.sleep(interval)

    async def stop(self, *, resign: bool = True) -> None:
        """Stop serving; a leader resigns (a standby takes over at once) unless `resign` is
        False (then as if it died: a standby waits for the lease to run out)."""
        for task in (self._expiry, self._hits):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self.ops.stop)  # its last apply may use the follower's sessions
        self._stopping = True  # no new term is followed
        following = [*self._following, *filter(None, [self._term_follower, self._standing])]
        for task in following:
            task.cancel()
        for task in following:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # An engine operation already in its worker thread ends while etcd is still open.
        await asyncio.to_thread(_drained, self.ops.lock)
        if self.replica is not None:
            await self.replica.close(resign=resign)
            self.replica = None
        for runner in self._runners:
            await runner.cleanup()
        if self._held is not None:
            os.close(self._held)
            self._held = None


def _drained(lock: threading.Lock) -> None:
    with lock:
        pass  # taken once: whoever held it is done


async def _after(previous: asyncio.Task[None] | None, then: Coroutine[Any, Any, None]) -> None:
    """`then`, once `previous` is over (cancelled: its sessions are closed and its stepping
    aside unregistered); a cancellation meanwhile cancels `then` too."""
    try:
        if previous is not None:
            await asyncio.wait([previous])  # its outcome is its own; ours propagates
    except BaseException:
        then.close()
        raise
    await then


def etcd_of(args: argparse.Namespace) -> EtcdOptions:
    """--etcd and its options; the floor defaults to the inventory's name (ValueError,
    InventoryError)."""
    floor = args.floor or load_inventory(args.inventory)[0].name
    return dataclasses.replace(etcd_options(args, floor), ttl=args.etcd_ttl, name=args.etcd_name)


def cmd_serve(args: argparse.Namespace, front: Front) -> int:
    """`p4seg serve`: check every option, start, and serve until SIGINT/SIGTERM."""
    options = api_options(args)
    controller = options_of(args)  # the switches' side: checked now, used by every apply
    for problem in (options, controller):
        if isinstance(problem, str):
            print(f"p4seg serve: error: {problem}", file=sys.stderr)
            return EXIT_ERROR
    assert not isinstance(options, str)
    try:
        access = load_access(options.tokens) if options.tokens is not None else Access()
        LiveState.load(Path(args.state))
    except (AccessError, ValueError) as err:
        print(f"p4seg serve: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    try:
        sinks_of(args)
    except SiemConfigError as err:
        print(f"p4seg serve: error: --syslog {err}", file=sys.stderr)
        return EXIT_ERROR
    etcd = None
    if args.etcd:
        try:
            etcd = etcd_of(args)
        except InventoryError as err:
            first = err.diagnostics[0].message if err.diagnostics else "cannot be loaded"
            print(f"p4seg serve: error: {args.inventory}: {first}", file=sys.stderr)
            return EXIT_ERROR
        except ValueError as err:
            print(f"p4seg serve: error: --etcd: {err}", file=sys.stderr)
            return EXIT_ERROR
    service = Service(Operations(args, front), options, access, etcd)

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
