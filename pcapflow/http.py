"""Minimal HTTP/1.x awareness: per connection, what its messages say about who closes and why."""
from __future__ import annotations

import re

import pandas as pd

CONNECTION_HEADER = re.compile(r"\r\nconnection:\s*([^\r\n]*)", re.IGNORECASE)
REQUEST_LINE = re.compile(r"^[A-Z]+ \S+ HTTP/1\.([01])")


def http_summary(segments: pd.DataFrame) -> pd.DataFrame:
    """One row per connection that carried HTTP: requests, responses, `Connection: close`,
    HTTP/1.0 without keep-alive, whether headers were cut by the snaplen, last request time."""
    h = segments.loc[segments["http"].notna() & ~segments["dup"], ["conn", "dir", "ts", "http", "plen"]]
    rows = []
    for cid, g in h.groupby("conn", sort=False):
        requests = responses = 0
        req_close = resp_close = http10 = cut = False
        last_request = None
        for d, ts, text, plen in zip(g["dir"], g["ts"], g["http"], g["plen"]):
            head = text.split("\r\n\r\n", 1)[0]
            cut |= "\r\n\r\n" not in text and len(text) < min(plen, 512)  # snaplen cut the header
            m = CONNECTION_HEADER.search(head)
            token = m.group(1).strip().lower() if m else ""
            if d == 0 and REQUEST_LINE.match(text):
                requests += 1
                last_request = ts
                version = REQUEST_LINE.match(text).group(1)
                http10 |= version == "0" and token != "keep-alive"
                req_close |= token == "close"
            elif d == 1 and text.startswith("HTTP/1."):
                responses += 1
                resp_close |= token == "close"
                http10 |= text.startswith("HTTP/1.0") and token != "keep-alive"
        rows.append({"conn_id": cid, "http_requests": requests, "http_responses": responses,
                     "http_request_close": req_close,
                     "http_response_close": resp_close, "http10": http10, "http_cut": cut,
                     "http_last_request_ts": last_request})
    return pd.DataFrame(rows, columns=["conn_id", "http_requests", "http_responses",
                                       "http_request_close", "http_response_close", "http10", "http_cut",
                                       "http_last_request_ts"])
