"""The terminal report: findings first, then one line per connection, then the accounting."""
from __future__ import annotations

import shutil
import textwrap

import pandas as pd

from ..safe import clean

STATE_SHORT = {"ESTABLISHED": "ESTAB", "FIN_WAIT_1": "FIN_WAIT1", "FIN_WAIT_2": "FIN_WAIT2",
               "CLOSE_WAIT": "CLOSE_WAIT", "TIME_WAIT": "TIME_WAIT", "SYN_SENT": "SYN_SENT",
               "SYN_RECEIVED": "SYN_RECV", "LAST_ACK": "LAST_ACK", "CLOSING": "CLOSING",
               "CLOSED": "CLOSED", "UNKNOWN": "?", "LISTEN": "LISTEN"}


def anomalies(r) -> str:
    """The teardown's notable facts, compact: losses, retransmissions, RST kind, reuse..."""
    out = []
    if r.lost_waves:
        out.append("lost " + ",".join(f"w{w}" for w in r.lost_waves))
    for side in ("client", "server"):
        n = getattr(r, f"{side}_fin_retransmits")
        if n:
            out.append(f"{side[0]}FINx{n + 1}")
    if isinstance(r.rst_kind, str):
        out.append(f"RST:{r.rst_kind}")
    if r.time_wait_restarts:
        out.append(f"TW+{r.time_wait_restarts}")
    if r.reused_4tuple is True:
        out.append(f"reuse:{r.reuse_check}")
    if r.half_close_bytes:
        out.append(f"half-close {r.half_close_bytes}B")
    if r.fin_wait2_timeout:
        out.append("FW2 timeout")
    if r.client_keepalives or r.server_keepalives:
        out.append(f"keepalive x{r.client_keepalives + r.server_keepalives}")
    if r.orphan_retries_estimate is not None and not pd.isna(r.orphan_retries_estimate):
        out.append(f"gave up (orphan_retries~{int(r.orphan_retries_estimate)})")
    return " ".join(out)


def render(a, width: int | None = None, max_rows: int = 200) -> str:
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 120)
    lines = []
    f = a.findings
    if len(f):
        lines.append(f"FINDINGS ({len(f)})")
        for r in f.itertuples():
            lines += textwrap.wrap(f"[{r.severity}] {r.kind}: {clean(r.summary)}", width,
                                   subsequent_indent="    ")
            lines += textwrap.wrap(f"fix: {clean(r.suggestion)}", width, initial_indent="    ",
                                   subsequent_indent="    ")
        lines.append("")
    c = a.connections
    lines.append(f"CONNECTIONS ({len(c)})")
    lines.append(f"{'id':>5} {'client -> server':<38} {'close':<14} {'by':<6} "
                 f"{'client':<10} {'server':<10} notes")
    for r in c.head(max_rows).itertuples():
        ends = f"{clean(r.client_ip)}:{r.client_port} > {clean(r.server_ip)}:{r.server_port}"
        line = (f"{r.conn_id:>5} {ends[:38]:<38} {r.close_type:<14} {r.active_closer:<6} "
                f"{STATE_SHORT[r.client_state_end]:<10} {STATE_SHORT[r.server_state_end]:<10} ")
        notes = anomalies(r)
        if len(line) + len(notes) <= width:
            lines.append((line + notes).rstrip())
        else:  # on their own lines below
            lines.append(line.rstrip())
            lines += textwrap.wrap(notes, width, initial_indent=" " * 6 + "notes: ",
                                   subsequent_indent=" " * 13)
    if len(c) > max_rows:
        lines.append(f"... {len(c) - max_rows} more (use --format csv/json for all)")
    lines.append("")
    lines.append(accounting(a))
    return "\n".join(lines)


def accounting(a) -> str:
    """One line per capture: packets read = TCP + skipped, with reasons."""
    out = []
    for cap in a.captures:
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(cap.skipped.items())) or "none"
        cut = f"; cut short: {cap.truncated}" if cap.truncated else ""
        out.append(f"{clean(cap.path)}: {cap.packets} packets = {cap.tcp_packets} TCP + skipped "
                   f"({skipped}){cut}")
    return "\n".join(out)
