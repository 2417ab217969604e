"""runtime/grpc_loops.py: a gRPC completion that belongs to a call of an event loop already
closed (the controller's per-operation `asyncio.run`) reaches the long-lived loop gRPC's
poller is bound to (serve's); without the handler it is a traceback per event there.

gRPC binds its poller to the first loop of the process, so each case runs in a process of
its own (this file, run as a script)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
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
    for _ in range(3):
        asyncio.run(client())
    seen = threading.Event()
    for _ in range(100):  # until the completions have come through (a condition, not a sleep)
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


def test_without_the_handler_the_long_lived_loop_logs_a_traceback() -> None:
    assert _run("unhandled")["logged"] >= 1


def test_with_the_handler_they_are_counted_not_logged() -> None:
    result = _run("handled")
    assert result["logged"] == 0 and result["dropped"] >= 1, result


if __name__ == "__main__":
    print(json.dumps(_scenario(sys.argv[1] == "handled")))
