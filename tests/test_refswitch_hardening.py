"""The reference switch against clients that try to hurt it, over real gRPC on loopback.

One test per robustness or security bug the fuzzer found: idle streams that starved the
thread pool, roles nobody configured, PacketOuts forged into PacketIns, frames kept
forever, nested JSON, oversized error trailers, oversized entry metadata and reads,
negative counters. Each limit the switch enforces ends with a clear status.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
import pytest
from finsy.proto import p4r, p4r_grpc, rpc_code, rpc_status
from p4rt import WAIT, Session, inserts, pipeline_config, u128, update, wait_for

from compiler.emit import build
from compiler.entries import SwitchTables
from compiler.inventory import Inventory
from compiler.model import Policy
from p4src.spec import PIPELINE
from runtime.refswitch import main
from runtime.refswitch.server import Limits
from runtime.refswitch.switch import ReferenceSwitch

DEVICE = 1
ROUTING = PIPELINE.table("routing")
POLICY = PIPELINE.table("policy")
INSERT, MODIFY = p4r.Update.INSERT, p4r.Update.MODIFY
BIG_TRAILERS = [("grpc.max_metadata_size", 16 << 20), ("grpc.absolute_max_metadata_size", 16 << 20)]


@pytest.fixture(scope="module")
def tor_alg(floor: Inventory, floor_policy: Policy, floor_policy_text: str) -> SwitchTables:
    built = build(floor_policy, floor, floor_policy_text, "ref")
    return next(s for s in built.switches if s.switch == "tor-alg")


def _start(limits: Limits | None = None) -> tuple[ReferenceSwitch, str]:
    sw = ReferenceSwitch(DEVICE) if limits is None else ReferenceSwitch(DEVICE, limits=limits)
    return sw, f"127.0.0.1:{sw.start('127.0.0.1:0')}"


@pytest.fixture
def switch() -> Iterator[tuple[ReferenceSwitch, str]]:
    sw, addr = _start()
    yield sw, addr
    sw.stop()


@pytest.fixture
def primary(switch: tuple[ReferenceSwitch, str]) -> Iterator[Session]:
    s = Session(switch[1], DEVICE, election_id=10)
    assert s.arbitration_status() == rpc_code.OK
    s.set_pipeline(pipeline_config())
    yield s
    s.close()


def _route(n: int, port: int = 1, metadata: bytes = b"") -> p4r.TableEntry:
    """A distinct /24 route for every n < 65536."""
    entry = p4r.TableEntry(table_id=ROUTING.id, metadata=metadata)
    fm = entry.match.add(field_id=1)
    fm.lpm.value = bytes((10, n >> 8, n & 0xFF, 0))
    fm.lpm.prefix_len = 24
    entry.action.action.action_id = PIPELINE.action("forward").id
    entry.action.action.params.add(param_id=1, value=port.to_bytes(1, "big"))
    return entry


def _bad_route(n: int) -> p4r.TableEntry:
    """A route whose port does not fit its 9 bits: OUT_OF_RANGE."""
    entry = _route(n)
    entry.action.action.params[0].value = b"\xff\xff"
    return entry


class RawStream:
    """A StreamChannel that sends what it is told (nothing, by default) and records how
    the switch ends it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.requests: queue.Queue[p4r.StreamMessageRequest | None] = queue.Queue()
        self.responses: list[p4r.StreamMessageResponse] = []
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.ended = threading.Event()
        stub = p4r_grpc.P4RuntimeStub(channel)
        self._call = stub.StreamChannel(iter(self.requests.get, None))
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for msg in self._call:
                self.responses.append(msg)
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as err:
            self.code, self.details = err.code(), err.details() or ""
        self.ended.set()

    def arbitrate(self, election_id: int) -> None:
        req = p4r.StreamMessageRequest()
        req.arbitration.device_id = DEVICE
        req.arbitration.election_id.CopyFrom(u128(election_id))
        self.requests.put(req)

    def close(self) -> None:
        self.requests.put(None)
        self._call.cancel()


# -- streams and threads ---------------------------------------------------------------------


def test_idle_streams_cannot_starve_the_primary(
    switch: tuple[ReferenceSwitch, str], primary: Session
) -> None:
    """Spec "Rules for Handling MasterArbitrationUpdate" 1.4: past the stream limit,
    RESOURCE_EXHAUSTED; Write, Read and SetForwardingPipelineConfig keep their threads."""
    _, addr = switch
    limits = Limits()
    flood = grpc.insecure_channel(addr)
    idle = [RawStream(flood) for _ in range(limits.max_streams + 8)]
    try:
        # One client address gets at most max_streams_per_peer streams (the primary's
        # stream comes from the same address and counts) and, while they have not
        # arbitrated, the reserved ones, each taken over by the next stream; the rest are
        # refused at once.
        kept = limits.max_streams_per_peer - 1 + limits.reserved_streams
        assert wait_for(lambda: sum(s.ended.is_set() for s in idle) == len(idle) - kept)
        refused = [s for s in idle if s.ended.is_set()]
        assert {s.code for s in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all("streams" in s.details for s in refused)
        # The primary still writes, reads and sets the pipeline.
        assert primary.write([update(INSERT, _route(1))]).code == grpc.StatusCode.OK
        assert len(primary.read_table(ROUTING.id)) == 1
        primary.set_pipeline(pipeline_config())
        # A new controller with a higher election id still gets in (a reserved stream) and
        # takes over; one that would only be a backup does not.
        backup = RawStream(flood)
        backup.arbitrate(5)
        assert backup.ended.wait(WAIT)
        assert backup.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "primary" in backup.details
        new = Session(addr, DEVICE, election_id=20)
        assert new.arbitration_status() == rpc_code.OK
        assert primary.arbitration_status() == rpc_code.ALREADY_EXISTS
        assert new.write([update(INSERT, _route(2))]).code == grpc.StatusCode.OK
        new.close()
    finally:
        for s in idle:
            s.close()
        flood.close()


def test_a_stream_that_never_arbitrates_is_closed() -> None:
    sw, addr = _start(Limits(arbitration_timeout=0.2))
    channel = grpc.insecure_channel(addr)
    try:
        silent = RawStream(channel)
        assert silent.ended.wait(WAIT)
        assert silent.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "MasterArbitrationUpdate" in silent.details
        # Arbitrating in time keeps the stream open past the deadline.
        s = Session(addr, DEVICE, election_id=3)
        assert s.arbitration_status() == rpc_code.OK
        late = RawStream(channel)
        assert late.ended.wait(WAIT)  # its deadline passed...
        assert late.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert s.write([]).code == grpc.StatusCode.FAILED_PRECONDITION  # ...s is still primary
        s.close()
    finally:
        channel.close()
        sw.stop()


# -- roles -----------------------------------------------------------------------------------


def test_a_role_the_switch_has_no_config_for_gets_nothing(
    switch: tuple[ReferenceSwitch, str], primary: Session
) -> None:
    """The switch serves the default role only: a named role is refused (NOT_FOUND, as
    for an unknown device) before it can become anyone's primary."""
    _, addr = switch
    assert primary.write([update(INSERT, _route(1))]).code == grpc.StatusCode.OK
    intruder = Session(addr, DEVICE, election_id=1 << 100, role="intruder")
    end = intruder.next()
    assert isinstance(end, grpc.RpcError), end
    assert end.code() == grpc.StatusCode.NOT_FOUND
    assert "intruder" in (end.details() or "")
    # Its unary calls name a role that does not exist: refused, nothing changes.
    delete = update(p4r.Update.DELETE, _route(1))
    assert intruder.write([delete]).code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        intruder.set_pipeline(pipeline_config())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(primary.read_table(ROUTING.id)) == 1
    assert primary.write([update(INSERT, _route(2))]).code == grpc.StatusCode.OK
    intruder.close()


# -- PacketOut -------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"\x01\x02\x03", b"\x00\x07\x00\x2a\x01forged alert"])
def test_packet_out_to_the_cpu_port_is_refused(
    switch: tuple[ReferenceSwitch, str], primary: Session, payload: bytes
) -> None:
    """Short payloads used to kill the primary's stream; longer ones came back as a
    PacketIn whose port, rule id and reason were the payload's bytes (a forged alert)."""
    sw, _ = switch
    primary.send_packet(payload, egress_port=sw.device.cpu_port)
    msg = primary.next()
    assert not isinstance(msg, grpc.RpcError), msg
    assert msg.WhichOneof("update") == "error", msg
    assert msg.error.canonical_code == rpc_code.INVALID_ARGUMENT
    assert "CPU port" in msg.error.message
    assert msg.error.packet_out.packet_out.payload == payload
    # Still the primary, on the same stream: PacketOut and Write work.
    primary.send_packet(b"frame", egress_port=3)
    assert wait_for(lambda: sw.sent == [(3, b"frame")])
    assert primary.write([update(INSERT, _route(1))]).code == grpc.StatusCode.OK


def test_packet_outs_without_interfaces_are_not_kept_forever(
    switch: tuple[ReferenceSwitch, str], primary: Session
) -> None:
    sw, _ = switch
    frame = bytes(2048)
    for _ in range(3000):  # 6 MB of frames
        primary.send_packet(frame, egress_port=3)
    primary.send_packet(b"last", egress_port=7)  # the stream is in order: this comes last
    assert wait_for(lambda: bool(sw.sent) and sw.sent[-1] == (7, b"last"))
    kept = sw.sent
    assert len(kept) < 3001
    assert sum(len(f) for _, f in kept) <= 4 << 20
    assert sw.sent_dropped == 3001 - len(kept)


# -- pipeline config -------------------------------------------------------------------------


def test_deeply_nested_device_config_is_invalid_argument(primary: Session) -> None:
    config = pipeline_config()
    config.p4_device_config = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(grpc.RpcError) as err:
        primary.set_pipeline(config)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nested" in (err.value.details() or "")
    assert primary.write([update(INSERT, _route(1))]).code == grpc.StatusCode.OK


# -- Write errors ----------------------------------------------------------------------------


def test_a_big_batch_with_one_bad_update_reaches_a_default_client(primary: Session) -> None:
    """Spec "gRPC Metadata Maximum Size": a client with gRPC's defaults accepts about 8 KiB
    of trailers; the switch keeps a failed Write's status details under that."""
    bad_first = [update(INSERT, _bad_route(0)), *(update(INSERT, _route(n)) for n in range(1, 501))]
    result = primary.write(bad_first)  # Session: a channel with gRPC's default options
    assert result.code == grpc.StatusCode.UNKNOWN, result
    assert result.errors[0] == rpc_code.OUT_OF_RANGE
    assert set(result.errors[1:]) <= {rpc_code.OK}
    assert "1 of 501 updates failed" in result.details
    # The bad update last: its error is past what the details can carry one by one, so the
    # message names it, and says how many updates the details leave out.
    bad_last = [
        *(update(INSERT, _route(n)) for n in range(1000, 1500)),
        update(INSERT, _bad_route(2000)),
    ]
    result = primary.write(bad_last)
    assert result.code == grpc.StatusCode.UNKNOWN, result
    assert "1 of 501 updates failed" in result.details
    assert "#500 OUT_OF_RANGE" in result.details
    assert f"{501 - len(result.errors)} left out" in result.details
    assert set(result.errors) <= {rpc_code.OK}


def test_error_details_stay_bounded_for_huge_batches(
    switch: tuple[ReferenceSwitch, str], primary: Session
) -> None:
    _, addr = switch
    channel = grpc.insecure_channel(
        addr, options=[*BIG_TRAILERS, ("grpc.max_receive_message_length", 64 << 20)]
    )
    req = p4r.WriteRequest(device_id=DEVICE, election_id=u128(10))
    wide = _route(0)
    wide.match[0].lpm.value = b"\x01" * 60_000  # quoted in full, this was 120 kB of hex
    req.updates.append(update(INSERT, wide))
    req.updates.extend(update(INSERT, _bad_route(n % 60_000)) for n in range(1, 100_000))
    with pytest.raises(grpc.RpcError) as raised:
        p4r_grpc.P4RuntimeStub(channel).Write(req, timeout=60)
    err = raised.value
    assert err.code() == grpc.StatusCode.UNKNOWN
    trailer = dict(err.trailing_metadata() or ())
    details = trailer["grpc-status-details-bin"]
    assert len(details) <= Limits().error_details_bytes
    status = rpc_status.Status.FromString(details)
    assert status.message == err.details()
    assert "100000 of 100000 updates failed" in status.message
    assert len(status.message) <= 512
    errors = []
    for detail in status.details:
        e = p4r.Error()
        assert detail.Unpack(e)
        errors.append(e)
    assert 0 < len(errors) < 100_000
    assert f"{100_000 - len(errors)} left out" in status.message
    assert all(e.canonical_code == rpc_code.OUT_OF_RANGE for e in errors)
    assert len(errors[0].message) <= 200 and "60000 bytes" in errors[0].message
    channel.close()


# -- entry metadata and reads ----------------------------------------------------------------


def test_oversized_metadata_is_refused_and_reads_still_work(primary: Session) -> None:
    huge = b"m" * (40 << 20)
    for n in range(2):
        result = primary.write([update(INSERT, _route(n, metadata=huge))])
        assert result.code == grpc.StatusCode.UNKNOWN, result.code
        assert result.errors == [rpc_code.INVALID_ARGUMENT]
    fits = b"m" * Limits().max_entry_metadata
    assert primary.write([update(INSERT, _route(7, metadata=fits))]).code == grpc.StatusCode.OK
    modify = update(MODIFY, _route(7, metadata=fits + b"m"))
    assert primary.write([modify]).errors == [rpc_code.INVALID_ARGUMENT]
    (read,) = primary.read_table(ROUTING.id)
    assert read.metadata == fits


def test_reads_are_paged_by_size(primary: Session) -> None:
    """Spec "Read RPC": a Read may answer with several ReadResponses; each stays within
    what a client with gRPC's default 4 MiB receive limit accepts, and well under it."""
    fits = b"m" * Limits().max_entry_metadata
    entries = [_route(n, metadata=fits) for n in range(4000)]
    for i in range(0, len(entries), 500):
        batch = [update(INSERT, e) for e in entries[i : i + 500]]
        assert primary.write(batch).code == grpc.StatusCode.OK
    entity = p4r.Entity()
    entity.table_entry.SetInParent()
    responses = list(
        primary.stub.Read(p4r.ReadRequest(device_id=DEVICE, entities=[entity]), timeout=WAIT)
    )
    assert sum(len(r.entities) for r in responses) == 4000
    assert len(responses) > 1
    assert max(r.ByteSize() for r in responses) <= Limits().read_response_bytes


# -- direct counters -------------------------------------------------------------------------


def test_direct_counters_refuse_negative_values(primary: Session, tor_alg: SwitchTables) -> None:
    (entry,) = inserts(tor_alg.table("policy")[:1])
    assert primary.write([entry]).code == grpc.StatusCode.OK
    te = entry.entity.table_entry
    for packets, octets in ((-1, 0), (0, -5)):
        u = p4r.Update(type=MODIFY)
        u.entity.direct_counter_entry.table_entry.CopyFrom(te)
        u.entity.direct_counter_entry.data.packet_count = packets
        u.entity.direct_counter_entry.data.byte_count = octets
        assert primary.write([u]).errors == [rpc_code.INVALID_ARGUMENT]
        counted = p4r.TableEntry()
        counted.CopyFrom(te)
        counted.counter_data.packet_count, counted.counter_data.byte_count = packets, octets
        assert primary.write([update(MODIFY, counted)]).errors == [rpc_code.INVALID_ARGUMENT]
    (read,) = primary.read_table(POLICY.id, counters=True)
    assert (read.counter_data.packet_count, read.counter_data.byte_count) == (0, 0)


# -- the operator's knobs --------------------------------------------------------------------


def test_every_limit_is_a_p4seg_switch_flag(capsys: pytest.CaptureFixture[str]) -> None:
    args = main.parser().parse_args(
        ["--device-id", "1", "--max-streams", "4", "--arbitration-timeout", "2.5"]
    )
    limits = main.limits_of(args)
    assert (limits.max_streams, limits.arbitration_timeout) == (4, 2.5)
    assert limits.max_entry_metadata == Limits().max_entry_metadata
    assert main.main(["--device-id", "1", "--max-error-details", "100"]) == 2
    assert "--max-error-details must be at least 1024" in capsys.readouterr().err
