"""Spines out of service: the controller's record of them, and how `watch` follows them.

The state directory's `down.json` lists the spines the controller found dead; every verb
that compiles with `--state` routes around them (compiler/lower.py, `inventory.down`).
`watch` probes every spine each `--check` period (one P4Runtime cookie read on a channel
of its own: a dead process refuses the connection at once, a hung one times out):

- a spine that stops answering is written to `down.json`, and the next apply changes the
  ToRs' routing only — the hosts it carried move to the live spines;
- a down spine that answers again gets its own tables first (while no ToR routes through
  it yet), then leaves `down.json`, and the next apply routes its hosts back through it.

Only routing changes: the identity and policy entries are the same with or without a
spine, so a spine's death can never widen what the policy allows (docs/controller.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from compiler.diagnostics import InventoryError, error
from compiler.inventory import Inventory, Switch
from runtime import grpc_loops

if TYPE_CHECKING:  # the runtime (finsy, grpc) is imported where used: `check` reads down.json
    from finsy.grpcutil import GRPCCredentialsTLS

    from p4seg.control import Compiled

DOWN_FILE = "down.json"  # in the state directory: {"down": [spine, ...]}
PROBE_TIMEOUT = 2.0  # seconds a live spine has to answer a probe


def read_down(state_dir: Path) -> list[str]:
    """The spines the state directory records as out of service (none if no record); a
    record that cannot be read is a ValueError (never guessed: it decides routing)."""
    path = state_dir / DOWN_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the spines out of service: {err}") from None
    names = doc.get("down") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f'{path}: expected {{"down": [spine names]}}')
    return names


def write_down(state_dir: Path, names: Iterable[str]) -> None:
    """Record the spines out of service (atomically: a reader sees the old or the new)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{DOWN_FILE}.tmp"
    tmp.write_text(json.dumps({"down": sorted(set(names))}) + "\n")
    os.replace(tmp, state_dir / DOWN_FILE)


def take_down(inventory: Inventory, args: argparse.Namespace) -> Inventory:
    """The inventory with the spines of `--down` and of the state directory out of service
    (an InventoryError naming where an unknown or non-spine name came from)."""
    inventory = inventory.with_down(getattr(args, "down", None) or ())
    state = getattr(args, "state", None)
    if state:
        try:
            recorded = read_down(Path(state))
        except ValueError as err:
            raise InventoryError([error("E301", str(err), None)]) from None
        inventory = inventory.with_down(recorded, str(Path(state) / DOWN_FILE))
    return inventory


def follow_spines(
    args: argparse.Namespace, compiled: Compiled, restore: Callable[[str], bool]
) -> dict[str, object] | None:
    """Probe every spine of `compiled`'s inventory and update `down.json`: a spine that
    stopped answering goes down; a spine `down.json` holds that answers again is
    `restore`d (its own tables written; True if that worked) and comes back — one taken
    down by hand (the inventory's `down`, `--down`) stays down. Returns what changed (the
    audit event of the routing change the caller applies next), or None."""
    from p4seg.control import options_of

    state_dir = Path(args.state)
    options = options_of(args)
    try:
        recorded = set(read_down(state_dir))
    except ValueError as err:
        print(f"p4seg watch: {err}", file=sys.stderr)
        return None
    if isinstance(options, str):
        return None  # reported by the apply itself
    spines = [s for s in compiled.inventory.switches if s.role == "spine"]
    answers = grpc_loops.run(_answering(spines, options.tls, min(options.timeout, PROBE_TIMEOUT)))
    down = compiled.inventory.down
    gone = sorted(n for n, up in answers.items() if not up and n not in down)
    back = sorted(n for n, up in answers.items() if up and n in recorded)
    if gone:
        print(f"-- {', '.join(gone)}: not answering: routing around", flush=True)
    for name in list(back):
        print(f"-- {name}: answering again: restoring its tables first", flush=True)
        if not restore(name):
            back.remove(name)  # it stays down; tried again at the next check
    if not gone and not back:
        return None
    write_down(state_dir, (recorded | set(gone)) - set(back))
    return {"spines_down": gone, "spines_back": back}


async def _answering(
    spines: Sequence[Switch], tls: GRPCCredentialsTLS | None, timeout: float
) -> dict[str, bool]:
    """Whether each spine's P4Runtime server answers (any answer, even an error: a switch
    that lost its pipeline answers too), all probed at once.

    Each probe has a channel of its own (gRPC's local subchannel pool): a channel shared
    with a dead switch's address waits out gRPC's reconnect backoff (up to finsy's 15 s)
    after the switch is back, and a probe must see it back at once."""
    import grpc
    from finsy.grpcutil import GRPCOptions, grpc_channel
    from finsy.proto import p4r, p4r_grpc

    class _OwnChannel(GRPCOptions):
        def to_native(self) -> list[tuple[str, int | str]]:
            return [*super().to_native(), ("grpc.use_local_subchannel_pool", 1)]

    async def one(switch: Switch) -> bool:
        channel = grpc_channel(switch.p4rt, credentials=tls, options=_OwnChannel())
        request = p4r.GetForwardingPipelineConfigRequest(
            device_id=switch.device_id,
            response_type=p4r.GetForwardingPipelineConfigRequest.COOKIE_ONLY,
        )
        try:
            await p4r_grpc.P4RuntimeStub(channel).GetForwardingPipelineConfig(
                request, timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            return err.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        finally:
            await channel.close()
        return True

    found = await asyncio.gather(*(one(s) for s in spines))
    return {s.name: up for s, up in zip(spines, found, strict=True)}
