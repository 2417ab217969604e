"""Facts of the protocols p4seg judges, defined once: IP protocol numbers, port and ICMP
limits, TCP flags, and how ICMP type and code sit in the pipeline's port field."""

from __future__ import annotations

PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
PROTOCOL_NUMBERS = {"tcp": PROTO_TCP, "udp": PROTO_UDP, "icmp": PROTO_ICMP}
OTHER_PROTOCOL = 47  # GRE: stands for every protocol a policy does not name, unless it names 47
MAX_PORT = 65535
MAX_ICMP = 255  # ICMP type and code are one byte each

TCP_SYN, TCP_ACK = 0x02, 0x10
TCP_SYN_ACK = TCP_SYN | TCP_ACK

ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
# The pipeline's parser puts ICMP type << 8 | code in l4_dst_port (p4src/spec.py), so a
# type with every code is one range of that field.
ICMP_ECHO_REPLY_RANGE = (ICMP_ECHO_REPLY << 8, ICMP_ECHO_REPLY << 8 | 0xFF)
ICMP_ECHO_REQUEST_RANGE = (ICMP_ECHO_REQUEST << 8, ICMP_ECHO_REQUEST << 8 | 0xFF)
