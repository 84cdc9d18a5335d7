"""zeek.py's replay of Zeek's TCP analysis, compiled with numba over all connections at once.

The same transitions as `zeek.Conn`, line for line, on integer arrays: each endpoint is a
row of `e` (0: originator, 1: responder), the connection's counters a row of `c`. A
connection whose history or reassembly blocks outgrow the fixed buffers is marked, and its
columns come from the Python reference instead (tests/test_fast.py compares both on every
capture we have).
"""
from __future__ import annotations

import numba
import numpy as np

from .capture import factorize_rows
from .seq import ACK, FIN, HALF, MOD, RST, SYN
from .zeek import (
    ATTEMPT_DELAY,
    CLOSE_DELAY,
    CLOSED,
    ESTABLISHED,
    INACTIVE,
    INACTIVITY,
    PARTIAL,
    RESET,
    SYN_ACK_SENT,
    SYN_SENT,
    TOO_LARGE_SEQ_DELTA,
    conn_state,
)

# zeek.py's timers go to the kernel as an argument, not as globals: numba's cache would keep
# another module's globals frozen when that module changes
TIMERS = np.array([ATTEMPT_DELAY, CLOSE_DELAY, INACTIVITY, TOO_LARGE_SEQ_DELTA], dtype=np.float64)
MAX_HISTORY = 48
MAX_BLOCKS = 32
# endpoint fields (rows of e)
(E_STATE, E_PREV, E_START, E_LAST, E_ACK, E_FINCNT, E_FINSEQ, E_CLOSED, E_REASSEM, E_TRIM,
 E_NBLK, E_SEEN, E_HL, E_SCN, E_SCT) = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 18)
E_SIZE = 21
K_SYN, K_FIN, K_RST, K_I, K_Q, K_D, K_A = range(7)  # CheckHistory kinds (bits of E_SEEN)
L_T, L_W, L_G = range(3)  # scaled letters (E_SCN + i: count, E_SCT + i: next threshold)
# connection fields (c); OUT: what each connection's row of the output holds
C_HLEN, C_PARTIAL, C_SEEN0, C_SEEN1, C_OVERFLOW, C_PKTS0, C_PKTS1 = range(7)
O_OVERFLOW, O_OSTATE, O_RSTATE, O_OPKTS, O_RPKTS, O_OSIZE, O_RSIZE, O_TIMED, O_HLEN = range(9)


@numba.njit(cache=True, inline="always")
def _delta32(a, b):
    return (a - b + HALF) % MOD - HALF


@numba.njit(cache=True, inline="always")
def _set_state(e, s, v):
    if v != e[s, E_STATE]:
        e[s, E_PREV] = e[s, E_STATE]
        e[s, E_STATE] = v


@numba.njit(cache=True, inline="always")
def _add(hist, c, s, code):
    n = c[C_HLEN]
    if n >= hist.shape[0]:
        c[C_OVERFLOW] = 1
        return
    hist[n] = code if s == 0 else code + 32  # lower case: the responder
    c[C_HLEN] = n + 1


@numba.njit(cache=True, inline="always")
def _check(e, hist, c, s, code, kind):
    bit = 1 << kind
    if e[s, E_SEEN] & bit:
        return True
    e[s, E_SEEN] |= bit
    _add(hist, c, s, code)
    return False


@numba.njit(cache=True, inline="always")
def _scaled(e, hist, c, s, code, letter):
    n = e[s, E_SCN + letter] + 1
    if n == e[s, E_SCT + letter]:
        _add(hist, c, s, code)
        e[s, E_SCT + letter] *= 10
    e[s, E_SCN + letter] = n


@numba.njit(cache=True, inline="always")
def _repeat(e, hist, c, s, code, kind, rel):
    if _check(e, hist, c, s, code, kind) and rel != e[s, E_HL + kind]:
        _add(hist, c, s, code)
    e[s, E_HL + kind] = rel


@numba.njit(cache=True, inline="always")
def _init_seq(e, s, seq, last):
    e[s, E_START] = seq
    e[s, E_ACK] = seq
    e[s, E_LAST] = last


@numba.njit(cache=True, inline="always")
def _fin_or_rst(e, s, fin, rst):
    if fin:
        _set_state(e, s, CLOSED)
    if rst:
        _set_state(e, s, RESET)
    return fin or rst


@numba.njit(cache=True, inline="always")
def _size(e, s):
    p = 1 - s
    if (e[s, E_PREV] == SYN_SENT and e[s, E_STATE] == RESET and e[p, E_STATE] == INACTIVE
            and e[s, E_ACK] - e[s, E_START] != 0 and e[s, E_ACK] - e[s, E_START] != 1):
        return 0
    n = max(e[s, E_LAST], e[s, E_ACK]) - e[s, E_START]
    if n:
        n -= 1
    if e[s, E_FINCNT] and n:
        n -= 1
    return max(n, 0)


@numba.njit(cache=True, inline="always")
def _deliver(e, blk, s):
    while e[s, E_NBLK] and blk[s, 0, 0] <= e[s, E_REASSEM]:
        e[s, E_REASSEM] = max(e[s, E_REASSEM], blk[s, 0, 1])
        for j in range(1, e[s, E_NBLK]):
            blk[s, j - 1] = blk[s, j]
        e[s, E_NBLK] -= 1


@numba.njit(cache=True, inline="always")
def _data_sent(e, blk, c, s, seq, plen):
    upper = seq + plen
    seq = max(seq, e[s, E_ACK] - e[s, E_START], e[s, E_TRIM])
    if upper <= seq or upper <= e[s, E_REASSEM]:
        return
    n = e[s, E_NBLK]
    if n == blk.shape[1]:
        c[C_OVERFLOW] = 1
        return
    j = n  # insert keeping (seq, upper) order, as list.sort() would
    while j > 0 and (blk[s, j - 1, 0] > seq or blk[s, j - 1, 0] == seq and blk[s, j - 1, 1] > upper):
        blk[s, j] = blk[s, j - 1]
        j -= 1
    blk[s, j, 0] = seq
    blk[s, j, 1] = upper
    e[s, E_NBLK] = n + 1
    _deliver(e, blk, s)


@numba.njit(cache=True, inline="always")
def _gap(e, hist, c, s):
    for x in (s, 1 - s):
        if not (e[x, E_STATE] == ESTABLISHED
                or e[x, E_STATE] == CLOSED and e[x, E_PREV] == ESTABLISHED):
            return
    _scaled(e, hist, c, s, 71, L_G)  # 'G'


@numba.njit(cache=True, inline="always")
def _ack_received(e, blk, hist, c, s, seq):
    if e[s, E_FINCNT] and seq >= e[s, E_FINSEQ]:
        seq = e[s, E_FINSEQ] - 1
    if seq <= e[s, E_TRIM]:
        return
    if seq > e[s, E_REASSEM] and not (seq <= 2 and c[C_PARTIAL]):
        while e[s, E_NBLK] and blk[s, 0, 0] < seq:
            if blk[s, 0, 0] > e[s, E_REASSEM]:
                _gap(e, hist, c, s)
                e[s, E_REASSEM] = blk[s, 0, 0]
            _deliver(e, blk, s)
        if seq > e[s, E_REASSEM]:
            _gap(e, hist, c, s)
            e[s, E_REASSEM] = seq
    e[s, E_TRIM] = seq


@numba.njit(cache=True)
def _replay_one(timers, lo, hi, d, flags, seq, ack, plen, win, ts, e, blk, c, hist):
    """zeek.zeek_fields' loop for rows lo..hi: (start_time, last_time). `timers`: TIMERS."""
    attempt_delay, close_delay, inactivity, too_large = timers[0], timers[1], timers[2], timers[3]
    start_time = last_time = ts[lo]
    attempt_at = delete_at = np.inf
    for i in range(lo, hi):
        t, fl, sq, ak, pl = ts[i], flags[i], seq[i], ack[i], plen[i]
        syn, fin, rst, has_ack = fl & SYN != 0, fl & FIN != 0, fl & RST != 0, fl & ACK != 0
        if i > lo:  # Conn.removed_before
            if t >= attempt_at and (e[0, E_STATE] == SYN_SENT or e[0, E_STATE] == SYN_ACK_SENT) \
                    and e[1, E_STATE] == INACTIVE:
                break
            if t >= delete_at or t - last_time > inactivity:
                break
            if syn and not (has_ack and e[0, E_STATE] != INACTIVE):
                if e[0, E_CLOSED] or e[1, E_CLOSED]:
                    break
                owner = 1 if has_ack else 0
                reversed_handshake = (not has_ack and e[owner, E_STATE] == SYN_ACK_SENT
                                      and e[1, E_STATE] == INACTIVE and (sq - e[1, E_START]) % MOD == 0)
                if (sq - e[owner, E_START]) % MOD != 0 and not reversed_handshake:
                    break
        # Conn.packet
        s = d[i]
        p = 1 - s
        c[C_PKTS0 + s] += 1
        if not c[C_SEEN0 + s]:
            if s == 0:
                c[C_PARTIAL] = not syn or has_ack
            elif not c[C_PARTIAL]:
                c[C_PARTIAL] = not syn
        seg_len = (0 if rst else pl) + (1 if syn else 0) + (1 if fin else 0)
        st = e[s, E_STATE]
        if st == INACTIVE:  # _init_endpoint
            if syn:
                _init_seq(e, s, sq, sq + seg_len)
            else:
                _init_seq(e, s, sq - 1, sq)
        elif syn and ((st == SYN_SENT or st == SYN_ACK_SENT) and (sq - e[s, E_START]) % MOD != 0
                      or st == ESTABLISHED or st == PARTIAL
                      or st == RESET and e[s, E_PREV] == INACTIVE):
            _init_seq(e, s, sq, sq + seg_len)
        rel_seq = e[s, E_LAST] + _delta32(sq, e[s, E_LAST]) - e[s, E_START]
        underflow = rel_seq < 0
        bits = int(syn) + int(fin) + int(rst)  # _history
        if bits > 1:
            if fin and rst:
                _check(e, hist, c, s, 73, K_I)  # 'I'
            else:
                _check(e, hist, c, s, 81, K_Q)  # 'Q'
        elif syn:
            _repeat(e, hist, c, s, 72 if has_ack else 83, K_SYN, rel_seq)  # 'H' / 'S'
        elif fin:
            _repeat(e, hist, c, s, 70, K_FIN, rel_seq + pl)  # 'F'
        elif rst:
            _repeat(e, hist, c, s, 82, K_RST, rel_seq)  # 'R'
        elif pl:
            _check(e, hist, c, s, 68, K_D)  # 'D'
        elif has_ack:
            _check(e, hist, c, s, 65, K_A)  # 'A'
        if win[i] == 0 and not rst and e[p, E_STATE] != CLOSED and e[s, E_STATE] != RESET:
            _scaled(e, hist, c, s, 87, L_W)  # 'W'
        if not (e[0, E_CLOSED] and e[1, E_CLOSED]):
            last_time = t
        if fin:
            e[s, E_FINCNT] += 1
            e[s, E_FINSEQ] = rel_seq + seg_len
        rel_ack = 0
        if has_ack:
            if e[p, E_STATE] == INACTIVE:
                rel_ack = 1
                _init_seq(e, p, ak - 1, ak - 1)
            else:
                rel_ack = e[p, E_ACK] + _delta32(ak, e[p, E_ACK]) - e[p, E_START]
                if rel_ack < 0:
                    rel_ack = 0
                elif not rst:
                    dd = _delta32(ak, e[p, E_ACK])
                    if dd > 0 and not (ak == 0 and dd > too_large):
                        e[p, E_ACK] += dd
        dl = _delta32(sq + seg_len, e[s, E_LAST])  # _update_last
        if (syn or rst) and abs(dl) > too_large:
            pass
        elif fin and e[s, E_LAST] == e[s, E_START] + 1:
            e[s, E_LAST] += dl
        elif e[s, E_STATE] == RESET:
            pass
        elif dl > 0:
            e[s, E_LAST] += dl
        elif pl > 0:
            _scaled(e, hist, c, s, 84, L_T)  # 'T'
        close = False  # _state_machine
        st = e[s, E_STATE]
        if st == INACTIVE:
            if syn:
                if s == 0:
                    _set_state(e, s, SYN_ACK_SENT if has_ack else SYN_SENT)
                    attempt_at = last_time + attempt_delay
                else:
                    if e[p, E_STATE] == SYN_SENT:
                        _set_state(e, p, ESTABLISHED)
                    _set_state(e, s, ESTABLISHED)
            close = _fin_or_rst(e, s, fin, rst)
            if e[s, E_STATE] == INACTIVE:
                if s == 1 and pl == 0 and e[0, E_STATE] == SYN_SENT:
                    pass
                elif has_ack and e[p, E_STATE] == ESTABLISHED:
                    _set_state(e, s, ESTABLISHED)
                    c[C_PARTIAL] = 0
                else:
                    _set_state(e, s, PARTIAL)
        elif st == SYN_SENT or st == SYN_ACK_SENT:
            close = _fin_or_rst(e, s, fin, rst)
        elif st == ESTABLISHED or st == PARTIAL:
            if syn and st == PARTIAL and e[p, E_STATE] == INACTIVE and not has_ack:
                _set_state(e, s, SYN_SENT)
            if fin and not rst:
                _set_state(e, s, CLOSED)
                if e[p, E_STATE] == RESET and e[p, E_PREV] == CLOSED:
                    _set_state(e, p, CLOSED)
                close = True
            if rst:
                _set_state(e, s, RESET)
                close = True
        elif st == CLOSED and rst and e[p, E_STATE] != CLOSED:
            _set_state(e, s, RESET)
            close = not e[s, E_CLOSED]
            delete_at = min(delete_at, last_time + close_delay)
        if has_ack:
            _ack_received(e, blk, hist, c, p, rel_ack)
        if pl and not rst and not underflow:
            _data_sent(e, blk, c, s, rel_seq + (1 if syn else 0), pl)
        if close and not e[s, E_CLOSED]:  # ConnectionClosed()
            e[s, E_CLOSED] = 1
            if e[s, E_STATE] == RESET or e[p, E_CLOSED] or e[p, E_STATE] == INACTIVE:
                delete_at = min(delete_at, last_time + close_delay)
        c[C_SEEN0 + s] = 1
    return start_time, last_time


@numba.njit(cache=True)
def _replay(timers, starts, ends, flipped, d, flags, seq, ack, plen, win, ts, out, hist, blk):
    e = np.zeros((2, E_SIZE), dtype=np.int64)
    c = np.zeros(7, dtype=np.int64)
    for k in range(len(starts)):
        e[:] = 0
        e[:, E_REASSEM] = 1
        e[:, E_SCT:E_SCT + 3] = 1
        c[:] = 0
        if flipped[k]:
            hist[k, 0] = 94  # '^'
            c[C_HLEN] = 1
        lo, hi = starts[k], ends[k]
        t0, t1 = _replay_one(timers, lo, hi, d, flags, seq, ack, plen, win, ts, e, blk, c, hist[k])
        out[k, O_OVERFLOW] = c[C_OVERFLOW]
        out[k, O_OPKTS] = c[C_PKTS0]
        out[k, O_RPKTS] = c[C_PKTS1]
        out[k, O_OSTATE] = e[0, E_STATE]
        out[k, O_RSTATE] = e[1, E_STATE]
        out[k, O_OSIZE] = _size(e, 0)
        out[k, O_RSIZE] = _size(e, 1)
        out[k, O_TIMED] = t1 > t0
        out[k, O_HLEN] = c[C_HLEN]


def zeek_columns(starts: np.ndarray, ends: np.ndarray, flipped: np.ndarray, d: np.ndarray,
                 flags: np.ndarray, seq: np.ndarray, ack: np.ndarray, plen: np.ndarray,
                 win: np.ndarray, ts: np.ndarray) -> tuple[dict, list[int]]:
    """zeek.COLUMNS of each connection (rows starts[k]..ends[k] of the columns, in time
    order), as arrays, and the connections the buffers could not hold: the caller asks the
    reference."""
    n = len(starts)
    out = np.zeros((n, 9), dtype=np.int64)
    padded = np.zeros((n, -(-MAX_HISTORY // 8) * 8), dtype=np.uint8)  # whole 8-byte words
    _replay(TIMERS, starts, ends, flipped, d, flags, seq, ack, plen, win, ts, out, padded[:, :MAX_HISTORY],
            np.zeros((2, MAX_BLOCKS, 2), dtype=np.int64))
    # each distinct history once: its letters are ASCII, so its 8-byte words are non-negative
    codes, words = factorize_rows(*padded.view(np.int64).T)
    names = np.stack(words, axis=1).view(f"S{padded.shape[1]}").ravel().astype(str).astype(object)
    o_size, r_size, timed = out[:, O_OSIZE], out[:, O_RSIZE], out[:, O_TIMED].astype(bool)
    # conn_state once per distinct (states, sizes nonzero, history): it only compares sizes with 0
    key, levels = factorize_rows(out[:, O_OSTATE], out[:, O_RSTATE], o_size != 0, r_size != 0, codes)
    states = np.array(list(map(conn_state, *(v.tolist() for v in levels[:4]), names[levels[4]])), dtype=object)
    cols = {  # arrays the reference's values can be written into, typed by pd.DataFrame as lists
        "zeek_conn_state": states[key], "zeek_history": names[codes],
        "orig_pkts": out[:, O_OPKTS], "resp_pkts": out[:, O_RPKTS],
        "orig_bytes": _sizes(timed, o_size), "resp_bytes": _sizes(timed, r_size),
    }
    return cols, np.flatnonzero(out[:, O_OVERFLOW]).tolist()


def _sizes(timed: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Byte counts, unset where Zeek leaves them so, typed as pd.DataFrame types a list of
    ints and None: int64, float64 with NaN, or objects when all are None."""
    if timed.all():
        return size
    return np.where(timed, size, np.nan) if timed.any() else np.full(len(size), None, dtype=object)
