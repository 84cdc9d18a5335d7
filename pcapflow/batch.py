"""Many capture files, many processes: an archive of rotated captures -> Parquet datasets.

map (read each file into segments, hash-partitioned by canonical 4-tuple, written under a
temp dir) -> reduce (per partition, `analysis.build` over the segments of every file of the
group, so a connection whose FIN is in one file and last ACK in the next is reconstructed
as if the files were one) -> merge (conn_id renumbered in order of first packet, findings
over the merged table). Runs on a local process pool or an existing dask.distributed
cluster; a manifest in OUT_DIR lets a re-run skip groups whose files did not change.
"""
from __future__ import annotations

import glob
import hashlib
import heapq
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import ipc

from . import vantage as vt
from .analysis import (
    COMPILED_MIN_SEGMENTS,
    CONNECTION_COLUMNS,
    EVENT_COLUMNS,
    build,
    write_document,
)
from .capture import SEGMENT_COLUMNS, CaptureError, CaptureInfo, Limits, read_chunks
from .capture.files import COMPRESSION_MAGICS, PCAP_MAGICS, PCAPNG_MAGIC
from .findings import INPUTS, compute_findings
from .flows import DUP_KEY
from .teardown import Params

TABLES = ("connections", "events", "findings", "files")
FILE_COLUMNS = ["path", "group", "size", "mtime", "sha256", "format", "compression", "linktype",
                "packets", "tcp_packets", "skipped", "first_ts", "last_ts", "truncated", "error",
                "duplicate_of", "overlaps"]
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
BYTES_PER_PARTITION = 64 << 20  # capture bytes per reduce partition: bounds a worker's memory
CAPTURE_NAME = re.compile(r"\.(pcap|pcapng|cap|dmp)(\.|$)", re.IGNORECASE)
REPEAT = "duplicate_of_other_file"  # skip reason: an earlier overlapping file holds this packet


class BatchError(Exception):
    """A usage problem: nothing to analyze, an unknown grouping, an unreachable scheduler."""


@dataclass
class BatchResult:
    """What a batch run did: counts for the summary, and the files that could not be read."""

    out_dir: str
    files: int = 0
    groups: int = 0
    recomputed: int = 0
    unchanged: int = 0
    connections: int = 0
    events: int = 0
    findings: int = 0
    truncated: int = 0  # files cut short mid-record: the packets before the cut were analyzed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, error)

    def summary(self) -> str:
        head = (f"{self.files} files in {self.groups} groups ({self.recomputed} analyzed, "
                f"{self.unchanged} unchanged): {self.connections} connections, "
                f"{self.events} events, {self.findings} findings -> {self.out_dir}")
        if self.truncated:
            head += f"\n{self.truncated} files cut short mid-record: analyzed up to the cut"
        lines = [head] + [f"failed: {path}: {error}" for path, error in self.failed]
        return "\n".join(lines)


def run(paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike, jobs: int | None = None,
        scheduler: str | None = None, group_by: str = "dir", msl: float = 30.0,
        fin_timeout: float = 60.0, partitions: int | None = None,
        progress: Callable[[int, int], None] | None = None) -> BatchResult:
    """Analyze every capture under `paths`, one timeline per group, into Parquet under `out_dir`.

    `group_by`: "dir" (one vantage point per directory) or "none" (everything is one
    timeline). `partitions` fixes the reduce partitions per group (default: by size).
    `progress(done, total)` is called as files are read. Raises BatchError when no capture
    is found; unreadable files are reported in the result and the `files` table.
    """
    out_dir = os.path.abspath(out_dir)
    files = find_captures(paths, exclude=out_dir)
    if not files:
        raise BatchError("no capture files found in " + " ".join(map(str, paths)))
    groups: dict[str, list[str]] = {}
    for path in files:
        groups.setdefault(_group_of(path, group_by), []).append(path)
    params = {"msl": msl, "fin_timeout": fin_timeout}
    os.makedirs(out_dir, exist_ok=True)
    old = _load_manifest(out_dir, params)
    stats = {p: os.stat(p) for p in files}
    manifest = {"version": MANIFEST_VERSION, "params": params, "groups": {}}
    todo = {}
    for g, members in groups.items():
        entry = old.get(g)
        if entry is not None and _unchanged(entry, members, stats, out_dir):
            manifest["groups"][g] = entry
        else:
            todo[g] = members
    tmp = os.path.join(out_dir, f".tmp-{uuid.uuid4().hex}")
    try:
        with _executor(jobs, scheduler) as pool:
            manifest["groups"].update(_analyze_groups(
                pool, todo, stats, out_dir, tmp, Params(msl=msl, fin_timeout=fin_timeout),
                partitions, progress, len(files)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for g in set(old) - set(groups):
        _remove_outputs(out_dir, old[g]["key"])
    _unify_schemas(out_dir)
    with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
    os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
    result = BatchResult(out_dir, files=len(files), groups=len(groups), recomputed=len(todo),
                         unchanged=len(groups) - len(todo))
    for entry in manifest["groups"].values():
        for k in ("connections", "events", "findings"):
            setattr(result, k, getattr(result, k) + entry["counts"][k])
        result.truncated += sum(bool(f["truncated"]) for f in entry["files"].values())
        result.failed += [(p, f["error"]) for p, f in sorted(entry["files"].items()) if f["error"]]
    return result


@dataclass
class Streamed:
    """What `analyze` gives, a slice at a time: `captures` (each input's accounting) and
    `tables()`, to be walked once, in order (the findings come from the connections)."""

    captures: list[CaptureInfo]
    merged: _Merged
    progress: Callable[[int, int], None] | None = None  # (rows given out, rows in all)

    @property
    def params(self) -> Params:
        return self.merged.params

    def connections(self) -> Iterator[pd.DataFrame]:
        return self._counted(self.merged.connections(), len(self.merged.part_of))

    def tables(self) -> Iterator[tuple[str, Iterable[pd.DataFrame]]]:
        total = len(self.merged.part_of) + sum(r["n_events"] for r in self.merged.results)
        yield "connections", self._counted(self.merged.connections(), total)
        yield "events", self._counted(self.merged.events(), total, len(self.merged.part_of))
        yield "findings", (self.merged.findings() for _ in (0,))  # not before the connections

    def _counted(self, frames: Iterator[pd.DataFrame], total: int, done: int = 0) -> Iterator[pd.DataFrame]:
        for df in frames:
            yield df
            done += len(df)
            if self.progress is not None:
                self.progress(done, total)

    def write_json(self, fh) -> None:
        """The document `analyze` writes; for a big capture the slices are joined by fastjson
        whatever their size, as the whole tables would be."""
        big = len(self.merged.part_of) >= COMPILED_MIN_SEGMENTS
        write_document(fh, self.captures, self.tables(), compiled=big or None)


COMPRESSION_RATIO = 10  # capture bytes guessed per compressed byte, to size the partitions
PACKETS_PER_PARTITION = 1 << 17  # about BYTES_PER_PARTITION of HTTP; more for tiny packets


def _packets_guessed(head: bytes, size: int) -> int:
    """Packets in a plain pcap file of `size` bytes, from the records in its first bytes
    `head` (a storm of SYNs and RSTs is 80 bytes a record, HTTP 500): 0 for other forms."""
    if head[:4] not in PCAP_MAGICS:
        return 0
    order = PCAP_MAGICS[head[:4]][0]
    at, n = 24, 0
    while at + 16 <= len(head):
        at += 16 + int.from_bytes(head[at + 8:at + 12], "little" if order == "<" else "big")
        n += 1
    return size * n // max(at - 24, 1) if n else 0


@contextmanager
def analyze_streamed(sources: list[str], msl: float = 30.0, fin_timeout: float = 60.0,
                     filter: str | None = None, progress: Callable[[int], None] | None = None,
                     analysis_progress: Callable[[int, int], None] | None = None) -> Iterator[Streamed]:
    """`analyze` of captures too big for memory, as batch does one group: segments
    hash-partitioned by 4-tuple into a temporary directory while reading, partitions
    reconstructed one after another, tables merged in `analyze`'s order. Memory is bounded by
    a partition (~BYTES_PER_PARTITION of capture), not by the captures; the tables equal
    `analyze`'s (no caps apply). The temporary directory goes when the block ends."""
    if filter:
        from .bpf import parse
        parse(filter)  # a bad filter is said before reading
    size = packets = 0
    for source in sources:
        if os.path.isfile(source):
            with open(source, "rb") as fh:
                head = fh.read(1 << 20)
            packed = any(head.startswith(m) for m in COMPRESSION_MAGICS)
            size += os.path.getsize(source) * (COMPRESSION_RATIO if packed else 1)
            packets += _packets_guessed(head, os.path.getsize(source))
    n_parts = max(1, math.ceil(size / BYTES_PER_PARTITION), math.ceil(packets / PACKETS_PER_PARTITION))
    tmp = tempfile.mkdtemp(prefix="pcapflow-")
    try:
        maps = []
        for i, source in enumerate(sources):
            maps.append(_map_file(source, os.path.join(tmp, str(i)), n_parts, False, progress))
            if maps[-1]["error"]:
                raise CaptureError(f"{maps[-1]['info']['path']}: {maps[-1]['error']}")
        captures = [CaptureInfo(**m["info"]) for m in maps]
        end = max((c.last_ts for c in captures if c.last_ts is not None), default=None)
        params = Params(msl=msl, fin_timeout=fin_timeout)
        todo = [(p, [(i, m["parts"][p]) for i, m in enumerate(maps) if p in m["parts"]]) for p in range(n_parts)]
        todo = [(p, parts) for p, parts in todo if parts]

        def reduce(k: int, votes: Counter) -> dict:
            p, parts = todo[k]
            return _reduce(parts, captures, params, end, frozenset(), os.path.join(tmp, f"r{p}"),
                           n_parts, filter, votes)

        results, before = [], Counter()  # the votes of the partitions before: few decided again
        for k in range(len(todo)):
            results.append(reduce(k, before))
            before.update(results[-1]["votes"])
            if analysis_progress is not None:
                analysis_progress(k + 1, len(todo))
        results = _revote(results, lambda stale, others: [reduce(k, v) for k, v in zip(stale, others)])
        filtered: dict[int, int] = {}
        for r in results:
            for cap, n in r["filtered"].items():
                filtered[cap] = filtered.get(cap, 0) + int(n)
        for cap, n in sorted(filtered.items()):
            captures[cap].skipped["filtered"] = n  # counted, like every skipped packet
            captures[cap].tcp_packets -= n
        yield Streamed(captures, _Merged(results, params, end, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_captures(paths: Iterable[str | os.PathLike], exclude: str | None = None) -> list[str]:
    """Absolute paths of the captures named by `paths` (files, directories, glob patterns).

    A file named directly is always taken; inside a directory, a file is taken when its name
    says capture (.pcap, .pcapng, .cap, .dmp, compressed or not) or its first bytes are a
    capture or compression magic, so README and JSON files beside captures are left out.
    """
    found: set[str] = set()
    for arg in map(str, paths):
        for hit in ([arg] if os.path.exists(arg) else glob.glob(arg, recursive=True)):
            if os.path.isdir(hit):
                for root, dirs, names in os.walk(hit):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    found.update(os.path.abspath(os.path.join(root, n)) for n in names
                                 if not n.startswith(".") and _looks_like_capture(os.path.join(root, n)))
            elif os.path.isfile(hit):
                found.add(os.path.abspath(hit))
    if exclude is not None:
        found = {p for p in found if os.path.commonpath([p, exclude]) != exclude}
    return sorted(found)


def _looks_like_capture(path: str) -> bool:
    if CAPTURE_NAME.search(os.path.basename(path)):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError:
        return True  # unreadable: let the map step report it
    return head[:4] in PCAP_MAGICS or head[:4] == PCAPNG_MAGIC or any(
        head.startswith(m) for m in COMPRESSION_MAGICS)


def _group_of(path: str, group_by: str) -> str:
    if group_by == "dir":
        return os.path.dirname(path)
    if group_by == "none":
        return "all"
    raise BatchError(f"--group-by must be dir or none, not {group_by!r}")


@contextmanager
def _executor(jobs: int | None, scheduler: str | None) -> Iterator[Executor]:
    """A local process pool on `jobs` cores (default all), or an existing dask cluster."""
    if scheduler:
        try:
            from distributed import Client
        except ImportError:
            raise BatchError("--scheduler needs dask.distributed: pip install 'pcapflow[dask]'") from None
        try:
            client = Client(scheduler, timeout=10)
        except OSError as e:
            raise BatchError(f"cannot reach the dask scheduler at {scheduler}: {e}") from None
        with client:
            yield client.get_executor(pure=False)  # files change on disk under the same arguments
    else:
        with ProcessPoolExecutor(max_workers=jobs or os.cpu_count()) as pool:
            yield pool


def _analyze_groups(pool: Executor, todo: dict[str, list[str]], stats: dict, out_dir: str,
                    tmp: str, params: Params, partitions: int | None, progress,
                    total: int) -> dict[str, dict]:
    """Map every file of the changed groups; reduce a group's partitions once its files are
    read; merge and write a group once its partitions are analyzed. Returns manifest entries."""
    maps, n_parts = {}, {}
    for g, members in todo.items():
        size = sum(stats[p].st_size for p in members)
        n_parts[g] = partitions or max(1, math.ceil(size / BYTES_PER_PARTITION))
        for i, path in enumerate(members):
            out = os.path.join(tmp, _key(g), str(i))
            maps[pool.submit(_map_file, path, out, n_parts[g])] = (g, path)
    read: dict[str, dict[str, dict]] = {g: {} for g in todo}
    plans, reduces, results, entries = {}, {}, {g: [] for g in todo}, {}
    pending = {g: len(members) for g, members in todo.items()}

    def finish(g: str) -> None:
        args, done = zip(*results.pop(g)) if results[g] else ((), ())
        done = _revote(done, lambda stale, others: [f.result() for f in [
            pool.submit(_reduce, *args[k], votes=v) for k, v in zip(stale, others)]])
        entries[g] = _merge(g, plans[g], done, params, out_dir, os.path.join(tmp, _key(g)))

    for k, fut in enumerate(as_completed(maps), 1):
        g, path = maps[fut]
        read[g][path] = fut.result()
        if progress is not None:
            progress(total - len(maps) + k, total)
        pending[g] -= 1
        if pending[g]:
            continue
        plans[g] = plan = _plan(g, todo[g], read.pop(g), stats)
        for p in range(n_parts[g]):
            parts = [(i, t["parts"][p]) for i, t in enumerate(plan["timeline"]) if p in t["parts"]]
            if parts:
                args = (parts, plan["captures"], params, plan["end"], plan["overlapping"],
                        os.path.join(tmp, _key(g), f"r{p}"), n_parts[g])
                reduces[pool.submit(_reduce, *args)] = g, args
                pending[g] += 1
        if not pending[g]:
            finish(g)
    for fut in as_completed(reduces):
        g, args = reduces[fut]
        results[g].append((args, fut.result()))
        pending[g] -= 1
        if not pending[g]:
            finish(g)
    return entries


def _map_file(path: str, out: str, n_parts: int, checksum: bool = True,
              progress: Callable[[int], None] | None = None) -> dict:
    """Read one file: its sha256 (if `checksum`), accounting and segments, hash-partitioned to
    `out`/<p>.arrow as they are read (memory bounded by the chunks buffered, not by the file)."""
    rec = {"sha256": None, "error": None, "info": asdict(CaptureInfo(path=path)), "parts": {}}
    writer = _PartitionWriter(out, n_parts)
    try:
        if checksum:
            rec["sha256"] = _sha256(path)
        # no caps: what is read is written out, and partitions bound each reduce's memory
        (info,) = read_chunks(path, writer.add, progress, limits=Limits.unbounded())
    except CaptureError as e:
        rec["error"] = str(e).removeprefix(f"{path}: ")  # the files table names the file
        return rec
    except Exception as e:  # noqa: BLE001 - one undecodable file must not sink the archive's batch
        rec["error"] = f"{type(e).__module__}.{type(e).__qualname__}: {e}".removeprefix("builtins.")
        return rec
    finally:
        parts = writer.close()
    rec["parts"], rec["info"] = parts, asdict(info)
    return rec


# The segment table in Arrow, one schema for every batch whatever a chunk holds
_TYPES = {"object": pa.string(), "bool": pa.bool_()}
SEGMENT_SCHEMA = pa.schema([
    (name, pa.list_(pa.list_(pa.int64())) if name == "sack" else _TYPES.get(dtype) or pa.from_numpy_dtype(np.dtype(dtype)))
    for name, dtype in SEGMENT_COLUMNS.items()])
BUFFERED_ROWS = 1 << 18  # segments held before they are written out
SEGMENT_IPC = ipc.IpcWriteOptions(compression="zstd")


class _PartitionWriter:
    """Segment chunks -> one Arrow IPC file (zstd) per partition, a batch at a time. Not
    Parquet: each of its files keeps every row group's metadata in memory until closed, and
    a 10 GB capture in 161 partitions made 13k small row groups (the map's RSS: 557 MB, with
    IPC 282); IPC also writes and reads back faster here (short.pcap's map 2.3 -> 1.9 s)."""

    def __init__(self, out: str, n_parts: int) -> None:
        self.out, self.n_parts = out, n_parts
        self.buffers: dict[int, list[dict[str, np.ndarray]]] = {}
        self.writers: dict[int, tuple[str, ipc.RecordBatchFileWriter]] = {}
        self.buffered = 0

    def add(self, cols: dict[str, np.ndarray]) -> None:
        """One chunk's columns, each cut by partition (numpy only: a DataFrame and its groupby
        took 1.2 s of short.pcap's map)."""
        part = _partition(cols, self.n_parts)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.n_parts + 1))
        cols = {name: values[order] for name, values in cols.items()}
        for p in np.flatnonzero(np.diff(bounds)).tolist():
            lo, hi = bounds[p], bounds[p + 1]
            self.buffers.setdefault(p, []).append({name: values[lo:hi] for name, values in cols.items()})
        self.buffered += len(part)
        if self.buffered >= BUFFERED_ROWS:
            self._flush()

    def _flush(self) -> None:
        for p, frames in self.buffers.items():
            if p not in self.writers:
                os.makedirs(self.out, exist_ok=True)
                path = os.path.join(self.out, f"{p}.arrow")
                self.writers[p] = path, ipc.new_file(path, SEGMENT_SCHEMA, options=SEGMENT_IPC)
            table = pa.Table.from_arrays([pa.array(np.concatenate([f[name] for f in frames]), type=field.type)
                                          for name, field in zip(SEGMENT_SCHEMA.names, SEGMENT_SCHEMA)],
                                         schema=SEGMENT_SCHEMA)
            self.writers[p][1].write_table(table)
        self.buffers, self.buffered = {}, 0

    def close(self) -> dict[int, str]:
        """Write what is buffered and close: {partition: path}."""
        self._flush()
        for _, w in self.writers.values():
            w.close()
        paths = {p: path for p, (path, _) in sorted(self.writers.items())}
        self.writers = {}
        return paths


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _partition(seg: Mapping[str, np.ndarray], n_parts: int) -> np.ndarray:
    """Partition of each segment (columns by name): a stable hash of its 4-tuple, the same in
    both directions (each distinct address hashed once, then mixed with its port)."""
    ends = []
    for ip, port in (("src", "sport"), ("dst", "dport")):
        codes, uniques = pd.factorize(np.asarray(seg[ip]))
        ends.append(pd.util.hash_array(np.asarray(uniques, dtype=object))[codes]
                    ^ np.asarray(seg[port]).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    lo, hi = np.minimum(*ends), np.maximum(*ends)
    return pd.util.hash_array(lo * np.uint64(0x100000001B3) ^ hi) % np.uint64(n_parts)


def _plan(group: str, members: list[str], read: dict[str, dict], stats: dict) -> dict:
    """Order a group's files into one timeline: by first packet, without failed files or
    exact copies (same sha256); each file lists the others whose time ranges overlap it."""
    rows, timeline, first_of, active = [], [], {}, []
    for path in sorted(members, key=lambda p: (read[p]["info"]["first_ts"] is None,
                                               read[p]["info"]["first_ts"] or 0.0, p)):
        r = read[path]
        row = {**r["info"], "path": path, "group": group, "size": stats[path].st_size,
               "mtime": stats[path].st_mtime, "sha256": r["sha256"], "error": r["error"],
               "duplicate_of": None, "overlaps": []}
        rows.append(row)
        if r["error"]:
            continue
        if r["sha256"] in first_of:
            row["duplicate_of"] = first_of[r["sha256"]]
            continue
        first_of[r["sha256"]] = path
        if row["first_ts"] is None:
            continue
        active = [i for i in active if timeline[i]["row"]["last_ts"] > row["first_ts"]]
        for i in active:
            timeline[i]["row"]["overlaps"].append(path)
            row["overlaps"].append(timeline[i]["row"]["path"])
        active.append(len(timeline))
        timeline.append({"row": row, "parts": r["parts"]})
    overlapping = frozenset(i for i, t in enumerate(timeline) if t["row"]["overlaps"])
    captures = [CaptureInfo(**{k: t["row"][k] for k in CaptureInfo.__dataclass_fields__})
                for t in timeline]
    end = max((c.last_ts for c in captures), default=None)
    manifest = {p: {"size": stats[p].st_size, "mtime_ns": stats[p].st_mtime_ns,
                    "sha256": read[p]["sha256"], "error": read[p]["error"],
                    "truncated": read[p]["info"]["truncated"]} for p in members}
    return {"rows": rows, "timeline": timeline, "captures": captures, "end": end,
            "overlapping": overlapping, "manifest": manifest}


def _reduce(parts: list[tuple[int, str]], captures: list[CaptureInfo], params: Params,
            capture_end: float | None, overlapping: frozenset[int], out: str, n_parts: int,
            filter: str | None = None, votes: Mapping[str, int] | None = None) -> dict:
    """Analyze one partition (of `n_parts`): the segments of its 4-tuples from every file of
    the group, those `filter` keeps. Its tables go to files under `out` (pickles: exact round
    trip) in slices small enough that the merge can hold one of every partition at once; what
    comes back is small: each connection's first packet, counts, and the vantage votes of its
    hosts with the connections they decided (see `_revote`)."""
    frames = []
    for index, path in parts:
        with ipc.open_file(path) as f:
            seg = f.read_all().to_pandas()
        seg["capture"] = np.int32(index)
        frames.append(seg)
    seg = pd.concat(frames, ignore_index=True)
    for col, dtype in SEGMENT_COLUMNS.items():  # Arrow gives NaN for a missing string
        if dtype == "object":
            seg[col] = seg[col].astype(object).where(seg[col].notna(), None)
    # read_captures' order: time, then file, then frame within the file
    seg = seg.sort_values(["ts", "capture", "frame"], kind="stable", ignore_index=True)
    keep = ~_repeats(seg, overlapping)
    dropped = seg.loc[~keep, "capture"].value_counts().to_dict()
    filtered = {}
    if filter:
        from .bpf import parse
        passed = np.asarray(parse(filter)(seg), dtype=bool)
        filtered = seg.loc[keep & ~passed, "capture"].value_counts().to_dict()
        keep &= passed
    a = build(seg[keep].reset_index(drop=True), captures, params, capture_end=capture_end, votes=votes)
    first = _first_packets(a.segments)
    shutil.rmtree(out, ignore_errors=True)  # a partition analyzed again (`_revote`)
    os.makedirs(out)
    c = a.connections
    voted = c["conn_id"].isin(a.undecided).to_numpy()
    local = Counter(c.loc[~voted & (c["vantage"] == "client"), "client_ip"].tolist())
    local.update(c.loc[~voted & (c["vantage"] == "server"), "server_ip"].tolist())
    return {"connections": _spill(a.connections, max(CONNECTIONS_HELD // n_parts, LEAST_SLICE), out, "connections"),
            "events": _spill(a.events, max(1, EVENTS_HELD // n_parts), out, "events"),
            "first": first, "dropped": dropped, "filtered": filtered, "votes": local, "n_events": len(a.events),
            "voted": list(c.loc[voted, ["client_ip", "server_ip", "vantage"]].drop_duplicates()
                          .itertuples(index=False, name=None))}


def _first_packets(seg: pd.DataFrame) -> pd.DataFrame:
    """(ts, capture, frame) of each connection's first packet, indexed by conn."""
    conn = seg["conn"].to_numpy()
    cols = {k: seg[k].to_numpy() for k in ("ts", "capture", "frame")}
    order = np.lexsort((cols["frame"], cols["capture"], cols["ts"], conn))
    conn = conn[order]
    first = order[np.flatnonzero(np.r_[True, conn[1:] != conn[:-1]])] if len(conn) else order
    return pd.DataFrame({k: v[first] for k, v in cols.items()}, index=seg["conn"].to_numpy()[first])


def _revote(results: list[dict], again: Callable[[list[int], list[Counter]], list[dict]]) -> list[dict]:
    """A connection whose own packets do not place the capture point takes the side that the
    other connections of its hosts voted for, over the whole timeline: partitions that
    decided one otherwise are analyzed again (`again(indices, votes)`, each with the other
    partitions' votes). Nothing is redone when no partition had such a connection, or all agree."""
    votes = Counter()
    for r in results:
        votes.update(r["votes"])
    stale = [i for i, r in enumerate(results)
             if any(v != vt.by_votes(votes[c], votes[s]) for c, s, v in r["voted"])]
    results = list(results)
    for i, r in zip(stale, again(stale, [votes - results[i]["votes"] for i in stale])):
        results[i] = r
    return results


def _spill(df: pd.DataFrame, rows: int, out: str, name: str) -> list[str]:
    """A table in slices of `rows` rows, pickled (an exact round trip) under `out`."""
    paths = []
    for k in range(0, max(len(df), 1), rows):
        paths.append(os.path.join(out, f"{name}.{k}.pkl"))
        df.iloc[k:k + rows].to_pickle(paths[-1])
    return paths


def _repeats(seg: pd.DataFrame, overlapping: frozenset[int]) -> np.ndarray:
    """True for a packet an earlier file of overlapping ones already holds: same time, same headers."""
    out = np.zeros(len(seg), dtype=bool)
    cand = seg["capture"].isin(overlapping).to_numpy()
    if cand.any():
        sub = seg[cand]
        first = sub.groupby(["ts", "ttl", *DUP_KEY], sort=False, dropna=False)["capture"].transform("first")
        out[np.flatnonzero(cand)] = (sub["capture"] != first).to_numpy()
    return out


def _merge(group: str, plan: dict, results: list[dict], params: Params, out_dir: str, tmp: str) -> dict:
    """Write one group's tables from its partitions: global conn_id in order of first packet
    (ties: file, then frame, as `analyze` orders them), connections and events merged in
    order a slice at a time, findings over the columns they read. Returns the group's
    manifest entry."""
    key = _key(group)
    for name in ("connections", "events"):
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    merged = _Merged(results, params, plan["end"], tmp, group)
    n_conns = _write_slices(merged.connections(), _output(out_dir, "connections", key))
    findings = merged.findings()
    dropped: dict[int, int] = {}
    for r in results:
        for cap, n in r["dropped"].items():
            dropped[cap] = dropped.get(cap, 0) + int(n)
    for cap, n in dropped.items():
        row = plan["timeline"][cap]["row"]
        row["skipped"] = {**row["skipped"], REPEAT: n}
        row["tcp_packets"] -= n
    files = pd.DataFrame([{k: r[k] for k in FILE_COLUMNS} for r in plan["rows"]], columns=FILE_COLUMNS)
    findings.insert(0, "group", group)
    _write_outputs(out_dir, key, {"findings": findings, "files": files})
    n_events = _write_stream(merged.events(), _output(out_dir, "events", key))
    return {"key": key, "files": plan["manifest"],
            "counts": {"connections": n_conns, "events": n_events, "findings": len(findings)}}


class _Merged:
    """A timeline's tables from its reduced partitions, in the order `analyze` gives them: global
    conn_id in order of first packet (ties: file, then frame), connections and events a slice at
    a time; findings over the columns they read, kept as the connections go by (so after them).
    `group`, when given, is the first column of every slice."""

    def __init__(self, results: list[dict], params: Params, capture_end: float | None, tmp: str,
                 group: str | None = None) -> None:
        self.results, self.params, self.capture_end, self.group = results, params, capture_end, group
        firsts = [r["first"].assign(part=i, local=r["first"].index) for i, r in enumerate(results)]
        order = pd.concat(firsts or [pd.DataFrame(columns=["ts", "capture", "frame", "part", "local"])],
                          ignore_index=True).sort_values(["ts", "capture", "frame"], kind="stable",
                                                         ignore_index=True)
        self.part_of = order["part"].to_numpy()  # the partition of each global conn_id
        self.remaps = []  # per partition: local conn_id (0..n-1) -> global
        for i, r in enumerate(results):
            remap = np.empty(len(r["first"]), dtype=np.int64)
            mine = np.flatnonzero(self.part_of == i)
            remap[order["local"].to_numpy()[mine]] = mine
            self.remaps.append(remap)
        self.inputs = os.path.join(tmp, "findings")  # a file per column the findings read

    def connections(self) -> Iterator[pd.DataFrame]:
        """The connections a slice at a time; the columns the findings read go to disk, each
        slice's as a pickle appended to its column's file (memory: one slice)."""
        os.makedirs(self.inputs, exist_ok=True)
        with ExitStack() as stack:
            files = {col: stack.enter_context(open(os.path.join(self.inputs, col), "wb")) for col in INPUTS}
            for df in _connections_in_order(self.results, self.remaps, self.part_of, self.group):
                for col, fh in files.items():
                    pickle.dump(df[col].reset_index(drop=True), fh, pickle.HIGHEST_PROTOCOL)
                yield df

    def events(self) -> Iterator[pd.DataFrame]:
        return _events_in_order(self.results, self.remaps, self.group)

    def findings(self) -> pd.DataFrame:
        """Once the connections have been walked: each finder gets the columns it reads, read
        back from disk (memory: the widest finder's columns, not all 30)."""
        def columns(names: list[str]) -> pd.DataFrame:
            if not len(self.part_of):
                return pd.DataFrame(columns=names)
            c = pd.DataFrame({col: pd.concat(_pickles(os.path.join(self.inputs, col)), ignore_index=True)
                              for col in names}, copy=False)
            c.index = c["conn_id"].to_numpy()  # as in analyze's table
            return c
        return compute_findings(SimpleNamespace(params=self.params, capture_end=self.capture_end), columns)


def _pickles(path: str) -> Iterator:
    with open(path, "rb") as fh:
        while True:
            try:
                yield pickle.load(fh)
            except EOFError:
                return


# Rows a group's merge holds at once, one spilled slice of every partition (a connection is
# ~7 kB as Python objects, an event ~0.2 kB)...
CONNECTIONS_HELD = 1 << 13
EVENTS_HELD = 1 << 17
# ... but a partition's connections are spilled this many at least, and merged as many per
# partition at once: with 161 partitions (a 10 GB capture), slices of 50 rows made the merge
# cost grow with the square of the capture; memory then grows with the partitions, slowly
LEAST_SLICE = 256


def _connections_in_order(results: list[dict], remaps: list[np.ndarray], part_of: np.ndarray,
                          group: str) -> Iterator[pd.DataFrame]:
    """Every partition's connections renumbered, in global conn_id order, a block at a time:
    `part_of[k]` is the partition holding connection k, and each partition's connections come
    in its own order, which renumbering keeps."""

    def slices(r, remap):
        for path in r["connections"]:
            c = pd.read_pickle(path)
            c["conn_id"] = remap[c["conn_id"].to_numpy(np.int64)]
            yield c.set_index("conn_id", drop=False).rename_axis(None)

    streams = [slices(r, remap) for r, remap in zip(results, remaps)]
    bufs = [pd.DataFrame(columns=CONNECTION_COLUMNS) for _ in streams]
    block = max(CONNECTIONS_HELD, LEAST_SLICE * len(streams))
    for start in range(0, len(part_of), block):
        need = np.bincount(part_of[start:start + block], minlength=len(streams))
        taken = []
        for i in np.flatnonzero(need).tolist():
            while len(bufs[i]) < need[i]:
                more = next(streams[i])
                bufs[i] = pd.concat([bufs[i], more]) if len(bufs[i]) else more
            taken.append(bufs[i].iloc[:need[i]])
            bufs[i] = bufs[i].iloc[need[i]:]
        out = pd.concat(taken).sort_index()
        if group is not None:
            out.insert(0, "group", group)
        yield out


def _write_slices(frames: Iterable[pd.DataFrame], path: str) -> int:
    """Slices of one table into one Parquet file, the slices' schemas unified (a slice with no
    losses types `losses` as list<null>, another as list<struct>); returns the rows written."""
    parts, n = [], 0
    for df in frames:  # hidden names: readers of the dataset directory skip them
        parts.append(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{len(parts)}.tmp"))
        write_table(df, parts[-1])
        n += len(df)
    if not parts:
        write_table(pd.DataFrame(columns=["group", *CONNECTION_COLUMNS]), path)
        return 0
    common = pa.unify_schemas([pq.read_schema(p) for p in parts], promote_options="permissive")
    with pq.ParquetWriter(path + ".tmp", common) as writer:
        for p in parts:
            writer.write_table(pq.read_table(p).cast(common))
            os.remove(p)
    os.replace(path + ".tmp", path)
    return n


EVENT_SCHEMA = pa.schema([("group", pa.string()), ("conn_id", pa.int64()), ("ts", pa.float64())]
                         + [(c, pa.string()) for c in EVENT_COLUMNS[2:]])


def _events_in_order(results: list[dict], remaps: list[np.ndarray], group: str) -> Iterator[pd.DataFrame]:
    """Every partition's events (each already in (ts, conn_id) order, which renumbering keeps),
    merged into slices of the group's (ts, conn_id) order: the stream whose rows read so far
    end first is read on until EVENTS_HELD rows are held, then what lies before the earliest
    end among the streams still coming is given out (one pass over the streams per slice out,
    whatever the number of partitions)."""

    def slices(r, remap):
        for path in r["events"]:
            e = pd.read_pickle(path)
            e["conn_id"] = remap[e["conn_id"].to_numpy(np.int64)]
            named = e["detail"].str.contains("connection ", regex=False).fillna(False).to_numpy(bool)
            if named.any():  # few events name another connection
                e.loc[named, "detail"] = [_renumber_text(d, remap) for d in e.loc[named, "detail"].tolist()]
            yield e

    streams = [slices(r, remap) for r, remap in zip(results, remaps)]
    held: list[list[pd.DataFrame]] = [[] for _ in streams]  # read, not yet given out
    ends: list[tuple[float, int]] = []  # heap: (last time read, stream) of streams still coming
    count = 0

    def pull(i: int) -> None:
        nonlocal count
        for e in streams[i]:
            if len(e):
                held[i].append(e)
                count += len(e)
                heapq.heappush(ends, (float(e["ts"].iloc[-1]), i))
                return

    for i in range(len(streams)):
        pull(i)
    while ends or count:
        while ends and count < EVENTS_HELD:
            pull(heapq.heappop(ends)[1])
        cutoff = ends[0][0] if ends else math.inf  # no stream still coming has anything earlier
        out = []
        for i, frames in enumerate(held):
            if frames:
                e = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
                k = int(e["ts"].to_numpy().searchsorted(cutoff))  # sorted: a head
                if k:
                    out.append(e.iloc[:k])
                held[i] = [e.iloc[k:]] if k < len(e) else []
        if not out:  # all held lies at the cut: the next slice decides
            pull(heapq.heappop(ends)[1])
            continue
        out = pd.concat(out, ignore_index=True).sort_values(["ts", "conn_id"], kind="stable",
                                                            ignore_index=True)
        count -= len(out)
        if group is not None:
            out.insert(0, "group", group)
        yield out


def _write_stream(frames: Iterable[pd.DataFrame], path: str) -> int:
    """Event slices into one Parquet file (its row groups); returns the rows written."""
    n = 0
    with pq.ParquetWriter(path + ".tmp", EVENT_SCHEMA) as writer:
        for df in frames:
            writer.write_table(pa.Table.from_pandas(df, EVENT_SCHEMA, preserve_index=False))
            n += len(df)
    os.replace(path + ".tmp", path)
    return n


CONNECTION_REF = re.compile(r"\bconnection (\d+)")


def _renumber_text(detail, remap: np.ndarray):
    """Event details name other connections ("... on connection 3"): use the global ids."""
    if not isinstance(detail, str):
        return detail
    return CONNECTION_REF.sub(lambda m: f"connection {remap[int(m[1])]}", detail)


def _key(group: str) -> str:
    """File name of a group's outputs: readable tail plus a hash of the full group path."""
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(group.rstrip("/")) or "root")
    return f"{tail}-{hashlib.sha256(group.encode()).hexdigest()[:12]}"


def _load_manifest(out_dir: str, params: dict) -> dict:
    """Groups of the previous run, or none when it used other parameters or another format."""
    try:
        with open(os.path.join(out_dir, MANIFEST)) as fh:
            m = json.load(fh)
    except FileNotFoundError:
        return {}
    if m.get("version") != MANIFEST_VERSION or m.get("params") != params:
        return {}
    return m["groups"]


def _unchanged(entry: dict, members: list[str], stats: dict, out_dir: str) -> bool:
    """Same files with the same size and mtime (as make and rsync judge), outputs present."""
    files = entry["files"]
    if set(files) != set(members):
        return False
    if any((files[p]["size"], files[p]["mtime_ns"]) != (stats[p].st_size, stats[p].st_mtime_ns)
           for p in members):
        return False
    return all(os.path.exists(_output(out_dir, t, entry["key"])) for t in TABLES)


def _output(out_dir: str, table: str, key: str) -> str:
    return os.path.join(out_dir, table, key + ".parquet")


def _remove_outputs(out_dir: str, key: str) -> None:
    for t in TABLES:
        if os.path.exists(_output(out_dir, t, key)):
            os.remove(_output(out_dir, t, key))


def _write_outputs(out_dir: str, key: str, tables: dict[str, pd.DataFrame]) -> None:
    for name, df in tables.items():
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        write_table(df, _output(out_dir, name, key))


def write_table(df: pd.DataFrame, path: str) -> None:
    """One DataFrame as Parquet: lists as Arrow lists, dicts as structs, `skipped` as a map."""
    df = df.reset_index(drop=True)
    fields = [pa.field("skipped", pa.map_(pa.string(), pa.int64()))] if "skipped" in df else []
    schema = pa.Schema.from_pandas(df.drop(columns=[f.name for f in fields]), preserve_index=False)
    for f in fields:
        schema = schema.insert(df.columns.get_loc(f.name), f)
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), path + ".tmp")
    os.replace(path + ".tmp", path)


def _unify_schemas(out_dir: str) -> None:
    """Give every group's file of a table one schema, so the directory reads as one dataset
    (a group with no losses has `losses: list<null>`, another `list<struct<...>>`)."""
    for t in TABLES:
        paths = sorted(glob.glob(os.path.join(out_dir, t, "*.parquet")))
        schemas = [pq.read_schema(p) for p in paths]
        if len({s.remove_metadata() for s in schemas}) <= 1:
            continue
        common = pa.unify_schemas(schemas, promote_options="permissive")
        for p, s in zip(paths, schemas):
            if s.remove_metadata() != common.remove_metadata():
                pq.write_table(pq.read_table(p).cast(common), p + ".tmp")
                os.replace(p + ".tmp", p)
