"""Speaking the peers' language: Arkime's sessions and tshark's per-frame FIN verdicts.

Reads the external corpus (../shared/corpus/external, skipped when absent): Arkime's expected
sessions (`arkime/expected/*.arkime_tcp_sessions.tsv`) and tshark's FIN/RST frames
(`*/tshark/*.finrst.tsv`). Every difference is listed below with its reason.
"""
import csv
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd
import pytest

import pcapflow

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "external"
ARKIME = sorted(CORPUS.glob("arkime/expected/*.arkime_tcp_sessions.tsv"))
FINRST = sorted(CORPUS.glob("*/tshark/*.finrst.tsv"))
pytestmark = pytest.mark.skipif(not FINRST, reason="external corpus absent")

NOT_DECODED = {  # capture name prefix: why pcapflow sees no TCP there (as in test_tshark_conv)
    "gre-sample.pcap": "TCP inside GRE", "gtp-iphone.pcap": "TCP inside GTP-U",
    "nflog.pcap": "NFLOG link type", "tunnels__": "TCP inside GRE, GTP, VXLAN or Geneve",
}


def decoded(name: str) -> bool:
    return not any(name.startswith(p) for p in NOT_DECODED)


def rows(tsv: Path) -> list[dict]:
    with tsv.open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# --- Arkime ----------------------------------------------------------------------------------
# Arkime's `source.bytes`/`destination.bytes` (tsv src_bytes/dst_bytes) are totBytes: frame
# bytes, link header included. pcapflow has no frame-byte column, so those are not compared.
# Its `client.bytes`/`server.bytes` (tsv client_bytes/server_bytes) are databytes: payload
# delivered by Arkime's in-order TCP reassembly, each sequence byte once, nothing past a hole,
# nothing without a SYN. pcapflow's client_bytes/server_bytes sum the payload of every
# transmission; its Zeek-style orig_bytes/resp_bytes count each sequence byte once.
# Both tools count every captured packet (pcapflow's segments, duplicates included).
# Keys: (capture, Arkime's source endpoint as written in the tsv).
ARKIME_RETRANSMITTED = {  # Arkime counts the bytes once: equal to pcapflow's orig/resp_bytes
    ("CVE-2018-6794.pcap", "192.168.235.1:53649"): "409 bytes sent 6 times, 5 with the FIN",
    ("CVE-2018-6794.pcap", "192.168.235.1:53656"): "409 bytes sent 6 times, 5 with the FIN",
    ("socks5-smtp-503.pcap", "10.0.0.2:53709"): "3 payload bytes sent twice",
    ("tcp-reassembly-synthetic.pcap", "10.180.156.1:40003"): "overlapping server segments",
    ("tcp-reassembly-synthetic.pcap", "10.180.156.1:40006"): "overlapping server segments",
    ("tcp-reassembly-synthetic.pcap", "10.180.156.1:40007"): "overlapping server segments",
    ("wireshark-smb-on-windows10.pcap", "192.168.199.132:49675"): "Windows keepalives carry "
    "one byte below snd.nxt, already sent (pcapflow: client/server_keepalives)",
}
NO_SYN = "no SYN seen: Arkime does not reassemble, so it counts no data bytes"
ARKIME_BYTES_KNOWN = {
    **{("single-packets.pcap", f"192.168.25.150:{p}"): NO_SYN
       for p in (49654, 49677, 49683, 49708, 49733, 49735, 49738, 49743, 49749)},
    ("arkime_synthetic.pcap", "10.0.44.100:54346"): NO_SYN,
    ("tcp-reassembly-synthetic.pcap", "10.180.156.1:40005"): "a hole in the server's data: "
    "Arkime stops at it (8 bytes), pcapflow sums what was captured (24), Zeek's resp_bytes "
    "counts the hole too (32)",
}
ARKIME_PACKETS_KNOWN = {
    ("single-packets.pcap", "192.168.25.150:49749"): "one FIN from 68.178.213.61:80, no SYN: "
    "Arkime names the port-80 side destination but leaves the packet in the source count",
}
ARKIME_SPLITS = {  # captures where Arkime's records per 4-tuple differ from pcapflow's rows
    "arkime_synthetic.pcap": "24 4-tuples left open: Arkime wrote each session twice, the "
    "second record empty (0 packets, same times), a save with nothing new",
    "long-session.pcap": "Arkime saved the long idle session and started a new record for "
    "the late RST (its session timeouts); pcapflow keeps one connection",
    "tcp_handshake_synthetic.pcap": "a second SYN with a new ISN (ports 40003, 40013): "
    "pcapflow opens a new incarnation, Arkime keeps one session and counts ISNs (srcISNCnt)",
}


def count(v) -> int:
    return 0 if pd.isna(v) else int(v)  # Zeek logs no bytes ('-') for a one-packet connection


def endpoint(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def arkime_sessions(tsv: Path) -> dict:
    """Arkime's records summed per 4-tuple: source, first time (ms), records, and per
    sending endpoint packets and data bytes."""
    out: dict = {}
    for r in rows(tsv):
        src, dst = endpoint(r["src"]), endpoint(r["dst"])
        s = out.setdefault(frozenset([src, dst]), {"src": r["src"], "first": [], "n": 0,
                                                  "pkts": Counter(), "data": Counter()})
        s["first"].append(int(r["firstPacket_ms"]))
        s["n"] += 1
        s["pkts"].update({src: int(r["src_pkts"]), dst: int(r["dst_pkts"])})
        s["data"].update({src: int(r["client_bytes"]), dst: int(r["server_bytes"])})
    return out


def pcapflow_sessions(a) -> dict:
    """pcapflow's rows summed per 4-tuple, keyed by sending endpoint like arkime_sessions."""
    out: dict = {}
    sent = a.segments.groupby(["conn", "dir"]).size()
    for c in a.connections.itertuples():
        cl, sv = (c.client_ip, c.client_port), (c.server_ip, c.server_port)
        s = out.setdefault(frozenset([cl, sv]), {"first": [], "n": 0, "pkts": Counter(),
                                                "data": Counter(), "seq": Counter()})
        s["first"].append(c.first_ts * 1000)
        s["n"] += 1
        s["pkts"].update({cl: int(sent.get((c.conn_id, 0), 0)),
                          sv: int(sent.get((c.conn_id, 1), 0))})
        s["data"].update({cl: int(c.client_bytes), sv: int(c.server_bytes)})
        orig, resp = (sv, cl) if c.zeek_history.startswith("^") else (cl, sv)  # Zeek flipped
        s["seq"].update({orig: count(c.orig_bytes), resp: count(c.resp_bytes)})
    return out


@pytest.fixture(scope="module")
def arkime_pairs():
    """(capture, Arkime session, pcapflow session or None) per Arkime 4-tuple."""
    pairs = []
    for tsv in ARKIME:
        name = tsv.name.removesuffix(".arkime_tcp_sessions.tsv") + ".pcap"
        if not decoded(name):
            continue
        got = pcapflow_sessions(pcapflow.analyze(str(CORPUS / "arkime" / name)))
        pairs += [(name, want, got.get(key)) for key, want in arkime_sessions(tsv).items()]
    return pairs


def same(want: Counter, got: Counter) -> bool:
    return all(got[ep] == n for ep, n in want.items())


def test_every_arkime_session_is_a_pcapflow_connection_first_packet_to_the_ms(arkime_pairs):
    assert len(arkime_pairs) >= 170
    assert [(cap, w["src"]) for cap, w, g in arkime_pairs if g is None] == []
    late = [(cap, w["src"]) for cap, w, g in arkime_pairs
            if not 0 <= min(g["first"]) - min(w["first"]) < 1]  # Arkime truncates to the ms
    assert late == []


def test_arkime_record_splits_are_the_listed_ones(arkime_pairs):
    split = {cap for cap, w, g in arkime_pairs if w["n"] != g["n"]}
    assert split == set(ARKIME_SPLITS)


def test_arkime_packets_per_direction(arkime_pairs):
    bad = [(cap, w["src"]) for cap, w, g in arkime_pairs if not same(w["pkts"], g["pkts"])]
    assert sorted(bad) == sorted(ARKIME_PACKETS_KNOWN)
    print(f"Arkime packets per direction: {len(arkime_pairs) - len(bad)}/{len(arkime_pairs)}")


def test_arkime_data_bytes_are_payload_or_sequence_bytes(arkime_pairs):
    payload = [(cap, w, g) for cap, w, g in arkime_pairs if not same(w["data"], g["data"])]
    for cap, w, g in payload:
        key = (cap, w["src"])
        if key in ARKIME_RETRANSMITTED:
            assert same(w["data"], g["seq"]), key  # each sequence byte once, like Arkime
        else:
            assert key in ARKIME_BYTES_KNOWN, (key, dict(w["data"]), dict(g["data"]))
    listed = set(ARKIME_RETRANSMITTED) | set(ARKIME_BYTES_KNOWN)
    assert {(cap, w["src"]) for cap, w, g in payload} == listed  # the lists stay current
    n = len(arkime_pairs)
    print(f"Arkime data bytes = pcapflow payload: {n - len(payload)}/{n}, "
          f"= payload or seq bytes: {n - len(ARKIME_BYTES_KNOWN)}/{n}")


# --- tshark: FIN verdicts frame by frame -----------------------------------------------------
# finrst.tsv carries tcp.analysis.retransmission only; tshark sets it on fast and spurious
# retransmissions too, so it is "any retransmission". pcapflow's verdict on a FIN frame:
# `retransmission` = a FIN_RETRANSMIT event (counted in *_fin_retransmits), `duplicate` = the
# same packet captured twice (segments.dup: same IP ID or TSval within 50 ms; counted in
# `duplicates`, not a transmission), else `first`.
FIN_KNOWN = {  # (capture, frame): why pcapflow's reading stands where tshark flags a retransmission
    ("tcp__fin_retransmission.pcap", 2): "a bare FIN at seq = ISN, before the SYN-ACK: the "
    "first FIN sent; tshark flags it because the SYN already used that sequence number",
    ("tcp__syn-then-stuff-then-rst.pcap", 3): "a bare FIN at seq = ISN right after the SYN: "
    "the first FIN sent; tshark flags it because the SYN already used that sequence number",
}


def fin_verdicts(name: str, a, table: list[dict]) -> list[tuple]:
    seg = a.segments.set_index("frame")
    ev = a.events[a.events["kind"] == "FIN_RETRANSMIT"]
    resent = set(zip(ev["conn_id"], ev["ts"], ev["side"]))
    out = []
    for r in table:
        if "F" not in r["tcp.flags.str"]:
            continue
        s = seg.loc[int(r["frame.number"])]
        side = "client" if s["dir"] == 0 else "server"
        mine = ("duplicate" if s["dup"] else
                "retransmission" if (s["conn"], s["ts"], side) in resent else "first")
        out.append((name, int(r["frame.number"]), r["tcp.analysis.retransmission"] == "1",
                    mine, int(s["conn"])))
    return out


@pytest.fixture(scope="module")
def tshark_frames():
    """Per decoded capture: its FIN/RST rows and its analysis; and every FIN verdict pair."""
    captures, verdicts = [], []
    for tsv in FINRST:
        name = tsv.name.removesuffix(".finrst.tsv")
        table = rows(tsv)
        if not table or not decoded(name):
            continue
        a = pcapflow.analyze(str(tsv.parent.parent / name))
        captures.append((name, table, a))
        verdicts += fin_verdicts(name, a, table)
    return captures, verdicts


def test_fin_retransmission_verdicts_agree_with_tshark(tshark_frames):
    _, verdicts = tshark_frames
    agree = sum(t == (mine == "retransmission") for _, _, t, mine, _ in verdicts)
    print(f"tshark FIN retransmission verdicts: {agree}/{len(verdicts)} agree")
    assert len(verdicts) >= 400
    assert agree / len(verdicts) >= 0.96


def test_every_fin_disagreement_is_explained(tshark_frames):
    _, verdicts = tshark_frames
    unexplained = [(cap, frame, t, mine) for cap, frame, t, mine, _ in verdicts
                   if t != (mine == "retransmission")
                   and not (t and mine == "duplicate")  # a copy, not a second transmission
                   and (cap, frame) not in FIN_KNOWN]
    assert unexplained == []
    for key in FIN_KNOWN:  # the listed frames still disagree: the list stays current
        assert [mine for cap, frame, _, mine, _ in verdicts if (cap, frame) == key] == ["first"]


def test_a_retransmitted_fin_comes_with_its_lost_wave(tshark_frames):
    """Where tshark only says "retransmission", pcapflow says which wave was lost and where:
    e.g. ssh__ssh.pcap frames 910/912, a FIN resent after its ACK passed the capture point
    (wave 2 lost after_capture: a lost ACK, nothing spurious about it)."""
    captures, verdicts = tshark_frames
    analyses = {name: a for name, _, a in captures}
    for cap, frame, _, mine, conn in verdicts:
        if mine == "retransmission":
            assert analyses[cap].connections.loc[conn, "lost_waves"], (cap, frame)


def test_fin_retransmits_columns_count_the_events(tshark_frames):
    captures, _ = tshark_frames
    for name, _, a in captures:
        ev = a.events[a.events["kind"] == "FIN_RETRANSMIT"]
        n = ev.groupby(["conn_id", "side"]).size()
        for side in ("client", "server"):
            col = a.connections[f"{side}_fin_retransmits"]
            events = [int(n.get((cid, side), 0)) for cid in a.connections["conn_id"]]
            assert col.astype(int).tolist() == events, (name, side)


def test_tshark_streams_are_pcapflow_incarnations(tshark_frames):
    """tshark starts a new tcp.stream where it sees a 4-tuple reused; its FIN/RST frames of one
    stream fall in one pcapflow connection and back. tcp.analysis.reused_ports marks SYNs only,
    so it is never set in these FIN/RST rows."""
    captures, _ = tshark_frames
    pairs = set()
    for name, table, a in captures:
        conn = dict(zip(a.segments["frame"], a.segments["conn"]))
        for r in table:
            assert not r["tcp.analysis.reused_ports"], (name, r["frame.number"])
            pairs.add((name, r["tcp.stream"], int(conn[int(r["frame.number"])])))
    streams, conns = defaultdict(set), defaultdict(set)
    for name, stream, c in pairs:
        streams[name, stream].add(c)
        conns[name, c].add(stream)
    assert len(streams) >= 250
    assert [k for k, v in streams.items() if len(v) > 1] == []
    assert [k for k, v in conns.items() if len(v) > 1] == []
