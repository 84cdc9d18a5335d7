"""Connections and per-direction packet counts agree with `tshark -q -z conv,tcp`.

The external corpus (../shared/corpus/external, skipped when absent) carries tshark's
conversation table for every capture. tshark counts one conversation per 4-tuple and
pcapflow one row per incarnation, so pcapflow's rows are summed per 4-tuple first.
"""
import re
from collections import Counter
from pathlib import Path

import pytest

import pcapflow

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "external"
CONV = sorted(CORPUS.glob("*/tshark/*.conv.txt"))
LINE = re.compile(r"^(\S+):(\d+)\s+<->\s+(\S+):(\d+)\s+(\d+)\s+([\d,]+ \w+)\s+(\d+)\s+([\d,]+ \w+)\s+(\d+)")
# Captures where tshark dissects TCP that pcapflow deliberately does not decode.
NOT_DECODED = {
    "gre-sample.pcap": "TCP inside GRE tunnels",
    "gtp-iphone.pcap": "TCP inside GTP-U tunnels",
    "nflog.pcap": "NFLOG link type",
    "tunnels__": "TCP inside tunnels (GRE, GTP, VXLAN, Geneve): pcapflow reads the outer "
                 "packets only and counts them non_tcp",
}


def tshark_conversations(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        if m:
            a, ap, b, bp = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            # "<-" frames went from B to A, "->" frames from A to B; tshark may list one
            # 4-tuple several times (it splits reused ports), pcapflow's rows are summed too
            d = out.setdefault(frozenset([(a, ap), (b, bp)]), Counter())
            d[(b, bp)] += int(m.group(5))
            d[(a, ap)] += int(m.group(7))
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
    counts = Counter(zip(seg["src"], seg["sport"], seg["dst"], seg["dport"]))
    for (src, sport, dst, dport), n in counts.items():
        key = frozenset([(src, sport), (dst, dport)])
        got.setdefault(key, {})[(src, sport)] = n
    want = {frozenset((strip_brackets(h), p) for h, p in k):
            {(strip_brackets(h), p): n for (h, p), n in v.items()} for k, v in want.items()}
    assert set(got) == set(want)
    for key, directions in want.items():
        for ep, n in directions.items():
            assert got[key].get(ep, 0) == n, (key, ep)
    # every segment belongs to exactly one connection row of its 4-tuple
    total = a.connections["packets"].sum() + a.connections["duplicates"].sum()
    assert total == len(seg)
