"""Real interfaces for the reference switch: raw frames over AF_PACKET sockets.

- A packet socket also sees the frames the switch itself transmits (PACKET_OUTGOING):
  those are skipped, or the switch would loop.
- A frame from a local sender with checksum offload carries a partial L4 checksum (the
  kernel marks it TP_STATUS_CSUMNOTREADY in PACKET_AUXDATA); the switch completes the
  checksum before forwarding, or the receiver would drop it.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger("p4seg.switch")

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_CSUMNOTREADY = 1 << 3
_AUXDATA = struct.Struct("=IIIHHHH")
_CMSG_SPACE = socket.CMSG_SPACE(_AUXDATA.size)
MAX_FRAME = 65536 + 64
BURST = 64  # frames read from one socket before polling again


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF or 0xFFFF  # UDP: 0 would mean "no checksum"


def complete_checksum(frame: bytes) -> bytes:
    """`frame` with its TCP/UDP checksum computed in full (IPv4, no options needed)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return frame
    ihl = (frame[14] & 0x0F) * 4
    proto = frame[23]
    l4 = 14 + ihl
    total = struct.unpack_from("!H", frame, 16)[0]
    end = min(len(frame), 14 + total)
    offset = {6: 16, 17: 6}.get(proto)
    if offset is None or end - l4 < offset + 2:
        return frame
    segment = bytearray(frame[l4:end])
    segment[offset : offset + 2] = b"\x00\x00"
    pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, len(segment))
    struct.pack_into("!H", segment, offset, _checksum(pseudo + bytes(segment)))
    return frame[:l4] + bytes(segment) + frame[end:]


def segment_tcp(frame: bytes, mtu: int) -> list[bytes]:
    """A TCP frame too big for the egress port — a host with TX offload on hands its veth
    64 KB "super-frames" and leaves the cutting to the NIC (TSO) — cut into segments that
    fit, as the NIC would have: payload split by MSS, sequence numbers and IP ids advanced,
    FIN and PSH only on the last segment, checksums recomputed. Anything else is returned
    as it is (and will not fit, exactly as on a switch without this)."""
    if len(frame) - 14 <= mtu or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return [frame]
    ihl = (frame[14] & 0x0F) * 4
    l4 = 14 + ihl
    if len(frame) < l4 + 20:
        return [frame]
    doff = (frame[l4 + 12] >> 4) * 4
    start = l4 + doff
    end = min(len(frame), 14 + struct.unpack_from("!H", frame, 16)[0])
    mss = mtu - ihl - doff
    if mss <= 0 or end <= start:
        return [frame]
    payload = frame[start:end]
    ip_id = struct.unpack_from("!H", frame, 18)[0]
    seq = struct.unpack_from("!I", frame, l4 + 4)[0]
    out = []
    for i, offset in enumerate(range(0, len(payload), mss)):
        chunk = payload[offset : offset + mss]
        last = offset + mss >= len(payload)
        ip = bytearray(frame[14:l4])
        struct.pack_into("!HH", ip, 2, ihl + doff + len(chunk), (ip_id + i) & 0xFFFF)
        ip[10:12] = b"\x00\x00"
        struct.pack_into("!H", ip, 10, _checksum(bytes(ip)))
        tcp = bytearray(frame[l4:start])
        struct.pack_into("!I", tcp, 4, (seq + offset) & 0xFFFFFFFF)
        if not last:
            tcp[13] &= ~0x09 & 0xFF  # FIN and PSH belong to the last segment
        if i:
            tcp[13] &= ~0x80 & 0xFF  # CWR only on the first
        out.append(complete_checksum(frame[:14] + bytes(ip) + bytes(tcp) + chunk))
    return out


def _mtu(ifname: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{ifname}/mtu").read_text())
    except (OSError, ValueError):
        return 1500


class PortIO:
    """One packet socket per switch port; `run` moves frames until `stop` is set."""

    def __init__(self, ports: Mapping[int, str]) -> None:
        self.ports = dict(ports)
        self.sockets: dict[int, socket.socket] = {}
        self.mtu: dict[int, int] = {}
        self.stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        try:
            for port, ifname in self.ports.items():
                s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.bind((ifname, ETH_P_ALL))
                self.mtu[port] = _mtu(ifname)
                s.setblocking(False)
                self.sockets[port] = s
        except OSError:
            self.close()
            raise

    def send(self, port: int, frame: bytes) -> None:
        s = self.sockets.get(port)
        if s is None:
            return  # no such port: dropped, as on any switch
        try:
            for segment in segment_tcp(frame, self.mtu[port]):
                s.send(segment)
        except (BlockingIOError, OSError) as err:
            log.debug("port %d: frame not sent (%s)", port, err)

    def run(self, on_frame: Callable[[int, bytes], None]) -> None:
        """Read every port and call `on_frame(port, frame)` for each received frame."""
        poller = select.poll()
        by_fd = {s.fileno(): (port, s) for port, s in self.sockets.items()}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self.stop.is_set():
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    continue
                port, s = by_fd[fd]
                for _ in range(BURST):
                    try:
                        data, ancdata, _flags, addr = s.recvmsg(MAX_FRAME, _CMSG_SPACE)
                    except BlockingIOError:
                        break
                    except OSError as err:  # the interface went away
                        log.warning("port %d: %s", port, err)
                        poller.unregister(fd)
                        break
                    if addr[2] == PACKET_OUTGOING:
                        continue
                    for level, kind, cdata in ancdata:
                        if (
                            level == SOL_PACKET
                            and kind == PACKET_AUXDATA
                            and _AUXDATA.unpack_from(cdata)[0] & TP_STATUS_CSUMNOTREADY
                        ):
                            data = complete_checksum(data)
                    on_frame(port, data)

    def shutdown(self) -> None:
        """Make `run` return (from any thread)."""
        self.stop.set()
        os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Close the sockets, once `run` has returned."""
        for s in self.sockets.values():
            s.close()
        self.sockets.clear()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1
