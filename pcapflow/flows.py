"""Segments -> connections: group by 4-tuple, split incarnations, assign client/server roles.

A connection incarnation starts at a SYN whose ISN is new for its 4-tuple. Segments after
that SYN go to whichever live incarnation their sequence and acknowledgment numbers fit,
so the old connection's late ACK and the client's RST (the SYN -> old ACK -> RST -> SYN
dance of RFC 9293 3.10.7.4) stay with the old one, and FIN retransmissions or a final ACK
never open a new record.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .seq import ACK, FIN, MOD, SYN, after, distance

EPHEMERAL = (32768, 60999)
DUP_WINDOW = 0.05  # s: the same packet captured twice (tcpdump -i any on a router or bridge)
DUP_KEY = ["src", "sport", "dst", "dport", "seq", "ack", "flags", "plen", "win", "ipid",
           "tsval", "tsecr", "nsack"]


def mark_duplicates(seg: pd.DataFrame) -> np.ndarray:
    """True for a segment that repeats an identical one seen less than DUP_WINDOW earlier.

    Identity needs an IPv4 ID or a TCP timestamp: without either, two real duplicate ACKs
    could not be told from one packet captured twice.
    """
    if seg.empty:
        return np.zeros(0, dtype=bool)
    order = seg.sort_values(DUP_KEY + ["ts"], kind="stable").index.to_numpy()
    s = seg.loc[order]
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


def assign_connections(seg: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add `conn` and `dir` (0: client->server, 1: server->client) and `dup` to the segments.

    Returns (segments, connections) where connections has one row per incarnation with
    conn_id, client/server endpoints, roles_inferred and incarnation.
    """
    seg = seg.copy()
    seg["dup"] = mark_duplicates(seg)
    if seg.empty:
        seg["conn"], seg["dir"] = pd.Series(dtype="int64"), pd.Series(dtype="int8")
        return seg, pd.DataFrame(columns=["conn_id", "client_ip", "client_port", "server_ip",
                                          "server_port", "roles_inferred", "incarnation"])
    # A 4-tuple whichever way it is read: each endpoint as (address code << 16 | port).
    n = len(seg)
    codes = pd.factorize(np.concatenate([seg["src"].to_numpy(), seg["dst"].to_numpy()]))[0]
    a = (codes[:n].astype(np.int64) << 16) | seg["sport"].to_numpy()
    b = (codes[n:].astype(np.int64) << 16) | seg["dport"].to_numpy()
    group = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0,
                      return_inverse=True)[1].ravel()
    seg["_group"] = group
    inc = np.zeros(n, dtype=np.int64)
    flags = seg["flags"].to_numpy()
    is_syn = (flags & (SYN | ACK)) == SYN
    syn_keys = seg.loc[is_syn, ["_group", "src", "sport", "seq"]].drop_duplicates()
    multi = syn_keys.groupby("_group").size()
    multi = multi[multi > 1].index.to_numpy()
    if len(multi):
        order = np.argsort(group, kind="stable")  # each group's rows, in time order
        starts = np.searchsorted(group[order], multi)
        stops = np.searchsorted(group[order], multi, side="right")
        cols = [seg[k].to_numpy() for k in ("src", "sport", "seq", "ack", "flags", "plen")]
        for lo, hi in zip(starts, stops):
            rows = order[lo:hi]
            inc[rows] = _split_incarnations(*(v[rows] for v in cols))
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


def _split_incarnations(*columns: np.ndarray) -> np.ndarray:
    """Number the incarnations inside one 4-tuple's segments, given its src, sport, seq,
    ack, flags and plen arrays in time order."""
    out = np.zeros(len(columns[0]), dtype=np.int64)
    incs: list[dict] = []  # each: {"syn": (endpoint, isn), "hi": {endpoint: next seq}}
    for i, (src, sport, seq, ack, flags, plen) in enumerate(zip(*(c.tolist() for c in columns))):
        ep = (src, sport)
        if flags & (SYN | ACK) == SYN and (not incs or all(x["syn"] != (ep, seq) for x in incs)):
            incs.append({"syn": (ep, seq), "hi": {}})
            k = len(incs) - 1
        elif not incs:
            incs.append({"syn": None, "hi": {}})
            k = 0
        else:
            k = _best_fit(incs, ep, seq, ack, flags)
        x = incs[k]
        end = (seq + plen + (1 if flags & (SYN | FIN) else 0)) % MOD
        old = x["hi"].get(ep)
        if old is None or after(end, old):
            x["hi"][ep] = end
        out[i] = k
    return out


UNKNOWN_SPACE = 1 << 16  # cost of a sequence space not seen yet (the new server's, before its SYN-ACK)


def _best_fit(incs: list[dict], ep, seq: int, ack: int, flags: int) -> int:
    """The live incarnation whose sequence spaces this segment fits best (latest on a tie);
    a SYN-ACK belongs to the incarnation whose SYN it acknowledges."""
    if flags & (SYN | ACK) == SYN | ACK:
        for k in range(len(incs) - 1, -1, -1):
            syn = incs[k]["syn"]
            if syn is not None and syn[0] != ep and (syn[1] + 1) % MOD == ack:
                return k
    best, best_score = len(incs) - 1, None
    for k in range(len(incs) - 1, max(len(incs) - 3, -1), -1):
        hi = incs[k]["hi"]
        score = distance(seq, hi[ep]) if ep in hi else UNKNOWN_SPACE
        peers = [v for e, v in hi.items() if e != ep]
        if flags & ACK:
            score += distance(ack, peers[0]) if peers else UNKNOWN_SPACE
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
