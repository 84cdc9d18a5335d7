"""Connections and per-direction packet and byte counts agree with `tshark -q -z conv,tcp`.

The external corpus (../shared/corpus/external, skipped when absent) carries tshark's
conversation table for every capture. tshark counts one conversation per 4-tuple and
pcapflow one row per incarnation, so pcapflow's rows are summed per 4-tuple first.
"""
import re
from pathlib import Path

import pytest

import pcapflow

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "external"
CONV = sorted(CORPUS.glob("*/tshark/*.conv.txt"))
LINE = re.compile(r"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s+(\d+)\s+(\d+) (\w+)\s+(\d+)\s+(\d+) (\w+)")
UNITS = {"bytes": 1, "kB": 1000, "MB": 1000**2}
# Captures where tshark dissects TCP that pcapflow deliberately does not decode.
NOT_DECODED = {
    "gre-sample.pcap": "TCP inside GRE tunnels",
    "gtp-iphone.pcap": "TCP inside GTP-U tunnels",
    "nflog.pcap": "NFLOG link type",
    "tunnels__": "TCP inside tunnels (GRE, GTP, VXLAN, Geneve): pcapflow reads the outer "
                 "packets only and counts them non_tcp",
}


def tshark_conversations(path: Path) -> dict:
    """{4-tuple: {sender endpoint: [frames, bytes, bytes unit]}} from tshark's table."""
    out = {}
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        if m:
            a, ap, b, bp = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            # "<-" frames went from B to A, "->" frames from A to B; tshark may list one
            # 4-tuple several times (it splits reused ports), pcapflow's rows are summed too
            d = out.setdefault(frozenset([(a, ap), (b, bp)]), {})
            for ep, frames, size, unit in (((b, bp), *m.group(5, 6, 7)), ((a, ap), *m.group(8, 9, 10))):
                f, n, _ = d.get(ep, (0, 0, "bytes"))
                d[ep] = (f + int(frames), n + int(size), unit if unit != "bytes" else _)
    return out


def strip_brackets(ip: str) -> str:
    return ip.strip("[]")


@pytest.mark.skipif(not CONV, reason="external corpus absent")
@pytest.mark.parametrize("conv", CONV, ids=[c.name.removesuffix(".conv.txt") for c in CONV])
def test_connections_and_packet_counts_match_tshark(conv):
    name = conv.name.removesuffix(".conv.txt")
    for prefix, reason in NOT_DECODED.items():
        if name.startswith(prefix):
            pytest.skip(reason)
    capture = conv.parent.parent / name
    want = tshark_conversations(conv)
    a = pcapflow.analyze(str(capture))
    seg = a.segments
    got: dict = {}
    for (src, sport, dst, dport), g in seg.groupby(["src", "sport", "dst", "dport"]):
        key = frozenset([(src, sport), (dst, dport)])
        got.setdefault(key, {})[(src, sport)] = (len(g), int(g["framelen"].sum()))
    want = {frozenset((strip_brackets(h), p) for h, p in k):
            {(strip_brackets(h), p): v for (h, p), v in d.items()} for k, d in want.items()}
    assert set(got) == set(want)
    for key, directions in want.items():
        for ep, (frames, size, unit) in directions.items():
            n, nbytes = got[key].get(ep, (0, 0))
            assert n == frames, (key, ep)
            if unit == "bytes":
                assert nbytes == size, (key, ep)
            else:  # tshark rounds larger sizes to whole kB / MB
                assert abs(nbytes / UNITS[unit] - size) <= 1, (key, ep, unit)
    # every segment belongs to exactly one connection row of its 4-tuple, with its frame bytes
    c = a.connections
    assert c["packets"].sum() + c["duplicates"].sum() == len(seg)
    assert c["client_frame_bytes"].sum() + c["server_frame_bytes"].sum() == seg["framelen"].sum()
