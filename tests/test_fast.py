"""The compiled reader (capture/fast.py) against the reference (dpkt): identical segment
tables and identical accounting on every capture we have, and identical analyses.

Every file of sample_pcaps/, tests/data/, tests/malformed/ and the external corpus (skipped
when absent) is read both ways, the fast one with tiny buffers and chunks so that records
straddle every boundary; derived forms of real captures (snap length 96, pcapng, gzip,
nanosecond timestamps) and the caps are checked the same way.
"""
import gzip
import struct
from dataclasses import asdict
from pathlib import Path

import dpkt
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from pcapflow.analysis import build
from pcapflow.capture import CaptureError, Limits, fast, read_captures
from pcapflow.seq import ACK, FIN, RST, SYN
from pcapflow.teardown import Params

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus" / "external"
SUFFIXES = (".pcap", ".pcapng", ".cap", ".trace", ".dump", ".gz", ".bz2", ".xz", ".zst")
FILES = sorted(p for d in (ROOT / "sample_pcaps", ROOT / "tests" / "data", ROOT / "tests" / "malformed",
                           CORPUS)
               for p in d.rglob("*") if p.suffix in SUFFIXES and p.is_file())
HTTP = ROOT / "sample_pcaps" / "http_pileup" / "server.pcap"


def read(path, fast_path: bool, **kw):
    """(segments, [CaptureInfo as dicts]) or the CaptureError's message."""
    try:
        seg, infos = read_captures(path, fast=fast_path, **kw)
    except CaptureError as e:
        return str(e)
    return seg, [asdict(i) for i in infos]


def assert_same(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, str):
        assert a == b
        return
    pd.testing.assert_frame_equal(a[0], b[0])
    assert a[1] == b[1]


@pytest.fixture
def tiny_buffers(monkeypatch):
    monkeypatch.setattr(fast, "READ_BYTES", 1 << 12)
    monkeypatch.setattr(fast, "ROWS", 7)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_fast_reader_equals_reference(path, tiny_buffers):
    assert_same(read(path, True), read(path, False))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_fast_reader_with_its_own_buffers_equals_reference(path):
    assert_same(read(path, True), read(path, False))


def test_every_kind_of_input_was_compared():
    names = {p.name for p in FILES}
    assert {"server.pcap", "sll2.pcap", "vlan.pcap", "ipv6.pcap", "eth_ns.pcap", "raw.pcap",
            "truncated.pcapng", "eth_us.pcap.gz"} <= names
    assert len(FILES) >= 100 or not CORPUS.exists()


def packets(src: Path) -> tuple[int, list[tuple[float, bytes]]]:
    with open(src, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        return reader.datalink(), list(reader)


def pcap_bytes(linktype: int, frames, snaplen: int | None = None, nano: bool = False) -> bytes:
    """A pcap of these frames, cut to `snaplen` as tcpdump -s does (the wire length kept)."""
    ticks = 10**9 if nano else 10**6
    out = [struct.pack("<IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0,
                       snaplen or 262144, linktype)]
    for ts, buf in frames:
        sec = int(ts)
        data = buf[:snaplen] if snaplen else buf
        out.append(struct.pack("<IIII", sec, round((ts - sec) * ticks), len(data), len(buf)) + data)
    return b"".join(out)


SOURCES = [HTTP, ROOT / "sample_pcaps" / "postmortem" / "client.pcap",
           ROOT / "tests" / "data" / "ipv6.pcap", ROOT / "tests" / "data" / "sll2.pcap"]


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.parent.name + "/" + p.name)
@pytest.mark.parametrize("form", ["snap96", "nano", "gzip", "pcapng"])
def test_derived_forms_read_the_same(src, form, tmp_path, tiny_buffers):
    linktype, frames = packets(src)
    path = tmp_path / f"x.{form}"
    if form == "pcapng":
        with open(path, "wb") as f:
            writer = dpkt.pcapng.Writer(f, linktype=linktype)
            for ts, buf in frames:
                writer.writepkt(buf, ts)
    else:
        data = pcap_bytes(linktype, frames, snaplen=96 if form == "snap96" else None,
                          nano=form == "nano")
        path.write_bytes(gzip.compress(data) if form == "gzip" else data)
    a, b = read(path, True), read(path, False)
    assert_same(a, b)
    assert len(a[0]) == len(read(src, False)[0])  # every segment of the original, in any form
    assert a[1][0]["format"] == ("pcapng" if form == "pcapng" else "pcap")


def test_connection_cap_knows_each_4tuple_again_past_32768_addresses():
    """The cap keeps a 4-tuple as one int while its endpoint codes fit in 31 bits and as a
    pair beyond (addresses past the 32,768th): a 4-tuple seen again is known either way."""
    from pcapflow.capture import CODE, _Caps
    n = 40_000
    clients = np.array([f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}" for i in range(n)], dtype=object)

    def chunk(src, dst, sport):
        return {"ts": np.zeros(len(src)), "src": src, "dst": dst, "sport": np.full(len(src), sport),
                "dport": np.full(len(src), 80)}

    server = np.array(["192.0.2.1"], dtype=object)
    caps = _Caps(Limits(max_connections=1 + n - 5))
    assert caps.apply(chunk(server, server, 1)) is None  # the server's address: code 0
    for _ in range(2):  # all new (room for all but 5), then all seen before
        out = caps.apply(chunk(clients, np.repeat(server, n), 40_000))
        assert (out[:n - 5] == 0).all() and (out[n - 5:] == CODE["connection_cap"]).all()
    assert sum(isinstance(k, tuple) for k in caps.tuples) == n - 5 - 32_767  # ids >= 32768


@pytest.mark.parametrize("limits", [Limits(max_segments=500), Limits(max_connections=37),
                                    Limits(max_segments=900, max_connections=60)])
def test_caps_cut_at_the_same_frame(limits, tiny_buffers):
    files = [HTTP, ROOT / "sample_pcaps" / "postmortem" / "server.pcap"]
    a, b = read(files, True, limits=limits), read(files, False, limits=limits)
    assert_same(a, b)
    assert sum(i["skipped"].get("segment_cap", 0) + i["skipped"].get("connection_cap", 0)
               for i in a[1]) > 0


def test_the_analysis_is_the_same():
    a = build(*read_captures(HTTP, fast=True), Params())
    b = build(*read_captures(HTTP, fast=False), Params())
    pd.testing.assert_frame_equal(a.connections, b.connections)
    pd.testing.assert_frame_equal(a.events, b.events)
    assert len(a.connections) == 200


ANALYZABLE = [p for p in FILES if not isinstance(read(p, False), str)]


@pytest.fixture
def small_buffers(monkeypatch):
    """Zeek history and reassembly buffers, and state histories, so small that many
    connections overflow them and go back to the Python reference: both halves of the
    compiled path are compared, and their seams."""
    from pcapflow import fastteardown, fastzeek
    monkeypatch.setattr(fastzeek, "MAX_HISTORY", 6)
    monkeypatch.setattr(fastzeek, "MAX_BLOCKS", 2)
    monkeypatch.setattr(fastteardown, "MAX_HISTORY", 3)


@pytest.mark.parametrize("buffers", ["own", "small"])
@pytest.mark.parametrize("path", ANALYZABLE, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_compiled_analysis_equals_reference(path, buffers, monkeypatch, request):
    """The whole connections and events tables, compiled analysis stages against the Python
    reference, on the same segment table."""
    if buffers == "small":
        request.getfixturevalue("small_buffers")
    seg, infos = read_captures(path, fast=False)
    monkeypatch.setenv("PCAPFLOW_FAST", "0")
    ref = build(seg, infos, Params())
    monkeypatch.setenv("PCAPFLOW_FAST", "1")
    got = build(seg, infos, Params())
    pd.testing.assert_frame_equal(got.connections, ref.connections)
    pd.testing.assert_frame_equal(got.events, ref.events)
    ids = ref.connections["conn_id"].tolist()  # the kernel's endpoints are made when asked for
    assert [got.endpoint(c) for c in ids] == [ref.endpoint(c) for c in ids]
    if buffers == "own":  # the JSON rows joined by fastjson, and by Python
        text = got.to_json()
        monkeypatch.setenv("PCAPFLOW_FAST", "0")
        assert text == ref.to_json()


@pytest.mark.parametrize("collide", [False, True])
def test_duplicates_by_hash_equal_duplicates_by_sorting_every_key(collide, monkeypatch):
    """flows.mark_duplicates hashes the key columns; the reference sorts by all of them. On
    every capture, and with a hash that makes everything collide (then it falls back)."""
    from pcapflow import flows
    if collide:
        monkeypatch.setattr(flows, "HASH_MULTIPLIER", 0)
    seen = 0
    for path in ANALYZABLE:
        seg = read(path, False)[0]
        if len(seg):
            got = flows.mark_duplicates(seg)
            assert (got == flows._mark_duplicates_by_keys(seg)).all(), path
            seen += got.sum()
    assert seen > 100  # captures taken with -i any on the router hold many


def test_factorize_rows_packed_or_not_numbers_rows_in_order_of_first_appearance():
    from pcapflow.capture import factorize_rows
    rng = np.random.default_rng(7)
    cases = [(rng.integers(0, 5, 1000), rng.integers(0, 3, 1000)),  # packed in one int64
             (rng.integers(4, 7, 300), np.zeros(300, np.int64), rng.integers(0, 2**32, 300)),
             (rng.integers(-5, 5, 300), rng.integers(0, 9, 300)),  # negative: a column at a time
             (rng.integers(0, 2**62, 300), rng.integers(0, 9, 300)),  # too wide to pack
             (np.zeros(0, np.int64), np.zeros(0, np.int64))]
    for cols in cases:
        codes, levels = factorize_rows(*cols)
        rows = list(zip(*(c.tolist() for c in cols)))
        first: dict = {}
        for r in rows:
            first.setdefault(r, len(first))
        assert codes.tolist() == [first[r] for r in rows]
        assert list(zip(*(lv.tolist() for lv in levels))) == list(first)


SEGMENT = st.tuples(st.integers(0, 1),  # sender: the 4-tuple's first sender or the other
                    st.sampled_from([0, 1 << 31, (1 << 32) - 3]),  # sequence spaces, one wrapping
                    st.integers(0, 6), st.integers(0, 6),  # seq and ack offsets into them
                    st.sampled_from([SYN, SYN | ACK, ACK, ACK | FIN, FIN, RST, RST | ACK, 0]),
                    st.integers(0, 3))  # payload length


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(SEGMENT, min_size=1, max_size=30), min_size=1, max_size=4))
def test_compiled_incarnations_equal_reference(four_tuples):
    """fastflows numbers the incarnations of several 4-tuples at once as
    flows._split_incarnations does for each: SYNs, retransmitted SYNs, SYN-ACKs matched to
    their SYN, segments fitted to the nearest sequence spaces across the 2^32 wrap."""
    from pcapflow.fastflows import split_incarnations
    from pcapflow.flows import MOD, _split_incarnations
    cols, bounds, expected = [[] for _ in range(5)], [], []
    for segments in four_tuples:
        bounds.append(len(cols[0]))
        ep, seq, ack, flags, plen = zip(*((7 + side, (base + s) % MOD, (base + a) % MOD, fl, n)
                                         for side, base, s, a, fl, n in segments))
        expected += _split_incarnations(list(ep), list(seq), list(ack), list(flags), list(plen))
        for col, values in zip(cols, (ep, seq, ack, flags, plen)):
            col += values
    got = split_incarnations(np.array(bounds), *(np.array(c, dtype=np.int64) for c in cols))
    assert got.tolist() == expected


def test_floats_the_json_kernel_writes_are_pythons_repr(monkeypatch):
    """fastjson writes whole-microsecond floats itself; each must be exactly what repr writes
    (json.dumps' text), the others encoded by Python: timestamps, durations, the edges of
    the proof (1e-4, 2**33), nanosecond times, and doubles of every magnitude."""
    from pcapflow.analysis import _json_rows
    from pcapflow.fastjson import formatted
    rng = np.random.default_rng(3)
    us = 10**6
    values = np.concatenate([
        rng.integers(1_600_000_000 * us, 1_800_000_000 * us, 100_000) / 1e6,  # capture times
        rng.integers(-2**40, 2**40, 50_000) / 1e6,                            # durations
        rng.integers(2**33 * us - us, 2**33 * us + us, 20_000) / 1e6,         # around 2**33
        rng.integers(-1000, 1000, 10_000) / 1e6,                              # around 1e-4
        rng.integers(1_600_000_000 * 10**9, 1_800_000_000 * 10**9, 50_000) / 1e9,
        rng.standard_normal(20_000) * 10.0 ** rng.integers(-12, 20, 20_000),
        [0.0, -0.0, 1.0, -1.0, 1e-4, 0.5e-4, 2.0**33, -2.0**33, np.nan, 123456.0, 0.1, 9.999999]])
    done = formatted(values)
    assert 0.5 < done.mean() < 0.9  # both the kernel's path and Python's are exercised
    monkeypatch.setenv("PCAPFLOW_FAST", "1")
    got = b",".join(part.tobytes() for part in _json_rows(pd.DataFrame({"x": values}), rows=50_000))
    got = [cell.removeprefix('{"x":').removesuffix("}") for cell in got.decode("ascii").split(",")]
    expected = ["null" if np.isnan(v) else repr(v) for v in values.tolist()]
    wrong = [(k, g, e) for k, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert len(got) == len(expected) and not wrong, wrong[:5]
