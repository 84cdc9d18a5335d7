"""Minimal HTTP/1.x awareness: what a connection's messages say about who closes and why."""
from __future__ import annotations

import functools
import re

import numpy as np
import pandas as pd

from .capture import factorize_rows

CONNECTION_HEADER = re.compile(r"\r\nconnection:\s*([^\r\n]*)", re.IGNORECASE)
REQUEST_LINE = re.compile(r"^[A-Z]+ \S+ HTTP/1\.([01])")
HEAD_BYTES = 512  # the reader keeps this much of a payload that starts an HTTP message


FIELDS = ["http_requests", "http_responses", "http_request_close", "http_response_close", "http10",
          "http_cut"]


def http_fields(f) -> dict:
    """Requests and responses seen, `Connection: close` asked by either side, HTTP/1.0
    without keep-alive, and whether the snaplen cut a header (then causes are unknown)."""
    out = {name: 0 if k < 2 else False for k, name in enumerate(FIELDS)}  # two counts, then flags
    for d, text, plen in zip(f.d, f.http, f.plen):
        if not isinstance(text, str):  # no HTTP start in this payload
            continue
        for k, (name, value) in enumerate(zip(FIELDS, message(d, text, min(plen, HEAD_BYTES)))):
            out[name] = out[name] + value if k < 2 else out[name] | value
    return out


def http_columns(d: np.ndarray, http: np.ndarray, plen: np.ndarray,
                 starts: np.ndarray) -> dict[str, np.ndarray]:
    """http_fields of each connection k at once: its rows are starts[k]..starts[k + 1] of
    the columns (the last one's, to their end)."""
    rows = np.flatnonzero(pd.notna(http))  # None where a segment starts no HTTP message
    conn = np.searchsorted(starts, rows, side="right") - 1
    index: dict[str, int] = {}  # heads repeat: each distinct message read once (a dict: 10x pd.factorize)
    texts = np.fromiter((index.setdefault(t, len(index)) for t in http[rows].tolist()), np.int64, len(rows))
    heads = list(index)
    codes, (side, text, room) = factorize_rows(d[rows], texts, np.minimum(plen[rows], HEAD_BYTES))
    found = np.array([message(a, heads[t], n) for a, t, n in zip(side.tolist(), text.tolist(), room.tolist())],
                     dtype=np.int64).reshape(-1, len(FIELDS))[codes]
    out = {}
    for k, name in enumerate(FIELDS):
        total = np.bincount(conn, weights=found[:, k], minlength=len(starts)).astype(np.int64)
        out[name] = total if k < 2 else total > 0
    return out


@functools.lru_cache(maxsize=1 << 14)  # message heads repeat: one request line, few responses
def message(d: int, text: str, room: int) -> tuple[int, int, bool, bool, bool, bool]:
    """(request, response, request asks close, response asks close, HTTP/1.0 without
    keep-alive, head cut short) for one payload starting an HTTP message, sent by side d;
    `room`: how much of it the reader could keep (its length, at most HEAD_BYTES)."""
    head = text.split("\r\n\r\n", 1)[0]
    cut = "\r\n\r\n" not in text and len(text) < room
    m = CONNECTION_HEADER.search(head)
    token = m.group(1).strip().lower() if m else ""
    request = REQUEST_LINE.match(text) if d == 0 else None
    if request:
        return 1, 0, token == "close", False, request.group(1) == "0" and token != "keep-alive", cut
    if d == 1 and text.startswith("HTTP/1."):
        return 0, 1, False, token == "close", text.startswith("HTTP/1.0") and token != "keep-alive", cut
    return 0, 0, False, False, False, cut
