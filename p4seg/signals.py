"""`p4seg signal`: a posture signal about a host, through the policy engine to the switches.

The engine (runtime/engine.py) decides; this module keeps its state in the state directory
(`engine.json`, next to `live.json`), turns its decisions into the live state's holds
(quarantines that may lapse, restrictions to profiles), and applies them the way
`quarantine` and `apply` do: a lone quarantine or release through its ToR's overlay, any
restriction through a full apply (it changes ordinary entries), audited with the signal and
the decisions. `p4seg serve` uses the same functions for its API and for containment.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from compiler.check import check_policy
from compiler.diagnostics import InventoryError, SourceError, read_source
from compiler.inventory import Inventory, load_inventory
from compiler.resolve import parse_duration
from p4seg.control import EXIT_ERROR, EXIT_OK
from runtime import audit
from runtime.engine import (
    AlertOnly,
    Decision,
    EngineSettings,
    PolicyEngine,
    Quarantine,
    Release,
    Restrict,
    Signal,
    SignalError,
    Unrestrict,
    WouldContain,
    decision_json,
)
from runtime.live import LiveState, save_json

if TYPE_CHECKING:
    from p4seg.verbs import Front

ENGINE_FILE = "engine.json"


def load_engine(state_dir: Path, settings: EngineSettings, dry_run: bool = False) -> PolicyEngine:
    """The engine with the state kept in `state_dir` (a new one if there is none);
    ValueError if the file is damaged."""
    path = state_dir / ENGINE_FILE
    if not path.exists():
        return PolicyEngine(settings, dry_run)
    try:
        doc = json.loads(path.read_text())
        return PolicyEngine.from_json(doc, settings, dry_run)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({err}); fix or remove it") from None


def save_engine(state_dir: Path, engine: PolicyEngine) -> None:
    """Atomically, like the live state."""
    save_json(state_dir, ENGINE_FILE, engine.to_json())


def hold(state: LiveState, decisions: Iterable[Decision], now: float) -> bool:
    """Carry the engine's decisions into the live state; whether anything changed. An
    operator's quarantine (`p4seg quarantine`) is neither given an end nor released."""
    before = json.dumps(_holds(state), sort_keys=True)
    for d in decisions:
        by_operator = d.host in state.quarantined and d.host not in state.automatic
        if isinstance(d, Quarantine) and not by_operator:
            state.quarantined.setdefault(d.host, now)
            state.automatic = sorted({*state.automatic, d.host})
            _until(state.quarantine_until, d.host, d.until)
        elif isinstance(d, Release) and not by_operator:
            state.quarantined.pop(d.host, None)
            state.quarantine_until.pop(d.host, None)
            state.automatic = [h for h in state.automatic if h != d.host]
        elif isinstance(d, Restrict):
            state.restricted[d.host] = list(d.profiles)
            _until(state.restricted_until, d.host, d.until)
        elif isinstance(d, Unrestrict):
            state.restricted.pop(d.host, None)
            state.restricted_until.pop(d.host, None)
    return json.dumps(_holds(state), sort_keys=True) != before


def _holds(state: LiveState) -> list[object]:
    return [
        state.quarantined,
        state.quarantine_until,
        state.automatic,
        state.restricted,
        state.restricted_until,
    ]


def _until(table: dict[str, float], host: str, until: float | None) -> None:
    if until is None:
        table.pop(host, None)
    else:
        table[host] = until


def describe(decision: Decision) -> str:
    """One line for people."""
    if isinstance(decision, Quarantine):
        return f"quarantine {decision.host}{_to(decision.until)}: {decision.reason}"
    if isinstance(decision, Restrict):
        profiles = ", ".join(decision.profiles)
        return f"restrict {decision.host} to {profiles}{_to(decision.until)}: {decision.reason}"
    if isinstance(decision, Release):
        return f"release {decision.host}: {decision.reason}"
    if isinstance(decision, Unrestrict):
        return f"unrestrict {decision.host}: {decision.reason}"
    if isinstance(decision, AlertOnly):
        return f"alert only, {decision.host} {decision.why}: {decision.reason}"
    return f"would {decision.action} {decision.host}{_to(decision.until)}: {decision.reason}"


def _to(until: float | None) -> str:
    if until is None:
        return ""
    return f" until {dt.datetime.fromtimestamp(until, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def _settings(args: argparse.Namespace) -> tuple[EngineSettings, Inventory] | None:
    """The engine's settings from the policy file (errors: `p4seg check` says which)."""
    try:
        inventory, _ = load_inventory(args.inventory)
        text = read_source(args.policy, "E000", "policy")
    except (InventoryError, SourceError) as err:
        print(f"p4seg signal: error: {err.diagnostics[0].message}", file=sys.stderr)
        return None
    result = check_policy(text, args.policy, inventory, expectations=False)
    if result.policy is None:
        print(f"p4seg signal: error: {args.policy} has errors (see `p4seg check`); nothing "
              f"recorded", file=sys.stderr)  # fmt: skip
        return None
    return EngineSettings.of(result.policy, {h.name: h.ip for h in inventory.hosts}), inventory


def cmd_signal(args: argparse.Namespace, front: Front) -> int:
    """Record a signal, decide, and apply what the engine decided (see the module)."""
    from p4seg.verbs import _load_state, clock

    ttl: int | None = None
    if args.ttl:
        seconds = parse_duration(args.ttl)
        if isinstance(seconds, str):
            print(f"p4seg signal: error: --ttl: {seconds}", file=sys.stderr)
            return EXIT_ERROR
        ttl = seconds
    loaded = _settings(args)
    state = _load_state(args, "signal")
    if loaded is None or state is None:
        return EXIT_ERROR
    settings, _inventory = loaded
    state_dir = Path(args.state)
    try:
        engine = load_engine(state_dir, settings, args.dry_run)
    except ValueError as err:
        print(f"p4seg signal: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    now = clock()
    signal = Signal(args.host, args.name, args.source, ttl, args.reason, now)
    decisions = engine.tick(now)
    try:
        decisions += engine.signal(signal)
    except SignalError as err:
        print(f"p4seg signal: error: {err}; nothing recorded", file=sys.stderr)
        return EXIT_ERROR
    doc: dict[str, object] = {"decisions": [decision_json(d) for d in decisions]}
    if args.output == "human":
        for d in decisions:
            print(describe(d))
        if not decisions:
            print(f"{args.host}: nothing changes")
    if args.dry_run or not hold(state, decisions, now):
        if not args.dry_run:  # nothing to write: the engine's state and the audit record
            save_engine(state_dir, engine)
            audit.append(state_dir / "audit.jsonl", "signal", **_event(args, ttl, doc),
                         result="no change")  # fmt: skip
        if args.output == "json":
            print(json.dumps(doc, indent=2))
        return EXIT_OK
    # In JSON, one document: the decisions and what applying them printed.
    applied = io.StringIO()
    with contextlib.redirect_stdout(applied) if args.output == "json" else contextlib.nullcontext():
        code = _write(args, front, state, decisions, _event(args, ttl, doc))
    if args.output == "json":
        text = applied.getvalue()
        try:
            doc["applied"] = json.loads(text)
        except ValueError:
            doc["applied"] = text
        print(json.dumps(doc, indent=2))
    if code == EXIT_OK:
        save_engine(state_dir, engine)
    else:
        print("p4seg signal: not applied; the signal is not recorded (send it again)",
              file=sys.stderr)  # fmt: skip
    return code


def _event(args: argparse.Namespace, ttl: int | None, doc: dict[str, object]) -> dict[str, object]:
    """The audit record's fields: the signal and the engine's decisions."""
    signal = {"name": args.name, "source": args.source, "ttl": ttl, "reason": args.reason}
    return {"host": args.host, "signal": signal, **doc}


def _write(
    args: argparse.Namespace,
    front: Front,
    state: LiveState,
    decisions: list[Decision],
    event: dict[str, object],
) -> int:
    """Apply the live state: a lone quarantine or release through its ToR's overlay (as
    `p4seg quarantine`), anything else (a restriction) through a full apply."""
    from p4seg.verbs import _apply, _overlay

    acting = [d for d in decisions if not isinstance(d, AlertOnly | WouldContain)]
    if len(acting) == 1 and isinstance(acting[0], Quarantine | Release):
        verb = "quarantine" if isinstance(acting[0], Quarantine) else "release"
        one = argparse.Namespace(**{**vars(args), "host": acting[0].host})
        code = _overlay(verb, one, front, state, event)
        if code is not None:
            return code
    return _apply("signal", args, front, state, event)
