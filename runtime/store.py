"""Where the controller keeps its state: one small protocol, two stores.

The state is a handful of JSON documents (grants and quarantines in `live`, the identity
`allocation`, `signals`, the policy version each switch was last brought to in
`applied/<switch>`) and the hash-chained audit log. The embedded default keeps them in the
state directory (`DirStore`: `live.json`, `allocation.json`, `audit.jsonl`, ...); several
controllers share them in etcd (runtime/etcdstore.py `EtcdStore`), where every write is
fenced by the leader's election key. Both answer the same calls, so a caller is written
once:

    doc = await store.read(LIVE)              # Document | None
    rev = await store.write(LIVE, text)       # acknowledged = stored
    record = await store.audit_append("quarantine", {"host": "algo1"})
    verdict = await store.audit_verify()
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from compiler.allocation import Allocation
from runtime import audit
from runtime.files import write_atomic
from runtime.live import LiveState

LIVE = "live"  # grants, quarantines, `for` rule starts (runtime/live.py LiveState)
ALLOCATION = "allocation"  # rule ids and identity tags (compiler/allocation.py)
SIGNALS = "signals"  # EDR/IdP signals that change what a host may reach
APPLIED = "applied/"  # + switch name: the policy version that switch was last brought to

_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class StoreError(Exception):
    """The state store refused or failed an operation; the message says which and why."""


class StoreUnavailable(StoreError):
    """The store could not be reached or has no quorum. For a write, `maybe_applied` says
    whether the request may have reached it (a transaction is all or nothing: it is then
    either wholly applied or not at all, which a later read tells)."""

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class NotLeader(StoreError):
    """This controller does not hold the floor's leadership (any more): its write was
    refused. `leader` names the holder when known."""

    def __init__(self, message: str, leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader


class Conflict(StoreError):
    """A write expected a document revision that is no longer current (someone wrote it
    since it was read)."""


@dataclass(frozen=True, slots=True)
class Document:
    """One state document as read: its text and the revision a guarded write compares."""

    name: str
    text: str
    revision: int


@dataclass(frozen=True, slots=True)
class Commit:
    """What one commit stored: the store's revision after it, and the audit records as
    chained."""

    revision: int
    records: tuple[dict[str, object], ...] = ()


def _revision(text: str) -> int:
    """A document's revision in the state directory: 63 bits of its SHA-256, never 0."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8]) >> 1 | 1


def check_name(name: str) -> str:
    """A document name (`live`, `applied/tor-alg`), or ValueError saying what is wrong."""
    if not _NAME.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
        raise ValueError(
            f"state document name {name!r}: use letters, digits, `_.-` and `/` between parts"
        )
    return name


class StateStore(Protocol):
    """What the controller needs from where its state lives."""

    async def read(self, name: str) -> Document | None:
        """The document `name` as last acknowledged (None if never written)."""
        ...

    async def write(self, name: str, text: str, *, expected: int | None = None) -> int:
        """Store `text` as `name` and return its new revision once it is stored; with
        `expected`, only if the document is still at that revision (0: absent), else
        Conflict."""
        ...

    async def audit_append(self, event: str, fields: Mapping[str, object]) -> dict[str, object]:
        """Chain one audit record (runtime/audit.py format) and return it once stored."""
        ...

    async def commit(
        self,
        docs: Mapping[str, str] | None = None,
        events: Sequence[tuple[str, Mapping[str, object]]] = (),
    ) -> Commit:
        """Write documents and chain audit records together (etcd: in one transaction)."""
        ...

    async def audit_verify(self) -> audit.Verdict:
        """Walk the whole audit chain."""
        ...


async def load_live(store: StateStore) -> tuple[LiveState, int]:
    """The live state and its revision (an empty state at revision 0 before any write)."""
    doc = await store.read(LIVE)
    if doc is None:
        return LiveState(), 0
    return LiveState.from_json(doc.text, f"state document {LIVE!r}"), doc.revision


async def load_allocation(store: StateStore) -> tuple[Allocation, int]:
    """The allocation and its revision (empty at revision 0 before the first apply);
    AllocationError when the stored one cannot be used."""
    doc = await store.read(ALLOCATION)
    if doc is None:
        return Allocation(), 0
    return Allocation.from_json(doc.text, f"state document {ALLOCATION!r}"), doc.revision


class DirStore:
    """The state directory as a StateStore (one controller: nothing to fence). A document
    is `NAME.json` (`live.json`, `allocation.json`, `applied/tor-alg.json`), the audit log
    `audit.jsonl`; a document's revision is drawn from its content's SHA-256 (file times
    are too coarse to tell two quick writes apart)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def _path(self, name: str) -> Path:
        return self.state_dir / f"{check_name(name)}.json"

    async def read(self, name: str) -> Document | None:
        return await asyncio.to_thread(self._read, name)

    def _read(self, name: str) -> Document | None:
        path = self._path(name)
        try:
            text = path.read_text(encoding="utf-8")
            return Document(name, text, _revision(text))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise StoreError(f"{path}: cannot read ({err})") from None

    async def write(self, name: str, text: str, *, expected: int | None = None) -> int:
        return await asyncio.to_thread(self._write, name, text, expected)

    def _write(self, name: str, text: str, expected: int | None) -> int:
        path = self._path(name)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # read-compare-replace as one step
            if expected is not None:
                current = self._read(name)
                if (current.revision if current else 0) != expected:
                    raise Conflict(f"{path}: changed since it was read")
            try:
                write_atomic(path, text)
            except OSError as err:
                raise StoreError(f"{path}: cannot write ({err.strerror})") from None
            return _revision(text)

    async def audit_append(self, event: str, fields: Mapping[str, object]) -> dict[str, object]:
        path = self.state_dir / "audit.jsonl"
        return await asyncio.to_thread(lambda: audit.append(path, event, **fields))

    async def audit_verify(self) -> audit.Verdict:
        return await asyncio.to_thread(audit.verify, self.state_dir / "audit.jsonl")

    async def commit(
        self,
        docs: Mapping[str, str] | None = None,
        events: Sequence[tuple[str, Mapping[str, object]]] = (),
    ) -> Commit:
        """One after the other (one controller: no one to interleave with)."""
        revision = 0
        for name, text in (docs or {}).items():
            revision = await self.write(name, text)
        records = [await self.audit_append(event, fields) for event, fields in events]
        return Commit(revision, tuple(records))


class StateMirror:
    """The state directory as the working copy of a shared store, for verbs that read and
    write files (p4seg/verbs.py): `pull()` before an operation makes the files what the
    store holds; `push()` after it commits the documents that changed and the audit records
    the operation appended to `audit.jsonl`, in one commit (etcd: one fenced transaction),
    so an operation's state and its audit record are stored together or not at all.

    Document `NAME` is the file `NAME.json` (as DirStore names them). The local audit log
    stays the working copy's own; its new records are chained into the store's chain with
    their fields (time, actor, event, ...) as written."""

    def __init__(self, store: StateStore, state_dir: Path, names: Sequence[str]) -> None:
        self.store = store
        self.state_dir = state_dir
        self.names = tuple(check_name(n) for n in names)
        self._known: dict[str, str | None] = {}  # as last pulled or pushed
        self._audited = 0  # records of audit.jsonl already in the store (or pulled past)
        # Its own thread for reading the audit log: serve's callers wait for its lock in the
        # loop's default pool, and a pull or push under that lock must never wait for them.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="p4seg-mirror")

    def _path(self, name: str) -> Path:
        return self.state_dir / f"{name}.json"

    def _local(self, name: str) -> str | None:
        try:
            return self._path(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def _records(self) -> list[dict[str, object]]:
        path = self.state_dir / "audit.jsonl"
        return list(audit.records(path)) if path.exists() else []

    async def _read_records(self) -> list[dict[str, object]]:
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._records)

    async def pull(self) -> None:
        """Make the files what the store holds (a document it lacks: no file)."""
        for name in self.names:
            doc = await self.store.read(name)
            text = None if doc is None else doc.text
            if text != self._local(name):
                if text is None:
                    self._path(name).unlink(missing_ok=True)
                else:
                    write_atomic(self._path(name), text)
            self._known[name] = text
        self._audited = len(await self._read_records())

    async def push(self) -> Commit | None:
        """Commit what changed since the last pull or push (None: nothing did)."""
        docs = {}
        for name in self.names:
            text = self._local(name)
            if text is not None and text != self._known.get(name):
                docs[name] = text
        records = (await self._read_records())[self._audited :]
        if not docs and not records:
            return None
        events = [
            (
                str(r["event"]),
                {k: v for k, v in r.items() if k not in ("seq", "prev", "hash", "event")},
            )
            for r in records
        ]
        done = await self.store.commit(docs, events)
        self._known.update(docs)
        self._audited += len(records)
        return done
