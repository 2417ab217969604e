"""Controller state in etcd: leader election with fencing, shared documents, the audit chain.

Several controllers of one floor share an etcd cluster (Debian's `etcd-server`, reached
with the asyncio client `aetcd`). Keys, under `/p4seg/<floor>/`:

    leader                  the leader's name, attached to its lease (TTL `ttl`, default 3 s)
    state/<document>        the state documents of runtime/store.py (`live`, `allocation`, ...)
    audit/head              {"seq", "hash"} of the last audit record
    audit/records/<seq>     the records, zero-padded so that key order is chain order

**Election.** A controller grants a lease and campaigns with one transaction: create
`leader` only if it is absent, attached to the lease. The winner's P4Runtime election id is
`2**64 + create_revision` of its `leader` key (high word 1, low word the revision): etcd's
revision only grows, so a newer leader always outranks an older one, and every etcd leader
outranks a one-shot `p4seg apply` (election id 10). The leader refreshes its lease every
`ttl / 6`; it holds the leadership only until `last successful refresh sent + ttl - margin`,
so a leader cut off from etcd stops writing before its lease can expire and a standby win.
Standbys watch `leader` and campaign when it is deleted (lease expired or revoked by a
clean stop).

**Fencing.** Every write (a document, an audit record) is one transaction that compares
`leader`'s create_revision with the writer's: a deposed leader's write is refused by etcd
itself (NotLeader), whatever its clock says. A write returns only once etcd committed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import aetcd
import grpc
from aetcd import rpc

from runtime import audit
from runtime.store import (
    Commit,
    Conflict,
    Document,
    NotLeader,
    StoreError,
    StoreUnavailable,
    check_name,
)

log = logging.getLogger("p4seg.etcd")

ELECTION_BASE = 1 << 64  # election id = ELECTION_BASE + create_revision of the leader key
_FLOOR = re.compile(r"[A-Za-z0-9_.-]+")
_PAGE = 500  # audit records per range request (a chain of any length fits gRPC's limits)
REFRESHES = 6  # lease refreshes per TTL
RETRY_EVERY = 0.1  # seconds: while the newest refresh has no answer, send another this often
IN_FLIGHT = 8  # lease refreshes unanswered at once, at most


def election_id(create_revision: int) -> int:
    """The P4Runtime election id of the leader whose `leader` key has this create_revision
    (128 bits: high word 1, low word the revision).

    >>> hex(election_id(42))
    '0x1000000000000002a'
    """
    return ELECTION_BASE + create_revision


def parse_endpoints(text: str) -> tuple[str, ...]:
    """`--etcd URL[,URL...]` (`http://127.0.0.1:2379`, `https://etcd1:2379`, `etcd1:2379`)
    as `host:port` strings; ValueError saying which part is wrong."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        url = urlsplit(part if "://" in part else f"http://{part}")
        try:
            port = url.port
        except ValueError:
            port = None
        if url.scheme not in ("http", "https") or not url.hostname or port is None:
            raise ValueError(f"--etcd: {part!r} is not an etcd endpoint (e.g. 127.0.0.1:2379)")
        if url.path not in ("", "/"):
            raise ValueError(f"--etcd: {part!r}: an endpoint has no path")
        out.append(f"{url.hostname}:{port}")
    return tuple(out)


def wants_tls(text: str) -> bool:
    """Whether `--etcd` names https endpoints (all or none: ValueError if mixed)."""
    schemes = {"https" if p.strip().startswith("https://") else "http" for p in text.split(",")}
    if len(schemes) > 1:
        raise ValueError("--etcd: mixes http:// and https:// endpoints")
    return schemes == {"https"}


RETRY_PAUSE = 0.05  # seconds before a read is asked again (doubling, at most 0.5)


@dataclass(frozen=True, slots=True)
class EtcdOptions:
    """How to reach etcd and how to hold the floor's leadership."""

    endpoints: tuple[str, ...]  # host:port (parse_endpoints)
    floor: str  # the key prefix /p4seg/<floor>/: one election and one state per floor
    name: str = ""  # this controller, as standbys and operators see it (default user@host:pid)
    url: str = ""  # where this controller's API answers (a standby names it to callers)
    ttl: int = 3  # lease seconds (etcd leases are whole seconds)
    margin: float = 0.5  # stop writing this long before the lease could expire
    timeout: float = 2.0  # per etcd request
    tls: bool = False  # TLS (implied by `ca`); without `ca`, the system's CAs verify etcd
    ca: Path | None = None  # TLS: the CA that signed etcd's certificates
    cert: Path | None = None  # mTLS: this controller's certificate and key
    key: Path | None = None

    def __post_init__(self) -> None:
        if not _FLOOR.fullmatch(self.floor):
            raise ValueError(f"floor {self.floor!r}: use letters, digits and `_.-`")
        if not self.endpoints:
            raise ValueError("no etcd endpoint")
        if self.ttl < 1 or not 0 < self.margin < self.ttl / 2:
            raise ValueError(f"lease TTL {self.ttl} s with margin {self.margin} s: need a TTL of "
                             "at least 1 s and a margin between 0 and half the TTL")  # fmt: skip
        if (self.cert is None) != (self.key is None):
            raise ValueError("mTLS needs both a certificate and its key")

    @property
    def who(self) -> str:
        return self.name or f"{audit.actor()}:{os.getpid()}"

    def prefix(self) -> str:
        return f"/p4seg/{self.floor}/"


# -- the connection -----------------------------------------------------------------------


def _target(endpoints: tuple[str, ...]) -> str:
    """One gRPC target for every endpoint (round-robin over the members that answer)."""
    addresses: list[str] = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM):
            ip = str(info[4][0])
            addresses.append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    if not addresses:
        raise StoreUnavailable(f"etcd {','.join(endpoints)}: no address")
    scheme = "ipv6" if all(a.startswith("[") for a in addresses) else "ipv4"
    if scheme == "ipv4" and any(a.startswith("[") for a in addresses):
        addresses = [a for a in addresses if not a.startswith("[")]
    return f"{scheme}:{','.join(dict.fromkeys(addresses))}"


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type information
    """aetcd's client on a channel to every endpoint, with TLS when asked (aetcd itself
    dials one endpoint in clear)."""

    def __init__(self, options: EtcdOptions) -> None:
        channel_options = {
            "grpc.lb_policy_name": "round_robin",
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 1000,
        }
        if options.ca is not None or options.tls:
            channel_options["grpc.ssl_target_name_override"] = options.endpoints[0].rpartition(":")[
                0
            ]
        super().__init__(timeout=options.timeout, options=channel_options)
        self._p4seg = options

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = self._p4seg
        target = _target(options.endpoints)
        if options.ca is None and not options.tls:
            self.channel = rpc.insecure_channel(target, options=self._options.items())
        else:
            try:
                creds = grpc.ssl_channel_credentials(
                    options.ca.read_bytes() if options.ca else None,
                    options.key.read_bytes() if options.key else None,
                    options.cert.read_bytes() if options.cert else None,
                )
            except OSError as err:
                raise StoreError(f"etcd TLS: cannot read {err.filename}: {err.strerror}") from None
            self.channel = rpc.secure_channel(target, creds, options=self._options.items())
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


class Etcd:
    """One connection to a floor's etcd cluster, every request with a deadline and typed
    errors (StoreUnavailable when etcd cannot be reached or has no quorum)."""

    def __init__(self, options: EtcdOptions) -> None:
        self.options = options
        self.client = _Client(options)
        self._prefix = options.prefix()

    def key(self, suffix: str) -> bytes:
        return (self._prefix + suffix).encode()

    async def close(self) -> None:
        await self.client.close()

    async def call(
        self, what: str, method: str, request: object, *, write: bool = False,
        timeout: float | None = None,
    ) -> Any:  # fmt: skip
        """One unary request (`method`: "kvstub.Txn", "leasestub.LeaseGrant", ...);
        StoreUnavailable on no answer (a write may then have been applied: etcd
        transactions are all or nothing, a later read tells which)."""
        await self.client.connect()
        stub, _, name = method.partition(".")
        deadline = self.options.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        end, pause = loop.time() + deadline, RETRY_PAUSE
        while True:
            try:
                return await getattr(getattr(self.client, stub), name)(
                    request, timeout=max(end - loop.time(), 0.01)
                )
            except grpc.aio.AioRpcError as err:
                # A read meeting a raft election (a member died: "leader changed") is asked
                # again until its deadline: reading twice changes nothing. A write is not.
                transient = err.code() is grpc.StatusCode.UNAVAILABLE
                if write or not transient or loop.time() + pause >= end:
                    self._failed(what, err, write)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)

    def _failed(self, what: str, err: grpc.aio.AioRpcError, write: bool) -> NoReturn:
        """The StoreUnavailable or StoreError an etcd error means (see `call`)."""
        code, details = err.code(), err.details() or ""
        where = f"etcd {','.join(self.options.endpoints)}: {what}"
        # etcd answers its own expired deadline as UNKNOWN "context deadline exceeded".
        timed_out = code is grpc.StatusCode.UNKNOWN and "deadline exceeded" in details
        if timed_out or code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ):
            reason = "no answer in time" if code is grpc.StatusCode.DEADLINE_EXCEEDED else details
            unsent = code is grpc.StatusCode.UNAVAILABLE and "connect" in details.lower()
            raise StoreUnavailable(
                f"{where}: etcd unreachable or without quorum ({reason})",
                maybe_applied=write and not unsent,
            ) from None
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED or "too large" in details:
            raise StoreError(
                f"{where}: too large for etcd ({details}); see etcd's --max-request-bytes"
            ) from None
        raise StoreError(f"{where}: {code.name.lower()}: {details}") from None

    async def txn(
        self, what: str, compare: list[Any], success: list[Any], failure: list[Any],
        timeout: float | None = None,
    ) -> Any:  # fmt: skip
        request = rpc.TxnRequest(compare=compare, success=success, failure=failure)
        return await self.call(what, "kvstub.Txn", request, write=True, timeout=timeout)

    async def get(self, suffix: str, *, timeout: float | None = None) -> Any | None:
        """The key's KeyValue (linearizable read) or None."""
        response = await self.call(
            f"read {suffix}",
            "kvstub.Range",
            rpc.RangeRequest(key=self.key(suffix)),
            timeout=timeout,
        )
        return response.kvs[0] if response.kvs else None


def _compare(key: bytes, target: str, value: int) -> Any:
    """`key`'s create_revision / mod_revision / version == value (0 for an absent key)."""
    targets = {"create": rpc.Compare.CREATE, "mod": rpc.Compare.MOD, "version": rpc.Compare.VERSION}
    field = {"create": "create_revision", "mod": "mod_revision", "version": "version"}[target]
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=targets[target], **{field: value})


def _put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def _get(key: bytes) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def _ranged(response: Any, index: int) -> Any | None:
    kvs = response.responses[index].response_range.kvs
    return kvs[0] if kvs else None


# -- leader election ----------------------------------------------------------------------


class Role(enum.Enum):
    LEADER = "leader"
    STANDBY = "standby"


@dataclass(frozen=True, slots=True)
class Leader:
    """Whoever holds the floor's leader key, as last seen."""

    name: str
    create_revision: int  # of the leader key: what every fenced write compares
    url: str = dataclasses.field(default="", kw_only=True)  # its API, if it serves one

    @property
    def election_id(self) -> int:
        return election_id(self.create_revision)


@dataclass(frozen=True, slots=True)
class Leadership(Leader):
    """This controller's term as leader: the leader key it holds and its lease."""

    lease: int


def _leader_of(kv: Any) -> Leader:
    try:
        value = json.loads(kv.value)
        name, url = str(value["name"]), str(value.get("url", ""))
    except (ValueError, KeyError, TypeError, AttributeError):
        name, url = kv.value.decode(errors="replace"), ""
    return Leader(name, int(kv.create_revision), url=url)


Listener = Callable[[Role, Leadership | None], None]


class Elector:
    """Campaigns for the floor's leadership and holds it while it can.

    `start()` runs the campaign in the background; `fence()` is what every write asks first;
    `stop()` resigns (the lease is revoked, so a standby wins at once). Listeners hear every
    change of role (the P4Runtime side becomes primary with `election_id`, or stops).
    """

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.options = etcd.options
        self._key = etcd.key("leader")
        self._term: Leadership | None = None
        self._deadline = 0.0  # monotonic: the leadership holds until then at most
        self.leader: Leader | None = None  # last seen holder (this controller or another)
        self.last_error = ""
        self._listeners: list[Listener] = []
        self._changed = asyncio.Event()  # set and replaced at every change of role
        self._background: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._watch_from = 0  # the revision after the read that lost the last campaign

    # -- what callers ask

    @property
    def role(self) -> Role:
        return Role.LEADER if self._holding() is not None else Role.STANDBY

    @property
    def holds_until(self) -> float | None:
        """Until when (time.monotonic) this controller may act as leader, unless a refresh
        extends it; None when it does not lead."""
        return self._deadline if self._term is not None else None

    def _holding(self) -> Leadership | None:
        if self._term is not None and time.monotonic() < self._deadline:
            return self._term
        return None

    def fence(self) -> Leadership:
        """This controller's leadership, valid now; NotLeader (naming the leader) if it
        holds none or can no longer be sure it does (no lease refresh for ttl - margin)."""
        term = self._holding()
        if term is None:
            holder = self.leader.name if self.leader and self._term is None else None  # not us
            why = (
                "its lease is not refreshed (etcd unreachable?)" if self._term else "it is standby"
            )
            raise NotLeader(
                f"{self.options.who} is not the leader of floor {self.options.floor}: {why}"
                + (f"; the leader is {holder}" if holder else ""),
                holder,
            )
        return term

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def wait_for(self, role: Role, timeout: float) -> None:
        """Until this controller has `role` (TimeoutError after `timeout` s)."""
        async with asyncio.timeout(timeout):
            while self.role is not role:
                await self._changed.wait()

    def deposed(self, leader: Leader | None) -> None:
        """etcd refused a fenced write: someone else holds (or nobody holds) the key."""
        self.leader = leader
        if self._term is not None:
            self._lose(
                f"etcd refused a fenced write (leader now {leader.name if leader else 'none'})"
            )

    # -- running

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(
                self._run(), name=f"p4seg-elector-{self.options.floor}"
            )

    async def stop(self, *, resign: bool = True) -> None:
        """Stop campaigning; a leader resigns (revokes its lease) unless `resign` is False."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        term = self._term
        if term is not None:
            self._term = None
            self._notify()
            if resign:
                with contextlib.suppress(StoreError):
                    await self._revoke(term.lease)

    async def _run(self) -> None:
        while True:
            try:
                if await self._campaign():
                    await self._hold()
                else:
                    await self._wait_vacant()
            except StoreUnavailable as err:
                self.last_error = str(err)
                log.warning("%s", err)
                if self._term is not None and time.monotonic() >= self._deadline:
                    self._lose(str(err))
                await asyncio.sleep(self.options.ttl / 6)  # etcd down: retry, not spin
            except Exception:
                log.exception(
                    "floor %s: the election failed; campaigning again", self.options.floor
                )
                self._lose("the election failed")
                await asyncio.sleep(self.options.ttl / 6)

    async def _campaign(self) -> bool:
        ttl, who = self.options.ttl, self.options.who
        sent = time.monotonic()  # etcd grants the lease after this: it cannot expire earlier
        grant = await self.etcd.call(
            "grant a lease", "leasestub.LeaseGrant", rpc.LeaseGrantRequest(TTL=ttl)
        )
        value = json.dumps({"name": who, "url": self.options.url, "since": time.time()}).encode()
        try:
            response = await self.etcd.txn(
                "campaign",
                [_compare(self._key, "create", 0)],
                [_put(self._key, value, grant.ID), _get(self._key)],
                [_get(self._key)],
            )
        except StoreError:
            with contextlib.suppress(StoreError):  # if the put went through, undo it
                await self._revoke(grant.ID)
            raise
        kv = _ranged(response, 1 if response.succeeded else 0)
        self.leader = _leader_of(kv) if kv is not None else None
        if not response.succeeded:
            self._watch_from = int(response.header.revision) + 1
            with contextlib.suppress(StoreError):
                await self._revoke(grant.ID)
            self._notify()
            return False
        assert kv is not None
        self._term = Leadership(who, int(kv.create_revision), int(grant.ID), url=self.options.url)
        self._deadline = sent + ttl - self.options.margin
        self._lost.clear()
        log.info(
            "%s leads floor %s (election id %d)", who, self.options.floor, self._term.election_id
        )
        self._notify()
        return True

    async def _hold(self) -> None:
        """Refresh the lease every ttl/6 until the leadership is lost. While the newest
        refresh has no answer, another is sent every RETRY_EVERY (at most IN_FLIGHT at once),
        the older ones left running: when etcd loses its raft leader, a keepalive hangs or
        fails until the others elect one (within etcd's election timeout) and etcd then
        extends every lease. The first answer after that — from the latest refresh sent —
        carries the term on, if it comes before the deadline; refreshing often leaves the
        most of the TTL for that."""
        term = self._term
        assert term is not None
        ttl, margin = self.options.ttl, self.options.margin
        interval = ttl / REFRESHES
        pending: dict[asyncio.Task[Any], float] = {}  # refresh -> when it was sent
        lost = asyncio.ensure_future(self._lost.wait())
        newest, next_at = 0.0, time.monotonic() + interval
        try:
            while self._term is term:
                now = time.monotonic()
                if now >= self._deadline:
                    self._lose("no lease refresh in time (etcd unreachable or without quorum)")
                    return
                if now >= next_at and len(pending) < IN_FLIGHT:
                    timeout = min(self.options.timeout, self._deadline - now)
                    pending[asyncio.ensure_future(self._refresh(term.lease, timeout))] = now
                    newest, next_at = now, now + RETRY_EVERY  # unless it answers before
                # With IN_FLIGHT unanswered, wait for one of them (or the deadline): no spin.
                due = next_at if len(pending) < IN_FLIGHT else self._deadline
                wake = min(due, self._deadline) - now
                done, _ = await asyncio.wait(
                    [lost, *pending], timeout=max(0.0, wake), return_when=asyncio.FIRST_COMPLETED
                )
                for task in done - {lost}:
                    sent = pending.pop(task)
                    try:
                        reply = task.result()
                    except StoreUnavailable as err:
                        self.last_error = str(err)  # the next one is sent at RETRY_EVERY
                        continue
                    if reply.TTL <= 0:
                        self._lose("the lease expired")
                        return
                    self._deadline = max(self._deadline, sent + ttl - margin)
                    if sent == newest:
                        next_at = sent + interval
        finally:
            for task in [lost, *pending]:
                task.cancel()

    async def _refresh(self, lease: int, timeout: float) -> Any:
        await self.etcd.client.connect()
        try:
            async with asyncio.timeout(timeout):
                stream = self.etcd.client.leasestub.LeaseKeepAlive(
                    iter([rpc.LeaseKeepAliveRequest(ID=lease)])
                )
                async for reply in stream:
                    return reply
        except TimeoutError:
            raise StoreUnavailable(
                f"etcd {','.join(self.options.endpoints)}: refresh the lease: no answer in time"
            ) from None
        except grpc.aio.AioRpcError as err:
            raise StoreUnavailable(
                f"etcd {','.join(self.options.endpoints)}: refresh the lease: {err.details()}"
            ) from None
        raise StoreUnavailable("etcd closed the lease refresh without an answer")

    async def _revoke(self, lease: int) -> None:
        await self.etcd.call(
            "revoke the lease",
            "leasestub.LeaseRevoke",
            rpc.LeaseRevokeRequest(ID=lease),
            write=True,
        )

    def _lose(self, why: str) -> None:
        term = self._term
        if term is None:
            return
        self._term = None
        if self.leader is not None and self.leader.create_revision == term.create_revision:
            self.leader = None  # not known to lead any more
        self._lost.set()
        log.warning("%s no longer leads floor %s: %s", term.name, self.options.floor, why)
        self.last_error = why
        self._notify()
        # Free the key at once if etcd still has it (a standby need not wait for the TTL).
        task = asyncio.get_running_loop().create_task(self._revoke_quietly(term.lease))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _revoke_quietly(self, lease: int) -> None:
        with contextlib.suppress(StoreError):
            await self._revoke(lease)

    async def _wait_vacant(self) -> None:
        """Until the leader key is deleted (a watch from the read that lost), or one TTL
        passes (then the caller reads again: a broken watch never strands a standby)."""
        watch = None
        try:
            async with asyncio.timeout(self.options.ttl):
                watch = await self.etcd.client.watch(
                    self._key, start_revision=self._watch_from, kind=aetcd.rtypes.EventKind.DELETE
                )
                async for _event in watch:
                    return
        except TimeoutError:
            return
        except aetcd.exceptions.ClientError as err:
            raise StoreUnavailable(f"etcd: watch the leader: {err or type(err).__name__}") from None
        finally:
            if watch is not None:
                with contextlib.suppress(Exception):
                    await watch.cancel()

    def _notify(self) -> None:
        role, term = self.role, self._term
        for listener in self._listeners:
            listener(role, term)
        self._changed.set()
        self._changed = asyncio.Event()


# -- the shared state and the audit chain ------------------------------------------------


class EtcdStore:
    """The floor's state documents and audit chain in etcd (runtime/store.py StateStore),
    every write fenced by the elector's leadership."""

    def __init__(self, etcd: Etcd, elector: Elector | None) -> None:
        self.etcd = etcd
        self.elector = elector  # None: read-only (audit verify, status)
        self._leader_key = etcd.key("leader")
        self._head = etcd.key("audit/head")

    def _fence(self) -> Leadership:
        if self.elector is None:
            raise NotLeader("this store has no elector: it only reads")
        return self.elector.fence()

    def _refused(self, leader_kv: Any | None, term: Leadership) -> NotLeader:
        leader = _leader_of(leader_kv) if leader_kv is not None else None
        if self.elector is not None:
            self.elector.deposed(leader)
        return NotLeader(
            f"etcd refused the write: {term.name} is no longer the leader of floor "
            f"{self.etcd.options.floor} (" + (f"the leader is {leader.name}" if leader else "no leader")
            + ")",
            leader.name if leader else None,
        )  # fmt: skip

    async def read(self, name: str) -> Document | None:
        kv = await self.etcd.get(f"state/{check_name(name)}")
        return None if kv is None else Document(name, kv.value.decode(), int(kv.mod_revision))

    async def snapshot(self) -> tuple[int, dict[str, Document]]:
        """Every document at one revision (a standby's warm view), and that revision."""
        prefix = self.etcd.key("state/")
        response = await self.etcd.call(
            "read the state",
            "kvstub.Range",
            rpc.RangeRequest(key=prefix, range_end=aetcd.utils.prefix_range_end(prefix)),
        )
        docs = {}
        for kv in response.kvs:
            name = kv.key[len(prefix) :].decode()
            docs[name] = Document(name, kv.value.decode(), int(kv.mod_revision))
        return int(response.header.revision), docs

    async def changes(self, after: int) -> AsyncIterator[Document]:
        """Every document write after revision `after` (a snapshot's), in commit order: a
        standby applies them to its snapshot and stays warm. StoreUnavailable when etcd goes
        away, StoreError when `after` was compacted (take a new snapshot)."""
        prefix = self.etcd.key("state/")
        await self.etcd.client.connect()
        try:
            watch = await self.etcd.client.watch(
                prefix, range_end=aetcd.utils.prefix_range_end(prefix), start_revision=after + 1
            )
        except aetcd.exceptions.WatchTimeoutError:
            raise StoreUnavailable("etcd: watch the state: no answer in time") from None
        try:
            async for event in watch:
                name = event.kv.key[len(prefix) :].decode()
                yield Document(name, event.kv.value.decode(), int(event.kv.mod_revision))
        except aetcd.exceptions.RevisionCompactedError as err:
            raise StoreError(
                f"etcd: the state after revision {after} was compacted ({err})"
            ) from None
        except aetcd.exceptions.ClientError as err:
            raise StoreUnavailable(f"etcd: watch the state: {err}") from None
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()

    async def write(self, name: str, text: str, *, expected: int | None = None) -> int:
        done = await self.commit(
            {name: text}, expected=None if expected is None else {name: expected}
        )
        return done.revision

    async def audit_append(
        self, event: str, fields: Mapping[str, object], *, fenced: bool = True
    ) -> dict[str, object]:
        """Chain one record (see `commit`); unfenced, anyone's append is taken."""
        return (await self.commit(events=[(event, fields)], fenced=fenced)).records[0]

    async def commit(
        self,
        docs: Mapping[str, str] | None = None,
        events: Sequence[tuple[str, Mapping[str, object]]] = (),
        *,
        expected: Mapping[str, int] | None = None,
        fenced: bool = True,
    ) -> Commit:
        """Write documents and chain audit records in ONE transaction, fenced by the
        leadership: all of it is stored or none. The records chain to the head as read, and
        the transaction compares the head's mod_revision, so two appenders never chain to
        the same record (the loser reads the new head and tries again). `expected`: the
        revision each named document must still have (0: absent), else Conflict."""
        docs = {check_name(n): t for n, t in (docs or {}).items()}
        if docs and not fenced:
            raise ValueError("state documents are written by the leader only (fenced)")
        term = self._fence() if fenced else None
        keys = {name: self.etcd.key(f"state/{name}") for name in docs}
        guards = [(name, keys[name], rev) for name, rev in (expected or {}).items()]
        what = ", ".join([*(f"write {n}" for n in docs), *(f"audit {e}" for e, _ in events)])
        for _attempt in range(64):
            compare = [_compare(key, "mod", rev) for _, key, rev in guards]
            if term is not None:
                compare.append(_compare(self._leader_key, "create", term.create_revision))
            success = [_put(keys[name], text.encode()) for name, text in docs.items()]
            records: list[dict[str, object]] = []
            if events:
                seq, prev, head_revision = await self._head_of()
                for event, fields in events:
                    records.append(audit.seal(seq, prev, event, dict(fields)))
                    key = self.etcd.key(f"audit/records/{seq:016d}")
                    success.append(_put(key, audit.canonical(records[-1])))
                    seq, prev = seq + 1, str(records[-1]["hash"])
                head = {"seq": seq - 1, "hash": prev}
                success.append(_put(self._head, json.dumps(head).encode()))
                compare.append(_compare(self._head, "mod", head_revision))
            failure = [_get(self._leader_key), *(_get(key) for _, key, _ in guards)]
            response = await self.etcd.txn(what, compare, success, failure)
            if response.succeeded:
                return Commit(int(response.header.revision), tuple(records))
            leader_kv = _ranged(response, 0)
            if term is not None and (
                leader_kv is None or int(leader_kv.create_revision) != term.create_revision
            ):
                raise self._refused(leader_kv, term)
            for i, (name, _, rev) in enumerate(guards, start=1):
                kv = _ranged(response, i)
                if (int(kv.mod_revision) if kv is not None else 0) != rev:
                    raise Conflict(
                        f"state document {name!r} changed since it was read (revision "
                        f"{int(kv.mod_revision) if kv is not None else 0}, expected {rev})"
                    )
            # Only the audit head moved (another appender): chain after it.
        raise StoreError("audit chain: the head kept moving under 64 attempts to append")

    async def _head_of(self) -> tuple[int, str, int]:
        """(next seq, hash to chain to, head key's mod_revision: 0 before the first record)."""
        kv = await self.etcd.get("audit/head")
        if kv is None:
            return 0, audit.GENESIS, 0
        head = json.loads(kv.value)
        return int(head["seq"]) + 1, str(head["hash"]), int(kv.mod_revision)

    async def audit_records(self) -> list[tuple[int, bytes]]:
        """Every stored record (its position from 1, its canonical JSON), in chain order, as
        of one revision."""
        prefix = self.etcd.key("audit/records/")
        end = aetcd.utils.prefix_range_end(prefix)
        out: list[tuple[int, bytes]] = []
        start, revision = prefix, 0
        while True:
            response = await self.etcd.call(
                "read the audit chain",
                "kvstub.Range",
                rpc.RangeRequest(key=start, range_end=end, limit=_PAGE, revision=revision),
            )
            revision = revision or int(response.header.revision)
            out += [(len(out) + i + 1, bytes(kv.value)) for i, kv in enumerate(response.kvs)]
            if not response.more or not response.kvs:
                return out
            start = bytes(response.kvs[-1].key) + b"\0"

    async def audit_verify(self) -> audit.Verdict:
        """runtime/audit.py's walk over the chain in etcd; the head must name its last record."""
        stored = await self.audit_records()
        verdict = audit.check_chain(stored)
        if not verdict.ok:
            return verdict
        seq, prev, _ = await self._head_of()
        if (seq, prev) != (verdict.records, verdict.last_hash):
            return dataclasses.replace(
                verdict, ok=False, problem=f"the head names record {seq - 1} ({prev[:12]}), "
                f"the chain ends at {verdict.records - 1} (records were removed)",
                line=verdict.records,
            )  # fmt: skip
        return verdict


@dataclass(slots=True)
class Replica:
    """One controller's seat on a floor: the connection, the elector and the store."""

    etcd: Etcd
    elector: Elector
    store: EtcdStore

    @classmethod
    def open(cls, options: EtcdOptions) -> Replica:
        etcd = Etcd(options)
        elector = Elector(etcd)
        return cls(etcd, elector, EtcdStore(etcd, elector))

    async def start(self) -> None:
        await self.elector.start()

    async def close(self, *, resign: bool = True) -> None:
        await self.elector.stop(resign=resign)
        await self.etcd.close()


def status(replica: Replica) -> dict[str, Any]:
    """What `GET /v1/status` says about the replication."""
    leader = replica.elector.leader
    out: dict[str, object] = {
        "role": replica.elector.role.value,
        "leader": None
        if leader is None
        else {"name": leader.name, "url": leader.url, "election_id": leader.election_id},
        "etcd": list(replica.etcd.options.endpoints),
    }
    if replica.elector.last_error:
        out["error"] = replica.elector.last_error
    return out
