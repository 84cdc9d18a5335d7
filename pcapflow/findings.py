"""Findings: what a person should act on, each with its numbers, evidence, cause and fix.

One function per finding kind (vocab.FINDING_KINDS), each reading the connections table
and returning finding dicts; `READS` lists them with the columns they read.
"""
from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pandas as pd

COLUMNS = ["kind", "severity", "host", "port", "count", "conn_ids", "summary", "explanation",
           "suggestion", "cause"]
SAMPLE = 10
MIN_PILEUP = 10


def finding(kind, severity, host, port, conns: pd.DataFrame, summary, explanation, suggestion,
            cause=None) -> dict:
    return {"kind": kind, "severity": severity, "host": host, "port": port, "count": len(conns),
            "conn_ids": [int(x) for x in conns["conn_id"].head(SAMPLE)], "summary": summary,
            "explanation": explanation, "suggestion": suggestion, "cause": cause}


def peak_concurrency(starts, ends) -> tuple[int, float | None]:
    """Most intervals [start, end) open at once, and when."""
    if len(starts) == 0:
        return 0, None
    t = np.concatenate([np.asarray(starts, float), np.asarray(ends, float)])
    step = np.concatenate([np.ones(len(starts)), -np.ones(len(ends))])
    order = np.lexsort((step, t))
    level = np.cumsum(step[order])
    k = int(np.argmax(level))
    return int(level[k]), float(t[order][k])


def _close_causes(conns: pd.DataFrame) -> pd.Series:
    """Why the server closed first, per connection, from its HTTP messages and timing: a
    `Connection: close` (or HTTP/1.0), a request-count limit (the same number of requests
    on many connections), or an idle timeout (the client's silence before the server's FIN)."""
    multi = conns.loc[conns["http_requests"] >= 2, "http_requests"]
    mode = multi.mode()
    limit = int(mode.iloc[0]) if len(mode) and (multi == mode.iloc[0]).sum() >= 3 else None
    idle = conns["server_fin_ts"] - conns["client_last_data_ts"]
    requests = conns["http_requests"].to_numpy()
    flag = {c: conns[c].to_numpy(bool) for c in ("http_cut", "http_request_close", "http10",
                                                   "http_response_close")}
    labels = np.array(["unknown", "Connection: close", f"request limit ({limit} requests)", "idle timeout"],
                      dtype=object)
    causes = np.select(  # the first that holds, as codes into labels
        [(requests == 0) | flag["http_cut"], flag["http_request_close"] | flag["http10"],
         requests == (-1 if limit is None else limit), flag["http_response_close"],
         (idle >= 0.2).to_numpy()], [0, 1, 2, 1, 3], default=0)
    out = pd.Series(labels[causes], index=conns.index)
    idle_like = out == "idle timeout"
    if idle_like.any():  # the group's typical timeout rather than each gap
        out[idle_like] = f"idle timeout (~{idle[idle_like].median():.1f} s)"
    return out


PILEUP_INPUTS = ["conn_id", "server_ip", "server_port", "time_wait_start", "time_wait_end", "http_requests",
                 "http_cut", "http_request_close", "http10", "http_response_close", "server_fin_ts",
                 "client_last_data_ts"]


def _rows(c: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """A group's rows (positions, in order): the table itself when they are all of it (one
    server, one client: a copy of the table saved)."""
    return c if len(rows) == len(c) else c.take(rows)


def server_time_wait_pileup(a) -> list[dict]:
    c = a.connections
    tw = np.flatnonzero(c["time_wait_side"].isin(["server", "both"]).to_numpy())
    groups = c[["server_ip", "server_port"]].take(tw).groupby(["server_ip", "server_port"]).indices
    out = []
    for (ip, port), rows in sorted(groups.items()):  # only each group's rows copied
        if len(rows) < MIN_PILEUP:
            continue
        g = _rows(c, tw[rows])
        peak, _ = peak_concurrency(g["time_wait_start"], g["time_wait_end"])
        causes = _close_causes(g).value_counts()
        cause_text = ", ".join(f"{k} {v}" for k, v in causes.items())
        out.append(finding(
            "server_time_wait_pileup", "warning" if peak >= 100 else "info", ip, int(port), g,
            f"{ip}:{port} closed first on {len(g)} of {int((c['server_port'] == port).sum())} "
            f"connections and held up to {peak} TIME_WAITs at once; causes: {cause_text}.",
            "The side that closes first keeps each 4-tuple in TIME_WAIT for 60 s (Linux "
            "TCP_TIMEWAIT_LEN). On a server that costs memory, not ports.",
            "Let clients close first or keep connections alive: drop `Connection: close`, raise "
            "the keep-alive idle timeout (nginx keepalive_timeout) and request limit "
            "(keepalive_requests); tcp_max_tw_buckets caps the count.",
            cause=causes.index[0] if len(causes) else None))
    return out


def close_wait_leak(a) -> list[dict]:
    """Passive sides that never closed: absolutely (threshold) or against the port's habit."""
    c = a.connections
    out = []
    for side, ip_col, port_col in (("server", "server_ip", "server_port"),
                                   ("client", "client_ip", "server_port")):
        passive = c.loc[(c["active_closer"] == ("client" if side == "server" else "server")).to_numpy(),
                        ["conn_id", ip_col, port_col, f"{side}_state_end", f"{side}_fin_ts", "close_wait_s"]]
        for (ip, port), g in passive.groupby([ip_col, port_col]):
            stuck = g[g[f"{side}_state_end"] == "CLOSE_WAIT"]
            if stuck.empty:
                continue
            closed = g[g[f"{side}_fin_ts"].notna()]
            waits = closed["close_wait_s"].dropna()
            usual = float(np.median(waits)) if len(waits) else None
            longest = stuck["close_wait_s"].sort_values(ascending=False)
            absolute = longest >= a.params.close_wait_threshold
            habitual = (usual is not None and len(closed) >= len(stuck)
                        and (longest > max(100 * usual, 0.01)))
            leaks = stuck.loc[longest.index[absolute | habitual]]
            if leaks.empty:
                continue
            where = f"{ip}:{port}" if side == "server" else f"{ip} (client of port {port})"
            usual_text = (f"; the {len(closed)} others closed a median {usual * 1e3:.2g} ms "
                          "after the peer's FIN"
                          if usual is not None else "")
            out.append(finding(
                "close_wait_leak", "critical" if len(leaks) >= 10 else "warning", ip, int(port), leaks,
                f"{len(leaks)} connections on {where} stayed in CLOSE_WAIT after the peer's FIN "
                f"(longest {longest.iloc[0]:.1f} s){usual_text}.",
                "CLOSE_WAIT means the application received EOF and never called close(); the "
                "kernel cannot end it (TEARDOWN.md section 6).",
                "Fix the application: handle EOF (read() == 0) by closing the socket; check for "
                "sockets never accepted or never registered with epoll, and for deadlocks before close()."))
    return out


PORT_INPUTS = ["conn_id", "client_ip", "client_port", "server_ip", "server_port", "first_ts", "last_ts",
               "client_state_end", "time_wait_side", "time_wait_end"]


def port_exhaustion_risk(a) -> list[dict]:
    c = a.connections
    lo, hi = a.params.port_range
    size = hi - lo + 1
    out = []
    groups = c[["client_ip", "server_ip", "server_port"]].groupby(["client_ip", "server_ip", "server_port"]).indices
    for (cip, sip, sport), rows in sorted(groups.items()):
        if len(rows) < min(MIN_PILEUP, size / 2):
            continue
        g = _rows(c, rows)
        end = a.capture_end
        held = np.where(g["time_wait_side"].isin(["client", "both"]), g["time_wait_end"],
                        np.where(g["client_state_end"] == "CLOSED", g["last_ts"], end))
        peak, _ = peak_concurrency(g["first_ts"], held.astype(float))
        ports = np.sort(g["client_port"].unique())
        span = int(ports[-1] - ports[0] + 1)
        narrowed = span < size and peak >= 0.9 * span and len(ports) >= 0.9 * span
        if peak < 0.5 * size and not narrowed:
            continue
        note = (f"; the source ports seen form a tight block {ports[0]}-{ports[-1]} that was all in "
                "use: the ephemeral range looks narrowed" if narrowed else "")
        out.append(finding(
            "port_exhaustion_risk", "critical" if peak >= 0.9 * min(size, span) else "warning",
            cip, int(sport), g,
            f"{cip} held up to {peak} ports (TIME_WAIT or open) toward {sip}:{sport}, against an "
            f"ephemeral range of {size}{note}.",
            "Each connection to one destination ip:port needs its own source port until its "
            "TIME_WAIT ends; a failed connect() sends nothing, so a capture shows exhaustion only "
            "as this saturation.",
            "Reuse connections (keep-alive, pooling), let the server close first, enable "
            "net.ipv4.tcp_tw_reuse=1 (with timestamps), or widen net.ipv4.ip_local_port_range."))
    return out


def fin_loss(a) -> list[dict]:
    c = a.connections
    lost = c[np.fromiter(map(len, c["lost_waves"]), np.int64, len(c)) > 0]
    out = []
    for (ip, port), g in lost.groupby(["server_ip", "server_port"]):
        waves = pd.Series([w for ws in g["lost_waves"] for w in ws]).value_counts().sort_index()
        text = ", ".join(f"wave {w}: {n}" for w, n in waves.items())
        out.append(finding(
            "fin_loss", "warning", ip, int(port), g,
            f"{len(g)} connections to {ip}:{port} lost teardown segments ({text}).",
            "Wave 1 is the active closer's FIN, 2 the peer's ACK of it, 3 the passive FIN, 4 the "
            "final ACK. A lost FIN is retransmitted with exponential backoff; a lost final ACK "
            "makes the passive side retransmit its FIN and restarts TIME_WAIT.",
            "Look for packet loss on the path (interface drops, a firewall or NAT dropping "
            "segments of connections it considers closed)."))
    return out


def orphan_giveup(a) -> list[dict]:
    c = a.connections
    g = c[c["orphan_retries_estimate"].notna() | (c["close_type"] == "abandoned")]
    if g.empty:
        return []
    est = g["orphan_retries_estimate"].dropna()
    guess = f" (fits tcp_orphan_retries={int(est.mode().iloc[0])})" if len(est) else ""
    return [finding(
        "orphan_giveup", "warning", None, None, g,
        f"{len(g)} closed sockets retransmitted their FIN until they gave up, never acknowledged{guess}.",
        "An orphaned socket (closed by its application) retransmits its FIN at most "
        "tcp_orphan_retries times (0 means 8), then disappears silently; the peer may stay "
        "ESTABLISHED until it sends and gets an RST.",
        "Find why the FINs were lost (the peer gone, a firewall); a small tcp_orphan_retries "
        "frees memory sooner under FIN floods.")]


def rst_shortcut(a) -> list[dict]:
    c = a.connections
    out = []
    for kind, g in c[c["rst_kind"].notna()].groupby("rst_kind"):
        if kind == "keepalive_timeout":
            continue  # its own finding
        fixes = {
            "abort": "An RST instead of FIN: SO_LINGER with linger 0, or close() with unread data "
                     "(RFC 2525). Read everything before closing, or make the abort intended.",
            "reply_to_closed": "A segment reached a socket already closed or gone (data after "
                               "close, an expired FIN_WAIT_2, a rebooted peer): make the "
                               "protocol agree on who speaks last.",
            "refused": "Nothing listened on that port: check the service and its listen backlog.",
            "other": "RSTs whose TTL does not fit their claimed sender: look for a middlebox "
                     "injecting resets.",
        }
        senders = g["rst_by"].value_counts()
        out.append(finding(
            "rst_shortcut", "warning" if kind in ("abort", "other") else "info", None, None, g,
            f"{len(g)} connections ended by RST of kind {kind} "
            f"(sent by {', '.join(f'{k} {v}' for k, v in senders.items())}).",
            "An RST skips the FIN exchange and TIME_WAIT; the peer's application sees "
            "'connection reset by peer'.", fixes[kind], cause=kind))
    return out


def tw_reuse_unsafe(a) -> list[dict]:
    c = a.connections
    g = c[c["reuse_check"] == "unsafe"]
    if g.empty:
        return []
    return [finding(
        "tw_reuse_unsafe", "warning", None, None, g,
        f"{len(g)} new connections reused a 4-tuple still in TIME_WAIT with neither a higher "
        "ISN nor a newer timestamp.",
        "RFC 6191: a SYN may reuse a TIME_WAIT 4-tuple only if its ISN is above the old "
        "connection's or its timestamp is newer; otherwise old segments can corrupt the new one.",
        "Keep TCP timestamps on (net.ipv4.tcp_timestamps=1) where tcp_tw_reuse is used.")]


def fin_wait2_timeout(a) -> list[dict]:
    c = a.connections
    g = c[c["fin_wait2_timeout"]]
    if g.empty:
        return []
    return [finding(
        "fin_wait2_timeout", "warning", None, None, g,
        f"{len(g)} orphaned FIN_WAIT_2 sockets expired before the peer closed; its late "
        "segments got an RST.",
        "A socket closed by its application waits in FIN_WAIT_2 at most tcp_fin_timeout "
        "(60 s); the peer, still in CLOSE_WAIT, then writes or closes into nothing.",
        "Make the passive side close promptly (it has a CLOSE_WAIT problem), or raise "
        "net.ipv4.tcp_fin_timeout if the peer's delay is legitimate.")]


def keepalive_dead_peer(a) -> list[dict]:
    c = a.connections
    g = c[c["rst_kind"] == "keepalive_timeout"]
    if g.empty:
        return []
    probes = g["unanswered_keepalives"].median()
    return [finding(
        "keepalive_dead_peer", "warning", None, None, g,
        f"{len(g)} connections were reset after {probes:.0f} unanswered keepalive probes"
        f"{' (median)' if len(g) > 1 else ''}.",
        "The peer host vanished (crash, cable, NAT state lost): nothing was sent, only "
        "keepalive probes revealed it (Linux: tcp_keepalive_time/intvl/probes).",
        "Expected when peers die; tune TCP_KEEPIDLE/KEEPINTVL/KEEPCNT (or an application "
        "heartbeat) to detect it as fast as you need.")]


# each finder and the connections' columns it reads: a caller short of memory (batch) hands
# each its own, one finder at a time
READS = {
    server_time_wait_pileup: ["time_wait_side", *PILEUP_INPUTS],
    close_wait_leak: ["conn_id", "active_closer", "server_ip", "client_ip", "server_port",
                      "server_state_end", "client_state_end", "server_fin_ts", "client_fin_ts",
                      "close_wait_s"],
    port_exhaustion_risk: PORT_INPUTS,
    fin_loss: ["conn_id", "lost_waves", "server_ip", "server_port"],
    orphan_giveup: ["conn_id", "orphan_retries_estimate", "close_type"],
    rst_shortcut: ["conn_id", "rst_by", "rst_kind"],
    tw_reuse_unsafe: ["conn_id", "reuse_check"],
    fin_wait2_timeout: ["conn_id", "fin_wait2_timeout"],
    keepalive_dead_peer: ["conn_id", "rst_kind", "unanswered_keepalives"],
}
FINDERS = list(READS)
INPUTS = list(dict.fromkeys(col for cols in READS.values() for col in cols))  # all they read


def compute_findings(a, columns: Callable[[list[str]], pd.DataFrame] | None = None) -> pd.DataFrame:
    """Every finder's findings on `a` (an Analysis, or what batch makes: params, capture_end,
    and connections holding INPUTS unless `columns` is given). Each finder sees the columns
    it reads alone (READS): its groupbys move those, not 70; `columns(names)`, if given,
    makes each finder's table (batch loads them from disk, one finder at a time)."""
    take = columns or a.connections.__getitem__
    rows = []
    for finder, names in READS.items():
        c = take(names)
        if len(c):
            rows += finder(SimpleNamespace(connections=c, params=a.params, capture_end=a.capture_end))
        del c
    order = {"critical": 0, "warning": 1, "info": 2}
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.sort_values("severity", key=lambda s: s.map(order), kind="stable", ignore_index=True)
