"""The controller's verbs, registered on `p4seg`'s command line by compiler/cli.py:

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
import hashlib
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compiler.inventory import Inventory
from compiler.model import Policy
from compiler.resolve import parse_duration
from runtime import audit
from runtime.alerts import Alert, follow, hits_by_rule, read_counters
from runtime.audit import actor
from runtime.cli import (
    APPLY_HELP,
    EXIT_CHANGES,
    EXIT_ERROR,
    EXIT_OK,
    PLAN_HELP,
    Compiled,
    _rule_lines,
    _selected,
    add_controller_arguments,
    options_of,
    run,
)
from runtime.controller import ControllerError, PipelineFiles, SwitchReport
from runtime.live import (
    LiveState,
    effective_policy,
    next_change,
    note_applied,
    policy_text_with_grants,
)
from runtime.plan import Tables

DEFAULT_STATE = ".p4seg"

# compiler/cli.py supplies the front end: load, transform the text, check, transform the
# policy, compile and write the build; it reports every diagnostic itself (None: failed).
TextTransform = Callable[[str], str]
PolicyTransform = Callable[[Policy, Inventory], Policy]
Front = Callable[[argparse.Namespace, TextTransform, PolicyTransform], Compiled | None]
PolicyArguments = Callable[[argparse.ArgumentParser, bool], None]

_GRANT_HELP = """\
Allow one flow for a while: SRC and DST are services, host names or addresses, as in the
policy. The grant is added to the live state (.p4seg/live.json) with its absolute expiry,
the effective policy is applied at once, and the change is audited. It lapses when it
expires: `p4seg watch` (or any later apply) removes it, also after a controller restart.

examples:
    p4seg grant algo1 riskdb tcp 5432 --for 15m -p policies/trading_floor.zt -i floor.yaml
    p4seg grant jump1 risk icmp --for 1h -p policy.zt -i floor.yaml
"""

_QUARANTINE_HELP = """\
Isolate a host now, on every switch: it keeps only the flows with the policy's
`remediation` service that the policy allows (none if there is no such service); every
other host keeps exactly what it had. Applied with the epoch protocol and audited;
`p4seg release HOST` undoes it.
"""

_WATCH_HELP = """\
Keep the switches on the policy: apply now, then again whenever the policy file changes
and whenever the effective policy changes by itself (a grant expires, a `during` window
opens or closes, a `for` rule lapses). An edit with errors is reported and nothing
changes; the last good policy stays. Stop with Ctrl-C.
"""

_ALERTS_HELP = """\
Logged denies as JSON lines (time, switch, port, 5-tuple, rule id, the policy line that
decided). Without --follow: print what .p4seg/alerts.jsonl holds. With --follow: connect to
every switch as the primary controller (only the primary receives PacketIns), print and
record alerts until Ctrl-C; a source that floods is rate-limited, and its next alert says
how many were suppressed.
"""

_HITS_HELP = """\
Per-rule packet and byte counts from every switch's `policy` counters, including allow
rules nothing has used: the unused permissions an access review should remove.

exit status: 0, or 1 if a switch cannot be read
"""


@dataclass(frozen=True, slots=True)
class Verb:
    name: str
    help: str
    description: str


def _state_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state",
        metavar="DIR",
        default=DEFAULT_STATE,
        help=f"live state, audit log and alerts (default: {DEFAULT_STATE})",
    )


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    policy_arguments: PolicyArguments,
) -> None:
    raw = argparse.RawDescriptionHelpFormatter

    def verb(
        name: str, help: str, description: str, with_policy: bool = True
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, formatter_class=raw)
        if with_policy:
            policy_arguments(p, True)
            add_controller_arguments(p)
        _state_argument(p)
        return p

    verb("plan", "show what apply would change on the switches", PLAN_HELP)
    a = verb("apply", "make the switches hold the policy (consistent updates)", APPLY_HELP)
    a.add_argument("--dry-run", action="store_true", help="plan only; change nothing")
    a.add_argument("--batch-size", type=int, default=500, help="updates per Write (default: 500)")

    g = verb("grant", "allow one flow for a while (time-bound, audited)", _GRANT_HELP, False)
    g.add_argument("src", metavar="SRC")
    g.add_argument("dst", metavar="DST")
    g.add_argument("proto", metavar="PROTO", choices=("tcp", "udp", "icmp", "ip"))
    g.add_argument("ports", metavar="PORTS", nargs="?", default="", help="e.g. 5432 or 8000-8080")
    g.add_argument("--for", dest="duration", required=True, metavar="DURATION", help="e.g. 15m, 8h")
    _live_policy(g, policy_arguments)

    r = verb(
        "revoke",
        "end a grant now",
        "End a grant before it expires (by its id, see `grant`).",
        False,
    )
    r.add_argument("grant_id", metavar="GRANT")
    _live_policy(r, policy_arguments)

    q = verb("quarantine", "isolate a host on every switch now", _QUARANTINE_HELP, False)
    q.add_argument("host", metavar="HOST")
    _live_policy(q, policy_arguments)
    rel = verb(
        "release", "end a host's quarantine", "Give a quarantined host its access back.", False
    )
    rel.add_argument("host", metavar="HOST")
    _live_policy(rel, policy_arguments)

    w = verb("watch", "re-apply on policy edits and on schedule", _WATCH_HELP)
    w.add_argument("--batch-size", type=int, default=500, help="updates per Write (default: 500)")
    w.add_argument("--interval", type=float, default=0.5, help="seconds between file checks")
    w.add_argument("--once", action="store_true", help="apply what is due, then exit (for cron)")

    al = verb("alerts", "logged denies as JSON lines", _ALERTS_HELP)
    al.add_argument("--follow", action="store_true", help="receive alerts live until Ctrl-C")
    al.add_argument("--rate", type=float, default=5.0, help="alerts/s per source (default: 5)")
    al.add_argument("--burst", type=int, default=20, help="burst per source (default: 20)")

    verb("hits", "per-rule hit counts, unused allow rules", _HITS_HELP)

    au = verb("audit", "check or show the audit log", "The hash-chained audit log.", False)
    au.add_argument("action", choices=("verify", "show"))


def _live_policy(p: argparse.ArgumentParser, policy_arguments: PolicyArguments) -> None:
    """Live verbs name the policy with -p, since their positionals say what to change."""
    p.add_argument("-p", "--policy", required=True, metavar="POLICY", help="policy file (.zt)")
    p.add_argument("-i", "--inventory", required=True, metavar="INVENTORY", help="inventory YAML")
    p.add_argument("--error-format", choices=("human", "json"), default="human")
    add_controller_arguments(p)
    p.add_argument("--batch-size", type=int, default=500, help="updates per Write (default: 500)")


# -- applying the effective policy --------------------------------------------------------


def _compile(
    args: argparse.Namespace, front: Front, state: LiveState, now: float
) -> Compiled | None:
    return front(
        args,
        lambda text: policy_text_with_grants(text, state, now),
        lambda policy, inv: effective_policy(policy, state, now, {h.name: h.ip for h in inv.hosts}),
    )


def _summary(reports: list[SwitchReport]) -> dict[str, object]:
    return {
        r.switch: {
            "ok": r.ok,
            "written": r.written,
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
    verb: str, args: argparse.Namespace, front: Front, state: LiveState, event: dict[str, object]
) -> tuple[int, Compiled | None]:
    """Apply the effective policy, save the state if it took, and audit what happened."""
    state_dir = Path(args.state)
    now = time.time()
    expired = state.prune(now)
    compiled = _compile(args, front, state, now)
    if compiled is None:
        return EXIT_ERROR, None
    code, reports = run(verb, args, compiled)
    dry = getattr(args, "dry_run", False)
    changed = any(r.written for r in reports)
    if reports and not dry:
        if code == EXIT_OK:
            note_applied(compiled.policy, state, now)
        state.save(state_dir)
    if (changed or event or code == EXIT_ERROR or expired) and not dry and reports:
        audit.append(
            state_dir / "audit.jsonl",
            verb,
            **event,
            policy=str(args.policy),
            policy_sha256=hashlib.sha256(Path(args.policy).read_bytes()).hexdigest(),
            expired_grants=[g.id for g in expired],
            result="ok" if code == EXIT_OK else "failed",
            switches=_summary(reports),
        )
    return code, compiled


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
        now = time.time()
        compiled = _compile(args, front, state, now)
        return EXIT_ERROR if compiled is None else run("plan", args, compiled)[0]
    return _apply("apply", args, front, state, {})


def cmd_grant(args: argparse.Namespace, front: Front) -> int:
    seconds = parse_duration(args.duration)
    if isinstance(seconds, str):
        print(f"p4seg grant: error: --for: {seconds}", file=sys.stderr)
        return EXIT_ERROR
    state = _load_state(args, "grant")
    if state is None:
        return EXIT_ERROR
    grant = state.add_grant(
        args.src, args.dst, args.proto, args.ports, seconds, time.time(), actor()
    )
    code = _apply(
        "grant", args, front, state, {"grant": grant.id, "rule": grant.line(), "seconds": seconds}
    )
    if code == EXIT_OK:
        print(f"grant {grant.id}: {grant.line()} for {args.duration} "
              f"(revoke with: p4seg revoke {grant.id} -p {args.policy} -i {args.inventory})")  # fmt: skip
    return code


def cmd_revoke(args: argparse.Namespace, front: Front) -> int:
    state = _load_state(args, "revoke")
    if state is None:
        return EXIT_ERROR
    match = [g for g in state.grants if g.id == args.grant_id]
    if not match:
        known = ", ".join(f"{g.id} ({g.line()})" for g in state.grants) or "none"
        print(f"p4seg revoke: error: no grant {args.grant_id} (active: {known})", file=sys.stderr)
        return EXIT_ERROR
    state.grants.remove(match[0])
    return _apply("revoke", args, front, state, {"grant": args.grant_id, "rule": match[0].line()})


def cmd_quarantine(args: argparse.Namespace, front: Front) -> int:
    state = _load_state(args, args.verb)
    if state is None:
        return EXIT_ERROR
    if args.verb == "quarantine":
        if args.host in state.quarantined:
            print(f"{args.host} is already quarantined; applying to make sure")
        state.quarantined.setdefault(args.host, time.time())
    elif state.quarantined.pop(args.host, None) is None:
        print(f"p4seg release: error: {args.host} is not quarantined", file=sys.stderr)
        return EXIT_ERROR
    return _apply(args.verb, args, front, state, {"host": args.host})


def cmd_watch(args: argparse.Namespace, front: Front) -> int:
    """Apply, then apply again on every edit and every scheduled change, until stopped."""
    stop = False

    def interrupted(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    policy_path = Path(args.policy)
    seen: tuple[int, int] | None = None
    due: float | None = time.time()
    unreadable = False
    while not stop:
        mark: tuple[int, int] | None
        try:
            stat = policy_path.stat()
            mark, unreadable = (stat.st_mtime_ns, stat.st_size), False
        except OSError as err:
            if not unreadable:
                print(f"p4seg watch: cannot read {policy_path}: {err.strerror}", file=sys.stderr)
            mark, unreadable = seen, True  # the switches keep what is applied
        if mark != seen or (due is not None and time.time() >= due):
            seen = mark
            state = _load_state(args, "watch")
            if state is not None:
                print(f"-- {time.strftime('%H:%M:%S')} applying {policy_path}", flush=True)
                code, compiled = _apply_compiled("watch", args, front, state, {})
                if code == EXIT_ERROR:
                    print("   the switches keep what they had", flush=True)
                if compiled is not None:
                    due = next_change(compiled.policy, state, time.time())
            if args.once:
                return EXIT_OK
        _wait(args.interval, lambda: stop)
    return EXIT_OK


def _wait(seconds: float, stopped: Callable[[], bool]) -> None:
    """Wait up to `seconds` for the next check (a poll interval, not a fixed delay)."""
    deadline = time.monotonic() + seconds
    while not stopped() and time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def cmd_alerts(args: argparse.Namespace, front: Front) -> int:
    log = Path(args.state) / "alerts.jsonl"
    if not args.follow:
        if log.exists():
            sys.stdout.write(log.read_text())
        return EXIT_OK
    state = _load_state(args, "alerts")
    if state is None:
        return EXIT_ERROR
    compiled = _compile(args, front, state, time.time())
    if compiled is None:
        return EXIT_ERROR
    options = options_of(args)
    if isinstance(options, str):
        print(f"p4seg alerts: error: {options}", file=sys.stderr)
        return EXIT_ERROR
    tables = Tables(compiled.build.target.pipeline)
    selected = _selected(compiled, args.switch, tables)
    if isinstance(selected, str):
        print(f"p4seg alerts: error: {selected}", file=sys.stderr)
        return EXIT_ERROR
    try:
        files = PipelineFiles.of(compiled.build_dir, args.target)
    except ControllerError as err:
        print(f"p4seg alerts: error: {err}", file=sys.stderr)
        return EXIT_ERROR
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
            asyncio.run(
                follow(selected, files, options, _rule_lines(compiled.build), sink,
                       RateLimiter(args.rate, args.burst), on_ready=ready)
            )  # fmt: skip
        except KeyboardInterrupt:
            return EXIT_OK
    return EXIT_OK


def cmd_hits(args: argparse.Namespace, front: Front) -> int:
    state = _load_state(args, "hits")
    if state is None:
        return EXIT_ERROR
    compiled = _compile(args, front, state, time.time())
    if compiled is None:
        return EXIT_ERROR
    options = options_of(args)
    if isinstance(options, str):
        print(f"p4seg hits: error: {options}", file=sys.stderr)
        return EXIT_ERROR
    tables = Tables(compiled.build.target.pipeline)
    selected = _selected(compiled, args.switch, tables)
    if isinstance(selected, str):
        print(f"p4seg hits: error: {selected}", file=sys.stderr)
        return EXIT_ERROR

    async def read_all() -> dict[str, object]:
        results = await asyncio.gather(
            *(read_counters(t, tables.pipeline, options) for t in selected), return_exceptions=True
        )
        return {t.name: r for t, r in zip(selected, results, strict=True)}

    counters = asyncio.run(read_all())
    failed = {n: str(r) for n, r in counters.items() if isinstance(r, BaseException)}
    ok = {n: r for n, r in counters.items() if not isinstance(r, BaseException)}
    hits = hits_by_rule(compiled.policy, tables.pipeline, ok)  # type: ignore[arg-type]
    if args.output == "json":
        print(json.dumps({
            "rules": [{"rule_id": h.rule_id, "rule": h.rule, "action": h.action, "packets": h.packets,
                       "bytes": h.bytes, "switches": list(h.switches)} for h in hits],
            "unused_allows": [h.rule_id for h in hits if h.action == "allow" and h.packets == 0],
            "unreadable": failed,
        }, indent=2, sort_keys=True))  # fmt: skip
    else:
        width = max((len(h.rule) for h in hits), default=0)
        for h in hits:
            mark = "  UNUSED" if h.action == "allow" and h.packets == 0 else ""
            print(f"{h.rule_id:>4}  {h.rule:<{width}}  {h.packets:>10} pkts {h.bytes:>12} B{mark}")
        unused = sum(h.action == "allow" and h.packets == 0 for h in hits)
        print(
            f"{unused} allow rule(s) unused on the switches read"
            + (f"; unreadable: {', '.join(failed)}" if failed else "")
        )
    return EXIT_ERROR if failed else EXIT_OK


def cmd_audit(args: argparse.Namespace, front: Front) -> int:
    log = Path(args.state) / "audit.jsonl"
    if not log.exists():
        print(f"p4seg audit: error: no audit log at {log}", file=sys.stderr)
        return EXIT_ERROR
    if args.action == "show":
        for record in audit.records(log):
            print(json.dumps(record, sort_keys=True))
        return EXIT_OK
    verdict = audit.verify(log)
    if verdict.ok:
        print(f"{log}: {verdict.records} records, chain intact; head {verdict.last_hash}")
        return EXIT_OK
    print(
        f"{log}:{verdict.line}: chain broken after {verdict.records} good records: {verdict.problem}"
    )
    return EXIT_ERROR


HANDLERS: dict[str, Callable[[argparse.Namespace, Front], int]] = {
    "plan": cmd_apply,
    "apply": cmd_apply,
    "grant": cmd_grant,
    "revoke": cmd_revoke,
    "quarantine": cmd_quarantine,
    "release": cmd_quarantine,
    "watch": cmd_watch,
    "alerts": cmd_alerts,
    "hits": cmd_hits,
    "audit": cmd_audit,
}
__all__ = ["EXIT_CHANGES", "HANDLERS", "register"]
