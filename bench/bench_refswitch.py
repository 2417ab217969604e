"""The reference switch on real interfaces and over P4Runtime: figures, never asserted.

    python -m bench.bench_refswitch              # everything (about 7 minutes, needs root)
    python -m bench.bench_refswitch --quick      # 2 s trials, 5k entries (about 2 minutes)
    python -m bench.bench_refswitch --only p4rt  # just the P4Runtime figures
    python -m bench.bench_refswitch --profile    # also: where the switch spends its time
    python -m bench.bench_refswitch --only newflows  # new flows/s, 3.9k and 20k policy entries (~1 min)

Data plane. One `p4seg-switch` runs tor-alg's compiled tables (policies/trading_floor.zt on
topologies/trading_floor.yaml) between two veths; a sender and a receiver sit in network
namespaces at the other ends. The flow is one the policy allows, checked on the compiled
tables with compiler.evaluate before anything is sent: by default md1 -> algo1 udp/30005,
arriving from the spine on port 9 and leaving on algo1's port 1, in 64-byte frames. The
baseline is a Linux bridge on the same veths, measured in the same run; ratios are against it.
BMv2's simple_switch_grpc (from PATH or /opt/p4/bin, with p4c's JSON of the bmv2 build) is
measured last the same way when it is installed.

- CPU placement: the generator (and the kernel's receive path, as a NIC's would be) on one
  CPU, the device under test on the other: the switch process is pinned there, and the
  bridge's forwarding is steered there with RPS on its ingress veth.
- flood: the sender offers as much as it can for a few seconds; delivered = frames out of
  the device while the sender ran / its time, loss over the whole trial once the device has
  drained; the best of two (`generator alone`: the sender into a veth that drops
  everything, the most it can offer).
- paced: evenly spaced frames, rate stepped up then bisected; a rate is loss-free when
  every frame arrives and at most 0.1 s of traffic is still queued when the sender stops
  (a failed trial is tried once more: other load can only make trials fail).
- latency: 1 kpps paced, a send timestamp in the payload, the receiver's kernel receive
  timestamp (same host clock): one-way p50/p99. Again with the switch at real-time
  priority (chrt --fifo 50), which shows how much of the tail is waiting for the CPU
  behind other processes rather than the switch's own work.
- Other load on the machine lowers every figure: each part ends with the share of the CPUs
  other processes used meanwhile; --wait-quiet S waits for idle CPUs before each trial.

P4Runtime. A switch without ports on 127.0.0.1; 20k distinct routing entries (/32 routes)
and 20k distinct policy entries (ranges, ternaries, priorities) written in batches of 1000
and read back with one wildcard Read: through finsy (the project's client) and through the
raw grpc stub with prebuilt messages (the baseline: protocol and server cost only).

New flows (`--only newflows`, in-process, no root). The 10k-rule generated floor
(bench/gen_policy.py, 1,000 hosts, 48 ToRs) compiled for the reference switch; its busiest
ToR (3,858 policy entries matching tag slices), then the same ToR with its policy table
grown to 20,000 entries (compiled permits copied onto more ports), each loaded into a
`ReferenceSwitch`; every frame a flow the cache has not seen (half built to match a permit
entry, half between random hosts and ports): new flows/s through `Dataplane.process` with
the evaluator's indexes, then the same data plane with every lookup a linear scan (the
baseline, on a sample), which must decide the same; the first frame after loading and
after a one-entry write; each table's lookup time alone.

Targets (issue "Reference switch"; BMv2 simple_switch_grpc on these machines forwards about
18 kpps, loss-free up to ~10 kpps paced, p50 ~0.1 ms; a Linux bridge does >= 300 kpps):
>= 18 kpps, p99 < 1 ms at 1 kpps, >= 20k entries/s batched writes, a 20k-entry read < 0.5 s.

Namespaces, veths and the bridge are named p4sb-<pid in hex>-*; they and every process the
bench starts are removed on exit, Ctrl-C or failure, and leftovers of dead runs at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import gc
import io
import itertools
import json
import logging
import os
import pstats
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import finsy
import grpc
from finsy.proto import p4r, p4r_grpc
from google.protobuf import text_format

from bench.gen_policy import generate
from compiler.check import check_policy
from compiler.emit import build
from compiler.entries import FieldMatch, SwitchTables, TableEntry
from compiler.evaluate import (
    IndexedSwitch,
    PacketFields,
    ScanSwitch,
    evaluate,
)
from compiler.inventory import Host, Inventory, load_inventory
from compiler.model import Policy
from compiler.p4c import P4C_BMV2, p4c_artifacts
from compiler.protocols import PROTO_TCP, PROTO_UDP
from compiler.tags import FIELD_MASK, FIELD_VALUES
from p4src.p4info import build_p4info
from p4src.refconfig import device_config
from p4src.spec import (
    CPU_CLONE_SESSION,
    DEFAULT_SIZES,
    PIPELINE,
    TAG_BITS,
    TAG_FIELD_BITS,
    Pipeline,
    build_pipeline,
)
from runtime.entities import default_entry_proto, table_entry_proto
from runtime.refswitch.dataplane import parse
from runtime.refswitch.ports import PortIO
from runtime.refswitch.server import serve
from runtime.refswitch.switch import ReferenceSwitch
from topologies.switches import free_port

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "trading_floor.zt"
TOPOLOGY = ROOT / "topologies" / "trading_floor.yaml"
SWITCH = "tor-alg"
P4_TOOLS = Path("/opt/p4/bin")  # BMv2 and p4c, where these machines have them
PREFIX = "p4sb-"

TARGET_KPPS = 18.0
BMV2_PACED_KPPS = 10.0
BRIDGE_KPPS = 300.0
TARGET_P99_MS = 1.0
TARGET_WRITES = 20_000.0
TARGET_READ_S = 0.5

FRAME_LEN = 64  # as written to the socket (veths carry no FCS)
CPU_PORT = 255  # p4seg-switch's default --cpu-port
STAMP = struct.Struct("!Q")  # send time (CLOCK_REALTIME, ns) at the start of the L4 payload
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35  # also SCM_TIMESTAMPNS
BACKLOG_S = 0.1  # a paced rate is sustained when at most this much traffic is still queued
# The switch remembers the highest election id it has seen: each new client must top it.
ELECTION_IDS = itertools.count(100)


# -- the flow --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """A flow through tor-alg: hosts from the inventory, the port it arrives on."""

    src: str
    dst: str
    protocol: int
    sport: int
    dport: int
    ingress_port: int
    tcp_flags: int = 0
    note: str = ""  # where the flow comes from, for the report


FLOWS = {
    # The only UDP the policy allows through tor-alg is the feed into the engines.
    "feed": FlowSpec("md1", "algo1", PROTO_UDP, 40000, 30005, 9, note="from spine1"),
    # What an engine itself sends: orders, TCP (algo -> order_router tcp 9876).
    "order": FlowSpec("algo1", "oms1", PROTO_TCP, 40000, 9876, 1, 0x18, "from its host port"),
}


@dataclass(frozen=True, slots=True)
class Flow:
    spec: FlowSpec
    egress_port: int
    frame: bytes
    rule_id: int | None

    @property
    def stamp_offset(self) -> int:
        return 14 + 20 + (20 if self.spec.protocol == PROTO_TCP else 8)

    def describe(self) -> str:
        s = self.spec
        proto = "tcp" if s.protocol == PROTO_TCP else "udp"
        return (
            f"{s.src} -> {s.dst} {proto}/{s.dport} {s.note}, {SWITCH} port {s.ingress_port} -> "
            f"{self.egress_port}, {len(self.frame)}-byte frames"
        )


def _ipv4_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def flow_frame(spec: FlowSpec, inventory: Inventory) -> bytes:
    """A 64-byte Ethernet/IPv4/UDP-or-TCP frame of the flow (L4 checksum left 0)."""
    src, dst = inventory.hosts_by_name[spec.src], inventory.hosts_by_name[spec.dst]

    def mac(text: str) -> bytes:
        return bytes.fromhex(text.replace(":", ""))

    if spec.protocol == PROTO_UDP:
        l4 = struct.pack("!HHHH", spec.sport, spec.dport, FRAME_LEN - 34, 0)
    else:
        l4 = struct.pack(
            "!HHIIBBHHH", spec.sport, spec.dport, 1, 0, 5 << 4, spec.tcp_flags, 512, 0, 0
        )
    payload = bytes(FRAME_LEN - 34 - len(l4))
    ip = bytearray(
        struct.pack(
            "!BBHHHBBHII", 0x45, 0, 20 + len(l4) + len(payload), 0, 0x4000, 64, spec.protocol, 0,
            src.ip, dst.ip,
        )
    )  # fmt: skip
    struct.pack_into("!H", ip, 10, _ipv4_checksum(bytes(ip)))
    return mac(dst.mac) + mac(src.mac) + b"\x08\x00" + bytes(ip) + l4 + payload


@dataclass(frozen=True, slots=True)
class Program:
    """What one switch target runs: its pipeline, P4Info and device config, tor-alg's tables."""

    target: str
    pipeline: Pipeline
    p4info: str  # text format
    device_config: bytes
    tables: SwitchTables

    def updates(self) -> list[p4r.Update]:
        """Everything a controller writes: defaults, entries, the CPU clone session."""
        updates = []
        for default in self.tables.defaults:
            u = p4r.Update(type=p4r.Update.MODIFY)
            u.entity.table_entry.CopyFrom(default_entry_proto(self.pipeline, default))
            updates.append(u)
        for entry in self.tables.entries:
            u = p4r.Update(type=p4r.Update.INSERT)
            u.entity.table_entry.CopyFrom(table_entry_proto(self.pipeline, entry))
            updates.append(u)
        u = p4r.Update(type=p4r.Update.INSERT)
        cs = u.entity.packet_replication_engine_entry.clone_session_entry
        cs.session_id = CPU_CLONE_SESSION
        cs.replicas.add(egress_port=CPU_PORT, instance=1)
        updates.append(u)
        return updates


@dataclass(frozen=True, slots=True)
class Floor:
    """The example policy checked against the trading floor."""

    inventory: Inventory
    policy: Policy
    text: str

    @classmethod
    def load(cls) -> Floor:
        inventory = load_inventory(str(TOPOLOGY))[0]
        text = POLICY.read_text()
        checked = check_policy(text, str(POLICY.relative_to(ROOT)), inventory)
        assert checked.policy is not None, "the example policy must check clean"
        return cls(inventory, checked.policy, text)

    def program(self, target: str) -> Program:
        """The build for `target` (bmv2: with p4c's BMv2 JSON, so p4c must be found)."""
        built = build(self.policy, self.inventory, self.text, target)
        tables = next(s for s in built.switches if s.switch == SWITCH)
        pipeline = built.target.pipeline
        if target == "ref":
            config = device_config(pipeline).encode()
        else:
            config = p4c_artifacts(built)[f"p4/{target}/p4seg.json"].encode()
        return Program(target, pipeline, built.files["p4info.txtpb"], config, tables)


def bmv2_missing() -> str | None:
    """Why BMv2 cannot be measured here, or None (its tools are then on PATH)."""
    for tool in ("simple_switch_grpc", P4C_BMV2):
        if shutil.which(tool) is None:
            if shutil.which(tool, path=str(P4_TOOLS)) is None:
                return f"{tool} is not on PATH nor in {P4_TOOLS}"
            os.environ["PATH"] = f"{P4_TOOLS}{os.pathsep}{os.environ['PATH']}"
    return None


def allowed_flow(spec: FlowSpec, inventory: Inventory, tables: SwitchTables) -> Flow:
    """The flow with its egress port, after checking on the compiled tables that it passes."""
    src, dst = inventory.hosts_by_name[spec.src], inventory.hosts_by_name[spec.dst]
    pkt = PacketFields(src.ip, dst.ip, spec.protocol, spec.sport, spec.dport, spec.tcp_flags)
    result = evaluate(tables, spec.ingress_port, pkt)
    if result.egress_port is None:
        raise SystemExit(f"{spec.src} -> {spec.dst} is not allowed by {SWITCH}'s tables")
    return Flow(spec, result.egress_port, flow_frame(spec, inventory), result.rule_id)


# -- workers: run inside the namespaces (`python -m bench.bench_refswitch _send ...`) ----------


def _send_worker(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="bench_refswitch _send")
    p.add_argument("--iface", required=True)
    p.add_argument("--frame", required=True, help="hex")
    p.add_argument("--rate", type=float, default=0.0, help="frames/s, evenly spaced; 0: flood")
    p.add_argument("--count", type=int, default=0, help="paced: frames to send")
    p.add_argument("--duration", type=float, default=0.0, help="flood: seconds")
    p.add_argument("--stamp", type=int, default=-1, help="offset of the send timestamp")
    args = p.parse_args(argv)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    s.bind((args.iface, 0))
    frame = bytearray.fromhex(args.frame)
    send, clock = s.send, time.perf_counter_ns
    sent, late_max = 0, 0
    print("go", flush=True)
    start = clock()
    if args.rate <= 0:
        end = start + int(args.duration * 1e9)
        while clock() < end:
            for _ in range(64):
                send(frame)
            sent += 64
    else:
        interval = 1e9 / args.rate
        stamp, offset, now_ns = STAMP.pack_into, args.stamp, time.time_ns
        for i in range(args.count):
            due = start + int(i * interval)
            now = clock()
            while now < due:
                if due - now > 300_000:  # sleep most of a long gap, spin the rest
                    time.sleep((due - now - 200_000) / 1e9)
                now = clock()
            late_max = max(late_max, now - due)
            if offset >= 0:
                stamp(frame, offset, now_ns())
            send(frame)
        sent = args.count
    seconds = (clock() - start) / 1e9
    print(json.dumps({"sent": sent, "seconds": seconds, "late_max_us": late_max / 1e3}), flush=True)


def _recv_worker(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(prog="bench_refswitch _recv")
    p.add_argument("--iface", required=True)
    p.add_argument("--match", required=True, help="hex of frame bytes 12..38 (flow key)")
    p.add_argument("--stamp", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--idle", type=float, default=1.0, help="stop this long after the last frame")
    args = p.parse_args(argv)
    key = bytes.fromhex(args.match)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((args.iface, ETH_P_ALL))
    s.settimeout(30.0)  # the sender starts after this one: the first frame may take a while
    latencies: list[int] = []
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        while len(latencies) < args.count:
            data, anc, _flags, addr = s.recvmsg(2048, socket.CMSG_SPACE(16))
            if addr[2] == PACKET_OUTGOING or data[12:38] != key:
                continue
            s.settimeout(args.idle)
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack_from("qq", cdata)
                    (sent,) = STAMP.unpack_from(data, args.stamp)
                    latencies.append(sec * 1_000_000_000 + nsec - sent)
    print(json.dumps({"received": len(latencies), "latency_ns": latencies}), flush=True)


# -- processes and the testbed ----------------------------------------------------------------


class Process:
    """A child process whose stdout lines are read by a thread, so waits can time out."""

    def __init__(self, cmd: Sequence[str], name: str) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.name}: no {prefix!r} within {timeout} s") from None
            if line is None:
                self.proc.wait()
                raise self.failure(f"exited ({self.proc.returncode})")
            if line.startswith(prefix):
                return line

    def failure(self, what: str) -> RuntimeError:
        """An error saying `what`, with the end of the process's stderr."""
        self.log.seek(0)
        return RuntimeError(f"{self.name} {what}: {self.log.read()[-2000:]}")

    def result(self, timeout: float) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.expect("{", timeout))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _run(*cmd: str, check: bool = True) -> None:
    subprocess.run(cmd, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def remove_stale() -> list[str]:
    """Remove namespaces and links left by bench runs whose process is gone."""
    removed = []
    stale = re.compile(re.escape(PREFIX) + r"([0-9a-f]+)-")
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in netns.splitlines() if line.strip()]
    ifnames = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    for name in names + ifnames:
        m = stale.match(name)
        if m and not _pid_alive(int(m.group(1), 16)):
            if name in names:
                _run("ip", "netns", "del", name, check=False)
            else:
                _run("ip", "link", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class Testbed:
    """Sender and receiver namespaces, one veth pair each to the root namespace."""

    gen_cpu: int
    dut_cpu: int
    load: OtherLoad = field(default_factory=lambda: OtherLoad(0.0))
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid():x}")
    processes: list[Process] = field(default_factory=list)
    _undo: list[list[str]] = field(default_factory=list)

    @property
    def tx_ns(self) -> str:
        return f"{self.tag}-tx"

    @property
    def rx_ns(self) -> str:
        return f"{self.tag}-rx"

    @property
    def tx_root(self) -> str:  # the switch's (or bridge's) ingress
        return f"{self.tag}-ts"

    @property
    def rx_root(self) -> str:  # its egress
        return f"{self.tag}-rs"

    @property
    def bridge(self) -> str:
        return f"{self.tag}-br"

    def host_if(self, ns: str) -> str:
        return f"{ns}h"

    def __enter__(self) -> Testbed:
        try:
            for ns, root in ((self.tx_ns, self.tx_root), (self.rx_ns, self.rx_root)):
                host = self.host_if(ns)
                _run("ip", "netns", "add", ns)
                self._undo.append(["ip", "netns", "del", ns])
                _run("ip", "link", "add", root, "type", "veth", "peer", "name", host)
                self._undo.append(["ip", "link", "del", root])
                _run("ip", "link", "set", host, "netns", ns)
                # No IPv6 (router solicitations, DAD): only the flow crosses the veths.
                _run("sysctl", "-qw", f"net.ipv6.conf.{root}.disable_ipv6=1")
                _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
                _run("ip", "link", "set", root, "up")
                _run("ip", "-n", ns, "link", "set", host, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        for cmd in reversed(self._undo):
            _run(*cmd, check=False)
        self._undo.clear()

    def start(
        self, cmd: Sequence[str], name: str, ns: str | None = None, cpu: int | None = None
    ) -> Process:
        prefix = ["ip", "netns", "exec", ns] if ns else []
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        proc = Process([*prefix, *pin, *cmd], name)
        self.processes.append(proc)
        return proc

    def finish(self, proc: Process) -> None:
        proc.stop()
        self.processes.remove(proc)

    # -- the device under test --------------------------------------------------------------

    def add_bridge(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._undo.append(["ip", "link", "del", self.bridge])
        _run("sysctl", "-qw", f"net.ipv6.conf.{self.bridge}.disable_ipv6=1")
        for port in (self.tx_root, self.rx_root):
            _run("ip", "link", "set", port, "master", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        self._steer(self.dut_cpu)

    def remove_bridge(self) -> None:
        self._steer(None)
        for port in (self.tx_root, self.rx_root):
            _run("ip", "link", "set", port, "nomaster")
        _run("ip", "link", "del", self.bridge)
        self._undo.remove(["ip", "link", "del", self.bridge])

    def _steer(self, cpu: int | None) -> None:
        """RPS: the ingress veth's receive processing (the bridge's forwarding) on `cpu`."""
        mask = f"{1 << cpu:x}" if cpu is not None else "0"
        Path(f"/sys/class/net/{self.tx_root}/queues/rx-0/rps_cpus").write_text(mask)

    def start_switch(
        self, flow: Flow, program: Program, workdir: Path, realtime: bool = False
    ) -> Process:
        """p4seg-switch on the two root veths, programmed with `program` through finsy."""
        exe = Path(sys.executable).with_name("p4seg-switch")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime.refswitch.main"]
        if realtime:
            cmd = ["chrt", "--fifo", "50", *cmd]
        cmd += [
            "--device-id", "2",
            "-i", f"{flow.spec.ingress_port}@{self.tx_root}",
            "-i", f"{flow.egress_port}@{self.rx_root}",
            "--grpc-addr", "127.0.0.1:0",
        ]  # fmt: skip
        proc = self.start(cmd, "p4seg-switch", cpu=self.dut_cpu)
        address = proc.expect("ready", timeout=30).split()[4]
        if rejected := program_switch(address, program, workdir):
            raise RuntimeError(f"p4seg-switch rejected tor-alg's updates: {rejected}")
        return proc

    def start_bmv2(
        self, flow: Flow, program: Program, workdir: Path
    ) -> tuple[Process, dict[int, str]]:
        """simple_switch_grpc on the same veths and CPU, programmed the same way; with the
        updates it rejected."""
        for port in (self.tx_root, self.rx_root):  # as BMv2 expects (topologies/switches.py)
            _run("ethtool", "-K", port, "rx", "off", "tx", "off", "sg", "off", check=False)
        grpc_port, thrift_port = free_port(), free_port()
        cmd = [
            "simple_switch_grpc", "--device-id", "2",
            "-i", f"{flow.spec.ingress_port}@{self.tx_root}",
            "-i", f"{flow.egress_port}@{self.rx_root}",
            "--thrift-port", str(thrift_port),
            "--notifications-addr", f"ipc://{workdir}/bmv2-notifications.ipc",
            "--no-p4", "--",
            "--grpc-server-addr", f"127.0.0.1:{grpc_port}", "--cpu-port", str(CPU_PORT),
        ]  # fmt: skip
        proc = self.start(cmd, "simple_switch_grpc", cpu=self.dut_cpu)
        deadline = time.monotonic() + 30
        while not _listening(grpc_port):  # it binds its ports before it starts gRPC
            if proc.proc.poll() is not None:
                raise proc.failure(f"exited ({proc.proc.returncode})")
            if time.monotonic() > deadline:
                raise proc.failure("did not listen for P4Runtime within 30 s")
            time.sleep(0.05)
        return proc, program_switch(f"127.0.0.1:{grpc_port}", program, workdir)

    def delivered(self) -> int:
        """Frames the device has sent towards the receiver so far."""
        return int(Path(f"/sys/class/net/{self.rx_root}/statistics/tx_packets").read_text())

    # -- traffic ----------------------------------------------------------------------------

    def sender(self, flow: Flow, *args: str) -> Process:
        cmd = [sys.executable, "-m", "bench.bench_refswitch", "_send"]
        cmd += ["--iface", self.host_if(self.tx_ns), "--frame", flow.frame.hex(), *args]
        return self.start(cmd, "sender", ns=self.tx_ns, cpu=self.gen_cpu)

    def receiver(self, flow: Flow, count: int) -> Process:
        cmd = [sys.executable, "-m", "bench.bench_refswitch", "_recv"]
        cmd += ["--iface", self.host_if(self.rx_ns), "--match", flow.frame[12:38].hex()]
        cmd += ["--stamp", str(flow.stamp_offset), "--count", str(count)]
        proc = self.start(cmd, "receiver", ns=self.rx_ns, cpu=self.gen_cpu)
        proc.expect("ready", timeout=30)
        return proc


# -- data-plane experiments -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flood:
    offered_pps: float
    delivered_pps: float  # while the sender ran
    loss: float  # over the whole trial, once the device drained


@dataclass(frozen=True, slots=True)
class Paced:
    rate: float
    achieved_pps: float
    sent: int
    delivered: int
    backlog: int  # still queued in the device when the sender stopped

    def sustained(self) -> bool:
        return self.delivered >= self.sent and self.backlog <= self.rate * BACKLOG_S

    def generator_kept_up(self) -> bool:
        return self.achieved_pps >= 0.97 * self.rate


def _drain(bed: Testbed, settle: float = 0.3, limit: float = 5.0) -> int:
    """The device's delivered count once it stops changing."""
    last, deadline = bed.delivered(), time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(settle)
        now = bed.delivered()
        if now == last:
            break
        last = now
    return last


def best_flood(bed: Testbed, flow: Flow, seconds: float, repeat: int) -> Flood:
    """The best of `repeat` floods: other load on the machine only ever lowers the figure."""
    return max((flood(bed, flow, seconds) for _ in range(repeat)), key=lambda f: f.delivered_pps)


def flood(bed: Testbed, flow: Flow, seconds: float) -> Flood:
    bed.load.settle()
    before = bed.delivered()
    proc = bed.sender(flow, "--duration", str(seconds))
    out = proc.result(timeout=seconds + 30)
    # Counted as the sender stops: what the device forwarded while it was offered load
    # (whatever it drains afterwards from its socket buffer is not throughput).
    during = bed.delivered() - before
    bed.finish(proc)
    total = _drain(bed) - before
    sent, elapsed = out["sent"], out["seconds"]
    return Flood(sent / elapsed, during / elapsed, max(0.0, 1 - total / sent))


def generator_alone(bed: Testbed, flow: Flow, seconds: float) -> float:
    """The sender's flood rate into a veth whose root end drops everything."""
    bed.load.settle()
    proc = bed.sender(flow, "--duration", str(seconds))
    out = proc.result(timeout=seconds + 30)
    bed.finish(proc)
    return float(out["sent"] / out["seconds"])


def paced(bed: Testbed, flow: Flow, rate: float, seconds: float) -> Paced:
    bed.load.settle()
    count = max(int(rate * seconds), 1000)
    before = bed.delivered()
    proc = bed.sender(flow, "--rate", str(rate), "--count", str(count))
    out = proc.result(timeout=count / rate + 30)
    at_end = bed.delivered() - before
    bed.finish(proc)
    total = _drain(bed) - before
    return Paced(rate, out["sent"] / out["seconds"], out["sent"], total, out["sent"] - at_end)


LADDER = (5e3, 10e3, 15e3, 20e3, 30e3, 40e3, 50e3, 70e3, 100e3, 150e3, 200e3,
          300e3, 400e3, 500e3, 600e3, 700e3, 800e3, 1e6)  # fmt: skip


def paced_search(
    bed: Testbed, flow: Flow, seconds: float, refine: int, log: Callable[[Paced], None]
) -> tuple[float, bool]:
    """The highest sustained paced rate, and whether the generator (not the device) bounded it."""

    def attempt(rate: float) -> Paced:
        # Other load on the machine can only make a trial fail: a failure is tried again.
        trial = paced(bed, flow, rate, seconds)
        log(trial)
        if not trial.sustained():
            trial = paced(bed, flow, rate, seconds)
            log(trial)
        return trial

    best, bad = 0.0, 0.0
    for rate in LADDER:
        trial = attempt(rate)
        if not trial.sustained():  # the device's limit, even if the generator fell short
            bad = min(rate, trial.achieved_pps)
            break
        if not trial.generator_kept_up():
            return max(best, trial.achieved_pps), True
        best = rate
    else:
        return best, True
    for _ in range(refine):
        rate = round((best + bad) / 2, -2)
        if rate in (best, bad):
            break
        trial = attempt(rate)
        if trial.sustained():
            best = rate if trial.generator_kept_up() else trial.achieved_pps
        else:
            bad = min(rate, trial.achieved_pps)
    return best, False


@dataclass(frozen=True, slots=True)
class Latency:
    sent: int
    received: int
    p50_us: float
    p99_us: float
    max_us: float


def latency(bed: Testbed, flow: Flow, rate: float, seconds: float) -> Latency:
    bed.load.settle()
    count = int(rate * seconds)
    recv = bed.receiver(flow, count)
    send = bed.sender(
        flow, "--rate", str(rate), "--count", str(count), "--stamp", str(flow.stamp_offset)
    )
    send.result(timeout=seconds + 30)
    bed.finish(send)
    out = recv.result(timeout=30)
    bed.finish(recv)
    lat = sorted(out["latency_ns"])
    if len(lat) < 2:
        return Latency(count, len(lat), float("nan"), float("nan"), float("nan"))
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return Latency(count, len(lat), q[49] / 1e3, q[98] / 1e3, lat[-1] / 1e3)


def program_switch(address: str, program: Program, workdir: Path) -> dict[int, str]:
    """Set the pipeline and write tor-alg's tables through finsy, as a controller would;
    the updates the switch rejected (CONTINUE_ON_ERROR: the others are in), by index."""
    p4info = workdir / f"{program.target}.p4info.txtpb"
    p4info.write_text(program.p4info)
    options = finsy.SwitchOptions(
        p4info=p4info, p4blob=program.device_config, device_id=2, p4force=True
    )

    async def run() -> dict[int, str]:
        async with finsy.Switch(SWITCH, address, options) as sw:
            try:
                await sw.write(program.updates())
            except finsy.P4ClientError as err:
                if not err.details:
                    raise
                return {i: e.message for i, e in err.details.items()}
        return {}

    return asyncio.run(run())


# -- P4Runtime experiments ------------------------------------------------------------------


def routing_entries(n: int) -> list[TableEntry]:
    """`n` distinct /32 routes in 10.64.0.0/10."""
    base = 10 << 24 | 64 << 16
    return [
        TableEntry("routing", (FieldMatch("dst_addr", "lpm", base + i, 32),), "forward",
                   (("port", 1 + i % 8),))
        for i in range(n)
    ]  # fmt: skip


def tag_match(name: str, tag: tuple[int, int]) -> FieldMatch:
    """The compiler's match on an identity vector: one tag's (field, value) as a ternary
    slice (compiler/tags.py)."""
    shift = tag[0] * TAG_FIELD_BITS
    return FieldMatch(name, "ternary", tag[1] << shift, FIELD_MASK << shift)


def policy_entries(n: int) -> list[TableEntry]:
    """`n` distinct policy entries shaped like the compiler's: a tag slice of each identity
    vector (every (field, value) of the 256-bit vector in turn), protocol, a port."""
    fields = TAG_BITS // TAG_FIELD_BITS
    tags = [(f, v) for f in range(fields) for v in range(1, FIELD_VALUES + 1)]
    out = []
    for i in range(n):
        src, dst = tags[i % len(tags)], tags[(i // len(tags) * 7 + i) % len(tags)]
        matches = (
            tag_match("src_tags", src),
            tag_match("dst_tags", dst),
            FieldMatch("protocol", "ternary", PROTO_TCP, 0xFF),
            FieldMatch("l4_dst_port", "range", 1024 + i, 1024 + i),
        )
        out.append(TableEntry("policy", matches, "permit", (("rule_id", 1 + i % 60000),), 100))
    return out


def finsy_entry(entry: TableEntry) -> finsy.P4TableEntry:
    """The same entry as finsy's value objects (what a finsy controller builds)."""
    # exact: the value; lpm (value, prefix length), ternary (value, mask), range (low, high)
    match = {m.field: m.value if m.kind == "exact" else (m.value, m.arg) for m in entry.matches}
    return finsy.P4TableEntry(
        entry.table,
        match=finsy.P4TableMatch(match),
        action=finsy.P4TableAction(entry.action, **dict(entry.params)),
        priority=entry.priority,
    )


@dataclass(frozen=True, slots=True)
class TableFigures:
    client: str
    table: str
    entries: int
    write_s: float
    read_s: float
    read_back: int
    encode_s: float = 0.0  # client-side encoding, timed apart (raw: runtime.entities)
    decode_s: float = 0.0  # finsy: decoding the read-back entities into value objects


class RawClient:
    """The raw grpc stub: one arbitrated stream, unary Write and streaming Read."""

    def __init__(self, address: str, device_id: int, election_id: int = 1) -> None:
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.stub = p4r_grpc.P4RuntimeStub(self.channel)
        self.device_id, self.election_id = device_id, election_id
        self._requests: queue.Queue[p4r.StreamMessageRequest | None] = queue.Queue()
        self._stream = self.stub.StreamChannel(iter(self._requests.get, None))
        req = p4r.StreamMessageRequest()
        req.arbitration.device_id = device_id
        req.arbitration.election_id.low = election_id
        self._requests.put(req)
        reply = next(self._stream)
        if reply.arbitration.status.code != 0:
            raise RuntimeError(f"not primary: {reply.arbitration.status}")

    def set_pipeline(self, config: p4r.ForwardingPipelineConfig) -> None:
        req = p4r.SetForwardingPipelineConfigRequest(
            device_id=self.device_id,
            action=p4r.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT,
            config=config,
        )
        req.election_id.low = self.election_id
        self.stub.SetForwardingPipelineConfig(req, timeout=60)

    def write(self, updates: Sequence[p4r.Update]) -> None:
        req = p4r.WriteRequest(device_id=self.device_id, updates=updates)
        req.election_id.low = self.election_id
        self.stub.Write(req, timeout=60)

    def read_all(self) -> list[p4r.Entity]:
        entity = p4r.Entity()
        entity.table_entry.SetInParent()
        req = p4r.ReadRequest(device_id=self.device_id, entities=[entity])
        return [e for resp in self.stub.Read(req, timeout=60) for e in resp.entities]

    def close(self) -> None:
        self._requests.put(None)
        self._stream.cancel()
        self.channel.close()


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def p4rt_raw(
    address: str, pipeline: Pipeline, entries: list[TableEntry], table: str, batch: int
) -> TableFigures:
    config = p4r.ForwardingPipelineConfig(
        p4info=build_p4info(pipeline), p4_device_config=device_config(pipeline).encode()
    )
    t0 = time.perf_counter()
    updates = []
    for e in entries:
        u = p4r.Update(type=p4r.Update.INSERT)
        u.entity.table_entry.CopyFrom(table_entry_proto(pipeline, e))
        updates.append(u)
    encode_s = time.perf_counter() - t0
    client = RawClient(address, 1, next(ELECTION_IDS))
    try:
        client.set_pipeline(config)
        t0 = time.perf_counter()
        for chunk in _batches(updates, batch):
            client.write(chunk)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        back = client.read_all()
        read_s = time.perf_counter() - t0
    finally:
        client.close()
    return TableFigures("grpc stub", table, len(entries), write_s, read_s, len(back), encode_s)


def p4rt_finsy(
    address: str,
    pipeline: Pipeline,
    entries: list[TableEntry],
    table: str,
    batch: int,
    workdir: Path,
) -> TableFigures:
    p4info = workdir / "p4rt.p4info.txtpb"
    p4info.write_text(text_format.MessageToString(build_p4info(pipeline)))
    options = finsy.SwitchOptions(
        p4info=p4info,
        p4blob=device_config(pipeline).encode(),
        device_id=1,
        p4force=True,
        initial_election_id=next(ELECTION_IDS),
    )
    objects = [finsy_entry(e) for e in entries]

    async def run() -> TableFigures:
        async with finsy.Switch("bench", address, options) as sw:
            t0 = time.perf_counter()
            for chunk in _batches(objects, batch):
                await sw.write([+e for e in chunk])
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = [e async for e in sw.read(finsy.P4TableEntry())]  # type: ignore[attr-defined]
            read_s = time.perf_counter() - t0
            # The client-side share: encoding the same entries again, decoding what came back.
            t0 = time.perf_counter()
            msgs = [e.encode(sw.p4info) for e in objects]
            encode_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for m in msgs:
                finsy.P4TableEntry.decode(m, sw.p4info)
            decode_s = time.perf_counter() - t0
        return TableFigures(
            "finsy", table, len(entries), write_s, read_s, len(back), encode_s, decode_s
        )

    return asyncio.run(run())


# -- profiling --------------------------------------------------------------------------------


def _top(profile: cProfile.Profile, limit: int) -> str:
    """The `limit` functions with the most own time, as pstats prints them, indented."""
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(limit)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join("      " + line.replace(f"{ROOT}/", "") for line in lines[start:] if line)


def _profiled(fn: Callable[[], Any]) -> tuple[float, cProfile.Profile]:
    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.runcall(fn)
    return time.perf_counter() - t0, profile


def _loaded_switch(pipeline: Pipeline, updates: list[p4r.Update]) -> ReferenceSwitch:
    """An in-process switch (no interfaces) with `pipeline` set and `updates` written."""
    sw = ReferenceSwitch(2)
    config = p4r.ForwardingPipelineConfig(
        p4info=build_p4info(pipeline), p4_device_config=device_config(pipeline).encode()
    )
    sw.device.set_pipeline(p4r.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT, config)
    assert not any(sw.device.write(updates))
    return sw


def profile_in_process(program: Program, flow: Flow, entries: int, limit: int) -> None:
    """Dataplane.process per frame (flow-cache hit and miss), Device.write per update and
    finsy's encode/decode, in-process: ReferenceSwitch(device_id) needs no interfaces."""
    port, frame, tables = flow.spec.ingress_port, flow.frame, program.tables
    sw = _loaded_switch(PIPELINE, program.updates())
    assert sw.inject(port, frame) == [(flow.egress_port, frame)]
    process = sw.dataplane.process
    n = 200_000
    t0 = time.perf_counter()
    for _ in range(n):
        process(port, frame)
    hit = n / (time.perf_counter() - t0)
    # A new flow per frame: the source port walks up from 1024, so every frame misses the cache.
    new_flows = [frame[:34] + struct.pack("!H", 1024 + i) + frame[36:] for i in range(20_000)]
    t0 = time.perf_counter()
    for f in new_flows:
        process(port, f)
    miss = len(new_flows) / (time.perf_counter() - t0)
    print(f"   Dataplane.process in-process, {SWITCH}'s {len(tables.entries)} entries:")
    print(f"      one flow (flow-cache hit)          {hit / 1e3:9.1f} kpps")
    print(f"      a new flow per frame (cache miss)  {miss / 1e3:9.1f} kpps")

    # The same with the policy table at P4Runtime-benchmark scale.
    big = build_pipeline({"policy": max(DEFAULT_SIZES["policy"], len(tables.entries) + entries)})
    extra = []
    for e in policy_entries(entries):
        u = p4r.Update(type=p4r.Update.INSERT)
        u.entity.table_entry.CopyFrom(table_entry_proto(big, e))
        extra.append(u)
    updates = program.updates() + extra
    t0 = time.perf_counter()
    sw = _loaded_switch(big, updates)
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sw.dataplane.process(port, frame)
    rebuild_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in new_flows[:300]:
        sw.dataplane.process(port, f)
    miss_big = 300 / (time.perf_counter() - t0)
    _, profile = _profiled(lambda: [sw.dataplane.process(port, f) for f in new_flows[300:600]])
    print(f"      with {entries} more policy entries:")
    print(f"      first frame after a write           {rebuild_s * 1e3:9.1f} ms (snapshot rebuild)")
    print(
        f"      a new flow per frame (cache miss)  {miss_big / 1e3:9.3f} kpps; "
        "under cProfile, top by own time:"
    )
    print(_top(profile, limit))
    print(
        f"   Device.write in-process, {len(updates)} updates in one call: "
        f"{len(updates) / write_s:,.0f} updates/s; under cProfile, top by own time:"
    )
    _, profile = _profiled(lambda: _loaded_switch(big, updates))
    print(_top(profile, limit))

    # The client side: finsy's value objects to protobuf and back.
    schema = finsy.P4Schema(build_p4info(big))
    objects = [finsy_entry(e) for e in policy_entries(entries)]
    msgs = [o.encode(schema) for o in objects]
    encode_s, _ = _profiled(lambda: [o.encode(schema) for o in objects])
    decode_s, profile_dec = _profiled(lambda: [finsy.P4TableEntry.decode(m, schema) for m in msgs])
    print(
        f"   finsy P4TableEntry, {entries} policy entries under cProfile: encode "
        f"{encode_s:.3f} s, decode {decode_s:.3f} s; decode, top by own time:"
    )
    print(_top(profile_dec, limit))


def _profile_switch_worker(argv: Sequence[str]) -> None:
    """A switch like p4seg-switch whose data-plane loop runs under cProfile from SIGUSR1
    until SIGTERM (so the profile holds the loaded loop, not the idle wait before it)."""
    p = argparse.ArgumentParser(prog="bench_refswitch _profile_switch")
    p.add_argument("-i", action="append", default=[], metavar="PORT@IFACE")
    p.add_argument("--limit", type=int, default=15)
    args = p.parse_args(argv)
    ports = {int(n): name for n, _, name in (a.partition("@") for a in args.i)}
    sw = ReferenceSwitch(2, ports)
    io_ = sw.io = PortIO(sw.ports)
    server, port = serve(sw.service, "127.0.0.1:0")
    profile = cProfile.Profile()

    def stop(*_: object) -> None:
        profile.disable()
        io_.shutdown()

    # Handlers run in the main thread, the one that runs the loop: that is what gets profiled.
    signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
    signal.signal(signal.SIGTERM, stop)
    print(f"ready device 2 grpc 127.0.0.1:{port} ports {len(ports)}", flush=True)
    io_.run(sw._receive)  # the callback p4seg-switch's data-plane thread runs
    print(_top(profile, args.limit), flush=True)
    print("done", flush=True)
    server.stop(0)


def profile_live(bed: Testbed, flow: Flow, program: Program, seconds: float, limit: int) -> None:
    """The running switch under flood: perf (kernel vs interpreter) and cProfile of its loop."""
    with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
        workdir = Path(tmp)
        if shutil.which("perf"):
            proc = bed.start_switch(flow, program, workdir)
            send = bed.sender(flow, "--duration", str(seconds + 1.5))
            send.expect("go", timeout=30)
            time.sleep(0.5)
            data = workdir / "perf.data"
            subprocess.run(
                ["perf", "record", "-q", "-F", "999", "-g", "-o", str(data), "-p",
                 str(proc.proc.pid), "--", "sleep", str(seconds)],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            send.result(timeout=30)
            bed.finish(send)
            bed.finish(proc)
            for sort in ("dso", "sym"):
                report = subprocess.run(
                    ["perf", "report", "-i", str(data), "--no-children", "--sort", sort,
                     "--stdio", "-g", "none", "--percent-limit", "1.5"],
                    capture_output=True, text=True,
                ).stdout  # fmt: skip
                rows = [r.strip() for r in report.splitlines() if r.strip() and r[0] != "#"]
                print(f"   perf record of the switch process under flood, by {sort} (>= 1.5%):")
                print("\n".join("      " + r for r in rows[:limit]))
        cmd = [sys.executable, "-m", "bench.bench_refswitch", "_profile_switch"]
        cmd += ["-i", f"{flow.spec.ingress_port}@{bed.tx_root}"]
        cmd += ["-i", f"{flow.egress_port}@{bed.rx_root}", "--limit", str(limit)]
        proc = bed.start(cmd, "profiled switch", cpu=bed.dut_cpu)
        address = proc.expect("ready", timeout=30).split()[4]
        program_switch(address, program, workdir)
        send = bed.sender(flow, "--duration", str(seconds + 1.5))
        send.expect("go", timeout=30)
        time.sleep(0.5)
        c1, t1 = bed.delivered(), time.monotonic()
        proc.proc.send_signal(signal.SIGUSR1)
        time.sleep(seconds)
        proc.proc.send_signal(signal.SIGTERM)
        c2, t2 = bed.delivered(), time.monotonic()
        send.result(timeout=30)
        bed.finish(send)
        lines = []
        while (line := proc.lines.get(timeout=30)) not in (None, "done"):
            lines.append(line)
        bed.finish(proc)
        print(
            f"   cProfile of the data-plane loop under flood, {seconds:g} s "
            f"({(c2 - c1) / (t2 - t1) / 1e3:.1f} kpps delivered with the profiler on):"
        )
        print("\n".join(lines))


def cpu_busy(seconds: float = 1.0) -> dict[int, float]:
    """Each CPU's busy share over `seconds` (/proc/stat): other work skews every figure."""

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *ticks = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                values = [int(t) for t in ticks]
                out[int(name[3:])] = (values[3] + values[4], sum(values[:8]))
        return out

    a = sample()
    time.sleep(seconds)
    b = sample()
    return {cpu: 1 - (b[cpu][0] - a[cpu][0]) / max(1, b[cpu][1] - a[cpu][1]) for cpu in sorted(a)}


QUIET = 0.1  # a CPU busier than this with other work skews the figures


def _cpu_seconds_by_pid() -> tuple[dict[int, float], dict[int, int]]:
    """Every process's CPU seconds so far, and its parent, from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    used, parent = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    return used, parent


class OtherLoad:
    """How much of the CPUs processes other than this run used (kernel threads aside, which
    carry this run's own packets): on a shared machine that lowers every figure."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.mark()

    def _others(self) -> dict[int, float]:
        used, parent = _cpu_seconds_by_pid()
        ours, frontier = {os.getpid()}, [os.getpid()]
        while frontier:
            pid = frontier.pop()
            children = [c for c, p in parent.items() if p == pid and c not in ours]
            ours.update(children)
            frontier.extend(children)
        kernel = {pid for pid, p in parent.items() if p == 2 or pid == 2}
        return {pid: t for pid, t in used.items() if pid not in ours | kernel}

    def mark(self) -> None:
        self._since, self._before = time.monotonic(), self._others()

    def share(self) -> float:
        """Other processes' share of all CPUs since `mark` (processes that exited uncounted)."""
        now = self._others()
        spent = sum(t - self._before.get(pid, 0.0) for pid, t in now.items())
        return spent / max(1e-9, (time.monotonic() - self._since) * (os.cpu_count() or 1))

    def settle(self) -> None:
        """Wait up to `wait` seconds for a second in which every CPU is idle enough."""
        deadline = time.monotonic() + self.wait
        while time.monotonic() < deadline and max(cpu_busy().values()) > QUIET:
            pass

    def report(self) -> str:
        share = self.share()
        warn = "   !! figures are low" if share > QUIET else ""
        return f"other processes used {share:.0%} of the CPUs meanwhile{warn}"


def _kpps(pps: float) -> str:
    return f"{pps / 1e3:7.1f} kpps"


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


@dataclass(frozen=True, slots=True)
class Trials:
    """How long and how often each data-plane figure is measured."""

    seconds: float  # a flood or paced trial
    latency_seconds: float
    refine: int  # bisection steps after the paced ladder
    repeat: int  # floods, the best kept
    log: Callable[[Paced], None]


@dataclass(frozen=True, slots=True)
class DeviceFigures:
    flood: Flood
    paced: float
    paced_generator_bound: bool
    latency: Latency


def measure(
    bed: Testbed, flow: Flow, name: str, trials: Trials, bridge: DeviceFigures | None
) -> DeviceFigures:
    """Flood, paced and latency figures of whatever forwards between the veths now, printed
    against the bridge's (`bridge` None: this is the bridge); verdicts for p4seg's switch."""
    verdicts = name.startswith("reference")
    flood = best_flood(bed, flow, trials.seconds, trials.repeat)
    _flood_line(name, flood, bridge.flood if bridge else None, verdicts)
    paced, bound = paced_search(bed, flow, trials.seconds, trials.refine, trials.log)
    _paced_line(name, paced, bound, bridge.paced if bridge else None)
    lat = latency(bed, flow, 1000.0, trials.latency_seconds)
    _latency_line(name, lat, bridge.latency if bridge else None, verdicts)
    return DeviceFigures(flood, paced, bound, lat)


def run_dataplane(args: argparse.Namespace, floor: Floor, ref: Program) -> None:
    flow = allowed_flow(FLOWS[args.flow], floor.inventory, ref.tables)
    bmv2_why = "--no-bmv2" if args.no_bmv2 else bmv2_missing()
    bmv2 = floor.program("bmv2") if bmv2_why is None else None
    if bmv2 is not None:  # BMv2 runs its own build: the flow must pass there too
        assert allowed_flow(flow.spec, floor.inventory, bmv2.tables).egress_port == flow.egress_port
    print(f"\n== Data plane: {flow.describe()} (rule {flow.rule_id}, allowed by {SWITCH}'s tables)")
    print(f"   CPUs: generator {args.cpus[0]}, device under test {args.cpus[1]}", flush=True)
    load = OtherLoad(args.wait_quiet)

    def log(t: Paced) -> None:
        if args.verbose:
            state = "ok" if t.sustained() else "LOST" if t.delivered < t.sent else "BACKLOG"
            print(
                f"      paced {t.rate / 1e3:7.1f} kpps: sent {t.sent} at {_kpps(t.achieved_pps)}, "
                f"delivered {t.delivered}, backlog {t.backlog}  {state}"
            )

    trials = Trials(2.0, 3.0, 1, 1, log) if args.quick else Trials(5.0, 10.0, 3, 2, log)
    with (
        Testbed(args.cpus[0], args.cpus[1], load) as bed,
        tempfile.TemporaryDirectory(prefix=PREFIX) as tmp,
    ):
        gen = generator_alone(bed, flow, trials.seconds)
        print(f"   {'generator alone (flood, no device)':<44}{_kpps(gen)}", flush=True)

        bed.add_bridge()
        time.sleep(0.2)
        bridge = measure(bed, flow, "bridge (baseline)", trials, None)
        bed.remove_bridge()

        proc = bed.start_switch(flow, ref, Path(tmp))
        time.sleep(0.2)
        switch = measure(bed, flow, "reference switch", trials, bridge)
        bed.finish(proc)
        # Again at real-time priority: what is left is the switch's own latency, without
        # waiting for the scheduler behind other processes on its CPU.
        proc = bed.start_switch(flow, ref, Path(tmp), realtime=True)
        rt = latency(bed, flow, 1000.0, trials.latency_seconds)
        _latency_line("  at SCHED_FIFO 50", rt, bridge.latency, True)
        bed.finish(proc)

        if bmv2 is not None:
            proc, rejected = bed.start_bmv2(flow, bmv2, Path(tmp))
            if rejected:
                _bmv2_rejected(rejected, bmv2, flow, floor.inventory)
            time.sleep(0.2)
            other = measure(bed, flow, "BMv2 simple_switch_grpc", trials, bridge)
            bed.finish(proc)
            ratios = (
                switch.flood.delivered_pps / other.flood.delivered_pps,
                switch.paced / max(other.paced, 1.0),
                switch.latency.p50_us / other.latency.p50_us,
                switch.latency.p99_us / other.latency.p99_us,
            )
            print(
                f"   {'reference switch / BMv2':<44}"
                "flood {:.2f}x, paced {:.2f}x, p50 {:.2f}x, p99 {:.2f}x".format(*ratios)
            )
        else:
            print(f"   BMv2 not measured: {bmv2_why}")
    print(
        f"   the issue's context: BMv2 ~{TARGET_KPPS:.0f} kpps, loss-free ~{BMV2_PACED_KPPS:.0f} "
        f"kpps paced, p50 ~0.1 ms; a Linux bridge >= {BRIDGE_KPPS:.0f} kpps"
    )
    print(f"   {load.report()}")


def _bmv2_rejected(rejected: dict[int, str], bmv2: Program, flow: Flow, inv: Inventory) -> None:
    """Say what BMv2 refused, and check that the measured flow does not depend on it."""
    skip = len(bmv2.tables.defaults)  # updates: the defaults, then the entries
    kept = tuple(e for i, e in enumerate(bmv2.tables.entries) if i + skip not in rejected)
    tables = dataclasses.replace(bmv2.tables, entries=kept)
    assert allowed_flow(flow.spec, inv, tables).egress_port == flow.egress_port
    reasons = sorted(set(rejected.values()))
    print(
        f"   note: BMv2 rejected {len(rejected)} of {len(bmv2.updates())} updates, none on the "
        f"measured flow's path: {'; '.join(reasons)}"
    )


def _flood_line(name: str, f: Flood, bridge: Flood | None, verdict: bool) -> None:
    """One flood figure; `bridge` None: this is the baseline."""
    if bridge is None:
        note = "   1.00x"
        if f.loss < 1e-4:
            note += "   (no loss: the generator's limit, not the bridge's)"
    else:
        note = f"   {f.delivered_pps / bridge.delivered_pps:.3f}x bridge"
        if verdict:
            note += f"   {_verdict(f.delivered_pps >= TARGET_KPPS * 1e3)} >= {TARGET_KPPS:.0f} kpps"
    print(
        f"   {name + ', flood':<44}{_kpps(f.delivered_pps)} delivered of "
        f"{f.offered_pps / 1e3:.0f} kpps offered, loss {f.loss:5.1%}{note}",
        flush=True,
    )


def _paced_line(name: str, rate: float, generator_bound: bool, bridge: float | None) -> None:
    note = "   1.00x" if bridge is None else f"   {rate / bridge:.3f}x bridge"
    if generator_bound:
        note += "   (the generator could pace no faster)"
    at_least = ">=" if generator_bound else "  "
    print(f"   {name + ', paced, loss-free':<42}{at_least}{_kpps(rate)}{note}", flush=True)


def _latency_line(name: str, lat: Latency, bridge: Latency | None, verdict: bool = False) -> None:
    note = ""
    if bridge is not None:
        note = f"   {lat.p50_us / bridge.p50_us:.1f}x / {lat.p99_us / bridge.p99_us:.1f}x bridge"
        if verdict:
            note += f"   {_verdict(lat.p99_us < TARGET_P99_MS * 1e3)} p99 < {TARGET_P99_MS:g} ms"
    print(
        f"   {name + ', latency at 1 kpps':<44}p50 {lat.p50_us:6.1f} us  p99 {lat.p99_us:7.1f} us  "
        f"max {lat.max_us:7.1f} us  ({lat.received}/{lat.sent}){note}",
        flush=True,
    )


def run_p4rt(args: argparse.Namespace, cpus: tuple[int, int]) -> None:
    n, batch = args.entries, args.batch
    size = max(n, DEFAULT_SIZES["policy"])
    pipeline = build_pipeline({"policy": size, "routing": size})
    print(f"\n== P4Runtime: {n} entries, batches of {batch}, switch on 127.0.0.1 (CPU {cpus[1]})")
    load = OtherLoad(args.wait_quiet)
    exe = Path(sys.executable).with_name("p4seg-switch")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "runtime.refswitch.main"]
    cmd = ["taskset", "-c", str(cpus[1]), *cmd, "--device-id", "1", "--grpc-addr", "127.0.0.1:0"]
    proc = Process(cmd, "p4seg-switch")
    figures: list[TableFigures] = []
    try:
        address = proc.expect("ready", timeout=30).split()[4]
        with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
            for table, entries in (("routing", routing_entries(n)), ("policy", policy_entries(n))):
                load.settle()
                figures.append(p4rt_raw(address, pipeline, entries, table, batch))
                load.settle()
                figures.append(p4rt_finsy(address, pipeline, entries, table, batch, Path(tmp)))
    finally:
        proc.stop()
    print(
        f"   {'table':<9}{'client':<11}{'writes/s':>9} {'x stub':>7}  {'>=20k/s':<7}"
        f"{'read s':>8} {'x stub':>7}  {'<0.5 s':<7} client-side share"
    )
    for f in figures:
        raw = next(x for x in figures if x.table == f.table and x.client == "grpc stub")
        rate = f.entries / f.write_s
        read_ok = _verdict(f.read_s < TARGET_READ_S) if f.read_back >= 20_000 else "n/a"
        share = (
            f"encode {f.encode_s:.3f} s + decode {f.decode_s:.3f} s (finsy value objects)"
            if f.client == "finsy"
            else f"runtime.entities encode {f.encode_s:.3f} s, before the writes"
        )
        print(
            f"   {f.table:<9}{f.client:<11}{rate:9,.0f} {raw.write_s / f.write_s:6.2f}x  "
            f"{_verdict(rate >= TARGET_WRITES):<7}{f.read_s:8.3f} {raw.read_s / f.read_s:6.2f}x  "
            f"{read_ok:<7} {share}"
        )
        if f.read_back != f.entries:
            print(f"   !! read back {f.read_back} entries, wrote {f.entries}")
    print(f"   {load.report()}")


# -- new flows: the evaluator's indexes with a generated floor's policy table -----------------

# `bench.gen_policy`'s 10k-rule floor (bench_compile's): its busiest ToR holds about 3,900
# policy entries (t25: 3,858). Floors with many more rules per ToR need more than the
# 256-bit identity vector, so the ~20k-entry case is that ToR's table grown (BusyTor.grown).
NEWFLOW_FLOOR = {"rules": 10_000, "services": 1_000, "hosts": 1_000, "tors": 48, "seed": 1}
NEWFLOW_GROWN = 20_000
NEWFLOW_SIZES = {
    "src_identity": 1 << 16,
    "dst_identity": 1 << 16,
    "policy": 1 << 16,
    "routing": 1 << 16,
}
TARGET_NEW_FLOWS = 20_000.0


@dataclass(frozen=True, slots=True)
class BusyTor:
    """The generated floor compiled for the reference switch, and its busiest ToR."""

    inventory: Inventory
    program: Program
    compile_s: float

    @classmethod
    def load(cls) -> BusyTor:
        floor = generate(**NEWFLOW_FLOOR)
        with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
            path = Path(tmp) / "inventory.yaml"
            path.write_text(floor.inventory)
            inventory = load_inventory(str(path))[0]
        t0 = time.perf_counter()
        checked = check_policy(floor.policy, "generated.zt", inventory)
        assert checked.policy is not None, "the generated policy must check clean"
        built = build(checked.policy, inventory, floor.policy, "ref", NEWFLOW_SIZES)
        compile_s = time.perf_counter() - t0
        tables = max(built.switches, key=lambda s: len(s.table("policy")))
        pipeline = built.target.pipeline
        config = device_config(pipeline).encode()
        program = Program("ref", pipeline, built.files["p4info.txtpb"], config, tables)
        return cls(inventory, program, compile_s)

    def grown(self, n: int, seed: int = 3) -> BusyTor:
        """The same ToR with its policy table grown to `n` entries shaped like the compiler's:
        each added entry a compiled TCP/UDP permit (its tag slices, protocol, priority,
        action) for one more destination port, as a rule with more ports would add."""
        rnd = random.Random(seed)
        tables = self.program.tables
        policy = tables.table("policy")
        permits = [
            e for e in policy if e.action.startswith("permit")
            and (p := e.match("protocol")) is not None and p.value in (PROTO_TCP, PROTO_UDP)
        ]  # fmt: skip
        have = {(e.matches, e.priority) for e in policy}
        added: list[TableEntry] = []
        while len(policy) + len(added) < n:
            base = rnd.choice(permits)
            port = rnd.randrange(1024, 1 << 16)
            kept = tuple(m for m in base.matches if m.field != "l4_dst_port")
            matches = (*kept, FieldMatch("l4_dst_port", "range", port, port))
            if (matches, base.priority) not in have:
                have.add((matches, base.priority))
                added.append(dataclasses.replace(base, matches=matches))
        more = dataclasses.replace(tables, entries=(*tables.entries, *added))
        program = dataclasses.replace(self.program, tables=more)
        return dataclasses.replace(self, program=program)

    def new_flows(self, n: int, seed: int = 7) -> list[tuple[int, bytes]]:
        """`n` frames (ingress port, frame), each of a flow not seen before: every other one
        built to match a permit entry of the ToR's policy table (hosts whose identity vectors
        carry its source and destination tags, its protocol and ports), the others between
        random hosts to random ports (mostly denied: a miss, the index's worst case). TCP
        SYNs and UDP."""
        rnd = random.Random(seed)
        tables, inv = self.program.tables, self.inventory
        idx = IndexedSwitch.of(tables)
        uplinks = sorted(
            {lk.a_port for lk in inv.links if lk.a == tables.switch}
            | {lk.b_port for lk in inv.links if lk.b == tables.switch}
        )
        senders: dict[int, list[tuple[Host, int]]] = {}  # source tags -> (host, ingress port)
        receivers: dict[int, list[Host]] = {}  # destination tags -> hosts
        for h in inv.hosts:
            for port in [h.port] if h.switch == tables.switch else uplinks:
                values = {"epoch": 0, "ingress_port": port, "src_addr": h.ip}
                hit = idx.lookup("src_identity", values)
                if hit is not None and hit.action == "set_src_tags":
                    senders.setdefault(dict(hit.params)["tags"], []).append((h, port))
            hit = idx.lookup("dst_identity", {"epoch": 0, "dst_addr": h.ip})
            receivers.setdefault(dict(hit.params)["tags"] if hit else 0, []).append(h)
        permits = [e for e in tables.table("policy") if e.action.startswith("permit")]

        matching: dict[tuple[str, FieldMatch | None], list[int]] = {}

        def within(e: TableEntry, name: str, vectors: Iterable[int]) -> list[int]:
            m = e.match(name)
            if (name, m) not in matching:
                matching[(name, m)] = [v for v in vectors if m is None or m.covers(v)]
            return matching[(name, m)]

        def port_in(e: TableEntry, name: str, default: int) -> int:
            m = e.match(name)
            return default if m is None else rnd.randint(m.value, m.arg)

        frames: list[tuple[int, bytes]] = []
        seen: set[tuple[int, str, str, int, int, int]] = set()
        while len(frames) < n:
            sport = rnd.randrange(1024, 1 << 16)
            if len(frames) % 2:
                e = rnd.choice(permits)
                srcs, dsts = within(e, "src_tags", senders), within(e, "dst_tags", receivers)
                proto = e.match("protocol")
                protocol = proto.value if proto is not None else rnd.choice((6, 17))
                if not srcs or not dsts or protocol not in (PROTO_TCP, PROTO_UDP):
                    continue
                src, port = rnd.choice(senders[rnd.choice(srcs)])
                dst = rnd.choice(receivers[rnd.choice(dsts)])
                sport = port_in(e, "l4_src_port", sport)
                dport = port_in(e, "l4_dst_port", rnd.randrange(1, 1 << 16))
            else:
                src, port = rnd.choice(rnd.choice(list(senders.values())))
                dst, protocol = rnd.choice(inv.hosts), rnd.choice((PROTO_TCP, PROTO_UDP))
                dport = rnd.randrange(1, 1 << 16)
            key = (port, src.name, dst.name, protocol, sport, dport)
            if key in seen or src.name == dst.name:
                continue
            seen.add(key)
            flags = 0x02 if protocol == PROTO_TCP else 0
            spec = FlowSpec(src.name, dst.name, protocol, sport, dport, port, flags)
            frames.append((port, flow_frame(spec, inv)))
        return frames


class GcPauses:
    """The time the garbage collector held the process while in this block, by generation."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._start))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def report(self) -> str:
        full = [s for g, s in self.pauses if g == 2]
        return (
            f"garbage collection {sum(s for _, s in self.pauses) * 1e3:.0f} ms of it "
            f"({len(full)} full: {sum(full) * 1e3:.0f} ms)"
        )


def run_newflows(args: argparse.Namespace) -> None:
    """New flows per second through `Dataplane.process` on the busy ToR's tables, as compiled
    and grown to NEWFLOW_GROWN policy entries: every frame a flow the cache has not seen,
    indexed lookups against the linear scan (the baseline, on a sample) in the same run; the
    two must decide every sampled flow the same way."""
    busy = BusyTor.load()
    grown = busy.grown(NEWFLOW_GROWN)
    floor = ", ".join(f"{n:,} {k}" for k, n in NEWFLOW_FLOOR.items() if k != "seed")
    for label, case in (("as compiled", busy), ("policy grown", grown)):
        print(
            f"\n== New flows: {case.program.tables.switch} of a generated floor ({floor}; "
            f"compiled in {busy.compile_s:.1f} s), {label}"
        )
        _newflow_case(case, args)


def _newflow_case(busy: BusyTor, args: argparse.Namespace) -> None:
    tables = busy.program.tables
    counts = {
        t: len(tables.table(t)) for t in ("src_identity", "dst_identity", "policy", "routing")
    }
    print("   " + ", ".join(f"{t} {n:,}" for t, n in counts.items()))
    load = OtherLoad(args.wait_quiet)
    n, sample = (5_000, 60) if args.quick else (30_000, 300)
    frames = busy.new_flows(n + 2)
    sw = _loaded_switch(busy.program.pipeline, busy.program.updates())
    process = sw.dataplane.process
    gc_pauses = GcPauses()
    load.settle()
    gc.collect()  # the run starts with nothing left to collect from setting up
    t0 = time.perf_counter()
    process(*frames[0])
    first_s = time.perf_counter() - t0
    outs: list[list[tuple[int, bytes]]] = []
    with gc_pauses:
        t0 = time.perf_counter()
        for port, frame in frames[1:n]:
            outs.append(process(port, frame))
        indexed = (n - 1) / (time.perf_counter() - t0)
    delivered = sum(any(p != CPU_PORT for p, _ in out) for out in outs)
    logged = sum(any(p == CPU_PORT for p, _ in out) for out in outs)
    # The same flows again with the flow cache emptied: the indexes have grown where they go.
    sw.dataplane._cache.clear()
    t0 = time.perf_counter()
    for port, frame in frames[1:n]:
        process(port, frame)
    grown = (n - 1) / (time.perf_counter() - t0)

    # A write: one more policy entry; the next new flow pays for the snapshot and the index.
    base = next(e for e in tables.table("policy") if e.match("l4_src_port") is None)
    extra = dataclasses.replace(base, priority=1, rule_id=None)
    extra = dataclasses.replace(
        extra, matches=(FieldMatch("l4_src_port", "range", 1, 1), *extra.matches)
    )
    u = p4r.Update(type=p4r.Update.INSERT)
    u.entity.table_entry.CopyFrom(table_entry_proto(busy.program.pipeline, extra))
    assert not any(sw.device.write([u]))
    t0 = time.perf_counter()
    process(*frames[n])
    rewrite_s = time.perf_counter() - t0

    # The baseline: the same data plane on a snapshot whose lookups scan (a bench-only swap).
    snap = sw.device.snapshot()
    assert snap is not None
    scan = dataclasses.replace(
        snap, version=-2, switch=ScanSwitch.of(snap.switch.tables)
    )  # a version of its own: the flow cache starts empty
    sw.device._snapshot = scan
    t0 = time.perf_counter()
    scanned = [process(port, frame) for port, frame in frames[1 : sample + 1]]
    linear = sample / (time.perf_counter() - t0)
    sw.device._snapshot = snap
    agree = sum(a == b for a, b in zip(outs[:sample], scanned, strict=True))

    # Where a new flow's time goes: each table's lookups alone, on the values they saw.
    seen: dict[str, list[dict[str, int]]] = {}

    class Recording(IndexedSwitch):
        __slots__ = ()

        def lookup(self, table: str, values: dict[str, int]) -> TableEntry | None:
            seen.setdefault(table, []).append(dict(values))
            return super().lookup(table, values)

    rec = Recording.of(tables)
    for port, frame in frames[1 : min(n, 5001)]:
        fields = parse(frame)
        assert fields is not None
        src, dst, proto, sport, dport, flags = fields
        evaluate(rec, port, PacketFields(src, dst, proto, sport, dport, flags))
    per_table = {}
    for table in counts:
        if seen.get(table):
            index = rec.indexes[table]
            t0 = time.perf_counter()
            for values in seen[table]:
                index.lookup(values)
            per_table[table] = (time.perf_counter() - t0) / len(seen[table])
    total_us = 1e6 / indexed
    verdict = _verdict(indexed >= TARGET_NEW_FLOWS)
    print(
        f"   indexed (TableIndex)      {indexed:>10,.0f} new flows/s  ({total_us:.1f} us each; "
        f">= 20k/s: {verdict}); {delivered / len(outs):.0%} delivered, {logged / len(outs):.0%} "
        f"logged, of {len(outs):,} flows; {gc_pauses.report()}"
    )
    print(
        f"   the same flows again      {grown:>10,.0f} new flows/s  ({1e6 / grown:.1f} us each: "
        "the flow cache emptied, the indexes grown where these flows go)"
    )
    print(
        f"   linear scan (baseline)    {linear:>10,.0f} new flows/s  ({1e6 / linear:,.0f} us each), "
        f"{sample} flows; x{indexed / linear:,.0f}; the same decision for {agree}/{sample}"
    )
    print(
        f"   first frame after loading {first_s * 1e3:8.1f} ms (snapshot, indexes prepared); "
        f"after a one-entry write {rewrite_s * 1e3:.1f} ms (prepared entries reused)"
    )
    print(
        "   per new flow: "
        + ", ".join(f"{t} {s * 1e6:.1f} us" for t, s in per_table.items())
        + f"; the rest {1e6 / grown - sum(per_table.values()) * 1e6:.1f} us (of the flows "
        "again: parsing, the evaluator's walk, the decision)"
    )
    if args.profile:
        more = busy.new_flows(5000, seed=8)
        _, profile = _profiled(lambda: [process(p, f) for p, f in more])
        print("   new flows under cProfile, top by own time:")
        print(_top(profile, 12))
    print(f"   {load.report()}")


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    workers = {
        "_send": _send_worker,
        "_recv": _recv_worker,
        "_profile_switch": _profile_switch_worker,
    }
    if argv and argv[0] in workers:
        workers[argv[0]](argv[1:])
        return
    ap = argparse.ArgumentParser(
        prog="python -m bench.bench_refswitch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="2 s trials, 5k entries")
    ap.add_argument(
        "--only",
        choices=("dataplane", "p4rt", "newflows"),
        help="run one part (newflows: new flows/s in-process, no root needed)",
    )
    ap.add_argument("--flow", choices=sorted(FLOWS), default="feed", help="default: %(default)s")
    ap.add_argument("--entries", type=int, help="P4Runtime entries (default 20000, quick 5000)")
    ap.add_argument("--batch", type=int, default=1000, help="updates per Write")
    ap.add_argument(
        "--cpus",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=(0, 1),
        help="generator CPU,device CPU (default 0,1)",
    )
    ap.add_argument("--profile", action="store_true", help="also profile the switch")
    ap.add_argument(
        "--no-bmv2",
        action="store_true",
        help="skip BMv2 (measured when simple_switch_grpc is found)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each trial, wait up to S seconds for idle CPUs (on a shared machine)",
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="print every paced trial")
    args = ap.parse_args(argv)
    args.entries = args.entries or (5_000 if args.quick else 20_000)
    if os.geteuid() != 0 and args.only not in ("p4rt", "newflows"):
        raise SystemExit(
            "the data-plane figures need root (namespaces, veths); try --only p4rt or newflows"
        )
    # SIGTERM/SIGHUP end the run like Ctrl-C (even when started with SIGINT ignored, as
    # background jobs are): the finally blocks remove what was set up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    if os.geteuid() == 0 and (removed := remove_stale()):
        print(f"removed leftovers of earlier runs: {', '.join(removed)}")
    logging.getLogger("finsy").setLevel(logging.ERROR)  # "gNMI is not implemented"
    floor = Floor.load()
    ref = floor.program("ref")
    print(
        f"reference switch benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs"
    )
    if args.only in (None, "dataplane"):
        run_dataplane(args, floor, ref)
    if args.only in (None, "p4rt"):
        run_p4rt(args, args.cpus)
    if args.only in (None, "newflows"):
        run_newflows(args)
    if args.profile and args.only != "newflows":  # run_newflows profiles itself
        flow = allowed_flow(FLOWS[args.flow], floor.inventory, ref.tables)
        print("\n== Profile", flush=True)
        profile_in_process(ref, flow, args.entries, 12)
        if os.geteuid() == 0:
            with Testbed(*args.cpus) as bed:
                profile_live(bed, flow, ref, 3.0, 15)


if __name__ == "__main__":
    main()
