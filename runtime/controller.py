"""The P4Runtime controller: read every switch, plan, and apply plans — on finsy.

finsy's `Switch` does what it does well: the channel, arbitration with our election id,
setting the pipeline when the switch's cookie differs, the stream. p4seg adds its own:
compiled entries as canonical messages, plans as values (runtime/plan.py) and the epoch
update protocol, batched writes with per-update errors, and per-switch concurrency with
bounded time, so that one slow or dead switch never holds up the others.

Reads go through a finsy `P4Client` of their own as raw messages (reading needs no
arbitration): plans compare canonical protobufs, and decoding tens of thousands of entries
into Python objects only to encode them again would cost more than the read. Writes go
through the `Switch`'s public `write`.

A long-lived process (p4seg serve) keeps one finsy session per switch, its follower; an
apply of that process writes through it while it is the switch's primary (`lend`), so an
operation opens no session and the switch's PacketIns keep reaching the follower.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

from finsy import P4Client, P4ClientError, Switch, SwitchOptions
from finsy.grpcutil import GRPCCredentialsTLS
from finsy.p4schema import P4Schema
from finsy.proto import p4i, p4r
from google.protobuf import text_format

from compiler.entries import SwitchTables
from compiler.inventory import Inventory
from compiler.inventory import Switch as InventorySwitch
from compiler.targets import P4INFO_FILE, device_config_file
from p4src.spec import CPU_CLONE_SESSION
from runtime.defaults import DEFAULT_BATCH, DEFAULT_ELECTION_ID
from runtime.entities import canonical_entry
from runtime.plan import (
    Change,
    Desired,
    Held,
    SwitchPlan,
    Tables,
    hold_text_digests,
    plan_switch,
    text_digest,
)

log = logging.getLogger("p4seg.controller")


class ControllerError(Exception):
    """A switch could not be brought to the plan; the message says which and why."""


@dataclass(frozen=True, slots=True)
class ControllerOptions:
    election_id: int = DEFAULT_ELECTION_ID
    role: str = ""
    batch_size: int = DEFAULT_BATCH
    timeout: float = 30.0  # per switch, for the whole plan or apply
    tls: GRPCCredentialsTLS | None = None
    reset_direct_meters: bool = False  # compiler.targets.TargetKind.stale_direct_meters
    # Read every switch in full even when its digest says it holds the build (drift checks).
    full_read: bool = False
    # Write only as `election_id` itself: finsy bids the switch's election_id_past when no
    # primary is connected, which would let a deposed etcd leader outrank its successor.
    fenced: bool = False
    # Asked before every write with `election_id`: raises ControllerError once this
    # controller may no longer write as it (serve --etcd: a leader whose lease may lapse).
    fence: Callable[[int], None] | None = None


@dataclass(frozen=True, slots=True)
class PipelineFiles:
    """The compiled pipeline: P4Info and the target's device config, as files and bytes."""

    p4info_path: Path
    device_config_path: Path

    @classmethod
    def of(cls, build_dir: Path, target: str) -> PipelineFiles:
        files = cls(build_dir / P4INFO_FILE, build_dir / device_config_file(target))
        for path in (files.p4info_path, files.device_config_path):
            if not path.is_file():
                raise ControllerError(f"{path} is missing: compile with --target {target}")
        return files

    def schema(self) -> P4Schema:
        """The compiled P4Info and device config (parsed once per build, not per switch)."""
        return _schema(
            self.p4info_path, self.device_config_path, self.p4info_path.stat().st_mtime_ns
        )

    def device_config_bytes(self) -> bytes:
        """The device config, read once per build."""
        return self.schema().p4blob


@functools.lru_cache(maxsize=8)
def _schema(p4info: Path, device_config: Path, _mtime: int) -> P4Schema:
    info = text_format.Parse(p4info.read_text(), p4i.P4Info())
    return P4Schema(info, device_config.read_bytes())


@dataclass(frozen=True, slots=True)
class SwitchTarget:
    """One switch to control: where it is and what it must hold."""

    name: str
    address: str
    device_id: int
    desired: Desired


def targets(
    inventory: Inventory,
    compiled: Sequence[SwitchTables],
    tables: Tables,
    named: Callable[[str], str] | None = None,
) -> list[SwitchTarget]:
    """The inventory's switches that `compiled` has tables for, with what they must hold.

    `named(switch)`: a text that names the switch's compiled tables exactly (its entries
    file): their digest is taken from it, and they are encoded only when a plan needs them.
    """
    by_name = {s.switch: s for s in compiled}
    hold_text_digests(len(by_name))

    def desired(sw: InventorySwitch) -> Desired:
        tables_of = by_name[sw.name]
        if named is None:
            return Desired.of(tables, tables_of, sw.cpu_port)
        digest = text_digest(named(sw.name), sw.cpu_port)
        return Desired.lazy(tables, tables_of, sw.cpu_port, digest)

    return [
        SwitchTarget(sw.name, sw.p4rt, sw.device_id, desired(sw))
        for sw in inventory.switches
        if sw.name in by_name
    ]


@dataclass(slots=True)
class SwitchReport:
    """What happened on one switch: its plan, what was written, how long it took."""

    switch: str
    address: str
    pipeline: str = ""  # same | missing | different | set
    plan: SwitchPlan | None = None
    written: int = 0
    seconds: float = 0.0
    error: str | None = None
    failed_updates: list[tuple[Change, str]] = field(default_factory=list)
    # Planned in full (its tables read, or known empty: no pipeline); False: its digest said
    # it holds the build, confirmed by one small read.
    in_full: bool = False
    marks: int = 0  # writes of the digest mark (runtime/plan.py), not counted in `written`
    shared: bool = False  # written through this process's long-lived session (SharedPrimary)

    @property
    def ok(self) -> bool:
        return self.error is None


# -- reading ------------------------------------------------------------------------------


def _table_wildcards(tables: Tables) -> list[p4r.Entity]:
    """Every entry of every table; a table with a direct meter is asked for its meters'
    configs too (P4Runtime: a Read returns `meter_config` when the request sets it), one
    entity per table so that no target is asked for a meter a table does not have."""
    out = []
    for table in tables.pipeline.tables:
        e = p4r.Entity()
        e.table_entry.table_id = table.id
        if table.meter is not None:
            e.table_entry.meter_config.SetInParent()
        out.append(e)
    return out


async def read_held(client: P4Client, device_id: int, tables: Tables) -> Held:
    """Everything a switch holds that plans look at, as canonical messages."""
    held = Held()
    request = p4r.ReadRequest(device_id=device_id, entities=_table_wildcards(tables))
    async for reply in client.request_iter(request):
        held.entries.extend(canonical_entry(e.table_entry) for e in reply.entities)
    held.epoch, held.digest = await read_mark(client, device_id, tables)
    clone = p4r.Entity()
    clone.packet_replication_engine_entry.clone_session_entry.session_id = CPU_CLONE_SESSION
    request = p4r.ReadRequest(device_id=device_id, entities=[clone])
    try:
        async for reply in client.request_iter(request):
            for e in reply.entities:
                held.clone = e.packet_replication_engine_entry.clone_session_entry
    except P4ClientError as err:
        if err.code.name != "NOT_FOUND":  # some targets answer a missing session so
            raise
    return held


async def read_mark(client: P4Client, device_id: int, tables: Tables) -> tuple[int, bytes]:
    """One small read: the switch's epoch and the digest it is marked with (b"": none)."""
    epoch = p4r.Entity()
    epoch.table_entry.table_id = tables.epoch_table.id
    epoch.table_entry.is_default_action = True
    out = (0, b"")
    async for reply in client.request_iter(p4r.ReadRequest(device_id=device_id, entities=[epoch])):
        for e in reply.entities:
            params = e.table_entry.action.action.params
            out = (int.from_bytes(params[0].value, "big") if params else 0, e.table_entry.metadata)
    return out


def _unchanged(target: SwitchTarget, epoch: int) -> SwitchPlan:
    """The empty plan of a switch whose digest says it holds `target.desired`."""
    return SwitchPlan(target.name, (), None, (), {}, epoch)


async def read_epoch(client: P4Client, device_id: int, tables: Tables) -> int:
    """The epoch the switch stamps packets with (the `epoch` table's default action)."""
    return (await read_mark(client, device_id, tables))[0]


async def pipeline_state(client: P4Client, device_id: int, expected: P4Schema) -> str:
    """same | missing | different: the switch's pipeline against the compiled one."""
    request = p4r.GetForwardingPipelineConfigRequest(
        device_id=device_id,
        response_type=p4r.GetForwardingPipelineConfigRequest.COOKIE_ONLY,
    )
    try:
        reply: p4r.GetForwardingPipelineConfigResponse = await client.request(request)
    except P4ClientError as err:
        if err.is_pipeline_missing:
            return "missing"
        raise
    if not reply.HasField("config"):
        return "missing"
    return "same" if reply.config.cookie.cookie == expected.p4cookie else "different"


async def pipeline_states(
    switches: Sequence[SwitchTarget], files: PipelineFiles, options: ControllerOptions
) -> dict[str, str]:
    """Each switch's pipeline against the compiled one: same | missing | different |
    unreachable (a cheap check: one cookie read per switch)."""
    schema = files.schema()

    async def one(target: SwitchTarget) -> str:
        try:
            async with P4Client(target.address, options.tls, wait_for_ready=False) as client:
                return await asyncio.wait_for(
                    pipeline_state(client, target.device_id, schema), options.timeout
                )
        except (P4ClientError, TimeoutError, OSError):
            return "unreachable"

    states = await asyncio.gather(*(one(t) for t in switches))
    return {t.name: s for t, s in zip(switches, states, strict=True)}


# -- planning and applying ----------------------------------------------------------------


async def _bounded(
    report: SwitchReport, timeout: float, work: Callable[[], Awaitable[None]]
) -> SwitchReport:
    start = time.monotonic()
    try:
        await asyncio.wait_for(work(), timeout)
    except TimeoutError:
        report.error = f"no answer within {timeout:g} s"
    except P4ClientError as err:
        report.error = f"{err.code.name}: {err.message}"
    except ControllerError as err:
        report.error = str(err)
    except (OSError, ConnectionError) as err:
        report.error = str(err)
    report.seconds = time.monotonic() - start
    return report


async def plan_one(
    target: SwitchTarget, tables: Tables, files: PipelineFiles, options: ControllerOptions
) -> SwitchReport:
    """Read one switch (no arbitration: reading needs none) and plan its update."""
    report = SwitchReport(target.name, target.address)

    async def work() -> None:
        async with P4Client(target.address, options.tls, wait_for_ready=False) as client:
            report.pipeline = await pipeline_state(client, target.device_id, files.schema())
            if report.pipeline != "same":
                report.in_full = True
                report.plan = plan_switch(tables, target.desired, Held())
                return
            if not options.full_read:
                epoch, digest = await read_mark(client, target.device_id, tables)
                if digest and digest == target.desired.digest:
                    report.plan = _unchanged(target, epoch)
                    return
            report.in_full = True
            held = await read_held(client, target.device_id, tables)
            report.plan = plan_switch(tables, target.desired, held)

    return await _bounded(report, options.timeout, work)


async def plan_all(
    switches: Sequence[SwitchTarget],
    tables: Tables,
    files: PipelineFiles,
    options: ControllerOptions,
) -> list[SwitchReport]:
    return list(await asyncio.gather(*(plan_one(t, tables, files, options) for t in switches)))


def _meter_reset(tables: Tables, op: str, table: str, wire: p4r.Update) -> p4r.Update | None:
    """For an entry inserted (`wire`: as sent) into a table with a direct meter and no
    meter config of its own: a DirectMeterEntry MODIFY without config, which resets its
    meter to the default (P4Runtime: what the INSERT alone should do; BMv2 may keep a
    deleted entry's)."""
    entry = wire.entity.table_entry
    if op != "insert" or table not in tables.metered or entry.HasField("meter_config"):
        return None
    u = p4r.Update(type=p4r.Update.MODIFY)
    key = u.entity.direct_meter_entry.table_entry
    key.table_id, key.priority = entry.table_id, entry.priority
    key.match.extend(entry.match)
    return u


async def _write(
    sw: Switch,
    tables: Tables,
    changes: Sequence[Change],
    batch: int,
    report: SwitchReport,
    reset_meters: bool = False,
    fence: Callable[[], None] | None = None,
) -> None:
    for i in range(0, len(changes), batch):
        if fence is not None:
            fence()
        chunk = changes[i : i + batch]
        updates: list[p4r.Update] = []
        owner: list[int] = []  # the change each update on the wire belongs to
        for k, c in enumerate(chunk):
            wire = tables.on_the_wire(c.update())
            updates.append(wire)
            owner.append(k)
            if reset_meters and (reset := _meter_reset(tables, c.op, c.table, wire)) is not None:
                updates.append(reset)
                owner.append(k)
        try:
            await sw.write(updates)
        except P4ClientError as err:
            if not err.details:  # the RPC failed as a whole (DEADLINE_EXCEEDED, UNAVAILABLE)
                raise ControllerError(
                    f"a Write of {len(chunk)} updates failed as a whole ({err.code.name}: "
                    f"{err.message}); which of them the switch applied is known only once it "
                    "is read again (the next apply reads it)"
                ) from None
            failed = sorted({owner[index] for index in err.details})
            for index, detail in sorted(err.details.items()):
                report.failed_updates.append(
                    (chunk[owner[index]], f"{detail.canonical_code.name}: {detail.message}")
                )
            report.written += len(chunk) - len(failed)
            raise ControllerError(
                f"{len(failed)} of {len(chunk)} updates failed "
                f"(first: {report.failed_updates[0][1] if report.failed_updates else err.message})"
            ) from None
        report.written += len(chunk)


@dataclass(slots=True)
class Tenure:
    """What this process knows a switch holds while one long-lived session of it stays the
    switch's primary without a break: only the primary writes, and a restart (the stream
    ends) or another primary (an arbitration update) ends the tenure, so within it the
    switch holds what this session last marked it with, on the pipeline it checked
    (runtime/sessions.py). `digest` b"": nothing known, read the mark."""

    digest: bytes = b""
    epoch: int = 0
    cookie: int = 0  # the pipeline's

    def holds(self, digest: bytes, epoch: int, schema: P4Schema) -> None:
        self.digest, self.epoch, self.cookie = digest, epoch, schema.p4cookie

    def knows(self, schema: P4Schema) -> bool:
        """Whether it knows what the switch holds, on `schema`'s pipeline."""
        return bool(self.digest) and self.cookie == schema.p4cookie


class SharedPrimary(Protocol):
    """A long-lived session of this process with one switch, the primary between its applies
    (p4seg serve's follower, p4seg/follower.py), shared with them."""

    async def lend(
        self, election_id: int, work: Callable[[Switch, P4Client, Tenure], Awaitable[bool]]
    ) -> bool:
        """Run `work` on the session, in the session's own event loop: its `Switch` (for
        writes), a client for raw reads and the session's current Tenure. Only while the
        session is the switch's primary and bids for the controller whose applies use
        `election_id`; False if not (nothing run), or what `work` returns (False: it needs
        a session of its own, to set the pipeline)."""
        ...

    def aside(self) -> AbstractAsyncContextManager[object]:
        """End the session while an apply holds the switch with a session of its own, and
        come back when it is done."""
        ...


# The long-lived sessions of this process, by switch address (register_shared).
_SHARED: dict[str, SharedPrimary] = {}


def register_shared(address: str, session: SharedPrimary | None) -> None:
    """Register (None: forget) the long-lived session with the switch at `address` that
    `apply_one` writes through, or asks to step aside (see SharedPrimary and docs/serve.md)."""
    if session is None:
        _SHARED.pop(address, None)
    else:
        _SHARED[address] = session


async def apply_one(
    target: SwitchTarget,
    tables: Tables,
    files: PipelineFiles,
    options: ControllerOptions,
    progress: Callable[[str, str], None] | None = None,
    planner: Callable[[Tables, Desired, Held], SwitchPlan] = plan_switch,
    known: Desired | None = None,
) -> SwitchReport:
    """Execute the switch's plan (`planner`: the epoch protocol, or runtime/overlay.py's
    overlay writes): on this process's long-lived session with the switch while it is the
    primary (SharedPrimary), else on a session of its own, which wins arbitration and sets
    the pipeline if it differs.

    `known`: what a long-running caller last brought the switch to; a switch still marked
    with its digest holds exactly it, so the plan starts from it instead of a full read."""
    report = SwitchReport(target.name, target.address)
    say = progress or (lambda _switch, _text: None)

    # A switch still holding what the caller brought it to, which differs from the build:
    # it will be written, so the look without arbitration below would be for nothing.
    expected = known is not None and bool(known.digest) and known.digest != target.desired.digest

    def fence() -> None:
        if options.fence is not None:
            options.fence(options.election_id)

    async def work() -> None:
        shared = _SHARED.get(target.address)
        if shared is not None and await shared.lend(options.election_id, on_shared):
            return
        async with P4Client(target.address, options.tls, wait_for_ready=False) as raw:
            if not report.pipeline:  # unless the shared session just read it
                report.pipeline = await pipeline_state(raw, target.device_id, files.schema())
            # A switch marked with this build needs no session of ours: read it without
            # arbitration, and nobody (serve's follower) has to step aside for nothing.
            digest = target.desired.digest
            if digest and report.pipeline == "same" and not expected and not options.full_read:
                epoch, mark = await read_mark(raw, target.device_id, tables)
                if mark == digest:
                    report.plan = _unchanged(target, epoch)
                    return
            async with shared.aside() if shared is not None else contextlib.nullcontext():
                fence()  # arbitrating may set the pipeline: a write too
                async with _arbitrated(target, files, options) as sw:
                    if not sw.is_primary or (
                        options.fenced and sw.election_id != options.election_id
                    ):
                        raise ControllerError(
                            f"not the primary controller (election id {options.election_id}; "
                            f"the primary has {sw.primary_id}): nothing written"
                        )
                    if report.pipeline != "same":
                        say(target.name, f"pipeline {report.pipeline}: set")
                    await on_primary(sw, raw)

    async def on_shared(sw: Switch, raw: P4Client, tenure: Tenure) -> bool:
        if tenure.knows(files.schema()) and not options.full_read:
            report.pipeline = "same"  # nobody but this session could have set another
        else:
            report.pipeline = await pipeline_state(raw, target.device_id, files.schema())
            if report.pipeline != "same":
                return False  # the pipeline is set by a session of our own, which carries it
        report.shared = True
        await on_primary(sw, raw, tenure)
        return True

    async def on_primary(sw: Switch, raw: P4Client, tenure: Tenure | None = None) -> None:
        """The switch's plan, on a session that is its primary (`raw`: reads). `tenure`:
        what a long-lived session knows the switch holds (none: its mark is read)."""
        digest = target.desired.digest
        held = None
        if report.pipeline == "same" and not options.full_read:
            if tenure is not None and tenure.knows(files.schema()):  # nothing changed since
                epoch, mark = tenure.epoch, tenure.digest
            else:
                epoch, mark = await read_mark(raw, target.device_id, tables)
            if mark and mark == digest:
                report.plan = _unchanged(target, epoch)
                if tenure is not None:
                    tenure.holds(mark, epoch, files.schema())
                return
            if mark and known is not None and mark == known.digest:
                held = Held.of(known, epoch, mark)
        if tenure is not None:
            tenure.digest = b""  # unknown from the first write on, until the last mark
        if held is None:
            report.in_full = True
            held = await read_held(raw, target.device_id, tables)
        plan = report.plan = planner(tables, target.desired, held)
        if plan.empty:
            if digest and held.digest != digest:  # right, but not marked (yet): mark it
                await _mark(sw, tables, plan.epoch_after, digest, report, fence)
                if tenure is not None:
                    tenure.holds(digest, plan.epoch_after, files.schema())
            return
        if held.digest:  # from the first write on, the switch holds no known build
            await _mark(sw, tables, held.epoch, b"", report, fence)
        idle = " (idle epoch)" if plan.flip is not None else ""  # else runtime/overlay.py's
        say(target.name, f"writing {len(plan.prepare)} updates{idle}")
        reset = options.reset_direct_meters
        for step in plan.steps():  # each acknowledged before the next is sent
            await _write(sw, tables, step, options.batch_size, report, reset, fence)
        if plan.flip is not None:
            say(target.name, f"flipping to epoch {plan.epoch_after}")
            await _write(sw, tables, [plan.flip], 1, report, fence=fence)
        if plan.finish:
            say(target.name, f"removing the old epoch ({len(plan.finish)} updates)")
            await _write(sw, tables, plan.finish, options.batch_size, report, reset, fence)
        if digest:  # every update took: the switch holds the build
            await _mark(sw, tables, plan.epoch_after, digest, report, fence)
            if tenure is not None:
                tenure.holds(digest, plan.epoch_after, files.schema())

    return await _bounded(report, options.timeout, work)


# How long a session waits out a stream of ours with its election id that the switch has
# not dropped yet (one closed a moment ago): the switch refuses a second live stream with
# one election id, so the new session would come up a backup for nothing.
OWN_STREAM_WAIT_S = 2.0


@contextlib.asynccontextmanager
async def _arbitrated(
    target: SwitchTarget, files: PipelineFiles, options: ControllerOptions
) -> AsyncIterator[Switch]:
    """finsy's Switch for `target`, arbitrated. When the switch names our own election id
    as the primary's but not this stream as primary, it still holds the stream our last
    session closed: open the session again (backing off) until it has dropped it, or
    OWN_STREAM_WAIT_S passes; the caller then sees whatever the switch answered."""
    deadline = time.monotonic() + OWN_STREAM_WAIT_S
    pause = 0.005
    while True:
        async with Switch(
            target.name, target.address, session_options(target, files, options)
        ) as sw:
            own = not sw.is_primary and sw.primary_id == options.election_id
            if not own or time.monotonic() >= deadline:
                yield sw
                return
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.1)


async def _mark(
    sw: Switch,
    tables: Tables,
    epoch: int,
    digest: bytes,
    report: SwitchReport,
    fence: Callable[[], None],
) -> None:
    """Mark the switch as holding `digest` (b"": unknown) on the epoch default, which keeps
    stamping `epoch`: no packet is judged differently."""
    fence()
    u = p4r.Update(type=p4r.Update.MODIFY)
    u.entity.table_entry.CopyFrom(tables.epoch_default(epoch, digest))
    try:
        await sw.write([u])
    except P4ClientError as err:
        raise ControllerError(f"marking the switch's digest failed: {err.message}") from None
    report.marks += 1


def session_options(
    target: SwitchTarget,
    files: PipelineFiles,
    options: ControllerOptions,
    set_pipeline: bool = True,
    fail_fast: bool = True,
) -> SwitchOptions:
    """finsy's options for a session with one switch: our election id, role and TLS; with
    `set_pipeline`, finsy sets the compiled pipeline when the switch's cookie differs;
    without `fail_fast`, finsy reconnects after a failure (long-running sessions)."""
    schema = files.schema()
    return SwitchOptions(
        # The P4Info parsed once per build (finsy's P4Schema takes a parsed P4Info as well as
        # a path, which it would parse again for every switch and every apply: ~9 ms each).
        p4info=cast(Path, schema.p4info),
        p4blob=files.device_config_bytes() if set_pipeline else None,
        device_id=target.device_id,
        initial_election_id=options.election_id,
        role_name=options.role,
        channel_credentials=options.tls,
        fail_fast=fail_fast,
    )


async def apply_all(
    switches: Sequence[SwitchTarget],
    tables: Tables,
    files: PipelineFiles,
    options: ControllerOptions,
    progress: Callable[[str, str], None] | None = None,
    known: Mapping[str, Desired] | None = None,
    planner: Callable[[Tables, Desired, Held], SwitchPlan] = plan_switch,
) -> list[SwitchReport]:
    """Apply every switch's plan concurrently; a failing switch never stops the others.
    `known`: per switch, what the caller last brought it to (apply_one); `planner`: the
    epoch protocol, or runtime/overlay.py's writes of a change that only widens or narrows.

    Switches flip independently: a packet in flight meets each ToR's policy whole, and
    every ToR enforces the whole policy for its hosts, so its fate is its fate under the
    old policy or under the new one (docs/controller.md).
    """
    return list(
        await asyncio.gather(
            *(
                apply_one(t, tables, files, options, progress, planner, (known or {}).get(t.name))
                for t in switches
            )
        )
    )


async def read_tables(
    switches: Sequence[SwitchTarget], tables: Tables, options: ControllerOptions
) -> dict[str, SwitchTables | str]:
    """What every switch holds, as the compiler's values (for verify/trace/test against the
    live switches); an unreadable switch maps to the reason."""
    from compiler.entries import DefaultAction
    from runtime.entities import entry_from_proto

    async def one(target: SwitchTarget) -> SwitchTables | str:
        try:
            async with P4Client(target.address, options.tls, wait_for_ready=False) as client:
                held = await asyncio.wait_for(
                    read_held(client, target.device_id, tables), options.timeout
                )
        except (P4ClientError, TimeoutError, OSError) as err:
            return str(err) or type(err).__name__
        entries = tuple(entry_from_proto(tables.pipeline, e) for e in held.entries)
        epoch = DefaultAction("epoch", "set_epoch", (("value", held.epoch),))
        return SwitchTables(target.name, "", target.device_id, entries, (epoch,))

    results = await asyncio.gather(*(one(t) for t in switches))
    return {t.name: r for t, r in zip(switches, results, strict=True)}
