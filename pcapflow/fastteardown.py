"""teardown.reconstruct compiled with numba, for the connections it can vouch for.

Most connections of a big capture close cleanly (one SYN, one SYN-ACK, the ACK, one FIN from
each side, each acknowledged; no RST, retransmitted FIN or data after a FIN; keepalives
answered or not, but no RST after them), are
half-closed (one such FIN: the peer in CLOSE_WAIT), still open at the capture's end or reset
(no FIN at all), or are attempts refused or left unanswered (`_attempt`); the same without a
handshake when the capture began mid-connection. For those the kernel runs
reconstruct's steps (the automaton inputs and their order, tcpstate.TRANSITIONS as a table,
TIME_WAIT, the events, the teardown columns) over the flow columns of all connections at
once; `vantages` decides every connection's vantage as analysis._with_vantages does. Every
other connection is left to the Python reference; tests/test_fast.py compares the whole
analysis both ways on every capture we have.
"""
from __future__ import annotations

from collections.abc import Mapping

import numba
import numpy as np
import pandas as pd

from . import tcpstate, vocab
from .capture import Growing, factorize_pair
from .http import http_columns
from .seq import ACK, FIN, HALF, MOD, RST, SYN
from .tcpstate import Endpoint
from .vantage import INITIAL_TTLS, RATIO

STATES = ["CLOSED", *(s for s in vocab.STATES if s != "CLOSED")]  # code 0: where a client starts
INPUTS = [tcpstate.SEND_SYN, tcpstate.RECV_SYN, tcpstate.RECV_SYNACK, tcpstate.RECV_ACK_OF_SYN,
          tcpstate.SEND_FIN, tcpstate.RECV_FIN, tcpstate.RECV_ACK_OF_FIN, tcpstate.TIMEWAIT_EXPIRED,
          tcpstate.SEND_RST, tcpstate.RECV_RST]
(SEND_SYN, RECV_SYN, RECV_SYNACK, RECV_ACK_OF_SYN, SEND_FIN, RECV_FIN, RECV_ACK_OF_FIN,
 TIMEWAIT_EXPIRED, SEND_RST, RECV_RST) = range(len(INPUTS))
# tcpstate's table and vantage's constants go to the kernels as arguments, never as globals:
# numba's cache would keep globals of other modules frozen when those modules change
TRANSITIONS = np.full((len(STATES), len(INPUTS)), -1, dtype=np.int64)  # -1: no move
for (_state, _input), _new in tcpstate.TRANSITIONS.items():
    if _input in INPUTS:
        TRANSITIONS[STATES.index(_state), INPUTS.index(_input)] = STATES.index(_new)
LISTEN, ESTABLISHED, TIME_WAIT, CLOSE_WAIT, FIN_WAIT_2 = (STATES.index(s) for s in (
    "LISTEN", "ESTABLISHED", "TIME_WAIT", "CLOSE_WAIT", "FIN_WAIT_2"))
KINDS = ["SYN", "SYN_ACK", "ESTABLISHED", "FIN", "STATE", "ACK_OF_FIN", "RST", "KEEPALIVE", "KEEPALIVE_ACK"]
K_SYN, K_SYN_ACK, K_ESTABLISHED, K_FIN, K_STATE, K_ACK_OF_FIN, K_RST, K_KEEPALIVE, K_KEEPALIVE_ACK = range(
    len(KINDS))
RST_KINDS = [None, "refused", "other", "reply_to_closed", "abort"]  # detectors.rst_kind
R_REFUSED, R_OTHER, R_REPLY_TO_CLOSED, R_ABORT = range(1, 5)
DETAILS = ["", "with data", "received client FIN", "received server FIN",
           "server ACK of FIN received", "client ACK of FIN received", "2MSL expired",
           "client RST received", "server RST received", *RST_KINDS[1:]]
D_CLIENT_RST, D_SERVER_RST = 7, 8
D_RST = DETAILS.index("refused") - 1  # + an RST_KINDS code
# texts with a value: "ack <value>", "retransmission <value>", a keepalive's (value: seq * 2 + length)
VALUED = ["ack {}", "retransmission {}", "seq {}, {} bytes"]
D_ACK, D_RETRANSMISSION, D_KEEPALIVE = range(len(DETAILS), len(DETAILS) + len(VALUED))
VANTAGES = ["client", "server", "middle", "both", "unknown"]
UNDECIDED = len(VANTAGES)  # the same hosts' votes decide
LOCAL = np.array([[1, 0], [0, 1], [0, 0], [1, 1], [0, 0]], dtype=np.bool_)  # vt.local_sides
TTLS = np.array(sorted(INITIAL_TTLS), dtype=np.int64)
CLOSE_TYPES = ["three_way", "four_way", "simultaneous", "open", "refused", "unanswered", "reset",
               "half_closed"]
HANDSHAKES = ["complete", "partial", "none"]
WHO = ["client", "server", "both", "none"]
MAX_EVENTS = 64  # a clean close makes at most 14 (4 handshake, 3 per FIN, 2 TIME_WAIT ends); keepalives
MAX_HISTORY = 8  # states per endpoint; a connection that needs more goes to Python
# per-connection floats (NaN: None)
(N_FIN_TS0, N_FIN_TS1, N_TW_START, N_TW_END, N_CLOSE_WAIT0, N_CLOSE_WAIT1, N_FIN_WAIT2_0,
 N_FIN_WAIT2_1, N_TEARDOWN, N_LAST_DATA) = range(10)
# per-connection integers
(I_OK, I_CLOSE, I_ACTIVE, I_TW_SIDE, I_BYTES0, I_BYTES1, I_NEVENTS, I_STATE0, I_STATE1,
 I_NHIST0, I_NHIST1, I_HANDSHAKE, I_RST_BY, I_RST_KIND, I_KEEPALIVES0, I_KEEPALIVES1,
 I_UNANSWERED) = range(17)
# per-event fields (ev_i; the time is ev_t)
E_SIDE, E_KIND, E_FROM, E_TO, E_DETAIL, E_VALUE = range(6)


@numba.njit(cache=True, inline="always")
def _after(a, b):
    return 0 < (a - b) % MOD < HALF


@numba.njit(cache=True, inline="always")
def _handle(moves, ints, times, states, s, event, t):
    """tcpstate.Endpoint.handle: returns the old state, -1 if nothing moved (-2: no room)."""
    old = ints[I_STATE0 + s]
    new = moves[old, event]
    if new < 0 or new == old:
        return -1
    k = ints[I_NHIST0 + s]
    if k == times.shape[1]:
        return -2
    ints[I_STATE0 + s] = new
    times[s, k] = t
    states[s, k] = new
    ints[I_NHIST0 + s] = k + 1
    return old


@numba.njit(cache=True, inline="always")
def _state_at(ints, times, states, s, t):
    """tcpstate.Endpoint.state_at as a code, -1 for None."""
    i = 0
    while i < ints[I_NHIST0 + s] and times[s, i] <= t:
        i += 1
    return states[s, i - 1] if i else -1


@numba.njit(cache=True, inline="always")
def _event(ints, ev_t, ev_i, t, s, kind, a, b, detail, value):
    k = ints[I_NEVENTS]
    ev_t[k] = t
    ev_i[k, E_SIDE] = s
    ev_i[k, E_KIND] = kind
    ev_i[k, E_FROM] = a
    ev_i[k, E_TO] = b
    ev_i[k, E_DETAIL] = detail
    ev_i[k, E_VALUE] = value
    ints[I_NEVENTS] = k + 1


@numba.njit(cache=True, inline="always")
def _ack_of_synack(k, hi, d, flags, seq, ack):
    """The first client segment from row k on (the SYN-ACK) that acknowledges it, -1 if none:
    any pure ACK at or beyond its ISN + 1 proves it arrived (detectors.handshake_rows)."""
    for i in range(k, hi):
        if d[i] == 0 and flags[i] & (SYN | RST | ACK) == ACK and (ack[i] - seq[k] - 1) % MOD < HALF:
            return i
    return -1


@numba.njit(cache=True, inline="always")
def _time_in(times, states, n, s, state, end):
    """detectors._time_in(ep, end)[state], NaN when the endpoint never was in it."""
    total = np.nan
    for k in range(n):
        if states[s, k] == state:
            until = times[s, k + 1] if k + 1 < n else end
            total = (0.0 if np.isnan(total) else total) + (until - times[s, k])
    return total


@numba.njit(cache=True)
def _run(moves, in_t, in_i, m, ints, times, states, ev_t, ev_i):
    """reconstruct's loop over its automaton inputs (time, order, side, input, kind, detail),
    sorted by (time, order) as Python's stable sort does; False if a history overflowed."""
    for a in range(1, m):  # stable insertion sort by (time, order)
        b = a
        while b > 0 and (in_t[b - 1] > in_t[b] or in_t[b - 1] == in_t[b] and in_i[b - 1, 0] > in_i[b, 0]):
            in_t[b - 1], in_t[b] = in_t[b], in_t[b - 1]
            for c in range(5):
                in_i[b - 1, c], in_i[b, c] = in_i[b, c], in_i[b - 1, c]
            b -= 1
    for a in range(m):
        s, event, kind = in_i[a, 1], in_i[a, 2], in_i[a, 3]
        old = _handle(moves, ints, times, states, s, event, in_t[a])
        if old == -2:
            return False
        if old < 0 and kind == K_STATE:
            continue
        cur = ints[I_STATE0 + s]
        _event(ints, ev_t, ev_i, in_t[a], s, kind, old if old >= 0 else cur, cur, in_i[a, 4], 0)
    return True


@numba.njit(cache=True)
def _sort_events(ints, ev_t, ev_i):
    """rows.sort(key=time): stable."""
    for a in range(1, ints[I_NEVENTS]):
        b = a
        while b > 0 and ev_t[b - 1] > ev_t[b]:
            ev_t[b - 1], ev_t[b] = ev_t[b], ev_t[b - 1]
            for c in range(6):
                ev_i[b - 1, c], ev_i[b, c] = ev_i[b, c], ev_i[b - 1, c]
            b -= 1


@numba.njit(cache=True)
def _attempt(moves, lo, hi, ts, d, flags, plen, ev_t, ev_i, times, states, num, ints):
    """A connection attempt: SYNs from the client (the same ISN: one incarnation) and
    nothing from the server but RSTs (refused) or nothing at all (unanswered)."""
    rst0, rst_last = -1, -1
    for i in range(lo, hi):
        fl = flags[i]
        if plen[i]:
            return
        if d[i] == 0:
            if fl & (SYN | ACK | RST | FIN) != SYN:
                return
        else:
            if not fl & RST or fl & (SYN | FIN):
                return
            rst0 = i if rst0 < 0 else rst0
            rst_last = i
    syn0 = -1  # the client's first packet: its first SYN
    for i in range(lo, hi):
        if d[i] == 0:
            syn0 = i
            break
    if syn0 < 0:
        return
    in_t = np.empty(3, np.float64)
    in_i = np.empty((3, 5), np.int64)
    in_t[0] = ts[syn0]
    in_i[0, 0], in_i[0, 1], in_i[0, 2], in_i[0, 3], in_i[0, 4] = 1, 0, SEND_SYN, K_SYN, 0
    m = 1
    if rst0 >= 0:
        in_t[1] = ts[rst0]
        in_i[1, 0], in_i[1, 1], in_i[1, 2], in_i[1, 3], in_i[1, 4] = 1, 1, SEND_RST, K_RST, D_RST + R_REFUSED
        in_t[2] = ts[rst0]
        in_i[2, 0], in_i[2, 1], in_i[2, 2], in_i[2, 3], in_i[2, 4] = 3, 0, RECV_RST, K_STATE, D_SERVER_RST
        m = 3
    if not _run(moves, in_t, in_i, m, ints, times, states, ev_t, ev_i):
        return
    n = 0
    for i in range(lo, hi):  # SYN retransmissions: events that move no state
        if d[i] == 0:
            if n:
                if ints[I_NEVENTS] == ev_t.shape[0]:
                    return
                st = _state_at(ints, times, states, 0, ts[i])
                _event(ints, ev_t, ev_i, ts[i], 0, K_SYN, st, st, D_RETRANSMISSION, n)
            n += 1
    _sort_events(ints, ev_t, ev_i)
    ints[I_HANDSHAKE] = 1  # partial
    ints[I_CLOSE] = 4 if rst0 >= 0 else 5
    ints[I_ACTIVE] = 3
    ints[I_TW_SIDE] = 3
    ints[I_RST_BY] = 1 if rst0 >= 0 else 3
    ints[I_RST_KIND] = R_REFUSED if rst0 >= 0 else 0
    if rst0 >= 0:
        num[N_TEARDOWN] = ts[rst_last] - ts[rst0]
    ints[I_OK] = 1


@numba.njit(cache=True)
def _one(moves, lo, hi, ts, d, flags, seq, ack, plen, win, ttl, ipid, v, capture_end, two_msl,
         ev_t, ev_i, times, states, num, ints):
    """Connection rows lo..hi (time order), seen from vantage v: its outputs; ints[I_OK]
    stays 0 if the kernel cannot vouch for it."""
    syn = synack = False  # SYNs without the server's SYN-ACK: given up below, before allocating
    for i in range(lo, hi):
        if flags[i] & SYN:
            syn = True
            if d[i] == 1 and flags[i] & ACK:
                synack = True
                break
    if syn and not synack:
        return
    mid = not syn  # the capture began mid-connection: no handshake to replay
    # teardown.collect, giving up at anything but clean FINs (one or two), or no FIN (open, reset)
    nsyn = np.zeros(2, np.int64)
    syn_row = np.full(2, -1, np.int64)
    fin_row = np.full(2, -1, np.int64)
    fin_seq = np.zeros(2, np.int64)
    ack_first = np.full(2, -1, np.int64)  # first and last rows acknowledging side s's FIN
    ack_last = np.full(2, -1, np.int64)
    fin_acks_peer = np.zeros(2, np.bool_)  # side s's FIN acknowledges the peer's FIN
    snd_end = np.full(2, -1, np.int64)
    last_win = np.full(2, -1, np.int64)
    rst_first = np.full(2, -1, np.int64)
    rst_last = np.full(2, -1, np.int64)
    ttl_first = np.full(2, -1, np.int64)  # TTL of each side's first segment other than an RST
    ttl_count = np.zeros(2, np.int64)
    ttl_same = np.ones(2, np.bool_)  # ... and whether all its others had it too
    ka_last = np.full(2, -1, np.int64)  # each side's last keepalive, and last answer to the peer's
    kack_last = np.full(2, -1, np.int64)
    marks = np.zeros(0, np.int8)  # per row: 1 a keepalive, 2 an answer to one (made when needed)
    last_data0 = -1
    for i in range(lo, hi):
        s = d[i]
        p = 1 - s
        fl = flags[i]
        n = plen[i]
        ints[I_BYTES0 + s] += n
        if fl & FIN and fl & (SYN | RST):
            return
        if fl & RST:
            rst_first[s] = i if rst_first[s] < 0 else rst_first[s]
            rst_last[s] = i
        else:
            ttl_first[s] = ttl[i] if ttl_count[s] == 0 else ttl_first[s]
            ttl_same[s] &= ttl[i] == ttl_first[s]
            ttl_count[s] += 1
        if fl & SYN:
            nsyn[s] += 1
            syn_row[s] = i
        end = (seq[i] + n + (1 if fl & (SYN | FIN) else 0)) % MOD
        if (not fl & (SYN | FIN | RST) and n <= 1 and snd_end[s] >= 0
                and (seq[i] + 1) % MOD == snd_end[s] and last_win[p] != 0
                and (n == 0 or ts[i] - ts[max(i - 1, lo)] > 1.0)):
            if not len(marks):  # seq = snd.una - 1: RFC 9293 3.8.4, Linux tcp_write_wakeup
                marks = np.zeros(hi - lo, np.int8)
            marks[i - lo] = 1
            ints[I_KEEPALIVES0 + s] += 1
            ka_last[s] = i
        elif (ka_last[p] >= 0 and not fl & (SYN | FIN | RST) and n == 0 and snd_end[p] >= 0
              and ack[i] == snd_end[p] and kack_last[s] < ka_last[p]):
            marks[i - lo] = 2
            kack_last[s] = i
        if fl & FIN:
            if fin_row[s] >= 0:
                return  # a retransmitted FIN
            fin_row[s] = i
            fin_seq[s] = (seq[i] + n) % MOD
        if n and fin_row[p] >= 0 and (snd_end[s] < 0 or _after((seq[i] + n) % MOD, snd_end[s])):
            return  # data after the peer's FIN: a half-close
        if fl & ACK and fin_row[p] >= 0 and (ack[i] - (fin_seq[p] + 1) % MOD) % MOD < HALF:
            if ack_first[p] < 0:
                ack_first[p] = i
            ack_last[p] = i
            if i == fin_row[s]:
                fin_acks_peer[s] = True
        if not fl & RST and (snd_end[s] < 0 or _after(end, snd_end[s])):
            snd_end[s] = end
        last_win[s] = win[i]
        if s == 0 and n:
            last_data0 = i
    if not mid and (nsyn[0] != 1 or nsyn[1] != 1 or flags[syn_row[0]] & ACK or not flags[syn_row[1]] & ACK):
        return
    closed = fin_row[0] >= 0 and fin_row[1] >= 0
    half = not closed and (fin_row[0] >= 0 or fin_row[1] >= 0)  # one FIN: half-closed
    reset = rst_first[0] >= 0 or rst_first[1] >= 0  # (no FIN at all: open, or reset)
    if not mid and syn_row[0] > syn_row[1]:
        return
    for s in range(2):  # each FIN acknowledged, and no RST with a FIN
        if fin_row[s] >= 0 and (reset or ack_first[s] < 0):
            return
    k = syn_row[1]  # detectors.handshake_rows: the SYN, the SYN-ACK, the client's ACK of it
    est = -1 if mid else _ack_of_synack(k, hi, d, flags, seq, ack)
    if not mid and est < 0:
        return
    local0, local1 = LOCAL[v, 0], LOCAL[v, 1]
    for s in range(2):  # detectors._ipid_gap: FIN copies lost before the capture point
        tx = fin_row[s]
        if tx < 0 or LOCAL[v, s] or ipid[tx] <= 0:
            continue
        count, prev, last, steady = 0, -1, -1, True
        for j in range(lo, tx):
            if d[j] == s:
                if count and (ipid[j] - prev) % 65536 != 1:
                    steady = False
                    break
                count, prev, last = count + 1, ipid[j], j
        if steady and count >= 3 and (seq[last] + plen[last]) % MOD == seq[tx] \
                and 0 < (ipid[tx] - prev - 1) % 65536 <= 16:
            return
    # reconstruct's automaton inputs, in its order: (time, order, side, input, kind, detail)
    in_t = np.empty(10, np.float64)
    in_i = np.empty((10, 5), np.int64)
    m = 0
    if not mid:  # the handshake
        for t, order, s, event, kind, detail in (
                (ts[syn_row[0]], 1, 0, SEND_SYN, K_SYN, 0),
                (ts[k], 1, 1, RECV_SYN, K_SYN_ACK, 0),
                (ts[k] if local0 else ts[est], 1 if local0 else 0, 0, RECV_SYNACK, K_ESTABLISHED, 0),
                (ts[est], 1, 1, RECV_ACK_OF_SYN, K_ESTABLISHED, 0)):
            in_t[m] = t
            in_i[m, 0], in_i[m, 1], in_i[m, 2], in_i[m, 3], in_i[m, 4] = order, s, event, kind, detail
            m += 1
    for s in range(2):
        if fin_row[s] < 0:
            continue
        tx = fin_row[s]
        in_t[m] = ts[tx]
        in_i[m, 0], in_i[m, 1], in_i[m, 2], in_i[m, 3], in_i[m, 4] = 1, s, SEND_FIN, K_FIN, 1 if plen[tx] else 0
        m += 1
        receiver_local = local1 if s == 0 else local0
        if receiver_local:  # Context.fin_received_at
            got = ts[tx]
        else:
            got = ts[ack_first[s]]
            for i in range(tx + 1, ack_first[s]):
                if d[i] == s:
                    got = ts[i]
                    break
        in_t[m] = got
        in_i[m, 0], in_i[m, 1], in_i[m, 2], in_i[m, 3], in_i[m, 4] = (
            2 if receiver_local else 0, 1 - s, RECV_FIN, K_STATE, 2 + s)
        m += 1
        in_t[m] = ts[ack_first[s]]  # Context.fin_ack_received_at: the first ACK (one FIN copy)
        in_i[m, 0], in_i[m, 1], in_i[m, 2], in_i[m, 3], in_i[m, 4] = 1, s, RECV_ACK_OF_FIN, K_STATE, 4 + s
        m += 1
    if reset:  # detectors.rst_kind of the first RST, then each side's first RST sent and received
        r = rst_first[0] if rst_first[1] < 0 or 0 <= rst_first[0] < rst_first[1] else rst_first[1]
        s = d[r]
        if 0 <= ka_last[s] < r and kack_last[1 - s] < ka_last[s]:
            return  # keepalive_timeout: in Python
        if ttl_count[s] >= 2 and ttl_same[s] and abs(ttl[r] - ttl_first[s]) > 1:
            kind = R_OTHER
        elif not flags[r] & ACK:
            kind = R_REPLY_TO_CLOSED
        else:
            kind = R_ABORT
        ints[I_RST_KIND] = kind
        for s in range(2):
            if rst_first[s] >= 0:
                in_t[m] = ts[rst_first[s]]
                in_i[m, 0], in_i[m, 1], in_i[m, 2], in_i[m, 3], in_i[m, 4] = 1, s, SEND_RST, K_RST, D_RST + kind
                in_t[m + 1] = ts[rst_first[s]]
                in_i[m + 1, 0], in_i[m + 1, 1], in_i[m + 1, 2], in_i[m + 1, 3], in_i[m + 1, 4] = (
                    3, 1 - s, RECV_RST, K_STATE, D_CLIENT_RST + s)
                m += 2
    # the automaton: the client starts CLOSED, the server LISTEN at the first packet; both
    # ESTABLISHED there if the capture began mid-connection
    for s in range(2):
        if s == 1 or mid:
            times[s, 0] = ts[lo]
            states[s, 0] = ints[I_STATE0 + s] = ESTABLISHED if mid else LISTEN
            ints[I_NHIST0 + s] = 1
    ints[I_HANDSHAKE] = 2 if mid else 0
    if not _run(moves, in_t, in_i, m, ints, times, states, ev_t, ev_i):
        return
    # detectors.time_wait
    tw_side = -1
    tw_end = np.full(2, np.nan)
    for s in range(2):
        start = np.nan
        for j in range(ints[I_NHIST0 + s]):
            if states[s, j] == TIME_WAIT:
                start = times[s, j]
                break
        if np.isnan(start):
            continue
        if ts[fin_row[1 - s]] > start:
            return  # a FIN copy after TIME_WAIT began: re-ACKs restart it, in Python
        last = max(ts[ack_last[1 - s]], start)
        tw_end[s] = last + two_msl
        num[N_TW_START] = start if np.isnan(num[N_TW_START]) else min(num[N_TW_START], start)
        num[N_TW_END] = tw_end[s] if np.isnan(num[N_TW_END]) else max(num[N_TW_END], tw_end[s])
        tw_side = s if tw_side < 0 else 2
    ints[I_TW_SIDE] = tw_side if tw_side >= 0 else 3
    for s in range(2):
        if not np.isnan(tw_end[s]) and tw_end[s] <= capture_end:
            old = _handle(moves, ints, times, states, s, TIMEWAIT_EXPIRED, tw_end[s])
            if old == -2:
                return
            if old >= 0:
                _event(ints, ev_t, ev_i, tw_end[s], s, K_STATE, old, ints[I_STATE0 + s], 6, 0)
    for s in range(2):  # the peer's ACK of each FIN
        if fin_row[s] < 0:
            continue
        i = ack_first[s]
        st = _state_at(ints, times, states, 1 - s, ts[i])
        _event(ints, ev_t, ev_i, ts[i], 1 - s, K_ACK_OF_FIN, st, st, D_ACK, ack[i])
    for s in range(2 if len(marks) else 0):  # detectors.keepalive_events, and _unanswered
        for mark in (1, 2):
            for i in range(lo, hi):
                if d[i] == s and marks[i - lo] == mark:
                    if ints[I_NEVENTS] == ev_t.shape[0]:
                        return
                    st = _state_at(ints, times, states, s, ts[i])
                    if mark == 1:
                        _event(ints, ev_t, ev_i, ts[i], s, K_KEEPALIVE, st, st, D_KEEPALIVE, seq[i] * 2 + plen[i])
                        ints[I_UNANSWERED] += i > kack_last[1 - s]
                    else:
                        _event(ints, ev_t, ev_i, ts[i], s, K_KEEPALIVE_ACK, st, st, 0, 0)
    _sort_events(ints, ev_t, ev_i)
    # detectors.connection_fields
    if reset:
        ints[I_RST_BY] = 2 if rst_first[0] >= 0 and rst_first[1] >= 0 else 0 if rst_first[0] >= 0 else 1
        first_rst = min(rst_first[0] if rst_first[0] >= 0 else hi, rst_first[1] if rst_first[1] >= 0 else hi)
        num[N_TEARDOWN] = ts[max(rst_last[0], rst_last[1])] - ts[first_rst]
    if half:
        active = 0 if fin_row[0] >= 0 else 1
        passive = 1 - active
    elif not closed:
        active = 3
    elif fin_acks_peer[0] and not fin_acks_peer[1]:
        active, passive = 1, 0
    elif fin_acks_peer[1] and not fin_acks_peer[0]:
        active, passive = 0, 1
    elif not fin_acks_peer[0] and not fin_acks_peer[1]:
        active, passive = 2, -1
    else:
        active = 1 if ts[fin_row[1]] < ts[fin_row[0]] else 0
        passive = 1 - active
    ints[I_ACTIVE] = active
    if active == 3:
        ints[I_CLOSE] = 6 if reset else 3
    elif active == 2:
        ints[I_CLOSE] = 2
    elif half:
        ints[I_CLOSE] = 7
    else:
        ints[I_CLOSE] = 0 if ack_first[active] == fin_row[passive] else 1
    for s in range(2):
        num[N_CLOSE_WAIT0 + s] = _time_in(times, states, ints[I_NHIST0 + s], s, CLOSE_WAIT, capture_end)
        num[N_FIN_WAIT2_0 + s] = _time_in(times, states, ints[I_NHIST0 + s], s, FIN_WAIT_2, capture_end)
    if closed or half:
        first_td, last_td = np.inf, -np.inf
        for s in range(2):
            if fin_row[s] >= 0:
                num[N_FIN_TS0 + s] = ts[fin_row[s]]
                first_td = min(first_td, ts[fin_row[s]])
                last_td = max(last_td, ts[fin_row[s]], ts[ack_last[s]])
        num[N_TEARDOWN] = last_td - first_td
    if last_data0 >= 0:
        num[N_LAST_DATA] = ts[last_data0]
    ints[I_OK] = 1


@numba.njit(cache=True)
def _reconstruct(moves, starts, ends, ts, d, flags, seq, ack, plen, win, ttl, ipid, vantage, capture_end,
                 two_msl, ev_t, ev_i, slots, times, states, num, ints):
    """Each connection's events go right after the previous one's (`slots` of room each):
    returns how many there are."""
    at = 0
    for c in range(len(starts)):
        et, ei = ev_t[at:at + slots], ev_i[at:at + slots]
        _one(moves, starts[c], ends[c], ts, d, flags, seq, ack, plen, win, ttl, ipid, vantage[c], capture_end,
             two_msl, et, ei, times[c], states[c], num[c], ints[c])
        if not ints[c, I_OK]:
            _clear(ints[c], times[c], states[c], num[c])
            _attempt(moves, starts[c], ends[c], ts, d, flags, plen, et, ei, times[c], states[c], num[c], ints[c])
        if ints[c, I_OK]:
            at += ints[c, I_NEVENTS]
        else:
            ints[c, I_NEVENTS] = 0
    return at


@numba.njit(cache=True)
def _clear(ints, times, states, num):
    ints[:] = 0
    times[:] = 0
    states[:] = 0
    num[:] = np.nan


CHUNK = 1 << 13  # connections per kernel call, its event buffers reused: ~30 MB


def reconstruct_clean(cols: dict[str, np.ndarray], starts: np.ndarray, ends: np.ndarray,
                      vantage: np.ndarray, capture_end: float, msl: float):
    """Run the kernel over every connection (rows starts[k]..ends[k] of `cols`, the Flow
    columns in (connection, time) order; `vantage`: VANTAGES codes). Returns, for the
    connections it did: their indices, their `ints` and `num` rows, their events (`ev_t`,
    `ev_i`: connection after connection) and their state histories (`times`, `states`:
    client then server, connection after connection; lengths in ints[:, I_NHIST0:I_NHIST1 + 1])."""
    n = len(starts)
    size = min(n, CHUNK)
    # written in place, every connection's row: fresh memory is slow to come by in a big process
    num = np.full((n, 10), np.nan)
    ints = np.zeros((n, I_UNANSWERED + 1), dtype=np.int64)
    ints[:, I_RST_BY] = 3  # none
    ev_t, ev_i = np.empty(size * MAX_EVENTS), np.empty((size * MAX_EVENTS, 6), dtype=np.int64)
    times = np.zeros((size, 2, MAX_HISTORY))
    states = np.zeros((size, 2, MAX_HISTORY), dtype=np.int64)
    events = Growing(np.float64), Growing(np.int64, 6)  # E_VALUE holds ack numbers: 32 bits unsigned
    history = Growing(np.float64), Growing(np.int64)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        at = _reconstruct(TRANSITIONS, starts[lo:hi], ends[lo:hi], cols["ts"], cols["d"], cols["flags"],
                          cols["seq"], cols["ack"], cols["plen"], cols["win"], cols["ttl"], cols["ipid"],
                          vantage[lo:hi], capture_end, 2 * msl, ev_t, ev_i, MAX_EVENTS, times, states,
                          num[lo:hi], ints[lo:hi])
        events[0].add(ev_t[:at])
        events[1].add(ev_i[:at])
        ok = ints[lo:hi, I_OK].astype(bool)
        held = np.arange(MAX_HISTORY) < ints[lo:hi][ok][:, [I_NHIST0, I_NHIST1], None]
        history[0].add(times[:hi - lo][ok][held])
        history[1].add(states[:hi - lo][ok][held])
    ok = np.flatnonzero(ints[:, I_OK])
    return (ok, ints[ok], num[ok], *(g.array() for g in events), *(g.array() for g in history))


def clean_connections(flows, ids: list[int], vantage: np.ndarray, capture_end: float, msl: float):
    """The kernel's connections as analysis.build holds them: their conn_ids, their
    connection-table columns and events (arrays as pd.DataFrame takes them) and their
    (client, server) Endpoints. `flows`: analysis._Flows; `ids`: its conn_ids in its order;
    `vantage`: see `vantages`."""
    ok, i, x, ev_t, ev_i, times, states = reconstruct_clean(
        flows.cols, flows.starts, flows.ends, vantage, capture_end, msl)
    cid = np.asarray(ids, dtype=np.int64)[ok]
    ts, i, x, n = flows.cols["ts"], i.T, x.T, len(ok)

    def floats(col):  # pd.DataFrame makes a float64 column of floats and None, but keeps all None
        return col if not np.isnan(col).all() else np.full(n, None, dtype=object)

    def rounded(col):  # round(x, 6) as Python rounds: numpy's where x * 1e6 is clearly off a half
        scaled = col * 1e6
        out = np.round(scaled) / 1e6  # the double nearest m / 10**6, as Python's round gives
        redo = np.flatnonzero((np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3) | (np.abs(scaled) >= 2.0**52))
        out[redo] = [round(v, 6) for v in col[redo].tolist()]
        return floats(out)

    def longest(a, b):  # detectors._longest of two rounded durations (NaN: None)
        return rounded(np.fmax(a, b))

    none, zero, false = np.full(n, None, dtype=object), np.zeros(n, np.int64), np.zeros(n, np.bool_)
    empty = np.empty(n, dtype=object)
    empty[:] = [[]] * n  # one empty list shared by the cells (none of them is ever appended to)
    http = http_columns(flows.cols["d"], flows.cols["http"], flows.cols["plen"], flows.starts)
    table = {
        "conn_id": cid, "first_ts": ts[flows.starts[ok]], "last_ts": ts[flows.ends[ok] - 1],
        "handshake": _texts(HANDSHAKES, i[I_HANDSHAKE]), "vantage": _texts(VANTAGES, vantage[ok]),
        "close_type": _texts(CLOSE_TYPES, i[I_CLOSE]), "active_closer": _texts(WHO, i[I_ACTIVE]),
        "client_state_end": _texts(STATES, i[I_STATE0]), "server_state_end": _texts(STATES, i[I_STATE1]),
        "client_fin_ts": floats(x[N_FIN_TS0]), "server_fin_ts": floats(x[N_FIN_TS1]),
        "client_fin_retransmits": zero, "server_fin_retransmits": zero,
        "client_fin_backoff": empty, "server_fin_backoff": empty,
        "fin_rto_estimate": none, "fin_backoff_exponential": none,
        "orphan_retries_estimate": none, "lost_waves": empty, "losses": empty,
        "rst_by": _texts(WHO, i[I_RST_BY]), "rst_kind": _texts(RST_KINDS, i[I_RST_KIND]),
        "time_wait_side": _texts(WHO, i[I_TW_SIDE]),
        "time_wait_start": floats(x[N_TW_START]), "time_wait_end": floats(x[N_TW_END]),
        "time_wait_restarts": zero, "half_close_bytes": zero,
        "close_wait_s": longest(x[N_CLOSE_WAIT0], x[N_CLOSE_WAIT1]),
        "fin_wait2_s": longest(x[N_FIN_WAIT2_0], x[N_FIN_WAIT2_1]),
        "fin_wait2_timeout": false, "client_keepalives": i[I_KEEPALIVES0],
        "server_keepalives": i[I_KEEPALIVES1], "unanswered_keepalives": i[I_UNANSWERED],
        "teardown_s": rounded(x[N_TEARDOWN]),
        "packets": flows.ends[ok] - flows.starts[ok],
        "client_bytes": i[I_BYTES0], "server_bytes": i[I_BYTES1],
        "client_last_data_ts": floats(x[N_LAST_DATA]),
        **{name: col[ok] for name, col in http.items()},
    }
    owner = np.repeat(cid, i[I_NEVENTS])
    order = np.lexsort((owner, ev_t))  # the events table's order (analysis.build), on numbers
    owner, ev_t, ev_i = owner[order], ev_t[order], ev_i[order]
    c = ev_i[:, E_DETAIL]  # the texts with a value ("ack 1234") made once each
    detail, distinct = pd.factorize(np.where(c >= D_ACK, (c << 33) | ev_i[:, E_VALUE], c))
    text = DETAILS + VALUED
    names = STATES + [""]  # code -1: no state
    events = {"conn_id": owner, "ts": ev_t,
              "side": _texts(["client", "server"], ev_i[:, E_SIDE]), "kind": _texts(KINDS, ev_i[:, E_KIND]),
              "state_from": _texts(names, ev_i[:, E_FROM]), "state_to": _texts(names, ev_i[:, E_TO]),
              "detail": _texts([text[k] if k < D_ACK else text[k >> 33].format(
                                  *(divmod(k & (1 << 33) - 1, 2) if k >> 33 == D_KEEPALIVE else (k & (1 << 33) - 1,)))
                               for k in distinct.tolist()], detail)}
    return table, events, Histories(cid, i[[I_STATE0, I_STATE1]].T, i[[I_NHIST0, I_NHIST1]].T, times, states)


def _texts(vocabulary: list, codes: np.ndarray):
    """vocabulary[codes] (-1: the last) typed as pd.DataFrame types a list of them (all None:
    object)."""
    strings = pd.Series(np.array(vocabulary, dtype=object)).array
    if isinstance(strings, pd.arrays.ArrowStringArray):  # Arrow's own take: 2.5x pandas' (pandas 3)
        import pyarrow as pa
        out = type(strings)(pa.array(strings).take(codes % len(vocabulary)), dtype=strings.dtype)
    else:
        out = strings.take(codes)
    return out if not pd.isna(out).all() else np.full(len(codes), None, dtype=object)


class Histories(Mapping):
    """conn_id -> (client, server) tcpstate.Endpoint of the kernel's connections, each made
    from the kernel's state histories when first asked for (most never are), then kept."""

    def __init__(self, ids: np.ndarray, state: np.ndarray, lengths: np.ndarray, times: np.ndarray,
                 states: np.ndarray):
        self._ids, self._state, self._times, self._states = ids, state, times, states
        self._at = np.concatenate([[0], np.cumsum(lengths.ravel())])  # (connection, side) -> start
        self._made: dict[int, tuple[Endpoint, Endpoint]] = {}

    def __getitem__(self, cid: int) -> tuple[Endpoint, Endpoint]:
        made = self._made.get(cid)
        if made is None:
            k = int(np.searchsorted(self._ids, cid))
            if k == len(self._ids) or self._ids[k] != cid:
                raise KeyError(cid)
            made = self._made[cid] = (self._endpoint(k, 0), self._endpoint(k, 1))
        return made

    def _endpoint(self, k: int, s: int) -> Endpoint:
        lo, hi = self._at[2 * k + s], self._at[2 * k + s + 1]
        return Endpoint(STATES[self._state[k, s]], self._times[lo:hi].tolist(),
                        [STATES[c] for c in self._states[lo:hi].tolist()])

    def __iter__(self):
        return iter(self._ids.tolist())

    def __len__(self) -> int:
        return len(self._ids)


@numba.njit(cache=True)
def _vantage(ttls, ratio, lo, hi, ts, d, flags, seq, ack, ttl):
    """analysis._with_vantages for one connection: from the handshake's timing
    (detectors.handshake_rows, vantage.from_handshake), else its TTLs (vantage.from_ttls)."""
    k = -1
    for i in range(lo, hi):
        if d[i] == 1 and flags[i] & (SYN | ACK) == SYN | ACK:
            k = i
            break
    if k >= 0:
        syn = -1
        for i in range(k - 1, lo - 1, -1):
            if d[i] == 0 and flags[i] & (SYN | ACK) == SYN:
                syn = i
                break
        est = _ack_of_synack(k, hi, d, flags, seq, ack)
        if syn >= 0 and est >= 0:
            g1, g2 = ts[k] - ts[syn], ts[est] - ts[k]
            if not (g1 < 0 or g2 < 0 or g1 + g2 < 200e-6):
                return 0 if g2 < ratio * g1 else 1 if g1 < ratio * g2 else 2
    first = np.full(2, -1, np.int64)
    for i in range(lo, hi):
        if first[d[i]] < 0:
            first[d[i]] = ttl[i]
    if first[0] < 0 or first[1] < 0:
        return UNDECIDED
    c_init = s_init = False
    for x in ttls:
        c_init |= first[0] == x
        s_init |= first[1] == x
    if c_init != s_init:
        return 0 if c_init else 1
    return 2 if not c_init else UNDECIDED


@numba.njit(cache=True)
def _vantages(ttls, ratio, starts, ends, ts, d, flags, seq, ack, ttl, loopback, out):
    for c in range(len(starts)):
        out[c] = 3 if loopback[c] else _vantage(ttls, ratio, starts[c], ends[c], ts, d, flags, seq, ack, ttl)


def vantages(cols: dict[str, np.ndarray], starts: np.ndarray, ends: np.ndarray,
             client_ip: np.ndarray, server_ip: np.ndarray, loopback: np.ndarray,
             votes: Mapping[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every connection's vantage as a VANTAGES code, and which of them were voted: those its
    own packets leave undecided go to the side whose host other connections placed the
    capture point on more often (these connections, and `votes`: host -> connections)."""
    out = np.empty(len(starts), dtype=np.int64)
    _vantages(TTLS, RATIO, starts, ends, cols["ts"], cols["d"], cols["flags"], cols["seq"], cols["ack"],
              cols["ttl"], loopback, out)
    undecided = out == UNDECIDED
    if undecided.any():  # hosts as codes: votes counted by bincount
        client, server = factorize_pair(client_ip, server_ip)
        counts = np.bincount(np.concatenate([client[out == 0], server[out == 1]]),
                             minlength=max(client.max(), server.max()) + 1)
        c, s = counts[client[undecided]], counts[server[undecided]]
        if votes:
            c = c + np.array([votes.get(ip, 0) for ip in client_ip[undecided].tolist()], dtype=np.int64)
            s = s + np.array([votes.get(ip, 0) for ip in server_ip[undecided].tolist()], dtype=np.int64)
        out[undecided] = np.where(c > s, 0, np.where(s > c, 1, VANTAGES.index("unknown")))
    return out, undecided
