"""The reference switch over real gRPC on loopback: arbitration, pipeline config, writes,
reads, direct counters, PacketIn/PacketOut, the data plane against the table evaluator, TLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from finsy.proto import p4r, rpc_code
from p4rt import (
    Session,
    clone_session_update,
    default_updates,
    inserts,
    pipeline_config,
    update,
    wait_for,
)
from pki import make_pki
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from compiler.emit import build
from compiler.entries import SwitchTables
from compiler.evaluate import PacketFields, evaluate
from compiler.inventory import Inventory
from compiler.model import Policy
from p4src.spec import CPU_CLONE_SESSION, PIPELINE, build_pipeline
from runtime.entities import table_entry_proto
from runtime.refswitch.server import TlsConfig
from runtime.refswitch.switch import ReferenceSwitch

SPA = p4r.SetForwardingPipelineConfigRequest
ROUTING = PIPELINE.table("routing")


@pytest.fixture(scope="module")
def tor_alg(floor: Inventory, floor_policy: Policy, floor_policy_text: str) -> SwitchTables:
    built = build(floor_policy, floor, floor_policy_text, "ref")
    return next(s for s in built.switches if s.switch == "tor-alg")


@pytest.fixture
def switch() -> Iterator[tuple[ReferenceSwitch, str]]:
    sw = ReferenceSwitch(device_id=2)
    port = sw.start("127.0.0.1:0")
    yield sw, f"127.0.0.1:{port}"
    sw.stop()


@pytest.fixture
def loaded(
    switch: tuple[ReferenceSwitch, str], tor_alg: SwitchTables
) -> Iterator[tuple[ReferenceSwitch, Session]]:
    sw, addr = switch
    s = Session(addr, device_id=2, election_id=10)
    assert s.arbitration_status() == rpc_code.OK
    s.set_pipeline(pipeline_config())
    result = s.write(
        [
            *default_updates(tor_alg.defaults),
            *inserts(tor_alg.entries),
            clone_session_update(CPU_CLONE_SESSION, sw.device.cpu_port),
        ]
    )
    assert result.code == grpc.StatusCode.OK, result
    yield sw, s
    s.close()


def _route(dst: str, plen: int, port: int) -> p4r.TableEntry:
    entry = p4r.TableEntry(table_id=ROUTING.id)
    fm = entry.match.add(field_id=1)
    fm.lpm.value = bytes(int(x) for x in dst.split("."))
    fm.lpm.prefix_len = plen
    entry.action.action.action_id = PIPELINE.action("forward").id
    entry.action.action.params.add(param_id=1, value=port.to_bytes(1, "big"))
    return entry


# -- arbitration ---------------------------------------------------------------------------


def test_capabilities(switch: tuple[ReferenceSwitch, str]) -> None:
    s = Session(switch[1], arbitrate=False)
    assert s.stub.Capabilities(p4r.CapabilitiesRequest()).p4runtime_api_version.startswith("1.")


def test_highest_election_id_is_primary_and_backups_are_told(
    switch: tuple[ReferenceSwitch, str],
) -> None:
    addr = switch[1]
    a = Session(addr, device_id=2, election_id=5)
    assert a.arbitration_status() == rpc_code.OK
    b = Session(addr, device_id=2, election_id=3)
    assert b.arbitration_status() == rpc_code.ALREADY_EXISTS
    c = Session(addr, device_id=2, election_id=9)
    assert c.arbitration_status() == rpc_code.OK
    assert a.arbitration_status() == rpc_code.ALREADY_EXISTS  # a lost the primary role
    assert b.arbitration_status() == rpc_code.ALREADY_EXISTS  # every backup hears of it
    # Only the primary writes; everyone reads.
    with pytest.raises(grpc.RpcError) as err:
        a.set_pipeline(pipeline_config())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    c.set_pipeline(pipeline_config())
    assert b.write([update(p4r.Update.INSERT, _route("10.0.0.0", 8, 1))]).code == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert c.write([update(p4r.Update.INSERT, _route("10.0.0.0", 8, 1))]).code == grpc.StatusCode.OK
    assert len(b.read_table(ROUTING.id)) == 1
    # The primary leaves: the backups hear there is none; a lower id does not take over.
    c.close()
    assert a.arbitration_status() == rpc_code.NOT_FOUND
    assert b.arbitration_status() == rpc_code.NOT_FOUND
    a.arbitrate(7)
    assert a.arbitration_status() == rpc_code.NOT_FOUND  # 7 < 9, the highest ever seen: still none
    a.arbitrate(11)  # failover: a higher id than any seen
    assert a.arbitration_status() == rpc_code.OK
    assert b.arbitration_status() == rpc_code.ALREADY_EXISTS
    assert a.write([update(p4r.Update.DELETE, _route("10.0.0.0", 8, 1))]).code == (
        grpc.StatusCode.OK
    )
    for s in (a, b):
        s.close()


def test_duplicate_election_id_unknown_device_and_no_election_id(
    switch: tuple[ReferenceSwitch, str],
) -> None:
    addr = switch[1]
    a = Session(addr, device_id=2, election_id=5)
    assert a.arbitration_status() == rpc_code.OK
    dup = Session(addr, device_id=2, election_id=5)
    err = dup.next()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    other = Session(addr, device_id=99, election_id=6)
    err = other.next()
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.NOT_FOUND
    reader = Session(addr, device_id=2, election_id=None)
    assert reader.arbitration_status() == rpc_code.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as raised:
        reader.set_pipeline(pipeline_config())
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A write naming an unknown device is NOT_FOUND before anything else.
    wrong = Session(addr, device_id=3, election_id=5, arbitrate=False)
    assert wrong.write([]).code == grpc.StatusCode.NOT_FOUND
    for s in (a, dup, other, reader, wrong):
        s.close()


# -- pipeline config -----------------------------------------------------------------------


def test_pipeline_actions(switch: tuple[ReferenceSwitch, str]) -> None:
    s = Session(switch[1], device_id=2, election_id=1)
    assert s.arbitration_status() == rpc_code.OK
    route = update(p4r.Update.INSERT, _route("10.0.0.0", 8, 1))
    assert s.write([route]).code == grpc.StatusCode.FAILED_PRECONDITION  # no pipeline yet
    get = p4r.GetForwardingPipelineConfigRequest(device_id=2)
    assert not s.stub.GetForwardingPipelineConfig(get).HasField("config")
    s.set_pipeline(pipeline_config(), SPA.VERIFY)  # verifies only
    assert s.write([route]).code == grpc.StatusCode.FAILED_PRECONDITION
    s.set_pipeline(pipeline_config(cookie=7))
    assert s.write([route]).code == grpc.StatusCode.OK
    got = s.stub.GetForwardingPipelineConfig(get).config
    assert got.cookie.cookie == 7 and got.p4info == pipeline_config().p4info
    # RECONCILE_AND_COMMIT keeps entries; VERIFY_AND_COMMIT clears them.
    bigger = pipeline_config(build_pipeline({"routing": 8192}), cookie=8)
    s.set_pipeline(bigger, SPA.RECONCILE_AND_COMMIT)
    assert len(s.read_table(ROUTING.id)) == 1
    s.set_pipeline(pipeline_config(), SPA.VERIFY_AND_SAVE)
    assert len(s.read_table(ROUTING.id)) == 1
    s.set_pipeline(None, SPA.COMMIT)  # a different P4Info (sizes): state is cleared
    assert s.read_table(ROUTING.id) == []
    with pytest.raises(grpc.RpcError) as err:
        s.set_pipeline(None, SPA.COMMIT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # nothing saved
    # A P4Info that does not describe the device config's pipeline is refused.
    mismatched = pipeline_config()
    mismatched.p4info.tables[0].size = 3
    with pytest.raises(grpc.RpcError) as err:
        s.set_pipeline(mismatched)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "P4Info does not describe" in (err.value.details() or "")
    broken = pipeline_config()
    broken.p4_device_config = b"\x00garbage"
    with pytest.raises(grpc.RpcError) as err:
        s.set_pipeline(broken)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    s.close()


# -- writes and reads ----------------------------------------------------------------------


def test_compiled_entries_read_back_identically(
    loaded: tuple[ReferenceSwitch, Session], tor_alg: SwitchTables
) -> None:
    _, s = loaded
    written = sorted(table_entry_proto(PIPELINE, e).SerializeToString() for e in tor_alg.entries)
    read = sorted(e.SerializeToString(deterministic=True) for e in s.read_table())
    assert read == written
    default = p4r.Entity()
    default.table_entry.table_id = PIPELINE.table("epoch").id
    default.table_entry.is_default_action = True
    (epoch,) = s.read(default)
    assert epoch.table_entry.action.action.action_id == PIPELINE.action("set_epoch").id


def test_a_default_entrys_metadata_is_kept_and_read_back(
    loaded: tuple[ReferenceSwitch, Session],
) -> None:
    _, s = loaded
    query = p4r.Entity()
    query.table_entry.table_id = PIPELINE.table("epoch").id
    query.table_entry.is_default_action = True
    epoch = p4r.TableEntry(table_id=PIPELINE.table("epoch").id, is_default_action=True)
    epoch.action.action.action_id = PIPELINE.action("set_epoch").id
    epoch.action.action.params.add(param_id=1, value=b"\x01")
    epoch.metadata = b"p4seg/1 digest"
    assert s.write([update(p4r.Update.MODIFY, epoch)]).code == grpc.StatusCode.OK
    (read,) = s.read(query)
    assert read.table_entry == epoch  # action and metadata, as written
    reset = p4r.TableEntry(table_id=epoch.table_id, is_default_action=True)
    assert s.write([update(p4r.Update.MODIFY, reset)]).code == grpc.StatusCode.OK
    (read,) = s.read(query)
    assert (
        read.table_entry.metadata == b""
        and read.table_entry.action.action.params[0].value == b"\x00"
    )
    assert s.write([update(p4r.Update.MODIFY, epoch)]).code == grpc.StatusCode.OK
    s.set_pipeline(pipeline_config())  # a new pipeline: the defaults as the program sets them
    (read,) = s.read(query)
    assert read.table_entry.metadata == b""


def test_batch_errors_are_reported_per_update_in_order(
    loaded: tuple[ReferenceSwitch, Session], tor_alg: SwitchTables
) -> None:
    _, s = loaded
    existing = table_entry_proto(PIPELINE, tor_alg.table("routing")[0])
    fresh = _route("192.168.0.0", 16, 3)
    no_priority = table_entry_proto(PIPELINE, tor_alg.table("policy")[0])
    no_priority.priority = 0
    before = len(s.read_table())
    result = s.write(
        [
            update(p4r.Update.INSERT, existing),
            update(p4r.Update.INSERT, fresh),
            update(p4r.Update.INSERT, no_priority),
            update(p4r.Update.DELETE, _route("172.16.0.0", 12, 1)),
        ]
    )
    assert result.code == grpc.StatusCode.UNKNOWN
    assert result.errors == [
        rpc_code.ALREADY_EXISTS,
        rpc_code.OK,
        rpc_code.INVALID_ARGUMENT,
        rpc_code.NOT_FOUND,
    ]
    assert len(s.read_table()) == before + 1
    assert s.write([], atomicity=p4r.WriteRequest.ROLLBACK_ON_ERROR).code == (
        grpc.StatusCode.UNIMPLEMENTED
    )


def test_const_default_and_scope_rules(loaded: tuple[ReferenceSwitch, Session]) -> None:
    _, s = loaded
    policy_default = p4r.TableEntry(table_id=PIPELINE.table("policy").id, is_default_action=True)
    policy_default.action.action.action_id = PIPELINE.action("deny").id
    policy_default.action.action.params.add(param_id=1, value=b"\x01")
    assert s.write([update(p4r.Update.MODIFY, policy_default)]).errors == [
        rpc_code.PERMISSION_DENIED
    ]
    epoch = p4r.TableEntry(table_id=PIPELINE.table("epoch").id, is_default_action=True)
    epoch.action.action.action_id = PIPELINE.action("set_epoch").id
    epoch.action.action.params.add(param_id=1, value=b"\x01")
    assert s.write([update(p4r.Update.INSERT, epoch)]).errors == [rpc_code.INVALID_ARGUMENT]
    assert s.write([update(p4r.Update.MODIFY, epoch)]).code == grpc.StatusCode.OK
    # The table-only `forward` cannot be routing's default action.
    routing_default = _route("10.0.0.0", 8, 1)
    del routing_default.match[:]
    routing_default.is_default_action = True
    assert s.write([update(p4r.Update.MODIFY, routing_default)]).errors == [
        rpc_code.PERMISSION_DENIED
    ]


# -- the data plane ------------------------------------------------------------------------

HOSTS = {
    "algo1": ("10.0.2.11", 1),
    "algo2": ("10.0.2.12", 2),
    "oms1": ("10.0.3.10", None),
    "risk1": ("10.0.4.2", None),
    "md1": ("10.0.1.11", None),
    "settle1": ("10.0.5.10", None),
}


def _frame(src: str, dst: str, l4: TCP | UDP | ICMP) -> bytes:
    return bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / l4
    )


def _ip(address: str) -> int:
    return int.from_bytes(bytes(int(x) for x in address.split(".")), "big")


def _fields(src: str, dst: str, l4: TCP | UDP | ICMP) -> PacketFields:
    proto = {TCP: 6, UDP: 17, ICMP: 1}[type(l4)]
    if isinstance(l4, ICMP):
        return PacketFields(_ip(src), _ip(dst), proto, icmp_type=l4.type, icmp_code=l4.code)
    flags = int(l4.flags) if isinstance(l4, TCP) else 0
    return PacketFields(_ip(src), _ip(dst), proto, l4.sport, l4.dport, flags)


def test_forwarding_equals_the_table_evaluator(
    loaded: tuple[ReferenceSwitch, Session], tor_alg: SwitchTables
) -> None:
    sw, _ = loaded
    flows = (
        [
            TCP(sport=40000, dport=d, flags=f)
            for d in (22, 443, 8080, 9876, 9877, 5001)
            for f in ("S", "A", "SA")
        ]
        + [UDP(sport=40000, dport=d) for d in (53, 319, 5001)]
        + [ICMP(type=8), ICMP(type=0)]
    )
    checked = forwarded = 0
    for src_name in ("algo1", "algo2"):
        src, port = HOSTS[src_name]
        assert port is not None  # the engines are on this switch
        for dst, _ in HOSTS.values():
            for l4 in flows:
                out = sw.inject(port, _frame(src, dst, l4))
                want = evaluate(tor_alg, port, _fields(src, dst, l4)).egress_port
                frame = _frame(src, dst, l4)
                assert out == ([(want, frame)] if want is not None else []), (src, dst, l4)
                checked += 1
                forwarded += bool(out)
    assert forwarded and forwarded < checked  # the policy both allows and denies here


def test_spoofed_sources_are_dropped_and_reported_non_ipv4_dropped(
    loaded: tuple[ReferenceSwitch, Session],
) -> None:
    sw, s = loaded
    spoofed = _frame("10.0.2.12", "10.0.3.10", ICMP())  # algo2's address on algo1's port
    assert sw.inject(1, spoofed) == []
    msg = s.next("packet")
    assert not isinstance(msg, grpc.RpcError) and msg.packet.payload == spoofed
    meta = {m.metadata_id: int.from_bytes(m.value, "big") for m in msg.packet.metadata}
    assert meta == {1: 1, 2: 0, 3: 2}  # ingress port 1, no rule, reason: spoofed source
    arp = bytes(Ether(type=0x0806) / (b"\x00" * 28))
    assert sw.inject(1, arp) == []


def test_denied_and_logged_packets_reach_the_primary_as_packet_in(
    loaded: tuple[ReferenceSwitch, Session], tor_alg: SwitchTables
) -> None:
    sw, s = loaded
    l4 = TCP(sport=40000, dport=22, flags="S")
    frame = _frame("10.0.2.11", "10.0.5.10", l4)
    expected = evaluate(tor_alg, 1, _fields("10.0.2.11", "10.0.5.10", l4))
    assert expected.logged
    assert sw.inject(1, frame) == []
    msg = s.next("packet")
    assert not isinstance(msg, grpc.RpcError)
    assert msg.packet.payload == frame
    meta = {m.metadata_id: int.from_bytes(m.value, "big") for m in msg.packet.metadata}
    assert meta == {1: 1, 2: expected.rule_id, 3: 1}  # ingress port, rule id, reason deny-and-log


def test_counters_count_packets_and_bytes(loaded: tuple[ReferenceSwitch, Session]) -> None:
    sw, s = loaded
    frame = _frame("10.0.2.11", "10.0.5.10", TCP(sport=40000, dport=22, flags="S"))
    for _ in range(3):
        sw.inject(1, frame)
    counted = [e for e in s.read_table(PIPELINE.table("policy").id, counters=True)]
    hit = [e for e in counted if e.counter_data.packet_count]
    assert len(hit) == 1
    assert hit[0].counter_data.packet_count == 3
    assert hit[0].counter_data.byte_count == 3 * len(frame)


def test_packet_out_leaves_by_the_named_port(loaded: tuple[ReferenceSwitch, Session]) -> None:
    sw, s = loaded
    frame = _frame("10.0.9.9", "10.0.2.11", UDP(sport=1, dport=2))
    s.send_packet(frame, egress_port=3)
    assert wait_for(lambda: bool(sw.sent))
    assert sw.sent == [(3, frame)]


def test_nothing_is_forwarded_before_a_pipeline_is_set() -> None:
    sw = ReferenceSwitch(device_id=1)
    assert sw.inject(1, _frame("10.0.2.11", "10.0.3.10", ICMP())) == []
    assert sw.dataplane.dropped == 1


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_and_mutual_tls(pki: Path) -> None:
    def read(name: str) -> bytes:
        return (pki / name).read_bytes()

    sw = ReferenceSwitch(device_id=1)
    port = sw.start(
        "127.0.0.1:0", TlsConfig(read("server.pem"), read("server.key"), read("ca.pem"))
    )
    addr = f"127.0.0.1:{port}"
    try:
        mutual = grpc.ssl_channel_credentials(
            read("ca.pem"), read("client.key"), read("client.pem")
        )
        ok = Session(addr, credentials=mutual, arbitrate=False)
        assert ok.stub.Capabilities(p4r.CapabilitiesRequest(), timeout=10).p4runtime_api_version
        no_cert = Session(
            addr, credentials=grpc.ssl_channel_credentials(read("ca.pem")), arbitrate=False
        )
        with pytest.raises(grpc.RpcError) as err:
            no_cert.stub.Capabilities(p4r.CapabilitiesRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        plain = Session(addr, arbitrate=False)
        with pytest.raises(grpc.RpcError):
            plain.stub.Capabilities(p4r.CapabilitiesRequest(), timeout=10)
        for s in (ok, no_cert, plain):
            s.close()
    finally:
        sw.stop()


def test_tso_super_frames_are_cut_like_a_nic_would() -> None:
    from runtime.refswitch.ports import segment_tcp

    payload = bytes(range(256)) * 20  # 5120 bytes
    big = (
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="10.0.2.11", dst="10.0.3.10", id=7)
        / TCP(sport=40000, dport=9876, seq=1000, flags="PA")
        / payload
    )
    frames = segment_tcp(bytes(big), 1500)
    assert len(frames) == 4 and all(len(f) <= 1514 for f in frames)
    parsed = [Ether(f) for f in frames]
    assert b"".join(bytes(p[TCP].payload) for p in parsed) == payload
    assert [p[TCP].seq for p in parsed] == [1000 + 1460 * i for i in range(4)]
    assert [p[IP].id for p in parsed] == [7, 8, 9, 10]
    assert [str(p[TCP].flags) for p in parsed] == ["A", "A", "A", "PA"]
    for p in parsed:  # scapy recomputes a checksum when it is deleted: ours must agree
        ip_sum, tcp_sum = p[IP].chksum, p[TCP].chksum
        del p[IP].chksum, p[TCP].chksum
        again = Ether(bytes(p))
        assert (again[IP].chksum, again[TCP].chksum) == (ip_sum, tcp_sum)
    small = _frame("10.0.2.11", "10.0.3.10", TCP(sport=1, dport=2))
    assert segment_tcp(small, 1500) == [small]
