"""The Analysis object users hold: captures -> segments -> connections -> events -> tables."""
from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import math
import os
from collections import ChainMap, Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import asdict
from json.encoder import encode_basestring_ascii

import numpy as np
import pandas as pd

from . import tcpstate, zeek
from . import vantage as vt
from .capture import CaptureInfo, factorize_pair, read_captures, use_compiled
from .detectors import handshake_times
from .flows import assign_connections
from .seq import ACK, FIN, MOD, RST, SYN, after
from .teardown import Flow, Params, reconstruct

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
COMPILED_MIN_SEGMENTS = 20_000  # fewer: loading the compiled code costs more than it saves
FLOW_FIELDS = ["ts", "d", "seq", "ack", "flags", "plen", "win", "ipid", "ttl", "tsval", "dsack", "http"]


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cycle collector: the analysis makes millions of small lists, dicts and
    records (none in a cycle that outlives it), and each collection would walk them all."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Analysis:
    """Everything pcapflow found in one timeline of captures.

    `connections`, `events` and `findings` are DataFrames whose columns are named as in
    SPEC.md; `segments` is the TCP segment table they were built from.
    """

    def __init__(self, segments: pd.DataFrame, captures: list[CaptureInfo],
                 connections: pd.DataFrame, events: pd.DataFrame, params: Params,
                 endpoints: dict, undecided: list[int] | None = None):
        self._segments = segments  # conn, dir and dup assigned, rows in any order
        self.undecided = undecided or []  # conn_ids whose vantage other connections voted
        self.captures = captures
        self.connections = connections
        self.events = events
        self.params = params
        self._endpoints = endpoints  # conn_id -> (client Endpoint, server Endpoint)
        self._findings: pd.DataFrame | None = None

    @functools.cached_property
    def segments(self) -> pd.DataFrame:
        """The segment table, sorted by (conn, ts) when first asked for: the JSON and CSV
        tables never need that copy of it."""
        return self._segments.sort_values(["conn", "ts"], kind="stable", ignore_index=True)

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
        """Stream the document a batch of records at a time, never holding its text whole."""
        write_document(fh, self.captures, ((name, [df]) for name, df in self._tables()))

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


@_gc_paused()
def write_document(fh, captures: list[CaptureInfo], tables, compiled: bool | None = None) -> None:
    """The `pcapflow/1` document to `fh`: `tables` gives (name, its rows as frames, in
    order). Rows joined by fastjson (ASCII bytes in a numpy array) go to the binary file under
    a text one as they are: three copies of every byte fewer. `compiled`: join with fastjson
    (default: for frames big enough to repay loading it)."""
    raw = getattr(fh, "buffer", None)

    def write(part: str | np.ndarray) -> None:
        if not isinstance(part, np.ndarray):
            fh.write(part)
        elif raw is None:
            fh.write(part.tobytes().decode("ascii"))
        else:
            fh.flush()  # what the text layer holds goes first
            raw.write(part)

    write(f'{{"schema":{_dump(SCHEMA)},"captures":{_dump([asdict(c) for c in captures])}')
    for name, frames in tables:
        write(f',"{name}":[')
        first = True
        for df in frames:
            for rows in _json_rows(df, compiled=compiled):
                if not first:
                    write(",")
                write(rows)
                first = False
        write("]")
    write("}\n")


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


_dump = functools.partial(json.dumps, separators=(",", ":"), default=_json_default, allow_nan=False,
                          check_circular=False)  # table cells hold no reference cycles


def _records(df: pd.DataFrame):
    """Rows as dicts of plain Python values, NaN as None."""
    cols = list(df.columns)
    values = [_plain(df[c]) for c in cols]
    for row in zip(*values):
        yield dict(zip(cols, row))


def _json_rows(df: pd.DataFrame, rows: int = 1 << 14, compiled: bool | None = None):
    """The rows as `_dump` writes `_records`, comma-separated, `rows` rows a part: each
    column's distinct values encoded once, the rows joined from their texts, by fastjson
    (ASCII bytes in a numpy array) when numba is there and the table is big, else in Python."""
    keys = [("{" if k == 0 else ",") + _dump(c) + ":" for k, c in enumerate(df.columns)]
    compiled = use_compiled(len(df) >= COMPILED_MIN_SEGMENTS if compiled is None else compiled)
    if compiled:
        from .fastjson import join_rows
    else:
        template = "".join(key.replace("%", "%%") + "%s" for key in keys) + "}"

        def join_rows(columns, keys):
            return ",".join(map(template.__mod__, zip(*(
                map(texts.__getitem__, codes.tolist()) for codes, texts, _ in columns))))
    for start in range(0, len(df), rows):
        part = df.iloc[start:start + rows]
        yield join_rows([_json_cells(part[c], compiled) for c in df.columns], keys)


def _json_cells(col: pd.Series, compiled: bool = False) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """A column as codes into the JSON texts of its distinct values; code -1 is the last
    text, "null" where a column can hold missing values. `compiled`: floats fastjson writes
    itself get the code fastjson.FORMATTED, and the column's values come back third."""
    if isinstance(col.dtype, pd.StringDtype):  # few distinct texts: sides, kinds, states
        codes, texts = pd.factorize(col)
        return codes, [*map(encode_basestring_ascii, texts.tolist()), "null"], None  # tolist: 7x iterating
    if col.dtype == object:  # None, lists, mixed types: each distinct object encoded once
        present = col.notna().to_numpy()
        values = col.to_numpy()[present]
        codes = np.full(len(col), -1, dtype=np.int64)
        codes[present] = pd.factorize(np.fromiter(map(id, values), np.uint64, len(values)))[0]
        first = np.unique(codes[present], return_index=True)[1]
        return codes, [*(_JSON_SCALARS.get(type(v), _dump)(v) for v in values[first].tolist()), "null"], None
    values = col.to_numpy()
    if values.dtype.kind == "f":
        if not compiled:
            return (*_float_cells(values), None)
        from .fastjson import FORMATTED, formatted
        done = formatted(values)
        codes = np.full(len(values), FORMATTED, dtype=np.int64)
        codes[~done], texts = _float_cells(values[~done])
        return codes, texts, values
    codes, uniques = pd.factorize(values)
    uniques = uniques.tolist()  # one Python type throughout (int or bool)
    encode = _JSON_SCALARS.get(type(uniques[0]), _dump) if uniques else _dump
    return codes, list(map(encode, uniques)), None


def _float_cells(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """_json_cells of floats: bit for bit (-0.0 is not 0.0); NaN is null."""
    codes, bits = pd.factorize(values.view(np.int64))
    floats = bits.view(np.float64)
    texts = list(map(float.__repr__, floats.tolist()))
    for k in np.flatnonzero(~np.isfinite(floats)).tolist():  # NaN: null; inf: refused
        texts[k] = "null" if math.isnan(floats[k]) else _json_float(float(floats[k]))
    return codes, texts


def _json_float(v: float) -> str:
    return float.__repr__(v) if math.isfinite(v) else _dump(v)  # json.dumps: repr, NaN refused


def _json_list(v: list) -> str:
    return _dump(v) if v else "[]"  # most list cells (backoffs, losses) are empty


_JSON_BOOL = {True: "true", False: "false"}.__getitem__
_JSON_SCALARS = {str: encode_basestring_ascii, int: int.__repr__, float: _json_float, list: _json_list,
                 bool: _JSON_BOOL, np.bool_: _JSON_BOOL, type(None): {None: "null"}.__getitem__}


def _plain(col: pd.Series) -> list:
    """A column's values as plain Python, NaN as None."""
    values = col.tolist()
    if not col.hasnans:
        return values
    return [None if isinstance(v, float) and math.isnan(v) else v for v in values]


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


@_gc_paused()
def build(segments: pd.DataFrame, captures: list[CaptureInfo], params: Params,
          capture_end: float | None = None,
          progress: Callable[[int, int], None] | None = None,
          votes: Mapping[str, int] | None = None) -> Analysis:
    """Connections and events from a segment table (the part of `analyze` after reading).

    `capture_end` is when the whole timeline ends (default: its last packet); a caller that
    builds one part of a larger timeline (batch partitions) passes the timeline's end, and
    the `votes` of the timeline's other connections (host -> connections that put the
    capture point on it), which with these connections' own decide the vantage of those
    whose own packets cannot. The Analysis's `undecided` lists those connections.
    """
    compiled = use_compiled(len(segments) >= COMPILED_MIN_SEGMENTS)  # numba kernels, Python for the rest
    seg, conns = assign_connections(segments, compiled)
    if capture_end is None:
        capture_end = max((c.last_ts for c in captures if c.last_ts is not None), default=0.0)
        if len(seg):
            capture_end = max(capture_end, float(seg["ts"].max()))
    order = np.lexsort((seg["ts"].to_numpy(), seg["conn"].to_numpy()))  # by (conn, ts), stable
    wire = _Flows(seg, order)  # Zeek counts every captured packet, duplicates included
    is_dup = seg["dup"].to_numpy()
    flows = _Flows(seg, order[~is_dup[order]]) if is_dup.any() else wire
    # both tables held as one list per column: a dict or tuple per row would take ~3x the memory
    rows: dict[str, list] = defaultdict(list)
    events: dict[str, list] = {k: [] for k in EVENT_COLUMNS}
    details: dict[str, str] = {}  # one object per distinct text: most repeat ("2MSL expired")
    endpoints = {}
    fast_rows, fast_events, histories = {}, {}, {}
    undecided: list[int] = []
    if compiled:
        todo, (fast_rows, fast_events, histories) = _compiled(flows, conns, capture_end, params,
                                                                votes, undecided)
        if progress is not None:
            progress(len(histories), len(flows))
    else:
        todo = _with_vantages(conns, flows, votes, undecided)
    for n, (cid, flow, v) in enumerate(todo, len(histories) + 1):
        if progress is not None and (n % 2000 == 0 or n == len(flows)):
            progress(n, len(flows))
        res = reconstruct(flow, v, vt.local_sides(v), capture_end, params)
        row = {"conn_id": cid, "first_ts": flow.ts[0], "last_ts": flow.ts[-1], **res.row}
        for k, value in row.items():
            rows[k].append(value)
        endpoints[cid] = res.endpoints
        _extend(events, [(cid, t, SIDE_NAMES[s], kind, a, b, details.setdefault(d, d))
                         for t, s, kind, a, b, d in res.events])
    if not len(flows):  # no connection (each has rows from the kernel or from Python)
        return Analysis(seg, captures, pd.DataFrame(columns=CONNECTION_COLUMNS),
                        pd.DataFrame(columns=EVENT_COLUMNS), params, {})
    endpoints = ChainMap(endpoints, histories)
    table = conns.merge(pd.DataFrame(_joined(fast_rows, rows)), on="conn_id", how="left")
    del rows, fast_rows
    inferred = conns["roles_inferred"].to_numpy()  # conns' rows are in conn_id order
    table = table.merge(_zeek_table(wire, inferred, compiled), on="conn_id", how="left")
    table, reuse_events = _reuse(table, flows, endpoints)
    del wire, flows  # their copy of the segment columns
    _extend(events, reuse_events)
    conn, at = seg["conn"].to_numpy(), table["conn_id"].to_numpy()  # conn_ids: 0..len(conns) - 1

    def per_connection(weights, rows=slice(None)):
        return np.bincount(conn[rows], weights=weights[rows], minlength=len(conns))[at].astype(np.int64)

    table["duplicates"] = per_connection(seg["dup"].to_numpy())
    for d, side in enumerate(SIDE_NAMES):  # every captured frame, as tshark and Arkime count
        table[f"{side}_frame_bytes"] = per_connection(seg["framelen"].to_numpy(), seg["dir"].to_numpy() == d)
    table = table[CONNECTION_COLUMNS].set_index("conn_id", drop=False).rename_axis(None)
    ev = pd.DataFrame(_joined(fast_events, events))
    del events, fast_events  # the frame holds their values
    # by (ts, conn_id), stable; the kernel's events come in that order, so when they are all
    # there is, nothing moves
    ts, cid = ev["ts"].to_numpy(), ev["conn_id"].to_numpy()
    if not ((ts[1:] > ts[:-1]) | (ts[1:] == ts[:-1]) & (cid[1:] >= cid[:-1])).all():
        ev = ev.take(np.lexsort((cid, ts))).reset_index(drop=True)
    return Analysis(seg, captures, table, ev, params, endpoints, undecided)


def _joined(first: dict[str, np.ndarray], rest: dict[str, list]) -> dict:
    """The compiled path's columns then the Python reference's, typed by pd.DataFrame as one
    list each would be."""
    if not len(first.get("conn_id", ())):
        return rest
    if not next(iter(rest.values()), None):
        return first
    return {k: first[k].tolist() + rest[k] for k in first}


def _extend(columns: dict[str, list], rows: list[tuple]) -> None:
    """Append rows (tuples in the columns' order) to a table held as one list per column."""
    for column, values in zip(columns.values(), zip(*rows)):
        column.extend(values)


def _zeek_table(wire: _Flows, inferred: np.ndarray, compiled: bool) -> pd.DataFrame:
    """conn_id and Zeek's conn.log columns of every connection: `compiled`, or by the reference
    replay (zeek.zeek_fields), which also does what the compiled one hands back."""
    ids = np.fromiter(wire, np.int64, len(wire))
    if compiled:
        from .fastzeek import zeek_columns
        c = wire.cols
        flipped = zeek.flipped(c["d"][wire.starts], c["flags"][wire.starts], inferred[ids])
        cols, redo = zeek_columns(wire.starts, wire.ends, flipped,
                                  *(c[k] for k in ("d", "flags", "seq", "ack", "plen", "win", "ts")))
        if redo:  # lists, typed by pd.DataFrame once the reference's values are in them
            cols = {k: [None if math.isnan(x) else int(x) for x in v.tolist()] if v.dtype.kind == "f"
                    else v.tolist() for k, v in cols.items()}  # byte counts: ints, None unset (NaN)
    else:
        cols, redo = {k: [None] * len(ids) for k in zeek.COLUMNS}, range(len(ids))
    for k in redo:
        for name, value in zeek.zeek_fields(wire[ids[k]], bool(inferred[ids[k]])).items():
            cols[name][k] = value
    return pd.DataFrame({"conn_id": ids, **cols})


class _Flows(Mapping):
    """conn_id -> Flow, each made when asked for from the segment table's `rows` in (conn, ts)
    order: every connection's lists at once would hold ~400 bytes a packet, so the columns
    become Python lists a block of rows at a time when connections are asked for in order. `cols` holds the columns in that order,
    connection k's rows being starts[k]..ends[k]."""

    BLOCK = 1 << 12  # rows

    def __init__(self, seg: pd.DataFrame, rows: np.ndarray):
        self.cols = {k: seg[{"d": "dir"}.get(k, k)].to_numpy()[rows] for k in FLOW_FIELDS}
        conn = seg["conn"].to_numpy()[rows]
        self.starts = np.flatnonzero(np.diff(conn, prepend=-1))
        self.ends = np.append(self.starts[1:], len(conn))
        self._rows = dict(zip(conn[self.starts].tolist(), zip(self.starts.tolist(), self.ends.tolist())))
        self._block: tuple[int, int, list[list]] = (0, 0, [])

    def __getitem__(self, cid: int) -> Flow:
        a, b = self._rows[cid]
        lo, hi, lists = self._block
        if lo <= a <= b <= hi:
            return Flow(*(c[a - lo:b - lo] for c in lists))
        if a != hi:  # not the next connection in order: this one alone
            return Flow(*(c[a:b].tolist() for c in self.cols.values()))
        lo, hi = a, max(b, a + self.BLOCK)
        lists = [c[lo:hi].tolist() for c in self.cols.values()]
        self._block = lo, hi, lists
        return Flow(*(c[a - lo:b - lo] for c in lists))

    def __iter__(self):
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def _compiled(flows: _Flows, conns: pd.DataFrame, capture_end: float, params: Params,
              votes: Mapping[str, int] | None, undecided: list[int]):
    """The compiled path: every connection's vantage, and the connections the kernel can
    reconstruct. Returns (conn_id, Flow, vantage) of the rest, and the kernel's connection
    columns, event columns and endpoints (fastteardown.clean_connections); adds to
    `undecided` the connections votes decided (these connections' and `votes`)."""
    from . import fastteardown as ft
    ids = list(flows)
    at = conns.set_index("conn_id").loc[ids]
    client_ip, server_ip = at["client_ip"].to_numpy(), at["server_ip"].to_numpy()
    loopback = np.fromiter(map(vt.is_loopback, client_ip, server_ip), np.bool_, len(ids))  # cached per pair
    vantage, voted = ft.vantages(flows.cols, flows.starts, flows.ends, client_ip, server_ip, loopback, votes)
    undecided.extend(np.asarray(ids)[voted].tolist())
    done = ft.clean_connections(flows, ids, vantage, capture_end, params.msl)
    left = np.flatnonzero(~np.isin(ids, done[0]["conn_id"]))
    return ((ids[k], flows[ids[k]], ft.VANTAGES[vantage[k]]) for k in left.tolist()), done


def _with_vantages(conns: pd.DataFrame, flows: Mapping, votes: Mapping[str, int] | None = None,
                   undecided: list[int] | None = None):
    """(conn_id, Flow, vantage) of each connection: from its handshake timing, else its TTLs;
    those still undecided come last (added to `undecided`), decided by what the same hosts
    showed, here and in `votes` (host -> other connections placing the capture point on it)."""
    undecided = [] if undecided is None else undecided
    ends = dict(zip(conns["conn_id"].tolist(), zip(conns["client_ip"].tolist(),
                                                   conns["server_ip"].tolist())))
    local_votes = Counter()
    for cid, f in flows.items():
        client_ip, server_ip = ends[cid]
        if vt.is_loopback(client_ip, server_ip):
            yield cid, f, "both"
            continue
        v = vt.from_handshake(*handshake_times(f))
        if v is None:
            v = vt.from_ttls(*(next((t for d, t in zip(f.d, f.ttl) if d == s), None) for s in (0, 1)))
        if v is None:
            undecided.append(cid)
            continue
        if v in ("client", "server"):
            local_votes[client_ip if v == "client" else server_ip] += 1
        yield cid, f, v
    votes = local_votes + Counter(votes or {})
    for cid in undecided:
        client_ip, server_ip = ends[cid]
        yield cid, flows[cid], vt.by_votes(votes.get(client_ip, 0), votes.get(server_ip, 0))


def _reuse(table: pd.DataFrame, flows: _Flows, endpoints: Mapping) -> tuple[pd.DataFrame, list]:
    """4-tuple reuse inside TIME_WAIT: gap, RFC 6191 safety of the new SYN, and the old
    TIME_WAIT ended by it (Linux hands the slot to the new connection)."""
    client, server = factorize_pair(table["client_ip"].to_numpy(), table["server_ip"].to_numpy())
    client = (client.astype(np.int64) << 16) | table["client_port"].to_numpy()
    server = (server.astype(np.int64) << 16) | table["server_port"].to_numpy()
    lo, hi = np.minimum(client, server), np.maximum(client, server)  # whichever side is client
    order = np.lexsort((table["incarnation"].to_numpy(), hi, lo))
    same = (lo[order][1:] == lo[order][:-1]) & (hi[order][1:] == hi[order][:-1])
    olds, news = order[:-1][same], order[1:][same]  # each incarnation and the next on its 4-tuple
    first_syn, last_answer = _first_syn_last_answer(flows, table["conn_id"].to_numpy())
    tw_start, tw_end = (table[c].astype(float).to_numpy() for c in ("time_wait_start", "time_wait_end"))
    t = first_syn[news]
    answered = last_answer[olds] >= t  # the old side may have answered the new SYN
    in_tw = ~np.isnan(tw_start[olds]) & ~(t >= tw_end[olds])  # NaN: no SYN, no answer, no end
    conn_id, tw_start = table["conn_id"].tolist(), tw_start.tolist()
    updates, events = {}, []
    for k in np.flatnonzero(~np.isnan(t) & (answered | in_tw)).tolist():
        old, new, t_new = int(olds[k]), int(news[k]), float(t[k])
        if answered[k]:
            reset = _old_reset_by_new_syn(flows[conn_id[old]], t_new)
            if reset is not None:  # RFC 9293 3.10.7.4: the old socket answered the SYN with an ACK
                events.append((conn_id[new], t_new, "client", "SYN", "SYN_SENT", "SYN_SENT",
                               (f"met connection {conn_id[old]} still alive on the peer: its ACK "
                               f"answered, the client reset it at +{reset - t_new:.3f} s, SYN retried")))
        if not in_tw[k]:
            continue
        fnew, fold = flows[conn_id[new]], flows[conn_id[old]]
        syn = next(i for i, fl in enumerate(fnew.flags) if fl & (SYN | ACK) == SYN)
        gap = round(t_new - tw_start[old], 6)
        check, signature = _reuse_check(fold, fnew, 0 if client[old] == client[new] else 1, syn)
        updates[table.index[new]] = {"reused_4tuple": True, "reuse_gap_s": gap, "reuse_check": check,
                                     "reuse_isn_signature": signature}
        events.append((conn_id[new], t_new, "client", "TW_REUSE", "SYN_SENT", "SYN_SENT",
                       f"{gap:.3f} s after TIME_WAIT began on connection {conn_id[old]}; {check}"
                       + ("; ISN = old snd.nxt + 65537 (Linux reused the slot)" if signature else "")))
        for s, side in enumerate(("client", "server")):
            moved = endpoints[conn_id[old]][s].handle(tcpstate.TW_REPLACED, t_new)
            if moved:
                updates.setdefault(table.index[old], {}).update(
                    {f"{side}_state_end": moved[1], "time_wait_end": t_new})
                events.append((conn_id[old], t_new, side, "STATE", *moved,
                               f"TIME_WAIT taken over by connection {conn_id[new]}"))
    fields = pd.DataFrame.from_dict(updates, orient="index")
    for col, default in (("reused_4tuple", False), ("reuse_gap_s", None), ("reuse_check", None),
                         ("reuse_isn_signature", False)):
        table[col] = fields[col].reindex(table.index) if col in fields else None
        table[col] = table[col].astype(object).where(table[col].notna(), default)
    for col in ("client_state_end", "server_state_end", "time_wait_end"):
        if col in fields:
            table[col] = fields[col].reindex(table.index).combine_first(table[col])
    return table, events


def _first_syn_last_answer(flows: _Flows, conn_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `conn_id`: the time of its first SYN without ACK, and of the last pure ACK
    its server side sent (what `_old_reset_by_new_syn` looks for); NaN where it has none."""
    ts, flags, d = flows.cols["ts"], flows.cols["flags"], flows.cols["d"]
    owner = np.repeat(np.arange(len(flows)), flows.ends - flows.starts)  # rows in (connection, time) order
    out = np.full((2, len(flows) + 1), np.nan)  # the last column: conn_ids without a flow
    for k, rows in enumerate((np.flatnonzero(flags & (SYN | ACK) == SYN),
                              np.flatnonzero((d == 1) & (flags & (SYN | RST | ACK) == ACK))[::-1])):
        rows = rows[np.unique(owner[rows], return_index=True)[1]]  # each connection's first, or last
        out[k, owner[rows]] = ts[rows]
    at = pd.Index(list(flows)).get_indexer(conn_id)
    return out[0, at], out[1, at]


def _old_reset_by_new_syn(fold: Flow, t: float) -> float | None:
    """When the client reset the old connection after the peer answered the new SYN (at t)
    with an ACK of the old one, else None."""
    rows = list(zip(fold.ts, fold.d, fold.flags))
    answered = next((ts for ts, d, fl in rows if ts >= t and d == 1 and fl & (SYN | RST | ACK) == ACK),
                    None)
    if answered is None:
        return None
    return next((ts for ts, d, fl in rows if ts >= answered and d == 0 and fl & RST), None)


def _reuse_check(fold: Flow, fnew: Flow, same_dir: int, k: int) -> tuple[str, bool]:
    """isn_higher / timestamp_newer / unsafe (RFC 6191), and whether an ISN is exactly the old
    snd.nxt + 65537 (Linux tcp_timewait_state_process reusing a TIME_WAIT slot). `same_dir`:
    the old connection's side (0 client, 1 server) that sent the new SYN; k: that SYN's row."""
    old_end = _seq_end(fold, same_dir)
    isn = fnew.seq[k]
    signature = old_end is not None and isn == (old_end + 65537) % MOD
    synack = next((i for i, fl in enumerate(fnew.flags) if fl & (SYN | ACK) == SYN | ACK), None)
    if synack is not None:
        old_srv_end = _seq_end(fold, 1 - same_dir)
        signature |= old_srv_end is not None and fnew.seq[synack] == (old_srv_end + 65537) % MOD
    if old_end is not None and after(isn, old_end):
        return "isn_higher", bool(signature)
    old_ts = [ts for d, ts in zip(fold.d, fold.tsval) if d == same_dir and ts >= 0]
    if fnew.tsval[k] >= 0 and old_ts and after(fnew.tsval[k], max(old_ts)):
        return "timestamp_newer", bool(signature)
    return "unsafe", bool(signature)


def _seq_end(f: Flow, d: int) -> int | None:
    """Sequence number after side d's last segment, None if it sent none."""
    last = next((i for i in reversed(range(len(f))) if f.d[i] == d), None)
    if last is None:
        return None
    return (f.seq[last] + f.plen[last] + (1 if f.flags[last] & (SYN | FIN) else 0)) % MOD
