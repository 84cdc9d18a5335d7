"""One connection: facts from its segments, then both endpoints' automata driven by them.

Data flows one way: `Flow` (arrays) -> `Facts` (what each side sent, which FIN, which ACKs)
-> detectors (losses, give-up, RST kind, keepalive, ...) -> automaton inputs in time order
-> each side's state history and the events table. What the capture point cannot vouch
for (a FIN seen leaving, never acknowledged) makes the receiver's state UNKNOWN.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from operator import itemgetter

import numpy as np

from . import detectors as det
from . import tcpstate
from .http import http_fields
from .seq import ACK, FIN, MOD, RST, SYN, after, at_or_after
from .tcpstate import Endpoint

SIDES = ("client", "server")


@dataclass
class Params:
    """Timer values the reconstruction assumes (Linux defaults; CLI --msl, --fin-timeout)."""

    msl: float = 30.0          # TIME_WAIT lasts 2 * msl (Linux TCP_TIMEWAIT_LEN = 60 s)
    fin_timeout: float = 60.0  # net.ipv4.tcp_fin_timeout: orphaned FIN_WAIT_2 lifetime
    port_range: tuple[int, int] = (32768, 60999)  # net.ipv4.ip_local_port_range (findings)
    close_wait_threshold: float = 10.0  # s in CLOSE_WAIT that is a leak whatever the port's habit


@dataclass(slots=True)
class Flow:
    """A connection's segments (duplicates removed) in time order, one list per column;
    d: 0 client, 1 server. Arrays given are turned into lists: a connection has a few dozen
    segments, which plain Python reads faster than numpy calls on tiny arrays."""

    ts: list[float]
    d: list[int]
    seq: list[int]
    ack: list[int]
    flags: list[int]
    plen: list[int]
    win: list[int]
    ipid: list[int]
    ttl: list[int]
    tsval: list[int]
    dsack: list[bool]
    http: list  # the payload's HTTP start (str), else None or NaN

    def __post_init__(self):
        if isinstance(self.ts, np.ndarray):  # columns of a segment table
            for col in fields(self):
                setattr(self, col.name, getattr(self, col.name).tolist())

    def __len__(self) -> int:
        return len(self.ts)


@dataclass(slots=True)
class Fin:
    """One side's FIN: the sequence number it occupies, its transmissions, the peer's ACKs of it."""

    seq: int
    tx: list[int] = field(default_factory=list)
    acks: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Side:
    """What one side sent, as row indices into the Flow."""

    syn: list[int] = field(default_factory=list)
    fin: Fin | None = None
    rst: list[int] = field(default_factory=list)
    keepalives: list[int] = field(default_factory=list)
    keepalive_acks: list[int] = field(default_factory=list)
    snd_end: int | None = None   # highest sequence number sent + 1
    packets: int = 0
    bytes: int = 0
    after_peer_fin: int = 0      # new payload bytes sent after the peer's FIN (half-close)
    first_data_after_peer_fin: int | None = None


def collect(f: Flow) -> tuple[Side, Side]:
    """One pass over the segments: SYNs, FINs and their ACKs, RSTs, keepalives, byte counts."""
    sides = (Side(), Side())
    last_win = [-1, -1]
    for i, (t, d, fl, seq, ack, plen, win) in enumerate(zip(f.ts, f.d, f.flags, f.seq, f.ack,
                                                            f.plen, f.win)):
        me, peer = sides[d], sides[1 - d]
        me.packets += 1
        me.bytes += plen
        if fl & SYN:
            me.syn.append(i)
        if fl & RST:
            me.rst.append(i)
        end = (seq + plen + (1 if fl & (SYN | FIN) else 0)) % MOD
        if (not fl & (SYN | FIN | RST) and plen <= 1 and me.snd_end is not None
                and (seq + 1) % MOD == me.snd_end and last_win[1 - d] != 0
                and (plen == 0 or t - f.ts[max(i - 1, 0)] > 1.0)):
            me.keepalives.append(i)  # seq = snd.una - 1: RFC 9293 3.8.4, Linux tcp_write_wakeup
        elif (peer.keepalives and not fl & (SYN | FIN | RST) and plen == 0
              and peer.snd_end is not None and ack == peer.snd_end
              and (not me.keepalive_acks or me.keepalive_acks[-1] < peer.keepalives[-1])):
            me.keepalive_acks.append(i)
        if fl & FIN:
            fin_seq = (seq + plen + (1 if fl & SYN else 0)) % MOD
            if me.fin is None:
                me.fin = Fin(fin_seq)
            if fin_seq == me.fin.seq:
                me.fin.tx.append(i)
        if plen and peer.fin is not None:
            data_end = (seq + plen) % MOD
            new = plen if me.snd_end is None else (
                min((data_end - me.snd_end) % MOD, plen) if after(data_end, me.snd_end) else 0)
            if new and me.first_data_after_peer_fin is None:
                me.first_data_after_peer_fin = i
            me.after_peer_fin += new
        if fl & ACK and peer.fin is not None and at_or_after(ack, (peer.fin.seq + 1) % MOD):
            peer.fin.acks.append(i)
        if not fl & RST and (me.snd_end is None or after(end, me.snd_end)):
            me.snd_end = end
        last_win[d] = win
    return sides


@dataclass
class Result:
    row: dict
    events: list[tuple]
    endpoints: tuple[Endpoint, Endpoint]


def reconstruct(f: Flow, vantage: str, local: frozenset[int], capture_end: float,
                params: Params) -> Result:
    """Reconstruct one connection incarnation: the SPEC's teardown fields and its events."""
    sides = collect(f)
    c = det.Context(f, sides, local, capture_end, params)
    inputs: list[tuple] = []   # (ts, order, side, automaton input, event kind, detail)
    events: list[tuple] = []   # (ts, side, kind, detail) for events that move no state

    def put(ts, side, event, kind, detail="", order=1):
        inputs.append((float(ts), order, side, event, kind, detail))

    ends = (Endpoint(), Endpoint())
    first = f.ts[0]
    if sides[0].syn and not (f.flags[sides[0].syn[0]] & ACK):
        for n, i in enumerate(sides[0].syn):
            if n == 0:
                put(f.ts[i], 0, tcpstate.SEND_SYN, "SYN")
            else:
                events.append((f.ts[i], 0, "SYN", f"retransmission {n}"))
        if sides[1].syn:
            ends[1].start("LISTEN", first)
            i = sides[1].syn[0]
            put(f.ts[i], 1, tcpstate.RECV_SYN, "SYN_ACK")
            est = c.handshake[2]  # the client's ACK of the SYN-ACK
            got = f.ts[i] if 0 in local else (f.ts[est] if est is not None else None)
            if got is not None:  # proven by the client's ACK: received before it was sent
                put(got, 0, tcpstate.RECV_SYNACK, "ESTABLISHED", order=1 if 0 in local else 0)
            if est is not None:
                put(f.ts[est], 1, tcpstate.RECV_ACK_OF_SYN, "ESTABLISHED")
        else:
            ack = next((i for i, (d, fl) in enumerate(zip(f.d, f.flags))
                        if d == 0 and fl & (SYN | RST | ACK) == ACK), None)
            if ack is not None:  # the client acknowledges a SYN-ACK the capture did not see
                ends[1].start("SYN_RECEIVED", f.ts[sides[0].syn[0]])
                t = f.ts[ack]
                put(t, 0, tcpstate.RECV_SYNACK, "ESTABLISHED", "SYN-ACK not captured", order=0)
                put(t, 1, tcpstate.RECV_ACK_OF_SYN, "ESTABLISHED", order=0)
    else:  # the capture began mid-connection
        ends[0].start("ESTABLISHED", first)
        ends[1].start("ESTABLISHED", first)

    for s in (0, 1):
        fin = sides[s].fin
        if fin is None:
            continue
        prev = None
        for n, i in enumerate(fin.tx):
            if n == 0:
                put(f.ts[i], s, tcpstate.SEND_FIN, "FIN", "with data" if f.plen[i] else "")
            else:
                events.append((f.ts[i], s, "FIN_RETRANSMIT", f"+{f.ts[i] - f.ts[prev]:.3f} s"))
            prev = i
        got = c.fin_received_at(s)
        if got is not None:  # proven by the receiver's own segment: received before it was sent
            put(got, 1 - s, tcpstate.RECV_FIN, "STATE", f"received {SIDES[s]} FIN",
                order=2 if 1 - s in local else 0)
        elif not c.fin_missed(s):  # no ACK of it either way: the receiver's state is unknown
            put(f.ts[fin.tx[0]], 1 - s, tcpstate.LOST_TRACK, "STATE",
                f"{SIDES[s]} FIN seen, no proof it arrived", order=2)
        acked = c.fin_ack_received_at(s)
        if acked is not None:
            put(acked[0], s, tcpstate.RECV_ACK_OF_FIN, "STATE", f"{SIDES[1 - s]} ACK of FIN received", order=1)
            events.append((f.ts[fin.acks[0]], 1 - s, "ACK_OF_FIN", f"ack {f.ack[fin.acks[0]]}"))
        giveup = c.giveup(s)
        if giveup is not None:
            put(giveup["at"], s, tcpstate.RETRIES_EXHAUSTED, "STATE",
                f"FIN sent {len(fin.tx)} times, never acknowledged: socket dropped")

    rst_kind = det.rst_kind(c)
    for s in (0, 1):
        if sides[s].rst:
            i = sides[s].rst[0]
            fw2 = det.fin_wait2_expiry(c, s)
            if fw2 is not None:
                put(fw2, s, tcpstate.FIN_WAIT2_EXPIRED, "STATE", "orphaned FIN_WAIT_2 expired", order=0)
            put(f.ts[i], s, tcpstate.SEND_RST, "RST", rst_kind or "")
            if rst_kind == "keepalive_timeout" and 1 - s not in local:  # the peer is unreachable
                put(f.ts[i], 1 - s, tcpstate.LOST_TRACK, "STATE", "peer unreachable: RST may not arrive",
                    order=3)
            else:
                put(f.ts[i], 1 - s, tcpstate.RECV_RST, "STATE", f"{SIDES[s]} RST received", order=3)

    inputs.sort(key=itemgetter(0, 1))  # by time, then order
    rows = []
    for t, _, s, event, kind, detail in inputs:
        moved = ends[s].handle(event, t)
        if moved is None and kind == "STATE":
            continue
        rows.append((t, s, kind, moved[0] if moved else ends[s].state,
                     moved[1] if moved else ends[s].state, detail))
    tw = det.time_wait(c, ends)
    for t, s, detail in tw["reacks"]:
        rows.append((t, s, "TW_REACK", "TIME_WAIT", "TIME_WAIT", detail))
    for s, end in tw["ends"].items():
        moved = ends[s].handle(tcpstate.TIMEWAIT_EXPIRED, end) if end <= capture_end else None
        if moved:
            rows.append((end, s, "STATE", *moved, "2MSL expired"))
    for t, s, kind, detail in events + det.keepalive_events(c) + det.half_close_events(c):
        st = ends[s].state_at(t) or ""
        rows.append((float(t), s, kind, st, st, detail))
    losses = det.losses(c)
    for loss in losses:
        rows.append((loss["ts"], loss["side"], "LOSS", "", "", (f"wave {loss['wave']} lost "
                     f"{loss['position'].replace('_', ' ')}")))
    rows.sort(key=itemgetter(0))

    row = det.connection_fields(c, ends, rst_kind, tw, losses, vantage)
    row.update(http_fields(f))
    return Result(row, rows, ends)
