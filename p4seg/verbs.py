"""The controller's verbs, registered on `p4seg`'s command line by p4seg/cli.py:

    plan apply                           make the switches hold the compiled policy
    grant revoke quarantine release      live operations, each audited and applied at once
    watch                                re-apply on policy edits and on schedule
    alerts hits                          evidence from the switches
    audit verify | show                  the hash-chained change log

Every verb that changes the switches goes through `_apply`: the live state (grants,
quarantines) turns the policy into the effective policy, the controller applies it with
the epoch protocol, and one audit record says who changed what, when, and how it went.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import hashlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack, nullcontext
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from compiler.inventory import Inventory
from compiler.memo import collection_paused
from compiler.model import Policy
from compiler.resolve import parse_duration
from p4seg.control import (
    EXIT_ERROR,
    EXIT_OK,
    Compiled,
    Session,
    _record_allocation,
    _rule_lines,
    applied_here,
    applied_rules,
    print_reports,
    record_applied,
    remember_applied,
    report_json,
    run,
    session_of,
)
from p4seg.spines import follow_spines
from runtime import audit, grpc_loops
from runtime.alerts import (
    Alert,
    RuleHits,
    follow,
    hits_by_rule,
    read_counters,
    read_red_drops,
)
from runtime.audit import actor
from runtime.controller import SwitchReport, pipeline_states
from runtime.entities import describe_entry
from runtime.files import write_atomic
from runtime.live import (
    Grant,
    GrantFlow,
    LiveState,
    OperationError,
    QuarantineHost,
    ReleaseHost,
    RevokeGrant,
    effective_policy,
    in_force_report,
    next_change,
    note_applied,
    operate,
    parse_moment,
    policy_text_with_grants,
)

if TYPE_CHECKING:
    from compiler.differential import Monotone, OverlayChange
    from compiler.entries import SwitchTables
    from compiler.inventory import Host
    from compiler.verify import Counterexample, ProofRecord, Proven
    from p4seg.proven import Kept
    from runtime.etcdstore import EtcdOptions

# p4seg/cli.py supplies the front end: load, transform the text, check, transform the
# policy, compile and write the build; it reports every diagnostic itself (None: failed).
TextTransform = Callable[[str], str]
PolicyTransform = Callable[[Policy, Inventory], Policy]


class Front(Protocol):
    """compiler front end of p4seg/cli.py; `text` replaces the policy file's text."""

    def __call__(
        self,
        args: argparse.Namespace,
        text_transform: TextTransform,
        policy_transform: PolicyTransform,
        text: str | None = None,
        write: bool | None = True,
    ) -> Compiled | None: ...


# -- applying the effective policy --------------------------------------------------------


def clock() -> float:
    """The controller's clock (tests move it to put a `during` window in or out of force)."""
    return time.time()


def _compile(
    args: argparse.Namespace,
    front: Front,
    state: LiveState,
    now: float,
    text: str | None = None,
    write: bool | None = True,
) -> Compiled | None:
    return front(
        args,
        lambda file_text: policy_text_with_grants(file_text, state, now),
        lambda policy, inv: effective_policy(policy, state, now, {h.name: h.ip for h in inv.hosts}),
        text,
        write,
    )


def _summary(reports: list[SwitchReport]) -> dict[str, object]:
    return {
        r.switch: {
            "ok": r.ok,
            "written": r.written,
            "seconds": round(r.seconds, 3),
            **({"error": r.error} if r.error else {}),
            **(
                {
                    "tables": {
                        name: [len(d.added), len(d.changed), len(d.removed)]
                        for name, d in r.plan.diff.items()
                    }
                }
                if r.plan is not None and r.plan.diff
                else {}
            ),
        }
        for r in reports
    }


def _apply(
    verb: str, args: argparse.Namespace, front: Front, state: LiveState, event: dict[str, object]
) -> int:
    return _apply_compiled(verb, args, front, state, event)[0]


def _apply_compiled(
    verb: str,
    args: argparse.Namespace,
    front: Front,
    state: LiveState,
    event: dict[str, object],
    text: str | None = None,
) -> tuple[int, Compiled | None]:
    """Apply the effective policy (of `text`, when given, instead of the policy file's),
    save the state if it took, and audit what happened."""
    moment = clock()
    expired = state.prune(moment)
    with ExitStack() as enforcing:
        # No cyclic collection on the path to enforcement (compile, proof, writes): a full
        # one walks the build and its memos (millions of objects) and finds nothing. It
        # may run once the switches have answered (`_apply_written` ends the pause).
        enforcing.enter_context(collection_paused())
        # The switches are set from the build directory's pipeline files: when they are new
        # the front end writes the build first; otherwise it is written after the switches,
        # off the path to enforcement (as a quarantine's overlay is), whatever the outcome —
        # the build is what they hold, or what was refused.
        compiled = _compile(args, front, state, moment, text, write=None)
        if compiled is None:
            return EXIT_ERROR, None
        try:
            call = (verb, args, state, event)
            code = _apply_written(call, compiled, moment, expired, enforcing.close)
        finally:
            written = compiled.write()
    return (code if written else EXIT_ERROR), compiled


def _apply_written(
    call: tuple[str, argparse.Namespace, LiveState, dict[str, object]],
    compiled: Compiled,
    moment: float,
    expired: list[Grant],
    enforced: Callable[[], None] = lambda: None,
) -> int:
    """`_apply_compiled` once compiled: prove, write the switches, keep the state, audit.
    `call`: the verb, its command line, the live state and the audit event; `enforced`:
    called once the switches have answered (or nothing is to be written)."""
    verb, args, state, event = call
    state_dir = Path(args.state)
    # What was compiled, as it was compiled: a later edit of the file (under `watch`) must
    # not be hashed in its place.
    operations = in_force_report(compiled.policy, state, moment)
    before = _held_proven(state_dir)  # what the switches hold, if this process proved it
    proof = "skipped (--no-verify)" if getattr(args, "no_verify", False) else None
    later: list[Callable[[], None]] = []  # the proof's record, once the switches answered
    proven_here = proof is None and (
        (proof := _proven(verb, compiled, state_dir, later=later)) is not None
    )
    kept = _KEPT.pop(state_dir.resolve(), None)  # what that proof found in the state
    if proof is None:
        audit.append(
            state_dir / "audit.jsonl",
            verb,
            **event,
            policy=str(args.policy),
            policy_sha256=hashlib.sha256(compiled.policy_text.encode()).hexdigest(),
            result="refused: the compiled tables are not proven to implement the policy",
        )
        return EXIT_ERROR
    from compiler.differential import same_inventory

    old = None if before is None else before[2]
    if before is not None and not same_inventory(before[1], compiled.inventory):
        old = None
    if kept is not None and proven_here and old is None:
        old = _from_kept(compiled, kept)
    change = _monotone(old, compiled)
    only = _changed_only(verb, args, compiled, state, change)
    # The new state first: a controller killed after the writes restarts with the state the
    # switches were given (a quarantine or a revoke kept, never undone by the restart).
    code, reports = run(verb, args, compiled, change=change, only=only,
                        before_writing=lambda: state.save(state_dir))  # fmt: skip
    enforced()
    for step in later:
        step()
    if not proof.startswith("skipped"):  # after the writes: kept for the next process
        _keep_proven(state_dir, compiled)
    dry = getattr(args, "dry_run", False)
    changed = any(r.written for r in reports)
    if reports and not dry:
        if code == EXIT_OK:
            note_applied(compiled.policy, state, moment)
            if only is not None or len(reports) == len(compiled.inventory.switches):
                state.applied_schedule = _schedule(compiled, state, moment)  # all hold it
        for r in reports:  # what each switch holds now (unknown after a failure)
            if r.ok:
                state.applied_tables[r.switch] = tables_digest(compiled, r.switch)
            else:
                state.applied_tables.pop(r.switch, None)
        state.save(state_dir)
    if (changed or event or code == EXIT_ERROR or expired) and not dry and reports:
        audit.append(
            state_dir / "audit.jsonl",
            verb,
            **event,
            policy=str(args.policy),
            policy_sha256=hashlib.sha256(compiled.policy_text.encode()).hexdigest(),
            compiled_sha256=compiled.build.report.get("policy_sha256"),
            operations_sha256=operations.digest(),
            proof=proof,
            expired_grants=[g.id for g in expired],
            result="ok" if code == EXIT_OK else "failed",
            switches=_summary(reports),
        )
    return code


def _monotone(old: Mapping[str, SwitchTables] | None, compiled: Compiled) -> Monotone | None:
    """The change from the tables of a proven build the switches hold (`old`, on the same
    floor) to `compiled`, when it only widens or only narrows (a grant, a revoke, an allow
    added), or adds permits and removes others with no identity changed (a rule's port
    edited): written without an epoch flip (compiler/differential.py `monotone_change`)."""
    from compiler.differential import monotone_change

    if old is None:
        return None
    change = monotone_change(old, {sw.switch: sw for sw in compiled.build.switches})
    return None if isinstance(change, str) else change


def _from_kept(compiled: Compiled, kept: Kept) -> Mapping[str, SwitchTables]:
    """A new process's start from the proven build the state directory keeps (`kept`, on
    `compiled`'s floor): each switch whose tables differ is planned from the kept ones
    when its mark says it holds them (the mark is their entries file's digest), as a
    long-running controller plans from what it applied; the kept tables, for `_monotone`."""
    from runtime.plan import Desired, Tables, text_digest

    held = applied_here(compiled)
    tables = Tables(compiled.build.target.pipeline)
    for sw in compiled.inventory.switches:
        text = kept.texts.get(sw.name)
        if text is not None and sw.name not in held:
            old = kept.recorded.switches[sw.name]
            held[sw.name] = Desired.lazy(tables, old, sw.cpu_port, text_digest(text, sw.cpu_port))
    return kept.recorded.switches


def _changed_only(
    verb: str,
    args: argparse.Namespace,
    compiled: Compiled,
    state: LiveState,
    change: Monotone | None,
) -> frozenset[str] | None:
    """For a grant or a revoke, the switches `change` touches, when every other switch was
    last brought to the tables the build gives it (the state's digests): only those are
    written (and read); None: every switch the command line selects (an `apply` confirms
    them all)."""
    if verb not in ("grant", "revoke") or change is None or not change.changes:
        return None
    if getattr(args, "switch", []) or getattr(args, "dry_run", False):
        return None
    if any(
        state.applied_tables.get(sw.name) != tables_digest(compiled, sw.name)
        for sw in compiled.inventory.switches
        if sw.name not in change.changes and sw.name not in compiled.inventory.down
    ):
        return None
    return frozenset(change.changes)


PROOF_FILE = "proof.json"  # in the state directory: what the last proven build was proven for
# The last build proven in this process per state directory, with its record: a long-running
# controller (watch, serve) proves the next change by the pairs it can touch.
_PROVEN: dict[Path, tuple[ProofRecord, Proven]] = {}
# The records of the last builds proven in this process per state directory: a build whose
# record is one of them was proven (a release back to the build before a quarantine).
_RECORDS: dict[Path, list[tuple[ProofRecord, Mapping[str, SwitchTables]]]] = {}
_KEEP_RECORDS = 4
# The proven build a new process found in the state directory while proving (p4seg/proven.py),
# until the apply that follows the proof takes it.
_KEPT: dict[Path, Kept] = {}


def _remember(state_dir: Path, record: ProofRecord, proven: Proven) -> None:
    key = state_dir.resolve()
    _PROVEN[key] = (record, proven)
    kept = [r for r in _RECORDS.get(key, []) if r[0] != record][-(_KEEP_RECORDS - 1) :]
    _RECORDS[key] = [*kept, (record, proven[2])]


def _earlier(state_dir: Path, record: ProofRecord | None) -> Mapping[str, SwitchTables] | None:
    """The switches of the build this process proved a few builds ago whose proof record is
    `record` (the same tables), if there is one."""
    held = _RECORDS.get(state_dir.resolve(), ())
    return next((switches for r, switches in held if r == record), None)


def _proven(
    verb: str,
    compiled: Compiled,
    state_dir: Path,
    *,
    save: bool = True,
    later: list[Callable[[], None]] | None = None,
) -> str | None:
    """Whether the compiled tables implement the effective policy (compiler/verify.py):
    how it was proven, or None — and why, on stderr. "full"; "differential: rule by rule
    on N ToRs" when this process proved the last build rule by rule (its ToRs' proofs
    updated by what changed, compiler/rule_proof.py); "differential: N pairs" when
    this process proved the build the state directory last recorded and still holds its
    tables (only the (sender, destination) pairs the change can touch are walked,
    compiler/differential.py); "differential: ToRs" when only the record is at hand (the
    changed ToRs' packets); EARLIER when the build is one this process proved a few
    builds ago (its proof record: the same rules, tables and inventory). A change is
    written only once it is proven (fail closed). Not `save`: the proof is remembered in
    this process only, the state directory's record left as it is (a standby's). `later`:
    the record's writing is put there (an apply writes it once the switches have answered:
    a record a moment late names a build proven before, which is all the next proof by
    difference asks of it)."""
    from compiler.rule_proof import carry_proofs
    from compiler.verify import differential_scope, keep_proofs_by_rules, proof_record, verify
    from p4seg import proven

    switches = {sw.switch: sw for sw in compiled.build.switches}
    record = proof_record(compiled.policy, compiled.inventory, switches)
    path = state_dir / PROOF_FILE
    before = _recorded_proof(state_dir)  # unreadable: None, prove everything
    held = _PROVEN.get(state_dir.resolve())
    previous = held[1] if held is not None and before is not None and held[0] == before else None

    def keep() -> None:
        if later is None:
            _write_record(path, record)
        else:
            later.append(partial(_write_record, path, record))

    if (earlier := _earlier(state_dir, record)) is not None:  # a revoke, back to before the grant
        carry_proofs(earlier, switches)  # the next grant is proven from them again
        if previous is not None:  # and what they lack, from the build proven last
            keep_rules = partial(_keeping, partial(keep_proofs_by_rules, compiled.policy,
                                 compiled.inventory, switches, previous))  # fmt: skip
            if later is None:
                keep_rules()
            else:
                later.append(keep_rules)  # once the switches have answered
        if save:
            keep()
        _remember(state_dir, record, (compiled.policy, compiled.inventory, switches))
        return EARLIER
    roles = {s.name: s.role for s in compiled.inventory.switches}
    scope, recorded = None, None
    if previous is None and before is not None:
        scope = differential_scope(before, record, roles)
        kept = proven.load(state_dir, before, compiled)  # a new process: the build kept
        recorded = None if kept is None else (kept.recorded, record)
        if save and kept is not None and before.inventory == record.inventory:
            _KEPT[state_dir.resolve()] = kept  # for the apply that follows (`_from_kept`)
    result = verify(
        compiled.policy, compiled.inventory, switches, scope, previous=previous, recorded=recorded
    )
    if not result.proven:
        _refused(verb, result.counterexamples)
        return None
    if save:
        keep()
    _remember(state_dir, record, (compiled.policy, compiled.inventory, switches))
    if result.by_rules is not None and result.pairs is not None:  # from the last proof
        tors = result.by_rules.tors
        left = f", {result.pairs} pairs" if result.pairs else ""
        return f"differential: rule by rule on {tors} ToR{'' if tors == 1 else 's'}{left}"
    if result.pairs is not None and recorded is not None:
        return f"differential: {result.pairs} pairs (from the proven build the state keeps)"
    if result.pairs is not None:
        return f"differential: {result.pairs} pairs"
    if scope is None:
        return "full"
    return f"differential: {', '.join(sorted(scope)) or 'nothing changed'}"


AHEAD_PAUSE = 0.02  # seconds between two turns of watch_loop while ToRs are proven ahead
# Per state directory, the build whose ToRs are proven ahead and those tried (`prove_ahead`).
_AHEAD: dict[Path, tuple[Mapping[str, SwitchTables], set[str]]] = {}


def prove_ahead(args: argparse.Namespace) -> str | None:
    """Between a long-running controller's operations (watch_loop, after each turn): give
    one more ToR of the build it proved last, if that build is what the switches hold,
    the proof by rules the next change is proven from (compiler/verify.py
    `prove_tor_ahead`). A build proven by pairs (a new process's first apply, a change of
    routing) keeps none, and the first grant on a rack would walk its ToRs' routes. The
    ToR tried, or None: nothing left to do (or --no-verify). A failure (a bug) is a
    warning, and the build's other ToRs are left as they are."""
    from compiler.rule_proof import holds_proof
    from compiler.verify import prove_tor_ahead

    state_dir = Path(args.state)
    held = None if getattr(args, "no_verify", False) else _held_proven(state_dir)
    if held is None or held[0].quarantine is not None:
        return None  # (a proof by difference does not start from a quarantined build)
    policy, inventory, switches = held
    key = state_dir.resolve()
    if key not in _AHEAD or _AHEAD[key][0] is not switches:
        _AHEAD[key] = (switches, set())
    tried = _AHEAD[key][1]
    roles = {s.name: s.role for s in inventory.switches}
    tor = next((name for name, sw in sorted(switches.items())
                if roles.get(name) == "tor" and name not in tried and not holds_proof(sw)),
               None)  # fmt: skip
    if tor is None:
        return None
    tried.add(tor)
    try:
        prove_tor_ahead(policy, inventory, switches, tor)
    except Exception as err:  # what the next change is proven from, not what holds now
        tried.update(switches)
        print(f"p4seg: warning: proving {tor} ahead failed ({err!r}); the next change "
              "touching a ToR without a proof by rules walks its routes", file=sys.stderr)  # fmt: skip
    return tor


def settle_heap() -> None:
    """A full garbage collection now, while a long-running controller is idle (watch_loop:
    its first idle turn, and the first after ToRs were proven ahead). Its builds, proofs
    and memos (millions of objects at 48 ToRs) reach the oldest generation spliced, not
    counted (compiler/memo.py `collection_paused`), so the collector's threshold for a full
    collection stays what the heap was at the last one: the next came within a few
    operations and took one of them about a second longer. After one here, it waits for
    the heap to grow by a quarter (60 grants and revokes at 48 ToRs without one:
    bench/README.md)."""
    gc.collect()


def _keeping(keep: Callable[[], None]) -> None:
    """`keep()`: what the next change is proven from, not what this one needs. It runs
    after the switches have answered and before the state and the audit are written, so
    a failure there (a bug) is reported, not raised: the next change is proven by pairs."""
    try:
        keep()
    except Exception as err:  # (the audit record must still be written)
        print(f"p4seg: warning: the proofs by rules were not kept ({err!r}); the next "
              "change is proven by pairs", file=sys.stderr)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Warmed:
    """What a standby's turn compiled and proved (`warm`), for GET /v1/status."""

    at: float  # the controller's clock
    seconds: float
    compiled_sha256: str | None = None  # None: the policy did not compile
    proof: str | None = None  # how it was proven (None: not proven, or not compiled)
    tables_sha256: dict[str, str] = dataclasses.field(default_factory=dict)  # per switch

    def to_json(self) -> dict[str, object]:
        return {"at": self.at, "seconds": round(self.seconds, 3),
                "compiled_sha256": self.compiled_sha256, "proof": self.proof,
                "tables_sha256": self.tables_sha256}  # fmt: skip


def warm(args: argparse.Namespace, front: Front) -> Warmed | None:
    """A standby's turn (serve --etcd): compile and prove what the leader applies now, from
    the state directory as etcd holds it, writing nothing to a switch or to the shared
    state. The build and its proof stay in this process (the incremental compile's last
    build, the proven builds), so a takeover's first apply compiles only what changed since
    and proves a build proven here as an earlier proof, instead of starting cold."""
    state = _load_state(args, "serve")
    if state is None:
        return None
    started, moment = time.monotonic(), clock()
    state.prune(moment)  # what the leader's turn would apply now (nothing saved)
    compiled = _compile(args, front, state, moment)
    if compiled is None:
        return Warmed(moment, time.monotonic() - started)
    proof = None
    if not getattr(args, "no_verify", False):
        proof = _proven("serve", compiled, Path(args.state), save=False)
    digest = compiled.build.report.get("policy_sha256")
    tables = {sw.name: tables_digest(compiled, sw.name) for sw in compiled.inventory.switches}
    return Warmed(moment, time.monotonic() - started, str(digest), proof, tables)


def _kept(state_dir: Path, compiled: Compiled) -> Kept | None:
    """The proven build the state directory keeps (p4seg/proven.py), if its record is the
    one proof.json names."""
    from p4seg import proven

    record = _recorded_proof(state_dir)
    return None if record is None else proven.load(state_dir, record, compiled)


def _recorded_proof(state_dir: Path) -> ProofRecord | None:
    """The proof record the state directory holds (None: none, or unreadable); read again
    only when the file changed (its inode, time and size: every write replaces it). A
    record read a moment too early is still a proven build's, which is all a proof by
    difference asks of it."""
    from compiler.verify import ProofRecord

    path = state_dir / PROOF_FILE
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    known = _READ_RECORDS.get(path)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        record = ProofRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None
    _READ_RECORDS[path] = (stamp, record)
    return record


def _write_record(path: Path, record: ProofRecord) -> None:
    """Write the state directory's proof record, and know it as read."""
    write_atomic(path, json.dumps(record.to_json()) + "\n")
    try:
        st = path.stat()
    except OSError:
        return
    _READ_RECORDS[path] = ((st.st_ino, st.st_mtime_ns, st.st_size), record)


# The proof record last read (or written) per state directory's file, with its stamp.
_READ_RECORDS: dict[Path, tuple[tuple[int, int, int], ProofRecord | None]] = {}


def _keep_proven(state_dir: Path, compiled: Compiled) -> None:
    """Keep `compiled` in the state directory for the next process (p4seg/proven.py), when
    it is the build this process last proved and recorded there."""
    from p4seg import proven

    held = _PROVEN.get(state_dir.resolve())
    if held is not None and held[1][0] is compiled.policy:
        proven.save(state_dir, compiled, held[0])


def _held_proven(state_dir: Path) -> Proven | None:
    """The build this process last proved for the state directory, while the directory's
    proof record still names it (nothing else was proven or applied since)."""
    held = _PROVEN.get(state_dir.resolve())
    if held is None:
        return None
    return held[1] if held[0] == _recorded_proof(state_dir) else None


def _record_proven(compiled: Compiled, state_dir: Path, record: ProofRecord) -> None:
    """Remember the compiled build (whose proof record is `record`) as proven: the next
    change is proven by difference."""
    switches = {sw.switch: sw for sw in compiled.build.switches}
    _write_record(state_dir / PROOF_FILE, record)
    _remember(state_dir, record, (compiled.policy, compiled.inventory, switches))


EARLIER = "the build of an earlier proof (the same policy, rules and tables)"
_WHOLE = "whole build: "  # an overlay proof that proves every packet, not only the host's


def _overlay_proof(
    verb: str, compiled: Compiled, state_dir: Path, host: Host, record: ProofRecord | None
) -> str | None:
    """Whether a quarantine's or release's build implements the effective policy, proven
    before its overlay is written (None: refused, and why on stderr).

    A build this process proved a few builds ago (`record` among `_RECORDS`) is proven.
    From the build it proved last (compiler/differential.py) — in a new process, the one
    the state directory keeps (p4seg/proven.py) — when only the host's overlay changed
    since: a new quarantine of a host that may reach nothing is proven by the
    overlay's shape, no packet walked; one whose host keeps remediation flows by the few
    pairs its overlay can let through (Verifier.quarantine_scope); anything else (a
    release) by the host's packets, walked hop by hop (compiler/verify.py `focus`). Each of
    these proves the whole build ("whole build: ..."), which is recorded for the next
    change; without a proven build at hand the walk proves the host's packets only."""
    from compiler.differential import cuts_off, only_overlay_changed, outranked
    from compiler.quarantine import QUARANTINE_MASK
    from compiler.rule_proof import carry_proofs
    from compiler.verify import Verifier, verify

    switches = {sw.switch: sw for sw in compiled.build.switches}
    if (earlier := _earlier(state_dir, record)) is not None:  # a release, back to before
        carry_proofs(earlier, switches)  # (what the next change is proven from)
        return _WHOLE + EARLIER
    old = _held_proven(state_dir)
    change: OverlayChange | str = "no proven build at hand"
    if old is not None:
        change = only_overlay_changed(
            old, compiled.policy, compiled.inventory, switches, host, QUARANTINE_MASK
        )
    elif (kept := _kept(state_dir, compiled)) is not None:  # a new process: the build kept
        change = kept.recorded.overlay_change(
            compiled.policy, compiled.inventory, switches, host, QUARANTINE_MASK
        )
    if not isinstance(change, str) and verb == "quarantine":
        if cuts_off(change, compiled.policy, switches, host, QUARANTINE_MASK) is None:
            return (
                f"{_WHOLE}by the overlay's shape (the host may reach nothing; its ToR denies "
                "every packet from and to it above every other entry)"
            )
        why, catch_alls = outranked(change, switches, host, QUARANTINE_MASK)
        if why is None:  # the rest of the overlay lets through what the pairs below walk
            verifier = Verifier(compiled.policy, compiled.inventory, switches)
            pairs = verifier.quarantine_scope(host, change.added - catch_alls)
            result = verifier.run(pairs=pairs)
            if not result.proven:
                _refused(verb, result.counterexamples)
                return None
            return (
                f"{_WHOLE}the pairs its overlay can let through walked ({result.pairs} pairs, "
                f"{result.seconds * 1000:.0f} ms); its ToR denies every other packet from and "
                "to it above every other entry"
            )
    result = verify(compiled.policy, compiled.inventory, switches, focus={host.ip})
    if not result.proven:
        _refused(verb, result.counterexamples)
        return None
    walked = f"the host's packets walked ({result.seconds * 1000:.0f} ms)"
    return walked + f" (only theirs: {change})" if isinstance(change, str) else _WHOLE + walked


def _schedule(compiled: Compiled, state: LiveState, moment: float) -> str:
    """What holds apart from quarantines (InForce.schedule_digest), judged on the policy
    without their carve: a quarantine rewrites the rules that name its host, `during`
    rules in force among them, and must not look like a change of schedule."""
    return in_force_report(compiled.policy.uncarved(), state, moment).schedule_digest()


def tables_digest(compiled: Compiled, switch: str) -> str:
    """The digest of what the compiled build gives `switch` (its entries file)."""
    from compiler.emit import file_digest

    return file_digest(compiled.build.files.get(f"entries/{switch}.json", ""))


def _load_state(args: argparse.Namespace, verb: str) -> LiveState | None:
    try:
        return LiveState.load(Path(args.state))
    except ValueError as err:
        print(f"p4seg {verb}: error: {err}", file=sys.stderr)
        return None


def cmd_apply(args: argparse.Namespace, front: Front) -> int:
    state = _load_state(args, args.verb)
    if state is None:
        return EXIT_ERROR
    if args.verb == "plan":
        moment = _moment(args, "plan")
        if moment is None:
            return EXIT_ERROR
        compiled = _compile(args, front, state, moment)
        if compiled is None:
            return EXIT_ERROR
        effective = _say_in_force(args, compiled, state, moment)
        return run("plan", args, compiled, {"effective": effective})[0]
    return _apply("apply", args, front, state, {})


def _moment(args: argparse.Namespace, verb: str) -> float | None:
    """--at TIME, or the clock (None: reported)."""
    at = getattr(args, "at", None)
    if not at:
        return clock()
    moment = parse_moment(at)
    if isinstance(moment, str):
        print(f"p4seg {verb}: error: {moment}", file=sys.stderr)
        return None
    return moment


def _say_in_force(
    args: argparse.Namespace, compiled: Compiled, state: LiveState, moment: float
) -> dict[str, object]:
    """Which grants, quarantines and time-bound rules the compiled policy holds: printed
    (human output), and returned for the JSON document."""
    report = in_force_report(compiled.policy, state, moment)
    if args.output == "human":
        for line in report.lines():
            print(line)
    return report.to_json()


def cmd_grant(args: argparse.Namespace, front: Front) -> int:
    seconds = parse_duration(args.duration)
    if isinstance(seconds, str):
        print(f"p4seg grant: error: --for: {seconds}", file=sys.stderr)
        return EXIT_ERROR
    state = _load_state(args, "grant")
    if state is None:
        return EXIT_ERROR
    moment = clock()
    op = GrantFlow(args.src, args.dst, args.proto, args.ports, seconds, actor())
    try:
        done = operate(state, op, moment)
    except OperationError as err:
        print(f"p4seg grant: error: {err}; nothing written", file=sys.stderr)
        return EXIT_ERROR
    grant = done.grant
    assert grant is not None
    refused = _grant_effect(args, done.state, moment)
    if refused is not None:
        code, message = refused
        print(message, file=sys.stderr if code == EXIT_ERROR else sys.stdout)
        return code  # nothing saved, nothing written
    code = _apply("grant", args, front, done.state, done.event)
    if code == EXIT_OK:
        print(f"grant {grant.id}: {grant.line()} for {args.duration} "
              f"(revoke with: p4seg revoke {grant.id} -p {args.policy} -i {args.inventory})")  # fmt: skip
    return code


def _grant_effect(
    args: argparse.Namespace, state: LiveState, moment: float
) -> tuple[int, str] | None:
    """Why the newest grant of `state` cannot change anything — (exit status, message) —
    or None when it takes effect (or the policy has errors, which the apply reports)."""
    from compiler.diagnostics import InventoryError
    from compiler.model import Action, PolicyRule
    from compiler.semantics import PolicySemantics, around
    from p4seg.cli import parsed  # a long-running controller parsed both already

    try:
        inventory, _ = parsed().inventory(args.inventory)
        text = Path(args.policy).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, InventoryError):
        return None
    granted = policy_text_with_grants(text, state, moment)
    result = parsed().check(granted, args.policy, inventory, text)
    if result.policy is None:
        return None
    hosts = {h.name: h.ip for h in inventory.hosts}
    policy = effective_policy(result.policy, state, moment, hosts)
    grants = state.active_grants(moment)
    first_grant = len(result.policy.rules) - len(grants) + 1
    newest = len(result.policy.rules) - 1  # the grant's index in the policy (and semantics)
    rule = policy.rules[newest]
    line = grants[-1].line()

    def named(r: PolicyRule) -> str:
        # Grants are the last rules of the file; quarantine's rules come after them.
        if first_grant <= r.position < first_grant + len(grants):
            g = grants[r.position - first_grant]
            return f"grant {g.id} (`{g.line()}`)"
        return f"`{r.describe()}` at {r.span}"

    if not rule.src or not rule.dst:
        cut = ", ".join(sorted(state.quarantined)) or "its hosts"
        return EXIT_ERROR, (
            f"p4seg grant: error: `{line}` would not take effect: every host it names on one "
            f"side is quarantined ({cut}); release first"
        )
    # The grant's verdict, not every rule's: from the rules its own can meet.
    near = around(policy, rule.id)
    sem = PolicySemantics(near)
    dead = sem.dead_rules(down_to=rule.id)
    coverage = next((c for c in dead if c.rule.key == rule.key), None)
    if coverage is None:
        for deny in sem.overlapping_denies(near.rules.index(rule)):
            print(f"p4seg grant: warning: part of `{line}` stays blocked by "
                  f"{named(deny)} (deny overrides allow)", file=sys.stderr)  # fmt: skip
    if coverage is not None and coverage.by_deny:
        denies = "; ".join(named(r) for r in coverage.covering)
        return EXIT_ERROR, (
            f"p4seg grant: error: `{line}` would not take effect: blocked by {denies} "
            f"(deny overrides allow); nothing written"
        )
    if coverage is not None:
        allows = [r for r in coverage.covering if r.action is Action.ALLOW]
        return EXIT_OK, (
            f"`{line}` is already allowed by {'; '.join(named(r) for r in allows)}; nothing written"
        )
    return None


def cmd_revoke(args: argparse.Namespace, front: Front) -> int:
    state = _load_state(args, "revoke")
    if state is None:
        return EXIT_ERROR
    try:
        done = operate(state, RevokeGrant(args.grant_id), clock())
    except OperationError as err:
        print(f"p4seg revoke: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    return _apply("revoke", args, front, done.state, done.event)


def cmd_quarantine(args: argparse.Namespace, front: Front) -> int:
    """Quarantine or release a host: its ToR's overlay only (`_overlay`), or a full apply
    when the switches hold more than the overlay changes (a pending edit, an expiry)."""
    state = _load_state(args, args.verb)
    if state is None:
        return EXIT_ERROR
    op = QuarantineHost(args.host) if args.verb == "quarantine" else ReleaseHost(args.host)
    try:
        done = operate(state, op, clock())
    except OperationError as err:
        print(f"p4seg {args.verb}: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if done.again:
        print(f"{args.host} is already quarantined; applying to make sure")
    if getattr(args, "reason", ""):
        done.event["reason"] = args.reason
    fast = _overlay(args.verb, args, front, done.state, done.event)
    if fast is not None:
        return fast
    return _apply(args.verb, args, front, done.state, done.event)


def _overlay(
    verb: str, args: argparse.Namespace, front: Front, state: LiveState, event: dict[str, object]
) -> int | None:
    """The fast path of quarantine/release (runtime/overlay.py): compile, prove the host's
    packets (the only ones the overlay changes: verify restricted to flows from and to it),
    then write the overlay onto its ToR alone, no epoch flip. None: take the full apply
    (a grant expired, the ToR differs in more than the overlay, --switch or --dry-run)."""
    moment = clock()
    compiled = _compile(args, front, state, moment, write=False)
    if compiled is None:
        return EXIT_ERROR
    try:
        return _overlay_compiled(verb, args, state, event, compiled, moment)
    finally:
        compiled.write()  # after the switch: the build is what it holds (or was refused)


def _overlay_compiled(
    verb: str,
    args: argparse.Namespace,
    state: LiveState,
    event: dict[str, object],
    compiled: Compiled,
    moment: float,
) -> int | None:
    from compiler.quarantine import settle_quarantine
    from compiler.verify import proof_record
    from runtime.controller import apply_one
    from runtime.overlay import NOT_AN_OVERLAY, overlay_plan

    state_dir = Path(args.state)
    host = compiled.inventory.hosts_by_name.get(args.host)
    if host is None and verb == "release":
        return None  # gone from the inventory: nothing of it on any switch to take away
    if host is None:
        known = ", ".join(sorted(compiled.inventory.hosts_by_name))
        print(f"p4seg {verb}: error: no host {args.host} in the inventory ({known})",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    remediation = compiled.policy.remediation()
    if verb == "quarantine" and remediation is not None and host.ip in remediation:
        print(f"p4seg {verb}: error: {args.host} is in the `remediation` service: quarantined, "
              f"it could no longer serve the others' remediation; nothing written",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    if getattr(args, "switch", []) or getattr(args, "dry_run", False):
        return None
    if any(g.expires <= moment for g in state.grants):
        return None  # an expiry changes every switch holding the grant
    operations = in_force_report(compiled.policy, state, moment)
    if _schedule(compiled, state, moment) != state.applied_schedule:
        return None  # a window opened or closed, a grant changed since: apply it all
    if any(
        state.applied_tables.get(sw.name) != tables_digest(compiled, sw.name)
        for sw in compiled.inventory.switches
        if sw.name != host.switch
    ):
        return None  # another switch has a change pending (an edit not applied yet): all
    digest = hashlib.sha256(compiled.policy_text.encode()).hexdigest()
    proof = "skipped (--no-verify)" if getattr(args, "no_verify", False) else None
    switches = {sw.switch: sw for sw in compiled.build.switches}
    # The build's proof record, when this process has proven builds to compare it with and
    # to remember it by (a new process would digest every switch's tables for nothing).
    record = None
    if state_dir.resolve() in _RECORDS:
        record = proof_record(compiled.policy, compiled.inventory, switches)
    if proof is None and (proof := _overlay_proof(verb, compiled, state_dir, host, record)) is None:
        audit.append(state_dir / "audit.jsonl", verb, **event, policy=str(args.policy),
                     policy_sha256=digest,
                     result="refused: the compiled tables are not proven to implement the "
                     "policy")  # fmt: skip
        return EXIT_ERROR
    session = session_of(verb, args, compiled, only=host.switch)
    if session is None:
        return EXIT_ERROR
    [target] = session.switches
    # The host's new state first: a controller killed once the overlay is on the switch
    # restarts with the quarantine (or release) the switch holds, never the one before.
    state.save(state_dir)
    start = time.monotonic()
    applied = applied_here(compiled)  # a long-running process plans the ToR from memory
    report = grpc_loops.run(
        apply_one(target, session.tables, session.files, session.options,
                  planner=lambda t, d, h: overlay_plan(t, d, h, {host.ip}),
                  known=applied.get(target.name))
    )  # fmt: skip
    if report.ok:
        remember_applied(applied, target)
    else:
        applied.pop(target.name, None)
    if report.error is not None and report.error.startswith(NOT_AN_OVERLAY):
        return None  # nothing was written: the full apply brings the ToR (and all) up to date
    took = time.monotonic() - start
    rules = _rule_lines(compiled.build)
    code = EXIT_OK if report.ok else EXIT_ERROR
    if code == EXIT_OK:
        note_applied(compiled.policy, state, moment)
        state.applied_tables[target.name] = tables_digest(compiled, target.name)
        if proof.startswith(_WHOLE):
            if record is None:
                record = proof_record(compiled.policy, compiled.inventory, switches)
            _record_proven(compiled, state_dir, record)
            _keep_proven(state_dir, compiled)
    else:
        state.applied_tables.pop(target.name, None)
    state.save(state_dir)
    before = applied_rules(state_dir)  # removed entries are labelled by the rules they came from
    record_applied(state_dir, [report], rules)
    if report.ok:  # the ToR holds no released host's quarantine identity any more
        allocation = settle_quarantine(compiled.allocation, target.name)
        compiled = dataclasses.replace(compiled, allocation=allocation)
    _record_allocation(state_dir, compiled, [report])
    written = [
        {"op": c.op, "entry": describe_entry(session.tables.pipeline, c.entity.table_entry)[0]}
        for c in (report.plan.prepare if report.plan is not None else ())
    ][: report.written]
    audit.append(
        state_dir / "audit.jsonl",
        verb,
        **event,
        policy=str(args.policy),
        policy_sha256=digest,
        compiled_sha256=compiled.build.report.get("policy_sha256"),
        operations_sha256=operations.digest(),
        result="ok" if code == EXIT_OK else "failed",
        overlay={"switch": target.name, "written": written},
        proof=proof,
        switches=_summary([report]),
    )
    if args.output == "json":
        doc = report_json([report], session.tables, rules, True, before)
        doc["seconds"] = round(took, 3)
        doc["overlay"] = True
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print_reports([report], session.tables, rules, True, before=before)
        print(f"{'Quarantined' if verb == 'quarantine' else 'Released'} {args.host}: "
              f"{report.written} writes on {target.name} only, in {took * 1000:.0f} ms"
              f"{'' if report.ok else '; failed: ' + str(report.error)}")  # fmt: skip
    return code


def cmd_signal(args: argparse.Namespace, front: Front) -> int:
    from p4seg.signals import cmd_signal as signal  # the engine: only this verb pays for it

    return signal(args, front)


def _refused(verb: str, counterexamples: list[Counterexample]) -> None:
    """Why an unproven change is not written, on stderr (a few counterexamples)."""
    print(
        f"p4seg {verb}: error: the compiled tables do not implement the policy "
        f"({len(counterexamples)} counterexample(s)); nothing was written",
        file=sys.stderr,
    )
    for c in counterexamples[:5]:
        print("  " + c.describe().replace("\n", "\n  "), file=sys.stderr)
    print("  (a p4seg bug: please report it; --no-verify writes unproven tables)", file=sys.stderr)


def cmd_watch(args: argparse.Namespace, front: Front) -> int:
    """Apply, then apply again on every edit, every scheduled change and every switch that
    lost its pipeline (a restart), until SIGINT/SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return watch_loop(args, front, stop)


@dataclasses.dataclass(frozen=True, slots=True)
class WatchHooks:
    """How `p4seg serve` shares the watch loop with its API: one lock held around each
    turn of the loop (so an API operation never races an apply), and an event an operation
    sets when it changed the live state (a grant's expiry to schedule)."""

    lock: AbstractContextManager[object]
    changed: threading.Event
    turned: threading.Event = dataclasses.field(default_factory=threading.Event)  # a turn ended
    # Under the lock, before a turn: False skips it (a standby of replicated controllers).
    may_write: Callable[[], bool] = lambda: True
    wrote: Callable[[], None] = lambda: None  # after a turn, still under the lock: store it


def watch_loop(
    args: argparse.Namespace,
    front: Front,
    stop: threading.Event,
    hooks: WatchHooks | None = None,
) -> int:
    """See cmd_watch. Fail closed: while the policy file cannot be compiled, what is due
    (a grant expiring, a window closing, a `for` lapsing, a restarted switch) is applied
    from the last text that compiled, so a broken edit never keeps a permission alive."""
    w = _Watch(due=clock(), next_check=time.monotonic() + args.check)
    lock = hooks.lock if hooks is not None else nullcontext()
    settled = False  # the heap collected since the last ToR was proven ahead
    while not stop.is_set():
        ahead = False  # a ToR proven ahead this turn (a standby's turn proves none)
        with lock:
            if hooks is not None and not hooks.may_write():
                w.due = clock()  # on winning, the first turn applies what the store holds
            else:
                if hooks is not None and hooks.changed.is_set():
                    hooks.changed.clear()
                    w.reschedule(args)
                _watch_turn(args, front, w)
                if hooks is not None:
                    hooks.wrote()
                ahead = not args.once and prove_ahead(args) is not None
                if ahead:
                    settled = False
                elif not settled and not args.once:
                    settle_heap()
                    settled = True
        if hooks is not None:
            hooks.turned.set()
        if args.once:
            return EXIT_OK
        # The next look at the file and the schedule; sooner while ToRs are proven ahead
        # (one per turn: an operation waits for at most one ToR's proof).
        stop.wait(min(args.interval, AHEAD_PAUSE) if ahead else args.interval)
    return EXIT_OK


def _restore_spine(args: argparse.Namespace, front: Front, name: str) -> bool:
    """Write a spine that answers again its own tables, alone (p4seg/spines.py)."""
    state = _load_state(args, "watch")
    alone = argparse.Namespace(**{**vars(args), "switch": [name]})
    return (
        state is not None
        and _apply("watch", alone, front, state, {"spine_restored": name}) == EXIT_OK
    )


@dataclasses.dataclass(slots=True)
class _Watch:
    """What watch_loop carries from one turn to the next."""

    due: float | None  # when the effective policy changes next (or a retry)
    next_check: float  # when to check the switches' pipelines next (monotonic)
    seen: tuple[int, int] | None = None  # the policy file's (mtime, size) last applied
    unreadable: bool = False
    last: Compiled | None = None  # the last build that compiled
    event: dict[str, object] = dataclasses.field(default_factory=dict)  # why the next apply

    def reschedule(self, args: argparse.Namespace) -> None:
        """The live state changed under the loop (an API operation): keep what is due
        now, and add what the new state makes due (a new grant's expiry)."""
        state = _load_state(args, "watch")
        if self.last is None or state is None:
            return
        upcoming = next_change(self.last.policy, state, clock())  # overdue: now
        self.due = min((d for d in (self.due, upcoming) if d is not None), default=None)


def _watch_turn(args: argparse.Namespace, front: Front, w: _Watch) -> None:
    """One turn of watch_loop: apply if the file changed, something is due or a switch
    lost its pipeline."""
    policy_path = Path(args.policy)
    mark: tuple[int, int] | None
    try:
        stat = policy_path.stat()
        mark, w.unreadable = (stat.st_mtime_ns, stat.st_size), False
    except OSError as err:
        if not w.unreadable:
            print(f"p4seg watch: cannot read {policy_path}: {err.strerror}", file=sys.stderr)
        mark, w.unreadable = w.seen, True  # the switches keep what is applied
    if w.last is not None and time.monotonic() >= w.next_check:
        w.next_check = time.monotonic() + args.check
        lost = _lost_pipelines(args, w.last)
        if lost:
            print(f"-- {', '.join(lost)}: pipeline lost (restarted?): restoring", flush=True)
            w.due = clock()
        if moved := follow_spines(args, w.last, partial(_restore_spine, args, front)):
            w.event, w.due = moved, clock()  # the ToRs' routing, at once
    scheduled = w.due is not None and clock() >= w.due
    if mark != w.seen or scheduled:
        w.seen = mark
        state = _load_state(args, "watch")
        if state is not None:
            print(f"-- {time.strftime('%H:%M:%S')} applying {policy_path}", flush=True)
            code, compiled = _apply_compiled("watch", args, front, state, w.event)
            w.event = {}
            if compiled is None and w.last is not None and scheduled:
                print(
                    "   the policy file does not compile: applying what is due to the last "
                    "text that did",
                    flush=True,
                )
                state = _load_state(args, "watch") or state  # as saved: prune again
                code, compiled = _apply_compiled(
                    "watch", args, front, state, {"from": "last good text"}, w.last.policy_text
                )
            if compiled is None and w.last is None:
                w.due = None  # nothing applied yet: wait for an edit, not the schedule
            if compiled is not None:
                w.last = compiled
                w.due = next_change(compiled.policy, state, clock())
            if code == EXIT_ERROR:
                print("   not everything applied; the switches keep what they had", flush=True)
                if compiled is not None:  # a switch failed: try again after a check period
                    w.due = clock() + args.check


def _lost_pipelines(args: argparse.Namespace, compiled: Compiled) -> list[str]:
    """Switches that answer but no longer run the compiled pipeline."""
    session = session_of("watch", args, compiled)
    if session is None:
        return []
    states = grpc_loops.run(pipeline_states(session.switches, session.files, session.options))
    return [name for name, state in states.items() if state in ("missing", "different")]


def _open_session(
    verb: str, args: argparse.Namespace, front: Front
) -> tuple[Compiled, Session] | None:
    """Compile the effective policy and open a session on its switches (None: reported)."""
    state = _load_state(args, verb)
    if state is None:
        return None
    moment = _moment(args, verb)
    if moment is None:
        return None
    compiled = _compile(args, front, state, moment)
    if compiled is None:
        return None
    if verb == "hits":
        _say_in_force(args, compiled, state, moment)
    session = session_of(verb, args, compiled)
    return None if session is None else (compiled, session)


def cmd_alerts(args: argparse.Namespace, front: Front) -> int:
    log = Path(args.state) / "alerts.jsonl"
    if not args.follow:
        if log.exists():
            sys.stdout.write(log.read_text())
        return EXIT_OK
    opened = _open_session("alerts", args, front)
    if opened is None:
        return EXIT_ERROR
    compiled, session = opened
    log.parent.mkdir(parents=True, exist_ok=True)
    from runtime.alerts import RateLimiter

    with log.open("a") as out:

        def sink(alert: Alert) -> None:
            line = json.dumps(alert.to_json(), sort_keys=True)
            print(line, flush=True)
            out.write(line + "\n")
            out.flush()

        def ready(switch: str) -> None:
            print(f"following {switch}", file=sys.stderr, flush=True)

        try:
            grpc_loops.run(
                follow(session.switches, session.files, session.options,
                       _rule_lines(compiled.build), sink,
                       RateLimiter(args.rate, args.burst), on_ready=ready)
            )  # fmt: skip
        except KeyboardInterrupt:
            return EXIT_OK
    return EXIT_OK


def cmd_hits(args: argparse.Namespace, front: Front) -> int:
    opened = _open_session("hits", args, front)
    if opened is None:
        return EXIT_ERROR
    compiled, session = opened
    hits, failed = read_hits(compiled, session)

    if args.output == "json":
        print(json.dumps({
            "rules": [{"rule_id": h.rule_id, "rule": h.rule, "action": h.action, "packets": h.packets,
                       "bytes": h.bytes, "switches": list(h.switches),
                       **({"rate_pps": h.rate_pps, "red": h.red} if h.rate_pps is not None else {})}
                      for h in hits],
            "unused_allows": [h.rule_id for h in hits if h.action == "allow" and h.packets == 0],
            "unreadable": failed,
        }, indent=2, sort_keys=True))  # fmt: skip
    else:
        width = max((len(h.rule) for h in hits), default=0)
        for h in hits:
            mark = "  UNUSED" if h.action == "allow" and h.packets == 0 else ""
            red = ""
            if h.rate_pps is not None:  # packets the meters dropped over the rate
                red = f"  {'?' if h.red is None else h.red:>10} red"
            print(
                f"{h.rule_id:>4}  {h.rule:<{width}}  {h.packets:>10} pkts {h.bytes:>12} B{red}{mark}"
            )
        unused = sum(h.action == "allow" and h.packets == 0 for h in hits)
        print(
            f"{unused} allow rule(s) unused on the switches read"
            + (f"; unreadable: {', '.join(failed)}" if failed else "")
        )
        if any(h.rate_pps is not None and h.red is None for h in hits):
            print("red: packets over a rule's rate, dropped by its meters; ? = a switch unread")
    return EXIT_ERROR if failed else EXIT_OK


def read_hits(compiled: Compiled, session: Session) -> tuple[list[RuleHits], dict[str, str]]:
    """Every rule's packets and bytes (and red drops of metered allows) summed over the
    session's switches, and the switches that could not be read (name -> why)."""
    options, tables, selected = session.options, session.tables, session.switches
    # The rules the entries carry: a quarantine's overlay counts under the uncarved rules.
    rules = compiled.policy.uncarved()
    metered = [r.id for r in rules.rules if r.rate_pps is not None]

    async def read_all() -> tuple[list[object], list[object]]:
        pipe = tables.pipeline
        # Counters and red drops of every switch at once: one slow switch delays only itself.
        done: list[object] = await asyncio.gather(
            *(read_counters(t, pipe, options) for t in selected),
            *(read_red_drops(t, pipe, options, metered) for t in selected),
            return_exceptions=True,
        )
        return done[: len(selected)], done[len(selected) :]

    results, reds = grpc_loops.run(read_all())
    counters = {t.name: r for t, r in zip(selected, results, strict=True)}
    failed = {n: str(r) for n, r in counters.items() if isinstance(r, BaseException)}
    ok = {n: r for n, r in counters.items() if not isinstance(r, BaseException)}
    red_cells = {t.name: r for t, r in zip(selected, reds, strict=True) if isinstance(r, dict)}
    return hits_by_rule(rules, tables.pipeline, ok, red_cells), failed  # type: ignore[arg-type]


def cmd_audit(args: argparse.Namespace, front: Front) -> int:
    if args.etcd:
        return _audit_etcd(args)
    log = Path(args.state) / "audit.jsonl"
    if not log.exists():
        print(f"p4seg audit: error: no audit log at {log}", file=sys.stderr)
        return EXIT_ERROR
    if args.action == "show":
        for record in audit.records(log):
            print(json.dumps(record, sort_keys=True))
        return EXIT_OK
    return _say_verdict(str(log), audit.verify(log))


def _say_verdict(where: str, verdict: audit.Verdict) -> int:
    if verdict.ok:
        print(f"{where}: {verdict.records} records, chain intact; head {verdict.last_hash}")
        return EXIT_OK
    print(
        f"{where}:{verdict.line}: chain broken after {verdict.records} good records: "
        f"{verdict.problem}"
    )
    return EXIT_ERROR


def etcd_options(args: argparse.Namespace, floor: str) -> EtcdOptions:
    """The --etcd arguments (p4seg/commands.py etcd_arguments) for `floor`; ValueError
    saying what is wrong."""
    from runtime.etcdstore import EtcdOptions, parse_endpoints, wants_tls

    files = {name: getattr(args, f"etcd_{name}") for name in ("ca", "cert", "key")}
    tls = wants_tls(args.etcd)
    if (files["cert"] or files["key"]) and not (files["ca"] or tls):
        raise ValueError("--etcd-cert/--etcd-key: TLS needs https:// endpoints or --etcd-ca")
    for path in filter(None, files.values()):
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such file")
    return EtcdOptions(
        parse_endpoints(args.etcd),
        floor,
        tls=tls,
        **{name: Path(path) for name, path in files.items() if path},  # type: ignore[arg-type]
    )


def _audit_etcd(args: argparse.Namespace) -> int:
    """`audit verify|show` on the chain in etcd, read only (no election)."""
    from runtime.etcdstore import Etcd, EtcdStore
    from runtime.store import StoreError

    if not args.floor:
        print("p4seg audit: error: --etcd needs --floor (the floor's keys)", file=sys.stderr)
        return EXIT_ERROR
    try:
        options = etcd_options(args, args.floor)
    except ValueError as err:
        print(f"p4seg audit: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    where = f"etcd:{options.prefix()}audit"

    async def read() -> tuple[list[tuple[int, bytes]], audit.Verdict]:
        etcd = Etcd(options)
        try:
            store = EtcdStore(etcd, None)
            return await store.audit_records(), await store.audit_verify()
        finally:
            await etcd.close()

    try:
        stored, verdict = grpc_loops.run(read())
    except StoreError as err:
        print(f"p4seg audit: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    if not stored:
        print(f"p4seg audit: error: no audit records at {where}", file=sys.stderr)
        return EXIT_ERROR
    if args.action == "show":
        for _, raw in stored:
            print(json.dumps(json.loads(raw), sort_keys=True))
        return EXIT_OK
    return _say_verdict(where, verdict)


HANDLERS: dict[str, Callable[[argparse.Namespace, Front], int]] = {
    "plan": cmd_apply,
    "apply": cmd_apply,
    "grant": cmd_grant,
    "revoke": cmd_revoke,
    "quarantine": cmd_quarantine,
    "release": cmd_quarantine,
    "signal": cmd_signal,
    "watch": cmd_watch,
    "alerts": cmd_alerts,
    "hits": cmd_hits,
    "audit": cmd_audit,
}
