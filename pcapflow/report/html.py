"""The HTML postmortem: one self-contained file (CSS inline, charts as base64 PNG), findings
first. Every string that came from a packet or a file goes through `html.escape` (`esc`)."""
from __future__ import annotations

import base64
import io
from html import escape

import pandas as pd
from matplotlib.figure import Figure

from ..http import REQUEST_LINE
from . import charts
from .table import anomalies

MAX_ROWS = 1000  # connections listed; the CSV/JSON outputs have them all
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px}
th{background:#f3f3f3;text-align:left}td.n{text-align:right}
.finding{border-left:6px solid #999;padding:.4em 1em;margin:1em 0;background:#fafafa}
.critical{border-color:#c00}.warning{border-color:#e90}.info{border-color:#39c}
.sev{font-weight:bold;text-transform:uppercase}.kind{font-family:monospace}
img{max-width:100%;display:block;margin:1em 0}
"""
CONN_COLUMNS = ["close_type", "active_closer", "client_state_end", "server_state_end",
                "teardown_s"]


def esc(value) -> str:
    """Text from packets or files made inert in HTML (quotes too: it may land in attributes)."""
    return escape(str(value), quote=True)


def png(fig: Figure) -> str:
    """A figure as an <img> with its PNG inline, so the report needs no other file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="chart" src="data:image/png;base64,{data}">'


def table(df: pd.DataFrame) -> str:
    """A DataFrame as an HTML table, every cell escaped (values may come from packets)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{esc(v)}</td>' if isinstance(v, (int, float))
                         else f"<td>{esc(v)}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def first_requests(a) -> pd.Series:
    """Each connection's first HTTP request line (conn_id -> text), to recognise traffic."""
    s = a.segments
    h = s[s["http"].notna() & ~s["dup"] & (s["dir"] == 0)]
    lines = h.groupby("conn")["http"].first().map(lambda t: str(t).split("\r\n", 1)[0])
    return lines[lines.map(lambda t: REQUEST_LINE.match(t) is not None)]


def _accounting(a) -> str:
    rows = [{"capture": c.path, "format": c.format, "packets": c.packets,
             "TCP": c.tcp_packets,
             "skipped": ", ".join(f"{k} {v}" for k, v in sorted(c.skipped.items())) or "none",
             "cut short": c.truncated or ""} for c in a.captures]
    return table(pd.DataFrame(rows))


def _findings(a) -> str:
    if not len(a.findings):
        return "<p>No findings: nothing in these captures needs action.</p>"
    out = []
    for f in a.findings.itertuples():
        ids = ", ".join(f'<a href="#conn-{int(i)}">{int(i)}</a>' for i in f.conn_ids)
        where = f" on {esc(f.host)}:{esc(f.port)}" if pd.notna(f.host) else ""
        out.append(
            f'<div class="finding {esc(f.severity)}"><p><span class="sev">{esc(f.severity)}'
            f'</span> <span class="kind">{esc(f.kind)}</span>{where}: {esc(f.summary)}</p>'
            f"<p>{esc(f.explanation)}</p><p><b>Fix:</b> {esc(f.suggestion)}</p>"
            f"<p>{esc(f.count)} connections; for example {ids}</p></div>")
    return "".join(out)


def _states(a) -> str:
    st = a.states()
    if st.empty:
        return "<p>No sockets open at the end of the capture.</p>"
    wide = st.pivot(index="host", columns="state", values="count").fillna(0).astype(int)
    return table(wide.reset_index())


def _connections(a) -> str:
    c = a.connections.head(MAX_ROWS)
    http = first_requests(a)
    rows = []
    for r in c.itertuples():
        cells = [f'<td id="conn-{int(r.conn_id)}">{int(r.conn_id)}</td>',
                 f"<td>{esc(r.client_ip)}:{esc(r.client_port)}</td>",
                 f"<td>{esc(r.server_ip)}:{esc(r.server_port)}</td>"]
        cells += [f"<td>{esc(getattr(r, col))}</td>" for col in CONN_COLUMNS]
        cells += [f"<td>{esc(anomalies(r))}</td>", f"<td>{esc(http.get(r.conn_id, ''))}</td>"]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ["id", "client", "server", *CONN_COLUMNS, "notes",
                                                "first HTTP request"])
    more = (f"<p>{len(a.connections) - MAX_ROWS} more connections: use --format csv or json.</p>"
            if len(a.connections) > MAX_ROWS else "")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>{more}"


def _charts(a) -> str:
    return "".join(png(fig) for fig in charts.figures(a).values())


def render(a) -> str:
    """The report as one HTML string."""
    when = ""
    if a.capture_end is not None:
        start = min(c.first_ts for c in a.captures if c.first_ts is not None)
        fmt = "%Y-%m-%d %H:%M:%S UTC"
        when = (f"{pd.to_datetime(start, unit='s', utc=True).strftime(fmt)} to "
                f"{pd.to_datetime(a.capture_end, unit='s', utc=True).strftime(fmt)}, ")
    sections = [
        f"<h1>pcapflow postmortem</h1><p>{when}{len(a.connections)} connections.</p>",
        _accounting(a),
        f"<h2>Findings ({len(a.findings)})</h2>", _findings(a),
        "<h2>Socket states at the end of the capture</h2>", _states(a),
        "<h2>Charts</h2>", _charts(a),
        f"<h2>Connections ({len(a.connections)})</h2>", _connections(a),
    ]
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>pcapflow report</title>"
            f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>\n")


def write_html(a, path: str) -> None:
    """Write the self-contained postmortem report to `path`."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(render(a))
