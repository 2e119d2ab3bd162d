"""Allowed flows from the router namespace's conntrack table (pyroute2 ``NFCTSocket``).

Conntrack keeps a finished TCP flow for a while in ``TIME_WAIT``/``CLOSE`` (and UDP/ICMP flows
until their timeout) with its final counters, so reading the table every flush interval sees
the flows that ended in between. Byte and packet counters need ``nf_conntrack_acct=1`` and
start times ``nf_conntrack_timestamp=1`` in the router namespace (set when it is built).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Final

from pyroute2.netlink.nfnetlink.nfctsocket import NFCTSocket

PROTO_NAMES: Final = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", 1: "icmp"}
#: conntrack TCP states after which a flow counts as ended (TIME_WAIT, CLOSE).
TCP_ENDED: Final = frozenset({7, 8})


@dataclass(frozen=True)
class Flow:
    """One conntrack entry, original direction = bunker → destination.

    Attributes:
        ct_id: conntrack id (unique while the entry exists).
        proto: ``tcp``, ``udp`` or ``icmp``.
        src_ip, src_port, dst_ip, dst_port: original tuple (ports ``None`` for ICMP).
        packets_out, bytes_out, packets_in, bytes_in: counters so far.
        started_ns: start time (ns since the epoch), 0 when unknown.
        ended: the flow has finished (TCP TIME_WAIT or CLOSE).
    """

    ct_id: int
    proto: str
    src_ip: str
    src_port: int | None
    dst_ip: str
    dst_port: int | None
    packets_out: int
    bytes_out: int
    packets_in: int
    bytes_in: int
    started_ns: int
    ended: bool


def _attr(msg: Any, *path: str) -> Any:
    for name in path:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


def _flow(msg: Any) -> Flow | None:
    number = _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_PROTO_NUM")
    proto = PROTO_NAMES.get(number) if isinstance(number, int) else None
    src = _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_IP", "CTA_IP_V4_SRC")
    dst = _attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_IP", "CTA_IP_V4_DST")
    ct_id = msg.get_attr("CTA_ID")
    if proto is None or not src or not dst or ct_id is None:
        return None
    state = _attr(msg, "CTA_PROTOINFO", "CTA_PROTOINFO_TCP", "CTA_PROTOINFO_TCP_STATE")
    started = _attr(msg, "CTA_TIMESTAMP", "CTA_TIMESTAMP_START")
    ports = proto in ("tcp", "udp")
    return Flow(
        ct_id=int(ct_id),
        proto=proto,
        src_ip=str(src),
        src_port=_attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_PROTO_SRC_PORT")
        if ports
        else None,
        dst_ip=str(dst),
        dst_port=_attr(msg, "CTA_TUPLE_ORIG", "CTA_TUPLE_PROTO", "CTA_PROTO_DST_PORT")
        if ports
        else None,
        packets_out=int(_attr(msg, "CTA_COUNTERS_ORIG", "CTA_COUNTERS_PACKETS") or 0),
        bytes_out=int(_attr(msg, "CTA_COUNTERS_ORIG", "CTA_COUNTERS_BYTES") or 0),
        packets_in=int(_attr(msg, "CTA_COUNTERS_REPLY", "CTA_COUNTERS_PACKETS") or 0),
        bytes_in=int(_attr(msg, "CTA_COUNTERS_REPLY", "CTA_COUNTERS_BYTES") or 0),
        started_ns=int(started or 0),
        ended=proto == "tcp" and state in TCP_ENDED,
    )


def read_flows() -> list[Flow]:
    """Every IPv4 TCP/UDP/ICMP conntrack entry of the calling thread's namespace."""
    sock = NFCTSocket()
    try:
        return [flow for msg in sock.dump() if (flow := _flow(msg)) is not None]
    finally:
        sock.close()
