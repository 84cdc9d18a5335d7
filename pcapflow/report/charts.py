"""Charts of an Analysis as matplotlib Figures: ladder, FIN backoff, states over time,
distributions, and `write_charts` to save the useful ones as PNG.

Figures are built with `matplotlib.figure.Figure` (no pyplot), so nothing is left open in
pyplot's global state and any backend (Agg for files, inline in notebooks) can draw them.
"""
from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..detectors import has_tail_loss_probe, rto_estimate
from ..findings import peak_concurrency
from ..seq import MOD
from .table import anomalies

FLAG_NAMES = [(0x02, "SYN"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"), (0x10, "ACK"),
              (0x20, "URG")]
SIDE_X = {"client": 0.2, "server": 0.8}
CAPTURE_X = {"client": 0.3, "server": 0.7, "middle": 0.5}  # loopback/unknown: no line
DIR_COLOR = ("tab:blue", "tab:orange")  # client->server, server->client
LOSS_RE = re.compile(r"wave (\d) lost (before|after) capture")
MAX_ROWS = 30  # segments drawn before the ladder is cut
HEAD = 3  # the handshake, always shown
LEAD = 3  # segments shown before the first FIN or RST
TAIL = 4  # last segments kept when even the teardown is too long
STATE_COLORS = {"TIME_WAIT": "tab:purple", "CLOSE_WAIT": "tab:red", "FIN_WAIT_2": "tab:orange",
                "ESTABLISHED": "tab:green", "FIN_WAIT_1": "gold", "LAST_ACK": "tab:brown",
                "CLOSING": "tab:pink", "SYN_SENT": "tab:cyan", "SYN_RECEIVED": "tab:olive",
                "UNKNOWN": "tab:gray"}
MAX_HOSTS = 6
MAX_LADDERS = 10
PER_FINDING = 3  # ladders of one finding look alike: a few, then other findings


def flag_text(flags: int) -> str:
    """TCP flags as Wireshark writes them: SYN,ACK / FIN,ACK / PSH,ACK."""
    return ",".join(name for bit, name in FLAG_NAMES if flags & bit) or "none"


# ---------------------------------------------------------------- ladder

def _segment_rows(a, conn_id: int) -> pd.DataFrame:
    """The connection's segments with relative seq/ack, a label, and retransmissions marked.

    Relative numbers count from each side's ISN (its SYN, else its first segment), as
    Wireshark does; a retransmission is a segment that consumes sequence space (data, SYN,
    FIN: RFC 9293 3.4) entirely below what that side had already sent.
    """
    s = a.segments
    seg = s[(s["conn"] == conn_id) & ~s["dup"]].sort_values("ts", kind="stable")
    rows = seg[["ts", "dir", "seq", "ack", "flags", "plen"]].reset_index(drop=True)
    isn = {}
    for d in (0, 1):
        mine = rows[rows["dir"] == d]
        syn = mine[(mine["flags"] & 0x02) > 0]
        isn[d] = int((syn if len(syn) else mine)["seq"].iloc[0]) if len(mine) else 0
    rel_seq = (rows["seq"] - rows["dir"].map(isn)) % MOD
    rel_ack = (rows["ack"] - (1 - rows["dir"]).map(isn)) % MOD
    end = rel_seq + rows["plen"] + ((rows["flags"] & 0x03) > 0)
    sent_before = end.groupby(rows["dir"]).transform(lambda e: e.cummax().shift(fill_value=-1))
    rows["retrans"] = (end > rel_seq) & (end <= sent_before)
    rows["label"] = [
        f"{flag_text(f)} seq={q}" + (f" ack={k}" if f & 0x10 else "") + (f" len={n}" if n else "")
        for f, q, k, n in zip(rows["flags"], rel_seq, rel_ack, rows["plen"])]
    rows["kind"] = "segment"
    rows["lost"] = ""
    rows["order"] = 0
    return rows


def _with_losses(a, conn_id: int, rows: pd.DataFrame) -> pd.DataFrame:
    """Mark segments lost after the capture point; add a row for each one lost before it
    (never seen: only its retransmission was, TEARDOWN.md section 2)."""
    ev = a.events[(a.events["conn_id"] == conn_id) & (a.events["kind"] == "LOSS")]
    counts = {(x["wave"], x["position"].split("_")[0]): x["count"]
              for x in a.connections.at[conn_id, "losses"]}
    ghosts = []
    for t, side, detail in zip(ev["ts"], ev["side"], ev["detail"]):
        m = LOSS_RE.search(str(detail))
        if m is None:
            continue
        wave, where, d = int(m.group(1)), m.group(2), 0 if side == "client" else 1
        count = counts.get((wave, where), 1)
        if where == "after":  # this copy and the next count-1 copies of the same segment
            mine = rows[rows["dir"] == d]
            if len(mine):
                first = mine.loc[(mine["ts"] - t).abs().idxmin()]
                same = mine[(mine["ts"] >= first["ts"]) & (mine["seq"] == first["seq"])
                            & (mine["flags"] == first["flags"])]
                rows.loc[same.index[:count], "lost"] = f"wave {wave} lost"
            continue
        # a lost FIN precedes its seen retransmission; a lost ACK follows the FIN it answers
        ghosts += count * [{"ts": t, "order": -1 if wave % 2 else 1, "dir": d,
                            "flags": 0x11 if wave % 2 else 0x10, "plen": 0, "retrans": False,
                            "lost": f"wave {wave} lost", "kind": "ghost",
                            "label": f"wave {wave}: not captured, lost before the capture point"}]
    if ghosts:
        rows = pd.concat([rows, pd.DataFrame(ghosts)], ignore_index=True)
    return rows.sort_values(["ts", "order"], kind="stable", ignore_index=True)


def _shown(rows: pd.DataFrame) -> list[int]:
    """Rows to draw: all of a short connection; else the handshake, then the teardown from a
    few segments before the first FIN or RST (its first and last part if still too long)."""
    n = len(rows)
    if n <= MAX_ROWS:
        return list(range(n))
    closing = np.flatnonzero((rows["flags"].to_numpy() & 0x05) > 0)
    budget = MAX_ROWS - HEAD
    start = max(HEAD, closing[0] - LEAD) if len(closing) else n - budget
    rest = list(range(start, n))
    if len(rest) > budget:
        rest = rest[:budget - TAIL] + rest[-TAIL:]
    return list(range(HEAD)) + rest


def ladder(a, conn_id: int, ax: Axes | None = None) -> Figure:
    """Sequence diagram of one connection: client left, server right, time downward.

    Rows are segments in capture order (evenly spaced, their time since the first segment at
    left); dashed arrows are retransmissions, a red cross a segment lost on its way,
    states are written beside each side's timeline where they change, TIME_WAIT is shaded.
    """
    conn = a.connections.loc[conn_id]
    rows = _with_losses(a, conn_id, _segment_rows(a, conn_id))
    keep = _shown(rows)
    t0 = float(conn["first_ts"])
    view = []  # (kind, row or break text, ts)
    for i, k in enumerate(keep):
        if i and k != keep[i - 1] + 1:
            hidden = rows.iloc[keep[i - 1] + 1:k]
            text = (f"{len(hidden)} segments over {hidden['ts'].iloc[-1] - hidden['ts'].iloc[0]:.3f} s "
                    "not shown")
            view.append(("break", text, float(hidden["ts"].iloc[0])))
        view.append(("row", rows.iloc[k], float(rows["ts"].iat[k])))
    if ax is None:
        fig = Figure(figsize=(9, 2.2 + 0.34 * len(view)))
        ax = fig.add_axes((0.12, 0.02, 0.86, 0.9))
    n = len(view)
    ax.set_xlim(0, 1)
    ax.set_ylim(n + 1.6, -2.2)
    ax.set_xticks([])
    for spine in ("top", "right", "bottom"):
        ax.spines[spine].set_visible(False)
    ax.set_title(f"connection {conn_id}: close type {conn['close_type']}, "
                 f"active closer: {conn['active_closer']}, seen from the {conn['vantage']}",
                 fontsize=10)
    ax.set_ylabel("seconds since the first segment (rows evenly spaced, not to scale)",
                  fontsize=8)

    breaks = [y for y, (kind, _, _) in enumerate(view) if kind == "break"]
    edges = [-1.0] + [y for b in breaks for y in (b - 0.3, b + 0.3)] + [n + 0.3]
    for side, x in SIDE_X.items():
        ip, port = conn[f"{side}_ip"], conn[f"{side}_port"]
        ax.text(x, -1.6, f"{side}\n{ip}:{port}", ha="center", va="center", fontsize=9,
                fontweight="bold")
        ax.vlines([x] * (len(edges) // 2), edges[::2], edges[1::2], color="black", lw=1.2)
    cap_x = CAPTURE_X.get(conn["vantage"])
    if cap_x is not None:
        ax.vlines([cap_x] * (len(edges) // 2), edges[::2], edges[1::2], color="gray", lw=0.8,
                  linestyles=":")
        ax.text(cap_x, -0.75, "capture point", ha="center", fontsize=7, color="gray")

    ticks, ticklabels = [], []
    for y, (kind, row, ts) in enumerate(view):
        if kind == "break":
            ax.text(0.5, y, f"≈  {row}  ≈", ha="center", va="center", fontsize=8,
                    style="italic", color="dimgray", gid="break")
            continue
        _draw_segment(ax, row, y, cap_x)
        ticks.append(y)
        ticklabels.append(f"{ts - t0:+.3f}")
    ax.set_yticks(ticks, ticklabels, fontsize=7)

    row_ts = np.array([ts for _, _, ts in view])
    end_ts = row_ts[-1]
    for side, ep in zip(("client", "server"), a.endpoint(conn_id)):
        _draw_states(ax, side, ep, conn, row_ts, end_ts, t0, n)
    return ax.figure


def _draw_segment(ax: Axes, row, y: int, cap_x: float | None) -> None:
    """One arrow, its label above; a loss ends the arrow at a red cross between the capture
    point and the receiver (lost after it) or the sender (lost before it)."""
    d = int(row["dir"])
    x0, x1 = (SIDE_X["client"], SIDE_X["server"])[::1 if d == 0 else -1]
    color = DIR_COLOR[d]
    end = x1
    if row["lost"]:
        mid = cap_x if cap_x is not None else 0.5
        end = mid + 0.6 * (x1 - mid) if row["kind"] == "segment" else x0 + 0.6 * (mid - x0)
    style = ":" if row["kind"] == "ghost" else "--" if row["retrans"] else "-"
    ax.annotate("", xy=(end, y), xytext=(x0, y), gid="segment" if row["kind"] == "segment"
                else "ghost", arrowprops={"arrowstyle": "-|>", "color": color, "lw": 1.3,
                                          "linestyle": style, "shrinkA": 0, "shrinkB": 0})
    label = row["label"] + ("  (retransmission)" if row["retrans"] else "")
    ax.text(0.5, y - 0.12, label, ha="center", va="bottom", fontsize=7.5,
            color="firebrick" if row["kind"] == "ghost" else "black",
            bbox={"fc": "white", "ec": "none", "pad": 0.3})
    if row["lost"]:
        ax.plot([end], [y], marker="x", color="red", ms=10, mew=2.5, gid="loss")
        if row["kind"] == "segment":  # a ghost's label already names the wave
            away = 1 if x1 > x0 else -1
            ax.text(end + away * 0.025, y, row["lost"], ha="left" if away > 0 else "right",
                    va="center", fontsize=7, color="red")


def _draw_states(ax: Axes, side: str, ep, conn, row_ts, end_ts: float, t0: float,
                 n: int) -> None:
    """A side's states beside its timeline (several changes between two rows stacked), and
    TIME_WAIT as a shaded span, cut at the view's end with its true end said."""
    x = SIDE_X[side]
    outward = -1 if side == "client" else 1
    ha = "right" if side == "client" else "left"

    def y_after(t: float) -> float:  # just below the last row seen at or before t
        return float(np.searchsorted(row_ts, t, side="right")) - 0.5

    labels: dict[float, list[str]] = {}
    for k, (t, st) in enumerate(zip(ep.times, ep.states)):
        y = -0.5 if k == 0 else y_after(t)
        labels.setdefault(y, []).append(st)
        if st != "TIME_WAIT":
            continue
        until = ep.times[k + 1] if k + 1 < len(ep.times) else conn["time_wait_end"]
        y1 = n + 0.3 if pd.isna(until) or until > end_ts else y_after(until)
        ax.add_patch(Rectangle((x - 0.012, y), 0.024, y1 - y, color=STATE_COLORS["TIME_WAIT"],
                               alpha=0.3, lw=0, gid="time_wait"))
        if y1 > n and pd.notna(until):
            ax.annotate(f"TIME_WAIT continues to {until - t0:+.1f} s", xy=(x, n + 1.5),
                        xytext=(x, n + 0.4), ha="center", va="top", fontsize=7.5,
                        color=STATE_COLORS["TIME_WAIT"],
                        arrowprops={"arrowstyle": "-|>", "color": STATE_COLORS["TIME_WAIT"]})
    for y, states in labels.items():
        for j, st in enumerate(states):
            ax.text(x + outward * 0.02, y + 0.36 * (j - (len(states) - 1) / 2), st, ha=ha,
                    va="center", fontsize=7.5, color=STATE_COLORS.get(st, "black"),
                    fontweight="bold")


# ---------------------------------------------------------------- FIN backoff

def fin_backoff(a, conn_id: int | None = None) -> Figure:
    """Each retransmitted FIN's transmissions (time since its first) against the ideal
    doubling from its first RTO (RFC 6298 5.5, capped at 120 s); a Linux tail-loss probe,
    when present, is taken as the first interval."""
    c = a.connections if conn_id is None else a.connections.loc[[conn_id]]
    series = [(cid, side, list(iv)) for cid, row in c.iterrows()
              for side in ("client", "server") if len(iv := row[f"{side}_fin_backoff"])]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_xlabel("retransmission of the FIN")
    ax.set_ylabel("seconds since the FIN's first transmission")
    ax.set_title("FIN retransmissions against ideal exponential backoff", fontsize=10)
    if not series:
        _none(ax, "no retransmitted FIN")
        return fig
    legend = len(series) <= 10
    for i, (cid, side, iv) in enumerate(series):
        color = f"C{i % 10}" if legend else "tab:blue"
        k = np.arange(1, len(iv) + 1)
        rto = rto_estimate(iv)
        probe = has_tail_loss_probe(iv)
        ideal_iv = iv[:1] * probe + [min(rto * 2 ** j, 120.0) for j in range(len(iv) - probe)]
        ax.plot(k, np.cumsum(iv), "o-", color=color, alpha=1 if legend else 0.4,
                label=f"conn {cid} {side} FIN (RTO {rto * 1e3:.0f} ms"
                      + (", after a tail-loss probe)" if probe else ")"))
        ax.plot(k, np.cumsum(ideal_iv), "--", color=color, alpha=0.6 if legend else 0.2)
    ax.plot([], [], "--", color="gray", label="ideal doubling from that RTO")
    ax.set_xticks(range(1, max(len(iv) for _, _, iv in series) + 1))
    if legend:
        ax.legend(fontsize=8)
    else:
        ax.set_title(f"{len(series)} retransmitted FINs against ideal exponential backoff",
                     fontsize=10)
    return fig


# ---------------------------------------------------------------- states over time

def _hosts(a) -> list[str]:
    """Hosts by number of connections, busiest first."""
    c = a.connections
    return pd.concat([c["client_ip"], c["server_ip"]]).value_counts().index.tolist()


def states_over_time(a, freq: str = "1s", host: str | None = None) -> Figure:
    """Sockets per state over time, stacked, one subplot per host (the busiest MAX_HOSTS).

    TIME_WAIT is the bottom layer, so its top edge is its own count."""
    hosts = [host] if host is not None else _hosts(a)[:MAX_HOSTS]
    fig = Figure(figsize=(9, 0.8 + 2.4 * max(len(hosts), 1)), layout="constrained")
    axes = fig.subplots(max(len(hosts), 1), 1, sharex=True, squeeze=False)[:, 0]
    start = min((c.first_ts for c in a.captures if c.first_ts is not None), default=0.0)
    for ax, h in zip(axes, hosts):
        tl = a.state_timeline(freq, h)
        order = [s for s in STATE_COLORS if s in tl] + sorted(set(tl) - set(STATE_COLORS))
        ax.set_title(f"{h}: sockets by state (sampled every {freq})", fontsize=9)
        ax.set_ylabel("sockets")
        if tl.empty or not order:
            _none(ax, "no sockets")
            continue
        x = tl.index.map(lambda t: t.timestamp()).to_numpy() - start
        ax.stackplot(x, [tl[s].to_numpy() for s in order], labels=order, step="post",
                     colors=[STATE_COLORS.get(s, "lightgray") for s in order], alpha=0.85)
        ax.set_ylim(0, max(1, int(tl.sum(axis=1).max())) * 1.1)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    when = pd.to_datetime(start, unit="s", utc=True).strftime("%Y-%m-%d %H:%M:%S UTC")
    axes[-1].set_xlabel(f"seconds since the capture start ({when})")
    return fig


def auto_freq(a, points: int = 200) -> str:
    """A sampling step giving at most about `points` samples over the capture."""
    firsts = [c.first_ts for c in a.captures if c.first_ts is not None]
    span = (a.capture_end or 0.0) - min(firsts, default=0.0)
    for step in ("100ms", "250ms", "500ms", "1s", "5s", "10s", "30s", "1min", "5min", "15min"):
        if span / pd.Timedelta(step).total_seconds() <= points:
            return step
    return "1h"


# ---------------------------------------------------------------- distributions

def _none(ax: Axes, text: str) -> None:
    """An empty panel saying why."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _hist(ax: Axes, values: pd.Series, title: str) -> None:
    """Histogram of durations, in ms when all are under a second; log-spaced bins when they
    span more than two decades."""
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(float)
    ax.set_title(title, fontsize=9)
    if not len(v):
        _none(ax, "none")
        return
    unit, v = ("ms", v * 1e3) if v.max() < 1 else ("s", v)
    ax.set_xlabel(unit)
    ax.set_ylabel("connections")
    pos = v[v > 0]
    if len(pos) and pos.max() / pos.min() > 100:
        floor = pos.min()
        ax.hist(np.maximum(v, floor), bins=np.geomspace(floor, pos.max() * 1.001, 25))
        ax.set_xscale("log")
        ax.set_xlabel(f"{unit} (log scale; zeros in the first bin)")
    else:
        ax.hist(v, bins=min(25, max(5, len(v))))


def distributions(a) -> Figure:
    """Teardown and CLOSE_WAIT durations, and peak TIME_WAIT concurrency per server port
    (split by which side holds the TIME_WAITs: servers pay memory, clients ports)."""
    c = a.connections
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    _hist(ax1, c["teardown_s"], "teardown duration (first FIN/RST to last segment)")
    _hist(ax2, c.loc[c["close_wait_s"] > 0, "close_wait_s"], "time in CLOSE_WAIT")
    tw = c[c["time_wait_start"].notna()]
    peaks = {}
    for (ip, port), g in tw.groupby(["server_ip", "server_port"]):
        for holder, sides in (("server", ("server", "both")), ("client", ("client", "both"))):
            h = g[g["time_wait_side"].isin(sides)]
            peaks[(f"{ip}:{port}", holder)] = peak_concurrency(h["time_wait_start"],
                                                               h["time_wait_end"])[0]
    ax3.set_title("peak concurrent TIME_WAIT per server port", fontsize=9)
    ax3.set_xlabel("TIME_WAIT sockets at once")
    if not peaks:
        _none(ax3, "no TIME_WAIT")
        return fig
    df = pd.Series(peaks).unstack(fill_value=0)
    df = df.loc[df.sum(axis=1).sort_values(ascending=False).index[:10]]
    y = np.arange(len(df))
    left = np.zeros(len(df))
    for holder, color in (("server", "tab:purple"), ("client", "tab:cyan")):
        if holder in df:
            bars = ax3.barh(y, df[holder], left=left, height=0.6, color=color,
                            label=f"held by the {holder}")
            ax3.bar_label(bars, [f"{v:g}" if v else "" for v in df[holder]], fontsize=8,
                          label_type="center", color="white")
            left += df[holder].to_numpy()
    ax3.set_yticks(y, df.index, fontsize=8)
    ax3.set_ylim(max(len(df), 3) - 0.5, -0.5)
    ax3.legend(fontsize=8, loc="lower right")
    return fig


# ---------------------------------------------------------------- files

def interesting(a, limit: int = MAX_LADDERS) -> list[int]:
    """Connections worth a ladder: a few of each finding's samples taken in turn (so each
    finding gets one), then connections with anomalies, at most `limit`."""
    samples = [list(ids)[:PER_FINDING] for ids in a.findings["conn_ids"]]
    out: list[int] = []
    for rank in range(max((len(s) for s in samples), default=0)):
        out += [s[rank] for s in samples if rank < len(s)]
    out += [int(r.conn_id) for r in a.connections.itertuples() if anomalies(r)]
    return list(dict.fromkeys(out))[:limit]


def figures(a) -> dict[str, Figure]:
    """The charts worth saving, by file name: states, distributions, FIN backoff (when a FIN
    was retransmitted) and ladders of the most interesting connections."""
    out = {"states.png": states_over_time(a, freq=auto_freq(a)),
           "distributions.png": distributions(a)}
    c = a.connections
    if (c["client_fin_retransmits"] > 0).any() or (c["server_fin_retransmits"] > 0).any():
        out["backoff.png"] = fin_backoff(a)
    for cid in interesting(a):
        out[f"ladder-{cid}.png"] = ladder(a, cid)
    return out


def write_charts(a, directory: str) -> list[str]:
    """Save `figures(a)` as PNG files in `directory`; return the paths written."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, fig in figures(a).items():
        path = os.path.join(directory, name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        paths.append(path)
    return paths
