/*
 * p4seg — zero-trust segmentation pipeline for BMv2 simple_switch_grpc (v1model).
 * Generated from p4src/spec.py by p4src/render.py; do not edit.
 *
 * Ingress: epoch -> src_identity -> dst_identity -> policy -> routing.
 * Fail closed: anything that is not a plain IPv4 packet with a first (or only) fragment
 * and a 20-byte header is dropped, as is every packet no table explicitly lets through.
 */
#include <core.p4>
// The typed `counter<I>` (policy_red_drops) is v1model's from version 20200408 on.
#define V1MODEL_VERSION 20200408
#include <v1model.p4>

const bit<16> ETHERTYPE_IPV4 = 0x0800;
const bit<8> PROTO_ICMP = 1;
const bit<8> PROTO_TCP = 6;
const bit<8> PROTO_UDP = 17;
const bit<9> CPU_PORT = 255;
const bit<32> CPU_CLONE_SESSION = 100;
const bit<8> REASON_DENY_LOG = 1;
const bit<8> REASON_SPOOF = 2;
const bit<32> PKT_INSTANCE_TYPE_INGRESS_CLONE = 1;

header ethernet_t {
    bit<48> dst_addr;
    bit<48> src_addr;
    bit<16> ether_type;
}

header ipv4_t {
    bit<4> version;
    bit<4> ihl;
    bit<8> diffserv;
    bit<16> total_len;
    bit<16> identification;
    bit<3> flags;
    bit<13> frag_offset;
    bit<8> ttl;
    bit<8> protocol;
    bit<16> hdr_checksum;
    bit<32> src_addr;
    bit<32> dst_addr;
}

header tcp_t {
    bit<16> src_port;
    bit<16> dst_port;
    bit<32> seq_no;
    bit<32> ack_no;
    bit<4> data_offset;
    bit<4> res;
    bit<8> flags;
    bit<16> window;
    bit<16> checksum;
    bit<16> urgent_ptr;
}

header udp_t {
    bit<16> src_port;
    bit<16> dst_port;
    bit<16> length;
    bit<16> checksum;
}

header icmp_t {
    bit<8> type;
    bit<8> code;
    bit<16> checksum;
}

@id(0x04000001)
@controller_header("packet_in")
header packet_in_t {
    bit<16> ingress_port;
    bit<16> rule_id;
    bit<8> reason;
}

@id(0x04000002)
@controller_header("packet_out")
header packet_out_t {
    bit<16> egress_port;
}

struct headers_t {
    packet_out_t packet_out;
    packet_in_t packet_in;
    ethernet_t ethernet;
    ipv4_t ipv4;
    tcp_t tcp;
    udp_t udp;
    icmp_t icmp;
}

struct metadata_t {
    bit<9> ingress_port;
    bit<1> epoch;
    bit<256> src_tags;
    bit<256> dst_tags;
    bit<16> l4_src_port;
    bit<16> l4_dst_port;
    bit<8> tcp_flags;
    @field_list(1)
    bit<16> log_rule_id;
    @field_list(1)
    bit<8> log_reason;
    bit<2> meter_color;
    // Carried to the egress copy of a logged deny (clone field list 1).
    @field_list(1)
    bit<9> log_ingress_port;
}

parser P4segParser(packet_in packet,
                   out headers_t hdr,
                   inout metadata_t meta,
                   inout standard_metadata_t standard_metadata) {
    state start {
        meta.ingress_port = standard_metadata.ingress_port;
        transition select(standard_metadata.ingress_port) {
            CPU_PORT: parse_packet_out;
            default: parse_ethernet;
        }
    }

    state parse_packet_out {
        packet.extract(hdr.packet_out);
        transition parse_ethernet;
    }

    state parse_ethernet {
        packet.extract(hdr.ethernet);
        transition select(hdr.ethernet.ether_type) {
            ETHERTYPE_IPV4: parse_ipv4;
            default: accept;
        }
    }

    state parse_ipv4 {
        packet.extract(hdr.ipv4);
        // Ports are read only from a first fragment with a plain 20-byte header.
        transition select(hdr.ipv4.ihl, hdr.ipv4.frag_offset, hdr.ipv4.protocol) {
            (4w5, 13w0, PROTO_TCP): parse_tcp;
            (4w5, 13w0, PROTO_UDP): parse_udp;
            (4w5, 13w0, PROTO_ICMP): parse_icmp;
            default: accept;
        }
    }

    state parse_tcp {
        packet.extract(hdr.tcp);
        meta.l4_src_port = hdr.tcp.src_port;
        meta.l4_dst_port = hdr.tcp.dst_port;
        meta.tcp_flags = hdr.tcp.flags;
        transition accept;
    }

    state parse_udp {
        packet.extract(hdr.udp);
        meta.l4_src_port = hdr.udp.src_port;
        meta.l4_dst_port = hdr.udp.dst_port;
        transition accept;
    }

    state parse_icmp {
        packet.extract(hdr.icmp);
        // ICMP has no ports: type and code stand in the destination port (echo reply = 0x00xx).
        meta.l4_dst_port = hdr.icmp.type ++ hdr.icmp.code;
        transition accept;
    }
}

control P4segVerifyChecksum(inout headers_t hdr, inout metadata_t meta) {
    apply { }
}

control P4segIngress(inout headers_t hdr,
                inout metadata_t meta,
                inout standard_metadata_t standard_metadata) {
    @id(0x13000001)
    @name("policy_counter")
    direct_counter(CounterType.packets_and_bytes) policy_counter;
    @id(0x15000001)
    @name("policy_meter")
    direct_meter<bit<2>>(MeterType.packets) policy_meter;
    @id(0x12000001)
    @name("policy_red_drops")
    counter<bit<32>>(32w65536, CounterType.packets) policy_red_drops;

    @id(0x01000001)
    @name("set_epoch")
    action set_epoch(bit<1> value) {
        meta.epoch = value;
    }

    @id(0x01000002)
    @name("set_src_tags")
    action set_src_tags(bit<256> tags) {
        meta.src_tags = tags;
    }

    @id(0x01000003)
    @name("set_dst_tags")
    action set_dst_tags(bit<256> tags) {
        meta.dst_tags = tags;
    }

    @id(0x01000004)
    @name("drop")
    action drop() {
        mark_to_drop(standard_metadata);
    }

    @id(0x01000005)
    @name("permit")
    action permit(bit<16> rule_id) {
        meta.log_rule_id = rule_id;
    }

    @id(0x01000006)
    @name("permit_metered")
    action permit_metered(bit<16> rule_id) {
        policy_meter.read(meta.meter_color);
        meta.log_rule_id = rule_id;
    }

    @id(0x01000007)
    @name("deny")
    action deny(bit<16> rule_id) {
        meta.log_rule_id = rule_id;
        mark_to_drop(standard_metadata);
    }

    @id(0x01000008)
    @name("deny_and_log")
    action deny_and_log(bit<16> rule_id) {
        meta.log_rule_id = rule_id;
        meta.log_reason = REASON_DENY_LOG;
        meta.log_ingress_port = standard_metadata.ingress_port;
        clone_preserving_field_list(CloneType.I2E, CPU_CLONE_SESSION, 1);
        mark_to_drop(standard_metadata);
    }

    @id(0x0100000a)
    @name("drop_spoofed")
    action drop_spoofed() {
        // A source this port does not own: dropped, and a copy tells the controller.
        meta.log_rule_id = 0;
        meta.log_reason = REASON_SPOOF;
        meta.log_ingress_port = standard_metadata.ingress_port;
        clone_preserving_field_list(CloneType.I2E, CPU_CLONE_SESSION, 1);
        mark_to_drop(standard_metadata);
    }

    @id(0x01000009)
    @name("forward")
    action forward(bit<9> port) {
        standard_metadata.egress_spec = port;
    }

    @id(0x02000001)
    @name("epoch")
    table epoch {
        actions = {
            @defaultonly set_epoch;
        }
        default_action = set_epoch(0);
        size = 1;
    }

    @id(0x02000002)
    @name("src_identity")
    table src_identity {
        key = {
            meta.epoch : ternary @name("epoch");
            meta.ingress_port : exact @name("ingress_port");
            hdr.ipv4.src_addr : lpm @name("src_addr");
        }
        actions = {
            @tableonly set_src_tags;
            drop;
            @defaultonly drop_spoofed;
        }
        const default_action = drop_spoofed();
        size = 4096;
    }

    @id(0x02000003)
    @name("dst_identity")
    table dst_identity {
        key = {
            meta.epoch : ternary @name("epoch");
            hdr.ipv4.dst_addr : lpm @name("dst_addr");
        }
        actions = {
            set_dst_tags;
        }
        const default_action = set_dst_tags(0);
        size = 4096;
    }

    @id(0x02000004)
    @name("policy")
    table policy {
        key = {
            meta.epoch : ternary @name("epoch");
            meta.src_tags : ternary @name("src_tags");
            meta.dst_tags : ternary @name("dst_tags");
            hdr.ipv4.protocol : ternary @name("protocol");
            meta.l4_src_port : range @name("l4_src_port");
            meta.l4_dst_port : range @name("l4_dst_port");
            meta.tcp_flags : ternary @name("tcp_flags");
        }
        actions = {
            @tableonly permit;
            @tableonly permit_metered;
            deny;
            deny_and_log;
        }
        const default_action = deny(0);
        counters = policy_counter;
        meters = policy_meter;
        size = 16384;
    }

    @id(0x02000005)
    @name("routing")
    table routing {
        key = {
            hdr.ipv4.dst_addr : lpm @name("dst_addr");
        }
        actions = {
            @tableonly forward;
            drop;
        }
        const default_action = drop();
        size = 4096;
    }

    apply {
        if (hdr.packet_out.isValid()) {
            // Sent by the controller: out of the port it names, as it is.
            standard_metadata.egress_spec = (bit<9>) hdr.packet_out.egress_port;
            hdr.packet_out.setInvalid();
        } else if (!hdr.ipv4.isValid() || hdr.ipv4.ihl != 5 || hdr.ipv4.frag_offset != 0) {
            mark_to_drop(standard_metadata);
        } else {
            epoch.apply();
            // Only a bound source goes on: `drop` (a miss, or an entry) has dropped the packet.
            switch (src_identity.apply().action_run) {
                set_src_tags: {
                    dst_identity.apply();
                    switch (policy.apply().action_run) {
                        permit: {
                            routing.apply();
                        }
                        permit_metered: {
                            if (meta.meter_color == V1MODEL_METER_COLOR_RED) {
                                policy_red_drops.count((bit<32>) meta.log_rule_id);
                                mark_to_drop(standard_metadata);
                            } else {
                                routing.apply();
                            }
                        }
                        default: {
                            // deny / deny_and_log have dropped the packet already.
                        }
                    }
                }
                default: { }
            }
        }
    }
}

control P4segEgress(inout headers_t hdr,
                    inout metadata_t meta,
                    inout standard_metadata_t standard_metadata) {
    apply {
        if (standard_metadata.instance_type == PKT_INSTANCE_TYPE_INGRESS_CLONE) {
            // The copy of a logged deny or a spoofed packet, on its way to the controller.
            hdr.packet_in.setValid();
            hdr.packet_in.ingress_port = (bit<16>) meta.log_ingress_port;
            hdr.packet_in.rule_id = meta.log_rule_id;
            hdr.packet_in.reason = meta.log_reason;
        }
    }
}

control P4segComputeChecksum(inout headers_t hdr, inout metadata_t meta) {
    apply { }
}

control P4segDeparser(packet_out packet, in headers_t hdr) {
    apply {
        packet.emit(hdr.packet_in);
        packet.emit(hdr.ethernet);
        packet.emit(hdr.ipv4);
        packet.emit(hdr.tcp);
        packet.emit(hdr.udp);
        packet.emit(hdr.icmp);
    }
}

V1Switch(
    P4segParser(),
    P4segVerifyChecksum(),
    P4segIngress(),
    P4segEgress(),
    P4segComputeChecksum(),
    P4segDeparser()
) main;
