"""A small synchronous P4Runtime client for tests of the reference switch.

Raw stubs on purpose: the tests check exact statuses and messages on the wire, so nothing
here retries, reorders or fixes up a request.
"""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from finsy.proto import p4i, p4r, p4r_grpc, rpc_status
from google.protobuf import text_format

from compiler.entries import DefaultAction, TableEntry
from p4src.p4info import build_p4info
from p4src.refconfig import device_config
from p4src.spec import PIPELINE, Pipeline
from runtime.entities import default_entry_proto, table_entry_proto
from topologies.switches import free_port

WAIT = 10.0  # seconds: an upper bound for a message that must come, never a pause


def wait_for(condition: Callable[[], bool], timeout: float = WAIT, every: float = 0.005) -> bool:
    """Poll `condition` every `every` s until it holds or `timeout` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def pipeline_config(
    pipeline: Pipeline = PIPELINE, cookie: int | None = None
) -> p4r.ForwardingPipelineConfig:
    config = p4r.ForwardingPipelineConfig(
        p4info=build_p4info(pipeline), p4_device_config=device_config(pipeline).encode()
    )
    if cookie is not None:
        config.cookie.cookie = cookie
    return config


def config_from_build(build_dir: Path) -> p4r.ForwardingPipelineConfig:
    info = text_format.Parse((build_dir / "p4info.txtpb").read_text(), p4i.P4Info())
    return p4r.ForwardingPipelineConfig(
        p4info=info, p4_device_config=(build_dir / "p4/ref/p4seg.json").read_bytes()
    )


def u128(value: int) -> p4r.Uint128:
    return p4r.Uint128(high=value >> 64, low=value & ((1 << 64) - 1))


@dataclass
class WriteResult:
    code: grpc.StatusCode
    details: str
    errors: list[int]  # one google.rpc code per update when code is UNKNOWN


class Session:
    """A channel, optionally with an arbitrated stream, to one device."""

    def __init__(
        self,
        address: str,
        device_id: int = 1,
        election_id: int | None = 1,
        role: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        arbitrate: bool = True,
    ) -> None:
        self.channel = (
            grpc.secure_channel(address, credentials)
            if credentials
            else grpc.insecure_channel(address)
        )
        self.stub = p4r_grpc.P4RuntimeStub(self.channel)
        self.device_id, self.election_id, self.role = device_id, election_id, role
        self.requests: queue.Queue[p4r.StreamMessageRequest | None] = queue.Queue()
        self.responses: queue.Queue[p4r.StreamMessageResponse | grpc.RpcError] = queue.Queue()
        self._stream: Iterator[p4r.StreamMessageResponse] | None = None
        if arbitrate:
            self.open_stream()
            self.arbitrate(election_id)

    # -- stream --------------------------------------------------------------------------

    def open_stream(self) -> None:
        def gen() -> Iterator[p4r.StreamMessageRequest]:
            while (msg := self.requests.get()) is not None:
                yield msg

        self._stream = self.stub.StreamChannel(gen())

        def pump() -> None:
            assert self._stream is not None
            try:
                for msg in self._stream:
                    self.responses.put(msg)
            except grpc.RpcError as err:
                self.responses.put(err)

        threading.Thread(target=pump, daemon=True).start()

    def arbitrate(self, election_id: int | None, device_id: int | None = None) -> None:
        req = p4r.StreamMessageRequest()
        req.arbitration.device_id = self.device_id if device_id is None else device_id
        if self.role:
            req.arbitration.role.name = self.role
        if election_id is not None:
            req.arbitration.election_id.CopyFrom(u128(election_id))
        self.election_id = election_id
        self.requests.put(req)

    def next(self, kind: str | None = None) -> p4r.StreamMessageResponse | grpc.RpcError:
        """The next stream message (of `kind`, skipping others), or the stream's error."""
        while True:
            msg = self.responses.get(timeout=WAIT)
            if isinstance(msg, grpc.RpcError) or kind is None or msg.WhichOneof("update") == kind:
                return msg

    def arbitration_status(self) -> int:
        msg = self.next("arbitration")
        assert not isinstance(msg, grpc.RpcError), msg
        return msg.arbitration.status.code

    def send_packet(self, payload: bytes, egress_port: int) -> None:
        req = p4r.StreamMessageRequest()
        req.packet.payload = payload
        req.packet.metadata.add(metadata_id=1, value=egress_port.to_bytes(2, "big"))
        self.requests.put(req)

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()

    # -- unary ---------------------------------------------------------------------------

    def _election(self, msg: object) -> None:
        if self.election_id is not None:
            msg.election_id.CopyFrom(u128(self.election_id))  # type: ignore[attr-defined]
        if self.role:
            msg.role = self.role  # type: ignore[attr-defined]

    def set_pipeline(
        self,
        config: p4r.ForwardingPipelineConfig | None = None,
        action: p4r.SetForwardingPipelineConfigRequest.Action.ValueType = (
            p4r.SetForwardingPipelineConfigRequest.VERIFY_AND_COMMIT
        ),
    ) -> None:
        req = p4r.SetForwardingPipelineConfigRequest(device_id=self.device_id, action=action)
        self._election(req)
        if config is not None:
            req.config.CopyFrom(config)
        self.stub.SetForwardingPipelineConfig(req, timeout=WAIT)

    def write(
        self,
        updates: Iterable[p4r.Update],
        atomicity: p4r.WriteRequest.Atomicity.ValueType = p4r.WriteRequest.CONTINUE_ON_ERROR,
    ) -> WriteResult:
        req = p4r.WriteRequest(device_id=self.device_id, atomicity=atomicity)
        self._election(req)
        req.updates.extend(updates)
        try:
            self.stub.Write(req, timeout=WAIT)
        except grpc.RpcError as err:
            errors = []
            for key, value in err.trailing_metadata() or ():
                if key == "grpc-status-details-bin":
                    status = rpc_status.Status.FromString(value)
                    for detail in status.details:
                        e = p4r.Error()
                        detail.Unpack(e)
                        errors.append(e.canonical_code)
            return WriteResult(err.code(), err.details(), errors)
        return WriteResult(grpc.StatusCode.OK, "", [])

    def read(self, *entities: p4r.Entity) -> list[p4r.Entity]:
        req = p4r.ReadRequest(device_id=self.device_id, entities=entities)
        return [e for resp in self.stub.Read(req, timeout=WAIT) for e in resp.entities]

    def read_table(self, table_id: int = 0, counters: bool = False) -> list[p4r.TableEntry]:
        entity = p4r.Entity()
        entity.table_entry.table_id = table_id
        if counters:
            entity.table_entry.counter_data.SetInParent()
        return [e.table_entry for e in self.read(entity)]


def update(kind: p4r.Update.Type.ValueType, entry: p4r.TableEntry) -> p4r.Update:
    u = p4r.Update(type=kind)
    u.entity.table_entry.CopyFrom(entry)
    return u


def inserts(entries: Iterable[TableEntry], pipeline: Pipeline = PIPELINE) -> list[p4r.Update]:
    return [update(p4r.Update.INSERT, table_entry_proto(pipeline, e)) for e in entries]


def default_updates(
    defaults: Iterable[DefaultAction], pipeline: Pipeline = PIPELINE
) -> list[p4r.Update]:
    return [update(p4r.Update.MODIFY, default_entry_proto(pipeline, d)) for d in defaults]


def clone_session_update(
    session: int, port: int, kind: p4r.Update.Type.ValueType = p4r.Update.INSERT
) -> p4r.Update:
    u = p4r.Update(type=kind)
    cs = u.entity.packet_replication_engine_entry.clone_session_entry
    cs.session_id = session
    cs.replicas.add(egress_port=port, instance=1)
    return u


@contextlib.contextmanager
def bmv2_switch(program: str, device_id: int = 1) -> Iterator[str]:
    """simple_switch_grpc without a program, on free loopback ports: its gRPC address."""
    grpc_port, thrift_port = free_port(), free_port()
    proc = subprocess.Popen(
        [program, "--no-p4", "--device-id", str(device_id), "--thrift-port", str(thrift_port),
         "--", "--grpc-server-addr", f"127.0.0.1:{grpc_port}", "--cpu-port", "255"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", grpc_port)) == 0

        assert wait_for(listening, 30), "simple_switch_grpc did not start"
        yield f"127.0.0.1:{grpc_port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def inventory_at(inventory: Path, addresses: dict[str, str], out: Path) -> Path:
    """A copy of `inventory` whose switches' P4Runtime addresses are `addresses` (switch
    name -> host:port), e.g. reference switches on free loopback ports."""
    text = inventory.read_text()
    for name, address in addresses.items():
        old = re.search(rf'  {re.escape(name)}:.*p4rt: "([^"]+)"', text)
        assert old is not None, f"{name} has no p4rt address in {inventory}"
        text = text.replace(old.group(1), address)
    out.write_text(text)
    return out
