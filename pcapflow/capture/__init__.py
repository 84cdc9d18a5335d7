"""Reading: captures in, one table of TCP segments out (plus per-file accounting).

Two decoders fill the same chunks of rows: the reference (dpkt, every format and link type
we know, one frame at a time) and, when numba is installed, a compiled fast path for the
common layouts (fast.py) that hands every frame it does not vouch for to the reference.
Each chunk then goes through one accounting step: timestamps, caps, skip reasons.
"""
from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pandas as pd

from ..safe import clean
from ..vocab import SKIP_REASONS
from .decode import LINK_LAYERS, SEGMENT_COLUMNS, Columns
from .files import CaptureError, CaptureInfo, check_links, cut_noted, framer_for, open_capture
from .limits import CAP_REASONS, Limits

__all__ = ["SEGMENT_COLUMNS", "SKIP_REASONS", "CaptureError", "CaptureInfo", "Limits",
           "read_captures", "read_chunks"]

Source = str | os.PathLike | BinaryIO
log = logging.getLogger("pcapflow")
# Timestamps pandas can hold as datetimes (years 1677-2262); others come from corrupt headers
# or a pcapng simple packet block, which has none.
MAX_ABS_TS = 9.2e9
REASONS = ["", *SKIP_REASONS]  # code 0: a segment; k: the k-th skip reason
CODE = {r: k for k, r in enumerate(REASONS)}
CHUNK = 20000  # frames the reference decoder reads between accounting steps (and progress calls)
FAST_MIN_BYTES = 4 << 20  # smaller inputs: compiling or loading the fast path costs more than it saves


@dataclass
class Chunk:
    """Consecutive frames of one capture: per frame its time and code (0: a segment, else the
    skip reason's), and the segment columns of the frames with code 0, in frame order."""

    ts: np.ndarray
    code: np.ndarray
    segments: dict[str, np.ndarray]
    # the segments' sources then destinations as codes into distinct texts, if the decoder
    # has them (pd.factorize of the address objects otherwise)
    addresses: tuple[np.ndarray, np.ndarray] | None = None


def read_captures(sources: Source | Iterable[Source],
                  progress: Callable[[int], None] | None = None,
                  limits: Limits | None = None,
                  fast: bool | None = None,
                  ) -> tuple[pd.DataFrame, list[CaptureInfo]]:
    """Read captures into one segment table sorted by time (rotated files become one timeline).

    `progress`, if given, is called now and then with the number of input bytes (as stored,
    compressed or not) consumed since the last call.
    Raises CaptureError for an input that is not a readable capture; a capture cut short
    mid-record is read up to the cut and reported in `CaptureInfo.truncated`. `limits`
    (default: Limits.from_env()) caps the segments kept; a cap hit is logged as a warning.
    `fast`: use the compiled reader (True), the reference one (False), or (None) let the
    environment decide: PCAPFLOW_FAST=0 never, =1 always, unset for inputs of at least
    FAST_MIN_BYTES, in each case only when numba is installed.
    """
    table = _Table()
    infos = read_chunks(sources, table.add, progress, limits, fast)
    return table.frame(), infos


def read_chunks(sources: Source | Iterable[Source],
                consume: Callable[[dict[str, np.ndarray]], None],
                progress: Callable[[int], None] | None = None,
                limits: Limits | None = None,
                fast: bool | None = None) -> list[CaptureInfo]:
    """Read captures as read_captures does, but hand the segments to `consume` a chunk at a
    time (columns as in SEGMENT_COLUMNS, in reading order, not yet sorted by time), so that
    memory does not grow with the input. Returns each input's accounting."""
    if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "read"):
        sources = [sources]
    caps = _Caps(limits or Limits.from_env())
    infos: list[CaptureInfo] = []
    for index, source in enumerate(sources):
        with open_capture(source) as (stream, name, compression):
            info = CaptureInfo(path=name, compression=compression)
            infos.append(info)

            def finish(chunk: Chunk, info=info) -> None:
                consume(_account(chunk, info, caps))

            if _use_fast(fast, source):
                from .fast import read_fast
                read_fast(stream, index, info, finish, progress)
            else:
                _read_one(stream, index, info, finish, progress)
    return infos


def use_compiled(big: bool) -> bool:
    """Whether to run a compiled (numba) path: PCAPFLOW_FAST=0 or 1 decides; otherwise when
    numba is installed and the input is big enough to repay loading the compiled code."""
    choice = os.environ.get("PCAPFLOW_FAST", "").strip()
    if choice == "0":
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return choice == "1" or big


def _use_fast(fast: bool | None, source: Source) -> bool:
    if fast is not None:
        return fast
    try:
        big = os.path.getsize(source) >= FAST_MIN_BYTES
    except (TypeError, OSError):  # a stream: size unknown, likely big
        big = True
    return use_compiled(big)


def _read_one(stream, index: int, info: CaptureInfo, finish, progress) -> None:
    """The reference reader: frames one at a time through dpkt, accounted every CHUNK frames."""
    frame = done = 0
    framer = framer_for(stream, info, LINK_LAYERS)
    ref = ReferenceChunk(index)
    with cut_noted(info, framer, ref.__len__):
        while (rec := framer.next(stream)) is not None:
            if isinstance(rec, str):  # a frame with no record: its skip reason
                ref.skip(rec)
                continue
            frame += 1
            ref.add(frame, rec)
            if len(ref) == CHUNK:
                finish(ref.chunk())
                if progress is not None:
                    done, step = _position(stream, done)
                    progress(step)
    finish(ref.chunk())
    if progress is not None:
        progress(_position(stream, done)[1])
    check_links(info, framer.links, LINK_LAYERS)


class ReferenceChunk:
    """Frames decoded one by one with dpkt, gathered into a Chunk."""

    def __init__(self, capture: int) -> None:
        self.capture = capture
        self._reset()

    def _reset(self) -> None:
        self.cols = Columns()
        self.ts = array("d")
        self.code = array("h")

    def __len__(self) -> int:
        return len(self.ts)

    def skip(self, reason: str) -> None:
        self.ts.append(float("nan"))  # no timestamp: not counted in first/last_ts
        self.code.append(CODE[reason])

    def add(self, frame: int, rec) -> None:
        self.ts.append(rec.ts)
        if not abs(rec.ts) < MAX_ABS_TS:  # NaN too: not decoded
            self.code.append(CODE["bad_timestamp"])
            return
        reason = self.cols.add(self.capture, frame, rec.ts, rec.linktype, rec.data, rec.wirelen)
        self.code.append(0 if reason is None else CODE[reason])

    def chunk(self) -> Chunk:
        out = Chunk(np.asarray(self.ts), np.asarray(self.code, dtype=np.int16), self.cols.arrays())
        self._reset()
        return out


def _account(chunk: Chunk, info: CaptureInfo, caps: _Caps) -> dict[str, np.ndarray]:
    """Count one chunk's frames into `info` and return the segments it keeps."""
    code = chunk.code.copy()
    ts = chunk.ts
    good = np.abs(ts) < MAX_ABS_TS  # NaN too (a frame without a record has no time)
    seg_at = np.flatnonzero(code == 0)  # the frame of each segment row
    keep = good[seg_at]
    code[seg_at[~keep]] = CODE["bad_timestamp"]  # the fast path decodes before it knows
    segments, addresses = chunk.segments, chunk.addresses
    if not keep.all():
        segments, addresses = {k: v[keep] for k, v in segments.items()}, None
    seg_at = seg_at[keep]
    capped = caps.apply(segments, addresses)
    if capped is not None:
        code[seg_at] = capped
        segments = {k: v[capped == 0] for k, v in segments.items()}
    info.packets += len(code)
    if good.any():
        lo, hi = float(ts[good].min()), float(ts[good].max())
        info.first_ts = lo if info.first_ts is None else min(info.first_ts, lo)
        info.last_ts = hi if info.last_ts is None else max(info.last_ts, hi)
    skipped = code[code > 0]
    kinds, first, counts = np.unique(skipped, return_index=True, return_counts=True)
    for k in np.argsort(first, kind="stable"):  # in the order they first occurred
        reason = REASONS[kinds[k]]
        if reason in CAP_REASONS and reason not in info.skipped:
            log.warning("warning: %s: %s", clean(info.path), caps.limits.message(reason))
        info.skipped[reason] = info.skipped.get(reason, 0) + int(counts[k])
    info.tcp_packets += len(segments["ts"])
    return segments


class _Caps:
    """Limits over the whole read: the first `max_segments` segments, of the first
    `max_connections` 4-tuples (either direction); later ones get the cap's skip code."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.kept = 0
        self.tuples: set[int | tuple[int, int]] = set()  # the 4-tuples kept (see apply)
        self.addresses: dict[str, int] = {}

    def apply(self, seg: dict[str, np.ndarray], addresses: tuple | None = None) -> np.ndarray | None:
        """Codes for these segments (0: kept), or None when all are kept. `addresses`: see
        Chunk.addresses."""
        n = len(seg["ts"])
        if not n or self.limits == Limits.unbounded():
            return None
        codes, uniques = addresses or pd.factorize(np.concatenate([seg["src"], seg["dst"]]))
        ids = np.array([self.addresses.setdefault(a, len(self.addresses)) for a in uniques],
                       dtype=np.int64)[codes]
        a = (ids[:n] << 16) | seg["sport"]
        b = (ids[n:] << 16) | seg["dport"]
        codes, (lo, hi) = factorize_rows(np.minimum(a, b), np.maximum(a, b))
        # each 4-tuple once, in order of first appearance, as one int (quick to hash) when its
        # endpoint codes fit in 31 bits, else as a pair: always the same key for one 4-tuple
        keys = ((lo << 31) | hi).tolist()
        for k in np.flatnonzero(hi >= 1 << 31).tolist():
            keys[k] = (int(lo[k]), int(hi[k]))
        known = np.fromiter(map(self.tuples.__contains__, keys), dtype=bool, count=len(keys))
        lim = self.limits
        if self.kept + n <= lim.max_segments and len(self.tuples) + (~known).sum() <= lim.max_connections:
            self.tuples.update(keys)
            self.kept += n
            return None
        # the new 4-tuples fill what room is left, in order of first appearance
        room = max(lim.max_connections - len(self.tuples), 0)
        admissible = (known | (np.cumsum(~known) <= room))[codes]
        before = np.cumsum(admissible) - admissible  # admissible rows before each row
        over = self.kept + before >= lim.max_segments
        out = np.where(over, CODE["segment_cap"], np.where(admissible, 0, CODE["connection_cap"]))
        kept = out == 0
        self.kept += int(kept.sum())
        self.tuples.update(keys[k] for k in np.unique(codes[kept]).tolist())
        return out.astype(np.int16)


def factorize_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes of x and of y in one numbering, as pd.factorize of their concatenation gives
    them, from each factorized alone (addresses: few distinct values, small hash tables;
    0.09 s instead of 0.15 s for 2M sources and destinations) and then their distinct values."""
    (cx, ux), (cy, uy) = pd.factorize(x, size_hint=64), pd.factorize(y, size_hint=64)
    both = pd.factorize(np.concatenate([ux, uy]))[0]
    return np.append(both[:len(ux)], -1)[cx], np.append(both[len(ux):], -1)[cy]  # -1 (missing) stays


def factorize_rows(*columns: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Codes of the distinct rows of these integer columns, numbered in order of first
    appearance, and those rows' values (pandas hashing: one pass over the columns packed in
    one int64 when their values fit, else a column at a time)."""
    widths = [int(c.max()).bit_length() if len(c) and c.min() >= 0 else 64 for c in columns]
    if sum(widths) <= 63:
        packed = np.zeros(len(columns[0]), dtype=np.int64)
        for col, w in zip(columns, widths):
            packed = (packed << w) | col.astype(np.int64)
        codes, uniq = pd.factorize(packed)
        levels, shift = [], sum(widths)
        for col, w in zip(columns, widths):
            shift -= w
            levels.append(((uniq >> shift) & ((1 << w) - 1)).astype(col.dtype))
        return codes, levels
    codes = np.zeros(len(columns[0]), dtype=np.int64)
    levels = []
    for col in columns:
        c, values = pd.factorize(col)
        codes, first = pd.factorize(codes * len(values) + c)  # distinct (rows so far, value)
        levels = [lv[first // len(values)] for lv in levels] + [values[first % len(values)]]
    return codes, levels


def _position(stream, done: int) -> tuple[int, int]:
    """(bytes of the stored input consumed so far, bytes since `done`)."""
    try:
        now = stream.raw_position()
    except (OSError, ValueError):  # a pipe or a closed stream cannot tell
        return done, 0
    return now, max(now - done, 0)


class Growing:
    """Rows appended to one array grown in place (realloc moves pages rather than copying
    them, and leaves no pieces behind to fragment the heap), cut to size at the end."""

    def __init__(self, dtype, width: int = 0) -> None:
        self.shape = (width,) if width else ()
        self.data, self.n = np.empty((0, *self.shape), dtype), 0

    def add(self, rows: np.ndarray) -> None:
        end = self.n + len(rows)
        if end > len(self.data):
            self.data.resize((max(end, len(self.data) * 3 // 2, 1 << 12), *self.shape), refcheck=False)
        self.data[self.n:end] = rows
        self.n = end

    def array(self) -> np.ndarray:
        self.data.resize((self.n, *self.shape), refcheck=False)  # no views of it are held
        return self.data


class _Table:
    """The segment columns, each grown in place as chunks come."""

    def __init__(self) -> None:
        self.cols = {name: Growing(dtype) for name, dtype in SEGMENT_COLUMNS.items()}

    def add(self, seg: dict[str, np.ndarray]) -> None:
        for name, col in self.cols.items():
            col.add(seg[name])

    def frame(self) -> pd.DataFrame:
        """The segment table, in time order (stable: frames of one instant stay in reading order)."""
        cols = {name: col.array() for name, col in self.cols.items()}
        ts = cols["ts"]
        if not (ts[1:] >= ts[:-1]).all():  # most captures are in time order, or nearly
            order = np.argsort(ts, kind="stable")
            moved = np.flatnonzero(order != np.arange(len(order)))  # short.pcap: 1,634 of 2M rows
            order = order[moved]
            for col in cols.values():
                col[moved] = col[order]  # the right side is gathered first: a permutation in place
        # object columns stay Python objects: the analysis reads them back as such
        cols = {name: pd.Series(col, dtype=object) if col.dtype == object else col
                for name, col in cols.items()}
        return pd.DataFrame(cols, copy=False)  # each column as it is, not consolidated into blocks
