"""The lab corpus (sample_pcaps/<scenario>/) is complete, uses the SPEC vocabulary, and its
truth agrees with its own captures and ss snapshot.

FIN transmissions are counted here with dpkt, independently of tools/lab_pcap.py.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from itertools import pairwise
from pathlib import Path

import dpkt
import pytest

from pcapflow import vocab

CORPUS = Path(__file__).resolve().parent.parent / "sample_pcaps"
SCENARIOS = sorted(p.parent.name for p in CORPUS.glob("*/truth.json"))
PCAPS = {"client": "client.pcap", "middle": "router.pcap", "server": "server.pcap"}

CLOSE_TYPES = set(vocab.CLOSE_TYPES)
CLOSERS = set(vocab.ACTIVE_CLOSERS)
STATES = set(vocab.STATES) - {"LISTEN"}
SS_STATES = set(vocab.STATES)  # ss also lists the listening sockets
RST_BY = {"client", "server", "both", "none"}
RST_KINDS = set(vocab.RST_KINDS) | {None}
TW_SIDES = {"client", "server", "both", "none"}
EXPECT_KEYS = {
    "close_type",
    "active_closer",
    "client_state_end",
    "server_state_end",
    "client_fin_retransmits",
    "server_fin_retransmits",
    "lost_waves",
    "rst_by",
    "rst_kind",
    "time_wait_side",
    "reused_4tuple",
}
LINKS = {1: dpkt.ethernet.Ethernet, 113: dpkt.sll.SLL, 276: dpkt.sll2.SLL2}


def load(name: str) -> dict:
    return json.loads((CORPUS / name / "truth.json").read_text())


def tcp_packets(path: Path):
    """(src ip, TCP) of every TCP segment in a pcap."""
    with path.open("rb") as fh:
        reader = dpkt.pcap.Reader(fh)
        link = LINKS[reader.datalink()]
        for _, buf in reader:
            ip = link(buf).data
            if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(ip.data, dpkt.tcp.TCP):
                fam = socket.AF_INET6 if isinstance(ip, dpkt.ip6.IP6) else socket.AF_INET
                yield socket.inet_ntop(fam, ip.src), ip.data


def fin_counts(path: Path, client_ip: str) -> Counter:
    """FIN transmissions per (client_port, server_port, incarnation, side)."""
    counts: Counter = Counter()
    incarnation: dict[tuple, tuple[int, int]] = {}  # 4-tuple -> (incarnation, SYN seq)
    for src, tcp in tcp_packets(path):
        side = "client" if src == client_ip else "server"
        ports = (tcp.sport, tcp.dport) if side == "client" else (tcp.dport, tcp.sport)
        inc, isn = incarnation.get(ports, (-1, None))
        if tcp.flags & (dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK) == dpkt.tcp.TH_SYN and tcp.seq != isn:
            incarnation[ports] = inc, isn = inc + 1, tcp.seq
        if tcp.flags & dpkt.tcp.TH_FIN:
            counts[(*ports, max(inc, 0), side)] += 1
    return counts


def test_corpus_is_there():
    assert len(SCENARIOS) >= 20, f"only {SCENARIOS} in {CORPUS}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_truth_shape_and_vocabulary(name):
    t = load(name)
    assert t["scenario"] == name and t["lab_version"] == 1 and t["family"] in (4, 6)
    assert t["lab_check"]["ok"], t["lab_check"]["mismatches"]
    assert t["capture"]["vantages"] == PCAPS
    assert t["capture"]["start"] < t["ss"]["taken_at"] < t["capture"]["stop"]
    for side in ("client", "server"):
        assert t["hosts"][side]["ns"].startswith("pf-")
        assert "net.ipv4.tcp_orphan_retries" in t["sysctls"][side]
        for row in t["ss"][side]:
            assert row["state"] in SS_STATES, row
    for fault in t["faults"]:
        assert fault["where"] == "router forward" and fault["drops"] >= 0 and fault["rule"]
    assert t["connections"]
    for c in t["connections"]:
        e = c["expect"]
        assert EXPECT_KEYS <= e.keys()
        assert e["close_type"] in CLOSE_TYPES and e["active_closer"] in CLOSERS
        assert e["client_state_end"] in STATES and e["server_state_end"] in STATES
        assert e["rst_by"] in RST_BY and e["rst_kind"] in RST_KINDS
        assert (e["rst_by"] == "none") == (e["rst_kind"] is None)
        assert e["time_wait_side"] in TW_SIDES and isinstance(e["reused_4tuple"], bool)
        assert e["lost_waves"] == sorted(e["lost_waves"]) and set(e["lost_waves"]) <= {1, 2, 3, 4}
        assert set(c["vantage"]) == {"client", "middle", "server"}
        for view in c["vantage"].values():
            assert set(view.get("invisible", [])) <= set(e)
    if any(c["expect"]["lost_waves"] for c in t["connections"]):
        assert sum(f["drops"] for f in t["faults"]) > 0, "a lost wave needs a fault that dropped"


@pytest.mark.parametrize("name", SCENARIOS)
def test_states_match_the_ss_snapshot(name):
    """*_state_end is what ss reported for the latest incarnation; CLOSED when not listed."""
    t = load(name)
    ip = {s: t["hosts"][s]["ip"] for s in ("client", "server")}

    def ep(side, port):
        return f"[{ip[side]}]:{port}" if t["family"] == 6 else f"{ip[side]}:{port}"

    latest = Counter((c["client_port"], c["server_port"]) for c in t["connections"])
    for c in t["connections"]:
        if c["incarnation"] != latest[(c["client_port"], c["server_port"])] - 1:
            continue
        cli, srv = ep("client", c["client_port"]), ep("server", c["server_port"])
        for side, local, peer in (("client", cli, srv), ("server", srv, cli)):
            rows = [r["state"] for r in t["ss"][side] if (r["local"], r["peer"]) == (local, peer)]
            assert c["expect"][f"{side}_state_end"] == (rows[0] if rows else "CLOSED"), (c, side)


@pytest.mark.parametrize("name", SCENARIOS)
def test_fin_transmissions_match_each_vantage(name):
    """FINs counted in each pcap equal expect, or the vantage override where one is given."""
    t = load(name)
    for vantage, pcap in PCAPS.items():
        path = CORPUS / name / pcap
        counts = fin_counts(path, t["hosts"]["client"]["ip"])
        assert counts or any(True for _ in tcp_packets(path)), f"{path} has no TCP"
        for c in t["connections"]:
            view = c["vantage"][vantage]
            for side in ("client", "server"):
                fact = f"{side}_fin_retransmits"
                if fact in view.get("invisible", []):
                    continue
                seen = counts[(c["client_port"], c["server_port"], c["incarnation"], side)]
                want = view.get(fact, c["expect"][fact])
                assert max(seen - 1, 0) == want, (vantage, c["client_port"], fact, seen)


@pytest.mark.parametrize("name", SCENARIOS)
def test_sender_capture_holds_every_fin(name):
    """The sender's own capture sees every transmission: expect counts come from there."""
    t = load(name)
    for side in ("client", "server"):
        counts = fin_counts(CORPUS / name / PCAPS[side], t["hosts"]["client"]["ip"])
        for c in t["connections"]:
            seen = counts[(c["client_port"], c["server_port"], c["incarnation"], side)]
            assert max(seen - 1, 0) == c["expect"][f"{side}_fin_retransmits"]


def test_giveup_shows_the_client_silence_then_an_rst():
    """lost_wave1_giveup: FINs that never arrive, the orphan gone, then data answered by RST."""
    t = load("lost_wave1_giveup")
    (c,) = t["connections"]
    e, notes = c["expect"], t["notes"]
    assert e["close_type"] == "fin_then_reset" and e["rst_kind"] == "reply_to_closed"
    assert e["client_state_end"] == e["server_state_end"] == "CLOSED"
    times = notes["fin_tx_times"]
    assert len(times) == notes["client_fin_transmissions"] == e["client_fin_retransmits"] + 1
    assert times[0] == 0 and times == sorted(times)
    gaps = [b - a for a, b in pairwise(times[1:])]  # after the tail-loss probe
    assert all(1.6 < b / a < 2.4 for a, b in pairwise(gaps)), gaps  # RTO doubling
    assert notes["client_first_fin_at"] < notes["client_socket_gone_at"]
    assert notes["server_write_at"] - notes["client_socket_gone_at"] > 2
    assert c["vantage"]["server"]["close_type"] == "reset"
    assert "lost_waves" in c["vantage"]["server"]["invisible"]
    # The server's data left after the client socket was gone; the client's RST is bare.
    ip = t["hosts"]["client"]["ip"]
    segs = list(tcp_packets(CORPUS / "lost_wave1_giveup" / PCAPS["client"]))
    rst = [tcp for src, tcp in segs if src == ip and tcp.flags & dpkt.tcp.TH_RST]
    assert len(rst) == 1 and not rst[0].flags & dpkt.tcp.TH_ACK


def test_no_rst_seen_means_no_rst_kind():
    for name in SCENARIOS:
        for c in load(name)["connections"]:
            for vantage, view in c["vantage"].items():
                if view.get("rst_by", c["expect"]["rst_by"]) == "none":
                    assert view.get("rst_kind", c["expect"]["rst_kind"]) is None, (name, vantage)


def test_postmortem_aggregate():
    t = load("postmortem")
    agg, conns = t["aggregate"], t["connections"]
    kinds = Counter(c["expect"]["http"] for c in conns)
    assert agg["connections"] == len(conns) == sum(agg["plan"].values())
    assert kinds == Counter(agg["plan"])
    assert agg["server_time_wait"] == kinds["close"] + kinds["limit:5"] >= 100
    assert agg["server_close_reasons"]["request_limit"] == kinds["limit:5"] >= 15
    assert agg["request_limit"] == 5
    assert agg["close_wait_leaks"] == [
        {"host": t["hosts"]["server"]["ip"], "port": 8080, "count": kinds["leak"]}
    ]
    lost = [c for c in conns if c["expect"]["lost_waves"]]
    assert len(lost) == agg["lost_fins"] == len(agg["lost_fin_ports"]) == 3
    assert {c["client_port"] for c in lost} == set(agg["lost_fin_ports"])
    assert all(c["expect"]["server_fin_retransmits"] == 1 for c in lost)
    assert sum(f["drops"] for f in t["faults"]) == 3
    leaks = [c for c in conns if c["expect"]["http"] == "leak"]
    assert all(c["expect"]["server_state_end"] == "CLOSE_WAIT" for c in leaks)
    size = sum((CORPUS / "postmortem" / f).stat().st_size for f in PCAPS.values())
    assert size < 1_000_000 and t["capture"]["stop"] - t["capture"]["start"] < 20


def test_syn_meets_close_wait():
    """A new SYN on the 4-tuple of a server CLOSE_WAIT: the old socket ACKs the old FIN, the
    client resets it (bare RST, seq = that ACK's ack) and re-sends the same SYN, which opens
    the second incarnation; the first ends fin_then_reset, CLOSED on both sides."""
    t = load("syn_meets_close_wait")
    old, new = t["connections"]
    assert (old["incarnation"], new["incarnation"]) == (0, 1)
    assert old["client_port"] == new["client_port"]
    e = old["expect"]
    assert e["close_type"] == "fin_then_reset" and e["active_closer"] == "client"
    assert (e["rst_by"], e["rst_kind"]) == ("client", "reply_to_closed")
    assert e["client_state_end"] == e["server_state_end"] == "CLOSED"
    assert new["expect"]["close_type"] == "four_way" and not new["expect"]["reused_4tuple"]
    # ss: the orphan expired (no TIME_WAIT) while the server held CLOSE_WAIT; after the
    # reconnect the server holds only the new connection.
    before, after = t["ss_during"][1], t["ss_during"][2]
    assert not before["client"]
    assert [r["state"] for r in before["server"] if r["state"] != "LISTEN"] == ["CLOSE_WAIT"]
    assert [r["state"] for r in after["server"] if r["state"] != "LISTEN"] == ["ESTABLISHED"]
    ip = t["hosts"]["client"]["ip"]
    for pcap in PCAPS.values():
        segs = list(tcp_packets(CORPUS / "syn_meets_close_wait" / pcap))
        syn = [tcp for src, tcp in segs if src == ip and tcp.flags & 0x12 == dpkt.tcp.TH_SYN]
        fin = next(tcp for src, tcp in segs if src == ip and tcp.flags & dpkt.tcp.TH_FIN)
        assert len({s.seq for s in syn}) == 2 and [s.seq for s in syn].count(syn[-1].seq) == 2
        i = next(k for k, (src, tcp) in enumerate(segs) if tcp is syn[1])
        (_, reply), (_, rst), (_, retry) = segs[i + 1 : i + 4]
        assert reply.flags == dpkt.tcp.TH_ACK and reply.ack == (fin.seq + 1) % 2**32
        assert rst.flags == dpkt.tcp.TH_RST and rst.seq == reply.ack
        assert retry is syn[2]
