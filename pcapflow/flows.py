"""Segments -> connections: group by 4-tuple, split incarnations, assign client/server roles.

A connection incarnation starts at a SYN whose ISN is new for its 4-tuple. Segments after
that SYN go to whichever live incarnation their sequence and acknowledgment numbers fit,
so the old connection's late ACK and the client's RST (the SYN -> old ACK -> RST -> SYN
dance of RFC 9293 3.10.7.4) stay with the old one, and FIN retransmissions or a final ACK
never open a new record.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd

from .capture import factorize_pair, factorize_rows
from .seq import ACK, FIN, MOD, SYN, after, distance

EPHEMERAL = (32768, 60999)
DUP_WINDOW = 0.05  # s: the same packet captured twice (tcpdump -i any on a router or bridge)
HASH_MULTIPLIER = 0x100000001B3  # FNV-1a's, wrapping in 64 bits
DUP_KEY = ["src", "sport", "dst", "dport", "seq", "ack", "flags", "plen", "win", "ipid",
           "tsval", "tsecr", "nsack"]


def mark_duplicates(seg: pd.DataFrame, ends: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """True for a segment that repeats an identical one seen less than DUP_WINDOW earlier.

    Identity needs an IPv4 ID or a TCP timestamp: without either, two real duplicate ACKs
    could not be told from one packet captured twice. `ends`: the sending and receiving
    endpoints as codes (see `_endpoints`), if the caller has them.
    """
    dup = np.zeros(len(seg), dtype=bool)
    rows = np.flatnonzero((seg["ipid"].to_numpy() > 0) | (seg["tsval"].to_numpy() >= 0))
    if not len(rows):
        return dup
    a, b = ends if ends is not None else _endpoints(seg)
    keys = [a, b] + [seg[c].to_numpy() for c in DUP_KEY[4:]]
    if len(rows) < len(seg):  # else all of them: no copies
        keys = [k[rows] for k in keys]
    # identical segments share a hash: sort by (hash, time), then compare neighbours exactly
    h = np.zeros(len(rows), dtype=np.uint64)
    for k in keys:
        h = (h ^ k.astype(np.uint64)) * np.uint64(HASH_MULTIPLIER)
        h ^= h >> np.uint64(29)
    sorted_h = np.sort(h)  # numpy's quicksort of integers is vectorised: ~15x pd.factorize
    repeated = sorted_h[1:][sorted_h[1:] == sorted_h[:-1]]
    shared = np.flatnonzero(np.isin(h, repeated))  # a hash of its own: no duplicate
    rows, h, keys = rows[shared], h[shared], [k[shared] for k in keys]
    ts = seg["ts"].to_numpy()[rows]
    order = np.lexsort((ts, h))
    same_hash = h[order][1:] == h[order][:-1]
    same = same_hash.copy()
    for k in keys:
        k = k[order]
        same &= k[1:] == k[:-1]
    if (same_hash & ~same).any():  # two different segments with one hash: sort by the keys
        return _mark_duplicates_by_keys(seg)
    ts = ts[order]
    same &= (ts[1:] - ts[:-1]) < DUP_WINDOW
    dup[rows[order[1:][same]]] = True
    return dup


def _mark_duplicates_by_keys(seg: pd.DataFrame) -> np.ndarray:
    s = seg[DUP_KEY + ["ts"]].sort_values(DUP_KEY + ["ts"], kind="stable")
    order = s.index.to_numpy()
    same = np.ones(len(s), dtype=bool)
    for col in DUP_KEY:
        v = s[col].to_numpy()
        same[1:] &= v[1:] == v[:-1]
    same[0] = False
    ts = s["ts"].to_numpy()
    same[1:] &= (ts[1:] - ts[:-1]) < DUP_WINDOW
    identified = (s["ipid"].to_numpy() > 0) | (s["tsval"].to_numpy() >= 0)
    dup = np.zeros(len(seg), dtype=bool)
    dup[order] = same & identified
    return dup


def _endpoints(seg: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each segment's sender and receiver as one code each: address code << 16 | port."""
    src, dst = factorize_pair(seg["src"].to_numpy(), seg["dst"].to_numpy())
    return ((src.astype(np.int64) << 16) | seg["sport"].to_numpy(),
            (dst.astype(np.int64) << 16) | seg["dport"].to_numpy())


def assign_connections(seg: pd.DataFrame, compiled: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add `conn` and `dir` (0: client->server, 1: server->client) and `dup` to the segments;
    `compiled`: split the incarnations with numba (fastflows).

    Returns (segments, connections) where connections has one row per incarnation with
    conn_id, client/server endpoints, roles_inferred and incarnation.
    """
    if seg.empty:
        seg = seg.assign(dup=np.zeros(0, dtype=bool))
        seg["conn"], seg["dir"] = pd.Series(dtype="int64"), pd.Series(dtype="int8")
        return seg, pd.DataFrame(columns=["conn_id", "client_ip", "client_port", "server_ip",
                                          "server_port", "roles_inferred", "incarnation"])
    # A 4-tuple whichever way it is read: each endpoint as (address code << 16 | port).
    n = len(seg)
    a, b = _endpoints(seg)
    seg = seg.assign(dup=mark_duplicates(seg, (a, b)))  # the caller's columns shared, not copied
    pair = pd.factorize(np.minimum(a, b))[0] * n + pd.factorize(np.maximum(a, b))[0]  # < n * n
    group = pd.factorize(pair)[0]
    inc = np.zeros(n, dtype=np.int64)
    flags = seg["flags"].to_numpy()
    is_syn = (flags & (SYN | ACK)) == SYN
    # distinct (4-tuple, sending end, ISN) of the SYNs: the sender is its 4-tuple's lower end or not
    _, (syn_group, _, _) = factorize_rows(group[is_syn], (a < b)[is_syn].astype(np.int64),
                                          seg["seq"].to_numpy()[is_syn])
    multi = np.flatnonzero(np.bincount(syn_group) > 1)
    if len(multi):  # only 4-tuples with more than one SYN can hold more than one incarnation
        rows = np.flatnonzero(np.isin(group, multi))
        # each group's rows, in time order: the keys are distinct, so numpy's quick sort will do
        rows = rows[np.argsort(group[rows] * len(rows) + np.arange(len(rows)))]
        bounds = np.flatnonzero(np.diff(group[rows], prepend=-1))
        cols = [v[rows] for v in (a, seg["seq"].to_numpy(), seg["ack"].to_numpy(), flags,
                                  seg["plen"].to_numpy())]
        if compiled:
            from .fastflows import split_incarnations
            inc[rows] = split_incarnations(bounds, *cols)
        else:
            cols = [v.tolist() for v in cols]
            bounds = [*bounds.tolist(), len(rows)]
            inc[rows] = [k for lo, hi in pairwise(bounds)
                         for k in _split_incarnations(*(v[lo:hi] for v in cols))]
    conns, conn, client = _roles(seg, group, inc, (a, b))
    seg["conn"] = conn
    seg["dir"] = np.where(a == client, 0, 1).astype(np.int8)
    return seg, conns


@dataclass(slots=True)
class _Incarnation:
    syn: tuple[int, int] | None  # (side, ISN) of the SYN that opened it
    hi: list  # per side (0: the 4-tuple's first sender): next sequence number, None if unseen


def _split_incarnations(ep: list[int], seq: list[int], ack: list[int], flags: list[int],
                        plen: list[int]) -> list[int]:
    """Number the incarnations inside one 4-tuple's segments, given in time order each one's
    sending endpoint (any code, one per ip:port), seq, ack, flags and plen."""
    out = []
    incs: list[_Incarnation] = []
    syns = set()
    for e, s, a, fl, n in zip(ep, seq, ack, flags, plen):
        side = 0 if e == ep[0] else 1
        if fl & (SYN | ACK) == SYN and (side, s) not in syns:
            syns.add((side, s))
            incs.append(_Incarnation((side, s), [None, None]))
            k = len(incs) - 1
        elif not incs:
            incs.append(_Incarnation(None, [None, None]))
            k = 0
        else:
            k = _best_fit(incs, side, s, a, fl)
        hi = incs[k].hi
        end = (s + n + (1 if fl & (SYN | FIN) else 0)) % MOD
        if hi[side] is None or after(end, hi[side]):
            hi[side] = end
        out.append(k)
    return out


UNKNOWN_SPACE = 1 << 16  # cost of a sequence space not seen yet (the new server's, before its SYN-ACK)


def _best_fit(incs: list[_Incarnation], side: int, seq: int, ack: int, flags: int) -> int:
    """The live incarnation whose sequence spaces this segment fits best (latest on a tie);
    a SYN-ACK belongs to the incarnation whose SYN it acknowledges."""
    if flags & (SYN | ACK) == SYN | ACK:
        for k in range(len(incs) - 1, -1, -1):
            syn = incs[k].syn
            if syn is not None and syn[0] != side and (syn[1] + 1) % MOD == ack:
                return k
    best, best_score = len(incs) - 1, None
    for k in range(len(incs) - 1, max(len(incs) - 3, -1), -1):
        mine, peer = incs[k].hi[side], incs[k].hi[1 - side]
        score = UNKNOWN_SPACE if mine is None else distance(seq, mine)
        if flags & ACK:
            score += UNKNOWN_SPACE if peer is None else distance(ack, peer)
        if best_score is None or score < best_score:
            best, best_score = k, score
    return best


def _roles(seg: pd.DataFrame, group: np.ndarray, inc: np.ndarray, ends: tuple[np.ndarray, np.ndarray]):
    """One row per incarnation: who is client (the SYN's sender, else the SYN-ACK's receiver,
    else a guess from the ports), numbered in order of first packet. Also returns each
    segment's conn_id and its connection's client endpoint code (see `_endpoints`)."""
    codes = pd.factorize(group * (int(inc.max()) + 1) + inc)[0]  # incarnations in order of appearance
    m = int(codes.max()) + 1
    fl = seg["flags"].to_numpy() & (SYN | ACK)

    def first_row(rows):  # each incarnation's first of `rows`, -1 if none
        out = np.full(m, -1, dtype=np.int64)
        k, at = np.unique(codes[rows], return_index=True)
        out[k] = rows[at]
        return out

    # of all rows: codes are numbered in order of appearance, so each one's first row is
    # where the running maximum grows
    first = np.flatnonzero(np.diff(np.maximum.accumulate(codes), prepend=-1))
    syn, synack = first_row(np.flatnonzero(fl == SYN)), first_row(np.flatnonzero(fl == SYN | ACK))
    sport, dport = seg["sport"].to_numpy(), seg["dport"].to_numpy()
    has_syn, has_sa = syn >= 0, synack >= 0
    # the client is the source (0) or the destination (1) of one segment
    row = np.where(has_syn, syn, np.where(has_sa, synack, first))
    guess = _service_like(sport[first]) > _service_like(dport[first])
    side = np.where(has_syn, 0, np.where(has_sa, 1, guess))
    src, dst = seg["src"].to_numpy()[row], seg["dst"].to_numpy()[row]
    order = np.argsort(seg["ts"].to_numpy()[first], kind="stable")  # conn_id: by first packet
    row, side = row[order], side[order].astype(bool)
    src, dst, sp, dp = src[order], dst[order], sport[row], dport[row]
    conns = pd.DataFrame({
        "conn_id": np.arange(m, dtype=np.int64),
        "client_ip": np.where(side, dst, src), "client_port": np.where(side, dp, sp).astype(np.int64),
        "server_ip": np.where(side, src, dst), "server_port": np.where(side, sp, dp).astype(np.int64),
        "roles_inferred": ~has_syn[order],
    })
    four_tuple = group[first[order]]
    conns["incarnation"] = pd.Series(four_tuple).groupby(four_tuple).cumcount().astype(np.int64)
    conn_id = np.empty(m, dtype=np.int64)
    conn_id[order] = np.arange(m)
    client = np.where(side, ends[1][row], ends[0][row])
    return conns, conn_id[codes], client[conn_id[codes]]


def _service_like(port: np.ndarray) -> np.ndarray:
    """Without a SYN, the more service-like port is the server's: 2 for a well-known port,
    0 for an ephemeral one, 1 between (the first packet's sender is client on a tie)."""
    return np.where(port < 1024, 2, np.where((port >= EPHEMERAL[0]) & (port <= 65535), 0, 1))
