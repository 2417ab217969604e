"""A real headless browser for the tests: Chromium driven over the DevTools protocol.

`Browser` starts `chromium --headless` on a private profile, opens one page and evaluates
JavaScript in it, so a test can watch a page that updates itself (the live map) rather than
read a one-shot DOM dump. The process and its profile are removed on `close()`.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


class Browser:
    """One headless Chromium with one page; use `async with Browser(url) as page`."""

    def __init__(self, url: str, startup_timeout: float = 30.0) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed")
        self.url = url
        self.startup_timeout = startup_timeout
        self._profile = tempfile.mkdtemp(prefix="p4seg-chromium-")
        self._proc: subprocess.Popen[str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._next_id = 0

    async def __aenter__(self) -> Browser:
        self._proc = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless=new",
                "--no-sandbox",  # tests run as root
                "--disable-gpu",
                "--ignore-certificate-errors",  # the service's test certificate
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        endpoint = await asyncio.to_thread(self._endpoint)
        port = endpoint.split(":")[2].split("/")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        page = next(t for t in targets if t.get("type") == "page")
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self.call("Page.enable")
        await self.call("Page.navigate", url=self.url)
        await asyncio.wait_for(self._event("Page.loadEventFired"), self.startup_timeout)
        return self

    async def _event(self, method: str) -> dict[str, Any]:
        assert self._ws is not None
        while True:
            msg = await self._ws.receive_json()
            if msg.get("method") == method:
                params: dict[str, Any] = msg.get("params", {})
                return params

    def _endpoint(self) -> str:
        assert self._proc is not None and self._proc.stderr is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            line = self._proc.stderr.readline()
            if not line and self._proc.poll() is not None:
                break
            found = _LISTENING.search(line)
            if found:
                return found.group(1)
        raise RuntimeError("chromium did not start its DevTools endpoint")

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        assert self._ws is not None
        self._next_id += 1
        ident = self._next_id
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            msg = await self._ws.receive_json()
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                result: dict[str, Any] = msg.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Evaluate until the expression is truthy; its value (TimeoutError otherwise). An
        expression that throws (the page still drawing) counts as not yet."""
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                value = await self.evaluate(expression)
            except RuntimeError as err:
                value, last = None, err
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never made {expression!r} true (last: {last})")
            await asyncio.sleep(0.1)  # a poll interval between evaluations, not a wait for time

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            if self._proc.stderr is not None:
                self._proc.stderr.close()
        shutil.rmtree(self._profile, ignore_errors=True)
