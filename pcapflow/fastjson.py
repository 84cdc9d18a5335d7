"""The JSON rows of a table joined by numba: analysis._json_rows encodes each column's distinct
values once, this copies their texts into rows (a table of a million connections is ~70
million cells, and Python's per-cell formatting and joining was most of the JSON's time).

Floats that are whole microseconds (timestamps, durations: most of them) are written by the
kernel itself, as Python's repr would write them (see `micros`); only the others are
encoded in Python."""
from __future__ import annotations

import numba
import numpy as np

FORMATTED = -2  # a cell's code: the kernel writes its float


@numba.njit(cache=True, inline="always")
def micros(x):
    """n such that repr(x) is the decimal n / 10**6 without its trailing zeros (one kept),
    or 0 when that is not certain.

    n / 1e6 divides two exact doubles, so it is the double nearest the decimal: when it is
    x, that decimal reads back as x. Below 2**33 the doubles are less than 1e-6 apart, so
    no other decimal of at most six places reads back as x, and any other that does has
    more digits: the decimal is the shortest, which repr writes, in positional notation
    from 1e-4 up."""
    if not 1e-4 <= abs(x) < 8589934592.0:
        return 0
    n = np.int64(np.rint(x * 1e6))
    return n if n / 1e6 == x else 0


@numba.njit(cache=True)
def formatted(values):
    """Which of these floats the kernel writes (see `micros`)."""
    out = np.empty(len(values), np.bool_)
    for i in range(len(values)):
        out[i] = micros(values[i]) != 0
    return out


@numba.njit(cache=True, inline="always")
def _float_text(n, out, at):
    """Write (when `out` has room) the decimal n / 10**6 from out[at]; return its length."""
    m = abs(n)
    whole, frac = m // 1000000, m % 1000000
    places = 6
    while places > 1 and frac % 10 == 0:
        frac //= 10
        places -= 1
    digits, q = 1, whole // 10
    while q:
        digits += 1
        q //= 10
    size = (n < 0) + digits + 1 + places
    if len(out):
        if n < 0:
            out[at] = 45  # -
            at += 1
        for k in range(digits - 1, -1, -1):
            out[at + k] = 48 + whole % 10
            whole //= 10
        at += digits
        out[at] = 46  # .
        for k in range(places, 0, -1):
            out[at + k] = 48 + frac % 10
            frac //= 10
    return size


@numba.njit(cache=True)
def _join(codes, floats, row, first, count, keys, pool, off):
    """Rows r of pieces first[c] + codes[c, r] (-1: the column's last piece) each closed by
    "}", the rows separated by ","; the pieces are pool[off[k]:off[k + 1]]. A FORMATTED
    cell is the column's key (piece keys[c]) and the float floats[row[c], r]."""
    ncols, n = codes.shape
    nothing = np.empty(0, np.uint8)
    size = 2 * n - 1
    for r in range(n):
        for c in range(ncols):
            k = codes[c, r]
            if k == FORMATTED:
                k = keys[c]
                size += _float_text(micros(floats[row[c], r]), nothing, 0)
            else:
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
            cell = k == FORMATTED
            k = keys[c] if cell else first[c] + (k if k >= 0 else count[c] - 1)
            size = off[k + 1] - off[k]
            out[at:at + size] = pool[off[k]:off[k + 1]]
            at += size
            if cell:
                at += _float_text(micros(floats[row[c], r]), out, at)
        out[at] = 125  # }
        at += 1
    return out


def join_rows(columns: list[tuple[np.ndarray, list[str], np.ndarray | None]], keys: list[str]) -> np.ndarray:
    """The rows' JSON from each column's codes, texts and (float columns) values (see
    analysis._json_cells), each text written after its column's key (which opens the row
    for the first column), as ASCII bytes."""
    columns, keys = _merged(columns, keys)
    pieces = [key + t for key, (_, texts, _) in zip(keys, columns) for t in texts] + keys
    count = np.array([len(texts) for _, texts, _ in columns], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    off = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, pieces), np.int64, len(pieces)), out=off[1:])  # ASCII: bytes
    pool = np.frombuffer("".join(pieces).encode("ascii"), dtype=np.uint8)
    codes = np.stack([c.astype(np.int64, copy=False) for c, _, _ in columns])
    values = [v for _, _, v in columns if v is not None]
    floats = np.stack(values) if values else np.zeros((0, codes.shape[1]))
    row = np.cumsum([v is not None for _, _, v in columns]) - 1  # each column's row of floats
    at_keys = np.arange(len(keys), dtype=np.int64) + int(count.sum())
    return _join(codes, floats, row, first, count, at_keys, pool, off)


def _merged(columns: list[tuple[np.ndarray, list[str], np.ndarray | None]],
            keys: list[str]) -> tuple[list, list[str]]:
    """The columns with each one whose cells all have one text (all null, all 0, all []: most
    of a refused storm's) appended to every text of the column before it, when that one has
    few texts and no float the kernel writes: fewer cells to join, the same bytes."""
    out, out_keys = [], []
    for (codes, texts, values), key in zip(columns, keys):
        if (out and out[-1][2] is None and len(out[-1][1]) <= 256 and values is None
                and (codes == codes[0]).all()):
            tail = key + texts[codes[0]]  # code -1: the last text, as in _join
            out[-1] = (out[-1][0], [t + tail for t in out[-1][1]], None)
        else:
            out.append((codes, texts, values))
            out_keys.append(key)
    return out, out_keys
