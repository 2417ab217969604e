"""The reference switch's P4Runtime server (grpcio, the protobufs finsy ships).

Arbitration follows the P4Runtime specification ("Client Arbitration and Controller
Replication"): per (device, role) the primary is the live client whose election id is the
highest the server has ever seen for it; every change is announced to every client of the
role (OK to the primary, ALREADY_EXISTS to backups, NOT_FOUND when there is none); a
duplicate live election id ends the new stream with INVALID_ARGUMENT; a client without an
election id is a backup for good and can only read. Write and SetForwardingPipelineConfig
need the primary's (role, election id); Read and GetForwardingPipelineConfig do not.

The switch serves the default role only: a MasterArbitrationUpdate, Write or
SetForwardingPipelineConfig naming another role gets NOT_FOUND (as an unknown device does),
so no role without a configuration can take full control.

Write runs CONTINUE_ON_ERROR batches; when an update fails the RPC ends UNKNOWN with one
p4.Error per update in the status details, in order, as long as they fit `Limits`'
error_details_bytes (which a client with gRPC's default 8 KiB metadata limit accepts);
past it the details stop early and the status message says how many were left out and
which of those failed. Other atomicity modes: UNIMPLEMENTED.

Every client-facing limit (streams, arbitration deadline, error details, read paging,
entry metadata) is a field of `Limits`; docs/refswitch.md explains each.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from finsy.proto import p4r, p4r_grpc, rpc_code, rpc_status
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError

from runtime.codec import EncodingError, decode, encode
from runtime.refswitch.dataplane import Dataplane, packet_in_fields, packet_out_frame
from runtime.refswitch.device import MAX_METADATA, Device, P4RuntimeError
from runtime.refswitch.ports import MAX_FRAME

log = logging.getLogger("p4seg.switch")

P4RUNTIME_API_VERSION = "1.4.0"
MAX_BATCH = 100_000  # updates per Write; larger batches: RESOURCE_EXHAUSTED
READ_CHUNK = 4096  # entities per ReadResponse, at most (Limits.read_response_bytes too)
STREAM_QUEUE = 4096  # messages waiting for a slow client; PacketIns beyond it are dropped
MESSAGE_CHARS = 512  # a status message (grpc-message trailer), at most
_ERROR_SPACE = "p4seg-ref"
_ERROR_TYPE_URL = "type.googleapis.com/p4.v1.Error"


@dataclass(frozen=True, slots=True)
class Limits:
    """What clients may hold of one switch (docs/refswitch.md; `p4seg-switch` flags)."""

    max_streams: int = 32  # StreamChannels open at once, all clients
    max_streams_per_peer: int = 8  # of them from one client address
    reserved_streams: int = 2  # beyond both, for a client that arbitrates as the new primary
    arbitration_timeout: float = 10.0  # seconds a new stream has for its first arbitration
    unary_workers: int = 8  # threads no stream can take: Write, Read, pipeline RPCs
    error_details_bytes: int = 6144  # a failed Write's google.rpc.Status trailer, at most
    error_message_chars: int = 200  # one update's error message, at most
    read_response_bytes: int = 1 << 20  # one ReadResponse, at most (one entity may exceed)
    max_entry_metadata: int = MAX_METADATA  # a table entry's opaque `metadata` bytes

    def __post_init__(self) -> None:
        for name, least in _LEAST.items():
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be at least {least:g}")

    @property
    def workers(self) -> int:
        """gRPC threads: one per stream that may be open, the unary ones, two to refuse."""
        return self.max_streams + self.reserved_streams + self.unary_workers + 2


_LEAST = {  # the smallest value of each limit that still lets a controller work
    "max_streams": 1,
    "max_streams_per_peer": 1,
    "reserved_streams": 0,
    "arbitration_timeout": 0.001,
    "unary_workers": 1,
    "error_details_bytes": 1024,
    "error_message_chars": 40,
    "read_response_bytes": 4096,
    "max_entry_metadata": 0,
}


def _short(text: str, limit: int = MESSAGE_CHARS) -> str:
    """`text` as printable ASCII of at most `limit` characters (a status message)."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote(name: str) -> str:
    """A client-chosen name, quoted and cut short for a message."""
    return _short(repr(name), 40)


def _u128(msg: p4r.Uint128) -> int:
    return (msg.high << 64) | msg.low


@dataclass(eq=False)
class Client:
    """One live StreamChannel."""

    peer: str
    device_id: int = 0
    role: str = ""
    election_id: int | None = None  # None: arbitrated without an election id
    arbitrated: bool = False
    reserved: bool = False  # holds a reserved stream: must arbitrate as the new primary
    ended: bool = False  # the stream is over (or evicted): no arbitration is accepted
    outbox: queue.Queue[object] = field(default_factory=queue.Queue)

    @property
    def address(self) -> str:
        """The peer without its port: streams are bounded per client address."""
        kind, _, rest = self.peer.partition(":")
        return f"{kind}:{rest.rpartition(':')[0]}" if kind in ("ipv4", "ipv6") else self.peer

    def send(self, msg: object) -> bool:
        """Queue a message for the client; False (dropped) when STREAM_QUEUE are waiting."""
        if self.outbox.qsize() >= STREAM_QUEUE:
            return False
        self.outbox.put(msg)
        return True

    def end(self, abort: Abort | None = None) -> None:
        """End the stream (with `abort`'s status); never blocks, whatever is queued."""
        self.outbox.put(abort)


class Abort(Exception):
    """Ends a stream with this status (queued for the stream's generator to raise)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class Arbiter:
    """Primary/backup state per role of one device."""

    def __init__(self, device_id: int) -> None:
        self.device_id = device_id
        self.lock = threading.Lock()
        self.clients: dict[str, list[Client]] = {}
        self.highest: dict[str, int] = {}  # election_id_past per role

    def primary(self, role: str) -> Client | None:
        best = self.highest.get(role)
        if best is None:
            return None
        return next((c for c in self.clients.get(role, ()) if c.election_id == best), None)

    def is_primary(self, role: str, election_id: int) -> bool:
        with self.lock:
            p = self.primary(role)
            return p is not None and p.election_id == election_id

    def primaries(self) -> list[Client]:
        with self.lock:
            return [p for role in self.clients if (p := self.primary(role)) is not None]

    def update(self, client: Client, msg: p4r.MasterArbitrationUpdate) -> None:
        """Handle one MasterArbitrationUpdate; raise Abort to end the stream."""
        role = msg.role.name if msg.HasField("role") else ""
        election = _u128(msg.election_id) if msg.HasField("election_id") else None
        with self.lock:
            if client.ended:
                raise Abort(grpc.StatusCode.CANCELLED, "the stream is closing")
            if not client.arbitrated:
                if msg.device_id != self.device_id:
                    raise Abort(grpc.StatusCode.NOT_FOUND, f"no device {msg.device_id} here")
                if role:
                    raise Abort(grpc.StatusCode.NOT_FOUND, _no_role(role))
            elif msg.device_id != client.device_id or role != client.role:
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "device id and role cannot change on a stream: open a new one",
                )
            if msg.HasField("role") and msg.role.HasField("config"):
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "role configs are not supported")
            peers = [c for c in self.clients.get(role, ()) if c is not client]
            if election is not None and any(c.election_id == election for c in peers):
                raise Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"election id {election} is already used by another live controller",
                )
            past = self.highest.get(role)
            becomes_primary = election is not None and (past is None or election >= past)
            if client.reserved and not client.arbitrated and not becomes_primary:
                raise Abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the switch is at its stream limit: past it, only a controller that "
                    "becomes primary (an election id at least the highest seen) may connect",
                )
            was_primary = self.primary(role) is client
            had_primary = self.primary(role) is not None
            client.device_id, client.role, client.election_id = msg.device_id, role, election
            if not client.arbitrated:
                client.arbitrated = True
                self.clients.setdefault(role, []).append(client)
            if becomes_primary:
                assert election is not None
                self.highest[role] = election
                if had_primary and not was_primary:
                    self._notify(role, exclude=client)
                    self._notify_one(role, client)
                else:
                    self._notify(role)
            elif was_primary:
                self._notify(role)  # the primary downgraded itself
            else:
                self._notify_one(role, client)

    def remove(self, client: Client) -> None:
        with self.lock:
            if not client.arbitrated:
                return
            role = client.role
            was_primary = self.primary(role) is client
            self.clients[role].remove(client)
            client.arbitrated = False
            if was_primary:
                self._notify(role)

    def _advisory(self, role: str, to: Client) -> p4r.StreamMessageResponse:
        resp = p4r.StreamMessageResponse()
        arb = resp.arbitration
        arb.device_id = self.device_id
        if role:
            arb.role.name = role
        past = self.highest.get(role)
        if past is not None:
            arb.election_id.high, arb.election_id.low = past >> 64, past & ((1 << 64) - 1)
        primary = self.primary(role)
        if primary is to:
            arb.status.code = rpc_code.OK
        elif primary is not None:
            arb.status.code = rpc_code.ALREADY_EXISTS
            arb.status.message = "a backup: another controller is primary"
        else:
            arb.status.code = rpc_code.NOT_FOUND
            arb.status.message = "no primary controller"
        return resp

    def _notify_one(self, role: str, client: Client) -> None:
        client.send(self._advisory(role, client))

    def _notify(self, role: str, exclude: Client | None = None) -> None:
        for c in self.clients.get(role, ()):
            if c is not exclude:
                c.send(self._advisory(role, c))


class StreamSlots:
    """Who may hold a StreamChannel (and with it one of the server's threads).

    At most `max_streams` streams, `max_streams_per_peer` of them from one client address.
    Past either limit a stream may take one of `reserved_streams` more, on condition that
    it arbitrates as the new primary; until it has arbitrated, a newer stream past the
    limits takes its place. So idle streams can neither starve Write, Read and
    SetForwardingPipelineConfig (their threads are apart) nor keep a controller out.
    """

    def __init__(self, limits: Limits, lock: threading.Lock) -> None:
        self.limits = limits
        self.lock = lock  # the arbiter's: eviction and arbitration never race
        self.per_address: dict[str, int] = {}
        self.open = 0
        self.reserve: list[Client] = []

    def admit(self, client: Client) -> str | None:
        """Take a stream for `client`; None, or why it is refused (RESOURCE_EXHAUSTED)."""
        limits = self.limits
        with self.lock:
            mine = self.per_address.get(client.address, 0)
            if self.open < limits.max_streams and mine < limits.max_streams_per_peer:
                self.open += 1
                self.per_address[client.address] = mine + 1
                return None
            if len(self.reserve) >= limits.reserved_streams:
                idle = next((c for c in self.reserve if not c.arbitrated), None)
                if idle is None:
                    return (
                        f"too many streams ({self.open} open, {mine} from {client.address}; "
                        f"limits {limits.max_streams} and {limits.max_streams_per_peer}, "
                        "and the reserved ones are taken)"
                    )
                self.reserve.remove(idle)
                idle.ended = True
                idle.end(
                    Abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "too many streams: a newer one took this reserved stream before it "
                        "arbitrated",
                    )
                )
            client.reserved = True
            self.reserve.append(client)
            return None

    def release(self, client: Client) -> None:
        with self.lock:
            client.ended = True
            if client.reserved:
                if client in self.reserve:
                    self.reserve.remove(client)
                return
            self.open -= 1
            left = self.per_address[client.address] - 1
            if left:
                self.per_address[client.address] = left
            else:
                del self.per_address[client.address]


class P4RuntimeService(p4r_grpc.P4RuntimeServicer):
    """P4Runtime for one device; `transmit` sends data-plane output (port, frame)."""

    def __init__(
        self,
        device: Device,
        dataplane: Dataplane,
        transmit: Callable[[int, bytes], None],
        limits: Limits | None = None,
    ) -> None:
        self.device = device
        self.dataplane = dataplane
        self.transmit = transmit
        self.limits = limits or Limits()
        self.arbiter = Arbiter(device.device_id)
        self.slots = StreamSlots(self.limits, self.arbiter.lock)
        self.packet_ins_dropped = 0

    # -- unary RPCs ----------------------------------------------------------------------

    def _check_device(self, device_id: int, context: grpc.ServicerContext) -> None:
        if device_id != self.device.device_id:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no device {device_id} here")

    def _check_primary(self, request: object, context: grpc.ServicerContext) -> None:
        role = getattr(request, "role", "")
        if role:
            context.abort(grpc.StatusCode.NOT_FOUND, _no_role(role))
        election_id = request.election_id  # type: ignore[attr-defined]
        if not request.HasField("election_id") or not self.arbiter.is_primary(  # type: ignore[attr-defined]
            role, _u128(election_id)
        ):
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "not the primary controller for this device and role (arbitrate on a "
                "StreamChannel with the highest election id first)",
            )

    def Capabilities(
        self, request: p4r.CapabilitiesRequest, context: grpc.ServicerContext
    ) -> p4r.CapabilitiesResponse:
        return p4r.CapabilitiesResponse(p4runtime_api_version=P4RUNTIME_API_VERSION)

    def SetForwardingPipelineConfig(
        self, request: p4r.SetForwardingPipelineConfigRequest, context: grpc.ServicerContext
    ) -> p4r.SetForwardingPipelineConfigResponse:
        self._check_device(request.device_id, context)
        self._check_primary(request, context)
        config = request.config if request.HasField("config") else None
        try:
            self.device.set_pipeline(request.action, config)
        except P4RuntimeError as err:
            context.abort(_grpc_status(err.code), _short(err.message))
        log.info("pipeline set (action %s)", request.action)
        return p4r.SetForwardingPipelineConfigResponse()

    def GetForwardingPipelineConfig(
        self, request: p4r.GetForwardingPipelineConfigRequest, context: grpc.ServicerContext
    ) -> p4r.GetForwardingPipelineConfigResponse:
        self._check_device(request.device_id, context)
        config = self.device.pipeline_config(request.response_type)
        resp = p4r.GetForwardingPipelineConfigResponse()
        if config is not None:
            resp.config.CopyFrom(config)
        return resp

    def Write(self, request: p4r.WriteRequest, context: grpc.ServicerContext) -> p4r.WriteResponse:
        self._check_device(request.device_id, context)
        self._check_primary(request, context)
        if self.device.schema is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no forwarding pipeline is set")
        if request.atomicity != p4r.WriteRequest.CONTINUE_ON_ERROR:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "only CONTINUE_ON_ERROR batches are supported"
            )
        if len(request.updates) > MAX_BATCH:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{len(request.updates)} updates in one batch (at most {MAX_BATCH})",
            )
        try:
            results = self.device.write(request.updates)
        except P4RuntimeError as err:
            context.abort(_grpc_status(err.code), _short(err.message))
        if any(r is not None for r in results):
            status = write_failure(results, self.limits)
            context.set_trailing_metadata(
                (("grpc-status-details-bin", status.SerializeToString()),)
            )
            context.abort(grpc.StatusCode.UNKNOWN, status.message)
        return p4r.WriteResponse()

    def Read(
        self, request: p4r.ReadRequest, context: grpc.ServicerContext
    ) -> Iterator[p4r.ReadResponse]:
        self._check_device(request.device_id, context)
        try:
            entities = list(self.device.read(request.entities))
        except P4RuntimeError as err:
            context.abort(_grpc_status(err.code), _short(err.message))
        yield from read_pages(entities, self.limits.read_response_bytes)

    # -- the stream ----------------------------------------------------------------------

    def StreamChannel(
        self,
        request_iterator: Iterator[p4r.StreamMessageRequest | bytes],
        context: grpc.ServicerContext,
    ) -> Iterator[p4r.StreamMessageResponse]:
        client = Client(context.peer())
        refused = self.slots.admit(client)
        if refused is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            reader = threading.Thread(
                target=self._read_stream, args=(client, request_iterator), daemon=True
            )
            context.add_callback(client.end)
            reader.start()
            timeout = self.limits.arbitration_timeout
            deadline: float | None = time.monotonic() + timeout
            while True:
                if deadline is not None and client.arbitrated:
                    deadline = None
                try:
                    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                    msg = client.outbox.get(timeout=wait)
                except queue.Empty:
                    if client.arbitrated:
                        continue
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no MasterArbitrationUpdate within {timeout:g} s of opening the stream",
                    )
                if msg is None:
                    return
                if isinstance(msg, Abort):
                    context.abort(msg.code, msg.message)
                yield msg  # type: ignore[misc]
        finally:
            self.slots.release(client)
            self.arbiter.remove(client)

    def _read_stream(
        self, client: Client, requests: Iterator[p4r.StreamMessageRequest | bytes]
    ) -> None:
        try:
            for req in requests:
                if isinstance(req, bytes):
                    client.end(
                        Abort(grpc.StatusCode.INVALID_ARGUMENT, "not a StreamMessageRequest")
                    )
                    return
                kind = req.WhichOneof("update")
                if kind == "arbitration":
                    try:
                        self.arbiter.update(client, req.arbitration)
                    except Abort as abort:
                        client.end(abort)
                        return
                elif not client.arbitrated:
                    client.end(
                        Abort(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            "the first message on a stream must be a MasterArbitrationUpdate",
                        )
                    )
                    return
                elif kind == "packet":
                    self._packet_out(client, req.packet)
                else:
                    client.send(_stream_error(rpc_code.UNIMPLEMENTED, f"{kind} is not supported"))
        except grpc.RpcError:
            pass  # the client went away
        except Exception:  # a bug must end one stream, never the switch
            log.exception("stream from %s failed", client.peer)
        finally:
            self.arbiter.remove(client)
            client.end()

    def _packet_out(self, client: Client, packet: p4r.PacketOut) -> None:
        def reject(code: int, message: str) -> None:
            err = _stream_error(code, message)
            err.error.packet_out.packet_out.CopyFrom(packet)
            client.send(err)

        if client.election_id is None or not self.arbiter.is_primary(
            client.role, client.election_id
        ):
            reject(rpc_code.PERMISSION_DENIED, "only the primary controller may send packets")
            return
        schema = self.device.schema
        if schema is None:
            reject(rpc_code.FAILED_PRECONDITION, "no forwarding pipeline is set")
            return
        fields = schema.pipeline.packet_out.fields
        values: dict[int, bytes] = {}
        for md in packet.metadata:
            if md.metadata_id in values or not 1 <= md.metadata_id <= len(fields):
                reject(rpc_code.INVALID_ARGUMENT, f"packet_out metadata id {md.metadata_id}")
                return
            values[md.metadata_id] = md.value
        if len(values) != len(fields):
            reject(rpc_code.INVALID_ARGUMENT, "packet_out needs every metadata field once")
            return
        try:
            egress = decode(values[1], fields[0].bits, fields[0].name)
        except EncodingError as err:
            reject(rpc_code.INVALID_ARGUMENT, str(err))
            return
        if egress == self.device.cpu_port:
            # It would come back as a PacketIn whose port, rule id and reason are its bytes.
            reject(rpc_code.INVALID_ARGUMENT, f"PacketOut to the CPU port {egress}: refused")
            return
        if len(packet.payload) > MAX_FRAME:
            reject(
                rpc_code.INVALID_ARGUMENT,
                f"PacketOut payload of {len(packet.payload)} bytes (a frame is <= {MAX_FRAME})",
            )
            return
        for port, frame in self.dataplane.process(
            self.device.cpu_port, packet_out_frame(egress, packet.payload)
        ):
            self.transmit(port, frame)

    def packet_in(self, frame: bytes) -> None:
        """Send a CPU-port frame (packet_in header + packet) to every primary controller."""
        schema = self.device.schema
        if schema is None:
            return
        try:
            values, payload = packet_in_fields(frame)
        except struct.error:  # shorter than the packet_in header: no PacketIn to make
            self.packet_ins_dropped += 1
            return
        msg = p4r.StreamMessageResponse()
        msg.packet.payload = payload
        for i, (f, v) in enumerate(zip(schema.pipeline.packet_in.fields, values, strict=True), 1):
            msg.packet.metadata.add(metadata_id=i, value=encode(v, f.bits))
        for client in self.arbiter.primaries():
            if not client.send(msg):
                self.packet_ins_dropped += 1


def _no_role(role: str) -> str:
    return (
        f"no role {_quote(role)} on this device: it serves the default role only "
        "(leave the role unset)"
    )


def _error_any(error: p4r.Error) -> any_pb2.Any:
    detail = any_pb2.Any(type_url=_ERROR_TYPE_URL)
    detail.value = error.SerializeToString()
    return detail


_OK_DETAIL = _error_any(p4r.Error(canonical_code=rpc_code.OK))


def _code_name(code: int) -> str:
    return rpc_code.Code.Name(code) if code in rpc_code.Code.values() else str(code)


def write_failure(results: Sequence[P4RuntimeError | None], limits: Limits) -> rpc_status.Status:
    """The status of a Write whose updates did not all succeed (spec "Error Reporting").

    One p4.Error per update, in order, each message cut to `error_message_chars`, as long
    as the serialized status stays within `error_details_bytes`; past it the details stop
    (a prefix: every client indexes them by position) and the message says how many
    updates they leave out and names the first failures among those.
    """
    failed = sum(r is not None for r in results)
    budget = limits.error_details_bytes - MESSAGE_CHARS - 16  # the code and the message
    details: list[any_pb2.Any] = []
    size = 0
    for r in results:
        if r is None:
            detail = _OK_DETAIL
        else:
            detail = _error_any(
                p4r.Error(
                    canonical_code=r.code,
                    message=_short(r.message, limits.error_message_chars),
                    space=_ERROR_SPACE,
                )
            )
        cost = detail.ByteSize() + 3  # field tag and length
        if size + cost > budget:
            break
        details.append(detail)
        size += cost
    message = f"{failed} of {len(results)} updates failed"
    covered = len(details)
    if covered < len(results):
        rest = [(i, r) for i, r in enumerate(results[covered:], covered) if r is not None]
        named = "; ".join(
            f"#{i} {_code_name(r.code)}: {_short(r.message, 80)}" for i, r in rest[:3]
        )
        more = f"; and {len(rest) - 3} more" if len(rest) > 3 else ""
        cover = f"updates 0-{covered - 1}" if covered else "no update"
        message += f"; the details cover {cover}, {len(results) - covered} left out " + (
            f"({len(rest)} of them failed: {named}{more})" if rest else "(all succeeded)"
        )
    status = rpc_status.Status(code=rpc_code.UNKNOWN, message=_short(message))
    status.details.extend(details)
    return status


def read_pages(entities: Sequence[p4r.Entity], max_bytes: int) -> Iterator[p4r.ReadResponse]:
    """`entities` as ReadResponses of at most READ_CHUNK entities and `max_bytes` each
    (one entity larger than that alone); one empty response when there are none."""
    page = p4r.ReadResponse()
    size = 0
    for entity in entities:
        cost = entity.ByteSize() + 6  # field tag and length
        if page.entities and (size + cost > max_bytes or len(page.entities) >= READ_CHUNK):
            yield page
            page, size = p4r.ReadResponse(), 0
        page.entities.append(entity)
        size += cost
    yield page


def _stream_error(code: int, message: str) -> p4r.StreamMessageResponse:
    resp = p4r.StreamMessageResponse()
    resp.error.canonical_code = code
    resp.error.message = _short(message)
    resp.error.space = _ERROR_SPACE
    return resp


def _stream_request(data: bytes) -> p4r.StreamMessageRequest | bytes:
    """A StreamChannel message, or its bytes if they are none: StreamChannel ends the stream.

    Left to grpcio (1.85), an undecodable message gets a status from grpcio and another when
    the handler returns; the second never completes, and server.stop() waits forever.
    """
    msg = p4r.StreamMessageRequest()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        return data
    return msg


class _DecodeStreamRequests(grpc.ServerInterceptor):  # type: ignore[misc]
    """StreamChannel decodes its own requests (_stream_request)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method != "/p4.v1.P4Runtime/StreamChannel":
            return handler
        return grpc.stream_stream_rpc_method_handler(
            handler.stream_stream, _stream_request, handler.response_serializer
        )


_GRPC_STATUS = {status.value[0]: status for status in grpc.StatusCode}


def _grpc_status(code: int) -> grpc.StatusCode:
    """The grpc status for a google.rpc code."""
    return _GRPC_STATUS.get(code, grpc.StatusCode.UNKNOWN)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Server certificate and key (PEM); with `client_ca`, clients must present a cert it signed."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def serve(
    service: P4RuntimeService, address: str, tls: TlsConfig | None = None
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for `service` on `address`; returns it and the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=service.limits.workers, thread_name_prefix="p4rt"),
        interceptors=[_DecodeStreamRequests()],
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.so_reuseport", 0),
        ],
    )
    p4r_grpc.add_P4RuntimeServicer_to_server(service, server)
    port = (
        server.add_secure_port(address, tls.credentials())
        if tls
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server, port
