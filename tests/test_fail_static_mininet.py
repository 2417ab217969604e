"""Fail-static on BMv2: with no controller running, simple_switch_grpc keeps enforcing the
last policy it was given through minutes of real traffic (Mininet hosts, TCP connects); a
grant that expires meanwhile stays until the first controller back removes it.

tests/test_fail_static.py shows the same on the reference switch (in CI); this one needs
BMv2 and p4c and skips without them. The traffic runs for FAIL_STATIC_SECONDS (default
120; P4SEG_FAIL_STATIC_SECONDS shortens it for a quick local run)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler.inventory import load_inventory
from compiler.p4c import p4c_available
from p4seg.cli import main
from topologies.matrix import Cell, Flow, probe
from topologies.network import Floor
from topologies.switches import free_port

pytestmark = [
    pytest.mark.mininet,
    pytest.mark.skipif(os.geteuid() != 0, reason="Mininet needs root (network namespaces, veth)"),
    pytest.mark.skipif(shutil.which("mnexec") is None, reason="Mininet's mnexec is not on PATH"),
    pytest.mark.skipif(
        shutil.which("simple_switch_grpc") is None or p4c_available() is None,
        reason="BMv2 simple_switch_grpc and p4c-bm2-ss are not on PATH: no BMv2 switch "
        "(the reference switch's fail-static test is tests/test_fail_static.py)",
    ),
]

FAIL_STATIC_SECONDS = float(os.environ.get("P4SEG_FAIL_STATIC_SECONDS", "120"))
RUN = os.getpid() % 100000  # switch names (their interfaces live in the root namespace)
GRANT_SECONDS = 3
POLICY = """\
policy static
service front = h1, h2
service back  = h3
allow front -> back tcp 8080
default deny log
"""
ALLOWED: Cell = ("h1", "h3", Flow("tcp", 8080))
DENIED: list[Cell] = [("h3", "h1", Flow("tcp", 8080)), ("h1", "h2", Flow("tcp", 22))]
GRANTED: Cell = ("h2", "h4", Flow("tcp", 443))


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[tuple[Floor, Path]]:
    hosts = "".join(f"  h{i}: {{ip: 10.0.9.{i}, switch: s{RUN}, port: {i}}}\n" for i in range(1, 5))
    (tmp_path / "static.yaml").write_text(
        "name: static\nswitches:\n"
        f'  s{RUN}: {{role: tor, device_id: 1, p4rt: "127.0.0.1:{free_port()}"}}\n'
        f"hosts:\n{hosts}"
    )
    inventory, _ = load_inventory(str(tmp_path / "static.yaml"))
    (tmp_path / "static.zt").write_text(POLICY)
    net = Floor(inventory, "bmv2")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)  # nothing the controller writes lands in the repository
        with net:
            yield net, tmp_path
    assert net.leftovers() == []


def _cli(work: Path, verb: str, *args: str) -> int:
    where = ["-p", str(work / "static.zt")] if verb == "grant" else [str(work / "static.zt")]
    where += ["-i", str(work / "static.yaml"), "--state", str(work / "state"),
              "--build", str(work / "build"), "-t", "bmv2"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        return main([verb, *args, *where])


def test_bmv2_enforces_the_last_policy_with_no_controller(floor: tuple[Floor, Path]) -> None:
    net, work = floor
    assert _cli(work, "apply") == 0
    assert _cli(work, "grant", "h2", "h4", "tcp", "443", "--for", f"{GRANT_SECONDS}s") == 0
    granted_at = time.time()
    cells = [ALLOWED, *DENIED, GRANTED]
    expected = {ALLOWED: True, GRANTED: True} | {c: False for c in DENIED}
    assert probe(net, cells) == expected
    # Every controller gone: no process of ours talks to the switch from here on.
    rounds = 0
    deadline = time.monotonic() + FAIL_STATIC_SECONDS
    while time.monotonic() < deadline:
        observed = probe(net, cells)
        assert observed == expected, f"round {rounds}: {observed}"
        rounds += 1
    assert time.time() - granted_at > GRANT_SECONDS  # it expired while no controller ran
    print(f"fail-static on BMv2: {rounds} rounds of {len(cells)} real flows over "
          f"{FAIL_STATIC_SECONDS:g} s, all as the last policy says")  # fmt: skip
    # The first controller back applies what is due: the expired grant goes.
    assert _cli(work, "watch", "--once") == 0
    assert probe(net, cells) == expected | {GRANTED: False}
    records = [
        json.loads(line) for line in (work / "state" / "audit.jsonl").read_text().splitlines()
    ]
    assert any(r.get("expired_grants") for r in records if r["event"] == "watch")
