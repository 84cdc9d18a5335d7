"""flows._split_incarnations compiled with numba: the 4-tuples that hold several SYNs
(a port reused again and again in a connection storm) numbered a segment at a time."""
from __future__ import annotations

import numba
import numpy as np

from .flows import UNKNOWN_SPACE
from .seq import ACK, FIN, HALF, MOD, SYN


@numba.njit(cache=True, inline="always")
def _distance(a, b):
    d = (a - b) % MOD
    return min(d, MOD - d)


@numba.njit(cache=True)
def _best_fit(n_inc, syn_side, syn_isn, high, side, seq, ack, flags):
    """flows._best_fit over the incarnations' arrays (syn_side -1: opened without a SYN;
    high -1: that side's space not seen yet)."""
    if flags & (SYN | ACK) == SYN | ACK:
        for k in range(n_inc - 1, -1, -1):
            if syn_side[k] >= 0 and syn_side[k] != side and (syn_isn[k] + 1) % MOD == ack:
                return k
    best, best_score = n_inc - 1, -1
    for k in range(n_inc - 1, max(n_inc - 3, -1), -1):
        mine, peer = high[k, side], high[k, 1 - side]
        score = UNKNOWN_SPACE if mine < 0 else _distance(seq, mine)
        if flags & ACK:
            score += UNKNOWN_SPACE if peer < 0 else _distance(ack, peer)
        if best_score < 0 or score < best_score:
            best, best_score = k, score
    return best


@numba.njit(cache=True)
def _split(starts, ends, ep, seq, ack, flags, plen, out):
    size = np.max(ends - starts) if len(starts) else 0
    syn_side = np.empty(size, np.int64)
    syn_isn = np.empty(size, np.int64)
    high = np.empty((size, 2), np.int64)
    for g in range(len(starts)):
        lo, hi = starts[g], ends[g]
        n_inc = 0
        for i in range(lo, hi):
            side = 0 if ep[i] == ep[lo] else 1
            fl, s = flags[i], seq[i]
            new = fl & (SYN | ACK) == SYN
            for k in range(n_inc):  # a SYN seen before (a retransmission) opens nothing
                if new and syn_side[k] == side and syn_isn[k] == s:
                    new = False
            if new or n_inc == 0:
                syn_side[n_inc] = side if new else -1
                syn_isn[n_inc] = s
                high[n_inc, 0] = high[n_inc, 1] = -1
                k = n_inc
                n_inc += 1
            else:
                k = _best_fit(n_inc, syn_side, syn_isn, high, side, s, ack[i], fl)
            end = (s + plen[i] + (1 if fl & (SYN | FIN) else 0)) % MOD
            if high[k, side] < 0 or 0 < (end - high[k, side]) % MOD < HALF:
                high[k, side] = end
            out[i] = k


def split_incarnations(bounds: np.ndarray, ep, seq, ack, flags, plen) -> np.ndarray:
    """flows._split_incarnations of each 4-tuple at once: its segments are
    bounds[g]..bounds[g + 1] of the columns (the last one's, to their end)."""
    out = np.zeros(len(ep), dtype=np.int64)
    ends = np.append(bounds[1:], len(ep))
    _split(bounds, ends, *(np.ascontiguousarray(c, dtype=np.int64) for c in (ep, seq, ack, flags, plen)), out)
    return out
