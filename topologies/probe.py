"""Real traffic inside a host's namespace, for the segmentation matrix and the scenarios.

    python -m topologies.probe listen ADDR --tcp 22,9876 --udp 30001
        TCP listeners that accept (and close) connections, UDP sockets that report every
        datagram; prints "ready" once bound, then one JSON line per datagram received:
        {"udp": PORT, "token": "..."}; runs until stdin closes or SIGTERM.

    python -m topologies.probe send SRC_ADDR --timeout 1.0   (flows as JSON lines on stdin)
        {"id": "...", "dst": "10.0.2.11", "proto": "tcp|udp|icmp", "port": 9876}
        all at once, concurrently: a TCP connect (handshake completed = passed), a UDP
        datagram carrying the flow id as its token (the listener says whether it arrived),
        an ICMP echo (reply received = passed); prints one JSON line per flow:
        {"id": "...", "ok": true|false} (for UDP: "sent").

Stdlib only: it runs with the host's python, in a namespace with nothing but loopback and
one interface.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# -- listen -------------------------------------------------------------------------------


def listen(addr: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
    socks: dict[int, tuple[str, socket.socket]] = {}
    for port in tcp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(512)
        s.setblocking(False)
        socks[s.fileno()] = ("tcp", s)
    for port in udp_ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, port))
        s.setblocking(False)
        socks[s.fileno()] = ("udp", s)
    print("ready", flush=True)
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    poller = select.poll()
    for fd in socks:
        poller.register(fd, select.POLLIN)
    while not stop.is_set():
        for fd, _ in poller.poll(100):
            kind, s = socks[fd]
            try:
                if kind == "tcp":
                    conn, _ = s.accept()
                    conn.close()
                else:
                    data, _ = s.recvfrom(2048)
                    port = s.getsockname()[1]
                    print(
                        json.dumps({"udp": port, "token": data.decode(errors="replace")}),
                        flush=True,
                    )
            except (BlockingIOError, ConnectionError):
                continue


# -- send ---------------------------------------------------------------------------------


async def _tcp(src: str, dst: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(dst, port, local_addr=(src, 0)), timeout
        )
    except (TimeoutError, OSError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _udp(src: str, dst: str, port: int, token: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.sendto(token.encode(), (dst, port))
    return True


def _icmp_all(src: str, flows: list[dict[str, object]], timeout: float) -> dict[str, bool]:
    """Ping every destination once (one raw socket); which ids got their echo reply."""
    if not flows:
        return {}
    ident = os.getpid() & 0xFFFF
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.bind((src, 0))
    by_seq: dict[int, str] = {}
    for seq, flow in enumerate(flows, start=1):
        header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
        payload = b"p4seg-probe"
        packet = struct.pack(
            "!BBHHH", ICMP_ECHO_REQUEST, 0, _checksum(header + payload), ident, seq
        )
        s.sendto(packet + payload, (str(flow["dst"]), 0))
        by_seq[seq] = str(flow["id"])
    got: dict[str, bool] = {fid: False for fid in by_seq.values()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(got.values()):
        ready, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        data, addr = s.recvfrom(2048)
        ihl = (data[0] & 0x0F) * 4
        kind, _, _, rid, seq = struct.unpack_from("!BBHHH", data, ihl)
        if kind == ICMP_ECHO_REPLY and rid == ident and seq in by_seq:
            flow = flows[seq - 1]
            if addr[0] == flow["dst"]:
                got[by_seq[seq]] = True
    s.close()
    return got


async def send(src: str, flows: list[dict[str, object]], timeout: float) -> dict[str, bool]:
    results: dict[str, bool] = {}
    tcp = [f for f in flows if f["proto"] == "tcp"]
    icmp = [f for f in flows if f["proto"] == "icmp"]
    for f in flows:
        if f["proto"] == "udp":
            results[str(f["id"])] = _udp(src, str(f["dst"]), int(f["port"]), str(f["id"]))  # type: ignore[call-overload]
    pings = asyncio.get_running_loop().run_in_executor(None, _icmp_all, src, icmp, timeout)
    limit = asyncio.Semaphore(256)

    async def one(f: dict[str, object]) -> None:
        async with limit:
            results[str(f["id"])] = await _tcp(src, str(f["dst"]), int(f["port"]), timeout)  # type: ignore[call-overload]

    await asyncio.gather(*(one(f) for f in tcp))
    results.update(await pings)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m topologies.probe")
    sub = p.add_subparsers(dest="mode", required=True)
    lp = sub.add_parser("listen")
    lp.add_argument("addr")
    lp.add_argument("--tcp", default="")
    lp.add_argument("--udp", default="")
    sp = sub.add_parser("send")
    sp.add_argument("src")
    sp.add_argument("--timeout", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.mode == "listen":

        def ports(text: str) -> list[int]:
            return [int(x) for x in text.split(",") if x]

        listen(args.addr, ports(args.tcp), ports(args.udp))
        return 0
    flows = [json.loads(line) for line in sys.stdin if line.strip()]
    for fid, ok in asyncio.run(send(args.src, flows, args.timeout)).items():
        print(json.dumps({"id": fid, "ok": ok}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
