"""Link layer -> IP -> TCP with dpkt, appended to columns (one list per field).

Every record either becomes one TCP segment row or one skip reason; nothing is dropped
without being counted.
"""
from __future__ import annotations

import socket
import struct
from array import array

import dpkt
import numpy as np
from dpkt import ethernet, ip, ip6, llc, loopback, ppp, pppoe, sll, sll2, tcp

# The segment table: column name -> numpy dtype. One row per TCP segment seen.
SEGMENT_COLUMNS: dict[str, str] = {
    "capture": "int32",   # index into Analysis.captures
    "frame": "int64",     # 1-based frame number within its capture file
    "ts": "float64",      # capture timestamp, seconds since the epoch
    "ipver": "int8",
    "src": "object", "dst": "object",  # addresses as text
    "sport": "int32", "dport": "int32",
    "seq": "int64", "ack": "int64",    # raw 32-bit values
    "flags": "int32",     # TCP flags byte plus NS (0x100)
    "win": "int32",       # raw window field (unscaled)
    "framelen": "int32",  # the frame's length on the wire (as tshark's frame.len)
    "plen": "int32",      # TCP payload length on the wire (from IP lengths, not caplen);
                          # of a fragmented datagram, only the first fragment's share
    "ipid": "int32",      # IPv4 identification, -1 for IPv6
    "ttl": "int16",       # TTL or hop limit
    "mss": "int32", "wscale": "int16",  # -1 when absent
    "sackok": "bool",
    "nsack": "int8",      # SACK blocks carried
    "sack": "object",     # their (left, right) edges as a tuple of pairs, None without SACK
    "dsack": "bool",      # first SACK block reports a duplicate (RFC 2883)
    "tsval": "int64", "tsecr": "int64",  # -1 when absent
    "http": "object",     # first line(s) of an HTTP/1.x message starting this payload, else None
}

# Why a frame is no TCP segment: the keys of CaptureInfo.skipped (JSON `captures[].skipped`).

HTTP_STARTS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ",
               b"CONNECT ", b"TRACE ", b"HTTP/1.")
HTTP_HEAD_BYTES = 512
# Bytes of a frame that are decoded: every header and the HTTP head lie within them, and past
# them a frame only adds to a TSO/jumbo payload length. This bounds dpkt's work on a hostile
# frame (its IPv6 extension-header walk copies the rest of the packet once per header).
DECODE_BYTES = 1 << 16

_addr_cache: dict[bytes, str] = {}


def _addr(raw: bytes) -> str:
    s = _addr_cache.get(raw)
    if s is None:
        if len(_addr_cache) > 100_000:
            _addr_cache.clear()
        s = _addr_cache[raw] = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    return s


# pcap-linktype(7) numbers we decode -> the dpkt class of the link header (None: bare IP).
LINK_LAYERS: dict[int, type | None] = {
    0: loopback.Loopback, 108: loopback.Loopback,  # BSD NULL (host order), LOOP (network order)
    1: ethernet.Ethernet,
    12: None, 14: None, 101: None, 228: None, 229: None,  # raw IP; 12/14: DLT_RAW of some BSDs
    113: sll.SLL, 276: sll2.SLL2,  # Linux cooked (tcpdump -i any)
}
# Headers whose payload is the next layer: walked through to reach IP.
_CARRIERS = (ethernet.Ethernet, llc.LLC, pppoe.PPPoE, ppp.PPP, sll.SLL, sll2.SLL2, loopback.Loopback)
# Where a carrier names the protocol that follows (dpkt leaves raw bytes when it fails to decode it).
_NEXT_FIELD = {sll.SLL: "ethtype", sll2.SLL2: "ethtype", llc.LLC: "type", ppp.PPP: "p", pppoe.PPP: "p"}
_IP_TYPES = {ethernet.ETH_TYPE_IP, ethernet.ETH_TYPE_IP6, ppp.PPP_IP, ppp.PPP_IP6}
ETH_TYPE_PBB = 0x88E7  # IEEE 802.1ah backbone: a 4-byte I-TAG, then the customer's Ethernet frame


def _ethertype(eth: ethernet.Ethernet) -> int:
    """The type after the last VLAN tag (dpkt strips up to two)."""
    tags = getattr(eth, "vlan_tags", None)
    return tags[-1].type if tags else eth.type


def network_layer(linktype: int, data: bytes):
    """Return (dpkt IP or IP6 packet, None) or (None, skip reason) for one frame."""
    if linktype not in LINK_LAYERS:
        return None, "unsupported_link"
    cls = LINK_LAYERS[linktype]
    if cls is None:
        ver = data[0] >> 4 if data else None
        if ver not in (4, 6):
            return None, "malformed"
        return (ip.IP(data) if ver == 4 else ip6.IP6(data)), None
    pkt = layer = cls(data)  # dpkt strips 802.1Q / QinQ / MPLS tags and parses what follows
    if getattr(pkt, "mpls_labels", None) and not isinstance(pkt.data, (ip.IP, ip6.IP6)):
        # dpkt takes only 0x45 for IPv4 after an MPLS stack; an IPv4 header with options too
        inner = data[14 + 4 * len(pkt.mpls_labels):]
        if inner and inner[0] >> 4 == 4:
            return ip.IP(inner), None
    while isinstance(pkt, _CARRIERS):
        layer, pkt = pkt, pkt.data
        if isinstance(layer, ethernet.Ethernet) and isinstance(pkt, bytes) \
                and _ethertype(layer) == ETH_TYPE_PBB:
            pkt = ethernet.Ethernet(pkt[4:])
    if isinstance(pkt, (ip.IP, ip6.IP6)):
        return pkt, None
    declared = _ethertype(layer) if isinstance(layer, ethernet.Ethernet) else getattr(
        layer, _NEXT_FIELD.get(type(layer), ""), None)
    return None, "malformed" if declared in _IP_TYPES and isinstance(pkt, bytes) else "non_ip"


# numpy dtype -> array typecode: numbers are kept unboxed while reading, not as Python objects
# in lists (reading 2 million segments peaked at 0.7 GB instead of 1.5 GB)
_TYPECODES = {"int8": "b", "int16": "h", "int32": "i", "int64": "q", "float64": "d", "bool": "B"}


class Columns:
    """The reference decoder (dpkt, every link type we know): an append-only column store
    of segments, turned into numpy arrays by `arrays()`."""

    def __init__(self) -> None:
        self.cols: dict[str, array | list] = {
            name: array(_TYPECODES[dtype]) if dtype in _TYPECODES else []
            for name, dtype in SEGMENT_COLUMNS.items()}

    def __len__(self) -> int:
        return len(self.cols["ts"])

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns as numpy arrays (consumes them, freeing each as it goes)."""
        return {name: np.asarray(self.cols.pop(name), dtype=dtype)
                for name, dtype in SEGMENT_COLUMNS.items()}

    def add(self, capture: int, frame: int, ts: float, linktype: int, data: bytes,
            framelen: int) -> str | None:
        """Decode one frame and append it; return a skip reason instead when it is no TCP segment."""
        beyond = max(len(data) - DECODE_BYTES, 0)
        data = data[:DECODE_BYTES]
        try:
            pkt, reason = network_layer(linktype, data)
            if pkt is None:
                return reason
            if isinstance(pkt, ip.IP):
                if pkt.offset:
                    return "fragment"
                if pkt.p != ip.IP_PROTO_TCP:
                    return "non_tcp"
                ipver, ipid, ttl, total, head = 4, pkt.id, pkt.ttl, pkt.len, pkt.hl * 4
            else:
                frag = pkt.extension_hdrs.get(ip.IP_PROTO_FRAGMENT)
                if frag is not None and frag.frag_off:
                    return "fragment"
                # dpkt leaves `p` unset when the chain ends in ESP (no next-header field)
                if getattr(pkt, "p", None) != ip.IP_PROTO_TCP:
                    return "non_tcp"
                ipver, ipid, ttl, total = 6, -1, pkt.hlim, pkt.plen
                head = sum(h.length for h in pkt.all_extension_headers)
            # total length 0: TSO or a jumbogram, the payload is what was captured
            l4len = total - head
            if total and l4len < 20:  # IP header or extension chain overruns the datagram
                return "malformed"
            seg = pkt.data
            if not isinstance(seg, tcp.TCP):
                return "truncated" if len(bytes(seg)) < 20 else "malformed"
            hlen = seg.off * 4
            if hlen < 20 or (total and hlen > l4len):  # data offset < 5 or past the datagram
                return "malformed"
            plen = l4len - hlen if total else len(seg.data) + beyond
        except (dpkt.UnpackError, struct.error, IndexError, ValueError):
            return "malformed"
        mss = wscale = tsval = tsecr = -1
        sackok = dsack = False
        nsack = 0
        sack = None
        if seg.opts:
            # dpkt ends the list with None at an option cut short: keep the options before it
            opts = [o for o in tcp.parse_opts(seg.opts) if o is not None]
            for kind, val in opts:
                if kind == tcp.TCP_OPT_TIMESTAMP and len(val) == 8:
                    tsval, tsecr = struct.unpack(">II", val)
                elif kind == tcp.TCP_OPT_SACK and len(val) >= 8:
                    blocks = struct.unpack(f">{len(val) // 8 * 2}I", val[: len(val) // 8 * 8])
                    nsack = len(blocks) // 2
                    sack = tuple(zip(blocks[::2], blocks[1::2]))
                    left, right = blocks[0], blocks[1]
                    # RFC 2883: a D-SACK block lies below the cumulative ACK or inside the 2nd block
                    dsack = ((seg.ack - right) & 0xFFFFFFFF) < 0x80000000 or (
                        nsack > 1 and _within(left, right, blocks[2], blocks[3]))
                elif kind == tcp.TCP_OPT_MSS and len(val) == 2:
                    mss = struct.unpack(">H", val)[0]
                elif kind == tcp.TCP_OPT_WSCALE and len(val) == 1:
                    wscale = val[0]
                elif kind == tcp.TCP_OPT_SACKOK:
                    sackok = True
        payload = seg.data
        http = None
        if payload and payload.startswith(HTTP_STARTS):
            http = payload[:HTTP_HEAD_BYTES].decode("latin-1")
        c = self.cols
        c["capture"].append(capture)
        c["frame"].append(frame)
        c["ts"].append(ts)
        c["ipver"].append(ipver)
        c["src"].append(_addr(pkt.src))
        c["dst"].append(_addr(pkt.dst))
        c["sport"].append(seg.sport)
        c["dport"].append(seg.dport)
        c["seq"].append(seg.seq)
        c["ack"].append(seg.ack)
        c["flags"].append(seg.flags & 0x1FF)
        c["win"].append(seg.win)
        c["framelen"].append(min(framelen, 0x7FFFFFFF))
        c["plen"].append(plen)
        c["ipid"].append(ipid)
        c["ttl"].append(ttl)
        c["mss"].append(mss)
        c["wscale"].append(wscale)
        c["sackok"].append(sackok)
        c["nsack"].append(nsack)
        c["sack"].append(sack)
        c["dsack"].append(dsack)
        c["tsval"].append(tsval)
        c["tsecr"].append(tsecr)
        c["http"].append(http)
        return None


def _within(l1: int, r1: int, l2: int, r2: int) -> bool:
    """Is block [l1, r1) inside [l2, r2) in 32-bit sequence space?"""
    return ((l1 - l2) & 0xFFFFFFFF) < 0x80000000 and ((r2 - r1) & 0xFFFFFFFF) < 0x80000000
