"""Zeek-compatible conn.log columns for one connection, computed the way Zeek computes them.

A small replay of Zeek's TCP analysis (zeek/zeek `src/packet_analysis/protocol/tcp/
TCPSessionAdapter.cc`, `src/analyzer/protocol/tcp/TCP_Endpoint.cc`, `TCP_Reassembler.cc`)
over a `Flow`, and `conn_state()` of `scripts/base/protocols/conn/main.zeek`:

- each endpoint has Zeek's state (INACTIVE, SYN_SENT, SYN_ACK_SENT, PARTIAL, ESTABLISHED,
  CLOSED, RESET) driven by the same transitions;
- history letters (upper case: originator): `S h a d f r` once, repeated for SYN/FIN/RST only
  when the sequence number differs from the last one of that kind; `t w g` logarithmically
  (1st, 10th, 100th... event); `i` FIN+RST, `q` SYN+FIN/SYN+RST; `^` flipped direction;
- `orig_bytes`/`resp_bytes` come from sequence numbers (`TCP_Endpoint::Size`: the highest
  sequence number sent or acknowledged minus the ISN, SYN and FIN octets), and are only set
  when the duration is positive, as `set_conn` does;
- `orig_pkts`/`resp_pkts` are every packet of the direction (the ConnSize analyzer).

Originator: Zeek's originator is the first packet's sender, except that a first packet that is
a SYN-ACK, or a mid-stream packet from a likely server port, makes Zeek flip the roles (`^`).
The Flow has no ports, so the mapping is: the originator is pcapflow's client; history starts
with `^` when the first packet came from the server side and either pcapflow inferred the roles
(its service-port guess stands for Zeek's `likely_server_ports`) or that packet is a SYN-ACK.

Where Zeek ends a connection before pcapflow does (a SYN unanswered for tcp_attempt_delay, the
close/reset delay after a close, inactivity, a SYN that `IsReuse()` takes for a new
connection), the columns describe Zeek's first connection, the one whose uid starts with
pcapflow's first packet; Zeek logs the rest of the 4-tuple's packets in further rows.

Zeek sees every captured packet: give this function the connection's segments including the
capture duplicates pcapflow leaves out of its Flows, or their packets and retransmission
letters are missing. Not modelled: checksum validation (`c`, packets Zeek drops), payload cut
by the snap length (Zeek reassembles only captured bytes, so a headers-only capture is all
gaps), application analyzers (`x`, skipped data channels) and reassembly limits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .seq import ACK, FIN, MOD, RST, SYN
from .teardown import Flow

TOO_LARGE_SEQ_DELTA = 1 << 20  # TCPSessionAdapter.cc: SYN/RST sequence jumps not trusted
ATTEMPT_DELAY = 5.0   # tcp_attempt_delay: a SYN unanswered this long ends the connection
CLOSE_DELAY = 5.0     # tcp_close_delay / tcp_reset_delay: a closed connection is removed after
INACTIVITY = 300.0    # tcp_inactivity_timeout
INACTIVE, SYN_SENT, SYN_ACK_SENT, PARTIAL, ESTABLISHED, CLOSED, RESET = range(7)
RSTOS0 = re.compile(r"\^?S[^HAFGIQ]*R.*")  # main.zeek conn_state()


def delta32(a: int, b: int) -> int:
    """Zeek's seq_delta: a - b as a signed 32-bit number."""
    return (a - b + (1 << 31)) % MOD - (1 << 31)


@dataclass(slots=True)
class Endpoint:
    """Zeek's TCP_Endpoint, sequence numbers unwrapped to Python ints, plus its reassembler."""

    is_orig: bool
    state: int = INACTIVE
    prev_state: int = INACTIVE
    start: int = 0
    last: int = 0
    ack: int = 0
    fin_cnt: int = 0
    fin_seq: int = 0
    did_close: bool = False
    hist_last: dict = field(default_factory=dict)   # 'S'/'H'/'F'/'R' -> last relative seq
    scaled: dict = field(default_factory=dict)      # 'T'/'W'/'G' -> [count, threshold]
    reassem: int = 1                                # relative seq delivered up to
    trim: int = 0
    blocks: list = field(default_factory=list)      # undelivered (seq, upper), relative

    def set_state(self, s: int) -> None:
        if s != self.state:
            self.prev_state, self.state = self.state, s

    def init_seq(self, seq: int, last: int) -> None:
        self.start = self.ack = seq
        self.last = last

    def rel(self, seq: int, ref: int) -> int:
        return ref + delta32(seq, ref) - self.start

    def size(self, peer: Endpoint) -> int:
        """TCP_Endpoint::Size: payload bytes by sequence numbers."""
        if (self.prev_state == SYN_SENT and self.state == RESET and peer.state == INACTIVE
                and self.ack - self.start not in (0, 1)):
            return 0
        n = max(self.last, self.ack) - self.start
        n -= 1 if n else 0
        n -= 1 if self.fin_cnt and n else 0
        return max(n, 0)


def _fin_or_rst(ep: Endpoint, fin: int, rst: int) -> bool:
    """A FIN closes the endpoint, an RST resets it (RST wins); either means do_close."""
    if fin:
        ep.set_state(CLOSED)
    if rst:
        ep.set_state(RESET)
    return bool(fin or rst)


class Conn:
    """One Zeek connection: both endpoints, the history string, packet counts, times."""

    def __init__(self, flipped: bool):
        self.orig, self.resp = Endpoint(True), Endpoint(False)
        self.history = "^" if flipped else ""
        self.seen: set[tuple[str, bool]] = set()
        self.pkts = [0, 0]
        self.is_partial = False
        self.first_seen = [False, False]
        self.start_time = self.last_time = float("nan")
        self.attempt_at = self.delete_at = float("inf")

    def removed_before(self, t: float, fl: int, seq: int) -> bool:
        """Whether Zeek has ended this connection by the time a packet (t, flags, seq) comes:
        the attempt timer of a SYN left unanswered, the close or reset delay, inactivity, or
        a SYN that IsReuse() takes for a new connection. That packet opens a new conn.log row.
        """
        if t >= self.attempt_at and self.orig.state in (SYN_SENT, SYN_ACK_SENT) \
                and self.resp.state == INACTIVE:
            return True
        if t >= self.delete_at or t - self.last_time > INACTIVITY:
            return True
        if not fl & SYN or fl & ACK and self.orig.state != INACTIVE:
            return False
        owner = self.resp if fl & ACK else self.orig
        if self.orig.did_close or self.resp.did_close:
            return True
        reversed_handshake = (not fl & ACK and owner.state == SYN_ACK_SENT
                              and self.resp.state == INACTIVE and (seq - self.resp.start) % MOD == 0)
        return (seq - owner.start) % MOD != 0 and not reversed_handshake

    def check(self, ep: Endpoint, code: str, kind: str | None = None) -> bool:
        """Conn::CheckHistory: log the letter the first time a packet of this kind (the
        history mask: 'S' and 'H' share the SYN one) is seen; True if seen before."""
        key = (kind or code, ep.is_orig)
        if key in self.seen:
            return True
        self.seen.add(key)
        self.add(ep, code)
        return False

    def add(self, ep: Endpoint, code: str) -> None:
        self.history += code if ep.is_orig else code.lower()

    def scaled(self, ep: Endpoint, code: str) -> None:
        """Conn::ScaledHistoryEntry: the letter at the 1st, 10th, 100th... occurrence."""
        n, thresh = ep.scaled.get(code, (0, 1))
        n += 1
        if n == thresh:
            self.add(ep, code)
            thresh *= 10
        ep.scaled[code] = (n, thresh)

    def repeat(self, ep: Endpoint, code: str, kind: str, rel: int) -> None:
        """SYN/FIN/RST letters: logged again when their sequence number changed."""
        if self.check(ep, code, kind) and rel != ep.hist_last.get(kind, 0):
            self.add(ep, code)
        ep.hist_last[kind] = rel

    def packet(self, t: float, is_orig: bool, fl: int, seq: int, ack: int, plen: int,
               win: int) -> None:
        """TCPSessionAdapter::Process for one segment."""
        ep, peer = (self.orig, self.resp) if is_orig else (self.resp, self.orig)
        self.pkts[0 if is_orig else 1] += 1
        if self.start_time != self.start_time:
            self.start_time = self.last_time = t
        syn, fin, rst, has_ack = fl & SYN, fl & FIN, fl & RST, fl & ACK
        if not self.first_seen[0 if is_orig else 1]:  # SetPartialStatus
            if is_orig:
                self.is_partial = not syn or bool(has_ack)
            elif not self.is_partial:
                self.is_partial = not syn
        seg_len = (0 if rst else plen) + (1 if syn else 0) + (1 if fin else 0)
        self._init_endpoint(ep, syn, seq, seq + seg_len)
        rel_seq = ep.rel(seq, ep.last)
        underflow = rel_seq < 0
        self._history(ep, fl, rel_seq, plen)
        if win == 0 and not rst and peer.state != CLOSED and ep.state != RESET:
            self.scaled(ep, "W")
        if not (self.orig.did_close and self.resp.did_close):
            self.last_time = t  # the duration leaves out packets after both sides closed
        if fin:
            ep.fin_cnt += 1
            ep.fin_seq = rel_seq + seg_len
        rel_ack = 0
        if has_ack:
            if peer.state == INACTIVE:
                rel_ack = 1
                peer.init_seq(ack - 1, ack - 1)  # init_peer: as if its SYN had been seen
            else:
                rel_ack = peer.rel(ack, peer.ack)
                if rel_ack < 0:
                    rel_ack = 0
                elif not rst:
                    d = delta32(ack, peer.ack)
                    if d > 0 and not (ack == 0 and d > TOO_LARGE_SEQ_DELTA):
                        peer.ack += d
        delta_last = self._update_last(ep, seq + seg_len, fl, plen)
        do_close = self._state_machine(ep, peer, is_orig, fl, plen, delta_last)
        if has_ack:
            self._ack_received(peer, rel_ack)
        if plen and not rst and not underflow:
            self._data_sent(ep, rel_seq + (1 if syn else 0), plen)
        if do_close and not ep.did_close:  # ConnectionClosed()
            ep.did_close = True
            if ep.state == RESET or peer.did_close or peer.state == INACTIVE:
                self.delete_at = min(self.delete_at, self.last_time + CLOSE_DELAY)
        self.first_seen[0 if is_orig else 1] = True

    @staticmethod
    def _init_endpoint(ep: Endpoint, syn: int, seq: int, last: int) -> None:
        if ep.state == INACTIVE:
            if syn:
                ep.init_seq(seq, last)
            else:  # partial connection: number as though a SYN had been seen
                ep.init_seq(seq - 1, seq)
        elif syn and (ep.state in (SYN_SENT, SYN_ACK_SENT) and (seq - ep.start) % MOD
                      or ep.state in (ESTABLISHED, PARTIAL)
                      or ep.state == RESET and ep.prev_state == INACTIVE):
            ep.init_seq(seq, last)  # a new SYN restarts the sequence numbering

    def _history(self, ep: Endpoint, fl: int, rel_seq: int, plen: int) -> None:
        """update_history(): one letter class per packet."""
        bits = bool(fl & SYN) + bool(fl & FIN) + bool(fl & RST)
        if bits > 1:
            self.check(ep, "I" if fl & FIN and fl & RST else "Q")
        elif fl & SYN:
            self.repeat(ep, "H" if fl & ACK else "S", "SYN", rel_seq)
        elif fl & FIN:
            self.repeat(ep, "F", "FIN", rel_seq + plen)
        elif fl & RST:
            self.repeat(ep, "R", "RST", rel_seq)
        elif plen:
            self.check(ep, "D")
        elif fl & ACK:
            self.check(ep, "A")

    def _update_last(self, ep: Endpoint, last: int, fl: int, plen: int) -> int:
        """update_last_seq(): advance the highest sequence number, or count a retransmission."""
        d = delta32(last, ep.last)
        if fl & (SYN | RST) and abs(d) > TOO_LARGE_SEQ_DELTA:
            pass
        elif fl & FIN and ep.last == ep.start + 1:
            ep.last += d
        elif ep.state == RESET:
            pass
        elif d > 0:
            ep.last += d
        elif plen > 0:
            self.scaled(ep, "T")
        return d

    def _state_machine(self, ep: Endpoint, peer: Endpoint, is_orig: bool, fl: int, plen: int,
                       delta_last: int) -> bool:
        """UpdateStateMachine(): returns do_close."""
        syn, fin, rst, has_ack = fl & SYN, fl & FIN, fl & RST, fl & ACK
        close = False
        if ep.state == INACTIVE:
            if syn:
                if is_orig:
                    ep.set_state(SYN_ACK_SENT if has_ack else SYN_SENT)
                    self.attempt_at = self.last_time + ATTEMPT_DELAY
                else:
                    if peer.state == SYN_SENT:
                        peer.set_state(ESTABLISHED)
                    ep.set_state(ESTABLISHED)
            close = _fin_or_rst(ep, fin, rst)
            if ep.state == INACTIVE:
                if not is_orig and plen == 0 and self.orig.state == SYN_SENT:
                    pass  # an ACK of the SYN before the SYN-ACK does not make it partial
                elif has_ack and peer.state == ESTABLISHED:
                    ep.set_state(ESTABLISHED)
                    self.is_partial = False
                else:
                    ep.set_state(PARTIAL)
        elif ep.state in (SYN_SENT, SYN_ACK_SENT):
            close = _fin_or_rst(ep, fin, rst)
        elif ep.state in (ESTABLISHED, PARTIAL):
            if syn and ep.state == PARTIAL and peer.state == INACTIVE and not has_ack:
                ep.set_state(SYN_SENT)
            if fin and not rst:
                ep.set_state(CLOSED)
                if peer.state == RESET and peer.prev_state == CLOSED:
                    peer.set_state(CLOSED)  # FIN then RST from the peer: a normal close
                close = True
            if rst:
                ep.set_state(RESET)
                close = True
        elif ep.state == CLOSED and rst and peer.state != CLOSED:
            ep.set_state(RESET)  # after both FINs a RST changes nothing
            close = not ep.did_close
            self.delete_at = min(self.delete_at, self.last_time + CLOSE_DELAY)  # ResetTimer
        return close

    def _data_sent(self, ep: Endpoint, seq: int, plen: int) -> None:
        """TCP_Reassembler::DataSent: keep data above a hole, deliver what is in order."""
        upper = seq + plen
        seq = max(seq, ep.ack - ep.start, ep.trim)
        if upper <= seq or upper <= ep.reassem:
            return
        ep.blocks.append((seq, upper))
        self._deliver(ep)

    @staticmethod
    def _deliver(ep: Endpoint) -> None:
        ep.blocks.sort()
        while ep.blocks and ep.blocks[0][0] <= ep.reassem:
            ep.reassem = max(ep.reassem, ep.blocks.pop(0)[1])

    def _ack_received(self, ep: Endpoint, seq: int) -> None:
        """TCP_Reassembler::AckReceived -> TrimToSeq -> Undelivered: content gaps (`g`)."""
        if ep.fin_cnt and seq >= ep.fin_seq:
            seq = ep.fin_seq - 1
        if seq <= ep.trim:
            return
        if seq > ep.reassem and not (seq <= 2 and self.is_partial):
            while ep.blocks and ep.blocks[0][0] < seq:
                if ep.blocks[0][0] > ep.reassem:
                    self._gap(ep)
                    ep.reassem = ep.blocks[0][0]
                self._deliver(ep)
            if seq > ep.reassem:
                self._gap(ep)
                ep.reassem = seq
        ep.trim = seq

    def _gap(self, ep: Endpoint) -> None:
        """TCP_Reassembler::Gap: a letter only while both sides are established or closing."""
        peer = self.resp if ep.is_orig else self.orig
        if all(e.state == ESTABLISHED or e.state == CLOSED and e.prev_state == ESTABLISHED
               for e in (ep, peer)):
            self.scaled(ep, "G")

    def conn_state(self) -> str:
        return conn_state(self.orig.state, self.resp.state, self.orig.size(self.resp),
                          self.resp.size(self.orig), self.history)


def conn_state(os_: int, rs: int, orig_size: int, resp_size: int, history: str) -> str:
    """conn_state() of scripts/base/protocols/conn/main.zeek, from both endpoints' final
    states, their sizes (TCP_Endpoint::Size) and the history."""
    o_inactive, r_inactive = os_ in (INACTIVE, PARTIAL), rs in (INACTIVE, PARTIAL)
    if rs == RESET:
        if os_ in (SYN_SENT, SYN_ACK_SENT) or (os_ == RESET and orig_size == 0 and resp_size == 0):
            return "REJ"
        return "RSTRH" if o_inactive else "RSTR"
    if os_ == RESET:
        if r_inactive:
            return "RSTOS0" if RSTOS0.fullmatch(history) else "OTH"
        return "RSTO"
    if rs == CLOSED and os_ == CLOSED:
        return "SF"
    if os_ == CLOSED:
        return "SH" if r_inactive else "S2"
    if rs == CLOSED:
        return "SHR" if o_inactive else "S3"
    if os_ == SYN_SENT and rs == INACTIVE:
        return "S0"
    if os_ == ESTABLISHED and rs == ESTABLISHED:
        return "S1"
    return "OTH"


COLUMNS = ["zeek_conn_state", "zeek_history", "orig_pkts", "resp_pkts", "orig_bytes", "resp_bytes"]


def flipped(first_d, first_flags, roles_inferred):
    """Whether Zeek took the first packet's receiver for the originator (history starts `^`);
    for one connection or (numpy arrays) many."""
    return (first_d == 1) & (roles_inferred | (first_flags & (SYN | ACK) == SYN | ACK))


def zeek_fields(f: Flow, roles_inferred: bool) -> dict:
    """conn.log's conn_state, history, packet and byte counts for one connection.

    The originator is pcapflow's client (d == 0); see the module docstring for when the
    history starts with `^` and which Zeek connection the values describe. Byte counts are
    None where Zeek leaves them unset (zero duration).
    """
    if not len(f):
        return {"zeek_conn_state": "OTH", "zeek_history": "", "orig_pkts": 0, "resp_pkts": 0,
                "orig_bytes": None, "resp_bytes": None}
    c = Conn(flipped=flipped(f.d[0], f.flags[0], roles_inferred))
    for i, (d, fl, seq, ack, plen, win, t) in enumerate(
            zip(f.d, f.flags, f.seq, f.ack, f.plen, f.win, f.ts)):
        if i and c.removed_before(t, fl, seq):
            break
        c.packet(t, d == 0, fl, seq, ack, plen, win)
    timed = c.last_time > c.start_time
    return {"zeek_conn_state": c.conn_state(), "zeek_history": c.history,
            "orig_pkts": c.pkts[0], "resp_pkts": c.pkts[1],
            "orig_bytes": c.orig.size(c.resp) if timed else None,
            "resp_bytes": c.resp.size(c.orig) if timed else None}
