"""runtime/grpc_loops.py: a gRPC completion that belongs to a call of an event loop already
closed (the controller's per-operation `asyncio.run`) reaches the long-lived loop gRPC's
poller is bound to (serve's); without the handler it is a traceback per event there.

gRPC binds its poller to the first loop of the process, so each case runs in a process of
its own (this file, run as a script)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from finsy.proto import p4r, p4r_grpc

from runtime import grpc_loops

ROOT = Path(__file__).resolve().parent.parent


class _Streams(p4r_grpc.P4RuntimeServicer):
    """Reads each stream to its end (its client's loop closing cancels it)."""

    async def StreamChannel(
        self, request_iterator: AsyncIterator[p4r.StreamMessageRequest], context: object
    ) -> AsyncIterator[p4r.StreamMessageResponse]:
        async for _ in request_iterator:
            pass
        return
        yield  # an async generator: the response stream


class _Closed(logging.Handler):
    """Counts the closed-loop errors the asyncio logger reports."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "Event loop is closed" in f"{record.getMessage()} {record.exc_info}"


def _scenario(handled: bool) -> dict[str, int]:
    """A long-lived loop serves P4Runtime streams (gRPC's poller binds to it); clients open
    streams from short-lived loops that close under them. Their last completions reach the
    long-lived loop: logged there (without the handler) or dropped and counted."""
    closed = _Closed()
    logging.getLogger("asyncio").addHandler(closed)
    loop = asyncio.new_event_loop()
    if handled:
        grpc_loops.ignore_closed_loop_events(loop)
    ready, done = threading.Event(), asyncio.Event()
    port: list[int] = []

    async def serve() -> None:
        server = grpc.aio.server()
        p4r_grpc.add_P4RuntimeServicer_to_server(_Streams(), server)  # type: ignore[abstract]  # only the stream
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        ready.set()
        await done.wait()
        await server.stop(None)

    async def client() -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port[0]}")
        call = p4r_grpc.P4RuntimeStub(channel).StreamChannel()
        await call.write(p4r.StreamMessageRequest())
        # returns with the stream open: asyncio.run closes this loop under it

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    assert ready.wait(10)
    # as the controller runs its operations: each in a loop of its own (with the handler,
    # which any bound loop needs: whichever wakes first delivers the others' completions)
    run = grpc_loops.run if handled else asyncio.run
    for _ in range(5):
        run(client())
        gc.collect()  # the call goes: its cancellation completes for the closed loop
    seen = threading.Event()
    for _ in range(30):  # until the completions have come through (a condition, not a sleep)
        if closed.count + grpc_loops.dropped >= 1:
            seen.set()
            break
        seen.wait(0.1)
    loop.call_soon_threadsafe(done.set)
    thread.join(10)
    return {"logged": closed.count, "dropped": grpc_loops.dropped}


def _run(case: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    out = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True,
                         env=env, timeout=60, check=True)  # fmt: skip
    result: dict[str, int] = json.loads(out.stdout.splitlines()[-1])
    return result


class PollerCompletionQueue:
    """Stands for gRPC's poller in a handle's repr (`PollerCompletionQueue._handle_events`)."""

    def _handle_events(self) -> None:
        raise RuntimeError("Event loop is closed")


def test_the_handler_drops_exactly_the_closed_loop_event_and_passes_the_rest_on() -> None:
    loop = asyncio.new_event_loop()
    seen: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    grpc_loops.ignore_closed_loop_events(loop)
    try:
        before = grpc_loops.dropped
        handle = asyncio.Handle(PollerCompletionQueue()._handle_events, (), loop)
        closed = RuntimeError("Event loop is closed")
        loop.call_exception_handler({"message": "x", "exception": closed, "handle": handle})
        assert grpc_loops.dropped == before + 1 and seen == []
        # Another error of the poller, or the same error elsewhere: the previous handler.
        other = {"message": "y", "exception": ValueError("no"), "handle": handle}
        elsewhere = {"message": "z", "exception": closed, "handle": asyncio.Handle(print, (), loop)}
        loop.call_exception_handler(other)
        loop.call_exception_handler(elsewhere)
        assert seen == [other, elsewhere] and grpc_loops.dropped == before + 1
    finally:
        loop.close()


def test_real_grpc_completions_of_closed_loops_are_counted_not_logged() -> None:
    """The real case, in processes of their own: without the handler the long-lived loop
    logs the error, with it nothing is logged. gRPC decides when a closed loop's last
    completion comes (the call's cancellation when it is collected): each case is run up
    to 3 times until one comes, and a test in which none came says so and checks nothing."""
    unhandled = _until("unhandled", "logged")
    handled = _until("handled", "dropped")
    if unhandled["logged"] == 0 or handled["dropped"] == 0:
        pytest.skip(f"gRPC gave no closed loop a completion in 3 runs: {unhandled}, {handled}")
    assert handled["logged"] == 0, handled


def _until(case: str, count: str, runs: int = 3) -> dict[str, int]:
    """The first of `runs` runs of `case` in which `count` is not 0 (else the last)."""
    for _ in range(runs):
        result = _run(case)
        if result[count]:
            break
    return result


if __name__ == "__main__":
    print(json.dumps(_scenario(sys.argv[1] == "handled")))
