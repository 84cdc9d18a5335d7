"""Reading: captures in, one table of TCP segments out (plus per-file accounting)."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import BinaryIO

import numpy as np
import pandas as pd

from ..safe import clean
from ..vocab import SKIP_REASONS
from .decode import LINK_LAYERS, SEGMENT_COLUMNS, Columns
from .files import CaptureError, CaptureInfo, open_capture, records
from .limits import CAP_REASONS, Limits

__all__ = ["SEGMENT_COLUMNS", "SKIP_REASONS", "CaptureError", "CaptureInfo", "Limits",
           "read_captures"]

Source = str | os.PathLike | BinaryIO
log = logging.getLogger("pcapflow")
# Timestamps pandas can hold as datetimes (years 1677-2262); others come from corrupt headers
# or a pcapng simple packet block, which has none.
MAX_ABS_TS = 9.2e9


def read_captures(sources: Source | Iterable[Source],
                  progress: Callable[[int], None] | None = None,
                  limits: Limits | None = None,
                  ) -> tuple[pd.DataFrame, list[CaptureInfo]]:
    """Read captures into one segment table sorted by time (rotated files become one timeline).

    `progress`, if given, is called now and then with the number of input bytes (as stored,
    compressed or not) consumed since the last call.
    Raises CaptureError for an input that is not a readable capture; a capture cut short
    mid-record is read up to the cut and reported in `CaptureInfo.truncated`. `limits`
    (default: Limits.from_env()) caps the segments kept; a cap hit is logged as a warning.
    """
    if isinstance(sources, (str, os.PathLike)) or hasattr(sources, "read"):
        sources = [sources]
    cols = Columns(limits or Limits.from_env())
    infos: list[CaptureInfo] = []
    for index, source in enumerate(sources):
        with open_capture(source) as (stream, name, compression):
            info = CaptureInfo(path=name, compression=compression)
            infos.append(info)
            _read_one(stream, index, info, cols, progress)
    return _to_frame(cols), infos


def _read_one(stream, index: int, info: CaptureInfo, cols: Columns, progress) -> None:
    before = len(cols)
    frame = done = 0
    for rec in records(stream, info, LINK_LAYERS):
        frame += 1
        info.packets += 1
        if progress is not None and frame % 20000 == 0:
            done, step = _position(stream, done)
            progress(step)
        if not abs(rec.ts) < MAX_ABS_TS:  # NaN too
            info.skip("bad_timestamp")
            continue
        if info.first_ts is None or rec.ts < info.first_ts:
            info.first_ts = rec.ts
        if info.last_ts is None or rec.ts > info.last_ts:
            info.last_ts = rec.ts
        reason = cols.add(index, frame, rec.ts, rec.linktype, rec.data, rec.wirelen)
        if reason is not None:
            if reason in CAP_REASONS and reason not in info.skipped:
                log.warning("warning: %s: %s", clean(info.path), cols.limits.message(reason))
            info.skip(reason)
    if progress is not None:
        progress(_position(stream, done)[1])
    info.tcp_packets = len(cols) - before


def _position(stream, done: int) -> tuple[int, int]:
    """(bytes of the stored input consumed so far, bytes since `done`)."""
    try:
        now = stream.raw_position()
    except (OSError, ValueError):  # a pipe or a closed stream cannot tell
        return done, 0
    return now, max(now - done, 0)


def _to_frame(cols: Columns) -> pd.DataFrame:
    """The segment table, sorted by time (consumes the columns)."""
    # each column is freed as soon as it is converted (pop), to keep the peak low
    df = pd.DataFrame({name: np.asarray(cols.cols.pop(name), dtype=dtype)
                       for name, dtype in SEGMENT_COLUMNS.items()})
    return df.sort_values("ts", kind="stable", ignore_index=True)
