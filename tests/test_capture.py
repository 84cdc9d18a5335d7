"""The capture reader on real captures: every format and link type, compression, cuts, errors.

tests/data/ is made by tools/make_test_captures.py (see its docstring for what is real and what
is derived). The corpus test compares packet and TCP counts with tshark on other projects' captures.
"""
from __future__ import annotations

import gc
import io
import re
import shutil
import struct
import subprocess
import sys
from fractions import Fraction
from math import ulp
from pathlib import Path

import pandas as pd
import pytest

from pcapflow.capture import SEGMENT_COLUMNS, CaptureError, read_captures

DATA = Path(__file__).parent / "data"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "external"
SYN, FIN, RST, PSH, ACK = 0x02, 0x01, 0x04, 0x08, 0x10
TCP_KEY = ["src", "sport", "dst", "dport", "seq", "ack", "flags", "plen"]
BASIC = {"packets": 25, "tcp": 22, "skipped": {"non_tcp": 2, "non_ip": 1}}  # UDP, ICMP; 0x88b5


def read(name: str):
    segments, [info] = read_captures(DATA / name)
    assert info.packets == info.tcp_packets + sum(info.skipped.values()) == len(segments) + sum(
        info.skipped.values())
    return segments, info


@pytest.mark.parametrize("name, fmt, linktypes, packets, tcp, skipped", [
    ("eth_us.pcap", "pcap", ["EN10MB"], *BASIC.values()),
    ("eth_ns.pcap", "pcap", ["EN10MB"], *BASIC.values()),
    ("eth_be.pcap", "pcap", ["EN10MB"], *BASIC.values()),
    ("vlan.pcap", "pcap", ["EN10MB"], *BASIC.values()),
    ("sll.pcap", "pcap", ["LINUX_SLL"], *BASIC.values()),
    ("sll2.pcap", "pcap", ["LINUX_SLL2"], *BASIC.values()),
    ("ipv6.pcap", "pcap", ["EN10MB"], 20, 20, {}),
    ("raw.pcap", "pcap", ["RAW"], 20, 20, {}),
    ("null.pcap", "pcap", ["NULL"], 20, 20, {}),
    ("loop.pcap", "pcap", ["LOOP"], 20, 20, {}),
    ("two_links.pcapng", "pcapng", ["EN10MB", "RAW"], 30, 30, {}),
    ("nflog_mix.pcapng", "pcapng", ["NFLOG", "EN10MB"], 26, 22,
     {"unsupported_link": 1, "non_tcp": 2, "non_ip": 1}),
    ("frag.pcap", "pcap", ["EN10MB"], 14, 10, {"non_ip": 2, "fragment": 2}),  # 2 ARP
])
def test_counts_per_format_and_link_type(name, fmt, linktypes, packets, tcp, skipped):
    segments, info = read(name)
    assert (info.format, info.linktype, info.packets, info.tcp_packets, info.skipped) == (
        fmt, linktypes, packets, tcp, skipped)
    assert info.truncated is None and info.compression is None
    assert list(segments.columns) == list(SEGMENT_COLUMNS)
    assert segments.ts.is_monotonic_increasing


def test_known_segments_of_the_ethernet_capture():
    seg, info = read("eth_us.pcap")
    by_frame = seg.set_index("frame")
    syn = by_frame.loc[1]
    assert (syn.src, syn.sport, syn.dst, syn.dport, syn["flags"]) == ("10.0.0.1", 40001, "10.0.0.2", 8080, SYN)
    assert (syn.mss, syn.wscale, syn.sackok, syn.ipver, syn.ttl) == (1460, 10, True, 4, 64)
    request, response = by_frame.loc[4], by_frame.loc[6]
    assert (request["flags"], request.plen, request.http) == (PSH | ACK, 29, "GET / HTTP/1.1\r\nHost: pfr\r\n\r\n")
    assert (response.sport, response["flags"], response.plen) == (8080, PSH | ACK, 59)
    assert response.http.startswith("HTTP/1.1 200 OK")
    # the server closes first: FIN from 8080, then the client's FIN, then the last ACK
    assert by_frame.loc[8:10, ["sport", "flags"]].to_numpy().tolist() == [
        [8080, FIN | ACK], [40001, FIN | ACK], [8080, ACK]]
    refused = by_frame.loc[12]
    assert (refused.sport, refused.dport, refused["flags"], refused.tsval) == (8081, 40002, RST | ACK, -1)
    # port 40003's client sent IPv4 options (a 24-byte header): the payload is still 29 bytes
    assert by_frame.loc[16, "plen"] == 29 and by_frame.loc[16, "sport"] == 40003
    assert info.first_ts == seg.ts.iloc[0] and info.last_ts > seg.ts.iloc[-1]  # last: 0x88b5 frame


@pytest.mark.parametrize("name", ["eth_us.pcap.gz", "eth_us.pcap.bz2", "eth_us.pcap.xz",
                                  "eth_us.pcap.zst", "eth_be.pcap"])
def test_compressed_and_big_endian_copies_give_the_same_table(name):
    pytest.importorskip("zstandard") if name.endswith(".zst") else None
    plain, plain_info = read("eth_us.pcap")
    seg, info = read(name)
    pd.testing.assert_frame_equal(seg, plain)
    assert info.compression == {"gz": "gzip", "bz2": "bz2", "xz": "xz", "zst": "zstd"}.get(
        name.rsplit(".", 1)[1])
    assert (info.packets, info.skipped) == (plain_info.packets, plain_info.skipped)


def test_vlan_and_qinq_tags_do_not_change_the_segments():
    tagged, plain = read("vlan.pcap")[0], read("eth_us.pcap")[0]
    assert ((tagged["framelen"] - plain["framelen"]).isin([0, 4, 8])).all()  # no, one or two tags
    pd.testing.assert_frame_equal(tagged.drop(columns="framelen"), plain.drop(columns="framelen"))


@pytest.mark.parametrize("name", ["null.pcap", "loop.pcap"])
def test_bsd_loopback_headers_give_the_raw_ip_table(name):
    raw = read("raw.pcap")[0]
    seg = read(name)[0]
    assert (seg["framelen"] - raw["framelen"] == 4).all()  # the 4-byte family header
    pd.testing.assert_frame_equal(seg.drop(columns="framelen"), raw.drop(columns="framelen"))
    assert raw.ipver.tolist() == [4] * 10 + [6] * 10
    assert set(raw.src) == {"10.6.0.1", "10.6.0.2", "fd06::1", "fd06::2"}


@pytest.mark.parametrize("name", ["sll.pcap", "sll2.pcap"])
def test_linux_cooked_captures_see_the_ethernet_segments(name):
    def rows(df):
        return sorted(map(tuple, df[TCP_KEY].to_numpy().tolist()))

    assert rows(read(name)[0]) == rows(read("eth_us.pcap")[0])


def test_pcapng_with_two_link_types_reads_both_interfaces():
    seg, _ = read("two_links.pcapng")
    raw = read("raw.pcap")[0]
    tunnelled = seg[seg.src.isin(["10.6.0.1", "10.6.0.2", "fd06::1", "fd06::2"])]
    assert len(tunnelled) == 20 and len(seg[seg.sport.eq(40004) | seg.dport.eq(40004)]) == 10
    assert tunnelled[TCP_KEY].reset_index(drop=True).equals(raw[TCP_KEY])


def test_ipv6_with_a_hop_by_hop_header_keeps_its_payload_length():
    seg, _ = read("ipv6.pcap")
    hbh = seg[(seg.sport == 40062) | (seg.dport == 40062)]
    assert len(hbh) == 10 and hbh.ipver.eq(6).all() and hbh.ipid.eq(-1).all()
    request = hbh[hbh["flags"] == PSH | ACK].iloc[0]
    assert (request.src, request.dst, request.dport, request.plen) == ("fd00::1", "fd00::2", 8080, 29)


def test_ipv4_fragments_first_is_a_segment_the_rest_are_skipped():
    seg, info = read("frag.pcap")
    assert info.skipped["fragment"] == 2
    assert 7 not in seg.frame.values and 8 not in seg.frame.values
    first = seg.set_index("frame").loc[6]
    assert (first.src, first.sport, first.dport, first["flags"]) == ("10.30.1.1", 40030, 8080, PSH | ACK)


def pcap_records(path: Path) -> list[tuple[int, int]]:
    """(seconds, fraction) of every record of a little-endian pcap, read with struct."""
    raw, pos, out = path.read_bytes(), 24, []
    while pos < len(raw):
        sec, frac, caplen = struct.unpack_from("<III", raw, pos)
        out.append((sec, frac))
        pos += 16 + caplen
    return out


def test_nanosecond_timestamps_keep_sub_microsecond_parts():
    us, ns = read("eth_us.pcap")[0], read("eth_ns.pcap")[0]
    assert (ns.frame == us.frame).all()
    diff = ns.ts - us.ts
    assert diff.abs().max() < 1e-6 + ulp(us.ts.max())  # the same packets
    assert (diff != 0).sum() >= 10  # ns file keeps what the us file drops
    # each ns timestamp is the float nearest the exact one (as far as a float allows)
    exact = {i + 1: Fraction(s * 10**9 + f, 10**9)
             for i, (s, f) in enumerate(pcap_records(DATA / "eth_ns.pcap"))}
    for frame, ts in zip(ns.frame, ns.ts):
        assert abs(Fraction(ts) - exact[frame]) <= Fraction(ulp(ts)) / 2


def test_open_binary_file_and_stdin():
    plain = read("eth_us.pcap")[0]
    with open(DATA / "eth_us.pcap.gz", "rb") as f:
        seg, [info] = read_captures(f)
        assert not f.closed  # the caller's file stays the caller's
    pd.testing.assert_frame_equal(seg, plain)
    buf = io.BytesIO((DATA / "eth_us.pcap").read_bytes())
    seg, [info] = read_captures(buf)
    gc.collect()
    assert not buf.closed and info.path == "<stream>"
    pd.testing.assert_frame_equal(seg, plain)
    code = ("from pcapflow.capture import read_captures; s, [i] = read_captures('-'); "
            "print(i.path, i.compression, i.packets, len(s))")
    with open(DATA / "eth_us.pcap.xz", "rb") as stdin:
        out = subprocess.run([sys.executable, "-c", code], stdin=stdin, capture_output=True,
                             text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    assert out.split() == ["<stdin>", "xz", "25", "22"]


def test_several_files_are_one_timeline():
    seg, infos = read_captures([DATA / "raw.pcap", DATA / "eth_us.pcap"])
    assert [i.path.rsplit("/", 1)[1] for i in infos] == ["raw.pcap", "eth_us.pcap"]
    assert seg.ts.is_monotonic_increasing and len(seg) == 42
    assert seg.groupby("capture").size().to_dict() == {0: 20, 1: 22}


@pytest.mark.parametrize("name, packets, where", [
    ("truncated.pcap", 4, "record cut short (10 of 66 bytes) after packet 4"),
    ("truncated.pcapng", 20, "pcapng block cut short (78 of 108 bytes) after packet 20"),
])
def test_a_capture_cut_mid_record_yields_the_packets_before_the_cut(name, packets, where):
    seg, info = read(name)
    assert (info.packets, info.truncated) == (packets, where)
    whole = read("eth_us.pcap" if name.endswith("pcap") else "two_links.pcapng")[0]
    pd.testing.assert_frame_equal(seg, whole[whole.frame <= packets].reset_index(drop=True))


def one_frame_pcap(tmp_path: Path, linktype: int, frame: bytes) -> Path:
    path = tmp_path / "one.pcap"
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
                     + struct.pack("<IIII", 1, 0, len(frame), len(frame)) + frame)
    return path


@pytest.mark.parametrize("linktype, header", [(1, 14), (113, 16)])
def test_ip_header_that_does_not_decode_is_malformed_not_non_ip(tmp_path, linktype, header):
    name = "eth_us.pcap" if linktype == 1 else "sll.pcap"
    first = (DATA / name).read_bytes()[40:40 + header + 10]  # the SYN, its IP header cut at 10 bytes
    _, [info] = read_captures(one_frame_pcap(tmp_path, linktype, first))
    assert info.skipped == {"malformed": 1}


def test_unsupported_link_type_is_an_input_error():
    with pytest.raises(CaptureError) as e:
        read_captures(DATA / "nflog.pcap")
    assert str(e.value) == f"{DATA / 'nflog.pcap'}: unsupported link type NFLOG (239)"


ETH_US = (DATA / "eth_us.pcap").read_bytes()


@pytest.mark.parametrize("content, reason", [
    (None, "no such file"),
    ("dir", "is a directory, not a capture file"),
    (b"hello, world\n", "not a pcap or pcapng file (starts with 68656c6c)"),
    (b"", "empty file"),
    (ETH_US[:10], "pcap global header cut short (10 of 24 bytes)"),
    (ETH_US[:3], "not a pcap or pcapng file (starts with d4c3b2)"),
    ((DATA / "two_links.pcapng").read_bytes()[:40],
     "cut short before any interface was described (pcapng block cut short (40 of 164 bytes))"),
])
def test_capture_errors_name_the_file_and_the_reason(tmp_path, content, reason):
    path = tmp_path / "input"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CaptureError) as e:
        read_captures(path)
    assert str(e.value) == f"{path}: {reason}"


# Frames tshark dissects as TCP inside tunnels pcapflow deliberately does not open: the outer
# packets are UDP/GRE between tunnel endpoints, and the inner TCP is another vantage point's.
TUNNELLED_TCP = {
    "arkime/gre-sample.pcap": (22, "TCP inside GRE"),
    "zeek/tunnels__gre-sample.pcap": (22, "TCP inside GRE"),
    "arkime/gtp-iphone.pcap": (58, "TCP inside GTP-U (UDP 2152)"),
    "zeek/tunnels__gtp__gtp1_gn_normal_incl_fragmentation.pcap": (68, "TCP inside GTP-U, fragmented"),
    "zeek/tunnels__gtp__gtp2_different_udp_port.pcap": (78, "TCP inside GTP-U on another port"),
    "zeek/tunnels__geneve-many-options.pcap": (10, "TCP inside Geneve (UDP 6081)"),
    "zeek/tunnels__vxlan-encapsulated-http.pcap": (12, "TCP inside VXLAN (UDP 4789)"),
}
UNSUPPORTED = {"arkime/nflog.pcap": "unsupported link type NFLOG (239)"}
CORPUS_FILES = sorted(CORPUS.glob("*/*.pcap*")) if CORPUS.is_dir() else []


@pytest.mark.skipif(not CORPUS_FILES, reason="external corpus absent")
@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark absent")
@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_counts_match_tshark(path):
    name = f"{path.parent.name}/{path.name}"
    protocols = subprocess.run(["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.protocols"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
    tshark_tcp = sum("tcp" in p.split(":") for p in protocols)  # what `-Y tcp` selects
    if name in UNSUPPORTED:
        with pytest.raises(CaptureError, match=re.escape(UNSUPPORTED[name])):
            read_captures(path)
        return
    segments, [info] = read_captures(path)
    assert info.truncated is None
    assert info.packets == len(protocols) == info.tcp_packets + sum(info.skipped.values())
    assert info.tcp_packets == len(segments) == tshark_tcp - TUNNELLED_TCP.get(name, (0, ""))[0]


def test_sack_blocks_are_kept_and_dsack_recognised():
    """The lab's lost_wave2: the server answers the re-sent FIN with a D-SACK of the FIN."""
    seg, _ = read_captures(str(DATA.parent.parent / "sample_pcaps" / "lost_wave2" / "client.pcap"))
    sacked = seg[seg["nsack"] > 0]
    assert len(sacked) == 1 and bool(sacked["dsack"].iloc[0])
    ((left, right),) = sacked["sack"].iloc[0]
    fin = seg[(seg["flags"] & 1) == 1].iloc[0]
    assert (left, right) == ((fin.seq + fin.plen) % 2**32, (fin.seq + fin.plen + 1) % 2**32)
    assert right == sacked["ack"].iloc[0]  # below the cumulative ACK: a duplicate (RFC 2883)
    assert seg.loc[seg["nsack"] == 0, "sack"].isna().all()
