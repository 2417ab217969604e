"""The audit log: every change p4seg makes to the switches, in an append-only JSONL file
whose records are hash-chained, so that an edited, removed, inserted or reordered record
is detected by `p4seg audit verify`.

Each record holds `seq` (0, 1, 2, ...), `prev` (the previous record's hash; 64 zeros for
the first) and `hash` = SHA-256 over the record's canonical JSON without `hash`. Anyone can
recompute the chain; to stop a rewrite of the whole file, ship the last hash elsewhere
(`p4seg audit verify` prints it) — the classic limit of a local hash chain.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import hashlib
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

GENESIS = "0" * 64

# Who a change is made for when it is not the login user (an API caller of `p4seg serve`),
# and what else every record made on their behalf carries (the reason, the channel).
_ON_BEHALF: ContextVar[tuple[str, dict[str, object]] | None] = ContextVar(
    "p4seg_audit_on_behalf", default=None
)


# Who else hears of every record appended in this process (serve's metrics and SIEM sinks).
_WATCHERS: list[Callable[[dict[str, object]], None]] = []


def watch(callback: Callable[[dict[str, object]], None]) -> Callable[[], None]:
    """Call `callback` with every record appended from now on (after it is on disk);
    returns the function that stops it. A watcher that raises is reported, never the
    append's caller's problem."""
    _WATCHERS.append(callback)
    return lambda: _WATCHERS.remove(callback) if callback in _WATCHERS else None


def _canonical(record: dict[str, object]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _digest(record: dict[str, object]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


@contextlib.contextmanager
def on_behalf_of(principal: str, **fields: object) -> Iterator[None]:
    """Within this context (this thread or task), `actor()` is `principal` and every
    record appended also carries `fields` (e.g. `via`, `reason`)."""
    token = _ON_BEHALF.set((principal, fields))
    try:
        yield
    finally:
        _ON_BEHALF.reset(token)


def actor() -> str:
    """Who is making the change: the caller set by `on_behalf_of`, else the login user
    and the host."""
    behalf = _ON_BEHALF.get()
    if behalf is not None:
        return behalf[0]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _last(path: Path) -> tuple[int, str]:
    """The next sequence number and the hash to chain to."""
    if not path.exists() or path.stat().st_size == 0:
        return 0, GENESIS
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - (1 << 16)))
        tail = f.read().splitlines()
    last = json.loads(tail[-1])
    return int(last["seq"]) + 1, str(last["hash"])


def seal(seq: int, prev: str, event: str, fields: dict[str, object]) -> dict[str, object]:
    """Record number `seq` chained to `prev`: who, when, what, and its hash (the one record
    format of every store: this file, and etcd in runtime/etcdstore.py)."""
    record: dict[str, object] = {
        "seq": seq,
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "actor": actor(),
        "event": event,
        **(behalf[1] if (behalf := _ON_BEHALF.get()) is not None else {}),
        **fields,
        "prev": prev,
    }
    record["hash"] = _digest(record)
    return record


def canonical(record: dict[str, object]) -> bytes:
    """A record as stored: canonical JSON (sorted keys, no spaces)."""
    return _canonical(record)


def append(path: Path, event: str, **fields: object) -> dict[str, object]:
    """Append one record (who, when, what) to the log; returns it with its hash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # two writers never chain to the same record
        seq, prev = _last(path)
        record = seal(seq, prev, event, fields)
        f.write(_canonical(record) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    for watcher in list(_WATCHERS):
        try:
            watcher(record)
        except Exception as err:
            print(f"p4seg: audit watcher failed: {err!r}", file=sys.stderr)
    return record


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    records: int
    last_hash: str
    problem: str = ""  # the first broken record and why
    line: int = 0


def records(path: Path) -> Iterator[dict[str, object]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def verify(path: Path) -> Verdict:
    """Walk the chain; the first record that does not follow is reported with its line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        return Verdict(False, 0, "", f"cannot read {path}: {err.strerror}")
    except UnicodeDecodeError:
        return Verdict(False, 0, "", f"{path} is not UTF-8 text")
    return check_chain(enumerate(lines, start=1))


def check_chain(stored: Iterable[tuple[int, str | bytes]]) -> Verdict:
    """Walk stored records (position, canonical JSON) from the first: the first that does
    not follow is reported with its position (a file's line, etcd's record number)."""
    prev, count = GENESIS, 0
    for number, line in stored:
        try:
            record = json.loads(line)
            assert isinstance(record, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
            return Verdict(False, count, prev, "not a JSON record", number)
        if record.get("seq") != count:
            return Verdict(
                False, count, prev, f"sequence {record.get('seq')} where {count} belongs "
                "(a record was removed, inserted or moved)", number,
            )  # fmt: skip
        if record.get("prev") != prev:
            return Verdict(False, count, prev, "does not chain to the record before it", number)
        if record.get("hash") != _digest(record):
            return Verdict(
                False, count, prev, "its content does not match its hash (edited)", number
            )
        prev, count = str(record["hash"]), count + 1
    return Verdict(True, count, prev)
