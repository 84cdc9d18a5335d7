"""Segments -> connections: group by 4-tuple, split incarnations, assign client/server roles.

A connection incarnation starts at a SYN whose ISN is new for its 4-tuple. Segments after
that SYN go to whichever live incarnation their sequence and acknowledgment numbers fit,
so the old connection's late ACK and the client's RST (the SYN -> old ACK -> RST -> SYN
dance of RFC 9293 3.10.7.4) stay with the old one, and FIN retransmissions or a final ACK
never open a new record.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

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
    keys = [a[rows], b[rows]] + [seg[c].to_numpy()[rows] for c in DUP_KEY[4:]]
    # identical segments share a hash: sort by (hash, time), then compare neighbours exactly
    h = np.zeros(len(rows), dtype=np.uint64)
    for k in keys:
        h = (h ^ k.astype(np.uint64)) * np.uint64(HASH_MULTIPLIER)
        h ^= h >> np.uint64(29)
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
    n = len(seg)
    codes = pd.factorize(np.concatenate([seg["src"].to_numpy(), seg["dst"].to_numpy()]))[0]
    return ((codes[:n].astype(np.int64) << 16) | seg["sport"].to_numpy(),
            (codes[n:].astype(np.int64) << 16) | seg["dport"].to_numpy())


def assign_connections(seg: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add `conn` and `dir` (0: client->server, 1: server->client) and `dup` to the segments.

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
    seg["_group"] = group
    inc = np.zeros(n, dtype=np.int64)
    flags = seg["flags"].to_numpy()
    is_syn = (flags & (SYN | ACK)) == SYN
    syn_keys = seg.loc[is_syn, ["_group", "src", "sport", "seq"]].drop_duplicates()
    multi = syn_keys.groupby("_group").size()
    multi = multi[multi > 1].index.to_numpy()
    if len(multi):  # only 4-tuples with more than one SYN can hold more than one incarnation
        rows = np.flatnonzero(np.isin(group, multi))
        rows = rows[np.argsort(group[rows], kind="stable")]  # each group's rows, in time order
        bounds = (np.flatnonzero(np.diff(group[rows])) + 1).tolist()
        cols = [v[rows].tolist() for v in (a, seg["seq"].to_numpy(), seg["ack"].to_numpy(), flags,
                                           seg["plen"].to_numpy())]
        inc[rows] = [k for lo, hi in zip([0, *bounds], [*bounds, len(rows)])
                     for k in _split_incarnations(*(v[lo:hi] for v in cols))]
    seg["_inc"] = inc
    conns = _roles(seg)
    at = pd.MultiIndex.from_arrays([conns["_group"], conns["_inc"]]).get_indexer(
        pd.MultiIndex.from_arrays([group, inc]))
    seg["conn"] = conns["conn_id"].to_numpy()[at]
    client = (seg["src"].to_numpy() == conns["client_ip"].to_numpy()[at]) & \
        (seg["sport"].to_numpy() == conns["client_port"].to_numpy()[at])
    seg["dir"] = np.where(client, 0, 1).astype(np.int8)
    seg = seg.drop(columns=["_group", "_inc"])
    conns = conns.drop(columns=["_group", "_inc"])
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


def _roles(seg: pd.DataFrame) -> pd.DataFrame:
    """One row per incarnation: who is client (the SYN's sender), in order of first packet."""
    keys = ["_group", "_inc"]
    ends = ["src", "sport", "dst", "dport"]
    fl = seg["flags"].to_numpy() & (SYN | ACK)
    first = seg.groupby(keys, sort=False)[["ts", *ends]].first()
    syn = seg[fl == SYN].groupby(keys, sort=False)[ends].first().add_prefix("syn_")
    synack = seg[fl == SYN | ACK].groupby(keys, sort=False)[ends].first().add_prefix("sa_")
    t = first.join(syn).join(synack).reset_index()
    has_syn, has_sa = t["syn_src"].notna().to_numpy(), t["sa_src"].notna().to_numpy()
    guessed = [_guess_roles((a, ap), (b, bp)) for a, ap, b, bp in
               zip(t["src"], t["sport"], t["dst"], t["dport"])]
    g_client = pd.DataFrame([c for c, _ in guessed], columns=["ip", "port"])
    g_server = pd.DataFrame([s for _, s in guessed], columns=["ip", "port"])

    def pick(from_syn, from_synack, guess):  # the SYN's sender, else the SYN-ACK's receiver
        return np.where(has_syn, t[from_syn], np.where(has_sa, t[from_synack], guess))

    conns = pd.DataFrame({
        "_group": t["_group"], "_inc": t["_inc"], "first_ts": t["ts"],
        "client_ip": pick("syn_src", "sa_dst", g_client["ip"]),
        "client_port": pick("syn_sport", "sa_dport", g_client["port"]).astype(np.int64),
        "server_ip": pick("syn_dst", "sa_src", g_server["ip"]),
        "server_port": pick("syn_dport", "sa_sport", g_server["port"]).astype(np.int64),
        "roles_inferred": ~has_syn,
    })
    conns = conns.sort_values("first_ts", kind="stable", ignore_index=True)
    conns.insert(0, "conn_id", np.arange(len(conns), dtype=np.int64))
    conns["incarnation"] = conns.groupby("_group").cumcount().astype(np.int64)
    return conns.drop(columns=["first_ts"])


def _guess_roles(first_sender, first_receiver):
    """Without a SYN: the service port is the server (well-known port, or not ephemeral)."""
    p1, p2 = first_sender[1], first_receiver[1]

    def service_like(p: int) -> int:
        return 2 if p < 1024 else 0 if EPHEMERAL[0] <= p <= 65535 else 1

    if service_like(p1) > service_like(p2):
        return first_receiver, first_sender
    return first_sender, first_receiver
