"""`p4seg serve --etcd` controllers of one floor as real processes, so that a kill is a real
SIGKILL (no resignation, no clean-up of any kind):

    ctl = ServeProcesses(work, ["small.zt", "-i", "small.yaml", "--api-tokens", "access.yaml"],
                         etcd="http://127.0.0.1:2379,...", ttl=2)
    ctl.start("ctl-a")          # waits for the API banner; ctl.urls["ctl-a"] is its plain URL
    ctl.kill("ctl-a")           # SIGKILL and reap
    ctl.start("ctl-a")          # a fresh process under the same name (a new URL, a new log)
    ctl.stop()                  # every process still running

Each process has its own state and build directory under `work` (state-NAME, build-NAME)
and logs to NAME-N.out there (N: its incarnation under that name).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from topologies.switches import terminate

ROOT = Path(__file__).resolve().parent.parent
BANNER = "p4seg serve: API on "


class ServeProcesses:
    """The serve processes of one floor, by name: `common` is every argument but the
    listener, the state, the build and the etcd options (policy, inventory, tokens)."""

    def __init__(self, work: Path, common: Sequence[str], etcd: str, ttl: int) -> None:
        self.work, self.common, self.etcd, self.ttl = work, list(common), etcd, ttl
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        self.logs: dict[str, Path] = {}
        self.incarnations: dict[str, int] = {}

    def start(self, name: str, timeout: float = 60.0) -> str:
        """Start `name` (a new incarnation if it ran before) and return its API URL once it
        printed it (RuntimeError with its output if it exits or never does)."""
        n = self.incarnations.get(name, 0) + 1
        out = self.logs[name] = self.work / f"{name}-{n}.out"
        argv = ["serve", *self.common, "--api", "127.0.0.1:0", "--api-plain",
                "--state", f"state-{name}", "--build", f"build-{name}", "--interval", "0.05",
                "--hits-interval", "0", "--etcd", self.etcd, "--etcd-ttl", str(self.ttl),
                "--etcd-name", name]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with out.open("wb") as sink:
            proc = self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "p4seg", *argv], cwd=self.work, stdout=sink,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while BANNER.encode() not in out.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{out.read_text(errors='replace')}")
            time.sleep(0.02)  # polling a condition (the banner), not waiting for time to pass
        banner = out.read_text().split(BANNER, 1)[1].split()[0]
        self.urls[name] = banner.removesuffix("/v1/status").rstrip(",")
        self.incarnations[name] = n
        return self.urls[name]

    def kill(self, name: str) -> None:
        """SIGKILL `name` and reap it: once this returns, it writes nothing anywhere."""
        self.procs[name].kill()
        self.procs[name].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            terminate(proc, 30)
