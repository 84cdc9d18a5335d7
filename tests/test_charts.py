"""Charts read back through their matplotlib objects, on the lab's real captures."""
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from segscript import Script

import pcapflow
from pcapflow.report import charts

SAMPLES = Path(__file__).resolve().parent.parent / "sample_pcaps"


def load(scenario: str, vantage: str):
    return pcapflow.analyze(str(SAMPLES / scenario / f"{vantage}.pcap"))


def by_gid(ax, gid: str) -> list:
    return [x for x in [*ax.texts, *ax.patches, *ax.lines] if x.get_gid() == gid]


def test_ladder_of_lost_wave4_draws_every_segment_the_loss_and_time_wait():
    a = load("lost_wave4", "client")
    ax = charts.ladder(a, 0).axes[0]
    seg = a.segments[(a.segments["conn"] == 0) & ~a.segments["dup"]]
    arrows = by_gid(ax, "segment")
    assert len(arrows) == len(seg)
    dashed = [x for x in arrows if x.arrow_patch.get_linestyle() == "--"]
    assert len(dashed) == 1  # the server's FIN, re-sent because the final ACK was lost
    assert len(by_gid(ax, "loss")) == 1
    assert any(t.get_text() == "wave 4 lost" for t in ax.texts)
    assert any("FIN,ACK seq=101 ack=102" in t.get_text() for t in ax.texts)
    assert len(by_gid(ax, "time_wait")) == 1
    texts = [t.get_text() for t in ax.texts]
    assert "TIME_WAIT" in texts
    assert any(t.startswith("TIME_WAIT continues to +60.") for t in texts)


def test_ladder_shows_a_fin_lost_before_the_server_capture_as_an_unseen_segment():
    a = load("lost_wave1", "server")
    ax = charts.ladder(a, 0).axes[0]
    assert len(by_gid(ax, "ghost")) == 1
    assert len(by_gid(ax, "loss")) == 1
    assert any("lost before the capture point" in t.get_text() for t in ax.texts)


def test_ladder_of_a_long_connection_keeps_handshake_and_teardown_with_a_break():
    s = Script()
    t = s.handshake()
    for _ in range(60):
        t += 0.01
        s.send("c", "PA", t, plen=100)
        s.send("s", "A", t + 0.005)
    s.send("c", "FA", t + 1)
    s.send("s", "FA", t + 1.02)
    s.send("c", "A", t + 1.04)
    ax = charts.ladder(s.analyze(), 0).axes[0]
    labels = [x.get_text() for x in ax.texts]
    assert len(by_gid(ax, "segment")) <= charts.MAX_ROWS
    assert len(by_gid(ax, "break")) == 1
    assert any(x.startswith("SYN seq=0") for x in labels)
    assert sum(x.startswith("FIN,ACK") for x in labels) == 2


def test_states_chart_of_http_pileup_reaches_the_time_wait_count_of_the_table():
    a = load("http_pileup", "server")
    truth = json.loads((SAMPLES / "http_pileup" / "truth.json").read_text())
    kernel = sum(s["state"] == "TIME_WAIT" for s in truth["ss"]["server"])
    server = truth["hosts"]["server"]["ip"]
    table = a.states()
    count = int(table[(table["host"] == server) & (table["state"] == "TIME_WAIT")]["count"].sum())
    assert count == kernel
    fig = charts.states_over_time(a, freq="100ms")
    ax = next(ax for ax in fig.axes if ax.get_title().startswith(f"{server}:"))
    tw = next(c for c in ax.collections if c.get_label() == "TIME_WAIT")
    top = max(p.vertices[:, 1].max() for p in tw.get_paths())
    assert top == count


def test_backoff_chart_plots_each_fin_transmission_against_the_doubling():
    a = load("lost_wave3_backoff", "server")
    intervals = a.connections.at[0, "server_fin_backoff"]
    assert len(intervals) >= 2
    ax = charts.fin_backoff(a).axes[0]
    observed, ideal = ax.lines[0], ax.lines[1]
    assert np.allclose(observed.get_ydata(), np.cumsum(intervals))
    assert ideal.get_linestyle() == "--"
    assert np.allclose(ideal.get_ydata(), np.cumsum(intervals), rtol=0.3)


def test_distributions_count_peak_time_wait_per_server_port():
    a = load("http_pileup", "server")
    ax = charts.distributions(a).axes[2]
    held = (a.connections["time_wait_side"] == "server").sum()
    assert max(p.get_width() for p in ax.patches) == held


def test_write_charts_writes_pngs_and_leaves_no_pyplot_figure(tmp_path):
    a = load("lost_wave1", "client")
    paths = charts.write_charts(a, str(tmp_path))
    names = {Path(p).name for p in paths}
    assert {"states.png", "distributions.png", "backoff.png", "ladder-0.png"} <= names
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert plt.get_fignums() == []


@pytest.mark.parametrize("scenario", ["close_wait_many", "simultaneous", "refused",
                                      "keepalive_dead_peer", "half_close"])
def test_every_connection_and_chart_draws(scenario):
    a = load(scenario, "router")
    for cid in a.connections["conn_id"]:
        assert by_gid(charts.ladder(a, cid).axes[0], "segment")
    assert "states.png" in charts.figures(a)
