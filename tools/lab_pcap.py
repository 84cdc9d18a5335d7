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

    def add(self, side: str, seg: Segment) -> None:
        self.segs[side].append(seg)
        self.order.append((side, seg))


def flows(segs: list[Segment], client_ip: str) -> list[Flow]:
    """Group segments by 4-tuple; a SYN with a new sequence number opens a new incarnation."""
    current: dict[tuple[int, int], Flow] = {}
    isn: dict[tuple[int, int], int] = {}
    result: list[Flow] = []
    for seg in segs:
        side = "client" if seg.src == client_ip else "server"
        key = (seg.sport, seg.dport) if side == "client" else (seg.dport, seg.sport)
        is_syn = seg.flags & (SYN | ACK) == SYN
        if key not in current or (is_syn and isn.get(key) != seg.seq):
            prev = current.get(key)
            current[key] = Flow(key[0], key[1], prev.incarnation + 1 if prev else 0)
            result.append(current[key])
            isn[key] = seg.seq
        current[key].add(side, seg)
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


def seq_ge(a: int, b: int) -> bool:
    """a >= b in 32-bit sequence space (RFC 1982 style)."""
    return (a - b) % 2**32 < 2**31
