"""Findings on the lab's captures carry the kernel's numbers; clean closes raise none."""
import json
from pathlib import Path

import pandas as pd
import pytest

import pcapflow

SAMPLE = Path(__file__).resolve().parent.parent / "sample_pcaps"
PCAPS = ("client.pcap", "router.pcap", "server.pcap")
CLEAN = ["four_way_client_first", "four_way_server_first", "three_way", "simultaneous", "ipv6",
         "half_close"]


def truth(scenario):
    return json.loads((SAMPLE / scenario / "truth.json").read_text())


def findings(scenario, pcap="server.pcap", **kw):
    return pcapflow.analyze(str(SAMPLE / scenario / pcap), **kw).findings.set_index("kind")


@pytest.mark.parametrize("pcap", PCAPS)
@pytest.mark.parametrize("scenario", CLEAN)
def test_clean_closes_raise_no_finding(scenario, pcap):
    assert findings(scenario, pcap).empty


@pytest.mark.parametrize("pcap", PCAPS)
def test_time_wait_pileup_names_its_causes_with_the_kernels_numbers(pcap):
    agg = truth("http_pileup")["aggregate"]
    f = findings("http_pileup", pcap).loc["server_time_wait_pileup"]
    assert (f["host"], f["port"], f["count"]) == ("10.0.2.2", 8080, agg["server_time_wait"])
    reasons = agg["server_close_reasons"]
    assert f"Connection: close {reasons['connection_close']}" in f["summary"]
    assert f"request limit ({agg['request_limit']} requests) {reasons['request_limit']}" in f["summary"]
    assert f"idle timeout (~{agg['idle_timeout_s']:.1f} s) {reasons['idle_timeout']}" in f["summary"]
    assert f"held up to {agg['server_time_wait']} TIME_WAITs at once" in f["summary"]


@pytest.mark.parametrize("scenario", ["close_wait_many", "postmortem"])
def test_close_wait_leak_is_found_against_the_ports_habit(scenario):
    (leak,) = truth(scenario)["aggregate"]["close_wait_leaks"]
    f = findings(scenario).loc["close_wait_leak"]
    assert (f["host"], f["port"], f["count"]) == (leak["host"], leak["port"], leak["count"])
    assert f["severity"] == "warning"
    ss_close_wait = sum(s["state"] == "CLOSE_WAIT" for s in truth(scenario)["ss"]["server"])
    assert f["count"] == ss_close_wait


def test_postmortem_shows_every_problem_at_once():
    agg = truth("postmortem")["aggregate"]
    f = findings("postmortem")
    assert set(f.index) == {"server_time_wait_pileup", "close_wait_leak", "fin_loss"}
    assert f.loc["server_time_wait_pileup", "count"] == agg["server_time_wait"]
    assert f.loc["fin_loss", "count"] == agg["lost_fins"]


def test_orphan_give_up_names_the_sysctl_value():
    t = truth("lost_wave1_giveup")
    retries = t["sysctls"]["client"]["net.ipv4.tcp_orphan_retries"]
    f = findings("lost_wave1_giveup", "client.pcap").loc["orphan_giveup"]
    assert f"fits tcp_orphan_retries={retries})" in f["summary"]


def test_fin_wait2_timeout_needs_the_hosts_fin_timeout():
    fin_timeout = float(truth("fin_wait2_timeout")["sysctls"]["client"]["net.ipv4.tcp_fin_timeout"])
    assert "fin_wait2_timeout" not in findings("fin_wait2_timeout").index  # data within 60 s
    f = findings("fin_wait2_timeout", fin_timeout=fin_timeout)
    assert f.loc["fin_wait2_timeout", "count"] == 1


def test_keepalive_dead_peer_counts_the_unanswered_probes():
    f = findings("keepalive_dead_peer", "client.pcap").loc["keepalive_dead_peer"]
    assert "after 3 unanswered keepalive probes" in f["summary"]
    assert "keepalive_dead_peer" not in findings("keepalive_dead_peer").index  # never seen there


@pytest.mark.parametrize("scenario, kind", [("linger0_abort", "abort"), ("unread_data_rst", "abort"),
                                            ("data_to_closed", "reply_to_closed"),
                                            ("refused", "refused")])
def test_rst_shortcuts_by_kind(scenario, kind):
    f = findings(scenario).loc["rst_shortcut"]
    assert f["cause"] == kind and f["count"] == 1


def test_port_exhaustion_when_the_range_is_one_port():
    a = pcapflow.analyze(str(SAMPLE / "tw_reuse_ephemeral" / "client.pcap"))
    assert a.findings.empty
    lo, hi = map(int, truth("tw_reuse_ephemeral")["sysctls"]["client"]
                 ["net.ipv4.ip_local_port_range"].split())
    a.params.port_range = (lo, hi)
    a._findings = None
    f = a.findings.set_index("kind").loc["port_exhaustion_risk"]
    assert f["severity"] == "critical" and "held up to 1 ports" in f["summary"]


@pytest.mark.parametrize("scenario", ["postmortem", "http_pileup", "close_wait_many", "keepalive_dead_peer",
                                      "lost_wave1_giveup", "fin_wait2_timeout"])
def test_findings_read_only_their_declared_columns(scenario):
    """compute_findings (and batch) hand the finders findings.INPUTS alone: the findings must
    be those the finders make from the whole connections table."""
    from pcapflow.findings import COLUMNS, FINDERS
    a = pcapflow.analyze(str(SAMPLE / scenario / "client.pcap"))
    assert len(a.findings)
    whole = pd.DataFrame([f for finder in FINDERS for f in finder(a)], columns=COLUMNS)

    def ordered(df):
        return df.sort_values(["kind", "summary"], ignore_index=True)
    pd.testing.assert_frame_equal(ordered(a.findings), ordered(whole))
