"""One small function per teardown phenomenon, each reading a connection's collected facts.

Every function takes a `Context` (the flow's arrays, each side's facts, which sides the
capture point sits next to, the capture's end, the timer parameters) and returns plain
values. None of them moves a state: `teardown.reconstruct` feeds their answers to the
automaton. Kernel facts are from Linux (see TEARDOWN.md); each says where it applies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise

from .seq import ACK, FIN, HALF, MOD, RST, SYN

SIDES = ("client", "server")
WHO = {None: "none", 0: "client", 1: "server", 2: "both"}  # a side, or both
MISSED_FIN_MARGIN = 1.0  # s: far beyond a round trip, so a peer segment sent later saw the FIN


@dataclass
class Context:
    f: object            # teardown.Flow
    sides: tuple         # (teardown.Side, teardown.Side)
    local: frozenset     # sides whose received segments the capture point sees arrive
    capture_end: float
    params: object       # teardown.Params
    _giveups: dict = field(default_factory=dict)

    def fin_received_at(self, s: int) -> float | None:
        """When side 1-s received side s's FIN, as far as the capture can prove it."""
        f, fin = self.f, self.sides[s].fin
        if 1 - s in self.local:
            return f.ts[fin.tx[0]]
        if not fin.acks:
            return None
        proof = fin.acks[0]
        # Segments of one direction arrive in order: the FIN was in before the next segment
        # that followed the copy which got through.
        copy = max(i for i in fin.tx if i < proof) if fin.tx[0] < proof else fin.tx[0]
        later = [i for i in range(copy + 1, proof) if f.d[i] == s and i not in fin.tx]
        return f.ts[later[0]] if later else f.ts[proof]

    @cached_property
    def handshake(self) -> tuple[int | None, int | None, int | None]:
        return handshake_rows(self.f)

    @cached_property
    def closing(self) -> tuple[int | None, int | None]:
        return closers(self)

    def giveup(self, s: int) -> dict | None:
        if s not in self._giveups:
            self._giveups[s] = fin_giveup(self, s)
        return self._giveups[s]

    def fin_missed(self, s: int) -> bool:
        """Did side 1-s show that it never got side s's FIN? It sent a segment well after
        the FIN's last transmission (a round trip could not explain it) that does not ack it."""
        f, fin = self.f, self.sides[s].fin
        late = f.ts[fin.tx[-1]] + MISSED_FIN_MARGIN
        return any(d == 1 - s and t > late and not fl & RST
                   for t, d, fl in zip(f.ts, f.d, f.flags))

    def fin_ack_received_at(self, s: int) -> tuple[float, int] | None:
        """When side s received the peer's ACK of its FIN: the first ACK after its last
        transmission (a retransmission after an ACK means that ACK was lost on its way)."""
        fin = self.sides[s].fin
        last_tx = self.f.ts[fin.tx[-1]]
        for i in fin.acks:
            if self.f.ts[i] >= last_tx:
                return self.f.ts[i], i
        return None


def handshake_rows(f) -> tuple[int | None, int | None, int | None]:
    """Rows of (the last SYN before the SYN-ACK, the first SYN-ACK, the client's ACK of it)."""
    rows = range(len(f))
    k = next((i for i in rows if f.d[i] == 1 and f.flags[i] & (SYN | ACK) == SYN | ACK), None)
    if k is None:
        return None, None, None
    syn = next((i for i in reversed(rows[:k]) if f.d[i] == 0 and f.flags[i] & (SYN | ACK) == SYN),
               None)
    isn = f.seq[k]
    # any client ACK at or beyond isn + 1 proves the SYN-ACK arrived (data may come first)
    ack = next((i for i in rows[k:] if f.d[i] == 0 and f.flags[i] & (SYN | RST | ACK) == ACK
                and (f.ack[i] - isn - 1) % MOD < HALF), None)
    return syn, k, ack


def handshake_times(f) -> tuple[float | None, float | None, float | None]:
    return tuple(None if i is None else f.ts[i] for i in handshake_rows(f))


def handshake(c: Context) -> str:
    if None not in c.handshake:
        return "complete"
    if c.sides[0].syn or c.sides[1].syn:
        return "partial"
    return "none"


def fin_giveup(c: Context, s: int) -> dict | None:  # memoised as Context.giveup(s)
    """Linux drops an orphan whose FIN stays unacknowledged after tcp_orphan_retries
    retransmissions, one doubled timeout after the last one, without an RST."""
    side = c.sides[s]
    fin = side.fin
    if fin is None or len(fin.tx) < 2 or c.fin_ack_received_at(s) is not None:
        return None
    last = c.f.ts[fin.tx[-1]]
    gap = last - c.f.ts[fin.tx[-2]]
    silent_until = c.f.ts[side.rst[0]] if side.rst and c.f.ts[side.rst[0]] > last \
        else c.capture_end  # a later RST from a socket already gone (no socket: bare RST)
    if silent_until < last + 2 * gap * 1.1 + 0.05:
        return None  # the next retransmission could still have come
    return {"at": last + 2 * gap,
            "retries": orphan_retries_estimate([c.f.ts[i] for i in fin.tx])}


def backoff(c: Context, s: int) -> list[float]:
    """Seconds between successive transmissions of side s's FIN."""
    fin = c.sides[s].fin
    if fin is None:
        return []
    return [round(c.f.ts[b] - c.f.ts[a], 6) for a, b in pairwise(fin.tx)]


def has_tail_loss_probe(intervals: list[float]) -> bool:
    """Linux sends a tail-loss probe (RFC 8985) before the first RTO: then the first two
    intervals are about equal instead of doubling."""
    return len(intervals) >= 2 and 0.7 < intervals[1] / max(intervals[0], 1e-9) < 1.4


def rto_estimate(intervals: list[float]) -> float | None:
    """The first retransmission timeout of the series (after a tail-loss probe, if any)."""
    if not intervals:
        return None
    return intervals[1] if has_tail_loss_probe(intervals) else intervals[0]


def is_exponential(intervals: list[float]) -> bool | None:
    """Does each RTO double the previous one (RFC 6298 5.5), within 30%, up to 120 s?"""
    rtos = intervals[1:] if has_tail_loss_probe(intervals) else intervals
    if len(rtos) < 2:
        return None
    return bool(all(0.7 < b / min(2 * a, 120.0) < 1.3 for a, b in pairwise(rtos)))


def orphan_retries_estimate(tx: list[float]) -> int | None:
    """The tcp_orphan_retries N that fits a FIN series which ended in give-up.

    Linux gives up at the first retransmission timer that fires once the time since the
    first transmission reaches 200 ms * (2^(N+1) - 1) (retransmits_timed_out() with
    tcp_model_timeout()): a time budget, so a large RTT allows fewer retransmissions.
    The budget lies after the last transmission and no later than the next doubled timer.
    0 means 8 in the sysctl: an estimate of 8 cannot tell them apart.
    """
    if len(tx) < 2:
        return None
    last = tx[-1] - tx[0]
    giveup = last + 2 * (tx[-1] - tx[-2])
    for n in range(16):
        if last < 0.2 * (2 ** (n + 1) - 1) <= giveup * 1.05:
            return n
    return None


def rst_kind(c: Context) -> str | None:
    """The kind of the first RST of the connection (see vocab.RST_KINDS)."""
    f, sides = c.f, c.sides
    rsts = [(i, s) for s in (0, 1) for i in sides[s].rst]
    if not rsts:
        return None
    i, s = min(rsts)
    me, peer = sides[s], sides[1 - s]
    if s == 1 and not sides[1].syn and sides[0].syn and f.flags[sides[0].syn[0]] & ACK == 0:
        return "refused"
    if me.keepalives and me.keepalives[-1] < i and (
            not peer.keepalive_acks or peer.keepalive_acks[-1] < me.keepalives[-1]):
        return "keepalive_timeout"
    ttls = [ttl for d, fl, ttl in zip(f.d, f.flags, f.ttl) if d == s and not fl & RST]
    if len(ttls) >= 2 and ttls.count(ttls[0]) == len(ttls) and abs(f.ttl[i] - ttls[0]) > 1:
        return "other"
    if (me.fin is not None and me.fin.tx[0] < i) or not f.flags[i] & ACK:
        return "reply_to_closed"
    return "abort"


def fin_wait2_expiry(c: Context, s: int) -> float | None:
    """When side s's orphaned FIN_WAIT_2 expired (tcp_fin_timeout), if its RST shows it had.

    A FIN_WAIT_2 socket that still existed would accept the peer's FIN; a bare RST answering
    the peer's FIN, or answering anything after at least tcp_fin_timeout, means it was gone.
    """
    f, me = c.f, c.sides[s]
    if me.fin is None or not me.rst:
        return None
    acked = c.fin_ack_received_at(s)
    r = me.rst[0]
    if acked is None or acked[1] > r or f.flags[r] & ACK:
        return None
    trigger = [i for i in range(acked[1] + 1, r) if f.d[i] == 1 - s]
    if not trigger:
        return None
    t = f.ts[trigger[0]]
    if f.flags[trigger[0]] & FIN or t - acked[0] >= c.params.fin_timeout:
        return min(acked[0] + c.params.fin_timeout, t)
    return None


def time_wait(c: Context, ends) -> dict:
    """Which side held TIME_WAIT, from when to when (2MSL after its last ACK of the peer's FIN;
    each re-ACK of a retransmitted FIN restarts the timer, Linux tcp_timewait_state_process)."""
    f = c.f
    out = {"side": None, "start": None, "end": None, "restarts": 0, "reacks": [], "ends": {}}
    for s in (0, 1):
        ep = ends[s]
        if "TIME_WAIT" not in ep.states:
            continue
        start = ep.times[ep.states.index("TIME_WAIT")]
        peer_fin = c.sides[1 - s].fin
        later_tx = [f.ts[i] for i in peer_fin.tx if f.ts[i] > start]
        reacks = [i for i in peer_fin.acks
                  if f.ts[i] > start and any(t <= f.ts[i] for t in later_tx)]
        own_acks = [f.ts[i] for i in peer_fin.acks if f.ts[i] >= start]
        last = max(own_acks, default=start)
        out["reacks"] += [(f.ts[i], s, (f"2MSL restarts, TIME_WAIT now ends "
                           f"{2 * c.params.msl:.0f} s after this")) for i in reacks]
        out["restarts"] += len(reacks)
        end = out["ends"][s] = last + 2 * c.params.msl
        out["start"] = start if out["start"] is None else min(out["start"], start)
        out["end"] = end if out["end"] is None else max(out["end"], end)
    if out["ends"]:
        out["side"] = next(iter(out["ends"])) if len(out["ends"]) == 1 else 2
    return out


def keepalive_events(c: Context) -> list[tuple]:
    ev = []
    for s in (0, 1):
        ev += [(c.f.ts[i], s, "KEEPALIVE", f"seq {c.f.seq[i]}, {c.f.plen[i]} bytes")
               for i in c.sides[s].keepalives]
        ev += [(c.f.ts[i], s, "KEEPALIVE_ACK", "") for i in c.sides[s].keepalive_acks]
    return ev


def half_close_events(c: Context) -> list[tuple]:
    return [(c.f.ts[side.first_data_after_peer_fin], s, "DATA_AFTER_FIN",
             f"{side.after_peer_fin} bytes after the {SIDES[1 - s]} FIN in all")
            for s, side in enumerate(c.sides) if side.first_data_after_peer_fin is not None]


def closers(c: Context) -> tuple[int | None, int | None]:
    """(active, passive) sides; active 2 for a simultaneous close. A FIN that already
    acknowledges the peer's FIN was sent second (RFC 9293 3.6)."""
    f, sides = c.f, c.sides
    fins = [s for s in (0, 1) if sides[s].fin is not None]
    if not fins:
        return None, None
    if len(fins) == 1:
        return fins[0], 1 - fins[0]
    acks_peer = []
    for s in (0, 1):
        first_tx = sides[s].fin.tx[0]
        acks_peer.append(first_tx in sides[1 - s].fin.acks)
    if acks_peer[0] and not acks_peer[1]:
        return 1, 0
    if acks_peer[1] and not acks_peer[0]:
        return 0, 1
    if not acks_peer[0] and not acks_peer[1]:
        return 2, None
    first = min((0, 1), key=lambda s: f.ts[sides[s].fin.tx[0]])
    return first, 1 - first


def losses(c: Context) -> list[dict]:
    """Lost teardown segments by wave (numbered from the active closer) and position.

    For each retransmission of a FIN, what happened to the previous copy: an ACK of it seen
    before the retransmission was lost after the capture point (wave 2 or 4); an answer
    carrying a D-SACK (RFC 2883) proves the FIN had arrived, so the ACK was lost before
    the capture point; otherwise the FIN copy itself was lost after the capture point.
    A FIN whose IPv4 ID jumps over unseen IDs was preceded by copies lost before it.
    """
    active, passive = c.closing
    if active is None:
        return []
    if active == 2:
        order = [(0, 1), (1, 3)]  # simultaneous: both FINs are "first waves"; client counts 1
    else:
        order = [(active, 1), (passive, 3)]
    out = []
    for s, wave_fin in order:
        fin = c.sides[s].fin
        if fin is None:
            continue
        for wave, count, pos, t in _fin_losses(c, s):
            w = wave_fin if wave == "fin" else wave_fin + 1
            out.append({"wave": w, "count": count, "position": pos, "ts": t, "side": s if
                        wave == "fin" else 1 - s})
    return out


def _fin_losses(c: Context, s: int):
    f, fin = c.f, c.sides[s].fin
    tx = fin.tx
    found = []
    for k in range(1, len(tx)):
        prev_t, t = f.ts[tx[k - 1]], f.ts[tx[k]]
        acked_between = [i for i in fin.acks if prev_t <= f.ts[i] < t]
        nxt = f.ts[tx[k + 1]] if k + 1 < len(tx) else math.inf
        answer = [i for i in fin.acks if t <= f.ts[i] < nxt]
        if acked_between:
            found.append(("ack", "after_capture", f.ts[acked_between[0]]))
        elif answer and f.dsack[answer[0]]:
            found.append(("ack", "before_capture", prev_t))
        else:
            found.append(("fin", "after_capture", prev_t))
    if c.giveup(s) is not None:
        found.append(("fin", "after_capture", f.ts[tx[-1]]))
    gap = _ipid_gap(c, s)
    if gap:
        found += [("fin", "before_capture", f.ts[tx[0]])] * gap
    merged: dict[tuple, list] = {}
    for kind, pos, t in found:
        merged.setdefault((kind, pos), []).append(t)
    return [(kind, len(ts), pos, min(ts)) for (kind, pos), ts in merged.items()]


def _ipid_gap(c: Context, s: int) -> int:
    """Unseen IPv4 IDs just before the first FIN seen, when no data is missing in between:
    copies of the FIN lost before the capture point. Only trusted when the sender's earlier
    IDs rose by exactly one per segment (Linux counts IDs per socket; other stacks may not)."""
    f, fin = c.f, c.sides[s].fin
    i = fin.tx[0]
    if s in c.local or f.ipid[i] <= 0:
        return 0
    rows = [j for j in range(i) if f.d[j] == s]
    ids = [f.ipid[j] for j in rows]
    if len(ids) < 3 or any((b - a) % 65536 != 1 for a, b in pairwise(ids)):
        return 0
    j = rows[-1]
    if (f.seq[j] + f.plen[j]) % MOD != f.seq[i]:
        return 0
    gap = (f.ipid[i] - ids[-1] - 1) % 65536
    return gap if 0 < gap <= 16 else 0


def close_type(c: Context) -> str:
    """One of vocab.CLOSE_TYPES for this connection."""
    f, sides = c.f, c.sides
    has_synack = bool(sides[1].syn) and bool(f.flags[sides[1].syn[0]] & ACK)
    rsts = sorted(i for s in (0, 1) for i in sides[s].rst)
    fins = [sides[s].fin for s in (0, 1)]
    if sides[0].syn and not has_synack and not any(fins):
        return "refused" if sides[1].rst else "unanswered" if not sides[1].packets else "open"
    if rsts:
        first_fin = min((fin.tx[0] for fin in fins if fin), default=None)
        return "fin_then_reset" if first_fin is not None and first_fin < rsts[0] else "reset"
    if not any(fins):
        return "open"
    active, passive = c.closing
    if c.giveup(0) or c.giveup(1):
        return "abandoned"
    if all(fins):
        if not all(fin.acks for fin in fins):
            return "closing"
        if active == 2:
            return "simultaneous"
        pfin = fins[passive].tx[0]
        afin = fins[active]
        first_ack = afin.acks[0] if afin.acks else None
        return "three_way" if first_ack == pfin else "four_way"
    s = active
    return "half_closed" if fins[s].acks else "closing"


def connection_fields(c: Context, ends, rst: str | None, tw: dict, loss: list[dict],
                      vantage: str) -> dict:
    """The SPEC's teardown columns for one connection."""
    f, sides = c.f, c.sides
    giveups = [c.giveup(s) for s in (0, 1)]
    active, _ = c.closing
    backoffs = [backoff(c, 0), backoff(c, 1)]
    rst_sides = [s for s in (0, 1) if sides[s].rst]
    fins_ts = [f.ts[sides[s].fin.tx[0]] if sides[s].fin else None for s in (0, 1)]
    teardown_rows = [i for s in (0, 1) for i in sides[s].rst]
    for s in (0, 1):
        if sides[s].fin:
            teardown_rows += sides[s].fin.tx + sides[s].fin.acks
    start_td = min((f.ts[i] for i in teardown_rows), default=None)
    spent = [_time_in(ep, c.capture_end) for ep in ends]

    lost_waves = sorted({x["wave"] for x in loss})
    row = {
        "handshake": handshake(c),
        "vantage": vantage,
        "close_type": close_type(c),
        "active_closer": WHO[active],
        "client_state_end": ends[0].state,
        "server_state_end": ends[1].state,
        "client_fin_ts": fins_ts[0], "server_fin_ts": fins_ts[1],
        "client_fin_retransmits": len(sides[0].fin.tx) - 1 if sides[0].fin else 0,
        "server_fin_retransmits": len(sides[1].fin.tx) - 1 if sides[1].fin else 0,
        "client_fin_backoff": backoffs[0], "server_fin_backoff": backoffs[1],
        "fin_rto_estimate": rto_estimate(backoffs[active if active in (0, 1) else 0]),
        "fin_backoff_exponential": is_exponential(backoffs[active if active in (0, 1) else 0]),
        "orphan_retries_estimate": next((g["retries"] for g in giveups if g), None),
        "lost_waves": lost_waves,
        "losses": [{"wave": x["wave"], "count": x["count"], "position": x["position"]}
                   for x in sorted(loss, key=lambda x: (x["wave"], x["position"]))],
        "rst_by": WHO[rst_sides[0] if len(rst_sides) == 1 else 2 if rst_sides else None],
        "rst_kind": rst,
        "time_wait_side": WHO[tw["side"]],
        "time_wait_start": tw["start"], "time_wait_end": tw["end"],
        "time_wait_restarts": tw["restarts"],
        "half_close_bytes": max((sd.after_peer_fin for sd in sides), default=0),
        "close_wait_s": _longest(spent, "CLOSE_WAIT"),
        "fin_wait2_s": _longest(spent, "FIN_WAIT_2"),
        "fin_wait2_timeout": any(fin_wait2_expiry(c, s) is not None for s in (0, 1)),
        "client_keepalives": len(sides[0].keepalives),
        "server_keepalives": len(sides[1].keepalives),
        "unanswered_keepalives": _unanswered(sides[0], sides[1]) + _unanswered(sides[1], sides[0]),
        "teardown_s": (round(max(f.ts[i] for i in teardown_rows) - start_td, 6)
                       if teardown_rows else None),
        "packets": len(f),
        "client_bytes": sides[0].bytes, "server_bytes": sides[1].bytes,
        "client_last_data_ts": next((t for t, d, plen in zip(reversed(f.ts), reversed(f.d),
                                                              reversed(f.plen)) if d == 0 and plen), None),
    }
    return row


def _time_in(ep, end: float) -> dict[str, float]:
    """Seconds an endpoint spent in each state it was in (the last one until `end`)."""
    out: dict[str, float] = {}
    for k, st in enumerate(ep.states):
        until = ep.times[k + 1] if k + 1 < len(ep.times) else end
        out[st] = out.get(st, 0.0) + (until - ep.times[k])
    return out


def _longest(spent: list[dict], state: str) -> float | None:
    """The longer of both sides' time in `state`, None if neither was in it."""
    return _max_none(*(round(d[state], 6) if state in d else None for d in spent))


def _unanswered(prober, peer) -> int:
    """Keepalive probes sent after the peer's last answer."""
    last_answer = peer.keepalive_acks[-1] if peer.keepalive_acks else -1
    return sum(i > last_answer for i in prober.keepalives)


def _max_none(a, b):
    vals = [x for x in (a, b) if x is not None]
    return max(vals) if vals else None
