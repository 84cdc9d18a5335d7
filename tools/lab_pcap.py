"""Read the lab's captures back and measure per-connection teardown facts from one vantage.

This is the lab's own check of what each scenario really produced (FIN transmissions,
RST senders, who closed first, whether the FINs crossed). It is deliberately small and
only as clever as the lab's scenarios need; pcapflow itself is the real analyzer.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

import dpkt

FIN, SYN, RST, ACK = dpkt.tcp.TH_FIN, dpkt.tcp.TH_SYN, dpkt.tcp.TH_RST, dpkt.tcp.TH_ACK
LINKTYPES = {1: dpkt.ethernet.Ethernet, 113: dpkt.sll.SLL, 276: dpkt.sll2.SLL2}


@dataclass(slots=True)
class Segment:
    ts: float
    src: str
    sport: int
    dst: str
    dport: int
    flags: int
    seq: int
    ack: int
    payload: int


def read_segments(path: str) -> list[Segment]:
    """Every IPv4/IPv6 TCP segment of a pcap (Ethernet, Linux SLL or SLL2 link type)."""
    out = []
    with open(path, "rb") as fh:
        reader = dpkt.pcap.Reader(fh)
        link = LINKTYPES[reader.datalink()]
        for ts, buf in reader:
            ip = link(buf).data
            if not isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) or not isinstance(
                ip.data, dpkt.tcp.TCP
            ):
                continue
            fam = socket.AF_INET6 if isinstance(ip, dpkt.ip6.IP6) else socket.AF_INET
            tcp = ip.data
            # Payload length from the IP header: captures are truncated with -s 512.
            iplen = ip.plen if fam == socket.AF_INET6 else ip.len - ip.hl * 4
            out.append(
                Segment(
                    float(ts),
                    socket.inet_ntop(fam, ip.src),
                    tcp.sport,
                    socket.inet_ntop(fam, ip.dst),
                    tcp.dport,
                    tcp.flags,
                    tcp.seq,
                    tcp.ack,
                    iplen - tcp.off * 4,
                )
            )
    return out


@dataclass(slots=True)
class Flow:
    """One connection incarnation as seen from one capture point."""

    client_port: int
    server_port: int
    incarnation: int
    segs: dict[str, list[Segment]] = field(default_factory=lambda: {"client": [], "server": []})
    order: list[tuple[str, Segment]] = field(default_factory=list)
    isn: int | None = None  # the client's SYN sequence number (None: no SYN seen)
    nxt: dict[str, int] = field(default_factory=dict)  # per side: highest sequence end sent

    def add(self, side: str, seg: Segment) -> None:
        self.segs[side].append(seg)
        self.order.append((side, seg))
        end = (seg.seq + seg.payload + bool(seg.flags & (SYN | FIN))) % 2**32
        if side not in self.nxt or seq_ge(end, self.nxt[side]):
            self.nxt[side] = end

    def misfit(self, side: str, seg: Segment) -> int:
        """How far a segment's seq (and ack) lie from this incarnation's sequence spaces."""
        cost = seq_dist(seg.seq, self.nxt[side]) if side in self.nxt else UNKNOWN_SPACE
        if seg.flags & ACK:
            peer = other(side)
            cost += seq_dist(seg.ack, self.nxt[peer]) if peer in self.nxt else UNKNOWN_SPACE
        return cost


UNKNOWN_SPACE = 1 << 16  # cost of a sequence space not seen yet (a new server before its SYN+ACK)


def flows(segs: list[Segment], client_ip: str) -> list[Flow]:
    """Group segments by 4-tuple into incarnations, in order of first packet.

    A SYN whose sequence number is new for its 4-tuple opens an incarnation; a re-sent SYN
    (same ISN) belongs to the incarnation it opened. A SYN+ACK belongs to the incarnation
    whose SYN it acknowledges; every other segment to the incarnation whose sequence spaces
    its seq and ack fit best (the latest on a tie). So when a new SYN meets a peer still in
    CLOSE_WAIT, the ACK the old socket answers with and the client's RST to that ACK stay
    with the old connection, and the SYN re-sent after them opens nothing new.
    """
    incs: dict[tuple[int, int], list[Flow]] = {}
    result: list[Flow] = []
    for seg in segs:
        side = "client" if seg.src == client_ip else "server"
        key = (seg.sport, seg.dport) if side == "client" else (seg.dport, seg.sport)
        known = incs.setdefault(key, [])
        flow = None
        if seg.flags & (SYN | ACK) == SYN:
            flow = next((f for f in known if f.isn == seg.seq), None)
            if flow is None:
                flow = Flow(key[0], key[1], len(known), isn=seg.seq)
                known.append(flow)
                result.append(flow)
        elif not known:
            flow = Flow(key[0], key[1], 0)
            known.append(flow)
            result.append(flow)
        elif seg.flags & (SYN | ACK) == SYN | ACK:
            flow = next(
                (
                    f
                    for f in reversed(known)
                    if f.isn is not None and seg.ack == (f.isn + 1) % 2**32
                ),
                None,
            )
        if flow is None:
            flow = min(reversed(known), key=lambda f: f.misfit(side, seg))
        flow.add(side, seg)
    return result


def other(side: str) -> str:
    return "server" if side == "client" else "client"


def facts(flow: Flow) -> dict:
    """The teardown facts this capture point can measure for one incarnation."""
    fins = {s: [x for x in flow.segs[s] if x.flags & FIN] for s in ("client", "server")}
    rsts = {s: [x for x in flow.segs[s] if x.flags & RST] for s in ("client", "server")}
    first = sorted((v[0].ts, s) for s, v in fins.items() if v)
    active = first[0][1] if first else "none"
    rst_by = [s for s in ("client", "server") if rsts[s]]
    out = {
        "client_fin_retransmits": max(len(fins["client"]) - 1, 0),
        "server_fin_retransmits": max(len(fins["server"]) - 1, 0),
        "client_fins": len(fins["client"]),
        "server_fins": len(fins["server"]),
        "client_fin_times": [x.ts for x in fins["client"]],
        "server_fin_times": [x.ts for x in fins["server"]],
        "rst_by": "both" if len(rst_by) == 2 else (rst_by[0] if rst_by else "none"),
        "rst_has_ack": [bool(x.flags & ACK) for s in rst_by for x in rsts[s]],
        "active_closer": active,
        "client_keepalives": keepalives(flow, "client"),
        "server_keepalives": keepalives(flow, "server"),
    }
    out["close_type"] = close_type(flow, fins, rsts, active)
    if out["close_type"] == "simultaneous":
        out["active_closer"] = "both"
    out["half_close_bytes"] = 0  # no FIN seen here: nothing sent after one
    if active != "none":
        passive = other(active)
        out["half_close_bytes"] = sum(
            x.payload for x in flow.segs[passive] if x.ts > fins[active][0].ts
        )
        if fins[passive]:
            # Each ACK of the passive FIN beyond the first re-ACKs a retransmission of it:
            # in TIME_WAIT that restarts the 2MSL timer.
            end = (fins[passive][0].seq + 1) % 2**32
            acks = [x for x in flow.segs[active] if x.flags & ACK and x.ack == end]
            out["time_wait_restarts"] = max(len(acks) - 1, 0)
    return out


def close_type(flow: Flow, fins: dict, rsts: dict, active: str) -> str:
    """SPEC.md close_type, from the segments this capture point saw."""
    syns = [x for x in flow.segs["client"] if x.flags & SYN]
    synacks = [x for x in flow.segs["server"] if x.flags & (SYN | ACK) == SYN | ACK]
    if syns and not synacks:
        return "refused" if rsts["server"] else "unanswered"
    if rsts["client"] or rsts["server"]:
        return "fin_then_reset" if active != "none" else "reset"
    if active == "none":
        return "open"
    passive = other(active)
    fin_end = fins[active][0].seq + 1
    acked = [x for x in flow.segs[passive] if x.flags & ACK and seq_ge(x.ack, fin_end)]
    if not fins[passive]:
        if acked:
            return "half_closed"
        # No ACK at all after the FIN: abandoned once the FIN retransmissions stopped.
        return "abandoned" if flow.order[-1][1] is fins[active][-1] else "closing"
    pfin = fins[passive][0]
    last_ack_ok = any(x.flags & ACK and seq_ge(x.ack, pfin.seq + 1) for x in flow.segs[active])
    if not (pfin.flags & ACK and seq_ge(pfin.ack, fin_end)):
        return "simultaneous" if last_ack_ok else "closing"
    if not last_ack_ok:
        return "closing"
    separate_ack = any(x is not pfin and x.ts <= pfin.ts for x in acked)
    return "four_way" if separate_ack else "three_way"


def keepalives(flow: Flow, side: str) -> int:
    """Linux keepalive probes: empty ACK segments with seq = snd.nxt - 1 (RFC 9293 3.8.4)."""
    nxt, count = None, 0
    for seg in flow.segs[side]:
        if (
            nxt is not None
            and seg.payload == 0
            and seg.flags == ACK
            and seg.seq == (nxt - 1) % 2**32
        ):
            count += 1
        end = seg.seq + seg.payload + bool(seg.flags & (SYN | FIN))
        nxt = end % 2**32 if nxt is None or seq_ge(end % 2**32, nxt) else nxt
    return count


def seq_dist(a: int, b: int) -> int:
    """Distance between two sequence numbers, either way round the 32-bit space."""
    d = (a - b) % 2**32
    return min(d, 2**32 - d)


def seq_ge(a: int, b: int) -> bool:
    """a >= b in 32-bit sequence space (RFC 1982 style)."""
    return (a - b) % 2**32 < 2**31
