"""One connection's teardown told as text: a header, then its events with relative times."""
from __future__ import annotations

from ..safe import clean
from .table import anomalies


def story(a, conn_id: int) -> str:
    r = a.connections.loc[conn_id]
    ev = a.events[a.events["conn_id"] == conn_id]
    t0 = r.first_ts
    lines = [
        (f"connection {conn_id}: {clean(r.client_ip)}:{r.client_port} (client) -> "
        f"{clean(r.server_ip)}:{r.server_port} (server), incarnation {r.incarnation}, "
        f"seen from the {r.vantage} side"),
        (f"close: {r.close_type}, active closer: {r.active_closer}; at capture end the client is "
        f"{r.client_state_end} and the server {r.server_state_end}"),
    ]
    notes = anomalies(r)
    if notes:
        lines.append(f"notes: {notes}")
    lines.append("")
    for e in ev.itertuples():
        move = f"{e.state_from} -> {e.state_to}" if e.state_from != e.state_to else e.state_to
        lines.append(f"{e.ts - t0:>+10.6f} s  {e.side:<6} {e.kind:<15} {move:<28} {clean(e.detail)}")
    return "\n".join(lines)
