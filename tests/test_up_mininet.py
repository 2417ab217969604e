"""`p4seg up --keep` on an inventory whose names Linux and Mininet would not take as they are:
long host and switch names with `-`, two ToRs and two hosts whose names are the same when
cut to interface length, ports up to 254, and two switches with real (not loopback)
P4Runtime addresses on the same port. The verb runs as a user runs it (a process with
its prompt on a pipe): the floor comes up, the segmentation matrix is all as expected,
commands typed at the prompt in inventory names run on the right nodes and print their
output, and `exit` tears everything down — checked on the machine, and cleaned up by the
test itself if the verb failed to.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_floor_mininet import one_floor_per_machine

from compiler.inventory import load_inventory
from topologies.names import node_names

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.mininet,
    pytest.mark.skipif(os.geteuid() != 0, reason="Mininet needs root (network namespaces, veth)"),
    pytest.mark.skipif(shutil.which("mnexec") is None, reason="Mininet's mnexec is not on PATH"),
]

DEADLINE = 180.0  # seconds: bounds on things that must happen (floor up, matrix), never pauses
COMMAND_DEADLINE = 30.0
PROMPT = "mininet> "

EAST, WEST, SPINE = (
    "tor-research-compute-east",
    "tor-research-compute-west",
    "spine-interconnect-core-01",
)
PRIMARY, SECOND = "hdb-replica-primary-01", "hdb-replica-primary-02"
ENGINE, OPS = "algo-engine-research-01", "ops1"
PORT = 50311  # the one switch given a loopback address; the others have real switches'

INVENTORY = f"""\
name: long_names
switches:
  {EAST}: {{role: tor, device_id: 1, p4rt: "127.0.0.1:{PORT}"}}
  {WEST}: {{role: tor, device_id: 2, p4rt: "10.99.0.2:9559"}}
  {SPINE}: {{role: spine, device_id: 3, p4rt: "10.99.0.3:9559"}}
hosts:
  {PRIMARY}: {{ip: 10.20.1.11, switch: {EAST}, port: 1}}
  {SECOND}: {{ip: 10.20.1.12, switch: {EAST}, port: 254}}
  {ENGINE}: {{ip: 10.20.2.11, switch: {WEST}, port: 1}}
  {OPS}: {{ip: 10.20.2.50, switch: {WEST}, port: 2}}
links:
  - endpoints: ["{EAST}:253", "{SPINE}:1"]
  - endpoints: ["{WEST}:253", "{SPINE}:254"]
"""

POLICY = f"""\
policy long_names
service replicas = {PRIMARY}, {SECOND}
service engine   = {ENGINE}
service ops      = {OPS}
allow engine   -> replicas tcp 5432
allow replicas -> replicas tcp 5433
allow ops      -> replicas icmp
default deny log
"""


class Stream:
    """Everything a process wrote to one pipe so far, read as it comes (a prompt has no
    newline, so nothing here waits for one)."""

    def __init__(self, pipe: object) -> None:
        self.fd = pipe.fileno()  # type: ignore[attr-defined]
        self.data = b""

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def until(self, done: Callable[[str], bool], limit: float) -> bool:
        """Read until `done(text)` holds, the pipe closes or `limit` seconds pass."""
        deadline = time.monotonic() + limit
        while not done(self.text):
            if not select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return False
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return done(self.text)
            self.data += chunk
        return True


def p4seg(*args: str, cwd: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    """The p4seg command line of this checkout, as a process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(cwd)}  # HOME: Mininet's history
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "p4seg.cli", *args], cwd=cwd, env=env, **kwargs
    )


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def leftovers(short: dict[str, str]) -> tuple[list[str], list[int]]:
    """What of this floor is on the machine: interfaces named after its nodes, and its
    processes (host shells `mininet:<node>`, switches on its nodes' interfaces)."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    prefixes = tuple(f"{s}-eth" for s in short.values())
    found = [
        name
        for line in links.splitlines()
        if (name := line.split(":")[1].strip().split("@")[0]).startswith(prefixes)
    ]
    shells = {f"mininet:{s}" for s in short.values()}

    def ours(argv: list[str]) -> bool:  # a host's shell, or a switch with `-i PORT@IFACE`
        return bool(shells & set(argv)) or any(
            a.partition("@")[2].startswith(prefixes) for a in argv
        )

    pids = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and ours(_cmdline(pid))]
    return found, pids


@contextlib.contextmanager
def nothing_left(short: dict[str, str]) -> Iterator[None]:
    """Fails the test if the floor left anything behind; removes it either way."""
    try:
        yield
    finally:
        interfaces, pids = leftovers(short)
        for pid in pids:  # only this floor's: matched on its node names above
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in interfaces:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    assert (interfaces, pids) == ([], []), "the floor left these behind"


def test_up_keep_on_long_names_with_dashes(tmp_path: Path) -> None:
    (tmp_path / "floor.yaml").write_text(INVENTORY)
    (tmp_path / "policy.zt").write_text(POLICY)
    inventory, diags = load_inventory(str(tmp_path / "floor.yaml"))
    assert inventory is not None, diags
    short = node_names([*(s.name for s in inventory.switches), *(h.name for h in inventory.hosts)])
    # The trap: cut to interface length, the two ToRs (and the two replicas) are one name.
    assert EAST[:8] == WEST[:8] and PRIMARY[:8] == SECOND[:8]
    check = p4seg("check", "--strict", "policy.zt", "-i", "floor.yaml", cwd=tmp_path)
    assert check.wait(60) == 0

    argv = ["up", "policy.zt", "-i", "floor.yaml", "--keep", "--state", "state"]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with one_floor_per_machine(), nothing_left(short):
        assert leftovers(short) == ([], []), "a floor of this test is already up"
        proc = p4seg(*argv, cwd=tmp_path, **pipes)
        assert proc.stdin is not None
        out, err = Stream(proc.stdout), Stream(proc.stderr)
        prompts = 0
        try:
            # The floor, the policy, the matrix, then the hint and the prompt.
            prompts += 1
            out.until(lambda text: text.count(PROMPT) == prompts, DEADLINE)
            err.until(lambda _: False, 0.0)
            text = out.text
            assert PROMPT in text, text + err.text
            assert "all as expected" in text, text + err.text
            # Real switches' addresses: served on loopback for the floor; 127.0.0.1 kept.
            assert f"{WEST} 10.99.0.2:9559 -> 127.0.0.1:" in err.text, err.text
            assert f"{SPINE} 10.99.0.3:9559 -> 127.0.0.1:" in err.text
            assert f"{EAST} 127.0.0.1:{PORT} ->" not in err.text
            assert re.search(r"\(([1-9][0-9]*) allowed by the policy\)", text), text
            # The hint names this floor's hosts: ops1 may ping the replicas.
            assert f"Try: {OPS} ping -c1 {PRIMARY}" in text, text
            assert "oms1" not in text and "md1 " not in text  # the example floor's hosts

            def typed(line: str) -> str:
                """Type a line at the prompt; what it printed by the next prompt. (Mininet
                hands what is typed while a command runs to that command: wait, as a user
                does.)"""
                nonlocal prompts
                assert proc.stdin is not None
                mark = len(err.data)
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()
                prompts += 1
                assert out.until(lambda text: text.count(PROMPT) == prompts, COMMAND_DEADLINE)
                err.until(lambda _: False, 0.0)  # what is there already
                return err.data[mark:].decode(errors="replace")

            # A host named with '-': the command runs in its shell and its output is printed.
            assert typed(f"{PRIMARY} echo typed-$((6*7))").split() == ["typed-42"]
            # Host names after the command are their addresses; the policy lets ops1 ping.
            ping = typed(f"{OPS} ping -c1 -W2 {SECOND}")
            assert "10.20.1.12" in ping and " 1 received" in ping, ping
            # ... and not the engine: the prompt sees the same enforcement as the matrix.
            ping = typed(f"{ENGINE} ping -c1 -W1 {PRIMARY}")
            assert " 0 received" in ping, ping
            # A switch named with '-', on its port 253 (the interface name fits).
            link = f"{short[WEST]}-eth253"
            assert link in typed(f"{WEST} ip -br link show {link}")
            # `py` reaches nodes by inventory name.
            assert typed(f"py node['{SECOND}'].name").split() == [short[SECOND]]
            proc.stdin.write(b"exit\n")
            proc.stdin.close()
            assert proc.wait(DEADLINE) == 0
            err.until(lambda _: False, 5.0)  # to the end: the pipe closes
            assert "torn down" in err.text and "left behind" not in err.text, err.text
        finally:
            if proc.poll() is None:  # a failure above: end of input ends the prompt
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
                try:
                    proc.wait(DEADLINE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
