"""Rate limits with real packets: a Mininet floor of one ToR (the reference switch; BMv2
too when simple_switch_grpc and p4c-bm2-ss are installed), `p4seg apply`,
then a UDP flow offered at 1,000 pps to a receiver behind a `rate 100pps` allow and the
same flow to a receiver behind an allow without a rate. The metered flow must arrive at
about its rate, the other whole, and `p4seg hits` must report the metered rule's red
(dropped over the rate) packets.

The tolerance is deliberately generous (the point is enforcement, not precision): the
metered flow must deliver 50..200 pps averaged over the run, the unmetered one > 90 %.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from compiler.inventory import Inventory, load_inventory
from compiler.p4c import p4c_available
from p4seg.cli import main
from topologies.network import Floor
from topologies.switches import free_port

pytestmark = [
    pytest.mark.mininet,
    pytest.mark.skipif(os.geteuid() != 0, reason="Mininet needs root (network namespaces, veth)"),
    pytest.mark.skipif(shutil.which("mnexec") is None, reason="Mininet's mnexec is not on PATH"),
]

RATE, OFFERED, SECONDS = 100, 1000, 3.0
RUN = os.getpid() % 100000  # switch names (their interfaces live in the root namespace)

POLICY = f"""\
policy rates
allow src -> metered   udp 5000 rate {RATE}pps
allow src -> unmetered udp 5000
default deny
"""

# Inside a host: `send DST PORT PPS SECONDS` paces datagrams and prints how many it sent;
# `recv ADDR PORT` prints "ready", then counts datagrams until stdin closes and prints it.
PROGRAM = r"""
import select, socket, sys, threading, time
mode = sys.argv[1]
if mode == "send":
    dst, port, pps, seconds = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    start = due = time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        s.sendto(b"x" * 64, (dst, port))
        sent += 1
        due += 1 / pps
        time.sleep(max(0.0, due - time.monotonic()))
    print(sent, time.monotonic() - start, flush=True)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((sys.argv[2], int(sys.argv[3])))
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    got = 0
    while not stop.is_set():
        if select.select([s], [], [], 0.05)[0]:
            s.recv(2048)
            got += 1
    print(got, flush=True)
"""


BMV2_MISSING = shutil.which("simple_switch_grpc") is None or p4c_available() is None
TARGETS = [
    "ref",
    pytest.param(
        "bmv2",
        marks=pytest.mark.skipif(
            BMV2_MISSING,
            reason="BMv2 simple_switch_grpc and p4c-bm2-ss are not on PATH: no BMv2 floor",
        ),
    ),
]


@pytest.fixture(params=TARGETS)
def floor(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Floor, Path]]:
    inv_path = tmp_path / "rates.yaml"
    inv_path.write_text(
        "name: rates\n"
        "switches:\n"
        f'  r{RUN}: {{role: tor, device_id: 1, p4rt: "127.0.0.1:{free_port()}"}}\n'
        "hosts:\n"
        f"  src:       {{ip: 10.0.7.1, switch: r{RUN}, port: 1}}\n"
        f"  metered:   {{ip: 10.0.7.2, switch: r{RUN}, port: 2}}\n"
        f"  unmetered: {{ip: 10.0.7.3, switch: r{RUN}, port: 3}}\n"
    )
    inventory, diags = load_inventory(str(inv_path))
    assert inventory is not None, diags
    (tmp_path / "rates.zt").write_text(POLICY)
    net = Floor(inventory, request.param)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)  # nothing the controller writes lands in the repository
        with net:
            yield net, tmp_path
    assert net.leftovers() == []


def _cli(work: Path, target: str, verb: str, *args: str) -> tuple[int, str]:
    """`p4seg VERB` on this floor: its exit status and what it printed."""
    policy = [str(work / "rates.zt")]
    where = ["-i", str(work / "rates.yaml"), "--state", str(work / "state"),
             "--build", str(work / "build")]  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([verb, *args, *policy, *where, "-t", target])
    return code, out.getvalue()


def _host(net: Floor, host: str, *args: str) -> subprocess.Popen[str]:
    proc: subprocess.Popen[str] = net.hosts[host].popen(
        [sys.executable, "-c", PROGRAM, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc


def _offer(net: Floor, inventory: Inventory, receiver: str) -> tuple[int, int, float]:
    """(sent, received, seconds) of one paced UDP flow from `src` to `receiver`."""
    addr = inventory.hosts_by_name[receiver].ip_text
    recv = _host(net, receiver, "recv", addr, "5000")
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
        send = _host(net, "src", "send", addr, "5000", str(OFFERED), str(SECONDS))
        out, err = send.communicate(timeout=SECONDS + 30)
        assert send.returncode == 0, err
        sent_text, seconds_text = out.split()
        # Whatever the switch still queues arrives within its forwarding delay; the
        # receiver's select loop then sees stdin close and reports.
        got, err = recv.communicate("", timeout=30)
        return int(sent_text), int(got.strip()), float(seconds_text)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def test_a_rate_limited_flow_arrives_at_its_rate_and_hits_counts_the_red(
    floor: tuple[Floor, Path],
) -> None:
    net, work = floor
    code, out = _cli(work, net.target, "apply")
    assert code == 0, out
    inventory = net.inventory
    sent_u, got_u, secs_u = _offer(net, inventory, "unmetered")
    sent_m, got_m, secs_m = _offer(net, inventory, "metered")
    rate_m, rate_u = got_m / secs_m, got_u / secs_u
    print(
        f"\n{net.target}: metered (rate {RATE}pps): sent {sent_m} in {secs_m:.2f} s ({sent_m / secs_m:.0f} pps), "
        f"received {got_m} ({rate_m:.0f} pps)\n"
        f"unmetered: sent {sent_u} in {secs_u:.2f} s ({sent_u / secs_u:.0f} pps), "
        f"received {got_u} ({rate_u:.0f} pps, {100 * got_u / sent_u:.1f} %)"
    )
    assert sent_m / secs_m > 0.8 * OFFERED, "the sender could not offer the load"
    assert 50 <= rate_m <= 200, f"metered flow delivered {rate_m:.0f} pps"
    assert got_u > 0.9 * sent_u, f"unmetered flow lost {sent_u - got_u} of {sent_u}"

    code, out = _cli(work, net.target, "hits", "--output", "json")
    assert code == 0, out
    rules = {r["rule_id"]: r for r in json.loads(out[out.index("{") :])["rules"]}
    metered, unmetered = rules[1], rules[2]
    print(f"hits: rule 1 {metered['packets']} packets, {metered['red']} red; rule 2 "
          f"{unmetered['packets']} packets")  # fmt: skip
    assert metered["rate_pps"] == RATE and metered["packets"] >= got_m
    # Red packets: the ones the meter dropped, all of what was sent beyond what arrived
    # (give or take what the host's or switch's sockets lost on their own).
    assert metered["red"] >= 0.9 * (sent_m - got_m), metered
    assert metered["red"] <= metered["packets"] - got_m, metered
    assert "red" not in unmetered
