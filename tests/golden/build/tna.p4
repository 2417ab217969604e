/*
 * p4seg — zero-trust segmentation pipeline for Tofino (TNA).
 * Generated from p4src/spec.py by p4src/render.py; do not edit.
 *
 * The same tables, keys, actions and P4Runtime ids as the v1model program. A logged deny
 * is mirrored to the CPU port (mirror session 100) with a mirror header
 * that egress turns into the packet_in header.
 */
#include <core.p4>
#include <tna.p4>

const bit<16> ETHERTYPE_IPV4 = 0x0800;
const bit<8> PROTO_ICMP = 1;
const bit<8> PROTO_TCP = 6;
const bit<8> PROTO_UDP = 17;
const PortId_t CPU_PORT = 255;
const MirrorId_t CPU_MIRROR_SESSION = 100;
const bit<8> REASON_DENY_LOG = 1;
const bit<8> REASON_SPOOF = 2;
const MirrorType_t MIRROR_TYPE_DENY_LOG = 1;
const bit<8> BRIDGE_MIRRORED = 1;

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

// Prepended by the ingress deparser to a mirrored (logged) packet.
header deny_log_mirror_t {
    bit<8> kind;
    bit<7> _pad0;
    PortId_t ingress_port;
    bit<16> rule_id;
    bit<8> reason;
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
    bit<16> log_rule_id;
    bit<8> log_reason;
    bit<8> meter_color;
    MirrorId_t mirror_session;
}

struct egress_metadata_t {
    deny_log_mirror_t deny_log;
}

parser SwitchIngressParser(packet_in packet,
                           out headers_t hdr,
                           out metadata_t meta,
                           out ingress_intrinsic_metadata_t ig_intr_md) {
    state start {
        packet.extract(ig_intr_md);
        packet.advance(PORT_METADATA_SIZE);
        // TNA leaves metadata undefined: every field starts at zero.
        meta.ingress_port = ig_intr_md.ingress_port;
        meta.epoch = 0;
        meta.src_tags = 0;
        meta.dst_tags = 0;
        meta.l4_src_port = 0;
        meta.l4_dst_port = 0;
        meta.tcp_flags = 0;
        meta.log_rule_id = 0;
        meta.log_reason = 0;
        meta.meter_color = 0;
        meta.mirror_session = 0;
        transition select(ig_intr_md.ingress_port) {
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

control P4segIngress(inout headers_t hdr,
                inout metadata_t meta,
                in ingress_intrinsic_metadata_t ig_intr_md,
                in ingress_intrinsic_metadata_from_parser_t ig_prsr_md,
                inout ingress_intrinsic_metadata_for_deparser_t ig_dprsr_md,
                inout ingress_intrinsic_metadata_for_tm_t ig_tm_md) {
    @id(0x13000001)
    @name("policy_counter")
    DirectCounter<bit<32>>(CounterType_t.PACKETS_AND_BYTES) policy_counter;
    @id(0x15000001)
    @name("policy_meter")
    DirectMeter(MeterType_t.PACKETS) policy_meter;
    @id(0x12000001)
    @name("policy_red_drops")
    Counter<bit<32>, bit<16>>(65536, CounterType_t.PACKETS) policy_red_drops;

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
        ig_dprsr_md.drop_ctl = 1;
    }

    @id(0x01000005)
    @name("permit")
    action permit(bit<16> rule_id) {
        policy_counter.count();
        meta.log_rule_id = rule_id;
    }

    @id(0x01000006)
    @name("permit_metered")
    action permit_metered(bit<16> rule_id) {
        policy_counter.count();
        meta.meter_color = policy_meter.execute();
        meta.log_rule_id = rule_id;
    }

    @id(0x01000007)
    @name("deny")
    action deny(bit<16> rule_id) {
        policy_counter.count();
        meta.log_rule_id = rule_id;
        ig_dprsr_md.drop_ctl = 1;
    }

    @id(0x01000008)
    @name("deny_and_log")
    action deny_and_log(bit<16> rule_id) {
        policy_counter.count();
        meta.log_rule_id = rule_id;
        meta.log_reason = REASON_DENY_LOG;
        meta.mirror_session = CPU_MIRROR_SESSION;
        ig_dprsr_md.mirror_type = MIRROR_TYPE_DENY_LOG;
        ig_dprsr_md.drop_ctl = 1;
    }

    @id(0x0100000a)
    @name("drop_spoofed")
    action drop_spoofed() {
        // A source this port does not own: dropped, and a mirrored copy tells the controller.
        meta.log_rule_id = 0;
        meta.log_reason = REASON_SPOOF;
        meta.mirror_session = CPU_MIRROR_SESSION;
        ig_dprsr_md.mirror_type = MIRROR_TYPE_DENY_LOG;
        ig_dprsr_md.drop_ctl = 1;
    }

    @id(0x01000009)
    @name("forward")
    action forward(PortId_t port) {
        ig_tm_md.ucast_egress_port = port;
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
            meta.l4_src_port : ternary @name("l4_src_port");
            meta.l4_dst_port : ternary @name("l4_dst_port");
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
        size = 6144;
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
            ig_tm_md.ucast_egress_port = (PortId_t) hdr.packet_out.egress_port;
            hdr.packet_out.setInvalid();
            ig_tm_md.bypass_egress = 1;
        } else if (!hdr.ipv4.isValid() || hdr.ipv4.ihl != 5 || hdr.ipv4.frag_offset != 0) {
            ig_dprsr_md.drop_ctl = 1;
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
                            if (meta.meter_color == (bit<8>) MeterColor_t.RED) {
                                policy_red_drops.count(meta.log_rule_id);
                                ig_dprsr_md.drop_ctl = 1;
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
            ig_tm_md.bypass_egress = 1;
        }
    }
}

control SwitchIngressDeparser(packet_out packet,
                              inout headers_t hdr,
                              in metadata_t meta,
                              in ingress_intrinsic_metadata_for_deparser_t ig_dprsr_md) {
    Mirror() mirror;

    apply {
        if (ig_dprsr_md.mirror_type == MIRROR_TYPE_DENY_LOG) {
            mirror.emit<deny_log_mirror_t>(meta.mirror_session,
                {BRIDGE_MIRRORED, 0, meta.ingress_port, meta.log_rule_id, meta.log_reason});
        }
        packet.emit(hdr.ethernet);
        packet.emit(hdr.ipv4);
        packet.emit(hdr.tcp);
        packet.emit(hdr.udp);
        packet.emit(hdr.icmp);
    }
}

struct egress_headers_t {
    packet_in_t packet_in;
}

parser SwitchEgressParser(packet_in packet,
                          out egress_headers_t hdr,
                          out egress_metadata_t meta,
                          out egress_intrinsic_metadata_t eg_intr_md) {
    state start {
        packet.extract(eg_intr_md);
        // Only mirrored copies of logged denies reach egress (everything else bypasses it).
        packet.extract(meta.deny_log);
        transition accept;
    }
}

control SwitchEgress(inout egress_headers_t hdr,
                     inout egress_metadata_t meta,
                     in egress_intrinsic_metadata_t eg_intr_md,
                     in egress_intrinsic_metadata_from_parser_t eg_prsr_md,
                     inout egress_intrinsic_metadata_for_deparser_t eg_dprsr_md,
                     inout egress_intrinsic_metadata_for_output_port_t eg_oport_md) {
    apply {
        if (meta.deny_log.isValid() && meta.deny_log.kind == BRIDGE_MIRRORED) {
            hdr.packet_in.setValid();
            hdr.packet_in.ingress_port = (bit<16>) meta.deny_log.ingress_port;
            hdr.packet_in.rule_id = meta.deny_log.rule_id;
            hdr.packet_in.reason = meta.deny_log.reason;
        }
    }
}

control SwitchEgressDeparser(packet_out packet,
                             inout egress_headers_t hdr,
                             in egress_metadata_t meta,
                             in egress_intrinsic_metadata_for_deparser_t eg_dprsr_md) {
    apply {
        packet.emit(hdr.packet_in);
    }
}

Pipeline(
    SwitchIngressParser(),
    P4segIngress(),
    SwitchIngressDeparser(),
    SwitchEgressParser(),
    SwitchEgress(),
    SwitchEgressDeparser()
) pipe;

Switch(pipe) main;
