"""Zeek conn.log columns: hand-written connections for each conn_state, then conformance with
Zeek's own baselines of its test suite (../shared/corpus/external/zeek, skipped if absent)."""
import importlib.util
from pathlib import Path

import pytest
from segscript import Script

from pcapflow.analysis import FLOW_FIELDS
from pcapflow.teardown import Flow
from pcapflow.zeek import zeek_fields

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus" / "external" / "zeek"


def zeek(s: Script, conn_id: int = 0) -> dict:
    """zeek_fields of one scripted connection, from the analysis' segment table."""
    a = s.analyze()
    seg = a.segments[a.segments["conn"] == conn_id]
    flow = Flow(**{k: seg[{"d": "dir"}.get(k, k)].to_numpy() for k in FLOW_FIELDS})
    return zeek_fields(flow, bool(a.connections.loc[conn_id].roles_inferred))


def summary(s: Script) -> tuple:
    z = zeek(s)
    return z["zeek_conn_state"], z["zeek_history"]


def established(**kw) -> Script:
    s = Script(**kw)
    s.handshake()
    s.send("c", "PA", 0.1, plen=100)
    s.send("s", "A", 0.12)
    return s


def test_s0_unanswered_syn_and_its_retransmission():
    s = Script()
    s.send("c", "S", 0)
    s.send("c", "S", 1, seq=1000)
    z = zeek(s)
    assert (z["zeek_conn_state"], z["zeek_history"], z["orig_pkts"], z["resp_pkts"]) == \
        ("S0", "S", 2, 0)
    assert (z["orig_bytes"], z["resp_bytes"]) == (0, 0)


def test_single_packet_has_no_byte_counts():
    s = Script()
    s.send("c", "S", 0)
    z = zeek(s)
    assert (z["orig_bytes"], z["resp_bytes"]) == (None, None)  # duration 0: Zeek logs '-'


def test_s1_established_and_sf_closed():
    s = established()
    assert summary(s) == ("S1", "ShADa")
    s.send("c", "FA", 1.0)
    s.send("s", "A", 1.02)
    s.send("s", "FA", 1.03)
    s.send("c", "A", 1.05)
    z = zeek(s)
    assert (z["zeek_conn_state"], z["zeek_history"]) == ("SF", "ShADaFf")
    assert (z["orig_pkts"], z["resp_pkts"], z["orig_bytes"], z["resp_bytes"]) == (5, 4, 100, 0)


def test_rej():
    s = Script()
    s.send("c", "S", 0)
    s.send("s", "RA", 0.01)
    assert summary(s) == ("REJ", "Sr")


@pytest.mark.parametrize("side, flags, expected", [
    ("c", "FA", ("S2", "ShADaF")), ("s", "FA", ("S3", "ShADaf")),
    ("c", "RA", ("RSTO", "ShADaR")), ("s", "RA", ("RSTR", "ShADar"))])
def test_one_side_closes_or_resets(side, flags, expected):
    s = established()
    s.send(side, flags, 1.0)
    assert summary(s) == expected


def test_rstos0_and_sh_from_an_originator_never_answered():
    s = Script()
    s.send("c", "S", 0)
    s.send("c", "R", 0.5, seq=1001)
    assert summary(s) == ("RSTOS0", "SR")
    s = Script()
    s.send("c", "S", 0)
    s.send("c", "FA", 0.5, seq=1001, ack=0)
    assert summary(s) == ("SH", "SF")


def test_rstrh_and_shr_from_a_responder_whose_syn_was_not_seen():
    s = Script()
    s.send("s", "SA", 0, ack=1001)
    s.send("s", "R", 0.5)
    assert summary(s) == ("RSTRH", "^hr")  # a SYN-ACK first: Zeek flips the roles
    s = Script()
    s.send("s", "SA", 0, ack=1001)
    s.send("s", "FA", 0.5, ack=1001)
    assert summary(s) == ("SHR", "^hf")


def test_oth_midstream():
    s = Script()
    s.send("c", "PA", 0, plen=10)
    s.send("s", "A", 0.01)
    assert summary(s) == ("OTH", "Da")


def test_midstream_first_packet_from_the_server_is_flipped():
    s = Script()
    s.send("s", "PA", 0, plen=10)
    s.send("c", "A", 0.01)
    z = zeek(s)
    assert (z["zeek_history"], z["orig_pkts"], z["resp_pkts"]) == ("^dA", 1, 1)


def test_repeated_fin_is_logged_once_and_retransmissions_logarithmically():
    s = established()
    for k in range(10):  # the same 100 bytes again, ten times: t at the 1st and 10th
        s.send("c", "PA", 0.2 + k, plen=100, seq=1001)
    s.send("c", "FA", 11)
    s.send("c", "FA", 12, seq=1101)
    assert summary(s) == ("S2", "ShADaTTF")


def test_bytes_come_from_sequence_numbers_and_an_acked_hole_is_a_gap():
    s = established()
    s.send("c", "PA", 0.2, plen=100, seq=1201)  # 1101..1200 never captured
    s.send("s", "A", 0.25, ack=1301)
    z = zeek(s)
    assert z["zeek_history"] == "ShADaG"
    assert z["orig_bytes"] == 300  # the payload captured is 200


def test_zeek_ends_an_unanswered_attempt_after_five_seconds():
    s = Script()
    s.send("c", "S", 0)
    s.send("c", "A", 7, ack=5001)  # Zeek logs this in a new connection
    z = zeek(s)
    assert (z["zeek_conn_state"], z["zeek_history"], z["orig_pkts"]) == ("S0", "S", 1)


def test_a_syn_after_a_reset_opens_a_new_zeek_connection():
    s = Script()
    s.send("c", "S", 0)
    s.send("s", "RA", 0.01)
    s.send("c", "S", 3, seq=1000)  # same ISN: one pcapflow connection, two Zeek ones
    z = zeek(s)
    assert (z["zeek_history"], z["orig_pkts"], z["resp_pkts"]) == ("Sr", 1, 1)


# Every remaining difference from Zeek's baselines, by capture, with its reason.
KNOWN = {
    "ftp__fake-long-commands.pcap": "history `X`: Zeek's FTP analyzer hit its command-length "
    "limit (application analysis, not TCP)",
    "globus-url-copy.pcap": "Zeek's gridftp script calls skip_further_processing() on the data "
    "channel once detected, so Zeek counts no packet after that (S1, fewer packets)",
    "tcp__retransmit-fast009.pcap": "snap length 54: Zeek reassembles only captured payload, so "
    "all data are gaps (`G`, `g`) and never `d`; the Flow has no captured-length column",
    "modbus__modbus-and-non-modbus-p502.pcap": "Zeek split the 4-tuple: data after the RST "
    "came later than tcp_close_delay and opened a new Zeek connection (`Dr`)",
    "pop3__pop3.pcap": "Zeek split the 4-tuple: each SYN retransmission after the responder's "
    "RST is a new Zeek connection (IsReuse after a close), pcapflow keeps one (same ISN)",
    "ssh__ssh.client-side-half-duplex.pcap": "Zeek split the 4-tuple: one-sided capture, the "
    "attempt timer (5 s) ends Zeek's connection (S0 `SAD`) and the rest is a new one (`DAF`)",
    "tunnels__Teredo.pcap": "Zeek split the IPv4 4-tuples after close/reset delays (`Fa`, `R`, "
    "`^r` rows), and its IPv6-in-Teredo connection is not decoded by pcapflow",
    "tunnels__geneve-many-options.pcap": "encapsulation pcapflow does not decode (Geneve)",
    "tunnels__gre-sample.pcap": "encapsulation pcapflow does not decode (GRE)",
    "tunnels__gtp__gtp1_gn_normal_incl_fragmentation.pcap": "encapsulation pcapflow does not "
    "decode (GTP over fragmented IP)",
    "tunnels__gtp__gtp2_different_udp_port.pcap": "encapsulation pcapflow does not decode (GTP)",
    "tunnels__vxlan-encapsulated-http.pcap": "encapsulation pcapflow does not decode (VXLAN)",
}


@pytest.fixture(scope="module")
def corpus_result():
    if not CORPUS.is_dir():
        pytest.skip("external Zeek corpus absent")
    spec = importlib.util.spec_from_file_location("zeek_match", ROOT / "tools" / "zeek_match.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.compare_corpus(CORPUS)


def rate(result, metric):
    ok, n = result["totals"][metric]
    return ok / n


def test_conn_state_and_history_agree_with_zeek(corpus_result):
    assert corpus_result["matched"] >= 100
    assert rate(corpus_result, "conn_state") >= 0.95
    assert rate(corpus_result, "history") >= 0.90


def test_packet_counts_are_exact_except_listed(corpus_result):
    bad = [(cap, t) for cap, t in corpus_result["diffs"] if "_pkts" in t and cap not in KNOWN]
    assert not bad


def test_every_difference_is_explained(corpus_result):
    crashed = {cap: t for cap, t in corpus_result["unmatched"] if "pcapflow failed" in t}
    rows = corpus_result["diffs"] + corpus_result["unmatched"]
    assert [(cap, t) for cap, t in rows if cap not in KNOWN and cap not in crashed] == []
    if crashed:  # pcapflow.analyze itself failed there: not a Zeek difference, but say so
        pytest.xfail(f"pcapflow could not analyze: {crashed}")
