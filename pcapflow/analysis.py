"""The Analysis object users hold: captures -> segments -> connections -> events -> tables."""
from __future__ import annotations

import functools
import io
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pandas as pd

from . import tcpstate
from . import vantage as vt
from .capture import CaptureInfo, read_captures
from .detectors import handshake_times
from .flows import assign_connections
from .seq import ACK, FIN, MOD, RST, SYN, after
from .teardown import Flow, Params, reconstruct
from .zeek import zeek_fields

SCHEMA = "pcapflow/1"
CONNECTION_COLUMNS = """conn_id client_ip client_port server_ip server_port roles_inferred
incarnation first_ts last_ts handshake vantage close_type active_closer client_state_end
server_state_end client_fin_ts server_fin_ts client_fin_retransmits server_fin_retransmits
client_fin_backoff server_fin_backoff fin_rto_estimate fin_backoff_exponential
orphan_retries_estimate lost_waves losses rst_by rst_kind time_wait_side time_wait_start
time_wait_end time_wait_restarts reused_4tuple reuse_gap_s reuse_check reuse_isn_signature
half_close_bytes close_wait_s fin_wait2_s fin_wait2_timeout client_keepalives
server_keepalives unanswered_keepalives teardown_s packets client_bytes server_bytes
client_frame_bytes server_frame_bytes duplicates client_last_data_ts
http_requests http_responses http_request_close http_response_close http10 http_cut
zeek_conn_state zeek_history orig_pkts resp_pkts orig_bytes resp_bytes""".split()
EVENT_COLUMNS = ["conn_id", "ts", "side", "kind", "state_from", "state_to", "detail"]
SIDE_NAMES = ("client", "server")
FLOW_FIELDS = ["ts", "d", "seq", "ack", "flags", "plen", "win", "ipid", "ttl", "tsval", "dsack", "http"]


class Analysis:
    """Everything pcapflow found in one timeline of captures.

    `connections`, `events` and `findings` are DataFrames whose columns are named as in
    SPEC.md; `segments` is the TCP segment table they were built from.
    """

    def __init__(self, segments: pd.DataFrame, captures: list[CaptureInfo],
                 connections: pd.DataFrame, events: pd.DataFrame, params: Params,
                 endpoints: dict):
        self.segments = segments
        self.captures = captures
        self.connections = connections
        self.events = events
        self.params = params
        self._endpoints = endpoints  # conn_id -> (client Endpoint, server Endpoint)
        self._findings: pd.DataFrame | None = None

    @property
    def capture_end(self) -> float | None:
        ends = [c.last_ts for c in self.captures if c.last_ts is not None]
        return max(ends) if ends else None

    @property
    def findings(self) -> pd.DataFrame:
        if self._findings is None:
            from .findings import compute_findings
            self._findings = compute_findings(self)
        return self._findings

    def sockets(self, at: float | None = None, host: str | None = None) -> pd.DataFrame:
        """Every socket alive at instant `at` (None: capture end), as `ss -tan` would list it:
        conn_id, host, port, peer, peer_port, side (client/server) and state."""
        t = self.capture_end if at is None else at
        rows = []
        c = self.connections
        for cid, cip, cport, sip, sport in zip(c["conn_id"], c["client_ip"], c["client_port"],
                                                c["server_ip"], c["server_port"]):
            for ep, side, me, peer in zip(self._endpoints[cid], SIDE_NAMES,
                                          ((cip, cport), (sip, sport)), ((sip, sport), (cip, cport))):
                st = ep.state_at(t) if t is not None else None
                if st is not None and st not in ("CLOSED", "LISTEN") and host in (None, me[0]):
                    rows.append((cid, *me, *peer, side, st))
        return pd.DataFrame(rows, columns=["conn_id", "host", "port", "peer", "peer_port",
                                           "side", "state"])

    def states(self, at: float | None = None, host: str | None = None) -> pd.DataFrame:
        """netstat-like counts: one row per (host, state) at instant `at` (None: capture end).

        Each connection counts once on its client host and once on its server host, with
        the state that side was in at that instant; sides already CLOSED are not counted.
        """
        out = self.sockets(at, host)[["host", "state"]].value_counts().rename("count").reset_index()
        return out.sort_values(["host", "count", "state"], ascending=[True, False, True],
                               ignore_index=True)

    def state_timeline(self, freq: str = "1s", host: str | None = None) -> pd.DataFrame:
        """Counts per state over time: index = time (UTC) every `freq` and the capture's end,
        one column per state."""
        if self.capture_end is None or not len(self.connections):
            return pd.DataFrame()
        step = pd.Timedelta(freq).total_seconds()
        start = math.floor(float(self.connections["first_ts"].min()) / step) * step
        secs = np.arange(start, self.capture_end, step)
        secs = np.append(secs, self.capture_end)  # the last row is the capture's end
        grid = pd.to_datetime(secs, unit="s", utc=True)
        counts: dict[str, np.ndarray] = {}
        for ep, ip in self._sockets():
            if host is not None and ip != host:
                continue
            for k, st in enumerate(ep.states):
                if st in ("CLOSED", "LISTEN"):
                    continue
                until = ep.times[k + 1] if k + 1 < len(ep.times) else math.inf
                live = (secs >= ep.times[k]) & (secs < until)
                counts.setdefault(st, np.zeros(len(secs), dtype=np.int64))
                counts[st] += live
        return pd.DataFrame(counts, index=grid)

    def _sockets(self):
        """Every (Endpoint, host ip): each connection once on its client and on its server."""
        c = self.connections
        for cid, client_ip, server_ip in zip(c["conn_id"], c["client_ip"], c["server_ip"]):
            client, server = self._endpoints[cid]
            yield client, client_ip
            yield server, server_ip

    def endpoint(self, conn_id: int):
        """(client, server) tcpstate.Endpoint of one connection: its state history."""
        return self._endpoints[conn_id]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "captures": [asdict(c) for c in self.captures],
                **{name: list(_records(df)) for name, df in self._tables()}}

    def to_json(self, path: str | os.PathLike | None = None) -> str | None:
        """The `pcapflow/1` document: written to `path` (returned as text when None)."""
        if path is None:
            buf = io.StringIO()
            self.write_json(buf)
            return buf.getvalue()
        with open(path, "w") as fh:
            self.write_json(fh)
        return None

    def write_json(self, fh) -> None:
        """Stream the document record by record, never holding it whole in memory."""
        dump = functools.partial(json.dumps, separators=(",", ":"), default=_json_default,
                                 allow_nan=False)
        fh.write(f'{{"schema":{dump(SCHEMA)},"captures":{dump([asdict(c) for c in self.captures])}')
        for name, df in self._tables():
            fh.write(f',"{name}":[')
            for k, rec in enumerate(_records(df)):
                fh.write(("," if k else "") + dump(rec))
            fh.write("]")
        fh.write("}\n")

    def _tables(self):
        return (("connections", self.connections), ("events", self.events),
                ("findings", self.findings))

    def plot_ladder(self, conn_id: int, ax=None):
        from .report.charts import ladder
        return ladder(self, conn_id, ax=ax)

    def plot_states(self, freq: str = "1s", host: str | None = None):
        from .report.charts import states_over_time
        return states_over_time(self, freq=freq, host=host)

    def plot_backoff(self, conn_id: int | None = None):
        from .report.charts import fin_backoff
        return fin_backoff(self, conn_id)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if math.isnan(o) else float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _records(df: pd.DataFrame):
    """Rows as dicts of plain Python values, NaN as None."""
    cols = list(df.columns)
    for row in zip(*(df[c].tolist() for c in cols)):
        yield {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in zip(cols, row)}


def analyze(sources, msl: float = 30.0, fin_timeout: float = 60.0,
            filter: str | None = None,
            progress: Callable[[int], None] | None = None,
            analysis_progress: Callable[[int, int], None] | None = None) -> Analysis:
    """Analyze captures (a path, '-', an open binary file, or a list of them) as one timeline.

    `progress(bytes)` follows the reading, `analysis_progress(done, total)` the connections.
    """
    segments, captures = read_captures(sources, progress=progress)
    if filter:
        from .bpf import parse
        keep = parse(filter)(segments)
        for index, n in segments.loc[~keep, "capture"].value_counts().items():
            captures[index].skipped["filtered"] = int(n)  # counted, like every skipped packet
            captures[index].tcp_packets -= int(n)
        segments = segments[keep].reset_index(drop=True)
    return build(segments, captures, Params(msl=msl, fin_timeout=fin_timeout),
                 progress=analysis_progress)


def build(segments: pd.DataFrame, captures: list[CaptureInfo], params: Params,
          capture_end: float | None = None,
          progress: Callable[[int, int], None] | None = None) -> Analysis:
    """Connections and events from a segment table (the part of `analyze` after reading).

    `capture_end` is when the whole timeline ends (default: its last packet); a caller that
    builds one part of a larger timeline (batch partitions) passes the timeline's end.
    """
    seg, conns = assign_connections(segments)
    if capture_end is None:
        capture_end = max((c.last_ts for c in captures if c.last_ts is not None), default=0.0)
        if len(seg):
            capture_end = max(capture_end, float(seg["ts"].max()))
    seg = seg.sort_values(["conn", "ts"], kind="stable", ignore_index=True)
    flows = _flows(seg[~seg["dup"]])
    wire = _flows(seg)  # Zeek counts every captured packet, duplicates included
    vantages = _vantages(conns, flows)
    inferred = conns.set_index("conn_id")["roles_inferred"]
    rows, events, endpoints = [], [], {}
    for n, (cid, flow) in enumerate(flows.items(), 1):
        if progress is not None and (n % 2000 == 0 or n == len(flows)):
            progress(n, len(flows))
        v = vantages[cid]
        res = reconstruct(flow, v, vt.local_sides(v), capture_end, params)
        rows.append({"conn_id": cid, "first_ts": float(flow.ts[0]), "last_ts": float(flow.ts[-1]),
                     **res.row, **zeek_fields(wire[cid], bool(inferred[cid]))})
        endpoints[cid] = res.endpoints
        events += [(cid, t, SIDE_NAMES[s], kind, a, b, d) for t, s, kind, a, b, d in res.events]
    if not rows:
        return Analysis(seg, captures, pd.DataFrame(columns=CONNECTION_COLUMNS),
                        pd.DataFrame(columns=EVENT_COLUMNS), params, {})
    table = conns.merge(pd.DataFrame(rows), on="conn_id", how="left")
    table, reuse_events = _reuse(table, flows, endpoints)
    events += reuse_events
    dup = seg.groupby("conn")["dup"].sum()
    table["duplicates"] = table["conn_id"].map(dup).fillna(0).astype(int)
    frames = seg.groupby(["conn", "dir"])["framelen"].sum().unstack(fill_value=0)
    for d, side in enumerate(SIDE_NAMES):  # every captured frame, as tshark and Arkime count
        col = frames[d] if d in frames else pd.Series(dtype="int64")
        table[f"{side}_frame_bytes"] = table["conn_id"].map(col).fillna(0).astype(np.int64)
    table = table[CONNECTION_COLUMNS].set_index("conn_id", drop=False).rename_axis(None)
    ev = pd.DataFrame(events, columns=EVENT_COLUMNS).sort_values(["ts", "conn_id"], kind="stable",
                                                                 ignore_index=True)
    return Analysis(seg, captures, table, ev, params, endpoints)


def _flows(seg: pd.DataFrame) -> dict[int, Flow]:
    """One Flow per connection from segments sorted by (conn, ts)."""
    if seg.empty:
        return {}
    conn = seg["conn"].to_numpy()
    bounds = np.flatnonzero(np.diff(conn)) + 1
    arrays = {k: seg[{"d": "dir"}.get(k, k)].to_numpy() for k in FLOW_FIELDS}
    return {int(conn[a]): Flow(**{k: v[a:b] for k, v in arrays.items()})
            for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(seg)]]))}


def _vantages(conns: pd.DataFrame, flows: dict) -> dict[int, str]:
    """Vantage per connection: handshake timing, else TTLs, else what the same hosts showed."""
    out, local_votes = {}, Counter()
    for cid, client_ip, server_ip in conns[["conn_id", "client_ip", "server_ip"]].itertuples(index=False):
        f = flows.get(cid)
        if f is None:
            continue
        if vt.is_loopback(client_ip, server_ip):
            out[cid] = "both"
            continue
        v = vt.from_handshake(*handshake_times(f))
        if v is None:
            c_ttl = f.ttl[f.d == 0]
            s_ttl = f.ttl[f.d == 1]
            v = vt.from_ttls(int(c_ttl[0]) if len(c_ttl) else None, int(s_ttl[0]) if len(s_ttl) else None)
        out[cid] = v
        if v in ("client", "server"):
            local_votes[client_ip if v == "client" else server_ip] += 1
    for cid, client_ip, server_ip in conns[["conn_id", "client_ip", "server_ip"]].itertuples(index=False):
        if out.get(cid) is None:
            c, s = local_votes[client_ip], local_votes[server_ip]
            out[cid] = "client" if c > s else "server" if s > c else "unknown"
    return out


def _reuse(table: pd.DataFrame, flows: dict, endpoints: dict) -> tuple[pd.DataFrame, list]:
    """4-tuple reuse inside TIME_WAIT: gap, RFC 6191 safety of the new SYN, and the old
    TIME_WAIT ended by it (Linux hands the slot to the new connection)."""
    table = table.copy()
    a = table["client_ip"] + "|" + table["client_port"].astype(str)
    b = table["server_ip"] + "|" + table["server_port"].astype(str)
    table["_key"] = np.where(a < b, a + "/" + b, b + "/" + a)  # whichever side is client
    pairs = table.sort_values(["_key", "incarnation"], kind="stable")
    same = pairs["_key"].to_numpy()[1:] == pairs["_key"].to_numpy()[:-1]
    updates, events = {}, []
    for old, new in zip(pairs.iloc[:-1][same].itertuples(), pairs.iloc[1:][same].itertuples()):
        fnew = flows[new.conn_id]
        syn = np.flatnonzero((fnew.flags & (SYN | ACK)) == SYN)
        t = float(fnew.ts[syn[0]]) if len(syn) else None
        if t is None:
            continue
        reset = _old_reset_by_new_syn(flows[old.conn_id], t)
        if reset is not None:  # RFC 9293 3.10.7.4: the old socket answered the SYN with an ACK
            events.append((new.conn_id, t, "client", "SYN", "SYN_SENT", "SYN_SENT",
                           (f"met connection {old.conn_id} still alive on the peer: its ACK "
                           f"answered, the client reset it at +{reset - t:.3f} s, SYN retried")))
        if pd.isna(old.time_wait_start) or t >= old.time_wait_end:
            continue
        gap = round(t - old.time_wait_start, 6)
        check, signature = _reuse_check(flows[old.conn_id], fnew, old, new, syn[0])
        updates[new.Index] = {"reused_4tuple": True, "reuse_gap_s": gap, "reuse_check": check,
                              "reuse_isn_signature": signature}
        events.append((new.conn_id, t, "client", "TW_REUSE", "SYN_SENT", "SYN_SENT",
                       f"{gap:.3f} s after TIME_WAIT began on connection {old.conn_id}; {check}"
                       + ("; ISN = old snd.nxt + 65537 (Linux reused the slot)" if signature else "")))
        for s, side in enumerate(("client", "server")):
            moved = endpoints[old.conn_id][s].handle(tcpstate.TW_REPLACED, t)
            if moved:
                updates.setdefault(old.Index, {}).update(
                    {f"{side}_state_end": moved[1], "time_wait_end": t})
                events.append((old.conn_id, t, side, "STATE", *moved,
                               f"TIME_WAIT taken over by connection {new.conn_id}"))
    table = table.drop(columns="_key")
    fields = pd.DataFrame.from_dict(updates, orient="index")
    for col, default in (("reused_4tuple", False), ("reuse_gap_s", None), ("reuse_check", None),
                         ("reuse_isn_signature", False)):
        table[col] = fields[col].reindex(table.index) if col in fields else None
        table[col] = table[col].astype(object).where(table[col].notna(), default)
    for col in ("client_state_end", "server_state_end", "time_wait_end"):
        if col in fields:
            table[col] = fields[col].reindex(table.index).combine_first(table[col])
    return table, events


def _old_reset_by_new_syn(fold: Flow, t: float) -> float | None:
    """When the client reset the old connection after the peer answered the new SYN (at t)
    with an ACK of the old one, else None."""
    later = fold.ts >= t
    answered = later & (fold.d == 1) & ((fold.flags & (SYN | RST | ACK)) == ACK)
    if not answered.any():
        return None
    since = fold.ts >= fold.ts[np.argmax(answered)]
    rst = np.flatnonzero(since & (fold.d == 0) & ((fold.flags & RST) != 0))
    return float(fold.ts[rst[0]]) if len(rst) else None


def _reuse_check(fold: Flow, fnew: Flow, old, new, k: int) -> tuple[str, bool]:
    """isn_higher / timestamp_newer / unsafe (RFC 6191), and whether an ISN is exactly the old
    snd.nxt + 65537 (Linux tcp_timewait_state_process reusing a TIME_WAIT slot)."""
    same_dir = 0 if (old.client_ip, old.client_port) == (new.client_ip, new.client_port) else 1
    mine = fold.d == same_dir
    old_end = _seq_end(fold, mine)
    isn = int(fnew.seq[k])
    signature = old_end is not None and isn == (old_end + 65537) % MOD
    synack = np.flatnonzero((fnew.flags & (SYN | ACK)) == SYN | ACK)
    if len(synack):
        old_srv_end = _seq_end(fold, ~mine)
        signature |= old_srv_end is not None and int(fnew.seq[synack[0]]) == (old_srv_end + 65537) % MOD
    if old_end is not None and after(isn, old_end):
        return "isn_higher", bool(signature)
    old_ts = fold.tsval[mine]
    old_ts = old_ts[old_ts >= 0]
    if fnew.tsval[k] >= 0 and len(old_ts) and after(int(fnew.tsval[k]), int(old_ts.max())):
        return "timestamp_newer", bool(signature)
    return "unsafe", bool(signature)


def _seq_end(f: Flow, mask: np.ndarray) -> int | None:
    if not mask.any():
        return None
    seq, plen, fl = f.seq[mask], f.plen[mask], f.flags[mask]
    ends = (seq + plen + ((fl & (SYN | FIN)) > 0)) % MOD
    return int(ends[-1])
