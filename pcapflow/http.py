"""Minimal HTTP/1.x awareness: what a connection's messages say about who closes and why."""
from __future__ import annotations

import re

CONNECTION_HEADER = re.compile(r"\r\nconnection:\s*([^\r\n]*)", re.IGNORECASE)
REQUEST_LINE = re.compile(r"^[A-Z]+ \S+ HTTP/1\.([01])")
HEAD_BYTES = 512  # the reader keeps this much of a payload that starts an HTTP message


def http_fields(f) -> dict:
    """Requests and responses seen, `Connection: close` asked by either side, HTTP/1.0
    without keep-alive, and whether the snaplen cut a header (then causes are unknown)."""
    out = {"http_requests": 0, "http_responses": 0, "http_request_close": False,
           "http_response_close": False, "http10": False, "http_cut": False}
    for d, text, plen in zip(f.d, f.http, f.plen):
        if not isinstance(text, str):  # no HTTP start in this payload
            continue
        head = text.split("\r\n\r\n", 1)[0]
        out["http_cut"] |= "\r\n\r\n" not in text and len(text) < min(plen, HEAD_BYTES)
        m = CONNECTION_HEADER.search(head)
        token = m.group(1).strip().lower() if m else ""
        request = REQUEST_LINE.match(text) if d == 0 else None
        if request:
            out["http_requests"] += 1
            out["http_request_close"] |= token == "close"
            out["http10"] |= request.group(1) == "0" and token != "keep-alive"
        elif d == 1 and text.startswith("HTTP/1."):
            out["http_responses"] += 1
            out["http_response_close"] |= token == "close"
            out["http10"] |= text.startswith("HTTP/1.0") and token != "keep-alive"
    return out
