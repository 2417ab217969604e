"""The reference switch: a P4Runtime device, its data plane, its ports and its gRPC server.

    switch = ReferenceSwitch(device_id=1, ports={1: "s1-eth1", 2: "s1-eth2"})
    port = switch.start("127.0.0.1:50001")      # sockets bound, then gRPC listening
    ...
    switch.stop()

Without `ports` it is the in-process switch the unit tests drive: `inject(port, frame)`
returns the frames the switch sends, and PacketIns still reach the controllers; frames
sent otherwise (PacketOuts) are kept in `sent`, the newest SENT_FRAMES and SENT_BYTES.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping

import grpc

from runtime.refswitch.dataplane import Dataplane
from runtime.refswitch.device import Device
from runtime.refswitch.ports import PortIO
from runtime.refswitch.server import Limits, P4RuntimeService, TlsConfig, serve

log = logging.getLogger("p4seg.switch")

SENT_FRAMES = 1024  # in-process mode: frames kept in `sent`, the newest
SENT_BYTES = 4 << 20  # and their bytes, at most


class ReferenceSwitch:
    def __init__(
        self,
        device_id: int,
        ports: Mapping[int, str] | None = None,
        cpu_port: int = 255,
        limits: Limits | None = None,
    ) -> None:
        if cpu_port in (ports or {}):
            raise ValueError(f"port {cpu_port} is the CPU port")
        self.limits = limits or Limits()
        self.device = Device(device_id, cpu_port, self.limits.max_entry_metadata)
        self.dataplane = Dataplane(self.device)
        self.ports = dict(ports or {})
        self.io: PortIO | None = None
        self.service = P4RuntimeService(self.device, self.dataplane, self._transmit, self.limits)
        self.server: grpc.Server | None = None
        self._thread: threading.Thread | None = None
        self._sent: deque[tuple[int, bytes]] = deque()
        self._sent_bytes = 0
        self._sent_lock = threading.Lock()
        self.sent_dropped = 0  # in-process mode: frames pushed out of `sent`
        self.server_address = ""  # host:port once started

    def start(self, grpc_addr: str = "127.0.0.1:0", tls: TlsConfig | None = None) -> int:
        """Bind the ports, then listen for P4Runtime; returns the gRPC port."""
        if self.ports:
            self.io = PortIO(self.ports)
            self._thread = threading.Thread(
                target=self.io.run, args=(self._receive,), name="dataplane", daemon=True
            )
            self._thread.start()
        self.server, port = serve(self.service, grpc_addr, tls)
        self.server_address = f"{grpc_addr.rpartition(':')[0]}:{port}"
        return port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0.5).wait()
            self.server = None
        if self.io is not None:
            self.io.shutdown()
            if self._thread is not None:
                self._thread.join()
            self.io.close()
            self.io = None

    def _receive(self, port: int, frame: bytes) -> None:
        for out_port, out in self.dataplane.process(port, frame):
            self._transmit(out_port, out)

    def _transmit(self, port: int, frame: bytes) -> None:
        if port == self.device.cpu_port:
            self.service.packet_in(frame)
        elif self.io is not None:
            self.io.send(port, frame)
        else:
            self._keep(port, frame)

    def _keep(self, port: int, frame: bytes) -> None:
        with self._sent_lock:
            self._sent.append((port, frame))
            self._sent_bytes += len(frame)
            while len(self._sent) > SENT_FRAMES or self._sent_bytes > SENT_BYTES:
                _, old = self._sent.popleft()
                self._sent_bytes -= len(old)
                self.sent_dropped += 1

    @property
    def sent(self) -> list[tuple[int, bytes]]:
        """In-process mode: the newest frames sent to a port (PacketOuts), oldest first."""
        with self._sent_lock:
            return list(self._sent)

    def inject(self, port: int, frame: bytes) -> list[tuple[int, bytes]]:
        """In-process: the frames sent (other than to the CPU) when `frame` arrives on `port`."""
        out = []
        for out_port, data in self.dataplane.process(port, frame):
            if out_port == self.device.cpu_port:
                self.service.packet_in(data)
            else:
                out.append((out_port, data))
        return out
