"""The operations of `p4seg serve`: the verbs an operator runs (p4seg/verbs.py), run for API
callers one at a time.

An operation runs in a worker thread holding the one lock the watch loop holds for each of
its turns, so an API call never races an apply; it runs on behalf of its caller
(runtime/audit.py `on_behalf_of`: the audit records name the principal), with what the
verb prints captured for that thread alone and turned into the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from compiler.diagnostics import InventoryError
from compiler.inventory import Inventory, load_inventory
from p4seg.control import EXIT_OK, Compiled, session_of
from p4seg.observe import Observers, sinks_of
from p4seg.standby import BackupView
from p4seg.up import MATRIX_FILE
from p4seg.verbs import (
    HANDLERS,
    Front,
    PolicyTransform,
    TextTransform,
    Warmed,
    WatchHooks,
    clock,
    read_hits,
    warm,
    watch_loop,
)
from p4seg.webmap import MAX_ALERTS, MapLive, map_document
from runtime import audit, grpc_loops
from runtime.files import file_mark
from runtime.live import STATE_FILE, LiveState
from runtime.siem import SyslogSink
from runtime.store import NotLeader, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from p4seg.replication import Replication

NOTES_FILE = "quarantines.json"  # in the state directory: reason, caller, expiry per host
SERVICE_PRINCIPAL = "p4seg-serve"  # the audit actor of what serve does by itself (expiries)


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
    grants_added: tuple[str, ...] = ()  # ids of the grants the operation added


@dataclass(frozen=True, slots=True)
class QuarantineNote:
    """Why and by whom a host was quarantined through the API, and until when."""

    reason: str
    by: str
    since: float
    expires: float | None = None


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


class Operations:
    """The controller behind the API: the command line's options, the compiler front end,
    one lock for every operation, and the notes serve keeps (quarantine reasons, TTLs)."""

    def __init__(
        self, args: argparse.Namespace, front: Front, observers: Observers | None = None
    ) -> None:
        self.args = args
        # metrics and SIEM (p4seg/observe.py); the --syslog collectors, checked by the caller
        self.observers = observers or Observers([SyslogSink(c).start() for c in sinks_of(args)])
        self.connections: dict[str, dict[str, object]] = {}  # the last counters read, per switch
        self.state_dir = Path(args.state)
        self.lock = threading.Lock()
        self.changed = threading.Event()  # the live state changed: the watch loop reschedules
        self.watched = threading.Event()  # the watch loop finished a turn (its first apply)
        self.last: Compiled | None = None  # the last build that compiled
        self._front = front
        self._restricting = False  # an operation that only takes access away is running
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self.replication: Replication | None = None  # --etcd: set by Service.start
        self._said = ""  # the watch loop's last word on etcd
        self._standby_due = 0.0  # when a standby reads etcd's state again (monotonic)
        self._warm_key: object = None  # the files a standby's build was last compiled from
        self.warmed: Warmed | None = None  # what that compile and proof gave (GET /v1/status)
        self.backup_view: dict[str, BackupView] = {}  # a standby's streams (p4seg/standby.py)
        # The signals in force for GET /v1/status (p4seg/follower.py sets it); under the lock.
        self.active_signals: Callable[[], list[dict[str, object]]] = list

    # The front end of every compile: the last build is what status probes the switches with.
    def front(
        self,
        args: argparse.Namespace,
        text_transform: TextTransform,
        policy_transform: PolicyTransform,
        text: str | None = None,
        write: bool | None = True,
    ) -> Compiled | None:
        compiled = self._front(args, text_transform, policy_transform, text, write)
        if compiled is None and text is None and self.last is not None and self._restricting:
            # Fail closed: a broken edit of the policy file must not stop a quarantine.
            print("p4seg serve: the policy file does not compile: quarantining against the "
                  "last text that did", file=sys.stderr)  # fmt: skip
            compiled = self._front(
                args, text_transform, policy_transform, self.last.policy_text, write
            )
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
        hooks = WatchHooks(self.lock, self.changed, self.watched, self._may_write, self._wrote)
        try:
            watch_loop(self.args, self.front, self._stop, hooks)
        except (Exception, asyncio.CancelledError):  # a bug: without its watch loop nothing
            # would expire; stop (fail closed)
            print("p4seg serve: the watch loop failed; stopping", file=sys.stderr)
            traceback.print_exc()
            failed()

    # -- replicated controllers (--etcd): the leader alone writes, as P4Runtime primary

    def leads(self) -> bool:
        """Whether this controller may write now (always, without --etcd)."""
        return self.replication is None or self.replication.leads()

    def refuse_on_standby(self) -> None:
        """ApiError 503 naming the leader on a standby, before a change is even checked
        against its (stale) view; `operate` asks etcd again under the lock."""
        if not self.leads():
            raise self._standby()

    def _begin(self, *, fresh: bool = True) -> None:
        """Before an operation (under the lock): the state directory is what etcd holds and
        the switches are written with the term's election id; ApiError 503 on a standby
        or without etcd (nothing done). Not `fresh`: the watch loop's turns, which pull
        once per term."""
        if self.replication is None:
            return
        try:
            self.args.election_id = self.replication.begin(fresh=fresh)
        except NotLeader:
            raise self._standby() from None
        except StoreUnavailable as err:
            raise ApiError(
                503, "etcd_unavailable", f"etcd unavailable: nothing was done ({err})"
            ) from None

    def _end(self) -> None:
        """After an operation (under the lock): what it changed is in etcd, or ApiError 503
        (not acknowledged: the next leader brings the switches back to what etcd holds)."""
        if self.replication is None:
            return
        try:
            self.replication.end()
        except NotLeader:
            raise self._standby("deposed during the operation: it was not stored; ") from None
        except StoreError as err:
            raise ApiError(503, "etcd_unavailable", f"etcd unavailable: the operation was not "
                           f"stored and may be undone by the next leader ({err})") from None  # fmt: skip

    def _standby(self, prefix: str = "") -> ApiError:
        assert self.replication is not None
        elector = self.replication.replica.elector
        leader = elector.leader
        where = "no leader is elected yet (retry)" + (
            f"; {elector.last_error}" if elector.last_error else ""
        )
        if leader is not None:
            where = f"the leader is {leader.name}" + (f" at {leader.url}" if leader.url else "")
        who = elector.options.who
        return ApiError(503, "standby", f"{prefix}{who} is a standby: {where}",
                        leader=self.replication.status()["leader"])  # fmt: skip

    def _may_write(self) -> bool:
        """The watch loop's turn runs on the leader only (a standby's would fight it); a
        standby's turns keep its state directory what etcd holds, every `--check` seconds."""
        try:
            self._begin(fresh=False)
        except ApiError as err:
            if err.code == "etcd_unavailable" and err.message != self._said:
                print(f"p4seg serve: watch: {err.message}", file=sys.stderr)
            self._said = err.message  # said once, not every turn
            if err.code == "standby":
                self._refresh_standby()
            return False
        self._said = ""
        return True

    def _refresh_standby(self) -> None:
        assert self.replication is not None
        now = time.monotonic()
        if now < self._standby_due:
            return
        self._standby_due = now + self.args.check
        with contextlib.suppress(StoreUnavailable):  # it answers from its last copy
            self.replication.refresh()
        self._warm()

    def _warm(self) -> None:
        """A standby compiles and proves what the leader applies (p4seg/verbs.py `warm`),
        again whenever the state etcd holds, the policy or the inventory changed: its
        takeover then starts from that build and proof, not cold."""
        from p4seg.replication import SHARED_FILES

        files = [self.state_dir / f for f in SHARED_FILES]
        key = tuple(
            file_mark(f) for f in (*files, Path(self.args.policy), Path(self.args.inventory))
        )
        if key == self._warm_key:
            return
        self._warm_key = key
        self.warmed = warm(self.args, self.front)

    def _wrote(self) -> None:
        try:
            self._end()
        except ApiError as err:  # the next leader (or this one's next turn) converges
            print(f"p4seg serve: watch: {err.message}", file=sys.stderr)

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join()
        self.observers.close()

    def read_hits(self) -> None:
        """Read every rule's counters (worker thread, no lock: reads need no primary) for
        the metrics and the live map's rates; which switches answered, for the metrics."""
        compiled = self.last
        if compiled is None:
            return
        session = session_of("hits", self.args, compiled)
        if session is None:
            return
        hits, failed = read_hits(compiled, session)
        self.observers.hits(hits, clock())
        self.connections = {
            t.name: {"connection": "unreachable" if t.name in failed else "up"}
            for t in session.switches
        }

    def map(self) -> dict[str, object]:
        """GET /v1/map: the live map's document (p4seg/webmap.py) from the last build, the
        live state, the rule rates, the last alerts and the last `up` matrix."""
        compiled = self.last
        if compiled is None:
            raise ApiError(503, "not_ready", "nothing compiled yet: the first apply is running")
        state = self.live()
        raw = self._state_bytes()
        matrix = None
        with contextlib.suppress(OSError, ValueError):
            matrix = json.loads((self.state_dir / MATRIX_FILE).read_text())
        live = MapLive(
            quarantined=tuple(state.quarantined),
            contained=tuple(state.automatic),
            rule_rates=dict(self.observers.rates),
            alerts=_tail_records(self.state_dir / "alerts.jsonl")[-MAX_ALERTS:],
            matrix=matrix if isinstance(matrix, dict) else None,
            generation=int.from_bytes(hashlib.sha256(raw).digest()[:4], "big"),
        )
        return map_document(compiled.policy.uncarved(), compiled.inventory, live)

    def metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition, its state gauges set from the state now."""
        try:
            state = self.live()
        except ApiError:
            state = LiveState()
        build = self.last.build if self.last is not None else None
        self.observers.refresh(state, clock(), build, self.connections)
        return self.observers.metrics.render()

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

    def _grant_ids(self) -> set[str]:
        with contextlib.suppress(ValueError):
            return {g.id for g in LiveState.load(self.state_dir).grants}
        return set()

    def _state_bytes(self) -> bytes:
        with contextlib.suppress(OSError):
            return (self.state_dir / STATE_FILE).read_bytes()
        return b""

    def operate(self, verb: str, principal: str, fields: Mapping[str, object],
                audit_fields: Mapping[str, object], done: Callable[[], None] | None = None,
                handler: Callable[[argparse.Namespace, Front], int] | None = None,
                via: str = "api", check: Callable[[], None] | None = None) -> Outcome:  # fmt: skip
        """Run one verb (p4seg/verbs.py; `handler` instead of the verb's own) under the
        lock, on behalf of `principal` (audited `via`), with its report as JSON, then `done`
        (still under the lock) if it succeeded; call from a worker thread. `check` runs
        first, on the state as etcd holds it (ApiError: nothing done)."""
        args = argparse.Namespace(**{
            **vars(self.args), "verb": verb, "output": "json", "dry_run": False,
            "error_format": "human", "reason": "", **fields,
        })  # fmt: skip
        with (
            self.lock,  # also keeps the watch loop's printing out of the capture
            audit.on_behalf_of(
                principal,
                via=via,
                **{k: v for k, v in audit_fields.items() if v not in (None, "")},
            ),
            _captured() as (stdout, stderr),
        ):
            self._begin()
            if check is not None:  # after the pull: a new leader's copy may predate its term
                check()
            args.election_id = self.args.election_id
            before, grants = self._state_bytes(), self._grant_ids()
            # The engine's verbs may quarantine too (p4seg/follower.py).
            self._restricting = verb in ("quarantine", "contain", "signal")
            try:
                code = (handler or HANDLERS[verb])(args, self.front)
            finally:
                self._restricting = False
            changed = self._state_bytes() != before
            added = tuple(sorted(self._grant_ids() - grants)) if changed else ()
            if code == EXIT_OK and done is not None:
                done()
            self._end()  # acknowledged means stored
        if changed:
            self.changed.set()
        output = stdout.getvalue()
        return Outcome(code, _report_of(output), stderr.getvalue().strip(), output, added)

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
        if not self.leads():  # the leader expires them; nothing expires without one
            return period
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
            signals = self.active_signals()
        records = _tail_records(self.state_dir / "audit.jsonl")
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
        replication: dict[str, object] = (
            {"role": "leader"} if self.replication is None else self.replication.status()
        )
        backups: dict[str, BackupView] = {}
        if replication.get("role") == "standby":  # what its takeover would start from
            replication["standby_build"] = None if self.warmed is None else self.warmed.to_json()
            backups = dict(self.backup_view)
        return {
            **replication,
            "policy": str(self.args.policy),
            "switches": [
                {
                    "name": sw.name,
                    "address": sw.p4rt,
                    **probes.get(sw.name, {"connection": "unknown"}),
                    "applied": applied.get(sw.name),
                    "tables_sha256": state.applied_tables.get(sw.name),
                    "following": self.observers.following(sw.name),
                    **({"backup": backups[sw.name].to_json()} if sw.name in backups else {}),
                }
                for sw in inventory.switches
            ],
            "last_apply": last_apply,
            "grants": [grant_json(g) for g in state.active_grants(now)],
            "quarantined": sorted(state.quarantined),
            "quarantines": [
                {"host": h, "since": _iso(since), **_note_json(notes.get(h))}
                for h, since in sorted(state.quarantined.items())
            ],
            "signals": signals,
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

        results = grpc_loops.run(every())
        return {t.name: r for t, r in zip(session.switches, results, strict=True)}


def _iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat(timespec="seconds")


def grant_json(grant: Any) -> dict[str, object]:
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


def _tail_records(path: Path, tail: int = 1 << 18) -> list[dict[str, Any]]:
    """The JSON records in the last `tail` bytes of a JSONL log (the audit log: a status
    needs the latest; the alerts: the map shows the last)."""
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
