"""gRPC's asyncio stack with one short-lived event loop per operation.

The controller runs each apply, quarantine or probe in an event loop of its own
(`asyncio.run`), while `p4seg serve` keeps one long-lived loop for its API, its etcd client
and its follower. gRPC delivers every completion through one poller, bound to the first
loop that used gRPC; a completion that belongs to a call of a loop already closed (a
cancelled stream's last event, arriving after its `asyncio.run` returned) makes the poller
hand it to that closed loop, and `call_soon_threadsafe` raises RuntimeError there. Nothing
waits for such an event any more (its loop is gone), and the poller drains the rest of its
queue at the next wake-up, so nothing is lost — but the long-lived loop's default handler
would print a traceback per event (grpc/grpc#25364 is the same poller's multi-loop noise).

`ignore_closed_loop_events` installs, on a loop, a handler that drops exactly that case and
counts it; every other exception goes to the handler it replaces. `run` is `asyncio.run`
with it (the controller's per-operation loops); serve installs it on its own loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_POLLER = "PollerCompletionQueue._handle_events"
dropped = 0  # completions of calls whose event loop had already closed


def _closed_loop_event(context: dict[str, Any]) -> bool:
    err = context.get("exception")
    return (
        isinstance(err, RuntimeError)
        and str(err) == "Event loop is closed"
        and _POLLER in repr(context.get("handle"))
    )


def ignore_closed_loop_events(loop: asyncio.AbstractEventLoop) -> None:
    """On `loop`, drop gRPC completions for calls of event loops already closed (above)."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        global dropped
        if _closed_loop_event(context):
            dropped += 1
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a loop with the handler above: the controller's per-operation
    loops deliver the completions of loops closed before them too."""
    with asyncio.Runner() as runner:
        ignore_closed_loop_events(runner.get_loop())
        return runner.run(main)
