"""The JSON rows of a table joined by numba: analysis._json_rows encodes each column's distinct
values once, this copies their texts into rows (a table of a million connections is ~70
million cells, and Python's per-cell formatting and joining was most of the JSON's time)."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def _join(codes, first, count, pool, off):
    """Rows r of pieces first[c] + codes[c, r] (-1: the column's last piece) each closed by
    "}", the rows separated by ","; the pieces are pool[off[k]:off[k + 1]]."""
    ncols, n = codes.shape
    size = 2 * n - 1
    for r in range(n):
        for c in range(ncols):
            k = codes[c, r]
            k = first[c] + (k if k >= 0 else count[c] - 1)
            size += off[k + 1] - off[k]
    out = np.empty(size, np.uint8)
    at = 0
    for r in range(n):
        if r:
            out[at] = 44  # ,
            at += 1
        for c in range(ncols):
            k = codes[c, r]
            k = first[c] + (k if k >= 0 else count[c] - 1)
            size = off[k + 1] - off[k]
            out[at:at + size] = pool[off[k]:off[k + 1]]
            at += size
        out[at] = 125  # }
        at += 1
    return out


def join_rows(columns: list[tuple[np.ndarray, list[str]]], keys: list[str]) -> np.ndarray:
    """The rows' JSON from each column's codes and texts (see analysis._json_cells), each
    text written after its column's key (which opens the row for the first column), as
    ASCII bytes."""
    pieces = [key + t for key, (_, texts) in zip(keys, columns) for t in texts]
    count = np.array([len(texts) for _, texts in columns], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    off = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)), out=off[1:])  # ASCII: bytes
    pool = np.frombuffer("".join(pieces).encode("ascii"), dtype=np.uint8)
    codes = np.stack([c.astype(np.int64, copy=False) for c, _ in columns])
    return _join(codes, first, count, pool, off)
